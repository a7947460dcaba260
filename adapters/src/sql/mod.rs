//! What the SQL stores share: timestamps as milliseconds, the classification of sqlx
//! errors into the port's [`StoreError`], the schema check, the statements both dialects
//! read alike, and (in submodules) the decoding of every row ([`rows`]) and the group
//! commit's shared parts ([`commit`]).

mod commit;
mod rows;

use skald_runtime::ids::SagaId;
use skald_runtime::machine::Timestamp;
use skald_runtime::ports::{Headers, SagaWrite, StoreError, WriteOutcome};

pub(crate) use commit::{
    CommitBatch, CommitWrite, check_versions, mark_duplicates, rounds, settle,
};
pub(crate) use rows::{
    IN_FLIGHT_COUNTS, OUTBOX_BACKLOG, QueryRow, SWEEPS, decode_backlog, decode_dead_letter,
    decode_ids, decode_journal_entry, decode_lease, decode_state, decode_status_count,
    decode_summary, decode_sweep, decode_type_count, decode_version_count, due_in_order,
    outbox_in_order, store_stats, stored_secret,
};

/// What a store's `start_in` did in the caller's transaction (`PostgresStore::start_in`,
/// `SqliteStore::start_in`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a start that found its saga existing wrote nothing: check which it was"]
pub enum TxStart {
    /// The saga's row, its journal entry and its outbox rows (its first command) are
    /// written in the caller's transaction: the saga exists, and its command goes out,
    /// once that transaction commits; a rollback takes them back with the caller's rows.
    Written(SagaId),
    /// A saga with this id exists already (a keyed start whose key was used, by a
    /// transaction that committed): nothing was written, and the caller's transaction
    /// is as it was, to commit or roll back.
    Existing(SagaId),
}

impl TxStart {
    /// The saga: the new one, or the existing one with that id.
    pub fn id(self) -> SagaId {
        match self {
            TxStart::Written(id) | TxStart::Existing(id) => id,
        }
    }

    /// Whether the saga existed already (nothing was written).
    pub fn is_existing(self) -> bool {
        matches!(self, TxStart::Existing(_))
    }
}

/// Checks that a write given to `start_in` creates a saga: expected version 0, a state
/// of that saga, no inbox entry (what `Runtime::prepare_start` makes).
pub(crate) fn check_start(w: &SagaWrite) -> Result<(), StoreError> {
    let creates = w.expected_version == 0
        && w.state.as_ref().is_some_and(|s| s.id == w.id)
        && w.inbox.is_none();
    if creates {
        Ok(())
    } else {
        Err(StoreError::Other(format!(
            "saga {}: a transactional start writes a new saga (a start from              Runtime::prepare_start), not a transition of an existing one",
            w.id
        )))
    }
}

/// What `start_in` answers for the outcome of its one write.
pub(crate) fn tx_start(id: SagaId, outcome: WriteOutcome) -> Result<TxStart, StoreError> {
    match outcome {
        WriteOutcome::Committed { .. } => Ok(TxStart::Written(id)),
        // A creation conflicts only with a saga of the same id.
        WriteOutcome::Conflict => Ok(TxStart::Existing(id)),
        WriteOutcome::Duplicate => Err(StoreError::Other(format!(
            "saga {id}: a transactional start was answered as a duplicate message"
        ))),
    }
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub(crate) fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn ts(ms: i64) -> Timestamp {
    Timestamp(u64::try_from(ms).unwrap_or(0))
}

/// The time now, in milliseconds since the Unix epoch (when a secret was stored).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Refuses an empty candidate secret: a key anyone knows (the empty one) must never be
/// what every process agrees on.
pub(crate) fn check_candidate(name: &str, candidate: &[u8]) -> Result<(), StoreError> {
    if candidate.is_empty() {
        return Err(StoreError::Other(format!(
            "the candidate for the shared secret {name:?} is empty"
        )));
    }
    Ok(())
}

/// The lease names of an `acquire_leases`, sorted (by bytes) and each once: concurrent
/// acquirers then lock the rows in one order, and no statement upserts a row twice.
pub(crate) fn lease_names(names: &[String]) -> Vec<&str> {
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    names
}

pub(crate) fn parse_id(s: &str) -> Result<SagaId, StoreError> {
    s.parse().map_err(|e| corrupt("saga id", e))
}

pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A value as JSON text (a state, a journal body, an array bound as one parameter).
pub(crate) fn encode_json(v: &(impl serde::Serialize + ?Sized)) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Other(e.to_string()))
}

pub(crate) fn encode_headers(h: &Headers) -> Result<String, StoreError> {
    encode_json(h)
}

pub(crate) fn decode_headers(s: &str) -> Result<Headers, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt("outbox headers", e))
}

/// Classifies the errors every sqlx driver shares; `database` classifies the driver's
/// own database errors.
pub(crate) fn classify(
    e: sqlx::Error,
    database: impl FnOnce(&dyn sqlx::error::DatabaseError) -> Option<StoreError>,
) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(db) => {
            database(db.as_ref()).unwrap_or_else(|| StoreError::Other(e.to_string()))
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        sqlx::Error::Migrate(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Schema(e.to_string())
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// Checks that the migrations applied to a database (`applied`, from `_sqlx_migrations`;
/// `None` when that table is missing) are exactly the ones this build embeds, so a
/// process that must not migrate (the operator CLI) reads only a schema it understands.
pub(crate) fn check_schema(
    applied: Option<Vec<i64>>,
    migrator: &sqlx::migrate::Migrator,
    database: &str,
) -> Result<(), StoreError> {
    let Some(applied) = applied else {
        return Err(StoreError::Schema(format!(
            "{database} has no skald schema (no _sqlx_migrations table): point at the database \
             a skald runtime uses; a runtime creates the schema when it first starts"
        )));
    };
    let known: Vec<i64> = migrator.iter().map(|m| m.version).collect();
    if let Some(newer) = applied.iter().find(|v| !known.contains(v)) {
        return Err(StoreError::Schema(format!(
            "{database} has skald schema migration {newer}, newer than this build knows \
             (latest {}): use the skald release that migrated it",
            known.last().copied().unwrap_or_default()
        )));
    }
    if let Some(missing) = known.iter().find(|v| !applied.contains(v)) {
        return Err(StoreError::Schema(format!(
            "{database} lacks skald schema migration {missing}: it is older than this build; \
             start a skald runtime of this release against it once (it migrates at start-up)"
        )));
    }
    Ok(())
}

/// Whether a store error says a table is missing.
pub(crate) fn is_missing_table(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("42P01") || db.message().contains("no such table")
        }
        _ => false,
    }
}

/// The poison records a purge deletes: of no saga (or of one deleted since), recorded
/// before `$before`, oldest first, at most `$max` (the dialect's placeholders). One
/// definition for both stores; PostgreSQL appends its row locking.
macro_rules! poison_of_no_saga {
    ($before:literal, $max:literal) => {
        concat!(
            "SELECT d.id FROM dead_letters AS d WHERE d.category = 'poison' \
             AND d.created_at_ms < ",
            $before,
            " AND (d.saga_id IS NULL OR NOT EXISTS \
               (SELECT 1 FROM saga_instances AS i WHERE i.id = d.saga_id)) \
             ORDER BY d.created_at_ms LIMIT ",
            $max
        )
    };
}
pub(crate) use poison_of_no_saga;

/// The condition that keeps keyed sagas out of a purge: the saga's id is not a version-8
/// UUID (`SagaId::for_key`). A business key names one saga for good: deleted, a later
/// start of the key would re-create the same id, and every participant's fence (keyed by
/// `<saga id>:<step>:<kind>`, never purged) would answer it with the old saga's outcomes.
///
/// `$id_text` is the id in its canonical text form (`id::text` in PostgreSQL, `id` in
/// SQLite, which stores it as text): the version is its 15th character (1-based), the
/// first hex digit of the third group. Part of the purge's WHERE clause, so a kept keyed
/// row is never selected: a batch of `limit` is made of purgeable rows only, and a sweep
/// over old sagas that are all keyed finds nothing and stops.
macro_rules! unkeyed {
    ($id_text:literal) => {
        concat!("substr(", $id_text, ", 15, 1) <> '8'")
    };
}
pub(crate) use unkeyed;

/// The shared secret `name`: the stored one, or `candidate` once stored. Insert-if-absent
/// (`insert`: name, value, time), then read (`select`: name): whoever inserted first,
/// every caller reads the one stored value (a row is never updated). Two statements, not
/// one: in PostgreSQL a concurrent insert makes ours wait, then do nothing, and only a
/// later statement's snapshot sees the row it committed.
pub(crate) async fn shared_secret<DB>(
    pool: &sqlx::Pool<DB>,
    [insert, select]: [&'static str; 2],
    name: &str,
    candidate: &[u8],
    store_error: fn(sqlx::Error) -> StoreError,
) -> Result<Vec<u8>, StoreError>
where
    DB: sqlx::Database,
    DB::Row: QueryRow,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    check_candidate(name, candidate)?;
    sqlx::query(insert)
        .bind(name)
        .bind(candidate)
        .bind(now_ms())
        .execute(pool)
        .await
        .map_err(store_error)?;
    let stored = sqlx::query(select)
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(store_error)?;
    stored_secret(name, stored.as_ref())
}
