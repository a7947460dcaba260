//! Durable TCC fences for participant services (see [`skald_runtime::participant::fence`]
//! for the rules): [`SqliteFence`] (feature `sqlite`) and [`PgFence`] (feature
//! `postgres`).
//!
//! Both keep one row per action key in the table `skald_fence`, created when missing:
//!
//! ```sql
//! CREATE TABLE skald_fence (
//!     key                  TEXT PRIMARY KEY,       -- the action's idempotency key
//!     action_state         TEXT NOT NULL,          -- idle | running | succeeded | failed
//!     action_attempt       BIGINT NOT NULL,        -- the attempt that last claimed it
//!     action_output        TEXT,                   -- JSON: the success output
//!     action_error         TEXT,                   -- JSON {code, message}: the permanent
//!                                                  -- error, or the latest retryable one
//!     retried_through      BIGINT NOT NULL,        -- highest attempt answered retryable
//!     action_claimed_at_ms BIGINT NOT NULL,        -- the action claim's start (lease)
//!     comp_state           TEXT NOT NULL,          -- none | running | compensated | tombstone
//!     comp_output          TEXT,                   -- JSON: the compensation's output
//!     comp_claimed_at_ms   BIGINT NOT NULL,        -- the compensation claim's start
//!     comp_retried_through BIGINT NOT NULL,        -- highest compensation attempt
//!                                                  -- answered retryable
//!     comp_error           TEXT,                   -- JSON: its latest retryable error
//!     updated_at_ms        BIGINT NOT NULL         -- last change (for `purge_before`)
//! );
//! ```
//!
//! ## Group commit
//!
//! Each fence (each value built by `connect` or `with_pool`, and its clones) has one
//! writer task. An operation ([`Fence::claim_action`], [`Fence::finish_action`],
//! [`Fence::claim_compensation`], [`Fence::finish_compensation`]) is queued to it, and
//! the task applies whatever queued while its previous transaction ran (up to 256
//! operations) in one transaction, then answers each caller: one commit (one fsync) for
//! many operations. There is no artificial delay: alone, an operation commits alone.
//!
//! A batch's transaction locks every key it touches before reading it (SQLite:
//! `BEGIN IMMEDIATE`, which takes the database's write lock; PostgreSQL: one
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` that creates or row-locks the keys, in
//! byte order of the keys, so two replicas' batches cannot deadlock), reads each key
//! once, applies the batch's operations in arrival order (`FenceRecord`'s methods, the
//! same code as the in-memory fence; each operation sees the previous one's result),
//! writes each changed key once, and commits. Two replicas racing on one key still get
//! exactly one `ActionClaim::Run`.
//!
//! Nobody is answered before the commit. When a batch's transaction fails, every
//! operation of the batch is answered the error (a [`FenceError`]: the participant
//! helper leaves the command unacknowledged, and the broker redelivers it), after one
//! more try when the failure is one that passes (a deadlock, a serialization failure, a
//! lost connection) and came before the commit was sent. A failure that does not pass
//! (say, a key the database cannot store) is not left to fail its neighbours: the
//! batch's keys are then applied one key at a time, each in a transaction of its own.
//! A record that cannot be decoded fails only the operations on its key.
//!
//! Waits are bounded: on PostgreSQL a batch waiting more than 10 s for a row lock fails
//! (`lock_timeout`); a batch's transaction that takes longer than 30 s is abandoned (its
//! callers are answered an error; what it did may or may not have committed, as with
//! any lost commit acknowledgement); a caller not answered within 60 s is answered an
//! error; an operation whose caller has given up by the time its batch starts is
//! dropped. Dropping the last clone of a fence stops its writer task (once
//! the operations already queued are answered).
//!
//! The writer task runs on the tokio runtime that built the fence: keep that runtime
//! alive while the fence is in use (as for its pool's connections).
//!
//! Times (the leases) are read from the participant's clock, not the database's: keep
//! the replicas' clocks within a small fraction of the lease of each other.
//!
//! A handler whose effect is a write to the same database can record its outcome in its
//! own transaction ([`PgFence::finish_action_in`], [`SqliteFence::finish_action_in`]): the
//! effect and the record then commit together, so a crash between the two cannot make a
//! later delivery run the handler again. That call bypasses the writer task, and holds
//! the key (PostgreSQL: its row lock; SQLite: the database's write lock) until the
//! caller's transaction ends: a batch touching the key waits for it, with every other
//! operation of the batch. Keep such transactions short, and do not wait on the fence's
//! other operations while one is open.

mod imp {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use serde_json::Value;
    use skald_runtime::machine::{StepError, Timestamp};
    use skald_runtime::participant::fence::FenceRecord;
    pub(super) use skald_runtime::participant::fence::{
        ActionClaim, CompensationClaim, DEFAULT_LEASE, Fence, FenceError,
    };
    use skald_runtime::ports::{Clock, SystemClock};
    use skald_runtime::wire::Outcome;
    use sqlx::{ColumnIndex, Decode, Row, Type};
    use tokio::sync::{mpsc, oneshot};
    use tracing::{debug, warn};

    /// The columns of a record, in [`decode`]'s order.
    macro_rules! columns {
        () => {
            "action_state, action_attempt, action_output, action_error, retried_through, \
             action_claimed_at_ms, comp_state, comp_output, comp_claimed_at_ms, \
             comp_retried_through, comp_error"
        };
    }
    pub(super) use columns;

    /// The `SET` list of an upsert of every column from `excluded`.
    macro_rules! set_excluded {
        () => {
            "action_state = excluded.action_state, \
             action_attempt = excluded.action_attempt, \
             action_output = excluded.action_output, \
             action_error = excluded.action_error, \
             retried_through = excluded.retried_through, \
             action_claimed_at_ms = excluded.action_claimed_at_ms, \
             comp_state = excluded.comp_state, \
             comp_output = excluded.comp_output, \
             comp_claimed_at_ms = excluded.comp_claimed_at_ms, \
             comp_retried_through = excluded.comp_retried_through, \
             comp_error = excluded.comp_error, \
             updated_at_ms = excluded.updated_at_ms"
        };
    }
    pub(super) use set_excluded;

    /// The most operations one transaction applies.
    pub(super) const MAX_BATCH: usize = 256;

    /// The lease and the clock of a fence.
    #[derive(Debug, Clone)]
    pub(super) struct Timing {
        pub(super) lease: Duration,
        pub(super) clock: Arc<dyn Clock>,
    }

    impl Default for Timing {
        fn default() -> Self {
            Timing {
                lease: DEFAULT_LEASE,
                clock: Arc::new(SystemClock),
            }
        }
    }

    impl Timing {
        pub(super) fn now(&self) -> Timestamp {
            self.clock.now()
        }
    }

    /// One operation of the [`Fence`] trait, as a rule applied to a locked record.
    #[derive(Debug, Clone)]
    pub(super) enum Op {
        ClaimAction(u32),
        FinishAction(u32, Outcome),
        ClaimCompensation(u32),
        FinishCompensation(u32, Outcome),
    }

    /// What an [`Op`] answered.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Answer {
        Action(ActionClaim),
        Compensation(CompensationClaim),
        Finished(Outcome),
    }

    impl Op {
        pub(super) fn apply(&self, record: &mut FenceRecord, timing: &Timing) -> Answer {
            let now = timing.now();
            match self {
                Op::ClaimAction(attempt) => {
                    Answer::Action(record.claim_action(*attempt, now, timing.lease))
                }
                Op::FinishAction(attempt, outcome) => {
                    Answer::Finished(record.finish_action(*attempt, outcome))
                }
                Op::ClaimCompensation(attempt) => {
                    Answer::Compensation(record.claim_compensation(*attempt, now, timing.lease))
                }
                Op::FinishCompensation(attempt, outcome) => {
                    Answer::Finished(record.finish_compensation(*attempt, outcome))
                }
            }
        }
    }

    fn mismatch(op: &str) -> FenceError {
        FenceError::Other(format!("fence operation {op} answered out of kind"))
    }

    impl Answer {
        pub(super) fn action(self) -> Result<ActionClaim, FenceError> {
            match self {
                Answer::Action(a) => Ok(a),
                _ => Err(mismatch("claim_action")),
            }
        }

        pub(super) fn compensation(self) -> Result<CompensationClaim, FenceError> {
            match self {
                Answer::Compensation(c) => Ok(c),
                _ => Err(mismatch("claim_compensation")),
            }
        }

        pub(super) fn finished(self) -> Result<Outcome, FenceError> {
            match self {
                Answer::Finished(o) => Ok(o),
                _ => Err(mismatch("finish")),
            }
        }
    }

    fn corrupt(what: &str, e: impl std::fmt::Display) -> FenceError {
        FenceError::Corrupt(format!("skald_fence.{what}: {e}"))
    }

    fn json<T: serde::de::DeserializeOwned>(
        what: &str,
        text: Option<String>,
    ) -> Result<Option<T>, FenceError> {
        text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt(what, e)))
            .transpose()
    }

    fn number<T: TryFrom<i64>>(what: &str, n: i64) -> Result<T, FenceError>
    where
        T::Error: std::fmt::Display,
    {
        T::try_from(n).map_err(|e| corrupt(what, e))
    }

    /// Decodes a row of [`columns!`].
    pub(super) fn decode<'r, R>(
        row: &'r R,
        db_error: fn(sqlx::Error) -> FenceError,
    ) -> Result<FenceRecord, FenceError>
    where
        R: Row,
        &'static str: ColumnIndex<R>,
        String: Decode<'r, R::Database> + Type<R::Database>,
        i64: Decode<'r, R::Database> + Type<R::Database>,
    {
        let text = |c: &'static str| row.try_get::<String, _>(c).map_err(db_error);
        let opt = |c: &'static str| row.try_get::<Option<String>, _>(c).map_err(db_error);
        let int = |c: &'static str| row.try_get::<i64, _>(c).map_err(db_error);
        Ok(FenceRecord {
            action_state: text("action_state")?.parse()?,
            action_attempt: number("action_attempt", int("action_attempt")?)?,
            action_output: json::<Value>("action_output", opt("action_output")?)?,
            action_error: json::<StepError>("action_error", opt("action_error")?)?,
            retried_through: number("retried_through", int("retried_through")?)?,
            action_claimed_at: Timestamp(number(
                "action_claimed_at_ms",
                int("action_claimed_at_ms")?,
            )?),
            comp_state: text("comp_state")?.parse()?,
            comp_output: json::<Value>("comp_output", opt("comp_output")?)?,
            comp_claimed_at: Timestamp(number("comp_claimed_at_ms", int("comp_claimed_at_ms")?)?),
            comp_retried_through: number("comp_retried_through", int("comp_retried_through")?)?,
            comp_error: json::<StepError>("comp_error", opt("comp_error")?)?,
        })
    }

    /// A record as the values bound to the writes (after the key).
    #[derive(Debug, serde::Serialize)]
    pub(super) struct Encoded {
        pub(super) action_state: &'static str,
        pub(super) action_attempt: i64,
        pub(super) action_output: Option<String>,
        pub(super) action_error: Option<String>,
        pub(super) retried_through: i64,
        pub(super) action_claimed_at_ms: i64,
        pub(super) comp_state: &'static str,
        pub(super) comp_output: Option<String>,
        pub(super) comp_claimed_at_ms: i64,
        pub(super) comp_retried_through: i64,
        pub(super) comp_error: Option<String>,
        pub(super) updated_at_ms: i64,
    }

    pub(super) fn ms(t: Timestamp) -> i64 {
        i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
    }

    fn to_json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>, FenceError> {
        v.as_ref()
            .map(|v| serde_json::to_string(v).map_err(|e| FenceError::Other(e.to_string())))
            .transpose()
    }

    pub(super) fn encode(r: &FenceRecord, now: Timestamp) -> Result<Encoded, FenceError> {
        Ok(Encoded {
            action_state: r.action_state.as_str(),
            action_attempt: i64::from(r.action_attempt),
            action_output: to_json(&r.action_output)?,
            action_error: to_json(&r.action_error)?,
            retried_through: i64::from(r.retried_through),
            action_claimed_at_ms: ms(r.action_claimed_at),
            comp_state: r.comp_state.as_str(),
            comp_output: to_json(&r.comp_output)?,
            comp_claimed_at_ms: ms(r.comp_claimed_at),
            comp_retried_through: i64::from(r.comp_retried_through),
            comp_error: to_json(&r.comp_error)?,
            updated_at_ms: ms(now),
        })
    }

    /// An operation on its way to the writer: the key, the operation, and the lease and
    /// clock of the fence handle it came through.
    #[derive(Debug, Clone)]
    pub(super) struct Pending {
        pub(super) key: String,
        pub(super) op: Op,
        pub(super) timing: Timing,
    }

    /// What one operation of a batch answered.
    pub(super) type Answered = Result<Answer, FenceError>;

    /// The answer of a batch of one.
    pub(super) fn one(answers: Vec<Answered>) -> Answered {
        answers
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(FenceError::Other("the fence answered nothing".into())))
    }

    /// The distinct keys of `batch`, in byte order (the order PostgreSQL locks them in).
    pub(super) fn keys(batch: &[Pending]) -> Vec<&str> {
        batch
            .iter()
            .map(|p| p.key.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// A key of a batch as read under its lock, and as the batch's operations leave it.
    #[derive(Debug)]
    pub(super) struct Slot {
        /// The stored record; `None`: no row.
        before: Option<FenceRecord>,
        /// The record the operations work on; an error when the stored one is unreadable.
        record: Result<FenceRecord, FenceError>,
        /// When the last operation on the key was applied.
        updated: Option<Timestamp>,
    }

    impl Slot {
        /// A key with no row yet.
        pub(super) fn missing() -> Slot {
            Slot {
                before: None,
                record: Ok(FenceRecord::default()),
                updated: None,
            }
        }

        /// A key whose row was read (decoded, or not).
        pub(super) fn read(record: Result<FenceRecord, FenceError>) -> Slot {
            Slot {
                before: record.as_ref().ok().cloned(),
                record,
                updated: None,
            }
        }
    }

    /// The outcome of applying a batch to the records it read: one answer per operation
    /// (in the batch's order) and the rows to write (each changed key once, in byte
    /// order).
    #[derive(Debug)]
    pub(super) struct Decided<'a> {
        pub(super) answers: Vec<Answered>,
        pub(super) writes: Vec<(&'a str, Encoded)>,
    }

    /// Applies `batch`'s operations in order to `slots` (every key of the batch, as read
    /// under its lock): each operation sees the previous ones' results.
    pub(super) fn decide<'a>(
        batch: &'a [Pending],
        mut slots: BTreeMap<&'a str, Slot>,
    ) -> Decided<'a> {
        let mut answers: Vec<Answered> = batch
            .iter()
            .map(|p| match slots.get_mut(p.key.as_str()) {
                Some(Slot {
                    record: Ok(record),
                    updated,
                    ..
                }) => {
                    let answer = p.op.apply(record, &p.timing);
                    *updated = Some(p.timing.now());
                    Ok(answer)
                }
                Some(Slot { record: Err(e), .. }) => Err(e.clone()),
                None => Err(FenceError::Other(format!(
                    "the fence's batch did not read the key {:?}",
                    p.key
                ))),
            })
            .collect();
        let mut writes = Vec::new();
        for (key, slot) in slots {
            let (Ok(record), Some(updated)) = (&slot.record, slot.updated) else {
                continue;
            };
            if slot.before.as_ref() == Some(record) {
                continue;
            }
            match encode(record, updated) {
                Ok(e) => writes.push((key, e)),
                // Not written: nothing of the key commits, so none of its operations
                // may be answered.
                Err(e) => {
                    for (p, answer) in batch.iter().zip(answers.iter_mut()) {
                        if p.key == key {
                            *answer = Err(e.clone());
                        }
                    }
                }
            }
        }
        Decided { answers, writes }
    }

    /// Why a batch's transaction failed.
    #[derive(Debug)]
    pub(super) struct Failed {
        pub(super) error: FenceError,
        /// The failure came while committing (or its time ran out): the transaction may
        /// have committed, so it is not tried again.
        pub(super) committing: bool,
    }

    impl Failed {
        pub(super) fn before_commit(error: FenceError) -> Failed {
            Failed {
                error,
                committing: false,
            }
        }

        pub(super) fn committing(error: FenceError) -> Failed {
            Failed {
                error,
                committing: true,
            }
        }
    }

    /// A database a fence's writer applies batches to.
    #[async_trait]
    pub(super) trait Store: Send + 'static {
        /// Applies `batch` in one transaction and commits it: one answer per operation,
        /// in order, sent to nobody yet. `Err`: nothing is known to have committed.
        async fn transaction(&mut self, batch: &[Pending]) -> Result<Vec<Answered>, Failed>;
    }

    /// The bounds of a writer task.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Limits {
        /// The most operations per transaction.
        pub(super) max_batch: usize,
        /// How long one transaction may take before its callers are answered an error.
        pub(super) transaction: Duration,
        /// How long a caller waits for its answer, queueing included.
        pub(super) caller: Duration,
    }

    impl Default for Limits {
        fn default() -> Self {
            Limits {
                max_batch: MAX_BATCH,
                transaction: Duration::from_secs(30),
                caller: Duration::from_secs(60),
            }
        }
    }

    struct Request {
        pending: Pending,
        reply: oneshot::Sender<Answered>,
    }

    /// The handle of a fence's writer task. Cheap to clone; the task ends when the last
    /// clone is dropped (after answering what is queued).
    #[derive(Clone)]
    pub(super) struct Queue {
        tx: mpsc::Sender<Request>,
        caller: Duration,
    }

    impl std::fmt::Debug for Queue {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Queue")
                .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
                .finish_non_exhaustive()
        }
    }

    impl Queue {
        /// Spawns the writer task of `store` on the current tokio runtime.
        pub(super) fn spawn<S: Store>(
            store: S,
            limits: Limits,
        ) -> Result<(Queue, tokio::task::JoinHandle<()>), FenceError> {
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
                FenceError::Other(format!("a SQL fence needs a tokio runtime: {e}"))
            })?;
            let max_batch = limits.max_batch.max(1);
            let (tx, rx) = mpsc::channel(max_batch * 4);
            let task = runtime.spawn(write_loop(
                store,
                rx,
                Limits {
                    max_batch,
                    ..limits
                },
            ));
            Ok((
                Queue {
                    tx,
                    caller: limits.caller,
                },
                task,
            ))
        }

        /// Queues `op` on `key` and waits for its answer (after its batch committed).
        pub(super) async fn apply(
            &self,
            key: &str,
            op: Op,
            timing: &Timing,
        ) -> Result<Answer, FenceError> {
            let (reply, answer) = oneshot::channel();
            let request = Request {
                pending: Pending {
                    key: key.to_owned(),
                    op,
                    timing: timing.clone(),
                },
                reply,
            };
            let wait = async {
                self.tx.send(request).await.map_err(|_| {
                    FenceError::Unavailable("the fence's writer task has stopped".into())
                })?;
                answer.await.map_err(|_| {
                    FenceError::Unavailable(
                        "the fence's writer task stopped before answering".into(),
                    )
                })?
            };
            tokio::time::timeout(self.caller, wait)
                .await
                .unwrap_or_else(|_| {
                    Err(FenceError::Unavailable(format!(
                        "the fence did not answer within {:?}",
                        self.caller
                    )))
                })
        }
    }

    async fn write_loop<S: Store>(mut store: S, mut rx: mpsc::Receiver<Request>, limits: Limits) {
        let mut batch: Vec<Request> = Vec::with_capacity(limits.max_batch);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < limits.max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // A caller that gave up (timed out, or its task was dropped) is not applied:
            // nobody would act on its answer.
            let (pending, replies): (Vec<Pending>, Vec<_>) = batch
                .drain(..)
                .filter(|r| !r.reply.is_closed())
                .map(|r| (r.pending, r.reply))
                .unzip();
            if !pending.is_empty() {
                let answers = run_batch(&mut store, &pending, limits.transaction).await;
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // The caller may have given up meanwhile: nothing to do.
                    let _ = reply.send(answer);
                }
            }
        }
    }

    /// One transaction of `batch`, bounded by `limit`.
    async fn attempt<S: Store>(
        store: &mut S,
        batch: &[Pending],
        limit: Duration,
    ) -> Result<Vec<Answered>, Failed> {
        match tokio::time::timeout(limit, store.transaction(batch)).await {
            Ok(Ok(answers)) if answers.len() == batch.len() => Ok(answers),
            Ok(Ok(answers)) => Err(Failed::committing(FenceError::Other(format!(
                "the fence's transaction answered {} operations of {}",
                answers.len(),
                batch.len()
            )))),
            Ok(Err(failed)) => Err(failed),
            Err(_) => Err(Failed::committing(FenceError::Unavailable(format!(
                "the fence's transaction took longer than {limit:?}"
            )))),
        }
    }

    /// Applies `batch` (see the module documentation): one transaction; once more when
    /// it failed before committing for a reason that passes; key by key when it failed
    /// for a reason that does not. One answer per operation.
    pub(super) async fn run_batch<S: Store>(
        store: &mut S,
        batch: &[Pending],
        limit: Duration,
    ) -> Vec<Answered> {
        let started = std::time::Instant::now();
        let failed = match attempt(store, batch, limit).await {
            Ok(answers) => {
                debug!(
                    operations = batch.len(),
                    micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "fence group commit"
                );
                return answers;
            }
            Err(failed) => failed,
        };
        warn!(
            error = %failed.error,
            operations = batch.len(),
            "the fence's transaction failed"
        );
        let all = |e: FenceError| batch.iter().map(|_| Err(e.clone())).collect();
        if failed.committing {
            return all(failed.error);
        }
        if failed.error.is_retryable() {
            return match attempt(store, batch, limit).await {
                Ok(answers) => answers,
                Err(again) => {
                    warn!(error = %again.error, "the fence's transaction failed again");
                    all(again.error)
                }
            };
        }
        let keys = keys(batch);
        if !matches!(failed.error, FenceError::Other(_)) || keys.len() < 2 {
            return all(failed.error);
        }
        // Not a passing outage (say, a value the database refuses): one key must not
        // fail the others. Each key's operations, in order, in a transaction of its own.
        let mut answers: Vec<Answered> = all(failed.error);
        for key in keys {
            let (at, group): (Vec<usize>, Vec<Pending>) = batch
                .iter()
                .enumerate()
                .filter(|(_, p)| p.key == key)
                .map(|(i, p)| (i, p.clone()))
                .unzip();
            let got = match attempt(store, &group, limit).await {
                Ok(got) => got,
                Err(failed) => group.iter().map(|_| Err(failed.error.clone())).collect(),
            };
            for (i, answer) in at.into_iter().zip(got) {
                answers[i] = answer;
            }
        }
        answers
    }

    #[cfg(test)]
    mod tests {
        //! The writer task against a store in memory, whose transactions can be held
        //! (to queue operations behind them deterministically), failed or hung.

        use std::collections::HashMap;
        use std::sync::Mutex;

        use serde_json::json;
        use skald_runtime::participant::fence::{IN_PROGRESS_CODE, refused};
        use tokio::sync::Notify;

        use super::*;

        /// How a transaction of the fake store fails when its batch holds a key of
        /// `poison`.
        #[derive(Debug, Clone, Copy)]
        enum Poison {
            /// A failure that passes, before the commit (a deadlock, say).
            Passing,
            /// One that does not (a value the database refuses).
            Refused,
            /// The transaction never ends.
            Hangs,
        }

        #[derive(Default)]
        struct Fake {
            db: Mutex<HashMap<String, FenceRecord>>,
            /// The sizes of the transactions tried, committed or not.
            tried: Mutex<Vec<usize>>,
            /// The keys of the operations committed, in order.
            committed: Mutex<Vec<String>>,
            poison: Mutex<Option<(String, Poison)>>,
            /// Set: the next transaction waits for `release` (after notifying `entered`).
            hold: Mutex<bool>,
            entered: Notify,
            release: Notify,
        }

        struct Shared(Arc<Fake>);

        #[async_trait]
        impl Store for Shared {
            async fn transaction(&mut self, batch: &[Pending]) -> Result<Vec<Answered>, Failed> {
                let fake = &self.0;
                fake.tried.lock().expect("lock").push(batch.len());
                let hold = std::mem::take(&mut *fake.hold.lock().expect("lock"));
                if hold {
                    fake.entered.notify_one();
                    fake.release.notified().await;
                }
                let poison = fake.poison.lock().expect("lock").clone();
                if let Some((key, how)) = poison
                    && batch.iter().any(|p| p.key == key)
                {
                    match how {
                        Poison::Passing => {
                            return Err(Failed::before_commit(FenceError::Unavailable(
                                "deadlock detected".into(),
                            )));
                        }
                        Poison::Refused => {
                            return Err(Failed::before_commit(FenceError::Other(
                                "invalid byte sequence".into(),
                            )));
                        }
                        Poison::Hangs => std::future::pending::<()>().await,
                    }
                }
                // Read each key once, apply in order, "commit" by writing back.
                let mut db = fake.db.lock().expect("lock");
                let slots = keys(batch)
                    .into_iter()
                    .map(|k| {
                        let slot = db
                            .get(k)
                            .map_or_else(Slot::missing, |r| Slot::read(Ok(r.clone())));
                        (k, slot)
                    })
                    .collect();
                let mut records: HashMap<String, FenceRecord> = HashMap::new();
                let answers = batch
                    .iter()
                    .map(|p| {
                        let record = records
                            .entry(p.key.clone())
                            .or_insert_with(|| db.get(&p.key).cloned().unwrap_or_default());
                        p.op.apply(record, &p.timing)
                    })
                    .collect::<Vec<_>>();
                // `decide` on the same input answers the same.
                let decided = decide(batch, slots);
                for (a, b) in answers.iter().zip(&decided.answers) {
                    assert_eq!(Some(a), b.as_ref().ok());
                }
                db.extend(records);
                fake.committed
                    .lock()
                    .expect("lock")
                    .extend(batch.iter().map(|p| p.key.clone()));
                Ok(answers.into_iter().map(Ok).collect())
            }
        }

        fn limits() -> Limits {
            Limits {
                max_batch: 64,
                transaction: Duration::from_secs(5),
                caller: Duration::from_secs(10),
            }
        }

        fn spawn(fake: &Arc<Fake>, limits: Limits) -> (Queue, tokio::task::JoinHandle<()>) {
            Queue::spawn(Shared(Arc::clone(fake)), limits).expect("spawn")
        }

        /// Holds the writer in a transaction of one operation, returning its caller.
        async fn hold(
            fake: &Arc<Fake>,
            queue: &Queue,
        ) -> tokio::task::JoinHandle<Result<Answer, FenceError>> {
            *fake.hold.lock().expect("lock") = true;
            let q = queue.clone();
            let first = tokio::spawn(async move {
                q.apply("held", Op::ClaimAction(1), &Timing::default())
                    .await
            });
            fake.entered.notified().await;
            first
        }

        /// Waits until `n` requests are queued.
        async fn queued(queue: &Queue, n: usize) {
            for _ in 0..500 {
                if queue.tx.max_capacity() - queue.tx.capacity() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            panic!("{n} requests were never queued");
        }

        /// Queues one claim per key of `keys` (as many callers) while the writer is held,
        /// releases it and returns the answers in order.
        async fn one_batch(fake: &Arc<Fake>, queue: &Queue, keys: &[String]) -> Vec<Answered> {
            let first = hold(fake, queue).await;
            let mut callers = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                let (q, key) = (queue.clone(), key.clone());
                callers.push(tokio::spawn(async move {
                    q.apply(&key, Op::ClaimAction(1), &Timing::default()).await
                }));
                // Queued in this order.
                queued(queue, i + 1).await;
            }
            fake.release.notify_one();
            assert!(first.await.expect("join").is_ok(), "the held batch commits");
            let mut answers = Vec::new();
            for c in callers {
                answers.push(c.await.expect("join"));
            }
            answers
        }

        #[tokio::test]
        async fn operations_queued_meanwhile_commit_in_one_transaction() {
            let fake = Arc::new(Fake::default());
            let (queue, _task) = spawn(&fake, limits());
            let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
            let answers = one_batch(&fake, &queue, &keys).await;
            for a in answers {
                assert_eq!(a, Ok(Answer::Action(ActionClaim::Run)));
            }
            assert_eq!(*fake.tried.lock().expect("lock"), vec![1, 40]);
        }

        #[tokio::test]
        async fn a_batch_is_bounded() {
            let fake = Arc::new(Fake::default());
            let (queue, _task) = spawn(
                &fake,
                Limits {
                    max_batch: 16,
                    ..limits()
                },
            );
            let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
            one_batch(&fake, &queue, &keys).await;
            assert_eq!(*fake.tried.lock().expect("lock"), vec![1, 16, 16, 8]);
        }

        #[tokio::test]
        async fn a_failed_batch_answers_every_caller_with_an_error() {
            let fake = Arc::new(Fake::default());
            let (queue, _task) = spawn(&fake, limits());
            *fake.poison.lock().expect("lock") = Some(("k7".into(), Poison::Passing));
            let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
            let answers = one_batch(&fake, &queue, &keys).await;
            for (key, a) in keys.iter().zip(&answers) {
                match a {
                    Err(e) => assert!(e.is_retryable(), "{key}: {e}"),
                    Ok(a) => panic!("{key} answered {a:?} though its batch failed"),
                }
            }
            // Tried twice (a failure that passes is tried once more), committed never.
            assert_eq!(*fake.tried.lock().expect("lock"), vec![1, 20, 20]);
            assert_eq!(*fake.committed.lock().expect("lock"), vec!["held"]);
            // The next batch, without the poisoned key, commits.
            *fake.poison.lock().expect("lock") = None;
            assert_eq!(
                queue
                    .apply("k1", Op::ClaimAction(1), &Timing::default())
                    .await,
                Ok(Answer::Action(ActionClaim::Run)),
                "nothing of the failed batch was recorded"
            );
        }

        #[tokio::test]
        async fn a_refused_key_fails_only_its_own_operations() {
            let fake = Arc::new(Fake::default());
            let (queue, _task) = spawn(&fake, limits());
            *fake.poison.lock().expect("lock") = Some(("k3".into(), Poison::Refused));
            let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
            let answers = one_batch(&fake, &queue, &keys).await;
            for (key, a) in keys.iter().zip(&answers) {
                if key == "k3" {
                    assert!(matches!(a, Err(FenceError::Other(_))), "{a:?}");
                } else {
                    assert_eq!(a, &Ok(Answer::Action(ActionClaim::Run)), "{key}");
                }
            }
            // The batch, then each key in a transaction of its own.
            let tried = fake.tried.lock().expect("lock").clone();
            assert_eq!(tried[..2], [1, 10]);
            assert_eq!(tried[2..], [1; 10]);
        }

        #[tokio::test]
        async fn a_hung_transaction_is_answered_in_bounded_time() {
            let fake = Arc::new(Fake::default());
            *fake.poison.lock().expect("lock") = Some(("stuck".into(), Poison::Hangs));
            // The transaction's bound answers first ...
            let (queue, _task) = spawn(
                &fake,
                Limits {
                    transaction: Duration::from_millis(100),
                    ..limits()
                },
            );
            let started = std::time::Instant::now();
            let a = queue
                .apply("stuck", Op::ClaimAction(1), &Timing::default())
                .await;
            assert!(matches!(a, Err(FenceError::Unavailable(_))), "{a:?}");
            assert!(started.elapsed() < Duration::from_secs(3));
            // ... and not tried again: it may have committed.
            assert_eq!(*fake.tried.lock().expect("lock"), vec![1]);
            // ... or the caller's own.
            let (queue, _task) = spawn(
                &fake,
                Limits {
                    transaction: Duration::from_secs(3_600),
                    caller: Duration::from_millis(100),
                    ..limits()
                },
            );
            let a = queue
                .apply("stuck", Op::ClaimAction(1), &Timing::default())
                .await;
            assert!(matches!(a, Err(FenceError::Unavailable(_))), "{a:?}");
        }

        #[tokio::test]
        async fn a_caller_that_gave_up_is_not_applied() {
            let fake = Arc::new(Fake::default());
            let (queue, _task) = spawn(&fake, limits());
            let first = hold(&fake, &queue).await;
            let q = queue.clone();
            let gone = tokio::spawn(async move {
                q.apply("gone", Op::ClaimAction(1), &Timing::default())
                    .await
            });
            queued(&queue, 1).await;
            gone.abort();
            assert!(gone.await.is_err(), "aborted");
            fake.release.notify_one();
            assert!(first.await.expect("join").is_ok());
            assert_eq!(
                queue
                    .apply("after", Op::ClaimAction(1), &Timing::default())
                    .await,
                Ok(Answer::Action(ActionClaim::Run))
            );
            assert_eq!(*fake.committed.lock().expect("lock"), vec!["held", "after"]);
        }

        #[tokio::test]
        async fn dropping_the_fence_stops_its_writer() {
            let fake = Arc::new(Fake::default());
            let (queue, task) = spawn(&fake, limits());
            let clone = queue.clone();
            assert!(
                clone
                    .apply("k", Op::ClaimAction(1), &Timing::default())
                    .await
                    .is_ok()
            );
            drop(queue);
            drop(clone);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the writer task ends")
                .expect("without panicking");
        }

        #[tokio::test]
        async fn a_stopped_writer_answers_an_error() {
            let fake = Arc::new(Fake::default());
            let (queue, task) = spawn(&fake, limits());
            task.abort();
            let _ = task.await;
            let a = queue
                .apply("k", Op::ClaimAction(1), &Timing::default())
                .await;
            assert!(matches!(a, Err(FenceError::Unavailable(_))), "{a:?}");
        }

        /// Operations on one key in one batch apply in arrival order, each seeing the
        /// previous one's result; the key is written once.
        #[test]
        fn a_batch_applies_each_keys_operations_in_order() {
            let t = Timing::default();
            let op = |key: &str, op: Op| Pending {
                key: key.into(),
                op,
                timing: t.clone(),
            };
            let paid = Outcome::Success(json!({"payment_id": "p1"}));
            let batch = vec![
                op("a", Op::ClaimAction(1)),
                op("b", Op::ClaimCompensation(1)),
                op("a", Op::ClaimAction(2)),
                op("a", Op::FinishAction(1, paid.clone())),
                op("b", Op::ClaimAction(1)),
                op("a", Op::ClaimAction(3)),
                op("a", Op::ClaimCompensation(1)),
            ];
            let slots = keys(&batch)
                .into_iter()
                .map(|k| (k, Slot::missing()))
                .collect();
            let decided = decide(&batch, slots);
            let answers: Vec<Answer> = decided
                .answers
                .into_iter()
                .map(|a| a.expect("answered"))
                .collect();
            assert_eq!(answers[0], Answer::Action(ActionClaim::Run));
            assert_eq!(
                answers[1],
                Answer::Compensation(CompensationClaim::Answer(Outcome::Success(Value::Null)))
            );
            match &answers[2] {
                Answer::Action(ActionClaim::Answer(Outcome::Retryable(e))) => {
                    assert_eq!(e.code, IN_PROGRESS_CODE);
                }
                other => panic!("attempt 2 during attempt 1: {other:?}"),
            }
            assert_eq!(answers[3], Answer::Finished(paid.clone()));
            assert_eq!(answers[4], Answer::Action(ActionClaim::Answer(refused())));
            assert_eq!(answers[5], Answer::Action(ActionClaim::Answer(paid)));
            assert_eq!(
                answers[6],
                Answer::Compensation(CompensationClaim::Undo {
                    action_output: Some(json!({"payment_id": "p1"}))
                })
            );
            let written: Vec<(&str, &str, &str)> = decided
                .writes
                .iter()
                .map(|(k, e)| (*k, e.action_state, e.comp_state))
                .collect();
            assert_eq!(
                written,
                vec![("a", "succeeded", "running"), ("b", "idle", "tombstone")]
            );
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite_fence {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use skald_runtime::machine::Timestamp;
    use skald_runtime::participant::fence::FenceRecord;
    use skald_runtime::ports::Clock;
    use skald_runtime::wire::Outcome;
    use sqlx::sqlite::SqlitePool;
    use sqlx::{Row, Sqlite, SqliteConnection, Transaction};

    use super::imp::{
        ActionClaim, Answer, Answered, CompensationClaim, Failed, Fence, FenceError, Limits, Op,
        Pending, Queue, Slot, Store, Timing, columns, decide, decode, keys, ms, one, set_excluded,
    };
    use crate::sqlite::{SqliteOptions, open_pool, store_error};

    fn db_error(e: sqlx::Error) -> FenceError {
        FenceError::from(store_error(e))
    }

    const CREATE: &str = "CREATE TABLE IF NOT EXISTS skald_fence (
        key                  TEXT PRIMARY KEY NOT NULL,
        action_state         TEXT NOT NULL DEFAULT 'idle'
            CHECK (action_state IN ('idle', 'running', 'succeeded', 'failed')),
        action_attempt       INTEGER NOT NULL DEFAULT 0,
        action_output        TEXT,
        action_error         TEXT,
        retried_through      INTEGER NOT NULL DEFAULT 0,
        action_claimed_at_ms INTEGER NOT NULL DEFAULT 0,
        comp_state           TEXT NOT NULL DEFAULT 'none'
            CHECK (comp_state IN ('none', 'running', 'compensated', 'tombstone')),
        comp_output          TEXT,
        comp_claimed_at_ms   INTEGER NOT NULL DEFAULT 0,
        comp_retried_through INTEGER NOT NULL DEFAULT 0,
        comp_error           TEXT,
        updated_at_ms        INTEGER NOT NULL DEFAULT 0
    )";
    const CREATE_INDEX: &str =
        "CREATE INDEX IF NOT EXISTS skald_fence_updated ON skald_fence (updated_at_ms)";
    const SELECT: &str = concat!("SELECT ", columns!(), " FROM skald_fence WHERE key = ?");
    /// The rows of the keys of a JSON array.
    const SELECT_MANY: &str = concat!(
        "SELECT key, ",
        columns!(),
        " FROM skald_fence WHERE key IN (SELECT value FROM json_each(?))"
    );
    /// Writes the rows of a JSON array of `[key, <the columns>, updated_at_ms]` arrays.
    const UPSERT_MANY: &str = concat!(
        "INSERT INTO skald_fence (key, ",
        columns!(),
        ", updated_at_ms) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, \
         value ->> 4, value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, \
         value ->> 10, value ->> 11, value ->> 12 FROM json_each(?) WHERE true \
         ON CONFLICT (key) DO UPDATE SET ",
        set_excluded!()
    );

    /// Reads `batch`'s keys, applies its operations in order and writes what changed, in
    /// the transaction open on `conn` (which holds the write lock).
    async fn apply_batch(
        conn: &mut SqliteConnection,
        batch: &[Pending],
    ) -> Result<Vec<Answered>, FenceError> {
        let keys = keys(batch);
        let keys_json =
            serde_json::to_string(&keys).map_err(|e| FenceError::Other(e.to_string()))?;
        let rows = sqlx::query(SELECT_MANY)
            .bind(keys_json)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
        let mut slots: BTreeMap<&str, Slot> = keys.iter().map(|k| (*k, Slot::missing())).collect();
        for row in &rows {
            let key: String = row.try_get("key").map_err(db_error)?;
            if let Some(slot) = slots.get_mut(key.as_str()) {
                *slot = Slot::read(decode(row, db_error));
            }
        }
        let decided = decide(batch, slots);
        if !decided.writes.is_empty() {
            let rows: Vec<_> = decided
                .writes
                .iter()
                .map(|(key, e)| {
                    (
                        key,
                        e.action_state,
                        e.action_attempt,
                        &e.action_output,
                        &e.action_error,
                        e.retried_through,
                        e.action_claimed_at_ms,
                        e.comp_state,
                        &e.comp_output,
                        e.comp_claimed_at_ms,
                        e.comp_retried_through,
                        &e.comp_error,
                        e.updated_at_ms,
                    )
                })
                .collect();
            let rows =
                serde_json::to_string(&rows).map_err(|e| FenceError::Other(e.to_string()))?;
            sqlx::query(UPSERT_MANY)
                .bind(rows)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
        }
        Ok(decided.answers)
    }

    /// The writer's database: a `BEGIN IMMEDIATE` transaction per batch.
    struct Writer {
        pool: SqlitePool,
    }

    #[async_trait]
    impl Store for Writer {
        async fn transaction(&mut self, batch: &[Pending]) -> Result<Vec<Answered>, Failed> {
            // IMMEDIATE: the write lock up front, so the reads are the latest and the
            // writes cannot fail on a lock upgrade; other fences on the file wait for it.
            let mut tx = self
                .pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(|e| Failed::before_commit(db_error(e)))?;
            let answers = apply_batch(&mut tx, batch)
                .await
                .map_err(Failed::before_commit)?;
            tx.commit()
                .await
                .map_err(|e| Failed::committing(db_error(e)))?;
            Ok(answers)
        }
    }

    /// The TCC fence in a SQLite database (a file; see the module documentation). Replicas
    /// on one machine may share the file; each fence's writer task applies the operations
    /// queued to it in `BEGIN IMMEDIATE` transactions, many per transaction.
    #[derive(Debug, Clone)]
    pub struct SqliteFence {
        pool: SqlitePool,
        timing: Timing,
        queue: Queue,
    }

    impl SqliteFence {
        /// Opens (creating if missing) the database at `url` (`sqlite://fence.db`) with
        /// WAL and `synchronous=FULL`, and creates the `skald_fence` table if missing.
        pub async fn connect(url: &str) -> Result<SqliteFence, FenceError> {
            let pool = open_pool(url, &SqliteOptions::default()).await?;
            SqliteFence::with_pool(pool).await
        }

        /// A fence on an open pool (say the participant's own database, so handlers can
        /// use [`SqliteFence::finish_action_in`]); creates the table if missing, and
        /// spawns the fence's writer task on the current tokio runtime.
        pub async fn with_pool(pool: SqlitePool) -> Result<SqliteFence, FenceError> {
            SqliteFence::with_limits(pool, Limits::default()).await
        }

        pub(super) async fn with_limits(
            pool: SqlitePool,
            limits: Limits,
        ) -> Result<SqliteFence, FenceError> {
            sqlx::query(CREATE).execute(&pool).await.map_err(db_error)?;
            sqlx::query(CREATE_INDEX)
                .execute(&pool)
                .await
                .map_err(db_error)?;
            let (queue, _task) = Queue::spawn(Writer { pool: pool.clone() }, limits)?;
            Ok(SqliteFence {
                pool,
                timing: Timing::default(),
                queue,
            })
        }

        /// The same fence with claims that hold for `lease` (default
        /// [`skald_runtime::participant::DEFAULT_LEASE`]).
        pub fn with_lease(mut self, lease: Duration) -> Self {
            self.timing.lease = lease;
            self
        }

        /// The same fence reading the time from `clock` (tests: a `ManualClock`).
        pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
            self.timing.clock = clock;
            self
        }

        /// The pool.
        pub fn pool(&self) -> &SqlitePool {
            &self.pool
        }

        /// Records the outcome of action attempt `attempt` of `key` in the caller's
        /// transaction, as [`Fence::finish_action`] does in one of its own: call it in
        /// the handler's transaction, after the handler's writes and before its commit,
        /// so the effect and the record commit together. Begin that transaction with
        /// `pool.begin_with("BEGIN IMMEDIATE")`: a deferred one may fail to upgrade its
        /// read lock (`SQLITE_BUSY`). Returns what to reply; the helper's own
        /// `finish_action` after the handler then finds the outcome recorded. When that
        /// answer is not the handler's own outcome (a compensation took the key over
        /// after the claim's lease: the refusal `compensated`), roll the transaction back
        /// instead of committing: the effect must not land after its undo.
        pub async fn finish_action_in(
            &self,
            tx: &mut Transaction<'_, Sqlite>,
            key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            let batch = [Pending {
                key: key.to_owned(),
                op: Op::FinishAction(attempt, outcome.clone()),
                timing: self.timing.clone(),
            }];
            one(apply_batch(tx, &batch).await?)?.finished()
        }

        /// Deletes the records last changed before `before` that no delivery holds,
        /// returning how many. A deleted key is unknown again: a delivery of its action
        /// would run, and a compensation would find nothing to undo. Purge only what no
        /// saga can still send (say older than the saga store's retention).
        pub async fn purge_before(&self, before: Timestamp) -> Result<u64, FenceError> {
            let done = sqlx::query(
                "DELETE FROM skald_fence WHERE updated_at_ms < ? \
                 AND action_state <> 'running' AND comp_state <> 'running'",
            )
            .bind(ms(before))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            Ok(done.rows_affected())
        }

        async fn apply(&self, key: &str, op: Op) -> Result<Answer, FenceError> {
            self.queue.apply(key, op, &self.timing).await
        }
    }

    #[async_trait]
    impl Fence for SqliteFence {
        async fn claim_action(&self, key: &str, attempt: u32) -> Result<ActionClaim, FenceError> {
            self.apply(key, Op::ClaimAction(attempt)).await?.action()
        }

        async fn finish_action(
            &self,
            key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            self.apply(key, Op::FinishAction(attempt, outcome.clone()))
                .await?
                .finished()
        }

        async fn claim_compensation(
            &self,
            action_key: &str,
            attempt: u32,
        ) -> Result<CompensationClaim, FenceError> {
            self.apply(action_key, Op::ClaimCompensation(attempt))
                .await?
                .compensation()
        }

        async fn finish_compensation(
            &self,
            action_key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            self.apply(action_key, Op::FinishCompensation(attempt, outcome.clone()))
                .await?
                .finished()
        }

        async fn record(&self, key: &str) -> Result<Option<FenceRecord>, FenceError> {
            let row = sqlx::query(SELECT)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
            row.as_ref().map(|r| decode(r, db_error)).transpose()
        }
    }
}

#[cfg(feature = "sqlite")]
pub use sqlite_fence::SqliteFence;

#[cfg(feature = "postgres")]
mod postgres_fence {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use skald_runtime::machine::Timestamp;
    use skald_runtime::participant::fence::FenceRecord;
    use skald_runtime::ports::Clock;
    use skald_runtime::wire::Outcome;
    use sqlx::postgres::{PgConnection, PgPool};
    use sqlx::{Postgres, Row, Transaction};

    use super::imp::{
        ActionClaim, Answer, Answered, CompensationClaim, Failed, Fence, FenceError, Limits, Op,
        Pending, Queue, Slot, Store, Timing, columns, decide, decode, keys, ms, one,
    };
    use crate::postgres::{PostgresOptions, open_pool, store_error};

    fn db_error(e: sqlx::Error) -> FenceError {
        FenceError::from(store_error(e))
    }

    /// Serialises concurrent creations of the table (`CREATE TABLE IF NOT EXISTS` races
    /// on the catalog otherwise): an arbitrary advisory lock key, "skald_fence".
    const CREATE_LOCK: &str = "SELECT pg_advisory_xact_lock(7310867401338479973)";
    const CREATE: &str = "CREATE TABLE IF NOT EXISTS skald_fence (
        key                  text PRIMARY KEY,
        action_state         text NOT NULL DEFAULT 'idle'
            CHECK (action_state IN ('idle', 'running', 'succeeded', 'failed')),
        action_attempt       bigint NOT NULL DEFAULT 0,
        action_output        text,
        action_error         text,
        retried_through      bigint NOT NULL DEFAULT 0,
        action_claimed_at_ms bigint NOT NULL DEFAULT 0,
        comp_state           text NOT NULL DEFAULT 'none'
            CHECK (comp_state IN ('none', 'running', 'compensated', 'tombstone')),
        comp_output          text,
        comp_claimed_at_ms   bigint NOT NULL DEFAULT 0,
        comp_retried_through bigint NOT NULL DEFAULT 0,
        comp_error           text,
        updated_at_ms        bigint NOT NULL DEFAULT 0
    )";
    const CREATE_INDEX: &str =
        "CREATE INDEX IF NOT EXISTS skald_fence_updated ON skald_fence (updated_at_ms)";
    /// A batch's transaction: a row lock waited for longer than this fails it (a
    /// `finish_action_in` transaction left open, say), rather than holding every
    /// operation of the batch.
    const BEGIN: &str = "BEGIN; SET LOCAL lock_timeout = '10s'";
    /// Creates the keys' rows or locks them, in the order of the array (byte order: every
    /// fence locks in the same order, so two batches cannot deadlock). The no-op update
    /// takes the row lock; under READ COMMITTED it waits for a concurrent holder and
    /// returns the row it committed.
    const LOCK: &str = concat!(
        "INSERT INTO skald_fence (key, updated_at_ms) \
         SELECT k, $2 FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n \
         ON CONFLICT (key) DO UPDATE SET key = excluded.key RETURNING key, ",
        columns!()
    );
    const SELECT: &str = concat!("SELECT ", columns!(), " FROM skald_fence WHERE key = $1");
    /// Writes the changed rows (locked by [`LOCK`] in the same transaction).
    const UPDATE: &str = "UPDATE skald_fence AS f SET \
         action_state = v.action_state, \
         action_attempt = v.action_attempt, \
         action_output = v.action_output, \
         action_error = v.action_error, \
         retried_through = v.retried_through, \
         action_claimed_at_ms = v.action_claimed_at_ms, \
         comp_state = v.comp_state, \
         comp_output = v.comp_output, \
         comp_claimed_at_ms = v.comp_claimed_at_ms, \
         comp_retried_through = v.comp_retried_through, \
         comp_error = v.comp_error, \
         updated_at_ms = v.updated_at_ms \
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
             $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::bigint[], \
             $11::bigint[], $12::text[], $13::bigint[]) \
         AS v(key, action_state, action_attempt, action_output, action_error, \
             retried_through, action_claimed_at_ms, comp_state, comp_output, \
             comp_claimed_at_ms, comp_retried_through, comp_error, updated_at_ms) \
         WHERE f.key = v.key";

    /// Locks `batch`'s keys, applies its operations in order and writes what changed, in
    /// the transaction open on `conn`.
    async fn apply_batch(
        conn: &mut PgConnection,
        batch: &[Pending],
    ) -> Result<Vec<Answered>, FenceError> {
        let keys = keys(batch);
        let now = batch.first().map(|p| p.timing.now()).unwrap_or_default();
        let rows = sqlx::query(LOCK)
            .bind(&keys)
            .bind(ms(now))
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
        let mut slots: BTreeMap<&str, Slot> = BTreeMap::new();
        for row in &rows {
            let key: String = row.try_get("key").map_err(db_error)?;
            if let Ok(at) = keys.binary_search(&key.as_str()) {
                slots.insert(keys[at], Slot::read(decode(row, db_error)));
            }
        }
        let decided = decide(batch, slots);
        let n = decided.writes.len();
        if n > 0 {
            let mut key = Vec::with_capacity(n);
            let mut action_state = Vec::with_capacity(n);
            let mut action_attempt = Vec::with_capacity(n);
            let mut action_output = Vec::with_capacity(n);
            let mut action_error = Vec::with_capacity(n);
            let mut retried_through = Vec::with_capacity(n);
            let mut action_claimed_at_ms = Vec::with_capacity(n);
            let mut comp_state = Vec::with_capacity(n);
            let mut comp_output = Vec::with_capacity(n);
            let mut comp_claimed_at_ms = Vec::with_capacity(n);
            let mut comp_retried_through = Vec::with_capacity(n);
            let mut comp_error = Vec::with_capacity(n);
            let mut updated_at_ms = Vec::with_capacity(n);
            for (k, e) in decided.writes {
                key.push(k);
                action_state.push(e.action_state);
                action_attempt.push(e.action_attempt);
                action_output.push(e.action_output);
                action_error.push(e.action_error);
                retried_through.push(e.retried_through);
                action_claimed_at_ms.push(e.action_claimed_at_ms);
                comp_state.push(e.comp_state);
                comp_output.push(e.comp_output);
                comp_claimed_at_ms.push(e.comp_claimed_at_ms);
                comp_retried_through.push(e.comp_retried_through);
                comp_error.push(e.comp_error);
                updated_at_ms.push(e.updated_at_ms);
            }
            let done = sqlx::query(UPDATE)
                .bind(key)
                .bind(action_state)
                .bind(action_attempt)
                .bind(action_output)
                .bind(action_error)
                .bind(retried_through)
                .bind(action_claimed_at_ms)
                .bind(comp_state)
                .bind(comp_output)
                .bind(comp_claimed_at_ms)
                .bind(comp_retried_through)
                .bind(comp_error)
                .bind(updated_at_ms)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
            if done.rows_affected() != n as u64 {
                return Err(FenceError::Other(format!(
                    "the fence updated {} rows of {n} locked",
                    done.rows_affected()
                )));
            }
        }
        Ok(decided.answers)
    }

    /// The writer's database: a transaction per batch, on a connection of the pool.
    struct Writer {
        pool: PgPool,
    }

    #[async_trait]
    impl Store for Writer {
        async fn transaction(&mut self, batch: &[Pending]) -> Result<Vec<Answered>, Failed> {
            let mut tx = self
                .pool
                .begin_with(BEGIN)
                .await
                .map_err(|e| Failed::before_commit(db_error(e)))?;
            let answers = apply_batch(&mut tx, batch)
                .await
                .map_err(Failed::before_commit)?;
            tx.commit()
                .await
                .map_err(|e| Failed::committing(db_error(e)))?;
            Ok(answers)
        }
    }

    /// The TCC fence in a PostgreSQL database, shared by any number of replicas (see the
    /// module documentation). Each fence's writer task applies the operations queued to
    /// it in transactions that hold their keys' row locks, many per transaction.
    #[derive(Debug, Clone)]
    pub struct PgFence {
        pool: PgPool,
        timing: Timing,
        queue: Queue,
    }

    impl PgFence {
        /// Connects to `url` (`postgres://user@host/db`) and creates the `skald_fence`
        /// table if missing.
        pub async fn connect(url: &str) -> Result<PgFence, FenceError> {
            let options = PostgresOptions {
                max_connections: 8,
                ..PostgresOptions::default()
            };
            let pool = open_pool(url, &options).await?;
            PgFence::with_pool(pool).await
        }

        /// A fence on an open pool (say the participant's own database, so handlers can
        /// use [`PgFence::finish_action_in`]); creates the table if missing, and spawns
        /// the fence's writer task on the current tokio runtime.
        pub async fn with_pool(pool: PgPool) -> Result<PgFence, FenceError> {
            PgFence::with_limits(pool, Limits::default()).await
        }

        pub(super) async fn with_limits(
            pool: PgPool,
            limits: Limits,
        ) -> Result<PgFence, FenceError> {
            let mut tx = pool.begin().await.map_err(db_error)?;
            for sql in [CREATE_LOCK, CREATE, CREATE_INDEX] {
                sqlx::query(sql).execute(&mut *tx).await.map_err(db_error)?;
            }
            tx.commit().await.map_err(db_error)?;
            let (queue, _task) = Queue::spawn(Writer { pool: pool.clone() }, limits)?;
            Ok(PgFence {
                pool,
                timing: Timing::default(),
                queue,
            })
        }

        /// The same fence with claims that hold for `lease` (default
        /// [`skald_runtime::participant::DEFAULT_LEASE`]).
        pub fn with_lease(mut self, lease: Duration) -> Self {
            self.timing.lease = lease;
            self
        }

        /// The same fence reading the time from `clock` (tests: a `ManualClock`).
        pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
            self.timing.clock = clock;
            self
        }

        /// The pool.
        pub fn pool(&self) -> &PgPool {
            &self.pool
        }

        /// Records the outcome of action attempt `attempt` of `key` in the caller's
        /// transaction, as [`Fence::finish_action`] does in one of its own: call it in
        /// the handler's transaction, after the handler's writes and before its commit,
        /// so the effect and the record commit together (a crash in between loses both,
        /// and the next delivery runs the handler on a clean slate). It row-locks the key
        /// until that commit (the fence's batches touching the key wait for it). Returns
        /// what to reply; the helper's own `finish_action` after the handler then finds
        /// the outcome recorded. When that answer is not the handler's own outcome (a
        /// compensation took the key over after the claim's lease: the refusal
        /// `compensated`), roll the transaction back instead of committing: the effect
        /// must not land after its undo.
        pub async fn finish_action_in(
            &self,
            tx: &mut Transaction<'_, Postgres>,
            key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            let batch = [Pending {
                key: key.to_owned(),
                op: Op::FinishAction(attempt, outcome.clone()),
                timing: self.timing.clone(),
            }];
            one(apply_batch(tx, &batch).await?)?.finished()
        }

        /// Deletes the records last changed before `before` that no delivery holds,
        /// returning how many. A deleted key is unknown again: a delivery of its action
        /// would run, and a compensation would find nothing to undo. Purge only what no
        /// saga can still send (say older than the saga store's retention). Rows a
        /// batch holds now are skipped (they are being changed), so a purge never waits
        /// for, nor deadlocks with, the fence's batches.
        pub async fn purge_before(&self, before: Timestamp) -> Result<u64, FenceError> {
            let done = sqlx::query(
                "DELETE FROM skald_fence WHERE key IN (SELECT key FROM skald_fence \
                 WHERE updated_at_ms < $1 \
                 AND action_state <> 'running' AND comp_state <> 'running' \
                 FOR UPDATE SKIP LOCKED)",
            )
            .bind(ms(before))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            Ok(done.rows_affected())
        }

        async fn apply(&self, key: &str, op: Op) -> Result<Answer, FenceError> {
            self.queue.apply(key, op, &self.timing).await
        }
    }

    #[async_trait]
    impl Fence for PgFence {
        async fn claim_action(&self, key: &str, attempt: u32) -> Result<ActionClaim, FenceError> {
            self.apply(key, Op::ClaimAction(attempt)).await?.action()
        }

        async fn finish_action(
            &self,
            key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            self.apply(key, Op::FinishAction(attempt, outcome.clone()))
                .await?
                .finished()
        }

        async fn claim_compensation(
            &self,
            action_key: &str,
            attempt: u32,
        ) -> Result<CompensationClaim, FenceError> {
            self.apply(action_key, Op::ClaimCompensation(attempt))
                .await?
                .compensation()
        }

        async fn finish_compensation(
            &self,
            action_key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            self.apply(action_key, Op::FinishCompensation(attempt, outcome.clone()))
                .await?
                .finished()
        }

        async fn record(&self, key: &str) -> Result<Option<FenceRecord>, FenceError> {
            let row = sqlx::query(SELECT)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
            row.as_ref().map(|r| decode(r, db_error)).transpose()
        }
    }
}

#[cfg(feature = "postgres")]
pub use postgres_fence::PgFence;
