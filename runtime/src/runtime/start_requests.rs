//! Start requests: sagas started from any language over the bus (docs/protocol.md,
//! "Starting a saga").
//!
//! An orchestrator serves `skald.start.<saga_type>` for each type it registers, in the
//! queue group `RuntimeOptions::reply_group`, so one of the runtimes serving a type
//! answers each request; a type nobody serves gets the broker's "no responders" at once.
//! A request is checked in this order before anything is stored: the size limits, the
//! body (`{"data": .., "key": ..}`), the key, then the data, decoded as the data type of
//! the type's latest registered definition. Only then is the saga started, as
//! [`Runtime::start_saga`](super::Runtime::start_saga) or, with a key,
//! [`Runtime::start_saga_keyed`](super::Runtime::start_saga_keyed) would, and the answer
//! names it once it is stored and its first command published (or in the outbox).
//!
//! At most `max_in_flight_starts` requests and `max_in_flight_bytes` bytes of them are
//! held at once (a budget of their own, apart from the reply intake's): past either the
//! reader waits, and further requests wait in the bus client's buffer, so a flood
//! spawns nothing unbounded.

use std::sync::Arc;

use actix::Addr;
use futures_util::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tracing::field::Empty;
use tracing::{Instrument, debug, error, warn};

use crate::actors::{Registry, Shared};
use crate::error::{Disposition, RuntimeError};
use crate::ids::{SagaId, SagaType};
use crate::ports::{Message, Request, Responder};
use crate::wire::{self, StartAnswer, StartRefusal};

/// The bytes a request holds in memory (subject, headers, body).
fn message_size(m: &Message) -> usize {
    m.subject.len()
        + m.payload.len()
        + m.headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
}

/// Answers the start requests of `requests` (each with the saga type it was served
/// for) until the stream ends or the runtime stops.
pub(super) async fn serve(
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    mut requests: impl Stream<Item = (SagaType, Request)> + Unpin,
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
    while let Some((ty, request)) = requests.next().await {
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
        let Ok(one) = Arc::clone(&count).acquire_owned().await else {
            break;
        };
        let Ok(held) = Arc::clone(&bytes).acquire_many_owned(size).await else {
            break;
        };
        let shared = Arc::clone(&shared);
        let registry = registry.clone();
        tokio::spawn(async move {
            let span = tracing::info_span!(
                "start_request",
                saga.r#type = %ty,
                saga.id = Empty,
                existing = Empty,
                refused = Empty,
            );
            let answer = match start(&shared, &registry, &ty, message)
                .instrument(span.clone())
                .await
            {
                Ok((saga_id, existing)) => {
                    span.record("existing", existing);
                    let answer = if existing { "existing" } else { "started" };
                    crate::metrics::start_request(&ty, answer);
                    StartAnswer::Started { saga_id, existing }
                }
                Err(refusal) => {
                    span.record("refused", refusal.code.as_str());
                    crate::metrics::start_request(&ty, &refusal.code);
                    StartAnswer::Refused(refusal)
                }
            };
            respond(responder, &answer).instrument(span).await;
            drop((one, held));
        });
    }
    debug!("start requests: no longer served");
}

/// Sends `answer`; a requester that went away is only logged.
async fn respond(responder: Box<dyn Responder>, answer: &StartAnswer) {
    let (headers, payload) = wire::encode_start_answer(answer);
    if let Err(e) = responder.respond(headers, payload).await {
        debug!(error = %e, "the answer to a start request could not be sent");
    }
}

/// Checks the request and starts its saga: its id, and whether it existed already.
async fn start(
    shared: &Shared,
    registry: &Addr<Registry>,
    ty: &SagaType,
    message: Message,
) -> Result<(SagaId, bool), StartRefusal> {
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
            format!("this orchestrator does not run saga type {ty}"),
        ));
    };
    let keyed = request.key.is_some();
    let id = match &request.key {
        Some(key) => SagaId::for_key(ty, key)
            .map_err(|e| StartRefusal::new(wire::START_INVALID_KEY, e.to_string()))?,
        None => SagaId::new(),
    };
    let data = definition
        .read_data(&request.data)
        .map_err(|e| StartRefusal::new(wire::START_INVALID_DATA, e.to_string()))?;
    drop(request);
    tracing::Span::current().record("saga.id", tracing::field::display(id));
    match super::start_or_find(shared, registry, &definition, id, data, keyed).await {
        Ok(existing) => Ok((id, existing)),
        Err(e) => Err(refusal(id, e)),
    }
}

/// What a requester is told of an error: the code, and a reason that names no internals
/// (store and bus errors may name hosts); the error itself is logged.
fn refusal(id: SagaId, e: RuntimeError) -> StartRefusal {
    match e {
        RuntimeError::Data(e) => StartRefusal::new(wire::START_INVALID_DATA, e.to_string()),
        RuntimeError::InvalidKey(e) => StartRefusal::new(wire::START_INVALID_KEY, e.to_string()),
        e if matches!(e.disposition(), Disposition::Retry | Disposition::Defer) => {
            warn!(saga.id = %id, error = %e, "start request not applied: the orchestrator cannot start sagas now");
            StartRefusal::new(
                wire::START_UNAVAILABLE,
                "the orchestrator cannot start sagas right now (store or bus unavailable, or \
                 shutting down): send the request again later, with a key so that it starts \
                 one saga however often it is sent",
            )
        }
        e => {
            error!(saga.id = %id, error = %e, "start request failed");
            StartRefusal::new(
                wire::START_INTERNAL,
                format!("the orchestrator failed to start saga {id}: see its log"),
            )
        }
    }
}
