//! `bite-sync backup`: one consistent snapshot, tables dumped in parallel (large ones in
//! chunks of pages), gzip (then age, with `backup.encrypt_to`) streamed straight into the
//! store, the manifest last.
//!
//! Memory stays bounded whatever the table size: rows flow from `COPY ... TO STDOUT` through
//! the [`Encoder`] into an [`ObjectWriter`](super::store::ObjectWriter) that holds at most a
//! part or two.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{StreamExt, pin_mut};
use serde::Serialize;
use tokio_postgres::Client;

use super::crypt::{Encoder, Recipient};
use super::digest::{Digest, Digester};
use super::large_objects::{self, LargeObjects};
use super::manifest::{
    self, ForeignKeyDdl, MANIFEST, Manifest, Object, ObjectKind, Partitioned, Scope, Table,
    TableDdl,
};
use super::schema::{self, PgDumpError, Section};
use super::store::{Store, StoreError, Written};
use super::tables;
use crate::pg::connect::{ConnectError, DbUrl};
use crate::pg::ident::{QualifiedName, TablePattern, literal};
use crate::sync::catalog;
use crate::sync::plan::PlanError;

/// gzip level: 6 is gzip's own default; the benchmark compares sizes with `gzip -6`.
const LEVEL: u32 = 6;
/// Stored bytes gathered before they go to the store.
const FLUSH_BYTES: usize = 512 * 1024;
/// Settings every dump and verify session uses, so COPY prints values the same way on both
/// sides (the checksums compare text), and, as pg_dump has it, row security off: a table whose
/// policies would hide rows from the user fails loudly instead of being backed up thinned.
pub(crate) const SESSION_SETTINGS: &str = "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; \
     SET extra_float_digits = 3; SET bytea_output = 'hex'; SET TimeZone = 'UTC'; SET row_security = off; \
     SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0";

/// What to back up, and where.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The database.
    pub source: DbUrl,
    /// `--tables`; empty: the whole database.
    pub tables: Vec<TablePattern>,
    /// Parallel connections.
    pub jobs: usize,
    /// A table larger than this is dumped in chunks of about this many bytes of pages.
    pub chunk_bytes: u64,
    /// `[backup] pg_dump`.
    pub pg_dump: Option<PathBuf>,
    /// `[backup] encrypt_to`: every object is age-encrypted to it after compression.
    pub encrypt_to: Option<Recipient>,
}

impl BackupOptions {
    /// Defaults: the whole database, two jobs, 32 MiB chunks (small enough that two
    /// workers finish together).
    pub fn new(source: DbUrl) -> BackupOptions {
        BackupOptions {
            source,
            tables: Vec::new(),
            jobs: 2,
            chunk_bytes: 32 * 1024 * 1024,
            pg_dump: None,
            encrypt_to: None,
        }
    }

    /// The whole database with `[backup]`'s jobs, pg_dump and encryption: what
    /// `bite-sync backup` and a scheduled backup start from.
    pub fn configured(source: DbUrl, settings: &crate::config::BackupSettings) -> BackupOptions {
        BackupOptions {
            jobs: settings.jobs,
            pg_dump: settings.pg_dump.clone(),
            encrypt_to: settings.encrypt_to.clone(),
            ..BackupOptions::new(source)
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// Its id.
    pub id: String,
    /// Where it is.
    pub location: String,
    /// Tables.
    pub tables: usize,
    /// Rows.
    pub rows: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Objects stored, the manifest included.
    pub objects: usize,
    /// Wall time.
    pub duration_ms: u64,
}

/// Why a backup failed; nothing is listed as a backup then.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Could not connect.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A query failed.
    #[error("{context}: {source}")]
    Query {
        /// What was being done.
        context: String,
        /// The cause.
        source: tokio_postgres::Error,
    },
    /// `--tables` did not resolve.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// pg_dump failed.
    #[error(transparent)]
    PgDump(#[from] PgDumpError),
}

impl BackupError {
    /// 3 for what may pass on retry (a network or server problem), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            BackupError::Connect(e) if e.is_transient() => 3,
            BackupError::Store(StoreError::S3 { .. } | StoreError::Io { .. }) => 3,
            _ => 1,
        }
    }
}

fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Query { context, source }
}

/// One table to dump.
#[derive(Debug, Clone)]
struct Planned {
    name: QualifiedName,
    kind: char,
    /// Quoted and comma-separated; empty for a zero-column table.
    columns: String,
    /// An extension configuration table's `WHERE ...`: only those rows are its data.
    filter: Option<String>,
    bytes: u64,
    blocks: u64,
}

/// One data object to write.
#[derive(Debug, Clone)]
struct Task {
    table: usize,
    object: String,
    /// Pages `[from, to)`; `None`: the whole table. The last chunk is open-ended.
    pages: Option<(u64, Option<u64>)>,
    bytes: u64,
}

/// Runs a backup into `store`.
pub async fn backup(opts: &BackupOptions, store: &Store) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let control = opts.source.connect().await?;
    control
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; {SESSION_SETTINGS}"
        ))
        .await
        .map_err(query("failed to start the backup's snapshot"))?;
    let row = control
        .query_one(
            "SELECT pg_catalog.pg_export_snapshot(), \
                    to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                    (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                          ELSE pg_catalog.pg_current_wal_lsn() END)::text, \
                    (SELECT system_identifier::text FROM pg_catalog.pg_control_system()), \
                    current_database(), current_setting('server_version'), \
                    current_setting('server_version_num')::int, \
                    current_setting('block_size')::int8",
            &[],
        )
        .await
        .map_err(query("failed to export the backup's snapshot"))?;
    let snapshot: String = row.get(0);
    let source = manifest::Source {
        system_identifier: row.get(3),
        database: row.get(4),
        server_version: row.get(5),
        server_version_num: row.get(6),
    };
    let snapshot_info = manifest::Snapshot {
        time: row.get(1),
        lsn: row.get::<_, Option<String>>(2).unwrap_or_default(),
    };
    let block_size: i64 = row.get(7);

    // Which tables: every one with rows of its own (partitions included), or those named.
    let all = tables::list(&control)
        .await
        .map_err(query("failed to list the source's tables"))?;
    let search_path = tables::search_path(&control)
        .await
        .map_err(query("failed to read the source's search_path"))?;
    let selection = tables::select(&all, &search_path, &opts.tables)?;
    let names: Vec<QualifiedName> = selection.data.iter().map(|t| t.name.clone()).collect();
    let filters: Vec<Option<String>> = selection
        .data
        .iter()
        .map(|t| t.extension_filter.clone().filter(|f| !f.is_empty()))
        .collect();
    let planned = plan_tables(&control, &names, &filters, block_size).await?;

    let id = free_id(store, started_at).await?;
    let result = async {
        // Schema, meanwhile the data.
        let scope = if opts.tables.is_empty() {
            Scope::Database
        } else {
            // The tables named: top-level ones (a partitioned table stands for its partitions).
            let mut top: Vec<String> = names
                .iter()
                .map(|n| {
                    selection
                        .root_of(n)
                        .unwrap_or_else(|| n.clone())
                        .to_string()
                })
                .chain(
                    selection
                        .partitioned
                        .iter()
                        .filter(|p| p.parent.is_none())
                        .map(|p| p.name.to_string()),
                )
                .collect();
            top.sort();
            top.dedup();
            Scope::Tables(top)
        };
        // Catalog expressions deparsed with every name qualified.
        control
            .batch_execute("SET search_path = ''")
            .await
            .map_err(query("failed to prepare the catalog reads"))?;
        let ddls = table_ddls(&control, &names).await?;
        let partitioned_names: Vec<QualifiedName> = selection
            .partitioned
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let partitioned_ddls = table_ddls(&control, &partitioned_names).await?;
        // pg_dump --schema-only leaves materialized views empty: refresh, after everything
        // else, those the source has populated.
        let refreshes = match scope {
            Scope::Database => refresh_sql(&control).await?,
            Scope::Tables(_) => String::new(),
        };
        let schema_task = {
            let store = store.clone();
            let id = id.clone();
            let source_url = opts.source.clone();
            let snapshot = snapshot.clone();
            let pg_dump = opts.pg_dump.clone();
            let encrypt_to = opts.encrypt_to.clone();
            let major = (source.server_version_num / 10_000) as u32;
            let generated = match scope {
                Scope::Database => None,
                Scope::Tables(_) => {
                    // Partitioned tables first (parents before their partitions).
                    let all: Vec<&TableDdl> = partitioned_ddls.iter().chain(&ddls).collect();
                    Some(manifest::generated_schema(&all))
                }
            };
            tokio::spawn(async move {
                let (pre, post) = match generated {
                    Some(pair) => pair,
                    None => {
                        let pg_dump = schema::find_pg_dump(pg_dump.as_deref(), major).await?;
                        let (pre, post) = tokio::join!(
                            schema::dump_section(
                                &pg_dump,
                                &source_url,
                                &snapshot,
                                Section::PreData
                            ),
                            schema::dump_section(
                                &pg_dump,
                                &source_url,
                                &snapshot,
                                Section::PostData
                            )
                        );
                        (pre?, format!("{}{refreshes}", post?))
                    }
                };
                let mut objects = Vec::new();
                for (kind, sql) in [(ObjectKind::PreData, pre), (ObjectKind::PostData, post)] {
                    let name = manifest::schema_object_name(kind, encrypt_to.is_some());
                    let written =
                        put_encoded(&store, &id, &name, encrypt_to.as_ref(), sql.as_bytes())
                            .await?;
                    objects.push(object(&name, kind, written));
                }
                Ok::<_, BackupError>(objects)
            })
        };

        let tasks = chunk_tasks(
            &planned,
            opts.chunk_bytes,
            source.server_version_num,
            opts.encrypt_to.is_some(),
        );
        let results = dump_data(opts, store, &id, &snapshot, &planned, &tasks).await?;
        let mut objects = schema_task.await.expect("the schema task does not panic")?;

        // Large objects belong to the whole database, like pg_dump's.
        let large_objects = match scope {
            Scope::Database => {
                dump_large_objects(&control, store, &id, opts.encrypt_to.as_ref()).await?
            }
            Scope::Tables(_) => None,
        };
        if let Some((name, written, _)) = &large_objects {
            objects.push(object(name, ObjectKind::LargeObjects, written.clone()));
        }

        let sequences = sequences_sql(&control, &names, opts.tables.is_empty()).await?;
        let name = manifest::schema_object_name(ObjectKind::Sequences, opts.encrypt_to.is_some());
        let written = put_encoded(
            store,
            &id,
            &name,
            opts.encrypt_to.as_ref(),
            sequences.as_bytes(),
        )
        .await?;
        objects.push(object(&name, ObjectKind::Sequences, written));

        let mut tables: Vec<Table> = planned
            .iter()
            .map(|p| Table {
                schema: p.name.schema.clone(),
                name: p.name.name.clone(),
                columns: p.columns.clone(),
                digest: Digest::default(),
                objects: Vec::new(),
                ddl: ddls.iter().find(|d| d.name == p.name.quoted()).cloned(),
                partition_of: selection.root_of(&p.name).map(|r| r.quoted()),
            })
            .collect();
        let partitioned = selection
            .partitioned
            .iter()
            .map(|p| Partitioned {
                schema: p.name.schema.clone(),
                name: p.name.name.clone(),
                partition_of: p
                    .parent
                    .as_ref()
                    .and_then(|_| selection.root_of(&p.name))
                    .map(|r| r.quoted()),
                ddl: partitioned_ddls
                    .iter()
                    .find(|d| d.name == p.name.quoted())
                    .cloned(),
            })
            .collect();
        for (task, (written, digest)) in tasks.iter().zip(results) {
            let table = &mut tables[task.table];
            table.digest.add(digest);
            table.objects.push(task.object.clone());
            objects.push(object(&task.object, ObjectKind::Data, written));
        }
        for table in &mut tables {
            table.objects.sort();
        }
        objects.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest {
            format: manifest::FORMAT,
            id: id.clone(),
            bite_sync_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            source: source.clone(),
            snapshot: snapshot_info.clone(),
            scope,
            compression: "gzip".into(),
            encryption: opts.encrypt_to.as_ref().map(|_| manifest::Encryption::Age),
            recipient: opts.encrypt_to.as_ref().map(ToString::to_string),
            tables,
            partitioned,
            large_objects: large_objects.map(|(_, _, digest)| LargeObjects { digest }),
            objects,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        // Last: from here on the backup exists.
        store.put(&format!("{id}/{MANIFEST}"), &json).await?;
        Ok::<_, BackupError>(manifest)
    }
    .await;
    let _ = control.batch_execute("COMMIT").await;
    match result {
        Ok(manifest) => Ok(BackupReport {
            id,
            location: store.describe(),
            tables: manifest.tables.len(),
            rows: manifest.rows(),
            bytes: manifest.size(),
            objects: manifest.objects.len() + 1,
            duration_ms: started.elapsed().as_millis() as u64,
        }),
        Err(e) => {
            // Without a manifest it is no backup; tidy up what was stored (best effort, prune
            // removes what is left).
            if let Ok(objects) = store.list(&format!("{id}/")).await {
                for o in objects {
                    let _ = store.delete(&o.key).await;
                }
            }
            Err(e)
        }
    }
}

/// A backup id not used yet in the store.
async fn free_id(
    store: &Store,
    time: chrono::DateTime<chrono::Utc>,
) -> Result<String, BackupError> {
    let base = manifest::backup_id(time);
    let mut id = base.clone();
    let mut n = 1;
    while !store.list(&format!("{id}/")).await?.is_empty() {
        n += 1;
        id = format!("{base}-{n}");
    }
    Ok(id)
}

fn object(name: &str, kind: ObjectKind, written: Written) -> Object {
    Object {
        name: name.to_owned(),
        kind,
        size: written.size,
        sha256: written.sha256,
    }
}

/// Compresses (and encrypts, with a recipient) a small text and stores it as `id/name`.
async fn put_encoded(
    store: &Store,
    id: &str,
    name: &str,
    recipient: Option<&Recipient>,
    data: &[u8],
) -> Result<Written, BackupError> {
    let bytes = Encoder::encode(LEVEL, recipient, data);
    Ok(store.put(&format!("{id}/{name}"), &bytes).await?)
}

/// Columns, size and pages of each table, in the snapshot.
async fn plan_tables(
    control: &Client,
    names: &[QualifiedName],
    filters: &[Option<String>],
    block_size: i64,
) -> Result<Vec<Planned>, BackupError> {
    let (schemas, tables) = QualifiedName::split(names);
    let rows = control
        .query(
            "SELECT want.schema, want.name, c.relkind::text, \
                    pg_catalog.pg_relation_size(c.oid), \
                    (SELECT string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) \
                       FROM pg_catalog.pg_attribute a \
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                        AND a.attgenerated = '') \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS want(schema, name, i) \
             JOIN pg_catalog.pg_namespace n ON n.nspname = want.schema \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = want.name \
             ORDER BY want.i",
            &[&schemas, &tables],
        )
        .await
        .map_err(query("failed to read the tables' sizes"))?;
    Ok(rows
        .iter()
        .zip(filters)
        .map(|(r, filter)| {
            let bytes = r.get::<_, i64>(3).max(0) as u64;
            Planned {
                name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                kind: r.get::<_, String>(2).chars().next().unwrap_or('r'),
                columns: r.get::<_, Option<String>>(4).unwrap_or_default(),
                filter: filter.clone(),
                bytes,
                blocks: bytes / block_size.max(1) as u64,
            }
        })
        .collect())
}

/// The data objects: one per table, or page ranges of a large plain table (TID range scans
/// need PostgreSQL 14), largest first so the long ones start early.
fn chunk_tasks(
    planned: &[Planned],
    chunk_bytes: u64,
    server_version_num: i32,
    encrypted: bool,
) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (i, t) in planned.iter().enumerate() {
        let chunks = if t.kind == 'r'
            && t.filter.is_none()
            && server_version_num >= 140_000
            && chunk_bytes > 0
        {
            t.bytes.div_ceil(chunk_bytes).max(1)
        } else {
            1
        };
        if chunks <= 1 || t.blocks < chunks {
            tasks.push(Task {
                table: i,
                object: manifest::data_object_name(i, &t.name.schema, &t.name.name, 0, encrypted),
                pages: None,
                bytes: t.bytes,
            });
            continue;
        }
        let per = t.blocks.div_ceil(chunks);
        for c in 0..chunks {
            let from = c * per;
            let to = if c + 1 == chunks {
                None
            } else {
                Some((c + 1) * per)
            };
            tasks.push(Task {
                table: i,
                object: manifest::data_object_name(
                    i,
                    &t.name.schema,
                    &t.name.name,
                    c as usize,
                    encrypted,
                ),
                pages: Some((from, to)),
                bytes: t.bytes / chunks,
            });
        }
    }
    tasks
}

/// Dumps every task with `jobs` connections in the snapshot; results in task order.
async fn dump_data(
    opts: &BackupOptions,
    store: &Store,
    id: &str,
    snapshot: &str,
    planned: &[Planned],
    tasks: &[Task],
) -> Result<Vec<(Written, Digest)>, BackupError> {
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(tasks[*i].bytes));
    let queue = Arc::new(std::sync::Mutex::new(order.into_iter()));
    let planned = Arc::new(planned.to_vec());
    let tasks_arc = Arc::new(tasks.to_vec());
    let jobs = opts.jobs.clamp(1, tasks.len().max(1));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        let queue = Arc::clone(&queue);
        let planned = Arc::clone(&planned);
        let tasks = Arc::clone(&tasks_arc);
        let store = store.clone();
        let source = opts.source.clone();
        let encrypt_to = opts.encrypt_to.clone();
        let snapshot = snapshot.to_owned();
        let id = id.to_owned();
        workers.spawn(async move {
            let client = source.connect().await?;
            client
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}; {SESSION_SETTINGS}",
                    literal(&snapshot)
                ))
                .await
                .map_err(query("failed to join the backup's snapshot"))?;
            let mut done = Vec::new();
            loop {
                let next = queue.lock().expect("queue lock").next();
                let Some(i) = next else { break };
                let task = &tasks[i];
                let table = &planned[task.table];
                let started = Instant::now();
                let result =
                    dump_object(&client, &store, id.as_str(), table, task, encrypt_to.as_ref())
                        .await?;
                tracing::debug!(object = %task.object, rows = result.1.rows, bytes = result.0.size, elapsed = ?started.elapsed(), "stored");
                done.push((i, result));
            }
            let _ = client.batch_execute("COMMIT").await;
            Ok::<_, BackupError>(done)
        });
    }
    let mut results: Vec<Option<(Written, Digest)>> = vec![None; tasks.len()];
    while let Some(joined) = workers.join_next().await {
        match joined.expect("a dump worker does not panic") {
            Ok(done) => {
                for (i, r) in done {
                    results[i] = Some(r);
                }
            }
            Err(e) => {
                workers.abort_all();
                return Err(e);
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every task ran"))
        .collect())
}

/// Streams one table (or chunk) as a gzip'd (and maybe encrypted) `COPY ... FROM stdin`
/// script into the store.
async fn dump_object(
    client: &Client,
    store: &Store,
    id: &str,
    table: &Planned,
    task: &Task,
    encrypt_to: Option<&Recipient>,
) -> Result<(Written, Digest), BackupError> {
    let qualified = table.name.quoted();
    let select = match (task.pages, &table.filter) {
        (Some((from, to)), _) => {
            let upper = to
                .map(|to| format!(" AND ctid < '({to},0)'::tid"))
                .unwrap_or_default();
            // A zero-column table selects no column: COPY still prints a line per row.
            format!(
                "COPY (SELECT {} FROM ONLY {qualified} WHERE ctid >= '({from},0)'::tid{upper}) TO STDOUT",
                table.columns
            )
        }
        (None, Some(filter)) => format!(
            "COPY (SELECT {} FROM ONLY {qualified} {filter}) TO STDOUT",
            table.columns
        ),
        (None, None) => format!("COPY {qualified}{} TO STDOUT", column_list(&table.columns)),
    };
    let stream = client
        .copy_out(&select)
        .await
        .map_err(|source| {
            let hidden = source
                .as_db_error()
                .is_some_and(|e| e.message().contains("row-level security"));
            BackupError::Query {
                context: if hidden {
                    format!(
                        "failed to read {}: its row-level security would hide rows from this user, so it is not backed up thinned (back up as its owner, a superuser or a role with BYPASSRLS)",
                        table.name
                    )
                } else {
                    format!("failed to read {}", table.name)
                },
                source,
            }
        })?;
    pin_mut!(stream);
    let mut writer = store.writer(&format!("{id}/{}", task.object)).await?;
    let mut encoder = Encoder::new(LEVEL, encrypt_to);
    let mut part = Vec::with_capacity(FLUSH_BYTES * 2);
    encoder.write(
        format!(
            "SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\nCOPY {qualified}{} FROM stdin;\n",
            column_list(&table.columns)
        )
        .as_bytes(),
    );
    let mut digester = Digester::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(query(format!("failed to read {}", table.name)))?;
        digester.update(&chunk);
        encoder.write(&chunk);
        if encoder.pending() >= FLUSH_BYTES {
            encoder.drain(&mut part);
            writer.write(&part).await?;
        }
    }
    encoder.write(b"\\.\n\n");
    let rest = encoder.finish();
    writer.write(&rest).await?;
    let written = writer.finish().await?;
    Ok((written, digester.finish()))
}

/// Streams every large object into the large-objects script (see [`large_objects`]), in the
/// snapshot; `None` when there are none.
async fn dump_large_objects(
    control: &Client,
    store: &Store,
    id: &str,
    encrypt_to: Option<&Recipient>,
) -> Result<Option<(String, Written, Digest)>, BackupError> {
    let listed = large_objects::list(control)
        .await
        .map_err(query("failed to list the large objects"))?;
    if listed.is_empty() {
        return Ok(None);
    }
    let name = manifest::schema_object_name(ObjectKind::LargeObjects, encrypt_to.is_some());
    let mut writer = store.writer(&format!("{id}/{name}")).await?;
    let mut encoder = Encoder::new(LEVEL, encrypt_to);
    let mut part = Vec::with_capacity(FLUSH_BYTES * 2);
    let mut digest = Digest::default();
    encoder.write(large_objects::SCRIPT_HEADER.as_bytes());
    for lo in &listed {
        encoder.write(large_objects::create_line(lo.oid).as_bytes());
        let mut hasher = large_objects::Hasher::new(lo.oid);
        let mut offset = 0i64;
        loop {
            let chunk = large_objects::read_chunk(control, lo.oid, offset)
                .await
                .map_err(query(format!("failed to read large object {}", lo.oid)))?;
            if !chunk.is_empty() {
                hasher.update(&chunk);
                encoder.write(large_objects::put_line(lo.oid, offset, &chunk).as_bytes());
            }
            offset += chunk.len() as i64;
            if encoder.pending() >= FLUSH_BYTES {
                encoder.drain(&mut part);
                writer.write(&part).await?;
            }
            if chunk.len() < large_objects::CHUNK as usize {
                break;
            }
        }
        if let Some(comment) = &lo.comment {
            encoder.write(large_objects::comment_line(lo.oid, comment).as_bytes());
        }
        hasher.finish(&mut digest);
    }
    let rest = encoder.finish();
    writer.write(&rest).await?;
    let written = writer.finish().await?;
    Ok(Some((name, written, digest)))
}

/// `REFRESH MATERIALIZED VIEW` for every materialized view the source has populated, as
/// pg_dump entries (`Type: MATERIALIZED VIEW DATA`, as pg_dump writes them in a dump with
/// data), each after the materialized views it reads (through views too). One that reads an
/// unpopulated one is left unpopulated, as pg_dump does: refreshing it would fail.
async fn refresh_sql(control: &Client) -> Result<String, BackupError> {
    let views = control
        .query(
            "SELECT c.oid, n.nspname, c.relname, c.relispopulated              FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace              WHERE c.relkind = 'm' AND NOT starts_with(n.nspname, 'bite_sync')                AND n.nspname NOT IN ('pg_catalog', 'information_schema')              ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(query("failed to list the materialized views"))?;
    if views.is_empty() {
        return Ok(String::new());
    }
    // (reader, read): relations a view's or materialized view's query reads, followed
    // through plain views, kept where both ends are materialized views.
    let edges = control
        .query(
            "WITH RECURSIVE reads(reader, read) AS (                  SELECT DISTINCT r.ev_class, d.refobjid                    FROM pg_catalog.pg_rewrite r                    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass                     AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass                   WHERE d.refobjid <> r.ev_class),              closure(reader, read) AS (                  SELECT reader, read FROM reads                  UNION                  SELECT c.reader, r.read FROM closure c JOIN reads r ON r.reader = c.read                   JOIN pg_catalog.pg_class v ON v.oid = c.read AND v.relkind = 'v')              SELECT c.reader, c.read FROM closure c                JOIN pg_catalog.pg_class a ON a.oid = c.reader AND a.relkind = 'm'                JOIN pg_catalog.pg_class b ON b.oid = c.read AND b.relkind = 'm'",
            &[],
        )
        .await
        .map_err(query("failed to read what the materialized views read"))?;
    let views: Vec<MatView> = views
        .iter()
        .map(|r| MatView {
            oid: r.get(0),
            name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            populated: r.get(3),
        })
        .collect();
    let edges: Vec<(u32, u32)> = edges.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut sql = String::new();
    for view in refresh_order(&views, &edges) {
        sql.push_str(&format!(
            "--\n-- Name: {}; Type: MATERIALIZED VIEW DATA; Schema: {}; Owner: -\n--\n\nREFRESH MATERIALIZED VIEW {};\n\n",
            view.name.name,
            view.name.schema,
            view.name.quoted()
        ));
    }
    Ok(sql)
}

/// A materialized view of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MatView {
    oid: u32,
    name: QualifiedName,
    populated: bool,
}

/// The populated views to refresh, each after those it reads (`edges`: (reader, read)); a
/// view that reads one left unpopulated stays unpopulated; a cycle (which PostgreSQL does not
/// allow) ends the ordering rather than looping.
fn refresh_order<'a>(views: &'a [MatView], edges: &[(u32, u32)]) -> Vec<&'a MatView> {
    let mut done: Vec<u32> = Vec::new();
    let mut skipped: Vec<u32> = views
        .iter()
        .filter(|v| !v.populated)
        .map(|v| v.oid)
        .collect();
    let mut order = Vec::new();
    let reads = |v: u32| edges.iter().filter(move |(r, _)| *r == v).map(|(_, x)| *x);
    loop {
        let mut progressed = false;
        for v in views {
            if done.contains(&v.oid) || skipped.contains(&v.oid) {
                continue;
            }
            if reads(v.oid).any(|x| skipped.contains(&x)) {
                skipped.push(v.oid);
                progressed = true;
            } else if reads(v.oid).all(|x| done.contains(&x) || x == v.oid) {
                done.push(v.oid);
                order.push(v);
                progressed = true;
            }
        }
        if !progressed {
            return order;
        }
    }
}

/// ` (a, b)` for COPY, or nothing for a zero-column table (`COPY t () ...` is a syntax error;
/// `COPY t ...` reads and writes one empty line per row).
pub(crate) fn column_list(columns: &str) -> String {
    if columns.is_empty() {
        String::new()
    } else {
        format!(" ({columns})")
    }
}

/// `setval` for the sequences a restore needs at their current positions.
async fn sequences_sql(
    control: &Client,
    names: &[QualifiedName],
    whole_database: bool,
) -> Result<String, BackupError> {
    let (schemas, tables) = QualifiedName::split(names);
    // Whole database: every sequence outside the system schemas; --tables: those the
    // tables' columns use (serial, identity, hand-made nextval defaults).
    let rows = control
        .query(
            "SELECT s.schemaname, s.sequencename \
             FROM pg_catalog.pg_sequences s \
             WHERE NOT starts_with(s.schemaname, 'bite_sync') \
               AND ($3 OR EXISTS ( \
                 SELECT 1 FROM unnest($1::text[], $2::text[]) AS want(schema, name) \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = want.schema \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = want.name \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 \
                 WHERE pg_catalog.pg_get_serial_sequence(pg_catalog.format('%I.%I', n.nspname, c.relname), a.attname) \
                       = pg_catalog.format('%I.%I', s.schemaname, s.sequencename) \
                    OR pg_catalog.pg_get_expr(( \
                         SELECT d.adbin FROM pg_catalog.pg_attrdef d \
                          WHERE d.adrelid = c.oid AND d.adnum = a.attnum), c.oid) \
                       LIKE '%' || pg_catalog.format('%I.%I', s.schemaname, s.sequencename) || '%')) \
             ORDER BY 1, 2",
            &[&schemas, &tables, &whole_database],
        )
        .await
        .map_err(query("failed to read the sequences"))?;
    let names: Vec<QualifiedName> = rows
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let mut sql = String::from("SET client_encoding = 'UTF8';\n");
    // Each sequence's own row: `pg_sequences` has no last value for one set with
    // `setval(..., false)` (or never used), which must come back the same.
    for names in names.chunks(500) {
        let read = names
            .iter()
            .map(|n| {
                format!(
                    "SELECT {}, last_value, is_called FROM {}",
                    literal(&n.quoted()),
                    n.quoted()
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        for r in control
            .query(&read, &[])
            .await
            .map_err(query("failed to read the sequences' positions"))?
        {
            let (name, value, called): (String, i64, bool) = (r.get(0), r.get(1), r.get(2));
            sql.push_str(&format!(
                "SELECT pg_catalog.setval({}, {value}, {called});\n",
                literal(&name)
            ));
        }
    }
    Ok(sql)
}

/// Each table's schema, generated from the catalog (read one table at a time, so each gets
/// exactly the types and sequences it uses): what a `--tables` backup restores with, and what
/// `restore --tables` picks from any backup.
async fn table_ddls(
    control: &Client,
    names: &[QualifiedName],
) -> Result<Vec<TableDdl>, BackupError> {
    use crate::sync::ddl;
    let search_path = catalog::search_path(control)
        .await
        .map_err(query("failed to read the search_path".to_string()))?;
    let mut out = Vec::new();
    for name in names {
        let mut cat = catalog::read_tables(control, std::slice::from_ref(name))
            .await
            .map_err(query(format!("failed to read the definition of {name}")))?;
        catalog::read_needs(control, &mut cat, &search_path)
            .await
            .map_err(query(format!("failed to read what {name} needs")))?;
        let Some(def) = cat.tables.get(name) else {
            continue;
        };
        let tree = partition_info(control, name).await?;
        let mut schemas: Vec<String> = vec![name.schema.clone()];
        schemas.extend(cat.types.iter().map(|t| t.name().schema.clone()));
        schemas.sort();
        schemas.dedup();
        let mut keys = Vec::new();
        // Keys and indexes a partition has from its partitioned table come with the
        // partitioned table's own.
        for c in def
            .constraints
            .iter()
            .filter(|c| c.kind != 'c' || ddl::is_not_valid(c))
            .filter(|c| !tree.inherited.contains(&c.name))
        {
            keys.push(format!(
                "--\n-- Name: {}; Type: CONSTRAINT; Schema: {}; Owner: -\n--\n{};\n",
                c.name,
                name.schema,
                ddl::add_key(name, c)
            ));
        }
        for i in def
            .indexes
            .iter()
            .filter(|i| !tree.inherited.contains(&i.name))
        {
            keys.push(format!(
                "--\n-- Name: {}; Type: INDEX; Schema: {}; Owner: -\n--\n{};\n",
                i.name,
                name.schema,
                ddl::create_index(name, i)
            ));
        }
        out.push(TableDdl {
            name: name.quoted(),
            schemas,
            // A type already there (restoring some tables into a database that has them).
            types: cat
                .types
                .iter()
                .filter_map(ddl::create_type)
                .map(|sql| {
                    format!(
                        "DO $bite_sync$ BEGIN {sql}; EXCEPTION WHEN duplicate_object THEN NULL; END $bite_sync$;\n"
                    )
                })
                .collect(),
            sequences: cat
                .sequences
                .iter()
                .map(|s| (s.name.quoted(), format!("{};\n", ddl::create_sequence(s))))
                .collect(),
            create: tree.create(&ddl::create_table(def, name), name),
            keys,
            foreign_keys: def
                .foreign_keys
                .iter()
                .filter(|fk| !tree.inherited.contains(&fk.name))
                .map(|fk| ForeignKeyDdl {
                    references: fk.referenced.quoted(),
                    sql: format!(
                        "--\n-- Name: {}; Type: FK CONSTRAINT; Schema: {}; Owner: -\n--\n{};\n",
                        fk.name,
                        name.schema,
                        ddl::add_foreign_key(name, fk, &fk.referenced)
                    ),
                })
                .collect(),
        });
    }
    Ok(out)
}

/// Where a table stands in a partition tree, for its generated schema.
#[derive(Debug, Default)]
struct PartitionInfo {
    /// Its partitioned table (quoted) and bound (`FOR VALUES ...`, `DEFAULT`).
    attach_to: Option<(String, String)>,
    /// Its constraints and indexes that come from its partitioned table's.
    inherited: Vec<String>,
}

impl PartitionInfo {
    /// `CREATE TABLE` as generated (partitioned as on the source: the catalog's definition
    /// carries the partition key), then attached as on the source (pg_dump too creates a
    /// partition as a table, then attaches it).
    fn create(&self, create_table: &str, name: &QualifiedName) -> String {
        let mut sql = create_table.to_owned();
        sql.push_str(";\n");
        if let Some((parent, bound)) = &self.attach_to {
            sql.push_str(&format!(
                "ALTER TABLE ONLY {parent} ATTACH PARTITION {} {bound};\n",
                name.quoted()
            ));
        }
        sql
    }
}

async fn partition_info(
    control: &Client,
    name: &QualifiedName,
) -> Result<PartitionInfo, BackupError> {
    let row = control
        .query_one(
            "SELECT (SELECT pg_catalog.format('%I.%I', pn.nspname, p.relname) \
                       FROM pg_catalog.pg_inherits i \
                       JOIN pg_catalog.pg_class p ON p.oid = i.inhparent \
                       JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace \
                      WHERE c.relispartition AND i.inhrelid = c.oid), \
                    CASE WHEN c.relispartition THEN pg_catalog.pg_get_expr(c.relpartbound, c.oid) END, \
                    ARRAY(SELECT k.conname::text FROM pg_catalog.pg_constraint k \
                           WHERE k.conrelid = c.oid AND k.conparentid <> 0 \
                          UNION ALL \
                          SELECT ic.relname::text FROM pg_catalog.pg_index x \
                            JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid \
                           WHERE x.indrelid = c.oid AND ic.relispartition) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(query(format!("failed to read the partitioning of {name}")))?;
    Ok(PartitionInfo {
        attach_to: row
            .get::<_, Option<String>>(0)
            .zip(row.get::<_, Option<String>>(1)),
        inherited: row.get(2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(oid: u32, name: &str, populated: bool) -> MatView {
        MatView {
            oid,
            name: QualifiedName::new("public", name),
            populated,
        }
    }

    #[test]
    fn materialized_views_refresh_after_what_they_read_and_not_over_empty_ones() {
        // a reads c (maybe through a view), b is empty, d reads b, e reads d.
        let views = [
            view(1, "a", true),
            view(2, "b", false),
            view(3, "c", true),
            view(4, "d", true),
            view(5, "e", true),
        ];
        let edges = [(1, 3), (4, 2), (5, 4)];
        let order: Vec<&str> = refresh_order(&views, &edges)
            .iter()
            .map(|v| v.name.name.as_str())
            .collect();
        assert_eq!(order, ["c", "a"]);
        // A cycle ends the ordering instead of looping.
        let order = refresh_order(&views[..1], &[(1, 3), (3, 1)]);
        assert!(order.is_empty());
    }

    #[test]
    fn zero_column_tables_copy_without_a_column_list() {
        assert_eq!(column_list(""), "");
        assert_eq!(column_list("\"a\", \"b\""), " (\"a\", \"b\")");
    }
}
