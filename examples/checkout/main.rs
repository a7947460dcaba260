//! The checkout saga runner: skald's main command.
//!
//! Runs N checkout sagas (reserve inventory, charge payment, ship order) on the embedded
//! defaults (in-process bus + SQLite file) or on PostgreSQL and NATS JetStream, with
//! simulated inventory / payment / shipping services whose failures are seeded (declined
//! payments are compensated, flaky steps retried), shows progress, prints a summary and
//! checks consistency from the services' own records (kept in the same database as
//! skald's tables).
//!
//! ```text
//! cargo run --release --example checkout -- --sagas 1000 --concurrency 100
//! cargo run --release --example checkout -- --json           # summary as JSON (last line)
//! cargo run --release --example checkout -- --resume         # finish a killed run
//! cargo run --release --example checkout -- --nats nats://127.0.0.1:4222   # over JetStream
//! cargo run --release --example checkout -- --nats nats://a:4222,nats://b:4222,nats://c:4222 \
//!     --nats-replicas 3                                             # on a three-node cluster
//! cargo run --release --example checkout -- --db postgres://postgres@127.0.0.1:5432/skald
//! cargo run --release --example checkout -- --nats nats://127.0.0.1:4222 --no-participants \
//!     --no-consume             # start and await the sagas; `skald serve` nodes run them
//! cargo run --release --example checkout -- --metrics-addr 127.0.0.1:9464   # GET /metrics
//! cargo run --release --example checkout -- --log-format json                # JSON log lines
//! cargo run --release --example checkout --features otlp -- \
//!     --otlp-endpoint http://127.0.0.1:4318                                     # traces, OTLP/HTTP
//! ```
//!
//! `--metrics-addr ADDR` serves Prometheus metrics on `http://ADDR/metrics` (off by
//! default); `--log-format text|json` picks the log lines' shape (stderr, filtered by
//! `RUST_LOG`, default `warn`); `--otlp-endpoint URL` (builds with the `otlp` feature)
//! exports traces. docs/observability.md lists the metrics and spans.
//!
//! `--db` picks the store by the URL's scheme: `sqlite:` (SQLite file, the default) or
//! `postgres:` / `postgresql:` (PostgreSQL; the migrations are applied at start-up).
//!
//! With `--nats`, the transport flags authenticate to NATS and set up TLS, for the
//! orchestrator's connection and the in-process participants' (they share it; with
//! `--no-participants` the external ones take the same flags): `--creds PATH`
//! (`SKALD_NATS_CREDS`, a credentials file), `--nkey SEED_FILE` (`SKALD_NATS_NKEY`, a
//! file holding an NKey user seed `SU...`), `--user NAME` and `--password SECRET`
//! (`SKALD_NATS_USER`, `SKALD_NATS_PASSWORD`), `--token SECRET` (`SKALD_NATS_TOKEN`),
//! `--tls-ca PATH`, `--tls-cert PATH` and `--tls-key PATH` (`SKALD_NATS_TLS_CA`,
//! `_CERT`, `_KEY`; any of them requires TLS; a certificate needs its key). Prefer the
//! environment to a secret on the command line; secrets are never printed.
//!
//! ```text
//! SKALD_NATS_PASSWORD=... cargo run --release --example checkout -- \
//!     --nats tls://nats.internal:4222 --user orchestrator --tls-ca ca.pem
//! ```
//!
//! The edges of the saga promise, seeded like the other failures:
//! `--step-timeout-ms MS` sets every step's reply timeout; `--late-rate F` makes the
//! reserve or the charge of a fraction of orders take effect at once but answer only
//! after skald's whole retry budget for it has passed (the step is then in doubt and its
//! compensation must undo it); `--cancel-rate F` cancels a fraction of sagas while one of
//! their actions is in flight. The simulated services keep the TCC fence of
//! docs/protocol.md (in the runner's database), and the consistency check reads their
//! records: a compensated saga holds no live effect, however it got there.
//!
//! ```text
//! cargo run --release --example checkout -- --sagas 5000 --step-timeout-ms 300 \
//!     --late-rate 0.03 --cancel-rate 0.03 --json
//! ```
//!
//! Exits non-zero when the consistency check fails, sagas are left unfinished, or a saga
//! was dead-lettered (an operator has to look at it).

mod ledger;
mod stats;
mod telemetry;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use skald::adapters::memory::MemoryBus;
use skald::adapters::nats::NatsOptions;
use skald::adapters::postgres::PostgresStore;
use skald::adapters::sqlite::SqliteStore;
use skald::ids::SagaId;
use skald::machine::SagaStatus;
use skald::ports::{Bus, SagaStore};
use skald::{Applied, Runtime, RuntimeOptions, SagaHandle};
use skald_sagas::checkout::{
    Checkout, CheckoutTiming, ConsistencyReport, LineItem, check_consistency, checkout_definition,
};
use skald_sagas::sim::{Ledger, SimConfig, SimServices};
use tokio::sync::Semaphore;

use crate::ledger::{Backend, open_ledger, redact};
use crate::stats::{percentile, round2};

#[derive(Debug, Parser)]
#[command(
    name = "checkout",
    about = "Run checkout sagas on skald: embedded defaults (in-process bus, SQLite), or \
             PostgreSQL and NATS JetStream"
)]
struct Args {
    /// How many sagas to start.
    #[arg(long, default_value_t = 1000)]
    sagas: usize,
    /// How many sagas in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Fraction of payments declined (permanent failure, compensated).
    #[arg(long, default_value_t = 0.1)]
    decline_rate: f64,
    /// Fraction of command attempts that fail retryably.
    #[arg(long, default_value_t = 0.05)]
    flaky_rate: f64,
    /// Seed of the simulated failures (same seed, same failures).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Reply timeout of every step, in milliseconds (default: the checkout saga's own,
    /// 10 s).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    step_timeout_ms: Option<u64>,
    /// Fraction of sagas whose reserve or charge a simulated service applies at once but
    /// answers only after skald stopped waiting for that step (its whole retry budget).
    #[arg(long, default_value_t = 0.0)]
    late_rate: f64,
    /// Fraction of sagas the runner cancels while one of their actions is in flight.
    #[arg(long, default_value_t = 0.0)]
    cancel_rate: f64,
    /// The database holding skald's tables and the simulated services' records; the
    /// scheme picks the backend: sqlite://FILE or postgres://USER[:PASSWORD]@HOST[:PORT]/DB
    /// (postgresql:// too).
    #[arg(long, default_value = "sqlite://skald.db")]
    db: String,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Start no new sagas: finish the unfinished ones in the database, then summarise
    /// and check every saga in it.
    #[arg(long)]
    resume: bool,
    /// Give up waiting after this many seconds (unfinished sagas are reported).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Send every command and reply over NATS JetStream at this URL (e.g.
    /// nats://127.0.0.1:4222) instead of the in-process bus; for a cluster, several seed
    /// URLs comma-separated (nats://a:4222,nats://b:4222,nats://c:4222): the client
    /// fails over between them.
    #[arg(long)]
    nats: Option<String>,
    /// With --nats: the replica count of skald's streams (3 on a three-node cluster; 1
    /// to 5). A stream with fewer is scaled up; one with more is left as it is.
    #[arg(long, requires = "nats", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=5))]
    nats_replicas: u64,
    /// With --nats: if the broker is unreachable at start-up, keep retrying (visibly)
    /// for this many seconds instead of failing at once.
    #[arg(long, requires = "nats", default_value_t = 0)]
    nats_wait_secs: u64,
    /// With --nats: how long JetStream waits for an acknowledgement before redelivering
    /// a message (so a killed process's unacknowledged messages come back after this).
    #[arg(long, requires = "nats", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    ack_wait_secs: u64,
    /// With --nats: start no simulated services; wait for external participants
    /// (`cargo run --example participant`, or any other language) to answer.
    #[arg(long, requires = "nats")]
    no_participants: bool,
    /// With --nats: apply no replies here (`RuntimeOptions::consume = false`): start
    /// the sagas and wait for their outcomes while orchestrator nodes sharing the
    /// database and the broker (`skald serve`) run them, as a service in front of the
    /// nodes would.
    #[arg(long, requires = "nats")]
    no_consume: bool,
    /// With --nats: how to authenticate to NATS, and TLS.
    #[command(flatten)]
    nats_auth: skald::cli::NatsArgs,
    /// Skip the consistency check (for external services whose records it cannot
    /// read); the summary then says "consistent": null.
    #[arg(long)]
    no_check: bool,
    #[command(flatten)]
    telemetry: telemetry::TelemetryArgs,
}

#[derive(Debug, Serialize)]
struct Summary {
    started: usize,
    completed: usize,
    compensated: usize,
    dead_lettered: usize,
    unfinished: usize,
    /// Sagas whose cancel (`--cancel-rate`) the runtime accepted.
    cancelled: usize,
    /// Compensated sagas that compensated a step whose outcome was unknown when
    /// compensation began (every attempt timed out, or a cancel cut it short).
    in_doubt: usize,
    sagas_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    consistent: Option<bool>,
}

fn progress(total: usize, json: bool) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} settled  {per_sec}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Every saga in the store, with its status.
async fn all_sagas(store: &dyn SagaStore) -> anyhow::Result<Vec<(SagaId, SagaStatus)>> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(None, after, 5_000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        out.extend(page.iter().map(|s| (s.id, s.status)));
    }
    Ok(out)
}

async fn consistency(
    store: &dyn SagaStore,
    ledger: &dyn Ledger,
    only: Option<&HashSet<SagaId>>,
    check: bool,
) -> anyhow::Result<(Vec<(SagaId, SagaStatus)>, Option<ConsistencyReport>)> {
    let mut sagas = all_sagas(store).await?;
    let known: HashSet<SagaId> = sagas.iter().map(|(id, _)| *id).collect();
    if let Some(only) = only {
        sagas.retain(|(id, _)| only.contains(id));
    }
    if !check {
        return Ok((sagas, None));
    }
    let records = ledger
        .records()
        .await
        .context("reading the services' records")?;
    let mut report = check_consistency(&sagas, &records);
    // Effects of a saga the store does not know: a saga was lost.
    for (id, r) in &records {
        if !known.contains(id) {
            report.violations.push(format!(
                "the services hold {r:?} for saga {id}, which the store does not know"
            ));
        }
    }
    Ok((sagas, Some(report)))
}

/// What the runner saw of the promise's edges.
#[derive(Debug, Clone, Copy, Default)]
struct Edges {
    cancelled: usize,
    in_doubt: usize,
}

/// The reply budget of an action under `timing`: every attempt timing out, with the
/// longest backoff between them.
fn action_budget(timing: &CheckoutTiming) -> Duration {
    let r = timing.retry;
    let mut total = timing.timeout * r.max_attempts;
    let mut delay = r.initial_delay.as_secs_f64();
    for _ in 1..r.max_attempts {
        total += Duration::from_secs_f64(delay.min(r.max_delay.as_secs_f64()));
        delay *= r.multiplier;
    }
    total
}

/// The draw that picks the sagas `--cancel-rate` cancels.
const CANCEL_DRAW: u64 = 0xca9c;

/// A deterministic draw in [0, 1) for saga number `i`.
fn draw(seed: u64, what: u64, i: usize) -> f64 {
    let mut h = seed
        ^ what.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn count(sagas: &[(SagaId, SagaStatus)], status: SagaStatus) -> usize {
    sagas.iter().filter(|(_, s)| *s == status).count()
}

/// The summary over `sagas`. Throughput counts the sagas settled by this run:
/// `settled_here`, or every settled saga when `None`.
fn summarize(
    sagas: &[(SagaId, SagaStatus)],
    report: Option<&ConsistencyReport>,
    mut latencies: Vec<f64>,
    elapsed_secs: f64,
    settled_here: Option<usize>,
    edges: Edges,
) -> Summary {
    for v in report.iter().flat_map(|r| r.violations.iter()).take(10) {
        eprintln!("inconsistent: {v}");
    }
    latencies.sort_by(f64::total_cmp);
    let completed = count(sagas, SagaStatus::Completed);
    let compensated = count(sagas, SagaStatus::Compensated);
    let dead_lettered = count(sagas, SagaStatus::Failed);
    let settled = completed + compensated + dead_lettered;
    Summary {
        started: sagas.len(),
        completed,
        compensated,
        dead_lettered,
        unfinished: sagas.len() - settled,
        cancelled: edges.cancelled,
        in_doubt: edges.in_doubt,
        sagas_per_sec: round2(settled_here.unwrap_or(settled) as f64 / elapsed_secs.max(1e-9)),
        p50_ms: round2(percentile(&latencies, 50.0)),
        p99_ms: round2(percentile(&latencies, 99.0)),
        consistent: report.map(ConsistencyReport::is_consistent),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = match args.telemetry.init_logs("warn", "skald-checkout") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    for (flag, rate) in [
        ("--decline-rate", args.decline_rate),
        ("--flaky-rate", args.flaky_rate),
        ("--late-rate", args.late_rate),
        ("--cancel-rate", args.cancel_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            anyhow::bail!("{flag} must be within [0, 1], not {rate}");
        }
    }
    let mut timing = CheckoutTiming::default();
    if let Some(ms) = args.step_timeout_ms {
        timing.timeout = Duration::from_millis(ms);
    }
    let backend = Backend::of(&args.db)?;
    let db = redact(&args.db);
    // What the summary says about durability and group commit, per backend.
    let (store, durability, transactions): (Arc<dyn SagaStore>, String, &str) = match backend {
        Backend::Sqlite => (
            Arc::new(
                SqliteStore::connect(&args.db)
                    .await
                    .with_context(|| format!("opening the SQLite store at {db}"))?,
            ),
            "SQLite WAL, synchronous=FULL (every transaction fsync'd)".into(),
            "SQLite transactions",
        ),
        Backend::Postgres => {
            let store = PostgresStore::connect(&args.db)
                .await
                .with_context(|| format!("opening the PostgreSQL store at {db}"))?;
            let setting: Option<String> =
                sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
                    .fetch_one(store.pool())
                    .await
                    .ok();
            let durability = match setting {
                Some(v) => {
                    format!("PostgreSQL (synchronous_commit as configured on the server: {v})")
                }
                None => "PostgreSQL (synchronous_commit as configured on the server)".into(),
            };
            (Arc::new(store), durability, "PostgreSQL transactions")
        }
    };
    let ledger = open_ledger(&args.db).await?;
    // One connection for the orchestrator and the in-process participants.
    let bus: Arc<dyn Bus> = match &args.nats {
        Some(url) => Arc::new(
            args.nats_auth
                .connect(NatsOptions {
                    wait_for_server: (args.nats_wait_secs > 0)
                        .then(|| Duration::from_secs(args.nats_wait_secs)),
                    ack_wait: Duration::from_secs(args.ack_wait_secs),
                    ..NatsOptions::new(url.as_str()).replicas(args.nats_replicas as usize)
                })
                .await
                .with_context(|| format!("connecting to NATS at {}", redact(url)))?,
        ),
        None => {
            if !args.nats_auth.is_empty() {
                tracing::warn!(
                    "NATS authentication or TLS flags (or SKALD_NATS_* variables) given \
                     without --nats: the in-process bus ignores them"
                );
            }
            Arc::new(MemoryBus::new())
        }
    };

    // The simulated services, in-process, as participants on the bus, behind the TCC
    // fence (in the runner's database, beside their records).
    let services = SimServices::new(
        ledger.clone(),
        SimConfig {
            seed: args.seed,
            decline_rate: args.decline_rate,
            flaky_rate: args.flaky_rate,
            late_rate: args.late_rate,
            // Held past skald's whole budget for the step, so it gives up on it first.
            late_hold: action_budget(&timing) + Duration::from_secs(1),
        },
    );
    let mut participants = Vec::new();
    if !args.no_participants {
        let fence = ledger::open_fence(&args.db).await?;
        participants = services.serve(Arc::clone(&bus), fence, 256).await?;
    }

    let checkout = checkout_definition(timing)?;
    // The sagas a `--resume` run finishes: those unfinished when it starts.
    let unfinished_before = if args.resume {
        unfinished(store.as_ref()).await?
    } else {
        Vec::new()
    };
    let started_at = Instant::now();
    // Before the runtime starts: it registers its metrics with the recorder it finds.
    let _metrics = args.telemetry.serve_metrics().await?;
    let builder = Runtime::builder()
        .store(store.clone())
        .bus(bus.clone())
        .register(&checkout)
        .options(RuntimeOptions {
            consume: !args.no_consume,
            ..RuntimeOptions::default()
        });
    let runtime = builder
        .start()
        .await
        .context("starting the skald runtime")?;
    let deadline = started_at + Duration::from_secs(args.timeout_secs);

    let work = async {
        if args.resume {
            resume(
                &args,
                &runtime,
                &checkout,
                store.as_ref(),
                ledger.as_ref(),
                started_at,
                deadline,
                unfinished_before,
            )
            .await
        } else {
            fresh(
                &args,
                &runtime,
                &checkout,
                store.as_ref(),
                ledger.as_ref(),
                started_at,
                deadline,
            )
            .await
        }
    };
    // A problem the runtime cannot go on with (the store's schema) ends the run with
    // that error, instead of waiting for sagas that cannot move.
    let (summary, ok) = tokio::select! {
        result = work => result?,
        fatal = runtime.failed() => {
            return Err(anyhow::Error::new(fatal).context("the skald runtime stopped"));
        }
    };
    let commits = runtime.commit_stats();
    let batches = commits.batches;
    let writes = commits.writes;
    let commit_line = format!(
        "{writes} transitions in {batches} {transactions} (avg batch {:.1}, {:.2} ms per transaction)",
        writes as f64 / batches.max(1) as f64,
        commits.busy_micros as f64 / 1e3 / batches.max(1) as f64,
    );
    runtime.shutdown().await;
    drop(participants);

    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!();
        println!("checkout sagas on {db}");
        println!("  started        {}", summary.started);
        println!("  completed      {}", summary.completed);
        println!("  compensated    {}", summary.compensated);
        println!("  dead-lettered  {}", summary.dead_lettered);
        println!("  unfinished     {}", summary.unfinished);
        println!("  cancelled      {}", summary.cancelled);
        println!(
            "  in doubt       {} (compensated a step whose outcome was unknown)",
            summary.in_doubt
        );
        println!("  throughput     {:.1} sagas/s", summary.sagas_per_sec);
        println!(
            "  latency        p50 {:.2} ms, p99 {:.2} ms",
            summary.p50_ms, summary.p99_ms
        );
        println!(
            "  consistency    {}",
            match summary.consistent {
                Some(true) => "ok (services' records match every saga's outcome)",
                Some(false) => "FAILED",
                None => "not checked (--no-check)",
            }
        );
        println!("  group commit   {commit_line}");
        println!("  durability     {durability}");
        match &args.nats {
            Some(url) => println!(
                "  transport      NATS JetStream at {} (file storage{}, acked publishes{})",
                redact(url),
                if args.nats_replicas > 1 {
                    format!(", {} replicas", args.nats_replicas)
                } else {
                    String::new()
                },
                if args.nats_auth.requires_tls() {
                    ", TLS"
                } else {
                    ""
                }
            ),
            None => println!("  transport      in-process bus"),
        }
    }
    Ok(ok)
}

/// Starts a saga, retrying (with the same id) while the store or the bus is briefly
/// unavailable. A retry can find the saga already created (the first attempt's commit
/// went through and only its answer was lost): that is a success.
async fn start_with_retries(
    runtime: &Runtime,
    checkout: &skald::definition::SagaDefinition<Checkout>,
    order: &Checkout,
) -> anyhow::Result<SagaHandle<Checkout>> {
    let id = SagaId::new();
    let mut attempt = 0u32;
    loop {
        match runtime.start_saga_with_id(id, checkout, order).await {
            Ok(handle) => return Ok(handle),
            Err(e) if e.is_retryable() && attempt < 30 => {
                attempt += 1;
                tracing::warn!(saga.id = %id, error = %e, attempt, "starting a saga failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20)))).await;
            }
            Err(e) => {
                if attempt > 0 && matches!(runtime.load(id).await, Ok(Some(_))) {
                    return Ok(runtime.saga(checkout, id));
                }
                return Err(anyhow::Error::new(e).context(format!("starting saga {id}")));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn fresh(
    args: &Args,
    runtime: &Runtime,
    checkout: &skald::definition::SagaDefinition<Checkout>,
    store: &dyn SagaStore,
    ledger: &dyn Ledger,
    started_at: Instant,
    deadline: Instant,
) -> anyhow::Result<(Summary, bool)> {
    let bar = progress(args.sagas as u64 as usize, args.json);
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let cancelled = AtomicUsize::new(0);
    let cancelled = &cancelled;
    let (started_tx, mut started_rx) =
        tokio::sync::mpsc::unbounded_channel::<(SagaHandle<Checkout>, Instant)>();
    let slots_for_starter = slots.clone();

    // Starter: keeps `concurrency` sagas in flight.
    // Starter: keeps `concurrency` sagas in flight. Starts run concurrently (not one
    // after the other), so the store can commit many of them in one transaction.
    let starter = async move {
        let seed = args.seed;
        let tx = started_tx;
        let (slots, tx) = (&*slots_for_starter, &tx);
        futures_util::stream::iter(0..args.sagas)
            .map(Ok)
            .try_for_each_concurrent(args.concurrency.max(1), move |i| async move {
                let Ok(permit) = slots.acquire().await else {
                    return Ok(());
                };
                permit.forget();
                let order = Checkout::new(
                    format!("order-{seed}-{i}"),
                    format!("customer-{}", i % 97),
                    vec![LineItem {
                        sku: format!("sku-{}", i % 13),
                        quantity: 1 + (i % 3) as u32,
                    }],
                    1_000 + (i as u64 % 50) * 10,
                );
                let t0 = Instant::now();
                let handle = start_with_retries(runtime, checkout, &order).await?;
                let id = handle.id();
                let _ = tx.send((handle, t0));
                // Right after its start, the saga's first action is in flight.
                if draw(seed, CANCEL_DRAW, i) < args.cancel_rate {
                    match runtime.cancel(id, "cancelled by the runner (--cancel-rate)").await {
                        Ok(Applied::Transitioned { .. }) => {
                            cancelled.fetch_add(1, Ordering::Relaxed);
                        }
                        // Already finished: the cancel came too late, nothing changed.
                        Ok(Applied::Ignored { .. }) => {}
                        // Refused: finished already, or its data unreadable; or the
                        // store briefly unavailable. Either way the saga runs on.
                        Err(e @ skald::RuntimeError::Transition(_)) => {
                            tracing::debug!(saga.id = %id, reason = %e, "cancel refused");
                        }
                        Err(e) if e.is_retryable() => {
                            tracing::warn!(saga.id = %id, error = %e, "cancelling failed; the saga runs on");
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context(format!("cancelling saga {id}"))),
                    }
                }
                anyhow::Ok(())
            })
            .await
    };

    // Collector: waits on each started saga's handle. A handle answers whichever
    // process settles the saga, so several runners (or a runner and a `--resume`
    // orchestrator) sharing one database each count their own sagas, all of them.
    let collector = async {
        let mut latencies: Vec<f64> = Vec::with_capacity(args.sagas);
        let mut ids: HashSet<SagaId> = HashSet::with_capacity(args.sagas);
        // Dead-lettered in doubt: a late success may still resolve them; read again at
        // the end.
        let mut failed_in_doubt = Vec::new();
        let mut in_doubt = 0usize;
        let mut waiting = futures_util::stream::FuturesUnordered::new();
        let mut starts_open = true;
        let mut failure = None;
        // Until the starts ended (done or failed) and every saga that did start settled.
        while starts_open || !waiting.is_empty() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            tokio::select! {
                started = started_rx.recv(), if starts_open => match started {
                    Some((handle, t0)) => {
                        ids.insert(handle.id());
                        waiting.push(async move {
                            let outcome = handle.outcome().await;
                            (handle, t0, outcome)
                        });
                    }
                    None => starts_open = false,
                },
                Some((handle, t0, outcome)) = waiting.next(), if !waiting.is_empty() => {
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(e) => {
                            failure = Some(anyhow::Error::new(e).context(format!("waiting for saga {}", handle.id())));
                            break;
                        }
                    };
                    latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                    if outcome.in_doubt {
                        match outcome.status {
                            SagaStatus::Compensated => in_doubt += 1,
                            SagaStatus::Failed => failed_in_doubt.push(handle),
                            _ => {}
                        }
                    }
                    slots.add_permits(1);
                    bar.inc(1);
                }
                _ = tokio::time::sleep(remaining) => break,
            }
        }
        // The starter may be waiting for a slot that no settle will free now (the
        // deadline passed, or a handle failed): let it stop.
        slots.close();
        // Late start registrations (the starter may still hold a few).
        while let Ok((handle, _)) = started_rx.try_recv() {
            ids.insert(handle.id());
        }
        for handle in failed_in_doubt {
            if let Ok(view) = handle.state().await
                && view.status == SagaStatus::Compensated
            {
                in_doubt += 1;
            }
        }
        (latencies, ids, in_doubt, failure)
    };

    let (start_result, (latencies, ids, in_doubt, failure)) = tokio::join!(starter, collector);
    start_result.context("starting sagas")?;
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = started_at.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let (sagas, report) = consistency(store, ledger, Some(&ids), !args.no_check).await?;
    let settled_here = None;
    let edges = Edges {
        cancelled: cancelled.load(Ordering::Relaxed),
        in_doubt,
    };
    let summary = summarize(
        &sagas,
        report.as_ref(),
        latencies,
        elapsed,
        settled_here,
        edges,
    );
    let ok = summary.consistent != Some(false)
        && summary.unfinished == 0
        && summary.dead_lettered == 0
        && summary.started == args.sagas;
    Ok((summary, ok))
}

/// Every saga running or compensating now.
async fn unfinished(store: &dyn SagaStore) -> anyhow::Result<Vec<SagaId>> {
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = store.active_sagas(after, 1_000).await?;
        let Some(last) = page.last().copied() else {
            return Ok(ids);
        };
        after = Some(last);
        ids.extend(page);
    }
}

#[allow(clippy::too_many_arguments)]
async fn resume(
    args: &Args,
    runtime: &Runtime,
    checkout: &skald::definition::SagaDefinition<Checkout>,
    store: &dyn SagaStore,
    ledger: &dyn Ledger,
    started_at: Instant,
    deadline: Instant,
    unfinished_before: Vec<SagaId>,
) -> anyhow::Result<(Summary, bool)> {
    let mut latencies = Vec::new();
    let mut edges = Edges::default();
    if !unfinished_before.is_empty() {
        // Wait, with a deadline, for each saga unfinished at start to settle, here or
        // in any other process sharing the database.
        let bar = progress(unfinished_before.len(), args.json);
        let mut waiting: futures_util::stream::FuturesUnordered<_> = unfinished_before
            .into_iter()
            .map(|id| {
                let handle = runtime.saga(checkout, id);
                async move { handle.outcome().await }
            })
            .collect();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let next = match tokio::time::timeout(remaining, waiting.next()).await {
                Ok(Some(next)) => next,
                Ok(None) | Err(_) => break,
            };
            let o = next.context("waiting for a resumed saga")?;
            latencies.push(
                o.updated_at
                    .as_millis()
                    .saturating_sub(o.created_at.as_millis()) as f64,
            );
            if o.in_doubt && o.status == SagaStatus::Compensated {
                edges.in_doubt += 1;
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let elapsed = started_at.elapsed().as_secs_f64();
    let (sagas, report) = consistency(store, ledger, None, !args.no_check).await?;
    let settled_here = Some(latencies.len());
    let summary = summarize(
        &sagas,
        report.as_ref(),
        latencies,
        elapsed,
        settled_here,
        edges,
    );
    let ok =
        summary.consistent != Some(false) && summary.unfinished == 0 && summary.dead_lettered == 0;
    Ok((summary, ok))
}
