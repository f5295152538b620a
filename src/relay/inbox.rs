//! The durable inbox: storing webhook items (and dead letters) before Meta gets its 200, and
//! the numbers `/api/sync/health` and `/api/webhook/status` report.
//!
//! **Group commit.** Each webhook request hands its verified body to a [`Store`]
//! ([`Store::store_webhook`]) and waits. A few writer tasks, each with its own connection, take
//! every request waiting at that moment and store them in one transaction: multi-row `INSERT …
//! ON CONFLICT (dedupe_key) DO NOTHING` (from arrays, [`CHUNK`] rows a statement, so a batch of
//! 100,000 messages is never in memory as rows at once), the dead letters, the duplicate
//! counter and a `NOTIFY`, then `COMMIT`. Only after the commit does any of those requests get
//! its answer. So every request's items are in one transaction, as durable as the database's
//! commit, and under load one commit (one WAL flush) serves many requests.
//!
//! **One bad webhook never fails its neighbours.** An error that is the request's fault (a
//! value PostgreSQL cannot store: SQLSTATE classes 22 and 23, or 54 such as an id too long for
//! the index) rolls the transaction back and stores the group again, each request in a
//! savepoint of its own; the request that fails again is kept whole as a dead letter (its
//! original bytes) and answered 200 like the others. What cannot be stored as it is never gets
//! that far: every item keeps Meta's exact text in `envelope` (plain `text`, which takes any
//! JSON) beside a rendering `jsonb` accepts (see [`crate::relay::raw_json::storable`]). An error
//! that is the database's (connection, resources, shutdown) fails the group: 503, and Meta
//! retries.
//!
//! **Order.** Each customer's rows are delivered in `id` order, so a customer's ids must
//! follow commit order even when writers (or replicas) commit side by side: each transaction
//! takes a transaction-scoped advisory lock per identifier it stores (phones, user ids, and
//! the customer keys they are aliases of), in one global order.
//!
//! **Customers across identity changes.** `bite_sync.customer_aliases` maps every phone and
//! user id seen to the customer key it was first stored under; a row's `customer` is that key.
//! A `user_changed_number` or `user_changed_user_id` message adds the new identifier to the
//! same customer, and an item carrying a phone and a user id links them. Read under the locks
//! above, so two writers never give one identifier two keys.
//!
//! **Coexistence.** An echo (staff wrote from the WhatsApp Business app) marks the customer's
//! messages that were still waiting (pending, not answered, sent before the echo) `ai_state =
//! 'staff'` in the same transaction, so the AI fallback never answers after a waiter did; an AI
//! claim in progress loses its claim and sends nothing.
//!
//! **Dedupe.** The unique `dedupe_key` makes a retried or concurrently repeated webhook add
//! nothing, across requests, replicas and restarts; `RETURNING` tells which keys are new, so
//! duplicates are counted (per replica, in `bite_sync.relay_counters`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::relay::db::{self, Pool};
use crate::relay::payload::{Item, Kind, Unreadable, Webhook};

/// The channel a stored batch notifies (the delivery workers `LISTEN` on it).
pub const CHANNEL: &str = "bite_sync_inbox";

/// Requests one transaction takes at most.
const MAX_BATCH_REQUESTS: usize = 512;

/// Rows one `INSERT` takes at most: the memory a batch costs while it is stored.
pub const CHUNK: usize = 1000;

/// Bodies larger than this are read on a blocking thread, off the async workers.
const READ_INLINE_MAX: usize = 256 * 1024;

/// The advisory lock space of the customers' order (see the module docs).
const ORDER_LOCK: i32 = 1651078245;

/// A body kept because it could not be read (or stored).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Why.
    pub reason: String,
    /// The body as received.
    pub body: Bytes,
}

/// What one request's storing did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// Items new to the inbox.
    pub new: usize,
    /// Items already there.
    pub duplicates: usize,
    /// The body was kept as a dead letter (all of it, or the parts that could not be read).
    pub dead_lettered: bool,
}

/// Storing failed; nothing of the request is stored.
#[derive(Debug, Clone, thiserror::Error)]
#[error("could not store the webhook: {0}")]
pub struct StoreError(String);

struct Job {
    webhook: Option<Webhook>,
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

/// Reads a verified body: its items, and the dead letter of what could not be read.
pub fn read(body: Bytes) -> (Option<Webhook>, Option<DeadLetter>) {
    match Webhook::read(body.clone()) {
        Ok(webhook) => {
            let dead = (!webhook.problems.is_empty()).then(|| DeadLetter {
                reason: webhook.problems.join("; "),
                body,
            });
            (Some(webhook), dead)
        }
        Err(e @ (Unreadable::NotJson(_) | Unreadable::NotWhatsApp(_))) => (
            None,
            Some(DeadLetter {
                reason: e.to_string(),
                body,
            }),
        ),
    }
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

    /// Stores a webhook whose signature was checked: every item it holds, and the body as a
    /// dead letter when some or all of it cannot be read. Returns after the commit.
    pub async fn store_webhook(&self, body: Bytes) -> Result<Stored, StoreError> {
        let (webhook, dead) = if body.len() > READ_INLINE_MAX {
            tokio::task::spawn_blocking(move || read(body))
                .await
                .map_err(|_| StoreError("reading the webhook failed".into()))?
        } else {
            read(body)
        };
        if let Some(dead) = &dead {
            tracing::warn!(reason = %dead.reason, "webhook kept as a dead letter");
        }
        let big = webhook.as_ref().is_some_and(|w| w.len() > CHUNK);
        let stored = self.store(webhook, dead).await;
        if big {
            return_memory();
        }
        stored
    }

    /// Stores one request's items and dead letter in one transaction; returns after the commit.
    pub async fn store(
        &self,
        webhook: Option<Webhook>,
        dead: Option<DeadLetter>,
    ) -> Result<Stored, StoreError> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job {
                webhook,
                dead,
                done,
            })
            .await
            .map_err(|_| StoreError("the relay is shutting down".into()))?;
        wait.await
            .map_err(|_| StoreError("the writer stopped before committing".into()))?
    }
}

/// Gives the memory a huge batch used back to the system: glibc keeps freed heap for reuse,
/// so after a burst the relay's RSS would stay at its peak (Railway bills and kills on RSS).
fn return_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas; it takes their
    // locks and touches no allocation in use.
    unsafe {
        libc::malloc_trim(0);
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
            Ok(mut conn) => {
                match write_batch(&mut conn, &batch, &self.replica, false).await {
                    Err(Failure::Request(e)) => {
                        // Someone's value cannot be stored: again, each request on its own.
                        tracing::warn!(error = %e, requests = batch.len(), "a webhook could not be stored; storing the group again request by request");
                        write_batch(&mut conn, &batch, &self.replica, true).await
                    }
                    other => other,
                }
            }
            Err(e) => Err(Failure::Database(db::describe(&e))),
        };
        match result {
            Ok(outcomes) => {
                if outcomes.iter().any(|o| o.new > 0) {
                    // The push worker: woken now, or finds the permit when it next waits.
                    self.stored.notify_one();
                }
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    // The body's memory is freed before the request hears back (it may then
                    // give memory back to the system).
                    let Job {
                        webhook,
                        dead,
                        done,
                    } = job;
                    drop((webhook, dead));
                    let _ = done.send(Ok(outcome));
                }
            }
            Err(e) => {
                let e = StoreError(e.to_string());
                tracing::warn!(error = %e, requests = batch.len(), "storing webhooks failed; Meta will retry them");
                for job in batch {
                    let Job {
                        webhook,
                        dead,
                        done,
                    } = job;
                    drop((webhook, dead));
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Why a group was not stored.
#[derive(Debug, Clone, thiserror::Error)]
enum Failure {
    /// A value of some request cannot be stored (the request's fault).
    #[error("{0}")]
    Request(String),
    /// The database failed (its fault, or ours): retry later.
    #[error("{0}")]
    Database(String),
}

/// Whether a PostgreSQL error is about the data sent, not the database: data exceptions (22:
/// bad encoding, a number out of range), integrity violations (23) and program limits (54: an
/// index row too large).
fn is_request_fault(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "54"))
}

fn failure(what: &'static str) -> impl Fn(tokio_postgres::Error) -> Failure {
    move |e| {
        let text = format!("{what}: {}", crate::error_chain(&e));
        if is_request_fault(&e) {
            Failure::Request(text)
        } else {
            Failure::Database(text)
        }
    }
}

/// Identifiers → customer keys, as the transaction sees and extends them.
#[derive(Debug, Clone, Default)]
struct Aliases {
    known: HashMap<String, String>,
    new: Vec<(String, String, &'static str)>,
}

impl Aliases {
    /// The customer key of `item`, linking its identifiers to it.
    fn resolve(&mut self, item: &Item) -> String {
        if item.kind == Kind::Change {
            return item.customer.clone();
        }
        let phone = item.customer_phone.as_deref();
        let user = item.customer_user_id.as_deref();
        let customer = phone
            .and_then(|p| self.known.get(p))
            .or_else(|| user.and_then(|u| self.known.get(u)))
            .cloned()
            .unwrap_or_else(|| item.customer.clone());
        let change = item.identity_change.as_ref();
        for (id, kind) in [
            (phone, "phone"),
            (user, "user_id"),
            (change.and_then(|c| c.phone.as_deref()), "phone"),
            (change.and_then(|c| c.user_id.as_deref()), "user_id"),
        ] {
            if let Some(id) = id
                && !self.known.contains_key(id)
            {
                self.known.insert(id.to_owned(), customer.clone());
                self.new.push((id.to_owned(), customer.clone(), kind));
            }
        }
        customer
    }
}

/// Takes the order locks of every identifier in `batch` (and of the customers they are
/// aliases of), then reads their aliases.
async fn lock_and_read_aliases(tx: &Transaction<'_>, batch: &[Job]) -> Result<Aliases, Failure> {
    let ids: Vec<&str> = {
        let mut seen = HashSet::new();
        batch
            .iter()
            .filter_map(|j| j.webhook.as_ref())
            .flat_map(|w| w.identifiers().iter().map(String::as_str))
            .filter(|id| seen.insert(*id))
            .collect()
    };
    if ids.is_empty() {
        return Ok(Aliases::default());
    }
    // Locks taken in one global order (by hash), so never a deadlock; the aliases are read by
    // the next statement, after the locks, so what it sees no other writer is changing.
    let params_lock: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&ids, &ORDER_LOCK];
    let params_read: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
    let lock = tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($2, h) \
         FROM (SELECT DISTINCT pg_catalog.hashtext(k) AS h FROM ( \
                 SELECT unnest($1::text[]) AS k \
                 UNION ALL SELECT a.customer FROM bite_sync.customer_aliases a WHERE a.alias = ANY($1)) AS ks \
               ORDER BY h) AS x",
        &params_lock,
    );
    let read = tx.query(
        "SELECT alias, customer FROM bite_sync.customer_aliases WHERE alias = ANY($1)",
        &params_read,
    );
    let (_, rows) = futures_util::future::try_join(lock, read)
        .await
        .map_err(failure("lock the customers"))?;
    let known: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // An alias added between the two statements may name a customer not locked yet.
    let locked: HashSet<&str> = ids.iter().copied().collect();
    let late: Vec<&str> = known
        .values()
        .map(String::as_str)
        .filter(|c| !locked.contains(c))
        .collect();
    if !late.is_empty() {
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($2, h) FROM (SELECT DISTINCT \
             pg_catalog.hashtext(k) AS h FROM unnest($1::text[]) AS k ORDER BY h) AS x",
            &[&late, &ORDER_LOCK],
        )
        .await
        .map_err(failure("lock the customers"))?;
    }
    Ok(Aliases {
        known,
        new: Vec::new(),
    })
}

/// What storing the items of some requests found.
#[derive(Default)]
struct Written {
    /// Per request: new and duplicate items.
    counts: Vec<(usize, usize)>,
    /// Echoes stored new: (customer, Meta's time).
    echoes: Vec<(String, Option<f64>)>,
}

/// Stores the items of `jobs` (positions `first..` in the batch), [`CHUNK`] rows a statement.
async fn insert_items(
    tx: &Transaction<'_>,
    jobs: &[&Job],
    aliases: &mut Aliases,
    written: &mut Written,
) -> Result<(), Failure> {
    let base = written.counts.len();
    written.counts.extend(jobs.iter().map(|_| (0, 0)));
    let mut rows: Vec<(usize, Item, String)> = Vec::with_capacity(CHUNK);
    for (j, job) in jobs.iter().enumerate() {
        let Some(webhook) = &job.webhook else {
            continue;
        };
        let mut at = 0;
        while at < webhook.len() {
            let room = CHUNK - rows.len();
            for item in webhook.items(at..at + room) {
                let customer = aliases.resolve(&item);
                rows.push((base + j, item, customer));
            }
            at += room;
            if rows.len() == CHUNK {
                insert_chunk(tx, &mut rows, aliases, written).await?;
            }
        }
    }
    if !rows.is_empty() {
        insert_chunk(tx, &mut rows, aliases, written).await?;
    }
    Ok(())
}

async fn insert_chunk(
    tx: &Transaction<'_>,
    rows: &mut Vec<(usize, Item, String)>,
    aliases: &mut Aliases,
    written: &mut Written,
) -> Result<(), Failure> {
    let items: Vec<&Item> = rows.iter().map(|(_, item, _)| item).collect();
    let texts = |f: &dyn Fn(&Item) -> Option<&str>| items.iter().map(|i| f(i)).collect::<Vec<_>>();
    let kind = texts(&|i| Some(i.kind.as_str()));
    let dedupe = texts(&|i| Some(i.dedupe_key.as_str()));
    let wamid = texts(&|i| i.wamid.as_deref());
    let waba = texts(&|i| i.waba_id.as_deref());
    let field = texts(&|i| Some(i.field.as_str()));
    let metadata = texts(&|i| i.metadata.as_deref());
    let customer: Vec<&str> = rows.iter().map(|(_, _, c)| c.as_str()).collect();
    let phone = texts(&|i| i.customer_phone.as_deref());
    let user_id = texts(&|i| i.customer_user_id.as_deref());
    let name = texts(&|i| i.customer_name.as_deref());
    let item_type = texts(&|i| i.item_type.as_deref());
    let body = texts(&|i| i.body.as_deref());
    let sent_at: Vec<Option<f64>> = items.iter().map(|i| i.sent_at.map(|s| s as f64)).collect();
    let item = texts(&|i| Some(i.item.as_str()));
    let contact = texts(&|i| i.contact.as_deref());
    let envelope = texts(&|i| Some(i.envelope.as_str()));
    let no_ai = texts(&|i| i.no_ai);
    let inserted = tx
        .query(
            "INSERT INTO bite_sync.inbox (kind, dedupe_key, wamid, waba_id, field, metadata, \
                 customer, customer_phone, customer_user_id, customer_name, item_type, body, \
                 sent_at, item, contact, envelope, ai_state, ai_note) \
             SELECT k, d, w, wb, f, m::jsonb, c, p, u, n, t, b, to_timestamp(s), i::jsonb, \
                 ct::jsonb, e, CASE WHEN na IS NOT NULL THEN 'skipped' END, na \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
                 $12::text[], $13::float8[], $14::text[], $15::text[], $16::text[], $17::text[]) \
                 WITH ORDINALITY AS x(k, d, w, wb, f, m, c, p, u, n, t, b, s, i, ct, e, na, ord) \
             ORDER BY ord \
             ON CONFLICT (dedupe_key) DO NOTHING \
             RETURNING dedupe_key",
            &[
                &kind, &dedupe, &wamid, &waba, &field, &metadata, &customer, &phone, &user_id,
                &name, &item_type, &body, &sent_at, &item, &contact, &envelope, &no_ai,
            ],
        )
        .await
        .map_err(failure("insert into bite_sync.inbox"))?;
    // Of rows repeating a key, the first was inserted (ORDER BY ord) and owns it.
    let mut new: HashSet<String> = inserted.iter().map(|r| r.get(0)).collect();
    for (job, item, customer) in rows.iter() {
        let counts = &mut written.counts[*job];
        if new.remove(&item.dedupe_key) {
            counts.0 += 1;
            if item.kind == Kind::Echo {
                written
                    .echoes
                    .push((customer.clone(), item.sent_at.map(|s| s as f64)));
            }
        } else {
            counts.1 += 1;
        }
    }
    if !aliases.new.is_empty() {
        let (alias, rest): (Vec<&str>, Vec<(&str, &str)>) = aliases
            .new
            .iter()
            .map(|(a, c, k)| (a.as_str(), (c.as_str(), *k)))
            .unzip();
        let (customer, kind): (Vec<&str>, Vec<&str>) = rest.into_iter().unzip();
        tx.execute(
            "INSERT INTO bite_sync.customer_aliases (alias, customer, kind) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) \
             ON CONFLICT (alias) DO NOTHING",
            &[&alias, &customer, &kind],
        )
        .await
        .map_err(failure("insert into bite_sync.customer_aliases"))?;
        aliases.new.clear();
    }
    rows.clear();
    Ok(())
}

async fn insert_dead_letter(tx: &Transaction<'_>, dead: &DeadLetter) -> Result<(), Failure> {
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&dead.body));
    let reason = dead.reason.replace('\0', "\u{FFFD}");
    tx.execute(
        "INSERT INTO bite_sync.inbox_dead_letters (reason, body_sha256, body) \
         VALUES ($1, $2, $3) ON CONFLICT (body_sha256) DO NOTHING",
        &[&reason, &sha, &dead.body.as_ref()],
    )
    .await
    .map_err(failure("insert into bite_sync.inbox_dead_letters"))?;
    Ok(())
}

/// Stores `batch` in one transaction. `isolate`: each request in a savepoint of its own, and
/// one whose items cannot be stored is kept as a dead letter instead.
async fn write_batch(
    conn: &mut db::Conn,
    batch: &[Job],
    replica: &str,
    isolate: bool,
) -> Result<Vec<Stored>, Failure> {
    let mut tx = conn.transaction().await.map_err(failure("begin"))?;
    let mut aliases = lock_and_read_aliases(&tx, batch).await?;
    let mut written = Written::default();
    let mut dead_lettered = vec![false; batch.len()];
    if isolate {
        for (j, job) in batch.iter().enumerate() {
            let sp = tx
                .savepoint("request")
                .await
                .map_err(failure("savepoint"))?;
            let before = aliases.clone();
            let echoes = written.echoes.len();
            let result = async {
                insert_items(&sp, &[job], &mut aliases, &mut written).await?;
                if let Some(dead) = &job.dead {
                    insert_dead_letter(&sp, dead).await?;
                }
                Ok::<(), Failure>(())
            }
            .await;
            match result {
                Ok(()) => sp.commit().await.map_err(failure("release savepoint"))?,
                Err(Failure::Request(why)) => {
                    sp.rollback()
                        .await
                        .map_err(failure("rollback to savepoint"))?;
                    aliases = before;
                    written.echoes.truncate(echoes);
                    written.counts.truncate(j);
                    written.counts.push((0, 0));
                    let body = job
                        .webhook
                        .as_ref()
                        .map(|w| w.body().clone())
                        .or_else(|| job.dead.as_ref().map(|d| d.body.clone()))
                        .unwrap_or_default();
                    tracing::warn!(error = %why, "a webhook cannot be stored as it is: kept as a dead letter");
                    insert_dead_letter(
                        &tx,
                        &DeadLetter {
                            reason: format!("the database cannot store it: {why}"),
                            body,
                        },
                    )
                    .await?;
                    dead_lettered[j] = true;
                }
                Err(e) => return Err(e),
            }
        }
    } else {
        let jobs: Vec<&Job> = batch.iter().collect();
        insert_items(&tx, &jobs, &mut aliases, &mut written).await?;
        for job in batch {
            if let Some(dead) = &job.dead {
                insert_dead_letter(&tx, dead).await?;
            }
        }
    }
    if !written.echoes.is_empty() {
        let (customer, at): (Vec<&str>, Vec<Option<f64>>) = written
            .echoes
            .iter()
            .map(|(c, at)| (c.as_str(), *at))
            .unzip();
        // Staff answered from the phone: the customer's waiting messages are not the AI's.
        tx.execute(
            "UPDATE bite_sync.inbox m SET ai_state = 'staff', ai_note = 'answered by staff' \
             FROM unnest($1::text[], $2::float8[]) AS e(customer, at) \
             WHERE m.kind = 'message' AND m.delivery_state = 'pending' \
               AND m.customer = e.customer \
               AND (m.ai_state IS NULL OR m.ai_state = 'claimed') \
               AND coalesce(m.sent_at, m.received_at) <= coalesce(to_timestamp(e.at), now())",
            &[&customer, &at],
        )
        .await
        .map_err(failure("mark messages answered by staff"))?;
    }
    let outcomes: Vec<Stored> = batch
        .iter()
        .enumerate()
        .map(|(j, job)| {
            let (new, duplicates) = written.counts.get(j).copied().unwrap_or_default();
            Stored {
                new,
                duplicates,
                dead_lettered: dead_lettered[j] || job.dead.is_some(),
            }
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
        .map_err(failure("count duplicates"))?;
    }
    if outcomes.iter().any(|o| o.new > 0) {
        tx.execute("SELECT pg_catalog.pg_notify($1, '')", &[&CHANNEL])
            .await
            .map_err(failure("notify"))?;
    }
    let _ = &mut tx;
    tx.commit().await.map_err(failure("commit"))?;
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
    /// Messages staff answered from the WhatsApp Business app before the AI did.
    pub answered_by_staff: i64,
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
                    (SELECT COALESCE(sum(signature_failures), 0)::bigint FROM bite_sync.relay_counters), \
                    count(*) FILTER (WHERE ai_state = 'staff') \
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
        answered_by_staff: row.get(14),
    })
}
