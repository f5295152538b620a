-- bite-sync bookkeeping on the mirror, version 2: continuous replication (`bite-sync run`).
--
-- Exactly once: every mirror transaction that applies source changes also updates
-- replication_state.lsn to the source position those changes reach. A restart resumes the
-- stream there, so a change is applied once whether the daemon stopped cleanly or was killed.

CREATE TABLE IF NOT EXISTS bite_sync.replication_state (
    slot_name          text PRIMARY KEY,
    publication        text NOT NULL,
    -- The source the stream comes from: its system identifier and database.
    source_system_identifier text NOT NULL,
    source_database    text NOT NULL,
    -- Where the stream resumes: the end of the last source transaction applied here.
    lsn                pg_lsn NOT NULL,
    -- When that transaction committed on the source (null before the first one).
    source_commit_time timestamptz,
    -- When this row last changed: a transaction was applied or an idle position confirmed.
    applied_at         timestamptz NOT NULL DEFAULT now(),
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- The daemon's last error, cleared when it streams again.
    last_error         text,
    last_error_at      timestamptz
);

-- The tables a slot replicates and what state each is in.
CREATE TABLE IF NOT EXISTS bite_sync.replication_tables (
    slot_name          text NOT NULL REFERENCES bite_sync.replication_state (slot_name) ON DELETE CASCADE,
    table_schema       text NOT NULL,
    table_name         text NOT NULL,
    -- 'streaming': changes are applied; 'paused': a change could not be applied (see reason)
    -- and the table's changes are skipped until it is synced again.
    state              text NOT NULL CHECK (state IN ('streaming', 'paused')),
    -- Source transactions that commit before this position are already in the table's copy.
    synced_lsn         pg_lsn NOT NULL,
    synced_at          timestamptz NOT NULL DEFAULT now(),
    reason             text,
    paused_at          timestamptz,
    PRIMARY KEY (slot_name, table_schema, table_name)
);
