-- Secrets every process sharing the store agrees on with no configuration (the key of
-- the reply tokens): the first process to ask stores its candidate (insert-if-absent),
-- every later one reads the stored value. A row is never updated.

CREATE TABLE skald_secrets (
    name          text    PRIMARY KEY,  -- what the secret is for (`reply-token`)
    value         bytea   NOT NULL,
    created_at_ms bigint  NOT NULL
);
