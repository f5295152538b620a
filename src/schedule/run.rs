//! The scheduler loop: one task per enabled job, each sleeping until its next fire time and
//! running the job through a [`JobRunner`], with every run recorded in a [`RunLog`].
//!
//! Each job's task:
//! 1. reads the job's last run; if a fire time passed since it started ([`super::missed`]),
//!    runs the job once, straight away (however many fire times were missed);
//! 2. sleeps until the next fire time after the last run's start or the previous fire time,
//!    runs the job, and repeats.
//!
//! A job's runs are awaited in its own task, so a job never runs twice at once: fire times
//! that pass while a run is still going are skipped (logged as a warning, not recorded; the
//! next run is at the first fire time after the run ends). Different jobs run concurrently.
//! A failed run (an `Err` or a panic of the runner) is recorded with its message and the
//! schedule goes on. If the history cannot be written the job still runs (a backup matters
//! more than its record) and the failure is logged.
//!
//! Cancellation stops the sleeping tasks at once. A run in progress is not interrupted: it is
//! awaited, recorded, and the task stops after it. A runner that should stop early (a backup
//! that can resume later) watches the same cancellation token itself.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::clock::Clock;
use super::log::RunLog;
use super::{Job, missed, next_fire};
use crate::error_chain;

/// What a successful run reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobOutcome {
    /// Bytes written or read, if the job measures them.
    pub bytes: Option<u64>,
    /// A one-line summary (`"backup 20260308T060000Z, 12 tables"`).
    pub detail: String,
}

/// Does the work of a job. Object-safe (boxed futures) so the scheduler holds an
/// `Arc<dyn JobRunner>`.
pub trait JobRunner: Send + Sync {
    /// Runs `job` once; `Err` carries the error chain as one line.
    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<JobOutcome, String>>;
}

/// Fire times counted in a skipped-fires warning, at most (a runaway count says enough).
const MAX_SKIPPED_COUNTED: usize = 1_000;

/// Runs every enabled job on its schedule until `cancel` fires, then waits for each job's task
/// to stop (after its run in progress, if any). Returns only once cancelled, even when no job
/// is enabled, so a caller can treat it like any other long-running task. Job names must be
/// unique ([`super::load_dir`] makes sure): the history is kept by name.
pub async fn run_schedules(
    jobs: Vec<Job>,
    runner: Arc<dyn JobRunner>,
    log: Arc<dyn RunLog>,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    for job in jobs {
        if !job.enabled {
            tracing::info!(job = %job.name, "schedule disabled: the job will not run");
            continue;
        }
        let span = tracing::info_span!("schedule", job = %job.name);
        let task = JobTask {
            job,
            runner: Arc::clone(&runner),
            log: Arc::clone(&log),
            clock: Arc::clone(&clock),
        };
        tasks.spawn(task.run(cancel.clone()).instrument(span));
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result
            && e.is_panic()
        {
            tracing::error!(error = %e, "a schedule's task panicked; that job will not run again until restart");
        }
    }
    cancel.cancelled().await;
}

/// One job's loop and what it needs.
struct JobTask {
    job: Job,
    runner: Arc<dyn JobRunner>,
    log: Arc<dyn RunLog>,
    clock: Arc<dyn Clock>,
}

impl JobTask {
    async fn run(self, cancel: CancellationToken) {
        let job = &self.job;
        let now = self.clock.now();
        let last = match self.log.last_run(&job.name).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not read the job's last run: a run missed while bite-sync was down will not be made up");
                None
            }
        };
        // `after`: fire times up to here are done or skipped.
        let mut after = now;
        if let Some(last) = last
            && missed(job, Some(last.started_at), now)
        {
            let due = next_fire(job, last.started_at).unwrap_or(now);
            tracing::info!(last_run = %last.started_at, missed = %due, "a scheduled run was missed while bite-sync was not running: running it now, once");
            let end = self.run_once(due).await;
            after = self.skip_past(now, end);
        }
        loop {
            let Some(fire) = next_fire(job, after) else {
                tracing::warn!("the schedule has no fire time left: the job will not run again");
                return;
            };
            tracing::debug!(next = %fire, "sleeping until the next run");
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = self.clock.sleep_until(fire) => {}
            }
            let woke = self.clock.now();
            if woke - fire > chrono::TimeDelta::minutes(1) {
                tracing::warn!(scheduled = %fire, woke = %woke, "running late (the machine was asleep or its clock jumped): running once for every fire time until now");
            }
            let end = self.run_once(fire).await;
            after = self.skip_past(woke.max(fire), end);
        }
    }

    /// Runs the job once for fire time `fire`, recording it; returns when it ended.
    async fn run_once(&self, fire: DateTime<Utc>) -> DateTime<Utc> {
        let job = &self.job;
        let started = self.clock.now();
        let id = match self.log.record_start(&job.name, started).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not record the start of the run; running it anyway");
                None
            }
        };
        tracing::info!(kind = job.kind.name(), scheduled = %fire, "job started");
        let outcome = AssertUnwindSafe(self.runner.run(job))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(format!("the job panicked: {}", panic_message(&*panic))));
        let finished = self.clock.now();
        let took = super::list::human_duration(finished - started);
        match &outcome {
            Ok(o) => {
                tracing::info!(bytes = o.bytes, detail = %o.detail, took = %took, "job finished")
            }
            Err(e) => tracing::error!(error = %e, took = %took, "job failed; its schedule goes on"),
        }
        if let Some(id) = id
            && let Err(e) = self.log.record_end(id, finished, outcome).await
        {
            tracing::warn!(error = %error_chain(&e), run = %id, "could not record the end of the run");
        }
        finished
    }

    /// Fire times in `(started, end]` passed while a run that started at `started` was going:
    /// they are skipped, with a warning. Returns where the next fire time is looked for from.
    fn skip_past(&self, started: DateTime<Utc>, end: DateTime<Utc>) -> DateTime<Utc> {
        let mut skipped = 0;
        let mut first = None;
        let mut at = started;
        while let Some(next) = next_fire(&self.job, at)
            && next <= end
            && skipped < MAX_SKIPPED_COUNTED
        {
            skipped += 1;
            first.get_or_insert(next);
            at = next;
        }
        if let Some(first) = first {
            tracing::warn!(
                skipped,
                first = %first,
                run_started = %started,
                run_ended = %end,
                "the job was still running at its next fire time: skipped (a job never runs twice at once)"
            );
        }
        end.max(started)
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

#[cfg(test)]
mod tests;
