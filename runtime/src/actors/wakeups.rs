//! `WakeupSweeper`: makes sure every persisted wake-up (a retry's due time, a reply
//! deadline) fires, even for sagas that are not in memory.
//!
//! A live instance arms its own timer for its next wake-up (a retry's due time or a
//! reply deadline), which is also persisted with its state. A saga that was passivated,
//! or whose actor crashed, or whose process restarted, has no timer: this actor sweeps
//! the store for due wake-ups every `wakeup_poll_interval` and sends each such saga a
//! [`Wake`]. Due wake-ups are *claimed* in the store for a lease, so that several
//! processes sharing one store never fire the same one. A wake-up that fires twice
//! anyway (an instance's own timer and a sweep) is harmless: the instance derives the
//! input from its current state, and a transition commits only on the version it read,
//! so a second `Wake` finds nothing due.

use std::sync::Arc;

use actix::prelude::*;
use tracing::warn;

use super::Shared;
use super::instance::Wake;
use super::registry::{Lookup, Registry};
use crate::error::RuntimeError;

/// How many due sagas one sweep handles (the next sweep takes the rest).
const SWEEP_BATCH: usize = 2_000;

/// How many due wake-ups are claimed at a time: the next claim waits until these have
/// been applied, so the sweep never holds claims (leases) on more sagas than it is
/// activating, and a process that cannot keep up leaves the rest to the others.
const CLAIM_BATCH: usize = 256;

/// Wake-ups applied at once by one sweep (activations from the store in flight).
const WAKE_CONCURRENCY: usize = 64;

/// Sweeps the store for due wake-ups and sends each such saga a [`Wake`]. (Crash
/// restarts are not its job: each instance runs under an actix `Supervisor`.)
pub struct WakeupSweeper {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    sweeping: bool,
    /// Held for the whole of a sweep: a sweep asked for ([`SweepNow`]) waits for the
    /// one in flight, whose claimed wake-ups it could not claim, to be applied first.
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for WakeupSweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeupSweeper")
            .field("sweeping", &self.sweeping)
            .finish_non_exhaustive()
    }
}

impl WakeupSweeper {
    pub(crate) fn new(shared: Arc<Shared>, registry: Addr<Registry>) -> Self {
        WakeupSweeper {
            shared,
            registry,
            sweeping: false,
            one_at_a_time: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        // A failed claim is logged; the next interval tries again.
        let fut = self.sweep_once(SWEEP_BATCH);
        ctx.spawn(fut.into_actor(self).map(|_, act, _| act.sweeping = false));
    }

    /// One sweep of at most `most` sagas: claims the due wake-ups (by the runtime's
    /// clock) and applies them. Fails when a claim failed.
    fn sweep_once(
        &self,
        most: usize,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + 'static {
        let shared = Arc::clone(&self.shared);
        let registry = self.registry.clone();
        let one_at_a_time = Arc::clone(&self.one_at_a_time);
        async move {
            use futures_util::StreamExt;
            let _sweeping = one_at_a_time.lock().await;
            let mut left = most;
            while left > 0 {
                let store = Arc::clone(&shared.store);
                let now = shared.clock.now();
                let types = shared.definitions.pairs();
                let lease = shared.options.claim_lease;
                let batch = left.min(CLAIM_BATCH);
                // Only the partitions held (a node leasing them).
                let partitions = shared.ownership.claim_filter();
                let due = shared
                    .on_io(async move {
                        store
                            .claim_wakeups(now, &types, partitions.as_deref(), batch, lease)
                            .await
                            .map_err(RuntimeError::from)
                    })
                    .await;
                let ids = match due {
                    Ok(ids) => ids,
                    Err(e) => {
                        warn!(error = %e, "sweeping due wake-ups failed; will retry");
                        return Err(e);
                    }
                };
                let claimed = ids.len();
                left = left.saturating_sub(claimed);
                futures_util::stream::iter(ids)
                    .for_each_concurrent(WAKE_CONCURRENCY, |id| {
                        let (shared, registry) = (&shared, &registry);
                        async move {
                            super::RuntimeStats::incr(&shared.stats.wakeups_claimed);
                            match registry.send(Lookup { id, initial: None }).await {
                                // Applied before the next claim; an actor that cannot
                                // take it (stopping) leaves it to the next sweep.
                                // A hung instance holds the sweep for one lease at most.
                                Ok(addr) => {
                                    let wake = addr.send(Wake);
                                    let lease = shared.options.claim_lease;
                                    if tokio::time::timeout(lease, wake).await.is_err() {
                                        warn!(saga.id = %id, "a wake-up took longer than the claim lease");
                                    }
                                }
                                Err(e) => warn!(error = %e, "registry unavailable"),
                            }
                        }
                    })
                    .await;
                if claimed < batch {
                    break;
                }
            }
            Ok(())
        }
    }
}

/// Sweeps at once, outside the interval (after the sweep in flight, if any), with no
/// cap on how many sagas, and answers when the sweep is done: every wake-up due by the
/// runtime's clock then has been applied (a test's manual clock moved forward fires its
/// timeouts and retries without waiting for a poll).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), RuntimeError>")]
pub(crate) struct SweepNow;

impl Handler<SweepNow> for WakeupSweeper {
    type Result = ResponseFuture<Result<(), RuntimeError>>;

    fn handle(&mut self, _: SweepNow, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.sweep_once(usize::MAX))
    }
}

impl Actor for WakeupSweeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.sweep(ctx);
        let every = self.shared.options.wakeup_poll_interval;
        ctx.run_interval(every, |act, ctx| act.sweep(ctx));
    }
}
