//! Ports: the traits the runtime needs from the outside world, implemented by adapters.
//!
//! - [`SagaStore`]: saga instances (optimistic concurrency), journal, outbox, inbox, dead
//!   letters, and claims on due wake-ups and unpublished outbox rows (so several
//!   processes sharing one store never fire or publish the same thing twice).
//! - [`Bus`]: publish messages; subscribe with explicit acknowledgement; serve and send
//!   requests (core request/reply, for start requests).
//! - [`Clock`] and [`JitterSource`]: injected so tests control time and randomness.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ids::{CommandKind, SagaId, SagaType};
use crate::machine::{SagaState, SagaStatus, Timestamp};
use crate::retry::Jitter;

// ---------------------------------------------------------------------------------------
// Store

/// A saga as stored: its state and its version (optimistic concurrency).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSaga {
    /// The state.
    pub state: SagaState,
    /// Incremented by every committed state change; `1` after creation.
    pub version: u64,
}

pub use skald_core::journal::{JOURNAL_SCHEMA_VERSION, JournalEntry};

/// What a dead letter is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterCategory {
    /// A saga whose compensation could not be done; re-drivable.
    Saga,
    /// A message that could not be processed (undecodable, unknown saga or step).
    Poison,
}

impl DeadLetterCategory {
    /// As stored: `saga` or `poison`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterCategory::Saga => "saga",
            DeadLetterCategory::Poison => "poison",
        }
    }
}

/// A dead-lettered saga or poison message, for an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// The record's id.
    pub id: Uuid,
    /// Saga or poison.
    pub category: DeadLetterCategory,
    /// The saga, when known.
    pub saga_id: Option<SagaId>,
    /// The saga type, when known (raw: a poison message may carry garbage).
    pub saga_type: Option<String>,
    /// The step, when known.
    pub step: Option<String>,
    /// Action or compensation, when known.
    pub kind: Option<CommandKind>,
    /// Why.
    pub reason: String,
    /// Attempts made (sagas) or deliveries seen (poison).
    pub attempts: u32,
    /// The raw message (subject, headers, body) for poison messages.
    pub message: Option<Value>,
    /// When.
    pub at: Timestamp,
    /// When an operator's re-drive resolved it (saga dead letters only); `None` while
    /// open. Set by the store, ignored when a record is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Timestamp>,
}

/// A message to publish, stored in the outbox in the same transaction as the state
/// change that caused it, so that a crash between the commit and the publish loses
/// nothing: whatever is left unpublished is published by a relay.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// The row's id (UUID v7: time-ordered).
    pub id: Uuid,
    /// What to publish.
    pub message: Message,
    /// No relay claims the row before this time. The writer sets it a lease ahead of the
    /// commit, because it publishes the message itself right after committing; a relay
    /// takes over only if that did not happen (a crash, a broker outage).
    pub available_at: Timestamp,
}

/// Everything one transition of one saga writes, committed atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaWrite {
    /// The saga.
    pub id: SagaId,
    /// The saga's partition ([`SagaId::partition`] of the deployment's partition count):
    /// recorded with the saga when it is created, and with every outbox row of the
    /// write, so claims can be limited to the partitions a node holds.
    pub partition: u32,
    /// The version the writer read; `0` creates the saga. Checked for journal-only
    /// writes too: an input ignored on a stale version must be re-evaluated.
    pub expected_version: u64,
    /// The new state; `None` records journal entries only (an ignored input).
    pub state: Option<SagaState>,
    /// Journal entries to append.
    pub journal: Vec<JournalEntry>,
    /// A dead letter to record with the state change.
    pub dead_letter: Option<DeadLetterRecord>,
    /// Mark the saga's open dead letters resolved (a re-drive).
    pub resolve_dead_letters: bool,
    /// Messages the transition publishes (commands, events, dead letters), stored in
    /// the outbox with the state change.
    pub outbox: Vec<OutboxMessage>,
    /// The id of the consumed message that caused the write (a reply), recorded in the
    /// inbox with the state change. A write whose id is already in the inbox was
    /// applied before: it is skipped whole and reported as [`WriteOutcome::Duplicate`].
    pub inbox: Option<String>,
}

/// A lease held in the store ([`SagaStore::leases`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// What it is for (`retention`, `node/<holder>`, `partition/<n>`).
    pub name: String,
    /// Who holds it.
    pub holder: String,
    /// When it ends, unless renewed.
    pub until: Timestamp,
}

/// The result of one [`SagaWrite`] inside a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written; the saga is now at `version`.
    Committed {
        /// The new version.
        version: u64,
    },
    /// Another writer got there first: nothing of this write was applied. Reload and
    /// apply the input again.
    Conflict,
    /// The write's inbox id was recorded by an earlier commit: the message was already
    /// applied, nothing of this write was. Acknowledge the message and move on.
    Duplicate,
}

/// What a retention sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    /// Finished sagas.
    pub sagas: u64,
    /// Their journal entries.
    pub journal_entries: u64,
    /// Their dead letters.
    pub dead_letters: u64,
    /// Inbox ids past the dedupe window.
    pub inbox: u64,
}

impl PurgeReport {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &PurgeReport) {
        self.sagas += other.sagas;
        self.journal_entries += other.journal_entries;
        self.dead_letters += other.dead_letters;
        self.inbox += other.inbox;
    }
}

/// A sweeper's totals (over every process that ran it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SweepStats {
    /// The sweeper (`retention`).
    pub name: String,
    /// The process that ran it last.
    pub holder: String,
    /// Runs.
    pub runs: u64,
    /// When it last ran.
    pub last_run: Timestamp,
    /// What it deleted in all.
    pub deleted: PurgeReport,
}

/// A saga's summary row for listings.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaSummary {
    /// The saga.
    pub id: SagaId,
    /// Its type.
    pub saga_type: SagaType,
    /// Its status.
    pub status: SagaStatus,
    /// Created.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
}

/// Store failures, classified for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or is busy (connection lost, pool timeout, lock
    /// contention, serialization failure). Retry later. Nothing was committed, or (a
    /// connection lost during COMMIT) the outcome is unknown: reload before going on.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data cannot be decoded by this build.
    #[error("stored data is corrupt or of an unknown shape: {0}")]
    Corrupt(String),
    /// The schema is missing or does not match, or migrations failed: the process cannot
    /// run until an operator fixes it (the runtime stops with this error).
    #[error("store schema error: {0}")]
    Schema(String),
    /// Any other error.
    #[error("store error: {0}")]
    Other(String),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Persistence of saga instances, journals and dead letters.
///
/// `commit` takes many writes so that an adapter can commit many instances' transitions
/// in one transaction (group commit); it enforces optimistic concurrency per write.
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Loads a saga.
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError>;

    /// Commits `writes` in one transaction, checking each write's expected version and
    /// inbox id: a write whose version does not match is skipped whole (state, journal,
    /// outbox, inbox, dead letter) and reported as [`WriteOutcome::Conflict`]; one whose
    /// inbox id is already recorded is skipped whole as [`WriteOutcome::Duplicate`]; the
    /// others commit. One outcome per write, in order. The outbox rows in `published`
    /// (published since the last commit) are deleted in the same transaction. An `Err`
    /// means nothing was committed (or, for a connection lost during COMMIT, that the
    /// outcome is unknown).
    async fn commit(
        &self,
        writes: &[SagaWrite],
        published: &[Uuid],
    ) -> Result<Vec<WriteOutcome>, StoreError>;

    /// Claims sagas of the given (type, definition version) pairs whose wake-up is due at
    /// or before `now` and not claimed by someone else, oldest first, for `lease`: until
    /// the lease ends or the saga's state changes, no other caller gets them. (Several
    /// processes sharing the store never fire the same wake-up. A runtime only claims
    /// the sagas it can run: those of other types or versions are someone else's.)
    ///
    /// With `partitions` set, only sagas recorded in one of those partitions, or with no
    /// partition recorded (sagas created before partitions existed), are claimed.
    async fn claim_wakeups(
        &self,
        now: Timestamp,
        types: &[(SagaType, u32)],
        partitions: Option<&[u32]>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<SagaId>, StoreError>;

    /// Claims outbox rows that are available (`available_at <= now`) in commit order, for
    /// `lease`: they are not available to anyone else until the lease ends. The claimer
    /// publishes them and reports them published (they are deleted by the next commit).
    ///
    /// With `partitions` set, only rows of those partitions, or with no partition (a
    /// poison message's announcement, rows written before partitions existed), are
    /// claimed.
    async fn claim_outbox(
        &self,
        now: Timestamp,
        partitions: Option<&[u32]>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError>;

    /// Deletes inbox entries recorded before `before` (their messages can no longer be
    /// redelivered). Returns how many.
    async fn prune_inbox(&self, before: Timestamp) -> Result<u64, StoreError>;

    /// Unpublished outbox rows: how many, and when the oldest was written.
    async fn outbox_backlog(&self) -> Result<(u64, Option<Timestamp>), StoreError>;

    /// Sagas not yet finished (running or compensating), in id order after `after`.
    async fn active_sagas(
        &self,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaId>, StoreError>;

    /// Of `ids`, those whose saga has settled: completed, compensated or failed
    /// (dead-lettered). Unknown ids are left out. Saga handles wait on it
    /// ([`crate::runtime::SagaHandle::outcome`]) for sagas another process settles; the
    /// default loads them one by one, a SQL store asks in one query.
    async fn settled_among(&self, ids: &[SagaId]) -> Result<Vec<SagaId>, StoreError> {
        let mut settled = Vec::new();
        for id in ids {
            if let Some(saga) = self.load(*id).await?
                && saga.state.status.is_settled()
            {
                settled.push(*id);
            }
        }
        Ok(settled)
    }

    /// Unfinished sagas (created, running, compensating or failed) of `types`, counted
    /// per (type, definition version): what a runtime must be able to run.
    async fn unfinished_versions(
        &self,
        types: &[SagaType],
    ) -> Result<Vec<(SagaType, u32, u64)>, StoreError>;

    /// Takes, or renews, the lease `name` for `holder` until `now + lease`, if it is free
    /// (expired) or already `holder`'s. Returns whether `holder` holds it now. Several
    /// processes sharing the store use it to let one of them do a periodic job.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Takes or renews every lease of `names` for `holder` until `now + lease` (as
    /// [`SagaStore::acquire_lease`] does one), in one round trip. Returns the names
    /// `holder` holds now, in any order. Orchestrator nodes renew their membership and
    /// their partitions with it at every heartbeat.
    async fn acquire_leases(
        &self,
        names: &[String],
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let mut held = Vec::with_capacity(names.len());
        for name in names {
            if self.acquire_lease(name, holder, now, lease).await? {
                held.push(name.clone());
            }
        }
        Ok(held)
    }

    /// Ends the leases of `names` that `holder` holds, at once (a node handing its
    /// partitions over, or leaving). Leases held by someone else are left alone.
    async fn release_leases(&self, names: &[String], holder: &str) -> Result<(), StoreError>;

    /// The leases whose name starts with `prefix` and that are held at `now` (not
    /// expired), in name order.
    async fn leases(&self, prefix: &str, now: Timestamp) -> Result<Vec<Lease>, StoreError>;

    /// Deletes up to `limit` finished (completed or compensated) sagas whose last
    /// transition was before `before`, with their journals and dead letters, oldest
    /// first, in one transaction. Returns what it deleted (`inbox` is 0).
    ///
    /// Keyed sagas (version-8 ids, [`SagaId::for_key`]) are never deleted: a business
    /// key names one saga for good. Deleted, a later start with the same key would
    /// re-create the same saga id, and every participant's fence (keyed by
    /// `<saga id>:<step>:<kind>`, never purged) would answer the new saga's commands with
    /// the old saga's recorded outcomes; skald's inbox and the broker's dedupe window
    /// could drop its replies. The store leaves them out in its selection of the batch,
    /// not after it: a batch of `limit` is made of purgeable sagas only, and a sweep that
    /// calls this until it deletes fewer than `limit` ends even when every old finished
    /// saga is keyed.
    async fn purge_finished(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<PurgeReport, StoreError>;

    /// Adds one run of the sweeper `name` by `holder` at `at` to its totals.
    async fn record_sweep(
        &self,
        name: &str,
        holder: &str,
        at: Timestamp,
        report: &PurgeReport,
    ) -> Result<(), StoreError>;

    /// The secret stored under `name`: `candidate` is stored if none is yet, and the
    /// stored value returned, so every process sharing the store agrees on one (the key
    /// of the reply tokens, [`crate::wire::H_REPLY_TOKEN`]) with no configuration.
    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let _ = (name, candidate);
        Err(StoreError::Other(
            "this store keeps no shared secrets: configure the reply keys explicitly \
             (RuntimeBuilder::reply_keys)"
                .into(),
        ))
    }

    /// Records a poison message (a dead letter that belongs to no saga transition), with
    /// the outbox rows announcing it, in one transaction.
    async fn record_poison(
        &self,
        record: &DeadLetterRecord,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    /// Dead letters, newest first; `open_only` leaves out resolved ones.
    async fn dead_letters(
        &self,
        open_only: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError>;

    /// A saga's journal, oldest first.
    async fn journal(&self, id: SagaId) -> Result<Vec<JournalEntry>, StoreError>;

    /// Sagas, optionally of one status, in id order after `after`: a stable order to page
    /// through every saga (pass the last id of a page as `after` for the next one), each
    /// returned once; sagas created or deleted while paging may or may not be seen.
    ///
    /// Id order is not time order: unkeyed ids (version 7) sort by creation time, keyed
    /// ids (version 8, [`SagaId::for_key`]) are hashes of their key and fall anywhere
    /// (nearly all above every version-7 id). For newest first by creation time, use
    /// [`SagaQueries::query`] with [`SagaOrder::NewestFirst`].
    async fn list(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, StoreError>;

    /// How many sagas of each type are in flight (running or compensating), for the
    /// `skald_sagas_in_flight` gauge. The default pages through [`SagaStore::list`];
    /// stores with a cheaper count override it.
    async fn in_flight_counts(&self) -> Result<Vec<(SagaType, u64)>, StoreError> {
        const PAGE: usize = 1_000;
        let mut counts: Vec<(SagaType, u64)> = Vec::new();
        for status in [SagaStatus::Running, SagaStatus::Compensating] {
            let mut after = None;
            loop {
                let page = self.list(Some(status), after, PAGE).await?;
                for s in &page {
                    match counts.iter_mut().find(|(t, _)| *t == s.saga_type) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((s.saga_type.clone(), 1)),
                    }
                }
                match page.last() {
                    Some(last) if page.len() == PAGE => after = Some(last.id),
                    _ => break,
                }
            }
        }
        Ok(counts)
    }
}

// ---------------------------------------------------------------------------------------
// Operator queries

/// The order of [`SagaQuery`] results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SagaOrder {
    /// Newest first by creation time (then by id).
    #[default]
    NewestFirst,
    /// The ones whose last transition is oldest first (for finding stuck sagas).
    LeastRecentlyUpdated,
}

/// Which sagas [`SagaQueries::query`] returns. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaQuery {
    /// Only these statuses (empty: any).
    pub statuses: Vec<SagaStatus>,
    /// Only this type.
    pub saga_type: Option<SagaType>,
    /// Only sagas on this definition version.
    pub definition_version: Option<u32>,
    /// Only sagas created at or after this time.
    pub created_after: Option<Timestamp>,
    /// Only sagas whose last transition was before this time.
    pub updated_before: Option<Timestamp>,
    /// The order.
    pub order: SagaOrder,
    /// At most this many (the store caps it at 10,000).
    pub limit: usize,
}

/// Which dead letters [`SagaQueries::find_dead_letters`] returns, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterQuery {
    /// Leave out resolved (re-driven) ones.
    pub open_only: bool,
    /// Only those of this saga type (raw: poison messages may carry any string).
    pub saga_type: Option<String>,
    /// Only this category.
    pub category: Option<DeadLetterCategory>,
    /// At most this many.
    pub limit: usize,
}

/// How many sagas of one type, definition version and status are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusCount {
    /// The type.
    pub saga_type: String,
    /// The definition version.
    pub definition_version: u32,
    /// The status.
    pub status: SagaStatus,
    /// How many.
    pub count: u64,
}

/// The store's side of `skald stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Sagas per type, definition version and status.
    pub counts: Vec<StatusCount>,
    /// Sagas created at or after the `since` asked for.
    pub started_since: u64,
    /// Sagas that reached a terminal status at or after `since` (their last transition).
    pub finished_since: u64,
    /// The oldest saga still running or compensating: id, type and creation time.
    pub oldest_active: Option<(SagaId, String, Timestamp)>,
    /// Unpublished outbox rows.
    pub outbox_backlog: u64,
    /// When the oldest unpublished outbox row was written.
    pub outbox_oldest: Option<Timestamp>,
    /// Dead letters not resolved yet, sagas and poison messages together.
    pub open_dead_letters: u64,
    /// What the sweepers did.
    pub sweeps: Vec<SweepStats>,
}

/// The operator's read side of a store (`skald sagas`, `show`, `stuck`, `stats`, `dlq`):
/// queries the runtime itself never needs. Every adapter implements it.
#[async_trait]
pub trait SagaQueries: SagaStore {
    /// Sagas matching `query`, in its order, with their full state.
    async fn query(&self, query: &SagaQuery) -> Result<Vec<StoredSaga>, StoreError>;

    /// Counts and activity since `since` (see [`StoreStats`]).
    async fn stats(&self, since: Timestamp) -> Result<StoreStats, StoreError>;

    /// Dead letters matching `query`, newest first.
    async fn find_dead_letters(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetterRecord>, StoreError>;

    /// The dead letters with id `id`, or of the saga `id`, newest first.
    async fn dead_letters_of(&self, id: Uuid) -> Result<Vec<DeadLetterRecord>, StoreError>;
}

/// The most rows one operator query returns.
pub const MAX_QUERY_ROWS: usize = 10_000;

// ---------------------------------------------------------------------------------------
// Bus

/// Message headers: ordered name/value pairs (names compared case-sensitively).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }
    /// Sets `name` (replacing an earlier value).
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
    /// Adds `name` without looking for an earlier value: for copying headers whose
    /// names are already unique (a broker's header map), in linear time. `get` finds the
    /// first value of a name.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }
    /// How many pairs there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    /// All pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// A message on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The subject.
    pub subject: String,
    /// The headers.
    pub headers: Headers,
    /// The body.
    pub payload: Bytes,
}

impl Message {
    /// The message as JSON, for dead letters (the body as text where it is UTF-8),
    /// capped: at most [`RECORD_MAX_BODY`] bytes of body, [`RECORD_MAX_HEADERS`]
    /// headers of at most [`RECORD_MAX_VALUE`] bytes each, and the subject's first
    /// [`RECORD_MAX_VALUE`] bytes, so a dead letter (and its announcement on the bus)
    /// stays small whatever a sender put in the message. `truncated` says whether
    /// anything was cut; `body_bytes` and `header_count` give the original sizes. The
    /// values of `Skald-Reply-Token` and `Skald-Signature` are replaced by `***`.
    pub fn to_record(&self) -> Value {
        self.to_record_of(self.payload.len())
    }

    /// [`Message::to_record`] of a message whose body had `body_bytes` bytes before it
    /// was cut (the runtime keeps only the start of an oversized body).
    pub fn to_record_of(&self, body_bytes: usize) -> Value {
        let body = String::from_utf8_lossy(&self.payload);
        // A reply token or an operator's signature would let whoever reads dead letters
        // answer that attempt, or replay that request: not kept.
        let secret = |n: &str| n == crate::wire::H_REPLY_TOKEN || n == crate::wire::H_SIGNATURE;
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .take(RECORD_MAX_HEADERS)
            .map(|(n, v)| {
                let v = if secret(n) {
                    "***"
                } else {
                    cap(v, RECORD_MAX_VALUE)
                };
                (cap(n, RECORD_MAX_VALUE), v)
            })
            .collect();
        let truncated = body_bytes > self.payload.len()
            || self.payload.len() > RECORD_MAX_BODY
            || self.headers.len() > RECORD_MAX_HEADERS
            || self.subject.len() > RECORD_MAX_VALUE
            || self
                .headers
                .iter()
                .any(|(n, v)| n.len() > RECORD_MAX_VALUE || v.len() > RECORD_MAX_VALUE);
        serde_json::json!({
            "subject": cap(&self.subject, RECORD_MAX_VALUE),
            "headers": headers,
            "body": cap(&body, RECORD_MAX_BODY),
            "body_bytes": body_bytes,
            "header_count": self.headers.len(),
            "truncated": truncated,
        })
    }
}

/// The most body bytes a dead letter keeps of a raw message.
pub const RECORD_MAX_BODY: usize = 16 * 1024;
/// The most headers a dead letter keeps of a raw message.
pub const RECORD_MAX_HEADERS: usize = 32;
/// The most bytes a dead letter keeps of one header name, value or the subject.
pub const RECORD_MAX_VALUE: usize = 512;

pub use skald_core::text::cap;

/// Bus failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The broker cannot be reached right now; retry later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The bus was shut down.
    #[error("bus closed")]
    Closed,
    /// Nobody serves requests on the subject ([`Bus::request`]): the broker answered at
    /// once that no subscriber listens there (NATS: a `503` status).
    #[error("no responders on {0}")]
    NoResponders(String),
    /// This bus cannot do what was asked (a bus that does not serve requests).
    #[error("not supported by this bus: {0}")]
    Unsupported(String),
    /// Any other error.
    #[error("bus error: {0}")]
    Other(String),
}

impl BusError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BusError::Unavailable(_))
    }
}

/// How a consumed message is settled.
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// Processed: never deliver it again.
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
    /// Not processed: deliver it again after `delay`.
    async fn nak(self: Box<Self>, delay: Duration) -> Result<(), BusError>;
    /// Never processable (poison): do not deliver it again.
    async fn term(self: Box<Self>, reason: &str) -> Result<(), BusError>;
    /// Still being worked on (it waits for capacity): do not redeliver it yet. A bus
    /// without an acknowledgement deadline ignores it (the default).
    async fn progress(&self) -> Result<(), BusError> {
        Ok(())
    }
}

/// A consumed message and its settlement handle.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// How many times it has been delivered (1 the first time).
    pub delivery_count: u32,
    /// The bus's identity of the message, the same on every redelivery (JetStream: the
    /// stream and sequence), when the bus has one.
    pub bus_id: Option<String>,
    acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("delivery_count", &self.delivery_count)
            .field("bus_id", &self.bus_id)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Wraps a message with its settlement handle.
    pub fn new(message: Message, delivery_count: u32, acker: Box<dyn Acker>) -> Self {
        Delivery {
            message,
            delivery_count,
            bus_id: None,
            acker,
        }
    }
    /// Sets the bus's identity of the message.
    pub fn with_bus_id(mut self, id: impl Into<String>) -> Self {
        self.bus_id = Some(id.into());
        self
    }
    /// The message's identity for the inbox: the publisher's `Nats-Msg-Id` (the same for
    /// a message published again), else the bus's id (the same for a redelivery).
    pub fn inbox_id(&self) -> Option<String> {
        self.message
            .headers
            .get(crate::wire::H_MSG_ID)
            .map(str::to_owned)
            .or_else(|| self.bus_id.clone())
    }
    /// Tells the bus the message is still being worked on ([`Acker::progress`]).
    pub async fn progress(&self) -> Result<(), BusError> {
        self.acker.progress().await
    }

    /// The message, the delivery count and the settlement handle.
    pub fn into_parts(self) -> (Message, u32, Box<dyn Acker>) {
        (self.message, self.delivery_count, self.acker)
    }
}

/// A stream of deliveries.
pub type Subscription = Pin<Box<dyn Stream<Item = Delivery> + Send>>;

/// Where the answer to a served request goes ([`Responder::reply_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTo<'a> {
    /// Nowhere: the request was published without a reply subject.
    Nowhere,
    /// The subject the requester named (NATS: the request's reply subject). Whoever may
    /// publish a request chooses it, and the broker checks it against nobody's
    /// permissions: the runtime answers only subjects it takes for a requester's inbox.
    Subject(&'a str),
    /// Straight back to the requester, on no subject anyone can name (the in-process
    /// bus).
    Requester,
}

/// How a served request is answered.
#[async_trait]
pub trait Responder: Send + Sync + 'static {
    /// Where [`Responder::respond`] would send the answer.
    fn reply_to(&self) -> ReplyTo<'_>;

    /// Sends `payload`, with `headers`, to the requester. A request that named nowhere to
    /// answer (published without a reply subject) is answered to nobody: `Ok`.
    async fn respond(self: Box<Self>, headers: Headers, payload: Bytes) -> Result<(), BusError>;
}

/// A request received by [`Bus::serve`], and the way to answer it (at most once).
pub struct Request {
    /// The request.
    pub message: Message,
    responder: Box<dyn Responder>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("message", &self.message)
            .field("reply_to", &self.responder.reply_to())
            .finish()
    }
}

impl Request {
    /// Wraps a request with the way to answer it.
    pub fn new(message: Message, responder: Box<dyn Responder>) -> Self {
        Request { message, responder }
    }

    /// Where the answer would go.
    pub fn reply_to(&self) -> ReplyTo<'_> {
        self.responder.reply_to()
    }

    /// The request and the way to answer it, apart: the message can be dropped before
    /// the answer is sent.
    pub fn into_parts(self) -> (Message, Box<dyn Responder>) {
        (self.message, self.responder)
    }
}

/// The requests a server receives ([`Bus::serve`]).
#[async_trait]
pub trait RequestSource: Send + 'static {
    /// The next request received; `None` once the source has ended (after
    /// [`RequestSource::stop`], once the requests received before it were returned).
    /// Cancel-safe: a call dropped before it completes loses no request.
    async fn next(&mut self) -> Option<Request>;

    /// Stops taking requests: the broker hands the next ones to the other servers of
    /// the queue group (or, with none left, answers "no responders"). The requests
    /// received before it are still returned by [`RequestSource::next`], which then
    /// returns `None`.
    async fn stop(&mut self);
}

/// The requests a server receives ([`Bus::serve`]); dropping it stops serving (without
/// returning what was received).
pub type RequestStream = Box<dyn RequestSource>;

/// Publish/subscribe with explicit acknowledgement.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a message. For a durable bus, returns once the broker stored it.
    async fn publish(&self, message: Message) -> Result<(), BusError>;

    /// Subscribes to the messages on any of `subjects` (wildcards `*` and `>` allowed).
    /// Subscribers sharing a `group` share the messages (each goes to one of them); a
    /// durable bus keeps the group's position across restarts.
    async fn subscribe(&self, subjects: &[String], group: &str) -> Result<Subscription, BusError>;

    /// Like [`Bus::subscribe`], holding at most `max_pending` delivered and not yet
    /// settled messages for this subscriber: a subscriber that processes `max_pending`
    /// messages at once is then never handed one it must leave waiting (and that the
    /// broker would redeliver meanwhile). The default ignores the bound.
    async fn subscribe_bounded(
        &self,
        subjects: &[String],
        group: &str,
        max_pending: usize,
    ) -> Result<Subscription, BusError> {
        let _ = max_pending;
        self.subscribe(subjects, group).await
    }

    /// Publishes several messages, waiting for all of them; one result per message, in
    /// order. A bus whose publishes are acknowledged (JetStream) sends them all before
    /// awaiting the acks.
    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<(), BusError>> {
        let mut results = Vec::with_capacity(messages.len());
        for m in messages {
            results.push(self.publish(m).await);
        }
        results
    }

    /// Whether published messages survive a process restart.
    fn is_durable(&self) -> bool;

    /// Serves requests on each of `subjects` (core request/reply: not stored, not
    /// redelivered): every request goes to one server of the `queue` group, which
    /// answers it through its [`Request`]. At most `capacity` requests received and not
    /// yet taken by [`RequestSource::next`] are held (per subject); past it the bus drops
    /// them unanswered (NATS: a slow consumer), so memory stays bounded whatever is sent:
    /// a server that reads continuously and sheds load never gets there. The default
    /// is [`BusError::Unsupported`]: a bus that does not serve requests (the runtime then
    /// runs without its start endpoint, and says so).
    async fn serve(
        &self,
        subjects: &[String],
        queue: &str,
        capacity: usize,
    ) -> Result<RequestStream, BusError> {
        let _ = (queue, capacity);
        Err(BusError::Unsupported(format!(
            "this bus does not serve requests (asked to serve {subjects:?})"
        )))
    }

    /// Sends a request on `subject` and waits at most `timeout` for its first answer.
    /// [`BusError::NoResponders`] when nobody serves the subject; a timeout is
    /// [`BusError::Unavailable`] (the request may still be applied). The default is
    /// [`BusError::Unsupported`].
    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let _ = (headers, payload, timeout);
        Err(BusError::Unsupported(format!(
            "this bus does not send requests (asked to send one on {subject})"
        )))
    }

    /// How far consumer group `group` on `subject` is behind: messages not yet delivered
    /// plus those delivered and not yet acknowledged. `None` when the bus cannot tell
    /// (the default). Sampled now and then for `skald_reply_consumer_lag`, never per
    /// message.
    async fn consumer_lag(&self, subject: &str, group: &str) -> Result<Option<u64>, BusError> {
        let _ = (subject, group);
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------
// Clock and randomness

/// The time source.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start.0)))
    }
    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Where retry jitter comes from.
pub trait JitterSource: Send + Sync + fmt::Debug + 'static {
    /// A draw in `[0, 1)`.
    fn draw(&self) -> Jitter;
}

/// Thread-local randomness (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomJitter;

impl JitterSource for RandomJitter {
    fn draw(&self) -> Jitter {
        Jitter::new(rand::random::<f64>())
    }
}

/// Always the same draw (tests).
#[derive(Debug, Clone, Copy)]
pub struct FixedJitter(pub f64);

impl JitterSource for FixedJitter {
    fn draw(&self) -> Jitter {
        Jitter::new(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_copies_are_capped_and_keep_no_token_or_signature() {
        let mut headers = Headers::new();
        headers.insert(crate::wire::H_REPLY_TOKEN, "ab".repeat(32));
        headers.insert(crate::wire::H_SIGNATURE, "sig");
        headers.insert("X-Long", "é".repeat(1000));
        for i in 0..100 {
            headers.append(format!("X-{i}"), "v");
        }
        let m = Message {
            subject: "skald.reply.a.b.0".into(),
            headers,
            payload: vec![b'x'; 100_000].into(),
        };
        let r = m.to_record();
        let text = r.to_string();
        assert!(
            !text.contains(&"ab".repeat(32)) && !text.contains("\"sig\""),
            "{text}"
        );
        assert!(text.contains("***"));
        assert_eq!(r["truncated"], true);
        assert_eq!(r["body_bytes"], 100_000);
        assert_eq!(r["header_count"], 103);
        assert_eq!(
            r["headers"].as_array().map(Vec::len),
            Some(RECORD_MAX_HEADERS)
        );
        assert!(
            r["body"]
                .as_str()
                .is_some_and(|b| b.len() == RECORD_MAX_BODY)
        );
        assert!(text.len() < 40_000, "{}", text.len());
        assert_eq!(cap("ééé", 3), "é");
    }
}
