//! `POST /api/messages`: the restaurant's backend sends WhatsApp messages through the relay,
//! so the backend never holds Meta's access token.
//!
//! Order of a call: authenticate ([`auth::check`]), validate the body ([`parse_request`], pure,
//! 400 naming the field), check the relay can send (503), take a send slot shared with the AI
//! fallback (text and template; not read receipts), record an `outbox` row (origin `api`,
//! state `sending`), send, record the outcome, answer. Invariants:
//! - Nothing reaches Meta without valid credentials and a valid body, and nothing is sent
//!   without its `outbox` row written first: a send the database cannot record is not made
//!   (503), so the outbox is a complete account of what the relay sent.
//! - Answers map Graph's classification: definite error → 422 with Meta's code and title,
//!   transient error or Meta unreachable → 502, the relay unable to send or the database down
//!   → 503. A slot further away than [`MAX_SLOT_WAIT`] is a 429 with `retry_after`, rather
//!   than a request held open.
//! - Logs carry the outbox id, the kind and error codes; never the recipient, the text, a key
//!   or a token.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::graph::{self, GraphClient, GraphError};
use super::settings::RelaySettings;
use super::{auth, db, ratelimit};

/// The largest body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;
/// The longest a request waits for its send slot before it is answered 429.
pub const MAX_SLOT_WAIT: Duration = Duration::from_secs(10);

/// What the route needs.
pub struct MessagesState {
    /// The relay's database (outbox, send slots).
    pub pool: db::Pool,
    /// None when `WHATSAPP_ACCESS_TOKEN` or `WHATSAPP_PHONE_NUMBER_ID` is missing.
    pub graph: Option<GraphClient>,
    /// The settings (`SYNC_API_KEY`, `JWT_SECRET`, rates).
    pub settings: Arc<RelaySettings>,
}

impl MessagesState {
    /// The state for these settings, with the Graph client they describe.
    pub fn new(pool: db::Pool, settings: Arc<RelaySettings>) -> MessagesState {
        MessagesState {
            pool,
            graph: GraphClient::from_settings(&settings),
            settings,
        }
    }
}

/// The route `POST /api/messages`, with its body limit, to merge into the relay's router.
pub fn router(state: Arc<MessagesState>) -> Router {
    Router::new()
        .route("/api/messages", post(send_message))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A text message.
    Text {
        /// wa_id or BSUID.
        to: String,
        /// The body (at most 4096 characters).
        text: String,
        /// The customer's message to quote.
        reply_to: Option<String>,
    },
    /// A template message.
    Template {
        /// wa_id or BSUID.
        to: String,
        /// The template's name.
        name: String,
        /// Its language code, e.g. "es".
        language: String,
        /// Its components, passed to Meta as given.
        components: Option<Value>,
    },
    /// Mark a customer's message as read.
    Read {
        /// The customer's message.
        message_id: String,
        /// Also show the typing indicator.
        typing: bool,
    },
}

impl Outgoing {
    /// `text`, `template` or `read` (the outbox's kind).
    pub fn kind(&self) -> &'static str {
        match self {
            Outgoing::Text { .. } => "text",
            Outgoing::Template { .. } => "template",
            Outgoing::Read { .. } => "read",
        }
    }

    /// The recipient, for the outbox and the rate limit (none for a read receipt).
    pub fn recipient(&self) -> Option<&str> {
        match self {
            Outgoing::Text { to, .. } | Outgoing::Template { to, .. } => Some(to),
            Outgoing::Read { .. } => None,
        }
    }

    /// Meta's request body.
    pub fn graph_request(&self) -> Result<Value, GraphError> {
        match self {
            Outgoing::Text { to, text, reply_to } => {
                graph::text_request(to, text, reply_to.as_deref())
            }
            Outgoing::Template {
                to,
                name,
                language,
                components,
            } => graph::template_request(to, name, language, components.as_ref()),
            Outgoing::Read { message_id, typing } => graph::read_request(message_id, *typing),
        }
    }
}

/// A field that is missing or wrong: the 400's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// The field, e.g. `template.name`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn field(field: &'static str, problem: impl Into<String>) -> FieldError {
    FieldError {
        field,
        problem: problem.into(),
    }
}

fn string(
    v: &Value,
    key: &str,
    name: &'static str,
    required: bool,
) -> Result<Option<String>, FieldError> {
    match v.get(key) {
        None | Some(Value::Null) if required => Err(field(name, "is required")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Err(field(name, "must not be empty")),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(field(name, "must be a string")),
    }
}

/// Reads and validates a request body.
pub fn parse_request(body: &[u8]) -> Result<Outgoing, FieldError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| field("body", "is not valid JSON"))?;
    if !v.is_object() {
        return Err(field("body", "must be a JSON object"));
    }
    let kind = string(&v, "type", "type", true)?.unwrap_or_default();
    let to = |v: &Value| -> Result<String, FieldError> {
        let to = string(v, "to", "to", true)?.unwrap_or_default();
        graph::recipient_field(&to).map_err(|e| match e {
            GraphError::Invalid { problem, .. } => field("to", problem),
            other => field("to", other.to_string()),
        })?;
        Ok(to)
    };
    let outgoing = match kind.as_str() {
        "text" => {
            let text = string(&v, "text", "text", true)?.unwrap_or_default();
            if text.chars().count() > graph::MAX_TEXT_CHARS {
                return Err(field("text", "at most 4096 characters"));
            }
            Outgoing::Text {
                to: to(&v)?,
                text,
                reply_to: string(&v, "reply_to", "reply_to", false)?,
            }
        }
        "template" => {
            let t = v.get("template").filter(|t| t.is_object()).ok_or_else(|| {
                field("template", "is required (an object with name and language)")
            })?;
            let components = match t.get("components") {
                None | Some(Value::Null) => None,
                Some(c @ Value::Array(_)) => Some(c.clone()),
                Some(_) => return Err(field("template.components", "must be an array")),
            };
            Outgoing::Template {
                to: to(&v)?,
                name: string(t, "name", "template.name", true)?.unwrap_or_default(),
                language: string(t, "language", "template.language", true)?.unwrap_or_default(),
                components,
            }
        }
        "read" => Outgoing::Read {
            message_id: string(&v, "message_id", "message_id", true)?.unwrap_or_default(),
            typing: match v.get("typing") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(field("typing", "must be true or false")),
            },
        },
        other => {
            return Err(field(
                "type",
                format!(
                    "expected \"text\", \"template\" or \"read\", got {:?}",
                    other.chars().take(32).collect::<String>()
                ),
            ));
        }
    };
    Ok(outgoing)
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn send_message(
    State(state): State<Arc<MessagesState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let settings = &state.settings;
    if let Err(e) = auth::check(
        &headers,
        settings.delivery.api_key.as_ref(),
        settings.jwt_secret.as_ref(),
        unix_now(),
    ) {
        tracing::warn!(reason = %e, "refused a call to /api/messages");
        return reply(StatusCode::UNAUTHORIZED, json!({"error": e.to_string()}));
    }
    let outgoing = match parse_request(&body) {
        Ok(o) => o,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string(), "field": e.field}),
            );
        }
    };
    let Some(graph) = &state.graph else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the relay cannot send: WHATSAPP_ACCESS_TOKEN or WHATSAPP_PHONE_NUMBER_ID is not set"}),
        );
    };
    let request = match outgoing.graph_request() {
        Ok(r) => r,
        Err(e) => {
            let name = match &e {
                GraphError::Invalid { field, .. } => *field,
                _ => "body",
            };
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string(), "field": name}),
            );
        }
    };
    let span = tracing::info_span!(
        "api_message",
        kind = outgoing.kind(),
        outbox_id = tracing::field::Empty
    );
    send_recorded(&state, graph, &outgoing, request, span).await
}

fn database_down(e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "database unavailable for /api/messages");
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "the relay's database is unavailable"}),
    )
}

async fn send_recorded(
    state: &MessagesState,
    graph: &GraphClient,
    outgoing: &Outgoing,
    request: Value,
    span: tracing::Span,
) -> Response {
    let conn = match state.pool.get().await {
        Ok(c) => c,
        Err(e) => return database_down(&db::describe(&e)),
    };
    if let Some(to) = outgoing.recipient() {
        let key = graph::recipient_field(to)
            .map(|(_, k)| k)
            .unwrap_or_default();
        match ratelimit::reserve_send(&conn, &state.settings, Some(&key)).await {
            Ok(wait) if wait > MAX_SLOT_WAIT => {
                return reply(
                    StatusCode::TOO_MANY_REQUESTS,
                    json!({"error": "send rate limit: try again later", "retry_after": wait.as_secs_f64().ceil() as u64}),
                );
            }
            Ok(wait) => {
                // No shutdown token reaches a request handler; the wait is bounded above.
                let _ = ratelimit::wait_for_slot(wait, &CancellationToken::new()).await;
            }
            Err(e) => return database_down(&crate::error_chain(&e)),
        }
    }
    let recipient = outgoing
        .recipient()
        .map(|to| {
            graph::recipient_field(to)
                .map(|(_, k)| k)
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let id: i64 = match conn
        .query_one(
            "INSERT INTO bite_sync.outbox (origin, recipient, kind, request, state) \
             VALUES ('api', $1, $2, $3, 'sending') RETURNING id",
            &[&recipient, &outgoing.kind(), &request],
        )
        .await
    {
        Ok(row) => row.get(0),
        Err(e) => return database_down(&crate::error_chain(&e)),
    };
    span.record("outbox_id", id);
    let result = {
        use tracing::Instrument;
        graph.send(&request).instrument(span.clone()).await
    };
    let (state_text, wamid, error) = match &result {
        Ok(sent) => ("sent", sent.wamid.clone(), None),
        Err(e) => ("failed", None, Some(crate::error_chain(e))),
    };
    if let Err(e) = conn
        .execute(
            "UPDATE bite_sync.outbox SET state = $2, wamid = $3, error = $4, finished_at = now() \
             WHERE id = $1",
            &[&id, &state_text, &wamid, &error],
        )
        .await
    {
        // The message went (or not) already; the row stays 'sending' for a person to see.
        span.in_scope(|| tracing::warn!(error = %crate::error_chain(&e), "could not record the outcome of a send"));
    }
    match result {
        Ok(sent) => {
            span.in_scope(|| tracing::info!("sent"));
            reply(StatusCode::OK, json!({"id": id, "wamid": sent.wamid}))
        }
        Err(e) => {
            span.in_scope(
                || tracing::warn!(code = ?e.code(), error = %e, "graph api refused a send"),
            );
            let status = if e.is_transient() {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            let mut body = json!({"id": id, "error": e.to_string()});
            if let GraphError::Api {
                code,
                title,
                details,
                ..
            } = &e
            {
                body["code"] = json!(code);
                body["title"] = json!(title);
                body["details"] = json!(details);
            }
            reply(status, body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_kinds_parse() {
        let t = parse_request(
            br#"{"type":"text","to":"34612345678","text":"Hola","reply_to":"wamid.A"}"#,
        )
        .unwrap();
        assert_eq!(
            t,
            Outgoing::Text {
                to: "34612345678".into(),
                text: "Hola".into(),
                reply_to: Some("wamid.A".into())
            }
        );
        let t = parse_request(
            br#"{"type":"template","to":"US.123","template":{"name":"ready","language":"es","components":[]}}"#,
        )
        .unwrap();
        assert_eq!(t.kind(), "template");
        assert_eq!(t.graph_request().unwrap()["recipient"], "US.123");
        let r = parse_request(br#"{"type":"read","message_id":"wamid.B","typing":true}"#).unwrap();
        assert_eq!(r.recipient(), None);
        assert_eq!(
            r.graph_request().unwrap()["typing_indicator"]["type"],
            "text"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&[u8], &str); 9] = [
            (b"nope", "body"),
            (br#"{"to":"34612345678"}"#, "type"),
            (br#"{"type":"fax"}"#, "type"),
            (br#"{"type":"text","to":"34612345678"}"#, "text"),
            (br#"{"type":"text","text":"x"}"#, "to"),
            (br#"{"type":"text","to":"call me","text":"x"}"#, "to"),
            (br#"{"type":"template","to":"34612345678","template":{"language":"es"}}"#, "template.name"),
            (br#"{"type":"template","to":"34612345678","template":{"name":"n","language":"es","components":{}}}"#, "template.components"),
            (br#"{"type":"read","typing":"yes","message_id":"w"}"#, "typing"),
        ];
        for (body, name) in cases {
            let e = parse_request(body).unwrap_err();
            assert_eq!(e.field, name, "{}", String::from_utf8_lossy(body));
        }
        let long = json!({"type":"text","to":"34612345678","text":"a".repeat(4097)}).to_string();
        assert_eq!(parse_request(long.as_bytes()).unwrap_err().field, "text");
    }
}
