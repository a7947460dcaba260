//! The checkout saga: reserve inventory, charge payment, ship the order.
//!
//! If the payment is declined, the reservation is released; if shipping fails for
//! good, the payment is refunded and the reservation released (in that order).

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skald_core::definition::{DefinitionError, SagaDefinition, Step};
use skald_core::ids::SagaId;
use skald_core::machine::SagaStatus;
use skald_core::retry::RetryPolicy;

/// The saga type name.
pub const SAGA_TYPE: &str = "checkout";

/// Step names.
pub mod steps {
    /// Reserve the items (compensation: release them).
    pub const RESERVE_INVENTORY: &str = "reserve_inventory";
    /// Charge the customer (compensation: refund).
    pub const CHARGE_PAYMENT: &str = "charge_payment";
    /// Ship the order (last step: nothing to compensate).
    pub const SHIP_ORDER: &str = "ship_order";
}

/// Command subjects (`skald.cmd.<service>.<action>`).
pub mod subjects {
    /// Reserve inventory.
    pub const RESERVE: &str = "skald.cmd.inventory.reserve";
    /// Release a reservation.
    pub const RELEASE: &str = "skald.cmd.inventory.release";
    /// Charge a payment.
    pub const CHARGE: &str = "skald.cmd.payment.charge";
    /// Refund a payment.
    pub const REFUND: &str = "skald.cmd.payment.refund";
    /// Ship an order.
    pub const SHIP: &str = "skald.cmd.shipping.ship";
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// The checkout saga's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    /// The order.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// What is bought.
    pub items: Vec<LineItem>,
    /// How much, in cents.
    pub amount_cents: u64,
    /// Set when the inventory is reserved.
    pub reservation_id: Option<String>,
    /// Set when the payment is charged.
    pub payment_id: Option<String>,
    /// Set when the order is shipped.
    pub shipment_id: Option<String>,
}

impl Checkout {
    /// A new order with nothing done yet.
    pub fn new(
        order_id: impl Into<String>,
        customer_id: impl Into<String>,
        items: Vec<LineItem>,
        amount_cents: u64,
    ) -> Self {
        Checkout {
            order_id: order_id.into(),
            customer_id: customer_id.into(),
            items,
            amount_cents,
            reservation_id: None,
            payment_id: None,
            shipment_id: None,
        }
    }
}

/// `inventory.reserve` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveInventory {
    /// The order.
    pub order_id: String,
    /// What to reserve.
    pub items: Vec<LineItem>,
}

/// `inventory.reserve` success output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    /// The reservation.
    pub reservation_id: String,
}

/// `inventory.release` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInventory {
    /// The order.
    pub order_id: String,
    /// The reservation to release.
    pub reservation_id: Option<String>,
}

/// `payment.charge` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargePayment {
    /// The order.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// How much, in cents.
    pub amount_cents: u64,
}

/// `payment.charge` success output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charged {
    /// The payment.
    pub payment_id: String,
}

/// `payment.refund` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundPayment {
    /// The order.
    pub order_id: String,
    /// The payment to refund.
    pub payment_id: Option<String>,
    /// How much, in cents.
    pub amount_cents: u64,
}

/// `shipping.ship` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipOrder {
    /// The order.
    pub order_id: String,
    /// What to ship.
    pub items: Vec<LineItem>,
}

/// `shipping.ship` success output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipped {
    /// The shipment.
    pub shipment_id: String,
}

/// Timing of the checkout saga's steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckoutTiming {
    /// Retry policy of every action.
    pub retry: RetryPolicy,
    /// Retry policy of every compensation (more patient: undoing must not give up early).
    pub compensation_retry: RetryPolicy,
    /// Reply timeout of every attempt.
    pub timeout: Duration,
}

impl Default for CheckoutTiming {
    fn default() -> Self {
        CheckoutTiming {
            retry: RetryPolicy {
                max_attempts: 5,
                initial_delay: Duration::from_millis(50),
                multiplier: 2.0,
                max_delay: Duration::from_secs(2),
                jitter: 1.0,
            },
            compensation_retry: RetryPolicy {
                max_attempts: 10,
                initial_delay: Duration::from_millis(50),
                multiplier: 2.0,
                max_delay: Duration::from_secs(5),
                jitter: 1.0,
            },
            timeout: Duration::from_secs(10),
        }
    }
}

/// The checkout saga definition (version 1).
///
/// # Examples
///
/// ```
/// use skald_sagas::checkout::{checkout_definition, CheckoutTiming};
/// let def = checkout_definition(CheckoutTiming::default()).expect("valid");
/// assert_eq!(def.definition().steps().len(), 3);
/// ```
pub fn checkout_definition(
    timing: CheckoutTiming,
) -> Result<SagaDefinition<Checkout>, DefinitionError> {
    checkout_definition_named(
        timing,
        1,
        [
            steps::RESERVE_INVENTORY,
            steps::CHARGE_PAYMENT,
            steps::SHIP_ORDER,
        ],
    )
}

/// The checkout saga as version `version`, with its three steps named `names` (the
/// worked example of docs/versioning.md renames one in a new version).
pub fn checkout_definition_named(
    timing: CheckoutTiming,
    version: u32,
    names: [&str; 3],
) -> Result<SagaDefinition<Checkout>, DefinitionError> {
    let step = |name: &str| {
        Step::<Checkout>::new(name)
            .retry(timing.retry)
            .compensation_retry(timing.compensation_retry)
            .timeout(timing.timeout)
    };
    SagaDefinition::<Checkout>::builder(SAGA_TYPE, version)
        .step(
            step(names[0])
                .action(subjects::RESERVE, |c: &Checkout| ReserveInventory {
                    order_id: c.order_id.clone(),
                    items: c.items.clone(),
                })
                .on_success(|c: &mut Checkout, r: Reserved| {
                    c.reservation_id = Some(r.reservation_id)
                })
                .compensate(subjects::RELEASE, |c: &Checkout| ReleaseInventory {
                    order_id: c.order_id.clone(),
                    reservation_id: c.reservation_id.clone(),
                }),
        )
        .step(
            step(names[1])
                .action(subjects::CHARGE, |c: &Checkout| ChargePayment {
                    order_id: c.order_id.clone(),
                    customer_id: c.customer_id.clone(),
                    amount_cents: c.amount_cents,
                })
                .on_success(|c: &mut Checkout, r: Charged| c.payment_id = Some(r.payment_id))
                .compensate(subjects::REFUND, |c: &Checkout| RefundPayment {
                    order_id: c.order_id.clone(),
                    payment_id: c.payment_id.clone(),
                    amount_cents: c.amount_cents,
                }),
        )
        .step(
            step(names[2])
                .action(subjects::SHIP, |c: &Checkout| ShipOrder {
                    order_id: c.order_id.clone(),
                    items: c.items.clone(),
                })
                .on_success(|c: &mut Checkout, r: Shipped| c.shipment_id = Some(r.shipment_id)),
        )
        .build()
}

/// What the simulated services hold for one saga (from their own records).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaRecords {
    /// Reservations still held.
    pub reservations_held: u32,
    /// Reservations released.
    pub reservations_released: u32,
    /// Charges not refunded.
    pub charges_live: u32,
    /// Charges refunded.
    pub charges_refunded: u32,
    /// Shipments.
    pub shipments: u32,
}

impl SagaRecords {
    /// Counts a reservation, held or released.
    pub fn add_reservation(&mut self, released: bool) {
        if released {
            self.reservations_released += 1;
        } else {
            self.reservations_held += 1;
        }
    }

    /// Counts a charge, live or refunded.
    pub fn add_charge(&mut self, refunded: bool) {
        if refunded {
            self.charges_refunded += 1;
        } else {
            self.charges_live += 1;
        }
    }

    /// Counts a shipment.
    pub fn add_shipment(&mut self) {
        self.shipments += 1;
    }
}

/// The result of the consistency check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConsistencyReport {
    /// Sagas checked (completed or compensated).
    pub checked: usize,
    /// Sagas skipped (unfinished or dead-lettered).
    pub skipped: usize,
    /// One line per violation.
    pub violations: Vec<String>,
}

impl ConsistencyReport {
    /// No violation.
    pub fn is_consistent(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Checks the services' records against the sagas' outcomes:
/// a completed saga holds exactly one reservation, one charge and one shipment; a
/// compensated one holds no live reservation, no unrefunded charge and no shipment.
pub fn check_consistency(
    sagas: &[(SagaId, SagaStatus)],
    records: &HashMap<SagaId, SagaRecords>,
) -> ConsistencyReport {
    let mut report = ConsistencyReport::default();
    for (id, status) in sagas {
        let r = records.get(id).copied().unwrap_or_default();
        let problem = match status {
            SagaStatus::Completed => {
                let ok = r.reservations_held == 1
                    && r.reservations_released == 0
                    && r.charges_live == 1
                    && r.charges_refunded == 0
                    && r.shipments == 1;
                (!ok).then(|| format!("completed saga {id} has {r:?}; expected exactly one reservation, charge and shipment"))
            }
            SagaStatus::Compensated => {
                let ok = r.reservations_held == 0
                    && r.charges_live == 0
                    && r.shipments == 0
                    && r.reservations_released <= 1
                    && r.charges_refunded <= 1;
                (!ok).then(|| format!("compensated saga {id} has {r:?}; expected nothing live"))
            }
            _ => {
                report.skipped += 1;
                continue;
            }
        };
        report.checked += 1;
        if let Some(p) = problem {
            report.violations.push(p);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_rules() {
        let (a, b, c, d) = (SagaId::new(), SagaId::new(), SagaId::new(), SagaId::new());
        let mut records = HashMap::new();
        records.insert(
            a,
            SagaRecords {
                reservations_held: 1,
                charges_live: 1,
                shipments: 1,
                ..Default::default()
            },
        );
        records.insert(
            b,
            SagaRecords {
                reservations_released: 1,
                charges_refunded: 1,
                ..Default::default()
            },
        );
        records.insert(
            c,
            SagaRecords {
                reservations_released: 1,
                charges_live: 1,
                ..Default::default()
            },
        );
        let report = check_consistency(
            &[
                (a, SagaStatus::Completed),
                (b, SagaStatus::Compensated),
                (c, SagaStatus::Compensated),
                (d, SagaStatus::Running),
            ],
            &records,
        );
        assert_eq!(report.checked, 3);
        assert_eq!(report.skipped, 1);
        assert_eq!(report.violations.len(), 1, "{report:?}");
        assert!(report.violations[0].contains(&c.to_string()));
    }

    #[test]
    fn definition_is_valid() {
        let def = checkout_definition(CheckoutTiming::default()).expect("valid");
        let d = def.definition();
        assert_eq!(d.steps().len(), 3);
        assert!(d.steps()[0].compensation().is_some());
        assert!(d.steps()[1].compensation().is_some());
        assert!(d.steps()[2].compensation().is_none());
    }
}
