-- Retention: finished sagas are deleted after a retention period by one sweeper at a time
-- (a lease), which also trims the inbox; what it did is kept for `skald stats`.

CREATE TABLE skald_leases (
    name     text    PRIMARY KEY,  -- what the lease is for (`retention`)
    holder   text    NOT NULL,              -- the process holding it
    until_ms bigint  NOT NULL               -- free after this time
);

CREATE TABLE skald_sweeps (
    name                 text    NOT NULL,
    holder               text    NOT NULL,  -- the process that ran it last
    runs                 bigint  NOT NULL,
    last_run_ms          bigint  NOT NULL,
    sagas_deleted        bigint  NOT NULL,
    journal_deleted      bigint  NOT NULL,
    dead_letters_deleted bigint  NOT NULL,
    inbox_deleted        bigint  NOT NULL,
    PRIMARY KEY (name)
);

CREATE INDEX saga_instances_finished ON saga_instances (updated_at_ms)
    WHERE status IN ('completed', 'compensated');
