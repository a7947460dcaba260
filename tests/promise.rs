//! The saga promise at its edges, end to end on every backend (memory, SQLite, SQLite +
//! NATS, PostgreSQL + NATS): a saga that ends `compensated` holds no live effect at any
//! participant, checked from the participants' own records, when
//!
//! 1. every attempt of an action times out (the participant applies it but answers only
//!    after skald's whole retry budget),
//! 2. a cancel arrives while an action is in flight,
//! 3. a success for an earlier attempt arrives late,
//! 4. a success's output cannot be decoded,
//! 5. a `retryable` answer and then a `success` come for one attempt,
//! 6. a compensation reaches the participant before its action.
//!
//! The simulated services run behind the participant helper's TCC fence; the fence
//! itself (two replicas racing on one key, SQLite and PostgreSQL) is tests/fence.rs.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use skald::Applied;
use skald::ids::{CommandKind, SagaId};
use skald::journal::{Ignored, JournalRecord, Transition};
use skald::machine::{Command, Input, SagaStatus, Timestamp};
use skald::participant::{self, Fence, MemoryFence, ParticipantHandle, ParticipantOptions};
use skald::ports::{Bus, Message, SagaStore};
use skald::retry::RetryPolicy;
use skald::wire::{self, IncomingCommand, Outcome};
use skald::{Runtime, SagaOutcome};
use skald_sagas::checkout::{
    Checkout, CheckoutTiming, LineItem, check_consistency, checkout_definition, subjects,
};
use skald_sagas::sim::{Ledger, MemoryLedger, SimConfig, SimServices};
use tokio::sync::{mpsc::Receiver, watch};

on_every_backend!(
    an_action_that_times_out_on_every_attempt_is_compensated_by_its_key,
    a_cancel_in_flight_waits_for_the_action_and_refunds_it,
    a_late_success_of_an_earlier_attempt_completes_the_step,
    a_retryable_then_a_success_for_one_attempt_both_reach_the_saga,
    an_undecodable_success_dead_letters_the_saga_until_redriven,
    a_compensation_before_its_action_refuses_the_action,
);

/// Every step's reply timeout here: short, so the whole retry budget passes quickly.
const TIMEOUT: Duration = Duration::from_millis(300);

/// Actions try 3 times; compensations are patient (a late action may hold its key).
fn timing() -> CheckoutTiming {
    CheckoutTiming {
        retry: RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(10),
            multiplier: 2.0,
            max_delay: Duration::from_millis(40),
            jitter: 1.0,
        },
        compensation_retry: RetryPolicy {
            max_attempts: 20,
            initial_delay: Duration::from_millis(20),
            multiplier: 2.0,
            max_delay: Duration::from_millis(200),
            jitter: 1.0,
        },
        timeout: TIMEOUT,
    }
}

/// The longest an action's retry budget lasts under [`timing`]: every attempt timing
/// out, with the longest backoffs.
fn budget() -> Duration {
    TIMEOUT * 3 + Duration::from_millis(10 + 20)
}

fn order(n: usize) -> Checkout {
    Checkout::new(
        format!("promise-{n}"),
        "customer",
        vec![LineItem {
            sku: "sku-1".into(),
            quantity: 1,
        }],
        1_000,
    )
}

/// What a test runs: the runtime, the simulated services' records, and their fence.
struct Env {
    backend: Resources,
    runtime: Runtime,
    checkout: skald::definition::SagaDefinition<Checkout>,
    bus: Arc<dyn Bus>,
    ledger: MemoryLedger,
    fence: Arc<dyn Fence>,
    services: SimServices,
    outcomes: Receiver<SagaOutcome>,
    participants: Vec<ParticipantHandle>,
    /// Charges wait while this is `false` (see [`Env::gate_charges`]).
    charges_open: Arc<watch::Sender<bool>>,
}

impl Env {
    /// The runtime on `kind` and the services named in `only`, with `config`.
    async fn start(kind: Backend, config: SimConfig, only: &[&str]) -> Env {
        let backend = Resources::new(kind).await;
        let bus = backend.bus().await;
        let ledger = MemoryLedger::new();
        let services = SimServices::new(Arc::new(ledger.clone()), config);
        let checkout = checkout_definition(timing()).expect("valid definition");
        let runtime = Runtime::builder()
            .store(Arc::clone(&backend.store))
            .bus(Arc::clone(&bus))
            .register(&checkout)
            .options(options())
            .reply_keys(test_reply_keys())
            .start()
            .await
            .expect("runtime starts");
        let outcomes = runtime.outcomes();
        let mut env = Env {
            backend,
            runtime,
            checkout,
            bus,
            ledger,
            fence: Arc::new(MemoryFence::new()),
            services,
            outcomes,
            participants: Vec::new(),
            charges_open: Arc::new(watch::channel(true).0),
        };
        for name in only {
            env.serve(name, subject_of(name), name).await;
        }
        env
    }

    /// The runtime on `kind` with inventory and payment only, and one saga started and
    /// waiting on its shipment (the test plays the shipping service by hand).
    async fn awaiting_shipping(kind: Backend) -> (Env, SagaId) {
        let env = Env::start(
            kind,
            reliable_with(0.0, Duration::ZERO),
            &["inventory", "payment"],
        )
        .await;
        let id = env.start_order(0).await;
        wait_saga(env.store(), id, "shipping", |s| {
            s.state.pending.is_some_and(|p| p.step == 2)
        })
        .await;
        (env, id)
    }

    /// Serves the simulated `service` on `subject` in consumer group `group`, behind the
    /// shared fence, charges waiting while the gate is closed.
    async fn serve(&mut self, service: &str, subject: &str, group: &str) {
        let held = self.services.clone();
        let options = ParticipantOptions {
            concurrency: Some(64),
            fence: Some(Arc::clone(&self.fence)),
            hold_reply: Some(Arc::new(move |cmd: &IncomingCommand| held.hold_reply(cmd))),
            ..ParticipantOptions::default()
        };
        let services = self.services.clone();
        let gate = Arc::clone(&self.charges_open);
        let _ = service;
        let handle = participant::serve_with(
            Arc::clone(&self.bus),
            subject,
            group,
            options,
            move |cmd: IncomingCommand| {
                let services = services.clone();
                let mut open = gate.subscribe();
                async move {
                    if cmd.subject == subjects::CHARGE {
                        // Err only when the sender is gone: the test ended.
                        let _ = open.wait_for(|open| *open).await;
                    }
                    services.handle(cmd).await
                }
            },
        )
        .await
        .expect("participant starts");
        self.participants.push(handle);
    }

    /// Charges (already claimed by the fence) wait until [`Env::open_charges`].
    fn gate_charges(&self) {
        self.charges_open.send_replace(false);
    }

    fn open_charges(&self) {
        self.charges_open.send_replace(true);
    }

    async fn start_order(&self, n: usize) -> SagaId {
        self.runtime
            .start_saga(&self.checkout, &order(n))
            .await
            .expect("saga starts")
            .id()
    }

    fn store(&self) -> &dyn SagaStore {
        self.backend.store.as_ref()
    }

    /// Waits for the outcomes of `ids`.
    async fn settle(&mut self, ids: &[SagaId]) -> Vec<SagaOutcome> {
        await_outcomes(&mut self.outcomes, ids).await
    }

    /// The participants' records hold no live effect on a compensated saga and exactly
    /// one of each on a completed one.
    async fn assert_consistent(&self, ids: &[SagaId]) {
        let mut sagas = Vec::new();
        for id in ids {
            let s = self.store().load(*id).await.expect("load").expect("saga");
            sagas.push((*id, s.state.status));
        }
        let records = self.ledger.records().await.expect("records");
        let report = check_consistency(&sagas, &records);
        assert!(report.is_consistent(), "{:?}", report.violations);
        assert_eq!(report.skipped, 0, "every saga finished: {sagas:?}");
    }

    /// Publishes a reply to (`step`, `kind`, `attempt`) of saga `id` as a participant
    /// would.
    async fn reply(&self, id: SagaId, step: &str, attempt: u32, outcome: &Outcome) {
        let command = command(id, step, CommandKind::Action, attempt, subject_for(step));
        let incoming = wire::decode_command(&command).expect("a command decodes");
        self.bus
            .publish(wire::encode_reply(&incoming, outcome))
            .await
            .expect("publish the reply");
    }

    async fn shutdown(self) {
        drop(self.participants);
        self.runtime.shutdown().await;
    }
}

fn subject_of(service: &str) -> &'static str {
    SimServices::services()
        .into_iter()
        .find(|(name, _)| *name == service)
        .map(|(_, subject)| subject)
        .unwrap_or_else(|| panic!("no service {service}"))
}

fn subject_for(step: &str) -> &'static str {
    match step {
        "reserve_inventory" => subjects::RESERVE,
        "charge_payment" => subjects::CHARGE,
        "ship_order" => subjects::SHIP,
        other => panic!("no step {other}"),
    }
}

/// A command of saga `id` as skald sends it (encoded), for a participant to receive.
fn command(id: SagaId, step: &str, kind: CommandKind, attempt: u32, subject: &str) -> Message {
    let step_name = skald::ids::StepName::new(step).expect("step name");
    wire::encode_command_with(
        &Command {
            saga_id: id,
            saga_type: skald::ids::SagaType::new("checkout").expect("type"),
            idempotency_key: skald::ids::idempotency_key(&id, &step_name, kind),
            message_id: skald::ids::command_message_id(&id, &step_name, kind, attempt),
            step: step_name,
            kind,
            attempt,
            subject: subject.into(),
            payload: json!({"order_id": "by-hand", "items": [], "customer_id": "c",
                        "amount_cents": 1, "reservation_id": null, "payment_id": null}),
            deadline: Timestamp(u64::MAX / 2),
            schema_version: 1,
            definition_version: 1,
            action_key: None,
            in_doubt: false,
        },
        Some(&test_reply_keys()),
    )
    .expect("encode")
}

fn reliable_with(late_rate: f64, late_hold: Duration) -> SimConfig {
    SimConfig {
        seed: 9,
        decline_rate: 0.0,
        flaky_rate: 0.0,
        late_rate,
        late_hold,
    }
}

/// 1. The reserve or the charge is applied at once but answered only after skald gave
///    up on it: the step is in doubt, its compensation undoes it by the action's key,
///    and the late answers change nothing.
async fn an_action_that_times_out_on_every_attempt_is_compensated_by_its_key(kind: Backend) {
    let hold = budget() + Duration::from_millis(500);
    let mut env = Env::start(kind, reliable_with(1.0, hold), ALL_SERVICES).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(env.start_order(n).await);
    }
    let outcomes = env.settle(&ids).await;
    for o in &outcomes {
        assert_eq!(o.status, SagaStatus::Compensated, "{o:?}");
        assert!(o.in_doubt, "compensated around the step in doubt: {o:?}");
    }
    // Every late step did take effect, and was undone.
    let records = env.ledger.records().await.expect("records");
    for id in &ids {
        let r = records.get(id).copied().unwrap_or_default();
        // The reserve took effect and was released; the charge, when it was the late
        // step, took effect and was refunded.
        assert_eq!(r.reservations_released, 1, "{id}: {r:?}");
        assert!(r.charges_refunded <= 1, "{id}: {r:?}");
        assert_eq!(
            (r.reservations_held, r.charges_live, r.shipments),
            (0, 0, 0)
        );
    }
    env.assert_consistent(&ids).await;
    // The held answers arrive after the hold and are journaled as ignored.
    for id in &ids {
        wait_until("the late answer to be journaled as ignored", || async {
            journal_records(env.store(), *id)
                .await
                .iter()
                .any(|r| {
                    matches!(
                        r,
                        JournalRecord::Ignored(Ignored {
                            input: Input::StepSucceeded { .. },
                            ..
                        })
                    )
                })
                .then_some(())
        })
        .await;
        assert_eq!(
            env.store()
                .load(*id)
                .await
                .expect("load")
                .expect("saga")
                .state
                .status,
            SagaStatus::Compensated
        );
    }
    env.shutdown().await;
}

/// 2. A cancel while the charge is in flight waits for it; the charge then succeeds and
///    is refunded.
async fn a_cancel_in_flight_waits_for_the_action_and_refunds_it(kind: Backend) {
    let mut env = Env::start(kind, reliable_with(0.0, Duration::ZERO), ALL_SERVICES).await;
    env.gate_charges();
    let id = env.start_order(0).await;
    wait_saga(env.store(), id, "charging", |s| {
        s.state.pending.is_some_and(|p| p.step == 1)
    })
    .await;
    let applied = env
        .runtime
        .cancel(id, "the customer called")
        .await
        .expect("cancel");
    assert_eq!(
        applied,
        Applied::Transitioned {
            status: SagaStatus::Running
        },
        "the cancel waits for the charge in flight"
    );
    // A second cancel is refused, saying what the first waits for.
    let again = env.runtime.cancel(id, "twice").await;
    assert!(
        matches!(
            again,
            Err(skald::RuntimeError::Transition(
                skald::machine::TransitionError::CancelPending { .. }
            ))
        ),
        "{again:?}"
    );
    env.open_charges();
    let outcome = env.settle(&[id]).await.remove(0);
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let r = env.ledger.records().await.expect("records")[&id];
    assert_eq!((r.charges_refunded, r.charges_live), (1, 0), "{r:?}");
    assert_eq!(
        (r.reservations_released, r.reservations_held),
        (1, 0),
        "{r:?}"
    );
    env.assert_consistent(&[id]).await;
    env.shutdown().await;
}

/// 3. Attempt 1's answer is held past its deadline and arrives while attempt 2 waits:
///    one key, one effect, the saga goes on without compensating.
async fn a_late_success_of_an_earlier_attempt_completes_the_step(kind: Backend) {
    let hold = TIMEOUT + TIMEOUT / 2;
    let mut env = Env::start(kind, reliable_with(1.0, hold), ALL_SERVICES).await;
    let ids = vec![env.start_order(0).await, env.start_order(1).await];
    for o in env.settle(&ids).await {
        assert_eq!(o.status, SagaStatus::Completed, "{o:?}");
        let entries = journal_records(env.store(), o.id).await;
        assert!(
            entries.iter().any(|r| matches!(
                r,
                JournalRecord::Transition(Transition {
                    input: Input::TimedOut { .. },
                    ..
                })
            )),
            "an attempt timed out first: {entries:?}"
        );
    }
    env.assert_consistent(&ids).await;
    env.shutdown().await;
}

/// 5. A `retryable` answer, then a `success` for the same attempt (a redelivery that
///    went through): both reach the saga (one message id per outcome), and the success
///    moves it on.
async fn a_retryable_then_a_success_for_one_attempt_both_reach_the_saga(kind: Backend) {
    let (mut env, id) = Env::awaiting_shipping(kind).await;
    let busy = Outcome::Retryable(skald::machine::StepError::new("busy", "try later"));
    env.reply(id, "ship_order", 1, &busy).await;
    wait_saga(
        env.store(),
        id,
        "in backoff after the retryable answer",
        |s| {
            s.state.pending.is_some_and(|p| {
                p.step == 2 && matches!(p.phase, skald::machine::Phase::Backoff { .. })
            }) || s
                .state
                .pending
                .is_some_and(|p| p.step == 2 && p.attempt > 1)
        },
    )
    .await;
    let shipped = Outcome::Success(json!({"shipment_id": "shp-by-hand"}));
    env.reply(id, "ship_order", 1, &shipped).await;
    let outcome = env.settle(&[id]).await.remove(0);
    assert_eq!(outcome.status, SagaStatus::Completed);
    let s = env.store().load(id).await.expect("load").expect("saga");
    assert_eq!(s.state.data["shipment_id"], "shp-by-hand");
    env.shutdown().await;
}

/// 4. A success whose output does not decode: the step took effect, so the saga is
///    dead-lettered (not compensated around it); fixed and re-driven, it completes with
///    the participant's recorded success.
async fn an_undecodable_success_dead_letters_the_saga_until_redriven(kind: Backend) {
    let (mut env, id) = Env::awaiting_shipping(kind).await;
    env.reply(
        id,
        "ship_order",
        1,
        &Outcome::Success(json!({"shipment": 7})),
    )
    .await;
    let outcome = env.settle(&[id]).await.remove(0);
    assert_eq!(outcome.status, SagaStatus::Failed);
    let s = env.store().load(id).await.expect("load").expect("saga");
    let dl = s.state.dead_letter.clone().expect("dead letter");
    assert_eq!(dl.error.code, "undecodable_output");
    assert!(
        dl.error.message.contains("shipment_id"),
        "{}",
        dl.error.message
    );
    // The shipping service (the real one) is back: a re-drive asks again, same key.
    env.serve("shipping", subject_of("shipping"), "shipping")
        .await;
    env.runtime.redrive(id).await.expect("redrive");
    let outcome = env.settle(&[id]).await.remove(0);
    assert_eq!(outcome.status, SagaStatus::Completed);
    env.assert_consistent(&[id]).await;
    env.shutdown().await;
}

/// 6. The inventory service answers nothing until the reserve is in doubt; its release
///    (served first) leaves a tombstone, and the reserve that comes afterwards is
///    refused: no reservation is ever held for the compensated saga.
async fn a_compensation_before_its_action_refuses_the_action(kind: Backend) {
    let mut env = Env::start(
        kind,
        reliable_with(0.0, Duration::ZERO),
        &["payment", "shipping"],
    )
    .await;
    let id = env.start_order(0).await;
    // Every reserve attempt goes unanswered: the reserve is in doubt, then released.
    wait_saga(env.store(), id, "releasing the reserve in doubt", |s| {
        s.state.in_doubt == Some(0)
    })
    .await;
    env.serve("inventory", subjects::RELEASE, "inventory-release")
        .await;
    let outcome = env.settle(&[id]).await.remove(0);
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(outcome.in_doubt);
    // Now the reserve reaches the service (queued on JetStream, or sent again by hand).
    env.serve("inventory", subjects::RESERVE, "inventory-reserve")
        .await;
    env.bus
        .publish(command(
            id,
            "reserve_inventory",
            CommandKind::Action,
            1,
            subjects::RESERVE,
        ))
        .await
        .expect("publish");
    wait_until("the refused reserve to be journaled", || async {
        journal_records(env.store(), id)
            .await
            .iter()
            .any(|r| {
                matches!(
                    r,
                    JournalRecord::Ignored(Ignored {
                        input: Input::StepFailed { error, .. },
                        ..
                    }) if error.code == "compensated"
                )
            })
            .then_some(())
    })
    .await;
    let r = env
        .ledger
        .records()
        .await
        .expect("records")
        .get(&id)
        .copied()
        .unwrap_or_default();
    assert_eq!(r.reservations_held + r.reservations_released, 0, "{r:?}");
    env.assert_consistent(&[id]).await;
    env.shutdown().await;
}
