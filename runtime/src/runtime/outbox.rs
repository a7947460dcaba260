//! What leaves through the outbox besides a transition's own commands: the relay that
//! publishes rows their writers left behind, the rewriting of command rows an older
//! build stored ([`restamp_reply`], [`upcast_command`]), and the one encoding of a
//! dead-letter announcement on `skald.dlq.<type>` ([`dead_letter_message`]), used for
//! sagas the machine dead-letters and for poison messages alike.
//!
//! The publisher task, which publishes a transition's rows right after its commit,
//! lives with the actors (`actors/publisher.rs`); [`PUBLISHER_QUEUE`] bounds its queue.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::actors::{Shared, publish_outbox};
use crate::error::report_fatal;
use crate::ids::SagaType;
use crate::machine::{DeadLetterInfo, SagaState};
use crate::ports::{DeadLetterRecord, Headers, Message, OutboxMessage};
use crate::wire;

/// Transitions whose messages may wait for the publisher at once.
pub(super) const PUBLISHER_QUEUE: usize = 4096;

/// What a dead-letter announcement is about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DeadLetterNotice<'a> {
    /// A saga the machine dead-lettered: its state after the transition, and where and
    /// why.
    Saga(&'a SagaState, &'a DeadLetterInfo),
    /// A message that can never be processed, as recorded in the store.
    Poison(&'a DeadLetterRecord),
}

/// The announcement of a dead letter on `skald.dlq.<saga_type>` (`skald.dlq.unknown`
/// for poison of no known type), for whoever watches dead letters. Its message id makes
/// a repeated publish a duplicate the broker drops. `None` when a poison record cannot
/// be encoded (it is still stored).
pub(crate) fn dead_letter_message(notice: DeadLetterNotice<'_>) -> Option<Message> {
    let mut headers = Headers::new();
    let (subject, msg_id, payload) = match notice {
        DeadLetterNotice::Saga(state, info) => {
            let body = serde_json::json!({
                "category": "saga",
                "saga_id": state.id,
                "saga_type": state.saga_type,
                "step": info.step_name,
                "kind": info.kind,
                "error": info.error,
                "attempts": info.attempts,
                "at": state.updated_at,
            });
            headers.insert(wire::H_SAGA_ID, state.id.to_string());
            headers.insert(wire::H_SAGA_TYPE, state.saga_type.as_str());
            (
                wire::dlq_subject(Some(&state.saga_type)),
                crate::ids::dead_letter_message_id(&state.id, &info.step_name, info.last_attempt),
                body.to_string().into_bytes(),
            )
        }
        DeadLetterNotice::Poison(record) => {
            // The record's type is raw (the sender wrote it): only a valid one names
            // the subject.
            let saga_type = record
                .saga_type
                .as_deref()
                .and_then(|t| SagaType::new(t).ok());
            (
                wire::dlq_subject(saga_type.as_ref()),
                crate::ids::poison_message_id(&record.id),
                serde_json::to_vec(record).ok()?,
            )
        }
    };
    headers.insert(wire::H_MSG_ID, msg_id);
    headers.insert(wire::H_SCHEMA_VERSION, "1");
    Some(Message {
        subject,
        headers,
        payload: payload.into(),
    })
}

/// A poison record's announcement as an outbox row, stored with the record and held by
/// its writer for `claim_lease` (as a transition's rows are).
pub(super) fn poison_announcement(
    record: &DeadLetterRecord,
    claim_lease: Duration,
) -> Option<OutboxMessage> {
    dead_letter_message(DeadLetterNotice::Poison(record)).map(|message| OutboxMessage {
        id: uuid::Uuid::now_v7(),
        message,
        available_at: record.at.plus(claim_lease),
    })
}

/// Publishes outbox rows their writers left behind (a crash, a broker outage): claims
/// the available ones for a lease, publishes them in commit order, reports them
/// published.
pub(super) async fn relay(shared: Arc<Shared>) {
    const BATCH: usize = 512;
    loop {
        let now = shared.clock.now();
        match shared
            .store
            .claim_outbox(
                now,
                shared.ownership.claim_filter().as_deref(),
                shared.options.claim_lease,
                BATCH,
            )
            .await
        {
            Ok(rows) if !rows.is_empty() => {
                let claimed = rows.len();
                let rows = rows
                    .into_iter()
                    .map(|r| upcast_command(&shared, r))
                    .collect();
                let published = publish_outbox(&shared, rows).await;
                shared
                    .stats
                    .relayed
                    .fetch_add(published as u64, std::sync::atomic::Ordering::Relaxed);
                debug!(claimed, published, "outbox relay");
                if published == claimed && claimed == BATCH {
                    continue; // more may be waiting
                }
            }
            Ok(_) => {}
            Err(e) => {
                report_fatal(&shared.fatal, &e);
                warn!(error = %e, "outbox relay: claiming rows failed; will retry");
            }
        }
        // The next poll, or sooner when rows were committed outside the runtime.
        let nudged = shared.relay_nudge.notified();
        let _ = tokio::time::timeout(shared.options.outbox_poll_interval, nudged).await;
    }
}

/// A command stored by a build before reply tokens (its `Skald-Reply-To` is the old
/// `skald.reply.<type>`, and it has no token) gets the reply subject of its service and
/// a token, so that its reply is accepted.
fn restamp_reply(shared: &Shared, m: &mut Message) {
    if m.headers.get(wire::H_REPLY_TOKEN).is_some() {
        return;
    }
    let Ok(command) = wire::decode_command(m) else {
        return;
    };
    let env = &command.envelope;
    let subject = wire::reply_subject(
        crate::ids::service_of(&m.subject),
        &env.saga_type,
        shared.ownership.partition_of(&env.saga_id),
    );
    m.headers.insert(wire::H_REPLY_TO, subject);
    m.headers
        .insert(wire::H_REPLY_TOKEN, shared.reply_keys.token(env));
}

/// A command row left in the outbox by an older build may carry a payload of an older
/// schema version than its step now declares: brings it up with the upcasters
/// registered for its subject. (The writer's own rows are always current; events and
/// dead letters have public schemas of their own.) If no path exists the row goes out
/// as it was, with its version header, for the participant to accept or refuse by name.
fn upcast_command(shared: &Shared, mut row: OutboxMessage) -> OutboxMessage {
    if !row.message.subject.starts_with(wire::COMMAND_PREFIX) {
        return row;
    }
    restamp_reply(shared, &mut row.message);
    let m = &row.message;
    let header = |name: &str| m.headers.get(name);
    let number = |name: &str| header(name).and_then(|v| v.parse::<u32>().ok());
    let (Some(ty), Some(step)) = (
        header(wire::H_SAGA_TYPE).and_then(|t| SagaType::new(t).ok()),
        header(wire::H_STEP),
    ) else {
        return row;
    };
    // Builds before schema versions sent neither header: their payloads are version 1,
    // and the step is found in the one registered version that has it.
    let from = number(wire::H_SCHEMA_VERSION).unwrap_or(1);
    let step_of = |d: &Arc<crate::definition::Definition>| {
        d.steps()
            .iter()
            .find(|s| s.name().as_str() == step)
            .map(|s| s.schema_version())
    };
    let to = match number(wire::H_DEFINITION_VERSION) {
        Some(dv) => shared.definitions.get(&ty, dv).and_then(step_of),
        None => {
            let candidates: Vec<u32> = shared
                .definitions
                .pairs()
                .into_iter()
                .filter(|(t, _)| *t == ty)
                .filter_map(|(t, v)| shared.definitions.get(&t, v).and_then(step_of))
                .collect();
            match candidates.as_slice() {
                [only] => Some(*only),
                _ => None,
            }
        }
    };
    let Some(to) = to else {
        return row;
    };
    if from >= to {
        return row;
    }
    let payload = match serde_json::from_slice::<serde_json::Value>(&m.payload) {
        Ok(p) => p,
        Err(_) => return row,
    };
    match shared.upcasters.upcast(&m.subject, payload, from, to) {
        Ok(up) => match serde_json::to_vec(&up) {
            Ok(bytes) => {
                row.message.payload = bytes.into();
                row.message
                    .headers
                    .insert(wire::H_SCHEMA_VERSION, to.to_string());
            }
            Err(e) => {
                warn!(subject = %row.message.subject, error = %e, "re-encoding an upcast command failed; sent as stored")
            }
        },
        Err(e) => {
            warn!(subject = %row.message.subject, error = %e, "an outbox command of an older schema version is sent as stored");
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CommandKind, SagaId, StepName};
    use crate::machine::{SagaStatus, StepError, Timestamp};
    use crate::ports::DeadLetterCategory;

    fn header<'m>(m: &'m Message, name: &str) -> Option<&'m str> {
        m.headers.get(name)
    }

    #[test]
    fn a_poison_announcement_carries_the_record_under_its_type() {
        let record = DeadLetterRecord {
            id: uuid::Uuid::from_u128(7),
            category: DeadLetterCategory::Poison,
            saga_id: None,
            saga_type: Some("checkout".into()),
            step: None,
            kind: None,
            reason: "forged reply: bad token".into(),
            attempts: 1,
            message: None,
            at: Timestamp(1_000),
            resolved_at: None,
        };
        let row = poison_announcement(&record, Duration::from_secs(5)).expect("encodes");
        assert_eq!(row.message.subject, "skald.dlq.checkout");
        assert_eq!(row.available_at, Timestamp(6_000));
        assert_eq!(
            header(&row.message, wire::H_MSG_ID),
            Some(format!("dlq:poison:{}", record.id).as_str())
        );
        assert_eq!(header(&row.message, wire::H_SCHEMA_VERSION), Some("1"));
        assert_eq!(header(&row.message, wire::H_SAGA_ID), None);
        let body: DeadLetterRecord =
            serde_json::from_slice(&row.message.payload).expect("the record");
        assert_eq!(body, record);
    }

    #[test]
    fn a_poison_record_of_an_invalid_type_is_announced_as_unknown() {
        let record = DeadLetterRecord {
            id: uuid::Uuid::from_u128(8),
            category: DeadLetterCategory::Poison,
            saga_id: None,
            saga_type: Some("not a type!".into()),
            step: None,
            kind: None,
            reason: "x".into(),
            attempts: 1,
            message: None,
            at: Timestamp(0),
            resolved_at: None,
        };
        let m = dead_letter_message(DeadLetterNotice::Poison(&record)).expect("encodes");
        assert_eq!(m.subject, "skald.dlq.unknown");
    }

    #[test]
    fn a_saga_announcement_names_the_saga_step_and_last_attempt() {
        let id = SagaId::new();
        let saga_type = SagaType::new("checkout").expect("valid");
        let state = SagaState {
            id,
            saga_type,
            definition_version: 1,
            data_version: 1,
            data: serde_json::json!({}),
            status: SagaStatus::Failed,
            completed: 0,
            pending: None,
            failure: None,
            dead_letter: None,
            cancel: None,
            in_doubt: None,
            redrives: 0,
            created_at: Timestamp(1),
            updated_at: Timestamp(2),
        };
        let info = DeadLetterInfo {
            step: 0,
            step_name: StepName::new("charge").expect("valid"),
            kind: CommandKind::Action,
            error: StepError::new("declined", "card declined"),
            attempts: 3,
            last_attempt: 3,
            in_doubt: false,
        };
        let m = dead_letter_message(DeadLetterNotice::Saga(&state, &info)).expect("encodes");
        assert_eq!(m.subject, "skald.dlq.checkout");
        assert_eq!(
            header(&m, wire::H_MSG_ID),
            Some(format!("dlq:{id}:charge:3").as_str())
        );
        assert_eq!(header(&m, wire::H_SAGA_ID), Some(id.to_string().as_str()));
        let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(body["category"], "saga");
        assert_eq!(body["error"]["code"], "declined");
        assert_eq!(body["attempts"], 3);
    }
}
