//! What each kind of scheduled job does: the [`JobRunner`] of `bite-sync run`, which turns a
//! [`Job`] and the configuration into a backup, a backup check, a sync or a prune.
//!
//! [`plan`] is the pure part: it fills in the configuration's defaults (`[backup] url` for a
//! job without `to`/`from`, `[sync]` settings and tables for a sync without tables, the source
//! server for a check) and says what is missing. The daemon calls it for every job before
//! anything starts, so a job that could never run is a configuration error at start, not a
//! failed run every night. [`ConfigRunner`] calls it again for each run and does the work.
//!
//! Stopping: a backup or a backup check in progress is finished (a backup stopped halfway
//! would leave objects to clean up, a check its scratch database); a sync in progress is
//! abandoned, which leaves the mirror as it was (its swap is one transaction).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::load::ScheduleError;
use super::run::{JobOutcome, JobRunner};
use super::{Job, JobKind};
use crate::backup::dump::{self, BackupError, BackupOptions};
use crate::backup::restore::{self, RestoreError};
use crate::backup::store::{Store, StoreError};
use crate::config::{Config, ConfigError};
use crate::pg::connect::DbUrl;
use crate::sync::{self, SyncError, SyncOptions};

/// A job's work with every default filled in.
#[derive(Debug, Clone)]
pub enum Work {
    /// `bite-sync backup --to <location>`.
    Backup {
        /// Where to.
        location: String,
        /// What and how.
        options: BackupOptions,
    },
    /// `bite-sync backups verify <backup> --from <location>`.
    Verify {
        /// Where the backups are.
        location: String,
        /// `latest` or a backup's id.
        backup: String,
        /// The server the scratch database is made on (the source's).
        server: DbUrl,
        /// Parallel connections.
        jobs: usize,
        /// `maintenance_work_mem` for the restore's index builds.
        work_mem: String,
    },
    /// `bite-sync sync`.
    Sync(Box<SyncOptions>),
    /// `bite-sync backups prune --from <location>`.
    Prune {
        /// Where the backups are.
        location: String,
    },
}

/// Why a job cannot run, or why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The backup identity could not be read.
    #[error(transparent)]
    Key(#[from] crate::backup::crypt::KeyError),
    /// Neither the job nor the configuration says where the backups are.
    #[error(
        "no backup location: set {key} in the job, backup.url in bite-sync.toml or BITE_BACKUP_URL (or enabled = false in the job to run without it)"
    )]
    NoLocation {
        /// The job's key for it: `to` or `from`.
        key: &'static str,
    },
    /// A database URL is missing.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The backup store could not be opened.
    #[error(transparent)]
    Store(Box<StoreError>),
    /// The backup failed.
    #[error(transparent)]
    Backup(Box<BackupError>),
    /// The check could not restore or compare the backup.
    #[error(transparent)]
    Verify(Box<RestoreError>),
    /// The check restored the backup and some tables differ from its manifest.
    #[error(
        "backup {id} does not restore to what it holds: {} differ from the manifest (restore an earlier backup if this one is needed)",
        .tables.join(", ")
    )]
    Differs {
        /// The backup.
        id: String,
        /// The tables that differ.
        tables: Vec<String>,
    },
    /// The sync failed.
    #[error(transparent)]
    Sync(Box<SyncError>),
}

// Boxed: the causes are large, and a `Result` of them is passed around on every run.
impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        JobError::Store(Box::new(e))
    }
}

impl From<BackupError> for JobError {
    fn from(e: BackupError) -> Self {
        JobError::Backup(Box::new(e))
    }
}

impl From<RestoreError> for JobError {
    fn from(e: RestoreError) -> Self {
        JobError::Verify(Box::new(e))
    }
}

impl From<SyncError> for JobError {
    fn from(e: SyncError) -> Self {
        JobError::Sync(Box::new(e))
    }
}

/// The job's work with the configuration's defaults, or what is missing for it. `init` is
/// `bite-sync run --init`, which a sync passes on.
pub fn plan(job: &Job, config: &Config, init: bool) -> Result<Work, JobError> {
    let location = |given: &Option<String>, key: &'static str| {
        given
            .clone()
            .or_else(|| config.backup.url.clone())
            .ok_or(JobError::NoLocation { key })
    };
    Ok(match &job.kind {
        JobKind::Backup { to, tables } => {
            let location = location(to, "to")?;
            let mut options = BackupOptions::configured(config.require_source()?, &config.backup);
            options.tables = tables.clone();
            Work::Backup { location, options }
        }
        JobKind::Verify { from, backup } => Work::Verify {
            location: location(from, "from")?,
            backup: backup.clone(),
            server: config.require_source()?,
            jobs: config.backup.jobs,
            work_mem: config.sync.maintenance_work_mem.clone(),
        },
        JobKind::Sync { tables } => {
            let (source, mirror) = config.require_both()?;
            // Like `bite-sync sync --tables`: the job's tables replace sync.tables, and
            // sync.exclude still applies.
            let mut options = SyncOptions::configured(source, mirror, &config.sync);
            if !tables.is_empty() {
                options.tables = tables.clone();
            }
            options.init = init;
            Work::Sync(Box::new(options))
        }
        JobKind::Prune { from } => Work::Prune {
            location: location(from, "from")?,
        },
    })
}

/// Every enabled job that could never run with this configuration, as one error naming each
/// job's file and name (`schedules/backup.toml: job "backup": no backup location: ...`).
pub fn check(jobs: &[Job], config: &Config, init: bool) -> Result<(), ScheduleError> {
    let problems: Vec<String> = jobs
        .iter()
        .filter(|job| job.enabled)
        .filter_map(|job| {
            let e = plan(job, config, init).err()?;
            Some(format!(
                "{}: job {:?}: {}",
                job.file.display(),
                job.name,
                crate::error_chain(&e)
            ))
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ScheduleError { problems })
    }
}

/// Runs jobs with the daemon's configuration.
pub struct ConfigRunner {
    config: Arc<Config>,
    init: bool,
    cancel: CancellationToken,
}

impl ConfigRunner {
    /// A runner for `bite-sync run` with `config`; `init` is its `--init`, `cancel` its
    /// shutdown (which abandons a sync in progress; see the module docs).
    pub fn new(config: Arc<Config>, init: bool, cancel: CancellationToken) -> ConfigRunner {
        ConfigRunner {
            config,
            init,
            cancel,
        }
    }

    async fn execute(&self, job: &Job) -> Result<JobOutcome, JobError> {
        match plan(job, &self.config, self.init)? {
            Work::Backup { location, options } => {
                let store = Store::open(&location, &self.config.backup.s3).await?;
                let report = dump::backup(&options, &store).await?;
                Ok(JobOutcome {
                    bytes: Some(report.bytes),
                    detail: format!(
                        "backup {}: {} tables, {} rows",
                        report.id, report.tables, report.rows
                    ),
                })
            }
            Work::Verify {
                location,
                backup,
                server,
                jobs,
                work_mem,
            } => {
                let store = Store::open(&location, &self.config.backup.s3).await?;
                // An encrypted backup needs the identity (BITE_BACKUP_IDENTITY, else
                // backup.identity_file); a plain one does not.
                let identity = self.config.backup.identity()?;
                let report =
                    restore::verify(&store, &backup, &server, jobs, &work_mem, identity.as_ref())
                        .await?;
                if !report.ok {
                    return Err(JobError::Differs {
                        id: report.id,
                        tables: report
                            .tables
                            .into_iter()
                            .filter(|t| !t.ok)
                            .map(|t| t.table)
                            .collect(),
                    });
                }
                Ok(JobOutcome {
                    bytes: None,
                    detail: format!(
                        "backup {} verified: {} tables restored equal, {} objects' SHA-256 checked",
                        report.id,
                        report.tables.len(),
                        report.objects
                    ),
                })
            }
            Work::Sync(options) => {
                let report =
                    sync::sync(&options, Arc::new(sync::Quiet), self.cancel.clone()).await?;
                for warning in &report.warnings {
                    tracing::warn!(%warning, "sync warning");
                }
                Ok(JobOutcome {
                    bytes: Some(report.bytes),
                    detail: format!("sync: {} tables, {} rows", report.tables.len(), report.rows),
                })
            }
            Work::Prune { location } => {
                let store = Store::open(&location, &self.config.backup.s3).await?;
                let report = crate::backup::prune::prune(
                    &store,
                    &self.config.backup.retention,
                    chrono::Utc::now(),
                    false,
                )
                .await?;
                Ok(JobOutcome {
                    bytes: Some(report.bytes_freed),
                    detail: format!("prune: {}", report.counts()),
                })
            }
        }
    }
}

impl JobRunner for ConfigRunner {
    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<JobOutcome, String>> {
        Box::pin(async move { self.execute(job).await.map_err(|e| crate::error_chain(&e)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, RawConfig, parse, resolve};
    use crate::pg::ident::parse_pattern;

    fn config(toml: &str) -> Config {
        resolve(None, parse(toml).unwrap(), Overrides::default()).unwrap()
    }

    const FULL: &str = r#"
[source]
url = "postgres://bite:hunter2@local/bite"
[mirror]
url = "postgres://cloud:s3cret@mirror.example/bite"
[sync]
tables = ["menu_items", "customers"]
exclude = ["customers"]
jobs = 3
maintenance_work_mem = "64MB"
[backup]
url = "file:///var/backups/bite"
jobs = 4
pg_dump = "/opt/pg/bin/pg_dump"
"#;

    fn job(name: &str, kind: JobKind) -> Job {
        let mut job = Job::new(name, "0 3 * * *", chrono_tz::UTC, kind).unwrap();
        job.file = "schedules/nightly.toml".into();
        job
    }

    #[test]
    fn a_backup_goes_to_its_own_location_or_the_configured_one_with_backup_settings() {
        let config = config(FULL);
        let tables = vec![parse_pattern("orders").unwrap()];
        let own = job(
            "b",
            JobKind::Backup {
                to: Some("s3://bucket/bite".into()),
                tables: tables.clone(),
            },
        );
        let Work::Backup { location, options } = plan(&own, &config, false).unwrap() else {
            panic!("not a backup")
        };
        assert_eq!(location, "s3://bucket/bite");
        assert_eq!(options.tables, tables);
        assert_eq!(options.jobs, 4);
        assert_eq!(options.pg_dump, Some("/opt/pg/bin/pg_dump".into()));
        assert_eq!(options.source.host(), "local");

        let default = job(
            "b",
            JobKind::Backup {
                to: None,
                tables: vec![],
            },
        );
        let Work::Backup { location, options } = plan(&default, &config, false).unwrap() else {
            panic!("not a backup")
        };
        assert_eq!(location, "file:///var/backups/bite");
        assert!(options.tables.is_empty(), "the whole database");
    }

    #[test]
    fn a_scheduled_backup_is_encrypted_like_a_manual_one() {
        let recipient = crate::backup::crypt::Identity::generate().recipient();
        let config = config(&format!("{FULL}encrypt_to = \"{recipient}\"\n"));
        let backup = job(
            "b",
            JobKind::Backup {
                to: None,
                tables: vec![],
            },
        );
        let Work::Backup { options, .. } = plan(&backup, &config, false).unwrap() else {
            panic!("not a backup")
        };
        assert_eq!(options.encrypt_to, Some(recipient));
    }

    #[test]
    fn a_sync_takes_the_sync_settings_and_its_tables_replace_the_configured_ones() {
        let config = config(FULL);
        let configured = job("s", JobKind::Sync { tables: vec![] });
        let Work::Sync(options) = plan(&configured, &config, true).unwrap() else {
            panic!("not a sync")
        };
        assert_eq!(options.tables, config.sync.tables);
        assert_eq!(options.exclude, config.sync.exclude);
        assert_eq!(
            (options.jobs, options.maintenance_work_mem.as_str()),
            (3, "64MB")
        );
        assert!(options.init && !options.dry_run);
        assert_eq!(options.mode, crate::sync::Mode::Full);

        let own = vec![parse_pattern("orders").unwrap()];
        let named = job(
            "s",
            JobKind::Sync {
                tables: own.clone(),
            },
        );
        let Work::Sync(options) = plan(&named, &config, false).unwrap() else {
            panic!("not a sync")
        };
        assert_eq!(options.tables, own);
        assert!(!options.init);
    }

    #[test]
    fn a_verify_checks_latest_on_the_source_server() {
        let config = config(FULL);
        let verify = job(
            "v",
            JobKind::Verify {
                from: None,
                backup: "latest".into(),
            },
        );
        let Work::Verify {
            location,
            backup,
            server,
            jobs,
            work_mem,
        } = plan(&verify, &config, false).unwrap()
        else {
            panic!("not a verify")
        };
        assert_eq!(location, "file:///var/backups/bite");
        assert_eq!(backup, "latest");
        assert_eq!(server.host(), "local");
        assert_eq!((jobs, work_mem.as_str()), (4, "64MB"));
    }

    #[test]
    fn what_is_missing_names_the_file_the_job_and_the_setting_without_secrets() {
        let config = resolve(None, RawConfig::default(), Overrides::default()).unwrap();
        let mut disabled = job("old-sync", JobKind::Sync { tables: vec![] });
        disabled.enabled = false;
        let jobs = [
            job(
                "backup",
                JobKind::Backup {
                    to: None,
                    tables: vec![],
                },
            ),
            job(
                "verify",
                JobKind::Verify {
                    from: Some("file:///b".into()),
                    backup: "latest".into(),
                },
            ),
            job("prune", JobKind::Prune { from: None }),
            disabled,
        ];
        let err = check(&jobs, &config, false).unwrap_err();
        assert_eq!(
            err.problems,
            [
                "schedules/nightly.toml: job \"backup\": no backup location: set to in the job, backup.url in bite-sync.toml or BITE_BACKUP_URL (or enabled = false in the job to run without it)",
                "schedules/nightly.toml: job \"verify\": invalid configuration: no source database: pass --source URL, set BITE_SOURCE_URL, or set source.url in bite-sync.toml",
                "schedules/nightly.toml: job \"prune\": no backup location: set from in the job, backup.url in bite-sync.toml or BITE_BACKUP_URL (or enabled = false in the job to run without it)",
            ],
            "a disabled job is not checked"
        );

        let full = crate::config::resolve(None, parse(FULL).unwrap(), Overrides::default());
        assert!(check(&jobs, &full.unwrap(), false).is_ok());
    }

    #[tokio::test]
    async fn a_prune_applies_the_configured_retention() {
        let dir = tempfile::tempdir().unwrap();
        let runner = ConfigRunner::new(Arc::new(config(FULL)), false, CancellationToken::new());
        let from = format!("file://{}", dir.path().display());
        let outcome = runner
            .run(&job("prune", JobKind::Prune { from: Some(from) }))
            .await
            .unwrap();
        assert_eq!(outcome.bytes, Some(0));
        assert_eq!(
            outcome.detail,
            "prune: 0 backups kept, 0 deleted, 0 incomplete deleted"
        );
    }

    #[tokio::test]
    async fn a_failed_run_carries_its_error_chain_and_no_password() {
        // A closed port: the backup fails connecting, and says where to without the password.
        let config = config(&format!(
            r#"
[source]
url = "postgres://bite:hunter2@127.0.0.1:1/bite?sslmode=disable&connect_timeout=2"
[backup]
url = "file://{}"
"#,
            std::env::temp_dir().display()
        ));
        let runner = ConfigRunner::new(Arc::new(config), false, CancellationToken::new());
        let backup = job(
            "backup",
            JobKind::Backup {
                to: None,
                tables: vec![],
            },
        );
        let err = runner.run(&backup).await.unwrap_err();
        assert!(err.contains("127.0.0.1:1"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
