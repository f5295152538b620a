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
//! relay is on the public internet with no firewall in front.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::relay::db::{self, Pool};
use crate::relay::inbox::{self, Counters, Store};
use crate::relay::settings::RelaySettings;
use crate::relay::signature;

/// The health route (Railway's health check, see railway.toml).
pub const HEALTH_PATH: &str = "/api/sync/health";

/// Meta's payloads are up to 3 MB; anything above this is refused with 413.
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;

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
}

/// The router with every route of this module.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/webhook", get(verify).post(receive))
        .route(HEALTH_PATH, get(health))
        .route("/api/webhook/status", get(status))
        .route("/", get(root))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
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
async fn receive(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let secret = state
        .settings
        .app_secret
        .as_ref()
        .map(|s| s.expose().as_bytes())
        .unwrap_or_default();
    let given = headers.get(signature::META_HEADER).map(|v| v.as_bytes());
    if let Err(e) = signature::verify(secret, &body, given) {
        let counters = &state.counters;
        counters.signature_failures.fetch_add(1, Ordering::Relaxed);
        counters.window_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason = %e, bytes = body.len(), "webhook refused");
        return (StatusCode::UNAUTHORIZED, json_error(&e.to_string())).into_response();
    }
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
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, json_error(&e.to_string())).into_response(),
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
                    "error": e,
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
    let result = read(&state.pool, inbox::counts).await;
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
        Ok(mut counts) => {
            // This replica's failures not yet flushed.
            counts.signature_failures +=
                state.counters.signature_failures.load(Ordering::Relaxed) as i64;
            (
                StatusCode::OK,
                axum::Json(json!({ "status": "ok", "counters": counts, "config": config, "replica": s.replica })),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "unavailable", "error": e, "config": config, "replica": s.replica })),
        )
            .into_response(),
    }
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
