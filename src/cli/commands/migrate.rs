//! `skald migrate-payloads`: stored saga data brought to its definition's data version
//! ahead of time, with the upcasters a runtime applies on load.

use std::fmt::Write as _;

use skald_runtime::ids::{SagaId, SagaType};
use skald_runtime::machine::Timestamp;
use skald_runtime::ports::JournalEntry;
use skald_runtime::upcast::upcast_saga_data;

use super::{Store, to_json};
use crate::cli::{Cli, CliError, ExitStatus};

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
pub(super) async fn migrate_payloads(
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
            // The runtime's own upcasting, as an instance applies it when it loads the saga.
            let mut state = s.clone();
            if let Err(e) = upcast_saga_data(cli.upcasters(), def, &mut state) {
                report.failed.push(MigrationFailure {
                    saga_id: s.id,
                    reason: e.to_string(),
                });
                continue;
            }
            if dry_run {
                report.migrated += 1;
                continue;
            }
            let note = format!(
                "data migrated from schema version {} to {want} by skald migrate-payloads",
                s.data_version
            );
            let write = SagaWrite {
                id: s.id,
                // An update with no outbox rows: the saga keeps the partition it was
                // created in, and nothing else takes this one.
                partition: 0,
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
