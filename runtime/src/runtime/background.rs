//! What runs beside the intake for as long as the runtime does: the actor system's
//! thread (the registry and the [`WakeupSweeper`]), and the loops on the I/O runtime
//! ([`spawn`]): the outbox relay, the retention sweeper and the metrics sampler.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::outbox::relay;
use crate::actors::{Registry, Shared, WakeupSweeper};
use crate::error::report_fatal;
use crate::machine::Timestamp;

/// The actor system's thread: one arbiter per `arbiters` for the instance actors, the
/// registry, and the sweeper of due wake-ups. Sends the registry's address and the
/// system once they are up, then runs until the system is stopped.
pub(super) fn run_actor_system(
    shared: Arc<Shared>,
    ready: oneshot::Sender<(Addr<Registry>, Addr<WakeupSweeper>, actix::System)>,
) {
    let system = actix::System::new();
    let arbiters: Vec<Arbiter> = (0..shared.options.arbiters.max(1))
        .map(|_| Arbiter::new())
        .collect();
    let handles = arbiters.iter().map(Arbiter::handle).collect();
    system.block_on(async {
        let registry = Registry::new(Arc::clone(&shared), handles).start();
        let sweeper = WakeupSweeper::new(Arc::clone(&shared), registry.clone()).start();
        let _ = ready.send((registry, sweeper, actix::System::current()));
    });
    if let Err(e) = system.run() {
        error!(error = %e, "actor system stopped with an error");
    }
    for a in arbiters {
        a.stop();
        let _ = a.join();
    }
}

/// Starts the background loops on the current (I/O) runtime: the outbox relay (what a
/// crashed process left unpublished is published once its lease ends), the retention
/// sweeper and the metrics sampler. Each runs until its task is aborted.
pub(super) fn spawn(shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let relay = tokio::spawn(relay(Arc::clone(shared)));
    let sweeper = tokio::spawn(sweeper(Arc::clone(shared), shared.node.clone()));
    let sampler = tokio::spawn(crate::metrics::sampler(Arc::clone(shared)));
    let outcomes = tokio::spawn(outcome_poller(Arc::clone(shared)));
    vec![sampler, relay, sweeper, outcomes]
}

/// Sagas asked about in one store query by the outcome poller.
const OUTCOME_POLL_BATCH: usize = 1_000;

/// The outcome poller: every `outcome_poll_interval`, asks the store which of the sagas
/// that handles wait for have settled, and wakes those handles. This process's own
/// settles wake them at once; the poller is for the sagas another process (sharing the
/// store) settles. One query per batch of waited-for sagas, however many handles wait,
/// and none while no handle waits.
async fn outcome_poller(shared: Arc<Shared>) {
    let interval = shared
        .options
        .outcome_poll_interval
        .max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(interval).await;
        let watched = shared.outcomes.watched();
        for ids in watched.chunks(OUTCOME_POLL_BATCH) {
            match shared.store.settled_among(ids).await {
                Ok(settled) => {
                    for id in &settled {
                        shared.outcomes.wake(id, None);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "asking the store which awaited sagas settled failed; will retry");
                    break;
                }
            }
        }
    }
}

/// The retention sweeper: every `sweep_interval`, the process holding the `retention`
/// lease deletes the finished sagas older than `retention` (in batches) and the inbox
/// ids past `inbox_retention`, and records what it did for `skald stats`. The lease
/// outlives two intervals, so a dead holder is replaced within that time.
async fn sweeper(shared: Arc<Shared>, holder: String) {
    const BATCH: usize = 1_000;
    const LEASE: &str = "retention";
    let interval = shared.options.sweep_interval.max(Duration::from_millis(10));
    let lease = interval * 2 + Duration::from_secs(5);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    loop {
        let now = shared.clock.now();
        match shared.store.acquire_lease(LEASE, &holder, now, lease).await {
            Ok(true) => {
                let mut report = crate::ports::PurgeReport::default();
                let mut failed = None;
                if let Some(retention) = shared.options.retention {
                    let before = Timestamp(now.as_millis().saturating_sub(ms(retention)));
                    loop {
                        match shared.store.purge_finished(before, BATCH).await {
                            Ok(r) => {
                                report.add(&r);
                                // Poison records of no saga are purged in the same
                                // batches: go on while either filled one.
                                if r.sagas < BATCH as u64 && r.dead_letters < BATCH as u64 {
                                    break;
                                }
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                }
                let before = Timestamp(
                    now.as_millis()
                        .saturating_sub(ms(shared.options.inbox_retention)),
                );
                match shared.store.prune_inbox(before).await {
                    Ok(n) => report.inbox = n,
                    Err(e) => failed = failed.or(Some(e)),
                }
                if let Err(e) = shared
                    .store
                    .record_sweep(LEASE, &holder, now, &report)
                    .await
                {
                    failed = failed.or(Some(e));
                }
                match failed {
                    Some(e) => warn!(error = %e, "retention sweep incomplete; will retry"),
                    None if report.sagas > 0 || report.inbox > 0 => info!(
                        sagas = report.sagas,
                        journal_entries = report.journal_entries,
                        dead_letters = report.dead_letters,
                        inbox = report.inbox,
                        "retention sweep"
                    ),
                    None => {}
                }
            }
            Ok(false) => debug!("retention sweep: another process holds the lease"),
            Err(e) => {
                report_fatal(&shared.fatal, &e);
                warn!(error = %e, "retention sweep: taking the lease failed; will retry");
            }
        }
        tokio::time::sleep(interval).await;
    }
}
