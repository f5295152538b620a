//! `bite-sync relay`: the WhatsApp Business webhook endpoint on Railway.
//!
//! Meta's webhooks arrive signed; the relay checks the signature on the raw bytes, stores
//! every message, status and change of the batch in the cloud database's durable inbox
//! (`bite_sync.inbox`, deduplicated by WhatsApp's ids) in one transaction, and only then answers
//! 200. Everything after that works from the inbox, so a relay can die at any moment and
//! several replicas can serve side by side: they coordinate only through Postgres.
//!
//! | module | job |
//! |---|---|
//! | [`settings`] | the old guide's environment variables, `[relay]` and `[delivery]` |
//! | [`db`] | the connection pool to `DATABASE_URL` |
//! | [`signature`] | `X-Hub-Signature-256` and the delivery signature: HMAC-SHA256, constant time |
//! | [`raw_json`] | JSON text read as sent, without a tree: members, elements, lenient strings (pure) |
//! | [`payload`] | Meta's envelope → inbox items, each with Meta's envelope narrowed to it (pure) |
//! | [`inbox`] | storing items (group commit in bounded chunks, dedupe, customer aliases), counters, dead letters |
//! | [`alerts`] | an alert when webhooks keep failing the signature check (a wrong `META_APP_SECRET`) |
//! | [`server`] | the axum routes: `/api/webhook`, `/api/sync/health`, `/api/webhook/status` |
//! | [`connections`] | accepting HTTP connections: timeouts, a limit from the descriptor limit, room for new requests |
//! | [`body`] | reading request bodies: size, time and memory bounds |
//! | [`deliver`] | inbox rows → the restaurant's backend, at least once, in order per customer (pull and push) |
//! | [`graph`] | the WhatsApp Cloud API client: text, template, mark-as-read; error classes |
//! | [`ratelimit`] | send slots shared by every replica (`bite_sync.send_slots`) |
//! | [`ai`] | the AI providers (OpenAI, Gemini, Anthropic): request builders, reply parsers |
//! | [`fallback`] | the AI fallback worker: one reply, at most, to messages the backend left waiting |
//! | [`auth`] | `x-api-key` / bearer key / HS256 JWT checks for the relay's own API |
//! | [`messages`] | `POST /api/messages`: the backend sends WhatsApp messages through the relay |
//! | [`graph_compat`] | `POST /{version}/{phone_number_id}/messages` and `/media`: Meta's API, through the relay |
//! | [`outbox`] | the backend's sends in `bite_sync.outbox`, and their `Idempotency-Key` |
//! | [`secrets`] | secret rotation: which value (current or `*_PREVIOUS`) verifies requests |
//!
//! Inbox contract (see `sql/migrations/0005_relay.sql`):
//! - One row per item, unique `dedupe_key`; a retried webhook adds nothing.
//! - Storing a batch notifies channel [`inbox::CHANNEL`] in the same transaction.
//! - Delivery: `delivery_state` pending → delivered on the backend's 2xx; a worker leases rows
//!   (`lease_until`, `leased_by`); each customer's rows are delivered in `id` order.
//! - AI fallback: `ai_state` moves from null to `claimed` exactly once per message, by one
//!   `UPDATE … WHERE ai_state IS NULL`; only the claimer may send.

pub mod ai;
pub mod alerts;
pub mod auth;
pub mod body;
pub mod connections;
pub mod db;
pub mod deliver;
pub mod fallback;
pub mod graph;
pub mod graph_compat;
pub mod inbox;
pub mod messages;
pub mod outbox;
pub mod payload;
pub mod ratelimit;
pub mod raw_json;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod signature;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::relay::settings::RelaySettings;

/// The relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Missing or bad settings.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The database could not be reached or prepared at start.
    #[error("the relay's database (DATABASE_URL): {0}")]
    Database(String),
    /// The port could not be opened.
    #[error("cannot listen on port {port}: {source}")]
    Listen {
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

impl RelayError {
    /// 2 for configuration, 3 for an unreachable database, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RelayError::Config(_) => 2,
            RelayError::Database(_) => 3,
            _ => 1,
        }
    }
}

/// Connections for the inbox writers (group commit) and the other routes.
const WRITERS: usize = 3;
/// Writers, the AI fallback (up to 5 at once), delivery, health and status, the messages API.
const POOL_SIZE: usize = 16;

/// Runs the relay until `cancel` fires: prepares the `bite_sync` schema, starts the inbox
/// writers and the background workers, and serves HTTP on `settings.port` (IPv6 and IPv4).
/// On cancel it stops accepting, lets requests in flight finish, and returns.
pub async fn run(settings: RelaySettings, cancel: CancellationToken) -> Result<(), RelayError> {
    settings.require()?;
    body::return_large_buffers_to_the_system();
    let url = settings.database.clone().expect("required above");
    {
        let mut client = url
            .connect()
            .await
            .map_err(|e| RelayError::Database(crate::error_chain(&e)))?;
        crate::bookkeeping::migrate(&mut client)
            .await
            .map_err(|e| RelayError::Database(crate::error_chain(&e)))?;
    }
    if !settings.can_send() {
        tracing::warn!(
            "WHATSAPP_ACCESS_TOKEN or WHATSAPP_PHONE_NUMBER_ID is not set: the relay stores and delivers webhooks but sends nothing (no AI replies, POST /api/messages answers 503)"
        );
    }
    let settings = Arc::new(settings);
    let pool = db::pool(&url, POOL_SIZE, Duration::from_secs(10));
    let workers = cancel.child_token();
    let stored = Arc::new(tokio::sync::Notify::new());
    let (store, writer_tasks) = inbox::Store::start(
        pool.clone(),
        WRITERS,
        settings.replica.clone(),
        Arc::clone(&stored),
        workers.clone(),
    );
    let counters = Arc::new(inbox::Counters::default());
    let mut background = vec![tokio::spawn(inbox::flush_counters(
        pool.clone(),
        Arc::clone(&counters),
        settings.replica.clone(),
        workers.clone(),
    ))];
    background.push(tokio::spawn(alerts::watch_signatures(
        url.clone(),
        settings.alert_webhook.clone(),
        Arc::clone(&counters),
        settings.signature_alert_window,
        workers.clone(),
    )));
    background.push(tokio::spawn(inbox::prune(
        pool.clone(),
        settings.keep,
        workers.clone(),
    )));
    background.extend(start_workers(&pool, &settings, &stored, &workers));
    let uses = Arc::new(secrets::Uses::default());
    background.push(tokio::spawn(secrets::flush(
        pool.clone(),
        Arc::clone(&uses),
        settings.replica.clone(),
        workers.clone(),
    )));

    let state = Arc::new(server::AppState {
        settings: Arc::clone(&settings),
        store,
        pool: pool.clone(),
        counters,
        budget: body::Budget::new(server::BODY_BUDGET),
        uses,
    });
    let app = app(state);
    let nofile = connections::descriptor_limit();
    let max_connections = connections::max_connections(nofile);
    if max_connections == connections::MIN_CONNECTIONS {
        tracing::warn!(
            nofile,
            "the descriptor limit (ulimit -n) is too low for a public server; raise it"
        );
    }
    let listener = listen(settings.bind, settings.port).await?;
    let addr = listener.local_addr().map_err(RelayError::Serve)?;
    tracing::info!(%addr, replica = %settings.replica, delivery = ?settings.delivery.mode, max_connections, "relay listening");
    let served = connections::serve(
        listener,
        app,
        max_connections,
        settings.http,
        cancel.clone(),
    )
    .await;
    // Requests in flight are answered; now the writers finish what they hold and stop.
    workers.cancel();
    for task in writer_tasks.into_iter().chain(background) {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    tracing::info!("relay stopped");
    served.map_err(RelayError::Serve)
}

/// The port in the relay's `relay listening addr=[::]:PORT` log line (what [`run`] logs once
/// it listens), for the benchmark and the tests that start a relay with `PORT=0`.
pub fn listening_port(log: &str) -> Option<u16> {
    log.lines()
        .find(|l| l.contains("relay listening"))?
        .split("addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// The whole router: the webhook, health and status routes, `POST /api/messages` and the
/// Graph-compatible routes.
fn app(state: Arc<server::AppState>) -> axum::Router {
    let mut messages =
        messages::MessagesState::new(state.pool.clone(), Arc::clone(&state.settings));
    messages.uses = Arc::clone(&state.uses);
    server::router(state).merge(messages::router(Arc::new(messages)))
}

/// The background workers besides the inbox writers (delivery push, AI fallback).
fn start_workers(
    pool: &db::Pool,
    settings: &Arc<RelaySettings>,
    stored: &Arc<tokio::sync::Notify>,
    cancel: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(fallback::run(
            pool.clone(),
            Arc::clone(settings),
            cancel.clone(),
        )),
        tokio::spawn(deliver::run_push(
            pool.clone(),
            Arc::clone(settings),
            Arc::clone(stored),
            cancel.clone(),
        )),
    ]
}

/// Listens on `bind:port`, or by default on `[::]:port` (IPv6 and IPv4, what Railway's private
/// network needs), or on `0.0.0.0:port` where IPv6 is unavailable.
async fn listen(
    bind: Option<std::net::IpAddr>,
    port: u16,
) -> Result<tokio::net::TcpListener, RelayError> {
    if let Some(address) = bind {
        return tokio::net::TcpListener::bind((address, port))
            .await
            .map_err(|source| RelayError::Listen { port, source });
    }
    match tokio::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(l) => Ok(l),
        Err(_) => tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port))
            .await
            .map_err(|source| RelayError::Listen { port, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_read_from_the_listening_line() {
        let log =
            "2025-01-01T00:00:00Z  INFO relay listening addr=[::]:41234 replica=r delivery=Pull\n";
        assert_eq!(listening_port(log), Some(41234));
        assert_eq!(
            listening_port("INFO relay listening addr=0.0.0.0:5000\n"),
            Some(5000)
        );
        assert_eq!(listening_port("INFO starting\n"), None);
    }
}
