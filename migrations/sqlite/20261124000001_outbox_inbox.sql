-- The transactional outbox and inbox, and claims on due wake-ups (several processes may
-- share one store).

-- Set by a process that claimed the saga's due wake-up; cleared by its next state change.
ALTER TABLE saga_instances ADD COLUMN wakeup_claimed_until_ms INTEGER;

-- Messages written in the transaction of the state change that caused them, published
-- afterwards (by their writer at once, by a relay if the writer did not).
CREATE TABLE outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- commit order
    id              TEXT    NOT NULL UNIQUE,            -- UUID v7
    saga_id         TEXT,
    subject         TEXT    NOT NULL,
    headers         TEXT    NOT NULL,                   -- JSON [[name, value], ...]
    payload         BLOB    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    available_at_ms INTEGER NOT NULL                    -- no relay claims it before
) STRICT;

CREATE INDEX outbox_available ON outbox (available_at_ms, seq);

-- Ids of consumed messages applied: a redelivery is recognised and dropped.
CREATE TABLE inbox (
    message_id     TEXT    PRIMARY KEY NOT NULL,
    saga_id        TEXT,
    received_at_ms INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX inbox_received ON inbox (received_at_ms);
