//! Bounded history: a saga retried 10,000 times keeps a bounded journal that still
//! replays; finished sagas are deleted after the retention period by one sweeper.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use skald::definition::{SagaDefinition, Step};
use skald::machine::SagaStatus;
use skald::participant::serve;
use skald::retry::RetryPolicy;
use skald::sagas::checkout::{Checkout, LineItem, subjects};
use skald::wire::Outcome;
use skald::{Runtime, RuntimeOptions};

const RETRIES: u32 = 10_000;

fn definition() -> SagaDefinition<Checkout> {
    let quick = RetryPolicy {
        max_attempts: RETRIES + 10,
        initial_delay: Duration::from_millis(1),
        multiplier: 1.0,
        max_delay: Duration::from_millis(1),
        jitter: 0.0,
    };
    let step = |name: &str, subject: &str| {
        Step::new(name)
            .action(
                subject.to_owned(),
                |c: &Checkout| json!({ "order_id": c.order_id }),
            )
            .retry(quick)
            .timeout(Duration::from_secs(5))
    };
    SagaDefinition::<Checkout>::builder("checkout", 1)
        .step(step("reserve_inventory", subjects::RESERVE))
        .step(step("ship_order", subjects::SHIP))
        .build()
        .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_retried_10000_times_keeps_a_bounded_journal_that_replays() {
    let backend = Backend::new(StoreKind::Memory).await;
    let bus = backend.bus().await;
    let def = definition();
    // Shipping fails (retryably) 10,000 times, then ships.
    let shipping_calls = Arc::new(AtomicU32::new(0));
    let calls = Arc::clone(&shipping_calls);
    let _participant = serve(Arc::clone(&bus), "skald.cmd.>", "all", 64, move |cmd| {
        let n = if cmd.subject == subjects::SHIP {
            calls.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            0
        };
        async move {
            if n > 0 && n <= RETRIES {
                skald::participant::retryable("busy", format!("attempt {n}: try later"))
            } else {
                Outcome::Success(json!({}))
            }
        }
    })
    .await
    .expect("serve");
    let runtime = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(bus)
        .register(&def)
        .options(RuntimeOptions {
            journal_retry_window: 10,
            ..options()
        })
        .start()
        .await
        .expect("start");
    let order = Checkout::new(
        "o-1",
        "c-1",
        vec![LineItem {
            sku: "tea".into(),
            quantity: 1,
        }],
        100,
    );
    let id = runtime.start_saga(&def, &order).await.expect("start");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let saga = loop {
        let s = backend.store.load(id).await.expect("load").expect("stored");
        if s.state.status.is_terminal() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saga did not finish in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    runtime.shutdown().await;
    assert_eq!(saga.state.status, SagaStatus::Completed);
    assert_eq!(shipping_calls.load(Ordering::SeqCst), RETRIES + 1);
    assert_eq!(saga.state.pending, None);

    let journal = backend.store.journal(id).await.expect("journal");
    // started, reserve's reply, 10 attempts of shipping one by one (a failure and a
    // backoff's end each), a snapshot where compaction starts, one where it ends, the
    // success: about 25 entries, not 20,000.
    assert!(journal.len() <= 30, "{} journal entries", journal.len());
    let snapshots = journal.iter().filter(|e| e.kind == "snapshot").count();
    assert_eq!(snapshots, 2, "{journal:#?}");
    // The compacted journal still replays to the stored state.
    let replayed = skald::replay::check(def.definition(), &saga.state, &journal).expect("replay");
    assert_eq!(replayed.divergence, None);
    assert_eq!(replayed.state, saga.state);
}
