//! Who may speak on the bus (issue 13), on real nats-servers configured as
//! docs/security.md says (tests/common/secure.rs generates the configurations):
//!
//! - every authentication method skald's binaries offer connects (user/password, TLS,
//!   mutual TLS, NKey, creds file in operator mode, token), and a wrong secret is refused
//!   with an error that does not repeat it;
//! - the least permissions hold: a participant cannot answer for another service,
//!   command one, read its commands or send operator requests; an operator cannot
//!   answer commands; every principal has a response prefix of its own
//!   (`_INBOX_<principal>`), and a participant cannot subscribe to anyone else's
//!   responses (nor to `_INBOX.>` or `>`), so it reads no other principal's pulled
//!   messages or publish acks;
//! - the checkout saga runs end to end with every participant on its own least-privilege
//!   user; a forged reply is dead-lettered, an expired operator request changes nothing,
//!   a client without operator permission cannot cancel, and no secret reaches the logs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use common::secure::{Credential, LogCapture, Principal, SERVICES, SecureServer, Tls};
use common::*;
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::definition::SagaDefinition;
use skald::ids::{SagaId, SagaType};
use skald::journal::{JournalRecord, Refused};
use skald::machine::SagaStatus;
use skald::participant::ParticipantHandle;
use skald::ports::{Bus, DeadLetterCategory, DeadLetterRecord, Headers, Message, SagaStore};
use skald::wire::{OperatorAction, OperatorRequest, encode_operator_request};
use skald::{Runtime, RuntimeOptions, SagaOutcome};
use skald_sagas::checkout::{Checkout, CheckoutTiming, check_consistency, checkout_definition};
use skald_sagas::sim::{Ledger, MemoryLedger};
use tokio::sync::mpsc::Receiver;

/// Connects `principal` to `server` through skald's own connector.
async fn connect(server: &SecureServer, principal: Principal) -> NatsBus {
    NatsBus::connect(server.options(principal))
        .await
        .unwrap_or_else(|e| panic!("{principal:?} connects to {}: {e}", server.url()))
}

/// The orchestrator connects first (it creates the streams), then everyone else.
async fn connect_everyone(server: &SecureServer) -> Vec<(Principal, NatsBus)> {
    let mut buses = vec![(
        Principal::Orchestrator,
        connect(server, Principal::Orchestrator).await,
    )];
    for p in Principal::all() {
        if p != Principal::Orchestrator {
            buses.push((p, connect(server, p).await));
        }
    }
    buses
}

/// Asserts that `error` names none of `secrets`.
fn assert_no_secret(error: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !error.contains(s.as_str()),
            "the error repeats a secret: {error}"
        );
    }
}

/// The last message stored on `subject` in `stream`, read by the test's admin.
async fn last_on(
    admin: &NatsBus,
    stream: &str,
    subject: &str,
) -> Option<async_nats::jetstream::message::StreamMessage> {
    let js = jetstream::new(admin.client().clone());
    let stream = js.get_stream(stream).await.expect("stream exists");
    stream.get_last_raw_message_by_subject(subject).await.ok()
}

/// Publishes (core NATS, through `bus`'s own connection) on `subject`, expects the
/// server to refuse it as a publish violation, and checks nothing landed in `stream`.
async fn refused_publish(
    server: &SecureServer,
    bus: &NatsBus,
    admin: &NatsBus,
    stream: &str,
    subject: &str,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        format!("forged:{}", uuid::Uuid::now_v7()).as_str(),
    );
    bus.client()
        .publish_with_headers(subject.to_owned(), headers, "{}".into())
        .await
        .expect("the client sends it");
    bus.client().flush().await.expect("flush");
    server
        .wait_log(&["Publish Violation", &format!("Subject \"{subject}\"")])
        .await;
    assert!(
        last_on(admin, stream, subject).await.is_none(),
        "a refused publish on {subject} landed in {stream}"
    );
}

// ---------------------------------------------------------------------------------
// B. Authentication methods
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_with_passwords_connect_and_a_wrong_password_is_refused() {
    let server = SecureServer::users(Tls::None);
    let buses = connect_everyone(&server).await;
    assert_eq!(buses.len(), Principal::all().len());
    let secrets = server.secrets();
    let mut wrong = server.options(Principal::Service("payment"));
    let wrong_password = "not-the-password-7f3a".to_owned();
    wrong.user_password = Some(("payment".into(), wrong_password.clone()));
    let err = NatsBus::connect(wrong)
        .await
        .expect_err("a wrong password is refused")
        .to_string();
    assert!(err.contains(&server.url()), "{err}");
    assert!(err.to_lowercase().contains("authorization"), "{err}");
    assert_no_secret(&err, &secrets);
    assert_no_secret(&err, &[wrong_password]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_servers_ca_connects_and_without_it_is_refused() {
    let server = SecureServer::users(Tls::Server);
    connect_everyone(&server).await;
    let mut untrusted = server.options(Principal::Orchestrator);
    untrusted.root_certificates = None;
    let err = NatsBus::connect(untrusted)
        .await
        .expect_err("a server certificate from an unknown CA is refused")
        .to_string();
    assert_no_secret(&err, &server.secrets());
    // Plain text to a server that requires TLS is refused too.
    let mut plain = server.options(Principal::Orchestrator);
    plain.require_tls = false;
    plain.root_certificates = None;
    let err = NatsBus::connect(plain)
        .await
        .expect_err("plain text is refused")
        .to_string();
    assert_no_secret(&err, &server.secrets());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_connects_with_a_client_certificate_and_without_one_is_refused() {
    let server = SecureServer::users(Tls::Mutual);
    connect_everyone(&server).await;
    let mut anonymous = server.options(Principal::Orchestrator);
    anonymous.client_certificate = None;
    let err = NatsBus::connect(anonymous)
        .await
        .expect_err("a client without a certificate is refused")
        .to_string();
    assert!(err.contains(&server.url()), "{err}");
    assert_no_secret(&err, &server.secrets());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_users_connect_and_an_unknown_key_is_refused() {
    let server = SecureServer::nkeys();
    connect_everyone(&server).await;
    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let mut wrong = server.options(Principal::Orchestrator);
    wrong.nkey_seed = Some(stranger.clone());
    let err = NatsBus::connect(wrong)
        .await
        .expect_err("an unknown NKey is refused")
        .to_string();
    assert_no_secret(&err, &server.secrets());
    assert_no_secret(&err, &[stranger]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_files_connect_in_operator_mode() {
    let server = SecureServer::operator_mode();
    connect_everyone(&server).await;
    // A creds file of a user the account never signed is refused.
    let stranger_account = nkeys::KeyPair::new_account();
    let stranger = nkeys::KeyPair::new_user();
    let jwt = common::secure::jwt::user(&stranger_account, &stranger, "stranger", None);
    let seed = stranger.seed().expect("seed");
    let path = std::env::temp_dir().join(format!("skald-stranger-{}.creds", uuid::Uuid::now_v7()));
    std::fs::write(&path, common::secure::jwt::creds(&jwt, &seed)).expect("write");
    let err = NatsBus::connect(NatsOptions {
        credentials_file: Some(path.clone()),
        ..NatsOptions::new(server.url())
    })
    .await
    .expect_err("a user of an unknown account is refused")
    .to_string();
    let _ = std::fs::remove_file(&path);
    assert_no_secret(&err, &server.secrets());
    assert_no_secret(&err, &[seed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_connects_and_a_wrong_token_is_refused() {
    let server = SecureServer::token();
    connect(&server, Principal::Orchestrator).await;
    let mut wrong = server.options(Principal::Orchestrator);
    let wrong_token = "not-the-token-91c2".to_owned();
    wrong.token = Some(wrong_token.clone());
    let err = NatsBus::connect(wrong)
        .await
        .expect_err("a wrong token is refused")
        .to_string();
    assert!(err.contains(&server.url()), "{err}");
    assert_no_secret(&err, &server.secrets());
    assert_no_secret(&err, &[wrong_token]);
    let mut none = server.options(Principal::Orchestrator);
    none.token = None;
    NatsBus::connect(none)
        .await
        .expect_err("no token is refused");
    assert!(matches!(
        server.credential(Principal::Orchestrator),
        Credential::Token(_)
    ));
}

// ---------------------------------------------------------------------------------
// B. Least permissions
// ---------------------------------------------------------------------------------

/// A participant answers only for itself: it cannot publish another service's replies,
/// commands, operator requests, events or dead letters; its own reply lands.
async fn participants_speak_only_for_themselves(server: &SecureServer) {
    let buses = connect_everyone(server).await;
    let bus = |p: Principal| {
        buses
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, b)| b)
            .expect("connected")
    };
    let admin = bus(Principal::Admin);
    let payment = bus(Principal::Service("payment"));
    let ty = format!("t{}", uuid::Uuid::now_v7().simple());
    for (stream, subject) in [
        ("SKALD_REPLIES", format!("skald.reply.inventory.{ty}.0")),
        ("SKALD_OPS", format!("skald.op.{ty}.0")),
        ("SKALD_COMMANDS", format!("skald.cmd.inventory.{ty}")),
        ("SKALD_EVENTS", format!("skald.evt.{ty}.completed")),
        ("SKALD_DLQ", format!("skald.dlq.{ty}")),
    ] {
        refused_publish(server, payment, admin, stream, &subject).await;
    }
    // Its own reply subject is open to it (a JetStream publish, acknowledged).
    let own = format!("skald.reply.payment.{ty}.0");
    let js = jetstream::new(payment.client().clone());
    js.publish(own.clone(), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    assert!(last_on(admin, "SKALD_REPLIES", &own).await.is_some());
    // An operator publishes operator requests, and nothing that answers a command.
    let operator = bus(Principal::Operator);
    refused_publish(
        server,
        operator,
        admin,
        "SKALD_REPLIES",
        &format!("skald.reply.payment.{ty}.0x"),
    )
    .await;
    refused_publish(
        server,
        operator,
        admin,
        "SKALD_COMMANDS",
        &format!("skald.cmd.payment.{ty}x"),
    )
    .await;
    let op = format!("skald.op.{ty}.0");
    jetstream::new(operator.client().clone())
        .publish(op.clone(), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    assert!(last_on(admin, "SKALD_OPS", &op).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_permissions_of_users_hold() {
    let server = SecureServer::users(Tls::None);
    participants_speak_only_for_themselves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_permissions_of_creds_users_hold() {
    let server = SecureServer::operator_mode();
    participants_speak_only_for_themselves(&server).await;
}

/// A participant reads its own commands only: it can neither create (or re-point) a
/// consumer on another service's commands nor pull from another service's consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_cannot_read_another_services_commands() {
    let server = SecureServer::users(Tls::None);
    let buses = connect_everyone(&server).await;
    let payment = buses
        .iter()
        .find(|(p, _)| *p == Principal::Service("payment"))
        .map(|(_, b)| b.clone())
        .expect("payment");
    let client = payment.client().clone();
    // Raw JetStream API requests, answered (or not) within a short timeout.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let stream = js
        .get_stream("SKALD_COMMANDS")
        .await
        .expect("stream info is allowed");
    let config = |durable: &str, filter: &str, listed: bool| jetstream::consumer::pull::Config {
        durable_name: Some(durable.into()),
        // One filter goes in the API subject (`...CREATE.<stream>.<durable>.<filter>`);
        // a list of filters does not (`...CREATE.<stream>.<durable>`): the permission
        // names the filter, so only the first form is open, for its own filter.
        filter_subject: if listed { String::new() } else { filter.into() },
        filter_subjects: if listed {
            vec![filter.into()]
        } else {
            Vec::new()
        },
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    let attempts = [
        config("inventory", "skald.cmd.inventory.>", false),
        config("payment", "skald.cmd.inventory.>", false),
        config("payment", "skald.cmd.>", false),
        config("payment", "skald.cmd.inventory.>", true),
    ];
    let refused =
        futures_util::future::join_all(attempts.iter().map(|c| stream.create_consumer(c.clone())))
            .await;
    for (c, r) in attempts.iter().zip(refused) {
        assert!(
            r.is_err(),
            "payment created consumer {:?} on {:?}{:?}",
            c.durable_name,
            c.filter_subject,
            c.filter_subjects
        );
    }
    // Its own consumer, on its own commands, is allowed.
    let own = jetstream::consumer::pull::Config {
        durable_name: Some("payment".into()),
        filter_subject: "skald.cmd.payment.>".into(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    stream
        .create_consumer(own)
        .await
        .expect("its own consumer, on its own commands");
    server
        .wait_log(&[
            "Publish Violation",
            "Subject \"$JS.API.CONSUMER.CREATE.SKALD_COMMANDS.inventory.skald.cmd.inventory.>\"",
        ])
        .await;
    // Pulling from inventory's consumer is refused too (by the broker, whether or not
    // the consumer exists).
    client
        .publish(
            "$JS.API.CONSUMER.MSG.NEXT.SKALD_COMMANDS.inventory",
            "{\"batch\":1}".into(),
        )
        .await
        .expect("sent");
    client.flush().await.expect("flush");
    server
        .wait_log(&[
            "Publish Violation",
            "Subject \"$JS.API.CONSUMER.MSG.NEXT.SKALD_COMMANDS.inventory\"",
        ])
        .await;
}

/// How the server's log names `principal` in a violation: `"<account>/user:payment"`
/// for a configuration user, the public key for an NKey or a JWT user.
fn logged_as(server: &SecureServer, principal: Principal) -> String {
    match server.credential(principal) {
        Credential::Password { user, .. } => format!("/user:{user}\""),
        Credential::NKey { public, .. } => public.clone(),
        Credential::Creds { seed, .. } => nkeys::KeyPair::from_seed(seed)
            .expect("a user seed")
            .public_key(),
        Credential::Token(_) => String::new(),
    }
}

/// Waits for the next message of `subscriber`, for at most `wait`.
async fn next_within(
    subscriber: &mut async_nats::Subscriber,
    wait: Duration,
) -> Option<async_nats::Message> {
    use futures_util::StreamExt as _;
    tokio::time::timeout(wait, subscriber.next())
        .await
        .ok()
        .flatten()
}

/// A participant reads no other principal's responses: its client answers on its own
/// prefix (`_INBOX_payment`) and it may subscribe below that prefix only, so the server
/// refuses its subscriptions to the default prefix (`_INBOX.>`), to another service's
/// and the orchestrators' prefixes, and to everything (`>`), and delivers nothing to
/// them while the orchestrator publishes a command (publish ack on
/// `_INBOX_orchestrator`), inventory pulls it (on `_INBOX_inventory`) and a client on
/// the default prefix asks for a stream's information (on `_INBOX`). The test's admin,
/// watching the same prefixes, sees all of it; the payment service's own responses
/// still reach it.
async fn participants_read_only_their_own_responses(server: &SecureServer) {
    let buses = connect_everyone(server).await;
    let bus = |p: Principal| {
        buses
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, b)| b)
            .expect("connected")
    };
    let payment = bus(Principal::Service("payment"));
    let admin = bus(Principal::Admin);
    assert_eq!(
        server
            .options(Principal::Service("payment"))
            .inbox_prefix
            .as_deref(),
        Some("_INBOX_payment")
    );
    let payment_user = logged_as(server, Principal::Service("payment"));
    let forbidden = [
        "_INBOX.>",
        "_INBOX_inventory.>",
        "_INBOX_orchestrator.>",
        ">",
    ];
    let mut spies = Vec::new();
    for subject in forbidden {
        // The client sends SUB without waiting for an answer: the server answers a
        // refusal with -ERR (an async-nats event) and logs it.
        let sub = payment
            .client()
            .subscribe(subject)
            .await
            .expect("the client sends SUB");
        spies.push((subject, sub));
    }
    payment.client().flush().await.expect("flush");
    for subject in forbidden {
        server
            .wait_log(&[
                "Subscription Violation",
                &payment_user,
                &format!("Subject \"{subject}\""),
            ])
            .await;
    }
    // The test's admin watches the three prefixes (its own responses come on
    // `_INBOX_admin`, which none of them covers).
    let mut watchers = Vec::new();
    for subject in &forbidden[..3] {
        let sub = admin
            .client()
            .subscribe(subject.to_string())
            .await
            .expect("admin subscribes");
        watchers.push((*subject, sub));
    }
    admin.client().flush().await.expect("flush");
    // The orchestrator commands inventory (a JetStream publish, acknowledged on its
    // inbox) ...
    let ty = format!("t{}", uuid::Uuid::now_v7().simple());
    let secret_body = format!("{{\"card\":\"{}\"}}", uuid::Uuid::now_v7());
    let orchestrator = bus(Principal::Orchestrator);
    jetstream::new(orchestrator.client().clone())
        .publish(
            format!("skald.cmd.inventory.{ty}"),
            secret_body.clone().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    // ... inventory pulls it through its own consumer (delivered on its inbox) ...
    let inventory = bus(Principal::Service("inventory"));
    let commands = jetstream::new(inventory.client().clone())
        .get_stream("SKALD_COMMANDS")
        .await
        .expect("stream info");
    let consumer = commands
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("inventory".into()),
            filter_subject: "skald.cmd.inventory.>".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("inventory's own consumer");
    let pulled = {
        use futures_util::StreamExt as _;
        consumer
            .fetch()
            .max_messages(1)
            .messages()
            .await
            .expect("fetch")
            .next()
            .await
            .expect("a command")
            .expect("pulled")
    };
    assert_eq!(pulled.payload, secret_body.as_bytes());
    pulled.ack().await.expect("ack");
    // ... and a client on the default prefix asks for a stream's information.
    let default_prefix = NatsBus::connect(NatsOptions {
        inbox_prefix: None,
        ..server.options(Principal::Admin)
    })
    .await
    .expect("a client on the default prefix");
    jetstream::new(default_prefix.client().clone())
        .get_stream("SKALD_EVENTS")
        .await
        .expect("stream info");
    // The responses flowed on every watched prefix; on inventory's, the command. (On
    // the orchestrators' and the default prefix, a response the watcher missed under a
    // loaded machine is asked for again, with one more stream-information request.)
    let started = tokio::time::Instant::now();
    for (subject, watcher) in &mut watchers {
        Wait::new(format!("a response on {subject}"))
            .within(DEADLINE.saturating_sub(started.elapsed()))
            .every(Duration::ZERO)
            .until_ok(async || {
                let Some(seen) = next_within(watcher, Duration::from_secs(2)).await else {
                    let asker = match *subject {
                        "_INBOX_orchestrator.>" => Some(orchestrator.client().clone()),
                        "_INBOX.>" => Some(default_prefix.client().clone()),
                        _ => None,
                    };
                    if let Some(client) = asker {
                        jetstream::new(client)
                            .get_stream("SKALD_EVENTS")
                            .await
                            .expect("stream info");
                    }
                    return Err("nothing within 2 s: asked again".to_owned());
                };
                if *subject != "_INBOX_inventory.>" || seen.payload == secret_body.as_bytes() {
                    Ok(())
                } else {
                    Err(format!("another message on {}", seen.subject))
                }
            })
            .await;
    }
    // Payment's refused subscriptions received none of it.
    for (subject, spy) in &mut spies {
        if let Some(m) = next_within(spy, Duration::from_millis(500)).await {
            panic!("payment read {} through {subject}: {m:?}", m.subject);
        }
    }
    // Its own responses still reach it, on its own prefix.
    jetstream::new(payment.client().clone())
        .get_stream("SKALD_COMMANDS")
        .await
        .expect("payment's own stream info request is answered");
    // The four refused subscriptions are all the server refused.
    let violations = server.violations();
    assert_eq!(violations.len(), forbidden.len(), "{violations:#?}");
    assert!(
        violations
            .iter()
            .all(|v| v.contains("Subscription Violation") && v.contains(&payment_user)),
        "{violations:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_cannot_read_other_principals_responses() {
    let server = SecureServer::users(Tls::None);
    participants_read_only_their_own_responses(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_participant_cannot_read_other_principals_responses() {
    let server = SecureServer::operator_mode();
    participants_read_only_their_own_responses(&server).await;
}

/// A client of the payment user left on the default inbox prefix (`_INBOX`, no
/// `--inbox-prefix`) gets no JetStream answer: the server refuses its response
/// subscription and says so in its log (what docs/security.md tells operators to look
/// for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_its_inbox_prefix_gets_no_responses() {
    let server = SecureServer::users(Tls::None);
    connect(&server, Principal::Orchestrator).await;
    let Credential::Password { user, password } = server.credential(Principal::Service("payment"))
    else {
        panic!("a user with a password");
    };
    let client = async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        .connect(server.url())
        .await
        .expect("the user connects");
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client);
    js.get_stream("SKALD_COMMANDS")
        .await
        .expect_err("no answer reaches _INBOX");
    server
        .wait_log(&[
            "Subscription Violation",
            "/user:payment\"",
            "Subject \"_INBOX.",
        ])
        .await;
}

// ---------------------------------------------------------------------------------
// C. End to end: the checkout saga with every principal on its own user
// ---------------------------------------------------------------------------------

/// The checkout saga on `server`: a SQLite store, the runtime on the orchestrators'
/// user, each simulated service in `services` on its own user (started now; the others
/// with [`SecureEnv::start_service`]).
struct SecureEnv {
    dir: TempDir,
    store: Arc<dyn SagaStore>,
    ledger: MemoryLedger,
    runtime: Runtime,
    checkout: SagaDefinition<Checkout>,
    outcomes: Receiver<SagaOutcome>,
    participants: Vec<ParticipantHandle>,
}

/// Fast retries, and a reply timeout long enough that a saga waits for a service the
/// test starts late on its first attempt.
fn patient_timing() -> CheckoutTiming {
    CheckoutTiming {
        timeout: Duration::from_secs(60),
        ..fast_timing()
    }
}

impl SecureEnv {
    async fn start(
        server: &SecureServer,
        services: &[&'static str],
        options: RuntimeOptions,
    ) -> SecureEnv {
        let dir = TempDir::new();
        let store = common::sqlite_store(&dir).await;
        let orchestrator = connect(server, Principal::Orchestrator).await;
        let checkout = checkout_definition(patient_timing()).expect("valid definition");
        let runtime = Runtime::builder()
            .store(Arc::clone(&store))
            .bus(Arc::new(orchestrator))
            .register(&checkout)
            .options(options)
            .start()
            .await
            .expect("the runtime starts on the orchestrators' user");
        let outcomes = runtime.outcomes();
        let mut env = SecureEnv {
            dir,
            store,
            ledger: MemoryLedger::new(),
            runtime,
            checkout,
            outcomes,
            participants: Vec::new(),
        };
        for s in services {
            env.start_service(server, s).await;
        }
        env
    }

    /// Starts the simulated `service` on its own user.
    async fn start_service(&mut self, server: &SecureServer, service: &'static str) {
        let bus: Arc<dyn Bus> = Arc::new(connect(server, Principal::Service(service)).await);
        let ledger = self.ledger.clone();
        let started = tokio::spawn(async move {
            start_participants(bus, ledger, reliable(), no_script(), &[service]).await
        })
        .await;
        match started {
            Ok(handles) => self.participants.extend(handles),
            // Say which permission was missing: the server logs what it refused.
            Err(e) => panic!(
                "the {service} service could not start on its own user ({e}); the server \
                 refused: {:#?}",
                server.violations()
            ),
        }
    }

    async fn start_order(&self, n: usize) -> SagaId {
        self.runtime
            .start_saga(&self.checkout, &tea_order(&format!("order-{n}")))
            .await
            .expect("saga starts")
            .id()
    }

    /// Waits until `id` has reserved its stock and waits for the charge.
    async fn awaiting_payment(&self, id: SagaId) {
        wait_saga(self.store.as_ref(), id, "waits for the charge", |s| {
            s.state.status == SagaStatus::Running
                && s.state.completed == 1
                && s.state.pending.is_some()
        })
        .await;
    }

    /// Checks the services' records against the sagas' outcomes.
    async fn assert_consistent(&self, settled: &[(SagaId, SagaStatus)]) {
        let records = self.ledger.records().await.expect("records");
        let report = check_consistency(settled, &records);
        assert!(report.is_consistent(), "{:?}", report.violations);
    }

    /// The reply-token key the runtime took from the store (the shared secret).
    async fn reply_key(&self) -> Vec<u8> {
        self.store
            .shared_secret("reply-token", b"not the key: one exists already")
            .await
            .expect("the store keeps the reply-token key")
    }

    /// Poison dead letters whose reason starts with `prefix`.
    async fn poison_with(&self, prefix: &str) -> Vec<DeadLetterRecord> {
        self.store
            .dead_letters(false, 1000)
            .await
            .expect("dead letters")
            .into_iter()
            .filter(|d| d.category == DeadLetterCategory::Poison && d.reason.starts_with(prefix))
            .collect()
    }

    async fn shutdown(self) {
        self.runtime.shutdown().await;
        drop(self.participants);
        drop(self.dir);
    }
}

/// Asserts that nothing captured in the logs contains any of `secrets`.
fn assert_logs_clean(capture: &LogCapture, secrets: &[String]) {
    let logs = capture.text();
    assert!(!logs.is_empty(), "the capture received the test's logs");
    for s in secrets {
        assert!(s.len() >= 8, "a secret worth looking for");
        if let Some(at) = logs.find(s.as_str()) {
            let line = logs[..at].rsplit('\n').next().unwrap_or_default();
            panic!("a secret was logged, in the line starting: {line}");
        }
    }
}

/// Six checkout sagas complete with the runtime on the orchestrators' user and each
/// service on its own: the least permissions suffice (the server refuses nothing), every
/// reply carries its token, and no secret is logged.
async fn checkout_end_to_end(server: SecureServer) {
    let capture = LogCapture::install();
    let mut env = SecureEnv::start(&server, &SERVICES, options()).await;
    let ids: Vec<SagaId> = futures_util::future::join_all((0..6).map(|n| env.start_order(n))).await;
    let outcomes = await_outcomes(&mut env.outcomes, &ids).await;
    let settled: Vec<(SagaId, SagaStatus)> = outcomes.iter().map(|o| (o.id, o.status)).collect();
    assert!(
        settled.iter().all(|(_, s)| *s == SagaStatus::Completed),
        "{settled:?}"
    );
    env.assert_consistent(&settled).await;
    assert!(
        env.store
            .dead_letters(false, 10)
            .await
            .expect("dead letters")
            .is_empty(),
        "nothing was dead-lettered"
    );
    // Every reply carried the token skald set on its command: the stored replies do.
    let admin = connect(&server, Principal::Admin).await;
    // (On the reply subject of the saga's partition.)
    let subject = format!("skald.reply.shipping.checkout.{}", ids[0].partition(16));
    let reply = last_on(&admin, "SKALD_REPLIES", &subject)
        .await
        .expect("a shipping reply is stored");
    assert!(
        reply.headers.get("Skald-Reply-Token").is_some(),
        "the reply echoes the token: {:?}",
        reply.headers
    );
    // Least privilege sufficed: the server refused nothing skald or a service did.
    assert_eq!(server.violations(), Vec::<String>::new());
    let key = data_encoding::HEXLOWER.encode(&env.reply_key().await);
    let mut secrets = server.secrets();
    secrets.push(key);
    env.shutdown().await;
    assert_logs_clean(&capture, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_end_to_end_on_users_over_mutual_tls() {
    checkout_end_to_end(SecureServer::users(Tls::Mutual)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_end_to_end_on_creds_files() {
    checkout_end_to_end(SecureServer::operator_mode()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_end_to_end_on_nkeys() {
    checkout_end_to_end(SecureServer::nkeys()).await;
}

/// A reply with the right headers but a wrong or missing token, or sent by the wrong
/// service on its own subject, is dead-lettered as forged; the saga is not moved by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replies_are_dead_lettered_and_the_saga_still_finishes() {
    let capture = LogCapture::install();
    let server = SecureServer::users(Tls::None);
    // No payment service yet: the saga waits for its charge.
    let mut env = SecureEnv::start(&server, &["inventory", "shipping"], options()).await;
    let id = env.start_order(1).await;
    env.awaiting_payment(id).await;
    let forge = |token: Option<&str>| {
        let key = format!("{id}:charge_payment:action");
        let mut h = Headers::new();
        h.insert("Skald-Saga-Id", id.to_string());
        h.insert("Skald-Saga-Type", "checkout");
        h.insert("Skald-Step", "charge_payment");
        h.insert("Skald-Kind", "action");
        h.insert("Skald-Attempt", "1");
        h.insert("Skald-Idempotency-Key", key.as_str());
        h.insert("Skald-Outcome", "failure");
        h.insert(
            "Nats-Msg-Id",
            format!("reply:{key}:1:failure:{}", uuid::Uuid::now_v7()),
        );
        if let Some(t) = token {
            h.insert("Skald-Reply-Token", t);
        }
        (
            h,
            Bytes::from_static(br#"{"code":"card_declined","message":"forged"}"#),
        )
    };
    let payment = connect(&server, Principal::Service("payment")).await;
    let inventory = connect(&server, Principal::Service("inventory")).await;
    let wrong = "ab".repeat(32);
    for (bus, subject, token) in [
        // The payment service's user, on its own subject: a wrong token, no token.
        (
            &payment,
            "skald.reply.payment.checkout.0",
            Some(wrong.as_str()),
        ),
        (&payment, "skald.reply.payment.checkout.0", None),
        // The inventory service's user answers for the payment step on its own subject.
        (
            &inventory,
            "skald.reply.inventory.checkout.0",
            Some(wrong.as_str()),
        ),
    ] {
        let (headers, payload) = forge(token);
        bus.publish(Message {
            subject: subject.into(),
            headers,
            payload,
        })
        .await
        .expect("the user may publish on its own reply subject");
    }
    let forged = wait_until("three forged replies dead-lettered", || async {
        let found = env.poison_with("forged reply").await;
        (found.len() == 3).then_some(found)
    })
    .await;
    // Filed under no saga (the sender chose the saga id: runtime/src/runtime.rs), the
    // message kept as it came, naming the saga it claims.
    assert!(
        forged.iter().all(|d| d.saga_id.is_none()
            && d.message
                .as_ref()
                .is_some_and(|m| m["headers"].to_string().contains(&id.to_string()))),
        "{forged:?}"
    );
    assert!(
        forged.iter().any(|d| d.reason.contains("service payment")
            && d.reason.contains("service inventory")),
        "the wrong service is named: {forged:?}"
    );
    assert!(
        forged
            .iter()
            .any(|d| d.reason.contains("Skald-Reply-Token")),
        "the token is named: {forged:?}"
    );
    assert_eq!(
        env.store
            .load(id)
            .await
            .expect("load")
            .expect("saga")
            .state
            .status,
        SagaStatus::Running
    );
    // The real payment service answers: the saga completes as if nothing happened.
    env.start_service(&server, "payment").await;
    let outcome = await_outcomes(&mut env.outcomes, &[id]).await;
    assert_eq!(outcome[0].status, SagaStatus::Completed);
    assert!(
        !journal_inputs(env.store.as_ref(), id)
            .await
            .iter()
            .any(|i| i.contains("failed")),
        "no forged failure reached the saga: {:?}",
        journal_inputs(env.store.as_ref(), id).await
    );
    env.assert_consistent(&[(id, SagaStatus::Completed)]).await;
    assert_eq!(server.violations(), Vec::<String>::new());
    let mut secrets = server.secrets();
    secrets.push(data_encoding::HEXLOWER.encode(&env.reply_key().await));
    env.shutdown().await;
    assert_logs_clean(&capture, &secrets);
}

/// Operator requests: only the operators' user may publish them; with an allowlist,
/// only a listed key's signature counts; an expired one changes nothing; a valid one is
/// applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_requests_need_the_operators_user_a_listed_key_and_time() {
    let capture = LogCapture::install();
    let server = SecureServer::users(Tls::None);
    let alice = nkeys::KeyPair::new_user();
    let alice_seed = alice.seed().expect("seed");
    let mallory_seed = nkeys::KeyPair::new_user().seed().expect("seed");
    let mut opts = options();
    opts.operators.insert("alice".into(), alice.public_key());
    let mut env = SecureEnv::start(&server, &["inventory", "shipping"], opts).await;
    let kept = env.start_order(1).await;
    let cancelled = env.start_order(2).await;
    env.awaiting_payment(kept).await;
    env.awaiting_payment(cancelled).await;
    let operator = connect(&server, Principal::Operator).await;
    let ty = SagaType::new("checkout").expect("type");
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms");
    let cancel = || OperatorAction::Cancel {
        reason: "test".into(),
    };
    let request = |id: SagaId, issued_ms: u64, ttl: Duration, seed: Option<&str>, name: &str| {
        let mut r = OperatorRequest::new(id, ty.clone(), cancel(), name, issued_ms, ttl);
        if let Some(seed) = seed {
            r.sign(seed).expect("sign");
        }
        r
    };
    // Signed by alice, but expired a minute ago: journaled as ignored, nothing changes.
    let expired = request(
        kept,
        now_ms - 120_000,
        Duration::from_secs(60),
        Some(&alice_seed),
        "alice",
    );
    // Unsigned, and signed by a key not in the allowlist: dead-lettered, never applied.
    let unsigned = request(kept, now_ms, Duration::from_secs(300), None, "alice");
    let stranger = request(
        kept,
        now_ms,
        Duration::from_secs(300),
        Some(&mallory_seed),
        "alice",
    );
    for r in [&expired, &unsigned, &stranger] {
        operator
            .publish(encode_operator_request(r))
            .await
            .expect("the operators' user may publish operator requests");
    }
    let record = wait_until("the expired request journaled as ignored", || async {
        journal_records(env.store.as_ref(), kept)
            .await
            .into_iter()
            .find(|r| r.causation() == Some(expired.request_id.as_str()))
    })
    .await;
    let JournalRecord::Ignored(ignored) = record else {
        panic!("the expired request was applied: {record:?}");
    };
    assert_eq!(ignored.refused, Some(Refused::Condition), "{ignored:?}");
    assert!(ignored.ignored.contains("expired"), "{ignored:?}");
    let refused = wait_until(
        "the unsigned and stranger's requests dead-lettered",
        || async {
            let found = env.poison_with("operator request").await;
            (found.len() == 2).then_some(found)
        },
    )
    .await;
    assert!(
        refused.iter().any(|d| d.reason.contains("unsigned"))
            && refused.iter().any(|d| d.reason.contains("allowlist")),
        "{refused:?}"
    );
    // A participant's user may not publish operator requests at all: the broker refuses
    // it, so no runtime ever sees it.
    let payment = connect(&server, Principal::Service("payment")).await;
    let mut forged = request(
        kept,
        now_ms,
        Duration::from_secs(300),
        Some(&alice_seed),
        "alice",
    );
    forged.sign(&alice_seed).expect("sign");
    let m = encode_operator_request(&forged);
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in m.headers.iter() {
        headers.insert(k, v);
    }
    payment
        .client()
        .publish_with_headers(m.subject.clone(), headers, m.payload.clone())
        .await
        .expect("sent");
    payment.client().flush().await.expect("flush");
    server
        .wait_log(&["Publish Violation", &format!("Subject \"{}\"", m.subject)])
        .await;
    // Alice's valid request cancels the other saga (once its charge in flight answers).
    let valid = request(
        cancelled,
        now_ms,
        Duration::from_secs(300),
        Some(&alice_seed),
        "alice",
    );
    operator
        .publish(encode_operator_request(&valid))
        .await
        .expect("publish");
    wait_until("alice's cancel journaled", || async {
        journal_records(env.store.as_ref(), cancelled)
            .await
            .into_iter()
            .find(|r| {
                matches!(r, JournalRecord::Transition(_))
                    && r.causation() == Some(valid.request_id.as_str())
            })
    })
    .await;
    env.start_service(&server, "payment").await;
    let outcomes = await_outcomes(&mut env.outcomes, &[kept, cancelled]).await;
    let settled: Vec<(SagaId, SagaStatus)> = outcomes.iter().map(|o| (o.id, o.status)).collect();
    for (id, status) in &settled {
        let want = if *id == kept {
            SagaStatus::Completed
        } else {
            SagaStatus::Compensated
        };
        assert_eq!(*status, want, "saga {id}");
    }
    let journal = journal_records(env.store.as_ref(), kept).await;
    for r in [&unsigned, &stranger, &forged] {
        assert!(
            !journal
                .iter()
                .any(|e| e.causation() == Some(r.request_id.as_str())),
            "request {} reached the saga",
            r.request_id
        );
    }
    env.assert_consistent(&settled).await;
    // The participant's operator request is the only thing the server refused.
    let violations = server.violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    let mut secrets = server.secrets();
    secrets.extend([alice_seed, mallory_seed]);
    secrets.push(data_encoding::HEXLOWER.encode(&env.reply_key().await));
    env.shutdown().await;
    assert_logs_clean(&capture, &secrets);
}
