//! Schemas written by others, loaded into a test's source, and the comparisons that say a
//! mirror equals its source: every table's rows, every sequence's position, and the schema as
//! `pg_dump --schema-only` prints it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::clusters;

/// The feature schema of `tests/fixtures/features.sql`: everything issue 11 found broken.
pub const FEATURES: &str = include_str!("../fixtures/features.sql");

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn tool(name: &str) -> PathBuf {
    clusters().source.bin_dir().join(name)
}

/// Loads the vendored Pagila sample (schema, then data) into the database at `url` with the
/// cluster's own `psql`, stopping at the first error.
pub fn load_pagila(url: &str) {
    let psql = |input: Vec<u8>| {
        let mut child = Command::new(tool("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&input)
            .expect("feed psql");
        let out = child.wait_with_output().expect("psql runs");
        assert!(
            out.status.success(),
            "psql failed loading Pagila: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(std::fs::read(fixture("pagila/pagila-schema.sql")).expect("Pagila schema"));
    let gz = std::fs::read(fixture("pagila/pagila-data.sql.gz")).expect("Pagila data");
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut data)
        .expect("gunzip Pagila data");
    psql(data);
}

/// A database's schema as `pg_dump --schema-only` prints it, one entry per object, keyed by
/// `pg_dump`'s own header (`TABLE public.payments`, `INDEX ATTACH public.payments_2026_10_pkey`):
/// the statements without owners, settings and comments, so two databases made by different
/// roles and in different orders compare equal when their objects do. Objects of the
/// `bite_sync` schema (the mirror's bookkeeping) are left out.
pub fn schema_objects(url: &str) -> BTreeMap<String, String> {
    let out = Command::new(tool("pg_dump"))
        .args(["--schema-only", "--no-owner", "--no-privileges", "-d", url])
        .output()
        .expect("pg_dump");
    assert!(
        out.status.success(),
        "pg_dump --schema-only {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dump(&String::from_utf8_lossy(&out.stdout))
}

/// Splits a plain-format dump into its entries (see [`schema_objects`]).
pub fn parse_dump(dump: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut key: Option<String> = None;
    let mut body = String::new();
    let mut finish = |key: &mut Option<String>, body: &mut String| {
        // An entry with nothing but comments (pg_dump's "*not* creating schema public").
        if let Some(k) = key.take()
            && !body.trim().is_empty()
        {
            out.insert(k, body.trim().to_string());
        }
        body.clear();
    };
    for line in dump.lines() {
        if let Some(header) = line.strip_prefix("-- Name: ") {
            finish(&mut key, &mut body);
            // "X; Type: T; Schema: S; Owner: O"
            let mut name = "";
            let mut kind = "";
            let mut schema = "";
            for (i, part) in header.split("; ").enumerate() {
                if i == 0 {
                    name = part;
                } else if let Some(v) = part.strip_prefix("Type: ") {
                    kind = v;
                } else if let Some(v) = part.strip_prefix("Schema: ") {
                    schema = v;
                }
            }
            if schema == "bite_sync" || (kind == "SCHEMA" && name == "bite_sync") {
                key = None;
                continue;
            }
            key = Some(format!("{kind} {schema}.{name}"));
            continue;
        }
        if line.starts_with("--")
            || line.starts_with("SET ")
            || line.starts_with("SELECT pg_catalog.set_config")
            || line.starts_with("\\restrict")
            || line.starts_with("\\unrestrict")
        {
            continue;
        }
        if key.is_some() {
            body.push_str(line);
            body.push('\n');
        }
    }
    finish(&mut key, &mut body);
    out
}

/// Asserts that the mirror's schema is the source's: every object the mirror has is the
/// source's, statement for statement, and every source object of a kind a mirror carries
/// (tables, partitions, keys, indexes, types, domains, collations, extensions, sequences) is
/// there, except those `absent` names (a materialized view's index, say). Objects of other
/// kinds (views, triggers, functions nothing needs, publications) the mirror may lack.
pub fn assert_same_schema(source_url: &str, mirror_url: &str, absent: &[&str]) {
    const CARRIED: [&str; 14] = [
        "SCHEMA",
        "EXTENSION",
        "COLLATION",
        "TYPE",
        "DOMAIN",
        "SEQUENCE",
        "SEQUENCE OWNED BY",
        "TABLE",
        "DEFAULT",
        "CONSTRAINT",
        "FK CONSTRAINT",
        "INDEX",
        "TABLE ATTACH",
        "INDEX ATTACH",
    ];
    let source = schema_objects(source_url);
    let mirror = schema_objects(mirror_url);
    let mut problems = Vec::new();
    for (key, sql) in &mirror {
        match source.get(key) {
            Some(want) if want == sql => {}
            Some(want) => {
                problems.push(format!("{key} differs:\n  source: {want}\n  mirror: {sql}"))
            }
            None => problems.push(format!("{key} is only on the mirror:\n  {sql}")),
        }
    }
    for (key, sql) in &source {
        let kind = CARRIED.iter().find(|k| {
            key.starts_with(&format!("{k} "))
                && !CARRIED
                    .iter()
                    .any(|longer| longer.len() > k.len() && key.starts_with(&format!("{longer} ")))
        });
        if kind.is_some() && !mirror.contains_key(key) && !absent.iter().any(|a| key.ends_with(a)) {
            problems.push(format!("{key} is missing on the mirror:\n  {sql}"));
        }
    }
    assert!(
        problems.is_empty(),
        "the mirror's schema differs from the source's:\n{}",
        problems.join("\n")
    );
}

/// Every user table of a database (partitions included) with an order-independent digest of
/// its rows, as PostgreSQL renders them.
pub async fn table_digests(client: &tokio_postgres::Client) -> BTreeMap<String, (i64, String)> {
    let tables: Vec<String> = client
        .query(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bite_sync') \
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'bite\\_sync\\_stage\\_%' ORDER BY 1",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = BTreeMap::new();
    for table in tables {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM ONLY {table} t"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("digest of {table}: {e}"));
        out.insert(table, (row.get(0), row.get(1)));
    }
    out
}

/// Every sequence of a database with where it stands (`last_value`, or none if never used).
pub async fn sequence_positions(client: &tokio_postgres::Client) -> BTreeMap<String, Option<i64>> {
    client
        .query(
            "SELECT pg_catalog.format('%I.%I', schemaname, sequencename), last_value \
             FROM pg_catalog.pg_sequences WHERE schemaname <> 'bite_sync' ORDER BY 1",
            &[],
        )
        .await
        .expect("list sequences")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Asserts the mirror equals the source: every table's rows (each partition's too), every
/// sequence's position, and the schema ([`assert_same_schema`], with `absent`).
pub async fn assert_mirror_equals_source(source_url: &str, mirror_url: &str, absent: &[&str]) {
    let source = super::connect(source_url).await;
    let mirror = super::connect(mirror_url).await;
    assert_eq!(table_digests(&mirror).await, table_digests(&source).await);
    assert_eq!(
        sequence_positions(&mirror).await,
        sequence_positions(&source).await
    );
    assert_same_schema(source_url, mirror_url, absent);
}

#[test]
fn dumps_split_into_entries_without_owners_settings_or_bookkeeping() {
    let dump = "\\restrict abc\nSET x = 1;\n--\n-- Name: t; Type: TABLE; Schema: public; Owner: me\n--\n\nCREATE TABLE public.t (\n    a int\n);\n\n\n--\n-- Name: bite_sync; Type: SCHEMA; Schema: -; Owner: me\n--\n\nCREATE SCHEMA bite_sync;\n--\n-- Name: r; Type: TABLE; Schema: bite_sync; Owner: me\n--\nCREATE TABLE bite_sync.r ();\n\\unrestrict abc\n";
    let entries = parse_dump(dump);
    assert_eq!(
        entries,
        BTreeMap::from([(
            "TABLE public.t".to_string(),
            "CREATE TABLE public.t (\n    a int\n);".to_string()
        )])
    );
}
