//! Schedules: jobs (backup, sync, verify, prune) that `bite-sync run` starts at cron times.
//!
//! Jobs are read from `schedules/*.toml` ([`load`]), each with a standard 5-field crontab
//! expression read in the job's IANA time zone ([`cron`]: syntax, day-of-month/day-of-week
//! rule, what happens at DST changes). The decisions are plain functions: [`next_fire`] and
//! [`missed`]. [`run::run_schedules`] is the loop around them, with the clock ([`clock`]), the
//! run history ([`log`], [`pg_log`]) and the work itself ([`run::JobRunner`]) injected, so it
//! is tested in paused time without a database. [`list`] is `bite-sync schedules`.
//! [`jobs`] is the work behind each kind of job (a backup, a check, a sync, a prune) with the
//! configuration's defaults, and [`daemon`] starts it all inside `bite-sync run`, with the
//! history on the mirror when there is one.
//!
//! Invariants of the loop: a job never runs twice at once (a fire time that comes while its
//! previous run is still going is skipped, with a warning); a disabled job never runs; a
//! failed run is recorded and the schedule goes on; a job whose last recorded run started
//! before a fire time that has passed runs once, straight away, when the loop starts.

pub mod clock;
pub mod cron;
pub mod daemon;
pub mod jobs;
pub mod list;
pub mod load;
pub mod log;
pub mod pg_log;
pub mod run;

use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::pg::ident::TablePattern;

pub use clock::{Clock, SystemClock, TokioClock};
pub use cron::{CronError, CronSchedule};
pub use load::{DEFAULT_DIR, ScheduleError, load_dir};
pub use log::{MemoryRunLog, RunId, RunLog, RunLogError, RunRecord, RunState};
pub use pg_log::PgRunLog;
pub use run::{JobOutcome, JobRunner, run_schedules};

/// One scheduled job.
#[derive(Debug, Clone)]
pub struct Job {
    /// Unique across all schedule files: `[a-z0-9_-]+`.
    pub name: String,
    /// The file it came from, for messages.
    pub file: PathBuf,
    /// When it fires (the expression as written is [`CronSchedule::text`]).
    pub cron: CronSchedule,
    /// The time zone the expression is read in.
    pub time_zone: Tz,
    /// What it does.
    pub kind: JobKind,
    /// Disabled jobs are listed but never run.
    pub enabled: bool,
}

/// What a job does, with its arguments. Unset arguments mean the configuration's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// Take a backup.
    Backup {
        /// Where to (`file:///dir` or `s3://bucket/prefix`); default `[backup] url`.
        to: Option<String>,
        /// Which tables; empty: the configured ones.
        tables: Vec<TablePattern>,
    },
    /// Sync tables to the mirror (`bite-sync sync`).
    Sync {
        /// Which tables; empty: the configured ones.
        tables: Vec<TablePattern>,
    },
    /// Check a backup by restoring it.
    Verify {
        /// Where the backups are; default `[backup] url`.
        from: Option<String>,
        /// Which backup: `latest` or a backup's name.
        backup: String,
    },
    /// Delete backups the retention policy no longer keeps.
    Prune {
        /// Where the backups are; default `[backup] url`.
        from: Option<String>,
    },
}

impl JobKind {
    /// `backup`, `sync`, `verify` or `prune`, as written in the files.
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Backup { .. } => "backup",
            JobKind::Sync { .. } => "sync",
            JobKind::Verify { .. } => "verify",
            JobKind::Prune { .. } => "prune",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Job {
    /// A job built in code (tests, callers that do not read files): enabled, no file.
    pub fn new(name: &str, cron: &str, time_zone: Tz, kind: JobKind) -> Result<Job, CronError> {
        Ok(Job {
            name: name.to_string(),
            file: PathBuf::new(),
            cron: CronSchedule::parse(cron)?,
            time_zone,
            kind,
            enabled: true,
        })
    }
}

/// The job's first fire time strictly after `after` (disabled or not). `None` only for a
/// schedule with no fire time left before the year 5000.
pub fn next_fire(job: &Job, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    job.cron.next_after(job.time_zone, after)
}

/// Whether a fire time lies in `(last_run_start, now]`: the job should have started since its
/// last recorded run, and did not (the daemon was down, or the machine asleep).
///
/// With no record at all the answer is `false`: a new job, or a new history database, waits for
/// its first fire time instead of starting the moment the daemon does.
pub fn missed(job: &Job, last_run_start: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    last_run_start
        .and_then(|last| next_fire(job, last))
        .is_some_and(|fire| fire <= now)
}

#[cfg(test)]
mod tests;
