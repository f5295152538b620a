//! The relay's sending API as a backend meets it: real relay processes on loopback sharing one
//! PostgreSQL database, a fake Graph API on loopback that records when each send arrived.
//! Send slots across replicas (refused requests reserve nothing, one customer's sends stay
//! spaced), JWT lifetimes, unknown outcomes and `Idempotency-Key`, and secret rotation.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bite_sync::relay::auth::sign_jwt;
use bite_sync::relay::signature::sign;
use serde_json::{Value, json};
use support::{Daemon, FakeHttp, Recorded, count, test_dbs, wait_for};

const PHONE_ID: &str = "106540352242922";
const TOKEN: &str = "EAAG-relay-token";
const API_KEY: &str = "sync-key-current";
const OLD_API_KEY: &str = "sync-key-previous";
const JWT_SECRET: &str = "jwt-secret-current";
const OLD_JWT_SECRET: &str = "jwt-secret-previous";
const APP_SECRET: &str = "app-secret-current";
const OLD_APP_SECRET: &str = "app-secret-previous";

/// A relay process, its base URL and the config file it reads.
struct Relay {
    daemon: Daemon,
    url: String,
    _config: tempfile::TempDir,
}

impl Relay {
    async fn start(database: &str, graph: &str, config: &str, extra: &[(&str, &str)]) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bite-sync.toml");
        std::fs::write(&file, config).unwrap();
        let mut env = vec![
            ("DATABASE_URL", database.to_string()),
            ("WHATSAPP_VERIFY_TOKEN", "verify".to_string()),
            ("META_APP_SECRET", APP_SECRET.to_string()),
            ("WHATSAPP_ACCESS_TOKEN", TOKEN.to_string()),
            ("WHATSAPP_PHONE_NUMBER_ID", PHONE_ID.to_string()),
            ("GRAPH_API_URL", graph.to_string()),
            ("SYNC_API_KEY", API_KEY.to_string()),
            ("JWT_SECRET", JWT_SECRET.to_string()),
            ("BITE_CONFIG", file.display().to_string()),
        ];
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            env.push((k, v.to_string()));
        }
        let (daemon, url) = support::start_relay(&env).await;
        Relay {
            daemon,
            url,
            _config: dir,
        }
    }

    async fn send(&self, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = client()
            .post(format!("{}/api/messages", self.url))
            .json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("POST /api/messages");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn text(&self, to: &str) -> (u16, Value) {
        self.send(
            &json!({"type": "text", "to": to, "text": "Tu pedido está listo"}),
            &[("x-api-key", API_KEY)],
        )
        .await
    }

    async fn status(&self) -> Value {
        client()
            .get(format!("{}/api/webhook/status", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A Graph API that accepts every message as Meta does.
async fn graph() -> FakeHttp {
    let n = Arc::new(Mutex::new(0u32));
    FakeHttp::with(move |r| {
        if r.json()["status"] == "read" {
            return (200, json!({"success": true}));
        }
        let mut n = n.lock().unwrap();
        *n += 1;
        (
            200,
            json!({"messaging_product":"whatsapp","contacts":[{"input":"x","wa_id":"x"}],
                   "messages":[{"id": format!("wamid.sent.{n}")}]}),
        )
    })
    .await
}

/// When each send to `to` reached the Graph API, oldest first.
fn arrivals(graph: &FakeHttp, to: &str) -> Vec<Instant> {
    let mut at: Vec<Instant> = graph
        .requests_to(&format!("/v25.0/{PHONE_ID}/messages"))
        .iter()
        .filter(|r| r.json()["to"] == to)
        .map(|r| r.at)
        .collect();
    at.sort();
    at
}

fn gaps(at: &[Instant]) -> Vec<Duration> {
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---- send slots (issue 12.11) ----

/// A burst to one customer through two replicas: what cannot go within 10 s is refused and
/// reserves nothing, so another customer is served at once and the first customer's next
/// send is not pushed back by the refusals; the sends that go are 2 s apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_sends_reserve_no_slots_across_replicas() {
    let dbs = test_dbs("sends_refused_reserve_nothing").await;
    let graph = graph().await;
    let config = "[relay]\ncustomer_interval = \"2s\"\nsend_rate = 20\n";
    let a = Relay::start(&dbs.mirror_url, &graph.url, config, &[]).await;
    let b = Relay::start(&dbs.mirror_url, &graph.url, config, &[]).await;
    let ana = "34612345678";
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let relay = if i % 2 == 0 { &a } else { &b };
            relay.text(ana)
        })
        .collect();
    let started = Instant::now();
    let answers = futures_util::future::join_all(burst).await;
    let sent = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(sent + refused, 12, "{answers:?}");
    // Slots at 0, 2, 4, 6, 8 and 10 s (within the 10 s allowed, give or take the clock).
    assert!((5..=7).contains(&sent), "{sent} sent: {answers:?}");
    for (_, body) in answers.iter().filter(|(s, _)| *s == 429) {
        assert!(body["retry_after"].as_u64().is_some(), "{body}");
    }
    let at = arrivals(&graph, ana);
    assert_eq!(at.len(), sent);
    for gap in gaps(&at) {
        assert!(
            gap >= Duration::from_millis(1900),
            "sends 2 s apart: {gap:?}"
        );
    }
    // Another customer is not held back by anyone's refused requests.
    let before = Instant::now();
    let (status, body) = b.text("34699000111").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        before.elapsed() < Duration::from_secs(1),
        "{:?}",
        before.elapsed()
    );
    // The customer's next send goes one interval after the last real one, not after the
    // refused ones.
    let (status, body) = a.text(ana).await;
    assert_eq!(status, 200, "{body} after {:?}", started.elapsed());
    let at = arrivals(&graph, ana);
    let last_gap = at[at.len() - 1] - at[at.len() - 2];
    assert!(
        last_gap >= Duration::from_millis(1900) && last_gap < Duration::from_secs(4),
        "{last_gap:?}"
    );
}

/// With the number's throughput as the bottleneck, two sends to one customer still go a
/// customer interval apart (they once went 55 ms apart: the customer's slot was counted from
/// its reservation, not from when the send actually went).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_customers_sends_stay_spaced_when_the_number_is_busy() {
    let dbs = test_dbs("sends_spaced_when_busy").await;
    let graph = graph().await;
    // One send a second for the number, one per 2 s per customer.
    let config = "[relay]\ncustomer_interval = \"2s\"\nsend_rate = 1\n";
    let a = Relay::start(&dbs.mirror_url, &graph.url, config, &[]).await;
    let b = Relay::start(&dbs.mirror_url, &graph.url, config, &[]).await;
    // Three other customers fill the number's next three seconds.
    let others: Vec<_> = ["34600000001", "34600000002", "34600000003"]
        .into_iter()
        .enumerate()
        .map(|(i, to)| if i % 2 == 0 { a.text(to) } else { b.text(to) })
        .collect();
    let luis = "34699000111";
    let (others, first, second) = tokio::join!(
        futures_util::future::join_all(others),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            a.text(luis).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            b.text(luis).await
        },
    );
    for (status, body) in others.iter().chain([&first, &second]) {
        assert_eq!(*status, 200, "{body}");
    }
    let at = arrivals(&graph, luis);
    assert_eq!(at.len(), 2);
    let gap = at[1] - at[0];
    assert!(
        gap >= Duration::from_millis(1900),
        "two sends to one customer {gap:?} apart"
    );
    // And the number's own spacing held for everyone.
    let mut all: Vec<Instant> = graph.requests().iter().map(|r| r.at).collect();
    all.sort();
    for gap in gaps(&all) {
        assert!(
            gap >= Duration::from_millis(900),
            "the number's sends {gap:?} apart"
        );
    }
}

// ---- JWTs (issue 12.12) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_must_expire_and_live_at_most_the_allowed_lifetime() {
    let dbs = test_dbs("sends_jwt_lifetime").await;
    let graph = graph().await;
    let relay = Relay::start(&dbs.mirror_url, &graph.url, "", &[]).await;
    let read = json!({"type": "read", "message_id": "wamid.IN"});
    let now = unix_now();
    let with = |claims: Value| {
        let token = sign_jwt(&claims, JWT_SECRET.as_bytes());
        let relay = &relay;
        let read = &read;
        async move {
            relay
                .send(read, &[("authorization", &format!("Bearer {token}"))])
                .await
        }
    };
    let (status, body) = with(json!({"sub": "backend"})).await;
    assert_eq!(status, 401, "a token without exp is valid forever: {body}");
    assert!(body["error"].as_str().unwrap().contains("exp"), "{body}");
    let (status, body) = with(json!({"sub": "backend", "exp": now + 365 * 86400})).await;
    assert_eq!(status, 401, "a year: {body}");
    assert!(
        body["error"].as_str().unwrap().contains("jwt_max_lifetime"),
        "{body}"
    );
    // iat counts: issued two hours ago with half an hour left lives 2.5 h.
    let (status, _) = with(json!({"iat": now - 7200, "exp": now + 1800})).await;
    assert_eq!(status, 401);
    let (status, body) = with(json!({"iat": now, "exp": now + 1800})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = with(json!({"exp": now + 3000})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(graph.requests().len(), 2);

    // relay.jwt_max_lifetime allows longer tokens.
    let longer = Relay::start(
        &dbs.mirror_url,
        &graph.url,
        "[relay]\njwt_max_lifetime = \"3h\"\n",
        &[],
    )
    .await;
    let token = sign_jwt(
        &json!({"iat": now - 7200, "exp": now + 1800}),
        JWT_SECRET.as_bytes(),
    );
    let (status, body) = longer
        .send(&read, &[("authorization", &format!("Bearer {token}"))])
        .await;
    assert_eq!(status, 200, "{body}");
}

// ---- unknown outcomes and Idempotency-Key (issue 12.13) ----

/// A Graph API that takes the request and never answers.
async fn silent_graph() -> (String, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(0usize));
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    match tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                        *counter.lock().unwrap() += 1;
                        // Hold the connection, say nothing.
                        tokio::time::sleep(Duration::from_secs(120)).await;
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_to_meta_is_an_unknown_outcome_never_sent_again() {
    let dbs = test_dbs("sends_unknown_outcome").await;
    let (url, seen) = silent_graph().await;
    let relay = Relay::start(&dbs.mirror_url, &url, "", &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let text = json!({"type": "text", "to": "34612345678", "text": "¿Mesa para dos?"});
    let headers = [
        ("x-api-key", API_KEY),
        ("idempotency-key", "order-17-ready"),
    ];
    let (status, body) = relay.send(&text, &headers).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["outcome"], "unknown");
    let id = body["id"].as_i64().expect("the outbox id");
    let state: String = db
        .query_one("SELECT state FROM bite_sync.outbox WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "unknown");
    // The backend retries with the same key: the same answer, nothing sent again.
    let (status, again) = relay.send(&text, &headers).await;
    assert_eq!(status, 504);
    assert_eq!(again["id"], id);
    assert_eq!(*seen.lock().unwrap(), 1, "the message reached Meta once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_with_the_same_idempotency_key_never_sends_twice() {
    let dbs = test_dbs("sends_idempotency").await;
    let mut graph = graph().await;
    // No spacing per customer: this test is about keys, not slots.
    let config = "[relay]\ncustomer_interval = \"0s\"\n";
    let a = Relay::start(&dbs.mirror_url, &graph.url, config, &[]).await;
    let b = Relay::start(&dbs.mirror_url, &graph.url, config, &[]).await;
    let db = support::connect(&dbs.mirror_url).await;
    let text = json!({"type": "text", "to": "34612345678", "text": "Tu pedido está listo"});
    let key = |k: &'static str| [("x-api-key", API_KEY), ("idempotency-key", k)];
    let (status, first) = a.send(&text, &key("k-1")).await;
    assert_eq!(status, 200, "{first}");
    // A retry on either replica: the first answer, not a second message.
    for relay in [&a, &b] {
        let resp = client()
            .post(format!("{}/api/messages", relay.url))
            .header("x-api-key", API_KEY)
            .header("idempotency-key", "k-1")
            .json(&text)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["idempotent-replayed"], "true");
        assert_eq!(resp.json::<Value>().await.unwrap(), first);
    }
    assert_eq!(graph.requests().len(), 1);
    // Ten concurrent requests with one new key, on both replicas: one send.
    let k2 = key("k-2");
    let burst: Vec<_> = (0..10)
        .map(|i| if i % 2 == 0 { &a } else { &b })
        .map(|relay| relay.send(&text, &k2))
        .collect();
    let answers = futures_util::future::join_all(burst).await;
    assert_eq!(graph.requests().len(), 2, "{answers:?}");
    let ids: std::collections::HashSet<i64> = answers
        .iter()
        .filter_map(|(_, body)| body["id"].as_i64())
        .collect();
    assert_eq!(ids.len(), 1, "every answer names the one send: {answers:?}");
    for (status, _) in &answers {
        assert!([200, 409].contains(status), "{answers:?}");
    }
    // Meta refuses for good (outside the 24-hour window): the retry gets the same 422.
    graph.respond(|_| {
        (
            400,
            json!({"error":{"message":"(#131047) Re-engagement message","type":"OAuthException","code":131047,"fbtrace_id":"A"}}),
        )
    });
    let (status, refused) = a.send(&text, &key("k-3")).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(b.send(&text, &key("k-3")).await, (422, refused));
    assert_eq!(graph.requests().len(), 3);
    // Meta unreachable: surely not sent, so the key is free and the retry sends.
    graph.stop();
    let (status, body) = a.send(&text, &key("k-4")).await;
    assert_eq!(status, 502, "{body}");
    graph.start_again().await;
    graph.respond(|_| {
        (
            200,
            json!({"messaging_product":"whatsapp","messages":[{"id":"wamid.after"}]}),
        )
    });
    let (status, body) = b.send(&text, &key("k-4")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["wamid"], "wamid.after");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM bite_sync.outbox WHERE idempotency_key IS NOT NULL"
        )
        .await,
        4
    );
    // A key that is not a key is refused before anything happens.
    let (status, body) = a.send(&text, &key("has spaces")).await;
    assert_eq!(status, 400, "{body}");
}

// ---- secret rotation (issue 13.11) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn previous_secrets_are_accepted_during_a_rotation_and_counted() {
    let dbs = test_dbs("sends_rotation").await;
    let graph = graph().await;
    let backend = FakeHttp::start().await;
    let relay = Relay::start(
        &dbs.mirror_url,
        &graph.url,
        "",
        &[
            ("META_APP_SECRET_PREVIOUS", OLD_APP_SECRET),
            ("SYNC_API_KEY_PREVIOUS", OLD_API_KEY),
            ("JWT_SECRET_PREVIOUS", OLD_JWT_SECRET),
            ("LOCAL_BACKEND_URL", &backend.url),
            ("DELIVERY_MODE", "push"),
        ],
    )
    .await;
    let webhook = |secret: &'static str, id: &'static str| {
        let body = support::payload("text.json");
        let body = String::from_utf8(body)
            .unwrap()
            .replace(
                "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
                id,
            )
            .into_bytes();
        let url = format!("{}/api/webhook", relay.url);
        async move {
            client()
                .post(url)
                .header("content-type", "application/json")
                .header("x-hub-signature-256", sign(secret.as_bytes(), &body))
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(webhook(OLD_APP_SECRET, "wamid.old").await, 200);
    assert_eq!(webhook(APP_SECRET, "wamid.new").await, 200);
    assert_eq!(webhook("someone-else", "wamid.forged").await, 401);
    let read = json!({"type": "read", "message_id": "wamid.IN"});
    assert_eq!(
        relay.send(&read, &[("x-api-key", OLD_API_KEY)]).await.0,
        200
    );
    assert_eq!(relay.send(&read, &[("x-api-key", API_KEY)]).await.0, 200);
    assert_eq!(relay.send(&read, &[("x-api-key", "guess")]).await.0, 401);
    let old_jwt = sign_jwt(&json!({"exp": unix_now() + 600}), OLD_JWT_SECRET.as_bytes());
    let auth = format!("Bearer {old_jwt}");
    assert_eq!(relay.send(&read, &[("authorization", &auth)]).await.0, 200);

    // Deliveries are signed with the current key only.
    let delivered = wait_for(
        "both messages at the backend",
        Duration::from_secs(20),
        || async {
            let got = backend.requests();
            (got.len() >= 2).then_some(got)
        },
    )
    .await;
    for d in &delivered {
        assert_eq!(d.header("x-api-key"), Some(API_KEY));
        assert_eq!(
            d.header("x-bite-signature-256"),
            Some(sign(API_KEY.as_bytes(), &d.body).as_str())
        );
    }

    // Status says which value verifies what, never a value.
    let status = wait_for(
        "the counters to be flushed",
        Duration::from_secs(20),
        || async {
            let s = relay.status().await;
            (s["secrets"]["JWT_SECRET"]["verified_by_previous_last_hour"] == 1).then_some(s)
        },
    )
    .await;
    let secrets = &status["secrets"];
    assert_eq!(secrets["META_APP_SECRET"]["previous_set"], true);
    assert_eq!(
        secrets["META_APP_SECRET"]["verified_by_previous_last_hour"],
        1
    );
    assert_eq!(secrets["META_APP_SECRET"]["verified_last_hour"], 1);
    assert_eq!(secrets["SYNC_API_KEY"]["verified_by_previous_last_hour"], 1);
    assert_eq!(secrets["SYNC_API_KEY"]["verified_last_hour"], 1);
    assert!(secrets["SYNC_API_KEY"]["previous_last_used_at"].is_string());
    let text = status.to_string() + &relay.daemon.log();
    for secret in [
        APP_SECRET,
        OLD_APP_SECRET,
        API_KEY,
        OLD_API_KEY,
        JWT_SECRET,
        OLD_JWT_SECRET,
    ] {
        assert!(!text.contains(secret), "{secret} shown");
    }
    let _: Vec<Recorded> = delivered;
}
