//! The durable inbox: storing webhook items (and dead letters) before Meta gets its 200, and
//! the numbers `/api/sync/health` and `/api/webhook/status` report.
//!
//! **Group commit.** Each webhook request hands its items to a [`Store`] and waits. A few
//! writer tasks, each with its own connection, take every request waiting at that moment and
//! store them in one transaction: one multi-row `INSERT … ON CONFLICT (dedupe_key) DO
//! NOTHING` (from arrays, so one round trip whatever the size), the dead letters, the
//! duplicate counter and a `NOTIFY`, then `COMMIT`. Only after the commit does any of those
//! requests get its answer. So every request's items are in one transaction, as durable as
//! the database's commit, and under load one commit (one WAL flush) serves many requests —
//! that is what lets a relay on a small database keep up with thousands of webhooks a second
//! while answering each within Meta's latency budget.
//!
//! **Order.** Each customer's rows are delivered in `id` order, so a customer's ids must
//! follow commit order even when writers (or replicas) commit side by side: each transaction
//! takes a transaction-scoped advisory lock per customer it stores, in one global order.
//!
//! **Dedupe.** The unique `dedupe_key` makes a retried or concurrently repeated webhook add
//! nothing, across requests, replicas and restarts; `RETURNING` tells which keys are new, so
//! duplicates are counted (per replica, in `bite_sync.relay_counters`).
//!
//! A failed transaction fails every request in it (the server answers 503 and Meta retries
//! them); the writer then takes a fresh connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::relay::db::{self, Pool};
use crate::relay::payload::Item;

/// The channel a stored batch notifies (the delivery workers `LISTEN` on it).
pub const CHANNEL: &str = "bite_sync_inbox";

/// Requests one transaction takes at most.
const MAX_BATCH_REQUESTS: usize = 512;

/// A body kept because it could not be read.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Why.
    pub reason: String,
    /// The body as received.
    pub body: Vec<u8>,
}

/// What one request's storing did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// Items new to the inbox.
    pub new: usize,
    /// Items already there.
    pub duplicates: usize,
}

/// Storing failed; nothing of the request is stored.
#[derive(Debug, Clone, thiserror::Error)]
#[error("could not store the webhook: {0}")]
pub struct StoreError(String);

struct Job {
    items: Vec<Item>,
    dead: Option<DeadLetter>,
    done: oneshot::Sender<Result<Stored, StoreError>>,
}

/// Hands requests to the writer tasks.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
}

/// Counters kept in memory and flushed to `bite_sync.relay_counters` now and then.
#[derive(Debug, Default)]
pub struct Counters {
    /// Webhooks refused for their signature since the last flush.
    pub signature_failures: AtomicU64,
    /// Webhooks refused for their signature in the current alert window.
    pub window_failures: AtomicU64,
    /// Webhooks with a valid signature in the current alert window.
    pub window_valid: AtomicU64,
}

impl Store {
    /// Starts `writers` writer tasks on `pool` (each holds one connection while it writes).
    /// `stored` is notified after every commit that added rows. The tasks end when every
    /// `Store` clone is dropped or `cancel` fires (requests already taken are finished).
    pub fn start(
        pool: Pool,
        writers: usize,
        replica: String,
        stored: Arc<tokio::sync::Notify>,
        cancel: CancellationToken,
    ) -> (Store, Vec<tokio::task::JoinHandle<()>>) {
        let (jobs, rx) = mpsc::channel::<Job>(8192);
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..writers.max(1))
            .map(|n| {
                let writer = Writer {
                    pool: pool.clone(),
                    jobs: Arc::clone(&rx),
                    replica: replica.clone(),
                    stored: Arc::clone(&stored),
                };
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tracing::debug!(writer = n, "inbox writer started");
                    writer.run(cancel).await;
                })
            })
            .collect();
        (Store { jobs }, handles)
    }

    /// Stores one request's items and dead letter in one transaction; returns after the commit.
    pub async fn store(
        &self,
        items: Vec<Item>,
        dead: Option<DeadLetter>,
    ) -> Result<Stored, StoreError> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job { items, dead, done })
            .await
            .map_err(|_| StoreError("the relay is shutting down".into()))?;
        wait.await
            .map_err(|_| StoreError("the writer stopped before committing".into()))?
    }
}

struct Writer {
    pool: Pool,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    replica: String,
    stored: Arc<tokio::sync::Notify>,
}

impl Writer {
    async fn run(self, cancel: CancellationToken) {
        loop {
            // One writer at a time collects a batch: the first job it waits for, then every
            // job already queued. The others meanwhile commit theirs.
            let batch = {
                let mut rx = self.jobs.lock().await;
                let first = tokio::select! {
                    job = rx.recv() => job,
                    () = cancel.cancelled() => {
                        // Finish what is queued: those requests are waiting for an answer.
                        rx.close();
                        rx.recv().await
                    }
                };
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH_REQUESTS {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                batch
            };
            self.commit(batch).await;
        }
    }

    async fn commit(&self, batch: Vec<Job>) {
        let result = match self.pool.get().await {
            Ok(mut conn) => write_batch(&mut conn, &batch, &self.replica).await,
            Err(e) => Err(StoreError(db::describe(&e))),
        };
        match result {
            Ok(outcomes) => {
                if outcomes.iter().any(|o| o.new > 0) {
                    // The push worker: woken now, or finds the permit when it next waits.
                    self.stored.notify_one();
                }
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = job.done.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, requests = batch.len(), "storing webhooks failed; Meta will retry them");
                for job in batch {
                    let _ = job.done.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn write_batch(
    conn: &mut db::Conn,
    batch: &[Job],
    replica: &str,
) -> Result<Vec<Stored>, StoreError> {
    let fail = |what: &'static str| {
        move |e: tokio_postgres::Error| StoreError(format!("{what}: {}", crate::error_chain(&e)))
    };
    let items: Vec<&Item> = batch.iter().flat_map(|j| j.items.iter()).collect();
    let tx = conn.transaction().await.map_err(fail("begin"))?;
    let new_keys: std::collections::HashSet<String> = if items.is_empty() {
        Default::default()
    } else {
        let col =
            |f: &dyn Fn(&Item) -> Option<String>| items.iter().map(|i| f(i)).collect::<Vec<_>>();
        let kind: Vec<&str> = items.iter().map(|i| i.kind.as_str()).collect();
        let dedupe: Vec<&str> = items.iter().map(|i| i.dedupe_key.as_str()).collect();
        let wamid = col(&|i| i.wamid.clone());
        let waba = col(&|i| i.waba_id.clone());
        let field: Vec<&str> = items.iter().map(|i| i.field.as_str()).collect();
        let metadata: Vec<Option<serde_json::Value>> =
            items.iter().map(|i| i.metadata.clone()).collect();
        let customer: Vec<&str> = items.iter().map(|i| i.customer.as_str()).collect();
        let phone = col(&|i| i.customer_phone.clone());
        let user_id = col(&|i| i.customer_user_id.clone());
        let name = col(&|i| i.customer_name.clone());
        let item_type = col(&|i| i.item_type.clone());
        let body = col(&|i| i.body.clone());
        let sent_at: Vec<Option<f64>> = items.iter().map(|i| i.sent_at.map(|s| s as f64)).collect();
        let item: Vec<serde_json::Value> = items.iter().map(|i| i.item.clone()).collect();
        let contact: Vec<Option<serde_json::Value>> =
            items.iter().map(|i| i.contact.clone()).collect();
        // Rows of one customer are delivered in id order, so ids must follow commit order:
        // a transaction storing rows of a customer waits for any other that is storing rows
        // of the same customer (locks taken in one global order, so never a deadlock).
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock(1651078245, h) \
             FROM (SELECT DISTINCT pg_catalog.hashtext(c) AS h FROM unnest($1::text[]) AS c \
                   ORDER BY h) AS x",
            &[&customer],
        )
        .await
        .map_err(fail("lock the customers"))?;
        let rows = tx
            .query(
                "INSERT INTO bite_sync.inbox (kind, dedupe_key, wamid, waba_id, field, metadata, \
                     customer, customer_phone, customer_user_id, customer_name, item_type, body, \
                     sent_at, item, contact) \
                 SELECT k, d, w, wb, f, m, c, p, u, n, t, b, to_timestamp(s), i, ct \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::jsonb[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
                     $12::text[], $13::float8[], $14::jsonb[], $15::jsonb[]) \
                     WITH ORDINALITY AS x(k, d, w, wb, f, m, c, p, u, n, t, b, s, i, ct, ord) \
                 ORDER BY ord \
                 ON CONFLICT (dedupe_key) DO NOTHING \
                 RETURNING dedupe_key",
                &[
                    &kind, &dedupe, &wamid, &waba, &field, &metadata, &customer, &phone, &user_id,
                    &name, &item_type, &body, &sent_at, &item, &contact,
                ],
            )
            .await
            .map_err(fail("insert into bite_sync.inbox"))?;
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    };
    for job in batch {
        if let Some(dead) = &job.dead {
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&dead.body));
            tx.execute(
                "INSERT INTO bite_sync.inbox_dead_letters (reason, body_sha256, body) \
                 VALUES ($1, $2, $3) ON CONFLICT (body_sha256) DO NOTHING",
                &[&dead.reason, &sha, &dead.body],
            )
            .await
            .map_err(fail("insert into bite_sync.inbox_dead_letters"))?;
        }
    }
    // The first request holding a new key owns it; every other occurrence is a duplicate.
    let mut owned = std::collections::HashSet::new();
    let outcomes: Vec<Stored> = batch
        .iter()
        .map(|job| {
            let mut s = Stored::default();
            for item in &job.items {
                if new_keys.contains(&item.dedupe_key) && owned.insert(item.dedupe_key.as_str()) {
                    s.new += 1;
                } else {
                    s.duplicates += 1;
                }
            }
            s
        })
        .collect();
    let duplicates: i64 = outcomes.iter().map(|o| o.duplicates as i64).sum();
    if duplicates > 0 {
        tx.execute(
            "INSERT INTO bite_sync.relay_counters (replica, duplicates) VALUES ($1, $2) \
             ON CONFLICT (replica) DO UPDATE SET \
                 duplicates = relay_counters.duplicates + excluded.duplicates, updated_at = now()",
            &[&replica, &duplicates],
        )
        .await
        .map_err(fail("count duplicates"))?;
    }
    if !new_keys.is_empty() {
        tx.execute("SELECT pg_catalog.pg_notify($1, '')", &[&CHANNEL])
            .await
            .map_err(fail("notify"))?;
    }
    tx.commit().await.map_err(fail("commit"))?;
    Ok(outcomes)
}

/// Adds the in-memory counters to `bite_sync.relay_counters` every few seconds, and once
/// more at shutdown.
pub async fn flush_counters(
    pool: Pool,
    counters: Arc<Counters>,
    replica: String,
    cancel: CancellationToken,
) {
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => false,
            () = cancel.cancelled() => true,
        };
        let failures = counters.signature_failures.swap(0, Ordering::Relaxed);
        if failures > 0 {
            let failures_i = failures as i64;
            let result = match pool.get().await {
                Ok(conn) => conn
                    .execute(
                        "INSERT INTO bite_sync.relay_counters (replica, signature_failures) \
                         VALUES ($1, $2) ON CONFLICT (replica) DO UPDATE SET \
                             signature_failures = relay_counters.signature_failures + excluded.signature_failures, \
                             updated_at = now()",
                        &[&replica, &failures_i],
                    )
                    .await
                    .map(drop)
                    .map_err(|e| crate::error_chain(&e)),
                Err(e) => Err(db::describe(&e)),
            };
            if let Err(e) = result {
                // Put them back for the next try.
                counters
                    .signature_failures
                    .fetch_add(failures, Ordering::Relaxed);
                tracing::debug!(error = %e, "could not record the signature failure counter");
            }
        }
        if stop {
            return;
        }
    }
}

/// Deletes what is older than `keep` every ten minutes: delivered inbox items, sent
/// messages and dead letters (pending items are never deleted, however old). One replica at a
/// time does it (an advisory lock); rows go in small batches so no lock is held for long.
pub async fn prune(pool: Pool, keep: Duration, cancel: CancellationToken) {
    const PRUNE_LOCK: i64 = 0x6269_7465_0005;
    let keep_secs = keep.as_secs_f64();
    loop {
        let result: Result<u64, String> = async {
            let conn = pool.get().await.map_err(|e| db::describe(&e))?;
            let q = |e: tokio_postgres::Error| crate::error_chain(&e);
            let locked: bool = conn
                .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&PRUNE_LOCK])
                .await
                .map_err(q)?
                .get(0);
            if !locked {
                return Ok(0);
            }
            let mut deleted = 0;
            for sql in [
                "DELETE FROM bite_sync.inbox WHERE id IN (SELECT id FROM bite_sync.inbox                  WHERE delivery_state = 'delivered'                    AND received_at < now() - make_interval(secs => $1) LIMIT 5000)",
                "DELETE FROM bite_sync.outbox WHERE id IN (SELECT id FROM bite_sync.outbox                  WHERE created_at < now() - make_interval(secs => $1) LIMIT 5000)",
                "DELETE FROM bite_sync.inbox_dead_letters WHERE id IN (SELECT id FROM                  bite_sync.inbox_dead_letters WHERE received_at < now() - make_interval(secs => $1) LIMIT 5000)",
            ] {
                loop {
                    let n = conn.execute(sql, &[&keep_secs]).await.map_err(q)?;
                    deleted += n;
                    if n < 5000 || cancel.is_cancelled() {
                        break;
                    }
                }
            }
            conn.execute("SELECT pg_catalog.pg_advisory_unlock($1)", &[&PRUNE_LOCK])
                .await
                .map_err(q)?;
            Ok(deleted)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                rows = n,
                keep_days = keep_secs / 86400.0,
                "pruned old inbox rows"
            ),
            Err(e) => tracing::warn!(error = %e, "pruning the inbox failed; trying again later"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(600)) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// `/api/sync/health`'s view of the mirror's replication bookkeeping. Public (Railway's
/// health check): positions and times only, never the daemon's error text, which can name
/// hosts, tables and values.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorFreshness {
    /// The slot whose state this is.
    pub slot: String,
    /// Last source LSN applied to the mirror.
    pub last_lsn: String,
    /// Commit time on the source of the last transaction applied.
    pub last_commit_time: Option<String>,
    /// When the daemon last applied or confirmed a position.
    pub last_applied_at: String,
    /// How far the mirror is behind the source, in seconds: 0 while the daemon reports it
    /// holds everything (a "caught up" mark younger than [`crate::bookkeeping::CAUGHT_UP_FRESH`]); after an older
    /// mark, the time since it (the mirror was complete then); while catching up, the time
    /// since the last applied transaction committed on the source.
    pub lag_seconds: Option<f64>,
    /// Seconds since the daemon last applied, confirmed or reported anything (is it alive?).
    pub seconds_since_applied: f64,
    /// Whether the daemon reports an error now (`bite-sync status` at the restaurant says
    /// which).
    pub failing: bool,
}

/// Mirror freshness per slot (empty when `bite-sync run` has never replicated here).
pub async fn freshness(
    client: &tokio_postgres::Client,
) -> Result<Vec<MirrorFreshness>, tokio_postgres::Error> {
    let fresh = crate::bookkeeping::CAUGHT_UP_FRESH.as_secs_f64();
    let rows = client
        .query(
            "SELECT slot_name, lsn::text, \
                    to_char(source_commit_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                    to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                    CASE WHEN caught_up_at >= applied_at \
                              AND clock_timestamp() - caught_up_at <= make_interval(secs => $1) THEN 0 \
                         WHEN caught_up_at >= applied_at \
                              THEN extract(epoch FROM clock_timestamp() - caught_up_at) \
                         ELSE extract(epoch FROM clock_timestamp() - source_commit_time) END::float8, \
                    extract(epoch FROM clock_timestamp() - greatest(applied_at, caught_up_at))::float8, \
                    COALESCE(last_error IS NOT NULL AND last_error_at > greatest(applied_at, caught_up_at), false) \
             FROM bite_sync.replication_state ORDER BY slot_name",
            &[&fresh],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| MirrorFreshness {
            slot: r.get(0),
            last_lsn: r.get(1),
            last_commit_time: r.get(2),
            last_applied_at: r.get(3),
            lag_seconds: r.get::<_, Option<f64>>(4).map(round_ms),
            seconds_since_applied: round_ms(r.get(5)),
            failing: r.get(6),
        })
        .collect())
}

fn round_ms(s: f64) -> f64 {
    (s.max(0.0) * 1000.0).round() / 1000.0
}

/// `/api/webhook/status`'s counters, summed over every replica.
#[derive(Debug, Clone, Serialize)]
pub struct InboxCounts {
    /// Items stored (messages, statuses, other changes).
    pub received: i64,
    /// Of which messages from customers.
    pub messages: i64,
    /// Of which statuses.
    pub statuses: i64,
    /// Items Meta sent again (or another app's retry brought) and were not stored twice.
    pub duplicates: i64,
    /// Delivered to the backend.
    pub delivered: i64,
    /// Waiting for the backend.
    pub pending: i64,
    /// Pending items whose last delivery attempt failed.
    pub failed: i64,
    /// Messages answered by the AI fallback.
    pub answered_by_ai: i64,
    /// AI replies that could not be sent.
    pub ai_failed: i64,
    /// Bodies kept unread (not JSON, not a WhatsApp envelope, malformed parts).
    pub dead_lettered: i64,
    /// Webhooks refused for a missing or wrong signature.
    pub signature_failures: i64,
    /// Newest item's arrival.
    pub last_received_at: Option<String>,
    /// Newest delivery.
    pub last_delivered_at: Option<String>,
    /// Age of the oldest pending item, seconds.
    pub oldest_pending_seconds: Option<f64>,
}

/// Reads the counters.
pub async fn counts(client: &tokio_postgres::Client) -> Result<InboxCounts, tokio_postgres::Error> {
    let ts = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), \
                    count(*) FILTER (WHERE kind = 'message'), \
                    count(*) FILTER (WHERE kind = 'status'), \
                    count(*) FILTER (WHERE delivery_state = 'delivered'), \
                    count(*) FILTER (WHERE delivery_state = 'pending'), \
                    count(*) FILTER (WHERE delivery_state = 'pending' AND last_error IS NOT NULL), \
                    count(*) FILTER (WHERE ai_state = 'answered'), \
                    count(*) FILTER (WHERE ai_state = 'failed'), \
                    to_char(max(received_at) AT TIME ZONE 'UTC', {ts}), \
                    to_char(max(delivered_at) AT TIME ZONE 'UTC', {ts}), \
                    extract(epoch FROM clock_timestamp() - min(received_at) FILTER (WHERE delivery_state = 'pending'))::float8, \
                    (SELECT count(*) FROM bite_sync.inbox_dead_letters), \
                    (SELECT COALESCE(sum(duplicates), 0)::bigint FROM bite_sync.relay_counters), \
                    (SELECT COALESCE(sum(signature_failures), 0)::bigint FROM bite_sync.relay_counters) \
                 FROM bite_sync.inbox"
            ),
            &[],
        )
        .await?;
    Ok(InboxCounts {
        received: row.get(0),
        messages: row.get(1),
        statuses: row.get(2),
        delivered: row.get(3),
        pending: row.get(4),
        failed: row.get(5),
        answered_by_ai: row.get(6),
        ai_failed: row.get(7),
        last_received_at: row.get(8),
        last_delivered_at: row.get(9),
        oldest_pending_seconds: row.get::<_, Option<f64>>(10).map(round_ms),
        dead_lettered: row.get(11),
        duplicates: row.get(12),
        signature_failures: row.get(13),
    })
}
