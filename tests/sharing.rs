//! Runtimes that share a broker: teams that run different saga types on one NATS, and a
//! rolling deploy that adds a saga type. Each runtime reads the replies of its own types
//! through consumers of its own (`skald-orchestrator-<type>` for partition 0,
//! `skald-orchestrator-<type>-p<n>` for partition n), so neither rewrites the other's
//! consumers, and a reply of a type a process does not run never reaches it.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use skald::definition::{SagaDefinition, Step};
use skald::ids::SagaId;
use skald::machine::SagaStatus;
use skald::participant::{ParticipantHandle, serve};
use skald::ports::{Bus, DeadLetterCategory, SagaStore};
use skald::wire::Outcome;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::checkout_definition;
use skald_sagas::sim::MemoryLedger;

/// A second saga type, run by another team: one step, one participant.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Refund {
    order_id: String,
    refund_id: Option<String>,
}

fn refund_definition() -> SagaDefinition<Refund> {
    SagaDefinition::<Refund>::builder("refund", 1)
        .step(
            Step::new("refund_payment")
                .action(
                    "skald.cmd.refunds.refund",
                    |r: &Refund| json!({ "order_id": r.order_id }),
                )
                .on_success(|r: &mut Refund, out: serde_json::Value| {
                    r.refund_id = out["refund_id"].as_str().map(str::to_owned);
                })
                .timeout(Duration::from_secs(5)),
        )
        .build()
        .expect("a valid definition")
}

async fn refunds_service(bus: Arc<dyn Bus>) -> ParticipantHandle {
    serve(
        bus,
        "skald.cmd.refunds.>",
        "refunds",
        16,
        |cmd| async move {
            let order = cmd.payload["order_id"].as_str().unwrap_or("?").to_owned();
            Outcome::Success(json!({ "refund_id": format!("rf-{order}") }))
        },
    )
    .await
    .expect("serve refunds")
}

async fn runtime_for(
    store: &Arc<dyn SagaStore>,
    bus: Arc<dyn Bus>,
    register: impl FnOnce(skald::RuntimeBuilder) -> skald::RuntimeBuilder,
) -> Runtime {
    register(
        Runtime::builder()
            .store(Arc::clone(store))
            .bus(bus)
            .options(RuntimeOptions {
                metrics_interval: Duration::ZERO,
                ..options()
            }),
    )
    .start()
    .await
    .expect("runtime starts")
}

/// Waits until every saga of `ids` is in `want` in `store`.
async fn all_in(store: &Arc<dyn SagaStore>, ids: &[SagaId], want: SagaStatus) {
    wait_until("every saga to finish", || {
        let store = Arc::clone(store);
        let ids = ids.to_vec();
        async move {
            for id in ids {
                let s = store.load(id).await.expect("load").expect("saga");
                if s.state.status != want {
                    return None;
                }
            }
            Some(())
        }
    })
    .await
}

async fn no_poison(store: &Arc<dyn SagaStore>) {
    let dead = store.dead_letters(false, 100).await.expect("dead letters");
    let poison: Vec<_> = dead
        .iter()
        .filter(|d| d.category == DeadLetterCategory::Poison)
        .collect();
    assert!(poison.is_empty(), "poison messages: {poison:#?}");
}

/// The filter subjects of durable consumer `name` on the replies stream.
async fn consumer_filters(bus: &skald::adapters::nats::NatsBus, name: &str) -> Vec<String> {
    let js = async_nats::jetstream::new(bus.client().clone());
    let stream = js.get_stream("SKALD_REPLIES").await.expect("stream");
    let info = stream
        .consumer_info(name)
        .await
        .unwrap_or_else(|e| panic!("consumer {name}: {e}"));
    let mut filters = info.config.filter_subjects.clone();
    if !info.config.filter_subject.is_empty() {
        filters.push(info.config.filter_subject.clone());
    }
    filters
}

async fn nats_bus(server: &NatsServer) -> skald::adapters::nats::NatsBus {
    skald::adapters::nats::NatsBus::connect(skald::adapters::nats::NatsOptions {
        ack_wait: Duration::from_secs(5),
        ..skald::adapters::nats::NatsOptions::new(server.url())
    })
    .await
    .expect("connect")
}

/// Two teams, two stores, one broker: the checkout runtime and the refund runtime run
/// side by side; every saga of both finishes, nothing is dead-lettered, and each type
/// has its own consumer with its own filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_with_different_saga_types_share_one_broker() {
    let server = NatsServer::start();
    let (dir_a, dir_b) = (TempDir::new(), TempDir::new());
    let store_a = sqlite_store(&dir_a).await;
    let store_b = sqlite_store(&dir_b).await;
    let bus_a = nats_bus(&server).await;
    let bus_b = nats_bus(&server).await;
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let refund = refund_definition();
    let a = runtime_for(&store_a, Arc::new(bus_a.clone()), |b| b.register(&checkout)).await;
    let b = runtime_for(&store_b, Arc::new(bus_b.clone()), |b| b.register(&refund)).await;
    let participants = start_participants(
        Arc::new(nats_bus(&server).await),
        MemoryLedger::new(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let refunds = refunds_service(Arc::new(nats_bus(&server).await)).await;

    let n = 40;
    let mut checkouts = Vec::new();
    let mut refunds_started = Vec::new();
    for i in 0..n {
        checkouts.push(
            a.start_saga(&checkout, &tea_order(&format!("o-{i}")))
                .await
                .expect("start checkout")
                .id(),
        );
        let r = Refund {
            order_id: format!("o-{i}"),
            refund_id: None,
        };
        refunds_started.push(b.start_saga(&refund, &r).await.expect("start refund").id());
    }
    all_in(&store_a, &checkouts, SagaStatus::Completed).await;
    all_in(&store_b, &refunds_started, SagaStatus::Completed).await;
    let one = store_b
        .load(refunds_started[0])
        .await
        .expect("load")
        .expect("saga");
    assert_eq!(one.state.data["refund_id"], "rf-o-0");
    no_poison(&store_a).await;
    no_poison(&store_b).await;
    // One consumer per type and partition: partition 0's keeps the name every type's
    // replies were read with before partitions.
    assert_eq!(
        consumer_filters(&bus_a, "skald-orchestrator-checkout").await,
        vec!["skald.reply.*.checkout.0".to_owned()]
    );
    assert_eq!(
        consumer_filters(&bus_a, "skald-orchestrator-checkout-p15").await,
        vec!["skald.reply.*.checkout.15".to_owned()]
    );
    assert_eq!(
        consumer_filters(&bus_b, "skald-orchestrator-refund-p7").await,
        vec!["skald.reply.*.refund.7".to_owned()]
    );
    drop((participants, refunds));
    a.shutdown().await;
    b.shutdown().await;
}

/// A rolling deploy on one store: the old build runs checkouts; the new build, which
/// also registers `refund`, starts beside it; the old one stops with checkouts in
/// flight. Every checkout finishes (the new build takes over its replies through the
/// same consumer), the refunds run, the checkout consumer is unchanged, and nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_that_adds_a_type_disturbs_nothing() {
    let server = NatsServer::start();
    let dir = TempDir::new();
    let shared = sqlite_store(&dir).await;
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let refund = refund_definition();
    // Shipping is down at first, so the old build stops with every checkout waiting
    // on it.
    let ledger = MemoryLedger::new();
    let participant_bus: Arc<dyn Bus> = Arc::new(nats_bus(&server).await);
    let mut participants = start_participants(
        Arc::clone(&participant_bus),
        ledger.clone(),
        reliable(),
        no_script(),
        &["inventory", "payment"],
    )
    .await;
    let refunds = refunds_service(Arc::new(nats_bus(&server).await)).await;
    let old_bus = nats_bus(&server).await;
    let old = runtime_for(&shared, Arc::new(old_bus.clone()), |b| {
        b.register(&checkout)
    })
    .await;
    let before = consumer_filters(&old_bus, "skald-orchestrator-checkout").await;
    let mut checkouts = Vec::new();
    for i in 0..40 {
        checkouts.push(
            old.start_saga(&checkout, &tea_order(&format!("o-{i}")))
                .await
                .expect("start")
                .id(),
        );
    }
    wait_until("every checkout to wait on shipping", || {
        let (store, ids) = (Arc::clone(&shared), checkouts.clone());
        async move {
            for id in ids {
                let s = store.load(id).await.expect("load").expect("saga");
                if s.state.pending.is_none_or(|p| p.step != 2) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let new_bus = nats_bus(&server).await;
    let new = runtime_for(&shared, Arc::new(new_bus.clone()), |b| {
        b.register(&checkout).register(&refund)
    })
    .await;
    old.shutdown().await;
    participants.extend(
        start_participants(
            participant_bus,
            ledger,
            reliable(),
            no_script(),
            &["shipping"],
        )
        .await,
    );
    let mut more = Vec::new();
    for i in 0..20 {
        let r = Refund {
            order_id: format!("o-{i}"),
            refund_id: None,
        };
        more.push(
            new.start_saga(&refund, &r)
                .await
                .expect("start refund")
                .id(),
        );
        checkouts.push(
            new.start_saga(&checkout, &tea_order(&format!("n-{i}")))
                .await
                .expect("start")
                .id(),
        );
    }
    all_in(&shared, &checkouts, SagaStatus::Completed).await;
    all_in(&shared, &more, SagaStatus::Completed).await;
    no_poison(&shared).await;
    assert_eq!(
        consumer_filters(&new_bus, "skald-orchestrator-checkout").await,
        before,
        "adding a type leaves the running type's consumer as it was"
    );
    drop((participants, refunds));
    new.shutdown().await;
}
