//! `bite-sync bench replication`: `bite-sync run` against PostgreSQL's native logical
//! replication (a subscription on the mirror), on the same throwaway clusters, in one run.
//!
//! The source holds the sample restaurant. The workload is one restaurant transaction, written
//! by `pgbench` ([`WORKLOAD`]): a new order with two items, another order's status moved on, a
//! customer's jsonb preferences changed: 5 row changes.
//!
//! 1. **Backlog catch-up.** A native subscription (its slot created, its mirror database copied,
//!    the subscription left disabled) and bite-sync (`run --init` until it streams, then
//!    stopped) both wait while one backlog of `--transactions` transactions is written: both
//!    slots are in place, so both consume exactly the same WAL. Then each is started in turn
//!    and timed until its mirror has applied the source's WAL position after the backlog.
//! 2. **Over a WAN.** Another backlog, caught up by bite-sync with its mirror connection
//!    through [`Proxy`] adding `--wan-delay` each way.
//! 3. **Steady state.** bite-sync streams while pgbench runs the transaction flat out; every
//!    100 ms the source's WAL position is sampled, every 10 ms the mirror's applied position is
//!    read, and each sample's lag is the time until the mirror reached it.
//! 4. **One large transaction** of `--big-rows` inserted rows, caught up by bite-sync.
//!
//! How a catch-up is timed, the same way for both: from the consumer's start (`ALTER
//! SUBSCRIPTION ... ENABLE`, or spawning the bite-sync process, so its start-up counts) until the
//! position the mirror records as applied, in the same transaction as the data (the
//! subscription's replication origin, bite-sync's `bite_sync.replication_state`), reaches the
//! target, with the mirror's row counts equal to the source's. When the source's slot confirms
//! the target is reported too. A recorded position with wrong row counts fails the run at once,
//! and every step ends comparing a digest of every table on both sides, so a fast wrong answer
//! cannot pass.
//!
//! bite-sync runs as child processes of this binary, stopped with SIGTERM (each must exit 0),
//! their peak RSS read from the kernel as in the sync benchmark.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use super::{BenchError, Daemon, Measured, STOP_LIMIT, TABLES};
use crate::cli::ReplicationBenchArgs;
use crate::demo;
use crate::pg::cluster::TempCluster;
use crate::pg::connect::Role;
use crate::pg::ident::{literal, quote};
use crate::proxy::Proxy;
use crate::repl::Lsn;

/// The restaurant's transaction, 5 row changes, as a pgbench script. `:customers`, `:orders`
/// and `:menu_items` come from `-D`; the ids drawn exist (orders only grow), so every
/// statement changes exactly the rows counted. Parameters that pgbench's prepared mode could
/// leave untyped are cast.
const WORKLOAD: &str = r"\set customer random(1, :customers)
\set other_order random(1, :orders)
\set other_customer random(1, :customers)
\set item1 random(1, :menu_items)
\set item2 random(1, :menu_items)
\set status random(1, 6)
BEGIN;
WITH o AS (INSERT INTO public.orders (customer_id) VALUES (:customer) RETURNING id) INSERT INTO public.order_items (order_id, line_no, menu_item_id, quantity, unit_price) SELECT o.id, v.line, m.id, 1, m.price FROM o CROSS JOIN (VALUES (1, :item1::int), (2, :item2::int)) AS v (line, item) JOIN public.menu_items m ON m.id = v.item;
UPDATE public.orders SET status = (enum_range(NULL::public.order_status))[:status::int], updated_at = now() WHERE id = :other_order;
UPDATE public.customers SET preferences = preferences || jsonb_build_object('visits', coalesce((preferences ->> 'visits')::int, 0) + 1, 'last_order', now()) WHERE id = :other_customer;
END;
";

/// Row changes in one [`WORKLOAD`] transaction: three inserts and two updates.
const ROW_CHANGES_PER_TRANSACTION: u64 = 5;

/// The table the large transaction fills: a one-off bulk import. Replicated by bite-sync only.
const BULK_TABLE: &str = "bulk_import";

const BULK_SCHEMA: &str = "CREATE TABLE public.bulk_import (
    id          bigint PRIMARY KEY,
    order_id    bigint NOT NULL,
    note        text NOT NULL,
    amount      numeric(10,2) NOT NULL,
    imported_at timestamptz NOT NULL DEFAULT now()
)";

/// The database on the source and bite-sync's mirror database.
const DATABASE: &str = "bite";
/// The native subscription's mirror database.
const NATIVE_DATABASE: &str = "native";
/// bite-sync's slot and publication.
const SLOT: &str = "bench_bite_sync";
/// The native side's slot, publication and subscription.
const NATIVE: &str = "bench_native";

/// How often a catch-up checks the applied position (and the steady state's mirror poller).
const POLL: Duration = Duration::from_millis(10);
/// How often the steady state samples the source's WAL position.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Any wait longer than this means something is broken, not slow.
const LIMIT: Duration = Duration::from_secs(600);

/// bite-sync's throughput over native's, at least.
const TARGET_RATIO: f64 = 1.5;
/// Row changes per second over the WAN, at least.
const TARGET_WAN_ROWS_PER_SECOND: f64 = 5_000.0;
/// Steady-state p99 lag in seconds, at most.
const TARGET_LAG_P99: f64 = 1.0;
/// Peak RSS of any bite-sync process in MiB, at most.
const TARGET_RSS_MIB: f64 = 64.0;

/// One consumer catching up with a backlog.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CatchUp {
    /// Row changes in the backlog.
    pub row_changes: u64,
    /// Seconds from the consumer's start until the mirror had applied the backlog.
    pub seconds: f64,
    /// Seconds from the consumer's start until the source's slot confirmed the backlog.
    pub confirmed_seconds: f64,
    /// `row_changes / seconds`.
    pub row_changes_per_second: f64,
    /// Peak RSS of the bite-sync process in MiB (none for native replication).
    pub peak_rss_mib: Option<f64>,
}

/// bite-sync streaming while the workload runs flat out.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SteadyState {
    /// pgbench clients.
    pub clients: u32,
    /// How long pgbench ran, in seconds.
    pub seconds: f64,
    /// Transactions pgbench committed.
    pub transactions: u64,
    /// Transactions per second pgbench reported.
    pub transactions_per_second: f64,
    /// Source WAL positions sampled.
    pub samples: usize,
    /// Median lag in seconds.
    pub lag_p50_seconds: f64,
    /// 99th percentile lag in seconds (target ≤ 1).
    pub lag_p99_seconds: f64,
    /// Highest lag in seconds.
    pub lag_max_seconds: f64,
    /// Peak RSS of the bite-sync process in MiB.
    pub peak_rss_mib: f64,
}

/// The replication benchmark's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicationReport {
    /// Rows per table on the source before the first backlog.
    pub rows: Vec<(String, i64)>,
    /// Transactions in each backlog.
    pub backlog_transactions: u64,
    /// `bite-sync run --init`: copy, then streaming.
    pub init: Measured,
    /// 1: the native subscription catching up with the backlog.
    pub native: CatchUp,
    /// 1: `bite-sync run` catching up with the same backlog.
    pub bite_sync: CatchUp,
    /// bite-sync's row changes per second over native's (target ≥ 1.5).
    pub bite_sync_over_native: f64,
    /// 2: the added one-way latency to the mirror, in milliseconds.
    pub wan_delay_ms: f64,
    /// 2: `bite-sync run` catching up with a backlog over the WAN (target ≥ 5,000 row changes/s).
    pub wan: CatchUp,
    /// 3: lag while streaming.
    pub steady: SteadyState,
    /// 4: `bite-sync run` catching up with one transaction of this many rows.
    pub big: CatchUp,
    /// Highest peak RSS of any bite-sync process in MiB (target ≤ 64).
    pub peak_rss_mib: f64,
}

/// Runs the replication benchmark and prints its results.
pub async fn run(args: &ReplicationBenchArgs, cancel: CancellationToken) -> Result<(), BenchError> {
    let logs = super::LogDir::new(args.log_dir.as_deref())?;
    let (source_cluster, mirror_cluster) = super::start_clusters().await?;
    let result = tokio::select! {
        r = bench(args, &source_cluster, &mirror_cluster, logs.path()) => r,
        () = cancel.cancelled() => Err(BenchError::Cancelled),
    };
    super::stop_clusters(source_cluster, mirror_cluster).await?;
    super::print_report(args.json, &result?, render);
    Ok(())
}

/// What every step uses.
struct Bench<'a> {
    args: &'a ReplicationBenchArgs,
    source_cluster: &'a TempCluster,
    mirror_cluster: &'a TempCluster,
    /// The source database.
    source: Client,
    /// bite-sync's mirror database.
    mirror: Client,
    /// Both clusters' `postgres` databases, for checkpoints.
    admin_urls: [String; 2],
    logs: &'a Path,
    workload: Workload,
    /// The tables bite-sync replicates: [`TABLES`] and [`BULK_TABLE`].
    tables: Vec<&'static str>,
    /// bite-sync processes started so far, to name their logs.
    started: Cell<u32>,
}

async fn bench(
    args: &ReplicationBenchArgs,
    source_cluster: &TempCluster,
    mirror_cluster: &TempCluster,
    logs: &Path,
) -> Result<ReplicationReport, BenchError> {
    let source =
        super::sample_source(source_cluster, DATABASE, args.customers, args.orders).await?;
    source
        .batch_execute(BULK_SCHEMA)
        .await
        .map_err(BenchError::Generate)?;
    source
        .batch_execute("VACUUM ANALYZE")
        .await
        .map_err(BenchError::Generate)?;
    let rows = super::count_rows(&source, &TABLES).await?;
    let menu_items: i64 = source
        .query_one("SELECT max(id)::int8 FROM public.menu_items", &[])
        .await
        .map_err(checking("the menu"))?
        .get(0);
    let mirror_url = demo::create_database(mirror_cluster, DATABASE, Role::Mirror)
        .await
        .map_err(Box::new)?;
    let mirror = super::connect(&mirror_url).await?;
    let script = logs.join("workload.sql");
    std::fs::write(&script, WORKLOAD).map_err(|source| BenchError::Spawn {
        what: "writing the pgbench script".into(),
        source,
    })?;
    let bench = Bench {
        args,
        source_cluster,
        mirror_cluster,
        source,
        mirror,
        admin_urls: [
            source_cluster.url("postgres"),
            mirror_cluster.url("postgres"),
        ],
        logs,
        workload: Workload {
            pgbench: super::program(source_cluster.bin_dir(), "pgbench"),
            script,
            port: source_cluster.port(),
            variables: vec![
                format!("customers={}", args.customers),
                format!("orders={}", args.orders),
                format!("menu_items={menu_items}"),
            ],
        },
        tables: TABLES.iter().copied().chain([BULK_TABLE]).collect(),
        started: Cell::new(0),
    };
    bench.all(rows).await
}

/// A backlog written and where it ends.
struct Backlog {
    row_changes: u64,
    /// The source's WAL position right after it.
    target: Lsn,
    /// Rows per replicated table on the source after it.
    rows: Vec<(String, i64)>,
}

impl Backlog {
    /// The same backlog, its row counts limited to `tables`.
    fn only(&self, tables: &[&str]) -> Backlog {
        Backlog {
            row_changes: self.row_changes,
            target: self.target,
            rows: self
                .rows
                .iter()
                .filter(|(t, _)| tables.contains(&t.as_str()))
                .cloned()
                .collect(),
        }
    }
}

impl Bench<'_> {
    async fn all(&self, rows: Vec<(String, i64)>) -> Result<ReplicationReport, BenchError> {
        let transactions = self.args.transactions;

        eprintln!("1: preparing the native subscription (slot, copy, disabled subscription)...");
        let native = self.prepare_native().await?;
        eprintln!("1: bite-sync run --init until it streams...");
        let init = self.first_start().await?;

        eprintln!("1: writing a backlog of {transactions} transactions...");
        let backlog = self.backlog().await?;
        super::checkpoint(&self.admin_urls).await?;
        eprintln!("1: native subscription catching up...");
        let native_catch_up = self
            .native_catch_up(&native, &backlog.only(&TABLES))
            .await?;
        self.same_on_both("the native subscription", &native, &TABLES)
            .await?;
        // Gone before bite-sync's turn: its walsender and apply worker take no CPU from it.
        self.drop_native(native).await?;
        super::checkpoint(&self.admin_urls).await?;
        eprintln!("1: bite-sync run catching up...");
        let bite_sync = self
            .daemon_catch_up("catch-up", &self.mirror_cluster.url(DATABASE), &backlog)
            .await?;
        self.same_on_both("bite-sync run", &self.mirror, &self.tables)
            .await?;

        eprintln!("2: writing another backlog of {transactions} transactions...");
        let backlog = self.backlog().await?;
        let proxy = Proxy::start(SocketAddr::from((
            [127, 0, 0, 1],
            self.mirror_cluster.port(),
        )))
        .await
        .map_err(|source| BenchError::Spawn {
            what: "the WAN proxy".into(),
            source,
        })?;
        proxy.set_delay(self.args.wan_delay);
        let wan_url = format!(
            "postgres://postgres@{}/{DATABASE}?sslmode=disable",
            proxy.addr()
        );
        super::checkpoint(&self.admin_urls).await?;
        eprintln!(
            "2: bite-sync run catching up, {} ms each way from the mirror...",
            self.args.wan_delay.as_millis()
        );
        let wan = self.daemon_catch_up("WAN", &wan_url, &backlog).await?;
        drop(proxy);
        self.same_on_both("bite-sync run over the WAN", &self.mirror, &self.tables)
            .await?;

        eprintln!(
            "3: steady state: pgbench -c {} for {:?} while bite-sync streams...",
            self.args.clients, self.args.duration
        );
        let steady = self.steady_state().await?;
        self.same_on_both("the steady state", &self.mirror, &self.tables)
            .await?;

        eprintln!(
            "4: one transaction inserting {} rows...",
            self.args.big_rows
        );
        let big = self.big_transaction().await?;
        self.same_on_both("the large transaction", &self.mirror, &self.tables)
            .await?;

        let peak_rss_mib = [
            init.peak_rss_mib,
            bite_sync.peak_rss_mib,
            wan.peak_rss_mib,
            Some(steady.peak_rss_mib),
            big.peak_rss_mib,
        ]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max);
        Ok(ReplicationReport {
            rows,
            backlog_transactions: transactions,
            init,
            bite_sync_over_native: bite_sync.row_changes_per_second
                / native_catch_up.row_changes_per_second,
            native: native_catch_up,
            bite_sync,
            wan_delay_ms: self.args.wan_delay.as_secs_f64() * 1000.0,
            wan,
            steady,
            big,
            peak_rss_mib,
        })
    }

    /// The native side before the backlog: publication and slot on the source, the mirror
    /// database copied (nothing writes to the source in between, so the copy is exactly the
    /// slot's starting point), and a disabled subscription on that slot.
    async fn prepare_native(&self) -> Result<Client, BenchError> {
        let tables = TABLES
            .iter()
            .map(|t| format!("public.{}", quote(t)))
            .collect::<Vec<_>>()
            .join(", ");
        // Two statements, two transactions: a slot cannot be created after writes in one.
        self.source
            .batch_execute(&format!("CREATE PUBLICATION {NATIVE} FOR TABLE {tables}"))
            .await
            .map_err(checking("creating the native publication"))?;
        self.source
            .execute(
                "SELECT pg_create_logical_replication_slot($1::text::name, 'pgoutput')",
                &[&NATIVE],
            )
            .await
            .map_err(checking("creating the native slot"))?;
        let url = demo::create_database(self.mirror_cluster, NATIVE_DATABASE, Role::Mirror)
            .await
            .map_err(Box::new)?;
        let bin = self.source_cluster.bin_dir();
        super::shell(
            "copying the source for the native subscription",
            &format!(
                "{} --no-publications --no-subscriptions '{}' | {} -q -X -v ON_ERROR_STOP=1 '{}'",
                super::tool(bin, "pg_dump"),
                self.source_cluster.url(DATABASE),
                super::tool(bin, "psql"),
                self.mirror_cluster.url(NATIVE_DATABASE)
            ),
        )?;
        let native = super::connect(&url).await?;
        let conninfo = format!(
            "host={} port={} dbname={DATABASE} user=postgres",
            self.source_cluster.host(),
            self.source_cluster.port()
        );
        native
            .batch_execute(&format!(
                "CREATE SUBSCRIPTION {NATIVE} CONNECTION {} PUBLICATION {NATIVE} \
                 WITH (create_slot = false, slot_name = {}, copy_data = false, enabled = false)",
                literal(&conninfo),
                literal(NATIVE)
            ))
            .await
            .map_err(checking("creating the native subscription"))?;
        Ok(native)
    }

    /// `bite-sync run --init` until its slot streams and the mirror records its position,
    /// then stopped.
    async fn first_start(&self) -> Result<Measured, BenchError> {
        let started = Instant::now();
        let mut daemon = self.start_daemon("init", &self.mirror_cluster.url(DATABASE), true)?;
        loop {
            daemon.check_running()?;
            let active: Option<bool> = self
                .source
                .query_opt(
                    "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&SLOT],
                )
                .await
                .map_err(checking("bite-sync's slot"))?
                .map(|r| r.get(0));
            let recorded = match applied_by_daemon(&self.mirror).await {
                Ok(position) => position,
                // The bookkeeping appears during the first start: until then, not yet.
                Err(BenchError::Check(_, e))
                    if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                        || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) =>
                {
                    None
                }
                Err(e) => return Err(e),
            };
            if active == Some(true) && recorded.is_some() {
                break;
            }
            if started.elapsed() > LIMIT {
                return Err(BenchError::Timeout {
                    what: "bite-sync run --init to start streaming".into(),
                    limit: LIMIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let peak_rss_mib = daemon.stop().await?;
        Ok(Measured {
            seconds,
            peak_rss_mib: Some(peak_rss_mib),
            all_seconds: vec![seconds],
        })
    }

    /// Runs the workload `--transactions` times, one client, and notes where the WAL ends and
    /// how many rows the replicated tables then hold.
    async fn backlog(&self) -> Result<Backlog, BenchError> {
        let transactions = self.args.transactions;
        let before = super::count_rows(&self.source, &["orders", "order_items"]).await?;
        let run = self
            .workload
            .run(&["-c", "1", "-t", &transactions.to_string()])
            .await?;
        // Read first: later WAL (a checkpoint's) is not the backlog's.
        let target = current_wal(&self.source).await?;
        let after = super::count_rows(&self.source, &["orders", "order_items"]).await?;
        let added = |i: usize| after[i].1 - before[i].1;
        let want = i64::try_from(transactions).unwrap_or(i64::MAX);
        if run.transactions != transactions || added(0) != want || added(1) != 2 * want {
            return Err(BenchError::Step {
                what: "the backlog".into(),
                detail: format!(
                    "pgbench committed {} of {transactions} transactions, adding {} orders and {} order items",
                    run.transactions,
                    added(0),
                    added(1)
                ),
            });
        }
        Ok(Backlog {
            row_changes: transactions * ROW_CHANGES_PER_TRANSACTION,
            target,
            rows: super::count_rows(&self.source, &self.tables).await?,
        })
    }

    async fn native_catch_up(
        &self,
        native: &Client,
        backlog: &Backlog,
    ) -> Result<CatchUp, BenchError> {
        let started = Instant::now();
        native
            .batch_execute(&format!("ALTER SUBSCRIPTION {NATIVE} ENABLE"))
            .await
            .map_err(checking("enabling the native subscription"))?;
        let reached = self
            .wait_reached(
                Consumer::Subscription(native),
                NATIVE,
                started,
                backlog,
                None,
            )
            .await?;
        Ok(reached.catch_up(backlog.row_changes, None))
    }

    /// Drops the subscription, its slot (so it holds no WAL) and its database.
    async fn drop_native(&self, native: Client) -> Result<(), BenchError> {
        native
            .batch_execute(&format!(
                "ALTER SUBSCRIPTION {NATIVE} DISABLE; \
                 ALTER SUBSCRIPTION {NATIVE} SET (slot_name = NONE); \
                 DROP SUBSCRIPTION {NATIVE}"
            ))
            .await
            .map_err(checking("dropping the native subscription"))?;
        drop(native);
        // Its walsender lets go of the slot a moment after the subscription's worker stops.
        let started = Instant::now();
        while let Err(e) = self
            .source
            .execute(
                "SELECT pg_drop_replication_slot($1::text::name)",
                &[&NATIVE],
            )
            .await
        {
            if started.elapsed() > STOP_LIMIT {
                return Err(checking("dropping the native slot")(e));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        super::connect_url(&self.admin_urls[1])
            .await?
            .batch_execute(&format!(
                "DROP DATABASE {} WITH (FORCE)",
                quote(NATIVE_DATABASE)
            ))
            .await
            .map_err(checking("dropping the native mirror database"))
    }

    /// Starts bite-sync into `mirror_url` and times it until it has applied `backlog`.
    async fn daemon_catch_up(
        &self,
        what: &str,
        mirror_url: &str,
        backlog: &Backlog,
    ) -> Result<CatchUp, BenchError> {
        let started = Instant::now();
        let mut daemon = self.start_daemon(what, mirror_url, false)?;
        let reached = self
            .wait_reached(
                Consumer::Daemon(&self.mirror),
                SLOT,
                started,
                backlog,
                Some(&mut daemon),
            )
            .await?;
        let peak_rss_mib = daemon.stop().await?;
        Ok(reached.catch_up(backlog.row_changes, Some(peak_rss_mib)))
    }

    /// bite-sync streaming while pgbench runs flat out; see the module docs for the lag.
    async fn steady_state(&self) -> Result<SteadyState, BenchError> {
        let started = Instant::now();
        let mut daemon =
            self.start_daemon("steady state", &self.mirror_cluster.url(DATABASE), false)?;
        // Caught up before the load starts, so the lag is the workload's, not the start-up's.
        let idle = Backlog {
            row_changes: 0,
            target: current_wal(&self.source).await?,
            rows: super::count_rows(&self.source, &self.tables).await?,
        };
        self.wait_reached(
            Consumer::Daemon(&self.mirror),
            SLOT,
            started,
            &idle,
            Some(&mut daemon),
        )
        .await?;

        let sampler = super::connect_url(&self.source_cluster.url(DATABASE)).await?;
        let poller = super::connect_url(&self.mirror_cluster.url(DATABASE)).await?;
        let clock = Instant::now();
        let sampling = CancellationToken::new();
        let (last_tx, last_rx) = tokio::sync::watch::channel(None);
        let seconds = self.args.duration.as_secs().max(1);
        let load = async {
            let run = self
                .workload
                .run(&[
                    "-c",
                    &self.args.clients.to_string(),
                    "-j",
                    &self.args.clients.to_string(),
                    "-T",
                    &seconds.to_string(),
                ])
                .await;
            sampling.cancel();
            let run = run?;
            let last = current_wal(&self.source).await?;
            let _ = last_tx.send(Some(last));
            Ok::<_, BenchError>(run)
        };
        let (run, samples, applied) = tokio::try_join!(
            load,
            sample_wal(&sampler, clock, sampling.clone()),
            poll_applied(&poller, clock, last_rx, &mut daemon),
        )?;
        let mut lags = Vec::with_capacity(samples.len());
        for lag in lags_of(&samples, &applied) {
            lags.push(lag.ok_or_else(|| BenchError::Step {
                what: "the steady state".into(),
                detail: "a sampled WAL position was never applied".into(),
            })?);
        }
        let peak_rss_mib = daemon.stop().await?;
        let secs = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
        Ok(SteadyState {
            clients: self.args.clients,
            seconds: seconds as f64,
            transactions: run.transactions,
            transactions_per_second: run.tps,
            samples: lags.len(),
            lag_p50_seconds: secs(percentile(&lags, 50.0)),
            lag_p99_seconds: secs(percentile(&lags, 99.0)),
            lag_max_seconds: secs(percentile(&lags, 100.0)),
            peak_rss_mib,
        })
    }

    /// One transaction inserting `--big-rows` rows, written while bite-sync is stopped, then
    /// caught up.
    async fn big_transaction(&self) -> Result<CatchUp, BenchError> {
        let rows = self.args.big_rows;
        self.source
            .batch_execute(&format!(
                "INSERT INTO public.{BULK_TABLE} (id, order_id, note, amount) \
                 SELECT g, 1 + g % {orders}, 'importe ' || g || ' — línea de caja', (g % 100000) / 100.0 \
                 FROM generate_series(1::bigint, {rows}::bigint) AS g",
                orders = self.args.orders
            ))
            .await
            .map_err(checking("the large transaction"))?;
        let backlog = Backlog {
            row_changes: rows,
            target: current_wal(&self.source).await?,
            rows: super::count_rows(&self.source, &self.tables).await?,
        };
        super::checkpoint(&self.admin_urls).await?;
        self.daemon_catch_up(
            "large transaction",
            &self.mirror_cluster.url(DATABASE),
            &backlog,
        )
        .await
    }

    /// Starts `bite-sync run` into `mirror_url`, its stderr in the log dir.
    fn start_daemon(&self, what: &str, mirror_url: &str, init: bool) -> Result<Daemon, BenchError> {
        let n = self.started.get() + 1;
        self.started.set(n);
        let slug: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let tables = self.tables.join(",");
        let source_url = self.source_cluster.url(DATABASE);
        let mut args = vec![
            "run",
            "--source",
            &source_url,
            "--mirror",
            mirror_url,
            "--tables",
            &tables,
            "--slot",
            SLOT,
            "--publication",
            SLOT,
        ];
        if init {
            args.push("--init");
        }
        Daemon::start_run(
            &format!("bite-sync run ({what})"),
            &self.logs.join(format!("{n}-{slug}.log")),
            self.logs,
            &args,
        )
    }

    /// Polls until `consumer` has applied `backlog.target` on its mirror (whose row counts
    /// must then equal the source's) and the source's `slot` has confirmed it.
    async fn wait_reached(
        &self,
        consumer: Consumer<'_>,
        slot: &str,
        started: Instant,
        backlog: &Backlog,
        mut daemon: Option<&mut Daemon>,
    ) -> Result<Reached, BenchError> {
        let tables: Vec<&str> = backlog.rows.iter().map(|(t, _)| t.as_str()).collect();
        let mut applied = None;
        let mut confirmed = None;
        loop {
            if let Some(daemon) = daemon.as_deref_mut() {
                daemon.check_running()?;
            }
            if applied.is_none() {
                let position = consumer.applied().await?;
                let at = started.elapsed();
                if position.is_some_and(|p| p >= backlog.target) {
                    // Data and position commit together: a position with rows missing is
                    // wrong, not late.
                    super::check(consumer.mirror(), consumer.name(), &backlog.rows, &tables)
                        .await?;
                    applied = Some(at);
                }
            }
            if confirmed.is_none() {
                let position = confirmed_by_slot(&self.source, slot).await?;
                if position.is_some_and(|p| p >= backlog.target) {
                    confirmed = Some(started.elapsed());
                }
            }
            if let (Some(applied), Some(confirmed)) = (applied, confirmed) {
                return Ok(Reached { applied, confirmed });
            }
            if started.elapsed() > LIMIT {
                return Err(BenchError::Timeout {
                    what: format!("{} to reach {}", consumer.name(), backlog.target),
                    limit: LIMIT,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every table of `tables` holds the same rows on `mirror` as on the source.
    async fn same_on_both(
        &self,
        what: &str,
        mirror: &Client,
        tables: &[&str],
    ) -> Result<(), BenchError> {
        for table in tables {
            let columns = columns(&self.source, table).await?;
            let want = digest(&self.source, table, &columns).await?;
            let got = digest(mirror, table, &columns).await?;
            if got != want {
                return Err(BenchError::Differs {
                    what: what.into(),
                    table: table.to_string(),
                    got: format!("{} rows, digest {}", got.0, got.1),
                    want: format!("{} rows, digest {}", want.0, want.1),
                });
            }
        }
        Ok(())
    }
}

/// What is being timed, and where it records how far it has applied.
#[derive(Clone, Copy)]
enum Consumer<'a> {
    /// The native subscription, on its mirror database.
    Subscription(&'a Client),
    /// `bite-sync run`, on its mirror database.
    Daemon(&'a Client),
}

impl Consumer<'_> {
    fn name(&self) -> &'static str {
        match self {
            Consumer::Subscription(_) => "the native subscription",
            Consumer::Daemon(_) => "bite-sync run",
        }
    }

    fn mirror(&self) -> &Client {
        match self {
            Consumer::Subscription(c) | Consumer::Daemon(c) => c,
        }
    }

    /// The source position of the last transaction applied on the mirror, recorded in the
    /// same mirror transaction as its data.
    async fn applied(&self) -> Result<Option<Lsn>, BenchError> {
        match self {
            // The apply worker advances its replication origin in each commit.
            Consumer::Subscription(mirror) => {
                let row = mirror
                    .query_opt(
                        "SELECT s.remote_lsn::text FROM pg_catalog.pg_replication_origin_status s \
                         JOIN pg_catalog.pg_subscription sub ON s.external_id = 'pg_' || sub.oid \
                         WHERE sub.subname = $1",
                        &[&NATIVE],
                    )
                    .await
                    .map_err(checking("the native subscription's position"))?;
                row.and_then(|r| r.get::<_, Option<String>>(0))
                    .map(|text| parse_lsn(&text))
                    .transpose()
            }
            Consumer::Daemon(mirror) => applied_by_daemon(mirror).await,
        }
    }
}

/// bite-sync's recorded position on its mirror.
async fn applied_by_daemon(mirror: &Client) -> Result<Option<Lsn>, BenchError> {
    let row = mirror
        .query_opt(
            "SELECT lsn::text FROM bite_sync.replication_state WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .map_err(checking("bite-sync's position"))?;
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .map(|text| parse_lsn(&text))
        .transpose()
}

/// The position the source's slot has had confirmed.
async fn confirmed_by_slot(source: &Client, slot: &str) -> Result<Option<Lsn>, BenchError> {
    let row = source
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(checking("a slot's confirmed position"))?;
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .map(|text| parse_lsn(&text))
        .transpose()
}

async fn current_wal(source: &Client) -> Result<Lsn, BenchError> {
    let text: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(checking("the source's WAL position"))?
        .get(0);
    parse_lsn(&text)
}

fn parse_lsn(text: &str) -> Result<Lsn, BenchError> {
    text.parse().map_err(|e| BenchError::Step {
        what: "reading a WAL position".into(),
        detail: format!("{e}"),
    })
}

fn checking(what: &str) -> impl FnOnce(tokio_postgres::Error) -> BenchError + '_ {
    move |e| BenchError::Check(what.to_string(), e)
}

/// A table's columns as the source has them, for a digest that does not depend on the
/// mirror's column order.
async fn columns(source: &Client, table: &str) -> Result<String, BenchError> {
    Ok(source
        .query_one(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_catalog.pg_attribute \
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&format!("public.{}", quote(table))],
        )
        .await
        .map_err(checking("a table's columns"))?
        .get(0))
}

/// Row count and an order-independent digest of every row as PostgreSQL renders it.
async fn digest(client: &Client, table: &str, columns: &str) -> Result<(i64, String), BenchError> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(hashtextextended(ROW({columns})::text, 0)::numeric), 0)::text \
                 FROM public.{}",
                quote(table)
            ),
            &[],
        )
        .await
        .map_err(|e| BenchError::Check(format!("the digest of {table}"), e))?;
    Ok((row.get(0), row.get(1)))
}

/// When a consumer reached its target, counted from its start.
struct Reached {
    applied: Duration,
    confirmed: Duration,
}

impl Reached {
    fn catch_up(&self, row_changes: u64, peak_rss_mib: Option<f64>) -> CatchUp {
        let seconds = self.applied.as_secs_f64();
        CatchUp {
            row_changes,
            seconds,
            confirmed_seconds: self.confirmed.as_secs_f64(),
            row_changes_per_second: row_changes as f64 / seconds,
            peak_rss_mib,
        }
    }
}

/// The source's WAL position every [`SAMPLE_EVERY`] until `stop`: (time since `clock`, taken
/// before the query, so a lag is never understated; position).
async fn sample_wal(
    source: &Client,
    clock: Instant,
    stop: CancellationToken,
) -> Result<Vec<(Duration, Lsn)>, BenchError> {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(samples),
            _ = tick.tick() => {}
        }
        let at = clock.elapsed();
        samples.push((at, current_wal(source).await?));
    }
}

/// bite-sync's applied position every [`POLL`], each change with the time it was seen (after
/// the query), until it reaches the position `last` announces.
async fn poll_applied(
    mirror: &Client,
    clock: Instant,
    mut last: tokio::sync::watch::Receiver<Option<Lsn>>,
    daemon: &mut Daemon,
) -> Result<Vec<(Duration, Lsn)>, BenchError> {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Vec<(Duration, Lsn)> = Vec::new();
    let started = Instant::now();
    loop {
        tick.tick().await;
        daemon.check_running()?;
        let position = applied_by_daemon(mirror).await?.unwrap_or(Lsn::ZERO);
        let at = clock.elapsed();
        if seen.last().is_none_or(|(_, p)| position > *p) {
            seen.push((at, position));
        }
        let end = *last.borrow_and_update();
        if end.is_some_and(|end| position >= end) {
            return Ok(seen);
        }
        if started.elapsed() > LIMIT {
            return Err(BenchError::Timeout {
                what: "bite-sync run to apply the steady-state workload".into(),
                limit: LIMIT,
            });
        }
    }
}

/// Each sample's lag: the time from the sample until the first applied position at or past
/// it seen no earlier than the sample; `None` when it was never reached. Both lists are in
/// time order, positions increasing.
fn lags_of(samples: &[(Duration, Lsn)], applied: &[(Duration, Lsn)]) -> Vec<Option<Duration>> {
    samples
        .iter()
        .map(|&(at, lsn)| {
            applied
                .iter()
                .find(|&&(seen, position)| seen >= at && position >= lsn)
                .map(|&(seen, _)| seen - at)
        })
        .collect()
}

/// The nearest-rank percentile `p` (0 < p ≤ 100) of `values`; `None` when empty.
pub(super) fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The restaurant's transaction run by pgbench against the source.
struct Workload {
    pgbench: PathBuf,
    script: PathBuf,
    port: u16,
    /// `-D name=value` for the script.
    variables: Vec<String>,
}

/// What pgbench reported.
struct PgbenchRun {
    transactions: u64,
    tps: f64,
}

impl Workload {
    /// Runs pgbench with `extra` (clients, count or duration) and reads its summary.
    async fn run(&self, extra: &[&str]) -> Result<PgbenchRun, BenchError> {
        let mut cmd = tokio::process::Command::new(&self.pgbench);
        cmd.args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-f")
            .arg(&self.script);
        for variable in &self.variables {
            cmd.arg("-D").arg(variable);
        }
        let output = cmd
            .args(extra)
            .arg(DATABASE)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| BenchError::Spawn {
                what: "pgbench".into(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        match (output.status.success(), parse_pgbench(&stdout)) {
            (true, Some(run)) => Ok(run),
            _ => Err(BenchError::Step {
                what: format!("pgbench {}", extra.join(" ")),
                detail: format!(
                    "{}: {} {}",
                    output.status,
                    super::tail(&output.stderr),
                    super::tail(&output.stdout)
                ),
            }),
        }
    }
}

/// Reads "number of transactions actually processed: N[/M]" and "tps = X" from pgbench's
/// summary.
fn parse_pgbench(stdout: &str) -> Option<PgbenchRun> {
    let mut transactions = None;
    let mut tps = None;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
            transactions = rest.trim().split('/').next()?.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("tps = ") {
            tps = rest.split_whitespace().next()?.parse().ok();
        }
    }
    Some(PgbenchRun {
        transactions: transactions?,
        tps: tps?,
    })
}

/// The human-readable result table.
pub fn render(r: &ReplicationReport) -> String {
    let ok = |good: bool| if good { "ok" } else { "MISSED" };
    let rows = r
        .rows
        .iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rss = |m: f64| format!("peak RSS {m:.1} MiB");
    let catch_up = |label: &str, c: &CatchUp, rss: String| {
        let line = format!(
            "{label:<48} {:>7.2} s {:>8.0} row changes/s  slot confirmed at {:>6.2} s  {rss}",
            c.seconds, c.row_changes_per_second, c.confirmed_seconds,
        );
        format!("{}\n", line.trim_end())
    };
    let daemon = |c: &CatchUp| rss(c.peak_rss_mib.unwrap_or(0.0));
    let s = &r.steady;
    let mut out = format!(
        "source: {rows}; each backlog {} transactions = {} row changes\n",
        r.backlog_transactions, r.bite_sync.row_changes
    );
    out.push_str(&format!(
        "{:<48} {:>7.2} s  {}\n",
        "   bite-sync run --init (copy, until streaming)",
        r.init.seconds,
        rss(r.init.peak_rss_mib.unwrap_or(0.0))
    ));
    out.push_str(&catch_up(
        "1  native subscription, backlog catch-up",
        &r.native,
        String::new(),
    ));
    out.push_str(&catch_up(
        "1  bite-sync run, backlog catch-up",
        &r.bite_sync,
        daemon(&r.bite_sync),
    ));
    out.push_str(&catch_up(
        &format!(
            "2  bite-sync run, mirror {:.0} ms away each way",
            r.wan_delay_ms
        ),
        &r.wan,
        daemon(&r.wan),
    ));
    out.push_str(&format!(
        "{:<48} lag p50 {:.3} s, p99 {:.3} s, max {:.3} s ({} samples)  {}\n",
        format!(
            "3  bite-sync run, pgbench -c {} at {:.0} tx/s",
            s.clients, s.transactions_per_second
        ),
        s.lag_p50_seconds,
        s.lag_p99_seconds,
        s.lag_max_seconds,
        s.samples,
        rss(s.peak_rss_mib)
    ));
    out.push_str(&catch_up(
        &format!(
            "4  bite-sync run, one {}-row transaction",
            r.big.row_changes
        ),
        &r.big,
        daemon(&r.big),
    ));
    out.push_str(&format!(
        "bite-sync/native = {:.2}  (target >= {TARGET_RATIO}: {})\n\
         WAN = {:.0} row changes/s  (target >= {TARGET_WAN_ROWS_PER_SECOND}: {})\n\
         lag p99 = {:.3} s  (target <= {TARGET_LAG_P99}: {})\n\
         peak RSS = {:.1} MiB  (target <= {TARGET_RSS_MIB}: {})\n",
        r.bite_sync_over_native,
        ok(r.bite_sync_over_native >= TARGET_RATIO),
        r.wan.row_changes_per_second,
        ok(r.wan.row_changes_per_second >= TARGET_WAN_ROWS_PER_SECOND),
        s.lag_p99_seconds,
        ok(s.lag_p99_seconds <= TARGET_LAG_P99),
        r.peak_rss_mib,
        ok(r.peak_rss_mib <= TARGET_RSS_MIB),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lag_runs_to_the_first_position_at_or_past_the_sample_seen_after_it() {
        let samples = [(ms(0), Lsn(100)), (ms(100), Lsn(250)), (ms(200), Lsn(300))];
        let applied = [
            (ms(5), Lsn(50)),
            (ms(40), Lsn(100)),
            (ms(180), Lsn(260)),
            (ms(230), Lsn(300)),
        ];
        assert_eq!(
            lags_of(&samples, &applied),
            vec![Some(ms(40)), Some(ms(80)), Some(ms(30))]
        );
    }

    #[test]
    fn a_position_seen_before_the_sample_does_not_count_and_an_unreached_one_is_none() {
        // The mirror was already at 100 when the sample at 50 ms read 100: reached at the next
        // poll after the sample, not before it.
        let samples = [(ms(50), Lsn(100)), (ms(60), Lsn(500))];
        let applied = [(ms(10), Lsn(100)), (ms(70), Lsn(120))];
        assert_eq!(lags_of(&samples, &applied), vec![Some(ms(20)), None]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=200).rev().map(ms).collect();
        assert_eq!(percentile(&values, 50.0), Some(ms(100)));
        assert_eq!(percentile(&values, 99.0), Some(ms(198)));
        assert_eq!(percentile(&values, 100.0), Some(ms(200)));
        assert_eq!(percentile(&[ms(7)], 99.0), Some(ms(7)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn pgbench_summaries_are_read_for_counts_and_durations() {
        let counted = "transaction type: /tmp/workload.sql\n\
            number of clients: 1\n\
            number of transactions per client: 200\n\
            number of transactions actually processed: 200/200\n\
            number of failed transactions: 0 (0.000%)\n\
            latency average = 1.234 ms\n\
            initial connection time = 2.345 ms\n\
            tps = 810.372916 (without initial connection time)\n";
        let run = parse_pgbench(counted).expect("parsed");
        assert_eq!(run.transactions, 200);
        assert!((run.tps - 810.372916).abs() < 1e-9);

        let timed = "duration: 20 s\nnumber of transactions actually processed: 16234\n\
            tps = 811.7 (without initial connection time)\n";
        assert_eq!(parse_pgbench(timed).map(|r| r.transactions), Some(16234));
        assert!(parse_pgbench("pgbench: error: connection failed\n").is_none());
    }

    #[test]
    fn the_workload_changes_five_rows_and_uses_only_its_variables() {
        assert_eq!(WORKLOAD.matches("INSERT INTO").count(), 2);
        assert_eq!(WORKLOAD.matches("(VALUES (1, ").count(), 1);
        assert_eq!(WORKLOAD.matches("UPDATE ").count(), 2);
        assert_eq!(ROW_CHANGES_PER_TRANSACTION, 1 + 2 + 2);
        for variable in [":customers", ":orders", ":menu_items"] {
            assert!(WORKLOAD.contains(variable), "{variable} unused");
        }
    }
}
