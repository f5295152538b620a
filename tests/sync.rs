//! `bite-sync sync` end to end, against real PostgreSQL clusters, through the real binary.

mod support;

use std::process::Output;
use std::time::Duration;

use support::{
    EVERY_TYPE_ROWS, EVERY_TYPE_SCHEMA, TestDbs, bite_sync, connect, test_dbs, wait_for,
};

/// Runs `bite-sync sync --source .. --mirror .. <args>`.
fn sync(dbs: &TestDbs, args: &[&str]) -> Output {
    bite_sync()
        .args([
            "sync",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.mirror_url,
        ])
        .args(args)
        .output()
        .expect("bite-sync runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
}

/// Creates tables on the source with `sql`, runs a first sync (`--init`), and returns clients
/// for both databases.
async fn synced(dbs: &TestDbs, sql: &str) -> (tokio_postgres::Client, tokio_postgres::Client) {
    let source = connect(&dbs.source_url).await;
    source.batch_execute(sql).await.expect("source set-up");
    assert_exit(&sync(dbs, &["--init"]), 0);
    (source, connect(&dbs.mirror_url).await)
}

/// An order-independent digest of a table's full contents, as PostgreSQL renders them.
async fn digest(client: &tokio_postgres::Client, table: &str) -> (i64, String) {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("digest of {table}: {e}"));
    (row.get(0), row.get(1))
}

/// Column name, type, not null, default and generation expression of a table, as text.
async fn columns(client: &tokio_postgres::Client, schema: &str, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull \
                    || ' ' || a.attidentity::text || a.attgenerated::text || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Constraint and index definitions of a table, sorted.
async fn keys_and_indexes(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> Vec<String> {
    let mut out: Vec<String> = client
        .query(
            "SELECT conname || ': ' || pg_get_constraintdef(con.oid) FROM pg_constraint con \
             JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 \
             UNION ALL \
             SELECT indexname || ': ' || regexp_replace(indexdef, ' ON (ONLY )?\\S+ ', ' ON t ') FROM pg_indexes \
             WHERE schemaname = $1 AND tablename = $2",
            &[&schema, &table],
        )
        .await
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    out.sort();
    out
}

/// Tables next to `support::EVERY_TYPE_SCHEMA`'s `everything`.
const ALL_TYPES: &str = r#"
-- The arrays of user types make `everything` travel in COPY's text format; the same values
-- without them travel in binary.
CREATE TABLE everything_binary AS SELECT id, serial_col, small, big, exact, loose, r, d, flag, txt,
    short, fixed, day, at_time, ts, tstz, span, doc, plain_json, uid, raw, addr, ints, words,
    feeling, price, name_c FROM everything;
-- Only integers, numerics and text: text format too, chosen for speed.
CREATE TABLE notes (id int PRIMARY KEY, amount numeric(8,3), body text, label varchar(10));
INSERT INTO notes VALUES
 (1, 1.5, E'tab\there\nnew line\r\nwindows \\ backslash', 'a,b;c'),
 (2, NULL, '\N', '\.'),
 (3, -0.001, '', ''),
 (4, 99999.999, E'multi\nline\n\nend\\', 'ñandú'),
 (5, 0, NULL, NULL);
"#;

#[tokio::test]
async fn every_column_type_and_awkward_value_round_trips() {
    let dbs = test_dbs("every_column_type").await;
    let source = connect(&dbs.source_url).await;
    for sql in [EVERY_TYPE_SCHEMA, EVERY_TYPE_ROWS, ALL_TYPES] {
        source.batch_execute(sql).await.expect("schema");
    }
    let out = sync(&dbs, &["--init", "--json"]);
    assert_exit(&out, 0);

    let mirror = connect(&dbs.mirror_url).await;
    assert_eq!(
        digest(&source, "public.everything").await,
        digest(&mirror, "public.everything").await
    );
    for table in ["public.everything_binary", "public.notes"] {
        assert_eq!(
            digest(&source, table).await,
            digest(&mirror, table).await,
            "{table}"
        );
    }
    let formats: Vec<(String, String)> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("json")["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_string(),
                t["format"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let format = |t: &str| {
        formats
            .iter()
            .find(|(n, _)| n == t)
            .map(|(_, f)| f.as_str())
    };
    assert_eq!(format("everything"), Some("text"), "{formats:?}");
    assert_eq!(format("everything_binary"), Some("binary"), "{formats:?}");
    assert_eq!(format("notes"), Some("text"), "{formats:?}");
    assert_eq!(
        columns(&source, "public", "everything").await,
        columns(&mirror, "public", "everything").await
    );
    assert_eq!(
        keys_and_indexes(&source, "public", "everything").await,
        keys_and_indexes(&mirror, "public", "everything").await
    );
    // The enum was created as a type, with its labels in order; the domain keeps its check.
    let labels: String = mirror
        .query_one("SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'public.mood'::regtype", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(labels, "sad,ok,happy");
    // Identity and serial sequences continue after the source's values.
    let next: i32 = mirror
        .query_one("INSERT INTO everything DEFAULT VALUES RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 4);
    let err = mirror
        .batch_execute("INSERT INTO everything (price) VALUES (-1)")
        .await
        .expect_err("domain check is enforced on the mirror");
    assert!(
        err.to_string().contains("positive_price") || format!("{err:?}").contains("positive_price")
    );
    let generated: Option<String> = mirror
        .query_one("SELECT doubled::text FROM everything WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(generated.as_deref(), Some("6.28"));
}

#[tokio::test]
async fn awkward_identifiers_sync_by_quoted_and_schema_patterns() {
    let dbs = test_dbs("awkward_identifiers").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            r#"CREATE SCHEMA "My Schema";
               CREATE TABLE "select" ("from" int PRIMARY KEY, "Column With Space" text, "a""b" text);
               CREATE TABLE "Order Items" (id serial PRIMARY KEY, "select" int REFERENCES "select" ("from"));
               CREATE TABLE "My Schema"."Weird.Name" (x int);
               CREATE INDEX "Index With Space" ON "Order Items" ("select");
               INSERT INTO "select" VALUES (1, 'uno', 'q"uote'), (2, NULL, NULL);
               INSERT INTO "Order Items" ("select") VALUES (1), (2), (1);
               INSERT INTO "My Schema"."Weird.Name" VALUES (42);"#,
        )
        .await
        .expect("schema");
    let out = sync(
        &dbs,
        &[
            "--init",
            "--tables",
            r#"select,"Order Items","My Schema".*"#,
        ],
    );
    assert_exit(&out, 0);
    let mirror = connect(&dbs.mirror_url).await;
    for table in [
        r#"public."select""#,
        r#"public."Order Items""#,
        r#""My Schema"."Weird.Name""#,
    ] {
        assert_eq!(
            digest(&source, table).await,
            digest(&mirror, table).await,
            "{table}"
        );
    }
    assert_eq!(
        keys_and_indexes(&source, "public", "Order Items").await,
        keys_and_indexes(&mirror, "public", "Order Items").await
    );
}

#[tokio::test]
async fn sample_restaurant_keeps_foreign_keys_sequences_and_order() {
    let dbs = test_dbs("sample_restaurant").await;
    let source = connect(&dbs.source_url).await;
    bite_sync::sample::load(
        &source,
        bite_sync::sample::SampleSize {
            customers: 200,
            orders: 500,
            items_per_order: 3,
        },
    )
    .await
    .expect("sample");
    let out = sync(&dbs, &["--init", "--json"]);
    assert_exit(&out, 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");
    let order: Vec<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    let pos = |n: &str| order.iter().position(|t| *t == n).unwrap();
    assert!(pos("customers") < pos("orders") && pos("orders") < pos("order_items"));
    assert!(pos("menu_items") < pos("order_items"));
    assert_eq!(
        report["rows"].as_u64(),
        Some(
            200 + 500
                + 1500
                + report["tables"][pos("menu_items")]["rows"]
                    .as_u64()
                    .unwrap()
        )
    );

    let mirror = connect(&dbs.mirror_url).await;
    for t in ["customers", "menu_items", "orders", "order_items"] {
        assert_eq!(digest(&source, t).await, digest(&mirror, t).await, "{t}");
        assert_eq!(
            keys_and_indexes(&source, "public", t).await,
            keys_and_indexes(&mirror, "public", t).await,
            "{t}"
        );
    }
    let seq = "SELECT last_value FROM public.orders_id_seq";
    let want: i64 = source.query_one(seq, &[]).await.unwrap().get(0);
    let got: i64 = mirror.query_one(seq, &[]).await.unwrap().get(0);
    assert_eq!(got, want);

    // Syncing one table alone keeps its foreign keys to, and from, the tables left alone.
    source
        .batch_execute("UPDATE orders SET notes = 'again' WHERE id % 7 = 0")
        .await
        .unwrap();
    let out = sync(&dbs, &["--tables", "orders"]);
    assert_exit(&out, 0);
    assert_eq!(
        digest(&source, "orders").await,
        digest(&mirror, "orders").await
    );
    assert_eq!(
        keys_and_indexes(&source, "public", "orders").await,
        keys_and_indexes(&mirror, "public", "orders").await
    );
    assert_eq!(
        keys_and_indexes(&source, "public", "order_items").await,
        keys_and_indexes(&mirror, "public", "order_items").await
    );
    let runs: i64 = mirror
        .query_one(
            "SELECT count(*) FROM bite_sync.sync_runs WHERE outcome = 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 2);
}

#[tokio::test]
async fn dry_run_changes_nothing_and_shows_the_ddl() {
    let dbs = test_dbs("dry_run").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE customers (id bigserial PRIMARY KEY, phone text UNIQUE)")
        .await
        .unwrap();
    let out = sync(&dbs, &["--dry-run", "--tables", "customers"]);
    assert_exit(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CREATE TABLE"), "{text}");
    assert!(text.contains("needs --init"), "{text}");
    let mirror = connect(&dbs.mirror_url).await;
    let objects: i64 = mirror
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(objects, 0, "a dry run created objects on the mirror");
}

#[tokio::test]
async fn refuses_to_sync_a_database_onto_itself() {
    let dbs = test_dbs("same_database").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let out = bite_sync()
        .args([
            "sync",
            "--init",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.source_url,
        ])
        .output()
        .unwrap();
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("same database"), "{}", stderr(&out));
    assert_eq!(digest(&source, "t").await.0, 1);
}

#[tokio::test]
async fn first_write_needs_init_and_leaves_the_database_alone() {
    let dbs = test_dbs("needs_init").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    let mirror = connect(&dbs.mirror_url).await;
    mirror
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (99)")
        .await
        .unwrap();
    let out = sync(&dbs, &[]);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("--init"), "{}", stderr(&out));
    assert_eq!(
        digest(&mirror, "t").await.0,
        1,
        "production data was touched"
    );
    let schema: bool = mirror
        .query_one("SELECT to_regnamespace('bite_sync') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema);
    assert_exit(&sync(&dbs, &["--init"]), 0);
    assert_eq!(digest(&mirror, "t").await, digest(&source, "t").await);
}

#[tokio::test]
async fn incompatible_column_change_is_refused_by_name() {
    let dbs = test_dbs("incompatible").await;
    let (source, mirror) = synced(&dbs, "CREATE TABLE orders (id int PRIMARY KEY, total numeric(12,2)); INSERT INTO orders VALUES (1, 10)").await;
    mirror
        .batch_execute("ALTER TABLE orders ALTER COLUMN total TYPE integer")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO orders VALUES (2, 20)")
        .await
        .unwrap();
    let out = sync(&dbs, &[]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(
            "column total of orders is numeric(12,2) on the source but integer on the mirror"
        ),
        "{err}"
    );
    assert_eq!(digest(&mirror, "orders").await.0, 1);
}

#[tokio::test]
async fn missing_columns_are_added() {
    let dbs = test_dbs("add_columns").await;
    let (source, mirror) = synced(&dbs, "CREATE TABLE customers (id int PRIMARY KEY, name text); INSERT INTO customers VALUES (1, 'a')").await;

    // Schema-only: the column is added in place and the mirror's rows stay.
    source
        .batch_execute("ALTER TABLE customers ADD COLUMN email text DEFAULT 'x'; INSERT INTO customers VALUES (2, 'b')")
        .await
        .unwrap();
    let out = sync(&dbs, &["--schema-only"]);
    assert_exit(&out, 0);
    assert_eq!(
        columns(&source, "public", "customers").await,
        columns(&mirror, "public", "customers").await
    );
    assert_eq!(digest(&mirror, "customers").await.0, 1);

    // A full sync adds columns and copies rows.
    source
        .batch_execute("ALTER TABLE customers ADD COLUMN vip boolean")
        .await
        .unwrap();
    assert_exit(&sync(&dbs, &[]), 0);
    assert_eq!(
        digest(&source, "customers").await,
        digest(&mirror, "customers").await
    );

    // Data-only refuses a table that lacks columns, naming them.
    source
        .batch_execute("ALTER TABLE customers ADD COLUMN notes text")
        .await
        .unwrap();
    let out = sync(&dbs, &["--data-only"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("notes"), "{}", stderr(&out));
}

#[tokio::test]
async fn unknown_tables_get_near_names() {
    let dbs = test_dbs("unknown_table").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE customers (id int)")
        .await
        .unwrap();
    let out = sync(&dbs, &["--init", "--tables", "custmers"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("did you mean customers?"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn grants_triggers_and_mirror_only_foreign_keys_survive_a_resync() {
    let dbs = test_dbs("grants_survive").await;
    let (source, mirror) = synced(&dbs, "CREATE TABLE customers (id int PRIMARY KEY); INSERT INTO customers SELECT generate_series(1, 10)").await;
    let role = format!("reader_{}", dbs.name);
    mirror
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             GRANT SELECT ON customers TO {role}; \
             CREATE TABLE notes (customer_id int REFERENCES customers (id), body text); \
             INSERT INTO notes VALUES (3, 'likes paella'); \
             CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN RETURN NEW; END $f$; \
             CREATE TRIGGER touch_customers BEFORE UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION touch();"
        ))
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO customers VALUES (11)")
        .await
        .unwrap();
    let out = sync(&dbs, &[]);
    assert_exit(&out, 0);
    assert_eq!(digest(&mirror, "customers").await.0, 11);
    let can: bool = mirror
        .query_one(
            &format!("SELECT has_table_privilege('{role}', 'public.customers', 'SELECT')"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(can, "grant lost");
    let fk: bool = mirror
        .query_one(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = 'public.notes'::regclass AND contype = 'f' \
             AND confrelid = 'public.customers'::regclass",
            &[],
        )
        .await
        .expect("the mirror-only foreign key still points at customers")
        .get(0);
    assert!(fk, "the re-pointed key should be validated");
    let triggers: i64 = mirror
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.customers'::regclass AND NOT tgisinternal", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 1);
}

#[tokio::test]
async fn views_on_a_mirror_table_stop_the_sync_with_a_clear_message() {
    let dbs = test_dbs("views_block").await;
    let (_source, mirror) = synced(
        &dbs,
        "CREATE TABLE menu (id int); INSERT INTO menu VALUES (1)",
    )
    .await;
    mirror
        .batch_execute("CREATE VIEW menu_view AS SELECT * FROM menu")
        .await
        .unwrap();
    let out = sync(&dbs, &[]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("view public.menu_view"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_second_run_is_refused_while_one_holds_the_mirror() {
    let dbs = test_dbs("busy").await;
    let (_source, mirror) = synced(&dbs, "CREATE TABLE t (x int)").await;
    // The run lock bite-sync takes (see sync::RUN_LOCK).
    mirror
        .batch_execute("SELECT pg_advisory_lock(x'626974650002'::bigint)")
        .await
        .unwrap();
    let out = sync(&dbs, &[]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("another bite-sync run"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn connection_errors_name_the_server_and_never_the_password() {
    let dbs = test_dbs("refused").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let out = bite_sync()
        .args([
            "sync",
            "--source",
            &dbs.source_url,
            "--mirror",
            &format!("postgres://app:sup3rs3cret@127.0.0.1:{port}/railway"),
        ])
        .output()
        .unwrap();
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("railway"), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("sup3rs3cret"), "password leaked: {err}");
}

#[tokio::test]
async fn missing_privileges_are_named() {
    let dbs = test_dbs("privileges").await;
    let source = connect(&dbs.source_url).await;
    let role = format!("nosel_{}", dbs.name);
    source
        .batch_execute(&format!(
            "CREATE TABLE secret (x int); \
             DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        ))
        .await
        .unwrap();
    let url = dbs.source_url.replacen("postgres@", &format!("{role}@"), 1);
    let out = bite_sync()
        .args([
            "sync",
            "--init",
            "--source",
            &url,
            "--mirror",
            &dbs.mirror_url,
        ])
        .output()
        .unwrap();
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("needs SELECT"), "{}", stderr(&out));
}

#[tokio::test]
async fn config_file_problems_are_listed_together() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[mirror]\nurl = \"postgres://u:pw@h/db?sslmode=sometimes\"\n[sync]\njobs = 0\nlock_timeout = \"soon\"\n",
    )
    .unwrap();
    let out = bite_sync()
        .args(["--config", file.to_str().unwrap(), "sync"])
        .output()
        .unwrap();
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("3 problems"), "{err}");
    for key in ["mirror.url", "sync.jobs", "sync.lock_timeout"] {
        assert!(err.contains(key), "{key} missing: {err}");
    }
    assert!(!err.contains(":pw@"), "{err}");
}

/// A table big enough that copying it takes a while, filled on the source and synced once.
async fn big_table(dbs: &TestDbs, rows: i64) -> (tokio_postgres::Client, tokio_postgres::Client) {
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(&format!(
            "CREATE TABLE events (id bigint PRIMARY KEY, body text NOT NULL); \
             INSERT INTO events SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    assert_exit(&sync(dbs, &["--init"]), 0);
    // Change the source, so the old and new contents differ.
    source
        .batch_execute("UPDATE events SET body = 'new' WHERE id % 2 = 0; INSERT INTO events VALUES (0, 'zero')")
        .await
        .unwrap();
    let mirror = connect(&dbs.mirror_url).await;
    (source, mirror)
}

/// Waits until a COPY into the mirror database of `dbs` has received rows; returns its
/// backend's pid.
async fn copy_in_progress(dbs: &TestDbs) -> i32 {
    let observer = connect(&dbs.mirror_url).await;
    let db = dbs.name.clone();
    wait_for("a COPY into the mirror to receive rows", Duration::from_secs(60), || {
        let observer = &observer;
        let db = db.clone();
        async move {
            observer
                .query_opt(
                    "SELECT pid FROM pg_stat_progress_copy WHERE datname = $1 AND command = 'COPY FROM' AND tuples_processed > 0",
                    &[&db],
                )
                .await
                .unwrap()
                .map(|r| r.get(0))
        }
    })
    .await
}

/// Starts `bite-sync sync` on `dbs` in the background.
fn spawn_sync(dbs: &TestDbs, args: &[&str]) -> std::process::Child {
    bite_sync()
        .args([
            "sync",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.mirror_url,
        ])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bite-sync starts")
}

/// After an interrupted run: the mirror still holds `before`, the next run succeeds and
/// copies the source, and no staging schema is left.
async fn assert_interrupted_run_left_no_trace(
    dbs: &TestDbs,
    source: &tokio_postgres::Client,
    mirror: &tokio_postgres::Client,
    before: (i64, String),
) {
    assert_eq!(digest(mirror, "events").await, before, "old rows changed");
    assert_exit(&sync(dbs, &[]), 0);
    assert_eq!(
        digest(mirror, "events").await,
        digest(source, "events").await
    );
    no_staging_left(mirror).await;
}

async fn no_staging_left(mirror: &tokio_postgres::Client) {
    let left: i64 = mirror
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bite_sync_stage_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "staging schemas left behind");
}

#[tokio::test]
async fn kill_during_copy_keeps_the_old_rows_and_the_next_run_cleans_up() {
    let dbs = test_dbs("kill_copy").await;
    let (source, mirror) = big_table(&dbs, 400_000).await;
    let before = digest(&mirror, "events").await;

    let mut child = spawn_sync(&dbs, &[]);
    copy_in_progress(&dbs).await;
    let observer = connect(&dbs.mirror_url).await;
    let db = dbs.name.clone();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert_eq!(digest(&mirror, "events").await, before, "old rows changed");
    wait_for("the killed run's backends to go", Duration::from_secs(30), || {
        let observer = &observer;
        let db = db.clone();
        async move {
            let n: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'bite-sync'",
                    &[&db],
                )
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        }
    })
    .await;
    assert_exit(&sync(&dbs, &[]), 0);
    assert_eq!(
        digest(&mirror, "events").await,
        digest(&source, "events").await
    );
    no_staging_left(&mirror).await;
    let abandoned: i64 = mirror
        .query_one(
            "SELECT count(*) FROM bite_sync.sync_runs WHERE outcome = 'abandoned'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(abandoned, 1);
}

#[tokio::test]
async fn kill_during_the_swap_keeps_the_old_rows() {
    let dbs = test_dbs("kill_swap").await;
    let (source, mirror) = big_table(&dbs, 1_000).await;
    let before = digest(&mirror, "events").await;

    // A reader in an open transaction holds the table, so the swap waits on its lock.
    let mut reader = connect(&dbs.mirror_url).await;
    let tx = reader.transaction().await.unwrap();
    tx.query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap();

    let mut child = spawn_sync(&dbs, &["--lock-timeout", "120s"]);
    let observer = connect(&dbs.mirror_url).await;
    let db = dbs.name.clone();
    wait_for("the swap to wait for the reader's lock", Duration::from_secs(60), || {
        let observer = &observer;
        let db = db.clone();
        async move {
            let n: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock' \
                     AND query LIKE 'LOCK TABLE%'",
                    &[&db],
                )
                .await
                .unwrap()
                .get(0);
            (n > 0).then_some(())
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    tx.commit().await.unwrap();

    assert_interrupted_run_left_no_trace(&dbs, &source, &mirror, before).await;
}

#[tokio::test]
async fn a_cut_mirror_connection_fails_the_run_and_loses_nothing() {
    let dbs = test_dbs("cut_connection").await;
    let (source, mirror) = big_table(&dbs, 400_000).await;
    let before = digest(&mirror, "events").await;

    let child = spawn_sync(&dbs, &[]);
    let pid = copy_in_progress(&dbs).await;
    let observer = connect(&dbs.mirror_url).await;
    observer
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("events"), "{}", stderr(&out));
    assert_interrupted_run_left_no_trace(&dbs, &source, &mirror, before).await;
}

#[tokio::test]
async fn readers_never_see_an_empty_or_partial_table() {
    let dbs = test_dbs("readers").await;
    let (source, mirror) = big_table(&dbs, 100_000).await;
    let (old_count, _) = digest(&mirror, "events").await;
    let (new_count, _) = digest(&source, "events").await;
    assert_ne!(old_count, new_count);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while !reader_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let n: i64 = mirror
                .query_one("SELECT count(*) FROM events", &[])
                .await
                .expect("reader query never fails")
                .get(0);
            seen.push(n);
        }
        seen
    });
    let out = tokio::task::spawn_blocking({
        let dbs_source = dbs.source_url.clone();
        let dbs_mirror = dbs.mirror_url.clone();
        move || {
            bite_sync()
                .args(["sync", "--source", &dbs_source, "--mirror", &dbs_mirror])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_exit(&out, 0);
    // Keep reading a little after the swap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.await.unwrap();
    assert!(seen.len() > 10, "the reader barely ran: {seen:?}");
    assert!(
        seen.iter().all(|&n| n == old_count || n == new_count),
        "a reader saw a count that is neither the old nor the new one"
    );
    assert_eq!(seen.first(), Some(&old_count));
    assert_eq!(seen.last(), Some(&new_count));
}

#[tokio::test]
async fn ctrl_c_during_the_copy_exits_130_and_keeps_the_old_rows() {
    let dbs = test_dbs("ctrl_c").await;
    let (source, mirror) = big_table(&dbs, 400_000).await;
    let before = digest(&mirror, "events").await;

    let child = spawn_sync(&dbs, &[]);
    copy_in_progress(&dbs).await;
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_exit(&out, 130);
    assert!(
        stderr(&out).contains("interrupted before the new tables were swapped in"),
        "{}",
        stderr(&out)
    );
    assert_interrupted_run_left_no_trace(&dbs, &source, &mirror, before).await;
}

#[tokio::test]
async fn not_valid_constraints_stay_not_valid_and_old_rows_still_copy() {
    let dbs = test_dbs("not_valid").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY); \
             CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric); \
             INSERT INTO customers VALUES (1); \
             INSERT INTO orders VALUES (1, 1, 10), (2, 99, -5); \
             ALTER TABLE orders ADD CONSTRAINT total_positive CHECK (total >= 0) NOT VALID; \
             ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) \
                 REFERENCES customers (id) NOT VALID;",
        )
        .await
        .unwrap();
    let out = sync(&dbs, &["--init"]);
    assert_exit(&out, 0);
    let mirror = connect(&dbs.mirror_url).await;
    assert_eq!(
        digest(&source, "orders").await,
        digest(&mirror, "orders").await
    );
    assert_eq!(
        keys_and_indexes(&source, "public", "orders").await,
        keys_and_indexes(&mirror, "public", "orders").await
    );
    // Still enforced for new rows.
    assert!(
        mirror
            .batch_execute("INSERT INTO orders VALUES (3, 1, -1)")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_not_valid_key_to_a_table_left_on_the_mirror_stays_not_valid() {
    let dbs = test_dbs("not_valid_outside").await;
    let (source, mirror) = synced(
        &dbs,
        "CREATE TABLE customers (id int PRIMARY KEY); \
         CREATE TABLE orders (id int PRIMARY KEY, customer_id int); \
         INSERT INTO customers VALUES (1); INSERT INTO orders VALUES (1, 1), (2, 99); \
         ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) \
             REFERENCES customers (id) NOT VALID;",
    )
    .await;
    // Only orders this time: its key points at the customers table already on the mirror.
    let out = sync(&dbs, &["--tables", "orders"]);
    assert_exit(&out, 0);
    assert_eq!(
        digest(&source, "orders").await,
        digest(&mirror, "orders").await
    );
    assert_eq!(
        keys_and_indexes(&source, "public", "orders").await,
        keys_and_indexes(&mirror, "public", "orders").await
    );
}

async fn assert_mirror_equals_source(dbs: &TestDbs, absent: &[&str]) {
    support::schemas::assert_mirror_equals_source(&dbs.source_url, &dbs.mirror_url, absent).await;
}

/// Issue 11's feature schema, whole: partitioned tables (a default partition, a
/// sub-partitioned one) built partitioned the same way, a composite-type key, sequences used
/// only by defaults (one through a function), an identity, a table without columns, an ICU
/// collation, a domain whose check calls a function of ours, citext and hstore.
#[tokio::test]
async fn the_feature_schema_syncs_whole_and_equal() {
    let dbs = test_dbs("sync_features").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(support::schemas::FEATURES)
        .await
        .expect("feature schema");
    let out = sync(&dbs, &["--init"]);
    assert_exit(&out, 0);
    // The materialized view is not a table a sync copies.
    assert_mirror_equals_source(&dbs, &["revenue_by_month", "revenue_by_month_month"]).await;
    // A second sync replaces what the first built, partitions and all.
    source
        .batch_execute("INSERT INTO payments (paid_at, amount) VALUES ('2026-12-24 21:00+00', 80)")
        .await
        .unwrap();
    assert_exit(&sync(&dbs, &[]), 0);
    assert_mirror_equals_source(&dbs, &["revenue_by_month", "revenue_by_month_month"]).await;
}

#[tokio::test]
async fn a_partition_named_alone_is_refused_naming_its_table() {
    let dbs = test_dbs("sync_partition_alone").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(support::schemas::FEATURES)
        .await
        .expect("feature schema");
    let out = sync(&dbs, &["--init", "--tables", "payments_2026_11"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("payments_2026_11 is a partition of payments"),
        "{}",
        stderr(&out)
    );
    let out = sync(&dbs, &["--init", "--tables", "orders_whatsapp_2026"]);
    assert!(
        stderr(&out).contains("orders_whatsapp_2026 is a partition of orders_by_channel"),
        "the root of a sub-partition: {}",
        stderr(&out)
    );
}

#[tokio::test]
async fn flatten_partitions_builds_one_plain_table() {
    let dbs = test_dbs("sync_flatten").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(support::schemas::FEATURES)
        .await
        .expect("feature schema");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bite-sync.toml");
    std::fs::write(&config, "[sync]\nflatten_partitions = true\n").unwrap();
    let out = sync(
        &dbs,
        &[
            "--init",
            "--config",
            config.to_str().unwrap(),
            "--tables",
            "guests,payments,orders_by_channel",
        ],
    );
    assert_exit(&out, 0);
    let mirror = connect(&dbs.mirror_url).await;
    let kinds = support::strings(
        &mirror,
        "SELECT relname::text || ' ' || relkind::text FROM pg_class WHERE (relname LIKE 'payments%' OR relname LIKE 'orders_%') AND relkind IN ('r', 'p') ORDER BY 1",
    )
    .await;
    assert_eq!(kinds, ["orders_by_channel r", "payments r"]);
    assert_eq!(
        digest(&mirror, "payments").await,
        digest(&source, "payments").await
    );
    assert_eq!(
        digest(&mirror, "orders_by_channel").await,
        digest(&source, "orders_by_channel").await
    );
    // Its key and index are the partitioned table's own.
    assert_eq!(
        keys_and_indexes(&mirror, "public", "payments").await,
        keys_and_indexes(&source, "public", "payments").await
    );
}

/// Pagila, a public sample nobody here wrote: a monthly-partitioned payment table whose
/// partitions have their own indexes and foreign keys, domains, an enum, tsvector, arrays.
#[tokio::test]
async fn pagila_syncs_whole_and_equal() {
    let dbs = test_dbs("sync_pagila").await;
    support::schemas::load_pagila(&dbs.source_url);
    let out = sync(&dbs, &["--init"]);
    assert_exit(&out, 0);
    // Its materialized view is not a table, and its domain bıgınt no table uses.
    assert_mirror_equals_source(&dbs, &["rental_by_category", "rental_category", "bıgınt"]).await;
}
