//! The swap: the one short mirror transaction in which every staged table of a run replaces
//! its mirror table.
//!
//! Until this transaction commits, readers of the mirror see the old tables, whole; after it,
//! they see the new ones, all of them at once. If the process dies before the commit the
//! transaction never happened: the old tables are untouched and the next run drops the staging
//! schemas left behind.
//!
//! What a mirror table carries that the source does not describe is carried over: privileges
//! granted on it, triggers, and foreign keys from other mirror tables that point at it (those
//! are re-added `NOT VALID` here, to keep the transaction short, and validated after commit by
//! [`validate_foreign_keys`]).

use std::time::Duration;

use tokio_postgres::{Client, error::SqlState};

use crate::pg::ident::{QualifiedName, literal, quote};

/// One table's part in the swap.
#[derive(Debug, Clone)]
pub struct SwapTable {
    /// The table's name on the mirror.
    pub target: QualifiedName,
    /// Where its new version was built, if it was (`None`: only columns are added).
    pub staged: Option<QualifiedName>,
    /// Whether a table of that name exists on the mirror now and is replaced.
    pub replaces_existing: bool,
    /// Its partitions, when it is built partitioned: (where built, final name). Each moves
    /// into place on its own; the old table's partitions go with the old table.
    pub partitions: Vec<(QualifiedName, QualifiedName)>,
    /// `ALTER TABLE ... ADD COLUMN` statements (schema-only runs).
    pub add_columns: Vec<String>,
    /// Sequences the source says this table's (or its partitions') columns own:
    /// (sequence, table, column).
    pub owned_sequences: Vec<(QualifiedName, QualifiedName, String)>,
}

/// A foreign key from a table outside the run that was re-added `NOT VALID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepointedKey {
    /// The referencing table.
    pub table: QualifiedName,
    /// The constraint.
    pub name: String,
}

/// A foreign key from a run table to a mirror table outside the run, added `NOT VALID` by the
/// swap once the run table is in place.
#[derive(Debug, Clone)]
pub struct OutsideKey {
    /// Which key.
    pub key: RepointedKey,
    /// `ALTER TABLE ... ADD CONSTRAINT ... FOREIGN KEY ... NOT VALID` naming the final tables.
    pub statement: String,
}

/// What the swap did besides moving tables.
#[derive(Debug, Clone, Default)]
pub struct SwapOutcome {
    /// Foreign keys added `NOT VALID`, to validate after commit.
    pub repointed: Vec<RepointedKey>,
}

/// Everything one swap does.
#[derive(Debug, Clone)]
pub struct SwapPlan {
    /// The run's tables.
    pub tables: Vec<SwapTable>,
    /// Staging schemas, dropped by the swap once empty.
    pub staging_schemas: Vec<String>,
    /// Keys from run tables to mirror tables outside the run.
    pub outside_keys: Vec<OutsideKey>,
    /// How long each attempt waits for readers' locks.
    pub lock_timeout: Duration,
    /// Statements that record the run, committed with the swap.
    pub finish: Vec<String>,
}

/// How often the swap is retried when it cannot take its locks within the lock timeout.
const SWAP_ATTEMPTS: u32 = 3;

/// Runs the swap transaction, retrying when the locks cannot be had in time (long-running
/// readers).
pub async fn swap(
    mirror: &mut Client,
    plan: &SwapPlan,
) -> Result<SwapOutcome, tokio_postgres::Error> {
    let mut attempt = 1;
    loop {
        match swap_once(mirror, plan).await {
            Err(e)
                if attempt < SWAP_ATTEMPTS && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) =>
            {
                tracing::warn!(
                    attempt,
                    "could not lock the mirror tables within {:?}: readers hold them; retrying",
                    plan.lock_timeout
                );
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn swap_once(
    mirror: &mut Client,
    plan: &SwapPlan,
) -> Result<SwapOutcome, tokio_postgres::Error> {
    let SwapPlan {
        tables,
        staging_schemas,
        outside_keys,
        lock_timeout,
        finish,
    } = plan;
    let tx = mirror.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        literal(&format!("{}ms", lock_timeout.as_millis()))
    ))
    .await?;

    let replaced: Vec<&SwapTable> = tables
        .iter()
        .filter(|t| t.replaces_existing && t.staged.is_some())
        .collect();
    let mut outcome = SwapOutcome::default();
    let mut after_move: Vec<String> = Vec::new();

    if !replaced.is_empty() {
        let names = replaced
            .iter()
            .map(|t| t.target.quoted())
            .collect::<Vec<_>>()
            .join(", ");
        tx.batch_execute(&format!("LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE"))
            .await?;
        let schemas: Vec<&str> = replaced.iter().map(|t| t.target.schema.as_str()).collect();
        let rels: Vec<&str> = replaced.iter().map(|t| t.target.name.as_str()).collect();
        let old = "SELECT c.oid FROM unnest($1::text[], $2::text[]) AS w(s, r) \
                   JOIN pg_catalog.pg_namespace n ON n.nspname = w.s \
                   JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.r";

        // Foreign keys from tables outside this run: drop now, re-add once the new table is
        // in place.
        let inbound = tx
            .query(
                &format!(
                    "WITH old AS ({old}), \
                          old_tree AS (SELECT oid AS relid FROM old UNION SELECT t.relid FROM old, pg_catalog.pg_partition_tree(old.oid) t) \
                     SELECT n.nspname, c.relname, con.conname, pg_catalog.pg_get_constraintdef(con.oid) \
                     FROM pg_catalog.pg_constraint con \
                     JOIN pg_catalog.pg_class c ON c.oid = con.conrelid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE con.contype = 'f' AND con.confrelid IN (SELECT relid FROM old_tree) \
                       AND con.conrelid NOT IN (SELECT relid FROM old_tree) \
                       AND con.conparentid = 0"
                ),
                &[&schemas, &rels],
            )
            .await?;
        for r in &inbound {
            let table = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let name: String = r.get(2);
            let definition: String = r.get(3);
            tx.batch_execute(&format!(
                "ALTER TABLE {} DROP CONSTRAINT {}",
                table.quoted(),
                quote(&name)
            ))
            .await?;
            let definition = definition.trim_end_matches(" NOT VALID");
            after_move.push(format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {definition} NOT VALID",
                table.quoted(),
                quote(&name)
            ));
            outcome.repointed.push(RepointedKey { table, name });
        }

        // Privileges granted on the old tables (other than the owner's own).
        let grants = tx
            .query(
                &format!(
                    "WITH old AS ({old}) \
                     SELECT n.nspname, c.relname, \
                            CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END, \
                            a.privilege_type, a.is_grantable \
                     FROM pg_catalog.pg_class c \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a \
                     LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee \
                     WHERE c.oid IN (SELECT oid FROM old) AND a.grantee <> c.relowner"
                ),
                &[&schemas, &rels],
            )
            .await?;
        for r in &grants {
            let table = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let grantee: String = r.get(2);
            let privilege: String = r.get(3);
            let grantable: bool = r.get(4);
            after_move.push(format!(
                "GRANT {privilege} ON TABLE {} TO {grantee}{}",
                table.quoted(),
                if grantable { " WITH GRANT OPTION" } else { "" }
            ));
        }

        // User triggers: pg_get_triggerdef names the table by its qualified name, which the
        // new table takes over.
        let triggers = tx
            .query(
                &format!(
                    "WITH old AS ({old}) \
                     SELECT pg_catalog.pg_get_triggerdef(t.oid) FROM pg_catalog.pg_trigger t \
                     WHERE t.tgrelid IN (SELECT oid FROM old) AND NOT t.tgisinternal"
                ),
                &[&schemas, &rels],
            )
            .await?;
        after_move.extend(triggers.iter().map(|r| r.get::<_, String>(0)));

        // Sequences the old tables (or their partitions) own would be dropped with them, but
        // column defaults of the new tables call them.
        let owned = tx
            .query(
                &format!(
                    "WITH old AS ({old}), \
                          old_tree AS (SELECT oid AS relid FROM old UNION SELECT t.relid FROM old, pg_catalog.pg_partition_tree(old.oid) t) \
                     SELECT n.nspname, s.relname FROM pg_catalog.pg_depend d \
                     JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
                     JOIN pg_catalog.pg_namespace n ON n.oid = s.relnamespace \
                     WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.deptype = 'a' \
                       AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                       AND d.refobjid IN (SELECT relid FROM old_tree)"
                ),
                &[&schemas, &rels],
            )
            .await?;
        for r in &owned {
            let seq = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            tx.batch_execute(&format!("ALTER SEQUENCE {} OWNED BY NONE", seq.quoted()))
                .await?;
        }

        tx.batch_execute(&format!("DROP TABLE {names}")).await?;
    }

    for table in tables {
        if let Some(staged) = &table.staged {
            let moves = std::iter::once((staged, &table.target)).chain(
                table
                    .partitions
                    .iter()
                    .map(|(staged, target)| (staged, target)),
            );
            for (staged, target) in moves {
                tx.batch_execute(&format!(
                    "ALTER TABLE {} SET SCHEMA {}",
                    staged.quoted(),
                    quote(&target.schema)
                ))
                .await?;
            }
        }
        for statement in &table.add_columns {
            tx.batch_execute(statement).await?;
        }
        for (seq, owner, column) in &table.owned_sequences {
            tx.batch_execute(&format!(
                "ALTER SEQUENCE {} OWNED BY {}.{}",
                seq.quoted(),
                owner.quoted(),
                quote(column)
            ))
            .await?;
        }
    }
    for key in outside_keys {
        after_move.push(key.statement.clone());
        outcome.repointed.push(key.key.clone());
    }
    for statement in after_move.iter().chain(finish) {
        tx.batch_execute(statement).await?;
    }
    for schema in staging_schemas {
        tx.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(schema)))
            .await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Validates foreign keys re-added `NOT VALID` by the swap. Validation takes only a lock that
/// lets readers and writers go on. Returns the keys the new data violates (they stay
/// `NOT VALID`: still enforced for new rows).
pub async fn validate_foreign_keys(
    mirror: &Client,
    keys: &[RepointedKey],
) -> Result<Vec<(RepointedKey, String)>, tokio_postgres::Error> {
    let mut violated = Vec::new();
    for key in keys {
        let sql = format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            key.table.quoted(),
            quote(&key.name)
        );
        match mirror.batch_execute(&sql).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                let detail = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_default();
                violated.push((key.clone(), detail));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(violated)
}
