//! Delivery of the relay's inbox to the restaurant's backend: real `bite-sync run` processes
//! (pull) and the relay's push worker in-process, against a real mirror and a recording fake
//! backend on loopback. Inbox rows are written with SQL the way the relay writes them (rows
//! and `NOTIFY bite_sync_inbox` in one transaction).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bite_sync::relay::deliver::{self, CHANNEL, IN_FLIGHT};
use bite_sync::relay::settings::{RawDelivery, RawRelay, RelaySettings};
use hmac::{KeyInit, Mac};
use serde_json::json;
use support::{Daemon, FakeHttp, Recorded, TestDbs, bite_sync, connect, test_dbs, wait_for};
use tokio_util::sync::CancellationToken;

const API_KEY: &str = "sync-key-7f3a";
const PATH: &str = "/cloud-sync/webhook";

/// The mirror with bite-sync's bookkeeping (the inbox included).
async fn mirror(dbs: &TestDbs) -> tokio_postgres::Client {
    let mut client = connect(&dbs.mirror_url).await;
    bite_sync::bookkeeping::migrate(&mut client).await.unwrap();
    client
}

/// Stores one message per `(customer, n)` in one transaction with the NOTIFY, as the relay
/// does; returns the ids in order.
async fn store(client: &mut tokio_postgres::Client, items: &[(String, usize)]) -> Vec<i64> {
    let tx = client.transaction().await.unwrap();
    let mut ids = Vec::new();
    for (customer, n) in items {
        let wamid = format!("wamid.{customer}.{n}");
        let item = json!({"from": customer, "id": wamid, "timestamp": "1767225600", "type": "text", "text": {"body": format!("message {n}")}});
        let contact =
            json!({"profile": {"name": format!("Customer {customer}")}, "wa_id": customer});
        let metadata =
            json!({"display_phone_number": "15550783881", "phone_number_id": "106540352242922"});
        let id: i64 = tx
            .query_one(
                "INSERT INTO bite_sync.inbox (kind, dedupe_key, wamid, waba_id, field, metadata, customer, item, contact) \
                 VALUES ('message', $1, $1, '102290129340398', 'messages', $2, $3, $4, $5) RETURNING id",
                &[&wamid, &metadata, customer, &item, &contact],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    tx.batch_execute(&format!("NOTIFY {CHANNEL}"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    ids
}

/// `rows` messages for each of `customers` customers, stored interleaved (customer 0's first,
/// customer 1's first, …) so that each customer's ids are not consecutive.
fn interleaved(customers: usize, rows: usize) -> Vec<(String, usize)> {
    let mut items = Vec::new();
    for n in 0..rows {
        for c in 0..customers {
            items.push((format!("52155{c:08}"), n));
        }
    }
    items
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until every row of the inbox is delivered.
async fn all_delivered(client: &tokio_postgres::Client, within: Duration) {
    wait_for("every inbox row delivered", within, || async {
        (count(
            client,
            "SELECT count(*) FROM bite_sync.inbox WHERE delivery_state = 'pending'",
        )
        .await
            == 0)
            .then_some(())
    })
    .await;
}

/// (customer, inbox id, idempotency key) of a delivery request.
fn what(r: &Recorded) -> (String, i64, String) {
    let body = r.json();
    let customer = body["entry"][0]["changes"][0]["value"]["messages"][0]["from"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = body["bite_sync"]["inbox_id"].as_i64().unwrap();
    (
        customer,
        id,
        r.header("idempotency-key").unwrap_or("").to_owned(),
    )
}

/// A `bite-sync run` delivering to `backend`, delivery only, with short timeouts.
fn start(dbs: &TestDbs, backend: &str, tag: &str) -> Daemon {
    start_with(&dbs.mirror_url, backend, tag, &[])
}

fn start_with(mirror: &str, backend: &str, tag: &str, args: &[&str]) -> Daemon {
    let mut cmd = bite_sync();
    let dir = cmd.get_current_dir().unwrap().to_path_buf();
    std::fs::write(
        dir.join("bite-sync.toml"),
        "[delivery]\ntimeout = \"2s\"\nmax_backoff = \"2s\"\n",
    )
    .unwrap();
    let log = dir.join(format!("{tag}.log"));
    let child = cmd
        .arg("-v")
        .arg("run")
        .args(args)
        .env("BITE_MIRROR_URL", mirror)
        .env("LOCAL_BACKEND_URL", backend)
        .env("SYNC_API_KEY", API_KEY)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn bite-sync run");
    Daemon {
        child: Some(child),
        log,
    }
}

async fn ready(daemon: &Daemon) {
    wait_for("the daemon delivering", Duration::from_secs(20), || async {
        daemon
            .log()
            .contains("delivering inbox rows to the backend")
            .then_some(())
    })
    .await;
}

fn hmac_hex(key: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_message_reaches_the_backend_at_once_signed_and_shaped_like_metas() {
    let dbs = test_dbs("deliver_at_once").await;
    let mut client = mirror(&dbs).await;
    let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = Arc::clone(&arrivals);
    let backend = FakeHttp::with(move |_| {
        seen.lock().unwrap().push(Instant::now());
        (200, json!({"ok": true}))
    })
    .await;
    let mut daemon = start(&dbs, &backend.url, "run");
    ready(&daemon).await;

    // Latency from the commit to the backend, one message at a time.
    let mut latencies = Vec::new();
    for n in 0..5 {
        let stored_at = Instant::now();
        store(&mut client, &[("5215512345678".into(), n)]).await;
        let arrived = wait_for("the delivery request", Duration::from_secs(5), || async {
            arrivals.lock().unwrap().get(n).copied()
        })
        .await;
        latencies.push(arrived.duration_since(stored_at));
    }
    eprintln!("insert+NOTIFY → backend latencies: {latencies:?}");
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(2)),
        "{latencies:?}"
    );

    let requests = backend.requests_to(PATH);
    assert_eq!(requests.len(), 5, "one request per row, no repeats");
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(
        first.header("idempotency-key"),
        Some("wamid.5215512345678.0")
    );
    assert_eq!(first.header("x-api-key"), Some(API_KEY));
    assert_eq!(
        first.header("x-bite-signature-256"),
        Some(hmac_hex(API_KEY, &first.body).as_str()),
        "the signature is HMAC-SHA256(SYNC_API_KEY, body)"
    );
    let id: i64 = client
        .query_one("SELECT min(id) FROM bite_sync.inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        first.header("x-bite-inbox-id"),
        Some(id.to_string().as_str())
    );
    let body = first.json();
    assert_eq!(body["object"], "whatsapp_business_account");
    assert_eq!(body["entry"][0]["id"], "102290129340398");
    let change = &body["entry"][0]["changes"][0];
    assert_eq!(change["field"], "messages");
    assert_eq!(change["value"]["messaging_product"], "whatsapp");
    assert_eq!(
        change["value"]["metadata"]["phone_number_id"],
        "106540352242922"
    );
    assert_eq!(change["value"]["contacts"][0]["wa_id"], "5215512345678");
    assert_eq!(change["value"]["messages"][0]["text"]["body"], "message 0");
    assert_eq!(
        change["value"]["messages"][0]["id"],
        "wamid.5215512345678.0"
    );
    assert_eq!(body["bite_sync"]["inbox_id"], id);
    assert_eq!(body["bite_sync"]["kind"], "message");
    assert_eq!(body["bite_sync"]["answered_by_ai"], false);
    assert!(
        body["bite_sync"]["received_at"]
            .as_str()
            .unwrap()
            .starts_with("20")
    );

    let row = client
        .query_one(
            "SELECT delivery_state, delivered_by, attempts, lease_until IS NULL AND leased_by IS NULL, delivered_at IS NOT NULL \
             FROM bite_sync.inbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "delivered");
    let by: String = row.get(1);
    assert!(
        by.starts_with("pull:") && by.ends_with(&format!(":{}", daemon.pid())),
        "{by}"
    );
    assert_eq!(row.get::<_, i32>(2), 1);
    assert!(row.get::<_, bool>(3) && row.get::<_, bool>(4));

    // Neither the key nor message text in the log.
    let log = daemon.log();
    assert!(
        !log.contains(API_KEY) && !log.contains("message 0"),
        "{log}"
    );
    assert_eq!(
        daemon.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_wait_while_the_backend_is_down_then_arrive_in_order_per_customer() {
    let dbs = test_dbs("deliver_down_then_back").await;
    let mut client = mirror(&dbs).await;
    // 0: answer 500; 1: answer 200 and record (customer, id) as delivered.
    let mode = Arc::new(AtomicU8::new(0));
    let taken = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let (m, t) = (Arc::clone(&mode), Arc::clone(&taken));
    let mut backend = FakeHttp::with(move |r| {
        if m.load(Ordering::SeqCst) == 0 {
            return (500, json!({"error": "database is locked"}));
        }
        let (customer, id, _) = what(r);
        t.lock().unwrap().push((customer, id));
        (200, json!({}))
    })
    .await;
    backend.stop();
    let (customers, per_customer) = (6, 5);
    let ids = store(&mut client, &interleaved(customers, per_customer)).await;
    let mut daemon = start(&dbs, &backend.url, "run");

    // Refused: each customer's first row is tried and fails; later rows wait behind it.
    let heads = "SELECT DISTINCT ON (customer) id FROM bite_sync.inbox ORDER BY customer, id";
    wait_for("every head failing with connection refused", Duration::from_secs(20), || async {
        let n = count(
            &client,
            &format!("SELECT count(*) FROM bite_sync.inbox WHERE id IN ({heads}) AND attempts >= 1 AND last_error = 'connection refused'"),
        )
        .await;
        (n == customers as i64).then_some(())
    })
    .await;
    assert_eq!(
        count(
            &client,
            &format!(
                "SELECT count(*) FROM bite_sync.inbox WHERE id NOT IN ({heads}) AND attempts > 0"
            )
        )
        .await,
        0,
        "a customer's later rows are never tried before the first"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM bite_sync.inbox WHERE delivery_state = 'pending' AND next_attempt_at > last_attempt_at").await,
        customers as i64,
        "failed heads wait for their next attempt"
    );

    // Up but failing: 500s are recorded, nothing is delivered.
    backend.start_again().await;
    wait_for(
        "a head failing with HTTP 500",
        Duration::from_secs(20),
        || async {
            (count(
                &client,
                "SELECT count(*) FROM bite_sync.inbox WHERE last_error = 'HTTP 500'",
            )
            .await
                > 0)
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM bite_sync.inbox WHERE delivery_state = 'delivered'"
        )
        .await,
        0
    );
    let log = daemon.log();
    assert!(
        !log.contains("database is locked"),
        "never the backend's body in the log: {log}"
    );

    // Back: everything arrives, each customer's rows in id order, each once.
    mode.store(1, Ordering::SeqCst);
    all_delivered(&client, Duration::from_secs(30)).await;
    let taken = taken.lock().unwrap().clone();
    assert_eq!(taken.len(), ids.len(), "each row once: {taken:?}");
    let mut per: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (customer, id) in &taken {
        per.entry(customer.clone()).or_default().push(*id);
    }
    assert_eq!(per.len(), customers);
    for (customer, got) in &per {
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, &sorted, "customer {customer}'s rows out of order");
        assert_eq!(got.len(), per_customer);
    }
    let max_attempts = count(&client, "SELECT max(attempts)::bigint FROM bite_sync.inbox").await;
    assert!(max_attempts >= 2, "the heads were retried");
    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_delivery_loses_nothing_and_repeats_only_the_row_in_flight() {
    let dbs = test_dbs("deliver_kill_9").await;
    let mut client = mirror(&dbs).await;
    let backend = FakeHttp::with(|_| {
        // A backend that takes a moment, so the kill lands while requests are in flight.
        std::thread::sleep(Duration::from_millis(15));
        (200, json!({}))
    })
    .await;
    let (customers, per_customer) = (10, 20);
    let ids = store(&mut client, &interleaved(customers, per_customer)).await;
    let mut first = start(&dbs, &backend.url, "first");
    wait_for("40 deliveries", Duration::from_secs(30), || async {
        (backend.requests_to(PATH).len() >= 40).then_some(())
    })
    .await;
    let child = first.child.as_mut().unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    first.child = None;
    let before = backend.requests_to(PATH).len();
    assert!(before < ids.len(), "killed before the end");

    let mut second = start(&dbs, &backend.url, "second");
    // The dead daemon's leases expire (timeout 2 s + margin); then everything is delivered.
    all_delivered(&client, Duration::from_secs(60)).await;
    let requests = backend.requests_to(PATH);
    let mut per: HashMap<String, Vec<i64>> = HashMap::new();
    let mut times: HashMap<i64, usize> = HashMap::new();
    for r in &requests {
        let (customer, id, key) = what(r);
        let expected = format!("wamid.{customer}.");
        assert!(
            key.starts_with(&expected),
            "idempotency key {key} for {customer}"
        );
        per.entry(customer).or_default().push(id);
        *times.entry(id).or_default() += 1;
    }
    let delivered: HashSet<i64> = times.keys().copied().collect();
    assert_eq!(
        delivered,
        ids.iter().copied().collect(),
        "every row reached the backend"
    );
    for (customer, got) in &per {
        assert!(
            got.windows(2).all(|w| w[0] <= w[1]),
            "customer {customer}: {got:?}"
        );
        let repeated = got.windows(2).filter(|w| w[0] == w[1]).count();
        assert!(
            repeated <= 1,
            "customer {customer} got more than the row in flight twice: {got:?}"
        );
    }
    let repeats: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeats.len() <= IN_FLIGHT, "{repeats:?}");
    assert!(repeats.iter().all(|(_, n)| **n == 2), "{repeats:?}");
    eprintln!(
        "{} requests before the kill, {} after; rows delivered twice: {}",
        before,
        requests.len() - before,
        repeats.len()
    );
    assert_eq!(second.terminate(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_share_the_inbox_without_overlap_or_reordering() {
    let dbs = test_dbs("deliver_two_daemons").await;
    let mut client = mirror(&dbs).await;
    // The backend notices a customer's second request arriving before the first finished.
    let busy = Arc::new(Mutex::new(HashSet::<String>::new()));
    let overlaps = Arc::new(Mutex::new(Vec::<String>::new()));
    let (b, o) = (Arc::clone(&busy), Arc::clone(&overlaps));
    let backend = FakeHttp::with(move |r| {
        let (customer, _, _) = what(r);
        if !b.lock().unwrap().insert(customer.clone()) {
            o.lock().unwrap().push(customer.clone());
        }
        std::thread::sleep(Duration::from_millis(20));
        b.lock().unwrap().remove(&customer);
        (200, json!({}))
    })
    .await;
    let mut one = start(&dbs, &backend.url, "one");
    let mut two = start(&dbs, &backend.url, "two");
    ready(&one).await;
    ready(&two).await;
    let (customers, per_customer) = (12, 8);
    let ids = store(&mut client, &interleaved(customers, per_customer)).await;
    all_delivered(&client, Duration::from_secs(60)).await;

    assert_eq!(
        overlaps.lock().unwrap().clone(),
        Vec::<String>::new(),
        "a customer's rows delivered concurrently"
    );
    let requests = backend.requests_to(PATH);
    assert_eq!(requests.len(), ids.len(), "each row once");
    let mut per: HashMap<String, Vec<i64>> = HashMap::new();
    for r in &requests {
        let (customer, id, _) = what(r);
        per.entry(customer).or_default().push(id);
    }
    for (customer, got) in &per {
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "customer {customer}: {got:?}"
        );
    }
    let by: Vec<String> = client
        .query("SELECT DISTINCT delivered_by FROM bite_sync.inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(by.len(), 2, "both daemons delivered: {by:?}");
    assert_eq!(one.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(two.terminate(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let dbs = test_dbs("deliver_sigterm").await;
    let mut client = mirror(&dbs).await;
    let started = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&started);
    let backend = FakeHttp::with(move |_| {
        s.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1200));
        (200, json!({}))
    })
    .await;
    let mut daemon = start(&dbs, &backend.url, "run");
    ready(&daemon).await;
    store(&mut client, &[("5215500000001".into(), 0)]).await;
    wait_for("the request to start", Duration::from_secs(5), || async {
        started.load(Ordering::SeqCst).then_some(())
    })
    .await;
    let asked = Instant::now();
    assert_eq!(
        daemon.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.log()
    );
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert_eq!(
        count(&client, "SELECT count(*) FROM bite_sync.inbox WHERE delivery_state = 'delivered' AND attempts = 1").await,
        1,
        "the request in flight was finished and recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_without_the_inbox_is_said_clearly_and_delivery_starts_once_it_exists() {
    let dbs = test_dbs("deliver_no_inbox").await;
    let backend = FakeHttp::start().await;
    let mut daemon = start(&dbs, &backend.url, "run");
    wait_for(
        "the missing inbox in the log",
        Duration::from_secs(20),
        || async {
            daemon
                .log()
                .contains("no inbox (table bite_sync.inbox)")
                .then_some(())
        },
    )
    .await;
    let log = daemon.log();
    assert!(log.contains("bite-sync run --init"), "{log}");
    assert!(daemon.is_running(), "it keeps retrying: {log}");
    // The relay (or `run --init`) creates the inbox: delivery picks up by itself.
    let mut client = mirror(&dbs).await;
    store(&mut client, &[("5215500000002".into(), 0)]).await;
    all_delivered(&client, Duration::from_secs(30)).await;
    assert_eq!(backend.requests_to(PATH).len(), 1);
    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));
}

#[test]
fn run_without_anything_to_do_or_without_a_mirror_exits_2() {
    let out = bite_sync()
        .arg("run")
        .env("LOCAL_BACKEND_URL", "http://127.0.0.1:9/api")
        .env("SYNC_ENABLED", "false")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing to run")
            && err.contains("no WhatsApp delivery (set LOCAL_BACKEND_URL"),
        "{err}"
    );

    let out = bite_sync()
        .arg("run")
        .env("LOCAL_BACKEND_URL", "http://127.0.0.1:9/api")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reads the inbox on the mirror: pass --mirror URL"),
        "{err}"
    );
}

/// The relay's settings in push mode to `backend`, with a 10 s timeout the push caps at 3 s.
fn push_settings(backend: &str, mode: &str) -> Arc<RelaySettings> {
    let env = |name: &str| match name {
        "LOCAL_BACKEND_URL" => Some(backend.to_owned()),
        "DELIVERY_MODE" => Some(mode.to_owned()),
        "SYNC_API_KEY" => Some(API_KEY.to_owned()),
        "RAILWAY_REPLICA_ID" => Some("replica-a".to_owned()),
        _ => None,
    };
    let raw = RawDelivery {
        timeout: Some("10s".into()),
        max_backoff: Some("2s".into()),
        ..RawDelivery::default()
    };
    Arc::new(RelaySettings::resolve(&RawRelay::default(), &raw, None, &env).unwrap())
}

fn pool(dbs: &TestDbs) -> bite_sync::relay::db::Pool {
    let url =
        bite_sync::pg::connect::DbUrl::parse(bite_sync::pg::connect::Role::Mirror, &dbs.mirror_url)
            .unwrap();
    bite_sync::relay::db::pool(&url, 4, Duration::from_secs(5))
}

/// A backend on loopback that, while `hang` is set, reads each request and never answers
/// (holding the connection open without blocking any thread), else answers 200. Returns its
/// URL, when it first received a request while hanging, and how many it answered.
async fn hanging_backend(
    hang: Arc<AtomicBool>,
) -> (String, Arc<Mutex<Option<Instant>>>, Arc<AtomicU8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let entered = Arc::new(Mutex::new(None));
    let answered = Arc::new(AtomicU8::new(0));
    let (e, a) = (Arc::clone(&entered), Arc::clone(&answered));
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let (hang, e, a) = (Arc::clone(&hang), Arc::clone(&e), Arc::clone(&a));
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // The head and the body (content-length), then the decision.
                loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                if hang.load(Ordering::SeqCst) {
                    e.lock().unwrap().get_or_insert_with(Instant::now);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                a.fetch_add(1, Ordering::SeqCst);
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    )
                    .await;
            });
        }
    });
    (url, entered, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_push_worker_gives_up_on_a_hanging_backend_after_3s_and_delivers_on_a_later_attempt() {
    let dbs = test_dbs("deliver_push_hang").await;
    let mut client = mirror(&dbs).await;
    let hang = Arc::new(AtomicBool::new(true));
    let (backend_url, entered, answered) = hanging_backend(Arc::clone(&hang)).await;
    let settings = push_settings(&backend_url, "push");
    let wake = Arc::new(tokio::sync::Notify::new());
    let cancel = CancellationToken::new();
    let worker = tokio::spawn(deliver::run_push(
        pool(&dbs),
        settings,
        Arc::clone(&wake),
        cancel.clone(),
    ));

    let id = store(&mut client, &[("5215500000003".into(), 0)]).await[0];
    wake.notify_one();
    let gave_up = wait_for("the attempt to time out", Duration::from_secs(15), || async {
        let row = client
            .query_one("SELECT last_error, delivery_state, attempts, lease_until IS NULL AND leased_by IS NULL FROM bite_sync.inbox WHERE id = $1", &[&id])
            .await
            .unwrap();
        row.get::<_, Option<String>>(0).map(|e| (e, row.get::<_, String>(1), row.get::<_, i32>(2), row.get::<_, bool>(3), Instant::now()))
    })
    .await;
    let (error, state, attempts, released, at) = gave_up;
    assert_eq!(
        (error.as_str(), state.as_str(), attempts, released),
        ("timeout", "pending", 1, true)
    );
    let waited = at.duration_since(
        entered
            .lock()
            .unwrap()
            .expect("the backend saw the request"),
    );
    eprintln!("push gave up after {waited:?}");
    assert!(
        waited >= Duration::from_millis(2800) && waited < Duration::from_millis(4500),
        "{waited:?}"
    );

    hang.store(false, Ordering::SeqCst);
    all_delivered(&client, Duration::from_secs(15)).await;
    let row = client
        .query_one(
            "SELECT attempts, delivered_by FROM bite_sync.inbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(row.get::<_, String>(1), "push:replica-a");
    assert_eq!(answered.load(Ordering::SeqCst), 1);

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the push worker stops when cancelled")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_worker_does_nothing_in_pull_mode() {
    let backend = FakeHttp::start().await;
    let settings = push_settings(&backend.url, "pull");
    // A pool to nowhere: it must not even be used.
    let url = bite_sync::pg::connect::DbUrl::parse(
        bite_sync::pg::connect::Role::Mirror,
        "postgres://bite@127.0.0.1:1/bite?sslmode=disable",
    )
    .unwrap();
    let pool = bite_sync::relay::db::pool(&url, 1, Duration::from_secs(1));
    let run = deliver::run_push(
        pool,
        settings,
        Arc::new(tokio::sync::Notify::new()),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(2), run)
        .await
        .expect("returns at once in pull mode");
    assert!(backend.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_database_connection_is_retried_and_nothing_is_missed() {
    let dbs = test_dbs("deliver_db_lost").await;
    let mut client = mirror(&dbs).await;
    let backend = FakeHttp::start().await;
    let mut daemon = start(&dbs, &backend.url, "run");
    ready(&daemon).await;
    // The cloud database drops the daemon's connection (a restart, a failover).
    let killed = count(
        &client,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'bite-sync'",
    )
    .await;
    assert_eq!(killed, 1, "the daemon's one connection");
    wait_for("the daemon to notice", Duration::from_secs(10), || async {
        daemon
            .log()
            .contains("delivery interrupted; retrying")
            .then_some(())
    })
    .await;
    // Stored while it may still be reconnecting: the NOTIFY can be missed, the row cannot.
    store(&mut client, &[("5215500000004".into(), 0)]).await;
    all_delivered(&client, Duration::from_secs(15)).await;
    assert!(daemon.is_running());
    assert_eq!(backend.requests_to(PATH).len(), 1);
    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));
}
