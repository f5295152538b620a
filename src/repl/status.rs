//! `bite-sync status`: the slot on the source and the mirror's bookkeeping, side by side.
//!
//! Each side is read on its own: an unreachable side is reported, not fatal, so status works
//! when it is most needed. Lag in seconds is the source's own measure (`pg_stat_replication.
//! flush_lag`): how long WAL took from being written on the source to being reported committed
//! on the mirror, which bite-sync reports only after the mirror transaction commits. A
//! caught-up stream has no lag however old its last change.

use serde::Serialize;

use crate::pg::connect::DbUrl;

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The slot asked about.
    pub slot: String,
    /// The source side, if it could be read.
    pub source: Option<SourceSide>,
    /// Why it could not.
    pub source_error: Option<String>,
    /// The mirror side, if it could be read.
    pub mirror: Option<MirrorSide>,
    /// Why it could not.
    pub mirror_error: Option<String>,
    /// Each scheduled job's latest run, when the mirror keeps the run history.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub jobs: Vec<JobRunStatus>,
    /// Each backup job's newest backup, when `backup.url` and a backup job are configured.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub backups: Vec<crate::alert::freshness::BackupFreshness>,
    /// The mirror's sequences against the source's, when both could be read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sequences: Option<super::sequences::SequenceStatus>,
    /// The WhatsApp relay's inbox on the mirror, when the relay has used it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub inbox: Option<crate::relay::inbox::InboxCounts>,
    /// Which value of the relay's secrets verified requests in the last hour (a rotation in
    /// progress: the `*_PREVIOUS` value still in use), when the relay recorded any.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub relay_secrets: Vec<crate::relay::secrets::SecretUse>,
    /// Things that need attention.
    pub warnings: Vec<String>,
    /// Nothing needs attention.
    pub healthy: bool,
}

/// The slot as the source sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSide {
    /// The slot exists.
    pub exists: bool,
    /// A connection is streaming from it.
    pub active: bool,
    /// `lost` when the source invalidated it; `reserved`/`extended`/`unreserved` otherwise.
    pub wal_status: Option<String>,
    /// The position the mirror has confirmed.
    pub confirmed_lsn: Option<String>,
    /// The source's current WAL position.
    pub current_lsn: String,
    /// WAL the slot keeps on the source's disk.
    pub retained_wal_bytes: Option<i64>,
    /// WAL written since the confirmed position.
    pub lag_bytes: Option<i64>,
    /// How long the source's latest WAL took to be committed on the mirror (PostgreSQL's
    /// `flush_lag`; 0 when caught up, none when no daemon is streaming).
    pub lag_seconds: Option<f64>,
    /// WAL the slot may still retain before the source invalidates it (none: no limit).
    pub safe_wal_bytes: Option<i64>,
    /// The source's `max_slot_wal_keep_size`.
    pub max_slot_wal_keep_size: String,
}

/// The mirror's bookkeeping for the slot.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorSide {
    /// The mirror has a record of the slot.
    pub initialized: bool,
    /// The position the mirror's data reflects.
    pub lsn: Option<String>,
    /// When the last applied transaction committed on the source.
    pub source_commit_time: Option<String>,
    /// When the mirror's position last moved.
    pub applied_at: Option<String>,
    /// The daemon's last error, if it has not streamed since.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<String>,
    /// Per replicated table.
    pub tables: Vec<TableStatus>,
    /// The daemons on the slot's lock: the active one, and standbys waiting to take over.
    pub daemons: Vec<super::setup::DaemonOnMirror>,
}

/// One replicated table.
#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    /// The table.
    pub table: String,
    /// `streaming` or `paused`.
    pub state: String,
    /// Why it is paused.
    pub reason: Option<String>,
    /// The position its copy was taken at.
    pub synced_lsn: String,
}

/// Reads both sides.
pub async fn status(source: Option<&DbUrl>, mirror: Option<&DbUrl>, slot: &str) -> Status {
    let (source_side, mirror_side) = tokio::join!(
        async {
            match source {
                Some(url) => read_source(url, slot)
                    .await
                    .map_err(|e| crate::error_chain(&*e)),
                None => Err("no source database configured".to_string()),
            }
        },
        async {
            match mirror {
                Some(url) => read_mirror(url, slot)
                    .await
                    .map_err(|e| crate::error_chain(&*e)),
                None => Err("no mirror database configured".to_string()),
            }
        }
    );
    let mut status = Status {
        slot: slot.to_string(),
        source: None,
        source_error: None,
        mirror: None,
        mirror_error: None,
        jobs: Vec::new(),
        backups: Vec::new(),
        sequences: None,
        inbox: None,
        relay_secrets: Vec::new(),
        warnings: Vec::new(),
        healthy: false,
    };
    let mut sequence_error = None;
    if let (Ok(_), Ok(m), Some(source), Some(mirror)) = (&source_side, &mirror_side, source, mirror)
        && m.initialized
    {
        match read_sequences(source, mirror, slot).await {
            Ok(s) => status.sequences = Some(s),
            Err(e) => sequence_error = Some(crate::error_chain(&*e)),
        }
    }
    match source_side {
        Ok(s) => status.source = Some(s),
        Err(e) => status.source_error = Some(e),
    }
    match mirror_side {
        Ok(m) => status.mirror = Some(m),
        Err(e) => status.mirror_error = Some(e),
    }
    status.warnings = warnings(&status);
    if let Some(e) = sequence_error {
        status
            .warnings
            .push(format!("cannot compare the sequences: {e}"));
    }
    status.healthy =
        status.source.is_some() && status.mirror.is_some() && status.warnings.is_empty();
    status
}

/// One job's latest run.
#[derive(Debug, Clone, Serialize)]
pub struct JobRunStatus {
    /// The job.
    pub job: String,
    /// Its kind, when its schedule file is known.
    pub kind: Option<String>,
    /// `running`, `ok` or `failed`.
    pub state: String,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// When it finished.
    pub finished: Option<String>,
    /// Its summary or error.
    pub detail: Option<String>,
}

impl JobRunStatus {
    /// The warning a failed latest run calls for.
    pub fn warning(&self) -> Option<String> {
        (self.state == "failed").then(|| {
            format!(
                "{}job \"{}\" failed at {}: {}",
                self.kind
                    .as_ref()
                    .map(|k| format!("{k} "))
                    .unwrap_or_default(),
                self.job,
                self.finished.as_deref().unwrap_or(&self.started),
                self.detail.as_deref().unwrap_or("no detail recorded")
            )
        })
    }
}

/// Adds the schedules' part: each job's latest run from the mirror's `bite_sync.job_runs`
/// (if it has one) and the freshness of each enabled backup job's backups when `backup.url`
/// is configured. A failed latest run or a stale backup is a warning and makes the status
/// unhealthy; a store that cannot be read is a warning too. Nothing here fails.
pub async fn add_schedules(
    status: &mut Status,
    mirror: Option<&DbUrl>,
    jobs: &[crate::schedule::Job],
    config: &crate::config::Config,
) {
    let now = chrono::Utc::now();
    let runs = async {
        let url = mirror?;
        let client = url.connect().await.ok()?;
        crate::schedule::pg_log::last_runs(&client).await.ok()?
    };
    let freshness = async {
        if config.backup.url.is_none() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (job, url) in crate::alert::freshness::backup_jobs(jobs, config) {
            out.push(crate::alert::freshness::check(job, &url, config, now).await);
        }
        out
    };
    let (runs, backups) = tokio::join!(runs, freshness);
    let ts =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut runs: Vec<_> = runs.unwrap_or_default().into_values().collect();
    runs.sort_by(|a, b| a.job.cmp(&b.job));
    status.jobs = runs
        .into_iter()
        .map(|r| JobRunStatus {
            kind: jobs
                .iter()
                .find(|j| j.name == r.job)
                .map(|j| j.kind.name().to_string()),
            job: r.job,
            state: r.state.as_str().to_string(),
            started: ts(r.started_at),
            finished: r.finished_at.map(ts),
            detail: r.detail,
        })
        .collect();
    status.backups = backups;
    let extra: Vec<String> = status
        .jobs
        .iter()
        .filter_map(JobRunStatus::warning)
        .chain(status.backups.iter().filter_map(|b| b.warning()))
        .collect();
    if !extra.is_empty() {
        status.healthy = false;
        status.warnings.extend(extra);
    }
}

/// Pending WhatsApp items older than this make the status unhealthy: the backend is not
/// taking them (is `bite-sync run` delivering?).
const INBOX_STALE_SECONDS: f64 = 300.0;

/// Adds the relay's inbox counters from the mirror, when it has an inbox with anything in it.
/// Items waiting longer than five minutes are a warning.
pub async fn add_inbox(status: &mut Status, mirror: Option<&DbUrl>) {
    let counts = async {
        let client = mirror?.connect().await.ok()?;
        let row = client
            .query_one(
                "SELECT pg_catalog.to_regclass('bite_sync.inbox') IS NOT NULL",
                &[],
            )
            .await
            .ok()?;
        if !row.get::<_, bool>(0) {
            return None;
        }
        let secrets = crate::relay::secrets::last_hour(&client)
            .await
            .unwrap_or_default();
        Some((crate::relay::inbox::counts(&client).await.ok()?, secrets))
    }
    .await;
    let Some((counts, secrets)) = counts else {
        return;
    };
    status.relay_secrets = secrets;
    if counts.received == 0 && counts.dead_lettered == 0 {
        return;
    }
    if let Some(age) = counts.oldest_pending_seconds
        && age > INBOX_STALE_SECONDS
    {
        status.warnings.push(format!(
            "{} WhatsApp item(s) waiting for the backend, the oldest for {:.0} s: is `bite-sync run` delivering (LOCAL_BACKEND_URL), or is the backend down?",
            counts.pending, age
        ));
        status.healthy = false;
    }
    status.inbox = Some(counts);
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The sequences the slot's tables use, on both sides.
async fn read_sequences(
    source_url: &DbUrl,
    mirror_url: &DbUrl,
    slot: &str,
) -> Result<super::sequences::SequenceStatus, BoxError> {
    let (source, mirror) = tokio::try_join!(source_url.connect(), mirror_url.connect())?;
    let tables: Vec<crate::pg::ident::QualifiedName> = mirror
        .query(
            "SELECT table_schema, table_name FROM bite_sync.replication_tables WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .iter()
        .map(|r| crate::pg::ident::QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let search_path = crate::sync::catalog::search_path(&source).await?;
    // Tables gone from the source since are simply not found.
    let names = super::sequences::used_by(&source, &tables, &search_path).await?;
    let (on_source, on_mirror) = tokio::try_join!(
        super::sequences::read(&source, &names),
        super::sequences::read(&mirror, &names)
    )?;
    Ok(super::sequences::compare(&names, &on_source, &on_mirror))
}

async fn read_source(url: &DbUrl, slot: &str) -> Result<SourceSide, BoxError> {
    let client = url.connect().await?;
    let row = client
        .query_one(
            "SELECT s.slot_name IS NOT NULL, COALESCE(s.active, false), s.wal_status, \
                    s.confirmed_flush_lsn::text, pg_catalog.pg_current_wal_lsn()::text, \
                    pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::int8, \
                    pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn)::int8, \
                    s.safe_wal_size, pg_catalog.current_setting('max_slot_wal_keep_size'), \
                    CASE WHEN s.active THEN COALESCE(EXTRACT(EPOCH FROM r.flush_lag)::float8, 0) END \
             FROM (SELECT 1) AS one \
             LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = $1 \
             LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid",
            &[&slot],
        )
        .await?;
    Ok(SourceSide {
        exists: row.get(0),
        active: row.get(1),
        wal_status: row.get(2),
        confirmed_lsn: row.get(3),
        current_lsn: row.get(4),
        retained_wal_bytes: row.get(5),
        lag_bytes: row.get(6),
        lag_seconds: row.get(9),
        safe_wal_bytes: row.get(7),
        max_slot_wal_keep_size: row.get(8),
    })
}

async fn read_mirror(url: &DbUrl, slot: &str) -> Result<MirrorSide, BoxError> {
    let client = url.connect().await?;
    let has_table: bool = client
        .query_one(
            "SELECT pg_catalog.to_regclass('bite_sync.replication_state') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let empty = MirrorSide {
        initialized: false,
        lsn: None,
        source_commit_time: None,
        applied_at: None,
        last_error: None,
        last_error_at: None,
        tables: Vec::new(),
        daemons: Vec::new(),
    };
    if !has_table {
        return Ok(empty);
    }
    let Some(row) = client
        .query_opt(
            "SELECT lsn::text, \
                    to_char(source_commit_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                    to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                    CASE WHEN last_error_at > applied_at THEN last_error END, \
                    CASE WHEN last_error_at > applied_at \
                         THEN to_char(last_error_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') END \
             FROM bite_sync.replication_state WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(empty);
    };
    let tables = client
        .query(
            "SELECT table_schema, table_name, state, reason, synced_lsn::text \
             FROM bite_sync.replication_tables WHERE slot_name = $1 ORDER BY 1, 2",
            &[&slot],
        )
        .await?
        .iter()
        .map(|r| TableStatus {
            table: crate::pg::ident::QualifiedName::new(
                r.get::<_, String>(0),
                r.get::<_, String>(1),
            )
            .to_string(),
            state: r.get(2),
            reason: r.get(3),
            synced_lsn: r.get(4),
        })
        .collect();
    Ok(MirrorSide {
        initialized: true,
        lsn: row.get(0),
        source_commit_time: row.get(1),
        applied_at: row.get(2),
        last_error: row.get(3),
        last_error_at: row.get(4),
        tables,
        daemons: super::setup::daemons_on_mirror(&client, slot).await?,
    })
}

fn warnings(status: &Status) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &status.source_error {
        out.push(format!("cannot read the source: {e}"));
    }
    if let Some(e) = &status.mirror_error {
        out.push(format!("cannot read the mirror: {e}"));
    }
    if let Some(s) = &status.source {
        if !s.exists {
            out.push(format!(
                "replication slot {} does not exist on the source: start `bite-sync run` to create it",
                status.slot
            ));
        } else {
            if s.wal_status.as_deref() == Some("lost") {
                out.push("the source invalidated the replication slot (it retained more WAL than max_slot_wal_keep_size): the next `bite-sync run` copies every table again".into());
            }
            if !s.active {
                out.push("no `bite-sync run` is streaming from the slot: WAL accumulates on the source until it runs again".into());
            }
            if let (Some(safe), Some(retained)) = (s.safe_wal_bytes, s.retained_wal_bytes)
                && safe < (safe + retained) / 5
            {
                out.push(format!(
                    "the slot retains {} of WAL and may retain only {} more before the source invalidates it (max_slot_wal_keep_size = {})",
                    human_bytes(retained),
                    human_bytes(safe.max(0)),
                    s.max_slot_wal_keep_size
                ));
            }
        }
    }
    if let Some(m) = &status.mirror {
        if !m.initialized {
            out.push(format!(
                "the mirror has no replication state for slot {}: start `bite-sync run --init`",
                status.slot
            ));
        }
        for t in m.tables.iter().filter(|t| t.state == "paused") {
            out.push(format!(
                "{} is paused: {}",
                t.table,
                t.reason.as_deref().unwrap_or("no reason recorded")
            ));
        }
        if let Some(e) = &m.last_error {
            out.push(format!("last error: {e}"));
        }
    }
    // Behind while a daemon streams is the few seconds between catch-ups; behind with none
    // streaming is what a failover would meet: ids the source already used.
    let streaming = status.source.as_ref().is_some_and(|s| s.active);
    if let Some(seq) = &status.sequences
        && !seq.behind.is_empty()
        && !streaming
    {
        out.push(format!(
            "the mirror's sequences are behind the source's: {}; the next `bite-sync run` moves them up (a mirror used as it is would hand out ids the source already used)",
            seq.behind.join(", ")
        ));
    }
    out
}

/// `1.5 MiB`.
pub fn human_bytes(bytes: i64) -> String {
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    }
}

/// The status as text for a terminal.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!("slot {}\n", status.slot));
    match &status.source {
        Some(s) if s.exists => {
            out.push_str(&format!(
                "  source:  {}, wal {}, confirmed {} (current {})\n",
                if s.active {
                    "streaming"
                } else {
                    "not streaming"
                },
                s.wal_status.as_deref().unwrap_or("?"),
                s.confirmed_lsn.as_deref().unwrap_or("-"),
                s.current_lsn
            ));
            out.push_str(&format!(
                "           retained WAL {}, lag {}{}\n",
                s.retained_wal_bytes.map_or("-".into(), human_bytes),
                s.lag_bytes.map_or("-".into(), human_bytes),
                s.lag_seconds
                    .map_or(String::new(), |l| format!(" ({l:.1} s)"))
            ));
        }
        Some(_) => out.push_str("  source:  no such slot\n"),
        None => out.push_str(&format!(
            "  source:  unreachable: {}\n",
            status.source_error.as_deref().unwrap_or("?")
        )),
    }
    match &status.mirror {
        Some(m) if m.initialized => {
            out.push_str(&format!(
                "  mirror:  at {}, last change committed {} (applied {})\n",
                m.lsn.as_deref().unwrap_or("-"),
                m.source_commit_time.as_deref().unwrap_or("-"),
                m.applied_at.as_deref().unwrap_or("-")
            ));
            for d in &m.daemons {
                out.push_str(&format!(
                    "  daemon:  {} {} (pid {})\n",
                    if d.active { "active on" } else { "standby on" },
                    d.host,
                    d.pid
                ));
            }
            if let Some(seq) = &status.sequences {
                if seq.behind.is_empty() {
                    out.push_str(&format!("  sequences: {} in step\n", seq.in_step));
                } else {
                    out.push_str(&format!(
                        "  sequences: {} of {} in step; behind: {}\n",
                        seq.in_step,
                        seq.total,
                        seq.behind.join(", ")
                    ));
                }
            }
            for t in &m.tables {
                out.push_str(&format!(
                    "    {:<28} {}{}\n",
                    t.table,
                    t.state,
                    t.reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ));
            }
        }
        Some(_) => out.push_str("  mirror:  no replication state\n"),
        None => out.push_str(&format!(
            "  mirror:  unreachable: {}\n",
            status.mirror_error.as_deref().unwrap_or("?")
        )),
    }
    if let Some(i) = &status.inbox {
        out.push_str(&format!(
            "whatsapp inbox\n    received {} ({} messages, {} statuses), duplicates {}, dead letters {}\n",
            i.received, i.messages, i.statuses, i.duplicates, i.dead_lettered
        ));
        out.push_str(&format!(
            "    delivered {}, pending {}{}, answered by AI {}; last received {}, last delivered {}\n",
            i.delivered,
            i.pending,
            i.oldest_pending_seconds
                .map_or(String::new(), |a| format!(" (oldest {a:.0} s)")),
            i.answered_by_ai,
            i.last_received_at.as_deref().unwrap_or("-"),
            i.last_delivered_at.as_deref().unwrap_or("-"),
        ));
    }
    for s in status
        .relay_secrets
        .iter()
        .filter(|s| s.previous_last_used_at.is_some())
    {
        out.push_str(&format!(
            "relay secret {}: the previous value ({}_PREVIOUS) verified {} request(s) in the last hour, the current one {}; last use of the previous {}\n",
            s.secret,
            s.secret,
            s.previous_last_hour,
            s.current_last_hour,
            s.previous_last_used_at.as_deref().unwrap_or("-"),
        ));
    }
    if !status.jobs.is_empty() {
        out.push_str("jobs\n");
        for j in &status.jobs {
            out.push_str(&format!(
                "    {:<28} {} {}{}\n",
                j.job,
                j.state,
                j.finished.as_deref().unwrap_or(&j.started),
                j.detail
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            ));
        }
    }
    if !status.backups.is_empty() {
        out.push_str("backups\n");
        for b in &status.backups {
            out.push_str(&format!(
                "    {:<28} newest {}{}\n",
                b.job,
                b.newest.as_deref().unwrap_or("none"),
                b.age_seconds
                    .map(|a| format!(" ({} old)", crate::alert::freshness::human_duration(a)))
                    .unwrap_or_default()
            ));
        }
    }
    if status.warnings.is_empty() {
        out.push_str("healthy\n");
    } else {
        for w in &status.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_latest_run_is_a_warning_naming_the_job() {
        let run = JobRunStatus {
            job: "backup".into(),
            kind: Some("backup".into()),
            state: "failed".into(),
            started: "2026-03-08T06:00:00Z".into(),
            finished: Some("2026-03-08T06:01:00Z".into()),
            detail: Some("disk full".into()),
        };
        assert_eq!(
            run.warning().as_deref(),
            Some("backup job \"backup\" failed at 2026-03-08T06:01:00Z: disk full")
        );
        let ok = JobRunStatus {
            state: "ok".into(),
            ..run
        };
        assert_eq!(ok.warning(), None);
    }

    #[test]
    fn bytes_read_like_a_person_would_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn a_paused_table_and_a_lost_slot_are_warnings() {
        let status = Status {
            slot: "s".into(),
            source: Some(SourceSide {
                exists: true,
                active: true,
                wal_status: Some("lost".into()),
                confirmed_lsn: None,
                current_lsn: "0/1".into(),
                retained_wal_bytes: None,
                lag_bytes: None,
                lag_seconds: None,
                safe_wal_bytes: None,
                max_slot_wal_keep_size: "-1".into(),
            }),
            source_error: None,
            mirror: Some(MirrorSide {
                initialized: true,
                lsn: Some("0/1".into()),
                source_commit_time: None,
                applied_at: None,
                last_error: None,
                last_error_at: None,
                daemons: Vec::new(),
                tables: vec![TableStatus {
                    table: "orders".into(),
                    state: "paused".into(),
                    reason: Some("type changed".into()),
                    synced_lsn: "0/1".into(),
                }],
            }),
            mirror_error: None,
            jobs: Vec::new(),
            backups: Vec::new(),
            sequences: None,
            inbox: None,
            relay_secrets: Vec::new(),
            warnings: Vec::new(),
            healthy: false,
        };
        let w = warnings(&status);
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(w[0].contains("invalidated"));
        assert!(w[1].contains("orders is paused: type changed"));
        // A rotation in progress says how much the previous value is still used.
        let mut status = status;
        status.relay_secrets = vec![
            crate::relay::secrets::SecretUse {
                secret: "SYNC_API_KEY".into(),
                current_last_hour: 40,
                previous_last_hour: 2,
                previous_last_used_at: Some("2026-12-04T10:15Z".into()),
            },
            crate::relay::secrets::SecretUse {
                secret: "META_APP_SECRET".into(),
                current_last_hour: 9,
                previous_last_hour: 0,
                previous_last_used_at: None,
            },
        ];
        let text = render(&status);
        assert!(
            text.contains("relay secret SYNC_API_KEY: the previous value (SYNC_API_KEY_PREVIOUS) verified 2 request(s) in the last hour, the current one 40; last use of the previous 2026-12-04T10:15Z"),
            "{text}"
        );
        assert!(!text.contains("relay secret META_APP_SECRET"), "{text}");
    }

    #[test]
    fn nearing_the_wal_limit_warns() {
        let mut s = SourceSide {
            exists: true,
            active: true,
            wal_status: Some("extended".into()),
            confirmed_lsn: None,
            current_lsn: "0/1".into(),
            retained_wal_bytes: Some(900 << 20),
            lag_bytes: None,
            lag_seconds: None,
            safe_wal_bytes: Some(100 << 20),
            max_slot_wal_keep_size: "1GB".into(),
        };
        let status = |s: &SourceSide| Status {
            slot: "s".into(),
            source: Some(s.clone()),
            source_error: None,
            mirror: None,
            mirror_error: Some("x".into()),
            jobs: Vec::new(),
            backups: Vec::new(),
            sequences: None,
            inbox: None,
            relay_secrets: Vec::new(),
            warnings: Vec::new(),
            healthy: false,
        };
        assert!(
            warnings(&status(&s))
                .iter()
                .any(|w| w.contains("before the source invalidates it"))
        );
        s.safe_wal_bytes = Some(900 << 20);
        assert!(
            !warnings(&status(&s))
                .iter()
                .any(|w| w.contains("before the source invalidates it"))
        );
    }
}
