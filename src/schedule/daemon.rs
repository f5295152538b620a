//! The schedules' side of `bite-sync run`: announce the jobs, find where their history is
//! kept, and run them with the system clock until the daemon stops.
//!
//! The history ([`open_history`]) is the mirror's `bite_sync.job_runs` whenever the mirror is
//! a bite-sync mirror: its bookkeeping is brought up to date (migration 3 adds the table), and
//! a lost connection is made again ([`PgRunLog::reconnecting`]). bite-sync never creates its
//! bookkeeping in a database that has none unless `--init` says so (a mistyped URL must not
//! turn a production database into a "mirror"); without it, and without a mirror at all, the
//! history is kept in memory: runs still happen and are logged, but a run missed while
//! bite-sync was down is not made up at the next start, since nothing remembers the last one.
//! A mirror that does not answer at start is tried again at each run and its
//! `bite_sync.job_runs` used as it then is (a passing outage should not cost the history for
//! as long as the daemon runs; a missed run cannot be made up this time, though).

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::jobs::ConfigRunner;
use super::pg_log::STATEMENT_TIMEOUT;
use super::run::{JobOutcome, JobRunner};
use super::{Job, MemoryRunLog, PgRunLog, RunLog, SystemClock, next_fire, run_schedules};
use crate::alert::freshness::{self, backup_jobs};
use crate::alert::{Alerter, IncidentStore, MemoryIncidents, Observation, PgIncidents};
use crate::bookkeeping::{self, BookkeepingError};
use crate::config::Config;
use crate::error_chain;
use crate::pg::connect::DbUrl;

/// Logs how many jobs were loaded from `dir` and when each runs next.
pub fn announce(jobs: &[Job], dir: &Path, now: DateTime<Utc>) {
    let n = jobs.len();
    tracing::info!(
        jobs = n,
        dir = %dir.display(),
        "{n} scheduled job{} loaded from {}",
        if n == 1 { "" } else { "s" },
        dir.display()
    );
    for job in jobs {
        if !job.enabled {
            tracing::info!(job = %job.name, file = %job.file.display(), "disabled (enabled = false): will not run");
            continue;
        }
        match next_fire(job, now) {
            Some(next) => tracing::info!(
                job = %job.name,
                kind = job.kind.name(),
                cron = job.cron.text(),
                time_zone = %job.time_zone,
                next_run = %next.with_timezone(&job.time_zone).to_rfc3339_opts(SecondsFormat::Secs, true),
                next_run_utc = %next.to_rfc3339_opts(SecondsFormat::Secs, true),
                "next run"
            ),
            None => {
                tracing::warn!(job = %job.name, cron = job.cron.text(), "the schedule has no fire time left: the job will not run")
            }
        }
    }
}

/// Where the run history is kept (see the module docs). Never fails: without a usable
/// mirror the history is kept in memory, with a log line saying why and what to do.
pub async fn open_history(mirror: Option<&DbUrl>, init: bool) -> Arc<dyn RunLog> {
    open_history_where(mirror, init).await.0
}

/// [`open_history`], and whether the mirror's bookkeeping is usable (alert state goes there too).
async fn open_history_where(mirror: Option<&DbUrl>, init: bool) -> (Arc<dyn RunLog>, bool) {
    let Some(url) = mirror else {
        tracing::info!(
            "no mirror configured: the run history is kept in memory and lost at exit, so a run missed while bite-sync is down is not made up; set mirror.url (or --mirror) to keep it in the mirror's bite_sync.job_runs"
        );
        return (Arc::new(MemoryRunLog::new()), false);
    };
    let opened = tokio::time::timeout(STATEMENT_TIMEOUT, async {
        let mut client = url.connect().await.map_err(|e| error_chain(&e))?;
        let prepared = prepare(&mut client, init).await;
        Ok::<_, String>((client, prepared))
    })
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "the mirror did not answer within {} s",
            STATEMENT_TIMEOUT.as_secs()
        ))
    });
    match opened {
        Ok((client, Ok(true))) => {
            tracing::info!(mirror = %url.target(), "run history in the mirror's bite_sync.job_runs");
            (
                Arc::new(PgRunLog::reconnecting(url.clone(), Some(client))),
                true,
            )
        }
        Ok((_, Ok(false))) => {
            tracing::warn!(
                mirror = %url.target(),
                "the mirror has no bite_sync bookkeeping, so the run history is kept in memory and lost at exit (a run missed while bite-sync is down is not made up): to keep it in the mirror's bite_sync.job_runs, start once with --init (or run `bite-sync sync --init`)"
            );
            (Arc::new(MemoryRunLog::new()), false)
        }
        Ok((_, Err(e))) => {
            tracing::warn!(
                error = %error_chain(&e),
                "could not set up the run history on the mirror: it is kept in memory and lost at exit"
            );
            (Arc::new(MemoryRunLog::new()), false)
        }
        Err(why) => {
            // Likely a passing outage: keep trying on each run rather than give up on the
            // history for as long as the daemon runs.
            tracing::warn!(
                error = %why,
                "the mirror is unreachable: runs are recorded in its bite_sync.job_runs once it answers, and a run missed while bite-sync was down is not made up this time"
            );
            (Arc::new(PgRunLog::reconnecting(url.clone(), None)), true)
        }
    }
}

/// Brings the bookkeeping up to date if the mirror has it or `init` allows creating it;
/// `false` when it has none and may not get it.
async fn prepare(client: &mut Client, init: bool) -> Result<bool, BookkeepingError> {
    if !init && !bookkeeping::is_initialized(client).await? {
        return Ok(false);
    }
    bookkeeping::migrate(client).await?;
    Ok(true)
}

/// Starts the scheduler in a task of its own, after announcing the jobs: `None` when there
/// are none. The task opens the history, runs the jobs until `cancel`, and ends after the
/// runs in progress (its owner awaits it). `init` is `bite-sync run --init`.
pub fn start(
    jobs: Vec<Job>,
    dir: &Path,
    config: Arc<Config>,
    init: bool,
    cancel: CancellationToken,
) -> Option<JoinHandle<()>> {
    if jobs.is_empty() {
        tracing::debug!(dir = %dir.display(), "no scheduled jobs");
        return None;
    }
    announce(&jobs, dir, Utc::now());
    let task = async move {
        let (log, on_mirror) = tokio::select! {
            opened = open_history_where(config.mirror.as_ref(), init) => opened,
            () = cancel.cancelled() => return,
        };
        let mut runner: Arc<dyn JobRunner> =
            Arc::new(ConfigRunner::new(Arc::clone(&config), init, cancel.clone()));
        let mut alerts = None;
        if let Some(webhook) = config.alert_webhook.clone() {
            let store: Arc<dyn IncidentStore> = match (&config.mirror, on_mirror) {
                (Some(url), true) => Arc::new(PgIncidents::new(url.clone())),
                _ => Arc::new(MemoryIncidents::default()),
            };
            tracing::info!(webhook = %webhook, "alerts go to the webhook");
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let alerter = Alerter::new(store, webhook);
            alerts = Some(tokio::spawn(
                alert_task(
                    alerter,
                    rx,
                    jobs.clone(),
                    Arc::clone(&config),
                    cancel.clone(),
                )
                .instrument(tracing::info_span!("alerts")),
            ));
            runner = Arc::new(AlertingRunner { inner: runner, tx });
        }
        run_schedules(jobs, runner, log, Arc::new(SystemClock), cancel).await;
        if let Some(alerts) = alerts
            && let Err(e) = alerts.await
        {
            tracing::error!(error = %e, "the alerts' task failed");
        }
        tracing::info!("schedules stopped");
    };
    Some(tokio::spawn(
        task.instrument(tracing::info_span!("schedules")),
    ))
}

/// How often backup freshness is checked besides after each backup job's run.
pub const FRESHNESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// What the alert task is asked to do.
enum AlertWork {
    /// A run finished.
    Run(Observation),
    /// A backup job ran: check freshness now.
    CheckBackups,
}

/// Passes each finished run to the alert task. Sending never waits on the webhook: alerting
/// happens in its own task so that a slow webhook does not delay the run's record.
struct AlertingRunner {
    inner: Arc<dyn JobRunner>,
    tx: tokio::sync::mpsc::Sender<AlertWork>,
}

impl JobRunner for AlertingRunner {
    fn run<'a>(
        &'a self,
        job: &'a Job,
    ) -> futures_util::future::BoxFuture<'a, Result<JobOutcome, String>> {
        Box::pin(async move {
            let outcome = self.inner.run(job).await;
            let mut work = vec![AlertWork::Run(Observation::run(&job.name, &outcome))];
            if matches!(job.kind, super::JobKind::Backup { .. }) {
                work.push(AlertWork::CheckBackups);
            }
            for w in work {
                if self.tx.try_send(w).is_err() {
                    tracing::warn!("the alert queue is full or closed: this run is not alerted on");
                }
            }
            outcome
        })
    }
}

/// Applies observations and checks backup freshness every [`FRESHNESS_INTERVAL`] until
/// `cancel`.
async fn alert_task(
    alerter: Alerter,
    mut rx: tokio::sync::mpsc::Receiver<AlertWork>,
    jobs: Vec<Job>,
    config: Arc<Config>,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(FRESHNESS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let work = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            w = rx.recv() => match w {
                Some(w) => w,
                None => return,
            },
            _ = ticker.tick() => AlertWork::CheckBackups,
        };
        match work {
            AlertWork::Run(o) => alerter.observe(&o, Utc::now()).await,
            AlertWork::CheckBackups => {
                for (job, url) in backup_jobs(&jobs, &config) {
                    let now = Utc::now();
                    let check = freshness::check(job, &url, &config, now).await;
                    match Observation::freshness(&check) {
                        Some(o) => alerter.observe(&o, now).await,
                        None => tracing::warn!(
                            job = %job.name,
                            problem = check.problem.as_deref().unwrap_or("?"),
                            "cannot check the backups' freshness"
                        ),
                    }
                }
            }
        }
    }
}
