-- bite-sync bookkeeping on the mirror, version 6: Meta's text kept, coexistence echoes, and
-- customers who change their number or user id.

-- Meta's envelope narrowed to the row's one item, exactly as Meta sent it otherwise (numbers,
-- escapes and fields nobody here knows). Delivery sends it; `item`, `metadata` and `contact`
-- stay as the queryable rendering (jsonb refuses \u0000 and lone surrogates, which this keeps).
-- Null on rows stored before version 6: delivery then rebuilds the envelope from the jsonb.
ALTER TABLE bite_sync.inbox ADD COLUMN IF NOT EXISTS envelope text;

-- 'echo': a message staff sent from the WhatsApp Business app (smb_message_echoes).
ALTER TABLE bite_sync.inbox DROP CONSTRAINT IF EXISTS inbox_kind_check;
ALTER TABLE bite_sync.inbox ADD CONSTRAINT inbox_kind_check
    CHECK (kind IN ('message', 'status', 'echo', 'change'));
-- 'staff': staff answered from the WhatsApp Business app before the AI fallback did.
ALTER TABLE bite_sync.inbox DROP CONSTRAINT IF EXISTS inbox_ai_state_check;
ALTER TABLE bite_sync.inbox ADD CONSTRAINT inbox_ai_state_check
    CHECK (ai_state IN ('claimed', 'sending', 'answered', 'skipped', 'failed', 'staff'));

-- Every identifier a customer has been seen with (their phone numbers and business-scoped user
-- ids) → the inbox's `customer` key they were first stored under. A phone number change or a
-- user id change (system messages), or a username user who later shows a phone, keeps one key:
-- one delivery order, one AI burst, one AI context. Rows are only ever added.
CREATE TABLE IF NOT EXISTS bite_sync.customer_aliases (
    alias                text PRIMARY KEY,
    customer             text NOT NULL,
    kind                 text NOT NULL CHECK (kind IN ('phone', 'user_id')),
    seen_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS customer_aliases_customer_idx
    ON bite_sync.customer_aliases (customer);
