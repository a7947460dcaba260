//! `skald at` (a saga as of a past time) and `skald replay` (do the journals still
//! replay the same path on the registered definitions?).

use std::fmt::Write as _;

use serde_json::json;
use skald_runtime::ids::SagaId;
use skald_runtime::machine::{SagaStatus, Timestamp};
use skald_runtime::ports::{MAX_QUERY_ROWS, SagaOrder, SagaQuery, StoredSaga};
use skald_runtime::replay::{ReplayError, check_with, replay_with};

use super::{
    Store, current_step, indent, load, phase_text, pretty, saga_id, saga_json, step_name, to_json,
    usage,
};
use crate::cli::render::{Table, time};
use crate::cli::{Cli, CliError, ExitStatus};

pub(super) async fn time_travel(
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

/// The sagas `skald replay` checks: the one named, or those that match (by default the
/// unfinished ones). Refuses a match cut short by `--limit`, so none goes unchecked.
pub(super) async fn targets(
    store: &Store,
    id: Option<String>,
    saga_type: Option<String>,
    version: Option<u32>,
    all: bool,
    limit: usize,
) -> Result<Vec<StoredSaga>, CliError> {
    Ok(match id {
        Some(id) => vec![load(store, saga_id(&id)?).await?],
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
                saga_type: super::saga_type(saga_type)?,
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
    })
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

pub(super) async fn replay_check(
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
