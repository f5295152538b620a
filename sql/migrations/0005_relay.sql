-- bite-sync bookkeeping on the mirror, version 5: the WhatsApp relay's durable inbox.
--
-- `bite-sync relay` (on Railway) writes every verified webhook here before answering Meta 200;
-- `bite-sync run` (pull) or the relay itself (push) delivers each row to the restaurant's
-- backend; the relay answers customers with an AI reply when the backend has not taken a message
-- in time. Several relay replicas and the daemon coordinate only through these tables.

-- One row per message, status or other change Meta sent, whatever the batching.
CREATE TABLE IF NOT EXISTS bite_sync.inbox (
    id                   bigserial PRIMARY KEY,
    -- 'message': value.messages[] (inbound from a customer); 'status': value.statuses[] (what
    -- happened to a message we sent); 'change': any other change (value.errors[], other fields).
    kind                 text NOT NULL CHECK (kind IN ('message', 'status', 'change')),
    -- Meta retries for 7 days and other apps' retries reach us too: one row per key.
    -- message: its wamid; status: wamid, space, status; change: 'change ' || sha256 of it.
    dedupe_key           text NOT NULL UNIQUE,
    -- message: its wamid; status: the wamid of our message it is about.
    wamid                text,
    -- The change as Meta addressed it: entry.id (the WABA), changes[].field, value.metadata.
    waba_id              text,
    field                text NOT NULL,
    metadata             jsonb,
    -- Who: the customer's wa_id (phone) when Meta gives one, else their business-scoped user
    -- id (BSUID). Delivery keeps the order of each customer's rows.
    customer             text NOT NULL,
    customer_phone       text,
    customer_user_id     text,
    customer_name        text,
    -- messages[].type (text, image, …, whatever Meta invents) or statuses[].status.
    item_type            text,
    -- What a person would read: text.body, a caption, a button's title; null for media.
    body                 text,
    -- The item's own time (Meta's unix `timestamp`), and when the relay stored it.
    sent_at              timestamptz,
    received_at          timestamptz NOT NULL DEFAULT now(),
    -- The item as Meta sent it (the message, status or change value) and the contact entry.
    item                 jsonb NOT NULL,
    contact              jsonb,

    -- Delivery to the local backend: pending until a 2xx. A worker leases a row (lease_until)
    -- while it POSTs; a crashed worker's lease simply expires.
    delivery_state       text NOT NULL DEFAULT 'pending'
                         CHECK (delivery_state IN ('pending', 'delivered')),
    attempts             integer NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    lease_until          timestamptz,
    leased_by            text,
    last_error           text,
    last_attempt_at      timestamptz,
    delivered_at         timestamptz,
    delivered_by         text,

    -- AI fallback (messages only). Null: not considered yet. 'claimed': one relay took it
    -- (at most one ever does); 'sending': the reply is being sent; 'answered': sent (reply
    -- wamid kept); 'skipped': not answered, see ai_note (stale, outside the 24-hour window,
    -- the backend took it first, superseded by a newer message); 'failed': could not send.
    ai_state             text CHECK (ai_state IN ('claimed', 'sending', 'answered', 'skipped', 'failed')),
    ai_by                text,
    ai_at                timestamptz,
    ai_provider          text,
    ai_reply_wamid       text,
    ai_note              text
);

-- The delivery workers' queue: each customer's oldest pending row first.
CREATE INDEX IF NOT EXISTS inbox_pending_idx
    ON bite_sync.inbox (customer, id) WHERE delivery_state = 'pending';
CREATE INDEX IF NOT EXISTS inbox_due_idx
    ON bite_sync.inbox (next_attempt_at) WHERE delivery_state = 'pending';
-- The AI fallback's queue: pending messages nobody has considered yet.
CREATE INDEX IF NOT EXISTS inbox_ai_idx
    ON bite_sync.inbox (received_at) WHERE kind = 'message' AND ai_state IS NULL AND delivery_state = 'pending';
CREATE INDEX IF NOT EXISTS inbox_received_idx ON bite_sync.inbox (received_at DESC);

-- Signed payloads the relay could not read (not JSON, not a WhatsApp envelope, a message
-- without an id…). Answered 200 so Meta does not retry them for a week; kept for a person.
CREATE TABLE IF NOT EXISTS bite_sync.inbox_dead_letters (
    id                   bigserial PRIMARY KEY,
    received_at          timestamptz NOT NULL DEFAULT now(),
    reason               text NOT NULL,
    -- sha256 of the body: a retried dead letter is kept once.
    body_sha256          text NOT NULL UNIQUE,
    body                 bytea NOT NULL
);

-- Every message the relay sent through the Graph API: AI replies and the backend's sends
-- (POST /api/messages).
CREATE TABLE IF NOT EXISTS bite_sync.outbox (
    id                   bigserial PRIMARY KEY,
    created_at           timestamptz NOT NULL DEFAULT now(),
    origin               text NOT NULL CHECK (origin IN ('ai', 'api')),
    in_reply_to          bigint REFERENCES bite_sync.inbox (id) ON DELETE SET NULL,
    recipient            text NOT NULL,
    -- text, template or read.
    kind                 text NOT NULL,
    request              jsonb NOT NULL,
    state                text NOT NULL DEFAULT 'sending' CHECK (state IN ('sending', 'sent', 'failed')),
    wamid                text,
    error                text,
    finished_at          timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_created_idx ON bite_sync.outbox (created_at DESC);

-- Send rate limits shared by every replica: the earliest time the next send to a key may go
-- ('*' the business number as a whole, else a customer). A sender reserves a slot by moving
-- next_at forward and waits until the slot it got.
CREATE TABLE IF NOT EXISTS bite_sync.send_slots (
    key                  text PRIMARY KEY,
    next_at              timestamptz NOT NULL
);

-- Counters that no row of the inbox records (per replica, summed by /api/webhook/status).
CREATE TABLE IF NOT EXISTS bite_sync.relay_counters (
    replica              text PRIMARY KEY,
    duplicates           bigint NOT NULL DEFAULT 0,
    signature_failures   bigint NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
