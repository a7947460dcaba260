//! Partition leases: how a node comes by its share of the partitions
//! ([`crate::partitions`]), keeps it, and hands it over.
//!
//! Every node holds a lease on its membership (`node/<group>/<node>`) and one per
//! partition it runs (`partition/<group>/<p>`), in the store, for
//! `RuntimeOptions::partition_lease`. The group ([`crate::partitions::lease_group`]) is
//! the nodes that can run the same sagas; they share the partitions. Two tasks keep them:
//!
//! - the **renewer** renews the node's leases every fifth of the lease, in one statement,
//!   and nothing else, so no other work can delay a renewal. It knows when each
//!   partition's lease was last written, and gives a partition up at the latest two
//!   renewals before that lease ends (after a failed renewal, as soon as the next could
//!   come too late) unless it renewed it (a store outage, a process stalled: the others
//!   may take it once the lease ends), or when someone else took it (its own had ended);
//! - the **balancer**, at the same pace (and at once when the renewer gave something
//!   up), reads the group's leases and stops what the renewer gave up, hands over what
//!   is past the node's fair share, takes free partitions up to it, and reads the replies
//!   of what it holds.
//!
//! Fair share: at most `ceil(partitions / live nodes)`; at that top, one over when a live
//! node holds less than `floor(..)` while no partition is free for it (only the top node
//! with the greatest name gives it, so several do not at once), and no taking past
//! `floor(..)` meanwhile (a partition given over is not taken back). A member below
//! `floor(..)` while a partition nobody leases has been free for a whole lease since it
//! was first seen did not take what was offered: it is not counted for 6 leases,
//! doubling when it happens again (up to 96), and keeps what it holds. A partition free
//! for a whole lease is taken by any node, whatever its share, and handed over last. A
//! partition whose replies cannot be read (its consumer cannot be created) is handed
//! over after 3 failed attempts and not taken again by that node for 3 leases. Every
//! store and bus call of the balancer has a deadline (two fifths of the lease).
//!
//! A handover is clean: the old holder stops reading the partition's replies (what it
//! had pulled and not begun goes back to the broker at once, unacknowledged), stops
//! claiming its wake-ups and outbox rows, lets the replies being applied finish (for at
//! most two fifths of the lease), lets the partition's actors go, and only then releases
//! the lease; the new holder takes it at its next balance. A reply in flight is applied
//! once: by the old holder before the release, or redelivered to the new one (and the
//! inbox refuses it a second time).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::sync::{Mutex, mpsc, watch};
use tracing::{debug, info, warn};

use super::intake::Inbound;
use crate::actors::{Registry, ReleasePartition, Shared};
use crate::ids::SagaType;
use crate::partitions::{lease_group, lease_node, lease_partition, node_lease, partition_lease};
use crate::ports::Delivery;
use crate::wire;

/// Failed attempts to read a partition's replies before it is handed over.
const SUBSCRIBE_ATTEMPTS: u32 = 3;

/// The durable consumer the replies of saga type `ty` in partition `p` are read with.
/// Partition 0's is the one every type's replies were read with before partitions (its
/// filter narrowed to partition 0), so an upgrade re-reads nothing.
pub(crate) fn partition_consumer(group: &str, ty: &SagaType, p: u32) -> String {
    match p {
        0 => super::reply_consumer(group, ty),
        p => format!("{group}-{ty}-p{p}"),
    }
}

/// A node's partition leases: the balancer, and the renewer it runs beside it.
pub(super) struct Leases {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    /// Where the partitions' consumers hand their replies to the intake.
    inbound: mpsc::Sender<(Inbound, Delivery)>,
    types: Vec<SagaType>,
    /// Unacknowledged replies one partition's consumer of one type may hold.
    per_consumer: usize,
    /// The consumers of each partition read (one forwarding task per saga type).
    consumers: HashMap<u32, Vec<tokio::task::JoinHandle<()>>>,
    /// The group whose partitions this node shares ([`lease_group`]).
    group: String,
    /// Held by a renewal from its reading of the partitions held to its end, and by a
    /// take or a release: a partition is never renewed after its release.
    lock: Arc<Mutex<()>>,
    /// Members not counted until a time, for not taking partitions offered to them:
    /// (until, how many times in a row, when last).
    ignored: HashMap<String, (Instant, u32, Instant)>,
    /// When each member of the group was first seen.
    first_seen: HashMap<String, Instant>,
    /// Partitions taken lately because they were free for a whole lease: handed over
    /// last.
    rescued: HashMap<u32, Instant>,
    /// When each held partition's lease was last written ([`Written`]).
    written: Written,
    /// When a write of this node's leases last failed (a take, a renewal): while the
    /// store refuses its writes, nobody is judged for leaving partitions untaken.
    write_failed: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Whether the first balance made the node a member.
    joined: bool,
    /// Partitions this node may have actors or consumers of: taken, and not yet
    /// stopped ([`Leases::stop_partitions`]).
    may_run: HashSet<u32>,
    /// The renewer gave partitions up: balance at once.
    gave_up: Arc<tokio::sync::Notify>,
    /// Since when each free partition has been free.
    free_since: HashMap<u32, Instant>,
    /// Failed attempts to read each partition's replies.
    subscribe_failures: HashMap<u32, u32>,
    /// Partitions not to take again before a time (their replies could not be read).
    cooldown: HashMap<u32, Instant>,
    /// The renewer's task.
    renewer: Option<tokio::task::JoinHandle<()>>,
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
            group: lease_group(&shared.options.reply_group, &shared.definitions.pairs()),
            shared,
            lock: Arc::new(Mutex::new(())),
            ignored: HashMap::new(),
            first_seen: HashMap::new(),
            rescued: HashMap::new(),
            written: Arc::new(std::sync::Mutex::new(HashMap::new())),
            write_failed: Arc::new(std::sync::Mutex::new(None)),
            joined: false,
            may_run: HashSet::new(),
            gave_up: Arc::new(tokio::sync::Notify::new()),
            free_since: HashMap::new(),
            subscribe_failures: HashMap::new(),
            cooldown: HashMap::new(),
            renewer: None,
        }
    }

    fn every(&self) -> Duration {
        self.shared.options.partition_lease / 5
    }

    /// How long a store or bus call of the balancer may take: a store that does not
    /// answer is one that failed.
    fn patience(&self) -> Duration {
        2 * self.every()
    }

    /// The longest a handover waits for the replies being applied: with the wait for
    /// the registry and the time since the last renewal, short of the lease, which is
    /// no longer renewed.
    fn handover_wait(&self) -> Duration {
        (self.shared.options.partition_lease * 2 / 5).min(Duration::from_secs(10))
    }

    /// Starts the renewer (before anything is taken, so that nothing taken waits for
    /// its first renewal), and makes the first balance: the node's share, before it
    /// reads anything.
    pub(super) async fn start(&mut self, stop: watch::Receiver<bool>) {
        self.renewer = Some(tokio::spawn(renew(
            Arc::clone(&self.shared),
            self.group.clone(),
            Arc::clone(&self.lock),
            Arc::clone(&self.gave_up),
            Arc::clone(&self.written),
            Arc::clone(&self.write_failed),
            stop,
        )));
        self.tick().await;
    }

    /// Balances until `stop` says so, then leaves: hands every partition over and ends
    /// its membership.
    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let gave_up = Arc::clone(&self.gave_up);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every()) => {}
                _ = gave_up.notified() => {}
                _ = stop.changed() => break,
            }
            self.tick().await;
        }
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.await;
        }
        self.leave().await;
    }

    /// One balance: stop what the renewer gave up, hand over the excess, take free
    /// partitions up to the fair share, and read the replies of the partitions held.
    /// The first one, at start, also makes the node a member.
    pub(super) async fn tick(&mut self) {
        let shared = Arc::clone(&self.shared);
        let (store, node, ownership) = (&shared.store, &shared.node, &shared.ownership);
        let lease = shared.options.partition_lease;
        let patience = self.patience();
        let group = self.group.clone();

        // Partitions the renewer gave up (read or not): stop reading them and let their
        // actors go.
        let held = ownership.held();
        let mut dropped: Vec<u32> = self
            .consumers
            .keys()
            .chain(self.may_run.iter())
            .copied()
            .filter(|p| !held.contains(p))
            .collect();
        dropped.sort_unstable();
        dropped.dedup();
        if !dropped.is_empty() {
            self.stop_partitions(&dropped).await;
        }

        if !self.joined {
            self.joined = true;
            // The first balance: become a member before counting the members.
            let member = [node_lease(&group, node)];
            let joined = store.acquire_leases(&member, node, shared.clock.now(), lease);
            if !matches!(tokio::time::timeout(patience, joined).await, Ok(Ok(_))) {
                warn!(
                    "joining the partition leases failed: the node starts with no partition and tries again"
                );
            }
        }
        let view = match tokio::time::timeout(patience, store.leases("", shared.clock.now())).await
        {
            Ok(Ok(v)) => v,
            failed => {
                match failed {
                    Ok(Err(e)) => warn!(error = %e, "reading the partition leases failed"),
                    _ => warn!("reading the partition leases: no answer within {patience:?}"),
                }
                // What was free during an outage was offered to nobody.
                self.free_since.clear();
                self.read_partitions().await;
                return;
            }
        };
        let now = Instant::now();
        let mut nodes: HashMap<&str, usize> = view
            .iter()
            .filter_map(|l| lease_node(&group, &l.name))
            .map(|n| (n, 0))
            .collect();
        nodes.entry(node.as_str()).or_insert(0);
        let mut leased: HashMap<u32, &str> = HashMap::new();
        for l in &view {
            if let Some(p) = lease_partition(&group, &l.name) {
                leased.insert(p, l.holder.as_str());
                if let Some(n) = nodes.get_mut(l.holder.as_str()) {
                    *n += 1;
                }
            }
        }
        let held: Vec<u32> = ownership.held().to_vec();
        // Free for this node: leased by nobody, or still to this node after the renewer
        // gave it up (once its consumers are stopped, at the next balance).
        let free: Vec<u32> = (0..ownership.count())
            .filter(|p| !held.contains(p) && !self.consumers.contains_key(p))
            .filter(|p| leased.get(p).is_none_or(|h| *h == node.as_str()))
            .collect();
        self.free_since.retain(|p, _| free.contains(p));
        for p in &free {
            self.free_since.entry(*p).or_insert(now);
        }
        self.cooldown.retain(|_, until| *until > now);
        self.rescued
            .retain(|p, since| held.contains(p) && now.duration_since(*since) < 3 * lease);
        // A member below the bottom of the share while a partition nobody leases has
        // been free for a whole lease since it was first seen did not take what was
        // offered (too starved to, stuck, or unable to read what it takes): it is not
        // counted for 6 leases, doubling each time it happens again (up to 96; back to 6
        // after 96 leases without), and keeps what it holds; the others take the rest.
        self.first_seen
            .retain(|n, _| nodes.contains_key(n.as_str()));
        for n in nodes.keys() {
            self.first_seen.entry((*n).to_owned()).or_insert(now);
        }
        let bottom = ownership.count() as usize / nodes.len();
        let writing = self
            .write_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| now.duration_since(t) >= lease);
        for (n, count) in &nodes {
            if !writing || *n == node.as_str() || *count >= bottom {
                continue;
            }
            let seen = self.first_seen.get(*n).copied().unwrap_or(now);
            let offered = self.free_since.iter().any(|(p, since)| {
                !leased.contains_key(p) && now.duration_since((*since).max(seen)) >= lease
            });
            let entry = self.ignored.get(*n).copied();
            if !offered || entry.is_some_and(|(until, _, _)| until > now) {
                continue;
            }
            let times = match entry {
                Some((until, times, _)) if now.duration_since(until) < 96 * lease => times + 1,
                _ => 1,
            };
            let leases = 6u32 << (times - 1).min(4);
            warn!(node = %n, holds = count, times, "a member does not take the partitions offered to it: not counted for {leases} leases");
            self.ignored
                .insert((*n).to_owned(), (now + lease * leases, times, now));
        }
        self.ignored.retain(|n, (until, _, _)| {
            nodes.contains_key(n.as_str()) || now.duration_since(*until) < 96 * lease
        });
        let live: Vec<(&str, usize)> = nodes
            .iter()
            .filter(|(n, _)| {
                **n == node.as_str()
                    || self
                        .ignored
                        .get(**n)
                        .is_none_or(|(until, _, _)| *until <= now)
            })
            .map(|(n, count)| (*n, *count))
            .collect();
        let count = ownership.count() as usize;
        let (most, least) = (count.div_ceil(live.len()), count / live.len());
        let starving = live.iter().any(|(_, n)| *n < least);

        // Past the fair share: hand the excess over (partitions taken lately because
        // nobody else would, last). At its top while another node is below its bottom
        // and nothing is free for it: one over, from the top node with the greatest name
        // only.
        let mut excess = held.len().saturating_sub(most);
        if excess == 0 && held.len() == most && most > least && free.is_empty() && starving {
            let top = live
                .iter()
                .filter(|(_, n)| *n == most)
                .map(|(n, _)| *n)
                .max();
            if top == Some(node.as_str()) {
                excess = 1;
            }
        }
        if excess > 0 {
            let mut order: Vec<u32> = held.clone();
            order.sort_by_key(|p| (self.rescued.contains_key(p), std::cmp::Reverse(*p)));
            let out: Vec<u32> = order.into_iter().take(excess).collect();
            info!(partitions = ?out, live = live.len(), share = most, "handing partitions over");
            self.hand_over(&out, true).await;
            return;
        }

        // Free partitions up to the share (only up to its bottom while a node is below
        // it, so that a partition given over for it is not taken back), from a place of
        // this node's own so that nodes taking at once mostly ask for different ones; and
        // whatever has been free for a whole lease, whatever the share.
        let share = if starving { least } else { most };
        let takable: Vec<u32> = free
            .iter()
            .copied()
            .filter(|p| !self.cooldown.contains_key(p))
            .collect();
        let mut want: Vec<u32> = Vec::new();
        if !takable.is_empty() {
            let start = fnv(node.as_bytes()) as usize % takable.len();
            want.extend(
                takable
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(takable.len().min(share.saturating_sub(held.len()))),
            );
            for p in &takable {
                let long = self
                    .free_since
                    .get(p)
                    .is_some_and(|t| now.duration_since(*t) >= lease);
                if long && !want.contains(p) {
                    want.push(*p);
                    self.rescued.insert(*p, now);
                }
            }
        }
        if !want.is_empty() {
            let names: Vec<String> = want.iter().map(|p| partition_lease(&group, *p)).collect();
            // (No lock: a renewal that misses a partition taken now renews it next time,
            // well inside the lease just written.)
            let sent = Instant::now();
            let taken = store.acquire_leases(&names, node, shared.clock.now(), lease);
            match tokio::time::timeout(patience, taken).await {
                Ok(Ok(got)) => {
                    let got: Vec<u32> = got
                        .iter()
                        .filter_map(|n| lease_partition(&group, n))
                        .collect();
                    if !got.is_empty() {
                        info!(partitions = ?got, live = live.len(), share = most, "taking partitions");
                    }
                    for p in &got {
                        self.may_run.insert(*p);
                        self.written
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(*p, sent);
                        if ownership.set(*p, true) {
                            handover(&shared, "taken");
                        }
                    }
                }
                failed => {
                    match failed {
                        Ok(Err(e)) => warn!(error = %e, "taking free partitions failed"),
                        _ => warn!("taking free partitions: no answer within {patience:?}"),
                    }
                    *self.write_failed.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Instant::now());
                }
            }
        }
        self.read_partitions().await;
        shared
            .metrics
            .partitions_held
            .set(ownership.held().len() as f64);
    }

    /// Starts the consumers of every held partition that has none (taken just now, or
    /// whose subscription failed before); hands over a partition whose replies could not
    /// be read [`SUBSCRIBE_ATTEMPTS`] times in a row.
    async fn read_partitions(&mut self) {
        let held = self.shared.ownership.held();
        let missing: Vec<u32> = held
            .iter()
            .copied()
            .filter(|p| !self.consumers.contains_key(p))
            .collect();
        let patience = self.patience();
        let subscribed = futures_util::future::join_all(
            missing
                .iter()
                .map(|p| tokio::time::timeout(patience, self.subscribe(*p))),
        )
        .await;
        let mut unreadable = Vec::new();
        for (p, tasks) in missing.into_iter().zip(subscribed) {
            let error = match tasks {
                Ok(Ok(tasks)) => {
                    self.consumers.insert(p, tasks);
                    self.subscribe_failures.remove(&p);
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {patience:?}"),
            };
            let failures = self.subscribe_failures.entry(p).or_insert(0);
            *failures += 1;
            warn!(partition = p, error = %error, attempt = *failures, "reading a partition's replies failed");
            if *failures >= SUBSCRIBE_ATTEMPTS {
                unreadable.push(p);
            }
        }
        if !unreadable.is_empty() {
            warn!(partitions = ?unreadable, "handing over partitions whose replies this node cannot read");
            let until = Instant::now() + 3 * self.shared.options.partition_lease;
            for p in &unreadable {
                self.subscribe_failures.remove(p);
                self.cooldown.insert(*p, until);
            }
            self.hand_over(&unreadable, true).await;
        }
    }

    /// Subscribes to partition `p`'s replies, one consumer per saga type, forwarding
    /// them to the intake.
    async fn subscribe(
        &self,
        p: u32,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, crate::ports::BusError> {
        let group = &self.shared.options.reply_group;
        // Every type's subscription first, the tasks after: a subscription abandoned
        // half-way (an error, the caller's deadline) leaves no task pulling.
        let mut subscriptions = Vec::with_capacity(self.types.len());
        for ty in &self.types {
            subscriptions.push(
                self.shared
                    .bus
                    .subscribe_bounded(
                        &[wire::reply_partition_filter(ty, p)],
                        &partition_consumer(group, ty, p),
                        self.per_consumer,
                    )
                    .await?,
            );
        }
        let mut tasks = Vec::with_capacity(subscriptions.len());
        for mut subscription in subscriptions {
            let inbound = self.inbound.clone();
            // Aborted at a handover: the deliveries it held are dropped unsettled, which
            // hands them back to the broker (the bus's acker).
            tasks.push(tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        next = subscription.next() => next,
                        // The intake is gone (the runtime was dropped): stop pulling.
                        _ = inbound.closed() => break,
                    };
                    let Some(d) = next else { break };
                    if inbound.send((Inbound::Reply, d)).await.is_err() {
                        break;
                    }
                }
            }));
        }
        debug!(partition = p, "reading the partition's replies");
        Ok(tasks)
    }

    /// Hands partitions over: stops reading their replies and claiming their work,
    /// lets the replies being applied finish, lets their actors go, then releases
    /// their leases.
    async fn hand_over(&mut self, partitions: &[u32], release: bool) {
        let shared = Arc::clone(&self.shared);
        let mut cleared = 0;
        {
            // Under the lock: no renewal is under way, and none after renews these.
            let _releasing = self.lock.lock().await;
            let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            for p in partitions {
                // (One the renewer gave up meanwhile is counted as lost, not again.)
                if shared.ownership.set(*p, false) {
                    cleared += 1;
                }
                written.remove(p);
            }
        }
        self.stop_partitions(partitions).await;
        if release {
            let names: Vec<String> = partitions
                .iter()
                .map(|p| partition_lease(&self.group, *p))
                .collect();
            let released = shared.store.release_leases(&names, &shared.node);
            match tokio::time::timeout(self.patience(), released).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "releasing partition leases failed: they pass on when they end")
                }
                Err(_) => {
                    warn!("releasing partition leases: no answer; they pass on when they end")
                }
            }
        }
        for _ in 0..cleared {
            handover(&shared, if release { "released" } else { "lost" });
        }
        shared
            .metrics
            .partitions_held
            .set(shared.ownership.held().len() as f64);
    }

    /// Stops reading partitions no longer held, waits (bounded) for their replies being
    /// applied, and lets their actors go.
    async fn stop_partitions(&mut self, partitions: &[u32]) {
        let ownership = &self.shared.ownership;
        for p in partitions {
            self.may_run.remove(p);
            if let Some(tasks) = self.consumers.remove(p) {
                for t in tasks {
                    t.abort();
                }
            }
        }
        let deadline = Instant::now() + self.handover_wait();
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
        match tokio::time::timeout(self.every() / 2, self.registry.send(release_actors)).await {
            Ok(Ok(())) => {}
            _ => debug!("the registry did not take the release: the actors go when idle"),
        }
    }

    /// Hands every partition over and ends this node's membership.
    async fn leave(&mut self) {
        let held = self.shared.ownership.held().to_vec();
        if !held.is_empty() {
            self.hand_over(&held, true).await;
        }
        let shared = &self.shared;
        // And every lease still to this node (given up by the renewer, a release that
        // failed): checked against the holder, so only this node's.
        let mut member: Vec<String> = (0..shared.ownership.count())
            .map(|p| partition_lease(&self.group, p))
            .collect();
        member.push(node_lease(&self.group, &shared.node));
        let left = shared.store.release_leases(&member, &shared.node);
        if !matches!(
            tokio::time::timeout(self.patience(), left).await,
            Ok(Ok(()))
        ) {
            debug!("ending the node's membership lease failed: it ends on its own");
        }
        info!(partitions = held.len(), "left: partitions handed over");
    }
}

impl Drop for Leases {
    /// The runtime was dropped, or the task aborted: its consumers stop pulling, and the
    /// renewer stops renewing.
    fn drop(&mut self) {
        for tasks in self.consumers.values() {
            for t in tasks {
                t.abort();
            }
        }
        if let Some(renewer) = &self.renewer {
            renewer.abort();
        }
    }
}

/// Counts a partition taken, released or lost, in the metrics and the stats.
fn handover(shared: &Shared, event: &'static str) {
    shared.metrics.partition_handover(event);
    let counter = match event {
        "taken" => &shared.stats.partitions_taken,
        _ => &shared.stats.partitions_given_up,
    };
    crate::actors::RuntimeStats::incr(counter);
}

/// When each held partition's lease was last written (sent), at the earliest: a
/// partition's lease ends a lease after it, and the renewer gives it up two renewals
/// before that unless renewed.
type Written = Arc<std::sync::Mutex<HashMap<u32, Instant>>>;

/// The renewer: renews the node's membership and its partitions' leases every fifth of
/// the lease until `stop` says so, giving up, two renewals before its lease ends, any
/// partition it could not renew (module docs), and telling the balancer (`gave_up`).
async fn renew(
    shared: Arc<Shared>,
    group: String,
    lock: Arc<Mutex<()>>,
    gave_up: Arc<tokio::sync::Notify>,
    written: Written,
    write_failed: Arc<std::sync::Mutex<Option<Instant>>>,
    mut stop: watch::Receiver<bool>,
) {
    let lease = shared.options.partition_lease;
    let every = lease / 5;
    let patience = 2 * every;
    let (store, node, ownership) = (&shared.store, &shared.node, &shared.ownership);
    let written_at = |p: u32| {
        written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p)
            .copied()
    };
    // Rounds are paced from their starts: a slow round leaves the next its whole time.
    let mut next = tokio::time::Instant::now() + every;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next = tokio::time::Instant::now() + every;
        let _renewing = lock.lock().await;
        let now = Instant::now();
        // A partition past its give-up time (the renewer ran late), or too close to it
        // for a renewal to answer in time, is not renewed: its lease may end before the
        // renewal is written, and someone else may hold it meanwhile.
        let mut give_up: Vec<u32> = Vec::new();
        let mut renew: Vec<(u32, Instant)> = Vec::new();
        for p in ownership.held().iter().copied() {
            match written_at(p) {
                Some(w) if now + every / 2 < w + lease - patience => renew.push((p, w)),
                _ => give_up.push(p),
            }
        }
        // Wait no longer than the first of them must be given up.
        let deadline = renew
            .iter()
            .map(|(_, w)| *w + lease - patience)
            .min()
            .unwrap_or(now + patience)
            .min(now + patience);
        let mut names = vec![node_lease(&group, node)];
        names.extend(renew.iter().map(|(p, _)| partition_lease(&group, *p)));
        let sent = Instant::now();
        let renewal = store.acquire_leases(&names, node, shared.clock.now(), lease);
        let wait = deadline.saturating_duration_since(sent);
        match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), renewal).await {
            Ok(Ok(renewed)) => {
                let renewed: HashSet<String> = renewed.into_iter().collect();
                let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
                for (p, _) in &renew {
                    if renewed.contains(&partition_lease(&group, *p)) {
                        w.insert(*p, sent);
                    } else {
                        // Taken by another node: its own lease had ended.
                        give_up.push(*p);
                    }
                }
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {wait:?}"),
                };
                let now = Instant::now();
                // The store refuses or does not answer this node's writes (every round
                // waits at least half a renewal).
                *write_failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                let late: Vec<u32> = renew
                    .iter()
                    .filter(|(_, w)| now + every >= *w + lease - patience)
                    .map(|(p, _)| *p)
                    .collect();
                warn!(%error, held = renew.len(), giving_up = late.len(), "renewing the partition leases failed");
                give_up.extend(late);
            }
        }
        if !give_up.is_empty() {
            warn!(partitions = ?give_up, "partition leases not renewed in time, or taken by another node: giving them up");
            let mut any = false;
            let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
            for p in give_up {
                w.remove(&p);
                if ownership.set(p, false) {
                    handover(&shared, "lost");
                    any = true;
                }
            }
            drop(w);
            if any {
                gave_up.notify_one();
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
