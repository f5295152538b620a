//! The Graph-API-compatible send endpoint: backend code written for Meta's Cloud API sends
//! through the relay by changing only its base URL (`https://graph.facebook.com` → the
//! relay's) and its token (Meta's access token → `SYNC_API_KEY`, or a JWT as for
//! `/api/messages`).
//!
//! | route | what it does |
//! |---|---|
//! | `POST /{version}/{phone_number_id}/messages` (and unversioned `/{phone_number_id}/messages`, as Graph allows) | the body is forwarded to Meta as it is, with the relay's token, through the same outbox, send slots and `Idempotency-Key` as `/api/messages` ([`super::messages::send`]) |
//! | `POST /{version}/{phone_number_id}/media` | a multipart upload streamed to Meta as it arrives (never held whole), at most [`MEDIA_LIMIT`] bytes, [`MAX_UPLOADS`] at once |
//!
//! Invariants:
//! - Meta's answers come back as Meta gave them (status and body), errors included; what the
//!   relay itself refuses is said in Meta's error envelope (`{"error": {"message", "type",
//!   "code", "error_data": {"details"}, "fbtrace_id"}}`) with the code Meta would use: 190
//!   for credentials, 100 for a bad parameter or another number's id, 131056 / 130429 for the
//!   pair and throughput limits, 2 when the relay cannot send now. A send whose outcome is
//!   unknown is a 504 whose body also says `"outcome": "unknown"` and the outbox `id`.
//! - Only the relay's own number (`WHATSAPP_PHONE_NUMBER_ID`) can be sent from: the token
//!   may reach other numbers, the backend may not.
//! - The version in the path is the one used with Meta (the request body follows it); a
//!   path without one uses `GRAPH_API_VERSION`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::body::BodyError;
use super::graph::{self, GraphError, Reply};
use super::messages::{self, Answer, Dialect, MessagesState, Send};

/// The largest media upload (Meta's largest media, documents, are 100 MB).
pub const MEDIA_LIMIT: usize = 100 * 1024 * 1024;
/// Media uploads streaming at once (each holds a few chunks in memory, never a file).
pub const MAX_UPLOADS: usize = 4;

/// The routes, to merge into the messages router.
pub fn routes() -> Router<Arc<MessagesState>> {
    Router::new()
        .route("/{version}/{phone}/messages", post(versioned_messages))
        .route("/{phone}/messages", post(unversioned_messages))
        .route("/{version}/{phone}/media", post(versioned_media))
        .route("/{phone}/media", post(unversioned_media))
}

/// Meta's error envelope.
pub fn envelope(code: i64, message: &str, details: &str) -> Value {
    json!({"error": {
        "message": format!("(#{code}) {message}"),
        "type": "OAuthException",
        "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": details},
        "fbtrace_id": "bite-sync-relay",
    }})
}

/// Meta's answer as Meta gave it.
pub fn pass_through(reply: &Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = reply
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or(HeaderValue::from_static("application/json"));
    (
        status,
        [(header::CONTENT_TYPE, content_type)],
        reply.body.clone(),
    )
        .into_response()
}

/// Meta's answer as JSON, for the outbox (and a retry with the same key).
fn reply_json(reply: &Reply) -> Value {
    serde_json::from_slice(&reply.body)
        .unwrap_or_else(|_| json!({"body": String::from_utf8_lossy(&reply.body)}))
}

/// The answer in Meta's shape.
pub(crate) fn render(answer: &Answer) -> (StatusCode, Value) {
    let bad = StatusCode::BAD_REQUEST;
    match answer {
        Answer::Unauthorized(e) => (
            StatusCode::UNAUTHORIZED,
            envelope(190, "Invalid OAuth access token", &e.to_string()),
        ),
        Answer::BadRequest { field, problem } => (
            bad,
            envelope(100, "Invalid parameter", &format!("{field}: {problem}")),
        ),
        Answer::CannotSend => (
            StatusCode::SERVICE_UNAVAILABLE,
            envelope(
                2,
                "Service temporarily unavailable",
                "the relay cannot send: WHATSAPP_ACCESS_TOKEN or WHATSAPP_PHONE_NUMBER_ID is not set",
            ),
        ),
        Answer::DatabaseDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            envelope(
                2,
                "Service temporarily unavailable",
                "the relay's database is unavailable; nothing was sent",
            ),
        ),
        Answer::RateLimited {
            retry_after,
            by_customer,
        } => {
            let secs = retry_after.as_secs_f64().ceil() as u64;
            let mut body = if *by_customer {
                envelope(
                    131056,
                    "(Business Account, Consumer Account) pair rate limit hit",
                    &format!("too many messages to this customer; try again in {secs} s"),
                )
            } else {
                envelope(
                    130429,
                    "Rate limit hit",
                    &format!("the number's throughput is reached; try again in {secs} s"),
                )
            };
            body["retry_after"] = json!(secs);
            (bad, body)
        }
        Answer::InFlight(id) => {
            let mut body = envelope(
                131000,
                "Something went wrong",
                "a request with this Idempotency-Key is still being sent",
            );
            body["id"] = json!(id);
            (StatusCode::CONFLICT, body)
        }
        Answer::Replay(status, body) => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
            body.clone(),
        ),
        Answer::Sent { reply, .. } => (
            StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK),
            reply_json(reply),
        ),
        Answer::Refused {
            reply: Some(reply), ..
        }
        | Answer::NotSent {
            reply: Some(reply), ..
        } => (
            StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY),
            reply_json(reply),
        ),
        Answer::Refused {
            error, reply: None, ..
        } => (bad, envelope(100, "Invalid parameter", &error.to_string())),
        Answer::NotSent {
            error, reply: None, ..
        } => (
            StatusCode::BAD_GATEWAY,
            envelope(2, "Service temporarily unavailable", &error.to_string()),
        ),
        Answer::Unknown { id } => {
            let mut body = envelope(
                131000,
                "Something went wrong",
                "no answer from the graph api in time: the message may have been sent; retry with the same Idempotency-Key, or check before sending it again",
            );
            body["outcome"] = json!("unknown");
            body["id"] = json!(id);
            (StatusCode::GATEWAY_TIMEOUT, body)
        }
    }
}

/// A version like `v25.0`.
fn valid_version(v: &str) -> bool {
    v.strip_prefix('v').is_some_and(|rest| {
        let mut parts = rest.split('.');
        matches!(
            (parts.next(), parts.next(), parts.next()),
            (Some(major), Some(minor), None)
                if !major.is_empty() && !minor.is_empty()
                    && major.len() <= 4 && minor.len() <= 4
                    && major.chars().chain(minor.chars()).all(|c| c.is_ascii_digit())
        )
    })
}

/// The version to use with Meta and whether the path names the relay's number; the answer
/// refusing the path otherwise.
fn check_path(
    state: &MessagesState,
    version: Option<&str>,
    phone: &str,
) -> Result<String, Box<Answer>> {
    let Some(graph) = &state.graph else {
        return Err(Box::new(Answer::CannotSend));
    };
    let version = match version {
        Some(v) if valid_version(v) => v.to_string(),
        Some(_) => {
            return Err(Box::new(Answer::BadRequest {
                field: "version",
                problem: "expected a Graph API version like v25.0".into(),
            }));
        }
        None => graph.version().to_string(),
    };
    if phone != graph.phone_number_id() {
        let shown = if phone.len() <= 32 && phone.chars().all(|c| c.is_ascii_digit()) {
            phone
        } else {
            "…"
        };
        return Err(Box::new(Answer::BadRequest {
            field: "phone_number_id",
            problem: format!(
                "Unsupported post request. Object with ID '{shown}' is not this relay's number (WHATSAPP_PHONE_NUMBER_ID)"
            ),
        }));
    }
    Ok(version)
}

/// What a `/messages` body is, for the outbox and the send slots: its kind and recipient.
pub fn classify(request: &Value) -> Result<(String, Option<String>), (&'static str, String)> {
    let Some(object) = request.as_object() else {
        return Err(("body", "must be a JSON object".into()));
    };
    let text = |key: &str| object.get(key).and_then(Value::as_str);
    if text("status").is_some() {
        // A read receipt or typing indicator: no recipient, no send slot.
        return Ok(("read".into(), None));
    }
    let kind = text("type").unwrap_or("text").chars().take(32).collect();
    let recipient = match (text("to"), text("recipient")) {
        (Some(to), _) if !to.trim().is_empty() => to,
        (_, Some(r)) if !r.trim().is_empty() => r,
        _ => return Err(("to", "The parameter to is required".into())),
    };
    let key = graph::recipient_field(recipient).map_err(|e| match e {
        GraphError::Invalid { field, problem } => (field, problem.to_string()),
        other => ("to", other.to_string()),
    })?;
    Ok((kind, Some(key.1)))
}

async fn versioned_messages(
    State(state): State<Arc<MessagesState>>,
    Path((version, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    messages_route(&state, Some(&version), &phone, &headers, body).await
}

async fn unversioned_messages(
    State(state): State<Arc<MessagesState>>,
    Path(phone): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    messages_route(&state, None, &phone, &headers, body).await
}

async fn messages_route(
    state: &MessagesState,
    version: Option<&str>,
    phone: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let dialect = Dialect::Graph;
    if let Err(e) = messages::authenticate(state, headers) {
        tracing::warn!(reason = %e, "refused a call to the Graph-compatible endpoint");
        return messages::answer(state, dialect, Answer::Unauthorized(e)).await;
    }
    let version = match check_path(state, version, phone) {
        Ok(v) => v,
        Err(a) => return messages::answer(state, dialect, *a).await,
    };
    let bad = |field: &'static str, problem: String| Answer::BadRequest { field, problem };
    let key = match messages::idempotency_key(headers) {
        Ok(k) => k,
        Err(p) => return messages::answer(state, dialect, bad("Idempotency-Key", p.into())).await,
    };
    let bytes = match messages::read_body(state, headers, body, messages::BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => return messages::answer(state, dialect, bad("body", e.to_string())).await,
    };
    let Ok(request) = serde_json::from_slice::<Value>(&bytes) else {
        return messages::answer(state, dialect, bad("body", "is not valid JSON".into())).await;
    };
    let (kind, recipient) = match classify(&request) {
        Ok(c) => c,
        Err((field, problem)) => {
            return messages::answer(state, dialect, bad(field, problem)).await;
        }
    };
    let send = Send {
        kind,
        recipient,
        request,
        bytes,
        version,
        key,
    };
    let done = messages::send(state, send).await;
    messages::answer(state, dialect, done).await
}

async fn versioned_media(
    State(state): State<Arc<MessagesState>>,
    Path((version, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    media_route(&state, Some(&version), &phone, &headers, body).await
}

async fn unversioned_media(
    State(state): State<Arc<MessagesState>>,
    Path(phone): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    media_route(&state, None, &phone, &headers, body).await
}

/// `POST …/media`: the multipart body streamed to Meta chunk by chunk, each chunk due within
/// the body timeout of the last, at most [`MEDIA_LIMIT`] bytes.
async fn media_route(
    state: &MessagesState,
    version: Option<&str>,
    phone: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let refuse = |status: StatusCode, code: i64, message: &str, details: &str| {
        (status, axum::Json(envelope(code, message, details))).into_response()
    };
    if let Err(e) = messages::authenticate(state, headers) {
        tracing::warn!(reason = %e, "refused a media upload");
        return refuse(
            StatusCode::UNAUTHORIZED,
            190,
            "Invalid OAuth access token",
            &e.to_string(),
        );
    }
    let version = match check_path(state, version, phone) {
        Ok(v) => v,
        Err(a) => {
            let (status, body) = render(&a);
            return (status, axum::Json(body)).into_response();
        }
    };
    let Some(graph) = &state.graph else {
        let (status, body) = render(&Answer::CannotSend);
        return (status, axum::Json(body)).into_response();
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            100,
            "Invalid parameter",
            "media uploads are multipart/form-data (file, type, messaging_product)",
        );
    }
    if super::body::declared_length(headers).is_some_and(|n| n > MEDIA_LIMIT) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            100,
            "Invalid parameter",
            &format!("the upload is larger than {MEDIA_LIMIT} bytes"),
        );
    }
    let idle = state.settings.http.body;
    let Ok(Ok(_slot)) =
        tokio::time::timeout(idle, Arc::clone(&state.uploads).acquire_owned()).await
    else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            2,
            "Service temporarily unavailable",
            "too many media uploads at once; try again",
        );
    };
    let problem: Arc<Mutex<Option<BodyError>>> = Arc::default();
    let stream = bounded(body, idle, Arc::clone(&problem));
    let forwarded = graph
        .post_media(&version, content_type, reqwest::Body::wrap_stream(stream))
        .await;
    if let Some(e) = problem.lock().expect("never poisoned").take() {
        let status = match e {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        };
        return refuse(status, 100, "Invalid parameter", &e.to_string());
    }
    match forwarded {
        Ok(reply) => {
            tracing::info!(status = reply.status, "media upload forwarded");
            pass_through(&reply)
        }
        Err(e) => {
            tracing::warn!(error = %e, "media upload failed");
            refuse(
                StatusCode::BAD_GATEWAY,
                2,
                "Service temporarily unavailable",
                &e.to_string(),
            )
        }
    }
}

/// The body as a stream that fails (and says why in `problem`) past [`MEDIA_LIMIT`] bytes
/// or when a chunk is not there within `idle` of the last.
fn bounded(
    body: Body,
    idle: Duration,
    problem: Arc<Mutex<Option<BodyError>>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + std::marker::Send + 'static
{
    let data = body.into_data_stream();
    futures_util::stream::unfold(
        (data, 0usize, problem, false),
        move |(mut data, seen, problem, done)| async move {
            if done {
                return None;
            }
            let fail = |e: BodyError, problem: Arc<Mutex<Option<BodyError>>>, data| {
                let message = e.to_string();
                *problem.lock().expect("never poisoned") = Some(e);
                Some((
                    Err(std::io::Error::other(message)),
                    (data, seen, problem, true),
                ))
            };
            match tokio::time::timeout(idle, data.next()).await {
                Err(_) => fail(BodyError::Timeout(idle), problem, data),
                Ok(None) => None,
                Ok(Some(Err(e))) => fail(BodyError::Broken(e), problem, data),
                Ok(Some(Ok(chunk))) if seen + chunk.len() > MEDIA_LIMIT => {
                    fail(BodyError::TooLarge(MEDIA_LIMIT), problem, data)
                }
                Ok(Some(Ok(chunk))) => {
                    let seen = seen + chunk.len();
                    Some((Ok(chunk), (data, seen, problem, false)))
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_look_like_metas() {
        for ok in ["v25.0", "v21.0", "v9.10"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in [
            "25.0", "v25", "v25.0.1", "v.0", "vx.0", "v25.0a", "", "v12345.0",
        ] {
            assert!(!valid_version(bad), "{bad}");
        }
    }

    #[test]
    fn bodies_are_classified_for_the_outbox_and_the_slots() {
        let text = json!({"messaging_product":"whatsapp","to":"+34 612 345 678","type":"text","text":{"body":"hi"}});
        assert_eq!(
            classify(&text).unwrap(),
            ("text".into(), Some("34612345678".into()))
        );
        let image = json!({"messaging_product":"whatsapp","recipient":"US.13491208655302741918","type":"image","image":{"id":"1"}});
        assert_eq!(
            classify(&image).unwrap(),
            ("image".into(), Some("US.13491208655302741918".into()))
        );
        let read = json!({"messaging_product":"whatsapp","status":"read","message_id":"wamid.A"});
        assert_eq!(classify(&read).unwrap(), ("read".into(), None));
        let untyped =
            json!({"messaging_product":"whatsapp","to":"34612345678","text":{"body":"hi"}});
        assert_eq!(classify(&untyped).unwrap().0, "text", "Meta's default type");
        assert_eq!(classify(&json!({"type":"text"})).unwrap_err().0, "to");
        assert_eq!(classify(&json!([1])).unwrap_err().0, "body");
        assert_eq!(classify(&json!({"to":"call me"})).unwrap_err().0, "to");
    }

    #[test]
    fn the_relays_own_refusals_use_metas_envelope() {
        let (status, body) = render(&Answer::RateLimited {
            retry_after: Duration::from_millis(5200),
            by_customer: true,
        });
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], 131056);
        assert_eq!(body["retry_after"], 6);
        let (status, body) = render(&Answer::Unknown { id: 17 });
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["outcome"], "unknown");
        assert_eq!(body["id"], 17);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("(#131000)")
        );
        let (status, body) = render(&Answer::Unauthorized(
            super::super::auth::AuthError::Missing,
        ));
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], 190);
    }
}
