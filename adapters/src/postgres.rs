//! The PostgreSQL store: skald's production store, shared by any number of skald
//! processes.
//!
//! - Migrations (`migrations/postgres`) are applied at connect; sqlx serialises
//!   concurrent migrators with an advisory lock, so several processes may start at once.
//! - Optimistic concurrency: every state change is `UPDATE ... WHERE version = $read`;
//!   a journal-only write locks the row (`FOR SHARE`) to check its version. Writes of
//!   one group commit are applied in saga id order, so two processes' commits rarely
//!   wait on each other in a cycle; when they do (the planner of a set-based statement
//!   picks its own order), PostgreSQL aborts one as a deadlock, which is "unavailable":
//!   its writes are retried, nothing is lost.
//! - A group commit is one round trip when small (the `skald_commit` function of the
//!   migrations, in its own implicit transaction: the lowest latency), and a few
//!   set-based statements over arrays (`UNNEST`) in one transaction when large (the
//!   highest throughput); never a statement per row.
//! - Due wake-ups and outbox rows are claimed with `FOR UPDATE SKIP LOCKED` and a lease,
//!   so two processes never fire the same wake-up or publish the same row.
//! - Durability is the server's: with `synchronous_commit = on` (the default) a commit
//!   returns once its WAL is flushed.
//!
//! Times are stored as milliseconds since the Unix epoch (bigint), as in SQLite.

use std::time::Duration;

use async_trait::async_trait;
use skald_runtime::ids::{CommandKind, SagaId, SagaType};
use skald_runtime::machine::{SagaState, SagaStatus, Timestamp};
use skald_runtime::ports::{
    DeadLetterCategory, DeadLetterQuery, DeadLetterRecord, JournalEntry, Lease, MAX_QUERY_ROWS,
    OutboxMessage, PurgeReport, SagaOrder, SagaQueries, SagaQuery, SagaStore, SagaSummary,
    SagaWrite, StoreError, StoreStats, StoredSaga, WriteOutcome,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Column, Postgres, Row, Transaction, TypeInfo};
use uuid::Uuid;

use crate::redact_url as redact;
use crate::sql::{
    CommitBatch, CommitWrite, QueryRow, classify, corrupt, decode_dead_letter, decode_state,
    due_in_order, encode_headers, encode_json, limit, ms, outbox_in_order, parse_id,
};

pub use crate::sql::TxStart;

/// The embedded migrations (`migrations/postgres`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Options of [`PostgresStore::connect_with`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most pooled connections. Default: 16.
    pub max_connections: u32,
    /// How long an operation waits for a connection before failing as unavailable (the
    /// runtime then retries it later). Default: 10 s.
    pub acquire_timeout: Duration,
    /// Group commits of up to this many writes go as one call of `skald_commit` (one
    /// round trip: the lowest latency); larger ones as a few set-based statements in a
    /// transaction (the highest throughput). Default: 16.
    pub single_call_max_writes: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            single_call_max_writes: 16,
        }
    }
}

/// The PostgreSQL saga store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    single_call_max_writes: usize,
}

/// Maps a sqlx error to the port's error at the boundary, by SQLSTATE.
pub fn store_error(e: sqlx::Error) -> StoreError {
    classify(e, |db| {
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        let msg = db.message();
        match code.as_str() {
            // Connection exceptions; serialization failure and deadlock; insufficient
            // resources; operator intervention (pg_terminate_backend, shutdown, starting
            // up, statement cancelled or timed out, idle session timeout); lock not
            // available; read-only standby after a failover; idle-in-transaction
            // timeout; I/O error.
            c if c.starts_with("08") || c.starts_with("53") => {
                Some(StoreError::Unavailable(format!("{msg} (SQLSTATE {c})")))
            }
            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "57P05" | "57014" | "55P03"
            | "25006" | "25P03" | "58030" => {
                Some(StoreError::Unavailable(format!("{msg} (SQLSTATE {code})")))
            }
            // Undefined table, column, function, object, schema or database; no
            // privilege; authentication refused: an operator has to act.
            "42P01" | "42703" | "42883" | "42704" | "3F000" | "3D000" | "42501" | "28000"
            | "28P01" => Some(StoreError::Schema(format!(
                "{msg} (SQLSTATE {code}): the database lacks skald's tables, has another \
                     version of them, or the user may not use them"
            ))),
            _ => None,
        }
    })
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect_with(url, PostgresOptions::default()).await
    }

    /// Like [`PostgresStore::connect`], with options.
    pub async fn connect_with(
        url: &str,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let pool = open_pool(url, &options).await?;
        MIGRATOR.run(&pool).await.map_err(|e| {
            StoreError::Schema(format!(
                "applying the PostgreSQL migrations to {} failed: {e}",
                redact(url)
            ))
        })?;
        Ok(PostgresStore {
            pool,
            single_call_max_writes: options.single_call_max_writes,
        })
    }

    /// Connects to an existing skald database without migrating anything: for tools
    /// that must not change it (the operator CLI). Refuses a database whose schema is
    /// not exactly this build's.
    pub async fn open_existing(url: &str) -> Result<PostgresStore, StoreError> {
        let options = PostgresOptions {
            max_connections: 2,
            ..PostgresOptions::default()
        };
        let pool = open_pool(url, &options).await?;
        let applied = match sqlx::query_scalar::<_, i64>(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&pool)
        .await
        {
            Ok(v) => Some(v),
            Err(e) if crate::sql::is_missing_table(&e) => None,
            Err(e) => return Err(store_error(e)),
        };
        crate::sql::check_schema(
            applied,
            &MIGRATOR,
            &format!("PostgreSQL database {}", redact(url)),
        )?;
        Ok(PostgresStore {
            pool,
            single_call_max_writes: options.single_call_max_writes,
        })
    }

    /// The connection pool: for the caller's own transactions on skald's database
    /// ([`PostgresStore::start_in`]), among others.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes a prepared saga start (`Runtime::prepare_start`,
    /// `Runtime::prepare_start_keyed`) in the caller's own transaction, `conn`: the saga's
    /// row, its journal entry and its outbox rows, with the same statement a group commit
    /// uses (`skald_commit`, one round trip). The saga and the caller's rows commit
    /// together, or not at all; once the transaction commits, the outbox relay of any
    /// skald process on this database publishes the first command: `Runtime::started`
    /// gives the saga's handle and wakes this process's relay (any other relay on the
    /// database takes it within its `outbox_poll_interval`). A rollback
    /// leaves no saga and sends nothing.
    ///
    /// `conn` must be a connection to the database the runtime's store uses (the same
    /// database, where skald's tables are): [`PostgresStore::pool`] gives one, or the
    /// application's own pool on that database. Pass the transaction (`&mut *tx`).
    ///
    /// A saga with the same id that exists (a keyed start whose key was used, by a
    /// transaction that committed) is answered [`TxStart::Existing`]: nothing is written
    /// and, no statement having failed, the transaction is as it was, to commit or roll
    /// back. (A concurrent transaction writing the same key makes this one wait for its
    /// outcome.) An `Err` is the database's, and leaves the transaction to roll back, as
    /// any failed statement does in PostgreSQL.
    ///
    /// ```no_run
    /// # use skald_adapters::postgres::{PostgresStore, TxStart};
    /// # use skald_runtime::definition::SagaDefinition;
    /// # use skald_runtime::runtime::{Runtime, SagaHandle};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct Checkout { order_id: String, total_cents: i64 }
    /// # async fn place_order(
    /// #     runtime: &Runtime,
    /// #     store: &PostgresStore,
    /// #     checkout: &SagaDefinition<Checkout>,
    /// # ) -> Result<SagaHandle<Checkout>, Box<dyn std::error::Error>> {
    /// // CREATE TABLE orders (id text PRIMARY KEY, total_cents bigint NOT NULL)
    /// let order = Checkout { order_id: "o-42".into(), total_cents: 1250 };
    /// // Decided before the transaction (no I/O): one checkout saga per order id.
    /// let start = runtime.prepare_start_keyed(checkout, &order.order_id, &order)?;
    ///
    /// let mut tx = store.pool().begin().await?;
    /// sqlx::query("INSERT INTO orders (id, total_cents) VALUES ($1, $2)")
    ///     .bind(&order.order_id)
    ///     .bind(order.total_cents)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// match PostgresStore::start_in(&mut *tx, &start).await? {
    ///     TxStart::Written(_) => {
    ///         tx.commit().await?;
    ///         // The first command goes out through the outbox now.
    ///         Ok(runtime.started(start))
    ///     }
    ///     // This order's saga exists: nothing of it was written here.
    ///     TxStart::Existing(id) => {
    ///         tx.rollback().await?;
    ///         Ok(runtime.saga(checkout, id))
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn start_in(
        conn: &mut PgConnection,
        start: &(impl AsRef<SagaWrite> + ?Sized),
    ) -> Result<TxStart, StoreError> {
        let write = start.as_ref();
        crate::sql::check_start(write)?;
        let batch = CommitBatch {
            published: &[],
            writes: vec![CommitWrite::of(write)],
        };
        let answer: String = sqlx::query_scalar("SELECT skald_commit($1::jsonb)::text")
            .bind(encode_json(&batch)?)
            .fetch_one(&mut *conn)
            .await
            .map_err(store_error)?;
        match decode_commit_answer(&answer, 1)?.as_slice() {
            [outcome] => crate::sql::tx_start(write.id, *outcome),
            _ => Err(StoreError::Other("skald_commit answered no outcome".into())),
        }
    }

    /// A large group commit: a fixed number of set-based statements (UNNEST arrays)
    /// inside one transaction; PostgreSQL applies them faster than `skald_commit`'s
    /// row-by-row loop once a batch holds more than a few writes.
    async fn commit_statements(
        &self,
        writes: &[SagaWrite],
        published: &[Uuid],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        if !published.is_empty() {
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1::text[]::uuid[])")
                .bind(strings(published.iter()))
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        // Writes in saga id order (see the module's note on deadlocks). A saga written
        // twice in one batch (a passivation race) goes into a later round: every
        // statement sees each saga once.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&i| writes[i].id);
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; writes.len()];
        for round in crate::sql::rounds(writes, order) {
            let batch = Batch {
                writes: round.into_iter().map(|i| (i, &writes[i])).collect(),
            };
            batch.apply(&mut tx, &mut outcomes).await?;
        }
        let outcomes: Vec<WriteOutcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(WriteOutcome::Conflict))
            .collect();
        tx.commit().await.map_err(store_error)?;
        Ok(outcomes)
    }
}

/// Opens a pool on `url` without applying migrations, checking that the server answers.
pub async fn open_pool(url: &str, options: &PostgresOptions) -> Result<PgPool, StoreError> {
    let connect: PgConnectOptions = url
        .parse()
        .map_err(|e| StoreError::Schema(format!("invalid PostgreSQL URL {}: {e}", redact(url))))?;
    PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(|e| match store_error(e) {
            StoreError::Unavailable(m) | StoreError::Other(m) => StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {}: {m}",
                redact(url)
            )),
            other => other,
        })
}

/// One write's rows, flattened for the batch statements.
struct Batch<'a> {
    writes: Vec<(usize, &'a SagaWrite)>,
}

impl<'a> Batch<'a> {
    /// Applies one round of writes (no saga twice) with a fixed number of statements:
    /// inbox, creations, updates, version checks of journal-only writes, journal,
    /// outbox; dead letters (rare) row by row. Per-write atomicity is kept: a write
    /// refused for a conflict leaves nothing behind, its inbox entry included.
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        outcomes: &mut [Option<WriteOutcome>],
    ) -> Result<(), StoreError> {
        // 1. The inbox: a message applied before is refused before anything is written.
        let with_inbox: Vec<&(usize, &SagaWrite)> = self
            .writes
            .iter()
            .filter(|(_, w)| w.inbox.is_some())
            .collect();
        if !with_inbox.is_empty() {
            let inserted: Vec<String> = sqlx::query_scalar(
                "INSERT INTO inbox (message_id, saga_id, received_at_ms) \
                 SELECT u.m, u.s::uuid, u.t FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS u(m, s, t) \
                 ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
            )
            .bind(strings(with_inbox.iter().map(|(_, w)| w.inbox.as_deref().unwrap_or_default())))
            .bind(strings(with_inbox.iter().map(|(_, w)| w.id)))
            .bind(
                with_inbox
                    .iter()
                    .map(|(_, w)| ms(w.journal.first().map(|j| j.at).unwrap_or_default()))
                    .collect::<Vec<i64>>(),
            )
            .fetch_all(&mut **tx)
            .await
            .map_err(store_error)?;
            crate::sql::mark_duplicates(
                inserted,
                with_inbox.iter().map(|(i, w)| (*i, *w)),
                outcomes,
            );
        }
        let live: Vec<&(usize, &SagaWrite)> = self
            .writes
            .iter()
            .filter(|(i, _)| outcomes[*i].is_none())
            .collect();

        // 2. Creations, 3. versioned updates, 4. version checks: each decides its writes.
        let mut applied: std::collections::HashSet<SagaId> = std::collections::HashSet::new();
        let creates: Vec<(&SagaWrite, &SagaState)> = live
            .iter()
            .filter_map(|(_, w)| {
                w.state
                    .as_ref()
                    .filter(|_| w.expected_version == 0)
                    .map(|s| (*w, s))
            })
            .collect();
        if !creates.is_empty() {
            let mut states = Vec::with_capacity(creates.len());
            for (_, s) in &creates {
                states.push(encode_json(s)?);
            }
            let mut partitions = Vec::with_capacity(creates.len());
            for (w, _) in &creates {
                partitions.push(partition_no(w.partition)?);
            }
            let ids: Vec<String> = sqlx::query_scalar(
                "INSERT INTO saga_instances (id, saga_type, definition_version, status, version, \
                 state, next_wakeup_ms, created_at_ms, updated_at_ms, partition_no) \
                 SELECT u.id::uuid, u.ty, u.dv, u.st, 1, u.state::jsonb, u.wake, u.created, u.updated, u.p \
                 FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[], $9::int4[]) \
                   AS u(id, ty, dv, st, state, wake, created, updated, p) \
                 ON CONFLICT (id) DO NOTHING RETURNING id::text",
            )
            .bind(strings(creates.iter().map(|(w, _)| w.id)))
            .bind(strings(creates.iter().map(|(_, s)| s.saga_type.as_str())))
            .bind(
                creates
                    .iter()
                    .map(|(_, s)| i32::try_from(s.definition_version).unwrap_or(i32::MAX))
                    .collect::<Vec<i32>>(),
            )
            .bind(strings(creates.iter().map(|(_, s)| s.status.as_str())))
            .bind(states)
            .bind(creates.iter().map(|(_, s)| s.wake_at().map(ms)).collect::<Vec<Option<i64>>>())
            .bind(creates.iter().map(|(_, s)| ms(s.created_at)).collect::<Vec<i64>>())
            .bind(creates.iter().map(|(_, s)| ms(s.updated_at)).collect::<Vec<i64>>())
            .bind(partitions)
            .fetch_all(&mut **tx)
            .await
            .map_err(store_error)?;
            for id in ids {
                applied.insert(parse_id(&id)?);
            }
        }
        let updates: Vec<(&SagaWrite, &SagaState)> = live
            .iter()
            .filter_map(|(_, w)| {
                w.state
                    .as_ref()
                    .filter(|_| w.expected_version > 0)
                    .map(|s| (*w, s))
            })
            .collect();
        if !updates.is_empty() {
            let mut states = Vec::with_capacity(updates.len());
            let mut versions = Vec::with_capacity(updates.len());
            for (w, s) in &updates {
                states.push(encode_json(s)?);
                versions
                    .push(i64::try_from(w.expected_version).map_err(|e| corrupt("version", e))?);
            }
            // A state change ends any claim on the old wake-up.
            let ids: Vec<String> = sqlx::query_scalar(
                "UPDATE saga_instances s SET status = u.st, version = u.v + 1, state = u.state::jsonb, \
                 next_wakeup_ms = u.wake, wakeup_claimed_until_ms = NULL, updated_at_ms = u.updated \
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::int8[]) \
                   AS u(id, st, v, state, wake, updated) \
                 WHERE s.id = u.id::uuid AND s.version = u.v RETURNING s.id::text",
            )
            .bind(strings(updates.iter().map(|(w, _)| w.id)))
            .bind(strings(updates.iter().map(|(_, s)| s.status.as_str())))
            .bind(versions)
            .bind(states)
            .bind(updates.iter().map(|(_, s)| s.wake_at().map(ms)).collect::<Vec<Option<i64>>>())
            .bind(updates.iter().map(|(_, s)| ms(s.updated_at)).collect::<Vec<i64>>())
            .fetch_all(&mut **tx)
            .await
            .map_err(store_error)?;
            for id in ids {
                applied.insert(parse_id(&id)?);
            }
        }
        let checks: Vec<&SagaWrite> = live
            .iter()
            .filter(|(_, w)| w.state.is_none())
            .map(|(_, w)| *w)
            .collect();
        if !checks.is_empty() {
            // Journal only (an ignored input): valid only on the version the writer read,
            // held until the commit (FOR SHARE) so that no other process changes it first.
            let rows = sqlx::query(
                "SELECT id::text AS id, version FROM saga_instances \
                 WHERE id = ANY($1::text[]::uuid[]) ORDER BY id FOR SHARE",
            )
            .bind(strings(checks.iter().map(|w| w.id)))
            .fetch_all(&mut **tx)
            .await
            .map_err(store_error)?;
            crate::sql::check_versions(&rows, checks, &mut applied)?;
        }
        let conflicted_inbox =
            crate::sql::settle(live.iter().map(|(i, w)| (*i, *w)), &applied, outcomes);
        // Nothing of a conflicting write may stay, its inbox entry included.
        if !conflicted_inbox.is_empty() {
            sqlx::query("DELETE FROM inbox WHERE message_id = ANY($1::text[])")
                .bind(strings(conflicted_inbox.into_iter()))
                .execute(&mut **tx)
                .await
                .map_err(store_error)?;
        }
        let committed: Vec<&SagaWrite> = live
            .iter()
            .filter(|(i, _)| matches!(outcomes[*i], Some(WriteOutcome::Committed { .. })))
            .map(|(_, w)| *w)
            .collect();

        // 5. Journal entries, in order.
        let entries: Vec<(&SagaWrite, &JournalEntry)> = committed
            .iter()
            .flat_map(|w| w.journal.iter().map(move |e| (*w, e)))
            .collect();
        if !entries.is_empty() {
            let mut bodies = Vec::with_capacity(entries.len());
            for (_, e) in &entries {
                bodies.push(encode_json(&e.body)?);
            }
            sqlx::query(
                "INSERT INTO saga_journal (saga_id, at_ms, schema_version, kind, body) \
                 SELECT u.s::uuid, u.at, u.sv, u.k, u.b::jsonb \
                 FROM UNNEST($1::text[], $2::int8[], $3::int4[], $4::text[], $5::text[]) \
                   WITH ORDINALITY AS u(s, at, sv, k, b, n) ORDER BY u.n",
            )
            .bind(strings(entries.iter().map(|(w, _)| w.id)))
            .bind(entries.iter().map(|(_, e)| ms(e.at)).collect::<Vec<i64>>())
            .bind(
                entries
                    .iter()
                    .map(|(_, e)| i32::from(e.schema_version))
                    .collect::<Vec<i32>>(),
            )
            .bind(strings(entries.iter().map(|(_, e)| e.kind.as_str())))
            .bind(bodies)
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
        }

        // 6. Outbox rows, in commit order, in their write's partition.
        let mut rows: Vec<OutboxRow<'_>> = Vec::new();
        for w in &committed {
            let partition = Some(partition_no(w.partition)?);
            rows.extend(w.outbox.iter().map(|m| OutboxRow {
                saga: Some(w.id.to_string()),
                partition,
                message: m,
            }));
        }
        insert_outbox_rows(tx, &rows).await?;

        // Dead letters and their resolution: rare, row by row.
        for w in committed {
            if w.resolve_dead_letters {
                let now = w.journal.first().map(|j| j.at).unwrap_or_default();
                sqlx::query(
                    "UPDATE dead_letters SET resolved_at_ms = $1 \
                     WHERE saga_id = $2::uuid AND category = 'saga' AND resolved_at_ms IS NULL",
                )
                .bind(ms(now))
                .bind(w.id.to_string())
                .execute(&mut **tx)
                .await
                .map_err(store_error)?;
            }
            if let Some(dl) = &w.dead_letter {
                insert_dead_letter(tx, dl).await?;
            }
        }
        Ok(())
    }
}

/// `skald_commit`'s answer for `writes` writes: their outcomes, in the order given.
fn decode_commit_answer(answer: &str, writes: usize) -> Result<Vec<WriteOutcome>, StoreError> {
    let answer: Vec<serde_json::Value> =
        serde_json::from_str(answer).map_err(|e| corrupt("skald_commit's answer", e))?;
    if answer.len() != writes {
        return Err(StoreError::Other(format!(
            "skald_commit answered {} outcomes for {writes} writes",
            answer.len()
        )));
    }
    answer
        .into_iter()
        .map(|a| match a {
            serde_json::Value::Number(v) => Ok(WriteOutcome::Committed {
                version: v.as_u64().ok_or_else(|| corrupt("version", &v))?,
            }),
            serde_json::Value::String(s) if s == "duplicate" => Ok(WriteOutcome::Duplicate),
            serde_json::Value::String(s) if s == "conflict" => Ok(WriteOutcome::Conflict),
            other => Err(corrupt("skald_commit's answer", other)),
        })
        .collect()
}

/// Binds a list as one array parameter.
fn strings<T: ToString>(xs: impl Iterator<Item = T>) -> Vec<String> {
    xs.map(|x| x.to_string()).collect()
}

/// A partition as stored (`integer`). Partitions are below `MAX_PARTITIONS`; one that is
/// not representable is refused rather than stored as another.
fn partition_no(partition: u32) -> Result<i32, StoreError> {
    i32::try_from(partition)
        .map_err(|_| StoreError::Other(format!("partition {partition} is out of range")))
}

/// The partitions a claim is limited to, as bound (`NULL`: no limit). One no row can be
/// stored in matches nothing, and is left out.
fn partition_filter(partitions: Option<&[u32]>) -> Option<Vec<i32>> {
    partitions.map(|ps| ps.iter().filter_map(|p| i32::try_from(*p).ok()).collect())
}

/// One outbox row to insert: its saga and partition (none for a poison message's
/// announcement) and the message.
struct OutboxRow<'a> {
    saga: Option<String>,
    partition: Option<i32>,
    message: &'a OutboxMessage,
}

/// Inserts outbox rows with one statement, in the order given.
async fn insert_outbox_rows(
    tx: &mut Transaction<'static, Postgres>,
    rows: &[OutboxRow<'_>],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut headers = Vec::with_capacity(rows.len());
    for r in rows {
        headers.push(encode_headers(&r.message.message.headers)?);
    }
    sqlx::query(
        "INSERT INTO outbox (id, saga_id, subject, headers, payload, created_at_ms, available_at_ms, partition_no) \
         SELECT u.id::uuid, u.s::uuid, u.subj, u.h::jsonb, u.p, u.c, u.a, u.part \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::int8[], $7::int8[], $8::int4[]) \
           WITH ORDINALITY AS u(id, s, subj, h, p, c, a, part, n) ORDER BY u.n",
    )
    .bind(strings(rows.iter().map(|r| r.message.id)))
    .bind(rows.iter().map(|r| r.saga.clone()).collect::<Vec<Option<String>>>())
    .bind(strings(rows.iter().map(|r| r.message.message.subject.as_str())))
    .bind(headers)
    .bind(rows.iter().map(|r| r.message.message.payload.to_vec()).collect::<Vec<Vec<u8>>>())
    .bind(rows.iter().map(|r| ms(crate::created_at(r.message.id))).collect::<Vec<i64>>())
    .bind(rows.iter().map(|r| ms(r.message.available_at)).collect::<Vec<i64>>())
    .bind(rows.iter().map(|r| r.partition).collect::<Vec<Option<i32>>>())
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    Ok(())
}

async fn insert_dead_letter(
    tx: &mut Transaction<'static, Postgres>,
    dl: &DeadLetterRecord,
) -> Result<(), StoreError> {
    let message = dl.message.as_ref().map(encode_json).transpose()?;
    sqlx::query(
        "INSERT INTO dead_letters (id, category, saga_id, saga_type, step, kind, reason, attempts, \
         message, created_at_ms) VALUES ($1::uuid, $2, $3::uuid, $4, $5, $6, $7, $8, $9::jsonb, $10)",
    )
    .bind(dl.id.to_string())
    .bind(dl.category.as_str())
    .bind(dl.saga_id.map(|s| s.to_string()))
    .bind(dl.saga_type.as_deref())
    .bind(dl.step.as_deref())
    .bind(dl.kind.map(CommandKind::as_str))
    .bind(&dl.reason)
    .bind(i32::try_from(dl.attempts).unwrap_or(i32::MAX))
    .bind(message)
    .bind(ms(dl.at))
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    Ok(())
}

#[async_trait]
impl SagaStore for PostgresStore {
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        sqlx::query("SELECT state::text AS state, version FROM saga_instances WHERE id = $1::uuid")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?
            .as_ref()
            .map(decode_state)
            .transpose()
    }

    async fn commit(
        &self,
        writes: &[SagaWrite],
        published: &[Uuid],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        if writes.is_empty() && published.is_empty() {
            return Ok(Vec::new());
        }
        if writes.len() > self.single_call_max_writes {
            return self.commit_statements(writes, published).await;
        }
        // Row locks in saga id order (stable: one saga's writes keep their order), so
        // that two processes' group commits never wait on each other in a cycle.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&i| writes[i].id);
        let batch = CommitBatch {
            published,
            writes: order.iter().map(|&i| CommitWrite::of(&writes[i])).collect(),
        };
        let batch = encode_json(&batch)?;
        // One statement, its own transaction: one round trip for the whole batch.
        let answer: String = sqlx::query_scalar("SELECT skald_commit($1::jsonb)::text")
            .bind(batch)
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        let answer = decode_commit_answer(&answer, writes.len())?;
        let mut outcomes = vec![WriteOutcome::Conflict; writes.len()];
        for (&i, outcome) in order.iter().zip(answer) {
            outcomes[i] = outcome;
        }
        Ok(outcomes)
    }

    async fn claim_wakeups(
        &self,
        now: Timestamp,
        types: &[(SagaType, u32)],
        partitions: Option<&[u32]>,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<SagaId>, StoreError> {
        let types: Vec<String> = types.iter().map(|(t, v)| format!("{t}:{v}")).collect();
        // $5 NULL: every partition. Sagas with no partition (created before partitions
        // existed) are everyone's.
        let rows = sqlx::query(
            "UPDATE saga_instances SET wakeup_claimed_until_ms = $1 WHERE id IN ( \
               SELECT id FROM saga_instances WHERE next_wakeup_ms IS NOT NULL AND next_wakeup_ms <= $2 \
               AND (wakeup_claimed_until_ms IS NULL OR wakeup_claimed_until_ms <= $2) \
               AND (saga_type || ':' || definition_version) = ANY($3::text[]) \
               AND ($5::int4[] IS NULL OR partition_no IS NULL OR partition_no = ANY($5::int4[])) \
               ORDER BY next_wakeup_ms LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING id::text AS id, next_wakeup_ms",
        )
        .bind(ms(now.plus(lease)))
        .bind(ms(now))
        .bind(types)
        .bind(limit(max))
        .bind(partition_filter(partitions))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        due_in_order(&rows)
    }

    async fn claim_outbox(
        &self,
        now: Timestamp,
        partitions: Option<&[u32]>,
        lease: Duration,
        max: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let until = now.plus(lease);
        // $4 NULL: every partition. Rows with no partition (a poison message's
        // announcement, rows written before partitions existed) are everyone's.
        let rows = sqlx::query(
            "WITH claimed AS ( \
               SELECT seq FROM outbox WHERE available_at_ms <= $2 \
               AND ($4::int4[] IS NULL OR partition_no IS NULL OR partition_no = ANY($4::int4[])) \
               ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) \
             UPDATE outbox o SET available_at_ms = $1 FROM claimed WHERE o.seq = claimed.seq \
             RETURNING o.seq, o.id::text AS id, o.subject, o.headers::text AS headers, o.payload",
        )
        .bind(ms(until))
        .bind(ms(now))
        .bind(limit(max))
        .bind(partition_filter(partitions))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        outbox_in_order(&rows, until)
    }

    async fn prune_inbox(&self, before: Timestamp) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM inbox WHERE received_at_ms < $1")
            .bind(ms(before))
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected())
    }

    async fn outbox_backlog(&self) -> Result<(u64, Option<Timestamp>), StoreError> {
        let row = sqlx::query(crate::sql::OUTBOX_BACKLOG)
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        crate::sql::decode_backlog(&row)
    }

    async fn active_sagas(
        &self,
        after: Option<SagaId>,
        max: usize,
    ) -> Result<Vec<SagaId>, StoreError> {
        let rows = sqlx::query(
            "SELECT id::text AS id FROM saga_instances \
             WHERE status IN ('running', 'compensating') AND ($1::uuid IS NULL OR id > $1::uuid) \
             ORDER BY saga_instances.id LIMIT $2",
        )
        .bind(after.map(|a| a.to_string()))
        .bind(limit(max))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        crate::sql::decode_ids(&rows)
    }

    async fn settled_among(&self, ids: &[SagaId]) -> Result<Vec<SagaId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT id::text AS id FROM saga_instances \
             WHERE id = ANY($1::uuid[]) AND status IN ('completed', 'compensated', 'failed')",
        )
        .bind(ids.iter().map(ToString::to_string).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        crate::sql::decode_ids(&rows)
    }

    async fn unfinished_versions(
        &self,
        types: &[SagaType],
    ) -> Result<Vec<(SagaType, u32, u64)>, StoreError> {
        let names: Vec<&str> = types.iter().map(SagaType::as_str).collect();
        let rows = sqlx::query(
            "SELECT saga_type, definition_version::int8 AS definition_version, COUNT(*) AS n FROM saga_instances \
             WHERE status IN ('created', 'running', 'compensating', 'failed') \
             AND saga_type = ANY($1::text[]) \
             GROUP BY saga_type, definition_version ORDER BY saga_type, definition_version",
        )
        .bind(names)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_version_count).collect()
    }

    async fn in_flight_counts(&self) -> Result<Vec<(SagaType, u64)>, StoreError> {
        let rows = sqlx::query(crate::sql::IN_FLIGHT_COUNTS)
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_type_count).collect()
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let got: Option<String> = sqlx::query_scalar(
            "INSERT INTO skald_leases (name, holder, until_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms \
             WHERE skald_leases.holder = EXCLUDED.holder OR skald_leases.until_ms < $4 \
             RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(ms(now.plus(lease)))
        .bind(ms(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(got.as_deref() == Some(holder))
    }

    async fn acquire_leases(
        &self,
        names: &[String],
        holder: &str,
        now: Timestamp,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        // One statement, `acquire_lease`'s rule for each name. The names sorted and
        // once each: two holders take the rows' locks in the same order (no deadlock),
        // and no row is upserted twice by one statement (an error in PostgreSQL).
        let names = crate::sql::lease_names(names);
        if names.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(
            "INSERT INTO skald_leases (name, holder, until_ms) \
             SELECT u.name, $2, $3 FROM UNNEST($1::text[]) WITH ORDINALITY AS u(name, n) ORDER BY u.n \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms \
             WHERE skald_leases.holder = EXCLUDED.holder OR skald_leases.until_ms < $4 \
             RETURNING name",
        )
        .bind(names)
        .bind(holder)
        .bind(ms(now.plus(lease)))
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)
    }

    async fn release_leases(&self, names: &[String], holder: &str) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        // The rows locked in `acquire_leases`'s order (bytes: COLLATE "C"), so that a
        // release and another holder's acquisition of the same names never deadlock.
        sqlx::query(
            "DELETE FROM skald_leases WHERE name IN ( \
               SELECT name FROM skald_leases WHERE name = ANY($1::text[]) AND holder = $2 \
               ORDER BY name COLLATE \"C\" FOR UPDATE) \
             AND holder = $2",
        )
        .bind(names)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn leases(&self, prefix: &str, now: Timestamp) -> Result<Vec<Lease>, StoreError> {
        // A prefix compared as a string (not LIKE: `_` and `%` are no wildcards here);
        // name order by bytes, as the other stores sort.
        let rows = sqlx::query(
            "SELECT name, holder, until_ms FROM skald_leases \
             WHERE until_ms >= $2 AND left(name, char_length($1::text)) = $1::text \
             ORDER BY name COLLATE \"C\"",
        )
        .bind(prefix)
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_lease).collect()
    }

    async fn purge_finished(
        &self,
        before: Timestamp,
        max: usize,
    ) -> Result<PurgeReport, StoreError> {
        // One statement: the batch (finished, old and not keyed: `unkeyed!`; locked,
        // skipping rows a writer holds), then its journal, dead letters and rows; and
        // as many poison records of no saga (or of one deleted before: all the
        // statement's parts see one snapshot, so none of the batch's) recorded before
        // `before`. The batch is read through the partial index `saga_instances_purgeable`
        // (updated_at_ms; finished rows that are not keyed, the condition to the letter)
        // in its order: kept keyed rows are not even read past.
        let row = sqlx::query(concat!(
            "WITH batch AS ( \
                 SELECT id FROM saga_instances \
                 WHERE status IN ('completed', 'compensated') AND updated_at_ms < $1 AND ",
            crate::sql::unkeyed!("id::text"),
            " ORDER BY updated_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED), \
             j AS (DELETE FROM saga_journal WHERE saga_id IN (SELECT id FROM batch) RETURNING 1), \
             d AS (DELETE FROM dead_letters WHERE saga_id IN (SELECT id FROM batch) RETURNING 1), \
             s AS (DELETE FROM saga_instances WHERE id IN (SELECT id FROM batch) RETURNING 1), \
             p AS (DELETE FROM dead_letters WHERE id IN (",
            crate::sql::poison_of_no_saga!("$1", "$2"),
            " FOR UPDATE SKIP LOCKED) RETURNING 1) \
             SELECT (SELECT COUNT(*) FROM s) AS sagas, (SELECT COUNT(*) FROM j) AS journal, \
                    (SELECT COUNT(*) FROM d) + (SELECT COUNT(*) FROM p) AS dead"
        ))
        .bind(ms(before))
        .bind(limit(max))
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(PurgeReport {
            sagas: row.count("sagas")?,
            journal_entries: row.count("journal")?,
            dead_letters: row.count("dead")?,
            inbox: 0,
        })
    }

    async fn record_sweep(
        &self,
        name: &str,
        holder: &str,
        at: Timestamp,
        r: &PurgeReport,
    ) -> Result<(), StoreError> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO skald_sweeps AS w (name, holder, runs, last_run_ms, sagas_deleted, \
             journal_deleted, dead_letters_deleted, inbox_deleted) VALUES ($1, $2, 1, $3, $4, $5, $6, $7) \
             ON CONFLICT (name) DO UPDATE SET holder = $2, runs = w.runs + 1, last_run_ms = $3, \
             sagas_deleted = w.sagas_deleted + $4, journal_deleted = w.journal_deleted + $5, \
             dead_letters_deleted = w.dead_letters_deleted + $6, inbox_deleted = w.inbox_deleted + $7",
        )
        .bind(name)
        .bind(holder)
        .bind(ms(at))
        .bind(n(r.sagas))
        .bind(n(r.journal_entries))
        .bind(n(r.dead_letters))
        .bind(n(r.inbox))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        const SQL: [&str; 2] = [
            "INSERT INTO skald_secrets (name, value, created_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
            "SELECT value FROM skald_secrets WHERE name = $1",
        ];
        crate::sql::shared_secret(&self.pool, SQL, name, candidate, store_error).await
    }

    async fn record_poison(
        &self,
        record: &DeadLetterRecord,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        insert_dead_letter(&mut tx, record).await?;
        // No partition: every node may publish a poison message's announcement.
        let saga = record.saga_id.map(|s| s.to_string());
        let rows: Vec<OutboxRow<'_>> = outbox
            .iter()
            .map(|m| OutboxRow {
                saga: saga.clone(),
                partition: None,
                message: m,
            })
            .collect();
        insert_outbox_rows(&mut tx, &rows).await?;
        tx.commit().await.map_err(store_error)
    }

    async fn dead_letters(
        &self,
        open_only: bool,
        max: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id::text AS id, category, saga_id::text AS saga_id, saga_type, step, kind, \
             reason, attempts, message::text AS message, created_at_ms, resolved_at_ms \
             FROM dead_letters WHERE (NOT $1 OR resolved_at_ms IS NULL) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $2",
        )
        .bind(open_only)
        .bind(limit(max))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(decode_dead_letter).collect()
    }

    async fn journal(&self, id: SagaId) -> Result<Vec<JournalEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at_ms, schema_version, kind, body::text AS body FROM saga_journal \
             WHERE saga_id = $1::uuid ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_journal_entry).collect()
    }

    async fn list(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        max: usize,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        // Id order (the uuid column's: a bare `id` in ORDER BY would be the text alias of
        // the select list, which no index serves: a sort of the whole table per page).
        let rows = sqlx::query(
            "SELECT id::text AS id, saga_type, status, created_at_ms, updated_at_ms FROM saga_instances \
             WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid IS NULL OR id > $2::uuid) \
             ORDER BY saga_instances.id LIMIT $3",
        )
        .bind(status.map(SagaStatus::as_str))
        .bind(after.map(|a| a.to_string()))
        .bind(limit(max))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(crate::sql::decode_summary).collect()
    }
}

/// The columns of a dead letter, as `decode_dead_letter` reads them.
const DEAD_LETTER_COLUMNS: &str = "id::text AS id, category, saga_id::text AS saga_id, \
     saga_type, step, kind, reason, attempts, message::text AS message, created_at_ms, \
     resolved_at_ms";

#[async_trait]
impl SagaQueries for PostgresStore {
    async fn query(&self, q: &SagaQuery) -> Result<Vec<StoredSaga>, StoreError> {
        // One static statement per order; empty filters are NULL (or an empty array).
        const FILTER: &str = "SELECT state::text AS state, version FROM saga_instances \
             WHERE (cardinality($1::text[]) = 0 OR status = ANY($1::text[])) \
             AND ($2::text IS NULL OR saga_type = $2) \
             AND ($3::int8 IS NULL OR created_at_ms >= $3) \
             AND ($4::int8 IS NULL OR updated_at_ms < $4) \
             AND ($6::int4 IS NULL OR definition_version = $6) ";
        let sql = match q.order {
            SagaOrder::LeastRecentlyUpdated => {
                format!("{FILTER}ORDER BY updated_at_ms, id LIMIT $5")
            }
            // Newest first by creation time: ids are no time order (keyed ids are
            // version 8, hashes of their key), the id breaks ties.
            _ => format!("{FILTER}ORDER BY created_at_ms DESC, id DESC LIMIT $5"),
        };
        let statuses: Vec<&str> = q.statuses.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(statuses)
            .bind(q.saga_type.as_ref().map(|t| t.as_str()))
            .bind(q.created_after.map(ms))
            .bind(q.updated_before.map(ms))
            .bind(limit(q.limit.min(MAX_QUERY_ROWS)))
            .bind(q.definition_version.and_then(|v| i32::try_from(v).ok()))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(decode_state).collect()
    }

    async fn stats(&self, since: Timestamp) -> Result<StoreStats, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(store_error)?;
        let counts = sqlx::query(
            "SELECT saga_type, definition_version::int8 AS definition_version, status, COUNT(*) AS n \
             FROM saga_instances GROUP BY saga_type, definition_version, status \
             ORDER BY saga_type, definition_version, status",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(store_error)?;
        let activity = sqlx::query(
            "SELECT \
               (SELECT COUNT(*) FROM saga_instances WHERE created_at_ms >= $1) AS started, \
               (SELECT COUNT(*) FROM saga_instances WHERE status IN ('completed', 'compensated') \
                  AND updated_at_ms >= $1) AS finished, \
               (SELECT COUNT(*) FROM outbox) AS outbox_n, \
               (SELECT MIN(created_at_ms) FROM outbox) AS outbox_oldest, \
               (SELECT COUNT(*) FROM dead_letters WHERE resolved_at_ms IS NULL) AS open_dl",
        )
        .bind(ms(since))
        .fetch_one(&mut *conn)
        .await
        .map_err(store_error)?;
        let oldest = sqlx::query(
            "SELECT id::text AS id, saga_type, created_at_ms FROM saga_instances \
             WHERE status IN ('running', 'compensating') \
             ORDER BY created_at_ms, saga_instances.id LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(store_error)?;
        let sweeps = sqlx::query(crate::sql::SWEEPS)
            .fetch_all(&mut *conn)
            .await
            .map_err(store_error)?;
        crate::sql::store_stats(
            counts
                .iter()
                .map(crate::sql::decode_status_count)
                .collect::<Result<_, _>>()?,
            &activity,
            oldest.as_ref(),
            sweeps
                .iter()
                .map(crate::sql::decode_sweep)
                .collect::<Result<_, _>>()?,
        )
    }

    async fn find_dead_letters(
        &self,
        q: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters \
             WHERE (NOT $1 OR resolved_at_ms IS NULL) AND ($2::text IS NULL OR saga_type = $2) \
             AND ($3::text IS NULL OR category = $3) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(q.open_only)
            .bind(q.saga_type.as_deref())
            .bind(q.category.map(DeadLetterCategory::as_str))
            .bind(limit(q.limit.min(MAX_QUERY_ROWS)))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(decode_dead_letter).collect()
    }

    async fn dead_letters_of(&self, id: Uuid) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = $1::uuid OR saga_id = $1::uuid \
             ORDER BY created_at_ms DESC, id DESC LIMIT {MAX_QUERY_ROWS}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter().map(decode_dead_letter).collect()
    }
}

/// Integer columns are read at their declared width (int2, int4 or int8) and widened.
impl QueryRow for PgRow {
    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.try_get(column).map_err(store_error)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.try_get(column).map_err(store_error)
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        match int_width(self, column)? {
            2 => self.try_get::<i16, _>(column).map(i64::from),
            4 => self.try_get::<i32, _>(column).map(i64::from),
            _ => self.try_get::<i64, _>(column),
        }
        .map_err(store_error)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        match int_width(self, column)? {
            2 => self
                .try_get::<Option<i16>, _>(column)
                .map(|v| v.map(i64::from)),
            4 => self
                .try_get::<Option<i32>, _>(column)
                .map(|v| v.map(i64::from)),
            _ => self.try_get::<Option<i64>, _>(column),
        }
        .map_err(store_error)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>, StoreError> {
        self.try_get(column).map_err(store_error)
    }
}

/// The declared width of an integer column, in bytes: 8 for int8 and for any other type
/// (whose read as an int8 then fails as a type mismatch).
fn int_width(row: &PgRow, column: &str) -> Result<u8, StoreError> {
    let column = row.try_column(column).map_err(store_error)?;
    Ok(match column.type_info().name() {
        "INT2" => 2,
        "INT4" => 4,
        _ => 8,
    })
}
