//! The schema part of a backup: `pg_dump --schema-only` run in the backup's snapshot, found
//! on this machine, and its output cut into pieces a restore can run in parallel.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::pg::connect::DbUrl;

/// `pg_dump` could not be found or run, or refused.
#[derive(Debug, thiserror::Error)]
pub enum PgDumpError {
    /// No `pg_dump` of a usable version.
    #[error(
        "no pg_dump for PostgreSQL {major} found (looked in {looked}); install the client, e.g. `apt install postgresql-client-{major}`, or set [backup] pg_dump to its path"
    )]
    Missing {
        /// The source server's major version.
        major: u32,
        /// Where we looked.
        looked: String,
    },
    /// A `pg_dump` older than the server.
    #[error(
        "{path} is pg_dump {found}, which cannot dump a PostgreSQL {major} server; install postgresql-client-{major} or set [backup] pg_dump to a pg_dump {major} or newer"
    )]
    TooOld {
        /// The program.
        path: String,
        /// Its major version.
        found: u32,
        /// The server's.
        major: u32,
    },
    /// It ran and failed.
    #[error("pg_dump failed ({status}): {stderr}")]
    Failed {
        /// Exit status.
        status: String,
        /// What it printed, last lines.
        stderr: String,
    },
    /// It could not be started.
    #[error("could not run {path}: {source}")]
    Spawn {
        /// The program.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Finds a `pg_dump` that can dump a server of `server_major`: the configured one, else the
/// Debian/Ubuntu one of that major, else the newest under `/usr/lib/postgresql`, else `PATH`.
pub async fn find_pg_dump(
    configured: Option<&Path>,
    server_major: u32,
) -> Result<PathBuf, PgDumpError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = configured {
        candidates.push(path.to_path_buf());
    } else {
        candidates.push(PathBuf::from(format!(
            "/usr/lib/postgresql/{server_major}/bin/pg_dump"
        )));
        if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut majors: Vec<u32> = dirs
                .filter_map(|d| d.ok()?.file_name().to_str()?.parse().ok())
                .filter(|m| *m > server_major)
                .collect();
            majors.sort_unstable_by(|a, b| b.cmp(a));
            candidates.extend(
                majors
                    .into_iter()
                    .map(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin/pg_dump"))),
            );
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("pg_dump")));
        }
    }
    let mut too_old = None;
    for path in &candidates {
        if !path.is_file() {
            continue;
        }
        let Some(found) = version_of(path).await else {
            continue;
        };
        if found >= server_major {
            return Ok(path.clone());
        }
        too_old.get_or_insert(PgDumpError::TooOld {
            path: path.display().to_string(),
            found,
            major: server_major,
        });
    }
    Err(too_old.unwrap_or_else(|| PgDumpError::Missing {
        major: server_major,
        looked: if configured.is_some() {
            candidates[0].display().to_string()
        } else {
            "/usr/lib/postgresql/*/bin and PATH".to_string()
        },
    }))
}

/// The major version `pg_dump --version` reports (`pg_dump (PostgreSQL) 15.18 (Debian ...)`).
async fn version_of(path: &Path) -> Option<u32> {
    let out = Command::new(path).arg("--version").output().await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_major(&text)
}

fn parse_major(version_line: &str) -> Option<u32> {
    let version = version_line.split(')').nth(1)?.split_whitespace().next()?;
    version.split(['.', 'b', 'r']).next()?.parse().ok()
}

/// Which part of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Before data.
    PreData,
    /// After data.
    PostData,
}

/// Runs `pg_dump --schema-only` for one section, in `snapshot`, and returns its SQL.
pub async fn dump_section(
    pg_dump: &Path,
    source: &DbUrl,
    snapshot: &str,
    section: Section,
) -> Result<String, PgDumpError> {
    let mut cmd = Command::new(pg_dump);
    cmd.args([
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        "--no-subscriptions",
        "--exclude-schema=bite_sync*",
    ])
    .arg(match section {
        Section::PreData => "--section=pre-data",
        Section::PostData => "--section=post-data",
    })
    .arg(format!("--snapshot={snapshot}"))
    .envs(source.libpq_env())
    .kill_on_drop(true);
    let out = cmd.output().await.map_err(|source| PgDumpError::Spawn {
        path: pg_dump.display().to_string(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(PgDumpError::Failed {
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The SQL without psql's meta-commands (`\restrict`, which pg_dump writes since 15.14), so it
/// can be sent to the server directly.
pub fn without_meta_commands(sql: &str) -> String {
    sql.lines()
        .filter(|l| !l.starts_with('\\'))
        .flat_map(|l| [l, "\n"])
        .collect()
}

/// When a post-data statement can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Indexes and keys: in parallel, right after the data.
    Indexes,
    /// An index of a partition attached to its partitioned table's index (`INDEX ATTACH`):
    /// once every index exists, before the foreign keys (one that references a partitioned
    /// table needs its key's index whole, every partition's attached).
    Attach,
    /// Foreign keys: in parallel, once every key exists and is attached.
    ForeignKeys,
    /// Everything else (triggers, index attachments, rules, publications...): in order, last.
    Rest,
}

/// One `pg_dump` entry of the post-data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `Type:` of its header (`INDEX`, `FK CONSTRAINT` ...).
    pub kind: String,
    /// `Name:` of its header.
    pub name: String,
    /// When it runs.
    pub phase: Phase,
    /// Its SQL.
    pub sql: String,
}

/// Cuts `pg_dump` output into its settings preamble and its entries, by the
/// `-- Name: ...; Type: ...; Schema: ...` comments pg_dump writes before each entry.
pub fn split_entries(sql: &str) -> (String, Vec<Entry>) {
    let mut preamble = String::new();
    let mut entries: Vec<Entry> = Vec::new();
    for line in sql.lines() {
        if line.starts_with('\\') {
            continue;
        }
        if let Some(header) = line.strip_prefix("-- Name: ") {
            let mut name = header;
            let mut kind = "";
            for (i, part) in header.split("; ").enumerate() {
                if i == 0 {
                    name = part;
                } else if let Some(k) = part.strip_prefix("Type: ") {
                    kind = k;
                }
            }
            let phase = match kind {
                "INDEX" | "CONSTRAINT" => Phase::Indexes,
                "INDEX ATTACH" => Phase::Attach,
                "FK CONSTRAINT" => Phase::ForeignKeys,
                _ => Phase::Rest,
            };
            entries.push(Entry {
                kind: kind.to_owned(),
                name: name.to_owned(),
                phase,
                sql: String::new(),
            });
            continue;
        }
        if line.starts_with("--") || line.trim().is_empty() {
            continue;
        }
        match entries.last_mut() {
            Some(entry) => {
                entry.sql.push_str(line);
                entry.sql.push('\n');
            }
            None => {
                preamble.push_str(line);
                preamble.push('\n');
            }
        }
    }
    entries.retain(|e| !e.sql.trim().is_empty());
    (preamble, entries)
}

/// A table as (schema, name), unquoted.
pub type TableName = (String, String);

/// The table an entry works on and, for a foreign key, the table it references, as
/// (schema, name), read from pg_dump's `ALTER TABLE ONLY s.t`, `CREATE INDEX ... ON s.t` and
/// `REFERENCES s.t(...)`. `None` where the SQL does not say.
pub fn entry_tables(sql: &str) -> (Option<TableName>, Option<TableName>) {
    let after = |marker: &str| {
        sql.find(marker)
            .and_then(|at| qualified_name(&sql[at + marker.len()..]))
    };
    let target = after("ALTER TABLE ONLY ")
        .or_else(|| after("ALTER TABLE "))
        .or_else(|| after(" ON ONLY "))
        .or_else(|| after(" ON "));
    (target, after(" REFERENCES "))
}

/// `schema.name` at the start of `text`, either part quoted or not.
fn qualified_name(text: &str) -> Option<TableName> {
    let (schema, rest) = identifier(text)?;
    let rest = rest.strip_prefix('.')?;
    let (name, _) = identifier(rest)?;
    Some((schema, name))
}

fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if let Some((_, '"')) = chars.peek() {
                    out.push('"');
                    chars.next();
                } else {
                    return Some((out, &quoted[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        None
    } else {
        let end = text
            .find(|c: char| c.is_whitespace() || matches!(c, '.' | '(' | ';' | ','))
            .unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_owned(), &text[end..]))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn entries_name_their_tables_quoted_or_not() {
        let own = |s: &str, n: &str| Some((s.to_owned(), n.to_owned()));
        assert_eq!(
            entry_tables(
                "ALTER TABLE ONLY public.orders\n    ADD CONSTRAINT x FOREIGN KEY (customer_id) REFERENCES public.customers(id);"
            ),
            (own("public", "orders"), own("public", "customers"))
        );
        assert_eq!(
            entry_tables(
                "CREATE UNIQUE INDEX \"Idx\" ON \"Sales Dept\".\"Order \"\"Items\"\"\" USING btree (id);"
            ),
            (own("Sales Dept", "Order \"Items\""), None)
        );
        assert_eq!(
            entry_tables("CREATE INDEX i ON ONLY public.p USING btree (id);").0,
            own("public", "p")
        );
        assert_eq!(entry_tables("COMMENT ON EXTENSION x IS 'y';").0, None);
    }

    use super::*;

    const POST: &str = r#"--
-- PostgreSQL database dump
--

\restrict abc123

SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);

--
-- Name: orders orders_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_pkey PRIMARY KEY (id);


--
-- Name: orders_created_at_idx; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX orders_created_at_idx ON public.orders USING btree (created_at);


--
-- Name: orders orders_customer_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES public.customers(id);


--
-- Name: orders orders_touch; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER orders_touch BEFORE UPDATE ON public.orders FOR EACH ROW EXECUTE FUNCTION public.touch();


--
-- PostgreSQL database dump complete
--

\unrestrict abc123
"#;

    #[test]
    fn post_data_splits_into_phases_with_its_preamble() {
        let (preamble, entries) = split_entries(POST);
        assert!(preamble.contains("set_config('search_path', '', false)"));
        assert!(!preamble.contains("restrict"));
        let kinds: Vec<(&str, Phase)> = entries.iter().map(|e| (&*e.kind, e.phase)).collect();
        assert_eq!(
            kinds,
            [
                ("CONSTRAINT", Phase::Indexes),
                ("INDEX", Phase::Indexes),
                ("FK CONSTRAINT", Phase::ForeignKeys),
                ("TRIGGER", Phase::Rest),
            ]
        );
        assert_eq!(
            entries[0].sql,
            "ALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_pkey PRIMARY KEY (id);\n"
        );
        assert_eq!(entries[1].name, "orders_created_at_idx");
    }

    #[test]
    fn meta_commands_are_dropped_for_the_server() {
        let sql = without_meta_commands(POST);
        assert!(!sql.contains("\\restrict") && !sql.contains("\\unrestrict"));
        assert!(sql.contains("CREATE TRIGGER orders_touch"));
    }

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("pg_dump (PostgreSQL) 17beta2"), Some(17));
        assert_eq!(parse_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major("garbage"), None);
    }
}
