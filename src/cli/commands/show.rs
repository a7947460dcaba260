//! `skald show`: one saga, its data and its journal, each entry in words.

use std::fmt::Write as _;

use serde_json::{Value, json};
use skald_runtime::ids::{CommandKind, SagaId, StepName};
use skald_runtime::journal::{JournalEffect, JournalRecord};
use skald_runtime::machine::{Input, Timestamp};
use skald_runtime::ports::JournalEntry;

use super::{
    Store, ago, current_step, indent, load, phase_text, pretty, saga_json, step_name, to_json,
};
use crate::cli::render::{Table, since, time};
use crate::cli::{Cli, CliError};

/// One journal entry in words: what came in, and what it led to.
fn describe_entry(cli: &Cli, e: &JournalEntry) -> (String, String, Vec<String>) {
    let record = match e.record() {
        Ok(r) => r,
        Err(err) => return (format!("({err})"), "?".to_owned(), Vec::new()),
    };
    let (input, outcome, mut details, effects) = match &record {
        JournalRecord::Snapshot(snap) => {
            let s = &snap.snapshot;
            let mut details = Vec::new();
            if let Some(p) = s.pending {
                details.push(format!(
                    "{} {} at attempt {} ({} in this run)",
                    step_name(cli, s, p.step),
                    p.kind,
                    p.attempt,
                    p.attempts_used()
                ));
            }
            return (
                format!("snapshot: {}", snap.note),
                s.status.to_string(),
                details,
            );
        }
        JournalRecord::Transition(t) => {
            (&t.input, t.status.to_string(), Vec::new(), &t.effects[..])
        }
        JournalRecord::Ignored(i) => (
            &i.input,
            "(ignored)".to_owned(),
            vec![format!("ignored: {}", i.ignored)],
            &[][..],
        ),
    };
    let step =
        |step: &StepName, kind: &CommandKind, attempt: &u32| format!("{step} {kind} #{attempt}");
    let mut what = match input {
        Input::Started => "started".to_owned(),
        Input::StepSucceeded {
            step: s,
            kind,
            attempt,
            ..
        } => format!("reply: {} succeeded", step(s, kind, attempt)),
        Input::StepFailed {
            step: s,
            kind,
            attempt,
            retryable,
            error,
            ..
        } => {
            let how = if *retryable {
                "failed (retryable)"
            } else {
                "failed"
            };
            format!(
                "reply: {} {how}: {}: {}",
                step(s, kind, attempt),
                error.code,
                error.message
            )
        }
        Input::TimedOut {
            step: s,
            kind,
            attempt,
            ..
        } => format!("timeout: {} got no reply in time", step(s, kind, attempt)),
        Input::RetryDue {
            step: s,
            kind,
            attempt,
        } => format!(
            "backoff over: {} failed, the next attempt goes out",
            step(s, kind, attempt)
        ),
        Input::CancelRequested { reason } => format!("cancel requested: {reason}"),
        Input::Redriven => "re-driven by an operator".to_owned(),
        Input::Resumed => "resumed after a restart (command re-sent)".to_owned(),
        Input::DataUnreadable { error } => format!("data unreadable: {}", error.message),
    };
    if let Some(c) = record.causation()
        && skald_runtime::ids::is_operator_request_id(c)
    {
        let _ = write!(what, " [{c}]");
    }
    let mut events = Vec::new();
    for effect in effects {
        match effect {
            JournalEffect::SendCommand {
                step: s,
                kind,
                attempt,
                subject,
                deadline,
                ..
            } => details.push(format!(
                "sent {} on {subject} (reply due by {})",
                step(s, kind, attempt),
                time(*deadline)
            )),
            // Written by older builds: a command's own reply deadline needs no line of
            // its own; any other wake-up is a retry's due time.
            JournalEffect::ScheduleWakeup { at } => {
                let is_deadline = effects.iter().any(
                    |x| matches!(x, JournalEffect::SendCommand { deadline, .. } if deadline == at),
                );
                if !is_deadline {
                    details.push(format!("retry scheduled at {}", time(*at)));
                }
            }
            JournalEffect::EmitLifecycleEvent { event, .. } => events.push(event.as_str()),
            JournalEffect::DeadLetter(info) => details.push(format!(
                "dead-lettered: {} {} after {} attempts: {}: {}",
                info.step_name, info.kind, info.attempts, info.error.code, info.error.message
            )),
            JournalEffect::Finished { status } => details.push(format!("finished: {status}")),
        }
    }
    // A failed or timed-out attempt that sent nothing began a backoff: the next attempt
    // goes out when the saga wakes up.
    if let JournalRecord::Transition(t) = &record
        && let Some(at) = t.wake_at
        && matches!(t.input, Input::StepFailed { .. } | Input::TimedOut { .. })
        && !t
            .effects
            .iter()
            .any(|x| matches!(x, JournalEffect::SendCommand { .. }))
    {
        details.push(format!("retry scheduled at {}", time(at)));
    }
    if !events.is_empty() {
        details.push(format!("events: {}", events.join(", ")));
    }
    (what, outcome, details)
}

pub(super) async fn show(
    cli: &Cli,
    store: &Store,
    id: SagaId,
    now: Timestamp,
    json: bool,
) -> Result<String, CliError> {
    let saga = load(store, id).await?;
    let journal = store.journal(id).await?;
    let s = &saga.state;
    if json {
        let mut saga_doc = saga_json(cli, &saga);
        saga_doc["data"] = s.data.clone();
        saga_doc["failure"] = json!(s.failure);
        saga_doc["dead_letter"] = json!(s.dead_letter);
        saga_doc["redrives"] = json!(s.redrives);
        saga_doc["completed_steps"] = json!(s.completed);
        saga_doc["phase"] = json!(phase_text(s, now));
        let entries: Vec<Value> = journal
            .iter()
            .map(|e| {
                json!({
                    "at": time(e.at),
                    "at_ms": e.at.as_millis(),
                    "kind": e.kind,
                    "schema_version": e.schema_version,
                    "body": e.body,
                })
            })
            .collect();
        return Ok(to_json(&json!({ "saga": saga_doc, "journal": entries })));
    }
    let mut out = String::new();
    let _ = writeln!(out, "saga      {}", s.id);
    let _ = writeln!(
        out,
        "type      {} (definition version {})",
        s.saga_type, s.definition_version
    );
    let _ = writeln!(out, "status    {}", s.status);
    if let Some((name, kind, attempt)) = current_step(cli, s) {
        let _ = writeln!(out, "step      {name} ({kind}), attempt {attempt}");
    }
    if let Some(phase) = phase_text(s, now) {
        let _ = writeln!(out, "phase     {phase}");
    }
    let _ = writeln!(
        out,
        "created   {} ({})",
        time(s.created_at),
        ago(s.created_at, now)
    );
    let _ = writeln!(
        out,
        "updated   {} ({})",
        time(s.updated_at),
        ago(s.updated_at, now)
    );
    let _ = writeln!(out, "version   {}", saga.version);
    if let Some(f) = &s.failure {
        let _ = writeln!(out, "failure   {f}");
    }
    if let Some(d) = &s.dead_letter {
        let _ = writeln!(
            out,
            "dead letter  {} ({}) gave up after {} attempts: {}",
            d.step_name, d.kind, d.attempts, d.error
        );
    }
    if s.redrives > 0 {
        let _ = writeln!(out, "redrives  {}", s.redrives);
    }
    let _ = writeln!(out, "\ndata\n{}", indent(&pretty(&s.data)));
    let _ = writeln!(out, "\njournal ({} entries)", journal.len());
    let start = journal.first().map_or(s.created_at, |e| e.at);
    let mut t = Table::new(vec!["#", "AT", "+", "WHAT", "STATUS"]);
    let mut rows: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for (i, e) in journal.iter().enumerate() {
        let (what, outcome, details) = describe_entry(cli, e);
        rows.push((
            vec![i.to_string(), time(e.at), since(start, e.at), what, outcome],
            details,
        ));
    }
    // Each entry's line, then its details indented under it.
    for (cells, _) in &rows {
        t.row(cells.clone());
    }
    let rendered = t.render();
    let mut lines = rendered.lines();
    if let Some(header) = lines.next() {
        let _ = writeln!(out, "{header}");
    }
    for ((_, details), line) in rows.iter().zip(lines) {
        let _ = writeln!(out, "{line}");
        for d in details {
            let _ = writeln!(out, "      {d}");
        }
    }
    Ok(out)
}
