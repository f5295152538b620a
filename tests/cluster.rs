//! Throwaway clusters: configured as asked, reachable, and gone without a trace after
//! `stop()`, after drop, after a failed start, and after their owner is killed with -9.
//!
//! These tests start their own clusters rather than the shared ones, because they stop them.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bite_sync::pg::cluster::{ClusterError, ClusterOptions, TempCluster};

/// Starts a cluster, failing the test with the error's message (not its Debug form).
fn start(opts: &ClusterOptions) -> TempCluster {
    TempCluster::start(opts)
        .unwrap_or_else(|e| panic!("could not start the {} cluster: {e}", opts.name))
}

fn accepts_connections(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn cluster_dir(cluster: &TempCluster) -> PathBuf {
    cluster
        .data_dir()
        .parent()
        .expect("the data dir lives inside the cluster dir")
        .to_path_buf()
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    let row = client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {setting}: {e}"));
    row.get(0)
}

#[tokio::test]
async fn logical_cluster_is_configured_and_stop_leaves_nothing() {
    let cluster = start(&ClusterOptions {
        name: "logical".to_owned(),
        logical: true,
        settings: vec![("work_mem".to_owned(), "8MB".to_owned())],
    });
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(
        cluster.url("postgres"),
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            cluster.port()
        )
    );
    assert!(cluster.bin_dir().join("pg_dump").is_file());

    let client = support::connect(&cluster.url("postgres")).await;
    assert_eq!(show(&client, "wal_level").await, "logical");
    assert_eq!(show(&client, "max_replication_slots").await, "10");
    assert_eq!(show(&client, "max_wal_senders").await, "10");
    assert_eq!(show(&client, "max_connections").await, "200");
    assert_eq!(show(&client, "fsync").await, "off");
    assert_eq!(show(&client, "work_mem").await, "8MB");
    assert_eq!(show(&client, "listen_addresses").await, "127.0.0.1");
    assert_eq!(show(&client, "server_encoding").await, "UTF8");
    let dir = cluster_dir(&cluster);
    assert_eq!(
        show(&client, "unix_socket_directories").await,
        dir.to_str().unwrap()
    );
    drop(client);

    let port = cluster.port();
    assert!(dir.is_dir());
    cluster.stop().expect("stop the cluster");
    assert!(!accepts_connections(port), "port {port} still open");
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[tokio::test]
async fn default_cluster_is_not_logical_and_drop_cleans_up() {
    let cluster = start(&ClusterOptions::default());
    let client = support::connect(&cluster.url("postgres")).await;
    assert_eq!(show(&client, "wal_level").await, "replica");
    let (port, dir) = (cluster.port(), cluster_dir(&cluster));
    drop(cluster);
    assert!(!accepts_connections(port), "port {port} still open");
    assert!(!dir.exists(), "{} still exists", dir.display());
}

/// Cluster dirs whose name starts with `prefix`, in the places clusters are created.
fn dirs_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for base in [std::env::temp_dir(), PathBuf::from("/tmp")] {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                found.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn failed_start_reports_the_server_log_and_leaves_nothing() {
    let name = format!("badconf{}", std::process::id());
    let err = TempCluster::start(&ClusterOptions {
        name: name.clone(),
        logical: false,
        settings: vec![("shared_buffers".to_owned(), "plenty".to_owned())],
    })
    .expect_err("a cluster with an invalid setting must not start");
    assert!(matches!(err, ClusterError::Start { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("invalid value for parameter \"shared_buffers\""),
        "the error should quote the server log: {message}"
    );
    let left = dirs_with_prefix(&format!("bite-sync-{name}-"));
    assert!(left.is_empty(), "left behind: {left:?}");
}

const CHILD_ENV: &str = "BITE_SYNC_TEST_WATCHDOG_CHILD";
const CHILD_LINE: &str = "watchdog-child cluster";

/// Run twice: as the test, it re-runs itself in a child process with `CHILD_ENV` set; as
/// that child, it starts a cluster, reports it and sleeps until killed.
#[tokio::test]
async fn watchdog_cleans_up_after_the_owner_is_killed() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let cluster = start(&ClusterOptions {
            name: "watchdog".to_owned(),
            ..ClusterOptions::default()
        });
        println!(
            "{CHILD_LINE} port={} dir={}",
            cluster.port(),
            cluster_dir(&cluster).display()
        );
        // Bounded, so a child whose parent died does not sleep forever.
        std::thread::sleep(Duration::from_secs(120));
        return;
    }

    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "watchdog_cleans_up_after_the_owner_is_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child test process");
    let stdout = child.stdout.take().expect("piped stdout");
    // libtest prints "test <name> ... " without a newline first, so the report can start
    // mid-line.
    let report = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.find(CHILD_LINE).map(|at| line[at..].to_owned()));
    let Some(report) = report else {
        let _ = child.kill();
        let status = child.wait();
        panic!("the child exited ({status:?}) before reporting its cluster");
    };
    let (port, dir) = parse_report(&report);
    assert!(accepts_connections(port), "child's cluster is not up");
    assert!(dir.is_dir());

    child.kill().expect("kill -9 the child");
    // Reap it: an unreaped child is a zombie, which still answers `kill -0`.
    child.wait().expect("reap the child");

    let what = format!(
        "the watchdog to stop the server on port {port} and remove {}",
        dir.display()
    );
    support::wait_for(&what, Duration::from_secs(30), || {
        let done = !dir.exists() && !accepts_connections(port);
        async move { done.then_some(()) }
    })
    .await;
}

fn parse_report(line: &str) -> (u16, PathBuf) {
    let rest = line
        .strip_prefix(CHILD_LINE)
        .and_then(|r| r.strip_prefix(" port="))
        .unwrap_or_else(|| panic!("unexpected report {line:?}"));
    let (port, dir) = rest
        .split_once(" dir=")
        .unwrap_or_else(|| panic!("unexpected report {line:?}"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("bad port in {line:?}"));
    (port, Path::new(dir).to_path_buf())
}
