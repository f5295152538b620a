//! `bite-sync restore`, `backups list` and `backups verify`.
//!
//! A restore is all or nothing: it runs in one transaction on one connection (`--clean`'s
//! drops included), in the order of a restore graph: the schema before data, the data objects
//! (and the large objects), indexes and keys, index attachments of partitions, foreign keys,
//! then the rest of the post-data (triggers, publications, materialized views' refresh) and
//! the sequences. Any failure, a connection lost on the way included, rolls it all back and
//! the error says the target is as it was; only a connection lost during the `COMMIT` itself
//! leaves the outcome unknown, and the error says that. Every object's SHA-256 is checked as
//! it streams in; an object whose bytes do not match fails the restore.
//!
//! `backups verify` restores into a scratch database it drops afterwards, where a half-done
//! restore harms no one, so it runs the same graph like `pg_restore --jobs`: on `jobs`
//! connections, a table's indexes while other tables still load, each task committed alone.
//!
//! An encrypted backup (its manifest says `"encryption": "age"`) needs the identity whose
//! recipient the manifest names; that is checked before the target is touched. Each object
//! is then hashed as stored, decrypted, and decompressed, in that order, as it streams.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_compression::tokio::bufread::GzipDecoder;
use bytes::Bytes;
use futures_util::SinkExt;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::crypt::{self, Identity};
use super::digest::{Digest, Digester};
use super::dump::SESSION_SETTINGS;
use super::manifest::{
    Encryption, MANIFEST, Manifest, Object, ObjectKind, Scope, TableDdl, generated_schema,
};
use super::schema::{self, Phase};
use super::store::{Store, StoreError};
use crate::pg::connect::{ConnectError, DbUrl};
use crate::pg::ident::{literal, quote};
use crate::sync::tasks::{Next, Node, Tasks};
use std::collections::HashMap;

/// Why a restore, list or verify failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Could not connect.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A statement failed.
    #[error("{context}: {source}")]
    Query {
        /// What was being done.
        context: String,
        /// The cause.
        source: tokio_postgres::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such backup, or none at all.
    #[error("{0}")]
    NoBackup(String),
    /// The manifest cannot be read.
    #[error("backup {id}: manifest: {reason}")]
    BadManifest {
        /// The backup.
        id: String,
        /// Why.
        reason: String,
    },
    /// An object is not what the manifest says.
    #[error(
        "backup {id}: {object} is corrupt: {reason}; nothing of it was restored (restore another backup, e.g. an earlier id from `bite-sync backups list`)"
    )]
    Corrupt {
        /// The backup.
        id: String,
        /// The object.
        object: String,
        /// What differs.
        reason: String,
    },
    /// The backup is encrypted and no identity was given.
    #[error(
        "backup {id} is encrypted (age, to {recipient}): give its identity with backup.identity_file in bite-sync.toml or the {env} environment variable",
        env = crypt::IDENTITY_ENV
    )]
    NoIdentity {
        /// The backup.
        id: String,
        /// Whom it was encrypted to.
        recipient: String,
    },
    /// The identity given is not the one the backup was encrypted to.
    #[error(
        "backup {id}: this backup was encrypted to {recipient}, the identity given does not match (its public key is {given})"
    )]
    WrongIdentity {
        /// The backup.
        id: String,
        /// Whom it was encrypted to.
        recipient: String,
        /// The given identity's public key.
        given: String,
    },
    /// The restore failed and its transaction was rolled back: the target is as it was.
    #[error(
        "{}; the target is as it was before the restore (it runs in one transaction, rolled back)",
        crate::error_chain(.0.as_ref())
    )]
    RolledBack(Box<RestoreError>),
    /// The connection was lost while the restore committed.
    #[error(
        "backup {id}: the connection to the target was lost while the restore committed ({source}): either all of it was restored or none of it; look at the target before restoring again (it has the backup's tables, or is as it was)"
    )]
    CommitUnknown {
        /// The backup.
        id: String,
        /// The cause.
        source: tokio_postgres::Error,
    },
    /// The target has tables and `--clean` was not given.
    #[error(
        "the target database {target} is not empty ({tables}); restore into an empty database, or add --clean to drop {what} first"
    )]
    NotEmpty {
        /// The target.
        target: String,
        /// Some of its tables.
        tables: String,
        /// What --clean drops.
        what: String,
    },
}

impl RestoreError {
    /// 3 for what may pass on retry, 4 for a corrupt backup, 2 for a missing or wrong key,
    /// 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RestoreError::RolledBack(inner) => inner.exit_code(),
            RestoreError::CommitUnknown { .. } => 3,
            RestoreError::NoIdentity { .. } | RestoreError::WrongIdentity { .. } => 2,
            RestoreError::Connect(e) if e.is_transient() => 3,
            RestoreError::Query { source, .. } if connection_lost(source) => 3,
            RestoreError::Store(StoreError::S3 { .. } | StoreError::Io { .. }) => 3,
            RestoreError::Corrupt { .. } | RestoreError::BadManifest { .. } => 4,
            _ => 1,
        }
    }
}

/// The connection to the target broke (it closed, or the server ended the session: a restart,
/// an administrator's `pg_terminate_backend`): trying again can help.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code()
            .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"))
}

fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> RestoreError {
    let context = context.into();
    move |source| RestoreError::Query { context, source }
}

/// One backup in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// Its id.
    pub id: String,
    /// `good` (has a manifest) or `incomplete` (never finished: not restorable).
    pub state: &'static str,
    /// Bytes stored.
    pub bytes: u64,
    /// Tables (good backups).
    pub tables: Option<usize>,
    /// Rows (good backups).
    pub rows: Option<u64>,
    /// `database` or the tables (good backups).
    pub scope: Option<String>,
    /// When its snapshot was taken (good backups).
    pub snapshot_time: Option<String>,
    /// The manifest's problem, when it exists but cannot be read.
    pub problem: Option<String>,
    /// What it covers (good backups), for retention.
    #[serde(skip)]
    pub coverage: Option<super::prune::Coverage>,
}

/// Every backup in the store, oldest first; folders without a manifest are `incomplete`.
pub async fn list(store: &Store) -> Result<Vec<Listed>, RestoreError> {
    let objects = store.list("").await?;
    let mut groups: std::collections::BTreeMap<String, (u64, bool)> = Default::default();
    for o in &objects {
        let Some((id, rest)) = o.key.split_once('/') else {
            continue;
        };
        if super::manifest::id_time(id).is_none() {
            continue;
        }
        let entry = groups.entry(id.to_owned()).or_default();
        entry.0 += o.size;
        entry.1 |= rest == MANIFEST;
    }
    let mut out = Vec::new();
    for (id, (bytes, has_manifest)) in groups {
        let mut listed = Listed {
            id: id.clone(),
            state: "incomplete",
            bytes,
            tables: None,
            rows: None,
            scope: None,
            snapshot_time: None,
            problem: None,
            coverage: None,
        };
        if has_manifest {
            match manifest(store, &id).await {
                Ok(m) => {
                    listed.state = "good";
                    listed.tables = Some(m.tables.len());
                    listed.rows = Some(m.rows());
                    listed.scope = Some(match &m.scope {
                        Scope::Database => "database".into(),
                        Scope::Tables(t) => t.join(","),
                    });
                    listed.snapshot_time = Some(m.snapshot.time.clone());
                    listed.coverage = Some(super::prune::Coverage::of(&m.scope));
                }
                Err(e) => listed.problem = Some(e.to_string()),
            }
        }
        out.push(listed);
    }
    Ok(out)
}

/// Reads a backup's manifest.
pub async fn manifest(store: &Store, id: &str) -> Result<Manifest, RestoreError> {
    let data = match store.get(&format!("{id}/{MANIFEST}")).await {
        Ok(data) => data,
        Err(StoreError::NotFound { .. }) => {
            return Err(RestoreError::NoBackup(format!(
                "{}: no backup {id} (or it never finished: it has no manifest); see `bite-sync backups list`",
                store.describe()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let m = Manifest::parse(&data).map_err(|reason| RestoreError::BadManifest {
        id: id.to_owned(),
        reason,
    })?;
    if m.id != id {
        return Err(RestoreError::BadManifest {
            id: id.to_owned(),
            reason: format!("it names backup {}", m.id),
        });
    }
    Ok(m)
}

/// `latest` → the newest good backup's id; any other id as it is.
pub async fn resolve_id(store: &Store, id: &str) -> Result<String, RestoreError> {
    if id != "latest" {
        return Ok(id.to_owned());
    }
    list(store)
        .await?
        .into_iter()
        .rev()
        .find(|b| b.state == "good")
        .map(|b| b.id)
        .ok_or_else(|| {
            RestoreError::NoBackup(format!("{}: no finished backup yet", store.describe()))
        })
}

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The database to restore into.
    pub target: DbUrl,
    /// Drop what is in the way first.
    pub clean: bool,
    /// Parallel connections.
    pub jobs: usize,
    /// Only these tables (empty: everything in the backup).
    pub tables: Vec<crate::pg::ident::TablePattern>,
    /// `maintenance_work_mem` and `work_mem` of the restore's sessions (index builds, and
    /// the joins that check foreign keys), e.g. `256MB`.
    pub work_mem: String,
    /// The key for encrypted backups (`backup.identity_file` / `BITE_BACKUP_IDENTITY`).
    pub identity: Option<Identity>,
}

/// The identity to decrypt `m`'s objects with: `None` for a backup that is not encrypted;
/// an error when it is and the identity is missing or not the one it was encrypted to.
pub fn decryption_key(
    m: &Manifest,
    identity: Option<&Identity>,
) -> Result<Option<Identity>, RestoreError> {
    let Some(Encryption::Age) = m.encryption else {
        return Ok(None);
    };
    let recipient = m
        .recipient
        .clone()
        .unwrap_or_else(|| "an unrecorded recipient".into());
    let Some(identity) = identity else {
        return Err(RestoreError::NoIdentity {
            id: m.id.clone(),
            recipient,
        });
    };
    let given = identity.recipient().to_string();
    if m.recipient.as_ref().is_some_and(|r| *r != given) {
        return Err(RestoreError::WrongIdentity {
            id: m.id.clone(),
            recipient,
            given,
        });
    }
    Ok(Some(identity.clone()))
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The backup.
    pub id: String,
    /// The target (no password).
    pub target: String,
    /// Tables.
    pub tables: usize,
    /// Rows.
    pub rows: u64,
    /// Bytes read from the store.
    pub bytes: u64,
    /// Wall time.
    pub duration_ms: u64,
}

/// How a restore runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// On one connection in one transaction: the target ends restored, or as it was.
    OneTransaction,
    /// On `jobs` connections, each task committed as it is done: into a scratch database
    /// that is dropped after (`backups verify`), where a half-done restore harms nothing.
    Parallel,
}

/// Restores backup `id` into the target, in one transaction: either every object of the
/// backup is in the target, or (on any failure, a lost connection included) the target is left
/// as it was, and the error says so.
pub async fn restore(
    store: &Store,
    id: &str,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    restore_in(store, id, opts, Mode::OneTransaction).await
}

async fn restore_in(
    store: &Store,
    id: &str,
    opts: &RestoreOptions,
    mode: Mode,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let id = resolve_id(store, id).await?;
    let whole = manifest(store, &id).await?;
    // Before the target is touched (--clean drops it).
    let key = decryption_key(&whole, opts.identity.as_ref())?;
    let (m, generated) = if opts.tables.is_empty() {
        (whole, None)
    } else {
        let (m, ddls) = subset(whole, &opts.tables)?;
        let refs: Vec<&TableDdl> = ddls.iter().collect();
        (m, Some(generated_schema(&refs)))
    };
    // The small objects are read (and checked) before the target is touched.
    let (pre, post) = match generated {
        Some(pair) => pair,
        None => (
            read_text(store, &m, ObjectKind::PreData, key.as_ref()).await?,
            read_text(store, &m, ObjectKind::PostData, key.as_ref()).await?,
        ),
    };
    let sequences = sequences_for(
        &m,
        !opts.tables.is_empty(),
        read_text(store, &m, ObjectKind::Sequences, key.as_ref()).await?,
    );
    let control = opts.target.connect().await?;
    let steps = Steps {
        store,
        id: &id,
        m: &m,
        opts,
        key: key.as_ref(),
        pre: &pre,
        post: &post,
        sequences: &sequences,
    };
    match mode {
        Mode::Parallel => steps.run(&control, mode).await?,
        Mode::OneTransaction => {
            control
                .batch_execute(&format!(
                    "BEGIN; {SESSION_SETTINGS}; SET maintenance_work_mem = {mem}; \
                     SET work_mem = {mem}; SET jit = off",
                    mem = literal(&opts.work_mem)
                ))
                .await
                .map_err(query("failed to start the restore's transaction"))?;
            if let Err(e) = steps.run(&control, mode).await {
                // A lost connection has rolled back already; a live one is told to.
                let _ = control.batch_execute("ROLLBACK").await;
                return Err(RestoreError::RolledBack(Box::new(e)));
            }
            match control.batch_execute("COMMIT").await {
                Ok(()) => {}
                // The server answered: it refused the commit and rolled back.
                Err(e) if e.as_db_error().is_some() => {
                    return Err(RestoreError::RolledBack(Box::new(query(format!(
                        "backup {id}: the commit failed"
                    ))(e))));
                }
                Err(e) => return Err(RestoreError::CommitUnknown { id, source: e }),
            }
        }
    }
    tracing::debug!(elapsed = ?started.elapsed(), "restored");
    Ok(RestoreReport {
        id: id.clone(),
        target: opts.target.to_string(),
        tables: m.tables.len(),
        rows: m.rows(),
        bytes: m.size(),
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// The sequences script; for some tables, only the lines of their sequences.
fn sequences_for(m: &Manifest, some_tables: bool, sequences: String) -> String {
    if !some_tables {
        return sequences;
    }
    let wanted: Vec<String> = m
        .tables
        .iter()
        .filter_map(|t| t.ddl.as_ref())
        .chain(m.partitioned.iter().filter_map(|p| p.ddl.as_ref()))
        .flat_map(|d| d.sequences.iter().map(|(name, _)| literal(name)))
        .collect();
    sequences
        .lines()
        .filter(|l| !l.starts_with("SELECT") || wanted.iter().any(|w| l.contains(w.as_str())))
        .flat_map(|l| [l, "\n"])
        .collect()
}

/// What a restore does, in order, on the target.
struct Steps<'a> {
    store: &'a Store,
    id: &'a str,
    m: &'a Manifest,
    opts: &'a RestoreOptions,
    key: Option<&'a Identity>,
    pre: &'a str,
    post: &'a str,
    sequences: &'a str,
}

impl Steps<'_> {
    /// Cleans (or checks) the target, then the schema before data, data, indexes, keys,
    /// foreign keys, the rest of the schema and the sequences.
    async fn run(&self, control: &Client, mode: Mode) -> Result<(), RestoreError> {
        let id = self.id;
        prepare_target(control, self.m, self.opts).await?;
        control
            .batch_execute(&schema::without_meta_commands(self.pre))
            .await
            .map_err(query(format!("backup {id}: the schema (pre-data) failed")))?;
        // Data, indexes and keys, foreign keys: one graph, like pg_restore's, so in parallel
        // a table's indexes are built while other tables still load, and a foreign key is
        // checked once its two tables are indexed. In one transaction the same tasks run in
        // the graph's order (data, indexes, index attachments, foreign keys).
        let (preamble, entries) = schema::split_entries(self.post);
        let nodes = restore_graph(self.m, &entries);
        match mode {
            Mode::Parallel => {
                run_graph(self.opts, self.store, id, self.key, &preamble, nodes).await?;
            }
            Mode::OneTransaction => {
                for node in nodes {
                    run_work(control, self.store, id, self.key, &preamble, node.work).await?;
                }
            }
        }
        let rest: String = entries
            .iter()
            .filter(|e| e.phase == Phase::Rest)
            .map(|e| e.sql.as_str())
            .collect();
        if !rest.is_empty() {
            control
                .batch_execute(&format!("{preamble}{rest}"))
                .await
                .map_err(query(format!("backup {id}: the schema (post-data) failed")))?;
        }
        control
            .batch_execute(self.sequences)
            .await
            .map_err(query(format!("backup {id}: setting the sequences failed")))
    }
}

/// The backup narrowed to the tables `patterns` name: its manifest with only them (scope
/// `Tables`, so only they must be absent from the target), and their generated schema.
fn subset(
    m: Manifest,
    patterns: &[crate::pg::ident::TablePattern],
) -> Result<(Manifest, Vec<TableDdl>), RestoreError> {
    use crate::pg::ident::QualifiedName;
    // Top-level tables by name; a partitioned one stands for its partitions.
    let entries: Vec<crate::sync::catalog::TableEntry> = m
        .tables
        .iter()
        .filter(|t| t.partition_of.is_none())
        .map(|t| QualifiedName::new(&t.schema, &t.name))
        .chain(
            m.partitioned
                .iter()
                .filter(|p| p.partition_of.is_none())
                .map(|p| QualifiedName::new(&p.schema, &p.name)),
        )
        .map(|name| crate::sync::catalog::TableEntry {
            name,
            kind: 'r',
            root: None,
        })
        .collect();
    let selected = crate::sync::plan::resolve(&entries, &["public".to_owned()], patterns, &[])
        .map_err(|e| RestoreError::NoBackup(format!("backup {}: {e}", m.id)))?;
    let chosen = |schema: &str, name: &str, partition_of: &Option<String>| {
        selected.iter().any(|s| {
            (s.name.schema == schema && s.name.name == name)
                || partition_of.as_deref() == Some(s.name.quoted().as_str())
        })
    };
    let mut m = m;
    m.tables
        .retain(|t| chosen(&t.schema, &t.name, &t.partition_of));
    m.partitioned
        .retain(|p| chosen(&p.schema, &p.name, &p.partition_of));
    let no_schema = || {
        RestoreError::NoBackup(format!(
            "backup {}: it was made by a bite-sync without per-table schemas, so it can only be restored whole (drop --tables)",
            m.id
        ))
    };
    // Partitioned tables first, parents before partitions (the manifest keeps that order).
    let mut ddls = Vec::new();
    for d in m
        .partitioned
        .iter()
        .map(|p| &p.ddl)
        .chain(m.tables.iter().map(|t| &t.ddl))
    {
        ddls.push(d.clone().ok_or_else(no_schema)?);
    }
    let keep: std::collections::BTreeSet<&String> =
        m.tables.iter().flat_map(|t| &t.objects).collect();
    m.objects = m
        .objects
        .iter()
        .filter(|o| o.kind == ObjectKind::Sequences || keep.contains(&o.name))
        .cloned()
        .collect();
    m.scope = Scope::Tables(selected.iter().map(|s| s.name.to_string()).collect());
    m.large_objects = None;
    Ok((m, ddls))
}

/// Refuses a target in use, or with `--clean` drops what the backup will create: for a
/// whole-database backup every schema (bite-sync's own bookkeeping aside, which no backup
/// holds) and every object outside schemas that pg_dump writes (publications, event triggers,
/// extensions, foreign-data wrappers and servers, casts, transforms, languages, access
/// methods), the
/// `public` schema coming back as it was (owner, privileges, comment) but empty; for some
/// tables, those tables. Runs in the restore's transaction.
async fn prepare_target(
    control: &Client,
    m: &Manifest,
    opts: &RestoreOptions,
) -> Result<(), RestoreError> {
    let rows = control
        .query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
               AND NOT starts_with(n.nspname, 'bite_sync') \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(query("failed to look at the target database"))?;
    let present: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // For some tables: partitioned ones first, so their partitions go with them.
    let tables: Vec<(&String, &String)> = m
        .partitioned
        .iter()
        .map(|p| (&p.schema, &p.name))
        .chain(m.tables.iter().map(|t| (&t.schema, &t.name)))
        .collect();
    let (in_the_way, what): (Vec<&(String, String)>, String) = match &m.scope {
        Scope::Database => (
            present.iter().collect(),
            "every schema of the target".into(),
        ),
        Scope::Tables(_) => (
            tables
                .iter()
                .filter_map(|(s, n)| present.iter().find(|(ps, pn)| ps == *s && pn == *n))
                .collect(),
            "the backup's tables".into(),
        ),
    };
    if !opts.clean {
        if in_the_way.is_empty() {
            return Ok(());
        }
        let mut names: Vec<String> = in_the_way
            .iter()
            .take(3)
            .map(|(s, n)| format!("{s}.{n}"))
            .collect();
        if in_the_way.len() > 3 {
            names.push(format!("and {} more", in_the_way.len() - 3));
        }
        return Err(RestoreError::NotEmpty {
            target: opts.target.to_string(),
            tables: names.join(", "),
            what,
        });
    }
    let sql = match &m.scope {
        Scope::Database => clean_database_sql(control).await?,
        Scope::Tables(_) => in_the_way
            .iter()
            .map(|(s, n)| format!("DROP TABLE IF EXISTS {}.{} CASCADE;\n", quote(s), quote(n)))
            .collect(),
    };
    control
        .batch_execute(&sql)
        .await
        .map_err(query("failed to clean the target (--clean)"))
}

/// Neither created by an extension (whose `DROP EXTENSION` takes it along) nor part of another
/// object (the casts a range type makes to its multirange go with the type).
const ON_ITS_OWN: &str = "NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
     WHERE d.classid = o.tableoid AND d.objid = o.oid AND d.deptype IN ('e', 'i'))";

/// The statements that empty the target for a whole-database restore (see [`prepare_target`]).
async fn clean_database_sql(control: &Client) -> Result<String, RestoreError> {
    // Event triggers first, so none fires while the rest is dropped. Objects created by
    // PostgreSQL itself (oid below 16384) stay.
    let drops = control
        .query(
            &format!(
                "SELECT format('DROP EVENT TRIGGER IF EXISTS %I CASCADE', o.evtname) \
                   FROM pg_catalog.pg_event_trigger o \
                 UNION ALL SELECT format('DROP PUBLICATION IF EXISTS %I', o.pubname) \
                   FROM pg_catalog.pg_publication o \
                 UNION ALL SELECT format('DROP CAST IF EXISTS (%s AS %s) CASCADE', \
                                         pg_catalog.format_type(o.castsource, NULL), \
                                         pg_catalog.format_type(o.casttarget, NULL)) \
                   FROM pg_catalog.pg_cast o WHERE o.oid >= 16384 AND {ON_ITS_OWN} \
                 UNION ALL SELECT format('DROP TRANSFORM IF EXISTS FOR %s LANGUAGE %I CASCADE', \
                                         pg_catalog.format_type(o.trftype, NULL), l.lanname) \
                   FROM pg_catalog.pg_transform o JOIN pg_catalog.pg_language l ON l.oid = o.trflang \
                  WHERE o.oid >= 16384 AND {ON_ITS_OWN} \
                 UNION ALL SELECT format('DROP ACCESS METHOD IF EXISTS %I CASCADE', o.amname) \
                   FROM pg_catalog.pg_am o WHERE o.oid >= 16384 AND {ON_ITS_OWN} \
                 UNION ALL SELECT format('DROP SERVER IF EXISTS %I CASCADE', o.srvname) \
                   FROM pg_catalog.pg_foreign_server o \
                 UNION ALL SELECT format('DROP FOREIGN DATA WRAPPER IF EXISTS %I CASCADE', o.fdwname) \
                   FROM pg_catalog.pg_foreign_data_wrapper o WHERE {ON_ITS_OWN} \
                 UNION ALL SELECT format('DROP EXTENSION IF EXISTS %I CASCADE', o.extname) \
                   FROM pg_catalog.pg_extension o WHERE o.extname <> 'plpgsql' \
                 UNION ALL SELECT format('DROP LANGUAGE IF EXISTS %I CASCADE', o.lanname) \
                   FROM pg_catalog.pg_language o WHERE o.oid >= 16384 AND {ON_ITS_OWN} \
                 UNION ALL SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', o.nspname) \
                   FROM pg_catalog.pg_namespace o \
                  WHERE o.nspname NOT IN ('pg_catalog', 'information_schema') \
                    AND o.nspname NOT LIKE 'pg_toast%' AND o.nspname NOT LIKE 'pg_temp%' \
                    AND NOT starts_with(o.nspname, 'bite_sync')"
            ),
            &[],
        )
        .await
        .map_err(query("failed to list what --clean drops"))?;
    let mut sql: String = drops
        .iter()
        .map(|r| format!("{};\n", r.get::<_, &str>(0)))
        .collect();
    sql.push_str("SELECT pg_catalog.lo_unlink(m.oid) FROM pg_catalog.pg_largeobject_metadata m;\n");
    // pg_dump expects the public schema a new database has; it comes back as the target had
    // it, empty.
    let public = control
        .query_opt(
            "SELECT pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(n.nspowner)), \
                    pg_catalog.obj_description(n.oid, 'pg_namespace'), \
                    ARRAY(SELECT format('GRANT %s ON SCHEMA public TO %s', a.privilege_type, \
                                        CASE WHEN a.grantee = 0 THEN 'PUBLIC' \
                                             ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END) \
                            FROM pg_catalog.aclexplode(n.nspacl) a WHERE a.grantee <> n.nspowner) \
             FROM pg_catalog.pg_namespace n WHERE n.nspname = 'public'",
            &[],
        )
        .await
        .map_err(query("failed to read the target's public schema"))?;
    if let Some(public) = public {
        sql.push_str(&format!(
            "CREATE SCHEMA public AUTHORIZATION {};\n",
            public.get::<_, &str>(0)
        ));
        if let Some(comment) = public.get::<_, Option<&str>>(1) {
            sql.push_str(&format!(
                "COMMENT ON SCHEMA public IS {};\n",
                literal(comment)
            ));
        }
        for grant in public.get::<_, Vec<String>>(2) {
            sql.push_str(&format!("{grant};\n"));
        }
    }
    Ok(sql)
}

/// One task of a restore.
#[derive(Debug, Clone)]
enum Work {
    /// Load a data object into `table` (quoted) with `columns`.
    Load {
        object: Object,
        table: String,
        columns: String,
    },
    /// A post-data statement.
    Sql(String),
    /// Run a script object (the large objects).
    Script(Object),
}

/// The restore's tasks: every data object; each index or key after its table's data; each
/// foreign key after both its tables' indexes and keys, and after any earlier foreign key on
/// either table (they would wait for each other's locks anyway, holding a worker idle).
/// Entries whose table cannot be told wait for all data, and all indexes.
fn restore_graph(m: &Manifest, entries: &[schema::Entry]) -> Vec<Node<Work>> {
    let index_of: HashMap<(String, String), usize> = m
        .tables
        .iter()
        .enumerate()
        .map(|(i, t)| ((t.schema.clone(), t.name.clone()), i))
        .collect();
    let weight: Vec<u64> = m
        .tables
        .iter()
        .map(|t| {
            t.objects
                .iter()
                .filter_map(|o| m.object(o))
                .map(|o| o.size)
                .sum::<u64>()
                .max(1)
        })
        .collect();
    let mut nodes: Vec<Node<Work>> = Vec::new();
    let mut data_of: Vec<Vec<usize>> = vec![Vec::new(); m.tables.len()];
    for (t, table) in m.tables.iter().enumerate() {
        for name in &table.objects {
            let Some(object) = m.object(name) else {
                continue;
            };
            data_of[t].push(nodes.len());
            nodes.push(Node {
                work: Work::Load {
                    object: object.clone(),
                    table: format!("{}.{}", quote(&table.schema), quote(&table.name)),
                    columns: table.columns.clone(),
                },
                after: Vec::new(),
                cost: object.size,
            });
        }
    }
    // The large objects, beside the tables' data.
    for object in m
        .objects
        .iter()
        .filter(|o| o.kind == ObjectKind::LargeObjects)
    {
        nodes.push(Node {
            work: Work::Script(object.clone()),
            after: Vec::new(),
            cost: object.size,
        });
    }
    let all_data: Vec<usize> = (0..nodes.len()).collect();
    let table_of = |sql: &str| {
        let (target, referenced) = schema::entry_tables(sql);
        (
            target.and_then(|t| index_of.get(&t).copied()),
            referenced.and_then(|r| index_of.get(&r).copied()),
        )
    };
    let mut indexes_of: Vec<Vec<usize>> = vec![Vec::new(); m.tables.len()];
    let mut all_indexes = Vec::new();
    for entry in entries.iter().filter(|e| e.phase == Phase::Indexes) {
        let (target, _) = table_of(&entry.sql);
        let (after, cost) = match target {
            Some(t) => (data_of[t].clone(), weight[t] / 2),
            None => (all_data.clone(), 1),
        };
        if let Some(t) = target {
            indexes_of[t].push(nodes.len());
        }
        all_indexes.push(nodes.len());
        nodes.push(Node {
            work: Work::Sql(entry.sql.clone()),
            after,
            cost,
        });
    }
    let mut attaches = Vec::new();
    for entry in entries.iter().filter(|e| e.phase == Phase::Attach) {
        attaches.push(nodes.len());
        nodes.push(Node {
            work: Work::Sql(entry.sql.clone()),
            after: all_indexes.clone(),
            cost: 1,
        });
    }
    let mut last_fk_of: Vec<Option<usize>> = vec![None; m.tables.len()];
    for entry in entries.iter().filter(|e| e.phase == Phase::ForeignKeys) {
        let (target, referenced) = table_of(&entry.sql);
        let me = nodes.len();
        let (after, cost) = match (target, referenced) {
            (Some(t), Some(r)) => {
                let mut after: Vec<usize> = attaches.clone();
                after.extend(&data_of[t]);
                after.extend(&data_of[r]);
                after.extend(&indexes_of[t]);
                after.extend(&indexes_of[r]);
                after.extend(last_fk_of[t]);
                after.extend(last_fk_of[r]);
                last_fk_of[t] = Some(me);
                last_fk_of[r] = Some(me);
                (after, weight[t] / 2)
            }
            _ => {
                let mut after = all_data.clone();
                after.extend(&all_indexes);
                after.extend(&attaches);
                (after, 1)
            }
        };
        nodes.push(Node {
            work: Work::Sql(entry.sql.clone()),
            after,
            cost,
        });
    }
    nodes
}

/// Runs the graph's tasks on `opts.jobs` connections to the target.
async fn run_graph(
    opts: &RestoreOptions,
    store: &Store,
    id: &str,
    key: Option<&Identity>,
    preamble: &str,
    nodes: Vec<Node<Work>>,
) -> Result<(), RestoreError> {
    if nodes.is_empty() {
        return Ok(());
    }
    let jobs = opts.jobs.clamp(1, nodes.len());
    let tasks = Arc::new(std::sync::Mutex::new(Tasks::new(nodes)));
    let changed = Arc::new(tokio::sync::Notify::new());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        let tasks = Arc::clone(&tasks);
        let changed = Arc::clone(&changed);
        let target = opts.target.clone();
        let work_mem = opts.work_mem.clone();
        let store = store.clone();
        let id = id.to_owned();
        let key = key.cloned();
        let preamble = preamble.to_owned();
        workers.spawn(async move {
            let client = target.connect().await?;
            // As the sync engine's builders: nothing is read before the restore ends, so no
            // commit waits for the disk; indexes sort and foreign keys join in memory; the
            // jobs are the parallelism.
            client
                .batch_execute(&format!(
                    "{SESSION_SETTINGS}; SET synchronous_commit = off; SET maintenance_work_mem = {mem}; \
                     SET work_mem = {mem}; SET jit = off; SET max_parallel_maintenance_workers = 0",
                    mem = crate::pg::ident::literal(&work_mem)
                ))
                .await
                .map_err(query("failed to set up a restore session"))?;
            loop {
                // Registered before looking, so a task finishing in between is not missed.
                let notified = changed.notified();
                let next = tasks.lock().expect("tasks lock").next_task();
                let i = match next {
                    Next::Done => return Ok::<_, RestoreError>(()),
                    Next::Wait => {
                        notified.await;
                        continue;
                    }
                    Next::Run(i) => i,
                };
                let work = tasks.lock().expect("tasks lock").work(i).clone();
                let task_started = Instant::now();
                let what = match &work {
                    Work::Load { object, .. } | Work::Script(object) => object.name.clone(),
                    Work::Sql(sql) => sql.lines().next().unwrap_or_default().to_owned(),
                };
                let result =
                    run_work(&client, &store, &id, key.as_ref(), &preamble, work).await;
                tracing::debug!(task = %what, elapsed = ?task_started.elapsed(), "restore task done");
                let mut t = tasks.lock().expect("tasks lock");
                match result {
                    Ok(()) => t.finished(i),
                    Err(e) => {
                        t.stop(i);
                        drop(t);
                        changed.notify_waiters();
                        return Err(e);
                    }
                }
                drop(t);
                changed.notify_waiters();
            }
        });
    }
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined.expect("a restore worker does not panic") {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs one task of the restore graph on `client`.
async fn run_work(
    client: &Client,
    store: &Store,
    id: &str,
    key: Option<&Identity>,
    preamble: &str,
    work: Work,
) -> Result<(), RestoreError> {
    match work {
        Work::Load {
            object,
            table,
            columns,
        } => load_object(client, store, id, key, &object, &table, &columns).await,
        Work::Sql(sql) => run_with_retry(client, preamble, &sql).await,
        Work::Script(object) => run_script(client, store, id, key, &object).await,
    }
}

/// One post-data statement; a deadlock between two foreign keys added at once is retried.
async fn run_with_retry(client: &Client, preamble: &str, sql: &str) -> Result<(), RestoreError> {
    let mut attempt = 0;
    loop {
        match client.batch_execute(&format!("{preamble}{sql}")).await {
            Ok(()) => return Ok(()),
            Err(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) && attempt < 5 => {
                attempt += 1;
            }
            Err(e) => {
                let first = sql.lines().next().unwrap_or_default().to_owned();
                return Err(query(format!("the schema (post-data) failed at `{first}`"))(e));
            }
        }
    }
}

/// What an object's stored bytes read as, decrypted and decompressed: the text, the SHA-256
/// and size of the stored bytes read so far, and what to call a failure to read it.
type Decoded = (
    BufReader<GzipDecoder<Box<dyn AsyncBufRead + Send + Unpin>>>,
    Arc<std::sync::Mutex<HashState>>,
    &'static str,
);

/// Opens `object` for reading its text as it streams from the store.
async fn open_decoded(
    store: &Store,
    id: &str,
    key: Option<&Identity>,
    object: &Object,
) -> Result<Decoded, RestoreError> {
    let raw = store.reader(&format!("{id}/{}", object.name)).await?;
    let hashing = Hashing::new(raw);
    let state = hashing.state();
    let stored = BufReader::with_capacity(256 * 1024, hashing);
    let (compressed, unreadable): (Box<dyn AsyncBufRead + Send + Unpin>, _) = match key {
        None => (Box::new(stored), "cannot be decompressed"),
        Some(key) => {
            let plain = crypt::decrypting(stored, key)
                .await
                .map_err(|e| decrypt_error(id, &object.name, key, e))?;
            (
                Box::new(BufReader::with_capacity(256 * 1024, plain)),
                "cannot be decrypted or decompressed",
            )
        }
    };
    let mut decoder = GzipDecoder::new(compressed);
    decoder.multiple_members(true);
    Ok((
        BufReader::with_capacity(256 * 1024, decoder),
        state,
        unreadable,
    ))
}

/// Runs the large-objects script, a batch of statements at a time; its last batch runs only
/// once the object's size and SHA-256 match the manifest.
async fn run_script(
    client: &Client,
    store: &Store,
    id: &str,
    key: Option<&Identity>,
    object: &Object,
) -> Result<(), RestoreError> {
    let corrupt = |reason: String| RestoreError::Corrupt {
        id: id.to_owned(),
        object: object.name.clone(),
        reason,
    };
    let (mut text, state, unreadable) = open_decoded(store, id, key, object).await?;
    let mut batch = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = text
            .read_line(&mut line)
            .await
            .map_err(|e| corrupt(format!("{unreadable}: {e}")))?;
        if n == 0 {
            break;
        }
        batch.push_str(&line);
        if batch.len() >= 4 * 1024 * 1024 {
            client
                .batch_execute(&batch)
                .await
                .map_err(query(format!("failed to restore {}", object.name)))?;
            batch.clear();
        }
    }
    let (size, sha) = state.lock().expect("hash lock").clone().finish();
    if size != object.size || sha != object.sha256 {
        return Err(corrupt(format!(
            "{size} bytes with SHA-256 {sha}, the manifest says {} bytes with {}",
            object.size, object.sha256
        )));
    }
    client
        .batch_execute(&batch)
        .await
        .map_err(query(format!("failed to restore {}", object.name)))
}

/// Streams one data object into its table with `COPY`; the copy is committed only if the
/// object's size and SHA-256 match the manifest.
async fn load_object(
    client: &Client,
    store: &Store,
    id: &str,
    key: Option<&Identity>,
    object: &Object,
    table: &str,
    columns: &str,
) -> Result<(), RestoreError> {
    let corrupt = |reason: String| RestoreError::Corrupt {
        id: id.to_owned(),
        object: object.name.clone(),
        reason,
    };
    let (mut text, state, unreadable) = open_decoded(store, id, key, object).await?;
    // The script's header, up to its COPY line.
    let mut line = String::new();
    loop {
        line.clear();
        let n = text
            .read_line(&mut line)
            .await
            .map_err(|e| corrupt(format!("{unreadable}: {e}")))?;
        if n == 0 {
            return Err(corrupt("it ends before its COPY line".into()));
        }
        if line.starts_with("COPY ") {
            break;
        }
    }
    let sink = client
        .copy_in::<_, Bytes>(&format!(
            "COPY {table}{} FROM STDIN",
            super::dump::column_list(columns)
        ))
        .await
        .map_err(query(format!("failed to start loading {table}")))?;
    futures_util::pin_mut!(sink);
    let mut buf = vec![0u8; 256 * 1024];
    // The end marker `\.` and what follows it are held back from the server.
    let mut held: Vec<u8> = Vec::new();
    loop {
        let n = text
            .read(&mut buf)
            .await
            .map_err(|e| corrupt(format!("{unreadable}: {e}")))?;
        if n == 0 {
            break;
        }
        held.extend_from_slice(&buf[..n]);
        // Everything up to the last complete line that is not the end marker can go.
        if held.len() > 64 * 1024
            && let Some(cut) = held.iter().rposition(|b| *b == b'\n')
        {
            let keep = held.split_off(cut + 1);
            let send = std::mem::replace(&mut held, keep);
            if find_end_marker(&send).is_some() {
                // The marker: put it back.
                held = [send, held].concat();
            } else {
                sink.send(Bytes::from(send))
                    .await
                    .map_err(query(format!("failed to load {table}")))?;
            }
        }
    }
    let end = find_end_marker(&held).ok_or_else(|| corrupt("it has no end of data".into()))?;
    held.truncate(end);
    let (size, sha) = state.lock().expect("hash lock").clone().finish();
    if size != object.size || sha != object.sha256 {
        // Dropping the sink aborts the COPY: nothing of this object is committed.
        return Err(corrupt(format!(
            "{size} bytes with SHA-256 {sha}, the manifest says {} bytes with {}",
            object.size, object.sha256
        )));
    }
    if !held.is_empty() {
        sink.send(Bytes::from(held))
            .await
            .map_err(query(format!("failed to load {table}")))?;
    }
    sink.as_mut()
        .finish()
        .await
        .map_err(query(format!("failed to load {table}")))?;
    Ok(())
}

/// Where the `\.` line that ends COPY data starts.
fn find_end_marker(data: &[u8]) -> Option<usize> {
    if data.starts_with(b"\\.\n") {
        return Some(0);
    }
    data.windows(4)
        .rposition(|w| w == b"\n\\.\n")
        .map(|at| at + 1)
}

/// A decryption failure as the restore reports it: another key, or a damaged object.
fn decrypt_error(id: &str, object: &str, key: &Identity, e: crypt::DecryptError) -> RestoreError {
    match e {
        crypt::DecryptError::WrongIdentity => RestoreError::WrongIdentity {
            id: id.to_owned(),
            recipient: "another recipient".into(),
            given: key.recipient().to_string(),
        },
        crypt::DecryptError::Damaged(reason) => RestoreError::Corrupt {
            id: id.to_owned(),
            object: object.to_owned(),
            reason: format!("cannot be decrypted: {reason}"),
        },
    }
}

/// Reads a whole (small) object of `kind`, decrypted and decompressed, after checking its
/// SHA-256.
async fn read_text(
    store: &Store,
    m: &Manifest,
    kind: ObjectKind,
    key: Option<&Identity>,
) -> Result<String, RestoreError> {
    let Some(object) = m.objects.iter().find(|o| o.kind == kind) else {
        return Ok(String::new());
    };
    let data = store.get(&format!("{}/{}", m.id, object.name)).await?;
    let sha = hex::encode(Sha256::digest(&data));
    if sha != object.sha256 || data.len() as u64 != object.size {
        return Err(RestoreError::Corrupt {
            id: m.id.clone(),
            object: object.name.clone(),
            reason: format!(
                "{} bytes with SHA-256 {sha}, the manifest says {} bytes with {}",
                data.len(),
                object.size,
                object.sha256
            ),
        });
    }
    let decrypted;
    let compressed = match key {
        None => &data[..],
        Some(key) => {
            decrypted = crypt::decrypt(&data, key)
                .map_err(|e| decrypt_error(&m.id, &object.name, key, e))?;
            &decrypted[..]
        }
    };
    let mut decoder = GzipDecoder::new(compressed);
    decoder.multiple_members(true);
    let mut text = String::new();
    decoder
        .read_to_string(&mut text)
        .await
        .map_err(|e| RestoreError::Corrupt {
            id: m.id.clone(),
            object: object.name.clone(),
            reason: format!("cannot be decompressed: {e}"),
        })?;
    Ok(text)
}

/// SHA-256 and size of what was read so far.
#[derive(Clone, Default)]
struct HashState {
    sha: Sha256,
    size: u64,
}

impl HashState {
    fn finish(self) -> (u64, String) {
        (self.size, hex::encode(self.sha.finalize()))
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    state: Arc<std::sync::Mutex<HashState>>,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            state: Arc::default(),
        }
    }

    fn state(&self) -> Arc<std::sync::Mutex<HashState>> {
        Arc::clone(&self.state)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let new = &buf.filled()[before..];
            let mut state = self.state.lock().expect("hash lock");
            state.sha.update(new);
            state.size += new.len() as u64;
        }
        poll
    }
}

/// How one table of a verified backup compared.
#[derive(Debug, Clone, Serialize)]
pub struct TableCheck {
    /// `schema.name`.
    pub table: String,
    /// Rows in the manifest.
    pub expected: Digest,
    /// Rows restored.
    pub restored: Digest,
    /// Equal.
    pub ok: bool,
}

/// What `backups verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The backup.
    pub id: String,
    /// Every object's SHA-256 matched and every table restored equal.
    pub ok: bool,
    /// Objects checked.
    pub objects: usize,
    /// Per table.
    pub tables: Vec<TableCheck>,
    /// The scratch database used (dropped afterwards).
    pub scratch_database: String,
    /// Wall time.
    pub duration_ms: u64,
}

/// Restores backup `id` into a scratch database on `server` (any database URL of that server),
/// compares every table's rows and checksum with the manifest, and drops the scratch database.
pub async fn verify(
    store: &Store,
    id: &str,
    server: &DbUrl,
    jobs: usize,
    work_mem: &str,
    identity: Option<&Identity>,
) -> Result<VerifyReport, RestoreError> {
    let started = Instant::now();
    let id = resolve_id(store, id).await?;
    let m = manifest(store, &id).await?;
    // Before a scratch database is made for nothing.
    decryption_key(&m, identity)?;
    // Unique per run: two verifications of one backup may run at once (a schedule and a
    // person); an old one left by a crash has another name and is dropped by hand.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let scratch = format!(
        "bite_sync_verify_{}_{}_{nonce:x}",
        id.to_lowercase().replace('-', "_"),
        std::process::id()
    );
    let admin = server.connect().await?;
    let drop_sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(&scratch));
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'",
            quote(&scratch)
        ))
        .await
        .map_err(query(format!(
            "failed to create the scratch database {scratch} (the user needs CREATEDB)"
        )))?;
    let target = server.with_dbname(&scratch);
    let result = async {
        restore_in(
            store,
            &id,
            &RestoreOptions {
                target: target.clone(),
                clean: false,
                jobs,
                tables: Vec::new(),
                work_mem: work_mem.to_owned(),
                identity: identity.cloned(),
            },
            Mode::Parallel,
        )
        .await?;
        let client = target.connect().await?;
        client
            .batch_execute(SESSION_SETTINGS)
            .await
            .map_err(query("failed to set up the check"))?;
        let mut tables = Vec::new();
        if let Some(expected) = &m.large_objects {
            let restored = super::large_objects::digest(&client)
                .await
                .map_err(query("failed to read the large objects"))?;
            tables.push(TableCheck {
                table: "large objects".into(),
                expected: expected.digest,
                restored,
                ok: restored == expected.digest,
            });
        }
        for t in &m.tables {
            let q = format!("{}.{}", quote(&t.schema), quote(&t.name));
            let restored = digest_table(&client, &q, &t.columns).await?;
            tables.push(TableCheck {
                table: t.display_name(),
                expected: t.digest,
                restored,
                ok: restored == t.digest,
            });
        }
        Ok::<_, RestoreError>(tables)
    }
    .await;
    let _ = admin.batch_execute(&drop_sql).await;
    let tables = result?;
    Ok(VerifyReport {
        id,
        ok: tables.iter().all(|t| t.ok),
        objects: m.objects.len() + 1,
        tables,
        scratch_database: scratch,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// The digest of a table as it is now (the same COPY text a backup hashes).
pub async fn digest_table(
    client: &Client,
    table: &str,
    columns: &str,
) -> Result<Digest, RestoreError> {
    use futures_util::StreamExt;
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT {columns} FROM ONLY {table}) TO STDOUT"
        ))
        .await
        .map_err(query(format!("failed to read {table}")))?;
    futures_util::pin_mut!(stream);
    let mut digester = Digester::new();
    while let Some(chunk) = stream.next().await {
        digester.update(&chunk.map_err(query(format!("failed to read {table}")))?);
    }
    Ok(digester.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::{FORMAT, Snapshot, Source, Table};

    fn table(name: &str, objects: &[&str]) -> Table {
        Table {
            schema: "public".into(),
            name: name.into(),
            columns: "\"id\"".into(),
            digest: Digest::default(),
            objects: objects.iter().map(|o| o.to_string()).collect(),
            ddl: None,
            partition_of: None,
        }
    }

    #[test]
    fn the_restore_graph_orders_data_indexes_and_foreign_keys_per_table() {
        let objects = ["1-a.000", "1-a.001", "1-b.000", "1-c.000"];
        let m = Manifest {
            format: FORMAT,
            id: "20261129T060000Z".into(),
            bite_sync_version: "0".into(),
            started_at: String::new(),
            finished_at: String::new(),
            source: Source {
                system_identifier: String::new(),
                database: String::new(),
                server_version: String::new(),
                server_version_num: 150000,
            },
            snapshot: Snapshot {
                time: String::new(),
                lsn: String::new(),
            },
            scope: Scope::Database,
            compression: "gzip".into(),
            encryption: None,
            recipient: None,
            tables: vec![
                table("a", &objects[..2]),
                table("b", &objects[2..3]),
                table("c", &objects[3..]),
            ],
            partitioned: Vec::new(),
            large_objects: None,
            objects: objects
                .iter()
                .map(|o| Object {
                    name: o.to_string(),
                    kind: ObjectKind::Data,
                    size: 10,
                    sha256: String::new(),
                })
                .collect(),
        };
        let post = "\
--\n-- Name: a a_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\nALTER TABLE ONLY public.a ADD CONSTRAINT a_pkey PRIMARY KEY (id);\n\
--\n-- Name: b_i; Type: INDEX; Schema: public; Owner: -\n--\nCREATE INDEX b_i ON public.b USING btree (id);\n\
--\n-- Name: x; Type: INDEX; Schema: other; Owner: -\n--\nCREATE INDEX x ON other.unknown USING btree (id);\n\
--\n-- Name: b b_a; Type: FK CONSTRAINT; Schema: public; Owner: -\n--\nALTER TABLE ONLY public.b ADD CONSTRAINT b_a FOREIGN KEY (id) REFERENCES public.a(id);\n\
--\n-- Name: c c_a; Type: FK CONSTRAINT; Schema: public; Owner: -\n--\nALTER TABLE ONLY public.c ADD CONSTRAINT c_a FOREIGN KEY (id) REFERENCES public.a(id);\n";
        let (_, entries) = schema::split_entries(post);
        let nodes = restore_graph(&m, &entries);
        assert_eq!(nodes.len(), 4 + 3 + 2);
        let after = |i: usize| {
            let mut a = nodes[i].after.clone();
            a.sort();
            a.dedup();
            a
        };
        // 0, 1: a's chunks; 2: b; 3: c; 4: a_pkey; 5: b_i; 6: unknown; 7: b_a; 8: c_a.
        assert_eq!(after(4), [0, 1], "a's key after a's data");
        assert_eq!(after(5), [2], "b's index after b's data only");
        assert_eq!(
            after(6),
            [0, 1, 2, 3],
            "an unknown table waits for all data"
        );
        assert_eq!(
            after(7),
            [0, 1, 2, 4, 5],
            "b -> a after both tables' data and indexes"
        );
        assert_eq!(
            after(8),
            [0, 1, 3, 4, 7],
            "c -> a also after the other key on a"
        );
    }

    #[test]
    fn the_end_marker_is_found_only_on_its_own_line() {
        assert_eq!(find_end_marker(b"\\.\n"), Some(0));
        assert_eq!(find_end_marker(b"1\ta\n2\tb\n\\.\n\n"), Some(8));
        assert_eq!(find_end_marker(b"1\ta\\.\n"), None);
        assert_eq!(find_end_marker(b"1\ta\n"), None);
    }
}
