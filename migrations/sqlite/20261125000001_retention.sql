-- Retention: finished sagas are deleted after a retention period by one sweeper at a time
-- (a lease), which also trims the inbox; what it did is kept for `skald stats`.

CREATE TABLE skald_leases (
    name     TEXT    PRIMARY KEY NOT NULL,  -- what the lease is for (`retention`)
    holder   TEXT    NOT NULL,              -- the process holding it
    until_ms INTEGER NOT NULL               -- free after this time
) STRICT;

CREATE TABLE skald_sweeps (
    name                 TEXT    NOT NULL,
    holder               TEXT    NOT NULL,  -- the process that ran it last
    runs                 INTEGER NOT NULL,
    last_run_ms          INTEGER NOT NULL,
    sagas_deleted        INTEGER NOT NULL,
    journal_deleted      INTEGER NOT NULL,
    dead_letters_deleted INTEGER NOT NULL,
    inbox_deleted        INTEGER NOT NULL,
    PRIMARY KEY (name)
) STRICT;

CREATE INDEX saga_instances_finished ON saga_instances (updated_at_ms)
    WHERE status IN ('completed', 'compensated');
