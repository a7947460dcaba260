//! What the SQL stores share: timestamps as milliseconds, decoding helpers, and the
//! classification of sqlx errors into the port's [`StoreError`].

use skald_runtime::ids::SagaId;
use skald_runtime::machine::Timestamp;
use skald_runtime::ports::{Headers, StoreError};

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub(crate) fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn ts(ms: i64) -> Timestamp {
    Timestamp(u64::try_from(ms).unwrap_or(0))
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
