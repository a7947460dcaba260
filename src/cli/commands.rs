//! The CLI's commands: each reads the store (and, for actions, sends over NATS) and
//! returns what to print, a human table or one JSON document.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use skald_adapters::nats::NatsOptions;
use skald_adapters::postgres::PostgresStore;
use skald_adapters::sqlite::SqliteStore;
use skald_runtime::ids::{CommandKind, SagaId, SagaType, StepName};
use skald_runtime::journal::{JournalEffect, JournalRecord};
use skald_runtime::machine::{Input, Phase, SagaState, SagaStatus, Timestamp};
use skald_runtime::ports::{
    Bus, Clock, DeadLetterCategory, DeadLetterQuery, DeadLetterRecord, JournalEntry,
    MAX_QUERY_ROWS, SagaOrder, SagaQueries, SagaQuery, StoredSaga, SystemClock,
};
use skald_runtime::replay::{ReplayError, check_with, replay_with};
use skald_runtime::wire::{OperatorAction, OperatorRequest, encode_operator_request};
use uuid::Uuid;

use super::render::{Table, duration, parse_time, since, time};
use super::transport::read_nkey_seed;
use super::{
    Arguments, Cli, CliError, Command, DlqCommand, ExitStatus, NatsArgs, NatsArgsError, SagasArgs,
    SendArgs,
};

type Store = Arc<dyn SagaQueries>;

/// Runs one parsed command; `Ok` is what to print.
pub(crate) async fn run(cli: &Cli, args: Arguments) -> Result<String, CliError> {
    // Half a pair or two ways to authenticate is bad usage, whatever the command.
    args.nats_auth
        .validate()
        .map_err(|e| usage(e.to_string()))?;
    let store = open_store(&args.db).await?;
    let now = SystemClock.now();
    let json = args.json;
    let nats = Nats {
        url: args.nats.as_deref(),
        auth: &args.nats_auth,
    };
    match args.command {
        Command::Sagas(a) => sagas(cli, &store, a, now, json).await,
        Command::Show { id } => show(cli, &store, saga_id(&id)?, now, json).await,
        Command::At { id, time } => {
            let at = parse_time(&time, now).map_err(usage)?;
            time_travel(cli, &store, saga_id(&id)?, at, json).await
        }
        Command::Dlq(DlqCommand::List {
            saga_type,
            all,
            limit,
        }) => dlq_list(&store, saga_type, all, limit, now, json).await,
        Command::Dlq(DlqCommand::Show { id }) => dlq_show(&store, uuid(&id)?, now, json).await,
        Command::Dlq(DlqCommand::Redrive {
            id,
            all,
            saga_type,
            send,
        }) => {
            if all && send.if_version.is_some() {
                return Err(usage(
                    "--if-version names one saga's stored version: not with --all".into(),
                ));
            }
            let targets = redrive_targets(&store, id.as_deref(), all, saga_type).await?;
            let requests = targets
                .into_iter()
                .map(|s| (s, OperatorAction::Redrive))
                .collect();
            send_requests(&store, nats, requests, &send, json).await
        }
        Command::Cancel { id, reason, send } => {
            let saga = load(&store, saga_id(&id)?).await?;
            match saga.state.status {
                s if s.is_terminal() => {
                    return Err(CliError::new(
                        ExitStatus::Refused,
                        format!("saga {id} is {s}: there is nothing to cancel"),
                    ));
                }
                SagaStatus::Failed => {
                    return Err(CliError::new(
                        ExitStatus::Refused,
                        format!(
                            "saga {id} is dead-lettered (failed): its compensation could not \
                             be done; re-drive it (skald dlq redrive {id})"
                        ),
                    ));
                }
                _ => {}
            }
            let requests = vec![(saga, OperatorAction::Cancel { reason })];
            send_requests(&store, nats, requests, &send, json).await
        }
        Command::Stuck {
            older_than,
            saga_type,
            limit,
        } => stuck(cli, &store, older_than, saga_type, limit, now, json).await,
        Command::Stats { window } => stats(&store, window, now, json).await,
        Command::MigratePayloads {
            saga_type,
            dry_run,
            batch,
            max,
        } => {
            let saga_type = self::saga_type(saga_type)?;
            migrate_payloads(cli, &store, saga_type, dry_run, batch, max, now, json).await
        }
        Command::Replay {
            id,
            saga_type,
            version,
            against,
            all,
            limit,
        } => {
            let targets = match id {
                Some(id) => vec![load(&store, saga_id(&id)?).await?],
                None => {
                    let statuses = if all {
                        Vec::new()
                    } else {
                        vec![
                            SagaStatus::Running,
                            SagaStatus::Compensating,
                            SagaStatus::Failed,
                        ]
                    };
                    let query = SagaQuery {
                        statuses,
                        saga_type: self::saga_type(saga_type)?,
                        definition_version: version,
                        order: SagaOrder::NewestFirst,
                        limit,
                        ..SagaQuery::default()
                    };
                    let found = store.query(&query).await?;
                    if found.len() >= limit.min(MAX_QUERY_ROWS) {
                        return Err(usage(format!(
                            "more than {} sagas match: raise --limit (at most {MAX_QUERY_ROWS}) \
                             or narrow with --version, so none goes unchecked",
                            found.len()
                        )));
                    }
                    found
                }
            };
            replay_check(cli, &store, targets, against, json).await
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn usage(message: String) -> CliError {
    CliError::new(ExitStatus::Usage, message)
}

async fn open_store(url: &str) -> Result<Store, CliError> {
    let store: Store = if url.starts_with("sqlite:") {
        Arc::new(SqliteStore::open_existing(url).await?)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Arc::new(PostgresStore::open_existing(url).await?)
    } else {
        return Err(CliError::new(
            ExitStatus::Database,
            format!(
                "unsupported database URL {:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB \
                 (--db or SKALD_DB)",
                skald_adapters::redact_url(url)
            ),
        ));
    };
    Ok(store)
}

fn uuid(s: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(s.trim()).map_err(|e| usage(format!("{s:?} is not an id (a UUID): {e}")))
}

fn saga_id(s: &str) -> Result<SagaId, CliError> {
    Ok(SagaId::from_uuid(uuid(s)?))
}

fn saga_type(s: Option<String>) -> Result<Option<SagaType>, CliError> {
    s.map(|t| SagaType::new(t).map_err(|e| usage(format!("--type: {e}"))))
        .transpose()
}

async fn load(store: &Store, id: SagaId) -> Result<StoredSaga, CliError> {
    store
        .load(id)
        .await?
        .ok_or_else(|| CliError::new(ExitStatus::NotFound, format!("no saga {id} in the store")))
}

fn ago(t: Timestamp, now: Timestamp) -> String {
    format!("{} ago", since(t, now))
}

fn to_json(v: &impl serde::Serialize) -> String {
    let mut s =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// The name of step `index` of the saga's definition, if this CLI knows it.
fn step_name(cli: &Cli, state: &SagaState, index: usize) -> String {
    cli.definition(&state.saga_type, state.definition_version)
        .and_then(|d| d.step(index))
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| format!("step #{index}"))
}

/// The step the saga is on (or failed at), its kind and attempt.
fn current_step(cli: &Cli, state: &SagaState) -> Option<(String, CommandKind, u32)> {
    if let Some(p) = &state.pending {
        return Some((step_name(cli, state, p.step), p.kind, p.attempt));
    }
    state
        .dead_letter
        .as_ref()
        .map(|d| (d.step_name.to_string(), d.kind, d.last_attempt))
}

fn step_cell(step: &Option<(String, CommandKind, u32)>) -> (String, String) {
    match step {
        Some((name, CommandKind::Action, attempt)) => (name.clone(), attempt.to_string()),
        Some((name, CommandKind::Compensation, attempt)) => {
            (format!("{name} (undo)"), attempt.to_string())
        }
        None => ("-".into(), "-".into()),
    }
}

fn phase_text(state: &SagaState, now: Timestamp) -> Option<String> {
    let p = state.pending.as_ref()?;
    Some(match p.phase {
        Phase::AwaitingReply { deadline } if deadline >= now => {
            format!(
                "awaiting the reply, due by {} (in {})",
                time(deadline),
                since(now, deadline)
            )
        }
        Phase::AwaitingReply { deadline } => format!(
            "awaiting the reply; its deadline {} passed {} ago",
            time(deadline),
            since(deadline, now)
        ),
        Phase::Backoff { due } if due >= now => {
            format!(
                "backing off; next attempt at {} (in {})",
                time(due),
                since(now, due)
            )
        }
        Phase::Backoff { due } => format!(
            "backing off; the next attempt was due {} ({} ago)",
            time(due),
            since(due, now)
        ),
    })
}

fn saga_json(cli: &Cli, saga: &StoredSaga) -> Value {
    let s = &saga.state;
    let step = current_step(cli, s);
    json!({
        "id": s.id,
        "saga_type": s.saga_type,
        "definition_version": s.definition_version,
        "status": s.status,
        "step": step.as_ref().map(|(n, _, _)| n),
        "kind": step.as_ref().map(|(_, k, _)| k),
        "attempt": step.as_ref().map(|(_, _, a)| a),
        "wake_at_ms": s.wake_at().map(Timestamp::as_millis),
        "created_at": time(s.created_at),
        "updated_at": time(s.updated_at),
        "created_at_ms": s.created_at.as_millis(),
        "updated_at_ms": s.updated_at.as_millis(),
        "version": saga.version,
    })
}

// ---------------------------------------------------------------------------------------
// sagas, show, at

async fn sagas(
    cli: &Cli,
    store: &Store,
    a: SagasArgs,
    now: Timestamp,
    json: bool,
) -> Result<String, CliError> {
    let statuses = a
        .status
        .iter()
        .map(|s| {
            SagaStatus::parse(s.trim()).ok_or_else(|| {
                usage(format!(
                    "--status {s:?}: expected running, compensating, completed, compensated or failed"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let query = SagaQuery {
        statuses,
        saga_type: saga_type(a.saga_type)?,
        definition_version: None,
        created_after: a.since.map(|d| {
            Timestamp(
                now.as_millis()
                    .saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            )
        }),
        updated_before: None,
        order: SagaOrder::NewestFirst,
        limit: a.limit,
    };
    let rows = store.query(&query).await?;
    if json {
        let list: Vec<Value> = rows.iter().map(|s| saga_json(cli, s)).collect();
        return Ok(to_json(&list));
    }
    let mut t = Table::new(vec![
        "ID", "TYPE", "VER", "STATUS", "STEP", "ATTEMPT", "AGE", "UPDATED",
    ]);
    for saga in &rows {
        let s = &saga.state;
        let (step, attempt) = step_cell(&current_step(cli, s));
        t.row(vec![
            s.id.to_string(),
            s.saga_type.to_string(),
            s.definition_version.to_string(),
            s.status.to_string(),
            step,
            attempt,
            since(s.created_at, now),
            ago(s.updated_at, now),
        ]);
    }
    let mut out = if t.is_empty() {
        "no sagas match\n".to_owned()
    } else {
        t.render()
    };
    if rows.len() == a.limit.min(MAX_QUERY_ROWS) {
        let _ = writeln!(
            out,
            "(showing the newest {}: raise --limit for more)",
            rows.len()
        );
    }
    Ok(out)
}

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
        && c.starts_with("op:")
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

async fn show(
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

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn time_travel(
    cli: &Cli,
    store: &Store,
    id: SagaId,
    at: Timestamp,
    json: bool,
) -> Result<String, CliError> {
    let saga = load(store, id).await?;
    let s = &saga.state;
    let def = cli
        .definition(&s.saga_type, s.definition_version)
        .ok_or_else(|| {
            CliError::new(
                ExitStatus::CannotReplay,
                format!(
                    "saga {id} is a {} v{} saga, a definition this CLI does not know: build a CLI \
                 with it registered (skald::cli::Cli::new().register(&definition))",
                    s.saga_type, s.definition_version
                ),
            )
        })?;
    let journal = store.journal(id).await?;
    let r = replay_with(def, id, &journal, Some(at), cli.upcasters()).map_err(|e| match e {
        ReplayError::BeforeCreation { created, .. } => CliError::new(
            ExitStatus::NotFound,
            format!(
                "saga {id} did not exist yet at {} (it was created at {})",
                time(at),
                time(Timestamp(created))
            ),
        ),
        e => CliError::new(ExitStatus::CannotReplay, e.to_string()),
    })?;
    let state = &r.state;
    let done: Vec<String> = (0..state.completed)
        .map(|i| step_name(cli, state, i))
        .collect();
    if json {
        let mut doc = saga_json(
            cli,
            &StoredSaga {
                state: state.clone(),
                version: 0,
            },
        );
        // The stored version counts commits, which a replay does not see.
        if let Some(o) = doc.as_object_mut() {
            o.remove("version");
        }
        doc["data"] = state.data.clone();
        doc["completed_steps"] = json!(done);
        doc["failure"] = json!(state.failure);
        return Ok(to_json(&json!({
            "as_of": time(at),
            "as_of_ms": at.as_millis(),
            "journal_entries": r.entries,
            "last_entry_at": time(r.last_at),
            "state": doc,
            "divergence": r.divergence,
        })));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "saga {id} as of {}: {} journal entries replayed (the last recorded at {})",
        time(at),
        r.entries,
        time(r.last_at)
    );
    if let Some(d) = &r.divergence {
        let _ = writeln!(
            out,
            "warning: the registered definition diverges from the journal at entry #{} ({}): {}; \
             the state below is as of the entry before it",
            d.entry, d.input, d.reason
        );
    }
    let _ = writeln!(out, "status    {}", state.status);
    let _ = writeln!(
        out,
        "done      {}",
        if done.is_empty() {
            "-".to_owned()
        } else {
            done.join(", ")
        }
    );
    if let Some((name, kind, attempt)) = current_step(cli, state) {
        let _ = writeln!(out, "step      {name} ({kind}), attempt {attempt}");
    }
    if let Some(phase) = phase_text(state, at) {
        let _ = writeln!(out, "phase     {phase}");
    }
    if let Some(f) = &state.failure {
        let _ = writeln!(out, "failure   {f}");
    }
    let _ = writeln!(out, "\ndata\n{}", indent(&pretty(&state.data)));
    Ok(out)
}

/// One saga's replay check.
#[derive(Debug, serde::Serialize)]
struct ReplayResult {
    saga_id: SagaId,
    saga_type: String,
    definition_version: u32,
    /// The definition version replayed against.
    against: u32,
    status: SagaStatus,
    /// `same`, `diverged` or `cannot_replay`.
    result: &'static str,
    entries: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    divergence: Option<skald_runtime::replay::Divergence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn replay_check(
    cli: &Cli,
    store: &Store,
    targets: Vec<StoredSaga>,
    against: Option<u32>,
    json: bool,
) -> Result<String, CliError> {
    let mut results = Vec::with_capacity(targets.len());
    for saga in targets {
        let s = &saga.state;
        let version = against.unwrap_or(s.definition_version);
        let mut result = ReplayResult {
            saga_id: s.id,
            saga_type: s.saga_type.to_string(),
            definition_version: s.definition_version,
            against: version,
            status: s.status,
            result: "cannot_replay",
            entries: 0,
            divergence: None,
            error: None,
        };
        match cli.definition(&s.saga_type, version) {
            None => {
                result.error = Some(format!(
                    "{} v{version} is not registered in this CLI",
                    s.saga_type
                ));
            }
            Some(def) => {
                let journal = store.journal(s.id).await?;
                match check_with(def, s, &journal, cli.upcasters()) {
                    Ok(r) => {
                        result.entries = r.entries;
                        result.result = if r.divergence.is_some() {
                            "diverged"
                        } else {
                            "same"
                        };
                        result.divergence = r.divergence;
                    }
                    Err(e) => result.error = Some(e.to_string()),
                }
            }
        }
        results.push(result);
    }
    let out = if json {
        to_json(&results)
    } else if results.is_empty() {
        "no sagas to replay\n".to_owned()
    } else {
        let mut t = Table::new(vec![
            "SAGA", "TYPE", "VER", "AGAINST", "STATUS", "ENTRIES", "RESULT",
        ]);
        for r in &results {
            let what = match (&r.divergence, &r.error) {
                (Some(d), _) => format!(
                    "diverges at entry #{} ({}, {}): {}",
                    d.entry,
                    d.input,
                    time(d.at),
                    d.reason
                ),
                (None, Some(e)) => format!("cannot replay: {e}"),
                (None, None) => "same path".to_owned(),
            };
            t.row(vec![
                r.saga_id.to_string(),
                r.saga_type.clone(),
                r.definition_version.to_string(),
                r.against.to_string(),
                r.status.to_string(),
                r.entries.to_string(),
                what,
            ]);
        }
        let mut out = t.render();
        let count = |what: &str| results.iter().filter(|r| r.result == what).count();
        let _ = writeln!(
            out,
            "{} sagas: {} same, {} diverged, {} cannot be replayed",
            results.len(),
            count("same"),
            count("diverged"),
            count("cannot_replay")
        );
        out
    };
    let status = if results.iter().any(|r| r.result == "diverged") {
        Some((ExitStatus::Diverged, "diverge"))
    } else if results.iter().any(|r| r.result == "cannot_replay") {
        Some((ExitStatus::CannotReplay, "cannot be replayed"))
    } else {
        None
    };
    match status {
        Some((status, what)) => {
            let n = results.iter().filter(|r| r.result != "same").count();
            Err(
                CliError::new(status, format!("{n} of {} sagas {what}", results.len()))
                    .with_output(out),
            )
        }
        None => Ok(out),
    }
}

/// What `migrate-payloads` did.
#[derive(Debug, Default, serde::Serialize)]
struct MigrationReport {
    dry_run: bool,
    scanned: u64,
    already_current: u64,
    /// Migrated (or, with --dry-run, would be).
    migrated: u64,
    /// Changed by a runtime between the read and the write: left for the next run.
    busy: u64,
    /// Of a definition (type, version) this CLI does not register.
    unknown_definition: u64,
    /// Stopped at --max before the end.
    stopped_early: bool,
    failed: Vec<MigrationFailure>,
}

#[derive(Debug, serde::Serialize)]
struct MigrationFailure {
    saga_id: SagaId,
    reason: String,
}

#[allow(clippy::too_many_arguments)]
async fn migrate_payloads(
    cli: &Cli,
    store: &Store,
    saga_type: Option<SagaType>,
    dry_run: bool,
    batch: usize,
    max: Option<u64>,
    now: Timestamp,
    json: bool,
) -> Result<String, CliError> {
    use skald_runtime::ports::{SagaWrite, WriteOutcome};
    let mut report = MigrationReport {
        dry_run,
        ..MigrationReport::default()
    };
    let mut after = None;
    'pages: loop {
        let page = store.list(None, after, batch.max(1)).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for summary in &page {
            if saga_type.as_ref().is_some_and(|t| *t != summary.saga_type) {
                continue;
            }
            let Some(saga) = store.load(summary.id).await? else {
                continue; // deleted meanwhile
            };
            report.scanned += 1;
            let s = &saga.state;
            let Some(def) = cli.definition(&s.saga_type, s.definition_version) else {
                report.unknown_definition += 1;
                continue;
            };
            let want = def.data_version();
            if s.data_version >= want {
                report.already_current += 1;
                continue;
            }
            if max.is_some_and(|m| report.migrated >= m) {
                report.stopped_early = true;
                break 'pages;
            }
            let payload_type = skald_runtime::upcast::data_payload_type(s.saga_type.as_str());
            let data =
                match cli
                    .upcasters()
                    .upcast(&payload_type, s.data.clone(), s.data_version, want)
                {
                    Ok(d) => d,
                    Err(e) => {
                        report.failed.push(MigrationFailure {
                            saga_id: s.id,
                            reason: e.to_string(),
                        });
                        continue;
                    }
                };
            if dry_run {
                report.migrated += 1;
                continue;
            }
            let mut state = s.clone();
            state.data = data;
            state.data_version = want;
            let note = format!(
                "data migrated from schema version {} to {want} by skald migrate-payloads",
                s.data_version
            );
            let write = SagaWrite {
                id: s.id,
                expected_version: saga.version,
                journal: vec![JournalEntry::new(
                    now,
                    &skald_runtime::replay::snapshot(&state, &note),
                )],
                state: Some(state),
                dead_letter: None,
                resolve_dead_letters: false,
                outbox: Vec::new(),
                inbox: None,
            };
            match store.commit(&[write], &[]).await?.first() {
                Some(WriteOutcome::Committed { .. }) => report.migrated += 1,
                _ => report.busy += 1,
            }
        }
    }
    let out = if json {
        to_json(&report)
    } else {
        let verb = if dry_run { "would migrate" } else { "migrated" };
        let mut out = format!(
            "scanned {} sagas: {verb} {}, {} already current, {} changed by a runtime meanwhile \
             (run again), {} of a definition this CLI does not register, {} failed\n",
            report.scanned,
            report.migrated,
            report.already_current,
            report.busy,
            report.unknown_definition,
            report.failed.len()
        );
        if report.stopped_early {
            out.push_str("stopped at --max: run again to go on\n");
        }
        for f in &report.failed {
            let _ = writeln!(out, "  {}: {}", f.saga_id, f.reason);
        }
        out
    };
    if report.failed.is_empty() {
        Ok(out)
    } else {
        let n = report.failed.len();
        Err(CliError::new(
            ExitStatus::Diverged,
            format!("{n} sagas' data could not be migrated"),
        )
        .with_output(out))
    }
}

// ---------------------------------------------------------------------------------------
// dlq

fn dead_letter_json(d: &DeadLetterRecord) -> Value {
    let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
    v["at"] = json!(time(d.at));
    v["at_ms"] = json!(d.at.as_millis());
    if let Some(r) = d.resolved_at {
        v["resolved_at"] = json!(time(r));
        v["resolved_at_ms"] = json!(r.as_millis());
    }
    v
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!(
            "{}…",
            s.chars().take(n.saturating_sub(1)).collect::<String>()
        )
    }
}

async fn dlq_list(
    store: &Store,
    saga_type: Option<String>,
    all: bool,
    limit: usize,
    now: Timestamp,
    json: bool,
) -> Result<String, CliError> {
    let rows = store
        .find_dead_letters(&DeadLetterQuery {
            open_only: !all,
            saga_type,
            category: None,
            limit,
        })
        .await?;
    if json {
        return Ok(to_json(
            &rows.iter().map(dead_letter_json).collect::<Vec<_>>(),
        ));
    }
    if rows.is_empty() {
        return Ok(if all {
            "no dead letters\n"
        } else {
            "no open dead letters\n"
        }
        .to_owned());
    }
    let mut header = vec!["ID", "CATEGORY", "SAGA", "TYPE", "STEP", "ATTEMPTS", "AGE"];
    if all {
        header.push("RESOLVED");
    }
    header.push("REASON");
    let mut t = Table::new(header);
    for d in &rows {
        let step = match (&d.step, d.kind) {
            (Some(s), Some(CommandKind::Compensation)) => format!("{s} (undo)"),
            (Some(s), _) => s.clone(),
            (None, _) => "-".into(),
        };
        let mut cells = vec![
            d.id.to_string(),
            d.category.as_str().to_owned(),
            d.saga_id.map_or("-".into(), |s| s.to_string()),
            d.saga_type.clone().unwrap_or_else(|| "-".into()),
            step,
            d.attempts.to_string(),
            since(d.at, now),
        ];
        if all {
            cells.push(d.resolved_at.map_or("open".into(), |r| ago(r, now)));
        }
        cells.push(truncate(&d.reason, 80));
        t.row(cells);
    }
    Ok(t.render())
}

async fn dlq_show(store: &Store, id: Uuid, now: Timestamp, json: bool) -> Result<String, CliError> {
    let rows = store.dead_letters_of(id).await?;
    if rows.is_empty() {
        return Err(CliError::new(
            ExitStatus::NotFound,
            format!("no dead letter with id {id}, and none of a saga {id}"),
        ));
    }
    if json {
        return Ok(to_json(
            &rows.iter().map(dead_letter_json).collect::<Vec<_>>(),
        ));
    }
    let mut out = String::new();
    for (i, d) in rows.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "dead letter  {}", d.id);
        let _ = writeln!(out, "category     {}", d.category.as_str());
        if let Some(s) = d.saga_id {
            let _ = writeln!(out, "saga         {s}");
        }
        let _ = writeln!(
            out,
            "type         {}",
            d.saga_type.as_deref().unwrap_or("-")
        );
        let kind = d.kind.map_or(String::new(), |k| format!(" ({k})"));
        let _ = writeln!(
            out,
            "step         {}{kind}",
            d.step.as_deref().unwrap_or("-")
        );
        let _ = writeln!(out, "attempts     {}", d.attempts);
        let _ = writeln!(out, "at           {} ({})", time(d.at), ago(d.at, now));
        let _ = writeln!(
            out,
            "state        {}",
            d.resolved_at.map_or("open".to_owned(), |r| format!(
                "resolved (re-driven) at {}",
                time(r)
            ))
        );
        let _ = writeln!(out, "reason       {}", d.reason);
        if let Some(m) = &d.message {
            let _ = writeln!(out, "message\n{}", indent(&pretty(m)));
        }
        if d.category == DeadLetterCategory::Saga && d.resolved_at.is_none() {
            let saga = d.saga_id.map_or(String::new(), |s| s.to_string());
            let _ = writeln!(out, "re-drive it:  skald dlq redrive {saga}");
        }
    }
    Ok(out)
}

/// The sagas `skald dlq redrive` targets: the one named (by saga or dead letter id), or
/// every dead-lettered one (of a type). Each must be `failed`.
async fn redrive_targets(
    store: &Store,
    id: Option<&str>,
    all: bool,
    saga_type: Option<String>,
) -> Result<Vec<StoredSaga>, CliError> {
    if all {
        let letters = store
            .find_dead_letters(&DeadLetterQuery {
                open_only: true,
                saga_type,
                category: Some(DeadLetterCategory::Saga),
                limit: MAX_QUERY_ROWS,
            })
            .await?;
        let ids: BTreeSet<SagaId> = letters.iter().filter_map(|d| d.saga_id).collect();
        let mut targets = Vec::new();
        for id in ids {
            if let Some(saga) = store.load(id).await?
                && saga.state.status == SagaStatus::Failed
            {
                targets.push(saga);
            }
        }
        return Ok(targets);
    }
    let Some(raw) = id else {
        return Err(usage("give a saga id, or --all".into()));
    };
    let id = uuid(raw)?;
    let saga = match store.load(SagaId::from_uuid(id)).await? {
        Some(s) => s,
        None => {
            let of = store.dead_letters_of(id).await?;
            let saga_id = of.iter().find_map(|d| d.saga_id).ok_or_else(|| {
                CliError::new(
                    ExitStatus::NotFound,
                    format!("no saga {id}, and no saga's dead letter with that id"),
                )
            })?;
            load(store, saga_id).await?
        }
    };
    if saga.state.status != SagaStatus::Failed {
        return Err(CliError::new(
            ExitStatus::Refused,
            format!(
                "saga {} is {}, not dead-lettered (failed): only a failed saga can be re-driven",
                saga.state.id, saga.state.status
            ),
        ));
    }
    Ok(vec![saga])
}

/// What became of one operator request.
#[derive(Debug, serde::Serialize)]
struct RequestResult {
    saga_id: SagaId,
    request_id: String,
    /// `applied`, `refused` or `pending`.
    result: &'static str,
    /// The status it led to (applied), or why it was refused.
    detail: String,
}

/// Whether dead letter `d` is about operator request `request_id` (its reason names
/// it, or it holds the request's message, whose `Nats-Msg-Id` is the id).
fn names_request(d: &DeadLetterRecord, request_id: &str) -> bool {
    d.reason.contains(request_id)
        || d.message
            .as_ref()
            .is_some_and(|m| m.to_string().contains(request_id))
}

fn refused_by_dead_letter(request: &OperatorRequest, d: &DeadLetterRecord) -> RequestResult {
    RequestResult {
        saga_id: request.saga_id,
        request_id: request.request_id.clone(),
        result: "refused",
        detail: format!(
            "{} (dead-lettered by the runtime: skald dlq show {})",
            refusal(&d.reason),
            d.id
        ),
    }
}

/// A runtime's reason for refusing an operator request, led by what it means for the
/// operator: the request expired, its condition did not hold, or the operator is not
/// one the runtime lets act; the runtime's own words follow.
fn refusal(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    let what = if r.contains("more than") && r.contains("ahead") {
        "too far ahead: the request expires more than 1h ahead by the runtime's clock: \
         check this machine's clock, or send it with a shorter --ttl"
    } else if r.contains("expired") {
        "expired: no runtime applied the request before its --ttl ran out; send it again"
    } else if r.contains("re-drive(s)") || (r.contains("re-driv") && r.contains("since")) {
        "condition not met: the saga was re-driven since the CLI read it; look again \
         (skald show)"
    } else if r.contains("made at version") || r.contains("if-version") {
        "condition not met: the saga changed since the version given (--if-version); look \
         again (skald show)"
    } else if r.contains("condition does not hold") {
        "condition not met"
    } else if r.contains("but the request names operator") {
        "unverified operator: the runtimes list the signing key under another name: pass \
         that name as --operator"
    } else if r.contains("signed")
        || r.contains("signature")
        || r.contains("allowlist")
        || r.contains("unverified")
    {
        "unverified operator: the runtimes apply only requests signed by an operator they \
         list (sign with --operator-nkey SEED_FILE, the seed of the key listed for \
         --operator)"
    } else {
        return reason.to_owned();
    };
    format!("{what} [{reason}]")
}

/// Where the CLI sends operator requests: `--nats` and the transport flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Nats<'a> {
    pub(crate) url: Option<&'a str>,
    pub(crate) auth: &'a NatsArgs,
}

/// The longest `--ttl` a runtime accepts (it refuses a request expiring more than 1 h
/// ahead).
const MAX_TTL: Duration = Duration::from_secs(3_600);

/// Sends operator requests over NATS, then watches each saga's journal for the entry
/// its request caused, until `--wait` runs out.
///
/// Each request carries the saga's re-drive count as the CLI read it (`if_redrives`:
/// a runtime applies it only if nobody re-drove the saga meanwhile), `--if-version`,
/// an expiry `--ttl` after now, and, with `--operator-nkey`, the operator's signature.
async fn send_requests(
    store: &Store,
    nats: Nats<'_>,
    targets: Vec<(StoredSaga, OperatorAction)>,
    send: &SendArgs,
    json: bool,
) -> Result<String, CliError> {
    if send.ttl.is_zero() || send.ttl > MAX_TTL {
        return Err(usage(format!(
            "--ttl {}: a request must expire after more than 0 and at most {} (runtimes \
             refuse one that expires further ahead)",
            duration(send.ttl),
            duration(MAX_TTL)
        )));
    }
    if let Some(want) = send.if_version
        && let Some((saga, _)) = targets.iter().find(|(s, _)| s.version != want)
    {
        return Err(CliError::new(
            ExitStatus::Refused,
            format!(
                "saga {} is at version {}, not {want} (--if-version): it changed since; look \
                 again (skald show {})",
                saga.state.id, saga.version, saga.state.id
            ),
        ));
    }
    // Read before connecting: a bad seed file is a usage error, whatever NATS says.
    let seed = send
        .operator_nkey
        .as_deref()
        .map(|path| read_nkey_seed("--operator-nkey", path))
        .transpose()
        .map_err(|e| usage(e.to_string()))?;
    if targets.is_empty() {
        return Ok(if json {
            "[]\n"
        } else {
            "nothing to do: no saga qualifies\n"
        }
        .to_owned());
    }
    let url = nats.url.ok_or_else(|| {
        usage(
            "this command sends an operator request to the runtimes over NATS: pass --nats URL \
             or set SKALD_NATS (a runtime on the in-process bus is driven in code: \
             Runtime::redrive / Runtime::cancel)"
                .into(),
        )
    })?;
    let mut options = NatsOptions::new(url);
    options.name = "skald-cli".into();
    options.connect_timeout = Duration::from_secs(5);
    let bus = nats.auth.connect(options).await.map_err(|e| match e {
        NatsArgsError::Invalid(m) => usage(m),
        e => CliError::new(ExitStatus::Broker, format!("cannot reach NATS: {e}")),
    })?;
    let operator = send
        .operator
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".into());
    let mut sent = Vec::new();
    // A broker failure part-way: the requests already sent are still followed up and
    // reported (they will be applied), the rest are named as not sent.
    let mut unsent: Option<(String, Vec<SagaId>)> = None;
    for (saga, action) in targets {
        let state = saga.state;
        if let Some((_, rest)) = &mut unsent {
            rest.push(state.id);
            continue;
        }
        let now_ms = SystemClock.now().as_millis();
        let mut request = OperatorRequest::new(
            state.id,
            state.saga_type.clone(),
            action,
            &operator,
            now_ms,
            send.ttl,
        );
        request.if_redrives = Some(state.redrives);
        request.if_version = send.if_version;
        if let Some(seed) = &seed {
            request.sign(seed).map_err(|e| {
                usage(format!(
                    "--operator-nkey: cannot sign the request with that seed: {e}"
                ))
            })?;
        }
        match bus.publish(encode_operator_request(&request)).await {
            Ok(()) => sent.push(request),
            Err(e) => unsent = Some((super::transport::connect_error(url, &e), vec![state.id])),
        }
    }
    let deadline = tokio::time::Instant::now() + send.wait;
    let mut poll = Duration::from_millis(100);
    let mut results: Vec<Option<RequestResult>> = sent.iter().map(|_| None).collect();
    loop {
        for (slot, request) in results.iter_mut().zip(&sent) {
            if slot.is_some() {
                continue;
            }
            let journal = store.journal(request.saga_id).await?;
            let entry = journal.iter().rev().find_map(|e| {
                let record = e.record().ok()?;
                (record.causation() == Some(request.request_id.as_str())).then_some(record)
            });
            *slot = entry.map(|record| {
                let (result, detail) = match &record {
                    JournalRecord::Transition(t) => match (&request.action, t.status) {
                        // The action in flight may be taking effect: the saga compensates
                        // once it answers or times out.
                        (OperatorAction::Cancel { .. }, SagaStatus::Running) => (
                            "applied",
                            "running: waits for the step in flight, then compensates".to_owned(),
                        ),
                        (_, status) => ("applied", status.to_string()),
                    },
                    JournalRecord::Ignored(i) => ("refused", refusal(&i.ignored)),
                    JournalRecord::Snapshot(_) => ("refused", refusal("refused")),
                };
                RequestResult {
                    saga_id: request.saga_id,
                    request_id: request.request_id.clone(),
                    result,
                    detail,
                }
            });
            if slot.is_none() {
                // A runtime that could not apply the request at all (the saga is gone,
                // the request expired, undecodable or not from a listed operator)
                // dead-letters it, naming the request id.
                let letters = store.dead_letters_of(*request.saga_id.as_uuid()).await?;
                *slot = letters
                    .iter()
                    .find(|d| names_request(d, &request.request_id))
                    .map(|d| refused_by_dead_letter(request, d));
            }
        }
        // A request the runtime could not even decode is a poison dead letter without a
        // saga id: find it by the request id its message holds.
        if results.iter().any(Option::is_none) {
            let types: BTreeSet<String> = sent.iter().map(|r| r.saga_type.to_string()).collect();
            let mut poison = Vec::new();
            for t in types {
                poison.extend(
                    store
                        .find_dead_letters(&DeadLetterQuery {
                            open_only: true,
                            saga_type: Some(t),
                            category: Some(DeadLetterCategory::Poison),
                            limit: 200,
                        })
                        .await?,
                );
            }
            for (slot, request) in results.iter_mut().zip(&sent) {
                if slot.is_none() {
                    *slot = poison
                        .iter()
                        .find(|d| names_request(d, &request.request_id))
                        .map(|d| refused_by_dead_letter(request, d));
                }
            }
        }
        if results.iter().all(Option::is_some) || tokio::time::Instant::now() >= deadline {
            break;
        }
        // Gentle on a production store: 100 ms, doubling to 2 s between looks.
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(Duration::from_secs(2));
    }
    let results: Vec<RequestResult> = results
        .into_iter()
        .zip(&sent)
        .map(|(r, request)| {
            r.unwrap_or_else(|| RequestResult {
                saga_id: request.saga_id,
                request_id: request.request_id.clone(),
                result: "pending",
                detail: format!(
                    "not applied within {}: no runtime for {} is consuming; the request stays \
                     queued in JetStream, and a runtime that gets it after {} (--ttl) refuses \
                     it as expired",
                    duration(send.wait),
                    request.saga_type,
                    time(Timestamp(request.expires_at_ms))
                ),
            })
        })
        .collect();
    let out = if json {
        to_json(&results)
    } else {
        let mut t = Table::new(vec!["SAGA", "REQUEST", "RESULT", "DETAIL"]);
        for r in &results {
            t.row(vec![
                r.saga_id.to_string(),
                r.request_id.clone(),
                r.result.to_owned(),
                r.detail.clone(),
            ]);
        }
        t.render()
    };
    if let Some((error, rest)) = unsent {
        let list: Vec<String> = rest.iter().map(SagaId::to_string).collect();
        return Err(CliError::new(
            ExitStatus::Broker,
            format!(
                "NATS failed part-way ({error}): {} requests not sent, for sagas {}; the {} \
                 above were sent",
                rest.len(),
                list.join(", "),
                results.len()
            ),
        )
        .with_output(out));
    }
    let worst = if results.iter().any(|r| r.result == "refused") {
        Some(ExitStatus::Refused)
    } else if results.iter().any(|r| r.result == "pending") {
        Some(ExitStatus::Pending)
    } else {
        None
    };
    match worst {
        Some(status) => {
            let n = results.iter().filter(|r| r.result != "applied").count();
            let mut message = format!("{n} of {} requests not applied", results.len());
            let refused: Vec<&RequestResult> =
                results.iter().filter(|r| r.result == "refused").collect();
            for r in refused.iter().take(3) {
                let _ = write!(message, "\n  saga {}: refused: {}", r.saga_id, r.detail);
            }
            if refused.len() > 3 {
                let _ = write!(message, "\n  ... and {} more refused", refused.len() - 3);
            }
            Err(CliError::new(status, message).with_output(out))
        }
        None => Ok(out),
    }
}

// ---------------------------------------------------------------------------------------
// stuck, stats

/// Why a saga counts as stuck at `now`, if it does: it has waited longer than
/// `older_than`, or (by default) more than 3 times what its step waits for, and at
/// least 1 s. Returns (waited, threshold, why).
pub(crate) fn stuck_reason(
    state: &SagaState,
    now: Timestamp,
    older_than: Option<Duration>,
) -> Option<(Duration, Duration, String)> {
    if state.status.is_terminal() || state.status == SagaStatus::Failed {
        return None;
    }
    let waited = state.updated_at.until(now);
    let expected = state
        .wake_at()
        .map_or(Duration::ZERO, |w| state.updated_at.until(w));
    let threshold = older_than.unwrap_or_else(|| (expected * 3).max(Duration::from_secs(1)));
    if waited <= threshold {
        return None;
    }
    let why = match state.pending.map(|p| p.phase) {
        Some(Phase::AwaitingReply { deadline }) if deadline < now => format!(
            "its reply deadline passed {} ago and no timeout fired: is a runtime for {} v{} running?",
            since(deadline, now),
            state.saga_type,
            state.definition_version
        ),
        Some(Phase::Backoff { due }) if due < now => format!(
            "its retry was due {} ago and was not sent: is a runtime for {} v{} running?",
            since(due, now),
            state.saga_type,
            state.definition_version
        ),
        Some(Phase::AwaitingReply { .. }) => {
            format!(
                "awaiting a reply for {} (timeout {})",
                duration(waited),
                duration(expected)
            )
        }
        Some(Phase::Backoff { .. }) => format!("backing off for {}", duration(waited)),
        None => format!("no step in flight for {}", duration(waited)),
    };
    Some((waited, threshold, why))
}

async fn stuck(
    cli: &Cli,
    store: &Store,
    older_than: Option<Duration>,
    saga_type: Option<String>,
    limit: usize,
    now: Timestamp,
    json: bool,
) -> Result<String, CliError> {
    let floor = older_than.unwrap_or(Duration::from_secs(1));
    let candidates = store
        .query(&SagaQuery {
            statuses: vec![
                SagaStatus::Created,
                SagaStatus::Running,
                SagaStatus::Compensating,
            ],
            saga_type: saga_type
                .map(|t| SagaType::new(t).map_err(|e| usage(format!("--type: {e}"))))
                .transpose()?,
            definition_version: None,
            created_after: None,
            updated_before: Some(Timestamp(
                now.as_millis()
                    .saturating_sub(u64::try_from(floor.as_millis()).unwrap_or(u64::MAX)),
            )),
            order: SagaOrder::LeastRecentlyUpdated,
            limit: MAX_QUERY_ROWS,
        })
        .await?;
    let found: Vec<(&StoredSaga, Duration, Duration, String)> = candidates
        .iter()
        .filter_map(|s| stuck_reason(&s.state, now, older_than).map(|(w, t, why)| (s, w, t, why)))
        .take(limit)
        .collect();
    if json {
        let list: Vec<Value> = found
            .iter()
            .map(|(s, waited, threshold, why)| {
                let mut v = saga_json(cli, s);
                v["waited_ms"] = json!(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
                v["threshold_ms"] = json!(u64::try_from(threshold.as_millis()).unwrap_or(u64::MAX));
                v["why"] = json!(why);
                v
            })
            .collect();
        return Ok(to_json(&list));
    }
    if found.is_empty() {
        return Ok("no stuck sagas\n".into());
    }
    let mut t = Table::new(vec![
        "ID",
        "TYPE",
        "VER",
        "STATUS",
        "STEP",
        "ATTEMPT",
        "WAITING",
        "THRESHOLD",
        "WHY",
    ]);
    for (s, waited, threshold, why) in &found {
        let st = &s.state;
        let (step, attempt) = step_cell(&current_step(cli, st));
        t.row(vec![
            st.id.to_string(),
            st.saga_type.to_string(),
            st.definition_version.to_string(),
            st.status.to_string(),
            step,
            attempt,
            duration(*waited),
            duration(*threshold),
            why.clone(),
        ]);
    }
    Ok(t.render())
}

async fn stats(
    store: &Store,
    window: Duration,
    now: Timestamp,
    json: bool,
) -> Result<String, CliError> {
    let from = Timestamp(
        now.as_millis()
            .saturating_sub(u64::try_from(window.as_millis()).unwrap_or(u64::MAX)),
    );
    let st = store.stats(from).await?;
    let secs = window.as_secs_f64().max(0.001);
    let outbox_lag = st.outbox_oldest.map(|t| t.until(now));
    if json {
        return Ok(to_json(&json!({
            "counts": st.counts,
            "window_ms": u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            "started": st.started_since,
            "finished": st.finished_since,
            "started_per_s": st.started_since as f64 / secs,
            "finished_per_s": st.finished_since as f64 / secs,
            "outbox_backlog": st.outbox_backlog,
            "outbox_lag_ms": outbox_lag.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            "oldest_active": st.oldest_active.as_ref().map(|(id, ty, created)| json!({
                "id": id, "saga_type": ty, "created_at": time(*created),
                "age_ms": created.until(now).as_millis() as u64,
            })),
            "open_dead_letters": st.open_dead_letters,
            "sweeps": st.sweeps.iter().map(|w| json!({
                "name": w.name, "holder": w.holder, "runs": w.runs,
                "last_run": time(w.last_run), "last_run_ms": w.last_run.as_millis(),
                "deleted": w.deleted,
            })).collect::<Vec<_>>(),
        })));
    }
    let mut out = String::new();
    if st.counts.is_empty() {
        out.push_str("no sagas in the store\n");
    } else {
        let mut t = Table::new(vec!["TYPE", "VER", "STATUS", "COUNT"]);
        for c in &st.counts {
            t.row(vec![
                c.saga_type.clone(),
                c.definition_version.to_string(),
                c.status.to_string(),
                c.count.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    let _ = writeln!(
        out,
        "\nlast {}: {} started ({:.2}/s), {} finished ({:.2}/s)",
        duration(window),
        st.started_since,
        st.started_since as f64 / secs,
        st.finished_since,
        st.finished_since as f64 / secs
    );
    let _ = match outbox_lag {
        Some(lag) => writeln!(
            out,
            "outbox: {} unpublished, the oldest written {} ago",
            st.outbox_backlog,
            duration(lag)
        ),
        None => writeln!(out, "outbox: empty (everything published)"),
    };
    let _ = match &st.oldest_active {
        Some((id, ty, created)) => writeln!(
            out,
            "oldest active: {id} ({ty}), created {} ago",
            since(*created, now)
        ),
        None => writeln!(out, "oldest active: none"),
    };
    let _ = writeln!(out, "open dead letters: {}", st.open_dead_letters);
    if st.sweeps.is_empty() {
        let _ = writeln!(out, "retention sweeper: has not run yet");
    }
    for w in &st.sweeps {
        let _ = writeln!(
            out,
            "{} sweeper: {} runs, the last {} ago by {}; deleted {} finished sagas, {} journal \
             entries, {} dead letters, {} inbox ids",
            w.name,
            w.runs,
            since(w.last_run, now),
            w.holder,
            w.deleted.sagas,
            w.deleted.journal_entries,
            w.deleted.dead_letters,
            w.deleted.inbox
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use skald_runtime::ids::StepName;
    use skald_runtime::machine::{DeadLetterInfo, Pending, StepError};

    use super::*;

    fn state(status: SagaStatus, updated: u64, pending: Option<Pending>) -> SagaState {
        SagaState {
            id: SagaId::new(),
            saga_type: SagaType::new("checkout").expect("type"),
            definition_version: 1,
            data_version: 1,
            data: json!({}),
            status,
            completed: 0,
            pending,
            failure: None,
            dead_letter: None,
            cancel: None,
            in_doubt: None,
            redrives: 0,
            created_at: Timestamp(0),
            updated_at: Timestamp(updated),
        }
    }

    fn awaiting(deadline: u64) -> Option<Pending> {
        Some(Pending {
            step: 0,
            kind: CommandKind::Action,
            attempt: 1,
            first_attempt: 1,
            phase: Phase::AwaitingReply {
                deadline: Timestamp(deadline),
            },
            in_doubt: false,
        })
    }

    #[test]
    fn stuck_means_more_than_three_times_the_expected_wait() {
        // Sent at 10 s with a 10 s timeout: fine until 40 s, stuck after.
        let s = state(SagaStatus::Running, 10_000, awaiting(20_000));
        assert_eq!(stuck_reason(&s, Timestamp(40_000), None), None);
        let (waited, threshold, why) = stuck_reason(&s, Timestamp(40_001), None).expect("stuck");
        assert_eq!(
            (waited, threshold),
            (Duration::from_millis(30_001), Duration::from_secs(30))
        );
        assert!(
            why.contains("deadline passed") && why.contains("checkout v1"),
            "{why}"
        );
        // An explicit threshold wins, and names a wait still within its timeout.
        let (_, _, why) = stuck_reason(&s, Timestamp(15_000), Some(Duration::from_secs(2)))
            .expect("older than 2 s");
        assert!(why.contains("awaiting a reply"), "{why}");
    }

    #[test]
    fn stuck_never_flags_finished_or_dead_lettered_sagas() {
        for status in [
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Failed,
        ] {
            let mut s = state(status, 0, None);
            if status == SagaStatus::Failed {
                s.dead_letter = Some(DeadLetterInfo {
                    step: 0,
                    step_name: StepName::new("reserve").expect("name"),
                    kind: CommandKind::Compensation,
                    error: StepError::new("x", "y"),
                    attempts: 3,
                    last_attempt: 3,
                    in_doubt: false,
                });
            }
            assert_eq!(
                stuck_reason(&s, Timestamp(1_000_000), Some(Duration::ZERO)),
                None
            );
        }
    }

    #[test]
    fn refusals_say_what_they_mean() {
        let condition = "the request's condition does not hold: ";
        for (reason, want) in [
            (
                format!("{condition}the request expired at 5 ms (now 9 ms)"),
                "expired: ",
            ),
            (
                format!("{condition}made after 0 re-drive(s); the saga has had 1 since"),
                "condition not met: the saga was re-driven",
            ),
            (
                format!("{condition}made at version 3; the saga is at version 4"),
                "condition not met: the saga changed",
            ),
            (
                "operator request op:x:1 refused: unsigned: this runtime applies only \
                 requests signed by a listed operator key"
                    .to_owned(),
                "unverified operator: ",
            ),
            (
                "operator request op:x:1 refused: operator key UABC is not in this \
                 runtime's allowlist"
                    .to_owned(),
                "unverified operator: ",
            ),
            (
                "operator request op:x:1 refused: the signature does not verify".to_owned(),
                "unverified operator: ",
            ),
            (
                "operator request op:bob:1 refused: signed by operator alice, but the request \
                 names operator \"bob\""
                    .to_owned(),
                "unverified operator: the runtimes list the signing key under another name",
            ),
            (
                "operator request op:x:1 refused: it expires at 99 ms, more than 3600 s ahead"
                    .to_owned(),
                "too far ahead: ",
            ),
        ] {
            let shown = refusal(&reason);
            assert!(shown.starts_with(want), "{reason} -> {shown}");
            assert!(shown.ends_with(&format!("[{reason}]")), "{shown}");
        }
        assert_eq!(
            refusal("saga is finished (completed)"),
            "saga is finished (completed)"
        );
    }

    #[test]
    fn a_short_wait_gets_at_least_a_second() {
        let s = state(
            SagaStatus::Running,
            1_000,
            Some(Pending {
                step: 0,
                kind: CommandKind::Action,
                attempt: 2,
                first_attempt: 1,
                phase: Phase::Backoff {
                    due: Timestamp(1_050),
                },
                in_doubt: false,
            }),
        );
        assert_eq!(stuck_reason(&s, Timestamp(1_900), None), None);
        let (_, threshold, why) = stuck_reason(&s, Timestamp(2_100), None).expect("stuck");
        assert_eq!(threshold, Duration::from_secs(1));
        assert!(why.contains("retry was due"), "{why}");
    }
}
