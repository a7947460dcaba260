//! Saga handles and keyed starts: a handle's `outcome()` answers whichever process
//! settles the saga, and a business key starts one saga however many processes race to
//! start it.
//!
//! Two runtimes sharing one PostgreSQL database and one NATS server stand for two
//! orchestrator processes: each has its own actor system, registry, intake and outcome
//! poller; they share only what two processes share (the store and the broker).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{
    ALL_SERVICES, Backend, DEADLINE, Resources, fast_timing, no_script, options, reliable,
    start_participants, tea_order, test_reply_keys,
};
use skald::RuntimeError;
use skald::definition::SagaDefinition;
use skald::ids::SagaId;
use skald::machine::SagaStatus;
use skald::ports::SagaStore;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{Checkout, checkout_definition};
use skald_sagas::sim::MemoryLedger;

/// The checkout's timing with a reply timeout no slow machine reaches: the runtime that
/// only starts sagas must never be the one to time a step out.
fn patient_timing() -> skald_sagas::checkout::CheckoutTiming {
    skald_sagas::checkout::CheckoutTiming {
        timeout: Duration::from_secs(300),
        ..fast_timing()
    }
}

async fn runtime(
    backend: &Resources,
    checkout: &SagaDefinition<Checkout>,
    options: RuntimeOptions,
) -> Runtime {
    Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(backend.bus().await)
        .register(checkout)
        .options(options)
        .reply_keys(test_reply_keys())
        .start()
        .await
        .expect("runtime starts")
}

/// Started on one runtime, finished on another: the first one's handle answers.
///
/// Runtime A consumes nothing (`consume: false`, a service in front of orchestrator
/// nodes): every reply of its saga goes to B, which activates the saga from the store
/// and finishes it. A's handle hears of it from the store, not from its own actors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcome_answers_on_the_runtime_that_started_the_saga_when_another_finishes_it() {
    let backend = Resources::new(Backend::PostgresNats).await;
    let checkout = checkout_definition(patient_timing()).expect("valid definition");
    let _participants = start_participants(
        backend.bus().await,
        MemoryLedger::default(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let a = runtime(
        &backend,
        &checkout,
        RuntimeOptions {
            consume: false,
            outcome_poll_interval: Duration::from_millis(100),
            ..options()
        },
    )
    .await;
    let b = runtime(&backend, &checkout, options()).await;

    let handle = a
        .start_saga(&checkout, &tea_order("across"))
        .await
        .expect("starts on A");
    let outcome = handle
        .outcome_within(DEADLINE)
        .await
        .expect("A's handle answers");
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.id, handle.id());
    // The typed final data: every step's output applied.
    assert!(outcome.data.reservation_id.is_some(), "{:?}", outcome.data);
    assert!(outcome.data.payment_id.is_some(), "{:?}", outcome.data);
    assert!(outcome.data.shipment_id.is_some(), "{:?}", outcome.data);
    // A committed the start only; B applied every reply.
    assert_eq!(a.stats().transitions, 1, "A applied only the start");
    assert!(
        b.stats().transitions >= 3,
        "B finished the saga: {:?}",
        b.stats()
    );
    // A handle made later, on either runtime, reads the same.
    let again = b.saga(&checkout, handle.id());
    assert_eq!(again.status().await.expect("status"), SagaStatus::Completed);
    assert_eq!(again.data().await.expect("data"), outcome.data);

    a.shutdown().await;
    b.shutdown().await;
}

/// The same across two operating-system processes: this test's runtime (consuming
/// nothing) starts a saga and waits on its handle; the checkout runner, started as a
/// separate process with `--resume`, runs the participants and finishes the saga; the
/// handle here answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcome_answers_when_another_process_finishes_the_saga() {
    let backend = Resources::new(Backend::PostgresNats).await;
    let db = backend.pg.as_ref().expect("PostgreSQL").url();
    let nats = backend.nats.as_ref().expect("NATS").url();
    let checkout = checkout_definition(patient_timing()).expect("valid definition");
    // The store's shared reply key (no explicit keys): the other process has it too.
    let a = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(backend.bus().await)
        .register(&checkout)
        .options(RuntimeOptions {
            consume: false,
            outcome_poll_interval: Duration::from_millis(100),
            ..options()
        })
        .start()
        .await
        .expect("runtime starts");
    let handle = a
        .start_saga(&checkout, &tea_order("two-processes"))
        .await
        .expect("starts here");
    assert_eq!(
        handle.status().await.expect("status"),
        SagaStatus::Running,
        "nobody here applies its replies"
    );

    // The other process: finishes the unfinished sagas it finds, then exits.
    let runner = common::example_bin("checkout");
    let other = tokio::process::Command::new(&runner)
        .args(["--resume", "--json", "--db", &db, "--nats", &nats])
        .args(["--decline-rate", "0", "--flaky-rate", "0"])
        .args(["--timeout-secs", &DEADLINE.as_secs().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", runner.display()));

    let outcome = handle
        .outcome_within(DEADLINE)
        .await
        .expect("the handle answers");
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert!(outcome.data.shipment_id.is_some(), "{:?}", outcome.data);
    assert_eq!(
        a.stats().transitions,
        1,
        "this process applied only the start"
    );
    let out = tokio::time::timeout(DEADLINE, other.wait_with_output())
        .await
        .expect("the other process exits")
        .expect("its output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the other process failed: {stdout}");
    assert!(
        stdout.contains(r#""consistent":true"#),
        "its consistency check: {stdout}"
    );
    a.shutdown().await;
}

/// Keyed starts racing from two runtimes: one saga per key, every caller gets its id,
/// and exactly one caller per key started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_starts_racing_from_two_runtimes_start_one_saga_per_key() {
    const KEYS: usize = 25;
    const CALLERS_PER_RUNTIME: usize = 3;
    let backend = Resources::new(Backend::PostgresNats).await;
    let checkout = checkout_definition(fast_timing()).expect("valid definition");
    let _participants = start_participants(
        backend.bus().await,
        MemoryLedger::default(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let a = runtime(&backend, &checkout, options()).await;
    let b = runtime(&backend, &checkout, options()).await;

    let mut starts = Vec::new();
    for k in 0..KEYS {
        for rt in [&a, &b] {
            for _ in 0..CALLERS_PER_RUNTIME {
                let key = format!("order-{k}");
                let checkout = &checkout;
                starts.push(async move {
                    let handle = rt
                        .start_saga_keyed(checkout, &key, &tea_order(&key))
                        .await
                        .unwrap_or_else(|e| panic!("keyed start of {key}: {e}"));
                    (key, handle)
                });
            }
        }
    }
    let results = futures_util::future::join_all(starts).await;
    let mut ids: HashMap<String, HashSet<SagaId>> = HashMap::new();
    let mut started_here: HashMap<String, usize> = HashMap::new();
    for (key, handle) in &results {
        ids.entry(key.clone()).or_default().insert(handle.id());
        if !handle.existing() {
            *started_here.entry(key.clone()).or_default() += 1;
        }
    }
    for k in 0..KEYS {
        let key = format!("order-{k}");
        assert_eq!(ids[&key].len(), 1, "{key}: one saga id for every caller");
        assert_eq!(
            started_here.get(&key).copied().unwrap_or(0),
            1,
            "{key}: exactly one caller started it"
        );
    }
    // The store holds one saga per key, started once: the refused starts wrote nothing
    // to it.
    let stored = all_sagas(backend.store.as_ref()).await;
    assert_eq!(stored.len(), KEYS, "one stored saga per key");
    for id in &stored {
        let starts = common::journal_records(backend.store.as_ref(), *id)
            .await
            .into_iter()
            .filter(|r| {
                matches!(r, skald::journal::JournalRecord::Transition(t)
                    if t.input == skald::machine::Input::Started)
            })
            .count();
        assert_eq!(starts, 1, "saga {id}: one started transition");
    }
    for (_, handle) in results.iter().step_by(2 * CALLERS_PER_RUNTIME) {
        let outcome = handle.outcome_within(DEADLINE).await.expect("outcome");
        assert_eq!(outcome.status, SagaStatus::Completed);
    }

    a.shutdown().await;
    b.shutdown().await;
}

async fn all_sagas(store: &dyn SagaStore) -> Vec<SagaId> {
    let page = store.list(None, None, 10_000).await.expect("list sagas");
    page.into_iter().map(|row| row.id).collect()
}

/// A keyed start with a key used before returns the existing saga and ignores the new
/// data; another key starts another saga; a key that cannot be one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_returns_the_existing_saga() {
    let backend = Resources::new(Backend::MemoryInProcess).await;
    let checkout = checkout_definition(fast_timing()).expect("valid definition");
    let bus = backend.bus().await;
    let _participants = start_participants(
        Arc::clone(&bus),
        MemoryLedger::default(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let rt = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(bus)
        .register(&checkout)
        .options(options())
        .start()
        .await
        .expect("runtime starts");

    let first = rt
        .start_saga_keyed(&checkout, "order-7", &tea_order("order-7"))
        .await
        .expect("first start");
    assert!(!first.existing());
    assert_eq!(
        first.id(),
        SagaId::for_key(checkout.definition().saga_type(), "order-7").expect("key")
    );
    let second = rt
        .start_saga_keyed(&checkout, "order-7", &tea_order("something-else"))
        .await
        .expect("second start");
    assert!(second.existing());
    assert_eq!(second.id(), first.id());
    let outcome = second.outcome_within(DEADLINE).await.expect("outcome");
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.data.order_id, "order-7", "the first start's data");

    let other = rt
        .start_saga_keyed(&checkout, "order-8", &tea_order("order-8"))
        .await
        .expect("another key");
    assert!(!other.existing());
    assert_ne!(other.id(), first.id());

    for bad in [
        "",
        "a\nb",
        &"k".repeat(skald::ids::MAX_BUSINESS_KEY_BYTES + 1),
    ] {
        let err = rt
            .start_saga_keyed(&checkout, bad, &tea_order("bad"))
            .await
            .expect_err("not a key");
        assert!(matches!(err, RuntimeError::InvalidKey(_)), "{err}");
    }
    rt.shutdown().await;
}

/// A handle says what is wrong: no such saga, a saga of another type, or no outcome
/// within the time asked for (the saga runs on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_reports_unknown_sagas_other_types_and_timeouts() {
    let backend = Resources::new(Backend::MemoryInProcess).await;
    let checkout = checkout_definition(fast_timing()).expect("valid definition");
    let bus = backend.bus().await;
    // No payment service yet: the charge waits for its reply (a 5 s timeout), so the
    // saga is still running when the handle gives up.
    let ledger = MemoryLedger::default();
    let _participants = start_participants(
        Arc::clone(&bus),
        ledger.clone(),
        reliable(),
        no_script(),
        &["inventory", "shipping"],
    )
    .await;
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Other {
        n: u32,
    }
    let other = SagaDefinition::<Other>::builder("other", 1)
        .step(skald::definition::Step::new("a").action("skald.cmd.x.y", |o: &Other| o.n))
        .build()
        .expect("valid");
    let rt = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(Arc::clone(&bus))
        .register(&checkout)
        .register(&other)
        .options(options())
        .start()
        .await
        .expect("runtime starts");

    let unknown = rt.saga(&checkout, SagaId::new());
    let err = unknown.status().await.expect_err("no such saga");
    assert!(matches!(err, RuntimeError::UnknownSaga(_)), "{err}");
    let err = unknown
        .outcome_within(Duration::from_millis(200))
        .await
        .expect_err("no such saga");
    assert!(matches!(err, RuntimeError::UnknownSaga(_)), "{err}");

    let handle = rt
        .start_saga(&checkout, &tea_order("hang"))
        .await
        .expect("starts");
    let err = handle
        .outcome_within(Duration::from_millis(300))
        .await
        .expect_err("still running");
    assert!(
        matches!(err, RuntimeError::OutcomeTimeout { id, .. } if id == handle.id()),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(!handle.status().await.expect("status").is_settled());

    let err = rt
        .saga(&other, handle.id())
        .status()
        .await
        .expect_err("not an `other` saga");
    assert!(
        matches!(&err, RuntimeError::SagaTypeMismatch { found, .. } if found.as_str() == "checkout"),
        "{err}"
    );

    // Cancelled through its handle (the payment service up to refund what the charge
    // in doubt may have done), it settles compensated.
    let _payment = start_participants(
        Arc::clone(&bus),
        ledger,
        reliable(),
        no_script(),
        &["payment"],
    )
    .await;
    handle.cancel("changed my mind").await.expect("cancel");
    let outcome = handle.outcome_within(DEADLINE).await.expect("outcome");
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(outcome.failure.is_some(), "the cancel's reason is kept");
    rt.shutdown().await;
}

/// A runtime that shuts down lets go of its handles: one waiting for an outcome gives up
/// with `ShuttingDown` instead of waiting forever, and one kept afterwards answers the
/// same (a handle holds nothing of the runtime: its shutdown does not wait for them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_give_up_when_their_runtime_shuts_down() {
    let backend = Resources::new(Backend::MemoryInProcess).await;
    let checkout = checkout_definition(fast_timing()).expect("valid definition");
    // No participants: the saga waits on its first reply.
    let rt = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(backend.bus().await)
        .register(&checkout)
        .options(options())
        .start()
        .await
        .expect("runtime starts");
    let handle = rt
        .start_saga(&checkout, &tea_order("orphan"))
        .await
        .expect("starts");
    let waiting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.outcome().await }
    });
    common::wait_until("the handle waits", async || {
        (rt.store().load(handle.id()).await.ok()??.state.status == SagaStatus::Running)
            .then_some(())
    })
    .await;
    rt.shutdown().await;
    let err = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the waiting handle gives up")
        .expect("joins")
        .expect_err("no outcome");
    assert!(matches!(err, RuntimeError::ShuttingDown), "{err}");
    let err = handle.status().await.expect_err("runtime gone");
    assert!(matches!(err, RuntimeError::ShuttingDown), "{err}");
}
