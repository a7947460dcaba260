//! An in-memory [`SagaStore`]: the same contract as the SQL stores, nothing durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use skald_runtime::ids::{SagaId, SagaType};
use skald_runtime::machine::{SagaStatus, Timestamp};
use skald_runtime::ports::{
    DeadLetterCategory, DeadLetterRecord, JournalEntry, SagaStore, SagaSummary, SagaWrite,
    StoreError, StoredSaga, WriteOutcome,
};

#[derive(Default)]
struct Data {
    // BTreeMap: id order for paging (v7 ids are time-ordered).
    sagas: BTreeMap<SagaId, StoredSaga>,
    journal: HashMap<SagaId, Vec<JournalEntry>>,
    dead_letters: Vec<(DeadLetterRecord, Option<Timestamp>)>,
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

fn is_active(status: SagaStatus) -> bool {
    matches!(status, SagaStatus::Running | SagaStatus::Compensating)
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        Ok(self.lock()?.sagas.get(&id).cloned())
    }

    async fn commit(&self, writes: &[SagaWrite]) -> Result<Vec<WriteOutcome>, StoreError> {
        let mut data = self.lock()?;
        let mut outcomes = Vec::with_capacity(writes.len());
        for w in writes {
            let current = data.sagas.get(&w.id).map(|s| s.version).unwrap_or(0);
            let version = match &w.state {
                Some(state) => {
                    if current != w.expected_version {
                        outcomes.push(WriteOutcome::Conflict);
                        continue;
                    }
                    let version = current + 1;
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
            outcomes.push(WriteOutcome::Committed { version });
        }
        Ok(outcomes)
    }

    async fn due_wakeups(
        &self,
        now: Timestamp,
        types: &[(SagaType, u32)],
        limit: usize,
    ) -> Result<Vec<SagaId>, StoreError> {
        let data = self.lock()?;
        let mut due: Vec<(Timestamp, SagaId)> = data
            .sagas
            .values()
            .filter(|s| {
                types
                    .iter()
                    .any(|(t, v)| *t == s.state.saga_type && *v == s.state.definition_version)
            })
            .filter_map(|s| {
                s.state
                    .wake_at()
                    .filter(|at| *at <= now)
                    .map(|at| (at, s.state.id))
            })
            .collect();
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, id)| id).collect())
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

    async fn record_poison(&self, record: &DeadLetterRecord) -> Result<(), StoreError> {
        self.lock()?.dead_letters.push((record.clone(), None));
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
            .map(|(r, _)| r.clone())
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
