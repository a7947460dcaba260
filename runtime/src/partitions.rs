//! Partitions: which sagas this node runs.
//!
//! Every saga belongs to one of a fixed number of partitions, derived from its id
//! ([`SagaId::partition`]) and recorded with it in the store. A node runs the sagas of
//! the partitions it holds: it reads their replies (the reply subject a command names
//! ends with its saga's partition, `skald.reply.<service>.<saga_type>.<partition>`),
//! claims their due wake-ups and relays their outbox rows. Which partitions a node
//! holds is decided by leases in the store (`runtime::leases`); this is the answer,
//! read on every hot path without a lock.
//!
//! Optimistic concurrency stays the safety net: a node that runs a saga it does not
//! hold (a start, a handle's cancel, an operator's request, a lease that moved an
//! instant ago) commits only on the version it read, so ownership makes conflicts rare,
//! never makes correctness depend on it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::ids::SagaId;

/// Partitions a store records when the first runtime on it sets none
/// (`RuntimeOptions::partitions`).
pub const DEFAULT_PARTITIONS: u32 = 16;

/// The name under which a store records its partition count
/// ([`crate::ports::SagaStore::shared_secret`]: the first writer's value stays).
pub(crate) const PARTITIONS_SETTING: &str = "partitions";

/// The group of nodes that share partitions: those with the same reply group and the
/// same registered (saga type, definition version) pairs, i.e. the nodes of one build of
/// one deployment, which can run exactly the same sagas. It names their leases: 16 hex
/// digits of FNV-1a over the reply group and the sorted pairs.
///
/// Nodes of different groups on one store (a rolling deploy between two builds, teams
/// running different saga types on one database) each hold every partition of their
/// own group: whatever partition a saga is in, a node that can run it holds it, and
/// where two groups overlap they share its replies as they would without partitions
/// (optimistic concurrency keeps that correct). No saga waits for a node that cannot
/// run it.
pub fn lease_group(reply_group: &str, pairs: &[(crate::ids::SagaType, u32)]) -> String {
    let mut pairs: Vec<String> = pairs.iter().map(|(t, v)| format!("{t}:{v}")).collect();
    pairs.sort_unstable();
    let text = format!("{reply_group}\n{}", pairs.join(","));
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The lease a node holds for as long as it runs (`node/<group>/<holder>`): the live
/// nodes of its group, among which the group's partitions are shared.
pub fn node_lease(group: &str, holder: &str) -> String {
    format!("{NODE_LEASE_PREFIX}{group}/{holder}")
}

/// The lease on partition `p` in `group` (`partition/<group>/<p>`).
pub fn partition_lease(group: &str, p: u32) -> String {
    format!("{PARTITION_LEASE_PREFIX}{group}/{p}")
}

/// The prefix of the nodes' leases.
pub const NODE_LEASE_PREFIX: &str = "node/";
/// The prefix of the partitions' leases.
pub const PARTITION_LEASE_PREFIX: &str = "partition/";

/// The partition a lease name is for, if it is a partition's lease of `group`.
pub fn lease_partition(group: &str, name: &str) -> Option<u32> {
    name.strip_prefix(PARTITION_LEASE_PREFIX)?
        .strip_prefix(group)?
        .strip_prefix('/')?
        .parse()
        .ok()
}

/// The node a lease name is for, if it is a node's lease of `group`.
pub fn lease_node<'a>(group: &str, name: &'a str) -> Option<&'a str> {
    name.strip_prefix(NODE_LEASE_PREFIX)?
        .strip_prefix(group)?
        .strip_prefix('/')
}

/// How a runtime comes by its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Every partition, always: a runtime on a bus only it reads (the in-process bus).
    All,
    /// Those it leases in the store: a node sharing a durable bus with others.
    Leased,
    /// None: a runtime that consumes nothing (`RuntimeOptions::consume = false`).
    Nothing,
}

/// The partitions this runtime holds now.
pub(crate) struct Ownership {
    count: u32,
    mode: Mode,
    held: Vec<AtomicBool>,
    list: RwLock<Arc<[u32]>>,
    /// Inbound messages of each partition being applied: a partition is handed over
    /// once its count is back to zero.
    in_flight: Vec<AtomicUsize>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("count", &self.count)
            .field("mode", &self.mode)
            .field("held", &self.held())
            .finish()
    }
}

impl Ownership {
    /// `count` partitions (at least 1), held as `mode` says (all at once for
    /// [`Mode::All`], none yet otherwise).
    pub(crate) fn new(count: u32, mode: Mode) -> Self {
        let count = count.max(1);
        let all = mode == Mode::All;
        let ownership = Ownership {
            count,
            mode,
            held: (0..count).map(|_| AtomicBool::new(all)).collect(),
            list: RwLock::new(Arc::from(Vec::new())),
            in_flight: (0..count).map(|_| AtomicUsize::new(0)).collect(),
        };
        ownership.refresh();
        ownership
    }

    /// How many partitions the deployment has.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// Saga `id`'s partition.
    pub(crate) fn partition_of(&self, id: &SagaId) -> u32 {
        id.partition(self.count)
    }

    /// Whether this runtime holds partition `p`.
    pub(crate) fn holds(&self, p: u32) -> bool {
        self.held
            .get(p as usize)
            .is_some_and(|h| h.load(Ordering::SeqCst))
    }

    /// Whether this runtime holds saga `id`'s partition.
    pub(crate) fn owns(&self, id: &SagaId) -> bool {
        self.holds(self.partition_of(id))
    }

    /// The partitions held, in order.
    pub(crate) fn held(&self) -> Arc<[u32]> {
        Arc::clone(&self.list.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// What this runtime's claims on wake-ups and outbox rows cover: `None` (every row)
    /// when it runs every partition, else the partitions held (and the rows recorded
    /// with no partition, which every node may take).
    pub(crate) fn claim_filter(&self) -> Option<Arc<[u32]>> {
        match self.mode {
            Mode::All => None,
            Mode::Leased | Mode::Nothing => Some(self.held()),
        }
    }

    /// Marks partition `p` held or not. Returns whether that changed anything.
    pub(crate) fn set(&self, p: u32, held: bool) -> bool {
        let Some(h) = self.held.get(p as usize) else {
            return false;
        };
        let changed = h.swap(held, Ordering::SeqCst) != held;
        if changed {
            self.refresh();
        }
        changed
    }

    fn refresh(&self) {
        let list: Vec<u32> = (0..self.count).filter(|p| self.holds(*p)).collect();
        *self.list.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(list);
    }

    /// A fresh id for a saga this runtime starts, in a partition it holds when it holds
    /// any: the saga's replies then come back here, where its actor already is. (Ids
    /// stay version-7 UUIDs: a few are drawn until one falls in a held partition.)
    pub(crate) fn fresh_id(&self) -> SagaId {
        let held = self.held();
        if held.is_empty() || held.len() == self.count as usize {
            return SagaId::new();
        }
        // Each draw lands in a held partition with probability held/count ≥ 1/count;
        // past this many draws (odds below 1e-6 at 1,024 partitions) take any id.
        let draws = 16 * self.count;
        for _ in 0..draws {
            let id = SagaId::new();
            if self.owns(&id) {
                return id;
            }
        }
        SagaId::new()
    }

    /// Counts an inbound message of partition `p` as being applied until the guard is
    /// dropped.
    pub(crate) fn applying(self: &Arc<Self>, p: u32) -> Applying {
        if let Some(n) = self.in_flight.get(p as usize) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        Applying {
            ownership: Arc::clone(self),
            partition: p,
        }
    }

    /// Inbound messages of partition `p` being applied.
    pub(crate) fn in_flight(&self, p: u32) -> usize {
        self.in_flight
            .get(p as usize)
            .map_or(0, |n| n.load(Ordering::SeqCst))
    }
}

/// An inbound message being applied ([`Ownership::applying`]).
#[derive(Debug)]
pub(crate) struct Applying {
    ownership: Arc<Ownership>,
    partition: u32,
}

impl Drop for Applying {
    fn drop(&mut self) {
        if let Some(n) = self.ownership.in_flight.get(self.partition as usize) {
            n.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_nothing_and_some() {
        let all = Ownership::new(4, Mode::All);
        assert_eq!(&*all.held(), &[0, 1, 2, 3]);
        assert!(all.claim_filter().is_none());
        let none = Ownership::new(4, Mode::Nothing);
        assert!(none.held().is_empty());
        assert_eq!(none.claim_filter().as_deref(), Some(&[][..]));
        let some = Ownership::new(4, Mode::Leased);
        assert!(some.set(2, true));
        assert!(!some.set(2, true));
        assert!(some.set(0, true));
        assert_eq!(some.claim_filter().as_deref(), Some(&[0, 2][..]));
        assert!(!some.set(9, true), "out of range is ignored");
        for _ in 0..200 {
            let id = some.fresh_id();
            assert!(
                some.owns(&id),
                "{id} is in partition {}",
                some.partition_of(&id)
            );
        }
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let o = Arc::new(Ownership::new(2, Mode::Leased));
        let a = o.applying(1);
        let b = o.applying(1);
        assert_eq!(o.in_flight(1), 2);
        drop(a);
        assert_eq!(o.in_flight(1), 1);
        drop(b);
        assert_eq!((o.in_flight(0), o.in_flight(1)), (0, 0));
    }

    #[test]
    fn lease_names() {
        let checkout = crate::ids::SagaType::new("checkout").expect("type");
        let g = lease_group("skald-orchestrator", &[(checkout.clone(), 1)]);
        assert_eq!(g.len(), 16);
        assert_eq!(
            g,
            lease_group("skald-orchestrator", &[(checkout.clone(), 1)])
        );
        assert_ne!(
            g,
            lease_group("skald-orchestrator", &[(checkout.clone(), 2)])
        );
        assert_ne!(g, lease_group("other", &[(checkout, 1)]));
        assert_eq!(lease_partition(&g, &partition_lease(&g, 12)), Some(12));
        assert_eq!(
            lease_partition("0000000000000000", &partition_lease(&g, 12)),
            None
        );
        assert_eq!(lease_partition(&g, &node_lease(&g, "pid1-x")), None);
        assert_eq!(lease_node(&g, &node_lease(&g, "pid1-x")), Some("pid1-x"));
        assert_eq!(lease_node(&g, &partition_lease(&g, 1)), None);
        assert_eq!(lease_partition(&g, &format!("partition/{g}/x")), None);
    }
}
