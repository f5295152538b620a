//! The demo's WhatsApp part: a relay on the demo's mirror, a stand-in restaurant backend,
//! Meta's Graph API and an AI provider as small local HTTP servers, and `bite-sync run`'s pull
//! delivery between them. It shows a signed webhook stored and delivered, then, with the
//! backend stopped, the AI fallback answering from the mirror's data, and the queued message
//! delivered once the backend is back.
//!
//! The stand-ins only listen on 127.0.0.1 and hold nothing secret: the relay is the real one,
//! with its real signature check, inbox, delivery and fallback code.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::pg::connect::DbUrl;
use crate::relay::settings::{DeliverySettings, RawDelivery, RawRelay, RelaySettings};
use crate::relay::signature;

use super::DemoError;

const APP_SECRET: &str = "demo-app-secret";
const VERIFY_TOKEN: &str = "demo-verify-token";
const SYNC_API_KEY: &str = "demo-sync-key";
const PHONE_NUMBER_ID: &str = "106540352242922";
/// The demo's deadline before an AI reply (20 s in production).
const AI_DEADLINE: &str = "3s";

/// What the stand-ins saw.
#[derive(Default)]
struct Seen {
    /// Bodies the backend accepted.
    delivered: Vec<Value>,
    /// Whether the backend is up (answers 200) or down (503).
    backend_down: bool,
    /// Messages sent through the Graph API.
    sent: Vec<Value>,
    /// System prompts the AI provider was given.
    prompts: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

async fn serve(router: Router) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), DemoError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::Relay(format!("cannot listen on 127.0.0.1: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, task))
}

/// The restaurant's backend: checks the delivery signature, keeps the body.
async fn backend(State(seen): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut seen = seen.lock().expect("demo state");
    if seen.backend_down {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let signed = signature::verify(
        SYNC_API_KEY.as_bytes(),
        &body,
        headers
            .get(signature::DELIVERY_HEADER)
            .map(|v| v.as_bytes()),
    );
    if signed.is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    match serde_json::from_slice(&body) {
        Ok(v) => {
            seen.delivered.push(v);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// Meta's Graph API: accepts every message.
async fn graph(State(seen): State<Shared>, body: Bytes) -> axum::Json<Value> {
    let mut seen = seen.lock().expect("demo state");
    let n = seen.sent.len();
    seen.sent
        .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    axum::Json(json!({"messaging_product": "whatsapp",
                      "messages": [{"id": format!("wamid.demo-reply-{n}")}]}))
}

/// An OpenAI-compatible chat completion that answers from the context it was given, the way
/// a model would: the customer's name and their latest order.
async fn openai(State(seen): State<Shared>, body: Bytes) -> axum::Json<Value> {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let system = request["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let field = |section: &str, key: &str| {
        let start = system.find(&format!("{section}:\n- "))?;
        let line = system[start..].lines().nth(1)?;
        let value = line.split(&format!("{key}: ")).nth(1)?;
        Some(value.split(", ").next()?.to_string())
    };
    let name = field("Customer", "name").unwrap_or_else(|| "there".into());
    let first = name.split_whitespace().next().unwrap_or("").to_string();
    let reply = match (
        field("Recent orders", "order_id"),
        field("Recent orders", "status"),
    ) {
        (Some(id), Some(status)) => format!(
            "¡Hola {first}! Tu último pedido, el #{id}, está «{status}». El restaurante te escribirá en cuanto pueda."
        ),
        _ => format!("¡Hola {first}! El restaurante te escribirá en cuanto pueda."),
    };
    seen.lock().expect("demo state").prompts.push(system);
    axum::Json(
        json!({"choices": [{"message": {"role": "assistant", "content": reply},
                                    "finish_reason": "stop"}]}),
    )
}

/// Runs the WhatsApp part of the demo against the demo's mirror.
pub async fn show(
    mirror_plain: &str,
    mirror_url: &DbUrl,
    cancel: &CancellationToken,
) -> Result<Running, DemoError> {
    let seen: Shared = Arc::default();
    let (backend_addr, backend_task) = serve(
        Router::new()
            .route("/api/cloud-sync/webhook", post(backend))
            .with_state(Arc::clone(&seen)),
    )
    .await?;
    let (graph_addr, graph_task) = serve(
        Router::new()
            .route(&format!("/v25.0/{PHONE_NUMBER_ID}/messages"), post(graph))
            .with_state(Arc::clone(&seen)),
    )
    .await?;
    let (ai_addr, ai_task) = serve(
        Router::new()
            .route("/v1/chat/completions", post(openai))
            .with_state(Arc::clone(&seen)),
    )
    .await?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| DemoError::Relay(format!("no free port: {e}")))?;
        probe
            .local_addr()
            .map_err(|e| DemoError::Relay(e.to_string()))?
            .port()
    };
    let env = {
        let vars: Vec<(&str, String)> = vec![
            ("DATABASE_URL", mirror_plain.to_string()),
            ("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.into()),
            ("META_APP_SECRET", APP_SECRET.into()),
            ("WHATSAPP_ACCESS_TOKEN", "demo-access-token".into()),
            ("WHATSAPP_PHONE_NUMBER_ID", PHONE_NUMBER_ID.into()),
            ("GRAPH_API_URL", format!("http://{graph_addr}")),
            ("OPENAI_API_KEY", "demo-openai-key".into()),
            ("OPENAI_BASE_URL", format!("http://{ai_addr}/v1")),
            ("AI_DEADLINE", AI_DEADLINE.into()),
            ("LOCAL_BACKEND_URL", format!("http://{backend_addr}/api")),
            ("SYNC_API_KEY", SYNC_API_KEY.into()),
            ("PORT", port.to_string()),
        ];
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    };
    let mut settings =
        RelaySettings::resolve(&RawRelay::default(), &RawDelivery::default(), None, &env)
            .map_err(|e| DemoError::Relay(e.to_string()))?;
    // This machine only, as the demo says (in production the relay listens on every interface).
    settings.bind = Some(std::net::Ipv4Addr::LOCALHOST.into());
    let delivery = DeliverySettings::resolve(&RawDelivery::default(), None, &env)
        .map_err(|e| DemoError::Relay(e.to_string()))?;

    crate::outln!(
        "\n$ bite-sync relay --bind 127.0.0.1   # the WhatsApp webhook endpoint, on Railway in production\n\
         Relay on http://127.0.0.1:{port}, its inbox in the mirror database;\n\
         stand-ins on loopback for the restaurant's backend, Meta's Graph API and an OpenAI-style provider."
    );
    let stop = cancel.child_token();
    let relay = {
        let stop = stop.clone();
        tokio::spawn(async move { crate::relay::run(settings, stop).await })
    };
    crate::outln!(
        "$ LOCAL_BACKEND_URL=http://{backend_addr}/api bite-sync run ...   # pull delivery at the restaurant"
    );
    let pull = crate::relay::deliver::Pull {
        settings: delivery,
        mirror: mirror_url.clone(),
    }
    .spawn(false, stop.clone());

    let result = conversation(port, mirror_url, &seen, cancel).await;
    let running = Running {
        port,
        stop,
        relay,
        pull,
        fakes: vec![backend_task, graph_task, ai_task],
    };
    if let Err(e) = result {
        let _ = running.finish().await;
        return Err(e);
    }
    Ok(running)
}

/// The demo's relay, still serving (until [`Running::finish`]) so the user can try it.
pub struct Running {
    /// Its port on this machine.
    pub port: u16,
    stop: CancellationToken,
    relay: tokio::task::JoinHandle<Result<(), crate::relay::RelayError>>,
    pull: tokio::task::JoinHandle<()>,
    fakes: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the relay, the delivery and the stand-ins.
    pub async fn finish(self) -> Result<(), DemoError> {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.pull).await;
        let relay_result = tokio::time::timeout(Duration::from_secs(10), self.relay).await;
        for task in self.fakes {
            task.abort();
        }
        match relay_result {
            Ok(Ok(Ok(()))) | Err(_) => Ok(()),
            Ok(Ok(Err(e))) => Err(DemoError::Relay(crate::error_chain(&e))),
            Ok(Err(e)) => Err(DemoError::Relay(e.to_string())),
        }
    }
}

/// Two messages from a real customer of the sample restaurant: one delivered, one answered by
/// the AI while the backend is down.
async fn conversation(
    port: u16,
    mirror_url: &DbUrl,
    seen: &Shared,
    cancel: &CancellationToken,
) -> Result<(), DemoError> {
    let mirror = mirror_url.connect().await?;
    // A customer with an order, as the mirror has them.
    let row = mirror
        .query_one(
            "SELECT regexp_replace(c.phone, '[^0-9]', '', 'g'), c.name FROM public.customers c \
             WHERE EXISTS (SELECT 1 FROM public.orders o WHERE o.customer_id = c.id) \
             ORDER BY c.id LIMIT 1",
            &[],
        )
        .await
        .map_err(super::setup("failed to pick a customer"))?;
    let (wa_id, name): (String, String) = (row.get(0), row.get(1));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    let base = format!("http://127.0.0.1:{port}");
    let relay_up = wait(
        "the relay to answer",
        Duration::from_secs(20),
        cancel,
        || {
            let url = format!("{base}/api/sync/health");
            let client = client.clone();
            async move {
                client
                    .get(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        },
    )
    .await;
    if relay_up.is_none() {
        return Err(DemoError::Relay("the relay did not start".into()));
    }

    let post = |text: &str, n: u32| {
        let body = json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
            "field": "messages",
            "value": {"messaging_product": "whatsapp",
                      "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
                      "contacts": [{"profile": {"name": name.clone()}, "wa_id": wa_id.clone()}],
                      "messages": [{"from": wa_id.clone(), "id": format!("wamid.demo-{n}-{}", std::process::id()),
                                    "timestamp": chrono::Utc::now().timestamp().to_string(),
                                    "type": "text", "text": {"body": text}}]}}]}]})
        .to_string();
        let signature = signature::sign(APP_SECRET.as_bytes(), body.as_bytes());
        let client = client.clone();
        let url = format!("{base}/api/webhook");
        async move {
            let started = Instant::now();
            let resp = client
                .post(url)
                .header("content-type", "application/json")
                .header(signature::META_HEADER, signature)
                .body(body)
                .send()
                .await
                .map_err(|e| DemoError::Relay(format!("posting the webhook: {e}")))?;
            Ok::<_, DemoError>((resp.status().as_u16(), started.elapsed()))
        }
    };

    let text = "Hola, ¿a qué hora abrís hoy?";
    crate::outln!(
        "\nA customer, {name} (+{wa_id}), writes on WhatsApp: \"{text}\"\n\
         $ curl -X POST {base}/api/webhook -H 'X-Hub-Signature-256: sha256=…'   # as Meta does"
    );
    let (status, took) = post(text, 1).await?;
    crate::outln!(
        "  relay answered {status} in {} ms, after storing it in bite_sync.inbox",
        took.as_millis()
    );
    let started = Instant::now();
    let delivered = wait("the delivery", Duration::from_secs(20), cancel, || async {
        seen.lock().expect("demo state").delivered.first().cloned()
    })
    .await;
    match delivered {
        Some(body) => crate::outln!(
            "  the backend received it {:.1} s later (signed with SYNC_API_KEY): \"{}\" from {}",
            started.elapsed().as_secs_f64(),
            body["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"]
                .as_str()
                .unwrap_or("?"),
            body["entry"][0]["changes"][0]["value"]["contacts"][0]["profile"]["name"]
                .as_str()
                .unwrap_or("?"),
        ),
        None => return Err(DemoError::Relay("the message was not delivered".into())),
    }

    seen.lock().expect("demo state").backend_down = true;
    let text = "¿Dónde está mi pedido?";
    crate::outln!("\nThe restaurant's backend goes down. {name} writes again: \"{text}\"");
    let (status, _) = post(text, 2).await?;
    crate::outln!(
        "  relay answered {status}; the backend does not take the message, so after {AI_DEADLINE} the relay asks the AI,\n  \
         with the customer, their recent orders and the menu read from the mirror..."
    );
    let reply = wait("the AI reply", Duration::from_secs(30), cancel, || async {
        seen.lock().expect("demo state").sent.first().cloned()
    })
    .await;
    match reply {
        Some(sent) => crate::outln!(
            "  WhatsApp reply sent through the Graph API to +{}: \"{}\"",
            sent["to"].as_str().unwrap_or("?"),
            sent["text"]["body"].as_str().unwrap_or("?")
        ),
        None => return Err(DemoError::Relay("no AI reply was sent".into())),
    }

    seen.lock().expect("demo state").backend_down = false;
    crate::outln!("\nThe backend is back:");
    let queued = wait(
        "the queued message",
        Duration::from_secs(30),
        cancel,
        || async {
            let seen = seen.lock().expect("demo state");
            (seen.delivered.len() >= 2).then(|| seen.delivered[1].clone())
        },
    )
    .await;
    match queued {
        Some(body) => crate::outln!(
            "  the queued message was delivered, marked answered_by_ai = {}",
            body["bite_sync"]["answered_by_ai"]
        ),
        None => {
            return Err(DemoError::Relay(
                "the queued message was not delivered".into(),
            ));
        }
    }
    if let Ok(resp) = client
        .get(format!("{base}/api/webhook/status"))
        .send()
        .await
        && let Ok(status) = resp.json::<Value>().await
    {
        let c = &status["counters"];
        crate::outln!(
            "$ curl {base}/api/webhook/status\n  received {}, delivered {}, pending {}, answered by AI {}, duplicates {}",
            c["received"],
            c["delivered"],
            c["pending"],
            c["answered_by_ai"],
            c["duplicates"]
        );
    }
    Ok(())
}

/// Polls `check` every 100 ms until it gives a value, `timeout` passes or the demo is stopped.
async fn wait<T, F, Fut>(
    what: &str,
    timeout: Duration,
    cancel: &CancellationToken,
    mut check: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline || cancel.is_cancelled() {
            tracing::debug!(what, "gave up waiting");
            return None;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = cancel.cancelled() => return None,
        }
    }
}
