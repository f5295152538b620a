//! On-demand table sync: copy chosen tables, schema and data, from the source to the mirror,
//! atomically.
//!
//! A run goes:
//! 1. **Safety**: refuse when source and mirror are the same database, and refuse to write into
//!    a database without `bite_sync` bookkeeping unless `--init` was given. One run at a time
//!    per mirror (an advisory lock held by the run's control connection).
//! 2. **Snapshot**: a repeatable-read transaction on the source exports its snapshot; every
//!    worker imports it, so all tables are read as of one instant, and the catalog is read in
//!    it too.
//! 3. **Plan** ([`plan`]): resolve patterns, compare with the mirror, refuse what cannot be
//!    applied, find what the tables need that the mirror lacks ([`depends`]) and refuse what
//!    bite-sync cannot create, order by foreign keys. Nothing has changed on either side up to
//!    here (not even the bookkeeping); `--dry-run` stops here and prints the plan.
//! 4. **Stage**: schemas, types, collations, extensions, functions and sequences the tables
//!    need are created on the mirror (additive, harmless to readers). A partitioned table is
//!    built partitioned, each partition filled from its own on the source (or as one plain
//!    table, `flatten_partitions`). Each table is built in a per-run staging schema by up to
//!    `--jobs` workers: `CREATE TABLE`, binary `COPY ... FREEZE` streamed from the source
//!    ([`copy`]), then keys and indexes: data before indexes. Then foreign keys among staged
//!    tables, and sequences set to the source's values.
//! 5. **Swap** ([`swap`]): one short transaction drops the old tables and moves the staged
//!    ones into place, and records the run. Readers see the old rows until it commits.
//!
//! Killed at any point before the swap commits, a run leaves the mirror's tables untouched;
//! the next run removes its staging schemas.

mod build;
pub mod catalog;
pub mod copy;
pub mod ddl;
pub mod depends;
pub mod plan;
pub mod progress;
pub mod report;
pub mod swap;
pub mod tasks;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::bookkeeping::{self, BookkeepingError};
use crate::pg::connect::{ConnectError, DbUrl};
use crate::pg::ident::{QualifiedName, TablePattern, literal, quote};

use self::catalog::{ForeignKeyDef, SourceCatalog, TableDef};
use self::copy::{CopyFormat, CopyStats};
pub use self::plan::{Mode, PlanError, TableAction};
use self::swap::{SwapPlan, SwapTable};

/// Everything a sync run needs to know.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The local database.
    pub source: DbUrl,
    /// The cloud mirror.
    pub mirror: DbUrl,
    /// Tables to sync (empty: every user table).
    pub tables: Vec<TablePattern>,
    /// Tables to leave out.
    pub exclude: Vec<TablePattern>,
    /// Schema, data or both.
    pub mode: Mode,
    /// Tables built in parallel (connections per side: this plus one).
    pub jobs: usize,
    /// Plan only.
    pub dry_run: bool,
    /// Allow the first write into a database without bookkeeping.
    pub init: bool,
    /// How long the swap waits for readers' locks before trying again.
    pub lock_timeout: Duration,
    /// `maintenance_work_mem` for index builds on the mirror, e.g. `256MB`.
    pub maintenance_work_mem: String,
    /// Read from this exported snapshot instead of taking a new one (replication set-up).
    pub snapshot: Option<String>,
    /// Build each partitioned table as one plain table on the mirror (`[sync]
    /// flatten_partitions`), instead of partitioned the same way as on the source.
    pub flatten_partitions: bool,
    /// The replication daemon's own copy (or its check of one): tables it streams into may be
    /// replaced.
    pub replicating: bool,
}

impl SyncOptions {
    /// Options with the defaults for everything but the two databases.
    pub fn new(source: DbUrl, mirror: DbUrl) -> Self {
        Self {
            source,
            mirror,
            tables: Vec::new(),
            exclude: Vec::new(),
            mode: Mode::Full,
            jobs: 2,
            dry_run: false,
            init: false,
            lock_timeout: Duration::from_secs(10),
            maintenance_work_mem: "128MB".into(),
            snapshot: None,
            flatten_partitions: false,
            replicating: false,
        }
    }

    /// Every table `[sync]` selects, with its jobs, lock timeout and index memory: what
    /// `bite-sync sync` and a scheduled sync start from.
    pub fn configured(
        source: DbUrl,
        mirror: DbUrl,
        settings: &crate::config::SyncSettings,
    ) -> Self {
        Self {
            tables: settings.tables.clone(),
            exclude: settings.exclude.clone(),
            jobs: settings.jobs,
            lock_timeout: settings.lock_timeout,
            maintenance_work_mem: settings.maintenance_work_mem.clone(),
            flatten_partitions: settings.flatten_partitions,
            ..Self::new(source, mirror)
        }
    }
}

/// What a run did (or, for `--dry-run`, would do). Serialized for `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncReport {
    /// The run's id in `bite_sync.sync_runs` (none for dry runs).
    pub run_id: Option<i64>,
    /// Whether this was only a plan.
    pub dry_run: bool,
    /// Schema, data or both.
    pub mode: Mode,
    /// Whether this run created the mirror's bookkeeping (`--init` on a fresh database).
    pub initialized_mirror: bool,
    /// Statements run before the tables are built: schemas, types, sequences.
    pub prepare: Vec<String>,
    /// Per table, in foreign-key order.
    pub tables: Vec<TableReport>,
    /// Rows copied in all.
    pub rows: u64,
    /// Bytes copied in all.
    pub bytes: u64,
    /// Wall time of the run.
    pub duration_ms: u64,
    /// Things the user should know: skipped foreign keys, keys that failed validation ...
    pub warnings: Vec<String>,
}

/// One table of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    /// As the user would type it.
    pub table: String,
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// What happens to the mirror's table.
    #[serde(flatten)]
    pub action: TableAction,
    /// COPY format used.
    pub format: CopyFormat,
    /// Rows copied.
    pub rows: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Time spent building the table (copy and indexes).
    pub duration_ms: u64,
    /// The DDL that builds it (shown by `--dry-run`).
    pub ddl: Vec<String>,
}

/// Hooks for showing progress; every method has a no-op default.
pub trait Observer: Send + Sync {
    /// A phase of the run begins.
    fn phase(&self, _what: &str) {}
    /// A table starts building.
    fn table_started(&self, _table: &QualifiedName, _estimated_rows: u64) {}
    /// Rows are flowing.
    fn table_progress(&self, _table: &QualifiedName, _stats: CopyStats) {}
    /// A table's rows are in; its indexes and keys come next.
    fn table_loaded(&self, _table: &QualifiedName, _stats: CopyStats) {}
    /// A table is built (indexes included).
    fn table_finished(&self, _table: &QualifiedName, _stats: CopyStats) {}
    /// The new tables are about to be swapped in: from here on the run finishes even when
    /// stopped (the swap is one short transaction, and stopping in it would leave the user
    /// unsure which rows the mirror holds).
    fn swapping(&self) {}
    /// The run was stopped before its swap (Ctrl-C, SIGTERM): nothing more will be shown.
    fn interrupted(&self) {}
}

/// Passes everything on to the caller's observer, noting whether the swap has begun.
struct SwapWatch {
    inner: Arc<dyn Observer>,
    swapping: std::sync::atomic::AtomicBool,
}

impl Observer for SwapWatch {
    fn phase(&self, what: &str) {
        self.inner.phase(what);
    }
    fn table_started(&self, table: &QualifiedName, estimated_rows: u64) {
        self.inner.table_started(table, estimated_rows);
    }
    fn table_progress(&self, table: &QualifiedName, stats: CopyStats) {
        self.inner.table_progress(table, stats);
    }
    fn table_loaded(&self, table: &QualifiedName, stats: CopyStats) {
        self.inner.table_loaded(table, stats);
    }
    fn table_finished(&self, table: &QualifiedName, stats: CopyStats) {
        self.inner.table_finished(table, stats);
    }
    fn swapping(&self) {
        self.swapping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.swapping();
    }
    fn interrupted(&self) {
        self.inner.interrupted();
    }
}

/// An [`Observer`] that shows nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// Which database an error came from, for permission hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The local database.
    Source,
    /// The mirror.
    Mirror,
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Could not connect.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Source and mirror are one database.
    #[error(
        "source and mirror are the same database ({0}): refusing to sync a database onto itself; check BITE_SOURCE_URL and BITE_MIRROR_URL"
    )]
    SameDatabase(String),
    /// The mirror has no bookkeeping and `--init` was not given.
    #[error(
        "{0} has no bite_sync bookkeeping, so it has never been a bite-sync mirror: if it is the right database, run again with --init to set it up (this protects production databases from a mistyped URL)"
    )]
    NotInitialized(String),
    /// What was asked cannot be done.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Bookkeeping migrations failed.
    #[error("failed to set up bookkeeping on the mirror")]
    Bookkeeping(#[from] BookkeepingError),
    /// Objects the tables need that the mirror lacks and bite-sync cannot create; nothing
    /// was changed on either side.
    #[error("the mirror lacks what the tables need, and bite-sync cannot create it; nothing was changed:\n  - {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - "))]
    MissingDependencies(Vec<depends::Missing>),
    /// Mirror objects would be dropped along with a replaced table.
    #[error("{table} on the mirror has dependent objects that a sync would have to drop: {}; drop them on the mirror (they can be recreated after the sync) or leave {table} out", .objects.join(", "))]
    MirrorDependents {
        /// The table.
        table: String,
        /// Descriptions of the dependents.
        objects: Vec<String>,
    },
    /// Another run holds the mirror.
    #[error("another bite-sync run is syncing into {0}: wait for it to finish")]
    Busy(String),
    /// The user lacks a privilege.
    #[error("{context}: permission denied: {hint}")]
    PermissionDenied {
        /// What was being done.
        context: String,
        /// Which privilege to grant.
        hint: &'static str,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement failed.
    #[error("{context}")]
    Query {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Tables that `bite-sync run` keeps in step: a one-off copy would race the stream.
    #[error("{} {} replicated continuously by `bite-sync run` (slot {slot}): a one-off sync would conflict with the stream; leave {} out (the daemon copies a table again by itself when it must)", .tables.join(", "), if .tables.len() == 1 { "is" } else { "are" }, if .tables.len() == 1 { "it" } else { "them" })]
    Replicated {
        /// The tables, as a user would type them.
        tables: Vec<String>,
        /// The slot that replicates them.
        slot: String,
    },
    /// Ctrl-C or shutdown, before the swap.
    #[error(
        "interrupted before the new tables were swapped in: the mirror still holds its previous rows (the next sync removes what this one staged)"
    )]
    Cancelled,
}

impl SyncError {
    /// Exit code for the command line: 2 for mistakes in what was asked, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            SyncError::SameDatabase(_)
            | SyncError::NotInitialized(_)
            | SyncError::Replicated { .. } => 2,
            SyncError::Plan(p) if p.is_usage() => 2,
            _ => 1,
        }
    }

    /// Worth retrying as is (a lost connection, a restarting server).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Connect(e) => e.is_transient(),
            SyncError::Query { source, .. } => source.is_closed() || source.as_db_error().is_none(),
            SyncError::Busy(_) => true,
            _ => false,
        }
    }
}

/// Wraps a database error with what was being done, recognizing missing privileges.
fn pg(side: Side, context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    let context = context.into();
    move |source| {
        if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            let hint = match side {
                Side::Source => {
                    "the source user needs SELECT on the synced tables and their sequences (GRANT SELECT ON ALL TABLES IN SCHEMA ... TO ...; GRANT SELECT ON ALL SEQUENCES IN SCHEMA ... TO ...)"
                }
                Side::Mirror => {
                    "the mirror user needs CREATE on the database (for schemas) and on the target schemas, and must own the mirror tables it replaces"
                }
            };
            SyncError::PermissionDenied {
                context,
                hint,
                source,
            }
        } else {
            SyncError::Query { context, source }
        }
    }
}

/// Runs one sync. Stopped by `cancel` before the swap, it returns [`SyncError::Cancelled`] and
/// the mirror is as it was; stopped during the swap, it finishes the swap first.
pub async fn sync(
    opts: &SyncOptions,
    observer: Arc<dyn Observer>,
    cancel: CancellationToken,
) -> Result<SyncReport, SyncError> {
    let watch = Arc::new(SwapWatch {
        inner: Arc::clone(&observer),
        swapping: std::sync::atomic::AtomicBool::new(false),
    });
    let running = run(opts, Arc::clone(&watch) as Arc<dyn Observer>);
    tokio::pin!(running);
    tokio::select! {
        result = &mut running => return result,
        () = cancel.cancelled() => {}
    }
    if watch.swapping.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::info!("stopping once the swap in progress has committed (one short transaction)");
        return running.await;
    }
    observer.interrupted();
    Err(SyncError::Cancelled)
}

/// Schemas bite-sync builds tables in before swapping them in; the next run drops leftovers.
const STAGING_PREFIX: &str = "bite_sync_stage_";
/// Session advisory lock that keeps two runs off one mirror.
const RUN_LOCK: i64 = 0x6269_7465_0002;

async fn run(opts: &SyncOptions, observer: Arc<dyn Observer>) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    observer.phase("connecting");
    let (source, mut mirror) = tokio::try_join!(opts.source.connect(), opts.mirror.connect())?;

    let source_id = database_identity(&source, Side::Source).await?;
    let mirror_id = database_identity(&mirror, Side::Mirror).await?;
    if source_id == mirror_id {
        return Err(SyncError::SameDatabase(opts.mirror.target()));
    }

    let initialized = bookkeeping::is_initialized(&mirror).await?;
    if !initialized && !opts.init && !opts.dry_run {
        return Err(SyncError::NotInitialized(format!(
            "the mirror {}",
            opts.mirror.target()
        )));
    }
    if !opts.dry_run {
        let locked: bool = mirror
            .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&RUN_LOCK])
            .await
            .map_err(pg(
                Side::Mirror,
                "failed to take the run lock on the mirror",
            ))?
            .get(0);
        if !locked {
            return Err(SyncError::Busy(opts.mirror.target()));
        }
    }

    // The snapshot every table is read from.
    observer.phase("reading the source catalog");
    let search_path = catalog::search_path(&source)
        .await
        .map_err(pg(Side::Source, "failed to read the source's search_path"))?;
    let snapshot = begin_snapshot(&source, opts.snapshot.as_deref()).await?;
    source
        .batch_execute("SELECT pg_catalog.set_config('search_path', '', true)")
        .await
        .map_err(pg(Side::Source, "failed to set the source's search_path"))?;
    let all = catalog::list_tables(&source)
        .await
        .map_err(pg(Side::Source, "failed to list the source's tables"))?;
    let selected = plan::resolve(&all, &search_path, &opts.tables, &opts.exclude)?;
    let names: Vec<QualifiedName> = selected.into_iter().map(|e| e.name).collect();
    let mut source_catalog = catalog::read_tables(&source, &names).await.map_err(pg(
        Side::Source,
        "failed to read the source's table definitions",
    ))?;
    if opts.flatten_partitions {
        for def in source_catalog.tables.values_mut() {
            *def = def.clone().flattened();
        }
    }
    catalog::read_needs(&source, &mut source_catalog, &search_path)
        .await
        .map_err(pg(
            Side::Source,
            "failed to read what the source's tables need (types, functions, extensions ...)",
        ))?;

    if !opts.replicating && initialized {
        refuse_replicated(&mirror, &names).await?;
    }

    observer.phase("comparing with the mirror");
    mirror
        .batch_execute("SET search_path = ''")
        .await
        .map_err(pg(Side::Mirror, "failed to set the mirror's search_path"))?;
    let mirror_all: BTreeSet<QualifiedName> = catalog::list_tables(&mirror)
        .await
        .map_err(pg(Side::Mirror, "failed to list the mirror's tables"))?
        .into_iter()
        .map(|e| e.name)
        .collect();
    let existing: Vec<QualifiedName> = mirror_all
        .iter()
        .filter(|n| source_catalog.tables.contains_key(*n))
        .cloned()
        .collect();
    let mirror_catalog = catalog::read_tables(&mirror, &existing).await.map_err(pg(
        Side::Mirror,
        "failed to read the mirror's table definitions",
    ))?;

    // Everything that can be known to fail is found before anything changes on either side:
    // the plan's refusals and what the mirror lacks that bite-sync cannot create.
    let mut planned = plan_run(
        opts,
        &source_catalog,
        &mirror_catalog,
        &mirror_all,
        "dry_run",
    )?;
    let needs = depends::plan(&mirror, &source_catalog.needs)
        .await
        .map_err(pg(
            Side::Mirror,
            "failed to look for the tables' types, functions and extensions on the mirror",
        ))?;
    let problems: Vec<depends::Missing> = needs.problems().into_iter().cloned().collect();
    if !problems.is_empty() {
        return Err(SyncError::MissingDependencies(problems));
    }
    check_dependents(&mirror, &planned, &mirror_catalog).await?;
    let prepare = prepare_statements(&source_catalog, &needs);
    let warnings: Vec<String> = needs.warnings().iter().map(ToString::to_string).collect();
    if opts.dry_run {
        planned.prepare = prepare;
        planned.warnings.extend(warnings);
        return Ok(planned.report(None, !initialized, started));
    }
    bookkeeping::migrate(&mut mirror).await?;
    cleanup_leftovers(&mirror).await?;

    // From here on the run is recorded, failures included.
    let run_id = record_start(&mirror, opts, &names, &source_id).await?;
    let result = async {
        let mut planned = plan_run(
            opts,
            &source_catalog,
            &mirror_catalog,
            &mirror_all,
            &run_id.to_string(),
        )?;
        for missing in needs.missing.iter().filter(|m| m.created) {
            tracing::info!(object = %missing.object, "creating on the mirror what the tables need");
        }
        planned.prepare = prepare;
        planned.warnings.extend(warnings);
        execute(
            opts,
            &observer,
            &mut mirror,
            &source_catalog,
            &mut planned,
            &snapshot,
            run_id,
            started,
        )
        .await?;
        Ok(planned)
    }
    .await;
    match result {
        Ok(planned) => Ok(planned.report(Some(run_id), !initialized, started)),
        Err(e) => {
            record_failure(&mirror, run_id, &e).await;
            Err(e)
        }
    }
}

/// Refuses tables the replication daemon streams into (only the daemon's own copies, which
/// read from its slot's snapshot, may replace them).
async fn refuse_replicated(mirror: &Client, names: &[QualifiedName]) -> Result<(), SyncError> {
    let exists: bool = mirror
        .query_one(
            "SELECT pg_catalog.to_regclass('bite_sync.replication_tables') IS NOT NULL",
            &[],
        )
        .await
        .map_err(pg(Side::Mirror, "failed to read the mirror's bookkeeping"))?
        .get(0);
    if !exists {
        return Ok(());
    }
    let rows = mirror
        .query(
            "SELECT table_schema, table_name, slot_name FROM bite_sync.replication_tables \
             WHERE state = 'streaming' ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(pg(
            Side::Mirror,
            "failed to read the mirror's replicated tables",
        ))?;
    let mut tables = Vec::new();
    let mut slot = String::new();
    for r in &rows {
        let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        if names.contains(&name) {
            tables.push(name.to_string());
            slot = r.get(2);
        }
    }
    if tables.is_empty() {
        Ok(())
    } else {
        Err(SyncError::Replicated { tables, slot })
    }
}

/// Identifies a database across connections: the cluster's system identifier (falling back to
/// the server's address and start time where that needs privileges) plus the database OID.
pub(crate) async fn database_identity(client: &Client, side: Side) -> Result<String, SyncError> {
    let precise = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()) \
                    || '/' || d.oid::text \
             FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()",
            &[],
        )
        .await;
    let row = match precise {
        Ok(row) => row,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => client
            .query_one(
                "SELECT COALESCE(pg_catalog.inet_server_addr()::text, 'local') || ':' \
                        || COALESCE(pg_catalog.inet_server_port()::text, '') || '@' \
                        || pg_catalog.pg_postmaster_start_time()::text || '/' || d.oid::text \
                 FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()",
                &[],
            )
            .await
            .map_err(pg(side, "failed to identify the database"))?,
        Err(e) => return Err(pg(side, "failed to identify the database")(e)),
    };
    Ok(row.get(0))
}

/// Drops staging schemas of runs that died and marks their records abandoned. Only called
/// while holding the run lock, so no live run's schema is touched.
async fn cleanup_leftovers(mirror: &Client) -> Result<(), SyncError> {
    let rows = mirror
        .query(
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE starts_with(nspname, $1)",
            &[&STAGING_PREFIX],
        )
        .await
        .map_err(pg(
            Side::Mirror,
            "failed to look for leftover staging schemas",
        ))?;
    for r in &rows {
        let schema: String = r.get(0);
        tracing::info!(schema, "removing staging schema left by an interrupted run");
        mirror
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", quote(&schema)))
            .await
            .map_err(pg(
                Side::Mirror,
                format!("failed to drop leftover schema {schema}"),
            ))?;
    }
    mirror
        .batch_execute(
            "UPDATE bite_sync.sync_runs SET outcome = 'abandoned', finished_at = now() \
             WHERE outcome = 'running'",
        )
        .await
        .map_err(pg(Side::Mirror, "failed to mark interrupted runs"))?;
    Ok(())
}

async fn begin_snapshot(source: &Client, given: Option<&str>) -> Result<String, SyncError> {
    let context = "failed to start the snapshot transaction on the source";
    match given {
        Some(name) => {
            join_snapshot(source, name).await?;
            Ok(name.to_string())
        }
        None => {
            source
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(pg(Side::Source, context))?;
            let row = source
                .query_one("SELECT pg_catalog.pg_export_snapshot()", &[])
                .await
                .map_err(pg(Side::Source, "failed to export the source snapshot"))?;
            Ok(row.get(0))
        }
    }
}

/// Starts a transaction on `source` that reads from the exported snapshot `name`.
async fn join_snapshot(source: &Client, name: &str) -> Result<(), SyncError> {
    source
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            literal(name)
        ))
        .await
        .map_err(pg(Side::Source, "failed to join the source snapshot"))
}

/// One table's place in a run.
#[derive(Debug, Clone)]
struct PlannedTable {
    def: TableDef,
    action: TableAction,
    format: CopyFormat,
    /// Where the table is built; `None` when nothing is built (schema-only on an existing table).
    staged: Option<QualifiedName>,
    /// Where each of its partitions is built, in the order of `def.partitions` (empty when
    /// nothing is built).
    staged_partitions: Vec<QualifiedName>,
    stats: CopyStats,
    duration: Duration,
}

impl PlannedTable {
    /// The table and its partitions with where each is built: (definition, staged name).
    fn staged_tree(&self) -> Vec<(&TableDef, &QualifiedName)> {
        let Some(root) = &self.staged else {
            return Vec::new();
        };
        std::iter::once((&self.def, root))
            .chain(
                self.def
                    .partitions
                    .iter()
                    .map(|p| &p.def)
                    .zip(&self.staged_partitions),
            )
            .collect()
    }

    /// Where `name` (the table or one of its partitions) is built.
    fn staged_name(&self, name: &QualifiedName) -> Option<&QualifiedName> {
        self.staged_tree()
            .into_iter()
            .find(|(def, _)| &def.name == name)
            .map(|(_, at)| at)
    }

    fn copies_data(&self, mode: Mode) -> bool {
        self.staged.is_some() && mode != Mode::SchemaOnly
    }

    /// `ALTER TABLE ... ADD COLUMN` for a schema-only run on an existing table.
    fn add_column_statements(&self) -> Vec<String> {
        match &self.action {
            TableAction::AddColumns { columns } => self
                .def
                .columns
                .iter()
                .filter(|c| columns.contains(&c.name))
                .map(|c| ddl::add_column(&self.def.name, c))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A foreign key between two tables of the run, added on the staged tables.
#[derive(Debug, Clone)]
struct StagedKey {
    /// Index of the referencing table in the plan.
    table: usize,
    /// Where the referencing table (or partition) is built.
    at: QualifiedName,
    /// The referencing columns.
    columns: Vec<String>,
    /// Index of the referenced table, when it is staged too (the key waits for it).
    parent: Option<usize>,
    /// `ALTER TABLE ... ADD CONSTRAINT ... FOREIGN KEY ...` on the staged names.
    statement: String,
}

#[derive(Debug, Clone)]
struct Planned {
    mode: Mode,
    /// In foreign-key order.
    tables: Vec<PlannedTable>,
    staging_schemas: Vec<String>,
    prepare: Vec<String>,
    /// Foreign keys among the run's tables, added once their tables are built.
    foreign_keys: Vec<StagedKey>,
    /// Foreign keys to mirror tables outside the run, added by the swap.
    outside_keys: Vec<swap::OutsideKey>,
    /// The same, from tables built partitioned: PostgreSQL cannot hold a key `NOT VALID` on a
    /// partitioned table, so these are added (and validated) once the swap has committed.
    late_keys: Vec<swap::OutsideKey>,
    warnings: Vec<String>,
}

impl Planned {
    fn report(
        &self,
        run_id: Option<i64>,
        initialized_mirror: bool,
        started: Instant,
    ) -> SyncReport {
        let tables: Vec<TableReport> = self
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| TableReport {
                table: t.def.name.to_string(),
                schema: t.def.name.schema.clone(),
                name: t.def.name.name.clone(),
                action: t.action.clone(),
                format: t.format,
                rows: t.stats.rows,
                bytes: t.stats.bytes,
                duration_ms: t.duration.as_millis() as u64,
                ddl: self.table_ddl(i),
            })
            .collect();
        SyncReport {
            run_id,
            dry_run: run_id.is_none(),
            mode: self.mode,
            initialized_mirror,
            prepare: self.prepare.clone(),
            rows: tables.iter().map(|t| t.rows).sum(),
            bytes: tables.iter().map(|t| t.bytes).sum(),
            tables,
            duration_ms: started.elapsed().as_millis() as u64,
            warnings: self.warnings.clone(),
        }
    }

    /// The statements that build table `i`.
    fn table_ddl(&self, i: usize) -> Vec<String> {
        let t = &self.tables[i];
        let mut out = Vec::new();
        match (&t.staged, &t.action) {
            (Some(_), _) => {
                out.extend(build::create_statements(t));
                out.extend(build::tree_index_statements(t));
                out.extend(build::tree_key_statements(t));
            }
            (None, _) => out.extend(t.add_column_statements()),
        }
        out.extend(
            self.foreign_keys
                .iter()
                .filter(|k| k.table == i)
                .map(|k| k.statement.clone()),
        );
        out.extend(
            self.outside_keys
                .iter()
                .filter(|k| t.def.tree().any(|d| d.name == k.key.table))
                .map(|k| format!("{}  -- in the swap, validated after", k.statement)),
        );
        out.extend(
            self.late_keys
                .iter()
                .filter(|k| t.def.tree().any(|d| d.name == k.key.table))
                .map(|k| format!("{}  -- after the swap", k.statement)),
        );
        out
    }
}

/// Plans a run; `tag` makes the staging schema names unique to it.
fn plan_run(
    opts: &SyncOptions,
    source: &SourceCatalog,
    mirror: &SourceCatalog,
    mirror_tables: &BTreeSet<QualifiedName>,
    tag: &str,
) -> Result<Planned, SyncError> {
    let order = plan::fk_order(&source.tables);
    // Partitions may live in other schemas than their partitioned table.
    let target_schemas: Vec<String> = order
        .iter()
        .flat_map(|n| source.tables[n].tree().map(|d| d.name.schema.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let staged_at = |name: &QualifiedName| {
        let i = target_schemas
            .iter()
            .position(|s| s == &name.schema)
            .unwrap_or(0);
        QualifiedName::new(format!("{STAGING_PREFIX}{tag}_{i}"), name.name.clone())
    };
    let mut tables = Vec::with_capacity(order.len());
    for name in &order {
        let def = source.tables[name].clone();
        let action = plan::compare(&def, mirror.tables.get(name), opts.mode)?;
        let (staged, staged_partitions) = match &action {
            TableAction::AddColumns { .. } => (None, Vec::new()),
            _ => (
                Some(staged_at(name)),
                def.partitions
                    .iter()
                    .map(|p| staged_at(&p.def.name))
                    .collect(),
            ),
        };
        tables.push(PlannedTable {
            format: CopyFormat::for_table(&def),
            def,
            action,
            staged,
            staged_partitions,
            stats: CopyStats::default(),
            duration: Duration::ZERO,
        });
    }

    let mut warnings = Vec::new();
    let mut foreign_keys = Vec::new();
    let mut outside_keys = Vec::new();
    let mut late_keys = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        // The table's keys, and its partitions' own (those cloned from the table's come with it).
        for (def, at) in t.staged_tree() {
            for fk in &def.foreign_keys {
                match tables.iter().position(|p| p.def.name == fk.referenced) {
                    Some(p) => {
                        let parent = &tables[p];
                        let referenced_at = parent.staged.as_ref().unwrap_or(&parent.def.name);
                        foreign_keys.push(StagedKey {
                            table: i,
                            at: at.clone(),
                            columns: fk.columns.clone(),
                            parent: parent.staged.is_some().then_some(p),
                            statement: ddl::add_foreign_key(at, fk, referenced_at),
                        });
                    }
                    // The parent is already on the mirror: keep the key, pointing at it. It is
                    // added NOT VALID in the swap and validated after, as the parent's rows are
                    // the mirror's, not this snapshot's.
                    None if mirror_tables.contains(&fk.referenced) => {
                        let partitioned = def.is_partitioned_on_mirror();
                        let key = swap::OutsideKey {
                            key: swap::RepointedKey {
                                table: def.name.clone(),
                                name: fk.name.clone(),
                            },
                            statement: ddl::add_foreign_key(
                                &def.name,
                                &ForeignKeyDef {
                                    validated: partitioned && fk.validated,
                                    ..fk.clone()
                                },
                                &fk.referenced,
                            ),
                        };
                        if partitioned {
                            late_keys.push(key);
                        } else {
                            outside_keys.push(key);
                        }
                    }
                    None => warnings.push(format!(
                        "foreign key {} on {} references {}, which is neither part of this sync nor on the mirror: skipped",
                        fk.name, def.name, fk.referenced
                    )),
                }
            }
        }
    }
    let staging_schemas = (0..target_schemas.len())
        .map(|i| format!("{STAGING_PREFIX}{tag}_{i}"))
        .collect();
    Ok(Planned {
        mode: opts.mode,
        tables,
        staging_schemas,
        prepare: Vec::new(),
        foreign_keys,
        outside_keys,
        late_keys,
        warnings,
    })
}

/// Schemas, types, functions, collations, extensions and sequences the mirror needs before
/// the tables can be built; additive, so they are committed right away.
fn prepare_statements(source: &SourceCatalog, needs: &depends::Plan) -> Vec<String> {
    let schemas: BTreeSet<&str> = source
        .tables
        .values()
        .flat_map(|t| t.tree().map(|d| d.name.schema.as_str()))
        .collect();
    schemas
        .into_iter()
        .map(|schema| format!("CREATE SCHEMA IF NOT EXISTS {}", quote(schema)))
        .chain(needs.statements.iter().cloned())
        .collect()
}

/// Refuses to replace a mirror table that other mirror objects (views) depend on: dropping it
/// would need CASCADE, which would silently drop them.
async fn check_dependents(
    mirror: &Client,
    planned: &Planned,
    mirror_catalog: &SourceCatalog,
) -> Result<(), SyncError> {
    for t in &planned.tables {
        if t.staged.is_none() {
            continue;
        }
        let Some(old) = mirror_catalog.tables.get(&t.def.name) else {
            continue;
        };
        // The old table and its partitions, which go with it.
        let oids: Vec<u32> = old.tree().map(|d| d.oid).collect();
        let rows = mirror
            .query(
                "SELECT DISTINCT pg_catalog.pg_describe_object('pg_catalog.pg_class'::regclass, rw.ev_class, 0) \
                 FROM pg_catalog.pg_depend d \
                 JOIN pg_catalog.pg_rewrite rw ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND rw.oid = d.objid \
                 WHERE d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = ANY ($1) \
                   AND rw.ev_class <> ALL ($1) \
                 ORDER BY 1",
                &[&oids],
            )
            .await
            .map_err(pg(Side::Mirror, "failed to look for objects that depend on mirror tables"))?;
        if !rows.is_empty() {
            return Err(SyncError::MirrorDependents {
                table: t.def.name.to_string(),
                objects: rows.iter().map(|r| r.get(0)).collect(),
            });
        }
    }
    Ok(())
}

async fn record_start(
    mirror: &Client,
    opts: &SyncOptions,
    names: &[QualifiedName],
    source_id: &str,
) -> Result<i64, SyncError> {
    let tables: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mode = opts.mode.as_str();
    let row = mirror
        .query_one(
            "INSERT INTO bite_sync.sync_runs (mode, tables, source_system_identifier, source_database) \
             VALUES ($1, $2, $3, $4) RETURNING id",
            &[&mode, &tables, &source_id, &opts.source.dbname()],
        )
        .await
        .map_err(pg(Side::Mirror, "failed to record the run on the mirror"))?;
    Ok(row.get(0))
}

async fn record_failure(mirror: &Client, run_id: i64, error: &SyncError) {
    let message = crate::error_chain(error);
    let result = mirror
        .execute(
            "UPDATE bite_sync.sync_runs SET outcome = 'failed', finished_at = now(), error = $2, \
                    duration_ms = (extract(epoch FROM now() - started_at) * 1000)::bigint \
             WHERE id = $1",
            &[&run_id, &message],
        )
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not record the failed run (the next run marks it abandoned)");
    }
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    opts: &SyncOptions,
    observer: &Arc<dyn Observer>,
    mirror: &mut Client,
    source_catalog: &SourceCatalog,
    planned: &mut Planned,
    snapshot: &str,
    run_id: i64,
    started: Instant,
) -> Result<(), SyncError> {
    observer.phase("preparing the mirror");
    {
        // One transaction: fewer commits, and a failure leaves nothing half-prepared.
        let tx = mirror
            .transaction()
            .await
            .map_err(pg(Side::Mirror, "failed to prepare the mirror"))?;
        // A function's body may name objects created after it (or tables of the run).
        tx.batch_execute("SET LOCAL check_function_bodies = off")
            .await
            .map_err(pg(Side::Mirror, "failed to prepare the mirror"))?;
        for statement in planned.prepare.iter().cloned().chain(
            planned
                .staging_schemas
                .iter()
                .map(|s| format!("CREATE SCHEMA {}", quote(s))),
        ) {
            tx.batch_execute(&statement).await.map_err(pg(
                Side::Mirror,
                format!("failed to prepare the mirror: {statement}"),
            ))?;
        }
        tx.commit()
            .await
            .map_err(pg(Side::Mirror, "failed to prepare the mirror"))?;
    }

    observer.phase("copying rows and building indexes");
    build::build_tables(opts, observer, planned, snapshot).await?;

    if opts.mode != Mode::SchemaOnly {
        for seq in &source_catalog.sequences {
            mirror
                .batch_execute(&ddl::set_sequence(&seq.name, seq))
                .await
                .map_err(pg(
                    Side::Mirror,
                    format!("failed to set sequence {}", seq.name),
                ))?;
        }
    }

    observer.phase("swapping in the new tables");
    let tables = planned
        .tables
        .iter()
        .map(|t| SwapTable {
            target: t.def.name.clone(),
            staged: t.staged.clone(),
            replaces_existing: matches!(t.action, TableAction::Replace { .. }),
            partitions: t
                .staged_partitions
                .iter()
                .cloned()
                .zip(t.def.partitions.iter().map(|p| p.def.name.clone()))
                .collect(),
            add_columns: t.add_column_statements(),
            owned_sequences: source_catalog
                .sequences
                .iter()
                .filter_map(|s| s.owned_by.as_ref().map(|o| (s, o)))
                .filter(|(_, (owner, _))| t.def.tree().any(|d| &d.name == owner))
                .map(|(s, (owner, column))| (s.name.clone(), owner.clone(), column.clone()))
                .collect(),
        })
        .collect();
    let plan = SwapPlan {
        tables,
        staging_schemas: planned.staging_schemas.clone(),
        outside_keys: planned.outside_keys.clone(),
        lock_timeout: opts.lock_timeout,
        finish: finish_statements(planned, run_id, started),
    };
    observer.swapping();
    let outcome = swap::swap(mirror, &plan)
        .await
        .map_err(pg(Side::Mirror, "failed to swap the new tables in"))?;

    for key in &planned.late_keys {
        match mirror.batch_execute(&key.statement).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                let detail = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_default();
                planned.warnings.push(format!(
                    "foreign key {} on {} was not added: the mirror's rows do not satisfy it ({detail}), and PostgreSQL cannot keep it NOT VALID on a partitioned table",
                    key.key.name, key.key.table
                ));
            }
            Err(e) => {
                return Err(pg(
                    Side::Mirror,
                    format!(
                        "failed to add foreign key {} on {}",
                        key.key.name, key.key.table
                    ),
                )(e));
            }
        }
    }
    if !outcome.repointed.is_empty() {
        observer.phase("validating foreign keys from other mirror tables");
        let violated = swap::validate_foreign_keys(mirror, &outcome.repointed)
            .await
            .map_err(pg(Side::Mirror, "failed to validate foreign keys"))?;
        for (key, detail) in violated {
            planned.warnings.push(format!(
                "foreign key {} on mirror table {} no longer holds after the sync ({detail}); it stays NOT VALID",
                key.name, key.table
            ));
        }
    }
    Ok(())
}

/// Bookkeeping statements committed with the swap.
fn finish_statements(planned: &Planned, run_id: i64, started: Instant) -> Vec<String> {
    let rows: u64 = planned.tables.iter().map(|t| t.stats.rows).sum();
    let bytes: u64 = planned.tables.iter().map(|t| t.stats.bytes).sum();
    let mut out = vec![format!(
        "UPDATE bite_sync.sync_runs SET outcome = 'succeeded', finished_at = now(), \
         rows_copied = {rows}, bytes_copied = {bytes}, duration_ms = {} WHERE id = {run_id}",
        started.elapsed().as_millis()
    )];
    for t in &planned.tables {
        out.push(format!(
            "INSERT INTO bite_sync.sync_run_tables (run_id, table_name, action, rows_copied, bytes_copied, duration_ms) \
             VALUES ({run_id}, {}, {}, {}, {}, {})",
            literal(&t.def.name.to_string()),
            literal(t.action.as_str()),
            t.stats.rows,
            t.stats.bytes,
            t.duration.as_millis()
        ));
    }
    out
}
