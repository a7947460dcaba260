//! The journal: a saga's append-only history, as one typed enum.
//!
//! Every entry is a [`JournalRecord`]: an input the machine applied
//! ([`JournalRecord::Transition`]), an input it refused ([`JournalRecord::Ignored`]), or
//! the state at a point where retries stopped being journaled one by one
//! ([`JournalRecord::Snapshot`], see [`crate::replay`]). Writers build the enum; readers
//! (replay, time travel, the CLI) decode it and match on its variants.
//!
//! A store keeps an entry as a row: its time, its schema version, the record's kind (a
//! column an index or a `WHERE` can use) and its body (JSON). [`JournalEntry`] is that
//! row; [`JournalEntry::new`] encodes a record into it and [`JournalEntry::record`]
//! decodes it, both through serde (`{"kind": …, "body": …}`, adjacently tagged), so the
//! JSON stored by earlier builds of this schema version loads unchanged. Entries of an
//! older schema version are brought up by the upcasters registered for
//! [`JOURNAL_PAYLOAD_TYPE`] ([`JournalEntry::upcast`]) before they are decoded.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{CommandKind, StepName};
use crate::machine::{DeadLetterInfo, Effect, EventKind, Input, SagaState, SagaStatus, Timestamp};
use crate::upcast::{UpcastError, Upcasters};

/// Schema version of journal entries written by this build.
pub const JOURNAL_SCHEMA_VERSION: u16 = 1;

/// The payload type of journal entry bodies, for upcasters of older journal formats.
pub const JOURNAL_PAYLOAD_TYPE: &str = "skald.journal";

/// One entry of a saga's journal, as a store keeps it (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// When it was recorded.
    pub at: Timestamp,
    /// Shape of `body` ([`JOURNAL_SCHEMA_VERSION`] for entries this build writes).
    pub schema_version: u16,
    /// The record's kind ([`JournalRecord::kind`]): the column stores index and filter on.
    pub kind: String,
    /// The record's body, as JSON.
    pub body: Value,
}

impl JournalEntry {
    /// Encodes `record`, recorded at `at`, at this build's schema version.
    pub fn new(at: Timestamp, record: &JournalRecord) -> Self {
        let (kind, body) = record.encode();
        Self {
            at,
            schema_version: JOURNAL_SCHEMA_VERSION,
            kind,
            body,
        }
    }

    /// Decodes the record. An entry of another schema version must be brought up with
    /// [`JournalEntry::upcast`] first.
    pub fn record(&self) -> Result<JournalRecord, JournalError> {
        if self.schema_version != JOURNAL_SCHEMA_VERSION {
            return Err(JournalError::Version {
                found: self.schema_version,
                want: JOURNAL_SCHEMA_VERSION,
            });
        }
        JournalRecord::decode(&self.kind, &self.body)
    }

    /// Brings an entry of an older schema version up to this build's with `upcasters`
    /// (registered for [`JOURNAL_PAYLOAD_TYPE`]); an entry already at it is borrowed,
    /// not copied.
    pub fn upcast(&self, upcasters: &Upcasters) -> Result<Cow<'_, Self>, UpcastError> {
        if self.schema_version == JOURNAL_SCHEMA_VERSION {
            return Ok(Cow::Borrowed(self));
        }
        let body = upcasters.upcast(
            JOURNAL_PAYLOAD_TYPE,
            self.body.clone(),
            u32::from(self.schema_version),
            u32::from(JOURNAL_SCHEMA_VERSION),
        )?;
        Ok(Cow::Owned(Self {
            at: self.at,
            schema_version: JOURNAL_SCHEMA_VERSION,
            kind: self.kind.clone(),
            body,
        }))
    }
}

/// Why a journal entry could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The entry is of another schema version (upcast it first).
    #[error("journal entry of schema version {found}, this build reads {want}")]
    Version {
        /// The entry's.
        found: u16,
        /// This build's.
        want: u16,
    },
    /// The kind or the body does not decode.
    #[error("unreadable journal entry of kind {kind:?}: {reason}")]
    Unreadable {
        /// The stored kind.
        kind: String,
        /// The decoder's error.
        reason: String,
    },
}

/// What one journal entry records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum JournalRecord {
    /// An input the machine applied.
    Transition(Transition),
    /// An input the machine (or the shell, for a failed condition or unreadable data)
    /// refused: a late, duplicate or out-of-order reply, a refused request.
    Ignored(Ignored),
    /// The saga's state at this point (retries past the journal's window are not
    /// journaled one by one; see [`crate::replay`]).
    Snapshot(Snapshot),
}

impl JournalRecord {
    /// The stored kind of a [`JournalRecord::Transition`].
    pub const TRANSITION: &'static str = "transition";
    /// The stored kind of a [`JournalRecord::Ignored`].
    pub const IGNORED: &'static str = "ignored";
    /// The stored kind of a [`JournalRecord::Snapshot`].
    pub const SNAPSHOT: &'static str = "snapshot";

    /// The kind stored beside the body: `transition`, `ignored` or `snapshot`.
    pub fn kind(&self) -> &'static str {
        match self {
            JournalRecord::Transition(_) => Self::TRANSITION,
            JournalRecord::Ignored(_) => Self::IGNORED,
            JournalRecord::Snapshot(_) => Self::SNAPSHOT,
        }
    }

    /// The message id (or request id) that caused the entry, if one did.
    pub fn causation(&self) -> Option<&str> {
        match self {
            JournalRecord::Transition(t) => t.causation.as_deref(),
            JournalRecord::Ignored(i) => i.causation.as_deref(),
            JournalRecord::Snapshot(_) => None,
        }
    }

    /// The input the entry records (none for a snapshot).
    pub fn input(&self) -> Option<&Input> {
        match self {
            JournalRecord::Transition(t) => Some(&t.input),
            JournalRecord::Ignored(i) => Some(&i.input),
            JournalRecord::Snapshot(_) => None,
        }
    }

    fn encode(&self) -> (String, Value) {
        let body = match self {
            JournalRecord::Transition(t) => serde_json::to_value(t),
            JournalRecord::Ignored(i) => serde_json::to_value(i),
            JournalRecord::Snapshot(s) => serde_json::to_value(s),
        };
        // The records hold only JSON-representable values (string keys, finite
        // numbers): serialising them cannot fail.
        (self.kind().to_owned(), body.unwrap_or(Value::Null))
    }

    fn decode(kind: &str, body: &Value) -> Result<Self, JournalError> {
        // Decoded from the borrowed body (no copy of it); the kinds are the adjacent tags
        // the enum's own serde form uses.
        let record = match kind {
            Self::TRANSITION => Transition::deserialize(body).map(JournalRecord::Transition),
            Self::IGNORED => Ignored::deserialize(body).map(JournalRecord::Ignored),
            Self::SNAPSHOT => Snapshot::deserialize(body).map(JournalRecord::Snapshot),
            other => {
                return Err(JournalError::Unreadable {
                    kind: other.to_owned(),
                    reason: "unknown kind (expected transition, ignored or snapshot)".into(),
                });
            }
        };
        record.map_err(|e| JournalError::Unreadable {
            kind: kind.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// An applied input: what the machine reached and did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The input.
    pub input: Input,
    /// The status it reached.
    pub status: SagaStatus,
    /// What the machine did, without payloads ([`JournalEffect`]).
    pub effects: Vec<JournalEffect>,
    /// The first transition only (`started`): the data the saga started with, which
    /// replay starts from. Present-but-null (`"data": null`, the data of a saga over
    /// `()`) is `Some(Value::Null)`, absent is `None`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub data: Option<Value>,
    /// The first transition only: the schema version of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_version: Option<u32>,
    /// The first transition only: when the saga was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    /// The id of the message (a reply's, an operator request's) that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation: Option<String>,
    /// When the saga wakes up next ([`SagaState::wake_at`] after the transition: a
    /// reply deadline or the end of a backoff). Informational: replay does not compare
    /// it (a changed timeout changes when, not what).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<Timestamp>,
}

impl Transition {
    /// The record of `input` taking the saga to `next` with `effects`; `start` is the
    /// state before the first transition (its data and creation time are recorded), and
    /// `causation` the id of the message that caused it.
    pub fn new(
        input: &Input,
        next: &SagaState,
        effects: &[Effect],
        start: Option<&SagaState>,
        causation: Option<&str>,
    ) -> Self {
        Self {
            input: input.clone(),
            status: next.status,
            effects: JournalEffect::summary(effects),
            data: start.map(|s| s.data.clone()),
            data_version: start.map(|s| s.data_version),
            created_at: start.map(|s| s.created_at),
            causation: causation.map(str::to_owned),
            wake_at: next.wake_at(),
        }
    }
}

/// A field that is present is `Some`, even when it is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A refused input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ignored {
    /// The input.
    pub input: Input,
    /// Why it was refused (the refusal's text).
    pub ignored: String,
    /// Refused by the shell rather than the machine: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refused>,
    /// The id of the message that carried the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation: Option<String>,
}

/// Why the shell refused an input before the machine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refused {
    /// The saga's data could not be read by this build (no upcaster to its version).
    DataUnreadable,
    /// An operator request's condition (expiry, re-drive count, version) did not hold.
    Condition,
}

/// The state at this point of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The state.
    pub snapshot: SagaState,
    /// Why the snapshot was taken.
    #[serde(default)]
    pub note: String,
}

/// An effect as the journal records it: what was done, without the payloads. A
/// command's body is serialised once, into its message (the outbox); the journal keeps
/// which command went where, and replaying the inputs rebuilds the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum JournalEffect {
    /// A command was sent.
    SendCommand {
        /// Its step.
        step: StepName,
        /// Action or compensation.
        kind: CommandKind,
        /// Its attempt.
        attempt: u32,
        /// Where it went.
        subject: String,
        /// Its message id.
        message_id: String,
        /// When the attempt times out.
        deadline: Timestamp,
    },
    /// A wake-up was scheduled. Written by builds whose machine emitted wake-ups as
    /// effects; the machine now leaves them to the state ([`SagaState::wake_at`]), and
    /// replay disregards these when it compares effects.
    ScheduleWakeup {
        /// When.
        at: Timestamp,
    },
    /// A lifecycle event was emitted.
    EmitLifecycleEvent {
        /// Which.
        event: EventKind,
        /// Its step, if it is about one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<StepName>,
        /// Its attempt, if it is about one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    /// The saga was dead-lettered.
    DeadLetter(DeadLetterInfo),
    /// The saga reached a final status.
    Finished {
        /// Which.
        status: SagaStatus,
    },
}

impl JournalEffect {
    /// The journal's summary of `effects`.
    pub fn summary(effects: &[Effect]) -> Vec<JournalEffect> {
        effects
            .iter()
            .map(|e| match e {
                Effect::SendCommand(c) => JournalEffect::SendCommand {
                    step: c.step.clone(),
                    kind: c.kind,
                    attempt: c.attempt,
                    subject: c.subject.clone(),
                    message_id: c.message_id.clone(),
                    deadline: c.deadline,
                },
                Effect::EmitLifecycleEvent(ev) => JournalEffect::EmitLifecycleEvent {
                    event: ev.event,
                    step: ev.step.clone(),
                    attempt: ev.attempt,
                },
                Effect::DeadLetter(info) => JournalEffect::DeadLetter(info.clone()),
                Effect::Finished { status } => JournalEffect::Finished { status: *status },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Entries as builds of schema version 1 stored them load unchanged, and a record
    /// written now encodes to the same JSON.
    #[test]
    fn stored_entries_of_schema_one_decode_and_round_trip() {
        let transition = json!({
            "input": {"input": "step_succeeded", "step": "reserve", "kind": "action",
                      "attempt": 1, "output": {"id": "r-1"}},
            "status": "running",
            "effects": [
                {"effect": "send_command", "step": "charge", "kind": "action", "attempt": 1,
                 "subject": "skald.cmd.payments.charge", "message_id": "m-1", "deadline": 30000},
                {"effect": "schedule_wakeup", "at": 30000},
                {"effect": "emit_lifecycle_event", "event": "step_succeeded", "step": "reserve",
                 "attempt": 1}
            ],
            "causation": "reply-1",
            "wake_at": 30000
        });
        let entry = JournalEntry {
            at: Timestamp(5),
            schema_version: 1,
            kind: "transition".into(),
            body: transition.clone(),
        };
        let JournalRecord::Transition(t) = entry.record().expect("decodes") else {
            panic!("not a transition");
        };
        assert_eq!(t.status, SagaStatus::Running);
        assert_eq!(t.causation.as_deref(), Some("reply-1"));
        assert_eq!(
            t.effects[1],
            JournalEffect::ScheduleWakeup {
                at: Timestamp(30000)
            }
        );
        let again = JournalEntry::new(Timestamp(5), &JournalRecord::Transition(t));
        assert_eq!(again, entry);

        let ignored = json!({"input": {"input": "redriven"}, "ignored": "not failed",
                             "refused": "condition", "causation": "op:alice:1"});
        let entry = JournalEntry {
            at: Timestamp(6),
            schema_version: 1,
            kind: "ignored".into(),
            body: ignored,
        };
        let record = entry.record().expect("decodes");
        assert_eq!(record.causation(), Some("op:alice:1"));
        assert!(matches!(
            &record,
            JournalRecord::Ignored(Ignored {
                refused: Some(Refused::Condition),
                ..
            })
        ));
        assert_eq!(JournalEntry::new(Timestamp(6), &record), entry);
        // The stored kind and body are the enum's own (adjacently tagged) serde form.
        assert_eq!(
            serde_json::to_value(&record).expect("encodes"),
            json!({ "kind": entry.kind, "body": entry.body })
        );
    }

    /// A saga over `()` starts with `"data": null`: present, so replay can start from it.
    #[test]
    fn null_start_data_is_present() {
        let entry = JournalEntry {
            at: Timestamp(1),
            schema_version: 1,
            kind: "transition".into(),
            body: json!({"input": {"input": "started"}, "status": "running", "effects": [],
                         "data": null, "data_version": 1, "created_at": 1}),
        };
        let JournalRecord::Transition(t) = entry.record().expect("decodes") else {
            panic!("not a transition");
        };
        assert_eq!(t.data, Some(Value::Null));
        assert_eq!(
            JournalEntry::new(Timestamp(1), &JournalRecord::Transition(t)),
            entry
        );
        let entry = JournalEntry {
            body: json!({"input": {"input": "resumed"}, "status": "running", "effects": []}),
            ..entry
        };
        let JournalRecord::Transition(t) = entry.record().expect("decodes") else {
            panic!("not a transition");
        };
        assert_eq!(t.data, None);
    }

    #[test]
    fn unknown_kinds_and_other_versions_are_errors_not_panics() {
        let entry = JournalEntry {
            at: Timestamp(1),
            schema_version: 1,
            kind: "note".into(),
            body: json!({"text": "hi"}),
        };
        assert!(matches!(
            entry.record(),
            Err(JournalError::Unreadable { .. })
        ));
        let old = JournalEntry {
            schema_version: 0,
            ..entry
        };
        assert!(matches!(
            old.record(),
            Err(JournalError::Version { found: 0, want: 1 })
        ));
    }

    /// An upcaster registered for the journal's payload type brings an old entry up.
    #[test]
    fn old_schema_entries_are_upcast_then_decoded() {
        let mut upcasters = Upcasters::default();
        upcasters.register(JOURNAL_PAYLOAD_TYPE, 0, 1, |mut body| {
            if let Some(reason) = body.get_mut("why").map(Value::take) {
                body["ignored"] = reason;
            }
            Ok(body)
        });
        let old = JournalEntry {
            at: Timestamp(1),
            schema_version: 0,
            kind: "ignored".into(),
            body: json!({"input": {"input": "started"}, "why": "duplicate"}),
        };
        let up = old.upcast(&upcasters).expect("upcasts");
        let JournalRecord::Ignored(i) = up.record().expect("decodes") else {
            panic!("not ignored");
        };
        assert_eq!(i.ignored, "duplicate");
    }
}
