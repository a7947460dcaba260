//! The runtime's errors, what each tells the caller to do ([`Disposition`]), and the
//! one place a store error that stops the process is reported (`report_fatal`).

use std::time::Duration;

use tokio::sync::watch;

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
    /// [`RuntimeBuilder::start`](crate::runtime::RuntimeBuilder::start) without a store.
    #[error("no store configured: call .store(..) on the runtime builder")]
    MissingStore,
    /// [`RuntimeBuilder::start`](crate::runtime::RuntimeBuilder::start) without a bus.
    #[error("no bus configured: call .bus(..) on the runtime builder")]
    MissingBus,
    /// [`RuntimeBuilder::start`](crate::runtime::RuntimeBuilder::start) with no saga
    /// definition: the runtime would have nothing to run.
    #[error("no saga definition registered: call .register(&definition) on the runtime builder")]
    NoDefinitions,
    /// One saga type and version registered twice (two definitions would claim the
    /// same stored sagas).
    #[error("saga type {saga_type} version {version} registered twice: register each version once")]
    DuplicateDefinition {
        /// The type.
        saga_type: SagaType,
        /// The version registered twice.
        version: u32,
    },
    /// `RuntimeOptions::inbox_retention` is shorter than the longest an operator
    /// request may be applied ([`MAX_REQUEST_TTL`](crate::runtime::MAX_REQUEST_TTL)): a
    /// replayed request could be applied twice.
    #[error(
        "inbox_retention is {configured:?}: it must be at least {minimum:?}, the longest an \
         operator request may be applied, or a replayed request could be applied twice; \
         raise inbox-retention"
    )]
    InboxRetentionTooShort {
        /// The configured retention.
        configured: Duration,
        /// The least allowed.
        minimum: Duration,
    },
    /// A runtime option is out of its range.
    #[error("invalid runtime option: {0}")]
    InvalidOption(String),
    /// The store's sagas are spread over another number of partitions than the one
    /// configured (`RuntimeOptions::partitions`): the count is fixed for a store's life.
    #[error(
        "this store's sagas are spread over {recorded} partitions, and this runtime is \
         configured with {configured}: the count is fixed for a store's life; leave \
         `partitions` unset to take the store's, or set it to {recorded}"
    )]
    PartitionCount {
        /// The configured count.
        configured: u32,
        /// The count the store recorded.
        recorded: u32,
    },
    /// An entry of `RuntimeOptions::operators` is not a public NKey.
    #[error("operator {name:?}: {reason}; list each operator's public user NKey (U...)")]
    InvalidOperatorKey {
        /// The operator's name in the allowlist.
        name: String,
        /// What is wrong with the key.
        reason: String,
    },
    /// The reply-token secret kept in the store cannot serve as a key.
    #[error(
        "the store's reply-token secret is unusable: {0}; configure the keys with \
         .reply_keys(..) or replace the stored secret"
    )]
    ReplyKeys(String),
    /// [`RuntimeBuilder::start`](crate::runtime::RuntimeBuilder::start) was called
    /// outside a tokio runtime (it becomes the runtime's I/O runtime).
    #[error("Runtime::start must be called inside a multi-thread tokio runtime")]
    NoTokioRuntime,
    /// The actor system's thread could not be spawned, or the system did not come up.
    #[error("the actor system could not start: {0}")]
    ActorSystem(String),
    /// The runtime is shutting down: its actors take no more input. Apply the input on
    /// a runtime that is running (a message left unacknowledged is redelivered to one).
    #[error("the runtime is shutting down: its actors take no more input")]
    ShuttingDown,
    /// A store or bus call run on the I/O runtime panicked or was cancelled. The input
    /// may be applied again; a panic is a bug worth reporting.
    #[error("a store or bus call failed to run (panicked or cancelled): {0}")]
    IoTask(String),
    /// Another writer kept moving the saga on: every re-evaluation of the input found
    /// the stored version changed again. The input may be applied again.
    #[error("saga {id}: still conflicting after {attempts} reloads; apply the input again")]
    Contended {
        /// The saga.
        id: SagaId,
        /// Reloads tried.
        attempts: usize,
    },
    /// A request (a cancel, a re-drive) was refused: this build cannot read the saga's
    /// data (no upcaster from its data version). A build that has one may apply it.
    #[error(
        "the saga's data cannot be read: {0}; register an upcaster for its data, then ask \
         again"
    )]
    DataUnreadable(String),
    /// An operator request's expiry or condition (re-drives, version) does not hold.
    #[error("the request's condition does not hold: {0}")]
    ConditionUnmet(String),
    /// A saga handle's outcome did not come within the time asked for. The saga runs
    /// on: ask again later.
    #[error(
        "saga {id} did not settle within {waited:?}; it runs on: ask for its outcome again later"
    )]
    OutcomeTimeout {
        /// The saga.
        id: SagaId,
        /// How long the handle waited.
        waited: Duration,
    },
    /// A saga handle asked for a saga of one type, and the store holds one of another
    /// type under that id.
    #[error("saga {id} is a {found} saga, not a {expected} saga")]
    SagaTypeMismatch {
        /// The saga.
        id: SagaId,
        /// The type the handle's definition has.
        expected: SagaType,
        /// The type stored.
        found: SagaType,
    },
    /// A keyed start's business key is empty, too long or has control characters.
    #[error(transparent)]
    InvalidKey(crate::ids::NameError),
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
            | RuntimeError::UnregisteredVersions(_)
            | RuntimeError::ShuttingDown
            | RuntimeError::IoTask(_)
            | RuntimeError::Contended { .. } => Disposition::Retry,
            // Start-up refusals: the process must be configured (or deployed) otherwise;
            // trying again may succeed once it is.
            RuntimeError::MissingStore
            | RuntimeError::MissingBus
            | RuntimeError::NoDefinitions
            | RuntimeError::DuplicateDefinition { .. }
            | RuntimeError::InboxRetentionTooShort { .. }
            | RuntimeError::InvalidOption(_)
            | RuntimeError::PartitionCount { .. }
            | RuntimeError::InvalidOperatorKey { .. }
            | RuntimeError::ReplyKeys(_)
            | RuntimeError::NoTokioRuntime
            | RuntimeError::ActorSystem(_) => Disposition::Retry,
            // A build with an upcaster for the saga's data (a deploy in progress) may
            // apply the request.
            RuntimeError::DataUnreadable(_) => Disposition::Retry,
            // The operator asked for a state the saga is not in. Reached only for a saga
            // not yet stored (a stored one journals the refusal instead): it may be by
            // the next delivery, as it always was.
            RuntimeError::ConditionUnmet(_) => Disposition::Retry,
            RuntimeError::OutcomeTimeout { .. } => Disposition::Retry,
            RuntimeError::SagaTypeMismatch { .. } | RuntimeError::InvalidKey(_) => {
                Disposition::Refuse
            }
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

/// Reports a store error on the runtime's fatal channel when the process cannot go on
/// with it (a schema error: the tables are missing or of another shape), and logs it as
/// what stops the runtime; [`Runtime::failed`](crate::runtime::Runtime::failed) resolves
/// with it. Called by the committer, the reply intake (store outages and poison records),
/// the outbox relay and the retention lease; the wake-up sweep, the purges and the
/// metrics sampler only log store errors (the committer and the relay stop the process
/// within a poll interval on the same schema error). Returns whether it was fatal: any
/// other error is the caller's to log and retry.
pub(crate) fn report_fatal(fatal: &watch::Sender<Option<StoreError>>, e: &StoreError) -> bool {
    if !matches!(e, StoreError::Schema(_)) {
        return false;
    }
    tracing::error!(error = %e, "the store's schema is unusable: stopping");
    fatal.send_replace(Some(e.clone()));
    true
}
