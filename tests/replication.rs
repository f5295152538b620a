//! `bite-sync run`: continuous replication against real PostgreSQL clusters.
//!
//! Each test gets its own databases and its own slot and publication (named after its
//! database), runs the real binary as a daemon, changes the source, and waits until the
//! mirror's tables have exactly the source's contents (compared by digest of every row).

mod support;

use std::process::Stdio;
use std::time::Duration;

use bite_sync::pg::cluster::{ClusterOptions, TempCluster};
use bite_sync::proxy::Proxy;
use support::{
    Daemon, EVERY_TYPE_ROWS, EVERY_TYPE_SCHEMA, TestDbs, bite_sync, connect, test_dbs, wait_for,
};

/// A running `bite-sync run`; killed (and its log printed) if the test ends without stopping it.
impl Daemon {
    fn start(dbs: &TestDbs, tables: &str, extra: &[&str]) -> Daemon {
        Daemon::start_via(dbs, (&dbs.source_url, &dbs.mirror_url), tables, extra)
    }

    /// Starts with other URLs for the same databases (through a proxy, say).
    fn start_via(dbs: &TestDbs, urls: (&str, &str), tables: &str, extra: &[&str]) -> Daemon {
        let log = bite_sync()
            .get_current_dir()
            .expect("bite_sync() sets a working dir")
            .join("daemon.log");
        let mut daemon = Daemon::new(log);
        let mut args = vec!["--init"];
        args.extend_from_slice(extra);
        daemon.spawn(dbs, urls, tables, &args);
        daemon
    }

    /// Starts again with the same log file (a restart after a kill or a stop).
    fn restart(&mut self, dbs: &TestDbs, tables: &str, extra: &[&str]) {
        self.spawn(dbs, (&dbs.source_url, &dbs.mirror_url), tables, extra);
    }

    fn spawn(
        &mut self,
        dbs: &TestDbs,
        (source, mirror): (&str, &str),
        tables: &str,
        extra: &[&str],
    ) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = bite_sync()
            .args(["run", "--source", source, "--mirror", mirror])
            .args([
                "--tables",
                tables,
                "--slot",
                &dbs.name,
                "--publication",
                &dbs.name,
            ])
            .args(extra)
            .env("BITE_LOG", "bite_sync=debug")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn bite-sync run");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// An order-independent digest of a table's full contents, as PostgreSQL renders them.
async fn digest(client: &tokio_postgres::Client, table: &str) -> Option<(i64, String)> {
    client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .ok()
        .map(|row| (row.get(0), row.get(1)))
}

/// The source position the mirror records for a test's slot.
async fn recorded_lsn(mirror: &tokio_postgres::Client, slot: &str) -> String {
    mirror
        .query_one(
            "SELECT lsn::text FROM bite_sync.replication_state WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("the mirror's replication state")
        .get(0)
}

/// Waits until every table has the same contents on both sides.
async fn wait_equal(dbs: &TestDbs, tables: &[&str], timeout: Duration) {
    let source = connect(&dbs.source_url).await;
    let mirror = connect(&dbs.mirror_url).await;
    for table in tables {
        let want = digest(&source, table).await.expect("source digest");
        wait_for(
            &format!(
                "{table} on the mirror to equal the source ({} rows)",
                want.0
            ),
            timeout,
            || async {
                let got = digest(&mirror, table).await;
                (got.as_ref() == Some(&want)).then_some(())
            },
        )
        .await;
    }
}

const WAIT: Duration = Duration::from_secs(60);

const KEYED_NAMES: &str = r#"CREATE TABLE "Order Items" ("order" int, "line no" int, "select" text, PRIMARY KEY ("order", "line no"))"#;

#[tokio::test]
async fn every_change_of_every_type_streams_to_the_mirror() {
    let dbs = test_dbs("repl_every_type").await;
    let source = connect(&dbs.source_url).await;
    for sql in [EVERY_TYPE_SCHEMA, KEYED_NAMES] {
        source.batch_execute(sql).await.expect("schema");
    }
    source
        .batch_execute(EVERY_TYPE_ROWS)
        .await
        .expect("rows before the start");
    source
        .batch_execute(
            r#"INSERT INTO "Order Items" VALUES (1, 1, 'from'), (1, 2, E'it''s'), (2, 1, NULL)"#,
        )
        .await
        .expect("items before the start");
    let daemon = Daemon::start(&dbs, r#"everything,"Order Items""#, &[]);
    let tables = ["public.everything", r#"public."Order Items""#];
    wait_equal(&dbs, &tables, WAIT).await;

    // Inserts, updates of every column, deletes and a key change, in several transactions.
    source
        .batch_execute(EVERY_TYPE_ROWS)
        .await
        .expect("inserts");
    source
        .batch_execute(
            r#"UPDATE everything SET txt = txt || E' \\ more\ttabs', doc = doc || '{"x": "y"}', feeling = 'ok',
                      ints = CASE WHEN array_ndims(ints) > 1 THEN ints ELSE ints || 9 END, span = span + interval '1 hour', raw = raw || '\x01', tstz = tstz + interval '1 second'
               WHERE id % 2 = 0;
               DELETE FROM everything WHERE id = 3;
               UPDATE "Order Items" SET "line no" = 10, "select" = 'moved' WHERE "order" = 1 AND "line no" = 2;
               BEGIN; DELETE FROM "Order Items" WHERE "order" = 2; INSERT INTO "Order Items" VALUES (2, 1, 'again'); COMMIT;"#,
        )
        .await
        .expect("changes");
    wait_equal(&dbs, &tables, WAIT).await;

    // TRUNCATE of both tables together, then new rows.
    source
        .batch_execute(
            r#"TRUNCATE everything, "Order Items" RESTART IDENTITY;
               INSERT INTO "Order Items" VALUES (5, 5, 'after truncate');"#,
        )
        .await
        .expect("truncate");
    source
        .batch_execute(EVERY_TYPE_ROWS)
        .await
        .expect("inserts after truncate");
    wait_equal(&dbs, &tables, WAIT).await;
    drop(daemon);
}

#[tokio::test]
async fn unchanged_toast_values_keep_the_mirrors_copy() {
    let dbs = test_dbs("repl_toast").await;
    let source = connect(&dbs.source_url).await;
    // md5 chains do not compress, so the value is stored out of line (TOASTed).
    source
        .batch_execute(
            "CREATE TABLE menu (id int PRIMARY KEY, price int, photo text);
             INSERT INTO menu SELECT 1, 10, string_agg(md5(i::text), '') FROM generate_series(1, 4000) i;",
        )
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "menu", &[]);
    wait_equal(&dbs, &["public.menu"], WAIT).await;
    source
        .batch_execute("UPDATE menu SET price = 11 WHERE id = 1")
        .await
        .expect("update");
    wait_equal(&dbs, &["public.menu"], WAIT).await;
    let mirror = connect(&dbs.mirror_url).await;
    let length: i32 = mirror
        .query_one("SELECT length(photo) FROM menu WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        length,
        4000 * 32,
        "the photo survived an update of another column"
    );
    drop(daemon);
}

#[tokio::test]
async fn sigterm_confirms_the_last_batch_and_a_restart_resumes_without_loss() {
    let dbs = test_dbs("repl_restart").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, total numeric(10,2), status text);
             INSERT INTO orders (total, status) SELECT i, 'new' FROM generate_series(1, 1000) i;",
        )
        .await
        .expect("schema");
    let mut daemon = Daemon::start(&dbs, "orders", &[]);
    wait_equal(&dbs, &["public.orders"], WAIT).await;
    source
        .batch_execute(
            "INSERT INTO orders (total, status) SELECT i, 'late' FROM generate_series(1, 500) i",
        )
        .await
        .expect("insert");
    wait_equal(&dbs, &["public.orders"], WAIT).await;
    assert_eq!(
        daemon.terminate(Duration::from_secs(10)),
        Some(0),
        "SIGTERM stops within seconds with exit code 0\n{}",
        daemon.log()
    );
    // The slot's confirmed position is the mirror's recorded one.
    let mirror = connect(&dbs.mirror_url).await;
    let recorded = recorded_lsn(&mirror, &dbs.name).await;
    let confirmed: String = source
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&dbs.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(confirmed, recorded);
    // The mirror's sequence is at the source's.
    let (src_seq, mirror_seq): (i64, i64) = (
        source
            .query_one("SELECT last_value FROM orders_id_seq", &[])
            .await
            .unwrap()
            .get(0),
        mirror
            .query_one("SELECT last_value FROM orders_id_seq", &[])
            .await
            .unwrap()
            .get(0),
    );
    assert_eq!(mirror_seq, src_seq);

    // Changes while it is down arrive after the restart, once.
    source
        .batch_execute("UPDATE orders SET status = 'paid' WHERE id % 3 = 0; DELETE FROM orders WHERE id % 7 = 0")
        .await
        .expect("changes while down");
    daemon.restart(&dbs, "orders", &[]);
    wait_equal(&dbs, &["public.orders"], WAIT).await;
}

#[tokio::test]
async fn a_table_without_a_key_is_refused_with_the_fix() {
    let dbs = test_dbs("repl_no_key").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE audit (at timestamptz, what text); CREATE TABLE ok (id int PRIMARY KEY);",
        )
        .await
        .expect("schema");
    let mut daemon = Daemon::start(&dbs, "audit,ok", &[]);
    assert_eq!(daemon.exit_code(Duration::from_secs(30)), Some(2));
    let log = daemon.log();
    assert!(
        log.contains(r#"ALTER TABLE "public"."audit" REPLICA IDENTITY FULL"#),
        "{log}"
    );
    assert!(
        !log.contains(r#""public"."ok""#),
        "only the table without a key is named: {log}"
    );
}

const RESTAURANT: &str = r#"
CREATE TABLE customers (id bigserial PRIMARY KEY, phone text UNIQUE, prefs jsonb NOT NULL DEFAULT '{}');
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers, status text NOT NULL,
                     total numeric(10,2), created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE order_items (order_id bigint REFERENCES orders ON DELETE CASCADE, line int, qty int,
                          PRIMARY KEY (order_id, line));
INSERT INTO customers (phone) SELECT '+34600' || i FROM generate_series(1, 200) i;
INSERT INTO orders (customer_id, status, total) SELECT 1 + i % 200, 'new', i FROM generate_series(1, 500) i;
"#;

const RESTAURANT_TABLES: [&str; 3] = ["public.customers", "public.orders", "public.order_items"];

/// The benchmark's transaction: an order with two items, another order's status, a
/// customer's preferences.
const ORDER_TXN: &str = "
BEGIN;
WITH o AS (INSERT INTO orders (customer_id, status, total) VALUES (1 + (random() * 199)::int, 'new', 12.5) RETURNING id)
INSERT INTO order_items SELECT id, l, l FROM o, generate_series(1, 2) l;
UPDATE orders SET status = 'paid' WHERE id = (SELECT 1 + (random() * 499)::int);
UPDATE customers SET prefs = jsonb_set(prefs, '{visits}', to_jsonb(coalesce((prefs->>'visits')::int, 0) + 1))
 WHERE id = 1 + (random() * 199)::int;
COMMIT;";

/// Runs [`ORDER_TXN`] in a loop until `stop` fires; returns how many committed.
fn workload(
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = connect(&url).await;
        let mut n = 0;
        while !stop.is_cancelled() {
            client
                .batch_execute(ORDER_TXN)
                .await
                .expect("workload transaction");
            n += 1;
        }
        n
    })
}

/// A cheap pseudo-random sequence (no test needs more), seeded from the clock and printed.
struct Lcg(u64);
impl Lcg {
    fn from_clock() -> Lcg {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("seed {seed}");
        Lcg(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[tokio::test]
async fn twenty_kill_9s_under_load_lose_and_duplicate_nothing() {
    let dbs = test_dbs("repl_kill9").await;
    let source = connect(&dbs.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let tables = "customers,orders,order_items";
    let mut daemon = Daemon::start(&dbs, tables, &[]);
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let load = workload(dbs.source_url.clone(), stop.clone());
    let mut rng = Lcg::from_clock();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100 + rng.below(600))).await;
        daemon.kill9();
        daemon.restart(&dbs, tables, &[]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let committed = load.await.expect("workload");
    assert!(
        committed > 50,
        "the workload ran ({committed} transactions)"
    );
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    // And the position it resumes from is the mirror's own.
    let mirror = connect(&dbs.mirror_url).await;
    assert_ne!(recorded_lsn(&mirror, &dbs.name).await, "0/0");
    drop(daemon);
}

/// `bite-sync status --json` for a test's slot.
fn status(dbs: &TestDbs) -> serde_json::Value {
    let out = bite_sync()
        .args([
            "status",
            "--json",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.mirror_url,
        ])
        .args(["--slot", &dbs.name])
        .output()
        .expect("status");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn an_added_column_flows_and_a_type_change_pauses_only_its_table() {
    let dbs = test_dbs("repl_schema_change").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, n int); CREATE TABLE b (id int PRIMARY KEY, n int);
             INSERT INTO a VALUES (1, 1); INSERT INTO b VALUES (1, 1);",
        )
        .await
        .expect("schema");
    let mut daemon = Daemon::start(&dbs, "a,b", &[]);
    wait_equal(&dbs, &["public.a", "public.b"], WAIT).await;

    source
        .batch_execute(
            "ALTER TABLE a ADD COLUMN note text DEFAULT 'hola'; INSERT INTO a VALUES (2, 2, 'adiós');
             ALTER TABLE b ALTER COLUMN n TYPE bigint; INSERT INTO b VALUES (2, 20000000000);
             INSERT INTO a VALUES (3, 3);",
        )
        .await
        .expect("schema changes");
    wait_equal(&dbs, &["public.a"], WAIT).await;
    let paused = wait_for("b to be paused in status", WAIT, || async {
        let s = status(&dbs);
        let tables = s["mirror"]["tables"].as_array()?.clone();
        let b = tables.iter().find(|t| t["table"] == "b")?.clone();
        (b["state"] == "paused").then_some((s, b))
    })
    .await;
    let reason = paused.1["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("bigint on the source but integer on the mirror"),
        "{reason}"
    );
    assert_eq!(paused.0["healthy"], false);
    // a keeps flowing while b is paused.
    source
        .batch_execute("UPDATE a SET n = 30 WHERE id = 3")
        .await
        .unwrap();
    wait_equal(&dbs, &["public.a"], WAIT).await;

    // Fixing the mirror and restarting copies b again and streams it.
    let mirror = connect(&dbs.mirror_url).await;
    mirror
        .batch_execute("ALTER TABLE b ALTER COLUMN n TYPE bigint")
        .await
        .unwrap();
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    daemon.restart(&dbs, "a,b", &[]);
    wait_equal(&dbs, &["public.b"], WAIT).await;
    source
        .batch_execute("INSERT INTO b VALUES (3, 3)")
        .await
        .unwrap();
    wait_equal(&dbs, &["public.a", "public.b"], WAIT).await;
    wait_for("b to stream again", WAIT, || async {
        (status(&dbs)["mirror"]["tables"]
            .as_array()?
            .iter()
            .all(|t| t["state"] == "streaming"))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_table_added_to_the_list_is_copied_and_then_streamed() {
    let dbs = test_dbs("repl_added_table").await;
    let source = connect(&dbs.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let mut daemon = Daemon::start(&dbs, "customers", &[]);
    wait_equal(&dbs, &["public.customers"], WAIT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    // Written while orders was not replicated: arrives with its copy.
    source.batch_execute(ORDER_TXN).await.unwrap();
    daemon.restart(&dbs, "customers,orders,order_items", &[]);
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    for _ in 0..20 {
        source.batch_execute(ORDER_TXN).await.unwrap();
    }
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
}

#[tokio::test]
async fn a_dropped_slot_is_recreated_and_the_tables_copied_again() {
    let dbs = test_dbs("repl_dropped_slot").await;
    let source = connect(&dbs.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let tables = "customers,orders,order_items";
    let mut daemon = Daemon::start(&dbs, tables, &[]);
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    source
        .execute("SELECT pg_drop_replication_slot($1)", &[&dbs.name])
        .await
        .expect("drop the slot");
    // Lost with the slot: only a new copy brings these.
    for _ in 0..10 {
        source.batch_execute(ORDER_TXN).await.unwrap();
    }
    daemon.restart(&dbs, tables, &[]);
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    source.batch_execute(ORDER_TXN).await.unwrap();
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    assert!(
        daemon.log().contains("replication slot is gone"),
        "loudly logged"
    );
}

#[tokio::test]
async fn writes_to_unpublished_tables_do_not_pile_up_wal() {
    let dbs = test_dbs("repl_retained_wal").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE busy (id bigserial PRIMARY KEY, junk text);",
        )
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "published", &[]);
    wait_equal(&dbs, &["public.published"], WAIT).await;
    // 500 MB of WAL in 50 transactions, none of it for a published table.
    let start: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..50 {
        source
            .batch_execute(
                "INSERT INTO busy (junk) SELECT md5(i::text) || md5((i + 1)::text) || md5((i + 2)::text) \
                 FROM generate_series(1, 80000) i",
            )
            .await
            .unwrap();
    }
    let written: i64 = source
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::int8",
            &[&start],
        )
        .await
        .unwrap()
        .get(0);
    assert!(written > 400 << 20, "wrote {written} bytes of WAL");
    // A checkpoint logs the running transactions, which lets the slot's restart point move.
    let retained = wait_for("the slot to let go of the unpublished WAL", WAIT, || async {
        source.batch_execute("CHECKPOINT").await.ok()?;
        let retained: i64 = source
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&dbs.name],
            )
            .await
            .ok()?
            .get(0);
        (retained < 64 << 20).then_some(retained)
    })
    .await;
    eprintln!("retained {retained} bytes after writing {written}");
    drop(daemon);
}

#[tokio::test]
async fn a_million_row_transaction_applies_in_bounded_memory() {
    let dbs = test_dbs("repl_big_txn").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE events (id bigint PRIMARY KEY, body text)")
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "events", &[]);
    wait_equal(&dbs, &["public.events"], WAIT).await;
    source
        .batch_execute(
            "INSERT INTO events SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, 1000000) i",
        )
        .await
        .expect("big transaction");
    wait_equal(&dbs, &["public.events"], Duration::from_secs(240)).await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("proc status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    eprintln!("peak RSS {} MiB", peak_kib / 1024);
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
}

#[tokio::test]
async fn cut_connections_and_a_refusing_mirror_are_survived() {
    let dbs = test_dbs("repl_cuts").await;
    let source = connect(&dbs.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let clusters = support::clusters();
    let addr = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let source_proxy = Proxy::start(addr(clusters.source.port())).await.unwrap();
    let mirror_proxy = Proxy::start(addr(clusters.mirror.port())).await.unwrap();
    for p in [&source_proxy, &mirror_proxy] {
        p.set_delay(Duration::from_millis(10));
    }
    let via = |url: &str, from: u16, to: u16| url.replace(&format!(":{from}/"), &format!(":{to}/"));
    let source_url = via(
        &dbs.source_url,
        clusters.source.port(),
        source_proxy.addr().port(),
    );
    let mirror_url = via(
        &dbs.mirror_url,
        clusters.mirror.port(),
        mirror_proxy.addr().port(),
    );
    let mut daemon = Daemon::start_via(
        &dbs,
        (&source_url, &mirror_url),
        "customers,orders,order_items",
        &[],
    );
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let load = workload(dbs.source_url.clone(), stop.clone());
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        match round % 3 {
            0 => source_proxy.cut(),
            1 => mirror_proxy.cut(),
            _ => {
                // The mirror "down" for a while: refused reconnects, then back.
                mirror_proxy.set_refusing(true);
                mirror_proxy.cut();
                tokio::time::sleep(Duration::from_secs(2)).await;
                mirror_proxy.set_refusing(false);
            }
        }
    }
    stop.cancel();
    load.await.expect("workload");
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    assert!(
        daemon.is_running(),
        "transient failures never end the daemon"
    );
    assert!(daemon.log().contains("retrying"), "the cuts were noticed");
}

#[tokio::test]
async fn a_mirror_crash_and_restart_is_survived() {
    let dbs = test_dbs("repl_mirror_restart").await;
    // A mirror of this test's own, so restarting it disturbs no other test.
    let mirror_cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(&ClusterOptions {
            name: "mirror-restart".into(),
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("own mirror cluster");
    let admin = connect(&mirror_cluster.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE restarts")
        .await
        .unwrap();
    let mirror_url = mirror_cluster.url("restarts");
    let source = connect(&dbs.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let own = TestDbs {
        name: dbs.name.clone(),
        source_url: dbs.source_url.clone(),
        mirror_url: mirror_url.clone(),
    };
    let daemon = Daemon::start(&own, "customers,orders,order_items", &[]);
    wait_equal(&own, &RESTAURANT_TABLES, WAIT).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = workload(dbs.source_url.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cluster = std::sync::Arc::new(mirror_cluster);
    let restarting = std::sync::Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || restarting.restart("immediate"))
        .await
        .unwrap()
        .expect("crash and restart the mirror");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    load.await.expect("workload");
    wait_equal(&own, &RESTAURANT_TABLES, WAIT).await;
    drop(daemon);
}

#[tokio::test]
async fn a_source_crash_and_restart_is_survived() {
    // A source of this test's own, so restarting it disturbs no other test.
    let source_cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(&ClusterOptions {
            name: "source-restart".into(),
            logical: true,
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("own source cluster");
    let dbs = test_dbs("repl_source_restart").await;
    let admin = connect(&source_cluster.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE restarts")
        .await
        .unwrap();
    let own = TestDbs {
        name: dbs.name.clone(),
        source_url: source_cluster.url("restarts"),
        mirror_url: dbs.mirror_url.clone(),
    };
    let source = connect(&own.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let daemon = Daemon::start(&own, "customers,orders,order_items", &[]);
    wait_equal(&own, &RESTAURANT_TABLES, WAIT).await;
    for _ in 0..20 {
        source.batch_execute(ORDER_TXN).await.unwrap();
    }
    let cluster = std::sync::Arc::new(source_cluster);
    let restarting = std::sync::Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || restarting.restart("immediate"))
        .await
        .unwrap()
        .expect("crash and restart the source");
    let source = connect(&own.source_url).await;
    for _ in 0..20 {
        source.batch_execute(ORDER_TXN).await.unwrap();
    }
    wait_equal(&own, &RESTAURANT_TABLES, WAIT).await;
    drop(daemon);
}

#[tokio::test]
async fn status_and_check_say_what_is_fine_and_what_to_fix() {
    let dbs = test_dbs("repl_status_check").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE log (line text);")
        .await
        .expect("schema");
    let check = |tables: &str| {
        bite_sync()
            .args([
                "check",
                "--source",
                &dbs.source_url,
                "--mirror",
                &dbs.mirror_url,
            ])
            .args(["--tables", tables])
            .output()
            .expect("check")
    };
    let fine = check("t");
    let text = String::from_utf8_lossy(&fine.stdout).to_string();
    assert_eq!(fine.status.code(), Some(0), "{text}");
    for what in [
        "wal_level",
        "REPLICATION privilege",
        "replication connection",
        "replica identity",
        "CREATE privilege",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("OK") && l.contains(what)),
            "{what} in:\n{text}"
        );
    }
    let bad = check("t,log");
    let text = String::from_utf8_lossy(&bad.stdout).to_string();
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FIX")
            && l.contains(r#"ALTER TABLE "public"."log" REPLICA IDENTITY FULL"#)),
        "{text}"
    );

    // Before the daemon ever ran: not healthy, and it says how to start.
    let before = status(&dbs);
    assert_eq!(before["healthy"], false);
    let daemon = Daemon::start(&dbs, "t", &[]);
    source
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    wait_equal(&dbs, &["public.t"], WAIT).await;
    let healthy = wait_for("status to be healthy", WAIT, || async {
        let s = status(&dbs);
        (s["healthy"] == true).then_some(s)
    })
    .await;
    assert_eq!(healthy["source"]["active"], true);
    assert_eq!(healthy["mirror"]["tables"][0]["table"], "t");
    assert_eq!(healthy["mirror"]["tables"][0]["state"], "streaming");
    assert!(healthy["source"]["retained_wal_bytes"].as_i64().is_some());
    drop(daemon);
    // With the daemon gone, status says nobody streams (exit code 1).
    let out = bite_sync()
        .args([
            "status",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.mirror_url,
            "--slot",
            &dbs.name,
        ])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("no `bite-sync run` is streaming"), "{text}");
}

#[tokio::test]
async fn a_change_the_mirror_rejects_pauses_only_its_table_instead_of_wedging() {
    let dbs = test_dbs("repl_rejected").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, n int); CREATE TABLE b (id int PRIMARY KEY, n int);",
        )
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "a,b", &[]);
    wait_equal(&dbs, &["public.a", "public.b"], WAIT).await;
    // A rule only the mirror has: the source's next change to b breaks it.
    let mirror = connect(&dbs.mirror_url).await;
    mirror
        .batch_execute("ALTER TABLE b ADD CONSTRAINT mirror_only_small CHECK (n < 100)")
        .await
        .unwrap();
    source
        .batch_execute(
            "BEGIN; INSERT INTO a VALUES (1, 1); INSERT INTO b VALUES (1, 500); INSERT INTO a VALUES (2, 2); COMMIT;
             INSERT INTO a VALUES (3, 3); INSERT INTO b VALUES (2, 5);",
        )
        .await
        .unwrap();
    // a gets everything, in the same batch as b's rejected row; b is paused with the reason.
    wait_equal(&dbs, &["public.a"], WAIT).await;
    let reason = wait_for("b to be paused", WAIT, || async {
        let s = status(&dbs);
        let b = s["mirror"]["tables"]
            .as_array()?
            .iter()
            .find(|t| t["table"] == "b")?
            .clone();
        (b["state"] == "paused").then(|| b["reason"].as_str().unwrap_or_default().to_string())
    })
    .await;
    assert!(reason.contains("mirror_only_small"), "{reason}");
    // And the stream goes on.
    source
        .batch_execute("INSERT INTO a VALUES (4, 4)")
        .await
        .unwrap();
    wait_equal(&dbs, &["public.a"], WAIT).await;
    drop(daemon);
}

#[tokio::test]
async fn truncate_cascade_empties_exactly_the_tables_the_source_emptied() {
    let dbs = test_dbs("repl_truncate_fk").await;
    let source = connect(&dbs.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    for _ in 0..5 {
        source.batch_execute(ORDER_TXN).await.unwrap();
    }
    let daemon = Daemon::start(&dbs, "customers,orders,order_items", &[]);
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    // The source lists every table its cascade reached; the mirror truncates those together.
    source
        .batch_execute(
            "TRUNCATE orders CASCADE; INSERT INTO orders (customer_id, status) VALUES (1, 'new');",
        )
        .await
        .unwrap();
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    let mirror = connect(&dbs.mirror_url).await;
    let customers: i64 = mirror
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(customers, 200, "customers were not part of the truncate");
    drop(daemon);
}

#[tokio::test]
async fn every_applied_change_commits_with_the_position_it_reaches() {
    let dbs = test_dbs("repl_same_txn").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
        .await
        .expect("schema");
    // Small batches, so the workload spans many, and a large transaction is sent in parts.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bite-sync.toml");
    std::fs::write(
        &config,
        "[replication]\nbatch_rows = 50\nbatch_delay = \"20ms\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let daemon = Daemon::start(&dbs, "t", &["--config", &config]);
    wait_equal(&dbs, &["public.t"], WAIT).await;
    // On the mirror, triggers that fire even for replicated rows record the transaction of
    // every row change and of every position update.
    let mirror = connect(&dbs.mirror_url).await;
    mirror
        .batch_execute(
            "CREATE TABLE public.xact_log (what text, xid xid8);
             CREATE FUNCTION public.log_xact() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.xact_log VALUES (TG_TABLE_NAME, pg_current_xact_id()); RETURN NULL; END $$;
             CREATE TRIGGER log_t AFTER INSERT OR UPDATE OR DELETE ON public.t FOR EACH ROW EXECUTE FUNCTION public.log_xact();
             ALTER TABLE public.t ENABLE ALWAYS TRIGGER log_t;
             CREATE TRIGGER log_state AFTER UPDATE ON bite_sync.replication_state FOR EACH ROW EXECUTE FUNCTION public.log_xact();
             ALTER TABLE bite_sync.replication_state ENABLE ALWAYS TRIGGER log_state;",
        )
        .await
        .expect("mirror triggers");
    for i in 0..200 {
        source
            .execute("INSERT INTO t VALUES ($1, $1)", &[&i])
            .await
            .unwrap();
    }
    source
        .batch_execute(
            "UPDATE t SET n = n + 1; INSERT INTO t SELECT i, i FROM generate_series(1000, 1400) i;",
        )
        .await
        .unwrap();
    wait_equal(&dbs, &["public.t"], WAIT).await;
    let orphans: i64 = mirror
        .query_one(
            "SELECT count(DISTINCT xid) FROM public.xact_log d WHERE what = 't' \
             AND NOT EXISTS (SELECT 1 FROM public.xact_log s WHERE s.what = 'replication_state' AND s.xid = d.xid)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let batches: i64 = mirror
        .query_one(
            "SELECT count(DISTINCT xid) FROM public.xact_log WHERE what = 't'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        batches > 3,
        "the changes went in several batches ({batches})"
    );
    assert_eq!(
        orphans, 0,
        "mirror transactions that changed rows without moving the position"
    );
    drop(daemon);
}

#[tokio::test]
async fn a_slot_the_source_invalidated_is_recreated_and_the_tables_copied_again() {
    // A source of this test's own that keeps at most 1 MB of WAL for a slot.
    let source_cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(&ClusterOptions {
            name: "source-invalidate".into(),
            logical: true,
            settings: vec![
                ("max_slot_wal_keep_size".into(), "1MB".into()),
                ("wal_keep_size".into(), "0".into()),
                ("max_wal_size".into(), "32MB".into()),
                ("min_wal_size".into(), "32MB".into()),
            ],
        })
    })
    .await
    .unwrap()
    .expect("own source cluster");
    let dbs = test_dbs("repl_invalidated").await;
    let admin = connect(&source_cluster.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE invalidated")
        .await
        .unwrap();
    let own = TestDbs {
        name: dbs.name.clone(),
        source_url: source_cluster.url("invalidated"),
        mirror_url: dbs.mirror_url.clone(),
    };
    let source = connect(&own.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, n int); CREATE TABLE junk (line text);
             INSERT INTO t SELECT i, i FROM generate_series(1, 100) i;",
        )
        .await
        .expect("schema");
    let mut daemon = Daemon::start(&own, "t", &[]);
    wait_equal(&own, &["public.t"], WAIT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    // While it is down: changes it must not lose, then far more WAL than the slot may keep.
    source
        .batch_execute("UPDATE t SET n = -n WHERE id <= 50")
        .await
        .unwrap();
    let status = wait_for("the source to invalidate the slot", WAIT, || async {
        source
            .batch_execute(
                "INSERT INTO junk SELECT md5(i::text) || md5((i + 1)::text) FROM generate_series(1, 100000) i;
                 CHECKPOINT;",
            )
            .await
            .ok()?;
        let status: Option<String> = source
            .query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&own.name])
            .await
            .ok()?
            .get(0);
        (status.as_deref() == Some("lost")).then_some(status)
    })
    .await;
    assert_eq!(status.as_deref(), Some("lost"));
    daemon.restart(&own, "t", &[]);
    wait_equal(&own, &["public.t"], WAIT).await;
    source
        .batch_execute("INSERT INTO t VALUES (1000, 1000)")
        .await
        .unwrap();
    wait_equal(&own, &["public.t"], WAIT).await;
    assert!(
        daemon.log().contains("the source invalidated it"),
        "loudly logged:\n{}",
        daemon.log()
    );
}

#[tokio::test]
async fn new_enum_labels_and_enum_types_reach_the_mirror_instead_of_pausing() {
    let dbs = test_dbs("repl_enums").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TYPE status AS ENUM ('pending', 'paid');
             CREATE TABLE o (id int PRIMARY KEY, s status, history status[]);
             INSERT INTO o VALUES (1, 'paid', '{pending,paid}');",
        )
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "o", &[]);
    wait_equal(&dbs, &["public.o"], WAIT).await;
    // A new order status on the source, used at once, also inside an array.
    source
        .batch_execute("ALTER TYPE status ADD VALUE 'refunded' BEFORE 'paid'")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO o VALUES (2, 'refunded', '{pending,refunded}')")
        .await
        .unwrap();
    // A column of a type the mirror has never seen.
    source
        .batch_execute(
            "CREATE TYPE size AS ENUM ('small', 'large');
             ALTER TABLE o ADD COLUMN size size;
             INSERT INTO o VALUES (3, 'paid', '{}', 'large');",
        )
        .await
        .unwrap();
    wait_equal(&dbs, &["public.o"], WAIT).await;
    let s = status(&dbs);
    assert_eq!(s["mirror"]["tables"][0]["state"], "streaming", "{s:#}");
    // The labels are in the source's order, so comparisons agree on both sides.
    let mirror = connect(&dbs.mirror_url).await;
    let labels: String = mirror
        .query_one("SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'public.status'::regtype", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(labels, "pending,refunded,paid");
    drop(daemon);
}

/// A primary key over a composite type, and REPLICA IDENTITY FULL over a composite column:
/// every statement shape that finds a row by value (key changes, deletes one and many, whole
/// rows) must name the values' type, or the mirror refuses `'(terraza,1)'` as an anonymous
/// record and the table pauses.
#[tokio::test]
async fn composite_keys_and_whole_row_identities_apply_instead_of_pausing() {
    let dbs = test_dbs("repl_composite_keys").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TYPE seat AS (room text, table_no integer);
             CREATE TABLE seating (place seat PRIMARY KEY, capacity integer NOT NULL);
             CREATE TABLE seat_log (place seat, note text);
             ALTER TABLE seat_log REPLICA IDENTITY FULL;
             INSERT INTO seating VALUES (ROW('terraza', 1), 4), (ROW('terraza', 2), 2), (ROW('salón', 1), 6);
             INSERT INTO seat_log VALUES (ROW('terraza', 1), 'reserved'), (ROW('salón', 1), NULL);",
        )
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "seating,seat_log", &[]);
    let tables = ["public.seating", "public.seat_log"];
    wait_equal(&dbs, &tables, WAIT).await;
    for sql in [
        // One delete, then a key change, then several deletes in one statement.
        "DELETE FROM seating WHERE place = ROW('terraza', 2)::seat",
        "UPDATE seating SET place = ROW('salón', 2), capacity = 8 WHERE place = ROW('salón', 1)::seat",
        "INSERT INTO seating VALUES (ROW('barra', 1), 1), (ROW('barra', 2), 1)",
        "DELETE FROM seating WHERE (place).room = 'barra'",
        "UPDATE seating SET capacity = capacity + 1",
        // Whole-row identity: update and delete found by every value, NULLs included.
        "UPDATE seat_log SET note = 'moved' WHERE note IS NULL",
        "DELETE FROM seat_log WHERE (place).room = 'terraza'",
    ] {
        source.batch_execute(sql).await.expect(sql);
    }
    wait_equal(&dbs, &tables, WAIT).await;
    let s = status(&dbs);
    let paused: Vec<&serde_json::Value> = s["mirror"]["tables"]
        .as_array()
        .expect("tables in status")
        .iter()
        .filter(|t| t["state"] != "streaming")
        .collect();
    assert!(paused.is_empty(), "{paused:#?}");
    drop(daemon);
}

/// A quiet restaurant at night: a caught-up walsender sends nothing while the daemon reports
/// its position, so a stream that only waits for messages calls it dead after its silence
/// limit (90 s) and reconnects, and `status` turns unhealthy with a "last error". The daemon
/// must ask the source to answer instead, and stay up and healthy for as long as it is idle.
/// Idle for twice the silence limit, on a source of its own (other tests' WAL would make the
/// walsender talk), while the binary's other tests run beside it.
#[tokio::test]
async fn a_caught_up_stream_stays_up_and_healthy_through_a_quiet_night() {
    const QUIET: Duration = Duration::from_secs(200);
    let source_cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(&ClusterOptions {
            name: "source-quiet".into(),
            logical: true,
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("own source cluster");
    let dbs = test_dbs("repl_quiet_night").await;
    let admin = connect(&source_cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE quiet").await.unwrap();
    let own = TestDbs {
        name: dbs.name.clone(),
        source_url: source_cluster.url("quiet"),
        mirror_url: dbs.mirror_url.clone(),
    };
    let source = connect(&own.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let daemon = Daemon::start(&own, "customers,orders,order_items", &[]);
    wait_equal(&own, &RESTAURANT_TABLES, WAIT).await;
    source.batch_execute(ORDER_TXN).await.unwrap();
    wait_equal(&own, &RESTAURANT_TABLES, WAIT).await;
    drop(source);
    drop(admin);

    let started = std::time::Instant::now();
    while started.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_secs(15)).await;
        let s = status(&own);
        assert_eq!(
            s["healthy"],
            true,
            "status after {:?} idle: {s:#}\n{}",
            started.elapsed(),
            daemon.log()
        );
        assert!(s["mirror"]["last_error"].is_null(), "{s:#}");
    }
    let log = daemon.log();
    assert_eq!(
        log.matches("streaming changes to the mirror").count(),
        1,
        "one session all night, no reconnect:\n{log}"
    );
    assert!(!log.contains("silent"), "{log}");
    // And it still streams in the morning.
    let source = connect(&own.source_url).await;
    source.batch_execute(ORDER_TXN).await.unwrap();
    wait_equal(&own, &RESTAURANT_TABLES, WAIT).await;
    drop(daemon);
}

/// A table's columns (name, type, NOT NULL, default) and constraints, as one comparable list.
async fn table_shape(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    let rows = client
        .query(
            "SELECT 'column ' || a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod) \
                    || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END \
                    || COALESCE(' default ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid), '') \
             FROM pg_catalog.pg_attribute a \
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             UNION ALL \
             SELECT 'constraint ' || conname || ' ' || pg_catalog.pg_get_constraintdef(oid) \
             FROM pg_catalog.pg_constraint WHERE conrelid = $1::text::regclass \
             ORDER BY 1",
            &[&table],
        )
        .await
        .unwrap_or_else(|e| panic!("the shape of {table}: {e}"));
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn added_columns_arrive_with_their_not_null_default_and_constraints() {
    let dbs = test_dbs("repl_added_constraints").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE a (id int PRIMARY KEY, n int); INSERT INTO a VALUES (1, 1);")
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "a", &[]);
    wait_equal(&dbs, &["public.a"], WAIT).await;
    source
        .batch_execute(
            "ALTER TABLE a ADD COLUMN c int NOT NULL DEFAULT 42;
             ALTER TABLE a ADD COLUMN code text CONSTRAINT code_short CHECK (length(code) < 10) UNIQUE;
             ALTER TABLE a ADD COLUMN seq bigserial;
             INSERT INTO a (id, n, code) VALUES (2, 2, 'x'), (3, 3, NULL);",
        )
        .await
        .expect("schema changes");
    wait_equal(&dbs, &["public.a"], WAIT).await;
    let mirror = connect(&dbs.mirror_url).await;
    assert_eq!(
        table_shape(&mirror, "public.a").await,
        table_shape(&source, "public.a").await
    );
    // The mirror enforces them, as the source does.
    let refused = mirror
        .batch_execute("INSERT INTO a (id, n, c) VALUES (9, 9, NULL)")
        .await;
    assert!(refused.is_err(), "c is NOT NULL on the mirror");
    drop(daemon);
}

/// The feature schema's tables, as `--tables` names them (its materialized view is no table).
const FEATURE_TABLES: &str = "guests,seating,seat_log,tips,payments,orders_by_channel,marker";

/// Objects of the feature schema a mirror does not carry: its materialized view.
const FEATURE_ABSENT: [&str; 2] = ["revenue_by_month", "revenue_by_month_month"];

/// One transaction touching every feature: rows moving between partitions (and into the
/// default one), a composite key changed, whole-row identities, citext, hstore, a domain
/// with a function check, the sequences defaults draw from, an identity, a table without
/// columns.
const FEATURE_TXN: &str = "
BEGIN;
INSERT INTO guests (email, name, phone, prefs)
    VALUES (md5(random()::text) || '@Example.com', 'Invitado', '+34600' || lpad((random() * 999999)::int::text, 6, '0'), 'seen=>1');
INSERT INTO payments (paid_at, guest_id, amount)
    SELECT timestamptz '2026-10-01 00:00+00' + random() * interval '100 days', (SELECT id FROM guests ORDER BY random() LIMIT 1), 9.99;
UPDATE payments SET paid_at = paid_at + interval '9 days' WHERE id = (SELECT id FROM payments ORDER BY random() LIMIT 1);
DELETE FROM payments WHERE id = (SELECT id FROM payments ORDER BY random() LIMIT 1);
INSERT INTO seating (place, capacity) VALUES (ROW('patio', (random() * 1000000)::int), 2) ON CONFLICT DO NOTHING;
UPDATE seating SET capacity = capacity + 1 WHERE place = (SELECT place FROM seating ORDER BY random() LIMIT 1);
UPDATE seating SET place = ROW('moved', nextval('ticket_code_seq')::int)
    WHERE place = (SELECT place FROM seating WHERE (place).room = 'patio' ORDER BY random() LIMIT 1);
INSERT INTO seat_log (place, note) VALUES (ROW('terraza', 1), 'seated');
UPDATE seat_log SET note = 'left' WHERE ctid = (SELECT ctid FROM seat_log WHERE note = 'seated' LIMIT 1);
DELETE FROM seat_log WHERE ctid = (SELECT ctid FROM seat_log ORDER BY random() LIMIT 1);
INSERT INTO tips (amount) VALUES (1.50);
INSERT INTO marker DEFAULT VALUES;
DELETE FROM marker WHERE ctid = (SELECT ctid FROM marker LIMIT 1);
INSERT INTO orders_by_channel VALUES ((random() * 1e12)::bigint, 'whatsapp', date '2026-01-01' + (random() * 300)::int, 5),
                                     ((random() * 1e12)::bigint, 'phone', date '2026-06-01', 7);
UPDATE guests SET prefs = prefs || 'visits=>2'::hstore WHERE id = (SELECT id FROM guests ORDER BY random() LIMIT 1);
COMMIT;";

/// Runs `txn` in a loop until `stop` fires; returns how many committed.
fn workload_of(
    url: String,
    txn: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = connect(&url).await;
        let mut n = 0;
        while !stop.is_cancelled() {
            match client.batch_execute(txn).await {
                Ok(()) => n += 1,
                // Beside the test's own DDL (a new partition), a transaction may deadlock.
                Err(e)
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
                {
                    client.batch_execute("ROLLBACK").await.expect("rollback");
                }
                Err(e) => panic!("workload transaction: {e:?}"),
            }
        }
        n
    })
}

/// Waits until every table of the source (partitions included) has the same rows on the
/// mirror.
async fn wait_all_equal(dbs: &TestDbs, timeout: Duration) {
    let source = connect(&dbs.source_url).await;
    let mirror = connect(&dbs.mirror_url).await;
    let want = support::schemas::table_digests(&source).await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = support::schemas::table_digests(&mirror).await;
        if got == want {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let mut rows = String::new();
            for (table, digest) in &want {
                if got.get(table) != Some(digest) {
                    let sql = format!("SELECT t::text FROM ONLY {table} t ORDER BY 1");
                    rows.push_str(&format!(
                        "{table}:\n  source: {:?}\n  mirror: {:?}\n",
                        support::strings(&source, &sql).await,
                        mirror
                            .query(&sql, &[])
                            .await
                            .map(|r| r.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
                    ));
                }
            }
            panic!("every table of the mirror to equal the source's within {timeout:?}:\n{rows}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 11's feature schema under `run`: a workload over every feature, kill -9 in the
/// middle of it, new partitions created on the source while it streams; then every table,
/// sequence and schema object of the mirror equals the source's.
#[tokio::test]
async fn the_feature_schema_replicates_whole_through_kill_9s_and_new_partitions() {
    let dbs = test_dbs("repl_features").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(support::schemas::FEATURES)
        .await
        .expect("feature schema");
    // A table without columns has no key: its deletes need the whole row (bite-sync says so).
    let mut refused = Daemon::start(&dbs, FEATURE_TABLES, &[]);
    assert_eq!(refused.exit_code(WAIT), Some(2));
    assert!(
        refused.log().contains(
            r#"marker has no columns, so no key its deletes could be found by on the mirror"#
        ),
        "{}",
        refused.log()
    );
    drop(refused);
    source
        .batch_execute("ALTER TABLE marker REPLICA IDENTITY FULL")
        .await
        .unwrap();

    let mut daemon = Daemon::start(&dbs, FEATURE_TABLES, &[]);
    wait_all_equal(&dbs, WAIT).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = workload_of(dbs.source_url.clone(), FEATURE_TXN, stop.clone());
    let mut rng = Lcg::from_clock();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        daemon.kill9();
        daemon.restart(&dbs, FEATURE_TABLES, &[]);
    }
    // A new month and a new year's sub-partition, while the workload and the stream go on.
    source
        .batch_execute(
            "CREATE TABLE payments_2030_01 PARTITION OF payments
                 FOR VALUES FROM ('2030-01-01 00:00:00+00') TO ('2030-02-01 00:00:00+00');
             INSERT INTO payments (paid_at, amount) VALUES ('2030-01-15 12:00+00', 30), ('2030-01-16 12:00+00', 31);
             CREATE TABLE orders_whatsapp_2027 PARTITION OF orders_whatsapp
                 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
             INSERT INTO orders_by_channel VALUES (77, 'whatsapp', '2027-02-02', 1);",
        )
        .await
        .expect("new partitions");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let committed = load.await.expect("workload");
    assert!(
        committed > 20,
        "the workload ran ({committed} transactions)"
    );
    wait_all_equal(&dbs, WAIT).await;
    // A clean stop catches the sequences up; then everything is the source's.
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
    support::schemas::assert_mirror_equals_source(
        &dbs.source_url,
        &dbs.mirror_url,
        &FEATURE_ABSENT,
    )
    .await;
    let log = daemon.log();
    assert!(
        log.contains("creating a partition the source created"),
        "{log}"
    );
}

/// Pagila's rentals under `run`: payments into its monthly partitions, rentals, returns,
/// customers changing, then the mirror equals the source.
const PAGILA_TXN: &str = "
BEGIN;
WITH r AS (
    INSERT INTO rental (rental_date, inventory_id, customer_id, staff_id)
    SELECT timestamptz '2022-06-01' + random() * interval '20 days', (SELECT inventory_id FROM inventory ORDER BY random() LIMIT 1),
           (SELECT customer_id FROM customer ORDER BY random() LIMIT 1), 1
    RETURNING rental_id, customer_id, rental_date)
INSERT INTO payment (customer_id, staff_id, rental_id, amount, payment_date)
    SELECT customer_id, 1, rental_id, 3.99, rental_date FROM r;
UPDATE rental SET return_date = rental_date + interval '3 days' WHERE rental_id = (SELECT max(rental_id) FROM rental);
UPDATE payment SET amount = amount + 1 WHERE payment_id = (SELECT payment_id FROM payment_p2022_03 ORDER BY random() LIMIT 1);
UPDATE customer SET email = md5(random()::text) WHERE customer_id = (SELECT customer_id FROM customer ORDER BY random() LIMIT 1);
COMMIT;";

#[tokio::test]
async fn pagila_replicates_whole_and_equal() {
    let dbs = test_dbs("repl_pagila").await;
    support::schemas::load_pagila(&dbs.source_url);
    let source = connect(&dbs.source_url).await;
    let tables: Vec<String> = support::strings(
        &source,
        "SELECT relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1",
    )
    .await;
    let tables = tables.join(",");
    let mut daemon = Daemon::start(&dbs, &tables, &[]);
    wait_all_equal(&dbs, WAIT).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = workload_of(dbs.source_url.clone(), PAGILA_TXN, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.kill9();
    daemon.restart(&dbs, &tables, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    assert!(load.await.expect("workload") > 5);
    wait_all_equal(&dbs, WAIT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
    support::schemas::assert_mirror_equals_source(
        &dbs.source_url,
        &dbs.mirror_url,
        &["rental_by_category", "rental_category", "bıgınt"],
    )
    .await;
}

/// Sequences a hand-written schema uses only through defaults (not `OWNED BY` any column),
/// one of them only through a function the default calls, follow while the daemon streams,
/// and `status` says they are in step.
#[tokio::test]
async fn sequences_used_only_by_defaults_follow_while_streaming() {
    let dbs = test_dbs("repl_default_sequences").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE SEQUENCE guest_id_seq START 500 INCREMENT 5;
             CREATE SEQUENCE ticket_code_seq START 1000;
             CREATE FUNCTION next_ticket_code() RETURNS text LANGUAGE sql VOLATILE
                 AS $$ SELECT 'T-' || lpad(nextval('ticket_code_seq')::text, 6, '0') $$;
             CREATE TABLE guests (id bigint PRIMARY KEY DEFAULT nextval('guest_id_seq'),
                                  ticket text NOT NULL DEFAULT next_ticket_code());
             CREATE TABLE tips (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, amount numeric);
             INSERT INTO guests DEFAULT VALUES; INSERT INTO tips (amount) VALUES (1);",
        )
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "guests,tips", &[]);
    wait_equal(&dbs, &["public.guests", "public.tips"], WAIT).await;
    source
        .batch_execute(
            "INSERT INTO guests SELECT FROM generate_series(1, 20);
             INSERT INTO tips (amount) SELECT 2 FROM generate_series(1, 7);",
        )
        .await
        .unwrap();
    wait_equal(&dbs, &["public.guests", "public.tips"], WAIT).await;
    let mirror = connect(&dbs.mirror_url).await;
    let positions = "SELECT sequencename::text || ' ' || last_value::text FROM pg_sequences \
                     WHERE schemaname = 'public' ORDER BY 1";
    let want = support::strings(&source, positions).await;
    assert_eq!(want.len(), 3, "{want:?}");
    // Moved while the daemon runs, not only when it stops.
    wait_for(
        "the mirror's sequences to reach the source's",
        WAIT,
        || async { (support::strings(&mirror, positions).await == want).then_some(()) },
    )
    .await;
    let s = status(&dbs);
    assert_eq!(s["sequences"]["total"], 3, "{s:#}");
    assert_eq!(s["sequences"]["in_step"], 3, "{s:#}");
    let text = bite_sync()
        .args([
            "status",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.mirror_url,
        ])
        .args(["--slot", &dbs.name])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("sequences: 3 in step"), "{text}");

    // Under a steady load the stream is never idle: the sequences still follow, with the
    // batches.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = workload_of(
        dbs.source_url.clone(),
        "INSERT INTO guests DEFAULT VALUES; INSERT INTO tips (amount) VALUES (3);",
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reached: i64 = source
        .query_one("SELECT last_value FROM guest_id_seq", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(
        "the mirror's sequence to pass a value of a busy source",
        WAIT,
        || async {
            let on_mirror: i64 = mirror
                .query_one("SELECT last_value FROM guest_id_seq", &[])
                .await
                .ok()?
                .get(0);
            (on_mirror >= reached && !load.is_finished()).then_some(())
        },
    )
    .await;
    stop.cancel();
    assert!(load.await.unwrap() > 10);
    drop(daemon);
}

/// A source with `wal_level = replica`: `run --init` says how to fix it and changes nothing,
/// neither a publication on the source nor bookkeeping on the mirror.
#[tokio::test]
async fn a_source_without_logical_wal_is_refused_before_anything_changes() {
    let source_cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(&ClusterOptions {
            name: "source-replica-wal".into(),
            logical: false,
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("own source cluster");
    let dbs = test_dbs("repl_wal_replica").await;
    let admin = connect(&source_cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let own = TestDbs {
        name: dbs.name.clone(),
        source_url: source_cluster.url("shop"),
        mirror_url: dbs.mirror_url.clone(),
    };
    let source = connect(&own.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let mut daemon = Daemon::start(&own, "customers,orders,order_items", &[]);
    assert_eq!(daemon.exit_code(WAIT), Some(2), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("ALTER SYSTEM SET wal_level = logical"),
        "{log}"
    );
    assert!(log.contains("restart PostgreSQL"), "{log}");
    assert!(log.contains("nothing was changed"), "{log}");
    assert_eq!(
        support::count(&source, "SELECT count(*) FROM pg_publication").await,
        0,
        "no publication on the source"
    );
    let mirror = connect(&own.mirror_url).await;
    assert_eq!(
        support::count(
            &mirror,
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bite_sync%'"
        )
        .await,
        0,
        "no bookkeeping on the mirror"
    );
}

/// A first start stopped in the middle of its copy leaves no slot and no publication on the
/// source (they would pin WAL on the restaurant's disk for a stream that never began).
#[tokio::test]
async fn a_first_start_stopped_during_its_copy_leaves_no_slot_or_publication() {
    let dbs = test_dbs("repl_first_start_undo").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE big (id bigint PRIMARY KEY, note text);
             INSERT INTO big SELECT i, md5(i::text) FROM generate_series(1, 1000000) i;",
        )
        .await
        .expect("schema");
    let mut daemon = Daemon::start(&dbs, "big", &[]);
    wait_for("the copy to begin", WAIT, || async {
        daemon
            .log()
            .contains("created the replication slot; copying the tables")
            .then_some(())
    })
    .await;
    assert_eq!(
        daemon.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(
        !log.contains("copied tables for replication"),
        "stopped before the copy finished: {log}"
    );
    let slots = support::count(
        &source,
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
            dbs.name
        ),
    )
    .await;
    let publications = support::count(
        &source,
        &format!(
            "SELECT count(*) FROM pg_publication WHERE pubname = '{}'",
            dbs.name
        ),
    )
    .await;
    assert_eq!((slots, publications), (0, 0), "{log}");
    // And the next start begins again from nothing.
    daemon.restart(&dbs, "big", &[]);
    wait_equal(&dbs, &["public.big"], Duration::from_secs(120)).await;
}

/// The mirror lacks what the tables need and bite-sync may not create it (the mirror user may
/// not create extensions): `check` lists each missing object with its DDL, and `run` and
/// `sync` refuse before changing anything, naming them.
#[tokio::test]
async fn what_the_mirror_lacks_is_listed_with_its_ddl_before_anything_changes() {
    let dbs = test_dbs("repl_missing_deps").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(support::schemas::FEATURES)
        .await
        .expect("feature schema");
    let mirror = connect(&dbs.mirror_url).await;
    let role = format!("{}_user", dbs.name);
    mirror
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .unwrap();
    let limited = dbs.mirror_url.replacen("postgres@", &format!("{role}@"), 1);
    let own = TestDbs {
        name: dbs.name.clone(),
        source_url: dbs.source_url.clone(),
        mirror_url: limited.clone(),
    };
    let tables = "guests,seating";
    let check = bite_sync()
        .args(["check", "--source", &dbs.source_url, "--mirror", &limited])
        .args(["--tables", tables])
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{text}");
    for want in [
        r#"FIX  mirror  extension citext"#,
        r#"CREATE EXTENSION IF NOT EXISTS "citext" WITH SCHEMA "public""#,
        r#"CREATE EXTENSION IF NOT EXISTS "hstore" WITH SCHEMA "public""#,
        r#"`bite-sync run` creates it: CREATE TYPE "public"."seat" AS ("room" text, "table_no" integer)"#,
        r#"CREATE COLLATION IF NOT EXISTS "public"."es_ci" (provider = icu, locale = 'es-u-ks-level2', deterministic = false)"#,
        "CREATE OR REPLACE FUNCTION public.is_spanish_phone(p text)",
    ] {
        assert!(text.contains(want), "check lacks {want:?}:\n{text}");
    }
    let mut daemon = Daemon::start(&own, tables, &[]);
    assert_eq!(daemon.exit_code(WAIT), Some(2), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("extension citext: the mirror user may not create it"),
        "{log}"
    );
    assert!(
        log.contains("extension hstore"),
        "every one is named: {log}"
    );
    let sync = bite_sync()
        .args([
            "sync",
            "--init",
            "--source",
            &dbs.source_url,
            "--mirror",
            &limited,
        ])
        .args(["--tables", tables])
        .output()
        .expect("sync");
    let err = String::from_utf8_lossy(&sync.stderr).into_owned();
    assert_eq!(sync.status.code(), Some(1), "{err}");
    assert!(err.contains("extension citext"), "{err}");
    // Nothing changed on either side.
    assert_eq!(
        support::count(&source, "SELECT count(*) FROM pg_publication").await,
        0
    );
    assert_eq!(
        support::count(
            &source,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = current_database()"
        )
        .await,
        0
    );
    assert_eq!(
        support::count(
            &mirror,
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bite_sync%'"
        )
        .await
            + support::count(
                &mirror,
                "SELECT count(*) FROM pg_type WHERE typname = 'seat'"
            )
            .await,
        0
    );
}

/// A second daemon on the same slot is a standby: `status` stays healthy, says so, and names
/// the active daemon's host and pid; when the active one stops, the standby takes over.
#[tokio::test]
async fn a_standby_daemon_is_a_state_and_takes_over() {
    let dbs = test_dbs("repl_standby").await;
    let source = connect(&dbs.source_url).await;
    source.batch_execute(RESTAURANT).await.expect("schema");
    let tables = "customers,orders,order_items";
    let mut active = Daemon::start(&dbs, tables, &[]);
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    let standby = Daemon::start(&dbs, tables, &[]);
    wait_for("the second daemon to stand by", WAIT, || async {
        standby.log().contains("standby").then_some(())
    })
    .await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    // Healthy as soon as the active daemon streams, standby or not.
    let s = wait_for("status to show both daemons, healthy", WAIT, || async {
        let s = status(&dbs);
        (s["mirror"]["daemons"].as_array()?.len() == 2 && s["healthy"] == true).then_some(s)
    })
    .await;
    assert!(s["mirror"]["last_error"].is_null(), "{s:#}");
    let daemons = s["mirror"]["daemons"].as_array().unwrap();
    assert_eq!(daemons[0]["active"], true, "{s:#}");
    assert_eq!(daemons[0]["pid"], active.pid(), "{s:#}");
    assert_eq!(daemons[0]["host"], host.as_str(), "{s:#}");
    assert_eq!(daemons[1]["active"], false, "{s:#}");
    assert_eq!(daemons[1]["pid"], standby.pid(), "{s:#}");
    assert!(
        standby
            .log()
            .contains(&format!("{host} (pid {})", active.pid())),
        "the standby says where the active daemon runs: {}",
        standby.log()
    );
    let text = String::from_utf8_lossy(
        &bite_sync()
            .args([
                "status",
                "--source",
                &dbs.source_url,
                "--mirror",
                &dbs.mirror_url,
            ])
            .args(["--slot", &dbs.name])
            .output()
            .expect("status")
            .stdout,
    )
    .into_owned();
    assert!(
        text.contains(&format!("standby on {host} (pid {})", standby.pid())),
        "{text}"
    );
    // The active one stops; the standby takes over and streams.
    assert_eq!(active.terminate(Duration::from_secs(30)), Some(0));
    source.batch_execute(ORDER_TXN).await.unwrap();
    wait_equal(&dbs, &RESTAURANT_TABLES, WAIT).await;
    assert!(standby.log().contains("taking over"), "{}", standby.log());
    drop(standby);
}

/// PostgreSQL's own test of logical replication with partitioned tables
/// (`src/test/subscription/t/013_partition.pl`, the publish_via_partition_root part), ported:
/// a partition attached with its columns in another order, a default partition, a
/// sub-partitioned table; inserts through the table and straight into partitions, updates
/// that stay in a partition and that move rows across, deletes, TRUNCATE, and a column added
/// to the partitioned table (the map from partitions to the table is rebuilt).
#[tokio::test]
async fn postgres_partition_scenarios_replicate() {
    let dbs = test_dbs("repl_pg_013_partition").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE tab1 (a int PRIMARY KEY, b text) PARTITION BY LIST (a);
             CREATE TABLE tab1_1 (b text, a int NOT NULL);
             ALTER TABLE tab1 ATTACH PARTITION tab1_1 FOR VALUES IN (1, 2, 3);
             CREATE TABLE tab1_2 PARTITION OF tab1 FOR VALUES IN (4, 5, 6);
             CREATE TABLE tab1_def PARTITION OF tab1 DEFAULT;
             CREATE TABLE tab4 (a int PRIMARY KEY) PARTITION BY LIST (a);
             CREATE TABLE tab4_1 PARTITION OF tab4 FOR VALUES IN (-1, 0, 1) PARTITION BY LIST (a);
             CREATE TABLE tab4_1_1 PARTITION OF tab4_1 FOR VALUES IN (-1, 0, 1);
             INSERT INTO tab4 VALUES (-1);",
        )
        .await
        .expect("schema");
    let daemon = Daemon::start(&dbs, "tab1,tab4", &[]);
    wait_all_equal(&dbs, WAIT).await;
    for step in [
        // insert
        "INSERT INTO tab1 VALUES (1); INSERT INTO tab1_1 (a) VALUES (3); INSERT INTO tab1_2 VALUES (5); \
         INSERT INTO tab1 VALUES (0); INSERT INTO tab4 VALUES (0), (1);",
        // update, replicated as update (within a partition, and across on a sub-partitioned mirror)
        "UPDATE tab1 SET a = 2 WHERE a = 1; UPDATE tab1 SET a = 6 WHERE a = 5; \
         UPDATE tab1 SET a = 4 WHERE a = 6; UPDATE tab1 SET a = 6 WHERE a = 4;",
        // update moving rows across partitions (default to tab1_1, tab1_1 to tab1_2)
        "UPDATE tab1 SET a = 1 WHERE a = 0; UPDATE tab1 SET a = 4 WHERE a = 1;",
        // delete
        "DELETE FROM tab1 WHERE a IN (2, 3, 5); DELETE FROM tab1_2;",
        "INSERT INTO tab1 VALUES (1, 'foo'), (4, 'bar'), (10, 'baz'); UPDATE tab1 SET b = 'quux' WHERE a = 4;",
        // truncate of the partitioned table
        "TRUNCATE tab1; INSERT INTO tab1 VALUES (7, 'after');",
        // a column added to the partitioned table, then rows with and without it
        "ALTER TABLE tab1 ADD COLUMN c text DEFAULT 'pub_tab1'; \
         INSERT INTO tab1 (a, b) VALUES (2, 'xxx'), (3, 'yyy'), (5, 'zzz'); \
         INSERT INTO tab1 (a, b, c) VALUES (6, 'aaa', 'xxx_c');",
    ] {
        source.batch_execute(step).await.expect(step);
        wait_all_equal(&dbs, WAIT).await;
    }
    support::schemas::assert_same_schema(&dbs.source_url, &dbs.mirror_url, &[]);
    drop(daemon);
}

/// Scenarios of PostgreSQL's `src/test/subscription/t/100_bugs.pl`, ported: an index whose
/// predicate calls a function of ours (the mirror needs the function), REPLICA IDENTITY FULL
/// on a table with a dropped column and on one whose column was added with a default (rows
/// written before it have it missing on disk), and a replica identity index changed on the
/// source (updates and deletes then name rows by the new one).
#[tokio::test]
async fn postgres_bug_scenarios_replicate() {
    let dbs = test_dbs("repl_pg_100_bugs").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE tab1 (a int PRIMARY KEY, b int);
             CREATE FUNCTION double(x int) RETURNS int IMMUTABLE LANGUAGE SQL AS 'select x * 2';
             CREATE INDEX ON tab1 (b) WHERE a > double(1);
             CREATE TABLE dropped_cols (a int, b_drop int, c int);
             ALTER TABLE dropped_cols REPLICA IDENTITY FULL;
             INSERT INTO dropped_cols VALUES (1, 1, 1);
             CREATE TABLE tab_default (a int);
             ALTER TABLE tab_default REPLICA IDENTITY FULL;
             INSERT INTO tab_default VALUES (1);
             ALTER TABLE tab_default ADD COLUMN b bool DEFAULT false NOT NULL;
             INSERT INTO tab_default VALUES (2, true);
             CREATE TABLE tab_replidentity_index (a int NOT NULL, b int NOT NULL);
             CREATE UNIQUE INDEX idx_replidentity_index_a ON tab_replidentity_index (a);
             CREATE UNIQUE INDEX idx_replidentity_index_b ON tab_replidentity_index (b);
             ALTER TABLE tab_replidentity_index REPLICA IDENTITY USING INDEX idx_replidentity_index_a;
             INSERT INTO tab_replidentity_index VALUES (1, 1), (2, 2);",
        )
        .await
        .expect("schema");
    let tables = "tab1,dropped_cols,tab_default,tab_replidentity_index";
    let daemon = Daemon::start(&dbs, tables, &[]);
    wait_all_equal(&dbs, WAIT).await;
    let mirror = connect(&dbs.mirror_url).await;
    let indexes = "SELECT indexdef FROM pg_indexes WHERE tablename = 'tab1' ORDER BY 1";
    assert_eq!(
        support::strings(&mirror, indexes).await,
        support::strings(&source, indexes).await,
        "the index and the function its predicate calls"
    );
    source
        .batch_execute(
            "INSERT INTO tab1 VALUES (1, 2);
             UPDATE tab_default SET a = a + 1;
             ALTER TABLE tab_replidentity_index REPLICA IDENTITY USING INDEX idx_replidentity_index_b;
             UPDATE tab_replidentity_index SET a = -a WHERE a = 1;
             DELETE FROM tab_replidentity_index WHERE a = 2;",
        )
        .await
        .unwrap();
    wait_equal(
        &dbs,
        &[
            "public.tab1",
            "public.tab_default",
            "public.tab_replidentity_index",
        ],
        WAIT,
    )
    .await;
    assert_eq!(
        support::strings(&mirror, "SELECT a || '|' || b FROM tab_default ORDER BY a").await,
        ["2|false", "3|true"]
    );
    assert_eq!(
        support::strings(&mirror, "SELECT a || '|' || b FROM tab_replidentity_index").await,
        ["-1|1"]
    );
    // The mirror keeps a column the source dropped; rows are still found by the others.
    source
        .batch_execute(
            "ALTER TABLE dropped_cols DROP COLUMN b_drop; UPDATE dropped_cols SET a = 100;",
        )
        .await
        .unwrap();
    wait_for(
        "the update of a table with a dropped column",
        WAIT,
        || async {
            (support::count(
                &mirror,
                "SELECT count(*) FROM dropped_cols WHERE a = 100 AND c = 1",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    drop(daemon);
}

/// A publication made by an older bite-sync publishes partitions as themselves (it had no
/// partitioned tables then). Adding a partitioned table switches it to publishing through
/// the root first, and the tables it already streamed go on without a gap or a duplicate.
#[tokio::test]
async fn an_older_publication_is_switched_to_publish_through_the_root() {
    let dbs = test_dbs("repl_old_publication").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(support::schemas::FEATURES)
        .await
        .expect("feature schema");
    let mut daemon = Daemon::start(&dbs, "guests,tips", &[]);
    wait_equal(&dbs, &["public.guests", "public.tips"], WAIT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
    // What an older version left: the same publication without the option.
    source
        .batch_execute(&format!(
            "ALTER PUBLICATION \"{}\" SET (publish_via_partition_root = false)",
            dbs.name
        ))
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO tips (amount) VALUES (7); INSERT INTO payments (paid_at, amount) VALUES ('2026-11-05 10:00+00', 3)")
        .await
        .unwrap();
    daemon.restart(&dbs, "guests,tips,payments", &[]);
    wait_equal(
        &dbs,
        &["public.guests", "public.tips", "public.payments"],
        WAIT,
    )
    .await;
    let via_root: bool = source
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&dbs.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(via_root);
    source
        .batch_execute(
            "INSERT INTO tips (amount) VALUES (8);
             INSERT INTO payments (paid_at, amount) VALUES ('2026-12-05 10:00+00', 4), ('2028-01-01 00:00+00', 5);
             UPDATE payments SET paid_at = paid_at + interval '1 month' WHERE amount = 3;",
        )
        .await
        .unwrap();
    wait_equal(
        &dbs,
        &["public.guests", "public.tips", "public.payments"],
        WAIT,
    )
    .await;
    let mirror = connect(&dbs.mirror_url).await;
    let by_partition = "SELECT tableoid::regclass::text || ' ' || count(*) FROM payments GROUP BY tableoid ORDER BY 1";
    assert_eq!(
        support::strings(&mirror, by_partition).await,
        support::strings(&source, by_partition).await,
        "each row in its partition"
    );
    drop(daemon);
}

/// `[sync] flatten_partitions = true` under `run`: the partitioned table is one plain table on
/// the mirror, rows of every partition (one created while streaming too) arrive in it; and a
/// partition named alone is refused naming its table.
#[tokio::test]
async fn flattened_partitioned_tables_replicate_into_one_plain_table() {
    let dbs = test_dbs("repl_flatten").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(support::schemas::FEATURES)
        .await
        .expect("feature schema");
    let mut refused = Daemon::start(&dbs, "guests,payments_2026_11", &[]);
    assert_eq!(refused.exit_code(WAIT), Some(2));
    assert!(
        refused
            .log()
            .contains("payments_2026_11 is a partition of payments"),
        "{}",
        refused.log()
    );
    drop(refused);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bite-sync.toml");
    std::fs::write(&config, "[sync]\nflatten_partitions = true\n").unwrap();
    let config = config.to_str().unwrap().to_string();
    let daemon = Daemon::start(&dbs, "guests,payments", &["--config", &config]);
    wait_equal(&dbs, &["public.guests", "public.payments"], WAIT).await;
    source
        .batch_execute(
            "INSERT INTO payments (paid_at, amount) VALUES ('2026-10-09 10:00+00', 1), ('2027-05-01 10:00+00', 2);
             UPDATE payments SET paid_at = paid_at + interval '1 month' WHERE amount < 2;
             CREATE TABLE payments_2031_01 PARTITION OF payments
                 FOR VALUES FROM ('2031-01-01 00:00:00+00') TO ('2031-02-01 00:00:00+00');
             INSERT INTO payments (paid_at, amount) VALUES ('2031-01-02 10:00+00', 3);
             DELETE FROM payments WHERE amount = 2;",
        )
        .await
        .unwrap();
    wait_equal(&dbs, &["public.guests", "public.payments"], WAIT).await;
    let mirror = connect(&dbs.mirror_url).await;
    assert_eq!(
        support::strings(
            &mirror,
            "SELECT relname::text || ' ' || relkind::text FROM pg_class WHERE relname LIKE 'payments%' AND relkind IN ('r', 'p')"
        )
        .await,
        ["payments r"]
    );
    drop(daemon);
}
