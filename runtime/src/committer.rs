//! Group commit: many saga instances' writes committed in one store transaction.
//!
//! Instance actors hand their [`SagaWrite`] to the [`Committer`] and await the outcome.
//! A single task drains whatever has queued while the previous transaction was running
//! (up to `max_batch`) and commits it with one [`SagaStore::commit`] call. There is no
//! artificial delay: under light load a write commits alone (lowest latency); under
//! heavy load batches grow by themselves (highest throughput). Optimistic concurrency
//! stays per write: a conflicting write is skipped and reported, the others commit.
//!
//! Outbox rows published since the last transaction are deleted by the next one (or,
//! when no write comes, by a transaction of their own after a short pause): marking a
//! row published costs no transaction of its own under load. A row whose deletion is
//! lost in a crash is published again by the relay; the broker and the participants
//! drop the repeat by its message id and idempotency key.
//!
//! A schema error (tables missing or of another shape) is fatal: the loop reports it
//! (`error::report_fatal`, as every other store caller does), which stops the process with
//! that error.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::error::report_fatal;
use crate::ports::{SagaStore, SagaWrite, StoreError, WriteOutcome};

/// How long published-row deletions wait for a transaction to ride on.
const PUBLISHED_FLUSH_DELAY: Duration = Duration::from_millis(50);

crate::counters! {
    /// Counters of the commit loop.
    CommitStats => /// The commit loop's counters at one moment
    /// ([`Runtime::commit_stats`](crate::runtime::Runtime::commit_stats)).
    CommitSnapshot {
        /// Transactions committed.
        batches,
        /// Writes committed or refused for a conflict.
        writes,
        /// Writes refused for a version conflict.
        conflicts,
        /// Writes refused as already applied (their inbox id was recorded).
        duplicates,
        /// Outbox rows deleted after being published.
        published,
        /// Transactions that failed.
        failures,
        /// Total time spent in `commit`, microseconds.
        busy_micros,
    }
}

struct Request {
    write: SagaWrite,
    reply: oneshot::Sender<Result<(WriteOutcome, SagaWrite), StoreError>>,
}

/// The handle instance actors commit through. Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
    published: mpsc::UnboundedSender<Vec<Uuid>>,
    stats: Arc<CommitStats>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    /// Spawns the commit loop on the current tokio runtime (the I/O runtime: never
    /// inside an actix arbiter, whose runtime may stop before the store's connections).
    /// A schema error is sent on `fatal`.
    pub fn spawn(
        store: Arc<dyn SagaStore>,
        max_batch: usize,
        fatal: watch::Sender<Option<StoreError>>,
    ) -> (Committer, tokio::task::JoinHandle<()>) {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let (published, published_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(CommitStats::default());
        let task = tokio::spawn(run(
            store,
            rx,
            published_rx,
            max_batch,
            Arc::clone(&stats),
            fatal,
        ));
        (
            Committer {
                tx,
                published,
                stats,
            },
            task,
        )
    }

    /// Reports outbox rows published: the next transaction deletes them.
    pub fn published(&self, ids: Vec<Uuid>) {
        if !ids.is_empty() {
            // The loop is gone only at shutdown: the rows are then published again by the
            // next start's relay, and dropped as repeats.
            let _ = self.published.send(ids);
        }
    }

    /// Commits one write (possibly together with others) and returns its outcome, with
    /// the write handed back (so the caller keeps its state without a copy).
    pub async fn commit(&self, write: SagaWrite) -> Result<(WriteOutcome, SagaWrite), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { write, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the commit loop has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the commit loop dropped the request".into()))?
    }

    /// The loop's counters.
    pub fn stats(&self) -> &Arc<CommitStats> {
        &self.stats
    }
}

async fn run(
    store: Arc<dyn SagaStore>,
    mut rx: mpsc::Receiver<Request>,
    mut published_rx: mpsc::UnboundedReceiver<Vec<Uuid>>,
    max_batch: usize,
    stats: Arc<CommitStats>,
    fatal: watch::Sender<Option<StoreError>>,
) {
    let mut batch: Vec<Request> = Vec::with_capacity(max_batch);
    let mut writes: Vec<SagaWrite> = Vec::with_capacity(max_batch);
    let mut published: Vec<Uuid> = Vec::new();
    let mut published_open = true;
    // Consecutive failed transactions: a flush of published rows alone backs off.
    let mut failing: u32 = 0;
    // Every committer handle is gone (shutdown): flush what was published once, then end.
    let mut closing = false;
    let commit_duration = ::metrics::histogram!(crate::metrics::COMMIT_DURATION);
    let commit_batch = ::metrics::histogram!(crate::metrics::COMMIT_BATCH_SIZE);
    loop {
        // Wait for a write; published rows alone are flushed after a short pause.
        let first = if closing {
            None
        } else if published.is_empty() {
            tokio::select! {
                r = rx.recv() => r,
                ids = published_rx.recv(), if published_open => {
                    match ids {
                        Some(ids) => published.extend(ids),
                        None => published_open = false,
                    }
                    continue;
                }
            }
        } else {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => Some(r),
                    None => {
                        closing = true;
                        None
                    }
                },
                () = tokio::time::sleep(PUBLISHED_FLUSH_DELAY * (1 << failing.min(6))) => None,
            }
        };
        if first.is_none() && published.is_empty() {
            break;
        }
        if let Some(first) = first {
            batch.push(first);
        }
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        while let Ok(ids) = published_rx.try_recv() {
            published.extend(ids);
        }
        if closing && batch.is_empty() && failing > 0 {
            // Shutting down and the store refuses: leave the rows to the next relay.
            break;
        }
        let replies: Vec<_> = batch
            .drain(..)
            .map(|r| {
                writes.push(r.write);
                r.reply
            })
            .collect();
        let started = Instant::now();
        let result = store.commit(&writes, &published).await;
        let elapsed = started.elapsed();
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        stats.busy_micros.fetch_add(micros, Ordering::Relaxed);
        commit_duration.record(elapsed.as_secs_f64());
        if !writes.is_empty() {
            // Transactions that only delete published outbox rows carry no write.
            commit_batch.record(writes.len() as f64);
        }
        debug!(
            writes = writes.len(),
            published = published.len(),
            micros,
            "group commit"
        );
        match result {
            Ok(outcomes) if outcomes.len() == replies.len() => {
                failing = 0;
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .writes
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                stats
                    .published
                    .fetch_add(published.len() as u64, Ordering::Relaxed);
                published.clear();
                for ((reply, outcome), write) in
                    replies.into_iter().zip(outcomes).zip(writes.drain(..))
                {
                    match outcome {
                        WriteOutcome::Conflict => {
                            stats.conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                        WriteOutcome::Duplicate => {
                            stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        WriteOutcome::Committed { .. } => {}
                    }
                    // The requester may have gone away (its actor died): nothing to do.
                    let _ = reply.send(Ok((outcome, write)));
                }
            }
            Ok(outcomes) => {
                writes.clear();
                stats.failures.fetch_add(1, Ordering::Relaxed);
                let err = StoreError::Other(format!(
                    "store returned {} outcomes for {} writes",
                    outcomes.len(),
                    replies.len()
                ));
                warn!(error = %err, "group commit");
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
            Err(err) => {
                failing = failing.saturating_add(1);
                stats.failures.fetch_add(1, Ordering::Relaxed);
                let had_writes = !replies.is_empty();
                if !report_fatal(&fatal, &err) {
                    warn!(error = %err, writes = replies.len(), "group commit failed");
                }
                if !err.is_retryable() && !matches!(err, StoreError::Schema(_)) && writes.len() > 1
                {
                    // Not an outage: one write the store refuses (say, text it cannot
                    // hold) must not fail the others. Commit them one at a time.
                    for (write, reply) in writes.drain(..).zip(replies) {
                        let result = store
                            .commit(std::slice::from_ref(&write), &[])
                            .await
                            .and_then(|outcomes| match outcomes.as_slice() {
                                [outcome] => Ok((*outcome, write)),
                                _ => Err(StoreError::Other(format!(
                                    "store returned {} outcomes for 1 write",
                                    outcomes.len()
                                ))),
                            });
                        let _ = reply.send(result);
                    }
                    continue;
                }
                writes.clear();
                // Keep the published ids: the next transaction deletes them.
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
                if !err.is_retryable() && !had_writes {
                    // Not a passing outage: do not spin on the published rows alone (the
                    // relay publishes them again; the broker drops the repeats).
                    published.clear();
                }
            }
        }
    }
}
