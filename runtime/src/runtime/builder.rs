//! [`RuntimeBuilder`]: what a runtime runs (definitions, upcasters) and on what (store,
//! bus, clock, keys), and [`RuntimeBuilder::start`], which checks all of it and wires
//! the parts together.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{error, warn};

use super::background;
use super::intake::{self, Inbound, OP_PENDING, op_consumer, reply_consumer};
use super::options::RuntimeOptions;
use super::outbox::PUBLISHER_QUEUE;
use super::{AbortOnDrop, Runtime, leases, start_requests};
use crate::actors::{Definitions, OutcomeHub, RuntimeStats, SagaOutcome, Shared, publisher};
use crate::committer::Committer;
use crate::definition::SagaDefinition;
use crate::error::RuntimeError;
use crate::ids::SagaType;
use crate::partitions::{DEFAULT_PARTITIONS, Mode, Ownership, PARTITIONS_SETTING};
use crate::ports::{
    Bus, BusError, Clock, Delivery, JitterSource, RandomJitter, SagaStore, SystemClock,
};
use crate::wire;

/// What [`RuntimeBuilder::store`] takes: a store by value, or an `Arc` of one.
pub trait IntoStore {
    /// The store, shared.
    fn into_store(self) -> Arc<dyn SagaStore>;
}

impl<S: SagaStore> IntoStore for S {
    fn into_store(self) -> Arc<dyn SagaStore> {
        Arc::new(self)
    }
}

impl<S: SagaStore> IntoStore for Arc<S> {
    fn into_store(self) -> Arc<dyn SagaStore> {
        self
    }
}

impl IntoStore for Arc<dyn SagaStore> {
    fn into_store(self) -> Arc<dyn SagaStore> {
        self
    }
}

impl IntoStore for Arc<dyn SagaStore + Send + Sync> {
    fn into_store(self) -> Arc<dyn SagaStore> {
        self
    }
}

/// What [`RuntimeBuilder::bus`] takes: a bus by value, or an `Arc` of one.
pub trait IntoBus {
    /// The bus, shared.
    fn into_bus(self) -> Arc<dyn Bus>;
}

impl<B: Bus> IntoBus for B {
    fn into_bus(self) -> Arc<dyn Bus> {
        Arc::new(self)
    }
}

impl<B: Bus> IntoBus for Arc<B> {
    fn into_bus(self) -> Arc<dyn Bus> {
        self
    }
}

impl IntoBus for Arc<dyn Bus> {
    fn into_bus(self) -> Arc<dyn Bus> {
        self
    }
}

impl IntoBus for Arc<dyn Bus + Send + Sync> {
    fn into_bus(self) -> Arc<dyn Bus> {
        self
    }
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    store: Option<Arc<dyn SagaStore>>,
    bus: Option<Arc<dyn Bus>>,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn JitterSource>,
    definitions: Definitions,
    upcasters: crate::upcast::Upcasters,
    options: RuntimeOptions,
    /// A type and version registered twice: `start` refuses it (the builder's methods
    /// do not fail).
    duplicate: Option<(SagaType, u32)>,
    outcomes: Arc<OutcomeHub>,
    reply_keys: Option<crate::auth::ReplyKeys>,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("definitions", &self.definitions.pairs())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        RuntimeBuilder {
            store: None,
            bus: None,
            clock: Arc::new(SystemClock),
            jitter: Arc::new(RandomJitter),
            definitions: Definitions::default(),
            upcasters: crate::upcast::Upcasters::default(),
            options: RuntimeOptions::default(),
            duplicate: None,
            outcomes: Arc::new(OutcomeHub::default()),
            reply_keys: None,
        }
    }
}

impl RuntimeBuilder {
    /// The saga store (required): a store by value (`SqliteStore`, `PostgresStore`,
    /// `MemoryStore`), or an `Arc` of one shared with other code.
    pub fn store(mut self, store: impl IntoStore) -> Self {
        self.store = Some(store.into_store());
        self
    }
    /// The bus (required): a bus by value (`NatsBus`, `MemoryBus`), or an `Arc` of one
    /// shared with other code.
    pub fn bus(mut self, bus: impl IntoBus) -> Self {
        self.bus = Some(bus.into_bus());
        self
    }
    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    /// The jitter source (default: thread-local randomness).
    pub fn jitter(mut self, jitter: Arc<dyn JitterSource>) -> Self {
        self.jitter = jitter;
        self
    }
    /// Options.
    pub fn options(mut self, options: RuntimeOptions) -> Self {
        self.options = options;
        self
    }
    /// Every saga that settles once the runtime starts, including the unfinished sagas
    /// it resumes at start-up (subscribe here, before [`RuntimeBuilder::start`], not to
    /// miss those).
    pub fn subscribe_outcomes(&self) -> mpsc::Receiver<SagaOutcome> {
        self.outcomes.subscribe()
    }

    /// Registers a saga definition. A type may have several versions: a new saga starts
    /// on the latest, a saga in flight continues on the version it started with (so
    /// keep registering a version until no saga runs on it: `start` refuses to run
    /// when unfinished sagas are on a version that is not registered). Registering one
    /// type and version twice is an error at start.
    pub fn register<D>(mut self, definition: &SagaDefinition<D>) -> Self {
        let def = Arc::clone(definition.definition());
        let key = (def.saga_type().clone(), def.version());
        if !self.definitions.insert(def) {
            self.duplicate = Some(key);
        }
        self
    }

    /// Registers an upcaster for stored payloads of `payload_type` from schema version
    /// `from` to `to` (see [`crate::upcast`]). Saga data is `<saga_type>.data`
    /// ([`crate::upcast::data_payload_type`]), at the definition's `data_version`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use skald_runtime::runtime::Runtime;
    /// let builder = Runtime::builder().upcaster("checkout.data", 1, 2, |mut data| {
    ///     data["currency"] = serde_json::json!("EUR");
    ///     Ok(data)
    /// });
    /// ```
    pub fn upcaster(
        mut self,
        payload_type: impl Into<String>,
        from: u32,
        to: u32,
        f: impl Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.upcasters.register(payload_type, from, to, f);
        self
    }

    /// Uses `upcasters` (replacing any registered so far): one [`crate::upcast::Upcasters`]
    /// can serve the runtimes and the operator CLI alike.
    pub fn upcasters(mut self, upcasters: crate::upcast::Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The keys reply tokens are made and checked with ([`crate::auth`]): every
    /// orchestrator that shares replies must hold the same ones. Without this call the
    /// runtime uses a random key kept in the store ([`SagaStore::shared_secret`]), which
    /// every process on that store shares with no configuration.
    pub fn reply_keys(mut self, keys: crate::auth::ReplyKeys) -> Self {
        self.reply_keys = Some(keys);
        self
    }

    /// Starts the runtime: the commit loop, the outbox relay, the reply intake and the
    /// start requests' endpoint (`skald.start.<saga_type>`, `RuntimeOptions::start_requests`)
    /// on the current tokio runtime, the actors on their own threads. On a bus that does not
    /// keep messages across a restart (the in-process bus), it then re-activates the
    /// unfinished sagas, re-sending the commands they wait on (lost with the process).
    pub async fn start(self) -> Result<Runtime, RuntimeError> {
        let store = self.store.ok_or(RuntimeError::MissingStore)?;
        let bus = self.bus.ok_or(RuntimeError::MissingBus)?;
        if let Some((saga_type, version)) = self.duplicate {
            return Err(RuntimeError::DuplicateDefinition { saga_type, version });
        }
        if self.definitions.is_empty() {
            return Err(RuntimeError::NoDefinitions);
        }
        // Every unfinished saga of the registered types must have its version here.
        let types: Vec<SagaType> = self.definitions.types().cloned().collect();
        // Sagas on an older version nobody registers any more would wait forever: refuse.
        // Sagas on a newer version belong to a newer build running beside this one (a
        // rolling deploy, or a rollback): their replies are left to it.
        let mut stranded: Vec<(SagaType, u32, u64)> = Vec::new();
        for (t, v, n) in store.unfinished_versions(&types).await? {
            if self.definitions.get(&t, v).is_some() {
                continue;
            }
            let latest = self.definitions.latest(&t).map_or(0, |d| d.version());
            if v < latest {
                stranded.push((t, v, n));
            } else {
                warn!(saga.r#type = %t, version = v, count = n, "unfinished sagas on a newer definition version than this build registers: a newer build must run them");
            }
        }
        if !stranded.is_empty() {
            return Err(RuntimeError::UnregisteredVersions(stranded));
        }
        self.options.validate()?;
        let reply_keys = match self.reply_keys {
            Some(keys) => keys,
            None => {
                let secret = store
                    .shared_secret(
                        crate::auth::REPLY_KEY_SECRET,
                        &crate::auth::ReplyKeys::generate_key(),
                    )
                    .await?;
                crate::auth::ReplyKeys::new([secret])
                    .map_err(|e| RuntimeError::ReplyKeys(e.to_string()))?
            }
        };
        let partitions = partition_count(&*store, self.options.partitions).await?;
        let mode = if !self.options.consume {
            Mode::Nothing
        } else if bus.is_durable() {
            Mode::Leased
        } else {
            Mode::All
        };
        let io = tokio::runtime::Handle::try_current().map_err(|_| RuntimeError::NoTokioRuntime)?;
        let (fatal, _) = watch::channel(None);
        let (publisher_tx, publisher_rx) = mpsc::channel(PUBLISHER_QUEUE);
        let options = self.options;
        let outbox_stored = options.outbox.unwrap_or_else(|| bus.is_durable());
        let (committer, commit_loop) =
            Committer::spawn(Arc::clone(&store), options.commit_max_batch, fatal.clone());
        // Nobody awaits the loop while the runtime runs: report it if it dies. Aborting
        // the reporter aborts the loop too (a JoinHandle dropped would only detach it).
        let commit_loop_abort = commit_loop.abort_handle();
        let commit_task = tokio::spawn(async move {
            let _abort_loop = AbortOnDrop(commit_loop_abort);
            if let Err(e) = commit_loop.await
                && e.is_panic()
            {
                error!(error = %e, "the commit loop panicked: no transition can be committed any more");
            }
        });
        let metrics = crate::metrics::Metrics::new(
            self.definitions
                .pairs()
                .iter()
                .filter_map(|(ty, version)| self.definitions.get(ty, *version)),
        );
        let shared = Arc::new(Shared {
            metrics,
            definitions: self.definitions,
            upcasters: self.upcasters,
            store,
            bus,
            committer,
            clock: self.clock,
            jitter: self.jitter,
            io,
            outcomes: self.outcomes,
            stats: RuntimeStats::default(),
            options,
            publisher: publisher_tx,
            outbox_stored,
            fatal,
            reply_keys,
            publish_waiters: Arc::new(Semaphore::new(PUBLISHER_QUEUE)),
            relay_nudge: tokio::sync::Notify::new(),
            ownership: Arc::new(Ownership::new(partitions, mode)),
            node: format!(
                "pid{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
        });
        let publisher = tokio::spawn(publisher(Arc::clone(&shared), publisher_rx));

        // Subscribe before anything is sent, so no reply is missed. Per registered saga
        // type, one consumer for its operator requests, and for its replies one (every
        // partition, on a bus only this runtime reads) or one per partition held (a
        // node leasing partitions: `leases`, which subscribes as it takes them).
        // Runtimes with different sagas share a broker without touching each other's
        // consumers, and a deploy that adds a type adds consumers and changes none.
        let types: Vec<SagaType> = shared.definitions.types().cloned().collect();
        let per_type = (shared.options.max_in_flight_replies / types.len().max(1)).max(64);
        let mut inbound = Vec::with_capacity(types.len() * 2 + 1);
        let consumed: &[SagaType] = if shared.options.consume { &types } else { &[] };
        for ty in consumed {
            let group = &shared.options.reply_group;
            if mode == Mode::All {
                let replies = shared
                    .bus
                    .subscribe_bounded(
                        &[wire::reply_filter(ty)],
                        &reply_consumer(group, ty),
                        per_type,
                    )
                    .await?;
                inbound.push(replies.map(|d| (Inbound::Reply, d)).boxed());
            }
            let requests = shared
                .bus
                .subscribe_bounded(&[wire::op_filter(ty)], &op_consumer(group, ty), OP_PENDING)
                .await?;
            inbound.push(requests.map(|d| (Inbound::Request, d)).boxed());
        }
        // The partitions' consumers hand their replies over here.
        let (partition_tx, partition_rx) = mpsc::channel::<(Inbound, Delivery)>(64);
        inbound.push(
            futures_util::stream::unfold(partition_rx, |mut rx| async move {
                rx.recv().await.map(|d| (d, rx))
            })
            .boxed(),
        );
        let replies = futures_util::stream::select_all(inbound);
        // Start requests (docs/protocol.md, "Starting a saga"): one queue subscription
        // per registered type, so a request for a type no runtime runs gets the broker's
        // "no responders" at once; the bus holds few of them not yet read
        // (`start_requests::bus_capacity`). A runtime that consumes nothing serves none.
        let mut starts = None;
        if shared.options.consume && shared.options.start_requests {
            let subjects: Vec<String> = types.iter().map(wire::start_subject).collect();
            match shared
                .bus
                .serve(
                    &subjects,
                    &shared.options.reply_group,
                    start_requests::bus_capacity(&shared.options),
                )
                .await
            {
                Ok(requests) => starts = Some(requests),
                Err(BusError::Unsupported(reason)) => {
                    warn!(%reason, "start requests are not served: this bus does not serve requests");
                }
                Err(e) => return Err(e.into()),
            }
        }

        let (ready_tx, ready_rx) = oneshot::channel();
        let actor_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("skald-actors".into())
            .spawn(move || background::run_actor_system(actor_shared, ready_tx))
            .map_err(|e| {
                RuntimeError::ActorSystem(format!("cannot spawn the actor thread: {e}"))
            })?;
        let (registry, sweeper, system) = ready_rx.await.map_err(|_| {
            RuntimeError::ActorSystem("its thread ended before the registry started".into())
        })?;

        // A node leasing partitions takes its share before anything is read (a lone
        // node: every partition), so that the first inputs find their partitions held,
        // then keeps it up to date.
        let leases = if mode == Mode::Leased {
            let mut leases =
                leases::Leases::new(Arc::clone(&shared), registry.clone(), partition_tx);
            let (stop, stopped) = watch::channel(false);
            leases.start(stopped.clone()).await;
            Some((stop, tokio::spawn(leases.run(stopped))))
        } else {
            drop(partition_tx);
            None
        };
        let intake = tokio::spawn(intake::intake(
            Arc::clone(&shared),
            registry.clone(),
            replies,
        ));
        let mut tasks = background::spawn(&shared);
        tasks.extend([intake, publisher]);
        // Stopped first at shutdown (`Runtime::shutdown`), while the actors still run.
        let starts = starts.map(|requests| {
            start_requests::Serving::spawn(Arc::clone(&shared), registry.clone(), &types, requests)
        });
        // The commit loop last: shutdown stops it after everything else.
        tasks.push(commit_task);
        let runtime = Runtime {
            shared,
            registry,
            sweeper,
            system,
            thread: Some(thread),
            tasks,
            starts,
            leases,
        };
        // The outbox covers a crash between commit and publish. An in-process bus also
        // loses what was published but not yet consumed when the process died: re-send
        // the commands the unfinished sagas wait on (participants dedupe on the
        // idempotency key). A durable broker kept them, so there is nothing to re-send;
        // and with several processes sharing the store, a start must not disturb the
        // sagas the others are running.
        if !runtime.shared.bus.is_durable() || !runtime.shared.outbox_stored {
            runtime.resume_active().await?;
        }
        Ok(runtime)
    }
}

/// The store's partition count: the one it recorded, or `configured` (16 when unset)
/// recorded now by the first runtime on it. A runtime configured with another count
/// than the store's is refused: sagas are recorded with their partition.
async fn partition_count(
    store: &dyn SagaStore,
    configured: Option<u32>,
) -> Result<u32, RuntimeError> {
    let candidate = configured.unwrap_or(DEFAULT_PARTITIONS);
    let recorded = store
        .shared_secret(PARTITIONS_SETTING, candidate.to_string().as_bytes())
        .await?;
    let recorded = std::str::from_utf8(&recorded)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|n| (1..=crate::ids::MAX_PARTITIONS).contains(n))
        .ok_or_else(|| {
            RuntimeError::Store(crate::ports::StoreError::Other(format!(
                "the store's partition count ({PARTITIONS_SETTING:?} in skald_secrets) is not a \
                 number from 1 to {}",
                crate::ids::MAX_PARTITIONS
            )))
        })?;
    match configured {
        Some(c) if c != recorded => Err(RuntimeError::PartitionCount {
            configured: c,
            recorded,
        }),
        _ => Ok(recorded),
    }
}
