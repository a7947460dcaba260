//! The checkout saga on both test kits of `skald::testing` (docs/testing.md copies its
//! examples from here):
//!
//! - `SagaTest`: the definition alone, on the pure machine;
//! - `TestRuntime`: a real runtime on the in-memory store and bus, a virtual clock, and
//!   scripted inventory, payment and shipping services answering over the bus.
//!
//! The saga's timeouts are 10 s an attempt (five attempts, with backoffs between them),
//! yet no test waits for any of it: the virtual clock jumps, and every wake-up on the
//! way fires at its own virtual time. A test takes about 10 ms (the twenty sagas at once,
//! a tenth of a second).
//!
//! (Here, not in `sagas/tests/`: the runtime harness lives in the facade, which has the
//! checkout crate as a dev-dependency already; the other way round would be a
//! dependency cycle, and would build the whole facade for the checkout crate's tests.)

use std::time::Duration;

use serde_json::json;
use skald::definition::SagaDefinition;
use skald::ids::CommandKind;
use skald::machine::SagaStatus;
use skald::testing::{Reply, SagaTest, TestRuntime};
use skald_sagas::checkout::{
    Checkout, CheckoutTiming, LineItem, Reserved, checkout_definition, subjects,
};

// ---------------------------------------------------------------------------------------
// The examples of docs/testing.md, whole.

#[test]
fn a_declined_card_releases_the_reservation() {
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let order = Checkout::new(
        "order-1",
        "alice",
        vec![LineItem {
            sku: "tea".into(),
            quantity: 2,
        }],
        1_250,
    );

    let mut t = SagaTest::start(&checkout, order); // virtual clock at 0
    let c = t.expect_action("reserve_inventory");
    assert_eq!(c.attempt(), 1);
    t.succeed(&c, json!({ "reservation_id": "r-1" }));
    let c = t.expect_action("charge_payment");
    t.fail(&c, "card_declined", false); // permanent: compensate
    let c = t.expect_compensation("reserve_inventory");
    assert_eq!(c.payload()["reservation_id"], "r-1");
    t.succeed(&c, json!(null));
    assert_eq!(t.status(), SagaStatus::Compensated);
    t.expect_no_command();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_that_never_answers_is_refunded_in_doubt() {
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let t = TestRuntime::builder()
        .register(&checkout)
        .start()
        .await
        .expect("started");
    t.on(subjects::RESERVE, |_| {
        Reply::success(json!({ "reservation_id": "r-1" }))
    })
    .on(subjects::CHARGE, |_| Reply::no_reply()) // the payment gateway is down
    .on(subjects::REFUND, |_| Reply::success(json!(null)))
    .on(subjects::RELEASE, |_| Reply::success(json!(null)));
    let order = Checkout::new(
        "order-1",
        "alice",
        vec![LineItem {
            sku: "tea".into(),
            quantity: 2,
        }],
        1_250,
    );

    // Reserved, and the charge sent: the saga waits for its answer.
    let saga = t.start(&checkout, &order).await.expect("started");
    assert_eq!(saga.status().await.expect("status"), SagaStatus::Running);

    // Five attempts of 10 s each and the backoffs between them, in no time.
    t.advance(Duration::from_secs(60)).await;
    let charges: Vec<u128> = t
        .commands_on(subjects::CHARGE)
        .iter()
        .map(|c| c.received_at().as_millis())
        .collect();
    assert_eq!(charges, [0, 10_050, 20_150, 30_350, 40_750]);

    // Nobody knows whether the card was charged: refunded by the charge's key, then
    // the reservation released.
    let outcome = saga.state().await.expect("state");
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(outcome.in_doubt);
    let refund = &t.commands_on(subjects::REFUND)[0];
    assert!(refund.in_doubt());
    assert_eq!(refund.received_at(), Duration::from_millis(50_750));
    assert_eq!(t.commands_on(subjects::RELEASE).len(), 1);
}

// ---------------------------------------------------------------------------------------
// Every path of the checkout on the runtime harness.

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

/// The checkout on a fresh harness, with services that do what they are asked: each
/// test changes the script of the one it is about.
async fn harness() -> (TestRuntime, SagaDefinition<Checkout>) {
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let t = TestRuntime::builder()
        .register(&checkout)
        .start()
        .await
        .expect("the harness starts");
    t.on(subjects::RESERVE, |_| {
        Reply::success(Reserved {
            reservation_id: "r-1".into(),
        })
    })
    .on(subjects::CHARGE, |_| {
        Reply::success(json!({ "payment_id": "p-1" }))
    })
    .on(subjects::SHIP, |_| {
        Reply::success(json!({ "shipment_id": "s-1" }))
    })
    .on(subjects::REFUND, |_| Reply::success(json!(null)))
    .on(subjects::RELEASE, |_| Reply::success(json!(null)));
    (t, checkout)
}

/// What the services were sent: (subject, attempt), oldest first.
fn sent(t: &TestRuntime) -> Vec<(String, u32)> {
    t.commands()
        .iter()
        .map(|c| (c.subject().to_owned(), c.attempt()))
        .collect()
}

fn expected(list: &[(&str, u32)]) -> Vec<(String, u32)> {
    list.iter().map(|(s, a)| ((*s).to_owned(), *a)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path() {
    let (t, checkout) = harness().await;
    let saga = t.start(&checkout, &order()).await.expect("started");
    // Every service answered at once: done without time passing.
    let outcome = saga.state().await.expect("state");
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.data.reservation_id.as_deref(), Some("r-1"));
    assert_eq!(outcome.data.payment_id.as_deref(), Some("p-1"));
    assert_eq!(outcome.data.shipment_id.as_deref(), Some("s-1"));
    assert_eq!(
        sent(&t),
        expected(&[
            (subjects::RESERVE, 1),
            (subjects::CHARGE, 1),
            (subjects::SHIP, 1)
        ])
    );
    let charge = &t.commands_on(subjects::CHARGE)[0];
    assert_eq!(charge.payload()["amount_cents"], 1_250);
    assert_eq!(charge.deadline(), Duration::from_secs(10));
    assert_eq!(t.now(), Duration::ZERO);
    assert_eq!(t.next_wakeup().await, None);
    // The handle sees the same, as a caller would.
    let view = saga
        .outcome_within(Duration::from_secs(5))
        .await
        .expect("settled");
    assert!(view.is_completed());
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_is_compensated() {
    let (t, checkout) = harness().await;
    t.on(subjects::CHARGE, |_| Reply::fail("card_declined", false));
    let saga = t.start(&checkout, &order()).await.expect("started");
    let outcome = saga.state().await.expect("state");
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(!outcome.in_doubt);
    assert_eq!(
        outcome.failure.map(|f| f.code).as_deref(),
        Some("card_declined")
    );
    // Nothing to refund: the charge failed for good. The reservation is released.
    assert_eq!(
        sent(&t),
        expected(&[
            (subjects::RESERVE, 1),
            (subjects::CHARGE, 1),
            (subjects::RELEASE, 1)
        ])
    );
    let release = &t.commands_on(subjects::RELEASE)[0];
    assert_eq!(release.kind(), CommandKind::Compensation);
    assert_eq!(release.payload()["reservation_id"], "r-1");
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_charge_is_retried_after_its_backoff() {
    let (t, checkout) = harness().await;
    // The gateway is busy twice, then charges.
    t.on(subjects::CHARGE, |c| match c.attempt() {
        1 | 2 => Reply::fail("gateway_busy", true),
        _ => Reply::success(json!({ "payment_id": "p-1" })),
    });
    let saga = t.start(&checkout, &order()).await.expect("started");
    assert_eq!(saga.status().await.expect("status"), SagaStatus::Running);
    // No jitter: the backoffs are the policy's caps, 50 ms then 100 ms.
    t.advance(Duration::from_millis(49)).await;
    assert_eq!(t.commands_on(subjects::CHARGE).len(), 1);
    t.advance(Duration::from_millis(1)).await;
    assert_eq!(t.commands_on(subjects::CHARGE).len(), 2);
    assert_eq!(
        t.advance_to_next_wakeup().await,
        Some(Duration::from_millis(100))
    );
    let charges = t.commands_on(subjects::CHARGE);
    let at: Vec<Duration> = charges.iter().map(|c| c.received_at()).collect();
    assert_eq!(at, [0, 50, 150].map(Duration::from_millis));
    assert!(
        charges
            .iter()
            .all(|c| c.idempotency_key() == charges[0].idempotency_key()),
        "one key for every attempt"
    );
    assert_eq!(saga.status().await.expect("status"), SagaStatus::Completed);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_timing_out_on_every_attempt_is_compensated_in_doubt() {
    let (t, checkout) = harness().await;
    t.on(subjects::CHARGE, |_| Reply::no_reply());
    let saga = t.start(&checkout, &order()).await.expect("started");
    // As far as it takes: every deadline and backoff, then the compensations.
    let outcome = t.outcome(&saga).await.expect("settled");
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(outcome.in_doubt);
    assert_eq!(outcome.failure.map(|f| f.code).as_deref(), Some("timeout"));
    assert_eq!(t.now(), Duration::from_millis(50_750));
    for c in t.commands_on(subjects::CHARGE) {
        assert_eq!(c.deadline(), c.received_at() + Duration::from_secs(10));
    }
    // The refund goes by the charge's key (no payment id is known), then the release.
    let refund = &t.commands_on(subjects::REFUND)[0];
    assert!(refund.in_doubt());
    assert_eq!(refund.payload()["payment_id"], json!(null));
    assert_eq!(
        sent(&t)[6..],
        expected(&[(subjects::REFUND, 1), (subjects::RELEASE, 1)])
    );
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipment_never_answered_is_dead_lettered_until_its_late_answer() {
    let (t, checkout) = harness().await;
    t.on(subjects::SHIP, |_| Reply::no_reply());
    let saga = t.start(&checkout, &order()).await.expect("started");
    // Shipping has no compensation: in doubt with nothing to undo it, the saga waits
    // for an operator.
    let outcome = t.outcome(&saga).await.expect("settled");
    assert_eq!(outcome.status, SagaStatus::Failed);
    assert!(outcome.in_doubt);
    let dead = outcome.dead_letter.expect("dead-lettered");
    assert_eq!(dead.step_name.as_str(), "ship_order");
    assert_eq!(t.commands_on(subjects::REFUND).len(), 0, "nothing undone");
    // The shipping service answers, late, for its first attempt: it did ship. That
    // settles the doubt without an operator.
    let first = t.commands_on(subjects::SHIP)[0].clone();
    t.reply(&first, Reply::success(json!({ "shipment_id": "s-1" })))
        .await;
    let outcome = saga.state().await.expect("state");
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.data.shipment_id.as_deref(), Some("s-1"));
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_the_charge_is_in_flight_waits_for_it_then_refunds() {
    let (t, checkout) = harness().await;
    t.on(subjects::CHARGE, |_| Reply::no_reply());
    let saga = t.start(&checkout, &order()).await.expect("started");
    t.advance(Duration::from_secs(3)).await;
    t.cancel(&saga, "customer changed their mind")
        .await
        .expect("cancelled");
    // The charge may be under way: the saga waits for its answer.
    assert_eq!(saga.status().await.expect("status"), SagaStatus::Running);
    assert_eq!(t.commands().len(), 2, "nothing sent since");
    // The payment service answers by hand: charged. So it is refunded.
    let charge = t.commands_on(subjects::CHARGE)[0].clone();
    t.reply(&charge, Reply::success(json!({ "payment_id": "p-1" })))
        .await;
    let outcome = saga.state().await.expect("state");
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(!outcome.in_doubt, "the charge's answer came");
    assert_eq!(
        outcome.failure.map(|f| f.code).as_deref(),
        Some("cancelled")
    );
    let refund = &t.commands_on(subjects::REFUND)[0];
    assert_eq!(refund.payload()["payment_id"], "p-1");
    assert_eq!(refund.received_at(), Duration::from_secs(3));
    assert_eq!(
        sent(&t),
        expected(&[
            (subjects::RESERVE, 1),
            (subjects::CHARGE, 1),
            (subjects::REFUND, 1),
            (subjects::RELEASE, 1)
        ])
    );
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "no registered saga sends commands on skald.cmd.payment.chrage")]
async fn a_script_for_a_subject_no_saga_uses_is_refused() {
    let (t, _) = harness().await;
    t.on("skald.cmd.payment.chrage", |_| Reply::no_reply());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_past_the_journal_window_settle_too() {
    // Past the window, a retry run's failures are not journaled one by one: the harness
    // sees them applied from the saga's state instead.
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let t = TestRuntime::builder()
        .register(&checkout)
        .options(|o| o.journal_retry_window = 1)
        .start()
        .await
        .expect("started");
    t.on(subjects::RESERVE, |c| match c.attempt() {
        1..=4 => Reply::fail("warehouse_busy", true),
        _ => Reply::success(json!({ "reservation_id": "r-1" })),
    })
    .on(subjects::CHARGE, |_| Reply::fail("card_declined", false))
    .on(subjects::RELEASE, |_| Reply::success(json!(null)));
    let saga = t.start(&checkout, &order()).await.expect("started");
    let outcome = t.outcome(&saga).await.expect("settled");
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(t.commands_on(subjects::RESERVE).len(), 5);
    // 50 + 100 + 200 + 400 ms of backoff.
    assert_eq!(t.now(), Duration::from_millis(750));
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_by_hand_past_the_journal_window_settle_too() {
    // The same run answered by hand: each retryable failure is applied (the saga moves
    // to its backoff) even where the journal no longer names it.
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let t = TestRuntime::builder()
        .register(&checkout)
        .options(|o| o.journal_retry_window = 1)
        .start()
        .await
        .expect("started");
    t.on(subjects::RESERVE, |_| Reply::no_reply())
        .on(subjects::CHARGE, |_| Reply::fail("card_declined", false))
        .on(subjects::RELEASE, |_| Reply::success(json!(null)));
    let saga = t.start(&checkout, &order()).await.expect("started");
    for attempt in 1..=4u32 {
        let reserve = t.commands_on(subjects::RESERVE)[attempt as usize - 1].clone();
        assert_eq!(reserve.attempt(), attempt);
        t.reply(&reserve, Reply::fail("warehouse_busy", true)).await;
        t.advance_to_next_wakeup().await;
    }
    let last = t.commands_on(subjects::RESERVE)[4].clone();
    t.reply(&last, Reply::success(json!({ "reservation_id": "r-1" })))
        .await;
    let outcome = t.outcome(&saga).await.expect("settled");
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(t.now(), Duration::from_millis(750));
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sagas_each_keep_their_own_virtual_times() {
    let (t, checkout) = harness().await;
    // Orders started 1 s apart; the charge of every odd one never answers.
    t.on(subjects::CHARGE, |c| {
        let n: u32 = c.payload()["order_id"]
            .as_str()
            .and_then(|o| o.strip_prefix("order-"))
            .and_then(|n| n.parse().ok())
            .expect("an order number");
        if n % 2 == 1 {
            Reply::no_reply()
        } else {
            Reply::success(json!({ "payment_id": format!("p-{n}") }))
        }
    });
    let mut sagas = Vec::new();
    for n in 0..20u64 {
        let mut order = order();
        order.order_id = format!("order-{n}");
        sagas.push(t.start(&checkout, &order).await.expect("started"));
        t.advance(Duration::from_secs(1)).await;
    }
    t.advance(Duration::from_secs(60)).await;
    for (n, saga) in sagas.iter().enumerate() {
        let outcome = saga.state().await.expect("state");
        let want = if n % 2 == 1 {
            SagaStatus::Compensated
        } else {
            SagaStatus::Completed
        };
        assert_eq!(outcome.status, want, "order-{n}");
        let charges: Vec<u128> = t
            .commands()
            .iter()
            .filter(|c| c.saga_id() == saga.id() && c.subject() == subjects::CHARGE)
            .map(|c| c.received_at().as_millis())
            .collect();
        let start = n as u128 * 1_000;
        if n % 2 == 1 {
            let offsets = [0, 10_050, 20_150, 30_350, 40_750];
            assert_eq!(charges, offsets.map(|o| start + o), "order-{n}");
        } else {
            assert_eq!(charges, [start], "order-{n}");
        }
    }
    assert_eq!(t.next_wakeup().await, None);
    t.shutdown().await;
}
