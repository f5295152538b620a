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
//! | [`payload`] | Meta's envelope → inbox items (pure) |
//! | [`inbox`] | storing items (group commit, dedupe), counters, dead letters |
//! | [`server`] | the axum routes: `/api/webhook`, `/api/sync/health`, `/api/webhook/status` |
//! | [`deliver`] | inbox rows → the restaurant's backend, at least once, in order per customer (pull and push) |
//!
//! Inbox contract (see `sql/migrations/0005_relay.sql`):
//! - One row per item, unique `dedupe_key`; a retried webhook adds nothing.
//! - Storing a batch notifies channel [`deliver::CHANNEL`] in the same transaction.
//! - Delivery: `delivery_state` pending → delivered on the backend's 2xx; a worker leases rows
//!   (`lease_until`, `leased_by`); each customer's rows are delivered in `id` order.
//! - AI fallback: `ai_state` moves from null to `claimed` exactly once per message, by one
//!   `UPDATE … WHERE ai_state IS NULL`; only the claimer may send.

pub mod db;
pub mod deliver;
pub mod settings;
pub mod signature;
