-- bite-sync bookkeeping on the mirror, version 3: scheduled jobs (schedules/*.toml).
--
-- One row per run of a job: inserted as 'running' when it starts, completed when it ends.
-- At start-up the scheduler reads each job's latest started_at: a fire time between it and
-- now was missed (bite-sync was not running), and the job runs once straight away.
-- A process killed during a run leaves its row 'running' with no finished_at.

CREATE TABLE IF NOT EXISTS bite_sync.job_runs (
    id            bigserial PRIMARY KEY,
    job           text NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    outcome       text NOT NULL DEFAULT 'running'
                  CHECK (outcome IN ('running', 'ok', 'failed')),
    -- Bytes the run wrote or read, when the job reports them.
    bytes         bigint,
    -- The job's summary, or the error of a failed run.
    detail        text
);

CREATE INDEX IF NOT EXISTS job_runs_job_started_at_idx
    ON bite_sync.job_runs (job, started_at DESC);
