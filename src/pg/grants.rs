//! The statements that give a database user a privilege bite-sync needs, with the real user,
//! schema, table and database names, quoted: what `bite-sync check` prints for each missing
//! privilege, and what a `permission denied` from `sync` or `run` tells the user to run.
//!
//! Everything here is pure: the checks that find what is missing are in `repl::privileges`.
//! PostgreSQL names the object it refused in its message (`permission denied for table
//! orders`, `must be owner of table orders`, `permission denied for database railway`); that is
//! read in English, the server default. A message in another language gets the general advice
//! for the side, still with the user's and the database's names.

use crate::pg::connect::{DbUrl, Role};
use crate::pg::ident::{QualifiedName, quote};

/// `GRANT CREATE ON DATABASE "railway" TO "bite";`
pub fn create_on_database(database: &str, user: &str) -> String {
    format!(
        "GRANT CREATE ON DATABASE {} TO {};",
        quote(database),
        quote(user)
    )
}

/// `GRANT USAGE, CREATE ON SCHEMA "public" TO "bite";` (`privileges` as written).
pub fn on_schema(privileges: &str, schema: &str, user: &str) -> String {
    format!(
        "GRANT {privileges} ON SCHEMA {} TO {};",
        quote(schema),
        quote(user)
    )
}

/// `GRANT SELECT ON TABLE "public"."a", "public"."b" TO "bite";`
pub fn select_on_tables(tables: &[QualifiedName], user: &str) -> String {
    format!(
        "GRANT SELECT ON TABLE {} TO {};",
        names(tables),
        quote(user)
    )
}

/// `GRANT SELECT ON SEQUENCE "public"."a_id_seq" TO "bite";`
pub fn select_on_sequences(sequences: &[QualifiedName], user: &str) -> String {
    format!(
        "GRANT SELECT ON SEQUENCE {} TO {};",
        names(sequences),
        quote(user)
    )
}

/// `ALTER TABLE "public"."orders" OWNER TO "bite";`, one per table (PostgreSQL changes one
/// owner per statement; a table's own sequences follow it).
pub fn own_tables(tables: &[QualifiedName], user: &str) -> String {
    tables
        .iter()
        .map(|t| format!("ALTER TABLE {} OWNER TO {};", t.quoted(), quote(user)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ALTER SCHEMA "bite_sync" OWNER TO "bite";`
pub fn own_schema(schema: &str, user: &str) -> String {
    format!("ALTER SCHEMA {} OWNER TO {};", quote(schema), quote(user))
}

fn names(list: &[QualifiedName]) -> String {
    list.iter()
        .map(QualifiedName::quoted)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What to run (as a superuser or the object's owner, on `role`'s server) after PostgreSQL
/// refused `user` with `message`, SQLSTATE 42501.
pub fn fix_denied(role: Role, message: &str, user: &str, database: &str) -> String {
    let object = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .map(|rest| rest.trim().trim_matches('"').to_string())
    };
    let as_owner = |what: &str| {
        format!("run as a superuser or the owner on the {role} (database {database:?}): {what}")
    };
    let table = |name: String| -> String {
        // PostgreSQL names the table without its schema; unquoted as it wrote it, the
        // statement resolves it along the search_path as the refused statement did.
        match role {
            Role::Source => format!("GRANT SELECT ON TABLE {} TO {};", quote(&name), quote(user)),
            _ => format!("ALTER TABLE {} OWNER TO {};", quote(&name), quote(user)),
        }
    };
    for prefix in [
        "permission denied for table ",
        "permission denied for relation ",
    ] {
        if let Some(name) = object(prefix) {
            return as_owner(&table(name));
        }
    }
    for prefix in ["must be owner of table ", "must be owner of relation "] {
        if let Some(name) = object(prefix) {
            return as_owner(&format!(
                "ALTER TABLE {} OWNER TO {};",
                quote(&name),
                quote(user)
            ));
        }
    }
    if let Some(name) = object("permission denied for schema ") {
        if name == "bite_sync" && role != Role::Source {
            // bite-sync's own schema: it migrates it, so it must own it and its tables.
            return as_owner(&format!(
                "{} (and its tables: `bite-sync check` lists each statement)",
                own_schema(&name, user)
            ));
        }
        let privileges = match role {
            Role::Source => "USAGE",
            _ => "USAGE, CREATE",
        };
        return as_owner(&on_schema(privileges, &name, user));
    }
    if let Some(name) = object("must be owner of schema ") {
        return as_owner(&own_schema(&name, user));
    }
    if let Some(name) = object("permission denied for database ") {
        return as_owner(&create_on_database(&name, user));
    }
    if let Some(name) = object("permission denied for sequence ") {
        return as_owner(&match role {
            Role::Source => format!(
                "GRANT SELECT ON SEQUENCE {} TO {};",
                quote(&name),
                quote(user)
            ),
            _ => format!("ALTER SEQUENCE {} OWNER TO {};", quote(&name), quote(user)),
        });
    }
    if let Some(name) = object("must be owner of sequence ") {
        return as_owner(&format!(
            "ALTER SEQUENCE {} OWNER TO {};",
            quote(&name),
            quote(user)
        ));
    }
    match role {
        Role::Source => format!(
            "the source user {user:?} needs to read the tables (GRANT USAGE ON SCHEMA ... TO {u}; GRANT SELECT ON TABLE ... TO {u};) and, for `bite-sync run`, to own them and create in {database:?} ({db}); `bite-sync check` lists each statement",
            u = quote(user),
            db = create_on_database(database, user)
        ),
        _ => format!(
            "the mirror user {user:?} needs to create in {database:?} ({db}) and in the target schemas, and to own bite_sync and the mirror tables it replaces; `bite-sync check` lists each statement",
            db = create_on_database(database, user)
        ),
    }
}

/// The fix for the first `permission denied` (SQLSTATE 42501) in `error`'s chain, when the
/// chain says which side refused (its messages name the source or the mirror).
pub fn hint_for(
    error: &(dyn std::error::Error + 'static),
    source: Option<&DbUrl>,
    mirror: Option<&DbUrl>,
) -> Option<String> {
    let mut above: Vec<String> = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>()
            && let Some(db) = pg.as_db_error()
            && db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE
        {
            // The innermost message that names a side is the one about this statement.
            let role = above.iter().rev().find_map(|text| {
                match (text.contains("mirror"), text.contains("source")) {
                    (true, false) => Some(Role::Mirror),
                    (false, true) => Some(Role::Source),
                    _ => None,
                }
            })?;
            let url = match role {
                Role::Source => source?,
                _ => mirror?,
            };
            return Some(fix_denied(role, db.message(), &url.user(), &url.dbname()));
        }
        // Only what this level adds: its own text minus its causes'.
        let text = e.to_string();
        let own = match e.source() {
            Some(inner) => text
                .strip_suffix(&inner.to_string())
                .unwrap_or(&text)
                .to_string(),
            None => text,
        };
        above.push(own);
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_quote_every_name() {
        assert_eq!(
            create_on_database("rail way", "bite"),
            "GRANT CREATE ON DATABASE \"rail way\" TO \"bite\";"
        );
        assert_eq!(
            select_on_tables(
                &[
                    QualifiedName::new("public", "orders"),
                    QualifiedName::new("Sales", "Order \"Items\"")
                ],
                "bite"
            ),
            "GRANT SELECT ON TABLE \"public\".\"orders\", \"Sales\".\"Order \"\"Items\"\"\" TO \"bite\";"
        );
        assert_eq!(
            own_tables(&[QualifiedName::new("public", "orders")], "app"),
            "ALTER TABLE \"public\".\"orders\" OWNER TO \"app\";"
        );
    }

    #[test]
    fn a_refusal_becomes_the_statement_that_fixes_it() {
        for (role, message, fix) in [
            (
                Role::Mirror,
                "permission denied for database railway",
                "GRANT CREATE ON DATABASE \"railway\" TO \"bite\";",
            ),
            (
                Role::Mirror,
                "permission denied for schema public",
                "GRANT USAGE, CREATE ON SCHEMA \"public\" TO \"bite\";",
            ),
            (
                Role::Mirror,
                "permission denied for schema bite_sync",
                "ALTER SCHEMA \"bite_sync\" OWNER TO \"bite\"; (and its tables: `bite-sync check` lists each statement)",
            ),
            (
                Role::Mirror,
                "must be owner of table orders",
                "ALTER TABLE \"orders\" OWNER TO \"bite\";",
            ),
            (
                Role::Source,
                "permission denied for table orders",
                "GRANT SELECT ON TABLE \"orders\" TO \"bite\";",
            ),
            (
                Role::Source,
                "must be owner of table orders",
                "ALTER TABLE \"orders\" OWNER TO \"bite\";",
            ),
        ] {
            let hint = fix_denied(role, message, "bite", "railway");
            assert!(hint.ends_with(fix), "{message}: {hint}");
            assert!(
                hint.starts_with(&format!(
                    "run as a superuser or the owner on the {role} (database \"railway\"): "
                )),
                "{hint}"
            );
        }
        // Another language: the side's advice, with the names.
        let hint = fix_denied(
            Role::Mirror,
            "permiso denegado a la base de datos railway",
            "bite",
            "railway",
        );
        assert!(
            hint.contains("GRANT CREATE ON DATABASE \"railway\" TO \"bite\";"),
            "{hint}"
        );
    }
}
