-- bite-sync bookkeeping on the mirror, version 6: the relay's sends made safe to retry, send
-- slots that a refused request does not consume, secret rotation counters, and the daemon's
-- "caught up" mark for the relay's health check.

-- An Idempotency-Key given by the backend is held by the outbox row of the send that used it:
-- a retry with the same key gets that send's answer (kept in `answer`: the HTTP status and
-- body) instead of sending again. 'unknown': the request reached Meta but no answer came (a
-- timeout), so the message may or may not have gone; such a row is never sent again.
ALTER TABLE bite_sync.outbox
    ADD COLUMN IF NOT EXISTS idempotency_key text,
    ADD COLUMN IF NOT EXISTS answer jsonb;
ALTER TABLE bite_sync.outbox DROP CONSTRAINT IF EXISTS outbox_state_check;
ALTER TABLE bite_sync.outbox ADD CONSTRAINT outbox_state_check
    CHECK (state IN ('sending', 'sent', 'failed', 'unknown'));
CREATE UNIQUE INDEX IF NOT EXISTS outbox_idempotency_key_idx
    ON bite_sync.outbox (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Send slots in two steps (see src/relay/ratelimit.rs). A customer's row: next_at is the start
-- of the next free slot, last_sent_at when the last send to them actually went. The number's
-- row ('*'): next_at is the earliest time the next send of the number may go.
ALTER TABLE bite_sync.send_slots ADD COLUMN IF NOT EXISTS last_sent_at timestamptz;

-- Step 1: a slot in the customer's queue, taken only if the send can go within max_wait
-- seconds (counting the number's backlog too); a refused request changes nothing.
CREATE OR REPLACE FUNCTION bite_sync.reserve_customer_slot(
    customer text, customer_interval float8, number_key text, max_wait float8,
    OUT customer_wait float8, OUT wait float8, OUT reserved boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    start timestamptz;
    number_next timestamptz;
BEGIN
    INSERT INTO bite_sync.send_slots (key, next_at) VALUES (customer, '-infinity')
        ON CONFLICT (key) DO NOTHING;
    SELECT s.next_at INTO start FROM bite_sync.send_slots s WHERE s.key = customer FOR UPDATE;
    -- The clock after the lock: time spent waiting for another sender must not count.
    start := greatest(start, clock_timestamp());
    SELECT s.next_at INTO number_next FROM bite_sync.send_slots s WHERE s.key = number_key;
    customer_wait := extract(epoch FROM start - clock_timestamp());
    wait := greatest(customer_wait, extract(epoch FROM number_next - clock_timestamp()), 0);
    reserved := wait <= max_wait;
    IF reserved THEN
        UPDATE bite_sync.send_slots SET next_at = start + make_interval(secs => customer_interval)
            WHERE key = customer;
    END IF;
END
$fn$;

-- Step 2, when the send is about to go: the number's next slot, and never sooner than
-- customer_interval after the customer's previous send. Rows are locked in one order, so
-- concurrent senders never deadlock.
CREATE OR REPLACE FUNCTION bite_sync.take_send_slot(
    customer text, customer_interval float8, number_key text, number_interval float8,
    OUT wait float8)
LANGUAGE plpgsql AS $fn$
DECLARE
    keys text[] := array_remove(ARRAY[number_key, customer], NULL);
    at timestamptz;
    number_next timestamptz;
    last_sent timestamptz;
BEGIN
    INSERT INTO bite_sync.send_slots (key, next_at)
        SELECT k, '-infinity' FROM unnest(keys) AS k ORDER BY k COLLATE "C"
        ON CONFLICT (key) DO NOTHING;
    PERFORM 1 FROM bite_sync.send_slots WHERE key = ANY (keys) ORDER BY key COLLATE "C" FOR UPDATE;
    SELECT s.next_at INTO number_next FROM bite_sync.send_slots s WHERE s.key = number_key;
    SELECT s.last_sent_at INTO last_sent FROM bite_sync.send_slots s WHERE s.key = customer;
    at := greatest(clock_timestamp(), number_next,
                   last_sent + make_interval(secs => customer_interval));
    UPDATE bite_sync.send_slots SET next_at = at + make_interval(secs => number_interval)
        WHERE key = number_key;
    UPDATE bite_sync.send_slots
        SET last_sent_at = at,
            next_at = greatest(next_at, at + make_interval(secs => customer_interval))
        WHERE key = customer;
    wait := greatest(extract(epoch FROM at - clock_timestamp()), 0);
END
$fn$;

-- Secret rotation: how often each secret's previous value (META_APP_SECRET_PREVIOUS,
-- SYNC_API_KEY_PREVIOUS, JWT_SECRET_PREVIOUS) verified a request, per replica and minute, so
-- an operator sees when nothing uses the old value any more. Kept for a day.
CREATE TABLE IF NOT EXISTS bite_sync.relay_secret_uses (
    replica              text NOT NULL,
    secret               text NOT NULL,
    minute               timestamptz NOT NULL,
    previous_uses        bigint NOT NULL DEFAULT 0,
    current_uses         bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (replica, secret, minute)
);

-- The daemon (`bite-sync run`) marks when it last knew the mirror held everything the source
-- had sent; the relay's health check reports lag 0 while that mark is fresh.
ALTER TABLE bite_sync.replication_state ADD COLUMN IF NOT EXISTS caught_up_at timestamptz;
