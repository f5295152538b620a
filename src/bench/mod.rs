//! `bite-sync bench`: bite-sync against what it replaces, on the same throwaway clusters, in
//! one run; each benchmark prints its measures, the ratios and whether each met its target.
//!
//! - `bench sync` (the default, this file): `bite-sync sync` against the old guide's
//!   `pg_dump | psql`.
//! - `bench replication` ([`replication`]): `bite-sync run` against PostgreSQL's native
//!   logical replication.
//! - `bench backup` ([`backup`]): `bite-sync backup` and `restore` against `pg_dump | gzip`.
//! - `bench relay` ([`relay`]): `bite-sync relay` under signed webhooks against a no-op
//!   handler.
//!
//! This file also holds what both share: the error type, [`Measured`], running commands and
//! bite-sync child processes (peak RSS from the kernel), checkpoints and row checks.
//!
//! The sync benchmark:
//! - A: the old guide's refresh, `pg_dump --data-only -t customers -t orders | psql`, into
//!   existing indexed mirror tables, truncated first;
//!   B: `bite-sync sync --tables customers,orders` into the same tables.
//! - C: the old guide's full copy, `pg_dump --clean --if-exists | psql`, into an empty database;
//!   D: `bite-sync sync` of all four tables into an empty database.
//!
//! bite-sync runs as a child process (this same binary), so its wall time includes start-up and
//! its peak RSS is measured by the kernel (`wait4`'s `ru_maxrss`). Every copy is checked against
//! the source's row counts, so a fast wrong answer cannot pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::cli::{BenchArgs, BenchCommand, SyncBenchArgs};
use crate::demo::{self, DemoError};
use crate::pg::cluster::TempCluster;
use crate::pg::connect::{DbUrl, Role};
use crate::sample::{self, SampleSize};

pub mod backup;
pub mod relay;
pub mod relay_bodies;
pub mod replication;

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up clusters or databases failed.
    #[error(transparent)]
    Setup(#[from] Box<DemoError>),
    /// Generating data failed.
    #[error("failed to generate the sample data")]
    Generate(#[source] tokio_postgres::Error),
    /// A measured command failed.
    #[error("{what} failed: {detail}")]
    Step {
        /// Which step.
        what: String,
        /// Its exit status and stderr tail.
        detail: String,
    },
    /// Running a command failed.
    #[error("failed to run {what}")]
    Spawn {
        /// Which command.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A copy came out wrong.
    #[error("{what} left {table} with {got} rows, the source has {want}")]
    Mismatch {
        /// Which step.
        what: String,
        /// Which table.
        table: String,
        /// Rows on the mirror.
        got: i64,
        /// Rows on the source.
        want: i64,
    },
    /// A table's contents came out different.
    #[error(
        "{what} left {table} different from the source: {got} on the mirror, {want} on the source"
    )]
    Differs {
        /// Which step.
        what: String,
        /// Which table.
        table: String,
        /// The mirror's rows and digest.
        got: String,
        /// The source's rows and digest.
        want: String,
    },
    /// A query for checking failed.
    #[error("failed to check {0}")]
    Check(String, #[source] tokio_postgres::Error),
    /// Something did not happen in time.
    #[error("timed out after {limit:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        limit: std::time::Duration,
    },
    /// Ctrl-C.
    #[error("cancelled")]
    Cancelled,
    /// A blocking task failed.
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// One measured step: a single run, or the median of several.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    /// Wall time in seconds (the median over rounds).
    pub seconds: f64,
    /// Peak resident set size of the process in MiB (bite-sync runs only; the highest round).
    pub peak_rss_mib: Option<f64>,
    /// Every round's time, sorted.
    pub all_seconds: Vec<f64>,
}

/// The benchmark's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Source database size in MiB.
    pub source_mib: f64,
    /// Rows per table on the source.
    pub rows: Vec<(String, i64)>,
    /// Rounds measured.
    pub rounds: u16,
    /// pg_dump --data-only -t customers -t orders | psql.
    pub a_pg_dump_refresh: Measured,
    /// bite-sync sync --tables customers,orders.
    pub b_bite_sync_refresh: Measured,
    /// pg_dump --clean --if-exists | psql.
    pub c_pg_dump_full: Measured,
    /// bite-sync sync (all tables, empty mirror).
    pub d_bite_sync_full: Measured,
    /// B/A (target ≤ 0.25).
    pub b_over_a: f64,
    /// D/C (target ≤ 0.6).
    pub d_over_c: f64,
    /// Highest bite-sync peak RSS in MiB (target ≤ 64).
    pub peak_rss_mib: f64,
}

const TABLES: [&str; 4] = ["customers", "menu_items", "orders", "order_items"];

/// Runs the benchmark the arguments name (sync when none) and prints its results.
pub async fn run(args: &BenchArgs, cancel: CancellationToken) -> Result<(), BenchError> {
    match &args.command {
        None => run_sync(&args.sync, cancel).await,
        Some(BenchCommand::Sync(sync)) => run_sync(sync, cancel).await,
        Some(BenchCommand::Replication(replication)) => replication::run(replication, cancel).await,
        Some(BenchCommand::Backup(backup)) => backup::run(backup, cancel).await,
        Some(BenchCommand::Relay(relay)) => relay::run(relay, cancel).await,
    }
}

/// Runs the sync benchmark and prints its results.
async fn run_sync(args: &SyncBenchArgs, cancel: CancellationToken) -> Result<(), BenchError> {
    let (source_cluster, mirror_cluster) = start_clusters().await?;
    let result = tokio::select! {
        r = bench(args, &source_cluster, &mirror_cluster) => r,
        () = cancel.cancelled() => Err(BenchError::Cancelled),
    };
    stop_clusters(source_cluster, mirror_cluster).await?;
    print_report(args.json, &result?, render);
    Ok(())
}

/// The benchmarks' throwaway source and mirror. Durable like real servers: the throwaway
/// default fsync=off would flatter the baselines' many small commits and hide the cost of
/// writing for real. No autovacuum: analyzing one step's tables in the background would land
/// in whichever step runs next.
async fn start_clusters() -> Result<(TempCluster, TempCluster), BenchError> {
    eprintln!("starting source and mirror clusters...");
    Ok(demo::start_pair(&[("fsync", "on"), ("autovacuum", "off")])
        .await
        .map_err(Box::new)?)
}

/// Stops both clusters and removes their files (blocking work, off the runtime).
async fn stop_clusters(source: TempCluster, mirror: TempCluster) -> Result<(), BenchError> {
    tokio::task::spawn_blocking(move || {
        let _ = source.stop();
        let _ = mirror.stop();
    })
    .await?;
    Ok(())
}

/// Where a benchmark's logs (and scripts) go: `--log-dir`, created if missing and made
/// absolute, or a temp dir removed when this is dropped.
pub(crate) struct LogDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl LogDir {
    pub(crate) fn new(keep: Option<&Path>) -> Result<LogDir, BenchError> {
        let io = |source| BenchError::Spawn {
            what: "creating the log directory".into(),
            source,
        };
        match keep {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(io)?;
                // Absolute: the processes run with it as their working directory.
                let path = std::fs::canonicalize(dir).map_err(io)?;
                Ok(LogDir { path, _temp: None })
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("bite-sync-bench-")
                    .tempdir()
                    .map_err(io)?;
                Ok(LogDir {
                    path: temp.path().to_path_buf(),
                    _temp: Some(temp),
                })
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Prints a benchmark's report: JSON with `--json`, else its text rendering.
fn print_report<R: serde::Serialize>(json: bool, report: &R, render: impl Fn(&R) -> String) {
    if json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(report).expect("report serializes")
        );
    } else {
        crate::out!("{}", render(report));
    }
}

async fn bench(
    args: &SyncBenchArgs,
    source_cluster: &TempCluster,
    mirror_cluster: &TempCluster,
) -> Result<BenchReport, BenchError> {
    let bin = source_cluster.bin_dir().to_path_buf();
    let Prepared {
        source_mib,
        rows,
        src,
        clusters,
    } = prepare(source_cluster, mirror_cluster, args.customers, args.orders).await?;
    let jobs = args.jobs.to_string();

    // A and B refresh two tables of an existing, indexed mirror database.
    let refresh_url = demo::create_database(mirror_cluster, "refresh", Role::Mirror)
        .await
        .map_err(Box::new)?;
    let refresh = mirror_cluster.url("refresh");
    shell(
        "loading the schema for A",
        &format!(
            "{} --schema-only '{src}' | {} -q -X -v ON_ERROR_STOP=1 '{refresh}'",
            tool(&bin, "pg_dump"),
            tool(&bin, "psql")
        ),
    )?;
    let refresh_client = connect(&refresh_url).await?;
    let admin = connect_url(&clusters[1]).await?;

    let mut samples: [Vec<Measured>; 4] = Default::default();
    for round in 1..=args.rounds {
        eprintln!("round {round} of {}", args.rounds);
        refresh_client
            .batch_execute("TRUNCATE customers, orders CASCADE")
            .await
            .map_err(|e| BenchError::Check("the truncate before A".into(), e))?;
        checkpoint(&clusters).await?;
        eprintln!("  A: pg_dump --data-only -t customers -t orders | psql");
        let a = shell(
            "A (pg_dump --data-only | psql)",
            &format!(
                "{} --data-only -t customers -t orders '{src}' | {} -q -X -v ON_ERROR_STOP=1 '{refresh}'",
                tool(&bin, "pg_dump"),
                tool(&bin, "psql")
            ),
        )?;
        check(&refresh_client, "A", &rows, &["customers", "orders"]).await?;
        checkpoint(&clusters).await?;
        eprintln!("  B: bite-sync sync --tables customers,orders");
        let b = bite_sync(
            "B (bite-sync sync --tables customers,orders)",
            &src,
            &refresh,
            &["--tables", "customers,orders", "--init", "--jobs", &jobs],
        )?;
        check(&refresh_client, "B", &rows, &["customers", "orders"]).await?;

        // C and D copy everything into empty databases.
        let empty = EmptyTarget {
            mirror_cluster,
            admin: &admin,
            clusters: &clusters,
            rows: &rows,
        };
        eprintln!("  C: pg_dump --clean --if-exists | psql");
        let c = empty
            .measure(&format!("full_c_{round}"), "C", |target| {
                shell(
                    "C (pg_dump --clean --if-exists | psql)",
                    &format!(
                        "{} --clean --if-exists '{src}' | {} -q -X '{target}'",
                        tool(&bin, "pg_dump"),
                        tool(&bin, "psql")
                    ),
                )
            })
            .await?;
        eprintln!("  D: bite-sync sync (all tables, empty mirror)");
        let d = empty
            .measure(&format!("full_d_{round}"), "D", |target| {
                bite_sync(
                    "D (bite-sync sync)",
                    &src,
                    target,
                    &["--init", "--jobs", &jobs],
                )
            })
            .await?;
        for (all, m) in samples.iter_mut().zip([a, b, c, d]) {
            all.push(m);
        }
    }

    let [a, b, c, d] = samples.map(|s| median(&s));
    Ok(BenchReport {
        source_mib,
        rows,
        rounds: args.rounds,
        b_over_a: b.seconds / a.seconds,
        d_over_c: d.seconds / c.seconds,
        peak_rss_mib: b
            .peak_rss_mib
            .unwrap_or(0.0)
            .max(d.peak_rss_mib.unwrap_or(0.0)),
        a_pg_dump_refresh: a,
        b_bite_sync_refresh: b,
        c_pg_dump_full: c,
        d_bite_sync_full: d,
    })
}

/// The sample restaurant on the source, vacuumed and analyzed, with what the reports show.
struct Prepared {
    /// The source database's size in MiB.
    source_mib: f64,
    /// Rows per sample table.
    rows: Vec<(String, i64)>,
    /// The source database's URL.
    src: String,
    /// Admin URLs of the source and mirror clusters.
    clusters: [String; 2],
}

async fn prepare(
    source_cluster: &TempCluster,
    mirror_cluster: &TempCluster,
    customers: u64,
    orders: u64,
) -> Result<Prepared, BenchError> {
    let source = sample_source(source_cluster, "bite", customers, orders).await?;
    source
        .batch_execute("VACUUM ANALYZE")
        .await
        .map_err(BenchError::Generate)?;
    let source_mib: f64 = source
        .query_one(
            "SELECT pg_database_size(current_database())::float8 / 1048576",
            &[],
        )
        .await
        .map_err(|e| BenchError::Check("the source size".into(), e))?
        .get(0);
    Ok(Prepared {
        source_mib,
        rows: count_rows(&source, &TABLES).await?,
        src: source_cluster.url("bite"),
        clusters: [
            source_cluster.url("postgres"),
            mirror_cluster.url("postgres"),
        ],
    })
}

/// Where C and D run: a fresh, empty database on the mirror cluster per step and round.
struct EmptyTarget<'a> {
    mirror_cluster: &'a TempCluster,
    admin: &'a tokio_postgres::Client,
    clusters: &'a [String],
    rows: &'a [(String, i64)],
}

impl EmptyTarget<'_> {
    /// Creates database `name`, checkpoints, runs `step` against its URL, checks every table
    /// against the source's row counts, and drops the database again (one copy of each kind on
    /// the mirror's disk and cache at a time).
    async fn measure(
        &self,
        name: &str,
        what: &str,
        step: impl FnOnce(&str) -> Result<Measured, BenchError>,
    ) -> Result<Measured, BenchError> {
        let url = demo::create_database(self.mirror_cluster, name, Role::Mirror)
            .await
            .map_err(Box::new)?;
        checkpoint(self.clusters).await?;
        let measured = step(&self.mirror_cluster.url(name))?;
        {
            let client = connect(&url).await?;
            check(&client, what, self.rows, &TABLES).await?;
        }
        self.admin
            .batch_execute(&format!("DROP DATABASE {}", crate::pg::ident::quote(name)))
            .await
            .map_err(|e| BenchError::Check(format!("dropping {name}"), e))?;
        Ok(measured)
    }
}

/// The median time of a step's rounds, with the highest peak RSS of any round.
fn median(samples: &[Measured]) -> Measured {
    let mut times: Vec<f64> = samples.iter().map(|m| m.seconds).collect();
    times.sort_by(f64::total_cmp);
    let seconds = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    let peak_rss_mib = samples
        .iter()
        .filter_map(|m| m.peak_rss_mib)
        .max_by(f64::total_cmp);
    Measured {
        seconds,
        peak_rss_mib,
        all_seconds: times,
    }
}

async fn connect(url: &DbUrl) -> Result<tokio_postgres::Client, BenchError> {
    url.connect()
        .await
        .map_err(|e| BenchError::Setup(Box::new(DemoError::from(e))))
}

async fn connect_url(url: &str) -> Result<tokio_postgres::Client, BenchError> {
    let url = DbUrl::parse(Role::Mirror, url)
        .map_err(|e| BenchError::Setup(Box::new(DemoError::from(e))))?;
    connect(&url).await
}

/// Flushes both clusters before a measured step, so no step pays for the previous one's
/// dirty buffers (a checkpoint triggered by 1 GB of WAL costs seconds of I/O).
async fn checkpoint(admin_urls: &[String]) -> Result<(), BenchError> {
    for url in admin_urls {
        connect_url(url)
            .await?
            .batch_execute("CHECKPOINT")
            .await
            .map_err(|e| BenchError::Check("a checkpoint".into(), e))?;
    }
    Ok(())
}

/// A PostgreSQL client program: the one beside the cluster's server binaries if there is
/// one, else whichever is on PATH.
fn program(bin: &Path, name: &str) -> std::path::PathBuf {
    let local = bin.join(name);
    if local.exists() { local } else { name.into() }
}

/// [`program`], quoted for a shell command line.
fn tool(bin: &Path, name: &str) -> String {
    let program = program(bin, name);
    if program.is_absolute() {
        format!("'{}'", program.display())
    } else {
        name.to_string()
    }
}

/// Creates database `name` on the source cluster and loads the sample restaurant into it
/// (three items per order).
async fn sample_source(
    cluster: &TempCluster,
    name: &str,
    customers: u64,
    orders: u64,
) -> Result<tokio_postgres::Client, BenchError> {
    let url = demo::create_database(cluster, name, Role::Source)
        .await
        .map_err(Box::new)?;
    let source = connect(&url).await?;
    let size = SampleSize {
        customers,
        orders,
        items_per_order: SampleSize::BENCH.items_per_order,
    };
    eprintln!(
        "generating {} customers, {} orders, {} order items...",
        size.customers,
        size.orders,
        size.orders * u64::from(size.items_per_order)
    );
    sample::load(&source, size)
        .await
        .map_err(BenchError::Generate)?;
    Ok(source)
}

/// Runs a shell pipeline (with pipefail) and times it.
fn shell(what: &str, pipeline: &str) -> Result<Measured, BenchError> {
    let started = Instant::now();
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {pipeline}"))
        .output()
        .map_err(|source| BenchError::Spawn {
            what: what.into(),
            source,
        })?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(BenchError::Step {
            what: what.into(),
            detail: tail(&output.stderr),
        });
    }
    Ok(Measured {
        seconds,
        peak_rss_mib: None,
        all_seconds: vec![seconds],
    })
}

/// Runs this binary's `sync` as a child and measures its wall time and peak RSS.
fn bite_sync(
    what: &str,
    source: &str,
    mirror: &str,
    extra: &[&str],
) -> Result<Measured, BenchError> {
    let mut args = vec!["-q", "sync", "--source", source, "--mirror", mirror];
    args.extend_from_slice(extra);
    run_self(what, &args)
}

/// Runs this binary with `args` as a child and measures its wall time and peak RSS.
fn run_self(what: &str, args: &[&str]) -> Result<Measured, BenchError> {
    let exe = std::env::current_exe().map_err(|source| BenchError::Spawn {
        what: what.into(),
        source,
    })?;
    let started = Instant::now();
    let child = Command::new(exe)
        .args(args)
        .env_remove("BITE_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: what.into(),
            source,
        })?;
    let (status, max_rss_kib) = wait_with_rusage(child.id() as libc::pid_t);
    let seconds = started.elapsed().as_secs_f64();
    let stderr = {
        use std::io::Read;
        let mut buf = Vec::new();
        if let Some(mut e) = child.stderr {
            let _ = e.read_to_end(&mut buf);
        }
        buf
    };
    if status != 0 {
        return Err(BenchError::Step {
            what: what.into(),
            detail: format!("exit status {status}: {}", tail(&stderr)),
        });
    }
    Ok(Measured {
        seconds,
        peak_rss_mib: Some(max_rss_kib as f64 / 1024.0),
        all_seconds: vec![seconds],
    })
}

/// How long a SIGTERM may take to stop a bite-sync child.
const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A long-running bite-sync child process (`run`, `relay`) whose stderr goes to a log file;
/// killed if dropped while it runs (a failed step, Ctrl-C).
struct Daemon {
    what: String,
    log: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Daemon {
    /// Starts this binary's `args` (a `bite-sync run`) in `cwd`, logging to `log`.
    fn start_run(what: &str, log: &Path, cwd: &Path, args: &[&str]) -> Result<Daemon, BenchError> {
        let exe = std::env::current_exe().map_err(|source| BenchError::Spawn {
            what: what.into(),
            source,
        })?;
        // In the log dir: no bite-sync.toml or schedules from the caller's directory change
        // the run (nor a scheduled backup compete with it).
        let mut command = Command::new(exe);
        command
            .args(args)
            .env_remove("BITE_CONFIG")
            .env_remove("BITE_SCHEDULES_DIR")
            .current_dir(cwd);
        Daemon::spawn(what, log, command)
    }

    /// Spawns `command` as prepared by the caller, stdin and stdout closed, stderr to `log`.
    fn spawn(what: &str, log: &Path, mut command: Command) -> Result<Daemon, BenchError> {
        let spawn = |source| BenchError::Spawn {
            what: what.into(),
            source,
        };
        let stderr = std::fs::File::create(log).map_err(spawn)?;
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(spawn)?;
        Ok(Daemon {
            what: what.into(),
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    /// The process's peak RSS so far in MiB (`VmHWM`), while it runs.
    fn high_water_mib(&self) -> Option<f64> {
        self.status_mib("VmHWM:")
    }

    /// A `kB` line of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`) in MiB, while it runs.
    fn status_mib(&self, key: &str) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    /// The log so far.
    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
    /// Fails, with its log's last lines, once the process has exited.
    fn check_running(&mut self) -> Result<(), BenchError> {
        let exited = match &self.child {
            Some(child) => reap(child.id() as libc::pid_t, false),
            None => Some((-1, 0)),
        };
        match exited {
            None => Ok(()),
            Some((code, _)) => {
                self.child = None;
                Err(self.failed(&format!("exited with status {code}")))
            }
        }
    }

    /// SIGTERM, as a service manager stops it; it must exit 0 in time. Returns its peak RSS
    /// in MiB.
    async fn stop(mut self) -> Result<f64, BenchError> {
        let Some(child) = self.child.take() else {
            return Err(self.failed("was not running"));
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let started = Instant::now();
        loop {
            match reap(pid, false) {
                Some((0, max_rss_kib)) => return Ok(max_rss_kib as f64 / 1024.0),
                Some((code, _)) => {
                    return Err(self.failed(&format!("exited with status {code} on SIGTERM")));
                }
                None if started.elapsed() > STOP_LIMIT => {
                    self.child = Some(child);
                    return Err(BenchError::Timeout {
                        what: format!("{} to stop on SIGTERM", self.what),
                        limit: STOP_LIMIT,
                    });
                }
                None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    fn failed(&self, how: &str) -> BenchError {
        let log = std::fs::read(&self.log).unwrap_or_default();
        BenchError::Step {
            what: self.what.clone(),
            detail: format!("{how}: {}", tail(&log)),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `pid` and returns (exit code, peak RSS in KiB) from the kernel's accounting.
fn wait_with_rusage(pid: libc::pid_t) -> (i32, i64) {
    reap(pid, true).unwrap_or((-1, 0))
}

/// Reaps our child `pid`: (exit code, -1 when a signal ended it; peak RSS in KiB), waiting for
/// it to exit when `block`, else `None` while it still runs. A failed `wait4` reads as (-1, 0).
fn reap(pid: libc::pid_t, block: bool) -> Option<(i32, i64)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let options = if block { 0 } else { libc::WNOHANG };
    // SAFETY: pid is our direct child, status and usage point to live locals.
    let rc = unsafe { libc::wait4(pid, &mut status, options, &mut usage) };
    if rc == 0 {
        return None;
    }
    if rc < 0 {
        return Some((-1, 0));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Some((code, usage.ru_maxrss))
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

async fn count_rows(
    client: &tokio_postgres::Client,
    tables: &[&str],
) -> Result<Vec<(String, i64)>, BenchError> {
    let mut out = Vec::new();
    for t in tables {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM public.{t}"), &[])
            .await
            .map_err(|e| BenchError::Check(format!("rows of {t}"), e))?
            .get(0);
        out.push((t.to_string(), n));
    }
    Ok(out)
}

async fn check(
    client: &tokio_postgres::Client,
    what: &str,
    source_rows: &[(String, i64)],
    tables: &[&str],
) -> Result<(), BenchError> {
    let got = count_rows(client, tables).await?;
    for (table, n) in got {
        let want = source_rows
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(0, |(_, n)| *n);
        if n != want {
            return Err(BenchError::Mismatch {
                what: what.into(),
                table,
                got: n,
                want,
            });
        }
    }
    Ok(())
}

/// The human-readable result table.
pub fn render(r: &BenchReport) -> String {
    let ok = |good: bool| if good { "ok" } else { "MISSED" };
    let rows = r
        .rows
        .iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let all = |m: &Measured| {
        m.all_seconds
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "source: {:.0} MiB ({rows}); median of {} round(s), all rounds in brackets\n\
         A  pg_dump --data-only -t customers -t orders | psql   {:>7.2} s  [{}]\n\
         B  bite-sync sync --tables customers,orders            {:>7.2} s  [{}]  peak RSS {:.1} MiB\n\
         C  pg_dump --clean --if-exists | psql                  {:>7.2} s  [{}]\n\
         D  bite-sync sync (all tables, empty mirror)           {:>7.2} s  [{}]  peak RSS {:.1} MiB\n\
         B/A = {:.3}  (target <= 0.25: {})\n\
         D/C = {:.3}  (target <= 0.60: {})\n\
         peak RSS = {:.1} MiB  (target <= 64: {})\n",
        r.source_mib,
        r.rounds,
        r.a_pg_dump_refresh.seconds,
        all(&r.a_pg_dump_refresh),
        r.b_bite_sync_refresh.seconds,
        all(&r.b_bite_sync_refresh),
        r.b_bite_sync_refresh.peak_rss_mib.unwrap_or(0.0),
        r.c_pg_dump_full.seconds,
        all(&r.c_pg_dump_full),
        r.d_bite_sync_full.seconds,
        all(&r.d_bite_sync_full),
        r.d_bite_sync_full.peak_rss_mib.unwrap_or(0.0),
        r.b_over_a,
        ok(r.b_over_a <= 0.25),
        r.d_over_c,
        ok(r.d_over_c <= 0.6),
        r.peak_rss_mib,
        ok(r.peak_rss_mib <= 64.0),
    )
}
