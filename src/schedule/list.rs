//! `bite-sync schedules`: each job with its next fire time (in its own time zone and in UTC)
//! and its last run from the mirror's `bite_sync.job_runs`.
//!
//! The history is optional: with no mirror configured, an unreachable one, or one without the
//! table, last runs are "unknown" and the caller prints why; the listing itself never fails
//! for it.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::log::{RunRecord, RunState};
use super::{Job, JobKind, next_fire, pg_log};
use crate::pg::connect::DbUrl;

/// How long the listing waits for the mirror before showing last runs as unknown.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// One job as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The job's name.
    pub name: String,
    /// The file it is defined in.
    pub file: String,
    /// `backup`, `sync`, `verify` or `prune`.
    pub kind: &'static str,
    /// The cron expression as written.
    pub cron: String,
    /// The IANA time zone it is read in.
    pub time_zone: String,
    /// Disabled jobs never run.
    pub enabled: bool,
    /// The next fire time, RFC 3339 in the job's time zone; none when disabled.
    pub next_run: Option<String>,
    /// The same instant in UTC.
    pub next_run_utc: Option<String>,
    /// Whether the history could be read; when false, `last_run` is null for that reason.
    pub last_run_known: bool,
    /// The most recently started run.
    pub last_run: Option<LastRun>,
    /// The kind's arguments as given (absent: the configuration's defaults).
    pub arguments: Arguments,
}

/// A job's arguments.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Arguments {
    /// backup: destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// backup, sync: tables (empty: the configured ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<String>>,
    /// verify, prune: backup location.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// verify: which backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

/// A run as `--json` prints it (times in UTC).
#[derive(Debug, Clone, Serialize)]
pub struct LastRun {
    /// When it started.
    pub started_at: String,
    /// When it ended; none while running (or if its process died).
    pub finished_at: Option<String>,
    /// `running`, `ok` or `failed`.
    pub outcome: &'static str,
    /// Bytes, when the job reports them.
    pub bytes: Option<u64>,
    /// Summary or error.
    pub detail: Option<String>,
}

fn rfc3339<T: chrono::TimeZone>(t: &DateTime<T>) -> String
where
    T::Offset: std::fmt::Display,
{
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn arguments(kind: &JobKind) -> Arguments {
    let tables =
        |t: &[crate::pg::ident::TablePattern]| Some(t.iter().map(|p| p.to_string()).collect());
    match kind {
        JobKind::Backup { to, tables: t } => Arguments {
            to: to.clone(),
            tables: tables(t),
            ..Arguments::default()
        },
        JobKind::Sync { tables: t } => Arguments {
            tables: tables(t),
            ..Arguments::default()
        },
        JobKind::Verify { from, backup } => Arguments {
            from: from.clone(),
            backup: Some(backup.clone()),
            ..Arguments::default()
        },
        JobKind::Prune { from } => Arguments {
            from: from.clone(),
            ..Arguments::default()
        },
    }
}

/// The listing's data, for `--json`. `history`: every job's last run, if it could be read.
pub fn entries(
    jobs: &[Job],
    now: DateTime<Utc>,
    history: Option<&HashMap<String, RunRecord>>,
) -> Vec<Entry> {
    jobs.iter()
        .map(|job| {
            let next = job.enabled.then(|| next_fire(job, now)).flatten();
            Entry {
                name: job.name.clone(),
                file: job.file.display().to_string(),
                kind: job.kind.name(),
                cron: job.cron.text().to_string(),
                time_zone: job.time_zone.name().to_string(),
                enabled: job.enabled,
                next_run: next.map(|t| rfc3339(&t.with_timezone(&job.time_zone))),
                next_run_utc: next.map(|t| rfc3339(&t)),
                last_run_known: history.is_some(),
                last_run: history.and_then(|h| h.get(&job.name)).map(|r| LastRun {
                    started_at: rfc3339(&r.started_at),
                    finished_at: r.finished_at.map(|t| rfc3339(&t)),
                    outcome: r.state.as_str(),
                    bytes: r.bytes,
                    detail: r.detail.clone(),
                }),
                arguments: arguments(&job.kind),
            }
        })
        .collect()
}

/// The listing as text for a terminal.
pub fn render(
    jobs: &[Job],
    now: DateTime<Utc>,
    history: Option<&HashMap<String, RunRecord>>,
) -> String {
    if jobs.is_empty() {
        return "no scheduled jobs\n".into();
    }
    let mut out = String::new();
    for job in jobs {
        let tz = job.time_zone;
        out.push_str(&format!(
            "{} ({}){}\n",
            job.name,
            describe_kind(&job.kind),
            if job.enabled { "" } else { ", disabled" }
        ));
        out.push_str(&format!(
            "  cron:     {}  in {}\n",
            job.cron.text(),
            tz.name()
        ));
        let next = if !job.enabled {
            format!("none: enabled = false in {}", job.file.display())
        } else {
            match next_fire(job, now) {
                Some(t) => format!("{}  ({} UTC)", local(t, tz), t.format("%Y-%m-%d %H:%M")),
                None => "none: the schedule has no fire time left".into(),
            }
        };
        out.push_str(&format!("  next run: {next}\n"));
        let last = match history {
            None => "unknown".to_string(),
            Some(h) => match h.get(&job.name) {
                None => "never".to_string(),
                Some(r) => describe_run(r, tz),
            },
        };
        out.push_str(&format!("  last run: {last}\n"));
        out.push_str(&format!("  file:     {}\n", job.file.display()));
    }
    out
}

fn local(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z").to_string()
}

fn describe_kind(kind: &JobKind) -> String {
    let list = |t: &[crate::pg::ident::TablePattern]| {
        t.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = kind.name().to_string();
    match kind {
        JobKind::Backup { to, tables } => {
            if !tables.is_empty() {
                text.push_str(&format!(" of {}", list(tables)));
            }
            if let Some(to) = to {
                text.push_str(&format!(" to {to}"));
            }
        }
        JobKind::Sync { tables } => {
            if !tables.is_empty() {
                text.push_str(&format!(" of {}", list(tables)));
            }
        }
        JobKind::Verify { from, backup } => {
            text.push_str(&format!(" {backup}"));
            if let Some(from) = from {
                text.push_str(&format!(" from {from}"));
            }
        }
        JobKind::Prune { from } => {
            if let Some(from) = from {
                text.push_str(&format!(" {from}"));
            }
        }
    }
    text
}

fn describe_run(r: &RunRecord, tz: Tz) -> String {
    let mut text = format!("{}: {}", local(r.started_at, tz), r.state);
    if let Some(end) = r.finished_at {
        text.push_str(&format!(" after {}", human_duration(end - r.started_at)));
    } else if r.state == RunState::Running {
        text.push_str(" (no end recorded)");
    }
    if let Some(bytes) = r.bytes {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        text.push_str(&format!(", {}", crate::repl::status::human_bytes(bytes)));
    }
    if let Some(detail) = &r.detail {
        text.push_str(&format!(": {detail}"));
    }
    text
}

/// `2 ms`, `45s`, `3m 12s`, `2h 05m`: how long a run took, for people (chrono's own
/// `Display` is ISO 8601, `PT0.0019S`).
pub fn human_duration(d: TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0 => format!("{} ms", d.num_milliseconds().max(0)),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Every job's last run from the mirror, or why it cannot be known (said as a note; never an
/// error for the listing).
pub async fn read_history(mirror: Option<&DbUrl>) -> Result<HashMap<String, RunRecord>, String> {
    let Some(url) = mirror else {
        return Err(
            "no mirror configured (--mirror, BITE_MIRROR_URL or mirror.url in bite-sync.toml)"
                .into(),
        );
    };
    let client = match tokio::time::timeout(MIRROR_TIMEOUT, url.connect()).await {
        Err(_) => {
            return Err(format!(
                "the mirror {} did not answer within {} s",
                url.target(),
                MIRROR_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) => {
            return Err(format!(
                "the mirror is unreachable: {}",
                crate::error_chain(&e)
            ));
        }
        Ok(Ok(client)) => client,
    };
    match pg_log::last_runs(&client).await {
        Ok(Some(runs)) => Ok(runs),
        Ok(None) => Err("the mirror has no run history yet (no bite_sync.job_runs table)".into()),
        Err(e) => Err(format!(
            "could not read the mirror's run history: {}",
            crate::error_chain(&e)
        )),
    }
}

#[cfg(test)]
mod durations {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(TimeDelta::microseconds(1_900)), "1 ms");
        assert_eq!(human_duration(TimeDelta::seconds(45)), "45s");
        assert_eq!(human_duration(TimeDelta::seconds(192)), "3m 12s");
        assert_eq!(human_duration(TimeDelta::seconds(7_500)), "2h 05m");
        assert_eq!(human_duration(TimeDelta::seconds(-3)), "0 ms");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::log::RunId;
    use chrono::TimeZone;

    fn jobs() -> Vec<Job> {
        let tz: Tz = "America/Mexico_City".parse().unwrap();
        let mut backup = Job::new(
            "backup",
            "0 */6 * * *",
            tz,
            JobKind::Backup {
                to: Some("s3://bucket/bite".into()),
                tables: vec![],
            },
        )
        .unwrap();
        backup.file = "schedules/backup.toml".into();
        let mut sync = Job::new(
            "menu-nightly",
            "0 3 * * *",
            tz,
            JobKind::Sync {
                tables: vec![crate::pg::ident::parse_pattern("menu_items").unwrap()],
            },
        )
        .unwrap();
        sync.file = "schedules/sync.toml".into();
        sync.enabled = false;
        vec![backup, sync]
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 8, 13, 0, 0).unwrap()
    }

    fn history() -> HashMap<String, RunRecord> {
        let started = Utc.with_ymd_and_hms(2026, 3, 8, 12, 0, 0).unwrap();
        let record = RunRecord {
            id: RunId(7),
            job: "backup".into(),
            started_at: started,
            finished_at: Some(started + TimeDelta::seconds(192)),
            state: RunState::Ok,
            bytes: Some(3 * 1024 * 1024),
            detail: Some("12 tables".into()),
        };
        HashMap::from([("backup".to_string(), record)])
    }

    #[test]
    fn json_entries_show_next_run_in_both_zones_and_the_last_run() {
        let history = history();
        let entries = entries(&jobs(), now(), Some(&history));
        let json = serde_json::to_value(&entries).unwrap();
        let backup = &json[0];
        // 13:00 UTC is 07:00 in Mexico City (UTC-6): next is 12:00 local.
        assert_eq!(backup["next_run"], "2026-03-08T12:00:00-06:00");
        assert_eq!(backup["next_run_utc"], "2026-03-08T18:00:00Z");
        assert_eq!(backup["last_run_known"], true);
        assert_eq!(backup["last_run"]["outcome"], "ok");
        assert_eq!(backup["last_run"]["bytes"], 3 * 1024 * 1024);
        assert_eq!(
            backup["arguments"],
            serde_json::json!({ "to": "s3://bucket/bite", "tables": [] })
        );
        let sync = &json[1];
        assert_eq!(sync["enabled"], false);
        assert!(sync["next_run"].is_null(), "a disabled job has no next run");
        assert!(sync["last_run"].is_null());
        assert_eq!(
            sync["arguments"],
            serde_json::json!({ "tables": ["menu_items"] })
        );

        let unknown = serde_json::to_value(super::entries(&jobs(), now(), None)).unwrap();
        assert_eq!(unknown[0]["last_run_known"], false);
        assert!(unknown[0]["last_run"].is_null());
    }

    #[test]
    fn text_shows_local_and_utc_times_and_says_when_history_is_unknown() {
        let history = history();
        let text = render(&jobs(), now(), Some(&history));
        assert!(
            text.contains("backup (backup to s3://bucket/bite)\n"),
            "{text}"
        );
        assert!(
            text.contains("  cron:     0 */6 * * *  in America/Mexico_City\n"),
            "{text}"
        );
        assert!(
            text.contains("  next run: 2026-03-08 12:00 CST  (2026-03-08 18:00 UTC)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  last run: 2026-03-08 06:00 CST: ok after 3m 12s, 3.0 MiB: 12 tables\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("menu-nightly (sync of menu_items), disabled\n"),
            "{text}"
        );
        assert!(
            text.contains("  next run: none: enabled = false in schedules/sync.toml\n"),
            "{text}"
        );
        assert!(text.contains("  last run: never\n"), "{text}");
        let unknown = render(&jobs(), now(), None);
        assert_eq!(unknown.matches("last run: unknown").count(), 2, "{unknown}");
        assert_eq!(render(&[], now(), None), "no scheduled jobs\n");
    }
}
