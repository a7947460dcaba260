//! NATS-specific failure tests, each on a nats-server of its own (loopback, free port,
//! temp store dir): the broker killed and restarted under load, an unreachable broker at
//! start-up.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use skald::Runtime;
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::machine::SagaStatus;
use skald::retry::RetryPolicy;
use skald_sagas::checkout::{CheckoutTiming, check_consistency, checkout_definition};
use skald_sagas::sim::{Ledger, MemoryLedger};

/// A runtime on `backend` whose checkout steps retry patiently (`max_attempts` attempts,
/// backoff up to `max_delay`) with a reply timeout of `timeout`.
async fn patient_runtime(
    backend: &Resources,
    bus: Arc<dyn skald::ports::Bus>,
    max_attempts: u32,
    max_delay: Duration,
    timeout: Duration,
) -> (
    Runtime,
    skald::definition::SagaDefinition<skald_sagas::checkout::Checkout>,
) {
    let patient = RetryPolicy {
        max_attempts,
        initial_delay: Duration::from_millis(20),
        multiplier: 2.0,
        max_delay,
        jitter: 1.0,
    };
    let checkout = checkout_definition(CheckoutTiming {
        retry: patient,
        compensation_retry: patient,
        timeout,
    })
    .expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(bus)
        .register(&checkout)
        .options(options())
        .start()
        .await
        .expect("start");
    (runtime, checkout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_under_load_loses_nothing() {
    let mut backend = Resources::new(Backend::SqliteNats).await;
    let ledger = MemoryLedger::new();
    let bus = backend.bus().await;
    let participants = start_participants(
        bus.clone(),
        ledger.clone(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    // Patient policies: an outage of a few seconds must not exhaust the retries.
    let (runtime, checkout) = patient_runtime(
        &backend,
        bus.clone(),
        20,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
    .await;
    let mut outcomes = runtime.outcomes();

    let total = 200;
    let mut ids = Vec::new();
    for i in 0..total {
        let order = skald_sagas::checkout::Checkout::new(format!("o-{i}"), "c", vec![], 100);
        ids.push(
            runtime
                .start_saga(&checkout, &order)
                .await
                .expect("start saga")
                .id(),
        );
    }
    // Kill the broker once some sagas have finished and most are in flight.
    let mut settled: HashMap<_, SagaStatus> = next_outcomes(&mut outcomes, 20, DEADLINE)
        .await
        .into_iter()
        .map(|o| (o.id, o.status))
        .collect();
    let server = backend.nats.as_mut().expect("own server");
    server.kill();
    let in_flight = total - settled.len();
    server.restart();
    assert!(in_flight > 0, "the kill happened mid-run");

    Wait::new(format!(
        "the {in_flight} sagas unfinished at the kill to settle after the broker restart"
    ))
    .within(Duration::from_secs(90))
    .receive(
        async || outcomes.recv().await,
        async |o| {
            settled.insert(o.id, o.status);
            settled.len() == total
        },
    )
    .await;
    assert!(
        settled.values().all(|s| *s == SagaStatus::Completed),
        "no failure was injected but the broker's: {:?}",
        settled
            .values()
            .filter(|s| **s != SagaStatus::Completed)
            .count()
    );
    let records = ledger.records().await.expect("records");
    let sagas: Vec<_> = settled.iter().map(|(k, v)| (*k, *v)).collect();
    let report = check_consistency(&sagas, &records);
    assert!(report.is_consistent(), "{:?}", report.violations);
    assert_eq!(report.checked, total);
    assert!(
        backend
            .store
            .dead_letters(true, 10)
            .await
            .expect("dead letters")
            .is_empty(),
        "nothing dead-lettered"
    );
    runtime.shutdown().await;
    drop(participants);
}

#[tokio::test]
async fn unreachable_broker_at_start_up_names_the_url() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let err = NatsBus::connect(NatsOptions::new(url.as_str()))
        .await
        .expect_err("nothing listens there");
    assert!(err.to_string().contains(&url), "{err}");

    let err = NatsBus::connect(NatsOptions {
        wait_for_server: Some(Duration::from_millis(600)),
        ..NatsOptions::new(url.as_str())
    })
    .await
    .expect_err("still nothing listens there");
    let text = err.to_string();
    assert!(text.contains(&url) && text.contains("attempts"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_broker_that_comes_up_late() {
    let mut server = NatsServer::start();
    let url = server.url();
    server.kill();
    let connecting = tokio::spawn(NatsBus::connect(NatsOptions {
        wait_for_server: Some(Duration::from_secs(20)),
        ..NatsOptions::new(url.as_str())
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    let bus = connecting
        .await
        .expect("join")
        .expect("connects once the broker is up");
    assert!(bus.client().server_info().jetstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_for_a_while_is_retried_until_it_returns() {
    let backend = Resources::new(Backend::SqliteNats).await;
    let ledger = MemoryLedger::new();
    let bus = backend.bus().await;
    // Shipping is down at first.
    let mut participants = start_participants(
        bus.clone(),
        ledger.clone(),
        reliable(),
        no_script(),
        &["inventory", "payment"],
    )
    .await;
    let (runtime, checkout) = patient_runtime(
        &backend,
        bus.clone(),
        50,
        Duration::from_millis(100),
        Duration::from_millis(300),
    )
    .await;
    let mut outcomes = runtime.outcomes();
    let mut ids = Vec::new();
    for i in 0..10 {
        let order = skald_sagas::checkout::Checkout::new(format!("o-{i}"), "c", vec![], 100);
        ids.push(
            runtime
                .start_saga(&checkout, &order)
                .await
                .expect("start saga")
                .id(),
        );
    }
    // Wait until every saga has timed out on shipping at least twice (retries with backoff).
    let store = Arc::clone(&backend.store);
    wait_until("two shipping timeouts for every saga", || {
        let store = Arc::clone(&store);
        let ids = ids.clone();
        async move {
            for id in &ids {
                let inputs = journal_inputs(store.as_ref(), *id).await;
                if inputs.iter().filter(|i| *i == "timed_out").count() < 2 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    // Shipping comes back: it finds every attempt's command waiting in the stream.
    participants.extend(
        start_participants(
            bus.clone(),
            ledger.clone(),
            reliable(),
            no_script(),
            &["shipping"],
        )
        .await,
    );
    let settled: HashMap<_, _> = await_outcomes(&mut outcomes, &ids)
        .await
        .into_iter()
        .map(|o| (o.id, o.status))
        .collect();
    assert!(
        settled.values().all(|s| *s == SagaStatus::Completed),
        "{settled:?}"
    );
    let records = ledger.records().await.expect("records");
    let sagas: Vec<_> = settled.iter().map(|(k, v)| (*k, *v)).collect();
    let report = check_consistency(&sagas, &records);
    assert!(
        report.is_consistent(),
        "shipped exactly once: {:?}",
        report.violations
    );
    // The attempts that had timed out were answered late (`deadline_passed`, without
    // shipping: skald had moved on; or, when one came after the shipment, with the
    // recorded success): recorded, ignored.
    let first = ids[0];
    wait_until("late replies recorded as ignored", || {
        let store = Arc::clone(&store);
        async move {
            let inputs = journal_inputs(store.as_ref(), first).await;
            inputs
                .iter()
                .any(|i| i == "ignored:step_succeeded" || i == "ignored:step_failed")
                .then_some(())
        }
    })
    .await;
    runtime.shutdown().await;
    drop(participants);
}

#[tokio::test]
async fn credentials_pass_through_to_the_server() {
    let server = NatsServer::start_with(&["--auth", "s3cret-token"]);
    let err = NatsBus::connect(NatsOptions::new(server.url()))
        .await
        .expect_err("the server wants a token");
    assert!(err.to_string().contains(&server.url()), "{err}");
    let bus = NatsBus::connect(NatsOptions {
        token: Some("s3cret-token".into()),
        ..NatsOptions::new(server.url())
    })
    .await
    .expect("the token is passed through");
    assert!(bus.client().server_info().jetstream);
}

/// Lifecycle events in their public schema (`skald.event/1`), as a plain NATS subscriber
/// sees them: every saga's events in order, from `started` to its terminal event, each
/// carrying its correlation id (the saga) and its causation id (for a step's success,
/// the participant's reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_reach_a_plain_subscriber_in_order_per_saga() {
    use futures_util::StreamExt;
    use skald::ids::SagaId;
    use skald::wire::{self, EventV1};

    let backend = Resources::new(Backend::SqliteNats).await;
    let url = backend.nats.as_ref().expect("a nats-server").url();
    let client = async_nats::connect(url.as_str())
        .await
        .expect("a plain NATS client");
    let mut events = client
        .subscribe("skald.evt.checkout.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    let config = skald_sagas::sim::SimConfig {
        seed: 11,
        decline_rate: 0.4,
        flaky_rate: 0.0,
        ..skald_sagas::sim::SimConfig::default()
    };
    let mut env = TestEnv::start(&backend, MemoryLedger::new(), config, no_script()).await;
    let mut ids = Vec::new();
    for n in 0..12 {
        ids.push(env.start_order(n).await);
    }
    let statuses = env.settle(&ids).await;
    assert!(
        statuses.values().any(|s| *s == SagaStatus::Compensated)
            && statuses.values().any(|s| *s == SagaStatus::Completed),
        "both outcomes are exercised: {statuses:?}"
    );

    let terminal = |e: &EventV1| e.event == "completed" || e.event == "compensated";
    let mut seen: HashMap<SagaId, Vec<EventV1>> = HashMap::new();
    Wait::new("every saga's terminal event")
        .receive(
            async || events.next().await,
            async |msg| {
                let ev: EventV1 =
                    serde_json::from_slice(&msg.payload).expect("a skald.event/1 body");
                let headers = msg.headers.expect("headers");
                assert_eq!(ev.schema, wire::EVENT_SCHEMA);
                assert_eq!(
                    headers.get(wire::H_EVENT_SCHEMA).map(|v| v.as_str()),
                    Some(wire::EVENT_SCHEMA)
                );
                assert_eq!(
                    headers.get(wire::H_CAUSATION_ID).map(|v| v.as_str()),
                    Some(ev.causation_id.as_str())
                );
                assert_eq!(
                    msg.subject.as_str(),
                    format!("skald.evt.checkout.{}", ev.event)
                );
                assert_eq!(ev.correlation_id, ev.saga_id.to_string());
                seen.entry(ev.saga_id).or_default().push(ev);
                seen.values().filter(|evs| evs.iter().any(terminal)).count() == ids.len()
            },
        )
        .await;

    for id in &ids {
        let evs = &seen[id];
        let names: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names.first(), Some(&"started"), "{id}: {names:?}");
        assert!(
            evs.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
            "{id}: in order: {names:?}"
        );
        assert_eq!(
            names.iter().filter(|n| **n == "started").count(),
            1,
            "{id}: {names:?}"
        );
        match statuses[id] {
            SagaStatus::Completed => {
                assert_eq!(
                    names,
                    [
                        "started",
                        "step_succeeded",
                        "step_succeeded",
                        "step_succeeded",
                        "completed"
                    ],
                    "{id}"
                );
            }
            SagaStatus::Compensated => {
                let failed = names.iter().position(|n| *n == "step_failed");
                let compensating = names.iter().position(|n| *n == "compensating");
                assert!(
                    failed.is_some() && failed < compensating,
                    "{id}: a failure, then compensation: {names:?}"
                );
                assert_eq!(names.last(), Some(&"compensated"), "{id}: {names:?}");
            }
            other => panic!("{id}: unexpected status {other:?}"),
        }
        // A step's success was caused by the participant's reply (its Nats-Msg-Id).
        for e in evs.iter().filter(|e| e.event == "step_succeeded") {
            let step = e.step.as_deref().expect("a step");
            let kind = e.kind.expect("a kind");
            let attempt = e.attempt.expect("an attempt");
            assert_eq!(
                e.causation_id,
                format!("reply:{id}:{step}:{}:{attempt}:success", kind.as_str()),
                "{id}"
            );
        }
        assert_eq!(evs[0].causation_id, format!("started:{id}:1"));
    }
    env.shutdown().await;
}
