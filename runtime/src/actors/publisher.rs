//! The publisher: one task that publishes every committed transition's messages, in
//! commit order, right after the commit, and reports the stored ones published so the
//! next commit deletes them from the outbox. What it cannot publish stays in the outbox
//! for the relay (`runtime/outbox.rs`).

use std::sync::Arc;

use tracing::debug;

use super::{RuntimeStats, Shared};
use crate::ports::OutboxMessage;
use crate::wire;

/// Messages to publish, in order.
#[derive(Debug)]
pub(crate) struct PublishJob {
    pub(crate) rows: Vec<OutboxMessage>,
    /// Whether the rows are stored in the outbox (then reported once published).
    pub(crate) stored: bool,
}

/// The publisher: one task publishing every transition's messages in commit order,
/// batching whatever queued while the previous batch was in flight (one round trip
/// of broker acks per batch).
pub(crate) async fn publisher(
    shared: Arc<Shared>,
    mut jobs: tokio::sync::mpsc::Receiver<PublishJob>,
) {
    const MAX_BATCH: usize = 1_024;
    while let Some(first) = jobs.recv().await {
        let mut stored = Vec::new();
        let mut direct = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            if job.stored {
                stored.extend(job.rows);
            } else {
                direct.extend(job.rows);
            }
            if stored.len() + direct.len() < MAX_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        if !direct.is_empty() {
            publish_rows(&shared, direct, false).await;
        }
        if !stored.is_empty() {
            publish_rows(&shared, stored, true).await;
        }
    }
}

/// Publishes outbox rows in order and reports the published ones to the committer.
pub(crate) async fn publish_outbox(shared: &Shared, rows: Vec<OutboxMessage>) -> usize {
    publish_rows(shared, rows, true).await
}

/// Publishes rows in order; reports the published ones to the committer if `stored`.
async fn publish_rows(shared: &Shared, mut rows: Vec<OutboxMessage>, stored: bool) -> usize {
    if stored {
        // A row whose lease has ended belongs to the relay now (the broker was slow for
        // longer than the lease): publishing it here too would send it twice.
        let now = shared.clock.now();
        rows.retain(|r| r.available_at > now);
    }
    let (ids, messages): (Vec<_>, Vec<_>) = rows.into_iter().map(|r| (r.id, r.message)).unzip();
    let commands: Vec<bool> = messages
        .iter()
        .map(|m| m.subject.starts_with(wire::COMMAND_PREFIX))
        .collect();
    let results = shared.bus.publish_batch(messages).await;
    let mut done = Vec::with_capacity(ids.len());
    for ((id, result), command) in ids.into_iter().zip(results).zip(commands) {
        match result {
            Ok(()) => {
                if command {
                    RuntimeStats::incr(&shared.stats.commands_sent);
                }
                done.push(id);
            }
            Err(e) => {
                RuntimeStats::incr(&shared.stats.publish_failures);
                debug!(error = %e, "publish failed; left in the outbox for the relay");
            }
        }
    }
    let n = done.len();
    if stored {
        shared.committer.published(done);
    }
    n
}
