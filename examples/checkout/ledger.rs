//! The simulated services' records in SQL tables of the runner's database, one table
//! per service, keyed by idempotency key, so they survive a crash and the consistency
//! check can read them.
//!
//! The ledger's connection uses `synchronous=NORMAL`: in WAL mode that survives a
//! process crash (kill -9), which is what the simulation needs; skald's own store keeps
//! `synchronous=FULL`.

use std::collections::HashMap;

use async_trait::async_trait;
use skald::adapters::sqlite::{Durability, SqliteOptions, open_pool};
use skald::ids::SagaId;
use skald::sagas::checkout::{LineItem, SagaRecords};
use skald::sagas::sim::{Ledger, LedgerError, record_id};
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

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
        reservation_id: String,
    },
    Charge {
        key: String,
        saga: String,
        order: String,
        id: String,
        amount: i64,
    },
    Refund {
        payment_id: String,
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
        Op::Release { reservation_id } => sqlx::query(
            "UPDATE sim_inventory_reservations SET released = 1 WHERE reservation_id = ?",
        )
        .bind(reservation_id),
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
        Op::Refund { payment_id } => {
            sqlx::query("UPDATE sim_payment_charges SET refunded = 1 WHERE payment_id = ?")
                .bind(payment_id)
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
        let pool = open_pool(url, &options).await?;
        for ddl in SCHEMA {
            sqlx::query(*ddl).execute(&pool).await?;
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

    async fn release(
        &self,
        _key: &str,
        _saga: SagaId,
        reservation_id: &str,
    ) -> Result<(), LedgerError> {
        self.write(Op::Release {
            reservation_id: reservation_id.into(),
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

    async fn refund(&self, _key: &str, _saga: SagaId, payment_id: &str) -> Result<(), LedgerError> {
        self.write(Op::Refund {
            payment_id: payment_id.into(),
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
        let mut out: HashMap<SagaId, SagaRecords> = HashMap::new();
        // (query, what to count for a row whose flag column is `flag`)
        let tables: [(&str, fn(&mut SagaRecords, bool)); 3] = [
            (
                "SELECT saga_id, released AS flag FROM sim_inventory_reservations",
                SagaRecords::add_reservation,
            ),
            (
                "SELECT saga_id, refunded AS flag FROM sim_payment_charges",
                SagaRecords::add_charge,
            ),
            (
                "SELECT saga_id, 0 AS flag FROM sim_shipping_shipments",
                |r, _| r.add_shipment(),
            ),
        ];
        for (query, count) in tables {
            for row in sqlx::query(query)
                .fetch_all(&self.pool)
                .await
                .map_err(err)?
            {
                let saga: String = row.try_get("saga_id").map_err(err)?;
                let saga = saga
                    .parse::<SagaId>()
                    .map_err(|e| LedgerError(e.to_string()))?;
                let flag: i64 = row.try_get("flag").map_err(err)?;
                count(out.entry(saga).or_default(), flag != 0);
            }
        }
        Ok(out)
    }
}
