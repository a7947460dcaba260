//! The pure half of applying an input to a saga: given its definition, its stored
//! state, the input and the time, decide the [`SagaWrite`] to commit (the new state,
//! the journal records, a dead letter, the outbox messages, the inbox id) and what
//! follows the commit. No actix, no store, no bus: the instance actor
//! (`instance.rs`) commits the write, retries it on a version conflict, and performs
//! the effects; the decision itself is tested here, beside it.
//!
//! The rules it adds to the machine's [`transition`](machine::transition):
//! - data stored by an older build is brought up to the definition's data version
//!   first; data too new is left to a newer build ([`RuntimeError::DataTooNew`]), data
//!   no upcaster reads refuses a request or dead-letters the step in flight;
//! - an operator request whose [`Condition`] does not hold is refused before the data
//!   is read;
//! - an input refused as late, repeated or out of order, and a request refused on a
//!   saga that exists, is journaled as `ignored` (with why, and by whom it was sent)
//!   rather than answered with an error;
//! - retries past `journal_retry_window` are compacted into snapshots
//!   ([`journal_plan`](crate::replay::journal_plan)).

use std::borrow::Cow;

use crate::auth::ReplyKeys;
use crate::definition::Definition;
use crate::error::RuntimeError;
use crate::journal::{Ignored, JournalRecord, Refused, Transition};
use crate::machine::{self, Effect, Input, SagaState, SagaStatus, Timestamp};
use crate::ports::{
    DeadLetterCategory, DeadLetterRecord, JournalEntry, Message, OutboxMessage, SagaWrite,
    StoredSaga,
};
use crate::runtime::RuntimeOptions;
use crate::runtime::outbox::{DeadLetterNotice, dead_letter_message};
use crate::upcast::{UpcastError, Upcasters};
use crate::wire;

/// What an operator request requires of the saga when it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Not after this time (`Skald-Expires`).
    pub expires_at: Timestamp,
    /// Exactly this many re-drives so far (`Skald-If-Redrives`).
    pub if_redrives: Option<u32>,
    /// Exactly this stored version (`Skald-If-Version`).
    pub if_version: Option<u64>,
}

impl Condition {
    /// Why `saga` at `now` does not meet it; `None` when it does.
    pub fn unmet(&self, saga: &StoredSaga, now: Timestamp) -> Option<String> {
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

/// What a decision is made with besides the saga and the input: the parts of the
/// runtime that shape the write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decider<'a> {
    /// Bring stored data of an older schema version up.
    pub(crate) upcasters: &'a Upcasters,
    /// Every command's reply token is made with them.
    pub(crate) reply_keys: &'a ReplyKeys,
    /// `journal_retry_window`, `claim_lease` (how long the writer holds its outbox
    /// rows) and `publish_events`.
    pub(crate) options: &'a RuntimeOptions,
    /// Whether the messages go to the outbox with the write; otherwise (an in-process
    /// bus) they are handed to the publisher only.
    pub(crate) outbox_stored: bool,
    /// The deployment's partition count: a saga's partition names its commands' reply
    /// subject and is recorded with its writes.
    pub(crate) partitions: u32,
}

/// The write to commit, and what follows once it is committed.
#[derive(Debug)]
pub(crate) struct Decision<'i> {
    /// Committed as one transaction (on the version the saga was read at).
    pub(crate) write: SagaWrite,
    /// What the commit means.
    pub(crate) then: Then<'i>,
}

/// What follows a committed [`Decision`].
#[derive(Debug)]
pub(crate) enum Then<'i> {
    /// The machine applied `input` (the one given, or `DataUnreadable` in its place):
    /// perform `effects`. `direct` holds the messages to publish when they are not
    /// stored (an in-process bus); otherwise they are the write's outbox rows.
    Transitioned {
        input: Cow<'i, Input>,
        effects: Vec<Effect>,
        direct: Vec<OutboxMessage>,
    },
    /// The input was refused and journaled as ignored: answer with `reason`.
    Ignored { reason: String },
}

impl<'a> Decider<'a> {
    /// Decides what applying `input` (the message `inbox`, under `condition`) to `saga`
    /// at `now` writes. `saga`'s data is upcast in place. `Err` writes nothing: the
    /// input is refused with that error (a request on a saga being created, a poison or
    /// refused input the journal does not record, data too new for this build).
    pub(crate) fn decide<'i>(
        &self,
        def: &Definition,
        saga: &mut StoredSaga,
        input: &'i Input,
        inbox: Option<&str>,
        condition: Option<&Condition>,
        now: Timestamp,
    ) -> Result<Decision<'i>, RuntimeError> {
        // Data stored by an older build is brought up to the definition's data version
        // first. When it cannot be, a participant's reply or a timer dead-letters the
        // step in flight (re-drive it once an upcaster is registered); a request is
        // refused with the reason.
        let mut input = Cow::Borrowed(input);
        let mut refused = condition
            .and_then(|c| c.unmet(saga, now))
            .map(Refusal::Condition);
        // A request whose condition does not hold (it expired) is refused without
        // reading the data: a build that cannot read it refuses it too, rather than
        // leaving it to another build for as long as it waits.
        let data = if refused.is_some() {
            Ok(())
        } else {
            bring_data_up(self.upcasters, def, &mut saga.state)
        };
        match data {
            Ok(()) => {}
            // Written by a newer build running beside this one: leave the input to it.
            Err(e @ UpcastError::Newer { .. }) => {
                return Err(RuntimeError::DataTooNew(e.to_string()));
            }
            Err(e) if is_request(&input) => {
                refused = refused.or(Some(Refusal::Unreadable(e.to_string())))
            }
            // Only an input that would use the data (the pending step's reply or timer,
            // a resume) dead-letters the step; a stale or duplicate one is refused by
            // the machine before any data is read, as usual.
            Err(e) if targets_pending(def, &saga.state, &input) => {
                input = Cow::Owned(Input::DataUnreadable {
                    error: machine::StepError::new("data_unreadable", e.to_string()),
                });
            }
            Err(_) => {}
        }
        let attempt = match refused {
            Some(r) => Err(r),
            None => machine::transition(def, &saga.state, &input, now).map_err(Refusal::Machine),
        };
        match attempt {
            Ok((state, effects)) => Ok(self.transitioned(saga, input, state, effects, inbox, now)),
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
                Ok(ignored(saga, &input, &e, inbox, now, self.partitions))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The write of a transition the machine made: the new state, its journal records,
    /// its dead letter and its messages.
    fn transitioned<'i>(
        &self,
        saga: &StoredSaga,
        input: Cow<'i, Input>,
        state: SagaState,
        effects: Vec<Effect>,
        inbox: Option<&str>,
        now: Timestamp,
    ) -> Decision<'i> {
        let body = JournalRecord::Transition(Transition::new(
            &input,
            &state,
            &effects,
            (saga.version == 0).then_some(&saga.state),
            inbox,
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
        // What caused this transition, for its lifecycle events: the reply's id, or the
        // input and the version it produces.
        let causation = match inbox {
            Some(id) => id.to_owned(),
            None => crate::ids::causation_id(input.name(), &state.id, saga.version + 1),
        };
        let mut outbox = self.outbox_messages(&state, &effects, now, &causation);
        // An in-process bus loses everything with the process anyway (a start re-sends
        // what unfinished sagas wait on): no outbox rows to store.
        let direct = if self.outbox_stored {
            Vec::new()
        } else {
            std::mem::take(&mut outbox)
        };
        let journal = self.journal(&input, &saga.state, &state, body, now);
        // A re-drive, or the late success of an action dead-lettered in doubt, takes the
        // saga out of `failed`: its dead letters are done.
        let resolve_dead_letters =
            saga.state.status == SagaStatus::Failed && state.status != SagaStatus::Failed;
        let write = SagaWrite {
            id: saga.state.id,
            partition: saga.state.id.partition(self.partitions),
            expected_version: saga.version,
            // Moved, not copied: the committer hands the write back.
            state: Some(state),
            journal,
            dead_letter,
            resolve_dead_letters,
            outbox,
            inbox: inbox.map(str::to_owned),
        };
        Decision {
            write,
            then: Then::Transitioned {
                input,
                effects,
                direct,
            },
        }
    }

    /// The journal entries of the transition from `before` to `after` (`body`): one
    /// entry, or none inside a compacted retry run, with a snapshot where a run passes
    /// the window or a compacted one ends.
    fn journal(
        &self,
        input: &Input,
        before: &SagaState,
        after: &SagaState,
        body: JournalRecord,
        now: Timestamp,
    ) -> Vec<JournalEntry> {
        use crate::replay::{JournalPlan, journal_plan, snapshot};
        let entry = |at, record: JournalRecord| JournalEntry::new(at, &record);
        match journal_plan(input, before, after, self.options.journal_retry_window) {
            JournalPlan::Entry => vec![entry(now, body)],
            JournalPlan::Skip => Vec::new(),
            JournalPlan::EntryThenSnapshot => vec![
                entry(now, body),
                entry(
                    now,
                    snapshot(
                        after,
                        "retries past the journal's window are not journaled one by one",
                    ),
                ),
            ],
            JournalPlan::SnapshotThenEntry => vec![
                entry(
                    before.updated_at,
                    snapshot(before, "the compacted retries ended here"),
                ),
                entry(now, body),
            ],
        }
    }

    /// The messages a transition publishes (commands, lifecycle events, dead letters), as
    /// outbox rows that the writer holds for a lease: it publishes them itself right after
    /// the commit, and a relay takes over only if it does not.
    fn outbox_messages(
        &self,
        state: &SagaState,
        effects: &[Effect],
        now: Timestamp,
        causation: &str,
    ) -> Vec<OutboxMessage> {
        let available_at = now.plus(self.options.claim_lease);
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
                    let partition = cmd.saga_id.partition(self.partitions);
                    match wire::encode_command_for(cmd, Some(self.reply_keys), partition) {
                        Ok(msg) => push(msg),
                        // The state is committed without it; the reply deadline re-sends
                        // it.
                        Err(e) => tracing::error!(error = %e, "encoding command failed"),
                    }
                }
                Effect::EmitLifecycleEvent(ev) if self.options.publish_events => {
                    match wire::encode_event(ev, causation) {
                        Ok(msg) => push(msg),
                        Err(e) => tracing::error!(error = %e, "encoding event failed"),
                    }
                }
                Effect::DeadLetter(info) => {
                    if let Some(msg) = dead_letter_message(DeadLetterNotice::Saga(state, info)) {
                        push(msg);
                    }
                }
                Effect::EmitLifecycleEvent(_) | Effect::Finished { .. } => {}
            }
        }
        out
    }
}

/// The write of an input refused and journaled as ignored: the record only, on the
/// version read (an input ignored on a stale version must be re-evaluated).
fn ignored<'i>(
    saga: &StoredSaga,
    input: &Input,
    e: &Refusal,
    inbox: Option<&str>,
    now: Timestamp,
    partitions: u32,
) -> Decision<'i> {
    let body = JournalRecord::Ignored(Ignored {
        input: input.clone(),
        ignored: e.to_string(),
        refused: match e {
            Refusal::Unreadable(_) => Some(Refused::DataUnreadable),
            Refusal::Condition(_) => Some(Refused::Condition),
            Refusal::Machine(_) => None,
        },
        causation: inbox.map(str::to_owned),
    });
    let write = SagaWrite {
        id: saga.state.id,
        partition: saga.state.id.partition(partitions),
        expected_version: saga.version,
        state: None,
        journal: vec![JournalEntry::new(now, &body)],
        dead_letter: None,
        resolve_dead_letters: false,
        outbox: Vec::new(),
        inbox: inbox.map(str::to_owned),
    };
    Decision {
        write,
        then: Then::Ignored {
            reason: e.to_string(),
        },
    }
}

/// Inputs that are someone's request (start, cancel, re-drive) rather than a fact
/// reported by a participant or a timer: refusing them must reach the requester.
fn is_request(input: &Input) -> bool {
    matches!(
        input,
        Input::Started | Input::CancelRequested { .. } | Input::Redriven
    )
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
            Refusal::Unreadable(reason) => RuntimeError::DataUnreadable(reason),
            Refusal::Condition(reason) => RuntimeError::ConditionUnmet(reason),
        }
    }
}

/// Upcasts the saga's data to the definition's data version, if it is older (and the
/// saga can still take inputs). `Err` names the payload type and both versions.
fn bring_data_up(
    upcasters: &Upcasters,
    def: &Definition,
    state: &mut SagaState,
) -> Result<(), UpcastError> {
    // A finished saga's data is never read again: no need to bring it up.
    if state.status.is_terminal() {
        return Ok(());
    }
    crate::upcast::upcast_saga_data(upcasters, def, state)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;
    use crate::definition::{SagaDefinition, Step};
    use crate::ids::{CommandKind, SagaId, StepName};
    use crate::retry::{Jitter, RetryPolicy};

    /// The time the saga is created.
    const T0: Timestamp = Timestamp(1_700_000_000_000);

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Order {
        id: String,
    }

    /// reserve (undo: release, retried up to 20 times) -> charge.
    fn checkout() -> SagaDefinition<Order> {
        let patient = RetryPolicy {
            max_attempts: 20,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            jitter: 0.0,
        };
        SagaDefinition::<Order>::builder("checkout", 1)
            .step(
                Step::new("reserve")
                    .action(
                        "skald.cmd.stock.reserve",
                        |o: &Order| json!({ "order": o.id }),
                    )
                    .compensate(
                        "skald.cmd.stock.release",
                        |o: &Order| json!({ "order": o.id }),
                    )
                    .retry(patient),
            )
            .step(Step::new("charge").action(
                "skald.cmd.payments.charge",
                |o: &Order| json!({ "order": o.id }),
            ))
            .build()
            .expect("the test definition is valid")
    }

    /// What the decisions are made with: the default options but a journal window of
    /// `window` attempts.
    struct Env {
        upcasters: Upcasters,
        keys: ReplyKeys,
        options: RuntimeOptions,
        outbox_stored: bool,
    }

    impl Env {
        fn new(window: u32) -> Self {
            Env {
                upcasters: Upcasters::default(),
                keys: ReplyKeys::new([vec![7u8; 32]]).expect("a valid key"),
                options: RuntimeOptions {
                    journal_retry_window: window,
                    ..RuntimeOptions::default()
                },
                outbox_stored: true,
            }
        }

        fn decider(&self) -> Decider<'_> {
            Decider {
                upcasters: &self.upcasters,
                reply_keys: &self.keys,
                options: &self.options,
                outbox_stored: self.outbox_stored,
                partitions: 16,
            }
        }
    }

    fn created(def: &SagaDefinition<Order>) -> StoredSaga {
        let data = def.encode(&Order { id: "o-1".into() }).expect("encodes");
        let id = SagaId::from_uuid(uuid::Uuid::from_u128(1));
        StoredSaga {
            state: SagaState::new(id, def.definition(), data, T0),
            version: 0,
        }
    }

    /// What the store would hold after committing `write`.
    fn commit(saga: &mut StoredSaga, write: SagaWrite) {
        assert_eq!(write.expected_version, saga.version);
        if let Some(state) = write.state {
            saga.state = state;
            saga.version += 1;
        }
    }

    /// Decides `input` at `now` and commits the write; returns the decision's write
    /// and what follows.
    fn apply(
        env: &Env,
        def: &SagaDefinition<Order>,
        saga: &mut StoredSaga,
        input: &Input,
        now: Timestamp,
    ) -> (SagaWrite, String) {
        let d = env
            .decider()
            .decide(def.definition(), saga, input, None, None, now)
            .expect("decided");
        let then = match &d.then {
            Then::Transitioned { .. } => "transitioned".to_owned(),
            Then::Ignored { reason } => format!("ignored: {reason}"),
        };
        commit(saga, d.write.clone());
        (d.write, then)
    }

    fn kinds(write: &SagaWrite) -> Vec<&str> {
        write.journal.iter().map(|e| e.kind.as_str()).collect()
    }

    fn reserve_failed(attempt: u32) -> Input {
        Input::StepFailed {
            step: StepName::new("reserve").expect("valid"),
            kind: CommandKind::Action,
            attempt,
            retryable: true,
            error: machine::StepError::new("busy", "try later"),
            jitter: Jitter::NONE,
        }
    }

    /// An hour after `T0`: any retry is due by then.
    fn later() -> Timestamp {
        T0.plus(Duration::from_secs(3600))
    }

    /// The retry the state has due at [`later`].
    fn retry_due(def: &SagaDefinition<Order>, saga: &StoredSaga) -> Input {
        let due = saga
            .state
            .due_input(def.definition(), later(), Jitter::NONE);
        let input = due.expect("a retry is due");
        assert!(matches!(input, Input::RetryDue { .. }), "{input:?}");
        input
    }

    #[test]
    fn a_start_writes_the_state_its_journal_entry_and_its_command() {
        let (env, def) = (Env::new(10), checkout());
        let mut saga = created(&def);
        let d = env
            .decider()
            .decide(def.definition(), &mut saga, &Input::Started, None, None, T0)
            .expect("decided");
        let Then::Transitioned {
            effects, direct, ..
        } = &d.then
        else {
            panic!("a start transitions");
        };
        assert!(direct.is_empty(), "stored in the outbox, not handed over");
        assert!(effects.iter().any(|e| matches!(e, Effect::SendCommand(_))));
        let w = &d.write;
        assert_eq!(w.expected_version, 0, "a start creates the saga");
        assert_eq!(
            w.state.as_ref().map(|s| s.status),
            Some(SagaStatus::Running)
        );
        assert_eq!(kinds(w), ["transition"]);
        let Ok(JournalRecord::Transition(t)) = w.journal[0].record() else {
            panic!("a transition record");
        };
        assert_eq!(
            t.data,
            Some(saga.state.data.clone()),
            "a start journals its data"
        );
        let command = w
            .outbox
            .iter()
            .find(|r| r.message.subject == "skald.cmd.stock.reserve")
            .expect("the first step's command is in the outbox");
        assert!(command.message.headers.get(wire::H_REPLY_TOKEN).is_some());
        let lease = env.options.claim_lease;
        assert!(w.outbox.iter().all(|r| r.available_at == T0.plus(lease)));
        assert_eq!(w.dead_letter, None);
        assert!(!w.resolve_dead_letters);
    }

    #[test]
    fn without_a_stored_outbox_the_messages_are_handed_over_only() {
        let mut env = Env::new(10);
        env.outbox_stored = false;
        let def = checkout();
        let mut saga = created(&def);
        let d = env
            .decider()
            .decide(def.definition(), &mut saga, &Input::Started, None, None, T0)
            .expect("decided");
        assert!(d.write.outbox.is_empty());
        let Then::Transitioned { direct, .. } = &d.then else {
            panic!("a start transitions");
        };
        assert!(
            direct
                .iter()
                .any(|r| r.message.subject == "skald.cmd.stock.reserve")
        );
    }

    #[test]
    fn a_stale_reply_writes_an_ignored_record_only() {
        let (env, def) = (Env::new(10), checkout());
        let mut saga = created(&def);
        apply(&env, &def, &mut saga, &Input::Started, T0);
        apply(&env, &def, &mut saga, &reserve_failed(1), T0);
        let due = retry_due(&def, &saga);
        let (_, then) = apply(&env, &def, &mut saga, &due, later());
        assert_eq!(then, "transitioned");
        // Attempt 2 is in flight: a second failure of attempt 1 is late.
        let before = saga.clone();
        let late = reserve_failed(1);
        let d = env
            .decider()
            .decide(
                def.definition(),
                &mut saga,
                &late,
                Some("reply-1"),
                None,
                later(),
            )
            .expect("decided");
        let Then::Ignored { reason } = &d.then else {
            panic!("a stale reply is ignored");
        };
        assert!(reason.starts_with("stale"), "{reason}");
        let w = &d.write;
        assert_eq!(w.state, None, "the state is not written");
        assert_eq!(w.expected_version, before.version);
        assert!(w.outbox.is_empty() && w.dead_letter.is_none());
        assert_eq!(w.inbox.as_deref(), Some("reply-1"), "kept from coming back");
        assert_eq!(kinds(w), ["ignored"]);
        let Ok(JournalRecord::Ignored(record)) = w.journal[0].record() else {
            panic!("an ignored record");
        };
        assert_eq!(record.input, late);
        assert_eq!(&record.ignored, reason);
        assert_eq!(record.refused, None, "refused by the machine");
        assert_eq!(record.causation.as_deref(), Some("reply-1"));
        assert_eq!(saga, before, "nothing changed in memory either");
    }

    #[test]
    fn a_retry_past_the_journal_window_writes_its_entry_then_a_snapshot() {
        let (env, def) = (Env::new(1), checkout());
        let mut saga = created(&def);
        apply(&env, &def, &mut saga, &Input::Started, T0);
        // Attempt 1 of 1 journaled: inside the window.
        let (w, _) = apply(&env, &def, &mut saga, &reserve_failed(1), T0);
        assert_eq!(kinds(&w), ["transition"]);
        // Attempt 2 passes the window: its entry, then where the compaction starts.
        let due = retry_due(&def, &saga);
        let (w, _) = apply(&env, &def, &mut saga, &due, later());
        assert_eq!(kinds(&w), ["transition", "snapshot"]);
        let Ok(JournalRecord::Snapshot(s)) = w.journal[1].record() else {
            panic!("a snapshot record");
        };
        assert_eq!(Some(&s.snapshot), w.state.as_ref(), "the state after");
        // Inside the compacted run: the state is written, nothing journaled.
        let (w, then) = apply(&env, &def, &mut saga, &reserve_failed(2), later());
        assert_eq!(then, "transitioned");
        assert!(w.state.is_some());
        assert_eq!(kinds(&w), Vec::<&str>::new());
    }

    #[test]
    fn an_operator_request_whose_condition_fails_is_ignored_as_refused() {
        let (env, def) = (Env::new(10), checkout());
        let mut saga = created(&def);
        apply(&env, &def, &mut saga, &Input::Started, T0);
        let cancel = Input::CancelRequested {
            reason: "customer asked".into(),
        };
        let condition = Condition {
            expires_at: T0.plus(Duration::from_secs(60)),
            if_redrives: None,
            if_version: Some(saga.version + 1),
        };
        let d = env
            .decider()
            .decide(
                def.definition(),
                &mut saga,
                &cancel,
                Some("op:alice:1"),
                Some(&condition),
                T0,
            )
            .expect("decided");
        let Then::Ignored { reason } = &d.then else {
            panic!("refused, journaled");
        };
        assert!(
            reason.contains("the request's condition does not hold"),
            "{reason}"
        );
        assert!(reason.contains("made at version 2"), "{reason}");
        assert_eq!(d.write.state, None);
        let Ok(JournalRecord::Ignored(record)) = d.write.journal[0].record() else {
            panic!("an ignored record");
        };
        assert_eq!(record.refused, Some(Refused::Condition));
        assert_eq!(record.causation.as_deref(), Some("op:alice:1"));
    }

    #[test]
    fn an_expired_request_is_refused_whatever_the_saga() {
        let (env, def) = (Env::new(10), checkout());
        let mut saga = created(&def);
        apply(&env, &def, &mut saga, &Input::Started, T0);
        let condition = Condition {
            expires_at: T0,
            if_redrives: None,
            if_version: None,
        };
        let later = T0.plus(Duration::from_millis(1));
        let d = env
            .decider()
            .decide(
                def.definition(),
                &mut saga,
                &Input::Redriven,
                Some("op:alice:2"),
                Some(&condition),
                later,
            )
            .expect("decided");
        let Ok(JournalRecord::Ignored(record)) = d.write.journal[0].record() else {
            panic!("an ignored record");
        };
        assert_eq!(record.refused, Some(Refused::Condition));
        assert!(record.ignored.contains("expired"), "{}", record.ignored);
    }

    #[test]
    fn a_request_not_from_the_bus_is_refused_with_an_error_not_journaled() {
        let (env, def) = (Env::new(10), checkout());
        let mut saga = created(&def);
        apply(&env, &def, &mut saga, &Input::Started, T0);
        // A re-drive of a saga that is not dead-lettered, asked through the API.
        let refused = env
            .decider()
            .decide(
                def.definition(),
                &mut saga,
                &Input::Redriven,
                None,
                None,
                T0,
            )
            .expect_err("refused");
        assert!(matches!(refused, RuntimeError::Transition(_)), "{refused}");
    }
}
