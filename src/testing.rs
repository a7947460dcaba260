//! Test kits for your sagas, both with virtual time (docs/testing.md):
//!
//! - [`SagaTest`] (from `skald-core`): one saga of a definition run through the pure
//!   state machine. The test plays the participants and the clock; no actors, store or
//!   bus. A whole saga's test runs in microseconds. The unit test of a definition.
//! - [`TestRuntime`]: a real [`Runtime`] on the in-memory store and bus, its clock a
//!   manual one that only [`TestRuntime::advance`] moves, with scripted participants
//!   that answer commands over the bus as a service would ([`TestRuntime::on`]). It
//!   runs everything [`SagaTest`] does not: the actors, the group commit, the outbox
//!   and the publisher, the reply intake (subjects, reply tokens, inbox), the wake-up
//!   sweep, saga handles. The integration test of a service's sagas.
//!
//! Every `TestRuntime` call that lets the runtime work returns once it has settled:
//! every command sent has reached its participant, every scripted reply has been
//! applied (or ignored) and every wake-up due by the virtual clock has fired. So a test
//! reads like a script, with no sleeps and no polling of its own:
//!
//! ```
//! use std::time::Duration;
//!
//! use serde_json::json;
//! use skald::machine::SagaStatus;
//! use skald::testing::{Reply, TestRuntime};
//! use skald_sagas::checkout::{Checkout, CheckoutTiming, LineItem, checkout_definition, subjects};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), skald::RuntimeError> {
//! let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
//! let t = TestRuntime::builder().register(&checkout).start().await?;
//! t.on(subjects::RESERVE, |_| Reply::success(json!({ "reservation_id": "r-1" })))
//!     .on(subjects::CHARGE, |_| Reply::no_reply()) // the payment gateway is down
//!     .on(subjects::REFUND, |_| Reply::success(json!(null)))
//!     .on(subjects::RELEASE, |_| Reply::success(json!(null)));
//! let tea = LineItem { sku: "tea".into(), quantity: 2 };
//! let order = Checkout::new("order-1", "alice", vec![tea], 1_250);
//!
//! // Reserved, and the charge sent: the saga waits for its answer.
//! let saga = t.start(&checkout, &order).await?;
//! assert_eq!(saga.status().await?, SagaStatus::Running);
//!
//! // Five attempts of 10 s each and the backoffs between them, in no time.
//! t.advance(Duration::from_secs(60)).await;
//! assert_eq!(t.commands_on(subjects::CHARGE).len(), 5);
//! let outcome = saga.state().await?;
//! assert_eq!(outcome.status, SagaStatus::Compensated);
//! assert!(outcome.in_doubt, "the charge may have happened: refunded by its key");
//! # Ok(()) }
//! ```
//!
//! [`Runtime`]: skald_runtime::runtime::Runtime

pub use skald_runtime::testing::*;

// The runtime harness needs the in-memory adapters (feature `memory`) and serde and
// serde_json, which the facade has with the `cli` feature (both are on by default).
#[cfg(feature = "memory")]
pub use self::harness::{Received, Reply, TestRuntime, TestRuntimeBuilder};

#[cfg(feature = "memory")]
mod harness {
    use std::collections::{BTreeSet, HashMap, HashSet};
    use std::fmt;
    use std::panic::AssertUnwindSafe;
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
    use std::time::{Duration, Instant};

    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use serde_json::Value;
    use skald_adapters::memory::{MemoryBus, MemoryStore};
    use skald_runtime::actors::Applied;
    use skald_runtime::definition::{Definition, SagaDefinition};
    use skald_runtime::error::RuntimeError;
    use skald_runtime::ids::{self, CommandKind, SagaId};
    use skald_runtime::machine::{Phase, SagaState, StepError, Timestamp};
    use skald_runtime::participant::{self, ParticipantHandle, ParticipantOptions};
    use skald_runtime::ports::{Bus, Clock, FixedJitter, ManualClock, SagaStore};
    use skald_runtime::runtime::{Runtime, RuntimeBuilder, RuntimeOptions, SagaHandle, SagaView};
    use skald_runtime::wire::{self, IncomingCommand, Outcome};
    use tokio::sync::Notify;

    /// The consumer group the scripted participants read commands in.
    const GROUP: &str = "skald-testing";

    /// How often a settling harness looks again when nothing told it to.
    const POLL: Duration = Duration::from_millis(1);

    /// Wake-ups [`TestRuntime::outcome`] fires for one saga before it gives up.
    const MAX_WAKEUPS: usize = 100_000;

    /// What a scripted participant answers to a command.
    #[derive(Debug, Clone, PartialEq)]
    #[non_exhaustive]
    pub enum Reply {
        /// Done; the output goes to the step's `on_success`.
        Success(Value),
        /// Failed: `retryable` (the step's policy tries again after its backoff) or
        /// permanent (the saga compensates, or dead-letters a failed compensation).
        Failure {
            /// The error reported.
            error: StepError,
            /// Whether trying again may succeed.
            retryable: bool,
        },
        /// No answer: the attempt times out at its deadline, once virtual time passes it.
        /// The command is kept ([`TestRuntime::commands`]) for the test to answer later,
        /// late if it likes ([`TestRuntime::reply`]).
        NoReply,
    }

    impl Reply {
        /// Success with `output` (what the step's `on_success` reads): a typed output
        /// struct, or `serde_json::json!(..)`. Panics if it does not serialize.
        pub fn success(output: impl Serialize) -> Reply {
            Reply::Success(
                serde_json::to_value(output).unwrap_or_else(|e| {
                    panic!("Reply::success: the output does not serialize: {e}")
                }),
            )
        }

        /// A failure of code `code` (also its message): `retryable`, or permanent.
        pub fn fail(code: &str, retryable: bool) -> Reply {
            Reply::failure(StepError::new(code, code), retryable)
        }

        /// A failure with a whole error.
        pub fn failure(error: StepError, retryable: bool) -> Reply {
            Reply::Failure { error, retryable }
        }

        /// No answer: the attempt times out.
        pub fn no_reply() -> Reply {
            Reply::NoReply
        }

        /// The outcome on the wire; `None` for [`Reply::NoReply`].
        pub fn outcome(&self) -> Option<Outcome> {
            match self {
                Reply::Success(v) => Some(Outcome::Success(v.clone())),
                Reply::Failure {
                    error,
                    retryable: true,
                } => Some(Outcome::Retryable(error.clone())),
                Reply::Failure {
                    error,
                    retryable: false,
                } => Some(Outcome::Failure(error.clone())),
                Reply::NoReply => None,
            }
        }
    }

    /// A command as the scripted participant received it from the bus.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Received {
        command: IncomingCommand,
        at: Timestamp,
        reply: Reply,
    }

    impl Received {
        /// The subject it arrived on.
        pub fn subject(&self) -> &str {
            &self.command.subject
        }

        /// The saga that sent it.
        pub fn saga_id(&self) -> SagaId {
            self.command.envelope.saga_id
        }

        /// The step it is for.
        pub fn step(&self) -> &str {
            self.command.envelope.step.as_str()
        }

        /// Action or compensation.
        pub fn kind(&self) -> CommandKind {
            self.command.envelope.kind
        }

        /// The attempt (from 1).
        pub fn attempt(&self) -> u32 {
            self.command.envelope.attempt
        }

        /// The command's body (what the step's payload function built).
        pub fn payload(&self) -> &Value {
            &self.command.payload
        }

        /// The idempotency key (the same for every attempt of the step's action or
        /// compensation).
        pub fn idempotency_key(&self) -> &str {
            &self.command.envelope.idempotency_key
        }

        /// Whether the action's outcome was unknown when this (compensation) was sent.
        pub fn in_doubt(&self) -> bool {
            self.command.in_doubt
        }

        /// When the saga stops waiting for this attempt (virtual time).
        pub fn deadline(&self) -> Duration {
            Duration::from_millis(self.command.deadline_ms)
        }

        /// When it was received (virtual time).
        pub fn received_at(&self) -> Duration {
            Duration::from_millis(self.at.as_millis())
        }

        /// What the script answered ([`Reply::NoReply`] for a subject with no script).
        pub fn reply(&self) -> &Reply {
            &self.reply
        }

        /// The command, whole, as decoded from the wire.
        pub fn command(&self) -> &IncomingCommand {
            &self.command
        }
    }

    impl fmt::Display for Received {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{} of {} (attempt {}) on {}",
                self.kind(),
                self.step(),
                self.attempt(),
                self.subject()
            )
        }
    }

    type Script = Box<dyn FnMut(&Received) -> Reply + Send>;

    /// A reply published (by a script, or by the test) and not yet seen applied.
    #[derive(Debug, Clone)]
    struct Outstanding {
        seq: u64,
        saga: SagaId,
        step: String,
        kind: CommandKind,
        attempt: u32,
        /// The id the runtime's inbox and journal know the reply by.
        inbox_id: String,
        /// Answered to the attempt the saga was waiting for when it was sent (a script's
        /// answer on receipt, or a hand-sent one to the awaited attempt).
        scripted: bool,
        what: String,
    }

    #[derive(Default)]
    struct DeskState {
        scripts: HashMap<String, Arc<Mutex<Script>>>,
        received: Vec<Received>,
        seen: HashSet<(SagaId, String, CommandKind, u32)>,
        outstanding: Vec<Outstanding>,
        next_seq: u64,
        panics: Vec<String>,
    }

    /// The scripted participants: what they were sent, what they answer.
    struct Desk {
        state: Mutex<DeskState>,
        notify: Notify,
        clock: ManualClock,
    }

    impl Desk {
        fn lock(&self) -> MutexGuard<'_, DeskState> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Records a command and asks its script for the reply (called by the
        /// participant helper, before it publishes that reply).
        fn receive(&self, command: IncomingCommand) -> Option<Outcome> {
            let mut received = Received {
                command,
                at: self.clock.now(),
                reply: Reply::NoReply,
            };
            let script = self.lock().scripts.get(received.subject()).cloned();
            if let Some(script) = script {
                let mut script = script.lock().unwrap_or_else(PoisonError::into_inner);
                match std::panic::catch_unwind(AssertUnwindSafe(|| (*script)(&received))) {
                    Ok(reply) => received.reply = reply,
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        self.lock().panics.push(format!(
                            "the script for {} panicked on the {received}: {msg}",
                            received.subject()
                        ));
                    }
                }
            }
            let outcome = received.reply.outcome();
            let mut st = self.lock();
            st.seen.insert((
                received.saga_id(),
                received.step().to_owned(),
                received.kind(),
                received.attempt(),
            ));
            if let Some(outcome) = &outcome {
                st.track(&received, outcome, true);
            }
            st.received.push(received);
            drop(st);
            self.notify.notify_one();
            outcome
        }
    }

    impl DeskState {
        fn track(&mut self, received: &Received, outcome: &Outcome, scripted: bool) {
            self.next_seq += 1;
            self.outstanding.push(Outstanding {
                seq: self.next_seq,
                saga: received.saga_id(),
                step: received.step().to_owned(),
                kind: received.kind(),
                attempt: received.attempt(),
                inbox_id: ids::reply_message_id(
                    received.idempotency_key(),
                    received.attempt(),
                    outcome.as_str(),
                ),
                scripted,
                what: format!("the {} reply to the {received}", outcome.as_str()),
            });
        }
    }

    /// Where the runtime stands, as one look at the store shows it.
    struct Look {
        /// A wake-up is due by the virtual clock.
        due: bool,
        /// Something is under way (a command not yet received, a reply not yet
        /// applied): what, for the message of a harness that cannot settle.
        busy: Option<String>,
        /// The earliest wake-up of any saga.
        next: Option<Timestamp>,
    }

    /// Builds a [`TestRuntime`]: [`TestRuntime::builder`].
    pub struct TestRuntimeBuilder {
        builder: RuntimeBuilder,
        definitions: Vec<Arc<Definition>>,
        options: RuntimeOptions,
        jitter: f64,
        settle_timeout: Duration,
    }

    impl fmt::Debug for TestRuntimeBuilder {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("TestRuntimeBuilder")
                .field("builder", &self.builder)
                .field("jitter", &self.jitter)
                .field("settle_timeout", &self.settle_timeout)
                .finish_non_exhaustive()
        }
    }

    impl TestRuntimeBuilder {
        /// Registers a saga definition (as [`RuntimeBuilder::register`]). The scripted
        /// participants serve every command subject of the registered definitions.
        pub fn register<D>(mut self, definition: &SagaDefinition<D>) -> Self {
            self.builder = self.builder.register(definition);
            self.definitions.push(Arc::clone(definition.definition()));
            self
        }

        /// Changes the runtime's options. The harness starts from
        /// [`RuntimeOptions::default`] with one arbiter, no retention sweep (it runs on
        /// a real-time interval and would delete finished sagas by virtual time) and no
        /// periodic wake-up sweep (the harness fires wake-ups when it moves the clock).
        pub fn options(mut self, change: impl FnOnce(&mut RuntimeOptions)) -> Self {
            change(&mut self.options);
            self
        }

        /// The jitter draw of every retry delay, in `[0, 1)` (default 0: each delay is
        /// its policy's full exponential cap, as in [`SagaTest`](super::SagaTest)).
        pub fn jitter(mut self, draw: f64) -> Self {
            self.jitter = draw;
            self
        }

        /// How long (real time) a call waits for the runtime to settle before it panics
        /// saying what is still under way. Default: 5 s.
        pub fn settle_timeout(mut self, timeout: Duration) -> Self {
            self.settle_timeout = timeout;
            self
        }

        /// Starts the runtime (on the current tokio runtime, which must be a
        /// multi-thread one: `#[tokio::test(flavor = "multi_thread")]`) on a fresh
        /// in-memory store and bus, with the virtual clock at 0, and the scripted
        /// participants, which answer nothing until told to ([`TestRuntime::on`]).
        pub async fn start(self) -> Result<TestRuntime, RuntimeError> {
            let clock = ManualClock::new(Timestamp(0));
            let store = Arc::new(MemoryStore::new());
            let bus = MemoryBus::new();
            let runtime = self
                .builder
                .store(Arc::clone(&store))
                .bus(bus.clone())
                .clock(Arc::new(clock.clone()))
                .jitter(Arc::new(FixedJitter(self.jitter)))
                .options(self.options)
                .start()
                .await?;
            let desk = Arc::new(Desk {
                state: Mutex::new(DeskState::default()),
                notify: Notify::new(),
                clock: clock.clone(),
            });
            let subjects: BTreeSet<String> = self
                .definitions
                .iter()
                .flat_map(|d| d.steps())
                .flat_map(|s| {
                    std::iter::once(s.action().subject().to_owned())
                        .chain(s.compensation().map(|c| c.subject().to_owned()))
                })
                .collect();
            let shared_bus: Arc<dyn Bus> = Arc::new(bus.clone());
            let mut participants = Vec::with_capacity(subjects.len());
            for subject in &subjects {
                // The participant helper services use: commands decoded from the wire,
                // deadlines checked by the virtual clock, replies encoded with the
                // command's reply subject and token. A command left unanswered holds
                // its handler (and a slot) for good: the slots are many.
                let options = ParticipantOptions {
                    concurrency: Some(1 << 20),
                    clock: Some(Arc::new(clock.clone())),
                    ..ParticipantOptions::default()
                };
                let handler_desk = Arc::clone(&desk);
                let handle = participant::serve_with(
                    Arc::clone(&shared_bus),
                    subject,
                    GROUP,
                    options,
                    move |command: IncomingCommand| {
                        let outcome = handler_desk.receive(command);
                        async move {
                            match outcome {
                                Some(outcome) => outcome,
                                None => std::future::pending().await,
                            }
                        }
                    },
                )
                .await?;
                participants.push(handle);
            }
            Ok(TestRuntime {
                runtime,
                clock,
                store,
                bus,
                desk,
                definitions: self.definitions,
                subjects,
                participants,
                settle_timeout: self.settle_timeout,
            })
        }
    }

    /// A real [`Runtime`] on the in-memory store and bus with a virtual clock and
    /// scripted participants, for integration tests of a service's sagas (see the
    /// [module docs](super) and docs/testing.md).
    ///
    /// - The clock starts at 0 and moves only with [`TestRuntime::advance`] (or
    ///   [`TestRuntime::advance_to_next_wakeup`], [`TestRuntime::outcome`]), which fire
    ///   every reply deadline and retry backoff that falls due on the way, each at its
    ///   own virtual time and in order. Retry delays take no jitter unless
    ///   [`TestRuntimeBuilder::jitter`] says otherwise.
    /// - The participants are scripted per command subject ([`TestRuntime::on`]); they
    ///   receive the commands from the bus and publish their replies on it, with the
    ///   command's reply subject and token, through the participant helper
    ///   ([`participant::serve_with`]): the runtime takes them like any service's.
    /// - Every call that lets the runtime work ([`TestRuntime::start`],
    ///   [`TestRuntime::advance`], [`TestRuntime::cancel`], [`TestRuntime::reply`],
    ///   [`TestRuntime::settle`]) returns once the runtime has settled: every command
    ///   sent has been received, every reply the harness published has been applied or
    ///   ignored, and every wake-up due has fired. It panics, saying what is still under
    ///   way, when that takes longer than the settle timeout (5 s of real time).
    ///
    /// What settling cannot see: replies of participants other than the scripted ones
    /// (a service of yours run on [`TestRuntime::bus`]). Wait for those with the saga's
    /// handle ([`SagaHandle::outcome_within`]).
    pub struct TestRuntime {
        runtime: Runtime,
        clock: ManualClock,
        store: Arc<MemoryStore>,
        bus: MemoryBus,
        desk: Arc<Desk>,
        definitions: Vec<Arc<Definition>>,
        subjects: BTreeSet<String>,
        participants: Vec<ParticipantHandle>,
        settle_timeout: Duration,
    }

    impl fmt::Debug for TestRuntime {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("TestRuntime")
                .field("now", &self.clock.now())
                .field("subjects", &self.subjects)
                .field("received", &self.desk.lock().received.len())
                .finish_non_exhaustive()
        }
    }

    impl TestRuntime {
        /// Starts building one: register your definitions, then
        /// [`TestRuntimeBuilder::start`].
        pub fn builder() -> TestRuntimeBuilder {
            let options = RuntimeOptions {
                arbiters: 1,
                retention: None,
                // The harness sweeps when it moves the clock; a periodic sweep would
                // only race it.
                wakeup_poll_interval: Duration::from_secs(24 * 3600),
                ..RuntimeOptions::default()
            };
            TestRuntimeBuilder {
                builder: Runtime::builder(),
                definitions: Vec::new(),
                options,
                jitter: 0.0,
                settle_timeout: Duration::from_secs(5),
            }
        }

        /// Scripts the participant of `subject`: every command on it from now on is
        /// answered with what `script` returns for it (it may look at the command's
        /// attempt, payload, step…). A later call for the same subject replaces the
        /// script. A subject with no script receives its commands and answers nothing.
        /// Panics if no registered saga sends commands on `subject`.
        pub fn on<F>(&self, subject: &str, script: F) -> &Self
        where
            F: FnMut(&Received) -> Reply + Send + 'static,
        {
            if !self.subjects.contains(subject) {
                panic!(
                    "TestRuntime::on: no registered saga sends commands on {subject} (they send on: {})",
                    self.subjects.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            let script: Script = Box::new(script);
            self.desk
                .lock()
                .scripts
                .insert(subject.to_owned(), Arc::new(Mutex::new(script)));
            self
        }

        /// Starts a saga ([`Runtime::start_saga`]) and returns its handle once the
        /// runtime has settled: as far as the scripts take it without time passing.
        pub async fn start<D>(
            &self,
            definition: &SagaDefinition<D>,
            data: &D,
        ) -> Result<SagaHandle<D>, RuntimeError>
        where
            D: Serialize + DeserializeOwned + Send + 'static,
        {
            let handle = self.runtime.start_saga(definition, data).await?;
            self.settle().await;
            Ok(handle)
        }

        /// Starts, or finds, the saga of business key `key`
        /// ([`Runtime::start_saga_keyed`]), then settles.
        pub async fn start_keyed<D>(
            &self,
            definition: &SagaDefinition<D>,
            key: &str,
            data: &D,
        ) -> Result<SagaHandle<D>, RuntimeError>
        where
            D: Serialize + DeserializeOwned + Send + 'static,
        {
            let handle = self.runtime.start_saga_keyed(definition, key, data).await?;
            self.settle().await;
            Ok(handle)
        }

        /// Cancels a saga ([`SagaHandle::cancel`]), then settles. An action in flight is
        /// waited for (its reply or its deadline) before compensating.
        pub async fn cancel<D>(
            &self,
            saga: &SagaHandle<D>,
            reason: &str,
        ) -> Result<Applied, RuntimeError>
        where
            D: Serialize + DeserializeOwned + Send + 'static,
        {
            let applied = saga.cancel(reason).await?;
            self.settle().await;
            Ok(applied)
        }

        /// Answers a command by hand, through the bus like a script's reply, then
        /// settles: a command nobody answered, or one answered already (a late or
        /// duplicate reply, which the saga ignores or takes as its policy says).
        /// Panics for [`Reply::NoReply`], which publishes nothing.
        pub async fn reply(&self, command: &Received, reply: Reply) {
            let Some(outcome) = reply.outcome() else {
                panic!("TestRuntime::reply: Reply::NoReply publishes nothing");
            };
            // A reply to the attempt the saga waits for (virtual time stands still
            // meanwhile) is applied once the saga waits for it no more, even where the
            // journal does not name it (a retry run past the journal's window); a late
            // or duplicate one, only once the journal names it.
            let awaited = match self.store.load(command.saga_id()).await {
                Ok(saga) => saga.is_some_and(|s| {
                    self.awaits(&s.state, command.step(), command.kind(), command.attempt())
                }),
                Err(e) => panic!("TestRuntime: the memory store failed: {e}"),
            };
            self.desk.lock().track(command, &outcome, awaited);
            let message = wire::encode_reply(command.command(), &outcome);
            if let Err(e) = self.bus.publish(message).await {
                panic!("TestRuntime::reply: publishing the reply failed: {e}");
            }
            self.settle().await;
        }

        /// Moves virtual time forward by `by`, firing every reply deadline and retry
        /// backoff that falls due on the way, each at its own time and in order, and
        /// letting the runtime settle after each: a timed-out attempt is retried after
        /// its backoff (and the retry answered by its script), a spent one compensates
        /// or dead-letters.
        pub async fn advance(&self, by: Duration) {
            let until = self.clock.now().plus(by);
            let mut next = self.settle_next().await;
            while let Some(at) = next.filter(|at| *at <= until) {
                self.set_clock(at);
                next = self.settle_next().await;
            }
            self.set_clock(until);
            self.settle_next().await;
        }

        /// Moves virtual time to the next wake-up of any saga (a reply deadline, the end
        /// of a backoff) and fires it; returns how far time moved, or `None` (and moves
        /// nothing) when no saga waits for one.
        pub async fn advance_to_next_wakeup(&self) -> Option<Duration> {
            let at = self.settle_next().await?;
            let by = self.clock.now().until(at);
            self.advance(by).await;
            Some(by)
        }

        /// The saga's outcome, moving virtual time from wake-up to wake-up until it
        /// settles (completed, compensated, or dead-lettered): a saga whose participants
        /// never answer runs through every timeout and retry of its policies. Panics if
        /// it waits for nothing and has not settled.
        pub async fn outcome<D>(&self, saga: &SagaHandle<D>) -> Result<SagaView<D>, RuntimeError>
        where
            D: Serialize + DeserializeOwned + Send + 'static,
        {
            self.settle().await;
            for _ in 0..MAX_WAKEUPS {
                let view = saga.state().await?;
                if view.status.is_settled() {
                    return Ok(view);
                }
                if self.advance_to_next_wakeup().await.is_none() {
                    panic!(
                        "TestRuntime::outcome: saga {} is {} and waits for nothing (at {} ms)",
                        saga.id(),
                        view.status,
                        self.clock.now().as_millis()
                    );
                }
            }
            panic!(
                "TestRuntime::outcome: saga {} did not settle within {MAX_WAKEUPS} wake-ups",
                saga.id()
            );
        }

        /// Waits until the runtime has settled (see [`TestRuntime`]), without moving
        /// the clock: after something the harness did not do itself (a re-drive, or a
        /// start through [`TestRuntime::runtime`]).
        pub async fn settle(&self) {
            self.settle_next().await;
        }

        /// When the next wake-up of any saga is due (virtual time), once the runtime
        /// has settled; `None` when no saga waits for one.
        pub async fn next_wakeup(&self) -> Option<Duration> {
            self.settle_next()
                .await
                .map(|at| Duration::from_millis(at.as_millis()))
        }

        /// Settles, and says when the next wake-up is due.
        async fn settle_next(&self) -> Option<Timestamp> {
            let started = Instant::now();
            let mut fired = false;
            loop {
                if let Some(panic) = self.desk.lock().panics.first() {
                    panic!("TestRuntime: {panic}");
                }
                let look = self.look().await;
                if look.due && !fired {
                    // Applied before it answers; what the wake-ups sent is looked at
                    // next.
                    if let Err(e) = self.runtime.fire_due_wakeups().await {
                        panic!("TestRuntime: firing the due wake-ups failed: {e}");
                    }
                    fired = true;
                    continue;
                }
                let busy = match (look.busy, look.due) {
                    (None, false) => return look.next,
                    (Some(busy), _) => busy,
                    (None, true) => format!(
                        "a wake-up due at {} ms was not applied",
                        look.next.map_or(0, Timestamp::as_millis)
                    ),
                };
                if started.elapsed() > self.settle_timeout {
                    panic!(
                        "TestRuntime: the runtime did not settle within {:?} (virtual time {} ms): {busy}",
                        self.settle_timeout,
                        self.clock.now().as_millis()
                    );
                }
                // Fire again only once something moved (or a poll passed).
                fired = false;
                let _ = tokio::time::timeout(POLL, self.desk.notify.notified()).await;
            }
        }

        /// Every command the scripted participants received so far, oldest first, with
        /// what each was answered.
        pub fn commands(&self) -> Vec<Received> {
            self.desk.lock().received.clone()
        }

        /// The commands received on `subject`, oldest first.
        pub fn commands_on(&self, subject: &str) -> Vec<Received> {
            self.desk
                .lock()
                .received
                .iter()
                .filter(|r| r.subject() == subject)
                .cloned()
                .collect()
        }

        /// The virtual time (from 0 at the start).
        pub fn now(&self) -> Duration {
            Duration::from_millis(self.clock.now().as_millis())
        }

        /// The runtime, for what the harness does not wrap (`redrive`, `saga`,
        /// `outcomes`, `stats`…). Call [`TestRuntime::settle`] after what makes it work.
        pub fn runtime(&self) -> &Runtime {
            &self.runtime
        }

        /// The in-memory store (the journal, dead letters, what a query returns).
        pub fn store(&self) -> &Arc<MemoryStore> {
            &self.store
        }

        /// The in-memory bus (to run a participant of your own beside the scripted ones,
        /// or to watch lifecycle events).
        pub fn bus(&self) -> &MemoryBus {
            &self.bus
        }

        /// Lets the runtime settle, then stops the scripted participants and the
        /// runtime. Dropping the harness stops them too, without settling first.
        ///
        /// Handles of the test kept alive do not hold the runtime (they answer
        /// `RuntimeError::ShuttingDown` afterwards).
        pub async fn shutdown(self) {
            self.settle().await;
            drop(self.participants);
            self.runtime.shutdown().await;
        }

        fn set_clock(&self, at: Timestamp) {
            let by = self.clock.now().until(at);
            if !by.is_zero() {
                self.clock.advance(by);
            }
        }

        /// The name of step `index` of the definition `state` runs on.
        fn step_name(&self, state: &SagaState, index: usize) -> Option<String> {
            self.definitions
                .iter()
                .find(|d| {
                    d.saga_type() == &state.saga_type && d.version() == state.definition_version
                })
                .and_then(|d| d.step(index))
                .map(|s| s.name().as_str().to_owned())
        }

        /// Whether `state` waits for the reply to exactly that attempt.
        fn awaits(&self, state: &SagaState, step: &str, kind: CommandKind, attempt: u32) -> bool {
            state.pending.is_some_and(|p| {
                matches!(p.phase, Phase::AwaitingReply { .. })
                    && p.kind == kind
                    && p.attempt == attempt
                    && self.step_name(state, p.step).as_deref() == Some(step)
            })
        }

        /// One look at where the runtime stands. What the participants received and the
        /// replies they published are read first, then each saga's journal, then its
        /// state: so a reply applied after the journal was read shows in the state (the
        /// saga moved on), and what the saga sent next is not in the participants'
        /// record read before: nothing that moves during the look is taken for settled.
        async fn look(&self) -> Look {
            const PAGE: usize = 1_000;
            let now = self.clock.now();
            let store: &dyn SagaStore = self.store.as_ref();
            let (seen, outstanding) = {
                let desk = self.desk.lock();
                (desk.seen.clone(), desk.outstanding.clone())
            };
            let mut look = Look {
                due: false,
                busy: None,
                next: None,
            };
            let mut busy = |why: String| {
                if look.busy.is_none() {
                    look.busy = Some(why);
                }
            };
            // The sagas to look at: the active ones, and those with a reply in flight.
            let mut sagas: Vec<SagaId> = outstanding.iter().map(|o| o.saga).collect();
            let mut after = None;
            loop {
                let page = match store.active_sagas(after, PAGE).await {
                    Ok(page) => page,
                    Err(e) => panic!("TestRuntime: the memory store failed: {e}"),
                };
                let full = page.len() == PAGE;
                after = page.last().copied();
                sagas.extend(page);
                if !full {
                    break;
                }
            }
            sagas.sort();
            sagas.dedup();
            let mut applied = HashSet::new();
            for id in sagas {
                let replies: Vec<&Outstanding> =
                    outstanding.iter().filter(|o| o.saga == id).collect();
                let causes: HashSet<String> = if replies.is_empty() {
                    HashSet::new()
                } else {
                    match store.journal(id).await {
                        Ok(entries) => entries
                            .iter()
                            .filter_map(|e| e.record().ok())
                            .filter_map(|r| r.causation().map(str::to_owned))
                            .collect(),
                        Err(e) => panic!("TestRuntime: the memory store failed: {e}"),
                    }
                };
                let state = match store.load(id).await {
                    Ok(saga) => saga.map(|s| s.state),
                    Err(e) => panic!("TestRuntime: the memory store failed: {e}"),
                };
                // A reply is applied once its saga's journal names it, or (a script's
                // answer to the attempt the saga waited for) once the saga waits for that
                // attempt no more: a retry run past the journal's window records its
                // failures in a snapshot, not one by one.
                for o in replies {
                    let moved_on = o.scripted
                        && state
                            .as_ref()
                            .is_some_and(|s| !self.awaits(s, &o.step, o.kind, o.attempt));
                    if causes.contains(&o.inbox_id) || moved_on {
                        applied.insert(o.seq);
                    } else {
                        busy(format!("{} of saga {} is not applied yet", o.what, o.saga));
                    }
                }
                let Some(state) = state.filter(|s| !s.status.is_settled()) else {
                    continue;
                };
                if let Some(at) = state.wake_at() {
                    look.due |= at <= now;
                    look.next = Some(look.next.map_or(at, |n| n.min(at)));
                }
                if let Some(p) = state.pending
                    && matches!(p.phase, Phase::AwaitingReply { .. })
                {
                    let step = self.step_name(&state, p.step).unwrap_or_default();
                    if !seen.contains(&(id, step.clone(), p.kind, p.attempt)) {
                        busy(format!(
                            "saga {id} sent the {} of {step} (attempt {}), and no participant received it yet",
                            p.kind, p.attempt
                        ));
                    }
                }
            }
            if !applied.is_empty() {
                self.desk
                    .lock()
                    .outstanding
                    .retain(|o| !applied.contains(&o.seq));
            }
            look
        }
    }
}
