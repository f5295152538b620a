//! `bite-sync run` with schedules: the real binary, schedule files and a config in its working
//! directory, real clusters, a folder backup store. Each scheduled job here fires once a year,
//! so it runs only when a test makes its last run look two years old (a missed run, made up at
//! start) and never on its own while a test is looking.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Daemon, TestDbs, bite_sync, connect, test_dbs, wait_for};

/// A URL nothing listens on: whatever uses it fails at once with "connection refused".
const CLOSED: &str = "postgres://bite@127.0.0.1:1/bite?sslmode=disable";

/// A running `bite-sync run`; killed (and its log printed) if the test ends without stopping it.
impl Daemon {
    /// Starts `bite-sync run <args>` in the workspace, logging to a file there.
    fn start(ws: &Workspace, args: &[&str]) -> Daemon {
        let log = ws.dir.join("daemon.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = ws
            .command()
            .arg("run")
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn bite-sync run");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Waits until the log holds `text`.
    async fn wait_for_log(&self, text: &str) {
        wait_for(
            &format!("{text:?} in the daemon's log"),
            Duration::from_secs(20),
            || async { self.log().contains(text).then_some(()) },
        )
        .await;
    }
}

/// A fresh working directory for `bite-sync`, where a test writes `bite-sync.toml` and
/// `schedules/`.
struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = bite_sync()
            .get_current_dir()
            .expect("bite_sync() sets a working dir")
            .to_path_buf();
        std::fs::create_dir_all(dir.join("schedules")).unwrap();
        Workspace { dir }
    }

    fn config(&self, text: &str) -> &Self {
        std::fs::write(self.dir.join("bite-sync.toml"), text).unwrap();
        self
    }

    /// Writes `schedules/<file>`.
    fn schedule(&self, file: &str, text: &str) -> &Self {
        std::fs::write(self.dir.join("schedules").join(file), text).unwrap();
        self
    }

    /// `bite-sync` in this directory (no BITE_* variables of the developer's).
    fn command(&self) -> Command {
        let mut cmd = bite_sync();
        cmd.current_dir(&self.dir);
        cmd
    }

    /// A folder store inside the workspace, as a `file://` URL.
    fn store(&self, name: &str) -> String {
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        format!("file://{}", path.display())
    }
}

fn config(source: &str, mirror: &str, extra: &str) -> String {
    format!("[source]\nurl = \"{source}\"\n\n[mirror]\nurl = \"{mirror}\"\n\n{extra}")
}

/// A yearly job: it runs only as a made-up missed run (see the module docs).
fn yearly(name: &str, kind_and_args: &str) -> String {
    format!("[[job]]\nname = \"{name}\"\ncron = \"0 0 1 1 *\"\n{kind_and_args}\n")
}

/// One small table on the source.
async fn small_source(dbs: &TestDbs) -> tokio_postgres::Client {
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE menu_items (id int PRIMARY KEY, name text NOT NULL); \
             INSERT INTO menu_items SELECT g, 'dish ' || g FROM generate_series(1, 20) g;",
        )
        .await
        .unwrap();
    source
}

/// The mirror with bite-sync's bookkeeping (as after `bite-sync sync --init`), and `jobs`
/// looking as if each last ran two years ago; returns the seeded rows' highest id.
async fn mirror_with_history(dbs: &TestDbs, jobs: &[&str]) -> (tokio_postgres::Client, i64) {
    let mut mirror = connect(&dbs.mirror_url).await;
    bite_sync::bookkeeping::migrate(&mut mirror).await.unwrap();
    let mut last = 0;
    for job in jobs {
        last = mirror
            .query_one(
                "INSERT INTO bite_sync.job_runs (job, started_at, finished_at, outcome, detail) \
                 VALUES ($1, now() - interval '2 years', now() - interval '2 years' + interval '1 minute', 'ok', 'seeded') \
                 RETURNING id",
                &[job],
            )
            .await
            .unwrap()
            .get(0);
    }
    (mirror, last)
}

/// A run of `job` after the seeded ones, once finished: (outcome, bytes, detail).
async fn finished_run(
    mirror: &tokio_postgres::Client,
    job: &str,
    after: i64,
) -> (String, Option<i64>, Option<String>) {
    wait_for(
        &format!("a finished run of {job} in bite_sync.job_runs"),
        Duration::from_secs(60),
        || async {
            mirror
                .query_opt(
                    "SELECT outcome, bytes, detail FROM bite_sync.job_runs \
                     WHERE job = $1 AND id > $2 AND outcome <> 'running'",
                    &[&job, &after],
                )
                .await
                .unwrap()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
        },
    )
    .await
}

async fn runs_of(mirror: &tokio_postgres::Client, job: &str) -> i64 {
    mirror
        .query_one(
            "SELECT count(*) FROM bite_sync.job_runs WHERE job = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0)
}

fn backups(ws: &Workspace, store: &str) -> Vec<serde_json::Value> {
    let out = ws
        .command()
        .args(["backups", "list", "--json", "--from", store])
        .output()
        .expect("bite-sync runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON array")
}

#[tokio::test]
async fn schedules_only_run_makes_up_a_missed_backup_records_it_and_stops_on_sigterm() {
    let dbs = test_dbs("run_sched_backup").await;
    let _source = small_source(&dbs).await;
    let (mirror, seeded) = mirror_with_history(&dbs, &["yearly-backup"]).await;
    let ws = Workspace::new();
    let store = ws.store("backups");
    ws.config(&config(
        &dbs.source_url,
        &dbs.mirror_url,
        &format!("[backup]\nurl = \"{store}\"\n"),
    ))
    .schedule("backup.toml", &yearly("yearly-backup", "kind = \"backup\""));

    let mut daemon = Daemon::start(&ws, &[]);
    let (outcome, bytes, detail) = finished_run(&mirror, "yearly-backup", seeded).await;
    assert_eq!(outcome, "ok", "{detail:?}");
    assert!(bytes.is_some_and(|b| b > 0), "{bytes:?}");
    let detail = detail.unwrap_or_default();
    assert!(
        detail.starts_with("backup ") && detail.ends_with(": 1 tables, 20 rows"),
        "{detail}"
    );

    let listed = backups(&ws, &store);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "good");
    assert!(
        detail.contains(listed[0]["id"].as_str().unwrap()),
        "{detail} names the backup"
    );

    let log = daemon.log();
    assert!(
        log.contains("1 scheduled job loaded from"),
        "the start is announced: {log}"
    );
    assert!(log.contains("running the schedules only"), "{log}");
    assert!(daemon.is_running(), "{log}");
    assert_eq!(
        daemon.terminate(Duration::from_secs(10)),
        Some(0),
        "SIGTERM stops the schedules with exit code 0\n{}",
        daemon.log()
    );
    // The missed run is made up once, not once per missed year.
    assert_eq!(runs_of(&mirror, "yearly-backup").await, 2);
}

#[tokio::test]
async fn a_failing_job_is_recorded_as_failed_and_the_daemon_keeps_running() {
    let dbs = test_dbs("run_sched_failing").await;
    let (mirror, seeded) = mirror_with_history(&dbs, &["check"]).await;
    let ws = Workspace::new();
    let empty = ws.store("no-backups-here");
    ws.config(&config(&dbs.source_url, &dbs.mirror_url, ""))
        .schedule(
            "check.toml",
            &yearly(
                "check",
                &format!("kind = \"verify\"\nfrom = \"{empty}\"\nbackup = \"latest\""),
            ),
        );

    let mut daemon = Daemon::start(&ws, &[]);
    let (outcome, bytes, detail) = finished_run(&mirror, "check", seeded).await;
    assert_eq!(outcome, "failed");
    assert_eq!(bytes, None);
    let detail = detail.unwrap_or_default();
    assert!(
        detail.contains("no-backups-here: no finished backup yet"),
        "{detail}"
    );
    daemon
        .wait_for_log("job failed; its schedule goes on")
        .await;
    // How long it took reads as a duration, not chrono's ISO 8601 (`took=PT0.0019S`).
    let log = daemon.log();
    let failed = log
        .lines()
        .find(|l| l.contains("job failed"))
        .unwrap_or_default();
    assert!(
        failed.contains(" took=") && !failed.contains("took=PT"),
        "{failed}"
    );
    assert!(daemon.is_running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn without_bookkeeping_on_the_mirror_the_history_stays_in_memory_and_the_mirror_untouched() {
    let dbs = test_dbs("run_sched_no_bookkeeping").await;
    let ws = Workspace::new();
    ws.config(&config(
        &dbs.source_url,
        &dbs.mirror_url,
        "[backup]\nurl = \"file:///nonexistent/never-used\"\n",
    ))
    .schedule("b.toml", &yearly("yearly-backup", "kind = \"backup\""));
    let mut daemon = Daemon::start(&ws, &[]);
    daemon
        .wait_for_log("the mirror has no bite_sync bookkeeping")
        .await;
    assert!(
        daemon.log().contains("start once with --init"),
        "the warning says how to keep the history: {}",
        daemon.log()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    let mirror = connect(&dbs.mirror_url).await;
    let schema: Option<String> = mirror
        .query_one("SELECT to_regnamespace('bite_sync')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, None, "no bookkeeping was created without --init");
}

#[tokio::test]
async fn an_unreachable_mirror_only_costs_the_history_not_the_daemon() {
    let ws = Workspace::new();
    ws.config(&config(
        CLOSED,
        CLOSED,
        "[backup]\nurl = \"file:///nonexistent/never-used\"\n",
    ))
    .schedule("b.toml", &yearly("yearly-backup", "kind = \"backup\""));
    let mut daemon = Daemon::start(&ws, &[]);
    daemon.wait_for_log("the mirror is unreachable").await;
    assert!(daemon.is_running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn a_bad_schedule_file_exits_2_naming_it_before_connecting_anywhere() {
    let ws = Workspace::new();
    ws.config(&config(
        CLOSED,
        CLOSED,
        "[replication]\ntables = [\"orders\"]\n[backup]\nurl = \"file:///nonexistent/never-used\"\n",
    ))
    .schedule("good.toml", &yearly("backup", "kind = \"backup\""))
    .schedule(
        "bad.toml",
        "[[job]]\nname = \"nightly\"\ncron = \"0 3 * *\"\nkind = \"backup\"\n",
    );
    let mut daemon = Daemon::start(&ws, &[]);
    // Replication retries a refused connection for ever: only a check made before it starts
    // ends the process.
    assert_eq!(daemon.exit_code(Duration::from_secs(10)), Some(2));
    let log = daemon.log();
    assert!(log.starts_with("error: invalid schedules: "), "{log}");
    assert!(
        log.contains("/schedules/bad.toml: job \"nightly\": cron \"0 3 * *\": expected 5 fields"),
        "{log}"
    );
    assert!(
        !log.contains("refused") && !log.contains("connecting"),
        "nothing connected: {log}"
    );
}

#[tokio::test]
async fn a_job_that_could_never_run_is_an_error_at_start() {
    let ws = Workspace::new();
    ws.config(&config(CLOSED, CLOSED, ""))
        .schedule("backup.toml", &yearly("backup", "kind = \"backup\""));
    let mut daemon = Daemon::start(&ws, &[]);
    assert_eq!(daemon.exit_code(Duration::from_secs(10)), Some(2));
    let log = daemon.log();
    assert!(
        log.contains(
            "schedules/backup.toml: job \"backup\": no backup location: set to in the job, backup.url in bite-sync.toml or BITE_BACKUP_URL"
        ),
        "{log}"
    );
}

#[tokio::test]
async fn with_nothing_to_run_the_error_names_both_tables_and_schedules() {
    let ws = Workspace::new();
    ws.config(&config(CLOSED, CLOSED, ""));
    let out = ws.command().arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing to run: no tables to replicate (pass --tables")
            && err.contains("schedules/*.toml"),
        "{err}"
    );

    // A directory named with --schedules must exist; the default one need not.
    let out = ws
        .command()
        .args(["run", "--schedules", "/nonexistent/schedules"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/schedules: cannot read the schedules directory"),
        "{err}"
    );
}

#[tokio::test]
async fn schedules_given_with_the_flag_run_beside_replication_and_sigterm_stops_both() {
    let dbs = test_dbs("run_sched_with_repl").await;
    let source = small_source(&dbs).await;
    let (mirror, seeded) = mirror_with_history(&dbs, &["yearly-backup"]).await;
    let ws = Workspace::new();
    ws.config(&config(&dbs.source_url, &dbs.mirror_url, ""));
    let store = ws.store("backups");
    let elsewhere = ws.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(
        elsewhere.join("backup.toml"),
        yearly(
            "yearly-backup",
            &format!("kind = \"backup\"\nto = \"{store}\""),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(
        &ws,
        &[
            "--init",
            "--tables",
            "menu_items",
            "--slot",
            &dbs.name,
            "--publication",
            &dbs.name,
            "--schedules",
            path(&elsewhere),
        ],
    );
    let (outcome, _, detail) = finished_run(&mirror, "yearly-backup", seeded).await;
    assert_eq!(outcome, "ok", "{detail:?}");
    source
        .batch_execute("INSERT INTO menu_items VALUES (21, 'new dish')")
        .await
        .unwrap();
    wait_for(
        "the new row on the mirror",
        Duration::from_secs(30),
        || async {
            let rows: i64 = mirror
                .query_one("SELECT count(*) FROM menu_items", &[])
                .await
                .ok()?
                .get(0);
            (rows == 21).then_some(())
        },
    )
    .await;
    assert_eq!(backups(&ws, &store).len(), 1);
    assert_eq!(
        daemon.terminate(Duration::from_secs(15)),
        Some(0),
        "SIGTERM stops replication and the schedules with exit code 0\n{}",
        daemon.log()
    );
}

#[tokio::test]
async fn when_replication_stops_with_an_error_the_schedules_do_not_keep_the_daemon_alive() {
    let dbs = test_dbs("run_sched_repl_fails").await;
    let _source = small_source(&dbs).await;
    // No --init and no bookkeeping on the mirror: replication refuses to start (exit 2).
    let ws = Workspace::new();
    ws.config(&config(
        &dbs.source_url,
        &dbs.mirror_url,
        "[replication]\ntables = [\"menu_items\"]\n[backup]\nurl = \"file:///nonexistent/never-used\"\n",
    ))
    .schedule("b.toml", &yearly("yearly-backup", "kind = \"backup\""));
    let mut daemon = Daemon::start(&ws, &[]);
    assert_eq!(daemon.exit_code(Duration::from_secs(20)), Some(2));
    let log = daemon.log();
    assert!(log.contains("has no bite_sync bookkeeping"), "{log}");
    assert!(log.contains("1 scheduled job loaded from"), "{log}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_scheduled_job_calls_the_alert_webhook_once() {
    let dbs = test_dbs("run_sched_alert").await;
    let (mirror, seeded) = mirror_with_history(&dbs, &["check"]).await;
    let webhook = support::FakeWebhook::start().await;
    let ws = Workspace::new();
    let empty = ws.store("still-empty");
    ws.config(&config(
        &dbs.source_url,
        &dbs.mirror_url,
        &format!("[alerts]\nwebhook_url = \"{}\"\n", webhook.url),
    ))
    .schedule(
        "check.toml",
        &yearly(
            "check",
            &format!("kind = \"verify\"\nfrom = \"{empty}\"\nbackup = \"latest\""),
        ),
    );

    let mut daemon = Daemon::start(&ws, &[]);
    let (outcome, _, _) = finished_run(&mirror, "check", seeded).await;
    assert_eq!(outcome, "failed");
    let bodies = wait_for("the alert", Duration::from_secs(30), || {
        let bodies = webhook.bodies();
        async move { (!bodies.is_empty()).then_some(bodies) }
    })
    .await;
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(bodies[0]["incident"], "job:check");
    assert_eq!(bodies[0]["state"], "open");
    assert!(bodies[0]["text"].as_str().unwrap().contains("check"));
    assert!(daemon.is_running(), "{}", daemon.log());
    assert!(
        !daemon.log().contains("SECRET"),
        "the webhook's token is in the log"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    let opened: i64 = mirror
        .query_one(
            "SELECT count(*) FROM bite_sync.alerts WHERE incident = 'job:check' AND notified_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(opened, 1);
}

/// The committed examples, copied where `bite-sync run` and `bite-sync schedules` look.
fn with_the_examples(ws: &Workspace) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules.example");
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(
            &path,
            ws.dir.join("schedules").join(path.file_name().unwrap()),
        )
        .unwrap();
    }
}

#[tokio::test]
async fn run_and_schedules_judge_the_example_schedules_alike() {
    // No backup location anywhere: both refuse, with the same problems, naming the file and
    // saying how to run without the job.
    let ws = Workspace::new();
    ws.config(&config(CLOSED, CLOSED, ""));
    with_the_examples(&ws);
    let listed = ws.command().arg("schedules").output().unwrap();
    let ran = ws.command().arg("run").output().unwrap();
    assert_eq!(listed.status.code(), Some(2));
    assert_eq!(ran.status.code(), Some(2));
    let (listed, ran) = (
        String::from_utf8_lossy(&listed.stderr).into_owned(),
        String::from_utf8_lossy(&ran.stderr).into_owned(),
    );
    assert_eq!(listed, ran, "one validation for both");
    let hint = format!(
        "hint: these jobs are read from {}; to run without one, set enabled = false in it, or point --schedules (BITE_SCHEDULES_DIR) at another directory",
        ws.dir.join("schedules").display()
    );
    for expected in [
        "schedules/backup.toml: job \"backup\": no backup location: set to in the job, backup.url in bite-sync.toml or BITE_BACKUP_URL (or enabled = false in the job to run without it)",
        "schedules/backup.toml: job \"verify\": no backup location",
        &hint,
    ] {
        assert!(ran.contains(expected), "{expected:?} missing from:\n{ran}");
    }

    // BITE_BACKUP_URL is a backup location: the examples work as shipped.
    let store = ws.store("backups");
    let listed = ws
        .command()
        .arg("schedules")
        .env("BITE_BACKUP_URL", &store)
        .output()
        .unwrap();
    assert_eq!(
        listed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let ws_log = ws.dir.join("with-url.log");
    let mut daemon = Daemon {
        child: Some(
            ws.command()
                .arg("run")
                .env("BITE_BACKUP_URL", &store)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&ws_log).unwrap())
                .spawn()
                .unwrap(),
        ),
        log: ws_log,
    };
    daemon.wait_for_log("4 scheduled jobs loaded from").await;
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));

    // From a checkout of the project: the examples are not loaded by default.
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = bite_sync()
        .current_dir(checkout)
        .args(["run", "--mirror", CLOSED])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error: nothing to run"), "{err}");
    assert!(!err.contains("backup location"), "{err}");
}
