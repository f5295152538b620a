//! `bite-sync bench relay`, phase D: a fresh relay takes a burst of large webhook bodies that
//! it must read to refuse (30 concurrent bodies of 4 MiB whose `X-Hub-Signature-256` is well
//! formed but wrong: the worst case, since a body without the header is refused before it is
//! read), and the relay's memory is measured: its peak RSS (`VmHWM`) over the burst (target
//! under 128 MiB), and its RSS (`VmRSS`) once the burst is over.
//!
//! The relay is a new process, so the peak is the burst's and nothing left over from phases
//! B and C. Every body is the same prepared bytes, written on its own connection as fast as
//! the relay reads; every one must be answered (401), none may go unanswered.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::BenchError;

/// Bodies sent at once.
pub const CONCURRENT: usize = 30;
/// Each body's size.
pub const BODY_BYTES: usize = 4 * 1024 * 1024;
/// The relay's peak RSS over the burst, at most (Railway's small instances have 512 MB).
pub const TARGET_PEAK_MIB: f64 = 128.0;
/// How long after the burst the RSS is read.
const SETTLE: Duration = Duration::from_secs(2);
/// One body's answer, at most.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// Phase D's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BodiesReport {
    /// Bodies sent at once.
    pub concurrent: usize,
    /// Each body's size in bytes.
    pub body_bytes: usize,
    /// Answered 401 (refused for the signature, as they must be).
    pub refused: usize,
    /// Answered with another status (503 when the body budget stayed full too long).
    pub other_status: usize,
    /// No answer.
    pub transport_errors: usize,
    /// From the first byte sent to the last answer.
    pub seconds: f64,
    /// The fresh relay's RSS before the burst, MiB.
    pub rss_before_mib: f64,
    /// Its peak RSS over the burst (`VmHWM`), MiB.
    pub peak_rss_mib: f64,
    /// Its RSS after the burst (`VmRSS`), MiB.
    pub rss_after_mib: f64,
}

/// Starts a fresh relay on `database_url`, sends the burst, measures, stops it.
pub async fn run(database_url: &str, logs: &Path) -> Result<BodiesReport, BenchError> {
    // Its own directory: its log beside B and C's, not over it.
    let dir = logs.join("phase-d");
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Spawn {
        what: format!("a log directory {}", dir.display()),
        source,
    })?;
    let mut relay = super::relay::start_relay(database_url, &dir).await?;
    let rss_before_mib = relay.daemon.status_mib("VmRSS:").unwrap_or(0.0);
    let body = std::sync::Arc::new(forged_request());
    let started = Instant::now();
    let sends: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let body = std::sync::Arc::clone(&body);
            tokio::spawn(send(relay.addr, body))
        })
        .collect();
    let mut report = BodiesReport {
        concurrent: CONCURRENT,
        body_bytes: BODY_BYTES,
        refused: 0,
        other_status: 0,
        transport_errors: 0,
        seconds: 0.0,
        rss_before_mib,
        peak_rss_mib: 0.0,
        rss_after_mib: 0.0,
    };
    for send in sends {
        match send.await? {
            Ok(401) => report.refused += 1,
            Ok(_) => report.other_status += 1,
            Err(_) => report.transport_errors += 1,
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    relay.daemon.check_running()?;
    report.peak_rss_mib = relay.daemon.high_water_mib().unwrap_or(0.0);
    tokio::time::sleep(SETTLE).await;
    report.rss_after_mib = relay.daemon.status_mib("VmRSS:").unwrap_or(0.0);
    relay.daemon.stop().await?;
    Ok(report)
}

/// One webhook POST of [`BODY_BYTES`] with a well-formed, wrong signature.
fn forged_request() -> Vec<u8> {
    let head = format!(
        "POST /api/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-Hub-Signature-256: sha256={}\r\nContent-Length: {BODY_BYTES}\r\nConnection: close\r\n\r\n",
        "0".repeat(64)
    );
    let mut request = head.into_bytes();
    request.reserve(BODY_BYTES);
    request.extend_from_slice(b"{\"pad\":\"");
    request.resize(request.len() + BODY_BYTES - 10, b'x');
    request.extend_from_slice(b"\"}");
    request
}

/// Sends `request` on a new connection; the answer's status.
async fn send(addr: SocketAddr, request: std::sync::Arc<Vec<u8>>) -> Result<u16, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut read, mut write) = stream.split();
        let writing = async {
            // The relay may answer before all is written; a closed socket then is fine.
            let _ = write.write_all(&request).await;
        };
        let reading = async {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = read.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed without an answer".to_string());
                }
                head.extend_from_slice(&buf[..n]);
                if let Some(line) = head.split(|b| *b == b'\n').next()
                    && head.contains(&b'\n')
                {
                    let text = String::from_utf8_lossy(line);
                    return text
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("not an HTTP answer: {text}"));
                }
            }
        };
        let ((), status) = tokio::join!(writing, reading);
        status
    };
    tokio::time::timeout(ANSWER_LIMIT, exchange)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

/// The lines phase D adds to the report.
pub fn render(r: &BodiesReport) -> String {
    format!(
        "D  a fresh relay, {} concurrent {} MiB bodies with a wrong signature: {} refused (401), {} other, {} unanswered in {:.1} s\n   \
         RSS {:.1} MiB before, {:.1} MiB {:.0} s after\n\
         peak RSS (D) = {:.1} MiB  (target < {TARGET_PEAK_MIB}: {})\n",
        r.concurrent,
        r.body_bytes / (1024 * 1024),
        r.refused,
        r.other_status,
        r.transport_errors,
        r.seconds,
        r.rss_before_mib,
        r.rss_after_mib,
        SETTLE.as_secs_f64(),
        r.peak_rss_mib,
        if r.peak_rss_mib > 0.0 && r.peak_rss_mib < TARGET_PEAK_MIB && r.refused == r.concurrent {
            "ok"
        } else {
            "MISSED"
        }
    )
}
