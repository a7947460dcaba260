//! Bounded history: a saga retried 10,000 times keeps a bounded journal that still
//! replays; finished sagas are deleted after the retention period by one sweeper, keyed
//! ones excepted.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use skald::definition::{SagaDefinition, Step};
use skald::journal::JournalRecord;
use skald::machine::SagaStatus;
use skald::participant::serve;
use skald::retry::RetryPolicy;
use skald::wire::Outcome;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{Checkout, LineItem, subjects};

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
    let backend = Resources::new(Backend::MemoryInProcess).await;
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
    let id = runtime.start_saga(&def, &order).await.expect("start").id();
    let saga = Wait::new("the saga to finish")
        .within(Duration::from_secs(300))
        .every(Duration::from_millis(50))
        .until_ok(async || {
            let s = backend.store.load(id).await.expect("load").expect("stored");
            if s.state.status.is_terminal() {
                Ok(s)
            } else {
                Err(format!(
                    "{}, {} shipping calls",
                    s.state.status,
                    shipping_calls.load(Ordering::SeqCst)
                ))
            }
        })
        .await;
    runtime.shutdown().await;
    assert_eq!(saga.state.status, SagaStatus::Completed);
    assert_eq!(shipping_calls.load(Ordering::SeqCst), RETRIES + 1);
    assert_eq!(saga.state.pending, None);

    let journal = backend.store.journal(id).await.expect("journal");
    // started, reserve's reply, 10 attempts of shipping one by one (a failure and a
    // backoff's end each), a snapshot where compaction starts, one where it ends, the
    // success: 1 + 1 + 20 + 2 + 1 = 25 entries, not 20,000.
    assert_eq!(journal.len(), 25, "{journal:#?}");
    let snapshots = journal
        .iter()
        .filter(|e| matches!(e.record(), Ok(JournalRecord::Snapshot(_))))
        .count();
    assert_eq!(snapshots, 2, "{journal:#?}");
    // The compacted journal still replays to the stored state.
    let replayed = skald::replay::check(def.definition(), &saga.state, &journal).expect("replay");
    assert_eq!(replayed.divergence, None);
    assert_eq!(replayed.state, saga.state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_exactly_the_finished_sagas_older_than_the_period() {
    use skald::adapters::sqlite::SqliteStore;
    use skald::machine::Timestamp;
    use skald::ports::{Clock, ManualClock, SagaQueries, SagaStore};
    use skald_sagas::checkout::{CheckoutTiming, checkout_definition};
    use skald_sagas::scripted::Scripted;
    use skald_sagas::sim::SimServices;

    let dir = TempDir::new();
    let sqlite = Arc::new(SqliteStore::connect(&dir.sqlite_url()).await.expect("open"));
    let store: Arc<dyn SagaStore> = sqlite.clone();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let bus: Arc<dyn skald::ports::Bus> = Arc::new(skald::adapters::memory::MemoryBus::new());
    let scripted = Scripted::new(Duration::ZERO);
    let mut participants = Vec::new();
    for (service, subject) in SimServices::services() {
        let scripted = scripted.clone();
        participants.push(
            serve(Arc::clone(&bus), subject, service, 16, move |cmd| {
                let scripted = scripted.clone();
                async move { scripted.handle(cmd).await }
            })
            .await
            .expect("serve"),
        );
    }
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let retention = Duration::from_secs(3_600);
    let runtime = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(bus)
        .clock(clock.clone())
        .register(&checkout)
        .options(RuntimeOptions {
            retention: Some(retention),
            sweep_interval: Duration::from_millis(50),
            ..options()
        })
        .start()
        .await
        .expect("start");
    let order = |id: &str| {
        Checkout::new(
            id,
            "c",
            vec![LineItem {
                sku: "tea".into(),
                quantity: 1,
            }],
            100,
        )
    };
    // Old: two completed, one compensated, one dead-lettered, one still running.
    let mut old_finished = Vec::new();
    for (name, want) in [
        ("ok-1", SagaStatus::Completed),
        ("ok-2", SagaStatus::Completed),
        ("decline-1", SagaStatus::Compensated),
    ] {
        let id = runtime
            .start_saga(&checkout, &order(name))
            .await
            .expect("start")
            .id();
        wait_status(store.as_ref(), id, want).await;
        old_finished.push(id);
    }
    // Old and keyed: a business key names one saga for good, so it is never swept.
    let old_keyed = runtime
        .start_saga_keyed(&checkout, "order-ok-k", &order("ok-k"))
        .await
        .expect("start keyed")
        .id();
    assert_eq!(old_keyed.as_uuid().get_version_num(), 8);
    wait_status(store.as_ref(), old_keyed, SagaStatus::Completed).await;
    let old_failed = runtime
        .start_saga(&checkout, &order("broken-1"))
        .await
        .expect("start")
        .id();
    wait_status(store.as_ref(), old_failed, SagaStatus::Failed).await;
    let old_running = runtime
        .start_saga(&checkout, &order("hang-1"))
        .await
        .expect("start")
        .id();
    wait_until("the hanging saga to wait on shipping", || async {
        let s = store.load(old_running).await.expect("load")?;
        s.state.pending.filter(|p| p.step == 2).map(|_| ())
    })
    .await;

    // Poison records: one of no saga (swept with the old sagas), one of a saga that
    // still exists (kept).
    let poison = |saga_id: Option<skald::ids::SagaId>| skald::ports::DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: skald::ports::DeadLetterCategory::Poison,
        saga_id,
        saga_type: Some("checkout".into()),
        step: None,
        kind: None,
        reason: "forged reply: no token".into(),
        attempts: 1,
        message: None,
        at: clock.now(),
        resolved_at: None,
    };
    let orphan = poison(None);
    let of_running = poison(Some(old_running));
    for r in [&orphan, &of_running] {
        store.record_poison(r, &[]).await.expect("record poison");
    }

    // An hour and a minute later: one more completes, recently.
    clock.advance(retention + Duration::from_secs(60));
    let recent = runtime
        .start_saga(&checkout, &order("ok-3"))
        .await
        .expect("start")
        .id();
    wait_status(store.as_ref(), recent, SagaStatus::Completed).await;

    let swept = wait_until("the sweeper to delete the old finished sagas", || async {
        let stats = sqlite.stats(Timestamp(0)).await.expect("stats");
        stats
            .sweeps
            .first()
            .filter(|s| s.deleted.sagas >= 3)
            .cloned()
    })
    .await;
    assert_eq!(swept.deleted.sagas, 3, "{swept:?}");
    assert!(swept.deleted.journal_entries >= 3 * 4, "{swept:?}");
    for id in &old_finished {
        assert!(store.load(*id).await.expect("load").is_none(), "{id} kept");
        assert!(store.journal(*id).await.expect("journal").is_empty());
    }
    for (id, want) in [
        (old_keyed, SagaStatus::Completed),
        (old_failed, SagaStatus::Failed),
        (old_running, SagaStatus::Running),
        (recent, SagaStatus::Completed),
    ] {
        let s = store.load(id).await.expect("load").expect("kept");
        assert_eq!(s.state.status, want);
        assert!(!store.journal(id).await.expect("journal").is_empty());
    }
    // The key still names its saga: started again, it is found, not started anew.
    let again = runtime
        .start_saga_keyed(&checkout, "order-ok-k", &order("ok-k"))
        .await
        .expect("start keyed again");
    assert!(again.existing(), "the keyed saga was found");
    assert_eq!(again.id(), old_keyed);
    // The poison record of no saga is gone (counted), the one of a live saga kept.
    assert_eq!(swept.deleted.dead_letters, 1, "{swept:?}");
    assert!(
        sqlite
            .dead_letters_of(orphan.id)
            .await
            .expect("dl")
            .is_empty()
    );
    assert_eq!(
        sqlite
            .dead_letters_of(of_running.id)
            .await
            .expect("dl")
            .len(),
        1
    );
    // The dead-lettered saga's dead letter is kept with it.
    assert_eq!(
        sqlite
            .dead_letters_of(*old_failed.as_uuid())
            .await
            .expect("dl")
            .len(),
        1
    );

    // One process sweeps: while the runtime holds the lease, nobody else gets it.
    let stats = sqlite.stats(Timestamp(0)).await.expect("stats");
    assert_eq!(stats.sweeps.len(), 1, "{:?}", stats.sweeps);
    let now = clock.now();
    assert!(
        !store
            .acquire_lease("retention", "another-process", now, Duration::from_secs(1))
            .await
            .expect("lease")
    );
    runtime.shutdown().await;
    // Once its lease ends, another takes over.
    clock.advance(Duration::from_secs(3_600));
    assert!(
        store
            .acquire_lease(
                "retention",
                "another-process",
                clock.now(),
                Duration::from_secs(1)
            )
            .await
            .expect("lease")
    );
    drop(participants);
}
