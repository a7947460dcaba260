//! Nothing lost, nothing applied twice: the transactional outbox (commands left behind by
//! a publish that failed are published by the relay), the inbox (a reply delivered
//! again is applied once), two runtimes sharing one PostgreSQL and one NATS (one of
//! them dropped mid-run, the other finishes everything), and store errors (a schema
//! problem stops the runtime with a clear error; an unreachable database is named).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use futures_util::StreamExt;
use skald::adapters::memory::MemoryBus;
use skald::adapters::sqlite::SqliteStore;
use skald::machine::SagaStatus;
use skald::ports::{Bus, BusError, Message, StoreError, Subscription};
use skald::wire;
use skald::{Runtime, RuntimeError, RuntimeOptions};
use skald_sagas::checkout::{Checkout, checkout_definition};
use skald_sagas::sim::MemoryLedger;

/// A bus whose publishes fail while `down` is set (a broker outage as a publisher sees
/// it). It claims to be durable, so that a start re-sends nothing: only the outbox can
/// deliver what the outage held back.
struct SwitchableBus {
    inner: Arc<dyn Bus>,
    down: AtomicBool,
}

#[async_trait]
impl Bus for SwitchableBus {
    async fn publish(&self, message: Message) -> Result<(), BusError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable("injected: broker down".into()));
        }
        self.inner.publish(message).await
    }
    async fn subscribe(&self, subjects: &[String], group: &str) -> Result<Subscription, BusError> {
        self.inner.subscribe(subjects, group).await
    }
    fn is_durable(&self) -> bool {
        true
    }
}

fn outbox_options() -> RuntimeOptions {
    RuntimeOptions {
        claim_lease: Duration::from_millis(200),
        outbox_poll_interval: Duration::from_millis(50),
        ..options()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_a_failed_publish_left_in_the_outbox_are_published_by_the_relay() {
    let backend = Resources::new(Backend::SqliteInProcess).await;
    let inner: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let _participants = start_participants(
        Arc::clone(&inner),
        MemoryLedger::new(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let bus = Arc::new(SwitchableBus {
        inner,
        down: AtomicBool::new(true),
    });
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(bus.clone())
        .register(&checkout)
        .options(outbox_options())
        .start()
        .await
        .expect("start");
    let mut outcomes = runtime.outcomes();

    // Every start commits, and its first command cannot be published.
    let mut ids = Vec::new();
    for n in 0..20 {
        let order = Checkout::new(format!("order-{n}"), "c", Vec::new(), 100);
        ids.push(
            runtime
                .start_saga(&checkout, &order)
                .await
                .expect("start")
                .id(),
        );
    }
    let (backlog, oldest) = backend.store.outbox_backlog().await.expect("backlog");
    assert!(backlog >= 20, "the commands wait in the outbox: {backlog}");
    assert!(oldest.is_some());

    // The broker is back: the relay publishes them, in well under the step timeout.
    bus.down.store(false, Ordering::SeqCst);
    for o in next_outcomes(&mut outcomes, ids.len(), DEADLINE).await {
        assert_eq!(o.status, SagaStatus::Completed);
    }
    assert!(runtime.stats().relayed >= 20);
    for id in &ids {
        let inputs = journal_inputs(backend.store.as_ref(), *id).await;
        assert!(
            !inputs.iter().any(|i| i.contains("timed_out")),
            "delivered by the relay, not by a timeout: {inputs:?}"
        );
    }
    wait_until("the outbox to drain", || async {
        let (n, _) = backend.store.outbox_backlog().await.expect("backlog");
        (n == 0).then_some(())
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_delivered_twice_is_applied_once() {
    let backend = Resources::new(Backend::SqliteInProcess).await;
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    // Only inventory and shipping answer; this test plays payment itself.
    let _participants = start_participants(
        Arc::clone(&bus),
        MemoryLedger::new(),
        reliable(),
        no_script(),
        &["inventory", "shipping"],
    )
    .await;
    let mut payments = bus
        .subscribe(&["skald.cmd.payment.>".to_owned()], "test-payment")
        .await
        .expect("subscribe");
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(Arc::clone(&bus))
        .register(&checkout)
        .options(options())
        .start()
        .await
        .expect("start");
    let mut outcomes = runtime.outcomes();
    let order = Checkout::new("order-1", "c", Vec::new(), 100);
    let id = runtime
        .start_saga(&checkout, &order)
        .await
        .expect("start")
        .id();

    let delivery = tokio::time::timeout(DEADLINE, payments.next())
        .await
        .expect("a charge command")
        .expect("subscription open");
    let (message, _, acker) = delivery.into_parts();
    acker.ack().await.expect("ack");
    let command = wire::decode_command(&message).expect("a command");
    let reply = wire::encode_reply(
        &command,
        &wire::Outcome::Success(serde_json::json!({ "payment_id": "pay-1" })),
    );
    // The same reply twice (its Nats-Msg-Id is the same): a participant that crashed
    // after publishing and before acknowledging publishes it again.
    bus.publish(reply.clone()).await.expect("publish");
    bus.publish(reply).await.expect("publish");

    let o = tokio::time::timeout(DEADLINE, outcomes.recv())
        .await
        .expect("settles")
        .expect("open");
    assert_eq!((o.id, o.status), (id, SagaStatus::Completed));
    wait_until("the repeat to be refused by the inbox", || async {
        (runtime.commit_stats().duplicates == 1).then_some(())
    })
    .await;
    let inputs = journal_inputs(backend.store.as_ref(), id).await;
    let charged = inputs
        .iter()
        .filter(|i| i.contains("step_succeeded"))
        .count();
    assert_eq!(charged, 3, "each step's success once: {inputs:?}");
    assert!(
        !inputs.iter().any(|i| i.starts_with("ignored:")),
        "the repeat never reached the machine: {inputs:?}"
    );
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_share_the_sagas_and_one_finishes_what_a_dropped_one_left() {
    let backend = Resources::new(Backend::PostgresNats).await;
    let ledger = MemoryLedger::new();
    let _participants = start_participants(
        backend.bus().await,
        ledger.clone(),
        skald_sagas::sim::SimConfig {
            seed: 3,
            decline_rate: 0.1,
            flaky_rate: 0.1,
            ..skald_sagas::sim::SimConfig::default()
        },
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let start = |bus: Arc<dyn Bus>| {
        Runtime::builder()
            .store(Arc::clone(&backend.store))
            .bus(bus)
            .register(&checkout)
            .options(RuntimeOptions {
                claim_lease: Duration::from_millis(500),
                outbox_poll_interval: Duration::from_millis(100),
                ..options()
            })
            .start()
    };
    let a = start(backend.bus().await).await.expect("first runtime");
    let b = start(backend.bus().await).await.expect("second runtime");

    let mut ids = Vec::new();
    for n in 0..200 {
        let order = Checkout::new(format!("order-{n}"), "c", Vec::new(), 100 + n);
        let runtime = if n % 2 == 0 { &a } else { &b };
        ids.push(
            runtime
                .start_saga(&checkout, &order)
                .await
                .expect("start")
                .id(),
        );
    }
    // The first process goes away mid-run, without a shutdown: its unacknowledged
    // replies come back (ack wait), its unpublished outbox rows are relayed once their
    // lease ends, its claimed wake-ups are claimed again.
    drop(a);

    let store = Arc::clone(&backend.store);
    let statuses = wait_until("every saga to settle", || {
        let store = Arc::clone(&store);
        let ids = ids.clone();
        async move {
            let mut statuses = Vec::new();
            for id in ids {
                let s = store.load(id).await.expect("load").expect("saga");
                if matches!(
                    s.state.status,
                    SagaStatus::Running | SagaStatus::Compensating
                ) {
                    return None;
                }
                statuses.push((id, s.state.status));
            }
            Some(statuses)
        }
    })
    .await;
    let failed: Vec<skald::ids::SagaId> = statuses
        .iter()
        .filter(|(_, s)| !matches!(s, SagaStatus::Completed | SagaStatus::Compensated))
        .map(|(id, _)| *id)
        .collect();
    if !failed.is_empty() {
        let letters = backend
            .store
            .dead_letters(false, 100)
            .await
            .expect("dead letters");
        let mut why = Vec::new();
        for id in &failed {
            why.push(format!(
                "{id}: {:?} journal {:?}",
                letters
                    .iter()
                    .find(|d| d.saga_id == Some(*id))
                    .map(|d| &d.reason),
                journal_inputs(backend.store.as_ref(), *id).await
            ));
        }
        panic!("none dead-lettered, but {} were: {why:#?}", failed.len());
    }
    let records = skald_sagas::sim::Ledger::records(&ledger)
        .await
        .expect("records");
    let report = skald_sagas::checkout::check_consistency(&statuses, &records);
    assert!(report.is_consistent(), "{:?}", report.violations);
    assert!(
        store
            .dead_letters(false, 10)
            .await
            .expect("dead letters")
            .is_empty(),
        "nothing dead-lettered"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_stops_the_runtime_with_a_schema_error() {
    let dir = TempDir::new();
    let url = dir.sqlite_url();
    let store = Arc::new(SqliteStore::connect(&url).await.expect("store"));
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let runtime = Runtime::builder()
        .store(store.clone())
        .bus(bus)
        .register(&checkout)
        .options(options())
        .start()
        .await
        .expect("start");
    // An operator (or a bad migration) removes a table under the running process.
    sqlx::query("DROP TABLE saga_journal")
        .execute(store.pool())
        .await
        .expect("drop table");
    let order = Checkout::new("order-1", "c", Vec::new(), 100);
    let err = runtime
        .start_saga(&checkout, &order)
        .await
        .expect_err("cannot commit");
    assert!(
        matches!(err, RuntimeError::Store(StoreError::Schema(_))),
        "{err:?}"
    );
    let fatal = tokio::time::timeout(DEADLINE, runtime.failed())
        .await
        .expect("the runtime reports the fatal error");
    let text = fatal.to_string();
    assert!(text.contains("saga_journal"), "names the table: {text}");
    runtime.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_postgres_is_named_at_start_up() {
    // Port 1 on loopback: nothing listens there.
    let err = skald::adapters::postgres::PostgresStore::connect(
        "postgres://skald:secret@127.0.0.1:1/skald",
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to PostgreSQL at postgres://skald:***@127.0.0.1:1/skald"),
        "says what it tried, without the password: {text}"
    );
}

/// Text PostgreSQL cannot hold (a NUL character) never blocks anything for good: a reply
/// whose error message carries one fails its commit, is redelivered `max_deliveries`
/// times and dead-lettered as poison; a message whose raw bytes hold one is
/// dead-lettered without its raw copy instead of coming back forever. The saga is
/// untouched by either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_database_cannot_hold_is_dead_lettered_not_redelivered_forever() {
    let backend = Resources::new(Backend::PostgresNats).await;
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    // Nobody answers: the test plays the inventory service.
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(Arc::clone(&bus))
        .register(&checkout)
        .options(RuntimeOptions {
            max_deliveries: 3,
            ..options()
        })
        .reply_keys(test_reply_keys())
        .start()
        .await
        .expect("start");
    let order = Checkout::new("order-1", "c", Vec::new(), 100);
    let id = runtime
        .start_saga(&checkout, &order)
        .await
        .expect("start")
        .id();
    let reply = |body: &'static [u8]| {
        let mut h = skald::ports::Headers::new();
        h.insert(wire::H_SAGA_ID, id.to_string());
        h.insert(wire::H_SAGA_TYPE, "checkout");
        h.insert(wire::H_STEP, "reserve_inventory");
        h.insert(wire::H_KIND, "action");
        h.insert(wire::H_ATTEMPT, "1");
        h.insert(
            wire::H_IDEMPOTENCY_KEY,
            format!("{id}:reserve_inventory:action"),
        );
        h.insert(wire::H_OUTCOME, "failure");
        as_reply_of(
            "inventory",
            Message {
                subject: String::new(),
                headers: h,
                payload: bytes::Bytes::from_static(body),
            },
        )
    };
    let store = Arc::clone(&backend.store);
    let poison_with = |needle: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .dead_letters(true, 10)
                .await
                .expect("dead letters")
                .into_iter()
                .find(|d| {
                    d.category == skald::ports::DeadLetterCategory::Poison
                        && d.reason.contains(needle)
                })
        }
    };

    // Valid JSON whose error message holds an escaped NUL: the transition cannot be
    // committed (PostgreSQL's jsonb refuses it).
    bus.publish(reply(
        b"{\"code\":\"bad\",\"message\":\"nul \\u0000 here\"}",
    ))
    .await
    .expect("publish");
    let first = wait_until("the reply to be dead-lettered after 3 deliveries", || {
        poison_with("not applied after 3 deliveries")
    })
    .await;
    assert_eq!(first.saga_id, Some(id));
    assert!(
        first.message.is_some(),
        "its raw copy could be kept: {first:?}"
    );

    // A raw NUL byte: not JSON (poison at once), and its raw copy cannot be stored.
    bus.publish(reply(b"{\"code\":\"bad\",\"message\":\"nul \x00 here\"}"))
        .await
        .expect("publish");
    let second = wait_until("the undecodable reply to be dead-lettered", || {
        poison_with("could not be stored")
    })
    .await;
    assert!(
        second.message.is_none(),
        "kept without the raw message: {second:?}"
    );

    let saga = store.load(id).await.expect("load").expect("saga");
    assert_eq!(
        saga.state.status,
        SagaStatus::Running,
        "the saga is untouched"
    );
    runtime.shutdown().await;
}
