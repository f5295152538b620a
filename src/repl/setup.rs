//! Getting a replication session ready: publication, slot, copies, and where to stream from.
//!
//! The stream and the copies must meet with no gap and no overlap:
//! - **First start** (no `bite_sync.replication_state` row for the slot): the slot is created
//!   with an exported snapshot, every table is copied by the sync engine from that snapshot,
//!   and the stream starts at the slot's consistent point. Transactions that committed before
//!   it are in the copies; the stream brings the rest.
//! - **A table added later** (or a paused one, after its cause was fixed): a temporary slot
//!   exports a snapshot at position X, the table is copied from it, and its bookkeeping row
//!   says `synced_lsn = X`. The main stream then applies to it only transactions that commit at
//!   or after X ([`super::apply`] checks each transaction's commit position).
//! - **Slot lost** (dropped, invalidated by `max_slot_wal_keep_size`, or behind the mirror's
//!   position, e.g. after a mirror restore): nothing can say which changes the mirror missed,
//!   so the slot is recreated and every table copied again, loudly logged.
//!
//! The slot is only ever confirmed up to positions recorded on the mirror, so a slot whose
//! confirmed position is ahead of the mirror's is by definition inconsistent with it.
//!
//! Before any of that changes anything, [`super::preflight`] checks everything the start needs;
//! a first start that fails after creating its slot drops it (and the publication it made).
//! One daemon per slot holds a lock on the mirror; another one waits for that lock as a
//! standby, naming the active one, and takes over when it is released.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::Lsn;
use super::apply::TableState;
use super::conn::ReplicationClient;
use super::daemon::{RunError, RunOptions};
use super::preflight;
use crate::bookkeeping;
use crate::pg::ident::{QualifiedName, literal, quote};
use crate::sync::catalog::TypeDef;
use crate::sync::{self, Observer, Side, catalog, ddl, plan};

/// A session ready to stream.
pub struct Prepared {
    /// The replication connection, idle, ready for `START_REPLICATION`.
    pub replication: ReplicationClient,
    /// Where the stream starts: the position recorded on the mirror.
    pub start: Lsn,
    /// The replicated tables and their states.
    pub tables: Vec<TableState>,
    /// A normal source session (catalog look-ups, sequences).
    pub source: Client,
    /// The mirror session the changes are applied on; it holds the slot's lock on the mirror.
    pub mirror: Client,
    /// The source's usual `search_path` (names in function bodies resolve along it).
    pub search_path: Vec<String>,
}

/// Advisory lock class on the mirror: one daemon per slot.
const DAEMON_LOCK: i32 = 0x6269_7465;

/// The mirror's record of a slot.
#[derive(Debug, Clone)]
struct StateRow {
    lsn: Lsn,
    source: String,
}

/// The source's view of a slot.
#[derive(Debug, Clone)]
struct SlotRow {
    active: bool,
    plugin: Option<String>,
    database: Option<String>,
    confirmed_flush: Option<Lsn>,
    wal_status: Option<String>,
}

/// Prepares a session; see the module docs. Everything a start needs is checked before it
/// changes anything ([`super::preflight`]); a first start that fails after creating the slot
/// drops the slot, and the publication if it created it, so nothing pins WAL on the source.
pub async fn prepare(
    opts: &RunOptions,
    observer: &Arc<dyn Observer>,
    cancel: &CancellationToken,
) -> Result<Prepared, RunError> {
    let (source, mut mirror) = tokio::try_join!(opts.source.connect(), opts.mirror.connect())?;
    let source_id = sync::database_identity(&source, Side::Source).await?;
    let mirror_id = sync::database_identity(&mirror, Side::Mirror).await?;
    if source_id == mirror_id {
        return Err(RunError::SameDatabase(opts.mirror.target()));
    }
    let initialized = bookkeeping::is_initialized(&mirror).await?;
    if !initialized && !opts.init {
        return Err(RunError::NotInitialized(opts.mirror.target()));
    }
    take_daemon_lock(&mirror, opts, cancel).await?;

    let search_path = catalog::search_path(&source)
        .await
        .map_err(query("failed to read the source's search_path"))?;
    let names = resolve_tables(&source, opts).await?;
    let state = if initialized {
        read_state(&mirror, &opts.slot).await?
    } else {
        None
    };
    if let Some(state) = &state
        && state.source != source_id
    {
        return Err(RunError::WrongSource {
            slot: opts.slot.clone(),
        });
    }
    let slot = read_slot(&source, &opts.slot).await?;
    if let Some(slot) = &slot {
        if slot.active {
            return Err(RunError::SlotActive(opts.slot.clone()));
        }
        if slot.plugin.as_deref() != Some("pgoutput")
            || slot.database.as_deref() != Some(opts.source.dbname().as_str())
        {
            return Err(RunError::ForeignSlot(opts.slot.clone()));
        }
    }

    let usable = match (&state, &slot) {
        (Some(state), Some(slot)) => {
            let lost = slot.wal_status.as_deref() == Some("lost");
            let ahead = slot.confirmed_flush.is_some_and(|c| c > state.lsn);
            if lost || ahead {
                tracing::error!(
                    slot = %opts.slot,
                    reason = if lost { "the source invalidated it (max_slot_wal_keep_size)" } else { "it is ahead of the mirror's recorded position" },
                    "the replication slot cannot continue the mirror's stream: recreating it and copying every table again"
                );
                None
            } else {
                Some(state.lsn)
            }
        }
        (Some(_), None) => {
            tracing::error!(slot = %opts.slot, "the replication slot is gone from the source: recreating it and copying every table again");
            None
        }
        (None, _) => None,
    };

    // Everything the start needs, checked before it changes anything on either side.
    let copies = match usable {
        None => names.clone(),
        Some(_) => tables_to_copy(&mirror, &opts.slot, &names).await?,
    };
    let needed = preflight::SlotsNeeded {
        create_slot: usable.is_none(),
        copy_beside: usable.is_some() && !copies.is_empty(),
    };
    let problems = preflight::problems(opts, &source, &names, &copies, needed, cancel).await?;
    if !problems.is_empty() {
        return Err(RunError::Preflight(problems));
    }

    bookkeeping::migrate(&mut mirror).await?;
    sync_enum_types(&source, &mirror, &names).await?;
    let publication = ensure_publication(&source, &opts.publication, &names).await?;
    if usable.is_some() {
        for name in &publication.recopy {
            record_recopy(&mirror, &opts.slot, name).await?;
        }
    }
    let mut replication = ReplicationClient::connect(&opts.source).await?;

    let start = match usable {
        Some(lsn) => {
            copy_new_tables(opts, observer, cancel, &mirror, &names).await?;
            lsn
        }
        None => {
            if slot.is_some() {
                replication.drop_slot(&opts.slot).await?;
            }
            let created = replication.create_slot(&opts.slot, false).await?;
            let copied = async {
                let snapshot = created.snapshot_name.clone().ok_or_else(|| {
                    RunError::Protocol("the source exported no snapshot with the new slot".into())
                })?;
                tracing::info!(slot = %opts.slot, lsn = %created.consistent_point, tables = names.len(), "created the replication slot; copying the tables");
                copy(opts, observer, cancel, &names, &snapshot).await?;
                record_fresh_start(&mirror, opts, &source_id, &names, created.consistent_point)
                    .await
            }
            .await;
            if let Err(e) = copied {
                // A first start (no recorded state) leaves nothing on the source; a slot that
                // was lost is simply recreated next time.
                let drop_publication = publication.created && state.is_none();
                undo_slot(opts, replication, drop_publication).await;
                return Err(e);
            }
            created.consistent_point
        }
    };
    let tables = read_tables(&mirror, &opts.slot).await?;
    Ok(Prepared {
        replication,
        start,
        tables,
        source,
        mirror,
        search_path,
    })
}

/// How this daemon names itself on its mirror session (`application_name`), so a standby and
/// `bite-sync status` can say where the active daemon runs: `bite-sync run <pid>@<host>`.
pub fn daemon_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{DAEMON_NAME_PREFIX}{}@{host}", std::process::id())
}

/// The start of [`daemon_name`].
pub const DAEMON_NAME_PREFIX: &str = "bite-sync run ";

/// A daemon on the mirror's lock for a slot: the active one (holding it) or a standby
/// (waiting for it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DaemonOnMirror {
    /// The machine it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: u32,
    /// It holds the lock (streams); else it waits to take over.
    pub active: bool,
}

/// The daemons on the mirror's lock for `slot`, from their sessions' names. Sessions of other
/// roles show no name unless the mirror user may read all statistics; those are left out.
pub async fn daemons_on_mirror(
    mirror: &Client,
    slot: &str,
) -> Result<Vec<DaemonOnMirror>, tokio_postgres::Error> {
    let rows = mirror
        .query(
            "SELECT a.application_name::text, l.granted FROM pg_catalog.pg_locks l \
             JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.objsubid = 2 \
               AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) \
               AND l.classid = $1::int4::oid AND l.objid = pg_catalog.hashtext($2)::oid \
             ORDER BY NOT l.granted, a.backend_start",
            &[&DAEMON_LOCK, &slot],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: Option<String> = r.get(0);
            let (pid, host) = name?
                .strip_prefix(DAEMON_NAME_PREFIX)?
                .split_once('@')
                .map(|(p, h)| (p.to_string(), h.to_string()))?;
            Some(DaemonOnMirror {
                host,
                pid: pid.parse().ok()?,
                active: r.get(1),
            })
        })
        .collect())
}

/// Takes the mirror's lock for the slot (one daemon per slot). When another daemon holds it,
/// this one is a standby: it says where the active one runs, and waits on the lock, which
/// it gets the moment the other stops (or its connection dies), to take over. A standby is a
/// state, not an error: nothing is recorded as one.
async fn take_daemon_lock(
    mirror: &Client,
    opts: &RunOptions,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    mirror
        .batch_execute(&format!(
            "SET application_name = {}; SET statement_timeout = 0",
            literal(&daemon_name())
        ))
        .await
        .map_err(query("failed to set up the mirror session"))?;
    let locked: bool = mirror
        .query_one(
            "SELECT pg_catalog.pg_try_advisory_lock($1, pg_catalog.hashtext($2))",
            &[&DAEMON_LOCK, &opts.slot],
        )
        .await
        .map_err(query("failed to take the daemon lock on the mirror"))?
        .get(0);
    if locked {
        return Ok(());
    }
    let active = daemons_on_mirror(mirror, &opts.slot)
        .await
        .map_err(query("failed to look for the daemon that holds the slot"))?
        .into_iter()
        .find(|d| d.active)
        .map_or(
            "an unknown host (its session's name is not visible to this user)".to_string(),
            |d| format!("{} (pid {})", d.host, d.pid),
        );
    tracing::info!(slot = %opts.slot, %active, "standby: another bite-sync run replicates this slot into the mirror; taking over when it stops");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&DAEMON_LOCK, &opts.slot];
    tokio::select! {
        locked = mirror.query_one(
            "SELECT pg_catalog.pg_advisory_lock($1, pg_catalog.hashtext($2))",
            &params,
        ) => {
            locked.map_err(query("failed to wait for the daemon lock on the mirror"))?;
        }
        () = cancel.cancelled() => return Err(RunError::Busy(opts.slot.clone())),
    }
    tracing::info!(slot = %opts.slot, "the active daemon stopped: taking over");
    Ok(())
}

/// Drops the slot a failed start created (and the publication, when it created that too),
/// so the source does not keep WAL for a stream that never began. Best effort: what cannot
/// be dropped is logged with the statement that drops it.
async fn undo_slot(opts: &RunOptions, replication: ReplicationClient, drop_publication: bool) {
    // The slot is held by the walsender of the connection that created it.
    drop(replication);
    let undo = async {
        let mut c = ReplicationClient::connect(&opts.source)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        c.drop_slot(&opts.slot)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        if drop_publication {
            let source = opts
                .source
                .connect()
                .await
                .map_err(|e| crate::error_chain(&e))?;
            source
                .batch_execute(&format!(
                    "DROP PUBLICATION IF EXISTS {}",
                    quote(&opts.publication)
                ))
                .await
                .map_err(|e| crate::error_chain(&e))?;
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), undo).await {
        Ok(Ok(())) => tracing::info!(
            slot = %opts.slot,
            publication = if drop_publication { opts.publication.as_str() } else { "(kept)" },
            "the first start failed: dropped the replication slot it created, so the source keeps no WAL for it"
        ),
        Ok(Err(e)) => tracing::error!(
            error = %e,
            "the first start failed and its replication slot could not be dropped: drop it on the source, or it keeps WAL: SELECT pg_drop_replication_slot({})",
            literal(&opts.slot)
        ),
        Err(_) => tracing::error!(
            "the first start failed and dropping its replication slot did not finish within 30 s: drop it on the source: SELECT pg_drop_replication_slot({})",
            literal(&opts.slot)
        ),
    }
}

/// Tables configured but not streaming (new, or paused): the ones a start copies.
async fn tables_to_copy(
    mirror: &Client,
    slot: &str,
    names: &[QualifiedName],
) -> Result<Vec<QualifiedName>, RunError> {
    let recorded = read_tables(mirror, slot).await?;
    Ok(names
        .iter()
        .filter(|n| {
            recorded
                .iter()
                .find(|t| &t.name == *n)
                .is_none_or(|t| t.paused.is_some())
        })
        .cloned()
        .collect())
}

/// Marks a table to be copied again at this start (it is paused, which the start copies).
async fn record_recopy(mirror: &Client, slot: &str, name: &QualifiedName) -> Result<(), RunError> {
    tracing::warn!(table = %name, "the publication now publishes this partitioned table through its root, so its rows arrive under another identity: copying it again");
    mirror
        .batch_execute(&table_row_sql(
            slot,
            name,
            Lsn::ZERO,
            Some("copying it again: its publication now publishes it through its partitioned root"),
        ))
        .await
        .map_err(query(
            "failed to record a table to copy again on the mirror",
        ))
}

fn query(context: &str) -> impl FnOnce(tokio_postgres::Error) -> RunError + '_ {
    move |source| RunError::Query {
        context: context.to_string(),
        source,
    }
}

/// The tables the configuration names, as they exist on the source.
async fn resolve_tables(
    source: &Client,
    opts: &RunOptions,
) -> Result<Vec<QualifiedName>, RunError> {
    if opts.tables.is_empty() {
        return Err(RunError::NoTables);
    }
    let search_path = catalog::search_path(source)
        .await
        .map_err(query("failed to read the source's search_path"))?;
    let all = catalog::list_tables(source)
        .await
        .map_err(query("failed to list the source's tables"))?;
    let selected =
        plan::resolve(&all, &search_path, &opts.tables, &[]).map_err(sync::SyncError::from)?;
    Ok(selected.into_iter().map(|e| e.name).collect())
}

/// Gives the mirror every enum type the replicated tables use on the source, with all its
/// labels in the source's order. A label added on the source (`ALTER TYPE ... ADD VALUE`) or an
/// enum column added with a new type would otherwise make the mirror reject rows; a rejected
/// batch restarts the session, which comes through here first, so the retry succeeds.
/// Labels are added outside any transaction: a new label is usable only once committed.
async fn sync_enum_types(
    source: &Client,
    mirror: &Client,
    names: &[QualifiedName],
) -> Result<(), RunError> {
    let (schemas, tables) = QualifiedName::split(names);
    let rows = source
        .query(
            "SELECT DISTINCT tn.nspname::text, ty.typname::text, \
                    ARRAY(SELECT e.enumlabel::text FROM pg_catalog.pg_enum e \
                          WHERE e.enumtypid = ty.oid ORDER BY e.enumsortorder) \
             FROM unnest($1::text[], $2::text[]) AS t(schema, name) \
             JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.name \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_catalog.pg_type at ON at.oid = a.atttypid \
             JOIN pg_catalog.pg_type ty ON ty.oid = CASE WHEN at.typelem <> 0 AND at.typlen = -1 THEN at.typelem ELSE at.oid END \
             JOIN pg_catalog.pg_namespace tn ON tn.oid = ty.typnamespace \
             WHERE ty.typtype = 'e'",
            &[&schemas, &tables],
        )
        .await
        .map_err(query("failed to read the source's enum types"))?;
    for row in rows {
        let name = QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let labels: Vec<String> = row.get(2);
        let found = mirror
            .query_opt(
                "SELECT ARRAY(SELECT e.enumlabel::text FROM pg_catalog.pg_enum e \
                              WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) \
                 FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
                 WHERE n.nspname = $1 AND t.typname = $2",
                &[&name.schema, &name.name],
            )
            .await
            .map_err(query("failed to read the mirror's enum types"))?;
        let statements = match found {
            Some(row) => ddl::add_enum_labels(&name, &labels, &row.get::<_, Vec<String>>(0)),
            None => vec![
                format!("CREATE SCHEMA IF NOT EXISTS {}", quote(&name.schema)),
                ddl::create_type(&TypeDef::Enum {
                    name: name.clone(),
                    labels,
                })
                .expect("an enum always has DDL"),
            ],
        };
        for statement in statements {
            tracing::info!(r#type = %name, %statement, "bringing an enum type on the mirror up to the source's");
            mirror.batch_execute(&statement).await.map_err(query(
                "failed to bring an enum type on the mirror up to the source's",
            ))?;
        }
    }
    Ok(())
}

/// What is wrong with the tables' replica identities, with the fix: their updates and
/// deletes must be findable on the mirror. A partitioned table's partitions are checked too:
/// the source logs each partition's old rows by that partition's identity.
pub async fn identity_problems(
    source: &Client,
    names: &[QualifiedName],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let (schemas, tables) = QualifiedName::split(names);
    let rows = source
        .query(
            "SELECT t.schema, t.name, pn.nspname::text, pc.relname::text, pc.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = pc.oid AND i.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = pc.oid AND i.indisreplident), \
                    NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = pc.oid AND a.attnum > 0 AND NOT a.attisdropped), \
                    pc.oid <> c.oid \
             FROM unnest($1::text[], $2::text[]) AS t(schema, name) \
             JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.name \
             CROSS JOIN LATERAL (SELECT c.oid AS relid UNION \
                                 SELECT relid FROM pg_catalog.pg_partition_tree(c.oid) WHERE isleaf) AS tree \
             JOIN pg_catalog.pg_class pc ON pc.oid = tree.relid \
             JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace \
             ORDER BY 1, 2, 3, 4",
            &[&schemas, &tables],
        )
        .await?;
    let mut problems = Vec::new();
    for r in rows {
        let table = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let name = QualifiedName::new(r.get::<_, String>(2), r.get::<_, String>(3));
        let identity: String = r.get(4);
        let has_pk: bool = r.get(5);
        let has_index: bool = r.get(6);
        let no_columns: bool = r.get(7);
        let partition: bool = r.get(8);
        let fine = match identity.as_str() {
            "d" => has_pk,
            "i" => has_index,
            "f" => true,
            _ => false,
        };
        if fine {
            continue;
        }
        let what = if partition {
            format!("{name} (a partition of {table})")
        } else {
            name.to_string()
        };
        problems.push(if no_columns {
            format!(
                "{what} has no columns, so no key its deletes could be found by on the mirror (and the source refuses deletes from a published table without one): run on the source: ALTER TABLE {} REPLICA IDENTITY FULL",
                name.quoted()
            )
        } else {
            format!(
                "{what} has no primary key{}, so its updates and deletes cannot be found on the mirror: add a primary key, or run on the source: ALTER TABLE {} REPLICA IDENTITY FULL",
                if identity == "n" { " and REPLICA IDENTITY NOTHING" } else { "" },
                name.quoted()
            )
        });
    }
    Ok(problems)
}

/// What [`ensure_publication`] changed.
struct PublicationChange {
    /// It created the publication.
    created: bool,
    /// Tables the publication published through their partitions (a publication made before
    /// bite-sync replicated partitioned tables, or by hand): they now arrive through their
    /// partitioned root, under another identity, so they are copied again.
    recopy: Vec<QualifiedName>,
}

/// Creates the publication, or makes its table list the configured one. It publishes a
/// partitioned table's changes as its own (`publish_via_partition_root`), whichever partition
/// they went to: the mirror's table has the root's name, partitioned or flattened.
async fn ensure_publication(
    source: &Client,
    publication: &str,
    names: &[QualifiedName],
) -> Result<PublicationChange, RunError> {
    let exists = source
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query("failed to look for the publication"))?;
    let list = |tables: &[&QualifiedName]| {
        tables
            .iter()
            .map(|t| t.quoted())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let wanted: BTreeSet<&QualifiedName> = names.iter().collect();
    let mut change = PublicationChange {
        created: false,
        recopy: Vec::new(),
    };
    let Some(row) = exists else {
        let all: Vec<&QualifiedName> = wanted.iter().copied().collect();
        tracing::info!(
            publication,
            tables = all.len(),
            "creating the publication on the source"
        );
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                quote(publication),
                list(&all)
            ))
            .await
            .map_err(query("failed to create the publication on the source (the source user must own the tables, or be superuser)"))?;
        change.created = true;
        return Ok(change);
    };
    let (all_tables, via_root): (bool, bool) = (row.get(0), row.get(1));
    if !via_root {
        // Before the switch, so the tables it published through their partitions are known.
        let rows = source
            .query(
                "SELECT DISTINCT rn.nspname::text, rc.relname::text \
                 FROM pg_catalog.pg_publication_tables pt \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
                 JOIN pg_catalog.pg_class rc ON rc.oid = pg_catalog.pg_partition_root(c.oid) \
                 JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace \
                 WHERE pt.pubname = $1 AND c.relispartition",
                &[&publication],
            )
            .await
            .map_err(query("failed to read the publication's tables"))?;
        change.recopy = rows
            .iter()
            .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .filter(|n| wanted.contains(n))
            .collect();
        tracing::info!(
            publication,
            "the publication publishes partitions on their own: switching it to publish_via_partition_root"
        );
        source
            .batch_execute(&format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                quote(publication)
            ))
            .await
            .map_err(query("failed to set publish_via_partition_root on the publication (the source user must own it)"))?;
    }
    if all_tables {
        return Ok(change);
    }
    let rows = source
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query("failed to read the publication's tables"))?;
    let current: BTreeSet<QualifiedName> = rows
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let add: Vec<&QualifiedName> = wanted
        .iter()
        .copied()
        .filter(|t| !current.contains(*t))
        .collect();
    let drop: Vec<&QualifiedName> = current.iter().filter(|t| !wanted.contains(t)).collect();
    if !add.is_empty() {
        tracing::info!(publication, tables = %list(&add), "adding tables to the publication");
        source
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote(publication),
                list(&add)
            ))
            .await
            .map_err(query("failed to add tables to the publication"))?;
    }
    if !drop.is_empty() {
        tracing::info!(publication, tables = %list(&drop), "removing tables no longer configured from the publication");
        source
            .batch_execute(&format!(
                "ALTER PUBLICATION {} DROP TABLE {}",
                quote(publication),
                list(&drop)
            ))
            .await
            .map_err(query("failed to remove tables from the publication"))?;
    }
    Ok(change)
}

async fn read_state(mirror: &Client, slot: &str) -> Result<Option<StateRow>, RunError> {
    let row = mirror
        .query_opt(
            "SELECT lsn::text, source_system_identifier || '/' || source_database \
             FROM bite_sync.replication_state WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query("failed to read the replication state on the mirror"))?;
    row.map(|r| {
        let lsn: String = r.get(0);
        Ok(StateRow {
            lsn: lsn
                .parse()
                .map_err(|e| RunError::Protocol(format!("{e}")))?,
            source: r.get(1),
        })
    })
    .transpose()
}

async fn read_slot(source: &Client, slot: &str) -> Result<Option<SlotRow>, RunError> {
    let row = source
        .query_opt(
            "SELECT active, plugin::text, database::text, confirmed_flush_lsn::text, wal_status \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query("failed to read the replication slot on the source"))?;
    Ok(row.map(|r| SlotRow {
        active: r.get(0),
        plugin: r.get(1),
        database: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|t| t.parse().ok()),
        wal_status: r.get(4),
    }))
}

/// Reads the replicated tables' states from the mirror's bookkeeping.
pub async fn read_tables(mirror: &Client, slot: &str) -> Result<Vec<TableState>, RunError> {
    let rows = mirror
        .query(
            "SELECT table_schema, table_name, synced_lsn::text, CASE WHEN state = 'paused' THEN COALESCE(reason, 'paused') END \
             FROM bite_sync.replication_tables WHERE slot_name = $1 ORDER BY 1, 2",
            &[&slot],
        )
        .await
        .map_err(query("failed to read the replicated tables on the mirror"))?;
    rows.iter()
        .map(|r| {
            let lsn: String = r.get(2);
            Ok(TableState {
                name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                synced_lsn: lsn
                    .parse()
                    .map_err(|e| RunError::Protocol(format!("{e}")))?,
                paused: r.get(3),
            })
        })
        .collect()
}

/// Copies `names` with the sync engine from an exported snapshot.
async fn copy(
    opts: &RunOptions,
    observer: &Arc<dyn Observer>,
    cancel: &CancellationToken,
    names: &[QualifiedName],
    snapshot: &str,
) -> Result<(), RunError> {
    let mut sync_opts = preflight::copy_options(opts, names);
    sync_opts.snapshot = Some(snapshot.to_string());
    let report = sync::sync(&sync_opts, Arc::clone(observer), cancel.clone()).await?;
    tracing::info!(
        tables = report.tables.len(),
        rows = report.rows,
        "copied tables for replication"
    );
    Ok(())
}

/// Records a fresh start: the slot's position and every table synced at it.
async fn record_fresh_start(
    mirror: &Client,
    opts: &RunOptions,
    source_id: &str,
    names: &[QualifiedName],
    lsn: Lsn,
) -> Result<(), RunError> {
    let (system, database) = source_id.split_once('/').unwrap_or((source_id, ""));
    let mut sql = format!(
        "BEGIN; \
         INSERT INTO bite_sync.replication_state (slot_name, publication, source_system_identifier, source_database, lsn) \
         VALUES ({slot}, {publication}, {system}, {database}, {lsn}) \
         ON CONFLICT (slot_name) DO UPDATE SET publication = EXCLUDED.publication, \
             source_system_identifier = EXCLUDED.source_system_identifier, \
             source_database = EXCLUDED.source_database, lsn = EXCLUDED.lsn, \
             source_commit_time = NULL, applied_at = now(), last_error = NULL, last_error_at = NULL; \
         DELETE FROM bite_sync.replication_tables WHERE slot_name = {slot};",
        slot = literal(&opts.slot),
        publication = literal(&opts.publication),
        system = literal(system),
        database = literal(database),
        lsn = literal(&lsn.to_string()),
    );
    for name in names {
        sql.push_str(&table_row_sql(&opts.slot, name, lsn, None));
    }
    sql.push_str("COMMIT");
    mirror.batch_execute(&sql).await.map_err(query(
        "failed to record the replication start on the mirror",
    ))
}

/// Upserts a table's bookkeeping row: streaming from `lsn`, or paused with `reason`.
fn table_row_sql(slot: &str, name: &QualifiedName, lsn: Lsn, reason: Option<&str>) -> String {
    format!(
        "INSERT INTO bite_sync.replication_tables (slot_name, table_schema, table_name, state, synced_lsn, reason, paused_at) \
         VALUES ({slot}, {schema}, {table}, {state}, {lsn}, {reason}, {paused_at}) \
         ON CONFLICT (slot_name, table_schema, table_name) DO UPDATE SET state = EXCLUDED.state, \
             synced_lsn = EXCLUDED.synced_lsn, synced_at = now(), reason = EXCLUDED.reason, paused_at = EXCLUDED.paused_at;",
        slot = literal(slot),
        schema = literal(&name.schema),
        table = literal(&name.name),
        state = if reason.is_some() {
            "'paused'"
        } else {
            "'streaming'"
        },
        lsn = literal(&lsn.to_string()),
        reason = reason.map_or("NULL".to_string(), literal),
        paused_at = if reason.is_some() { "now()" } else { "NULL" },
    )
}

/// Copies tables that are configured but not streaming (new, or paused) from a temporary
/// slot's snapshot, and forgets tables no longer configured.
async fn copy_new_tables(
    opts: &RunOptions,
    observer: &Arc<dyn Observer>,
    cancel: &CancellationToken,
    mirror: &Client,
    names: &[QualifiedName],
) -> Result<(), RunError> {
    let recorded = read_tables(mirror, &opts.slot).await?;
    let wanted: BTreeSet<&QualifiedName> = names.iter().collect();
    for gone in recorded.iter().filter(|t| !wanted.contains(&t.name)) {
        tracing::info!(table = %gone.name, "no longer replicated (removed from the configuration); the mirror keeps its copy");
        mirror
            .execute(
                "DELETE FROM bite_sync.replication_tables WHERE slot_name = $1 AND table_schema = $2 AND table_name = $3",
                &[&opts.slot, &gone.name.schema, &gone.name.name],
            )
            .await
            .map_err(query("failed to update the replicated tables on the mirror"))?;
    }
    let to_copy: Vec<QualifiedName> = names
        .iter()
        .filter(|n| {
            recorded
                .iter()
                .find(|t| &t.name == *n)
                .is_none_or(|t| t.paused.is_some())
        })
        .cloned()
        .collect();
    if to_copy.is_empty() {
        return Ok(());
    }
    // All together first; if that fails for a reason of one table, each on its own so the
    // others still start streaming.
    match copy_at_new_snapshot(opts, observer, cancel, mirror, &to_copy).await {
        Ok(()) => return Ok(()),
        Err(e) if e.is_transient() => return Err(e),
        Err(e) if to_copy.len() == 1 => {
            return record_paused(mirror, &opts.slot, &to_copy[0], &e).await;
        }
        Err(_) => {}
    }
    for name in &to_copy {
        let one = std::slice::from_ref(name);
        match copy_at_new_snapshot(opts, observer, cancel, mirror, one).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => record_paused(mirror, &opts.slot, name, &e).await?,
        }
    }
    Ok(())
}

async fn record_paused(
    mirror: &Client,
    slot: &str,
    name: &QualifiedName,
    error: &RunError,
) -> Result<(), RunError> {
    let reason = format!("copying it failed: {}", crate::error_chain(error));
    tracing::error!(table = %name, %reason, "the table stays paused");
    mirror
        .batch_execute(&table_row_sql(slot, name, Lsn::ZERO, Some(&reason)))
        .await
        .map_err(query("failed to record a paused table on the mirror"))
}

/// Copies `names` from a temporary slot's snapshot and records them as streaming from its
/// position.
async fn copy_at_new_snapshot(
    opts: &RunOptions,
    observer: &Arc<dyn Observer>,
    cancel: &CancellationToken,
    mirror: &Client,
    names: &[QualifiedName],
) -> Result<(), RunError> {
    let mut temporary = ReplicationClient::connect(&opts.source).await?;
    static ATTEMPT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let attempt = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Unique per attempt: a dropped temporary slot goes away with its walsender, a moment
    // after the connection closes.
    let mut slot = format!(
        "bite_sync_copy_{}_{attempt}_{}",
        std::process::id(),
        opts.slot
    );
    slot.truncate(63);
    let created = temporary.create_slot(&slot, true).await?;
    let snapshot = created.snapshot_name.clone().ok_or_else(|| {
        RunError::Protocol("the source exported no snapshot with the temporary slot".into())
    })?;
    tracing::info!(tables = %names.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "), lsn = %created.consistent_point, "copying tables new to replication");
    copy(opts, observer, cancel, names, &snapshot).await?;
    let mut sql = String::from("BEGIN;");
    for name in names {
        sql.push_str(&table_row_sql(
            &opts.slot,
            name,
            created.consistent_point,
            None,
        ));
    }
    sql.push_str("COMMIT");
    mirror
        .batch_execute(&sql)
        .await
        .map_err(query("failed to record copied tables on the mirror"))?;
    // Closing the connection drops the temporary slot.
    drop(temporary);
    Ok(())
}
