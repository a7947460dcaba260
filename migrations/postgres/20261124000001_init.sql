-- skald's production store (PostgreSQL). Applied with sqlx::migrate! at start-up.
-- Times are milliseconds since the Unix epoch (bigint), as in the SQLite store.

-- One row per saga instance: the snapshot recovery starts from.
CREATE TABLE saga_instances (
    id                      uuid    PRIMARY KEY,       -- UUID v7 (time-ordered)
    saga_type               text    NOT NULL,
    definition_version      integer NOT NULL,
    status                  text    NOT NULL,          -- running | compensating | completed | compensated | failed
    version                 bigint  NOT NULL,          -- optimistic concurrency: +1 per committed transition
    state_schema            integer NOT NULL DEFAULT 1,
    state                   jsonb   NOT NULL,          -- SagaState
    next_wakeup_ms          bigint,                    -- reply deadline or retry due time; NULL when none
    wakeup_claimed_until_ms bigint,                    -- a process claimed the due wake-up until then
    created_at_ms           bigint  NOT NULL,
    updated_at_ms           bigint  NOT NULL
);

CREATE INDEX saga_instances_wakeup ON saga_instances (next_wakeup_ms) WHERE next_wakeup_ms IS NOT NULL;
CREATE INDEX saga_instances_status ON saga_instances (status, id);

-- Append-only history: every applied or ignored input, with its effects.
CREATE TABLE saga_journal (
    seq            bigserial PRIMARY KEY,
    saga_id        uuid     NOT NULL,
    at_ms          bigint   NOT NULL,
    schema_version integer  NOT NULL,
    kind           text     NOT NULL,                  -- transition | ignored
    body           jsonb    NOT NULL
);

CREATE INDEX saga_journal_saga ON saga_journal (saga_id, seq);

-- Dead-lettered sagas (re-drivable) and poison messages, for operators.
CREATE TABLE dead_letters (
    id             uuid    PRIMARY KEY,
    category       text    NOT NULL,                   -- saga | poison
    saga_id        uuid,
    saga_type      text,
    step           text,
    kind           text,
    reason         text    NOT NULL,
    attempts       integer NOT NULL,
    message        jsonb,                              -- the raw message (poison)
    created_at_ms  bigint  NOT NULL,
    resolved_at_ms bigint                              -- set when re-driven
);

CREATE INDEX dead_letters_created ON dead_letters (created_at_ms);
CREATE INDEX dead_letters_saga ON dead_letters (saga_id);

-- Messages written in the transaction of the state change that caused them, published
-- afterwards (by their writer at once, by a relay if the writer did not). Relays claim
-- rows with FOR UPDATE SKIP LOCKED and a lease (available_at_ms).
CREATE TABLE outbox (
    seq             bigserial PRIMARY KEY,             -- commit order
    id              uuid   NOT NULL UNIQUE,
    saga_id         uuid,
    subject         text   NOT NULL,
    headers         jsonb  NOT NULL,                   -- [[name, value], ...]
    payload         bytea  NOT NULL,
    created_at_ms   bigint NOT NULL,
    available_at_ms bigint NOT NULL
);

CREATE INDEX outbox_available ON outbox (available_at_ms, seq);

-- Ids of consumed messages applied: a redelivery is recognised and dropped.
CREATE TABLE inbox (
    message_id     text   PRIMARY KEY,
    saga_id        uuid,
    received_at_ms bigint NOT NULL
);

CREATE INDEX inbox_received ON inbox (received_at_ms);
