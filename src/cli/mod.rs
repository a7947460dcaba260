//! The `skald` operator CLI, as a library so a team can build its own binary with its own
//! saga definitions registered (time travel and step names need them):
//!
//! ```no_run
//! use skald::cli::Cli;
//! use skald::prelude::*;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Order { id: String }
//!
//! fn main() -> std::process::ExitCode {
//!     let order_saga = SagaDefinition::<Order>::builder("order", 1)
//!         .step(Step::new("charge").action("skald.cmd.payment.charge", |o: &Order| o.id.clone()))
//!         .build()
//!         .expect("valid");
//!     Cli::new().register(&order_saga).main()
//! }
//! ```
//!
//! It reads the store directly (SQLite or PostgreSQL, never migrating it) and sends
//! operator requests (re-drive, cancel) over NATS to the runtimes, which apply them
//! through the saga's actor, journal and outbox like any reply: durable and audited.
//! docs/operations.md shows every command with its output; the exit codes are
//! [`ExitStatus`]'s.
//!
//! `serve` runs an orchestrator node instead: a runtime with the registered definitions
//! (and upcasters) on `--db` (migrated at start-up) and `--nats`, which applies replies,
//! wake-ups and operator requests and answers start requests until SIGINT or SIGTERM,
//! and starts no sagas itself. A deployment is N such nodes, plus the services that
//! start sagas.
//!
//! Operator requests carry an expiry (`--ttl`, default 10 min, at most 1 h), the saga's
//! re-drive count as the CLI read it (a runtime applies the request only if nobody
//! re-drove the saga since), optionally `--if-version N` (only at that stored version),
//! and, with `--operator-nkey SEED_FILE` (`SKALD_OPERATOR_NKEY`), the operator's NKey
//! signature, which runtimes with an operator allowlist require. NATS authentication and
//! TLS take the flags of [`NatsArgs`], which every skald binary shares.

mod commands;
mod render;
mod transport;

pub use transport::{NatsArgs, NatsArgsError};

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use skald_runtime::definition::{Definition, SagaDefinition};
use skald_runtime::ids::SagaType;
use skald_runtime::ports::StoreError;
use skald_runtime::runtime::RuntimeBuilder;

use crate::telemetry::LogFormat;

/// What the CLI's exit code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum ExitStatus {
    /// It worked.
    Success = 0,
    /// An unexpected failure (a store error during a query, a broken pipe).
    Failure = 1,
    /// Bad usage: an unknown flag, a malformed id, time or duration (clap's code too).
    Usage = 2,
    /// No saga or dead letter with that id.
    NotFound = 3,
    /// The database cannot be used: unreachable, a bad URL, no such file, or not a
    /// skald schema (or another release's).
    Database = 4,
    /// NATS cannot be reached, or refused the connection (authentication, TLS);
    /// operator actions need it.
    Broker = 5,
    /// The action does not apply to the saga as it is (re-driving a saga that is not
    /// dead-lettered, cancelling a finished one), or the runtime refused the request: it
    /// expired (`--ttl`), its condition did not hold (`--if-version`, or the saga was
    /// re-driven since the CLI read it), or its operator is not verified (the runtimes
    /// have an operator allowlist: sign with `--operator-nkey`). Nothing was changed.
    Refused = 6,
    /// The request was sent (it is durable in JetStream) but no runtime applied it
    /// within `--wait`: none is running for that saga type. It is applied when one
    /// starts.
    Pending = 7,
    /// The saga cannot be rebuilt from its journal: its definition (type and version)
    /// is not registered in this CLI, or its journal cannot be replayed.
    CannotReplay = 8,
    /// `replay`: at least one saga would not take the path its journal recorded under
    /// the registered definition; `migrate-payloads`: at least one saga's data could not
    /// be migrated.
    Diverged = 9,
}

/// A failure, with what the exit code says about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// The exit status.
    pub status: ExitStatus,
    /// What went wrong, and what to do about it (stderr).
    pub message: String,
    /// What the command had to show anyway (stdout): the table of requests or replays
    /// some of which did not succeed.
    pub output: String,
}

impl CliError {
    pub(crate) fn new(status: ExitStatus, message: impl Into<String>) -> CliError {
        CliError {
            status,
            message: message.into(),
            output: String::new(),
        }
    }

    pub(crate) fn with_output(mut self, output: String) -> CliError {
        self.output = output;
        self
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> CliError {
        let status = match e {
            StoreError::Unavailable(_) | StoreError::Schema(_) => ExitStatus::Database,
            _ => ExitStatus::Failure,
        };
        CliError::new(status, e.to_string())
    }
}

/// The operator CLI: register the saga definitions your runtimes run, then
/// [`Cli::main`].
#[derive(Debug, Default, Clone)]
pub struct Cli {
    definitions: HashMap<(SagaType, u32), Registered>,
    upcasters: skald_runtime::upcast::Upcasters,
}

/// A registered definition, and how `serve` hands it to a runtime builder (which takes
/// it typed).
#[derive(Clone)]
struct Registered {
    definition: Arc<Definition>,
    register: Arc<dyn Fn(RuntimeBuilder) -> RuntimeBuilder + Send + Sync>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("saga_type", self.definition.saga_type())
            .field("version", &self.definition.version())
            .finish_non_exhaustive()
    }
}

impl Cli {
    /// A CLI that knows no definitions yet (most commands work without them; `at` and
    /// step names need them).
    pub fn new() -> Cli {
        Cli::default()
    }

    /// Registers a definition (every version the runtimes may run): the commands read
    /// sagas with it, and `serve` runs it.
    pub fn register<D: 'static>(mut self, definition: &SagaDefinition<D>) -> Cli {
        let def = Arc::clone(definition.definition());
        let typed = definition.clone();
        let registered = Registered {
            definition: Arc::clone(&def),
            register: Arc::new(move |builder: RuntimeBuilder| builder.register(&typed)),
        };
        self.definitions
            .insert((def.saga_type().clone(), def.version()), registered);
        self
    }

    /// The upcasters the runtimes use (build one [`Upcasters`] and hand it to both, with
    /// `RuntimeBuilder::upcasters`): `at`, `replay` and `migrate-payloads` bring stored
    /// data of older schema versions up with them, and `serve`'s runtime runs with them.
    ///
    /// [`Upcasters`]: skald_runtime::upcast::Upcasters
    pub fn with_upcasters(mut self, upcasters: skald_runtime::upcast::Upcasters) -> Cli {
        self.upcasters = upcasters;
        self
    }

    pub(crate) fn upcasters(&self) -> &skald_runtime::upcast::Upcasters {
        &self.upcasters
    }

    /// Parses the process's arguments, runs the command on a tokio runtime of its own,
    /// prints the result (stdout) or the error (stderr), and returns the exit code.
    pub fn main(self) -> ExitCode {
        self.main_from(std::env::args_os())
    }

    /// Like [`Cli::main`], with the given arguments (the first is the program name).
    pub fn main_from(
        self,
        args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    ) -> ExitCode {
        let args = match Arguments::try_parse_from(args) {
            Ok(a) => a,
            Err(e) => {
                let _ = e.print();
                return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
            }
        };
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        // A node's store and bus I/O runs on this runtime: one worker per core. The other
        // commands make a few queries.
        if !matches!(args.command, Command::Serve(_)) {
            builder.worker_threads(2);
        }
        let runtime = match builder.enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skald: cannot start the async runtime: {e}");
                return ExitCode::from(ExitStatus::Failure as u8);
            }
        };
        let result = runtime.block_on(commands::run(&self, args));
        // Bounded: a task stuck past a command's end (an actor thread that would not
        // join after serve's grace) must not hold the process.
        runtime.shutdown_timeout(Duration::from_secs(5));
        match result {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                print!("{}", e.output);
                eprintln!("skald: {}", e.message);
                ExitCode::from(e.status as u8)
            }
        }
    }

    /// Runs one command (`args` without the program name) on the caller's tokio
    /// runtime and returns what it prints, for embedding and tests.
    pub async fn run<I, T>(&self, args: I) -> Result<String, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args = Arguments::try_parse_from(
            std::iter::once(OsString::from("skald")).chain(args.into_iter().map(Into::into)),
        )
        .map_err(|e| CliError::new(ExitStatus::Usage, e.to_string()))?;
        commands::run(self, args).await
    }

    pub(crate) fn definition(
        &self,
        saga_type: &SagaType,
        version: u32,
    ) -> Option<&Arc<Definition>> {
        self.definitions
            .get(&(saga_type.clone(), version))
            .map(|r| &r.definition)
    }

    /// The registered (type, version) pairs, in order.
    pub(crate) fn registered(&self) -> Vec<(SagaType, u32)> {
        let mut pairs: Vec<(SagaType, u32)> = self.definitions.keys().cloned().collect();
        pairs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()).then(a.1.cmp(&b.1)));
        pairs
    }

    /// `builder` with every registered definition and the upcasters.
    pub(crate) fn register_with(&self, mut builder: RuntimeBuilder) -> RuntimeBuilder {
        for registered in self.definitions.values() {
            builder = (registered.register)(builder);
        }
        builder.upcasters(self.upcasters.clone())
    }
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  an unexpected failure (a store error during a query)
  2  bad usage (unknown flag, malformed id, time or duration)
  3  no saga or dead letter with that id
  4  the database cannot be used: unreachable, bad URL, no such file, no skald schema
     (serve: or its runtime stopped on a schema problem)
  5  NATS cannot be reached or refused the connection (serve, redrive and cancel need
     it)
  6  refused: the action does not apply to the saga as it is, or the runtime refused the
     request (expired, --if-version or a re-drive meanwhile, unverified operator);
     nothing changed
  7  sent, but no runtime applied it within --wait (it stays queued in JetStream)
  8  the saga cannot be rebuilt: its definition is not registered in this CLI
  9  replay: at least one saga diverges from its journal under the registered definition;
     migrate-payloads: at least one saga's data could not be migrated

Durations: 250ms, 30s, 5m, 2h, 7d, 1h30m. Times: RFC 3339 (2026-11-24T03:50:12Z),
milliseconds since the epoch, or a duration ago (-5m).

serve runs until SIGINT or SIGTERM, then stops gracefully and exits 0.

NATS (serve, redrive, cancel): --nats URL (SKALD_NATS; tls:// for TLS), authenticated
with --creds FILE, --nkey SEED_FILE, --user and --password, or --token
(SKALD_NATS_CREDS, _NKEY, _USER, _PASSWORD, _TOKEN); TLS with --tls-ca, --tls-cert and
--tls-key (SKALD_NATS_TLS_CA, _CERT, _KEY). Requests are signed with --operator-nkey
SEED_FILE (SKALD_OPERATOR_NKEY) when given. Prefer the environment to secrets on the
command line; they are never printed.";

/// skald's operator CLI: see, find, re-drive and cancel sagas; run an orchestrator node.
#[derive(Parser)]
#[command(name = "skald", version, after_help = EXIT_CODES)]
pub(crate) struct Arguments {
    /// The store: sqlite://PATH or postgres://USER@HOST:PORT/DB.
    #[arg(
        long,
        global = true,
        env = "SKALD_DB",
        default_value = "sqlite://skald.db"
    )]
    pub(crate) db: String,
    /// NATS, for serve and the commands that send (redrive, cancel): nats://HOST:PORT
    /// (tls:// for TLS), or several seed URLs comma-separated (a cluster). Authenticate
    /// with the flags under "NATS authentication and TLS".
    #[arg(long, global = true, env = "SKALD_NATS")]
    pub(crate) nats: Option<String>,
    #[command(flatten)]
    pub(crate) nats_auth: NatsArgs,
    /// Machine-readable output: one JSON document.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The URLs with their passwords redacted, the secrets hidden ([`NatsArgs`]'s own).
impl std::fmt::Debug for Arguments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arguments")
            .field("db", &skald_adapters::redact_url(&self.db))
            .field(
                "nats",
                &self.nats.as_deref().map(skald_adapters::redact_url),
            )
            .field("nats_auth", &self.nats_auth)
            .field("json", &self.json)
            .field("command", &self.command)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// A table of saga instances, newest first.
    Sagas(SagasArgs),
    /// One saga: its state and data, and its journal as a timeline.
    Show {
        /// The saga id.
        id: String,
    },
    /// Time travel: the saga's state and data as they were at a time, rebuilt from its
    /// journal.
    At {
        /// The saga id.
        id: String,
        /// The time (RFC 3339, epoch milliseconds, or -DURATION for that long ago).
        #[arg(long, allow_hyphen_values = true)]
        time: String,
    },
    /// Replay check before a deploy: re-run sagas' journals through the definitions this
    /// CLI registers and report, per saga, the same path or the first divergence.
    Replay {
        /// One saga.
        #[arg(required_unless_present = "saga_type", conflicts_with = "saga_type")]
        id: Option<String>,
        /// Every saga of this type (in flight: running, compensating or failed; all
        /// with --all).
        #[arg(long = "type")]
        saga_type: Option<String>,
        /// With --type: only sagas on this definition version.
        #[arg(long, requires = "saga_type")]
        version: Option<u32>,
        /// Replay against this definition version instead of each saga's own (can the
        /// sagas of --version move to it?).
        #[arg(long)]
        against: Option<u32>,
        /// With --type: finished sagas too.
        #[arg(long, requires = "saga_type")]
        all: bool,
        /// At most this many sagas.
        #[arg(long, default_value_t = 1_000)]
        limit: usize,
    },
    /// Rewrite stored saga data to its definition's latest schema version with the
    /// registered upcasters, in batches; resumable (what is done stays done) and
    /// idempotent.
    MigratePayloads {
        /// Only this saga type.
        #[arg(long = "type")]
        saga_type: Option<String>,
        /// Count what would be migrated; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Sagas read per batch.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Stop after migrating this many (the rest on the next run).
        #[arg(long)]
        max: Option<u64>,
    },
    /// Dead-lettered sagas and poison messages.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Compensate a running saga (through NATS: the runtime applies it).
    Cancel {
        /// The saga id.
        id: String,
        /// Why (recorded in the journal and the `cancelled` event).
        #[arg(long, default_value = "cancelled by an operator")]
        reason: String,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Sagas whose step has waited much longer than it should have.
    Stuck {
        /// Flag sagas waiting longer than this; default: more than 3 times what their
        /// step waits for (its reply timeout, or its retry delay), and at least 1 s.
        #[arg(long, value_parser = duration_arg)]
        older_than: Option<Duration>,
        /// Only this saga type.
        #[arg(long = "type")]
        saga_type: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Counts per type, version and status; recent throughput; outbox lag; the oldest
    /// active saga.
    Stats {
        /// The window for throughput.
        #[arg(long, default_value = "1m", value_parser = duration_arg)]
        window: Duration,
    },
    /// Run an orchestrator node until SIGINT or SIGTERM; it starts no sagas.
    ///
    /// A runtime with this CLI's definitions on --db (migrated at start-up) and --nats:
    /// it applies the replies, wake-ups and operator requests of their sagas and answers
    /// their start requests, sharing them with every other node on the same database and
    /// NATS. It prints one line on stderr when ready; on SIGINT or SIGTERM it stops
    /// gracefully and exits 0.
    Serve(ServeArgs),
}

/// `serve`'s own flags (the store, NATS and its authentication are the global ones).
/// Defaults are `RuntimeOptions::default()`'s.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464; port 0 picks
    /// a free one, printed when ready). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Log lines on stderr as text or json (RUST_LOG filters; default: info).
    #[arg(long, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub(crate) log_format: LogFormat,
    /// Export traces over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318).
    #[cfg(feature = "otlp")]
    #[arg(long, value_name = "URL")]
    pub(crate) otlp_endpoint: Option<String>,
    /// The prefix of the durable consumers replies and operator requests are read with,
    /// and the queue group of start requests: every node of one deployment uses the
    /// same one.
    #[arg(long, default_value = "skald-orchestrator", value_name = "NAME")]
    pub(crate) reply_group: String,
    /// An active saga's actor leaves memory after this long without input (ms).
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    pub(crate) idle_timeout_ms: u64,
    /// How many partitions the store's sagas are spread over: recorded by the first
    /// node on a store (16 when no node sets it), fixed after (docs/scaling.md).
    #[arg(long, value_name = "N")]
    pub(crate) partitions: Option<u32>,
    /// How long a node's partition leases last without renewal (ms): how soon the other
    /// nodes take over the partitions of a node that died.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    pub(crate) partition_lease_ms: u64,
    /// How long JetStream waits for a node's ack before redelivering (s): how soon the
    /// other nodes take over the replies a killed node held.
    #[arg(long, default_value_t = 30, value_name = "S")]
    pub(crate) ack_wait_secs: u64,
    /// At start-up, wait up to this long for a NATS server that is not up yet (s;
    /// default: fail at once).
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub(crate) nats_wait_secs: u64,
    /// Copies of each skald stream on a NATS cluster (1 to 5). A stream with fewer is
    /// scaled up; one with more is never scaled down from here.
    #[arg(
        long,
        default_value_t = 1,
        value_name = "N",
        env = "SKALD_NATS_REPLICAS"
    )]
    pub(crate) nats_replicas: usize,
}

#[derive(Debug, Args)]
pub(crate) struct SagasArgs {
    /// Only these statuses (running, compensating, completed, compensated, failed);
    /// repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub(crate) status: Vec<String>,
    /// Only this saga type.
    #[arg(long = "type")]
    pub(crate) saga_type: Option<String>,
    /// Only sagas created within this long.
    #[arg(long, value_parser = duration_arg)]
    pub(crate) since: Option<Duration>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: usize,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Dead letters, newest first (open ones unless --all).
    List {
        /// Only this saga type.
        #[arg(long = "type")]
        saga_type: Option<String>,
        /// Include resolved (re-driven) ones.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One dead letter (by its id, or a saga's by the saga id), with the raw message of
    /// a poison one.
    Show {
        /// The dead letter's id or the saga's.
        id: String,
    },
    /// Re-run a dead-lettered saga's failed compensation with a fresh attempt budget.
    Redrive {
        /// The saga id (or its dead letter's id).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead-lettered saga (of --type, if given).
        #[arg(long)]
        all: bool,
        /// With --all: only this saga type.
        #[arg(long = "type", requires = "all")]
        saga_type: Option<String>,
        #[command(flatten)]
        send: SendArgs,
    },
}

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// How long to wait for a runtime to apply the request.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub(crate) wait: Duration,
    /// Who asks (recorded in the request id, in the journal); default: $USER.
    #[arg(long)]
    pub(crate) operator: Option<String>,
    /// Apply only if the saga is still at this stored version (`skald show` prints it):
    /// nothing changed since you looked. One saga only (not with --all).
    #[arg(long, value_name = "N")]
    pub(crate) if_version: Option<u64>,
    /// The request expires this long after it is sent: a runtime that gets it later
    /// (none was running, the broker held it) refuses it. At most 1h.
    #[arg(long, default_value = "10m", value_parser = duration_arg)]
    pub(crate) ttl: Duration,
    /// Sign the request with the NKey user seed (SU...) in this file: the runtimes'
    /// operator allowlist (RuntimeOptions::operators) names the operator's public key
    /// (U...). Required when the runtimes have an allowlist.
    #[arg(long, env = "SKALD_OPERATOR_NKEY", value_name = "SEED_FILE")]
    pub(crate) operator_nkey: Option<std::path::PathBuf>,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    render::parse_duration(s)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Arguments, clap::Error> {
        Arguments::try_parse_from(std::iter::once("skald").chain(args.iter().copied()))
    }

    #[test]
    fn transport_flags_go_before_or_after_the_command() {
        for args in [
            &["--creds", "ops.creds", "--tls-ca", "ca.pem", "cancel", "x"][..],
            &["cancel", "x", "--creds", "ops.creds", "--tls-ca", "ca.pem"],
        ] {
            let a = parse(args).expect("parses");
            assert_eq!(
                a.nats_auth.creds,
                Some(PathBuf::from("ops.creds")),
                "{args:?}"
            );
            assert_eq!(a.nats_auth.tls_ca, Some(PathBuf::from("ca.pem")));
            assert!(a.nats_auth.requires_tls());
        }
        let a = parse(&[
            "dlq",
            "redrive",
            "x",
            "--user",
            "ops",
            "--password",
            "hunter2",
        ])
        .expect("parses");
        assert_eq!(a.nats_auth.user.as_deref(), Some("ops"));
        let shown = format!("{a:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        // Checked by validate (clap misjudges global flags split across levels): a
        // password before the command, its user after it, is a pair.
        let a = parse(&["--password", "hunter2", "cancel", "x", "--user", "ops"]).expect("parses");
        a.nats_auth.validate().expect("a user and a password");
        let a = parse(&["cancel", "x", "--tls-cert", "c.pem"]).expect("parses");
        let e = a.nats_auth.validate().expect_err("no key");
        assert!(e.to_string().contains("--tls-key"), "{e}");
    }

    #[test]
    fn send_flags_have_their_defaults() {
        let a = parse(&["cancel", "x", "--if-version", "7", "--ttl", "90s"]).expect("parses");
        let Command::Cancel { send, .. } = a.command else {
            panic!("not a cancel: {a:?}");
        };
        assert_eq!(send.if_version, Some(7));
        assert_eq!(send.ttl, Duration::from_secs(90));
        let a = parse(&["dlq", "redrive", "x", "--operator-nkey", "ops.nk"]).expect("parses");
        let Command::Dlq(DlqCommand::Redrive { send, .. }) = a.command else {
            panic!("not a redrive: {a:?}");
        };
        assert_eq!(send.ttl, Duration::from_secs(600));
        assert_eq!(send.if_version, None);
        assert_eq!(send.operator_nkey, Some(PathBuf::from("ops.nk")));
        assert!(parse(&["cancel", "x", "--ttl", "10 minutes"]).is_err());
    }

    #[test]
    fn serve_defaults_are_the_runtime_options_defaults() {
        let a = parse(&["serve", "--nats", "nats://h:4222"]).expect("parses");
        assert_eq!(a.nats.as_deref(), Some("nats://h:4222"));
        let Command::Serve(serve) = a.command else {
            panic!("not serve: {a:?}");
        };
        let defaults = skald_runtime::runtime::RuntimeOptions::default();
        assert_eq!(serve.reply_group, defaults.reply_group);
        assert_eq!(
            Duration::from_millis(serve.idle_timeout_ms),
            defaults.idle_timeout
        );
        assert_eq!(
            Duration::from_millis(serve.partition_lease_ms),
            defaults.partition_lease
        );
        assert_eq!(serve.partitions, defaults.partitions);
        let nats = skald_adapters::nats::NatsOptions::new("nats://h:4222");
        assert_eq!(Duration::from_secs(serve.ack_wait_secs), nats.ack_wait);
        assert_eq!(serve.nats_wait_secs, 0);
        assert_eq!(serve.metrics_addr, None);
        assert_eq!(serve.log_format, LogFormat::Text);
        let a = parse(&[
            "serve",
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--reply-group",
            "orders",
            "--idle-timeout-ms",
            "5000",
        ])
        .expect("parses");
        let Command::Serve(serve) = a.command else {
            panic!("not serve: {a:?}");
        };
        assert_eq!(
            serve.metrics_addr,
            Some("127.0.0.1:0".parse().expect("addr"))
        );
        assert_eq!(serve.log_format, LogFormat::Json);
        assert_eq!(serve.reply_group, "orders");
        assert_eq!(serve.idle_timeout_ms, 5000);
        assert_eq!(
            parse(&[
                "serve",
                "--partitions",
                "32",
                "--partition-lease-ms",
                "2000"
            ])
            .map(|a| match a.command {
                Command::Serve(s) => (s.partitions, s.partition_lease_ms),
                _ => (None, 0),
            })
            .ok(),
            Some((Some(32), 2000))
        );
        assert!(parse(&["serve", "--log-format", "yaml"]).is_err());
    }

    #[test]
    fn debug_redacts_the_urls() {
        let a = parse(&[
            "--db",
            "postgres://app:dbsecret@h/skald",
            "--nats",
            "nats://app:natssecret@h:4222",
            "stats",
        ])
        .expect("parses");
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("dbsecret") && !shown.contains("natssecret"),
            "{shown}"
        );
        assert!(shown.contains("postgres://app:***@h/skald"), "{shown}");
    }
}
