//! Partitioned ownership (docs/scaling.md): orchestrator nodes on one PostgreSQL and one
//! NATS share the partitions through leases in the store, each runs the sagas of its
//! own (their replies come to it: no cold loads, no conflicts), a node that leaves hands
//! its partitions over at once, and a node that dies leaves them to the others when its
//! leases end.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::hooked::HookedStore;
use common::*;
use skald::RuntimeError;
use skald::ids::SagaId;
use skald::machine::{SagaStatus, Timestamp};
use skald::ports::{Bus, Clock, SagaStore, SystemClock};
use skald::wire::IncomingCommand;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{Checkout, CheckoutTiming, checkout_definition};
use skald_sagas::sim::MemoryLedger;

/// The checkout saga with a reply timeout no wait here reaches: no attempt times out
/// while its partition changes hands.
fn checkout() -> skald::definition::SagaDefinition<Checkout> {
    checkout_definition(CheckoutTiming {
        timeout: Duration::from_secs(60),
        ..fast_timing()
    })
    .expect("valid definition")
}

fn node_options(lease: Duration) -> RuntimeOptions {
    RuntimeOptions {
        partition_lease: lease,
        metrics_interval: Duration::ZERO,
        ..options()
    }
}

async fn node(res: &Resources, bus: Arc<dyn Bus>, lease: Duration) -> Runtime {
    node_on(Arc::clone(&res.store), bus, lease).await
}

/// A node on `store` (the test's store, or a wrapper of it).
async fn node_on(store: Arc<dyn SagaStore>, bus: Arc<dyn Bus>, lease: Duration) -> Runtime {
    let checkout = checkout();
    Runtime::builder()
        .store(store)
        .bus(bus)
        .register(&checkout)
        .options(node_options(lease))
        .reply_keys(test_reply_keys())
        .start()
        .await
        .expect("node starts")
}

/// Starts `n` sagas on `node`, numbered from `first`.
async fn start_sagas(node: &Runtime, first: usize, n: usize) -> Vec<SagaId> {
    let checkout = checkout();
    let mut ids = Vec::with_capacity(n);
    for i in first..first + n {
        let handle = node
            .start_saga(&checkout, &tea_order(&format!("order-{i}")))
            .await
            .expect("saga starts");
        ids.push(handle.id());
    }
    ids
}

async fn all_completed(res: &Resources, ids: &[SagaId], within: Duration) {
    Wait::new(format!("{} sagas completed", ids.len()))
        .within(within)
        .every(Duration::from_millis(100))
        .until_ok(async || {
            let mut open = 0;
            for id in ids {
                let saga = res.store.load(*id).await.map_err(|e| e.to_string())?;
                match saga.map(|s| s.state.status) {
                    Some(SagaStatus::Completed) => {}
                    Some(SagaStatus::Compensated | SagaStatus::Failed) => {
                        panic!("saga {id} did not complete")
                    }
                    _ => open += 1,
                }
            }
            if open == 0 {
                Ok(())
            } else {
                Err(format!("{open} open"))
            }
        })
        .await;
}

/// Waits until the nodes hold `shares` partitions each, disjoint and covering all 16.
async fn balanced(nodes: &[&Runtime], shares: &[usize], within: Duration) {
    Wait::new(format!("partitions held {shares:?}"))
        .within(within)
        .every(Duration::from_millis(50))
        .until_ok(async || {
            let held: Vec<Vec<u32>> = nodes.iter().map(|n| n.held_partitions()).collect();
            let mut counts: Vec<usize> = held.iter().map(Vec::len).collect();
            counts.sort_unstable();
            let union: BTreeSet<u32> = held.iter().flatten().copied().collect();
            let total: usize = held.iter().map(Vec::len).sum();
            if counts == shares && union.len() == 16 && total == 16 {
                Ok(())
            } else {
                Err(format!("{held:?}"))
            }
        })
        .await;
}

/// Every command names the reply subject of its saga's partition.
fn recorder(seen: &Arc<Mutex<Vec<(SagaId, String)>>>) -> Script {
    let seen = Arc::clone(seen);
    Arc::new(move |cmd: &IncomingCommand| {
        seen.lock()
            .expect("lock")
            .push((cmd.envelope.saga_id, cmd.reply_to.clone()));
        None
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_partitions_and_each_runs_its_own_sagas() {
    let res = Resources::new(Backend::PostgresNats).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _participants = start_participants(
        res.bus().await,
        MemoryLedger::new(),
        reliable(),
        recorder(&seen),
        ALL_SERVICES,
    )
    .await;
    let lease = Duration::from_secs(10);
    let a = node(&res, res.bus().await, lease).await;
    assert_eq!(a.partition_count(), 16);
    assert_eq!(
        a.held_partitions(),
        (0..16).collect::<Vec<_>>(),
        "a lone node holds all"
    );
    let b = node(&res, res.bus().await, lease).await;
    // A renews every 2 s: it hands 8 over at its next renewal, B takes them at its own.
    balanced(&[&a, &b], &[8, 8], Duration::from_secs(15)).await;

    let ids_a = start_sagas(&a, 0, 60).await;
    let ids_b = start_sagas(&b, 100, 60).await;
    let (held_a, held_b) = (a.held_partitions(), b.held_partitions());
    assert!(ids_a.iter().all(|id| held_a.contains(&id.partition(16))));
    assert!(ids_b.iter().all(|id| held_b.contains(&id.partition(16))));
    let all: Vec<SagaId> = ids_a.iter().chain(&ids_b).copied().collect();
    all_completed(&res, &all, Duration::from_secs(30)).await;

    // Each saga's replies reached the node that started it: no cold load, no conflict.
    for n in [&a, &b] {
        let stats = n.stats();
        assert_eq!(stats.cold_activations, 0, "{stats:?}");
        assert_eq!(stats.conflicts, 0, "{stats:?}");
    }
    for (id, reply_to) in seen.lock().expect("lock").iter() {
        assert!(
            reply_to.ends_with(&format!(".checkout.{}", id.partition(16))),
            "{id}: {reply_to}"
        );
    }

    // A leaves: it hands its partitions over, and B takes them at its next renewal,
    // long before A's leases would have ended.
    let left = Instant::now();
    a.shutdown().await;
    balanced(&[&b], &[16], Duration::from_secs(8)).await;
    eprintln!(
        "handover on leaving: {:?} (lease {lease:?})",
        left.elapsed()
    );
    assert!(left.elapsed() < lease);
    let after = start_sagas(&b, 200, 20).await;
    all_completed(&res, &after, Duration::from_secs(30)).await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_partitions_move_when_its_leases_end() {
    let res = Resources::new(Backend::PostgresNats).await;
    let ledger = MemoryLedger::new();
    let bus = res.bus().await;
    // No payment service yet: the sagas wait at their charge.
    let _others = start_participants(
        bus.clone(),
        ledger.clone(),
        reliable(),
        no_script(),
        &["inventory", "shipping"],
    )
    .await;
    let lease = Duration::from_secs(2);
    let a = node(&res, res.bus().await, lease).await;
    let b = node(&res, res.bus().await, lease).await;
    balanced(&[&a, &b], &[8, 8], Duration::from_secs(10)).await;
    let ids = start_sagas(&a, 0, 40).await;
    let moved: BTreeSet<u32> = ids.iter().map(|id| id.partition(16)).collect();
    assert!(moved.iter().all(|p| a.held_partitions().contains(p)));
    Wait::new("every saga waiting at its charge")
        .every(Duration::from_millis(50))
        .until_ok(async || {
            let mut waiting = 0;
            for id in &ids {
                let saga = res.store.load(*id).await.map_err(|e| e.to_string())?;
                if saga
                    .and_then(|s| s.state.pending)
                    .is_some_and(|p| p.step == 1)
                {
                    waiting += 1;
                }
            }
            if waiting == ids.len() {
                Ok(())
            } else {
                Err(format!("{waiting} waiting"))
            }
        })
        .await;

    // A dies: no handover. Its partitions pass to B once its leases end.
    let died = Instant::now();
    drop(a);
    let _payment =
        start_participants(bus, ledger.clone(), reliable(), no_script(), &["payment"]).await;
    balanced(&[&b], &[16], Duration::from_secs(15)).await;
    let taken = died.elapsed();
    all_completed(&res, &ids, Duration::from_secs(30)).await;
    eprintln!(
        "a dead node's partitions taken after {taken:?} (lease {lease:?}); its sagas finished after {:?}",
        died.elapsed()
    );
    assert!(
        taken >= lease - Duration::from_millis(500),
        "taken before the lease ended: {taken:?}"
    );
    b.shutdown().await;
}

/// A node whose lease calls fail while the rest of its store answers cannot renew: its
/// renewer gives every partition up at the latest two renewals before the partition's
/// lease ends (module docs of `runtime/src/runtime/leases.rs`), so it stops running them
/// before anyone else may take them; the other node takes them once the leases end. Once the calls succeed
/// again, the node is a member again and the two share the partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_renew_gives_its_partitions_up_before_its_leases_end() {
    let res = Resources::new(Backend::PostgresNats).await;
    let lease = Duration::from_secs(2);
    let every = lease / 5;
    let hooked = HookedStore::new(Arc::clone(&res.store));
    let a = node_on(hooked.clone(), res.bus().await, lease).await;
    let b = node(&res, res.bus().await, lease).await;
    balanced(&[&a, &b], &[8, 8], Duration::from_secs(10)).await;
    let held_by_a: BTreeSet<u32> = a.held_partitions().into_iter().collect();

    hooked.fail_leases(true);
    let failed = Instant::now();
    // When A was first seen holding nothing (since the failure; wall clock), and when
    // the first of its partition leases ends.
    let mut gave_up: Option<(Duration, Timestamp, Timestamp)> = None;
    // When B was first seen holding one of A's partitions (since the failure; wall clock).
    let mut taken: Option<(Duration, Timestamp)> = None;
    let all_taken = Wait::new("A to give its partitions up and B to take all 16")
        .within(Duration::from_secs(10))
        .every(Duration::from_millis(10))
        .until(async || {
            let (held_a, held_b) = (a.held_partitions(), b.held_partitions());
            // Read after the holdings: at or after what they show.
            let (at, now) = (failed.elapsed(), SystemClock.now());
            if gave_up.is_none() && held_a.is_empty() {
                // A's leases as they stand: it cannot have renewed them since (its
                // lease calls fail), and B cannot have taken them before they ended.
                let leases = res
                    .store
                    .leases("partition/", Timestamp(0))
                    .await
                    .expect("the leases");
                let end = leases
                    .iter()
                    .filter(|l| l.holder == a.node_name())
                    .map(|l| l.until)
                    .min()
                    .unwrap_or_else(|| {
                        panic!("A gave up after its partitions passed to B: {leases:?}")
                    });
                gave_up = Some((at, now, end));
            }
            if taken.is_none() && held_b.iter().any(|p| held_by_a.contains(p)) {
                taken = Some((at, now));
            }
            (held_b.len() == 16).then_some(at)
        })
        .await;
    let (gave_up_after, gave_up_at, lease_end) =
        gave_up.expect("B took everything: A held nothing by then");
    let (taken_after, taken_at) = taken.expect("B holds A's partitions");
    let margin = Duration::from_millis(lease_end.0.saturating_sub(gave_up_at.0));
    eprintln!(
        "lease calls failing: A held nothing after {gave_up_after:?}, {margin:?} before its \
         first partition lease ended; B held one of A's after {taken_after:?}, all 16 after \
         {all_taken:?} (lease {lease:?}, renewals every {every:?})"
    );
    assert!(
        gave_up_at < lease_end,
        "A still held partitions when its leases ended: gave up at {gave_up_at:?}, lease \
         ended at {lease_end:?}"
    );
    assert!(
        gave_up_after < lease,
        "A gave up {gave_up_after:?} after its lease calls began to fail"
    );
    assert!(
        margin >= 2 * every,
        "A gave up only {margin:?} before its leases ended, not two renewals ({:?})",
        2 * every
    );
    assert!(
        gave_up_after < taken_after && gave_up_at < taken_at,
        "B held one of A's partitions ({taken_after:?}) before A gave them up ({gave_up_after:?})"
    );
    assert!(
        taken_at > lease_end,
        "B took one of A's partitions at {taken_at:?}, before A's lease ended at {lease_end:?}"
    );
    assert!(a.held_partitions().is_empty());

    // The lease calls succeed again: A renews its membership, and the two share again.
    hooked.fail_leases(false);
    let healed = Instant::now();
    Wait::new("A a member again")
        .within(Duration::from_secs(15))
        .every(Duration::from_millis(10))
        .until_ok(async || {
            let leases = res
                .store
                .leases("node/", SystemClock.now())
                .await
                .map_err(|e| e.to_string())?;
            leases
                .iter()
                .any(|l| {
                    l.holder == a.node_name() && l.name.ends_with(&format!("/{}", a.node_name()))
                })
                .then_some(())
                .ok_or_else(|| format!("{leases:?}"))
        })
        .await;
    let member_after = healed.elapsed();
    balanced(
        &[&a, &b],
        &[8, 8],
        Duration::from_secs(15).saturating_sub(healed.elapsed()),
    )
    .await;
    eprintln!(
        "lease calls succeeding again: A a member after {member_after:?}, 8/8 after {:?}",
        healed.elapsed()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_is_fixed_for_a_stores_life() {
    let res = Resources::new(Backend::MemoryInProcess).await;
    let checkout = checkout();
    let start = async |partitions: Option<u32>| {
        Runtime::builder()
            .store(Arc::clone(&res.store))
            .bus(res.bus().await)
            .register(&checkout)
            .options(RuntimeOptions {
                partitions,
                ..options()
            })
            .start()
            .await
    };
    let first = start(Some(32)).await.expect("the first runtime records 32");
    assert_eq!(first.partition_count(), 32);
    assert_eq!(
        first.held_partitions().len(),
        32,
        "the in-process bus: every partition"
    );
    first.shutdown().await;
    let unset = start(None).await.expect("unset takes the store's");
    assert_eq!(unset.partition_count(), 32);
    unset.shutdown().await;
    match start(Some(16)).await {
        Err(RuntimeError::PartitionCount {
            configured: 16,
            recorded: 32,
        }) => {}
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|r| r.partition_count())
        ),
    }
    match start(Some(0)).await {
        Err(RuntimeError::InvalidOption(reason)) => {
            assert!(reason.contains("partitions"), "{reason}")
        }
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|r| r.partition_count())
        ),
    }
}

/// Nodes that run different sagas on one store (teams sharing a database, or two builds
/// during a rolling deploy) are in different lease groups: each holds every partition
/// of its own, so no saga waits in a partition held by a node that cannot run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_run_different_sagas_never_strand_one() {
    use serde_json::json;
    use skald::definition::{SagaDefinition, Step};
    use skald::wire::Outcome;

    let res = Resources::new(Backend::PostgresNats).await;
    let _participants = start_participants(
        res.bus().await,
        MemoryLedger::new(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let notify = SagaDefinition::<serde_json::Value>::builder("notify", 1)
        .step(
            Step::new("send")
                .action("skald.cmd.mailer.send", |v: &serde_json::Value| v.clone())
                .timeout(Duration::from_secs(60)),
        )
        .build()
        .expect("a valid definition");
    let _mailer = skald::participant::serve(
        res.bus().await,
        "skald.cmd.mailer.>",
        "mailer",
        16,
        |_| async { Outcome::Success(json!({})) },
    )
    .await
    .expect("serve the mailer");
    let checkout_node = node(&res, res.bus().await, Duration::from_secs(2)).await;
    let notify_node = Runtime::builder()
        .store(Arc::clone(&res.store))
        .bus(res.bus().await)
        .register(&notify)
        .options(node_options(Duration::from_secs(2)))
        .reply_keys(test_reply_keys())
        .start()
        .await
        .expect("node starts");
    // Two renewals of each (every 400 ms), seen in the store: neither gave the other
    // anything.
    let since = skald::ports::SystemClock.now();
    let renewed_twice = since.plus(Duration::from_secs(2) + Duration::from_millis(800));
    Wait::new("two renewals of each node")
        .within(Duration::from_secs(10))
        .every(Duration::from_millis(50))
        .until_ok(async || {
            let now = skald::ports::SystemClock.now();
            let leases = res
                .store
                .leases("node/", now)
                .await
                .map_err(|e| e.to_string())?;
            let renewed = |node: &Runtime| {
                leases.iter().any(|l| {
                    l.name.ends_with(&format!("/{}", node.node_name())) && l.until >= renewed_twice
                })
            };
            if renewed(&checkout_node) && renewed(&notify_node) {
                Ok(())
            } else {
                Err(format!("{leases:?}"))
            }
        })
        .await;
    assert_eq!(checkout_node.held_partitions().len(), 16);
    assert_eq!(notify_node.held_partitions().len(), 16);
    let checkouts = start_sagas(&checkout_node, 0, 40).await;
    let mut notes = Vec::new();
    for i in 0..40 {
        let h = notify_node
            .start_saga(&notify, &json!({ "to": format!("c-{i}") }))
            .await
            .expect("start");
        notes.push(h.id());
    }
    let all: Vec<SagaId> = checkouts.iter().chain(&notes).copied().collect();
    all_completed(&res, &all, Duration::from_secs(30)).await;
    checkout_node.shutdown().await;
    notify_node.shutdown().await;
}

/// A node that stays a member but never takes its share (too starved to, or stuck)
/// cannot keep partitions without a holder: once a partition offered to it has been free
/// for a whole lease, it is not counted (6 leases, doubling each time it happens again)
/// and any node takes what is free. (After the 6 leases A offers the ghost its share
/// again: the test's window ends before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_takes_its_share_strands_nothing() {
    let res = Resources::new(Backend::PostgresNats).await;
    let _participants = start_participants(
        res.bus().await,
        MemoryLedger::new(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let lease = Duration::from_secs(1);
    let a = node(&res, res.bus().await, lease).await;
    // A member of A's group that never renews anything but its membership, for an hour.
    let group = res
        .store
        .leases("node/", skald::ports::SystemClock.now())
        .await
        .expect("leases")
        .iter()
        .find_map(|l| {
            l.name
                .strip_suffix(&format!("/{}", a.node_name()))
                .map(str::to_owned)
        })
        .expect("A's membership");
    let ghost = format!("{group}/ghost");
    assert!(
        res.store
            .acquire_lease(
                &ghost,
                "ghost",
                skald::ports::SystemClock.now(),
                Duration::from_secs(3600)
            )
            .await
            .expect("lease")
    );
    let ghost_since = Instant::now();
    // A hands the ghost its share, which stays free for a lease; then the ghost is not
    // counted (for 6 leases) and A takes everything back and keeps it meanwhile.
    balanced(&[&a], &[16], Duration::from_secs(15)).await;
    Wait::new("the ghost's grace to end")
        .within(Duration::from_secs(10))
        .until(async || (ghost_since.elapsed() >= 3 * lease + lease / 2).then_some(()))
        .await;
    balanced(&[&a], &[16], Duration::from_secs(5)).await;
    let since = Instant::now();
    Wait::new("A holding every partition for 2 s")
        .within(Duration::from_secs(10))
        .every(Duration::from_millis(20))
        .until(async || {
            let held = a.held_partitions().len();
            assert_eq!(held, 16, "A gave partitions up after {:?}", since.elapsed());
            (since.elapsed() >= Duration::from_secs(2)).then_some(())
        })
        .await;
    let ids = start_sagas(&a, 0, 20).await;
    all_completed(&res, &ids, Duration::from_secs(30)).await;
    a.shutdown().await;
}
