//! Starting a saga inside the caller's own sqlx transaction (PostgreSQL and SQLite): an
//! order row and its checkout saga commit together or not at all, and the first command
//! goes out through the outbox only after the commit.
//!
//! Each test runs on PostgreSQL + NATS JetStream (the production configuration) and on
//! SQLite + the in-process bus (the embedded default). The application writes through a
//! pool of its own on the runtime's database (PostgreSQL: the same database; SQLite:
//! the same file), as a service would.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use skald::adapters::postgres::{PostgresStore, TxStart};
use skald::adapters::sqlite::{self, SqliteOptions, SqliteStore};
use skald::definition::SagaDefinition;
use skald::ids::SagaId;
use skald::machine::{Input, SagaStatus};
use skald::participant::ParticipantHandle;
use skald::ports::{SagaStore, SagaWrite};
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{Checkout, checkout_definition};
use skald_sagas::sim::MemoryLedger;

/// How often the outbox relay polls in these tests (500 ms by default).
const RELAY_POLL: Duration = Duration::from_millis(50);

/// The application's own pool on the runtime's database, with its `orders` table.
enum App {
    Pg(sqlx::PgPool),
    Lite(sqlx::SqlitePool),
}

/// One transaction of the application.
enum Tx {
    Pg(sqlx::Transaction<'static, sqlx::Postgres>),
    Lite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl App {
    async fn open(resources: &Resources) -> App {
        match resources.kind {
            Backend::PostgresNats => {
                let url = resources.pg.as_ref().expect("a PostgreSQL database").url();
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .connect(&url)
                    .await
                    .expect("the application's pool on skald's database");
                sqlx::query(
                    "CREATE TABLE orders (id text PRIMARY KEY, amount_cents bigint NOT NULL)",
                )
                .execute(&pool)
                .await
                .expect("create orders");
                App::Pg(pool)
            }
            Backend::SqliteInProcess | Backend::SqliteNats => {
                // WAL and a busy timeout, as the store's own pool.
                let pool =
                    sqlite::open_pool(&resources.dir.sqlite_url(), &SqliteOptions::default())
                        .await
                        .expect("the application's pool on skald's file");
                sqlx::query(
                    "CREATE TABLE orders (id TEXT PRIMARY KEY, amount_cents INTEGER NOT NULL)",
                )
                .execute(&pool)
                .await
                .expect("create orders");
                App::Lite(pool)
            }
            Backend::MemoryInProcess => panic!("a transactional start needs a SQL store"),
        }
    }

    async fn begin(&self) -> Tx {
        match self {
            App::Pg(pool) => Tx::Pg(pool.begin().await.expect("begin")),
            // Take SQLite's write lock up front (as SqliteStore::start_in advises).
            App::Lite(pool) => Tx::Lite(
                pool.begin_with("BEGIN IMMEDIATE")
                    .await
                    .expect("begin immediate"),
            ),
        }
    }

    /// Committed order rows with id `id`.
    async fn orders(&self, id: &str) -> i64 {
        match self {
            App::Pg(pool) => sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .expect("count orders"),
            App::Lite(pool) => sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE id = ?")
                .bind(id)
                .fetch_one(pool)
                .await
                .expect("count orders"),
        }
    }
}

impl Tx {
    async fn insert_order(&mut self, id: &str, amount_cents: u64) {
        let amount = i64::try_from(amount_cents).expect("an amount");
        match self {
            Tx::Pg(tx) => sqlx::query("INSERT INTO orders (id, amount_cents) VALUES ($1, $2)")
                .bind(id)
                .bind(amount)
                .execute(&mut **tx)
                .await
                .map(drop),
            Tx::Lite(tx) => sqlx::query("INSERT INTO orders (id, amount_cents) VALUES (?, ?)")
                .bind(id)
                .bind(amount)
                .execute(&mut **tx)
                .await
                .map(drop),
        }
        .expect("insert the order");
    }

    /// The saga's start, written in this transaction.
    async fn start_in(&mut self, start: &impl AsRef<SagaWrite>) -> TxStart {
        match self {
            Tx::Pg(tx) => PostgresStore::start_in(tx, start).await,
            Tx::Lite(tx) => SqliteStore::start_in(tx, start).await,
        }
        .expect("the start is written")
    }

    /// Order rows and journal entries of saga `saga` as this transaction sees them: a
    /// query that works only while the transaction is usable.
    async fn rows(&mut self, saga: SagaId) -> (i64, i64) {
        let saga = saga.to_string();
        match self {
            Tx::Pg(tx) => {
                sqlx::query_as(
                    "SELECT (SELECT COUNT(*) FROM orders), \
                     (SELECT COUNT(*) FROM saga_journal WHERE saga_id = $1::uuid)",
                )
                .bind(saga)
                .fetch_one(&mut **tx)
                .await
            }
            Tx::Lite(tx) => {
                sqlx::query_as(
                    "SELECT (SELECT COUNT(*) FROM orders), \
                     (SELECT COUNT(*) FROM saga_journal WHERE saga_id = ?)",
                )
                .bind(saga)
                .fetch_one(&mut **tx)
                .await
            }
        }
        .expect("the transaction is usable")
    }

    async fn commit(self) {
        match self {
            Tx::Pg(tx) => tx.commit().await,
            Tx::Lite(tx) => tx.commit().await,
        }
        .expect("commit");
    }

    async fn rollback(self) {
        match self {
            Tx::Pg(tx) => tx.rollback().await,
            Tx::Lite(tx) => tx.rollback().await,
        }
        .expect("rollback");
    }
}

/// A runtime with the checkout saga, its participants (which note the saga of every
/// command they receive) and the application's pool, on `backend`.
struct Env {
    runtime: Runtime,
    checkout: SagaDefinition<Checkout>,
    store: Arc<dyn SagaStore>,
    app: App,
    /// The saga of every command a participant received, in order.
    seen: Arc<Mutex<Vec<SagaId>>>,
    _participants: Vec<ParticipantHandle>,
    _resources: Resources,
}

impl Env {
    async fn start(backend: Backend) -> Env {
        let resources = Resources::new(backend).await;
        let app = App::open(&resources).await;
        let bus = resources.bus().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let noted = Arc::clone(&seen);
        let script: Script = Arc::new(move |cmd| {
            noted.lock().expect("seen").push(cmd.envelope.saga_id);
            None
        });
        let participants = start_participants(
            Arc::clone(&bus),
            MemoryLedger::new(),
            reliable(),
            script,
            ALL_SERVICES,
        )
        .await;
        let checkout = checkout_definition(fast_timing()).expect("valid definition");
        let store = Arc::clone(&resources.store);
        let runtime = Runtime::builder()
            .store(Arc::clone(&store))
            .bus(bus)
            .register(&checkout)
            .options(RuntimeOptions {
                outbox_poll_interval: RELAY_POLL,
                ..options()
            })
            .reply_keys(test_reply_keys())
            .start()
            .await
            .expect("runtime starts");
        Env {
            runtime,
            checkout,
            store,
            app,
            seen,
            _participants: participants,
            _resources: resources,
        }
    }

    fn seen(&self) -> Vec<SagaId> {
        self.seen.lock().expect("seen").clone()
    }

    /// Places order `id` and starts its checkout saga in one transaction, committed.
    async fn place(&self, id: &str, key: Option<&str>) -> skald::SagaHandle<Checkout> {
        let order = tea_order(id);
        let start = match key {
            Some(key) => self
                .runtime
                .prepare_start_keyed(&self.checkout, key, &order),
            None => self.runtime.prepare_start(&self.checkout, &order),
        }
        .expect("prepared");
        let mut tx = self.app.begin().await;
        tx.insert_order(id, order.amount_cents).await;
        assert_eq!(tx.start_in(&start).await, TxStart::Written(start.id()));
        tx.commit().await;
        self.runtime.started(start)
    }

    /// Stops the runtime.
    async fn shutdown(self) {
        self.runtime.shutdown().await;
    }
}

/// Committed: the saga runs to completion (its first command sent by the outbox relay
/// after the commit), and the order row is there.
async fn a_committed_start_runs_to_completion_with_its_order(backend: Backend) {
    let env = Env::start(backend).await;
    let order = tea_order("order-1");
    let start = env
        .runtime
        .prepare_start(&env.checkout, &order)
        .expect("prepared");
    let id = start.id();
    // Its first command is an outbox row the relay may take at once: no writer holds it.
    let write = start.write();
    let created = write.state.as_ref().expect("a new saga's state");
    assert!(
        write
            .outbox
            .iter()
            .any(|r| r.message.subject.starts_with("skald.cmd.")),
        "{write:?}"
    );
    assert!(
        write
            .outbox
            .iter()
            .all(|r| r.available_at <= created.updated_at),
        "{write:?}"
    );
    let mut tx = env.app.begin().await;
    tx.insert_order(&order.order_id, order.amount_cents).await;
    assert_eq!(tx.start_in(&start).await, TxStart::Written(id));
    assert_eq!(
        tx.rows(id).await,
        (1, 1),
        "the order and the start's journal entry"
    );
    // Nothing is visible outside the transaction before it commits.
    assert!(env.store.load(id).await.expect("load").is_none());
    tx.commit().await;

    let handle = env.runtime.started(start);
    assert_eq!(handle.id(), id);
    assert!(!handle.existing());
    let outcome = handle.outcome_within(DEADLINE).await.expect("an outcome");
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert!(outcome.data.shipment_id.is_some(), "{outcome:?}");
    assert_eq!(env.app.orders(&order.order_id).await, 1);
    let journal = journal_inputs(env.store.as_ref(), id).await;
    assert_eq!(
        journal.first().map(String::as_str),
        Some(Input::Started.name())
    );
    // The three steps' commands, all of this saga.
    let seen = env.seen();
    assert_eq!(seen, vec![id; 3], "commands received");
    assert!(
        env.runtime.stats().relayed >= 1,
        "the first command went by the relay"
    );
    drop(handle);
    env.shutdown().await;
}

/// Rolled back: no order, no saga, no journal, no outbox row, and no command sent. A
/// saga committed after it then runs to completion: the relay, which publishes rows in
/// commit order, has passed where the rolled-back start's rows would have been.
async fn a_rolled_back_start_leaves_no_saga_and_sends_nothing(backend: Backend) {
    let env = Env::start(backend).await;
    let order = tea_order("order-rolled-back");
    let start = env
        .runtime
        .prepare_start(&env.checkout, &order)
        .expect("prepared");
    let id = start.id();
    let mut tx = env.app.begin().await;
    tx.insert_order(&order.order_id, order.amount_cents).await;
    assert_eq!(tx.start_in(&start).await, TxStart::Written(id));
    tx.rollback().await;

    assert_eq!(env.app.orders(&order.order_id).await, 0);
    assert!(env.store.load(id).await.expect("load").is_none(), "no saga");
    assert!(env.store.journal(id).await.expect("journal").is_empty());
    assert_eq!(
        env.store.outbox_backlog().await.expect("backlog"),
        (0, None),
        "no outbox row"
    );
    // A handle to it knows no such saga.
    let ghost = env.runtime.saga(&env.checkout, id);
    assert!(
        matches!(ghost.status().await, Err(skald::RuntimeError::UnknownSaga(g)) if g == id),
        "the rolled-back saga is unknown"
    );

    let later = env.place("order-after", None).await;
    let outcome = later.outcome_within(DEADLINE).await.expect("an outcome");
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert_eq!(
        env.seen(),
        vec![later.id(); 3],
        "only the committed saga's commands"
    );
    assert_eq!(env.runtime.stats().commands_sent, 3);
    assert!(env.store.load(id).await.expect("load").is_none());
    drop((ghost, later));
    env.shutdown().await;
}

/// A keyed start whose key is used finds the saga existing: nothing is written, the
/// caller's transaction stays usable (and is rolled back here), the saga is untouched.
async fn a_used_key_is_reported_existing_and_the_transaction_stays_usable(backend: Backend) {
    let env = Env::start(backend).await;
    let first = env.place("order-7", Some("order-7")).await;
    let outcome = first.outcome_within(DEADLINE).await.expect("an outcome");
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    let before = env
        .store
        .load(first.id())
        .await
        .expect("load")
        .expect("the first saga");
    let journal = env.store.journal(first.id()).await.expect("journal").len();

    // The same key, other data (and another order row).
    let mut again = tea_order("order-7-again");
    again.amount_cents += 1;
    let start = env
        .runtime
        .prepare_start_keyed(&env.checkout, "order-7", &again)
        .expect("prepared");
    assert_eq!(start.id(), first.id(), "one saga per key");
    let mut tx = env.app.begin().await;
    tx.insert_order(&again.order_id, again.amount_cents).await;
    let answer = tx.start_in(&start).await;
    assert_eq!(answer, TxStart::Existing(first.id()));
    assert!(answer.is_existing());
    // Still usable: it sees its own order row, and no journal entry was added.
    let journal_in_tx = i64::try_from(journal).expect("a count");
    assert_eq!(tx.rows(first.id()).await, (2, journal_in_tx));
    tx.rollback().await;

    assert_eq!(env.app.orders(&again.order_id).await, 0);
    assert_eq!(env.app.orders("order-7").await, 1);
    let after = env
        .store
        .load(first.id())
        .await
        .expect("load")
        .expect("the first saga");
    assert_eq!(after, before, "the existing saga is untouched");
    assert_eq!(
        env.store.journal(first.id()).await.expect("journal").len(),
        journal
    );
    let existing = env.runtime.saga(&env.checkout, first.id());
    assert_eq!(
        existing.data().await.expect("data").amount_cents,
        tea_order("order-7").amount_cents,
        "the first start's data"
    );
    assert_eq!(
        env.seen(),
        vec![first.id(); 3],
        "no command for the second start"
    );
    drop((first, existing));
    env.shutdown().await;
}

/// Committed, and the process that wrote it never called `started` (it crashed right
/// after the commit): the relay alone sends the first command (on its next poll, nobody
/// nudging it), and the saga runs to completion; a handle made from the id answers.
async fn a_committed_start_goes_out_without_started(backend: Backend) {
    let env = Env::start(backend).await;
    let order = tea_order("order-crash");
    let start = env
        .runtime
        .prepare_start(&env.checkout, &order)
        .expect("prepared");
    let id = start.id();
    let mut tx = env.app.begin().await;
    tx.insert_order(&order.order_id, order.amount_cents).await;
    assert_eq!(tx.start_in(&start).await, TxStart::Written(id));
    tx.commit().await;
    drop(start);
    let outcome = env
        .runtime
        .saga(&env.checkout, id)
        .outcome_within(DEADLINE)
        .await
        .expect("an outcome");
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert_eq!(env.seen(), vec![id; 3], "commands received");
    env.shutdown().await;
}

/// Two transactions start the same key at once (PostgreSQL): the second waits for the
/// first; if the first commits, the second is answered `Existing`, and if it rolls back,
/// the second writes the saga. One saga either way.
async fn the_same_key_in_two_open_transactions(first_commits: bool) {
    let env = Env::start(Backend::PostgresNats).await;
    let key = if first_commits { "order-9" } else { "order-10" };
    let start1 = env
        .runtime
        .prepare_start_keyed(&env.checkout, key, &tea_order(key))
        .expect("prepared");
    let start2 = env
        .runtime
        .prepare_start_keyed(&env.checkout, key, &tea_order(key))
        .expect("prepared");
    let id = start1.id();
    let mut tx1 = env.app.begin().await;
    assert_eq!(tx1.start_in(&start1).await, TxStart::Written(id));
    let mut tx2 = env.app.begin().await;
    let second = tokio::spawn(async move {
        let answer = tx2.start_in(&start2).await;
        (answer, tx2, start2)
    });
    if first_commits {
        tx1.commit().await;
    } else {
        tx1.rollback().await;
    }
    let (answer, tx2, start2) = tokio::time::timeout(DEADLINE, second)
        .await
        .expect("the second transaction is answered once the first ends")
        .expect("joins");
    let handle = if first_commits {
        assert_eq!(answer, TxStart::Existing(id));
        tx2.rollback().await;
        env.runtime.started(start1)
    } else {
        assert_eq!(answer, TxStart::Written(id));
        tx2.commit().await;
        env.runtime.started(start2)
    };
    let outcome = handle.outcome_within(DEADLINE).await.expect("an outcome");
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert_eq!(env.seen(), vec![id; 3], "one saga's commands");
    env.shutdown().await;
}

mod postgres_nats {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_key_in_two_open_transactions_the_first_committing() {
        super::the_same_key_in_two_open_transactions(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_key_in_two_open_transactions_the_first_rolling_back() {
        super::the_same_key_in_two_open_transactions(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_start_goes_out_without_started() {
        super::a_committed_start_goes_out_without_started(super::Backend::PostgresNats).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_start_runs_to_completion_with_its_order() {
        super::a_committed_start_runs_to_completion_with_its_order(super::Backend::PostgresNats)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolled_back_start_leaves_no_saga_and_sends_nothing() {
        super::a_rolled_back_start_leaves_no_saga_and_sends_nothing(super::Backend::PostgresNats)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_used_key_is_reported_existing_and_the_transaction_stays_usable() {
        super::a_used_key_is_reported_existing_and_the_transaction_stays_usable(
            super::Backend::PostgresNats,
        )
        .await
    }
}

mod sqlite_in_process {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_start_goes_out_without_started() {
        super::a_committed_start_goes_out_without_started(super::Backend::SqliteInProcess).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_start_runs_to_completion_with_its_order() {
        super::a_committed_start_runs_to_completion_with_its_order(super::Backend::SqliteInProcess)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolled_back_start_leaves_no_saga_and_sends_nothing() {
        super::a_rolled_back_start_leaves_no_saga_and_sends_nothing(super::Backend::SqliteInProcess)
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_used_key_is_reported_existing_and_the_transaction_stays_usable() {
        super::a_used_key_is_reported_existing_and_the_transaction_stays_usable(
            super::Backend::SqliteInProcess,
        )
        .await
    }
}
