//! The TCC fence: what makes a participant apply each action at most once, answer every
//! delivery of a key the same way, and refuse an action whose compensation came first.
//!
//! Commands are delivered at least once: a step's attempts, the broker's redeliveries and
//! two replicas of one participant may all see the same idempotency key, at once or one
//! after another, and a compensation may overtake the action it undoes (the action timed
//! out at skald while its command still sat in the broker). A cache read before the
//! handler and written after it cannot cope: two concurrent deliveries both run the
//! handler, and a late action runs after its compensation and is never undone. The fence
//! is a durable record per *action key* (the idempotency key of the action; a
//! compensation names it in `Skald-Action-Key`) changed only by atomic operations:
//!
//! 1. An action delivery **claims** the key before the handler runs
//!    ([`Fence::claim_action`]). A key a compensation came first for (a tombstone), or
//!    that was compensated, is refused: a permanent `compensated` failure
//!    ("anti-suspension"). A key with a final outcome (success or permanent failure) is
//!    answered with that outcome and the handler does not run ("every delivery gets the
//!    same answer"). A key another delivery holds a live claim on is answered
//!    `retryable` (`in_progress`). An attempt number already answered `retryable` (by
//!    the handler or by the fence) gets that same answer again and never starts the work
//!    (skald may have acted on the answer); a later attempt runs.
//! 2. After the handler ([`Fence::finish_action`]): a success or a permanent failure is
//!    recorded (final; the first recorded wins); a `retryable` answer releases the claim
//!    and is remembered for its attempt number (`retried_through`).
//! 3. A compensation delivery claims the compensation part of the action key's record
//!    ([`Fence::claim_compensation`]). A finished compensation is answered its success
//!    again. While the action runs (a live claim), the compensation is answered
//!    `retryable` (`action_in_progress`); while another compensation delivery runs,
//!    `in_progress`; those answers, and the handler's `retryable` ones, are remembered
//!    per compensation attempt like an action's. When the action succeeded the
//!    compensation handler runs, with the action's recorded output (see
//!    [`super::action_output`]), and its success is recorded (final); a failure releases
//!    the claim so a later attempt retries. When the action is unknown, was only ever
//!    answered `retryable`, or failed permanently, there is nothing to undo: the fence
//!    records a **tombstone** and answers success without running the handler ("empty
//!    rollback"), and a later delivery of the action is refused (rule 1).
//! 4. A claim carries a lease ([`DEFAULT_LEASE`], configurable): the claim of a holder
//!    that crashed is taken over by the next delivery once the lease has passed. A
//!    compensation that finds an action claim past its lease treats the action as
//!    possibly applied: its handler runs without an action output (it undoes by action
//!    key), and the action is refused from then on.
//! 5. A fence that cannot be reached never loses anything: the participant helper does
//!    not acknowledge the command, and the broker redelivers it.
//!
//! The participant helper adds the deadline rule of docs/protocol.md on top: a delivery
//! the fence lets run whose `Skald-Deadline` has passed is not started; its claim is
//! finished at once with a `retryable` `deadline_passed` (released, and remembered for
//! the attempt).
//!
//! The rules themselves live in one place, [`FenceRecord`]'s methods, pure and
//! synchronous; [`MemoryFence`] and the SQL fences of `skald-adapters` read the record
//! under a lock (a mutex, `BEGIN IMMEDIATE`, a row lock), apply the rule and write it
//! back in the same critical section, so two replicas racing on one key see exactly one
//! [`ActionClaim::Run`]. [`conformance`] checks a fence against every rule.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tracing::warn;

use crate::machine::{StepError, Timestamp};
use crate::ports::{Clock, StoreError, SystemClock};
use crate::wire::Outcome;

/// How long a claim holds before another delivery may take it over (30 s). Make the
/// lease of a fence longer than its handlers ever run: a holder still running past it
/// may apply its effect a second time alongside the delivery that took over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The code of the refusal of an action whose compensation came first (rule 1).
pub const REFUSED_CODE: &str = "compensated";
/// The message of the refusal of an action whose compensation came first (rule 1).
pub const REFUSED_MESSAGE: &str = "a compensation for this key came first; the action is refused";
/// The code of the `retryable` answer to a delivery that finds another one running
/// (an action finding its key claimed, a compensation finding its compensation claimed).
pub const IN_PROGRESS_CODE: &str = "in_progress";
/// The code of the `retryable` answer to a compensation whose action is running now.
pub const ACTION_IN_PROGRESS_CODE: &str = "action_in_progress";

/// What an action delivery should do, as decided by [`Fence::claim_action`].
#[derive(Debug, Clone, PartialEq)]
pub enum ActionClaim {
    /// The delivery holds the claim: run the handler, then [`Fence::finish_action`].
    Run,
    /// Reply this without running the handler (a recorded outcome, a refusal, another
    /// delivery running, or the remembered `retryable` answer of this attempt).
    Answer(Outcome),
}

/// What a compensation delivery should do, as decided by [`Fence::claim_compensation`].
#[derive(Debug, Clone, PartialEq)]
pub enum CompensationClaim {
    /// The delivery holds the compensation claim: run the compensation handler, then
    /// [`Fence::finish_compensation`].
    Undo {
        /// The action's recorded success output; `None` when the action's outcome is
        /// unknown (its claim's lease passed while it was running): undo by action key.
        action_output: Option<Value>,
    },
    /// Reply this without running the handler (an empty rollback's success, a recorded
    /// compensation, or a `retryable` answer while something runs).
    Answer(Outcome),
}

/// Why a fence operation failed. Nothing was decided: the command must be redelivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// The fence's store cannot be reached or is busy; try again later.
    #[error("fence unavailable: {0}")]
    Unavailable(String),
    /// A stored record cannot be decoded by this build.
    #[error("fence record is corrupt or of an unknown shape: {0}")]
    Corrupt(String),
    /// The fence's table is missing or has another shape, or the user may not use it.
    #[error("fence schema error: {0}")]
    Schema(String),
    /// Any other error.
    #[error("fence error: {0}")]
    Other(String),
}

impl FenceError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, FenceError::Unavailable(_))
    }
}

impl From<StoreError> for FenceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => FenceError::Unavailable(m),
            StoreError::Corrupt(m) => FenceError::Corrupt(m),
            StoreError::Schema(m) => FenceError::Schema(m),
            other => FenceError::Other(other.to_string()),
        }
    }
}

/// The durable, atomic record of what happened to each action key. See the module
/// documentation for the rules; [`FenceRecord`] implements them, an implementation
/// stores records and applies each operation atomically (read, decide, write back with
/// no other operation on the key in between).
#[async_trait]
pub trait Fence: Send + Sync + 'static {
    /// Claims `key` for action attempt `attempt` (rule 1).
    async fn claim_action(&self, key: &str, attempt: u32) -> Result<ActionClaim, FenceError>;

    /// Records the handler's `outcome` of action attempt `attempt` (rule 2). Returns what
    /// to reply: `outcome`, or the final outcome another delivery recorded first, or the
    /// refusal when a compensation took the key over meanwhile.
    async fn finish_action(
        &self,
        key: &str,
        attempt: u32,
        outcome: &Outcome,
    ) -> Result<Outcome, FenceError>;

    /// Claims the compensation of the action `action_key` for compensation attempt
    /// `attempt` (rule 3).
    async fn claim_compensation(
        &self,
        action_key: &str,
        attempt: u32,
    ) -> Result<CompensationClaim, FenceError>;

    /// Records the compensation handler's `outcome` for compensation attempt `attempt`
    /// (rule 3). Returns what to reply: `outcome`, or the success another delivery
    /// recorded first.
    async fn finish_compensation(
        &self,
        action_key: &str,
        attempt: u32,
        outcome: &Outcome,
    ) -> Result<Outcome, FenceError>;

    /// The record of `key`, if any (inspection and tests).
    async fn record(&self, key: &str) -> Result<Option<FenceRecord>, FenceError>;
}

/// The action part of a [`FenceRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActionState {
    /// Nobody holds a claim: never claimed, or released after a `retryable` answer.
    #[default]
    Idle,
    /// A delivery holds the claim (since [`FenceRecord::action_claimed_at`]).
    Running,
    /// The action succeeded (final); its output is recorded.
    Succeeded,
    /// The action failed permanently (final); its error is recorded.
    Failed,
}

impl ActionState {
    /// The stored name: `idle`, `running`, `succeeded`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionState::Idle => "idle",
            ActionState::Running => "running",
            ActionState::Succeeded => "succeeded",
            ActionState::Failed => "failed",
        }
    }
}

impl FromStr for ActionState {
    type Err = FenceError;

    fn from_str(s: &str) -> Result<Self, FenceError> {
        Ok(match s {
            "idle" => ActionState::Idle,
            "running" => ActionState::Running,
            "succeeded" => ActionState::Succeeded,
            "failed" => ActionState::Failed,
            other => {
                return Err(FenceError::Corrupt(format!(
                    "unknown action state {other:?}"
                )));
            }
        })
    }
}

impl fmt::Display for ActionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The compensation part of a [`FenceRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompensationState {
    /// No compensation arrived, or its claim was released after a failure.
    #[default]
    None,
    /// A compensation delivery holds the claim (since
    /// [`FenceRecord::comp_claimed_at`]); the action is refused meanwhile.
    Running,
    /// The compensation handler succeeded (final); its output is recorded.
    Compensated,
    /// A compensation came when there was nothing to undo and was answered success
    /// without running its handler (final); the action is refused from then on.
    Tombstone,
}

impl CompensationState {
    /// The stored name: `none`, `running`, `compensated`, `tombstone`.
    pub fn as_str(self) -> &'static str {
        match self {
            CompensationState::None => "none",
            CompensationState::Running => "running",
            CompensationState::Compensated => "compensated",
            CompensationState::Tombstone => "tombstone",
        }
    }

    /// Whether the compensation is over (compensated or tombstone).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CompensationState::Compensated | CompensationState::Tombstone
        )
    }
}

impl FromStr for CompensationState {
    type Err = FenceError;

    fn from_str(s: &str) -> Result<Self, FenceError> {
        Ok(match s {
            "none" => CompensationState::None,
            "running" => CompensationState::Running,
            "compensated" => CompensationState::Compensated,
            "tombstone" => CompensationState::Tombstone,
            other => {
                return Err(FenceError::Corrupt(format!(
                    "unknown compensation state {other:?}"
                )));
            }
        })
    }
}

impl fmt::Display for CompensationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fence's record of one action key, and the rules as pure functions of it: each
/// operation changes the record in place and says what to do or answer. A fence holds
/// the key's lock around one call (read, call, write back if changed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FenceRecord {
    /// The action part.
    pub action_state: ActionState,
    /// The attempt number of the delivery that last claimed the action.
    pub action_attempt: u32,
    /// The action's success output ([`ActionState::Succeeded`]).
    pub action_output: Option<Value>,
    /// The action's permanent error ([`ActionState::Failed`]), or else its latest
    /// `retryable` error (the one answered again to a repeated attempt).
    pub action_error: Option<StepError>,
    /// The highest attempt number answered `retryable` by the handler (0: none).
    pub retried_through: u32,
    /// When the action was last claimed.
    pub action_claimed_at: Timestamp,
    /// The compensation part.
    pub comp_state: CompensationState,
    /// The compensation's success output ([`CompensationState::Compensated`]).
    pub comp_output: Option<Value>,
    /// When the compensation was last claimed.
    pub comp_claimed_at: Timestamp,
    /// The highest compensation attempt number answered `retryable` (0: none).
    pub comp_retried_through: u32,
    /// The compensation's latest `retryable` error (answered again to a repeated
    /// attempt).
    pub comp_error: Option<StepError>,
}

fn live(claimed_at: Timestamp, now: Timestamp, lease: Duration) -> bool {
    now < claimed_at.plus(lease)
}

/// The refusal of an action whose compensation came first (rule 1).
pub fn refused() -> Outcome {
    Outcome::Failure(StepError::new(REFUSED_CODE, REFUSED_MESSAGE))
}

fn in_progress() -> StepError {
    StepError::new(
        IN_PROGRESS_CODE,
        "another delivery of this key is being handled now; try again later",
    )
}

fn action_in_progress() -> StepError {
    StepError::new(
        ACTION_IN_PROGRESS_CODE,
        "the action this compensation undoes is being handled now; try again later",
    )
}

impl FenceRecord {
    /// The recorded final outcome of the action, if it has one.
    pub fn action_outcome(&self) -> Option<Outcome> {
        match self.action_state {
            ActionState::Succeeded => Some(Outcome::Success(
                self.action_output.clone().unwrap_or(Value::Null),
            )),
            ActionState::Failed => {
                Some(Outcome::Failure(self.action_error.clone().unwrap_or_else(
                    || StepError::new("failed", "the action failed permanently"),
                )))
            }
            ActionState::Idle | ActionState::Running => None,
        }
    }

    /// Rule 1: an action delivery of attempt `attempt` at `now`.
    pub fn claim_action(&mut self, attempt: u32, now: Timestamp, lease: Duration) -> ActionClaim {
        if self.comp_state.is_final() {
            return ActionClaim::Answer(refused());
        }
        if let Some(outcome) = self.action_outcome() {
            return ActionClaim::Answer(outcome);
        }
        // A compensation is undoing this key (it took over an expired action claim):
        // running the action now would apply it after (part of) the undo.
        if self.comp_state == CompensationState::Running {
            return ActionClaim::Answer(refused());
        }
        // Another delivery holds the key: its outcome is not known yet. Not remembered
        // for this attempt (that delivery may still succeed); the helper answers nothing
        // and has the command redelivered later.
        if self.action_state == ActionState::Running && live(self.action_claimed_at, now, lease) {
            return ActionClaim::Answer(Outcome::Retryable(in_progress()));
        }
        if attempt <= self.retried_through {
            return ActionClaim::Answer(Outcome::Retryable(
                self.action_error
                    .clone()
                    .unwrap_or_else(|| answered_retryable(attempt)),
            ));
        }
        self.action_state = ActionState::Running;
        self.action_attempt = attempt;
        self.action_claimed_at = now;
        ActionClaim::Run
    }

    /// Remembers that action attempt `attempt` was answered `error` (a `retryable`), so
    /// another delivery of it gets the same answer and never starts the work.
    fn retried_action(&mut self, attempt: u32, error: StepError) -> Outcome {
        if attempt >= self.retried_through {
            self.action_error = Some(error.clone());
        }
        self.retried_through = self.retried_through.max(attempt);
        Outcome::Retryable(error)
    }

    /// Likewise for compensation attempt `attempt`.
    fn retried_compensation(&mut self, attempt: u32, error: StepError) -> Outcome {
        if attempt >= self.comp_retried_through {
            self.comp_error = Some(error.clone());
        }
        self.comp_retried_through = self.comp_retried_through.max(attempt);
        Outcome::Retryable(error)
    }

    /// Rule 2: the handler of action attempt `attempt` answered `outcome`. Returns what
    /// to reply.
    pub fn finish_action(&mut self, attempt: u32, outcome: &Outcome) -> Outcome {
        let fenced_off = self.comp_state != CompensationState::None;
        if let Some(first) = self.action_outcome() {
            // Another delivery (one that took over this one's claim) finished first:
            // every delivery gets the same answer.
            return if fenced_off { refused() } else { first };
        }
        match outcome {
            Outcome::Success(output) => {
                self.action_state = ActionState::Succeeded;
                self.action_output = Some(output.clone());
                self.action_error = None;
            }
            Outcome::Failure(e) => {
                self.action_state = ActionState::Failed;
                self.action_output = None;
                self.action_error = Some(e.clone());
            }
            Outcome::Retryable(e) => {
                self.retried_action(attempt, e.clone());
                // Release only this attempt's own claim, not that of a delivery that took
                // it over after the lease.
                if self.action_state == ActionState::Running && self.action_attempt == attempt {
                    self.action_state = ActionState::Idle;
                }
            }
        }
        if fenced_off {
            // A compensation took over this action's expired claim while the handler
            // ran: what the handler did is recorded (a compensation retried later sees
            // it), but the action stays refused.
            if matches!(outcome, Outcome::Success(_)) {
                warn!(
                    "an action finished after a compensation took over its expired claim; \
                     its effect may be left applied: make the fence's lease longer than \
                     the handler runs"
                );
            }
            return refused();
        }
        outcome.clone()
    }

    /// Rule 3: a delivery of compensation attempt `attempt` at `now`.
    pub fn claim_compensation(
        &mut self,
        attempt: u32,
        now: Timestamp,
        lease: Duration,
    ) -> CompensationClaim {
        match self.comp_state {
            CompensationState::Compensated | CompensationState::Tombstone => {
                return CompensationClaim::Answer(Outcome::Success(
                    self.comp_output.clone().unwrap_or(Value::Null),
                ));
            }
            CompensationState::Running if live(self.comp_claimed_at, now, lease) => {
                return CompensationClaim::Answer(Outcome::Retryable(in_progress()));
            }
            CompensationState::Running | CompensationState::None => {}
        }
        if self.action_state == ActionState::Running && live(self.action_claimed_at, now, lease) {
            return CompensationClaim::Answer(Outcome::Retryable(action_in_progress()));
        }
        if attempt <= self.comp_retried_through {
            return CompensationClaim::Answer(Outcome::Retryable(
                self.comp_error
                    .clone()
                    .unwrap_or_else(|| answered_retryable(attempt)),
            ));
        }
        let action_output = match self.action_state {
            // Rule 4: the holder crashed, or runs past its lease: the action may have
            // been applied; undo it by key.
            ActionState::Running => None,
            ActionState::Succeeded => self.action_output.clone(),
            // A handler ran and answered `retryable`: it promised it applied nothing,
            // but an ambiguous failure (a commit whose answer was lost) can break that
            // promise. Undoing by key costs nothing when nothing is there.
            ActionState::Idle if self.action_attempt > 0 => None,
            ActionState::Idle | ActionState::Failed => {
                // Nothing was applied: an empty rollback, and a tombstone that refuses
                // the action if it ever comes.
                self.comp_state = CompensationState::Tombstone;
                self.comp_output = None;
                self.comp_claimed_at = now;
                return CompensationClaim::Answer(Outcome::Success(Value::Null));
            }
        };
        self.comp_state = CompensationState::Running;
        self.comp_claimed_at = now;
        CompensationClaim::Undo { action_output }
    }

    /// Rule 3: the handler of compensation attempt `attempt` answered `outcome`. Returns
    /// what to reply.
    pub fn finish_compensation(&mut self, attempt: u32, outcome: &Outcome) -> Outcome {
        if self.comp_state.is_final() {
            return Outcome::Success(self.comp_output.clone().unwrap_or(Value::Null));
        }
        match outcome {
            Outcome::Success(output) => {
                self.comp_state = CompensationState::Compensated;
                self.comp_output = Some(output.clone());
                return outcome.clone();
            }
            Outcome::Retryable(e) => {
                self.retried_compensation(attempt, e.clone());
            }
            // Not remembered: skald dead-letters the compensation, and a re-drive sends
            // it again under a new attempt number.
            Outcome::Failure(_) => {}
        }
        if self.comp_state == CompensationState::Running {
            self.comp_state = CompensationState::None;
        }
        outcome.clone()
    }
}

fn answered_retryable(attempt: u32) -> StepError {
    StepError::new(
        "retryable",
        format!("attempt {attempt} was answered retryable"),
    )
}

/// An in-memory [`Fence`]: atomic within one process, lost on restart. For tests and
/// single-replica participants whose effects are themselves in memory; a participant
/// with replicas or a durable effect uses a SQL fence (`skald-adapters`).
pub struct MemoryFence {
    // A std mutex: short critical sections, no await inside.
    records: Mutex<HashMap<String, FenceRecord>>,
    lease: Duration,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for MemoryFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryFence")
            .field("lease", &self.lease)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryFence {
    fn default() -> Self {
        MemoryFence::new()
    }
}

impl MemoryFence {
    /// An empty fence with the [`DEFAULT_LEASE`] and the system clock.
    pub fn new() -> Self {
        MemoryFence {
            records: Mutex::new(HashMap::new()),
            lease: DEFAULT_LEASE,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same fence with claims that hold for `lease`.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The same fence reading the time from `clock` (tests: a `ManualClock`).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Applies `f` to the record of `key` (created empty if missing) under the lock.
    fn with_record<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut FenceRecord) -> T,
    ) -> Result<T, FenceError> {
        let mut records = self
            .records
            .lock()
            .map_err(|e| FenceError::Other(format!("memory fence poisoned: {e}")))?;
        let record = records.entry(key.to_owned()).or_default();
        Ok(f(record))
    }
}

#[async_trait]
impl Fence for MemoryFence {
    async fn claim_action(&self, key: &str, attempt: u32) -> Result<ActionClaim, FenceError> {
        let now = self.clock.now();
        self.with_record(key, |r| r.claim_action(attempt, now, self.lease))
    }

    async fn finish_action(
        &self,
        key: &str,
        attempt: u32,
        outcome: &Outcome,
    ) -> Result<Outcome, FenceError> {
        self.with_record(key, |r| r.finish_action(attempt, outcome))
    }

    async fn claim_compensation(
        &self,
        action_key: &str,
        attempt: u32,
    ) -> Result<CompensationClaim, FenceError> {
        let now = self.clock.now();
        self.with_record(action_key, |r| {
            r.claim_compensation(attempt, now, self.lease)
        })
    }

    async fn finish_compensation(
        &self,
        action_key: &str,
        attempt: u32,
        outcome: &Outcome,
    ) -> Result<Outcome, FenceError> {
        self.with_record(action_key, |r| r.finish_compensation(attempt, outcome))
    }

    async fn record(&self, key: &str) -> Result<Option<FenceRecord>, FenceError> {
        let records = self
            .records
            .lock()
            .map_err(|e| FenceError::Other(format!("memory fence poisoned: {e}")))?;
        Ok(records.get(key).cloned())
    }
}

pub mod conformance {
    //! Checks of a [`Fence`] against every rule, one function per rule, for the fences
    //! of this workspace and for any other implementation. Each check uses keys of its
    //! own (a fresh UUID), so checks may share a store; each returns `Err` with what went
    //! wrong.
    //!
    //! The fence under test must read the time from `clock` and use claims of `lease`.
    //! Checks advance the clock: checks sharing a clock run one after another.

    use std::time::Duration;

    use serde_json::{Value, json};

    use super::{
        ACTION_IN_PROGRESS_CODE, ActionClaim, ActionState, CompensationClaim, CompensationState,
        Fence, IN_PROGRESS_CODE, REFUSED_CODE, REFUSED_MESSAGE,
    };
    use crate::machine::StepError;
    use crate::ports::ManualClock;
    use crate::wire::Outcome;

    /// A fence under test, the clock it reads and its lease.
    #[derive(Clone, Copy)]
    pub struct Subject<'a> {
        /// The fence.
        pub fence: &'a dyn Fence,
        /// The clock the fence reads.
        pub clock: &'a ManualClock,
        /// The fence's lease.
        pub lease: Duration,
    }

    impl std::fmt::Debug for Subject<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Subject")
                .field("clock", &self.clock)
                .field("lease", &self.lease)
                .finish_non_exhaustive()
        }
    }

    type Check = Result<(), String>;

    fn key(what: &str) -> String {
        format!("conformance:{}:{what}:action", uuid::Uuid::now_v7())
    }

    fn ensure(ok: bool, what: impl FnOnce() -> String) -> Check {
        if ok { Ok(()) } else { Err(what()) }
    }

    fn eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Check {
        ensure(got == want, || {
            format!("{what}: got {got:?}, want {want:?}")
        })
    }

    fn code(outcome: &Outcome) -> Option<(&'static str, &str)> {
        match outcome {
            Outcome::Success(_) => None,
            Outcome::Failure(e) => Some(("failure", e.code.as_str())),
            Outcome::Retryable(e) => Some(("retryable", e.code.as_str())),
        }
    }

    fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
        move |e| format!("{what}: {e}")
    }

    async fn run(s: Subject<'_>, key: &str, attempt: u32) -> Check {
        let claim = s
            .fence
            .claim_action(key, attempt)
            .await
            .map_err(e("claim_action"))?;
        eq(
            &format!("claim of attempt {attempt}"),
            claim,
            ActionClaim::Run,
        )
    }

    async fn answer(s: Subject<'_>, key: &str, attempt: u32) -> Result<Outcome, String> {
        match s
            .fence
            .claim_action(key, attempt)
            .await
            .map_err(e("claim_action"))?
        {
            ActionClaim::Answer(o) => Ok(o),
            ActionClaim::Run => Err(format!(
                "attempt {attempt} of {key} was told to run; an answer was expected"
            )),
        }
    }

    async fn comp_answer(s: Subject<'_>, key: &str, attempt: u32) -> Result<Outcome, String> {
        match s
            .fence
            .claim_compensation(key, attempt)
            .await
            .map_err(e("claim_compensation"))?
        {
            CompensationClaim::Answer(o) => Ok(o),
            CompensationClaim::Undo { action_output } => Err(format!(
                "the compensation of {key} was told to undo (output {action_output:?}); an \
                 answer was expected"
            )),
        }
    }

    async fn undo(s: Subject<'_>, key: &str, attempt: u32) -> Result<Option<Value>, String> {
        match s
            .fence
            .claim_compensation(key, attempt)
            .await
            .map_err(e("claim_compensation"))?
        {
            CompensationClaim::Undo { action_output } => Ok(action_output),
            CompensationClaim::Answer(o) => Err(format!(
                "the compensation of {key} was answered {o:?}; it was expected to undo"
            )),
        }
    }

    fn is_refusal(outcome: &Outcome) -> Check {
        match outcome {
            Outcome::Failure(e) if e.code == REFUSED_CODE && e.message == REFUSED_MESSAGE => Ok(()),
            other => Err(format!("expected the `compensated` refusal, got {other:?}")),
        }
    }

    /// Rule 1 and 2: the first delivery runs; a success is final and answered to every
    /// later delivery of any attempt without running the handler.
    pub async fn success_is_answered_to_every_delivery(s: Subject<'_>) -> Check {
        let k = key("success");
        run(s, &k, 1).await?;
        let out = Outcome::Success(json!({"payment_id": "p1"}));
        let answer1 = s
            .fence
            .finish_action(&k, 1, &out)
            .await
            .map_err(e("finish_action"))?;
        eq("the finishing delivery's answer", &answer1, &out)?;
        for attempt in [1, 2, 7] {
            eq(
                &format!("attempt {attempt} after the success"),
                answer(s, &k, attempt).await?,
                out.clone(),
            )?;
        }
        let record = s
            .fence
            .record(&k)
            .await
            .map_err(e("record"))?
            .ok_or("no record after a success")?;
        eq("action state", record.action_state, ActionState::Succeeded)?;
        eq(
            "action output",
            record.action_output,
            Some(json!({"payment_id": "p1"})),
        )
    }

    /// Rule 1 and 2: a permanent failure is final and answered to every later delivery.
    pub async fn failure_is_answered_to_every_delivery(s: Subject<'_>) -> Check {
        let k = key("failure");
        run(s, &k, 1).await?;
        let out = Outcome::Failure(StepError::new("card_declined", "no"));
        s.fence
            .finish_action(&k, 1, &out)
            .await
            .map_err(e("finish_action"))?;
        for attempt in [1, 2] {
            eq(
                &format!("attempt {attempt} after the failure"),
                answer(s, &k, attempt).await?,
                out.clone(),
            )?;
        }
        Ok(())
    }

    /// Rule 1: a delivery finding a live claim is answered `retryable` `in_progress`
    /// (which the helper does not send: it has the command redelivered later). It is
    /// not remembered: the holder's outcome is unknown, and once the claim is released a
    /// delivery of any attempt runs.
    pub async fn a_live_claim_is_in_progress(s: Subject<'_>) -> Check {
        let k = key("busy");
        run(s, &k, 1).await?;
        for attempt in [1, 2] {
            let o = answer(s, &k, attempt).await?;
            eq(
                &format!("attempt {attempt} during the first"),
                code(&o),
                Some(("retryable", IN_PROGRESS_CODE)),
            )?;
        }
        s.clock.advance(s.lease / 2);
        let o = answer(s, &k, 2).await?;
        eq(
            "half-way through the lease",
            code(&o),
            Some(("retryable", IN_PROGRESS_CODE)),
        )?;
        s.fence
            .finish_action(
                &k,
                1,
                &Outcome::Retryable(StepError::new("bank_down", "later")),
            )
            .await
            .map_err(e("finish_action"))?;
        // `in_progress` is not remembered (that delivery's outcome was unknown): attempt
        // 2 runs once the claim is released.
        run(s, &k, 2).await?;
        s.fence
            .finish_action(
                &k,
                2,
                &Outcome::Retryable(StepError::new("bank_down", "still")),
            )
            .await
            .map_err(e("finish_action"))?;
        run(s, &k, 3).await
    }

    /// Rule 1 and 2: a `retryable` answer releases the claim and is answered again to
    /// its attempt (and earlier ones); a later attempt runs.
    pub async fn retryable_is_remembered_per_attempt(s: Subject<'_>) -> Check {
        let k = key("retry");
        run(s, &k, 1).await?;
        let busy = Outcome::Retryable(StepError::new("bank_down", "later"));
        let answered = s
            .fence
            .finish_action(&k, 1, &busy)
            .await
            .map_err(e("finish_action"))?;
        eq("the retryable's own answer", &answered, &busy)?;
        eq("attempt 1 again", answer(s, &k, 1).await?, busy.clone())?;
        run(s, &k, 2).await?;
        let busy2 = Outcome::Retryable(StepError::new("bank_down", "still"));
        s.fence
            .finish_action(&k, 2, &busy2)
            .await
            .map_err(e("finish_action"))?;
        eq("attempt 2 again", answer(s, &k, 2).await?, busy2.clone())?;
        let record = s
            .fence
            .record(&k)
            .await
            .map_err(e("record"))?
            .ok_or("no record")?;
        eq("retried_through", record.retried_through, 2)?;
        eq("action state", record.action_state, ActionState::Idle)?;
        run(s, &k, 3).await?;
        let out = Outcome::Success(json!({"ok": true}));
        s.fence
            .finish_action(&k, 3, &out)
            .await
            .map_err(e("finish_action"))?;
        eq("attempt 2 after the success", answer(s, &k, 2).await?, out)
    }

    /// Rule 3: a compensation of a succeeded action runs with the action's output; its
    /// success is final; the action is refused afterwards.
    pub async fn compensation_undoes_a_success_once(s: Subject<'_>) -> Check {
        let k = key("undo");
        run(s, &k, 1).await?;
        s.fence
            .finish_action(&k, 1, &Outcome::Success(json!({"payment_id": "p9"})))
            .await
            .map_err(e("finish_action"))?;
        eq(
            "the compensation's action output",
            undo(s, &k, 1).await?,
            Some(json!({"payment_id": "p9"})),
        )?;
        let o = comp_answer(s, &k, 2).await?;
        eq(
            "a second compensation during the first",
            code(&o),
            Some(("retryable", IN_PROGRESS_CODE)),
        )?;
        let done = Outcome::Success(json!({"refund_id": "r1"}));
        let answered = s
            .fence
            .finish_compensation(&k, 1, &done)
            .await
            .map_err(e("finish_compensation"))?;
        eq("the compensation's answer", &answered, &done)?;
        for attempt in [1, 2, 3] {
            eq(
                &format!("compensation attempt {attempt} after the compensation"),
                comp_answer(s, &k, attempt).await?,
                done.clone(),
            )?;
        }
        let record = s
            .fence
            .record(&k)
            .await
            .map_err(e("record"))?
            .ok_or("no record")?;
        eq(
            "comp state",
            record.comp_state,
            CompensationState::Compensated,
        )?;
        is_refusal(&answer(s, &k, 5).await?)
    }

    /// Rule 3: a compensation that fails (permanently or not) releases its claim: the
    /// next attempt runs it again, with the action's output. A `retryable` answer is
    /// remembered for its attempt.
    pub async fn a_failed_compensation_is_retried(s: Subject<'_>) -> Check {
        let k = key("undo-retry");
        run(s, &k, 1).await?;
        s.fence
            .finish_action(&k, 1, &Outcome::Success(json!(1)))
            .await
            .map_err(e("finish_action"))?;
        let busy = Outcome::Retryable(StepError::new("bank_down", "later"));
        eq("attempt 1's output", undo(s, &k, 1).await?, Some(json!(1)))?;
        let answered = s
            .fence
            .finish_compensation(&k, 1, &busy)
            .await
            .map_err(e("finish_compensation"))?;
        eq("a retryable compensation's answer", &answered, &busy)?;
        eq(
            "compensation attempt 1 again",
            comp_answer(s, &k, 1).await?,
            busy,
        )?;
        let refused = Outcome::Failure(StepError::new("refund_refused", "no"));
        eq("attempt 2's output", undo(s, &k, 2).await?, Some(json!(1)))?;
        let answered = s
            .fence
            .finish_compensation(&k, 2, &refused)
            .await
            .map_err(e("finish_compensation"))?;
        eq("a failed compensation's answer", answered, refused)?;
        eq("attempt 3's output", undo(s, &k, 3).await?, Some(json!(1)))?;
        s.fence
            .finish_compensation(&k, 3, &Outcome::Success(Value::Null))
            .await
            .map_err(e("finish_compensation"))?;
        eq(
            "after the success",
            comp_answer(s, &k, 4).await?,
            Outcome::Success(Value::Null),
        )
    }

    /// Rule 3 and 1: a compensation of an unknown key leaves a tombstone and succeeds
    /// without running; the action is refused when it comes, on every attempt.
    pub async fn compensation_first_refuses_the_action(s: Subject<'_>) -> Check {
        let k = key("tombstone");
        eq(
            "an empty rollback",
            comp_answer(s, &k, 1).await?,
            Outcome::Success(Value::Null),
        )?;
        eq(
            "the empty rollback again",
            comp_answer(s, &k, 2).await?,
            Outcome::Success(Value::Null),
        )?;
        let record = s
            .fence
            .record(&k)
            .await
            .map_err(e("record"))?
            .ok_or("no record after a tombstone")?;
        eq(
            "comp state",
            record.comp_state,
            CompensationState::Tombstone,
        )?;
        for attempt in [1, 2] {
            is_refusal(&answer(s, &k, attempt).await?)?;
        }
        Ok(())
    }

    /// Rule 3: a compensation of an action only ever answered `retryable`, or failed
    /// permanently, is an empty rollback too.
    pub async fn nothing_applied_is_an_empty_rollback(s: Subject<'_>) -> Check {
        // Never claimed, or failed for good: a tombstone, without the handler.
        let never = key("never");
        eq(
            "compensation of an unknown action",
            comp_answer(s, &never, 1).await?,
            Outcome::Success(Value::Null),
        )?;
        is_refusal(&answer(s, &never, 1).await?)?;
        let k = key("failed");
        run(s, &k, 1).await?;
        s.fence
            .finish_action(
                &k,
                1,
                &Outcome::Failure(StepError::new("card_declined", "no")),
            )
            .await
            .map_err(e("finish_action"))?;
        eq(
            "compensation of a failed action",
            comp_answer(s, &k, 1).await?,
            Outcome::Success(Value::Null),
        )?;
        // A later delivery is refused (anti-suspension): the compensation came.
        is_refusal(&answer(s, &k, 2).await?)?;
        // A handler that ran and answered `retryable` promised it applied nothing, but an
        // ambiguous failure can break that: its compensation undoes by key (no output).
        let k = key("retried");
        run(s, &k, 1).await?;
        s.fence
            .finish_action(
                &k,
                1,
                &Outcome::Retryable(StepError::new("bank_down", "later")),
            )
            .await
            .map_err(e("finish_action"))?;
        eq(
            "compensation of a retried action",
            undo(s, &k, 1).await?,
            None,
        )?;
        s.fence
            .finish_compensation(&k, 1, &Outcome::Success(Value::Null))
            .await
            .map_err(e("finish_compensation"))?;
        is_refusal(&answer(s, &k, 2).await?)?;
        Ok(())
    }

    /// Rule 3: a compensation while the action runs is answered `retryable`
    /// `action_in_progress` (remembered for its attempt), and changes nothing: the
    /// action then finishes normally, and the next compensation attempt undoes it.
    pub async fn compensation_waits_for_a_running_action(s: Subject<'_>) -> Check {
        let k = key("racing");
        run(s, &k, 1).await?;
        let o = comp_answer(s, &k, 1).await?;
        eq(
            "a compensation during the action",
            code(&o),
            Some(("retryable", ACTION_IN_PROGRESS_CODE)),
        )?;
        let out = Outcome::Success(json!({"id": 3}));
        let answered = s
            .fence
            .finish_action(&k, 1, &out)
            .await
            .map_err(e("finish_action"))?;
        eq("the action's answer", &answered, &out)?;
        // (not remembered: the same attempt undoes now that the action is done)
        eq(
            "compensation attempt 1 again",
            undo(s, &k, 1).await?,
            Some(json!({"id": 3})),
        )?;
        Ok(())
    }

    /// Rule 4: an action claim past its lease is taken over by the next delivery.
    pub async fn an_expired_action_claim_is_taken_over(s: Subject<'_>) -> Check {
        let k = key("lease");
        run(s, &k, 1).await?;
        s.clock.advance(s.lease + Duration::from_millis(1));
        run(s, &k, 1).await?;
        let o = answer(s, &k, 2).await?;
        eq(
            "during the takeover",
            code(&o),
            Some(("retryable", IN_PROGRESS_CODE)),
        )?;
        let out = Outcome::Success(json!("second"));
        s.fence
            .finish_action(&k, 1, &out)
            .await
            .map_err(e("finish_action"))?;
        // The crashed first holder finishing late gets the same answer.
        let late = s
            .fence
            .finish_action(&k, 1, &Outcome::Success(json!("first")))
            .await
            .map_err(e("finish_action"))?;
        eq("the late holder's answer", late, out)
    }

    /// Rule 4: a compensation finding an action claim past its lease undoes it without
    /// an output, and the action is refused from then on (also to its late holder).
    pub async fn compensation_takes_over_an_expired_action(s: Subject<'_>) -> Check {
        let k = key("lease-undo");
        run(s, &k, 1).await?;
        s.clock.advance(s.lease + Duration::from_millis(1));
        eq(
            "the compensation's action output",
            undo(s, &k, 1).await?,
            None,
        )?;
        is_refusal(&answer(s, &k, 2).await?)?;
        is_refusal(
            &s.fence
                .finish_action(&k, 1, &Outcome::Success(json!("late")))
                .await
                .map_err(e("finish_action"))?,
        )?;
        s.fence
            .finish_compensation(&k, 1, &Outcome::Success(json!({"undone": true})))
            .await
            .map_err(e("finish_compensation"))?;
        is_refusal(&answer(s, &k, 3).await?)?;
        eq(
            "a compensation after the compensation",
            comp_answer(s, &k, 2).await?,
            Outcome::Success(json!({"undone": true})),
        )
    }

    /// Rule 4: a compensation claim past its lease is taken over by the next delivery.
    pub async fn an_expired_compensation_claim_is_taken_over(s: Subject<'_>) -> Check {
        let k = key("comp-lease");
        run(s, &k, 1).await?;
        s.fence
            .finish_action(&k, 1, &Outcome::Success(json!(7)))
            .await
            .map_err(e("finish_action"))?;
        undo(s, &k, 1).await?;
        s.clock.advance(s.lease + Duration::from_millis(1));
        eq(
            "the takeover's action output",
            undo(s, &k, 1).await?,
            Some(json!(7)),
        )
    }

    /// Every check, in turn; the first failure names its check.
    pub async fn check_all(s: Subject<'_>) -> Check {
        macro_rules! all {
            ($($check:ident),* $(,)?) => {
                $( $check(s).await.map_err(|e| format!("{}: {e}", stringify!($check)))?; )*
            };
        }
        all!(
            success_is_answered_to_every_delivery,
            failure_is_answered_to_every_delivery,
            a_live_claim_is_in_progress,
            retryable_is_remembered_per_attempt,
            compensation_undoes_a_success_once,
            a_failed_compensation_is_retried,
            compensation_first_refuses_the_action,
            nothing_applied_is_an_empty_rollback,
            compensation_waits_for_a_running_action,
            an_expired_action_claim_is_taken_over,
            compensation_takes_over_an_expired_action,
            an_expired_compensation_claim_is_taken_over,
        );
        Ok(())
    }
}
