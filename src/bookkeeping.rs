//! The `bite_sync` schema on the mirror: versioned migrations and run records.
//!
//! Migrations live in `sql/migrations/NNNN_name.sql`, are compiled into the binary, and are
//! applied in order, each in its own transaction together with its row in
//! `bite_sync.schema_migrations`. A transaction-scoped advisory lock makes concurrent
//! `bite-sync` processes apply each migration exactly once.
//!
//! `bite_sync.schema_migrations` doubles as the mark that a database is a bite-sync mirror:
//! [`is_initialized`] is what the `--init` safety check asks.

use tokio_postgres::Client;

/// One migration compiled into the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version number, from the file name.
    pub version: i32,
    /// Name, from the file name.
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "bookkeeping",
        sql: include_str!("../sql/migrations/0001_bookkeeping.sql"),
    },
    Migration {
        version: 2,
        name: "replication",
        sql: include_str!("../sql/migrations/0002_replication.sql"),
    },
    Migration {
        version: 3,
        name: "schedules",
        sql: include_str!("../sql/migrations/0003_schedules.sql"),
    },
    Migration {
        version: 4,
        name: "alerts",
        sql: include_str!("../sql/migrations/0004_alerts.sql"),
    },
    Migration {
        version: 5,
        name: "relay",
        sql: include_str!("../sql/migrations/0005_relay.sql"),
    },
    Migration {
        version: 6,
        name: "inbox_raw",
        sql: include_str!("../sql/migrations/0006_inbox_raw.sql"),
    },
    Migration {
        version: 7,
        name: "relay_sends",
        sql: include_str!("../sql/migrations/0007_relay_sends.sql"),
    },
];

/// While caught up, `bite-sync run` renews `replication_state.caught_up_at` this often (and
/// at once after applying a batch).
pub const CAUGHT_UP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// A `caught_up_at` younger than this means the mirror is not behind (the relay's health
/// check reports lag 0): three renewals may be missed before it stops meaning that.
pub const CAUGHT_UP_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// Advisory lock key for migrations (any constant shared by all bite-sync processes).
const MIGRATION_LOCK: i64 = 0x6269_7465_0001;

/// A migration failed.
#[derive(Debug, thiserror::Error)]
pub enum BookkeepingError {
    /// Running SQL failed.
    #[error("{context}")]
    Query {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The mirror was set up by a newer bite-sync.
    #[error(
        "the mirror's bite_sync schema is at version {found}, newer than this bite-sync knows ({known}): upgrade bite-sync"
    )]
    TooNew {
        /// The mirror's version.
        found: i32,
        /// Ours.
        known: i32,
    },
}

fn query_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BookkeepingError {
    let context = context.into();
    move |source| BookkeepingError::Query { context, source }
}

/// Whether the database carries bite-sync bookkeeping.
pub async fn is_initialized(client: &Client) -> Result<bool, BookkeepingError> {
    let row = client
        .query_one(
            "SELECT pg_catalog.to_regclass('bite_sync.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(query_err("failed to look for the bite_sync schema"))?;
    Ok(row.get(0))
}

/// Creates or upgrades the `bite_sync` schema; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, BookkeepingError> {
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let tx = client
            .transaction()
            .await
            .map_err(query_err("failed to start a migration transaction"))?;
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1)",
            &[&MIGRATION_LOCK],
        )
        .await
        .map_err(query_err("failed to take the migration lock"))?;
        tx.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS bite_sync; \
             CREATE TABLE IF NOT EXISTS bite_sync.schema_migrations ( \
                 version integer PRIMARY KEY, \
                 name text NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(query_err("failed to create the bite_sync schema"))?;
        let current: i32 = tx
            .query_one(
                "SELECT COALESCE(max(version), 0) FROM bite_sync.schema_migrations",
                &[],
            )
            .await
            .map_err(query_err("failed to read the bite_sync schema version"))?
            .get(0);
        if current > known {
            return Err(BookkeepingError::TooNew {
                found: current,
                known,
            });
        }
        if current >= migration.version {
            continue;
        }
        tx.batch_execute(migration.sql)
            .await
            .map_err(query_err(format!(
                "failed to apply migration {:04}_{}",
                migration.version, migration.name
            )))?;
        tx.execute(
            "INSERT INTO bite_sync.schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(query_err("failed to record the migration"))?;
        tx.commit()
            .await
            .map_err(query_err("failed to commit the migration"))?;
        applied.push(migration.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "migration {} out of order", m.name);
            assert!(!m.sql.trim().is_empty());
        }
    }

    #[test]
    fn every_migration_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("sql/migrations is readable")
            .map(|e| {
                e.expect("directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(
            files, listed,
            "a file in sql/migrations is not in MIGRATIONS"
        );
    }
}
