//! `bite-sync run`: the replication daemon's loop.
//!
//! A session prepares ([`setup`]), starts streaming at the position recorded on the mirror and
//! applies ([`Applier`]) until it fails or is told to stop. The loop around sessions retries
//! transient failures (lost connections, restarting servers, a slot still held by the previous
//! session's walsender) with capped exponential backoff and jitter; a definite failure ends
//! the daemon with its reason.
//!
//! Confirming positions to the source: a standby status update reports as flushed only
//! [`Applier::committed`], the position recorded on the mirror, so the source never recycles
//! WAL the mirror still needs. When nothing of ours is pending (only unpublished tables
//! changed), a keepalive's position is recorded on the mirror and then confirmed, so the
//! slot does not hold WAL for changes that do not concern us. Keepalives that ask for a reply
//! are answered at once.
//!
//! A stream that is caught up is silent: the walsender sends keepalives only to a client that
//! stopped reporting, and this one reports every ten seconds. So a status update sent after a
//! silent interval asks the source to answer, and the stream counts as dead only when nothing,
//! not even those answers, arrived for the silence limit. An idle night is normal operation:
//! no reconnects and no error recorded.
//!
//! Large transactions: the stream is asked for pgoutput protocol 1 without streaming, so a
//! transaction arrives once it committed (PostgreSQL spills a large one to the source's disk
//! while decoding) and is applied in parts inside one mirror transaction, in bounded memory.
//! The decoder also understands protocol 2's streamed chunks; asking for them would only move
//! that spilling from the source's disk to the daemon's, which here is the same machine.
//!
//! Stopping (SIGTERM/SIGINT): the transaction being read is read to its end (a few seconds at
//! most), the batch is committed on the mirror, its position confirmed to the source, the
//! mirror's sequences caught up, and the stream closed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Lsn;
use super::apply::{Applier, ApplyFailure, Limits};
use super::conn::{ReplError, ReplicationMessage, ReplicationStream};
use super::pgoutput::{DecodeError, StreamState};
use super::{sequences, setup};
use crate::bookkeeping::BookkeepingError;
use crate::pg::connect::{ConnectError, DbUrl};
use crate::pg::ident::{QualifiedName, TablePattern};
use crate::sync::{Observer, SyncError};

/// Everything the daemon needs to know.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The local database.
    pub source: DbUrl,
    /// The mirror.
    pub mirror: DbUrl,
    /// Tables to replicate.
    pub tables: Vec<TablePattern>,
    /// Publication on the source.
    pub publication: String,
    /// Replication slot on the source.
    pub slot: String,
    /// Allow the first write into a database without bookkeeping.
    pub init: bool,
    /// When batches are sent.
    pub limits: Limits,
    /// Jobs for table copies.
    pub jobs: usize,
    /// Swap lock timeout for table copies.
    pub lock_timeout: Duration,
    /// `maintenance_work_mem` for table copies.
    pub maintenance_work_mem: String,
    /// A stream silent this long is dead. A quiet stream is asked to answer at every status
    /// update (every 10 s), so this many seconds without an answer means the source or the
    /// path to it is gone.
    pub silence_limit: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// Partitioned tables become one plain table on the mirror (`[sync] flatten_partitions`).
    pub flatten_partitions: bool,
}

impl RunOptions {
    /// Options with defaults for everything but the databases and tables.
    pub fn new(source: DbUrl, mirror: DbUrl, tables: Vec<TablePattern>) -> RunOptions {
        RunOptions {
            source,
            mirror,
            tables,
            publication: crate::config::DEFAULT_REPLICATION_NAME.into(),
            slot: crate::config::DEFAULT_REPLICATION_NAME.into(),
            init: false,
            limits: Limits::default(),
            jobs: 2,
            lock_timeout: Duration::from_secs(10),
            maintenance_work_mem: "128MB".into(),
            silence_limit: Duration::from_secs(90),
            max_backoff: Duration::from_secs(30),
            flatten_partitions: false,
        }
    }
}

/// Why the daemon (or one session of it) stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Could not connect.
    #[error(transparent)]
    Connect(Box<ConnectError>),
    /// The replication connection failed.
    #[error(transparent)]
    Replication(#[from] ReplError),
    /// Copying tables failed.
    #[error("failed to copy tables for replication")]
    Sync(#[source] Box<SyncError>),
    /// The mirror's bookkeeping could not be set up.
    #[error("failed to set up bookkeeping on the mirror")]
    Bookkeeping(#[from] BookkeepingError),
    /// Applying failed.
    #[error(transparent)]
    Apply(#[from] ApplyFailure),
    /// The stream could not be decoded.
    #[error("failed to decode the replication stream")]
    Decode(#[from] DecodeError),
    /// A query failed.
    #[error("{context}")]
    Query {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Source and mirror are one database.
    #[error(
        "source and mirror are the same database ({0}): refusing to replicate a database onto itself; check BITE_SOURCE_URL and BITE_MIRROR_URL"
    )]
    SameDatabase(String),
    /// The mirror has no bookkeeping and `--init` was not given.
    #[error(
        "the mirror {0} has no bite_sync bookkeeping, so it has never been a bite-sync mirror: if it is the right database, run again with --init to set it up"
    )]
    NotInitialized(String),
    /// No tables configured.
    #[error(
        "no tables to replicate: pass --tables customers,orders or set replication.tables in bite-sync.toml"
    )]
    NoTables,
    /// What keeps the start from going through, all of it, found before anything changed.
    #[error("bite-sync run cannot start; nothing was changed on the source or the mirror:\n  - {}", .0.join("\n  - "))]
    Preflight(Vec<String>),
    /// The mirror's record of the slot names another source.
    #[error(
        "the mirror's replication state for slot {slot} belongs to another source database: use another --slot, or delete that row from bite_sync.replication_state if the old source is gone"
    )]
    WrongSource {
        /// The slot.
        slot: String,
    },
    /// The slot is in use by another connection.
    #[error(
        "replication slot {0} is in use by another connection (another bite-sync run, or the previous one's connection not yet closed)"
    )]
    SlotActive(String),
    /// A slot of that name exists but is not a pgoutput slot of the source database.
    #[error(
        "a replication slot named {0} exists on the source but is not a pgoutput slot of this database: choose another --slot"
    )]
    ForeignSlot(String),
    /// Another daemon replicates this slot into the mirror.
    #[error("another bite-sync run is replicating slot {0} into this mirror")]
    Busy(String),
    /// Nothing arrived for too long.
    #[error("the replication stream has been silent for {0:?}; reconnecting")]
    Silent(Duration),
    /// The source ended the stream.
    #[error("the source ended the replication stream")]
    StreamEnded,
    /// The source did something bite-sync does not expect.
    #[error("unexpected answer from the source: {0}")]
    Protocol(String),
}

impl From<ConnectError> for RunError {
    fn from(e: ConnectError) -> Self {
        RunError::Connect(Box::new(e))
    }
}

impl From<SyncError> for RunError {
    fn from(e: SyncError) -> Self {
        RunError::Sync(Box::new(e))
    }
}

impl RunError {
    /// Worth retrying after a pause.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Connect(e) => e.is_transient(),
            RunError::Replication(e) => e.is_transient(),
            RunError::Sync(e) => e.is_transient(),
            RunError::Apply(e) => e.is_transient(),
            RunError::Bookkeeping(BookkeepingError::Query { source, .. })
            | RunError::Query { source, .. } => {
                source.is_closed() || source.as_db_error().is_none()
            }
            RunError::SlotActive(_)
            | RunError::Busy(_)
            | RunError::Silent(_)
            | RunError::StreamEnded => true,
            _ => false,
        }
    }

    /// Exit code: 2 for what the user must change in how bite-sync is run, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::SameDatabase(_)
            | RunError::NotInitialized(_)
            | RunError::NoTables
            | RunError::Preflight(_)
            | RunError::WrongSource { .. }
            | RunError::ForeignSlot(_) => 2,
            RunError::Sync(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// Runs the daemon until `cancel` fires (then returns `Ok`) or a definite failure.
pub async fn run(
    opts: &RunOptions,
    observer: Arc<dyn Observer>,
    cancel: CancellationToken,
) -> Result<(), RunError> {
    let mut careful_until = Lsn::ZERO;
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let result = session(opts, &observer, &cancel, careful_until).await;
        if cancel.is_cancelled() {
            return match result {
                Err(e)
                    if !e.is_transient()
                        && !matches!(&e, RunError::Sync(s) if matches!(**s, SyncError::Cancelled)) =>
                {
                    Err(e)
                }
                _ => Ok(()),
            };
        }
        match result {
            Ok(()) => return Ok(()),
            Err(RunError::Apply(ApplyFailure::Rejected { until, source })) => {
                tracing::warn!(error = %crate::error_chain(&source), %until, "the mirror rejected a batch; applying it again change by change to find the table to pause");
                careful_until = until;
            }
            Err(e) if e.is_transient() => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                let wait = jitter(backoff);
                if matches!(e, RunError::SlotActive(_) | RunError::Busy(_)) {
                    // The slot is still held: by the previous session's walsender, not yet
                    // gone, or by a daemon that just handed over. Waiting is normal, not an
                    // error.
                    tracing::info!(reason = %e, retry_in = ?wait, "waiting for the replication slot");
                } else {
                    tracing::warn!(error = %crate::error_chain(&e), retry_in = ?wait, "replication interrupted; retrying");
                    record_error(opts, &e).await;
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(opts.max_backoff);
            }
            Err(e) => {
                record_error(opts, &e).await;
                return Err(e);
            }
        }
    }
}

/// Half to the whole of `base`, so many daemons restarting at once do not retry in step.
fn jitter(base: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

/// Best effort: the last error in the mirror's bookkeeping, for `status`.
async fn record_error(opts: &RunOptions, error: &RunError) {
    let text = crate::error_chain(error);
    let attempt = async {
        let mirror = opts.mirror.connect().await.ok()?;
        mirror
            .execute(
                "UPDATE bite_sync.replication_state SET last_error = $1, last_error_at = now() WHERE slot_name = $2",
                &[&text, &opts.slot],
            )
            .await
            .ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
}

/// How often sequences are caught up while streaming.
const SEQUENCE_INTERVAL: Duration = Duration::from_secs(10);
/// How often the list of sequences the tables use is read again.
const SEQUENCE_LIST_INTERVAL: Duration = Duration::from_secs(300);
/// Standby status updates at least this often (PostgreSQL's default receiver interval).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How often the slot's retained WAL is compared with the source's limit.
const WAL_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How often a batch on its way to the mirror is checked for being done.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(5);
/// A newly committed position is confirmed at most this often.
const PROMPT_STATUS: Duration = Duration::from_millis(50);
/// Idle positions recorded on the mirror at most this often.
const IDLE_ADVANCE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stop waits for the transaction being read to end.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The stream's side of a session: what was received and confirmed.
struct Feed {
    stream: ReplicationStream,
    decoder: StreamState,
    received: Lsn,
    confirmed: Lsn,
    last_status: Instant,
    last_message: Instant,
    /// A keepalive's position not yet recorded as reached (idle advances are rate-limited).
    idle_target: Lsn,
    last_idle: Instant,
    /// The last "caught up" mark on the mirror: when, and at which committed position.
    caught_up_mark: Option<(Instant, Lsn)>,
}

impl Feed {
    async fn confirm(&mut self, committed: Lsn, reply: bool) -> Result<(), RunError> {
        self.stream
            .send_status(self.received.max(committed), committed, committed, reply)
            .await?;
        self.confirmed = committed;
        self.last_status = Instant::now();
        Ok(())
    }

    /// Reads one message and hands it to the applier.
    /// Records the latest keepalive position as reached, if nothing is pending and the last
    /// such write is old enough (or `now`).
    async fn advance_idle(&mut self, applier: &mut Applier, now: bool) -> Result<(), RunError> {
        if applier.is_idle()
            && self.idle_target > applier.committed()
            && (now || self.last_idle.elapsed() >= IDLE_ADVANCE_INTERVAL)
        {
            applier.advance_idle(self.idle_target).await?;
            self.last_idle = Instant::now();
        }
        Ok(())
    }

    async fn step(
        &mut self,
        message: Option<ReplicationMessage>,
        applier: &mut Applier,
    ) -> Result<(), RunError> {
        self.last_message = Instant::now();
        match message {
            None => Err(RunError::StreamEnded),
            Some(ReplicationMessage::XLogData {
                wal_start, data, ..
            }) => {
                self.received = self.received.max(wal_start);
                let message = self.decoder.decode(&data)?;
                applier.handle(message).await?;
                Ok(())
            }
            Some(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            }) => {
                self.received = self.received.max(wal_end);
                if applier.is_idle() {
                    self.idle_target = self.idle_target.max(wal_end);
                }
                self.advance_idle(applier, reply_requested).await?;
                if reply_requested {
                    self.confirm(applier.committed(), false).await?;
                }
                Ok(())
            }
        }
    }
}

async fn session(
    opts: &RunOptions,
    observer: &Arc<dyn Observer>,
    cancel: &CancellationToken,
    careful_until: Lsn,
) -> Result<(), RunError> {
    let preparing = setup::prepare(opts, observer, cancel);
    tokio::pin!(preparing);
    let prepared = tokio::select! {
        prepared = &mut preparing => prepared?,
        () = cancel.cancelled() => {
            // A copy in progress sees the cancellation too and ends; a first start then drops
            // the slot it created. Waiting for that is bounded: a stuck look-up is abandoned.
            let _ = tokio::time::timeout(Duration::from_secs(40), preparing).await;
            return Ok(());
        }
    };
    let names: Vec<QualifiedName> = prepared.tables.iter().map(|t| t.name.clone()).collect();
    let start = prepared.start;
    let search_path = prepared.search_path.clone();
    let mut sequence_list = sequences::used_by(&prepared.source, &names, &search_path)
        .await
        .map_err(|source| RunError::Query {
            context: "failed to find the sequences the tables use".into(),
            source,
        })?;
    let mut sequence_list_read = Instant::now();
    let mut applier = Applier::new(
        &opts.slot,
        prepared.mirror,
        prepared.source,
        prepared.tables,
        start,
        careful_until,
        opts.limits,
    )
    .await?;
    for (table, reason) in applier.paused() {
        tracing::warn!(%table, %reason, "table paused: its changes are skipped until its cause is fixed and bite-sync run restarts");
    }
    let stream = prepared
        .replication
        .start_replication(
            &opts.slot,
            start,
            &[
                ("proto_version", "1"),
                ("publication_names", &opts.publication),
            ],
        )
        .await?;
    tracing::info!(slot = %opts.slot, lsn = %start, tables = names.len(), "streaming changes to the mirror");
    let mut feed = Feed {
        stream,
        decoder: StreamState::default(),
        received: start,
        confirmed: start,
        last_status: Instant::now(),
        last_message: Instant::now(),
        idle_target: start,
        last_idle: Instant::now(),
        caught_up_mark: None,
    };
    let mut last_sequences: Option<Instant> = None;
    let mut last_wal_check: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = applier.deadline();
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                return stop(feed, applier, &sequence_list).await;
            }
            message = feed.stream.next() => {
                let message = message?;
                feed.step(message, &mut applier).await?;
                // Under a steady stream the timer branch may never be picked.
                applier.flush_if_due().await?;
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                applier.flush_if_due().await?;
            }
            // A batch on its way: notice soon that it is done, to confirm it to the source.
            () = tokio::time::sleep(IN_FLIGHT_POLL), if applier.has_in_flight() => {}
            // A committed position not yet confirmed (confirmations are rate-limited).
            () = tokio::time::sleep(PROMPT_STATUS), if applier.committed() > feed.confirmed => {}
            _ = tick.tick() => {
                if feed.last_message.elapsed() > opts.silence_limit {
                    return Err(RunError::Silent(opts.silence_limit));
                }
                feed.advance_idle(&mut applier, false).await?;
                if applier.is_idle()
                    && feed.caught_up_mark.is_none_or(|(at, lsn)| {
                        lsn < applier.committed() || at.elapsed() >= crate::bookkeeping::CAUGHT_UP_INTERVAL
                    })
                    && caught_up(&applier, feed.received).await?
                {
                    applier.mark_caught_up().await?;
                    feed.caught_up_mark = Some((Instant::now(), applier.committed()));
                }
                if last_sequences.is_none_or(|t| t.elapsed() >= SEQUENCE_INTERVAL) {
                    // A default changed on the source may use another sequence now.
                    if sequence_list_read.elapsed() >= SEQUENCE_LIST_INTERVAL {
                        sequence_list = sequences::used_by(applier.source(), &names, &search_path)
                            .await
                            .map_err(|source| RunError::Query { context: "failed to find the sequences the tables use".into(), source })?;
                        sequence_list_read = Instant::now();
                    }
                    let values = sequences::read(applier.source(), &sequence_list)
                        .await
                        .map_err(|source| RunError::Query { context: "failed to read the source's sequences".into(), source })?;
                    if let Some(sql) = sequences::catch_up_sql(&values) {
                        applier.catch_up_sequences(sql).await?;
                    }
                    last_sequences = Some(Instant::now());
                }
                if last_wal_check.is_none_or(|t| t.elapsed() >= WAL_CHECK_INTERVAL) {
                    warn_if_wal_nears_limit(&applier, &opts.slot).await;
                    last_wal_check = Some(Instant::now());
                }
                if feed.last_status.elapsed() >= STATUS_INTERVAL {
                    let progress = applier.progress();
                    tracing::debug!(received = %feed.received, committed = %progress.committed, rows = progress.rows, transactions = progress.transactions, "streaming");
                    // A caught-up walsender sends nothing at all while this side keeps
                    // reporting (it pings only a client that has gone quiet), so a quiet
                    // stream is asked to answer: then only a stream that does not answer for
                    // the silence limit is dead, never an idle source.
                    let ask = feed.last_message.elapsed() >= STATUS_INTERVAL;
                    feed.confirm(applier.committed(), ask).await?;
                }
            }
        }
        applier.settle_if_done().await?;
        // Committed on the mirror: tell the source soon, so its WAL can go and its lag
        // figures (pg_stat_replication) are true.
        if applier.committed() > feed.confirmed && feed.last_status.elapsed() >= PROMPT_STATUS {
            feed.confirm(applier.committed(), false).await?;
        }
    }
}

/// Whether the mirror holds everything the source has written: nothing is pending here and
/// the stream has brought us to the source's current WAL position (a backlog still being
/// decoded on the source is not caught up, though the applier is idle meanwhile).
async fn caught_up(applier: &Applier, received: Lsn) -> Result<bool, RunError> {
    let end: String = applier
        .source()
        .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|source| RunError::Query {
            context: "failed to read the source's WAL position".into(),
            source,
        })?
        .get(0);
    let end: Lsn = end.parse().unwrap_or(Lsn(u64::MAX));
    Ok(received.max(applier.committed()) >= end)
}

/// Warns when the slot may retain less than a fifth of `max_slot_wal_keep_size` more before
/// the source invalidates it (which would force copying every table again).
async fn warn_if_wal_nears_limit(applier: &Applier, slot: &str) {
    let row = applier
        .source()
        .query_opt(
            "SELECT safe_wal_size, pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::int8, \
                    pg_catalog.current_setting('max_slot_wal_keep_size') \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    if let Ok(Some(row)) = row {
        let (safe, retained, limit): (Option<i64>, Option<i64>, String) =
            (row.get(0), row.get(1), row.get(2));
        if let (Some(safe), Some(retained)) = (safe, retained)
            && safe < (safe + retained) / 5
        {
            tracing::warn!(
                retained = %super::status::human_bytes(retained),
                room_left = %super::status::human_bytes(safe.max(0)),
                max_slot_wal_keep_size = %limit,
                "the replication slot nears the source's WAL limit: if the mirror cannot keep up, the source will invalidate the slot and every table will be copied again"
            );
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Stops cleanly: see the module docs.
async fn stop(
    mut feed: Feed,
    mut applier: Applier,
    sequence_list: &[QualifiedName],
) -> Result<(), RunError> {
    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        while applier.in_transaction() {
            let message = feed.stream.next().await?;
            feed.step(message, &mut applier).await?;
        }
        applier.flush().await?;
        applier.settle().await?;
        Ok::<_, RunError>(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => {
            tracing::warn!(
                "stopping in the middle of a large transaction: it is applied after the next start"
            );
            applier.abandon().await;
        }
    }
    if let Err(source) =
        sequences::catch_up(applier.source(), applier.mirror(), sequence_list).await
    {
        tracing::warn!(error = %crate::error_chain(&source), "could not catch up the mirror's sequences while stopping");
    }
    feed.confirm(applier.committed(), false).await?;
    let progress = applier.progress();
    tracing::info!(lsn = %progress.committed, rows = progress.rows, transactions = progress.transactions, "stopped; the mirror is at the position confirmed to the source");
    feed.stream.finish().await?;
    Ok(())
}
