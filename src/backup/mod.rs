//! Backups: consistent, compressed, checksummed dumps to a folder or an S3-compatible store,
//! with a manifest written last, verification by restoring, and restore.
//!
//! | module | job |
//! |---|---|
//! | [`store`] | where objects live: a folder or an S3-compatible bucket, in bounded memory |
//! | [`digest`] | row count and order-independent checksum of a table's COPY text (pure) |
//! | [`crypt`] | optional age encryption of objects: keys, the gzip-then-age encoder, the decrypting reader |
//! | [`manifest`] | what a backup holds; object names that sort in restore order (pure) |
//! | [`schema`] | `pg_dump --schema-only` in the snapshot; post-data cut into parallel phases |
//! | [`dump`] | `bite-sync backup` |
//! | [`large_objects`] | large objects: the script that restores them, their digest |
//! | [`prune`] | `backups prune`: keep-last/daily/weekly/monthly retention |
//! | [`restore`] | `bite-sync restore`, `backups list`, `backups verify` |
//! | [`tables`] | which tables a backup holds: every table with rows, partitions included |

pub mod crypt;
pub mod digest;
pub mod dump;
pub mod large_objects;
pub mod manifest;
pub mod prune;
pub mod restore;
pub mod schema;
pub mod store;
pub mod tables;

use crate::cli::{
    BackupArgs, BackupsKeygenArgs, BackupsListArgs, BackupsPruneArgs, BackupsVerifyArgs,
    RestoreArgs,
};
use crate::config::{Config, ConfigError};
use crate::pg::connect::{DbUrl, Role};
use crate::pg::ident::parse_pattern_list;

fn location(config: &Config, flag: &Option<String>, name: &str) -> Result<String, ConfigError> {
    flag.clone()
        .or_else(|| config.backup.url.clone())
        .ok_or_else(|| ConfigError {
            problems: vec![format!(
                "no backup location: give {name} s3://bucket/prefix or file:///dir, set BITE_BACKUP_URL, or set backup.url in bite-sync.toml"
            )],
        })
}

/// `--tables`, split; none: every table.
fn tables_flag(list: &Option<String>) -> Result<Vec<crate::pg::ident::TablePattern>, ConfigError> {
    match list {
        Some(t) => parse_pattern_list(t).map_err(|e| ConfigError {
            problems: vec![format!("--tables: {e}")],
        }),
        None => Ok(Vec::new()),
    }
}

fn source_url(config: &Config, flag: &Option<String>) -> Result<DbUrl, ConfigError> {
    match flag {
        Some(url) => DbUrl::parse(Role::Source, url).map_err(|e| ConfigError {
            problems: vec![format!("--source / BITE_SOURCE_URL: {e}")],
        }),
        None => config.require_source(),
    }
}

fn fail(message: &dyn std::error::Error, code: i32) -> u8 {
    eprintln!("error: {}", crate::error_chain(message));
    code as u8
}

fn print_json<T: serde::Serialize>(value: &T) {
    crate::outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialize")
    );
}

/// Human sizes for reports.
fn size(bytes: u64) -> String {
    crate::repl::status::human_bytes(i64::try_from(bytes).unwrap_or(i64::MAX))
}

/// The identity for restore and verify: `BITE_BACKUP_IDENTITY`, else `backup.identity_file`.
fn identity(config: &Config) -> Result<Option<crypt::Identity>, u8> {
    config.backup.identity().map_err(|e| fail(&e, 2))
}

async fn open_store(url: &str, config: &Config) -> Result<store::Store, u8> {
    store::Store::open(url, &config.backup.s3)
        .await
        .map_err(|e| fail(&e, 2))
}

/// `bite-sync backup`.
pub async fn run_backup(config: &Config, args: &BackupArgs) -> u8 {
    let prepared = (|| {
        let url = location(config, &args.to, "--to")?;
        let source = source_url(config, &args.source)?;
        let tables = tables_flag(&args.tables)?;
        Ok::<_, ConfigError>((url, source, tables))
    })();
    let (url, source, tables) = match prepared {
        Ok(p) => p,
        Err(e) => return fail(&e, 2),
    };
    let store = match open_store(&url, config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut opts = dump::BackupOptions::configured(source, &config.backup);
    opts.tables = tables;
    opts.jobs = args.jobs.map_or(config.backup.jobs, usize::from);
    match dump::backup(&opts, &store).await {
        Ok(report) => {
            if args.json {
                print_json(&report);
            } else {
                crate::outln!(
                    "backup {} done: {} tables, {} rows, {} in {} objects, {:.1} s\n  at {}/{}",
                    report.id,
                    report.tables,
                    report.rows,
                    size(report.bytes),
                    report.objects,
                    report.duration_ms as f64 / 1000.0,
                    report.location,
                    report.id
                );
            }
            0
        }
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// `bite-sync backups list`.
pub async fn run_list(config: &Config, args: &BackupsListArgs) -> u8 {
    let url = match location(config, &args.from.from, "--from") {
        Ok(u) => u,
        Err(e) => return fail(&e, 2),
    };
    let store = match open_store(&url, config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match restore::list(&store).await {
        Ok(list) => {
            if args.json {
                print_json(&list);
            } else if list.is_empty() {
                crate::outln!("no backups at {}", store.describe());
            } else {
                crate::outln!(
                    "{:<20} {:<10} {:>10} {:>7} {:>12}  scope",
                    "id",
                    "state",
                    "size",
                    "tables",
                    "rows"
                );
                for b in &list {
                    crate::outln!(
                        "{:<20} {:<10} {:>10} {:>7} {:>12}  {}",
                        b.id,
                        b.state,
                        size(b.bytes),
                        b.tables.map(|t| t.to_string()).unwrap_or_default(),
                        b.rows.map(|r| r.to_string()).unwrap_or_default(),
                        b.problem
                            .clone()
                            .or_else(|| b.scope.clone())
                            .unwrap_or_default()
                    );
                }
            }
            0
        }
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// `bite-sync backups verify`.
pub async fn run_verify(config: &Config, args: &BackupsVerifyArgs) -> u8 {
    let prepared = (|| {
        let url = location(config, &args.from.from, "--from")?;
        let server = match &args.scratch {
            Some(u) => DbUrl::parse(Role::Scratch, u).map_err(|e| ConfigError {
                problems: vec![format!("--scratch: {e}")],
            })?,
            None => source_url(config, &args.source)?,
        };
        Ok::<_, ConfigError>((url, server))
    })();
    let (url, server) = match prepared {
        Ok(p) => p,
        Err(e) => return fail(&e, 2),
    };
    let store = match open_store(&url, config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let identity = match identity(config) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let jobs = args.jobs.map_or(config.backup.jobs, usize::from);
    match restore::verify(
        &store,
        &args.id,
        &server,
        jobs,
        &config.sync.maintenance_work_mem,
        identity.as_ref(),
    )
    .await
    {
        Ok(report) => {
            if args.json {
                print_json(&report);
            } else {
                for t in &report.tables {
                    crate::outln!(
                        "{}  {:<40} {:>12} rows{}",
                        if t.ok { "OK  " } else { "DIFF" },
                        t.table,
                        t.restored.rows,
                        if t.ok {
                            String::new()
                        } else {
                            format!(
                                " (manifest: {} rows, checksum {:016x}; restored checksum {:016x})",
                                t.expected.rows, t.expected.checksum, t.restored.checksum
                            )
                        }
                    );
                }
                crate::outln!(
                    "backup {} {}: {} objects' SHA-256 checked, {} tables restored and compared in {:.1} s",
                    report.id,
                    if report.ok { "verified" } else { "DIFFERS" },
                    report.objects,
                    report.tables.len(),
                    report.duration_ms as f64 / 1000.0
                );
            }
            if report.ok { 0 } else { 1 }
        }
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// `bite-sync restore`.
pub async fn run_restore(config: &Config, args: &RestoreArgs) -> u8 {
    let prepared = (|| {
        let url = location(config, &args.from.from, "--from")?;
        let target = DbUrl::parse(Role::Target, &args.target).map_err(|e| ConfigError {
            problems: vec![format!("--target: {e}")],
        })?;
        let tables = tables_flag(&args.tables)?;
        Ok::<_, ConfigError>((url, target, tables))
    })();
    let (url, target, tables) = match prepared {
        Ok(p) => p,
        Err(e) => return fail(&e, 2),
    };
    let store = match open_store(&url, config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let identity = match identity(config) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let opts = restore::RestoreOptions {
        target,
        clean: args.clean,
        jobs: args.jobs.map_or(config.backup.jobs, usize::from),
        tables,
        work_mem: config.sync.maintenance_work_mem.clone(),
        identity,
    };
    match restore::restore(&store, &args.id, &opts).await {
        Ok(report) => {
            if args.json {
                print_json(&report);
            } else {
                crate::outln!(
                    "restored backup {} into {}: {} tables, {} rows, {} read, {:.1} s",
                    report.id,
                    report.target,
                    report.tables,
                    report.rows,
                    size(report.bytes),
                    report.duration_ms as f64 / 1000.0
                );
            }
            0
        }
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// `bite-sync backups prune`.
pub async fn run_prune(config: &Config, args: &BackupsPruneArgs) -> u8 {
    let url = match location(config, &args.from.from, "--from") {
        Ok(u) => u,
        Err(e) => return fail(&e, 2),
    };
    let store = match open_store(&url, config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let base = config.backup.retention;
    let policy = prune::Retention {
        keep_last: args.keep_last.unwrap_or(base.keep_last),
        keep_daily: args.keep_daily.unwrap_or(base.keep_daily),
        keep_weekly: args.keep_weekly.unwrap_or(base.keep_weekly),
        keep_monthly: args.keep_monthly.unwrap_or(base.keep_monthly),
    };
    match prune::prune(&store, &policy, chrono::Utc::now(), args.dry_run).await {
        Ok(report) => {
            if args.json {
                print_json(&report);
            } else {
                let verb = if report.dry_run {
                    "would delete"
                } else {
                    "deleted"
                };
                for (id, why) in &report.kept {
                    crate::outln!("keep    {id}  ({})", why.join(", "));
                }
                for id in &report.deleted {
                    crate::outln!("{verb:<7} {id}");
                }
                for id in &report.incomplete_deleted {
                    crate::outln!("{verb:<7} {id}  (incomplete)");
                }
                crate::outln!(
                    "{}, {} freed{}",
                    report.counts(),
                    size(report.bytes_freed),
                    if report.dry_run { " (dry run)" } else { "" }
                );
            }
            0
        }
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// `bite-sync backups keygen`: a new age identity on stdout (or `--out FILE`, mode 0600), its
/// public key on stderr.
pub fn run_keygen(args: &BackupsKeygenArgs) -> u8 {
    let identity = crypt::Identity::generate();
    let text = identity.file_text(chrono::Utc::now());
    match &args.out {
        None => crate::outln!("{}", text.trim_end()),
        Some(path) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            // create_new: never overwrite a key that may still be the only way into old backups.
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
            if let Err(e) = written {
                eprintln!("error: cannot write {}: {e}", path.display());
                return if e.kind() == std::io::ErrorKind::AlreadyExists {
                    2
                } else {
                    1
                };
            }
        }
    }
    eprintln!("Public key: {}", identity.recipient());
    eprintln!(
        "Put the public key in bite-sync.toml on the machine that backs up ([backup] encrypt_to = \"{}\").\n\
         Keep the identity somewhere else (a password manager, the machine you restore from): without it no encrypted backup can be restored.",
        identity.recipient()
    );
    0
}
