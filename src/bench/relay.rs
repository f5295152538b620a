//! `bite-sync bench relay`: `bite-sync relay` under Meta's webhooks, against a no-op axum
//! handler driven the same way in the same run.
//!
//! Every webhook is a distinct signed payload (Meta's samples with unique wamids, customers
//! and timestamps; one in eight carries three messages and two statuses), built and signed
//! before any clock starts, so the generator only writes prepared bytes. The generator speaks
//! HTTP/1.1 over `--connections` keep-alive connections, opened before the clock starts, one
//! request at a time on each, like Meta's senders.
//!
//! - **A**: the no-op handler (reads the body, answers 200), on its own runtime in this
//!   process, at `--rate` webhooks/s for `--duration`.
//! - **B**: `bite-sync relay` (this binary as a child, `PORT=0`, on loopback) with the same
//!   webhooks at the same rate. Then the inbox must hold one row per item sent: zero lost.
//! - **C**: the relay in a closed loop for `--peak-duration`: each connection posts its next
//!   webhook as soon as the last one is answered. Acknowledged webhooks per second, every one
//!   answered 200 and in the inbox.
//!
//! **Open loop, no coordinated omission.** In A and B webhook `i` is due at `start + i/rate`;
//! a free connection takes the next due webhook, waits for its time and sends it, and its
//! latency runs from when it was *due*, not when it left. A server that stalls therefore
//! cannot hide the queue that builds behind it: the webhooks due meanwhile count their wait.
//! How late the generator sent (its own lateness) is reported too.
//!
//! - **D**: a fresh relay takes 30 concurrent 4 MiB bodies with a wrong signature; its peak
//!   RSS ([`super::relay_bodies`]).
//!
//! The inbox is on a durable throwaway cluster (`fsync=on`), like the other benchmarks'; its
//! statements over 100 ms and its checkpoints are logged, and with `--log-dir` its log is kept
//! beside the relay's. The relay's peak RSS is the kernel's `VmHWM` from `/proc/<pid>/status`
//! after B and before the SIGTERM that ends it (which must exit it 0).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BenchError, Daemon};
use crate::cli::RelayBenchArgs;
use crate::pg::cluster::{ClusterOptions, TempCluster};
use crate::pg::connect::Role;
use crate::relay::{payload, signature};

/// Ack latency p50 in milliseconds, at most (at the fixed rate).
const TARGET_P50_MS: f64 = 50.0;
/// Ack latency p99 in milliseconds, at most (Meta's standard).
const TARGET_P99_MS: f64 = 250.0;
/// Acknowledged webhooks per second in the closed loop, at least.
const TARGET_PEAK: f64 = 3_000.0;
/// The relay's peak RSS in MiB, at most.
const TARGET_RSS_MIB: f64 = 50.0;

/// The relay's secrets for the run.
const APP_SECRET: &str = "bench-app-secret";
const VERIFY_TOKEN: &str = "bench-verify-token";
/// The inbox's database.
const DATABASE: &str = "relay";

/// Webhooks built for the closed loop, per second of `--peak-duration`: more than the relay
/// can take here, so the loop runs for its whole duration (the report says if it ran out).
const PEAK_BUILT_PER_SECOND: f64 = 10_000.0;
/// Distinct customers the webhooks come from.
const CUSTOMERS: u64 = 1_000;
/// One request's answer, at most; the relay itself gives up storing after 15 s.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// How long the relay may take to listen.
const START_LIMIT: Duration = Duration::from_secs(60);
/// A response head larger than this is not an answer from our servers.
const MAX_HEAD: usize = 16 * 1024;

/// Meta's sample payloads (the relay tests' fixtures).
const TEXT: &str = include_str!("../../tests/payloads/text.json");
const LOCATION: &str = include_str!("../../tests/payloads/location.json");
const INTERACTIVE: &str = include_str!("../../tests/payloads/interactive.json");
const IMAGE: &str = include_str!("../../tests/payloads/image.json");
const STATUSES: &str = include_str!("../../tests/payloads/statuses.json");
const UNSUPPORTED: &str = include_str!("../../tests/payloads/unsupported.json");

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Highest.
    pub max_ms: f64,
}

/// One phase of load against one server.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Load {
    /// Webhooks sent (every one answered or failed).
    pub webhooks: u64,
    /// Inbox items in the webhooks sent.
    pub items: u64,
    /// Answered 200.
    pub acknowledged: u64,
    /// Answered with another status.
    pub other_status: u64,
    /// No answer: connection refused or reset, timeout, unreadable response.
    pub transport_errors: u64,
    /// The first non-200 answer or transport error, if any.
    pub first_error: Option<String>,
    /// From the clock's start to the last answer.
    pub seconds: f64,
    /// `acknowledged / seconds`.
    pub acknowledged_per_second: f64,
    /// Acknowledgement latency (200s only): in the open loop from when each webhook was due,
    /// in the closed loop from when it was sent.
    pub latency: Latency,
    /// Open loop only: how late the generator sent after the due time, p99 and max, in ms.
    pub send_late_p99_ms: Option<f64>,
    /// See `send_late_p99_ms`.
    pub send_late_max_ms: Option<f64>,
}

/// The relay benchmark's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayBenchReport {
    /// Webhooks per second in A and B.
    pub rate: u32,
    /// Length of A and B in seconds.
    pub duration_seconds: f64,
    /// The generator's keep-alive connections.
    pub connections: u16,
    /// Average body size of the fixed-rate webhooks in bytes.
    pub mean_body_bytes: f64,
    /// A: the no-op axum handler at the fixed rate.
    pub noop: Load,
    /// B: the relay at the fixed rate.
    pub relay: Load,
    /// Inbox rows after B.
    pub relay_inbox_rows: i64,
    /// Items sent in B and not in the inbox (target 0), plus webhooks not answered 200.
    pub lost: i64,
    /// C: the relay in a closed loop.
    pub peak: Load,
    /// Inbox rows C added.
    pub peak_inbox_rows: i64,
    /// C's every webhook answered 200 and every item in the inbox.
    pub peak_all_stored: bool,
    /// C sent every webhook built for it before its time was up.
    pub peak_ran_out: bool,
    /// Dead letters the relay stored (0: every webhook was read).
    pub dead_letters: i64,
    /// The relay's peak RSS after B in MiB (`VmHWM`).
    pub relay_rss_after_b_mib: f64,
    /// The relay's peak RSS over B and C in MiB (`VmHWM`; target ≤ 50).
    pub peak_rss_mib: f64,
    /// D: large bodies with a wrong signature, on a fresh relay.
    pub bodies: super::relay_bodies::BodiesReport,
}

/// Runs the relay benchmark and prints its results.
pub async fn run(args: &RelayBenchArgs, cancel: CancellationToken) -> Result<(), BenchError> {
    let logs = super::LogDir::new(args.log_dir.as_deref())?;
    eprintln!("starting the inbox's cluster...");
    let cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(&ClusterOptions {
            name: "relay".into(),
            logical: false,
            settings: vec![
                ("fsync".into(), "on".into()),
                ("autovacuum".into(), "off".into()),
                ("log_min_duration_statement".into(), "100ms".into()),
                ("log_checkpoints".into(), "on".into()),
            ],
        })
    })
    .await?
    .map_err(|e| BenchError::Setup(Box::new(e.into())))?;
    let result = tokio::select! {
        r = bench(args, &cluster, logs.path()) => r,
        () = cancel.cancelled() => Err(BenchError::Cancelled),
    };
    let keep_log = args
        .log_dir
        .is_some()
        .then(|| logs.path().join("postgresql.log"));
    tokio::task::spawn_blocking(move || {
        if let (Some(to), Some(dir)) = (keep_log, cluster.data_dir().parent()) {
            let _ = std::fs::copy(dir.join("server.log"), to);
        }
        let _ = cluster.stop();
    })
    .await?;
    super::print_report(args.json, &result?, render);
    Ok(())
}

async fn bench(
    args: &RelayBenchArgs,
    cluster: &TempCluster,
    logs: &Path,
) -> Result<RelayBenchReport, BenchError> {
    let url = crate::demo::create_database(cluster, DATABASE, Role::Mirror)
        .await
        .map_err(Box::new)?;
    let fixed_count = (f64::from(args.rate) * args.duration.as_secs_f64()).round() as u64;
    let peak_count = (PEAK_BUILT_PER_SECOND * args.peak_duration.as_secs_f64()).ceil() as u64;
    eprintln!(
        "building and signing {fixed_count} + {peak_count} webhooks (fixed rate + closed loop)..."
    );
    let fixed = tokio::task::spawn_blocking(move || Webhooks::build("r", fixed_count));
    let peak = tokio::task::spawn_blocking(move || Webhooks::build("p", peak_count));
    let (fixed, peak) = (Arc::new(fixed.await??), Arc::new(peak.await??));
    let connections = usize::from(args.connections);
    let rate = f64::from(args.rate);

    eprintln!(
        "A: no-op axum handler, {} webhooks/s for {:?}",
        args.rate, args.duration
    );
    let noop = NoopServer::start().await?;
    let a = open_loop(noop.addr, &fixed, rate, connections).await?;
    noop.stop().await;

    eprintln!("starting bite-sync relay...");
    let mut relay = start_relay(&cluster.url(DATABASE), logs).await?;
    eprintln!(
        "B: bite-sync relay, {} webhooks/s for {:?}",
        args.rate, args.duration
    );
    let b = open_loop(relay.addr, &fixed, rate, connections).await?;
    relay.daemon.check_running()?;
    let relay_rss_after_b_mib = relay.daemon.high_water_mib().unwrap_or(0.0);
    let db = super::connect(&url).await?;
    let relay_inbox_rows = inbox_rows(&db).await?;
    let lost = (b.items as i64 - relay_inbox_rows).max(0) + (b.webhooks - b.acknowledged) as i64;

    eprintln!(
        "C: bite-sync relay, closed loop on {connections} connections for {:?}",
        args.peak_duration
    );
    let c = closed_loop(relay.addr, &peak, connections, args.peak_duration).await?;
    relay.daemon.check_running()?;
    let peak_inbox_rows = inbox_rows(&db).await? - relay_inbox_rows;
    let dead_letters: i64 = db
        .query_one("SELECT count(*) FROM bite_sync.inbox_dead_letters", &[])
        .await
        .map_err(|e| BenchError::Check("the dead letters".into(), e))?
        .get(0);
    // The kernel's `ru_maxrss` would not do here: a child's counts its parent's pages from
    // before `exec`, and this process holds every prepared webhook. `VmHWM` is the relay's
    // own address space's peak; the shutdown that follows allocates nothing of note.
    let peak_rss_mib = relay.daemon.high_water_mib().unwrap_or(0.0);
    relay.daemon.stop().await?;
    eprintln!(
        "D: a fresh bite-sync relay, {} concurrent {} MiB bodies with a wrong signature",
        super::relay_bodies::CONCURRENT,
        super::relay_bodies::BODY_BYTES / (1024 * 1024)
    );
    let bodies = super::relay_bodies::run(&cluster.url(DATABASE), logs).await?;
    Ok(RelayBenchReport {
        rate: args.rate,
        duration_seconds: args.duration.as_secs_f64(),
        connections: args.connections,
        mean_body_bytes: fixed.body_bytes as f64 / fixed.requests.len().max(1) as f64,
        peak_all_stored: c.acknowledged == c.webhooks && peak_inbox_rows == c.items as i64,
        peak_ran_out: c.webhooks == peak.requests.len() as u64,
        noop: a,
        relay: b,
        relay_inbox_rows,
        lost,
        peak: c,
        peak_inbox_rows,
        dead_letters,
        relay_rss_after_b_mib,
        peak_rss_mib,
        bodies,
    })
}

async fn inbox_rows(db: &tokio_postgres::Client) -> Result<i64, BenchError> {
    Ok(db
        .query_one("SELECT count(*) FROM bite_sync.inbox", &[])
        .await
        .map_err(|e| BenchError::Check("the inbox's rows".into(), e))?
        .get(0))
}

// ---------------------------------------------------------------------------------------------
// The webhooks.

/// Signed webhooks as complete HTTP requests, ready to write.
struct Webhooks {
    requests: Vec<Vec<u8>>,
    /// Inbox items in each request.
    items: Vec<u32>,
    /// Sum of the bodies' sizes.
    body_bytes: u64,
}

impl Webhooks {
    /// `count` webhooks whose ids all start with `tag` (distinct tags never share an id).
    /// Each body is read back by the relay's own parser: every item readable, every dedupe
    /// key new, so the inbox must end with exactly one row per item.
    fn build(tag: &str, count: u64) -> Result<Webhooks, BenchError> {
        let shapes = Shapes::new();
        let mut keys = HashSet::new();
        let mut out = Webhooks {
            requests: Vec::with_capacity(count as usize),
            items: Vec::with_capacity(count as usize),
            body_bytes: 0,
        };
        let broken = |detail: String| BenchError::Step {
            what: "building the webhooks".into(),
            detail,
        };
        for n in 0..count {
            let body = shapes.body(tag, n);
            let parsed = payload::parse(&body).map_err(|e| broken(format!("webhook {n}: {e}")))?;
            if !parsed.problems.is_empty() || parsed.items.is_empty() {
                return Err(broken(format!("webhook {n}: {:?}", parsed.problems)));
            }
            for item in &parsed.items {
                if !keys.insert(item.dedupe_key.clone()) {
                    return Err(broken(format!("webhook {n} repeats {}", item.dedupe_key)));
                }
            }
            out.items.push(parsed.items.len() as u32);
            out.body_bytes += body.len() as u64;
            out.requests.push(request(&body));
        }
        Ok(out)
    }

    /// Items in the first `sent` webhooks.
    fn items_in(&self, sent: usize) -> u64 {
        self.items[..sent.min(self.items.len())]
            .iter()
            .map(|&n| u64::from(n))
            .sum()
    }
}

/// `POST /api/webhook` as Meta sends it, signed with [`APP_SECRET`].
fn request(body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST /api/webhook HTTP/1.1\r\n\
         host: 127.0.0.1\r\n\
         user-agent: facebookexternalua\r\n\
         accept: */*\r\n\
         content-type: application/json\r\n\
         x-hub-signature-256: {}\r\n\
         content-length: {}\r\n\r\n",
        signature::sign(APP_SECRET.as_bytes(), body),
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

/// The payload shapes, cycled: mostly single text messages, every sample, and a batch.
struct Shapes {
    cycle: Vec<Value>,
}

impl Shapes {
    fn new() -> Shapes {
        let sample = |text: &str| -> Value { serde_json::from_str(text).expect("sample is JSON") };
        let (text, statuses) = (sample(TEXT), sample(STATUSES));
        // One change holding three messages (text, image, button) and two statuses.
        let mut batch = text.clone();
        let value = &mut batch["entry"][0]["changes"][0]["value"];
        for other in [IMAGE, INTERACTIVE] {
            let message = sample(other)["entry"][0]["changes"][0]["value"]["messages"][0].clone();
            value["messages"]
                .as_array_mut()
                .expect("messages")
                .push(message);
        }
        let mut two = statuses["entry"][0]["changes"][0]["value"]["statuses"].clone();
        two.as_array_mut().expect("statuses").truncate(2);
        value["statuses"] = two;
        Shapes {
            cycle: vec![
                text.clone(),
                statuses,
                sample(IMAGE),
                sample(LOCATION),
                text,
                batch,
                sample(INTERACTIVE),
                sample(UNSUPPORTED),
            ],
        }
    }

    /// Webhook `n`: its shape with unique message and status ids, one of [`CUSTOMERS`]
    /// customers, and its own timestamp.
    fn body(&self, tag: &str, n: u64) -> Vec<u8> {
        let mut webhook = self.cycle[(n % self.cycle.len() as u64) as usize].clone();
        let customer = Value::from(format!("1650555{:04}", n % CUSTOMERS));
        let timestamp = Value::from((1_750_000_000 + n).to_string());
        let values = webhook
            .get_mut("entry")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(|e| e.get_mut("changes").and_then(Value::as_array_mut))
            .flatten()
            .filter_map(|c| c.get_mut("value"));
        for value in values {
            if let Some(contacts) = value.get_mut("contacts").and_then(Value::as_array_mut) {
                for contact in contacts {
                    contact["wa_id"] = customer.clone();
                }
            }
            for (list, from, letter) in
                [("messages", "from", 'm'), ("statuses", "recipient_id", 's')]
            {
                if let Some(list) = value.get_mut(list).and_then(Value::as_array_mut) {
                    for (j, entry) in list.iter_mut().enumerate() {
                        entry["id"] = Value::from(format!("wamid.bench.{tag}{n}.{letter}{j}"));
                        entry[from] = customer.clone();
                        entry["timestamp"] = timestamp.clone();
                    }
                }
            }
        }
        serde_json::to_vec(&webhook).expect("JSON serializes")
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// What one connection saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    late: Vec<Duration>,
    acknowledged: u64,
    other_status: u64,
    transport_errors: u64,
    first_error: Option<String>,
    /// When its last answer came.
    finished: Option<Instant>,
}

impl Tally {
    fn record(&mut self, outcome: Result<u16, HttpError>, latency: Duration) {
        match outcome {
            Ok(200) => {
                self.acknowledged += 1;
                self.latencies.push(latency);
            }
            Ok(status) => {
                self.other_status += 1;
                self.first_error.get_or_insert(format!("answered {status}"));
            }
            Err(e) => {
                self.transport_errors += 1;
                self.first_error.get_or_insert(e.to_string());
            }
        }
    }
}

/// A and B: webhook `i` is due at `start + i/rate`; each connection takes the next webhook,
/// waits until it is due, sends it, and counts its latency from the due time.
async fn open_loop(
    addr: SocketAddr,
    webhooks: &Arc<Webhooks>,
    rate: f64,
    connections: usize,
) -> Result<Load, BenchError> {
    let conns = connect_all(addr, connections).await?;
    let next = Arc::new(AtomicUsize::new(0));
    // Time for every task to be waiting before the first webhook is due.
    let start = Instant::now() + Duration::from_millis(50);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (webhooks, next) = (Arc::clone(webhooks), Arc::clone(&next));
            tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(request) = webhooks.requests.get(i) else {
                        break;
                    };
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    tally.late.push(Instant::now() - due);
                    let outcome = conn.exchange(request).await;
                    tally.record(outcome, due.elapsed());
                }
                tally.finished = Some(Instant::now());
                tally
            })
        })
        .collect();
    let sent = webhooks.requests.len();
    summarize(tasks, start, webhooks.items_in(sent), sent as u64, true).await
}

/// C: each connection posts its next webhook as soon as the last is answered, until
/// `duration` is up or the webhooks run out.
async fn closed_loop(
    addr: SocketAddr,
    webhooks: &Arc<Webhooks>,
    connections: usize,
    duration: Duration,
) -> Result<Load, BenchError> {
    let conns = connect_all(addr, connections).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (webhooks, next) = (Arc::clone(webhooks), Arc::clone(&next));
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(request) = webhooks.requests.get(i) else {
                        break;
                    };
                    let sent = Instant::now();
                    let outcome = conn.exchange(request).await;
                    tally.record(outcome, sent.elapsed());
                }
                tally.finished = Some(Instant::now());
                tally
            })
        })
        .collect();
    let tallies = join(tasks).await?;
    // Indices taken past the end or after the deadline were not sent.
    let sent: u64 = tallies
        .iter()
        .map(|t| t.acknowledged + t.other_status + t.transport_errors)
        .sum();
    Ok(load(
        tallies,
        start,
        webhooks.items_in(sent as usize),
        sent,
        false,
    ))
}

async fn connect_all(addr: SocketAddr, n: usize) -> Result<Vec<Connection>, BenchError> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(
            Connection::open(addr)
                .await
                .map_err(|source| BenchError::Spawn {
                    what: format!("connecting to {addr}"),
                    source,
                })?,
        );
    }
    Ok(conns)
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Result<Vec<Tally>, BenchError> {
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await?);
    }
    Ok(tallies)
}

async fn summarize(
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
    start: Instant,
    items: u64,
    sent: u64,
    open: bool,
) -> Result<Load, BenchError> {
    Ok(load(join(tasks).await?, start, items, sent, open))
}

/// Merges the connections' tallies.
fn load(tallies: Vec<Tally>, start: Instant, items: u64, webhooks: u64, open: bool) -> Load {
    let mut latencies = Vec::new();
    let mut late = Vec::new();
    let (mut acknowledged, mut other_status, mut transport_errors) = (0, 0, 0);
    let mut first_error = None;
    let mut finished = start;
    for t in tallies {
        latencies.extend(t.latencies);
        late.extend(t.late);
        acknowledged += t.acknowledged;
        other_status += t.other_status;
        transport_errors += t.transport_errors;
        first_error = first_error.or(t.first_error);
        finished = finished.max(t.finished.unwrap_or(start));
    }
    let seconds = (finished - start).as_secs_f64();
    let ms = |values: &[Duration], p: f64| {
        super::replication::percentile(values, p).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Load {
        webhooks,
        items,
        acknowledged,
        other_status,
        transport_errors,
        first_error,
        seconds,
        acknowledged_per_second: if seconds > 0.0 {
            acknowledged as f64 / seconds
        } else {
            0.0
        },
        latency: Latency {
            p50_ms: ms(&latencies, 50.0),
            p90_ms: ms(&latencies, 90.0),
            p99_ms: ms(&latencies, 99.0),
            p999_ms: ms(&latencies, 99.9),
            max_ms: ms(&latencies, 100.0),
        },
        send_late_p99_ms: open.then(|| ms(&late, 99.0)),
        send_late_max_ms: open.then(|| ms(&late, 100.0)),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, as much as the generator needs: one request at a time on a keep-alive connection.

/// Why an exchange got no answer.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection before answering.
    #[error("the server closed the connection")]
    Closed,
    /// No answer in time.
    #[error("no answer within {REQUEST_LIMIT:?}")]
    Timeout,
    /// The answer was not HTTP the generator reads.
    #[error("unreadable response: {0}")]
    Response(&'static str),
}

/// A response's status line and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Bytes of the status line and headers, the blank line included.
    len: usize,
    /// `content-length`.
    body: usize,
    /// `connection: close`.
    close: bool,
}

/// Reads a response head from the start of `buf`: `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(HttpError::Response("head too large"))
        } else {
            Ok(None)
        };
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::Response("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let mut status_line = lines.next().unwrap_or_default().split(' ');
    if !status_line.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(HttpError::Response("not an HTTP/1 status line"));
    }
    let status: u16 = status_line
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Response("no status code"))?;
    let (mut body, mut close) = (None, false);
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Response("header without a colon"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            body = Some(
                value
                    .parse()
                    .map_err(|_| HttpError::Response("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Response("chunked bodies are not read"));
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body = match (status, body) {
        (100..=199 | 204 | 304, _) => 0,
        (_, Some(n)) => n,
        (_, None) => return Err(HttpError::Response("no content-length")),
    };
    Ok(Some(Head {
        status,
        len: end + 4,
        body,
        close,
    }))
}

/// One keep-alive connection; reconnects after an error or `connection: close`.
struct Connection {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            addr,
            stream: Some(stream),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads the answer: its status.
    async fn exchange(&mut self, request: &[u8]) -> Result<u16, HttpError> {
        let answer = tokio::time::timeout(REQUEST_LIMIT, self.try_exchange(request))
            .await
            .unwrap_or(Err(HttpError::Timeout));
        if answer.is_err() {
            self.stream = None;
        }
        answer
    }

    async fn try_exchange(&mut self, request: &[u8]) -> Result<u16, HttpError> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(request).await?;
        self.buf.clear();
        let head = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(HttpError::Closed);
            }
        };
        while self.buf.len() < head.len + head.body {
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(HttpError::Closed);
            }
        }
        if head.close {
            self.stream = None;
        }
        Ok(head.status)
    }
}

// ---------------------------------------------------------------------------------------------
// The servers.

/// The baseline: an axum handler that reads the body and answers 200 like the relay, on its
/// own two-thread runtime (the relay's, on this machine) in a thread of this process.
struct NoopServer {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl NoopServer {
    async fn start() -> Result<NoopServer, BenchError> {
        let failed = |source| BenchError::Spawn {
            what: "the no-op server".into(),
            source,
        };
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-noop".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("bench-noop")
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
                    let _ = addr_tx.send(listener.local_addr()?);
                    let app = axum::Router::new()
                        .route(
                            "/api/webhook",
                            axum::routing::post(|body: Bytes| async move {
                                std::hint::black_box(body);
                                (StatusCode::OK, "EVENT_RECEIVED")
                            }),
                        )
                        .layer(axum::extract::DefaultBodyLimit::max(
                            crate::relay::server::BODY_LIMIT,
                        ));
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await
                })
            })
            .map_err(failed)?;
        match addr_rx.await {
            Ok(addr) => Ok(NoopServer { addr, stop, thread }),
            Err(_) => {
                let why = match thread.join() {
                    Ok(Err(e)) => e,
                    _ => std::io::Error::other("the no-op server's thread ended"),
                };
                Err(failed(why))
            }
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// A `bite-sync relay` child and where it listens.
pub(super) struct Relay {
    pub(super) daemon: Daemon,
    pub(super) addr: SocketAddr,
}

/// Starts this binary's `relay` on `database_url` with `PORT=0` and nothing else from this
/// process's environment (no delivery, no AI, no config file), and waits until it listens.
pub(super) async fn start_relay(database_url: &str, logs: &Path) -> Result<Relay, BenchError> {
    let what = "bite-sync relay";
    let exe = std::env::current_exe().map_err(|source| BenchError::Spawn {
        what: what.into(),
        source,
    })?;
    let mut command = Command::new(exe);
    command
        .arg("relay")
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN)
        .env("META_APP_SECRET", APP_SECRET)
        .env("PORT", "0")
        .current_dir(logs);
    let mut daemon = Daemon::spawn(what, &logs.join("relay.log"), command)?;
    let started = std::time::Instant::now();
    loop {
        if let Some(port) = crate::relay::listening_port(&daemon.log()) {
            return Ok(Relay {
                daemon,
                addr: (Ipv4Addr::LOCALHOST, port).into(),
            });
        }
        daemon.check_running()?;
        if started.elapsed() > START_LIMIT {
            return Err(BenchError::Timeout {
                what: "the relay to listen".into(),
                limit: START_LIMIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// The human-readable result table.
pub fn render(r: &RelayBenchReport) -> String {
    let row = |label: &str, l: &Load| {
        format!(
            "{label:<42} {:>7} {:>7} {:>6} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n",
            l.webhooks,
            l.acknowledged,
            l.other_status,
            l.transport_errors,
            l.latency.p50_ms,
            l.latency.p90_ms,
            l.latency.p99_ms,
            l.latency.p999_ms,
            l.latency.max_ms,
        )
    };
    let late = |l: &Load| {
        format!(
            "   generator sent {:.0} webhooks/s, late by p99 {:.2} ms, max {:.2} ms\n",
            l.webhooks as f64 / l.seconds.max(f64::EPSILON),
            l.send_late_p99_ms.unwrap_or(0.0),
            l.send_late_max_ms.unwrap_or(0.0)
        )
    };
    let mut out = format!(
        "{} signed webhooks at {}/s for {:.0} s on {} keep-alive connections: {} items, {:.2} per webhook, {:.0} bytes on average\n",
        r.relay.webhooks,
        r.rate,
        r.duration_seconds,
        r.connections,
        r.relay.items,
        r.relay.items as f64 / r.relay.webhooks.max(1) as f64,
        r.mean_body_bytes,
    );
    out.push_str(&format!(
        "{:<42} {:>7} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "ack latency in ms", "sent", "200", "other", "errors", "p50", "p90", "p99", "p99.9", "max"
    ));
    out.push_str(&row(
        &format!("A  no-op axum handler, {}/s", r.rate),
        &r.noop,
    ));
    out.push_str(&late(&r.noop));
    out.push_str(&row(&format!("B  bite-sync relay, {}/s", r.rate), &r.relay));
    out.push_str(&late(&r.relay));
    out.push_str(&format!(
        "   inbox after B: {} rows for {} items sent; relay peak RSS so far {:.1} MiB\n",
        r.relay_inbox_rows, r.relay.items, r.relay_rss_after_b_mib
    ));
    out.push_str(&row(
        &format!("C  bite-sync relay, closed loop {:.0} s", r.peak.seconds),
        &r.peak,
    ));
    out.push_str(&format!(
        "   {:.0} webhooks/s acknowledged, {:.0} items/s; inbox +{} rows for {} items sent{}\n",
        r.peak.acknowledged_per_second,
        r.peak.items as f64 / r.peak.seconds.max(f64::EPSILON),
        r.peak_inbox_rows,
        r.peak.items,
        if r.peak_ran_out {
            " (every webhook built was sent: the relay may go faster)"
        } else {
            ""
        }
    ));
    if r.dead_letters > 0 {
        out.push_str(&format!("   dead letters: {}\n", r.dead_letters));
    }
    for (name, load) in [("B", &r.relay), ("C", &r.peak)] {
        if let Some(e) = &load.first_error {
            out.push_str(&format!("   {name}'s first failure: {e}\n"));
        }
    }
    let p = &r.relay.latency;
    out.push_str(&format!(
        "p50 = {:.2} ms  (target <= {TARGET_P50_MS} ms: {})\n\
         p99 = {:.2} ms  (target <= {TARGET_P99_MS} ms: {})\n\
         lost = {}  (target = 0: {})\n\
         peak = {:.0} webhooks/s  (target >= {TARGET_PEAK}: {})\n\
         peak RSS = {:.1} MiB  (target <= {TARGET_RSS_MIB}: {})\n",
        p.p50_ms,
        verdict(r.relay.acknowledged > 0 && p.p50_ms <= TARGET_P50_MS),
        p.p99_ms,
        verdict(r.relay.acknowledged > 0 && p.p99_ms <= TARGET_P99_MS),
        r.lost,
        verdict(r.lost == 0),
        r.peak.acknowledged_per_second,
        verdict(r.peak_all_stored && r.peak.acknowledged_per_second >= TARGET_PEAK),
        r.peak_rss_mib,
        verdict(r.peak_rss_mib > 0.0 && r.peak_rss_mib <= TARGET_RSS_MIB),
    ));
    out.push_str(&super::relay_bodies::render(&r.bodies));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_signed_distinct_and_every_item_counted() {
        let built = Webhooks::build("t", 24).expect("builds");
        assert_eq!(built.requests.len(), 24);
        // Three rounds of the eight shapes: 1+3+1+1+1+5+1+1 items each.
        assert_eq!(built.items_in(24), 3 * 14);
        assert_eq!(built.items_in(1), 1);
        for request in &built.requests {
            let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let (head, body) = (
                std::str::from_utf8(&request[..end + 2]).unwrap(),
                &request[end + 4..],
            );
            assert!(head.starts_with("POST /api/webhook HTTP/1.1\r\n"));
            assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
            let given = head
                .lines()
                .find_map(|l| l.strip_prefix("x-hub-signature-256: "))
                .unwrap();
            assert_eq!(
                signature::verify(APP_SECRET.as_bytes(), body, Some(given.as_bytes())),
                Ok(())
            );
        }
        // Another tag never repeats an id, and the same tag builds the same bytes.
        let shapes = Shapes::new();
        assert_ne!(shapes.body("a", 5), shapes.body("b", 5));
        assert_eq!(shapes.body("a", 5), shapes.body("a", 5));
    }

    #[test]
    fn response_heads_are_read_when_complete() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 14\r\ndate: x\r\n\r\nEVENT_RECEIVED";
        let head = parse_head(answer).unwrap().unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                len: answer.len() - 14,
                body: 14,
                close: false
            }
        );
        assert!(parse_head(&answer[..20]).unwrap().is_none());
        let closing =
            b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";
        let head = parse_head(closing).unwrap().unwrap();
        assert_eq!((head.status, head.body, head.close), (503, 2, true));
        for bad in [
            &b"SMTP 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_head(&vec![b'x'; MAX_HEAD + 1]).is_err());
    }

    fn sample_load(p50: f64, p99: f64, per_second: f64) -> Load {
        Load {
            webhooks: 100,
            items: 140,
            acknowledged: 100,
            other_status: 0,
            transport_errors: 0,
            first_error: None,
            seconds: 10.0,
            acknowledged_per_second: per_second,
            latency: Latency {
                p50_ms: p50,
                p90_ms: p50,
                p99_ms: p99,
                p999_ms: p99,
                max_ms: p99,
            },
            send_late_p99_ms: Some(0.5),
            send_late_max_ms: Some(1.0),
        }
    }

    #[test]
    fn the_report_says_which_targets_were_met() {
        let mut report = RelayBenchReport {
            rate: 500,
            duration_seconds: 60.0,
            connections: 64,
            mean_body_bytes: 900.0,
            noop: sample_load(0.3, 1.0, 500.0),
            relay: sample_load(4.0, 20.0, 500.0),
            relay_inbox_rows: 140,
            lost: 0,
            peak: sample_load(10.0, 40.0, 3500.0),
            peak_inbox_rows: 140,
            peak_all_stored: true,
            peak_ran_out: false,
            dead_letters: 0,
            relay_rss_after_b_mib: 15.0,
            peak_rss_mib: 20.0,
            bodies: super::super::relay_bodies::BodiesReport {
                concurrent: 30,
                body_bytes: 4 * 1024 * 1024,
                refused: 30,
                other_status: 0,
                transport_errors: 0,
                seconds: 1.5,
                rss_before_mib: 12.0,
                peak_rss_mib: 61.0,
                rss_after_mib: 14.0,
            },
        };
        let text = render(&report);
        for line in [
            "p50 = 4.00 ms  (target <= 50 ms: ok)",
            "p99 = 20.00 ms  (target <= 250 ms: ok)",
            "lost = 0  (target = 0: ok)",
            "peak = 3500 webhooks/s  (target >= 3000: ok)",
            "peak RSS = 20.0 MiB  (target <= 50: ok)",
            "A  no-op axum handler, 500/s",
            "B  bite-sync relay, 500/s",
            "inbox after B: 140 rows for 140 items sent",
            "D  a fresh relay, 30 concurrent 4 MiB bodies with a wrong signature: 30 refused (401)",
            "peak RSS (D) = 61.0 MiB  (target < 128: ok)",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("MISSED"), "{text}");
        report.relay = sample_load(60.0, 300.0, 500.0);
        report.lost = 3;
        report.peak_all_stored = false;
        report.peak_rss_mib = 51.0;
        report.bodies.peak_rss_mib = 130.0;
        let text = render(&report);
        assert_eq!(text.matches("MISSED").count(), 6, "{text}");
    }
}
