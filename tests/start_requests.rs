//! Starting a saga from any language (issue 15, section 3): a start request over NATS,
//! sent by a plain NATS client (async-nats and serde_json, no skald code), as
//! docs/protocol.md ("Starting a saga") describes it:
//!
//! - a valid start is answered with the saga's id, and the saga runs to completion;
//! - the same business key answers the same saga (`existing: true`), also when many
//!   requests race;
//! - data that does not decode as the saga's data is refused (`invalid_data`, serde's
//!   reason) and nothing is stored; a body that is not a start request is refused
//!   (`invalid_request`), a bad key too (`invalid_key`);
//! - a type nobody serves (unknown, or its runtimes serve no starts) gets the broker's
//!   "no responders" at once, not a timeout;
//! - a request over the size limits is refused (`too_large`);
//! - the in-process bus serves the same requests;
//! - on a broker with the permissions of docs/security.md, the orchestrators answer
//!   start requests and a participant may not send them; a request naming a reply
//!   subject that is no requester's inbox (a JetStream API subject, a lifecycle event's
//!   subject) is neither applied nor answered;
//! - a flood beyond `max_in_flight_starts` (or their byte budget) is refused
//!   `unavailable` at once, nothing stored;
//! - a start whose commit's outcome is unknown is never answered "nothing was stored";
//! - data with fields the orchestrator's data type does not know is refused
//!   `version_skew`, nothing stored; a start's answer names its definition version;
//! - a runtime shutting down answers every request it took (or the broker answers "no
//!   responders"): no requester waits out its timeout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use common::hooked::HookedStore;
use common::secure::{Credential, Principal, SecureServer, Tls};
use common::*;
use serde_json::{Value, json};
use skald::adapters::nats::NatsBus;
use skald::ids::{SagaId, SagaType};
use skald::machine::SagaStatus;
use skald::ports::{Bus, BusError, Headers, SagaStore};
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{Checkout, checkout_definition};
use skald_sagas::sim::MemoryLedger;

/// A checkout order as JSON: what a client in another language sends as `data`.
fn order(id: &str) -> Value {
    json!({
        "order_id": id,
        "customer_id": "customer-7",
        "items": [{"sku": "sku-7", "quantity": 2}],
        "amount_cents": 1070
    })
}

/// A plain NATS client on the test's nats-server.
async fn plain_client(res: &Resources) -> async_nats::Client {
    let url = res.nats.as_ref().expect("a NATS backend").url();
    async_nats::connect(url)
        .await
        .expect("a plain client connects")
}

/// What a start request got back: the first message the client received.
#[derive(Debug)]
struct Answer {
    body: Value,
    headers: Option<HeaderMap>,
}

impl Answer {
    fn saga_id(&self) -> SagaId {
        let id = self.body["saga_id"]
            .as_str()
            .unwrap_or_else(|| panic!("a saga id in {}", self.body));
        id.parse().expect("a UUID")
    }

    fn existing(&self) -> bool {
        self.body["existing"]
            .as_bool()
            .unwrap_or_else(|| panic!("existing in {}", self.body))
    }

    /// The refusal's code and reason.
    fn refusal(&self) -> (&str, &str) {
        let error = &self.body["error"];
        match (error["code"].as_str(), error["reason"].as_str()) {
            (Some(code), Some(reason)) => (code, reason),
            _ => panic!("a refusal, got {}", self.body),
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    }
}

/// Sends `body` on `subject` with `headers` and returns the answer, or the request's
/// error. Waits at most [`DEADLINE`].
async fn ask_with(
    client: &async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    body: impl Into<Bytes>,
) -> Result<Answer, async_nats::RequestError> {
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(body.into())
        .timeout(Some(DEADLINE));
    let m = client.send_request(subject.to_owned(), request).await?;
    let body: Value = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
        panic!(
            "the answer is JSON ({e}): {:?}",
            String::from_utf8_lossy(&m.payload)
        )
    });
    // The first answer is skald's, never a JetStream publish ack (which would be
    // {"stream": ..., "seq": ...}): no stream captures skald.start.>.
    assert!(
        body.get("stream").is_none() && body.get("seq").is_none(),
        "a JetStream publish ack answered the request: {body}"
    );
    Ok(Answer {
        body,
        headers: m.headers,
    })
}

/// Sends a start request with `body` for saga type `ty` and returns its answer.
async fn ask(client: &async_nats::Client, ty: &str, body: impl Into<Bytes>) -> Answer {
    let subject = format!("skald.start.{ty}");
    ask_with(client, &subject, HeaderMap::new(), body)
        .await
        .unwrap_or_else(|e| panic!("{subject} answered: {e}"))
}

fn json_body(v: Value) -> Bytes {
    Bytes::from(serde_json::to_vec(&v).expect("json"))
}

/// How many sagas the store holds.
async fn stored_sagas(store: &dyn SagaStore) -> usize {
    store.list(None, None, 1000).await.expect("list").len()
}

/// A runtime with the checkout saga (no participants) and `options`, on `res`.
async fn runtime(res: &Resources, options: RuntimeOptions) -> Runtime {
    runtime_on(Arc::clone(&res.store), res.bus().await, options).await
}

/// A runtime with the checkout saga (no participants) and `options`, on `store` and
/// `bus`.
async fn runtime_on(
    store: Arc<dyn SagaStore>,
    bus: Arc<dyn Bus>,
    options: RuntimeOptions,
) -> Runtime {
    let checkout = checkout_definition(fast_timing()).expect("valid definition");
    Runtime::builder()
        .store(store)
        .bus(bus)
        .register(&checkout)
        .options(options)
        .reply_keys(test_reply_keys())
        .start()
        .await
        .expect("runtime starts")
}

fn checkout_type() -> SagaType {
    SagaType::new("checkout").expect("name")
}

/// A valid start from a plain client is answered with the saga's id; the saga is the
/// client's data and completes.
async fn a_start_request_answers_the_saga_id_and_the_saga_completes(backend: Backend) {
    let res = Resources::new(backend).await;
    let env = TestEnv::start(&res, MemoryLedger::new(), reliable(), no_script()).await;
    let client = plain_client(&res).await;
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("order-1") })),
    )
    .await;
    assert!(!answer.existing(), "{:?}", answer.body);
    assert_eq!(answer.header("Nats-Service-Error-Code"), None);
    let id = answer.saga_id();
    let saga = wait_status(env.store.as_ref(), id, SagaStatus::Completed).await;
    assert_eq!(saga.state.saga_type, checkout_type());
    let data: Checkout = serde_json::from_value(saga.state.data.clone()).expect("checkout data");
    assert_eq!(
        (data.order_id.as_str(), data.amount_cents),
        ("order-1", 1070)
    );
    assert!(data.shipment_id.is_some(), "{data:?}");
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_request_answers_the_saga_id_and_the_saga_completes_on_sqlite_nats() {
    a_start_request_answers_the_saga_id_and_the_saga_completes(Backend::SqliteNats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_request_answers_the_saga_id_and_the_saga_completes_on_postgres_nats() {
    a_start_request_answers_the_saga_id_and_the_saga_completes(Backend::PostgresNats).await;
}

/// The same key answers the same saga, the first request's: sent again (a client whose
/// answer was lost) and sent by many clients at once, exactly one of them started it.
async fn the_same_key_answers_the_same_saga(backend: Backend) {
    let res = Resources::new(backend).await;
    let env = TestEnv::start(&res, MemoryLedger::new(), reliable(), no_script()).await;
    let client = plain_client(&res).await;
    let first = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("order-2"), "key": "order-2" })),
    )
    .await;
    assert!(!first.existing(), "{:?}", first.body);
    let id = first.saga_id();
    assert_eq!(
        id,
        SagaId::for_key(&checkout_type(), "order-2").expect("key"),
        "the id is derived from the type and the key"
    );
    // Again, with other data: the same saga, whose data stays the first request's.
    let again = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("order-2-other"), "key": "order-2" })),
    )
    .await;
    assert_eq!((again.saga_id(), again.existing()), (id, true));
    let saga = wait_status(env.store.as_ref(), id, SagaStatus::Completed).await;
    assert_eq!(saga.state.data["order_id"], "order-2");

    // Twelve clients race with one new key: one saga, one of them started it.
    let body = json_body(json!({ "data": order("order-3"), "key": "order-3" }));
    let answers = futures_util::future::join_all((0..12).map(|_| {
        let client = client.clone();
        let body = body.clone();
        async move { ask(&client, "checkout", body).await }
    }))
    .await;
    let ids: std::collections::HashSet<SagaId> = answers.iter().map(Answer::saga_id).collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    let started = answers.iter().filter(|a| !a.existing()).count();
    assert_eq!(started, 1, "{answers:?}");
    let raced = *ids.iter().next().expect("one id");
    wait_status(env.store.as_ref(), raced, SagaStatus::Completed).await;
    assert_eq!(stored_sagas(env.store.as_ref()).await, 2);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_answers_the_same_saga_on_sqlite_nats() {
    the_same_key_answers_the_same_saga(Backend::SqliteNats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_answers_the_same_saga_on_postgres_nats() {
    the_same_key_answers_the_same_saga(Backend::PostgresNats).await;
}

/// Data that does not decode as the saga's data is refused with serde's reason, and
/// nothing is stored: not under its key, not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_data_is_refused_and_nothing_is_stored() {
    let res = Resources::new(Backend::SqliteNats).await;
    let env = TestEnv::start(&res, MemoryLedger::new(), reliable(), no_script()).await;
    let client = plain_client(&res).await;

    let mut wrong_type = order("order-4");
    wrong_type["amount_cents"] = json!("ten euros");
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": wrong_type, "key": "order-4" })),
    )
    .await;
    let (code, reason) = answer.refusal();
    assert_eq!(code, "invalid_data");
    assert!(
        reason.starts_with("decoding saga data: invalid type: string \"ten euros\""),
        "{reason}"
    );
    assert_eq!(
        answer.header("Nats-Service-Error-Code").as_deref(),
        Some("400")
    );
    assert_eq!(answer.header("Nats-Service-Error").as_deref(), Some(reason));

    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": { "order_id": "order-5" } })),
    )
    .await;
    let (code, reason) = answer.refusal();
    assert_eq!(code, "invalid_data");
    assert!(reason.contains("missing field `customer_id`"), "{reason}");

    let answer = ask(&client, "checkout", json_body(json!({ "data": null }))).await;
    assert_eq!(answer.refusal().0, "invalid_data");

    let key = SagaId::for_key(&checkout_type(), "order-4").expect("key");
    assert!(env.store.load(key).await.expect("load").is_none());
    assert_eq!(stored_sagas(env.store.as_ref()).await, 0);
    assert!(
        env.store
            .dead_letters(false, 10)
            .await
            .expect("dlq")
            .is_empty()
    );
    env.shutdown().await;
}

/// A body that is not a start request, and a bad key, are refused; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_bad_keys_are_refused() {
    let res = Resources::new(Backend::SqliteNats).await;
    let env = TestEnv::start(&res, MemoryLedger::new(), reliable(), no_script()).await;
    let client = plain_client(&res).await;
    let data = order("order-6");
    let invalid_requests: Vec<(&str, Bytes)> = vec![
        ("not JSON", Bytes::from_static(b"order-6, please")),
        ("empty", Bytes::new()),
        ("no data", json_body(json!({ "key": "order-6" }))),
        (
            "a misspelt field",
            json_body(json!({ "data": data, "Key": "order-6" })),
        ),
        (
            "a key that is no string",
            json_body(json!({ "data": data, "key": 6 })),
        ),
        ("an array", json_body(json!([data, "order-6"]))),
        ("data alone", json_body(data.clone())),
    ];
    for (what, body) in invalid_requests {
        let answer = ask(&client, "checkout", body).await;
        let (code, reason) = answer.refusal();
        assert_eq!(code, "invalid_request", "{what}: {reason}");
        assert!(
            reason.starts_with("the body is not a start request"),
            "{what}: {reason}"
        );
    }
    let bad_keys = [
        ("an empty key", String::new()),
        ("a key of 513 bytes", "k".repeat(513)),
        ("a key with a newline", "order\n6".to_owned()),
    ];
    for (what, key) in bad_keys {
        let answer = ask(
            &client,
            "checkout",
            json_body(json!({ "data": data, "key": key })),
        )
        .await;
        let (code, reason) = answer.refusal();
        assert_eq!(code, "invalid_key", "{what}: {reason}");
        assert!(reason.contains("business key"), "{what}: {reason}");
    }
    assert_eq!(stored_sagas(env.store.as_ref()).await, 0);
    // `"key": null` is no key: the request is valid.
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": data, "key": null })),
    )
    .await;
    assert!(!answer.existing());
    env.shutdown().await;
}

/// A saga type no runtime serves gets the broker's "no responders" at once (not a
/// timeout): an unknown type, and a registered one whose runtimes serve no start
/// requests (`start_requests: false`, or `consume: false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_nobody_serves_gets_no_responders_at_once() {
    let res = Resources::new(Backend::SqliteNats).await;
    let client = plain_client(&res).await;
    let no_responders = async |ty: &str| {
        let begun = Instant::now();
        let subject = format!("skald.start.{ty}");
        let body = json_body(json!({ "data": order("order-7") }));
        match ask_with(&client, &subject, HeaderMap::new(), body).await {
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {}
            Err(e) => panic!("{subject}: no responders expected, got {e}"),
            Ok(answer) => panic!("{subject}: no responders expected, got {:?}", answer.body),
        }
        let took = begun.elapsed();
        assert!(took < Duration::from_secs(5), "{subject}: {took:?}");
    };
    for options in [
        RuntimeOptions {
            start_requests: false,
            ..options()
        },
        RuntimeOptions {
            consume: false,
            ..options()
        },
    ] {
        let runtime = runtime(&res, options).await;
        no_responders("checkout").await;
        runtime.shutdown().await;
    }
    assert_eq!(stored_sagas(res.store.as_ref()).await, 0);

    let runtime = runtime(&res, options()).await;
    no_responders("refund").await;
    no_responders("Check-Out").await;
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("order-7") })),
    )
    .await;
    assert!(!answer.existing(), "{:?}", answer.body);
    // A runtime that stops stops serving.
    runtime.shutdown().await;
    Wait::new("the stopped runtime to serve no more")
        .until_ok(async || {
            let request = async_nats::Request::new()
                .payload(json_body(json!({ "data": order("order-7") })))
                .timeout(Some(Duration::from_secs(1)));
            match client.send_request("skald.start.checkout", request).await {
                Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
                other => Err(format!("{:?}", other.map(|m| m.payload))),
            }
        })
        .await;
}

/// A request over the inbound limits is refused before its body is read; the endpoint
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused() {
    let res = Resources::new(Backend::SqliteNats).await;
    let runtime = runtime(
        &res,
        RuntimeOptions {
            max_message_bytes: 4096,
            max_headers: 4,
            ..options()
        },
    )
    .await;
    let client = plain_client(&res).await;
    // A valid start, but 8 KiB.
    let mut big = order("order-8");
    big["customer_id"] = json!("c".repeat(8 * 1024));
    let answer = ask(&client, "checkout", json_body(json!({ "data": big }))).await;
    let (code, reason) = answer.refusal();
    assert_eq!(code, "too_large");
    assert!(
        reason.starts_with("oversized message: a body of") && reason.contains("at most 4096"),
        "{reason}"
    );
    assert_eq!(
        answer.header("Nats-Service-Error-Code").as_deref(),
        Some("413")
    );
    let mut headers = HeaderMap::new();
    for i in 0..5 {
        headers.insert(format!("X-Header-{i}").as_str(), "v");
    }
    let answer = ask_with(
        &client,
        "skald.start.checkout",
        headers,
        json_body(json!({ "data": order("order-8") })),
    )
    .await
    .expect("answered");
    let (code, reason) = answer.refusal();
    assert_eq!(code, "too_large");
    assert!(reason.contains("5 headers"), "{reason}");
    assert_eq!(stored_sagas(res.store.as_ref()).await, 0);
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("order-8") })),
    )
    .await;
    assert!(!answer.existing(), "{:?}", answer.body);
    runtime.shutdown().await;
}

/// The in-process bus serves the same requests (`Bus::request`), and answers "no
/// responders" for a type nobody serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_bus_serves_start_requests() {
    let res = Resources::new(Backend::MemoryInProcess).await;
    let env = TestEnv::start(&res, MemoryLedger::new(), reliable(), no_script()).await;
    let request = |ty: &str, body: Value| {
        let bus = Arc::clone(&env.bus);
        let subject = format!("skald.start.{ty}");
        async move {
            bus.request(&subject, Headers::new(), json_body(body), DEADLINE)
                .await
        }
    };
    let answer = request(
        "checkout",
        json!({ "data": order("order-9"), "key": "order-9" }),
    )
    .await
    .expect("answered");
    let body: Value = serde_json::from_slice(&answer.payload).expect("json");
    assert_eq!(body["existing"], false, "{body}");
    let id: SagaId = body["saga_id"].as_str().expect("id").parse().expect("uuid");
    wait_status(env.store.as_ref(), id, SagaStatus::Completed).await;
    let answer = request("checkout", json!({ "data": { "order_id": 9 } }))
        .await
        .expect("answered");
    let body: Value = serde_json::from_slice(&answer.payload).expect("json");
    assert_eq!(body["error"]["code"], "invalid_data", "{body}");
    assert_eq!(
        request("refund", json!({ "data": {} })).await,
        Err(BusError::NoResponders("skald.start.refund".into()))
    );
    env.shutdown().await;
}

/// A plain client of `principal` on `server`, on its own response prefix.
async fn secure_client(server: &SecureServer, principal: Principal) -> async_nats::Client {
    let options = match server.credential(principal) {
        Credential::Password { user, password } => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        Credential::Creds { path, .. } => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .expect("a creds file"),
        other => panic!("no plain client for {other:?} in this test"),
    };
    options
        .custom_inbox_prefix(principal.inbox_prefix())
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("{principal:?} connects: {e}"))
}

/// With the permissions of docs/security.md: the orchestrators serve start requests
/// (subscribe to `skald.start.>`, answer with `allow_responses`) without a violation; a
/// participant, which may not publish there, starts nothing.
async fn start_requests_are_permissioned(server: SecureServer) {
    let dir = TempDir::new();
    let store = sqlite_store(&dir).await;
    let orchestrator = NatsBus::connect(server.options(Principal::Orchestrator))
        .await
        .expect("the orchestrator connects");
    let checkout = checkout_definition(fast_timing()).expect("valid definition");
    let runtime = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(orchestrator)
        .register(&checkout)
        .options(options())
        .start()
        .await
        .expect("the runtime starts on the orchestrators' user");
    // A client that may start sagas (the test's unrestricted user, on its own prefix).
    let admin = secure_client(&server, Principal::Admin).await;
    let answer = ask(
        &admin,
        "checkout",
        json_body(json!({ "data": order("order-10"), "key": "order-10" })),
    )
    .await;
    assert!(!answer.existing(), "{:?}", answer.body);
    assert!(store.load(answer.saga_id()).await.expect("load").is_some());
    assert_eq!(server.violations(), Vec::<String>::new());

    // The payment service may not start sagas: the broker refuses its publish, and the
    // request is never answered.
    let payment = secure_client(&server, Principal::Service("payment")).await;
    let refused = async_nats::Request::new()
        .payload(json_body(
            json!({ "data": order("order-11"), "key": "order-11" }),
        ))
        .timeout(Some(Duration::from_secs(2)));
    let asking = tokio::spawn(async move {
        payment
            .send_request("skald.start.checkout", refused)
            .await
            .map(|m| m.payload)
    });
    server
        .wait_log(&["Publish Violation", "skald.start.checkout"])
        .await;
    let result = asking.await.expect("join");
    assert!(result.is_err(), "{result:?}");
    let key = SagaId::for_key(&checkout_type(), "order-11").expect("key");
    assert!(store.load(key).await.expect("load").is_none());
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_requests_are_permissioned_on_users() {
    start_requests_are_permissioned(SecureServer::users(Tls::None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_requests_are_permissioned_on_creds_files() {
    start_requests_are_permissioned(SecureServer::operator_mode()).await;
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Reaper(Option<std::process::Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn python() -> String {
    std::env::var("SKALD_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SKALD_TEST_PYTHON is not set: run the suite through scripts/test, which creates a \
             venv with nats-py (pip install nats-py) and sets it"
        )
    })
}

/// The Python script of docs/protocol.md's "Starting a saga": the first `python` block
/// of that section.
fn documented_python_client() -> String {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("docs/protocol.md");
    let section = page
        .split("\n## Starting a saga\n")
        .nth(1)
        .expect("docs/protocol.md has a section \"Starting a saga\"");
    let section = section.split("\n## ").next().unwrap_or(section);
    let script = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the section holds a python block");
    script.to_owned()
}

/// The Python client of docs/protocol.md ("Starting a saga"), run exactly as written
/// (nats-py only): it starts a keyed checkout saga, is answered the same saga again,
/// sees invalid data refused, and an unknown type has no responders; the saga completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_of_the_protocol_page_starts_a_saga() {
    let res = Resources::new(Backend::SqliteNats).await;
    let env = TestEnv::start(&res, MemoryLedger::new(), reliable(), no_script()).await;
    let script = res.dir.0.join("start_client.py");
    std::fs::write(&script, documented_python_client()).expect("write the script");
    let url = res.nats.as_ref().expect("nats").url();
    let child = std::process::Command::new(python())
        .arg(&script)
        .arg(&url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    let mut child = Reaper(Some(child));
    let status = Wait::new("the Python client to finish")
        .every(Duration::from_millis(20))
        .until_ok(async || match child.0.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Ok(status),
            Some(Ok(None)) => Err("still running".to_owned()),
            other => Err(format!("{other:?}")),
        })
        .await;
    let output = child
        .0
        .take()
        .expect("the child")
        .wait_with_output()
        .expect("its output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "{status}: {stdout}\n{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let id = SagaId::for_key(&checkout_type(), "order-42").expect("key");
    assert_eq!(
        lines,
        vec![
            json!([id.to_string(), false]),
            json!([id.to_string(), true]),
            json!({"code": "invalid_data",
                "reason": "decoding saga data: invalid type: string \"ten euros\", expected u64"}),
            json!("no responders"),
        ],
        "{stderr}"
    );
    assert_eq!(
        id.to_string(),
        "5cb93eeb-f221-8a6c-bdcc-79d9cf62661c",
        "as documented"
    );
    wait_status(env.store.as_ref(), id, SagaStatus::Completed).await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Forged reply subjects, floods, unknown outcomes, version skew, shutdown
// ---------------------------------------------------------------------------------

/// The id of checkout business key `key`.
fn keyed(key: &str) -> SagaId {
    SagaId::for_key(&checkout_type(), key).expect("key")
}

/// A JetStream stream's state, read by the test's admin.
async fn stream_state(
    admin: &async_nats::Client,
    stream: &str,
) -> async_nats::jetstream::stream::State {
    let js = async_nats::jetstream::new(admin.clone());
    let mut stream = js.get_stream(stream).await.expect("the stream exists");
    stream.info().await.expect("stream info").state.clone()
}

/// A sender allowed to send start requests (the storefront of docs/security.md) names a
/// JetStream API subject, or a lifecycle event's subject, as its request's reply
/// subject: the orchestrator (which answers with `allow_responses`) neither starts the
/// saga nor publishes anything there. The stream is not purged, no event is planted.
async fn forged_reply_subjects_are_neither_applied_nor_answered(server: SecureServer) {
    let dir = TempDir::new();
    let store = sqlite_store(&dir).await;
    let orchestrator = NatsBus::connect(server.options(Principal::Orchestrator))
        .await
        .expect("the orchestrator connects");
    let runtime = runtime_on(Arc::clone(&store), Arc::new(orchestrator), options()).await;
    let admin = secure_client(&server, Principal::Admin).await;
    let storefront = secure_client(&server, Principal::Storefront).await;

    // A legitimate start, from the storefront's own inbox: its saga's `started` event
    // puts a message in SKALD_EVENTS.
    let first = ask(
        &storefront,
        "checkout",
        json_body(json!({ "data": order("order-f0"), "key": "order-f0" })),
    )
    .await;
    assert!(!first.existing(), "{:?}", first.body);
    let before = Wait::new("the started event in SKALD_EVENTS")
        .until(async || {
            let state = stream_state(&admin, "SKALD_EVENTS").await;
            (state.messages > 0).then_some(state)
        })
        .await;
    let mut planted = admin
        .subscribe("skald.evt.checkout.completed")
        .await
        .expect("subscribe");
    admin.flush().await.expect("flush");

    for (key, reply) in [
        ("order-f1", "$JS.API.STREAM.PURGE.SKALD_EVENTS"),
        ("order-f2", "skald.evt.checkout.completed"),
        ("order-f3", "$JS.API.STREAM.PURGE.SKALD_REPLIES"),
        ("order-f4", "_INBOX.*"),
    ] {
        storefront
            .publish_with_reply(
                "skald.start.checkout",
                reply,
                json_body(json!({ "data": order(key), "key": key })),
            )
            .await
            .expect("the storefront may publish there");
    }
    // Served in order on one connection: once this one is answered, the forged ones
    // were read (and dropped) before it.
    let last = ask(
        &storefront,
        "checkout",
        json_body(json!({ "data": order("order-f5"), "key": "order-f5" })),
    )
    .await;
    assert!(!last.existing(), "{:?}", last.body);
    // Had the forged ones been started, their answers would go out as their starts
    // finish, about when this one's did: give them the time.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let after = stream_state(&admin, "SKALD_EVENTS").await;
    assert_eq!(
        after.first_sequence, before.first_sequence,
        "SKALD_EVENTS was purged: {after:?}"
    );
    assert!(after.messages >= before.messages, "{before:?} -> {after:?}");
    assert!(
        stream_state(&admin, "SKALD_REPLIES").await.first_sequence <= 1,
        "SKALD_REPLIES was purged"
    );
    let js = async_nats::jetstream::new(admin.clone());
    let events = js.get_stream("SKALD_EVENTS").await.expect("stream");
    assert!(
        events
            .get_last_raw_message_by_subject("skald.evt.checkout.completed")
            .await
            .is_err(),
        "an answer was planted as a lifecycle event"
    );
    assert!(
        tokio::time::timeout(
            Duration::from_millis(200),
            futures_util::StreamExt::next(&mut planted)
        )
        .await
        .is_err(),
        "something was published on skald.evt.checkout.completed"
    );
    for key in ["order-f1", "order-f2", "order-f3", "order-f4"] {
        assert!(
            store.load(keyed(key)).await.expect("load").is_none(),
            "{key} was started"
        );
    }
    assert!(store.load(keyed("order-f5")).await.expect("load").is_some());
    assert_eq!(server.violations(), Vec::<String>::new());
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reply_subjects_are_neither_applied_nor_answered_on_users() {
    forged_reply_subjects_are_neither_applied_nor_answered(SecureServer::users(Tls::None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reply_subjects_are_neither_applied_nor_answered_on_creds_files() {
    forged_reply_subjects_are_neither_applied_nor_answered(SecureServer::operator_mode()).await;
}

/// Sends `bodies` at once, each as a request of its own with `timeout`, and returns
/// each one's answer (or error) and how long it took.
async fn flood(
    client: &async_nats::Client,
    bodies: Vec<Bytes>,
    timeout: Duration,
) -> Vec<(Result<Answer, async_nats::RequestError>, Duration)> {
    futures_util::future::join_all(bodies.into_iter().map(|body| {
        let client = client.clone();
        async move {
            let begun = Instant::now();
            let request = async_nats::Request::new()
                .payload(body)
                .timeout(Some(timeout));
            let result = client
                .send_request("skald.start.checkout", request)
                .await
                .map(|m| Answer {
                    body: serde_json::from_slice(&m.payload).expect("a JSON answer"),
                    headers: m.headers,
                });
            (result, begun.elapsed())
        }
    }))
    .await
}

/// A flood beyond the byte budget of start requests, then one beyond
/// `max_in_flight_starts`, while the starts under way cannot finish (the store's commits
/// held): the requests past the limits are refused `unavailable` at once, before any
/// start could finish (nothing waits for capacity in memory), and nothing of them is
/// stored; the ones under way finish once the store commits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_capacity_is_refused_at_once() {
    let res = Resources::new(Backend::SqliteNats).await;
    let store = HookedStore::new(Arc::clone(&res.store));
    let runtime = runtime_on(
        store.clone(),
        res.bus().await,
        RuntimeOptions {
            max_in_flight_starts: 8,
            max_in_flight_bytes: 1024 * 1024,
            ..options()
        },
    )
    .await;
    let client = plain_client(&res).await;
    store.close();
    let begun = Instant::now();
    // 12 requests of 400 KiB (a long customer id): the byte budget (1 MiB) takes two.
    let big: Vec<Bytes> = (0..12)
        .map(|i| {
            let mut data = order(&format!("b-{i}"));
            data["customer_id"] = json!("c".repeat(400 * 1024));
            json_body(json!({ "data": data, "key": format!("b-{i}") }))
        })
        .collect();
    let big = tokio::spawn({
        let client = client.clone();
        async move { flood(&client, big, DEADLINE).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 60 small ones: the count (8, less the two big ones) takes six.
    let small: Vec<Bytes> = (0..60)
        .map(|i| json_body(json!({ "data": order(&format!("s-{i}")), "key": format!("s-{i}") })))
        .collect();
    let small = tokio::spawn({
        let client = client.clone();
        async move { flood(&client, small, DEADLINE).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let opened = begun.elapsed();
    store.open();

    let mut stored = 0;
    for (prefix, answers, most) in [
        ("b", big.await.expect("join"), 2),
        ("s", small.await.expect("join"), 6),
    ] {
        let mut started = 0;
        for (i, (answer, took)) in answers.iter().enumerate() {
            let key = format!("{prefix}-{i}");
            let answer = answer
                .as_ref()
                .unwrap_or_else(|e| panic!("{key} was not answered: {e}"));
            if answer.body.get("saga_id").is_some() {
                started += 1;
                continue;
            }
            let (code, reason) = answer.refusal();
            assert_eq!(code, "unavailable", "{key}: {reason}");
            assert!(
                reason.contains("at capacity") && reason.contains("nothing was stored"),
                "{reason}"
            );
            assert_eq!(
                answer.header("Nats-Service-Error-Code").as_deref(),
                Some("503")
            );
            assert!(
                *took < opened,
                "{key} was refused after {took:?}, not at once"
            );
            assert!(
                res.store.load(keyed(&key)).await.expect("load").is_none(),
                "{key} was refused, yet stored"
            );
        }
        assert!(
            (1..=most).contains(&started),
            "{prefix}: {started} under way at once, at most {most} expected"
        );
        stored += started;
    }
    assert_eq!(stored_sagas(res.store.as_ref()).await, stored);
    // Capacity is back: a new request starts.
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("s-after") })),
    )
    .await;
    assert!(!answer.existing(), "{:?}", answer.body);
    runtime.shutdown().await;
}

/// A start whose commit fails after it was applied (a connection lost during COMMIT: the
/// runtime cannot know): an unkeyed request is answered `unknown_outcome` (504) naming
/// the saga, which does exist, never "nothing was stored"; a keyed one is answered the
/// saga the store shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_outcome_is_unknown_is_never_said_to_have_stored_nothing() {
    let res = Resources::new(Backend::SqliteNats).await;
    let store = HookedStore::new(Arc::clone(&res.store));
    let runtime = runtime_on(store.clone(), res.bus().await, options()).await;
    let client = plain_client(&res).await;

    store.lie_once();
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("u-1") })),
    )
    .await;
    let (code, reason) = answer.refusal();
    assert_eq!(code, "unknown_outcome", "{reason}");
    assert_eq!(
        answer.header("Nats-Service-Error-Code").as_deref(),
        Some("504")
    );
    assert!(
        reason.contains("cannot be retried safely") && !reason.contains("nothing was stored"),
        "{reason}"
    );
    let id: SagaId = reason
        .split_whitespace()
        .find_map(|w| {
            w.trim_matches(|c: char| !c.is_ascii_hexdigit() && c != '-')
                .parse()
                .ok()
        })
        .expect("the reason names the saga");
    assert!(
        res.store.load(id).await.expect("load").is_some(),
        "the saga {id} the answer says may exist does"
    );

    store.lie_once();
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("u-2"), "key": "u-2" })),
    )
    .await;
    assert_eq!(answer.saga_id(), keyed("u-2"), "{:?}", answer.body);
    // Its own commit went through though reported lost: found in the store.
    assert_eq!(answer.body["existing"], true, "{:?}", answer.body);
    assert!(res.store.load(keyed("u-2")).await.expect("load").is_some());
    runtime.shutdown().await;
}

/// Data with fields the orchestrator's data type does not know (a client written for a
/// newer version of the saga type, during a rolling deploy) is refused `version_skew`
/// (503, retryable), naming the fields, and nothing is stored; a field set to `null`
/// reads as absent. A start's answer names the definition version it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_with_fields_this_version_does_not_know_is_refused_as_version_skew() {
    let res = Resources::new(Backend::SqliteNats).await;
    let runtime = runtime(&res, options()).await;
    let client = plain_client(&res).await;
    let mut newer = order("v-1");
    newer["gift_wrap"] = json!(true);
    newer["items"][0]["colour"] = json!("red");
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": newer, "key": "v-1" })),
    )
    .await;
    let (code, reason) = answer.refusal();
    assert_eq!(code, "version_skew", "{reason}");
    assert!(
        reason.contains("items[0].colour")
            && reason.contains("gift_wrap")
            && reason.contains("definition version 1"),
        "{reason}"
    );
    assert_eq!(
        answer.header("Nats-Service-Error-Code").as_deref(),
        Some("503")
    );
    assert!(res.store.load(keyed("v-1")).await.expect("load").is_none());
    assert_eq!(stored_sagas(res.store.as_ref()).await, 0);

    let mut with_nulls = order("v-2");
    with_nulls["coupon"] = json!(null);
    with_nulls["shipment_id"] = json!(null);
    let answer = ask(
        &client,
        "checkout",
        json_body(json!({ "data": with_nulls, "key": "v-2" })),
    )
    .await;
    assert!(!answer.existing(), "{:?}", answer.body);
    let version = checkout_definition(fast_timing())
        .expect("valid")
        .definition()
        .version();
    assert_eq!(answer.body["definition_version"], json!(version));
    let again = ask(
        &client,
        "checkout",
        json_body(json!({ "data": order("v-2"), "key": "v-2" })),
    )
    .await;
    assert!(again.existing());
    assert_eq!(again.body["definition_version"], json!(version));
    runtime.shutdown().await;
}

/// A runtime shutting down with start requests under way (the store's commits held) and
/// more arriving: every requester gets an answer or the broker's "no responders", none
/// waits out its timeout; a request answered `unavailable` stored nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_request_it_took() {
    let res = Resources::new(Backend::SqliteNats).await;
    let store = HookedStore::new(Arc::clone(&res.store));
    let runtime = runtime_on(
        store.clone(),
        res.bus().await,
        RuntimeOptions {
            max_in_flight_starts: 4,
            ..options()
        },
    )
    .await;
    let client = plain_client(&res).await;
    store.close();
    let timeout = Duration::from_secs(30);
    let body = |i: usize| {
        let key = format!("sd-{i}");
        json_body(json!({ "data": order(&key), "key": key }))
    };
    let first = tokio::spawn({
        let client = client.clone();
        async move { flood(&client, (0..8).map(body).collect(), timeout).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(runtime.shutdown());
    let second = tokio::spawn({
        let client = client.clone();
        async move { flood(&client, (8..16).map(body).collect(), timeout).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    store.open();
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the shutdown ends")
        .expect("join");
    let mut answers = first.await.expect("join");
    answers.extend(second.await.expect("join"));
    let mut seen = Vec::new();
    for (i, (result, took)) in answers.iter().enumerate() {
        assert!(
            *took < Duration::from_secs(15),
            "request {i} waited {took:?}"
        );
        match result {
            Ok(answer) => {
                let code = match answer.body.get("error") {
                    None => "started",
                    Some(_) => answer.refusal().0,
                };
                assert!(
                    ["started", "unavailable", "unknown_outcome"].contains(&code),
                    "request {i}: {:?}",
                    answer.body
                );
                if code == "unavailable" {
                    let key = format!("sd-{i}");
                    assert!(
                        res.store.load(keyed(&key)).await.expect("load").is_none(),
                        "{key} answered unavailable, yet stored"
                    );
                }
                seen.push(code.to_owned());
            }
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                seen.push("no responders".into())
            }
            Err(e) => panic!("request {i}: {e} after {took:?}"),
        }
    }
    assert!(seen.iter().any(|c| c == "unavailable"), "{seen:?}");
}
