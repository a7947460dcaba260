//! `Registry`: finds or activates the instance actor of a saga.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::WeakAddr;
use actix::prelude::*;
use tracing::debug;

use super::instance::SagaInstance;
use super::{RuntimeStats, Shared};
use crate::ids::SagaId;
use crate::machine::SagaState;

/// How often dead entries (passivated or crashed actors) are swept from the map.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Returns the address of saga `id`'s instance actor, activating one if none is alive.
///
/// With `initial` set, the actor is created from that state (a new saga) instead of
/// being loaded from the store.
#[derive(Debug, Message)]
#[rtype(result = "Addr<SagaInstance>")]
pub struct Lookup {
    /// The saga.
    pub id: SagaId,
    /// The state of a saga being created.
    pub initial: Option<SagaState>,
}

/// An instance actor stopped on its own (idle).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Passivated {
    pub(crate) id: SagaId,
    pub(crate) addr: WeakAddr<SagaInstance>,
}

/// Routes to instance actors; holds only weak addresses so instances can passivate.
pub struct Registry {
    shared: Arc<Shared>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    instances: HashMap<SagaId, WeakAddr<SagaInstance>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("instances", &self.instances.len())
            .field("arbiters", &self.arbiters.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry placing instances round-robin on `arbiters` (one per core).
    pub(crate) fn new(shared: Arc<Shared>, arbiters: Vec<ArbiterHandle>) -> Self {
        Registry {
            shared,
            arbiters,
            next_arbiter: 0,
            instances: HashMap::new(),
        }
    }

    fn alive(&self, id: &SagaId) -> Option<Addr<SagaInstance>> {
        self.instances
            .get(id)
            .and_then(WeakAddr::upgrade)
            .filter(Addr::connected)
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A large mailbox: every reply and start goes through here (handled in O(1)).
        ctx.set_mailbox_capacity(65_536);
        ctx.run_interval(SWEEP_INTERVAL, |act, _| {
            act.instances
                .retain(|_, w| w.upgrade().is_some_and(|a| a.connected()));
        });
    }
}

impl Handler<Lookup> for Registry {
    type Result = MessageResult<Lookup>;

    fn handle(&mut self, msg: Lookup, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(addr) = self.alive(&msg.id) {
            return MessageResult(addr);
        }
        if self.instances.contains_key(&msg.id) {
            // There was an actor and it is gone without passivating: it crashed.
            RuntimeStats::incr(&self.shared.stats.reactivations);
            debug!(saga.id = %msg.id, "instance actor found dead: re-activating from the store");
        }
        let shared = Arc::clone(&self.shared);
        let registry = ctx.address();
        let id = msg.id;
        let initial = msg.initial;
        let make =
            move |_: &mut Context<SagaInstance>| SagaInstance::new(id, shared, registry, initial);
        let addr = if self.arbiters.is_empty() {
            Supervisor::start(make)
        } else {
            let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
            self.next_arbiter = self.next_arbiter.wrapping_add(1);
            Supervisor::start_in_arbiter(arbiter, make)
        };
        self.instances.insert(msg.id, addr.downgrade());
        MessageResult(addr)
    }
}

/// Lets every live actor of some partitions go (this node handed them over).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReleasePartition {
    /// The partitions.
    pub partitions: Vec<u32>,
}

impl Handler<ReleasePartition> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ReleasePartition, _: &mut Context<Self>) {
        let ownership = &self.shared.ownership;
        for (id, weak) in &self.instances {
            if msg.partitions.contains(&ownership.partition_of(id))
                && let Some(addr) = weak.upgrade()
            {
                addr.do_send(super::instance::Release);
            }
        }
    }
}

impl Handler<Passivated> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Passivated, _: &mut Context<Self>) {
        // Only forget the entry if it is still that actor (a new one may have replaced it).
        let same = self
            .instances
            .get(&msg.id)
            .and_then(WeakAddr::upgrade)
            .zip(msg.addr.upgrade())
            .is_some_and(|(a, b)| a == b);
        if same {
            self.instances.remove(&msg.id);
        }
    }
}
