//! The relay as the public internet meets it: real relay processes on loopback, real
//! PostgreSQL. Slow and silent clients (a slowloris of hundreds of connections against a
//! relay with 256 descriptors), header, body and idle timeouts, bodies refused before or
//! while they stream in and the memory they may hold, what the public health and status
//! endpoints say when the database is gone, and the mirror's lag while the source is idle.

mod support;

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bite_sync::relay::signature::sign;
use serde_json::Value;
use support::{Daemon, bite_sync, connect, test_dbs, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_SECRET: &str = "app-secret-public";

struct Relay {
    daemon: Daemon,
    url: String,
    addr: std::net::SocketAddr,
    _config: tempfile::TempDir,
}

impl Relay {
    /// A relay on `database` with `config` as its bite-sync.toml and, when given, at most
    /// `nofile` descriptors (`ulimit -n`).
    async fn start(database: &str, config: &str, nofile: Option<u64>) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bite-sync.toml");
        std::fs::write(&file, config).unwrap();
        let env = [
            ("DATABASE_URL", database.to_string()),
            ("WHATSAPP_VERIFY_TOKEN", "verify".to_string()),
            ("META_APP_SECRET", APP_SECRET.to_string()),
            ("BITE_CONFIG", file.display().to_string()),
        ];
        let (daemon, url) = support::start_relay_with(&env, |cmd| {
            if let Some(n) = nofile {
                // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
                unsafe {
                    cmd.pre_exec(move || {
                        let limit = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        })
        .await;
        let addr = url.trim_start_matches("http://").parse().unwrap();
        Relay {
            daemon,
            url,
            addr,
            _config: dir,
        }
    }

    async fn get(&self, path: &str, within: Duration) -> Result<(u16, Value), String> {
        let client = reqwest::Client::builder()
            .timeout(within)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let resp = client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    fn kib(&self, key: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.daemon.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in the relay's status"))
    }
}

/// Reads until the peer closes (Ok(bytes read)) or `within` passes (Err).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<usize, String> {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .map_err(|_| format!("still open after {within:?}"))
}

/// The status code of the first response on `stream`, if one comes within `within`.
async fn status_within(stream: &mut TcpStream, within: Duration) -> Option<u16> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
            if head.contains(&b'\n') {
                let line = String::from_utf8_lossy(&head);
                return line.split_whitespace().nth(1)?.parse().ok();
            }
        }
    })
    .await
    .ok()
    .flatten()
}

// ---- connections (issue 12.9) ----

/// Hundreds of slow and silent connections against a relay allowed 256 descriptors (it used
/// to stop answering at 373 idle connections: `accept error: Too many open files`): health
/// keeps answering, and so do webhooks, while the flood goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_keeps_answering_under_a_slowloris_with_256_descriptors() {
    let dbs = test_dbs("public_slowloris").await;
    // Timeouts long enough that only the connection limit can save the relay.
    let config = "[relay]\nheader_timeout = \"10m\"\nidle_timeout = \"10m\"\n";
    let relay = Relay::start(&dbs.mirror_url, config, Some(256)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..400 {
        let (stop, opened, addr) = (Arc::clone(&stop), Arc::clone(&opened), relay.addr);
        flood.push(tokio::spawn(async move {
            // Each attacker reconnects when the relay closes it, until the test ends.
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                if i % 4 == 0 {
                    // Silent: connects and sends nothing.
                    let _ = closed_within(&mut s, Duration::from_secs(60)).await;
                    continue;
                }
                // Slow: a request head, a header line now and then, never the end.
                if s.write_all(b"POST /api/webhook HTTP/1.1\r\nHost: relay\r\n")
                    .await
                    .is_err()
                {
                    continue;
                }
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    n += 1;
                    if s.write_all(format!("X-Slow-{n}: 1\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }));
    }
    wait_for(
        "400 attacker connections",
        Duration::from_secs(30),
        || async { (opened.load(Ordering::Relaxed) >= 400).then_some(()) },
    )
    .await;
    // A moment for the relay to have accepted what it can.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 0..10 {
        let started = Instant::now();
        let (status, body) = relay
            .get("/api/sync/health", Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", relay.daemon.log()));
        assert_eq!(status, 200, "round {round}: {body}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A webhook gets in too (refused for its signature, but answered).
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        s.write_all(b"POST /api/webhook HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\n\r\n{}")
            .await
            .unwrap();
        assert_eq!(
            status_within(&mut s, Duration::from_secs(5)).await,
            Some(401),
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        task.abort();
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", relay.daemon.pid()))
        .unwrap()
        .count();
    assert!(fds < 256, "{fds} descriptors open");
    assert!(
        !relay.daemon.log().contains("Too many open files") || fds < 256,
        "{}",
        relay.daemon.log()
    );
}

/// A silent connection, a head that trickles in, a body that never completes and an idle
/// keep-alive connection are each closed after their timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_after_their_timeouts() {
    let dbs = test_dbs("public_timeouts").await;
    let config = "[relay]\nheader_timeout = \"1s\"\nbody_timeout = \"2s\"\nidle_timeout = \"5s\"\n";
    let relay = Relay::start(&dbs.mirror_url, config, None).await;
    let limit = Duration::from_secs(8);

    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    let mut trickle = TcpStream::connect(relay.addr).await.unwrap();
    let trickling = tokio::spawn(async move {
        let _ = trickle
            .write_all(b"GET /api/sync/health HTTP/1.1\r\n")
            .await;
        for n in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle
                .write_all(format!("X-{n}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        closed_within(&mut trickle, Duration::ZERO).await.map(drop)
    });
    assert!(
        closed_within(&mut silent, limit).await.is_ok(),
        "a silent connection stays open"
    );
    trickling
        .await
        .unwrap()
        .expect("a head trickling in stays open");

    // A signed-looking webhook whose body stops halfway: 408 after the body timeout.
    let mut slow_body = TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST /api/webhook HTTP/1.1\r\nHost: relay\r\nX-Hub-Signature-256: {}\r\nContent-Length: 1000\r\n\r\n{{\"object\":",
        sign(APP_SECRET.as_bytes(), b"x")
    );
    slow_body.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(status_within(&mut slow_body, limit).await, Some(408));

    // Keep-alive: a second request after 2 s on the same connection (longer than the head
    // timeout: idle is not a slow head), then closed once idle for 5 s.
    let mut keep = TcpStream::connect(relay.addr).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n";
    keep.write_all(request).await.unwrap();
    assert_eq!(status_within(&mut keep, limit).await, Some(200));
    tokio::time::sleep(Duration::from_secs(2)).await;
    keep.write_all(request).await.unwrap();
    assert_eq!(status_within(&mut keep, limit).await, Some(200));
    let idle_since = Instant::now();
    closed_within(&mut keep, Duration::from_secs(15))
        .await
        .expect("an idle keep-alive connection stays open");
    assert!(
        idle_since.elapsed() >= Duration::from_secs(4),
        "closed after {:?} idle",
        idle_since.elapsed()
    );
}

// ---- bodies (issue 12.10) ----

/// A webhook without a signature is refused as soon as its head is read: the relay does not
/// wait for (or hold) its 4 MiB body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_body_is_refused_before_it_is_read() {
    let dbs = test_dbs("public_unsigned").await;
    let relay = Relay::start(&dbs.mirror_url, "", None).await;
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(
        b"POST /api/webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: 4194304\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(
        status_within(&mut s, Duration::from_secs(5)).await,
        Some(401),
        "answered without the body"
    );
}

/// Sixty concurrent 4 MiB bodies with a well-formed but wrong signature (240 MiB offered,
/// which the relay must read to refuse): every one is refused, and the relay's memory grows
/// by far less than what was offered, because bodies being read share a bounded budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_forged_bodies_are_read_within_a_memory_budget() {
    let dbs = test_dbs("public_forged_bodies").await;
    let relay = Relay::start(&dbs.mirror_url, "", None).await;
    // Warm up the relay's allocator and pool with one small webhook.
    let warm = TcpStream::connect(relay.addr).await;
    drop(warm);
    let before = relay.kib("VmRSS:");
    let size = 4 * 1024 * 1024;
    let mut request = format!(
        "POST /api/webhook HTTP/1.1\r\nHost: relay\r\nX-Hub-Signature-256: sha256={}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n",
        "a".repeat(64)
    )
    .into_bytes();
    request.resize(request.len() + size, b' ');
    let request = Arc::new(request);
    let sends: Vec<_> = (0..60)
        .map(|_| {
            let (request, addr) = (Arc::clone(&request), relay.addr);
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let (mut r, mut w) = s.split();
                let write = async {
                    let _ = w.write_all(&request).await;
                };
                let read = async {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = r.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return None;
                        }
                        head.extend_from_slice(&buf[..n]);
                        if head.contains(&b'\n') {
                            let line = String::from_utf8_lossy(&head).to_string();
                            return line.split_whitespace().nth(1)?.parse::<u16>().ok();
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(60), async {
                    tokio::join!(write, read).1
                })
                .await
                .ok()
                .flatten()
            })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap(), Some(401));
    }
    let peak = relay.kib("VmHWM:");
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("forged bodies: relay RSS {before} KiB before, peak {peak} KiB (+{grown_mib} MiB)");
    assert!(
        grown_mib < 96,
        "the relay's peak RSS grew by {grown_mib} MiB for 240 MiB of forged bodies"
    );
    assert!(relay.daemon.log().contains("webhook refused"));
}

// ---- public answers (issue 12.14) ----

/// Health, status and the webhook say "database unreachable" when it is, never the
/// database's host, port, name, user or PostgreSQL's own words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_answers_never_show_the_database() {
    let dbs = test_dbs("public_db_details").await;
    let cluster = &support::clusters().mirror;
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.port()).parse().unwrap();
    let proxy = bite_sync::proxy::Proxy::start(target).await.unwrap();
    let url = format!(
        "postgres://bite_relay_user@{}/{}?sslmode=disable",
        proxy.addr(),
        dbs.name
    );
    let admin = connect(&dbs.mirror_url).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE bite_relay_user LOGIN SUPERUSER; GRANT ALL ON DATABASE \"{}\" TO bite_relay_user",
            dbs.name
        ))
        .await
        .ok();
    let relay = Relay::start(&url, "", None).await;
    assert_eq!(
        relay
            .get("/api/sync/health", Duration::from_secs(10))
            .await
            .unwrap()
            .0,
        200
    );
    proxy.set_refusing(true);
    proxy.cut();
    let body = support::payload("text.json");
    let webhook = reqwest::Client::new()
        .post(format!("{}/api/webhook", relay.url))
        .header("x-hub-signature-256", sign(APP_SECRET.as_bytes(), &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(webhook.status(), 503);
    let webhook: Value = webhook.json().await.unwrap();
    let (health_status, health) = relay
        .get("/api/sync/health", Duration::from_secs(20))
        .await
        .unwrap();
    let (status_status, status) = relay
        .get("/api/webhook/status", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!((health_status, status_status), (503, 503));
    for answer in [&health, &status, &webhook] {
        assert_eq!(answer["error"], "database unreachable", "{answer}");
        let text = answer.to_string();
        for secret in [
            proxy.addr().to_string(),
            proxy.addr().port().to_string(),
            dbs.name.clone(),
            "bite_relay_user".to_string(),
            "127.0.0.1".to_string(),
            "refused".to_string(),
        ] {
            assert!(!text.contains(&secret), "{secret} in {text}");
        }
    }
    // The detail is in the log, for the operator.
    assert!(relay.daemon.log().contains("database unreachable"));
}

// ---- lag (issue 13.7) ----

/// A caught-up source that stays idle: health says lag 0 (it used to count from the last
/// commit, 83 s after a quiet minute); once the daemon is gone its mark ages and lag counts
/// from when the mirror was last known complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_no_lag_while_an_idle_source_is_caught_up() {
    let dbs = test_dbs("public_idle_lag").await;
    let source = connect(&dbs.source_url).await;
    let mirror = connect(&dbs.mirror_url).await;
    source
        .batch_execute("CREATE TABLE menu (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let log = bite_sync().get_current_dir().unwrap().join("run.log");
    let mut daemon = Daemon::new(log.clone());
    daemon.child = Some(
        bite_sync()
            .args([
                "run",
                "--init",
                "--source",
                &dbs.source_url,
                "--mirror",
                &dbs.mirror_url,
            ])
            .args([
                "--tables",
                "menu",
                "--slot",
                &dbs.name,
                "--publication",
                &dbs.name,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let relay = Relay::start(&dbs.mirror_url, "", None).await;
    wait_for("the daemon to stream", Duration::from_secs(60), || async {
        mirror
            .query_opt("SELECT 1 FROM bite_sync.replication_state", &[])
            .await
            .ok()
            .flatten()
            .map(drop)
    })
    .await;
    source
        .batch_execute("INSERT INTO menu VALUES (1, 'Paella')")
        .await
        .unwrap();
    let committed = Instant::now();
    wait_for("the row on the mirror", Duration::from_secs(30), || async {
        mirror
            .query_opt("SELECT 1 FROM public.menu WHERE id = 1", &[])
            .await
            .ok()
            .flatten()
            .map(drop)
    })
    .await;
    // A quiet while, longer than any apply delay: the mirror is not behind.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(committed.elapsed())).await;
    let (status, health) = relay
        .get("/api/sync/health", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(status, 200, "{health}");
    let slot = &health["mirror"][0];
    assert_eq!(slot["lag_seconds"], 0.0, "{health}\n{}", daemon.log());
    assert_eq!(slot["failing"], false, "{health}");
    assert!(
        slot["seconds_since_applied"].as_f64().unwrap() < 12.0,
        "{health}"
    );

    // The daemon stops; its last mark says when the mirror was last known complete.
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
    mirror
        .batch_execute("UPDATE bite_sync.replication_state SET applied_at = now() - interval '6 minutes', caught_up_at = now() - interval '5 minutes'")
        .await
        .unwrap();
    let (_, health) = relay
        .get("/api/sync/health", Duration::from_secs(10))
        .await
        .unwrap();
    let lag = health["mirror"][0]["lag_seconds"].as_f64().unwrap();
    assert!((295.0..400.0).contains(&lag), "{health}");
}
