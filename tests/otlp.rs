//! OTLP export (cargo feature `otlp`), offline: a collector stand-in on loopback
//! receives the OTLP/HTTP protobuf export of a checkout saga run (memory store,
//! in-process bus, the participant helper), and the exported spans must carry skald's
//! ids: trace id = the saga's UUID, the step span's id = the command's traceparent
//! parent-id, the participant span under it, the reply span under that.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use skald::telemetry::{self, LogFormat, OtlpOptions};
use skald::trace::{TraceContext, span_id_of};
use skald_sagas::sim::MemoryLedger;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One exported span: the ids and the name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Exported {
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
}

/// The length-delimited fields numbered `field` of a protobuf message (other fields
/// skipped by wire type).
fn submessages(mut b: &[u8], field: u64) -> Vec<&[u8]> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some((&byte, rest)) = b.split_first() else {
                return v;
            };
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        match key & 7 {
            0 => {
                varint(&mut b);
            }
            1 => b = &b[8.min(b.len())..],
            5 => b = &b[4.min(b.len())..],
            2 => {
                let len = (varint(&mut b) as usize).min(b.len());
                if key >> 3 == field {
                    out.push(&b[..len]);
                }
                b = &b[len..];
            }
            other => panic!("protobuf wire type {other} not expected in OTLP"),
        }
    }
    out
}

/// The spans of an `ExportTraceServiceRequest`.
fn spans(request: &[u8]) -> Vec<Exported> {
    let mut out = Vec::new();
    for resource_spans in submessages(request, 1) {
        for scope_spans in submessages(resource_spans, 2) {
            for span in submessages(scope_spans, 2) {
                let one = |f| submessages(span, f).first().map(|v| v.to_vec());
                out.push(Exported {
                    trace_id: one(1).unwrap_or_default(),
                    span_id: one(2).unwrap_or_default(),
                    parent_span_id: one(4).unwrap_or_default(),
                    name: String::from_utf8_lossy(&one(5).unwrap_or_default()).into_owned(),
                });
            }
        }
    }
    out
}

/// What the collector stand-in received: (path, content type, body) per request.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A collector stand-in: answers every POST with 200 and keeps what it got.
async fn collector() -> (std::net::SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got: Received = Arc::default();
    let keep = Arc::clone(&got);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let keep = Arc::clone(&keep);
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 16 * 1024];
                // Read the head, then Content-Length bytes of body.
                let (head_end, length) = loop {
                    let n = stream.read(&mut buf).await.expect("read");
                    assert!(n > 0, "request cut short");
                    raw.extend_from_slice(&buf[..n]);
                    if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (end + 4, length);
                    }
                };
                while raw.len() < head_end + length {
                    let n = stream.read(&mut buf).await.expect("read body");
                    assert!(n > 0, "body cut short");
                    raw.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
                let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                let content_type = head
                    .lines()
                    .find_map(|l| {
                        l.to_lowercase()
                            .strip_prefix("content-type: ")
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                keep.lock().expect("lock").push((
                    path,
                    content_type,
                    raw[head_end..head_end + length].to_vec(),
                ));
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_http_with_skald_ids() {
    let (addr, got) = collector().await;
    let guard = telemetry::init(
        LogFormat::Text,
        Some(OtlpOptions::new(
            format!("http://{addr}"),
            "skald-otlp-test",
        )),
    )
    .expect("telemetry");

    let backend = Resources::new(Backend::MemoryInProcess).await;
    let mut env = TestEnv::start(&backend, MemoryLedger::new(), reliable(), no_script()).await;
    let id = env.start_order(1).await;
    env.settle(&[id]).await;
    env.shutdown().await;

    let trace = id.as_uuid().as_bytes().to_vec();
    let root = TraceContext::for_saga(&id);
    let step = span_id_of(&format!("{id}:reserve_inventory:action:1"));
    let guard = Arc::new(guard);
    // Export what ended, then look; spans still buffered come with the next flush.
    let exported = wait_until("the saga's spans at the collector", || {
        let guard = Arc::clone(&guard);
        let got = Arc::clone(&got);
        let trace = trace.clone();
        async move {
            tokio::task::spawn_blocking(move || guard.flush())
                .await
                .expect("flush");
            let requests = got.lock().expect("lock").clone();
            for (path, content_type, _) in &requests {
                assert_eq!(path, "/v1/traces");
                assert_eq!(content_type, "application/x-protobuf");
            }
            let ours: Vec<Exported> = requests
                .iter()
                .flat_map(|(_, _, body)| spans(body))
                .filter(|s| s.trace_id == trace)
                .collect();
            let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();
            ["saga", "step", "participant", "reply", "apply"]
                .iter()
                .all(|n| names.contains(n))
                .then_some(ours)
        }
    })
    .await;
    let by_id: HashMap<Vec<u8>, &Exported> =
        exported.iter().map(|s| (s.span_id.clone(), s)).collect();

    // The root: the saga's span, with the id every process derives.
    let saga = by_id
        .get(root.span_id.to_be_bytes().as_slice())
        .expect("the saga's root span, with its derived id");
    assert_eq!(saga.name, "saga");
    assert!(saga.parent_span_id.is_empty(), "the root has no parent");

    // The first step's attempt: id = the command's traceparent parent-id, under the root.
    let step_span = by_id
        .get(step.to_be_bytes().as_slice())
        .expect("the step span, with the command's parent-id as its id");
    assert_eq!(step_span.name, "step");
    assert_eq!(step_span.parent_span_id, root.span_id.to_be_bytes());

    // The participant's span is the step's child; the reply span is the participant's.
    let participant = exported
        .iter()
        .find(|s| s.name == "participant" && s.parent_span_id == step.to_be_bytes())
        .expect("the participant span under the step span");
    assert!(
        exported
            .iter()
            .any(|s| s.name == "reply" && s.parent_span_id == participant.span_id),
        "the reply span under the participant span: {exported:#?}"
    );
}
