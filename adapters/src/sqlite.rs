//! The SQLite store: skald's embedded default, one file, WAL mode.
//!
//! Durability: `journal_mode=WAL` with `synchronous=FULL` by default (every commit is
//! fsync'd; a power loss loses nothing acknowledged). Writes come through the runtime's
//! group-commit loop, so one fsync covers many sagas' transitions.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use skald_runtime::ids::{CommandKind, SagaId, SagaType};
use skald_runtime::machine::{SagaStatus, Timestamp};
use skald_runtime::ports::{
    DeadLetterCategory, DeadLetterQuery, DeadLetterRecord, JournalEntry, Lease, MAX_QUERY_ROWS,
    OutboxMessage, PurgeReport, SagaOrder, SagaQueries, SagaQuery, SagaStore, SagaSummary,
    SagaWrite, StoreError, StoreStats, StoredSaga, WriteOutcome,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use uuid::Uuid;

use crate::sql::{
    CommitWrite, QueryRow, classify, corrupt, decode_dead_letter, decode_state, due_in_order,
    encode_headers, encode_json, limit, ms, outbox_in_order, parse_id,
};

pub use crate::sql::TxStart;

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
    /// Group commits of up to this many writes are written row by row; larger ones with
    /// a few set-based statements reading JSON arrays (`json_each`): each statement is a
    /// hop to the connection's worker thread, so fewer statements is less time. Default: 4.
    pub per_row_max_writes: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::Full,
            max_connections: 4,
            busy_timeout: Duration::from_secs(10),
            per_row_max_writes: 4,
        }
    }
}

/// The SQLite saga store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    per_row_max_writes: usize,
}

/// Maps a sqlx error to the port's error at the boundary.
pub fn store_error(e: sqlx::Error) -> StoreError {
    classify(e, |db| {
        // SQLITE_BUSY (5), SQLITE_LOCKED (6), SQLITE_READONLY (8), SQLITE_IOERR (10),
        // SQLITE_FULL (13), SQLITE_CANTOPEN (14), with their extended codes (low byte):
        // conditions that pass (a lock, a full or failing disk an operator frees).
        let primary = db
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .map(|c| c & 0xff);
        if matches!(primary, Some(5 | 6 | 8 | 10 | 13 | 14)) {
            return Some(StoreError::Unavailable(db.message().to_owned()));
        }
        let msg = db.message();
        if msg.contains("no such table")
            || msg.contains("no such column")
            || msg.contains("has no column")
        {
            return Some(StoreError::Schema(format!(
                "{msg}: the database lacks skald's tables, or has another version of them"
            )));
        }
        None
    })
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
        Ok(SqliteStore {
            pool,
            per_row_max_writes: options.per_row_max_writes,
        })
    }

    /// Opens an existing skald database without creating or migrating anything: for
    /// tools that must not change it (the operator CLI). Refuses a missing file, and a
    /// database whose schema is not exactly this build's.
    pub async fn open_existing(url: &str) -> Result<SqliteStore, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Schema(format!("invalid SQLite URL {url:?}: {e}")))?;
        let path = connect.get_filename();
        if !path.as_os_str().is_empty()
            && path != std::path::Path::new(":memory:")
            && !path.exists()
        {
            return Err(StoreError::Schema(format!(
                "no SQLite database at {}: check --db (a skald runtime creates it when it \
                 first starts)",
                path.display()
            )));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(
                connect
                    .create_if_missing(false)
                    .busy_timeout(Duration::from_secs(10)),
            )
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot open SQLite database {url:?}: {e}"))
            })?;
        let applied = match sqlx::query_scalar::<_, i64>(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&pool)
        .await
        {
            Ok(v) => Some(v),
            Err(e) if crate::sql::is_missing_table(&e) => None,
            Err(e) => return Err(store_error(e)),
        };
        crate::sql::check_schema(applied, &MIGRATOR, &format!("SQLite database {url}"))?;
        Ok(SqliteStore {
            pool,
            per_row_max_writes: SqliteOptions::default().per_row_max_writes,
        })
    }

    /// The connection pool (other components of a process may share the file): for the
    /// caller's own transactions on skald's database ([`SqliteStore::start_in`]), among
    /// others.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Writes a prepared saga start (`Runtime::prepare_start`,
    /// `Runtime::prepare_start_keyed`) in the caller's own transaction, `conn`: the saga's
    /// row, its journal entry and its outbox rows, with the statements a commit uses. The
    /// saga and the caller's rows commit together, or not at all; once the transaction
    /// commits, the runtime's outbox relay publishes the first command: `Runtime::started`
    /// gives the saga's handle and wakes this process's relay (any other relay on the
    /// database takes it within its `outbox_poll_interval`). A rollback
    /// leaves no saga and sends nothing.
    ///
    /// `conn` must be a connection to the database file the runtime's store uses:
    /// [`SqliteStore::pool`] gives one, or a pool of the application's own on that file
    /// opened with [`open_pool`] (WAL mode, and the store's busy timeout: it waits for
    /// the write lock while the runtime commits, rather than failing with "database is
    /// locked"). Pass the transaction (`&mut *tx`). SQLite has one writer at a time:
    /// begin the transaction with `BEGIN IMMEDIATE` (it takes the write lock up front,
    /// waiting up to the busy timeout, rather than failing when a read is followed by a
    /// write), and keep it short: the runtime's commits wait while it holds the lock.
    ///
    /// The rows are written under a savepoint: a failure part-way takes back what this
    /// wrote and leaves the caller's transaction usable. A saga with the same id that
    /// exists (a keyed start whose key was used) is answered [`TxStart::Existing`]:
    /// nothing is written, and the transaction is as it was, to commit or roll back.
    ///
    /// ```no_run
    /// # use skald_adapters::sqlite::{SqliteStore, TxStart};
    /// # use skald_runtime::definition::SagaDefinition;
    /// # use skald_runtime::runtime::{Runtime, SagaHandle};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct Checkout { order_id: String, total_cents: i64 }
    /// # async fn place_order(
    /// #     runtime: &Runtime,
    /// #     store: &SqliteStore,
    /// #     checkout: &SagaDefinition<Checkout>,
    /// # ) -> Result<SagaHandle<Checkout>, Box<dyn std::error::Error>> {
    /// // CREATE TABLE orders (id TEXT PRIMARY KEY, total_cents INTEGER NOT NULL),
    /// // in the file the runtime's store uses.
    /// let order = Checkout { order_id: "o-42".into(), total_cents: 1250 };
    /// // Decided before the transaction (no I/O): one checkout saga per order id.
    /// let start = runtime.prepare_start_keyed(checkout, &order.order_id, &order)?;
    ///
    /// let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    /// sqlx::query("INSERT INTO orders (id, total_cents) VALUES (?, ?)")
    ///     .bind(&order.order_id)
    ///     .bind(order.total_cents)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// match SqliteStore::start_in(&mut *tx, &start).await? {
    ///     TxStart::Written(_) => {
    ///         tx.commit().await?;
    ///         // The first command goes out through the outbox now.
    ///         Ok(runtime.started(start))
    ///     }
    ///     // This order's saga exists: nothing of it was written here.
    ///     TxStart::Existing(id) => {
    ///         tx.rollback().await?;
    ///         Ok(runtime.saga(checkout, id))
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn start_in(
        conn: &mut SqliteConnection,
        start: &(impl AsRef<SagaWrite> + ?Sized),
    ) -> Result<TxStart, StoreError> {
        use sqlx::Connection;
        let write = start.as_ref();
        crate::sql::check_start(write)?;
        // A savepoint inside the caller's transaction (a transaction of its own outside
        // one): dropped on an error, it takes back what was written so far.
        let mut savepoint = conn.begin().await.map_err(store_error)?;
        let outcome = apply_write(&mut savepoint, write).await?;
        savepoint.commit().await.map_err(store_error)?;
        crate::sql::tx_start(write.id, outcome)
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

/// Writes the saga row of `w` (insert, versioned update, or for a journal-only write a
/// version check). `None`: the version did not match (a conflict).
async fn write_state(
    conn: &mut SqliteConnection,
    w: &SagaWrite,
    id: &str,
) -> Result<Option<u64>, StoreError> {
    let Some(state) = &w.state else {
        // Journal only (an ignored input): the decision to ignore was taken on the
        // version the writer read, so it must still be the current one; otherwise a
        // stale actor could swallow a reply the saga now waits for.
        let current: Option<i64> =
            sqlx::query_scalar("SELECT version FROM saga_instances WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(store_error)?;
        let same = current.and_then(|v| u64::try_from(v).ok()) == Some(w.expected_version);
        return Ok(same.then_some(w.expected_version));
    };
    let json = encode_json(state)?;
    let wake = state.wake_at().map(ms);
    let next = i64::try_from(w.expected_version + 1).map_err(|e| corrupt("version", e))?;
    let affected = if w.expected_version == 0 {
        sqlx::query(
            "INSERT INTO saga_instances (id, saga_type, definition_version, status, version, \
             state, next_wakeup_ms, created_at_ms, updated_at_ms, partition_no) \
             VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(state.saga_type.as_str())
        .bind(i64::from(state.definition_version))
        .bind(state.status.as_str())
        .bind(&json)
        .bind(wake)
        .bind(ms(state.created_at))
        .bind(ms(state.updated_at))
        .bind(i64::from(w.partition))
        .execute(&mut *conn)
        .await
    } else {
        // A state change ends any claim on the old wake-up; the partition stays.
        sqlx::query(
            "UPDATE saga_instances SET status = ?, version = ?, state = ?, next_wakeup_ms = ?, \
             wakeup_claimed_until_ms = NULL, updated_at_ms = ? WHERE id = ? AND version = ?",
        )
        .bind(state.status.as_str())
        .bind(next)
        .bind(&json)
        .bind(wake)
        .bind(ms(state.updated_at))
        .bind(id)
        .bind(next - 1)
        .execute(&mut *conn)
        .await
    }
    .map_err(store_error)?
    .rows_affected();
    Ok((affected > 0).then_some(w.expected_version + 1))
}

async fn apply_write(
    conn: &mut SqliteConnection,
    w: &SagaWrite,
) -> Result<WriteOutcome, StoreError> {
    let id = w.id.to_string();
    // The inbox first: a message applied before is refused before anything is written.
    if let Some(message_id) = &w.inbox {
        let at = w.journal.first().map(|j| j.at).unwrap_or_default();
        let inserted = sqlx::query(
            "INSERT INTO inbox (message_id, saga_id, received_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(message_id)
        .bind(&id)
        .bind(ms(at))
        .execute(&mut *conn)
        .await
        .map_err(store_error)?
        .rows_affected();
        if inserted == 0 {
            return Ok(WriteOutcome::Duplicate);
        }
    }
    let Some(version) = write_state(conn, w, &id).await? else {
        // Nothing of a conflicting write may stay, its inbox entry included.
        if let Some(message_id) = &w.inbox {
            sqlx::query("DELETE FROM inbox WHERE message_id = ?")
                .bind(message_id)
                .execute(&mut *conn)
                .await
                .map_err(store_error)?;
        }
        return Ok(WriteOutcome::Conflict);
    };
    for entry in &w.journal {
        let body = encode_json(&entry.body)?;
        sqlx::query(
            "INSERT INTO saga_journal (saga_id, at_ms, schema_version, kind, body) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(ms(entry.at))
        .bind(i64::from(entry.schema_version))
        .bind(&entry.kind)
        .bind(body)
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    }
    write_row_extras(conn, w, &id).await?;
    Ok(WriteOutcome::Committed { version })
}

/// The rows of a committed write that both commit paths write one by one: the dead
/// letters' resolution (a re-drive), a new dead letter, the outbox rows.
async fn write_row_extras(
    conn: &mut SqliteConnection,
    w: &SagaWrite,
    id: &str,
) -> Result<(), StoreError> {
    if w.resolve_dead_letters {
        let now = w.journal.first().map(|j| j.at).unwrap_or_default();
        sqlx::query(
            "UPDATE dead_letters SET resolved_at_ms = ? \
             WHERE saga_id = ? AND category = 'saga' AND resolved_at_ms IS NULL",
        )
        .bind(ms(now))
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    }
    if let Some(dl) = &w.dead_letter {
        insert_dead_letter(&mut *conn, dl).await?;
    }
    insert_outbox(conn, Some(id), Some(w.partition), &w.outbox).await
}

/// `[w1, w2, ...]` from writes already serialized one by one.
fn json_array<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for (n, item) in items.enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push(']');
    out
}

/// Applies one round of writes (no saga twice) with a handful of set-based statements
/// reading the writes as a JSON array: inbox, creations, updates, version checks of
/// journal-only writes, journal; outbox rows and dead letters row by row. Per-write
/// atomicity is kept: a write refused for a conflict leaves nothing behind, its inbox
/// entry included.
async fn apply_set(
    tx: &mut Transaction<'static, Sqlite>,
    writes: &[SagaWrite],
    round: &[usize],
    outcomes: &mut [Option<WriteOutcome>],
) -> Result<(), StoreError> {
    let mut json: Vec<(usize, String)> = Vec::with_capacity(round.len());
    for &i in round {
        let j = encode_json(&CommitWrite::of(&writes[i]))?;
        json.push((i, j));
    }
    let array = |keep: &dyn Fn(usize) -> bool| {
        json_array(
            json.iter()
                .filter(|(i, _)| keep(*i))
                .map(|(_, j)| j.as_str()),
        )
    };

    // 1. The inbox: a message applied before is refused before anything is written.
    if round.iter().any(|&i| writes[i].inbox.is_some()) {
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO inbox (message_id, saga_id, received_at_ms) \
             SELECT json_extract(value, '$.inbox'), json_extract(value, '$.id'), \
                    json_extract(value, '$.inbox_at') \
             FROM json_each(?) WHERE json_extract(value, '$.inbox') IS NOT NULL \
             ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
        )
        .bind(array(&|i| writes[i].inbox.is_some()))
        .fetch_all(&mut **tx)
        .await
        .map_err(store_error)?;
        let with_inbox = round.iter().filter(|&&i| writes[i].inbox.is_some());
        crate::sql::mark_duplicates(inserted, with_inbox.map(|&i| (i, &writes[i])), outcomes);
    }
    let live = |i: usize| outcomes[i].is_none();
    let live_now: Vec<usize> = round.iter().copied().filter(|&i| live(i)).collect();
    let mut applied: std::collections::HashSet<SagaId> = std::collections::HashSet::new();

    // 2. Creations, 3. versioned updates, 4. version checks of journal-only writes.
    let creates = |i: usize| writes[i].state.is_some() && writes[i].expected_version == 0;
    if live_now.iter().any(|&i| creates(i)) {
        let ids: Vec<String> = sqlx::query_scalar(
            "INSERT INTO saga_instances (id, saga_type, definition_version, status, version, \
             state, next_wakeup_ms, created_at_ms, updated_at_ms, partition_no) \
             SELECT json_extract(value, '$.id'), json_extract(value, '$.saga_type'), \
                    json_extract(value, '$.definition_version'), json_extract(value, '$.status'), 1, \
                    json_extract(value, '$.state'), json_extract(value, '$.wake'), \
                    json_extract(value, '$.created'), json_extract(value, '$.updated'), \
                    json_extract(value, '$.partition') \
             FROM json_each(?) WHERE 1 ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(array(&|i| live_now.contains(&i) && creates(i)))
        .fetch_all(&mut **tx)
        .await
        .map_err(store_error)?;
        for id in ids {
            applied.insert(parse_id(&id)?);
        }
    }
    let updates = |i: usize| writes[i].state.is_some() && writes[i].expected_version > 0;
    if live_now.iter().any(|&i| updates(i)) {
        // A state change ends any claim on the old wake-up; the partition stays.
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE saga_instances AS s SET status = u.st, version = u.v + 1, state = u.state, \
             next_wakeup_ms = u.wake, wakeup_claimed_until_ms = NULL, updated_at_ms = u.updated \
             FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.status') AS st, \
                          json_extract(value, '$.expected') AS v, json_extract(value, '$.state') AS state, \
                          json_extract(value, '$.wake') AS wake, json_extract(value, '$.updated') AS updated \
                   FROM json_each(?)) AS u \
             WHERE s.id = u.id AND s.version = u.v RETURNING id",
        )
        .bind(array(&|i| live_now.contains(&i) && updates(i)))
        .fetch_all(&mut **tx)
        .await
        .map_err(store_error)?;
        for id in ids {
            applied.insert(parse_id(&id)?);
        }
    }
    let checks = |i: usize| writes[i].state.is_none();
    if live_now.iter().any(|&i| checks(i)) {
        let rows = sqlx::query(
            "SELECT id, version FROM saga_instances \
             WHERE id IN (SELECT json_extract(value, '$.id') FROM json_each(?))",
        )
        .bind(array(&|i| live_now.contains(&i) && checks(i)))
        .fetch_all(&mut **tx)
        .await
        .map_err(store_error)?;
        let checked = live_now.iter().filter(|&&i| checks(i)).map(|&i| &writes[i]);
        crate::sql::check_versions(&rows, checked, &mut applied)?;
    }
    let conflicted_inbox = crate::sql::settle(
        live_now.iter().map(|&i| (i, &writes[i])),
        &applied,
        outcomes,
    );
    // Nothing of a conflicting write may stay, its inbox entry included.
    if !conflicted_inbox.is_empty() {
        let ids = encode_json(&conflicted_inbox)?;
        sqlx::query("DELETE FROM inbox WHERE message_id IN (SELECT value FROM json_each(?))")
            .bind(ids)
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
    }
    let committed: Vec<usize> = live_now
        .iter()
        .copied()
        .filter(|&i| matches!(outcomes[i], Some(WriteOutcome::Committed { .. })))
        .collect();

    // 5. Journal entries, in order.
    if committed.iter().any(|&i| !writes[i].journal.is_empty()) {
        sqlx::query(
            "INSERT INTO saga_journal (saga_id, at_ms, schema_version, kind, body) \
             SELECT json_extract(w.value, '$.id'), json_extract(j.value, '$.at'), \
                    json_extract(j.value, '$.schema_version'), json_extract(j.value, '$.kind'), \
                    json(json_extract(j.value, '$.body')) \
             FROM json_each(?) AS w, json_each(w.value, '$.journal') AS j \
             ORDER BY w.key, j.key",
        )
        .bind(array(&|i| committed.contains(&i)))
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
    }

    // Outbox rows (a durable bus only), dead letters and their resolution: row by row.
    for &i in &committed {
        let w = &writes[i];
        write_row_extras(tx, w, &w.id.to_string()).await?;
    }
    Ok(())
}

/// Inserts outbox rows of `saga_id` in `partition` (none for a poison message's
/// announcement: every node may publish it), in the order given.
async fn insert_outbox(
    conn: &mut SqliteConnection,
    saga_id: Option<&str>,
    partition: Option<u32>,
    rows: &[OutboxMessage],
) -> Result<(), StoreError> {
    for m in rows {
        sqlx::query(
            "INSERT INTO outbox (id, saga_id, subject, headers, payload, created_at_ms, available_at_ms, \
             partition_no) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(m.id.to_string())
        .bind(saga_id)
        .bind(&m.message.subject)
        .bind(encode_headers(&m.message.headers)?)
        .bind(m.message.payload.as_ref())
        .bind(ms(crate::created_at(m.id)))
        .bind(ms(m.available_at))
        .bind(partition.map(i64::from))
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    }
    Ok(())
}

async fn insert_dead_letter<'e, E>(exec: E, dl: &DeadLetterRecord) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let message = dl.message.as_ref().map(encode_json).transpose()?;
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

    async fn commit(
        &self,
        writes: &[SagaWrite],
        published: &[Uuid],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        // IMMEDIATE: take the write lock up front, so the transaction cannot fail half-way
        // on a lock upgrade.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        if !published.is_empty() {
            let ids: Vec<String> = published.iter().map(Uuid::to_string).collect();
            let ids = encode_json(&ids)?;
            sqlx::query("DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))")
                .bind(ids)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        let outcomes = if writes.len() <= self.per_row_max_writes {
            let mut outcomes = Vec::with_capacity(writes.len());
            for w in writes {
                outcomes.push(apply_write(&mut tx, w).await?);
            }
            outcomes
        } else {
            // A saga written twice in one batch (a passivation race) goes into a later
            // round: every statement sees each saga once.
            let rounds = crate::sql::rounds(writes, 0..writes.len());
            let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; writes.len()];
            for round in &rounds {
                apply_set(&mut tx, writes, round, &mut outcomes).await?;
            }
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or(WriteOutcome::Conflict))
                .collect()
        };
        tx.commit().await.map_err(store_error)?;
        Ok(outcomes)
    }

    async fn claim_wakeups(
        &self,
        now: Timestamp,
        types: &[(SagaType, u32)],
        partitions: Option<&[u32]>,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<SagaId>, StoreError> {
        let types: Vec<String> = types.iter().map(|(t, v)| format!("{t}:{v}")).collect();
        let types = encode_json(&types)?;
        // ?5 NULL: every partition. Sagas with no partition (created before partitions
        // existed) are everyone's.
        let rows = sqlx::query(
            "UPDATE saga_instances SET wakeup_claimed_until_ms = ?1 WHERE id IN ( \
               SELECT id FROM saga_instances WHERE next_wakeup_ms IS NOT NULL AND next_wakeup_ms <= ?2 \
               AND (wakeup_claimed_until_ms IS NULL OR wakeup_claimed_until_ms <= ?2) \
               AND saga_type || ':' || definition_version IN (SELECT value FROM json_each(?3)) \
               AND (?5 IS NULL OR partition_no IS NULL \
                    OR partition_no IN (SELECT value FROM json_each(?5))) \
               ORDER BY next_wakeup_ms LIMIT ?4) \
             RETURNING id, next_wakeup_ms",
        )
        .bind(ms(now.plus(lease)))
        .bind(ms(now))
        .bind(types)
        .bind(limit(max))
        .bind(partitions.map(encode_json).transpose()?)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        due_in_order(&rows)
    }

    async fn claim_outbox(
        &self,
        now: Timestamp,
        partitions: Option<&[u32]>,
        lease: Duration,
        max: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let until = now.plus(lease);
        // ?4 NULL: every partition. Rows with no partition (a poison message's
        // announcement, rows written before partitions existed) are everyone's.
        let rows = sqlx::query(
            "UPDATE outbox SET available_at_ms = ?1 WHERE seq IN ( \
               SELECT seq FROM outbox WHERE available_at_ms <= ?2 \
               AND (?4 IS NULL OR partition_no IS NULL \
                    OR partition_no IN (SELECT value FROM json_each(?4))) \
               ORDER BY seq LIMIT ?3) \
             RETURNING seq, id, subject, headers, payload",
        )
        .bind(ms(until))
        .bind(ms(now))
        .bind(limit(max))
        .bind(partitions.map(encode_json).transpose()?)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        outbox_in_order(&rows, until)
    }

    async fn prune_inbox(&self, before: Timestamp) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM inbox WHERE received_at_ms < ?")
            .bind(ms(before))
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected())
    }

    async fn outbox_backlog(&self) -> Result<(u64, Option<Timestamp>), StoreError> {
        let row = sqlx::query(crate::sql::OUTBOX_BACKLOG)
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        crate::sql::decode_backlog(&row)
    }

    async fn active_sagas(
        &self,
        after: Option<SagaId>,
        max: usize,
    ) -> Result<Vec<SagaId>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM saga_instances WHERE status IN ('running', 'compensating') AND id > ? \
             ORDER BY id LIMIT ?",
        )
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(limit(max))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        crate::sql::decode_ids(&rows)
    }

    async fn settled_among(&self, ids: &[SagaId]) -> Result<Vec<SagaId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let rows = sqlx::query(
            "SELECT id FROM saga_instances \
             WHERE id IN (SELECT value FROM json_each(?)) \
             AND status IN ('completed', 'compensated', 'failed')",
        )
        .bind(encode_json(&ids)?)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        crate::sql::decode_ids(&rows)
    }

    async fn unfinished_versions(
        &self,
        types: &[SagaType],
    ) -> Result<Vec<(SagaType, u32, u64)>, StoreError> {
        let names: Vec<&str> = types.iter().map(SagaType::as_str).collect();
        let rows = sqlx::query(
            "SELECT saga_type, definition_version, COUNT(*) AS n FROM saga_instances \
             WHERE status IN ('created', 'running', 'compensating', 'failed') \
             AND saga_type IN (SELECT value FROM json_each(?)) \
             GROUP BY saga_type, definition_version ORDER BY saga_type, definition_version",
        )
        .bind(encode_json(&names)?)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_version_count).collect()
    }

    async fn in_flight_counts(&self) -> Result<Vec<(SagaType, u64)>, StoreError> {
        let rows = sqlx::query(crate::sql::IN_FLIGHT_COUNTS)
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_type_count).collect()
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let until = ms(now.plus(lease));
        let got: Option<String> = sqlx::query_scalar(
            "INSERT INTO skald_leases (name, holder, until_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
             WHERE skald_leases.holder = excluded.holder OR skald_leases.until_ms < ?4 \
             RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(ms(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(got.as_deref() == Some(holder))
    }

    async fn acquire_leases(
        &self,
        names: &[String],
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        // One statement (its own transaction), `acquire_lease`'s rule for each name,
        // each name once. `WHERE true`: an upsert's SELECT needs a WHERE clause, or
        // SQLite reads ON CONFLICT as part of a join.
        let names = crate::sql::lease_names(names);
        if names.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(
            "INSERT INTO skald_leases (name, holder, until_ms) \
             SELECT value, ?2, ?3 FROM json_each(?1) WHERE true \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
             WHERE skald_leases.holder = excluded.holder OR skald_leases.until_ms < ?4 \
             RETURNING name",
        )
        .bind(encode_json(&names)?)
        .bind(holder)
        .bind(ms(now.plus(lease)))
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)
    }

    async fn release_leases(&self, names: &[String], holder: &str) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "DELETE FROM skald_leases WHERE holder = ?2 \
             AND name IN (SELECT value FROM json_each(?1))",
        )
        .bind(encode_json(names)?)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn leases(&self, prefix: &str, now: Timestamp) -> Result<Vec<Lease>, StoreError> {
        // A prefix compared as a string (not LIKE: `_` and `%` are no wildcards here,
        // and LIKE ignores case); name order by bytes (BINARY).
        let rows = sqlx::query(
            "SELECT name, holder, until_ms FROM skald_leases \
             WHERE until_ms >= ?2 AND substr(name, 1, length(?1)) = ?1 ORDER BY name",
        )
        .bind(prefix)
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_lease).collect()
    }

    async fn purge_finished(
        &self,
        before: Timestamp,
        max: usize,
    ) -> Result<PurgeReport, StoreError> {
        // IMMEDIATE: a deferred transaction that reads, then writes, fails with
        // SQLITE_BUSY_SNAPSHOT when a commit lands in between (busy_timeout cannot help).
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        // The batch, into a temporary table the three deletes share.
        sqlx::query("CREATE TEMP TABLE IF NOT EXISTS skald_purge (id TEXT PRIMARY KEY)")
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        sqlx::query("DELETE FROM skald_purge")
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // Finished, old and not keyed (`unkeyed!`: kept keyed rows are never selected,
        // so a batch is all purgeable rows), through the partial index
        // `saga_instances_purgeable`, whose condition is the query's to the letter.
        let sagas = sqlx::query(concat!(
            "INSERT INTO skald_purge (id) SELECT id FROM saga_instances \
             WHERE status IN ('completed', 'compensated') AND updated_at_ms < ? AND ",
            crate::sql::unkeyed!("id"),
            " ORDER BY updated_at_ms LIMIT ?"
        ))
        .bind(ms(before))
        .bind(limit(max))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        let mut report = PurgeReport {
            sagas,
            ..PurgeReport::default()
        };
        if sagas > 0 {
            report.journal_entries = sqlx::query(
                "DELETE FROM saga_journal WHERE saga_id IN (SELECT id FROM skald_purge)",
            )
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
            report.dead_letters = sqlx::query(
                "DELETE FROM dead_letters WHERE saga_id IN (SELECT id FROM skald_purge)",
            )
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
            sqlx::query("DELETE FROM saga_instances WHERE id IN (SELECT id FROM skald_purge)")
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        // Poison records of no saga (or of one deleted since), as old: bounded alike.
        report.dead_letters += sqlx::query(concat!(
            "DELETE FROM dead_letters WHERE id IN (",
            crate::sql::poison_of_no_saga!("?", "?"),
            ")"
        ))
        .bind(ms(before))
        .bind(limit(max))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        sqlx::query("DELETE FROM skald_purge")
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(report)
    }

    async fn record_sweep(
        &self,
        name: &str,
        holder: &str,
        at: Timestamp,
        r: &PurgeReport,
    ) -> Result<(), StoreError> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO skald_sweeps (name, holder, runs, last_run_ms, sagas_deleted, \
             journal_deleted, dead_letters_deleted, inbox_deleted) VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (name) DO UPDATE SET holder = ?2, runs = runs + 1, last_run_ms = ?3, \
             sagas_deleted = sagas_deleted + ?4, journal_deleted = journal_deleted + ?5, \
             dead_letters_deleted = dead_letters_deleted + ?6, inbox_deleted = inbox_deleted + ?7",
        )
        .bind(name)
        .bind(holder)
        .bind(ms(at))
        .bind(n(r.sagas))
        .bind(n(r.journal_entries))
        .bind(n(r.dead_letters))
        .bind(n(r.inbox))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        const SQL: [&str; 2] = [
            "INSERT INTO skald_secrets (name, value, created_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO NOTHING",
            "SELECT value FROM skald_secrets WHERE name = ?",
        ];
        crate::sql::shared_secret(&self.pool, SQL, name, candidate, store_error).await
    }

    async fn record_poison(
        &self,
        record: &DeadLetterRecord,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        insert_dead_letter(&mut *tx, record).await?;
        let saga = record.saga_id.map(|s| s.to_string());
        insert_outbox(&mut tx, saga.as_deref(), None, outbox).await?;
        tx.commit().await.map_err(store_error)
    }

    async fn dead_letters(
        &self,
        open_only: bool,
        max: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, category, saga_id, saga_type, step, kind, reason, attempts, message, created_at_ms, \
             resolved_at_ms FROM dead_letters WHERE (? = 0 OR resolved_at_ms IS NULL) \
             ORDER BY created_at_ms DESC, id DESC LIMIT ?",
        )
        .bind(i64::from(open_only))
        .bind(limit(max))
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
        rows.iter().map(crate::sql::decode_journal_entry).collect()
    }

    async fn list(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        max: usize,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, saga_type, status, created_at_ms, updated_at_ms FROM saga_instances \
             WHERE (? IS NULL OR status = ?) AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(status.map(SagaStatus::as_str))
        .bind(status.map(SagaStatus::as_str))
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(limit(max))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_summary).collect()
    }
}

/// The columns of a dead letter, as `decode_dead_letter` reads them.
const DEAD_LETTER_COLUMNS: &str = "id, category, saga_id, saga_type, step, kind, reason, \
     attempts, message, created_at_ms, resolved_at_ms";

#[async_trait]
impl SagaQueries for SqliteStore {
    async fn query(&self, q: &SagaQuery) -> Result<Vec<StoredSaga>, StoreError> {
        // One static statement per order; empty filters are NULL (or an empty array).
        const FILTER: &str = "SELECT state, version FROM saga_instances \
             WHERE (json_array_length(?1) = 0 OR status IN (SELECT value FROM json_each(?1))) \
             AND (?2 IS NULL OR saga_type = ?2) \
             AND (?3 IS NULL OR created_at_ms >= ?3) \
             AND (?4 IS NULL OR updated_at_ms < ?4) \
             AND (?6 IS NULL OR definition_version = ?6) ";
        let sql = match q.order {
            SagaOrder::LeastRecentlyUpdated => {
                format!("{FILTER}ORDER BY updated_at_ms, id LIMIT ?5")
            }
            // Newest first by creation time: ids are no time order (keyed ids are
            // version 8, hashes of their key), the id breaks ties.
            _ => format!("{FILTER}ORDER BY created_at_ms DESC, id DESC LIMIT ?5"),
        };
        let statuses: Vec<&str> = q.statuses.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(encode_json(&statuses)?)
            .bind(q.saga_type.as_ref().map(|t| t.as_str()))
            .bind(q.created_after.map(ms))
            .bind(q.updated_before.map(ms))
            .bind(limit(q.limit.min(MAX_QUERY_ROWS)))
            .bind(q.definition_version.map(i64::from))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(decode_state).collect()
    }

    async fn stats(&self, since: Timestamp) -> Result<StoreStats, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(store_error)?;
        let counts = sqlx::query(
            "SELECT saga_type, definition_version, status, COUNT(*) AS n \
             FROM saga_instances GROUP BY saga_type, definition_version, status \
             ORDER BY saga_type, definition_version, status",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(store_error)?;
        let activity = sqlx::query(
            "SELECT \
               (SELECT COUNT(*) FROM saga_instances WHERE created_at_ms >= ?1) AS started, \
               (SELECT COUNT(*) FROM saga_instances WHERE status IN ('completed', 'compensated') \
                  AND updated_at_ms >= ?1) AS finished, \
               (SELECT COUNT(*) FROM outbox) AS outbox_n, \
               (SELECT MIN(created_at_ms) FROM outbox) AS outbox_oldest, \
               (SELECT COUNT(*) FROM dead_letters WHERE resolved_at_ms IS NULL) AS open_dl",
        )
        .bind(ms(since))
        .fetch_one(&mut *conn)
        .await
        .map_err(store_error)?;
        let oldest = sqlx::query(
            "SELECT id, saga_type, created_at_ms FROM saga_instances \
             WHERE status IN ('running', 'compensating') ORDER BY created_at_ms, id LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(store_error)?;
        let sweeps = sqlx::query(crate::sql::SWEEPS)
            .fetch_all(&mut *conn)
            .await
            .map_err(store_error)?;
        crate::sql::store_stats(
            counts
                .iter()
                .map(crate::sql::decode_status_count)
                .collect::<Result<_, _>>()?,
            &activity,
            oldest.as_ref(),
            sweeps
                .iter()
                .map(crate::sql::decode_sweep)
                .collect::<Result<_, _>>()?,
        )
    }

    async fn find_dead_letters(
        &self,
        q: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters \
             WHERE (?1 = 0 OR resolved_at_ms IS NULL) AND (?2 IS NULL OR saga_type = ?2) \
             AND (?3 IS NULL OR category = ?3) \
             ORDER BY created_at_ms DESC, id DESC LIMIT ?4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::from(q.open_only))
            .bind(q.saga_type.as_deref())
            .bind(q.category.map(DeadLetterCategory::as_str))
            .bind(limit(q.limit.min(MAX_QUERY_ROWS)))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(decode_dead_letter).collect()
    }

    async fn dead_letters_of(&self, id: Uuid) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?1 OR saga_id = ?1 \
             ORDER BY created_at_ms DESC, id DESC LIMIT {MAX_QUERY_ROWS}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(decode_dead_letter).collect()
    }
}

/// SQLite's integers are all 64-bit.
impl QueryRow for SqliteRow {
    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.try_get(column).map_err(store_error)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.try_get(column).map_err(store_error)
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        self.try_get(column).map_err(store_error)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(column).map_err(store_error)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>, StoreError> {
        self.try_get(column).map_err(store_error)
    }
}
