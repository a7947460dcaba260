//! Partition leases: how a node comes by its share of the partitions
//! ([`crate::partitions`]), keeps it, and hands it over.
//!
//! Every node holds a lease on its membership (`node/<group>/<node>`) and one per
//! partition it runs (`partition/<group>/<p>`), in the store, for
//! `RuntimeOptions::partition_lease`, renewed every fifth of it in one statement. The
//! group ([`crate::partitions::lease_group`]) is the nodes that can run the same sagas;
//! they share the partitions. At every renewal a node reads its group's leases and:
//!
//! - gives up a partition whose lease someone else took (its own had ended), and every
//!   partition when it could not renew in time (a store outage: the others may take
//!   them once its leases end, so it stops first);
//! - hands over what is past its fair share: at most `ceil(partitions / live nodes)`,
//!   and one fewer when a live node holds less than `floor(..)` and no partition is
//!   free for it;
//! - takes free partitions (never leased, released, or whose holder died and let its
//!   lease end) up to its fair share.
//!
//! A handover is clean: the old holder stops reading the partition's replies, stops
//! claiming its wake-ups and outbox rows, lets the replies being applied finish (what it
//! had received and not yet begun is sent back to the broker, unacknowledged), lets the
//! partition's actors go, and only then releases the lease; the new holder starts once
//! the lease is free. A reply in flight is applied once: by the old holder before the
//! release, or redelivered to the new one (and the inbox refuses it a second time).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::intake::Inbound;
use crate::actors::{Registry, ReleasePartition, Shared};
use crate::ids::SagaType;
use crate::partitions::{lease_group, lease_node, lease_partition, node_lease, partition_lease};
use crate::ports::Delivery;
use crate::wire;

/// The longest a handover waits for the replies being applied in the partition.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// The durable consumer the replies of saga type `ty` in partition `p` are read with.
/// Partition 0's is the one every type's replies were read with before partitions (its
/// filter narrowed to partition 0), so an upgrade re-reads nothing.
pub(crate) fn partition_consumer(group: &str, ty: &SagaType, p: u32) -> String {
    match p {
        0 => super::reply_consumer(group, ty),
        p => format!("{group}-{ty}-p{p}"),
    }
}

/// A node's partition leases.
pub(super) struct Leases {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    /// Where the partitions' consumers hand their replies to the intake.
    inbound: mpsc::Sender<(Inbound, Delivery)>,
    types: Vec<SagaType>,
    /// Unacknowledged replies one partition's consumer of one type may hold.
    per_consumer: usize,
    /// The consumers of each held partition (one forwarding task per saga type).
    consumers: HashMap<u32, Vec<tokio::task::JoinHandle<()>>>,
    /// When the last renewal that succeeded was sent.
    renewed_at: Option<Instant>,
    /// The group whose partitions this node shares ([`lease_group`]).
    group: String,
}

impl Leases {
    pub(super) fn new(
        shared: Arc<Shared>,
        registry: Addr<Registry>,
        inbound: mpsc::Sender<(Inbound, Delivery)>,
    ) -> Self {
        let types: Vec<SagaType> = shared.definitions.types().cloned().collect();
        let consumers = types.len().max(1) * shared.ownership.count() as usize;
        let per_consumer = (shared.options.max_in_flight_replies / consumers).max(64);
        Leases {
            registry,
            inbound,
            types,
            per_consumer,
            consumers: HashMap::new(),
            renewed_at: None,
            group: lease_group(&shared.options.reply_group, &shared.definitions.pairs()),
            shared,
        }
    }

    fn every(&self) -> Duration {
        self.shared.options.partition_lease / 5
    }

    /// Renews, balances and hands over until `stop` says so, then leaves: hands every
    /// partition over and ends its membership.
    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every()) => {}
                _ = stop.changed() => break,
            }
            self.tick().await;
        }
        self.leave().await;
    }

    /// One renewal: renew, give up what was lost, hand over the excess, take free
    /// partitions up to the fair share, and read the partitions' replies.
    pub(super) async fn tick(&mut self) {
        let shared = Arc::clone(&self.shared);
        let (store, node, ownership) = (&shared.store, &shared.node, &shared.ownership);
        let lease = shared.options.partition_lease;
        let group = self.group.clone();
        let held: Vec<u32> = ownership.held().to_vec();
        let mut names = vec![node_lease(&group, node)];
        names.extend(held.iter().map(|p| partition_lease(&group, *p)));
        let sent = Instant::now();
        // A store that does not answer is one that failed: the leases are running out.
        let patience = 2 * self.every();
        let renewal = store.acquire_leases(&names, node, shared.clock.now(), lease);
        let renewed = match tokio::time::timeout(patience, renewal).await {
            Ok(Ok(renewed)) => renewed,
            failed => {
                let e = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {patience:?}"),
                };
                // The others may take these partitions once the leases end: stop before,
                // with two renewals' margin.
                let late = self
                    .renewed_at
                    .is_none_or(|t| t.elapsed() + 2 * self.every() >= lease);
                warn!(error = %e, held = held.len(), giving_up = late && !held.is_empty(), "renewing the partition leases failed");
                if late && !held.is_empty() {
                    self.hand_over(&held, false).await;
                }
                return;
            }
        };
        self.renewed_at = Some(sent);
        let renewed: HashSet<String> = renewed.into_iter().collect();
        let lost: Vec<u32> = held
            .iter()
            .copied()
            .filter(|p| !renewed.contains(&partition_lease(&group, *p)))
            .collect();
        if !lost.is_empty() {
            warn!(partitions = ?lost, "partition leases taken by another node (ours had ended): giving them up");
            self.hand_over(&lost, false).await;
        }

        let view = match tokio::time::timeout(patience, store.leases("", shared.clock.now())).await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                warn!(error = %e, "reading the partition leases failed");
                return;
            }
            Err(_) => {
                warn!("reading the partition leases: no answer within {patience:?}");
                return;
            }
        };
        let mut nodes: HashMap<&str, usize> = view
            .iter()
            .filter_map(|l| lease_node(&group, &l.name))
            .map(|n| (n, 0))
            .collect();
        nodes.entry(node.as_str()).or_insert(0);
        let mut taken: HashSet<u32> = HashSet::new();
        for l in &view {
            if let Some(p) = lease_partition(&group, &l.name) {
                taken.insert(p);
                if let Some(n) = nodes.get_mut(l.holder.as_str()) {
                    *n += 1;
                }
            }
        }
        let count = ownership.count() as usize;
        let live = nodes.len();
        let (most, least) = (count.div_ceil(live), count / live);
        let held: Vec<u32> = ownership.held().to_vec();
        let free: Vec<u32> = (0..ownership.count())
            .filter(|p| !taken.contains(p))
            .collect();
        // Past the fair share: hand the excess over. At the share's top while another
        // node is below its bottom and nothing is free for it: one over.
        let mut excess = held.len().saturating_sub(most);
        if excess == 0
            && held.len() == most
            && most > least
            && free.is_empty()
            && nodes.values().any(|n| *n < least)
        {
            excess = 1;
        }
        if excess > 0 {
            let out: Vec<u32> = held.iter().rev().take(excess).copied().collect();
            info!(partitions = ?out, live, share = most, "handing partitions over");
            self.hand_over(&out, true).await;
        } else if held.len() < most && !free.is_empty() {
            // Free partitions, from a place of this node's own so that nodes taking at
            // once mostly ask for different ones.
            let start = fnv(node.as_bytes()) as usize % free.len();
            let want: Vec<String> = free
                .iter()
                .cycle()
                .skip(start)
                .take(free.len().min(most - held.len()))
                .map(|p| partition_lease(&group, *p))
                .collect();
            match store
                .acquire_leases(&want, node, shared.clock.now(), lease)
                .await
            {
                Ok(got) => {
                    let got: Vec<u32> = got
                        .iter()
                        .filter_map(|n| lease_partition(&group, n))
                        .collect();
                    if !got.is_empty() {
                        info!(partitions = ?got, live, share = most, "taking partitions");
                        for p in &got {
                            if ownership.set(*p, true) {
                                shared.metrics.partition_handover("taken");
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "taking free partitions failed"),
            }
        }
        self.read_partitions().await;
        shared
            .metrics
            .partitions_held
            .set(ownership.held().len() as f64);
    }

    /// Starts the consumers of every held partition that has none (taken just now, or
    /// whose subscription failed before).
    async fn read_partitions(&mut self) {
        let held = self.shared.ownership.held();
        let missing: Vec<u32> = held
            .iter()
            .copied()
            .filter(|p| !self.consumers.contains_key(p))
            .collect();
        let subscribed =
            futures_util::future::join_all(missing.iter().map(|p| self.subscribe(*p))).await;
        for (p, tasks) in missing.into_iter().zip(subscribed) {
            match tasks {
                Ok(tasks) => {
                    self.consumers.insert(p, tasks);
                }
                Err(e) => {
                    warn!(partition = p, error = %e, "subscribing to a partition's replies failed; will retry")
                }
            }
        }
    }

    /// Subscribes to partition `p`'s replies, one consumer per saga type, forwarding
    /// them to the intake.
    async fn subscribe(
        &self,
        p: u32,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, crate::ports::BusError> {
        let group = &self.shared.options.reply_group;
        let mut tasks = Vec::with_capacity(self.types.len());
        for ty in &self.types {
            let subscription = self
                .shared
                .bus
                .subscribe_bounded(
                    &[wire::reply_partition_filter(ty, p)],
                    &partition_consumer(group, ty, p),
                    self.per_consumer,
                )
                .await;
            let mut subscription = match subscription {
                Ok(s) => s,
                Err(e) => {
                    for t in &tasks {
                        tokio::task::JoinHandle::abort(t);
                    }
                    return Err(e);
                }
            };
            let inbound = self.inbound.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        next = subscription.next() => next,
                        // The intake is gone (the runtime was dropped): stop pulling.
                        _ = inbound.closed() => break,
                    };
                    let Some(d) = next else { break };
                    if let Err(mpsc::error::SendError((_, d))) =
                        inbound.send((Inbound::Reply, d)).await
                    {
                        let (_, _, acker) = d.into_parts();
                        let _ = acker.nak(Duration::ZERO).await;
                        break;
                    }
                }
            }));
        }
        debug!(partition = p, "reading the partition's replies");
        Ok(tasks)
    }

    /// Hands partitions over: stops reading their replies and claiming their work,
    /// waits (bounded) for the replies being applied, lets their actors go, then
    /// releases their leases (`release`; a lease already lost is left alone).
    async fn hand_over(&mut self, partitions: &[u32], release: bool) {
        let shared = Arc::clone(&self.shared);
        let ownership = &shared.ownership;
        for p in partitions {
            ownership.set(*p, false);
            if let Some(tasks) = self.consumers.remove(p) {
                for t in tasks {
                    t.abort();
                }
            }
        }
        let deadline = Instant::now() + HANDOVER_WAIT;
        while partitions.iter().any(|p| ownership.in_flight(*p) > 0) {
            if Instant::now() >= deadline {
                warn!(partitions = ?partitions, "replies still being applied after the handover wait; handing over anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let release_actors = ReleasePartition {
            partitions: partitions.to_vec(),
        };
        if self.registry.send(release_actors).await.is_err() {
            debug!("the registry is gone: no actors to let go");
        }
        if release {
            let names: Vec<String> = partitions
                .iter()
                .map(|p| partition_lease(&self.group, *p))
                .collect();
            if let Err(e) = shared.store.release_leases(&names, &shared.node).await {
                warn!(error = %e, "releasing partition leases failed: they pass on when they end");
            }
        }
        for _ in partitions {
            shared
                .metrics
                .partition_handover(if release { "released" } else { "lost" });
        }
        shared
            .metrics
            .partitions_held
            .set(ownership.held().len() as f64);
    }

    /// Hands every partition over and ends this node's membership.
    async fn leave(&mut self) {
        let held = self.shared.ownership.held().to_vec();
        if !held.is_empty() {
            self.hand_over(&held, true).await;
        }
        let shared = &self.shared;
        if let Err(e) = shared
            .store
            .release_leases(&[node_lease(&self.group, &shared.node)], &shared.node)
            .await
        {
            debug!(error = %e, "ending the node's membership lease failed: it ends on its own");
        }
        info!(partitions = held.len(), "left: partitions handed over");
    }
}

impl Drop for Leases {
    /// The runtime was dropped, or the task aborted: its consumers stop pulling.
    fn drop(&mut self) {
        for tasks in self.consumers.values() {
            for t in tasks {
                t.abort();
            }
        }
    }
}

/// FNV-1a, 64-bit.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
