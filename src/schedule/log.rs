//! The run history: one record per run of a job, written when it starts and completed when it
//! ends. The scheduler reads a job's latest record at start-up to decide whether a fire time
//! was missed ([`super::missed`]); `bite-sync schedules` shows it.
//!
//! [`MemoryRunLog`] keeps the history in memory (tests, running without a mirror);
//! [`super::PgRunLog`] keeps it in the mirror's `bite_sync.job_runs`.

use std::fmt;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

use super::run::JobOutcome;

/// Identifies one run in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Started and not (yet) finished. A run whose process died stays `running`.
    Running,
    /// Finished with success.
    Ok,
    /// Finished with an error (in the record's detail).
    Failed,
}

impl RunState {
    /// `running`, `ok` or `failed`, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Ok => "ok",
            RunState::Failed => "failed",
        }
    }

    /// The stored text back; `None` for anything else.
    pub fn parse(text: &str) -> Option<RunState> {
        match text {
            "running" => Some(RunState::Running),
            "ok" => Some(RunState::Ok),
            "failed" => Some(RunState::Failed),
            _ => None,
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    /// Its id.
    pub id: RunId,
    /// The job's name.
    pub job: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended, if it has.
    pub finished_at: Option<DateTime<Utc>>,
    /// How it ended.
    pub state: RunState,
    /// Bytes written or read, when the job reports them.
    pub bytes: Option<u64>,
    /// The job's summary, or the error of a failed run.
    pub detail: Option<String>,
}

impl RunRecord {
    /// Applies a finished run's outcome.
    pub fn finish(&mut self, finished: DateTime<Utc>, outcome: Result<JobOutcome, String>) {
        self.finished_at = Some(finished);
        match outcome {
            Ok(o) => {
                self.state = RunState::Ok;
                self.bytes = o.bytes;
                self.detail = (!o.detail.is_empty()).then_some(o.detail);
            }
            Err(e) => {
                self.state = RunState::Failed;
                self.bytes = None;
                self.detail = Some(e);
            }
        }
    }
}

/// Reading or writing the run history failed.
#[derive(Debug, thiserror::Error)]
pub enum RunLogError {
    /// A query on the mirror failed.
    #[error("{context}")]
    Query {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A stored value could not be read back.
    #[error("bite_sync.job_runs row {id}: {problem}")]
    BadRow {
        /// The row.
        id: i64,
        /// What is wrong with it.
        problem: String,
    },
    /// `record_end` for a run that was never started (or whose row was deleted).
    #[error("no run {0} in the history")]
    UnknownRun(RunId),
    /// The mirror could not be reached to (re)open the history's connection.
    #[error("failed to connect to the mirror for the run history")]
    Connect(#[source] Box<crate::pg::connect::ConnectError>),
    /// The mirror did not answer in time.
    #[error("the mirror did not answer within {} s", .0.as_secs())]
    TimedOut(std::time::Duration),
}

impl RunLogError {
    /// Whether the connection, rather than the statement, failed: closed, reset, the server
    /// shutting down or not answering. Worth connecting again and retrying.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            RunLogError::Query { source, .. } => {
                source.is_closed()
                    || source.as_db_error().is_none_or(|db| {
                        // Class 08: connection exception; 57P01-57P03: the server shutting
                        // down or restarting (57014, a cancelled statement, is not one).
                        let code = db.code().code();
                        code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
                    })
            }
            RunLogError::TimedOut(_) => true,
            RunLogError::Connect(_) | RunLogError::BadRow { .. } | RunLogError::UnknownRun(_) => {
                false
            }
        }
    }
}

/// Where runs are recorded. Object-safe (boxed futures) so the scheduler holds an
/// `Arc<dyn RunLog>`.
pub trait RunLog: Send + Sync {
    /// The job's most recently started run.
    fn last_run<'a>(
        &'a self,
        job: &'a str,
    ) -> BoxFuture<'a, Result<Option<RunRecord>, RunLogError>>;

    /// Records that a run started (state `running`).
    fn record_start<'a>(
        &'a self,
        job: &'a str,
        started: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<RunId, RunLogError>>;

    /// Records how a run ended.
    fn record_end(
        &self,
        id: RunId,
        finished: DateTime<Utc>,
        outcome: Result<JobOutcome, String>,
    ) -> BoxFuture<'_, Result<(), RunLogError>>;
}

/// The history in memory, lost at exit.
#[derive(Debug, Default)]
pub struct MemoryRunLog {
    runs: Mutex<Vec<RunRecord>>,
}

impl MemoryRunLog {
    /// An empty history.
    pub fn new() -> MemoryRunLog {
        MemoryRunLog::default()
    }

    /// A history that already holds `runs` (a test's "last time bite-sync ran").
    pub fn with_runs(runs: Vec<RunRecord>) -> MemoryRunLog {
        MemoryRunLog {
            runs: Mutex::new(runs),
        }
    }

    /// Every record, in the order they were started.
    pub fn runs(&self) -> Vec<RunRecord> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RunRecord>> {
        // A panic while holding the lock cannot leave a half-written record behind (each
        // change is one push or one assignment), so a poisoned lock is still good.
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RunLog for MemoryRunLog {
    fn last_run<'a>(
        &'a self,
        job: &'a str,
    ) -> BoxFuture<'a, Result<Option<RunRecord>, RunLogError>> {
        let last = self
            .lock()
            .iter()
            .filter(|r| r.job == job)
            .max_by_key(|r| (r.started_at, r.id))
            .cloned();
        Box::pin(async move { Ok(last) })
    }

    fn record_start<'a>(
        &'a self,
        job: &'a str,
        started: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<RunId, RunLogError>> {
        let mut runs = self.lock();
        let id = RunId(runs.iter().map(|r| r.id.0).max().unwrap_or(0) + 1);
        runs.push(RunRecord {
            id,
            job: job.to_string(),
            started_at: started,
            finished_at: None,
            state: RunState::Running,
            bytes: None,
            detail: None,
        });
        Box::pin(async move { Ok(id) })
    }

    fn record_end(
        &self,
        id: RunId,
        finished: DateTime<Utc>,
        outcome: Result<JobOutcome, String>,
    ) -> BoxFuture<'_, Result<(), RunLogError>> {
        let result = match self.lock().iter_mut().find(|r| r.id == id) {
            Some(record) => {
                record.finish(finished, outcome);
                Ok(())
            }
            None => Err(RunLogError::UnknownRun(id)),
        };
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test]
    async fn memory_log_keeps_the_latest_run_per_job() {
        let log = MemoryRunLog::new();
        let t = |h| Utc.with_ymd_and_hms(2026, 3, 1, h, 0, 0).unwrap();
        let a1 = log.record_start("a", t(1)).await.unwrap();
        let b1 = log.record_start("b", t(2)).await.unwrap();
        let a2 = log.record_start("a", t(3)).await.unwrap();
        log.record_end(
            a1,
            t(4),
            Ok(JobOutcome {
                bytes: Some(10),
                detail: "done".into(),
            }),
        )
        .await
        .unwrap();
        log.record_end(a2, t(5), Err("disk full".into()))
            .await
            .unwrap();
        let last = log.last_run("a").await.unwrap().unwrap();
        assert_eq!((last.id, last.state), (a2, RunState::Failed));
        assert_eq!(last.detail.as_deref(), Some("disk full"));
        let b = log.last_run("b").await.unwrap().unwrap();
        assert_eq!(
            (b.id, b.state, b.finished_at),
            (b1, RunState::Running, None)
        );
        assert!(log.last_run("c").await.unwrap().is_none());
        assert!(matches!(
            log.record_end(RunId(99), t(6), Err("x".into())).await,
            Err(RunLogError::UnknownRun(RunId(99)))
        ));
        let first = &log.runs()[0];
        assert_eq!(
            (first.state, first.bytes, first.detail.as_deref()),
            (RunState::Ok, Some(10), Some("done"))
        );
    }
}
