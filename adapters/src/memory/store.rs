//! An in-memory [`SagaStore`]: the same contract as the SQL stores, nothing durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use skald_runtime::ids::{SagaId, SagaType};
use skald_runtime::machine::{SagaStatus, Timestamp};
use skald_runtime::ports::{
    DeadLetterCategory, DeadLetterQuery, DeadLetterRecord, JournalEntry, Lease, MAX_QUERY_ROWS,
    OutboxMessage, PurgeReport, SagaOrder, SagaQueries, SagaQuery, SagaStore, SagaSummary,
    SagaWrite, StatusCount, StoreError, StoreStats, StoredSaga, SweepStats, WriteOutcome,
};
use uuid::Uuid;

#[derive(Default)]
struct Data {
    // BTreeMap: id order, the stable order `list` and `active_sagas` page in (not time
    // order: keyed ids are version 8, hashes of their key).
    sagas: BTreeMap<SagaId, StoredSaga>,
    /// Each saga's partition, recorded when it is created and never changed.
    partitions: HashMap<SagaId, u32>,
    journal: HashMap<SagaId, Vec<JournalEntry>>,
    dead_letters: Vec<(DeadLetterRecord, Option<Timestamp>)>,
    /// Unpublished rows by sequence (commit order), with their partition (none for a
    /// poison message's announcement: anyone's).
    outbox: BTreeMap<u64, (OutboxMessage, Option<u32>)>,
    outbox_seq: u64,
    /// Consumed message ids and when they were recorded.
    inbox: HashMap<String, Timestamp>,
    /// Claimed wake-ups: until when. Cleared by the saga's next state change.
    wake_claims: HashMap<SagaId, Timestamp>,
    /// Leases: holder and until when.
    leases: HashMap<String, (String, Timestamp)>,
    /// Sweeper totals per name.
    sweeps: BTreeMap<String, SweepStats>,
    /// Shared secrets by name (never replaced once stored).
    secrets: HashMap<String, Vec<u8>>,
}

/// The in-memory store. Cheap to clone; clones share data (so a test can "restart" a
/// runtime on the same store).
#[derive(Clone, Default)]
pub struct MemoryStore {
    // A std mutex: every operation is a short critical section with no await.
    data: Arc<Mutex<Data>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Data>, StoreError> {
        self.data
            .lock()
            .map_err(|_| StoreError::Other("memory store lock poisoned".into()))
    }
}

/// Whether a row of `partition` (`None`: no partition, anyone's) is among `partitions`
/// (`None`: every one).
fn in_partitions(partition: Option<u32>, partitions: Option<&[u32]>) -> bool {
    match (partition, partitions) {
        (Some(p), Some(ps)) => ps.contains(&p),
        _ => true,
    }
}

fn is_active(status: SagaStatus) -> bool {
    matches!(status, SagaStatus::Running | SagaStatus::Compensating)
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        Ok(self.lock()?.sagas.get(&id).cloned())
    }

    async fn commit(
        &self,
        writes: &[SagaWrite],
        published: &[Uuid],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let mut data = self.lock()?;
        let data = &mut *data;
        if !published.is_empty() {
            data.outbox.retain(|_, (m, _)| !published.contains(&m.id));
        }
        let mut outcomes = Vec::with_capacity(writes.len());
        for w in writes {
            if let Some(id) = &w.inbox
                && data.inbox.contains_key(id)
            {
                outcomes.push(WriteOutcome::Duplicate);
                continue;
            }
            let current = data.sagas.get(&w.id).map(|s| s.version).unwrap_or(0);
            let version = match &w.state {
                Some(state) => {
                    if current != w.expected_version {
                        outcomes.push(WriteOutcome::Conflict);
                        continue;
                    }
                    let version = current + 1;
                    data.wake_claims.remove(&w.id);
                    // Created: in the write's partition, for good.
                    data.partitions.entry(w.id).or_insert(w.partition);
                    data.sagas.insert(
                        w.id,
                        StoredSaga {
                            state: state.clone(),
                            version,
                        },
                    );
                    version
                }
                None => {
                    // Journal only: valid only on the version the writer read.
                    if current != w.expected_version {
                        outcomes.push(WriteOutcome::Conflict);
                        continue;
                    }
                    current
                }
            };
            data.journal
                .entry(w.id)
                .or_default()
                .extend(w.journal.iter().cloned());
            if w.resolve_dead_letters {
                let now = w.journal.first().map(|j| j.at).unwrap_or_default();
                for (record, resolved) in data.dead_letters.iter_mut() {
                    if record.saga_id == Some(w.id)
                        && record.category == DeadLetterCategory::Saga
                        && resolved.is_none()
                    {
                        *resolved = Some(now);
                    }
                }
            }
            if let Some(dl) = &w.dead_letter {
                data.dead_letters.push((dl.clone(), None));
            }
            for m in &w.outbox {
                data.outbox_seq += 1;
                data.outbox
                    .insert(data.outbox_seq, (m.clone(), Some(w.partition)));
            }
            if let Some(id) = &w.inbox {
                let at = w.journal.first().map(|j| j.at).unwrap_or_default();
                data.inbox.insert(id.clone(), at);
            }
            outcomes.push(WriteOutcome::Committed { version });
        }
        Ok(outcomes)
    }

    async fn claim_wakeups(
        &self,
        now: Timestamp,
        types: &[(SagaType, u32)],
        partitions: Option<&[u32]>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<SagaId>, StoreError> {
        let mut data = self.lock()?;
        let data = &mut *data;
        let claims = &data.wake_claims;
        let of = &data.partitions;
        let mut due: Vec<(Timestamp, SagaId)> = data
            .sagas
            .values()
            .filter(|s| {
                types
                    .iter()
                    .any(|(t, v)| *t == s.state.saga_type && *v == s.state.definition_version)
            })
            .filter(|s| claims.get(&s.state.id).is_none_or(|until| *until <= now))
            .filter(|s| in_partitions(of.get(&s.state.id).copied(), partitions))
            .filter_map(|s| {
                s.state
                    .wake_at()
                    .filter(|at| *at <= now)
                    .map(|at| (at, s.state.id))
            })
            .collect();
        due.sort();
        due.truncate(limit);
        let until = now.plus(lease);
        for (_, id) in &due {
            data.wake_claims.insert(*id, until);
        }
        Ok(due.into_iter().map(|(_, id)| id).collect())
    }

    async fn claim_outbox(
        &self,
        now: Timestamp,
        partitions: Option<&[u32]>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut data = self.lock()?;
        let until = now.plus(lease);
        Ok(data
            .outbox
            .values_mut()
            .filter(|(m, p)| m.available_at <= now && in_partitions(*p, partitions))
            .map(|(m, _)| m)
            .take(limit)
            .map(|m| {
                m.available_at = until;
                m.clone()
            })
            .collect())
    }

    async fn prune_inbox(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut data = self.lock()?;
        let n = data.inbox.len();
        data.inbox.retain(|_, at| *at >= before);
        Ok((n - data.inbox.len()) as u64)
    }

    async fn outbox_backlog(&self) -> Result<(u64, Option<Timestamp>), StoreError> {
        let data = self.lock()?;
        let oldest = data
            .outbox
            .values()
            .next()
            .map(|(m, _)| crate::created_at(m.id));
        Ok((data.outbox.len() as u64, oldest))
    }

    async fn active_sagas(
        &self,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaId>, StoreError> {
        let data = self.lock()?;
        Ok(data
            .sagas
            .iter()
            .filter(|(id, s)| after.is_none_or(|a| **id > a) && is_active(s.state.status))
            .take(limit)
            .map(|(id, _)| *id)
            .collect())
    }

    async fn unfinished_versions(
        &self,
        types: &[SagaType],
    ) -> Result<Vec<(SagaType, u32, u64)>, StoreError> {
        let data = self.lock()?;
        let mut counts: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for s in data.sagas.values() {
            let st = &s.state;
            if !st.status.is_terminal() && types.contains(&st.saga_type) {
                *counts
                    .entry((st.saga_type.to_string(), st.definition_version))
                    .or_default() += 1;
            }
        }
        counts
            .into_iter()
            .map(|((t, v), n)| {
                Ok((
                    SagaType::new(t).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    v,
                    n,
                ))
            })
            .collect()
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut data = self.lock()?;
        let free = data
            .leases
            .get(name)
            .is_none_or(|(h, until)| h == holder || *until < now);
        if free {
            data.leases
                .insert(name.to_owned(), (holder.to_owned(), now.plus(lease)));
        }
        Ok(free)
    }

    async fn acquire_leases(
        &self,
        names: &[String],
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let mut data = self.lock()?;
        let mut held: Vec<String> = Vec::with_capacity(names.len());
        // Each name once, as the SQL stores take them.
        let names: std::collections::BTreeSet<&String> = names.iter().collect();
        for name in names {
            let free = data
                .leases
                .get(name)
                .is_none_or(|(h, until)| h == holder || *until < now);
            if free {
                data.leases
                    .insert(name.clone(), (holder.to_owned(), now.plus(lease)));
                held.push(name.clone());
            }
        }
        Ok(held)
    }

    async fn release_leases(&self, names: &[String], holder: &str) -> Result<(), StoreError> {
        let mut data = self.lock()?;
        data.leases
            .retain(|name, (h, _)| h != holder || !names.contains(name));
        Ok(())
    }

    async fn leases(&self, prefix: &str, now: Timestamp) -> Result<Vec<Lease>, StoreError> {
        let data = self.lock()?;
        let mut held: Vec<Lease> = data
            .leases
            .iter()
            .filter(|(name, (_, until))| name.starts_with(prefix) && *until >= now)
            .map(|(name, (holder, until))| Lease {
                name: name.clone(),
                holder: holder.clone(),
                until: *until,
            })
            .collect();
        held.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(held)
    }

    async fn purge_finished(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<PurgeReport, StoreError> {
        let mut data = self.lock()?;
        let mut old: Vec<(Timestamp, SagaId)> = data
            .sagas
            .values()
            // Keyed sagas (version-8 ids) are never purged: a business key names one
            // saga for good (see `SagaStore::purge_finished`).
            .filter(|s| {
                s.state.status.is_terminal()
                    && s.state.updated_at < before
                    && s.state.id.as_uuid().get_version_num() != 8
            })
            .map(|s| (s.state.updated_at, s.state.id))
            .collect();
        old.sort();
        old.truncate(limit);
        let mut report = PurgeReport::default();
        for (_, id) in old {
            data.sagas.remove(&id);
            data.partitions.remove(&id);
            report.sagas += 1;
            report.journal_entries += data.journal.remove(&id).map_or(0, |j| j.len() as u64);
            let before_len = data.dead_letters.len();
            data.dead_letters.retain(|(r, _)| r.saga_id != Some(id));
            report.dead_letters += (before_len - data.dead_letters.len()) as u64;
        }
        // Poison records of no saga (or of one deleted since), as old: bounded alike,
        // oldest first.
        let mut orphans: Vec<(Timestamp, Uuid)> = data
            .dead_letters
            .iter()
            .filter(|(r, _)| {
                r.category == DeadLetterCategory::Poison
                    && r.at < before
                    && r.saga_id.is_none_or(|s| !data.sagas.contains_key(&s))
            })
            .map(|(r, _)| (r.at, r.id))
            .collect();
        orphans.sort();
        orphans.truncate(limit);
        if !orphans.is_empty() {
            let gone: std::collections::HashSet<Uuid> =
                orphans.into_iter().map(|(_, id)| id).collect();
            let before_len = data.dead_letters.len();
            data.dead_letters.retain(|(r, _)| !gone.contains(&r.id));
            report.dead_letters += (before_len - data.dead_letters.len()) as u64;
        }
        Ok(report)
    }

    async fn record_sweep(
        &self,
        name: &str,
        holder: &str,
        at: Timestamp,
        report: &PurgeReport,
    ) -> Result<(), StoreError> {
        let mut data = self.lock()?;
        let entry = data
            .sweeps
            .entry(name.to_owned())
            .or_insert_with(|| SweepStats {
                name: name.to_owned(),
                holder: holder.to_owned(),
                runs: 0,
                last_run: at,
                deleted: PurgeReport::default(),
            });
        entry.runs += 1;
        entry.last_run = at;
        holder.clone_into(&mut entry.holder);
        entry.deleted.add(report);
        Ok(())
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        if candidate.is_empty() {
            return Err(StoreError::Other(format!(
                "the candidate for the shared secret {name:?} is empty"
            )));
        }
        let mut data = self.lock()?;
        Ok(data
            .secrets
            .entry(name.to_owned())
            .or_insert_with(|| candidate.to_vec())
            .clone())
    }

    async fn record_poison(
        &self,
        record: &DeadLetterRecord,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let mut data = self.lock()?;
        data.dead_letters.push((record.clone(), None));
        // No partition: every node may publish a poison message's announcement.
        for m in outbox {
            data.outbox_seq += 1;
            let seq = data.outbox_seq;
            data.outbox.insert(seq, (m.clone(), None));
        }
        Ok(())
    }

    async fn dead_letters(
        &self,
        open_only: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let data = self.lock()?;
        Ok(data
            .dead_letters
            .iter()
            .rev()
            .filter(|(_, resolved)| !open_only || resolved.is_none())
            .take(limit)
            .map(with_resolution)
            .collect())
    }

    async fn journal(&self, id: SagaId) -> Result<Vec<JournalEntry>, StoreError> {
        Ok(self.lock()?.journal.get(&id).cloned().unwrap_or_default())
    }

    async fn list(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        let data = self.lock()?;
        Ok(data
            .sagas
            .iter()
            .filter(|(id, s)| {
                after.is_none_or(|a| **id > a) && status.is_none_or(|st| s.state.status == st)
            })
            .take(limit)
            .map(|(_, s)| SagaSummary {
                id: s.state.id,
                saga_type: s.state.saga_type.clone(),
                status: s.state.status,
                created_at: s.state.created_at,
                updated_at: s.state.updated_at,
            })
            .collect())
    }
}

fn with_resolution((record, resolved): &(DeadLetterRecord, Option<Timestamp>)) -> DeadLetterRecord {
    DeadLetterRecord {
        resolved_at: *resolved,
        ..record.clone()
    }
}

#[async_trait]
impl SagaQueries for MemoryStore {
    async fn query(&self, q: &SagaQuery) -> Result<Vec<StoredSaga>, StoreError> {
        let data = self.lock()?;
        let mut found: Vec<StoredSaga> = data
            .sagas
            .values()
            .filter(|s| {
                let st = &s.state;
                (q.statuses.is_empty() || q.statuses.contains(&st.status))
                    && q.saga_type.as_ref().is_none_or(|t| *t == st.saga_type)
                    && q.definition_version
                        .is_none_or(|v| v == st.definition_version)
                    && q.created_after.is_none_or(|t| st.created_at >= t)
                    && q.updated_before.is_none_or(|t| st.updated_at < t)
            })
            .cloned()
            .collect();
        match q.order {
            SagaOrder::LeastRecentlyUpdated => {
                found.sort_by_key(|s| (s.state.updated_at, s.state.id));
            }
            // Newest first by creation time (ids are no time order), the id breaks ties.
            _ => found.sort_by_key(|s| std::cmp::Reverse((s.state.created_at, s.state.id))),
        }
        found.truncate(q.limit.min(MAX_QUERY_ROWS));
        Ok(found)
    }

    async fn stats(&self, since: Timestamp) -> Result<StoreStats, StoreError> {
        let data = self.lock()?;
        let mut counts: BTreeMap<(String, u32, &'static str), (SagaStatus, u64)> = BTreeMap::new();
        let (mut started, mut finished) = (0, 0);
        let mut oldest: Option<&StoredSaga> = None;
        for s in data.sagas.values() {
            let st = &s.state;
            counts
                .entry((
                    st.saga_type.to_string(),
                    st.definition_version,
                    st.status.as_str(),
                ))
                .or_insert((st.status, 0))
                .1 += 1;
            started += u64::from(st.created_at >= since);
            finished += u64::from(st.status.is_terminal() && st.updated_at >= since);
            if is_active(st.status)
                && oldest.is_none_or(|o| (st.created_at, st.id) < (o.state.created_at, o.state.id))
            {
                oldest = Some(s);
            }
        }
        Ok(StoreStats {
            counts: counts
                .into_iter()
                .map(
                    |((saga_type, definition_version, _), (status, count))| StatusCount {
                        saga_type,
                        definition_version,
                        status,
                        count,
                    },
                )
                .collect(),
            started_since: started,
            finished_since: finished,
            oldest_active: oldest.map(|s| {
                (
                    s.state.id,
                    s.state.saga_type.to_string(),
                    s.state.created_at,
                )
            }),
            outbox_backlog: data.outbox.len() as u64,
            outbox_oldest: data
                .outbox
                .values()
                .next()
                .map(|(m, _)| crate::created_at(m.id)),
            open_dead_letters: data
                .dead_letters
                .iter()
                .filter(|(_, resolved)| resolved.is_none())
                .count() as u64,
            sweeps: data.sweeps.values().cloned().collect(),
        })
    }

    async fn find_dead_letters(
        &self,
        q: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let data = self.lock()?;
        Ok(data
            .dead_letters
            .iter()
            .rev()
            .filter(|(r, resolved)| {
                (!q.open_only || resolved.is_none())
                    && q.saga_type
                        .as_ref()
                        .is_none_or(|t| r.saga_type.as_ref() == Some(t))
                    && q.category.is_none_or(|c| r.category == c)
            })
            .take(q.limit.min(MAX_QUERY_ROWS))
            .map(with_resolution)
            .collect())
    }

    async fn dead_letters_of(&self, id: Uuid) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let data = self.lock()?;
        Ok(data
            .dead_letters
            .iter()
            .rev()
            .filter(|(r, _)| r.id == id || r.saga_id.is_some_and(|s| *s.as_uuid() == id))
            .map(with_resolution)
            .collect())
    }
}
