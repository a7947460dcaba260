//! Reading rows back, the same in both SQL stores: each store implements [`QueryRow`]
//! for its row type, and every row the stores read is decoded here. Only the SQL text
//! and its binds stay per dialect.

use skald_runtime::ids::{SagaId, SagaType};
use skald_runtime::machine::{SagaState, SagaStatus, Timestamp};
use skald_runtime::ports::{
    DeadLetterCategory, DeadLetterRecord, JournalEntry, Lease, Message, OutboxMessage, PurgeReport,
    SagaSummary, StatusCount, StoreError, StoreStats, StoredSaga, SweepStats,
};
use uuid::Uuid;

use super::{corrupt, decode_headers, parse_id, ts};

/// The columns the stores read: text, integers, bytes. Each store implements it for
/// its row type (mapping its driver's errors), so the decoders below serve both.
pub(crate) trait QueryRow {
    /// A text column.
    fn text(&self, column: &str) -> Result<String, StoreError>;
    /// A nullable text column.
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;
    /// An integer column of any width (PostgreSQL's int2 and int4 are widened).
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    /// A nullable integer column of any width.
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    /// A binary column.
    fn bytes(&self, column: &str) -> Result<Vec<u8>, StoreError>;

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

    /// A saga id column (text: PostgreSQL's uuid columns are read as `id::text`).
    fn saga_id(&self, column: &str) -> Result<SagaId, StoreError> {
        parse_id(&self.text(column)?)
    }

    /// A saga status column.
    fn status(&self, column: &str) -> Result<SagaStatus, StoreError> {
        let status = self.text(column)?;
        SagaStatus::parse(&status).ok_or_else(|| corrupt("status", &status))
    }

    /// A time column (milliseconds since the Unix epoch).
    fn time(&self, column: &str) -> Result<Timestamp, StoreError> {
        Ok(ts(self.int(column)?))
    }
}

/// `state, version`: a saga row.
pub(crate) fn decode_state(r: &impl QueryRow) -> Result<StoredSaga, StoreError> {
    let state = r.text("state")?;
    let version = r.int("version")?;
    let state: SagaState = serde_json::from_str(&state).map_err(|e| corrupt("saga state", e))?;
    Ok(StoredSaga {
        state,
        version: u64::try_from(version).map_err(|e| corrupt("version", e))?,
    })
}

/// `name, holder, until_ms`: a lease.
pub(crate) fn decode_lease(r: &impl QueryRow) -> Result<Lease, StoreError> {
    Ok(Lease {
        name: r.text("name")?,
        holder: r.text("holder")?,
        until: r.time("until_ms")?,
    })
}

/// `at_ms, schema_version, kind, body`: a journal entry as stored. Its record is decoded
/// by the reader (`JournalEntry::record`), after any upcasting.
pub(crate) fn decode_journal_entry(r: &impl QueryRow) -> Result<JournalEntry, StoreError> {
    let body = r.text("body")?;
    Ok(JournalEntry {
        at: r.time("at_ms")?,
        schema_version: u16::try_from(r.int("schema_version")?)
            .map_err(|e| corrupt("journal schema version", e))?,
        kind: r.text("kind")?,
        body: serde_json::from_str(&body).map_err(|e| corrupt("journal body", e))?,
    })
}

/// `id, saga_type, status, created_at_ms, updated_at_ms`: a row of `list`.
pub(crate) fn decode_summary(r: &impl QueryRow) -> Result<SagaSummary, StoreError> {
    Ok(SagaSummary {
        id: r.saga_id("id")?,
        saga_type: r.saga_type("saga_type")?,
        status: r.status("status")?,
        created_at: r.time("created_at_ms")?,
        updated_at: r.time("updated_at_ms")?,
    })
}

/// `id`: saga ids.
pub(crate) fn decode_ids(rows: &[impl QueryRow]) -> Result<Vec<SagaId>, StoreError> {
    rows.iter().map(|r| r.saga_id("id")).collect()
}

/// A dead letter, as each store's `DEAD_LETTER_COLUMNS` select it.
pub(crate) fn decode_dead_letter(r: &impl QueryRow) -> Result<DeadLetterRecord, StoreError> {
    let category = match r.opt_text("category")?.as_deref() {
        Some("saga") => DeadLetterCategory::Saga,
        Some("poison") => DeadLetterCategory::Poison,
        other => return Err(corrupt("dead letter category", format!("{other:?}"))),
    };
    let id = r.opt_text("id")?.unwrap_or_default();
    Ok(DeadLetterRecord {
        id: Uuid::parse_str(&id).map_err(|e| corrupt("dead letter id", e))?,
        category,
        saga_id: r.opt_text("saga_id")?.map(|s| parse_id(&s)).transpose()?,
        saga_type: r.opt_text("saga_type")?,
        step: r.opt_text("step")?,
        kind: r.opt_text("kind")?.and_then(|k| k.parse().ok()),
        reason: r.opt_text("reason")?.unwrap_or_default(),
        attempts: u32::try_from(r.int("attempts")?).unwrap_or(0),
        message: r
            .opt_text("message")?
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| corrupt("dead letter message", e))?,
        at: r.time("created_at_ms")?,
        resolved_at: r.opt_int("resolved_at_ms")?.map(ts),
    })
}

/// Claimed outbox rows (`seq, id, subject, headers, payload`) in commit order
/// (`RETURNING` promises none), held until `until`.
pub(crate) fn outbox_in_order(
    rows: &[impl QueryRow],
    until: Timestamp,
) -> Result<Vec<OutboxMessage>, StoreError> {
    let mut claimed = rows
        .iter()
        .map(|r| {
            Ok((
                r.int("seq")?,
                r.text("id")?,
                r.text("subject")?,
                r.text("headers")?,
                r.bytes("payload")?,
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    claimed.sort_by_key(|r| r.0);
    claimed
        .into_iter()
        .map(|(_, id, subject, headers, payload)| {
            Ok(OutboxMessage {
                id: Uuid::parse_str(&id).map_err(|e| corrupt("outbox id", e))?,
                message: Message {
                    subject,
                    headers: decode_headers(&headers)?,
                    payload: payload.into(),
                },
                available_at: until,
            })
        })
        .collect()
}

/// Claimed wake-ups (`id, next_wakeup_ms`), oldest due first (`RETURNING` promises no
/// order).
pub(crate) fn due_in_order(rows: &[impl QueryRow]) -> Result<Vec<SagaId>, StoreError> {
    let mut due = rows
        .iter()
        .map(|r| Ok((r.int("next_wakeup_ms")?, r.text("id")?)))
        .collect::<Result<Vec<(i64, String)>, StoreError>>()?;
    due.sort();
    due.iter().map(|(_, id)| parse_id(id)).collect()
}

/// The outbox's backlog and its oldest row, as `decode_backlog` reads them.
pub(crate) const OUTBOX_BACKLOG: &str =
    "SELECT COUNT(*) AS n, MIN(created_at_ms) AS oldest FROM outbox";

/// `n, oldest`: the outbox's backlog.
pub(crate) fn decode_backlog(r: &impl QueryRow) -> Result<(u64, Option<Timestamp>), StoreError> {
    Ok((r.count("n")?, r.opt_int("oldest")?.map(ts)))
}

/// `value`: a shared secret read back after its insert-if-absent (`None`: the row
/// vanished once stored).
pub(crate) fn stored_secret(
    name: &str,
    row: Option<&impl QueryRow>,
) -> Result<Vec<u8>, StoreError> {
    match row {
        Some(r) => r.bytes("value"),
        None => Err(corrupt(
            "shared secret",
            format!("{name:?} vanished once stored"),
        )),
    }
}

/// Sagas in flight per type (one statement both SQL dialects read alike).
pub(crate) const IN_FLIGHT_COUNTS: &str = "SELECT saga_type, COUNT(*) AS n FROM saga_instances \
     WHERE status IN ('running', 'compensating') GROUP BY saga_type";

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
    Ok(StatusCount {
        saga_type: r.text("saga_type")?,
        definition_version: r.version("definition_version")?,
        status: r.status("status")?,
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
