//! The CLI's commands: each reads the store (and, for actions, sends over NATS) and
//! returns what to print, a human table or one JSON document; `serve` runs a node.
//!
//! One module per command family; this one dispatches a parsed command and holds what
//! they share (opening the store, reading a saga, rendering a saga's step and phase).

mod dead_letters;
mod list;
mod migrate;
mod replay;
mod requests;
mod serve;
mod show;
mod stats;
mod stuck;

use std::sync::Arc;

use serde_json::{Value, json};
use skald_adapters::postgres::PostgresStore;
use skald_adapters::sqlite::SqliteStore;
use skald_runtime::ids::{CommandKind, SagaId, SagaType};
use skald_runtime::machine::{Phase, SagaState, Timestamp};
use skald_runtime::ports::{Clock, SagaQueries, StoredSaga, SystemClock};
use uuid::Uuid;

use super::render::{parse_time, since, time};
use super::{Arguments, Cli, CliError, Command, DlqCommand, ExitStatus};
use requests::Nats;

type Store = Arc<dyn SagaQueries>;

/// Runs one parsed command; `Ok` is what to print.
pub(crate) async fn run(cli: &Cli, args: Arguments) -> Result<String, CliError> {
    // Half a pair or two ways to authenticate is bad usage, whatever the command.
    args.nats_auth
        .validate()
        .map_err(|e| usage(e.to_string()))?;
    // A node opens (and migrates) the store itself; the other commands only read it.
    if let Command::Serve(serve) = args.command {
        let nats = args.nats.as_deref();
        return serve::serve(cli, &args.db, nats, &args.nats_auth, serve).await;
    }
    let store = open_store(&args.db).await?;
    let now = SystemClock.now();
    let json = args.json;
    let nats = Nats {
        url: args.nats.as_deref(),
        auth: &args.nats_auth,
    };
    match args.command {
        // Run above, before the store is opened read-only.
        Command::Serve(_) => Ok(String::new()),
        Command::Sagas(a) => list::sagas(cli, &store, a, now, json).await,
        Command::Show { id } => show::show(cli, &store, saga_id(&id)?, now, json).await,
        Command::At { id, time } => {
            let at = parse_time(&time, now).map_err(usage)?;
            replay::time_travel(cli, &store, saga_id(&id)?, at, json).await
        }
        Command::Dlq(DlqCommand::List {
            saga_type,
            all,
            limit,
        }) => dead_letters::dlq_list(&store, saga_type, all, limit, now, json).await,
        Command::Dlq(DlqCommand::Show { id }) => {
            dead_letters::dlq_show(&store, uuid(&id)?, now, json).await
        }
        Command::Dlq(DlqCommand::Redrive {
            id,
            all,
            saga_type,
            send,
        }) => requests::redrive(&store, nats, id.as_deref(), all, saga_type, &send, json).await,
        Command::Cancel { id, reason, send } => {
            requests::cancel(&store, nats, &id, reason, &send, json).await
        }
        Command::Stuck {
            older_than,
            saga_type,
            limit,
        } => stuck::stuck(cli, &store, older_than, saga_type, limit, now, json).await,
        Command::Stats { window } => stats::stats(&store, window, now, json).await,
        Command::MigratePayloads {
            saga_type,
            dry_run,
            batch,
            max,
        } => {
            let saga_type = self::saga_type(saga_type)?;
            migrate::migrate_payloads(cli, &store, saga_type, dry_run, batch, max, now, json).await
        }
        Command::Replay {
            id,
            saga_type,
            version,
            against,
            all,
            limit,
        } => {
            let targets = replay::targets(&store, id, saga_type, version, all, limit).await?;
            replay::replay_check(cli, &store, targets, against, json).await
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
        return Err(unsupported_db(url));
    };
    Ok(store)
}

fn unsupported_db(url: &str) -> CliError {
    CliError::new(
        ExitStatus::Database,
        format!(
            "unsupported database URL {:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB \
             (--db or SKALD_DB)",
            skald_adapters::redact_url(url)
        ),
    )
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

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
