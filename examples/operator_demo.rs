//! Leaves checkout sagas in every state, for trying the `skald` operator CLI on them
//! (docs/operations.md walks through it).
//!
//! It runs a runtime and scripted participants (`skald_sagas::scripted`) on NATS and
//! the store given, starts five sagas and keeps running (so re-drives and cancels have
//! a runtime to apply them) until Ctrl-C or `--run-secs`:
//! - `ok-*` completes; `decline-*` is compensated;
//! - `broken-*` is dead-lettered (its inventory release fails permanently); once it is,
//!   the release is mended, so `skald dlq redrive` takes it to `compensated`;
//! - two `hang-*` sagas wait forever for shipping: `running`, then `skald stuck`.
//!
//! ```text
//! nats-server -js &
//! cargo run --example operator_demo -- --nats nats://127.0.0.1:4222 --db sqlite://demo.db
//! # in another terminal:
//! cargo run --features demo --bin skald -- --db sqlite://demo.db sagas
//! ```
//!
//! Against a NATS that requires authentication or TLS, give the transport flags every
//! skald binary takes (the `skald` CLI too): `--creds PATH` (`SKALD_NATS_CREDS`),
//! `--nkey SEED_FILE` (`SKALD_NATS_NKEY`, a file holding an NKey user seed `SU...`),
//! `--user NAME` and `--password SECRET` (`SKALD_NATS_USER`, `SKALD_NATS_PASSWORD`),
//! `--token SECRET` (`SKALD_NATS_TOKEN`), `--tls-ca PATH`, `--tls-cert PATH` and
//! `--tls-key PATH` (`SKALD_NATS_TLS_CA`, `_CERT`, `_KEY`; any of them requires TLS).
//! Secrets are never printed; the environment keeps them off the command line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use skald::adapters::nats::NatsOptions;
use skald::adapters::postgres::PostgresStore;
use skald::adapters::redact_url;
use skald::adapters::sqlite::SqliteStore;
use skald::machine::SagaStatus;
use skald::participant;
use skald::ports::{Bus, SagaStore};
use skald::{Runtime, SagaOutcome};
use skald_sagas::checkout::{Checkout, CheckoutTiming, LineItem, checkout_definition};
use skald_sagas::scripted::Scripted;
use skald_sagas::sim::SimServices;

#[derive(Debug, Parser)]
#[command(name = "operator_demo", about = "Leaves checkout sagas in every state")]
struct Args {
    /// The NATS server (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The store: sqlite://FILE or postgres://USER@HOST:PORT/DB.
    #[arg(long, default_value = "sqlite://operator-demo.db")]
    db: String,
    /// Stop after this many seconds (0: only on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    run_secs: u64,
    /// How to authenticate to NATS, and TLS.
    #[command(flatten)]
    nats_auth: skald::cli::NatsArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
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
    let (db, nats) = (redact_url(&args.db), redact_url(&args.nats));
    let store: Arc<dyn SagaStore> = if args.db.starts_with("postgres") {
        Arc::new(
            PostgresStore::connect(&args.db)
                .await
                .with_context(|| format!("opening the PostgreSQL store at {db}"))?,
        )
    } else {
        Arc::new(
            SqliteStore::connect(&args.db)
                .await
                .with_context(|| format!("opening the SQLite store at {db}"))?,
        )
    };
    let connect = || async {
        args.nats_auth
            .connect(NatsOptions {
                name: "skald-operator-demo".into(),
                ..NatsOptions::new(args.nats.as_str())
            })
            .await
            .with_context(|| format!("connecting to NATS at {nats}"))
    };
    let bus: Arc<dyn Bus> = Arc::new(connect().await?);
    let scripted = Scripted::new(Duration::from_millis(30));
    let mut participants = Vec::new();
    for (service, subject) in SimServices::services() {
        let scripted = scripted.clone();
        participants.push(
            participant::serve(Arc::clone(&bus), subject, service, 64, move |cmd| {
                let scripted = scripted.clone();
                async move { scripted.handle(cmd).await }
            })
            .await?,
        );
    }
    let checkout = checkout_definition(CheckoutTiming::default())?;
    let builder = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(Arc::new(connect().await?))
        .register(&checkout);
    let mut outcomes = builder.subscribe_outcomes();
    let runtime = builder.start().await?;

    let item = LineItem {
        sku: "tea".into(),
        quantity: 2,
    };
    let mut started = Vec::new();
    for order in ["ok-1", "decline-1", "broken-1", "hang-1", "hang-2"] {
        let data = Checkout::new(order, "customer-7", vec![item.clone()], 1_250);
        let id = runtime.start_saga(&checkout, &data).await?.id();
        println!("{order:<10} {id}");
        started.push((order, id));
    }
    let broken = started
        .iter()
        .find(|(o, _)| o.starts_with("broken"))
        .map(|(_, id)| *id)
        .context("the broken saga")?;
    // Mend the release once the broken saga is dead-lettered, so a re-drive works.
    while let Some(outcome) = outcomes.recv().await {
        if let SagaOutcome {
            id,
            status: SagaStatus::Failed,
            ..
        } = outcome
            && id == broken
        {
            scripted.set_release_broken(false);
            // The URLs as given, passwords redacted: the transport flags (or their
            // SKALD_NATS_* variables) go with the command as they went with this one.
            println!(
                "\n{broken} is dead-lettered; the warehouse is back, so a re-drive succeeds:\n  \
                 skald --db {db} --nats {nats} dlq redrive {broken}"
            );
            break;
        }
    }
    println!(
        "running until Ctrl-C{}",
        if args.run_secs > 0 {
            format!(" or {} s", args.run_secs)
        } else {
            String::new()
        }
    );
    let limit = async {
        if args.run_secs > 0 {
            tokio::time::sleep(Duration::from_secs(args.run_secs)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = limit => {}
    }
    runtime.shutdown().await;
    drop(participants);
    Ok(())
}
