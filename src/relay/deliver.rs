//! Delivery of inbox rows to the restaurant's backend: at least once, in order per customer.
//!
//! Two modes share this module. In pull mode (the default) `bite-sync run` at the restaurant
//! dials out to the cloud database, `LISTEN`s on [`CHANNEL`] and POSTs each row to
//! `LOCAL_BACKEND_URL` (no inbound port at the restaurant). In push mode the relay itself runs
//! [`run_push`] and POSTs with a short timeout; whatever it cannot deliver stays pending and is
//! taken by the next attempt, its own or a pull daemon's: both modes take rows through the
//! same claim, so they can run side by side and fall back on each other without coordination.
//!
//! # The request
//! One row per POST, in Meta's webhook shape holding just that item (see [`envelope`]), so a
//! backend written for Meta's webhooks keeps working; `idempotency-key` is the row's
//! `dedupe_key` (the message id), so a backend can drop the duplicates at-least-once allows.
//! With `SYNC_API_KEY` set the key goes in `x-api-key` and signs the body
//! (`x-bite-signature-256: sha256=<HMAC-SHA256(SYNC_API_KEY, body)>`).
//!
//! # Invariants and why the SQL keeps them
//! - **At least once.** A row leaves `pending` only through [`MARK_DELIVERED`], which runs after
//!   the backend answered 2xx. A worker that dies (kill -9, lost uplink) after claiming leaves a
//!   lease that expires after `timeout + LEASE_MARGIN`; the row is then claimed again. So a row
//!   can be delivered twice (the backend's 2xx was lost with the worker), never zero times;
//!   the repeat carries the same `idempotency-key`.
//! - **In order per customer, never two of a customer's rows at once.** [`CLAIM`] only takes a
//!   customer's *head*: the lowest-id pending row of that customer. `delivered` is terminal,
//!   so if a statement's snapshot saw a row as the head, every lower-id row of that customer
//!   the snapshot saw was already delivered for good. The head is taken only when free (no
//!   live lease) and due, under `FOR UPDATE SKIP LOCKED`: a head another worker is claiming
//!   right now is locked and skipped; one it claimed or delivered after our snapshot is
//!   re-read at lock time (PostgreSQL re-checks the row's conditions on its newest version), so
//!   its live lease or `delivered` state excludes it. A later row of a customer is therefore
//!   never claimed while an earlier one is pending, so a failing row holds back that
//!   customer's later rows and nobody else's, and two workers never hold one customer.
//! - **A lease is only used by its holder.** Outcomes are written only `WHERE leased_by = me`;
//!   `me` is the worker's name plus its process id and a counter, so two daemons on one host
//!   or a restarted replica never take each other's leases for their own. A lease outlives the
//!   request (the HTTP timeout bounds it) and the outcome's write ([`DB_TIMEOUT`]), so a row is
//!   not claimed again while its request may still be in flight.
//!
//! The order is `id` order, which is the order in which the relay stored the items. Items of
//! one webhook batch are stored in one transaction, so they keep their order; two webhooks
//! for one customer stored by two replicas at the same instant have no order to keep.
//!
//! # Failures
//! A non-2xx answer, a timeout or a refused connection keeps the row pending with
//! `last_error` (the status or the kind of failure, never the body) and
//! `next_attempt_at = now() + `[`retry_delay`]. The database going away ends the worker's
//! session: requests in flight finish, then it reconnects with backoff and releases any lease
//! it could not settle. Nothing is lost meanwhile: rows wait in the inbox, a NOTIFY missed
//! while disconnected is made up by the sweep every [`SWEEP`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::db;
use super::settings::{DeliveryFormat, DeliveryMode, DeliverySettings, RelaySettings, Secret};
use super::signature;
use crate::bookkeeping::{self, BookkeepingError};
use crate::config::{Config, ConfigError};
use crate::pg::connect::{ConnectError, DbUrl};

/// The channel the relay notifies in the transaction that stores rows
/// (`NOTIFY bite_sync_inbox`); pull workers listen on it.
pub use crate::relay::inbox::CHANNEL;

/// Push mode's request timeout, at most: the relay should not sit on a slow backend.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a worker looks for due rows without being woken (a missed NOTIFY, a retry that
/// became due, a lease that expired).
pub const SWEEP: Duration = Duration::from_secs(1);

/// A lease lasts the request timeout plus this: long enough for the claim to reach the worker
/// and the outcome to be written ([`DB_TIMEOUT`]), so a lease never expires under a request
/// that may still be in flight.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Every statement a worker runs is given this long; a database that does not answer ends
/// the session instead of hanging it.
pub const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests in flight per worker, each for a different customer.
pub const IN_FLIGHT: usize = 8;

/// Longest wait between two reconnection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// Takes up to `$3` due customer heads (see the module docs) and leases them to `$2` for
/// `$1` seconds. `heads` and `free` are materialized so the lock is taken exactly on the rows
/// chosen; the `UPDATE` re-checks pending and free on the locked row's newest version.
pub const CLAIM: &str = "\
WITH heads AS MATERIALIZED (
    SELECT DISTINCT ON (customer) id
    FROM bite_sync.inbox
    WHERE delivery_state = 'pending'
    ORDER BY customer, id
), free AS MATERIALIZED (
    SELECT i.id
    FROM bite_sync.inbox i
    JOIN heads h ON h.id = i.id
    WHERE i.delivery_state = 'pending'
      AND (i.lease_until IS NULL OR i.lease_until <= now())
      AND i.next_attempt_at <= now()
    ORDER BY i.id
    LIMIT $3
    FOR UPDATE OF i SKIP LOCKED
)
UPDATE bite_sync.inbox i
SET lease_until = now() + make_interval(secs => $1),
    leased_by = $2,
    attempts = i.attempts + 1,
    last_attempt_at = now()
FROM free
WHERE i.id = free.id
  AND i.delivery_state = 'pending'
  AND (i.lease_until IS NULL OR i.lease_until <= now())
RETURNING i.id, i.kind, i.dedupe_key, i.waba_id, i.field, i.metadata, i.item, i.contact,
          to_json(i.received_at), i.ai_state IS NOT DISTINCT FROM 'answered', i.ai_reply_wamid,
          i.attempts, i.envelope, i.ai_state IS NOT DISTINCT FROM 'staff'";

/// The backend took row `$1`: delivered by `$3`, if `$2` still holds its lease.
pub const MARK_DELIVERED: &str = "\
UPDATE bite_sync.inbox
SET delivery_state = 'delivered', delivered_at = now(), delivered_by = $3,
    lease_until = NULL, leased_by = NULL
WHERE id = $1 AND leased_by = $2 AND delivery_state = 'pending'";

/// Row `$1` failed with `$3`: try again in `$4` seconds, if `$2` still holds its lease.
pub const MARK_FAILED: &str = "\
UPDATE bite_sync.inbox
SET last_error = $3, next_attempt_at = now() + make_interval(secs => $4),
    lease_until = NULL, leased_by = NULL
WHERE id = $1 AND leased_by = $2 AND delivery_state = 'pending'";

/// Leases `$1` holds but could not settle (its connection was lost): free them now rather
/// than when they expire. Run only when none of `$1`'s requests is in flight.
const RELEASE: &str = "\
UPDATE bite_sync.inbox SET lease_until = NULL, leased_by = NULL
WHERE leased_by = $1 AND delivery_state = 'pending'";

/// Why a worker's session with the database ended. Delivery failures are not errors: they
/// are outcomes written to the row.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// Connecting to the database failed.
    #[error("failed to connect to the inbox's database")]
    Connect(#[source] ConnectError),
    /// No connection from the relay's pool.
    #[error("failed to get a connection to the inbox's database")]
    Pool(#[source] db::PoolError),
    /// The database has no `bite_sync.inbox`.
    #[error(
        "the database has no inbox (table bite_sync.inbox): bite-sync's bookkeeping is missing or older than the relay; start `bite-sync relay` on this database or run `bite-sync run --init` once to create it"
    )]
    NoInbox,
    /// Creating or upgrading the bookkeeping failed.
    #[error("failed to bring bite-sync's bookkeeping up to date")]
    Bookkeeping(#[source] BookkeepingError),
    /// A statement failed.
    #[error("failed to {what}")]
    Query {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement did not finish within [`DB_TIMEOUT`].
    #[error("failed to {what}: the database did not answer within {after:?}")]
    TimedOut {
        /// What was being done.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The listening connection ended.
    #[error("the connection to the inbox's database was lost")]
    ConnectionLost,
}

impl DeliverError {
    /// Worth retrying as is: the network, a restarting server, a busy pool. The worker
    /// retries everything (someone may fix the rest while it waits); this only decides
    /// whether it says so as a warning or an error.
    pub fn is_transient(&self) -> bool {
        match self {
            DeliverError::Connect(e) => e.is_transient(),
            DeliverError::Pool(db::PoolError::Backend(e)) => e.is_transient(),
            DeliverError::Pool(_) => true,
            DeliverError::Query { source, .. } => is_transient_pg(source),
            DeliverError::TimedOut { .. } | DeliverError::ConnectionLost => true,
            DeliverError::NoInbox | DeliverError::Bookkeeping(_) => false,
        }
    }
}

fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => {
            let class = &code.code()[..2];
            // Connection exceptions, insufficient resources, operator intervention (shutdown,
            // restart), serialization failures and deadlocks.
            matches!(class, "08" | "53" | "57" | "40")
        }
    }
}

/// One inbox row as claimed: what the request is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxItem {
    /// `inbox.id`.
    pub id: i64,
    /// 'message', 'status' or 'change'.
    pub kind: String,
    /// The idempotency key (a message's wamid).
    pub dedupe_key: String,
    /// `entry[].id` as Meta sent it (the WhatsApp Business Account).
    pub waba_id: Option<String>,
    /// `changes[].field`.
    pub field: String,
    /// `value.metadata`.
    pub metadata: Option<Value>,
    /// The message, status or change value as Meta sent it.
    pub item: Value,
    /// The `value.contacts[]` entry of the message's sender.
    pub contact: Option<Value>,
    /// When the relay stored it (RFC 3339, as PostgreSQL's `to_json` renders it).
    pub received_at: Value,
    /// The AI fallback already answered the customer.
    pub answered_by_ai: bool,
    /// The AI reply's message id.
    pub ai_reply_wamid: Option<String>,
    /// Attempts so far, this one included.
    pub attempts: i32,
    /// Meta's envelope narrowed to this item, as Meta sent it (none on rows stored before
    /// bite-sync kept it: [`envelope`] rebuilds one from the columns).
    pub envelope: Option<String>,
    /// Staff answered the customer from the WhatsApp Business app (an echo came).
    pub answered_by_staff: bool,
}

impl InboxItem {
    fn from_row(row: &tokio_postgres::Row) -> InboxItem {
        InboxItem {
            id: row.get(0),
            kind: row.get(1),
            dedupe_key: row.get(2),
            waba_id: row.get(3),
            field: row.get(4),
            metadata: row.get(5),
            item: row.get(6),
            contact: row.get(7),
            received_at: row.get::<_, Option<Value>>(8).unwrap_or(Value::Null),
            answered_by_ai: row.get(9),
            ai_reply_wamid: row.get(10),
            attempts: row.get(11),
            envelope: row.get(12),
            answered_by_staff: row.get(13),
        }
    }
}

/// Meta's webhook envelope holding just this item: the text Meta sent, narrowed (see
/// [`crate::relay::payload`]), or for rows stored before that text was kept, one rebuilt from
/// the stored columns:
///
/// - 'message': `value = {messaging_product, metadata, contacts: [contact], messages: [item]}`
/// - 'status': the same with `statuses: [item]` (and no contacts unless stored)
/// - 'change': `value` = the stored item (Meta's value as sent)
pub fn meta_body(item: &InboxItem) -> String {
    if let Some(text) = &item.envelope {
        return text.clone();
    }
    let value = match item.kind.as_str() {
        "message" | "status" => {
            let mut value = serde_json::Map::new();
            value.insert("messaging_product".into(), json!("whatsapp"));
            if let Some(metadata) = &item.metadata {
                value.insert("metadata".into(), metadata.clone());
            }
            if let Some(contact) = &item.contact {
                value.insert("contacts".into(), json!([contact]));
            }
            let list = if item.kind == "message" {
                "messages"
            } else {
                "statuses"
            };
            value.insert(list.into(), json!([item.item]));
            Value::Object(value)
        }
        _ => item.item.clone(),
    };
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": item.waba_id,
            "changes": [{ "field": item.field, "value": value }],
        }],
    })
    .to_string()
}

/// The `bite_sync` object: the inbox's own facts about the item.
fn bite_sync_facts(item: &InboxItem) -> Value {
    json!({
        "inbox_id": item.id,
        "kind": item.kind,
        "received_at": item.received_at,
        "answered_by_ai": item.answered_by_ai,
        "ai_reply_wamid": item.ai_reply_wamid,
        "answered_by_staff": item.answered_by_staff,
    })
}

/// The default request body: [`meta_body`] with a `bite_sync` member added at its end (Meta's
/// members keep their text: numbers are not rewritten).
pub fn bite_sync_body(item: &InboxItem) -> String {
    let meta = meta_body(item);
    let facts = bite_sync_facts(item).to_string();
    let trimmed = meta.trim_end();
    match trimmed.strip_suffix('}') {
        Some(open) => {
            let empty = open.trim_end().ends_with('{');
            format!(
                "{open}{}\"bite_sync\":{facts}}}",
                if empty { "" } else { "," }
            )
        }
        // Not an object (never stored so): the facts alone, still JSON.
        None => json!({ "bite_sync": facts }).to_string(),
    }
}

/// The request body for one item as a JSON value (the default format).
pub fn envelope(item: &InboxItem) -> Value {
    serde_json::from_str(&bite_sync_body(item)).unwrap_or(Value::Null)
}

/// How long to wait before attempt `attempts + 1` of a row that failed `attempts` times:
/// 1 s, 2 s, 4 s … capped at `max`, shortened by up to a fifth by `jitter` (0 to 1) so rows
/// that failed together are not all retried in the same instant. Never more than `max`.
pub fn retry_delay(attempts: i32, max: Duration, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let base = Duration::from_secs(1)
        .checked_mul(1u32 << doublings)
        .unwrap_or(Duration::MAX)
        .min(max);
    base.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
}

/// A number from 0 to 1 that differs between calls and processes; enough for jitter.
fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = u64::from(nanos)
        .wrapping_add(
            COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9),
        )
        .wrapping_add(u64::from(std::process::id()));
    (mix % 1000) as f64 / 1000.0
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered 2xx.
    Delivered,
    /// Anything else, said without the body: "HTTP 500", "timeout", "connection refused"…
    Failed(String),
}

/// The failure of a request that got no answer, as `last_error` says it.
fn describe_failure(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timeout".into();
    }
    let mut cause: Option<&dyn std::error::Error> = Some(error);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                std::io::ErrorKind::TimedOut => "timeout".into(),
                kind => format!("connection failed ({kind})"),
            };
        }
        cause = c.source();
    }
    if error.is_connect() {
        "connection failed".into()
    } else if error.is_body() || error.is_decode() {
        "the answer was cut short".into()
    } else {
        "request failed".into()
    }
}

/// Posts items to the backend: the HTTP half of a worker.
#[derive(Debug, Clone)]
pub struct Poster {
    http: reqwest::Client,
    url: String,
    api_key: Option<Secret>,
    format: DeliveryFormat,
    app_secret: Option<Secret>,
}

impl Poster {
    /// A poster for `url` in the default format, each request given `timeout` in all
    /// (connect, send, answer).
    pub fn new(url: String, api_key: Option<Secret>, timeout: Duration) -> Poster {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("bite-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with a timeout builds");
        Poster {
            http,
            url,
            api_key,
            format: DeliveryFormat::BiteSync,
            app_secret: None,
        }
    }

    /// The same poster in `format`; the meta format signs with `app_secret`.
    pub fn with_format(mut self, format: DeliveryFormat, app_secret: Option<Secret>) -> Poster {
        self.format = format;
        self.app_secret = app_secret;
        self
    }

    /// Sends one item; never fails, the outcome says how it went.
    pub async fn post(&self, item: &InboxItem) -> Outcome {
        let body = match self.format {
            DeliveryFormat::BiteSync => bite_sync_body(item),
            DeliveryFormat::Meta => meta_body(item),
        }
        .into_bytes();
        let mut request = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", &item.dedupe_key)
            .header("x-bite-inbox-id", item.id.to_string());
        match self.format {
            DeliveryFormat::BiteSync => {
                if let Some(key) = &self.api_key {
                    request = request.header("x-api-key", key.expose()).header(
                        signature::DELIVERY_HEADER,
                        signature::sign(key.expose().as_bytes(), &body),
                    );
                }
            }
            DeliveryFormat::Meta => {
                // Exactly as Meta signs: HMAC-SHA256 of the body with the app secret.
                if let Some(secret) = &self.app_secret {
                    request = request.header(
                        signature::META_HEADER,
                        signature::sign(secret.expose().as_bytes(), &body),
                    );
                }
                if let Some(key) = &self.api_key {
                    request = request.header("x-api-key", key.expose());
                }
                // What the bite_sync object would have said, for backends that care.
                if item.answered_by_ai {
                    request = request.header("x-bite-answered-by-ai", "true");
                }
                if item.answered_by_staff {
                    request = request.header("x-bite-answered-by-staff", "true");
                }
            }
        }
        match request.body(body).send().await {
            Ok(response) if response.status().is_success() => Outcome::Delivered,
            Ok(response) => Outcome::Failed(format!("HTTP {}", response.status().as_u16())),
            Err(e) => Outcome::Failed(describe_failure(&e)),
        }
    }
}

/// Where a worker reaches the inbox.
#[derive(Debug, Clone)]
pub enum InboxDb {
    /// A connection of its own that also `LISTEN`s on [`CHANNEL`] (pull: `bite-sync run` and
    /// the mirror). Like replication and the schedules, it brings bite-sync's bookkeeping up
    /// to date when the database has it, or when `init` allows creating it.
    Listen {
        /// The database holding the inbox.
        url: Box<DbUrl>,
        /// May create the bookkeeping in a database without it.
        init: bool,
    },
    /// Connections from the relay's pool (push); the relay migrates at its start.
    Pool(db::Pool),
}

/// A connection for one statement.
enum Conn {
    Own(Arc<Client>),
    Pooled(Box<db::Conn>),
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        match self {
            Conn::Own(c) => c,
            Conn::Pooled(c) => c,
        }
    }
}

/// A session's database side: one listening connection, or the pool.
enum SessionDb {
    Own {
        client: Arc<Client>,
        /// Fires when the connection ends.
        lost: CancellationToken,
    },
    Pool(db::Pool),
}

impl SessionDb {
    async fn conn(&self) -> Result<Conn, DeliverError> {
        match self {
            SessionDb::Own { client, .. } => Ok(Conn::Own(Arc::clone(client))),
            SessionDb::Pool(pool) => pool
                .get()
                .await
                .map(|c| Conn::Pooled(Box::new(c)))
                .map_err(DeliverError::Pool),
        }
    }

    async fn lost(&self) {
        match self {
            SessionDb::Own { lost, .. } => lost.cancelled().await,
            SessionDb::Pool(_) => std::future::pending().await,
        }
    }
}

/// Runs one statement with [`DB_TIMEOUT`]; a missing inbox is said as such.
async fn bounded<T>(
    what: &'static str,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, DeliverError> {
    match tokio::time::timeout(DB_TIMEOUT, work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e))
            if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) =>
        {
            Err(DeliverError::NoInbox)
        }
        Ok(Err(source)) => Err(DeliverError::Query { what, source }),
        Err(_) => Err(DeliverError::TimedOut {
            what,
            after: DB_TIMEOUT,
        }),
    }
}

/// One worker: who it is and how it posts.
struct Worker {
    poster: Poster,
    /// `delivered_by`: `pull:<host>` or `push:<replica>`.
    name: String,
    /// `leased_by`: the name made unique to this worker instance (see the module docs).
    lessee: String,
    lease: Duration,
    max_backoff: Duration,
}

impl Worker {
    async fn claim(&self, db: &SessionDb, limit: usize) -> Result<Vec<InboxItem>, DeliverError> {
        let conn = db.conn().await?;
        let rows = bounded(
            "claim inbox rows",
            conn.query(
                CLAIM,
                &[&self.lease.as_secs_f64(), &self.lessee, &(limit as i64)],
            ),
        )
        .await?;
        Ok(rows.iter().map(InboxItem::from_row).collect())
    }

    /// Posts one claimed row and writes the outcome.
    async fn deliver(&self, db: &SessionDb, item: InboxItem) -> Result<(), DeliverError> {
        let started = Instant::now();
        let outcome = self.poster.post(&item).await;
        let conn = db.conn().await?;
        match outcome {
            Outcome::Delivered => {
                let settled = bounded(
                    "mark an inbox row delivered",
                    conn.execute(MARK_DELIVERED, &[&item.id, &self.lessee, &self.name]),
                )
                .await?;
                if settled == 1 {
                    tracing::debug!(elapsed = ?started.elapsed(), "delivered");
                } else {
                    tracing::warn!(
                        "delivered, but the lease had passed to another worker: it may deliver this row again"
                    );
                }
            }
            Outcome::Failed(why) => {
                let wait = retry_delay(item.attempts, self.max_backoff, jitter());
                bounded(
                    "record a failed delivery",
                    conn.execute(
                        MARK_FAILED,
                        &[&item.id, &self.lessee, &why, &wait.as_secs_f64()],
                    ),
                )
                .await?;
                tracing::warn!(error = %why, retry_in = ?wait, "the backend did not take the row; it stays pending");
            }
        }
        Ok(())
    }

    /// Claims and delivers until cancelled or the database fails. Requests in flight always
    /// finish (each is bounded by the HTTP timeout and [`DB_TIMEOUT`]) before this returns.
    async fn session(
        self: &Arc<Self>,
        db: Arc<SessionDb>,
        wake: &Notify,
        cancel: &CancellationToken,
    ) -> Result<(), DeliverError> {
        // Leases of an earlier session of this worker that it could not settle.
        let conn = db.conn().await?;
        bounded(
            "release unsettled leases",
            conn.execute(RELEASE, &[&self.lessee]),
        )
        .await?;
        drop(conn);
        let mut in_flight: JoinSet<Result<(), DeliverError>> = JoinSet::new();
        let mut failure = None;
        let mut look = true;
        while failure.is_none() && !cancel.is_cancelled() {
            let free = IN_FLIGHT - in_flight.len();
            if look && free > 0 {
                look = false;
                match self.claim(&db, free).await {
                    Ok(items) => {
                        // A full claim may have left due rows behind: look again at once.
                        look = items.len() == free;
                        for item in items {
                            let worker = Arc::clone(self);
                            let db = Arc::clone(&db);
                            let span = tracing::info_span!(
                                "deliver",
                                inbox_id = item.id,
                                attempt = item.attempts
                            );
                            in_flight.spawn(
                                async move { worker.deliver(&db, item).await }.instrument(span),
                            );
                        }
                    }
                    Err(e) => failure = Some(e),
                }
                continue;
            }
            tokio::select! {
                Some(done) = in_flight.join_next() => {
                    look = true;
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => failure = Some(e),
                        Err(e) => tracing::error!(error = %e, "a delivery task failed"),
                    }
                }
                () = wake.notified() => look = true,
                () = tokio::time::sleep(SWEEP) => look = true,
                () = db.lost() => failure = Some(DeliverError::ConnectionLost),
                () = cancel.cancelled() => {}
            }
        }
        // The requests in flight finish and their outcomes are written (or, if the database
        // is gone, their leases expire or are released by the next session).
        while let Some(done) = in_flight.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(e) => tracing::error!(error = %e, "a delivery task failed"),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Connects, listens on [`CHANNEL`] (each notification wakes the worker) and checks for the
/// inbox.
async fn open_listening(
    url: &DbUrl,
    init: bool,
    wake: &Arc<Notify>,
) -> Result<SessionDb, DeliverError> {
    let (mut client, mut connection) = url
        .connect_unspawned()
        .await
        .map_err(DeliverError::Connect)?;
    let lost = CancellationToken::new();
    let on_lost = lost.clone();
    let on_notify = Arc::clone(wake);
    tokio::spawn(
        async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => on_notify.notify_one(),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!(%error, "the inbox connection ended with an error");
                        break;
                    }
                }
            }
            on_lost.cancel();
        }
        .instrument(tracing::info_span!("inbox_listener")),
    );
    let initialized =
        match tokio::time::timeout(DB_TIMEOUT, bookkeeping::is_initialized(&client)).await {
            Ok(result) => result.map_err(DeliverError::Bookkeeping)?,
            Err(_) => {
                return Err(DeliverError::TimedOut {
                    what: "look for bite-sync's bookkeeping",
                    after: DB_TIMEOUT,
                });
            }
        };
    if initialized || init {
        // Migrations wait on each other's advisory lock, so no timeout here beyond the
        // connection's own.
        bookkeeping::migrate(&mut client)
            .await
            .map_err(DeliverError::Bookkeeping)?;
    }
    bounded(
        "listen for new inbox rows",
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await?;
    let has_inbox: bool = bounded(
        "look for the inbox",
        client.query_one(
            "SELECT pg_catalog.to_regclass('bite_sync.inbox') IS NOT NULL",
            &[],
        ),
    )
    .await?
    .get(0);
    if !has_inbox {
        return Err(DeliverError::NoInbox);
    }
    Ok(SessionDb::Own {
        client: Arc::new(client),
        lost,
    })
}

/// A worker's unique lease holder name.
fn lessee(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{name} pid {} #{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Delivers inbox rows until `cancel`: claims due rows, posts them (up to [`IN_FLIGHT`]
/// customers at once, each customer's rows one after the other), writes each outcome, and
/// sleeps until `wake` is notified, a delivery finishes or [`SWEEP`] passes. `name` goes in
/// `delivered_by`. The database going away (or lacking the inbox) is logged and retried with
/// backoff, so this returns only when cancelled, after the requests in flight have finished.
///
/// `settings.timeout` bounds each request; without `settings.url` it returns at once.
pub async fn run_worker(
    db: InboxDb,
    settings: DeliverySettings,
    name: String,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let Some(url) = settings.url.clone() else {
        tracing::warn!("no backend URL (LOCAL_BACKEND_URL): nothing to deliver to");
        return;
    };
    let worker = Arc::new(Worker {
        poster: Poster::new(url.clone(), settings.api_key.clone(), settings.timeout)
            .with_format(settings.format, settings.app_secret.clone()),
        lessee: lessee(&name),
        name,
        lease: settings.timeout + LEASE_MARGIN,
        max_backoff: settings.max_backoff,
    });
    let mut backoff = Duration::from_millis(500);
    let mut announced = false;
    while !cancel.is_cancelled() {
        let started = Instant::now();
        let session_db = match &db {
            InboxDb::Pool(pool) => Ok(SessionDb::Pool(pool.clone())),
            InboxDb::Listen { url, init } => tokio::select! {
                opened = open_listening(url, *init, &wake) => opened,
                () = cancel.cancelled() => break,
            },
        };
        let result = match session_db {
            Ok(session_db) => {
                if !announced {
                    tracing::info!(to = %url, worker = %worker.lessee, "delivering inbox rows to the backend");
                    announced = true;
                }
                worker.session(Arc::new(session_db), &wake, &cancel).await
            }
            Err(e) => Err(e),
        };
        let error = match result {
            Ok(()) => break,
            Err(e) => e,
        };
        if cancel.is_cancelled() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        let wait = backoff.mul_f64(0.5 + jitter() / 2.0);
        let chain = crate::error_chain(&error);
        if error.is_transient() {
            tracing::warn!(error = %chain, retry_in = ?wait, "delivery interrupted; retrying");
        } else {
            tracing::error!(error = %chain, retry_in = ?wait, "delivery cannot go on; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => break,
        }
        backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
    }
    tracing::info!("delivery stopped");
}

/// The relay's push worker: delivers from the relay's pool with at most [`PUSH_TIMEOUT`] per
/// request, as `push:<replica>`. Call `wake.notify_one()` after storing a batch. Rows it cannot
/// deliver stay pending for its next attempt or for a pull daemon. Returns at once unless
/// `DELIVERY_MODE=push`, `SYNC_ENABLED` is not false and `LOCAL_BACKEND_URL` is set; otherwise
/// when `cancel` fires, after the requests in flight.
pub async fn run_push(
    pool: db::Pool,
    settings: Arc<RelaySettings>,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let delivery = &settings.delivery;
    if delivery.mode != DeliveryMode::Push || !delivery.enabled || delivery.url.is_none() {
        tracing::info!(mode = ?delivery.mode, enabled = delivery.enabled, backend = delivery.url.is_some(), "push delivery is off");
        return;
    }
    let mut delivery = delivery.clone();
    delivery.timeout = delivery.timeout.min(PUSH_TIMEOUT);
    let name = format!("push:{}", settings.replica);
    run_worker(InboxDb::Pool(pool), delivery, name, wake, cancel)
        .instrument(tracing::info_span!("push_delivery"))
        .await;
}

/// Pull delivery as `bite-sync run` runs it: the backend URL and the mirror.
#[derive(Debug, Clone)]
pub struct Pull {
    /// Where and how to deliver.
    pub settings: DeliverySettings,
    /// The cloud database holding the inbox.
    pub mirror: DbUrl,
}

impl Pull {
    /// Pull delivery if the configuration asks for it: a backend URL (`LOCAL_BACKEND_URL` or
    /// `[delivery] backend_url`) and `SYNC_ENABLED` not false. `None` otherwise; an error when
    /// the settings are invalid or the mirror is missing.
    pub fn configured(config: &Config) -> Result<Option<Pull>, ConfigError> {
        let settings = DeliverySettings::resolve(
            &config.delivery,
            config.file.as_deref(),
            &super::settings::process_env,
        )?;
        if settings.url.is_none() {
            return Ok(None);
        }
        if !settings.enabled {
            tracing::info!(
                "SYNC_ENABLED is false: not delivering WhatsApp messages to the backend"
            );
            return Ok(None);
        }
        let mirror = config.mirror.clone().ok_or_else(|| ConfigError {
            problems: vec![
                "delivery to the backend (LOCAL_BACKEND_URL) reads the inbox on the mirror: pass --mirror URL, set BITE_MIRROR_URL, or set mirror.url in bite-sync.toml".into(),
            ],
        })?;
        Ok(Some(Pull { settings, mirror }))
    }

    /// Starts the worker as `pull:<host>:<pid>`; it stops when `cancel` fires, after the request in
    /// flight (bounded by the request timeout). `init` lets it create bite-sync's bookkeeping.
    pub fn spawn(self, init: bool, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "local".into());
        let db = InboxDb::Listen {
            url: Box::new(self.mirror),
            init,
        };
        tokio::spawn(
            run_worker(
                db,
                self.settings,
                format!("pull:{host}:{}", std::process::id()),
                Arc::new(Notify::new()),
                cancel,
            )
            .instrument(tracing::info_span!("delivery")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: &str) -> InboxItem {
        InboxItem {
            id: 42,
            kind: kind.into(),
            dedupe_key: "wamid.HBgM".into(),
            waba_id: Some("102290129340398".into()),
            field: "messages".into(),
            metadata: Some(
                json!({"display_phone_number": "15550783881", "phone_number_id": "106540352242922"}),
            ),
            item: json!({"from": "5215512345678", "id": "wamid.HBgM", "type": "text", "text": {"body": "¿Hay mesa?"}}),
            contact: Some(json!({"profile": {"name": "Ana"}, "wa_id": "5215512345678"})),
            received_at: json!("2026-01-02T03:04:05.123456+00:00"),
            answered_by_ai: false,
            ai_reply_wamid: None,
            attempts: 1,
            envelope: None,
            answered_by_staff: false,
        }
    }

    #[test]
    fn a_message_travels_in_metas_envelope() {
        let body = envelope(&item("message"));
        assert_eq!(
            body,
            json!({
                "object": "whatsapp_business_account",
                "entry": [{
                    "id": "102290129340398",
                    "changes": [{
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
                            "contacts": [{"profile": {"name": "Ana"}, "wa_id": "5215512345678"}],
                            "messages": [{"from": "5215512345678", "id": "wamid.HBgM", "type": "text", "text": {"body": "¿Hay mesa?"}}],
                        },
                    }],
                }],
                "bite_sync": {
                    "inbox_id": 42,
                    "kind": "message",
                    "received_at": "2026-01-02T03:04:05.123456+00:00",
                    "answered_by_ai": false,
                    "ai_reply_wamid": null,
                    "answered_by_staff": false,
                },
            })
        );
    }

    #[test]
    fn a_stored_envelope_is_sent_as_meta_wrote_it() {
        let mut message = item("message");
        let meta = r#"{"object":"whatsapp_business_account","z":{"big":123456789012345678901234567890,"neg":-0},"entry":[{"id":"1","time":17,"changes":[{"field":"messages","value":{"messages":[{"id":"wamid.HBgM","n":1.0e+400}]}}]}]}"#;
        message.envelope = Some(meta.to_string());
        assert_eq!(meta_body(&message), meta, "the meta format is Meta's text");
        let ours = bite_sync_body(&message);
        assert!(ours.starts_with(&meta[..meta.len() - 1]), "{ours}");
        assert!(ours.ends_with(r#","bite_sync":{"ai_reply_wamid":null,"answered_by_ai":false,"answered_by_staff":false,"inbox_id":42,"kind":"message","received_at":"2026-01-02T03:04:05.123456+00:00"}}"#), "{ours}");
        message.envelope = Some("{ }".into());
        assert_eq!(envelope(&message)["bite_sync"]["inbox_id"], 42);
    }

    #[test]
    fn a_status_goes_in_statuses_and_a_change_as_stored() {
        let mut status = item("status");
        status.contact = None;
        status.item = json!({"id": "wamid.OUT", "status": "read", "recipient_id": "5215512345678"});
        status.answered_by_ai = true;
        status.ai_reply_wamid = Some("wamid.AI".into());
        let body = envelope(&status);
        let value = &body["entry"][0]["changes"][0]["value"];
        assert_eq!(value["statuses"], json!([status.item]));
        assert!(value.get("messages").is_none() && value.get("contacts").is_none());
        assert_eq!(value["metadata"]["phone_number_id"], "106540352242922");
        assert_eq!(body["bite_sync"]["answered_by_ai"], true);
        assert_eq!(body["bite_sync"]["ai_reply_wamid"], "wamid.AI");

        let mut change = item("change");
        change.field = "account_update".into();
        change.item = json!({"event": "DISABLED_UPDATE", "ban_info": {"waba_ban_state": ["SCHEDULE_FOR_DISABLE"]}});
        let body = envelope(&change);
        assert_eq!(body["entry"][0]["changes"][0]["field"], "account_update");
        assert_eq!(body["entry"][0]["changes"][0]["value"], change.item);
        assert_eq!(body["bite_sync"]["kind"], "change");
    }

    #[test]
    fn retries_double_from_one_second_up_to_the_cap() {
        let max = Duration::from_secs(300);
        let waits: Vec<_> = (1..=10).map(|n| retry_delay(n, max, 0.0)).collect();
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        // Jitter only shortens, by at most a fifth, and the cap holds whatever the count.
        assert_eq!(retry_delay(1, max, 1.0), Duration::from_millis(800));
        assert_eq!(retry_delay(3, max, 0.5), Duration::from_millis(3600));
        for attempts in [0, 1, 31, 1000, i32::MAX, i32::MIN] {
            for j in [0.0, 0.3, 1.0, 7.0, -1.0] {
                let d = retry_delay(attempts, Duration::from_secs(5), j);
                assert!(
                    d <= Duration::from_secs(5) && d >= Duration::from_millis(800),
                    "{attempts} {j}: {d:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_stays_between_zero_and_one() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[test]
    fn lessees_differ_within_a_process() {
        assert_ne!(lessee("pull:host"), lessee("pull:host"));
        assert!(lessee("push:r1").starts_with("push:r1 pid "));
    }

    #[tokio::test]
    async fn a_refused_connection_is_said_as_such_without_details() {
        // A port nothing listens on: bind, learn the port, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let poster = Poster::new(
            format!("http://127.0.0.1:{port}/hook"),
            None,
            Duration::from_secs(2),
        );
        assert_eq!(
            poster.post(&item("message")).await,
            Outcome::Failed("connection refused".into())
        );
    }
}
