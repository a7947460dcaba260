//! Operator requests: `skald cancel` and `skald dlq redrive` send them to the runtimes
//! over NATS, then wait for what each led to (the journal entry it caused, or the dead
//! letter of its refusal).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use skald_adapters::nats::NatsOptions;
use skald_runtime::ids::SagaId;
use skald_runtime::journal::JournalRecord;
use skald_runtime::machine::{SagaStatus, Timestamp};
use skald_runtime::ports::{
    Bus, Clock, DeadLetterCategory, DeadLetterQuery, DeadLetterRecord, MAX_QUERY_ROWS, StoredSaga,
    SystemClock,
};
use skald_runtime::wire::{OperatorAction, OperatorRequest, encode_operator_request};

use super::{Store, load, saga_id, to_json, usage, uuid};
use crate::cli::render::{Table, duration, time};
use crate::cli::transport::read_nkey_seed;
use crate::cli::{CliError, ExitStatus, NatsArgs, NatsArgsError, SendArgs};

/// `skald dlq redrive`: asks the runtimes to re-drive the dead-lettered sagas named.
pub(super) async fn redrive(
    store: &Store,
    nats: Nats<'_>,
    id: Option<&str>,
    all: bool,
    saga_type: Option<String>,
    send: &SendArgs,
    json: bool,
) -> Result<String, CliError> {
    if all && send.if_version.is_some() {
        return Err(usage(
            "--if-version names one saga's stored version: not with --all".into(),
        ));
    }
    let targets = redrive_targets(store, id, all, saga_type).await?;
    let requests = targets
        .into_iter()
        .map(|s| (s, OperatorAction::Redrive))
        .collect();
    send_requests(store, nats, requests, send, json).await
}

/// `skald cancel`: asks the runtimes to cancel a saga still in flight.
pub(super) async fn cancel(
    store: &Store,
    nats: Nats<'_>,
    id: &str,
    reason: String,
    send: &SendArgs,
    json: bool,
) -> Result<String, CliError> {
    let saga = load(store, saga_id(id)?).await?;
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
    send_requests(store, nats, requests, send, json).await
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
            Err(e) => {
                unsent = Some((
                    crate::cli::transport::connect_error(url, &e),
                    vec![state.id],
                ))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
