//! `skald dlq list` and `skald dlq show`: the dead letters, open or all.

use std::fmt::Write as _;

use serde_json::{Value, json};
use skald_runtime::ids::CommandKind;
use skald_runtime::machine::Timestamp;
use skald_runtime::ports::{DeadLetterCategory, DeadLetterQuery, DeadLetterRecord};
use uuid::Uuid;

use super::{Store, ago, indent, pretty, to_json};
use crate::cli::render::{Table, since, time};
use crate::cli::{CliError, ExitStatus};

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

pub(super) async fn dlq_list(
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

pub(super) async fn dlq_show(
    store: &Store,
    id: Uuid,
    now: Timestamp,
    json: bool,
) -> Result<String, CliError> {
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
