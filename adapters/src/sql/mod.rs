//! What the SQL stores share: timestamps as milliseconds, decoding helpers, and the
//! classification of sqlx errors into the port's [`StoreError`].

use serde::Serialize;
use skald_runtime::ids::{CommandKind, SagaId, SagaType};
use skald_runtime::machine::{SagaState, SagaStatus, Timestamp};
use skald_runtime::ports::{
    Headers, PurgeReport, SagaWrite, StatusCount, StoreError, StoreStats, SweepStats,
};
use uuid::Uuid;

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

pub(crate) fn parse_id(s: &str) -> Result<SagaId, StoreError> {
    s.parse().map_err(|e| corrupt("saga id", e))
}

pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn encode_headers(h: &Headers) -> Result<String, StoreError> {
    serde_json::to_string(h).map_err(|e| StoreError::Other(e.to_string()))
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

/// One group commit as JSON: the argument of PostgreSQL's `skald_commit`, and the arrays
/// SQLite's set-based statements read with `json_each`. Serialized straight from the
/// writes, without copies.
#[derive(Serialize)]
pub(crate) struct CommitBatch<'a> {
    pub(crate) published: &'a [Uuid],
    pub(crate) writes: Vec<CommitWrite<'a>>,
}

#[derive(Serialize)]
pub(crate) struct CommitWrite<'a> {
    id: SagaId,
    expected: u64,
    state: Option<&'a SagaState>,
    saga_type: Option<&'a str>,
    definition_version: Option<u32>,
    status: Option<&'static str>,
    wake: Option<i64>,
    created: Option<i64>,
    updated: Option<i64>,
    journal: Vec<CommitEntry<'a>>,
    outbox: Vec<CommitOutbox<'a>>,
    inbox: Option<&'a str>,
    inbox_at: i64,
    resolve_at: Option<i64>,
    dead_letter: Option<CommitDeadLetter<'a>>,
}

#[derive(Serialize)]
pub(crate) struct CommitEntry<'a> {
    at: i64,
    schema_version: u16,
    kind: &'a str,
    body: &'a serde_json::Value,
}

#[derive(Serialize)]
pub(crate) struct CommitOutbox<'a> {
    id: Uuid,
    subject: &'a str,
    headers: &'a Headers,
    /// Hex: any bytes, decoded by the function.
    payload: String,
    created: i64,
    available: i64,
}

#[derive(Serialize)]
pub(crate) struct CommitDeadLetter<'a> {
    id: Uuid,
    category: &'static str,
    saga_id: Option<SagaId>,
    saga_type: Option<&'a str>,
    step: Option<&'a str>,
    kind: Option<&'static str>,
    reason: &'a str,
    attempts: u32,
    message: Option<&'a serde_json::Value>,
    at: i64,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

impl<'a> CommitWrite<'a> {
    pub(crate) fn of(w: &'a SagaWrite) -> Self {
        let first_at = w.journal.first().map(|j| j.at).unwrap_or_default();
        let state = w.state.as_ref();
        CommitWrite {
            id: w.id,
            expected: w.expected_version,
            state,
            saga_type: state.map(|s| s.saga_type.as_str()),
            definition_version: state.map(|s| s.definition_version),
            status: state.map(|s| s.status.as_str()),
            wake: state.and_then(|s| s.wake_at()).map(ms),
            created: state.map(|s| ms(s.created_at)),
            updated: state.map(|s| ms(s.updated_at)),
            journal: w
                .journal
                .iter()
                .map(|e| CommitEntry {
                    at: ms(e.at),
                    schema_version: e.schema_version,
                    kind: &e.kind,
                    body: &e.body,
                })
                .collect(),
            outbox: w
                .outbox
                .iter()
                .map(|m| CommitOutbox {
                    id: m.id,
                    subject: &m.message.subject,
                    headers: &m.message.headers,
                    payload: hex(&m.message.payload),
                    created: ms(crate::created_at(m.id)),
                    available: ms(m.available_at),
                })
                .collect(),
            inbox: w.inbox.as_deref(),
            inbox_at: ms(first_at),
            resolve_at: w.resolve_dead_letters.then(|| ms(first_at)),
            dead_letter: w.dead_letter.as_ref().map(|d| CommitDeadLetter {
                id: d.id,
                category: d.category.as_str(),
                saga_id: d.saga_id,
                saga_type: d.saga_type.as_deref(),
                step: d.step.as_deref(),
                kind: d.kind.map(CommandKind::as_str),
                reason: &d.reason,
                attempts: d.attempts,
                message: d.message.as_ref(),
                at: ms(d.at),
            }),
        }
    }
}

/// One claimed outbox row as read back: (seq, id, subject, headers JSON, payload).
pub(crate) type ClaimedRow = (i64, String, String, String, Vec<u8>);

/// Claimed outbox rows in commit order (`RETURNING` promises none), held until `until`.
pub(crate) fn outbox_in_order(
    mut rows: Vec<ClaimedRow>,
    until: Timestamp,
) -> Result<Vec<skald_runtime::ports::OutboxMessage>, StoreError> {
    rows.sort_by_key(|r| r.0);
    rows.into_iter()
        .map(|(_, id, subject, headers, payload)| {
            Ok(skald_runtime::ports::OutboxMessage {
                id: Uuid::parse_str(&id).map_err(|e| corrupt("outbox id", e))?,
                message: skald_runtime::ports::Message {
                    subject,
                    headers: decode_headers(&headers)?,
                    payload: payload.into(),
                },
                available_at: until,
            })
        })
        .collect()
}

/// Claimed wake-ups, oldest due first (`RETURNING` promises no order): (due, id).
pub(crate) fn due_in_order(mut rows: Vec<(i64, String)>) -> Result<Vec<SagaId>, StoreError> {
    rows.sort();
    rows.iter().map(|(_, id)| parse_id(id)).collect()
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

/// Sagas in flight per type (one statement both SQL dialects read alike).
pub(crate) const IN_FLIGHT_COUNTS: &str = "SELECT saga_type, COUNT(*) AS n FROM saga_instances \
     WHERE status IN ('running', 'compensating') GROUP BY saga_type";

/// The columns the operator queries read, the same in both SQL stores: text and 64-bit
/// integers (PostgreSQL's int4 columns are cast to int8 in those queries). Each store
/// implements it for its row type, so the decoders below serve both.
pub(crate) trait QueryRow {
    /// A text column.
    fn text(&self, column: &str) -> Result<String, StoreError>;
    /// A 64-bit integer column.
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    /// A nullable 64-bit integer column.
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;

    /// A count column (negative reads as 0).
    fn count(&self, column: &str) -> Result<u64, StoreError> {
        Ok(u64::try_from(self.int(column)?).unwrap_or(0))
    }

    /// A saga type column.
    fn saga_type(&self, column: &str) -> Result<SagaType, StoreError> {
        SagaType::new(self.text(column)?).map_err(|e| corrupt("saga type", e))
    }

    /// A definition version column.
    fn version(&self, column: &str) -> Result<u32, StoreError> {
        u32::try_from(self.int(column)?).map_err(|e| corrupt("definition version", e))
    }
}

/// `saga_type, n`: sagas in flight per type.
pub(crate) fn decode_type_count(r: &impl QueryRow) -> Result<(SagaType, u64), StoreError> {
    Ok((r.saga_type("saga_type")?, r.count("n")?))
}

/// `saga_type, definition_version, n`: unfinished sagas per type and version.
pub(crate) fn decode_version_count(r: &impl QueryRow) -> Result<(SagaType, u32, u64), StoreError> {
    Ok((
        r.saga_type("saga_type")?,
        r.version("definition_version")?,
        r.count("n")?,
    ))
}

/// `saga_type, definition_version, status, n`: the counts of `skald stats`.
pub(crate) fn decode_status_count(r: &impl QueryRow) -> Result<StatusCount, StoreError> {
    let status = r.text("status")?;
    Ok(StatusCount {
        saga_type: r.text("saga_type")?,
        definition_version: r.version("definition_version")?,
        status: SagaStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        count: r.count("n")?,
    })
}

/// A `skald_sweeps` row.
pub(crate) fn decode_sweep(r: &impl QueryRow) -> Result<SweepStats, StoreError> {
    Ok(SweepStats {
        name: r.text("name")?,
        holder: r.text("holder")?,
        runs: r.count("runs")?,
        last_run: ts(r.int("last_run_ms")?),
        deleted: PurgeReport {
            sagas: r.count("sagas_deleted")?,
            journal_entries: r.count("journal_deleted")?,
            dead_letters: r.count("dead_letters_deleted")?,
            inbox: r.count("inbox_deleted")?,
        },
    })
}

/// The sweepers' totals, as `decode_sweep` reads them.
pub(crate) const SWEEPS: &str = "SELECT name, holder, runs, last_run_ms, sagas_deleted, \
     journal_deleted, dead_letters_deleted, inbox_deleted FROM skald_sweeps ORDER BY name";

/// `skald stats` from its three reads: the counts, the activity row (`started`,
/// `finished`, `outbox_n`, `outbox_oldest`, `open_dl`) and the oldest active saga (`id`,
/// `saga_type`, `created_at_ms`), and the sweepers.
pub(crate) fn store_stats(
    counts: Vec<StatusCount>,
    activity: &impl QueryRow,
    oldest: Option<&impl QueryRow>,
    sweeps: Vec<SweepStats>,
) -> Result<StoreStats, StoreError> {
    let oldest_active = match oldest {
        Some(r) => Some((
            parse_id(&r.text("id")?)?,
            r.text("saga_type")?,
            ts(r.int("created_at_ms")?),
        )),
        None => None,
    };
    Ok(StoreStats {
        counts,
        started_since: activity.count("started")?,
        finished_since: activity.count("finished")?,
        oldest_active,
        outbox_backlog: activity.count("outbox_n")?,
        outbox_oldest: activity.opt_int("outbox_oldest")?.map(ts),
        open_dead_letters: activity.count("open_dl")?,
        sweeps,
    })
}
