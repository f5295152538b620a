//! Backup freshness: whether a backup job's newest good backup is older than twice the
//! job's period. The period is the time between the schedule's next two fire times after now
//! (for `0 */6 * * *`, six hours), so a job with an irregular schedule is judged by its
//! current gap. The judgement ([`judge`]) is pure; [`check`] lists the store around it.

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

use crate::backup::manifest::id_time;
use crate::backup::restore;
use crate::backup::store::Store;
use crate::config::Config;
use crate::schedule::{Job, JobKind, next_fire};

/// The time between the job's next two fire times after `now`; `None` when it has none left.
pub fn period(job: &Job, now: DateTime<Utc>) -> Option<TimeDelta> {
    let first = next_fire(job, now)?;
    let second = next_fire(job, first)?;
    Some(second - first)
}

/// Whether a backup made at `newest` (none: no good backup at all) is too old at `now` for a
/// job that runs every `period`: older than twice the period.
pub fn is_stale(newest: Option<DateTime<Utc>>, period: TimeDelta, now: DateTime<Utc>) -> bool {
    newest.is_none_or(|t| now - t > period * 2)
}

/// One backup job's freshness, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupFreshness {
    /// The backup job.
    pub job: String,
    /// Where its backups go (credentials never shown).
    pub store: String,
    /// The newest good backup's id.
    pub newest: Option<String>,
    /// Its age in seconds.
    pub age_seconds: Option<i64>,
    /// The job's period in seconds.
    pub period_seconds: i64,
    /// Older than twice the period, or none at all.
    pub stale: bool,
    /// Why the store could not be read (then `stale` is false: unknown).
    pub problem: Option<String>,
}

impl BackupFreshness {
    /// The status warning this calls for, if any.
    pub fn warning(&self) -> Option<String> {
        if let Some(p) = &self.problem {
            return Some(format!(
                "cannot check the backups of job \"{}\": {p}",
                self.job
            ));
        }
        if !self.stale {
            return None;
        }
        let period = human_duration(self.period_seconds);
        Some(match (&self.newest, self.age_seconds) {
            (Some(id), Some(age)) => format!(
                "the newest backup of job \"{}\" ({id}) is {} old, more than twice its schedule's period ({period}), in {}",
                self.job,
                human_duration(age),
                self.store
            ),
            _ => format!(
                "job \"{}\" has no good backup in {} (it runs every {period})",
                self.job, self.store
            ),
        })
    }
}

/// The enabled backup jobs and where each writes (its `to`, else `backup.url`).
pub fn backup_jobs<'a>(jobs: &'a [Job], config: &'a Config) -> Vec<(&'a Job, String)> {
    jobs.iter()
        .filter(|j| j.enabled)
        .filter_map(|j| match &j.kind {
            JobKind::Backup { to, .. } => to
                .clone()
                .or_else(|| config.backup.url.clone())
                .map(|url| (j, url)),
            _ => None,
        })
        .collect()
}

/// Lists `url` and judges `job`'s newest good backup at `now`. Never fails: a store that
/// cannot be read is the result's `problem`.
pub async fn check(job: &Job, url: &str, config: &Config, now: DateTime<Utc>) -> BackupFreshness {
    let period = period(job, now).unwrap_or(TimeDelta::MAX);
    let mut out = BackupFreshness {
        job: job.name.clone(),
        store: url.to_string(),
        newest: None,
        age_seconds: None,
        period_seconds: period.num_seconds(),
        stale: false,
        problem: None,
    };
    let listed = async {
        let store = Store::open(url, &config.backup.s3)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        out.store = store.describe();
        restore::list(&store)
            .await
            .map_err(|e| crate::error_chain(&e))
    };
    let listed = match tokio::time::timeout(std::time::Duration::from_secs(60), listed).await {
        Ok(r) => r,
        Err(_) => Err("the store did not answer within 60 s".to_string()),
    };
    match listed {
        Ok(backups) => {
            let newest = backups
                .iter()
                .rev()
                .find(|b| b.state == "good")
                .and_then(|b| Some((b.id.clone(), id_time(&b.id)?)));
            out.age_seconds = newest.as_ref().map(|(_, t)| (now - *t).num_seconds());
            out.stale = is_stale(newest.as_ref().map(|(_, t)| *t), period, now);
            out.newest = newest.map(|(id, _)| id);
        }
        Err(e) => out.problem = Some(e),
    }
    out
}

/// `3d 4h`, `5h 12m`, `42m`, `17s`.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn the_period_is_the_gap_between_the_next_two_fire_times() {
        let job =
            |cron| Job::new("b", cron, chrono_tz::UTC, JobKind::Prune { from: None }).unwrap();
        let now = at("2026-03-08T07:00:00Z");
        assert_eq!(period(&job("0 */6 * * *"), now), Some(TimeDelta::hours(6)));
        assert_eq!(period(&job("@daily"), now), Some(TimeDelta::days(1)));
        assert_eq!(
            period(&job("*/15 * * * *"), now),
            Some(TimeDelta::minutes(15))
        );
        // Weekdays at 03:00, on a Thursday: Friday to Monday is the next gap.
        let thursday = at("2026-03-05T12:00:00Z");
        assert_eq!(
            period(&job("0 3 * * 1-5"), thursday),
            Some(TimeDelta::days(3))
        );
    }

    #[test]
    fn a_backup_is_stale_past_twice_the_period_or_when_there_is_none() {
        let now = at("2026-03-08T12:00:00Z");
        let six = TimeDelta::hours(6);
        assert!(!is_stale(Some(at("2026-03-08T00:00:01Z")), six, now));
        assert!(
            !is_stale(Some(at("2026-03-08T00:00:00Z")), six, now),
            "exactly twice is fine"
        );
        assert!(is_stale(Some(at("2026-03-07T23:59:59Z")), six, now));
        assert!(is_stale(None, six, now));
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human_duration(17), "17s");
        assert_eq!(human_duration(42 * 60), "42m");
        assert_eq!(human_duration(5 * 3600 + 12 * 60), "5h 12m");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }
}
