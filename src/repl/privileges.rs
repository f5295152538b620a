//! The privileges each command needs, tested by `bite-sync check` with the real user, schema,
//! table and database names, so that every `FIX` line carries the exact statement to run:
//!
//! | side | needed by | what |
//! |---|---|---|
//! | source | `sync`, `run`, `backup` | `USAGE` on the tables' schemas, `SELECT` on the tables and their sequences |
//! | source | `run` | creating the publication: `CREATE` on the database and ownership of the tables |
//! | mirror | `sync`, `run` | `CREATE` on the database (`bite_sync` and the staging schemas of every sync) |
//! | mirror | `sync`, `run` | ownership of `bite_sync` and its tables, once they exist |
//! | mirror | `sync`, `run` | `USAGE` and `CREATE` on the target schemas (the swap moves tables into them) |
//! | mirror | `sync`, `run` | ownership of the mirror tables a sync replaces |
//!
//! A superuser has all of them. `REPLICATION` on the source is checked by `check` itself. The
//! statements come from [`crate::pg::grants`]; each is run as a superuser or the object's owner.

use tokio_postgres::Client;

use super::check::Check;
use crate::pg::grants;
use crate::pg::ident::QualifiedName;

fn line(side: &'static str, what: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        side,
        what: what.to_string(),
        ok,
        detail: detail.into(),
    }
}

/// Who the server says we are: the user, whether superuser, the database.
async fn whoami(client: &Client) -> Result<(String, bool, String), String> {
    client
        .query_one(
            "SELECT current_user::text, \
                    COALESCE((SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), false), \
                    pg_catalog.current_database()::text",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .map_err(|e| crate::error_chain(&e))
}

fn pairs(rows: &[tokio_postgres::Row]) -> Vec<QualifiedName> {
    rows.iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect()
}

/// The source's privileges for `tables` (already resolved there): reading them (every
/// command) and creating `publication` for them (`bite-sync run`).
pub async fn source(
    client: &Client,
    tables: &[QualifiedName],
    publication: &str,
    out: &mut Vec<Check>,
) {
    let side = "source";
    let (user, superuser, database) = match whoami(client).await {
        Ok(who) => who,
        Err(e) => {
            out.push(line(
                side,
                "read privilege",
                false,
                format!("cannot read the user's privileges: {e}"),
            ));
            return;
        }
    };
    if superuser {
        out.push(line(
            side,
            "read privilege",
            true,
            format!("{user} is a superuser"),
        ));
        out.push(line(
            side,
            "publication",
            true,
            format!("{user} is a superuser, so it can create and change the publication"),
        ));
        return;
    }
    let (schemas, names) = QualifiedName::split(tables);
    let unreadable = async {
        let schemas_without_usage = client
            .query(
                "SELECT DISTINCT n.nspname::text FROM unnest($1::text[]) AS t(schema) \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
                 WHERE NOT pg_catalog.has_schema_privilege(n.oid, 'USAGE') ORDER BY 1",
                &[&schemas],
            )
            .await?;
        let tables_without_select = client
            .query(
                "SELECT n.nspname::text, c.relname::text \
                 FROM unnest($1::text[], $2::text[]) AS t(schema, name) \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.name \
                 WHERE NOT pg_catalog.has_table_privilege(c.oid, 'SELECT') ORDER BY 1, 2",
                &[&schemas, &names],
            )
            .await?;
        // The sequences of serial and identity columns, whose values a sync copies.
        let sequences_without_select = client
            .query(
                "SELECT DISTINCT sn.nspname::text, s.relname::text \
                 FROM unnest($1::text[], $2::text[]) AS t(schema, name) \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.name \
                 JOIN pg_catalog.pg_depend d ON d.refobjid = c.oid \
                      AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                      AND d.classid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i') \
                 JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
                 JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace \
                 WHERE NOT CASE WHEN s.relkind = 'S' \
                            THEN pg_catalog.has_sequence_privilege(s.oid, 'SELECT') ELSE true END \
                 ORDER BY 1, 2",
                &[&schemas, &names],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>((
            schemas_without_usage
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
            pairs(&tables_without_select),
            pairs(&sequences_without_select),
        ))
    }
    .await;
    out.push(match unreadable {
        Ok((schemas, tables, sequences))
            if schemas.is_empty() && tables.is_empty() && sequences.is_empty() =>
        {
            line(side, "read privilege", true, format!("{user} may read every table and its sequences"))
        }
        Ok((schemas, tables, sequences)) => {
            let mut fix: Vec<String> = schemas
                .iter()
                .map(|s| grants::on_schema("USAGE", s, &user))
                .collect();
            if !tables.is_empty() {
                fix.push(grants::select_on_tables(&tables, &user));
            }
            if !sequences.is_empty() {
                fix.push(grants::select_on_sequences(&sequences, &user));
            }
            line(
                side,
                "read privilege",
                false,
                format!(
                    "{user} may not read everything `sync`, `run` and `backup` copy; as a superuser or the owner on the source: {}",
                    fix.join(" ")
                ),
            )
        }
        Err(e) => line(side, "read privilege", false, format!("cannot read the privileges: {}", crate::error_chain(&e))),
    });

    let publication_state = async {
        let not_owned = client
            .query(
                "SELECT n.nspname::text, c.relname::text \
                 FROM unnest($1::text[], $2::text[]) AS t(schema, name) \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.name \
                 WHERE NOT pg_catalog.pg_has_role(c.relowner, 'USAGE') ORDER BY 1, 2",
                &[&schemas, &names],
            )
            .await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = $1), \
                        pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')",
                &[&publication],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>((
            pairs(&not_owned),
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
        ))
    }
    .await;
    out.push(match publication_state {
        Ok((not_owned, exists, create)) => {
            let mut fix = Vec::new();
            if !not_owned.is_empty() {
                fix.push(grants::own_tables(&not_owned, &user));
            }
            if !exists && !create {
                fix.push(grants::create_on_database(&database, &user));
            }
            if fix.is_empty() {
                line(side, "publication", true, format!("{user} owns the tables, so it can create and change the publication {publication}"))
            } else {
                line(
                    side,
                    "publication",
                    false,
                    format!(
                        "`bite-sync run` creates the publication {publication}, which needs {user} to own the tables{}; as a superuser on the source: {}",
                        if !exists && !create { " and to create in the database" } else { "" },
                        fix.join(" ")
                    ),
                )
            }
        }
        Err(e) => line(side, "publication", false, format!("cannot read the owners: {}", crate::error_chain(&e))),
    });
}

/// The mirror's privileges for syncing and replicating `tables` (none when the source could
/// not say which they are): creating schemas, owning `bite_sync`, creating in the target
/// schemas, owning the tables a sync replaces.
pub async fn mirror(client: &Client, tables: Option<&[QualifiedName]>, out: &mut Vec<Check>) {
    let side = "mirror";
    let (user, superuser, database) = match whoami(client).await {
        Ok(who) => who,
        Err(e) => {
            out.push(line(
                side,
                "CREATE privilege",
                false,
                format!("cannot read the user's privileges: {e}"),
            ));
            return;
        }
    };
    if superuser {
        out.push(line(
            side,
            "CREATE privilege",
            true,
            format!("{user} is a superuser: it may create, and own, everything a sync needs"),
        ));
        return;
    }
    let create: Result<bool, _> = client
        .query_one(
            "SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')",
            &[],
        )
        .await
        .map(|r| r.get(0));
    out.push(match create {
        Ok(true) => line(side, "CREATE privilege", true, format!("{user} may create schemas in {database:?} (bite_sync, and the staging schemas of every sync)")),
        Ok(false) => line(
            side,
            "CREATE privilege",
            false,
            format!(
                "{user} may not create schemas in {database:?}, which bite_sync and every sync's staging schemas need; as a superuser or the database's owner on the mirror: {}",
                grants::create_on_database(&database, &user)
            ),
        ),
        Err(e) => line(side, "CREATE privilege", false, format!("cannot read the privilege: {}", crate::error_chain(&e))),
    });

    let bookkeeping = async {
        let schema = client
            .query_opt(
                "SELECT pg_catalog.pg_has_role(nspowner, 'USAGE') FROM pg_catalog.pg_namespace WHERE nspname = 'bite_sync'",
                &[],
            )
            .await?
            .map(|r| r.get::<_, bool>(0));
        let tables = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'bite_sync' AND c.relkind IN ('r', 'p') \
                   AND NOT pg_catalog.pg_has_role(c.relowner, 'USAGE') ORDER BY 2",
                &[],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>((schema, pairs(&tables)))
    }
    .await;
    match bookkeeping {
        Ok((None, _)) => {}
        Ok((Some(true), tables)) if tables.is_empty() => {
            out.push(line(
                side,
                "owns bite_sync",
                true,
                format!("{user} owns the bite_sync schema and its tables"),
            ));
        }
        Ok((owned, tables)) => {
            let mut fix = Vec::new();
            if owned == Some(false) {
                fix.push(grants::own_schema("bite_sync", &user));
            }
            if !tables.is_empty() {
                fix.push(grants::own_tables(&tables, &user));
            }
            out.push(line(
                side,
                "owns bite_sync",
                false,
                format!(
                    "{user} does not own the bookkeeping it writes and migrates; as a superuser on the mirror: {}",
                    fix.join(" ")
                ),
            ));
        }
        Err(e) => out.push(line(
            side,
            "owns bite_sync",
            false,
            format!("cannot read its owner: {}", crate::error_chain(&e)),
        )),
    }

    let Some(tables) = tables else {
        return;
    };
    let (schemas, names) = QualifiedName::split(tables);
    let targets = async {
        let refused = client
            .query(
                "SELECT DISTINCT n.nspname::text FROM unnest($1::text[]) AS t(schema) \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
                 WHERE NOT (pg_catalog.has_schema_privilege(n.oid, 'CREATE') \
                            AND pg_catalog.has_schema_privilege(n.oid, 'USAGE')) ORDER BY 1",
                &[&schemas],
            )
            .await?;
        let not_owned = client
            .query(
                "SELECT n.nspname::text, c.relname::text \
                 FROM unnest($1::text[], $2::text[]) AS t(schema, name) \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.name \
                 WHERE NOT pg_catalog.pg_has_role(c.relowner, 'USAGE') ORDER BY 1, 2",
                &[&schemas, &names],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>((
            refused
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
            pairs(&not_owned),
        ))
    }
    .await;
    match targets {
        Ok((schemas, not_owned)) => {
            out.push(if schemas.is_empty() {
                line(side, "target schemas", true, format!("{user} may create tables in the tables' schemas (or may create them)"))
            } else {
                line(
                    side,
                    "target schemas",
                    false,
                    format!(
                        "the swap moves new tables into {}, which needs {user} to use and create in them; as a superuser or the schema's owner on the mirror: {}",
                        schemas.join(", "),
                        schemas
                            .iter()
                            .map(|s| grants::on_schema("USAGE, CREATE", s, &user))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                )
            });
            out.push(if not_owned.is_empty() {
                line(side, "owns the tables", true, format!("{user} owns every mirror table a sync replaces (or none exists yet)"))
            } else {
                line(
                    side,
                    "owns the tables",
                    false,
                    format!(
                        "a sync replaces {}, which only their owner may; as a superuser on the mirror: {}",
                        not_owned.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        grants::own_tables(&not_owned, &user)
                    ),
                )
            });
        }
        Err(e) => out.push(line(
            side,
            "target schemas",
            false,
            format!("cannot read the privileges: {}", crate::error_chain(&e)),
        )),
    }
}
