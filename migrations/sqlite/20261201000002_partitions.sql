-- Partitioned ownership (issue 16): every saga belongs to one of a fixed number of
-- partitions (SagaId::partition), and each orchestrator node claims the due wake-ups and
-- the outbox rows of the partitions it holds (leases `partition/<n>` in skald_leases).
--
-- partition_no is recorded when a saga is created and never changed after; every outbox
-- row records the partition of the write that stored it. NULL means "no partition": rows
-- written before this migration (existing rows keep NULL, and so does a saga created
-- before it, whatever its later writes say) and a poison message's announcement (it
-- belongs to no saga). Every node claims NULL rows, so nothing written before the
-- upgrade is stranded.
ALTER TABLE saga_instances ADD COLUMN partition_no INTEGER;
ALTER TABLE outbox ADD COLUMN partition_no INTEGER;
