//! `skald stats`: sagas per type, version and status, recent activity, the outbox, the
//! dead letters and the retention sweepers.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;
use skald_runtime::machine::Timestamp;

use super::{Store, to_json};
use crate::cli::CliError;
use crate::cli::render::{Table, duration, since, time};

pub(super) async fn stats(
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
