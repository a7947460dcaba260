//! The runtime's errors, and what each tells the caller to do.

use crate::definition::DataError;
use crate::ids::{SagaId, SagaType};
use crate::machine::TransitionError;
use crate::ports::{BusError, StoreError};

/// What to do with the message that caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Try again later (do not acknowledge; redeliver after a delay).
    Retry,
    /// Never processable: dead-letter it with the reason and acknowledge.
    DeadLetter,
    /// The caller's request was refused (e.g. re-drive of a running saga).
    Refuse,
    /// Another build must apply it (version skew during a deploy: a definition version
    /// or a data schema this build does not have): redeliver later, not counted against
    /// `max_deliveries`; dead-lettered only past `max_deferrals` (days).
    Defer,
}

/// Errors of the runtime shell.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// No saga with this id exists in the store.
    #[error("unknown saga {0}")]
    UnknownSaga(SagaId),
    /// No definition is registered for this saga type (and version).
    #[error("no definition registered for saga type {saga_type} version {version}")]
    UnknownSagaType {
        /// The type.
        saga_type: SagaType,
        /// The version.
        version: u32,
    },
    /// The input was refused by the machine.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Saga data could not be encoded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The instance actor could not be reached (it crashed or was stopping).
    #[error("saga {0}: instance actor unavailable")]
    ActorUnavailable(SagaId),
    /// A saga was started on a definition version older than the latest registered one
    /// of its type (new sagas start on the latest).
    #[error(
        "saga type {saga_type}: version {version} is not the latest registered ({latest}); \
         new sagas start on the latest version"
    )]
    NotLatestVersion {
        /// The type.
        saga_type: SagaType,
        /// The version asked for.
        version: u32,
        /// The latest registered.
        latest: u32,
    },
    /// Start-up found unfinished sagas on definition versions this runtime does not
    /// register: it could not run them.
    #[error("{}", unregistered_message(.0))]
    UnregisteredVersions(Vec<(SagaType, u32, u64)>),
    /// The saga's data was written by a newer build (a higher data schema version than
    /// this build's definition declares): a runtime of that build must apply the input.
    #[error("{0}")]
    DataTooNew(String),
    /// The runtime is shutting down or failed to start.
    #[error("runtime: {0}")]
    Runtime(String),
}

fn unregistered_message(found: &[(SagaType, u32, u64)]) -> String {
    let list: Vec<String> = found
        .iter()
        .map(|(t, v, n)| format!("{n} unfinished {t} saga(s) on definition version {v}"))
        .collect();
    format!(
        "the store holds {}, older than this runtime's latest and not registered: register \
         those versions again (.register(&definition) for each) until their sagas finish; \
         dead-lettered ones need a re-drive (skald dlq redrive) or, if running, can be \
         cancelled (skald cancel ID) while their version is registered",
        list.join(", ")
    )
}

impl RuntimeError {
    /// What to do with the message that caused it.
    pub fn disposition(&self) -> Disposition {
        match self {
            // The saga's stored data cannot be read by this build: retrying won't help.
            RuntimeError::Store(StoreError::Corrupt(_)) => Disposition::DeadLetter,
            // Transient, or a process-level problem (schema) an operator fixes: keep the
            // message (the intake dead-letters it after `max_deliveries`).
            RuntimeError::Store(_) => Disposition::Retry,
            RuntimeError::Bus(_)
            | RuntimeError::ActorUnavailable(_)
            | RuntimeError::Runtime(_)
            | RuntimeError::UnregisteredVersions(_) => Disposition::Retry,
            RuntimeError::DataTooNew(_) => Disposition::Defer,
            RuntimeError::NotLatestVersion { .. } => Disposition::Refuse,
            // A definition (version) not registered here: a deployment in progress may
            // bring it; keep the message rather than lose it.
            RuntimeError::UnknownSagaType { .. } => Disposition::Defer,
            RuntimeError::UnknownSaga(_) | RuntimeError::Data(_) => Disposition::DeadLetter,
            RuntimeError::Transition(t) if t.is_poison() => Disposition::DeadLetter,
            RuntimeError::Transition(_) => Disposition::Refuse,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.disposition(), Disposition::Retry | Disposition::Defer)
    }
}
