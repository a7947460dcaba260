//! [`SagaHandle`]: one saga as its starter (or anyone who knows its id) sees it: its
//! status, its typed data, and its outcome, whichever process settles it.
//!
//! A handle reads the store, never this process's memory alone: a saga started here and
//! finished by another orchestrator sharing the store reaches its handle all the same.
//! Waiting for an outcome costs no polling of its own: this process's settles wake the
//! handle at once, and one background query per `outcome_poll_interval` (for every
//! waiting handle together) finds the sagas other processes settled.

use std::marker::PhantomData;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use actix::Addr;

use crate::actors::{Applied, OutcomeWatch, Registry, Shared};
use crate::definition::SagaDefinition;
use crate::error::RuntimeError;
use crate::ids::SagaId;
use crate::machine::{DeadLetterInfo, SagaState, SagaStatus, StepError, Timestamp};
use crate::ports::StoredSaga;

/// A handle to one saga of a definition whose data is `D`: from
/// [`Runtime::start_saga`](super::Runtime::start_saga), a keyed start, or
/// [`Runtime::saga`](super::Runtime::saga) for an existing id. Cheap to clone; answers as
/// long as the runtime it came from runs, and `RuntimeError::ShuttingDown` after.
///
/// ```no_run
/// # async fn demo(runtime: &skald_runtime::runtime::Runtime,
/// #   checkout: &skald_runtime::definition::SagaDefinition<serde_json::Value>)
/// #   -> Result<(), skald_runtime::error::RuntimeError> {
/// use std::time::Duration;
/// use skald_runtime::machine::SagaStatus;
/// let handle = runtime.start_saga(checkout, &serde_json::json!({"order": 42})).await?;
/// let outcome = handle.outcome_within(Duration::from_secs(30)).await?;
/// if outcome.status == SagaStatus::Completed {
///     println!("order {} shipped: {}", handle.id(), outcome.data);
/// }
/// # Ok(()) }
/// ```
pub struct SagaHandle<D> {
    id: SagaId,
    existing: bool,
    definition: SagaDefinition<D>,
    /// Weak: a handle kept after its runtime shut down holds nothing of it (the commit
    /// loop ends when the runtime does) and answers `ShuttingDown`.
    shared: Weak<Shared>,
    registry: Addr<Registry>,
    /// Registered before the start that made this handle was committed, so the first
    /// `outcome()` needs no read of the store to know it missed nothing (taken by it;
    /// clones share it).
    started_watch: Arc<std::sync::Mutex<Option<OutcomeWatch>>>,
    _data: PhantomData<fn() -> D>,
}

impl<D> Clone for SagaHandle<D> {
    fn clone(&self) -> Self {
        SagaHandle {
            id: self.id,
            existing: self.existing,
            definition: self.definition.clone(),
            shared: Weak::clone(&self.shared),
            registry: self.registry.clone(),
            started_watch: Arc::clone(&self.started_watch),
            _data: PhantomData,
        }
    }
}

impl<D> std::fmt::Debug for SagaHandle<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaHandle")
            .field("id", &self.id)
            .field("saga_type", self.definition.definition().saga_type())
            .field("existing", &self.existing)
            .finish()
    }
}

/// A saga's state as a handle reads it from the store, its data typed.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaView<D> {
    /// The saga.
    pub id: SagaId,
    /// Its status. Settled ([`SagaStatus::is_settled`]) for an outcome.
    pub status: SagaStatus,
    /// Its data: the start's data with every step's output applied. For an outcome,
    /// the final data.
    pub data: D,
    /// The definition version it runs on.
    pub definition_version: u32,
    /// Compensation began around a step whose outcome was unknown (it timed out on every
    /// attempt, or a cancel cut it short): that step was compensated too (or, with no
    /// compensation, the saga was dead-lettered).
    pub in_doubt: bool,
    /// What failed: the step error that started compensation, or the cancel's reason.
    pub failure: Option<StepError>,
    /// For a dead-lettered saga (`Failed`): the compensation that could not be done.
    pub dead_letter: Option<DeadLetterInfo>,
    /// When it was created.
    pub created_at: Timestamp,
    /// Its last transition: for an outcome, when it settled.
    pub updated_at: Timestamp,
}

impl<D> SagaView<D> {
    /// Every step succeeded.
    pub fn is_completed(&self) -> bool {
        self.status == SagaStatus::Completed
    }
}

impl<D> SagaHandle<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(
        id: SagaId,
        existing: bool,
        definition: &SagaDefinition<D>,
        shared: &Arc<Shared>,
        registry: Addr<Registry>,
        started_watch: Option<OutcomeWatch>,
    ) -> Self {
        SagaHandle {
            id,
            existing,
            definition: definition.clone(),
            shared: Arc::downgrade(shared),
            registry,
            started_watch: Arc::new(std::sync::Mutex::new(started_watch)),
            _data: PhantomData,
        }
    }

    /// The saga's id.
    pub fn id(&self) -> SagaId {
        self.id
    }

    /// Whether a keyed start found the saga already started (by this or another
    /// process) instead of starting it. Always false for an unkeyed start.
    pub fn existing(&self) -> bool {
        self.existing
    }

    /// The saga's state now, read from the store.
    pub async fn state(&self) -> Result<SagaView<D>, RuntimeError> {
        self.view(self.load().await?.state)
    }

    /// The saga's status now, read from the store.
    pub async fn status(&self) -> Result<SagaStatus, RuntimeError> {
        Ok(self.load().await?.state.status)
    }

    /// The saga's typed data now, read from the store.
    pub async fn data(&self) -> Result<D, RuntimeError> {
        Ok(self.state().await?.data)
    }

    /// Waits until the saga settles (completed, compensated, or dead-lettered waiting
    /// for an operator), whichever orchestrator process settles it, and returns its
    /// final state. Waits for as long as that takes, through store outages too: see
    /// [`SagaHandle::outcome_within`] for a bound. Fails at once for a saga the store
    /// does not hold or of another type.
    pub async fn outcome(&self) -> Result<SagaView<D>, RuntimeError> {
        // Register before reading: a settle between the read and the wait still wakes
        // this handle.
        let shared = self.shared()?;
        // No waking for this long (a poller that died, a runtime dropped without a
        // shutdown): read the store anyway, so a handle degrades, never hangs.
        let recheck = (shared.options.outcome_poll_interval * 20).max(Duration::from_secs(5));
        let started = self.started_watch.lock().ok().and_then(|mut w| w.take());
        let (watch, mut state) = match started {
            // Watched since before the start committed: every settle since woke it. The
            // saga was not settled when it was created: wait at once.
            Some(watch) => {
                drop(shared);
                let state = match tokio::time::timeout(recheck, watch.woken()).await {
                    Ok(Some(settled)) => (*settled).clone(),
                    Ok(None) | Err(_) => self.load_patiently(&watch).await?,
                };
                (watch, state)
            }
            None => {
                let watch = shared.outcomes.watch(self.id);
                drop(shared);
                let state = self.load_patiently(&watch).await?;
                (watch, state)
            }
        };
        loop {
            if state.status.is_settled() {
                return self.view(state);
            }
            // Checked after registering: a shutdown before it woke nobody here.
            if watch.is_closed() {
                return Err(RuntimeError::ShuttingDown);
            }
            state = match tokio::time::timeout(recheck, watch.woken()).await {
                // Settled by this process: its state is here, no read needed (even if
                // the runtime is shutting down now: the outcome is committed).
                Ok(Some(settled)) => (*settled).clone(),
                Ok(None) | Err(_) => self.load_patiently(&watch).await?,
            };
        }
    }

    /// Like [`SagaHandle::outcome`], giving up after `timeout` with
    /// [`RuntimeError::OutcomeTimeout`] (the saga runs on; ask again later).
    pub async fn outcome_within(&self, timeout: Duration) -> Result<SagaView<D>, RuntimeError> {
        match tokio::time::timeout(timeout, self.outcome()).await {
            Ok(result) => result,
            Err(_) => Err(RuntimeError::OutcomeTimeout {
                id: self.id,
                waited: timeout,
            }),
        }
    }

    /// Cancels the saga: its steps that may have taken effect are compensated.
    pub async fn cancel(&self, reason: &str) -> Result<Applied, RuntimeError> {
        // A handle of another saga type must not cancel what its id names.
        self.load().await?;
        let input = crate::machine::Input::CancelRequested {
            reason: reason.to_owned(),
        };
        super::deliver(&self.registry, self.id, None, input, None, None).await
    }

    /// Loads the saga's state, waiting out a store that is briefly unavailable (a
    /// handle waiting for an outcome outlives a database restart); fails at once for
    /// what waiting cannot mend (an unknown saga, another type).
    async fn load_patiently(&self, watch: &OutcomeWatch) -> Result<SagaState, RuntimeError> {
        let mut delay = Duration::from_millis(50);
        loop {
            if watch.is_closed() {
                return Err(RuntimeError::ShuttingDown);
            }
            match self.load().await {
                Ok(stored) => return Ok(stored.state),
                Err(e @ RuntimeError::Store(_)) if e.is_retryable() => {
                    tracing::debug!(saga.id = %self.id, error = %e, "reading the saga failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The runtime, while it runs.
    fn shared(&self) -> Result<Arc<Shared>, RuntimeError> {
        self.shared.upgrade().ok_or(RuntimeError::ShuttingDown)
    }

    async fn load(&self) -> Result<StoredSaga, RuntimeError> {
        let shared = self.shared()?;
        let store = Arc::clone(&shared.store);
        let id = self.id;
        let stored = shared
            .on_io(async move { store.load(id).await.map_err(RuntimeError::from) })
            .await?
            .ok_or(RuntimeError::UnknownSaga(self.id))?;
        let def = self.definition.definition();
        if &stored.state.saga_type != def.saga_type() {
            return Err(RuntimeError::SagaTypeMismatch {
                id: self.id,
                expected: def.saga_type().clone(),
                found: stored.state.saga_type,
            });
        }
        Ok(stored)
    }

    /// Decodes the stored data as `D`, bringing an older data schema up first.
    fn view(&self, mut state: SagaState) -> Result<SagaView<D>, RuntimeError> {
        let def = self.definition.definition();
        if state.data_version > def.data_version() {
            return Err(RuntimeError::DataTooNew(format!(
                "saga {}: its data is at schema version {}, this build's definition reads {}",
                state.id,
                state.data_version,
                def.data_version()
            )));
        }
        crate::upcast::upcast_saga_data(&self.shared()?.upcasters, def, &mut state)
            .map_err(|e| RuntimeError::DataUnreadable(e.to_string()))?;
        let data = self.definition.decode(&state.data)?;
        Ok(SagaView {
            id: state.id,
            status: state.status,
            data,
            definition_version: state.definition_version,
            in_doubt: state.in_doubt.is_some()
                || state.dead_letter.as_ref().is_some_and(|d| d.in_doubt),
            failure: state.failure.or(state.cancel),
            dead_letter: state.dead_letter,
            created_at: state.created_at,
            updated_at: state.updated_at,
        })
    }
}
