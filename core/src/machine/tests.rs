//! Tests of the pure saga machine.
//!
//! The unit tests are one per rule, named for the rule. The canned journals are named
//! fixtures replayed through [`transition`]. The property tests (`props`) drive random
//! definitions with random inputs and check the design invariants after every step. A
//! fixed-seed coverage check makes sure that the generator reaches every transition
//! worth checking.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::definition::{SagaDefinition, Step};
use crate::ids::CommandKind::{Action, Compensation};
use crate::ids::{CommandKind, SagaId, StepName};
use crate::retry::{Jitter, RetryPolicy};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// The time a saga is created in these tests.
const T0: Timestamp = Timestamp(1_700_000_000_000);
/// Every step's reply timeout in the unit tests.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: String,
    amount: u64,
    /// Receipts of the steps that succeeded, appended by `on_success`.
    done: Vec<String>,
}

/// A participant's success output.
#[derive(Deserialize)]
struct Receipt {
    receipt: String,
}

fn order() -> Order {
    Order {
        id: "o-1".into(),
        amount: 42,
        done: Vec::new(),
    }
}

/// 100 ms, 200 ms, 400 ms, ... capped at 1 s, full jitter.
fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_delay: Duration::from_millis(100),
        multiplier: 2.0,
        max_delay: Duration::from_secs(1),
        jitter: 1.0,
    }
}

/// A step whose action carries the data and whose success appends the receipt to
/// `done`; actions may try 3 times, compensations twice.
fn step(name: &str, compensable: bool) -> Step<Order> {
    let s = Step::new(name)
        .action(
            format!("skald.cmd.{name}.do"),
            |o: &Order| json!({ "order": o.id, "amount": o.amount, "done": o.done }),
        )
        .on_success(|o: &mut Order, r: Receipt| o.done.push(r.receipt))
        .retry(policy(3))
        .compensation_retry(policy(2))
        .timeout(TIMEOUT);
    if compensable {
        s.compensate(
            format!("skald.cmd.{name}.undo"),
            |o: &Order| json!({ "order": o.id, "done": o.done }),
        )
    } else {
        s
    }
}

fn saga(steps: Vec<Step<Order>>) -> SagaDefinition<Order> {
    steps
        .into_iter()
        .fold(SagaDefinition::<Order>::builder("checkout", 3), |b, s| {
            b.step(s)
        })
        .build()
        .expect("the test definition is valid")
}

/// reserve (undo: release) -> charge (undo: refund) -> ship (nothing to undo).
fn checkout() -> SagaDefinition<Order> {
    saga(vec![
        step("reserve", true),
        step("charge", true),
        step("ship", false),
    ])
}

/// reserve (undo) -> notify (no undo) -> charge (undo) -> ship (undo): a step without a
/// compensation in the middle.
fn with_gap() -> SagaDefinition<Order> {
    saga(vec![
        step("reserve", true),
        step("notify", false),
        step("charge", true),
        step("ship", true),
    ])
}

fn saga_id() -> SagaId {
    SagaId::from_uuid(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0001,
    ))
}

fn fresh(def: &Definition) -> SagaState {
    let data = serde_json::to_value(order()).expect("the order serializes");
    SagaState::new(saga_id(), def, data, T0)
}

fn at(ms: u64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

fn name(s: &str) -> StepName {
    StepName::new(s).expect("a valid step name")
}

fn receipt(step: &str) -> Value {
    json!({ "receipt": format!("r-{step}") })
}

/// A success reply. Journals name steps as strings, like the wire does.
fn ok(step: &str, kind: CommandKind, attempt: u32) -> Input {
    Input::StepSucceeded {
        step: name(step),
        kind,
        attempt,
        output: match kind {
            CommandKind::Action => receipt(step),
            CommandKind::Compensation => Value::Null,
        },
    }
}

/// A failure reply: `unavailable` when retryable, `declined` when not.
fn failed(step: &str, kind: CommandKind, attempt: u32, retryable: bool) -> Input {
    let error = if retryable {
        StepError::new("unavailable", "try again later")
    } else {
        StepError::new("declined", "no")
    };
    Input::StepFailed {
        step: name(step),
        kind,
        attempt,
        retryable,
        error,
        jitter: Jitter::NONE,
    }
}

fn timed_out(step: &str, kind: CommandKind, attempt: u32) -> Input {
    Input::TimedOut {
        step: name(step),
        kind,
        attempt,
        jitter: Jitter::NONE,
    }
}

fn retry_due(step: &str, kind: CommandKind, attempt: u32) -> Input {
    Input::RetryDue {
        step: name(step),
        kind,
        attempt,
    }
}

fn cancel(reason: &str) -> Input {
    Input::CancelRequested {
        reason: reason.into(),
    }
}

/// Applies an input that must be accepted.
#[track_caller]
fn apply(def: &Definition, state: &SagaState, input: &Input, now: Timestamp) -> Transition {
    transition(def, state, input, now).unwrap_or_else(|e| {
        panic!(
            "{} must be accepted while {}: {e}",
            input.name(),
            state.status
        )
    })
}

/// Applies an input that must be refused, and checks that the state did not change.
#[track_caller]
fn refuse(def: &Definition, state: &SagaState, input: &Input, now: Timestamp) -> TransitionError {
    let before = state.clone();
    let err = match transition(def, state, input, now) {
        Ok((s, _)) => panic!(
            "{} must be refused while {}, got status {}",
            input.name(),
            state.status,
            s.status
        ),
        Err(e) => e,
    };
    assert_eq!(state, &before, "a refused input changes nothing");
    err
}

fn pending(state: &SagaState) -> Pending {
    state.pending.expect("a command is pending")
}

fn commands(effects: &[Effect]) -> Vec<&Command> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::SendCommand(c) => Some(c),
            _ => None,
        })
        .collect()
}

#[track_caller]
fn the_command(effects: &[Effect]) -> &Command {
    match commands(effects).as_slice() {
        [c] => c,
        other => panic!("expected exactly one command, got {other:?}"),
    }
}

fn events(effects: &[Effect]) -> Vec<EventKind> {
    lifecycle(effects).iter().map(|e| e.event).collect()
}

fn lifecycle(effects: &[Effect]) -> Vec<&LifecycleEvent> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::EmitLifecycleEvent(ev) => Some(ev),
            _ => None,
        })
        .collect()
}

fn finished(effects: &[Effect]) -> Vec<SagaStatus> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Finished { status } => Some(*status),
            _ => None,
        })
        .collect()
}

fn dead_letters(effects: &[Effect]) -> Vec<&DeadLetterInfo> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::DeadLetter(info) => Some(info),
            _ => None,
        })
        .collect()
}

/// (step, kind, attempt) of a command, for compact assertions.
fn target(c: &Command) -> (&str, CommandKind, u32) {
    (c.step.as_str(), c.kind, c.attempt)
}

fn decode(state: &SagaState) -> Order {
    Order::deserialize(&state.data).expect("the saga data decodes as an Order")
}

/// Starts a saga of `def` at `T0`.
fn started(def: &Definition) -> SagaState {
    apply(def, &fresh(def), &Input::Started, T0).0
}

/// Applies `inputs` in order, one second apart, each of which must be accepted.
#[track_caller]
fn run(def: &Definition, mut state: SagaState, inputs: &[Input]) -> SagaState {
    for (i, input) in inputs.iter().enumerate() {
        let now = timer_time(&state, input, at(1_000 * (i as u64 + 1)));
        state = apply(def, &state, input, now).0;
    }
    state
}

/// A checkout saga whose reserve and charge succeeded and whose ship was declined: the
/// refund of `charge` (step 1) is pending, attempt 1.
fn refunding(def: &Definition) -> SagaState {
    let s = run(
        def,
        started(def),
        &[
            ok("reserve", Action, 1),
            ok("charge", Action, 1),
            failed("ship", Action, 1, false),
        ],
    );
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(
        pending(&s),
        Pending {
            step: 1,
            kind: Compensation,
            attempt: 1,
            first_attempt: 1,
            phase: Phase::AwaitingReply {
                deadline: at(3_000).plus(TIMEOUT)
            },
            in_doubt: false,
        }
    );
    s
}

// ---------------------------------------------------------------------------------------
// Forward path
// ---------------------------------------------------------------------------------------

#[test]
fn started_sends_first_action_schedules_its_deadline_and_announces_the_start() {
    let def = checkout();
    let def = def.definition();
    let (s, fx) = apply(def, &fresh(def), &Input::Started, T0);

    let deadline = T0.plus(TIMEOUT);
    assert_eq!(s.status, SagaStatus::Running);
    assert_eq!(s.completed, 0);
    assert_eq!(
        s.pending,
        Some(Pending {
            step: 0,
            kind: Action,
            attempt: 1,
            first_attempt: 1,
            phase: Phase::AwaitingReply { deadline },
            in_doubt: false,
        })
    );
    let c = the_command(&fx);
    assert_eq!(target(c), ("reserve", Action, 1));
    assert_eq!(c.saga_id, saga_id());
    assert_eq!(c.saga_type.as_str(), "checkout");
    assert_eq!(c.subject, "skald.cmd.reserve.do");
    assert_eq!(
        c.payload,
        json!({ "order": "o-1", "amount": 42, "done": [] })
    );
    assert_eq!(c.deadline, deadline);
    assert_eq!(c.idempotency_key, format!("{}:reserve:action", saga_id()));
    assert_eq!(s.wake_at(), Some(deadline));
    assert_eq!(events(&fx), vec![EventKind::Started]);
    assert!(finished(&fx).is_empty());
}

#[test]
fn each_success_moves_to_the_next_step_and_the_last_completes_the_saga() {
    let def = checkout();
    let def = def.definition();
    let mut s = started(def);
    let names = ["reserve", "charge", "ship"];
    for (i, step) in names.iter().enumerate() {
        let now = at(1_000 * (i as u64 + 1));
        let (next, fx) = apply(def, &s, &ok(step, Action, 1), now);
        assert_eq!(next.completed, i + 1, "after {step}");
        assert_eq!(next.updated_at, now);
        let succeeded = lifecycle(&fx)
            .into_iter()
            .find(|e| e.event == EventKind::StepSucceeded)
            .expect("a step_succeeded event");
        assert_eq!(succeeded.step.as_ref().map(StepName::as_str), Some(*step));
        assert_eq!(succeeded.attempt, Some(1));
        if let Some(following) = names.get(i + 1) {
            assert_eq!(next.status, SagaStatus::Running);
            let c = the_command(&fx);
            assert_eq!(target(c), (*following, Action, 1));
            // on_success ran before the next payload was built
            assert_eq!(
                c.payload["done"],
                json!(
                    names[..=i]
                        .iter()
                        .map(|n| format!("r-{n}"))
                        .collect::<Vec<_>>()
                )
            );
            assert_eq!(next.wake_at(), Some(now.plus(TIMEOUT)));
            assert!(finished(&fx).is_empty());
        } else {
            assert_eq!(next.status, SagaStatus::Completed);
            assert_eq!(next.pending, None);
            assert!(commands(&fx).is_empty());
            assert_eq!(next.wake_at(), None);
            assert_eq!(finished(&fx), vec![SagaStatus::Completed]);
            assert_eq!(
                events(&fx),
                vec![EventKind::StepSucceeded, EventKind::Completed]
            );
        }
        s = next;
    }
    assert_eq!(
        s.data,
        json!({ "id": "o-1", "amount": 42, "done": ["r-reserve", "r-charge", "r-ship"] })
    );
    assert_eq!(s.failure, None);
}

// ---------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------

#[test]
fn retryable_failure_schedules_a_backoff_and_the_retry_keeps_the_idempotency_key() {
    let def = checkout();
    let def = def.definition();
    let (s, fx) = apply(def, &fresh(def), &Input::Started, T0);
    let first = the_command(&fx).clone();

    let jitter = Jitter::new(0.25);
    let now = at(1_000);
    let input = Input::StepFailed {
        step: name("reserve"),
        kind: Action,
        attempt: 1,
        retryable: true,
        error: StepError::new("unavailable", "inventory is down"),
        jitter,
    };
    let (s, fx) = apply(def, &s, &input, now);
    // full jitter over a 100 ms cap, draw 0.25: 75 ms
    let delay = policy(3).next_delay(1, jitter).expect("a retry is left");
    assert_eq!(delay, Duration::from_millis(75));
    let due = now.plus(delay);
    assert_eq!(s.status, SagaStatus::Running);
    assert_eq!(
        s.pending,
        Some(Pending {
            step: 0,
            kind: Action,
            attempt: 1,
            first_attempt: 1,
            phase: Phase::Backoff { due },
            in_doubt: false,
        })
    );
    assert!(commands(&fx).is_empty(), "nothing is sent during a backoff");
    assert_eq!(s.wake_at(), Some(due));
    assert_eq!(
        events(&fx),
        vec![EventKind::StepFailed, EventKind::RetryScheduled]
    );
    let evs = lifecycle(&fx);
    assert_eq!(
        evs[0].error.as_ref().map(|e| e.code.as_str()),
        Some("unavailable")
    );
    assert_eq!(
        evs[1].attempt,
        Some(2),
        "the retry announces the next attempt"
    );

    let (s, fx) = apply(def, &s, &retry_due("reserve", Action, 1), due);
    let second = the_command(&fx);
    assert_eq!(target(second), ("reserve", Action, 2));
    assert_eq!(second.idempotency_key, first.idempotency_key);
    assert_ne!(second.message_id, first.message_id);
    assert_eq!(second.payload, first.payload);
    assert_eq!(
        s.pending,
        Some(Pending {
            step: 0,
            kind: Action,
            attempt: 2,
            first_attempt: 1,
            phase: Phase::AwaitingReply {
                deadline: due.plus(TIMEOUT)
            },
            in_doubt: false,
        })
    );
    assert_eq!(s.wake_at(), Some(due.plus(TIMEOUT)));
}

#[test]
fn backoff_grows_with_each_failed_attempt() {
    let def = checkout();
    let def = def.definition();
    let s = started(def);
    let (s, _) = apply(def, &s, &failed("reserve", Action, 1, true), at(0));
    assert_eq!(s.wake_at(), Some(at(100)));
    let (s, _) = apply(def, &s, &retry_due("reserve", Action, 1), at(100));
    let (s, _) = apply(def, &s, &failed("reserve", Action, 2, true), at(200));
    assert_eq!(s.wake_at(), Some(at(400)), "second delay is 200 ms");
}

#[test]
fn timeout_is_a_retryable_failure_with_code_timeout() {
    let def = checkout();
    let def = def.definition();
    let s = started(def);
    let deadline = T0.plus(TIMEOUT);
    let jitter = Jitter::new(0.5);
    let input = s
        .due_input(def, deadline, jitter)
        .expect("the deadline passed");
    assert_eq!(
        input,
        Input::TimedOut {
            step: name("reserve"),
            kind: Action,
            attempt: 1,
            jitter
        }
    );
    let (s, fx) = apply(def, &s, &input, deadline);
    let due = deadline.plus(Duration::from_millis(50));
    assert_eq!(s.status, SagaStatus::Running);
    assert_eq!(pending(&s).phase, Phase::Backoff { due });
    assert!(
        pending(&s).in_doubt,
        "a timed-out attempt may have taken effect"
    );
    assert_eq!(s.wake_at(), Some(due));
    let failed_event = lifecycle(&fx)[0].clone();
    assert_eq!(failed_event.event, EventKind::StepFailed);
    assert_eq!(
        failed_event.error.map(|e| e.code),
        Some("timeout".to_owned())
    );
    assert_eq!(events(&fx)[1], EventKind::RetryScheduled);
}

#[test]
fn spent_retries_start_compensation() {
    let def = checkout();
    let def = def.definition();
    let mut s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let mut charge_sends = 1;
    for attempt in 1..=3 {
        let (next, fx) = apply(
            def,
            &s,
            &failed("charge", Action, attempt, true),
            at(10_000),
        );
        s = next;
        if attempt < 3 {
            assert_eq!(s.status, SagaStatus::Running);
            let (next, fx) = apply(def, &s, &retry_due("charge", Action, attempt), at(20_000));
            assert_eq!(target(the_command(&fx)), ("charge", Action, attempt + 1));
            charge_sends += 1;
            s = next;
        } else {
            assert_eq!(s.status, SagaStatus::Compensating);
            assert_eq!(
                s.failure,
                Some(StepError::new("unavailable", "try again later"))
            );
            assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));
            assert_eq!(
                events(&fx),
                vec![EventKind::StepFailed, EventKind::Compensating]
            );
        }
    }
    assert_eq!(charge_sends, 3, "max_attempts is 3");
}

#[test]
fn permanent_failure_starts_compensation_at_once() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let (s, fx) = apply(def, &s, &failed("charge", Action, 1, false), at(5_000));
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(s.failure, Some(StepError::new("declined", "no")));
    assert_eq!(s.completed, 1);
    let c = the_command(&fx);
    assert_eq!(target(c), ("reserve", Compensation, 1));
    assert_eq!(c.subject, "skald.cmd.reserve.undo");
    assert_eq!(c.payload, json!({ "order": "o-1", "done": ["r-reserve"] }));
    assert_eq!(
        c.idempotency_key,
        format!("{}:reserve:compensation", saga_id())
    );
    assert!(!events(&fx).contains(&EventKind::RetryScheduled));
}

// ---------------------------------------------------------------------------------------
// Compensation
// ---------------------------------------------------------------------------------------

#[test]
fn compensation_runs_in_reverse_over_completed_steps_that_have_one() {
    let def = with_gap();
    let def = def.definition();
    let s = run(
        def,
        started(def),
        &[
            ok("reserve", Action, 1),
            ok("notify", Action, 1),
            ok("charge", Action, 1),
        ],
    );
    // ship (which has a compensation) fails: it never completed, so it is not undone
    let (mut s, mut fx) = apply(def, &s, &failed("ship", Action, 1, false), at(9_000));
    let mut undone = Vec::new();
    while s.status == SagaStatus::Compensating {
        assert!(undone.len() < 4, "compensation does not end: {undone:?}");
        let c = the_command(&fx);
        assert_eq!(c.kind, Compensation);
        undone.push(c.step.as_str().to_owned());
        let step = c.step.as_str().to_owned();
        (s, fx) = apply(def, &s, &ok(&step, Compensation, 1), at(10_000));
    }
    assert_eq!(
        undone,
        vec!["charge", "reserve"],
        "notify has no compensation"
    );
    assert_eq!(s.status, SagaStatus::Compensated);
    assert_eq!(s.pending, None);
    assert_eq!(s.completed, 3, "completed keeps what had been done");
    assert_eq!(finished(&fx), vec![SagaStatus::Compensated]);
    assert_eq!(
        events(&fx),
        vec![EventKind::StepSucceeded, EventKind::Compensated]
    );
}

#[test]
fn failure_with_no_completed_step_is_compensated_at_once() {
    let def = checkout();
    let def = def.definition();
    let (s, fx) = apply(
        def,
        &started(def),
        &failed("reserve", Action, 1, false),
        at(1),
    );
    assert_eq!(s.status, SagaStatus::Compensated);
    assert_eq!(s.pending, None);
    assert!(commands(&fx).is_empty());
    assert_eq!(finished(&fx), vec![SagaStatus::Compensated]);
    assert_eq!(
        events(&fx),
        vec![
            EventKind::StepFailed,
            EventKind::Compensating,
            EventKind::Compensated
        ]
    );
}

#[test]
fn failure_after_only_uncompensable_steps_is_compensated_at_once() {
    let def = saga(vec![step("notify", false), step("charge", true)]);
    let def = def.definition();
    let s = run(def, started(def), &[ok("notify", Action, 1)]);
    let (s, fx) = apply(def, &s, &failed("charge", Action, 1, false), at(9));
    assert_eq!(s.status, SagaStatus::Compensated);
    assert!(commands(&fx).is_empty());
    assert_eq!(finished(&fx), vec![SagaStatus::Compensated]);
}

#[test]
fn compensation_failing_permanently_dead_letters_the_saga() {
    let def = checkout();
    let def = def.definition();
    let s = refunding(def);
    let error = StepError::new("refund_refused", "account closed");
    let input = Input::StepFailed {
        step: name("charge"),
        kind: Compensation,
        attempt: 1,
        retryable: false,
        error: error.clone(),
        jitter: Jitter::NONE,
    };
    let (s, fx) = apply(def, &s, &input, at(4_000));
    let info = DeadLetterInfo {
        step: 1,
        step_name: name("charge"),
        kind: Compensation,
        error,
        attempts: 1,
        last_attempt: 1,
        in_doubt: false,
    };
    assert_eq!(s.status, SagaStatus::Failed);
    assert_eq!(s.pending, None);
    assert_eq!(s.dead_letter, Some(info.clone()));
    assert_eq!(dead_letters(&fx), vec![&info]);
    assert!(finished(&fx).is_empty(), "Failed is not terminal");
    assert_eq!(s.wake_at(), None);
    assert_eq!(
        events(&fx),
        vec![EventKind::StepFailed, EventKind::DeadLettered]
    );
    assert_eq!(s.due_input(def, at(u64::MAX / 2), Jitter::NONE), None);
}

#[test]
fn compensation_spending_its_retries_dead_letters_and_a_redrive_grants_a_fresh_budget() {
    let def = checkout();
    let def = def.definition();
    let s = refunding(def);
    // budget 1: attempts 1 and 2 (compensation_retry allows 2)
    let s = run(
        def,
        s,
        &[
            failed("charge", Compensation, 1, true),
            retry_due("charge", Compensation, 1),
        ],
    );
    let due = s.wake_at().expect("a deadline");
    let (s, fx) = apply(def, &s, &timed_out("charge", Compensation, 2), due);
    assert_eq!(s.status, SagaStatus::Failed);
    let dl = dead_letters(&fx);
    assert_eq!(dl.len(), 1);
    assert_eq!((dl[0].step, dl[0].kind), (1, Compensation));
    assert_eq!(dl[0].error.code, "timeout");
    assert_eq!((dl[0].attempts, dl[0].last_attempt), (2, 2));

    // a leftover reply while Failed is stale
    let err = refuse(
        def,
        &s,
        &ok("charge", Compensation, 2),
        due.plus(Duration::from_millis(500)),
    );
    assert!(matches!(err, TransitionError::Stale { .. }), "{err}");

    // re-drive: attempt 3 opens budget 2
    let redriven_at = due.plus(Duration::from_secs(1));
    let (s, fx) = apply(def, &s, &Input::Redriven, redriven_at);
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(s.redrives, 1);
    assert_eq!(s.dead_letter, None);
    assert_eq!(
        s.pending,
        Some(Pending {
            step: 1,
            kind: Compensation,
            attempt: 3,
            first_attempt: 3,
            phase: Phase::AwaitingReply {
                deadline: redriven_at.plus(TIMEOUT)
            },
            in_doubt: false,
        })
    );
    assert_eq!(target(the_command(&fx)), ("charge", Compensation, 3));
    assert_eq!(events(&fx), vec![EventKind::Redriven]);
    assert_eq!(lifecycle(&fx)[0].attempt, Some(3));

    // a late failure of the pre-re-drive attempt is stale...
    let err = refuse(
        def,
        &s,
        &failed("charge", Compensation, 2, false),
        at(10_001),
    );
    assert!(err.is_ignorable());
    assert!(
        matches!(err, TransitionError::Stale { attempt: 2, .. }),
        "{err}"
    );
    // ...but its late success reports the refund (one key, one effect): accepted
    let (refunded, fx) = apply(def, &s, &ok("charge", Compensation, 2), at(10_001));
    assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));
    assert_eq!(refunded.status, SagaStatus::Compensating);

    // the fresh budget allows max_attempts (2) more attempts before dead-lettering again
    let (s, fx) = apply(
        def,
        &s,
        &failed("charge", Compensation, 3, true),
        at(11_000),
    );
    assert_eq!(
        s.status,
        SagaStatus::Compensating,
        "attempt 3 is only 1 of 2"
    );
    assert_eq!(events(&fx)[1], EventKind::RetryScheduled);
    let s = run(def, s, &[retry_due("charge", Compensation, 3)]);
    assert_eq!(pending(&s).attempt, 4);
    let (s, fx) = apply(
        def,
        &s,
        &failed("charge", Compensation, 4, true),
        at(12_000),
    );
    assert_eq!(s.status, SagaStatus::Failed);
    let dl = dead_letters(&fx);
    assert_eq!((dl[0].attempts, dl[0].last_attempt), (2, 4));

    // second re-drive, then both compensations succeed
    let (s, fx) = apply(def, &s, &Input::Redriven, at(13_000));
    assert_eq!(s.redrives, 2);
    assert_eq!(target(the_command(&fx)), ("charge", Compensation, 5));
    let (s, fx) = apply(def, &s, &ok("charge", Compensation, 5), at(14_000));
    assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));
    let (s, fx) = apply(def, &s, &ok("reserve", Compensation, 1), at(15_000));
    assert_eq!(s.status, SagaStatus::Compensated);
    assert_eq!(finished(&fx), vec![SagaStatus::Compensated]);
}

// ---------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------

/// One input of every kind, addressed to the first step.
fn every_input() -> Vec<Input> {
    vec![
        Input::Started,
        ok("reserve", Action, 1),
        failed("reserve", Action, 1, true),
        timed_out("reserve", Action, 1),
        retry_due("reserve", Action, 1),
        ok("reserve", Compensation, 1),
        cancel("late"),
        Input::Redriven,
        Input::Resumed,
    ]
}

#[test]
fn terminal_sagas_refuse_every_input() {
    let def = checkout();
    let def = def.definition();
    let completed = run(def, started(def), &all_steps_succeed()[1..]);
    let compensated = run(def, started(def), &[failed("reserve", Action, 1, false)]);
    for state in [completed, compensated] {
        assert!(state.status.is_terminal());
        for input in every_input() {
            let err = refuse(def, &state, &input, at(99_000));
            assert_eq!(
                err,
                TransitionError::Finished {
                    status: state.status
                },
                "{} while {}",
                input.name(),
                state.status
            );
            assert!(err.is_ignorable());
            assert!(!err.is_poison());
        }
    }
}

#[test]
fn duplicate_reply_for_a_completed_step_is_a_duplicate() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    for input in [
        ok("reserve", Action, 1),
        failed("reserve", Action, 1, false),
    ] {
        let err = refuse(def, &s, &input, at(5_000));
        assert_eq!(
            err,
            TransitionError::Duplicate {
                step: name("reserve"),
                kind: Action,
                attempt: 1
            }
        );
        assert!(err.is_ignorable());
    }
}

#[test]
fn duplicate_reply_for_a_finished_compensation_is_a_duplicate() {
    let def = with_gap();
    let def = def.definition();
    let s = run(
        def,
        started(def),
        &[
            ok("reserve", Action, 1),
            ok("notify", Action, 1),
            ok("charge", Action, 1),
            failed("ship", Action, 1, false),
            ok("charge", Compensation, 1),
        ],
    );
    assert_eq!(pending(&s).step, 0, "reserve is being released");
    let err = refuse(def, &s, &ok("charge", Compensation, 1), at(9_000));
    assert!(matches!(err, TransitionError::Duplicate { .. }), "{err}");
    assert!(err.is_ignorable());
}

#[test]
fn a_failure_or_timer_for_an_old_attempt_is_stale() {
    let def = checkout();
    let def = def.definition();
    let s = run(
        def,
        started(def),
        &[
            failed("reserve", Action, 1, true),
            retry_due("reserve", Action, 1),
        ],
    );
    assert_eq!(pending(&s).attempt, 2);
    for input in [
        failed("reserve", Action, 1, false),
        timed_out("reserve", Action, 1),
    ] {
        let err = refuse(def, &s, &input, at(5_000));
        assert!(
            matches!(err, TransitionError::Stale { attempt: 1, .. }),
            "{err}"
        );
        assert!(err.is_ignorable());
    }
}

#[test]
fn a_late_success_of_an_earlier_attempt_is_accepted_in_either_phase() {
    let def = checkout();
    let def = def.definition();
    // attempt 1 timed out; attempt 2 is in flight; attempt 1's success arrives late
    let awaiting = run(
        def,
        started(def),
        &[
            timed_out("reserve", Action, 1),
            retry_due("reserve", Action, 1),
        ],
    );
    assert_eq!(pending(&awaiting).attempt, 2);
    let (s, fx) = apply(def, &awaiting, &ok("reserve", Action, 1), at(60_000));
    assert_eq!(s.completed, 1);
    assert_eq!(decode(&s).done, vec!["r-reserve"]);
    assert_eq!(target(the_command(&fx)), ("charge", Action, 1));
    // attempt 2's own success, later, is a duplicate of the done step
    let err = refuse(def, &s, &ok("reserve", Action, 2), at(61_000));
    assert!(matches!(err, TransitionError::Duplicate { .. }), "{err}");

    // the same success during the backoff after attempt 1 timed out
    let backoff = run(def, started(def), &[timed_out("reserve", Action, 1)]);
    assert!(matches!(pending(&backoff).phase, Phase::Backoff { .. }));
    let (s, _) = apply(def, &backoff, &ok("reserve", Action, 1), at(60_000));
    assert_eq!(s.completed, 1);
    // an attempt that was never sent is not a success of this key
    let err = refuse(def, &backoff, &ok("reserve", Action, 2), at(60_000));
    assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
}

#[test]
fn a_failure_or_timeout_during_a_backoff_is_stale_and_retry_due_while_awaiting_is_stale() {
    let def = checkout();
    let def = def.definition();
    let awaiting = started(def);
    let backoff = run(def, awaiting.clone(), &[failed("reserve", Action, 1, true)]);
    // (a success of the attempt that failed is accepted: see
    // `a_late_success_of_an_earlier_attempt_is_accepted_in_either_phase`)
    for input in [
        failed("reserve", Action, 1, true),
        timed_out("reserve", Action, 1),
    ] {
        let err = refuse(def, &backoff, &input, at(5_000));
        assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
        assert!(err.is_ignorable());
    }
    let err = refuse(def, &awaiting, &retry_due("reserve", Action, 1), at(5_000));
    assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
}

#[test]
fn reply_for_a_later_step_or_the_other_kind_is_stale() {
    let def = checkout();
    let def = def.definition();
    let s = started(def);
    for input in [ok("charge", Action, 1), ok("reserve", Compensation, 1)] {
        let err = refuse(def, &s, &input, at(1));
        assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
    }
}

#[test]
fn reply_for_an_unknown_step_is_poison() {
    let def = checkout();
    let def = def.definition();
    let s = started(def);
    let err = refuse(def, &s, &ok("teleport", Action, 1), at(1));
    assert!(
        matches!(err, TransitionError::UnknownStep { ref step, .. } if step.as_str() == "teleport"),
        "{err}"
    );
    assert!(err.is_poison());
    assert!(!err.is_ignorable());
}

#[test]
fn an_undecodable_success_dead_letters_the_saga_not_the_message() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let input = Input::StepSucceeded {
        step: name("charge"),
        kind: Action,
        attempt: 1,
        output: json!({ "not_a_receipt": true }),
    };
    // The charge took effect: the saga must neither move on nor compensate around it.
    let (s, fx) = apply(def, &s, &input, at(2_000));
    assert_eq!(s.status, SagaStatus::Failed);
    let dl = s.dead_letter.clone().expect("dead letter");
    assert_eq!((dl.step_name.as_str(), dl.kind), ("charge", Action));
    assert_eq!(dl.error.code, "undecodable_output");
    assert!(dl.error.message.contains("receipt"), "{}", dl.error.message);
    assert!(dl.in_doubt);
    assert!(commands(&fx).is_empty());
    assert_eq!(dead_letters(&fx), vec![&dl]);
    // Fixed (a new build of the participant or the definition): a re-drive re-sends the
    // charge with the same key, and its success goes on.
    let (s, fx) = apply(def, &s, &Input::Redriven, at(3_000));
    let c = the_command(&fx);
    assert_eq!(target(c), ("charge", Action, 2));
    assert_eq!(c.idempotency_key, format!("{}:charge:action", saga_id()));
    assert!(pending(&s).in_doubt);
    let (s, _) = apply(def, &s, &ok("charge", Action, 2), at(4_000));
    assert_eq!(decode(&s).done, vec!["r-reserve", "r-charge"]);
    assert_eq!(s.status, SagaStatus::Running);
}

#[test]
fn started_twice_is_not_allowed() {
    let def = checkout();
    let def = def.definition();
    let err = refuse(def, &started(def), &Input::Started, at(1));
    assert_eq!(
        err,
        TransitionError::NotAllowed {
            input: "started",
            status: SagaStatus::Running
        }
    );
}

// ---------------------------------------------------------------------------------------
// Cancel and re-drive
// ---------------------------------------------------------------------------------------

#[test]
fn cancel_while_an_action_is_in_flight_waits_for_its_outcome() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let (waiting, fx) = apply(def, &s, &cancel("customer changed their mind"), at(5_000));
    // the charge may be taking effect right now: nothing is compensated yet
    assert_eq!(waiting.status, SagaStatus::Running);
    assert_eq!(
        waiting.cancel,
        Some(StepError::new("cancelled", "customer changed their mind"))
    );
    assert!(commands(&fx).is_empty());
    assert_eq!(events(&fx), vec![EventKind::Cancelled]);
    assert_eq!(
        waiting.wake_at(),
        s.wake_at(),
        "the charge's deadline still stands"
    );
    // a second cancel is ignored, saying why
    let err = refuse(def, &waiting, &cancel("again"), at(5_001));
    assert!(
        matches!(err, TransitionError::CancelPending { .. }),
        "{err}"
    );
    assert!(err.is_ignorable());

    // the charge succeeds: it is refunded, then the reservation released
    let (s, fx) = apply(def, &waiting, &ok("charge", Action, 1), at(5_002));
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(
        s.failure.as_ref().map(|f| f.code.as_str()),
        Some("cancelled")
    );
    assert_eq!(s.cancel, None);
    let c = the_command(&fx);
    assert_eq!(target(c), ("charge", Compensation, 1));
    assert_eq!(c.action_key, Some(format!("{}:charge:action", saga_id())));
    assert!(!c.in_doubt, "the charge's outcome is known");

    // it fails for good: only the reservation is released
    let (s, fx) = apply(
        def,
        &waiting,
        &failed("charge", Action, 1, false),
        at(5_002),
    );
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));

    // it answers retryable: no retry after a cancel, and that attempt applied nothing
    let (s, fx) = apply(def, &waiting, &failed("charge", Action, 1, true), at(5_002));
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));

    // no answer before the deadline: the charge is in doubt and refunded by its key
    let deadline = waiting.wake_at().expect("deadline");
    let (s, fx) = apply(def, &waiting, &timed_out("charge", Action, 1), deadline);
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(s.in_doubt, Some(1));
    let c = the_command(&fx);
    assert_eq!(target(c), ("charge", Compensation, 1));
    assert!(c.in_doubt);
    assert_eq!(c.action_key, Some(format!("{}:charge:action", saga_id())));
    assert!(!events(&fx).contains(&EventKind::RetryScheduled));
}

#[test]
fn a_cancel_that_waited_on_the_last_step_completes_when_it_succeeds() {
    let def = checkout();
    let def = def.definition();
    let s = run(
        def,
        started(def),
        &[ok("reserve", Action, 1), ok("charge", Action, 1)],
    );
    let (s, _) = apply(def, &s, &cancel("too late"), at(9_000));
    let (s, fx) = apply(def, &s, &ok("ship", Action, 1), at(9_001));
    assert_eq!(s.status, SagaStatus::Completed);
    assert_eq!(finished(&fx), vec![SagaStatus::Completed]);
    assert_eq!(s.cancel, None);
}

#[test]
fn an_in_doubt_step_without_a_compensation_dead_letters_the_saga() {
    let def = checkout();
    let def = def.definition();
    // ship (no compensation) times out on every attempt
    let mut s = run(
        def,
        started(def),
        &[ok("reserve", Action, 1), ok("charge", Action, 1)],
    );
    for attempt in 1..=3 {
        let deadline = s.wake_at().expect("deadline");
        s = apply(def, &s, &timed_out("ship", Action, attempt), deadline).0;
        if attempt < 3 {
            let due = s.wake_at().expect("due");
            s = apply(def, &s, &retry_due("ship", Action, attempt), due).0;
        }
    }
    assert_eq!(
        s.status,
        SagaStatus::Failed,
        "never `compensated` around a shipment"
    );
    let dl = s.dead_letter.clone().expect("dead letter");
    assert_eq!((dl.step_name.as_str(), dl.kind), ("ship", Action));
    assert_eq!(dl.error.code, "in_doubt_without_compensation");
    assert!(dl.error.message.contains("ship"), "{}", dl.error.message);
    assert!(dl.in_doubt);
    // re-driven: the shipment is asked again with the same key, and its answer decides
    let (s, fx) = apply(def, &s, &Input::Redriven, at(99_000));
    assert_eq!(s.status, SagaStatus::Running);
    assert_eq!(s.failure, None);
    assert_eq!(target(the_command(&fx)), ("ship", Action, 4));
    let (s, _) = apply(def, &s, &ok("ship", Action, 4), at(99_001));
    assert_eq!(s.status, SagaStatus::Completed);
}

#[test]
fn the_late_success_a_dead_letter_in_doubt_waits_for_resolves_it() {
    let def = checkout();
    let def = def.definition();
    let mut s = run(
        def,
        started(def),
        &[ok("reserve", Action, 1), ok("charge", Action, 1)],
    );
    for attempt in 1..=3 {
        let deadline = s.wake_at().expect("deadline");
        s = apply(def, &s, &timed_out("ship", Action, attempt), deadline).0;
        if attempt < 3 {
            let due = s.wake_at().expect("due");
            s = apply(def, &s, &retry_due("ship", Action, attempt), due).0;
        }
    }
    assert_eq!(s.status, SagaStatus::Failed);
    assert!(
        s.dead_letter
            .as_ref()
            .is_some_and(DeadLetterInfo::awaits_outcome)
    );
    // a late success that does not decode changes nothing
    let garbage = Input::StepSucceeded {
        step: name("ship"),
        kind: Action,
        attempt: 1,
        output: json!({ "nope": 1 }),
    };
    let err = refuse(def, &s, &garbage, at(99_000));
    assert!(err.is_ignorable(), "{err}");
    // a failure is still a leftover
    let err = refuse(def, &s, &failed("ship", Action, 3, false), at(99_000));
    assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
    // attempt 1's success arrives at last: the shipment happened, the saga completes
    let (done, fx) = apply(def, &s, &ok("ship", Action, 1), at(99_001));
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(done.dead_letter, None);
    assert_eq!(done.failure, None);
    assert_eq!(finished(&fx), vec![SagaStatus::Completed]);
    assert_eq!(decode(&done).done, vec!["r-reserve", "r-charge", "r-ship"]);

    // With a cancel that waited on it, a late success of a middle step compensates.
    let def = with_gap();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let (s, _) = apply(def, &s, &cancel("stop"), at(2_000));
    let deadline = s.wake_at().expect("deadline");
    let (s, _) = apply(def, &s, &timed_out("notify", Action, 1), deadline);
    assert_eq!(s.status, SagaStatus::Failed, "notify has no compensation");
    assert!(s.cancel.is_some(), "the cancel stays recorded");
    let (s, fx) = apply(def, &s, &ok("notify", Action, 1), at(99_000));
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));
    assert_eq!(
        s.failure.as_ref().map(|f| f.code.as_str()),
        Some("cancelled")
    );
}

#[test]
fn spent_retries_after_a_timeout_compensate_the_step_in_doubt() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    // attempt 1 times out, attempts 2 and 3 answer retryable (the participant says
    // attempt 1 still holds the key): the charge may have happened
    let deadline = s.wake_at().expect("deadline");
    let (s, _) = apply(def, &s, &timed_out("charge", Action, 1), deadline);
    let s = run(
        def,
        s,
        &[
            retry_due("charge", Action, 1),
            failed("charge", Action, 2, true),
            retry_due("charge", Action, 2),
        ],
    );
    assert!(
        pending(&s).in_doubt,
        "a retryable answer does not clear the doubt"
    );
    let (s, fx) = apply(def, &s, &failed("charge", Action, 3, true), at(90_000));
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(s.in_doubt, Some(1));
    assert_eq!(s.compensation_bound(), 2);
    let c = the_command(&fx);
    assert_eq!(target(c), ("charge", Compensation, 1));
    assert!(c.in_doubt);
    // the charge's late success changes nothing: it is being refunded
    let err = refuse(def, &s, &ok("charge", Action, 1), at(90_001));
    assert!(err.is_ignorable(), "{err}");
    let s = run(
        def,
        s,
        &[
            ok("charge", Compensation, 1),
            ok("reserve", Compensation, 1),
        ],
    );
    assert_eq!(s.status, SagaStatus::Compensated);
}

#[test]
fn an_in_progress_answer_leaves_the_outcome_unknown() {
    let def = checkout();
    let def = def.definition();
    let busy = |attempt| Input::StepFailed {
        step: name("charge"),
        kind: Action,
        attempt,
        retryable: true,
        error: StepError::new("in_progress", "another delivery holds the key"),
        jitter: Jitter::new(0.5),
    };
    // another delivery of attempt 1 is running: attempt 1's outcome is unknown
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let (s1, _) = apply(def, &s, &busy(1), at(9_000));
    assert!(pending(&s1).in_doubt);
    // with a cancel waiting, the charge is compensated as in doubt
    let (waiting, _) = apply(def, &s, &cancel("stop"), at(8_000));
    let (s2, fx) = apply(def, &waiting, &busy(1), at(9_000));
    assert_eq!(s2.in_doubt, Some(1));
    let c = the_command(&fx);
    assert_eq!(target(c), ("charge", Compensation, 1));
    assert!(c.in_doubt);
}

#[test]
fn a_success_naming_attempt_zero_is_stale() {
    let def = checkout();
    let def = def.definition();
    let s = started(def);
    let err = refuse(def, &s, &ok("reserve", Action, 0), at(1));
    assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
}

#[test]
fn a_permanent_failure_clears_the_doubt() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let deadline = s.wake_at().expect("deadline");
    let (s, _) = apply(def, &s, &timed_out("charge", Action, 1), deadline);
    let s = run(def, s, &[retry_due("charge", Action, 1)]);
    // the fenced participant's final answer for the key: it never applies it
    let (s, fx) = apply(def, &s, &failed("charge", Action, 2, false), at(90_000));
    assert_eq!(s.in_doubt, None);
    assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));
}

#[test]
fn cancel_during_a_backoff_compensates_too() {
    let def = checkout();
    let def = def.definition();
    let s = run(
        def,
        started(def),
        &[ok("reserve", Action, 1), failed("charge", Action, 1, true)],
    );
    let (s, fx) = apply(def, &s, &cancel("timeout of the order"), at(5_000));
    assert_eq!(target(the_command(&fx)), ("reserve", Compensation, 1));
    assert_eq!(s.status, SagaStatus::Compensating);
    assert_eq!(s.in_doubt, None, "the attempt that failed applied nothing");
}

#[test]
fn cancel_during_a_backoff_after_a_timeout_compensates_the_step_in_doubt() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[ok("reserve", Action, 1)]);
    let deadline = s.wake_at().expect("deadline");
    let (s, _) = apply(def, &s, &timed_out("charge", Action, 1), deadline);
    let (s, fx) = apply(def, &s, &cancel("order expired"), at(99_000));
    assert_eq!(s.in_doubt, Some(1));
    let c = the_command(&fx);
    assert_eq!(target(c), ("charge", Compensation, 1));
    assert!(c.in_doubt);
}

#[test]
fn cancel_is_not_allowed_while_compensating_or_failed() {
    let def = checkout();
    let def = def.definition();
    let compensating = refunding(def);
    let failed_saga = run(
        def,
        compensating.clone(),
        &[failed("charge", Compensation, 1, false)],
    );
    for s in [compensating, failed_saga] {
        let err = refuse(def, &s, &cancel("again"), at(99_000));
        assert_eq!(
            err,
            TransitionError::NotAllowed {
                input: "cancel_requested",
                status: s.status
            }
        );
        assert!(!err.is_ignorable());
    }
}

#[test]
fn redrive_is_only_allowed_when_failed() {
    let def = checkout();
    let def = def.definition();
    for s in [fresh(def), started(def), refunding(def)] {
        let err = refuse(def, &s, &Input::Redriven, at(99_000));
        assert_eq!(
            err,
            TransitionError::NotAllowed {
                input: "redriven",
                status: s.status
            }
        );
    }
}

// ---------------------------------------------------------------------------------------
// Resume and wake-ups
// ---------------------------------------------------------------------------------------

#[test]
fn resumed_while_awaiting_a_reply_resends_the_same_attempt() {
    let def = checkout();
    let def = def.definition();
    let (s, fx) = apply(def, &fresh(def), &Input::Started, T0);
    let sent = the_command(&fx).clone();
    let now = at(60_000);
    let (resumed, fx) = apply(def, &s, &Input::Resumed, now);
    let again = the_command(&fx);
    assert_eq!(again.message_id, sent.message_id, "the broker dedupes it");
    assert_eq!(again.idempotency_key, sent.idempotency_key);
    assert_eq!(target(again), ("reserve", Action, 1));
    assert_eq!(again.payload, sent.payload);
    assert_eq!(again.deadline, now.plus(TIMEOUT), "a fresh deadline");
    assert_eq!(resumed.wake_at(), Some(now.plus(TIMEOUT)));
    assert_eq!(resumed.status, SagaStatus::Running);
    assert_eq!(pending(&resumed).attempt, 1);
    assert!(events(&fx).is_empty());
}

#[test]
fn resumed_during_a_backoff_only_schedules_the_wakeup() {
    let def = checkout();
    let def = def.definition();
    let s = run(def, started(def), &[failed("reserve", Action, 1, true)]);
    let due = s.wake_at().expect("a backoff");
    let (resumed, fx) = apply(def, &s, &Input::Resumed, at(1_050));
    assert!(fx.is_empty(), "nothing to send: {fx:?}");
    assert_eq!(resumed.wake_at(), Some(due));
    assert_eq!(
        resumed,
        SagaState {
            updated_at: at(1_050),
            ..s
        }
    );
}

#[test]
fn resumed_with_nothing_pending_is_not_allowed() {
    let def = checkout();
    let def = def.definition();
    let failed_saga = run(
        def,
        refunding(def),
        &[failed("charge", Compensation, 1, false)],
    );
    for s in [fresh(def), failed_saga] {
        let err = refuse(def, &s, &Input::Resumed, at(1));
        assert!(matches!(err, TransitionError::NotAllowed { .. }), "{err}");
    }
}

#[test]
fn due_input_is_a_timeout_after_the_deadline_and_a_retry_after_the_backoff() {
    let def = checkout();
    let def = def.definition();
    let jitter = Jitter::new(0.3);
    let s = started(def);
    let deadline = T0.plus(TIMEOUT);
    assert_eq!(s.wake_at(), Some(deadline));
    assert_eq!(s.due_input(def, Timestamp(deadline.0 - 1), jitter), None);
    let expected = Input::TimedOut {
        step: name("reserve"),
        kind: Action,
        attempt: 1,
        jitter,
    };
    assert_eq!(s.due_input(def, deadline, jitter), Some(expected.clone()));
    assert_eq!(s.due_input(def, at(60_000), jitter), Some(expected));

    let (s, _) = apply(def, &s, &failed("reserve", Action, 1, true), at(1_000));
    let due = at(1_100);
    assert_eq!(s.wake_at(), Some(due));
    assert_eq!(s.due_input(def, at(1_099), jitter), None);
    let retry = Some(retry_due("reserve", Action, 1));
    assert_eq!(s.due_input(def, due, jitter), retry);
    assert_eq!(s.due_input(def, at(9_999), jitter), retry);

    assert_eq!(fresh(def).due_input(def, at(60_000), jitter), None);
}

// ---------------------------------------------------------------------------------------
// Canned journals (named fixtures, replayed through `transition`)
// ---------------------------------------------------------------------------------------

/// Every checkout step succeeds:
/// 1. started
/// 2. reserve action succeeded (attempt 1)
/// 3. charge action succeeded (attempt 1)
/// 4. ship action succeeded (attempt 1)
///
/// Ends `Completed`.
fn all_steps_succeed() -> Vec<Input> {
    vec![
        Input::Started,
        ok("reserve", Action, 1),
        ok("charge", Action, 1),
        ok("ship", Action, 1),
    ]
}

/// The payment service flakes once, then declines the card:
/// 1. started
/// 2. reserve action succeeded (attempt 1)
/// 3. charge action failed, retryable (attempt 1)
/// 4. charge retry due (after attempt 1)
/// 5. charge action failed, permanent `declined` (attempt 2)
/// 6. reserve compensation succeeded (attempt 1)
///
/// Ends `Compensated`.
fn flaky_then_declined() -> Vec<Input> {
    vec![
        Input::Started,
        ok("reserve", Action, 1),
        failed("charge", Action, 1, true),
        retry_due("charge", Action, 1),
        failed("charge", Action, 2, false),
        ok("reserve", Compensation, 1),
    ]
}

/// The refund is refused, an operator re-drives, the refund then goes through:
/// 1. started
/// 2. reserve action succeeded (attempt 1)
/// 3. charge action succeeded (attempt 1)
/// 4. ship action failed, permanent (attempt 1)
/// 5. charge compensation failed, permanent (attempt 1) -> dead-lettered
/// 6. redriven
/// 7. charge compensation succeeded (attempt 2)
/// 8. reserve compensation succeeded (attempt 1)
///
/// Ends `Compensated`.
fn refund_refused_then_redriven() -> Vec<Input> {
    vec![
        Input::Started,
        ok("reserve", Action, 1),
        ok("charge", Action, 1),
        failed("ship", Action, 1, false),
        failed("charge", Compensation, 1, false),
        Input::Redriven,
        ok("charge", Compensation, 2),
        ok("reserve", Compensation, 1),
    ]
}

/// The customer cancels while the charge is in flight; the charge then succeeds:
/// 1. started
/// 2. reserve action succeeded (attempt 1)
/// 3. cancel requested -> waits for the charge in flight
/// 4. charge action succeeded (attempt 1) -> compensation begins
/// 5. reserve action succeeded again (attempt 1) -> duplicate, ignored
/// 6. charge compensation succeeded (attempt 1): refunded
/// 7. reserve compensation succeeded (attempt 1)
///
/// Ends `Compensated`; the charge took effect, so it is refunded.
fn cancelled_mid_flight() -> Vec<Input> {
    vec![
        Input::Started,
        ok("reserve", Action, 1),
        cancel("customer"),
        ok("charge", Action, 1),
        ok("reserve", Action, 1),
        ok("charge", Compensation, 1),
        ok("reserve", Compensation, 1),
    ]
}

/// The inventory service never answers:
/// 1. started
/// 2. reserve timed out (attempt 1)
/// 3. reserve retry due
/// 4. reserve timed out (attempt 2)
/// 5. reserve retry due
/// 6. reserve timed out (attempt 3) -> retries spent; the reservation may exist
/// 7. reserve compensation succeeded (attempt 1): released by the action's key (or a
///    tombstone, if it never ran)
///
/// Ends `Compensated`.
fn inventory_never_answers() -> Vec<Input> {
    vec![
        Input::Started,
        timed_out("reserve", Action, 1),
        retry_due("reserve", Action, 1),
        timed_out("reserve", Action, 2),
        retry_due("reserve", Action, 2),
        timed_out("reserve", Action, 3),
        ok("reserve", Compensation, 1),
    ]
}

/// The payment service applies the charge but answers only after skald gave up on it:
/// 1. started
/// 2. reserve action succeeded (attempt 1)
/// 3. charge timed out (attempt 1)
/// 4. charge retry due
/// 5. charge action failed, retryable `in_progress` (attempt 2: attempt 1 holds the key)
/// 6. charge retry due
/// 7. charge timed out (attempt 3) -> retries spent; the charge is in doubt
/// 8. charge compensation failed, retryable `action_in_progress` (attempt 1)
/// 9. charge action succeeded (attempt 1), late -> ignored: it is being refunded
/// 10. charge compensation retry due
/// 11. charge compensation succeeded (attempt 2): refunded by the action's key
/// 12. reserve compensation succeeded (attempt 1)
///
/// Ends `Compensated`, with the charge refunded.
fn late_charge_refunded() -> Vec<Input> {
    vec![
        Input::Started,
        ok("reserve", Action, 1),
        timed_out("charge", Action, 1),
        retry_due("charge", Action, 1),
        failed("charge", Action, 2, true),
        retry_due("charge", Action, 2),
        timed_out("charge", Action, 3),
        failed("charge", Compensation, 1, true),
        ok("charge", Action, 1),
        retry_due("charge", Compensation, 1),
        ok("charge", Compensation, 2),
        ok("reserve", Compensation, 1),
    ]
}

/// Outcome of one journaled input: its effects, or why it was ignored.
type Replayed = Result<Vec<Effect>, TransitionError>;

/// The time to apply `input` at: `t`, or for a timer input (`TimedOut`, `RetryDue`) no
/// earlier than the saga's wake-up, since the machine refuses a timer that is not due.
fn timer_time(state: &SagaState, input: &Input, t: Timestamp) -> Timestamp {
    match input {
        Input::TimedOut { .. } | Input::RetryDue { .. } => state.wake_at().map_or(t, |w| w.max(t)),
        _ => t,
    }
}

/// Replays a journal, one input per second (timers when they are due). Ignorable refusals are kept in the outcome
/// list (the shell journals and acknowledges them); any other refusal fails the test.
fn replay(def: &Definition, journal: &[Input]) -> (SagaState, Vec<Replayed>) {
    let mut state = fresh(def);
    let mut outcomes = Vec::new();
    for (i, input) in journal.iter().enumerate() {
        match transition(
            def,
            &state,
            input,
            timer_time(&state, input, at(1_000 * i as u64)),
        ) {
            Ok((next, fx)) => {
                state = next;
                outcomes.push(Ok(fx));
            }
            Err(e) => {
                assert!(
                    e.is_ignorable(),
                    "journal entry {i} ({}): {e}",
                    input.name()
                );
                outcomes.push(Err(e));
            }
        }
    }
    (state, outcomes)
}

#[test]
fn canned_journals_replay_to_their_documented_end() {
    let def = checkout();
    let def = def.definition();
    let cases: [(&str, Vec<Input>, SagaStatus); 6] = [
        (
            "all_steps_succeed",
            all_steps_succeed(),
            SagaStatus::Completed,
        ),
        (
            "flaky_then_declined",
            flaky_then_declined(),
            SagaStatus::Compensated,
        ),
        (
            "refund_refused_then_redriven",
            refund_refused_then_redriven(),
            SagaStatus::Compensated,
        ),
        (
            "cancelled_mid_flight",
            cancelled_mid_flight(),
            SagaStatus::Compensated,
        ),
        (
            "inventory_never_answers",
            inventory_never_answers(),
            SagaStatus::Compensated,
        ),
        (
            "late_charge_refunded",
            late_charge_refunded(),
            SagaStatus::Compensated,
        ),
    ];
    for (journal, inputs, status) in cases {
        let (state, outcomes) = replay(def, &inputs);
        assert_eq!(state.status, status, "{journal}");
        assert_eq!(state.pending, None, "{journal}");
        let finishes: Vec<_> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .flat_map(|fx| finished(fx))
            .collect();
        assert_eq!(finishes, vec![status], "{journal}: finished exactly once");
    }
}

#[test]
fn flaky_then_declined_keeps_the_decline_as_the_failure() {
    let def = checkout();
    let def = def.definition();
    let (state, outcomes) = replay(def, &flaky_then_declined());
    assert_eq!(state.failure, Some(StepError::new("declined", "no")));
    assert_eq!(decode(&state).done, vec!["r-reserve"]);
    assert!(outcomes.iter().all(Result::is_ok));
}

#[test]
fn refund_refused_then_redriven_refunds_with_attempt_two() {
    let def = checkout();
    let def = def.definition();
    let (state, outcomes) = replay(def, &refund_refused_then_redriven());
    assert_eq!(state.redrives, 1);
    let Ok(fx) = &outcomes[5] else {
        panic!("the re-drive is accepted: {:?}", outcomes[5]);
    };
    assert_eq!(target(the_command(fx)), ("charge", Compensation, 2));
    let Ok(fx) = &outcomes[4] else {
        panic!("the refusal is accepted: {:?}", outcomes[4]);
    };
    assert_eq!(dead_letters(fx).len(), 1);
}

#[test]
fn cancelled_mid_flight_refunds_the_charge_that_succeeded() {
    let def = checkout();
    let def = def.definition();
    let (state, outcomes) = replay(def, &cancelled_mid_flight());
    let Ok(fx) = &outcomes[3] else {
        panic!("the charge's success is accepted: {:?}", outcomes[3]);
    };
    assert_eq!(target(the_command(fx)), ("charge", Compensation, 1));
    assert!(matches!(
        outcomes[4],
        Err(TransitionError::Duplicate { .. })
    ));
    assert_eq!(
        state.failure.as_ref().map(|f| f.code.as_str()),
        Some("cancelled")
    );
    assert_eq!(decode(&state).done, vec!["r-reserve", "r-charge"]);
}

#[test]
fn late_charge_refunded_compensates_by_the_action_key() {
    let def = checkout();
    let def = def.definition();
    let (state, outcomes) = replay(def, &late_charge_refunded());
    assert_eq!(state.in_doubt, Some(1));
    let Ok(fx) = &outcomes[6] else {
        panic!("the last timeout is accepted: {:?}", outcomes[6]);
    };
    let c = the_command(fx);
    assert_eq!(target(c), ("charge", Compensation, 1));
    assert!(c.in_doubt);
    assert_eq!(c.action_key, Some(format!("{}:charge:action", saga_id())));
    assert!(
        outcomes[8]
            .as_ref()
            .is_err_and(TransitionError::is_ignorable)
    );
}

#[test]
fn inventory_never_answers_spends_exactly_three_attempts() {
    let def = checkout();
    let def = def.definition();
    let (state, outcomes) = replay(def, &inventory_never_answers());
    let sent: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .flat_map(|fx| {
            commands(fx)
                .into_iter()
                .map(|c| c.attempt)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(sent, vec![1, 2, 3, 1], "three reserves, then one release");
    assert_eq!(
        state.failure.as_ref().map(|f| f.code.as_str()),
        Some("timeout")
    );
    assert_eq!(state.in_doubt, Some(0));
}

#[test]
fn the_machine_is_deterministic() {
    let def = checkout();
    let def = def.definition();
    for journal in [
        all_steps_succeed(),
        flaky_then_declined(),
        refund_refused_then_redriven(),
        cancelled_mid_flight(),
        inventory_never_answers(),
        late_charge_refunded(),
    ] {
        assert_eq!(replay(def, &journal), replay(def, &journal));
    }
    // and one transition with identical arguments, twice
    let s = refunding(def);
    let input = Input::StepFailed {
        step: name("charge"),
        kind: Compensation,
        attempt: 1,
        retryable: true,
        error: StepError::new("busy", "later"),
        jitter: Jitter::new(0.61),
    };
    assert_eq!(
        transition(def, &s, &input, at(7_777)),
        transition(def, &s, &input, at(7_777))
    );
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

mod props {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{RngAlgorithm, TestCaseResult, TestRng, TestRunner};

    use super::*;

    /// The saga data of generated definitions: how many `on_success` handlers ran.
    #[derive(Debug, Serialize, Deserialize)]
    struct Tally {
        applied: u32,
    }

    /// A success output understood by every generated `on_success`.
    #[derive(Deserialize)]
    struct Bump {
        by: u32,
    }

    #[derive(Debug, Clone)]
    struct StepSpec {
        compensable: bool,
        on_success: bool,
        retry: RetryPolicy,
        compensation_retry: RetryPolicy,
    }

    /// An abstract input, interpreted relative to the current state.
    #[derive(Debug, Clone)]
    enum Act {
        /// Success reply to whatever is pending (or was last dead-lettered).
        Succeed,
        /// Permanent failure reply to it.
        FailPermanently,
        /// Retryable failure reply to it, with this jitter draw.
        FailRetryably(f64),
        /// Retryable `in_progress` reply to it (another delivery holds the key).
        Busy(f64),
        /// Its deadline passes (via `due_input` when a reply is awaited).
        TimeOut(f64),
        /// Its backoff ends (via `due_input` when in backoff).
        RetryDue,
        /// Replays an earlier accepted success reply.
        Duplicate(Index),
        /// A success reply for an older attempt (`true`) or another step or kind.
        Stale(Index, bool),
        Cancel,
        Redrive,
        Resume,
        /// `Started` again.
        Restart,
    }

    #[derive(Debug, Clone)]
    struct Case {
        steps: Vec<StepSpec>,
        acts: Vec<Act>,
    }

    fn policy_strategy() -> impl Strategy<Value = RetryPolicy> {
        (1u32..=4, 0.0f64..=1.0).prop_map(|(max_attempts, jitter)| RetryPolicy {
            max_attempts,
            initial_delay: Duration::from_millis(10),
            multiplier: 2.0,
            max_delay: Duration::from_millis(200),
            jitter,
        })
    }

    fn step_strategy() -> impl Strategy<Value = StepSpec> {
        (
            any::<bool>(),
            any::<bool>(),
            policy_strategy(),
            policy_strategy(),
        )
            .prop_map(
                |(compensable, on_success, retry, compensation_retry)| StepSpec {
                    compensable,
                    on_success,
                    retry,
                    compensation_retry,
                },
            )
    }

    fn act_strategy() -> impl Strategy<Value = Act> {
        prop_oneof![
            8 => Just(Act::Succeed),
            1 => Just(Act::FailPermanently),
            3 => (0.0f64..1.0).prop_map(Act::FailRetryably),
            1 => (0.0f64..1.0).prop_map(Act::Busy),
            2 => (0.0f64..1.0).prop_map(Act::TimeOut),
            4 => Just(Act::RetryDue),
            1 => any::<Index>().prop_map(Act::Duplicate),
            1 => (any::<Index>(), any::<bool>()).prop_map(|(i, old)| Act::Stale(i, old)),
            1 => Just(Act::Cancel),
            2 => Just(Act::Redrive),
            1 => Just(Act::Resume),
            1 => Just(Act::Restart),
        ]
    }

    fn case_strategy() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec(step_strategy(), 1..=8),
            prop::collection::vec(act_strategy(), 0..100),
        )
            .prop_map(|(steps, acts)| Case { steps, acts })
    }

    fn build(specs: &[StepSpec]) -> SagaDefinition<Tally> {
        specs
            .iter()
            .enumerate()
            .fold(
                SagaDefinition::<Tally>::builder("prop", 1),
                |b, (i, spec)| {
                    let mut s = Step::new(format!("s{i}"))
                        .action(format!("skald.cmd.s{i}.do"), |t: &Tally| t.applied)
                        .retry(spec.retry)
                        .compensation_retry(spec.compensation_retry)
                        .timeout(Duration::from_millis(500));
                    if spec.on_success {
                        s = s.on_success(|t: &mut Tally, b: Bump| t.applied += b.by);
                    }
                    if spec.compensable {
                        s = s.compensate(format!("skald.cmd.s{i}.undo"), |t: &Tally| t.applied);
                    }
                    b.step(s)
                },
            )
            .build()
            .expect("generated definitions are valid")
    }

    /// (step, kind) of a command; `CommandKind` is not `Ord`, its name is.
    type Key = (usize, &'static str);

    /// (status before, input name, outcome) triples seen while driving the machine.
    type Coverage = BTreeSet<(&'static str, &'static str, &'static str)>;

    fn outcome(result: &Result<Transition, TransitionError>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(TransitionError::Finished { .. }) => "finished",
            Err(TransitionError::Duplicate { .. }) => "duplicate",
            Err(TransitionError::Stale { .. }) => "stale",
            Err(TransitionError::UnknownStep { .. }) => "unknown_step",
            Err(TransitionError::NotAllowed { .. }) => "not_allowed",
            Err(TransitionError::CancelPending { .. }) => "cancel_pending",
            Err(TransitionError::Data(_)) => "data",
            Err(TransitionError::StepOutOfRange { .. }) => "step_out_of_range",
            Err(TransitionError::CorruptCounter { .. }) => "corrupt_counter",
        }
    }

    /// What the driver expects of an input, before any terminal override.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Expect {
        Accept,
        Stale,
        Duplicate,
        /// Stale or duplicate.
        Ignored,
        NotAllowed,
        /// A cancel while another waits for the action in flight.
        CancelPending,
    }

    struct Driver<'a> {
        def: &'a Definition,
        specs: &'a [StepSpec],
        state: SagaState,
        now: Timestamp,
        /// Accepted success replies, for replaying as duplicates.
        successes: Vec<Input>,
        /// Attempt numbers sent per (step, kind) in the current budget.
        budget: BTreeMap<Key, BTreeSet<u32>>,
        /// Every attempt number ever sent per (step, kind).
        sent: BTreeMap<Key, BTreeSet<u32>>,
        /// Budgets opened per (step, kind) other than by a re-drive.
        rounds: BTreeMap<Key, u32>,
        idempotency_keys: BTreeMap<Key, String>,
        message_ids: BTreeMap<String, (usize, CommandKind, u32)>,
        last_action: Option<usize>,
        last_compensation: Option<usize>,
        /// Steps whose compensation succeeded.
        compensated: BTreeSet<usize>,
        /// The model of the unknown outcome: the pending action whose attempt timed out
        /// with no definite answer since (a success or a permanent failure ends it).
        doubt: Option<usize>,
        /// A cancel was accepted: no forward step may follow.
        cancelled: bool,
    }

    impl<'a> Driver<'a> {
        fn new(def: &'a Definition, specs: &'a [StepSpec]) -> Self {
            let data = serde_json::to_value(Tally { applied: 0 }).expect("tally serializes");
            Driver {
                def,
                specs,
                state: SagaState::new(saga_id(), def, data, T0),
                now: T0,
                successes: Vec::new(),
                budget: BTreeMap::new(),
                sent: BTreeMap::new(),
                rounds: BTreeMap::new(),
                idempotency_keys: BTreeMap::new(),
                message_ids: BTreeMap::new(),
                last_action: None,
                last_compensation: None,
                compensated: BTreeSet::new(),
                doubt: None,
                cancelled: false,
            }
        }

        fn name(&self, step: usize) -> StepName {
            self.def.steps()[step].name().clone()
        }

        fn policy(&self, step: usize, kind: CommandKind) -> &RetryPolicy {
            match kind {
                Action => &self.specs[step].retry,
                Compensation => &self.specs[step].compensation_retry,
            }
        }

        /// The command replies address: the pending one, else the dead-lettered one,
        /// else (terminal) the first action.
        fn addressed(&self) -> (usize, CommandKind, u32) {
            match (&self.state.pending, &self.state.dead_letter) {
                (Some(p), _) => (p.step, p.kind, p.attempt),
                (None, Some(dl)) => (dl.step, dl.kind, dl.last_attempt),
                (None, None) => (0, Action, 1),
            }
        }

        fn success(&self, step: usize, kind: CommandKind, attempt: u32) -> Input {
            Input::StepSucceeded {
                step: self.name(step),
                kind,
                attempt,
                output: match kind {
                    Action => json!({ "by": 1 }),
                    Compensation => Value::Null,
                },
            }
        }

        fn awaiting_in(&self, s: &SagaState) -> bool {
            matches!(
                s.pending,
                Some(Pending {
                    kind: Action,
                    phase: Phase::AwaitingReply { .. },
                    ..
                })
            )
        }

        fn awaiting(&self) -> Option<Timestamp> {
            match self.state.pending?.phase {
                Phase::AwaitingReply { deadline } => Some(deadline),
                Phase::Backoff { .. } => None,
            }
        }

        fn in_backoff(&self) -> Option<Timestamp> {
            match self.state.pending?.phase {
                Phase::Backoff { due } => Some(due),
                Phase::AwaitingReply { .. } => None,
            }
        }

        /// A success's expectation: accepted for any sent attempt of what is pending, in
        /// either phase (one key, one effect); stale when nothing is.
        fn success_expect(&self) -> Expect {
            let awaited = self
                .state
                .dead_letter
                .as_ref()
                .is_some_and(DeadLetterInfo::awaits_outcome);
            if self.state.pending.is_some() || awaited {
                Expect::Accept
            } else {
                Expect::Stale
            }
        }

        /// A failure's expectation: accepted while a reply is awaited, stale otherwise.
        fn reply_expect(&self) -> Expect {
            if self.awaiting().is_some() {
                Expect::Accept
            } else {
                Expect::Stale
            }
        }

        fn plan(&mut self, act: &Act) -> Result<(Input, Expect), TestCaseError> {
            let (step, kind, attempt) = self.addressed();
            let status = self.state.status;
            Ok(match act {
                Act::Succeed => (self.success(step, kind, attempt), self.success_expect()),
                Act::FailPermanently | Act::FailRetryably(_) | Act::Busy(_) => {
                    let (retryable, draw, code) = match act {
                        Act::FailRetryably(d) => (true, *d, "boom"),
                        Act::Busy(d) => (true, *d, "in_progress"),
                        _ => (false, 0.0, "boom"),
                    };
                    let input = Input::StepFailed {
                        step: self.name(step),
                        kind,
                        attempt,
                        retryable,
                        error: StepError::new(code, "generated"),
                        jitter: Jitter::new(draw),
                    };
                    (input, self.reply_expect())
                }
                Act::TimeOut(draw) => {
                    let jitter = Jitter::new(*draw);
                    match self.awaiting() {
                        Some(deadline) => {
                            prop_assert_eq!(
                                self.state
                                    .due_input(self.def, Timestamp(deadline.0 - 1), jitter),
                                None
                            );
                            self.now = self.now.max(deadline);
                            let input = self
                                .state
                                .due_input(self.def, self.now, jitter)
                                .ok_or_else(|| TestCaseError::fail("no input at the deadline"))?;
                            prop_assert!(matches!(input, Input::TimedOut { .. }), "{input:?}");
                            (input, Expect::Accept)
                        }
                        None => {
                            let input = Input::TimedOut {
                                step: self.name(step),
                                kind,
                                attempt,
                                jitter,
                            };
                            (input, Expect::Stale)
                        }
                    }
                }
                Act::RetryDue => match self.in_backoff() {
                    Some(due) => {
                        if due.0 > 0 {
                            prop_assert_eq!(
                                self.state
                                    .due_input(self.def, Timestamp(due.0 - 1), Jitter::NONE),
                                None
                            );
                        }
                        self.now = self.now.max(due);
                        let input = self
                            .state
                            .due_input(self.def, self.now, Jitter::NONE)
                            .ok_or_else(|| TestCaseError::fail("no input after the backoff"))?;
                        prop_assert!(matches!(input, Input::RetryDue { .. }), "{input:?}");
                        (input, Expect::Accept)
                    }
                    None => {
                        let input = Input::RetryDue {
                            step: self.name(step),
                            kind,
                            attempt,
                        };
                        (input, Expect::Stale)
                    }
                },
                Act::Duplicate(i) if !self.successes.is_empty() => {
                    let input = i.get(&self.successes).clone();
                    let expect = if status == SagaStatus::Failed {
                        Expect::Stale
                    } else {
                        Expect::Duplicate
                    };
                    (input, expect)
                }
                Act::Stale(i, true)
                    if self
                        .sent
                        .get(&(step, kind.as_str()))
                        .is_some_and(|s| s.range(..attempt).next().is_some()) =>
                {
                    let older: Vec<u32> = self.sent[&(step, kind.as_str())]
                        .range(..attempt)
                        .copied()
                        .collect();
                    // a late success of an earlier attempt reports the same effect
                    (
                        self.success(step, kind, *i.get(&older)),
                        self.success_expect(),
                    )
                }
                Act::Duplicate(i) | Act::Stale(i, _) => {
                    let others: Vec<(usize, CommandKind)> = (0..self.specs.len())
                        .flat_map(|s| [(s, Action), (s, Compensation)])
                        .filter(|&t| t != (step, kind))
                        .collect();
                    let (s, k) = *i.get(&others);
                    let expect = if self.state.pending.is_none() {
                        Expect::Stale
                    } else {
                        Expect::Ignored
                    };
                    (self.success(s, k, 1), expect)
                }
                Act::Cancel => (
                    Input::CancelRequested {
                        reason: "generated".into(),
                    },
                    if status != SagaStatus::Running {
                        Expect::NotAllowed
                    } else if self.state.cancel.is_some() {
                        Expect::CancelPending
                    } else {
                        Expect::Accept
                    },
                ),
                Act::Redrive => (
                    Input::Redriven,
                    if status == SagaStatus::Failed {
                        Expect::Accept
                    } else {
                        Expect::NotAllowed
                    },
                ),
                Act::Resume => (
                    Input::Resumed,
                    if self.state.pending.is_some() {
                        Expect::Accept
                    } else {
                        Expect::NotAllowed
                    },
                ),
                Act::Restart => (Input::Started, Expect::NotAllowed),
            })
        }

        fn start(&mut self, coverage: &mut Coverage) -> TestCaseResult {
            self.feed(Input::Started, Expect::Accept, coverage)
        }

        fn act(&mut self, act: &Act, coverage: &mut Coverage) -> TestCaseResult {
            self.now = self.now.plus(Duration::from_millis(7));
            let (input, expect) = self.plan(act)?;
            self.feed(input, expect, coverage)
        }

        fn feed(
            &mut self,
            input: Input,
            expect: Expect,
            coverage: &mut Coverage,
        ) -> TestCaseResult {
            let before = self.state.clone();
            let result = transition(self.def, &self.state, &input, self.now);
            prop_assert_eq!(
                &self.state,
                &before,
                "transition never touches its argument"
            );
            coverage.insert((before.status.as_str(), input.name(), outcome(&result)));
            let result = match result {
                Ok(t) => t,
                Err(err) => return self.check_refusal(&input, expect, &err),
            };
            prop_assert!(
                expect == Expect::Accept && !before.status.is_terminal(),
                "{} accepted while {}; expected {:?}",
                input.name(),
                before.status,
                expect
            );
            // the same arguments give the same result
            let again = transition(self.def, &before, &input, self.now);
            prop_assert_eq!(again.as_ref(), Ok(&result));
            let (next, effects) = result;
            self.check_accepted(&input, &next, &effects)?;
            if before.in_doubt.is_none() && next.in_doubt.is_some() {
                coverage.insert((next.status.as_str(), "compensation", "in_doubt"));
            }
            if let Some(dl) = next.dead_letter.as_ref().filter(|d| d.in_doubt) {
                coverage.insert(("failed", "dead_letter", dl.kind.as_str()));
            }
            if before.cancel.is_none() && next.cancel.is_some() {
                coverage.insert(("running", "cancel", "waits"));
            }
            self.state = next;
            Ok(())
        }

        fn check_refusal(
            &self,
            input: &Input,
            expect: Expect,
            err: &TransitionError,
        ) -> TestCaseResult {
            let status = self.state.status;
            prop_assert!(!err.is_poison(), "{}: {err}", input.name());
            // a success is never ignored while its step's key is pending
            if let (
                Input::StepSucceeded {
                    step,
                    kind,
                    attempt,
                    ..
                },
                Some(p),
            ) = (input, self.state.pending)
            {
                prop_assert!(
                    !(self.name(p.step) == *step && p.kind == *kind && *attempt <= p.attempt),
                    "a success of the pending key was ignored: {err}"
                );
            }
            if status.is_terminal() {
                prop_assert_eq!(err, &TransitionError::Finished { status });
                prop_assert!(err.is_ignorable());
                return Ok(());
            }
            match expect {
                Expect::Accept => {
                    prop_assert!(false, "{} refused while {status}: {err}", input.name());
                }
                Expect::Stale => {
                    prop_assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
                }
                Expect::Duplicate => {
                    prop_assert!(matches!(err, TransitionError::Duplicate { .. }), "{err}");
                }
                Expect::Ignored => {
                    prop_assert!(
                        matches!(
                            err,
                            TransitionError::Duplicate { .. } | TransitionError::Stale { .. }
                        ),
                        "{err}"
                    );
                }
                Expect::NotAllowed => {
                    prop_assert_eq!(
                        err,
                        &TransitionError::NotAllowed {
                            input: input.name(),
                            status
                        }
                    );
                }
                Expect::CancelPending => {
                    prop_assert!(
                        matches!(err, TransitionError::CancelPending { .. }),
                        "{err}"
                    );
                }
            }
            prop_assert_eq!(
                err.is_ignorable(),
                matches!(
                    expect,
                    Expect::Stale | Expect::Duplicate | Expect::Ignored | Expect::CancelPending
                )
            );
            Ok(())
        }

        fn check_state(&self, s: &SagaState) -> TestCaseResult {
            let n = self.specs.len();
            prop_assert!(s.completed <= n);
            match s.status {
                SagaStatus::Created => prop_assert!(false, "Created is left by Started"),
                SagaStatus::Running | SagaStatus::Compensating => {
                    prop_assert!(
                        s.pending.is_some(),
                        "{} without a pending command",
                        s.status
                    );
                }
                SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed => {
                    prop_assert_eq!(s.pending, None);
                }
            }
            if s.status == SagaStatus::Completed {
                prop_assert_eq!(s.completed, n);
            }
            prop_assert_eq!(s.status == SagaStatus::Failed, s.dead_letter.is_some());
            if let Some(p) = s.pending {
                prop_assert!(p.step < n);
                prop_assert!(p.attempt >= p.first_attempt);
                match p.kind {
                    Action => {
                        prop_assert_eq!(s.status, SagaStatus::Running);
                        prop_assert_eq!(p.step, s.completed);
                    }
                    Compensation => {
                        prop_assert_eq!(s.status, SagaStatus::Compensating);
                        prop_assert!(p.step < s.compensation_bound());
                        prop_assert!(self.specs[p.step].compensable);
                        prop_assert!(!p.in_doubt, "only actions are in doubt");
                    }
                }
            }
            // a cancel waits only while an action is awaited (or, dead-lettered at that
            // action, until its re-drive)
            if s.cancel.is_some() && s.status != SagaStatus::Failed {
                prop_assert_eq!(s.status, SagaStatus::Running);
                prop_assert!(self.awaiting_in(s), "a cancel waits on an action in flight");
            }
            // the step in doubt is the one after the completed ones, and compensable
            if let Some(d) = s.in_doubt {
                prop_assert_eq!(d, s.completed);
                prop_assert!(self.specs[d].compensable);
            }
            // on_success ran exactly once per completed step that has one
            let applied = self.specs[..s.completed]
                .iter()
                .filter(|spec| spec.on_success)
                .count();
            let tally = Tally::deserialize(&s.data)
                .map_err(|e| TestCaseError::fail(format!("data: {e}")))?;
            prop_assert_eq!(tally.applied as usize, applied);
            // what is persisted reads back as the same state
            let json = serde_json::to_value(s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back: SagaState =
                serde_json::from_value(json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, s);
            Ok(())
        }

        fn check_accepted(
            &mut self,
            input: &Input,
            s1: &SagaState,
            fx: &[Effect],
        ) -> TestCaseResult {
            let s0 = self.state.clone();
            // the model of the unknown outcome, moved by this input (an accepted reply or
            // timer of an action always names the pending one)
            if let Some(p) = s0.pending.filter(|p| p.kind == Action) {
                match input {
                    Input::TimedOut { .. } => self.doubt = Some(p.step),
                    Input::StepFailed {
                        retryable: true,
                        error,
                        ..
                    } if IN_PROGRESS_CODES.contains(&error.code.as_str()) => {
                        self.doubt = Some(p.step)
                    }
                    Input::StepFailed {
                        retryable: false, ..
                    }
                    | Input::StepSucceeded { .. } => self.doubt = None,
                    _ => {}
                }
            }
            // the late success a dead letter in doubt waited for resolves the doubt
            if s0.status == SagaStatus::Failed && matches!(input, Input::StepSucceeded { .. }) {
                self.doubt = None;
            }
            self.check_state(s1)?;
            prop_assert_eq!(s1.updated_at, self.now);
            if let Some(p) = s1.pending.filter(|p| p.kind == Action) {
                prop_assert_eq!(p.in_doubt, self.doubt == Some(p.step), "{:?}", p);
            }

            // status moves only along the designed edges
            use SagaStatus::*;
            let edge_ok = matches!(
                (s0.status, s1.status),
                (Created, Running)
                    | (
                        Running,
                        Running | Compensating | Completed | Compensated | Failed
                    )
                    | (Compensating, Compensating | Compensated | Failed)
                    | (Failed, Compensating | Running | Completed | Compensated)
            );
            // Running -> Failed: only an in-doubt action with nothing to undo it;
            // Failed -> Running: only its forward re-drive
            if (s0.status, s1.status) == (Running, Failed) {
                let dl = s1
                    .dead_letter
                    .as_ref()
                    .ok_or_else(|| TestCaseError::fail("no dead letter"))?;
                prop_assert_eq!(dl.kind, Action);
                prop_assert!(dl.in_doubt);
                prop_assert_eq!(&dl.error.code, "in_doubt_without_compensation");
                prop_assert!(!self.specs[dl.step].compensable);
                prop_assert_eq!(Some(dl.step), self.doubt);
            }
            prop_assert!(
                edge_ok,
                "{} -> {} on {}",
                s0.status,
                s1.status,
                input.name()
            );

            // Failed ends by a re-drive, or by the late success its in-doubt action waited
            // for
            if s0.status == Failed && s1.status != Failed {
                let awaited = s0
                    .dead_letter
                    .as_ref()
                    .is_some_and(DeadLetterInfo::awaits_outcome);
                prop_assert!(
                    matches!(input, Input::Redriven)
                        || awaited && matches!(input, Input::StepSucceeded { kind: Action, .. }),
                    "{} left failed on {}",
                    s0.status,
                    input.name()
                );
            }

            // completed only grows, one at a time, on an action success
            let action_success = matches!(input, Input::StepSucceeded { kind: Action, .. });
            if action_success {
                prop_assert_eq!(s1.completed, s0.completed + 1);
            } else {
                prop_assert_eq!(s1.completed, s0.completed);
            }

            // the retry rule, exactly
            let failure = match input {
                Input::StepFailed {
                    retryable,
                    jitter,
                    error,
                    ..
                } => Some((*retryable, *jitter, error.code.clone())),
                Input::TimedOut { jitter, .. } => Some((true, *jitter, "timeout".to_owned())),
                _ => None,
            };
            if let Some((retryable, jitter, code)) = failure {
                let p = s0
                    .pending
                    .ok_or_else(|| TestCaseError::fail("failure without pending"))?;
                let used = p.attempt - p.first_attempt + 1;
                // a cancel that waited for this action's outcome allows no retry
                let delay = if retryable && s0.cancel.is_none() {
                    self.policy(p.step, p.kind).next_delay(used, jitter)
                } else {
                    None
                };
                match (delay, p.kind) {
                    (Some(d), _) => {
                        prop_assert_eq!(s1.status, s0.status);
                        prop_assert_eq!(
                            s1.pending,
                            Some(Pending {
                                phase: Phase::Backoff {
                                    due: self.now.plus(d)
                                },
                                in_doubt: p.kind == Action && self.doubt == Some(p.step),
                                ..p
                            })
                        );
                    }
                    (None, Action) => {
                        prop_assert!(
                            matches!(s1.status, Compensating | Compensated | Failed),
                            "{}",
                            s1.status
                        );
                        let want = if s0.cancel.is_some() {
                            "cancelled"
                        } else {
                            code.as_str()
                        };
                        prop_assert_eq!(s1.failure.as_ref().map(|f| f.code.as_str()), Some(want));
                    }
                    (None, Compensation) => {
                        prop_assert_eq!(s1.status, Failed);
                        let dl = s1
                            .dead_letter
                            .as_ref()
                            .ok_or_else(|| TestCaseError::fail("no dead letter"))?;
                        prop_assert_eq!((dl.step, dl.kind), (p.step, p.kind));
                        prop_assert_eq!(dl.attempts, used);
                        prop_assert_eq!(dl.last_attempt, p.attempt);
                        prop_assert_eq!(&dl.error.code, &code);
                        if retryable {
                            prop_assert_eq!(used, self.policy(p.step, p.kind).max_attempts);
                        }
                    }
                }
            }

            // a resume re-sends the attempt in flight, or only re-arms a backoff
            if matches!(input, Input::Resumed) {
                let p = s0
                    .pending
                    .ok_or_else(|| TestCaseError::fail("resumed without pending"))?;
                match p.phase {
                    Phase::Backoff { due } => {
                        prop_assert_eq!(
                            s1,
                            &SagaState {
                                updated_at: self.now,
                                ..s0.clone()
                            }
                        );
                        prop_assert!(fx.is_empty(), "nothing to send: {:?}", fx);
                        prop_assert_eq!(s1.wake_at(), Some(due));
                    }
                    Phase::AwaitingReply { .. } => {
                        let c = commands(fx);
                        prop_assert_eq!(c.len(), 1);
                        prop_assert_eq!(c[0].attempt, p.attempt);
                        prop_assert_eq!(s1.status, s0.status);
                    }
                }
            }

            // a re-drive opens a fresh budget for the dead-lettered command
            if matches!(input, Input::Redriven) {
                let dl = s0
                    .dead_letter
                    .as_ref()
                    .ok_or_else(|| TestCaseError::fail("re-drive without dead letter"))?;
                self.budget.remove(&(dl.step, dl.kind.as_str()));
                prop_assert_eq!(s1.redrives, s0.redrives + 1);
            }

            // (before the next command, which is checked against it)
            if let Input::StepSucceeded {
                kind: Compensation, ..
            } = input
            {
                let p = s0
                    .pending
                    .ok_or_else(|| TestCaseError::fail("success without pending"))?;
                prop_assert!(self.compensated.insert(p.step), "compensated twice");
            }

            let sends = commands(fx);
            prop_assert!(sends.len() <= 1, "one command at a time: {sends:?}");
            for c in sends {
                self.check_command(input, s1, c)?;
            }

            if matches!(input, Input::StepSucceeded { .. }) {
                self.successes.push(input.clone());
            }

            // a command just sent is what the saga wakes up for: its deadline
            if let Some(c) = commands(fx).first() {
                prop_assert_eq!(s1.wake_at(), Some(c.deadline));
            }

            // terminal effects
            let ends = finished(fx);
            if s1.status.is_terminal() {
                prop_assert_eq!(ends, vec![s1.status]);
            } else {
                prop_assert!(ends.is_empty());
            }
            let letters = dead_letters(fx);
            if s1.status == Failed {
                prop_assert_eq!(
                    letters,
                    vec![
                        s1.dead_letter
                            .as_ref()
                            .ok_or_else(|| TestCaseError::fail("no dead letter"))?
                    ]
                );
            } else {
                prop_assert!(letters.is_empty());
            }

            // compensated means: exactly the steps that may have taken effect and have a
            // compensation were undone: the completed ones and the one in doubt
            if s1.status == Compensated {
                let expected: BTreeSet<usize> = (0..s1.completed)
                    .filter(|&i| self.specs[i].compensable)
                    .chain(self.doubt)
                    .collect();
                prop_assert_eq!(&self.compensated, &expected);
                prop_assert_eq!(s1.in_doubt, self.doubt);
            }
            // a cancel's intent holds: nothing goes forward after it, and a saga it
            // waited on completes only when the step it waited for was the last
            if matches!(input, Input::CancelRequested { .. }) {
                self.cancelled = true;
            }
            if self.cancelled && s1.status == Completed {
                let waited = s0
                    .pending
                    .map(|p| p.step)
                    .or(s0.dead_letter.as_ref().map(|d| d.step));
                prop_assert_eq!(
                    waited,
                    Some(self.specs.len() - 1),
                    "completed after a cancel"
                );
            }
            // compensation began around exactly the modelled doubt
            if s0.status == Running && s1.status == Compensating {
                prop_assert_eq!(s1.in_doubt, self.doubt);
            }
            if s1.status == Completed {
                prop_assert!(self.compensated.is_empty());
                prop_assert_eq!(self.last_compensation, None);
            }
            Ok(())
        }

        fn check_command(&mut self, input: &Input, s1: &SagaState, c: &Command) -> TestCaseResult {
            let step = self
                .def
                .step_index(c.step.as_str())
                .ok_or_else(|| TestCaseError::fail("command for an unknown step"))?;
            let key: Key = (step, c.kind.as_str());
            let p = s1
                .pending
                .ok_or_else(|| TestCaseError::fail("sent but nothing pending"))?;
            prop_assert_eq!((p.step, p.kind, p.attempt), (step, c.kind, c.attempt));
            prop_assert_eq!(
                p.phase,
                Phase::AwaitingReply {
                    deadline: c.deadline
                }
            );
            prop_assert_eq!(c.saga_id, s1.id);

            // one idempotency key per (step, kind); one message id per attempt
            let ikey = self
                .idempotency_keys
                .entry(key)
                .or_insert_with(|| c.idempotency_key.clone());
            prop_assert_eq!(&*ikey, &c.idempotency_key);
            let mid = self
                .message_ids
                .entry(c.message_id.clone())
                .or_insert((step, c.kind, c.attempt));
            prop_assert_eq!(*mid, (step, c.kind, c.attempt), "message id reused");

            // attempt numbering: a resend repeats one, otherwise the next number
            let sent = self.sent.entry(key).or_default();
            let resend = sent.contains(&c.attempt);
            if resend {
                prop_assert!(
                    matches!(input, Input::Resumed),
                    "resent on {}",
                    input.name()
                );
            } else {
                let next = sent.last().map_or(1, |a| a + 1);
                prop_assert_eq!(c.attempt, next);
                sent.insert(c.attempt);
                if c.attempt == p.first_attempt && !matches!(input, Input::Redriven) {
                    let rounds = self.rounds.entry(key).or_default();
                    *rounds += 1;
                    prop_assert_eq!(*rounds, 1, "{:?} started twice without a re-drive", key);
                }
            }
            // within one budget, never more than max_attempts
            let max = self.policy(step, c.kind).max_attempts as usize;
            let budget = self.budget.entry(key).or_default();
            budget.insert(c.attempt);
            prop_assert!(budget.len() <= max, "{key:?}: {budget:?} > {max}");

            match c.kind {
                Action => {
                    prop_assert!(
                        !self.cancelled || matches!(input, Input::Resumed | Input::Redriven),
                        "an action sent after a cancel, on {}",
                        input.name()
                    );
                    prop_assert_eq!(s1.status, SagaStatus::Running);
                    // steps[0..step] succeeded, and actions go in ascending order
                    prop_assert_eq!(step, s1.completed);
                    match self.last_action {
                        None => prop_assert_eq!(step, 0),
                        Some(last) => prop_assert!(step == last || step == last + 1),
                    }
                    self.last_action = Some(step);
                }
                Compensation => {
                    prop_assert_eq!(s1.status, SagaStatus::Compensating);
                    prop_assert!(
                        step < s1.compensation_bound(),
                        "compensating a step that cannot have taken effect"
                    );
                    prop_assert!(self.specs[step].compensable);
                    prop_assert!(!self.compensated.contains(&step), "already compensated");
                    // the participant undoes by the action's key, told whether it is known
                    prop_assert_eq!(
                        c.action_key.clone(),
                        Some(format!("{}:{}:action", s1.id, c.step))
                    );
                    prop_assert_eq!(c.in_doubt, s1.in_doubt == Some(step));
                    // every compensable step above it that may have taken effect was
                    // compensated first
                    for j in step + 1..s1.compensation_bound() {
                        if self.specs[j].compensable {
                            prop_assert!(
                                self.compensated.contains(&j),
                                "{j} skipped before {step}"
                            );
                        }
                    }
                    if let Some(last) = self.last_compensation {
                        prop_assert!(
                            step == last || (step < last && self.compensated.contains(&last)),
                            "compensation of {step} after {last}"
                        );
                    }
                    self.last_compensation = Some(step);
                }
            }
            Ok(())
        }
    }

    fn drive(case: &Case, coverage: &mut Coverage) -> TestCaseResult {
        let def = build(&case.steps);
        let def = def.definition();
        let mut driver = Driver::new(def, &case.steps);
        driver.start(coverage)?;
        for act in &case.acts {
            driver.act(act, coverage)?;
        }
        Ok(())
    }

    fn config(cases: u32) -> ProptestConfig {
        let mut config = ProptestConfig::with_cases(cases);
        // no regression files next to the sources; a failure prints the minimal case
        config.failure_persistence = None;
        config
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Random definitions under random inputs keep every design invariant.
        #[test]
        fn random_sagas_keep_the_invariants(case in case_strategy()) {
            drive(&case, &mut Coverage::new())?;
        }
    }

    /// The mutation check: the invariants above fail on the two wrong outcomes this
    /// machine used to produce, so the property test can catch them coming back.
    #[test]
    fn the_invariants_catch_the_old_wrong_outcomes() {
        let policy = RetryPolicy {
            max_attempts: 2,
            initial_delay: Duration::from_millis(10),
            multiplier: 2.0,
            max_delay: Duration::from_millis(200),
            jitter: 1.0,
        };
        let spec = StepSpec {
            compensable: true,
            on_success: true,
            retry: policy,
            compensation_retry: policy,
        };
        let specs = vec![spec.clone(), spec];
        let def = build(&specs);
        let def = def.definition();
        let mut coverage = Coverage::new();
        let mut d = Driver::new(def, &specs);
        d.start(&mut coverage).expect("start");
        for act in [Act::Succeed, Act::TimeOut(0.5), Act::RetryDue] {
            d.act(&act, &mut coverage).expect("accepted");
        }
        // Mutant 1: a late success of the earlier attempt refused as stale.
        let late = d.success(1, Action, 1);
        let stale = TransitionError::Stale {
            input: "step_succeeded",
            step: d.name(1),
            kind: Action,
            attempt: 1,
            expected: "mutant".into(),
        };
        assert!(
            d.check_refusal(&late, Expect::Accept, &stale).is_err(),
            "a refused success of the pending key must fail the invariants"
        );
        // Mutant 2: the last attempt times out and compensation skips the step in doubt
        // (the old rule: only completed steps).
        let (input, _) = d.plan(&Act::TimeOut(0.5)).expect("plan");
        let (mut s1, fx) = transition(def, &d.state, &input, d.now).expect("accepted");
        assert_eq!(s1.in_doubt, Some(1), "the real machine compensates it");
        s1.in_doubt = None;
        s1.pending = Some(Pending {
            step: 0,
            kind: Compensation,
            ..s1.pending.expect("pending")
        });
        assert!(
            d.check_accepted(&input, &s1, &fx).is_err(),
            "compensating around the step in doubt must fail the invariants"
        );
    }

    /// Transition coverage: over a fixed seed, the generator reaches every transition
    /// the property above is meant to check (so a generator change cannot silently stop
    /// testing one).
    #[test]
    fn the_generator_covers_every_transition() {
        let mut runner = TestRunner::new_with_rng(
            config(512),
            TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
        );
        let strategy = case_strategy();
        let mut coverage = Coverage::new();
        for _ in 0..512 {
            let case = strategy
                .new_tree(&mut runner)
                .expect("the strategy always generates")
                .current();
            if let Err(e) = drive(&case, &mut coverage) {
                panic!("{e}\n{case:?}");
            }
        }

        let mut required: Vec<(&str, &str, &str)> = vec![
            ("created", "started", "ok"),
            ("running", "step_succeeded", "ok"),
            ("running", "step_failed", "ok"),
            ("running", "timed_out", "ok"),
            ("running", "retry_due", "ok"),
            ("running", "cancel_requested", "ok"),
            ("running", "resumed", "ok"),
            ("running", "step_succeeded", "duplicate"),
            ("running", "step_succeeded", "stale"),
            ("running", "retry_due", "stale"),
            ("running", "redriven", "not_allowed"),
            ("running", "started", "not_allowed"),
            ("running", "cancel_requested", "cancel_pending"),
            ("running", "cancel", "waits"),
            ("compensating", "compensation", "in_doubt"),
            ("failed", "dead_letter", "action"),
            ("failed", "step_succeeded", "ok"),
            ("failed", "redriven", "ok"),
            ("compensating", "step_succeeded", "ok"),
            ("compensating", "step_failed", "ok"),
            ("compensating", "timed_out", "ok"),
            ("compensating", "retry_due", "ok"),
            ("compensating", "resumed", "ok"),
            ("compensating", "step_succeeded", "duplicate"),
            ("compensating", "step_succeeded", "stale"),
            ("compensating", "cancel_requested", "not_allowed"),
            ("compensating", "redriven", "not_allowed"),
            ("failed", "redriven", "ok"),
            ("failed", "step_succeeded", "stale"),
            ("failed", "cancel_requested", "not_allowed"),
            ("failed", "resumed", "not_allowed"),
        ];
        for status in ["completed", "compensated"] {
            for input in [
                "started",
                "step_succeeded",
                "step_failed",
                "timed_out",
                "retry_due",
                "cancel_requested",
                "redriven",
                "resumed",
            ] {
                required.push((status, input, "finished"));
            }
        }
        let missing: Vec<_> = required
            .into_iter()
            .filter(|t| !coverage.contains(t))
            .collect();
        assert!(
            missing.is_empty(),
            "never exercised: {missing:?}\nseen: {coverage:?}"
        );
    }
}

#[test]
fn timers_that_are_not_yet_due_are_stale() {
    let def = checkout();
    let def = def.definition();
    let s = started(def);
    let deadline = s.wake_at().expect("deadline");
    let early = Timestamp(deadline.0 - 1);
    let err = refuse(def, &s, &timed_out("reserve", Action, 1), early);
    assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
    assert!(err.is_ignorable());
    let (s, _) = apply(def, &s, &timed_out("reserve", Action, 1), deadline);
    let due = s.wake_at().expect("backoff due");
    let err = refuse(
        def,
        &s,
        &retry_due("reserve", Action, 1),
        Timestamp(due.0 - 1),
    );
    assert!(matches!(err, TransitionError::Stale { .. }), "{err}");
    let (s, fx) = apply(def, &s, &retry_due("reserve", Action, 1), due);
    assert_eq!(commands(&fx)[0].attempt, 2);
    assert!(s.wake_at().is_some());
}

// ---------------------------------------------------------------------------------------
// Stored states that do not fit their definition: typed refusals, never a panic
// ---------------------------------------------------------------------------------------

/// Every kind of input, aimed at `step` where one names a step.
fn inputs_at(step: &str) -> Vec<Input> {
    vec![
        Input::Started,
        ok(step, Action, 1),
        ok(step, Compensation, 1),
        failed(step, Action, 1, true),
        failed(step, Compensation, 1, false),
        timed_out(step, Action, 1),
        retry_due(step, Action, 1),
        cancel("changed my mind"),
        Input::Redriven,
        Input::Resumed,
        Input::DataUnreadable {
            error: StepError::new("data_unreadable", "no upcaster"),
        },
    ]
}

/// checkout() cut to its first two steps, as if edited in place (same type, same
/// version): a saga stored waiting on `ship` (step 2) no longer fits it.
fn checkout_cut_to_two_steps() -> SagaDefinition<Order> {
    saga(vec![step("reserve", true), step("charge", true)])
}

#[test]
fn a_pending_step_past_a_definition_edited_to_fewer_steps_is_a_typed_refusal() {
    let full = checkout();
    let s = run(
        full.definition(),
        started(full.definition()),
        &[ok("reserve", Action, 1), ok("charge", Action, 1)],
    );
    assert_eq!(pending(&s).step, 2, "waiting on ship");
    let cut = checkout_cut_to_two_steps();
    let def = cut.definition();
    for input in inputs_at("reserve").into_iter().chain(inputs_at("ship")) {
        let err = refuse(def, &s, &input, at(60_000));
        assert_eq!(
            err,
            TransitionError::StepOutOfRange {
                saga_type: def.saga_type().clone(),
                version: 3,
                field: "pending.step",
                index: 2,
                steps: 2,
            },
            "{}",
            input.name()
        );
        assert!(err.is_poison() && err.is_corrupt_state() && !err.is_ignorable());
        let text = err.to_string();
        assert!(
            text.contains("pending.step is 2") && text.contains("has 2 step(s)"),
            "{text}"
        );
    }
    // The wake-up it had is not turned into an input either.
    assert_eq!(s.due_input(def, at(3_600_000), Jitter::NONE), None);
}

#[test]
fn a_dead_letter_past_the_definition_refuses_its_redrive() {
    let full = checkout();
    let def = full.definition();
    // The refund of charge (step 1) fails for good: dead-lettered at step 1.
    let s = run(
        def,
        refunding(def),
        &[failed("charge", Compensation, 1, false)],
    );
    assert_eq!(s.status, SagaStatus::Failed);
    let mut s = s;
    let mut dl = s.dead_letter.clone().expect("dead-lettered");
    dl.step = 7;
    s.dead_letter = Some(dl);
    for input in inputs_at("charge") {
        let err = refuse(def, &s, &input, at(60_000));
        assert!(
            matches!(
                err,
                TransitionError::StepOutOfRange {
                    field: "dead_letter.step",
                    index: 7,
                    steps: 3,
                    ..
                }
            ),
            "{}: {err}",
            input.name()
        );
    }
}

#[test]
fn completed_and_in_doubt_past_the_definition_are_typed_refusals() {
    let full = checkout();
    let def = full.definition();
    let base = run(def, started(def), &[ok("reserve", Action, 1)]);

    let mut s = base.clone();
    s.completed = 4;
    let err = refuse(def, &s, &ok("charge", Action, 1), at(60_000));
    assert!(
        matches!(
            err,
            TransitionError::StepOutOfRange {
                field: "completed",
                index: 4,
                steps: 3,
                ..
            }
        ),
        "{err}"
    );

    let mut s = base.clone();
    s.completed = usize::MAX;
    let err = refuse(def, &s, &cancel("x"), at(60_000));
    assert!(
        matches!(
            err,
            TransitionError::StepOutOfRange {
                field: "completed",
                ..
            }
        ),
        "{err}"
    );

    let mut s = base.clone();
    s.in_doubt = Some(3);
    let err = refuse(def, &s, &timed_out("charge", Action, 1), at(60_000));
    assert!(
        matches!(
            err,
            TransitionError::StepOutOfRange {
                field: "in_doubt",
                index: 3,
                ..
            }
        ),
        "{err}"
    );

    // Every step completed and one in doubt: the compensation bound passes the end.
    let mut s = base;
    s.status = SagaStatus::Compensating;
    s.completed = 3;
    s.in_doubt = Some(2);
    let err = refuse(def, &s, &Input::Resumed, at(60_000));
    assert!(
        matches!(
            err,
            TransitionError::StepOutOfRange {
                field: "completed",
                index: 3,
                steps: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn attempt_counters_that_no_transition_produces_are_typed_refusals() {
    let full = checkout();
    let def = full.definition();
    let s = started(def);
    let with = |f: &dyn Fn(&mut Pending)| {
        let mut s = s.clone();
        let mut p = pending(&s);
        f(&mut p);
        s.pending = Some(p);
        s
    };
    let cases: Vec<(SagaState, &str, u32)> = vec![
        (with(&|p| p.attempt = 0), "pending.attempt", 0),
        (
            with(&|p| {
                p.attempt = u32::MAX;
                p.phase = Phase::Backoff { due: at(1) };
            }),
            "pending.attempt",
            u32::MAX,
        ),
        (with(&|p| p.first_attempt = 0), "pending.first_attempt", 0),
        (
            with(&|p| {
                p.attempt = 2;
                p.first_attempt = 5;
            }),
            "pending.first_attempt",
            5,
        ),
    ];
    for (state, field, value) in cases {
        for input in inputs_at("reserve") {
            let err = refuse(def, &state, &input, at(60_000));
            assert!(
                matches!(
                    &err,
                    TransitionError::CorruptCounter { field: f, value: v, .. }
                        if *f == field && *v == value
                ),
                "{field}={value}, {}: {err}",
                input.name()
            );
            assert!(err.is_poison() && err.is_corrupt_state());
        }
    }

    // A dead letter whose last attempt has no successor: its re-drive is refused.
    let mut failed_state = run(
        def,
        refunding(def),
        &[failed("charge", Compensation, 1, false)],
    );
    let mut dl = failed_state.dead_letter.clone().expect("dead-lettered");
    dl.last_attempt = u32::MAX;
    failed_state.dead_letter = Some(dl);
    let err = refuse(def, &failed_state, &Input::Redriven, at(60_000));
    assert!(
        matches!(
            err,
            TransitionError::CorruptCounter {
                field: "dead_letter.last_attempt",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn counters_at_their_limits_saturate_instead_of_overflowing() {
    // attempts_used on a budget opened after the attempt (a row, or a late success
    // read before the budget): at least 1, never an underflow.
    let p = Pending {
        step: 0,
        kind: Action,
        attempt: 2,
        first_attempt: 9,
        phase: Phase::Backoff { due: T0 },
        in_doubt: false,
    };
    assert_eq!(p.attempts_used(), 1);
    let p = Pending {
        attempt: u32::MAX,
        first_attempt: 0,
        ..p
    };
    assert_eq!(p.attempts_used(), u32::MAX);
    // A compensation bound at the top of usize.
    let def = checkout();
    let mut s = fresh(def.definition());
    s.completed = usize::MAX;
    s.in_doubt = Some(0);
    assert_eq!(s.compensation_bound(), usize::MAX);

    // A re-drive count at its maximum stays there.
    let def = def.definition();
    let mut s = run(
        def,
        refunding(def),
        &[failed("charge", Compensation, 1, false)],
    );
    s.redrives = u32::MAX;
    let (s, _) = apply(def, &s, &Input::Redriven, at(60_000));
    assert_eq!(s.redrives, u32::MAX);
    assert_eq!(s.status, SagaStatus::Compensating);

    // A late success for an attempt before the dead letter's budget (the wire says
    // attempt 1, the budget opened at 4): accepted, no underflow.
    let mut s = run(
        def,
        started(def),
        &[
            timed_out("reserve", Action, 1),
            retry_due("reserve", Action, 1),
        ],
    );
    s.status = SagaStatus::Failed;
    s.pending = None;
    s.dead_letter = Some(DeadLetterInfo {
        step: 0,
        step_name: name("reserve"),
        kind: Action,
        error: StepError::new(IN_DOUBT_WITHOUT_COMPENSATION, "unknown"),
        attempts: 2,
        last_attempt: 5,
        in_doubt: true,
    });
    let (s, _) = apply(def, &s, &ok("reserve", Action, 1), at(60_000));
    assert_eq!(s.status, SagaStatus::Running);
    assert_eq!(s.completed, 1);
}

mod damaged_rows {
    use proptest::prelude::*;

    use super::*;

    /// Indexes around a 3-step definition's range, and the extremes.
    fn index() -> impl Strategy<Value = usize> {
        prop_oneof![0usize..6, Just(usize::MAX), Just(usize::MAX - 1)]
    }

    /// Attempt counters around the small values and the extremes.
    fn counter() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..6, Just(u32::MAX), Just(u32::MAX - 1)]
    }

    fn status() -> impl Strategy<Value = SagaStatus> {
        prop_oneof![
            Just(SagaStatus::Created),
            Just(SagaStatus::Running),
            Just(SagaStatus::Compensating),
            Just(SagaStatus::Failed),
        ]
    }

    #[derive(Debug, Clone)]
    struct Damage {
        status: SagaStatus,
        completed: usize,
        pending: Option<(usize, bool, u32, u32, bool)>,
        in_doubt: Option<usize>,
        dead_letter: Option<(usize, u32, u32)>,
        redrives: u32,
    }

    fn damage() -> impl Strategy<Value = Damage> {
        (
            status(),
            index(),
            proptest::option::of((index(), any::<bool>(), counter(), counter(), any::<bool>())),
            proptest::option::of(index()),
            proptest::option::of((index(), counter(), counter())),
            counter(),
        )
            .prop_map(
                |(status, completed, pending, in_doubt, dead_letter, redrives)| Damage {
                    status,
                    completed,
                    pending,
                    in_doubt,
                    dead_letter,
                    redrives,
                },
            )
    }

    fn damaged(def: &Definition, d: &Damage) -> SagaState {
        let mut s = fresh(def);
        s.status = d.status;
        s.completed = d.completed;
        s.in_doubt = d.in_doubt;
        s.redrives = d.redrives;
        s.pending =
            d.pending.map(
                |(step, compensation, attempt, first_attempt, backoff)| Pending {
                    step,
                    kind: if compensation { Compensation } else { Action },
                    attempt,
                    first_attempt,
                    phase: if backoff {
                        Phase::Backoff { due: T0 }
                    } else {
                        Phase::AwaitingReply { deadline: T0 }
                    },
                    in_doubt: true,
                },
            );
        s.dead_letter = d
            .dead_letter
            .map(|(step, attempts, last_attempt)| DeadLetterInfo {
                step,
                step_name: name("reserve"),
                kind: Action,
                error: StepError::new(IN_DOUBT_WITHOUT_COMPENSATION, "unknown"),
                attempts,
                last_attempt,
                in_doubt: true,
            });
        s
    }

    proptest! {
        #![proptest_config({
            let mut c = ProptestConfig::with_cases(512);
            c.failure_persistence = None;
            c
        })]

        /// Whatever indexes and counters a stored row holds, every input gives a state
        /// that fits the definition or a refusal: never a panic.
        #[test]
        fn damaged_rows_never_panic(
            d in damage(),
            step_name in prop_oneof![Just("reserve"), Just("charge"), Just("ship")],
            attempt in counter(),
        ) {
            let full = checkout();
            let def = full.definition();
            let state = damaged(def, &d);
            let mut inputs = inputs_at(step_name);
            inputs.push(ok(step_name, Action, attempt));
            inputs.push(ok(step_name, Compensation, attempt));
            inputs.push(failed(step_name, Action, attempt, true));
            inputs.push(timed_out(step_name, Compensation, attempt));
            inputs.push(retry_due(step_name, Action, attempt));
            for input in &inputs {
                let _ = state.due_input(def, at(10_000_000), Jitter::NONE);
                match transition(def, &state, input, at(10_000_000)) {
                    Ok((next, _)) if !next.status.is_terminal() => {
                        // What it leads to names steps of the definition (an attempt
                        // counted up to its maximum is refused on the next input).
                        let check = check_state(def, &next);
                        prop_assert!(
                            matches!(check, Ok(()) | Err(TransitionError::CorruptCounter { .. })),
                            "{:?}",
                            check
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Refused: the message says why; nothing else to check.
                        let _ = e.to_string();
                    }
                }
            }
        }
    }
}
