//! The run history in the mirror's `bite_sync.job_runs` (migration `0003_schedules`).
//!
//! Timestamps cross the wire as RFC 3339 text in UTC with microseconds (PostgreSQL's own
//! precision), so they round-trip exactly whatever the session's `TimeZone` or `DateStyle`
//! (tokio-postgres is built here without its chrono support).
//!
//! The daemon keeps one connection for months, and the mirror restarts, fails over or loses
//! its link meanwhile. A log made with [`PgRunLog::reconnecting`] therefore connects again
//! when its connection is gone: before a statement when the connection is known closed, and
//! once more after a statement that failed because the connection was lost. Every statement is
//! safe to send twice: the reads and the `UPDATE` by id are idempotent, and an `INSERT` whose
//! first copy did commit leaves an extra `running` row that [`RunLog::last_run`] never picks
//! (the retried row has the same start and a higher id). Each statement, retry and connect
//! included, is bounded by [`STATEMENT_TIMEOUT`], so a mirror that stops answering delays a
//! job's start by that much at most: the scheduler runs the job without its record rather
//! than not at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::future::BoxFuture;
use tokio_postgres::{Client, Row};

use super::log::{RunId, RunLog, RunLogError, RunRecord, RunState};
use super::run::JobOutcome;
use crate::pg::connect::DbUrl;

/// How long one history statement (with its connect, if one is needed) may take.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`RunLog`] over a connection to the mirror, whose `bite_sync` schema must be migrated
/// ([`crate::bookkeeping::migrate`]).
pub struct PgRunLog {
    conn: Conn,
}

/// Where a [`PgRunLog`]'s statements go.
enum Conn {
    /// A caller's client, for good.
    Fixed(Arc<Client>),
    /// A connection to `url`, made again when lost.
    Reconnecting {
        url: Box<DbUrl>,
        /// `None` before the first connect, when the log started without one.
        client: Mutex<Option<Arc<Client>>>,
    },
}

impl PgRunLog {
    /// Uses `client` for every record, and never connects again.
    pub fn new(client: Client) -> PgRunLog {
        PgRunLog {
            conn: Conn::Fixed(Arc::new(client)),
        }
    }

    /// Uses `client` (or, if `None`, a connection made on first use) and connects to `url`
    /// again whenever the connection is lost (see the module docs).
    pub fn reconnecting(url: DbUrl, client: Option<Client>) -> PgRunLog {
        PgRunLog {
            conn: Conn::Reconnecting {
                url: Box::new(url),
                client: Mutex::new(client.map(Arc::new)),
            },
        }
    }

    /// The connection to use: the current one unless it is known to be closed (or `fresh` is
    /// asked for), else a new one, when this log may reconnect.
    async fn client(&self, fresh: bool) -> Result<Arc<Client>, RunLogError> {
        let (url, slot) = match &self.conn {
            Conn::Fixed(client) => return Ok(Arc::clone(client)),
            Conn::Reconnecting { url, client } => (url, client),
        };
        // Only ever held to clone or replace the handle, so a poisoned lock holds a whole value.
        let lock = || slot.lock().unwrap_or_else(|p| p.into_inner());
        let current = lock().clone();
        if let Some(client) = current
            && !fresh
            && !client.is_closed()
        {
            return Ok(client);
        }
        tracing::debug!(mirror = %url.target(), "connecting to the mirror for the run history");
        let client = Arc::new(
            url.connect()
                .await
                .map_err(|e| RunLogError::Connect(Box::new(e)))?,
        );
        *lock() = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Runs `statement` on the connection, connecting again and retrying once if it failed
    /// because the connection was lost; all within [`STATEMENT_TIMEOUT`], after which the
    /// connection is dropped (it may hang on a dead link) and the next statement makes another.
    async fn with_client<T, F, Fut>(&self, statement: F) -> Result<T, RunLogError>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, RunLogError>>,
    {
        let reconnecting = matches!(self.conn, Conn::Reconnecting { .. });
        let attempts = async {
            match statement(self.client(false).await?).await {
                Err(e) if reconnecting && e.is_connection_lost() => {
                    tracing::debug!(error = %crate::error_chain(&e), "the run history's connection was lost; connecting again");
                    statement(self.client(true).await?).await
                }
                result => result,
            }
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, attempts).await {
            Ok(result) => result,
            Err(_) => {
                if let Conn::Reconnecting { client, .. } = &self.conn {
                    *client.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                Err(RunLogError::TimedOut(STATEMENT_TIMEOUT))
            }
        }
    }
}

/// `timestamptz` as UTC RFC 3339 text with microseconds.
fn ts_text(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// The columns [`record`] reads.
fn columns() -> String {
    format!(
        "id, job, {}, {}, outcome, bytes, detail",
        ts_text("started_at"),
        ts_text("finished_at")
    )
}

fn wire(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn record(row: &Row) -> Result<RunRecord, RunLogError> {
    let id: i64 = row.get(0);
    let bad = |problem: String| RunLogError::BadRow { id, problem };
    let time = |text: &str| {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.to_utc())
            .map_err(|e| bad(format!("cannot read the time {text:?}: {e}")))
    };
    let outcome: String = row.get(4);
    let bytes: Option<i64> = row.get(5);
    Ok(RunRecord {
        id: RunId(id),
        job: row.get(1),
        started_at: time(row.get(2))?,
        finished_at: row.get::<_, Option<&str>>(3).map(time).transpose()?,
        state: RunState::parse(&outcome)
            .ok_or_else(|| bad(format!("unknown outcome {outcome:?}")))?,
        bytes: bytes.map(|b| b.max(0) as u64),
        detail: row.get(6),
    })
}

fn query_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> RunLogError {
    move |source| RunLogError::Query { context, source }
}

impl RunLog for PgRunLog {
    fn last_run<'a>(
        &'a self,
        job: &'a str,
    ) -> BoxFuture<'a, Result<Option<RunRecord>, RunLogError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {} FROM bite_sync.job_runs WHERE job = $1 \
                 ORDER BY started_at DESC, id DESC LIMIT 1",
                columns()
            );
            let row = self
                .with_client(|client| {
                    let sql = &sql;
                    async move {
                        client
                            .query_opt(sql, &[&job])
                            .await
                            .map_err(query_err("failed to read the job's last run"))
                    }
                })
                .await?;
            row.as_ref().map(record).transpose()
        })
    }

    fn record_start<'a>(
        &'a self,
        job: &'a str,
        started: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<RunId, RunLogError>> {
        Box::pin(async move {
            let started = wire(started);
            let row = self
                .with_client(|client| {
                    let started = &started;
                    async move {
                        client
                            .query_one(
                                "INSERT INTO bite_sync.job_runs (job, started_at, outcome) \
                                 VALUES ($1, $2::text::timestamptz, 'running') RETURNING id",
                                &[&job, started],
                            )
                            .await
                            .map_err(query_err("failed to record the start of a run"))
                    }
                })
                .await?;
            Ok(RunId(row.get(0)))
        })
    }

    fn record_end(
        &self,
        id: RunId,
        finished: DateTime<Utc>,
        outcome: Result<JobOutcome, String>,
    ) -> BoxFuture<'_, Result<(), RunLogError>> {
        Box::pin(async move {
            let (state, bytes, detail) = match outcome {
                Ok(o) => (
                    RunState::Ok,
                    o.bytes.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
                    (!o.detail.is_empty()).then_some(o.detail),
                ),
                Err(e) => (RunState::Failed, None, Some(e)),
            };
            let finished = wire(finished);
            let updated = self
                .with_client(|client| {
                    let (finished, bytes, detail) = (&finished, &bytes, &detail);
                    async move {
                        client
                            .execute(
                                "UPDATE bite_sync.job_runs \
                                 SET finished_at = $2::text::timestamptz, outcome = $3, bytes = $4, detail = $5 \
                                 WHERE id = $1",
                                &[&id.0, finished, &state.as_str(), bytes, detail],
                            )
                            .await
                            .map_err(query_err("failed to record the end of a run"))
                    }
                })
                .await?;
            if updated == 0 {
                return Err(RunLogError::UnknownRun(id));
            }
            Ok(())
        })
    }
}

/// Every job's most recently started run, or `None` when the mirror has no
/// `bite_sync.job_runs` (not migrated to version 3 yet: no job has run against it).
pub async fn last_runs(client: &Client) -> Result<Option<HashMap<String, RunRecord>>, RunLogError> {
    let exists: bool = client
        .query_one(
            "SELECT pg_catalog.to_regclass('bite_sync.job_runs') IS NOT NULL",
            &[],
        )
        .await
        .map_err(query_err("failed to look for bite_sync.job_runs"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let sql = format!(
        "SELECT DISTINCT ON (job) {} FROM bite_sync.job_runs \
         ORDER BY job, started_at DESC, id DESC",
        columns()
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(query_err("failed to read the jobs' last runs"))?;
    let mut last = HashMap::with_capacity(rows.len());
    for row in &rows {
        let r = record(row)?;
        last.insert(r.job.clone(), r);
    }
    Ok(Some(last))
}
