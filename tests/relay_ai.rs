//! The relay's sending side against real Postgres and loopback fakes: the AI fallback worker
//! (claims, bursts, staleness, provider order, crash safety, races between replicas), each
//! provider's wire format, the shared send slots, and `POST /api/messages` (auth, Meta's
//! request shapes, error mapping). Logs are captured for the whole binary, to check no secret
//! or customer text ever reaches them.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bite_sync::relay::messages::{self, MessagesState};
use bite_sync::relay::settings::{RawAi, RawDelivery, RawRelay, RelaySettings};
use bite_sync::relay::{auth, db, fallback, ratelimit};
use serde_json::{Value, json};
use support::{FakeHttp, Recorded, TestDbs, wait_for};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "EAAG-access-token-never-logged";
const PHONE_ID: &str = "106540352242922";
const API_KEY: &str = "sync-api-key-never-logged";
const JWT_SECRET: &str = "jwt-secret-never-logged";
const OPENAI_KEY: &str = "sk-openai-never-logged";
const GEMINI_KEY: &str = "gemini-key-never-logged";
const ANTHROPIC_KEY: &str = "sk-ant-never-logged";
const ANA: &str = "34612345678";
const LUIS: &str = "34699000111";
const WAIT: Duration = Duration::from_secs(20);

// ---- captured logs ----

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, from the first call on.
fn logs() -> String {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buf = BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(Arc::clone(&buf));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,tokio_postgres=info,hyper=info,hyper_util=info,h2=info,rustls=info,reqwest=info",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

// ---- the database ----

async fn mirror(name: &str) -> (TestDbs, tokio_postgres::Client) {
    logs();
    let dbs = support::test_dbs(name).await;
    let mut client = support::connect(&dbs.mirror_url).await;
    bite_sync::bookkeeping::migrate(&mut client).await.unwrap();
    client
        .batch_execute(bite_sync::sample::SCHEMA_SQL)
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO public.customers (id, phone, name, preferences) VALUES
               (1, '+34 612 345 678', 'Ana García', '{\"allergy\": \"nuts\"}'),
               (2, '+34 699 000 111', 'Luis Pérez', '{}');
             INSERT INTO public.menu_items (id, name, category, price) VALUES
               (1, 'Paella valenciana', 'mains', 14.50),
               (2, 'Tortilla de patatas', 'tapas', 6.00);
             INSERT INTO public.orders (id, customer_id, status, total, created_at) VALUES
               (10, 1, 'delivered', 6.00, now() - interval '3 days'),
               (11, 1, 'preparing', 29.00, now() - interval '1 hour');
             INSERT INTO public.order_items VALUES (10, 1, 2, 1, 6.00), (11, 1, 1, 2, 14.50);",
        )
        .await
        .unwrap();
    (dbs, client)
}

/// A customer's text message, sent `sent_ago` seconds ago and stored `received_ago` ago.
async fn message(
    c: &tokio_postgres::Client,
    wamid: &str,
    phone: &str,
    body: &str,
    sent_ago: f64,
    received_ago: f64,
) -> i64 {
    c.query_one(
        "INSERT INTO bite_sync.inbox (kind, dedupe_key, wamid, field, customer, customer_phone,
                                      customer_name, item_type, body, sent_at, received_at, item)
         VALUES ('message', $1, $1, 'messages', $2, $2, 'WA profile', 'text', $3,
                 now() - make_interval(secs => $4), now() - make_interval(secs => $5),
                 jsonb_build_object('id', $1::text, 'type', 'text',
                                    'text', jsonb_build_object('body', $3::text)))
         RETURNING id",
        &[&wamid, &phone, &body, &sent_ago, &received_ago],
    )
    .await
    .unwrap()
    .get(0)
}

async fn ai_state(c: &tokio_postgres::Client, id: i64) -> (Option<String>, Option<String>) {
    let r = c
        .query_one(
            "SELECT ai_state, ai_note FROM bite_sync.inbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

async fn wait_state(c: &tokio_postgres::Client, id: i64, state: &str) -> Option<String> {
    wait_for(
        &format!("inbox row {id} to become {state}"),
        WAIT,
        || async {
            let (s, note) = ai_state(c, id).await;
            (s.as_deref() == Some(state)).then_some(note)
        },
    )
    .await
}

// ---- settings and fakes ----

struct Setup<'a> {
    database: &'a str,
    graph: &'a str,
    /// (provider, base URL), in order.
    providers: Vec<(&'a str, String)>,
    replica: &'a str,
    fallback_text: Option<&'a str>,
    customer_interval: &'a str,
    access_token: bool,
}

impl<'a> Setup<'a> {
    fn new(database: &'a str, graph: &'a str) -> Setup<'a> {
        Setup {
            database,
            graph,
            providers: Vec::new(),
            replica: "relay-a",
            fallback_text: None,
            customer_interval: "0s",
            access_token: true,
        }
    }

    fn settings(&self) -> RelaySettings {
        let mut env: HashMap<String, String> = [
            ("DATABASE_URL", self.database),
            ("WHATSAPP_VERIFY_TOKEN", "verify"),
            ("META_APP_SECRET", "app-secret"),
            ("WHATSAPP_PHONE_NUMBER_ID", PHONE_ID),
            ("GRAPH_API_URL", self.graph),
            ("AI_DEADLINE", "1s"),
            ("RAILWAY_REPLICA_ID", self.replica),
            ("SYNC_API_KEY", API_KEY),
            ("JWT_SECRET", JWT_SECRET),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if self.access_token {
            env.insert("WHATSAPP_ACCESS_TOKEN".into(), TOKEN.into());
        }
        for (name, url) in &self.providers {
            let (key_var, key) = match *name {
                "openai" => ("OPENAI_API_KEY", OPENAI_KEY),
                "gemini" => ("GEMINI_API_KEY", GEMINI_KEY),
                _ => ("ANTHROPIC_API_KEY", ANTHROPIC_KEY),
            };
            env.insert(key_var.into(), key.into());
            env.insert(format!("{}_BASE_URL", name.to_uppercase()), url.clone());
            env.insert(
                format!("{}_MODEL", name.to_uppercase()),
                format!("{name}-model"),
            );
        }
        let raw = RawRelay {
            customer_interval: Some(self.customer_interval.into()),
            ai: RawAi {
                providers: Some(self.providers.iter().map(|(n, _)| n.to_string()).collect()),
                fallback_text: self.fallback_text.map(str::to_string),
                timeout: Some("3s".into()),
                ..RawAi::default()
            },
            ..RawRelay::default()
        };
        let lookup = move |k: &str| env.get(k).cloned();
        RelaySettings::resolve(&raw, &RawDelivery::default(), None, &lookup).unwrap()
    }
}

fn pool(settings: &RelaySettings) -> db::Pool {
    db::pool(
        settings.database.as_ref().unwrap(),
        6,
        Duration::from_secs(5),
    )
}

/// A Graph API that accepts every message with `wamid.reply.N` and every read receipt with
/// `{"success": true}`, as Meta does.
async fn fake_graph() -> FakeHttp {
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
                   "messages":[{"id": format!("wamid.reply.{n}")}]}),
        )
    })
    .await
}

/// Each provider's success answer with `text`.
fn provider_ok(r: &Recorded, text: &str) -> (u16, Value) {
    if r.uri.contains("/chat/completions") {
        (
            200,
            json!({"id":"c1","choices":[{"index":0,"message":{"role":"assistant","content":text,"refusal":null},"finish_reason":"stop"}]}),
        )
    } else if r.uri.contains(":generateContent") {
        (
            200,
            json!({"candidates":[{"content":{"role":"model","parts":[{"text":text}]},"finishReason":"STOP"}]}),
        )
    } else {
        (
            200,
            json!({"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":text}],"stop_reason":"end_turn"}),
        )
    }
}

struct Worker {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_worker(settings: RelaySettings) -> Worker {
    let cancel = CancellationToken::new();
    let pool = pool(&settings);
    let task = tokio::spawn(fallback::run(pool, Arc::new(settings), cancel.clone()));
    Worker { cancel, task }
}

impl Worker {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker stops when cancelled")
            .unwrap();
    }
}

fn graph_sends(graph: &FakeHttp) -> Vec<Value> {
    graph
        .requests_to(&format!("/v25.0/{PHONE_ID}/messages"))
        .iter()
        .map(Recorded::json)
        .collect()
}

// ---- the AI fallback ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gets_one_ai_reply_built_from_the_mirror() {
    let (dbs, c) = mirror("ai_reply_from_mirror").await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| provider_ok(r, "¡Hola Ana! Tu paella está en preparación.")).await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![("openai", format!("{}/v1", ai.url))];
    let worker = start_worker(setup.settings());
    let stored = Instant::now();
    let id = message(&c, "wamid.IN1", ANA, "¿Dónde está mi pedido?", 0.0, 0.0).await;

    wait_state(&c, id, "answered").await;
    assert!(
        stored.elapsed() >= Duration::from_millis(900),
        "the backend gets the deadline (1s) first"
    );
    let prompt = ai.requests()[0].json();
    let system = prompt["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains("Ana García"), "customer's name: {system}");
    assert!(system.contains("preparing"), "last order's state: {system}");
    assert!(
        system.contains("2 x Paella valenciana"),
        "last order's items: {system}"
    );
    assert!(system.contains("Tortilla de patatas"), "the menu: {system}");
    assert_eq!(prompt["messages"][1]["content"], "¿Dónde está mi pedido?");

    let sends = graph.requests_to("/v25.0/");
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].uri, format!("/v25.0/{PHONE_ID}/messages"));
    assert_eq!(
        sends[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let body = sends[0].json();
    assert_eq!(body["to"], ANA);
    assert_eq!(body["context"]["message_id"], "wamid.IN1");
    assert_eq!(
        body["text"]["body"],
        "¡Hola Ana! Tu paella está en preparación."
    );

    let row = c
        .query_one(
            "SELECT i.ai_provider, i.ai_reply_wamid, i.ai_by, i.delivery_state,
                    o.origin, o.state, o.recipient, o.kind, o.wamid
               FROM bite_sync.inbox i JOIN bite_sync.outbox o ON o.in_reply_to = i.id
              WHERE i.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "openai");
    assert_eq!(row.get::<_, String>(1), "wamid.reply.1");
    assert_eq!(row.get::<_, String>(2), "relay-a");
    assert_eq!(
        row.get::<_, String>(3),
        "pending",
        "still queued for the backend"
    );
    assert_eq!(row.get::<_, String>(4), "ai");
    assert_eq!(row.get::<_, String>(5), "sent");
    assert_eq!(row.get::<_, String>(6), ANA);
    assert_eq!(row.get::<_, String>(7), "text");
    assert_eq!(row.get::<_, String>(8), "wamid.reply.1");
    worker.stop().await;
    assert_eq!(graph_sends(&graph).len(), 1, "one reply, ever");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gets_one_reply_and_stale_messages_none() {
    let (dbs, c) = mirror("ai_burst_and_stale").await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| provider_ok(r, "Te respondemos enseguida")).await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![("anthropic", format!("{}/v1", ai.url))];
    // Meta replaying an hour-old message, and a three-message burst from Ana.
    let stale = message(&c, "wamid.OLD", LUIS, "¿Abrís hoy?", 3600.0, 5.0).await;
    let first = message(&c, "wamid.B1", ANA, "Hola", 4.0, 4.0).await;
    let second = message(&c, "wamid.B2", ANA, "Quiero pedir", 3.0, 3.0).await;
    let third = message(&c, "wamid.B3", ANA, "una paella", 2.0, 2.0).await;
    let worker = start_worker(setup.settings());

    wait_state(&c, third, "answered").await;
    assert_eq!(
        wait_state(&c, stale, "skipped").await.as_deref(),
        Some("stale")
    );
    for id in [first, second] {
        assert_eq!(
            ai_state(&c, id).await,
            (Some("skipped".into()), Some("superseded".into()))
        );
    }
    worker.stop().await;
    let sends = graph_sends(&graph);
    assert_eq!(sends.len(), 1, "one reply per burst: {sends:?}");
    assert_eq!(sends[0]["context"]["message_id"], "wamid.B3");
    let asked = ai.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        asked[0].json()["messages"][0]["content"],
        "Hola\nQuiero pedir\nuna paella",
        "the whole burst is in the prompt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_hands_over_to_the_next() {
    let (dbs, c) = mirror("ai_provider_handover").await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| {
        if r.uri.starts_with("/openai") {
            (
                500,
                json!({"error":{"message":"boom","type":"server_error"}}),
            )
        } else {
            provider_ok(r, "Respuesta de Gemini")
        }
    })
    .await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![
        ("openai", format!("{}/openai/v1", ai.url)),
        ("gemini", format!("{}/gemini/v1beta", ai.url)),
    ];
    let worker = start_worker(setup.settings());
    let id = message(&c, "wamid.P1", ANA, "Hola", 0.0, 0.0).await;
    wait_state(&c, id, "answered").await;
    worker.stop().await;
    let provider: String = c
        .query_one(
            "SELECT ai_provider FROM bite_sync.inbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(provider, "gemini");
    assert_eq!(ai.requests_to("/openai/").len(), 1);
    assert_eq!(
        graph_sends(&graph)[0]["text"]["body"],
        "Respuesta de Gemini"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_provider_fails_the_fallback_text_goes() {
    let (dbs, c) = mirror("ai_all_fail").await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| {
        if r.uri.starts_with("/openai") {
            (429, json!({"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}))
        } else {
            // Gemini blocks the prompt: a 200 with nothing to send.
            (200, json!({"promptFeedback":{"blockReason":"SAFETY"}}))
        }
    })
    .await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![
        ("openai", format!("{}/openai/v1", ai.url)),
        ("gemini", format!("{}/gemini/v1beta", ai.url)),
    ];
    setup.fallback_text = Some("Gracias, te respondemos pronto.");
    let worker = start_worker(setup.settings());
    let id = message(&c, "wamid.F1", ANA, "Hola", 0.0, 0.0).await;
    wait_state(&c, id, "answered").await;
    worker.stop().await;
    assert_eq!(ai.requests().len(), 2, "both providers were asked");
    let sends = graph_sends(&graph);
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0]["text"]["body"], "Gracias, te respondemos pronto.");

    // With no provider and an empty fallback text, nothing is sent.
    setup.providers = Vec::new();
    setup.fallback_text = Some("");
    let worker = start_worker(setup.settings());
    let id = message(&c, "wamid.F2", LUIS, "Hola", 0.0, 0.0).await;
    assert_eq!(
        wait_state(&c, id, "skipped").await.as_deref(),
        Some("no reply text")
    );
    worker.stop().await;
    assert_eq!(graph_sends(&graph).len(), 1);
}

/// One provider alone answers one message; returns its recorded request.
async fn provider_wire(name: &'static str, path: &str) -> Recorded {
    let (dbs, c) = mirror(&format!("ai_wire_{name}")).await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| provider_ok(r, "ok")).await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![(name, format!("{}{path}", ai.url))];
    let worker = start_worker(setup.settings());
    let id = message(&c, "wamid.W1", ANA, "¿Tenéis mesa?", 0.0, 0.0).await;
    wait_state(&c, id, "answered").await;
    worker.stop().await;
    assert_eq!(graph_sends(&graph)[0]["text"]["body"], "ok");
    let requests = ai.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].header("content-type"), Some("application/json"));
    requests[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_gets_chat_completions() {
    let r = provider_wire("openai", "/v1").await;
    assert_eq!(r.uri, "/v1/chat/completions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    let body = r.json();
    assert_eq!(body["model"], "openai-model");
    assert_eq!(body["max_completion_tokens"], 400);
    assert_eq!(body["messages"][0]["role"], "system");
    assert!(
        body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("Ana García")
    );
    assert_eq!(
        body["messages"][1],
        json!({"role":"user","content":"¿Tenéis mesa?"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_gets_generate_content() {
    let r = provider_wire("gemini", "/v1beta").await;
    assert_eq!(r.uri, "/v1beta/models/gemini-model:generateContent");
    assert_eq!(r.header("x-goog-api-key"), Some(GEMINI_KEY));
    assert!(!r.uri.contains("key="), "the key never goes in the URL");
    let body = r.json();
    assert_eq!(
        body["generationConfig"],
        json!({"maxOutputTokens":400,"thinkingConfig":{"thinkingBudget":0}})
    );
    assert!(
        body["system_instruction"]["parts"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Ana García")
    );
    assert_eq!(
        body["contents"],
        json!([{"role":"user","parts":[{"text":"¿Tenéis mesa?"}]}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_gets_messages() {
    let r = provider_wire("anthropic", "/v1").await;
    assert_eq!(r.uri, "/v1/messages");
    assert_eq!(r.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    let body = r.json();
    assert_eq!(body["model"], "anthropic-model");
    assert_eq!(body["max_tokens"], 400);
    assert!(body["system"].as_str().unwrap().contains("Ana García"));
    assert_eq!(
        body["messages"],
        json!([{"role":"user","content":"¿Tenéis mesa?"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_send_once_per_message() {
    let (dbs, c) = mirror("ai_racing_workers").await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| provider_ok(r, "ok")).await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![("openai", format!("{}/v1", ai.url))];
    let mut ids = Vec::new();
    for n in 0..12 {
        let phone = format!("3460000{n:04}");
        ids.push(message(&c, &format!("wamid.R{n}"), &phone, "Hola", 0.0, 2.0).await);
    }
    let a = start_worker(setup.settings());
    setup.replica = "relay-b";
    let b = start_worker(setup.settings());
    setup.replica = "relay-c";
    let third = start_worker(setup.settings());
    for id in &ids {
        wait_state(&c, *id, "answered").await;
    }
    for w in [a, b, third] {
        w.stop().await;
    }
    let sends = graph_sends(&graph);
    let mut quoted: Vec<String> = sends
        .iter()
        .map(|s| s["context"]["message_id"].as_str().unwrap().to_string())
        .collect();
    quoted.sort();
    quoted.dedup();
    assert_eq!(sends.len(), 12, "one send per message");
    assert_eq!(quoted.len(), 12);
    let outbox: i64 = c
        .query_one(
            "SELECT count(*) FROM bite_sync.outbox WHERE origin = 'ai'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_left_sending_is_never_sent_again_but_an_abandoned_claim_is() {
    let (dbs, c) = mirror("ai_crash_safety").await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| provider_ok(r, "ok")).await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![("openai", format!("{}/v1", ai.url))];
    let sending = message(&c, "wamid.S1", ANA, "Hola", 300.0, 300.0).await;
    let abandoned = message(&c, "wamid.S2", LUIS, "Hola", 300.0, 300.0).await;
    let live = message(&c, "wamid.S3", "34611111111", "Hola", 30.0, 30.0).await;
    c.execute(
        "UPDATE bite_sync.inbox SET ai_state = 'sending', ai_by = 'dead', ai_at = now() - interval '1 hour' WHERE id = $1",
        &[&sending],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE bite_sync.inbox SET ai_state = 'claimed', ai_by = 'dead', ai_at = now() - interval '10 minutes' WHERE id = $1",
        &[&abandoned],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE bite_sync.inbox SET ai_state = 'claimed', ai_by = 'busy', ai_at = now() WHERE id = $1",
        &[&live],
    )
    .await
    .unwrap();
    let worker = start_worker(setup.settings());
    wait_state(&c, abandoned, "answered").await;
    // A later message answered proves more rounds ran, each of which saw the other two rows.
    let barrier = message(&c, "wamid.S4", "34622222222", "Hola", 0.0, 0.0).await;
    wait_state(&c, barrier, "answered").await;
    worker.stop().await;
    let sends = graph_sends(&graph);
    assert_eq!(sends.len(), 2, "{sends:?}");
    assert_eq!(sends[0]["context"]["message_id"], "wamid.S2");
    assert_eq!(sends[1]["context"]["message_id"], "wamid.S4");
    assert_eq!(ai_state(&c, sending).await.0.as_deref(), Some("sending"));
    assert_eq!(ai_state(&c, live).await.0.as_deref(), Some("claimed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_taking_the_message_first_means_no_reply() {
    let (dbs, c) = mirror("ai_backend_first").await;
    let graph = fake_graph().await;
    let ai = FakeHttp::with(|r| provider_ok(r, "ok")).await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![("openai", format!("{}/v1", ai.url))];
    setup.customer_interval = "6s";
    let worker = start_worker(setup.settings());

    // Taken before the deadline: never claimed.
    let early = message(&c, "wamid.E1", LUIS, "Hola", 0.0, 0.0).await;
    c.execute(
        "UPDATE bite_sync.inbox SET delivery_state = 'delivered', delivered_at = now() WHERE id = $1",
        &[&early],
    )
    .await
    .unwrap();
    // Taken while the reply waits for Ana's send slot (held 4 s ahead): claimed, composed,
    // then dropped at the last check.
    c.execute(
        "INSERT INTO bite_sync.send_slots VALUES ($1, now() + interval '4 seconds')",
        &[&ANA],
    )
    .await
    .unwrap();
    let late = message(&c, "wamid.E2", ANA, "Hola", 0.0, 0.0).await;
    wait_for("the provider to be asked", WAIT, || async {
        (!ai.requests().is_empty()).then_some(())
    })
    .await;
    c.execute(
        "UPDATE bite_sync.inbox SET delivery_state = 'delivered', delivered_at = now() WHERE id = $1",
        &[&late],
    )
    .await
    .unwrap();
    assert_eq!(
        wait_state(&c, late, "skipped").await.as_deref(),
        Some("backend took it")
    );
    worker.stop().await;
    assert!(graph_sends(&graph).is_empty());
    assert_eq!(
        ai.requests().len(),
        1,
        "the early message was never considered"
    );
    assert_eq!(ai_state(&c, early).await, (None, None));
    let outbox: i64 = c
        .query_one("SELECT count(*) FROM bite_sync.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_worker_does_not_run() {
    let (dbs, c) = mirror("ai_no_token").await;
    let graph = fake_graph().await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.access_token = false;
    message(&c, "wamid.N1", ANA, "Hola", 5.0, 5.0).await;
    let settings = setup.settings();
    let task = tokio::spawn(fallback::run(
        pool(&settings),
        Arc::new(settings),
        CancellationToken::new(),
    ));
    tokio::time::timeout(WAIT, task)
        .await
        .expect("returns at once")
        .unwrap();
    assert!(logs().contains("AI fallback disabled"));
    assert!(graph.requests().is_empty());
}

// ---- send slots ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_one_customer_are_spaced_by_the_interval() {
    let (dbs, c) = mirror("send_slots_spacing").await;
    let graph = fake_graph().await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.customer_interval = "2s";
    let settings = setup.settings();
    let queued = |r: ratelimit::Reservation| match r {
        ratelimit::Reservation::Queued(wait) => wait,
        other => panic!("refused: {other:?}"),
    };
    let reserve = |who: &'static str| {
        let (c, settings) = (&c, &settings);
        async move {
            queued(
                ratelimit::reserve(c, settings, Some(who), Duration::from_secs(60))
                    .await
                    .unwrap(),
            )
        }
    };
    let (first, second, third, other) = (
        reserve(ANA).await,
        reserve(ANA).await,
        reserve(ANA).await,
        reserve(LUIS).await,
    );
    let interval = Duration::from_secs(2);
    assert_eq!(first, Duration::ZERO);
    assert!(
        second > Duration::from_millis(1900) && second <= interval,
        "{second:?}"
    );
    assert!(
        third > Duration::from_millis(3900) && third <= interval * 2,
        "{third:?}"
    );
    assert_eq!(other, Duration::ZERO, "customers do not share slots");

    // Through the API (another customer): two texts go at least the interval apart.
    let api = serve(settings).await;
    let http = reqwest::Client::new();
    let text = json!({"type":"text","to":"34677777777","text":"Tu pedido está listo"});
    let r = post(&http, &api, &text, Some(API_KEY)).await;
    assert_eq!(r.0, 200, "{:?}", r.1);
    let after_first = Instant::now();
    let r = post(&http, &api, &text, Some(API_KEY)).await;
    assert_eq!(r.0, 200, "{:?}", r.1);
    let gap = after_first.elapsed();
    assert!(
        gap >= Duration::from_millis(1700),
        "second send after {gap:?}"
    );
    assert_eq!(graph_sends(&graph).len(), 2);
}

// ---- POST /api/messages ----

async fn serve(settings: RelaySettings) -> String {
    let settings = Arc::new(settings);
    let state = Arc::new(MessagesState::new(pool(&settings), settings));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, messages::router(state)).await;
    });
    url
}

async fn post(
    http: &reqwest::Client,
    api: &str,
    body: &Value,
    api_key: Option<&str>,
) -> (u16, Value) {
    let mut req = http.post(format!("{api}/api/messages")).json(body);
    if let Some(k) = api_key {
        req = req.header("x-api-key", k);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn post_bearer(http: &reqwest::Client, api: &str, body: &Value, token: &str) -> (u16, Value) {
    let r = http
        .post(format!("{api}/api/messages"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_messages_takes_the_api_key_or_a_jwt_and_refuses_the_rest() {
    let (dbs, _c) = mirror("api_auth").await;
    let graph = fake_graph().await;
    let api = serve(Setup::new(&dbs.mirror_url, &graph.url).settings()).await;
    let http = reqwest::Client::new();
    let read = json!({"type":"read","message_id":"wamid.IN"});
    assert_eq!(post(&http, &api, &read, Some(API_KEY)).await.0, 200);
    let good = auth::sign_jwt(
        &json!({"sub":"backend","exp": unix_now() + 300}),
        JWT_SECRET.as_bytes(),
    );
    assert_eq!(post_bearer(&http, &api, &read, &good).await.0, 200);
    assert_eq!(graph_sends(&graph).len(), 2);

    let wrong = auth::sign_jwt(&json!({"exp": unix_now() + 300}), b"not-the-secret");
    let expired = auth::sign_jwt(&json!({"exp": unix_now() - 3600}), JWT_SECRET.as_bytes());
    let none = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        base64_url(br#"{"sub":"backend"}"#)
    );
    for (token, why) in [
        (&wrong, "signature"),
        (&expired, "expired"),
        (&none, "algorithm"),
    ] {
        let (status, body) = post_bearer(&http, &api, &read, token).await;
        assert_eq!(status, 401, "{why}");
        assert!(body["error"].as_str().unwrap().contains(why), "{body}");
    }
    assert_eq!(post(&http, &api, &read, Some("guess")).await.0, 401);
    assert_eq!(post(&http, &api, &read, None).await.0, 401);
    assert_eq!(
        graph_sends(&graph).len(),
        2,
        "nothing sent without credentials"
    );
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_messages_reach_graph_in_metas_shape() {
    let (dbs, c) = mirror("api_shapes").await;
    let graph = fake_graph().await;
    let api = serve(Setup::new(&dbs.mirror_url, &graph.url).settings()).await;
    let http = reqwest::Client::new();

    let (status, body) = post(
        &http,
        &api,
        &json!({"type":"text","to":"+34 612 345 678","text":"Tu pedido está listo","reply_to":"wamid.IN"}),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["wamid"], "wamid.reply.1");
    let text_id = body["id"].as_i64().unwrap();
    let components = json!([{"type":"body","parameters":[{"type":"text","text":"11"}]}]);
    let (status, _) = post(
        &http,
        &api,
        &json!({"type":"template","to":"US.13491208655302741918","template":{"name":"order_ready","language":"es","components":components}}),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(
        &http,
        &api,
        &json!({"type":"read","message_id":"wamid.IN","typing":true}),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["wamid"], Value::Null);

    let sends = graph.requests_to("/v25.0/");
    assert_eq!(sends.len(), 3);
    for s in &sends {
        assert_eq!(s.uri, format!("/v25.0/{PHONE_ID}/messages"));
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    assert_eq!(
        sends[0].json(),
        json!({"messaging_product":"whatsapp","recipient_type":"individual","to":ANA,"type":"text",
               "text":{"preview_url":false,"body":"Tu pedido está listo"},"context":{"message_id":"wamid.IN"}})
    );
    assert_eq!(
        sends[1].json(),
        json!({"messaging_product":"whatsapp","recipient_type":"individual",
               "recipient":"US.13491208655302741918","type":"template",
               "template":{"name":"order_ready","language":{"code":"es"},"components":components}})
    );
    assert_eq!(
        sends[2].json(),
        json!({"messaging_product":"whatsapp","status":"read","message_id":"wamid.IN",
               "typing_indicator":{"type":"text"}})
    );
    let row = c
        .query_one(
            "SELECT origin, recipient, kind, state, wamid, request->'text'->>'body' FROM bite_sync.outbox WHERE id = $1",
            &[&text_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "api");
    assert_eq!(row.get::<_, String>(1), ANA);
    assert_eq!(row.get::<_, String>(2), "text");
    assert_eq!(row.get::<_, String>(3), "sent");
    assert_eq!(row.get::<_, String>(4), "wamid.reply.1");
    assert_eq!(row.get::<_, String>(5), "Tu pedido está listo");

    // Validation names the field and sends nothing.
    for (body, field) in [
        (json!({"type":"text","to":ANA}), "text"),
        (
            json!({"type":"text","to":"no es un número","text":"x"}),
            "to",
        ),
        (
            json!({"type":"template","to":ANA,"template":{"name":"x"}}),
            "template.language",
        ),
        (json!({"type":"sms","to":ANA}), "type"),
    ] {
        let (status, answer) = post(&http, &api, &body, Some(API_KEY)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(answer["field"], field, "{answer}");
    }
    assert_eq!(graph.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_errors_map_to_422_and_502_and_no_token_to_503() {
    let (dbs, c) = mirror("api_graph_errors").await;
    let graph = FakeHttp::with(|_| {
        (
            400,
            json!({"error":{"message":"(#131047) Re-engagement message","type":"OAuthException","code":131047,
                   "error_data":{"messaging_product":"whatsapp","details":"Message failed to send because more than 24 hours have passed since the customer last replied to this number."},
                   "fbtrace_id":"AbC"}}),
        )
    })
    .await;
    let api = serve(Setup::new(&dbs.mirror_url, &graph.url).settings()).await;
    let http = reqwest::Client::new();
    let text = json!({"type":"text","to":ANA,"text":"Hola"});
    let (status, body) = post(&http, &api, &text, Some(API_KEY)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], 131047);
    assert_eq!(body["title"], "(#131047) Re-engagement message");
    let row = c
        .query_one(
            "SELECT state, error FROM bite_sync.outbox WHERE id = $1",
            &[&body["id"].as_i64().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert!(row.get::<_, String>(1).contains("131047"));

    graph.respond(|_| {
        (
            503,
            json!({"error":{"message":"Service unavailable","code":131016}}),
        )
    });
    assert_eq!(post(&http, &api, &text, Some(API_KEY)).await.0, 502);
    let mut down = graph;
    down.stop();
    assert_eq!(post(&http, &api, &text, Some(API_KEY)).await.0, 502);

    let mut setup = Setup::new(&dbs.mirror_url, &down.url);
    setup.access_token = false;
    let api = serve(setup.settings()).await;
    assert_eq!(post(&http, &api, &text, Some(API_KEY)).await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_customer_text_never_reach_logs_or_answers() {
    let (dbs, c) = mirror("secrets_stay_secret").await;
    let graph = FakeHttp::with(|_| {
        (
            401,
            json!({"error":{"message":"Error validating access token","type":"OAuthException","code":190}}),
        )
    })
    .await;
    // Providers that echo the key in their error message, as OpenAI does.
    let ai = FakeHttp::with(|r| {
        let key = r
            .header("authorization")
            .or(r.header("x-api-key"))
            .unwrap_or("")
            .to_string();
        (
            401,
            json!({"error":{"message": format!("Incorrect API key provided: {key}"),"type":"invalid_request_error","code":"invalid_api_key"}}),
        )
    })
    .await;
    let mut setup = Setup::new(&dbs.mirror_url, &graph.url);
    setup.providers = vec![
        ("openai", format!("{}/v1", ai.url)),
        ("anthropic", format!("{}/v1", ai.url)),
    ];
    setup.fallback_text = Some("Gracias");
    let worker = start_worker(setup.settings());
    let secret_text = "mi tarjeta 4111-1111-1111-1111";
    let id = message(&c, "wamid.X1", ANA, secret_text, 0.0, 0.0).await;
    assert_eq!(
        wait_state(&c, id, "failed").await.as_deref(),
        Some("graph error 190")
    );
    worker.stop().await;

    let api = serve(setup.settings()).await;
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    let text = json!({"type":"text","to":ANA,"text":secret_text});
    answers.push(post(&http, &api, &text, Some(API_KEY)).await);
    answers.push(post(&http, &api, &text, Some("wrong-key")).await);
    answers.push(post_bearer(&http, &api, &text, "not.a.jwt").await);
    assert_eq!(answers[0].0, 422);
    assert_eq!(answers[1].0, 401);

    let logs = logs();
    assert!(
        logs.contains("AI provider failed"),
        "the failures were logged"
    );
    assert!(logs.contains("refused a call to /api/messages"));
    assert!(logs.contains("graph api refused a send"));
    let errors: Vec<String> = c
        .query(
            "SELECT coalesce(error, '') FROM bite_sync.outbox UNION ALL SELECT coalesce(ai_note, '') FROM bite_sync.inbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let answers = format!("{answers:?}");
    for secret in [
        TOKEN,
        API_KEY,
        JWT_SECRET,
        OPENAI_KEY,
        ANTHROPIC_KEY,
        "wrong-key",
    ] {
        assert!(!logs.contains(secret), "{secret} in the logs");
        assert!(!answers.contains(secret), "{secret} in an answer");
        assert!(
            !errors.iter().any(|e| e.contains(secret)),
            "{secret} in the database's errors"
        );
    }
    for private in [secret_text, "Ana García", "612 345 678", ANA] {
        assert!(
            !logs.contains(private),
            "customer data in the logs: {private}"
        );
    }
}
