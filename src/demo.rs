//! `bite-sync demo`: bite-sync on two throwaway local databases with the sample restaurant.
//!
//! Starts a source cluster (`wal_level=logical`) and a mirror cluster in a temporary directory
//! on free ports, loads the sample restaurant into the source, syncs it to the mirror with the
//! same engine `bite-sync sync` uses, then starts continuous replication (`bite-sync run`) with
//! a small live workload on the source, printing row counts on both sides and the lag as they
//! move. It shows how to look, then waits for Ctrl-C and removes everything it made. If the process is killed instead, the clusters'
//! watchdogs stop them and remove their directories.

mod relay;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::pg::cluster::{ClusterError, ClusterOptions, TempCluster};
use crate::pg::connect::{ConnectError, DbUrl, Role};
use crate::repl::daemon::{self, RunError, RunOptions};
use crate::repl::status;
use crate::sample::{self, SampleSize};
use crate::sync::{self, SyncError, SyncOptions};

/// The database the demo creates on both clusters.
const DATABASE: &str = "bite";

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A cluster would not start (includes missing binaries, with the package to install).
    #[error("failed to start a local PostgreSQL")]
    Cluster(#[from] ClusterError),
    /// Connecting to a demo cluster failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Setting up the demo databases failed.
    #[error("{context}")]
    Setup {
        /// What was being done.
        context: &'static str,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The sync failed.
    #[error("the demo sync failed")]
    Sync(#[from] SyncError),
    /// Replication failed.
    #[error("the demo replication failed")]
    Replication(#[from] Box<RunError>),
    /// The WhatsApp relay part failed.
    #[error("the demo relay: {0}")]
    Relay(String),
    /// A blocking task panicked or was cancelled.
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
}

fn setup(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DemoError {
    move |source| DemoError::Setup { context, source }
}

/// Starts a source (logical) and a mirror cluster, both with `settings` on top of the
/// throwaway defaults; blocking work, run off the runtime.
pub async fn start_pair(
    settings: &[(&str, &str)],
) -> Result<(TempCluster, TempCluster), DemoError> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let start = |name: &str, logical: bool| {
        let opts = ClusterOptions {
            name: name.into(),
            logical,
            settings: settings.clone(),
        };
        tokio::task::spawn_blocking(move || TempCluster::start(&opts))
    };
    let (source, mirror) = (start("source", true), start("mirror", false));
    let (source, mirror) = (source.await??, mirror.await??);
    Ok((source, mirror))
}

/// Creates `name` on a cluster (connecting to its `postgres` database) and returns its URL.
pub async fn create_database(
    cluster: &TempCluster,
    name: &str,
    role: Role,
) -> Result<DbUrl, DemoError> {
    let admin = DbUrl::parse(role, &cluster.url("postgres"))?
        .connect()
        .await?;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {}",
            crate::pg::ident::quote(name)
        ))
        .await
        .map_err(setup("failed to create a demo database"))?;
    Ok(DbUrl::parse(role, &cluster.url(name))?)
}

/// Runs the demo until Ctrl-C (or right through with `--no-wait`).
pub async fn run(args: &DemoArgs, cancel: CancellationToken) -> Result<(), DemoError> {
    crate::outln!("Starting two throwaway PostgreSQL clusters (source and mirror)...");
    let (source_cluster, mirror_cluster) = start_pair(&[]).await?;
    let result = demo(args, &cancel, &source_cluster, &mirror_cluster).await;
    crate::outln!("\nStopping the demo clusters and removing their files...");
    let stopped = tokio::task::spawn_blocking(move || {
        let a = source_cluster.stop();
        let b = mirror_cluster.stop();
        a.and(b)
    })
    .await?;
    result?;
    stopped?;
    crate::outln!("Done: nothing is left running.");
    Ok(())
}

async fn demo(
    args: &DemoArgs,
    cancel: &CancellationToken,
    source_cluster: &TempCluster,
    mirror_cluster: &TempCluster,
) -> Result<(), DemoError> {
    let source_url = create_database(source_cluster, DATABASE, Role::Source).await?;
    let mirror_url = create_database(mirror_cluster, DATABASE, Role::Mirror).await?;

    let size = SampleSize {
        customers: args.customers,
        orders: args.orders,
        items_per_order: SampleSize::DEMO.items_per_order,
    };
    crate::outln!(
        "Loading the sample restaurant into the source: {} customers, {} orders, {} order items...",
        size.customers,
        size.orders,
        size.orders * u64::from(size.items_per_order)
    );
    let source = source_url.connect().await?;
    sample::load(&source, size)
        .await
        .map_err(setup("failed to load the sample restaurant"))?;

    crate::outln!("\n$ bite-sync sync --init   # every table, first sync into a fresh mirror");
    let mut opts = SyncOptions::new(source_url.clone(), mirror_url.clone());
    opts.init = true;
    let observer = sync::progress::on_stderr(true);
    let report = sync::sync(&opts, Arc::clone(&observer), cancel.clone()).await?;
    drop(observer);
    crate::out!("{}", sync::report::render(&report));

    // A change on the source, then a partial sync, to show what `--tables` does.
    source
        .batch_execute(
            "UPDATE customers SET name = name || ' (VIP)' WHERE id <= 10; \
             UPDATE orders SET status = 'delivered' WHERE status = 'ready'",
        )
        .await
        .map_err(setup("failed to change the sample data"))?;
    crate::outln!(
        "\nChanged 10 customers and every 'ready' order on the source.\n$ bite-sync sync --tables customers,orders"
    );
    let mut opts = SyncOptions::new(source_url.clone(), mirror_url.clone());
    opts.tables = crate::pg::ident::parse_pattern_list("customers,orders")
        .expect("literal pattern list parses");
    let report = sync::sync(&opts, Arc::new(sync::Quiet), cancel.clone()).await?;
    crate::out!("{}", sync::report::render(&report));

    let mirror = mirror_url.connect().await?;
    let vip: i64 = mirror
        .query_one(
            "SELECT count(*) FROM public.customers WHERE name LIKE '%(VIP)'",
            &[],
        )
        .await
        .map_err(setup("failed to read the mirror"))?
        .get(0);
    crate::outln!("The mirror now has {vip} VIP customers, as the source does.");

    let replication = live(&source_url, &mirror_url, args, cancel).await?;

    let source_plain = source_cluster.url(DATABASE);
    let mirror_plain = mirror_cluster.url(DATABASE);
    let relay = if cancel.is_cancelled() {
        None
    } else {
        Some(relay::show(&mirror_plain, &mirror_url, cancel).await?)
    };
    let relay_lines = relay.as_ref().map_or(String::new(), |r| {
        format!(
            "  curl -fsS http://127.0.0.1:{port}/api/webhook/status   # the relay's counters\n  \
             curl -fsS http://127.0.0.1:{port}/api/sync/health\n  \
             psql '{mirror_plain}' -c 'SELECT id, kind, customer_name, body, delivery_state, ai_state FROM bite_sync.inbox'\n",
            port = r.port
        )
    });
    // Every command below works as printed (the demo's test runs each one): menu_items is
    // not replicated, so a one-off sync of it is allowed; the replicated tables follow
    // changes by themselves.
    crate::outln!(
        "\nLook around:\n  \
         psql '{source_plain}'   # the source (local database)\n  \
         psql '{mirror_plain}'   # the mirror\n  \
         psql '{mirror_plain}' -c 'SELECT id, mode, outcome, rows_copied, duration_ms FROM bite_sync.sync_runs'\n\n\
         Try it yourself:\n  \
         psql '{source_plain}' -c \"UPDATE menu_items SET price = price + 1\"   # a menu change on the source\n  \
         bite-sync sync --source '{source_plain}' --mirror '{mirror_plain}' --tables menu_items --dry-run   # the plan\n  \
         bite-sync sync --source '{source_plain}' --mirror '{mirror_plain}' --tables menu_items   # menu_items is not replicated: sync it\n  \
         psql '{source_plain}' -c \"UPDATE orders SET status = 'delivered' WHERE id = 1\"   # replication is still running\n  \
         psql '{mirror_plain}' -c 'SELECT id, status FROM orders WHERE id = 1'   # a moment later, on the mirror\n  \
         bite-sync status --source '{source_plain}' --mirror '{mirror_plain}'\n\
         {relay_lines}"
    );
    if !args.no_wait {
        crate::outln!("Press Ctrl-C to stop the demo and remove its databases.");
        cancel.cancelled().await;
    }
    if let Some(relay) = relay {
        relay.finish().await?;
    }
    replication.stop.cancel();
    match replication.daemon.await? {
        Ok(()) => Ok(()),
        Err(e) => Err(DemoError::Replication(Box::new(e))),
    }
}

/// The replication daemon running in the background of the demo.
struct Replication {
    stop: CancellationToken,
    daemon: tokio::task::JoinHandle<Result<(), RunError>>,
}

/// How long the demo's live workload runs.
const LIVE_SECONDS: u64 = 6;

/// The tables the demo replicates. The menu is left out, edited in the back office and synced
/// when it changes, so that the printed `bite-sync sync --tables menu_items` can run (a table
/// `run` replicates is refused by a one-off sync).
const REPLICATED: &str = "customers,orders,order_items";

/// Starts `bite-sync run` in the background, runs a small workload on the source, and prints
/// both sides' row counts and the lag while it runs. Replication keeps running afterwards.
async fn live(
    source_url: &DbUrl,
    mirror_url: &DbUrl,
    args: &DemoArgs,
    cancel: &CancellationToken,
) -> Result<Replication, DemoError> {
    crate::outln!(
        "\n$ bite-sync run --tables {REPLICATED}   # continuous replication (menu_items stays a one-off sync)"
    );
    let tables =
        crate::pg::ident::parse_pattern_list(REPLICATED).expect("literal pattern list parses");
    let mut opts = RunOptions::new(source_url.clone(), mirror_url.clone(), tables);
    opts.init = true;
    let stop = cancel.child_token();
    let daemon = {
        let stop = stop.clone();
        tokio::spawn(async move { daemon::run(&opts, Arc::new(sync::Quiet), stop).await })
    };
    let replication = Replication { stop, daemon };
    let source = source_url.connect().await?;
    let mirror = mirror_url.connect().await?;
    // Wait until the daemon has made its slot and copied the tables.
    let mut waited = 0;
    while !streaming(&mirror).await && waited < 300 {
        if replication.daemon.is_finished() || cancel.is_cancelled() {
            return Ok(replication);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        waited += 1;
    }
    crate::outln!(
        "Replicating. A live workload now places about 10 orders a second on the source ({LIVE_SECONDS} s):"
    );
    let workload = {
        let stop = cancel.child_token();
        let guard = stop.clone();
        let task = tokio::spawn(async move {
            while !stop.is_cancelled() {
                if source
                    .batch_execute(sample::ORDER_TRANSACTION)
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            source
        });
        (guard, task)
    };
    let seconds = if args.no_wait { 3 } else { LIVE_SECONDS };
    for _ in 0..seconds {
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = cancel.cancelled() => break,
        }
        print_counts(source_url, mirror_url, &mirror).await;
    }
    workload.0.cancel();
    let source = workload.1.await?;
    // Let the last orders arrive, then show both sides equal.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    crate::outln!("Workload stopped; a moment later:");
    print_counts(source_url, mirror_url, &mirror).await;
    drop(source);
    Ok(replication)
}

async fn streaming(mirror: &tokio_postgres::Client) -> bool {
    mirror
        .query_one(
            "SELECT count(*) > 0 FROM bite_sync.replication_tables WHERE state = 'streaming'",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

async fn print_counts(source_url: &DbUrl, mirror_url: &DbUrl, mirror: &tokio_postgres::Client) {
    let count =
        "SELECT (SELECT count(*) FROM public.orders), (SELECT count(*) FROM public.order_items)";
    let Ok(source) = source_url.connect().await else {
        return;
    };
    let (Ok(s), Ok(m)) = (
        source.query_one(count, &[]).await,
        mirror.query_one(count, &[]).await,
    ) else {
        return;
    };
    let report = status::status(
        Some(source_url),
        Some(mirror_url),
        crate::config::DEFAULT_REPLICATION_NAME,
    )
    .await;
    let lag = report
        .source
        .as_ref()
        .and_then(|s| s.lag_seconds)
        .map_or("-".to_string(), |l| format!("{l:.2} s"));
    crate::outln!(
        "  orders {:>6} source / {:>6} mirror   order_items {:>6} / {:>6}   lag {lag}",
        s.get::<_, i64>(0),
        m.get::<_, i64>(0),
        s.get::<_, i64>(1),
        m.get::<_, i64>(1),
    );
}
