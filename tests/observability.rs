//! Metrics and traces, end to end on real brokers and stores: the Prometheus endpoint
//! scraped over HTTP after a run (PostgreSQL + NATS JetStream), and the trace context
//! of a saga reaching a participant and coming back with its reply, for the Rust
//! participant helper and for a plain NATS client.
//!
//! The `metrics` recorder and the `tracing` subscriber are process-wide: this binary
//! installs them once (the subscriber captures span fields for the assertions), and
//! only one test reads that recorder; the others use saga types of their own. The test
//! of commit conflicts and cold activations (two runtimes holding one saga) registers
//! its runtimes' metrics with a recorder of its own (thread-local while they start).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use skald::definition::{SagaDefinition, Step};
use skald::ids::SagaId;
use skald::machine::SagaStatus;
use skald::trace::{TraceContext, span_id_of};
use skald::wire;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{Checkout, LineItem, checkout_definition};
use skald_sagas::sim::{MemoryLedger, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

// ---------------------------------------------------------------------------------------
// A tracing layer that keeps every span's name and fields.

#[derive(Debug, Clone, Default)]
struct SpanRecord {
    name: String,
    fields: BTreeMap<String, String>,
}

impl SpanRecord {
    fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

#[derive(Default)]
struct Captured {
    open: HashMap<Id, SpanRecord>,
    closed: Vec<SpanRecord>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Captured>>);

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut rec = SpanRecord {
            name: attrs.metadata().name().to_owned(),
            ..SpanRecord::default()
        };
        attrs.record(&mut Fields(&mut rec.fields));
        if let Ok(mut c) = self.0.lock() {
            c.open.insert(id.clone(), rec);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Ok(mut c) = self.0.lock()
            && let Some(rec) = c.open.get_mut(id)
        {
            values.record(&mut Fields(&mut rec.fields));
        }
    }
    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Ok(mut c) = self.0.lock()
            && let Some(rec) = c.open.remove(&id)
        {
            c.closed.push(rec);
        }
    }
}

impl Capture {
    /// Spans named `name` of saga `id` (open or closed).
    fn spans(&self, name: &str, id: SagaId) -> Vec<SpanRecord> {
        let saga = id.to_string();
        let c = self.0.lock().expect("capture lock");
        c.closed
            .iter()
            .chain(c.open.values())
            .filter(|r| r.name == name && r.get("saga.id") == Some(saga.as_str()))
            .cloned()
            .collect()
    }
}

/// The process's capturing subscriber (installed once).
fn capture() -> Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Capture::default();
            let subscriber = Registry::default().with(
                capture
                    .clone()
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            );
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
            capture
        })
        .clone()
}

// ---------------------------------------------------------------------------------------
// Prometheus text

/// One sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (the subset an exporter writes: no escapes inside
/// label values, no timestamps).
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|e| panic!("value in {line:?}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("label=value");
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum of the samples of `name` whose labels include `labels`; `None` if none.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// `GET path` over plain HTTP/1.1: (status line, content type, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut raw))
        .await
        .expect("a response in time")
        .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

// ---------------------------------------------------------------------------------------

/// Checkout sagas on PostgreSQL + NATS JetStream with declines (compensations) and
/// flaky attempts (retries); then `/metrics` is scraped and parsed, and the counters
/// must match the outcomes. The traces of the same run must chain saga → step →
/// participant → reply by their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_after_a_run_and_trace_ids_through_the_participant_helper() {
    let capture = capture();
    // Before the runtime starts: it registers its handles with the recorder it finds.
    let metrics = skald::metrics::serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("metrics endpoint");
    let addr = metrics.local_addr();

    let backend = Resources::new(Backend::PostgresNats).await;
    let bus = backend.bus().await;
    let config = SimConfig {
        seed: 7,
        decline_rate: 0.35,
        flaky_rate: 0.1,
        ..SimConfig::default()
    };
    let participants = start_participants(
        bus.clone(),
        MemoryLedger::new(),
        config,
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let checkout = checkout_definition(fast_timing()).expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(bus.clone())
        .register(&checkout)
        .options(RuntimeOptions {
            metrics_interval: Duration::from_millis(100),
            ..options()
        })
        .start()
        .await
        .expect("runtime");
    let mut outcomes = runtime.outcomes();

    let n = 40;
    let mut ids = Vec::new();
    for i in 0..n {
        let order = Checkout::new(
            format!("obs-{i}"),
            "c",
            vec![LineItem {
                sku: "tea".into(),
                quantity: 1,
            }],
            500,
        );
        ids.push(
            runtime
                .start_saga(&checkout, &order)
                .await
                .expect("start")
                .id(),
        );
    }
    let statuses: HashMap<SagaId, SagaStatus> = await_outcomes(&mut outcomes, &ids)
        .await
        .into_iter()
        .map(|o| (o.id, o.status))
        .collect();
    let count = |s: SagaStatus| statuses.values().filter(|v| **v == s).count() as f64;
    let (completed, compensated, failed) = (
        count(SagaStatus::Completed),
        count(SagaStatus::Compensated),
        count(SagaStatus::Failed),
    );
    assert!(completed > 0.0 && compensated > 0.0, "{statuses:?}");

    // The sampled gauges catch up within a few intervals: wait for them, not a sleep.
    let ty = ("saga_type", "checkout");
    let samples = wait_until("the sampled gauges to settle", || async {
        let (status, _, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let samples = parse_prometheus(&body);
        let in_flight = value(&samples, "skald_sagas_in_flight", &[ty]);
        let lag = value(&samples, "skald_reply_consumer_lag", &[]);
        (in_flight == Some(0.0) && lag == Some(0.0)).then_some(samples)
    })
    .await;
    let (_, content_type, body) = http_get(addr, "/metrics").await;
    assert_eq!(content_type, "text/plain; version=0.0.4");
    assert!(
        body.contains("# TYPE skald_step_duration_seconds histogram"),
        "{body}"
    );
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{body}"))
    };
    assert_eq!(get("skald_sagas_started_total", &[ty]), n as f64);
    assert_eq!(get("skald_sagas_completed_total", &[ty]), completed);
    assert_eq!(get("skald_sagas_compensated_total", &[ty]), compensated);
    assert_eq!(get("skald_sagas_dead_lettered_total", &[ty]), failed);
    assert_eq!(completed + compensated + failed, n as f64);
    // Every saga's first step got at least one reply; payment too (declined or not);
    // shipping only for the completed ones; releases for the compensated ones.
    let step = |s: &'static str, k: &'static str| {
        get(
            "skald_step_duration_seconds_count",
            &[ty, ("step", s), ("kind", k)],
        )
    };
    assert!(step("reserve_inventory", "action") >= n as f64);
    assert!(step("charge_payment", "action") >= n as f64);
    assert!(step("ship_order", "action") >= completed);
    assert!(step("reserve_inventory", "compensation") >= compensated);
    assert!(get("skald_step_duration_seconds_sum", &[ty]) > 0.0);
    assert!(
        get("skald_step_retries_total", &[ty]) > 0.0,
        "flaky attempts were retried"
    );
    assert!(get("skald_store_commit_batch_size_count", &[]) > 0.0);
    assert!(
        get("skald_store_commit_batch_size_sum", &[])
            >= get("skald_store_commit_batch_size_count", &[])
    );
    assert!(get("skald_store_commit_duration_seconds_count", &[]) > 0.0);
    assert!(get("skald_outbox_backlog", &[]) >= 0.0);
    assert!(get("skald_outbox_lag_seconds", &[]) >= 0.0);
    assert!(get("skald_live_actors", &[]) >= 0.0);
    // One process starts and runs every saga: none of its commits conflicts. (A saga is
    // loaded cold only when an input comes after it passivated: a late or redelivered
    // reply to a settled saga; the series is there either way.)
    assert_eq!(get("skald_commit_conflicts_total", &[ty]), 0.0);
    assert!(get("skald_cold_activations_total", &[ty]) >= 0.0);
    assert!(
        body.contains("# TYPE skald_commit_conflicts_total counter"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE skald_cold_activations_total counter"),
        "{body}"
    );
    let (status, _, _) = http_get(addr, "/elsewhere").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert_eq!(
        metrics.render().lines().next().map(|l| l.starts_with('#')),
        Some(true)
    );

    // Traces: for each saga, the first step's attempt 1 chains by ids.
    for id in &ids {
        let trace = id.as_uuid().simple().to_string();
        let root = TraceContext::for_saga(id);
        let saga = capture.spans("saga", *id);
        assert_eq!(saga.len(), 1, "one root span per saga start");
        assert_eq!(saga[0].get("trace_id"), Some(trace.as_str()));
        assert_eq!(saga[0].get("span_id"), Some(root.span_id_hex().as_str()));
        assert_eq!(saga[0].get("parent_span_id"), None);

        let attempt_of = |r: &SpanRecord| {
            r.get("saga.step") == Some("reserve_inventory")
                && r.get("step.kind") == Some("action")
                && r.get("step.attempt") == Some("1")
        };
        let step = capture.spans("step", *id);
        let step = step.iter().find(|r| attempt_of(r)).expect("a step span");
        let step_id = format!(
            "{:016x}",
            span_id_of(&format!("{id}:reserve_inventory:action:1"))
        );
        assert_eq!(step.get("trace_id"), Some(trace.as_str()));
        assert_eq!(step.get("span_id"), Some(step_id.as_str()));
        assert_eq!(
            step.get("parent_span_id"),
            Some(root.span_id_hex().as_str())
        );

        // The participant helper's span continues the command's trace under the step.
        let handled = capture.spans("participant", *id);
        let handled = handled
            .iter()
            .find(|r| attempt_of(r))
            .expect("a participant span");
        assert_eq!(handled.get("trace_id"), Some(trace.as_str()));
        assert_eq!(handled.get("parent_span_id"), Some(step_id.as_str()));
        let participant_id = handled.get("span_id").expect("participant span id");

        // The runtime span applying the reply is its child.
        let reply = capture.spans("reply", *id);
        let reply = reply.iter().find(|r| attempt_of(r)).expect("a reply span");
        assert_eq!(reply.get("trace_id"), Some(trace.as_str()));
        assert_eq!(reply.get("parent_span_id"), Some(participant_id));
        assert_eq!(reply.get("traceparent.error"), None);
    }

    runtime.shutdown().await;
    drop(participants);
}

/// The probe saga: one step, handled by a plain NATS client.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Probe {
    n: u32,
}

/// A participant that is nothing but a NATS client: the command it receives carries a
/// `traceparent` whose trace id is the saga id and whose parent-id is the step span's;
/// it answers with a `traceparent` of its own span (or, for odd `n`, a malformed one),
/// and the runtime's span applying the reply records that parent (or says why not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_a_plain_nats_participant_and_comes_back() {
    let capture = capture();
    let backend = Resources::new(Backend::SqliteNats).await;
    let url = backend.nats.as_ref().expect("a nats-server").url();
    let client = async_nats::connect(url.as_str()).await.expect("client");
    let mut commands = client
        .subscribe("skald.cmd.tracer.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    // What the participant saw, per saga: the command's traceparent, and what it sent.
    let seen: Arc<Mutex<HashMap<String, (String, String)>>> = Arc::default();
    let participant = {
        let client = client.clone();
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(msg) = commands.next().await {
                let h = msg.headers.clone().unwrap_or_default();
                let get = |name: &str| {
                    h.get(name)
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default()
                };
                let saga = get(wire::H_SAGA_ID);
                let incoming = get(wire::H_TRACEPARENT);
                let n: Probe = serde_json::from_slice(&msg.payload).expect("probe payload");
                let trace = incoming.split('-').nth(1).unwrap_or_default().to_owned();
                let answer = if n.n.is_multiple_of(2) {
                    format!("00-{trace}-00f067aa0ba902b7-01")
                } else {
                    "00-not-a-traceparent".to_owned()
                };
                let mut reply = async_nats::HeaderMap::new();
                for name in [
                    wire::H_SAGA_ID,
                    wire::H_SAGA_TYPE,
                    wire::H_STEP,
                    wire::H_KIND,
                    wire::H_ATTEMPT,
                    wire::H_IDEMPOTENCY_KEY,
                    wire::H_REPLY_TOKEN,
                ] {
                    reply.insert(name, get(name).as_str());
                }
                reply.insert(wire::H_OUTCOME, "success");
                reply.insert(wire::H_MSG_ID, format!("probe-reply:{saga}").as_str());
                reply.insert(wire::H_TRACEPARENT, answer.as_str());
                seen.lock().expect("seen").insert(saga, (incoming, answer));
                client
                    .publish_with_headers(get(wire::H_REPLY_TO), reply, "{}".into())
                    .await
                    .expect("reply");
            }
        })
    };

    let probe: SagaDefinition<Probe> = SagaDefinition::builder("traced", 1)
        .step(
            Step::new("probe")
                .action("skald.cmd.tracer.probe", |p: &Probe| p.clone())
                .timeout(Duration::from_secs(10)),
        )
        .build()
        .expect("valid");
    let runtime = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(backend.bus().await)
        .register(&probe)
        .options(options())
        .start()
        .await
        .expect("runtime");
    let mut outcomes = runtime.outcomes();
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(
            runtime
                .start_saga(&probe, &Probe { n })
                .await
                .expect("start")
                .id(),
        );
    }
    for o in await_outcomes(&mut outcomes, &ids).await {
        assert_eq!(o.status, SagaStatus::Completed);
    }

    for (n, id) in ids.iter().enumerate() {
        let (incoming, answer) = seen
            .lock()
            .expect("seen")
            .get(&id.to_string())
            .cloned()
            .expect("the participant saw the command");
        let cx = TraceContext::parse(&incoming).expect("a valid traceparent on the command");
        assert_eq!(cx.trace_id_hex(), id.as_uuid().simple().to_string());
        assert!(cx.sampled);
        let step_id = span_id_of(&format!("{id}:probe:action:1"));
        assert_eq!(cx.span_id, step_id, "parent-id = the step span's id");

        let reply = wait_until("the reply span", || async {
            capture.spans("reply", *id).into_iter().next()
        })
        .await;
        assert_eq!(
            reply.get("trace_id"),
            Some(id.as_uuid().simple().to_string().as_str())
        );
        if n.is_multiple_of(2) {
            let answered = TraceContext::parse(&answer).expect("valid");
            assert_eq!(
                reply.get("parent_span_id"),
                Some(answered.span_id_hex().as_str())
            );
            assert_eq!(reply.get("traceparent.error"), None);
        } else {
            // A malformed traceparent: the reply hangs under the step span, and says why.
            assert_eq!(
                reply.get("parent_span_id"),
                Some(format!("{step_id:016x}").as_str())
            );
            let why = reply.get("traceparent.error").expect("the reason");
            assert!(why.contains("invalid traceparent"), "{why}");
        }
    }
    runtime.shutdown().await;
    participant.abort();
}

/// The saga two runtimes hold at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Contended {
    n: u32,
}

async fn contended_runtime(
    store: &Arc<dyn skald::ports::SagaStore>,
    definition: &SagaDefinition<Contended>,
) -> Runtime {
    // A bus of its own: no participant answers, so nothing moves the saga but the test.
    Runtime::builder()
        .store(Arc::clone(store))
        .bus(skald::adapters::memory::MemoryBus::new())
        .register(definition)
        .options(options())
        .start()
        .await
        .expect("runtime")
}

/// Two processes sharing one store both hold a saga: B, which never had it, loads it
/// from the store (a cold activation) and moves it on; A, still holding the version it
/// started, has its next commit refused (a conflict), reloads and decides again. Both
/// are counted per saga type, in the runtime's stats and in the exported metrics.
#[test]
fn commit_conflicts_and_cold_activations_are_counted_per_saga_type() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let store: Arc<dyn skald::ports::SagaStore> =
        Arc::new(skald::adapters::memory::MemoryStore::new());
    let contended: SagaDefinition<Contended> = SagaDefinition::builder("contended", 1)
        .step(
            Step::new("hold")
                .action("skald.cmd.holder.hold", |c: &Contended| c.clone())
                .compensate("skald.cmd.holder.release", |c: &Contended| c.clone())
                .timeout(Duration::from_secs(300)),
        )
        .build()
        .expect("valid");
    // The runtimes register their metric handles while they start, on this thread:
    // with this test's recorder. The handles then count from any thread.
    let (a, b) = metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            (
                contended_runtime(&store, &contended).await,
                contended_runtime(&store, &contended).await,
            )
        })
    });
    rt.block_on(async {
        let id = a
            .start_saga(&contended, &Contended { n: 1 })
            .await
            .expect("start on A")
            .id();
        let version = |store: Arc<dyn skald::ports::SagaStore>| async move {
            store
                .load(id)
                .await
                .expect("load")
                .expect("the saga")
                .version
        };
        let started = version(Arc::clone(&store)).await;
        // B has no actor for it: it loads the saga (cold) and applies the cancel.
        tokio::time::timeout(DEADLINE, b.cancel(id, "from B"))
            .await
            .expect("B answers")
            .expect("B cancels");
        assert!(
            version(Arc::clone(&store)).await > started,
            "B moved the saga on"
        );
        // A's actor still holds the started version: its commit is refused, it
        // reloads and decides again (whatever it then decides).
        let _ = tokio::time::timeout(DEADLINE, a.cancel(id, "from A"))
            .await
            .expect("A answers");
        let (sa, sb) = (a.stats(), b.stats());
        assert!(sa.conflicts >= 1, "A's commit conflicted: {sa:?}");
        assert_eq!(
            sa.cold_activations, 0,
            "A made its actor by the start: {sa:?}"
        );
        assert_eq!(sb.conflicts, 0, "{sb:?}");
        assert_eq!(sb.cold_activations, 1, "B loaded the saga once: {sb:?}");
        a.shutdown().await;
        b.shutdown().await;
    });

    let body = prometheus.render();
    let samples = parse_prometheus(&body);
    let ty = ("saga_type", "contended");
    let conflicts = value(&samples, "skald_commit_conflicts_total", &[ty]);
    assert!(conflicts.is_some_and(|n| n >= 1.0), "{body}");
    assert_eq!(
        value(&samples, "skald_cold_activations_total", &[ty]),
        Some(1.0),
        "{body}"
    );
    assert!(
        body.contains("# HELP skald_commit_conflicts_total ")
            && body.contains("# HELP skald_cold_activations_total "),
        "{body}"
    );
}
