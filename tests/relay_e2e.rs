//! The whole WhatsApp path through real processes: Meta (the test) → `bite-sync relay` → the
//! inbox in PostgreSQL → `bite-sync run` (pull delivery) → the restaurant's backend; and the
//! AI fallback → the Graph API, with the backend, the Graph API and the AI provider as real
//! HTTP servers on loopback that record every call.

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use bite_sync::relay::signature::{self, sign};
use serde_json::{Value, json};
use support::{Daemon, FakeHttp, test_dbs, wait_for};

const VERIFY_TOKEN: &str = "e2e-verify-token";
const APP_SECRET: &str = "e2e-app-secret";
const SYNC_API_KEY: &str = "e2e-sync-api-key";
const ACCESS_TOKEN: &str = "EAAe2e-access-token";
const OPENAI_KEY: &str = "sk-e2e-openai-key";
const PHONE_NUMBER_ID: &str = "106540352242922";

fn sample(name: &str) -> Vec<u8> {
    support::payload(name)
}

/// The fakes one test talks to.
struct World {
    backend: FakeHttp,
    graph: FakeHttp,
    ai: FakeHttp,
}

impl World {
    async fn start() -> World {
        let graph = FakeHttp::with(|r| {
            let n = r.body.len();
            (
                200,
                json!({"messaging_product": "whatsapp",
                       "messages": [{"id": format!("wamid.reply.{n}")}]}),
            )
        })
        .await;
        // The model answers with the context it was given, so a test can see what it got.
        let ai = FakeHttp::with(|r| {
            let request = r.json();
            let system = request["messages"][0]["content"].as_str().unwrap_or("").to_string();
            (
                200,
                json!({"choices": [{"message": {"role": "assistant", "content": format!("AI: {system}")},
                                    "finish_reason": "stop"}]}),
            )
        })
        .await;
        World {
            backend: FakeHttp::start().await,
            graph,
            ai,
        }
    }

    fn backend_down(&self) {
        self.backend.respond(|_| (503, json!({"error": "down"})));
    }

    fn backend_up(&self) {
        self.backend.respond(|_| (200, json!({"ok": true})));
    }

    /// The backend's accepted deliveries, each as (idempotency key, body).
    fn delivered(&self) -> Vec<(String, Value)> {
        self.backend
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| {
                (
                    r.header("idempotency-key").unwrap_or("").to_string(),
                    r.json(),
                )
            })
            .collect()
    }

    fn graph_sends(&self) -> Vec<Value> {
        self.graph
            .requests_to(&format!("/v25.0/{PHONE_NUMBER_ID}/messages"))
            .iter()
            .map(|r| r.json())
            .collect()
    }
}

fn spawn(args: &[&str], env: &[(&str, String)], log_name: &str) -> Daemon {
    let mut cmd = support::bite_sync();
    let log = cmd.get_current_dir().unwrap().join(log_name);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut daemon = Daemon::new(log);
    daemon.child = Some(cmd.spawn().expect("spawn bite-sync"));
    daemon
}

/// `bite-sync relay` on the test's database, sending to the fakes; the backend is reached by
/// pull delivery, not by the relay.
async fn relay(database_url: &str, world: &World) -> (Daemon, String) {
    let env = [
        ("DATABASE_URL", database_url.to_string()),
        ("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.into()),
        ("META_APP_SECRET", APP_SECRET.into()),
        ("WHATSAPP_ACCESS_TOKEN", ACCESS_TOKEN.into()),
        ("WHATSAPP_PHONE_NUMBER_ID", PHONE_NUMBER_ID.into()),
        ("GRAPH_API_URL", world.graph.url.clone()),
        ("OPENAI_API_KEY", OPENAI_KEY.into()),
        ("OPENAI_BASE_URL", format!("{}/v1", world.ai.url)),
        ("AI_DEADLINE", "1s".into()),
        ("SYNC_API_KEY", SYNC_API_KEY.into()),
    ];
    support::start_relay(&env).await
}

/// `bite-sync run` at the restaurant, delivering only.
fn puller(database_url: &str, world: &World) -> Daemon {
    let env = [
        ("LOCAL_BACKEND_URL", format!("{}/api", world.backend.url)),
        ("SYNC_API_KEY", SYNC_API_KEY.to_string()),
    ];
    spawn(&["run", "--mirror", database_url], &env, "run.log")
}

/// Inbox rows the backend has taken.
async fn delivered(mirror: &tokio_postgres::Client) -> i64 {
    support::count(
        mirror,
        "SELECT count(*) FROM bite_sync.inbox WHERE delivery_state = 'delivered'",
    )
    .await
}

async fn post(relay_url: &str, body: &[u8]) -> u16 {
    reqwest::Client::new()
        .post(format!("{relay_url}/api/webhook"))
        .header("X-Hub-Signature-256", sign(APP_SECRET.as_bytes(), body))
        .body(body.to_vec())
        .send()
        .await
        .expect("POST /api/webhook")
        .status()
        .as_u16()
}

/// A text message from `wa_id` sent `age` ago.
fn message(id: &str, wa_id: &str, name: &str, text: &str, age: Duration) -> Vec<u8> {
    let ts = chrono::Utc::now().timestamp() - age.as_secs() as i64;
    json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "messages",
        "value": {"messaging_product": "whatsapp",
                  "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
                  "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
                  "messages": [{"from": wa_id, "id": id, "timestamp": ts.to_string(),
                                "type": "text", "text": {"body": text}}]}}]}]})
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn metas_samples_are_each_delivered_once_signed_with_the_sync_key() {
    let dbs = test_dbs("e2e_samples").await;
    let world = World::start().await;
    let (_relay, url) = relay(&dbs.mirror_url, &world).await;
    let _run = puller(&dbs.mirror_url, &world);
    let names = [
        "text.json",
        "location.json",
        "statuses.json",
        "interactive.json",
        "image.json",
        "unsupported.json",
    ];
    for _ in 0..2 {
        for name in names {
            assert_eq!(post(&url, &sample(name)).await, 200, "{name}");
        }
    }
    wait_for("8 deliveries", Duration::from_secs(30), || async {
        (world.delivered().len() >= 8).then_some(())
    })
    .await;
    // A moment more: nothing else arrives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = world.delivered();
    assert_eq!(delivered.len(), 8, "{delivered:#?}");
    let keys: std::collections::HashSet<&str> = delivered.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 8, "each item once");
    for request in world.backend.requests() {
        assert_eq!(request.header("x-api-key"), Some(SYNC_API_KEY));
        assert_eq!(
            signature::verify(
                SYNC_API_KEY.as_bytes(),
                &request.body,
                request
                    .header(signature::DELIVERY_HEADER)
                    .map(str::as_bytes)
            ),
            Ok(()),
            "every delivery carries a valid signature"
        );
        assert_eq!(request.uri, "/api/cloud-sync/webhook");
    }
    // The backend gets Meta's own envelope with the one item.
    let text = delivered
        .iter()
        .find(|(k, _)| {
            k.starts_with("wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA")
        })
        .map(|(_, b)| b)
        .expect("the text sample");
    let value = &text["entry"][0]["changes"][0]["value"];
    assert_eq!(
        value["messages"][0]["text"]["body"],
        "Does it come in another color?"
    );
    assert_eq!(value["contacts"][0]["profile"]["name"], "Sheena Nelson");
    assert_eq!(value["metadata"]["phone_number_id"], "106540352242922");
    // Meta's samples are from 2025: far too old for an AI reply.
    assert!(world.graph_sends().is_empty());
}

#[tokio::test]
async fn with_the_backend_down_the_ai_answers_from_the_mirror_and_the_message_waits() {
    let dbs = test_dbs("e2e_ai").await;
    let mirror = support::connect(&dbs.mirror_url).await;
    bite_sync::sample::load(&mirror, bite_sync::sample::SampleSize::DEMO)
        .await
        .unwrap();
    let row = mirror
        .query_one(
            "SELECT regexp_replace(c.phone, '[^0-9]', '', 'g'), c.name, \
                    (SELECT o.id FROM public.orders o WHERE o.customer_id = c.id ORDER BY o.created_at DESC LIMIT 1) \
             FROM public.customers c WHERE EXISTS (SELECT 1 FROM public.orders o WHERE o.customer_id = c.id) \
             ORDER BY c.id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (wa_id, name, last_order): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
    let world = World::start().await;
    world.backend_down();
    let (relay_daemon, url) = relay(&dbs.mirror_url, &world).await;
    let _run = puller(&dbs.mirror_url, &world);

    // Meta delivers the same message 100 times at once (its retries and other apps').
    let body = message(
        "wamid.e2e.ai.1",
        &wa_id,
        "Ana WhatsApp",
        "¿Dónde está mi pedido?",
        Duration::ZERO,
    );
    let statuses = futures_util::future::join_all((0..100).map(|_| post(&url, &body))).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // A stale one (Meta replaying an old backlog) is never answered.
    let stale = message(
        "wamid.e2e.stale",
        "34699999999",
        "Old",
        "hola",
        Duration::from_secs(3600),
    );
    assert_eq!(post(&url, &stale).await, 200);

    wait_for("the AI reply", Duration::from_secs(30), || async {
        (!world.graph_sends().is_empty()).then_some(())
    })
    .await;
    // Time for a second reply to show up, if there were one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sends = world.graph_sends();
    assert_eq!(sends.len(), 1, "one AI reply for 100 copies: {sends:#?}");
    let reply = &sends[0];
    assert_eq!(reply["to"], wa_id.as_str());
    assert_eq!(reply["context"]["message_id"], "wamid.e2e.ai.1");
    let text = reply["text"]["body"].as_str().unwrap();
    assert!(
        text.contains(&name),
        "the customer's name from the mirror: {text}"
    );
    assert!(
        text.contains(&format!("order_id: {last_order}")),
        "their last order from the mirror: {text}"
    );
    let graph_call = &world.graph.requests()[0];
    assert_eq!(
        graph_call.header("authorization"),
        Some(format!("Bearer {ACCESS_TOKEN}").as_str())
    );
    let ai_call = &world.ai.requests()[0];
    assert_eq!(
        ai_call.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    let states: HashMap<String, (String, Option<String>)> = mirror
        .query(
            "SELECT dedupe_key, delivery_state, ai_state FROM bite_sync.inbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(states.len(), 2);
    assert_eq!(
        states["wamid.e2e.ai.1"],
        ("pending".to_string(), Some("answered".to_string())),
        "answered by AI, still queued for the backend"
    );
    assert_eq!(states["wamid.e2e.stale"].1.as_deref(), Some("skipped"));

    // The backend comes back: both delivered, once each, the answered one marked so.
    world.backend_up();
    wait_for(
        "the inbox to be delivered",
        Duration::from_secs(60),
        || async { (delivered(&mirror).await == 2).then_some(()) },
    )
    .await;
    let answered = world
        .backend
        .requests()
        .into_iter()
        .rev()
        .map(|r| r.json())
        .find(|b| b["entry"][0]["changes"][0]["value"]["messages"][0]["id"] == "wamid.e2e.ai.1")
        .unwrap();
    assert_eq!(answered["bite_sync"]["answered_by_ai"], true);
    let log = relay_daemon.log();
    for secret in [
        APP_SECRET,
        ACCESS_TOKEN,
        OPENAI_KEY,
        SYNC_API_KEY,
        "¿Dónde está mi pedido?",
    ] {
        assert!(!log.contains(secret), "{secret} in the relay's log");
    }
}

#[tokio::test]
async fn everything_queued_while_the_backend_was_down_arrives_in_order_per_customer() {
    let dbs = test_dbs("e2e_order").await;
    let world = World::start().await;
    world.backend.respond(|_| (500, json!({})));
    let (_relay, url) = relay(&dbs.mirror_url, &world).await;
    let mut run = puller(&dbs.mirror_url, &world);
    // Old enough that no AI reply interferes.
    let old = Duration::from_secs(3600);
    for m in 0..8 {
        for c in 0..6 {
            let body = message(
                &format!("wamid.order.{c}.{m}"),
                &format!("3461000000{c}"),
                "C",
                &format!("{m}"),
                old,
            );
            assert_eq!(post(&url, &body).await, 200);
        }
    }
    // The backend refuses for a while; rows are retried, not lost.
    wait_for("failed attempts", Duration::from_secs(30), || async {
        (world.backend.requests().len() >= 6).then_some(())
    })
    .await;
    // The daemon at the restaurant is restarted meanwhile (kill -9).
    // SAFETY: killing our own child.
    unsafe {
        libc::kill(run.pid() as i32, libc::SIGKILL);
    }
    run.exit_code(Duration::from_secs(5));
    world.backend_up();
    let _run = puller(&dbs.mirror_url, &world);
    let mirror = support::connect(&dbs.mirror_url).await;
    wait_for("all 48 delivered", Duration::from_secs(90), || async {
        (delivered(&mirror).await == 48).then_some(())
    })
    .await;
    // The accepted deliveries, per customer, in the order the customer wrote.
    let mut per_customer: HashMap<String, Vec<i64>> = HashMap::new();
    let requests = world.backend.requests();
    let mut seen = std::collections::HashSet::new();
    for r in requests.iter().rev() {
        // Only the last (accepted) delivery of each key counts; earlier ones were refused.
        let key = r.header("idempotency-key").unwrap().to_string();
        if seen.insert(key.clone()) {
            let body = r.json();
            let msg = &body["entry"][0]["changes"][0]["value"]["messages"][0];
            per_customer
                .entry(msg["from"].as_str().unwrap().to_string())
                .or_default()
                .push(msg["text"]["body"].as_str().unwrap().parse().unwrap());
        }
    }
    assert_eq!(per_customer.len(), 6);
    for (customer, mut bodies) in per_customer {
        bodies.reverse();
        assert_eq!(bodies, (0..8).collect::<Vec<i64>>(), "customer {customer}");
    }
}

/// `bite-sync check` at the restaurant covers delivery: the backend answers, deliveries are
/// signed, the mirror has the inbox.
#[tokio::test]
async fn check_reports_what_delivery_needs() {
    let dbs = test_dbs("e2e_check").await;
    let mut world = World::start().await;
    let check = |key: Option<&'static str>, backend: String, mirror: String| async move {
        let out = tokio::task::spawn_blocking(move || {
            let mut cmd = support::bite_sync();
            cmd.args(["check", "--json", "--mirror", &mirror])
                .env("LOCAL_BACKEND_URL", backend);
            if let Some(key) = key {
                cmd.env("SYNC_API_KEY", key);
            }
            cmd.output().unwrap()
        })
        .await
        .unwrap();
        let lines: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        lines
            .into_iter()
            .filter(|l| l["side"] == "backend" || l["what"] == "WhatsApp inbox")
            .map(|l| {
                (
                    l["what"].as_str().unwrap().to_string(),
                    l["ok"].as_bool().unwrap(),
                )
            })
            .collect::<HashMap<String, bool>>()
    };
    let backend = format!("{}/api", world.backend.url);
    let before = check(None, backend.clone(), dbs.mirror_url.clone()).await;
    assert!(before["reachable"]);
    assert!(!before["deliveries signed"]);
    assert!(!before["WhatsApp inbox"]);
    let (_relay, _url) = relay(&dbs.mirror_url, &world).await;
    let after = check(Some(SYNC_API_KEY), backend.clone(), dbs.mirror_url.clone()).await;
    assert!(after.values().all(|ok| *ok), "{after:?}");
    // The check only looked: nothing was delivered.
    assert!(world.backend.requests().iter().all(|r| r.method == "GET"));
    world.backend.stop();
    let down = check(Some(SYNC_API_KEY), backend, dbs.mirror_url.clone()).await;
    assert!(!down["reachable"]);
}

/// The backend sends through the relay process: `POST /api/messages` with `x-api-key` reaches
/// the Graph API with the relay's token; without the key nothing is sent.
#[tokio::test]
async fn the_relay_serves_api_messages_for_the_backend() {
    let dbs = test_dbs("e2e_api_messages").await;
    let world = World::start().await;
    let (_relay, url) = relay(&dbs.mirror_url, &world).await;
    let send = |key: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .post(format!("{url}/api/messages"))
            .json(&json!({"type": "text", "to": "34612345678", "text": "Tu pedido está listo"}));
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        async move {
            req.send()
                .await
                .expect("POST /api/messages")
                .status()
                .as_u16()
        }
    };
    assert_eq!(send(None).await, 401);
    assert!(world.graph_sends().is_empty());
    assert_eq!(send(Some(SYNC_API_KEY)).await, 200);
    let sends = world.graph_sends();
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0]["to"], "34612345678");
    assert_eq!(sends[0]["text"]["body"], "Tu pedido está listo");
    assert_eq!(
        world.graph.requests()[0].header("authorization"),
        Some(format!("Bearer {ACCESS_TOKEN}").as_str())
    );
}

/// `bite-sync relay` as [`relay`] does, with `extra` settings.
async fn relay_with(
    database_url: &str,
    world: &World,
    extra: &[(&str, String)],
) -> (Daemon, String) {
    let mut env = vec![
        ("DATABASE_URL", database_url.to_string()),
        ("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.into()),
        ("META_APP_SECRET", APP_SECRET.into()),
        ("WHATSAPP_ACCESS_TOKEN", ACCESS_TOKEN.into()),
        ("WHATSAPP_PHONE_NUMBER_ID", PHONE_NUMBER_ID.into()),
        ("GRAPH_API_URL", world.graph.url.clone()),
        ("OPENAI_API_KEY", OPENAI_KEY.into()),
        ("OPENAI_BASE_URL", format!("{}/v1", world.ai.url)),
        ("AI_DEADLINE", "1s".into()),
        ("SYNC_API_KEY", SYNC_API_KEY.into()),
    ];
    env.extend(extra.iter().cloned());
    support::start_relay(&env).await
}

/// Statuses as Meta sends them since v25 (with `contacts`), with an entry `time`, a top-level
/// key nobody knows yet and numbers no float holds.
const STATUS_BATCH: &str = r#"{"object":"whatsapp_business_account","x_added_in_v99":{"n":-0},"entry":[{"id":"102290129340398","time":1749416383,"changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"Sheena Nelson"},"wa_id":"16505551234","user_id":"US.13491208655302741918"},{"profile":{"name":"Luis"},"wa_id":"16505550000"}],"statuses":[{"id":"wamid.out.1","status":"delivered","timestamp":"1749416400","recipient_id":"16505551234","pricing":{"billable":true,"pricing_model":"PMP","category":"utility","type":"regular"},"big":123456789012345678901234567890},{"id":"wamid.out.2","status":"read","timestamp":"1749416401","recipient_id":"16505550000","neg":-0}]},"field":"messages"}]}]}"#;

/// Issue 12.4: each delivery is Meta's envelope narrowed to its one item, every other field
/// exactly as Meta sent it (entry time, contacts for statuses, unknown keys, numbers).
#[tokio::test]
async fn deliveries_are_metas_envelope_narrowed_to_the_item_with_everything_else_as_sent() {
    let dbs = test_dbs("e2e_whole").await;
    let world = World::start().await;
    let backend = format!("{}/api", world.backend.url);
    let (_relay, url) = relay_with(
        &dbs.mirror_url,
        &world,
        &[
            ("DELIVERY_MODE", "push".into()),
            ("LOCAL_BACKEND_URL", backend),
        ],
    )
    .await;
    assert_eq!(post(&url, STATUS_BATCH.as_bytes()).await, 200);
    wait_for("2 deliveries", Duration::from_secs(30), || async {
        (world.delivered().len() >= 2).then_some(())
    })
    .await;
    // Two customers: delivered side by side, in either order.
    let requests = world.backend.requests();
    let of = |status: &str| {
        requests
            .iter()
            .find(|r| r.json()["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] == status)
            .unwrap_or_else(|| panic!("no delivery of {status}"))
    };
    for (status, contact) in [("wamid.out.1", "Sheena Nelson"), ("wamid.out.2", "Luis")] {
        let request = of(status);
        let text = String::from_utf8(request.body.clone()).unwrap();
        let body = request.json();
        let value = &body["entry"][0]["changes"][0]["value"];
        assert_eq!(value["statuses"].as_array().unwrap().len(), 1, "{text}");
        assert_eq!(value["statuses"][0]["id"], status);
        assert_eq!(value["contacts"].as_array().unwrap().len(), 1, "{text}");
        assert_eq!(value["contacts"][0]["profile"]["name"], contact);
        assert_eq!(body["entry"][0]["time"], 1749416383, "{text}");
        assert!(text.contains(r#""x_added_in_v99":{"n":-0}"#), "{text}");
        assert_eq!(value["metadata"]["phone_number_id"], "106540352242922");
        assert_eq!(body["bite_sync"]["kind"], "status");
    }
    // The items' text is Meta's, byte for byte.
    let first = String::from_utf8(of("wamid.out.1").body.clone()).unwrap();
    let item = &STATUS_BATCH[STATUS_BATCH.find(r#"{"id":"wamid.out.1""#).unwrap()..];
    let item = &item[..item.find(r#",{"id":"wamid.out.2""#).unwrap()];
    assert!(first.contains(item), "{first}\nhas not\n{item}");
    assert!(first.contains("123456789012345678901234567890"));
}

/// Issue 12.5: `DELIVERY_FORMAT=meta` posts exactly a Meta webhook body, signed with
/// `X-Hub-Signature-256` as Meta signs, at `DELIVERY_PATH` (`/` here): from the relay (push)
/// and from `bite-sync run` (pull, which then needs `META_APP_SECRET`).
#[tokio::test]
async fn the_meta_format_is_a_meta_webhook_signed_with_the_app_secret_push_and_pull() {
    let dbs = test_dbs("e2e_meta_format").await;
    let world = World::start().await;
    let pushing = [
        ("DELIVERY_MODE", "push".to_string()),
        ("LOCAL_BACKEND_URL", world.backend.url.clone()),
        ("DELIVERY_FORMAT", "meta".to_string()),
        ("DELIVERY_PATH", "/".to_string()),
    ];
    let (mut relay, url) = relay_with(&dbs.mirror_url, &world, &pushing).await;
    assert_eq!(post(&url, &sample("text.json")).await, 200);
    wait_for("the pushed delivery", Duration::from_secs(30), || async {
        (world.delivered().len() == 1).then_some(())
    })
    .await;
    relay.terminate(Duration::from_secs(15));
    // Pull: the daemon refuses to start without the app secret, then delivers with it.
    let env = |secret: bool| {
        let mut env = vec![
            ("LOCAL_BACKEND_URL", world.backend.url.clone()),
            ("DELIVERY_FORMAT", "meta".to_string()),
            ("DELIVERY_PATH", "/".to_string()),
        ];
        if secret {
            env.push(("META_APP_SECRET", APP_SECRET.to_string()));
        }
        env
    };
    let mut refused = spawn(
        &["run", "--mirror", &dbs.mirror_url],
        &env(false),
        "refused.log",
    );
    assert_eq!(refused.exit_code(Duration::from_secs(30)), Some(2));
    assert!(
        refused.log().contains("META_APP_SECRET"),
        "{}",
        refused.log()
    );
    let (_relay, url) = relay_with(&dbs.mirror_url, &world, &[]).await;
    let _run = spawn(&["run", "--mirror", &dbs.mirror_url], &env(true), "run.log");
    assert_eq!(post(&url, &sample("statuses.json")).await, 200);
    wait_for("the pulled deliveries", Duration::from_secs(30), || async {
        (world.delivered().len() == 4).then_some(())
    })
    .await;
    for request in world.backend.requests() {
        assert_eq!(request.uri, "/");
        let sig = request.header("x-hub-signature-256").map(str::as_bytes);
        assert_eq!(
            signature::verify(APP_SECRET.as_bytes(), &request.body, sig),
            Ok(()),
            "signed with META_APP_SECRET exactly as Meta signs"
        );
        let body = request.json();
        assert!(body.get("bite_sync").is_none(), "{body}");
        assert_eq!(body["object"], "whatsapp_business_account");
    }
    let text = world.backend.requests()[0].json();
    assert_eq!(
        text,
        serde_json::from_slice::<Value>(&sample("text.json")).unwrap(),
        "one message: Meta's body itself"
    );
}

/// Issue 12.7: staff answering from the WhatsApp Business app (an `smb_message_echoes` echo)
/// means no AI reply to that customer, and their waiting messages are marked answered by
/// staff; `history` imports never get one either; `smb_app_state_sync` is delivered like
/// other changes.
#[tokio::test]
async fn an_echo_from_the_business_app_stops_the_ai_and_history_never_starts_it() {
    let dbs = test_dbs("e2e_echo").await;
    let mirror = support::connect(&dbs.mirror_url).await;
    let world = World::start().await;
    world.backend_down();
    let (_relay, url) = relay(&dbs.mirror_url, &world).await;
    let now = chrono::Utc::now().timestamp();
    let waiter = "34611000001";
    let other = "34611000002";
    for (id, from) in [
        ("wamid.echo.q1", waiter),
        ("wamid.echo.q2", waiter),
        ("wamid.echo.other", other),
    ] {
        assert_eq!(
            post(
                &url,
                &message(id, from, "Cliente", "¿Tenéis mesa?", Duration::ZERO)
            )
            .await,
            200
        );
    }
    let echo = json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "smb_message_echoes", "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "message_echoes": [{"from": "15550783881", "to": waiter, "id": "wamid.staff.1",
                "timestamp": (now + 1).to_string(), "type": "text", "text": {"body": "¡Sí, a las 9!"}}]}}]}]});
    assert_eq!(post(&url, echo.to_string().as_bytes()).await, 200);
    // A six-month backfill of the same chats, with recent-looking messages.
    let history = json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "history", "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "history": [{"metadata": {"phase": 0, "chunk_order": 1, "progress": 100},
                "threads": [{"id": "34611000003", "messages": [{"from": "34611000003", "id": "wamid.hist.1",
                    "timestamp": now.to_string(), "type": "text", "text": {"body": "hola"},
                    "history_context": {"status": "READ"}}]}]}]}}]}]});
    assert_eq!(post(&url, history.to_string().as_bytes()).await, 200);
    let sync = json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "smb_app_state_sync", "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "state_sync": [{"type": "contact", "contact": {"full_name": "Ana", "phone_number": "34611000004"},
                "action": "add", "metadata": {"timestamp": now.to_string()}}]}}]}]});
    assert_eq!(post(&url, sync.to_string().as_bytes()).await, 200);
    // The other customer gets the AI's reply; the waiter's customer and the history none.
    wait_for(
        "the AI reply to the other customer",
        Duration::from_secs(30),
        || async { (!world.graph_sends().is_empty()).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sends = world.graph_sends();
    assert_eq!(sends.len(), 1, "{sends:#?}");
    assert_eq!(sends[0]["to"], other);
    let states = support::strings(
        &mirror,
        "SELECT dedupe_key || ' ' || kind || ' ' || coalesce(ai_state, '-') FROM bite_sync.inbox ORDER BY id",
    )
    .await;
    assert_eq!(states[0], "wamid.echo.q1 message staff", "{states:?}");
    assert_eq!(states[1], "wamid.echo.q2 message staff", "{states:?}");
    assert_eq!(states[2], "wamid.echo.other message answered", "{states:?}");
    assert_eq!(states[3], "echo wamid.staff.1 echo -", "{states:?}");
    assert!(states[4].ends_with(" change -"), "{states:?}");
    assert!(states[5].ends_with(" change -"), "{states:?}");
    // Everything reaches the backend when it is back, the echo and the changes too.
    world.backend_up();
    let _run = puller(&dbs.mirror_url, &world);
    wait_for("everything delivered", Duration::from_secs(60), || async {
        (delivered(&mirror).await == 6).then_some(())
    })
    .await;
    let fields: std::collections::HashSet<String> = world
        .delivered()
        .iter()
        .map(|(_, b)| {
            b["entry"][0]["changes"][0]["field"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    for field in [
        "messages",
        "smb_message_echoes",
        "history",
        "smb_app_state_sync",
    ] {
        assert!(fields.contains(field), "{field} not delivered: {fields:?}");
    }
    let q1 = world
        .delivered()
        .into_iter()
        .find(|(k, _)| k == "wamid.echo.q1")
        .unwrap();
    assert_eq!(q1.1["bite_sync"]["answered_by_staff"], true);
}

/// Issue 12.8: a customer who changes their number (`user_changed_number`), and a username
/// customer who later shows a phone, stay one customer: one delivery order, and the AI's
/// context found by the phone or user id the mirror knows them by.
#[tokio::test]
async fn a_customer_stays_one_customer_across_number_and_user_id_changes() {
    let dbs = test_dbs("e2e_identity").await;
    let mirror = support::connect(&dbs.mirror_url).await;
    bite_sync::sample::load(&mirror, bite_sync::sample::SampleSize::DEMO)
        .await
        .unwrap();
    let row = mirror
        .query_one(
            "SELECT regexp_replace(phone, '[^0-9]', '', 'g'), name FROM public.customers ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (old_phone, name): (String, String) = (row.get(0), row.get(1));
    let new_phone = "34699000111";
    let world = World::start().await;
    world.backend_down();
    let (_relay, url) = relay(&dbs.mirror_url, &world).await;
    let now = chrono::Utc::now().timestamp();
    let change = json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "messages", "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "messages": [{"from": old_phone, "id": "wamid.changed", "timestamp": now.to_string(), "type": "system",
                "system": {"body": format!("User changed from {old_phone} to {new_phone}"), "wa_id": new_phone,
                           "type": "user_changed_number"}}]}}]}]});
    assert_eq!(
        post(
            &url,
            &message("wamid.id.old", &old_phone, &name, "hola", Duration::ZERO)
        )
        .await,
        200
    );
    assert_eq!(post(&url, change.to_string().as_bytes()).await, 200);
    assert_eq!(
        post(
            &url,
            &message(
                "wamid.id.new",
                new_phone,
                &name,
                "¿y mi pedido?",
                Duration::ZERO
            )
        )
        .await,
        200
    );
    // A username user: first only a user id, later a phone beside it.
    let username = |id: &str, phone: Option<&str>| {
        let mut m = json!({"from_user_id": "US.777", "id": id, "timestamp": now.to_string(), "type": "text", "text": {"body": "hi"}});
        let mut c = json!({"user_id": "US.777", "profile": {"name": "Zoe", "username": "@zoe"}});
        if let Some(p) = phone {
            m["from"] = json!(p);
            c["wa_id"] = json!(p);
        }
        json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
            "field": "messages", "value": {"messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
                "contacts": [c], "messages": [m]}}]}]})
        .to_string()
        .into_bytes()
    };
    assert_eq!(post(&url, &username("wamid.zoe.1", None)).await, 200);
    assert_eq!(
        post(&url, &username("wamid.zoe.2", Some("34699000222"))).await,
        200
    );
    let customers = support::strings(
        &mirror,
        "SELECT dedupe_key || '=' || customer FROM bite_sync.inbox ORDER BY id",
    )
    .await;
    assert_eq!(
        customers,
        [
            format!("wamid.id.old={old_phone}"),
            format!("wamid.changed={old_phone}"),
            format!("wamid.id.new={old_phone}"),
            "wamid.zoe.1=US.777".to_string(),
            "wamid.zoe.2=US.777".to_string(),
        ],
        "one customer key across the change"
    );
    // One AI reply for the customer's burst, to the new number, with the mirror's context
    // found by the old one; the system message itself is never answered.
    wait_for("the AI replies", Duration::from_secs(30), || async {
        (world.graph_sends().len() >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sends = world.graph_sends();
    assert_eq!(sends.len(), 2, "one per customer: {sends:#?}");
    let to_new = sends
        .iter()
        .find(|s| s["to"] == new_phone)
        .expect("a reply to the new number");
    assert_eq!(to_new["context"]["message_id"], "wamid.id.new");
    let text = to_new["text"]["body"].as_str().unwrap();
    assert!(
        text.contains(&name),
        "the mirror's customer found by the old number: {text}"
    );
    assert_eq!(
        support::strings(&mirror, "SELECT coalesce(ai_state, '-') || ' ' || coalesce(ai_note, '-') FROM bite_sync.inbox WHERE dedupe_key = 'wamid.changed'").await,
        ["skipped system message"]
    );
    // Delivered in order as one customer when the backend is back.
    world.backend_up();
    let _run = puller(&dbs.mirror_url, &world);
    wait_for("everything delivered", Duration::from_secs(60), || async {
        (delivered(&mirror).await == 5).then_some(())
    })
    .await;
    let order: Vec<String> = world
        .delivered()
        .into_iter()
        .filter(|(_, b)| b["bite_sync"].is_object())
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("wamid.id.") || k == "wamid.changed")
        .collect();
    let last_three = &order[order.len() - 3..];
    assert_eq!(
        last_three,
        ["wamid.id.old", "wamid.changed", "wamid.id.new"]
    );
}
