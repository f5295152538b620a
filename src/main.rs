//! The `bite-sync` binary: parse the command line, load configuration, set up logging, run the
//! command, print the error chain and exit with a code that means something:
//! 0 success, 1 failure, 2 usage or configuration error, 130 interrupted.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;

use bite_sync::cli::{
    BackupsCommand, CheckArgs, Cli, Command, RunArgs, SchedulesArgs, StatusArgs, SyncArgs,
};
use bite_sync::config::{self, Config, ConfigError, LogFormat, Overrides};
use bite_sync::pg::ident::parse_pattern_list;
use bite_sync::relay::deliver::Pull;
use bite_sync::repl::apply::Limits;
use bite_sync::repl::daemon::{self, RunOptions};
use bite_sync::repl::{check, status};
use bite_sync::schedule;
use bite_sync::sync::{self, Mode, SyncError, SyncOptions};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let origins = Origins::of(&matches);
    let config = match load_config(&cli, &origins) {
        Ok(c) => c,
        Err(e) => return fail_config(&e),
    };
    init_tracing(&cli, &config);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let cancel = CancellationToken::new();
    runtime.spawn(shutdown_on_signal(cancel.clone()));
    let code = runtime.block_on(async {
        match cli.command {
            Command::Sync(args) => run_sync(&config, &args, cancel).await,
            Command::Run(args) => run_daemon(&config, &args, cancel).await,
            Command::Status(args) => run_status(&config, &args).await,
            Command::Check(args) => run_check(&config, &args).await,
            Command::Backup(args) => bite_sync::backup::run_backup(&config, &args).await,
            Command::Backups(BackupsCommand::List(args)) => {
                bite_sync::backup::run_list(&config, &args).await
            }
            Command::Backups(BackupsCommand::Verify(args)) => {
                bite_sync::backup::run_verify(&config, &args).await
            }
            Command::Backups(BackupsCommand::Prune(args)) => {
                bite_sync::backup::run_prune(&config, &args).await
            }
            Command::Backups(BackupsCommand::Keygen(args)) => bite_sync::backup::run_keygen(&args),
            Command::Restore(args) => bite_sync::backup::run_restore(&config, &args).await,
            Command::Schedules(args) => run_schedules_list(&config, &args).await,
            Command::Relay(args) => run_relay(&config, &args, cancel).await,
            Command::Demo(args) => report(bite_sync::demo::run(&args, cancel).await),
            Command::Bench(args) => report(bite_sync::bench::run(&args, cancel).await),
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

/// Where flags' values came from: the command line or the environment, so that messages
/// name what the user set.
#[derive(Default)]
struct Origins {
    source: Option<String>,
    mirror: Option<String>,
    tables: Option<&'static str>,
    exclude: Option<&'static str>,
}

impl Origins {
    fn of(matches: &clap::ArgMatches) -> Origins {
        let Some((_, sub)) = matches.subcommand() else {
            return Origins::default();
        };
        let from = |id: &str, flag: &'static str, env: &'static str| {
            let known = sub.ids().any(|i| i.as_str() == id);
            match known.then(|| sub.value_source(id)).flatten() {
                Some(clap::parser::ValueSource::EnvVariable) => Some(env),
                Some(clap::parser::ValueSource::CommandLine) => Some(flag),
                _ => None,
            }
        };
        Origins {
            source: from("source", "--source", "BITE_SOURCE_URL").map(str::to_string),
            mirror: from("mirror", "--mirror", "BITE_MIRROR_URL").map(str::to_string),
            tables: from("tables", "--tables", "BITE_TABLES"),
            exclude: from("exclude", "--exclude", "BITE_EXCLUDE"),
        }
    }
}

/// The configuration a command runs with. `demo`, `bench` and `backups keygen` need none, so a
/// broken `./bite-sync.toml` must not stop them: they get the built-in defaults.
fn load_config(cli: &Cli, origins: &Origins) -> Result<Config, ConfigError> {
    let needs_none = matches!(
        cli.command,
        Command::Demo(_) | Command::Bench(_) | Command::Backups(BackupsCommand::Keygen(_))
    );
    if needs_none {
        return config::resolve(None, config::RawConfig::default(), Overrides::default());
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    let overrides = overrides(cli, origins)?;
    let (file, raw) = config::read_file(cli.config.as_deref(), &cwd)?;
    // The relay's own sections are checked when it starts; their problems belong in the same
    // list as the rest of the file's.
    let relay_raw =
        matches!(cli.command, Command::Relay(_)).then(|| (raw.relay.clone(), raw.delivery.clone()));
    config::resolve(file.clone(), raw, overrides).map_err(|mut e| {
        if let Some((relay, delivery)) = relay_raw
            && let Err(more) = bite_sync::relay::settings::RelaySettings::resolve(
                &relay,
                &delivery,
                file.as_deref(),
                &bite_sync::relay::settings::process_env,
            )
        {
            e.problems.extend(more.problems);
        }
        e
    })
}

/// Flags that override the config file.
fn overrides(cli: &Cli, origins: &Origins) -> Result<Overrides, ConfigError> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut o = Overrides {
        alert_webhook: env(config::ALERT_WEBHOOK_VAR),
        backup_url: env("BITE_BACKUP_URL"),
        source_from: origins.source.clone(),
        mirror_from: origins.mirror.clone(),
        ..Overrides::default()
    };
    let list = |flag: &str, text: &Option<String>| match text {
        None => Ok(None),
        Some(t) => parse_pattern_list(t).map(Some).map_err(|e| {
            let from = match flag {
                "tables" => origins.tables,
                _ => origins.exclude,
            };
            ConfigError {
                problems: vec![format!("{}: {e}", from.unwrap_or(&format!("--{flag}")))],
            }
        }),
    };
    let db = match &cli.command {
        Command::Sync(a) => Some(&a.db),
        Command::Run(a) => Some(&a.db),
        Command::Status(a) => Some(&a.db),
        Command::Check(a) => Some(&a.db),
        Command::Schedules(a) => Some(&a.db),
        Command::Relay(_)
        | Command::Demo(_)
        | Command::Bench(_)
        | Command::Backup(_)
        | Command::Backups(_)
        | Command::Restore(_) => None,
    };
    if let Some(db) = db {
        o.source_url = db.source.clone();
        o.mirror_url = db.mirror.clone();
    }
    match &cli.command {
        Command::Run(a) => {
            o.replication_tables = list("tables", &a.tables)?;
            o.slot = a.slot.clone();
            o.publication = a.publication.clone();
        }
        Command::Status(a) => o.slot = a.slot.clone(),
        Command::Check(a) => o.replication_tables = list("tables", &a.tables)?,
        _ => {}
    }
    if let Command::Sync(args) = &cli.command {
        o.source_url = args.db.source.clone();
        o.mirror_url = args.db.mirror.clone();
        o.tables = list("tables", &args.tables)?;
        o.exclude = list("exclude", &args.exclude)?;
        o.jobs = args.jobs.map(usize::from);
        o.lock_timeout = args.lock_timeout;
    }
    Ok(o)
}

/// The error chain, and for a `permission denied` the statement that fixes it, with the real
/// user, object and database names.
fn with_fix(e: &(dyn std::error::Error + 'static), config: &Config) -> String {
    let mut message = bite_sync::error_chain(e);
    if let Some(fix) =
        bite_sync::pg::grants::hint_for(e, config.source.as_ref(), config.mirror.as_ref())
    {
        message.push_str("\nhint: ");
        message.push_str(&fix);
    }
    message
}

fn fail_config(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

fn init_tracing(cli: &Cli, config: &Config) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BITE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("bite_sync={level},warn")));
    let format = cli
        .log_format
        .or(config.log_format)
        .unwrap_or(LogFormat::Text);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

async fn shutdown_on_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    cancel.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    cancel.cancel();
}

async fn run_sync(config: &Config, args: &SyncArgs, cancel: CancellationToken) -> u8 {
    let (source, mirror) = match config.require_both() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let mut opts = SyncOptions::configured(source, mirror, &config.sync);
    opts.dry_run = args.dry_run;
    opts.init = args.init;
    opts.mode = if args.schema_only {
        Mode::SchemaOnly
    } else if args.data_only {
        Mode::DataOnly
    } else {
        Mode::Full
    };
    let observer = sync::progress::on_stderr(!args.json && !args.dry_run);
    let result = sync::sync(&opts, Arc::clone(&observer), cancel).await;
    drop(observer);
    match result {
        Ok(report) => {
            if args.json {
                bite_sync::outln!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                );
            } else {
                bite_sync::out!("{}", sync::report::render(&report));
            }
            0
        }
        Err(e) => {
            let code = match e {
                SyncError::Cancelled => 130,
                ref other => other.exit_code() as u8,
            };
            let message = with_fix(&e, config);
            eprintln!("error: {message}");
            if args.json {
                bite_sync::outln!(
                    "{}",
                    serde_json::json!({ "error": message, "exit_code": code })
                );
            }
            code
        }
    }
}

async fn run_daemon(config: &Config, args: &RunArgs, cancel: CancellationToken) -> u8 {
    // Everything that can be wrong with the files or the settings is said before anything
    // connects anywhere.
    let loaded =
        match schedule::load::load_configured(args.schedules.as_deref(), config.file.as_deref()) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        };
    let replicate = !config.replication.tables.is_empty();
    let delivery = match Pull::configured(config) {
        Ok(delivery) => delivery,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if !replicate && loaded.jobs.is_empty() && delivery.is_none() {
        eprintln!(
            "error: nothing to run: no tables to replicate (pass --tables customers,orders or set replication.tables in bite-sync.toml), no scheduled jobs ([[job]] tables in {}/*.toml) and no WhatsApp delivery (set LOCAL_BACKEND_URL, with SYNC_ENABLED not false)",
            loaded.dir.display()
        );
        return 2;
    }
    if let Err(e) = schedule::jobs::check(&loaded.jobs, config, args.init) {
        eprintln!("error: {e}\n{}", without_schedules_hint(&loaded.dir));
        return 2;
    }
    let replication = if replicate {
        match replication_options(config, args) {
            Ok(opts) => Some(opts),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        }
    } else {
        let what = if delivery.is_some() {
            "the schedules and delivery"
        } else {
            "the schedules"
        };
        tracing::info!("no tables to replicate (replication.tables): running {what} only");
        None
    };
    // Delivery stops with the daemon, and also when replication ends on its own.
    let delivery_cancel = cancel.child_token();
    let delivery = delivery.map(|pull| pull.spawn(args.init, delivery_cancel.clone()));

    // The scheduler stops with the daemon, and also when replication ends on its own (an
    // error), so that the process exits with replication's code.
    let schedules_cancel = cancel.child_token();
    let scheduler = schedule::daemon::start(
        loaded.jobs,
        &loaded.dir,
        Arc::new(config.clone()),
        args.init,
        schedules_cancel.clone(),
    );
    let code = match replication {
        Some(opts) => {
            let observer = sync::progress::on_stderr(true);
            match daemon::run(&opts, observer, cancel).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {}", with_fix(&e, config));
                    e.exit_code() as u8
                }
            }
        }
        None => {
            cancel.cancelled().await;
            0
        }
    };
    schedules_cancel.cancel();
    delivery_cancel.cancel();
    if let Some(delivery) = delivery {
        tracing::info!("stopping delivery (a request in flight is finished first)");
        if let Err(e) = delivery.await {
            tracing::error!(error = %e, "the delivery task failed");
        }
    }
    if let Some(scheduler) = scheduler {
        tracing::info!("stopping the schedules (a job in progress is finished first)");
        if let Err(e) = scheduler.await {
            tracing::error!(error = %e, "the scheduler's task failed");
        }
    }
    code
}

/// `bite-sync run`'s replication settings, or which URL is missing.
fn replication_options(config: &Config, args: &RunArgs) -> Result<RunOptions, ConfigError> {
    let (source, mirror) = config.require_both()?;
    let settings = &config.replication;
    let mut opts = RunOptions::new(source, mirror, settings.tables.clone());
    opts.slot = settings.slot.clone();
    opts.publication = settings.publication.clone();
    opts.init = args.init;
    opts.limits = Limits {
        rows: settings.batch_rows,
        delay: settings.batch_delay,
        ..Limits::default()
    };
    opts.jobs = config.sync.jobs;
    opts.lock_timeout = config.sync.lock_timeout;
    opts.maintenance_work_mem = config.sync.maintenance_work_mem.clone();
    opts.flatten_partitions = config.sync.flatten_partitions;
    Ok(opts)
}

async fn run_status(config: &Config, args: &StatusArgs) -> u8 {
    let mut report = status::status(
        config.source.as_ref(),
        config.mirror.as_ref(),
        &config.replication.slot,
    )
    .await;
    let jobs =
        match schedule::load::load_configured(args.schedules.as_deref(), config.file.as_deref()) {
            Ok(loaded) => loaded.jobs,
            Err(e) => {
                report
                    .warnings
                    .push(format!("cannot read the schedules: {e}"));
                report.healthy = false;
                Vec::new()
            }
        };
    status::add_schedules(&mut report, config.mirror.as_ref(), &jobs, config).await;
    status::add_inbox(&mut report, config.mirror.as_ref()).await;
    if args.json {
        bite_sync::outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("status serializes")
        );
    } else {
        bite_sync::out!("{}", status::render(&report));
    }
    if report.healthy { 0 } else { 1 }
}

async fn run_check(config: &Config, args: &CheckArgs) -> u8 {
    let mut checks = check::check(
        config.source.as_ref(),
        config.mirror.as_ref(),
        &config.replication.tables,
        &config.replication.publication,
    )
    .await;
    check::add_dependencies(
        config.source.as_ref(),
        config.mirror.as_ref(),
        &config.replication.tables,
        config.sync.flatten_partitions,
        &mut checks,
    )
    .await;
    check::add_delivery(config, &mut checks).await;
    if args.json {
        bite_sync::outln!(
            "{}",
            serde_json::to_string_pretty(&checks).expect("checks serialize")
        );
    } else {
        bite_sync::out!("{}", check::render(&checks));
    }
    if checks.iter().all(|c| c.ok) { 0 } else { 1 }
}

/// How to run `bite-sync run` without the jobs of `dir`, said after a job it cannot run.
fn without_schedules_hint(dir: &std::path::Path) -> String {
    format!(
        "hint: these jobs are read from {}; to run without one, set enabled = false in it, or point --schedules (BITE_SCHEDULES_DIR) at another directory",
        dir.display()
    )
}

async fn run_schedules_list(config: &Config, args: &SchedulesArgs) -> u8 {
    // The default directory is optional; one named with --dir must exist.
    let loaded = match schedule::load::load_configured(args.dir.as_deref(), config.file.as_deref())
    {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if loaded.missing_default {
        eprintln!(
            "note: no schedules: {} does not exist (see `bite-sync schedules --help`)",
            loaded.dir.display()
        );
    }
    // The same check `bite-sync run` makes before it starts: a job it could not run is not
    // listed as fine.
    if let Err(e) = schedule::jobs::check(&loaded.jobs, config, false) {
        eprintln!("error: {e}\n{}", without_schedules_hint(&loaded.dir));
        return 2;
    }
    let jobs = loaded.jobs;
    let history = if jobs.is_empty() {
        None
    } else {
        match schedule::list::read_history(config.mirror.as_ref()).await {
            Ok(history) => Some(history),
            Err(why) => {
                eprintln!("note: last runs unknown: {why}");
                None
            }
        }
    };
    let now = chrono::Utc::now();
    if args.json {
        let entries = schedule::list::entries(&jobs, now, history.as_ref());
        bite_sync::outln!(
            "{}",
            serde_json::to_string_pretty(&entries).expect("entries serialize")
        );
    } else {
        bite_sync::out!("{}", schedule::list::render(&jobs, now, history.as_ref()));
    }
    0
}

async fn run_relay(
    config: &Config,
    args: &bite_sync::cli::RelayArgs,
    cancel: CancellationToken,
) -> u8 {
    use bite_sync::relay::settings::{RelaySettings, process_env};
    let mut settings = match RelaySettings::resolve(
        &config.relay,
        &config.delivery,
        config.file.as_deref(),
        &process_env,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if let Some(port) = args.port {
        settings.port = port;
    }
    settings.bind = args.bind;
    settings.alert_webhook = config.alert_webhook.clone();
    match bite_sync::relay::run(settings, cancel).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", bite_sync::error_chain(&e));
            e.exit_code()
        }
    }
}

fn report<E: std::error::Error>(result: std::result::Result<(), E>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", bite_sync::error_chain(&e));
            1
        }
    }
}
