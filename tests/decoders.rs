//! Every inbound decoder, fed what a hostile or broken sender (or a damaged row) can
//! hold: arbitrary bytes, arbitrary headers (many of them, huge ones, duplicates,
//! multi-byte and control characters, the replacement characters of bytes that were not
//! UTF-8), numbers out of range. None may panic; a value that decodes re-encodes to
//! something that decodes to the same value.
//!
//! Decoders covered: the bus's ([`wire::decode_reply`], [`wire::decode_command`],
//! [`wire::decode_operator_request`], lifecycle events as [`wire::EventV1`], the
//! operator signature and reply token checks, `traceparent`, reply subjects, ids and
//! names), the stored rows' ([`SagaState`] and the machine run on it, [`Input`],
//! [`JournalEntry`] and the journal replay, [`DeadLetterRecord`], outbox headers,
//! [`Message::to_record`]) and the upcasters.
//!
//! Case count: `PROPTEST_CASES` (proptest's default configuration reads it; 256 per
//! property when unset). A long run:
//! `PROPTEST_CASES=100000 cargo test --release --all-features --test decoders`.

use std::sync::OnceLock;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use skald::definition::Definition;
use skald::ids::{CommandKind, SagaId, SagaType, StepName};
use skald::journal::JournalRecord;
use skald::machine::{
    self, Command, EventKind, Input, LifecycleEvent, SagaState, StepError, Timestamp,
};
use skald::ports::{DeadLetterRecord, Headers, JournalEntry, Message};
use skald::retry::Jitter;
use skald::trace::TraceContext;
use skald::upcast::Upcasters;
use skald::wire::{self, Outcome};
use skald_sagas::checkout::{Checkout, CheckoutTiming, LineItem, checkout_definition};

// ---------------------------------------------------------------------------------------
// Configuration and comparisons
// ---------------------------------------------------------------------------------------

/// Proptest's defaults (`PROPTEST_CASES` read from the environment), no regression
/// files written next to the tests (a failure prints the minimal case).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// JSON equality that lets a float differ in its last bit (serde_json's default parser
/// does not promise a float's exact round trip).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y || (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs())
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| same_json(a, b)))
        }
        _ => a == b,
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("a decoded value serializes")
}

// ---------------------------------------------------------------------------------------
// Strategies: text, numbers, JSON, headers, messages
// ---------------------------------------------------------------------------------------

/// Characters that trip naive code: multi-byte (2, 3 and 4 bytes), NUL, DEL, a BOM, a
/// right-to-left override, the replacement character, separators of subjects and ids.
const NASTY: &[char] = &[
    'é', '✓', '𝄞', '\u{0}', '\u{7f}', '\u{feff}', '\u{202e}', '\u{fffd}', 'a', 'Z', '0', '.', '-',
    '_', ':', '*', '>', ' ', '\n', '"', '\\', '{',
];

/// Short text of any kind.
fn small_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z0-9._:-]{0,16}",
        3 => any::<String>(),
        2 => vec(any::<u8>(), 0..48).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        2 => vec(select(NASTY), 0..24).prop_map(|c| c.into_iter().collect()),
    ]
    .boxed()
}

/// Text a sender may put anywhere, now and then huge (up to 256 KiB of multi-byte
/// characters).
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        12 => small_text(),
        1 => (select(NASTY), 1_000usize..65_536)
            .prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
    .boxed()
}

/// A number as a header holds it: in and out of every integer range, signed,
/// padded, in other notations or scripts, or not a number at all.
fn number() -> BoxedStrategy<String> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        select(vec![
            "0",
            "1",
            "2",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "-0",
            "+1",
            " 1",
            "1 ",
            "1e3",
            "0x10",
            "١",
            "",
            "000000000000000000000000000001",
        ])
        .prop_map(String::from),
        small_text(),
    ]
    .boxed()
}

fn saga_id_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).simple().to_string()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string().to_uppercase()),
    ]
    .boxed()
}

/// Names (saga types, steps): valid ones, now and then at the 64-character limit or
/// one past it.
fn name_text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[a-z0-9_-]{1,12}",
        2 => select(vec!["checkout", "reserve_inventory", "charge_payment", "ship_order"])
            .prop_map(String::from),
        1 => "[a-z]{64,65}",
    ]
    .boxed()
}

/// Keys and tokens: printable ASCII, hex digests, now and then at the length limit.
fn key_text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[!-~][ -~]{0,40}",
        2 => "[a-f0-9]{64}",
        1 => (250usize..262).prop_map(|n| "k".repeat(n)),
    ]
    .boxed()
}

fn attempt_text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => (1u32..10).prop_map(|n| n.to_string()),
        1 => any::<u32>().prop_map(|n| n.max(1).to_string()),
        1 => Just(u32::MAX.to_string()),
    ]
    .boxed()
}

fn millis_text() -> BoxedStrategy<String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("0".to_owned()),
    ]
    .boxed()
}

/// Arbitrary JSON, floats included (finite: JSON has no other).
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        small_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((small_text(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A failure's body: `{"code", "message"}` of any text (and now and then fields of
/// another type, or one more field).
fn error_body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => (text(), text()).prop_map(|(c, m)| {
            serde_json::to_vec(&json!({ "code": c, "message": m })).expect("json")
        }),
        1 => (json_value(), json_value(), proptest::option::of(json_value())).prop_map(
            |(code, message, extra)| {
                let mut e = json!({ "code": code, "message": message });
                if let Some(x) = extra {
                    e["extra"] = x;
                }
                serde_json::to_vec(&e).expect("json")
            }
        ),
    ]
    .boxed()
}

/// A body that is not what any decoder wants: bytes that are not JSON, nesting past
/// any parser's limit, a large string.
fn junk_body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..256),
        1 => (1usize..20_000).prop_map(|n| "[".repeat(n).into_bytes()),
        1 => (1usize..20_000).prop_map(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n))
            .into_bytes()),
        1 => (0usize..300_000).prop_map(|n| format!("\"{}\"", "é".repeat(n)).into_bytes()),
    ]
    .boxed()
}

/// Any body: JSON of any shape, a failure's, junk.
fn body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        2 => error_body(),
        2 => junk_body(),
    ]
    .boxed()
}

/// A change to a message's headers.
#[derive(Debug, Clone)]
enum HeaderEdit {
    /// Removes the n-th header.
    Drop(prop::sample::Index),
    /// Replaces the n-th header's value.
    Set(prop::sample::Index, String),
    /// Adds a second value of the n-th header's name, before or after it.
    Twice(prop::sample::Index, String, bool),
    /// Adds a header of any name.
    Add(String, String),
    /// Adds thousands of small headers.
    Flood(usize),
}

fn header_edit() -> BoxedStrategy<HeaderEdit> {
    let value = prop_oneof![text(), number()];
    prop_oneof![
        3 => any::<prop::sample::Index>().prop_map(HeaderEdit::Drop),
        4 => (any::<prop::sample::Index>(), value.clone()).prop_map(|(i, v)| HeaderEdit::Set(i, v)),
        2 => (any::<prop::sample::Index>(), value.clone(), any::<bool>())
            .prop_map(|(i, v, before)| HeaderEdit::Twice(i, v, before)),
        2 => (prop_oneof![small_text(), Just("skald-saga-id".to_owned())], value)
            .prop_map(|(n, v)| HeaderEdit::Add(n, v)),
        1 => (1_000usize..5_000).prop_map(HeaderEdit::Flood),
    ]
    .boxed()
}

/// Headers: every one of `known` with a valid value, then (half the time) up to three
/// edits: some removed, values replaced by anything, names given twice, headers of any
/// name, now and then thousands of them.
fn headers(known: Vec<(&'static str, BoxedStrategy<String>)>) -> BoxedStrategy<Headers> {
    let valid: Vec<BoxedStrategy<(String, String)>> = known
        .into_iter()
        .map(|(name, value)| value.prop_map(move |v| (name.to_owned(), v)).boxed())
        .collect();
    let edits = prop_oneof![1 => Just(Vec::new()), 1 => vec(header_edit(), 1..4)];
    (valid, edits)
        .prop_map(|(mut pairs, edits)| {
            for e in edits {
                let n = pairs.len();
                match e {
                    HeaderEdit::Drop(i) if n > 0 => {
                        pairs.remove(i.index(n));
                    }
                    HeaderEdit::Set(i, v) if n > 0 => pairs[i.index(n)].1 = v,
                    HeaderEdit::Twice(i, v, before) if n > 0 => {
                        let i = i.index(n);
                        let name = pairs[i].0.clone();
                        pairs.insert(if before { i } else { i + 1 }, (name, v));
                    }
                    HeaderEdit::Add(name, v) => pairs.push((name, v)),
                    HeaderEdit::Flood(count) => {
                        pairs.extend((0..count).map(|i| (format!("X-{i}"), "v".to_owned())));
                    }
                    _ => {}
                }
            }
            let mut h = Headers::new();
            // `append` keeps every pair, duplicates included (a broker's header map
            // may hold several values of one name).
            pairs.into_iter().for_each(|(n, v)| h.append(n, v));
            h
        })
        .boxed()
}

fn subject() -> BoxedStrategy<String> {
    prop_oneof![
        (name_text(), name_text(), number())
            .prop_map(|(s, t, p)| format!("skald.reply.{s}.{t}.{p}")),
        (name_text(), name_text()).prop_map(|(s, a)| format!("skald.cmd.{s}.{a}")),
        name_text().prop_map(|t| format!("skald.op.{t}.0")),
        text(),
    ]
    .boxed()
}

fn message(
    known: Vec<(&'static str, BoxedStrategy<String>)>,
    body: BoxedStrategy<Vec<u8>>,
) -> BoxedStrategy<Message> {
    (subject(), headers(known), body)
        .prop_map(|(subject, headers, payload)| Message {
            subject,
            headers,
            payload: Bytes::from(payload),
        })
        .boxed()
}

/// The headers commands and replies share.
fn envelope_headers() -> Vec<(&'static str, BoxedStrategy<String>)> {
    vec![
        (wire::H_SAGA_ID, saga_id_text()),
        (wire::H_SAGA_TYPE, name_text()),
        (wire::H_STEP, name_text()),
        (
            wire::H_KIND,
            select(vec!["action", "compensation"])
                .prop_map(String::from)
                .boxed(),
        ),
        (wire::H_ATTEMPT, attempt_text()),
        (wire::H_IDEMPOTENCY_KEY, key_text()),
        (wire::H_REPLY_TOKEN, key_text()),
        (wire::H_MSG_ID, key_text()),
        (wire::H_TRACEPARENT, traceparent_text()),
    ]
}

fn reply_message() -> BoxedStrategy<Message> {
    let mut known = envelope_headers();
    known.push((
        wire::H_OUTCOME,
        select(vec!["success", "failure", "retryable"])
            .prop_map(String::from)
            .boxed(),
    ));
    message(known, body())
}

fn command_message() -> BoxedStrategy<Message> {
    let mut known = envelope_headers();
    known.extend([
        (wire::H_REPLY_TO, subject()),
        (wire::H_DEADLINE, millis_text()),
        (wire::H_SCHEMA_VERSION, attempt_text()),
        (wire::H_DEFINITION_VERSION, attempt_text()),
        (wire::H_ACTION_KEY, key_text()),
        (
            wire::H_IN_DOUBT,
            select(vec!["true", "false"]).prop_map(String::from).boxed(),
        ),
    ]);
    let body = prop_oneof![
        3 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        1 => junk_body(),
    ]
    .boxed();
    message(known, body)
}

fn operator_message() -> BoxedStrategy<Message> {
    let known = vec![
        (wire::H_SAGA_ID, saga_id_text()),
        (wire::H_SAGA_TYPE, name_text()),
        // Request ids start with `op:` (anything else is refused); sometimes not.
        (
            wire::H_MSG_ID,
            prop_oneof![
                4 => key_text().prop_map(|k| format!("op:{k}")),
                1 => key_text(),
            ]
            .boxed(),
        ),
        (
            wire::H_OPERATOR_ACTION,
            select(vec!["redrive", "cancel"])
                .prop_map(String::from)
                .boxed(),
        ),
        (wire::H_OPERATOR, text()),
        (wire::H_EXPIRES, millis_text()),
        (wire::H_IF_REDRIVES, attempt_text()),
        (wire::H_IF_VERSION, millis_text()),
        (
            wire::H_OPERATOR_KEY,
            prop_oneof![Just(operator_seed().1.clone()), "U[A-Z2-7]{55}", key_text()].boxed(),
        ),
        (
            wire::H_SIGNATURE,
            prop_oneof!["[A-Za-z0-9_-]{86}", key_text()].boxed(),
        ),
    ];
    let body = prop_oneof![
        4 => text().prop_map(|r| serde_json::to_vec(&json!({ "reason": r })).expect("json")),
        1 => (1_000usize..1_100)
            .prop_map(|n| serde_json::to_vec(&json!({ "reason": "r".repeat(n) })).expect("json")),
        1 => Just(b"{}".to_vec()),
        2 => body(),
    ]
    .boxed();
    message(known, body)
}

fn traceparent_text() -> BoxedStrategy<String> {
    prop_oneof![
        (any::<u128>(), any::<u64>(), any::<u8>())
            .prop_map(|(t, s, f)| format!("00-{t:032x}-{s:016x}-{f:02x}")),
        (any::<u8>(), any::<u128>(), any::<u64>(), small_text())
            .prop_map(|(v, t, s, rest)| format!("{v:02x}-{t:032x}-{s:016x}-01-{rest}")),
        small_text(),
    ]
    .boxed()
}

/// One operator key pair for the whole run: (seed, public key).
fn operator_seed() -> &'static (String, String) {
    static SEED: OnceLock<(String, String)> = OnceLock::new();
    SEED.get_or_init(|| {
        let pair = nkeys::KeyPair::new_user();
        (
            pair.seed().expect("a new pair has a seed"),
            pair.public_key(),
        )
    })
}

// ---------------------------------------------------------------------------------------
// The bus's decoders
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Replies: no panic; a decoded reply, re-encoded the way a participant answers,
    /// decodes to the same reply.
    #[test]
    fn replies_decode_without_panic_and_round_trip(m in reply_message()) {
        let _ = wire::reply_subject_parts(&m.subject);
        let _ = wire::is_operator_request(&m);
        let Ok(reply) = wire::decode_reply(&m) else {
            return Ok(());
        };
        prop_assert!(reply.attempt >= 1);
        prop_assert!(!reply.idempotency_key.is_empty());
        prop_assert!(reply.idempotency_key.len() <= wire::MAX_KEY_LEN);
        let command = wire::IncomingCommand {
            subject: "skald.cmd.x.y".into(),
            envelope: reply.envelope(),
            reply_to: m.subject.clone(),
            traceparent: m.headers.get(wire::H_TRACEPARENT).map(str::to_owned),
            schema_version: 1,
            action_key: None,
            in_doubt: false,
            deadline_ms: 0,
            reply_token: reply.reply_token.clone(),
            payload: Value::Null,
        };
        let again = wire::encode_reply(&command, &reply.outcome);
        prop_assert_eq!(&again.subject, &m.subject);
        let back = wire::decode_reply(&again).expect("a re-encoded reply decodes");
        prop_assert_eq!(back.envelope(), reply.envelope());
        prop_assert_eq!(&back.reply_token, &reply.reply_token);
        match (&back.outcome, &reply.outcome) {
            (Outcome::Success(a), Outcome::Success(b)) => prop_assert!(same_json(a, b)),
            (a, b) => prop_assert_eq!(a, b),
        }
    }

    /// Commands: no panic; a decoded command, re-encoded, decodes to the same command,
    /// and its reply (every outcome) decodes as a reply to it.
    #[test]
    fn commands_decode_without_panic_and_round_trip(m in command_message()) {
        let Ok(c) = wire::decode_command(&m) else {
            return Ok(());
        };
        let _ = c.action_key();
        let _ = wire::reply_traceparent(&c);
        let env = &c.envelope;
        let command = Command {
            saga_id: env.saga_id,
            saga_type: env.saga_type.clone(),
            step: env.step.clone(),
            kind: env.kind,
            attempt: env.attempt,
            subject: c.subject.clone(),
            payload: c.payload.clone(),
            idempotency_key: env.idempotency_key.clone(),
            message_id: m.headers.get(wire::H_MSG_ID).unwrap_or("m").to_owned(),
            deadline: Timestamp(c.deadline_ms),
            schema_version: c.schema_version,
            definition_version: 1,
            action_key: c.action_key.clone(),
            in_doubt: c.in_doubt,
        };
        let again = wire::encode_command(&command).expect("encode");
        let back = wire::decode_command(&again).expect("a re-encoded command decodes");
        prop_assert_eq!(&back.envelope, &c.envelope);
        prop_assert!(same_json(&back.payload, &c.payload));
        prop_assert_eq!(back.schema_version, c.schema_version);
        prop_assert_eq!(back.deadline_ms, c.deadline_ms);
        prop_assert_eq!(&back.action_key, &c.action_key);
        if c.action_key.is_some() {
            prop_assert_eq!(back.in_doubt, c.in_doubt);
        }
        for outcome in [
            Outcome::Success(c.payload.clone()),
            Outcome::Failure(StepError::new("declined", "no")),
            Outcome::Retryable(StepError::new("busy", env.idempotency_key.clone())),
        ] {
            let reply = wire::encode_reply(&c, &outcome);
            let decoded = wire::decode_reply(&reply).expect("the reply to a command decodes");
            prop_assert_eq!(decoded.envelope(), c.envelope.clone());
            prop_assert_eq!(&decoded.reply_token, &c.reply_token);
        }
    }

    /// Operator requests: no panic; a decoded request re-encodes to itself; its
    /// signature check never panics, and a request signed here verifies after a round
    /// trip over the wire.
    #[test]
    fn operator_requests_decode_without_panic_and_round_trip(m in operator_message()) {
        let Ok(mut r) = wire::decode_operator_request(&m) else {
            return Ok(());
        };
        prop_assert!(r.operator.chars().count() <= 64);
        if let (Some(key), Some(sig)) = (&r.key, &r.signature) {
            let _ = skald_runtime::auth::verify_signature(key, &wire::operator_signing_bytes(&r), sig);
        }
        let back = wire::decode_operator_request(&wire::encode_operator_request(&r))
            .expect("a re-encoded request decodes");
        prop_assert_eq!(&back, &r);
        r.sign(&operator_seed().0).expect("sign");
        let back = wire::decode_operator_request(&wire::encode_operator_request(&r))
            .expect("a signed request decodes");
        prop_assert_eq!(&back, &r);
        let (Some(key), Some(sig)) = (&back.key, &back.signature) else {
            return Err(TestCaseError::fail("the signed request lost its key"));
        };
        prop_assert_eq!(
            skald_runtime::auth::verify_signature(key, &wire::operator_signing_bytes(&back), sig),
            Ok(())
        );
    }

    /// Reply tokens: any token text checks without panic (and never verifies);
    /// `SKALD_REPLY_KEYS`-style text parses without panic.
    #[test]
    fn reply_tokens_and_keys_check_without_panic(
        token in prop_oneof![key_text(), text()],
        keys in prop_oneof![text(), "[0-9a-fA-F,]{0,200}"],
        id in any::<u128>(),
    ) {
        let _ = skald_runtime::auth::ReplyKeys::parse(&keys);
        let env = wire::Envelope {
            saga_id: SagaId::from_uuid(uuid::Uuid::from_u128(id)),
            saga_type: SagaType::new("checkout").expect("type"),
            step: StepName::new("charge_payment").expect("step"),
            kind: CommandKind::Action,
            attempt: 1,
            idempotency_key: "k".into(),
        };
        let reply_keys = skald_runtime::auth::ReplyKeys::new([vec![7u8; 32]]).expect("keys");
        prop_assert!(reply_keys.verify(&env, Some(&token)).is_err());
        let _ = skald_runtime::auth::check_operator_key(&token);
    }

    /// Lifecycle events (what a consumer of `skald.evt.>` decodes): no panic; an event
    /// decodes to itself after a round trip; every event skald encodes decodes.
    #[test]
    fn events_decode_without_panic_and_round_trip(
        raw in body(),
        step in proptest::option::of(name_text()),
        error in proptest::option::of((text(), text())),
        attempt in proptest::option::of(any::<u32>()),
        at in any::<u64>(),
        causation in text(),
    ) {
        if let Ok(ev) = serde_json::from_slice::<wire::EventV1>(&raw) {
            let back: wire::EventV1 =
                serde_json::from_slice(&serde_json::to_vec(&ev).expect("encode")).expect("decode");
            prop_assert!(same_json(&to_json(&back), &to_json(&ev)));
        }
        let ev = LifecycleEvent {
            event: EventKind::StepFailed,
            saga_id: SagaId::new(),
            saga_type: SagaType::new("checkout").expect("type"),
            step: step.and_then(|s| StepName::new(s).ok()),
            kind: Some(CommandKind::Compensation),
            attempt,
            error: error.map(|(c, m)| StepError::new(c, m)),
            at: Timestamp(at),
        };
        let m = wire::encode_event(&ev, &causation).expect("encode");
        let decoded: wire::EventV1 = serde_json::from_slice(&m.payload).expect("decode");
        prop_assert_eq!(decoded.attempt, ev.attempt);
        prop_assert_eq!(&decoded.error, &ev.error);
        prop_assert_eq!(decoded.at_ms, at);
        prop_assert_eq!(&decoded.causation_id, &causation);
    }

    /// `traceparent`, subjects, ids and names: no panic; what parses prints back to
    /// itself.
    #[test]
    fn trace_contexts_ids_and_names_parse_without_panic(
        tp in traceparent_text(),
        s in prop_oneof![text(), subject(), saga_id_text(), name_text()],
    ) {
        for value in [&tp, &s] {
            if let Ok(cx) = TraceContext::parse(value) {
                prop_assert_eq!(TraceContext::parse(&cx.to_string()), Ok(cx));
            }
            if let Ok(id) = value.parse::<SagaId>() {
                prop_assert_eq!(id.to_string().parse::<SagaId>().ok(), Some(id));
            }
            if let Ok(t) = SagaType::new(value.as_str()) {
                prop_assert_eq!(t.as_str(), value.as_str());
            }
            let _ = StepName::new(value.as_str());
            let _ = value.parse::<CommandKind>();
            let _ = skald::ids::service_of(value);
            let _ = skald::ids::check_subject(value);
            if let Some((service, ty, p)) = wire::reply_subject_parts(value)
                && let Ok(ty) = SagaType::new(ty)
                && p.to_string() == value.rsplit('.').next().unwrap_or_default()
            {
                prop_assert_eq!(&wire::reply_subject(service, &ty, p), value);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Stored rows
// ---------------------------------------------------------------------------------------

fn checkout() -> &'static skald::definition::SagaDefinition<Checkout> {
    static DEF: OnceLock<skald::definition::SagaDefinition<Checkout>> = OnceLock::new();
    DEF.get_or_init(|| checkout_definition(CheckoutTiming::default()).expect("valid"))
}

fn def() -> &'static Definition {
    checkout().definition()
}

const T0: u64 = 1_800_000_000_000;

fn order() -> Value {
    json!(Checkout::new(
        "o-1",
        "c-1",
        vec![LineItem {
            sku: "tea".into(),
            quantity: 2
        }],
        500
    ))
}

/// Inputs that drive a checkout saga through every kind of transition.
fn scenario(which: u8) -> Vec<Input> {
    let step = |s: &str| StepName::new(s).expect("step");
    let ok = |s: &str, kind, attempt, output| Input::StepSucceeded {
        step: step(s),
        kind,
        attempt,
        output,
    };
    let mut inputs = vec![
        Input::Started,
        ok(
            "reserve_inventory",
            CommandKind::Action,
            1,
            json!({ "reservation_id": "r-1" }),
        ),
        Input::TimedOut {
            step: step("charge_payment"),
            kind: CommandKind::Action,
            attempt: 1,
            jitter: Jitter::new(0.5),
        },
        Input::RetryDue {
            step: step("charge_payment"),
            kind: CommandKind::Action,
            attempt: 1,
        },
    ];
    match which % 3 {
        0 => inputs.extend([
            ok(
                "charge_payment",
                CommandKind::Action,
                1,
                json!({ "payment_id": "p-1" }),
            ),
            ok(
                "ship_order",
                CommandKind::Action,
                1,
                json!({ "shipment_id": "s-1" }),
            ),
        ]),
        1 => inputs.extend([
            ok(
                "charge_payment",
                CommandKind::Action,
                2,
                json!({ "payment_id": "p-1" }),
            ),
            Input::StepFailed {
                step: step("ship_order"),
                kind: CommandKind::Action,
                attempt: 1,
                retryable: false,
                error: StepError::new("declined", "no"),
                jitter: Jitter::NONE,
            },
            Input::StepFailed {
                step: step("charge_payment"),
                kind: CommandKind::Compensation,
                attempt: 1,
                retryable: false,
                error: StepError::new("broken", "refund failed"),
                jitter: Jitter::NONE,
            },
            Input::Redriven,
            ok("charge_payment", CommandKind::Compensation, 2, Value::Null),
            ok(
                "reserve_inventory",
                CommandKind::Compensation,
                1,
                Value::Null,
            ),
        ]),
        _ => inputs.extend([
            Input::CancelRequested {
                reason: "changed my mind".into(),
            },
            Input::Resumed,
            ok(
                "charge_payment",
                CommandKind::Action,
                2,
                json!({ "payment_id": "p-1" }),
            ),
            ok("charge_payment", CommandKind::Compensation, 1, Value::Null),
            ok(
                "reserve_inventory",
                CommandKind::Compensation,
                1,
                Value::Null,
            ),
        ]),
    }
    inputs
}

/// A real run of `scenario(which)`: every state it went through, and its journal as
/// the runtime writes it (with a snapshot entry after the third transition).
fn run(which: u8) -> (Vec<SagaState>, Vec<JournalEntry>) {
    let id = SagaId::from_uuid(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0001 + u128::from(which),
    ));
    let mut state = SagaState::new(id, def(), order(), Timestamp(T0));
    let mut states = vec![state.clone()];
    let mut journal = Vec::new();
    let mut now = T0;
    for (i, input) in scenario(which).into_iter().enumerate() {
        // Timers are due a day later: always due.
        now += 86_400_000;
        let (next, effects) = machine::transition(def(), &state, &input, Timestamp(now))
            .unwrap_or_else(|e| panic!("scenario {which}, input {i} ({}): {e}", input.name()));
        let record = skald::journal::Transition::new(
            &input,
            &next,
            &effects,
            (i == 0).then_some(&state),
            Some("reply:1"),
        );
        journal.push(JournalEntry::new(
            Timestamp(now),
            &skald::journal::JournalRecord::Transition(record),
        ));
        if i == 2 {
            journal.push(JournalEntry::new(
                Timestamp(now),
                &skald::replay::snapshot(&next, "retries"),
            ));
        }
        state = next;
        states.push(state.clone());
    }
    (states, journal)
}

fn runs() -> &'static Vec<(Vec<SagaState>, Vec<JournalEntry>)> {
    static RUNS: OnceLock<Vec<(Vec<SagaState>, Vec<JournalEntry>)>> = OnceLock::new();
    RUNS.get_or_init(|| (0..3).map(run).collect())
}

/// A change to a JSON document: the `n`-th node (pre-order, modulo the node count)
/// replaced by a value, or removed from its object or array.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, Value),
    Remove(usize),
}

fn edit() -> BoxedStrategy<Edit> {
    let value = prop_oneof![
        3 => select(vec![
            json!(0),
            json!(1),
            json!(2),
            json!(3),
            json!(-1),
            json!(u32::MAX),
            json!(u64::from(u32::MAX) + 1),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1.5),
            json!(1e300),
            json!(null),
            json!(""),
            json!("running"),
            json!("failed"),
            json!("compensation"),
            json!("ship_order"),
            json!([]),
            json!({}),
        ]),
        2 => json_value(),
    ];
    prop_oneof![
        4 => (any::<usize>(), value).prop_map(|(n, v)| Edit::Replace(n, v)),
        1 => any::<usize>().prop_map(Edit::Remove),
    ]
    .boxed()
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Applies `edit` to `doc`; the root is never removed.
fn apply(doc: &mut Value, edit: &Edit) {
    fn walk(v: &mut Value, target: &mut usize, edit: &Edit) -> bool {
        // Children first checked against the target, so a removal happens in the parent.
        let children: Vec<usize> = match v {
            Value::Array(a) => (0..a.len()).collect(),
            Value::Object(o) => (0..o.len()).collect(),
            _ => Vec::new(),
        };
        for i in children {
            *target -= 1;
            if *target == 0 {
                match (edit, &mut *v) {
                    (Edit::Replace(_, new), Value::Array(a)) => a[i] = new.clone(),
                    (Edit::Replace(_, new), Value::Object(o)) => {
                        if let Some((_, slot)) = o.iter_mut().nth(i) {
                            *slot = new.clone();
                        }
                    }
                    (Edit::Remove(_), Value::Array(a)) => {
                        a.remove(i);
                    }
                    (Edit::Remove(_), Value::Object(o)) => {
                        if let Some(k) = o.keys().nth(i).cloned() {
                            o.remove(&k);
                        }
                    }
                    _ => {}
                }
                return true;
            }
            let child = match v {
                Value::Array(a) => &mut a[i],
                Value::Object(o) => match o.iter_mut().nth(i) {
                    Some((_, c)) => c,
                    None => return true,
                },
                _ => return true,
            };
            if walk(child, target, edit) {
                return true;
            }
        }
        false
    }
    let nodes = count_nodes(doc);
    let n = match edit {
        Edit::Replace(n, _) | Edit::Remove(n) => *n,
    };
    // 1..nodes: a node below the root (the root itself is never the target).
    if nodes < 2 {
        return;
    }
    let mut target = 1 + n % (nodes - 1);
    walk(doc, &mut target, edit);
}

/// Every input the machine takes, aimed at the checkout's steps, with counters from
/// the wire's whole range.
fn inputs(attempt: u32) -> Vec<Input> {
    let mut all = vec![
        Input::Started,
        Input::Redriven,
        Input::Resumed,
        Input::CancelRequested { reason: "x".into() },
        Input::DataUnreadable {
            error: StepError::new("data_unreadable", "x"),
        },
    ];
    for s in ["reserve_inventory", "charge_payment", "ship_order"] {
        let step = StepName::new(s).expect("step");
        for kind in [CommandKind::Action, CommandKind::Compensation] {
            all.push(Input::StepSucceeded {
                step: step.clone(),
                kind,
                attempt,
                output: json!({ "reservation_id": "r", "payment_id": "p", "shipment_id": "s" }),
            });
            all.push(Input::StepFailed {
                step: step.clone(),
                kind,
                attempt,
                retryable: attempt.is_multiple_of(2),
                error: StepError::new("in_progress", "x"),
                jitter: Jitter::new(0.3),
            });
            all.push(Input::TimedOut {
                step: step.clone(),
                kind,
                attempt,
                jitter: Jitter::NONE,
            });
            all.push(Input::RetryDue {
                step: step.clone(),
                kind,
                attempt,
            });
        }
    }
    all
}

proptest! {
    #![proptest_config(config())]

    /// Saga rows: a stored state, damaged anywhere (indexes and counters out of range,
    /// fields missing or of another type), decodes or is refused; one that decodes
    /// round-trips, and the machine given it and any input answers (a new state or a
    /// typed refusal) without a panic.
    #[test]
    fn saga_rows_decode_and_run_without_panic(
        run in 0usize..3,
        pick in any::<prop::sample::Index>(),
        edits in vec(edit(), 0..4),
        attempt in prop_oneof![0u32..4, Just(u32::MAX), any::<u32>()],
    ) {
        let states = &runs()[run].0;
        let mut doc = to_json(pick.get(states));
        for e in &edits {
            apply(&mut doc, e);
        }
        let Ok(state) = serde_json::from_value::<SagaState>(doc) else {
            return Ok(());
        };
        let back: SagaState = serde_json::from_value(to_json(&state)).expect("round trip");
        prop_assert!(same_json(&to_json(&back), &to_json(&state)));
        let now = Timestamp(T0 + 10 * 86_400_000);
        let _ = state.wake_at();
        let _ = state.compensation_bound();
        let _ = state.pending.map(|p| p.attempts_used());
        let _ = state.due_input(def(), now, Jitter::new(0.9));
        let _ = machine::check_state(def(), &state);
        for input in inputs(attempt) {
            if let Ok((next, _)) = machine::transition(def(), &state, &input, now)
                && !next.status.is_terminal()
            {
                // What it leads to decodes back as well.
                let again: SagaState =
                    serde_json::from_value(to_json(&next)).expect("a new state round-trips");
                prop_assert!(same_json(&to_json(&again), &to_json(&next)));
            }
        }
    }

    /// Journals: entries damaged anywhere (their inputs, effects, snapshots, starting
    /// data) replay, diverge or are refused without a panic; inputs that decode
    /// round-trip.
    #[test]
    fn journals_decode_and_replay_without_panic(
        run in 0usize..3,
        edits in vec((any::<prop::sample::Index>(), edit()), 0..4),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
        schema in prop_oneof![8 => Just(skald::ports::JOURNAL_SCHEMA_VERSION), 1 => any::<u16>()],
    ) {
        let (states, journal) = &runs()[run];
        let mut journal = journal.clone();
        for (at, e) in &edits {
            let i = at.index(journal.len());
            apply(&mut journal[i].body, e);
        }
        if let Some(t) = truncate {
            journal.truncate(t.index(journal.len() + 1));
        }
        if let Some(first) = journal.first_mut() {
            first.schema_version = schema;
        }
        for entry in &journal {
            let row: JournalEntry =
                serde_json::from_value(to_json(entry)).expect("an entry round-trips");
            prop_assert!(same_json(&to_json(&row), &to_json(entry)));
            // What decodes as a typed record encodes back to a row that decodes to it.
            if let Ok(record) = entry.record() {
                let again = JournalEntry::new(entry.at, &record)
                    .record()
                    .expect("a re-encoded record decodes");
                prop_assert!(same_json(&to_json(&again), &to_json(&record)));
            }
            if let Some(Ok(input)) = entry
                .body
                .get("input")
                .map(|v| serde_json::from_value::<Input>(v.clone()))
            {
                let back: Input = serde_json::from_value(to_json(&input)).expect("round trip");
                prop_assert!(same_json(&to_json(&back), &to_json(&input)));
            }
        }
        let id = states[0].id;
        let _ = skald::replay::replay(def(), id, &journal, None);
        let _ = skald::replay::replay(def(), id, &journal, Some(Timestamp(T0 + 200_000_000)));
        let last = states.last().expect("a run has states");
        let _ = skald::replay::check(def(), last, &journal);
        let mut upcasters = Upcasters::new();
        upcasters.register(skald::replay::JOURNAL_PAYLOAD_TYPE, 0, 1, Ok);
        let _ = skald::replay::check_with(def(), last, &journal, &upcasters);
    }

    /// Arbitrary JSON as a stored row of every kind: no panic; what decodes
    /// round-trips.
    #[test]
    fn arbitrary_json_rows_decode_without_panic(doc in json_value()) {
        fn round_trip<T>(doc: &Value) -> Result<(), TestCaseError>
        where
            T: serde::Serialize + serde::de::DeserializeOwned,
        {
            if let Ok(v) = serde_json::from_value::<T>(doc.clone()) {
                let back: T = serde_json::from_value(to_json(&v)).expect("round trip");
                prop_assert!(same_json(&to_json(&back), &to_json(&v)));
            }
            Ok(())
        }
        round_trip::<SagaState>(&doc)?;
        round_trip::<Input>(&doc)?;
        round_trip::<JournalEntry>(&doc)?;
        round_trip::<JournalRecord>(&doc)?;
        round_trip::<DeadLetterRecord>(&doc)?;
        round_trip::<Headers>(&doc)?;
        round_trip::<machine::Effect>(&doc)?;
        round_trip::<Command>(&doc)?;
        round_trip::<wire::EventV1>(&doc)?;
        round_trip::<skald::ports::PurgeReport>(&doc)?;
    }

    /// Dead-letter rows and outbox headers, damaged: no panic; what decodes
    /// round-trips.
    #[test]
    fn dead_letter_and_outbox_rows_decode_without_panic(
        edits in vec(edit(), 0..4),
        raw in body(),
        reason in text(),
    ) {
        let record = DeadLetterRecord {
            id: uuid::Uuid::now_v7(),
            category: skald::ports::DeadLetterCategory::Poison,
            saga_id: Some(SagaId::new()),
            saga_type: Some("checkout".into()),
            step: Some("charge_payment".into()),
            kind: Some(CommandKind::Action),
            reason,
            attempts: 3,
            message: Some(json!({ "subject": "s", "headers": [["a", "b"]], "body": "x" })),
            at: Timestamp(T0),
            resolved_at: Some(Timestamp(T0 + 1)),
        };
        let mut doc = to_json(&record);
        for e in &edits {
            apply(&mut doc, e);
        }
        if let Ok(r) = serde_json::from_value::<DeadLetterRecord>(doc) {
            let back: DeadLetterRecord = serde_json::from_value(to_json(&r)).expect("round trip");
            prop_assert!(same_json(&to_json(&back), &to_json(&r)));
        }
        // The outbox's headers column, as the SQL stores read it back.
        if let Ok(text) = std::str::from_utf8(&raw)
            && let Ok(h) = serde_json::from_str::<Headers>(text)
        {
            let back: Headers =
                serde_json::from_str(&serde_json::to_string(&h).expect("encode")).expect("decode");
            prop_assert_eq!(back, h);
        }
    }

    /// A raw message as a poison record keeps it (`Message::to_record`): no panic
    /// whatever it holds, cut on character boundaries, within its caps, and says when
    /// it cut.
    #[test]
    fn raw_messages_become_bounded_records(m in reply_message()) {
        use skald::ports::{RECORD_MAX_BODY, RECORD_MAX_HEADERS, RECORD_MAX_VALUE};
        let record = m.to_record();
        let body = record["body"].as_str().expect("body is text");
        prop_assert!(body.len() <= RECORD_MAX_BODY);
        let headers = record["headers"].as_array().expect("headers");
        prop_assert!(headers.len() <= RECORD_MAX_HEADERS);
        for pair in headers {
            for part in pair.as_array().expect("a pair") {
                prop_assert!(part.as_str().expect("text").len() <= RECORD_MAX_VALUE);
            }
        }
        prop_assert!(record["subject"].as_str().expect("subject").len() <= RECORD_MAX_VALUE);
        prop_assert_eq!(record["body_bytes"].as_u64(), Some(m.payload.len() as u64));
        prop_assert_eq!(record["header_count"].as_u64(), Some(m.headers.len() as u64));
        let cut = String::from_utf8_lossy(&m.payload).len() > RECORD_MAX_BODY
            || m.headers.len() > RECORD_MAX_HEADERS
            || m.subject.len() > RECORD_MAX_VALUE
            || m.headers.iter().any(|(n, v)| n.len() > RECORD_MAX_VALUE || v.len() > RECORD_MAX_VALUE);
        prop_assert_eq!(record["truncated"].as_bool(), Some(cut));
        // What a record holds serializes (it is stored and announced on the bus).
        let _ = serde_json::to_vec(&record).expect("a record serializes");
    }
}

// ---------------------------------------------------------------------------------------
// Upcasters
// ---------------------------------------------------------------------------------------

/// What a registered step does: wrap the value, rename a field, or refuse.
#[derive(Debug, Clone, Copy)]
enum StepFn {
    Wrap,
    Rename,
    Refuse,
}

fn version() -> BoxedStrategy<u32> {
    prop_oneof![8 => 0u32..8, 1 => Just(u32::MAX), 1 => Just(u32::MAX - 1), 1 => any::<u32>()]
        .boxed()
}

proptest! {
    #![proptest_config(config())]

    /// Upcasters: any registered steps (loops, self-steps, gaps, the extremes of the
    /// version range), any stored and wanted version, any payload: a path or a typed
    /// error, never a panic; a path found starts and ends where asked and takes only
    /// registered steps; the upcast walks it.
    #[test]
    fn upcasters_find_paths_and_upcast_without_panic(
        steps in vec((version(), version(), prop_oneof![
            4 => Just(StepFn::Wrap),
            2 => Just(StepFn::Rename),
            1 => Just(StepFn::Refuse),
        ]), 0..12),
        from in version(),
        to in version(),
        payload in json_value(),
    ) {
        let mut upcasters = Upcasters::new();
        for (a, b, f) in &steps {
            let (a, b) = (*a, *b);
            match f {
                StepFn::Wrap => upcasters.register("t", a, b, move |v| Ok(json!({ "v": b, "inner": v }))),
                StepFn::Rename => upcasters.register("t", a, b, |mut v: Value| {
                    if let Some(o) = v.as_object_mut()
                        && let Some(x) = o.remove("old")
                    {
                        o.insert("new".into(), x);
                    }
                    Ok(v)
                }),
                StepFn::Refuse => upcasters.register("t", a, b, |_| Err("refused".into())),
            }
        }
        let _ = format!("{upcasters:?}");
        match upcasters.path("t", from, to) {
            Ok(path) => {
                prop_assert_eq!(path.first(), Some(&from));
                prop_assert_eq!(path.last(), Some(&to));
                for pair in path.windows(2) {
                    prop_assert!(
                        steps.iter().any(|(a, b, _)| (*a, *b) == (pair[0], pair[1])),
                        "{:?} is not a registered step", pair
                    );
                }
                let _ = upcasters.upcast("t", payload, from, to);
            }
            Err(e) => {
                let _ = e.to_string();
                prop_assert!(upcasters.upcast("t", payload, from, to).is_err());
            }
        }
        let _ = upcasters.path("other", from, to);
    }
}

/// The stored-row fixtures are what the runtime writes: each journal replays, with no
/// divergence, to the state its run ended in.
#[test]
fn the_fixtures_are_real_runs() {
    for (states, journal) in runs() {
        let last = states.last().expect("states");
        let replayed = skald::replay::check(def(), last, journal).expect("a real run replays");
        assert_eq!(replayed.divergence, None);
    }
    // The three scenarios end completed, compensated after a re-drive, and cancelled.
    let ends: Vec<_> = runs()
        .iter()
        .map(|(s, _)| s.last().expect("states").status.as_str())
        .collect();
    assert_eq!(ends, ["completed", "compensated", "compensated"]);
}

/// Over a fixed seed, the generators reach the decoders' success paths often enough
/// that the round trips above are exercised (not only the refusals).
#[test]
fn the_generators_reach_the_success_paths() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};

    fn rate<T: std::fmt::Debug>(strategy: BoxedStrategy<T>, ok: impl Fn(&T) -> bool) -> f64 {
        let mut runner = TestRunner::new_with_rng(
            config(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &[13; 32]),
        );
        let n = 400;
        let hits = (0..n)
            .filter(|_| ok(&strategy.new_tree(&mut runner).expect("generates").current()))
            .count();
        hits as f64 / f64::from(n)
    }
    let rates = [
        (
            "reply",
            rate(reply_message(), |m| wire::decode_reply(m).is_ok()),
        ),
        (
            "command",
            rate(command_message(), |m| wire::decode_command(m).is_ok()),
        ),
        (
            "operator request",
            rate(operator_message(), |m| {
                wire::decode_operator_request(m).is_ok()
            }),
        ),
        (
            "saga row",
            rate(
                (0usize..3, any::<prop::sample::Index>(), vec(edit(), 0..4)).boxed(),
                |(run, pick, edits)| {
                    let mut doc = to_json(pick.get(&runs()[*run].0));
                    edits.iter().for_each(|e| apply(&mut doc, e));
                    serde_json::from_value::<SagaState>(doc).is_ok()
                },
            ),
        ),
        (
            "journal replay",
            rate(
                (0usize..3, vec((any::<prop::sample::Index>(), edit()), 0..4)).boxed(),
                |(run, edits)| {
                    let (states, journal) = &runs()[*run];
                    let mut journal = journal.clone();
                    for (at, e) in edits {
                        let i = at.index(journal.len());
                        apply(&mut journal[i].body, e);
                    }
                    skald::replay::replay(def(), states[0].id, &journal, None)
                        .is_ok_and(|r| r.divergence.is_none())
                },
            ),
        ),
    ];
    eprintln!("success rates: {rates:?}");
    for (what, r) in rates {
        assert!(
            r >= 0.15,
            "only {:.1}% of generated {what}s get through",
            r * 100.0
        );
    }
}
