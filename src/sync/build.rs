//! Building a run's staged tables: the workers and their tasks.
//!
//! Each staged table becomes a few tasks ([`tasks`](super::tasks) decides their order):
//! - **load**: one mirror transaction creates the table, streams the rows in with
//!   `COPY ... FREEZE` (allowed because the table was created in the same transaction, and it
//!   saves rewriting every page later to set hint bits) and sets identity sequences. No
//!   `ANALYZE`: index builds record the row count, and autovacuum analyzes the new table
//!   soon after the swap (its insert counter is the whole table), off the sync's clock;
//! - **index**: one task per index, primary key and unique constraint (built as unique
//!   indexes), so idle workers build a big table's indexes side by side; data first, indexes
//!   after, as a bulk load should;
//! - **keys**: turns those unique indexes into the table's constraints (a catalog change);
//! - **foreign keys**: adds (and so validates) the table's keys to other staged tables once
//!   both ends are built.
//!
//! Up to `--jobs` workers run tasks, each with one connection to each database. Mirror
//! sessions use `synchronous_commit = off`: nothing staged is visible until the swap, whose
//! synchronous commit flushes the WAL before it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::pg::ident::{QualifiedName, literal};

use super::catalog::TableDef;
use super::copy::{self, CopyError, CopyFormat, CopyStats};
use super::tasks::{Next, Node, Tasks};
use super::{
    Mode, Observer, Planned, PlannedTable, Side, StagedKey, SyncError, SyncOptions, ddl,
    join_snapshot, pg,
};

/// One task's work; tables are named by their index in the plan.
#[derive(Debug, Clone)]
enum Work {
    Load(usize),
    Index(usize, String),
    Keys(usize),
    ForeignKeys(usize),
}

impl Work {
    fn table(&self) -> usize {
        match self {
            Work::Load(i) | Work::Index(i, _) | Work::Keys(i) | Work::ForeignKeys(i) => *i,
        }
    }
}

/// The statements that build a staged table's indexes (unique indexes for keys included).
pub(super) fn index_statements(def: &TableDef, at: &QualifiedName) -> Vec<String> {
    def.constraints
        .iter()
        .filter_map(|c| ddl::key_index(at, c))
        .chain(def.indexes.iter().map(|i| ddl::create_index(at, i)))
        .collect()
}

/// The statements that turn those indexes into constraints, or build constraints that have no
/// separate index (exclusion constraints).
pub(super) fn key_statements(def: &TableDef, at: &QualifiedName) -> Vec<String> {
    def.constraints
        .iter()
        .filter(|c| c.kind != 'c' || ddl::is_not_valid(c))
        .map(|c| ddl::attach_key(at, c))
        .chain(replica_identity(def, at))
        .collect()
}

/// `REPLICA IDENTITY` as on the source, once the index it may name exists.
fn replica_identity(def: &TableDef, at: &QualifiedName) -> Option<String> {
    def.replica_identity.as_ref().map(|identity| {
        format!(
            "ALTER TABLE ONLY {} REPLICA IDENTITY {identity}",
            at.quoted()
        )
    })
}

/// The statements that create a staged table: the table and each of its partitions, then each
/// partition attached to its parent (while no index exists yet, so attaching makes none).
pub(super) fn create_statements(t: &PlannedTable) -> Vec<String> {
    let mut out: Vec<String> = t
        .staged_tree()
        .into_iter()
        .map(|(def, at)| ddl::create_table(def, at))
        .collect();
    for (p, at) in t.def.partitions.iter().zip(&t.staged_partitions) {
        if let Some(parent_at) = t.staged_name(&p.parent) {
            out.push(ddl::attach_partition(parent_at, at, &p.bound));
        }
    }
    out
}

/// The index builds of a staged table and its partitions: the real work, on every table that
/// holds rows (a partitioned table's own indexes are made empty by [`tree_key_statements`]).
pub(super) fn tree_index_statements(t: &PlannedTable) -> Vec<String> {
    t.staged_tree()
        .into_iter()
        .filter(|(def, _)| !def.is_partitioned_on_mirror())
        .flat_map(|(def, at)| index_statements(def, at))
        .collect()
}

/// The keys of a staged table and its partitions, once their indexes are built, the way
/// `pg_dump` restores them: each partition's unique indexes become its constraints; a
/// partitioned table gets its own keys and indexes (empty, invalid); then every partition's
/// index is attached to its parent's, deepest first, which makes the parents' valid.
pub(super) fn tree_key_statements(t: &PlannedTable) -> Vec<String> {
    let tree = t.staged_tree();
    let mut out = Vec::new();
    for (def, at) in &tree {
        if !def.is_partitioned_on_mirror() {
            out.extend(key_statements(def, at));
        }
    }
    for (def, at) in &tree {
        if !def.is_partitioned_on_mirror() {
            continue;
        }
        for c in &def.constraints {
            match c.kind {
                'p' | 'u' | 'x' => out.push(ddl::add_key_only(at, c)),
                'c' if ddl::is_not_valid(c) => out.push(ddl::add_key(at, c)),
                _ => {}
            }
        }
        out.extend(def.indexes.iter().map(|i| ddl::create_index_only(at, i)));
    }
    for (p, at) in t.def.partitions.iter().zip(&t.staged_partitions).rev() {
        let Some(parent_at) = t.staged_name(&p.parent) else {
            continue;
        };
        let attached = p
            .def
            .constraints
            .iter()
            .filter_map(|c| c.attached_to.as_ref().map(|to| (&c.name, to)))
            .chain(
                p.def
                    .indexes
                    .iter()
                    .filter_map(|i| i.attached_to.as_ref().map(|to| (&i.name, to))),
            );
        for (child, parent) in attached {
            out.push(ddl::attach_index(
                &QualifiedName::new(parent_at.schema.clone(), parent.clone()),
                &QualifiedName::new(at.schema.clone(), child.clone()),
            ));
        }
    }
    // Last: an identity index of a partitioned table is valid only once attached everywhere.
    out.extend(
        tree.iter()
            .filter(|(def, _)| def.is_partitioned_on_mirror())
            .filter_map(|(def, at)| replica_identity(def, at)),
    );
    out
}

/// The task graph of a run: per table load → indexes → keys, then foreign keys after the keys
/// of both ends. Costs are table sizes: loading reads the whole table, an index build or a
/// foreign key check about half of that again.
fn graph(planned: &Planned) -> Vec<Node<Work>> {
    let mut nodes = Vec::new();
    let mut keys_node = vec![None; planned.tables.len()];
    for (i, t) in planned.tables.iter().enumerate() {
        if t.staged.is_none() {
            continue;
        }
        let size = t.def.estimated_bytes.max(8192) as u64;
        let load = nodes.len();
        nodes.push(Node {
            work: Work::Load(i),
            after: vec![],
            cost: size,
        });
        let mut keys_after = vec![load];
        for statement in tree_index_statements(t) {
            keys_after.push(nodes.len());
            nodes.push(Node {
                work: Work::Index(i, statement),
                after: vec![load],
                cost: size / 2,
            });
        }
        keys_node[i] = Some(nodes.len());
        nodes.push(Node {
            work: Work::Keys(i),
            after: keys_after,
            cost: 1,
        });
    }
    let mut tables_with_keys: Vec<usize> = planned.foreign_keys.iter().map(|k| k.table).collect();
    tables_with_keys.dedup();
    for i in tables_with_keys {
        let keys: Vec<&StagedKey> = planned
            .foreign_keys
            .iter()
            .filter(|k| k.table == i)
            .collect();
        let mut after: Vec<usize> = keys_node[i].into_iter().collect();
        after.extend(
            keys.iter()
                .filter_map(|k| k.parent.and_then(|p| keys_node[p])),
        );
        let size = planned.tables[i].def.estimated_bytes.max(8192) as u64;
        nodes.push(Node {
            work: Work::ForeignKeys(i),
            after,
            cost: size / 2 * keys.len() as u64,
        });
    }
    nodes
}

/// Builds every staged table and adds the foreign keys among them.
pub(super) async fn build_tables(
    opts: &SyncOptions,
    observer: &Arc<dyn Observer>,
    planned: &mut Planned,
    snapshot: &str,
) -> Result<(), SyncError> {
    let nodes = graph(planned);
    let workers = opts.jobs.max(1).min(nodes.len().max(1));
    let tasks = Tasks::new(nodes);
    let state = Arc::new(Mutex::new(tasks));
    let wake = Arc::new(Notify::new());
    let shared = Arc::new((planned.tables.clone(), planned.foreign_keys.clone()));
    let results = Arc::new(Mutex::new(vec![
        (CopyStats::default(), Duration::ZERO);
        planned.tables.len()
    ]));
    let mut handles = Vec::with_capacity(workers);
    for worker in 0..workers {
        let state = Arc::clone(&state);
        let wake = Arc::clone(&wake);
        let shared = Arc::clone(&shared);
        let results = Arc::clone(&results);
        let observer = Arc::clone(observer);
        let opts = opts.clone();
        let snapshot = snapshot.to_string();
        handles.push(tokio::spawn(async move {
            let (tables, keys) = &*shared;
            let mut connections: Option<(Client, Client)> = None;
            loop {
                let (next, work) = {
                    let mut state = state.lock().expect("task lock");
                    let next = state.next_task();
                    let work = match next {
                        Next::Run(i) => Some(state.work(i).clone()),
                        _ => None,
                    };
                    (next, work)
                };
                let (id, work) = match (next, work) {
                    (Next::Done, _) => break,
                    (Next::Run(id), Some(work)) => (id, work),
                    _ => {
                        // Woken when any task ends; the timeout covers a wake-up that came
                        // between asking and waiting.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
                        continue;
                    }
                };
                let started = Instant::now();
                let table = &tables[work.table()];
                let result = async {
                    if connections.is_none() {
                        connections = Some(worker_connections(&opts, &snapshot).await?);
                    }
                    let (source, mirror) = connections.as_mut().expect("just connected");
                    tracing::debug!(worker, table = %table.def.name, ?work, "task");
                    let mut stats = None;
                    match &work {
                        Work::Load(_) => {
                            stats = Some(load(&opts, &observer, source, mirror, table).await?);
                        }
                        Work::Index(_, statement) => {
                            mirror.batch_execute(statement).await.map_err(pg(
                                Side::Mirror,
                                format!("failed to build an index of {}", table.def.name),
                            ))?;
                        }
                        Work::Keys(_) => {
                            attach_keys(mirror, table).await?;
                        }
                        Work::ForeignKeys(i) => {
                            add_foreign_keys(mirror, *i, table, keys).await?
                        }
                    }
                    Ok::<_, SyncError>(stats)
                }
                .await;
                let mut state = state.lock().expect("task lock");
                match result {
                    Ok(stats) => {
                        tracing::debug!(worker, table = %table.def.name, ?work, elapsed = ?started.elapsed(), "task done");
                        state.finished(id);
                        let mut results = results.lock().expect("results lock");
                        let entry = &mut results[work.table()];
                        entry.1 += started.elapsed();
                        if let Some(stats) = stats {
                            entry.0 = stats;
                            observer.table_loaded(&table.def.name, stats);
                        }
                        if matches!(work, Work::Keys(_)) {
                            observer.table_finished(&table.def.name, entry.0);
                        }
                    }
                    Err(e) => {
                        state.stop(id);
                        drop(state);
                        wake.notify_waiters();
                        return Err(e);
                    }
                }
                drop(state);
                wake.notify_waiters();
            }
            Ok::<_, SyncError>(())
        }));
    }
    let mut first_error = None;
    for handle in handles {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let results = results.lock().expect("results lock");
    for (t, (stats, duration)) in planned.tables.iter_mut().zip(results.iter()) {
        t.stats = *stats;
        t.duration = *duration;
    }
    Ok(())
}

async fn worker_connections(
    opts: &SyncOptions,
    snapshot: &str,
) -> Result<(Client, Client), SyncError> {
    let (source, mirror) = tokio::try_join!(opts.source.connect(), opts.mirror.connect())?;
    join_snapshot(&source, snapshot).await?;
    mirror
        .batch_execute(&format!(
            "SET search_path = ''; SET synchronous_commit = off; SET maintenance_work_mem = {0}; \
             SET work_mem = {0}; SET jit = off; SET max_parallel_maintenance_workers = 0",
            literal(&opts.maintenance_work_mem)
        ))
        .await
        .map_err(pg(Side::Mirror, "failed to set up a mirror session"))?;
    Ok((source, mirror))
}

/// Creates a staged table and fills it, in one mirror transaction.
async fn load(
    opts: &SyncOptions,
    observer: &Arc<dyn Observer>,
    source: &Client,
    mirror: &mut Client,
    table: &PlannedTable,
) -> Result<CopyStats, SyncError> {
    let name = &table.def.name;
    observer.table_started(name, table.def.estimated_rows as u64);
    let tx = mirror
        .transaction()
        .await
        .map_err(pg(Side::Mirror, format!("failed to start building {name}")))?;
    for statement in create_statements(table) {
        tx.batch_execute(&statement).await.map_err(pg(
            Side::Mirror,
            format!("failed to create {name} on the mirror"),
        ))?;
    }
    let mut stats = CopyStats::default();
    if table.copies_data(opts.mode) {
        // A table built partitioned is filled partition by partition (each straight from its
        // own on the source, frozen); otherwise in one stream (a flattened partitioned table
        // is read through its root).
        let parts: Vec<(&TableDef, &QualifiedName, CopyFormat)> =
            if table.def.is_partitioned_on_mirror() {
                table
                    .staged_tree()
                    .into_iter()
                    .filter(|(def, _)| !def.partitioned)
                    .map(|(def, at)| (def, at, CopyFormat::for_table(def)))
                    .collect()
            } else {
                table
                    .staged_tree()
                    .into_iter()
                    .take(1)
                    .map(|(def, at)| (def, at, table.format))
                    .collect()
            };
        for (def, at, format) in parts {
            let before = stats;
            let part = copy::copy_table(source, &tx, def, at, format, |s| {
                observer.table_progress(
                    name,
                    CopyStats {
                        rows: before.rows + s.rows,
                        bytes: before.bytes + s.bytes,
                    },
                )
            })
            .await
            .map_err(|e| match e {
                CopyError::Source(e) => pg(
                    Side::Source,
                    format!("failed to copy {}: reading the source failed", def.name),
                )(e),
                CopyError::Mirror(e) => pg(
                    Side::Mirror,
                    format!("failed to copy {}: writing the mirror failed", def.name),
                )(e),
            })?;
            stats.rows += part.rows;
            stats.bytes += part.bytes;
        }
    }
    if opts.mode != Mode::SchemaOnly {
        for (def, at) in table.staged_tree() {
            for column in &def.columns {
                if let Some(identity) = &column.identity {
                    let seq =
                        QualifiedName::new(at.schema.clone(), identity.sequence.name.name.clone());
                    tx.batch_execute(&ddl::set_sequence(&seq, &identity.sequence))
                        .await
                        .map_err(pg(
                            Side::Mirror,
                            format!("failed to set the identity of {}", def.name),
                        ))?;
                }
            }
        }
    }
    tx.commit()
        .await
        .map_err(pg(Side::Mirror, format!("failed to commit {name}")))?;
    Ok(stats)
}

/// Turns a staged table's unique indexes into its keys, in one transaction.
async fn attach_keys(mirror: &mut Client, table: &PlannedTable) -> Result<(), SyncError> {
    let statements = tree_key_statements(table);
    if statements.is_empty() {
        return Ok(());
    }
    let context = || format!("failed to add the keys of {}", table.def.name);
    let tx = mirror
        .transaction()
        .await
        .map_err(pg(Side::Mirror, context()))?;
    for statement in &statements {
        tx.batch_execute(statement)
            .await
            .map_err(pg(Side::Mirror, context()))?;
    }
    tx.commit().await.map_err(pg(Side::Mirror, context()))
}

/// Adds (and so validates) the foreign keys of one staged table, in one transaction. Two
/// tables' keys can lock a shared referenced table in different orders; PostgreSQL then
/// aborts one of them as a deadlock, and it is simply tried again.
///
/// Validation is one anti-join of the table against the referenced table. When the table has
/// an index led by the key's columns, a merge join of two index-only scans (the pages are
/// all-visible after `COPY FREEZE`) is several times faster than the parallel hash join the
/// planner prefers for freshly loaded tables, so hash joins are switched off for that check.
/// Whether table ($1, $2) has a plain index whose leading key columns are exactly $3, in order.
const LEADING_INDEX: &str = "\
    WITH t AS (SELECT c.oid FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
               WHERE n.nspname = $1 AND c.relname = $2), \
         want AS (SELECT array_agg(a.attnum ORDER BY k.ord) AS nums \
                  FROM unnest($3::text[]) WITH ORDINALITY AS k(name, ord) \
                  JOIN pg_catalog.pg_attribute a ON a.attrelid = (SELECT oid FROM t) AND a.attname = k.name) \
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i, want \
                   WHERE i.indrelid = (SELECT oid FROM t) AND i.indpred IS NULL AND i.indexprs IS NULL \
                     AND (i.indkey::int2[])[0:cardinality(want.nums) - 1] = want.nums::int2[])";

async fn add_foreign_keys(
    mirror: &mut Client,
    index: usize,
    table: &PlannedTable,
    keys: &[StagedKey],
) -> Result<(), SyncError> {
    let name = &table.def.name;
    let mut attempt = 1;
    loop {
        let result = async {
            let tx = mirror.transaction().await?;
            for key in keys.iter().filter(|k| k.table == index) {
                let indexed: bool = tx
                    .query_one(LEADING_INDEX, &[&key.at.schema, &key.at.name, &key.columns])
                    .await?
                    .get(0);
                tx.batch_execute(&format!(
                    "SET LOCAL enable_hashjoin = {}; {}",
                    if indexed { "off" } else { "on" },
                    key.statement
                ))
                .await?;
            }
            tx.commit().await
        }
        .await;
        match result {
            Err(e) if attempt < 3 && e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) => {
                attempt += 1;
            }
            other => {
                return other.map_err(pg(
                    Side::Mirror,
                    format!("failed to add the foreign keys of {name}"),
                ));
            }
        }
    }
}
