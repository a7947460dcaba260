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
//!   compensations of exactly the completed steps that have one, in reverse order;
//! - a compensation that fails permanently or spends its retries dead-letters the saga
//!   (`Failed`), to be re-driven by an operator (`Redriven` resumes that compensation
//!   with a fresh attempt budget);
//! - terminal sagas accept no input; duplicate and stale replies change nothing (the
//!   error says which, so the shell records it and acknowledges the message).
//!
//! This module must not import actix, tokio, sqlx or async-nats.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{DataError, Definition, StepDefinition};
use crate::ids::{CommandKind, SagaId, SagaType, StepName};
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
}

impl Pending {
    /// Attempts made in the current retry budget, the one in flight included.
    pub fn attempts_used(&self) -> u32 {
        self.attempt - self.first_attempt + 1
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
    /// How many times an operator re-drove it.
    pub redrives: u32,
    /// When it was created.
    pub created_at: Timestamp,
    /// When the last transition was applied.
    pub updated_at: Timestamp,
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
            redrives: 0,
            created_at: now,
            updated_at: now,
        }
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
    /// Wake the saga at `at` (a reply deadline or the end of a backoff).
    ScheduleWakeup {
        /// When.
        at: Timestamp,
    },
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
    /// The reply's output or the saga data could not be (de)serialized.
    #[error("data error: {0}")]
    Data(#[from] DataError),
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
        )
    }

    /// Inputs that can never apply (unknown step, undecodable output): poison messages
    /// to dead-letter with the reason.
    pub fn is_poison(&self) -> bool {
        matches!(
            self,
            TransitionError::UnknownStep { .. } | TransitionError::Data(_)
        )
    }
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
                self.on_failed(p, *retryable, error.clone(), *jitter)
            }
            Input::TimedOut { jitter, .. } => {
                let p = self.expect_timer(input, false)?;
                let error = StepError::new(
                    "timeout",
                    format!("no reply within {:?}", self.step_def(p.step).timeout()),
                );
                self.on_failed(p, true, error, *jitter)
            }
            Input::RetryDue { .. } => {
                let p = self.expect_timer(input, true)?;
                self.on_retry_due(p)
            }
            Input::CancelRequested { reason } => self.on_cancel(reason),
            Input::Redriven => self.on_redriven(),
            Input::Resumed => self.on_resumed(),
            Input::DataUnreadable { error } => self.on_data_unreadable(error),
        }
    }

    fn step_def(&self, index: usize) -> &StepDefinition {
        // `pending.step` and `completed` only ever hold indexes of this definition.
        &self.def.steps()[index]
    }

    fn not_allowed(&self, input: &'static str) -> TransitionError {
        TransitionError::NotAllowed {
            input,
            status: self.state.status,
        }
    }

    /// Resolves the step a reply or timer names and checks that it is the pending one.
    fn check_target(
        &self,
        input: &Input,
        want_backoff: Option<bool>,
    ) -> Result<Pending, TransitionError> {
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
            // Failed: nothing is pending; a reply now is a leftover.
            return Err(stale("nothing (the saga waits for an operator)".into()));
        };
        // Already-finished work: forward steps before `completed`, compensations after
        // the one pending (they run in reverse).
        let done = match kind {
            CommandKind::Action => index < self.state.completed,
            CommandKind::Compensation => {
                self.state.status == SagaStatus::Compensating
                    && index > p.step
                    && index < self.state.completed
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
        if attempt != p.attempt {
            return Err(stale(expected()));
        }
        let in_backoff = matches!(p.phase, Phase::Backoff { .. });
        match want_backoff {
            Some(want) if want != in_backoff => Err(stale(expected())),
            None if in_backoff => Err(stale(expected())),
            // A timer that fires early (a clock step, a skewed node) is not yet due.
            Some(_) if self.state.wake_at().is_some_and(|at| at > self.now) => Err(stale(format!(
                "{} (not due before {})",
                expected(),
                self.state.wake_at().unwrap_or_default()
            ))),
            _ => Ok(p),
        }
    }

    fn expect_reply(&self, input: &Input) -> Result<Pending, TransitionError> {
        self.check_target(input, None)
    }

    fn expect_timer(&self, input: &Input, backoff: bool) -> Result<Pending, TransitionError> {
        self.check_target(input, Some(backoff))
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

    /// Sends attempt `attempt` of (`step`, `kind`) and waits for its reply.
    fn send(
        &mut self,
        step: usize,
        kind: CommandKind,
        attempt: u32,
        first_attempt: u32,
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
        let command = Command {
            saga_id: self.state.id,
            saga_type: self.state.saga_type.clone(),
            idempotency_key: format!("{}:{}:{}", self.state.id, name, kind),
            message_id: format!("{}:{}:{}:{}", self.state.id, name, kind, attempt),
            step: name,
            kind,
            attempt,
            subject: template.subject().to_owned(),
            payload,
            deadline,
            schema_version: def.schema_version(),
            definition_version: self.state.definition_version,
        };
        self.state.pending = Some(Pending {
            step,
            kind,
            attempt,
            first_attempt,
            phase: Phase::AwaitingReply { deadline },
        });
        self.effects.push(Effect::SendCommand(command));
        self.effects.push(Effect::ScheduleWakeup { at: deadline });
        Ok(())
    }

    fn on_started(&mut self) -> Result<(), TransitionError> {
        if self.state.status != SagaStatus::Created {
            return Err(self.not_allowed("started"));
        }
        self.state.status = SagaStatus::Running;
        self.event(EventKind::Started, None, None);
        self.send(0, CommandKind::Action, 1, 1)
    }

    fn on_succeeded(&mut self, p: Pending, output: &Value) -> Result<(), TransitionError> {
        match p.kind {
            CommandKind::Action => {
                if let Some(data) = self
                    .step_def(p.step)
                    .apply_output(&self.state.data, output)?
                {
                    self.state.data = data;
                }
                self.state.completed = p.step + 1;
                self.event(
                    EventKind::StepSucceeded,
                    Some((p.step, p.kind, p.attempt)),
                    None,
                );
                if self.state.completed == self.def.steps().len() {
                    self.finish(SagaStatus::Completed);
                    Ok(())
                } else {
                    self.send(p.step + 1, CommandKind::Action, 1, 1)
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
        retryable: bool,
        error: StepError,
        jitter: Jitter,
    ) -> Result<(), TransitionError> {
        self.event(
            EventKind::StepFailed,
            Some((p.step, p.kind, p.attempt)),
            Some(error.clone()),
        );
        let delay = if retryable {
            self.policy(&p).next_delay(p.attempts_used(), jitter)
        } else {
            None
        };
        if let Some(delay) = delay {
            let due = self.now.plus(delay);
            self.state.pending = Some(Pending {
                phase: Phase::Backoff { due },
                ..p
            });
            self.event(
                EventKind::RetryScheduled,
                Some((p.step, p.kind, p.attempt + 1)),
                None,
            );
            self.effects.push(Effect::ScheduleWakeup { at: due });
            return Ok(());
        }
        match p.kind {
            CommandKind::Action => self.start_compensation(error),
            CommandKind::Compensation => {
                self.dead_letter(p, error);
                Ok(())
            }
        }
    }

    fn on_retry_due(&mut self, p: Pending) -> Result<(), TransitionError> {
        self.send(p.step, p.kind, p.attempt + 1, p.first_attempt)
    }

    fn start_compensation(&mut self, reason: StepError) -> Result<(), TransitionError> {
        self.state.status = SagaStatus::Compensating;
        self.state.failure = Some(reason.clone());
        self.event(EventKind::Compensating, None, Some(reason));
        self.compensate_below(self.state.completed)
    }

    /// Compensates the highest completed step below `below` that has a compensation, or
    /// finishes as `Compensated` when none is left.
    fn compensate_below(&mut self, below: usize) -> Result<(), TransitionError> {
        let next = (0..below.min(self.state.completed))
            .rev()
            .find(|&i| self.step_def(i).compensation().is_some());
        match next {
            Some(i) => self.send(i, CommandKind::Compensation, 1, 1),
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
        let event = match status {
            SagaStatus::Completed => EventKind::Completed,
            _ => EventKind::Compensated,
        };
        self.event(event, None, None);
        self.effects.push(Effect::Finished { status });
    }

    fn on_cancel(&mut self, reason: &str) -> Result<(), TransitionError> {
        let error = StepError::new("cancelled", reason);
        match self.state.status {
            SagaStatus::Created | SagaStatus::Running => {
                self.event(EventKind::Cancelled, None, Some(error.clone()));
                self.start_compensation(error)
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
        // A dead-lettered action (its data was unreadable) runs forward again; a
        // dead-lettered compensation goes on compensating.
        self.state.status = match dl.kind {
            CommandKind::Action => SagaStatus::Running,
            CommandKind::Compensation => SagaStatus::Compensating,
        };
        self.state.redrives += 1;
        self.event(
            EventKind::Redriven,
            Some((dl.step, dl.kind, dl.last_attempt + 1)),
            None,
        );
        let first = dl.last_attempt + 1;
        self.send(dl.step, dl.kind, first, first)?;
        self.state.dead_letter = None;
        Ok(())
    }

    fn on_resumed(&mut self) -> Result<(), TransitionError> {
        let Some(p) = self.state.pending else {
            return Err(self.not_allowed("resumed"));
        };
        match p.phase {
            Phase::AwaitingReply { .. } => self.send(p.step, p.kind, p.attempt, p.first_attempt),
            Phase::Backoff { due } => {
                self.effects.push(Effect::ScheduleWakeup { at: due });
                Ok(())
            }
        }
    }
}

fn input_is_reply(input: &Input) -> bool {
    matches!(
        input,
        Input::StepSucceeded { .. } | Input::StepFailed { .. }
    )
}

#[cfg(test)]
mod tests;
