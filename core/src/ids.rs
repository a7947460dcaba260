//! Typed identifiers: parsed once at the boundary, never passed around as bare strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The identity of one saga instance: a version-7 UUID (time-ordered, index-friendly)
/// for an ordinary start, a version-8 UUID derived from the saga type and a business
/// key for a keyed one ([`SagaId::for_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(Uuid);

impl SagaId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        SagaId(Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub fn from_uuid(id: Uuid) -> Self {
        SagaId(id)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The id of the one saga of type `saga_type` started for business key `key` (an
    /// order number, a payment reference): a UUID (version 8) made of the first 122 bits
    /// of SHA-256 over the type and the key. Every process derives the same id, so the
    /// store's primary key makes a keyed start happen once, however many processes race
    /// to it. Keyed and unkeyed ids never meet: unkeyed ids are version 7.
    ///
    /// A key is 1 to [`MAX_BUSINESS_KEY_BYTES`] bytes of any text.
    ///
    /// # Examples
    ///
    /// ```
    /// use skald_core::ids::{SagaId, SagaType};
    /// let checkout = SagaType::new("checkout").unwrap();
    /// let a = SagaId::for_key(&checkout, "order-42").unwrap();
    /// assert_eq!(a, SagaId::for_key(&checkout, "order-42").unwrap());
    /// assert_ne!(a, SagaId::for_key(&SagaType::new("refund").unwrap(), "order-42").unwrap());
    /// assert_eq!(a.as_uuid().get_version_num(), 8);
    /// ```
    pub fn for_key(saga_type: &SagaType, key: &str) -> Result<SagaId, NameError> {
        use sha2::{Digest, Sha256};
        check_business_key(key)?;
        let mut h = Sha256::new();
        h.update(b"skald/business-key/v1\0");
        h.update(saga_type.as_str().as_bytes());
        h.update(b"\0");
        h.update(key.as_bytes());
        let digest = h.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        // Version 8 (custom), RFC 9562 variant.
        bytes[6] = (bytes[6] & 0x0f) | 0x80;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Ok(SagaId(Uuid::from_bytes(bytes)))
    }

    /// The partition this saga belongs to among `count` (`count` ≥ 1): FNV-1a (64-bit)
    /// over the id's 16 bytes, modulo `count`. Every process computes the same one, so
    /// the id alone routes a saga's replies to the node that holds its partition. This
    /// function is part of the stored format (sagas are recorded with their partition)
    /// and never changes.
    ///
    /// # Examples
    ///
    /// ```
    /// use skald_core::ids::SagaId;
    /// let id: SagaId = "0192d6a0-0000-7000-8000-000000000001".parse().unwrap();
    /// assert_eq!(id.partition(16), id.partition(16));
    /// assert!(id.partition(16) < 16);
    /// assert_eq!(id.partition(1), 0);
    /// ```
    pub fn partition(&self, count: u32) -> u32 {
        partition_of(self.0.as_bytes(), count)
    }
}

/// FNV-1a over `bytes`, modulo `count` (0 when `count` is 0).
fn partition_of(bytes: &[u8], count: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    if count == 0 {
        return 0;
    }
    let h = bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME));
    // Lossless: the remainder is below `count`, a u32.
    (h % u64::from(count)) as u32
}

/// The most partitions a deployment may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The longest business key a keyed start takes, in bytes.
pub const MAX_BUSINESS_KEY_BYTES: usize = 512;

/// Checks a business key: 1 to [`MAX_BUSINESS_KEY_BYTES`] bytes, no control characters.
pub fn check_business_key(key: &str) -> Result<(), NameError> {
    if key.is_empty() {
        return Err(NameError::new("business key", key, "must not be empty"));
    }
    if key.len() > MAX_BUSINESS_KEY_BYTES {
        return Err(NameError::new(
            "business key",
            &key[..key.floor_char_boundary(64)],
            format!(
                "must be at most {MAX_BUSINESS_KEY_BYTES} bytes (was {})",
                key.len()
            ),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(NameError::new(
            "business key",
            key,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl Default for SagaId {
    fn default() -> Self {
        SagaId::new()
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for SagaId {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(SagaId)
            .map_err(|e| NameError::new("saga id", s, e.to_string()))
    }
}

/// A name that is not acceptable as a saga type, step name or subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    /// What kind of name it was ("saga type", "step name", "subject", "saga id").
    pub what: &'static str,
    /// The offending value.
    pub value: String,
    /// Why it was refused.
    pub reason: String,
}

impl NameError {
    pub(crate) fn new(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        NameError {
            what,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Checks a token used inside NATS subjects: 1..=64 chars of `[a-z0-9_-]`.
fn check_token(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(what, value, "must not be empty"));
    }
    if value.len() > 64 {
        return Err(NameError::new(what, value, "must be at most 64 characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(NameError::new(
            what,
            value,
            format!("character {c:?} not allowed (use a-z, 0-9, '_' or '-')"),
        ));
    }
    Ok(())
}

macro_rules! token_name {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Checks and wraps a name: 1..=64 characters of `a-z`, `0-9`, `_`, `-`
            /// (it appears in NATS subjects and headers).
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_token($what, &value)?;
                Ok($name(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<De: serde::Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

token_name!(
    /// The name of a saga type, e.g. `checkout`. Appears in subjects
    /// (`skald.evt.<saga_type>.<event>`) and headers.
    SagaType,
    "saga type"
);
token_name!(
    /// The name of a step within a saga definition, e.g. `charge_payment`.
    StepName,
    "step name"
);

/// Checks a full NATS subject to publish on: dot-separated non-empty tokens of
/// visible ASCII, no wildcards (`*`, `>`), at most 256 bytes.
pub fn check_subject(subject: &str) -> Result<(), NameError> {
    const WHAT: &str = "subject";
    if subject.is_empty() || subject.len() > 256 {
        return Err(NameError::new(WHAT, subject, "must be 1..=256 bytes"));
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(NameError::new(WHAT, subject, "has an empty token"));
        }
        if token == "*" || token == ">" {
            return Err(NameError::new(
                WHAT,
                subject,
                "wildcards are not allowed in a publish subject",
            ));
        }
        if token.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(NameError::new(
                WHAT,
                subject,
                "only visible ASCII characters are allowed",
            ));
        }
    }
    Ok(())
}

/// Whether a command is a step's action or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// The forward action of a step.
    Action,
    /// The compensation that undoes a completed step.
    Compensation,
}

impl CommandKind {
    /// `action` or `compensation`, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Action => "action",
            CommandKind::Compensation => "compensation",
        }
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandKind {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "action" => Ok(CommandKind::Action),
            "compensation" => Ok(CommandKind::Compensation),
            other => Err(NameError::new(
                "command kind",
                other,
                "expected \"action\" or \"compensation\"",
            )),
        }
    }
}

/// The service a command subject addresses: the token after `skald.cmd.` in
/// `skald.cmd.<service>.<action>`, or the first token of a subject outside that layout.
/// A reply to the command must arrive on that service's reply subject
/// (`skald_runtime::wire::reply_subject`), which a NATS permission can reserve to the service.
pub fn service_of(subject: &str) -> &str {
    let rest = subject.strip_prefix("skald.cmd.").unwrap_or(subject);
    rest.split('.').next().unwrap_or(rest)
}

/// The idempotency key of (`step`, `kind`) of saga `saga`: stable across every attempt
/// and re-drive, so a participant applies the effect once. The one constructor of it:
/// the machine, the wire and the participant fence all read it from here.
pub fn idempotency_key(saga: &SagaId, step: &StepName, kind: CommandKind) -> String {
    format!("{saga}:{step}:{kind}")
}

/// The broker-side de-duplication id of one attempt of a command (`Nats-Msg-Id`).
pub fn command_message_id(
    saga: &SagaId,
    step: &StepName,
    kind: CommandKind,
    attempt: u32,
) -> String {
    format!("{saga}:{step}:{kind}:{attempt}")
}

/// The de-duplication id of a participant's reply: one per attempt *and outcome*, so a
/// `retryable` answer followed (on a redelivery of the same attempt) by a `success` is not
/// dropped as a duplicate of the first by the broker's window or skald's inbox.
///
/// This is also the inbox id skald records for a reply it applied, computed from the
/// reply's verified headers, never read from the sender's `Nats-Msg-Id`: one service
/// cannot make skald drop another's reply as already applied.
pub fn reply_message_id(idempotency_key: &str, attempt: u32, outcome: &str) -> String {
    format!("{}:{outcome}", reply_attempt_id(idempotency_key, attempt))
}

/// The id of a participant's handling of one attempt, whatever its outcome:
/// `reply:<idempotency key>:<attempt>`, the prefix of [`reply_message_id`]. The span of
/// that handling is derived from it.
pub fn reply_attempt_id(idempotency_key: &str, attempt: u32) -> String {
    format!("reply:{idempotency_key}:{attempt}")
}

/// The `Nats-Msg-Id` a participant publishes its reply with: [`reply_message_id`]
/// followed by the first 16 characters of the command's reply token, when it has one.
/// The broker drops a second message with the same id within its window; with the
/// token in it, only the service the command went to can know the id, so no other
/// service can publish a message that makes the broker drop the genuine reply.
pub fn reply_publish_id(
    idempotency_key: &str,
    attempt: u32,
    outcome: &str,
    reply_token: Option<&str>,
) -> String {
    let id = reply_message_id(idempotency_key, attempt, outcome);
    match reply_token {
        Some(t) => format!("{id}:{}", crate::text::cap(t, 16)),
        None => id,
    }
}

/// What every operator request id starts with: its own namespace in the inbox, so a
/// request can never take the id of a reply (which start with `reply:`).
pub const OPERATOR_REQUEST_PREFIX: &str = "op:";

/// The id of an operator request: `op:<operator>:<unique>` (the operator's name as
/// [`operator_request_prefix`] writes it, and a UUID v7).
pub fn operator_request_id(operator: &str, unique: &Uuid) -> String {
    format!("{}{unique}", operator_request_prefix(operator))
}

/// The prefix of every request id of `operator`: `op:<operator>:`. A runtime with an
/// operator allowlist checks that a signed request's id starts with its signer's.
pub fn operator_request_prefix(operator: &str) -> String {
    format!("{OPERATOR_REQUEST_PREFIX}{operator}:")
}

/// Whether `id` is in the operator requests' namespace.
pub fn is_operator_request_id(id: &str) -> bool {
    id.starts_with(OPERATOR_REQUEST_PREFIX)
}

/// The causation id of a transition no message caused (a start, a timer, a resume):
/// the input's name, the saga and the version the transition produces, unique per
/// transition, so the lifecycle events it emits have a stable id.
pub fn causation_id(input: &str, saga: &SagaId, version: u64) -> String {
    format!("{input}:{saga}:{version}")
}

/// The message id of the announcement that a saga was dead-lettered at `attempt` of
/// `step`: one per dead letter, so a re-published announcement is de-duplicated.
pub fn dead_letter_message_id(saga: &SagaId, step: &StepName, attempt: u32) -> String {
    format!("dlq:{saga}:{step}:{attempt}")
}

/// The message id of the announcement of a dead-lettered message (poison) with record
/// id `record`.
pub fn poison_message_id(record: &Uuid) -> String {
    format!("dlq:poison:{record}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_pinned_and_even() {
        // Pinned: sagas are stored with their partition, and replies are routed by it;
        // a change to the function would strand every running saga.
        assert_eq!(SagaId::from_uuid(Uuid::nil()).partition(16), 5);
        assert_eq!(SagaId::from_uuid(Uuid::max()).partition(1000), 133);
        assert_eq!(SagaId::new().partition(1), 0);
        assert_eq!(SagaId::new().partition(0), 0);
        // Even over fresh (v7) ids and keyed (v8) ids alike: within 15 % of the mean.
        let checkout = SagaType::new("checkout").expect("type");
        for ids in [
            (0..16_000).map(|_| SagaId::new()).collect::<Vec<_>>(),
            (0..16_000)
                .map(|i| SagaId::for_key(&checkout, &format!("order-{i}")).expect("key"))
                .collect(),
        ] {
            let mut counts = [0u32; 16];
            for id in &ids {
                counts[id.partition(16) as usize] += 1;
            }
            assert!(
                counts.iter().all(|c| (850..=1150).contains(c)),
                "{counts:?}"
            );
        }
    }

    #[test]
    fn derived_ids_have_one_shape_each() {
        let saga = SagaId::from_uuid(Uuid::nil());
        let step = StepName::new("charge").expect("name");
        let key = idempotency_key(&saga, &step, CommandKind::Action);
        assert_eq!(key, format!("{saga}:charge:action"));
        assert_eq!(
            command_message_id(&saga, &step, CommandKind::Action, 2),
            format!("{key}:2")
        );
        assert_eq!(
            reply_message_id(&key, 2, "success"),
            format!("reply:{key}:2:success")
        );
        assert_eq!(
            reply_publish_id(&key, 2, "success", Some("0123456789abcdefXYZ")),
            format!("reply:{key}:2:success:0123456789abcdef")
        );
        let op = operator_request_id("alice", &Uuid::nil());
        assert!(op.starts_with(&operator_request_prefix("alice")));
        assert!(is_operator_request_id(&op));
        assert!(!is_operator_request_id(&reply_message_id(
            &key, 1, "success"
        )));
        assert_eq!(
            causation_id("started", &saga, 1),
            format!("started:{saga}:1")
        );
        assert_eq!(
            dead_letter_message_id(&saga, &step, 3),
            format!("dlq:{saga}:charge:3")
        );
        assert_eq!(
            poison_message_id(&Uuid::nil()),
            format!("dlq:poison:{}", Uuid::nil())
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(SagaType::new("checkout").is_ok());
        assert!(StepName::new("charge_payment-2").is_ok());
        let err = StepName::new("Charge Payment").expect_err("refused");
        assert_eq!(err.what, "step name");
        assert!(err.to_string().contains("'C'"), "{err}");
        assert!(SagaType::new("").is_err());
        assert!(SagaType::new("a.b").is_err());
        assert!(serde_json::from_str::<StepName>("\"bad name\"").is_err());
    }

    #[test]
    fn a_reply_publish_id_ends_with_its_token_prefix() {
        assert_eq!(reply_message_id("k", 2, "success"), "reply:k:2:success");
        assert_eq!(
            reply_publish_id("k", 2, "success", None),
            "reply:k:2:success"
        );
        assert_eq!(
            reply_publish_id("k", 2, "success", Some("0123456789abcdef0123")),
            "reply:k:2:success:0123456789abcdef"
        );
    }

    #[test]
    fn the_service_is_the_token_after_skald_cmd() {
        assert_eq!(service_of("skald.cmd.payment.charge"), "payment");
        assert_eq!(service_of("skald.cmd.payment"), "payment");
        assert_eq!(service_of("orders.place"), "orders");
        assert_eq!(service_of("plain"), "plain");
    }

    #[test]
    fn subjects_are_checked() {
        assert!(check_subject("skald.cmd.payment.charge").is_ok());
        assert!(check_subject("skald..x").is_err());
        assert!(check_subject("skald.cmd.>").is_err());
        assert!(check_subject("a b").is_err());
    }

    #[test]
    fn ids_round_trip() {
        let id = SagaId::new();
        assert_eq!(id.to_string().parse::<SagaId>().expect("parse"), id);
        assert!("nope".parse::<SagaId>().is_err());
    }
}
