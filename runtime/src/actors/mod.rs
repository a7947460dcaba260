//! The actix shell around the pure machine.
//!
//! - [`SagaInstance`] (`instance.rs`): one actor per live saga. It owns the saga's
//!   state; everyone else sends it typed messages. It has each input's write decided,
//!   commits it (through the group [`Committer`]), then performs the effects
//!   (publishes), then answers, so the caller acknowledges the inbound message only
//!   after the commit. It arms its own wake-up timer and passivates when idle.
//! - `decide.rs`: the pure half of applying an input: from the definition, the stored
//!   saga, the input and the time, the write to commit (state, journal, dead letter,
//!   outbox) and what follows it. No actix; unit-tested there.
//! - `publisher.rs`: the task publishing each committed transition's messages in
//!   commit order, and reporting the stored ones published.
//! - [`Registry`] (`registry.rs`): routes to instance actors, activating them from the
//!   store on demand (spread over one arbiter per core) and forgetting passivated or
//!   crashed ones.
//! - [`WakeupSweeper`] (`wakeups.rs`): sweeps the store for due wake-ups (retries and
//!   reply deadlines) of sagas that are not in memory, so a passivated or crashed saga
//!   still retries on time. Crash restarts are actix `Supervisor`s around each
//!   instance; a panicking handler kills its actor, which the registry notices and
//!   re-activates.
//! - this file: what they share ([`Shared`], the registered definitions), the outcome
//!   fan-out ([`OutcomeHub`]) and the counters ([`RuntimeStats`]).
//!
//! I/O (store, bus) runs on the I/O runtime given at start-up, never on an arbiter's
//! runtime: a connection opened inside an arbiter fails once that arbiter stops.

mod decide;
mod instance;
mod publisher;
mod registry;
mod wakeups;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

pub use decide::Condition;
pub(crate) use decide::{Decider, Then};
pub use instance::{Applied, Apply, SagaInstance, Wake};
pub(crate) use publisher::{publish_outbox, publisher};
pub use registry::{Lookup, Registry, ReleasePartition};
pub(crate) use wakeups::SweepNow;
pub use wakeups::WakeupSweeper;

use crate::committer::Committer;
use crate::definition::Definition;
use crate::error::RuntimeError;
use crate::ids::{SagaId, SagaType};
use crate::machine::{SagaStatus, Timestamp};
use crate::ports::{Bus, Clock, JitterSource, SagaStore};
use crate::runtime::RuntimeOptions;

/// A saga that settled: finished (`Completed`, `Compensated`) or dead-lettered
/// (`Failed`, waiting for an operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaOutcome {
    /// The saga.
    pub id: SagaId,
    /// Its type.
    pub saga_type: SagaType,
    /// `Completed`, `Compensated` or `Failed`.
    pub status: SagaStatus,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it settled.
    pub at: Timestamp,
    /// Compensation began around a step whose outcome was unknown (it timed out on every
    /// attempt, or a cancel cut it short): that step was compensated too (or, with no
    /// compensation, the saga was dead-lettered).
    pub in_doubt: bool,
}

/// Fans settled-saga notifications out to in-process subscribers, and wakes the saga
/// handles waiting for one saga ([`OutcomeHub::watch`]).
#[derive(Debug, Default)]
pub struct OutcomeHub {
    // A std mutex: held only to push or iterate, never across an await.
    subscribers: Mutex<Vec<mpsc::Sender<SagaOutcome>>>,
    /// Outcomes a full subscriber did not get.
    pub(crate) dropped: AtomicU64,
    /// The handles waiting for a saga to settle, by saga. Woken by this process's
    /// settles at once, and by the outcome poller for sagas another process settles.
    watchers: Mutex<HashMap<SagaId, Vec<Arc<WatchSlot>>>>,
    /// The runtime shut down: waiting handles give up.
    closed: std::sync::atomic::AtomicBool,
}

/// Where a settle reaches one waiting handle.
#[derive(Debug, Default)]
struct WatchSlot {
    notify: tokio::sync::Notify,
    /// The state this process settled the saga in, if it did (the handle need not read
    /// it back from the store).
    settled: Mutex<Option<Arc<crate::machine::SagaState>>>,
}

/// One handle's wait for one saga to settle: woken when this process settles the saga
/// or the outcome poller finds it settled in the store. Unregisters itself when dropped.
#[derive(Debug)]
pub(crate) struct OutcomeWatch {
    hub: Arc<OutcomeHub>,
    id: SagaId,
    slot: Arc<WatchSlot>,
}

impl OutcomeWatch {
    /// Whether the runtime shut down (nothing will wake this watch again).
    pub(crate) fn is_closed(&self) -> bool {
        self.hub.is_closed()
    }

    /// Resolves once woken (at once if woken since the last call), with the settled
    /// state when this process settled the saga; `None` when the poller found it
    /// settled in the store (read it there).
    pub(crate) async fn woken(&self) -> Option<Arc<crate::machine::SagaState>> {
        self.slot.notify.notified().await;
        self.slot.settled.lock().ok().and_then(|mut s| s.take())
    }
}

impl Drop for OutcomeWatch {
    fn drop(&mut self) {
        if let Ok(mut w) = self.hub.watchers.lock()
            && let Some(list) = w.get_mut(&self.id)
        {
            list.retain(|n| !Arc::ptr_eq(n, &self.slot));
            if list.is_empty() {
                w.remove(&self.id);
            }
        }
    }
}

/// The outcomes one subscriber may leave unread; past it, newer ones are dropped for
/// that subscriber (and counted), so a subscriber that stops reading costs bounded
/// memory. The store keeps every outcome: query it to catch up.
pub const OUTCOME_BUFFER: usize = 1 << 16;

impl OutcomeHub {
    /// A new receiver of every outcome from now on (at most [`OUTCOME_BUFFER`] unread).
    pub fn subscribe(&self) -> mpsc::Receiver<SagaOutcome> {
        let (tx, rx) = mpsc::channel(OUTCOME_BUFFER);
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push(tx);
        }
        rx
    }

    /// Registers a wait for saga `id` to settle. Register *before* reading the saga's
    /// state: a settle after the registration wakes it, so none is missed.
    pub(crate) fn watch(self: &Arc<Self>, id: SagaId) -> OutcomeWatch {
        let slot = Arc::new(WatchSlot::default());
        if let Ok(mut w) = self.watchers.lock() {
            w.entry(id).or_default().push(Arc::clone(&slot));
        }
        OutcomeWatch {
            hub: Arc::clone(self),
            id,
            slot,
        }
    }

    /// The runtime is shutting down: every waiting handle wakes and gives up.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(w) = self.watchers.lock() {
            for slot in w.values().flatten() {
                slot.notify.notify_one();
            }
        }
    }

    /// Whether the runtime shut down.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The sagas handles are waiting for (the outcome poller asks the store about them).
    pub(crate) fn watched(&self) -> Vec<SagaId> {
        self.watchers
            .lock()
            .map(|w| w.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Wakes the handles waiting for saga `id`: with the state it settled in, when this
    /// process settled it; without, they read it from the store.
    pub(crate) fn wake(&self, id: &SagaId, settled: Option<&Arc<crate::machine::SagaState>>) {
        if let Ok(w) = self.watchers.lock()
            && let Some(list) = w.get(id)
        {
            for slot in list {
                if let (Some(state), Ok(mut s)) = (settled, slot.settled.lock()) {
                    *s = Some(Arc::clone(state));
                }
                // Stores a permit when the handle is not waiting right now: not lost.
                slot.notify.notify_one();
            }
        }
    }

    /// A saga settled in this process, in `state`: its waiting handles and the
    /// subscribers hear of it.
    pub(crate) fn settled(&self, state: &crate::machine::SagaState) {
        let watched = self
            .watchers
            .lock()
            .map(|w| w.contains_key(&state.id))
            .unwrap_or(false);
        if watched {
            self.wake(&state.id, Some(&Arc::new(state.clone())));
        }
        self.publish(&SagaOutcome {
            id: state.id,
            saga_type: state.saga_type.clone(),
            status: state.status,
            created_at: state.created_at,
            at: state.updated_at,
            in_doubt: state.in_doubt.is_some()
                || state.dead_letter.as_ref().is_some_and(|d| d.in_doubt),
        });
    }

    fn publish(&self, outcome: &SagaOutcome) {
        use tokio::sync::mpsc::error::TrySendError;
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.retain(|s| match s.try_send(outcome.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    if self
                        .dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        == 0
                    {
                        tracing::warn!(
                            "an outcome subscriber is not reading: outcomes dropped for it \
                             (the store has them)"
                        );
                    }
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            });
        }
    }
}

crate::counters! {
    /// Counters of the runtime shell.
    RuntimeStats => /// The shell's counters at one moment ([`Runtime::stats`](crate::runtime::Runtime::stats)).
    StatsSnapshot {
        /// Inputs applied (committed transitions).
        transitions,
        /// Inputs ignored as duplicate, stale or late (recorded in the journal).
        ignored,
        /// Messages dead-lettered as poison.
        poison,
        /// Transitions whose messages found the publisher's queue full (left to the relay).
        publisher_full,
        /// Of the poison messages, replies that failed the subject or token check, and operator requests
        /// whose sender could not be verified.
        forged,
        /// Store version conflicts resolved by reloading.
        conflicts,
        /// Instance actors activated (created by a start here, or loaded from the store).
        activations,
        /// Of the activations, those that loaded their saga from the store (not created
        /// by a start in this process): `skald_cold_activations_total`.
        cold_activations,
        /// Instance actors passivated.
        passivations,
        /// Instance actors found dead (crashed) and re-activated.
        reactivations,
        /// Commands published.
        commands_sent,
        /// Publishes that failed (left in the outbox: the relay publishes them later).
        publish_failures,
        /// Outbox rows published by the relay (left unpublished by their writer: a crash,
        /// a broker outage).
        relayed,
        /// Wake-ups claimed by the sweep (sagas not in memory, or in another process).
        wakeups_claimed,
        /// Partitions this node took (`skald_partition_handovers_total{event="taken"}`).
        partitions_taken,
        /// Partitions this node handed over, or lost (its lease ended first).
        partitions_given_up,
        /// Inputs left to another build (version skew: the saga's data was written by a
        /// newer one, or its definition version is not registered here), and replies of a
        /// saga type this process does not run.
        deferred,
    }
}

impl RuntimeStats {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The definitions a runtime runs: every registered version of every saga type. A new
/// saga starts on its type's latest version; one in flight continues on the version it
/// started with for as long as that version is registered.
#[derive(Debug, Default, Clone)]
pub(crate) struct Definitions {
    by_type: HashMap<SagaType, std::collections::BTreeMap<u32, Arc<Definition>>>,
}

impl Definitions {
    /// Adds a definition; `false` if its type and version were registered already.
    pub(crate) fn insert(&mut self, def: Arc<Definition>) -> bool {
        self.by_type
            .entry(def.saga_type().clone())
            .or_default()
            .insert(def.version(), def)
            .is_none()
    }

    pub(crate) fn get(&self, saga_type: &SagaType, version: u32) -> Option<&Arc<Definition>> {
        self.by_type.get(saga_type)?.get(&version)
    }

    /// The latest (highest) registered version of `saga_type`.
    pub(crate) fn latest(&self, saga_type: &SagaType) -> Option<&Arc<Definition>> {
        self.by_type.get(saga_type)?.values().next_back()
    }

    pub(crate) fn contains_type(&self, saga_type: &SagaType) -> bool {
        self.by_type.contains_key(saga_type)
    }

    pub(crate) fn types(&self) -> impl Iterator<Item = &SagaType> {
        self.by_type.keys()
    }

    /// Every registered (type, version).
    pub(crate) fn pairs(&self) -> Vec<(SagaType, u32)> {
        self.by_type
            .iter()
            .flat_map(|(t, versions)| versions.keys().map(move |v| (t.clone(), *v)))
            .collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }
}

/// What every actor of one runtime shares: read-only configuration and handles.
pub struct Shared {
    pub(crate) definitions: Definitions,
    /// Upcasters for stored payloads of older schema versions.
    pub(crate) upcasters: crate::upcast::Upcasters,
    pub(crate) store: Arc<dyn SagaStore>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) committer: Committer,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) jitter: Arc<dyn JitterSource>,
    pub(crate) io: tokio::runtime::Handle,
    pub(crate) outcomes: Arc<OutcomeHub>,
    pub(crate) stats: RuntimeStats,
    /// Metric handles, registered at start.
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) options: RuntimeOptions,
    /// Whether transitions store their messages in the outbox (`RuntimeOptions::outbox`).
    pub(crate) outbox_stored: bool,
    /// The publisher's queue (see [`publisher::publisher`]).
    pub(crate) publisher: tokio::sync::mpsc::Sender<publisher::PublishJob>,
    /// A store error the process cannot go on with (schema): the runtime stops.
    pub(crate) fatal: tokio::sync::watch::Sender<Option<crate::ports::StoreError>>,
    /// The keys every command's reply token is made with and every reply's is checked
    /// with.
    pub(crate) reply_keys: crate::auth::ReplyKeys,
    /// Transitions allowed to wait for room in the publisher's queue when it is full.
    pub(crate) publish_waiters: Arc<tokio::sync::Semaphore>,
    /// Wakes the outbox relay before its next poll: rows committed outside the runtime
    /// (a start in the caller's transaction) go out at once.
    pub(crate) relay_nudge: tokio::sync::Notify,
    /// The partitions this runtime holds ([`crate::partitions`]).
    pub(crate) ownership: Arc<crate::partitions::Ownership>,
    /// This runtime's name in the store's leases (`pid<pid>-<uuid>`).
    pub(crate) node: String,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("definitions", &self.definitions.pairs())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The definition for a saga type and version.
    pub(crate) fn definition(
        &self,
        saga_type: &SagaType,
        version: u32,
    ) -> Result<&Arc<Definition>, RuntimeError> {
        self.definitions
            .get(saga_type, version)
            .ok_or_else(|| RuntimeError::UnknownSagaType {
                saga_type: saga_type.clone(),
                version,
            })
    }

    /// Runs `fut` on the I/O runtime and waits for it.
    pub(crate) async fn on_io<T, F>(&self, fut: F) -> Result<T, RuntimeError>
    where
        F: Future<Output = Result<T, RuntimeError>> + Send + 'static,
        T: Send + 'static,
    {
        self.io
            .spawn(fut)
            .await
            .map_err(|e| RuntimeError::IoTask(e.to_string()))?
    }
}
