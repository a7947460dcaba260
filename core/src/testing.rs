//! Unit tests for a saga definition: the machine with virtual time.
//!
//! [`SagaTest`] runs one saga of a definition through the state machine: no actors, no
//! store, no bus, no sleeps. It plays the participants (`succeed`, `fail`) and the
//! clock (`advance` fires every reply deadline and retry backoff that falls due, in
//! order, at its own time), and checks what the saga sent (`expect_action`,
//! `expect_compensation`, `expect_no_command`). A test of a whole saga runs in
//! microseconds, and says what was sent instead when an expectation fails.
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! # use serde_json::json;
//! # use skald_core::definition::{SagaDefinition, Step};
//! # use skald_core::machine::SagaStatus;
//! use skald_core::testing::SagaTest;
//! # #[derive(Serialize, Deserialize)]
//! # struct Order { id: String, reservation: Option<String> }
//! # let checkout = SagaDefinition::<Order>::builder("checkout", 1)
//! #     .step(Step::new("reserve_inventory")
//! #         .action("skald.cmd.inventory.reserve", |o: &Order| json!({ "order": o.id }))
//! #         .on_success(|o: &mut Order, out: serde_json::Value| {
//! #             o.reservation = out["reservation_id"].as_str().map(str::to_owned);
//! #         })
//! #         .compensate("skald.cmd.inventory.release", |o: &Order| {
//! #             json!({ "reservation_id": o.reservation })
//! #         }))
//! #     .step(Step::new("charge_payment")
//! #         .action("skald.cmd.payments.charge", |o: &Order| json!({ "order": o.id })))
//! #     .build()
//! #     .expect("valid");
//! # let order = Order { id: "o-1".into(), reservation: None };
//! let mut t = SagaTest::start(&checkout, order);
//! let c = t.expect_action("reserve_inventory");
//! assert_eq!(c.attempt(), 1);
//! t.succeed(&c, json!({ "reservation_id": "r-1" }));
//! let c = t.expect_action("charge_payment");
//! t.fail(&c, "card_declined", false); // permanent: compensate
//! let c = t.expect_compensation("reserve_inventory");
//! assert_eq!(c.payload()["reservation_id"], "r-1");
//! t.succeed(&c, json!(null));
//! assert_eq!(t.status(), SagaStatus::Compensated);
//! t.expect_no_command();
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::definition::SagaDefinition;
use crate::ids::{CommandKind, SagaId};
use crate::machine::{
    self, Command, DeadLetterInfo, Effect, EventKind, Input, SagaState, SagaStatus, StepError,
    Timestamp, TransitionError,
};
use crate::retry::Jitter;

/// A command the saga sent, as a participant receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent(Command);

impl Sent {
    /// The step it is for.
    pub fn step(&self) -> &str {
        self.0.step.as_str()
    }

    /// Action or compensation.
    pub fn kind(&self) -> CommandKind {
        self.0.kind
    }

    /// The attempt (from 1).
    pub fn attempt(&self) -> u32 {
        self.0.attempt
    }

    /// The command's body (what the step's payload function built).
    pub fn payload(&self) -> &Value {
        &self.0.payload
    }

    /// The subject it was published on.
    pub fn subject(&self) -> &str {
        &self.0.subject
    }

    /// The idempotency key (the same for every attempt of the step's action or
    /// compensation).
    pub fn idempotency_key(&self) -> &str {
        &self.0.idempotency_key
    }

    /// When the attempt times out (virtual time).
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.0.deadline.as_millis())
    }

    /// Whether the action's outcome was unknown when this (compensation) was sent.
    pub fn in_doubt(&self) -> bool {
        self.0.in_doubt
    }

    /// The machine's command, whole.
    pub fn command(&self) -> &Command {
        &self.0
    }
}

impl fmt::Display for Sent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} (attempt {}) on {}",
            self.0.kind, self.0.step, self.0.attempt, self.0.subject
        )
    }
}

/// One saga of a definition, run through the machine with virtual time (see the module
/// docs). Every method that plays a participant or the clock panics with what happened
/// instead when the saga refuses the input; the `try_` forms return the refusal, for
/// tests of late, duplicate or stale replies.
pub struct SagaTest<D> {
    definition: SagaDefinition<D>,
    state: SagaState,
    now: Timestamp,
    jitter: Jitter,
    sent: VecDeque<Sent>,
    events: Vec<EventKind>,
}

impl<D> fmt::Debug for SagaTest<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaTest")
            .field("saga_type", self.definition.definition().saga_type())
            .field("now", &self.now)
            .field("state", &self.state)
            .field("unread", &self.sent)
            .finish()
    }
}

impl<D> SagaTest<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    /// Starts a saga of `definition` with `data` at virtual time 0. Retry delays take
    /// no jitter (each is its full exponential cap) unless [`SagaTest::with_jitter`]
    /// says otherwise.
    pub fn start(definition: &SagaDefinition<D>, data: D) -> Self {
        Self::start_with_jitter_draw(definition, data, Jitter::NONE)
    }

    /// Like [`SagaTest::start`], drawing `jitter` for every retry delay (in `[0, 1)`:
    /// the delay is `cap · (1 − jitter · draw)` per the step's policy).
    pub fn start_with_jitter(definition: &SagaDefinition<D>, data: D, jitter: f64) -> Self {
        Self::start_with_jitter_draw(definition, data, Jitter::new(jitter))
    }

    fn start_with_jitter_draw(definition: &SagaDefinition<D>, data: D, jitter: Jitter) -> Self {
        let data = definition
            .encode(&data)
            .unwrap_or_else(|e| panic!("SagaTest::start: the saga data does not encode: {e}"));
        let state = SagaState::new(SagaId::new(), definition.definition(), data, Timestamp(0));
        let mut t = SagaTest {
            definition: definition.clone(),
            state,
            now: Timestamp(0),
            jitter,
            sent: VecDeque::new(),
            events: Vec::new(),
        };
        t.apply(&Input::Started)
            .unwrap_or_else(|e| panic!("SagaTest::start: the saga refused to start: {e}"));
        t
    }

    /// From now on, draws `jitter` (in `[0, 1)`) for every retry delay.
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = Jitter::new(jitter);
        self
    }

    /// The next command the saga sent, which must be the action of `step`. Panics,
    /// saying what was sent instead (or that nothing was).
    #[track_caller]
    pub fn expect_action(&mut self, step: &str) -> Sent {
        self.expect(step, CommandKind::Action)
    }

    /// The next command the saga sent, which must be the compensation of `step`.
    /// Panics, saying what was sent instead (or that nothing was).
    #[track_caller]
    pub fn expect_compensation(&mut self, step: &str) -> Sent {
        self.expect(step, CommandKind::Compensation)
    }

    #[track_caller]
    fn expect(&mut self, step: &str, kind: CommandKind) -> Sent {
        match self.sent.pop_front() {
            Some(c) if c.step() == step && c.kind() == kind => c,
            Some(c) => panic!(
                "expected the {kind} of {step}, but the saga sent the {c}{} (status {}, at {} ms)",
                self.rest(),
                self.state.status,
                self.now.as_millis()
            ),
            None => panic!(
                "expected the {kind} of {step}, but the saga sent nothing (status {}, at {} ms{})",
                self.state.status,
                self.now.as_millis(),
                match self.state.wake_at() {
                    Some(at) =>
                        format!(", waiting until {} ms: advance the clock?", at.as_millis()),
                    None => String::new(),
                }
            ),
        }
    }

    fn rest(&self) -> String {
        if self.sent.is_empty() {
            String::new()
        } else {
            let rest: Vec<String> = self.sent.iter().map(ToString::to_string).collect();
            format!(", then {}", rest.join(", then "))
        }
    }

    /// Panics if the saga sent a command not yet taken by an `expect_*`.
    #[track_caller]
    pub fn expect_no_command(&mut self) {
        if let Some(c) = self.sent.front() {
            panic!(
                "expected no command, but the saga sent the {c}{} (status {})",
                {
                    let mut t = self.sent.clone();
                    t.pop_front();
                    if t.is_empty() {
                        String::new()
                    } else {
                        format!(" and {} more", t.len())
                    }
                },
                self.state.status
            );
        }
    }

    /// The participant answers `command` with success and `output` (what the step's
    /// `on_success` reads). Panics if the saga refuses it (see [`SagaTest::try_succeed`]).
    #[track_caller]
    pub fn succeed(&mut self, command: &Sent, output: Value) {
        if let Err(e) = self.try_succeed(command, output) {
            panic!("the saga refused the success of the {command}: {e}");
        }
    }

    /// Like [`SagaTest::succeed`], returning the machine's refusal (a duplicate, a stale
    /// attempt, a finished saga) instead of panicking; a refused input changes nothing.
    pub fn try_succeed(&mut self, command: &Sent, output: Value) -> Result<(), TransitionError> {
        let input = Input::StepSucceeded {
            step: command.0.step.clone(),
            kind: command.kind(),
            attempt: command.attempt(),
            output,
        };
        self.apply(&input)
    }

    /// The participant answers `command` with a failure of code `code`: retryable (the
    /// step's policy retries it after a backoff) or permanent (the saga compensates, or
    /// dead-letters a failed compensation). Panics if the saga refuses it.
    #[track_caller]
    pub fn fail(&mut self, command: &Sent, code: &str, retryable: bool) {
        if let Err(e) = self.try_fail(command, StepError::new(code, code), retryable) {
            panic!("the saga refused the failure of the {command}: {e}");
        }
    }

    /// Like [`SagaTest::fail`] with a whole error, returning the refusal.
    pub fn try_fail(
        &mut self,
        command: &Sent,
        error: StepError,
        retryable: bool,
    ) -> Result<(), TransitionError> {
        let input = Input::StepFailed {
            step: command.0.step.clone(),
            kind: command.kind(),
            attempt: command.attempt(),
            retryable,
            error,
            jitter: self.jitter,
        };
        self.apply(&input)
    }

    /// Moves virtual time forward by `by`, firing every reply deadline and retry backoff
    /// that falls due on the way, each at its own time and in order: a timed-out
    /// attempt is retried (after its backoff, if that falls due too), a spent one
    /// compensates or dead-letters.
    pub fn advance(&mut self, by: Duration) {
        let until = self.now.plus(by);
        while let Some(at) = self.state.wake_at().filter(|at| *at <= until) {
            let Some(input) = self
                .state
                .due_input(self.definition.definition(), at, self.jitter)
            else {
                break;
            };
            self.now = self.now.max(at);
            if let Err(e) = self.apply(&input) {
                // A due wake-up the machine refuses would fire forever: say so.
                panic!(
                    "the saga refused its own wake-up at {} ms: {e}",
                    at.as_millis()
                );
            }
        }
        self.now = self.now.max(until);
    }

    /// Moves virtual time to the next wake-up (a reply deadline or the end of a
    /// backoff) and fires it; returns how far time moved, or `None` (and moves nothing)
    /// when the saga waits for nothing.
    pub fn advance_to_next_wakeup(&mut self) -> Option<Duration> {
        let at = self.state.wake_at()?;
        let by = Duration::from_millis(at.as_millis().saturating_sub(self.now.as_millis()));
        self.advance(by);
        Some(by)
    }

    /// Someone cancels the saga. An action in flight is waited for (its answer or
    /// deadline) before compensating. Panics if the saga refuses it (see
    /// [`SagaTest::try_cancel`]).
    #[track_caller]
    pub fn cancel(&mut self, reason: &str) {
        if let Err(e) = self.try_cancel(reason) {
            panic!("the saga refused the cancel: {e}");
        }
    }

    /// Like [`SagaTest::cancel`], returning the refusal (a finished saga, a cancel
    /// already pending).
    pub fn try_cancel(&mut self, reason: &str) -> Result<(), TransitionError> {
        let input = Input::CancelRequested {
            reason: reason.to_owned(),
        };
        self.apply(&input)
    }

    /// An operator re-drives the dead-lettered saga. Panics if the saga refuses it.
    #[track_caller]
    pub fn redrive(&mut self) {
        if let Err(e) = self.apply(&Input::Redriven) {
            panic!("the saga refused the re-drive: {e}");
        }
    }

    /// The saga's status.
    pub fn status(&self) -> SagaStatus {
        self.state.status
    }

    /// The saga's data, typed. Panics if it does not decode (an `on_success` that wrote
    /// what the type cannot read).
    #[track_caller]
    pub fn data(&self) -> D {
        self.definition
            .decode(&self.state.data)
            .unwrap_or_else(|e| panic!("the saga data does not decode: {e}"))
    }

    /// The whole state, for what the other accessors do not show.
    pub fn state(&self) -> &SagaState {
        &self.state
    }

    /// The virtual time.
    pub fn now(&self) -> Duration {
        Duration::from_millis(self.now.as_millis())
    }

    /// When the saga next wakes up (a reply deadline or the end of a backoff), in
    /// virtual time; `None` when it waits for nothing.
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.state
            .wake_at()
            .map(|at| Duration::from_millis(at.as_millis()))
    }

    /// The dead letter, when the saga is `Failed`.
    pub fn dead_letter(&self) -> Option<&DeadLetterInfo> {
        self.state.dead_letter.as_ref()
    }

    /// The lifecycle events emitted so far, oldest first.
    pub fn events(&self) -> &[EventKind] {
        &self.events
    }

    /// Commands sent and not yet taken by an `expect_*`, oldest first.
    pub fn unread(&self) -> impl Iterator<Item = &Sent> {
        self.sent.iter()
    }

    fn apply(&mut self, input: &Input) -> Result<(), TransitionError> {
        let (state, effects) =
            machine::transition(self.definition.definition(), &self.state, input, self.now)?;
        self.state = state;
        for e in effects {
            match e {
                Effect::SendCommand(c) => self.sent.push_back(Sent(c)),
                Effect::EmitLifecycleEvent(ev) => self.events.push(ev.event),
                Effect::DeadLetter(_) | Effect::Finished { .. } => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;
    use crate::definition::Step;
    use crate::retry::RetryPolicy;

    #[derive(Debug, Serialize, Deserialize)]
    struct Order {
        id: String,
        reservation: Option<String>,
    }

    fn checkout() -> SagaDefinition<Order> {
        let retry = RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            jitter: 1.0,
        };
        SagaDefinition::<Order>::builder("checkout", 1)
            .step(
                Step::new("reserve")
                    .action(
                        "skald.cmd.inventory.reserve",
                        |o: &Order| json!({ "order": o.id }),
                    )
                    .on_success(|o: &mut Order, out: Value| {
                        o.reservation = out["reservation_id"].as_str().map(str::to_owned);
                    })
                    .compensate(
                        "skald.cmd.inventory.release",
                        |o: &Order| json!({ "reservation_id": o.reservation }),
                    ),
            )
            .step(
                Step::new("charge")
                    .action(
                        "skald.cmd.payments.charge",
                        |o: &Order| json!({ "order": o.id }),
                    )
                    .timeout(Duration::from_secs(10))
                    .retry(retry),
            )
            .build()
            .expect("valid")
    }

    fn order() -> Order {
        Order {
            id: "o-1".into(),
            reservation: None,
        }
    }

    #[test]
    fn a_decline_compensates_the_reservation() {
        let def = checkout();
        let mut t = SagaTest::start(&def, order());
        let c = t.expect_action("reserve");
        assert_eq!(c.attempt(), 1);
        t.succeed(&c, json!({ "reservation_id": "r-1" }));
        assert_eq!(t.data().reservation.as_deref(), Some("r-1"));
        let c = t.expect_action("charge");
        t.fail(&c, "card_declined", false);
        let c = t.expect_compensation("reserve");
        assert_eq!(c.payload()["reservation_id"], "r-1");
        t.succeed(&c, json!(null));
        assert_eq!(t.status(), SagaStatus::Compensated);
        t.expect_no_command();
    }

    #[test]
    fn advance_fires_the_deadline_then_the_backoff_each_at_its_time() {
        let def = checkout();
        let mut t = SagaTest::start(&def, order());
        let c = t.expect_action("reserve");
        t.succeed(&c, json!({ "reservation_id": "r-1" }));
        let first = t.expect_action("charge");
        assert_eq!(first.deadline(), Duration::from_secs(10));
        t.advance(Duration::from_secs(9));
        t.expect_no_command();
        // The deadline at 10 s, then the backoff (100 ms, no jitter) at 10.1 s.
        t.advance(Duration::from_secs(2));
        let second = t.expect_action("charge");
        assert_eq!(second.attempt(), 2);
        assert_eq!(second.idempotency_key(), first.idempotency_key());
        assert_eq!(second.deadline(), Duration::from_millis(20_100));
        assert_eq!(t.now(), Duration::from_secs(11));
        // A late success of attempt 1 is accepted: the same effect.
        t.succeed(&first, json!({ "receipt": "c-1" }));
        assert_eq!(t.status(), SagaStatus::Completed);
        // A second answer is refused, and changes nothing.
        assert!(t.try_succeed(&second, json!({})).is_err());
        assert_eq!(t.status(), SagaStatus::Completed);
    }

    #[test]
    fn every_attempt_timing_out_compensates_the_charge_in_doubt_with_nothing_to_undo() {
        let def = checkout();
        let mut t = SagaTest::start(&def, order());
        let c = t.expect_action("reserve");
        t.succeed(&c, json!({ "reservation_id": "r-1" }));
        for attempt in 1..=3 {
            let c = t.expect_action("charge");
            assert_eq!(c.attempt(), attempt);
            t.advance_to_next_wakeup().expect("the deadline");
            if attempt < 3 {
                t.advance_to_next_wakeup().expect("the backoff");
            }
        }
        // The charge has no compensation and may have happened: dead-lettered in doubt.
        assert_eq!(t.status(), SagaStatus::Failed);
        let dl = t.dead_letter().expect("a dead letter");
        assert!(dl.in_doubt, "{dl:?}");
        t.expect_no_command();
    }

    #[test]
    #[should_panic(
        expected = "expected the action of charge, but the saga sent the action of reserve"
    )]
    fn a_wrong_expectation_says_what_was_sent() {
        let def = checkout();
        let mut t = SagaTest::start(&def, order());
        t.expect_action("charge");
    }

    #[test]
    #[should_panic(expected = "advance the clock?")]
    fn an_expectation_while_waiting_suggests_the_clock() {
        let def = checkout();
        let mut t = SagaTest::start(&def, order());
        let c = t.expect_action("reserve");
        t.fail(&c, "busy", true);
        t.expect_action("reserve");
    }

    #[test]
    fn cancel_in_flight_waits_then_compensates() {
        let def = checkout();
        let mut t = SagaTest::start(&def, order());
        let c = t.expect_action("reserve");
        t.cancel("customer changed their mind");
        t.expect_no_command();
        t.succeed(&c, json!({ "reservation_id": "r-1" }));
        let c = t.expect_compensation("reserve");
        assert_eq!(c.payload()["reservation_id"], "r-1");
        t.succeed(&c, json!(null));
        assert_eq!(t.status(), SagaStatus::Compensated);
        assert!(t.events().contains(&EventKind::Cancelled));
    }
}
