//! A simulated checkout participant (inventory, payment or shipping) as a stand-alone
//! process on NATS JetStream.
//!
//! It consumes its commands on a durable consumer (several replicas share the work),
//! keeps its records (reservations, charges, shipments, keyed by idempotency key) in
//! its own table of the database given by `--db`, so the checkout runner's consistency
//! check can read them, and answers with seeded failures.
//!
//! ```text
//! cargo run --example participant -- inventory --nats nats://127.0.0.1:4222 --db sqlite://skald.db
//! cargo run --example participant -- payment   --nats nats://127.0.0.1:4222 --db sqlite://skald.db
//! cargo run --example participant -- shipping  --nats nats://127.0.0.1:4222 --db sqlite://skald.db
//! cargo run --release --example checkout -- --nats nats://127.0.0.1:4222 --no-participants
//! ```
//!
//! Stops on Ctrl-C or SIGTERM; unacknowledged commands are redelivered to a replica.

#[path = "checkout/ledger.rs"]
mod ledger;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::participant;
use skald::ports::Bus;
use skald::sagas::sim::{SimConfig, SimServices};

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
    /// The NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The database holding the service's records.
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
    /// Commands handled at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let name = args.service.name();
    let ledger = Arc::new(ledger::SqliteLedger::open(&args.db).await?);
    let bus: Arc<dyn Bus> = Arc::new(
        NatsBus::connect(NatsOptions {
            name: format!("skald-participant-{name}"),
            ..NatsOptions::new(args.nats.as_str())
        })
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?,
    );
    let services = SimServices::new(
        ledger,
        SimConfig {
            seed: args.seed,
            decline_rate: args.decline_rate,
            flaky_rate: args.flaky_rate,
        },
    );
    let subject = format!("skald.cmd.{name}.>");
    let handle = participant::serve(bus, &subject, name, args.concurrency, move |cmd| {
        let services = services.clone();
        async move { services.handle(cmd).await }
    })
    .await?;
    tracing::info!(service = name, subject, nats = %args.nats, db = %args.db, "participant running");
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
