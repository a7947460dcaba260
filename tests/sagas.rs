//! End-to-end through the actors, on every backend: memory store + in-process bus,
//! SQLite store + in-process bus, SQLite store + NATS JetStream (a nats-server of the
//! test's own): the checkout saga's happy path, compensation, retries, dead-lettering and
//! re-drive, a panicking handler, a restart mid-flight, and bad input.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::hooked::HookedStore;
use common::*;
use serde::{Deserialize, Serialize};
use skald::adapters::memory::MemoryBus;
use skald::definition::{SagaDefinition, Step};
use skald::ids::{CommandKind, SagaId};
use skald::machine::{SagaStatus, StepError};
use skald::participant;
use skald::ports::{Bus, DeadLetterCategory, Headers, Message};
use skald::retry::RetryPolicy;
use skald::wire::{self, Outcome};
use skald::{Applied, Runtime, RuntimeError};
use skald_sagas::checkout::{Checkout, check_consistency, checkout_definition, steps, subjects};
use skald_sagas::sim::{Ledger, MemoryLedger, SimConfig};

on_every_backend!(
    happy_path,
    declined_payment_is_compensated,
    flaky_step_is_retried_then_completed,
    failing_compensation_is_dead_lettered_then_redriven,
    restart_mid_flight_resumes_without_loss,
    bad_input_is_dead_lettered_and_duplicates_ignored,
    panicking_handler_is_reactivated_from_the_store,
);

async fn assert_consistent(env: &TestEnv, statuses: &HashMap<SagaId, SagaStatus>) {
    let records = env.ledger.records().await.expect("records");
    let sagas: Vec<_> = statuses.iter().map(|(k, v)| (*k, *v)).collect();
    let report = check_consistency(&sagas, &records);
    assert!(report.is_consistent(), "{:?}", report.violations);
    assert_eq!(report.checked, sagas.len());
}

async fn happy_path(kind: Backend) {
    let backend = Resources::new(kind).await;
    let mut env = TestEnv::start(&backend, MemoryLedger::new(), reliable(), no_script()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(env.start_order(i).await);
    }
    let statuses = env.settle(&ids).await;
    assert!(
        statuses.values().all(|s| *s == SagaStatus::Completed),
        "{statuses:?}"
    );
    assert_consistent(&env, &statuses).await;
    // The replies' outputs were applied to the data.
    let saga = env.store.load(ids[0]).await.expect("load").expect("exists");
    let data: Checkout = env.checkout.decode(&saga.state.data).expect("decode");
    assert!(
        data.reservation_id.is_some() && data.payment_id.is_some() && data.shipment_id.is_some()
    );
    assert_eq!(
        journal_inputs(env.store.as_ref(), ids[0]).await,
        [
            "started",
            "step_succeeded",
            "step_succeeded",
            "step_succeeded"
        ]
    );
    env.shutdown().await;
}

async fn declined_payment_is_compensated(kind: Backend) {
    let backend = Resources::new(kind).await;
    let declines = SimConfig {
        decline_rate: 1.0,
        ..reliable()
    };
    let mut env = TestEnv::start(&backend, MemoryLedger::new(), declines, no_script()).await;
    let ids = vec![env.start_order(1).await, env.start_order(2).await];
    let statuses = env.settle(&ids).await;
    assert!(
        statuses.values().all(|s| *s == SagaStatus::Compensated),
        "{statuses:?}"
    );
    assert_consistent(&env, &statuses).await;
    let records = env.ledger.records().await.expect("records");
    assert_eq!(
        records[&ids[0]].reservations_released, 1,
        "the reservation was released"
    );
    assert_eq!(
        records[&ids[0]].charges_live + records[&ids[0]].charges_refunded,
        0
    );
    let saga = env.store.load(ids[0]).await.expect("load").expect("exists");
    assert_eq!(
        saga.state.failure.as_ref().map(|f| f.code.as_str()),
        Some("card_declined")
    );
    env.shutdown().await;
}

async fn flaky_step_is_retried_then_completed(kind: Backend) {
    let backend = Resources::new(kind).await;
    // The charge fails retryably on its first two attempts.
    let script: Script = Arc::new(|cmd| {
        (cmd.subject == subjects::CHARGE && cmd.envelope.attempt <= 2)
            .then(|| Outcome::Retryable(StepError::new("unavailable", "try later")))
    });
    let mut env = TestEnv::start(&backend, MemoryLedger::new(), reliable(), script).await;
    let id = env.start_order(1).await;
    let statuses = env.settle(&[id]).await;
    assert_eq!(statuses[&id], SagaStatus::Completed);
    assert_consistent(&env, &statuses).await;
    let inputs = journal_inputs(env.store.as_ref(), id).await;
    assert_eq!(
        inputs.iter().filter(|i| *i == "step_failed").count(),
        2,
        "{inputs:?}"
    );
    assert_eq!(
        inputs.iter().filter(|i| *i == "retry_due").count(),
        2,
        "{inputs:?}"
    );
    env.shutdown().await;
}

async fn failing_compensation_is_dead_lettered_then_redriven(kind: Backend) {
    let backend = Resources::new(kind).await;
    let refund_broken = Arc::new(AtomicBool::new(true));
    let broken = refund_broken.clone();
    // Shipping refuses for good; the refund keeps failing until "fixed".
    let script: Script = Arc::new(move |cmd| {
        if cmd.subject == subjects::SHIP {
            return Some(Outcome::Failure(StepError::new(
                "no_carrier",
                "cannot ship",
            )));
        }
        (cmd.subject == subjects::REFUND && broken.load(Ordering::SeqCst))
            .then(|| Outcome::Retryable(StepError::new("bank_down", "refunds unavailable")))
    });
    let mut env = TestEnv::start(&backend, MemoryLedger::new(), reliable(), script).await;
    let id = env.start_order(1).await;
    assert_eq!(env.settle(&[id]).await[&id], SagaStatus::Failed);

    let saga = env.store.load(id).await.expect("load").expect("exists");
    let dl = saga.state.dead_letter.clone().expect("dead-letter info");
    assert_eq!(dl.step_name.as_str(), steps::CHARGE_PAYMENT);
    assert_eq!(dl.kind, CommandKind::Compensation);
    assert_eq!(dl.attempts, fast_timing().compensation_retry.max_attempts);
    assert_eq!(dl.error.code, "bank_down");
    let open = env
        .store
        .dead_letters(true, 10)
        .await
        .expect("dead letters");
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].category, DeadLetterCategory::Saga);
    assert_eq!(open[0].saga_id, Some(id));
    assert_eq!(open[0].step.as_deref(), Some(steps::CHARGE_PAYMENT));

    // Re-driving a running saga is refused; a dead-lettered one resumes.
    refund_broken.store(false, Ordering::SeqCst);
    let applied = env.runtime.redrive(id).await.expect("redrive");
    assert_eq!(
        applied,
        Applied::Transitioned {
            status: SagaStatus::Compensating
        }
    );
    let statuses = env.settle(&[id]).await;
    assert_eq!(statuses[&id], SagaStatus::Compensated);
    assert_consistent(&env, &statuses).await;
    assert!(
        env.store
            .dead_letters(true, 10)
            .await
            .expect("dead letters")
            .is_empty(),
        "resolved"
    );
    let err = env.runtime.redrive(id).await.expect_err("terminal saga");
    assert!(matches!(err, RuntimeError::Transition(_)), "{err}");
    env.shutdown().await;
}

async fn restart_mid_flight_resumes_without_loss(kind: Backend) {
    let backend = Resources::new(kind).await;
    let store = Arc::clone(&backend.store);
    let ledger = MemoryLedger::new();
    // First process: shipping is down, so every saga stops waiting at its last step.
    let first = TestEnv::start_with(
        &backend,
        ledger.clone(),
        reliable(),
        no_script(),
        &["inventory", "payment"],
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(first.start_order(i).await);
    }
    wait_until("every saga waiting on shipping", || {
        let store = Arc::clone(&store);
        let ids = ids.clone();
        async move {
            for id in &ids {
                let s = store.load(*id).await.expect("load").expect("exists");
                if s.state.completed != 2 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    // The process goes away with commands in flight on its (non-durable) bus.
    first.shutdown().await;

    // Second process on the same store, every service up: it resumes them all.
    let mut second = TestEnv::start(&backend, ledger, reliable(), no_script()).await;
    let statuses = second.settle(&ids).await;
    assert!(
        statuses.values().all(|s| *s == SagaStatus::Completed),
        "{statuses:?}"
    );
    assert_consistent(&second, &statuses).await;
    // On the in-process bus the first process's commands died with it: the second
    // process re-sent them at start (`resumed`), which is what completed the saga. A
    // durable broker kept them: the start leaves the sagas alone (another process may
    // be running them) and the stored commands complete them.
    let inputs = journal_inputs(store.as_ref(), ids[0]).await;
    let resumed = inputs.iter().any(|i| i.ends_with("resumed"));
    assert_eq!(resumed, !kind.uses_nats(), "{inputs:?}");
    second.shutdown().await;
}

/// A reply to the action of `step`, as its service would publish it: on the service's
/// reply subject, with the token the test runtime's keys make (when the fields parse).
fn reply(saga: SagaId, step: &str, attempt: &str, outcome: &str, body: &'static [u8]) -> Message {
    let service = match step {
        steps::CHARGE_PAYMENT => "payment",
        steps::SHIP_ORDER => "shipping",
        _ => "inventory",
    };
    let mut h = Headers::new();
    h.insert(wire::H_SAGA_ID, saga.to_string());
    h.insert(wire::H_SAGA_TYPE, "checkout");
    h.insert(wire::H_STEP, step);
    h.insert(wire::H_KIND, "action");
    h.insert(wire::H_ATTEMPT, attempt);
    h.insert(wire::H_IDEMPOTENCY_KEY, format!("{saga}:{step}:action"));
    h.insert(wire::H_OUTCOME, outcome);
    let m = Message {
        subject: String::new(),
        headers: h,
        payload: Bytes::from_static(body),
    };
    as_reply_of(service, m)
}

async fn bad_input_is_dead_lettered_and_duplicates_ignored(kind: Backend) {
    let backend = Resources::new(kind).await;
    // Inventory is down: the saga waits on reserve_inventory attempt 1, and the test
    // plays the inventory service by hand.
    let mut env = TestEnv::start_with(
        &backend,
        MemoryLedger::new(),
        reliable(),
        no_script(),
        &["payment", "shipping"],
    )
    .await;
    let id = env.start_order(1).await;
    let step = steps::RESERVE_INVENTORY;

    let mut no_headers = reply(id, step, "1", "success", b"{}");
    no_headers.headers = Headers::new();
    let mut other_type = reply(id, step, "1", "success", b"{}");
    other_type.headers.insert(wire::H_SAGA_TYPE, "nope");
    let mut unsigned = reply(id, step, "1", "success", b"{}");
    unsigned.headers = Headers::new();
    for (n, v) in reply(id, step, "1", "success", b"{}").headers.iter() {
        if n != wire::H_REPLY_TOKEN {
            unsigned.headers.insert(n, v);
        }
    }
    let mut wrong_token = reply(id, step, "1", "success", b"{}");
    wrong_token
        .headers
        .insert(wire::H_REPLY_TOKEN, "00".repeat(32));
    let mut wrong_service = reply(id, step, "1", "success", b"{}");
    wrong_service.subject = "skald.reply.payment.checkout.0".into();
    // A valid reply moved to the subject of another partition than its saga's (0 stays
    // allowed: commands stored before partitions name it).
    let mut wrong_partition = reply(id, step, "1", "success", b"{}");
    let other = (1..16)
        .find(|p| *p != id.partition(16))
        .expect("another partition");
    wrong_partition.subject = format!("skald.reply.inventory.checkout.{other}");
    let poison = [
        (reply(id, step, "1", "success", b"{not json"), "not JSON"),
        (no_headers, "missing header"),
        (
            reply(SagaId::new(), step, "1", "success", b"{}"),
            "unknown saga",
        ),
        (reply(id, "teleport", "1", "success", b"{}"), "unknown step"),
        (other_type, "forged reply: it names saga type nope"),
        (unsigned, "forged reply: no Skald-Reply-Token"),
        (
            wrong_token,
            "forged reply: Skald-Reply-Token does not match",
        ),
        (
            wrong_service,
            "arrived on the reply subject of service payment",
        ),
        (
            wrong_partition,
            "but the reply arrived on the subject of partition",
        ),
    ];
    // (A success whose output does not decode is not poison: the step took effect, so
    // the saga is dead-lettered instead; tests/promise.rs.)
    for (msg, _) in &poison {
        env.bus.publish(msg.clone()).await.expect("publish");
    }
    let store = Arc::clone(&env.store);
    let expected = poison.len();
    let dead = wait_until("every poison message dead-lettered", || {
        let store = Arc::clone(&store);
        async move {
            let d = store.dead_letters(true, 100).await.expect("dead letters");
            (d.len() >= expected).then_some(d)
        }
    })
    .await;
    assert_eq!(dead.len(), poison.len(), "{dead:#?}");
    for (_, reason) in &poison {
        assert!(
            dead.iter()
                .any(|d| d.category == DeadLetterCategory::Poison && d.reason.contains(reason)),
            "no dead letter says {reason:?}: {dead:#?}"
        );
    }
    assert!(
        dead.iter().all(|d| d.message.is_some()),
        "the raw message is kept"
    );
    assert_eq!(env.runtime.stats().poison, poison.len() as u64);
    assert_eq!(
        env.status(id).await,
        SagaStatus::Running,
        "poison changed nothing"
    );

    // A stale reply (an attempt never sent), a reply out of order (for the next step,
    // before this one finished: a decline that, applied, would compensate), and then
    // the real reply, twice. (Such replies carry valid tokens only because the test
    // holds the keys; a participant could not make them.)
    let stale = reply(id, step, "7", "success", b"{\"reservation_id\":\"r-7\"}");
    env.bus.publish(stale).await.expect("publish");
    let early = reply(
        id,
        steps::CHARGE_PAYMENT,
        "1",
        "failure",
        b"{\"code\":\"card_declined\",\"message\":\"early\"}",
    );
    env.bus.publish(early).await.expect("publish");
    let store = Arc::clone(&env.store);
    wait_until(
        "the stale and out-of-order replies recorded as ignored",
        || {
            let store = Arc::clone(&store);
            async move {
                let inputs = journal_inputs(store.as_ref(), id).await;
                (inputs.iter().filter(|i| i.starts_with("ignored:")).count() >= 2).then_some(())
            }
        },
    )
    .await;
    let good = reply(id, step, "1", "success", b"{\"reservation_id\":\"r-1\"}");
    env.bus.publish(good.clone()).await.expect("publish");
    let statuses = env.settle(&[id]).await;
    assert_eq!(statuses[&id], SagaStatus::Completed);
    // The same reply again: the inbox knows it (its id comes from the verified
    // headers), so it is dropped without a journal entry: a replay cannot grow the
    // journal.
    let ignored = env.runtime.stats().ignored;
    env.bus.publish(good).await.expect("publish duplicate");
    wait_until("the duplicate dropped by the inbox", || async {
        (env.runtime.stats().ignored > ignored).then_some(())
    })
    .await;
    let mut inputs = journal_inputs(env.store.as_ref(), id).await;
    // (The stale and the early reply were applied concurrently, in either order.)
    inputs[1..3].sort();
    assert_eq!(
        inputs,
        [
            "started",
            "ignored:step_failed",
            "ignored:step_succeeded",
            "step_succeeded",
            "step_succeeded",
            "step_succeeded",
        ]
    );
    let saga = env.store.load(id).await.expect("load").expect("exists");
    let data: Checkout = env.checkout.decode(&saga.state.data).expect("decode");
    assert_eq!(
        data.reservation_id.as_deref(),
        Some("r-1"),
        "the stale reply was not applied"
    );
    assert!(
        data.payment_id.is_some(),
        "the out-of-order decline was not applied: the charge went through"
    );
    // The runtime kept working throughout.
    let other = env.start_order(2).await;
    env.bus
        .publish(reply(
            other,
            step,
            "1",
            "success",
            b"{\"reservation_id\":\"r-2\"}",
        ))
        .await
        .expect("publish");
    assert_eq!(
        env.settle(&[other]).await[&other],
        SagaStatus::Completed,
        "{}",
        other
    );
    env.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Counter {
    n: u64,
}

#[derive(Debug, Deserialize)]
struct Added {
    add: u64,
}

async fn panicking_handler_is_reactivated_from_the_store(kind: Backend) {
    let backend = Resources::new(kind).await;
    let store = Arc::clone(&backend.store);
    let saga_type = match kind {
        Backend::MemoryInProcess => "panicky-memory-in-process",
        Backend::SqliteInProcess => "panicky-sqlite-in-process",
        Backend::SqliteNats => "panicky-sqlite-nats",
        Backend::PostgresNats => "panicky-postgres-nats",
    };
    let panicked = Arc::new(AtomicBool::new(false));
    let flag = panicked.clone();
    // The success handler panics the first time it runs.
    let def = SagaDefinition::<Counter>::builder(saga_type, 1)
        .step(
            Step::new("add")
                .action("skald.cmd.counter.add", |c: &Counter| c.n)
                .on_success(move |c: &mut Counter, a: Added| {
                    if !flag.swap(true, Ordering::SeqCst) {
                        panic!("injected panic in a success handler");
                    }
                    c.n += a.add;
                })
                .retry(RetryPolicy::no_retry())
                .timeout(Duration::from_secs(5)),
        )
        .build()
        .expect("valid");
    let bus = Arc::new(MemoryBus::new());
    let _participant = participant::serve(
        bus.clone() as Arc<dyn Bus>,
        "skald.cmd.counter.>",
        "counter",
        4,
        |_| async { Outcome::Success(serde_json::json!({ "add": 2 })) },
    )
    .await
    .expect("participant");
    let runtime = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(bus.clone())
        .register(&def)
        .options(options())
        .start()
        .await
        .expect("start");
    let mut outcomes = runtime.outcomes();
    let id = runtime
        .start_saga(&def, &Counter { n: 1 })
        .await
        .expect("start saga")
        .id();
    let outcome = tokio::time::timeout(DEADLINE, outcomes.recv())
        .await
        .expect("settles in time")
        .expect("outcome");
    assert_eq!((outcome.id, outcome.status), (id, SagaStatus::Completed));
    assert!(panicked.load(Ordering::SeqCst), "the handler did panic");
    let saga = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        def.decode(&saga.state.data).expect("decode").n,
        3,
        "applied exactly once"
    );
    assert!(runtime.stats().reactivations >= 1);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_saga_type_and_bad_start_are_refused() {
    let err = Runtime::builder()
        .store(Arc::new(skald::adapters::memory::MemoryStore::new()))
        .bus(Arc::new(MemoryBus::new()))
        .start()
        .await
        .expect_err("no definitions");
    assert!(err.to_string().contains("no saga definition"), "{err}");
    let err = Runtime::builder()
        .bus(Arc::new(MemoryBus::new()))
        .start()
        .await
        .expect_err("no store");
    assert!(err.to_string().contains("no store"), "{err}");
    // An inbox that forgets an operator request before it expires, or an allowlist
    // entry that is not a public user NKey, is refused at start.
    let checkout = checkout_definition(fast_timing()).expect("valid");
    for (options, says) in [
        (
            skald::RuntimeOptions {
                inbox_retention: std::time::Duration::from_secs(60),
                ..options()
            },
            "inbox_retention",
        ),
        (
            skald::RuntimeOptions {
                operators: [("alice".to_owned(), "SUAnot-a-public-key".to_owned())].into(),
                ..options()
            },
            "not a public user NKey",
        ),
    ] {
        let err = Runtime::builder()
            .store(Arc::new(skald::adapters::memory::MemoryStore::new()))
            .bus(Arc::new(MemoryBus::new()))
            .register(&checkout)
            .options(options)
            .start()
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(says), "{err}");
    }

    let backend = Resources::new(Backend::MemoryInProcess).await;
    let env = TestEnv::start(&backend, MemoryLedger::new(), reliable(), no_script()).await;
    let other = SagaDefinition::<Counter>::builder("unregistered", 1)
        .step(Step::new("a").action("skald.cmd.x.y", |c: &Counter| c.n))
        .build()
        .expect("valid");
    let err = env
        .runtime
        .start_saga(&other, &Counter { n: 0 })
        .await
        .expect_err("unregistered");
    assert!(matches!(err, RuntimeError::UnknownSagaType { .. }), "{err}");
    let err = env
        .runtime
        .redrive(SagaId::new())
        .await
        .expect_err("unknown id");
    assert!(matches!(err, RuntimeError::UnknownSaga(_)), "{err}");
    env.shutdown().await;
}

#[tokio::test]
async fn sqlite_store_reports_an_unusable_path() {
    let err =
        skald::adapters::sqlite::SqliteStore::connect("sqlite:///nonexistent-dir/sub/skald.db")
            .await
            .expect_err("cannot open");
    let text = err.to_string();
    assert!(text.contains("nonexistent-dir"), "names the path: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_store_failure_restarts_the_instance_and_loses_no_reply() {
    // Commit #1 creates the saga; commit #2 (the first reply's transition) fails.
    let store = HookedStore::new(Arc::new(skald::adapters::memory::MemoryStore::new()));
    store.fail_commit(2);
    let backend = Resources {
        kind: Backend::MemoryInProcess,
        dir: TempDir::new(),
        store: store.clone(),
        nats: None,
        pg: None,
    };
    let mut env = TestEnv::start(&backend, MemoryLedger::new(), reliable(), no_script()).await;
    let id = env.start_order(1).await;
    let statuses = env.settle(&[id]).await;
    assert_eq!(statuses[&id], SagaStatus::Completed);
    assert!(store.commits() > 2, "the failure was injected");
    assert_consistent(&env, &statuses).await;
    // The failed reply was redelivered and applied once; nothing applied twice.
    assert_eq!(
        journal_inputs(env.store.as_ref(), id).await,
        [
            "started",
            "step_succeeded",
            "step_succeeded",
            "step_succeeded"
        ]
    );
    // The instance stopped on the failure and its Supervisor restarted it (a second
    // activation), reloading the state from the store.
    assert!(env.runtime.stats().activations >= 2);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_timeouts_retry_per_policy_under_a_controlled_clock() {
    use skald::ports::{FixedJitter, ManualClock};
    use skald_sagas::checkout::checkout_definition;

    let clock = ManualClock::new(skald::machine::Timestamp(1_000_000));
    let bus = Arc::new(MemoryBus::new());
    let store: Arc<dyn skald::ports::SagaStore> =
        Arc::new(skald::adapters::memory::MemoryStore::new());
    // Inventory never answers: every attempt of the first step times out.
    let timing = skald_sagas::checkout::CheckoutTiming {
        timeout: Duration::from_secs(3600),
        ..fast_timing()
    };
    let checkout = checkout_definition(timing).expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(bus.clone())
        .register(&checkout)
        .clock(Arc::new(clock.clone()))
        .jitter(Arc::new(FixedJitter(0.0)))
        .options(options())
        .reply_keys(test_reply_keys())
        .start()
        .await
        .expect("start");
    let mut outcomes = runtime.outcomes();
    let order = Checkout::new("o-1", "c", vec![], 100);
    let id = runtime
        .start_saga(&checkout, &order)
        .await
        .expect("start saga")
        .id();

    // Each time the clock passes the deadline (or the backoff), one more input is applied.
    let max = timing.retry.max_attempts as usize;
    for n in 1..=(2 * max - 1) {
        let want = n + 1;
        clock.advance(Duration::from_secs(3601));
        let store = Arc::clone(&store);
        wait_until("the wake-up to be applied", || {
            let store = Arc::clone(&store);
            async move { (journal_inputs(store.as_ref(), id).await.len() >= want).then_some(()) }
        })
        .await;
    }
    // The reserve never answered: it may have taken effect, so it is released (in
    // doubt, by its action key). The test answers for the inventory service.
    let saga = store.load(id).await.expect("load").expect("exists");
    assert_eq!(saga.state.status, SagaStatus::Compensating);
    assert_eq!(saga.state.in_doubt, Some(0));
    let p = saga.state.pending.expect("the release is pending");
    assert_eq!((p.step, p.kind), (0, CommandKind::Compensation));
    let step = skald::ids::StepName::new(steps::RESERVE_INVENTORY).expect("step");
    let release = wire::encode_command_with(
        &skald::machine::Command {
            saga_id: id,
            saga_type: skald::ids::SagaType::new("checkout").expect("type"),
            idempotency_key: skald::ids::idempotency_key(&id, &step, CommandKind::Compensation),
            message_id: skald::ids::command_message_id(&id, &step, CommandKind::Compensation, 1),
            step,
            kind: CommandKind::Compensation,
            attempt: 1,
            subject: subjects::RELEASE.into(),
            payload: serde_json::json!({}),
            deadline: skald::machine::Timestamp(0),
            schema_version: 1,
            definition_version: 1,
            action_key: None,
            in_doubt: true,
        },
        Some(&test_reply_keys()),
    )
    .expect("encode");
    let incoming = wire::decode_command(&release).expect("decode");
    bus.publish(wire::encode_reply(
        &incoming,
        &Outcome::Success(serde_json::Value::Null),
    ))
    .await
    .expect("publish the release's reply");
    let outcome = tokio::time::timeout(DEADLINE, outcomes.recv())
        .await
        .expect("settles in time")
        .expect("outcome");
    assert_eq!((outcome.id, outcome.status), (id, SagaStatus::Compensated));
    assert!(outcome.in_doubt);
    let inputs = journal_inputs(store.as_ref(), id).await;
    let mut expected = vec!["started".to_string()];
    for attempt in 1..=max {
        expected.push("timed_out".into());
        if attempt < max {
            expected.push("retry_due".into());
        }
    }
    expected.push("step_succeeded".into());
    assert_eq!(
        inputs, expected,
        "exactly max_attempts attempts, then the compensation of the step in doubt"
    );
    let saga = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        saga.state.failure.map(|f| f.code),
        Some("timeout".to_string())
    );
    runtime.shutdown().await;
}
