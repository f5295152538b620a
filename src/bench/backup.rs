//! `bite-sync bench backup`: `bite-sync backup` and `restore` against `pg_dump | gzip -6` and
//! `gunzip -c | psql`, on the same sample restaurant, clusters and disk, in one run.
//!
//! - A: `pg_dump | gzip -6 > file` (plain SQL, the old guide's way plus compression);
//! - B: `bite-sync backup --to file://...`;
//! - C: `gunzip -c file | psql` into an empty database;
//! - D: `bite-sync restore latest --target` an empty database.
//!
//! Targets: B/A time ≤ 0.7, B/A size ≤ 1.1, D/C time ≤ 0.6, peak RSS ≤ 64 MiB for B and D.
//! Every restore is checked against the source's row counts.

use tokio_util::sync::CancellationToken;

use super::{
    BenchError, EmptyTarget, Measured, Prepared, checkpoint, connect_url, median, prepare,
    print_report, run_self, shell, start_clusters, stop_clusters, tool,
};
use crate::cli::BackupBenchArgs;

/// The benchmark's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupBenchReport {
    /// Source database size in MiB.
    pub source_mib: f64,
    /// Rows per table on the source.
    pub rows: Vec<(String, i64)>,
    /// A: pg_dump | gzip -6.
    pub a_pg_dump_gzip: Measured,
    /// B: bite-sync backup.
    pub b_bite_sync_backup: Measured,
    /// C: gunzip | psql.
    pub c_gunzip_psql: Measured,
    /// D: bite-sync restore.
    pub d_bite_sync_restore: Measured,
    /// A's file in MiB.
    pub a_mib: f64,
    /// B's objects in MiB.
    pub b_mib: f64,
    /// B/A time (target ≤ 0.7).
    pub backup_time_ratio: f64,
    /// B/A size (target ≤ 1.1).
    pub backup_size_ratio: f64,
    /// D/C time (target ≤ 0.6).
    pub restore_time_ratio: f64,
    /// Highest peak RSS of B and D in MiB (target ≤ 64).
    pub peak_rss_mib: f64,
}

/// Runs the benchmark and prints its results.
pub async fn run(args: &BackupBenchArgs, cancel: CancellationToken) -> Result<(), BenchError> {
    let (source_cluster, mirror_cluster) = start_clusters().await?;
    let work = tempfile::Builder::new()
        .prefix("bite-sync-bench-backup-")
        .tempdir()
        .map_err(|source| BenchError::Spawn {
            what: "creating a work directory".into(),
            source,
        })?;
    let result = tokio::select! {
        r = bench(args, &source_cluster, &mirror_cluster, work.path()) => r,
        () = cancel.cancelled() => Err(BenchError::Cancelled),
    };
    stop_clusters(source_cluster, mirror_cluster).await?;
    print_report(args.json, &result?, render);
    Ok(())
}

fn dir_mib(dir: &std::path::Path) -> f64 {
    fn walk(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir) as f64 / 1_048_576.0
}

async fn bench(
    args: &BackupBenchArgs,
    source_cluster: &crate::pg::cluster::TempCluster,
    mirror_cluster: &crate::pg::cluster::TempCluster,
    work: &std::path::Path,
) -> Result<BackupBenchReport, BenchError> {
    let bin = source_cluster.bin_dir().to_path_buf();
    let Prepared {
        source_mib,
        rows,
        src,
        clusters,
    } = prepare(source_cluster, mirror_cluster, args.customers, args.orders).await?;
    let admin = connect_url(&clusters[1]).await?;
    let jobs = args.jobs.to_string();
    let dump_file = work.join("dump.sql.gz");
    let store_dir = work.join("store");

    let mut samples: [Vec<Measured>; 4] = Default::default();
    let (mut a_mib, mut b_mib) = (0.0, 0.0);
    for round in 1..=args.rounds {
        eprintln!("round {round} of {}", args.rounds);
        let _ = std::fs::remove_file(&dump_file);
        let _ = std::fs::remove_dir_all(&store_dir);
        checkpoint(&clusters).await?;
        eprintln!("  A: pg_dump | gzip -6");
        let a = shell(
            "A (pg_dump | gzip -6)",
            &format!(
                "{} '{src}' | gzip -6 > '{}'",
                tool(&bin, "pg_dump"),
                dump_file.display()
            ),
        )?;
        a_mib = std::fs::metadata(&dump_file).map_or(0.0, |m| m.len() as f64 / 1_048_576.0);
        checkpoint(&clusters).await?;
        eprintln!("  B: bite-sync backup --to file://...");
        let to = format!("file://{}", store_dir.display());
        let b = run_self(
            "B (bite-sync backup)",
            &[
                "-q", "backup", "--source", &src, "--to", &to, "--jobs", &jobs,
            ],
        )?;
        b_mib = dir_mib(&store_dir);

        let empty = EmptyTarget {
            mirror_cluster,
            admin: &admin,
            clusters: &clusters,
            rows: &rows,
        };
        eprintln!("  C: gunzip -c | psql");
        let c = empty
            .measure(&format!("restore_c_{round}"), "C", |target| {
                shell(
                    "C (gunzip -c | psql)",
                    &format!(
                        "gunzip -c '{}' | {} -q -X -v ON_ERROR_STOP=1 '{target}' > /dev/null",
                        dump_file.display(),
                        tool(&bin, "psql")
                    ),
                )
            })
            .await?;
        eprintln!("  D: bite-sync restore latest");
        let d = empty
            .measure(&format!("restore_d_{round}"), "D", |target| {
                run_self(
                    "D (bite-sync restore)",
                    &[
                        "-q", "restore", "latest", "--from", &to, "--target", target, "--jobs",
                        &jobs,
                    ],
                )
            })
            .await?;
        for (all, m) in samples.iter_mut().zip([a, b, c, d]) {
            all.push(m);
        }
    }
    let [a, b, c, d] = samples.map(|s| median(&s));
    Ok(BackupBenchReport {
        source_mib,
        rows,
        backup_time_ratio: b.seconds / a.seconds,
        backup_size_ratio: b_mib / a_mib,
        restore_time_ratio: d.seconds / c.seconds,
        peak_rss_mib: b
            .peak_rss_mib
            .unwrap_or(0.0)
            .max(d.peak_rss_mib.unwrap_or(0.0)),
        a_mib,
        b_mib,
        a_pg_dump_gzip: a,
        b_bite_sync_backup: b,
        c_gunzip_psql: c,
        d_bite_sync_restore: d,
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// The report as text.
pub fn render(r: &BackupBenchReport) -> String {
    let rss = |m: &Measured| {
        m.peak_rss_mib
            .map(|v| format!("  peak RSS {v:.1} MiB"))
            .unwrap_or_default()
    };
    let mut out = format!("source: {:.0} MiB;", r.source_mib);
    for (table, n) in &r.rows {
        out.push_str(&format!(" {table} {n}"));
    }
    out.push('\n');
    out.push_str(&format!(
        "A  pg_dump | gzip -6                     {:6.2} s  {:7.1} MiB\n",
        r.a_pg_dump_gzip.seconds, r.a_mib
    ));
    out.push_str(&format!(
        "B  bite-sync backup --to file://         {:6.2} s  {:7.1} MiB{}\n",
        r.b_bite_sync_backup.seconds,
        r.b_mib,
        rss(&r.b_bite_sync_backup)
    ));
    out.push_str(&format!(
        "C  gunzip -c | psql (empty database)     {:6.2} s\n",
        r.c_gunzip_psql.seconds
    ));
    out.push_str(&format!(
        "D  bite-sync restore (empty database)    {:6.2} s{}\n",
        r.d_bite_sync_restore.seconds,
        rss(&r.d_bite_sync_restore)
    ));
    out.push_str(&format!(
        "backup time B/A = {:.3}  (target <= 0.7: {})\n",
        r.backup_time_ratio,
        verdict(r.backup_time_ratio <= 0.7)
    ));
    out.push_str(&format!(
        "backup size B/A = {:.3}  (target <= 1.1: {})\n",
        r.backup_size_ratio,
        verdict(r.backup_size_ratio <= 1.1)
    ));
    out.push_str(&format!(
        "restore time D/C = {:.3}  (target <= 0.6: {})\n",
        r.restore_time_ratio,
        verdict(r.restore_time_ratio <= 0.6)
    ));
    out.push_str(&format!(
        "peak RSS = {:.1} MiB  (target <= 64: {})\n",
        r.peak_rss_mib,
        verdict(r.peak_rss_mib <= 64.0)
    ));
    out
}
