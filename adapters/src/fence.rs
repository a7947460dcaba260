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
//! Every operation is one transaction that locks the key's row before reading it
//! (SQLite: `BEGIN IMMEDIATE`, which takes the database's write lock; PostgreSQL: an
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` that creates or row-locks the key),
//! applies the rule (`FenceRecord`'s methods, the same code as the in-memory fence) and
//! writes the row back before committing: two replicas racing on one key get exactly one
//! `ActionClaim::Run`.
//!
//! Times (the leases) are read from the participant's clock, not the database's: keep
//! the replicas' clocks within a small fraction of the lease of each other.
//!
//! A handler whose effect is a write to the same database can record its outcome in its
//! own transaction ([`PgFence::finish_action_in`], [`SqliteFence::finish_action_in`]): the
//! effect and the record then commit together, so a crash between the two cannot make a
//! later delivery run the handler again.

mod imp {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::Value;
    use skald_runtime::machine::{StepError, Timestamp};
    use skald_runtime::participant::fence::FenceRecord;
    pub(super) use skald_runtime::participant::fence::{
        ActionClaim, CompensationClaim, DEFAULT_LEASE, Fence, FenceError,
    };
    use skald_runtime::ports::{Clock, SystemClock};
    use sqlx::{ColumnIndex, Decode, Row, Type};

    /// The columns of a record, in [`decode`]'s order.
    macro_rules! columns {
        () => {
            "action_state, action_attempt, action_output, action_error, retried_through, \
             action_claimed_at_ms, comp_state, comp_output, comp_claimed_at_ms, \
             comp_retried_through, comp_error"
        };
    }
    pub(super) use columns;

    /// `INSERT ... ON CONFLICT (key) DO UPDATE` of every column; `$p` the placeholders.
    macro_rules! upsert {
        ($first:literal $(, $p:literal)*) => {
            concat!(
                "INSERT INTO skald_fence (key, ",
                columns!(),
                ", updated_at_ms) VALUES (",
                $first,
                $(", ", $p,)*
                ") ON CONFLICT (key) DO UPDATE SET \
                 action_state = excluded.action_state, \
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
            )
        };
    }
    pub(super) use upsert;

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
    pub(super) enum Op<'a> {
        ClaimAction(u32),
        FinishAction(u32, &'a skald_runtime::wire::Outcome),
        ClaimCompensation(u32),
        FinishCompensation(u32, &'a skald_runtime::wire::Outcome),
    }

    /// What an [`Op`] answered.
    pub(super) enum Answer {
        Action(ActionClaim),
        Compensation(CompensationClaim),
        Finished(skald_runtime::wire::Outcome),
    }

    impl Op<'_> {
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

        pub(super) fn finished(self) -> Result<skald_runtime::wire::Outcome, FenceError> {
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

    /// A record as the values bound to [`upsert!`] (after the key).
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
}

#[cfg(feature = "sqlite")]
mod sqlite_fence {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use skald_runtime::machine::Timestamp;
    use skald_runtime::participant::fence::FenceRecord;
    use skald_runtime::ports::Clock;
    use skald_runtime::wire::Outcome;
    use sqlx::sqlite::SqlitePool;
    use sqlx::{Sqlite, SqliteConnection, Transaction};

    use super::imp::{
        ActionClaim, Answer, CompensationClaim, Fence, FenceError, Op, Timing, columns, decode,
        encode, ms, upsert,
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
    const UPSERT: &str = upsert!(
        "?", "?", "?", "?", "?", "?", "?", "?", "?", "?", "?", "?", "?"
    );

    /// The TCC fence in a SQLite database (a file; see the module documentation). Replicas
    /// on one machine may share the file; each operation is a `BEGIN IMMEDIATE`
    /// transaction.
    #[derive(Debug, Clone)]
    pub struct SqliteFence {
        pool: SqlitePool,
        timing: Timing,
    }

    impl SqliteFence {
        /// Opens (creating if missing) the database at `url` (`sqlite://fence.db`) with
        /// WAL and `synchronous=FULL`, and creates the `skald_fence` table if missing.
        pub async fn connect(url: &str) -> Result<SqliteFence, FenceError> {
            let pool = open_pool(url, &SqliteOptions::default()).await?;
            SqliteFence::with_pool(pool).await
        }

        /// A fence on an open pool (say the participant's own database, so handlers can
        /// use [`SqliteFence::finish_action_in`]); creates the table if missing.
        pub async fn with_pool(pool: SqlitePool) -> Result<SqliteFence, FenceError> {
            sqlx::query(CREATE).execute(&pool).await.map_err(db_error)?;
            sqlx::query(CREATE_INDEX)
                .execute(&pool)
                .await
                .map_err(db_error)?;
            Ok(SqliteFence {
                pool,
                timing: Timing::default(),
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
        /// `finish_action` after the handler then finds the outcome recorded.
        pub async fn finish_action_in(
            &self,
            tx: &mut Transaction<'_, Sqlite>,
            key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            self.apply_on(tx, key, Op::FinishAction(attempt, outcome))
                .await?
                .finished()
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

        async fn apply_on(
            &self,
            conn: &mut SqliteConnection,
            key: &str,
            op: Op<'_>,
        ) -> Result<Answer, FenceError> {
            let row = sqlx::query(SELECT)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_error)?;
            let before = row.as_ref().map(|r| decode(r, db_error)).transpose()?;
            let mut record = before.clone().unwrap_or_default();
            let answer = op.apply(&mut record, &self.timing);
            if before.as_ref() != Some(&record) {
                let e = encode(&record, self.timing.now())?;
                sqlx::query(UPSERT)
                    .bind(key)
                    .bind(e.action_state)
                    .bind(e.action_attempt)
                    .bind(e.action_output)
                    .bind(e.action_error)
                    .bind(e.retried_through)
                    .bind(e.action_claimed_at_ms)
                    .bind(e.comp_state)
                    .bind(e.comp_output)
                    .bind(e.comp_claimed_at_ms)
                    .bind(e.comp_retried_through)
                    .bind(e.comp_error)
                    .bind(e.updated_at_ms)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
            }
            Ok(answer)
        }

        async fn apply(&self, key: &str, op: Op<'_>) -> Result<Answer, FenceError> {
            // IMMEDIATE: the write lock up front, so the read below is the latest and the
            // write cannot fail on a lock upgrade; other fences on the file wait for it.
            let mut tx = self
                .pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(db_error)?;
            let answer = self.apply_on(&mut tx, key, op).await?;
            tx.commit().await.map_err(db_error)?;
            Ok(answer)
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
            self.apply(key, Op::FinishAction(attempt, outcome))
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
            self.apply(action_key, Op::FinishCompensation(attempt, outcome))
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
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use skald_runtime::machine::Timestamp;
    use skald_runtime::participant::fence::FenceRecord;
    use skald_runtime::ports::Clock;
    use skald_runtime::wire::Outcome;
    use sqlx::postgres::{PgConnection, PgPool};
    use sqlx::{Postgres, Transaction};

    use super::imp::{
        ActionClaim, Answer, CompensationClaim, Fence, FenceError, Op, Timing, columns, decode,
        encode, ms, upsert,
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
    /// Creates the key's row or locks it (the no-op update takes the row lock; under READ
    /// COMMITTED it waits for a concurrent holder and returns the row it committed).
    const LOCK: &str = concat!(
        "INSERT INTO skald_fence (key, updated_at_ms) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET key = excluded.key RETURNING ",
        columns!()
    );
    const SELECT: &str = concat!("SELECT ", columns!(), " FROM skald_fence WHERE key = $1");
    const UPSERT: &str = upsert!(
        "$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10", "$11", "$12", "$13"
    );

    /// The TCC fence in a PostgreSQL database, shared by any number of replicas (see the
    /// module documentation). Each operation is one transaction holding the key's row
    /// lock.
    #[derive(Debug, Clone)]
    pub struct PgFence {
        pool: PgPool,
        timing: Timing,
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
        /// use [`PgFence::finish_action_in`]); creates the table if missing.
        pub async fn with_pool(pool: PgPool) -> Result<PgFence, FenceError> {
            let mut tx = pool.begin().await.map_err(db_error)?;
            for sql in [CREATE_LOCK, CREATE, CREATE_INDEX] {
                sqlx::query(sql).execute(&mut *tx).await.map_err(db_error)?;
            }
            tx.commit().await.map_err(db_error)?;
            Ok(PgFence {
                pool,
                timing: super::imp::Timing::default(),
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
        /// until that commit. Returns what to reply; the helper's own `finish_action`
        /// after the handler then finds the outcome recorded.
        pub async fn finish_action_in(
            &self,
            tx: &mut Transaction<'_, Postgres>,
            key: &str,
            attempt: u32,
            outcome: &Outcome,
        ) -> Result<Outcome, FenceError> {
            self.apply_on(tx, key, Op::FinishAction(attempt, outcome))
                .await?
                .finished()
        }

        /// Deletes the records last changed before `before` that no delivery holds,
        /// returning how many. A deleted key is unknown again: a delivery of its action
        /// would run, and a compensation would find nothing to undo. Purge only what no
        /// saga can still send (say older than the saga store's retention).
        pub async fn purge_before(&self, before: Timestamp) -> Result<u64, FenceError> {
            let done = sqlx::query(
                "DELETE FROM skald_fence WHERE updated_at_ms < $1 \
                 AND action_state <> 'running' AND comp_state <> 'running'",
            )
            .bind(ms(before))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            Ok(done.rows_affected())
        }

        async fn apply_on(
            &self,
            conn: &mut PgConnection,
            key: &str,
            op: Op<'_>,
        ) -> Result<Answer, FenceError> {
            let now = self.timing.now();
            let row = sqlx::query(LOCK)
                .bind(key)
                .bind(ms(now))
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
            let before = decode(&row, db_error)?;
            let mut record = before.clone();
            let answer = op.apply(&mut record, &self.timing);
            if before != record {
                let e = encode(&record, self.timing.now())?;
                sqlx::query(UPSERT)
                    .bind(key)
                    .bind(e.action_state)
                    .bind(e.action_attempt)
                    .bind(e.action_output)
                    .bind(e.action_error)
                    .bind(e.retried_through)
                    .bind(e.action_claimed_at_ms)
                    .bind(e.comp_state)
                    .bind(e.comp_output)
                    .bind(e.comp_claimed_at_ms)
                    .bind(e.comp_retried_through)
                    .bind(e.comp_error)
                    .bind(e.updated_at_ms)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
            }
            Ok(answer)
        }

        async fn apply(&self, key: &str, op: Op<'_>) -> Result<Answer, FenceError> {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let answer = self.apply_on(&mut tx, key, op).await?;
            tx.commit().await.map_err(db_error)?;
            Ok(answer)
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
            self.apply(key, Op::FinishAction(attempt, outcome))
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
            self.apply(action_key, Op::FinishCompensation(attempt, outcome))
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
