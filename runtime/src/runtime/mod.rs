//! [`Runtime`]: wires definitions, store, bus and actors together.
//!
//! The runtime must be started from inside a multi-thread tokio runtime: that runtime
//! becomes the I/O runtime (store, bus, group commit, reply intake). The actors run on
//! their own actix system thread with one arbiter per core.
//!
//! - this file: the [`Runtime`] handle (start sagas, apply inputs, shut down),
//!   `deliver`, the one way an input reaches a saga's actor, and `start_or_find`, the
//!   one start path of keyed starts;
//! - `handle`: [`SagaHandle`], a saga's status, typed data and outcome, read from the
//!   store whichever process settles it;
//! - `transactional`: [`PreparedStart`], a start written in the caller's own database
//!   transaction (the stores' `start_in`);
//! - `start_requests`: start requests from any language (`skald.start.<saga_type>`),
//!   checked, then started like [`Runtime::start_saga_keyed`];
//! - `builder`: [`RuntimeBuilder`] and `start`;
//! - `options`: [`RuntimeOptions`], their defaults and their checks at start;
//! - `intake`: replies and operator requests from the bus: limits, checks, delivery
//!   and the one disposition ladder that acks, redelivers or dead-letters them;
//! - `outbox`: the outbox relay, old command rows brought up to date, and the one
//!   dead-letter announcement encoding;
//! - `background`: the actor system's thread (registry, wake-up sweeper) and the
//!   retention sweeper, relay, metrics sampler and outcome poller loops.

mod background;
mod builder;
mod handle;
mod intake;
mod leases;
mod options;
pub(crate) mod outbox;
mod start_requests;
mod transactional;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, warn};

pub use builder::{IntoBus, IntoStore, RuntimeBuilder};
pub use handle::{SagaHandle, SagaView};
pub use intake::MAX_REQUEST_TTL;
pub(crate) use intake::reply_consumer;
pub(crate) use leases::partition_consumer;
pub use options::RuntimeOptions;
pub use transactional::PreparedStart;

use crate::actors::{
    Applied, Apply, Lookup, Registry, SagaOutcome, Shared, StatsSnapshot, SweepNow, WakeupSweeper,
};
use crate::committer::CommitSnapshot;
use crate::definition::SagaDefinition;
use crate::error::RuntimeError;
use crate::ids::SagaId;
use crate::machine::{Input, SagaState};
use crate::ports::{SagaStore, StoredSaga};

/// A running skald runtime.
pub struct Runtime {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    sweeper: Addr<WakeupSweeper>,
    system: actix::System,
    thread: Option<JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The start requests' endpoint (`start_requests`), stopped first at shutdown.
    starts: Option<start_requests::Serving>,
    /// A node's partition leases (`leases`): told to stop at shutdown, when it hands
    /// every partition over, while the actors still run.
    leases: Option<(
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Attempts to reach a live instance actor before reporting it unavailable.
const DELIVERY_ATTEMPTS: usize = 5;

/// Feeds `input` to saga `id`'s actor (activating it, or creating the saga from
/// `initial`) and waits for the answer, which comes once the transition is committed.
/// An actor that died or was passivating is looked up again, which re-activates it.
async fn deliver(
    registry: &Addr<Registry>,
    id: SagaId,
    initial: Option<SagaState>,
    input: Input,
    inbox: Option<String>,
    condition: Option<crate::actors::Condition>,
) -> Result<Applied, RuntimeError> {
    for _ in 0..DELIVERY_ATTEMPTS {
        // A start keeps its initial state across attempts: if the first actor died
        // before committing, the next one must still create the saga.
        let addr = registry
            .send(Lookup {
                id,
                initial: initial.clone(),
            })
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        match addr
            .send(Apply {
                input: input.clone(),
                inbox: inbox.clone(),
                condition: condition.clone(),
                span: tracing::Span::current(),
                initial: initial.clone(),
            })
            .await
        {
            Ok(result) => return result,
            // The actor died (panic) or was passivating: look it up again, which
            // re-activates it from the store.
            Err(MailboxError::Closed) | Err(MailboxError::Timeout) => {
                debug!(saga.id = %id, "instance unavailable; re-activating");
                tokio::task::yield_now().await;
            }
        }
    }
    Err(RuntimeError::ActorUnavailable(id))
}

/// Starts saga `id` of `definition` with `data` (already encoded as its data), or, for a
/// `keyed` id ([`SagaId::for_key`]), finds it started meanwhile by another start of the
/// key. Returns whether it existed. The one start path of keyed starts, in Rust
/// ([`Runtime::start_saga_keyed`]) and over the bus (`start_requests`); each caller
/// answers the common repeat (a client retrying) from the store before calling it.
pub(crate) async fn start_or_find(
    shared: &Shared,
    registry: &Addr<Registry>,
    definition: &crate::definition::Definition,
    id: SagaId,
    data: serde_json::Value,
    keyed: bool,
) -> Result<bool, RuntimeError> {
    let exists =
        async || -> Result<bool, RuntimeError> { Ok(shared.store.load(id).await?.is_some()) };
    let state = SagaState::new(id, definition, data, shared.clock.now());
    let span = crate::trace::saga_span(&id, definition.saga_type());
    let mut retried = false;
    loop {
        let started = deliver(
            registry,
            id,
            Some(state.clone()),
            Input::Started,
            None,
            None,
        )
        .instrument(span.clone())
        .await;
        match started {
            Ok(_) => return Ok(false),
            Err(e) if !keyed => return Err(e),
            // Another start of the same key committed first: the store refused this
            // one's insert, and the saga refused to start again (or, on a build of
            // another data version, could not read it): it exists, whatever the error.
            Err(e) => match exists().await {
                Ok(true) => return Ok(true),
                // A start whose actor restarted before committing (a store blip) loses
                // its initial state: the queued start finds no saga. Once more.
                Ok(false) if matches!(e, RuntimeError::UnknownSaga(_)) && !retried => {
                    retried = true;
                }
                Ok(false) | Err(_) => return Err(e),
            },
        }
    }
}

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// Starts a new saga of `definition`'s type with `data`. Returns its handle once the
    /// saga is stored and its first command published (or stored in the outbox, to be
    /// published by it): [`SagaHandle::outcome`] waits for its result.
    pub async fn start_saga<D>(
        &self,
        definition: &SagaDefinition<D>,
        data: &D,
    ) -> Result<SagaHandle<D>, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        self.start_saga_with_id(self.shared.ownership.fresh_id(), definition, data)
            .await
    }

    /// Starts the one saga of `definition`'s type for business key `key` (an order
    /// number, a payment reference), or finds it: a second start with the same key, from
    /// this process or any other sharing the store, returns the existing saga's handle
    /// ([`SagaHandle::existing`] is true) and ignores its `data`. The saga's id is
    /// derived from the type and the key ([`SagaId::for_key`]), so the store's primary
    /// key decides a race, never a check-then-insert.
    ///
    /// A key names one saga for good: retention never deletes a keyed saga (a second
    /// saga under the same id would get the first one's fenced outcomes from the
    /// participants), so a start of a finished saga's key returns that saga.
    pub async fn start_saga_keyed<D>(
        &self,
        definition: &SagaDefinition<D>,
        key: &str,
        data: &D,
    ) -> Result<SagaHandle<D>, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        let def = definition.definition();
        let id = SagaId::for_key(def.saga_type(), key).map_err(RuntimeError::InvalidKey)?;
        self.initial_state(id, definition, data)?;
        // The common repeat (a client retrying) is answered from the store, without
        // asking the saga's actor to start it again.
        if self.load(id).await?.is_some() {
            return Ok(self.handle(id, true, definition));
        }
        let existing = start_or_find(
            &self.shared,
            &self.registry,
            def,
            id,
            definition.encode(data)?,
            true,
        )
        .await?;
        Ok(self.handle(id, existing, definition))
    }

    /// Like [`Runtime::start_saga`], with a caller-chosen id: a second start with the
    /// same id is refused (the saga exists). Prefer [`Runtime::start_saga_keyed`], which
    /// returns the existing saga instead.
    pub async fn start_saga_with_id<D>(
        &self,
        id: SagaId,
        definition: &SagaDefinition<D>,
        data: &D,
    ) -> Result<SagaHandle<D>, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        let state = self.initial_state(id, definition, data)?;
        let def = definition.definition();
        let span = crate::trace::saga_span(&id, def.saga_type());
        // Watched from before the start commits: the handle's outcome needs no read.
        let watch = self.shared.outcomes.watch(id);
        deliver(&self.registry, id, Some(state), Input::Started, None, None)
            .instrument(span)
            .await?;
        Ok(SagaHandle::new(
            id,
            false,
            definition,
            &self.shared,
            self.registry.clone(),
            Some(watch),
        ))
    }

    /// The state a new saga of `definition` with `data` starts from (status `Created`),
    /// after checking that the definition is registered here and is its type's latest.
    pub(crate) fn initial_state<D>(
        &self,
        id: SagaId,
        definition: &SagaDefinition<D>,
        data: &D,
    ) -> Result<SagaState, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        let def = definition.definition();
        self.shared.definition(def.saga_type(), def.version())?;
        if let Some(latest) = self.shared.definitions.latest(def.saga_type())
            && latest.version() != def.version()
        {
            return Err(RuntimeError::NotLatestVersion {
                saga_type: def.saga_type().clone(),
                version: def.version(),
                latest: latest.version(),
            });
        }
        Ok(SagaState::new(
            id,
            def,
            definition.encode(data)?,
            self.shared.clock.now(),
        ))
    }

    /// A handle to saga `id`, of `definition`'s type: its status, typed data and
    /// outcome, whichever process started it. Reads nothing yet: a handle to an id the
    /// store does not hold answers [`RuntimeError::UnknownSaga`], and one to a saga of
    /// another type [`RuntimeError::SagaTypeMismatch`].
    pub fn saga<D>(&self, definition: &SagaDefinition<D>, id: SagaId) -> SagaHandle<D>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        self.handle(id, false, definition)
    }

    fn handle<D>(&self, id: SagaId, existing: bool, definition: &SagaDefinition<D>) -> SagaHandle<D>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        SagaHandle::new(
            id,
            existing,
            definition,
            &self.shared,
            self.registry.clone(),
            None,
        )
    }

    /// Applies every wake-up due by the runtime's clock now (retries whose backoff
    /// ended, reply deadlines that passed), without waiting for the next sweep, and
    /// returns once they are applied (after the periodic sweep in flight, if any, so
    /// nothing it claimed is still pending). For tests on a manual clock: move it
    /// forward, then call this (`skald::testing::TestRuntime` does). In production the
    /// sweep runs every `wakeup_poll_interval`. Fails when the store cannot be asked.
    pub async fn fire_due_wakeups(&self) -> Result<(), RuntimeError> {
        self.sweeper
            .send(SweepNow)
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?
    }

    /// Feeds an input to a saga: only the runtime's own requests (cancel, re-drive). A
    /// step's outcome comes from its participant's reply, never from the caller.
    pub(crate) async fn apply(&self, id: SagaId, input: Input) -> Result<Applied, RuntimeError> {
        deliver(&self.registry, id, None, input, None, None).await
    }

    /// Re-drives a dead-lettered saga: its failed compensation runs again with a fresh
    /// attempt budget.
    pub async fn redrive(&self, id: SagaId) -> Result<Applied, RuntimeError> {
        self.apply(id, Input::Redriven).await
    }

    /// Cancels a running saga: its completed steps are compensated.
    pub async fn cancel(&self, id: SagaId, reason: &str) -> Result<Applied, RuntimeError> {
        self.apply(
            id,
            Input::CancelRequested {
                reason: reason.to_owned(),
            },
        )
        .await
    }

    /// Loads a saga's stored state.
    pub async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, RuntimeError> {
        Ok(self.shared.store.load(id).await?)
    }

    /// Every saga that settles in this process from now on (finished or
    /// dead-lettered): a bounded feed ([`crate::actors::OUTCOME_BUFFER`] unread at most;
    /// past it a reader that lags loses outcomes, counted). It never sees a saga another
    /// process settles: to wait for a saga's result, use its [`SagaHandle`].
    pub fn outcomes(&self) -> mpsc::Receiver<SagaOutcome> {
        self.shared.outcomes.subscribe()
    }

    /// The shell's counters now: a plain snapshot.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// How many partitions the store's sagas are spread over (docs/scaling.md).
    pub fn partition_count(&self) -> u32 {
        self.shared.ownership.count()
    }

    /// The partitions this runtime holds now, in order: every one on a bus only it
    /// reads, none when it consumes nothing, its share of the leases on a node.
    pub fn held_partitions(&self) -> Vec<u32> {
        self.shared.ownership.held().to_vec()
    }

    /// This runtime's name in the store's leases (`node/<name>`, and as the holder of
    /// its partitions' leases).
    pub fn node_name(&self) -> &str {
        &self.shared.node
    }

    /// The group commit loop's counters now: a plain snapshot.
    pub fn commit_stats(&self) -> CommitSnapshot {
        self.shared.committer.stats().snapshot()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.shared.store
    }

    /// Resolves when the runtime hits an error it cannot go on with (the store's schema
    /// is missing or of another shape): the process should stop with that error, which
    /// says what to fix. Never resolves while all is well.
    pub async fn failed(&self) -> RuntimeError {
        let mut rx = self.shared.fatal.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return RuntimeError::Store(e);
            }
            if rx.changed().await.is_err() {
                // The runtime is gone: nothing will ever be reported.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sends every unfinished saga a `Resumed` input, so that commands that were lost
    /// (a non-durable bus, or a crash between commit and publish) are sent again. Runs
    /// at start.
    pub async fn resume_active(&self) -> Result<usize, RuntimeError> {
        const PAGE: usize = 1_000;
        let mut after = None;
        let mut resumed = 0;
        let limit = Arc::new(Semaphore::new(256));
        let mut joins = Vec::new();
        loop {
            let page = self.shared.store.active_sagas(after, PAGE).await?;
            let Some(last) = page.last().copied() else {
                break;
            };
            after = Some(last);
            for id in page {
                let permit = Arc::clone(&limit)
                    .acquire_owned()
                    .await
                    .map_err(|_| RuntimeError::ShuttingDown)?;
                let registry = self.registry.clone();
                joins.push(tokio::spawn(async move {
                    let res = deliver(&registry, id, None, Input::Resumed, None, None).await;
                    drop(permit);
                    if let Err(e) = res {
                        warn!(saga.id = %id, error = %e, "resuming saga failed; its wake-up will retry");
                    }
                }));
                resumed += 1;
            }
        }
        for j in joins {
            let _ = j.await;
        }
        if resumed > 0 {
            info!(sagas = resumed, "resumed unfinished sagas");
        }
        Ok(resumed)
    }

    /// Stops the intake and the actors. Committed state is kept; unfinished sagas
    /// continue when a runtime starts again on the same store.
    pub async fn shutdown(mut self) {
        // Start requests first, while the actors still run: drained (new requests go
        // to the other orchestrators), those received answered, those under way
        // finished (bounded).
        if let Some(starts) = self.starts.take() {
            starts.shutdown().await;
        }
        // Then the partitions, handed over cleanly: the other nodes take them at their
        // next renewal instead of after the leases end.
        if let Some((stop, task)) = self.leases.take() {
            let _ = stop.send(true);
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .is_err()
            {
                warn!(
                    "handing the partitions over took too long; they pass on when their leases end"
                );
                abort.abort();
            }
        }
        // Stop taking replies, then the actors; the commit loop goes last, so that a
        // transition in flight is committed (or not) as a whole, never cut in half.
        // Handles waiting for an outcome give up (nothing here will settle a saga).
        self.shared.outcomes.close();
        let commit_task = self.tasks.pop();
        for t in &self.tasks {
            t.abort();
        }
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        drop(self);
        if let Some(commit_task) = commit_task {
            // It ends once every committer handle is gone; reply tasks still finishing
            // may hold one for a moment.
            let abort = commit_task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), commit_task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Dropped without a shutdown (an error path, a panic): waiting handles give up
        // all the same.
        self.shared.outcomes.close();
        for t in &self.tasks {
            t.abort();
        }
        if let Some((_, task)) = &self.leases {
            task.abort();
        }
        if self.thread.is_some() {
            self.system.stop();
        }
    }
}
