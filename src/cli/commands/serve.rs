//! `skald serve`: an orchestrator node. A runtime with the CLI's definitions and
//! upcasters on `--db` (opened with its migrations applied, unlike the read-only
//! commands) and `--nats`, which applies replies, wake-ups and operator requests and
//! answers start requests until SIGINT or SIGTERM, then shuts down gracefully. It
//! starts no sagas: a deployment is N nodes plus the services that start sagas (with
//! `RuntimeOptions { consume: false, .. }` runtimes, or start requests over NATS).
//!
//! Exit codes are the CLI's: 0 after a signal, 2 for bad usage (no `--nats`), 4 when the
//! database cannot be used (at start-up, or the runtime stopped on a schema problem:
//! `Runtime::failed`), 5 when NATS cannot be reached or refuses the connection, 1 for
//! anything else.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use skald_adapters::nats::NatsOptions;
use skald_adapters::postgres::PostgresStore;
use skald_adapters::redact_url;
use skald_adapters::sqlite::SqliteStore;
use skald_runtime::error::RuntimeError;
use skald_runtime::ids::SagaType;
use skald_runtime::ports::SagaStore;
use skald_runtime::runtime::{Runtime, RuntimeOptions};

use super::{unsupported_db, usage};
use crate::cli::{Cli, CliError, ExitStatus, NatsArgs, NatsArgsError, ServeArgs};

/// How long a graceful shutdown may take before the process gives up on it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Runs a node until SIGINT or SIGTERM (`Ok`: nothing to print), or until start-up or
/// the runtime fails.
pub(crate) async fn serve(
    cli: &Cli,
    db: &str,
    nats: Option<&str>,
    auth: &NatsArgs,
    args: ServeArgs,
) -> Result<String, CliError> {
    let nats = nats.ok_or_else(|| {
        usage(
            "serve needs --nats URL (or SKALD_NATS): a node shares the replies, wake-ups and \
             operator requests of its saga types with the other nodes over NATS JetStream \
             (an in-process bus would reach no other process)"
                .into(),
        )
    })?;
    let registered = cli.registered();
    if registered.is_empty() {
        return Err(CliError::new(
            ExitStatus::Failure,
            "this binary registers no saga definitions, so serve has nothing to run: build it \
             with skald::cli::Cli::new().register(&my_saga)",
        ));
    }
    let _telemetry = init_logs(&args)?;
    // Before anything slow: a signal stops the node, even during start-up.
    let stop = stop_signal().map_err(|e| {
        CliError::new(
            ExitStatus::Failure,
            format!("cannot listen for SIGINT and SIGTERM: {e}"),
        )
    })?;
    // Before the runtime starts: it registers its metrics with the recorder it finds.
    let metrics = match args.metrics_addr {
        Some(addr) => Some(crate::metrics::serve(addr).await.map_err(|e| {
            CliError::new(ExitStatus::Failure, format!("--metrics-addr {addr}: {e}"))
        })?),
        None => None,
    };

    // A signal during start-up (a broker not up yet, a cluster electing) stops it there.
    let mut stop = std::pin::pin!(stop);
    let up = async {
        let store = open_migrated(db).await?;
        let options = NatsOptions {
            name: "skald-serve".into(),
            ack_wait: Duration::from_secs(args.ack_wait_secs.max(1)),
            wait_for_server: (args.nats_wait_secs > 0)
                .then(|| Duration::from_secs(args.nats_wait_secs)),
            ..NatsOptions::new(nats)
        }
        .replicas(args.nats_replicas);
        let bus = auth.connect(options).await.map_err(|e| match e {
            NatsArgsError::Invalid(m) => usage(m),
            e => broker(format!("cannot reach NATS: {e}")),
        })?;

        let options = RuntimeOptions {
            reply_group: args.reply_group.clone(),
            idle_timeout: Duration::from_millis(args.idle_timeout_ms),
            partitions: args.partitions,
            partition_lease: Duration::from_millis(args.partition_lease_ms),
            ..RuntimeOptions::default()
        };
        let builder = Runtime::builder().store(store).bus(bus).options(options);
        let runtime = cli
            .register_with(builder)
            .start()
            .await
            .map_err(|e| start_error(e, db, nats))?;
        Ok::<_, CliError>(runtime)
    };
    let runtime = tokio::select! {
        runtime = up => runtime?,
        signal = &mut stop => {
            eprintln!("skald serve: {signal} during start-up: stopped");
            return Ok(String::new());
        }
    };

    let metrics_line = metrics
        .as_ref()
        .map(|m| format!("; metrics on http://{}/metrics", m.local_addr()))
        .unwrap_or_default();
    eprintln!(
        "skald serve: running {} on {} and {}{metrics_line}",
        types(&registered),
        redact_url(db),
        redact_url(nats)
    );

    let failed = tokio::select! {
        signal = &mut stop => {
            eprintln!("skald serve: {signal}: stopping (a second signal stops at once)");
            None
        }
        fatal = runtime.failed() => Some(fatal),
    };
    // A second signal cuts the graceful shutdown short.
    let again = stop_signal().map_err(|e| {
        CliError::new(
            ExitStatus::Failure,
            format!("cannot listen for SIGINT and SIGTERM: {e}"),
        )
    })?;
    let stopped = tokio::select! {
        stopped = tokio::time::timeout(SHUTDOWN_GRACE, runtime.shutdown()) => stopped.is_ok(),
        signal = again => {
            eprintln!("skald serve: {signal} again: stopped without finishing the shutdown");
            false
        }
    };
    if let Some(fatal) = failed {
        return Err(CliError::new(
            ExitStatus::Database,
            format!(
                "the runtime stopped: {fatal}; check --db (or SKALD_DB): the database of this \
                 deployment, migrated by this skald release"
            ),
        ));
    }
    if !stopped {
        return Err(CliError::new(
            ExitStatus::Failure,
            format!(
                "the runtime did not shut down (grace {}s); committed state is kept, \
                 unfinished sagas continue on the other nodes",
                SHUTDOWN_GRACE.as_secs()
            ),
        ));
    }
    eprintln!("skald serve: stopped");
    Ok(String::new())
}

/// The subscriber: `--log-format`, `RUST_LOG` (default `info`), traces with
/// `--otlp-endpoint` (builds with the `otlp` feature). An embedder's own subscriber
/// (`Cli::run` in a process that has one) is kept.
fn init_logs(args: &ServeArgs) -> Result<Option<crate::telemetry::TelemetryGuard>, CliError> {
    #[cfg(feature = "otlp")]
    let otlp = args
        .otlp_endpoint
        .as_deref()
        .map(|e| crate::telemetry::OtlpOptions::new(e, "skald-serve"));
    #[cfg(not(feature = "otlp"))]
    let otlp = None;
    match crate::telemetry::init_with_filter("info", args.log_format, otlp) {
        Ok(guard) => Ok(Some(guard)),
        Err(crate::telemetry::TelemetryError::Subscriber(_)) => Ok(None),
        Err(e) => Err(usage(e.to_string())),
    }
}

/// Resolves with the signal's name on SIGINT or SIGTERM (Ctrl-C elsewhere than Unix).
/// The handlers are installed by this call, not when the future is first polled.
#[cfg(unix)]
fn stop_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

#[cfg(not(unix))]
fn stop_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    })
}

/// The store at `url`, created if missing and migrated to this release's schema.
async fn open_migrated(url: &str) -> Result<Arc<dyn SagaStore>, CliError> {
    let opened: Result<Arc<dyn SagaStore>, _> = if url.starts_with("sqlite:") {
        SqliteStore::connect(url)
            .await
            .map(|s| Arc::new(s) as Arc<dyn SagaStore>)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        PostgresStore::connect(url)
            .await
            .map(|s| Arc::new(s) as Arc<dyn SagaStore>)
    } else {
        return Err(unsupported_db(url));
    };
    opened.map_err(|e| {
        let e = CliError::from(e);
        CliError::new(
            e.status,
            format!(
                "cannot open the store: {}; check --db (or SKALD_DB): the server, the \
                 database and the user's rights",
                e.message
            ),
        )
    })
}

fn broker(message: String) -> CliError {
    CliError::new(
        ExitStatus::Broker,
        format!(
            "{message}; check --nats (or SKALD_NATS), that nats-server (2.10 or later) runs with \
             JetStream (-js), and the NATS authentication and TLS flags"
        ),
    )
}

/// A runtime that did not start, by what to check.
fn start_error(e: RuntimeError, db: &str, nats: &str) -> CliError {
    match e {
        RuntimeError::Store(e) => {
            let e = CliError::from(e);
            CliError::new(
                e.status,
                format!(
                    "the runtime cannot start on the store {}: {}",
                    redact_url(db),
                    e.message
                ),
            )
        }
        RuntimeError::Bus(e) => broker(format!(
            "the runtime cannot start on NATS: {}",
            crate::cli::transport::connect_error(nats, &e)
        )),
        e => CliError::new(
            ExitStatus::Failure,
            format!("the runtime cannot start: {e}"),
        ),
    }
}

/// `checkout v1, order v1, order v2`.
fn types(registered: &[(SagaType, u32)]) -> String {
    let mut by_type: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (t, v) in registered {
        by_type.entry(t.as_str()).or_default().push(*v);
    }
    by_type
        .into_iter()
        .map(|(t, versions)| {
            let versions: Vec<String> = versions.iter().map(|v| format!("v{v}")).collect();
            format!("{t} {}", versions.join("+"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_listed_with_their_versions() {
        let t = |s: &str| SagaType::new(s).expect("a type");
        assert_eq!(
            types(&[(t("checkout"), 1), (t("order"), 1), (t("order"), 2)]),
            "checkout v1, order v1+v2"
        );
    }

    #[test]
    fn start_errors_name_what_to_check() {
        let e = start_error(
            RuntimeError::Bus(skald_runtime::ports::BusError::Unavailable(
                "cannot connect to NATS at nats://u:hunter2@h:4222: refused".into(),
            )),
            "postgres://skald:dbsecret@h/skald",
            "nats://u:hunter2@h:4222",
        );
        assert_eq!(e.status, ExitStatus::Broker);
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        assert!(e.message.contains("--nats"), "{}", e.message);
        let e = start_error(
            RuntimeError::Store(skald_runtime::ports::StoreError::Schema("no table".into())),
            "postgres://skald:dbsecret@h/skald",
            "nats://h:4222",
        );
        assert_eq!(e.status, ExitStatus::Database);
        assert!(!e.message.contains("dbsecret"), "{}", e.message);
        assert!(
            e.message.contains("postgres://skald:***@h/skald"),
            "{}",
            e.message
        );
    }
}
