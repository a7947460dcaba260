//! Payload schema versions: saga data written at v1 read by a build at v3 through an
//! upcaster chain (v1→v2→v3), on load and on replay; a missing path dead-letters the
//! saga with the reason (no crash) and a re-drive continues once the upcaster is
//! there; `skald migrate-payloads` rewrites stored data in batches, interrupted and
//! resumed, then finds nothing left to do.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use skald::Runtime;
use skald::adapters::memory::MemoryBus;
use skald::adapters::sqlite::SqliteStore;
use skald::definition::{SagaDefinition, Step};
use skald::ids::SagaId;
use skald::journal::JournalRecord;
use skald::machine::SagaStatus;
use skald::participant::serve;
use skald::ports::{Bus, SagaStore};
use skald::retry::RetryPolicy;
use skald::wire::Outcome;

/// The `shop` saga: reserve, then charge. Its data is `{"order": .., "amount": 5}` at
/// v1, gains a currency at v2, and nests the amount at v3; the charge reads the v3
/// shape when the definition is at v3.
fn definition(data_version: u32) -> SagaDefinition<Value> {
    let patient = RetryPolicy {
        max_attempts: 10_000,
        initial_delay: Duration::from_millis(20),
        multiplier: 2.0,
        max_delay: Duration::from_millis(100),
        jitter: 1.0,
    };
    let charge = move |d: &Value| match data_version {
        1 => json!({ "cents": d["amount"] }),
        _ => json!({ "cents": d["amount"]["cents"], "currency": d["amount"]["currency"] }),
    };
    SagaDefinition::<Value>::builder("shop", 1)
        .data_version(data_version)
        .step(Step::new("reserve").action(
            "skald.cmd.shop.reserve",
            |d: &Value| json!({ "order": d["order"] }),
        ))
        .step(
            Step::new("charge")
                .action("skald.cmd.shop.charge", charge)
                .retry(patient)
                .schema_version(data_version),
        )
        .build()
        .expect("valid")
}

/// Shop data v1 → v2: a currency.
fn v1_to_v2(mut d: Value) -> Result<Value, String> {
    d["currency"] = json!("EUR");
    Ok(d)
}

/// Shop data v2 → v3: the amount nests with its currency.
fn v2_to_v3(mut d: Value) -> Result<Value, String> {
    let cents = d["amount"].take();
    let currency = d["currency"].take();
    d["amount"] = json!({ "cents": cents, "currency": currency });
    if let Some(o) = d.as_object_mut() {
        o.remove("currency");
    }
    Ok(d)
}

/// The chain the runtimes and the CLI share.
fn chain() -> skald::upcast::Upcasters {
    let mut chain = skald::upcast::Upcasters::new();
    chain.register("shop.data", 1, 2, v1_to_v2);
    chain.register("shop.data", 2, 3, v2_to_v3);
    chain
}

struct Shop {
    store: Arc<dyn SagaStore>,
    bus: Arc<dyn Bus>,
    open: Arc<AtomicBool>,
    charges: Arc<Mutex<Vec<(u32, Value)>>>,
    _participant: skald::participant::ParticipantHandle,
    dir: TempDir,
}

impl Shop {
    async fn new() -> Shop {
        let dir = TempDir::new();
        let store: Arc<dyn SagaStore> = Arc::new(
            SqliteStore::connect(&dir.sqlite_url())
                .await
                .expect("sqlite"),
        );
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let open = Arc::new(AtomicBool::new(false));
        let charges = Arc::new(Mutex::new(Vec::new()));
        let (o, c) = (Arc::clone(&open), Arc::clone(&charges));
        let participant = serve(
            Arc::clone(&bus),
            "skald.cmd.shop.>",
            "shop",
            16,
            move |cmd| {
                let outcome = if cmd.subject == "skald.cmd.shop.charge" {
                    if o.load(Ordering::SeqCst) {
                        c.lock()
                            .expect("lock")
                            .push((cmd.schema_version, cmd.payload.clone()));
                        Outcome::Success(json!({}))
                    } else {
                        skald::participant::retryable("closed", "the bank is closed")
                    }
                } else {
                    Outcome::Success(json!({}))
                };
                async move { outcome }
            },
        )
        .await
        .expect("serve");
        Shop {
            store,
            bus,
            open,
            charges,
            _participant: participant,
            dir,
        }
    }

    async fn runtime(&self, def: &SagaDefinition<Value>, with_upcasters: bool) -> Runtime {
        let b = Runtime::builder()
            .store(Arc::clone(&self.store))
            .bus(Arc::clone(&self.bus))
            .register(def)
            .reply_keys(test_reply_keys())
            .options(skald::RuntimeOptions {
                max_deliveries: 2,
                redelivery_delay: Duration::from_millis(10),
                ..options()
            });
        let b = if with_upcasters {
            b.upcasters(chain())
        } else {
            b
        };
        b.start().await.expect("start")
    }

    async fn wait(&self, id: SagaId, what: &str, f: impl Fn(&skald::ports::StoredSaga) -> bool) {
        wait_saga(self.store.as_ref(), id, what, f).await;
    }
}

fn order(n: u32) -> Value {
    json!({ "order": format!("o-{n}"), "amount": 5 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_written_at_v1_is_read_at_v3_and_a_missing_path_dead_letters_the_saga() {
    let shop = Shop::new().await;
    let (v1, v3) = (definition(1), definition(3));

    // At v1: two sagas wait on a closed bank.
    let rt = shop.runtime(&v1, false).await;
    let upcast = rt.start_saga(&v1, &order(1)).await.expect("start").id();
    let stranded = rt.start_saga(&v1, &order(2)).await.expect("start").id();
    for id in [upcast, stranded] {
        shop.wait(id, "waiting on the charge", |s| {
            s.state
                .pending
                .is_some_and(|p| p.step == 1 && p.attempt >= 2)
        })
        .await;
    }
    rt.shutdown().await;
    assert_eq!(
        shop.store
            .load(upcast)
            .await
            .expect("load")
            .expect("stored")
            .state
            .data_version,
        1
    );

    // At v3 without the upcasters: the next retry cannot read the data. The saga is
    // dead-lettered with the reason; the process goes on.
    let rt = shop.runtime(&v3, false).await;
    for id in [upcast, stranded] {
        shop.wait(id, "dead-lettered for unreadable data", |s| {
            s.state.status == SagaStatus::Failed
        })
        .await;
    }
    let failed = shop
        .store
        .load(stranded)
        .await
        .expect("load")
        .expect("stored");
    let dl = failed.state.dead_letter.expect("dead letter");
    assert_eq!(dl.error.code, "data_unreadable");
    assert_eq!(
        dl.error.message,
        "no upcaster path for shop.data from schema version 1 to 3 (registered steps: none)"
    );
    // A re-drive without the upcaster is refused with the same reason.
    let e = rt.redrive(stranded).await.expect_err("still unreadable");
    assert!(
        e.to_string().contains("no upcaster path for shop.data"),
        "{e}"
    );
    rt.shutdown().await;

    // With the chain registered, a re-drive brings the data up and the saga goes on.
    shop.open.store(true, Ordering::SeqCst);
    let rt = shop.runtime(&v3, true).await;
    for id in [upcast, stranded] {
        rt.redrive(id).await.expect("redrive");
        shop.wait(id, "completed at v3", |s| {
            s.state.status == SagaStatus::Completed
        })
        .await;
        let s = shop.store.load(id).await.expect("load").expect("stored");
        assert_eq!(s.state.data_version, 3);
        assert_eq!(
            s.state.data["amount"],
            json!({ "cents": 5, "currency": "EUR" })
        );
        assert!(s.state.data.get("currency").is_none());
    }
    // The charge commands carried the v3 payload and schema version.
    let charges = shop.charges.lock().expect("lock").clone();
    assert_eq!(charges.len(), 2);
    for (version, payload) in charges {
        assert_eq!(version, 3);
        assert_eq!(payload, json!({ "cents": 5, "currency": "EUR" }));
    }
    // The journal, which starts from v1 data, replays at v3 through the same chain.
    let s = shop
        .store
        .load(upcast)
        .await
        .expect("load")
        .expect("stored");
    let journal = shop.store.journal(upcast).await.expect("journal");
    let Ok(JournalRecord::Transition(first)) = journal[0].record() else {
        panic!("the journal starts with a transition: {:?}", journal[0]);
    };
    assert_eq!(first.data_version, Some(1));
    let r = skald::replay::replay_with(v3.definition(), upcast, &journal, None, &chain())
        .expect("replay");
    assert_eq!(r.state.data, s.state.data);
    assert_eq!(r.state.status, SagaStatus::Completed);
    let e = skald::replay::replay(v3.definition(), upcast, &journal, None).expect_err("no chain");
    assert!(e.to_string().contains("no upcaster path"), "{e}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_payloads_is_resumable_and_idempotent() {
    let shop = Shop::new().await;
    shop.open.store(true, Ordering::SeqCst);
    let v1 = definition(1);
    let rt = shop.runtime(&v1, false).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(rt.start_saga(&v1, &order(n)).await.expect("start").id());
    }
    for id in &ids {
        shop.wait(*id, "completed at v1", |s| {
            s.state.status == SagaStatus::Completed
        })
        .await;
    }
    rt.shutdown().await;

    let v3 = definition(3);
    let cli = skald::cli::Cli::new().register(&v3).with_upcasters(chain());
    let db = shop.dir.sqlite_url();
    let run = |args: &'static [&'static str]| {
        let cli = cli.clone();
        let db = db.clone();
        async move {
            let mut all = vec!["--db", db.as_str(), "--json", "migrate-payloads"];
            all.extend_from_slice(args);
            let out = cli.run(all).await.expect("migrate-payloads");
            serde_json::from_str::<Value>(&out).expect("JSON")
        }
    };
    let dry = run(&["--dry-run"]).await;
    assert_eq!(
        (dry["migrated"].as_u64(), dry["scanned"].as_u64()),
        (Some(10), Some(10))
    );
    let untouched = shop
        .store
        .load(ids[0])
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(untouched.state.data_version, 1, "a dry run changes nothing");

    // Interrupted after 4, resumed, then nothing left.
    let first = run(&["--max", "4", "--batch", "3"]).await;
    assert_eq!(first["migrated"], 4);
    assert_eq!(first["stopped_early"], true);
    let second = run(&["--batch", "3"]).await;
    assert_eq!(
        (
            second["migrated"].as_u64(),
            second["already_current"].as_u64()
        ),
        (Some(6), Some(4))
    );
    let third = run(&[]).await;
    assert_eq!(
        (
            third["migrated"].as_u64(),
            third["already_current"].as_u64()
        ),
        (Some(0), Some(10))
    );
    for id in &ids {
        let s = shop.store.load(*id).await.expect("load").expect("stored");
        assert_eq!(s.state.data_version, 3);
        assert_eq!(s.state.data["amount"]["currency"], "EUR");
        let journal = shop.store.journal(*id).await.expect("journal");
        let last = journal.last().expect("entries");
        let Ok(JournalRecord::Snapshot(snapshot)) = last.record() else {
            panic!("the journal ends with a snapshot: {last:?}");
        };
        assert!(snapshot.note.contains("1 to 3"), "{snapshot:?}");
    }
    // Replay checks still pass on the migrated sagas.
    let replayed = cli
        .run(["--db", db.as_str(), "replay", "--type", "shop", "--all"])
        .await
        .expect("every saga replays");
    assert!(replayed.contains("10 sagas: 10 same"), "{replayed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_left_in_the_outbox_by_an_older_build_goes_out_upcast() {
    use skald::ports::{DeadLetterCategory, DeadLetterRecord, Headers, Message, OutboxMessage};
    let shop = Shop::new().await;
    shop.open.store(true, Ordering::SeqCst);
    // A charge command as a v1 build wrote it to the outbox and crashed before
    // publishing (written here through record_poison, which stores outbox rows as is).
    let mut headers = Headers::new();
    for (name, value) in [
        (skald::wire::H_SAGA_ID, SagaId::new().to_string()),
        (skald::wire::H_SAGA_TYPE, "shop".to_owned()),
        (skald::wire::H_STEP, "charge".to_owned()),
        (skald::wire::H_KIND, "action".to_owned()),
        (skald::wire::H_ATTEMPT, "1".to_owned()),
        (skald::wire::H_IDEMPOTENCY_KEY, "k".to_owned()),
        (skald::wire::H_REPLY_TO, "skald.reply.shop".to_owned()),
        // As a build before schema versions wrote it: no version headers at all.
    ] {
        headers.insert(name, value);
    }
    let row = OutboxMessage {
        id: uuid::Uuid::now_v7(),
        message: Message {
            subject: "skald.cmd.shop.charge".into(),
            headers,
            payload: bytes::Bytes::from_static(b"{\"cents\":5}"),
        },
        available_at: skald::machine::Timestamp(0),
    };
    let marker = DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: DeadLetterCategory::Poison,
        saga_id: None,
        saga_type: None,
        step: None,
        kind: None,
        reason: "test fixture".into(),
        attempts: 1,
        message: None,
        at: skald::machine::Timestamp(0),
        resolved_at: None,
    };
    shop.store
        .record_poison(&marker, &[row])
        .await
        .expect("store the row");
    // The v3 build relays it, upcast by the upcaster registered for its subject.
    let rt = Runtime::builder()
        .store(Arc::clone(&shop.store))
        .bus(Arc::clone(&shop.bus))
        .register(&definition(3))
        .upcaster("skald.cmd.shop.charge", 1, 3, |mut p| {
            p["currency"] = json!("EUR");
            Ok(p)
        })
        .options(options())
        .start()
        .await
        .expect("start");
    let charges = Arc::clone(&shop.charges);
    wait_until("the relayed command to reach the participant", || async {
        let seen = charges.lock().expect("lock").clone();
        (!seen.is_empty()).then_some(())
    })
    .await;
    let seen = shop.charges.lock().expect("lock").clone();
    assert_eq!(seen, vec![(3, json!({ "cents": 5, "currency": "EUR" }))]);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_written_by_a_newer_build_is_left_to_it_not_dead_lettered() {
    let shop = Shop::new().await;
    let (v1, v3) = (definition(1), definition(3));
    // A v3 build starts a saga (its data at v3) that waits on the closed bank.
    let rt = shop.runtime(&v3, true).await;
    let id = rt
        .start_saga(
            &v3,
            &json!({ "order": "o-9", "amount": { "cents": 5, "currency": "EUR" } }),
        )
        .await
        .expect("start")
        .id();
    shop.wait(id, "waiting on the charge", |s| {
        s.state
            .pending
            .is_some_and(|p| p.step == 1 && p.attempt >= 2)
    })
    .await;
    rt.shutdown().await;
    // An older build (data v1) sees its timers fire: it cannot read v3 data, and must
    // not dead-letter the saga for it.
    let old = shop.runtime(&v1, false).await;
    let before = shop.store.load(id).await.expect("load").expect("stored");
    wait_until("the older build to defer the saga's timer", || async {
        (old.stats().deferred >= 1).then_some(())
    })
    .await;
    let after = shop.store.load(id).await.expect("load").expect("stored");
    assert_eq!(after.state.status, SagaStatus::Running);
    assert_eq!(after.state.data_version, 3);
    assert_eq!(
        after.version, before.version,
        "the older build changed nothing"
    );
    old.shutdown().await;
    // The v3 build takes it from there.
    shop.open.store(true, Ordering::SeqCst);
    let rt = shop.runtime(&v3, true).await;
    shop.wait(id, "completed", |s| s.state.status == SagaStatus::Completed)
        .await;
    rt.shutdown().await;
}

/// A reply the running build cannot apply (the saga's data was written by a newer
/// build) is deferred for as long as it takes: delivered well past `max_deliveries`
/// (2 here), it is not dead-lettered, and the newer build finishes the saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_a_build_cannot_apply_is_deferred_past_max_deliveries_never_poisoned() {
    let shop = Shop::new().await;
    let (v1, v3) = (definition(1), definition(3));
    let rt = shop.runtime(&v3, true).await;
    let id = rt
        .start_saga(
            &v3,
            &json!({ "order": "o-7", "amount": { "cents": 5, "currency": "EUR" } }),
        )
        .await
        .expect("start")
        .id();
    shop.wait(id, "waiting on the charge", |s| {
        s.state.pending.is_some_and(|p| p.step == 1)
    })
    .await;
    rt.shutdown().await;
    let old = shop.runtime(&v1, false).await;
    // The bank's answer to the charge, as the bank would publish it, reaches the old
    // build only.
    let saga = shop.store.load(id).await.expect("load").expect("stored");
    let attempt = saga.state.pending.expect("pending").attempt;
    let mut h = skald::ports::Headers::new();
    h.insert(skald::wire::H_SAGA_ID, id.to_string());
    h.insert(skald::wire::H_SAGA_TYPE, "shop");
    h.insert(skald::wire::H_STEP, "charge");
    h.insert(skald::wire::H_KIND, "action");
    h.insert(skald::wire::H_ATTEMPT, attempt.to_string());
    h.insert(
        skald::wire::H_IDEMPOTENCY_KEY,
        format!("{id}:charge:action"),
    );
    h.insert(skald::wire::H_OUTCOME, "success");
    let reply = as_reply_of(
        "shop",
        skald::ports::Message {
            subject: String::new(),
            headers: h,
            payload: b"{}".to_vec().into(),
        },
    );
    shop.bus.publish(reply).await.expect("publish");
    wait_until("the reply deferred past max_deliveries", || async {
        (old.stats().deferred >= 6).then_some(())
    })
    .await;
    assert_eq!(old.stats().poison, 0);
    let dead = shop
        .store
        .dead_letters(false, 10)
        .await
        .expect("dead letters");
    assert!(dead.is_empty(), "{dead:#?}");
    let after = shop.store.load(id).await.expect("load").expect("stored");
    assert_eq!(after.version, saga.version, "the old build changed nothing");
    old.shutdown().await;
    shop.open.store(true, Ordering::SeqCst);
    let rt = shop.runtime(&v3, true).await;
    shop.wait(id, "completed", |s| s.state.status == SagaStatus::Completed)
        .await;
    rt.shutdown().await;
}
