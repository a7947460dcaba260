//! `SagaInstance`: the one owner of one saga's state, and the messages it takes.
//!
//! The actor loads its saga, serialises the inputs to it, and runs each through
//! `process`: the write is decided by the pure [`Decider`](super::decide::Decider),
//! committed through the group commit, and its effects performed (messages handed to
//! the publisher, outcome subscribers notified) before the answer. It arms its own
//! wake-up timer from the committed state and passivates when idle.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::field::Empty;
use tracing::{Instrument, debug, info_span, warn};

use super::decide::{Condition, Decider, Decision, Then};
use super::publisher::PublishJob;
use super::registry::{Passivated, Registry};
use super::{RuntimeStats, Shared};
use crate::definition::Definition;
use crate::error::RuntimeError;
use crate::ids::SagaId;
use crate::machine::{self, Effect, Input, SagaState, SagaStatus};
use crate::ports::{OutboxMessage, StoreError, StoredSaga, WriteOutcome};
use crate::trace::{self, TraceContext};

/// How many times a version conflict is resolved by reloading before giving up.
const MAX_CONFLICT_RETRIES: usize = 5;

/// Feed one input to the saga. Answered after the transition is committed and its
/// effects performed.
#[derive(Debug, Message)]
#[rtype(result = "Result<Applied, RuntimeError>")]
pub struct Apply {
    /// The input.
    pub input: Input,
    /// The id of the message it came from (a reply), recorded in the inbox with the
    /// transition: a message applied once is never applied again.
    pub inbox: Option<String>,
    /// What must hold for the input to be applied (an operator request's expiry and
    /// conditions); when it does not, the input is journaled as ignored, with why.
    pub condition: Option<Condition>,
    /// The sender's span (a reply's, a start's): the parent of the span applying the
    /// input. A disabled span (`Span::none()`) makes that span a child of the saga's
    /// root span instead.
    pub span: tracing::Span,
    /// For a start: the state the saga is created from. It replaces an uncommitted
    /// state the actor holds (another start of the same id whose `Apply` has not run,
    /// or was abandoned): the start that commits first commits its own data.
    pub initial: Option<SagaState>,
}

/// Check whether a wake-up (reply deadline or retry) is due, and act on it.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Wake;

/// What happened to an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The transition was committed; the saga is now in `status`.
    Transitioned {
        /// The new status.
        status: SagaStatus,
    },
    /// The input was duplicate, stale or late: recorded in the journal, nothing changed.
    Ignored {
        /// Why.
        reason: String,
    },
}

enum Load {
    /// Loading from the store (messages wait).
    Pending,
    /// Loaded (or created in memory by a start). Boxed: the other variants are small.
    Ready(Box<StoredSaga>),
    /// Taken out by the handler that is running (atomic: no other handler runs).
    InFlight,
    /// No such saga in the store.
    Missing,
    /// The store failed while loading.
    Failed(RuntimeError),
}

/// The actor owning one saga instance's state.
pub struct SagaInstance {
    id: SagaId,
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    load: Load,
    /// A strong address to itself: the registry only holds a weak one, so dropping
    /// this lets the actor stop when idle (passivation) without the `Supervisor`
    /// restarting it.
    keep_alive: Option<Addr<SagaInstance>>,
    wake_timer: Option<SpawnHandle>,
    idle_timer: Option<SpawnHandle>,
    /// Consecutive wake-ups that failed: the next one backs off (a saga whose wake-up
    /// cannot be applied must not spin on an overdue timer).
    wake_failures: u32,
    /// Set once the actor passivated: a restart after that (someone still held an
    /// address) serves that message and lets the actor go, instead of keeping it alive
    /// beside the new activation the registry may have made.
    passivated: bool,
    /// Counted in the `skald_live_actors` gauge (between `started` and `stopped`, or
    /// the drop of an actor that died in a panic).
    live: bool,
    /// Activated without a state (not created by a start in this process): counted as a
    /// cold activation (`skald_cold_activations_total`) once its saga is loaded.
    cold: bool,
}

impl std::fmt::Debug for SagaInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaInstance")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SagaInstance {
    /// An instance that loads saga `id` from the store when started, or starts from
    /// `initial` (a saga being created, version 0).
    pub(crate) fn new(
        id: SagaId,
        shared: Arc<Shared>,
        registry: Addr<Registry>,
        initial: Option<SagaState>,
    ) -> Self {
        let cold = initial.is_none();
        SagaInstance {
            id,
            shared,
            registry,
            load: match initial {
                Some(state) => Load::Ready(Box::new(StoredSaga { state, version: 0 })),
                None => Load::Pending,
            },
            keep_alive: None,
            wake_timer: None,
            idle_timer: None,
            wake_failures: 0,
            passivated: false,
            live: false,
            cold,
        }
    }

    fn load_from_store(&mut self, ctx: &mut Context<Self>) {
        self.load = Load::Pending;
        let shared = Arc::clone(&self.shared);
        let id = self.id;
        let fut = async move {
            let store = Arc::clone(&shared.store);
            shared
                .on_io(async move { store.load(id).await.map_err(RuntimeError::from) })
                .await
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            act.load = match res {
                Ok(Some(saga)) => {
                    // The activation's first load (not a reload after a failure).
                    if std::mem::take(&mut act.cold) {
                        RuntimeStats::incr(&act.shared.stats.cold_activations);
                        act.shared.metrics.cold_activation(&saga.state.saga_type);
                    }
                    Load::Ready(Box::new(saga))
                }
                Ok(None) => Load::Missing,
                Err(e) => {
                    warn!(saga.id = %act.id, error = %e, "loading saga failed");
                    Load::Failed(e)
                }
            };
            act.after_change(ctx);
        }));
    }

    /// Takes the state out for a handler, or says why there is none.
    fn take(&mut self) -> Result<(StoredSaga, Arc<Definition>), RuntimeError> {
        match std::mem::replace(&mut self.load, Load::InFlight) {
            Load::Ready(saga) => {
                let saga = *saga;
                match self
                    .shared
                    .definition(&saga.state.saga_type, saga.state.definition_version)
                {
                    Ok(def) => Ok((saga, Arc::clone(def))),
                    Err(e) => {
                        self.load = Load::Ready(Box::new(saga));
                        Err(e)
                    }
                }
            }
            Load::Missing => {
                self.load = Load::Missing;
                Err(RuntimeError::UnknownSaga(self.id))
            }
            Load::Failed(e) => {
                self.load = Load::Failed(e.clone());
                Err(e)
            }
            other @ (Load::Pending | Load::InFlight) => {
                // Cannot happen: loads run under ctx.wait and handlers are atomic.
                self.load = other;
                Err(RuntimeError::ActorUnavailable(self.id))
            }
        }
    }

    /// Puts the state back after a handler; `None` means the store failed mid-way and
    /// the state is unknown: stop, so the `Supervisor` restarts the actor, which reloads.
    fn put_back(&mut self, saga: Option<StoredSaga>, ctx: &mut Context<Self>) {
        match saga {
            Some(saga) => {
                self.load = Load::Ready(Box::new(saga));
                self.after_change(ctx);
            }
            None => {
                self.load = Load::Pending;
                ctx.stop();
            }
        }
    }

    fn status(&self) -> Option<SagaStatus> {
        match &self.load {
            Load::Ready(s) => Some(s.state.status),
            _ => None,
        }
    }

    /// Arms the wake-up timer from the committed state and resets the idle timer.
    fn after_change(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.wake_timer.take() {
            ctx.cancel_future(h);
        }
        if let Load::Ready(saga) = &self.load
            && let Some(at) = saga.state.wake_at()
        {
            let backoff = match self.wake_failures {
                0 => Duration::ZERO,
                n => Duration::from_millis(100u64 << n.min(9)).min(Duration::from_secs(30)),
            };
            let delay = self.shared.clock.now().until(at).max(backoff);
            self.wake_timer = Some(ctx.run_later(delay, |_, ctx| ctx.notify(Wake)));
        }
        if let Some(h) = self.idle_timer.take() {
            ctx.cancel_future(h);
        }
        // Settled and unknown sagas expect no more input: free them at once. A saga of a
        // partition this runtime does not hold (started here for another node, or in a
        // runtime that consumes nothing, `RuntimeOptions::consume`) is freed within a
        // second: its input goes to the partition's holder, and a live actor here would
        // only hold a stale state (its timer firing a timeout the holder moved past).
        // (A saga being created waits for its `Started` input in any case.)
        let idle = match self.status() {
            Some(SagaStatus::Created) => self.shared.options.idle_timeout,
            Some(SagaStatus::Running | SagaStatus::Compensating)
                if self.shared.ownership.owns(&self.id) =>
            {
                self.shared.options.idle_timeout
            }
            // Not zero: a request just routed here (a cancel) must reach it first.
            Some(SagaStatus::Running | SagaStatus::Compensating) => {
                self.shared.options.idle_timeout.min(Duration::from_secs(1))
            }
            _ => Duration::ZERO,
        };
        self.idle_timer = Some(ctx.run_later(idle, |act, ctx| act.passivate(ctx)));
    }

    fn passivate(&mut self, ctx: &mut Context<Self>) {
        debug!(saga.id = %self.id, "passivating");
        RuntimeStats::incr(&self.shared.stats.passivations);
        self.keep_alive = None;
        self.passivated = true;
        self.registry.do_send(Passivated {
            id: self.id,
            addr: ctx.address().downgrade(),
        });
        ctx.stop();
    }

    fn run(
        &mut self,
        input: Option<Input>,
        inbox: Option<String>,
        condition: Option<Condition>,
        parent: tracing::Span,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<Applied, RuntimeError>> {
        let (saga, def) = match self.take() {
            Ok(x) => x,
            Err(e) => {
                self.after_change(ctx);
                return Box::pin(actix::fut::ready(Err(e)));
            }
        };
        // A wake-up derives its input from the state: TimedOut or RetryDue, if due.
        let input = match input {
            Some(i) => i,
            None => {
                let now = self.shared.clock.now();
                match saga.state.due_input(&def, now, self.shared.jitter.draw()) {
                    Some(i) => i,
                    // A stored state this definition cannot run (a step index out of
                    // range: the definition was edited in place) has nothing due by it:
                    // an error, so the wake-up backs off instead of reloading at once,
                    // forever.
                    None => {
                        if let Err(e) = machine::check_state(&def, &saga.state) {
                            self.load = Load::Ready(Box::new(saga));
                            let e = RuntimeError::Transition(e);
                            return Box::pin(actix::fut::ready(Err(e)));
                        }
                        // Nothing due by the state held here. It may be behind the store:
                        // another process sharing it moved the saga on, and a sweep
                        // claimed the wake-up that state now has. Reload, so the timer is
                        // armed from the store's state (it fires at once if that is due).
                        self.load = Load::Ready(Box::new(saga));
                        self.load_from_store(ctx);
                        return Box::pin(actix::fut::ready(Ok(Applied::Ignored {
                            reason: "no wake-up due".into(),
                        })));
                    }
                }
            }
        };
        let shared = Arc::clone(&self.shared);
        let span = info_span!(
            parent: &parent,
            "apply",
            saga.id = %self.id,
            saga.r#type = %saga.state.saga_type,
            saga.step = Empty,
            input = input.name(),
            trace_id = Empty,
            span_id = Empty,
            parent_span_id = Empty,
        );
        // Only for a span that is on: this runs once per input.
        if !span.is_disabled() {
            if let Some(step) = saga.state.pending.and_then(|p| def.step(p.step)) {
                span.record("saga.step", step.name().as_str());
            }
            if parent.is_disabled() {
                // A wake-up (timeout, retry) or an operator's request: no sender's span
                // to continue, so a child of the saga's root span, with an id of its own.
                let root = TraceContext::for_saga(&self.id);
                let own = root.child(trace::span_id_of_parts(&[
                    input.name(),
                    ":",
                    &self.id.to_string(),
                    ":",
                    &saga.version.to_string(),
                ]));
                trace::annotate(&span, &own, Some(&root));
            }
        }
        let fut = process(shared, def, saga, input, inbox, condition).instrument(span);
        Box::pin(fut.into_actor(self).map(|(saga, result), act, ctx| {
            act.put_back(saga, ctx);
            result
        }))
    }
}

impl Actor for SagaInstance {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if !self.passivated {
            self.keep_alive = Some(ctx.address());
        }
        if !self.live {
            self.live = true;
            self.shared.metrics.live_actors.increment(1.0);
        }
        RuntimeStats::incr(&self.shared.stats.activations);
        match self.load {
            Load::Ready(_) => self.after_change(ctx),
            _ => self.load_from_store(ctx),
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.not_live();
    }
}

impl SagaInstance {
    fn not_live(&mut self) {
        if self.live {
            self.live = false;
            self.shared.metrics.live_actors.decrement(1.0);
        }
    }
}

impl Drop for SagaInstance {
    /// An actor that died in a panic never ran `stopped`.
    fn drop(&mut self) {
        self.not_live();
    }
}

impl Supervised for SagaInstance {
    /// The mailbox and the in-memory state are not trusted after a failure: reload.
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        debug!(saga.id = %self.id, "restarting: state will be reloaded from the store");
        self.wake_timer = None;
        self.idle_timer = None;
        self.load = Load::Pending;
    }
}

impl Handler<Apply> for SagaInstance {
    type Result = AtomicResponse<Self, Result<Applied, RuntimeError>>;

    fn handle(&mut self, msg: Apply, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(initial) = msg.initial {
            match &self.load {
                // Not committed yet: this start's data, not the one the actor was
                // created with (a start whose Apply has not run, or was abandoned).
                Load::Ready(saga) if saga.version == 0 => {
                    self.load = Load::Ready(Box::new(StoredSaga {
                        state: initial,
                        version: 0,
                    }));
                }
                // Activated by something else before the saga existed (a stray reply):
                // the start creates it.
                Load::Missing => {
                    self.load = Load::Ready(Box::new(StoredSaga {
                        state: initial,
                        version: 0,
                    }));
                }
                _ => {}
            }
        }
        AtomicResponse::new(self.run(Some(msg.input), msg.inbox, msg.condition, msg.span, ctx))
    }
}

/// The saga's partition went to another node: go now (the registry sends it to every
/// live actor of the partition at a handover). Handled between transitions, never in
/// the middle of one.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Release;

impl Handler<Release> for SagaInstance {
    type Result = ();

    fn handle(&mut self, _msg: Release, ctx: &mut Context<Self>) {
        if !self.passivated && !self.shared.ownership.owns(&self.id) {
            self.passivate(ctx);
        }
    }
}

impl Handler<Wake> for SagaInstance {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _msg: Wake, ctx: &mut Context<Self>) -> Self::Result {
        let id = self.id;
        let inner = self.run(None, None, None, tracing::Span::none(), ctx);
        AtomicResponse::new(Box::pin(inner.map(move |res, act, ctx| match res {
            Ok(_) => act.wake_failures = 0,
            Err(e) => {
                act.wake_failures = act.wake_failures.saturating_add(1);
                warn!(saga.id = %id, error = %e, failures = act.wake_failures, "wake-up not applied; backing off");
                act.after_change(ctx);
            }
        })))
    }
}

/// Applies `input`: decide the write ([`Decider::decide`]), commit it (deciding again
/// on a version conflict, from the reloaded state), perform the effects. Returns the
/// state to keep (`None` = unknown, reload) and the answer.
async fn process(
    shared: Arc<Shared>,
    def: Arc<Definition>,
    mut saga: StoredSaga,
    input: Input,
    inbox: Option<String>,
    condition: Option<Condition>,
) -> (Option<StoredSaga>, Result<Applied, RuntimeError>) {
    let decider = Decider {
        upcasters: &shared.upcasters,
        reply_keys: &shared.reply_keys,
        options: &shared.options,
        outbox_stored: shared.outbox_stored,
        partitions: shared.ownership.count(),
    };
    for _ in 0..MAX_CONFLICT_RETRIES {
        let now = shared.clock.now();
        let decided = decider.decide(
            &def,
            &mut saga,
            &input,
            inbox.as_deref(),
            condition.as_ref(),
            now,
        );
        let Decision { write, then } = match decided {
            Ok(d) => d,
            Err(e) => {
                if matches!(e, RuntimeError::DataTooNew(_)) {
                    RuntimeStats::incr(&shared.stats.deferred);
                }
                return (Some(saga), Err(e));
            }
        };
        if let Then::Ignored { reason } = &then {
            debug!(reason = %reason, "input ignored");
        }
        match shared.committer.commit(write).await {
            Ok((WriteOutcome::Committed { version }, mut write)) => {
                let (applied, effects, direct) = match then {
                    Then::Ignored { reason } => {
                        RuntimeStats::incr(&shared.stats.ignored);
                        return (Some(saga), Ok(Applied::Ignored { reason }));
                    }
                    Then::Transitioned {
                        input,
                        effects,
                        direct,
                    } => (input, effects, direct),
                };
                let Some(state) = write.state.take() else {
                    // Cannot happen: a transition's write always carries its state.
                    let lost = StoreError::Other(
                        "the commit loop handed back a transition's write without its state".into(),
                    );
                    return (None, Err(lost.into()));
                };
                RuntimeStats::incr(&shared.stats.transitions);
                shared
                    .metrics
                    .transition(&def, &saga.state, &applied, &effects, now);
                let status = state.status;
                let saga = StoredSaga { state, version };
                let (rows, stored) = if direct.is_empty() {
                    (std::mem::take(&mut write.outbox), true)
                } else {
                    (direct, false)
                };
                perform(&shared, &saga.state, &effects, rows, stored);
                return (Some(saga), Ok(Applied::Transitioned { status }));
            }
            Ok((WriteOutcome::Duplicate, _)) => {
                // Applied before (a redelivery whose first ack was lost, or a reply
                // published twice): nothing to do. The state held here may be behind
                // the store's; the next input's commit finds out and reloads.
                RuntimeStats::incr(&shared.stats.ignored);
                debug!("message already applied (inbox)");
                return (
                    Some(saga),
                    Ok(Applied::Ignored {
                        reason: "message already applied (inbox)".into(),
                    }),
                );
            }
            Ok((WriteOutcome::Conflict, _)) => {
                RuntimeStats::incr(&shared.stats.conflicts);
                shared.metrics.commit_conflict(&saga.state.saga_type);
                debug!(saga.id = %saga.state.id, "version conflict: reloading");
                let store = Arc::clone(&shared.store);
                let id = saga.state.id;
                match shared
                    .on_io(async move { store.load(id).await.map_err(RuntimeError::from) })
                    .await
                {
                    Ok(Some(fresh)) => saga = fresh,
                    Ok(None) => return (None, Err(RuntimeError::UnknownSaga(id))),
                    Err(e) => return (None, Err(e)),
                }
            }
            Err(e) => {
                warn!(error = %e, "commit failed");
                return (None, Err(e.into()));
            }
        }
    }
    let id = saga.state.id;
    (
        None,
        Err(RuntimeError::Contended {
            id,
            attempts: MAX_CONFLICT_RETRIES,
        }),
    )
}

/// Performs a committed transition's effects: hands its messages to the publisher
/// (which reports the published outbox rows; the next commit deletes them) and notifies
/// outcome subscribers. The actor does not wait for the broker: the messages are in the
/// outbox, and a row that cannot be published now is published by the relay once the
/// writer's lease ends. Wake-ups are armed by the actor from the committed state.
fn perform(
    shared: &Arc<Shared>,
    state: &SagaState,
    effects: &[Effect],
    rows: Vec<OutboxMessage>,
    stored: bool,
) {
    for effect in effects {
        if let Effect::SendCommand(cmd) = effect {
            step_span(cmd);
        }
    }
    if !rows.is_empty() {
        use tokio::sync::mpsc::error::TrySendError;
        match shared.publisher.try_send(PublishJob { rows, stored }) {
            Ok(()) => {}
            // Shutting down: the rows stay in the outbox for the next start's relay.
            Err(TrySendError::Closed(_)) => {
                debug!("publisher stopped; messages left in the outbox")
            }
            // The broker is slower than the commits: a bounded number of transitions
            // wait for room. Past that, stored rows are left to the
            // relay (after the writer's lease), and rows that exist nowhere else (an
            // in-process bus) are dropped: the step's deadline re-sends the command.
            // Memory stays bounded either way.
            Err(TrySendError::Full(job)) => {
                RuntimeStats::incr(&shared.stats.publisher_full);
                match Arc::clone(&shared.publish_waiters).try_acquire_owned() {
                    Ok(permit) => {
                        let queue = shared.publisher.clone();
                        shared.io.spawn(async move {
                            let _ = queue.send(job).await;
                            drop(permit);
                        });
                    }
                    Err(_) if job.stored => {
                        debug!("publisher queue full; rows left to the outbox relay");
                    }
                    Err(_) => warn!(
                        "publisher queue full; commands dropped (their deadlines re-send them)"
                    ),
                }
            }
        }
    }
    if effects
        .iter()
        .any(|e| matches!(e, Effect::Finished { .. } | Effect::DeadLetter(_)))
    {
        shared.outcomes.settled(state);
    }
}

/// The span of a step attempt, opened as its command goes to the publisher. Its id is
/// the parent-id of the command's `traceparent` (derived from the message id), and its
/// parent the saga's root span, so a participant's span joins the saga's trace under
/// the attempt it handles.
fn step_span(cmd: &machine::Command) {
    let span = info_span!(
        "step",
        saga.id = %cmd.saga_id,
        saga.r#type = %cmd.saga_type,
        saga.step = %cmd.step,
        step.kind = %cmd.kind,
        step.attempt = cmd.attempt,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
    );
    if span.is_disabled() {
        return;
    }
    let root = TraceContext::for_saga(&cmd.saga_id);
    trace::annotate(
        &span,
        &root.child(trace::span_id_of(&cmd.message_id)),
        Some(&root),
    );
    span.in_scope(|| debug!(subject = %cmd.subject, "command sent"));
}
