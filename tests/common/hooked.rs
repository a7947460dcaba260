//! [`HookedStore`]: any store, with faults a test switches on: a commit that fails, commits
//! held back, a commit applied and then reported failed, lease calls that fail.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use skald::ids::{SagaId, SagaType};
use skald::machine::{SagaStatus, Timestamp};
use skald::ports::{
    DeadLetterRecord, JournalEntry, Lease, OutboxMessage, PurgeReport, SagaStore, SagaSummary,
    SagaWrite, StoreError, StoredSaga, WriteOutcome,
};
use tokio::sync::watch;
use uuid::Uuid;

/// A [`SagaStore`] that forwards every call to the store it wraps, except where a hook
/// says otherwise:
///
/// - [`HookedStore::fail_commit`]: the n-th commit fails as "unavailable" (a transient
///   store error), nothing of it applied;
/// - [`HookedStore::close`] / [`HookedStore::open`]: while closed, commits wait;
/// - [`HookedStore::lie_once`]: the next commit of saga writes is applied, then reported
///   failed (a connection lost during COMMIT: the outcome unknown to the caller);
/// - [`HookedStore::fail_leases`]: while set, every lease call fails as "unavailable"
///   (a node that cannot renew its leases, while the rest of the store answers).
pub struct HookedStore {
    inner: Arc<dyn SagaStore>,
    /// Commits called so far, failed or not (counted once the gate lets them through).
    commits: AtomicUsize,
    /// The commit (counted from 1) that fails; 0 for none.
    fail_commit: AtomicUsize,
    /// Whether commits go through (`false`: they wait).
    open: watch::Sender<bool>,
    /// The next commit of saga writes reports failure after it was applied.
    lie: AtomicBool,
    /// Lease calls fail.
    fail_leases: AtomicBool,
}

impl fmt::Debug for HookedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedStore")
            .field("commits", &self.commits)
            .field("fail_commit", &self.fail_commit)
            .field("open", &*self.open.borrow())
            .field("lie", &self.lie)
            .field("fail_leases", &self.fail_leases)
            .finish_non_exhaustive()
    }
}

impl HookedStore {
    /// `inner`, with every hook off (commits open).
    pub fn new(inner: Arc<dyn SagaStore>) -> Arc<HookedStore> {
        Arc::new(HookedStore {
            inner,
            commits: AtomicUsize::new(0),
            fail_commit: AtomicUsize::new(0),
            open: watch::channel(true).0,
            lie: AtomicBool::new(false),
            fail_leases: AtomicBool::new(false),
        })
    }

    /// The `n`-th commit (counted from the first this store was asked for, from 1)
    /// fails as "unavailable" without being applied.
    pub fn fail_commit(&self, n: usize) {
        self.fail_commit.store(n, Ordering::SeqCst);
    }

    /// Commits called so far, failed or not.
    pub fn commits(&self) -> usize {
        self.commits.load(Ordering::SeqCst)
    }

    /// Holds commits back: they wait until [`HookedStore::open`].
    pub fn close(&self) {
        self.open.send_replace(false);
    }

    /// Lets commits through again, the waiting ones first.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// The next commit of saga writes (not one that only deletes published outbox rows)
    /// is applied, then reported as "unavailable".
    pub fn lie_once(&self) {
        self.lie.store(true, Ordering::SeqCst);
    }

    /// While `on`, `acquire_lease`, `acquire_leases`, `release_leases` and `leases` fail
    /// as "unavailable".
    pub fn fail_leases(&self, on: bool) {
        self.fail_leases.store(on, Ordering::SeqCst);
    }

    fn lease_call(&self, what: &str) -> Result<(), StoreError> {
        if self.fail_leases.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(format!("injected: {what} failed")))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl SagaStore for HookedStore {
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        self.inner.load(id).await
    }

    async fn commit(
        &self,
        writes: &[SagaWrite],
        published: &[Uuid],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let _ = self.open.subscribe().wait_for(|open| *open).await;
        let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_commit.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected: connection lost".into()));
        }
        let outcome = self.inner.commit(writes, published).await?;
        if !writes.is_empty() && self.lie.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected: connection lost during COMMIT".into(),
            ));
        }
        Ok(outcome)
    }

    async fn claim_wakeups(
        &self,
        now: Timestamp,
        types: &[(SagaType, u32)],
        partitions: Option<&[u32]>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<SagaId>, StoreError> {
        self.inner
            .claim_wakeups(now, types, partitions, limit, lease)
            .await
    }

    async fn claim_outbox(
        &self,
        now: Timestamp,
        partitions: Option<&[u32]>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        self.inner.claim_outbox(now, partitions, lease, limit).await
    }

    async fn prune_inbox(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.inner.prune_inbox(before).await
    }

    async fn outbox_backlog(&self) -> Result<(u64, Option<Timestamp>), StoreError> {
        self.inner.outbox_backlog().await
    }

    async fn active_sagas(
        &self,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaId>, StoreError> {
        self.inner.active_sagas(after, limit).await
    }

    async fn settled_among(&self, ids: &[SagaId]) -> Result<Vec<SagaId>, StoreError> {
        self.inner.settled_among(ids).await
    }

    async fn unfinished_versions(
        &self,
        types: &[SagaType],
    ) -> Result<Vec<(SagaType, u32, u64)>, StoreError> {
        self.inner.unfinished_versions(types).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.lease_call("acquire_lease")?;
        self.inner.acquire_lease(name, holder, now, lease).await
    }

    async fn acquire_leases(
        &self,
        names: &[String],
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        self.lease_call("acquire_leases")?;
        self.inner.acquire_leases(names, holder, now, lease).await
    }

    async fn release_leases(&self, names: &[String], holder: &str) -> Result<(), StoreError> {
        self.lease_call("release_leases")?;
        self.inner.release_leases(names, holder).await
    }

    async fn leases(&self, prefix: &str, now: Timestamp) -> Result<Vec<Lease>, StoreError> {
        self.lease_call("leases")?;
        self.inner.leases(prefix, now).await
    }

    async fn purge_finished(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<PurgeReport, StoreError> {
        self.inner.purge_finished(before, limit).await
    }

    async fn record_sweep(
        &self,
        name: &str,
        holder: &str,
        at: Timestamp,
        report: &PurgeReport,
    ) -> Result<(), StoreError> {
        self.inner.record_sweep(name, holder, at, report).await
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.shared_secret(name, candidate).await
    }

    async fn record_poison(
        &self,
        record: &DeadLetterRecord,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        self.inner.record_poison(record, outbox).await
    }

    async fn dead_letters(
        &self,
        open_only: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        self.inner.dead_letters(open_only, limit).await
    }

    async fn journal(&self, id: SagaId) -> Result<Vec<JournalEntry>, StoreError> {
        self.inner.journal(id).await
    }

    async fn list(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        self.inner.list(status, after, limit).await
    }

    async fn in_flight_counts(&self) -> Result<Vec<(SagaType, u64)>, StoreError> {
        self.inner.in_flight_counts().await
    }
}
