//! skald's benchmark: the checkout saga at a fixed count and concurrency, in four
//! configurations, printing throughput, latency percentiles, per-step overhead, CPU per
//! saga and peak memory. Not a test: nothing is asserted; `BENCHMARKS.md` holds the
//! figures and how to read them.
//!
//! ```text
//! scripts/bench                                   # provisions nats-server + PostgreSQL, runs everything
//! cargo run --release --example bench -- --config embedded
//! cargo run --release --example bench -- --config production --nats nats://127.0.0.1:4222 \
//!     --pg postgres://postgres@127.0.0.1:5432/postgres
//! cargo run --release --example bench -- --config all --json   # one JSON line per run
//! cargo run --release --example bench -- --config production \
//!     --nats nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 --nats-replicas 3
//! scripts/bench --config scaleout                 # provisions a three-node NATS cluster too
//! ```
//!
//! Configurations:
//! - `embedded`: in-process bus, SQLite file (WAL, synchronous=FULL), the simulated
//!   services in-process (answering at once);
//! - `production`: NATS JetStream (file storage, acked publishes) and PostgreSQL
//!   (synchronous_commit as the server says), the three services as separate processes
//!   (this binary, `bench participant`);
//! - `floor`: what skald is measured against — the same message pattern on raw
//!   JetStream with no orchestration (a command published, a participant process
//!   replies, three times per saga, same streams, acks and storage), and the raw
//!   PostgreSQL commit rate for skald's row shapes;
//! - `memory`: 100,000 sagas waiting on participants that are not running yet
//!   (production configuration, passivation on), then answered: peak RSS and RSS per
//!   waiting saga;
//! - `scaleout` (not part of `all`: it wants a NATS cluster): the production checkout
//!   with 1, 2 and 3 orchestrator nodes (`--nodes`), each a process of its own (this
//!   binary, `bench node`), on a three-node NATS cluster (`--nats` the seed list,
//!   `--nats-replicas 3`); this process only sends start requests over NATS
//!   (docs/protocol.md, "Starting a saga") and follows the sagas' lifecycle events.
//!   One line per node count: throughput, CPU per saga of everything but this process
//!   (nodes, participants, nats-servers, PostgreSQL), commit conflicts and cold
//!   activations per saga.
//!
//! Modes: `latency` (one saga at a time) and `throughput` (`--concurrency`, default
//! 1,000 in flight).

use std::collections::HashMap;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;
use skald::adapters::memory::MemoryBus;
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::adapters::postgres::PostgresStore;
use skald::adapters::sqlite::SqliteStore;
use skald::ids::SagaId;
use skald::participant;
use skald::ports::{Bus, Headers, Message, SagaStore};
use skald::{Runtime, RuntimeOptions, SagaOutcome};
use skald_sagas::checkout::{Checkout, CheckoutTiming, LineItem, checkout_definition};
use skald_sagas::sim::{MemoryLedger, SimConfig, SimServices};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::{Semaphore, mpsc};

#[path = "checkout/stats.rs"]
mod stats;
use stats::{percentile, round2};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "skald's benchmark (see BENCHMARKS.md)")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Which configuration(s) to run.
    #[arg(long, value_enum, default_value = "all")]
    config: Config,
    /// Which mode(s) to run.
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Sagas in a throughput run [default: 10,000; scaleout: 20,000 per node count].
    #[arg(long)]
    sagas: Option<usize>,
    /// Sagas in a latency run (one at a time).
    #[arg(long, default_value_t = 300)]
    latency_sagas: usize,
    /// Sagas in flight in a throughput run.
    #[arg(long, default_value_t = 1_000)]
    concurrency: usize,
    /// Sagas started per second in a paced run (open loop).
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Waiting sagas in the memory configuration.
    #[arg(long, default_value_t = 100_000)]
    waiting: usize,
    /// The nats-server (production, floor, memory), or several seed URLs of one
    /// cluster, comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The replica count of skald's streams (3 on a three-node cluster; 1 to 5).
    #[arg(long, global = true, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=5))]
    nats_replicas: u64,
    /// A PostgreSQL server where the user may create databases (production, floor,
    /// memory); each run gets a database of its own, dropped afterwards.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg: String,
    /// Where the embedded configuration's SQLite file goes (a fresh file per run).
    #[arg(long, default_value = "target/bench")]
    dir: String,
    /// Print one JSON object per run (and nothing else on stdout).
    #[arg(long)]
    json: bool,
    /// The orchestrator node counts of the scaleout configuration, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3",
          value_parser = clap::value_parser!(u64).range(1..=16))]
    nodes: Vec<u64>,
}

impl Args {
    /// `--sagas`, or `default` when not given.
    fn sagas_or(&self, default: usize) -> usize {
        self.sagas.unwrap_or(default)
    }
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Internal: a checkout participant answering at once (separate process).
    Participant {
        #[arg(long)]
        service: String,
        #[arg(long)]
        nats: String,
    },
    /// Internal: the floor's participant: replies to every raw command.
    FloorParticipant {
        #[arg(long)]
        nats: String,
    },
    /// Internal: an orchestrator node of the scaleout configuration (separate process):
    /// prints `{"ready":true}` once it serves, its counters as one JSON line for every
    /// line read on stdin, and, when stdin closes (or on SIGTERM), shuts down and prints
    /// them a last time.
    Node {
        /// The PostgreSQL database (migrated already or not).
        #[arg(long)]
        db: String,
        #[arg(long)]
        nats: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Config {
    Embedded,
    Production,
    Floor,
    Memory,
    /// Not part of `all`.
    Scaleout,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Latency,
    Throughput,
    /// Starts at a fixed rate (`--rate`), open loop: latency under a given load.
    Paced,
    /// Latency, throughput and paced.
    Both,
}

/// The figures of one run.
#[derive(Debug, Default, Serialize)]
struct Figures {
    config: &'static str,
    mode: &'static str,
    sagas: usize,
    concurrency: usize,
    sagas_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// p50 saga latency / 3 steps (a latency run's per-step cost, participants included).
    per_step_ms: f64,
    cpu_ms_per_saga_orchestrator: f64,
    /// `null` where the participants run in the orchestrator's process.
    cpu_ms_per_saga_participants: Option<f64>,
    peak_rss_mb_orchestrator: f64,
    peak_rss_mb_participants: Option<f64>,
    /// CPU of nats-server and of PostgreSQL (all its processes) per saga, where they run
    /// on this machine (backends that exited during the run are not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ms_per_saga_nats_server: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ms_per_saga_postgres: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_kb_per_waiting_saga: Option<f64>,
    durability: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Process accounting (/proc)

/// CPU time (user + system) of a process, in ms; USER_HZ is 100 on Linux.
fn cpu_ms(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces: fields start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based); here 11 and 12 after ')'.
    (ticks(11) + ticks(12)) * 10.0
}

fn status_kb(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// CPU time (ms) of every process named `comm` (all of PostgreSQL's backends, say).
fn cpu_ms_of(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(|pid| cpu_ms(&pid))
        .sum()
}

/// CPU of the servers on this machine (nats-server, postgres), ms.
fn servers_cpu_ms() -> (f64, f64) {
    (cpu_ms_of("nats-server"), cpu_ms_of("postgres"))
}

/// Resets a process's peak RSS (Linux: `5` to clear_refs), so each run reports its own.
fn reset_peak(pid: &str) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The participant processes of a run.
struct Children(Vec<Child>);

impl Children {
    fn pids(&self) -> Vec<String> {
        self.0.iter().map(|c| c.id().to_string()).collect()
    }
    fn cpu_ms(&self) -> f64 {
        self.pids().iter().map(|p| cpu_ms(p)).sum()
    }
    fn peak_mb(&self) -> f64 {
        self.pids()
            .iter()
            .map(|p| status_kb(p, "VmHWM:"))
            .sum::<f64>()
            / 1024.0
    }
    fn reset_peak(&self) {
        for p in self.pids() {
            reset_peak(&p);
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_children(args: &[Vec<String>]) -> anyhow::Result<Children> {
    let exe = std::env::current_exe().context("this binary's path")?;
    let mut children = Children(Vec::new());
    for a in args {
        children.0.push(
            Command::new(&exe)
                .args(a)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| {
                    // The arguments hold the NATS URL: its password redacted.
                    let shown: Vec<String> =
                        a.iter().map(|x| skald::adapters::redact_url(x)).collect();
                    format!("spawning {} {shown:?}", exe.display())
                })?,
        );
    }
    Ok(children)
}

// ---------------------------------------------------------------------------------------
// Helpers

fn order(i: usize) -> Checkout {
    Checkout::new(
        format!("bench-{i}"),
        format!("customer-{}", i % 97),
        vec![LineItem {
            sku: format!("sku-{}", i % 13),
            quantity: 1,
        }],
        1_000 + (i as u64 % 50) * 10,
    )
}

fn reliable() -> SimConfig {
    SimConfig {
        seed: 1,
        decline_rate: 0.0,
        flaky_rate: 0.0,
        ..SimConfig::default()
    }
}

/// A database of the run's own on the server at `server`, dropped by [`drop_db`].
async fn create_db(server: &str, prefix: &str) -> anyhow::Result<(String, String)> {
    let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    let mut conn = PgConnection::connect(server).await.with_context(|| {
        format!(
            "connecting to PostgreSQL at {} (--pg)",
            skald::adapters::redact_url(server)
        )
    })?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(server);
    Ok((name.clone(), format!("{base}/{name}")))
}

async fn drop_db(server: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(server).await {
        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let _ = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await;
        let _ = conn.close().await;
    }
}

async fn nats_bus(url: &str, replicas: u64) -> anyhow::Result<Arc<dyn Bus>> {
    Ok(Arc::new(
        NatsBus::connect(NatsOptions::new(url).replicas(replicas as usize))
            .await
            .with_context(|| {
                format!(
                    "connecting to NATS at {} (--nats)",
                    skald::adapters::redact_url(url)
                )
            })?,
    ))
}

/// Runs `n` checkout sagas, `concurrency` at a time; returns (elapsed, latencies ms).
async fn drive(
    runtime: &Runtime,
    checkout: &skald::definition::SagaDefinition<Checkout>,
    outcomes: &mut mpsc::Receiver<SagaOutcome>,
    n: usize,
    concurrency: usize,
    rate: Option<f64>,
) -> anyhow::Result<(Duration, Vec<f64>)> {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let started: std::sync::Mutex<HashMap<SagaId, Instant>> =
        std::sync::Mutex::new(HashMap::with_capacity(n));
    let t0 = Instant::now();
    let start_one = |i: usize| {
        let started = &started;
        async move {
            let id = SagaId::new();
            if let Ok(mut s) = started.lock() {
                s.insert(id, Instant::now());
            }
            if let Err(e) = runtime.start_saga_with_id(id, checkout, &order(i)).await {
                eprintln!("start failed: {e}");
            }
        }
    };
    let paced = async {
        let Some(rate) = rate else { return };
        // Open loop: the i-th start is due at i / rate, however the earlier ones fare.
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let mut i = 0;
        loop {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate.max(1e-3));
            tokio::select! {
                () = tokio::time::sleep_until(due.into()), if i < n => {
                    pending.push(start_one(i));
                    i += 1;
                }
                Some(()) = pending.next(), if !pending.is_empty() => {}
                else => break,
            }
        }
    };
    let starter = async {
        if rate.is_some() {
            return paced.await;
        }
        futures_util::stream::iter(0..n)
            .map(anyhow::Ok)
            .for_each_concurrent(concurrency.max(1), |i| {
                let slots = Arc::clone(&slots);
                let started = &started;
                async move {
                    let Ok(i) = i else { return };
                    let Ok(permit) = slots.acquire().await else {
                        return;
                    };
                    permit.forget();
                    let id = SagaId::new();
                    if let Ok(mut s) = started.lock() {
                        s.insert(id, Instant::now());
                    }
                    if let Err(e) = runtime.start_saga_with_id(id, checkout, &order(i)).await {
                        eprintln!("start failed: {e}");
                    }
                }
            })
            .await;
    };
    let collector = async {
        let mut latencies = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(600);
        while latencies.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(o)) = tokio::time::timeout(left, outcomes.recv()).await else {
                bail!(
                    "{} of {n} sagas settled before the deadline",
                    latencies.len()
                );
            };
            let t = started.lock().ok().and_then(|mut s| s.remove(&o.id));
            if let Some(t) = t {
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                slots.add_permits(1);
            }
        }
        Ok(latencies)
    };
    let ((), latencies) = tokio::join!(starter, collector);
    Ok((t0.elapsed(), latencies?))
}

/// What one run measured.
struct Measured {
    elapsed: Duration,
    latencies: Vec<f64>,
    cpu_orchestrator_ms: f64,
    cpu_participants_ms: Option<f64>,
}

fn figures(
    config: &'static str,
    mode: &'static str,
    concurrency: usize,
    m: Measured,
    durability: String,
) -> Figures {
    let Measured {
        elapsed,
        mut latencies,
        cpu_orchestrator_ms,
        cpu_participants_ms,
    } = m;
    latencies.sort_by(f64::total_cmp);
    let n = latencies.len().max(1) as f64;
    let p50 = percentile(&latencies, 50.0);
    Figures {
        config,
        mode,
        sagas: latencies.len(),
        concurrency,
        sagas_per_sec: round2(latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9)),
        p50_ms: round2(p50),
        p99_ms: round2(percentile(&latencies, 99.0)),
        p999_ms: round2(percentile(&latencies, 99.9)),
        per_step_ms: round2(p50 / 3.0),
        cpu_ms_per_saga_orchestrator: round2(cpu_orchestrator_ms / n),
        cpu_ms_per_saga_participants: cpu_participants_ms.map(|c| round2(c / n)),
        durability,
        ..Figures::default()
    }
}

/// (mode, sagas, in flight, paced rate).
fn modes(args: &Args) -> Vec<(&'static str, usize, usize, Option<f64>)> {
    let mut m = Vec::new();
    if matches!(args.mode, Mode::Latency | Mode::Both) {
        m.push(("latency", args.latency_sagas, 1, None));
    }
    if matches!(args.mode, Mode::Throughput | Mode::Both) {
        m.push(("throughput", args.sagas_or(10_000), args.concurrency, None));
    }
    if matches!(args.mode, Mode::Paced | Mode::Both) {
        m.push(("paced", args.sagas_or(10_000), 0, Some(args.rate)));
    }
    m
}

/// Floor and pure-transport runs have no paced mode.
fn closed_modes(args: &Args) -> Vec<(&'static str, usize, usize)> {
    modes(args)
        .into_iter()
        .filter(|(_, _, _, rate)| rate.is_none())
        .map(|(m, n, c, _)| (m, n, c))
        .collect()
}

fn bench_options() -> RuntimeOptions {
    RuntimeOptions {
        // Lifecycle events are part of the work measured: on, as by default.
        ..RuntimeOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// Configurations

async fn embedded(args: &Args) -> anyhow::Result<Vec<Figures>> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir))?;
    let mut out = Vec::new();
    for (mode, n, concurrency, rate) in modes(args) {
        let path = format!("{}/embedded-{}.db", args.dir, uuid::Uuid::now_v7().simple());
        let store = Arc::new(SqliteStore::connect(&format!("sqlite://{path}")).await?);
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let services = SimServices::new(Arc::new(MemoryLedger::new()), reliable());
        let mut handles = Vec::new();
        for (name, subject) in SimServices::services() {
            let services = services.clone();
            handles.push(
                participant::serve(Arc::clone(&bus), subject, name, 1024, move |cmd| {
                    let services = services.clone();
                    async move { services.handle(cmd).await }
                })
                .await?,
            );
        }
        let checkout = checkout_definition(CheckoutTiming::default())?;
        let runtime = Runtime::builder()
            .store(store)
            .bus(bus)
            .register(&checkout)
            .options(bench_options())
            .start()
            .await?;
        let mut outcomes = runtime.outcomes();
        reset_peak("self");
        let cpu0 = cpu_ms("self");
        let (elapsed, latencies) =
            drive(&runtime, &checkout, &mut outcomes, n, concurrency, rate).await?;
        let cpu = cpu_ms("self") - cpu0;
        let mut f = figures(
            "embedded",
            mode,
            concurrency,
            Measured {
                elapsed,
                latencies,
                cpu_orchestrator_ms: cpu,
                cpu_participants_ms: None,
            },
            "SQLite WAL, synchronous=FULL (every commit fsync'd); in-process bus".into(),
        );
        f.peak_rss_mb_orchestrator = round2(status_kb("self", "VmHWM:") / 1024.0);
        f.note = Some("participants in-process: their CPU is in the orchestrator's".into());
        runtime.shutdown().await;
        drop(handles);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(format!("{path}-wal"));
        let _ = std::fs::remove_file(format!("{path}-shm"));
        out.push(f);
    }
    Ok(out)
}

fn participant_args(nats: &str, replicas: u64) -> Vec<Vec<String>> {
    ["inventory", "payment", "shipping"]
        .iter()
        .map(|s| {
            vec![
                "participant".into(),
                "--service".into(),
                (*s).into(),
                "--nats".into(),
                nats.into(),
                "--nats-replicas".into(),
                replicas.to_string(),
            ]
        })
        .collect()
}

async fn synchronous_commit(url: &str, replicas: u64) -> String {
    let Ok(mut conn) = PgConnection::connect(url).await else {
        return "?".into();
    };
    let v: Result<String, _> = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut conn)
        .await;
    let fsync: Result<String, _> = sqlx::query_scalar("SELECT current_setting('fsync')")
        .fetch_one(&mut conn)
        .await;
    let _ = conn.close().await;
    format!(
        "PostgreSQL synchronous_commit={}, fsync={}; NATS JetStream file storage{}, acked \
         publishes",
        v.unwrap_or_else(|_| "?".into()),
        fsync.unwrap_or_else(|_| "?".into()),
        if replicas > 1 {
            format!(", {replicas} replicas")
        } else {
            String::new()
        }
    )
}

async fn production(args: &Args) -> anyhow::Result<Vec<Figures>> {
    let mut out = Vec::new();
    for (mode, n, concurrency, rate) in modes(args) {
        let (db, url) = create_db(&args.pg, "skald_bench").await?;
        let result = async {
            let store = Arc::new(PostgresStore::connect(&url).await?);
            let bus = nats_bus(&args.nats, args.nats_replicas).await?;
            let children = spawn_children(&participant_args(&args.nats, args.nats_replicas))?;
            let checkout = checkout_definition(CheckoutTiming::default())?;
            let runtime = Runtime::builder()
                .store(store)
                .bus(bus)
                .register(&checkout)
                .options(bench_options())
                .start()
                .await?;
            let mut outcomes = runtime.outcomes();
            // Warm-up: the participants' consumers are bound and answering.
            drive(&runtime, &checkout, &mut outcomes, 20, 20, None).await?;
            reset_peak("self");
            children.reset_peak();
            let (cpu0, ccpu0) = (cpu_ms("self"), children.cpu_ms());
            let (nats0, pg0) = servers_cpu_ms();
            let (elapsed, latencies) =
                drive(&runtime, &checkout, &mut outcomes, n, concurrency, rate).await?;
            let (cpu, ccpu) = (cpu_ms("self") - cpu0, children.cpu_ms() - ccpu0);
            let (nats1, pg1) = servers_cpu_ms();
            let mut f = figures(
                "production",
                mode,
                concurrency,
                Measured {
                    elapsed,
                    latencies,
                    cpu_orchestrator_ms: cpu,
                    cpu_participants_ms: Some(ccpu),
                },
                synchronous_commit(&url, args.nats_replicas).await,
            );
            f.peak_rss_mb_orchestrator = round2(status_kb("self", "VmHWM:") / 1024.0);
            f.peak_rss_mb_participants = Some(round2(children.peak_mb()));
            f.cpu_ms_per_saga_nats_server = Some(round2((nats1 - nats0) / n as f64));
            f.cpu_ms_per_saga_postgres = Some(round2((pg1 - pg0) / n as f64));
            runtime.shutdown().await;
            anyhow::Ok(f)
        }
        .await;
        drop_db(&args.pg, &db).await;
        out.push(result?);
    }
    Ok(out)
}

/// The floor: a command published to JetStream, a participant process replying through
/// JetStream, three times per saga, with no store and no orchestration; and the raw
/// PostgreSQL commit rate for skald's row shapes.
async fn floor(args: &Args) -> anyhow::Result<Vec<Figures>> {
    let mut out = Vec::new();
    for (mode, n, concurrency) in closed_modes(args) {
        let bus = nats_bus(&args.nats, args.nats_replicas).await?;
        let children = spawn_children(&[vec![
            "floor-participant".into(),
            "--nats".into(),
            args.nats.clone(),
            "--nats-replicas".into(),
            args.nats_replicas.to_string(),
        ]])?;
        let mut replies = bus
            .subscribe(&["skald.reply.floor".to_owned()], "bench-floor-client")
            .await?;
        // Message ids unique to this run: the broker drops a repeated id within its
        // duplicate window, and runs reuse saga numbers.
        let run = uuid::Uuid::now_v7().simple().to_string();
        let send = |saga: usize, step: u32| {
            let bus = Arc::clone(&bus);
            let run = run.clone();
            async move {
                let mut h = Headers::new();
                h.insert("Skald-Saga-Id", saga.to_string());
                h.insert("Skald-Attempt", step.to_string());
                h.insert("Nats-Msg-Id", format!("floor:{run}:{saga}:{step}"));
                bus.publish(Message {
                    subject: "skald.cmd.floor.step".into(),
                    headers: h,
                    payload: bytes::Bytes::from_static(
                        br#"{"order_id":"bench","amount_cents":1000}"#,
                    ),
                })
                .await
            }
        };
        // Warm-up round trip.
        send(usize::MAX, 3).await?;
        if let Some(d) = replies.next().await {
            let (_, _, acker) = d.into_parts();
            let _ = acker.ack().await;
        }
        reset_peak("self");
        children.reset_peak();
        let (cpu0, ccpu0) = (cpu_ms("self"), children.cpu_ms());
        let (nats0, _) = servers_cpu_ms();
        let t0 = Instant::now();
        let mut started: HashMap<usize, Instant> = HashMap::new();
        let mut latencies = Vec::with_capacity(n);
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        while latencies.len() < n {
            while in_flight < concurrency && next < n {
                started.insert(next, Instant::now());
                pending.push(send(next, 1));
                next += 1;
                in_flight += 1;
            }
            tokio::select! {
                Some(sent) = pending.next(), if !pending.is_empty() => { sent?; }
                d = replies.next() => {
                    let Some(d) = d else { bail!("floor replies ended") };
                    let (m, _, acker) = d.into_parts();
                    let _ = acker.ack().await;
                    let saga: usize = m.headers.get("Skald-Saga-Id").and_then(|s| s.parse().ok()).unwrap_or(usize::MAX);
                    let step: u32 = m.headers.get("Skald-Attempt").and_then(|s| s.parse().ok()).unwrap_or(3);
                    if step < 3 {
                        pending.push(send(saga, step + 1));
                    } else if let Some(t) = started.remove(&saga) {
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        in_flight -= 1;
                    }
                }
            }
        }
        let elapsed = t0.elapsed();
        let (cpu, ccpu) = (cpu_ms("self") - cpu0, children.cpu_ms() - ccpu0);
        let mut f = figures(
            "floor-jetstream",
            mode,
            concurrency,
            Measured {
                elapsed,
                latencies,
                cpu_orchestrator_ms: cpu,
                cpu_participants_ms: Some(ccpu),
            },
            "NATS JetStream file storage, acked publishes (same streams as skald); no store".into(),
        );
        f.peak_rss_mb_orchestrator = round2(status_kb("self", "VmHWM:") / 1024.0);
        f.peak_rss_mb_participants = Some(round2(children.peak_mb()));
        f.note = Some("3 command/reply round trips per saga, no orchestration".into());
        f.cpu_ms_per_saga_nats_server = Some(round2((servers_cpu_ms().0 - nats0) / n as f64));
        out.push(f);
    }
    out.push(pg_floor(args).await?);
    out.push(pg_floor_batched(args).await?);
    Ok(out)
}

/// The raw PostgreSQL commit rate for one saga transition's rows (the saga row updated
/// with its version checked, a journal entry, two outbox rows, an inbox entry), one
/// transaction per transition from 32 connections; a checkout saga makes 4 transitions.
async fn pg_floor(args: &Args) -> anyhow::Result<Figures> {
    let (db, url) = create_db(&args.pg, "skald_bench_floor").await?;
    let result = async {
        let store = PostgresStore::connect(&url).await?; // creates skald's tables
        let pool = store.pool().clone();
        let state = serde_json::json!({ "data": order(1), "pad": "x".repeat(600) }).to_string();
        const CLIENTS: usize = 32;
        let per_client = (args.sagas_or(10_000) * 4 / CLIENTS).max(50);
        for c in 0..CLIENTS {
            sqlx::query(
                "INSERT INTO saga_instances (id, saga_type, definition_version, status, version, state, created_at_ms, updated_at_ms) \
                 VALUES ($1::uuid, 'floor', 1, 'running', 0, $2::jsonb, 0, 0)",
            )
            .bind(uuid::Uuid::from_u128(c as u128 + 1).to_string())
            .bind(&state)
            .execute(&pool)
            .await?;
        }
        let cpu0 = cpu_ms("self");
        let (_, pg0) = servers_cpu_ms();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let pool = pool.clone();
            let state = state.clone();
            tasks.push(tokio::spawn(async move {
                let id = uuid::Uuid::from_u128(c as u128 + 1).to_string();
                let mut lat = Vec::with_capacity(per_client);
                for v in 0..per_client {
                    let t = Instant::now();
                    let mut tx = pool.begin().await?;
                    sqlx::query("INSERT INTO inbox (message_id, saga_id, received_at_ms) VALUES ($1, $2::uuid, 0)")
                        .bind(format!("{id}:{v}")).bind(&id).execute(&mut *tx).await?;
                    sqlx::query("UPDATE saga_instances SET version = $1, state = $2::jsonb, updated_at_ms = 1 WHERE id = $3::uuid AND version = $4")
                        .bind(v as i64 + 1).bind(&state).bind(&id).bind(v as i64).execute(&mut *tx).await?;
                    sqlx::query("INSERT INTO saga_journal (saga_id, at_ms, schema_version, kind, body) VALUES ($1::uuid, 0, 1, 'transition', $2::jsonb)")
                        .bind(&id).bind(&state).execute(&mut *tx).await?;
                    for _ in 0..2 {
                        sqlx::query("INSERT INTO outbox (id, saga_id, subject, headers, payload, created_at_ms, available_at_ms) VALUES ($1::uuid, $2::uuid, 'skald.cmd.x', '[]'::jsonb, $3, 0, 0)")
                            .bind(uuid::Uuid::now_v7().to_string()).bind(&id).bind(state.as_bytes()).execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                anyhow::Ok(lat)
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await??);
        }
        let elapsed = t0.elapsed();
        let cpu = cpu_ms("self") - cpu0;
        let transitions = latencies.len();
        let pg_cpu = servers_cpu_ms().1 - pg0;
        let mut f = figures("floor-postgres", "throughput", CLIENTS, Measured { elapsed, latencies, cpu_orchestrator_ms: cpu, cpu_participants_ms: None }, synchronous_commit(&url, args.nats_replicas).await);
        // Sagas/s implied: 4 transitions per checkout saga.
        f.sagas_per_sec = round2(transitions as f64 / elapsed.as_secs_f64() / 4.0);
        f.sagas = transitions / 4;
        f.cpu_ms_per_saga_postgres = Some(round2(pg_cpu / (transitions as f64 / 4.0)));
        f.per_step_ms = 0.0;
        f.note = Some(format!(
            "{transitions} transition-shaped transactions from {CLIENTS} connections, {:.0}/s; sagas/s = that / 4; latency is per transaction",
            transitions as f64 / elapsed.as_secs_f64()
        ));
        f.peak_rss_mb_orchestrator = round2(status_kb("self", "VmHWM:") / 1024.0);
        anyhow::Ok(f)
    }
    .await;
    drop_db(&args.pg, &db).await;
    result
}

/// The raw PostgreSQL commit rate for skald's row shapes as a group commit writes them:
/// one connection committing transactions of 256 transitions, each a handful of
/// set-based statements (the saga rows updated with their versions checked, journal,
/// outbox and inbox rows inserted from arrays).
async fn pg_floor_batched(args: &Args) -> anyhow::Result<Figures> {
    const BATCH: usize = 256;
    let (db, url) = create_db(&args.pg, "skald_bench_floor_batch").await?;
    let result = async {
        let store = PostgresStore::connect(&url).await?;
        let pool = store.pool().clone();
        let state = serde_json::json!({ "data": order(1), "pad": "x".repeat(600) }).to_string();
        let ids: Vec<String> = (0..BATCH)
            .map(|i| uuid::Uuid::from_u128(i as u128 + 1).to_string())
            .collect();
        sqlx::query(
            "INSERT INTO saga_instances (id, saga_type, definition_version, status, version, state, created_at_ms, updated_at_ms) \
             SELECT u::uuid, 'floor', 1, 'running', 0, $2::jsonb, 0, 0 FROM UNNEST($1::text[]) AS u",
        )
        .bind(&ids)
        .bind(&state)
        .execute(&pool)
        .await?;
        let rounds = (args.sagas_or(10_000) * 4 / BATCH).max(10);
        let (_, pg0) = servers_cpu_ms();
        let cpu0 = cpu_ms("self");
        let t0 = Instant::now();
        let mut latencies = Vec::with_capacity(rounds);
        for v in 0..rounds {
            let t = Instant::now();
            let mut tx = pool.begin().await?;
            let inbox: Vec<String> = ids.iter().map(|id| format!("{id}:{v}")).collect();
            sqlx::query("INSERT INTO inbox (message_id, saga_id, received_at_ms) SELECT m, s::uuid, 0 FROM UNNEST($1::text[], $2::text[]) AS u(m, s)")
                .bind(&inbox).bind(&ids).execute(&mut *tx).await?;
            sqlx::query("UPDATE saga_instances s SET version = $1 + 1, state = $3::jsonb, updated_at_ms = 1 FROM UNNEST($2::text[]) AS u(id) WHERE s.id = u.id::uuid AND s.version = $1")
                .bind(v as i64).bind(&ids).bind(&state).execute(&mut *tx).await?;
            let states: Vec<&str> = ids.iter().map(|_| state.as_str()).collect();
            sqlx::query("INSERT INTO saga_journal (saga_id, at_ms, schema_version, kind, body) SELECT s::uuid, 0, 1, 'transition', b::jsonb FROM UNNEST($1::text[], $2::text[]) AS u(s, b)")
                .bind(&ids).bind(&states).execute(&mut *tx).await?;
            let outbox_ids: Vec<String> = (0..BATCH * 2).map(|_| uuid::Uuid::now_v7().to_string()).collect();
            let outbox_sagas: Vec<&String> = ids.iter().chain(ids.iter()).collect();
            let payloads: Vec<&[u8]> = outbox_ids.iter().map(|_| state.as_bytes()).collect();
            sqlx::query("INSERT INTO outbox (id, saga_id, subject, headers, payload, created_at_ms, available_at_ms) SELECT i::uuid, s::uuid, 'skald.cmd.x', '[]'::jsonb, p, 0, 0 FROM UNNEST($1::text[], $2::text[], $3::bytea[]) AS u(i, s, p)")
                .bind(&outbox_ids).bind(&outbox_sagas).bind(&payloads).execute(&mut *tx).await?;
            tx.commit().await?;
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let elapsed = t0.elapsed();
        let cpu = cpu_ms("self") - cpu0;
        let pg_cpu = servers_cpu_ms().1 - pg0;
        let transitions = rounds * BATCH;
        let mut f = figures("floor-pg-batched", "throughput", 1, Measured { elapsed, latencies, cpu_orchestrator_ms: cpu, cpu_participants_ms: None }, synchronous_commit(&url, args.nats_replicas).await);
        f.sagas_per_sec = round2(transitions as f64 / elapsed.as_secs_f64() / 4.0);
        f.sagas = transitions / 4;
        f.per_step_ms = 0.0;
        f.cpu_ms_per_saga_orchestrator = round2(cpu / (transitions as f64 / 4.0));
        f.cpu_ms_per_saga_postgres = Some(round2(pg_cpu / (transitions as f64 / 4.0)));
        f.note = Some(format!(
            "{rounds} transactions of {BATCH} transition-shaped writes from one connection, {:.0} transitions/s; sagas/s = that / 4; latency is per transaction",
            transitions as f64 / elapsed.as_secs_f64()
        ));
        anyhow::Ok(f)
    }
    .await;
    drop_db(&args.pg, &db).await;
    result
}

/// 100,000 sagas waiting on participants that are not running yet, then answered.
async fn memory(args: &Args) -> anyhow::Result<Vec<Figures>> {
    let (db, url) = create_db(&args.pg, "skald_bench_memory").await?;
    let result = async {
        let store: Arc<dyn SagaStore> = Arc::new(PostgresStore::connect(&url).await?);
        let bus = nats_bus(&args.nats, args.nats_replicas).await?;
        let checkout = checkout_definition(CheckoutTiming {
            // Long enough that no reply deadline passes while the participants are away.
            timeout: Duration::from_secs(3_600),
            ..CheckoutTiming::default()
        })?;
        let runtime = Runtime::builder()
            .store(Arc::clone(&store))
            .bus(bus)
            .register(&checkout)
            .options(RuntimeOptions {
                idle_timeout: Duration::from_secs(2),
                ..bench_options()
            })
            .start()
            .await?;
        let mut outcomes = runtime.outcomes();
        reset_peak("self");
        let base_kb = status_kb("self", "VmRSS:");
        let cpu0 = cpu_ms("self");
        let t0 = Instant::now();
        let n = args.waiting;
        let started: std::sync::Mutex<HashMap<SagaId, Instant>> =
            std::sync::Mutex::new(HashMap::with_capacity(n));
        futures_util::stream::iter(0..n)
            .for_each_concurrent(1_000, |i| {
                let started = &started;
                let runtime = &runtime;
                let checkout = &checkout;
                async move {
                    let id = SagaId::new();
                    if let Ok(mut s) = started.lock() {
                        s.insert(id, Instant::now());
                    }
                    if let Err(e) = runtime.start_saga_with_id(id, checkout, &order(i)).await {
                        eprintln!("start failed: {e}");
                    }
                }
            })
            .await;
        let start_secs = t0.elapsed().as_secs_f64();
        // Passivation: every waiting saga's actor goes idle and is dropped.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let waiting_kb = status_kb("self", "VmRSS:");
        let peak_waiting_kb = status_kb("self", "VmHWM:");
        let children = spawn_children(&participant_args(&args.nats, args.nats_replicas))?;
        let mut latencies = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(1_800);
        while latencies.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(o)) = tokio::time::timeout(left, outcomes.recv()).await else {
                bail!("{} of {n} waiting sagas settled before the deadline", latencies.len());
            };
            if let Some(t) = started.lock().ok().and_then(|mut s| s.remove(&o.id)) {
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let elapsed = t0.elapsed();
        let cpu = cpu_ms("self") - cpu0;
        let mut f = figures("memory", "waiting", 1_000, Measured { elapsed, latencies, cpu_orchestrator_ms: cpu, cpu_participants_ms: None }, synchronous_commit(&url, args.nats_replicas).await);
        f.peak_rss_mb_orchestrator = round2(status_kb("self", "VmHWM:") / 1024.0);
        f.peak_rss_mb_participants = Some(round2(children.peak_mb()));
        f.rss_kb_per_waiting_saga = Some(round2((waiting_kb - base_kb).max(0.0) / n as f64));
        f.note = Some(format!(
            "{n} sagas started in {start_secs:.1} s with no participant running; RSS {:.1} MB before, {:.1} MB with all waiting (passivated), peak {:.1} MB while starting; then answered",
            base_kb / 1024.0,
            waiting_kb / 1024.0,
            peak_waiting_kb / 1024.0
        ));
        runtime.shutdown().await;
        anyhow::Ok(vec![f])
    }
    .await;
    drop_db(&args.pg, &db).await;
    result
}

// ---------------------------------------------------------------------------------------
// Scale-out: orchestrator nodes as processes, sagas started over NATS

/// Sagas of each scaleout run's warm-up (excluded from its figures).
const WARM_UP: usize = 50;
/// Start requests awaiting their answer at once (a node refuses more than
/// `max_in_flight_starts`, 256, of its own at once: `unavailable`, retried).
const START_REQUESTS_IN_FLIGHT: usize = 128;
/// How long a start request waits for its answer (a timeout fails the run: an unkeyed
/// start cannot be sent again safely).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A scaleout run fails when no start is answered and no saga settles for this long.
const STALL: Duration = Duration::from_secs(60);

/// The figures of one scaleout run (one node count).
#[derive(Debug, Serialize)]
struct ScaleoutFigures {
    config: &'static str,
    nodes: usize,
    sagas: usize,
    concurrency: usize,
    sagas_per_sec: f64,
    /// From the start request sent to the `completed` event received.
    p50_ms: f64,
    p99_ms: f64,
    /// Orchestrators + participants + nats-servers + PostgreSQL (not the load generator).
    cpu_ms_per_saga_total: f64,
    cpu_ms_per_saga_orchestrators: f64,
    cpu_ms_per_saga_participants: f64,
    cpu_ms_per_saga_nats: f64,
    cpu_ms_per_saga_postgres: f64,
    /// This process: start requests and the events it follows.
    cpu_ms_per_saga_loadgen: f64,
    /// Commit version conflicts (`skald_commit_conflicts_total`), all nodes.
    conflicts_per_saga: f64,
    /// Sagas loaded from the store by a node that did not hold them (all nodes).
    cold_activations_per_saga: f64,
    /// Committed transitions, all nodes (4 per checkout saga when nothing is redone).
    transitions_per_saga: f64,
    /// Writes per group-commit transaction, all nodes.
    writes_per_commit: f64,
    /// Transitions each node committed: how the work spread.
    transitions_per_node: Vec<u64>,
    /// Partitions each node held at the end.
    partitions_per_node: Vec<u64>,
    /// Partitions taken or given up during the measured run, all nodes (0 in a steady
    /// state: the nodes balanced their shares before it).
    handovers_during_run: u64,
    /// Start requests refused `unavailable` (sent again after a pause).
    start_refusals: usize,
    durability: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// (parent pid, own CPU ms, CPU ms of its children that exited and were waited for).
fn proc_times(pid: &str) -> Option<(u32, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After ')': state, ppid, ..., utime (11), stime (12), cutime (13), cstime (14).
    let ppid = f.get(1)?.parse().ok()?;
    Some((
        ppid,
        (ticks(11) + ticks(12)) * 10.0,
        (ticks(13) + ticks(14)) * 10.0,
    ))
}

fn proc_pids() -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default()
}

fn comm(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default()
}

/// The postmaster of the PostgreSQL server `pool` is connected to, when it runs on this
/// machine (a backend's parent).
async fn postmaster_of(pool: &sqlx::PgPool) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .ok()?;
    let backend = backend.to_string();
    if comm(&backend) != "postgres" {
        return None;
    }
    let (postmaster, ..) = proc_times(&backend)?;
    (comm(&postmaster.to_string()) == "postgres").then_some(postmaster)
}

/// CPU ms of one PostgreSQL server: its postmaster, the postmaster's live children, and
/// (the postmaster's reaped-children time) the backends that exited.
fn postgres_cpu_ms(postmaster: u32) -> f64 {
    let pm = postmaster.to_string();
    proc_pids()
        .iter()
        .filter_map(|pid| {
            let (ppid, own, reaped) = proc_times(pid)?;
            if *pid == pm {
                Some(own + reaped)
            } else if ppid == postmaster {
                Some(own)
            } else {
                None
            }
        })
        .sum()
}

/// The nats-server processes on this machine serving the client ports of `seeds` (a
/// `-p PORT` or `--port PORT` on their command line); empty when none is found.
fn nats_server_pids(seeds: &[String]) -> Vec<String> {
    let ports: Vec<&str> = seeds
        .iter()
        .filter_map(|s| s.trim_end_matches('/').rsplit_once(':').map(|(_, p)| p))
        .collect();
    proc_pids()
        .into_iter()
        .filter(|pid| comm(pid) == "nats-server")
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            argv.windows(2).any(|w| {
                matches!(w[0], b"-p" | b"--port" | b"-port")
                    && ports.iter().any(|p| p.as_bytes() == w[1])
            })
        })
        .collect()
}

/// CPU ms of everything a scaleout run counts, at one moment.
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    nodes: f64,
    participants: f64,
    nats: f64,
    postgres: f64,
    loadgen: f64,
}

/// An orchestrator node process (`bench node`): killed on drop.
struct NodeProcess {
    index: usize,
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl NodeProcess {
    fn spawn(index: usize, args: &[String]) -> anyhow::Result<NodeProcess> {
        use std::io::BufRead as _;
        let exe = std::env::current_exe().context("this binary's path")?;
        let mut child = Command::new(&exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning node {index} ({})", exe.display()))?;
        let stdout = child.stdout.take().context("the node's stdout")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(NodeProcess {
            index,
            child,
            stdin,
            lines,
        })
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// The node's next JSON line, waited for at most `within`.
    async fn next_line(&mut self, within: Duration, what: &str) -> anyhow::Result<Value> {
        let i = self.index;
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(Some(line)) => serde_json::from_str(&line)
                .with_context(|| format!("node {i} printed {line:?}, not a JSON line")),
            Ok(None) => bail!("node {i} exited before {what} (its error, if any, is above)"),
            Err(_) => bail!("node {i}: no {what} within {} s", within.as_secs()),
        }
    }

    /// The node's counters now.
    async fn stats(&mut self) -> anyhow::Result<Value> {
        use std::io::Write as _;
        let i = self.index;
        let stdin = self.stdin.as_mut().context("the node's stdin is closed")?;
        stdin
            .write_all(b"stats\n")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("asking node {i} for its counters"))?;
        self.next_line(Duration::from_secs(10), "its counters")
            .await
    }

    /// Closes the node's stdin: it shuts down, prints its counters a last time and exits
    /// (each within a deadline).
    async fn stop(&mut self) -> anyhow::Result<Value> {
        drop(self.stdin.take());
        let last = self
            .next_line(Duration::from_secs(60), "its shutdown")
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("node {} exited with {status}", self.index);
                }
                return Ok(last);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} did not exit within 10 s of its shutdown",
                    self.index
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node's counters as a line of JSON.
fn node_stats(runtime: &Runtime) -> Value {
    let s = runtime.stats();
    let c = runtime.commit_stats();
    serde_json::json!({
        "transitions": s.transitions,
        "ignored": s.ignored,
        "conflicts": s.conflicts,
        "activations": s.activations,
        "cold_activations": s.cold_activations,
        "passivations": s.passivations,
        "reactivations": s.reactivations,
        "commands_sent": s.commands_sent,
        "publish_failures": s.publish_failures,
        "relayed": s.relayed,
        "wakeups_claimed": s.wakeups_claimed,
        "partitions_taken": s.partitions_taken,
        "partitions_given_up": s.partitions_given_up,
        "partitions_held": runtime.held_partitions().len(),
        "deferred": s.deferred,
        "commit_batches": c.batches,
        "commit_writes": c.writes,
        "commit_conflicts": c.conflicts,
        "commit_duplicates": c.duplicates,
    })
}

/// `bench node`: an orchestrator node like `skald serve` with the checkout saga: reads
/// replies and serves start requests, until its stdin closes or SIGTERM.
async fn serve_node(db: &str, nats: &str, replicas: u64) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let store: Arc<dyn SagaStore> = Arc::new(
        PostgresStore::connect(db)
            .await
            .context("connecting to PostgreSQL (--db)")?,
    );
    let bus = nats_bus(nats, replicas).await?;
    let checkout = checkout_definition(CheckoutTiming::default())?;
    let runtime = Runtime::builder()
        .store(store)
        .bus(bus)
        .register(&checkout)
        .options(bench_options())
        .start()
        .await?;
    // Stdin on a thread of its own: a line asks for the counters, its end stops the node.
    let (tx, mut lines) = mpsc::unbounded_channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if line.is_err() || tx.send(()).is_err() {
                break;
            }
        }
    });
    println!(
        "{}",
        serde_json::json!({ "ready": true, "pid": std::process::id() })
    );
    let failed = loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(()) => println!("{}", node_stats(&runtime)),
                None => break None,
            },
            _ = terminate.recv() => break None,
            fatal = runtime.failed() => break Some(fatal),
        }
    };
    let mut last = node_stats(&runtime);
    let stopped = tokio::time::timeout(Duration::from_secs(30), runtime.shutdown())
        .await
        .is_ok();
    last["stopped"] = stopped.into();
    println!("{last}");
    if let Some(fatal) = failed {
        bail!("the runtime stopped: {fatal}");
    }
    if !stopped {
        bail!("the runtime did not shut down within 30 s");
    }
    Ok(())
}

/// What one batch of start requests measured.
struct Load {
    elapsed: Duration,
    latencies: Vec<f64>,
    /// Sagas that settled otherwise than completed (compensated, dead-lettered).
    not_completed: usize,
    refusals: usize,
}

type StartResult = (
    usize,
    u32,
    Instant,
    Result<async_nats::Message, async_nats::RequestError>,
);

/// Start request `i` (attempt `attempt`, first sent at `sent`), after `delay`.
async fn start_request(
    client: async_nats::Client,
    body: bytes::Bytes,
    i: usize,
    attempt: u32,
    sent: Instant,
    delay: Duration,
) -> StartResult {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let request = async_nats::Request::new()
        .payload(body)
        .timeout(Some(START_TIMEOUT));
    let answer = client
        .send_request("skald.start.checkout".to_owned(), request)
        .await;
    (i, attempt, sent, answer)
}

/// Starts `n` checkout sagas with start requests (round robin over `clients`), keeping
/// at most `concurrency` started-or-starting sagas not yet settled; a saga settles when
/// its `completed` (or `compensated`, `dead_lettered`) event arrives on `settled`.
/// `warm_up`: "no responders" is tried again (the nodes' interest may still be
/// spreading through the cluster) instead of failing the run.
async fn start_load(
    clients: &[async_nats::Client],
    settled: &mut (impl futures_util::Stream<Item = async_nats::Message> + Unpin),
    n: usize,
    concurrency: usize,
    warm_up: bool,
) -> anyhow::Result<Load> {
    use async_nats::RequestErrorKind;
    let body = |i: usize| -> anyhow::Result<bytes::Bytes> {
        Ok(serde_json::to_vec(&serde_json::json!({ "data": order(i) }))?.into())
    };
    let mut pending = futures_util::stream::FuturesUnordered::new();
    // Answered, not yet settled: when the start request was first sent.
    let mut answered: HashMap<uuid::Uuid, Instant> = HashMap::with_capacity(concurrency);
    // Settled before their answer arrived (or sagas of an earlier batch): completed?
    let mut early: HashMap<uuid::Uuid, bool> = HashMap::new();
    let mut latencies = Vec::with_capacity(n);
    let (mut not_completed, mut refusals, mut next) = (0usize, 0usize, 0usize);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(300) + Duration::from_millis(20 * n as u64);
    let mut progress = t0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while latencies.len() + not_completed < n {
        while next < n
            && pending.len() < START_REQUESTS_IN_FLIGHT
            && pending.len() + answered.len() < concurrency.max(1)
        {
            let client = clients[next % clients.len()].clone();
            pending.push(start_request(
                client,
                body(next)?,
                next,
                1,
                Instant::now(),
                Duration::ZERO,
            ));
            next += 1;
        }
        tokio::select! {
            Some((i, attempt, sent, answer)) = pending.next(), if !pending.is_empty() => {
                progress = Instant::now();
                let again = match answer {
                    Ok(m) => {
                        let v: Value = serde_json::from_slice(&m.payload).with_context(|| {
                            format!(
                                "start request {i}: the answer {:?} is not JSON",
                                String::from_utf8_lossy(&m.payload)
                            )
                        })?;
                        if let Some(id) = v["saga_id"].as_str() {
                            let id: uuid::Uuid = id
                                .parse()
                                .with_context(|| format!("start request {i}: saga id {id:?}"))?;
                            match early.remove(&id) {
                                Some(true) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
                                Some(false) => not_completed += 1,
                                None => {
                                    answered.insert(id, sent);
                                }
                            }
                            false
                        } else if v["error"]["code"] == "unavailable" {
                            refusals += 1;
                            true
                        } else {
                            bail!("start request {i} refused: {v}");
                        }
                    }
                    Err(e) if warm_up && e.kind() == RequestErrorKind::NoResponders => true,
                    Err(e) => bail!(
                        "start request {i} (attempt {attempt}): {e}{}",
                        if e.kind() == RequestErrorKind::NoResponders {
                            " (no node serves skald.start.checkout)"
                        } else {
                            ""
                        }
                    ),
                };
                if again {
                    // Nothing was stored: the same request again, after a pause.
                    let delay = Duration::from_millis((10u64 << attempt.min(6)).min(500));
                    let client = clients[i % clients.len()].clone();
                    pending.push(start_request(client, body(i)?, i, attempt + 1, sent, delay));
                }
            }
            Some(m) = settled.next() => {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Skald-Saga-Id"))
                    .and_then(|v| v.as_str().parse::<uuid::Uuid>().ok());
                let completed = m.subject.ends_with(".completed");
                if let Some(id) = id {
                    match answered.remove(&id) {
                        Some(sent) => {
                            progress = Instant::now();
                            if completed {
                                latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                            } else {
                                not_completed += 1;
                            }
                        }
                        None => {
                            early.insert(id, completed);
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let state = || format!(
                    "{} of {n} sagas settled, {} answered and not settled, {} start requests \
                     awaiting an answer",
                    latencies.len() + not_completed,
                    answered.len(),
                    pending.len()
                );
                if Instant::now() > deadline {
                    bail!("not done within {} s: {}", (deadline - t0).as_secs(), state());
                }
                if progress.elapsed() > STALL {
                    bail!("nothing answered or settled for {} s: {}", STALL.as_secs(), state());
                }
            }
        }
    }
    Ok(Load {
        elapsed: t0.elapsed(),
        latencies,
        not_completed,
        refusals,
    })
}

/// Deletes skald's streams (and so their consumers): each run starts on empty ones, as
/// on a fresh database; the processes of the run create them again.
async fn reset_streams(client: &async_nats::Client) -> anyhow::Result<()> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    let js = async_nats::jetstream::new(client.clone());
    for name in [
        "SKALD_COMMANDS",
        "SKALD_REPLIES",
        "SKALD_OPS",
        "SKALD_EVENTS",
        "SKALD_DLQ",
    ] {
        if let Err(e) = js.delete_stream(name).await {
            let missing = matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                if j.error_code() == ErrorCode::STREAM_NOT_FOUND);
            if !missing {
                bail!("deleting stream {name}: {e}");
            }
        }
    }
    Ok(())
}

/// The scaleout configuration: one run per node count of `--nodes`, each printed as it
/// ends, then the efficiency check.
async fn scaleout(args: &Args) -> anyhow::Result<()> {
    let seeds: Vec<String> = args
        .nats
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if seeds.is_empty() {
        bail!("--nats names no server");
    }
    if seeds.len() < 3 || args.nats_replicas < 3 {
        eprintln!(
            "note: scaleout is meant for a three-node NATS cluster (--nats with its three \
             seeds, --nats-replicas 3; scripts/bench --config scaleout provisions one); \
             running on {} seed(s), {} replica(s)",
            seeds.len(),
            args.nats_replicas
        );
    }
    // One connection per seed: each cluster node has requesters (a queue group prefers
    // the members on the requester's server).
    let mut clients = Vec::new();
    for s in &seeds {
        clients.push(
            async_nats::ConnectOptions::new()
                .subscription_capacity(1 << 16)
                .connect(s.as_str())
                .await
                .with_context(|| {
                    format!(
                        "connecting to NATS at {} (--nats)",
                        skald::adapters::redact_url(s)
                    )
                })?,
        );
    }
    let nats_pids = nats_server_pids(&seeds);
    let n = args.sagas_or(20_000);
    let mut all = Vec::new();
    for &nodes in &args.nodes {
        let nodes = nodes as usize;
        reset_streams(&clients[0]).await?;
        let (db, url) = create_db(&args.pg, "skald_bench_scaleout").await?;
        let result = scaleout_run(args, &seeds, &clients, &nats_pids, &url, nodes, n).await;
        drop_db(&args.pg, &db).await;
        let f = result.with_context(|| format!("{nodes} node(s)"))?;
        if args.json {
            println!("{}", serde_json::to_string(&f)?);
        } else {
            print_scaleout(&f);
        }
        all.push(f);
    }
    // The issue's efficiency check: informational, never asserted.
    let lo = all.iter().min_by_key(|f| f.nodes);
    let hi = all.iter().max_by_key(|f| f.nodes);
    if let (Some(lo), Some(hi)) = (lo, hi) {
        let ratio = hi.cpu_ms_per_saga_total / lo.cpu_ms_per_saga_total.max(1e-9);
        let worst = all.iter().map(|f| f.conflicts_per_saga).fold(0.0, f64::max);
        if args.json {
            /// The check as one JSON line (fields in this order).
            #[derive(Serialize)]
            struct Check {
                config: &'static str,
                from_nodes: usize,
                to_nodes: usize,
                cpu_ratio: f64,
                cpu_within_1_2x: bool,
                max_conflicts_per_saga: f64,
                conflicts_below_0_01: bool,
            }
            let check = Check {
                config: "scaleout-check",
                from_nodes: lo.nodes,
                to_nodes: hi.nodes,
                cpu_ratio: round4(ratio),
                cpu_within_1_2x: ratio <= 1.2,
                max_conflicts_per_saga: worst,
                conflicts_below_0_01: worst < 0.01,
            };
            println!("{}", serde_json::to_string(&check)?);
        } else {
            println!(
                "scaleout check: CPU per saga at {} node(s) / at {} = {ratio:.3} (within 1.2x: \
                 {}); conflicts per saga at most {worst:.4} (below 0.01: {})",
                hi.nodes,
                lo.nodes,
                if ratio <= 1.2 { "yes" } else { "no" },
                if worst < 0.01 { "yes" } else { "no" },
            );
        }
    }
    Ok(())
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn print_scaleout(f: &ScaleoutFigures) {
    println!(
        "scaleout  {} node(s)  {:>6} sagas @{:<5} {:>8.1} sagas/s  p50 {:>8.2} ms  p99 {:>8.2} ms  \
         cpu/saga {:.2} ms (orchestrators {:.2}, participants {:.2}, nats {:.2}, postgres {:.2}; \
         load generator {:.2})  conflicts/saga {:.4}  cold activations/saga {:.4}",
        f.nodes,
        f.sagas,
        f.concurrency,
        f.sagas_per_sec,
        f.p50_ms,
        f.p99_ms,
        f.cpu_ms_per_saga_total,
        f.cpu_ms_per_saga_orchestrators,
        f.cpu_ms_per_saga_participants,
        f.cpu_ms_per_saga_nats,
        f.cpu_ms_per_saga_postgres,
        f.cpu_ms_per_saga_loadgen,
        f.conflicts_per_saga,
        f.cold_activations_per_saga,
    );
    println!(
        "{:<10} transitions/saga {:.3} (per node {:?}), writes/commit {:.1}, start refusals {}",
        "", f.transitions_per_saga, f.transitions_per_node, f.writes_per_commit, f.start_refusals
    );
    println!("{:<10} durability: {}", "", f.durability);
    if let Some(n) = &f.note {
        println!("{:<10} {n}", "");
    }
}

/// One scaleout run: `nodes` orchestrator nodes on the fresh database `url`, `n` sagas.
async fn scaleout_run(
    args: &Args,
    seeds: &[String],
    clients: &[async_nats::Client],
    nats_pids: &[String],
    url: &str,
    nodes: usize,
    n: usize,
) -> anyhow::Result<ScaleoutFigures> {
    let replicas = args.nats_replicas.to_string();
    // The schema, before the nodes start.
    let store = PostgresStore::connect(url).await?;
    let pool = store.pool().clone();
    let postmaster = postmaster_of(&pool).await;
    // Each process on a server of its own, round robin, as deployments spread them.
    let participants = spawn_children(
        &["inventory", "payment", "shipping"]
            .iter()
            .enumerate()
            .map(|(j, s)| {
                vec![
                    "participant".into(),
                    "--service".into(),
                    (*s).into(),
                    "--nats".into(),
                    seeds[j % seeds.len()].clone(),
                    "--nats-replicas".into(),
                    replicas.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    )?;
    let mut procs = Vec::with_capacity(nodes);
    for i in 0..nodes {
        procs.push(NodeProcess::spawn(
            i,
            &[
                "node".into(),
                "--db".into(),
                url.to_owned(),
                "--nats".into(),
                seeds[i % seeds.len()].clone(),
                "--nats-replicas".into(),
                replicas.clone(),
            ],
        )?);
    }
    for p in &mut procs {
        p.next_line(Duration::from_secs(60), "serving (its ready line)")
            .await?;
    }
    // The nodes share the partitions before any load: every one held, each node's
    // share within one of the others' (a steady state; the run then counts handovers).
    let balanced_by = Instant::now() + Duration::from_secs(60);
    loop {
        let mut held = Vec::with_capacity(procs.len());
        for p in &mut procs {
            held.push(p.stats().await?["partitions_held"].as_u64().unwrap_or(0));
        }
        let (lo, hi) = (held.iter().min(), held.iter().max());
        // (16: the default count, which the bench's nodes keep.)
        if held.iter().sum::<u64>() == 16 && hi.zip(lo).is_some_and(|(h, l)| h - l <= 1) {
            break;
        }
        if Instant::now() >= balanced_by {
            bail!("the nodes did not balance their partitions within 60 s: {held:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut settled = futures_util::stream::select_all([
        clients[0].subscribe("skald.evt.checkout.completed").await?,
        clients[0]
            .subscribe("skald.evt.checkout.compensated")
            .await?,
        clients[0]
            .subscribe("skald.evt.checkout.dead_lettered")
            .await?,
    ]);
    // Warm-up: every node's requests served, the participants bound and answering.
    start_load(clients, &mut settled, WARM_UP * nodes, WARM_UP, true)
        .await
        .context("the warm-up")?;

    let snapshot = |procs: &[NodeProcess]| CpuSnapshot {
        nodes: procs.iter().map(|p| cpu_ms(&p.pid())).sum(),
        participants: participants.cpu_ms(),
        nats: if nats_pids.is_empty() {
            cpu_ms_of("nats-server")
        } else {
            nats_pids.iter().map(|p| cpu_ms(p)).sum()
        },
        postgres: postmaster.map_or_else(|| cpu_ms_of("postgres"), postgres_cpu_ms),
        loadgen: cpu_ms("self"),
    };
    let mut before = Vec::with_capacity(nodes);
    for p in &mut procs {
        before.push(p.stats().await?);
    }
    let cpu0 = snapshot(&procs);
    let load = start_load(clients, &mut settled, n, args.concurrency, false).await?;
    let cpu1 = snapshot(&procs);
    let mut after = Vec::with_capacity(nodes);
    for p in &mut procs {
        after.push(p.stats().await?);
    }
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE status = 'completed'")
            .fetch_one(&pool)
            .await?;
    let durability = synchronous_commit(url, args.nats_replicas).await;
    pool.close().await;
    for p in &mut procs {
        let last = p.stop().await?;
        if last["stopped"] != true {
            bail!("node {} did not shut down cleanly: {last}", p.index);
        }
    }
    drop(participants);

    let delta = |node: usize, key: &str| {
        let at = |v: &Value| v[key].as_u64().unwrap_or(0);
        at(&after[node]).saturating_sub(at(&before[node]))
    };
    let total = |key: &str| (0..nodes).map(|i| delta(i, key)).sum::<u64>() as f64;
    let per = |x: f64| round2(x / n as f64);
    let Load {
        elapsed,
        mut latencies,
        not_completed,
        refusals,
    } = load;
    latencies.sort_by(f64::total_cmp);
    let cpu = |f: fn(&CpuSnapshot) -> f64| f(&cpu1) - f(&cpu0);
    let (orchestrators, participants_ms, nats, postgres) = (
        cpu(|c| c.nodes),
        cpu(|c| c.participants),
        cpu(|c| c.nats),
        cpu(|c| c.postgres),
    );
    let mut notes = Vec::new();
    let expected = (WARM_UP * nodes + n) as i64;
    if completed != expected {
        notes.push(format!(
            "the store holds {completed} completed sagas, {expected} expected"
        ));
    }
    if not_completed > 0 {
        notes.push(format!(
            "{not_completed} sagas compensated or dead-lettered"
        ));
    }
    if nats_pids.is_empty() {
        notes.push("nats-server CPU: every nats-server on this machine".into());
    }
    if postmaster.is_none() {
        notes.push("PostgreSQL CPU: every postgres process on this machine".into());
    }
    Ok(ScaleoutFigures {
        config: "scaleout",
        nodes,
        sagas: n,
        concurrency: args.concurrency,
        sagas_per_sec: round2(n as f64 / elapsed.as_secs_f64().max(1e-9)),
        p50_ms: round2(percentile(&latencies, 50.0)),
        p99_ms: round2(percentile(&latencies, 99.0)),
        cpu_ms_per_saga_total: per(orchestrators + participants_ms + nats + postgres),
        cpu_ms_per_saga_orchestrators: per(orchestrators),
        cpu_ms_per_saga_participants: per(participants_ms),
        cpu_ms_per_saga_nats: per(nats),
        cpu_ms_per_saga_postgres: per(postgres),
        cpu_ms_per_saga_loadgen: per(cpu(|c| c.loadgen)),
        conflicts_per_saga: round4(total("conflicts") / n as f64),
        cold_activations_per_saga: round4(total("cold_activations") / n as f64),
        transitions_per_saga: round4(total("transitions") / n as f64),
        writes_per_commit: round2(total("commit_writes") / total("commit_batches").max(1.0)),
        transitions_per_node: (0..nodes).map(|i| delta(i, "transitions")).collect(),
        partitions_per_node: (0..nodes)
            .map(|i| after[i]["partitions_held"].as_u64().unwrap_or(0))
            .collect(),
        handovers_during_run: (total("partitions_taken") + total("partitions_given_up")) as u64,
        start_refusals: refusals,
        durability,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    })
}

// ---------------------------------------------------------------------------------------
// Participant roles (separate processes)

async fn serve_participant(service: &str, nats: &str, replicas: u64) -> anyhow::Result<()> {
    let bus = nats_bus(nats, replicas).await?;
    let services = SimServices::new(Arc::new(MemoryLedger::new()), reliable());
    let subject = format!("skald.cmd.{service}.>");
    let _handle = participant::serve(bus, &subject, service, 1024, move |cmd| {
        let services = services.clone();
        async move { services.handle(cmd).await }
    })
    .await?;
    std::future::pending::<()>().await;
    Ok(())
}

async fn serve_floor(nats: &str, replicas: u64) -> anyhow::Result<()> {
    let bus = nats_bus(nats, replicas).await?;
    let mut commands = bus
        .subscribe(&["skald.cmd.floor.>".to_owned()], "bench-floor")
        .await?;
    let limit = Arc::new(Semaphore::new(1024));
    while let Some(d) = commands.next().await {
        let bus = Arc::clone(&bus);
        let permit = Arc::clone(&limit).acquire_owned().await?;
        tokio::spawn(async move {
            let (m, _, acker) = d.into_parts();
            let mut h = m.headers.clone();
            if let Some(id) = m.headers.get("Nats-Msg-Id") {
                h.insert("Nats-Msg-Id", format!("reply:{id}"));
            }
            let reply = Message {
                subject: "skald.reply.floor".into(),
                headers: h,
                payload: bytes::Bytes::from_static(br#"{"ok":true}"#),
            };
            if bus.publish(reply).await.is_ok() {
                let _ = acker.ack().await;
            }
            drop(permit);
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

fn print_human(f: &Figures) {
    println!(
        "{:<16} {:<10} {:>6} sagas @{:<5} {:>9.1} sagas/s  p50 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  step {:>6.2} ms  cpu/saga {:>5.2} ms{}  rss {:>6.1} MB{}",
        f.config,
        f.mode,
        f.sagas,
        f.concurrency,
        f.sagas_per_sec,
        f.p50_ms,
        f.p99_ms,
        f.p999_ms,
        f.per_step_ms,
        f.cpu_ms_per_saga_orchestrator,
        f.cpu_ms_per_saga_participants
            .map(|c| format!(" (+{c:.2} participants)"))
            .unwrap_or_default(),
        f.peak_rss_mb_orchestrator,
        f.peak_rss_mb_participants
            .map(|c| format!(" (+{c:.1} participants)"))
            .unwrap_or_default(),
    );
    if let (Some(nats), Some(pg)) = (f.cpu_ms_per_saga_nats_server, f.cpu_ms_per_saga_postgres) {
        println!(
            "{:<16} server CPU per saga: nats-server {nats:.2} ms, PostgreSQL {pg:.2} ms",
            ""
        );
    } else if let Some(nats) = f.cpu_ms_per_saga_nats_server {
        println!("{:<16} server CPU per saga: nats-server {nats:.2} ms", "");
    }
    if let Some(kb) = f.rss_kb_per_waiting_saga {
        println!("{:<16} RSS per waiting saga: {kb:.2} KB", "");
    }
    println!("{:<16} durability: {}", "", f.durability);
    if let Some(n) = &f.note {
        println!("{:<16} {n}", "");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = match &args.role {
        Some(Role::Participant { service, nats }) => {
            serve_participant(service, nats, args.nats_replicas).await
        }
        Some(Role::FloorParticipant { nats }) => serve_floor(nats, args.nats_replicas).await,
        Some(Role::Node { db, nats }) => serve_node(db, nats, args.nats_replicas).await,
        None => run(&args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    if args.config == Config::Scaleout {
        return scaleout(args).await.context("the scaleout configuration");
    }
    let all = args.config == Config::All;
    let mut configs: Vec<Config> = Vec::new();
    for c in [
        Config::Embedded,
        Config::Production,
        Config::Floor,
        Config::Memory,
    ] {
        if all || args.config == c {
            configs.push(c);
        }
    }
    for c in configs {
        let figures = match c {
            Config::Embedded => embedded(args).await,
            Config::Production => production(args).await,
            Config::Floor => floor(args).await,
            Config::Memory => memory(args).await,
            Config::Scaleout | Config::All => unreachable!("expanded above"),
        }
        .with_context(|| format!("the {c:?} configuration"))?;
        for f in &figures {
            if args.json {
                println!("{}", serde_json::to_string(f)?);
            } else {
                print_human(f);
            }
        }
    }
    Ok(())
}
