//! The saga state machine: a pure function from (definition, state, input, now) to
//! (new state, effects).
//!
//! No I/O, no clock read, no randomness: the time is an argument and the jitter of a retry
//! delay arrives inside the input that may cause a retry. Every rule of a saga lives
//! here, which is where the property tests aim:
//!
//! - forward steps run in order; a retryable failure or a timeout retries per the step's
//!   policy, and attempts never exceed it;
//! - a permanent failure, spent retries or a cancel request start compensation: the
//!   compensations of every step that *may* have taken effect, in reverse order: the
//!   completed steps that have one, and the action pending when compensation began if
//!   its outcome is unknown (an attempt timed out with no definite answer since, or a
//!   cancel arrived while it was in flight). An in-doubt step without a compensation
//!   dead-letters the saga instead of letting it end `compensated` around an effect;
//! - a success for *any* attempt of the pending action is accepted (every attempt shares
//!   one idempotency key, so one effect); a success whose output the definition cannot
//!   decode dead-letters the saga (the step did take effect) for an operator;
//! - a cancel while an action is in flight waits for that action's outcome or deadline,
//!   then compensates, the action included when it may have happened;
//! - a compensation that fails permanently or spends its retries dead-letters the saga
//!   (`Failed`), to be re-driven by an operator (`Redriven` resumes that compensation
//!   with a fresh attempt budget);
//! - terminal sagas accept no input; duplicate and stale replies change nothing (the
//!   error says which, so the shell records it and acknowledges the message).
//!
//! Wake-ups are not effects: the state says when the saga must next be woken
//! ([`SagaState::wake_at`], a reply deadline or the end of a backoff), the shell stores
//! it beside the state and arms its timers from it, and [`SagaState::due_input`] says
//! what a wake-up stands for. One source of truth, persisted with the state it belongs
//! to.
//!
//! The crate depends on no actix, tokio, sqlx or async-nats: the compiler, not a
//! comment, keeps the machine free of I/O.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{DataError, Definition, StepDefinition};
use crate::ids::{self, CommandKind, SagaId, SagaType, StepName};
use crate::retry::{Jitter, RetryPolicy};

/// Milliseconds since the Unix epoch. The machine never reads a clock: the shell passes
/// the time in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// Time from `self` until `later` (zero if `later` is not after `self`).
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }

    /// Milliseconds since the epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Where a saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Created, `Started` not yet applied (never persisted on its own).
    Created,
    /// Running forward steps.
    Running,
    /// Running compensations, in reverse order.
    Compensating,
    /// Every step succeeded. Terminal.
    Completed,
    /// Every needed compensation succeeded (or none was needed). Terminal.
    Compensated,
    /// Dead-lettered: a compensation could not be done. Waits for an operator re-drive.
    Failed,
}

impl SagaStatus {
    /// Terminal statuses accept no input.
    pub fn is_terminal(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
    }

    /// Settled: terminal, or dead-lettered (`Failed`, waiting for an operator). Nothing
    /// moves a settled saga but an operator (a re-drive) or a late reply that resolves a
    /// dead letter in doubt.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed
        )
    }

    /// The status as stored and shown (`running`, `compensated`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Created => "created",
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Failed => "failed",
        }
    }

    /// Parses [`SagaStatus::as_str`] back.
    pub fn parse(s: &str) -> Option<SagaStatus> {
        Some(match s {
            "created" => SagaStatus::Created,
            "running" => SagaStatus::Running,
            "compensating" => SagaStatus::Compensating,
            "completed" => SagaStatus::Completed,
            "compensated" => SagaStatus::Compensated,
            "failed" => SagaStatus::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reported by a participant (or made up by the runtime for a timeout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    /// A short machine-readable code, e.g. `card_declined`, `timeout`.
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

impl StepError {
    /// Builds an error.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        StepError {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// What the pending command is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// The command was sent; its reply is due by `deadline`.
    AwaitingReply {
        /// When the attempt times out.
        deadline: Timestamp,
    },
    /// The attempt failed; the next one is due at `due`.
    Backoff {
        /// When the next attempt is sent.
        due: Timestamp,
    },
}

/// The one command a saga is working on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Index of the step in the definition.
    pub step: usize,
    /// Action or compensation.
    pub kind: CommandKind,
    /// Attempt number of the command in flight (or of the one that failed, in backoff).
    /// Monotonic per step and kind across re-drives, so a late reply to a pre-re-drive
    /// attempt is recognised as stale.
    pub attempt: u32,
    /// The attempt number that opened the current retry budget (1, or the first attempt
    /// after a re-drive). Attempts used = `attempt - first_attempt + 1`.
    pub first_attempt: u32,
    /// What it waits for.
    #[serde(flatten)]
    pub phase: Phase,
    /// The action may have taken effect although no success was applied: an attempt of
    /// it timed out (or was cut short by a cancel) and no definite answer came since. If
    /// compensation begins while this is set, the step is compensated like a completed
    /// one. Always `false` for compensations. Absent in rows written before 0.1 kept it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub in_doubt: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Pending {
    /// Attempts made in the current retry budget, the one in flight included (at least
    /// 1; saturating, so counters read from a damaged row never overflow).
    pub fn attempts_used(&self) -> u32 {
        self.attempt
            .saturating_sub(self.first_attempt)
            .saturating_add(1)
    }
}

/// Where and why a saga was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterInfo {
    /// Index of the step.
    pub step: usize,
    /// The step's name.
    pub step_name: StepName,
    /// Action or compensation (an action only when its data was unreadable).
    pub kind: CommandKind,
    /// The last error.
    pub error: StepError,
    /// Attempts made in the budget that was spent.
    pub attempts: u32,
    /// The last attempt number, so a re-drive continues the numbering.
    pub last_attempt: u32,
    /// A dead-lettered action whose outcome is unknown (it may have taken effect): its
    /// re-drive keeps it in doubt until a definite answer comes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub in_doubt: bool,
}

/// The persistent state of one saga instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// The instance.
    pub id: SagaId,
    /// Its type.
    pub saga_type: SagaType,
    /// The definition version it started on.
    pub definition_version: u32,
    /// The schema version of `data` (the definition's `data_version` when it was
    /// written; older data is upcast when the saga is loaded).
    #[serde(default = "one")]
    pub data_version: u32,
    /// The saga data (`D`, serialized).
    pub data: Value,
    /// Where it is.
    pub status: SagaStatus,
    /// Forward steps completed: `steps[0..completed]` are done.
    pub completed: usize,
    /// The command being worked on, if any.
    pub pending: Option<Pending>,
    /// Why compensation started (the failing step's error, or the cancel reason).
    pub failure: Option<StepError>,
    /// Set while `Failed`: the dead-lettered compensation.
    pub dead_letter: Option<DeadLetterInfo>,
    /// Set while a cancel waits for the action in flight to answer or time out (the
    /// saga stays `Running` meanwhile): the reason, with code `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<StepError>,
    /// Set when compensation began while the pending action's outcome was unknown: that
    /// step's index. It is compensated like a completed step, so the compensation bound
    /// is `completed + 1` (see [`SagaState::compensation_bound`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt: Option<usize>,
    /// How many times an operator re-drove it.
    pub redrives: u32,
    /// When it was created.
    pub created_at: Timestamp,
    /// When the last transition was applied.
    pub updated_at: Timestamp,
}

/// Codes of a `retryable` answer that says another delivery of the key is being handled
/// right now (docs/protocol.md, the fence): that delivery's outcome is unknown, so the
/// step is in doubt as after a timeout.
pub const IN_PROGRESS_CODES: [&str; 2] = ["in_progress", "action_in_progress"];

/// Error code of a dead letter whose action may have taken effect and has nothing to
/// undo it.
pub const IN_DOUBT_WITHOUT_COMPENSATION: &str = "in_doubt_without_compensation";
/// Error code of a dead letter whose action succeeded with an output the definition
/// cannot decode.
pub const UNDECODABLE_OUTPUT: &str = "undecodable_output";

impl DeadLetterInfo {
    /// Whether the dead letter waits on its action's outcome (it is in doubt with nothing
    /// to undo it, or its output did not decode): a decodable success for that action,
    /// late from any attempt, resolves it without an operator.
    pub fn awaits_outcome(&self) -> bool {
        self.in_doubt
            && self.kind == CommandKind::Action
            && matches!(
                self.error.code.as_str(),
                IN_DOUBT_WITHOUT_COMPENSATION | UNDECODABLE_OUTPUT
            )
    }
}

impl SagaState {
    /// A new instance, status `Created`; apply [`Input::Started`] to run it.
    pub fn new(id: SagaId, definition: &Definition, data: Value, now: Timestamp) -> SagaState {
        SagaState {
            id,
            saga_type: definition.saga_type().clone(),
            definition_version: definition.version(),
            data_version: definition.data_version(),
            data,
            status: SagaStatus::Created,
            completed: 0,
            pending: None,
            failure: None,
            dead_letter: None,
            cancel: None,
            in_doubt: None,
            redrives: 0,
            created_at: now,
            updated_at: now,
        }
    }

    /// Steps `0..bound` may have taken effect: the completed ones, and the in-doubt one
    /// when compensation began around it.
    pub fn compensation_bound(&self) -> usize {
        self.completed
            .saturating_add(usize::from(self.in_doubt.is_some()))
    }

    /// When the saga next needs a wake-up (a reply deadline or a retry), if ever.
    pub fn wake_at(&self) -> Option<Timestamp> {
        self.pending.map(|p| match p.phase {
            Phase::AwaitingReply { deadline } => deadline,
            Phase::Backoff { due } => due,
        })
    }

    /// The input a wake-up at `now` stands for, if one is due: `TimedOut` for a reply
    /// deadline that passed, `RetryDue` for a backoff that ended.
    pub fn due_input(
        &self,
        definition: &Definition,
        now: Timestamp,
        jitter: Jitter,
    ) -> Option<Input> {
        let p = self.pending?;
        let step = definition.step(p.step)?.name().clone();
        match p.phase {
            Phase::AwaitingReply { deadline } if deadline <= now => Some(Input::TimedOut {
                step,
                kind: p.kind,
                attempt: p.attempt,
                jitter,
            }),
            Phase::Backoff { due } if due <= now => Some(Input::RetryDue {
                step,
                kind: p.kind,
                attempt: p.attempt,
            }),
            _ => None,
        }
    }
}

/// A fact fed to the machine. Past tense: it already happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// The saga was started.
    Started,
    /// A participant reported success.
    StepSucceeded {
        /// The step the reply is for.
        step: StepName,
        /// Action or compensation.
        kind: CommandKind,
        /// The attempt the reply is for.
        attempt: u32,
        /// The reply's output (applied to the data for an action with `on_success`).
        output: Value,
    },
    /// A participant reported failure.
    StepFailed {
        /// The step the reply is for.
        step: StepName,
        /// Action or compensation.
        kind: CommandKind,
        /// The attempt the reply is for.
        attempt: u32,
        /// Whether another attempt may succeed.
        retryable: bool,
        /// What went wrong.
        error: StepError,
        /// The random draw for the retry delay.
        jitter: Jitter,
    },
    /// No reply arrived before the attempt's deadline.
    TimedOut {
        /// The step.
        step: StepName,
        /// Action or compensation.
        kind: CommandKind,
        /// The attempt that timed out.
        attempt: u32,
        /// The random draw for the retry delay.
        jitter: Jitter,
    },
    /// The backoff after a failed attempt ended.
    RetryDue {
        /// The step.
        step: StepName,
        /// Action or compensation.
        kind: CommandKind,
        /// The attempt that failed.
        attempt: u32,
    },
    /// Someone asked to cancel: compensate what was done.
    CancelRequested {
        /// Why.
        reason: String,
    },
    /// An operator re-drove a dead-lettered saga.
    Redriven,
    /// The process (re)activated the saga after a restart: the command it waits on may
    /// have been lost (a non-durable bus, or a crash between commit and publish), so it
    /// is sent again (same attempt, same keys).
    Resumed,
    /// The saga's stored data cannot be brought to the definition's data version (no
    /// upcaster path, or an upcaster refused it): the step in flight is dead-lettered
    /// with the reason, to be re-driven once an upcaster is registered.
    DataUnreadable {
        /// Why (names the payload type and both versions).
        error: StepError,
    },
}

impl Input {
    /// The input's name as journaled (`step_succeeded`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Input::Started => "started",
            Input::StepSucceeded { .. } => "step_succeeded",
            Input::StepFailed { .. } => "step_failed",
            Input::TimedOut { .. } => "timed_out",
            Input::RetryDue { .. } => "retry_due",
            Input::CancelRequested { .. } => "cancel_requested",
            Input::Redriven => "redriven",
            Input::Resumed => "resumed",
            Input::DataUnreadable { .. } => "data_unreadable",
        }
    }

    /// The (step, kind, attempt) an input addresses, for replies and timers.
    pub fn target(&self) -> Option<(&StepName, CommandKind, u32)> {
        match self {
            Input::StepSucceeded {
                step,
                kind,
                attempt,
                ..
            }
            | Input::StepFailed {
                step,
                kind,
                attempt,
                ..
            }
            | Input::TimedOut {
                step,
                kind,
                attempt,
                ..
            }
            | Input::RetryDue {
                step,
                kind,
                attempt,
            } => Some((step, *kind, *attempt)),
            _ => None,
        }
    }
}

/// A command to publish to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The saga.
    pub saga_id: SagaId,
    /// Its type.
    pub saga_type: SagaType,
    /// The step.
    pub step: StepName,
    /// Action or compensation.
    pub kind: CommandKind,
    /// Attempt number (1-based, monotonic per step and kind).
    pub attempt: u32,
    /// Subject to publish on.
    pub subject: String,
    /// JSON payload.
    pub payload: Value,
    /// Stable across attempts of the same step and kind: the participant dedupes on it.
    pub idempotency_key: String,
    /// Unique per attempt (broker-side duplicate detection).
    pub message_id: String,
    /// When the attempt times out.
    pub deadline: Timestamp,
    /// The payload's schema version (the step's).
    #[serde(default = "one")]
    pub schema_version: u32,
    /// The definition version of the saga (so an upcaster can find the step's current
    /// schema version for a command stored by an older build).
    #[serde(default = "one")]
    pub definition_version: u32,
    /// Compensations only: the idempotency key of the action they undo, so a participant
    /// undoes by that key (its payload may lack what only the action's reply taught).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_key: Option<String>,
    /// Compensations only: the action's outcome was unknown when compensation began (it
    /// may never have run: the participant then records a tombstone and succeeds).
    #[serde(default, skip_serializing_if = "is_false")]
    pub in_doubt: bool,
}

fn one() -> u32 {
    1
}

/// The lifecycle events published for integration (`skald.evt.<saga_type>.<event>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The saga started.
    Started,
    /// A step (or compensation) succeeded.
    StepSucceeded,
    /// A step (or compensation) attempt failed.
    StepFailed,
    /// A retry was scheduled.
    RetryScheduled,
    /// Compensation started.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Compensation finished.
    Compensated,
    /// A compensation could not be done: waiting for an operator.
    DeadLettered,
    /// An operator re-drove the saga.
    Redriven,
    /// The saga was cancelled.
    Cancelled,
}

impl EventKind {
    /// The event's subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::StepSucceeded => "step_succeeded",
            EventKind::StepFailed => "step_failed",
            EventKind::RetryScheduled => "retry_scheduled",
            EventKind::Compensating => "compensating",
            EventKind::Completed => "completed",
            EventKind::Compensated => "compensated",
            EventKind::DeadLettered => "dead_lettered",
            EventKind::Redriven => "redriven",
            EventKind::Cancelled => "cancelled",
        }
    }
}

/// A lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// What happened.
    pub event: EventKind,
    /// The saga.
    pub saga_id: SagaId,
    /// Its type.
    pub saga_type: SagaType,
    /// The step concerned, if any.
    pub step: Option<StepName>,
    /// Action or compensation, if a step is concerned.
    pub kind: Option<CommandKind>,
    /// The attempt concerned, if any.
    pub attempt: Option<u32>,
    /// The error, for failures.
    pub error: Option<StepError>,
    /// When.
    pub at: Timestamp,
}

/// Something the shell must do after the new state is committed. Imperative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Publish a command to a participant.
    SendCommand(Command),
    /// Publish a lifecycle event.
    EmitLifecycleEvent(LifecycleEvent),
    /// Record the saga as dead-lettered for an operator.
    DeadLetter(DeadLetterInfo),
    /// The saga reached a terminal status.
    Finished {
        /// `Completed` or `Compensated`.
        status: SagaStatus,
    },
}

/// Why an input was not applied. The state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The saga is terminal and accepts no input.
    #[error("saga is {status}: it accepts no input")]
    Finished {
        /// The terminal status.
        status: SagaStatus,
    },
    /// A reply for a step (or compensation) that already succeeded.
    #[error("duplicate reply for {kind} of step {step:?} (attempt {attempt}): already done")]
    Duplicate {
        /// The step named by the reply.
        step: StepName,
        /// Action or compensation.
        kind: CommandKind,
        /// The attempt named by the reply.
        attempt: u32,
    },
    /// A reply or timer for an attempt or step the saga is not waiting on.
    #[error("stale {input} for {kind} of step {step:?} attempt {attempt}: {expected}")]
    Stale {
        /// The input's name.
        input: &'static str,
        /// The step named by the input.
        step: StepName,
        /// Action or compensation.
        kind: CommandKind,
        /// The attempt named by the input.
        attempt: u32,
        /// What the saga waits for instead.
        expected: String,
    },
    /// The input names a step the definition does not have.
    #[error("unknown step {step:?} for saga type {saga_type}")]
    UnknownStep {
        /// The saga type.
        saga_type: SagaType,
        /// The unknown step.
        step: StepName,
    },
    /// The input does not apply in the saga's status (e.g. a re-drive of a running saga).
    #[error("{input} is not allowed while the saga is {status}")]
    NotAllowed {
        /// The input's name.
        input: &'static str,
        /// The current status.
        status: SagaStatus,
    },
    /// A second cancel while the first still waits for the action in flight.
    #[error("a cancel already waits for {kind} of step {step:?} to answer or time out")]
    CancelPending {
        /// The step in flight.
        step: StepName,
        /// Its kind (always an action).
        kind: CommandKind,
    },
    /// The saga data could not be (de)serialized (e.g. a command payload could not be
    /// built from it).
    #[error("data error: {0}")]
    Data(#[from] DataError),
    /// The stored state names a step the definition it runs under does not have: the
    /// definition was edited in place to fewer steps (instead of getting a new version
    /// while its sagas finish), or the row is damaged. No input can apply: the saga
    /// needs an operator (register the definition it started on again).
    #[error(
        "the stored saga's {field} is {index}, out of range: definition {saga_type} \
         v{version} has {steps} step(s) (was it edited in place instead of getting a new \
         version?)"
    )]
    StepOutOfRange {
        /// The saga type.
        saga_type: SagaType,
        /// The definition version the saga runs under.
        version: u32,
        /// Which stored index (`pending.step`, `completed`, `in_doubt`,
        /// `dead_letter.step`).
        field: &'static str,
        /// Its value.
        index: usize,
        /// How many steps the definition has.
        steps: usize,
    },
    /// The stored state's attempt counters are ones no transition produces (an attempt
    /// 0, a budget opened after the attempt in flight, a counter at its maximum that
    /// cannot count one more): the row is damaged. No input can apply.
    #[error("the stored saga's {field} is {value}: {reason}")]
    CorruptCounter {
        /// Which stored counter (`pending.attempt`, `pending.first_attempt`,
        /// `dead_letter.last_attempt`).
        field: &'static str,
        /// Its value.
        value: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl TransitionError {
    /// Inputs refused for being late, repeated or after the end: record and acknowledge
    /// them, they are not errors of the sender.
    pub fn is_ignorable(&self) -> bool {
        matches!(
            self,
            TransitionError::Finished { .. }
                | TransitionError::Duplicate { .. }
                | TransitionError::Stale { .. }
                | TransitionError::CancelPending { .. }
        )
    }

    /// Inputs that can never apply (an unknown step, a command payload the saga data
    /// cannot build, a stored state that does not fit its definition): poison messages
    /// to dead-letter with the reason. (A success whose output does not decode is not
    /// poison: the step took effect, so the machine dead-letters the saga instead.)
    pub fn is_poison(&self) -> bool {
        matches!(
            self,
            TransitionError::UnknownStep { .. }
                | TransitionError::Data(_)
                | TransitionError::StepOutOfRange { .. }
                | TransitionError::CorruptCounter { .. }
        )
    }

    /// Whether the stored state itself is unusable under its definition (every input
    /// is refused alike until an operator acts), rather than the input.
    pub fn is_corrupt_state(&self) -> bool {
        matches!(
            self,
            TransitionError::StepOutOfRange { .. } | TransitionError::CorruptCounter { .. }
        )
    }
}

/// Checks that a stored (non-terminal) state fits `definition`: every step index it
/// holds names a step of it, and its attempt counters are ones a transition produces.
/// The machine indexes the definition's steps by these and counts attempts on from
/// them, so a row that does not fit (a definition edited in place to fewer steps, a
/// damaged row) is refused with a typed error here, never a panic further on.
pub fn check_state(definition: &Definition, state: &SagaState) -> Result<(), TransitionError> {
    let steps = definition.steps().len();
    let out_of_range = |field: &'static str, index: usize| TransitionError::StepOutOfRange {
        saga_type: definition.saga_type().clone(),
        version: definition.version(),
        field,
        index,
        steps,
    };
    let corrupt =
        |field: &'static str, value: u32, reason: &'static str| TransitionError::CorruptCounter {
            field,
            value,
            reason,
        };
    if state.completed > steps {
        return Err(out_of_range("completed", state.completed));
    }
    if let Some(p) = state.pending {
        if p.step >= steps {
            return Err(out_of_range("pending.step", p.step));
        }
        if p.attempt == 0 {
            return Err(corrupt(
                "pending.attempt",
                p.attempt,
                "attempts are numbered from 1",
            ));
        }
        if p.attempt == u32::MAX {
            return Err(corrupt(
                "pending.attempt",
                p.attempt,
                "no further attempt can be numbered",
            ));
        }
        if p.first_attempt == 0 || p.first_attempt > p.attempt {
            return Err(corrupt(
                "pending.first_attempt",
                p.first_attempt,
                "a retry budget opens at an attempt from 1 to the one in flight",
            ));
        }
    }
    if let Some(i) = state.in_doubt
        && i >= steps
    {
        return Err(out_of_range("in_doubt", i));
    }
    if state.compensation_bound() > steps {
        return Err(out_of_range("completed", state.completed));
    }
    if let Some(dl) = &state.dead_letter {
        if dl.step >= steps {
            return Err(out_of_range("dead_letter.step", dl.step));
        }
        if dl.last_attempt == u32::MAX {
            return Err(corrupt(
                "dead_letter.last_attempt",
                dl.last_attempt,
                "a re-drive cannot number its attempt",
            ));
        }
    }
    Ok(())
}

/// The result of a transition: the new state and what to do about it.
pub type Transition = (SagaState, Vec<Effect>);

/// Applies `input` to `state` under `definition` at time `now`.
///
/// Pure and deterministic: the same arguments always give the same result. On error the
/// caller's state is unchanged (it is borrowed, never mutated).
pub fn transition(
    definition: &Definition,
    state: &SagaState,
    input: &Input,
    now: Timestamp,
) -> Result<Transition, TransitionError> {
    if state.status.is_terminal() {
        return Err(TransitionError::Finished {
            status: state.status,
        });
    }
    check_state(definition, state)?;
    let mut m = Machine {
        def: definition,
        state: state.clone(),
        effects: Vec::new(),
        now,
    };
    m.apply(input)?;
    m.state.updated_at = now;
    Ok((m.state, m.effects))
}

struct Machine<'a> {
    def: &'a Definition,
    state: SagaState,
    effects: Vec<Effect>,
    now: Timestamp,
}

impl Machine<'_> {
    fn apply(&mut self, input: &Input) -> Result<(), TransitionError> {
        match input {
            Input::Started => self.on_started(),
            Input::StepSucceeded { output, .. } => {
                let p = self.expect_reply(input)?;
                self.on_succeeded(p, output)
            }
            Input::StepFailed {
                retryable,
                error,
                jitter,
                ..
            } => {
                let p = self.expect_reply(input)?;
                let outcome = match retryable {
                    // Another delivery holds the key: what it does is not known yet.
                    true if IN_PROGRESS_CODES.contains(&error.code.as_str()) => Failure::Unknown,
                    true => Failure::Retryable,
                    false => Failure::Permanent,
                };
                self.on_failed(p, outcome, error.clone(), *jitter)
            }
            Input::TimedOut { jitter, .. } => {
                let p = self.expect_timer(input, Awaits::Deadline)?;
                let error = StepError::new(
                    "timeout",
                    format!("no reply within {:?}", self.step_def(p.step).timeout()),
                );
                self.on_failed(p, Failure::Unknown, error, *jitter)
            }
            Input::RetryDue { .. } => {
                let p = self.expect_timer(input, Awaits::BackoffEnd)?;
                self.on_retry_due(p)
            }
            Input::CancelRequested { reason } => self.on_cancel(reason),
            Input::Redriven => self.on_redriven(),
            Input::Resumed => self.on_resumed(),
            Input::DataUnreadable { error } => self.on_data_unreadable(error),
        }
    }

    fn step_def(&self, index: usize) -> &StepDefinition {
        // Every index the machine uses is one `check_state` verified against this
        // definition, one it resolved by name, or one below those; the fallback (the
        // last step: a definition is never empty) is unreachable and only keeps a
        // mistake from turning into a panic.
        let steps = self.def.steps();
        match steps.get(index).or(steps.last()) {
            Some(step) => step,
            None => unreachable!("a definition has at least one step"),
        }
    }

    fn not_allowed(&self, input: &'static str) -> TransitionError {
        TransitionError::NotAllowed {
            input,
            status: self.state.status,
        }
    }

    /// Resolves the step a reply or timer names and checks that it is the pending one.
    ///
    /// A success is accepted for any attempt of the pending step and kind that was sent,
    /// in either phase: every attempt carries the same idempotency key, so a late success
    /// of an earlier attempt reports the one effect. A failure or a timer must name the
    /// attempt in flight, in the phase it answers.
    fn check_target(&self, input: &Input, answers: Awaits) -> Result<Pending, TransitionError> {
        let (step, kind, attempt) = input
            .target()
            .ok_or_else(|| self.not_allowed(input.name()))?;
        let index =
            self.def
                .step_index(step.as_str())
                .ok_or_else(|| TransitionError::UnknownStep {
                    saga_type: self.def.saga_type().clone(),
                    step: step.clone(),
                })?;
        if self.state.status == SagaStatus::Created {
            return Err(self.not_allowed(input.name()));
        }
        let stale = |expected: String| TransitionError::Stale {
            input: input.name(),
            step: step.clone(),
            kind,
            attempt,
            expected,
        };
        let duplicate = TransitionError::Duplicate {
            step: step.clone(),
            kind,
            attempt,
        };
        let Some(p) = self.state.pending else {
            // Failed: nothing is pending. A success of the action dead-lettered in doubt
            // is the outcome it waits for; any other reply now is a leftover.
            if let (Some(dl), Awaits::Success) = (&self.state.dead_letter, answers)
                && dl.awaits_outcome()
                && (dl.step, dl.kind) == (index, kind)
                && (1..=dl.last_attempt).contains(&attempt)
            {
                return Ok(Pending {
                    step: dl.step,
                    kind: dl.kind,
                    attempt,
                    first_attempt: dl
                        .last_attempt
                        .saturating_add(1)
                        .saturating_sub(dl.attempts)
                        .max(1),
                    phase: Phase::AwaitingReply { deadline: self.now },
                    in_doubt: true,
                });
            }
            return Err(stale("nothing (the saga waits for an operator)".into()));
        };
        // Already-finished work: forward steps before `completed`, compensations after
        // the one pending (they run in reverse).
        let done = match kind {
            CommandKind::Action => index < self.state.completed,
            CommandKind::Compensation => {
                self.state.status == SagaStatus::Compensating
                    && index > p.step
                    && index < self.state.compensation_bound()
                    && self.step_def(index).compensation().is_some()
            }
        };
        let expected = || {
            format!(
                "waiting on {} of step {:?} attempt {} ({})",
                p.kind,
                self.step_def(p.step).name().as_str(),
                p.attempt,
                match p.phase {
                    Phase::AwaitingReply { .. } => "awaiting reply",
                    Phase::Backoff { .. } => "in backoff",
                }
            )
        };
        if index != p.step || kind != p.kind {
            return Err(if done && input_is_reply(input) {
                duplicate
            } else {
                stale(expected())
            });
        }
        let in_backoff = matches!(p.phase, Phase::Backoff { .. });
        match answers {
            // Attempts are numbered from 1; 0 was never sent.
            _ if attempt == 0 => Err(stale(expected())),
            Awaits::Success if attempt <= p.attempt => Ok(p),
            _ if attempt != p.attempt => Err(stale(expected())),
            Awaits::Success | Awaits::Reply if in_backoff => Err(stale(expected())),
            Awaits::Success | Awaits::Reply => Ok(p),
            Awaits::Deadline if in_backoff => Err(stale(expected())),
            Awaits::BackoffEnd if !in_backoff => Err(stale(expected())),
            // A timer that fires early (a clock step, a skewed node) is not yet due.
            Awaits::Deadline | Awaits::BackoffEnd
                if self.state.wake_at().is_some_and(|at| at > self.now) =>
            {
                Err(stale(format!(
                    "{} (not due before {})",
                    expected(),
                    self.state.wake_at().unwrap_or_default()
                )))
            }
            Awaits::Deadline | Awaits::BackoffEnd => Ok(p),
        }
    }

    fn expect_reply(&self, input: &Input) -> Result<Pending, TransitionError> {
        let answers = match input {
            Input::StepSucceeded { .. } => Awaits::Success,
            _ => Awaits::Reply,
        };
        self.check_target(input, answers)
    }

    fn expect_timer(&self, input: &Input, answers: Awaits) -> Result<Pending, TransitionError> {
        self.check_target(input, answers)
    }

    fn event(
        &mut self,
        event: EventKind,
        step: Option<(usize, CommandKind, u32)>,
        error: Option<StepError>,
    ) {
        let (step, kind, attempt) = match step {
            Some((i, k, a)) => (Some(self.step_def(i).name().clone()), Some(k), Some(a)),
            None => (None, None, None),
        };
        self.effects
            .push(Effect::EmitLifecycleEvent(LifecycleEvent {
                event,
                saga_id: self.state.id,
                saga_type: self.state.saga_type.clone(),
                step,
                kind,
                attempt,
                error,
                at: self.now,
            }));
    }

    /// Sends attempt `attempt` of (`step`, `kind`) and waits for its reply. `in_doubt`
    /// carries an action's unknown outcome from earlier attempts into this one.
    fn send(
        &mut self,
        step: usize,
        kind: CommandKind,
        attempt: u32,
        first_attempt: u32,
        in_doubt: bool,
    ) -> Result<(), TransitionError> {
        let def = self.step_def(step);
        let template = match kind {
            CommandKind::Action => def.action(),
            // Only steps with a compensation are ever scheduled for one.
            CommandKind::Compensation => def.compensation().unwrap_or(def.action()),
        };
        let payload = template.payload(&self.state.data)?;
        let deadline = self.now.plus(def.timeout());
        let name = def.name().clone();
        let (action_key, compensating_in_doubt) = match kind {
            CommandKind::Action => (None, false),
            CommandKind::Compensation => (
                Some(ids::idempotency_key(
                    &self.state.id,
                    &name,
                    CommandKind::Action,
                )),
                self.state.in_doubt == Some(step),
            ),
        };
        let command = Command {
            saga_id: self.state.id,
            saga_type: self.state.saga_type.clone(),
            idempotency_key: ids::idempotency_key(&self.state.id, &name, kind),
            message_id: ids::command_message_id(&self.state.id, &name, kind, attempt),
            step: name,
            kind,
            attempt,
            subject: template.subject().to_owned(),
            payload,
            deadline,
            schema_version: def.schema_version(),
            definition_version: self.state.definition_version,
            action_key,
            in_doubt: compensating_in_doubt,
        };
        self.state.pending = Some(Pending {
            step,
            kind,
            attempt,
            first_attempt,
            phase: Phase::AwaitingReply { deadline },
            in_doubt: in_doubt && kind == CommandKind::Action,
        });
        self.effects.push(Effect::SendCommand(command));
        Ok(())
    }

    fn on_started(&mut self) -> Result<(), TransitionError> {
        if self.state.status != SagaStatus::Created {
            return Err(self.not_allowed("started"));
        }
        self.state.status = SagaStatus::Running;
        self.event(EventKind::Started, None, None);
        self.send(0, CommandKind::Action, 1, 1, false)
    }

    fn on_succeeded(&mut self, p: Pending, output: &Value) -> Result<(), TransitionError> {
        match p.kind {
            CommandKind::Action => {
                let applied = self.step_def(p.step).apply_output(&self.state.data, output);
                if self.state.status == SagaStatus::Failed {
                    // The late answer a dead letter in doubt waited for: it ends the
                    // dead letter, unless it does not decode either.
                    if let Err(e) = &applied {
                        return Err(TransitionError::Stale {
                            input: "step_succeeded",
                            step: self.step_def(p.step).name().clone(),
                            kind: p.kind,
                            attempt: p.attempt,
                            expected: format!("a success that decodes ({e})"),
                        });
                    }
                    self.state.status = SagaStatus::Running;
                    self.state.dead_letter = None;
                    self.state.failure = None;
                }
                match applied {
                    Ok(Some(data)) => self.state.data = data,
                    Ok(None) => {}
                    Err(e) => {
                        // The participant applied the effect, but its output does not fit
                        // the definition: the saga stops here for an operator (fix the
                        // participant or the definition, then re-drive: the same key
                        // brings the same success back). Never compensate around it.
                        let error = StepError::new(
                            UNDECODABLE_OUTPUT,
                            format!(
                                "the success output of step {:?} does not decode: {e}",
                                self.step_def(p.step).name().as_str()
                            ),
                        );
                        self.dead_letter(
                            Pending {
                                in_doubt: true,
                                ..p
                            },
                            error,
                        );
                        return Ok(());
                    }
                }
                self.state.completed = p.step + 1;
                self.event(
                    EventKind::StepSucceeded,
                    Some((p.step, p.kind, p.attempt)),
                    None,
                );
                if self.state.completed == self.def.steps().len() {
                    // Every step took effect: a cancel that waited on the last one came
                    // too late, and the saga is what happened, completed.
                    self.finish(SagaStatus::Completed);
                    Ok(())
                } else if let Some(cancel) = self.state.cancel.clone() {
                    self.start_compensation(cancel, None)
                } else {
                    self.send(p.step + 1, CommandKind::Action, 1, 1, false)
                }
            }
            CommandKind::Compensation => {
                self.event(
                    EventKind::StepSucceeded,
                    Some((p.step, p.kind, p.attempt)),
                    None,
                );
                self.compensate_below(p.step)
            }
        }
    }

    fn policy(&self, p: &Pending) -> &RetryPolicy {
        let def = self.step_def(p.step);
        match p.kind {
            CommandKind::Action => def.retry(),
            CommandKind::Compensation => def.compensation_retry(),
        }
    }

    fn on_failed(
        &mut self,
        p: Pending,
        failure: Failure,
        error: StepError,
        jitter: Jitter,
    ) -> Result<(), TransitionError> {
        self.event(
            EventKind::StepFailed,
            Some((p.step, p.kind, p.attempt)),
            Some(error.clone()),
        );
        // A timeout or an `in_progress` answer leaves the outcome unknown; a retryable
        // answer says that attempt applied nothing (earlier doubt stays); a permanent
        // failure is the key's final answer (a fenced participant never applies that key
        // afterwards).
        let in_doubt = p.kind == CommandKind::Action
            && match failure {
                Failure::Unknown => true,
                Failure::Retryable => p.in_doubt,
                Failure::Permanent => false,
            };
        if let Some(cancel) = self.state.cancel.clone() {
            // A cancel waited for this action's outcome: no further attempt.
            return self.start_compensation(cancel, in_doubt.then_some(p.step));
        }
        let delay = if failure == Failure::Permanent {
            None
        } else {
            self.policy(&p).next_delay(p.attempts_used(), jitter)
        };
        if let Some(delay) = delay {
            let due = self.now.plus(delay);
            self.state.pending = Some(Pending {
                phase: Phase::Backoff { due },
                in_doubt,
                ..p
            });
            self.event(
                EventKind::RetryScheduled,
                Some((p.step, p.kind, p.attempt.saturating_add(1))),
                None,
            );
            return Ok(());
        }
        match p.kind {
            CommandKind::Action => self.start_compensation(error, in_doubt.then_some(p.step)),
            CommandKind::Compensation => {
                self.dead_letter(p, error);
                Ok(())
            }
        }
    }

    fn on_retry_due(&mut self, p: Pending) -> Result<(), TransitionError> {
        // (`check_state` refused an attempt in flight with no successor.)
        self.send(
            p.step,
            p.kind,
            p.attempt.saturating_add(1),
            p.first_attempt,
            p.in_doubt,
        )
    }

    /// Begins compensating: every completed step with a compensation, and `in_doubt`
    /// (the pending action, whose outcome is unknown) too. An in-doubt step with no
    /// compensation cannot be undone: the saga is dead-lettered at that action instead of
    /// ending `compensated` around an effect that may exist.
    fn start_compensation(
        &mut self,
        reason: StepError,
        in_doubt: Option<usize>,
    ) -> Result<(), TransitionError> {
        self.state.failure = Some(reason.clone());
        if let Some(step) = in_doubt {
            if self.step_def(step).compensation().is_none() {
                let p = self
                    .state
                    .pending
                    .ok_or_else(|| self.not_allowed("compensate"))?;
                // (A cancel that waited stays recorded: when the action's outcome comes,
                // late or after a re-drive, the saga compensates around it.)
                let error = StepError::new(
                    IN_DOUBT_WITHOUT_COMPENSATION,
                    format!(
                        "step {:?} may have taken effect (its outcome is unknown: {}) and has \
                         no compensation; find out from its participant, then re-drive (the \
                         action is sent again with the same idempotency key)",
                        self.step_def(step).name().as_str(),
                        reason
                    ),
                );
                self.dead_letter(
                    Pending {
                        in_doubt: true,
                        ..p
                    },
                    error,
                );
                return Ok(());
            }
            self.state.in_doubt = Some(step);
        }
        self.state.cancel = None;
        self.state.status = SagaStatus::Compensating;
        self.event(EventKind::Compensating, None, Some(reason));
        self.compensate_below(self.state.compensation_bound())
    }

    /// Compensates the highest step below `below` that may have taken effect and has a
    /// compensation, or finishes as `Compensated` when none is left.
    fn compensate_below(&mut self, below: usize) -> Result<(), TransitionError> {
        let next = (0..below.min(self.state.compensation_bound()))
            .rev()
            .find(|&i| self.step_def(i).compensation().is_some());
        match next {
            Some(i) => self.send(i, CommandKind::Compensation, 1, 1, false),
            None => {
                self.finish(SagaStatus::Compensated);
                Ok(())
            }
        }
    }

    fn dead_letter(&mut self, p: Pending, error: StepError) {
        let info = DeadLetterInfo {
            step: p.step,
            step_name: self.step_def(p.step).name().clone(),
            kind: p.kind,
            error: error.clone(),
            attempts: p.attempts_used(),
            last_attempt: p.attempt,
            in_doubt: p.in_doubt && p.kind == CommandKind::Action,
        };
        self.state.status = SagaStatus::Failed;
        self.state.pending = None;
        self.state.dead_letter = Some(info.clone());
        self.event(
            EventKind::DeadLettered,
            Some((p.step, p.kind, p.attempt)),
            Some(error),
        );
        self.effects.push(Effect::DeadLetter(info));
    }

    fn finish(&mut self, status: SagaStatus) {
        self.state.status = status;
        self.state.pending = None;
        self.state.cancel = None;
        let event = match status {
            SagaStatus::Completed => EventKind::Completed,
            _ => EventKind::Compensated,
        };
        self.event(event, None, None);
        self.effects.push(Effect::Finished { status });
    }

    fn on_cancel(&mut self, reason: &str) -> Result<(), TransitionError> {
        let error = StepError::new("cancelled", reason);
        match (self.state.status, self.state.pending) {
            (SagaStatus::Created, _) => {
                self.event(EventKind::Cancelled, None, Some(error.clone()));
                self.start_compensation(error, None)
            }
            (SagaStatus::Running, Some(p)) => {
                if self.state.cancel.is_some() {
                    return Err(TransitionError::CancelPending {
                        step: self.step_def(p.step).name().clone(),
                        kind: p.kind,
                    });
                }
                self.event(EventKind::Cancelled, None, Some(error.clone()));
                match p.phase {
                    // The action is in flight: it may be taking effect right now. Wait
                    // for its answer or its deadline, then compensate (it included, when
                    // it may have happened).
                    Phase::AwaitingReply { .. } => {
                        self.state.cancel = Some(error);
                        Ok(())
                    }
                    Phase::Backoff { .. } => {
                        // Recorded, so that if the step in doubt has nothing to undo it
                        // and dead-letters, its late outcome still leads to compensation.
                        self.state.cancel = Some(error.clone());
                        self.start_compensation(error, p.in_doubt.then_some(p.step))
                    }
                }
            }
            _ => Err(self.not_allowed("cancel_requested")),
        }
    }

    fn on_data_unreadable(&mut self, error: &StepError) -> Result<(), TransitionError> {
        let Some(p) = self.state.pending else {
            return Err(self.not_allowed("data_unreadable"));
        };
        self.dead_letter(p, error.clone());
        Ok(())
    }

    fn on_redriven(&mut self) -> Result<(), TransitionError> {
        if self.state.status != SagaStatus::Failed {
            return Err(self.not_allowed("redriven"));
        }
        let Some(dl) = self.state.dead_letter.clone() else {
            return Err(self.not_allowed("redriven"));
        };
        // A dead-lettered action (its data was unreadable, its output undecodable or its
        // outcome unknown with nothing to undo it) runs forward again; a dead-lettered
        // compensation goes on compensating.
        self.state.status = match dl.kind {
            CommandKind::Action => {
                self.state.failure = None;
                self.state.in_doubt = None;
                SagaStatus::Running
            }
            CommandKind::Compensation => SagaStatus::Compensating,
        };
        self.state.redrives = self.state.redrives.saturating_add(1);
        // (`check_state` refused a `last_attempt` with no successor.)
        let first = dl.last_attempt.saturating_add(1);
        self.event(EventKind::Redriven, Some((dl.step, dl.kind, first)), None);
        self.send(dl.step, dl.kind, first, first, dl.in_doubt)?;
        self.state.dead_letter = None;
        Ok(())
    }

    fn on_resumed(&mut self) -> Result<(), TransitionError> {
        let Some(p) = self.state.pending else {
            return Err(self.not_allowed("resumed"));
        };
        match p.phase {
            Phase::AwaitingReply { .. } => {
                self.send(p.step, p.kind, p.attempt, p.first_attempt, p.in_doubt)
            }
            // Nothing to send: the wake-up at the backoff's end is the state's.
            Phase::Backoff { .. } => Ok(()),
        }
    }
}

/// What an input answers, for [`Machine::check_target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaits {
    /// A success: any attempt sent of the pending step and kind, in either phase.
    Success,
    /// A failure: the attempt in flight, awaiting its reply.
    Reply,
    /// A reply deadline: the attempt in flight, awaiting its reply.
    Deadline,
    /// The end of a backoff.
    BackoffEnd,
}

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The participant says it will never succeed: final for the key.
    Permanent,
    /// The participant says this attempt applied nothing and another may succeed.
    Retryable,
    /// No definite answer: the deadline passed, or another delivery of the key is being
    /// handled right now (`in_progress`). The outcome is unknown.
    Unknown,
}

fn input_is_reply(input: &Input) -> bool {
    matches!(
        input,
        Input::StepSucceeded { .. } | Input::StepFailed { .. }
    )
}

#[cfg(test)]
mod tests;
