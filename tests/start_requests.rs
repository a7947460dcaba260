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
//!   start requests and a participant may not send them.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use common::secure::{Credential, Principal, SecureServer, Tls};
use common::*;
use serde_json::{Value, json};
use skald::adapters::nats::NatsBus;
use skald::ids::{SagaId, SagaType};
use skald::machine::SagaStatus;
use skald::ports::{BusError, Headers, SagaStore};
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
    let checkout = checkout_definition(fast_timing()).expect("valid definition");
    Runtime::builder()
        .store(Arc::clone(&res.store))
        .bus(res.bus().await)
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
    // A runtime that stops stops serving (once the broker has its unsubscription: a
    // request the stopped runtime still took is left unanswered).
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
