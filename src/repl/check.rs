//! `bite-sync check`: is everything in place for `bite-sync run`?
//!
//! Every check runs, whatever failed before it (except what cannot run without a connection),
//! and each line says OK or exactly what to change, so one run shows the whole to-do list.

use serde::Serialize;
use tokio_postgres::Client;

use super::conn::ReplicationClient;
use super::setup::identity_problems;
use crate::pg::connect::DbUrl;
use crate::pg::ident::{QualifiedName, TablePattern};
use crate::sync::{catalog, plan};

/// One line of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    /// `source` or `mirror`.
    pub side: &'static str,
    /// What was checked.
    pub what: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found, or what to do.
    pub detail: String,
}

fn line(side: &'static str, what: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        side,
        what: what.to_string(),
        ok,
        detail: detail.into(),
    }
}

/// Runs every check; `publication` is the one `bite-sync run` would create.
pub async fn check(
    source: Option<&DbUrl>,
    mirror: Option<&DbUrl>,
    tables: &[TablePattern],
    publication: &str,
) -> Vec<Check> {
    let mut out = Vec::new();
    let names = match source {
        None => {
            out.push(line("source", "configured", false, "no source database: pass --source URL, set BITE_SOURCE_URL, or set source.url in bite-sync.toml"));
            None
        }
        Some(url) => check_source(url, tables, publication, &mut out).await,
    };
    match mirror {
        None => out.push(line("mirror", "configured", false, "no mirror database: pass --mirror URL, set BITE_MIRROR_URL, or set mirror.url in bite-sync.toml")),
        Some(url) => check_mirror(url, names.as_deref(), &mut out).await,
    }
    out
}

/// The WhatsApp delivery checks, when `bite-sync run` is set to deliver (a backend URL is
/// configured): the backend answers HTTP at all (any status: the check sends a GET, never a
/// delivery), `SYNC_API_KEY` is set so deliveries are signed, and the mirror has the relay's
/// inbox. Bad delivery settings are one line saying what is wrong.
pub async fn add_delivery(config: &crate::config::Config, out: &mut Vec<Check>) {
    let pull = match crate::relay::deliver::Pull::configured(config) {
        Ok(Some(pull)) => pull,
        Ok(None) => return,
        Err(e) => {
            out.push(line("backend", "delivery settings", false, e.to_string()));
            return;
        }
    };
    let url = pull.settings.url.clone().unwrap_or_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build();
    let reached = match client {
        Ok(c) => c.get(&url).send().await.map(|r| r.status().as_u16()),
        Err(e) => Err(e),
    };
    out.push(match reached {
        Ok(status) => line(
            "backend",
            "reachable",
            true,
            format!("{url} answers (HTTP {status} to a GET)"),
        ),
        Err(e) => line(
            "backend",
            "reachable",
            false,
            format!(
                "{url}: {}; start the backend, or fix LOCAL_BACKEND_URL / delivery.backend_url",
                if e.is_timeout() {
                    "no answer within 5 s".to_string()
                } else if e.is_connect() {
                    "cannot connect".to_string()
                } else {
                    e.without_url().to_string()
                }
            ),
        ),
    });
    out.push(match &pull.settings.api_key {
        Some(_) => line("backend", "deliveries signed", true, "SYNC_API_KEY is set: x-api-key and x-bite-signature-256 on every delivery"),
        None => line("backend", "deliveries signed", false, "SYNC_API_KEY is not set: set the same value here and on the relay, so the backend can tell deliveries from anyone else's requests"),
    });
    let inbox = async {
        let client = pull
            .mirror
            .connect()
            .await
            .map_err(|e| crate::error_chain(&e))?;
        client
            .query_one(
                "SELECT pg_catalog.to_regclass('bite_sync.inbox') IS NOT NULL",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .map_err(|e| crate::error_chain(&e))
    }
    .await;
    out.push(match inbox {
        Ok(true) => line("mirror", "WhatsApp inbox", true, "bite_sync.inbox exists"),
        Ok(false) => line("mirror", "WhatsApp inbox", false, "no bite_sync.inbox yet: start `bite-sync relay` on this database once (or `bite-sync run --init`)"),
        Err(e) => line("mirror", "WhatsApp inbox", false, format!("cannot read it: {e}")),
    });
}

/// What the replicated tables need on the mirror besides themselves (types, collations,
/// functions, extensions, sequences) and the mirror lacks, one line each with the DDL that
/// creates it: OK for what `bite-sync run` creates itself, FIX for what it cannot (and would
/// refuse to start over, changing nothing).
pub async fn add_dependencies(
    source: Option<&DbUrl>,
    mirror: Option<&DbUrl>,
    tables: &[TablePattern],
    flatten_partitions: bool,
    out: &mut Vec<Check>,
) {
    let (Some(source), Some(mirror)) = (source, mirror) else {
        return;
    };
    if tables.is_empty() {
        return;
    }
    match super::preflight::missing_dependencies(source, mirror, tables, flatten_partitions).await {
        Ok(missing) if missing.is_empty() => out.push(line(
            "mirror",
            "dependencies",
            true,
            "the mirror has every type, function, collation and extension the tables need",
        )),
        Ok(missing) => {
            for m in missing {
                // A function's definition spans lines: indented, so each line of the report
                // still starts with OK or FIX.
                let ddl = m
                    .ddl
                    .as_deref()
                    .map(|d| d.trim_end().replace('\n', "\n        "))
                    .unwrap_or_default();
                out.push(if m.created {
                    line(
                        "mirror",
                        &m.object,
                        true,
                        format!("missing; `bite-sync run` creates it: {ddl}"),
                    )
                } else {
                    line(
                        "mirror",
                        &m.object,
                        !m.blocking,
                        match &m.ddl {
                            Some(_) => format!(
                                "{}; it is created by: {ddl}",
                                m.problem.as_deref().unwrap_or("missing")
                            ),
                            None => m.problem.clone().unwrap_or_else(|| "missing".into()),
                        },
                    )
                });
            }
        }
        Err(e) => out.push(line("mirror", "dependencies", false, e)),
    }
}

async fn setting(client: &Client, name: &str) -> Option<String> {
    client
        .query_one("SELECT pg_catalog.current_setting($1)", &[&name])
        .await
        .ok()
        .map(|r| r.get(0))
}

async fn version(client: &Client) -> (i32, String) {
    let num = setting(client, "server_version_num")
        .await
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let text = setting(client, "server_version").await.unwrap_or_default();
    (num, text)
}

/// Connects, with a line saying whether that worked; the server's version too.
async fn reach(
    side: &'static str,
    url: &DbUrl,
    out: &mut Vec<Check>,
) -> Option<(Client, i32, String)> {
    match url.connect().await {
        Ok(client) => {
            out.push(line(side, "reachable", true, url.target()));
            let (num, text) = version(&client).await;
            Some((client, num, text))
        }
        Err(e) => {
            out.push(line(side, "reachable", false, crate::error_chain(&e)));
            None
        }
    }
}

/// The source's checks; the tables as they exist there, when they could be resolved.
async fn check_source(
    url: &DbUrl,
    tables: &[TablePattern],
    publication: &str,
    out: &mut Vec<Check>,
) -> Option<Vec<QualifiedName>> {
    let side = "source";
    let (client, num, text) = reach(side, url, out).await?;
    out.push(if num >= 100_000 {
        line(side, "server version", true, format!("PostgreSQL {text}"))
    } else {
        line(
            side,
            "server version",
            false,
            format!(
                "PostgreSQL {text}: logical replication with pgoutput needs PostgreSQL 10 or later"
            ),
        )
    });
    let wal_level = setting(&client, "wal_level").await.unwrap_or_default();
    out.push(if wal_level == "logical" {
        line(side, "wal_level", true, "logical")
    } else {
        line(side, "wal_level", false, format!("is {wal_level}: set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"))
    });
    if let Ok(row) = client
        .query_one(
            "SELECT pg_catalog.current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_catalog.pg_replication_slots), \
                    pg_catalog.current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_catalog.pg_stat_replication)",
            &[],
        )
        .await
    {
        let (slots, used, senders, busy): (i32, i32, i32, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        // One slot and sender for the stream, one more while a new table is copied.
        out.push(if slots - used >= 2 {
            line(side, "max_replication_slots", true, format!("{slots} ({used} in use)"))
        } else {
            line(side, "max_replication_slots", false, format!("{slots} with {used} in use: bite-sync needs 2 free (one for the stream, one while copying a new table); raise max_replication_slots and restart PostgreSQL"))
        });
        out.push(if senders - busy >= 2 {
            line(side, "max_wal_senders", true, format!("{senders} ({busy} in use)"))
        } else {
            line(side, "max_wal_senders", false, format!("{senders} with {busy} in use: bite-sync needs 2 free; raise max_wal_senders and restart PostgreSQL"))
        });
    }
    if let Ok(row) = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        let (user, can): (String, bool) = (row.get(0), row.get(1));
        out.push(if can {
            line(side, "REPLICATION privilege", true, format!("{user} may replicate"))
        } else {
            line(side, "REPLICATION privilege", false, format!("{user} may not open replication connections: ALTER ROLE {} REPLICATION", crate::pg::ident::quote(&user)))
        });
    }
    match ReplicationClient::connect(url).await {
        Ok(mut c) => {
            let result = c.identify_system().await;
            out.push(match result {
                Ok(system) => line(
                    side,
                    "replication connection",
                    true,
                    format!("system {} timeline {}", system.systemid, system.timeline),
                ),
                Err(e) => line(
                    side,
                    "replication connection",
                    false,
                    crate::error_chain(&e),
                ),
            });
        }
        Err(e) => out.push(line(
            side,
            "replication connection",
            false,
            crate::error_chain(&e),
        )),
    }
    let encoding = setting(&client, "server_encoding")
        .await
        .unwrap_or_default();
    out.push(if encoding == "UTF8" || encoding == "SQL_ASCII" {
        line(side, "encoding", true, encoding)
    } else {
        line(
            side,
            "encoding",
            false,
            format!("{encoding}: bite-sync replicates UTF8 databases only"),
        )
    });
    if tables.is_empty() {
        out.push(line(
            side,
            "tables",
            false,
            "no tables to replicate: pass --tables or set replication.tables in bite-sync.toml",
        ));
        return None;
    }
    let names = match resolve(&client, tables).await {
        Ok(names) => names,
        Err(e) => {
            out.push(line(side, "tables", false, e));
            return None;
        }
    };
    out.push(line(
        side,
        "tables",
        true,
        names
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    ));
    match identity_problems(&client, &names).await {
        Ok(problems) if problems.is_empty() => {
            out.push(line(
                side,
                "replica identity",
                true,
                "every table has a primary key or replica identity",
            ));
        }
        Ok(problems) => {
            for p in problems {
                out.push(line(side, "replica identity", false, p));
            }
        }
        Err(e) => out.push(line(
            side,
            "replica identity",
            false,
            crate::error_chain(&e),
        )),
    }
    super::privileges::source(&client, &names, publication, out).await;
    Some(names)
}

async fn resolve(client: &Client, tables: &[TablePattern]) -> Result<Vec<QualifiedName>, String> {
    let search_path = catalog::search_path(client)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    let all = catalog::list_tables(client)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    plan::resolve(&all, &search_path, tables, &[])
        .map(|v| v.into_iter().map(|e| e.name).collect())
        .map_err(|e| e.to_string())
}

async fn check_mirror(url: &DbUrl, tables: Option<&[QualifiedName]>, out: &mut Vec<Check>) {
    let side = "mirror";
    let Some((client, _, text)) = reach(side, url, out).await else {
        return;
    };
    out.push(line(
        side,
        "server version",
        true,
        format!("PostgreSQL {text}"),
    ));
    super::privileges::mirror(&client, tables, out).await;
    if let Ok(row) = client
        .query_one(
            "SELECT pg_catalog.to_regclass('bite_sync.schema_migrations') IS NOT NULL, \
                    (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
    {
        let (initialized, superuser): (bool, bool) = (row.get(0), row.get(1));
        out.push(line(
            side,
            "bookkeeping",
            true,
            if initialized {
                "bite_sync schema present"
            } else {
                "no bite_sync schema yet: the first `bite-sync run` needs --init"
            },
        ));
        out.push(line(
            side,
            "apply mode",
            true,
            if superuser {
                "superuser: changes are applied grouped per table, without firing mirror triggers (like native replication)"
            } else {
                "not superuser: changes are applied in source order and mirror triggers fire"
            },
        ));
    }
}

/// The report as text: `OK` or `FIX` per line.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<4} {:<7} {:<24} {}\n",
            if c.ok { "OK" } else { "FIX" },
            c.side,
            c.what,
            c.detail
        ));
    }
    let bad = checks.iter().filter(|c| !c.ok).count();
    if bad == 0 {
        out.push_str("ready for `bite-sync run`\n");
    } else {
        out.push_str(&format!("{bad} thing(s) to fix before `bite-sync run`\n"));
    }
    out
}
