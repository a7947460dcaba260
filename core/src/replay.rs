//! Replaying a saga's journal through the machine.
//!
//! The journal records every input a saga took, when, and what the machine did with it
//! (the status it reached and a summary of its effects, without payloads). Because
//! [`transition`] is pure (time and jitter travel inside the inputs), feeding the
//! recorded inputs to it again rebuilds every state the saga went through:
//! - **time travel** (`skald at ID --time T`): the state as it was at time `T`;
//! - **replay checks**: whether the definition registered now takes the path the saga
//!   took, or the first entry where it would not, and why.
//!
//! The first entry (`started`) carries the data and creation time the saga started with.
//!
//! **Bounded journals.** A step retried for days must not grow its saga's journal
//! without limit. The first `window` attempts of a retry run are journaled one by one;
//! after that, a `snapshot` entry records the state and the retries that follow are not
//! journaled (the saga row is the snapshot recovery starts from). When the run ends (a
//! success, a give-up, a cancel), a second `snapshot` holds the state it ended in,
//! followed by the transition that ended it. Replay jumps to a snapshot's state; time
//! travel inside a compacted run shows the state at its start.

use serde::Serialize;
use serde_json::Value;

use crate::definition::Definition;
use crate::ids::SagaId;
pub use crate::journal::JOURNAL_PAYLOAD_TYPE;
use crate::journal::{JournalEffect, JournalEntry, JournalRecord, Refused, Snapshot};
use crate::machine::{self, Input, SagaState, Timestamp};
use crate::upcast::Upcasters;

/// What the journal records for one transition (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalPlan {
    /// The transition entry.
    Entry,
    /// Nothing: a retry inside a compacted run.
    Skip,
    /// A run just passed the window: the transition entry, then a snapshot of the state
    /// after it (retries are not journaled from here on).
    EntryThenSnapshot,
    /// A compacted run ended: a snapshot of the state before, then the transition entry.
    SnapshotThenEntry,
}

/// Inputs that retry the step in flight (rather than end its retry run).
fn retries(input: &Input) -> bool {
    matches!(
        input,
        Input::TimedOut { .. } | Input::StepFailed { .. } | Input::RetryDue { .. } | Input::Resumed
    )
}

/// Decides how the transition from `before` to `after` on `input` is journaled when
/// retry runs longer than `window` attempts are compacted.
pub fn journal_plan(
    input: &Input,
    before: &SagaState,
    after: &SagaState,
    window: u32,
) -> JournalPlan {
    let run = |s: &SagaState| s.pending.map(|p| (p.step, p.kind, p.first_attempt));
    let used = |s: &SagaState| s.pending.map_or(0, |p| p.attempts_used());
    let same_run = run(before).is_some() && run(before) == run(after);
    let compacted_before = used(before) > window;
    if retries(input) && same_run {
        if compacted_before {
            JournalPlan::Skip
        } else if used(after) > window {
            JournalPlan::EntryThenSnapshot
        } else {
            JournalPlan::Entry
        }
    } else if compacted_before {
        JournalPlan::SnapshotThenEntry
    } else {
        JournalPlan::Entry
    }
}

/// A snapshot record of `state`, saying why it was taken.
pub fn snapshot(state: &SagaState, note: &str) -> JournalRecord {
    JournalRecord::Snapshot(Snapshot {
        snapshot: state.clone(),
        note: note.to_owned(),
    })
}

/// Why a journal cannot be replayed at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The journal is empty.
    #[error("saga {0} has no journal")]
    Empty(SagaId),
    /// The first entry is not a `started` transition with the initial data (a journal
    /// written before skald recorded it, or a truncated one).
    #[error("saga {0}: the journal's first entry does not hold the data the saga started with")]
    NoStart(SagaId),
    /// The data the journal starts from (or a snapshot's) is of an older schema version
    /// and cannot be brought up (no upcaster path).
    #[error("saga {id}: {reason}")]
    Unreadable {
        /// The saga.
        id: SagaId,
        /// Why (names the payload type and both versions).
        reason: String,
    },
    /// A state the journal holds (a snapshot) does not fit the definition replayed
    /// against: it names a step index the definition does not have (a version with
    /// fewer steps than the saga went through), or its attempt counters are damaged.
    /// Nothing of the definition is indexed with it: the replay stops with this error.
    #[error(
        "saga {id}: the state at journal entry #{entry} does not fit definition \
         {saga_type} v{version}: {reason}"
    )]
    StateDoesNotFit {
        /// The saga.
        id: SagaId,
        /// The journal entry (0-based) holding the state.
        entry: usize,
        /// The definition's saga type.
        saga_type: String,
        /// The definition's version.
        version: u32,
        /// What does not fit (the field, its value, the number of steps).
        reason: String,
    },
    /// `until` is before the saga was created.
    #[error("saga {id} did not exist yet at {at} ms (it was created at {created} ms)")]
    BeforeCreation {
        /// The saga.
        id: SagaId,
        /// The time asked for.
        at: u64,
        /// When it was created.
        created: u64,
    },
}

/// Where a replay left the recorded path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Divergence {
    /// The journal entry (0-based) where the paths part.
    pub entry: usize,
    /// When that entry was recorded.
    pub at: Timestamp,
    /// The entry's input (`step_succeeded`, ...).
    pub input: String,
    /// What differs.
    pub reason: String,
}

/// The result of a replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replayed {
    /// The state after the last entry replayed (at or before `until`).
    pub state: SagaState,
    /// How many journal entries were replayed (transitions and ignored inputs).
    pub entries: usize,
    /// When the last replayed entry was recorded.
    pub last_at: Timestamp,
    /// The first entry where the machine, under the definition given, did not do what
    /// the journal recorded; replay stops there.
    pub divergence: Option<Divergence>,
}

/// Replays `journal` (saga `id`'s, oldest first) through [`machine::transition`] under
/// `definition`, up to and including the entries recorded at or before `until` (all of
/// them when `None`). Each transition's recorded status and effects are compared with
/// the machine's; the first difference stops the replay and is reported.
pub fn replay(
    definition: &Definition,
    id: SagaId,
    journal: &[JournalEntry],
    until: Option<Timestamp>,
) -> Result<Replayed, ReplayError> {
    replay_with(definition, id, journal, until, &Upcasters::default())
}

/// Brings a replayed state's data to the definition's data version.
fn upcast_state(
    definition: &Definition,
    upcasters: &Upcasters,
    state: &mut SagaState,
) -> Result<(), ReplayError> {
    let id = state.id;
    crate::upcast::upcast_saga_data(upcasters, definition, state).map_err(|e| {
        ReplayError::Unreadable {
            id,
            reason: e.to_string(),
        }
    })
}

/// Checks that `state` (a snapshot's, read from journal entry `entry`) fits
/// `definition`: every step index it holds names one of its steps. The machine indexes
/// the definition's steps by them, so a state that does not fit is an error here.
fn check_fits(
    definition: &Definition,
    id: SagaId,
    entry: usize,
    state: &SagaState,
) -> Result<(), ReplayError> {
    machine::check_state(definition, state).map_err(|e| does_not_fit(definition, id, entry, &e))
}

fn does_not_fit(
    definition: &Definition,
    id: SagaId,
    entry: usize,
    e: &machine::TransitionError,
) -> ReplayError {
    let reason = match e {
        machine::TransitionError::StepOutOfRange {
            field,
            index,
            steps,
            ..
        } => format!(
            "its {field} is {index}, but the definition has {steps} step(s) (indexes 0 to {})",
            steps.saturating_sub(1)
        ),
        e => e.to_string(),
    };
    ReplayError::StateDoesNotFit {
        id,
        entry,
        saga_type: definition.saga_type().to_string(),
        version: definition.version(),
        reason,
    }
}

/// Like [`replay`], bringing data stored at an older schema version (the journal's
/// starting data, snapshots) up to the definition's with `upcasters`.
pub fn replay_with(
    definition: &Definition,
    id: SagaId,
    journal: &[JournalEntry],
    until: Option<Timestamp>,
    upcasters: &Upcasters,
) -> Result<Replayed, ReplayError> {
    // Entries written in an older journal format are brought up first, then decoded.
    // Each record keeps its stored kind, for an entry that does not decode.
    type Decoded = (Timestamp, bool, Result<JournalRecord, String>);
    let records: Vec<Decoded> = journal
        .iter()
        .map(|e| {
            let up = e.upcast(upcasters).map_err(|err| ReplayError::Unreadable {
                id,
                reason: err.to_string(),
            })?;
            let ignored = up.kind == JournalRecord::IGNORED;
            Ok((up.at, ignored, up.record().map_err(|err| err.to_string())))
        })
        .collect::<Result<_, ReplayError>>()?;
    let (first_at, _, first) = records.first().ok_or(ReplayError::Empty(id))?;
    let start = match first {
        Ok(JournalRecord::Transition(t)) if t.input == Input::Started => t,
        Ok(_) => return Err(ReplayError::NoStart(id)),
        Err(reason) => {
            return Err(ReplayError::Unreadable {
                id,
                reason: format!("the first journal entry: {reason}"),
            });
        }
    };
    let Some(data) = &start.data else {
        return Err(ReplayError::NoStart(id));
    };
    let created = start.created_at.unwrap_or(*first_at);
    if let Some(t) = until
        && t < created
    {
        return Err(ReplayError::BeforeCreation {
            id,
            at: t.as_millis(),
            created: created.as_millis(),
        });
    }
    let mut state = SagaState::new(id, definition, data.clone(), created);
    state.data_version = start.data_version.unwrap_or(1);
    upcast_state(definition, upcasters, &mut state)?;
    let mut replayed = Replayed {
        state: state.clone(),
        entries: 0,
        last_at: created,
        divergence: None,
    };
    let mut after_snapshot = false;
    for (index, (at, ignored, record)) in records.into_iter().enumerate() {
        if until.is_some_and(|t| at > t) {
            break;
        }
        let diverge = |input: &str, reason: String| Divergence {
            entry: index,
            at,
            input: input.to_owned(),
            reason,
        };
        let record = match record {
            Ok(r) => r,
            // An ignored input after a snapshot is skipped unread (see below).
            Err(_) if ignored && after_snapshot => {
                replayed.entries = index + 1;
                replayed.last_at = at;
                continue;
            }
            Err(reason) => {
                replayed.divergence = Some(diverge("?", reason));
                break;
            }
        };
        let (input, recorded) = match record {
            JournalRecord::Snapshot(Snapshot { snapshot, .. }) => {
                // A snapshot holds step indexes of the definition that wrote it;
                // replayed against another (`skald replay --against`), they may name
                // steps it does not have.
                check_fits(definition, id, index, &snapshot)?;
                state = snapshot;
                upcast_state(definition, upcasters, &mut state)?;
                after_snapshot = true;
                replayed.entries = index + 1;
                replayed.last_at = at;
                continue;
            }
            // Between a snapshot and the next transition the state held here may be
            // behind the saga's (retries not journaled one by one): an input ignored
            // then cannot be judged against it. Nor can a request refused for
            // unreadable data, which the data's upcasters (if registered now) would let
            // through.
            JournalRecord::Ignored(i)
                if after_snapshot || i.refused == Some(Refused::DataUnreadable) =>
            {
                replayed.entries = index + 1;
                replayed.last_at = at;
                continue;
            }
            JournalRecord::Ignored(i) => (i.input, Err(i.ignored)),
            JournalRecord::Transition(t) => {
                after_snapshot = false;
                (t.input, Ok((t.status, t.effects)))
            }
        };
        let result = machine::transition(definition, &state, &input, at);
        // Not a difference of paths: the state replayed so far does not fit the
        // definition at all (only a snapshot's can: `check_fits` refused those).
        if let Err(e) = &result
            && e.is_corrupt_state()
        {
            return Err(does_not_fit(definition, id, index, e));
        }
        let divergence = match (recorded, result) {
            (Ok((recorded_status, recorded_effects)), Ok((next, effects))) => {
                let now_effects = JournalEffect::summary(&effects);
                state = next;
                if recorded_status != state.status {
                    Some(format!(
                        "recorded status {recorded_status}, the definition now reaches {}",
                        state.status
                    ))
                } else if untimed(&recorded_effects) != untimed(&now_effects) {
                    Some(first_difference(
                        &untimed(&recorded_effects),
                        &untimed(&now_effects),
                    ))
                } else {
                    None
                }
            }
            (Ok(_), Err(e)) => Some(format!(
                "recorded as applied, the definition now refuses it: {e}"
            )),
            (Err(why), Ok(_)) => Some(format!(
                "recorded as ignored ({why}), the definition now applies it"
            )),
            // Ignored then and now (a late or duplicate reply): no state change.
            (Err(_), Err(_)) => None,
        };
        if let Some(reason) = divergence {
            replayed.divergence = Some(diverge(input.name(), reason));
            break;
        }
        replayed.entries = index + 1;
        replayed.last_at = at;
    }
    replayed.state = state;
    Ok(replayed)
}

/// A replay check: replays the whole journal of `stored` under `definition` and, when
/// every entry matched, compares the state it ends in with the stored one (a changed
/// `on_success` mapping shows only there: the journal keeps no payloads).
pub fn check(
    definition: &Definition,
    stored: &SagaState,
    journal: &[JournalEntry],
) -> Result<Replayed, ReplayError> {
    check_with(definition, stored, journal, &Upcasters::default())
}

/// Like [`check`], with `upcasters` for data stored at older schema versions.
pub fn check_with(
    definition: &Definition,
    stored: &SagaState,
    journal: &[JournalEntry],
    upcasters: &Upcasters,
) -> Result<Replayed, ReplayError> {
    let mut r = replay_with(definition, stored.id, journal, None, upcasters)?;
    // Compare like with like: the stored data brought to the same version.
    let mut upcast = stored.clone();
    upcast_state(definition, upcasters, &mut upcast)?;
    let stored = &upcast;
    // A saga inside a compacted retry run is ahead of its journal's last snapshot.
    // (By the stored kind, which every schema version keeps: no decoding needed.)
    let compacting = journal
        .iter()
        .rev()
        .find(|e| e.kind != JournalRecord::IGNORED)
        .is_some_and(|e| e.kind == JournalRecord::SNAPSHOT);
    if r.divergence.is_none() && !compacting && untimed_state(&r.state) != untimed_state(stored) {
        let reason = match (
            serde_json::to_value(untimed_state(&r.state)),
            serde_json::to_value(untimed_state(stored)),
        ) {
            (Ok(Value::Object(now)), Ok(Value::Object(then))) => {
                let mut fields: Vec<&str> = then
                    .iter()
                    .filter(|(k, v)| now.get(*k) != Some(v))
                    .map(|(k, _)| k.as_str())
                    .collect();
                fields.sort_unstable();
                format!(
                    "the journal replays to a different state than the stored one: {} differ",
                    fields.join(", ")
                )
            }
            _ => "the journal replays to a different state than the stored one".to_owned(),
        };
        r.divergence = Some(Divergence {
            entry: journal.len(),
            at: r.last_at,
            input: "(end)".to_owned(),
            reason,
        });
    }
    Ok(r)
}

/// An effect summary without its times (reply deadlines) and without the wake-ups
/// older builds journaled as effects: a changed timeout or retry delay changes when
/// things happen, not which path a saga takes.
fn untimed(effects: &[JournalEffect]) -> Vec<JournalEffect> {
    effects
        .iter()
        .filter(|e| !matches!(e, JournalEffect::ScheduleWakeup { .. }))
        .cloned()
        .map(|mut e| {
            if let JournalEffect::SendCommand { deadline, .. } = &mut e {
                *deadline = Timestamp(0);
            }
            e
        })
        .collect()
}

/// A state without its timers' times (see [`untimed`]).
fn untimed_state(state: &SagaState) -> SagaState {
    let mut s = state.clone();
    if let Some(p) = &mut s.pending {
        p.phase = match p.phase {
            crate::machine::Phase::AwaitingReply { .. } => crate::machine::Phase::AwaitingReply {
                deadline: Timestamp(0),
            },
            crate::machine::Phase::Backoff { .. } => {
                crate::machine::Phase::Backoff { due: Timestamp(0) }
            }
        };
    }
    s
}

/// One effect of a summary, in words.
fn describe_effect(e: &JournalEffect) -> String {
    match e {
        JournalEffect::SendCommand {
            step,
            kind,
            attempt,
            subject,
            ..
        } => format!("send {step} {kind} #{attempt} on {subject}"),
        JournalEffect::ScheduleWakeup { .. } => "schedule a wake-up".to_owned(),
        JournalEffect::EmitLifecycleEvent { event, .. } => {
            format!(
                "emit {}",
                serde_json::to_value(event)
                    .unwrap_or(Value::Null)
                    .as_str()
                    .unwrap_or("?")
            )
        }
        JournalEffect::DeadLetter(info) => format!("dead-letter {} {}", info.step_name, info.kind),
        JournalEffect::Finished { status } => format!("finish as {status}"),
    }
}

/// The first effect that differs between two summaries, in words.
fn first_difference(recorded: &[JournalEffect], now: &[JournalEffect]) -> String {
    for i in 0..recorded.len().max(now.len()) {
        match (recorded.get(i), now.get(i)) {
            (Some(x), Some(y)) if x == y => continue,
            (Some(x), Some(y)) => {
                return format!(
                    "the journal recorded: {}; the definition now does: {}",
                    describe_effect(x),
                    describe_effect(y)
                );
            }
            (Some(x), None) => {
                return format!(
                    "the journal recorded: {}; the definition now does nothing more",
                    describe_effect(x)
                );
            }
            (None, Some(y)) => {
                return format!(
                    "the definition now also does: {}, which the journal does not record",
                    describe_effect(y)
                );
            }
            (None, None) => break,
        }
    }
    "the effects differ".to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;
    use crate::definition::{SagaDefinition, Step};
    use crate::ids::{CommandKind, StepName};
    use crate::journal::{Ignored, Transition};
    use crate::machine::SagaStatus;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Order {
        done: Vec<String>,
    }

    #[derive(Deserialize)]
    struct Receipt {
        receipt: String,
    }

    fn step(name: &str) -> Step<Order> {
        Step::new(name)
            .action(format!("skald.cmd.{name}.do"), |o: &Order| json!(o.done))
            .on_success(|o: &mut Order, r: Receipt| o.done.push(r.receipt))
            .compensate(format!("skald.cmd.{name}.undo"), |_: &Order| json!({}))
            .timeout(Duration::from_secs(5))
    }

    fn definition(steps: &[&str]) -> SagaDefinition<Order> {
        steps
            .iter()
            .fold(SagaDefinition::<Order>::builder("shop", 1), |b, s| {
                b.step(step(s))
            })
            .build()
            .expect("valid")
    }

    fn success(step: &str, receipt: &str) -> Input {
        Input::StepSucceeded {
            step: StepName::new(step).expect("name"),
            kind: CommandKind::Action,
            attempt: 1,
            output: json!({ "receipt": receipt }),
        }
    }

    /// Runs `inputs` (each at its time) the way an instance actor does and journals
    /// them: a transition's body, or an ignored entry for a refused input.
    fn run(def: &SagaDefinition<Order>, inputs: &[(u64, Input)]) -> (SagaState, Vec<JournalEntry>) {
        let def = def.definition();
        let start = SagaState::new(SagaId::new(), def, json!({ "done": [] }), Timestamp(1_000));
        let mut state = start.clone();
        let mut journal = Vec::new();
        for (i, (at, input)) in inputs.iter().enumerate() {
            let record = match machine::transition(def, &state, input, Timestamp(*at)) {
                Ok((next, effects)) => {
                    let start = (i == 0).then_some(&start);
                    let record = Transition::new(input, &next, &effects, start, None);
                    state = next;
                    JournalRecord::Transition(record)
                }
                Err(e) => JournalRecord::Ignored(Ignored {
                    input: input.clone(),
                    ignored: e.to_string(),
                    refused: None,
                    causation: None,
                }),
            };
            journal.push(JournalEntry::new(Timestamp(*at), &record));
        }
        (state, journal)
    }

    fn inputs() -> Vec<(u64, Input)> {
        vec![
            (1_010, Input::Started),
            (1_100, success("reserve", "r-1")),
            (1_150, success("reserve", "r-1")), // a duplicate: ignored
            (1_200, success("charge", "c-1")),
        ]
    }

    #[test]
    fn a_full_replay_rebuilds_the_final_state() {
        let def = definition(&["reserve", "charge"]);
        let (final_state, journal) = run(&def, &inputs());
        assert_eq!(journal[2].kind, "ignored");
        let r = replay(def.definition(), final_state.id, &journal, None).expect("replay");
        assert_eq!(r.divergence, None);
        assert_eq!(r.entries, 4);
        assert_eq!(r.state, final_state);
        assert_eq!(r.state.status, SagaStatus::Completed);
    }

    #[test]
    fn time_travel_stops_at_the_time_asked() {
        let def = definition(&["reserve", "charge"]);
        let (final_state, journal) = run(&def, &inputs());
        let r = replay(
            def.definition(),
            final_state.id,
            &journal,
            Some(Timestamp(1_199)),
        )
        .expect("replay");
        assert_eq!(r.entries, 3);
        assert_eq!(r.last_at, Timestamp(1_150));
        assert_eq!(r.state.status, SagaStatus::Running);
        assert_eq!(r.state.completed, 1);
        assert_eq!(r.state.data, json!({ "done": ["r-1"] }));
        assert_eq!(r.state.updated_at, Timestamp(1_100));

        let e = replay(
            def.definition(),
            final_state.id,
            &journal,
            Some(Timestamp(999)),
        )
        .expect_err("before creation");
        assert!(
            matches!(e, ReplayError::BeforeCreation { created: 1_000, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_reordered_definition_diverges_at_the_first_command() {
        let (final_state, journal) = run(&definition(&["reserve", "charge"]), &inputs());
        let changed = definition(&["charge", "reserve"]);
        let r = replay(changed.definition(), final_state.id, &journal, None).expect("replay");
        let d = r.divergence.expect("diverges");
        assert_eq!((d.entry, d.input.as_str()), (0, "started"));
        assert!(
            d.reason.contains("reserve") && d.reason.contains("charge"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_removed_step_diverges_where_its_reply_is_refused() {
        let (final_state, journal) = run(&definition(&["reserve", "charge"]), &inputs());
        let shorter = definition(&["reserve"]);
        let r = replay(shorter.definition(), final_state.id, &journal, None).expect("replay");
        let d = r.divergence.expect("diverges");
        // reserve succeeding now completes the saga: status differs at entry 1.
        assert_eq!(d.entry, 1);
        assert!(d.reason.contains("completed"), "{}", d.reason);
    }

    #[test]
    fn a_check_compares_the_final_state_with_the_stored_one() {
        let def = definition(&["reserve", "charge"]);
        let (stored, journal) = run(&def, &inputs());
        let ok = check(def.definition(), &stored, &journal).expect("check");
        assert_eq!(ok.divergence, None);
        // A different on_success mapping sends the same commands but keeps other data.
        let mapped =
            ["reserve", "charge"]
                .iter()
                .fold(SagaDefinition::<Order>::builder("shop", 1), |b, s| {
                    b.step(step(s).on_success(|o: &mut Order, r: Receipt| {
                        o.done.push(r.receipt.to_uppercase())
                    }))
                })
                .build()
                .expect("valid");
        let d = check(mapped.definition(), &stored, &journal)
            .expect("check")
            .divergence
            .expect("the data differs");
        assert_eq!((d.entry, d.input.as_str()), (4, "(end)"));
        assert!(d.reason.contains("data"), "{}", d.reason);
    }

    #[test]
    fn a_changed_timeout_is_the_same_path() {
        let def = definition(&["reserve", "charge"]);
        let (stored, journal) = run(&def, &inputs()[..3]);
        let slower = ["reserve", "charge"]
            .iter()
            .fold(SagaDefinition::<Order>::builder("shop", 1), |b, s| {
                b.step(step(s).timeout(Duration::from_secs(60)))
            })
            .build()
            .expect("valid");
        let r = check(slower.definition(), &stored, &journal).expect("check");
        assert_eq!(r.divergence, None);
    }

    #[test]
    fn journal_entries_of_an_older_format_are_upcast_on_read() {
        let def = definition(&["reserve", "charge"]);
        let (stored, journal) = run(&def, &inputs());
        // The same journal as an imaginary format 0 wrote it: the input under "event".
        let old: Vec<JournalEntry> = journal
            .iter()
            .map(|e| {
                let mut body = e.body.clone();
                if let Some(o) = body.as_object_mut()
                    && let Some(input) = o.remove("input")
                {
                    o.insert("event".into(), input);
                }
                JournalEntry {
                    schema_version: 0,
                    body,
                    ..e.clone()
                }
            })
            .collect();
        let e = replay(def.definition(), stored.id, &old, None).expect_err("no upcaster");
        assert!(
            e.to_string()
                .contains("no upcaster path for skald.journal from schema version 0 to 1"),
            "{e}"
        );
        let mut upcasters = Upcasters::new();
        upcasters.register(JOURNAL_PAYLOAD_TYPE, 0, 1, |mut body| {
            if let Some(o) = body.as_object_mut()
                && let Some(input) = o.remove("event")
            {
                o.insert("input".into(), input);
            }
            Ok(body)
        });
        let r = check_with(def.definition(), &stored, &old, &upcasters).expect("replay");
        assert_eq!(r.divergence, None);
        assert_eq!(r.state, stored);
    }

    #[test]
    fn a_late_reply_inside_a_compacted_run_is_not_a_divergence() {
        use crate::machine::{Pending, Phase};
        let def = definition(&["reserve", "charge"]);
        // Started, reserve succeeded: the charge's attempt 1 is in flight.
        let (mut stored, mut journal) = run(&def, &inputs()[..2]);
        let at_attempt = |state: &SagaState, attempt: u32| {
            let mut s = state.clone();
            s.pending = Some(Pending {
                attempt,
                phase: Phase::AwaitingReply {
                    deadline: Timestamp(9_000),
                },
                ..s.pending.expect("pending")
            });
            s
        };
        // The run is compacted at attempt 11; attempts 12.. are not journaled; attempt
        // 11's late reply arrives while attempt 15 is in flight and is ignored (stale).
        journal.push(JournalEntry::new(
            Timestamp(2_000),
            &snapshot(&at_attempt(&stored, 11), "compacted"),
        ));
        let late = Input::StepSucceeded {
            step: StepName::new("charge").expect("name"),
            kind: CommandKind::Action,
            attempt: 11,
            output: json!({ "receipt": "c-late" }),
        };
        let ignored = Ignored {
            input: late,
            ignored: "stale reply".into(),
            refused: None,
            causation: None,
        };
        journal.push(JournalEntry::new(
            Timestamp(3_000),
            &JournalRecord::Ignored(ignored),
        ));
        stored = at_attempt(&stored, 15);
        let r = check(def.definition(), &stored, &journal).expect("check");
        assert_eq!(r.divergence, None);
    }

    #[test]
    fn a_snapshot_beyond_a_shorter_definition_is_an_error_not_a_panic() {
        let three = definition(&["reserve", "charge", "ship"]);
        // Started, reserve and charge done: ship (step 2) in flight.
        let (state, journal) = run(
            &three,
            &[
                (1_010, Input::Started),
                (1_100, success("reserve", "r-1")),
                (1_200, success("charge", "c-1")),
            ],
        );
        assert_eq!(state.pending.map(|p| p.step), Some(2));
        // The journal as a compacted run or `skald migrate-payloads` leaves it: the start,
        // then a snapshot of that state.
        let journal = vec![
            journal[0].clone(),
            JournalEntry::new(Timestamp(1_300), &snapshot(&state, "compacted")),
        ];
        assert_eq!(
            replay(three.definition(), state.id, &journal, None)
                .expect("fits its own definition")
                .state,
            state
        );
        for (steps, field) in [
            (&["reserve", "charge"][..], "pending.step is 2"),
            (&["reserve"][..], "completed is 2"),
        ] {
            let shorter = definition(steps);
            for until in [None, Some(Timestamp(2_000))] {
                let e = replay(shorter.definition(), state.id, &journal, until)
                    .expect_err("does not fit");
                assert!(
                    matches!(e, ReplayError::StateDoesNotFit { entry: 1, .. }),
                    "{e:?}"
                );
                let shown = e.to_string();
                assert!(
                    shown.contains(field)
                        && shown.contains(&format!("{} step(s)", steps.len()))
                        && shown.contains("journal entry #1"),
                    "{shown}"
                );
            }
            let e = check(shorter.definition(), &state, &journal).expect_err("does not fit");
            assert!(matches!(e, ReplayError::StateDoesNotFit { .. }), "{e:?}");
        }
        // Before the snapshot, the shorter definition's state is fine.
        let r = replay(
            definition(&["reserve"]).definition(),
            state.id,
            &journal,
            Some(Timestamp(1_200)),
        )
        .expect("the start alone fits");
        assert_eq!(r.entries, 1);
    }

    #[test]
    fn a_journal_without_its_start_is_refused() {
        let def = definition(&["reserve"]);
        let (state, mut journal) = run(&def, &inputs()[..2]);
        journal.remove(0);
        assert_eq!(
            replay(def.definition(), state.id, &journal, None),
            Err(ReplayError::NoStart(state.id))
        );
        assert_eq!(
            replay(def.definition(), state.id, &[], None),
            Err(ReplayError::Empty(state.id))
        );
    }
}
