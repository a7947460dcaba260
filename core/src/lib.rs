//! # skald-core
//!
//! What decides, with no I/O: the crate depends on no actix, tokio, sqlx or async-nats,
//! so the compiler keeps the machine pure. The runtime (`skald-runtime`), the adapters,
//! the sagas and the CLI build on it.
//!
//! - [`ids`]: typed names and ids (`SagaId`, `SagaType`, `StepName`, `CommandKind`) and
//!   the one constructor of every derived id (message ids, idempotency keys, reply ids).
//! - [`retry`]: the retry math (exponential backoff, full jitter).
//! - [`definition`]: the typed builder and the validated, type-erased [`Definition`].
//! - [`machine`]: the state machine, `transition(&definition, &state, input, now)`.
//! - [`journal`]: a saga's history as one typed enum, and how a store keeps it.
//! - [`replay`]: the journal fed back through the machine: time travel, replay checks.
//! - [`upcast`]: payload schema versions and the upcasters that bring old payloads up.
//! - [`testing`]: [`SagaTest`](testing::SagaTest), unit tests for a saga definition
//!   with virtual time.
//! - [`text`]: bounded text for errors and records.
//!
//! [`Definition`]: definition::Definition

pub mod definition;
pub mod ids;
pub mod journal;
pub mod machine;
pub mod replay;
pub mod retry;
pub mod testing;
pub mod text;
pub mod upcast;

/// Serde helper: a `Duration` as whole milliseconds.
pub mod serde_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises `d` as whole milliseconds (saturating).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Serde helper: an optional `Duration` as whole milliseconds (or null).
pub mod serde_millis_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises `d` as whole milliseconds (saturating), or null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    /// Reads whole milliseconds, or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}
