//! `SagaInstance`: the one owner of one saga's state.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::field::Empty;
use tracing::{Instrument, debug, error, info_span, warn};

use super::registry::{Passivated, Registry};
use super::{RuntimeStats, SagaOutcome, Shared};
use crate::definition::Definition;
use crate::error::RuntimeError;
use crate::ids::SagaId;
use crate::journal::{Ignored, JournalRecord, Refused, Transition};
use crate::machine::{self, Effect, Input, SagaState, SagaStatus};
use crate::ports::{
    DeadLetterCategory, DeadLetterRecord, Headers, JournalEntry, Message, OutboxMessage, SagaWrite,
    StoredSaga, WriteOutcome,
};
use crate::trace::{self, TraceContext};
use crate::wire;

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
}

/// What an operator request requires of the saga when it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Not after this time (`Skald-Expires`).
    pub expires_at: crate::machine::Timestamp,
    /// Exactly this many re-drives so far (`Skald-If-Redrives`).
    pub if_redrives: Option<u32>,
    /// Exactly this stored version (`Skald-If-Version`).
    pub if_version: Option<u64>,
}

impl Condition {
    /// Why `saga` at `now` does not meet it; `None` when it does.
    pub fn unmet(&self, saga: &StoredSaga, now: crate::machine::Timestamp) -> Option<String> {
        if now > self.expires_at {
            return Some(format!(
                "the request expired at {} ms (now {} ms)",
                self.expires_at.as_millis(),
                now.as_millis()
            ));
        }
        if let Some(n) = self.if_redrives
            && saga.state.redrives != n
        {
            return Some(format!(
                "made after {n} re-drive(s); the saga has had {} since",
                saga.state.redrives
            ));
        }
        if let Some(v) = self.if_version
            && saga.version != v
        {
            return Some(format!(
                "made at version {v}; the saga is at version {}",
                saga.version
            ));
        }
        None
    }
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
                Ok(Some(saga)) => Load::Ready(Box::new(saga)),
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
        // Settled and unknown sagas expect no more input: free them at once.
        let idle = match self.status() {
            Some(SagaStatus::Running | SagaStatus::Compensating | SagaStatus::Created) => {
                self.shared.options.idle_timeout
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
        AtomicResponse::new(self.run(Some(msg.input), msg.inbox, msg.condition, msg.span, ctx))
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

fn journal_entry(now: machine::Timestamp, record: JournalRecord) -> JournalEntry {
    JournalEntry::new(now, &record)
}

/// Inputs that are someone's request (start, cancel, re-drive) rather than a fact
/// reported by a participant or a timer: refusing them must reach the requester.
fn is_request(input: &Input) -> bool {
    matches!(
        input,
        Input::Started | Input::CancelRequested { .. } | Input::Redriven
    )
}

/// Applies `input`: transition, commit (re-applying on a version conflict), perform the
/// effects. Returns the state to keep (`None` = unknown, reload) and the answer.
async fn process(
    shared: Arc<Shared>,
    def: Arc<Definition>,
    mut saga: StoredSaga,
    input: Input,
    inbox: Option<String>,
    condition: Option<Condition>,
) -> (Option<StoredSaga>, Result<Applied, RuntimeError>) {
    let original = input;
    for _ in 0..MAX_CONFLICT_RETRIES {
        let now = shared.clock.now();
        let write;
        let mut direct: Vec<OutboxMessage> = Vec::new();
        // Data stored by an older build is brought up to the definition's data version
        // first. When it cannot be, a participant's reply or a timer dead-letters the
        // step in flight (re-drive it once an upcaster is registered); a request is
        // refused with the reason.
        let mut input: std::borrow::Cow<'_, Input> = std::borrow::Cow::Borrowed(&original);
        let mut refused = condition
            .as_ref()
            .and_then(|c| c.unmet(&saga, now))
            .map(Refusal::Condition);
        // A request whose condition does not hold (it expired) is refused without
        // reading the data: a build that cannot read it refuses it too, rather than
        // leaving it to another build for as long as it waits.
        let data = if refused.is_some() {
            Ok(())
        } else {
            bring_data_up(&shared, &def, &mut saga.state)
        };
        match data {
            Ok(()) => {}
            // Written by a newer build running beside this one: leave the input to it.
            Err(e @ crate::upcast::UpcastError::Newer { .. }) => {
                RuntimeStats::incr(&shared.stats.deferred);
                return (Some(saga), Err(RuntimeError::DataTooNew(e.to_string())));
            }
            Err(e) if is_request(&input) => {
                refused = refused.or(Some(Refusal::Unreadable(e.to_string())))
            }
            // Only an input that would use the data (the pending step's reply or timer,
            // a resume) dead-letters the step; a stale or duplicate one is refused by
            // the machine before any data is read, as usual.
            Err(e) if targets_pending(&def, &saga.state, &input) => {
                input = std::borrow::Cow::Owned(Input::DataUnreadable {
                    error: machine::StepError::new("data_unreadable", e.to_string()),
                });
            }
            Err(_) => {}
        }
        let attempt = match refused {
            Some(r) => Err(r),
            None => machine::transition(&def, &saga.state, &input, now).map_err(Refusal::Machine),
        };
        let next: Result<Vec<Effect>, String> = match attempt {
            Ok((state, effects)) => {
                let body = JournalRecord::Transition(Transition::new(
                    &input,
                    &state,
                    &effects,
                    (saga.version == 0).then_some(&saga.state),
                    inbox.as_deref(),
                ));
                let dead_letter = effects.iter().find_map(|e| match e {
                    Effect::DeadLetter(info) => Some(DeadLetterRecord {
                        id: uuid::Uuid::now_v7(),
                        category: DeadLetterCategory::Saga,
                        saga_id: Some(state.id),
                        saga_type: Some(state.saga_type.to_string()),
                        step: Some(info.step_name.to_string()),
                        kind: Some(info.kind),
                        reason: info.error.to_string(),
                        attempts: info.attempts,
                        message: None,
                        at: now,
                        resolved_at: None,
                    }),
                    _ => None,
                });
                // What caused this transition, for its lifecycle events: the reply's
                // id, or the input and the version it produces.
                let causation = match &inbox {
                    Some(id) => id.clone(),
                    None => format!("{}:{}:{}", input.name(), state.id, saga.version + 1),
                };
                let mut outbox = outbox_messages(&shared, &state, &effects, now, &causation);
                // An in-process bus loses everything with the process anyway (a start
                // re-sends what unfinished sagas wait on): no outbox rows to store.
                direct = if shared.outbox_stored {
                    Vec::new()
                } else {
                    std::mem::take(&mut outbox)
                };
                let journal = {
                    use crate::replay::{JournalPlan, journal_plan, snapshot};
                    let after = &state;
                    let window = shared.options.journal_retry_window;
                    match journal_plan(&input, &saga.state, after, window) {
                        JournalPlan::Entry => vec![journal_entry(now, body)],
                        JournalPlan::Skip => Vec::new(),
                        JournalPlan::EntryThenSnapshot => vec![
                            journal_entry(now, body),
                            journal_entry(
                                now,
                                snapshot(
                                    after,
                                    "retries past the journal's window are not journaled \
                                             one by one",
                                ),
                            ),
                        ],
                        JournalPlan::SnapshotThenEntry => vec![
                            journal_entry(
                                saga.state.updated_at,
                                snapshot(&saga.state, "the compacted retries ended here"),
                            ),
                            journal_entry(now, body),
                        ],
                    }
                };
                let write_status = Some(state.status);
                write = SagaWrite {
                    id: saga.state.id,
                    expected_version: saga.version,
                    // Moved, not copied: the committer hands the write back.
                    state: Some(state),
                    journal,
                    dead_letter,
                    // A re-drive, or the late success of an action dead-lettered in
                    // doubt, takes the saga out of `failed`: its dead letters are done.
                    resolve_dead_letters: saga.state.status == SagaStatus::Failed
                        && write_status != Some(SagaStatus::Failed),
                    outbox,
                    inbox: inbox.clone(),
                };
                Ok(effects)
            }
            // Late, repeated or out-of-order replies and timers are recorded and
            // acknowledged; an operator's request on a finished saga is refused.
            // An operator's request that came over the bus is refused the same way,
            // journaled with its id, for the operator's tool to find.
            Err(e)
                if saga.version > 0
                    && if is_request(&input) {
                        inbox.is_some()
                    } else {
                        e.is_ignorable()
                    } =>
            {
                let body = JournalRecord::Ignored(Ignored {
                    input: input.clone().into_owned(),
                    ignored: e.to_string(),
                    refused: match &e {
                        Refusal::Unreadable(_) => Some(Refused::DataUnreadable),
                        Refusal::Condition(_) => Some(Refused::Condition),
                        Refusal::Machine(_) => None,
                    },
                    causation: inbox.clone(),
                });
                write = SagaWrite {
                    id: saga.state.id,
                    expected_version: saga.version,
                    state: None,
                    journal: vec![journal_entry(now, body)],
                    dead_letter: None,
                    resolve_dead_letters: false,
                    outbox: Vec::new(),
                    inbox: inbox.clone(),
                };
                debug!(reason = %e, "input ignored");
                Err(e.to_string())
            }
            Err(e) => return (Some(saga), Err(e.into())),
        };
        match shared.committer.commit(write).await {
            Ok((WriteOutcome::Committed { version }, mut write)) => {
                let (state, effects) = match (next, write.state.take()) {
                    (Ok(effects), Some(state)) => (state, effects),
                    (Err(reason), _) => {
                        RuntimeStats::incr(&shared.stats.ignored);
                        return (Some(saga), Ok(Applied::Ignored { reason }));
                    }
                    (Ok(_), None) => {
                        // Cannot happen: a transition's write always carries its state.
                        return (
                            None,
                            Err(RuntimeError::Runtime(
                                "committed write lost its state".into(),
                            )),
                        );
                    }
                };
                RuntimeStats::incr(&shared.stats.transitions);
                shared
                    .metrics
                    .transition(&def, &saga.state, &input, &effects, now);
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
        Err(RuntimeError::Runtime(format!(
            "saga {id}: still conflicting after {MAX_CONFLICT_RETRIES} reloads"
        ))),
    )
}

/// The messages a transition publishes (commands, lifecycle events, dead letters), as
/// outbox rows that the writer holds for a lease: it publishes them itself right after
/// the commit, and a relay takes over only if it does not.
fn outbox_messages(
    shared: &Shared,
    state: &SagaState,
    effects: &[Effect],
    now: machine::Timestamp,
    causation: &str,
) -> Vec<OutboxMessage> {
    let available_at = now.plus(shared.options.claim_lease);
    let mut out = Vec::new();
    let mut push = |message: Message| {
        out.push(OutboxMessage {
            id: uuid::Uuid::now_v7(),
            message,
            available_at,
        })
    };
    for effect in effects {
        match effect {
            Effect::SendCommand(cmd) => {
                match wire::encode_command_with(cmd, Some(&shared.reply_keys)) {
                    Ok(msg) => push(msg),
                    // The state is committed without it; the reply deadline re-sends it.
                    Err(e) => error!(error = %e, "encoding command failed"),
                }
            }
            Effect::EmitLifecycleEvent(ev) if shared.options.publish_events => {
                match wire::encode_event(ev, causation) {
                    Ok(msg) => push(msg),
                    Err(e) => error!(error = %e, "encoding event failed"),
                }
            }
            Effect::DeadLetter(info) => {
                let body = serde_json::json!({
                    "category": "saga",
                    "saga_id": state.id,
                    "saga_type": state.saga_type,
                    "step": info.step_name,
                    "kind": info.kind,
                    "error": info.error,
                    "attempts": info.attempts,
                    "at": state.updated_at,
                });
                let mut headers = Headers::new();
                headers.insert(wire::H_SAGA_ID, state.id.to_string());
                headers.insert(wire::H_SAGA_TYPE, state.saga_type.as_str());
                headers.insert(
                    wire::H_MSG_ID,
                    format!("dlq:{}:{}:{}", state.id, info.step_name, info.last_attempt),
                );
                headers.insert(wire::H_SCHEMA_VERSION, "1");
                push(Message {
                    subject: wire::dlq_subject(Some(&state.saga_type)),
                    headers,
                    payload: body.to_string().into_bytes().into(),
                });
            }
            Effect::EmitLifecycleEvent(_) | Effect::Finished { .. } => {}
        }
    }
    out
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
        shared.outcomes.publish(&outcome_of(state));
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

/// Messages to publish, in order.
#[derive(Debug)]
pub(crate) struct PublishJob {
    pub(crate) rows: Vec<OutboxMessage>,
    /// Whether the rows are stored in the outbox (then reported once published).
    pub(crate) stored: bool,
}

/// The publisher: one task publishing every transition's messages in commit order,
/// batching whatever queued while the previous batch was in flight (one round trip
/// of broker acks per batch).
pub(crate) async fn publisher(
    shared: Arc<Shared>,
    mut jobs: tokio::sync::mpsc::Receiver<PublishJob>,
) {
    const MAX_BATCH: usize = 1_024;
    while let Some(first) = jobs.recv().await {
        let mut stored = Vec::new();
        let mut direct = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            if job.stored {
                stored.extend(job.rows);
            } else {
                direct.extend(job.rows);
            }
            if stored.len() + direct.len() < MAX_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        if !direct.is_empty() {
            publish_rows(&shared, direct, false).await;
        }
        if !stored.is_empty() {
            publish_rows(&shared, stored, true).await;
        }
    }
}

/// Publishes outbox rows in order and reports the published ones to the committer.
pub(crate) async fn publish_outbox(shared: &Shared, rows: Vec<OutboxMessage>) -> usize {
    publish_rows(shared, rows, true).await
}

/// Publishes rows in order; reports the published ones to the committer if `stored`.
async fn publish_rows(shared: &Shared, mut rows: Vec<OutboxMessage>, stored: bool) -> usize {
    if stored {
        // A row whose lease has ended belongs to the relay now (the broker was slow for
        // longer than the lease): publishing it here too would send it twice.
        let now = shared.clock.now();
        rows.retain(|r| r.available_at > now);
    }
    let (ids, messages): (Vec<_>, Vec<_>) = rows.into_iter().map(|r| (r.id, r.message)).unzip();
    let commands: Vec<bool> = messages
        .iter()
        .map(|m| m.subject.starts_with(wire::COMMAND_PREFIX))
        .collect();
    let results = shared.bus.publish_batch(messages).await;
    let mut done = Vec::with_capacity(ids.len());
    for ((id, result), command) in ids.into_iter().zip(results).zip(commands) {
        match result {
            Ok(()) => {
                if command {
                    RuntimeStats::incr(&shared.stats.commands_sent);
                }
                done.push(id);
            }
            Err(e) => {
                RuntimeStats::incr(&shared.stats.publish_failures);
                debug!(error = %e, "publish failed; left in the outbox for the relay");
            }
        }
    }
    let n = done.len();
    if stored {
        shared.committer.published(done);
    }
    n
}

fn outcome_of(state: &SagaState) -> SagaOutcome {
    SagaOutcome {
        id: state.id,
        saga_type: state.saga_type.clone(),
        status: state.status,
        created_at: state.created_at,
        at: state.updated_at,
        in_doubt: state.in_doubt.is_some()
            || state.dead_letter.as_ref().is_some_and(|d| d.in_doubt),
    }
}

/// Why an input was not applied: the machine refused it, or the saga's data could not
/// be read.
#[derive(Debug)]
enum Refusal {
    Machine(machine::TransitionError),
    Unreadable(String),
    /// An operator request's expiry or condition does not hold.
    Condition(String),
}

impl Refusal {
    fn is_ignorable(&self) -> bool {
        match self {
            Refusal::Machine(e) => e.is_ignorable(),
            Refusal::Unreadable(_) | Refusal::Condition(_) => false,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Machine(e) => e.fmt(f),
            Refusal::Unreadable(reason) => write!(f, "the saga's data cannot be read: {reason}"),
            Refusal::Condition(reason) => {
                write!(f, "the request's condition does not hold: {reason}")
            }
        }
    }
}

impl From<Refusal> for RuntimeError {
    fn from(r: Refusal) -> RuntimeError {
        match r {
            Refusal::Machine(e) => e.into(),
            Refusal::Unreadable(reason) => {
                RuntimeError::Runtime(format!("the saga's data cannot be read: {reason}"))
            }
            Refusal::Condition(reason) => {
                RuntimeError::Runtime(format!("the request's condition does not hold: {reason}"))
            }
        }
    }
}

/// Upcasts the saga's data to the definition's data version, if it is older (and the
/// saga can still take inputs). `Err` names the payload type and both versions.
fn bring_data_up(
    shared: &Shared,
    def: &Definition,
    state: &mut SagaState,
) -> Result<(), crate::upcast::UpcastError> {
    let want = def.data_version();
    if state.data_version == want || state.status.is_terminal() {
        return Ok(());
    }
    let payload_type = crate::upcast::data_payload_type(state.saga_type.as_str());
    let data = std::mem::take(&mut state.data);
    match shared
        .upcasters
        .upcast(&payload_type, data.clone(), state.data_version, want)
    {
        Ok(up) => {
            state.data = up;
            state.data_version = want;
            Ok(())
        }
        Err(e) => {
            state.data = data;
            Err(e)
        }
    }
}

/// Whether `input` is about the step in flight (its reply or timer for the current
/// attempt, a success for any attempt of it, or a resume), so applying it would read the
/// saga's data.
fn targets_pending(def: &Definition, state: &SagaState, input: &Input) -> bool {
    let Some(p) = state.pending else {
        return false;
    };
    match input.target() {
        Some((step, kind, attempt)) => {
            def.step(p.step).is_some_and(|s| s.name() == step)
                && kind == p.kind
                && (attempt == p.attempt
                    || matches!(input, Input::StepSucceeded { .. }) && attempt <= p.attempt)
        }
        None => matches!(input, Input::Resumed),
    }
}
