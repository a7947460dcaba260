//! A flood of forged and oversized messages while 2,000 checkouts run over NATS: every
//! saga finishes consistently, no forged output reaches a saga, every flood message is
//! dead-lettered with its reason, and the orchestrator's memory stays bounded by its
//! byte budget (the peak is printed; run with `--nocapture` to see it).
//!
//! Bounded: 2,000 sagas, 2,000 forged replies, 300 oversized bodies and 300 header
//! floods, a deadline on every wait.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::ids::SagaId;
use skald::machine::SagaStatus;
use skald::ports::{Bus, DeadLetterCategory, Headers, Message, SagaStore};
use skald::wire;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{check_consistency, checkout_definition};
use skald_sagas::sim::{Ledger, MemoryLedger};

const SAGAS: usize = 2_000;
const FORGED: usize = 2_000;
const OVERSIZED: usize = 300;
const HEADER_FLOODS: usize = 300;
/// The body of an oversized message: below the broker's 1 MiB, far above the runtime's
/// limit in this test.
const BIG: usize = 900 * 1024;

/// Peak resident memory of this process (kB), from /proc.
fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Resets the peak (Linux: writing 5 to clear_refs), so the peak measured is the
/// flood's.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A success for the charge of saga `id`, well formed, on the payment service's own
/// subject, with a token made by a key skald does not hold.
fn forged_success(id: SagaId, n: usize) -> Message {
    let mut h = Headers::new();
    h.insert(wire::H_SAGA_ID, id.to_string());
    h.insert(wire::H_SAGA_TYPE, "checkout");
    h.insert(wire::H_STEP, "charge_payment");
    h.insert(wire::H_KIND, "action");
    h.insert(wire::H_ATTEMPT, "1");
    h.insert(
        wire::H_IDEMPOTENCY_KEY,
        format!("{id}:charge_payment:action"),
    );
    h.insert(wire::H_OUTCOME, "success");
    h.insert(wire::H_MSG_ID, format!("forged-{n}"));
    h.insert(wire::H_REPLY_TOKEN, "ab".repeat(32));
    Message {
        subject: "skald.reply.payment.checkout.0".into(),
        headers: h,
        payload: br#"{"payment_id":"FORGED"}"#.to_vec().into(),
    }
}

fn oversized(n: usize) -> Message {
    let mut h = Headers::new();
    h.insert(wire::H_MSG_ID, format!("big-{n}"));
    Message {
        subject: "skald.reply.payment.checkout.0".into(),
        headers: h,
        payload: vec![b'x'; BIG].into(),
    }
}

fn header_flood(n: usize) -> Message {
    let mut h = Headers::new();
    h.insert(wire::H_MSG_ID, format!("headers-{n}"));
    for i in 0..200 {
        h.append(format!("X-Flood-{i}"), "y".repeat(100));
    }
    Message {
        subject: "skald.reply.shipping.checkout.0".into(),
        headers: h,
        payload: b"{}".to_vec().into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_oversized_floods_change_nothing_and_memory_stays_bounded() {
    let server = NatsServer::start();
    let connect = || async {
        NatsBus::connect(NatsOptions {
            ack_wait: Duration::from_secs(10),
            ..NatsOptions::new(server.url())
        })
        .await
        .expect("connect")
    };
    let dir = TempDir::new();
    let store: Arc<dyn SagaStore> = sqlite_store(&dir).await;
    let ledger = MemoryLedger::new();
    let participants = start_participants(
        Arc::new(connect().await),
        ledger.clone(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(Arc::new(connect().await))
        .register(&checkout)
        .options(RuntimeOptions {
            max_message_bytes: 64 * 1024,
            max_in_flight_bytes: 16 << 20,
            max_in_flight_replies: 1024,
            metrics_interval: Duration::ZERO,
            ..options()
        })
        .start()
        .await
        .expect("runtime starts");
    let flooder = connect().await;
    let baseline = rss_kb();
    reset_peak();
    let started = Instant::now();

    // The sagas and the flood at once.
    let mut ids = Vec::with_capacity(SAGAS);
    for i in 0..SAGAS {
        ids.push(
            runtime
                .start_saga(&checkout, &tea_order(&format!("o-{i}")))
                .await
                .expect("start")
                .id(),
        );
        if i % 10 == 0 {
            let batch: Vec<Message> = (i..i + 10)
                .map(|n| forged_success(ids[i], n))
                .chain((i / 10 % 7 == 0).then(|| oversized(i)))
                .chain((i / 10 % 7 == 1).then(|| header_flood(i)))
                .collect();
            for r in flooder.publish_batch(batch).await {
                r.expect("the broker takes the flood");
            }
        }
    }
    let published_big = (0..SAGAS).step_by(10).filter(|i| i / 10 % 7 == 0).count();
    let published_headers = (0..SAGAS).step_by(10).filter(|i| i / 10 % 7 == 1).count();
    // Top up to the stated counts, one at a time (this test's own copies of the big
    // bodies must not be what the memory figure measures).
    for n in published_big..OVERSIZED {
        flooder
            .publish(oversized(100_000 + n))
            .await
            .expect("publish");
    }
    for n in published_headers..HEADER_FLOODS {
        flooder
            .publish(header_flood(100_000 + n))
            .await
            .expect("publish");
    }

    // Every saga finishes.
    Wait::new(format!("all {SAGAS} sagas to finish"))
        .within(Duration::from_secs(240))
        .every(Duration::from_millis(200))
        .until_ok(async || {
            let mut unfinished = 0;
            for id in &ids {
                let s = store.load(*id).await.expect("load").expect("saga");
                if !s.state.status.is_terminal() {
                    unfinished += 1;
                }
            }
            match unfinished {
                0 => Ok(()),
                n => Err(format!("{n} unfinished")),
            }
        })
        .await;
    let elapsed = started.elapsed();

    // Every flood message is dead-lettered with its reason; none reached a saga.
    let expected = FORGED + OVERSIZED + HEADER_FLOODS;
    let dead = wait_until("every flood message dead-lettered", || {
        let store = Arc::clone(&store);
        async move {
            let d = store
                .dead_letters(true, 10_000)
                .await
                .expect("dead letters");
            (d.len() >= expected).then_some(d)
        }
    })
    .await;
    let count = |needle: &str| {
        dead.iter()
            .filter(|d| d.category == DeadLetterCategory::Poison && d.reason.contains(needle))
            .count()
    };
    assert_eq!(
        count("forged reply: Skald-Reply-Token does not match"),
        FORGED
    );
    assert_eq!(count("oversized message: a body of"), OVERSIZED);
    assert_eq!(count("oversized message: 201 headers"), HEADER_FLOODS);
    assert_eq!(dead.len(), expected, "nothing else was dead-lettered");
    assert_eq!(runtime.stats().forged, FORGED as u64);
    // The raw copies are capped.
    for d in &dead {
        let raw = serde_json::to_string(&d.message).expect("json");
        assert!(raw.len() < 64 * 1024, "a raw copy of {} bytes", raw.len());
    }
    // No forged output in any saga, and the participants' books agree with the sagas.
    let mut sagas = Vec::new();
    for id in &ids {
        let s = store.load(*id).await.expect("load").expect("saga");
        assert_ne!(s.state.data["payment_id"], "FORGED");
        assert_eq!(s.state.status, SagaStatus::Completed, "reliable services");
        sagas.push((*id, s.state.status));
    }
    let report = check_consistency(&sagas, &ledger.records().await.expect("records"));
    assert!(report.is_consistent(), "{:?}", report.violations);

    let peak = peak_rss_kb();
    let flooded_mb = (OVERSIZED * BIG) as f64 / 1e6;
    println!(
        "flood: {SAGAS} sagas completed in {:.1} s with {FORGED} forged replies, {OVERSIZED} \
         bodies of {} KiB ({flooded_mb:.0} MB) and {HEADER_FLOODS} header floods; RSS before \
         {} MB, peak during {} MB (+{} MB)",
        elapsed.as_secs_f64(),
        BIG / 1024,
        baseline / 1024,
        peak / 1024,
        peak.saturating_sub(baseline) / 1024,
    );
    // The oversized bodies alone are 276 MB: holding them would show. The byte budget
    // (16 MiB) and the client's bounded fetches keep the growth far below.
    assert!(
        peak.saturating_sub(baseline) < 200 * 1024,
        "peak RSS grew by {} MB",
        peak.saturating_sub(baseline) / 1024
    );
    drop(participants);
    runtime.shutdown().await;
}
