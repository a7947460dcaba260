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
//! Alone, against a PostgreSQL server and a nats-server binary of your own:
//!
//! ```text
//! SKALD_TEST_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! SKALD_NATS_SERVER_BIN=$(command -v nats-server) \
//! cargo test --all-features --test faults -- --nocapture --test-threads=1
//! ```
//!
//! `SKALD_FAULTS_SEED=N` replaces every scenario's fault-timing seed (printed as
//! `seed=`), to replay a run's fault moments.

mod common;

use std::fmt::Display;
use std::fs::File;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{NatsServer, PgDatabase};
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
    sc.nats.kill();
    let killed = Instant::now();
    sc.event(format!("kill -9 nats-server: {before} before"));
    tokio::time::sleep(NATS_OUTAGE).await;
    sc.expect_running(&mut [&mut runner], "while nats-server was down");
    tokio::task::block_in_place(|| sc.nats.restart());
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
    tuning: Tuning,
    // Dropped in this order, after the participants are killed: the database, the
    // broker, then the logs.
    db: Db,
    nats: NatsServer,
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
        let nats = tokio::task::block_in_place(NatsServer::start);
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
            tuning,
            db,
            nats,
            logs,
        };
        sc.event(format!(
            "database {}, nats-server {}, logs in {}",
            sc.db.db.name(),
            sc.nats.url(),
            sc.logs.0.display()
        ));
        for (service, _) in SERVICES {
            let mut args: Vec<String> = [
                service,
                "--nats",
                &sc.nats.url(),
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
        sc.event("participants up (their tables exist)".to_owned());
        sc
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
        args.extend([
            "--nats",
            &nats,
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

    /// Fails if a participant or one of `runners` has exited.
    fn expect_running(&mut self, runners: &mut [&mut Proc], what: &str) {
        for proc in self
            .participants
            .iter_mut()
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
/// payment service's extra arguments, and the runners' (after the defaults, so they
/// win).
#[derive(Debug, Clone, Copy)]
struct Tuning {
    latency_ms: &'static str,
    payment: &'static [&'static str],
    runner: &'static [&'static str],
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            latency_ms: LATENCY_MS,
            payment: &[],
            runner: &[],
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
}

impl Proc {
    fn spawn(logs: &Path, name: String, bin: &Path, args: &[String]) -> Proc {
        let stdout = logs.join(format!("{name}.stdout.log"));
        let stderr = logs.join(format!("{name}.stderr.log"));
        let file =
            |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
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
        }
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

/// The scenario's log directory: removed when the scenario passes, kept (and its tails
/// printed) when it fails.
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
        if !std::thread::panicking() {
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

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// `[a,b,c]`
fn list<T: Display>(xs: &[T]) -> String {
    let items: Vec<String> = xs.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(","))
}
