-- bite-sync bookkeeping on the mirror, version 1.
-- The presence of bite_sync.schema_migrations marks a database as a bite-sync mirror: a sync
-- refuses to write into a database without it unless run with --init.

CREATE TABLE IF NOT EXISTS bite_sync.sync_runs (
    id            bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    mode          text NOT NULL,
    tables        text[] NOT NULL,
    rows_copied   bigint NOT NULL DEFAULT 0,
    bytes_copied  bigint NOT NULL DEFAULT 0,
    duration_ms   bigint,
    outcome       text NOT NULL DEFAULT 'running'
                  CHECK (outcome IN ('running', 'succeeded', 'failed', 'abandoned')),
    error         text,
    source_system_identifier text,
    source_database text
);

CREATE TABLE IF NOT EXISTS bite_sync.sync_run_tables (
    run_id        bigint NOT NULL REFERENCES bite_sync.sync_runs (id) ON DELETE CASCADE,
    table_name    text NOT NULL,
    action        text NOT NULL,
    rows_copied   bigint NOT NULL,
    bytes_copied  bigint NOT NULL,
    duration_ms   bigint NOT NULL,
    PRIMARY KEY (run_id, table_name)
);

CREATE INDEX IF NOT EXISTS sync_runs_started_at_idx ON bite_sync.sync_runs (started_at DESC);
