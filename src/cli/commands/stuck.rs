//! `skald stuck`: the sagas that wait longer than they should.

use std::time::Duration;

use serde_json::{Value, json};
use skald_runtime::ids::SagaType;
use skald_runtime::machine::{Phase, SagaState, SagaStatus, Timestamp};
use skald_runtime::ports::{MAX_QUERY_ROWS, SagaOrder, SagaQuery, StoredSaga};

use super::{Store, current_step, saga_json, step_cell, to_json, usage};
use crate::cli::render::{Table, duration, since};
use crate::cli::{Cli, CliError};

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

pub(super) async fn stuck(
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use skald_runtime::ids::{CommandKind, SagaId, StepName};
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
