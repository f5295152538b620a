//! What `bite-sync run` checks before it changes anything on either side.
//!
//! A first start changes both databases: a publication and a slot on the source, bookkeeping
//! and tables on the mirror. A start that fails halfway would leave a slot pinning WAL on the
//! restaurant's disk and a publication behind, for a reason that was known before it began
//! (`wal_level = replica`, a table without a key, a type the mirror cannot have). So every
//! precondition is read first, all of them, whatever failed before, and the start is refused
//! with the whole list and each fix, having changed nothing. What cannot be known in advance
//! (a connection lost during the copy) is undone instead ([`super::setup`]).
//!
//! The copies are checked by the sync engine itself, in a dry run: the same planning, the same
//! look-ups of what the tables need on the mirror ([`crate::sync::depends`]), so what `run`
//! checks is exactly what its copy would refuse. `bite-sync check` shows the same findings.

use std::sync::Arc;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::daemon::{RunError, RunOptions};
use super::setup::identity_problems;
use crate::pg::connect::DbUrl;
use crate::pg::ident::{QualifiedName, TablePattern, quote};
use crate::sync::{self, SyncError, SyncOptions, catalog, depends};

/// What a start needs of the source's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotsNeeded {
    /// The stream's slot must be created (a first start, or a lost slot).
    pub create_slot: bool,
    /// Tables are copied while the stream's slot exists (a temporary slot and sender).
    pub copy_beside: bool,
}

/// The source's settings and the source user's privilege, as read for [`settings_problems`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSettings {
    /// `wal_level`.
    pub wal_level: String,
    /// `max_replication_slots` and slots in use.
    pub slots: (i32, i32),
    /// `max_wal_senders` and senders in use.
    pub senders: (i32, i32),
    /// The source user, and whether it may open replication connections.
    pub user: (String, bool),
}

/// What is wrong with the source's settings for a start that needs `needed` (pure).
pub fn settings_problems(s: &SourceSettings, needed: SlotsNeeded) -> Vec<String> {
    let mut out = Vec::new();
    if s.wal_level != "logical" {
        out.push(format!(
            "the source's wal_level is {}, and logical replication needs logical: run ALTER SYSTEM SET wal_level = logical on the source and restart PostgreSQL there",
            s.wal_level
        ));
    }
    if !s.user.1 {
        out.push(format!(
            "the source user {} may not open replication connections: ALTER ROLE {} REPLICATION",
            s.user.0,
            quote(&s.user.0)
        ));
    }
    let slots = i32::from(needed.create_slot) + i32::from(needed.copy_beside);
    let (max, used) = s.slots;
    if max - used < slots {
        out.push(format!(
            "the source has max_replication_slots = {max} with {used} in use, and this start needs {slots} more: raise max_replication_slots and restart PostgreSQL there"
        ));
    }
    let (max, used) = s.senders;
    // The stream's own sender, and one more while a table is copied beside it.
    let senders = 1 + i32::from(needed.copy_beside);
    if max - used < senders {
        out.push(format!(
            "the source has max_wal_senders = {max} with {used} in use, and this start needs {senders}: raise max_wal_senders and restart PostgreSQL there"
        ));
    }
    out
}

/// Reads [`SourceSettings`].
pub async fn read_settings(source: &Client) -> Result<SourceSettings, tokio_postgres::Error> {
    let row = source
        .query_one(
            "SELECT pg_catalog.current_setting('wal_level'), \
                    pg_catalog.current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_catalog.pg_replication_slots), \
                    pg_catalog.current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_catalog.pg_stat_replication), \
                    current_user::text, \
                    COALESCE((SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), false)",
            &[],
        )
        .await?;
    Ok(SourceSettings {
        wal_level: row.get(0),
        slots: (row.get(1), row.get(2)),
        senders: (row.get(3), row.get(4)),
        user: (row.get(5), row.get(6)),
    })
}

/// Every reason the start could not go through, read on both sides without changing either;
/// empty when it can. `copies` are the tables the start copies (all of them on a first start).
pub async fn problems(
    opts: &RunOptions,
    source: &Client,
    names: &[QualifiedName],
    copies: &[QualifiedName],
    needed: SlotsNeeded,
    cancel: &CancellationToken,
) -> Result<Vec<String>, RunError> {
    let query = |context: &'static str| {
        move |source| RunError::Query {
            context: context.to_string(),
            source,
        }
    };
    let settings = read_settings(source)
        .await
        .map_err(query("failed to read the source's replication settings"))?;
    let mut out = settings_problems(&settings, needed);
    out.extend(
        identity_problems(source, names)
            .await
            .map_err(query("failed to read the tables' replica identities"))?,
    );
    let encoding: String = source
        .query_one("SELECT pg_catalog.current_setting('server_encoding')", &[])
        .await
        .map_err(query("failed to read the source's encoding"))?
        .get(0);
    if encoding != "UTF8" && encoding != "SQL_ASCII" {
        out.push(format!(
            "the source database's encoding is {encoding}; bite-sync replicates UTF8 databases only"
        ));
    }
    if !copies.is_empty() {
        match check_copies(opts, copies, cancel).await {
            Ok(()) => {}
            Err(e) if e.is_transient() || matches!(e, SyncError::Cancelled) => {
                return Err(RunError::from(e));
            }
            Err(SyncError::MissingDependencies(missing)) => {
                out.extend(missing.iter().map(ToString::to_string));
            }
            Err(e) => out.push(crate::error_chain(&e)),
        }
    }
    Ok(out)
}

/// The sync engine's dry run of the copies: everything it would refuse, and nothing changed.
async fn check_copies(
    opts: &RunOptions,
    names: &[QualifiedName],
    cancel: &CancellationToken,
) -> Result<(), SyncError> {
    let mut dry = copy_options(opts, names);
    dry.dry_run = true;
    sync::sync(&dry, Arc::new(sync::Quiet), cancel.clone())
        .await
        .map(drop)
}

/// The sync options of the daemon's copies of `names`.
pub fn copy_options(opts: &RunOptions, names: &[QualifiedName]) -> SyncOptions {
    let mut sync_opts = SyncOptions::new(opts.source.clone(), opts.mirror.clone());
    sync_opts.tables = names
        .iter()
        .map(|n| TablePattern::Table {
            schema: Some(n.schema.clone()),
            name: n.name.clone(),
        })
        .collect();
    sync_opts.jobs = opts.jobs;
    sync_opts.lock_timeout = opts.lock_timeout;
    sync_opts.maintenance_work_mem = opts.maintenance_work_mem.clone();
    sync_opts.flatten_partitions = opts.flatten_partitions;
    sync_opts.init = true;
    sync_opts.replicating = true;
    sync_opts
}

/// What the mirror lacks of what `tables` need, for `bite-sync check`: what bite-sync
/// creates itself and what it cannot, each with its DDL.
pub async fn missing_dependencies(
    source_url: &DbUrl,
    mirror_url: &DbUrl,
    tables: &[TablePattern],
    flatten_partitions: bool,
) -> Result<Vec<depends::Missing>, String> {
    let chain = |e: &dyn std::error::Error| crate::error_chain(e);
    let (source, mirror) =
        tokio::try_join!(source_url.connect(), mirror_url.connect()).map_err(|e| chain(&e))?;
    let search_path = catalog::search_path(&source).await.map_err(|e| chain(&e))?;
    let all = catalog::list_tables(&source).await.map_err(|e| chain(&e))?;
    let names: Vec<QualifiedName> = sync::plan::resolve(&all, &search_path, tables, &[])
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|e| e.name)
        .collect();
    for client in [&source, &mirror] {
        client
            .batch_execute("SET search_path = ''")
            .await
            .map_err(|e| chain(&e))?;
    }
    let mut cat = catalog::read_tables(&source, &names)
        .await
        .map_err(|e| chain(&e))?;
    if flatten_partitions {
        for def in cat.tables.values_mut() {
            *def = def.clone().flattened();
        }
    }
    catalog::read_needs(&source, &mut cat, &search_path)
        .await
        .map_err(|e| chain(&e))?;
    let plan = depends::plan(&mirror, &cat.needs)
        .await
        .map_err(|e| chain(&e))?;
    Ok(plan.missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> SourceSettings {
        SourceSettings {
            wal_level: "logical".into(),
            slots: (10, 0),
            senders: (10, 0),
            user: ("bite".into(), true),
        }
    }

    const FIRST: SlotsNeeded = SlotsNeeded {
        create_slot: true,
        copy_beside: false,
    };

    #[test]
    fn a_fine_source_has_no_problems() {
        assert!(settings_problems(&fine(), FIRST).is_empty());
    }

    #[test]
    fn every_problem_is_listed_with_its_fix() {
        let s = SourceSettings {
            wal_level: "replica".into(),
            slots: (1, 1),
            senders: (2, 2),
            user: ("shop owner".into(), false),
        };
        let problems = settings_problems(&s, FIRST);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].contains("ALTER SYSTEM SET wal_level = logical"));
        assert!(problems[0].contains("restart PostgreSQL"));
        assert!(problems[1].contains("ALTER ROLE \"shop owner\" REPLICATION"));
        assert!(problems[2].contains("max_replication_slots = 1 with 1 in use"));
        assert!(problems[3].contains("max_wal_senders = 2 with 2 in use"));
    }

    #[test]
    fn a_resumed_stream_needs_no_new_slot() {
        let full = SourceSettings {
            slots: (1, 1),
            ..fine()
        };
        let resume = SlotsNeeded {
            create_slot: false,
            copy_beside: false,
        };
        assert!(settings_problems(&full, resume).is_empty());
        let adding = SlotsNeeded {
            create_slot: false,
            copy_beside: true,
        };
        assert_eq!(settings_problems(&full, adding).len(), 1);
    }
}
