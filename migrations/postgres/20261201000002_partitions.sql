-- Partitioned ownership (issue 16): every saga belongs to one of a fixed number of
-- partitions (SagaId::partition), and each orchestrator node claims the due wake-ups and
-- the outbox rows of the partitions it holds (leases `partition/<n>` in skald_leases).
--
-- partition_no is recorded when a saga is created and never changed after; every outbox
-- row records the partition of the write that stored it. NULL means "no partition": rows
-- written before this migration (existing rows keep NULL, and so does a saga created
-- before it, whatever its later writes say) and a poison message's announcement (it
-- belongs to no saga). Every node claims NULL rows, so nothing written before the
-- upgrade is stranded. A nullable column with no default: adding it rewrites nothing.
ALTER TABLE saga_instances ADD COLUMN partition_no integer;
ALTER TABLE outbox ADD COLUMN partition_no integer;

-- skald_commit (20261124000002_commit_function.sql), now writing the partition: a
-- created saga's row and every outbox row of a write take the write's "partition". The
-- signature is the same (batch jsonb) and a batch without "partition" still commits
-- (its rows get NULL, claimable by every node), so a process of the previous release
-- that runs while this one migrates keeps working. The rules are unchanged:
--   - a write whose inbox id is already recorded is refused whole ('duplicate');
--   - a write whose expected version does not match is refused whole ('conflict'),
--     its inbox entry removed again; a journal-only write checks the version under a
--     share lock;
--   - otherwise its state, journal entries, outbox rows, dead letter and dead-letter
--     resolution are written, and its outcome is the new version.
-- An update never changes partition_no: a saga stays in the partition it was created in.
--
-- batch: {"published": [uuid], "writes": [{
--   "id": uuid, "partition": int4, "expected": int8, "state": jsonb|null, "saga_type",
--   "definition_version", "status", "wake": int8|null, "created": int8, "updated": int8,
--   "journal": [{"at", "schema_version", "kind", "body"}],
--   "outbox": [{"id", "subject", "headers", "payload" (hex), "created", "available"}],
--   "inbox": text|null, "inbox_at": int8, "resolve_at": int8|null,
--   "dead_letter": {"id", "category", "saga_id", "saga_type", "step", "kind", "reason",
--                   "attempts", "message", "at"}|null }]}
-- returns: a JSON array, one element per write: the new version (a number), or
-- "conflict", or "duplicate".
CREATE OR REPLACE FUNCTION skald_commit(batch jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    w        jsonb;
    outcomes jsonb := '[]'::jsonb;
    sid      uuid;
    part     integer;
    expected bigint;
    current  bigint;
    n        bigint;
BEGIN
    IF jsonb_array_length(COALESCE(batch->'published', '[]'::jsonb)) > 0 THEN
        DELETE FROM outbox
         WHERE id IN (SELECT value::uuid FROM jsonb_array_elements_text(batch->'published'));
    END IF;

    FOR w IN SELECT value FROM jsonb_array_elements(batch->'writes') LOOP
        sid := (w->>'id')::uuid;
        part := (w->>'partition')::integer;
        expected := (w->>'expected')::bigint;

        -- The inbox first: a message applied before is refused before anything is
        -- written (a concurrent insert of the same id waits for the other's commit).
        IF w->>'inbox' IS NOT NULL THEN
            INSERT INTO inbox (message_id, saga_id, received_at_ms)
            VALUES (w->>'inbox', sid, (w->>'inbox_at')::bigint)
            ON CONFLICT (message_id) DO NOTHING;
            GET DIAGNOSTICS n = ROW_COUNT;
            IF n = 0 THEN
                outcomes := outcomes || to_jsonb('duplicate'::text);
                CONTINUE;
            END IF;
        END IF;

        IF w->'state' IS NULL OR jsonb_typeof(w->'state') = 'null' THEN
            -- Journal only (an ignored input): valid only on the version the writer
            -- read, held until the commit.
            SELECT version INTO current FROM saga_instances WHERE id = sid FOR SHARE;
            n := CASE WHEN current IS NOT DISTINCT FROM expected THEN 1 ELSE 0 END;
        ELSIF expected = 0 THEN
            INSERT INTO saga_instances (id, saga_type, definition_version, status, version,
                                        state, next_wakeup_ms, created_at_ms, updated_at_ms,
                                        partition_no)
            VALUES (sid, w->>'saga_type', (w->>'definition_version')::int, w->>'status', 1,
                    w->'state', (w->>'wake')::bigint, (w->>'created')::bigint,
                    (w->>'updated')::bigint, part)
            ON CONFLICT (id) DO NOTHING;
            GET DIAGNOSTICS n = ROW_COUNT;
        ELSE
            -- A state change ends any claim on the old wake-up; the partition stays.
            UPDATE saga_instances
               SET status = w->>'status', version = expected + 1, state = w->'state',
                   next_wakeup_ms = (w->>'wake')::bigint, wakeup_claimed_until_ms = NULL,
                   updated_at_ms = (w->>'updated')::bigint
             WHERE id = sid AND version = expected;
            GET DIAGNOSTICS n = ROW_COUNT;
        END IF;

        IF n = 0 THEN
            -- Nothing of a conflicting write may stay, its inbox entry included.
            IF w->>'inbox' IS NOT NULL THEN
                DELETE FROM inbox WHERE message_id = w->>'inbox';
            END IF;
            outcomes := outcomes || to_jsonb('conflict'::text);
            CONTINUE;
        END IF;

        INSERT INTO saga_journal (saga_id, at_ms, schema_version, kind, body)
        SELECT sid, (j->>'at')::bigint, (j->>'schema_version')::int, j->>'kind', j->'body'
          FROM jsonb_array_elements(w->'journal') WITH ORDINALITY AS e(j, i)
         ORDER BY i;

        INSERT INTO outbox (id, saga_id, subject, headers, payload, created_at_ms,
                            available_at_ms, partition_no)
        SELECT (o->>'id')::uuid, sid, o->>'subject', o->'headers', decode(o->>'payload', 'hex'),
               (o->>'created')::bigint, (o->>'available')::bigint, part
          FROM jsonb_array_elements(w->'outbox') WITH ORDINALITY AS e(o, i)
         ORDER BY i;

        IF w->>'resolve_at' IS NOT NULL THEN
            UPDATE dead_letters SET resolved_at_ms = (w->>'resolve_at')::bigint
             WHERE saga_id = sid AND category = 'saga' AND resolved_at_ms IS NULL;
        END IF;

        IF w->'dead_letter' IS NOT NULL AND jsonb_typeof(w->'dead_letter') = 'object' THEN
            INSERT INTO dead_letters (id, category, saga_id, saga_type, step, kind, reason,
                                      attempts, message, created_at_ms)
            SELECT (d->>'id')::uuid, d->>'category', (d->>'saga_id')::uuid, d->>'saga_type',
                   d->>'step', d->>'kind', d->>'reason', (d->>'attempts')::int,
                   CASE WHEN jsonb_typeof(d->'message') = 'null' THEN NULL ELSE d->'message' END,
                   (d->>'at')::bigint
              FROM (SELECT w->'dead_letter' AS d) AS x;
        END IF;

        outcomes := outcomes || to_jsonb(CASE WHEN w->'state' IS NULL
                                               OR jsonb_typeof(w->'state') = 'null'
                                              THEN expected ELSE expected + 1 END);
    END LOOP;
    RETURN outcomes;
END;
$$;
