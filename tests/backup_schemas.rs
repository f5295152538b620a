//! Whole-database backups of schemas nobody here wrote: the feature schema of issue 11
//! (`tests/fixtures/features.sql`: partitioned tables, a zero-column table, a populated
//! materialized view, sequences used only by defaults, a custom collation, citext, hstore...)
//! with what PostgreSQL's own pg_dump tests (`src/bin/pg_dump/t/002_pg_dump.pl`) exercise
//! beyond it, and the Pagila sample database (`tests/fixtures/pagila/`).
//!
//! Each is backed up, then restored three ways: `bite-sync restore` into a fresh database,
//! `restore --clean` twice into that same database, and the README's stock
//! `gunzip -c *.sql.gz | psql`. After each, every table (row count and an order-independent
//! checksum, materialized views included, and whether they are populated), every sequence's
//! position and the whole schema (`pg_dump --schema-only`, normalised) must equal the source.
//! A restore that fails part-way must leave the target exactly as it was.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use support::{bite_sync, clusters, connect, test_dbs};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// What pg_dump's own tests (`002_pg_dump.pl`) cover that the feature schema does not, and a
/// restore meets: objects outside schemas (publications, an event trigger, a foreign-data
/// wrapper with its server and user mapping, a transform, a cast), a materialized view on
/// another and one never populated, inheritance, an unlogged table, a foreign table, row
/// security, a rule, extended statistics, text search, comments, a foreign key to a
/// partitioned table, a check constraint `NOT VALID`, an exclusion constraint, a partitioned
/// table with a trigger, a base type of its own, a range over a custom operator class, a
/// procedure, and sequences in each state.
const PG_DUMP_EXTRAS: &str = r#"
CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE SCHEMA kitchen;
COMMENT ON SCHEMA kitchen IS 'back of house';
CREATE TABLE kitchen.stations (id int PRIMARY KEY, name text NOT NULL);
COMMENT ON TABLE kitchen.stations IS 'where dishes are made';
COMMENT ON COLUMN kitchen.stations.name IS 'as on the ticket printer';
INSERT INTO kitchen.stations VALUES (1, 'grill'), (2, 'fryer'), (3, 'pass');
-- Inheritance (not partitioning): each child's rows are its own.
CREATE TABLE kitchen.events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), note text);
CREATE TABLE kitchen.fire_events (station int REFERENCES kitchen.stations) INHERITS (kitchen.events);
INSERT INTO kitchen.events (note, at) VALUES ('open', '2026-11-01 09:00+00');
INSERT INTO kitchen.fire_events (note, station, at) VALUES ('flare', 1, '2026-11-01 21:00+00');
CREATE UNLOGGED TABLE kitchen.scratch (k text PRIMARY KEY, v jsonb);
INSERT INTO kitchen.scratch VALUES ('a', '{"x": 1}'), ('b', NULL);
-- Row security and a rule.
ALTER TABLE kitchen.stations ENABLE ROW LEVEL SECURITY;
CREATE POLICY stations_all ON kitchen.stations USING (true);
CREATE TABLE kitchen.station_log (id int, name text);
CREATE RULE stations_log AS ON INSERT TO kitchen.stations DO ALSO
    INSERT INTO kitchen.station_log VALUES (NEW.id, NEW.name);
CREATE STATISTICS kitchen.stations_stats (dependencies) ON id, name FROM kitchen.stations;
CREATE TEXT SEARCH CONFIGURATION kitchen.menu_search (COPY = pg_catalog.spanish);
-- An exclusion constraint and a check NOT VALID with rows that break it.
CREATE TABLE kitchen.shifts (station int, during tstzrange, EXCLUDE USING gist (station WITH =, during WITH &&));
INSERT INTO kitchen.shifts VALUES (1, '[2026-11-01 08:00+00, 2026-11-01 16:00+00)');
CREATE TABLE kitchen.tickets (id int PRIMARY KEY, total numeric);
INSERT INTO kitchen.tickets VALUES (1, -5), (2, 10);
ALTER TABLE kitchen.tickets ADD CONSTRAINT tickets_positive CHECK (total >= 0) NOT VALID;
-- A foreign key to a partitioned table, and a trigger on one.
CREATE TABLE refunds (payment_id bigint, paid_at timestamptz, amount numeric(10, 2),
    FOREIGN KEY (payment_id, paid_at) REFERENCES payments (id, paid_at));
INSERT INTO refunds SELECT id, paid_at, 1.00 FROM payments ORDER BY id LIMIT 5;
CREATE FUNCTION payments_touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER payments_touch BEFORE UPDATE ON payments FOR EACH ROW EXECUTE FUNCTION payments_touch();
-- A materialized view on another, and one never populated.
CREATE MATERIALIZED VIEW best_month AS SELECT month, total FROM revenue_by_month ORDER BY total DESC LIMIT 1;
CREATE MATERIALIZED VIEW guests_later AS SELECT id, email FROM guests WITH NO DATA;
-- Objects outside schemas.
CREATE PUBLICATION features_pub FOR TABLE guests, tips;
CREATE PUBLICATION everything_pub FOR ALL TABLES;
CREATE FUNCTION no_drops() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE EVENT TRIGGER no_drops ON sql_drop EXECUTE FUNCTION no_drops();
-- More objects outside schemas, as in pg_dump's tests: a foreign-data wrapper with a server,
-- a user mapping and a foreign table (whose rows are not the backup's), a transform, a cast.
CREATE FOREIGN DATA WRAPPER dummy;
CREATE SERVER s1 FOREIGN DATA WRAPPER dummy;
CREATE USER MAPPING FOR CURRENT_USER SERVER s1;
CREATE FOREIGN TABLE kitchen.remote_orders (c1 int OPTIONS (column_name 'col1')) SERVER s1 OPTIONS (schema_name 'x1');
CREATE TRANSFORM FOR int LANGUAGE SQL (FROM SQL WITH FUNCTION prsd_lextype(internal), TO SQL WITH FUNCTION int4recv(internal));
CREATE TYPE kitchen.station_ref AS (id int);
CREATE FUNCTION kitchen.station_ref_text(kitchen.station_ref) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'station ' || $1.id $$;
CREATE CAST (kitchen.station_ref AS text) WITH FUNCTION kitchen.station_ref_text(kitchen.station_ref);
-- A base type with its own input and output, a range over a custom operator class, a procedure.
CREATE TYPE kitchen.int42;
CREATE FUNCTION kitchen.int42_in(cstring) RETURNS kitchen.int42 AS 'int4in' LANGUAGE internal STRICT IMMUTABLE;
CREATE FUNCTION kitchen.int42_out(kitchen.int42) RETURNS cstring AS 'int4out' LANGUAGE internal STRICT IMMUTABLE;
CREATE TYPE kitchen.int42 (internallength = 4, input = kitchen.int42_in, output = kitchen.int42_out,
    alignment = int4, default = 42, passedbyvalue);
CREATE TABLE kitchen.answers (a kitchen.int42 DEFAULT '42', note text);
INSERT INTO kitchen.answers (note) VALUES ('forty-two');
CREATE OPERATOR kitchen.~~ (PROCEDURE = int4eq, LEFTARG = int, RIGHTARG = int);
CREATE OPERATOR CLASS kitchen.op_class_custom FOR TYPE int USING btree AS OPERATOR 3 kitchen.~~;
CREATE TYPE kitchen.range_type_custom AS RANGE (subtype = int, subtype_opclass = kitchen.op_class_custom);
CREATE PROCEDURE kitchen.add_station(id int, name text) LANGUAGE sql
    AS $$ INSERT INTO kitchen.stations VALUES (id, name) $$;
-- Large objects (the data of pg_dump's BLOB entries): one over several chunks, an empty one
-- with a comment, a small one.
SELECT lo_from_bytea(424242, decode(repeat('0123456789abcdef', 40000), 'hex'));
SELECT lo_create(424243);
COMMENT ON LARGE OBJECT 424243 IS 'the menu''s photo, to come';
SELECT lo_from_bytea(424244, '\x00ff'::bytea);
-- Sequences: one called, one set but not called, one never used.
CREATE SEQUENCE kitchen.ticket_no;
SELECT nextval('kitchen.ticket_no'), nextval('kitchen.ticket_no');
CREATE SEQUENCE kitchen.set_not_called;
SELECT setval('kitchen.set_not_called', 42, false);
CREATE SEQUENCE kitchen.unused START 7;
"#;

/// Loads the feature schema and [`PG_DUMP_EXTRAS`].
async fn load_features(url: &str) {
    let client = connect(url).await;
    let features = std::fs::read_to_string(fixture("features.sql")).expect("features.sql");
    client
        .batch_execute(&features)
        .await
        .unwrap_or_else(|e| panic!("features.sql: {e}"));
    client
        .batch_execute(PG_DUMP_EXTRAS)
        .await
        .unwrap_or_else(|e| panic!("the pg_dump extras: {e}"));
}

/// Loads Pagila as its README says, then populates its materialized view.
async fn load_pagila(url: &str) {
    let schema = fixture("pagila/pagila-schema.sql");
    let data = fixture("pagila/pagila-data.sql.gz");
    psql(&format!("cat '{}'", schema.display()), url);
    psql(&format!("gunzip -c '{}'", data.display()), url);
    connect(url)
        .await
        .batch_execute("REFRESH MATERIALIZED VIEW rental_by_category")
        .await
        .expect("refresh");
}

fn tool(name: &str) -> PathBuf {
    clusters().source.bin_dir().join(name)
}

/// `pipeline | psql -X -q -v ON_ERROR_STOP=1 -d url`, which must succeed.
fn psql(pipeline: &str, url: &str) {
    let script = format!(
        "{pipeline} | '{}' -X -q -v ON_ERROR_STOP=1 -d '{url}'",
        tool("psql").display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything a restore must bring back, as plain values to compare.
#[derive(Debug, PartialEq, Eq)]
struct State {
    /// Every table and materialized view: rows and md5 of the sorted rows (or `unpopulated`).
    tables: BTreeMap<String, String>,
    /// Every sequence: `last_value/is_called`.
    sequences: BTreeMap<String, String>,
    /// Every large object: oid, md5 of its bytes, comment.
    large_objects: String,
    /// `pg_dump --schema-only`, normalised.
    schema: String,
}

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

async fn state(url: &str) -> State {
    let client = connect(url).await;
    let rels = client
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text, c.relispopulated \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'm', 'S') AND {USER_SCHEMAS} ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap();
    let mut tables = BTreeMap::new();
    let mut sequences = BTreeMap::new();
    for r in rels {
        let (name, kind, populated): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        if kind == "S" {
            let row = client
                .query_one(
                    &format!("SELECT last_value::text || '/' || is_called::text FROM {name}"),
                    &[],
                )
                .await
                .unwrap();
            sequences.insert(name, row.get(0));
        } else if !populated {
            tables.insert(name, "unpopulated".to_owned());
        } else {
            // Only the table's own rows (an inheritance parent's children count on their own).
            let row = client
                .query_one(
                    &format!(
                        "SELECT count(*)::text || ' rows ' || \
                                coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') \
                         FROM ONLY {name} t"
                    ),
                    &[],
                )
                .await
                .unwrap_or_else(|e| panic!("reading {name}: {e}"));
            tables.insert(name, row.get(0));
        }
    }
    let large_objects = client
        .query_one(
            "SELECT coalesce(string_agg(format('%s %s %s', oid, md5(lo_get(oid)), \
                    obj_description(oid, 'pg_largeobject')), ', ' ORDER BY oid), '') \
             FROM pg_largeobject_metadata",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    State {
        tables,
        sequences,
        large_objects,
        schema: schema_of(url),
    }
}

/// `pg_dump --schema-only` without comments, blank lines and psql's `\restrict` lines (whose
/// key is random), so two databases with the same schema print the same text.
fn schema_of(url: &str) -> String {
    let out = std::process::Command::new(tool("pg_dump"))
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-schema=bite_sync*",
            "-d",
            url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("--") && !l.starts_with('\\') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Asserts `target` now holds what `source` does, naming the first difference.
fn assert_same(source: &State, target: &State, after: &str) {
    for (name, value) in &source.tables {
        assert_eq!(
            target.tables.get(name),
            Some(value),
            "{after}: table {name} differs"
        );
    }
    assert_eq!(source.tables, target.tables, "{after}: the tables differ");
    assert_eq!(
        source.sequences, target.sequences,
        "{after}: the sequences differ"
    );
    assert_eq!(
        source.large_objects, target.large_objects,
        "{after}: the large objects differ"
    );
    if source.schema != target.schema {
        let diff: Vec<String> = diff_lines(&source.schema, &target.schema);
        panic!(
            "{after}: the schema differs (- source, + restored):\n{}",
            diff.join("\n")
        );
    }
}

/// The lines only one side has, in order (enough to see what a restore lost).
fn diff_lines(a: &str, b: &str) -> Vec<String> {
    let count = |s: &str| {
        let mut m: BTreeMap<String, i32> = BTreeMap::new();
        for l in s.lines() {
            *m.entry(l.to_owned()).or_default() += 1;
        }
        m
    };
    let (ca, cb) = (count(a), count(b));
    let mut out = Vec::new();
    for (line, n) in &ca {
        let m = cb.get(line).copied().unwrap_or(0);
        if m < *n {
            out.push(format!("- {line}"));
        }
    }
    for (line, n) in &cb {
        let m = ca.get(line).copied().unwrap_or(0);
        if m < *n {
            out.push(format!("+ {line}"));
        }
    }
    out
}

fn run(args: &[&str]) -> Output {
    let out = bite_sync().args(args).output().expect("bite-sync runs");
    eprintln!(
        "bite-sync {}\n-- stdout:\n{}\n-- stderr:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn store_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bite-sync-schemas-test-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The only backup folder in the store.
fn backup_folder(dir: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("store dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.remove(0)
}

/// A fresh empty database on the mirror cluster.
async fn fresh_database(name: &str) -> String {
    let admin = connect(&clusters().mirror.url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap();
    clusters().mirror.url(name)
}

/// Backs up `source_url`, then restores it into a fresh database, `--clean` twice into that
/// database, and with the stock tools into another; each time the target must equal the
/// source.
async fn round_trips(name: &str, source_url: &str, target_url: &str) {
    let source = state(source_url).await;
    let dir = store_dir(name);
    let to = format!("file://{}", dir.display());
    let out = run(&["backup", "--source", source_url, "--to", &to]);
    assert!(out.status.success(), "the backup failed");

    let out = run(&["restore", "latest", "--from", &to, "--target", target_url]);
    assert!(out.status.success(), "the restore failed");
    assert_same(&source, &state(target_url).await, "restore");
    for round in 1..=2 {
        let out = run(&[
            "restore", "latest", "--from", &to, "--target", target_url, "--clean",
        ]);
        assert!(out.status.success(), "restore --clean #{round} failed");
        assert_same(
            &source,
            &state(target_url).await,
            &format!("restore --clean #{round}"),
        );
    }

    let stock = fresh_database(&format!("{name}_stock")).await;
    let folder = backup_folder(&dir);
    psql(
        &format!("gunzip -c '{}'/*.sql.gz", folder.display()),
        &stock,
    );
    assert_same(&source, &state(&stock).await, "gunzip | psql");

    let out = run(&[
        "backups", "verify", "latest", "--from", &to, "--source", source_url,
    ]);
    assert!(out.status.success(), "verify failed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_feature_schema_round_trips_whole() {
    let dbs = test_dbs("schemas_features").await;
    load_features(&dbs.source_url).await;
    round_trips(&dbs.name, &dbs.source_url, &dbs.mirror_url).await;
}

#[tokio::test]
async fn pagila_round_trips_whole() {
    let dbs = test_dbs("schemas_pagila").await;
    load_pagila(&dbs.source_url).await;
    round_trips(&dbs.name, &dbs.source_url, &dbs.mirror_url).await;
}

/// Issue 11.9: a restore that fails part-way (an object the target cannot create, a killed
/// connection) leaves the target exactly as it was, and says so; after the cause is fixed the
/// same restore completes.
#[tokio::test]
async fn a_restore_that_fails_part_way_leaves_the_target_as_it_was() {
    let dbs = test_dbs("schemas_all_or_nothing").await;
    load_features(&dbs.source_url).await;
    let source = connect(&dbs.source_url).await;
    // A table whose check waits while the test holds an advisory lock in the target, so the
    // restore can be caught with data half loaded.
    source
        .batch_execute(
            "CREATE FUNCTION gate(id int) RETURNS boolean LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN true; END $$; \
             CREATE TABLE zz_gated (id int PRIMARY KEY CHECK (gate(id))); \
             INSERT INTO zz_gated SELECT generate_series(1, 10);",
        )
        .await
        .unwrap();
    let dir = store_dir("all-or-nothing");
    let to = format!("file://{}", dir.display());
    let backup = || {
        let out = run(&["backup", "--source", &dbs.source_url, "--to", &to, "--json"]);
        assert!(out.status.success(), "the backup failed");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first = backup();
    let out = run(&[
        "restore",
        &first,
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert!(out.status.success());
    let before = state(&dbs.mirror_url).await;
    assert_same(&state(&dbs.source_url).await, &before, "the first restore");

    // A policy for a role only the source's server has: policies come after the data.
    let role = format!("clerk_{}", dbs.name);
    source
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\"; \
             CREATE POLICY clerks ON kitchen.tickets TO \"{role}\" USING (true); \
             INSERT INTO guests (email, name) VALUES ('nuevo@example.com', 'Nuevo');"
        ))
        .await
        .unwrap();
    let second = backup();
    let out = run(&[
        "restore",
        &second,
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
        "--clean",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&role) && stderr.contains("the target is as it was"),
        "{stderr}"
    );
    assert_same(
        &before,
        &state(&dbs.mirror_url).await,
        "a restore that failed at its policies",
    );

    // A connection killed while the data loads.
    let holder = connect(&dbs.mirror_url).await;
    holder
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let child = bite_sync()
        .args([
            "restore",
            &first,
            "--from",
            &to,
            "--target",
            &dbs.mirror_url,
            "--clean",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid: i32 = support::wait_for(
        "the restore to wait at the gated table",
        std::time::Duration::from_secs(60),
        || async {
            holder
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock' AND wait_event = 'advisory' AND query LIKE 'COPY%'",
                    &[],
                )
                .await
                .unwrap()
                .map(|r| r.get(0))
        },
    )
    .await;
    holder
        .batch_execute(&format!(
            "SELECT pg_terminate_backend({pid}); SELECT pg_advisory_unlock(4242)"
        ))
        .await
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "worth retrying: {stderr}");
    assert!(stderr.contains("the target is as it was"), "{stderr}");
    assert_same(
        &before,
        &state(&dbs.mirror_url).await,
        "a restore whose connection was killed",
    );

    // With the role on the target's server too, the same restore goes through.
    let mirror_admin = connect(&clusters().mirror.url("postgres")).await;
    mirror_admin
        .batch_execute(&format!("CREATE ROLE \"{role}\""))
        .await
        .unwrap();
    let out = run(&[
        "restore",
        &second,
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
        "--clean",
    ]);
    assert!(out.status.success());
    assert_same(
        &state(&dbs.source_url).await,
        &state(&dbs.mirror_url).await,
        "the restore after the role was created",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// How a set of tables stands on one side: each table's rows, the partition tree (parent and
/// bound of every partition, the partition key of every partitioned table) and the keys.
async fn tables_state(url: &str, tables: &[&str]) -> (BTreeMap<String, String>, Vec<String>) {
    let client = connect(url).await;
    let mut rows = BTreeMap::new();
    for table in tables {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*)::text || ' rows ' || \
                            coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') \
                     FROM ONLY {table} t"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("reading {table}: {e}"));
        rows.insert(table.to_string(), row.get(0));
    }
    let tree = client
        .query(
            "SELECT format('%s %s %s %s', c.oid::regclass, \
                           coalesce(p.inhparent::regclass::text, '-'), \
                           coalesce(pg_get_expr(c.relpartbound, c.oid), '-'), \
                           coalesce(pg_get_partkeydef(c.oid), '-')) \
             FROM pg_class c LEFT JOIN pg_inherits p ON p.inhrelid = c.oid \
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') \
             UNION ALL \
             SELECT format('%s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid)) \
             FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'f', 'u') \
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (rows, tree)
}

/// `--tables` naming partitioned tables: the backup holds every partition (a sub-partitioned
/// one too), and both a `--tables` backup and `restore --tables` out of a whole-database
/// backup bring the tables back partitioned the same way, with their keys and sequences.
/// (`guests` stays out: its domain's CHECK function is not generated for `--tables`, an open
/// part of issue 11.5.)
#[tokio::test]
async fn named_partitioned_tables_come_back_with_every_partition() {
    let dbs = test_dbs("schemas_partitioned_tables").await;
    load_features(&dbs.source_url).await;
    let leaves = [
        "public.payments_2026_10",
        "public.payments_2026_11",
        "public.payments_2026_12",
        "public.payments_default",
        "public.orders_whatsapp_2026",
        "public.orders_counter",
        "public.marker",
    ];
    let expected = tables_state(&dbs.source_url, &leaves).await;
    let dir = store_dir("partitioned-tables");
    let to = format!("file://{}", dir.display());
    let out = run(&[
        "backup",
        "--source",
        &dbs.source_url,
        "--to",
        &to,
        "--tables",
        "payments,orders_by_channel,marker",
        "--json",
    ]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tables"], leaves.len(), "every partition holds data");
    let some = fresh_database(&format!("{}_some", dbs.name)).await;
    let out = run(&["restore", "latest", "--from", &to, "--target", &some]);
    assert!(out.status.success());
    let (rows, tree) = tables_state(&some, &leaves).await;
    assert_eq!(rows, expected.0, "a --tables backup");
    // Only the tables named, and foreign keys among them (not the one to guests).
    let mut source_tree = expected.1.clone();
    let named = ["payments", "orders_", "marker "];
    source_tree
        .retain(|l| named.iter().any(|n| l.starts_with(n)) && !l.contains("REFERENCES guests"));
    assert_eq!(tree, source_tree, "a --tables backup: the partition tree");
    let client = connect(&some).await;
    client
        .batch_execute(
            "INSERT INTO payments (paid_at, amount) VALUES ('2026-11-15 12:00+00', 1), ('2030-01-01', 2)",
        )
        .await
        .expect("new rows find their partitions and the sequence goes on");
    // Whole-database backup, some tables restored.
    let whole = store_dir("partitioned-whole");
    let whole_to = format!("file://{}", whole.display());
    assert!(
        run(&["backup", "--source", &dbs.source_url, "--to", &whole_to])
            .status
            .success()
    );
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &whole_to,
        "--target",
        &dbs.mirror_url,
        "--tables",
        "payments,orders_by_channel,marker",
    ]);
    assert!(out.status.success());
    let (rows, tree) = tables_state(&dbs.mirror_url, &leaves).await;
    assert_eq!(rows, expected.0, "restore --tables");
    assert_eq!(tree, source_tree, "restore --tables: the partition tree");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&whole);
}

/// A backup made by a user whom row-level security hides rows from must fail, not store the
/// rows it can see as if they were the table (pg_dump turns row_security off for this).
#[tokio::test]
async fn row_security_never_thins_a_backup_silently() {
    let dbs = test_dbs("schemas_row_security").await;
    let source = connect(&dbs.source_url).await;
    let role = format!("reader_{}", dbs.name);
    source
        .batch_execute(&format!(
            "CREATE TABLE secret (id int); INSERT INTO secret VALUES (1), (2), (3); \
             ALTER TABLE secret ENABLE ROW LEVEL SECURITY; \
             CREATE POLICY only_one ON secret USING (id < 2); \
             CREATE ROLE \"{role}\" LOGIN; GRANT SELECT ON secret TO \"{role}\";"
        ))
        .await
        .unwrap();
    let as_reader =
        dbs.source_url
            .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let dir = store_dir("row-security");
    let to = format!("file://{}", dir.display());
    let out = run(&[
        "backup", "--source", &as_reader, "--to", &to, "--tables", "secret",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("row-level security") && stderr.contains("BYPASSRLS"),
        "{stderr}"
    );
    let listed = run(&["backups", "list", "--from", &to, "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "[]",
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database without a single table (functions, a view, a type) is still a database to back
/// up whole, and comes back the same.
#[tokio::test]
async fn a_database_without_tables_backs_up_whole() {
    let dbs = test_dbs("schemas_no_tables").await;
    connect(&dbs.source_url)
        .await
        .batch_execute(
            "CREATE TYPE dish_kind AS ENUM ('starter', 'main'); \
             CREATE FUNCTION price_with_vat(numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS $$ SELECT $1 * 1.21 $$; \
             CREATE VIEW vat AS SELECT price_with_vat(10) AS ten; \
             CREATE SEQUENCE tickets START 100; SELECT nextval('tickets');",
        )
        .await
        .unwrap();
    round_trips(&dbs.name, &dbs.source_url, &dbs.mirror_url).await;
}
