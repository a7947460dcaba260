//! skald on a three-node NATS JetStream cluster: the bus connects with the three seed
//! URLs, the streams are kept at three replicas, and sagas run to completion while one
//! node is down and after it has come back.
//!
//! Each test starts a cluster of its own on loopback ([`common::NatsCluster`]).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::{
    ALL_SERVICES, NatsCluster, NatsServer, TempDir, Wait, fast_timing, no_script, options,
    reliable, sqlite_store, start_participants, tea_order, test_reply_keys,
};
use skald::Runtime;
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::definition::SagaDefinition;
use skald::ids::SagaId;
use skald::machine::SagaStatus;
use skald::ports::Bus;
use skald::retry::RetryPolicy;
use skald_sagas::checkout::{Checkout, CheckoutTiming, checkout_definition};
use skald_sagas::sim::{Ledger, MemoryLedger};
use tokio::sync::mpsc::Receiver;

/// skald's streams (prefix `SKALD`).
const STREAMS: [&str; 5] = [
    "SKALD_COMMANDS",
    "SKALD_REPLIES",
    "SKALD_OPS",
    "SKALD_EVENTS",
    "SKALD_DLQ",
];

/// The durable consumer of the checkout saga's replies.
const REPLY_CONSUMER: &str = "skald-orchestrator-checkout";

async fn bus(urls: &str, replicas: usize) -> NatsBus {
    NatsBus::connect(NatsOptions {
        ack_wait: Duration::from_secs(5),
        ..NatsOptions::new(urls).replicas(replicas)
    })
    .await
    .expect("connect to the cluster with its seed URLs")
}

/// A plain JetStream client on the cluster, to read what skald set up.
async fn jetstream(urls: &str) -> jetstream::Context {
    let servers: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(|u| u.parse().expect("a server URL"))
        .collect();
    let client = async_nats::connect(servers).await.expect("connect");
    jetstream::new(client)
}

/// The replica count of `stream` and of the consumer `consumer` on it (if given) as the
/// cluster places them: `Ok` once its configuration asks for `replicas` and the group
/// has a leader and `replicas - 1` other peers, all current.
async fn placed(
    js: &jetstream::Context,
    stream: &str,
    consumer: Option<&str>,
    replicas: usize,
) -> Result<(), String> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("{stream}: {e}"))?;
    let info = s.info().await.map_err(|e| format!("{stream}: {e}"))?;
    if info.config.num_replicas != replicas {
        return Err(format!(
            "{stream} asks for {} replicas",
            info.config.num_replicas
        ));
    }
    check_group(stream, info.cluster.as_ref(), replicas)?;
    if let Some(name) = consumer {
        let c = s
            .consumer_info(name)
            .await
            .map_err(|e| format!("{stream}/{name}: {e}"))?;
        // 0: the consumer follows its stream's replica count.
        if c.config.num_replicas != 0 {
            return Err(format!(
                "{stream}/{name} sets {} replicas of its own",
                c.config.num_replicas
            ));
        }
        check_group(&format!("{stream}/{name}"), c.cluster.as_ref(), replicas)?;
    }
    Ok(())
}

fn check_group(
    what: &str,
    cluster: Option<&jetstream::stream::ClusterInfo>,
    replicas: usize,
) -> Result<(), String> {
    let cluster = cluster.ok_or_else(|| format!("{what}: no cluster information"))?;
    if cluster.leader.is_none() {
        return Err(format!("{what}: no leader"));
    }
    let peers: Vec<(&str, bool)> = cluster
        .replicas
        .iter()
        .map(|p| (p.name.as_str(), p.current && !p.offline))
        .collect();
    if peers.len() != replicas - 1 || peers.iter().any(|(_, ok)| !ok) {
        return Err(format!(
            "{what}: leader {:?}, peers (name, current) {peers:?}",
            cluster.leader
        ));
    }
    Ok(())
}

/// Waits until every stream (and the reply consumer) is placed at `replicas`.
async fn wait_placed(js: &jetstream::Context, replicas: usize) {
    Wait::new(format!(
        "skald's streams and consumer at {replicas} replicas"
    ))
    .every(Duration::from_millis(100))
    .until_ok(async || {
        for stream in STREAMS {
            let consumer = (stream == "SKALD_REPLIES").then_some(REPLY_CONSUMER);
            placed(js, stream, consumer, replicas).await?;
        }
        Ok(())
    })
    .await;
}

/// [`fast_timing`] with attempts enough to outlast a failover: the streams and
/// consumers led by the killed node elect new leaders within seconds, and what was sent
/// in the meantime is retried (a step's budget here is 12 attempts of 5 s). Sagas whose
/// steps ran out of attempts would end compensated, consistently, but this test wants
/// every one completed.
fn patient_timing() -> CheckoutTiming {
    let fast = fast_timing();
    CheckoutTiming {
        retry: RetryPolicy {
            max_attempts: 12,
            ..fast.retry
        },
        ..fast
    }
}

/// Starts `n` checkout sagas named `<prefix>-<i>`.
async fn start(
    runtime: &Runtime,
    checkout: &SagaDefinition<Checkout>,
    prefix: &str,
    n: usize,
) -> Vec<SagaId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let handle = runtime
            .start_saga(checkout, &tea_order(&format!("{prefix}-{i}")))
            .await
            .expect("the saga starts");
        ids.push(handle.id());
    }
    ids
}

/// Waits for every saga of `ids` to settle, and asserts it completed.
async fn completed(outcomes: &mut Receiver<skald::SagaOutcome>, ids: &[SagaId]) {
    completed_within(outcomes, ids, common::DEADLINE).await;
}

/// Like [`completed`], within `within`: a failover (a missed heartbeat, an election,
/// acks and replies redelivered) takes longer than a test's usual wait on a loaded
/// machine.
async fn completed_within(
    outcomes: &mut Receiver<skald::SagaOutcome>,
    ids: &[SagaId],
    within: Duration,
) {
    let mut want: HashSet<SagaId> = ids.iter().copied().collect();
    let mut got = Vec::new();
    Wait::new(format!("{} sagas to settle", want.len()))
        .within(within)
        .receive(
            async || outcomes.recv().await,
            async |outcome| {
                if want.remove(&outcome.id) {
                    got.push(outcome);
                }
                want.is_empty()
            },
        )
        .await;
    for o in got {
        assert_eq!(o.status, SagaStatus::Completed, "saga {}: {o:?}", o.id);
    }
}

/// Three seed URLs, three replicas: sagas complete before, while and after one node is
/// down (the node the orchestrator's connection is on, so the client must fail over
/// to another seed), none is lost and no effect is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkout_sagas_complete_while_a_cluster_node_is_down() {
    let began = std::time::Instant::now();
    let mut cluster = NatsCluster::start();
    let urls = cluster.urls();
    let dir = TempDir::new();
    let store = sqlite_store(&dir).await;
    let ledger = MemoryLedger::default();
    let orchestrator = bus(&urls, 3).await;
    let _participants = start_participants(
        Arc::new(bus(&urls, 3).await),
        ledger.clone(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let checkout = checkout_definition(patient_timing()).expect("valid definition");
    let runtime = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(Arc::new(orchestrator.clone()) as Arc<dyn Bus>)
        .register(&checkout)
        .options(options())
        .reply_keys(test_reply_keys())
        .start()
        .await
        .expect("runtime starts");
    let mut outcomes = runtime.outcomes();
    let js = jetstream(&urls).await;

    // Before: every stream and the reply consumer at three replicas.
    let mut all = start(&runtime, &checkout, "before", 20).await;
    completed(&mut outcomes, &all).await;
    wait_placed(&js, 3).await;

    // One node down, with sagas in flight: the one the orchestrator is connected to.
    let connected = cluster
        .node_of_port(orchestrator.client().server_info().port)
        .expect("the orchestrator is connected to a node of the cluster");
    let in_flight = start(&runtime, &checkout, "in-flight", 20).await;
    cluster.kill(connected);
    let down = std::time::Instant::now();
    let while_down = start(&runtime, &checkout, "while-down", 20).await;
    all.extend(in_flight);
    all.extend(while_down);
    completed_within(&mut outcomes, &all[20..], Duration::from_secs(90)).await;
    eprintln!(
        "node {connected} down: 40 sagas settled {:?} after the kill",
        down.elapsed()
    );
    let now_on = orchestrator.client().server_info().port;
    assert_ne!(
        now_on,
        cluster.port(connected),
        "the orchestrator's connection failed over to another seed"
    );

    // Back: the node rejoins, catches up, and the streams are whole again.
    tokio::task::block_in_place(|| cluster.restart(connected));
    let after = start(&runtime, &checkout, "after", 10).await;
    completed(&mut outcomes, &after).await;
    all.extend(after);
    wait_placed(&js, 3).await;

    // Nothing lost: every saga completed, in the store too, each with exactly one
    // reservation, one charge and one shipment.
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 70);
    for id in &all {
        let saga = store
            .load(*id)
            .await
            .expect("load")
            .expect("the saga exists");
        assert_eq!(saga.state.status, SagaStatus::Completed, "saga {id}");
    }
    let records = ledger.records().await.expect("records");
    for id in &all {
        let r = records
            .get(id)
            .unwrap_or_else(|| panic!("saga {id}: no records"));
        assert_eq!(
            (r.reservations_held, r.charges_live, r.shipments),
            (1, 1, 1),
            "saga {id}: {r:?}"
        );
    }
    runtime.shutdown().await;
    eprintln!("took {:?}", began.elapsed());
}

/// Streams created at one replica are scaled up to three by a process asking for three
/// (the consumers follow); a process asking for fewer (a participant or the CLI with
/// the default) leaves them at three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_scaled_up_to_the_replicas_asked_for_never_down() {
    let cluster = NatsCluster::start();
    let urls = cluster.urls();
    let js = jetstream(&urls).await;

    let one = bus(&urls, 1).await;
    let _consumer = one
        .subscribe(
            &["skald.reply.*.checkout.>".to_owned()],
            "skald-orchestrator-checkout",
        )
        .await
        .expect("the reply consumer");
    wait_placed(&js, 1).await;

    let _three = bus(&urls, 3).await;
    wait_placed(&js, 3).await;

    let _default = bus(&urls, 1).await;
    wait_placed(&js, 3).await;
}

/// A single server cannot keep three replicas: the connection is refused, saying why.
#[tokio::test]
async fn replicas_on_a_single_server_are_refused_with_the_reason() {
    let server = NatsServer::start();
    let err = NatsBus::connect(NatsOptions::new(server.url()).replicas(3))
        .await
        .expect_err("no cluster");
    let text = err.to_string();
    assert!(
        text.contains("3 stream replicas") && text.contains("not part of a cluster"),
        "{text}"
    );
    // Connecting with one replica works, and with the single URL as before.
    NatsBus::connect(NatsOptions::new(server.url()))
        .await
        .expect("one replica on a single server");
}
