//! Starting a saga inside the caller's own database transaction: an order row and its
//! checkout saga commit together, or not at all.
//!
//! The start is decided before the transaction, without I/O
//! ([`Runtime::prepare_start`], [`Runtime::prepare_start_keyed`]): the saga's first
//! state, its journal entry and its first command, as one [`SagaWrite`], exactly what
//! the saga's actor would commit for `Input::Started`. The caller writes it in its own
//! transaction with its store's `start_in` (`skald_adapters::postgres::PostgresStore`,
//! `skald_adapters::sqlite::SqliteStore`), on the database the runtime's store uses,
//! and commits. Nothing is ever published from the prepared start itself: its messages
//! are outbox rows, available to the outbox relay at once, so the first command goes out
//! only once the transaction has committed: at once when [`Runtime::started`] wakes this
//! process's relay, else at the next poll of any relay sharing the store
//! (`RuntimeOptions::outbox_poll_interval`). A
//! transaction rolled back leaves no saga, no journal and no outbox row: nothing is
//! sent. [`Runtime::started`] then returns the saga's handle.
//!
//! Unlike a [`Runtime::start_saga`], the outbox rows are written whatever
//! `RuntimeOptions::outbox` says: there is no actor to hand the messages to after the
//! caller's commit, only the relay.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Runtime, SagaHandle};
use crate::actors::{Decider, RuntimeStats, Then};
use crate::definition::SagaDefinition;
use crate::error::RuntimeError;
use crate::ids::SagaId;
use crate::machine::{Effect, Input, SagaState};
use crate::ports::{SagaWrite, StoreError, StoredSaga};

/// A saga start decided and not yet written: the write to commit in the caller's own
/// transaction (a store's `start_in`), then [`Runtime::started`] once that transaction
/// committed. From [`Runtime::prepare_start`] or [`Runtime::prepare_start_keyed`].
///
/// The saga's clock starts when it is prepared (its creation time, its first reply
/// deadline): prepare it right before the transaction that writes it. A prepared start
/// can be written again if that transaction failed and is retried; once one of them
/// committed, another write of it finds the saga existing.
pub struct PreparedStart<D> {
    write: SagaWrite,
    /// The state the start was applied to (status `Created`), for the metrics.
    created: SagaState,
    /// What the start's transition did (its first command, its `started` event).
    effects: Vec<Effect>,
    definition: SagaDefinition<D>,
}

impl<D> std::fmt::Debug for PreparedStart<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedStart")
            .field("id", &self.write.id)
            .field("saga_type", &self.created.saga_type)
            .field("outbox_rows", &self.write.outbox.len())
            .finish_non_exhaustive()
    }
}

impl<D> PreparedStart<D> {
    /// The saga's id (for a keyed start, derived from its type and key).
    pub fn id(&self) -> SagaId {
        self.write.id
    }

    /// What a store writes in the caller's transaction: the saga's row (expected version
    /// 0: the saga must not exist), its journal entry and its outbox rows, available to
    /// the relay at once.
    pub fn write(&self) -> &SagaWrite {
        &self.write
    }
}

/// A store's `start_in` takes the prepared start as the write it carries.
impl<D> AsRef<SagaWrite> for PreparedStart<D> {
    fn as_ref(&self) -> &SagaWrite {
        &self.write
    }
}

impl Runtime {
    /// Prepares the start of a new saga of `definition`'s type with `data`, to be written
    /// in the caller's own database transaction, with the caller's own rows (an order and
    /// its checkout saga commit together, or not at all). No I/O: decides the saga's
    /// first state, journal entry and outbox rows (its first command).
    ///
    /// Write it with the store's `start_in` on a connection to the database the
    /// runtime's store uses (`skald_adapters::postgres::PostgresStore::start_in`,
    /// `skald_adapters::sqlite::SqliteStore::start_in`, whose documentation shows the
    /// whole sequence), commit, then call [`Runtime::started`]. The first command goes
    /// out through the outbox after the commit, published by the outbox relay (within
    /// `RuntimeOptions::outbox_poll_interval`); a transaction rolled back leaves nothing
    /// and sends nothing.
    ///
    /// Refused, like [`Runtime::start_saga`], for a definition not registered here or
    /// not its type's latest version, and for data that does not encode.
    pub fn prepare_start<D>(
        &self,
        definition: &SagaDefinition<D>,
        data: &D,
    ) -> Result<PreparedStart<D>, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        self.prepare(self.shared.ownership.fresh_id(), definition, data)
    }

    /// Like [`Runtime::prepare_start`], for the one saga of `definition`'s type for
    /// business key `key` (its id is [`SagaId::for_key`], as with
    /// [`Runtime::start_saga_keyed`]). If a saga with that key exists once the write
    /// reaches the database, `start_in` writes nothing and says so (`TxStart::Existing`):
    /// the caller's transaction is left as it was, to commit or roll back, and
    /// [`Runtime::saga`] is the existing saga's handle.
    pub fn prepare_start_keyed<D>(
        &self,
        definition: &SagaDefinition<D>,
        key: &str,
        data: &D,
    ) -> Result<PreparedStart<D>, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        let id = SagaId::for_key(definition.definition().saga_type(), key)
            .map_err(RuntimeError::InvalidKey)?;
        self.prepare(id, definition, data)
    }

    /// The handle of a saga whose prepared start the caller's transaction committed
    /// (`start_in` answered `TxStart::Written`). Reads nothing: a handle to a start that
    /// was rolled back (or never written) answers [`RuntimeError::UnknownSaga`]. It
    /// wakes the outbox relay, which publishes the saga's first command at once; its
    /// actor activates when the first reply comes.
    ///
    /// For a start that found its saga existing (`TxStart::Existing`), take the existing
    /// saga's handle with [`Runtime::saga`] instead: this one would count a start that
    /// did not happen.
    pub fn started<D>(&self, start: PreparedStart<D>) -> SagaHandle<D>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        let PreparedStart {
            write,
            created,
            effects,
            definition,
        } = start;
        let shared = &self.shared;
        RuntimeStats::incr(&shared.stats.transitions);
        if let Ok(def) = shared.definition(&created.saga_type, created.definition_version) {
            let at = write
                .state
                .as_ref()
                .map_or(created.updated_at, |s| s.updated_at);
            shared
                .metrics
                .transition(def, &created, &Input::Started, &effects, at);
        }
        // The first command goes out now, not at the relay's next poll.
        shared.relay_nudge.notify_one();
        self.handle(write.id, false, &definition)
    }

    /// Decides the start of saga `id` as its actor would, with every message stored in
    /// the outbox and available to the relay at once.
    fn prepare<D>(
        &self,
        id: SagaId,
        definition: &SagaDefinition<D>,
        data: &D,
    ) -> Result<PreparedStart<D>, RuntimeError>
    where
        D: Serialize + DeserializeOwned + Send + 'static,
    {
        let created = self.initial_state(id, definition, data)?;
        let shared = &self.shared;
        let def = Arc::clone(shared.definition(&created.saga_type, created.definition_version)?);
        let decider = Decider {
            upcasters: &shared.upcasters,
            reply_keys: &shared.reply_keys,
            options: &shared.options,
            // No actor publishes these messages after the caller's commit: the relay
            // does, from the outbox, whatever `RuntimeOptions::outbox` says.
            outbox_stored: true,
            partitions: shared.ownership.count(),
        };
        let mut saga = StoredSaga {
            state: created.clone(),
            version: 0,
        };
        let now = shared.clock.now();
        let decision = decider.decide(&def, &mut saga, &Input::Started, None, None, now)?;
        let effects = match decision.then {
            Then::Transitioned { effects, .. } => effects,
            // Only a saga that exists has an input ignored; this one does not yet.
            Then::Ignored { reason } => {
                return Err(RuntimeError::Store(StoreError::Other(format!(
                    "saga {id}: its start was refused: {reason}"
                ))));
            }
        };
        let mut write = decision.write;
        // The decider holds a writer's rows for `claim_lease`, because that writer
        // publishes them right after its commit. Nobody publishes these directly: they
        // are the relay's from the moment the caller's transaction commits.
        for row in &mut write.outbox {
            row.available_at = now;
        }
        Ok(PreparedStart {
            write,
            created,
            effects,
            definition: definition.clone(),
        })
    }
}
