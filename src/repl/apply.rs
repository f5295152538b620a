//! Applying the decoded stream to the mirror, exactly once.
//!
//! Source transactions are collected into a batch ([`BatchBuilder`]) and sent to the mirror as
//! one mirror transaction, which also moves `bite_sync.replication_state.lsn` to the end of the
//! last source transaction in it. So the mirror's data and the position it reflects change
//! together: after a crash, a restart streams from that position and nothing is applied twice
//! or skipped. [`Applier::committed`] is the only position the daemon may confirm to the
//! source, which lets the source recycle WAL up to it.
//!
//! Invariants:
//! - A batch is sent when it holds `limits.rows` rows or `limits.bytes` of SQL, or its first
//!   change is `limits.delay` old; always at a source transaction boundary, except that a
//!   source transaction too large for a batch (the batch reaches twice the limits inside it)
//!   is sent in parts inside one open mirror transaction, committed with its last part
//!   (memory stays bounded by the limits).
//! - A change a table cannot take pauses that table only: its changes are skipped from then
//!   on, and the pause is recorded (with the reason) in the same mirror transaction as the
//!   position. A statement the mirror rejects makes the whole batch roll back; the caller then
//!   restarts the stream from [`Applier::committed`] and the transactions up to the failure are
//!   applied carefully, one statement at a time inside savepoints, so exactly the failing
//!   table is paused and everything else is applied.
//! - A table added to the stream at position `synced_lsn` (its copy was taken there) takes only
//!   transactions that commit at or after it.
//! - One batch is in flight at a time: while the mirror runs it, the next is built from the
//!   stream; it is awaited before the next is sent (one connection runs them in order), and
//!   only then does [`Applier::committed`] move to its position.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_postgres::Client;

use super::Lsn;
use super::batch::{ApplyError, BatchBuilder, Grouping, ShapeColumn, Statement, TableShape};
use super::pgoutput::{Message, PgTimestamp, Relation};
use crate::pg::ident::{QualifiedName, literal, quote};

/// When a batch is sent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Source rows in a batch.
    pub rows: usize,
    /// Bytes of SQL in a batch.
    pub bytes: usize,
    /// Age of a batch's first change.
    pub delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rows: 20_000,
            bytes: 8 << 20,
            delay: Duration::from_millis(100),
        }
    }
}

/// A replicated table as the bookkeeping records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    /// The table (same name on both sides).
    pub name: QualifiedName,
    /// Source transactions committing before this are already in the mirror's copy.
    pub synced_lsn: Lsn,
    /// Why its changes are skipped, if they are.
    pub paused: Option<String>,
}

/// Why applying stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyFailure {
    /// The mirror rejected a statement; the batch was rolled back. Restart the stream from
    /// [`Applier::committed`]: the transactions up to `until` are then applied carefully.
    #[error("the mirror rejected a change; applying again carefully up to {until}")]
    Rejected {
        /// The last source position the failed batch covered.
        until: Lsn,
        /// What the mirror said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A mirror or source query failed (connection lost, server restarting ...).
    #[error("{context}")]
    Query {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The stream broke the protocol's rules (a change outside a transaction ...).
    #[error("unexpected replication message: {0}")]
    Protocol(String),
}

impl ApplyFailure {
    /// Worth retrying after a reconnect.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyFailure::Rejected { .. } => true,
            ApplyFailure::Query { source, .. } => {
                source.is_closed() || source.as_db_error().is_none()
            }
            ApplyFailure::Protocol(_) => false,
        }
    }
}

fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ApplyFailure {
    let context = context.into();
    move |source| ApplyFailure::Query { context, source }
}

/// A relation the stream described.
#[derive(Debug, Clone)]
enum Known {
    /// Replicated: changes are applied with this shape.
    Applied(Arc<TableShape>),
    /// Not one of ours, or paused: changes are skipped.
    Skipped(QualifiedName),
}

/// A column as the mirror has it.
#[derive(Debug, Clone)]
struct MirrorColumn {
    name: String,
    type_name: String,
    identity_always: bool,
    /// NOT NULL without a default and not generated: rows without it cannot be inserted.
    required: bool,
}

/// The source transaction being read.
#[derive(Debug, Clone, Copy)]
struct Txn {
    final_lsn: Lsn,
    xid: u32,
}

/// Applies the stream to the mirror; see the module docs.
pub struct Applier {
    slot: String,
    mirror: Arc<Client>,
    source: Client,
    limits: Limits,
    /// The batch the mirror is executing while the next one is built.
    in_flight: Option<InFlight>,
    tables: HashMap<QualifiedName, TableState>,
    relations: HashMap<u32, Known>,
    mirror_columns: HashMap<QualifiedName, Vec<MirrorColumn>>,
    /// The mirror tables' kinds (`r`, or `p` when built partitioned); none: it has no such
    /// table.
    mirror_kinds: HashMap<QualifiedName, Option<char>>,
    /// Partitions this session creates (its statements may not have run yet: a table's
    /// description comes again with the first change of each of its partitions).
    partitions_made: std::collections::HashSet<QualifiedName>,
    batch: BatchBuilder,
    txn: Option<Txn>,
    /// A mirror transaction holds part of a large source transaction.
    mirror_txn_open: bool,
    /// The batch holds a transaction at or before `careful_until`.
    batch_careful: bool,
    /// How batches group changes outside careful mode.
    grouping: Grouping,
    /// The end of the last source transaction in the batch, and its commit time.
    batch_end: Option<(Lsn, PgTimestamp)>,
    batch_started: Option<Instant>,
    /// Pauses to record with the next commit.
    newly_paused: Vec<(QualifiedName, String)>,
    /// Sequence positions to move the mirror to with the next batch (see
    /// [`Applier::catch_up_sequences`]).
    sequences_due: Option<String>,
    committed: Lsn,
    careful_until: Lsn,
    applied_rows: u64,
    applied_txns: u64,
}

/// Inserts are loaded with COPY when the mirror answers faster than this.
const COPY_MAX_ROUND_TRIP: Duration = Duration::from_millis(5);

/// One piece of what a batch sends: SQL (many statements, one round trip) or rows for a COPY.
#[derive(Debug)]
enum Part {
    Sql(String),
    Copy { sql: String, data: String },
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Sql(sql) => sql.len(),
            Part::Copy { data, .. } => data.len(),
        }
    }

    async fn run(self, mirror: &Client) -> Result<(), tokio_postgres::Error> {
        match self {
            Part::Sql(sql) => mirror.batch_execute(&sql).await,
            Part::Copy { sql, data } => {
                let sink = mirror.copy_in::<_, bytes::Bytes>(sql.as_str()).await?;
                futures_util::pin_mut!(sink);
                sink.send(bytes::Bytes::from(data)).await?;
                sink.finish().await.map(|_| ())
            }
        }
    }
}

/// A batch's parts, with neighbouring SQL joined into one round trip.
#[derive(Debug, Default)]
struct Parts(Vec<Part>);

impl Parts {
    fn sql(&mut self, sql: &str) {
        if sql.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(Part::Sql(open)) => open.push_str(sql),
            _ => self.0.push(Part::Sql(sql.to_string())),
        }
    }

    fn statement(&mut self, statement: Statement) {
        match statement.copy {
            Some(data) => self.0.push(Part::Copy {
                sql: statement.sql,
                data,
            }),
            None => {
                self.sql(&statement.sql);
                self.sql(";\n");
            }
        }
    }
}

/// A batch sent to the mirror and not yet known to be done.
struct InFlight {
    task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    /// The source position the batch covers (for a careful retry if it is rejected).
    until: Lsn,
    /// Where the mirror's position is once it is done, if it commits.
    commits: Option<Lsn>,
    started: Instant,
    bytes: usize,
}

/// Counters for status and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The position recorded on the mirror.
    pub committed: Lsn,
    /// Source rows applied since start.
    pub rows: u64,
    /// Source transactions applied since start.
    pub transactions: u64,
}

impl Applier {
    /// Sets up the mirror session for applying. `committed` is the position recorded on the
    /// mirror; `careful_until` the end of a batch that failed (or [`Lsn::ZERO`]).
    pub async fn new(
        slot: &str,
        mirror: Client,
        source: Client,
        tables: Vec<TableState>,
        committed: Lsn,
        careful_until: Lsn,
        limits: Limits,
    ) -> Result<Applier, ApplyFailure> {
        source
            .batch_execute("SET search_path = ''")
            .await
            .map_err(query("failed to set up the source session"))?;
        mirror
            .batch_execute(
                "SET search_path = ''; SET standard_conforming_strings = on; \
                 SET DateStyle = 'ISO, MDY'; SET statement_timeout = 0; \
                 SET idle_in_transaction_session_timeout = 0",
            )
            .await
            .map_err(query("failed to set up the mirror session"))?;
        // Like PostgreSQL's own subscriber: no triggers and no foreign-key checks for
        // replicated changes, which also lets changes be grouped per table. Needs superuser
        // (or PostgreSQL 15's SET privilege on the parameter); without it the global order
        // is kept and keys are checked.
        let reorder = match mirror
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            Ok(()) => true,
            Err(e) if e.as_db_error().is_some() => {
                tracing::info!(
                    "the mirror user may not set session_replication_role; changes keep their source order and mirror triggers fire"
                );
                false
            }
            Err(e) => return Err(query("failed to set up the mirror session")(e)),
        };
        // COPY loads inserts for about half the mirror's work of a multi-row INSERT, but costs
        // two more round trips per table and batch: worth it on a near mirror only.
        let mut round_trip = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            mirror
                .batch_execute("SELECT 1")
                .await
                .map_err(query("failed to reach the mirror"))?;
            round_trip = round_trip.min(started.elapsed());
        }
        let copy = round_trip < COPY_MAX_ROUND_TRIP;
        tracing::debug!(?round_trip, copy, "mirror round trip");
        let grouping = if reorder {
            Grouping::PerTable
        } else {
            Grouping::Neighbours
        };
        let mut batch = BatchBuilder::new(grouping);
        batch.set_copy(copy);
        Ok(Applier {
            slot: slot.to_string(),
            mirror: Arc::new(mirror),
            source,
            limits,
            in_flight: None,
            tables: tables.into_iter().map(|t| (t.name.clone(), t)).collect(),
            relations: HashMap::new(),
            mirror_columns: HashMap::new(),
            mirror_kinds: HashMap::new(),
            partitions_made: std::collections::HashSet::new(),
            batch,
            grouping,
            txn: None,
            mirror_txn_open: false,
            batch_careful: false,
            batch_end: None,
            batch_started: None,
            newly_paused: Vec::new(),
            sequences_due: None,
            committed,
            careful_until,
            applied_rows: 0,
            applied_txns: 0,
        })
    }

    /// The position recorded on the mirror: safe to confirm to the source.
    pub fn committed(&self) -> Lsn {
        self.committed
    }

    /// Counters for status and logs.
    pub fn progress(&self) -> Progress {
        Progress {
            committed: self.committed,
            rows: self.applied_rows,
            transactions: self.applied_txns,
        }
    }

    /// Tables paused so far, with reasons.
    pub fn paused(&self) -> Vec<(QualifiedName, String)> {
        let mut out: Vec<_> = self
            .tables
            .values()
            .filter_map(|t| t.paused.clone().map(|r| (t.name.clone(), r)))
            .collect();
        out.sort();
        out
    }

    /// Nothing received is waiting to be applied (not inside a source transaction, batch
    /// empty): every position received so far is accounted for.
    pub fn is_idle(&self) -> bool {
        self.txn.is_none()
            && self.batch_end.is_none()
            && !self.mirror_txn_open
            && self.in_flight.is_none()
    }

    /// Inside a source transaction (between its Begin and Commit).
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// When the open batch must be sent, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.batch_end, self.batch_started) {
            (Some(_), Some(started)) => Some(started + self.limits.delay),
            _ => None,
        }
    }

    /// Handles one message of the stream.
    pub async fn handle(&mut self, message: Message) -> Result<(), ApplyFailure> {
        match message {
            Message::Begin { final_lsn, xid, .. } => {
                if self.txn.is_some() {
                    return Err(ApplyFailure::Protocol(
                        "a transaction began inside another".into(),
                    ));
                }
                self.txn = Some(Txn { final_lsn, xid });
                self.batch_started.get_or_insert_with(Instant::now);
                if self.is_careful(final_lsn) {
                    self.batch_careful = true;
                }
                // Careful: one statement per change, in source order, so only a change the
                // mirror really refuses fails.
                if self.batch.is_empty() {
                    self.batch.set_grouping(if self.batch_careful {
                        Grouping::None
                    } else {
                        self.grouping
                    });
                }
            }
            Message::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                let txn = self.txn.take().ok_or_else(|| {
                    ApplyFailure::Protocol("a commit without a transaction".into())
                })?;
                self.batch_end = Some((end_lsn, commit_time));
                self.applied_txns += 1;
                // A mirror transaction holding part of a large source transaction commits
                // with that transaction's end.
                if self.mirror_txn_open
                    || self.is_careful(txn.final_lsn)
                    || self.batch.rows() >= self.limits.rows
                    || self.batch.bytes() >= self.limits.bytes
                {
                    self.flush().await?;
                }
            }
            Message::Relation(relation) => self.relation(relation).await?,
            Message::Insert { relation, new, .. } => {
                if let Some(shape) = self.target(relation)? {
                    let result = self.batch.insert(&shape, &new);
                    self.after_change(&shape, result).await?;
                }
            }
            Message::Update {
                relation, old, new, ..
            } => {
                if let Some(shape) = self.target(relation)? {
                    let result = self.batch.update(&shape, old.as_ref(), &new);
                    self.after_change(&shape, result).await?;
                }
            }
            Message::Delete { relation, old, .. } => {
                if let Some(shape) = self.target(relation)? {
                    let result = self.batch.delete(&shape, &old);
                    self.after_change(&shape, result).await?;
                }
            }
            Message::Truncate {
                relations,
                restart_identity,
                ..
            } => {
                let mut shapes = Vec::new();
                for oid in relations {
                    if let Some(shape) = self.target(oid)? {
                        shapes.push(shape);
                    }
                }
                let refs: Vec<&TableShape> = shapes.iter().map(|s| &**s).collect();
                self.batch.truncate(&refs, restart_identity);
            }
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {}
            Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamCommit { .. }
            | Message::StreamAbort { .. } => {
                return Err(ApplyFailure::Protocol(
                    "a streamed transaction, which bite-sync did not ask for".into(),
                ));
            }
        }
        Ok(())
    }

    /// Sends the batch if it is due (its delay has passed).
    pub async fn flush_if_due(&mut self) -> Result<(), ApplyFailure> {
        match self.deadline() {
            Some(deadline) if Instant::now() >= deadline && self.txn.is_none() => {
                self.flush().await
            }
            _ => Ok(()),
        }
    }

    /// Sends every complete source transaction collected so far; the part of a transaction
    /// still being read stays for later (it is only sent early when it is too large).
    pub async fn flush(&mut self) -> Result<(), ApplyFailure> {
        if self.txn.is_some() {
            // Only called between transactions; a large one is sent in parts by
            // `after_change`.
            return Ok(());
        }
        let Some((end, commit_time)) = self.batch_end else {
            return Ok(());
        };
        let statements = self.batch.take();
        let mut parts = Parts::default();
        if self.batch_careful {
            self.send_carefully(statements).await?;
        } else {
            parts.sql(&self.open_transaction_sql());
            for s in statements {
                parts.statement(s);
            }
        }
        for (name, reason) in std::mem::take(&mut self.newly_paused) {
            parts.sql(&pause_sql(&self.slot, &name, &reason));
        }
        if let Some(sql) = self.sequences_due.take() {
            parts.sql(&sql);
            parts.sql(";\n");
        }
        parts.sql(&format!(
            "UPDATE bite_sync.replication_state SET lsn = {}, source_commit_time = {}, \
             applied_at = now(), last_error = NULL WHERE slot_name = {};\nCOMMIT",
            literal(&end.to_string()),
            timestamp_sql(commit_time),
            literal(&self.slot)
        ));
        self.send(parts.0, end, Some(end)).await?;
        self.batch_careful = false;
        self.batch_end = None;
        self.batch_started = None;
        Ok(())
    }

    /// Waits for the batch the mirror is executing, if any; its commit moves
    /// [`Applier::committed`].
    pub async fn settle(&mut self) -> Result<(), ApplyFailure> {
        let Some(batch) = self.in_flight.take() else {
            return Ok(());
        };
        let result = match batch.task.await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        match result {
            Ok(()) => {
                tracing::debug!(bytes = batch.bytes, until = %batch.until, elapsed = ?batch.started.elapsed(), "batch done on the mirror");
                if let Some(end) = batch.commits {
                    self.committed = end;
                    if self.careful_until > Lsn::ZERO && self.committed >= self.careful_until {
                        tracing::info!(lsn = %self.committed, "past the change the mirror rejected; applying in batches again");
                        self.careful_until = Lsn::ZERO;
                    }
                }
                Ok(())
            }
            Err(e) if e.as_db_error().is_some() && !e.is_closed() => {
                let _ = self.mirror.batch_execute("ROLLBACK").await;
                self.mirror_txn_open = false;
                Err(ApplyFailure::Rejected {
                    until: batch.until,
                    source: e,
                })
            }
            Err(e) => Err(query("failed to apply a batch on the mirror")(e)),
        }
    }

    /// A batch is on its way to the mirror.
    pub fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// [`Applier::settle`], only if the mirror is already done (never waits).
    pub async fn settle_if_done(&mut self) -> Result<(), ApplyFailure> {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|b| b.task.is_finished())
        {
            self.settle().await?;
        }
        Ok(())
    }

    /// Records `lsn` as reached while nothing is pending (only unpublished tables changed),
    /// so the source may recycle WAL up to it.
    pub async fn advance_idle(&mut self, lsn: Lsn) -> Result<(), ApplyFailure> {
        if !self.is_idle() || lsn <= self.committed {
            return Ok(());
        }
        self.mirror
            .execute(
                "UPDATE bite_sync.replication_state SET lsn = $1::text::pg_lsn, applied_at = now() \
                 WHERE slot_name = $2",
                &[&lsn.to_string(), &self.slot],
            )
            .await
            .map_err(query(
                "failed to record the stream's position on the mirror",
            ))?;
        self.committed = lsn;
        Ok(())
    }

    /// Records on the mirror that it holds everything the source has sent (the daemon is idle
    /// and streaming), so the relay's health check can say the lag is 0 rather than count
    /// from the last transaction's commit time.
    pub async fn mark_caught_up(&mut self) -> Result<(), ApplyFailure> {
        self.mirror
            .execute(
                "UPDATE bite_sync.replication_state SET caught_up_at = now() WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(query("failed to record on the mirror that it is caught up"))?;
        Ok(())
    }

    /// Moves the mirror's sequences up (`sql` from [`super::sequences::catch_up_sql`]): at once
    /// when the mirror session is free, else with the next batch, so a busy stream still keeps
    /// them in step (`setval` is not transactional: a batch rolled back has moved them all the
    /// same, which never hurts, as they only move up).
    pub async fn catch_up_sequences(&mut self, sql: String) -> Result<(), ApplyFailure> {
        if self.in_flight.is_none() && !self.mirror_txn_open && self.batch_end.is_none() {
            return self
                .mirror
                .batch_execute(&sql)
                .await
                .map_err(query("failed to catch up the mirror's sequences"));
        }
        // Inside a batch, a sequence the mirror user may not move must not fail the batch.
        let select = sql.strip_prefix("SELECT ").unwrap_or(&sql);
        self.sequences_due = Some(format!(
            "DO $bite_sync$ BEGIN PERFORM {select}; \
             EXCEPTION WHEN OTHERS THEN RAISE WARNING 'bite-sync could not move the mirror''s sequences: %', SQLERRM; \
             END $bite_sync$"
        ));
        Ok(())
    }

    /// Rolls back a mirror transaction left open by a large source transaction (shutdown in
    /// the middle of one); the position stays at the last commit.
    pub async fn abandon(&mut self) {
        let _ = self.settle().await;
        if self.mirror_txn_open {
            let _ = self.mirror.batch_execute("ROLLBACK").await;
            self.mirror_txn_open = false;
        }
    }

    /// The mirror session, for work between batches (sequences).
    pub fn mirror(&self) -> &Client {
        &self.mirror
    }

    /// The source session, for work between batches (sequences).
    pub fn source(&self) -> &Client {
        &self.source
    }

    fn is_careful(&self, final_lsn: Lsn) -> bool {
        self.careful_until > Lsn::ZERO && final_lsn <= self.careful_until
    }

    fn open_transaction_sql(&self) -> String {
        if self.mirror_txn_open {
            String::new()
        } else {
            // Grouped updates join a VALUES list to the table by key: an index lookup per
            // row is right for a batch, a hash join over the whole table never is.
            "BEGIN; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;\n".into()
        }
    }

    /// Sends SQL as one round trip, after the previous batch is done, without waiting for it:
    /// the next batch is built meanwhile (one connection runs them in order). A rejection
    /// surfaces from [`Applier::settle`], with the position the careful retry must reach.
    async fn send(
        &mut self,
        parts: Vec<Part>,
        until: Lsn,
        commits: Option<Lsn>,
    ) -> Result<(), ApplyFailure> {
        self.settle().await?;
        let mirror = Arc::clone(&self.mirror);
        let bytes = parts.iter().map(Part::len).sum();
        self.in_flight = Some(InFlight {
            task: tokio::spawn(async move {
                for part in parts {
                    part.run(&mirror).await?;
                }
                Ok(())
            }),
            until,
            commits,
            started: Instant::now(),
            bytes,
        });
        // Whether the next batch continues a mirror transaction (a large source transaction
        // sent in parts) or must begin its own.
        self.mirror_txn_open = commits.is_none();
        Ok(())
    }

    /// One statement at a time, each in a savepoint: a rejected statement pauses its table.
    async fn send_carefully(&mut self, statements: Vec<Statement>) -> Result<(), ApplyFailure> {
        self.settle().await?;
        if !self.mirror_txn_open {
            self.mirror
                .batch_execute("BEGIN")
                .await
                .map_err(query("failed to start a mirror transaction"))?;
            self.mirror_txn_open = true;
        }
        for statement in statements {
            let names: Vec<QualifiedName> = statement
                .tables
                .iter()
                .filter_map(|oid| self.relation_name(*oid))
                .collect();
            if names
                .iter()
                .any(|n| self.tables.get(n).is_some_and(|t| t.paused.is_some()))
            {
                continue;
            }
            let part = match statement.copy {
                Some(data) => Part::Copy {
                    sql: statement.sql,
                    data,
                },
                None => Part::Sql(statement.sql),
            };
            let result = async {
                self.mirror
                    .batch_execute("SAVEPOINT bite_sync_change")
                    .await?;
                part.run(&self.mirror).await?;
                self.mirror
                    .batch_execute("RELEASE SAVEPOINT bite_sync_change")
                    .await
            }
            .await;
            match result {
                Ok(()) => {}
                Err(e) if e.as_db_error().is_some() && !e.is_closed() => {
                    self.mirror
                        .batch_execute("ROLLBACK TO SAVEPOINT bite_sync_change")
                        .await
                        .map_err(query("failed to roll back a rejected change"))?;
                    let reason = crate::error_chain(&e);
                    if names.is_empty() {
                        return Err(ApplyFailure::Query {
                            context: "the mirror rejected a change".into(),
                            source: e,
                        });
                    }
                    for name in &names {
                        self.pause(name, reason.clone());
                    }
                }
                Err(e) => return Err(query("failed to apply a change on the mirror")(e)),
            }
        }
        Ok(())
    }

    fn relation_name(&self, oid: u32) -> Option<QualifiedName> {
        match self.relations.get(&oid)? {
            Known::Applied(shape) => Some(shape.name.clone()),
            Known::Skipped(name) => Some(name.clone()),
        }
    }

    /// The shape to apply a change of relation `oid` with, or `None` to skip it.
    fn target(&self, oid: u32) -> Result<Option<Arc<TableShape>>, ApplyFailure> {
        let txn = self
            .txn
            .ok_or_else(|| ApplyFailure::Protocol("a change outside a transaction".into()))?;
        let shape = match self.relations.get(&oid) {
            Some(Known::Applied(shape)) => shape,
            Some(Known::Skipped(_)) => return Ok(None),
            None => {
                return Err(ApplyFailure::Protocol(format!(
                    "a change to relation {oid} before its description"
                )));
            }
        };
        match self.tables.get(&shape.name) {
            Some(t) if t.paused.is_none() && txn.final_lsn >= t.synced_lsn => {
                Ok(Some(Arc::clone(shape)))
            }
            _ => Ok(None),
        }
    }

    /// After a change was added to the batch (or refused): pause on refusal, and send a
    /// too-large transaction's part.
    async fn after_change(
        &mut self,
        shape: &TableShape,
        result: Result<(), ApplyError>,
    ) -> Result<(), ApplyFailure> {
        if let Err(e) = result {
            self.pause(&shape.name, e.to_string());
            return Ok(());
        }
        self.applied_rows += 1;
        // Twice the limits: a batch is sent at the first commit past the limits, so only a
        // source transaction larger than a batch gets here, and is sent in parts.
        if self.batch.rows() < 2 * self.limits.rows && self.batch.bytes() < 2 * self.limits.bytes {
            return Ok(());
        }
        let statements = self.batch.take();
        if self.batch_careful {
            return self.send_carefully(statements).await;
        }
        let until = self.txn.map_or(self.committed, |t| t.final_lsn);
        let mut parts = Parts::default();
        parts.sql(&self.open_transaction_sql());
        for s in statements {
            parts.statement(s);
        }
        self.send(parts.0, until, None).await
    }

    fn pause(&mut self, name: &QualifiedName, reason: String) {
        tracing::error!(table = %name, %reason, "pausing the table: its changes are skipped until it is synced again");
        if let Some(t) = self.tables.get_mut(name) {
            t.paused = Some(reason.clone());
        }
        self.newly_paused.push((name.clone(), reason));
    }

    /// A relation's description: compare with the mirror, add new columns, or pause.
    async fn relation(&mut self, relation: Relation) -> Result<(), ApplyFailure> {
        // Catalog look-ups on the mirror run after the batch in flight; a rejected batch must
        // surface as such, not as a failed look-up in an aborted transaction.
        self.settle().await?;
        let schema = if relation.namespace.is_empty() {
            "pg_catalog".to_string()
        } else {
            relation.namespace.clone()
        };
        let name = QualifiedName::new(schema, relation.name.clone());
        let replicated = self.tables.get(&name).is_some_and(|t| t.paused.is_none());
        if !replicated {
            self.relations.insert(relation.oid, Known::Skipped(name));
            return Ok(());
        }
        // What the description says is read from the source's catalog (a column's default, a
        // new partition), which must show the transaction that changed it.
        if let Some(txn) = self.txn {
            self.wait_visible(txn.xid).await?;
        }
        let mirror = self.mirror_columns(&name).await?;
        let kind = self.mirror_kind(&name).await?;
        let source_types = self.source_types(&relation).await?;
        match compare(&name, &relation, &source_types, kind.is_some(), &mirror) {
            Err(reason) => {
                self.pause(&name, reason);
                self.relations.insert(relation.oid, Known::Skipped(name));
            }
            Ok(added) => {
                let mut columns = self.mirror_columns.remove(&name).unwrap_or_default();
                for i in added {
                    let column = &relation.columns[i];
                    let (statements, identity_always) = self
                        .added_column(&name, relation.oid, &column.name, &source_types[i])
                        .await?;
                    tracing::info!(table = %name, column = %column.name, type_name = %source_types[i], "adding a column the source added");
                    for sql in statements {
                        self.batch.barrier(Statement {
                            tables: vec![relation.oid],
                            sql,
                            copy: None,
                            rows: 0,
                        });
                    }
                    columns.push(MirrorColumn {
                        name: column.name.clone(),
                        type_name: source_types[i].clone(),
                        required: false,
                        identity_always,
                    });
                }
                let shape = TableShape {
                    oid: relation.oid,
                    name: name.clone(),
                    columns: relation
                        .columns
                        .iter()
                        .map(|c| ShapeColumn {
                            name: c.name.clone(),
                            key: c.key,
                            mirror_type: columns
                                .iter()
                                .find(|m| m.name == c.name)
                                .map(|m| m.type_name.clone())
                                .unwrap_or_default(),
                            identity_always: columns
                                .iter()
                                .any(|m| m.name == c.name && m.identity_always),
                        })
                        .collect(),
                    identity_full: relation.replica_identity == b'f',
                    partitioned: kind == Some('p'),
                };
                if kind == Some('p') {
                    // A partition the source created since (a new month): on the mirror before
                    // the rows that go to it. The first change a stream sends for a partition
                    // comes after its root's description, so this always runs in time.
                    for sql in self.missing_partitions(&name).await? {
                        self.batch.barrier(Statement {
                            tables: vec![relation.oid],
                            sql,
                            copy: None,
                            rows: 0,
                        });
                    }
                }
                self.mirror_columns.insert(name, columns);
                self.relations
                    .insert(relation.oid, Known::Applied(Arc::new(shape)));
            }
        }
        Ok(())
    }

    /// Waits until source transaction `xid` is visible to new snapshots on the source. The
    /// stream can bring a transaction a moment before the source shows it to other sessions:
    /// its commit is in the WAL (which is what is decoded) before it leaves the list of
    /// running transactions, and a catalog read in between would miss what it changed.
    async fn wait_visible(&self, xid: u32) -> Result<(), ApplyFailure> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = self
                .source
                .query_one(
                    "SELECT pg_catalog.pg_snapshot_xmax(s)::text, \
                            ARRAY(SELECT x::text FROM pg_catalog.pg_snapshot_xip(s) AS x)::text[] \
                     FROM pg_catalog.pg_current_snapshot() AS s",
                    &[],
                )
                .await
                .map_err(query("failed to read the source's running transactions"))?;
            let xmax: String = row.get(0);
            let running: Vec<String> = row.get(1);
            if snapshot_shows(xid, &xmax, &running) || Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn mirror_kind(&mut self, name: &QualifiedName) -> Result<Option<char>, ApplyFailure> {
        if let Some(kind) = self.mirror_kinds.get(name) {
            return Ok(*kind);
        }
        let kind = self
            .mirror
            .query_opt(
                "SELECT c.relkind::text FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&name.schema, &name.name],
            )
            .await
            .map_err(query(format!("failed to look for {name} on the mirror")))?
            .and_then(|r| r.get::<_, String>(0).chars().next());
        self.mirror_kinds.insert(name.clone(), kind);
        Ok(kind)
    }

    /// The statements that give the mirror's partitioned `table` the partitions the source's
    /// has and it lacks, built as the source's: their own columns, keys and indexes (named as
    /// on the source, so attaching the partition attaches them), bounds, sub-partitions, and
    /// their own foreign keys. A partition the source no longer has is left alone (its rows
    /// stay on the mirror), and said so.
    async fn missing_partitions(
        &mut self,
        table: &QualifiedName,
    ) -> Result<Vec<String>, ApplyFailure> {
        let source = crate::sync::catalog::read_tables(&self.source, std::slice::from_ref(table))
            .await
            .map_err(query(format!(
                "failed to read the partitions of {table} on the source"
            )))?;
        let Some(def) = source.tables.get(table) else {
            return Ok(Vec::new());
        };
        let have: Vec<QualifiedName> = self
            .mirror
            .query(
                "SELECT n.nspname::text, c.relname::text \
                 FROM pg_catalog.pg_partition_tree(pg_catalog.to_regclass($1)) t \
                 JOIN pg_catalog.pg_class c ON c.oid = t.relid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE t.level > 0",
                &[&table.quoted()],
            )
            .await
            .map_err(query(format!(
                "failed to read the partitions of {table} on the mirror"
            )))?
            .iter()
            .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        for gone in have
            .iter()
            .filter(|h| !def.partitions.iter().any(|p| &p.def.name == *h))
        {
            tracing::warn!(%table, partition = %gone, "the source no longer has this partition; the mirror keeps it and its rows: drop it there (DROP TABLE) if they should go too");
        }
        let mut out = Vec::new();
        let new: Vec<&crate::sync::catalog::Partition> = def
            .partitions
            .iter()
            .filter(|p| !have.contains(&p.def.name) && !self.partitions_made.contains(&p.def.name))
            .collect();
        for p in new {
            self.partitions_made.insert(p.def.name.clone());
            tracing::info!(%table, partition = %p.def.name, bound = %p.bound, "creating a partition the source created");
            // Its own foreign keys, to tables the mirror has.
            let mut referenced = Vec::new();
            for fk in &p.def.foreign_keys {
                let there: bool = self
                    .mirror
                    .query_one(
                        "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                        &[&fk.referenced.quoted()],
                    )
                    .await
                    .map_err(query("failed to look for a referenced table on the mirror"))?
                    .get(0);
                if there {
                    referenced.push(fk.referenced.clone());
                }
            }
            out.extend(crate::sync::ddl::new_partition(p, &referenced));
        }
        Ok(out)
    }

    async fn mirror_columns(
        &mut self,
        name: &QualifiedName,
    ) -> Result<Vec<MirrorColumn>, ApplyFailure> {
        if let Some(columns) = self.mirror_columns.get(name) {
            return Ok(columns.clone());
        }
        let rows = self
            .mirror
            .query(
                "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                        a.attnotnull AND NOT a.atthasdef AND a.attgenerated = '' AND a.attidentity = '', \
                        a.attidentity = 'a' \
                 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&name.schema, &name.name],
            )
            .await
            .map_err(query(format!(
                "failed to read the columns of {name} on the mirror"
            )))?;
        let columns: Vec<MirrorColumn> = rows
            .iter()
            .map(|r| MirrorColumn {
                name: r.get(0),
                type_name: r.get(1),
                required: r.get(2),
                identity_always: r.get(3),
            })
            .collect();
        self.mirror_columns.insert(name.clone(), columns.clone());
        Ok(columns)
    }

    /// The source's names for the relation's column types, as `format_type` prints them.
    async fn source_types(&self, relation: &Relation) -> Result<Vec<String>, ApplyFailure> {
        let oids: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
        let mods: Vec<i32> = relation.columns.iter().map(|c| c.type_modifier).collect();
        let row = self
            .source
            .query_one(
                "SELECT COALESCE(array_agg(pg_catalog.format_type(t.oid, t.typmod) ORDER BY t.ord), '{}') \
                 FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, typmod, ord)",
                &[&oids, &mods],
            )
            .await
            .map_err(query("failed to read column types on the source"))?;
        Ok(row.get(0))
    }

    /// The statements that add a column the source added, the way the source has it: type,
    /// collation, default, `NOT NULL`, identity, and the check and unique constraints over it
    /// (the sequences its default draws from are created first). Existing rows get the
    /// default, as they did on the source (a constant default gives them the source's values;
    /// a volatile one, such as a sequence, cannot, and draws the mirror's own). Also whether
    /// the column is `GENERATED ALWAYS AS IDENTITY`.
    async fn added_column(
        &self,
        table: &QualifiedName,
        oid: u32,
        column: &str,
        type_name: &str,
    ) -> Result<(Vec<String>, bool), ApplyFailure> {
        let added = crate::sync::catalog::read_added_column(&self.source, oid, column)
            .await
            .map_err(query(format!(
                "failed to read column {column} of {table} on the source"
            )))?;
        let Some(added) = added else {
            // Dropped again on the source since: the type is all there is to go by.
            return Ok((
                vec![format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {type_name}",
                    table.quoted(),
                    quote(column)
                )],
                false,
            ));
        };
        let mut out = Vec::new();
        for seq in &added.sequences {
            out.push(format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote(&seq.name.schema)
            ));
            out.push(crate::sync::ddl::create_sequence(seq));
        }
        out.push(format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {}",
            table.quoted(),
            crate::sync::ddl::column_sql(&added.column)
        ));
        for constraint in &added.constraints {
            out.push(crate::sync::ddl::add_key(table, constraint));
        }
        for seq in &added.sequences {
            if seq
                .owned_by
                .as_ref()
                .is_some_and(|(t, c)| t == table && c == column)
            {
                out.push(format!(
                    "ALTER SEQUENCE {} OWNED BY {}.{}",
                    seq.name.quoted(),
                    table.quoted(),
                    quote(column)
                ));
            }
        }
        let identity_always = added.column.identity.as_ref().is_some_and(|i| i.always);
        Ok((out, identity_always))
    }
}

/// Whether a snapshot (its `xmax` and running `xip`, as 64-bit transaction ids in text) shows
/// the committed transaction `xid` (32 bits, as the stream names it): below xmax and not
/// running, in the 32-bit space's circular order.
fn snapshot_shows(xid: u32, xmax: &str, running: &[String]) -> bool {
    let low = |text: &str| text.parse::<u64>().ok().map(|x| x as u32);
    let Some(xmax) = low(xmax) else {
        return true;
    };
    let below_xmax = (1..1u32 << 31).contains(&xmax.wrapping_sub(xid));
    below_xmax && !running.iter().any(|r| low(r) == Some(xid))
}

/// Compares a relation's columns with the mirror's: the indexes of columns to add, or why
/// the table must pause.
fn compare(
    name: &QualifiedName,
    relation: &Relation,
    source_types: &[String],
    exists: bool,
    mirror: &[MirrorColumn],
) -> Result<Vec<usize>, String> {
    if !exists {
        return Err(format!(
            "{name} does not exist on the mirror: restart bite-sync run to copy it again"
        ));
    }
    let mut added = Vec::new();
    for (i, column) in relation.columns.iter().enumerate() {
        let source_type = source_types.get(i).map(String::as_str).unwrap_or("?");
        match mirror.iter().find(|m| m.name == column.name) {
            Some(m) if m.type_name == source_type => {}
            Some(m) => {
                return Err(format!(
                    "column {}.{} is {} on the source but {} on the mirror: change the mirror's column (ALTER TABLE {} ALTER COLUMN {} TYPE {}) and restart bite-sync run to copy the table again",
                    name,
                    column.name,
                    source_type,
                    m.type_name,
                    name.quoted(),
                    quote(&column.name),
                    source_type
                ));
            }
            None => added.push(i),
        }
    }
    for m in mirror {
        if m.required && !relation.columns.iter().any(|c| c.name == m.name) {
            return Err(format!(
                "column {}.{} is NOT NULL without a default on the mirror but the source no longer sends it (dropped or renamed there): drop it or give it a default on the mirror, then restart bite-sync run",
                name, m.name
            ));
        }
    }
    Ok(added)
}

/// Records a pause in the mirror's bookkeeping (in the batch's transaction).
fn pause_sql(slot: &str, name: &QualifiedName, reason: &str) -> String {
    format!(
        "UPDATE bite_sync.replication_tables SET state = 'paused', reason = {}, paused_at = now() \
         WHERE slot_name = {} AND table_schema = {} AND table_name = {};\n",
        literal(reason),
        literal(slot),
        literal(&name.schema),
        literal(&name.name)
    )
}

/// A PostgreSQL timestamp (µs since 2000-01-01 UTC) as SQL.
fn timestamp_sql(micros: PgTimestamp) -> String {
    format!("(TIMESTAMPTZ '2000-01-01 00:00:00+00' + {micros} * INTERVAL '1 microsecond')")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::pgoutput::Column;

    fn relation(columns: &[(&str, bool)]) -> Relation {
        Relation {
            xid: None,
            oid: 7,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|(n, key)| Column {
                    key: *key,
                    name: n.to_string(),
                    type_oid: 23,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn mirror(columns: &[(&str, &str, bool)]) -> Vec<MirrorColumn> {
        columns
            .iter()
            .map(|(n, t, required)| MirrorColumn {
                name: n.to_string(),
                type_name: t.to_string(),
                required: *required,
                identity_always: false,
            })
            .collect()
    }

    fn name() -> QualifiedName {
        QualifiedName::new("public", "orders")
    }

    #[test]
    fn same_columns_need_nothing() {
        let r = relation(&[("id", true), ("n", false)]);
        let types = vec!["integer".to_string(), "integer".to_string()];
        assert_eq!(
            compare(
                &name(),
                &r,
                &types,
                true,
                &mirror(&[("id", "integer", true), ("n", "integer", false)])
            ),
            Ok(vec![])
        );
    }

    #[test]
    fn a_column_new_on_the_source_is_added() {
        let r = relation(&[("id", true), ("n", false), ("tip", false)]);
        let types = vec!["integer".into(), "integer".into(), "numeric(10,2)".into()];
        assert_eq!(
            compare(
                &name(),
                &r,
                &types,
                true,
                &mirror(&[("id", "integer", true), ("n", "integer", false)])
            ),
            Ok(vec![2])
        );
    }

    #[test]
    fn a_changed_type_pauses_with_both_types_and_the_fix() {
        let r = relation(&[("id", true), ("n", false)]);
        let types = vec!["integer".into(), "bigint".into()];
        let reason = compare(
            &name(),
            &r,
            &types,
            true,
            &mirror(&[("id", "integer", true), ("n", "integer", false)]),
        )
        .unwrap_err();
        assert!(
            reason.contains("orders.n is bigint on the source but integer on the mirror"),
            "{reason}"
        );
        assert!(
            reason.contains(r#"ALTER TABLE "public"."orders" ALTER COLUMN "n" TYPE bigint"#),
            "{reason}"
        );
    }

    #[test]
    fn a_dropped_column_pauses_only_when_the_mirror_requires_it() {
        let r = relation(&[("id", true)]);
        let types = vec!["integer".into()];
        assert_eq!(
            compare(
                &name(),
                &r,
                &types,
                true,
                &mirror(&[("id", "integer", true), ("n", "integer", false)])
            ),
            Ok(vec![])
        );
        let reason = compare(
            &name(),
            &r,
            &types,
            true,
            &mirror(&[("id", "integer", true), ("n", "integer", true)]),
        )
        .unwrap_err();
        assert!(reason.contains("NOT NULL without a default"), "{reason}");
    }

    #[test]
    fn a_table_missing_on_the_mirror_pauses() {
        let r = relation(&[("id", true)]);
        let reason = compare(&name(), &r, &["integer".into()], false, &[]).unwrap_err();
        assert!(reason.contains("does not exist on the mirror"), "{reason}");
        // A table without columns exists all the same.
        let empty = relation(&[]);
        assert_eq!(compare(&name(), &empty, &[], true, &[]), Ok(vec![]));
    }

    #[test]
    fn a_transaction_is_visible_once_below_xmax_and_not_running() {
        // Epoch 1: the stream's 32-bit xid is the low half.
        let epoch = 1u64 << 32;
        let t = |x: u64| (epoch + x).to_string();
        assert!(snapshot_shows(100, &t(101), &[]));
        assert!(!snapshot_shows(100, &t(100), &[]), "not yet below xmax");
        assert!(!snapshot_shows(100, &t(105), &[t(100)]), "still running");
        assert!(snapshot_shows(100, &t(105), &[t(99)]));
        // Across the 32-bit wrap: xid 4294967290, xmax 5 of the next epoch.
        assert!(snapshot_shows(
            4_294_967_290,
            &(2 * epoch + 5).to_string(),
            &[]
        ));
    }

    #[test]
    fn timestamps_are_exact_sql() {
        assert_eq!(
            timestamp_sql(1),
            "(TIMESTAMPTZ '2000-01-01 00:00:00+00' + 1 * INTERVAL '1 microsecond')"
        );
    }
}
