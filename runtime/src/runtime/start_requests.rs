//! Start requests: sagas started from any language over the bus (docs/protocol.md,
//! "Starting a saga").
//!
//! An orchestrator serves `skald.start.<saga_type>` for each type it registers, in the
//! queue group `RuntimeOptions::reply_group`, so one of the runtimes serving a type
//! answers each request; a type nobody serves gets the broker's "no responders" at once.
//!
//! The reader takes every request as it comes and decides at once, without waiting for
//! anything but the answer's send:
//!
//! - a request whose reply subject is no requester's inbox
//!   (`RuntimeOptions::start_reply_prefixes`) is neither applied nor answered: the broker
//!   lets a requester name any reply subject (a JetStream API subject, a lifecycle event's
//!   subject), and the orchestrator's `allow_responses` would let it publish there;
//! - a request over the size limits is refused `too_large`, its body dropped;
//! - past `max_in_flight_starts` requests, or `max_in_flight_bytes` of them, in flight,
//!   it is refused `unavailable` at once (nothing stored), its body dropped: nothing
//!   waits in memory for capacity, and the bus holds no more than
//!   `max_in_flight_starts` requests not yet read;
//! - otherwise it is started in a task of its own.
//!
//! A started request is checked, in this order, before anything is stored: the body
//! (`{"data": .., "key": ..}`), the key, the data (decoded from its JSON text as the data
//! type of the type's latest registered definition), and the data's fields (one the data
//! type does not know would be dropped: `version_skew`). A keyed request whose saga
//! exists is answered from the store. A request not under way `max_start_wait` after it
//! was received is refused `unavailable`. Only then is the saga started, as
//! [`Runtime::start_saga`](super::Runtime::start_saga) or, with a key,
//! [`Runtime::start_saga_keyed`](super::Runtime::start_saga_keyed) would, and the answer
//! names it once it is stored and its first command published (or in the outbox). Once
//! the start is under way, an error may leave the saga stored: a keyed request then
//! looks for it in the store, an unkeyed one is answered `unknown_outcome`, never
//! "nothing was stored".
//!
//! Shutdown ([`Serving::shutdown`]): the subscriptions are drained first (the broker
//! hands new requests to the other orchestrators at once), the requests received before
//! are answered `unavailable` (nothing stored), and the starts under way are given a
//! few seconds to finish and answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::field::Empty;
use tracing::{Instrument, debug, error, warn};

use crate::actors::{Registry, Shared};
use crate::error::{Disposition, RuntimeError};
use crate::ids::{SagaId, SagaType};
use crate::ports::{Message, ReplyTo, Request, RequestStream, Responder};
use crate::wire::{self, StartAnswer, StartRefusal};

/// The `answer` label of a request neither applied nor answered: its reply subject is no
/// requester's inbox.
const FORGED_REPLY: &str = "forged_reply";

/// How long a shutdown waits for the requests received before it to be read (a drain
/// ends when the broker confirms it).
const DRAIN_BOUND: Duration = Duration::from_secs(2);

/// How long a shutdown waits for the starts under way to finish.
const IN_FLIGHT_BOUND: Duration = Duration::from_secs(5);

/// When a keyed start whose outcome is unknown looks for its saga in the store: at once,
/// then after these pauses (a commit may still be finishing).
const RECHECKS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(1_000),
];

/// The start requests' endpoint, running.
pub(super) struct Serving {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").finish_non_exhaustive()
    }
}

impl Serving {
    /// Serves the requests of `source` for the saga types `types`.
    pub(super) fn spawn(
        shared: Arc<Shared>,
        registry: Addr<Registry>,
        types: &[SagaType],
        source: RequestStream,
    ) -> Serving {
        for p in &shared.options.start_reply_prefixes {
            if usable_prefix(p).is_none() {
                warn!(prefix = ?p, "start_reply_prefixes: a prefix that is empty or begins with `$` or `skald.` matches no reply subject");
            }
        }
        let types = types
            .iter()
            .map(|ty| (wire::start_subject(ty), ty.clone()))
            .collect();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(shared, registry, types, source, stopped));
        Serving { stop, task }
    }

    /// Stops serving: the subscriptions are drained (new requests go to the other
    /// orchestrators, or get "no responders"), the requests received before are
    /// answered `unavailable`, and the starts under way finish (each bounded). Call it
    /// before the actor system stops, so the starts under way can finish.
    pub(super) async fn shutdown(self) {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        let bound = DRAIN_BOUND * 2 + IN_FLIGHT_BOUND + Duration::from_secs(1);
        if tokio::time::timeout(bound, self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// The fewest requests the bus holds received and not yet read, per saga type: a burst
/// of small requests arrives in one read of the connection, faster than any reader
/// takes them.
const MIN_BUS_CAPACITY: usize = 64;

/// How many requests the bus may hold received and not yet read, per saga type
/// (`Bus::serve`'s capacity): `max_in_flight_starts`, at least [`MIN_BUS_CAPACITY`].
/// The reader takes them continuously (it waits for nothing but an answer's send), so
/// this is room for a burst, not a queue; past it the bus drops requests unanswered
/// (their requesters time out, nothing stored). At most this many times
/// `max_message_bytes` are held there.
pub(super) fn bus_capacity(options: &super::RuntimeOptions) -> usize {
    options.max_in_flight_starts.max(MIN_BUS_CAPACITY)
}

/// The bytes a request holds in memory (subject, headers, body).
fn message_size(m: &Message) -> usize {
    m.subject.len()
        + m.payload.len()
        + m.headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
}

/// `prefix` when it may match a reply subject: not empty, not `$...` nor `skald....`.
fn usable_prefix(prefix: &str) -> Option<&str> {
    let forbidden = prefix.is_empty() || prefix.starts_with('$') || prefix.starts_with("skald.");
    (!forbidden).then_some(prefix)
}

/// Whether an answer may be published on `subject`: a requester's inbox, below one of
/// `prefixes` (`RuntimeOptions::start_reply_prefixes`), never a subject with a wildcard,
/// white space or an empty token, nor one beginning with `$` (the JetStream and system
/// APIs) or `skald.` (skald's own subjects).
fn is_inbox(subject: &str, prefixes: &[String]) -> bool {
    if subject.starts_with('$') || subject.starts_with("skald.") {
        return false;
    }
    if subject
        .chars()
        .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
    {
        return false;
    }
    if subject.split('.').any(str::is_empty) {
        return false;
    }
    prefixes
        .iter()
        .filter_map(|p| usable_prefix(p))
        .any(|p| match subject.strip_prefix(p) {
            None => false,
            Some(rest) if p.ends_with('.') => !rest.is_empty(),
            // `_INBOX_` is followed by `<user>.<...>`.
            Some(rest) => {
                matches!(rest.split_once('.'), Some((user, tail)) if !user.is_empty() && !tail.is_empty())
            }
        })
}

/// Answers the start requests of `source` (`types`: the saga type of each subject)
/// until it ends or `stop` says so (or is dropped); then stops as
/// [`Serving::shutdown`] describes.
async fn serve(
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    types: HashMap<String, SagaType>,
    mut source: RequestStream,
    mut stop: watch::Receiver<bool>,
) {
    let o = &shared.options;
    let limits = wire::InboundLimits {
        max_headers: o.max_headers,
        max_header_bytes: o.max_header_bytes,
        max_message_bytes: o.max_message_bytes,
    };
    let count = Arc::new(Semaphore::new(o.max_in_flight_starts.max(1)));
    let max_bytes = o.max_in_flight_bytes.clamp(1, u32::MAX as usize);
    let bytes = Arc::new(Semaphore::new(max_bytes));
    let mut in_flight = JoinSet::new();
    loop {
        let request = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    error!(error = %e, "a start request's task panicked: its requester got no answer");
                }
                continue;
            }
            request = source.next() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let Some(ty) = saga_type(&types, &request) else {
            continue;
        };
        if !answerable(&shared, &ty, &request) {
            continue;
        }
        let (message, responder) = request.into_parts();
        // Past the limits: refused at once, the body dropped before anything is held.
        if let Err(reason) = limits.check(&message) {
            drop(message);
            debug!(saga.r#type = %ty, reason, "start request refused: too large");
            let refusal = StartRefusal::new(wire::START_TOO_LARGE, reason);
            crate::metrics::start_request(&ty, wire::START_TOO_LARGE);
            respond(responder, &StartAnswer::Refused(refusal)).await;
            continue;
        }
        // A request larger than the whole budget takes all of it.
        let size = message_size(&message).clamp(1, max_bytes) as u32;
        let permits = Arc::clone(&count).try_acquire_owned().and_then(|one| {
            Arc::clone(&bytes)
                .try_acquire_many_owned(size)
                .map(|held| (one, held))
        });
        let Ok(permits) = permits else {
            drop(message);
            debug!(saga.r#type = %ty, "start request refused: at capacity");
            crate::metrics::start_request(&ty, wire::START_UNAVAILABLE);
            let refusal = StartRefusal::new(
                wire::START_UNAVAILABLE,
                format!(
                    "the orchestrator is at capacity ({} start requests, or {} bytes of them, \
                     under way): nothing was stored; send the request again later, with backoff",
                    o.max_in_flight_starts, o.max_in_flight_bytes
                ),
            );
            respond(responder, &StartAnswer::Refused(refusal)).await;
            continue;
        };
        in_flight.spawn(answer(
            Arc::clone(&shared),
            registry.clone(),
            ty,
            message,
            responder,
            Instant::now(),
            permits,
        ));
    }

    // Stopping. The broker routes no new request here once it has the drain; the ones
    // it sent before are answered: nothing of them was stored.
    let drained = tokio::time::timeout(DRAIN_BOUND, async {
        source.stop().await;
        while let Some(request) = source.next().await {
            let Some(ty) = saga_type(&types, &request) else {
                continue;
            };
            if !answerable(&shared, &ty, &request) {
                continue;
            }
            let (message, responder) = request.into_parts();
            drop(message);
            crate::metrics::start_request(&ty, wire::START_UNAVAILABLE);
            let refusal = StartRefusal::new(
                wire::START_UNAVAILABLE,
                "the orchestrator is shutting down: nothing was stored; send the request \
                 again (another orchestrator serves it, or this one once restarted)",
            );
            respond(responder, &StartAnswer::Refused(refusal)).await;
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            "start requests: the broker did not confirm the unsubscription in time; requests it still sent here are not answered"
        );
    }
    drop(source);
    let finished = tokio::time::timeout(IN_FLIGHT_BOUND, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            starts = in_flight.len(),
            "start requests still under way at shutdown: left to finish on their own"
        );
    }
    // Not aborted: each still answers its requester (as the runtime stops, with what
    // the store shows or `unknown_outcome`).
    in_flight.detach_all();
    debug!("start requests: no longer served");
}

/// The saga type `request` was served for.
fn saga_type(types: &HashMap<String, SagaType>, request: &Request) -> Option<SagaType> {
    let ty = types.get(&request.message.subject).cloned();
    if ty.is_none() {
        error!(subject = ?request.message.subject, "a request on a subject this runtime does not serve");
    }
    ty
}

/// Whether `request` may be applied and answered: its reply subject is a requester's
/// inbox, or it has none (applied, answered to nobody). Logged and counted otherwise.
fn answerable(shared: &Shared, ty: &SagaType, request: &Request) -> bool {
    match request.reply_to() {
        ReplyTo::Nowhere | ReplyTo::Requester => true,
        ReplyTo::Subject(subject) if is_inbox(subject, &shared.options.start_reply_prefixes) => {
            true
        }
        ReplyTo::Subject(subject) => {
            warn!(
                saga.r#type = %ty,
                reply = ?crate::ports::cap(subject, 256),
                "start request neither applied nor answered: its reply subject is no \
                 requester's inbox (RuntimeOptions::start_reply_prefixes); a sender may be \
                 trying to make this orchestrator publish there"
            );
            crate::metrics::start_request(ty, FORGED_REPLY);
            false
        }
    }
}

/// A saga started, or found, for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Started {
    id: SagaId,
    existing: bool,
    definition_version: Option<u32>,
}

/// Starts the saga of one request and answers it; `permits` are held until then.
async fn answer(
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    ty: SagaType,
    message: Message,
    responder: Box<dyn Responder>,
    received: Instant,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let span = tracing::info_span!(
        "start_request",
        saga.r#type = %ty,
        saga.id = Empty,
        existing = Empty,
        refused = Empty,
    );
    let answer = match start(&shared, &registry, &ty, message, received)
        .instrument(span.clone())
        .await
    {
        Ok(started) => {
            span.record("existing", started.existing);
            let answer = if started.existing {
                "existing"
            } else {
                "started"
            };
            crate::metrics::start_request(&ty, answer);
            StartAnswer::Started {
                saga_id: started.id,
                existing: started.existing,
                definition_version: started.definition_version,
            }
        }
        Err(refusal) => {
            span.record("refused", refusal.code.as_str());
            crate::metrics::start_request(&ty, &refusal.code);
            StartAnswer::Refused(refusal)
        }
    };
    respond(responder, &answer).instrument(span).await;
    drop(permits);
}

/// Sends `answer`; a requester that went away is only logged.
async fn respond(responder: Box<dyn Responder>, answer: &StartAnswer) {
    let (headers, payload) = wire::encode_start_answer(answer);
    if let Err(e) = responder.respond(headers, payload).await {
        debug!(error = %e, "the answer to a start request could not be sent");
    }
}

/// Checks the request and starts its saga, or finds it.
async fn start(
    shared: &Shared,
    registry: &Addr<Registry>,
    ty: &SagaType,
    message: Message,
    received: Instant,
) -> Result<Started, StartRefusal> {
    let request = wire::decode_start_request(&message.payload).map_err(|e| {
        StartRefusal::new(
            wire::START_INVALID_REQUEST,
            format!("the body is not a start request {{\"data\": ..., \"key\": \"...\"}}: {e}"),
        )
    })?;
    drop(message);
    let Some(definition) = shared.definitions.latest(ty).map(Arc::clone) else {
        // Only registered types are served.
        error!(saga.r#type = %ty, "a start request for a type this runtime does not register");
        return Err(StartRefusal::new(
            wire::START_INTERNAL,
            format!("this orchestrator does not run saga type {ty}: nothing was stored"),
        ));
    };
    let keyed = request.key.is_some();
    let id = match &request.key {
        Some(key) => SagaId::for_key(ty, key)
            .map_err(|e| StartRefusal::new(wire::START_INVALID_KEY, e.to_string()))?,
        // In a partition this node holds: the saga's replies come back to its actor.
        None => shared.ownership.fresh_id(),
    };
    let read = definition
        .read_data_json(request.data.get())
        .map_err(|e| StartRefusal::new(wire::START_INVALID_DATA, e.to_string()))?;
    drop(request);
    tracing::Span::current().record("saga.id", tracing::field::display(id));
    // The common repeat (a client retrying) is answered from the store.
    if keyed {
        match shared.store.load(id).await {
            Ok(Some(saga)) => {
                return Ok(Started {
                    id,
                    existing: true,
                    definition_version: Some(saga.state.definition_version),
                });
            }
            Ok(None) => {}
            Err(e) => {
                warn!(saga.id = %id, error = %e, "start request not applied: the store cannot say whether its saga exists");
                return Err(unavailable());
            }
        }
    }
    // After the lookup: a keyed retry of a saga a newer node started is answered
    // `existing`, not refused for fields this node does not know.
    if !read.lost_fields.is_empty() {
        return Err(version_skew(&definition, &read.lost_fields));
    }
    let waited = received.elapsed();
    if waited > shared.options.max_start_wait {
        warn!(saga.id = %id, ?waited, "start request not applied: it waited too long (RuntimeOptions::max_start_wait)");
        return Err(StartRefusal::new(
            wire::START_UNAVAILABLE,
            format!(
                "the request waited {} ms for the orchestrator, longer than its {} ms: \
                 nothing was stored; send it again later",
                waited.as_millis(),
                shared.options.max_start_wait.as_millis()
            ),
        ));
    }
    // From here the start is under way: an error may leave the saga stored.
    match super::start_or_find(shared, registry, &definition, id, read.data, keyed).await {
        Ok(false) => Ok(Started {
            id,
            existing: false,
            definition_version: Some(definition.version()),
        }),
        Ok(true) => Ok(Started {
            id,
            existing: true,
            definition_version: stored_version(shared, id).await,
        }),
        Err(e) => {
            let refusal = after_start_failed(id, keyed, e);
            if keyed && refusal.code == wire::START_UNKNOWN_OUTCOME {
                // The store says whether the key's saga exists.
                for pause in RECHECKS {
                    tokio::time::sleep(pause).await;
                    if let Ok(Some(saga)) = shared.store.load(id).await {
                        return Ok(Started {
                            id,
                            existing: true,
                            definition_version: Some(saga.state.definition_version),
                        });
                    }
                }
            }
            Err(refusal)
        }
    }
}

/// The definition version of stored saga `id`, if the store says.
async fn stored_version(shared: &Shared, id: SagaId) -> Option<u32> {
    match shared.store.load(id).await {
        Ok(saga) => saga.map(|s| s.state.definition_version),
        Err(_) => None,
    }
}

/// `unavailable` before anything was under way.
fn unavailable() -> StartRefusal {
    StartRefusal::new(
        wire::START_UNAVAILABLE,
        "the orchestrator cannot start sagas right now (its store or the bus unavailable): \
         nothing was stored; send the request again later, with backoff",
    )
}

/// `version_skew`: the data has fields `definition`'s data type does not know.
fn version_skew(definition: &crate::definition::Definition, lost: &[String]) -> StartRefusal {
    StartRefusal::new(
        wire::START_VERSION_SKEW,
        format!(
            "saga type {} at definition version {} (data version {}), the latest this \
             orchestrator runs, has no field {}: it would drop them. Nothing was stored: \
             send the request again (an orchestrator running a newer version may answer), \
             or leave the fields out",
            definition.saga_type(),
            definition.version(),
            definition.data_version(),
            lost.join(", ")
        ),
    )
}

/// What a requester is told of an error of a start under way (`start_or_find`): the
/// code, and a reason that names no internals (store and bus errors may name hosts); the
/// error itself is logged. Errors of the data and the key are found before anything is
/// committed; any other may leave the saga stored.
fn after_start_failed(id: SagaId, keyed: bool, e: RuntimeError) -> StartRefusal {
    match e {
        RuntimeError::Data(e) => StartRefusal::new(wire::START_INVALID_DATA, e.to_string()),
        RuntimeError::InvalidKey(e) => StartRefusal::new(wire::START_INVALID_KEY, e.to_string()),
        e if matches!(e.disposition(), Disposition::Retry | Disposition::Defer) => {
            warn!(saga.id = %id, error = %e, keyed, "start request: outcome unknown (the start was under way when it failed)");
            unknown_outcome(id, keyed)
        }
        e => {
            error!(saga.id = %id, error = %e, "start request failed");
            StartRefusal::new(
                wire::START_INTERNAL,
                format!(
                    "the orchestrator failed to start saga {id} (see its log): it may \
                     exist; look for it before starting it again"
                ),
            )
        }
    }
}

/// `unknown_outcome` for the start of saga `id`.
fn unknown_outcome(id: SagaId, keyed: bool) -> StartRefusal {
    let reason = if keyed {
        format!(
            "the start of saga {id} was under way when the orchestrator failed (its store or \
             the bus unavailable, or shutting down): the saga may or may not exist. Send the \
             same request again later: with the same key it answers the saga if it exists, \
             and starts it otherwise"
        )
    } else {
        format!(
            "the start of saga {id} was under way when the orchestrator failed (its store or \
             the bus unavailable, or shutting down): saga {id} may exist. A start without a \
             key cannot be retried safely (it would start a second saga): look for saga \
             {id} (its lifecycle events, `skald show`), and send a key with your starts"
        )
    };
    StartRefusal::new(wire::START_UNKNOWN_OUTCOME, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes() -> Vec<String> {
        crate::runtime::RuntimeOptions::default().start_reply_prefixes
    }

    #[test]
    fn only_inboxes_are_answered() {
        let p = prefixes();
        for inbox in [
            "_INBOX.abc",
            "_INBOX.abc.def",
            "_INBOX_storefront.abc",
            "_INBOX_storefront.x.y",
        ] {
            assert!(is_inbox(inbox, &p), "{inbox}");
        }
        for forged in [
            "$JS.API.STREAM.PURGE.SKALD_REPLIES",
            "$JS.API.STREAM.PURGE.SKALD_EVENTS",
            "$SYS.REQ.SERVER.PING",
            "skald.evt.checkout.completed",
            "skald.reply.payment.x",
            "_INBOX",
            "_INBOX.",
            "_INBOX_",
            "_INBOX_storefront",
            "_INBOX_storefront.",
            "_INBOX_.x",
            "_INBOX..x",
            "_INBOX.*",
            "_INBOX.>",
            "_INBOX.a.*.b",
            "_INBOX.a b",
            "_INBOX.a\u{1b}b",
            "orders.created",
            "",
        ] {
            assert!(!is_inbox(forged, &p), "{forged:?}");
        }
        // A configured prefix: followed by anything after its dot; a dangerous one never.
        let custom = vec!["replies.".to_owned(), String::new(), "$JS.".to_owned()];
        assert!(is_inbox("replies.a.b", &custom));
        assert!(!is_inbox("replies.", &custom));
        assert!(!is_inbox("_INBOX.abc", &custom));
        assert!(!is_inbox("$JS.API.INFO", &custom));
        assert!(!is_inbox("orders.created", &custom));
        let skald = vec!["skald.".to_owned()];
        assert!(!is_inbox("skald.evt.x.completed", &skald));
    }

    #[test]
    fn a_start_that_failed_under_way_is_never_said_to_have_stored_nothing() {
        let id = SagaId::new();
        for e in [
            RuntimeError::ShuttingDown,
            RuntimeError::ActorUnavailable(id),
            RuntimeError::Store(crate::ports::StoreError::Unavailable("db down".into())),
        ] {
            let keyed = after_start_failed(id, true, e.clone());
            assert_eq!(keyed.code, wire::START_UNKNOWN_OUTCOME, "{e}");
            assert!(!keyed.nothing_stored() && !keyed.is_retryable());
            assert!(keyed.reason.contains("same key"), "{}", keyed.reason);
            let unkeyed = after_start_failed(id, false, e.clone());
            assert_eq!(unkeyed.code, wire::START_UNKNOWN_OUTCOME, "{e}");
            assert!(
                unkeyed.reason.contains("cannot be retried safely")
                    && unkeyed.reason.contains(&id.to_string()),
                "{}",
                unkeyed.reason
            );
            assert!(!unkeyed.reason.contains("db down"), "no internals");
        }
        // Refusals before anything is under way say nothing was stored.
        assert!(unavailable().nothing_stored() && unavailable().is_retryable());
        assert!(unavailable().reason.contains("nothing was stored"));
    }
}
