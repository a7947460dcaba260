//! [`Runtime`]: wires definitions, store, bus and actors together.
//!
//! The runtime must be started from inside a multi-thread tokio runtime: that runtime
//! becomes the I/O runtime (store, bus, group commit, reply intake). The actors run on
//! their own actix system thread with one arbiter per core.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{Instrument, debug, error, info, warn};

use crate::actors::{
    Applied, Apply, Definitions, Lookup, OutcomeHub, Registry, RetrySupervisor, RuntimeStats,
    SagaOutcome, Shared, publish_outbox, publisher,
};
use crate::committer::{CommitStats, Committer};
use crate::definition::SagaDefinition;
use crate::error::{Disposition, RuntimeError};
use crate::ids::{SagaId, SagaType};
use crate::machine::{Input, SagaState, Timestamp};
use crate::ports::{
    Acker, Bus, Clock, DeadLetterCategory, DeadLetterRecord, Delivery, JitterSource, Message,
    OutboxMessage, RandomJitter, SagaStore, StoreError, StoredSaga, SystemClock,
};
use crate::wire::{self, Outcome};

/// Runtime settings. Every field has a default ([`RuntimeOptions::default`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RuntimeOptions {
    /// Arbiters (threads) for instance actors. Default: the number of cores. Since 0.1.
    pub arbiters: usize,
    /// An active saga's actor is passivated (dropped from memory) after this long
    /// without input; settled sagas are passivated at once. Default: 30 s. Since 0.1.
    #[serde(with = "crate::serde_millis")]
    pub idle_timeout: Duration,
    /// How often the store is swept for due wake-ups of sagas not in memory.
    /// Default: 500 ms. Since 0.1.
    #[serde(with = "crate::serde_millis")]
    pub wakeup_poll_interval: Duration,
    /// Replies processed concurrently. Default: 4096. Since 0.1.
    pub max_in_flight_replies: usize,
    /// Most writes in one group commit. Default: 512. Since 0.1.
    pub commit_max_batch: usize,
    /// Delay before a reply that hit a transient error is delivered again.
    /// Default: 500 ms. Since 0.1.
    #[serde(with = "crate::serde_millis")]
    pub redelivery_delay: Duration,
    /// Publish lifecycle events on `skald.evt.<saga_type>.<event>`. Default: true. Since 0.1.
    pub publish_events: bool,
    /// The prefix of the durable consumers replies and operator requests are read with:
    /// `<reply_group>-<saga_type>` and `<reply_group>-op-<saga_type>`. Default:
    /// `skald-orchestrator`. Since 0.1 (one consumer per type since 0.4).
    pub reply_group: String,
    /// A reply that still cannot be applied after this many deliveries (the saga's actor
    /// unreachable, the bus failing) is dead-lettered with the last error instead of
    /// being redelivered forever. Default: 100. Since 0.1. Neither a store that is
    /// unavailable nor version skew (a definition version or data schema this build
    /// lacks, `Disposition::Defer`) counts: such a reply waits, with backoff, for as long
    /// as the outage or the deploy lasts.
    pub max_deliveries: u32,
    /// How long a claim on a due wake-up or on outbox rows holds, and how long a writer
    /// keeps its own outbox rows before a relay may publish them. After a crash, what
    /// the dead process held is taken over within this time. Default: 5 s. Since 0.2.
    #[serde(with = "crate::serde_millis")]
    pub claim_lease: Duration,
    /// How often the outbox relay looks for rows left unpublished. Default: 500 ms.
    /// Since 0.2.
    #[serde(with = "crate::serde_millis")]
    pub outbox_poll_interval: Duration,
    /// Whether the outbox is stored: `None` (the default) stores it when the bus is
    /// durable (NATS JetStream), where a message committed but not yet published must
    /// survive a crash; an in-process bus loses everything with the process anyway, and
    /// a start re-sends the commands unfinished sagas wait on. Since 0.2.
    pub outbox: Option<bool>,
    /// How long a consumed message's id stays in the inbox (a redelivery or a repeated
    /// publish within this time is recognised and dropped). Default: 24 h. Since 0.2.
    #[serde(with = "crate::serde_millis")]
    pub inbox_retention: Duration,
    /// Finished (completed or compensated) sagas are deleted, with their journals and
    /// dead letters, this long after their last transition; `None` keeps them forever.
    /// One process at a time sweeps (a lease in the store). Default: 7 days. Since 0.3.
    #[serde(with = "crate::serde_millis_opt")]
    pub retention: Option<Duration>,
    /// How often the retention sweeper runs (it also trims the inbox past
    /// `inbox_retention`). Default: 60 s. Since 0.3.
    #[serde(with = "crate::serde_millis")]
    pub sweep_interval: Duration,
    /// Attempts of one retry run journaled one by one; past them the run is compacted
    /// (a snapshot, then nothing until the run ends), so a step retried for days keeps
    /// a bounded journal. Default: 10. Since 0.3.
    pub journal_retry_window: u32,
    /// How often the sampled gauges (sagas in flight, outbox backlog and lag, reply
    /// consumer lag) are read from the store and the broker; zero never samples them.
    /// Default: 10 s. Since 0.3.
    #[serde(with = "crate::serde_millis")]
    pub metrics_interval: Duration,
    /// Operators whose signed requests are applied: name -> public NKey (`U...`). Empty
    /// (the default): a request is applied from anyone the broker lets publish on
    /// `skald.op.>`, and the name it claims is recorded as claimed. Not empty: a request
    /// must be signed by a listed key, and is recorded under that key's name; anything
    /// else is dead-lettered with the reason. Since 0.4.
    pub operators: std::collections::BTreeMap<String, String>,
    /// Most headers an inbound message may carry; more is dead-lettered. Default: 64.
    /// Since 0.4.
    pub max_headers: usize,
    /// Most bytes of one header (name and value) of an inbound message. Default: 4096.
    /// Since 0.4.
    pub max_header_bytes: usize,
    /// Most body bytes of an inbound message. Default: 1 MiB (the broker's own default
    /// max payload). Since 0.4.
    pub max_message_bytes: usize,
    /// Most bytes of inbound messages held at once (being applied or waiting for
    /// capacity): memory under a flood is bounded by bytes, not only by count. Default:
    /// 64 MiB. Since 0.4.
    pub max_in_flight_bytes: usize,
    /// A message deferred this many times for version skew (no build running here can
    /// apply it) is dead-lettered with the reason. With the redelivery backoff capped at
    /// 30 s, the default outlasts a deploy by far (about 3.5 days), while a message no
    /// build will ever take (a retired definition version) stops occupying the
    /// consumer's pending slots. Default: 10,000. Since 0.4.
    pub max_deferrals: u32,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            arbiters: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            idle_timeout: Duration::from_secs(30),
            wakeup_poll_interval: Duration::from_millis(500),
            max_in_flight_replies: 4096,
            commit_max_batch: 512,
            redelivery_delay: Duration::from_millis(500),
            publish_events: true,
            reply_group: "skald-orchestrator".into(),
            max_deliveries: 100,
            claim_lease: Duration::from_secs(5),
            outbox_poll_interval: Duration::from_millis(500),
            inbox_retention: Duration::from_secs(24 * 3600),
            outbox: None,
            journal_retry_window: 10,
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            sweep_interval: Duration::from_secs(60),
            metrics_interval: Duration::from_secs(10),
            operators: std::collections::BTreeMap::new(),
            max_headers: 64,
            max_header_bytes: 4096,
            max_message_bytes: 1024 * 1024,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_deferrals: 10_000,
        }
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
    /// The saga store (required).
    pub fn store(mut self, store: Arc<dyn SagaStore>) -> Self {
        self.store = Some(store);
        self
    }
    /// The bus (required).
    pub fn bus(mut self, bus: Arc<dyn Bus>) -> Self {
        self.bus = Some(bus);
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

    /// Starts the runtime: the commit loop, the outbox relay and the reply intake on the
    /// current tokio runtime, the actors on their own threads. On a bus that does not
    /// keep messages across a restart (the in-process bus), it then re-activates the
    /// unfinished sagas, re-sending the commands they wait on (lost with the process).
    pub async fn start(self) -> Result<Runtime, RuntimeError> {
        let store = self
            .store
            .ok_or_else(|| RuntimeError::Runtime("no store configured: call .store(..)".into()))?;
        let bus = self
            .bus
            .ok_or_else(|| RuntimeError::Runtime("no bus configured: call .bus(..)".into()))?;
        if let Some((ty, version)) = self.duplicate {
            return Err(RuntimeError::Runtime(format!(
                "saga type {ty} version {version} registered twice"
            )));
        }
        if self.definitions.is_empty() {
            return Err(RuntimeError::Runtime(
                "no saga definition registered: call .register(&definition)".into(),
            ));
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
        // An operator request is deduplicated by the inbox for as long as it may be
        // applied: the inbox must remember it at least that long.
        if self.options.inbox_retention < MAX_REQUEST_TTL {
            return Err(RuntimeError::Runtime(format!(
                "inbox_retention is {:?}: it must be at least {:?}, the longest an operator \
                 request may be applied, or a replayed request could be applied twice",
                self.options.inbox_retention, MAX_REQUEST_TTL
            )));
        }
        for (name, key) in &self.options.operators {
            crate::auth::check_operator_key(key)
                .map_err(|e| RuntimeError::Runtime(format!("operator {name:?}: {e}")))?;
        }
        let reply_keys = match self.reply_keys {
            Some(keys) => keys,
            None => {
                let secret = store
                    .shared_secret(
                        crate::auth::REPLY_KEY_SECRET,
                        &crate::auth::ReplyKeys::generate_key(),
                    )
                    .await?;
                crate::auth::ReplyKeys::new([secret]).map_err(|e| {
                    RuntimeError::Runtime(format!("the store's reply-token secret: {e}"))
                })?
            }
        };
        let io = tokio::runtime::Handle::try_current().map_err(|_| {
            RuntimeError::Runtime("Runtime::start must be called inside a tokio runtime".into())
        })?;
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
        });
        let publisher = tokio::spawn(publisher(Arc::clone(&shared), publisher_rx));

        // Subscribe before anything is sent, so no reply is missed. One consumer per
        // registered saga type for its replies, one for its operator requests: runtimes
        // with different sagas share a broker without touching each other's consumers,
        // and a deploy that adds a type adds consumers and changes none.
        let types: Vec<SagaType> = shared.definitions.types().cloned().collect();
        let per_type = (shared.options.max_in_flight_replies / types.len().max(1)).max(64);
        let mut inbound = Vec::with_capacity(types.len() * 2);
        for ty in &types {
            let group = &shared.options.reply_group;
            let replies = shared
                .bus
                .subscribe_bounded(
                    &[wire::reply_filter(ty)],
                    &reply_consumer(group, ty),
                    per_type,
                )
                .await?;
            let requests = shared
                .bus
                .subscribe_bounded(&[wire::op_filter(ty)], &op_consumer(group, ty), OP_PENDING)
                .await?;
            inbound.push(replies.map(|d| (Inbound::Reply, d)).boxed());
            inbound.push(requests.map(|d| (Inbound::Request, d)).boxed());
        }
        let replies = futures_util::stream::select_all(inbound);

        let (ready_tx, ready_rx) = oneshot::channel();
        let actor_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("skald-actors".into())
            .spawn(move || run_actor_system(actor_shared, ready_tx))
            .map_err(|e| RuntimeError::Runtime(format!("cannot spawn the actor thread: {e}")))?;
        let (registry, system) = ready_rx
            .await
            .map_err(|_| RuntimeError::Runtime("the actor system failed to start".into()))?;

        let intake = tokio::spawn(intake(Arc::clone(&shared), registry.clone(), replies));
        // What a crashed process left unpublished is published once its lease ends.
        let relay = tokio::spawn(relay(Arc::clone(&shared)));
        let holder = format!(
            "pid{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let sweeper = tokio::spawn(sweeper(Arc::clone(&shared), holder));
        let sampler = tokio::spawn(crate::metrics::sampler(Arc::clone(&shared)));
        let runtime = Runtime {
            shared,
            registry,
            system,
            thread: Some(thread),
            // The commit loop last: shutdown stops it after everything else.
            tasks: vec![sampler, intake, relay, sweeper, publisher, commit_task],
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

fn run_actor_system(shared: Arc<Shared>, ready: oneshot::Sender<(Addr<Registry>, actix::System)>) {
    let system = actix::System::new();
    let arbiters: Vec<Arbiter> = (0..shared.options.arbiters.max(1))
        .map(|_| Arbiter::new())
        .collect();
    let handles = arbiters.iter().map(Arbiter::handle).collect();
    system.block_on(async {
        let registry = Registry::new(Arc::clone(&shared), handles).start();
        RetrySupervisor::new(Arc::clone(&shared), registry.clone()).start();
        let _ = ready.send((registry, actix::System::current()));
    });
    if let Err(e) = system.run() {
        error!(error = %e, "actor system stopped with an error");
    }
    for a in arbiters {
        a.stop();
        let _ = a.join();
    }
}

/// A running skald runtime.
pub struct Runtime {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    system: actix::System,
    thread: Option<JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
            .map_err(|e| RuntimeError::Runtime(format!("registry unavailable: {e}")))?;
        match addr
            .send(Apply {
                input: input.clone(),
                inbox: inbox.clone(),
                condition: condition.clone(),
                span: tracing::Span::current(),
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

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// Starts a new saga of `definition`'s type with `data`. Returns once the saga is
    /// stored and its first command published.
    pub async fn start_saga<D>(
        &self,
        definition: &SagaDefinition<D>,
        data: &D,
    ) -> Result<SagaId, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        self.start_saga_with_id(SagaId::new(), definition, data)
            .await
    }

    /// Like [`Runtime::start_saga`], with a caller-chosen id (idempotent starts: a
    /// second start with the same id is refused by the store).
    pub async fn start_saga_with_id<D>(
        &self,
        id: SagaId,
        definition: &SagaDefinition<D>,
        data: &D,
    ) -> Result<SagaId, RuntimeError>
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
        let state = SagaState::new(id, def, definition.encode(data)?, self.shared.clock.now());
        let span = crate::trace::saga_span(&id, def.saga_type());
        deliver(&self.registry, id, Some(state), Input::Started, None, None)
            .instrument(span)
            .await?;
        Ok(id)
    }

    /// Feeds an input to a saga (operators: cancel, re-drive).
    pub async fn apply(&self, id: SagaId, input: Input) -> Result<Applied, RuntimeError> {
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

    /// Every saga that settles from now on (finished or dead-lettered).
    pub fn outcomes(&self) -> mpsc::Receiver<SagaOutcome> {
        self.shared.outcomes.subscribe()
    }

    /// Counters of the shell.
    pub fn stats(&self) -> &RuntimeStats {
        &self.shared.stats
    }

    /// Counters of the group commit loop.
    pub fn commit_stats(&self) -> &CommitStats {
        self.shared.committer.stats()
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
                    .map_err(|_| RuntimeError::Runtime("shutting down".into()))?;
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
        // Stop taking replies, then the actors; the commit loop goes last, so that a
        // transition in flight is committed (or not) as a whole, never cut in half.
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
        for t in &self.tasks {
            t.abort();
        }
        if self.thread.is_some() {
            self.system.stop();
        }
    }
}

/// Transitions whose messages may wait for the publisher at once.
const PUBLISHER_QUEUE: usize = 4096;

/// Which consumer an inbound message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// A participant's reply (`skald.reply.<service>.<type>.<partition>`).
    Reply,
    /// An operator's request (`skald.op.<type>.<partition>`).
    Request,
}

/// Unsettled operator requests per consumer: they are rare, and one at a time per saga.
const OP_PENDING: usize = 16;

/// The furthest ahead an operator request may expire: a request that claims to live
/// longer is refused, so no request can be replayed for days.
pub const MAX_REQUEST_TTL: Duration = Duration::from_secs(3600);

/// How often a message waiting for capacity tells the broker it is still being worked
/// on (well inside JetStream's default 30 s ack wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The durable consumer the replies of saga type `ty` are read with.
pub(crate) fn reply_consumer(group: &str, ty: &SagaType) -> String {
    format!("{group}-{ty}")
}

/// The durable consumer the operator requests about saga type `ty` are read with.
pub(crate) fn op_consumer(group: &str, ty: &SagaType) -> String {
    format!("{group}-op-{ty}")
}

/// The bytes a message holds in memory (subject, headers, body).
fn message_size(m: &Message) -> usize {
    m.subject.len()
        + m.payload.len()
        + m.headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
}

/// Refuses a message past the configured limits, with the reason.
fn check_limits(o: &RuntimeOptions, m: &Message) -> Result<(), String> {
    wire::InboundLimits {
        max_headers: o.max_headers,
        max_header_bytes: o.max_header_bytes,
        max_message_bytes: o.max_message_bytes,
    }
    .check(m)
}

/// Waits for `n` permits of `limit`, telling the broker every [`PROGRESS_EVERY`] that
/// `delivery` is still being worked on, so it is not redelivered meanwhile. `None` once
/// the semaphore is closed.
async fn acquire(
    limit: &Arc<Semaphore>,
    n: u32,
    delivery: &Delivery,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let wait = Arc::clone(limit).acquire_many_owned(n);
    tokio::pin!(wait);
    loop {
        match tokio::time::timeout(PROGRESS_EVERY, &mut wait).await {
            Ok(permit) => return permit.ok(),
            Err(_) => {
                if let Err(e) = delivery.progress().await {
                    debug!(error = %e, "telling the broker a message waits failed");
                }
            }
        }
    }
}

/// Reads replies and operator requests and feeds them to their sagas: check, decode,
/// deliver, then acknowledge only once the transition is committed. What can never be
/// applied is dead-lettered with the reason. At most `max_in_flight_replies` messages
/// and `max_in_flight_bytes` bytes are held at once.
async fn intake(
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    mut inbound: impl futures_util::Stream<Item = (Inbound, Delivery)> + Unpin,
) {
    let o = &shared.options;
    let count = Arc::new(Semaphore::new(o.max_in_flight_replies.max(1)));
    let max_bytes = o.max_in_flight_bytes.clamp(1, u32::MAX as usize);
    let bytes = Arc::new(Semaphore::new(max_bytes));
    while let Some((kind, mut delivery)) = inbound.next().await {
        // Past the limits: only a capped copy of the body is kept (for the dead
        // letter), so an oversized message holds neither memory nor the byte budget.
        let oversized = check_limits(o, &delivery.message).err().map(|reason| {
            let body = &delivery.message.payload;
            let (len, keep) = (body.len(), body.len().min(crate::ports::RECORD_MAX_BODY));
            delivery.message.payload = bytes::Bytes::copy_from_slice(&body[..keep]);
            (reason, len)
        });
        // A message larger than the whole budget takes all of it (the limits refuse
        // one unless the budget is below the message limit).
        let size = message_size(&delivery.message).clamp(1, max_bytes) as u32;
        let Some(one) = acquire(&count, 1, &delivery).await else {
            break;
        };
        let Some(held) = acquire(&bytes, size, &delivery).await else {
            break;
        };
        let shared = Arc::clone(&shared);
        let registry = registry.clone();
        tokio::spawn(async move {
            handle_inbound(&shared, &registry, kind, delivery, oversized).await;
            drop((one, held));
        });
    }
    debug!("reply intake stopped");
}

async fn handle_inbound(
    shared: &Arc<Shared>,
    registry: &Addr<Registry>,
    kind: Inbound,
    delivery: Delivery,
    oversized: Option<(String, usize)>,
) {
    let (message, delivery_count, acker) = delivery.into_parts();
    if let Some((reason, body_bytes)) = oversized {
        let count = delivery_count;
        return poison_sized(shared, &message, body_bytes, count, acker, None, reason).await;
    }
    match kind {
        Inbound::Reply => handle_reply(shared, registry, message, delivery_count, acker).await,
        Inbound::Request => {
            handle_operator_request(shared, registry, message, delivery_count, acker).await
        }
    }
}

/// Why a reply is not one skald asked for: its subject is not the service's its step
/// commands, or its token does not verify (`Err(Some(reason))`, the reason starting
/// with `forged reply:`), or it is of a saga type this process does not run
/// (`Err(None)`). Checked before anything is read from the store.
fn check_reply(
    shared: &Shared,
    subject: &str,
    reply: &wire::Envelope,
    token: Option<&str>,
) -> Result<(), Option<String>> {
    let Some((service, ty, _partition)) = wire::reply_subject_parts(subject) else {
        return Err(Some(format!(
            "forged reply: subject {:?} is not skald.reply.<service>.<saga_type>.<partition>",
            crate::ports::cap(subject, 128)
        )));
    };
    if ty != reply.saga_type.as_str() {
        return Err(Some(format!(
            "forged reply: it names saga type {} but arrived on the subject of saga type {ty}",
            reply.saga_type
        )));
    }
    if !shared.definitions.contains_type(&reply.saga_type) {
        return Err(None);
    }
    // The services the step's command goes to in any registered version (a definition
    // may move a step to another service between versions).
    let services: Vec<&str> = shared
        .definitions
        .pairs()
        .iter()
        .filter(|(t, _)| *t == reply.saga_type)
        .filter_map(|(t, v)| shared.definitions.get(t, *v))
        .filter_map(|d| d.steps().iter().find(|s| *s.name() == reply.step))
        .filter_map(|s| match reply.kind {
            crate::ids::CommandKind::Action => Some(s.action().subject()),
            crate::ids::CommandKind::Compensation => s.compensation().map(|c| c.subject()),
        })
        .map(crate::ids::service_of)
        .collect();
    // (A step no registered version has is refused by the machine as unknown, once
    // the token shows skald sent it.)
    if let Some(expected) = services.first()
        && !services.contains(&service)
    {
        return Err(Some(format!(
            "forged reply: the {} of step {} goes to service {expected}, but the reply \
             arrived on the reply subject of service {service}",
            reply.kind, reply.step
        )));
    }
    shared
        .reply_keys
        .verify(reply, token)
        .map_err(|reason| Some(format!("forged reply: {reason}")))
}

async fn handle_reply(
    shared: &Arc<Shared>,
    registry: &Addr<Registry>,
    message: Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
) {
    if wire::is_operator_request(&message) {
        let reason = format!(
            "an operator request on a reply subject: operator requests are read from \
             skald.op.<saga_type>.<partition> only (header {})",
            wire::H_OPERATOR_ACTION
        );
        return poison(shared, &message, delivery_count, acker, None, reason).await;
    }
    // Where it came from first, from the headers alone: a forged reply's body is never
    // parsed.
    let (head, token) = match wire::decode_reply_head(&message) {
        Ok(h) => h,
        Err(e) => {
            return poison(shared, &message, delivery_count, acker, None, e.to_string()).await;
        }
    };
    match check_reply(shared, &message.subject, &head, token.as_deref()) {
        Ok(()) => {}
        // Not a type this process runs (a bus without per-type consumers handed it
        // over): left for the process that runs it, never dead-lettered for it.
        Err(None) => {
            RuntimeStats::incr(&shared.stats.deferred);
            let delay = backoff(shared.options.redelivery_delay, delivery_count);
            return settle(acker.nak(delay).await);
        }
        // Filed under no saga: the sender chose the saga id.
        Err(Some(reason)) => {
            RuntimeStats::incr(&shared.stats.forged);
            return poison(shared, &message, delivery_count, acker, None, reason).await;
        }
    }
    let reply = match wire::decode_reply(&message) {
        Ok(r) => r,
        Err(e) => {
            let saga = Some(head.saga_id);
            return poison(shared, &message, delivery_count, acker, saga, e.to_string()).await;
        }
    };
    // The inbox id comes from the verified headers, not from the sender's Nats-Msg-Id.
    let inbox = Some(crate::ids::reply_message_id(
        &reply.idempotency_key,
        reply.attempt,
        reply.outcome.as_str(),
    ));
    let span = crate::trace::reply_span(&reply, &message);
    let retryable = matches!(reply.outcome, Outcome::Retryable(_));
    let input = match reply.outcome {
        Outcome::Success(output) => Input::StepSucceeded {
            step: reply.step,
            kind: reply.kind,
            attempt: reply.attempt,
            output,
        },
        Outcome::Failure(error) | Outcome::Retryable(error) => Input::StepFailed {
            retryable,
            step: reply.step,
            kind: reply.kind,
            attempt: reply.attempt,
            error,
            jitter: shared.jitter.draw(),
        },
    };
    let result = deliver(registry, reply.saga_id, None, input, inbox, None)
        .instrument(span)
        .await;
    settle_delivery(
        shared,
        &message,
        delivery_count,
        acker,
        reply.saga_id,
        result,
        "reply",
    )
    .await
}

/// Acknowledges, redelivers, defers or dead-letters a message by what applying it gave.
async fn settle_delivery(
    shared: &Arc<Shared>,
    message: &Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
    saga_id: SagaId,
    result: Result<Applied, RuntimeError>,
    what: &str,
) {
    let e = match result {
        Ok(applied) => {
            debug!(saga.id = %saga_id, ?applied, "{what} applied");
            return settle(acker.ack().await);
        }
        Err(e) => e,
    };
    match e.disposition() {
        // The store is down or busy: keep the message for as long as that lasts (not
        // counted against max_deliveries), backing off.
        Disposition::Retry if is_store_outage(&e) => {
            if let RuntimeError::Store(err @ StoreError::Schema(_)) = &e {
                shared.fatal.send_replace(Some(err.clone()));
            }
            let delay = backoff(shared.options.redelivery_delay, delivery_count);
            warn!(saga.id = %saga_id, error = %e, delay_ms = delay.as_millis() as u64, "store unavailable; {what} redelivered later");
            settle(acker.nak(delay).await)
        }
        // Version skew: a newer (or older) build beside this one must apply it. Never
        // counted against max_deliveries; dead-lettered only past max_deferrals.
        Disposition::Defer if delivery_count < shared.options.max_deferrals => {
            // (The actor counted a deferral for data too new already.)
            if !matches!(e, RuntimeError::DataTooNew(_)) {
                RuntimeStats::incr(&shared.stats.deferred);
            }
            let delay = backoff(shared.options.redelivery_delay, delivery_count);
            debug!(saga.id = %saga_id, error = %e, delay_ms = delay.as_millis() as u64, "{what} deferred to another build");
            settle(acker.nak(delay).await)
        }
        Disposition::Retry if delivery_count < shared.options.max_deliveries => {
            warn!(saga.id = %saga_id, error = %e, "{what} not applied; redelivering later");
            let delay = backoff(shared.options.redelivery_delay, delivery_count);
            settle(acker.nak(delay).await)
        }
        disposition => {
            let reason = match disposition {
                Disposition::Retry => format!("not applied after {delivery_count} deliveries: {e}"),
                Disposition::Defer => {
                    format!(
                        "not applied after {delivery_count} deliveries (max_deferrals), the \
                         last deferred for version skew: no build running applied it: {e}"
                    )
                }
                _ => e.to_string(),
            };
            poison(
                shared,
                message,
                delivery_count,
                acker,
                Some(saga_id),
                reason,
            )
            .await
        }
    }
}

/// Who sent an operator request: the allowlist's name for the key that signed it, or,
/// with no allowlist, the name the request claims (the broker's permission on
/// `skald.op.>` is then the only check). Refused with the reason otherwise.
fn verify_operator(o: &RuntimeOptions, r: &wire::OperatorRequest) -> Result<(), String> {
    if o.operators.is_empty() {
        return Ok(());
    }
    let (Some(key), Some(signature)) = (&r.key, &r.signature) else {
        return Err(format!(
            "unsigned: this runtime applies only requests signed by a listed operator key \
             ({} and {})",
            wire::H_OPERATOR_KEY,
            wire::H_SIGNATURE
        ));
    };
    let Some((name, _)) = o.operators.iter().find(|(_, k)| *k == key) else {
        return Err(format!(
            "operator key {} is not in this runtime's allowlist",
            crate::ports::cap(key, 64)
        ));
    };
    crate::auth::verify_signature(key, &wire::operator_signing_bytes(r), signature)?;
    // The name in the request id (the journal's causation) is the listed one.
    if r.operator != wire::operator_name(name)
        || !r
            .request_id
            .starts_with(&format!("op:{}:", wire::operator_name(name)))
    {
        return Err(format!(
            "signed by operator {name}, but the request names operator {:?}",
            r.operator
        ));
    }
    Ok(())
}

/// Applies an operator's request (`skald dlq redrive`, `skald cancel`) through the saga's
/// actor like a reply: journaled with the request id as causation, deduplicated by the
/// inbox. A request whose sender cannot be verified never reaches the saga (it is
/// dead-lettered); one that expired or whose condition does not hold, or that the saga
/// refuses (not dead-lettered, already finished), is journaled as ignored, with the
/// reason, for the operator's tool to report.
async fn handle_operator_request(
    shared: &Arc<Shared>,
    registry: &Addr<Registry>,
    message: Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
) {
    let request = match wire::decode_operator_request(&message) {
        Ok(r) => r,
        Err(e) => {
            return poison(shared, &message, delivery_count, acker, None, e.to_string()).await;
        }
    };
    let (saga_id, request_id) = (request.saga_id, request.request_id.clone());
    let expires_at_ms = request.expires_at_ms;
    let refused = |reason: String| format!("operator request {request_id} refused: {reason}");
    let mut tokens = message.subject.split('.');
    let subject_type = match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some("skald"), Some("op"), Some(ty), Some(p))
            if tokens.next().is_none() && p.parse::<u32>().is_ok() =>
        {
            Some(ty)
        }
        _ => None,
    };
    if subject_type != Some(request.saga_type.as_str()) {
        let reason = refused(format!(
            "it names saga type {} but arrived on {:?}",
            request.saga_type,
            crate::ports::cap(&message.subject, 128)
        ));
        return poison(shared, &message, delivery_count, acker, None, reason).await;
    }
    // Refusals of a request whose sender is not verified are filed under no saga: the
    // sender chose the saga id.
    if let Err(reason) = verify_operator(&shared.options, &request) {
        RuntimeStats::incr(&shared.stats.forged);
        let reason = refused(reason);
        return poison(shared, &message, delivery_count, acker, None, reason).await;
    }
    let now = shared.clock.now();
    let latest = now.plus(MAX_REQUEST_TTL).as_millis();
    if request.expires_at_ms > latest {
        let reason = refused(format!(
            "it expires at {} ms, more than {} s ahead",
            request.expires_at_ms,
            MAX_REQUEST_TTL.as_secs()
        ));
        return poison(
            shared,
            &message,
            delivery_count,
            acker,
            Some(saga_id),
            reason,
        )
        .await;
    }
    let condition = crate::actors::Condition {
        expires_at: Timestamp(request.expires_at_ms),
        if_redrives: request.if_redrives,
        if_version: request.if_version,
    };
    let input = match request.action {
        wire::OperatorAction::Redrive => Input::Redriven,
        wire::OperatorAction::Cancel { reason } => Input::CancelRequested { reason },
    };
    // The request's id keys the inbox: a request sent twice is applied once.
    let inbox = Some(request_id.clone());
    let result = deliver(registry, saga_id, None, input, inbox, Some(condition)).await;
    if let Ok(applied) = &result {
        info!(saga.id = %saga_id, request = %request_id, ?applied, "operator request settled");
    }
    // Expired, and this build cannot run the saga (version skew): no build may apply
    // it any more, so it is not left to another one.
    if let Err(e) = &result
        && e.disposition() == Disposition::Defer
        && shared.clock.now() > Timestamp(expires_at_ms)
    {
        let reason = refused(format!(
            "it expired, and this build cannot run the saga: {e}"
        ));
        return poison(
            shared,
            &message,
            delivery_count,
            acker,
            Some(saga_id),
            reason,
        )
        .await;
    }
    settle_delivery(
        shared,
        &message,
        delivery_count,
        acker,
        saga_id,
        result,
        "operator request",
    )
    .await
}

/// A store outage (or a fatal schema problem, which stops the process): never a reason
/// to give a message up.
fn is_store_outage(e: &RuntimeError) -> bool {
    matches!(
        e,
        RuntimeError::Store(StoreError::Unavailable(_) | StoreError::Schema(_))
    )
}

/// `base * 2^(n-1)`, at most 30 s.
fn backoff(base: Duration, delivery_count: u32) -> Duration {
    let exp = delivery_count.saturating_sub(1).min(8);
    (base * (1u32 << exp)).min(Duration::from_secs(30))
}

fn settle(result: Result<(), crate::ports::BusError>) {
    if let Err(e) = result {
        // The broker redelivers an unacknowledged message; the inbox/idempotency makes
        // that harmless.
        warn!(error = %e, "acknowledging a reply failed");
    }
}

/// Dead-letters a message that can never be processed, then terminates it.
async fn poison(
    shared: &Arc<Shared>,
    message: &Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
    saga_id: Option<SagaId>,
    reason: String,
) {
    let body_bytes = message.payload.len();
    poison_sized(
        shared,
        message,
        body_bytes,
        delivery_count,
        acker,
        saga_id,
        reason,
    )
    .await
}

/// [`poison`] of a message whose body had `body_bytes` bytes before the intake cut it.
async fn poison_sized(
    shared: &Arc<Shared>,
    message: &Message,
    body_bytes: usize,
    delivery_count: u32,
    acker: Box<dyn Acker>,
    saga_id: Option<SagaId>,
    reason: String,
) {
    // The reason may quote what the sender wrote: keep it short.
    let reason = crate::ports::cap(&reason, 2048).to_owned();
    RuntimeStats::incr(&shared.stats.poison);
    warn!(subject = %message.subject, reason, "poison message dead-lettered");
    let record = DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: DeadLetterCategory::Poison,
        saga_id,
        // Only what parses as a type or step name: these fields are not capped.
        saga_type: message
            .headers
            .get(wire::H_SAGA_TYPE)
            .filter(|t| SagaType::new(*t).is_ok())
            .map(str::to_owned),
        step: message
            .headers
            .get(wire::H_STEP)
            .filter(|s| crate::ids::StepName::new(*s).is_ok())
            .map(str::to_owned),
        kind: message
            .headers
            .get(wire::H_KIND)
            .and_then(|k| k.parse().ok()),
        reason: reason.clone(),
        attempts: delivery_count,
        message: Some(message.to_record_of(body_bytes)),
        at: shared.clock.now(),
        resolved_at: None,
    };
    // Also on the bus, for whoever watches dead letters: through the outbox, so the
    // announcement is as durable as the record.
    let saga_type = record
        .saga_type
        .as_deref()
        .and_then(|t| SagaType::new(t).ok());
    let mut headers = crate::ports::Headers::new();
    headers.insert(wire::H_MSG_ID, format!("dlq:poison:{}", record.id));
    headers.insert(wire::H_SCHEMA_VERSION, "1");
    let outbox: Vec<OutboxMessage> = serde_json::to_vec(&record)
        .ok()
        .map(|body| OutboxMessage {
            id: uuid::Uuid::now_v7(),
            message: Message {
                subject: wire::dlq_subject(saga_type.as_ref()),
                headers,
                payload: body.into(),
            },
            available_at: record.at.plus(shared.options.claim_lease),
        })
        .into_iter()
        .collect();
    let mut recorded = shared.store.record_poison(&record, &outbox).await;
    if let Err(e) = &recorded
        && !e.is_retryable()
        && !matches!(e, StoreError::Schema(_))
    {
        // The store refuses the raw message (say, bytes it cannot hold as text): keep
        // the record without it rather than redeliver the message forever.
        let mut bare = record.clone();
        bare.message = None;
        bare.reason = format!("{} (the raw message could not be stored: {e})", bare.reason);
        recorded = shared.store.record_poison(&bare, &outbox).await;
    }
    match recorded {
        Ok(()) => {
            publish_outbox(shared, outbox).await;
            settle(acker.term(&reason).await)
        }
        Err(e) => {
            if let StoreError::Schema(_) = &e {
                shared.fatal.send_replace(Some(e.clone()));
            }
            // Not recorded: keep the message (redeliver) rather than lose it.
            let delay = backoff(shared.options.redelivery_delay, delivery_count);
            warn!(error = %e, "recording a poison message failed; redelivering later");
            settle(acker.nak(delay).await)
        }
    }
}

/// A command stored by a build before reply tokens (its `Skald-Reply-To` is the old
/// `skald.reply.<type>`, and it has no token) gets the reply subject of its service and
/// a token, so that its reply is accepted.
fn restamp_reply(shared: &Shared, m: &mut Message) {
    if m.headers.get(wire::H_REPLY_TOKEN).is_some() {
        return;
    }
    let Ok(command) = wire::decode_command(m) else {
        return;
    };
    let env = &command.envelope;
    let subject = wire::reply_subject(
        crate::ids::service_of(&m.subject),
        &env.saga_type,
        wire::DEFAULT_PARTITION,
    );
    m.headers.insert(wire::H_REPLY_TO, subject);
    m.headers
        .insert(wire::H_REPLY_TOKEN, shared.reply_keys.token(env));
}

/// Publishes outbox rows their writers left behind (a crash, a broker outage): claims
/// the available ones for a lease, publishes them in commit order, reports them
/// published.
async fn relay(shared: Arc<Shared>) {
    const BATCH: usize = 512;
    loop {
        let now = shared.clock.now();
        match shared
            .store
            .claim_outbox(now, shared.options.claim_lease, BATCH)
            .await
        {
            Ok(rows) if !rows.is_empty() => {
                let claimed = rows.len();
                let rows = rows
                    .into_iter()
                    .map(|r| upcast_command(&shared, r))
                    .collect();
                let published = publish_outbox(&shared, rows).await;
                shared
                    .stats
                    .relayed
                    .fetch_add(published as u64, std::sync::atomic::Ordering::Relaxed);
                debug!(claimed, published, "outbox relay");
                if published == claimed && claimed == BATCH {
                    continue; // more may be waiting
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let StoreError::Schema(_) = &e {
                    shared.fatal.send_replace(Some(e.clone()));
                }
                warn!(error = %e, "outbox relay: claiming rows failed; will retry");
            }
        }
        tokio::time::sleep(shared.options.outbox_poll_interval).await;
    }
}

/// The retention sweeper: every `sweep_interval`, the process holding the `retention`
/// lease deletes the finished sagas older than `retention` (in batches) and the inbox
/// ids past `inbox_retention`, and records what it did for `skald stats`. The lease
/// outlives two intervals, so a dead holder is replaced within that time.
async fn sweeper(shared: Arc<Shared>, holder: String) {
    const BATCH: usize = 1_000;
    const LEASE: &str = "retention";
    let interval = shared.options.sweep_interval.max(Duration::from_millis(10));
    let lease = interval * 2 + Duration::from_secs(5);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    loop {
        let now = shared.clock.now();
        match shared.store.acquire_lease(LEASE, &holder, now, lease).await {
            Ok(true) => {
                let mut report = crate::ports::PurgeReport::default();
                let mut failed = None;
                if let Some(retention) = shared.options.retention {
                    let before = Timestamp(now.as_millis().saturating_sub(ms(retention)));
                    loop {
                        match shared.store.purge_finished(before, BATCH).await {
                            Ok(r) => {
                                report.add(&r);
                                // Poison records of no saga are purged in the same
                                // batches: go on while either filled one.
                                if r.sagas < BATCH as u64 && r.dead_letters < BATCH as u64 {
                                    break;
                                }
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                }
                let before = Timestamp(
                    now.as_millis()
                        .saturating_sub(ms(shared.options.inbox_retention)),
                );
                match shared.store.prune_inbox(before).await {
                    Ok(n) => report.inbox = n,
                    Err(e) => failed = failed.or(Some(e)),
                }
                if let Err(e) = shared
                    .store
                    .record_sweep(LEASE, &holder, now, &report)
                    .await
                {
                    failed = failed.or(Some(e));
                }
                match failed {
                    Some(e) => warn!(error = %e, "retention sweep incomplete; will retry"),
                    None if report.sagas > 0 || report.inbox > 0 => info!(
                        sagas = report.sagas,
                        journal_entries = report.journal_entries,
                        dead_letters = report.dead_letters,
                        inbox = report.inbox,
                        "retention sweep"
                    ),
                    None => {}
                }
            }
            Ok(false) => debug!("retention sweep: another process holds the lease"),
            Err(e) => {
                if let StoreError::Schema(_) = &e {
                    shared.fatal.send_replace(Some(e.clone()));
                }
                warn!(error = %e, "retention sweep: taking the lease failed; will retry");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// A command row left in the outbox by an older build may carry a payload of an older
/// schema version than its step now declares: brings it up with the upcasters
/// registered for its subject. (The writer's own rows are always current; events and
/// dead letters have public schemas of their own.) If no path exists the row goes out
/// as it was, with its version header, for the participant to accept or refuse by name.
fn upcast_command(shared: &Shared, mut row: OutboxMessage) -> OutboxMessage {
    if !row.message.subject.starts_with(wire::COMMAND_PREFIX) {
        return row;
    }
    restamp_reply(shared, &mut row.message);
    let m = &row.message;
    let header = |name: &str| m.headers.get(name);
    let number = |name: &str| header(name).and_then(|v| v.parse::<u32>().ok());
    let (Some(ty), Some(step)) = (
        header(wire::H_SAGA_TYPE).and_then(|t| SagaType::new(t).ok()),
        header(wire::H_STEP),
    ) else {
        return row;
    };
    // Builds before schema versions sent neither header: their payloads are version 1,
    // and the step is found in the one registered version that has it.
    let from = number(wire::H_SCHEMA_VERSION).unwrap_or(1);
    let step_of = |d: &Arc<crate::definition::Definition>| {
        d.steps()
            .iter()
            .find(|s| s.name().as_str() == step)
            .map(|s| s.schema_version())
    };
    let to = match number(wire::H_DEFINITION_VERSION) {
        Some(dv) => shared.definitions.get(&ty, dv).and_then(step_of),
        None => {
            let candidates: Vec<u32> = shared
                .definitions
                .pairs()
                .into_iter()
                .filter(|(t, _)| *t == ty)
                .filter_map(|(t, v)| shared.definitions.get(&t, v).and_then(step_of))
                .collect();
            match candidates.as_slice() {
                [only] => Some(*only),
                _ => None,
            }
        }
    };
    let Some(to) = to else {
        return row;
    };
    if from >= to {
        return row;
    }
    let payload = match serde_json::from_slice::<serde_json::Value>(&m.payload) {
        Ok(p) => p,
        Err(_) => return row,
    };
    match shared.upcasters.upcast(&m.subject, payload, from, to) {
        Ok(up) => match serde_json::to_vec(&up) {
            Ok(bytes) => {
                row.message.payload = bytes.into();
                row.message
                    .headers
                    .insert(wire::H_SCHEMA_VERSION, to.to_string());
            }
            Err(e) => {
                warn!(subject = %row.message.subject, error = %e, "re-encoding an upcast command failed; sent as stored")
            }
        },
        Err(e) => {
            warn!(subject = %row.message.subject, error = %e, "an outbox command of an older schema version is sent as stored");
        }
    }
    row
}
