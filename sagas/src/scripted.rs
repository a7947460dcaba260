//! Scripted checkout participants for demos and tests of the operator tools: what each
//! command gets is decided by the order id's prefix, so one run leaves a saga in every
//! state.
//!
//! - `ok-*`: every step succeeds (the charge after `charge_delay`, so steps 1 and 2 are
//!   apart in time);
//! - `decline-*`: the payment is declined; the reservation is released (`compensated`);
//! - `broken-*`: declined, and releasing the reservation fails permanently while
//!   [`Scripted::set_release_broken`] is on (`failed`, dead-lettered, until re-driven
//!   with it off);
//! - `hang-*`: shipping never answers (the saga keeps waiting: `running`, then stuck);
//! - `slow-*`: the charge is held until [`Scripted::release_slow_charges`], then
//!   succeeds (an action in flight, to cancel: the cancel waits for it, then refunds).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use skald_runtime::machine::StepError;
use skald_runtime::wire::{IncomingCommand, Outcome};

use crate::checkout::subjects;

/// The scripted services (inventory, payment and shipping in one). Cheap to clone;
/// clones share the switch.
#[derive(Debug, Clone)]
pub struct Scripted {
    release_broken: Arc<AtomicBool>,
    charge_delay: Duration,
    slow_gate: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Scripted {
    /// Releases of `broken-*` orders fail until switched off; charges of `ok-*` orders
    /// take `charge_delay`.
    pub fn new(charge_delay: Duration) -> Scripted {
        Scripted {
            release_broken: Arc::new(AtomicBool::new(true)),
            charge_delay,
            slow_gate: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Lets the held charges of `slow-*` orders (and every later one) succeed.
    pub fn release_slow_charges(&self) {
        self.slow_gate.send_replace(true);
    }

    /// Breaks (`true`) or mends (`false`) the release of `broken-*` orders.
    pub fn set_release_broken(&self, broken: bool) {
        self.release_broken.store(broken, Ordering::SeqCst);
    }

    /// Answers one command; never returns for the shipping of a `hang-*` order.
    pub async fn handle(&self, cmd: IncomingCommand) -> Outcome {
        let order = cmd.payload["order_id"].as_str().unwrap_or("").to_owned();
        let declined = order.starts_with("decline-") || order.starts_with("broken-");
        match cmd.subject.as_str() {
            subjects::RESERVE => {
                Outcome::Success(json!({ "reservation_id": format!("rsv-{order}") }))
            }
            subjects::RELEASE
                if order.starts_with("broken-") && self.release_broken.load(Ordering::SeqCst) =>
            {
                Outcome::Failure(StepError::new(
                    "warehouse_offline",
                    "the warehouse refused the release",
                ))
            }
            subjects::CHARGE if declined => {
                Outcome::Failure(StepError::new("card_declined", "the card was declined"))
            }
            subjects::CHARGE if order.starts_with("slow-") => {
                let mut open = self.slow_gate.subscribe();
                // Err only if the sender is gone, which this struct holds.
                let _ = open.wait_for(|open| *open).await;
                Outcome::Success(json!({ "payment_id": format!("pay-{order}") }))
            }
            subjects::CHARGE => {
                tokio::time::sleep(self.charge_delay).await;
                Outcome::Success(json!({ "payment_id": format!("pay-{order}") }))
            }
            subjects::SHIP if order.starts_with("hang-") => std::future::pending().await,
            subjects::SHIP => Outcome::Success(json!({ "shipment_id": format!("shp-{order}") })),
            // Release and refund of the others.
            _ => Outcome::Success(json!({})),
        }
    }
}
