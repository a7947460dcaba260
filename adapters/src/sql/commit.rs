//! Group commits, the same in both SQL stores: the JSON form of a batch (PostgreSQL's
//! `skald_commit`, SQLite's `json_each` statements), its split into rounds, and the
//! decisions of each round's outcomes from what the statements returned.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use skald_runtime::ids::{CommandKind, SagaId};
use skald_runtime::machine::SagaState;
use skald_runtime::ports::{Headers, SagaWrite, StoreError, WriteOutcome};
use uuid::Uuid;

use super::{QueryRow, ms};

/// One group commit as JSON: the argument of PostgreSQL's `skald_commit`, and the arrays
/// SQLite's set-based statements read with `json_each`. Serialized straight from the
/// writes, without copies.
#[derive(Serialize)]
pub(crate) struct CommitBatch<'a> {
    pub(crate) published: &'a [Uuid],
    pub(crate) writes: Vec<CommitWrite<'a>>,
}

#[derive(Serialize)]
pub(crate) struct CommitWrite<'a> {
    id: SagaId,
    /// Recorded with a created saga and with every outbox row of the write.
    partition: u32,
    expected: u64,
    state: Option<&'a SagaState>,
    saga_type: Option<&'a str>,
    definition_version: Option<u32>,
    status: Option<&'static str>,
    wake: Option<i64>,
    created: Option<i64>,
    updated: Option<i64>,
    journal: Vec<CommitEntry<'a>>,
    outbox: Vec<CommitOutbox<'a>>,
    inbox: Option<&'a str>,
    inbox_at: i64,
    resolve_at: Option<i64>,
    dead_letter: Option<CommitDeadLetter<'a>>,
}

#[derive(Serialize)]
pub(crate) struct CommitEntry<'a> {
    at: i64,
    schema_version: u16,
    kind: &'a str,
    body: &'a serde_json::Value,
}

#[derive(Serialize)]
pub(crate) struct CommitOutbox<'a> {
    id: Uuid,
    subject: &'a str,
    headers: &'a Headers,
    /// Hex: any bytes, decoded by the function.
    payload: String,
    created: i64,
    available: i64,
}

#[derive(Serialize)]
pub(crate) struct CommitDeadLetter<'a> {
    id: Uuid,
    category: &'static str,
    saga_id: Option<SagaId>,
    saga_type: Option<&'a str>,
    step: Option<&'a str>,
    kind: Option<&'static str>,
    reason: &'a str,
    attempts: u32,
    message: Option<&'a serde_json::Value>,
    at: i64,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

impl<'a> CommitWrite<'a> {
    pub(crate) fn of(w: &'a SagaWrite) -> Self {
        let first_at = w.journal.first().map(|j| j.at).unwrap_or_default();
        let state = w.state.as_ref();
        CommitWrite {
            id: w.id,
            partition: w.partition,
            expected: w.expected_version,
            state,
            saga_type: state.map(|s| s.saga_type.as_str()),
            definition_version: state.map(|s| s.definition_version),
            status: state.map(|s| s.status.as_str()),
            wake: state.and_then(|s| s.wake_at()).map(ms),
            created: state.map(|s| ms(s.created_at)),
            updated: state.map(|s| ms(s.updated_at)),
            journal: w
                .journal
                .iter()
                .map(|e| CommitEntry {
                    at: ms(e.at),
                    schema_version: e.schema_version,
                    kind: &e.kind,
                    body: &e.body,
                })
                .collect(),
            outbox: w
                .outbox
                .iter()
                .map(|m| CommitOutbox {
                    id: m.id,
                    subject: &m.message.subject,
                    headers: &m.message.headers,
                    payload: hex(&m.message.payload),
                    created: ms(crate::created_at(m.id)),
                    available: ms(m.available_at),
                })
                .collect(),
            inbox: w.inbox.as_deref(),
            inbox_at: ms(first_at),
            resolve_at: w.resolve_dead_letters.then(|| ms(first_at)),
            dead_letter: w.dead_letter.as_ref().map(|d| CommitDeadLetter {
                id: d.id,
                category: d.category.as_str(),
                saga_id: d.saga_id,
                saga_type: d.saga_type.as_deref(),
                step: d.step.as_deref(),
                kind: d.kind.map(CommandKind::as_str),
                reason: &d.reason,
                attempts: d.attempts,
                message: d.message.as_ref(),
                at: ms(d.at),
            }),
        }
    }
}

/// The version checks of journal-only writes (an ignored input): `rows` are the current
/// `id, version` of their sagas; a write whose saga is still at the version it read is
/// `applied`.
pub(crate) fn check_versions<'a>(
    rows: &[impl QueryRow],
    checks: impl IntoIterator<Item = &'a SagaWrite>,
    applied: &mut HashSet<SagaId>,
) -> Result<(), StoreError> {
    let mut current: HashMap<SagaId, i64> = HashMap::with_capacity(rows.len());
    for r in rows {
        current.insert(r.saga_id("id")?, r.int("version")?);
    }
    for w in checks {
        if current.get(&w.id).and_then(|v| u64::try_from(*v).ok()) == Some(w.expected_version) {
            applied.insert(w.id);
        }
    }
    Ok(())
}

/// Marks the writes whose inbox entry was not inserted (`inserted`: the message ids the
/// insert returned) as duplicates.
pub(crate) fn mark_duplicates<'a>(
    inserted: Vec<String>,
    with_inbox: impl IntoIterator<Item = (usize, &'a SagaWrite)>,
    outcomes: &mut [Option<WriteOutcome>],
) {
    let inserted: HashSet<String> = inserted.into_iter().collect();
    for (i, w) in with_inbox {
        if !w.inbox.as_ref().is_some_and(|m| inserted.contains(m)) {
            outcomes[i] = Some(WriteOutcome::Duplicate);
        }
    }
}

/// Decides the live writes of a round: committed when their saga row was written (or
/// its version checked, `applied`), a conflict otherwise. Returns the inbox ids of the
/// conflicts: nothing of a conflicting write may stay, its inbox entry included.
pub(crate) fn settle<'a>(
    live: impl IntoIterator<Item = (usize, &'a SagaWrite)>,
    applied: &HashSet<SagaId>,
    outcomes: &mut [Option<WriteOutcome>],
) -> Vec<&'a str> {
    let mut conflicted_inbox = Vec::new();
    for (i, w) in live {
        outcomes[i] = Some(if applied.contains(&w.id) {
            WriteOutcome::Committed {
                version: w.expected_version + u64::from(w.state.is_some()),
            }
        } else {
            if let Some(m) = &w.inbox {
                conflicted_inbox.push(m.as_str());
            }
            WriteOutcome::Conflict
        });
    }
    conflicted_inbox
}

/// Splits the writes (their indices, in the order given) into rounds in which no saga
/// appears twice: a saga written twice in one batch (a passivation race) goes into a
/// later round, so every set-based statement sees each saga once.
pub(crate) fn rounds(
    writes: &[SagaWrite],
    order: impl IntoIterator<Item = usize>,
) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: HashMap<SagaId, usize> = HashMap::with_capacity(writes.len());
    for i in order {
        let round = seen.entry(writes[i].id).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
        *round += 1;
    }
    rounds
}
