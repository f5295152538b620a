//! `bite-sync relay` as Meta sees it: real relay processes on loopback, a real PostgreSQL
//! database for the inbox, Meta's sample payloads signed with a test secret.

mod support;

use std::time::Duration;

use bite_sync::relay::signature::sign;
use serde_json::{Value, json};
use support::{Daemon, count, strings, test_dbs, wait_for};

const VERIFY_TOKEN: &str = "verify-token-3f9a";
const APP_SECRET: &str = "app-secret-7c1e";

/// The payloads in tests/payloads, by file name.
fn sample(name: &str) -> Vec<u8> {
    support::payload(name)
}

const SAMPLES: &[&str] = &[
    "text.json",
    "location.json",
    "statuses.json",
    "interactive.json",
    "image.json",
    "unsupported.json",
];

/// A relay process and its base URL.
struct Relay {
    daemon: Daemon,
    url: String,
}

impl Relay {
    async fn start(database_url: &str, extra: &[(&str, &str)]) -> Relay {
        let mut env = vec![
            ("DATABASE_URL", database_url.to_string()),
            ("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.to_string()),
            ("META_APP_SECRET", APP_SECRET.to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let (daemon, url) = support::start_relay(&env).await;
        Relay { daemon, url }
    }

    async fn post(&self, body: &[u8], signature: Option<&str>) -> reqwest::Response {
        let mut req = client()
            .post(format!("{}/api/webhook", self.url))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header("X-Hub-Signature-256", s);
        }
        req.send().await.expect("POST /api/webhook")
    }

    async fn post_signed(&self, body: &[u8]) -> reqwest::Response {
        self.post(body, Some(&sign(APP_SECRET.as_bytes(), body)))
            .await
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn metas_verification_echoes_the_challenge_and_refuses_a_wrong_token() {
    let dbs = test_dbs("relay_verify").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let get = |query: String| {
        let url = format!("{}/api/webhook?{query}", relay.url);
        async move { client().get(url).send().await.unwrap() }
    };
    let ok = get(format!(
        "hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444"
    ))
    .await;
    assert_eq!(ok.status(), 200);
    assert!(
        ok.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(
        ok.text().await.unwrap(),
        "1158201444",
        "echoed byte for byte, not JSON"
    );
    // A challenge that is not a number stays as it is.
    let odd = get(format!(
        "hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=abc%2Fxyz"
    ))
    .await;
    assert_eq!(odd.text().await.unwrap(), "abc/xyz");
    for bad in [
        "hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1".to_string(),
        format!("hub.mode=unsubscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1"),
        format!("hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}"),
        "hub.challenge=1".to_string(),
        format!("hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}x&hub.challenge=1"),
    ] {
        assert_eq!(get(bad.clone()).await.status(), 403, "{bad}");
    }
    assert!(
        !relay.daemon.log().contains(VERIFY_TOKEN),
        "the token is never logged"
    );
}

#[tokio::test]
async fn every_sample_payload_is_stored_once_and_acknowledged() {
    let dbs = test_dbs("relay_samples").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    for name in SAMPLES {
        let resp = relay.post_signed(&sample(name)).await;
        assert_eq!(resp.status(), 200, "{name}");
    }
    // Meta's samples: 5 messages, 3 statuses.
    let rows = db
        .query(
            "SELECT kind, dedupe_key, customer, customer_name, item_type, body \
             FROM bite_sync.inbox ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let kinds: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        kinds,
        [
            "message", "message", "status", "status", "status", "message", "message", "message"
        ]
    );
    let text = &rows[0];
    assert_eq!(text.get::<_, String>(2), "16505551234");
    assert_eq!(
        text.get::<_, Option<String>>(3).as_deref(),
        Some("Sheena Nelson")
    );
    assert_eq!(
        text.get::<_, Option<String>>(5).as_deref(),
        Some("Does it come in another color?")
    );
    let image = &rows[6];
    assert_eq!(
        image.get::<_, Option<String>>(5).as_deref(),
        Some("¿Tenéis este postre? / 100% sin gluten @ casa"),
        "escaped characters survive: the signature was checked on the raw bytes"
    );
    assert_eq!(
        rows[7].get::<_, Option<String>>(4).as_deref(),
        Some("unsupported")
    );
    // Meta retries everything: nothing new.
    for name in SAMPLES {
        assert_eq!(relay.post_signed(&sample(name)).await.status(), 200);
    }
    assert_eq!(count(&db, "SELECT count(*) FROM bite_sync.inbox").await, 8);
    let (status, body) = relay.get_json("/api/webhook/status").await;
    assert_eq!(status, 200);
    let c = &body["counters"];
    assert_eq!(c["received"], 8);
    assert_eq!(c["messages"], 5);
    assert_eq!(c["statuses"], 3);
    assert_eq!(c["duplicates"], 8);
    assert_eq!(c["pending"], 8);
    assert_eq!(c["dead_lettered"], 0);
    assert!(c["last_received_at"].is_string());
    // Every row notified the delivery channel? The message items keep Meta's JSON as sent.
    let item: Value = db
        .query_one(
            "SELECT item FROM bite_sync.inbox WHERE item_type = 'location'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(item["location"]["name"], "Philz Coffee");
}

#[tokio::test]
async fn bad_signatures_are_refused_and_nothing_is_stored() {
    let dbs = test_dbs("relay_signatures").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let body = sample("text.json");
    let good = sign(APP_SECRET.as_bytes(), &body);
    let wrong_secret = sign(b"not-the-app-secret", &body);
    let truncated = good[..good.len() - 2].to_string();
    let no_prefix = good.trim_start_matches("sha256=").to_string();
    let sha1 = "sha1=2fd4e1c67a2d28fced849ee1bb76e7391b93eb12".to_string();
    for (what, sig) in [
        ("missing", None),
        ("wrong secret", Some(wrong_secret.as_str())),
        ("truncated", Some(truncated.as_str())),
        ("no sha256= prefix", Some(no_prefix.as_str())),
        ("legacy sha1", Some(sha1.as_str())),
    ] {
        assert_eq!(relay.post(&body, sig).await.status(), 401, "{what}");
    }
    // Signed, then changed on the way: a re-serialized body does not pass either.
    let reserialized =
        serde_json::to_vec(&serde_json::from_slice::<Value>(&body).unwrap()).unwrap();
    assert_eq!(relay.post(&reserialized, Some(&good)).await.status(), 401);
    assert_eq!(count(&db, "SELECT count(*) FROM bite_sync.inbox").await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM bite_sync.inbox_dead_letters").await,
        0
    );
    // The failures are counted.
    wait_for(
        "the signature failures to be counted",
        Duration::from_secs(15),
        || async {
            let (_, body) = relay.get_json("/api/webhook/status").await;
            (body["counters"]["signature_failures"] == 6).then_some(())
        },
    )
    .await;
    let log = relay.daemon.log();
    assert!(log.contains("webhook refused"), "{log}");
    assert!(
        !log.contains(APP_SECRET) && !log.contains(&good[7..]),
        "{log}"
    );
}

#[tokio::test]
async fn a_body_over_4_mb_is_refused_with_413() {
    let dbs = test_dbs("relay_too_big").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let padding = "x".repeat(5 * 1024 * 1024);
    let body = json!({"object": "whatsapp_business_account", "entry": [], "pad": padding})
        .to_string()
        .into_bytes();
    let resp = relay.post_signed(&body).await;
    assert_eq!(resp.status(), 413);
    // 3 MB (Meta's maximum) is fine.
    let mut big: Value = serde_json::from_slice(&sample("text.json")).unwrap();
    big["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"] =
        Value::from("y".repeat(3 * 1024 * 1024));
    let body = serde_json::to_vec(&big).unwrap();
    assert_eq!(relay.post_signed(&body).await.status(), 200);
    assert_eq!(count(&db, "SELECT count(*) FROM bite_sync.inbox").await, 1);
}

#[tokio::test]
async fn signed_bodies_that_cannot_be_read_are_dead_lettered_and_acknowledged() {
    let dbs = test_dbs("relay_dead_letters").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let not_json = b"{\"object\": \"whatsapp_business_account\", \"entry\": [".to_vec();
    let other_shape = br#"{"object":"instagram","entry":[]}"#.to_vec();
    let half_bad = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
        {"field": "messages", "value": {"messages": [
            {"from": "34600000001", "timestamp": "1", "type": "text", "text": {"body": "no id"}},
            {"from": "34600000001", "id": "wamid.kept", "timestamp": "1", "type": "text", "text": {"body": "kept"}}]}}]}]})
    .to_string()
    .into_bytes();
    for body in [&not_json, &other_shape, &half_bad] {
        assert_eq!(relay.post_signed(body).await.status(), 200);
    }
    // Meta would retry nothing, but a retry is kept once.
    assert_eq!(relay.post_signed(&not_json).await.status(), 200);
    let reasons = strings(
        &db,
        "SELECT reason FROM bite_sync.inbox_dead_letters ORDER BY id",
    )
    .await;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].starts_with("not valid JSON"), "{reasons:?}");
    assert!(reasons[1].contains("\"instagram\""), "{reasons:?}");
    assert!(reasons[2].contains("messages[0]: no \"id\""), "{reasons:?}");
    let body: Vec<u8> = db
        .query_one(
            "SELECT body FROM bite_sync.inbox_dead_letters ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, not_json, "kept byte for byte");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM bite_sync.inbox WHERE dedupe_key = 'wamid.kept'"
        )
        .await,
        1
    );
    let (_, status) = relay.get_json("/api/webhook/status").await;
    assert_eq!(status["counters"]["dead_lettered"], 3);
}

#[tokio::test]
async fn the_same_payload_posted_100_times_at_once_is_one_row() {
    let dbs = test_dbs("relay_concurrent_dupes").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let body = sample("text.json");
    let posts = (0..100).map(|_| relay.post_signed(&body));
    let statuses: Vec<u16> = futures_util::future::join_all(posts)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM bite_sync.inbox").await, 1);
    let (_, status) = relay.get_json("/api/webhook/status").await;
    assert_eq!(status["counters"]["received"], 1);
    assert_eq!(status["counters"]["duplicates"], 99);
}

/// A batch like Meta's (up to 1000 updates): every message and status a row, in order.
#[tokio::test]
async fn a_batch_of_many_messages_and_statuses_is_stored_whole() {
    let dbs = test_dbs("relay_batch").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let changes: Vec<Value> = (0..10)
        .map(|c| {
            let messages: Vec<Value> = (0..50)
                .map(|m| json!({"from": format!("3460000{c:04}"), "id": format!("wamid.batch.{c}.{m}"),
                                 "timestamp": "1749416383", "type": "text", "text": {"body": format!("m{m}")}}))
                .collect();
            let statuses: Vec<Value> = (0..50)
                .map(|s| json!({"id": format!("wamid.out.{c}.{s}"), "status": "delivered",
                                 "timestamp": "1749416383", "recipient_id": format!("3460000{c:04}")}))
                .collect();
            json!({"field": "messages", "value": {"messaging_product": "whatsapp",
                   "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
                   "contacts": [{"wa_id": format!("3460000{c:04}"), "profile": {"name": format!("C{c}")}}],
                   "messages": messages, "statuses": statuses}})
        })
        .collect();
    let body =
        json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": changes}]})
            .to_string()
            .into_bytes();
    assert_eq!(relay.post_signed(&body).await.status(), 200);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM bite_sync.inbox WHERE kind = 'message'"
        )
        .await,
        500
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM bite_sync.inbox WHERE kind = 'status'"
        )
        .await,
        500
    );
    // Each customer's messages are in payload order.
    let out_of_order = count(
        &db,
        "SELECT count(*) FROM (SELECT body, lag(body) OVER (PARTITION BY customer ORDER BY id) AS prev \
         FROM bite_sync.inbox WHERE kind = 'message') x \
         WHERE substr(body, 2)::int < substr(prev, 2)::int",
    )
    .await;
    assert_eq!(out_of_order, 0);
    let named = count(
        &db,
        "SELECT count(*) FROM bite_sync.inbox WHERE kind = 'message' AND customer_name = 'C' || (right(customer, 4)::int)",
    )
    .await;
    assert_eq!(named, 500);
}

#[tokio::test]
async fn health_reports_mirror_freshness_and_503_when_the_database_is_down() {
    let dbs = test_dbs("relay_health").await;
    let cluster = &support::clusters().mirror;
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.port()).parse().unwrap();
    let proxy = bite_sync::proxy::Proxy::start(target).await.unwrap();
    let via_proxy = format!(
        "postgres://postgres@{}/{}?sslmode=disable",
        proxy.addr(),
        dbs.name
    );
    let relay = Relay::start(&via_proxy, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let (status, body) = relay.get_json("/api/sync/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["database"], "up");
    assert_eq!(body["mirror"], json!([]), "no replication yet");
    db.batch_execute(
        "INSERT INTO bite_sync.replication_state (slot_name, publication, source_system_identifier, \
             source_database, lsn, source_commit_time, applied_at) \
         VALUES ('bite_sync', 'bite_sync', '1', 'bite', '0/16B3748', now() - interval '3 seconds', now())",
    )
    .await
    .unwrap();
    let (status, body) = relay.get_json("/api/sync/health").await;
    assert_eq!(status, 200);
    let mirror = &body["mirror"][0];
    assert_eq!(mirror["last_lsn"], "0/16B3748");
    let lag = mirror["lag_seconds"].as_f64().unwrap();
    assert!((2.5..30.0).contains(&lag), "{lag}");
    // The database goes away: 503, quickly, and back to 200 when it returns.
    proxy.set_refusing(true);
    proxy.cut();
    let started = std::time::Instant::now();
    let (status, body) = relay.get_json("/api/sync/health").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["database"], "down");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A webhook meanwhile is not acknowledged (Meta retries it).
    assert_eq!(relay.post_signed(&sample("text.json")).await.status(), 503);
    proxy.set_refusing(false);
    wait_for("health to recover", Duration::from_secs(30), || async {
        (relay.get_json("/api/sync/health").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(relay.post_signed(&sample("text.json")).await.status(), 200);
    assert_eq!(count(&db, "SELECT count(*) FROM bite_sync.inbox").await, 1);
}

/// Killed between storing and answering: every webhook Meta saw acknowledged is in the
/// inbox, and Meta's retries of all of them (acknowledged or not) add no duplicates.
#[tokio::test]
async fn a_relay_killed_mid_flight_loses_nothing_and_retries_are_deduplicated() {
    let dbs = test_dbs("relay_kill").await;
    let mut relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let bodies: Vec<Vec<u8>> = (0..400)
        .map(|i| {
            json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
                {"field": "messages", "value": {"messages": [
                    {"from": format!("346{:08}", i % 37), "id": format!("wamid.kill.{i}"),
                     "timestamp": "1749416383", "type": "text", "text": {"body": "hola"}}]}}]}]})
            .to_string()
            .into_bytes()
        })
        .collect();
    let sender = {
        let url = relay.url.clone();
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let client = client();
            let mut acked = Vec::new();
            let sends: Vec<_> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, body)| {
                    let client = client.clone();
                    let url = format!("{url}/api/webhook");
                    Box::pin(async move {
                        let resp = client
                            .post(url)
                            .header("X-Hub-Signature-256", sign(APP_SECRET.as_bytes(), &body))
                            .body(body)
                            .send()
                            .await;
                        (i, matches!(resp, Ok(r) if r.status() == 200))
                    })
                })
                .collect();
            let results: Vec<(usize, bool)> = futures_util::stream::iter(sends)
                .buffer_unordered(16)
                .collect()
                .await;
            for (i, ok) in results {
                if ok {
                    acked.push(i);
                }
            }
            acked
        })
    };
    // Kill it once some, not all, are in.
    wait_for("some webhooks stored", Duration::from_secs(30), || async {
        (count(&db, "SELECT count(*) FROM bite_sync.inbox").await >= 50).then_some(())
    })
    .await;
    let pid = relay.daemon.pid();
    // SAFETY: killing our own child.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let acked = sender.await.unwrap();
    assert!(
        acked.len() < bodies.len(),
        "the kill came too late to test anything"
    );
    let stored: std::collections::HashSet<String> = db
        .query("SELECT dedupe_key FROM bite_sync.inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for i in &acked {
        assert!(
            stored.contains(&format!("wamid.kill.{i}")),
            "acknowledged webhook {i} was lost"
        );
    }
    // Meta retries everything against a new relay.
    relay.daemon.exit_code(Duration::from_secs(5));
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    for body in &bodies {
        assert_eq!(relay.post_signed(body).await.status(), 200);
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM bite_sync.inbox").await,
        400
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(DISTINCT dedupe_key) FROM bite_sync.inbox"
        )
        .await,
        400
    );
}

use futures_util::StreamExt as _;

#[tokio::test]
async fn two_relays_on_one_database_share_the_inbox() {
    let dbs = test_dbs("relay_two").await;
    let a = Relay::start(&dbs.mirror_url, &[("RAILWAY_REPLICA_ID", "replica-a")]).await;
    let b = Relay::start(&dbs.mirror_url, &[("RAILWAY_REPLICA_ID", "replica-b")]).await;
    let db = support::connect(&dbs.mirror_url).await;
    // Meta's deliveries land on either replica at random; retries too.
    let bodies: Vec<Vec<u8>> = (0..100)
        .map(|i| {
            json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
                {"field": "messages", "value": {"messages": [
                    {"from": "34600000001", "id": format!("wamid.two.{i}"),
                     "timestamp": "1749416383", "type": "text", "text": {"body": "hola"}}]}}]}]})
            .to_string()
            .into_bytes()
        })
        .collect();
    // First each replica takes half; then Meta's retries land on the other one.
    let (first, second) = bodies.split_at(50);
    for (to_a, to_b) in [(first, second), (second, first)] {
        let posts = to_a
            .iter()
            .map(|body| a.post_signed(body))
            .chain(to_b.iter().map(|body| b.post_signed(body)));
        let ok = futures_util::future::join_all(posts)
            .await
            .iter()
            .all(|r| r.status() == 200);
        assert!(ok);
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM bite_sync.inbox").await,
        100
    );
    let (_, mut from_a) = a.get_json("/api/webhook/status").await;
    let (_, mut from_b) = b.get_json("/api/webhook/status").await;
    for c in [&mut from_a, &mut from_b] {
        c["counters"]["oldest_pending_seconds"] = Value::Null;
    }
    assert_eq!(from_a["counters"]["received"], 100);
    assert_eq!(from_a["counters"]["duplicates"], 100);
    assert_eq!(
        from_a["counters"], from_b["counters"],
        "one view from every replica"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM bite_sync.relay_counters WHERE replica IN ('replica-a', 'replica-b')").await,
        2,
        "both replicas counted duplicates"
    );
}

#[tokio::test]
async fn missing_settings_are_listed_at_once_and_secrets_never_printed() {
    let out = support::bite_sync()
        .arg("relay")
        .env("PORT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for var in ["DATABASE_URL", "WHATSAPP_VERIFY_TOKEN", "META_APP_SECRET"] {
        assert!(err.contains(var), "{err}");
    }
    // An unreachable database: exit 3, password redacted.
    let out = support::bite_sync()
        .arg("relay")
        .env("PORT", "0")
        .env(
            "DATABASE_URL",
            "postgres://relay:Sup3rSecretPw@127.0.0.1:1/railway?connect_timeout=2",
        )
        .env("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN)
        .env("META_APP_SECRET", APP_SECRET)
        .env("WHATSAPP_ACCESS_TOKEN", "EAAG-access-token-secret")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DATABASE_URL"), "{err}");
    for secret in [
        "Sup3rSecretPw",
        VERIFY_TOKEN,
        APP_SECRET,
        "EAAG-access-token-secret",
    ] {
        assert!(!err.contains(secret), "{secret} printed: {err}");
    }
    // A bad value names its variable.
    let out = support::bite_sync()
        .arg("relay")
        .env("PORT", "fivethousand")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PORT"));
}

#[tokio::test]
async fn sigterm_answers_requests_in_flight_and_exits_0() {
    let dbs = test_dbs("relay_sigterm").await;
    let mut relay = Relay::start(&dbs.mirror_url, &[]).await;
    assert_eq!(relay.post_signed(&sample("text.json")).await.status(), 200);
    assert_eq!(relay.daemon.terminate(Duration::from_secs(15)), Some(0));
}

#[tokio::test]
async fn status_shows_the_inbox_and_warns_when_nothing_takes_it() {
    let dbs = test_dbs("relay_status_cmd").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    for name in ["text.json", "statuses.json"] {
        assert_eq!(relay.post_signed(&sample(name)).await.status(), 200);
    }
    let status = |dbs_url: String| async move {
        let out = tokio::task::spawn_blocking(move || {
            support::bite_sync()
                .args(["status", "--json", "--mirror", &dbs_url])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = status(dbs.mirror_url.clone()).await;
    assert_eq!(report["inbox"]["received"], 4, "{report}");
    assert_eq!(report["inbox"]["pending"], 4);
    let stale = |r: &Value| {
        r["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("waiting for the backend"))
    };
    assert!(!stale(&report), "{report}");
    db.batch_execute("UPDATE bite_sync.inbox SET received_at = now() - interval '10 minutes'")
        .await
        .unwrap();
    let report = status(dbs.mirror_url.clone()).await;
    assert!(stale(&report), "{report}");
    assert_eq!(report["healthy"], false);
}

#[tokio::test]
async fn delivered_items_older_than_keep_days_are_pruned_and_pending_ones_never() {
    let dbs = test_dbs("relay_prune").await;
    let mut db = support::connect(&dbs.mirror_url).await;
    bite_sync::bookkeeping::migrate(&mut db).await.unwrap();
    db.batch_execute(
        "INSERT INTO bite_sync.inbox (kind, dedupe_key, field, customer, item, delivery_state, received_at) VALUES \
           ('message', 'old-delivered', 'messages', '1', '{}', 'delivered', now() - interval '40 days'), \
           ('message', 'old-pending', 'messages', '1', '{}', 'pending', now() - interval '40 days'), \
           ('message', 'new-delivered', 'messages', '1', '{}', 'delivered', now() - interval '1 day'); \
         INSERT INTO bite_sync.inbox_dead_letters (reason, body_sha256, body, received_at) VALUES \
           ('x', 'a', '\\x00', now() - interval '40 days'), ('y', 'b', '\\x01', now())",
    )
    .await
    .unwrap();
    let _relay = Relay::start(&dbs.mirror_url, &[]).await;
    let keys = wait_for(
        "the old delivered item to be pruned",
        Duration::from_secs(20),
        || async {
            let keys = strings(
                &db,
                "SELECT dedupe_key FROM bite_sync.inbox ORDER BY dedupe_key",
            )
            .await;
            (keys.len() == 2).then_some(keys)
        },
    )
    .await;
    assert_eq!(keys, ["new-delivered", "old-pending"]);
    assert_eq!(
        count(&db, "SELECT count(*) FROM bite_sync.inbox_dead_letters").await,
        1
    );
}

/// A wrong META_APP_SECRET makes every genuine webhook fail: after a window of refusals and no
/// valid webhook, the alert webhook hears it once; a valid webhook resolves it.
#[tokio::test]
async fn a_run_of_signature_failures_alerts_once_and_resolves() {
    let dbs = test_dbs("relay_signature_alert").await;
    let hook = support::FakeHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bite-sync.toml");
    std::fs::write(&config, "[relay]\nsignature_alert_window = \"1s\"\n").unwrap();
    let alert_url = format!("{}/services/T0/B0/SECRETPATH", hook.url);
    let config_text = config.display().to_string();
    let relay = Relay::start(
        &dbs.mirror_url,
        &[
            ("BITE_ALERT_WEBHOOK", alert_url.as_str()),
            ("BITE_CONFIG", config_text.as_str()),
        ],
    )
    .await;
    let body = sample("text.json");
    let wrong = sign(b"the-old-app-secret", &body);
    let alerts = |state: &'static str| {
        hook.requests()
            .iter()
            .map(|r| r.json())
            .filter(|j| j["state"] == state)
            .collect::<Vec<_>>()
    };
    // Meta keeps retrying, for longer than two windows.
    for _ in 0..3 {
        for _ in 0..6 {
            assert_eq!(relay.post(&body, Some(&wrong)).await.status(), 401);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    wait_for("the alert", Duration::from_secs(15), || async {
        (!alerts("open").is_empty()).then_some(())
    })
    .await;
    let open = alerts("open");
    assert_eq!(open.len(), 1, "alerted once, not once per window: {open:?}");
    assert_eq!(open[0]["incident"], "relay:signature");
    assert!(
        open[0]["text"]
            .as_str()
            .unwrap()
            .contains("META_APP_SECRET")
    );
    // The secret is fixed: a valid webhook resolves it.
    assert_eq!(relay.post_signed(&body).await.status(), 200);
    wait_for("the resolution", Duration::from_secs(15), || async {
        (alerts("resolved").len() == 1).then_some(())
    })
    .await;
    let log = relay.daemon.log();
    assert!(
        !log.contains("SECRETPATH"),
        "the alert URL's path is never logged"
    );
}

/// `/proc/<pid>/status`'s `VmHWM` (peak RSS) or `VmRSS` (now) in MiB.
fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    kib / 1024.0
}

/// A text message webhook from `from`.
fn text_webhook(id: &str, from: &str, body: &str) -> Vec<u8> {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
        {"field": "messages", "value": {"messaging_product": "whatsapp",
            "contacts": [{"wa_id": from, "profile": {"name": "Ana"}}],
            "messages": [{"from": from, "id": id, "timestamp": "1749416383", "type": "text",
                          "text": {"body": body}}]}}]}]})
    .to_string()
    .into_bytes()
}

/// Issue 12.1: PostgreSQL cannot store `\u0000` (nor lone surrogates) in `text` or `jsonb`,
/// and an id too long for the index fails the insert. Posted at once, so they share group
/// commits with valid webhooks: every one is answered 200, nothing is lost, no valid webhook
/// pays for a bad one.
#[tokio::test]
async fn unstorable_values_are_kept_exactly_and_never_fail_their_neighbours() {
    let dbs = test_dbs("relay_unstorable").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let with_nul = [
        // In a string, in a key, in the contact's name, in the id itself, and a lone surrogate.
        r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messages":[{"from":"34600000101","id":"wamid.nul.body","timestamp":"1","type":"text","text":{"body":"hola\u0000mundo"}}]}}]}]}"#,
        r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messages":[{"from":"34600000102","id":"wamid.nul.key","timestamp":"1","type":"text","text":{"body":"x"},"odd\u0000key":true}]}}]}]}"#,
        r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"contacts":[{"wa_id":"34600000103","profile":{"name":"A\u0000B"}}],"messages":[{"from":"34600000103","id":"wamid.nul.name","timestamp":"1","type":"text","text":{"body":"x"}}]}}]}]}"#,
        r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messages":[{"from":"34600000104","id":"wamid.nul.\u0000","timestamp":"1","type":"text","text":{"body":"x"}}]}}]}]}"#,
        r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messages":[{"from":"34600000105","id":"wamid.surrogate","timestamp":"1","type":"text","text":{"body":"\ud800 alone"}}]}}]}]}"#,
    ];
    // An id no btree index takes (PostgreSQL's limit is 2704 bytes; not compressible).
    let long_id = format!(
        "wamid.{}",
        (0..200u32)
            .map(|i| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(i.to_be_bytes())))
            .collect::<String>()
    );
    let too_long = text_webhook(&long_id, "34600000106", "long id");
    let mut bodies: Vec<Vec<u8>> = with_nul.iter().map(|b| b.as_bytes().to_vec()).collect();
    bodies.push(too_long.clone());
    let valid: Vec<Vec<u8>> = (0..14)
        .map(|i| {
            text_webhook(
                &format!("wamid.valid.{i}"),
                &format!("3460000020{i:02}"),
                "hola",
            )
        })
        .collect();
    bodies.extend(valid.iter().cloned());
    for round in 0..2 {
        let statuses: Vec<u16> =
            futures_util::future::join_all(bodies.iter().map(|b| relay.post_signed(b)))
                .await
                .iter()
                .map(|r| r.status().as_u16())
                .collect();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "round {round}: {statuses:?}\n{}",
            relay.daemon.log()
        );
    }
    let valid_rows = count(
        &db,
        "SELECT count(*) FROM bite_sync.inbox WHERE dedupe_key LIKE 'wamid.valid.%'",
    )
    .await;
    assert_eq!(valid_rows, 14, "every valid neighbour stored");
    // The NUL and surrogate ones are stored, their exact text kept beside a rendering.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM bite_sync.inbox WHERE dedupe_key LIKE 'wamid.nul.%' OR dedupe_key = 'wamid.surrogate'"
        )
        .await,
        5
    );
    let envelope: String = db
        .query_one(
            "SELECT envelope FROM bite_sync.inbox WHERE dedupe_key = 'wamid.nul.body'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        envelope.contains(r#""body":"hola\u0000mundo""#),
        "{envelope}"
    );
    let envelope: String = db
        .query_one(
            "SELECT envelope FROM bite_sync.inbox WHERE dedupe_key = 'wamid.nul.key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(envelope.contains(r#""odd\u0000key":true"#), "{envelope}");
    let name: String = db
        .query_one(
            "SELECT customer_name FROM bite_sync.inbox WHERE customer = '34600000103'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "A\u{FFFD}B");
    // The one PostgreSQL cannot index is a dead letter with its original bytes, kept once.
    let dead: Vec<(String, Vec<u8>)> = db
        .query("SELECT reason, body FROM bite_sync.inbox_dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].1, too_long);
    assert!(dead[0].0.contains("cannot store"), "{}", dead[0].0);
    assert_eq!(count(&db, "SELECT count(*) FROM bite_sync.inbox").await, 19);
}

/// Issue 12.2: a template going APPROVED → PAUSED → APPROVED is three updates (their entry
/// times differ); only a true retry collapses.
#[tokio::test]
async fn repeated_state_changes_are_each_kept_and_only_retries_collapse() {
    let dbs = test_dbs("relay_state_changes").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let update = |time: i64, event: &str| {
        json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "time": time,
            "changes": [{"field": "message_template_status_update", "value": {
                "event": event, "message_template_id": 1234567890,
                "message_template_name": "order_ready", "message_template_language": "es", "reason": null}}]}]})
        .to_string()
        .into_bytes()
    };
    let approved = update(1749416383, "APPROVED");
    for body in [
        &approved,
        &update(1749416400, "PAUSED"),
        &approved,
        &update(1749416500, "APPROVED"),
    ] {
        assert_eq!(relay.post_signed(body).await.status(), 200);
    }
    let events = strings(
        &db,
        "SELECT item->>'event' FROM bite_sync.inbox WHERE kind = 'change' ORDER BY id",
    )
    .await;
    assert_eq!(
        events,
        ["APPROVED", "PAUSED", "APPROVED"],
        "the last word is APPROVED"
    );
}

/// Issue 12.3: a `value` with `messages` and `errors` is one message, one row, its errors with
/// it (not a second row and a second delivery under another key).
#[tokio::test]
async fn a_message_and_its_errors_are_one_row() {
    let dbs = test_dbs("relay_message_errors").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let body = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
        {"field": "messages", "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
            "contacts": [{"wa_id": "34600000301", "profile": {"name": "Eva"}}],
            "messages": [{"from": "34600000301", "id": "wamid.with.errors", "timestamp": "1749416383",
                          "type": "unsupported", "errors": [{"code": 131051, "title": "Message type unknown"}]}],
            "errors": [{"code": 131000, "title": "Something went wrong",
                        "error_data": {"details": "retry"}}]}}]}]})
    .to_string()
    .into_bytes();
    assert_eq!(relay.post_signed(&body).await.status(), 200);
    let rows: Vec<(String, String)> = db
        .query("SELECT kind, dedupe_key FROM bite_sync.inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "message");
    assert_eq!(rows[0].1, "wamid.with.errors");
    let envelope: String = db
        .query_one("SELECT envelope FROM bite_sync.inbox", &[])
        .await
        .unwrap()
        .get(0);
    let envelope: Value = serde_json::from_str(&envelope).unwrap();
    assert_eq!(
        envelope["entry"][0]["changes"][0]["value"]["errors"][0]["code"], 131000,
        "the errors travel with the message"
    );
}

/// Issue 12.10: one signed 4 MB batch of 100,000 tiny messages. The relay reads and stores it
/// in bounded chunks: its peak RSS stays under 128 MiB, every message is stored, and the
/// memory goes back after the burst. Prints the figures (`-- --nocapture`) for the report.
#[tokio::test]
async fn a_batch_of_100000_messages_is_stored_in_bounded_memory() {
    let dbs = test_dbs("relay_huge_batch").await;
    let relay = Relay::start(&dbs.mirror_url, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let body = huge_batch(100_000);
    assert!(body.len() < 4 * 1024 * 1024, "{} bytes", body.len());
    let pid = relay.daemon.pid();
    let before = memory_mib(pid, "VmHWM:");
    let resp = relay.post_signed(&body).await;
    assert_eq!(resp.status(), 200, "{}", relay.daemon.log());
    let peak = memory_mib(pid, "VmHWM:");
    let after = memory_mib(pid, "VmRSS:");
    eprintln!(
        "100,000-message batch ({} bytes): relay peak RSS {peak:.1} MiB (before {before:.1} MiB), RSS after {after:.1} MiB",
        body.len()
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM bite_sync.inbox").await,
        100_000
    );
    assert!(peak < 128.0, "peak RSS {peak:.1} MiB");
    assert!(
        after < before + 32.0,
        "RSS after the burst {after:.1} MiB, before {before:.1} MiB"
    );
}

/// `n` tiny messages (an id and a sender) from 1,000 customers in one webhook.
fn huge_batch(n: usize) -> Vec<u8> {
    let mut body = String::from(
        r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"messages":["#,
    );
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(r#"{{"from":"{}","id":"w{i}"}}"#, i % 1000));
    }
    body.push_str("]}}]}]}");
    body.into_bytes()
}
