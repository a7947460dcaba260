//! `RetrySupervisor`: makes sure every persisted wake-up fires, even for sagas that are
//! not in memory.
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

/// Sweeps the store for due wake-ups.
pub struct RetrySupervisor {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    sweeping: bool,
}

impl std::fmt::Debug for RetrySupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetrySupervisor")
            .field("sweeping", &self.sweeping)
            .finish_non_exhaustive()
    }
}

impl RetrySupervisor {
    pub(crate) fn new(shared: Arc<Shared>, registry: Addr<Registry>) -> Self {
        RetrySupervisor {
            shared,
            registry,
            sweeping: false,
        }
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let shared = Arc::clone(&self.shared);
        let registry = self.registry.clone();
        let fut = async move {
            let store = Arc::clone(&shared.store);
            let now = shared.clock.now();
            let types = shared.definitions.pairs();
            let lease = shared.options.claim_lease;
            let due = shared
                .on_io(async move {
                    store
                        .claim_wakeups(now, &types, SWEEP_BATCH, lease)
                        .await
                        .map_err(RuntimeError::from)
                })
                .await;
            match due {
                Ok(ids) => {
                    for id in ids {
                        super::RuntimeStats::incr(&shared.stats.wakeups_claimed);
                        match registry.send(Lookup { id, initial: None }).await {
                            // A full mailbox means the saga is busy: the next sweep retries.
                            Ok(addr) => {
                                let _ = addr.try_send(Wake);
                            }
                            Err(e) => warn!(error = %e, "registry unavailable"),
                        }
                    }
                }
                Err(e) => warn!(error = %e, "sweeping due wake-ups failed; will retry"),
            }
        };
        ctx.spawn(fut.into_actor(self).map(|(), act, _| act.sweeping = false));
    }
}

impl Actor for RetrySupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.sweep(ctx);
        let every = self.shared.options.wakeup_poll_interval;
        ctx.run_interval(every, |act, ctx| act.sweep(ctx));
    }
}
