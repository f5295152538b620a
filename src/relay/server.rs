//! The relay's HTTP routes (axum).
//!
//! | route | answers |
//! |---|---|
//! | `GET /api/webhook` | Meta's verification: the challenge as plain text, or 403; no database |
//! | `POST /api/webhook` | signature (401), size (413), then the items stored (200) or 503 |
//! | `GET /api/sync/health` | 200 with mirror freshness, 503 when the database is unreachable |
//! | `GET /api/webhook/status` | inbox counters over every replica |
//!
//! The webhook is answered 200 only after its items are committed ([`inbox::Store`]); a
//! signed body that cannot be read is committed as a dead letter and also answered 200, so
//! Meta does not retry it for a week. Nothing is done before the signature is checked: the
//! relay is on the public internet with no firewall in front. The signature header's form is
//! checked before the body is read, the body is verified as it streams in, and bodies being
//! read hold at most [`BODY_BUDGET`] bytes together ([`body`]).
//!
//! Health and status are public: they say "database unreachable" when it is, never the
//! database's host, name, user or error (those go to the log), and show no secret, only
//! which value of each secret verifies requests during a rotation ([`secrets`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::relay::body::{self, BodyError, Budget};
use crate::relay::db::{self, Pool};
use crate::relay::inbox::{self, Counters, Store};
use crate::relay::secrets::{self, Rotated, Uses};
use crate::relay::settings::RelaySettings;
use crate::relay::signature;

/// The health route (Railway's health check, see railway.toml).
pub const HEALTH_PATH: &str = "/api/sync/health";

/// Meta's payloads are up to 3 MB; anything above this is refused with 413.
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;
/// Bytes that webhook bodies being read may hold together: a dozen of the largest at once,
/// so a burst of large (forged or unsigned) bodies cannot take the relay's memory; Meta's
/// real webhooks are a few kilobytes.
pub const BODY_BUDGET: usize = 12 * BODY_LIMIT;
/// What public answers say when the database cannot be used (the detail is logged).
pub const DATABASE_UNREACHABLE: &str = "database unreachable";

/// How long a request waits for the database before answering 503 (Meta then retries).
const STORE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the health check waits for the database.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// What the handlers share.
pub struct AppState {
    /// Settings.
    pub settings: Arc<RelaySettings>,
    /// The inbox's writers.
    pub store: Store,
    /// Connections for health and status.
    pub pool: Pool,
    /// In-memory counters.
    pub counters: Arc<Counters>,
    /// Memory for webhook bodies being read.
    pub budget: Budget,
    /// Which value of each secret verified requests.
    pub uses: Arc<Uses>,
}

/// The router with every route of this module.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/webhook", get(verify).post(receive))
        .route(HEALTH_PATH, get(health))
        .route("/api/webhook/status", get(status))
        .route("/", get(root))
        .with_state(state)
}

async fn root() -> &'static str {
    "bite-sync relay: POST /api/webhook (Meta), GET /api/sync/health, GET /api/webhook/status\n"
}

/// `GET /api/webhook?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`
async fn verify(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mode = query.get("hub.mode").map(String::as_str);
    let token = query.get("hub.verify_token").map(String::as_bytes);
    let challenge = query.get("hub.challenge");
    let expected = state
        .settings
        .verify_token
        .as_ref()
        .map(|t| t.expose().as_bytes());
    match (mode, token, challenge, expected) {
        (Some("subscribe"), Some(token), Some(challenge), Some(expected))
            if signature::same_token(token, expected) =>
        {
            tracing::info!("webhook verified by Meta");
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                challenge.clone(),
            )
                .into_response()
        }
        _ => {
            tracing::warn!(
                mode = mode.unwrap_or(""),
                "webhook verification refused: hub.mode is not subscribe or hub.verify_token does not match WHATSAPP_VERIFY_TOKEN"
            );
            (StatusCode::FORBIDDEN, "verification failed\n").into_response()
        }
    }
}

/// `POST /api/webhook`
async fn receive(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    // Held until the answer: the body's bytes live that long.
    let (body, _reserved) = match read_signed(&state, &headers, body).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    state.counters.window_valid.fetch_add(1, Ordering::Relaxed);
    let stored = tokio::time::timeout(STORE_TIMEOUT, state.store.store_webhook(body)).await;
    match stored {
        Ok(Ok(stored)) => {
            tracing::debug!(
                new = stored.new,
                duplicates = stored.duplicates,
                "webhook stored"
            );
            (StatusCode::OK, "EVENT_RECEIVED").into_response()
        }
        // The writer logged the cause; Meta (and whoever else posts here) learns only this.
        Ok(Err(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json_error(DATABASE_UNREACHABLE),
        )
            .into_response(),
        Err(_) => {
            tracing::warn!(
                "storing a webhook took longer than {STORE_TIMEOUT:?}; answering 503 so Meta retries"
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json_error("the database did not answer in time"),
            )
                .into_response()
        }
    }
}

/// The body of a webhook whose `X-Hub-Signature-256` matches it (under `META_APP_SECRET` or,
/// during a rotation, `META_APP_SECRET_PREVIOUS`), with the memory it holds; or the answer
/// refusing it. Checked before reading: the declared size (413) and the header's form (401).
/// Read within the memory budget (503 when it stays full) and the body timeout (408), and
/// verified as it streams in (401).
async fn read_signed(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, body::Reserved), Response> {
    let settings = &state.settings;
    let refuse = |e: signature::SignatureError, bytes: usize| {
        let counters = &state.counters;
        counters.signature_failures.fetch_add(1, Ordering::Relaxed);
        counters.window_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason = %e, bytes, "webhook refused");
        (StatusCode::UNAUTHORIZED, json_error(&e.to_string())).into_response()
    };
    let declared = body::declared_length(headers);
    if declared.is_some_and(|n| n > BODY_LIMIT) {
        return Err(too_large());
    }
    let expected =
        signature::parse_header(headers.get(signature::META_HEADER).map(|v| v.as_bytes()))
            .map_err(|e| refuse(e, declared.unwrap_or(0)))?;
    let deadline = tokio::time::Instant::now() + settings.http.body;
    let reserved = state
        .budget
        .reserve(declared.unwrap_or(BODY_LIMIT), deadline)
        .await
        .map_err(body_refused)?;
    let secrets: Vec<&[u8]> = [&settings.app_secret, &settings.app_secret_previous]
        .into_iter()
        .flatten()
        .map(|s| s.expose().as_bytes())
        .collect();
    let mut verifier = signature::Verifier::new(&secrets);
    let bytes = body::read(body, BODY_LIMIT, declared, deadline, |chunk| {
        verifier.update(chunk)
    })
    .await
    .map_err(body_refused)?;
    match verifier.finish(&expected) {
        Ok(which) => {
            // The secrets are [current, previous], either one missing.
            let previous = which > 0 || settings.app_secret.is_none();
            state.uses.record(Rotated::MetaAppSecret, previous);
            if previous {
                tracing::debug!("webhook verified with META_APP_SECRET_PREVIOUS");
            }
            Ok((bytes, reserved))
        }
        Err(e) => Err(refuse(e, bytes.len())),
    }
}

fn too_large() -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        json_error(&format!("the body is larger than {BODY_LIMIT} bytes")),
    )
        .into_response()
}

/// The answer to a webhook body that could not be read.
fn body_refused(e: BodyError) -> Response {
    match e {
        BodyError::TooLarge(_) => too_large(),
        BodyError::Timeout(_) => {
            (StatusCode::REQUEST_TIMEOUT, json_error(&e.to_string())).into_response()
        }
        BodyError::Busy => {
            tracing::warn!("webhook bodies fill the memory budget; answering 503 so Meta retries");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                json_error(&e.to_string()),
            )
                .into_response()
        }
        BodyError::Broken(_) => {
            (StatusCode::BAD_REQUEST, json_error(&e.to_string())).into_response()
        }
    }
}

/// `GET /api/sync/health`: never calls the backend or an AI provider.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match read(&state.pool, inbox::freshness).await {
        Ok(mirror) => (
            StatusCode::OK,
            axum::Json(json!({
                "status": "ok",
                "database": "up",
                "version": env!("CARGO_PKG_VERSION"),
                "replica": state.settings.replica,
                "mirror": mirror,
            })),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({
                    "status": "unavailable",
                    "database": "down",
                    "error": DATABASE_UNREACHABLE,
                    "version": env!("CARGO_PKG_VERSION"),
                    "replica": state.settings.replica,
                })),
            )
                .into_response()
        }
    }
}

/// `GET /api/webhook/status`
async fn status(State(state): State<Arc<AppState>>) -> Response {
    let result = read(&state.pool, async |client| {
        Ok((
            inbox::counts(client).await?,
            secrets::last_hour(client).await?,
        ))
    })
    .await;
    let s = &state.settings;
    let config = json!({
        "delivery_mode": s.delivery.mode,
        "delivery_enabled": s.delivery.enabled,
        "backend_configured": s.delivery.url.is_some(),
        "can_send": s.can_send(),
        "ai_providers": s.ai.providers.iter().map(|p| p.kind).collect::<Vec<_>>(),
        "ai_deadline_seconds": s.ai.deadline.as_secs_f64(),
    });
    match result {
        Ok((mut counts, uses)) => {
            // This replica's failures not yet flushed.
            counts.signature_failures +=
                state.counters.signature_failures.load(Ordering::Relaxed) as i64;
            (
                StatusCode::OK,
                axum::Json(json!({
                    "status": "ok",
                    "counters": counts,
                    "secrets": rotation(s, &uses),
                    "config": config,
                    "replica": s.replica,
                })),
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "status: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "status": "unavailable", "error": DATABASE_UNREACHABLE, "config": config, "replica": s.replica })),
            )
                .into_response()
        }
    }
}

/// For each rotatable secret: whether this replica has a previous value, and how many
/// requests each value verified in the last hour (every replica). Never a value.
fn rotation(s: &RelaySettings, uses: &[secrets::SecretUse]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for secret in Rotated::ALL {
        let (current, previous) = match secret {
            Rotated::MetaAppSecret => (&s.app_secret, &s.app_secret_previous),
            Rotated::SyncApiKey => (&s.delivery.api_key, &s.delivery.api_key_previous),
            Rotated::JwtSecret => (&s.jwt_secret, &s.jwt_secret_previous),
        };
        let used = uses.iter().find(|u| u.secret == secret.name());
        out.insert(
            secret.name().to_string(),
            json!({
                "set": current.is_some(),
                "previous_set": previous.is_some(),
                "verified_last_hour": used.map_or(0, |u| u.current_last_hour),
                "verified_by_previous_last_hour": used.map_or(0, |u| u.previous_last_hour),
                "previous_last_used_at": used.and_then(|u| u.previous_last_used_at.clone()),
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// Runs `query` on a pooled connection within [`HEALTH_TIMEOUT`], connection wait included;
/// the error as one line.
async fn read<T>(
    pool: &Pool,
    query: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
) -> Result<T, String> {
    tokio::time::timeout(HEALTH_TIMEOUT, async {
        let conn = pool.get().await.map_err(|e| db::describe(&e))?;
        query(&conn).await.map_err(|e| crate::error_chain(&e))
    })
    .await
    .unwrap_or_else(|_| Err("the database did not answer in time".into()))
}

fn json_error(message: &str) -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "error": message }))
}
