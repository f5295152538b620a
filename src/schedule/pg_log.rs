//! The run history in the mirror's `bite_sync.job_runs` (migration `0003_schedules`).
//!
//! Timestamps cross the wire as RFC 3339 text in UTC with microseconds (PostgreSQL's own
//! precision), so they round-trip exactly whatever the session's `TimeZone` or `DateStyle`
//! (tokio-postgres is built here without its chrono support).

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::future::BoxFuture;
use tokio_postgres::{Client, Row};

use super::log::{RunId, RunLog, RunLogError, RunRecord, RunState};
use super::run::JobOutcome;

/// A [`RunLog`] over a connection to the mirror, whose `bite_sync` schema must be migrated
/// ([`crate::bookkeeping::migrate`]).
pub struct PgRunLog {
    client: Client,
}

impl PgRunLog {
    /// Uses `client` for every record.
    pub fn new(client: Client) -> PgRunLog {
        PgRunLog { client }
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
                .client
                .query_opt(&sql, &[&job])
                .await
                .map_err(query_err("failed to read the job's last run"))?;
            row.as_ref().map(record).transpose()
        })
    }

    fn record_start<'a>(
        &'a self,
        job: &'a str,
        started: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<RunId, RunLogError>> {
        Box::pin(async move {
            let row = self
                .client
                .query_one(
                    "INSERT INTO bite_sync.job_runs (job, started_at, outcome) \
                     VALUES ($1, $2::text::timestamptz, 'running') RETURNING id",
                    &[&job, &wire(started)],
                )
                .await
                .map_err(query_err("failed to record the start of a run"))?;
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
            let updated = self
                .client
                .execute(
                    "UPDATE bite_sync.job_runs \
                     SET finished_at = $2::text::timestamptz, outcome = $3, bytes = $4, detail = $5 \
                     WHERE id = $1",
                    &[&id.0, &wire(finished), &state.as_str(), &bytes, &detail],
                )
                .await
                .map_err(query_err("failed to record the end of a run"))?;
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
