//! A simulated checkout participant (inventory, payment or shipping) as a stand-alone
//! process on NATS JetStream.
//!
//! It consumes its commands on a durable consumer (several replicas share the work),
//! keeps its records (reservations, charges, shipments, keyed by idempotency key) in
//! its own table of the database given by `--db` (SQLite or PostgreSQL, by the URL's
//! scheme), so the checkout runner's consistency check can read them, keeps the TCC
//! fence of docs/protocol.md in the same database (`skald_fence`: an action claims its
//! key first, a compensation of an unknown key leaves a tombstone that refuses the action
//! later, undo goes by the action's key), and answers with seeded failures.
//! `--late-rate F --late-hold-ms MS` makes the reserve or charge of a fraction F of
//! orders take effect at once but answer only MS after its first delivery.
//!
//! ```text
//! cargo run --example participant -- inventory --nats nats://127.0.0.1:4222 --db sqlite://skald.db
//! cargo run --example participant -- payment   --nats nats://127.0.0.1:4222 --db sqlite://skald.db
//! cargo run --example participant -- shipping  --nats nats://127.0.0.1:4222 --db sqlite://skald.db
//! cargo run --release --example checkout -- --nats nats://127.0.0.1:4222 --no-participants
//!
//! # on a three-node cluster: several seed URLs, streams at three replicas
//! cargo run --example participant -- payment --nats nats://a:4222,nats://b:4222,nats://c:4222 \
//!     --nats-replicas 3 --db sqlite://skald.db
//!
//! # on PostgreSQL, each command taking 0-100 ms, redelivered 5 s after a crash:
//! cargo run --example participant -- payment --nats nats://127.0.0.1:4222 \
//!     --db postgres://postgres@127.0.0.1:5432/skald --latency-ms 50 --ack-wait-secs 5
//! ```
//!
//! Stops on Ctrl-C or SIGTERM; unacknowledged commands are redelivered to a replica
//! after `--ack-wait-secs`.
//!
//! Transport security: `--creds PATH` (`SKALD_NATS_CREDS`, a NATS credentials file),
//! `--nkey SEED_FILE` (`SKALD_NATS_NKEY`, a file holding an NKey user seed `SU...`),
//! `--user NAME` and `--password SECRET` (`SKALD_NATS_USER`, `SKALD_NATS_PASSWORD`),
//! `--token SECRET` (`SKALD_NATS_TOKEN`); `--tls-ca PATH`, `--tls-cert PATH` and
//! `--tls-key PATH` (`SKALD_NATS_TLS_CA`, `_CERT`, `_KEY`: any of them requires TLS; a
//! client certificate needs its key). A participant's NATS user needs only its own
//! service's subjects: its commands (`skald.cmd.<service>.>`, through its durable
//! consumer) and its replies (`skald.reply.<service>.>`); docs/security.md has the
//! permissions. Secrets are never printed; prefer the environment to the command line.
//!
//! ```text
//! SKALD_NATS_NKEY=payment.nk cargo run --example participant -- payment \
//!     --nats tls://nats.internal:4222 --tls-ca ca.pem --db sqlite://skald.db
//! ```
//!
//! Observability: `--metrics-addr ADDR` serves Prometheus metrics on
//! `http://ADDR/metrics` (off by default); `--log-format text|json` picks the log lines'
//! shape (stderr, `RUST_LOG`, default `info`); in builds with the `otlp` feature,
//! `--otlp-endpoint URL` exports this participant's spans, which join each saga's trace
//! through the commands' `traceparent` (docs/observability.md).
//!
//! ```text
//! cargo run --example participant -- payment --metrics-addr 127.0.0.1:9465 --log-format json
//! ```

#[path = "checkout/ledger.rs"]
mod ledger;
#[path = "checkout/telemetry.rs"]
mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use skald::adapters::nats::NatsOptions;
use skald::participant;
use skald::ports::Bus;
use skald_sagas::sim::{SimConfig, SimServices};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Service {
    Inventory,
    Payment,
    Shipping,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Inventory => "inventory",
            Service::Payment => "payment",
            Service::Shipping => "shipping",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "participant",
    about = "A simulated checkout participant on NATS JetStream"
)]
struct Args {
    /// Which service to run.
    service: Service,
    /// The NATS server (tls:// for TLS), or several seed URLs of one cluster,
    /// comma-separated (nats://a:4222,nats://b:4222,nats://c:4222).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The replica count of skald's streams, should this participant create them (3 on
    /// a three-node cluster; 1 to 5). Streams with more are left as they are.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=5))]
    nats_replicas: u64,
    /// How to authenticate to NATS, and TLS.
    #[command(flatten)]
    nats_auth: skald::cli::NatsArgs,
    /// The database holding the service's records (the checkout runner's, so it can
    /// check them); the scheme picks the backend: sqlite://FILE or
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DB (postgresql:// too).
    #[arg(long, default_value = "sqlite://skald.db")]
    db: String,
    /// Seed of the simulated failures.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Fraction of payments declined.
    #[arg(long, default_value_t = 0.1)]
    decline_rate: f64,
    /// Fraction of attempts failing retryably.
    #[arg(long, default_value_t = 0.05)]
    flaky_rate: f64,
    /// Fraction of orders whose reserve (inventory) or charge (payment) this service
    /// applies at once but answers only after --late-hold-ms: make it longer than skald's
    /// whole retry budget for the step, so skald compensates the step as in doubt.
    #[arg(long, default_value_t = 0.0)]
    late_rate: f64,
    /// With --late-rate: how long a late step's answers are held after its first
    /// delivery.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    late_hold_ms: u64,
    /// Commands handled at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Simulated service time: each command waits a pseudo-random time, uniform in
    /// [0, 2N] ms, before it is handled (seeded by --seed and the command's idempotency
    /// key, so a run is reproducible). 0: no wait.
    #[arg(long, default_value_t = 0, value_name = "N")]
    latency_ms: u64,
    /// How long NATS JetStream waits for a command's acknowledgement before
    /// redelivering it (so the commands of a killed participant come back after this).
    #[arg(long, default_value_t = 30, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    ack_wait_secs: u64,
    #[command(flatten)]
    telemetry: telemetry::TelemetryArgs,
}

/// The simulated service time of the command with `key`: uniform in [0, 2 ·
/// `latency_ms`] ms, a function of `seed` and `key` only.
fn service_time(seed: u64, key: &str, latency_ms: u64) -> Duration {
    if latency_ms == 0 {
        return Duration::ZERO;
    }
    // FNV-1a over the key, seeded, then the splitmix64 finaliser.
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let span = latency_ms.saturating_mul(2).saturating_add(1);
    Duration::from_millis(h % span)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = match args
        .telemetry
        .init_logs("info", &format!("skald-{}", args.service.name()))
    {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let name = args.service.name();
    let _metrics = args.telemetry.serve_metrics().await?;
    let db = ledger::redact(&args.db);
    let ledger = ledger::open_ledger(&args.db).await?;
    let nats = ledger::redact(&args.nats);
    let bus: Arc<dyn Bus> = Arc::new(
        args.nats_auth
            .connect(NatsOptions {
                name: format!("skald-participant-{name}"),
                ack_wait: Duration::from_secs(args.ack_wait_secs),
                ..NatsOptions::new(args.nats.as_str()).replicas(args.nats_replicas as usize)
            })
            .await
            .with_context(|| format!("connecting to NATS at {nats}"))?,
    );
    if !(0.0..=1.0).contains(&args.late_rate) {
        anyhow::bail!("--late-rate must be within [0, 1], not {}", args.late_rate);
    }
    let services = SimServices::new(
        ledger,
        SimConfig {
            seed: args.seed,
            decline_rate: args.decline_rate,
            flaky_rate: args.flaky_rate,
            late_rate: args.late_rate,
            late_hold: Duration::from_millis(args.late_hold_ms),
        },
    );
    // The TCC fence, in the service's database beside its records (docs/protocol.md).
    let fence = ledger::open_fence(&args.db).await?;
    let held = services.clone();
    let options = participant::ParticipantOptions {
        concurrency: Some(args.concurrency),
        fence: Some(fence),
        hold_reply: Some(Arc::new(move |cmd: &skald::wire::IncomingCommand| {
            held.hold_reply(cmd)
        })),
        ..participant::ParticipantOptions::default()
    };
    let subject = format!("skald.cmd.{name}.>");
    let (seed, latency_ms) = (args.seed, args.latency_ms);
    let handle = participant::serve_with(bus, &subject, name, options, move |cmd| {
        let services = services.clone();
        async move {
            // Simulated service time; nothing is locked while waiting.
            let wait = service_time(seed, &cmd.envelope.idempotency_key, latency_ms);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            services.handle(cmd).await
        }
    })
    .await
    .with_context(|| format!("subscribing to {subject}"))?;
    tracing::info!(
        service = name,
        subject,
        nats = %nats,
        db = %db,
        latency_ms,
        ack_wait_secs = args.ack_wait_secs,
        "participant running"
    );
    shutdown_signal().await;
    handle.stop();
    tracing::info!(service = name, "participant stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
