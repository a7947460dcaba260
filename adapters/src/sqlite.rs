//! The SQLite store: skald's embedded default, one file, WAL mode.
//!
//! Durability: `journal_mode=WAL` with `synchronous=FULL` by default (every commit is
//! fsync'd; a power loss loses nothing acknowledged). Writes come through the runtime's
//! group-commit loop, so one fsync covers many sagas' transitions.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use skald_runtime::ids::{CommandKind, SagaId, SagaType};
use skald_runtime::machine::{SagaState, SagaStatus, Timestamp};
use skald_runtime::ports::{
    DeadLetterCategory, DeadLetterRecord, JournalEntry, SagaStore, SagaSummary, SagaWrite,
    StoreError, StoredSaga, WriteOutcome,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use uuid::Uuid;

/// The embedded migrations (`migrations/sqlite`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// How durable a commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: each commit is fsync'd (default).
    #[default]
    Full,
    /// `synchronous=NORMAL`: survives a process crash, may lose the last commits on a
    /// power loss or OS crash.
    Normal,
}

/// Options of [`SqliteStore::connect_with`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Durability of commits. Default: [`Durability::Full`].
    pub durability: Durability,
    /// Pool size (reads run in parallel; writes are serialised by SQLite). Default: 4.
    pub max_connections: u32,
    /// How long a statement waits for a lock. Default: 10 s.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::Full,
            max_connections: 4,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// The SQLite saga store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

/// Maps a sqlx error to the port's error at the boundary.
pub fn store_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes (low byte).
            let primary = db
                .code()
                .and_then(|c| c.parse::<i64>().ok())
                .map(|c| c & 0xff);
            if matches!(primary, Some(5 | 6)) {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Other(e.to_string())
            }
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Other(e.to_string()),
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

fn ts(ms: i64) -> Timestamp {
    Timestamp(u64::try_from(ms).unwrap_or(0))
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://skald.db`,
    /// `sqlite::memory:`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<SqliteStore, StoreError> {
        SqliteStore::connect_with(url, SqliteOptions::default()).await
    }

    /// Like [`SqliteStore::connect`], with options.
    pub async fn connect_with(
        url: &str,
        options: SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        let pool = open_pool(url, &options).await?;
        MIGRATOR.run(&pool).await.map_err(|e| {
            StoreError::Schema(format!(
                "applying the SQLite migrations to {url} failed: {e}"
            ))
        })?;
        Ok(SqliteStore { pool })
    }

    /// The connection pool (other components of a process may share the file).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Counts of sagas per type and status.
    pub async fn counts(&self) -> Result<Vec<(String, SagaStatus, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT saga_type, status, COUNT(*) AS n FROM saga_instances GROUP BY saga_type, status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|r| {
                let status: String = r.try_get("status").map_err(store_error)?;
                let n: i64 = r.try_get("n").map_err(store_error)?;
                Ok((
                    r.try_get("saga_type").map_err(store_error)?,
                    SagaStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
                    u64::try_from(n).unwrap_or(0),
                ))
            })
            .collect()
    }
}

/// Opens a WAL-mode pool on `url` without applying migrations (for components that keep
/// their own tables in the same file).
pub async fn open_pool(url: &str, options: &SqliteOptions) -> Result<SqlitePool, StoreError> {
    let connect = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Schema(format!("invalid SQLite URL {url:?}: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match options.durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(options.busy_timeout)
        .foreign_keys(true);
    SqlitePoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(connect)
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {url:?}: {e}")))
}

fn decode_state(row: &SqliteRow) -> Result<StoredSaga, StoreError> {
    let state: String = row.try_get("state").map_err(store_error)?;
    let version: i64 = row.try_get("version").map_err(store_error)?;
    let state: SagaState = serde_json::from_str(&state).map_err(|e| corrupt("saga state", e))?;
    Ok(StoredSaga {
        state,
        version: u64::try_from(version).map_err(|e| corrupt("version", e))?,
    })
}

fn parse_id(s: &str) -> Result<SagaId, StoreError> {
    s.parse().map_err(|e| corrupt("saga id", e))
}

async fn apply_write(
    tx: &mut Transaction<'static, Sqlite>,
    w: &SagaWrite,
) -> Result<WriteOutcome, StoreError> {
    let id = w.id.to_string();
    let version = match &w.state {
        Some(state) => {
            let json =
                serde_json::to_string(state).map_err(|e| StoreError::Other(e.to_string()))?;
            let wake = state.wake_at().map(ms);
            let next = i64::try_from(w.expected_version + 1).map_err(|e| corrupt("version", e))?;
            let affected = if w.expected_version == 0 {
                sqlx::query(
                    "INSERT INTO saga_instances (id, saga_type, definition_version, status, version, \
                     state, next_wakeup_ms, created_at_ms, updated_at_ms) \
                     VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&id)
                .bind(state.saga_type.as_str())
                .bind(i64::from(state.definition_version))
                .bind(state.status.as_str())
                .bind(&json)
                .bind(wake)
                .bind(ms(state.created_at))
                .bind(ms(state.updated_at))
                .execute(&mut **tx)
                .await
            } else {
                sqlx::query(
                    "UPDATE saga_instances SET status = ?, version = ?, state = ?, next_wakeup_ms = ?, \
                     updated_at_ms = ? WHERE id = ? AND version = ?",
                )
                .bind(state.status.as_str())
                .bind(next)
                .bind(&json)
                .bind(wake)
                .bind(ms(state.updated_at))
                .bind(&id)
                .bind(next - 1)
                .execute(&mut **tx)
                .await
            }
            .map_err(store_error)?
            .rows_affected();
            if affected == 0 {
                return Ok(WriteOutcome::Conflict);
            }
            w.expected_version + 1
        }
        None => {
            // Journal only (an ignored input): the decision to ignore was taken on the
            // version the writer read, so it must still be the current one; otherwise a
            // stale actor could swallow a reply the saga now waits for.
            let current: Option<i64> =
                sqlx::query_scalar("SELECT version FROM saga_instances WHERE id = ?")
                    .bind(&id)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(store_error)?;
            if current.and_then(|v| u64::try_from(v).ok()) != Some(w.expected_version) {
                return Ok(WriteOutcome::Conflict);
            }
            w.expected_version
        }
    };
    for entry in &w.journal {
        let body =
            serde_json::to_string(&entry.body).map_err(|e| StoreError::Other(e.to_string()))?;
        sqlx::query(
            "INSERT INTO saga_journal (saga_id, at_ms, schema_version, kind, body) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(ms(entry.at))
        .bind(i64::from(entry.schema_version))
        .bind(&entry.kind)
        .bind(body)
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
    }
    if w.resolve_dead_letters {
        let now = w.journal.first().map(|j| j.at).unwrap_or_default();
        sqlx::query(
            "UPDATE dead_letters SET resolved_at_ms = ? \
             WHERE saga_id = ? AND category = 'saga' AND resolved_at_ms IS NULL",
        )
        .bind(ms(now))
        .bind(&id)
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
    }
    if let Some(dl) = &w.dead_letter {
        insert_dead_letter(&mut **tx, dl).await?;
    }
    Ok(WriteOutcome::Committed { version })
}

async fn insert_dead_letter<'e, E>(exec: E, dl: &DeadLetterRecord) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let message = dl
        .message
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Other(e.to_string()))?;
    sqlx::query(
        "INSERT INTO dead_letters (id, category, saga_id, saga_type, step, kind, reason, attempts, \
         message, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(dl.id.to_string())
    .bind(dl.category.as_str())
    .bind(dl.saga_id.map(|s| s.to_string()))
    .bind(dl.saga_type.as_deref())
    .bind(dl.step.as_deref())
    .bind(dl.kind.map(CommandKind::as_str))
    .bind(&dl.reason)
    .bind(i64::from(dl.attempts))
    .bind(message)
    .bind(ms(dl.at))
    .execute(exec)
    .await
    .map_err(store_error)?;
    Ok(())
}

fn decode_dead_letter(r: &SqliteRow) -> Result<DeadLetterRecord, StoreError> {
    let get = |c: &str| -> Result<Option<String>, StoreError> { r.try_get(c).map_err(store_error) };
    let category = match get("category")?.as_deref() {
        Some("saga") => DeadLetterCategory::Saga,
        Some("poison") => DeadLetterCategory::Poison,
        other => return Err(corrupt("dead letter category", format!("{other:?}"))),
    };
    let id = get("id")?.unwrap_or_default();
    Ok(DeadLetterRecord {
        id: Uuid::parse_str(&id).map_err(|e| corrupt("dead letter id", e))?,
        category,
        saga_id: get("saga_id")?.map(|s| parse_id(&s)).transpose()?,
        saga_type: get("saga_type")?,
        step: get("step")?,
        kind: get("kind")?.and_then(|k| k.parse().ok()),
        reason: get("reason")?.unwrap_or_default(),
        attempts: u32::try_from(r.try_get::<i64, _>("attempts").map_err(store_error)?).unwrap_or(0),
        message: get("message")?
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| corrupt("dead letter message", e))?,
        at: ts(r.try_get("created_at_ms").map_err(store_error)?),
    })
}

#[async_trait]
impl SagaStore for SqliteStore {
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        sqlx::query("SELECT state, version FROM saga_instances WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?
            .as_ref()
            .map(decode_state)
            .transpose()
    }

    async fn commit(&self, writes: &[SagaWrite]) -> Result<Vec<WriteOutcome>, StoreError> {
        // IMMEDIATE: take the write lock up front, so the transaction cannot fail half-way
        // on a lock upgrade.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        let mut outcomes = Vec::with_capacity(writes.len());
        for w in writes {
            outcomes.push(apply_write(&mut tx, w).await?);
        }
        tx.commit().await.map_err(store_error)?;
        Ok(outcomes)
    }

    async fn due_wakeups(
        &self,
        now: Timestamp,
        types: &[(SagaType, u32)],
        limit: usize,
    ) -> Result<Vec<SagaId>, StoreError> {
        let types: Vec<String> = types.iter().map(|(t, v)| format!("{t}:{v}")).collect();
        let types = serde_json::to_string(&types).map_err(|e| StoreError::Other(e.to_string()))?;
        let rows = sqlx::query(
            "SELECT id FROM saga_instances WHERE next_wakeup_ms IS NOT NULL AND next_wakeup_ms <= ? \
             AND saga_type || ':' || definition_version IN (SELECT value FROM json_each(?)) \
             ORDER BY next_wakeup_ms LIMIT ?",
        )
        .bind(ms(now))
        .bind(types)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|r| parse_id(&r.try_get::<String, _>("id").map_err(store_error)?))
            .collect()
    }

    async fn active_sagas(
        &self,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaId>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM saga_instances WHERE status IN ('running', 'compensating') AND id > ? \
             ORDER BY id LIMIT ?",
        )
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|r| parse_id(&r.try_get::<String, _>("id").map_err(store_error)?))
            .collect()
    }

    async fn record_poison(&self, record: &DeadLetterRecord) -> Result<(), StoreError> {
        insert_dead_letter(&self.pool, record).await
    }

    async fn dead_letters(
        &self,
        open_only: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, category, saga_id, saga_type, step, kind, reason, attempts, message, created_at_ms \
             FROM dead_letters WHERE (? = 0 OR resolved_at_ms IS NULL) \
             ORDER BY created_at_ms DESC, id DESC LIMIT ?",
        )
        .bind(i64::from(open_only))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(decode_dead_letter).collect()
    }

    async fn journal(&self, id: SagaId) -> Result<Vec<JournalEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at_ms, schema_version, kind, body FROM saga_journal WHERE saga_id = ? ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|r| {
                let body: String = r.try_get("body").map_err(store_error)?;
                Ok(JournalEntry {
                    at: ts(r.try_get("at_ms").map_err(store_error)?),
                    schema_version: u16::try_from(
                        r.try_get::<i64, _>("schema_version").map_err(store_error)?,
                    )
                    .map_err(|e| corrupt("journal schema version", e))?,
                    kind: r.try_get("kind").map_err(store_error)?,
                    body: serde_json::from_str(&body).map_err(|e| corrupt("journal body", e))?,
                })
            })
            .collect()
    }

    async fn list(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, saga_type, status, created_at_ms, updated_at_ms FROM saga_instances \
             WHERE (? IS NULL OR status = ?) AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(status.map(SagaStatus::as_str))
        .bind(status.map(SagaStatus::as_str))
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|r| {
                let status: String = r.try_get("status").map_err(store_error)?;
                let ty: String = r.try_get("saga_type").map_err(store_error)?;
                Ok(SagaSummary {
                    id: parse_id(&r.try_get::<String, _>("id").map_err(store_error)?)?,
                    saga_type: SagaType::new(ty).map_err(|e| corrupt("saga type", e))?,
                    status: SagaStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
                    created_at: ts(r.try_get("created_at_ms").map_err(store_error)?),
                    updated_at: ts(r.try_get("updated_at_ms").map_err(store_error)?),
                })
            })
            .collect()
    }
}
