//! `POST /api/messages`: the restaurant's backend sends WhatsApp messages through the relay,
//! so the backend never holds Meta's access token; and the send path it shares with the
//! Graph-compatible endpoint ([`super::graph_compat`]).
//!
//! Order of a send ([`send`]): authenticate from the headers ([`authenticate`]) before the
//! body is read, read and validate the body ([`parse_request`], pure, 400 naming the field),
//! check the relay can send (503), answer a retry from the outbox when its `Idempotency-Key`
//! was seen ([`outbox::earlier`]), take a send slot shared with the AI fallback (text and
//! template; not read receipts) in two steps ([`ratelimit`]), record an `outbox` row (origin
//! `api`, state `sending`), send, record the outcome and the answer, answer. Invariants:
//! - Nothing reaches Meta without valid credentials and a valid body, and nothing is sent
//!   without its `outbox` row written first: a send the database cannot record is not made
//!   (503), so the outbox is a complete account of what the relay sent.
//! - Answers map Graph's classification: definite error → 422 with Meta's code and title;
//!   transient error that surely did not reach Meta → 502; no answer from Meta in time (or a
//!   connection lost after the request went) → 504 with `"outcome": "unknown"` and the outbox
//!   id, because the message may have gone; the relay unable to send or the database down →
//!   503. A slot further away than [`MAX_SLOT_WAIT`] is a 429 with `retry_after` (and nothing
//!   reserved), rather than a request held open.
//! - With an `Idempotency-Key`, a send happens at most once per key across retries and
//!   replicas: a retry gets the first answer (header `idempotent-replayed: true`), 409 while
//!   the first is still in flight; only a send that surely did not reach Meta frees its key.
//! - Logs carry the outbox id, the kind and error codes; never the recipient, the text, a key
//!   or a token.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::body::{self, BodyError};
use super::graph::{self, GraphClient, GraphError, Reply};
use super::ratelimit::{self, Reservation};
use super::secrets::{Rotated, Uses};
use super::settings::RelaySettings;
use super::{auth, db, outbox};

/// The largest body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;
/// The longest a request waits for its send slot before it is answered 429.
pub const MAX_SLOT_WAIT: Duration = Duration::from_secs(10);
/// The header a backend names a send with, so a retry never sends twice.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// What the routes need.
pub struct MessagesState {
    /// The relay's database (outbox, send slots).
    pub pool: db::Pool,
    /// None when `WHATSAPP_ACCESS_TOKEN` or `WHATSAPP_PHONE_NUMBER_ID` is missing.
    pub graph: Option<GraphClient>,
    /// The settings (`SYNC_API_KEY`, `JWT_SECRET`, rates, timeouts).
    pub settings: Arc<RelaySettings>,
    /// Which value of each secret verified requests.
    pub uses: Arc<Uses>,
    /// Media uploads streaming to Meta at once.
    pub uploads: Arc<tokio::sync::Semaphore>,
}

impl MessagesState {
    /// The state for these settings, with the Graph client they describe.
    pub fn new(pool: db::Pool, settings: Arc<RelaySettings>) -> MessagesState {
        MessagesState {
            pool,
            graph: GraphClient::from_settings(&settings),
            settings,
            uses: Arc::new(Uses::default()),
            uploads: Arc::new(tokio::sync::Semaphore::new(
                super::graph_compat::MAX_UPLOADS,
            )),
        }
    }
}

/// `POST /api/messages` and the Graph-compatible routes, to merge into the relay's router.
pub fn router(state: Arc<MessagesState>) -> Router {
    Router::new()
        .route("/api/messages", post(send_message))
        .merge(super::graph_compat::routes())
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

/// Checks the caller's credentials (current or previous values), counting which verified.
pub(crate) fn authenticate(
    state: &MessagesState,
    headers: &HeaderMap,
) -> Result<(), auth::AuthError> {
    let s = &state.settings;
    let creds = auth::Credentials {
        api_key: s.delivery.api_key.as_ref(),
        api_key_previous: s.delivery.api_key_previous.as_ref(),
        jwt_secret: s.jwt_secret.as_ref(),
        jwt_secret_previous: s.jwt_secret_previous.as_ref(),
        jwt_max_lifetime: i64::try_from(s.jwt_max_lifetime.as_secs()).unwrap_or(i64::MAX),
    };
    match auth::check(headers, &creds, unix_now())? {
        auth::Caller::ApiKey { previous } => state.uses.record(Rotated::SyncApiKey, previous),
        auth::Caller::Jwt { previous } => state.uses.record(Rotated::JwtSecret, previous),
    }
    Ok(())
}

/// Reads an authenticated caller's body: at most `limit` bytes within the body timeout.
pub(crate) async fn read_body(
    state: &MessagesState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let deadline = tokio::time::Instant::now() + state.settings.http.body;
    body::read(
        body,
        limit,
        body::declared_length(headers),
        deadline,
        |_| {},
    )
    .await
}

/// The request's `Idempotency-Key`: none, a valid one, or a 400's reason.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, &'static str> {
    match headers.get(IDEMPOTENCY_HEADER) {
        None => Ok(None),
        Some(v) if outbox::valid_key(v.as_bytes()) => {
            Ok(Some(String::from_utf8_lossy(v.as_bytes()).into_owned()))
        }
        Some(_) => Err("Idempotency-Key: 1 to 255 visible ASCII characters"),
    }
}

/// Which API answers: the relay's own (`/api/messages`) or Meta's shape (the
/// Graph-compatible endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `{"id": …, "wamid": …}` and `{"error": …}`.
    Relay,
    /// Meta's own answers, passed through, and Meta's error envelope for the relay's own.
    Graph,
}

/// A send, validated.
pub(crate) struct Send {
    /// `text`, `template`, `read`, `image`… (the outbox's kind).
    pub kind: String,
    /// The rate limit's and the outbox's customer key (wa_id digits or BSUID); none for a
    /// read receipt or typing indicator.
    pub recipient: Option<String>,
    /// The body for Meta, as JSON (kept in the outbox).
    pub request: Value,
    /// The body for Meta, as sent.
    pub bytes: Bytes,
    /// The Graph API version to send under.
    pub version: String,
    /// The caller's `Idempotency-Key`.
    pub key: Option<String>,
}

/// Why a send was not made, or what became of it.
pub(crate) enum Answer {
    /// Credentials refused.
    Unauthorized(auth::AuthError),
    /// A field is wrong: which, and what.
    BadRequest {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No `WHATSAPP_ACCESS_TOKEN` / `WHATSAPP_PHONE_NUMBER_ID`.
    CannotSend,
    /// The database is unavailable; nothing was sent.
    DatabaseDown,
    /// The slot is too far away; nothing was reserved or sent.
    RateLimited {
        /// About when to try again.
        retry_after: Duration,
        /// The customer's spacing (else the number's throughput).
        by_customer: bool,
    },
    /// An earlier request with the key is still being sent.
    InFlight(i64),
    /// An earlier request with the key got this answer.
    Replay(u16, Value),
    /// Meta accepted the message.
    Sent {
        id: i64,
        reply: Reply,
        wamid: Option<String>,
    },
    /// Meta refused it for good.
    Refused {
        id: i64,
        error: GraphError,
        reply: Option<Reply>,
    },
    /// It surely did not reach Meta, and may succeed later.
    NotSent {
        id: i64,
        error: GraphError,
        reply: Option<Reply>,
    },
    /// It reached Meta and no answer came: it may or may not have been sent.
    Unknown { id: i64 },
}

/// What Meta's answer or the error says happened to a send.
fn outcome(id: i64, forwarded: Result<Reply, GraphError>) -> Answer {
    match forwarded {
        Ok(reply) => match reply.outcome() {
            Ok(sent) => Answer::Sent {
                id,
                wamid: sent.wamid,
                reply,
            },
            Err(error) if error.is_transient() => Answer::NotSent {
                id,
                error,
                reply: Some(reply),
            },
            Err(error) => Answer::Refused {
                id,
                error,
                reply: Some(reply),
            },
        },
        Err(error) if !error.surely_not_sent() => Answer::Unknown { id },
        Err(error) => Answer::NotSent {
            id,
            error,
            reply: None,
        },
    }
}

fn database_down(e: &dyn std::fmt::Display) -> Answer {
    tracing::warn!(error = %e, "database unavailable for a send");
    Answer::DatabaseDown
}

async fn connection(state: &MessagesState) -> Result<db::Conn, Answer> {
    state
        .pool
        .get()
        .await
        .map_err(|e| database_down(&db::describe(&e)))
}

/// Sends `send` through the relay, as the module's order says.
pub(crate) async fn send(state: &MessagesState, send: Send) -> Answer {
    let Some(graph) = &state.graph else {
        return Answer::CannotSend;
    };
    let span = tracing::info_span!(
        "api_message",
        kind = %send.kind,
        outbox_id = tracing::field::Empty
    );
    if let Some(key) = &send.key {
        let conn = match connection(state).await {
            Ok(c) => c,
            Err(a) => return a,
        };
        match outbox::earlier(&conn, key).await {
            Ok(Some(earlier)) => return replay(earlier),
            Ok(None) => {}
            Err(e) => return database_down(&crate::error_chain(&e)),
        }
    }
    if let Some(to) = send.recipient.as_deref() {
        if let Err(a) = take_slot(state, to).await {
            return a;
        }
    }
    let conn = match connection(state).await {
        Ok(c) => c,
        Err(a) => return a,
    };
    let recipient = send.recipient.clone().unwrap_or_default();
    let id = match outbox::insert(
        &conn,
        &recipient,
        &send.kind,
        &send.request,
        send.key.as_deref(),
    )
    .await
    {
        Ok(Some(id)) => id,
        // Another request with the same key won the race and sends: never twice.
        Ok(None) => {
            return match outbox::earlier(&conn, send.key.as_deref().unwrap_or_default()).await {
                Ok(Some(earlier)) => replay(earlier),
                Ok(None) => Answer::DatabaseDown,
                Err(e) => database_down(&crate::error_chain(&e)),
            };
        }
        Err(e) => return database_down(&crate::error_chain(&e)),
    };
    drop(conn);
    span.record("outbox_id", id);
    let forwarded = {
        use tracing::Instrument;
        graph
            .post_messages(&send.version, send.bytes.clone())
            .instrument(span.clone())
            .await
    };
    let answer = outcome(id, forwarded);
    span.in_scope(|| match &answer {
        Answer::Sent { .. } => tracing::info!("sent"),
        Answer::Unknown { .. } => tracing::warn!("no answer from the graph api in time: the message may have been sent; it is never sent again"),
        Answer::Refused { error, .. } | Answer::NotSent { error, .. } => {
            tracing::warn!(code = ?error.code(), error = %error, "graph api refused a send")
        }
        _ => {}
    });
    answer
}

/// Step 1 and 2 of the send slots, with their waits; an answer when the send cannot go.
async fn take_slot(state: &MessagesState, to: &str) -> Result<(), Answer> {
    let settings = &state.settings;
    // No shutdown token reaches a request handler; every wait here is bounded.
    let never = CancellationToken::new();
    let reserved = {
        let conn = connection(state).await?;
        ratelimit::reserve(&conn, settings, Some(to), MAX_SLOT_WAIT)
            .await
            .map_err(|e| database_down(&crate::error_chain(&e)))?
    };
    match reserved {
        Reservation::Refused {
            retry_after,
            by_customer,
        } => {
            return Err(Answer::RateLimited {
                retry_after,
                by_customer,
            });
        }
        Reservation::Queued(wait) => {
            let _ = ratelimit::wait_for_slot(wait, &never).await;
        }
    }
    let wait = {
        let conn = connection(state).await?;
        ratelimit::take(&conn, settings, Some(to))
            .await
            .map_err(|e| database_down(&crate::error_chain(&e)))?
    };
    let _ = ratelimit::wait_for_slot(wait, &never).await;
    Ok(())
}

fn replay(earlier: outbox::Earlier) -> Answer {
    match earlier {
        outbox::Earlier::Answered { status, body, .. } => Answer::Replay(status, body),
        outbox::Earlier::InFlight { id } => Answer::InFlight(id),
        outbox::Earlier::Unknown { id } => Answer::Unknown { id },
    }
}

/// The HTTP answer in `dialect`, and what is kept for a retry with the same key.
pub(crate) fn render(dialect: Dialect, answer: &Answer) -> (StatusCode, Value) {
    match dialect {
        Dialect::Relay => render_relay(answer),
        Dialect::Graph => super::graph_compat::render(answer),
    }
}

fn render_relay(answer: &Answer) -> (StatusCode, Value) {
    let graph_fields = |body: &mut Value, error: &GraphError| {
        if let GraphError::Api {
            code,
            title,
            details,
            ..
        } = error
        {
            body["code"] = json!(code);
            body["title"] = json!(title);
            body["details"] = json!(details);
        }
    };
    match answer {
        Answer::Unauthorized(e) => (StatusCode::UNAUTHORIZED, json!({"error": e.to_string()})),
        Answer::BadRequest { field, problem } => (
            StatusCode::BAD_REQUEST,
            json!({"error": format!("{field}: {problem}"), "field": field}),
        ),
        Answer::CannotSend => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the relay cannot send: WHATSAPP_ACCESS_TOKEN or WHATSAPP_PHONE_NUMBER_ID is not set"}),
        ),
        Answer::DatabaseDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the relay's database is unavailable"}),
        ),
        Answer::RateLimited { retry_after, .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "send rate limit: try again later", "retry_after": retry_after.as_secs_f64().ceil() as u64}),
        ),
        Answer::InFlight(id) => (
            StatusCode::CONFLICT,
            json!({"id": id, "error": "a request with this Idempotency-Key is still being sent"}),
        ),
        Answer::Replay(status, body) => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
            body.clone(),
        ),
        Answer::Sent { id, wamid, .. } => (StatusCode::OK, json!({"id": id, "wamid": wamid})),
        Answer::Refused { id, error, .. } => {
            let mut body = json!({"id": id, "error": error.to_string()});
            graph_fields(&mut body, error);
            (StatusCode::UNPROCESSABLE_ENTITY, body)
        }
        Answer::NotSent { id, error, .. } => {
            let mut body = json!({"id": id, "error": error.to_string()});
            graph_fields(&mut body, error);
            (StatusCode::BAD_GATEWAY, body)
        }
        Answer::Unknown { id } => (
            StatusCode::GATEWAY_TIMEOUT,
            json!({"id": id, "outcome": "unknown",
                   "error": "no answer from the graph api in time: the message may have been sent; retry with the same Idempotency-Key, or check before sending it again"}),
        ),
    }
}

/// Records the answer for a send that has a row, then turns it into the response.
pub(crate) async fn answer(state: &MessagesState, dialect: Dialect, answer: Answer) -> Response {
    let (status, body) = render(dialect, &answer);
    let finished = match &answer {
        Answer::Sent { id, wamid, .. } => Some((*id, "sent", wamid.as_deref(), None, false)),
        Answer::Refused { id, error, .. } => {
            Some((*id, "failed", None, Some(crate::error_chain(error)), false))
        }
        Answer::NotSent { id, error, .. } => {
            Some((*id, "failed", None, Some(crate::error_chain(error)), true))
        }
        Answer::Unknown { id } => Some((
            *id,
            "unknown",
            None,
            Some("no answer from the graph api in time".to_string()),
            false,
        )),
        _ => None,
    };
    if let Some((id, state_text, wamid, error, release_key)) = finished {
        let done = outbox::Finished {
            state: state_text,
            wamid,
            error: error.as_deref(),
            answer: (status.as_u16(), &body),
            release_key,
        };
        let recorded = match state.pool.get().await {
            Ok(conn) => outbox::finish(&conn, id, &done)
                .await
                .map_err(|e| crate::error_chain(&e)),
            Err(e) => Err(db::describe(&e)),
        };
        if let Err(e) = recorded {
            // The message went (or not) already; the row stays 'sending', which a retry with
            // the same key reads as unknown: never sent twice.
            tracing::warn!(outbox_id = id, error = %e, "could not record the outcome of a send");
        }
    }
    let mut response = match (&answer, dialect) {
        // Meta's own answer, byte for byte.
        (
            Answer::Sent { reply, .. }
            | Answer::Refused {
                reply: Some(reply), ..
            }
            | Answer::NotSent {
                reply: Some(reply), ..
            },
            Dialect::Graph,
        ) => super::graph_compat::pass_through(reply),
        _ => reply(status, body),
    };
    match answer {
        Answer::Replay(..) => {
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        Answer::RateLimited { retry_after, .. } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        _ => {}
    }
    response
}

async fn send_message(
    State(state): State<Arc<MessagesState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let dialect = Dialect::Relay;
    if let Err(e) = authenticate(&state, &headers) {
        tracing::warn!(reason = %e, "refused a call to /api/messages");
        return answer(&state, dialect, Answer::Unauthorized(e)).await;
    }
    let bad = |field: &'static str, problem: String| Answer::BadRequest { field, problem };
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(problem) => {
            return answer(&state, dialect, bad("Idempotency-Key", problem.into())).await;
        }
    };
    let bytes = match read_body(&state, &headers, body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => return answer(&state, dialect, bad("body", e.to_string())).await,
    };
    let outgoing = match parse_request(&bytes) {
        Ok(o) => o,
        Err(e) => return answer(&state, dialect, bad(e.field, e.problem)).await,
    };
    let request = match outgoing.graph_request() {
        Ok(r) => r,
        Err(e) => {
            let (field, problem) = match &e {
                GraphError::Invalid { field, problem } => (*field, (*problem).to_string()),
                other => ("body", other.to_string()),
            };
            return answer(&state, dialect, bad(field, problem)).await;
        }
    };
    let Some(version) = state.graph.as_ref().map(|g| g.version().to_string()) else {
        return answer(&state, dialect, Answer::CannotSend).await;
    };
    let recipient = outgoing.recipient().map(|to| {
        graph::recipient_field(to)
            .map(|(_, k)| k)
            .unwrap_or_default()
    });
    let send_it = Send {
        kind: outgoing.kind().to_string(),
        recipient,
        bytes: serde_json::to_vec(&request)
            .expect("a JSON value serializes")
            .into(),
        request,
        version,
        key,
    };
    let done = send(&state, send_it).await;
    answer(&state, dialect, done).await
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
