-- Keyed sagas (version-8 ids, SagaId::for_key) are never purged. The purge's batch is
-- read through this index: finished rows that are not keyed, oldest first, so kept keyed
-- rows are never read past (the condition is the purge's own, `sql::unkeyed!`, to the
-- letter).
CREATE INDEX saga_instances_purgeable ON saga_instances (updated_at_ms)
    WHERE status IN ('completed', 'compensated') AND substr(id, 15, 1) <> '8';

-- Newest first by creation time (skald sagas; keyed ids are not time-ordered).
CREATE INDEX saga_instances_created ON saga_instances (created_at_ms, id);
