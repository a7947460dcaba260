//! Simulated inventory, payment and shipping services for the checkout saga.
//!
//! Each keeps its records (reservations, charges, shipments) in a [`Ledger`], keyed by
//! the action's idempotency key, so a repeated command changes nothing and returns the
//! same result, and a compensation undoes by the action's key (`Skald-Action-Key`): its
//! payload lacks the reservation or payment id when the action's outcome was unknown.
//! Serve them through the participant helper with a fence
//! ([`skald_runtime::participant::ParticipantOptions::fence`]): it refuses an action whose
//! compensation came first and answers repeated keys from its record.
//!
//! Failures are seeded, so a run is reproducible:
//! - a payment is declined (permanent failure) for a fraction `decline_rate` of orders,
//!   decided by the order id;
//! - any command fails retryably (before doing anything) for a fraction `flaky_rate` of
//!   attempts, decided by the idempotency key and the attempt number, so a retry can
//!   succeed;
//! - for a fraction `late_rate` of orders, the reserve or the charge (drawn per order) is
//!   applied at once but every answer for it is held back for `late_hold` after its first
//!   delivery ([`SimServices::hold_reply`]): skald's whole retry budget passes without an
//!   answer, the step is in doubt, and its compensation must undo it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use skald_runtime::ids::{CommandKind, SagaId};
use skald_runtime::machine::StepError;
use skald_runtime::participant::{self, Fence, ParticipantHandle, ParticipantOptions};
use skald_runtime::ports::{Bus, BusError};
use skald_runtime::wire::{IncomingCommand, Outcome};

use crate::checkout::{
    ChargePayment, Charged, LineItem, RefundPayment, ReleaseInventory, ReserveInventory, Reserved,
    SagaRecords, ShipOrder, Shipped, subjects,
};

/// A ledger failure (the service answers it as a retryable failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger: {0}")]
pub struct LedgerError(pub String);

/// Where the simulated services keep their records. Every operation is idempotent per
/// `key` (the command's idempotency key).
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Holds the items; returns the reservation id (the same one for a repeated key).
    async fn reserve(
        &self,
        key: &str,
        saga: SagaId,
        order_id: &str,
        items: &[LineItem],
    ) -> Result<String, LedgerError>;
    /// Releases the reservation made by the action with idempotency key `action_key`
    /// (no-op if unknown or already released).
    async fn release(&self, action_key: &str, saga: SagaId) -> Result<(), LedgerError>;
    /// Charges; returns the payment id (the same one for a repeated key).
    async fn charge(
        &self,
        key: &str,
        saga: SagaId,
        order_id: &str,
        amount_cents: u64,
    ) -> Result<String, LedgerError>;
    /// Refunds the charge made by the action with idempotency key `action_key` (no-op if
    /// unknown or already refunded).
    async fn refund(&self, action_key: &str, saga: SagaId) -> Result<(), LedgerError>;
    /// Ships; returns the shipment id (the same one for a repeated key).
    async fn ship(&self, key: &str, saga: SagaId, order_id: &str) -> Result<String, LedgerError>;
    /// Every saga's records.
    async fn records(&self) -> Result<HashMap<SagaId, SagaRecords>, LedgerError>;
}

/// Derives a stable record id from an idempotency key.
pub fn record_id(prefix: &str, key: &str) -> String {
    format!("{prefix}-{:016x}", fnv(key.as_bytes(), 0))
}

fn fnv(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finaliser: spreads FNV's weak low bits.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A deterministic draw in `[0, 1)` from a seed and some parts.
fn draw(seed: u64, parts: &[&str]) -> f64 {
    let joined = parts.join("\u{1f}");
    (fnv(joined.as_bytes(), seed) >> 11) as f64 / (1u64 << 53) as f64
}

/// Failure behaviour of the simulated services.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// Seed of every draw.
    pub seed: u64,
    /// Fraction of orders whose payment is declined. Default 0.1.
    pub decline_rate: f64,
    /// Fraction of attempts that fail retryably. Default 0.05.
    pub flaky_rate: f64,
    /// Fraction of orders whose reserve or charge answers late (see [`SimServices`]).
    /// Default 0.
    pub late_rate: f64,
    /// How long a late step's answers are held after its first delivery: longer than
    /// skald's whole retry budget for the step. Default 5 s.
    pub late_hold: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 42,
            decline_rate: 0.1,
            flaky_rate: 0.05,
            late_rate: 0.0,
            late_hold: Duration::from_secs(5),
        }
    }
}

impl SimConfig {
    /// Whether the order's payment will be declined.
    pub fn declines(&self, order_id: &str) -> bool {
        draw(self.seed, &["decline", order_id]) < self.decline_rate
    }

    /// Whether this attempt fails retryably.
    pub fn flakes(&self, idempotency_key: &str, attempt: u32) -> bool {
        draw(self.seed, &["flaky", idempotency_key, &attempt.to_string()]) < self.flaky_rate
    }

    /// The subject of the order's step that answers late, if any: the reserve or the
    /// charge, drawn per order.
    pub fn late_subject(&self, order_id: &str) -> Option<&'static str> {
        if draw(self.seed, &["late", order_id]) >= self.late_rate {
            return None;
        }
        Some(if draw(self.seed, &["late-step", order_id]) < 0.5 {
            subjects::RESERVE
        } else {
            subjects::CHARGE
        })
    }
}

/// The three simulated services behind one command handler.
#[derive(Clone)]
pub struct SimServices {
    ledger: Arc<dyn Ledger>,
    config: SimConfig,
    /// When each late step's first delivery arrived (idempotency key -> instant).
    // A std mutex: short critical sections, no await inside.
    late_since: Arc<Mutex<HashMap<String, Instant>>>,
}

impl std::fmt::Debug for SimServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimServices")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn decode<T: DeserializeOwned>(cmd: &IncomingCommand) -> Result<T, Outcome> {
    serde_json::from_value(cmd.payload.clone()).map_err(|e| {
        Outcome::Failure(StepError::new(
            "bad_request",
            format!("payload of {}: {e}", cmd.subject),
        ))
    })
}

fn unavailable(e: LedgerError) -> Outcome {
    Outcome::Retryable(StepError::new("unavailable", e.to_string()))
}

impl SimServices {
    /// The services over `ledger`.
    pub fn new(ledger: Arc<dyn Ledger>, config: SimConfig) -> Self {
        SimServices {
            ledger,
            config,
            late_since: Arc::default(),
        }
    }

    /// How long to hold the answer to `cmd` (for the participant helper's
    /// `ParticipantOptions::hold_reply`): for an action of a late step, until `late_hold`
    /// after its key was first seen, so every attempt of it goes unanswered through
    /// skald's whole retry budget; `None` for everything else.
    pub fn hold_reply(&self, cmd: &IncomingCommand) -> Option<Duration> {
        if self.config.late_rate <= 0.0 || cmd.envelope.kind != CommandKind::Action {
            return None;
        }
        let order_id = cmd.payload.get("order_id")?.as_str()?;
        if self.config.late_subject(order_id) != Some(cmd.subject.as_str()) {
            return None;
        }
        let now = Instant::now();
        let mut since = self.late_since.lock().ok()?;
        if since.len() >= 4_096 {
            // Bounded: a key whose hold ended long ago is answered at once anyway.
            let hold = self.config.late_hold;
            since.retain(|_, first| now.duration_since(*first) < hold * 2);
        }
        let first = *since
            .entry(cmd.envelope.idempotency_key.clone())
            .or_insert(now);
        (first + self.config.late_hold).checked_duration_since(now)
    }

    /// Which services exist, with the subject filter each consumes.
    pub fn services() -> [(&'static str, &'static str); 3] {
        [
            ("inventory", "skald.cmd.inventory.>"),
            ("payment", "skald.cmd.payment.>"),
            ("shipping", "skald.cmd.shipping.>"),
        ]
    }

    /// Serves the three services on `bus` (one consumer group each, `concurrency`
    /// commands at a time per service), behind `fence`, with late answers held back per
    /// [`SimServices::hold_reply`].
    pub async fn serve(
        &self,
        bus: Arc<dyn Bus>,
        fence: Arc<dyn Fence>,
        concurrency: usize,
    ) -> Result<Vec<ParticipantHandle>, BusError> {
        let mut handles = Vec::new();
        for (name, subject) in SimServices::services() {
            handles.push(
                self.serve_one(
                    Arc::clone(&bus),
                    name,
                    subject,
                    Arc::clone(&fence),
                    concurrency,
                )
                .await?,
            );
        }
        Ok(handles)
    }

    /// Serves one of the services (`inventory`, `payment` or `shipping`, with its subject
    /// filter from [`SimServices::services`]) behind `fence`.
    pub async fn serve_one(
        &self,
        bus: Arc<dyn Bus>,
        name: &str,
        subject: &str,
        fence: Arc<dyn Fence>,
        concurrency: usize,
    ) -> Result<ParticipantHandle, BusError> {
        let held = self.clone();
        let options = ParticipantOptions {
            concurrency: Some(concurrency),
            fence: Some(fence),
            hold_reply: Some(Arc::new(move |cmd: &IncomingCommand| held.hold_reply(cmd))),
            ..ParticipantOptions::default()
        };
        let services = self.clone();
        participant::serve_with(bus, subject, name, options, move |cmd| {
            let services = services.clone();
            async move { services.handle(cmd).await }
        })
        .await
    }

    /// Handles one command of any of the three services.
    pub async fn handle(&self, cmd: IncomingCommand) -> Outcome {
        let key = cmd.envelope.idempotency_key.as_str();
        if self.config.flakes(key, cmd.envelope.attempt) {
            return Outcome::Retryable(StepError::new(
                "unavailable",
                "simulated transient failure",
            ));
        }
        match self.dispatch(&cmd).await {
            Ok(o) | Err(o) => o,
        }
    }

    async fn dispatch(&self, cmd: &IncomingCommand) -> Result<Outcome, Outcome> {
        let key = cmd.envelope.idempotency_key.as_str();
        let saga = cmd.envelope.saga_id;
        let ok = |v: serde_json::Value| Ok(Outcome::Success(v));
        match cmd.subject.as_str() {
            subjects::RESERVE => {
                let p: ReserveInventory = decode(cmd)?;
                let id = self
                    .ledger
                    .reserve(key, saga, &p.order_id, &p.items)
                    .await
                    .map_err(unavailable)?;
                ok(serde_json::json!(Reserved { reservation_id: id }))
            }
            subjects::RELEASE => {
                // Undo by the action's key: the payload's reservation id is absent when
                // the reserve's outcome was unknown.
                let _: ReleaseInventory = decode(cmd)?;
                self.ledger
                    .release(&cmd.action_key(), saga)
                    .await
                    .map_err(unavailable)?;
                ok(serde_json::Value::Null)
            }
            subjects::CHARGE => {
                let p: ChargePayment = decode(cmd)?;
                if self.config.declines(&p.order_id) {
                    return Err(Outcome::Failure(StepError::new(
                        "card_declined",
                        "the card was declined",
                    )));
                }
                let id = self
                    .ledger
                    .charge(key, saga, &p.order_id, p.amount_cents)
                    .await
                    .map_err(unavailable)?;
                ok(serde_json::json!(Charged { payment_id: id }))
            }
            subjects::REFUND => {
                let _: RefundPayment = decode(cmd)?;
                self.ledger
                    .refund(&cmd.action_key(), saga)
                    .await
                    .map_err(unavailable)?;
                ok(serde_json::Value::Null)
            }
            subjects::SHIP => {
                let p: ShipOrder = decode(cmd)?;
                let id = self
                    .ledger
                    .ship(key, saga, &p.order_id)
                    .await
                    .map_err(unavailable)?;
                ok(serde_json::json!(Shipped { shipment_id: id }))
            }
            other => Err(Outcome::Failure(StepError::new(
                "unknown_command",
                format!("no simulated service handles {other}"),
            ))),
        }
    }
}

#[derive(Debug, Default)]
struct Book {
    /// key -> (saga, reservation id, released)
    reservations: HashMap<String, (SagaId, String, bool)>,
    /// key -> (saga, payment id, refunded)
    charges: HashMap<String, (SagaId, String, bool)>,
    /// key -> (saga, shipment id)
    shipments: HashMap<String, (SagaId, String)>,
}

/// An in-memory [`Ledger`] (tests; records die with the process).
#[derive(Debug, Clone, Default)]
pub struct MemoryLedger {
    // A std mutex: short critical sections, no await inside.
    book: Arc<Mutex<Book>>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        MemoryLedger::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Book) -> T) -> Result<T, LedgerError> {
        let mut book = self
            .book
            .lock()
            .map_err(|_| LedgerError("lock poisoned".into()))?;
        Ok(f(&mut book))
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn reserve(
        &self,
        key: &str,
        saga: SagaId,
        _order_id: &str,
        _items: &[LineItem],
    ) -> Result<String, LedgerError> {
        self.with(|b| {
            b.reservations
                .entry(key.to_owned())
                .or_insert_with(|| (saga, record_id("rsv", key), false))
                .1
                .clone()
        })
    }

    async fn release(&self, action_key: &str, _saga: SagaId) -> Result<(), LedgerError> {
        self.with(|b| {
            if let Some(r) = b.reservations.get_mut(action_key) {
                r.2 = true;
            }
        })
    }

    async fn charge(
        &self,
        key: &str,
        saga: SagaId,
        _order_id: &str,
        _amount: u64,
    ) -> Result<String, LedgerError> {
        self.with(|b| {
            b.charges
                .entry(key.to_owned())
                .or_insert_with(|| (saga, record_id("pay", key), false))
                .1
                .clone()
        })
    }

    async fn refund(&self, action_key: &str, _saga: SagaId) -> Result<(), LedgerError> {
        self.with(|b| {
            if let Some(c) = b.charges.get_mut(action_key) {
                c.2 = true;
            }
        })
    }

    async fn ship(&self, key: &str, saga: SagaId, _order_id: &str) -> Result<String, LedgerError> {
        self.with(|b| {
            b.shipments
                .entry(key.to_owned())
                .or_insert_with(|| (saga, record_id("shp", key)))
                .1
                .clone()
        })
    }

    async fn records(&self) -> Result<HashMap<SagaId, SagaRecords>, LedgerError> {
        self.with(|b| {
            let mut out: HashMap<SagaId, SagaRecords> = HashMap::new();
            for (saga, _, released) in b.reservations.values() {
                out.entry(*saga).or_default().add_reservation(*released);
            }
            for (saga, _, refunded) in b.charges.values() {
                out.entry(*saga).or_default().add_charge(*refunded);
            }
            for (saga, _) in b.shipments.values() {
                out.entry(*saga).or_default().add_shipment();
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_seeded_and_spread() {
        let c = SimConfig {
            seed: 7,
            decline_rate: 0.1,
            flaky_rate: 0.05,
            ..SimConfig::default()
        };
        let declined = (0..10_000)
            .filter(|i| c.declines(&format!("order-{i}")))
            .count();
        assert!((800..1200).contains(&declined), "{declined}");
        assert_eq!(c.declines("order-1"), c.declines("order-1"));
        let flaky = (0..10_000).filter(|i| c.flakes("k", *i)).count();
        assert!((350..650).contains(&flaky), "{flaky}");
        let other = SimConfig { seed: 8, ..c };
        let differs =
            (0..1000).any(|i| c.declines(&format!("o{i}")) != other.declines(&format!("o{i}")));
        assert!(differs, "the seed changes the draws");
    }

    #[tokio::test]
    async fn ledger_is_idempotent_per_key() {
        let l = MemoryLedger::new();
        let s = SagaId::new();
        let a = l.reserve("k1", s, "o", &[]).await.expect("reserve");
        let b = l.reserve("k1", s, "o", &[]).await.expect("reserve");
        assert_eq!(a, b);
        l.release("k1", s).await.expect("release");
        l.release("k1", s).await.expect("release again");
        l.release("unknown", s).await.expect("release of nothing");
        l.charge("k3", s, "o", 10).await.expect("charge");
        l.refund("k3", s).await.expect("refund");
        let r = l.records().await.expect("records")[&s];
        assert_eq!(
            r,
            SagaRecords {
                reservations_held: 0,
                reservations_released: 1,
                charges_live: 0,
                charges_refunded: 1,
                shipments: 0
            }
        );
    }
}
