//! Definition versions: a saga in flight finishes on the version it started with, new
//! sagas start on the latest, and a runtime refuses to start when unfinished sagas are
//! on a version it does not register.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use skald::definition::{SagaDefinition, Step};
use skald::ids::SagaId;
use skald::journal::{JournalEffect, JournalRecord};
use skald::machine::SagaStatus;
use skald::participant::{ParticipantHandle, serve};
use skald::ports::Bus;
use skald::retry::RetryPolicy;
use skald::wire::Outcome;
use skald::{Runtime, RuntimeError};
use skald_sagas::checkout::{Checkout, subjects};

/// Patient retries: a step can wait on a closed gate across a restart.
fn patient() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 10_000,
        initial_delay: Duration::from_millis(20),
        multiplier: 2.0,
        max_delay: Duration::from_millis(100),
        jitter: 1.0,
    }
}

fn step(name: &str, subject: &str) -> Step<Checkout> {
    Step::new(name)
        .action(
            subject.to_owned(),
            |c: &Checkout| json!({ "order_id": c.order_id }),
        )
        .retry(patient())
        .timeout(Duration::from_secs(5))
}

/// Version 1: reserve, charge, ship. Version 2 adds a receipt after shipping.
fn checkout(version: u32) -> SagaDefinition<Checkout> {
    let mut b = SagaDefinition::<Checkout>::builder("checkout", version)
        .step(step("reserve_inventory", subjects::RESERVE))
        .step(step("charge_payment", subjects::CHARGE))
        .step(step("ship_order", subjects::SHIP));
    if version >= 2 {
        b = b.step(step("send_receipt", "skald.cmd.shipping.receipt"));
    }
    b.build().expect("valid")
}

/// Participants: everything succeeds, but shipping answers "try later" while the gate
/// is closed.
async fn participants(bus: &Arc<dyn Bus>, gate: Arc<AtomicBool>) -> Vec<ParticipantHandle> {
    let mut handles = Vec::new();
    for (service, subject) in [
        ("inventory", "skald.cmd.inventory.>"),
        ("payment", "skald.cmd.payment.>"),
        ("shipping", "skald.cmd.shipping.>"),
    ] {
        let gate = Arc::clone(&gate);
        handles.push(
            serve(Arc::clone(bus), subject, service, 16, move |cmd| {
                let open = gate.load(Ordering::SeqCst);
                async move {
                    if cmd.subject == subjects::SHIP && !open {
                        skald::participant::retryable("closed", "the warehouse is closed")
                    } else {
                        Outcome::Success(json!({}))
                    }
                }
            })
            .await
            .expect("serve"),
        );
    }
    handles
}

async fn start(
    backend: &Resources,
    defs: &[&SagaDefinition<Checkout>],
) -> Result<Runtime, RuntimeError> {
    let mut builder = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(backend.bus().await)
        .options(options());
    for d in defs {
        builder = builder.register(*d);
    }
    builder.start().await
}

async fn steps_sent(backend: &Resources, id: SagaId) -> Vec<String> {
    journal_records(backend.store.as_ref(), id)
        .await
        .into_iter()
        .flat_map(|r| match r {
            JournalRecord::Transition(t) => t.effects,
            JournalRecord::Ignored(_) | JournalRecord::Snapshot(_) => Vec::new(),
        })
        .filter_map(|e| match e {
            JournalEffect::SendCommand { step, .. } => Some(step.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_sagas_finish_on_their_version_and_new_ones_start_on_the_latest() {
    let backend = Resources::new(Backend::SqliteNats).await;
    let (v1, v2) = (checkout(1), checkout(2));
    let gate = Arc::new(AtomicBool::new(false));
    let bus = backend.bus().await;
    let _participants = participants(&bus, Arc::clone(&gate)).await;

    // A v1 saga gets stuck retrying its shipping while the first runtime runs.
    let rt = start(&backend, &[&v1]).await.expect("start on v1");
    let old = rt
        .start_saga(&v1, &tea_order("old"))
        .await
        .expect("start")
        .id();
    wait_until("the v1 saga to retry its shipping", || async {
        let s = backend.store.load(old).await.expect("load")?;
        s.state
            .pending
            .filter(|p| p.step == 2 && p.attempt >= 2)
            .map(|_| ())
    })
    .await;
    rt.shutdown().await;

    // A runtime that dropped v1 would strand it: refused, with what and how to proceed.
    let refused = start(&backend, &[&v2])
        .await
        .expect_err("v1 is not registered");
    match &refused {
        RuntimeError::UnregisteredVersions(found) => {
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(
                (found[0].0.as_str(), found[0].1, found[0].2),
                ("checkout", 1, 1)
            );
        }
        other => panic!("expected UnregisteredVersions, got {other:?}"),
    }
    let message = refused.to_string();
    assert!(
        message.contains("1 unfinished checkout saga(s) on definition version 1")
            && message.contains("register those versions again"),
        "{message}"
    );

    // Both versions registered: new sagas start on v2 only.
    let rt = start(&backend, &[&v1, &v2])
        .await
        .expect("start on v1 and v2");
    let e = rt
        .start_saga(&v1, &tea_order("too-old"))
        .await
        .expect_err("v1 is not the latest");
    assert!(
        matches!(
            e,
            RuntimeError::NotLatestVersion {
                version: 1,
                latest: 2,
                ..
            }
        ),
        "{e}"
    );
    let new = rt
        .start_saga(&v2, &tea_order("new"))
        .await
        .expect("start on v2")
        .id();
    gate.store(true, Ordering::SeqCst);
    wait_status(backend.store.as_ref(), old, SagaStatus::Completed).await;
    wait_status(backend.store.as_ref(), new, SagaStatus::Completed).await;

    let old_saga = backend
        .store
        .load(old)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(
        (old_saga.state.definition_version, old_saga.state.completed),
        (1, 3)
    );
    let old_steps = steps_sent(&backend, old).await;
    assert!(
        !old_steps.contains(&"send_receipt".to_owned()),
        "{old_steps:?}"
    );
    let new_saga = backend
        .store
        .load(new)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(
        (new_saga.state.definition_version, new_saga.state.completed),
        (2, 4)
    );
    assert_eq!(
        steps_sent(&backend, new).await.last().map(String::as_str),
        Some("send_receipt")
    );

    // Nothing unfinished on v1 any more: a runtime with v2 alone starts.
    rt.shutdown().await;
    let rt = start(&backend, &[&v2]).await.expect("v1 drained");
    // A v2 saga in flight does not stop an older build (v1 only) from starting: a
    // rollback, or an old pod restarting during a rolling deploy.
    gate.store(false, Ordering::SeqCst);
    let newer = rt
        .start_saga(&v2, &tea_order("newer"))
        .await
        .expect("start")
        .id();
    wait_until("the v2 saga to retry its shipping", || async {
        let s = backend.store.load(newer).await.expect("load")?;
        s.state.pending.filter(|p| p.step == 2).map(|_| ())
    })
    .await;
    rt.shutdown().await;
    let old_build = start(&backend, &[&v1]).await.expect("a rollback starts");
    old_build.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_one_version_twice_is_refused() {
    let backend = Resources::new(Backend::MemoryInProcess).await;
    let e = start(&backend, &[&checkout(1), &checkout(1)])
        .await
        .expect_err("twice");
    assert!(
        e.to_string()
            .contains("checkout version 1 registered twice"),
        "{e}"
    );
}
