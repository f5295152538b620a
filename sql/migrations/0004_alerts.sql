-- bite-sync bookkeeping on the mirror, version 4: alert incidents.
--
-- One row per incident (`job:<name>` for a job whose last run failed, `backup-stale:<job>` for
-- a backup job whose newest good backup is too old). An incident is open while resolved_at is
-- null; notified_at says its "open" alert reached the webhook, so a restarted daemon neither
-- alerts again nor forgets to alert. Reopening an incident reuses its row.

CREATE TABLE IF NOT EXISTS bite_sync.alerts (
    incident     text PRIMARY KEY,
    opened_at    timestamptz NOT NULL,
    notified_at  timestamptz,
    resolved_at  timestamptz,
    -- What went wrong (a failed run's error, how old the newest backup is).
    detail       text
);
