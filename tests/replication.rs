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
