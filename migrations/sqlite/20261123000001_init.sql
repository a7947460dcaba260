-- skald's embedded store (SQLite). Applied with sqlx::migrate! at start-up.

-- One row per saga instance: the snapshot recovery starts from.
CREATE TABLE saga_instances (
    id                 TEXT    PRIMARY KEY NOT NULL,  -- UUID v7 (time-ordered)
    saga_type          TEXT    NOT NULL,
    definition_version INTEGER NOT NULL,
    status             TEXT    NOT NULL,              -- running | compensating | completed | compensated | failed
    version            INTEGER NOT NULL,              -- optimistic concurrency: +1 per committed transition
    state_schema       INTEGER NOT NULL DEFAULT 1,    -- shape of `state`
    state              TEXT    NOT NULL,              -- SagaState as JSON
    next_wakeup_ms     INTEGER,                       -- reply deadline or retry due time; NULL when none
    created_at_ms      INTEGER NOT NULL,
    updated_at_ms      INTEGER NOT NULL
) STRICT;

CREATE INDEX saga_instances_wakeup ON saga_instances (next_wakeup_ms) WHERE next_wakeup_ms IS NOT NULL;
CREATE INDEX saga_instances_status ON saga_instances (status, id);

-- Append-only history: every applied or ignored input, with its effects.
CREATE TABLE saga_journal (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id        TEXT    NOT NULL,
    at_ms          INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    kind           TEXT    NOT NULL,                  -- transition | ignored
    body           TEXT    NOT NULL                   -- JSON
) STRICT;

CREATE INDEX saga_journal_saga ON saga_journal (saga_id, seq);

-- Dead-lettered sagas (re-drivable) and poison messages, for operators.
CREATE TABLE dead_letters (
    id             TEXT    PRIMARY KEY NOT NULL,
    category       TEXT    NOT NULL,                  -- saga | poison
    saga_id        TEXT,
    saga_type      TEXT,
    step           TEXT,
    kind           TEXT,
    reason         TEXT    NOT NULL,
    attempts       INTEGER NOT NULL,
    message        TEXT,                              -- the raw message (poison), JSON
    created_at_ms  INTEGER NOT NULL,
    resolved_at_ms INTEGER                            -- set when re-driven
) STRICT;

CREATE INDEX dead_letters_created ON dead_letters (created_at_ms);
CREATE INDEX dead_letters_saga ON dead_letters (saga_id);
