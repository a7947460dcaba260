//! The simulated services' records in SQL tables of the runner's database, one table
//! per service, keyed by idempotency key, so they survive a crash and the consistency
//! check can read them.
//!
//! The URL's scheme picks the database ([`open_ledger`]): `sqlite:` gives a
//! [`SqliteLedger`], `postgres:` or `postgresql:` a [`PgLedger`]. Both keep the same
//! three tables with the same columns (`released` and `refunded` are integers, 0 or 1):
//!
//! - `sim_inventory_reservations (key, saga_id, order_id, reservation_id, released)`
//! - `sim_payment_charges (key, saga_id, order_id, payment_id, amount_cents, refunded)`
//! - `sim_shipping_shipments (key, saga_id, order_id, shipment_id)`
//!
//! The SQLite ledger's connection uses `synchronous=NORMAL`: in WAL mode that survives a
//! process crash (kill -9), which is what the simulation needs; skald's own store keeps
//! `synchronous=FULL`.

use std::collections::HashMap;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use skald::adapters::fence::{PgFence, SqliteFence};
use skald::adapters::sqlite::{Durability, SqliteOptions, open_pool};
use skald::ids::SagaId;
use skald::participant::Fence;
use skald_sagas::checkout::{LineItem, SagaRecords};
use skald_sagas::sim::{Ledger, LedgerError, record_id};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

/// The database behind a `--db` URL, chosen by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:` (e.g. `sqlite://skald.db`).
    Sqlite,
    /// `postgres:` or `postgresql:` (e.g. `postgres://user@localhost:5432/skald`).
    Postgres,
}

impl Backend {
    /// The backend of `url`, or an error naming the accepted schemes.
    pub fn of(url: &str) -> anyhow::Result<Backend> {
        let scheme = url
            .split_once(':')
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("sqlite") => Ok(Backend::Sqlite),
            Some("postgres" | "postgresql") => Ok(Backend::Postgres),
            _ => anyhow::bail!(
                "unsupported database URL {:?}: the accepted schemes are sqlite: \
                 (e.g. sqlite://skald.db) and postgres: or postgresql: \
                 (e.g. postgres://user@localhost:5432/skald)",
                redact(url)
            ),
        }
    }
}

pub use skald::adapters::redact_url as redact;

/// Opens the ledger in the database at `url` (SQLite or PostgreSQL, by the scheme),
/// creating its tables if missing.
pub async fn open_ledger(url: &str) -> anyhow::Result<Arc<dyn Ledger>> {
    Ok(match Backend::of(url)? {
        Backend::Sqlite => Arc::new(SqliteLedger::open(url).await?),
        Backend::Postgres => Arc::new(PgLedger::open(url).await?),
    })
}

/// Opens the simulated services' TCC fence (docs/protocol.md) in the database at `url`,
/// beside their records: the `skald_fence` table, created if missing. On SQLite its
/// connection uses the ledger's `synchronous=NORMAL` (crash-safe in WAL mode, which is
/// what the simulation needs), not skald's `FULL`.
pub async fn open_fence(url: &str) -> anyhow::Result<Arc<dyn Fence>> {
    Ok(match Backend::of(url)? {
        Backend::Sqlite => {
            // One connection: every operation is a write transaction, and SQLite's busy
            // handler sleeps (milliseconds) when connections of one pool contend for the
            // write lock; the pool's own queue does not.
            let options = SqliteOptions {
                durability: Durability::Normal,
                max_connections: 1,
                ..SqliteOptions::default()
            };
            let url = fence_file(url);
            let pool = open_pool(&url, &options)
                .await
                .with_context(|| format!("opening the fence's database {}", redact(&url)))?;
            Arc::new(SqliteFence::with_pool(pool).await?.with_lease(FENCE_LEASE))
        }
        Backend::Postgres => Arc::new(
            PgFence::connect(url)
                .await
                .with_context(|| format!("opening the fence's database {}", redact(url)))?
                .with_lease(FENCE_LEASE),
        ),
    })
}

/// How long a simulated service's claim on a key holds: its handlers take milliseconds
/// (a late answer is held after the outcome is recorded, not under the claim), so a
/// claim left by a killed process is taken over well within skald's retry budget even
/// at short step timeouts.
pub const FENCE_LEASE: Duration = Duration::from_secs(5);

/// The SQLite file of the services' fence beside the database at `url`
/// (`sqlite://skald.db` -> `sqlite://skald.fence.db`): SQLite has one writer per file,
/// and the fence's short transactions must not queue behind skald's fsync'd group
/// commits (measured: 192 sagas/s sharing one file, 283 apart, before group commit).
pub fn fence_file(url: &str) -> String {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, format!("?{query}")),
        None => (url, String::new()),
    };
    match path.strip_suffix(".db") {
        Some(stem) => format!("{stem}.fence.db{query}"),
        None => format!("{path}.fence.db{query}"),
    }
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sim_inventory_reservations (
        key TEXT PRIMARY KEY NOT NULL, saga_id TEXT NOT NULL, order_id TEXT NOT NULL,
        reservation_id TEXT NOT NULL UNIQUE, released INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS sim_payment_charges (
        key TEXT PRIMARY KEY NOT NULL, saga_id TEXT NOT NULL, order_id TEXT NOT NULL,
        payment_id TEXT NOT NULL UNIQUE, amount_cents INTEGER NOT NULL, refunded INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS sim_shipping_shipments (
        key TEXT PRIMARY KEY NOT NULL, saga_id TEXT NOT NULL, order_id TEXT NOT NULL,
        shipment_id TEXT NOT NULL UNIQUE)",
];

/// One write of a simulated service.
#[derive(Debug)]
enum Op {
    Reserve {
        key: String,
        saga: String,
        order: String,
        id: String,
    },
    Release {
        action_key: String,
    },
    Charge {
        key: String,
        saga: String,
        order: String,
        id: String,
        amount: i64,
    },
    Refund {
        action_key: String,
    },
    Ship {
        key: String,
        saga: String,
        order: String,
        id: String,
    },
}

struct Request {
    op: Op,
    done: oneshot::Sender<Result<(), LedgerError>>,
}

/// The SQLite ledger. Writes are batched: one writer task commits whatever the three
/// services queued while the previous transaction ran, so the services take SQLite's
/// write lock once per batch instead of once per record (the lock is shared with
/// skald's own store in the same file, and SQLite's busy handler sleeps).
#[derive(Debug, Clone)]
pub struct SqliteLedger {
    pool: SqlitePool,
    writes: mpsc::Sender<Request>,
}

fn err(e: sqlx::Error) -> LedgerError {
    LedgerError(e.to_string())
}

async fn apply(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    op: &Op,
) -> Result<(), sqlx::Error> {
    match op {
        Op::Reserve {
            key,
            saga,
            order,
            id,
        } => sqlx::query(
            "INSERT INTO sim_inventory_reservations (key, saga_id, order_id, reservation_id) \
             VALUES (?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(saga)
        .bind(order)
        .bind(id),
        Op::Release { action_key } => {
            sqlx::query("UPDATE sim_inventory_reservations SET released = 1 WHERE key = ?")
                .bind(action_key)
        }
        Op::Charge {
            key,
            saga,
            order,
            id,
            amount,
        } => sqlx::query(
            "INSERT INTO sim_payment_charges (key, saga_id, order_id, payment_id, amount_cents) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(saga)
        .bind(order)
        .bind(id)
        .bind(*amount),
        Op::Refund { action_key } => {
            sqlx::query("UPDATE sim_payment_charges SET refunded = 1 WHERE key = ?")
                .bind(action_key)
        }
        Op::Ship {
            key,
            saga,
            order,
            id,
        } => sqlx::query(
            "INSERT INTO sim_shipping_shipments (key, saga_id, order_id, shipment_id) \
             VALUES (?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(saga)
        .bind(order)
        .bind(id),
    }
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

async fn writer(pool: SqlitePool, mut rx: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(512);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let result = async {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            for r in &batch {
                apply(&mut tx, &r.op).await?;
            }
            tx.commit().await
        }
        .await;
        let result = result.map_err(err);
        for r in batch.drain(..) {
            let _ = r.done.send(result.clone());
        }
    }
}

impl SqliteLedger {
    /// Opens the ledger tables in the database at `url`, creating them if missing.
    pub async fn open(url: &str) -> anyhow::Result<SqliteLedger> {
        let options = SqliteOptions {
            durability: Durability::Normal,
            ..SqliteOptions::default()
        };
        let pool = open_pool(url, &options)
            .await
            .with_context(|| format!("opening the services' ledger in {}", redact(url)))?;
        for ddl in SCHEMA {
            sqlx::query(*ddl)
                .execute(&pool)
                .await
                .with_context(|| format!("creating the ledger tables in {}", redact(url)))?;
        }
        let (writes, rx) = mpsc::channel(4096);
        tokio::spawn(writer(pool.clone(), rx));
        Ok(SqliteLedger { pool, writes })
    }

    async fn write(&self, op: Op) -> Result<(), LedgerError> {
        let (done, rx) = oneshot::channel();
        self.writes
            .send(Request { op, done })
            .await
            .map_err(|_| LedgerError("the ledger writer stopped".into()))?;
        rx.await
            .map_err(|_| LedgerError("the ledger writer dropped the write".into()))?
    }
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn reserve(
        &self,
        key: &str,
        saga: SagaId,
        order_id: &str,
        _items: &[LineItem],
    ) -> Result<String, LedgerError> {
        let id = record_id("rsv", key);
        self.write(Op::Reserve {
            key: key.into(),
            saga: saga.to_string(),
            order: order_id.into(),
            id: id.clone(),
        })
        .await?;
        Ok(id)
    }

    async fn release(&self, action_key: &str, _saga: SagaId) -> Result<(), LedgerError> {
        self.write(Op::Release {
            action_key: action_key.into(),
        })
        .await
    }

    async fn charge(
        &self,
        key: &str,
        saga: SagaId,
        order_id: &str,
        amount_cents: u64,
    ) -> Result<String, LedgerError> {
        let id = record_id("pay", key);
        let amount = i64::try_from(amount_cents).unwrap_or(i64::MAX);
        self.write(Op::Charge {
            key: key.into(),
            saga: saga.to_string(),
            order: order_id.into(),
            id: id.clone(),
            amount,
        })
        .await?;
        Ok(id)
    }

    async fn refund(&self, action_key: &str, _saga: SagaId) -> Result<(), LedgerError> {
        self.write(Op::Refund {
            action_key: action_key.into(),
        })
        .await
    }

    async fn ship(&self, key: &str, saga: SagaId, order_id: &str) -> Result<String, LedgerError> {
        let id = record_id("shp", key);
        self.write(Op::Ship {
            key: key.into(),
            saga: saga.to_string(),
            order: order_id.into(),
            id: id.clone(),
        })
        .await?;
        Ok(id)
    }

    async fn records(&self) -> Result<HashMap<SagaId, SagaRecords>, LedgerError> {
        let mut out = HashMap::new();
        for (query, count) in RECORD_QUERIES {
            for row in sqlx::query(query)
                .fetch_all(&self.pool)
                .await
                .map_err(err)?
            {
                let saga: String = row.try_get("saga_id").map_err(err)?;
                let flag: i64 = row.try_get("flag").map_err(err)?;
                tally(&mut out, &saga, flag, count)?;
            }
        }
        Ok(out)
    }
}

/// What a row of a ledger table counts as, given its `flag` (released, refunded).
type Count = fn(&mut SagaRecords, bool);

/// What [`Ledger::records`] reads, valid SQL for both databases: (query, what a row
/// counts as).
const RECORD_QUERIES: [(&str, Count); 3] = [
    (
        "SELECT saga_id, CAST(released AS BIGINT) AS flag FROM sim_inventory_reservations",
        SagaRecords::add_reservation,
    ),
    (
        "SELECT saga_id, CAST(refunded AS BIGINT) AS flag FROM sim_payment_charges",
        SagaRecords::add_charge,
    ),
    (
        "SELECT saga_id, CAST(0 AS BIGINT) AS flag FROM sim_shipping_shipments",
        add_shipment,
    ),
];

fn add_shipment(records: &mut SagaRecords, _flag: bool) {
    records.add_shipment();
}

fn tally(
    out: &mut HashMap<SagaId, SagaRecords>,
    saga: &str,
    flag: i64,
    count: Count,
) -> Result<(), LedgerError> {
    let saga = saga
        .parse::<SagaId>()
        .map_err(|e| LedgerError(format!("saga id {saga:?} in the ledger: {e}")))?;
    count(out.entry(saga).or_default(), flag != 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

const PG_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sim_inventory_reservations (
        key TEXT PRIMARY KEY NOT NULL, saga_id TEXT NOT NULL, order_id TEXT NOT NULL,
        reservation_id TEXT NOT NULL UNIQUE, released INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS sim_payment_charges (
        key TEXT PRIMARY KEY NOT NULL, saga_id TEXT NOT NULL, order_id TEXT NOT NULL,
        payment_id TEXT NOT NULL UNIQUE, amount_cents BIGINT NOT NULL, refunded INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS sim_shipping_shipments (
        key TEXT PRIMARY KEY NOT NULL, saga_id TEXT NOT NULL, order_id TEXT NOT NULL,
        shipment_id TEXT NOT NULL UNIQUE)",
];

/// The advisory lock that serialises the ledger's DDL across processes: two
/// participants creating the tables at once would otherwise race (`CREATE TABLE IF NOT
/// EXISTS` is not atomic in PostgreSQL: the loser fails on `pg_type`'s unique index).
const PG_DDL_LOCK: i64 = 0x736b_616c_645f_6c67; // "skald_lg"

/// The PostgreSQL ledger. PostgreSQL handles concurrent writers, so every operation is
/// one statement on the pool (autocommit), with no batching.
#[derive(Debug, Clone)]
pub struct PgLedger {
    pool: PgPool,
}

impl PgLedger {
    /// Connects to the database at `url` and creates the ledger tables if missing.
    /// A server that refuses connections (not up yet) is retried for up to 30 s.
    pub async fn open(url: &str) -> anyhow::Result<PgLedger> {
        const WAIT: Duration = Duration::from_secs(30);
        let options = PgConnectOptions::from_str(url)
            .with_context(|| format!("invalid PostgreSQL URL {}", redact(url)))?;
        let pool = match PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(WAIT)
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => pool,
            // The pool retries a refused connection until the timeout, then reports only
            // the timeout: one more direct attempt says why.
            Err(sqlx::Error::PoolTimedOut) => {
                let why = match PgConnection::connect_with(&options).await {
                    Err(e) => e.to_string(),
                    Ok(conn) => {
                        let _ = conn.close().await;
                        "the server answered only after the timeout".into()
                    }
                };
                anyhow::bail!(
                    "connecting the services' ledger to {}: no connection within {} s: {why}",
                    redact(url),
                    WAIT.as_secs()
                );
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("connecting the services' ledger to {}", redact(url))
                });
            }
        };
        create_pg_schema(&pool)
            .await
            .with_context(|| format!("creating the ledger tables in {}", redact(url)))?;
        Ok(PgLedger { pool })
    }

    async fn execute(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<(), LedgerError> {
        query.execute(&self.pool).await.map(|_| ()).map_err(err)
    }
}

async fn create_pg_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // No "relation ... already exists, skipping" notices in the logs.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PG_DDL_LOCK)
        .execute(&mut *tx)
        .await?;
    for ddl in PG_SCHEMA {
        sqlx::query(*ddl).execute(&mut *tx).await?;
    }
    tx.commit().await
}

#[async_trait]
impl Ledger for PgLedger {
    async fn reserve(
        &self,
        key: &str,
        saga: SagaId,
        order_id: &str,
        _items: &[LineItem],
    ) -> Result<String, LedgerError> {
        let id = record_id("rsv", key);
        self.execute(
            sqlx::query(
                "INSERT INTO sim_inventory_reservations (key, saga_id, order_id, reservation_id) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(saga.to_string())
            .bind(order_id)
            .bind(&id),
        )
        .await?;
        Ok(id)
    }

    async fn release(&self, action_key: &str, _saga: SagaId) -> Result<(), LedgerError> {
        self.execute(
            sqlx::query("UPDATE sim_inventory_reservations SET released = 1 WHERE key = $1")
                .bind(action_key),
        )
        .await
    }

    async fn charge(
        &self,
        key: &str,
        saga: SagaId,
        order_id: &str,
        amount_cents: u64,
    ) -> Result<String, LedgerError> {
        let id = record_id("pay", key);
        let amount = i64::try_from(amount_cents).unwrap_or(i64::MAX);
        self.execute(
            sqlx::query(
                "INSERT INTO sim_payment_charges (key, saga_id, order_id, payment_id, amount_cents) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(saga.to_string())
            .bind(order_id)
            .bind(&id)
            .bind(amount),
        )
        .await?;
        Ok(id)
    }

    async fn refund(&self, action_key: &str, _saga: SagaId) -> Result<(), LedgerError> {
        self.execute(
            sqlx::query("UPDATE sim_payment_charges SET refunded = 1 WHERE key = $1")
                .bind(action_key),
        )
        .await
    }

    async fn ship(&self, key: &str, saga: SagaId, order_id: &str) -> Result<String, LedgerError> {
        let id = record_id("shp", key);
        self.execute(
            sqlx::query(
                "INSERT INTO sim_shipping_shipments (key, saga_id, order_id, shipment_id) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(saga.to_string())
            .bind(order_id)
            .bind(&id),
        )
        .await?;
        Ok(id)
    }

    async fn records(&self) -> Result<HashMap<SagaId, SagaRecords>, LedgerError> {
        let mut out = HashMap::new();
        for (query, count) in RECORD_QUERIES {
            for row in sqlx::query(query)
                .fetch_all(&self.pool)
                .await
                .map_err(err)?
            {
                let saga: String = row.try_get("saga_id").map_err(err)?;
                let flag: i64 = row.try_get("flag").map_err(err)?;
                tally(&mut out, &saga, flag, count)?;
            }
        }
        Ok(out)
    }
}
