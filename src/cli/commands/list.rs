//! `skald sagas`: the sagas that match, newest first.

use std::fmt::Write as _;

use serde_json::Value;
use skald_runtime::machine::{SagaStatus, Timestamp};
use skald_runtime::ports::{MAX_QUERY_ROWS, SagaOrder, SagaQuery};

use super::{Store, ago, current_step, saga_json, saga_type, step_cell, to_json, usage};
use crate::cli::render::{Table, since};
use crate::cli::{Cli, CliError, SagasArgs};

pub(super) async fn sagas(
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
