//! The fault suite: the checkout saga at scale, with processes killed and connections
//! cut, on the real thing — the orchestrator (`examples/checkout`), the three
//! participants (`examples/participant`) and nats-server as separate processes,
//! PostgreSQL in a database each scenario creates (and drops).
//!
//! Every scenario puts 2,000 checkout sagas in flight (seeded declines and flaky
//! failures in the participants), injects its faults at seeded-random moments, lets the
//! run finish, and then proves, from PostgreSQL directly:
//!
//! - all 2,000 sagas are stored and terminal (completed or compensated): 0 lost;
//! - no dead letters (none of these faults should cause one);
//! - every participant effect was applied exactly once: no saga and no order holds two
//!   reservations, charges or shipments (from the participants' own tables), and every
//!   effect belongs to a stored saga;
//! - completed sagas hold exactly one live reservation, one live charge and one
//!   shipment; compensated sagas hold none;
//!
//! and the orchestrator that finished the run reports a clean summary (its own
//! consistency check passes). The faults:
//!
//! - `kill9_orchestrator_three_times`: SIGKILL the orchestrator three times, restarting
//!   it with `--resume` each time;
//! - `postgres_backends_terminated`: `pg_terminate_backend` every connection to the
//!   scenario's database, three times, under a runner that is never restarted;
//! - `nats_server_killed_and_restarted`: SIGKILL nats-server, restart it a second later
//!   (same port and store); everyone reconnects on their own;
//! - `one_of_two_orchestrators_killed`: two orchestrators share the work; one is
//!   SIGKILLed, the other finishes everything;
//! - `late_payments_and_cancels_in_flight`: the payment service applies the charge of
//!   some orders at once but answers only after skald's whole retry budget for it (the
//!   charge is in doubt, and must be refunded by its key), and the runner cancels some
//!   sagas while an action is in flight; the runner's summary must count both
//!   (`in_doubt` > 0, `cancelled` > 0) and no compensated saga may hold a live effect;
//! - `baseline_without_faults`: the same run undisturbed, to compare times against.
//!
//! Scaled out (issue 16, partitioned ownership): three orchestrator nodes (`skald serve`,
//! the demo binary) on a three-node JetStream cluster (streams at three replicas; every
//! process gets the three seed URLs), sharing the 16 partitions through their leases in
//! `skald_leases` (`node/<group>/<node>`, `partition/<group>/<p>`), and a runner that only starts the sagas and awaits their outcomes
//! (`--no-consume`: it applies no reply, so every saga is run by the nodes):
//!
//! - `scaleout_node_killed`: SIGKILL one of the three nodes; its partitions must pass
//!   to the two others once its leases end, and their sagas make progress there. It
//!   reports when every one of the dead node's partition leases was held by a live
//!   node (`leases_moved_ms`), and, from the store's times, when the first saga of
//!   those partitions settled after the kill (`recover_first_settle_ms`) and when every
//!   one of them had settled one (`moved_all_progress_ms`); none may settle before the
//!   dead node's lease on its partition ends (`settled_under_dead_lease`: nobody runs a
//!   partition whose lease a dead node still holds);
//! - `scaleout_nats_node_killed_and_restarted`: SIGKILL one nats-server of the cluster
//!   and restart it 2 s later (same ports and store); the two others keep the quorum. It
//!   reports when the first saga settled after the kill (from the store's times) and
//!   after the node rejoined (`recover_first_settle_ms`), and how many settled while it
//!   was down (`settled_while_down`);
//! - `scaleout_fourth_node_joins`: start a fourth node mid-run; the partitions must
//!   rebalance to 4 per node (`rebalance_ms`, from skald_leases) and the new node make
//!   progress on the ones it took, with nothing run twice.
//!
//! These also print, per node still running at the end, its commit conflicts, cold
//! activations and partition handovers (from its `/metrics`), and, per node, how many
//! warnings and errors it logged.
//!
//! Each prints one line to stdout: the sagas in flight at each fault, the sagas
//! finished, effects applied twice (0), dead letters (0) and the time to recover, e.g.
//!
//! ```text
//! fault=kill9-orchestrator-x3 seed=1 sagas=2000 in_flight_at_faults=[1873,1201,640] finished=2000 completed=1796 compensated=204 effects_applied_twice=0 dead_letters=0 recover_first_settle_ms=[812,790,805] drain_after_last_fault_ms=6210 total_ms=15034
//! ```
//!
//! Every wait polls a condition with a deadline and says what it waited for; every
//! process the test starts is SIGKILLed when the scenario ends (or panics). On a
//! failure the test prints the timeline of its faults and the tail of every process's
//! log (stderr at `RUST_LOG=warn`, and stdout), and keeps the log directory.
//!
//! Run: `scripts/test` runs this suite on its own (it is `test = false` in Cargo.toml).
//! The scaled-out scenarios need the `skald` binary, which only builds with the `demo`
//! feature (`--all-features`). Alone, against a PostgreSQL server and a nats-server
//! binary of your own:
//!
//! ```text
//! SKALD_TEST_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! SKALD_NATS_SERVER_BIN=$(command -v nats-server) \
//! cargo test --all-features --test faults -- --nocapture --test-threads=1
//! ```
//!
//! `SKALD_FAULTS_SEED=N` replaces every scenario's fault-timing seed (printed as
//! `seed=`), to replay a run's fault moments.
//! `SKALD_FAULTS_KEEP_LOGS=1` keeps every scenario's log directory, passed or not (its
//! path is printed), to read what the processes logged.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::fs::File;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{NatsCluster, NatsServer, PgDatabase, skald_command};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};

// ---------------------------------------------------------------------------------------
// The run's shape
// ---------------------------------------------------------------------------------------

/// Sagas per scenario, all started at once.
const SAGAS: i64 = 2_000;
/// Seed of the participants' simulated declines, flaky failures and service times.
const SIM_SEED: &str = "7";
const DECLINE_RATE: &str = "0.1";
const FLAKY_RATE: &str = "0.05";
/// Mean simulated service time of a command (uniform in [0, 2N] ms) and commands
/// handled at once per participant: with these, 2,000 sagas take 10–20 s undisturbed.
const LATENCY_MS: &str = "300";
const PARTICIPANT_CONCURRENCY: &str = "64";
/// JetStream redelivers an unacknowledged message after this (a killed process's work).
const ACK_WAIT_SECS: &str = "5";
/// The runner gives up (and reports the unfinished) after this.
const RUNNER_TIMEOUT_SECS: &str = "240";

/// The stream commands go to (skald's default stream prefix); each participant reads it
/// with a durable consumer named after its service.
const COMMANDS_STREAM: &str = "SKALD_COMMANDS";
/// The three participants and the table each keeps its effects in.
const SERVICES: [(&str, &str); 3] = [
    ("inventory", "sim_inventory_reservations"),
    ("payment", "sim_payment_charges"),
    ("shipping", "sim_shipping_shipments"),
];

/// A whole scenario (start to verified) must finish within this.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(300);
/// Each wait is also bounded on its own.
const START_LIMIT: Duration = Duration::from_secs(60);
const STORE_LIMIT: Duration = Duration::from_secs(120);
const RECOVER_LIMIT: Duration = Duration::from_secs(120);
const QUERY_LIMIT: Duration = Duration::from_secs(30);
/// How often waits poll.
const POLL: Duration = Duration::from_millis(50);
/// Seeded-random gap before each fault (ms).
const FAULT_GAP_MS: RangeInclusive<u64> = 500..=2_500;
/// How long nats-server stays down.
const NATS_OUTAGE: Duration = Duration::from_secs(1);
/// How long a nats-server of the cluster stays down.
const NATS_NODE_OUTAGE: Duration = Duration::from_secs(2);

/// Partitions a store records when no runtime sets them (`RuntimeOptions::partitions`).
const PARTITIONS: u32 = 16;
/// How long the nodes may take to share the partitions evenly, or to take a dead node's:
/// its lease (`RuntimeOptions::partition_lease`, 5 s) and a few renewals (1 s each), with
/// room for a loaded machine.
const REBALANCE_LIMIT: Duration = Duration::from_secs(30);
/// What the nodes log: warnings and errors, and every partition taken or handed over.
const NODE_LOG: &str = "warn,skald_runtime::runtime::leases=info";
/// What the scaled-out scenarios report of each node's metrics: the report's key, the
/// metric, and the label its samples must have (all of them summed).
const NODE_METRICS: [(&str, &str, Option<&str>); 5] = [
    ("commit_conflicts", "skald_commit_conflicts_total", None),
    ("cold_activations", "skald_cold_activations_total", None),
    (
        "handovers_taken",
        "skald_partition_handovers_total",
        Some(r#"event="taken""#),
    ),
    (
        "handovers_released",
        "skald_partition_handovers_total",
        Some(r#"event="released""#),
    ),
    (
        "handovers_lost",
        "skald_partition_handovers_total",
        Some(r#"event="lost""#),
    ),
];
/// Log lines shown per process when a scenario fails.
const LOG_TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------

/// SIGKILL the orchestrator at three seeded-random moments, restarting it with
/// `--resume` each time; the last one finishes every saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_orchestrator_three_times() {
    let mut sc = Scenario::start("kill9-orchestrator-x3", 1).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    sc.wait_all_stored(&mut runner).await;

    let mut in_flight = Vec::new();
    let mut recover = Vec::new();
    let mut last_fault = Instant::now();
    // Kill 1 comes 0.5–2.5 s after all are stored; kills 2 and 3 as long after the
    // restarted orchestrator settled its first saga (so each restart is proven to make
    // progress before it is killed in turn).
    for kill in 1..=3 {
        sc.pause_before_fault(&mut [&mut runner], kill).await;
        runner.kill();
        last_fault = Instant::now();
        // Nothing moves a saga while no orchestrator runs: this is exactly what the
        // kill left in flight, and the baseline for the next settle.
        let at_kill = sc.counts_now().await;
        sc.event(format!("kill -9 {}: {at_kill} after it", runner.name));
        sc.assert_in_flight(at_kill, kill);
        in_flight.push(at_kill.active);

        runner = sc.spawn_runner(Mode::Resume);
        let restarted = Instant::now();
        let what = format!("the first saga to settle after restart {kill}");
        recover.push(
            sc.wait_settle_after(at_kill.settled(), restarted, &mut [&mut runner], &what)
                .await,
        );
    }

    let finish = sc.finish(&mut runner, last_fault).await;
    let verified = sc.verify(&finish).await;
    println!(
        "{}",
        sc.report(
            &in_flight,
            &recover,
            &verified,
            &[("drain_after_last_fault_ms", ms(finish.drained))]
        )
    );
}

/// Terminate every PostgreSQL connection to the scenario's database (the runner's and
/// the participants'), three times, under a runner that is never restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backends_terminated() {
    let mut sc = Scenario::start("pg-terminate-backend-x3", 2).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    sc.wait_all_stored(&mut runner).await;

    let mut in_flight = Vec::new();
    let mut terminated = Vec::new();
    let mut recover = Vec::new();
    let mut last_fault = Instant::now();
    for cut in 1..=3 {
        sc.pause_before_fault(&mut [&mut runner], cut).await;
        let before = sc.counts_now().await;
        sc.assert_in_flight(before, cut);
        let n = sc.db.terminate_backends().await;
        last_fault = Instant::now();
        sc.event(format!(
            "pg_terminate_backend: {n} backends, {before} before"
        ));
        assert!(
            n > 0,
            "fault {cut}: pg_terminate_backend found no connection to {} to terminate",
            sc.db.db.name()
        );
        in_flight.push(before.active);
        terminated.push(n);
        let what = format!("the first saga to settle after termination {cut}");
        recover.push(
            sc.wait_settle_after(before.settled(), last_fault, &mut [&mut runner], &what)
                .await,
        );
    }

    let finish = sc.finish(&mut runner, last_fault).await;
    let verified = sc.verify(&finish).await;
    println!(
        "{}",
        sc.report(
            &in_flight,
            &recover,
            &verified,
            &[
                ("backends_terminated", list(&terminated)),
                ("drain_after_last_fault_ms", ms(finish.drained)),
            ]
        )
    );
}

/// SIGKILL nats-server mid-run and restart it a second later on the same port and
/// store; the runner and the participants reconnect on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted() {
    let mut sc = Scenario::start("nats-server-kill9-restart", 3).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    sc.wait_all_stored(&mut runner).await;

    sc.pause_before_fault(&mut [&mut runner], 1).await;
    let before = sc.counts_now().await;
    sc.assert_in_flight(before, 1);
    sc.nats.server().kill();
    let killed = Instant::now();
    sc.event(format!("kill -9 nats-server: {before} before"));
    tokio::time::sleep(NATS_OUTAGE).await;
    sc.expect_running(&mut [&mut runner], "while nats-server was down");
    tokio::task::block_in_place(|| sc.nats.server().restart());
    let restarted = Instant::now();
    // Replies fetched before the kill may still have settled sagas meanwhile: the
    // baseline is what is settled at the restart.
    let at_restart = sc.counts_now().await;
    sc.event(format!("nats-server restarted: {at_restart}"));
    let recover = sc
        .wait_settle_after(
            at_restart.settled(),
            restarted,
            &mut [&mut runner],
            "the first saga to settle after nats-server's restart",
        )
        .await;

    let finish = sc.finish(&mut runner, restarted).await;
    let verified = sc.verify(&finish).await;
    println!(
        "{}",
        sc.report(
            &[before.active],
            &[recover],
            &verified,
            &[
                ("outage_ms", ms(restarted - killed)),
                ("drain_after_last_fault_ms", ms(finish.drained)),
            ]
        )
    );
}

/// Two orchestrators share the 2,000 sagas; the first is SIGKILLed at a seeded-random
/// moment and the second finishes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_orchestrators_killed() {
    let mut sc = Scenario::start("kill9-one-of-two-orchestrators", 4).await;
    let mut first = sc.spawn_runner(Mode::Fresh);
    sc.wait_all_stored(&mut first).await;
    let mut second = sc.spawn_runner(Mode::Resume);
    sc.event(format!("{} started beside {}", second.name, first.name));

    sc.pause_before_fault(&mut [&mut first, &mut second], 1)
        .await;
    first.kill();
    let killed = Instant::now();
    // The second keeps going: this is what was in flight right after the kill.
    let after = sc.counts_now().await;
    sc.event(format!("kill -9 {}: {after} right after it", first.name));
    sc.assert_in_flight(after, 1);
    let recover = sc
        .wait_settle_after(
            after.settled(),
            killed,
            &mut [&mut second],
            "the first saga to settle after the first orchestrator's kill",
        )
        .await;

    let finish = sc.finish(&mut second, killed).await;
    let verified = sc.verify(&finish).await;
    println!(
        "{}",
        sc.report(
            &[after.active],
            &[recover],
            &verified,
            &[("recover_all_terminal_ms", ms(finish.drained))]
        )
    );
}

/// Three nodes run the 2,000 sagas; one of them is SIGKILLed at a seeded-random moment.
/// Its partitions pass to the two others once its leases end (not before: no saga of
/// them settles while its lease lasts), they make progress there, and every saga
/// finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_node_killed() {
    let mut sc = Scenario::start_tuned("scaleout-node-kill9", 7, Tuning::scaled_out()).await;
    sc.start_nodes(3).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    sc.wait_all_stored(&mut runner).await;

    sc.pause_before_fault(&mut [&mut runner], 1).await;
    let victim = sc.rng.random_range(0..sc.nodes.len());
    let leases = sc.leases_now().await;
    // Its leases on its partitions, as they stand at its death: when each ends.
    let dead_until: BTreeMap<u32, i64> = leases
        .held_by(&sc.nodes[victim])
        .into_iter()
        .filter_map(|p| Some((p, leases.partitions.get(&p)?.until_ms)))
        .collect();
    let moved: Vec<u32> = dead_until.keys().copied().collect();
    assert!(
        !moved.is_empty(),
        "{} holds no partition before its kill: {leases}",
        sc.nodes[victim].proc.name
    );
    sc.nodes[victim].proc.kill();
    let killed = Instant::now();
    let killed_at = unix_ms();
    let name = sc.nodes[victim].proc.name.clone();
    let after = sc.counts_now().await;
    let moved_at_kill = sc.partition_counts_now(&moved).await;
    sc.event(format!(
        "kill -9 {name} (partitions {moved:?}, leases ending at {dead_until:?}: \
         {moved_at_kill}): {after} right after it"
    ));
    sc.assert_in_flight(after, 1);
    assert!(
        moved_at_kill.active > 0,
        "{name}'s partitions {moved:?} had no saga in flight at its kill ({moved_at_kill}): \
         the run is too short for the fault schedule"
    );
    let taken = sc
        .wait_partitions_taken_over(victim, &dead_until, killed, killed_at, &mut runner)
        .await;
    assert!(
        taken.under_dead_lease.is_empty(),
        "sagas of {name}'s partitions settled while its lease on them lasted (partition, \
         first settle after the kill, its lease's end; unix ms): {:?}",
        taken.under_dead_lease
    );

    let finish = sc.finish(&mut runner, killed).await;
    let verified = sc.verify(&finish).await;
    let (_, shares) = sc
        .wait_balanced("the two live nodes to share the partitions")
        .await;
    let nodes = sc.node_report().await;
    println!(
        "{}",
        sc.report(
            &[moved_at_kill.active],
            &[taken.first_settle],
            &verified,
            &[
                ("killed", name),
                ("partitions_moved", list(&moved)),
                ("leases_moved_ms", ms(taken.leases_moved)),
                ("moved_all_progress_ms", ms(taken.all_progress)),
                (
                    "settled_under_dead_lease",
                    taken.under_dead_lease.len().to_string()
                ),
                (
                    "others_in_flight_at_kill",
                    (after.active - moved_at_kill.active).to_string()
                ),
                ("shares_after", list(&shares)),
                ("drain_after_last_fault_ms", ms(finish.drained)),
            ]
            .into_iter()
            .chain(nodes)
            .collect::<Vec<_>>()
        )
    );
}

/// Three nodes on the three-node NATS cluster; one nats-server of the cluster is
/// SIGKILLed at a seeded-random moment and restarted 2 s later on the same ports and
/// store. The two others keep the quorum (once they have elected new leaders for what
/// the dead one led), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_nats_node_killed_and_restarted() {
    let mut sc =
        Scenario::start_tuned("scaleout-nats-node-kill9-restart", 8, Tuning::scaled_out()).await;
    sc.start_nodes(3).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    sc.wait_all_stored(&mut runner).await;

    sc.pause_before_fault(&mut [&mut runner], 1).await;
    let victim = sc.rng.random_range(0..NatsCluster::SIZE);
    let cluster = sc.nats.cluster();
    let leader = tokio::task::block_in_place(|| cluster.meta_leader());
    let server = cluster.server_name(victim).to_owned();
    let was_leader = leader == Some(victim);
    let before = sc.counts_now().await;
    sc.assert_in_flight(before, 1);
    sc.nats.cluster().kill(victim);
    let killed = Instant::now();
    let killed_at = unix_ms();
    sc.event(format!(
        "kill -9 nats-server {server} (meta leader: {was_leader}): {before} before"
    ));
    // The outage lasts its length (a fault's duration, not a wait for a condition).
    tokio::time::sleep(NATS_NODE_OUTAGE).await;
    sc.expect_running(
        &mut [&mut runner],
        "while a nats-server of the cluster was down",
    );
    let restart = Instant::now();
    let restart_at = unix_ms();
    tokio::task::block_in_place(|| sc.nats.cluster().restart(victim));
    let rejoined = Instant::now();
    let at_rejoin = sc.counts_now().await;
    sc.event(format!(
        "nats-server {server} restarted and rejoined in {} ms: {at_rejoin}",
        (rejoined - restart).as_millis()
    ));
    // The restart held this test until the node rejoined: when the first saga settled
    // after the kill comes from the store's own times.
    let (first, while_down) = sc
        .wait_first_settle_since(
            killed_at,
            restart_at,
            &mut runner,
            "the first saga to settle after the nats-server's kill",
        )
        .await;
    let recover = sc
        .wait_settle_after(
            at_rejoin.settled(),
            rejoined,
            &mut [&mut runner],
            "the first saga to settle after the nats-server rejoined",
        )
        .await;

    let finish = sc.finish(&mut runner, rejoined).await;
    let verified = sc.verify(&finish).await;
    // The store's leases never depended on the broker: the nodes still share evenly.
    let (_, shares) = sc
        .wait_balanced("the three nodes to share the partitions")
        .await;
    let nodes = sc.node_report().await;
    println!(
        "{}",
        sc.report(
            &[before.active],
            &[first, recover],
            &verified,
            &[
                ("nats_server_killed", server),
                ("was_meta_leader", was_leader.to_string()),
                ("settled_while_down", while_down.to_string()),
                ("outage_ms", ms(restart - killed)),
                ("rejoin_ms", ms(rejoined - restart)),
                ("shares_after", list(&shares)),
                ("drain_after_rejoin_ms", ms(finish.drained)),
            ]
            .into_iter()
            .chain(nodes)
            .collect::<Vec<_>>()
        )
    );
}

/// Three nodes run the 2,000 sagas; a fourth starts at a seeded-random moment. The
/// partitions rebalance to 4 per node (the others hand over cleanly what is past their
/// new share), the new node makes progress on the ones it took, and nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_fourth_node_joins() {
    let mut sc = Scenario::start_tuned("scaleout-fourth-node-joins", 9, Tuning::scaled_out()).await;
    sc.start_nodes(3).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    sc.wait_all_stored(&mut runner).await;

    sc.pause_before_fault(&mut [&mut runner], 1).await;
    let before = sc.counts_now().await;
    sc.assert_in_flight(before, 1);
    let joined = sc.spawn_node();
    let started = Instant::now();
    let name = sc.nodes[joined].proc.name.clone();
    sc.event(format!("{name} started beside the three: {before} before"));
    let (rebalance, shares) = sc
        .wait_balanced("the four nodes to share the partitions")
        .await;
    let leases = sc.leases_now().await;
    let its = leases.held_by(&sc.nodes[joined]);
    let at_balance = sc.partition_counts_now(&its).await;
    sc.event(format!(
        "rebalanced in {} ms: shares {shares:?}; {name} holds {its:?} ({at_balance})",
        rebalance.as_millis()
    ));
    assert!(
        at_balance.active > 0,
        "{name}'s partitions {its:?} had no saga in flight once it held them \
         ({at_balance}): the run is too short for the fault schedule"
    );
    let first = sc
        .wait_partitions_settle(
            &its,
            at_balance.settled(),
            started,
            &mut runner,
            &format!("the first saga of {name}'s partitions to settle there"),
        )
        .await;

    let finish = sc.finish(&mut runner, started).await;
    let verified = sc.verify(&finish).await;
    let nodes = sc.node_report().await;
    println!(
        "{}",
        sc.report(
            &[before.active],
            &[first],
            &verified,
            &[
                ("joined", name),
                ("rebalance_ms", ms(rebalance)),
                ("shares_after", list(&shares)),
                ("partitions_taken", list(&its)),
                ("in_flight_in_taken", at_balance.active.to_string()),
                ("drain_after_join_ms", ms(finish.drained)),
            ]
            .into_iter()
            .chain(nodes)
            .collect::<Vec<_>>()
        )
    );
}

/// Payment holds back the answers to the charges of some orders for longer than skald's
/// whole retry budget (it applied each charge at once), and the runner cancels some
/// sagas right after their start, with the reserve in flight. Every in-doubt charge must
/// be refunded by its action key, every cancelled saga compensated around the action it
/// waited for, and none may end `compensated` with a live effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_payments_and_cancels_in_flight() {
    // 5 attempts of 1 s plus backoffs (<= 0.75 s) is the charge's budget; payment holds
    // a late charge's answers for 8 s after its first delivery.
    let tuning = Tuning {
        latency_ms: "5",
        payment: &["--late-rate", "0.1", "--late-hold-ms", "8000"],
        runner: &[
            "--concurrency",
            "200",
            "--step-timeout-ms",
            "1000",
            "--cancel-rate",
            "0.03",
        ],
        ..Tuning::default()
    };
    let mut sc = Scenario::start_tuned("late-payments-and-cancels", 6, tuning).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    let started = Instant::now();
    let finish = sc.finish(&mut runner, started).await;
    let verified = sc.verify(&finish).await;
    let count = |k: &str| finish.summary[k].as_u64().unwrap_or(0);
    assert!(
        count("in_doubt") > 0,
        "no saga compensated a step in doubt: {}",
        finish.summary
    );
    assert!(
        count("cancelled") > 0,
        "no cancel was accepted: {}",
        finish.summary
    );
    println!(
        "{}",
        sc.report(
            &[],
            &[],
            &verified,
            &[
                ("in_doubt", count("in_doubt").to_string()),
                ("cancelled", count("cancelled").to_string()),
                ("all_terminal_ms", ms(finish.drained)),
                ("sagas_per_sec", finish.summary["sagas_per_sec"].to_string()),
            ]
        )
    );
}

/// The same run with no fault: the reference for the times above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_without_faults() {
    let mut sc = Scenario::start("none", 5).await;
    let mut runner = sc.spawn_runner(Mode::Fresh);
    let started = Instant::now();
    let stored = sc.wait_all_stored(&mut runner).await;
    let finish = sc.finish(&mut runner, started).await;
    let verified = sc.verify(&finish).await;
    let field = |k: &str| finish.summary[k].to_string();
    println!(
        "{}",
        sc.report(
            &[],
            &[],
            &verified,
            &[
                ("all_stored_ms", ms(stored)),
                ("all_terminal_ms", ms(finish.drained)),
                ("sagas_per_sec", field("sagas_per_sec")),
                ("p50_ms", field("p50_ms")),
                ("p99_ms", field("p99_ms")),
            ]
        )
    );
}

// ---------------------------------------------------------------------------------------
// A scenario's environment
// ---------------------------------------------------------------------------------------

/// How an orchestrator (the checkout runner) is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Start the 2,000 sagas and run them.
    Fresh,
    /// Start nothing; finish what the database holds, then summarise all of it.
    Resume,
}

/// One scenario: its database, its nats-server, its participants, its logs, its fault
/// timeline. Dropping it (also on panic) prints the timeline and the logs' tails if the
/// test is failing, kills the participants, drops the database and stops nats-server.
struct Scenario {
    name: &'static str,
    seed: u64,
    rng: StdRng,
    started: Instant,
    deadline: Instant,
    /// What happened when, for the failure report.
    timeline: Vec<String>,
    checkout_bin: PathBuf,
    participant_bin: PathBuf,
    runners_spawned: usize,
    participants: Vec<Proc>,
    /// The orchestrator nodes (`skald serve`) of the scaled-out scenarios, in the order
    /// they were started (a killed one stays, killed).
    nodes: Vec<Node>,
    tuning: Tuning,
    // Dropped in this order, after the nodes and the participants are killed: the
    // database, the broker, then the logs.
    db: Db,
    nats: Broker,
    logs: LogDir,
}

impl Scenario {
    /// Creates the database, starts nats-server and the three participants, and waits
    /// until the participants have created their tables.
    async fn start(name: &'static str, default_seed: u64) -> Scenario {
        Scenario::start_tuned(name, default_seed, Tuning::default()).await
    }

    /// Like [`Scenario::start`], with the participants and runners tuned.
    async fn start_tuned(name: &'static str, default_seed: u64, tuning: Tuning) -> Scenario {
        env_var(
            "SKALD_TEST_PG_URL",
            "a throwaway PostgreSQL 15 cluster and sets it to its postgres:// URL",
        );
        env_var(
            "SKALD_NATS_SERVER_BIN",
            "nats-server 2.15.1 and sets it to the binary's path",
        );
        let checkout_bin = example_bin("checkout");
        let participant_bin = example_bin("participant");
        let seed = match std::env::var("SKALD_FAULTS_SEED") {
            Ok(s) => s
                .parse()
                .unwrap_or_else(|_| panic!("SKALD_FAULTS_SEED={s:?} is not a u64")),
            Err(_) => default_seed,
        };
        let logs = LogDir::new(name);
        let db = Db::create().await;
        let nats = tokio::task::block_in_place(|| {
            if tuning.cluster {
                Broker::Cluster(NatsCluster::start())
            } else {
                Broker::Server(NatsServer::start())
            }
        });
        let started = Instant::now();
        let mut sc = Scenario {
            name,
            seed,
            rng: StdRng::seed_from_u64(seed),
            started,
            deadline: started + SCENARIO_DEADLINE,
            timeline: Vec::new(),
            checkout_bin,
            participant_bin,
            runners_spawned: 0,
            participants: Vec::new(),
            nodes: Vec::new(),
            tuning,
            db,
            nats,
            logs,
        };
        // The wall clock too, to line the timeline up with the processes' logs.
        sc.event(format!(
            "database {}, nats-server {}, logs in {}, at unix time {} ms",
            sc.db.db.name(),
            sc.nats.url(),
            sc.logs.0.display(),
            unix_ms()
        ));
        let replicas = sc.nats.replicas().to_string();
        for (service, _) in SERVICES {
            let mut args: Vec<String> = [
                service,
                "--nats",
                &sc.nats.url(),
                "--nats-replicas",
                &replicas,
                "--db",
                &sc.db.url,
                "--seed",
                SIM_SEED,
                "--decline-rate",
                DECLINE_RATE,
                "--flaky-rate",
                FLAKY_RATE,
                "--latency-ms",
                sc.tuning.latency_ms,
                "--concurrency",
                PARTICIPANT_CONCURRENCY,
                "--ack-wait-secs",
                ACK_WAIT_SECS,
            ]
            .map(str::to_owned)
            .into();
            if service == "payment" {
                args.extend(sc.tuning.payment.iter().map(|a| a.to_string()));
            }
            let proc = Proc::spawn(
                &sc.logs.0,
                format!("participant-{service}"),
                &sc.participant_bin,
                &args,
            );
            sc.participants.push(proc);
        }
        for (service, table) in SERVICES {
            let limit = sc.limit(START_LIMIT);
            loop {
                let last = match sc.db.table_exists(table).await {
                    Ok(true) => break,
                    Ok(false) => format!("{table} does not exist"),
                    Err(e) => e.to_string(),
                };
                let what = format!("the {service} participant to create {table}");
                sc.expect_running(&mut [], &what);
                sc.check_deadline(limit, &what, &last);
                tokio::time::sleep(POLL).await;
            }
        }
        sc.wait_participants_consuming().await;
        sc.event("participants up (their tables and consumers exist)".to_owned());
        sc
    }

    /// Waits until every participant reads its commands: its durable consumer exists
    /// on the commands stream. A participant creates its table before it connects to
    /// NATS, and its start-up can take seconds on a cluster (its streams at three
    /// replicas, checked by every process starting at once): a fault must not find one
    /// still starting.
    async fn wait_participants_consuming(&mut self) {
        let limit = self.limit(START_LIMIT);
        let servers: Vec<async_nats::ServerAddr> = self
            .nats
            .url()
            .split(',')
            .map(|u| u.parse().unwrap_or_else(|e| panic!("NATS URL {u}: {e}")))
            .collect();
        let client = async_nats::connect(servers)
            .await
            .unwrap_or_else(|e| panic!("connect to NATS at {}: {e}", self.nats.url()));
        let js = async_nats::jetstream::new(client);
        for (service, _) in SERVICES {
            let what = format!("the {service} participant's consumer on {COMMANDS_STREAM}");
            loop {
                let last = match js.get_stream(COMMANDS_STREAM).await {
                    Ok(stream) => match stream.consumer_info(service).await {
                        Ok(_) => break,
                        Err(e) => e.to_string(),
                    },
                    Err(e) => e.to_string(),
                };
                self.expect_running(&mut [], &what);
                self.check_deadline(limit, &what, &last);
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Starts an orchestrator (the checkout runner) without participants of its own.
    fn spawn_runner(&mut self, mode: Mode) -> Proc {
        self.runners_spawned += 1;
        let label = match mode {
            Mode::Fresh => "fresh",
            Mode::Resume => "resume",
        };
        let name = format!("runner-{}-{label}", self.runners_spawned);
        let sagas = SAGAS.to_string();
        let mut args: Vec<&str> = match mode {
            // All at once, unless the tuning says how many in flight.
            Mode::Fresh if self.tuning.runner.contains(&"--concurrency") => {
                vec!["--sagas", &sagas, "--seed", SIM_SEED]
            }
            Mode::Fresh => vec![
                "--sagas",
                &sagas,
                "--concurrency",
                &sagas,
                "--seed",
                SIM_SEED,
            ],
            Mode::Resume => vec!["--resume"],
        };
        args.extend(self.tuning.runner.iter().copied());
        let nats = self.nats.url();
        let replicas = self.nats.replicas().to_string();
        args.extend([
            "--nats",
            &nats,
            "--nats-replicas",
            &replicas,
            "--db",
            &self.db.url,
            "--no-participants",
            "--json",
            "--ack-wait-secs",
            ACK_WAIT_SECS,
            "--timeout-secs",
            RUNNER_TIMEOUT_SECS,
        ]);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let proc = Proc::spawn(&self.logs.0, name, &self.checkout_bin, &args);
        self.event(format!("started {}", proc.name));
        proc
    }

    /// Waits until all 2,000 sagas are stored (the fresh runner started them all), so
    /// that every fault hits the whole population. Returns how long that took.
    async fn wait_all_stored(&mut self, runner: &mut Proc) -> Duration {
        let since = Instant::now();
        let limit = self.limit(STORE_LIMIT);
        let what = format!("{} to store all {SAGAS} sagas", runner.name);
        loop {
            let last = match self.db.counts().await {
                Ok(c) if c.total >= SAGAS => {
                    self.event(format!("all stored: {c}"));
                    return since.elapsed();
                }
                Ok(c) => c.to_string(),
                // saga_instances does not exist until the runner has migrated.
                Err(e) => e.to_string(),
            };
            self.expect_running(&mut [&mut *runner], &what);
            self.check_deadline(limit, &what, &last);
            tokio::time::sleep(POLL).await;
        }
    }

    /// Lets a seeded-random 0.5–2.5 s pass before fault `n`; the runners must still be
    /// at work when it is over (a run that finished first would prove nothing).
    async fn pause_before_fault(&mut self, runners: &mut [&mut Proc], n: usize) {
        let gap = Duration::from_millis(self.rng.random_range(FAULT_GAP_MS));
        tokio::time::sleep(gap).await;
        let what = format!("fault {n}, {} ms after the previous step", gap.as_millis());
        self.expect_running(runners, &what);
    }

    /// A fault must hit sagas in flight; if none are, the run is too short for the
    /// fault schedule (raise LATENCY_MS or lower PARTICIPANT_CONCURRENCY).
    fn assert_in_flight(&self, counts: Counts, n: usize) {
        assert!(
            counts.total == SAGAS && counts.active > 0,
            "fault {n} found no saga in flight ({counts}): the run is too short for the \
             fault schedule"
        );
    }

    /// Polls until more than `baseline` sagas are settled; returns the time from
    /// `since` (the fault or the restart) to the first settle observed.
    async fn wait_settle_after(
        &mut self,
        baseline: i64,
        since: Instant,
        runners: &mut [&mut Proc],
        what: &str,
    ) -> Duration {
        let limit = self.limit(RECOVER_LIMIT);
        loop {
            let last = match self.db.counts().await {
                Ok(c) if c.settled() > baseline => {
                    let took = since.elapsed();
                    self.event(format!("{what}: {} ms ({c})", took.as_millis()));
                    return took;
                }
                Ok(c) => format!("{c}, baseline {baseline} settled"),
                // The database may just have cut our connection too.
                Err(e) => e.to_string(),
            };
            self.expect_running(runners, what);
            self.check_deadline(limit, what, &last);
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for `runner` to finish the run: notes when every saga is terminal (from
    /// `since`), waits for its exit, and checks its exit status and JSON summary.
    async fn finish(&mut self, runner: &mut Proc, since: Instant) -> Finish {
        let what = format!("{} to finish every saga and exit", runner.name);
        let mut drained = None;
        let mut last = String::from("no answer yet");
        let status = loop {
            if drained.is_none() {
                match self.db.counts().await {
                    Ok(c) if c.total >= SAGAS && c.active == 0 => {
                        drained = Some(since.elapsed());
                        self.event(format!("all terminal: {c}"));
                    }
                    Ok(c) => last = c.to_string(),
                    Err(e) => last = e.to_string(),
                }
            }
            if let Some(status) = runner.exited() {
                break status;
            }
            self.expect_running(&mut [], &what);
            self.check_deadline(self.deadline, &what, &last);
            tokio::time::sleep(POLL).await;
        };
        self.event(format!("{} exited: {status}", runner.name));
        let summary = runner.summary().unwrap_or_else(|| {
            panic!(
                "{} printed no JSON summary as its last stdout line (exit: {status})",
                runner.name
            )
        });
        assert!(
            status.success(),
            "{} exited with {status}; its summary: {summary}",
            runner.name
        );
        for (key, want) in [
            ("started", Value::from(SAGAS)),
            ("unfinished", Value::from(0)),
            ("dead_lettered", Value::from(0)),
            ("consistent", Value::Bool(true)),
        ] {
            assert_eq!(
                summary[key], want,
                "{}'s summary: {key} should be {want}: {summary}",
                runner.name
            );
        }
        let drained = match drained {
            Some(d) => d,
            // It finished between two polls: it exited cleanly, so all are terminal.
            None => {
                let c = self.counts_now().await;
                assert!(
                    c.total == SAGAS && c.active == 0,
                    "{} exited cleanly but the database says {c}",
                    runner.name
                );
                since.elapsed()
            }
        };
        Finish { summary, drained }
    }

    /// The acceptance criteria, checked in PostgreSQL directly (independently of the
    /// runner's own check), each with its own message.
    async fn verify(&mut self, finish: &Finish) -> Verified {
        let db = &self.db;
        let statuses: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM saga_instances GROUP BY status ORDER BY status",
        )
        .fetch_all(&db.pool)
        .await
        .expect("count the sagas by status");
        let of = |s: &str| {
            statuses
                .iter()
                .find(|(status, _)| status == s)
                .map_or(0, |(_, n)| *n)
        };
        let total: i64 = statuses.iter().map(|(_, n)| n).sum();
        let (completed, compensated) = (of("completed"), of("compensated"));
        assert_eq!(
            total, SAGAS,
            "lost or extra sagas: saga_instances holds {total}, not {SAGAS} ({statuses:?})"
        );
        assert_eq!(
            completed + compensated,
            SAGAS,
            "not every saga is completed or compensated: {statuses:?}"
        );

        let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(&db.pool)
            .await
            .expect("count the dead letters");
        assert_eq!(
            dead_letters, 0,
            "this scenario forces no dead letter, yet dead_letters holds {dead_letters}"
        );

        // Effects applied twice: a saga (or an order) with two rows in one service's
        // table; and effects of sagas the store does not know (a lost saga).
        let mut effects_twice = 0;
        for (service, table) in SERVICES {
            let (by_saga, by_order): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT count(*) - count(DISTINCT saga_id), count(*) - count(DISTINCT order_id) \
                 FROM {table}"
            )))
            .fetch_one(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("read {table}: {e}"));
            let dupes: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT saga_id, count(*) FROM {table} GROUP BY saga_id HAVING count(*) > 1 \
                 ORDER BY saga_id LIMIT 10"
            )))
            .fetch_all(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("read {table}: {e}"));
            assert_eq!(
                by_saga, 0,
                "{service} applied {by_saga} effects twice (two rows for one saga_id in \
                 {table}), e.g. {dupes:?}"
            );
            assert_eq!(
                by_order, 0,
                "{service} applied {by_order} effects twice (two rows for one order_id in \
                 {table})"
            );
            effects_twice += by_saga.max(by_order);

            let orphans: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT DISTINCT x.saga_id FROM {table} x WHERE NOT EXISTS \
                 (SELECT 1 FROM saga_instances s WHERE s.id::text = x.saga_id) \
                 ORDER BY 1 LIMIT 10"
            )))
            .fetch_all(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("read {table}: {e}"));
            assert!(
                orphans.is_empty(),
                "{table} holds effects of sagas saga_instances does not know (lost \
                 sagas), e.g. {orphans:?}"
            );
        }

        // Every saga's effects match its outcome.
        let wrong: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "WITH r AS (SELECT saga_id, count(*) FILTER (WHERE released = 0) AS live \
                        FROM sim_inventory_reservations GROUP BY saga_id), \
                  c AS (SELECT saga_id, count(*) FILTER (WHERE refunded = 0) AS live \
                        FROM sim_payment_charges GROUP BY saga_id), \
                  h AS (SELECT saga_id, count(*) AS n FROM sim_shipping_shipments GROUP BY saga_id) \
             SELECT s.id::text, s.status, COALESCE(r.live, 0), COALESCE(c.live, 0), \
                    COALESCE(h.n, 0) \
             FROM saga_instances s \
             LEFT JOIN r ON r.saga_id = s.id::text \
             LEFT JOIN c ON c.saga_id = s.id::text \
             LEFT JOIN h ON h.saga_id = s.id::text \
             WHERE (s.status = 'completed' AND (COALESCE(r.live, 0) <> 1 \
                    OR COALESCE(c.live, 0) <> 1 OR COALESCE(h.n, 0) <> 1)) \
                OR (s.status = 'compensated' AND (COALESCE(r.live, 0) <> 0 \
                    OR COALESCE(c.live, 0) <> 0 OR COALESCE(h.n, 0) <> 0)) \
             ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .expect("match every saga's effects to its outcome");
        let (bad_completed, bad_compensated): (Vec<_>, Vec<_>) =
            wrong.iter().partition(|w| w.1 == "completed");
        let sample = |v: &[&(String, String, i64, i64, i64)]| {
            v.iter()
                .take(5)
                .map(|(id, _, r, c, h)| {
                    format!("{id}: {r} live reservations, {c} live charges, {h} shipments")
                })
                .collect::<Vec<_>>()
        };
        assert!(
            bad_completed.is_empty(),
            "{} completed sagas do not hold exactly one live reservation, one live charge \
             and one shipment, e.g. {:?}",
            bad_completed.len(),
            sample(&bad_completed)
        );
        assert!(
            bad_compensated.is_empty(),
            "{} compensated sagas still hold a live reservation, a live charge or a \
             shipment, e.g. {:?}",
            bad_compensated.len(),
            sample(&bad_compensated)
        );

        // The runner's summary agrees with the database.
        for (key, n) in [("completed", completed), ("compensated", compensated)] {
            assert_eq!(
                finish.summary[key],
                Value::from(n),
                "the runner's summary disagrees with saga_instances on {key}: {}",
                finish.summary
            );
        }

        // The participants survived every fault on their own.
        self.expect_running(&mut [], "the verification");
        Verified {
            completed,
            compensated,
            effects_twice,
            dead_letters,
        }
    }

    /// The scenario's one report line.
    fn report(
        &self,
        in_flight: &[i64],
        recover: &[Duration],
        v: &Verified,
        extra: &[(&str, String)],
    ) -> String {
        let mut line = format!(
            "fault={} seed={} sagas={SAGAS} in_flight_at_faults={} finished={} completed={} \
             compensated={} effects_applied_twice={} dead_letters={} recover_first_settle_ms={}",
            self.name,
            self.seed,
            list(in_flight),
            v.completed + v.compensated,
            v.completed,
            v.compensated,
            v.effects_twice,
            v.dead_letters,
            list(&recover.iter().map(|d| d.as_millis()).collect::<Vec<_>>()),
        );
        for (k, v) in extra {
            line.push_str(&format!(" {k}={v}"));
        }
        line.push_str(&format!(" total_ms={}", ms(self.started.elapsed())));
        line
    }

    /// Starts `n` orchestrator nodes at once and waits until they share the partitions
    /// evenly.
    async fn start_nodes(&mut self, n: usize) {
        for _ in 0..n {
            self.spawn_node();
        }
        let (took, shares) = self
            .wait_balanced(&format!("the {n} nodes to share the partitions"))
            .await;
        self.event(format!(
            "{n} nodes share the partitions {shares:?} after {} ms",
            took.as_millis()
        ));
    }

    /// Starts an orchestrator node (`skald serve`) on the scenario's database and
    /// broker; returns its index in `nodes`.
    fn spawn_node(&mut self) -> usize {
        let name = format!("node-{}", self.nodes.len() + 1);
        let args: Vec<String> = [
            "serve",
            "--db",
            &self.db.url,
            "--nats",
            &self.nats.url(),
            "--nats-replicas",
            &self.nats.replicas().to_string(),
            "--ack-wait-secs",
            ACK_WAIT_SECS,
            "--metrics-addr",
            "127.0.0.1:0",
        ]
        .map(str::to_owned)
        .into();
        let proc = Proc::spawn_logging(&self.logs.0, name, &skald_bin(), &args, NODE_LOG);
        let pid = proc.pid().expect("a node just spawned runs");
        self.event(format!("started {} (pid {pid})", proc.name));
        self.nodes.push(Node {
            proc,
            holder: format!("pid{pid}-"),
        });
        self.nodes.len() - 1
    }

    /// Waits until the running nodes, and only they, hold a membership lease, every
    /// partition is held by one of them, and each holds its fair share (between
    /// `floor` and `ceil` of partitions / nodes). Returns how long that took and the
    /// shares, in the order of `nodes`.
    async fn wait_balanced(&mut self, what: &str) -> (Duration, Vec<usize>) {
        let since = Instant::now();
        let limit = self.limit(REBALANCE_LIMIT);
        loop {
            let last = match self.db.leases().await {
                Ok(leases) => {
                    let running: Vec<&Node> =
                        self.nodes.iter().filter(|n| n.proc.running()).collect();
                    match leases.shares(&running) {
                        Ok(shares) => return (since.elapsed(), shares),
                        Err(e) => format!("{e} ({leases})"),
                    }
                }
                Err(e) => e.to_string(),
            };
            self.expect_running(&mut [], what);
            self.check_deadline(limit, what, &last);
            tokio::time::sleep(POLL).await;
        }
    }

    /// The live leases now, retrying while the database is unreachable.
    async fn leases_now(&mut self) -> Leases {
        let limit = self.limit(QUERY_LIMIT);
        loop {
            match self.db.leases().await {
                Ok(l) => return l,
                Err(e) => self.check_deadline(limit, "the leases", &e.to_string()),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The saga counts of `partitions` now, retrying while the database is unreachable.
    async fn partition_counts_now(&mut self, partitions: &[u32]) -> Counts {
        let limit = self.limit(QUERY_LIMIT);
        loop {
            match self.db.partition_counts(partitions).await {
                Ok(c) => return c,
                Err(e) => self.check_deadline(limit, "the partitions' counts", &e.to_string()),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// After node `victim` was killed (at `killed`, `killed_at` in unix ms): polls, in
    /// one loop, until each of its partitions (the keys of `dead_until`, with when its
    /// lease on each ends) is leased by a running node, and until each of them that had
    /// sagas in flight has settled one since the kill (from the store's times, so that
    /// the answer does not depend on when this polls).
    async fn wait_partitions_taken_over(
        &mut self,
        victim: usize,
        dead_until: &BTreeMap<u32, i64>,
        killed: Instant,
        killed_at: i64,
        runner: &mut Proc,
    ) -> Takeover {
        let victim_name = self.nodes[victim].proc.name.clone();
        let moved: Vec<u32> = dead_until.keys().copied().collect();
        let what = format!(
            "the running nodes to take {victim_name}'s partitions {moved:?} and settle a \
             saga of each"
        );
        let leases_limit = (killed + REBALANCE_LIMIT).min(self.deadline);
        let limit = self.limit(RECOVER_LIMIT);
        let mut leases_moved = None;
        // The partitions with sagas in flight at the kill (read on the first poll).
        let mut busy: Option<Vec<u32>> = None;
        loop {
            let (leases, progress) = (
                self.db.leases().await,
                self.db.partition_progress(&moved, killed_at).await,
            );
            let last = match (leases, progress) {
                (Ok(leases), Ok(progress)) => {
                    let busy = busy.get_or_insert_with(|| {
                        progress
                            .iter()
                            .filter(|p| p.active > 0 || p.first_settle.is_some())
                            .map(|p| p.partition)
                            .collect()
                    });
                    let orphans: Vec<u32> = moved
                        .iter()
                        .copied()
                        .filter(|p| {
                            !leases.holder_of(*p).is_some_and(|h| {
                                self.nodes.iter().any(|n| n.proc.running() && n.holds(h))
                            })
                        })
                        .collect();
                    if leases_moved.is_none() && orphans.is_empty() {
                        let took = killed.elapsed();
                        self.event(format!(
                            "{victim_name}'s partitions all leased by running nodes after {} \
                             ms: {leases}",
                            took.as_millis()
                        ));
                        leases_moved = Some(took);
                    }
                    let waiting: Vec<u32> = busy
                        .iter()
                        .copied()
                        .filter(|p| {
                            !progress
                                .iter()
                                .any(|q| q.partition == *p && q.first_settle.is_some())
                        })
                        .collect();
                    if let (Some(leases_moved), true) = (leases_moved, waiting.is_empty()) {
                        let firsts: Vec<(u32, i64)> = progress
                            .iter()
                            .filter_map(|q| Some((q.partition, q.first_settle?)))
                            .collect();
                        let since = |at: i64| Duration::from_millis((at - killed_at).max(0) as u64);
                        let first_settle =
                            since(firsts.iter().map(|f| f.1).min().unwrap_or(killed_at));
                        let all_progress =
                            since(firsts.iter().map(|f| f.1).max().unwrap_or(killed_at));
                        let under_dead_lease: Vec<(u32, i64, i64)> = firsts
                            .iter()
                            .filter_map(|&(p, at)| {
                                let until = *dead_until.get(&p)?;
                                (at < until).then_some((p, at, until))
                            })
                            .collect();
                        self.event(format!(
                            "every busy partition of {victim_name}'s settled a saga since the \
                             kill (from the store's times): the first after {} ms, the last \
                             after {} ms; firsts {firsts:?}",
                            first_settle.as_millis(),
                            all_progress.as_millis()
                        ));
                        return Takeover {
                            leases_moved,
                            first_settle,
                            all_progress,
                            under_dead_lease,
                        };
                    }
                    if leases_moved.is_none() {
                        self.check_deadline(
                            leases_limit,
                            &format!("the running nodes to lease {victim_name}'s partitions"),
                            &format!(
                                "partitions {orphans:?} not leased by a running node: {leases}"
                            ),
                        );
                    }
                    format!("partitions {waiting:?} settled none since the kill; {leases}")
                }
                (Err(e), _) | (_, Err(e)) => e.to_string(),
            };
            self.expect_running(&mut [&mut *runner], &what);
            self.check_deadline(limit, &what, &last);
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until more than `baseline` sagas of `partitions` are settled; returns the
    /// time from `since`.
    async fn wait_partitions_settle(
        &mut self,
        partitions: &[u32],
        baseline: i64,
        since: Instant,
        runner: &mut Proc,
        what: &str,
    ) -> Duration {
        let limit = self.limit(RECOVER_LIMIT);
        loop {
            let last = match self.db.partition_counts(partitions).await {
                Ok(c) if c.settled() > baseline => {
                    let took = since.elapsed();
                    self.event(format!("{what}: {} ms ({c})", took.as_millis()));
                    return took;
                }
                Ok(c) => format!("{c}, baseline {baseline} settled"),
                Err(e) => e.to_string(),
            };
            self.expect_running(&mut [&mut *runner], what);
            self.check_deadline(limit, what, &last);
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until a saga has settled at or after `since_ms` (unix ms, as the store
    /// records `updated_at_ms`); returns how long after `since_ms` the first did, and how
    /// many settled between `since_ms` and `until_ms`.
    async fn wait_first_settle_since(
        &mut self,
        since_ms: i64,
        until_ms: i64,
        runner: &mut Proc,
        what: &str,
    ) -> (Duration, i64) {
        let limit = self.limit(RECOVER_LIMIT);
        loop {
            let last = match self.db.settles_since(since_ms, until_ms).await {
                Ok((Some(first), before_until)) => {
                    let took = Duration::from_millis((first - since_ms).max(0) as u64);
                    self.event(format!(
                        "{what}: {} ms after it (from the store's times), {before_until} \
                         settled before {until_ms}",
                        took.as_millis()
                    ));
                    return (took, before_until);
                }
                Ok((None, _)) => "none settled yet".to_owned(),
                Err(e) => e.to_string(),
            };
            self.expect_running(&mut [&mut *runner], what);
            self.check_deadline(limit, what, &last);
            tokio::time::sleep(POLL).await;
        }
    }

    /// What the nodes say about themselves, as report fields: per node still running
    /// (`nodes_at_end`), each of [`NODE_METRICS`] from its `/metrics`; per node, the
    /// warnings and errors it logged.
    async fn node_report(&mut self) -> Vec<(&'static str, String)> {
        let mut names = Vec::new();
        let mut values: Vec<Vec<u64>> = vec![Vec::new(); NODE_METRICS.len()];
        for node in self.nodes.iter().filter(|n| n.proc.running()) {
            let body = tokio::task::block_in_place(|| node.metrics())
                .unwrap_or_else(|e| panic!("{}'s metrics: {e}", node.proc.name));
            names.push(node.proc.name.clone());
            for ((_, name, label), values) in NODE_METRICS.iter().zip(&mut values) {
                values.push(metric(&body, name, *label));
            }
        }
        let (warnings, errors): (Vec<usize>, Vec<usize>) =
            self.nodes.iter().map(|n| n.proc.logged_problems()).unzip();
        let mut fields = vec![("nodes_at_end", list(&names))];
        for ((key, _, _), values) in NODE_METRICS.iter().zip(values) {
            fields.push((key, list(&values)));
        }
        fields.push(("node_log_warnings", list(&warnings)));
        fields.push(("node_log_errors", list(&errors)));
        fields
    }

    /// The saga counts now, retrying while the database is unreachable.
    async fn counts_now(&mut self) -> Counts {
        let limit = self.limit(QUERY_LIMIT);
        loop {
            match self.db.counts().await {
                Ok(c) => return c,
                Err(e) => self.check_deadline(limit, "the saga counts", &e.to_string()),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Fails if a participant, a node (not killed by the test) or one of `runners` has
    /// exited.
    fn expect_running(&mut self, runners: &mut [&mut Proc], what: &str) {
        for proc in self
            .participants
            .iter_mut()
            .chain(self.nodes.iter_mut().map(|n| &mut n.proc))
            .chain(runners.iter_mut().map(|r| &mut **r))
        {
            if let Some(status) = proc.exited() {
                panic!(
                    "{} exited ({status}) while waiting for {what}{}",
                    proc.name,
                    proc.summary()
                        .map(|s| format!("; its summary: {s}"))
                        .unwrap_or_default()
                );
            }
        }
    }

    /// Fails if `limit` has passed, saying what was awaited and what was last seen.
    fn check_deadline(&self, limit: Instant, what: &str, last: &str) {
        assert!(
            Instant::now() < limit,
            "timed out waiting for {what} ({} s into the scenario); last seen: {last}",
            self.started.elapsed().as_secs()
        );
    }

    /// `now + d`, but no later than the scenario's deadline.
    fn limit(&self, d: Duration) -> Instant {
        (Instant::now() + d).min(self.deadline)
    }

    fn event(&mut self, what: String) {
        let at = self.started.elapsed().as_millis();
        self.timeline.push(format!("{at:>7} ms  {what}"));
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // The cluster's logs die with it: copied beside the processes' first.
        if let Broker::Cluster(cluster) = &self.nats {
            for i in 0..NatsCluster::SIZE {
                let name = format!("{}.nats-server.log", cluster.server_name(i));
                let _ = std::fs::copy(cluster.log_file(i), self.logs.0.join(name));
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "\n==== fault scenario {} (seed {}) failed; timeline:",
                self.name, self.seed
            );
            for line in &self.timeline {
                eprintln!("  {line}");
            }
            self.logs.print_tails();
        }
        // For a kept log directory (a failure, or SKALD_FAULTS_KEEP_LOGS).
        let _ = std::fs::write(self.logs.0.join("timeline.txt"), self.timeline.join("\n"));
        for n in &mut self.nodes {
            n.proc.kill();
        }
        for p in &mut self.participants {
            p.kill();
        }
    }
}

/// Saga counts in `saga_instances`.
#[derive(Debug, Clone, Copy)]
struct Counts {
    total: i64,
    /// Running or compensating: in flight.
    active: i64,
}

impl Counts {
    fn settled(self) -> i64 {
        self.total - self.active
    }
}

impl Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} stored, {} in flight, {} settled",
            self.total,
            self.active,
            self.settled()
        )
    }
}

/// What a scenario changes from the defaults: the participants' mean service time, the
/// payment service's extra arguments, the runners' (after the defaults, so they win),
/// and whether NATS is a three-node cluster rather than one server.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    latency_ms: &'static str,
    payment: &'static [&'static str],
    runner: &'static [&'static str],
    cluster: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            latency_ms: LATENCY_MS,
            payment: &[],
            runner: &[],
            cluster: false,
        }
    }
}

impl Tuning {
    /// The scaled-out scenarios': the NATS cluster, and a runner that applies no reply
    /// (the nodes run every saga).
    fn scaled_out() -> Tuning {
        Tuning {
            runner: &["--no-consume"],
            cluster: true,
            ..Tuning::default()
        }
    }
}

/// How the finishing runner ended.
#[derive(Debug)]
struct Finish {
    /// Its JSON summary.
    summary: Value,
    /// From the last fault (or the start) until every saga was terminal.
    drained: Duration,
}

/// What the database says after a scenario.
#[derive(Debug)]
struct Verified {
    completed: i64,
    compensated: i64,
    effects_twice: i64,
    dead_letters: i64,
}

/// How a killed node's partitions were taken over.
#[derive(Debug, Clone)]
struct Takeover {
    /// From the kill until every one of its partitions was leased by a running node.
    leases_moved: Duration,
    /// From the kill until the first saga of its partitions settled.
    first_settle: Duration,
    /// From the kill until every one of its partitions that had sagas in flight had
    /// settled one.
    all_progress: Duration,
    /// Its partitions whose first saga settled after the kill settled before its lease
    /// on them ended (partition, settled at, lease end; unix ms): nobody should run a
    /// partition whose lease a dead node still holds.
    under_dead_lease: Vec<(u32, i64, i64)>,
}

/// One partition's progress since a moment (`Db::partition_progress`).
#[derive(Debug, Clone, Copy)]
struct PartitionProgress {
    partition: u32,
    /// Its sagas in flight now.
    active: i64,
    /// When its first saga to settle since the moment did (unix ms), if one did.
    first_settle: Option<i64>,
}

// ---------------------------------------------------------------------------------------
// Scaled out: the NATS cluster, the nodes and their leases
// ---------------------------------------------------------------------------------------

/// The scenario's NATS: one nats-server, or a three-node JetStream cluster.
enum Broker {
    Server(NatsServer),
    Cluster(NatsCluster),
}

impl Broker {
    /// What every process connects with: the server's URL, or the cluster's three seed
    /// URLs, comma-separated.
    fn url(&self) -> String {
        match self {
            Broker::Server(s) => s.url(),
            Broker::Cluster(c) => c.urls(),
        }
    }

    /// The replicas of skald's streams: one per nats-server.
    fn replicas(&self) -> usize {
        match self {
            Broker::Server(_) => 1,
            Broker::Cluster(_) => NatsCluster::SIZE,
        }
    }

    fn server(&mut self) -> &mut NatsServer {
        match self {
            Broker::Server(s) => s,
            Broker::Cluster(_) => panic!("this scenario runs a NATS cluster, not one server"),
        }
    }

    fn cluster(&mut self) -> &mut NatsCluster {
        match self {
            Broker::Cluster(c) => c,
            Broker::Server(_) => panic!("this scenario runs one nats-server, not a cluster"),
        }
    }
}

/// An orchestrator node: a `skald serve` process.
struct Node {
    proc: Proc,
    /// The start of the name it leases under in skald_leases (a runtime names itself
    /// `pid<pid>-<uuid>`).
    holder: String,
}

impl Node {
    /// Whether `holder` (a lease's) is this node.
    fn holds(&self, holder: &str) -> bool {
        holder.starts_with(&self.holder)
    }

    /// Its `/metrics` (the address it printed when ready), in the Prometheus text
    /// format.
    fn metrics(&self) -> Result<String, String> {
        use std::io::{Read, Write};
        let log = std::fs::read_to_string(&self.proc.stderr).map_err(|e| e.to_string())?;
        let addr: SocketAddr = log
            .lines()
            .find_map(|l| {
                l.split_once("metrics on http://")?
                    .1
                    .strip_suffix("/metrics")
            })
            .ok_or("no \"metrics on http://\" line on its stderr")?
            .parse()
            .map_err(|e| format!("its metrics address: {e}"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, QUERY_LIMIT)
            .map_err(|e| format!("{addr}: {e}"))?;
        s.set_read_timeout(Some(QUERY_LIMIT))
            .map_err(|e| e.to_string())?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .map_err(|e| format!("{addr}: {e}"))?;
        match answer.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => Err(format!("{addr}: {}", answer.lines().next().unwrap_or(""))),
        }
    }
}

/// The sum of the samples of counter or gauge `name` (those whose labels contain
/// `label`, if given) in a Prometheus text body; 0 when there is none.
fn metric(body: &str, name: &str, label: Option<&str>) -> u64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| label.is_none_or(|label| l.contains(label)))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v.round() as u64)
        .sum()
}

/// The live leases of skald_leases (`until_ms` not passed): the nodes' memberships and
/// the partitions' holders.
#[derive(Debug, Default)]
struct Leases {
    /// The lease groups seen (the nodes that share partitions): one in these scenarios.
    groups: BTreeSet<String>,
    /// The holders of a live `node/<holder>` lease: the live nodes.
    members: Vec<String>,
    /// Partition → its live lease.
    partitions: BTreeMap<u32, PartitionLease>,
}

/// Who holds a partition's lease, and until when.
#[derive(Debug, Clone)]
struct PartitionLease {
    holder: String,
    /// When it ends unless renewed: unix ms, on the holder's clock (this machine's).
    until_ms: i64,
}

impl Leases {
    fn holder_of(&self, partition: u32) -> Option<&str> {
        self.partitions.get(&partition).map(|l| l.holder.as_str())
    }

    /// The partitions `node` holds.
    fn held_by(&self, node: &Node) -> Vec<u32> {
        self.partitions
            .iter()
            .filter(|(_, l)| node.holds(&l.holder))
            .map(|(p, _)| *p)
            .collect()
    }

    /// Each of `nodes`' share of the partitions, if they (and only they) are members,
    /// hold every partition between them and each holds its fair share; what is off
    /// otherwise.
    fn shares(&self, nodes: &[&Node]) -> Result<Vec<usize>, String> {
        if nodes.is_empty() {
            return Err("no node runs".into());
        }
        if self.groups.len() > 1 {
            return Err(format!(
                "the nodes lease in {} groups, not one: {:?}",
                self.groups.len(),
                self.groups
            ));
        }
        for n in nodes {
            if !self.members.iter().any(|h| n.holds(h)) {
                return Err(format!("{} holds no membership lease yet", n.proc.name));
            }
        }
        if let Some(other) = self
            .members
            .iter()
            .find(|h| !nodes.iter().any(|n| n.holds(h)))
        {
            return Err(format!(
                "{other} (not a running node) still holds a membership lease"
            ));
        }
        let free: Vec<u32> = (0..PARTITIONS)
            .filter(|p| {
                !self
                    .holder_of(*p)
                    .is_some_and(|h| nodes.iter().any(|n| n.holds(h)))
            })
            .collect();
        if !free.is_empty() {
            return Err(format!(
                "partitions {free:?} are not held by a running node"
            ));
        }
        let shares: Vec<usize> = nodes.iter().map(|n| self.held_by(n).len()).collect();
        let count = PARTITIONS as usize;
        let (least, most) = (count / nodes.len(), count.div_ceil(nodes.len()));
        if shares.iter().any(|s| *s < least || *s > most) {
            return Err(format!(
                "shares {shares:?} are not within {least}..={most} each"
            ));
        }
        Ok(shares)
    }
}

impl Display for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut by_holder: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (p, l) in &self.partitions {
            by_holder.entry(l.holder.as_str()).or_default().push(*p);
        }
        write!(f, "{} live nodes", self.members.len())?;
        for (h, ps) in by_holder {
            let member = if self.members.iter().any(|n| n == h) {
                ""
            } else {
                " (no membership)"
            };
            write!(f, "; {h}{member}: {ps:?}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: a database of the scenario's own
// ---------------------------------------------------------------------------------------

/// A database of the scenario's own (created and dropped by [`PgDatabase`]), with the
/// test's own connections for polling and verifying.
struct Db {
    db: PgDatabase,
    url: String,
    pool: PgPool,
}

impl Db {
    async fn create() -> Db {
        let db = PgDatabase::create().await;
        let url = db.url();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        Db { db, url, pool }
    }

    async fn counts(&self) -> Result<Counts, sqlx::Error> {
        let (total, active) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status IN ('running', 'compensating')) \
             FROM saga_instances",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Counts { total, active })
    }

    /// Saga counts of the sagas in `partitions`.
    async fn partition_counts(&self, partitions: &[u32]) -> Result<Counts, sqlx::Error> {
        let partitions: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let (total, active) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status IN ('running', 'compensating')) \
             FROM saga_instances WHERE partition_no = ANY($1)",
        )
        .bind(&partitions)
        .fetch_one(&self.pool)
        .await?;
        Ok(Counts { total, active })
    }

    /// For each of `partitions` that holds sagas: its sagas in flight, and when the
    /// first of them to settle at or after `since_ms` did (unix ms, `updated_at_ms`:
    /// the settling node's clock, this machine's).
    async fn partition_progress(
        &self,
        partitions: &[u32],
        since_ms: i64,
    ) -> Result<Vec<PartitionProgress>, sqlx::Error> {
        let partitions: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let rows: Vec<(i32, i64, Option<i64>)> = sqlx::query_as(
            "SELECT partition_no, \
                    count(*) FILTER (WHERE status IN ('running', 'compensating')), \
                    min(updated_at_ms) FILTER (WHERE status IN ('completed', 'compensated', \
                                               'failed') AND updated_at_ms >= $2) \
             FROM saga_instances WHERE partition_no = ANY($1) GROUP BY partition_no",
        )
        .bind(&partitions)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(p, active, first_settle)| PartitionProgress {
                partition: p as u32,
                active,
                first_settle,
            })
            .collect())
    }

    /// Of the sagas settled at or after `since_ms` (unix ms, `updated_at_ms`: the
    /// settling node's clock, this machine's): when the first settled, and how many
    /// settled before `until_ms`.
    async fn settles_since(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<(Option<i64>, i64), sqlx::Error> {
        sqlx::query_as(
            "SELECT min(updated_at_ms), count(*) FILTER (WHERE updated_at_ms < $2) \
             FROM saga_instances \
             WHERE status IN ('completed', 'compensated', 'failed') AND updated_at_ms >= $1",
        )
        .bind(since_ms)
        .bind(until_ms)
        .fetch_one(&self.pool)
        .await
    }

    /// The live leases: those whose end (`until_ms`, the nodes' clock: this machine's)
    /// has not passed.
    async fn leases(&self) -> Result<Leases, sqlx::Error> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT name, holder, until_ms FROM skald_leases \
             WHERE until_ms > (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut leases = Leases::default();
        // `node/<group>/<holder>` and `partition/<group>/<p>`: the group names the nodes
        // that share partitions (one build of one deployment; the scenarios run one).
        let split = |rest: &str| match rest.rsplit_once('/') {
            Some((group, last)) => (group.to_owned(), last.to_owned()),
            None => (String::new(), rest.to_owned()),
        };
        for (name, holder, until_ms) in rows {
            if let Some(rest) = name.strip_prefix("node/") {
                let (group, node) = split(rest);
                assert_eq!(node, holder, "the node lease {name:?} is held by {holder}");
                leases.groups.insert(group);
                leases.members.push(holder);
            } else if let Some(rest) = name.strip_prefix("partition/") {
                let (group, p) = split(rest);
                let p: u32 = p
                    .parse()
                    .unwrap_or_else(|_| panic!("a lease named {name:?}"));
                leases.groups.insert(group);
                leases
                    .partitions
                    .insert(p, PartitionLease { holder, until_ms });
            }
        }
        Ok(leases)
    }

    async fn table_exists(&self, table: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = $1)",
        )
        .bind(table)
        .fetch_one(&self.pool)
        .await
    }

    /// Terminates every backend connected to the database (everyone's connections,
    /// the test's too), from a connection to the server's `postgres` database; returns
    /// how many were terminated.
    async fn terminate_backends(&self) -> usize {
        let server = self.db.server_url();
        let mut admin = PgConnection::connect(server)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {server}: {e}"));
        let done: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(self.db.name())
        .fetch_all(&mut admin)
        .await
        .expect("pg_terminate_backend");
        let _ = admin.close().await;
        done.into_iter().filter(|t| *t).count()
    }
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// A child process with its stdout and stderr in log files, SIGKILLed (and reaped) when
/// dropped.
struct Proc {
    name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(logs: &Path, name: String, bin: &Path, args: &[String]) -> Proc {
        Proc::spawn_logging(logs, name, bin, args, "warn")
    }

    /// [`Proc::spawn`] with `RUST_LOG=rust_log`.
    fn spawn_logging(
        logs: &Path,
        name: String,
        bin: &Path,
        args: &[String],
        rust_log: &str,
    ) -> Proc {
        let stdout = logs.join(format!("{name}.stdout.log"));
        let stderr = logs.join(format!("{name}.stderr.log"));
        let file =
            |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let child = skald_command(bin)
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(file(&stdout))
            .stderr(file(&stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", bin.display()));
        Proc {
            name,
            child: Some(child),
            status: None,
            stdout,
            stderr,
        }
    }

    /// Its process id, unless the test killed it.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs: neither killed by the test nor seen exited (by
    /// [`Proc::exited`], which every wait calls).
    fn running(&self) -> bool {
        self.child.is_some() && self.status.is_none()
    }

    /// The warning and error lines on its stderr.
    fn logged_problems(&self) -> (usize, usize) {
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let count = |level: &str| log.lines().filter(|l| l.contains(level)).count();
        (count(" WARN "), count(" ERROR "))
    }

    /// Its exit status, if it has exited (and not been killed by the test).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = &mut self.child
        {
            self.status = child
                .try_wait()
                .unwrap_or_else(|e| panic!("poll {}: {e}", self.name));
        }
        self.status
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The JSON object on its last non-empty stdout line, if any.
    fn summary(&self) -> Option<Value> {
        let out = std::fs::read_to_string(&self.stdout).ok()?;
        let last = out.lines().rev().find(|l| !l.trim().is_empty())?;
        serde_json::from_str(last).ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The scenario's log directory: removed when the scenario passes (unless
/// `SKALD_FAULTS_KEEP_LOGS` is set), kept (and its tails printed) when it fails.
struct LogDir(PathBuf);

impl LogDir {
    fn new(scenario: &str) -> LogDir {
        let dir = std::env::temp_dir().join(format!(
            "skald-faults-{scenario}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        LogDir(dir)
    }

    fn print_tails(&self) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
            if lines.is_empty() {
                eprintln!("---- {} (empty)", name.unwrap_or_default());
                continue;
            }
            eprintln!(
                "---- {} ({} lines, last {LOG_TAIL_LINES}) ----",
                name.unwrap_or_default(),
                lines.len()
            );
            for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                eprintln!("{line}");
            }
        }
        eprintln!("---- logs kept in {}", self.0.display());
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if std::env::var_os("SKALD_FAULTS_KEEP_LOGS").is_some() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// An environment variable scripts/test sets; its absence fails the test (never skips).
fn env_var(var: &str, what: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run the fault suite through scripts/test, which provisions \
             {what} (or set {var} yourself; see the header of tests/faults.rs)"
        )
    })
}

/// `target/<profile>/examples/<name>`, beside this test's `target/<profile>/deps/`.
fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --all-features --test faults` builds it; or run \
         `cargo build --all-features --example {name}`",
        bin.display()
    );
    bin
}

/// The demo `skald` binary, whose `serve` is an orchestrator node: cargo builds it for
/// this test when the `demo` feature is on (`--all-features`).
fn skald_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_skald") {
        Some(bin) => PathBuf::from(bin),
        None => panic!(
            "the scaled-out scenarios run `skald serve`, the demo binary, which builds only \
             with the `demo` feature: run the suite with --all-features (scripts/test does)"
        ),
    }
}

/// Now, in milliseconds since the Unix epoch (the clock the nodes stamp the store with).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// `[a,b,c]`
fn list<T: Display>(xs: &[T]) -> String {
    let items: Vec<String> = xs.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(","))
}
