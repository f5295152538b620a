//! The shared integration-test harness, included by every test file with `mod support;`.
//!
//! Each test file is its own binary whose tests run as threads of one process. Invariants:
//! - One source (logical) and one mirror cluster per test binary, started on first use and
//!   never by a test that does not ask for them; they are statics, whose destructors never
//!   run, so the clusters' watchdogs stop them once the process exits.
//! - Every test gets databases of its own ([`test_dbs`]), so tests never see each other's
//!   tables and can run in parallel.
//! - Every wait is bounded ([`wait_for`]) and says what it waited for when it gives up.
//! - The `bite-sync` binary runs without the developer's `BITE_*` variables and in an empty
//!   working dir ([`bite_sync`]), so no local config leaks into a test.
//! - S3 tests get a real S3 server of their own ([`S3Server`]: s3s-fs in-process, signatures
//!   checked), started on the test's runtime and stopped when dropped.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub mod schemas;

use bite_sync::backup::store::S3Settings;
use bite_sync::pg::cluster::{ClusterOptions, TempCluster};
use tokio_util::sync::CancellationToken;

/// The source and mirror clusters shared by the tests of one binary.
pub struct Clusters {
    /// The "local" database: `wal_level=logical`.
    pub source: TempCluster,
    /// The "cloud" database.
    pub mirror: TempCluster,
}

/// A start failure is kept as text, so every test reports it at once instead of each one
/// retrying the startup.
static CLUSTERS: OnceLock<Result<Clusters, String>> = OnceLock::new();

/// Source (logical) + mirror clusters, started once per test binary (std::sync::OnceLock),
/// stopped by the watchdog when the process exits.
pub fn clusters() -> &'static Clusters {
    match CLUSTERS.get_or_init(start_clusters) {
        Ok(clusters) => clusters,
        Err(message) => panic!("{message}"),
    }
}

fn start_clusters() -> Result<Clusters, String> {
    // Tests of one binary run in parallel, each with a slot and a walsender of its own (and
    // a temporary one while a table is copied).
    let source = ClusterOptions {
        name: "source".to_owned(),
        logical: true,
        settings: vec![
            ("max_replication_slots".to_owned(), "64".to_owned()),
            ("max_wal_senders".to_owned(), "64".to_owned()),
        ],
    };
    let mirror = ClusterOptions {
        name: "mirror".to_owned(),
        ..ClusterOptions::default()
    };
    // initdb is the slow part; running both at once halves the first test's wait.
    let (source, mirror) = std::thread::scope(|s| {
        let source = s.spawn(|| TempCluster::start(&source));
        let mirror = s.spawn(|| TempCluster::start(&mirror));
        (source.join(), mirror.join())
    });
    let source = source.map_err(|_| "starting the source cluster panicked".to_owned())?;
    let mirror = mirror.map_err(|_| "starting the mirror cluster panicked".to_owned())?;
    match (source, mirror) {
        (Ok(source), Ok(mirror)) => Ok(Clusters { source, mirror }),
        (Err(e), _) => Err(format!("could not start the source cluster: {e}")),
        (_, Err(e)) => Err(format!("could not start the mirror cluster: {e}")),
    }
}

/// A database of one test's own, with the same name on both clusters.
pub struct TestDbs {
    /// The database name (unquoted) on both clusters.
    pub name: String,
    /// URL of the database on the source cluster.
    pub source_url: String,
    /// URL of the database on the mirror cluster.
    pub mirror_url: String,
}

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates a fresh, uniquely named database on both clusters (name from the test name +
/// counter + pid, lowercase, ≤ 63 bytes).
pub async fn test_dbs(test_name: &str) -> TestDbs {
    // Starting the clusters blocks for seconds; keep that off the test's runtime thread.
    let clusters = match tokio::task::spawn_blocking(clusters).await {
        Ok(clusters) => clusters,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let name = db_name(
        test_name,
        DB_COUNTER.fetch_add(1, Ordering::Relaxed),
        std::process::id(),
    );
    // Connecting to "postgres", never template1: CREATE DATABASE copies template1 and
    // refuses while anyone is connected to it, which would break concurrent tests.
    tokio::join!(
        create_db(&clusters.source, &name),
        create_db(&clusters.mirror, &name)
    );
    TestDbs {
        source_url: clusters.source.url(&name),
        mirror_url: clusters.mirror.url(&name),
        name,
    }
}

async fn create_db(cluster: &TempCluster, name: &str) {
    let admin_url = cluster.url("postgres");
    let client = connect(&admin_url).await;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    if let Err(e) = client.batch_execute(&sql).await {
        panic!("could not create database {name} via {admin_url}: {e}");
    }
}

/// `{test}_{counter}_{pid}`: lowercase, `[a-z0-9_]` only, cut to PostgreSQL's 63-byte limit
/// on the test part so the unique suffix always survives.
fn db_name(test_name: &str, counter: u32, pid: u32) -> String {
    let suffix = format!("_{counter}_{pid}");
    let stem: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(63 - suffix.len())
        .collect();
    format!("{stem}{suffix}")
}

/// Plain (NoTls) tokio-postgres connection; spawns the connection task; panics with the URL
/// on failure.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        Ok(pair) => pair,
        Err(e) => panic!("could not connect to {url}: {e}"),
    };
    // Connection errors also surface on the client's next call, where the test sees them.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Bounded poll: calls `check` every 50 ms until it returns Some(T) or `timeout` passes;
/// panics with "timed out after {timeout:?} waiting for {what}".
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    // tokio's clock, so a test that pauses time still times out.
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `std::process::Command` for the built binary (env!("CARGO_BIN_EXE_bite-sync")) with BITE_*
/// env vars removed and the cwd set to a fresh temp dir, so no developer config leaks into
/// tests. The dir is [`Command::get_current_dir`], for tests that put files there.
pub fn bite_sync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bite-sync"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BITE_") {
            cmd.env_remove(key);
        }
    }
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    cmd.current_dir(fresh_work_dir());
    cmd
}

static WORK_DIR_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new empty dir under this process's scratch dir (see [`scratch_dir`]).
fn fresh_work_dir() -> PathBuf {
    let n = WORK_DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = scratch_dir().join(format!("cwd-{n}"));
    if let Err(e) = std::fs::create_dir(&dir) {
        panic!("could not create {}: {e}", dir.display());
    }
    dir
}

/// One temp dir per test process for working dirs. Like the clusters it is a static, so a
/// reaper shell removes it once the process is gone.
fn scratch_dir() -> &'static Path {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("bite-sync-tests-")
            .tempdir()
            .unwrap_or_else(|e| panic!("could not create a temp dir for tests: {e}"))
            .keep();
        spawn_reaper(&dir);
        dir
    })
}

fn spawn_reaper(dir: &Path) {
    use std::os::unix::process::CommandExt;
    // The same zombie check as the cluster watchdog: an unreaped owner still answers kill -0.
    const SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do
  case "$(cat "/proc/$1/stat" 2>/dev/null)" in *") Z "*) break ;; esac
  sleep 1
done
rm -rf "$2"
"#;
    let spawned = Command::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("bite-sync-test-reaper")
        .arg(std::process::id().to_string())
        .arg(dir)
        .process_group(0)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        panic!("could not start the reaper for {}: {e}", dir.display());
    }
}

#[test]
fn db_names_are_unique_lowercase_and_fit_postgres() {
    let long = db_name(&"Sync::Tests::X".repeat(20), 4_294_967_295, 4_194_304);
    assert!(long.len() <= 63, "{long}");
    assert!(long.ends_with("_4294967295_4194304"), "{long}");
    assert_eq!(db_name("sync::Copy-Rows", 3, 42), "sync__copy_rows_3_42");
}

#[tokio::test]
#[should_panic(expected = "timed out after 100ms waiting for a value that never comes")]
async fn wait_for_gives_up_and_says_what_it_waited_for() {
    wait_for(
        "a value that never comes",
        Duration::from_millis(100),
        || async { None::<()> },
    )
    .await;
}

#[tokio::test]
async fn wait_for_returns_the_first_value() {
    let mut calls = 0;
    let value = wait_for("the third call", Duration::from_secs(5), || {
        calls += 1;
        let n = calls;
        async move { (n == 3).then_some(n) }
    })
    .await;
    assert_eq!(value, 3);
}

#[test]
fn bite_sync_runs_in_a_fresh_empty_dir() {
    let (a, b) = (bite_sync(), bite_sync());
    let (dir_a, dir_b) = (a.get_current_dir().unwrap(), b.get_current_dir().unwrap());
    assert_ne!(dir_a, dir_b);
    for dir in [dir_a, dir_b] {
        let entries = std::fs::read_dir(dir).unwrap().count();
        assert_eq!(entries, 0, "{} is not empty", dir.display());
    }
    assert!(Path::new(a.get_program()).is_file());
}

/// An S3 server in this process: s3s-fs storing objects under a temp dir, behind s3s with
/// SigV4 authentication (one key pair, [`S3Server::ACCESS_KEY`] / [`S3Server::SECRET_KEY`]),
/// path-style requests only, with one bucket, [`S3Server::BUCKET`]. Dropping it stops the
/// listener and every connection and removes the files.
pub struct S3Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    stop: CancellationToken,
    accept_task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    /// The access key the server accepts.
    pub const ACCESS_KEY: &str = "bite-sync-test";
    /// The secret key the server checks signatures with.
    pub const SECRET_KEY: &str = "test-secret-key-4f1c9a";
    /// The bucket that exists.
    pub const BUCKET: &str = "backups";

    /// Starts the server on 127.0.0.1 (a free port), in a task of the current runtime.
    pub async fn start() -> S3Server {
        S3Server::start_on(Ipv4Addr::LOCALHOST.into()).await
    }

    /// Starts the server on `ip` (a free port): `::1` for an IPv6 endpoint.
    pub async fn start_on(ip: std::net::IpAddr) -> S3Server {
        let root = tempfile::Builder::new()
            .prefix("bite-sync-s3-")
            .tempdir()
            .unwrap_or_else(|e| panic!("could not create a temp dir for the S3 server: {e}"));
        // s3s-fs keeps a bucket as a folder under its root.
        let bucket = root.path().join(Self::BUCKET);
        if let Err(e) = std::fs::create_dir(&bucket) {
            panic!("could not create {}: {e}", bucket.display());
        }
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap_or_else(|e| {
            panic!("could not start s3s-fs on {}: {e:?}", root.path().display())
        });
        let mut service = s3s::service::S3ServiceBuilder::new(fs);
        service.set_auth(s3s::auth::SimpleAuth::from_single(
            Self::ACCESS_KEY,
            Self::SECRET_KEY,
        ));
        let service = service.build();
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .unwrap_or_else(|e| panic!("could not listen for the S3 server: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the S3 server's listener has no address: {e}"));
        let stop = CancellationToken::new();
        let accept_task = tokio::spawn(serve_s3(listener, service, stop.clone()));
        S3Server {
            addr,
            root,
            stop,
            accept_task,
        }
    }

    /// `http://127.0.0.1:<port>` (`http://[::1]:<port>` on IPv6).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Settings that reach this server with the right keys: path style, region us-east-1.
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".to_owned()),
            path_style: None,
            access_key: Some(Self::ACCESS_KEY.to_owned()),
            secret_key: Some(Self::SECRET_KEY.to_owned()),
        }
    }

    /// `s3://backups/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", Self::BUCKET)
    }

    /// A rust-s3 handle on the bucket, to look at objects behind the store's back (ETags,
    /// objects outside its prefix).
    pub fn bucket(&self) -> Box<s3::Bucket> {
        let region = s3::Region::Custom {
            region: "us-east-1".to_owned(),
            endpoint: self.endpoint(),
        };
        let credentials = s3::creds::Credentials::new(
            Some(Self::ACCESS_KEY),
            Some(Self::SECRET_KEY),
            None,
            None,
            None,
        )
        .unwrap_or_else(|e| panic!("test credentials: {e}"));
        let bucket = s3::Bucket::new(Self::BUCKET, region, credentials)
            .unwrap_or_else(|e| panic!("a bucket handle for the test server: {e}"));
        bucket.with_path_style()
    }

    /// Multipart uploads started and neither completed nor aborted. s3s-fs keeps each as a
    /// `.upload-<id>.json` file (and its parts as `.upload_id-<id>.part-<n>`) in its root.
    pub fn pending_uploads(&self) -> usize {
        let entries = std::fs::read_dir(self.root.path())
            .unwrap_or_else(|e| panic!("could not read {}: {e}", self.root.path().display()));
        entries
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(".upload"))
            .count()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop.cancel();
        self.accept_task.abort();
    }
}

/// Accepts connections until `stop`, serving each (HTTP/1 or 2) in a task that also ends
/// at `stop`; s3s-fs's own `main.rs` serves the same way.
async fn serve_s3(
    listener: tokio::net::TcpListener,
    service: s3s::service::S3Service,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((socket, _)) = accepted else {
            // Out of file descriptors and the like: pause instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let connection = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// A table with a column of every kind of type bite-sync must carry (enum, domain, arrays of
/// both, numeric, jsonb, bytea, inet, intervals, identity and serial, a generated column, a
/// collation, a check).
pub const EVERY_TYPE_SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive_price AS numeric(10,2) CHECK (VALUE >= 0);
CREATE TABLE everything (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    serial_col bigserial,
    small smallint, big bigint NOT NULL DEFAULT 7,
    exact numeric(10,2), loose numeric, r real, d double precision,
    flag boolean, txt text, short varchar(20), fixed char(3),
    day date, at_time time, ts timestamp, tstz timestamptz, span interval,
    doc jsonb, plain_json json, uid uuid, raw bytea, addr inet,
    ints integer[], words text[], feeling mood, feelings mood[],
    price positive_price, prices positive_price[],
    name_c text COLLATE "C",
    doubled numeric GENERATED ALWAYS AS (exact * 2) STORED,
    CONSTRAINT small_range CHECK (small > -1000)
);
"#;

/// Three rows for [`EVERY_TYPE_SCHEMA`]'s table with awkward values: tabs, newlines,
/// backslashes, quotes, non-ASCII, NULLs, infinities, NaN, extremes and empty values.
pub const EVERY_TYPE_ROWS: &str = r#"
INSERT INTO everything (small, big, exact, loose, r, d, flag, txt, short, fixed, day, at_time, ts, tstz, span,
                        doc, plain_json, uid, raw, addr, ints, words, feeling, feelings, price, prices, name_c)
VALUES
 (1, 2, 3.14, 'NaN', 1.5, -2.25e10, true, E'tab\there\nnewline \\ backslash "quote" ''single''', 'short', 'abc',
  '2024-02-29', '23:59:59.999999', '2024-01-01 00:00:00', '2024-06-01 12:00:00+02', '1 year 2 mons 3 days 04:05:06',
  '{"lang": "es", "allergies": ["gluten", "ñ"], "n": 1.50}', '{"b": 1, "a": [2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '\x00ff10', '192.168.0.1/24', '{1,NULL,3}', '{"a,b","c\"d",NULL,""}', 'happy', '{sad,happy}', 9.99, '{1.00,2.50}', 'Ñandú'),
 (NULL, 0, NULL, -12345678901234567890.123456789, 'Infinity', '-Infinity', NULL, 'piña colada 🍍 中文', NULL, NULL,
  'infinity', NULL, '-infinity', 'infinity', NULL, 'null', NULL, NULL, '', NULL, '{}', '{}', NULL, '{}', NULL, NULL, NULL),
 (-999, -9223372036854775808, -0.01, 0, 0, 0, false, '', '', '   ', '0001-01-01', '00:00', '1999-12-31 23:59:59.5',
  '1970-01-01 00:00:00+00', '-1 day', '[]', '[]', '00000000-0000-0000-0000-000000000000', '\x', '::1', '{{1,2},{3,4}}',
  '{"\\"}', 'sad', '{ok,ok}', 0, '{}', 'z');
"#;

/// A webhook that answers 200 to every POST and keeps each body.
pub struct FakeWebhook {
    /// Its URL (a Slack-like path with a token in it).
    pub url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl FakeWebhook {
    /// Starts it on 127.0.0.1 in a task of the current runtime.
    pub async fn start() -> FakeWebhook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/services/T0/B0/SECRET",
            listener.local_addr().unwrap()
        );
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&bodies);
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let seen = std::sync::Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = tokio::io::AsyncReadExt::read(&mut sock, &mut buf)
                            .await
                            .unwrap();
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .map_or(0, |l| l.trim().parse().unwrap());
                            if body.len() >= len {
                                assert!(head.starts_with("POST /services/T0/B0/SECRET HTTP/1.1"));
                                seen.lock()
                                    .unwrap()
                                    .push(serde_json::from_str(body).unwrap());
                                let _ = tokio::io::AsyncWriteExt::write_all(
                                    &mut sock,
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                                )
                                .await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        FakeWebhook { url, bodies }
    }

    /// The JSON bodies received so far.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// A `bite-sync run` process started by a test, its stderr in `log`: killed (and its log
/// printed) if the test ends, or panics, without stopping it. Each test file starts it its
/// own way (`Daemon::new` with the spawned child).
pub struct Daemon {
    /// The process, while it runs.
    pub child: Option<std::process::Child>,
    /// Its stderr.
    pub log: PathBuf,
}

impl Daemon {
    /// A daemon logging to `log`, not started yet.
    pub fn new(log: PathBuf) -> Daemon {
        Daemon { child: None, log }
    }

    /// Still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then the exit code (waits at most `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let pid = self.pid();
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        self.exit_code(within)
    }

    /// Waits for the daemon to exit and returns its code; kills it after `within`.
    pub fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- bite-sync run log ----\n{}", self.log());
        }
    }
}

/// One request a [`FakeHttp`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path and query, e.g. `/v25.0/106540352242922/messages`.
    pub uri: String,
    /// Header names lower-case.
    pub headers: Vec<(String, String)>,
    /// The raw body.
    pub body: Vec<u8>,
    /// When its body had arrived.
    pub at: std::time::Instant,
}

impl Recorded {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: body is not JSON ({e}): {}",
                self.method,
                self.uri,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// How a [`FakeHttp`] answers: status and JSON body for a request.
pub type Responder = std::sync::Arc<dyn Fn(&Recorded) -> (u16, serde_json::Value) + Send + Sync>;

/// A real HTTP server on 127.0.0.1 that records every request and answers with a
/// [`Responder`] that a test can swap at any time (the backend goes down, a provider fails).
/// `stop` closes the port (connection refused); `start_again` listens on the same port.
pub struct FakeHttp {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    addr: SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
    responder: std::sync::Arc<std::sync::Mutex<Responder>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeHttp {
    /// Starts a server answering 200 `{}` to everything.
    pub async fn start() -> FakeHttp {
        FakeHttp::with(|_| (200, serde_json::json!({}))).await
    }

    /// Starts a server answering with `respond`.
    pub async fn with(
        respond: impl Fn(&Recorded) -> (u16, serde_json::Value) + Send + Sync + 'static,
    ) -> FakeHttp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fake = FakeHttp {
            url: format!("http://{addr}"),
            addr,
            requests: Default::default(),
            responder: std::sync::Arc::new(std::sync::Mutex::new(std::sync::Arc::new(respond))),
            task: None,
        };
        fake.serve(listener);
        fake
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let requests = std::sync::Arc::clone(&self.requests);
        let responder = std::sync::Arc::clone(&self.responder);
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let requests = std::sync::Arc::clone(&requests);
                let responder = std::sync::Arc::clone(&responder);
                async move {
                    let recorded = Recorded {
                        method: method.to_string(),
                        uri: uri.to_string(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                            })
                            .collect(),
                        body: body.to_vec(),
                        at: std::time::Instant::now(),
                    };
                    let respond = std::sync::Arc::clone(&*responder.lock().unwrap());
                    let (status, json) = respond(&recorded);
                    requests.lock().unwrap().push(recorded);
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        axum::Json(json),
                    )
                }
            },
        );
        // Media uploads are larger than axum's default limit of 2 MB.
        let app = app.layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024));
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// Answers from now on with `respond`.
    pub fn respond(
        &self,
        respond: impl Fn(&Recorded) -> (u16, serde_json::Value) + Send + Sync + 'static,
    ) {
        *self.responder.lock().unwrap() = std::sync::Arc::new(respond);
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.uri.starts_with(prefix))
            .collect()
    }

    /// Closes the port: connections are refused until [`FakeHttp::start_again`].
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port (the recorded requests are kept).
    pub async fn start_again(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("could not listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The WhatsApp relay's and delivery's environment variables: removed from every test's
/// `bite-sync` so a developer's own settings never leak in.
pub const RELAY_ENV: &[&str] = &[
    "DATABASE_URL",
    "WHATSAPP_VERIFY_TOKEN",
    "WHATSAPP_ACCESS_TOKEN",
    "META_APP_SECRET",
    "WHATSAPP_PHONE_NUMBER_ID",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "ANTHROPIC_API_KEY",
    "LOCAL_BACKEND_URL",
    "SYNC_API_KEY",
    "JWT_SECRET",
    "PORT",
    "SYNC_ENABLED",
    "DELIVERY_MODE",
    "AI_PROVIDER",
    "AI_DEADLINE",
    "GRAPH_API_URL",
    "GRAPH_API_VERSION",
    "OPENAI_MODEL",
    "OPENAI_BASE_URL",
    "GEMINI_MODEL",
    "GEMINI_BASE_URL",
    "ANTHROPIC_MODEL",
    "ANTHROPIC_BASE_URL",
    "RAILWAY_REPLICA_ID",
    "META_APP_SECRET_PREVIOUS",
    "SYNC_API_KEY_PREVIOUS",
    "JWT_SECRET_PREVIOUS",
];

/// `SELECT count(*) …` or any query whose first row's first column is a bigint.
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    match client.query_one(sql, &[]).await {
        Ok(row) => row.get(0),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// The first column of every row, as text.
pub async fn strings(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    match client.query(sql, &[]).await {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Starts `bite-sync relay` (with `-v`) on a free port with `env` (which must hold its
/// required variables) and waits until it listens; returns the process and its base URL
/// (`http://127.0.0.1:PORT`). A relay that exits at start fails the test with its log.
pub async fn start_relay(env: &[(&str, String)]) -> (Daemon, String) {
    start_relay_with(env, |_| {}).await
}

/// [`start_relay`], with `configure` applied to the command before it is spawned (a lower
/// descriptor limit, say).
pub async fn start_relay_with(
    env: &[(&str, String)],
    configure: impl FnOnce(&mut Command),
) -> (Daemon, String) {
    let mut cmd = bite_sync();
    let log = cmd
        .get_current_dir()
        .expect("bite_sync() sets a working dir")
        .join("relay.log");
    cmd.args(["relay", "-v"])
        .env("PORT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the relay's log"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    configure(&mut cmd);
    let mut daemon = Daemon::new(log);
    daemon.child = Some(cmd.spawn().expect("spawn bite-sync relay"));
    let port = wait_for("the relay to listen", Duration::from_secs(30), || {
        let log = daemon.log();
        let port = bite_sync::relay::listening_port(&log);
        if port.is_none() && log.contains("error:") {
            panic!("the relay failed to start:\n{log}");
        }
        async move { port }
    })
    .await;
    (daemon, format!("http://127.0.0.1:{port}"))
}

/// A payload from `tests/payloads` (Meta's samples), by file name.
pub fn payload(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/payloads")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
