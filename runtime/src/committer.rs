//! Group commit: many saga instances' writes committed in one store transaction.
//!
//! Instance actors hand their [`SagaWrite`] to the [`Committer`] and await the outcome.
//! A single task drains whatever has queued while the previous transaction was running
//! (up to `max_batch`) and commits it with one [`SagaStore::commit`] call. There is no
//! artificial delay: under light load a write commits alone (lowest latency); under
//! heavy load batches grow by themselves (highest throughput). Optimistic concurrency
//! stays per write: a conflicting write is skipped and reported, the others commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::ports::{SagaStore, SagaWrite, StoreError, WriteOutcome};

/// Counters of the commit loop.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Writes committed or refused for a conflict.
    pub writes: AtomicU64,
    /// Writes refused for a version conflict.
    pub conflicts: AtomicU64,
    /// Transactions that failed.
    pub failures: AtomicU64,
    /// Total time spent in `commit`, microseconds.
    pub busy_micros: AtomicU64,
}

struct Request {
    write: SagaWrite,
    reply: oneshot::Sender<Result<(WriteOutcome, SagaWrite), StoreError>>,
}

/// The handle instance actors commit through. Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
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
    pub fn spawn(
        store: Arc<dyn SagaStore>,
        max_batch: usize,
    ) -> (Committer, tokio::task::JoinHandle<()>) {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let stats = Arc::new(CommitStats::default());
        let task = tokio::spawn(run(store, rx, max_batch, Arc::clone(&stats)));
        (Committer { tx, stats }, task)
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
    max_batch: usize,
    stats: Arc<CommitStats>,
) {
    let mut batch: Vec<Request> = Vec::with_capacity(max_batch);
    let mut writes: Vec<SagaWrite> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let replies: Vec<_> = batch
            .drain(..)
            .map(|r| {
                writes.push(r.write);
                r.reply
            })
            .collect();
        let started = Instant::now();
        let result = store.commit(&writes).await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.busy_micros.fetch_add(micros, Ordering::Relaxed);
        debug!(writes = writes.len(), micros, "group commit");
        match result {
            Ok(outcomes) if outcomes.len() == replies.len() => {
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .writes
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                for ((reply, outcome), write) in
                    replies.into_iter().zip(outcomes).zip(writes.drain(..))
                {
                    if outcome == WriteOutcome::Conflict {
                        stats.conflicts.fetch_add(1, Ordering::Relaxed);
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
                writes.clear();
                stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %err, writes = replies.len(), "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}
