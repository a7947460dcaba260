//! The wire format between skald and participants: commands and replies as bus
//! messages (headers + JSON body). docs/protocol.md is the human-readable contract;
//! this module is its implementation, used by the runtime and by the participant helper.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{CommandKind, SagaId, SagaType, StepName};
use crate::machine::{Command, LifecycleEvent, StepError};
use crate::ports::{Headers, Message};
use crate::trace::{TraceContext, span_id_of};

/// The lifecycle events' public schema: the `schema` field of every event body and the
/// `Skald-Event-Schema` header. A change that is not purely additive gets a new version.
pub const EVENT_SCHEMA: &str = "skald.event/1";
/// Header: the schema of a lifecycle event's body ([`EVENT_SCHEMA`]).
pub const H_EVENT_SCHEMA: &str = "Skald-Event-Schema";
/// Header: what ties a lifecycle event to the others of its saga (the saga id).
pub const H_CORRELATION_ID: &str = "Skald-Correlation-Id";
/// Header: the message that caused a lifecycle event (see [`EventV1::causation_id`]).
pub const H_CAUSATION_ID: &str = "Skald-Causation-Id";

/// A lifecycle event as published on `skald.evt.<saga_type>.<event>`: the stable public
/// schema ([`EVENT_SCHEMA`]), separate from the runtime's journal. docs/protocol.md
/// documents it; fields are only ever added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventV1 {
    /// Always [`EVENT_SCHEMA`].
    pub schema: String,
    /// `started`, `step_succeeded`, `step_failed`, `retry_scheduled`, `compensating`,
    /// `completed`, `compensated`, `dead_lettered`, `redriven` or `cancelled`.
    pub event: String,
    /// The saga.
    pub saga_id: SagaId,
    /// Its type.
    pub saga_type: String,
    /// The step concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// `action` or `compensation`, when a step is concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CommandKind>,
    /// The attempt concerned, if any (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The error, for failures, cancellations and dead letters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Ties the saga's events together: the saga id.
    pub correlation_id: String,
    /// The message that caused the event: a reply's message id (its `Nats-Msg-Id`, else
    /// the broker's stream and sequence), or for what no message carried, the input and
    /// the saga version it produced (`started:<saga>:1`, `timed_out:<saga>:5`,
    /// `cancel_requested:<saga>:3`).
    pub causation_id: String,
}

/// Encodes a lifecycle event in the public schema.
pub fn encode_event(ev: &LifecycleEvent, causation_id: &str) -> Result<Message, serde_json::Error> {
    let correlation_id = ev.saga_id.to_string();
    let body = EventV1 {
        schema: EVENT_SCHEMA.to_owned(),
        event: ev.event.as_str().to_owned(),
        saga_id: ev.saga_id,
        saga_type: ev.saga_type.as_str().to_owned(),
        step: ev.step.as_ref().map(|s| s.as_str().to_owned()),
        kind: ev.kind,
        attempt: ev.attempt,
        error: ev.error.clone(),
        at_ms: ev.at.as_millis(),
        correlation_id: correlation_id.clone(),
        causation_id: causation_id.to_owned(),
    };
    let payload = serde_json::to_vec(&body)?;
    let mut headers = Headers::new();
    headers.insert(H_SAGA_ID, ev.saga_id.to_string());
    headers.insert(H_SAGA_TYPE, ev.saga_type.as_str());
    headers.insert(H_EVENT_SCHEMA, EVENT_SCHEMA);
    headers.insert(H_CORRELATION_ID, correlation_id);
    headers.insert(H_CAUSATION_ID, causation_id);
    headers.insert(
        H_MSG_ID,
        format!(
            "evt:{}:{}:{}:{}:{}",
            ev.saga_id,
            ev.event.as_str(),
            ev.step.as_ref().map(|s| s.as_str()).unwrap_or("-"),
            ev.kind.map(|k| k.as_str()).unwrap_or("-"),
            ev.attempt.unwrap_or(0)
        ),
    );
    Ok(Message {
        subject: event_subject(&ev.saga_type, ev.event.as_str()),
        headers,
        payload: Bytes::from(payload),
    })
}

/// Header: the saga instance id (UUID).
pub const H_SAGA_ID: &str = "Skald-Saga-Id";
/// Header: the saga type.
pub const H_SAGA_TYPE: &str = "Skald-Saga-Type";
/// Header: the step name.
pub const H_STEP: &str = "Skald-Step";
/// Header: `action` or `compensation`.
pub const H_KIND: &str = "Skald-Kind";
/// Header: the attempt number (decimal).
pub const H_ATTEMPT: &str = "Skald-Attempt";
/// Header: the idempotency key, stable across attempts of one step and kind.
pub const H_IDEMPOTENCY_KEY: &str = "Skald-Idempotency-Key";
/// Header: where the participant publishes its reply.
pub const H_REPLY_TO: &str = "Skald-Reply-To";
/// Header: the attempt's deadline, milliseconds since the epoch.
pub const H_DEADLINE: &str = "Skald-Deadline";
/// Header (replies): `success`, `failure` or `retryable`.
pub const H_OUTCOME: &str = "Skald-Outcome";
/// Header: the broker-side de-duplication id.
pub const H_MSG_ID: &str = "Nats-Msg-Id";
/// Header: W3C trace context.
pub const H_TRACEPARENT: &str = "traceparent";
/// Header (commands, dead letters): the schema version of the payload (a command's is
/// its step's; 1 by default).
pub const H_SCHEMA_VERSION: &str = "Skald-Schema-Version";
/// Header (commands): the definition version of the saga that sent it.
pub const H_DEFINITION_VERSION: &str = "Skald-Definition-Version";

/// Header (compensations): the idempotency key of the action the compensation undoes.
/// A participant undoes by this key: the payload may lack what only the action's reply
/// would have taught (say a `payment_id`) when the action's outcome was unknown.
pub const H_ACTION_KEY: &str = "Skald-Action-Key";
/// Header (compensations): `true` when the action's outcome was unknown when compensation
/// began (it timed out on every attempt, or a cancel cut it short): the action may never
/// have run, or may still be running. `false` when the action succeeded; actions carry
/// neither header.
pub const H_IN_DOUBT: &str = "Skald-In-Doubt";

/// Header (commands and replies): the reply token, an HMAC that skald sets on every
/// command and checks on every reply ([`crate::auth::ReplyKeys`]). A participant copies
/// it, unchanged, from the command into its reply.
pub const H_REPLY_TOKEN: &str = "Skald-Reply-Token";

/// Prefix of command subjects: `skald.cmd.<service>.<action>`.
pub const COMMAND_PREFIX: &str = "skald.cmd";

/// The partition token of operator requests (read by every node: one consumer per saga
/// type, whatever the partition), and of the replies to commands stored before
/// partitions existed.
pub const DEFAULT_PARTITION: u32 = 0;

/// The subject the replies of `service` to commands of saga type `saga_type` are
/// published on: `skald.reply.<service>.<saga_type>.<partition>`. Participants never
/// build it (they reply on the command's `Skald-Reply-To`); a NATS permission on
/// `skald.reply.<service>.>` lets a service answer its own commands only, and skald checks
/// that a reply arrived on the service of the command it answers.
pub fn reply_subject(service: &str, saga_type: &SagaType, partition: u32) -> String {
    format!("skald.reply.{service}.{saga_type}.{partition}")
}

/// The filter of the replies of every service for saga type `saga_type`.
pub fn reply_filter(saga_type: &SagaType) -> String {
    format!("skald.reply.*.{saga_type}.>")
}

/// The filter of the replies of every service for the sagas of type `saga_type` in
/// partition `partition`: what the node holding the partition reads.
pub fn reply_partition_filter(saga_type: &SagaType, partition: u32) -> String {
    format!("skald.reply.*.{saga_type}.{partition}")
}

/// The parts of a reply subject: (service, saga type, partition); `None` when `subject`
/// is not laid out as [`reply_subject`] makes it.
pub fn reply_subject_parts(subject: &str) -> Option<(&str, &str, u32)> {
    let mut t = subject.split('.');
    match (t.next(), t.next(), t.next(), t.next(), t.next(), t.next()) {
        (Some("skald"), Some("reply"), Some(service), Some(ty), Some(p), None) => {
            Some((service, ty, p.parse().ok()?))
        }
        _ => None,
    }
}

/// The subject operator requests about sagas of `saga_type` are published on:
/// `skald.op.<saga_type>.<partition>`, apart from the replies, so that a NATS
/// permission can reserve it to operators.
pub fn op_subject(saga_type: &SagaType, partition: u32) -> String {
    format!("skald.op.{saga_type}.{partition}")
}

/// The filter of every operator request about saga type `saga_type`.
pub fn op_filter(saga_type: &SagaType) -> String {
    format!("skald.op.{saga_type}.>")
}

/// The subject dead letters of `saga_type` are published on (`unknown` when the type
/// could not be read from the message).
pub fn dlq_subject(saga_type: Option<&SagaType>) -> String {
    match saga_type {
        Some(t) => format!("skald.dlq.{t}"),
        None => "skald.dlq.unknown".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Start requests

/// Prefix of start-request subjects: `skald.start.<saga_type>`.
pub const START_PREFIX: &str = "skald.start";

/// The subject start requests for saga type `saga_type` are sent on:
/// `skald.start.<saga_type>` (core NATS request/reply; docs/protocol.md, "Starting a
/// saga"). No stream of skald's captures it (they hold `skald.cmd.>`, `skald.reply.>`,
/// `skald.op.>`, `skald.evt.>` and `skald.dlq.>`), so a request is answered by an
/// orchestrator, not by a stream's publish acknowledgement (unless an operator's own
/// stream captures `skald.>`: an answer with a `stream` field is such an
/// acknowledgement, not skald's); and a NATS permission on it decides who may start
/// sagas of the type.
pub fn start_subject(saga_type: &SagaType) -> String {
    format!("{START_PREFIX}.{saga_type}")
}

/// A start request's body: `{"data": <saga data>, "key": "<business key>"}`, `key`
/// optional. Any other field is refused (a misspelt `"Key"` would otherwise make a
/// retried start a second saga).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The saga's data, as the saga type's definition declares it: its JSON text, as
    /// sent (checked to be JSON, not parsed into a tree: held, it takes no more memory
    /// than the bytes received; the saga's data type is decoded from it).
    pub data: Box<serde_json::value::RawValue>,
    /// The business key: a second start with the same key answers the same saga
    /// (`"existing": true`). `null` is the same as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Reads a start request's body: a JSON object (serde would also read a struct from
/// an array, `[data, key]`: refused, the protocol has one form).
pub fn decode_start_request(body: &[u8]) -> Result<StartRequest, serde_json::Error> {
    use serde::de::Error as _;
    if body.trim_ascii_start().first() == Some(&b'[') {
        return Err(serde_json::Error::custom(
            "a start request is a JSON object, not an array",
        ));
    }
    serde_json::from_slice(body)
}

/// Refusal code: the body is not a start request (not JSON, `data` missing, a field
/// of the wrong type or unknown).
pub const START_INVALID_REQUEST: &str = "invalid_request";
/// Refusal code: `data` does not decode as the saga type's data.
pub const START_INVALID_DATA: &str = "invalid_data";
/// Refusal code: `key` is empty, longer than 512 bytes or holds control characters.
pub const START_INVALID_KEY: &str = "invalid_key";
/// Refusal code: the request is over the orchestrator's inbound size limits.
pub const START_TOO_LARGE: &str = "too_large";
/// Refusal code: the orchestrator cannot start it now (at capacity, its store or the bus
/// unavailable, shutting down, or the request waited too long); nothing was stored:
/// send it again later.
pub const START_UNAVAILABLE: &str = "unavailable";
/// Refusal code: `data` has fields the answering orchestrator's data type does not know
/// (a client written for a newer version of the saga type, during a rolling deploy);
/// nothing was stored: send it again, another orchestrator may run the newer version.
pub const START_VERSION_SKEW: &str = "version_skew";
/// Refusal code: the start was under way when it failed (a commit whose outcome is
/// unknown, the orchestrator stopping): the saga may exist. A keyed request may be sent
/// again (it answers the saga if it exists); an unkeyed one cannot be retried safely.
pub const START_UNKNOWN_OUTCOME: &str = "unknown_outcome";
/// Refusal code: an error of the orchestrator itself (a bug): nothing to fix in the
/// request.
pub const START_INTERNAL: &str = "internal";

/// Header on a refused start's answer: an HTTP-like status for generic NATS service
/// tooling (400 for a bad request, 413 too large, 503 unavailable or version skew, 504
/// unknown outcome, 500 internal).
pub const H_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// Header on a refused start's answer: the reason (at most 512 bytes, control
/// characters replaced by spaces).
pub const H_SERVICE_ERROR: &str = "Nats-Service-Error";

/// Why a start request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRefusal {
    /// `invalid_request`, `invalid_data`, `invalid_key`, `too_large`, `unavailable`,
    /// `version_skew`, `unknown_outcome` or `internal` (the `START_*` constants); read
    /// any other as `internal`.
    pub code: String,
    /// For humans (serde's error for `invalid_data`).
    pub reason: String,
}

impl StartRefusal {
    /// A refusal with `code` and `reason`.
    pub fn new(code: &str, reason: impl Into<String>) -> Self {
        StartRefusal {
            code: code.to_owned(),
            reason: reason.into(),
        }
    }

    /// Whether sending the same request again later may succeed, with nothing stored
    /// by this one (`unavailable`, `version_skew`). `unknown_outcome` is not: a keyed
    /// request may be sent again (it answers the saga if this one stored it), an
    /// unkeyed one would start a second saga.
    pub fn is_retryable(&self) -> bool {
        self.code == START_UNAVAILABLE || self.code == START_VERSION_SKEW
    }

    /// Whether the refusal says nothing was stored (every code but `unknown_outcome`
    /// and `internal`).
    pub fn nothing_stored(&self) -> bool {
        self.code != START_UNKNOWN_OUTCOME && self.code != START_INTERNAL
    }

    fn status(&self) -> u16 {
        match self.code.as_str() {
            START_INVALID_REQUEST | START_INVALID_DATA | START_INVALID_KEY => 400,
            START_TOO_LARGE => 413,
            START_UNAVAILABLE | START_VERSION_SKEW => 503,
            START_UNKNOWN_OUTCOME => 504,
            _ => 500,
        }
    }
}

/// The answer to a start request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAnswer {
    /// `{"saga_id": "...", "existing": false, "definition_version": 3}`: the saga is
    /// stored and its first command published (or in the outbox); `existing` when the
    /// key's saga already existed (this request's `data` was then not used).
    Started {
        /// The saga.
        saga_id: SagaId,
        /// Whether the key named a saga that already existed.
        existing: bool,
        /// The definition version the saga runs (absent when the orchestrator could not
        /// read it: an existing saga's, found by a start that raced it).
        definition_version: Option<u32>,
    },
    /// `{"error": {"code": "...", "reason": "..."}}`: nothing was stored, unless the code
    /// is `unknown_outcome` (or `internal`) ([`StartRefusal::nothing_stored`]).
    Refused(StartRefusal),
}

#[derive(Serialize, Deserialize)]
struct StartAnswerBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    saga_id: Option<SagaId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    existing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    definition_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<StartRefusal>,
}

/// The most bytes of a refusal's reason in the [`H_SERVICE_ERROR`] header.
const MAX_SERVICE_ERROR: usize = 512;

/// Encodes a start request's answer: its headers and JSON body.
pub fn encode_start_answer(answer: &StartAnswer) -> (Headers, Bytes) {
    let mut headers = Headers::new();
    let body = match answer {
        StartAnswer::Started {
            saga_id,
            existing,
            definition_version,
        } => StartAnswerBody {
            saga_id: Some(*saga_id),
            existing: Some(*existing),
            definition_version: *definition_version,
            error: None,
        },
        StartAnswer::Refused(refusal) => {
            let reason: String = crate::ports::cap(&refusal.reason, MAX_SERVICE_ERROR)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            headers.insert(H_SERVICE_ERROR_CODE, refusal.status().to_string());
            headers.insert(H_SERVICE_ERROR, reason);
            StartAnswerBody {
                saga_id: None,
                existing: None,
                definition_version: None,
                error: Some(refusal.clone()),
            }
        }
    };
    // A struct of strings, a UUID and a bool: serialising it cannot fail.
    let payload = serde_json::to_vec(&body).unwrap_or_default();
    (headers, Bytes::from(payload))
}

/// Reads a start request's answer (for Rust clients: any JSON library will do).
pub fn decode_start_answer(body: &[u8]) -> Result<StartAnswer, serde_json::Error> {
    use serde::de::Error as _;
    let body: StartAnswerBody = serde_json::from_slice(body)?;
    match (body.error, body.saga_id) {
        (Some(refusal), _) => Ok(StartAnswer::Refused(refusal)),
        (None, Some(saga_id)) => Ok(StartAnswer::Started {
            saga_id,
            existing: body.existing.unwrap_or(false),
            definition_version: body.definition_version,
        }),
        (None, None) => Err(serde_json::Error::custom(
            "a start answer holds either saga_id or error",
        )),
    }
}

/// Header (operator requests): `redrive` or `cancel`.
pub const H_OPERATOR_ACTION: &str = "Skald-Operator-Action";
/// Header (operator requests): the operator's name, as the sender claims it (a runtime
/// with an operator allowlist checks it against the signing key's listed name).
pub const H_OPERATOR: &str = "Skald-Operator";
/// Header (operator requests): until when the request may be applied, ms since the
/// epoch. A request that arrives later (a replay) changes nothing.
pub const H_EXPIRES: &str = "Skald-Expires";
/// Header (operator requests): apply only if the saga has been re-driven exactly this
/// many times (the count the operator saw).
pub const H_IF_REDRIVES: &str = "Skald-If-Redrives";
/// Header (operator requests): apply only at this stored saga version.
pub const H_IF_VERSION: &str = "Skald-If-Version";
/// Header (operator requests): the public NKey (`U...`) the request is signed with.
pub const H_OPERATOR_KEY: &str = "Skald-Operator-Key";
/// Header (operator requests): the ed25519 signature (base64url, no padding) over
/// [`operator_signing_bytes`].
pub const H_SIGNATURE: &str = "Skald-Signature";

/// The longest reason an operator request may carry (bytes).
pub const MAX_REASON_LEN: usize = 1024;

/// What an operator asks of one saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorAction {
    /// Re-run the dead-lettered compensation with a fresh attempt budget.
    Redrive,
    /// Compensate the completed steps.
    Cancel {
        /// Why (recorded in the journal and the `cancelled` event).
        reason: String,
    },
}

impl OperatorAction {
    /// The header value.
    pub fn as_str(&self) -> &'static str {
        match self {
            OperatorAction::Redrive => "redrive",
            OperatorAction::Cancel { .. } => "cancel",
        }
    }
}

/// An operator's request, sent over the bus so it is durable and goes through the
/// saga's actor, journal and outbox like any reply (`skald dlq redrive`, `skald cancel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRequest {
    /// The saga.
    pub saga_id: SagaId,
    /// Its type (the subject is its operator subject).
    pub saga_type: SagaType,
    /// What to do.
    pub action: OperatorAction,
    /// The request's id (`Nats-Msg-Id`, the inbox id and the journal entry's causation):
    /// `op:<operator>:<uuid>`.
    pub request_id: String,
    /// The operator's name (`Skald-Operator`).
    pub operator: String,
    /// Until when it may be applied, ms since the epoch (`Skald-Expires`).
    pub expires_at_ms: u64,
    /// Apply only after exactly this many re-drives (`Skald-If-Redrives`).
    pub if_redrives: Option<u32>,
    /// Apply only at this stored version (`Skald-If-Version`).
    pub if_version: Option<u64>,
    /// The public NKey it is signed with (`Skald-Operator-Key`).
    pub key: Option<String>,
    /// The signature (`Skald-Signature`).
    pub signature: Option<String>,
}

/// An operator name as it may appear in a request id: ASCII letters, digits, `-`, `_`
/// and `.`, at most 64 characters (anything else becomes `_`).
pub fn operator_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

impl OperatorRequest {
    /// A new request by `operator` (a user name, recorded in the request id), made at
    /// `now_ms` and valid for `ttl`.
    pub fn new(
        saga_id: SagaId,
        saga_type: SagaType,
        action: OperatorAction,
        operator: &str,
        now_ms: u64,
        ttl: std::time::Duration,
    ) -> Self {
        let operator = operator_name(operator);
        OperatorRequest {
            saga_id,
            saga_type,
            action,
            request_id: crate::ids::operator_request_id(&operator, &uuid::Uuid::now_v7()),
            operator,
            expires_at_ms: now_ms
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            if_redrives: None,
            if_version: None,
            key: None,
            signature: None,
        }
    }

    /// Signs the request with an NKey seed (`SU...`), setting `key` and `signature`.
    pub fn sign(&mut self, seed: &str) -> Result<(), crate::auth::AuthError> {
        let (key, signature) = crate::auth::sign(seed, &operator_signing_bytes(self))?;
        self.key = Some(key);
        self.signature = Some(signature);
        Ok(())
    }
}

/// What an operator's signature covers: every field that decides what the request does
/// (the key and the signature aside), length-prefixed.
pub fn operator_signing_bytes(r: &OperatorRequest) -> Vec<u8> {
    let reason = match &r.action {
        OperatorAction::Redrive => "",
        OperatorAction::Cancel { reason } => reason.as_str(),
    };
    let fields = [
        r.request_id.clone(),
        r.saga_id.to_string(),
        r.saga_type.to_string(),
        r.action.as_str().to_owned(),
        reason.to_owned(),
        r.operator.clone(),
        r.expires_at_ms.to_string(),
        r.if_redrives.map(|n| n.to_string()).unwrap_or_default(),
        r.if_version.map(|n| n.to_string()).unwrap_or_default(),
    ];
    let mut out = b"skald-operator-request-v1".to_vec();
    for f in fields {
        out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

/// Encodes an operator request for the bus (on [`op_subject`]).
pub fn encode_operator_request(r: &OperatorRequest) -> Message {
    let mut h = Headers::new();
    h.insert(H_SAGA_ID, r.saga_id.to_string());
    h.insert(H_SAGA_TYPE, r.saga_type.as_str());
    h.insert(H_MSG_ID, r.request_id.as_str());
    h.insert(H_OPERATOR_ACTION, r.action.as_str());
    h.insert(H_OPERATOR, r.operator.as_str());
    h.insert(H_EXPIRES, r.expires_at_ms.to_string());
    if let Some(n) = r.if_redrives {
        h.insert(H_IF_REDRIVES, n.to_string());
    }
    if let Some(n) = r.if_version {
        h.insert(H_IF_VERSION, n.to_string());
    }
    if let Some(k) = &r.key {
        h.insert(H_OPERATOR_KEY, k.as_str());
    }
    if let Some(sig) = &r.signature {
        h.insert(H_SIGNATURE, sig.as_str());
    }
    let body = match &r.action {
        OperatorAction::Redrive => serde_json::json!({}),
        OperatorAction::Cancel { reason } => serde_json::json!({ "reason": reason }),
    };
    Message {
        subject: op_subject(&r.saga_type, DEFAULT_PARTITION),
        headers: h,
        payload: Bytes::from(body.to_string()),
    }
}

/// Whether a message carries an operator request's header (on a reply subject, that
/// is a request sent where operator requests are not read: refused).
pub fn is_operator_request(m: &Message) -> bool {
    m.headers.get(H_OPERATOR_ACTION).is_some()
}

/// Decodes an operator request (runtime side). Its signature is not checked here
/// ([`crate::auth::verify_signature`] over [`operator_signing_bytes`]).
pub fn decode_operator_request(m: &Message) -> Result<OperatorRequest, WireError> {
    const WHAT: &str = "operator request";
    let body: Value = serde_json::from_slice(&m.payload).map_err(|e| WireError {
        what: WHAT,
        reason: format!("body is not JSON: {e}"),
    })?;
    let action = match header(m, WHAT, H_OPERATOR_ACTION)? {
        "redrive" => OperatorAction::Redrive,
        "cancel" => {
            let reason = body
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("cancelled by an operator");
            if reason.len() > MAX_REASON_LEN {
                return Err(WireError {
                    what: WHAT,
                    reason: format!(
                        "the reason has {} bytes; at most {MAX_REASON_LEN} are accepted",
                        reason.len()
                    ),
                });
            }
            OperatorAction::Cancel {
                reason: reason.to_owned(),
            }
        }
        other => {
            return Err(WireError {
                what: WHAT,
                reason: format!(
                    "header {H_OPERATOR_ACTION}={:?}: expected redrive or cancel",
                    crate::ports::cap(other, 64)
                ),
            });
        }
    };
    let optional = |name: &str| m.headers.get(name).is_some();
    Ok(OperatorRequest {
        saga_id: parse(m, WHAT, H_SAGA_ID)?,
        saga_type: parse(m, WHAT, H_SAGA_TYPE)?,
        action,
        request_id: {
            // Its own namespace in the inbox: a request cannot take the id of a reply.
            let id = key(m, WHAT, H_MSG_ID)?;
            if !crate::ids::is_operator_request_id(id) {
                return Err(WireError {
                    what: WHAT,
                    reason: format!("header {H_MSG_ID} must start with op: (op:<operator>:<uuid>)"),
                });
            }
            id.to_owned()
        },
        operator: m
            .headers
            .get(H_OPERATOR)
            .map(operator_name)
            .unwrap_or_default(),
        expires_at_ms: parse(m, WHAT, H_EXPIRES)?,
        if_redrives: if optional(H_IF_REDRIVES) {
            Some(parse(m, WHAT, H_IF_REDRIVES)?)
        } else {
            None
        },
        if_version: if optional(H_IF_VERSION) {
            Some(parse(m, WHAT, H_IF_VERSION)?)
        } else {
            None
        },
        key: match m.headers.get(H_OPERATOR_KEY) {
            Some(_) => Some(key(m, WHAT, H_OPERATOR_KEY)?.to_owned()),
            None => None,
        },
        signature: match m.headers.get(H_SIGNATURE) {
            Some(_) => Some(key(m, WHAT, H_SIGNATURE)?.to_owned()),
            None => None,
        },
    })
}

/// The subject of a lifecycle event.
pub fn event_subject(saga_type: &SagaType, event: &str) -> String {
    format!("skald.evt.{saga_type}.{event}")
}

/// A W3C `traceparent` derived from the saga id (trace) and the message id (span), so
/// every command of one saga shares one trace (see [`crate::trace`]).
pub fn traceparent(saga_id: &SagaId, message_id: &str) -> String {
    TraceContext::for_saga(saga_id)
        .child(span_id_of(message_id))
        .to_string()
}

/// Encodes a command as a bus message, without a reply token (a runtime's commands
/// carry one: [`encode_command_with`]).
pub fn encode_command(command: &Command) -> Result<Message, serde_json::Error> {
    encode_command_with(command, None)
}

/// The header fields of `command` that its reply echoes (and the token covers).
pub fn command_envelope(command: &Command) -> Envelope {
    Envelope {
        saga_id: command.saga_id,
        saga_type: command.saga_type.clone(),
        step: command.step.clone(),
        kind: command.kind,
        attempt: command.attempt,
        idempotency_key: command.idempotency_key.clone(),
    }
}

/// Encodes a command as a bus message, with the reply token of `keys`.
pub fn encode_command_with(
    command: &Command,
    keys: Option<&crate::auth::ReplyKeys>,
) -> Result<Message, serde_json::Error> {
    encode_command_for(command, keys, DEFAULT_PARTITION)
}

/// Encodes a command as a bus message, with the reply token of `keys`, naming the reply
/// subject of the saga's partition `partition` ([`reply_subject`]): its replies go to the
/// node holding that partition.
pub fn encode_command_for(
    command: &Command,
    keys: Option<&crate::auth::ReplyKeys>,
    partition: u32,
) -> Result<Message, serde_json::Error> {
    let mut h = Headers::new();
    h.insert(H_SAGA_ID, command.saga_id.to_string());
    h.insert(H_SAGA_TYPE, command.saga_type.as_str());
    h.insert(H_STEP, command.step.as_str());
    h.insert(H_KIND, command.kind.as_str());
    h.insert(H_ATTEMPT, command.attempt.to_string());
    h.insert(H_IDEMPOTENCY_KEY, command.idempotency_key.as_str());
    h.insert(
        H_REPLY_TO,
        reply_subject(
            crate::ids::service_of(&command.subject),
            &command.saga_type,
            partition,
        ),
    );
    if let Some(keys) = keys {
        h.insert(H_REPLY_TOKEN, keys.token(&command_envelope(command)));
    }
    h.insert(H_DEADLINE, command.deadline.as_millis().to_string());
    h.insert(H_SCHEMA_VERSION, command.schema_version.to_string());
    h.insert(H_DEFINITION_VERSION, command.definition_version.to_string());
    if let Some(key) = &command.action_key {
        h.insert(H_ACTION_KEY, key.as_str());
        h.insert(H_IN_DOUBT, if command.in_doubt { "true" } else { "false" });
    }
    h.insert(H_MSG_ID, command.message_id.as_str());
    h.insert(
        H_TRACEPARENT,
        traceparent(&command.saga_id, &command.message_id),
    );
    Ok(Message {
        subject: command.subject.clone(),
        headers: h,
        payload: Bytes::from(serde_json::to_vec(&command.payload)?),
    })
}

/// What a participant reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done; the output goes to the step's `on_success`.
    Success(Value),
    /// Will never succeed (e.g. card declined): compensate.
    Failure(StepError),
    /// May succeed if tried again (e.g. a dependency is down).
    Retryable(StepError),
}

impl Outcome {
    /// The header value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Success(_) => "success",
            Outcome::Failure(_) => "failure",
            Outcome::Retryable(_) => "retryable",
        }
    }
}

/// A decoded reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The saga.
    pub saga_id: SagaId,
    /// Its type.
    pub saga_type: SagaType,
    /// The step.
    pub step: StepName,
    /// Action or compensation.
    pub kind: CommandKind,
    /// The attempt replied to.
    pub attempt: u32,
    /// The idempotency key of the command replied to.
    pub idempotency_key: String,
    /// The reply token copied from the command (`Skald-Reply-Token`), if any.
    pub reply_token: Option<String>,
    /// The outcome.
    pub outcome: Outcome,
}

impl Reply {
    /// The header fields the reply token covers.
    pub fn envelope(&self) -> Envelope {
        Envelope {
            saga_id: self.saga_id,
            saga_type: self.saga_type.clone(),
            step: self.step.clone(),
            kind: self.kind,
            attempt: self.attempt,
            idempotency_key: self.idempotency_key.clone(),
        }
    }
}

/// Size limits on an inbound message (a reply, an operator request, a command at a
/// participant), checked before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimits {
    /// Most headers. Default 64.
    pub max_headers: usize,
    /// Most bytes of one header's name and value. Default 4096.
    pub max_header_bytes: usize,
    /// Most body bytes. Default 1 MiB (the broker's default max payload).
    pub max_message_bytes: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            max_headers: 64,
            max_header_bytes: 4096,
            max_message_bytes: 1024 * 1024,
        }
    }
}

impl InboundLimits {
    /// Why `m` is past the limits (the reason starts with `oversized message:`).
    pub fn check(&self, m: &Message) -> Result<(), String> {
        if m.headers.len() > self.max_headers {
            return Err(format!(
                "oversized message: {} headers; at most {} are accepted",
                m.headers.len(),
                self.max_headers
            ));
        }
        if let Some((name, value)) = m
            .headers
            .iter()
            .find(|(n, v)| n.len() + v.len() > self.max_header_bytes)
        {
            return Err(format!(
                "oversized message: header {:?} has {} bytes; at most {} are accepted",
                crate::ports::cap(name, 64),
                name.len() + value.len(),
                self.max_header_bytes
            ));
        }
        if m.payload.len() > self.max_message_bytes {
            return Err(format!(
                "oversized message: a body of {} bytes; at most {} are accepted",
                m.payload.len(),
                self.max_message_bytes
            ));
        }
        Ok(())
    }
}

/// The longest failure code kept from a reply (bytes); longer ones are cut.
pub const MAX_ERROR_CODE: usize = 128;
/// The longest failure message kept from a reply (bytes); longer ones are cut, with `…`.
pub const MAX_ERROR_MESSAGE: usize = 4096;

fn cap_string(s: &mut String, max: usize) {
    if s.len() > max {
        let keep = crate::ports::cap(s, max.saturating_sub(3)).len();
        s.truncate(keep);
        s.push('…');
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {reason}")]
pub struct WireError {
    /// `reply` or `command`.
    pub what: &'static str,
    /// The reason.
    pub reason: String,
}

fn header<'a>(m: &'a Message, what: &'static str, name: &str) -> Result<&'a str, WireError> {
    m.headers.get(name).ok_or_else(|| WireError {
        what,
        reason: format!("missing header {name}"),
    })
}

fn parse<T: std::str::FromStr>(m: &Message, what: &'static str, name: &str) -> Result<T, WireError>
where
    T::Err: std::fmt::Display,
{
    let raw = header(m, what, name)?;
    raw.parse().map_err(|e: T::Err| WireError {
        what,
        reason: format!("header {name}={:?}: {e}", crate::ports::cap(raw, 64)),
    })
}

/// The header fields common to commands and replies.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The saga.
    pub saga_id: SagaId,
    /// Its type.
    pub saga_type: SagaType,
    /// The step.
    pub step: StepName,
    /// Action or compensation.
    pub kind: CommandKind,
    /// The attempt.
    pub attempt: u32,
    /// The idempotency key.
    pub idempotency_key: String,
}

/// The longest idempotency key (or `Skald-Action-Key`) accepted: skald's own are a UUID,
/// a step name and a kind (at most 114 bytes); a longer one is not skald's, and would
/// only cost a participant's fence an oversized row.
pub const MAX_KEY_LEN: usize = 256;

fn key<'a>(m: &'a Message, what: &'static str, name: &str) -> Result<&'a str, WireError> {
    let k = header(m, what, name)?;
    if k.is_empty() || k.len() > MAX_KEY_LEN {
        return Err(WireError {
            what,
            reason: format!(
                "header {name} must hold 1 to {MAX_KEY_LEN} bytes, not {}",
                k.len()
            ),
        });
    }
    Ok(k)
}

fn envelope(m: &Message, what: &'static str) -> Result<Envelope, WireError> {
    let env = Envelope {
        saga_id: parse(m, what, H_SAGA_ID)?,
        saga_type: parse(m, what, H_SAGA_TYPE)?,
        step: parse(m, what, H_STEP)?,
        kind: parse(m, what, H_KIND)?,
        attempt: parse(m, what, H_ATTEMPT)?,
        idempotency_key: key(m, what, H_IDEMPOTENCY_KEY)?.to_owned(),
    };
    if env.attempt == 0 {
        return Err(WireError {
            what,
            reason: format!("header {H_ATTEMPT}=0: attempts are numbered from 1"),
        });
    }
    Ok(env)
}

/// Decodes a reply's headers only (the envelope and the reply token): enough to check
/// where it came from before its body is read.
pub fn decode_reply_head(m: &Message) -> Result<(Envelope, Option<String>), WireError> {
    const WHAT: &str = "reply";
    let env = envelope(m, WHAT)?;
    let token = match m.headers.get(H_REPLY_TOKEN) {
        Some(_) => Some(key(m, WHAT, H_REPLY_TOKEN)?.to_owned()),
        None => None,
    };
    Ok((env, token))
}

/// Decodes a reply message.
pub fn decode_reply(m: &Message) -> Result<Reply, WireError> {
    const WHAT: &str = "reply";
    let env = envelope(m, WHAT)?;
    let body: Value = serde_json::from_slice(&m.payload).map_err(|e| WireError {
        what: WHAT,
        reason: format!("body is not JSON: {e}"),
    })?;
    let outcome = match header(m, WHAT, H_OUTCOME)? {
        "success" => Outcome::Success(body),
        kind @ ("failure" | "retryable") => {
            let mut error: StepError = serde_json::from_value(body).map_err(|e| WireError {
                what: WHAT,
                reason: format!("failure body must be {{\"code\":..,\"message\":..}}: {e}"),
            })?;
            // The error is kept in the saga's state, journal and dead letter (and its
            // announcement on the bus): a participant's essay is cut short.
            cap_string(&mut error.code, MAX_ERROR_CODE);
            cap_string(&mut error.message, MAX_ERROR_MESSAGE);
            if kind == "failure" {
                Outcome::Failure(error)
            } else {
                Outcome::Retryable(error)
            }
        }
        other => {
            return Err(WireError {
                what: WHAT,
                reason: format!(
                    "header {H_OUTCOME}={:?}: expected success, failure or retryable",
                    crate::ports::cap(other, 64)
                ),
            });
        }
    };
    Ok(Reply {
        saga_id: env.saga_id,
        saga_type: env.saga_type,
        step: env.step,
        kind: env.kind,
        attempt: env.attempt,
        idempotency_key: env.idempotency_key,
        reply_token: match m.headers.get(H_REPLY_TOKEN) {
            Some(_) => Some(key(m, WHAT, H_REPLY_TOKEN)?.to_owned()),
            None => None,
        },
        outcome,
    })
}

/// A command as a participant sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingCommand {
    /// The subject it arrived on (`skald.cmd.<service>.<action>`).
    pub subject: String,
    /// The header fields.
    pub envelope: Envelope,
    /// Where to reply.
    pub reply_to: String,
    /// The W3C trace context, if any.
    pub traceparent: Option<String>,
    /// The payload's schema version (`Skald-Schema-Version`; 1 when absent).
    pub schema_version: u32,
    /// Compensations: the idempotency key of the action to undo (`Skald-Action-Key`).
    pub action_key: Option<String>,
    /// Compensations: the action's outcome was unknown when compensation began
    /// (`Skald-In-Doubt: true`).
    pub in_doubt: bool,
    /// When skald stops waiting for this attempt (`Skald-Deadline`, ms since the epoch;
    /// 0 when absent).
    pub deadline_ms: u64,
    /// The reply token to copy into the reply (`Skald-Reply-Token`).
    pub reply_token: Option<String>,
    /// The JSON payload.
    pub payload: Value,
}

impl IncomingCommand {
    /// The idempotency key of the action this command is about: its own key for an
    /// action, the `Skald-Action-Key` for a compensation (derived from the saga and step
    /// when an older orchestrator did not send the header).
    pub fn action_key(&self) -> String {
        match (&self.action_key, self.envelope.kind) {
            (_, CommandKind::Action) => self.envelope.idempotency_key.clone(),
            (Some(k), CommandKind::Compensation) => k.clone(),
            (None, CommandKind::Compensation) => crate::ids::idempotency_key(
                &self.envelope.saga_id,
                &self.envelope.step,
                CommandKind::Action,
            ),
        }
    }
}

/// Decodes a command message (participant side).
pub fn decode_command(m: &Message) -> Result<IncomingCommand, WireError> {
    let mut command = decode_command_head(m)?;
    command.payload = serde_json::from_slice(&m.payload).map_err(|e| WireError {
        what: "command",
        reason: format!("body is not JSON: {e}"),
    })?;
    Ok(command)
}

/// Decodes a command's headers only (its payload left `null`): enough to answer a
/// command whose body cannot be taken (too large).
pub fn decode_command_head(m: &Message) -> Result<IncomingCommand, WireError> {
    const WHAT: &str = "command";
    let envelope = envelope(m, WHAT)?;
    Ok(IncomingCommand {
        subject: m.subject.clone(),
        reply_to: header(m, WHAT, H_REPLY_TO)?.to_owned(),
        traceparent: m.headers.get(H_TRACEPARENT).map(str::to_owned),
        schema_version: match m.headers.get(H_SCHEMA_VERSION) {
            Some(_) => parse(m, WHAT, H_SCHEMA_VERSION)?,
            None => 1,
        },
        action_key: match m.headers.get(H_ACTION_KEY) {
            Some(_) => Some(key(m, WHAT, H_ACTION_KEY)?.to_owned()),
            None => None,
        },
        in_doubt: match m.headers.get(H_IN_DOUBT) {
            Some(_) => parse(m, WHAT, H_IN_DOUBT)?,
            None => false,
        },
        deadline_ms: match m.headers.get(H_DEADLINE) {
            Some(_) => parse(m, WHAT, H_DEADLINE)?,
            None => 0,
        },
        reply_token: match m.headers.get(H_REPLY_TOKEN) {
            Some(_) => Some(key(m, WHAT, H_REPLY_TOKEN)?.to_owned()),
            None => None,
        },
        envelope,
        payload: Value::Null,
    })
}

/// The trace context of the participant's handling of `command`: the command's trace,
/// with a span id derived from the reply's message id; `None` when the command carries
/// no valid `traceparent`.
pub fn reply_traceparent(command: &IncomingCommand) -> Option<TraceContext> {
    let parent = TraceContext::parse(command.traceparent.as_deref()?).ok()?;
    let env = &command.envelope;
    Some(
        parent.child(crate::trace::span_id_of(&crate::ids::reply_attempt_id(
            &env.idempotency_key,
            env.attempt,
        ))),
    )
}

/// Encodes the reply to `command` (participant side).
pub fn encode_reply(command: &IncomingCommand, outcome: &Outcome) -> Message {
    let env = &command.envelope;
    let mut h = Headers::new();
    h.insert(H_SAGA_ID, env.saga_id.to_string());
    h.insert(H_SAGA_TYPE, env.saga_type.as_str());
    h.insert(H_STEP, env.step.as_str());
    h.insert(H_KIND, env.kind.as_str());
    h.insert(H_ATTEMPT, env.attempt.to_string());
    h.insert(H_IDEMPOTENCY_KEY, env.idempotency_key.as_str());
    h.insert(H_OUTCOME, outcome.as_str());
    if let Some(token) = &command.reply_token {
        h.insert(H_REPLY_TOKEN, token.as_str());
    }
    h.insert(
        H_MSG_ID,
        crate::ids::reply_publish_id(
            &env.idempotency_key,
            env.attempt,
            outcome.as_str(),
            command.reply_token.as_deref(),
        ),
    );
    // The reply continues the command's trace as a child of it: the span that handled
    // the command, whose id is derived from the reply's message id.
    if let Some(tp) = reply_traceparent(command) {
        h.insert(H_TRACEPARENT, tp.to_string());
    }
    let body = match outcome {
        Outcome::Success(v) => serde_json::to_vec(v),
        Outcome::Failure(e) | Outcome::Retryable(e) => serde_json::to_vec(e),
    }
    // Serializing a `Value` or a struct of two strings cannot fail.
    .unwrap_or_default();
    Message {
        subject: command.reply_to.clone(),
        headers: h,
        payload: Bytes::from(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Timestamp;

    fn command() -> Command {
        let saga_id = SagaId::new();
        Command {
            saga_id,
            saga_type: SagaType::new("checkout").expect("name"),
            step: StepName::new("charge_payment").expect("name"),
            kind: CommandKind::Action,
            attempt: 2,
            subject: "skald.cmd.payment.charge".into(),
            payload: serde_json::json!({"amount": 10}),
            idempotency_key: format!("{saga_id}:charge_payment:action"),
            message_id: format!("{saga_id}:charge_payment:action:2"),
            deadline: Timestamp(1_000),
            schema_version: 2,
            definition_version: 1,
            action_key: None,
            in_doubt: false,
        }
    }

    #[test]
    fn start_requests_and_answers() {
        let ty = SagaType::new("checkout").expect("name");
        assert_eq!(start_subject(&ty), "skald.start.checkout");
        let r = decode_start_request(br#"{"data": {"a": 1},"key":"order-1"}"#).expect("valid");
        assert_eq!(r.key.as_deref(), Some("order-1"));
        assert_eq!(r.data.get(), r#"{"a": 1}"#, "the text as sent");
        let r = decode_start_request(br#"{"data":null,"key":null}"#).expect("valid");
        assert_eq!((r.data.get(), r.key), ("null", None));
        for bad in [
            &br#"{"key":"k"}"#[..],
            br#"{"data":{},"Key":"k"}"#,
            br#"{"data":{},"key":42}"#,
            br#"[1]"#,
            br#"{"data":{"a":}}"#,
            b"not json",
        ] {
            assert!(decode_start_request(bad).is_err(), "{bad:?}");
        }

        let saga_id = SagaId::new();
        let started = StartAnswer::Started {
            saga_id,
            existing: true,
            definition_version: Some(3),
        };
        let (headers, body) = encode_start_answer(&started);
        assert!(headers.is_empty());
        assert_eq!(
            serde_json::from_slice::<Value>(&body).expect("json"),
            serde_json::json!({"saga_id": saga_id.to_string(), "existing": true,
                "definition_version": 3})
        );
        assert_eq!(decode_start_answer(&body).expect("decodes"), started);
        let unknown_version = StartAnswer::Started {
            saga_id,
            existing: true,
            definition_version: None,
        };
        let (_, body) = encode_start_answer(&unknown_version);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).expect("json"),
            serde_json::json!({"saga_id": saga_id.to_string(), "existing": true})
        );

        let refused = StartAnswer::Refused(StartRefusal::new(
            START_INVALID_DATA,
            "decoding saga data: missing field `id`\r\nX-Injected: 1",
        ));
        let (headers, body) = encode_start_answer(&refused);
        assert_eq!(headers.get(H_SERVICE_ERROR_CODE), Some("400"));
        let reason = headers.get(H_SERVICE_ERROR).expect("reason header");
        assert!(!reason.contains(['\r', '\n']), "{reason:?}");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).expect("json"),
            serde_json::json!({"error": {"code": "invalid_data",
                "reason": "decoding saga data: missing field `id`\r\nX-Injected: 1"}})
        );
        assert_eq!(decode_start_answer(&body).expect("decodes"), refused);
        assert!(decode_start_answer(b"{}").is_err());
        let unavailable = StartRefusal::new(START_UNAVAILABLE, "later");
        assert!(unavailable.is_retryable());
        assert!(unavailable.nothing_stored());
        let (headers, _) = encode_start_answer(&StartAnswer::Refused(unavailable));
        assert_eq!(headers.get(H_SERVICE_ERROR_CODE), Some("503"));
        let skew = StartRefusal::new(START_VERSION_SKEW, "newer");
        assert!(skew.is_retryable() && skew.nothing_stored());
        let (headers, _) = encode_start_answer(&StartAnswer::Refused(skew));
        assert_eq!(headers.get(H_SERVICE_ERROR_CODE), Some("503"));
        let unknown = StartRefusal::new(START_UNKNOWN_OUTCOME, "may exist");
        assert!(!unknown.is_retryable() && !unknown.nothing_stored());
        let (headers, _) = encode_start_answer(&StartAnswer::Refused(unknown));
        assert_eq!(headers.get(H_SERVICE_ERROR_CODE), Some("504"));
    }

    #[test]
    fn command_and_reply_round_trip() {
        let cmd = command();
        let msg = encode_command(&cmd).expect("encode");
        assert_eq!(msg.subject, "skald.cmd.payment.charge");
        let incoming = decode_command(&msg).expect("decode");
        assert_eq!(incoming.envelope.saga_id, cmd.saga_id);
        assert_eq!(incoming.envelope.attempt, 2);
        assert_eq!(incoming.reply_to, "skald.reply.payment.checkout.0");
        assert_eq!(
            reply_subject_parts(&incoming.reply_to),
            Some(("payment", "checkout", 0))
        );
        assert_eq!(incoming.reply_token, None, "no keys, no token");
        // With keys, the token is copied into every reply and verifies.
        let keys = crate::auth::ReplyKeys::new([vec![3u8; 32]]).expect("keys");
        let signed = decode_command(&encode_command_with(&cmd, Some(&keys)).expect("encode"))
            .expect("decode");
        let token = signed.reply_token.clone().expect("a token");
        let reply =
            decode_reply(&encode_reply(&signed, &Outcome::Success(Value::Null))).expect("reply");
        assert_eq!(reply.reply_token.as_deref(), Some(token.as_str()));
        assert!(
            keys.verify(&reply.envelope(), reply.reply_token.as_deref())
                .is_ok()
        );
        assert_eq!(incoming.payload, cmd.payload);
        let tp = incoming.traceparent.clone().expect("traceparent");
        assert_eq!(tp.len(), 55, "{tp}");
        let sent = TraceContext::parse(&tp).expect("valid traceparent");
        assert_eq!(
            sent.trace_id_hex(),
            cmd.saga_id.as_uuid().simple().to_string()
        );
        assert_eq!(sent.span_id, span_id_of(&cmd.message_id));

        for outcome in [
            Outcome::Success(serde_json::json!({"payment_id": "p1"})),
            Outcome::Failure(StepError::new("card_declined", "no")),
            Outcome::Retryable(StepError::new("unavailable", "later")),
        ] {
            let reply = decode_reply(&encode_reply(&incoming, &outcome)).expect("reply");
            assert_eq!(reply.saga_id, cmd.saga_id);
            assert_eq!(reply.step, cmd.step);
            assert_eq!(reply.attempt, 2);
            assert_eq!(reply.outcome, outcome);
        }
        // The reply continues the trace, from a span of its own.
        let reply = encode_reply(&incoming, &Outcome::Success(Value::Null));
        let continued =
            TraceContext::parse(reply.headers.get(H_TRACEPARENT).expect("reply traceparent"))
                .expect("valid");
        assert_eq!(continued.trace_id, sent.trace_id);
        assert_ne!(continued.span_id, sent.span_id);
        // The span id is the handling's, whatever the outcome: `reply:<key>:<attempt>`;
        // the message id adds the outcome, so two outcomes of one attempt are not
        // de-duplicated into one.
        let key = &incoming.envelope.idempotency_key;
        assert_eq!(continued.span_id, span_id_of(&format!("reply:{key}:2")));
        assert_eq!(
            reply.headers.get(H_MSG_ID),
            Some(format!("reply:{key}:2:success").as_str())
        );
        let retry = encode_reply(&incoming, &Outcome::Retryable(StepError::new("busy", "x")));
        assert_ne!(retry.headers.get(H_MSG_ID), reply.headers.get(H_MSG_ID));
        // A command without a valid traceparent gets a reply without one.
        let mut bare = incoming.clone();
        bare.traceparent = Some("00-garbage".into());
        assert!(
            encode_reply(&bare, &Outcome::Success(Value::Null))
                .headers
                .get(H_TRACEPARENT)
                .is_none()
        );
    }

    #[test]
    fn operator_requests_round_trip_and_are_told_from_replies() {
        let saga_type = SagaType::new("checkout").expect("name");
        for action in [
            OperatorAction::Redrive,
            OperatorAction::Cancel {
                reason: "customer asked".into(),
            },
        ] {
            let ttl = std::time::Duration::from_secs(60);
            let mut r = OperatorRequest::new(
                SagaId::new(),
                saga_type.clone(),
                action,
                "alice smith",
                1_000,
                ttl,
            );
            assert!(
                r.request_id.starts_with("op:alice_smith:"),
                "{}",
                r.request_id
            );
            assert_eq!(r.expires_at_ms, 61_000);
            let m = encode_operator_request(&r);
            assert_eq!(m.subject, "skald.op.checkout.0");
            assert!(is_operator_request(&m));
            assert_eq!(decode_operator_request(&m), Ok(r.clone()));
            assert!(decode_reply(&m).is_err(), "not a reply");
            // Conditions and a signature round-trip, and the signature covers them.
            r.if_redrives = Some(1);
            r.if_version = Some(7);
            let pair = nkeys::KeyPair::new_user();
            r.sign(&pair.seed().expect("seed")).expect("sign");
            let back = decode_operator_request(&encode_operator_request(&r)).expect("decode");
            assert_eq!(back, r);
            let (key, sig) = (
                back.key.clone().expect("key"),
                back.signature.clone().expect("sig"),
            );
            assert_eq!(key, pair.public_key());
            let bytes = operator_signing_bytes(&back);
            assert!(crate::auth::verify_signature(&key, &bytes, &sig).is_ok());
            let mut tampered = back.clone();
            tampered.expires_at_ms += 1;
            let bytes = operator_signing_bytes(&tampered);
            assert!(crate::auth::verify_signature(&key, &bytes, &sig).is_err());
        }
        let mut m = encode_operator_request(&OperatorRequest::new(
            SagaId::new(),
            saga_type,
            OperatorAction::Redrive,
            "bob",
            0,
            std::time::Duration::from_secs(1),
        ));
        m.headers.insert(H_OPERATOR_ACTION, "explode");
        let e = decode_operator_request(&m).expect_err("unknown action");
        assert!(e.reason.contains("explode"), "{e}");
    }

    #[test]
    fn long_failure_texts_are_cut() {
        let incoming = decode_command(&encode_command(&command()).expect("encode")).expect("ok");
        let essay = StepError::new("c".repeat(1000), "é".repeat(10_000));
        let reply = decode_reply(&encode_reply(&incoming, &Outcome::Failure(essay)))
            .expect("a failure decodes");
        let Outcome::Failure(e) = reply.outcome else {
            panic!("a failure")
        };
        assert!(e.code.len() <= MAX_ERROR_CODE && e.code.ends_with('…'));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE && e.message.ends_with('…'));
    }

    #[test]
    fn malformed_replies_say_why() {
        let incoming = decode_command(&encode_command(&command()).expect("encode")).expect("ok");
        let good = encode_reply(&incoming, &Outcome::Success(Value::Null));

        let mut m = good.clone();
        m.payload = Bytes::from_static(b"{not json");
        let err = decode_reply(&m).expect_err("bad body");
        assert!(err.reason.contains("not JSON"), "{err}");

        let mut m = good.clone();
        m.headers = Headers::new();
        let err = decode_reply(&m).expect_err("no headers");
        assert!(err.reason.contains("missing header Skald-Saga-Id"), "{err}");

        let mut m = good.clone();
        m.headers.insert(H_ATTEMPT, "x");
        assert!(
            decode_reply(&m)
                .expect_err("attempt")
                .reason
                .contains("Skald-Attempt")
        );

        let mut m = good.clone();
        m.headers.insert(H_ATTEMPT, "0");
        assert!(
            decode_reply(&m)
                .expect_err("attempt 0")
                .reason
                .contains("numbered from 1")
        );

        let mut m = good.clone();
        m.headers
            .insert(H_IDEMPOTENCY_KEY, "k".repeat(MAX_KEY_LEN + 1));
        assert!(
            decode_reply(&m)
                .expect_err("oversized key")
                .reason
                .contains("Skald-Idempotency-Key")
        );

        let mut m = good.clone();
        m.headers.insert(H_OUTCOME, "maybe");
        assert!(
            decode_reply(&m)
                .expect_err("outcome")
                .reason
                .contains("maybe")
        );

        let mut m = good;
        m.headers.insert(H_OUTCOME, "failure");
        m.payload = Bytes::from_static(b"{\"oops\":1}");
        assert!(
            decode_reply(&m)
                .expect_err("failure body")
                .reason
                .contains("code")
        );
    }
}
