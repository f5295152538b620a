//! `bite-sync demo`: bite-sync on two throwaway local databases with the sample restaurant.
//!
//! Starts a source cluster (`wal_level=logical`) and a mirror cluster in a temporary directory
//! on free ports, loads the sample restaurant into the source, syncs it to the mirror with the
//! same engine `bite-sync sync` uses, shows what happened and how to look, then waits for
//! Ctrl-C and removes everything it made. If the process is killed instead, the clusters'
//! watchdogs stop them and remove their directories.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::pg::cluster::{ClusterError, ClusterOptions, TempCluster};
use crate::pg::connect::{ConnectError, DbUrl, Role};
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
    println!("Starting two throwaway PostgreSQL clusters (source and mirror)...");
    let (source_cluster, mirror_cluster) = start_pair(&[]).await?;
    let result = demo(args, &cancel, &source_cluster, &mirror_cluster).await;
    println!("\nStopping the demo clusters and removing their files...");
    let stopped = tokio::task::spawn_blocking(move || {
        let a = source_cluster.stop();
        let b = mirror_cluster.stop();
        a.and(b)
    })
    .await?;
    result?;
    stopped?;
    println!("Done: nothing is left running.");
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
    println!(
        "Loading the sample restaurant into the source: {} customers, {} orders, {} order items...",
        size.customers,
        size.orders,
        size.orders * u64::from(size.items_per_order)
    );
    let source = source_url.connect().await?;
    sample::load(&source, size)
        .await
        .map_err(setup("failed to load the sample restaurant"))?;

    println!("\n$ bite-sync sync --init   # every table, first sync into a fresh mirror");
    let mut opts = SyncOptions::new(source_url.clone(), mirror_url.clone());
    opts.init = true;
    let observer = sync::progress::on_stderr(true);
    let report = sync::sync(&opts, Arc::clone(&observer), cancel.clone()).await?;
    drop(observer);
    print!("{}", sync::report::render(&report));

    // A change on the source, then a partial sync, to show what `--tables` does.
    source
        .batch_execute(
            "UPDATE customers SET name = name || ' (VIP)' WHERE id <= 10; \
             UPDATE orders SET status = 'delivered' WHERE status = 'ready'",
        )
        .await
        .map_err(setup("failed to change the sample data"))?;
    println!(
        "\nChanged 10 customers and every 'ready' order on the source.\n$ bite-sync sync --tables customers,orders"
    );
    let mut opts = SyncOptions::new(source_url.clone(), mirror_url.clone());
    opts.tables = crate::pg::ident::parse_pattern_list("customers,orders")
        .expect("literal pattern list parses");
    let report = sync::sync(&opts, Arc::new(sync::Quiet), cancel.clone()).await?;
    print!("{}", sync::report::render(&report));

    let mirror = mirror_url.connect().await?;
    let vip: i64 = mirror
        .query_one(
            "SELECT count(*) FROM public.customers WHERE name LIKE '%(VIP)'",
            &[],
        )
        .await
        .map_err(setup("failed to read the mirror"))?
        .get(0);
    println!("The mirror now has {vip} VIP customers, as the source does.");

    let source_plain = source_cluster.url(DATABASE);
    let mirror_plain = mirror_cluster.url(DATABASE);
    println!(
        "\nLook around:\n  \
         psql '{source_plain}'   # the source (local database)\n  \
         psql '{mirror_plain}'   # the mirror\n  \
         psql '{mirror_plain}' -c 'SELECT id, mode, outcome, rows_copied, duration_ms FROM bite_sync.sync_runs'\n\n\
         Try a sync yourself:\n  \
         bite-sync sync --source '{source_plain}' --mirror '{mirror_plain}' --tables menu_items --dry-run\n"
    );
    if args.no_wait {
        return Ok(());
    }
    println!("Press Ctrl-C to stop the demo and remove its databases.");
    cancel.cancelled().await;
    Ok(())
}
