//! The checkout saga's own unit tests, on the test kit (`skald_core::testing::SagaTest`,
//! re-exported as `skald::testing`): every path through the definition, with virtual
//! time; no actors, no store, no bus, no sleeps.

use std::time::Duration;

use serde_json::json;
use skald_core::machine::{EventKind, SagaStatus};
use skald_core::testing::SagaTest;
use skald_sagas::checkout::{Checkout, CheckoutTiming, LineItem, checkout_definition};

fn order() -> Checkout {
    Checkout::new(
        "order-1",
        "alice",
        vec![LineItem {
            sku: "tea".into(),
            quantity: 2,
        }],
        1_250,
    )
}

fn start() -> SagaTest<Checkout> {
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    SagaTest::start(&checkout, order())
}

/// Reserve and charge succeed; returns the test at the shipping step.
fn reserved_and_charged(t: &mut SagaTest<Checkout>) {
    let c = t.expect_action("reserve_inventory");
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    let c = t.expect_action("charge_payment");
    assert_eq!(c.payload()["amount_cents"], 1_250);
    t.succeed(&c, json!({ "payment_id": "p-1" }));
}

#[test]
fn happy_path() {
    let mut t = start();
    reserved_and_charged(&mut t);
    let c = t.expect_action("ship_order");
    assert_eq!(c.payload()["items"][0]["sku"], "tea");
    t.succeed(&c, json!({ "shipment_id": "s-1" }));
    assert_eq!(t.status(), SagaStatus::Completed);
    let data = t.data();
    assert_eq!(data.reservation_id.as_deref(), Some("r-1"));
    assert_eq!(data.payment_id.as_deref(), Some("p-1"));
    assert_eq!(data.shipment_id.as_deref(), Some("s-1"));
    t.expect_no_command();
    assert_eq!(t.now(), Duration::ZERO, "no time passed");
}

#[test]
fn a_declined_card_releases_the_reservation_and_refunds_nothing() {
    let mut t = start();
    let c = t.expect_action("reserve_inventory");
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    let c = t.expect_action("charge_payment");
    t.fail(&c, "card_declined", false);
    let c = t.expect_compensation("reserve_inventory");
    assert_eq!(c.payload()["reservation_id"], "r-1");
    t.succeed(&c, json!(null));
    assert_eq!(t.status(), SagaStatus::Compensated);
    t.expect_no_command();
}

#[test]
fn a_flaky_charge_is_retried_after_its_backoff_under_one_key() {
    let mut t = start();
    let c = t.expect_action("reserve_inventory");
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    let first = t.expect_action("charge_payment");
    t.fail(&first, "gateway_busy", true);
    t.expect_no_command();
    // No jitter in the test kit: the backoff is the full cap, 50 ms, then 100 ms.
    t.advance(Duration::from_millis(49));
    t.expect_no_command();
    t.advance(Duration::from_millis(1));
    let second = t.expect_action("charge_payment");
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.idempotency_key(), first.idempotency_key());
    t.fail(&second, "gateway_busy", true);
    assert_eq!(t.advance_to_next_wakeup(), Some(Duration::from_millis(100)));
    let third = t.expect_action("charge_payment");
    assert_eq!(third.attempt(), 3);
    t.succeed(&third, json!({ "payment_id": "p-1" }));
    let c = t.expect_action("ship_order");
    t.succeed(&c, json!({ "shipment_id": "s-1" }));
    assert_eq!(t.status(), SagaStatus::Completed);
}

#[test]
fn a_timed_out_charge_is_sent_again_as_attempt_two() {
    let mut t = start();
    let c = t.expect_action("reserve_inventory");
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    let first = t.expect_action("charge_payment");
    assert_eq!(first.deadline(), Duration::from_secs(10));
    // The 10 s deadline, then the 50 ms backoff, both inside 11 s.
    t.advance(Duration::from_secs(11));
    let second = t.expect_action("charge_payment");
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.deadline(), Duration::from_millis(20_050));
    assert!(t.events().contains(&EventKind::RetryScheduled));
    t.succeed(&second, json!({ "payment_id": "p-1" }));
    assert_eq!(t.expect_action("ship_order").attempt(), 1);
}

#[test]
fn a_charge_whose_every_attempt_timed_out_is_refunded_in_doubt() {
    let mut t = start();
    let c = t.expect_action("reserve_inventory");
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    for attempt in 1..=5 {
        let c = t.expect_action("charge_payment");
        assert_eq!(c.attempt(), attempt);
        t.advance_to_next_wakeup().expect("the reply deadline");
        if attempt < 5 {
            t.advance_to_next_wakeup().expect("the backoff");
        }
    }
    // Nobody knows whether the card was charged: refund by the action's key, then
    // release. The saga must not end `compensated` around a charge.
    let refund = t.expect_compensation("charge_payment");
    assert!(refund.in_doubt());
    assert_eq!(refund.payload()["payment_id"], json!(null));
    t.succeed(&refund, json!(null));
    let release = t.expect_compensation("reserve_inventory");
    t.succeed(&release, json!(null));
    assert_eq!(t.status(), SagaStatus::Compensated);
}

#[test]
fn a_shipment_whose_every_attempt_timed_out_is_dead_lettered_in_doubt() {
    let mut t = start();
    reserved_and_charged(&mut t);
    for _ in 1..=5 {
        t.expect_action("ship_order");
        t.advance(Duration::from_secs(60));
    }
    // Shipping has no compensation: an operator decides.
    assert_eq!(t.status(), SagaStatus::Failed);
    let dl = t.dead_letter().expect("dead-lettered");
    assert!(dl.in_doubt);
    assert_eq!(dl.step_name.as_str(), "ship_order");
    t.expect_no_command();
}

#[test]
fn a_cancel_while_the_charge_is_in_flight_waits_for_it_then_refunds() {
    let mut t = start();
    let c = t.expect_action("reserve_inventory");
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    let charge = t.expect_action("charge_payment");
    t.cancel("customer changed their mind");
    t.expect_no_command();
    assert!(t.try_cancel("again").is_err(), "one cancel at a time");
    t.succeed(&charge, json!({ "payment_id": "p-1" }));
    let refund = t.expect_compensation("charge_payment");
    assert_eq!(refund.payload()["payment_id"], "p-1");
    t.succeed(&refund, json!(null));
    let release = t.expect_compensation("reserve_inventory");
    t.succeed(&release, json!(null));
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert!(t.events().contains(&EventKind::Cancelled));
}

#[test]
fn a_failing_refund_is_retried_until_it_succeeds() {
    let mut t = start();
    reserved_and_charged(&mut t);
    let ship = t.expect_action("ship_order");
    t.fail(&ship, "address_invalid", false);
    let refund = t.expect_compensation("charge_payment");
    t.fail(&refund, "gateway_busy", true);
    t.advance_to_next_wakeup().expect("the backoff");
    let again = t.expect_compensation("charge_payment");
    assert_eq!(again.attempt(), 2);
    assert_eq!(again.idempotency_key(), refund.idempotency_key());
    t.succeed(&again, json!(null));
    let release = t.expect_compensation("reserve_inventory");
    t.succeed(&release, json!(null));
    assert_eq!(t.status(), SagaStatus::Compensated);
}

#[test]
fn a_refund_that_cannot_be_done_is_dead_lettered_and_re_driven() {
    let mut t = start();
    reserved_and_charged(&mut t);
    let ship = t.expect_action("ship_order");
    t.fail(&ship, "address_invalid", false);
    let refund = t.expect_compensation("charge_payment");
    t.fail(&refund, "account_closed", false);
    assert_eq!(t.status(), SagaStatus::Failed);
    let dl = t.dead_letter().expect("dead-lettered");
    assert_eq!(dl.step_name.as_str(), "charge_payment");
    assert_eq!(dl.error.code, "account_closed");
    t.expect_no_command();
    // An operator fixed the account and re-drives: the refund goes out again.
    t.redrive();
    let again = t.expect_compensation("charge_payment");
    assert_eq!(again.attempt(), 2);
    t.succeed(&again, json!(null));
    let release = t.expect_compensation("reserve_inventory");
    t.succeed(&release, json!(null));
    assert_eq!(t.status(), SagaStatus::Compensated);
}

#[test]
fn a_late_duplicate_success_changes_nothing() {
    let mut t = start();
    let c = t.expect_action("reserve_inventory");
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    let err = t
        .try_succeed(&c, json!({ "reservation_id": "r-2" }))
        .expect_err("a duplicate");
    assert!(err.is_ignorable(), "{err}");
    assert_eq!(t.data().reservation_id.as_deref(), Some("r-1"));
}
