//! The intake: replies and operator requests read from the bus and applied to their
//! sagas.
//!
//! Each message is checked before anything is read from the store (size limits, then a
//! reply's subject and token, or a request's subject, signature and expiry), decoded,
//! delivered to its saga's actor, and settled only once the transition is committed:
//! acknowledged, redelivered later, or dead-lettered as poison with the reason. One
//! ladder ([`verdict`]) decides that for replies and requests alike from the error's
//! [`Disposition`]. Memory is bounded by `max_in_flight_replies` messages and
//! `max_in_flight_bytes` bytes.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, warn};

use super::deliver;
use super::options::RuntimeOptions;
use super::outbox::poison_announcement;
use crate::actors::{Applied, Registry, RuntimeStats, Shared, publish_outbox};
use crate::error::{Disposition, RuntimeError, report_fatal};
use crate::ids::{SagaId, SagaType};
use crate::machine::{Input, Timestamp};
use crate::ports::{Acker, DeadLetterCategory, DeadLetterRecord, Delivery, Message, StoreError};
use crate::wire::{self, Outcome};

/// Which consumer an inbound message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Inbound {
    /// A participant's reply (`skald.reply.<service>.<type>.<partition>`).
    Reply,
    /// An operator's request (`skald.op.<type>.<partition>`).
    Request,
}

/// Unsettled operator requests per consumer: they are rare, and one at a time per saga.
pub(super) const OP_PENDING: usize = 16;

/// The furthest ahead an operator request may expire: a request that claims to live
/// longer is refused, so no request can be replayed for days.
pub const MAX_REQUEST_TTL: Duration = Duration::from_secs(3600);

/// How long a reply of a partition this node does not hold waits before the broker
/// delivers it again: short (the new holder should have it at once), not zero (a
/// consumer read by two builds at once must not spin it).
const NOT_HELD_DELAY: Duration = Duration::from_millis(50);

/// How often a message waiting for capacity tells the broker it is still being worked
/// on (well inside JetStream's default 30 s ack wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The durable consumer the replies of saga type `ty` are read with.
pub(crate) fn reply_consumer(group: &str, ty: &SagaType) -> String {
    format!("{group}-{ty}")
}

/// The durable consumer the operator requests about saga type `ty` are read with.
pub(crate) fn op_consumer(group: &str, ty: &SagaType) -> String {
    format!("{group}-op-{ty}")
}

/// The bytes a message holds in memory (subject, headers, body).
fn message_size(m: &Message) -> usize {
    m.subject.len()
        + m.payload.len()
        + m.headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
}

/// Refuses a message past the configured limits, with the reason.
fn check_limits(o: &RuntimeOptions, m: &Message) -> Result<(), String> {
    wire::InboundLimits {
        max_headers: o.max_headers,
        max_header_bytes: o.max_header_bytes,
        max_message_bytes: o.max_message_bytes,
    }
    .check(m)
}

/// Waits for `n` permits of `limit`, telling the broker every [`PROGRESS_EVERY`] that
/// `delivery` is still being worked on, so it is not redelivered meanwhile. `None` once
/// the semaphore is closed.
async fn acquire(
    limit: &Arc<Semaphore>,
    n: u32,
    delivery: &Delivery,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let wait = Arc::clone(limit).acquire_many_owned(n);
    tokio::pin!(wait);
    loop {
        match tokio::time::timeout(PROGRESS_EVERY, &mut wait).await {
            Ok(permit) => return permit.ok(),
            Err(_) => {
                if let Err(e) = delivery.progress().await {
                    debug!(error = %e, "telling the broker a message waits failed");
                }
            }
        }
    }
}

/// Reads replies and operator requests and feeds them to their sagas: check, decode,
/// deliver, then acknowledge only once the transition is committed. What can never be
/// applied is dead-lettered with the reason. At most `max_in_flight_replies` messages
/// and `max_in_flight_bytes` bytes are held at once.
pub(super) async fn intake(
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    mut inbound: impl futures_util::Stream<Item = (Inbound, Delivery)> + Unpin,
) {
    let o = &shared.options;
    let count = Arc::new(Semaphore::new(o.max_in_flight_replies.max(1)));
    let max_bytes = o.max_in_flight_bytes.clamp(1, u32::MAX as usize);
    let bytes = Arc::new(Semaphore::new(max_bytes));
    let leased = shared.ownership.mode() == crate::partitions::Mode::Leased;
    // A reply of a partition this node does not hold (handed over since it was
    // received) goes back to the broker, unapplied, for the partition's holder; one
    // being applied holds a handover until it is settled.
    let not_held = |delivery: Delivery| {
        RuntimeStats::incr(&shared.stats.deferred);
        let (_, _, acker) = delivery.into_parts();
        tokio::spawn(async move { settle(acker.nak(NOT_HELD_DELAY).await) });
    };
    while let Some((kind, mut delivery)) = inbound.next().await {
        let partition = match wire::reply_subject_parts(&delivery.message.subject) {
            Some((_, _, p)) if leased && kind == Inbound::Reply => Some(p),
            _ => None,
        };
        if partition.is_some_and(|p| !shared.ownership.holds(p)) {
            not_held(delivery);
            continue;
        }
        // Past the limits: only a capped copy of the body is kept (for the dead
        // letter), so an oversized message holds neither memory nor the byte budget.
        let oversized = check_limits(o, &delivery.message).err().map(|reason| {
            let body = &delivery.message.payload;
            let (len, keep) = (body.len(), body.len().min(crate::ports::RECORD_MAX_BODY));
            delivery.message.payload = bytes::Bytes::copy_from_slice(&body[..keep]);
            (reason, len)
        });
        // A message larger than the whole budget takes all of it (the limits refuse
        // one unless the budget is below the message limit).
        let size = message_size(&delivery.message).clamp(1, max_bytes) as u32;
        let Some(one) = acquire(&count, 1, &delivery).await else {
            break;
        };
        let Some(held) = acquire(&bytes, size, &delivery).await else {
            break;
        };
        // Counted from here (not while it waited for capacity: a handover does not
        // wait for it), and checked again: handed over while it waited, it goes back.
        let applying = partition.map(|p| shared.ownership.applying(p));
        if partition.is_some_and(|p| !shared.ownership.holds(p)) {
            not_held(delivery);
            drop((one, held, applying));
            continue;
        }
        let shared = Arc::clone(&shared);
        let registry = registry.clone();
        tokio::spawn(async move {
            handle_inbound(&shared, &registry, kind, delivery, oversized).await;
            drop((one, held, applying));
        });
    }
    debug!("reply intake stopped");
}

async fn handle_inbound(
    shared: &Arc<Shared>,
    registry: &Addr<Registry>,
    kind: Inbound,
    delivery: Delivery,
    oversized: Option<(String, usize)>,
) {
    let (message, delivery_count, acker) = delivery.into_parts();
    if let Some((reason, body_bytes)) = oversized {
        let count = delivery_count;
        return poison_sized(shared, &message, body_bytes, count, acker, None, reason).await;
    }
    match kind {
        Inbound::Reply => handle_reply(shared, registry, message, delivery_count, acker).await,
        Inbound::Request => {
            handle_operator_request(shared, registry, message, delivery_count, acker).await
        }
    }
}

/// Why a reply is not one skald asked for: its subject is not the service's its step
/// commands, or its token does not verify (`Err(Some(reason))`, the reason starting
/// with `forged reply:`), or it is of a saga type this process does not run
/// (`Err(None)`). Checked before anything is read from the store.
fn check_reply(
    shared: &Shared,
    subject: &str,
    reply: &wire::Envelope,
    token: Option<&str>,
) -> Result<(), Option<String>> {
    let Some((service, ty, partition)) = wire::reply_subject_parts(subject) else {
        return Err(Some(format!(
            "forged reply: subject {:?} is not skald.reply.<service>.<saga_type>.<partition>",
            crate::ports::cap(subject, 128)
        )));
    };
    if ty != reply.saga_type.as_str() {
        return Err(Some(format!(
            "forged reply: it names saga type {} but arrived on the subject of saga type {ty}",
            reply.saga_type
        )));
    }
    // The reply subject names the saga's partition (or 0: commands stored before
    // partitions): a reply moved to another partition's subject would be applied by a
    // node that does not hold its saga.
    let own = shared.ownership.partition_of(&reply.saga_id);
    if partition != own && partition != wire::DEFAULT_PARTITION {
        return Err(Some(format!(
            "forged reply: saga {} is in partition {own}, but the reply arrived on the \
             subject of partition {partition}",
            reply.saga_id
        )));
    }
    if !shared.definitions.contains_type(&reply.saga_type) {
        return Err(None);
    }
    // The services the step's command goes to in any registered version (a definition
    // may move a step to another service between versions).
    let services: Vec<&str> = shared
        .definitions
        .pairs()
        .iter()
        .filter(|(t, _)| *t == reply.saga_type)
        .filter_map(|(t, v)| shared.definitions.get(t, *v))
        .filter_map(|d| d.steps().iter().find(|s| *s.name() == reply.step))
        .filter_map(|s| match reply.kind {
            crate::ids::CommandKind::Action => Some(s.action().subject()),
            crate::ids::CommandKind::Compensation => s.compensation().map(|c| c.subject()),
        })
        .map(crate::ids::service_of)
        .collect();
    // (A step no registered version has is refused by the machine as unknown, once
    // the token shows skald sent it.)
    if let Some(expected) = services.first()
        && !services.contains(&service)
    {
        return Err(Some(format!(
            "forged reply: the {} of step {} goes to service {expected}, but the reply \
             arrived on the reply subject of service {service}",
            reply.kind, reply.step
        )));
    }
    shared
        .reply_keys
        .verify(reply, token)
        .map_err(|reason| Some(format!("forged reply: {reason}")))
}

async fn handle_reply(
    shared: &Arc<Shared>,
    registry: &Addr<Registry>,
    message: Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
) {
    if wire::is_operator_request(&message) {
        let reason = format!(
            "an operator request on a reply subject: operator requests are read from \
             skald.op.<saga_type>.<partition> only (header {})",
            wire::H_OPERATOR_ACTION
        );
        return poison(shared, &message, delivery_count, acker, None, reason).await;
    }
    // Where it came from first, from the headers alone: a forged reply's body is never
    // parsed.
    let (head, token) = match wire::decode_reply_head(&message) {
        Ok(h) => h,
        Err(e) => {
            return poison(shared, &message, delivery_count, acker, None, e.to_string()).await;
        }
    };
    match check_reply(shared, &message.subject, &head, token.as_deref()) {
        Ok(()) => {}
        // Not a type this process runs (a bus without per-type consumers handed it
        // over): left for the process that runs it, never dead-lettered for it.
        Err(None) => {
            RuntimeStats::incr(&shared.stats.deferred);
            let delay = backoff(shared.options.redelivery_delay, delivery_count);
            return settle(acker.nak(delay).await);
        }
        // Filed under no saga: the sender chose the saga id.
        Err(Some(reason)) => {
            RuntimeStats::incr(&shared.stats.forged);
            return poison(shared, &message, delivery_count, acker, None, reason).await;
        }
    }
    let reply = match wire::decode_reply(&message) {
        Ok(r) => r,
        Err(e) => {
            let saga = Some(head.saga_id);
            return poison(shared, &message, delivery_count, acker, saga, e.to_string()).await;
        }
    };
    // The inbox id comes from the verified headers, not from the sender's Nats-Msg-Id.
    let inbox = Some(crate::ids::reply_message_id(
        &reply.idempotency_key,
        reply.attempt,
        reply.outcome.as_str(),
    ));
    let span = crate::trace::reply_span(&reply, &message);
    let retryable = matches!(reply.outcome, Outcome::Retryable(_));
    let input = match reply.outcome {
        Outcome::Success(output) => Input::StepSucceeded {
            step: reply.step,
            kind: reply.kind,
            attempt: reply.attempt,
            output,
        },
        Outcome::Failure(error) | Outcome::Retryable(error) => Input::StepFailed {
            retryable,
            step: reply.step,
            kind: reply.kind,
            attempt: reply.attempt,
            error,
            jitter: shared.jitter.draw(),
        },
    };
    let result = deliver(registry, reply.saga_id, None, input, inbox, None)
        .instrument(span)
        .await;
    let saga_id = reply.saga_id;
    settle_delivery(
        shared,
        &message,
        delivery_count,
        acker,
        saga_id,
        result,
        Source::Reply,
    )
    .await
}

/// Who sent an operator request: the allowlist's name for the key that signed it, or,
/// with no allowlist, the name the request claims (the broker's permission on
/// `skald.op.>` is then the only check). Refused with the reason otherwise.
fn verify_operator(o: &RuntimeOptions, r: &wire::OperatorRequest) -> Result<(), String> {
    if o.operators.is_empty() {
        return Ok(());
    }
    let (Some(key), Some(signature)) = (&r.key, &r.signature) else {
        return Err(format!(
            "unsigned: this runtime applies only requests signed by a listed operator key \
             ({} and {})",
            wire::H_OPERATOR_KEY,
            wire::H_SIGNATURE
        ));
    };
    let Some((name, _)) = o.operators.iter().find(|(_, k)| *k == key) else {
        return Err(format!(
            "operator key {} is not in this runtime's allowlist",
            crate::ports::cap(key, 64)
        ));
    };
    crate::auth::verify_signature(key, &wire::operator_signing_bytes(r), signature)?;
    // The name in the request id (the journal's causation) is the listed one.
    if r.operator != wire::operator_name(name)
        || !r
            .request_id
            .starts_with(&crate::ids::operator_request_prefix(&wire::operator_name(
                name,
            )))
    {
        return Err(format!(
            "signed by operator {name}, but the request names operator {:?}",
            r.operator
        ));
    }
    Ok(())
}

/// The reason an operator request is dead-lettered with.
fn refused(request_id: &str, reason: impl std::fmt::Display) -> String {
    format!("operator request {request_id} refused: {reason}")
}

/// Applies an operator's request (`skald dlq redrive`, `skald cancel`) through the saga's
/// actor like a reply: journaled with the request id as causation, deduplicated by the
/// inbox. A request whose sender cannot be verified never reaches the saga (it is
/// dead-lettered); one that expired or whose condition does not hold, or that the saga
/// refuses (not dead-lettered, already finished), is journaled as ignored, with the
/// reason, for the operator's tool to report.
async fn handle_operator_request(
    shared: &Arc<Shared>,
    registry: &Addr<Registry>,
    message: Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
) {
    let request = match wire::decode_operator_request(&message) {
        Ok(r) => r,
        Err(e) => {
            return poison(shared, &message, delivery_count, acker, None, e.to_string()).await;
        }
    };
    let (saga_id, request_id) = (request.saga_id, request.request_id.clone());
    let expires_at = Timestamp(request.expires_at_ms);
    let mut tokens = message.subject.split('.');
    let subject_type = match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some("skald"), Some("op"), Some(ty), Some(p))
            if tokens.next().is_none() && p.parse::<u32>().is_ok() =>
        {
            Some(ty)
        }
        _ => None,
    };
    if subject_type != Some(request.saga_type.as_str()) {
        let reason = refused(
            &request_id,
            format_args!(
                "it names saga type {} but arrived on {:?}",
                request.saga_type,
                crate::ports::cap(&message.subject, 128)
            ),
        );
        return poison(shared, &message, delivery_count, acker, None, reason).await;
    }
    // Refusals of a request whose sender is not verified are filed under no saga: the
    // sender chose the saga id.
    if let Err(reason) = verify_operator(&shared.options, &request) {
        RuntimeStats::incr(&shared.stats.forged);
        let reason = refused(&request_id, reason);
        return poison(shared, &message, delivery_count, acker, None, reason).await;
    }
    let now = shared.clock.now();
    let latest = now.plus(MAX_REQUEST_TTL).as_millis();
    if request.expires_at_ms > latest {
        let reason = refused(
            &request_id,
            format_args!(
                "it expires at {} ms, more than {} s ahead",
                request.expires_at_ms,
                MAX_REQUEST_TTL.as_secs()
            ),
        );
        let saga = Some(saga_id);
        return poison(shared, &message, delivery_count, acker, saga, reason).await;
    }
    let condition = crate::actors::Condition {
        expires_at,
        if_redrives: request.if_redrives,
        if_version: request.if_version,
    };
    let input = match request.action {
        wire::OperatorAction::Redrive => Input::Redriven,
        wire::OperatorAction::Cancel { reason } => Input::CancelRequested { reason },
    };
    // The request's id keys the inbox: a request sent twice is applied once.
    let inbox = Some(request_id.clone());
    let result = deliver(registry, saga_id, None, input, inbox, Some(condition)).await;
    if let Ok(applied) = &result {
        info!(saga.id = %saga_id, request = %request_id, ?applied, "operator request settled");
    }
    let source = Source::Request {
        id: &request_id,
        expires_at,
    };
    settle_delivery(
        shared,
        &message,
        delivery_count,
        acker,
        saga_id,
        result,
        source,
    )
    .await
}

/// Where a delivered message came from: the wording of its logs and dead letter, and
/// the one rule only requests have (they expire).
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// A participant's reply.
    Reply,
    /// An operator's request.
    Request {
        /// The request id (`op:<operator>:...`).
        id: &'a str,
        /// Past this, no build may apply it.
        expires_at: Timestamp,
    },
}

impl Source<'_> {
    fn what(&self) -> &'static str {
        match self {
            Source::Reply => "reply",
            Source::Request { .. } => "operator request",
        }
    }
}

/// Why a message is redelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redelivery {
    /// The store is down or busy (never counted against `max_deliveries`).
    StoreOutage,
    /// Version skew: another build must apply it (counted against `max_deferrals`).
    Deferred,
    /// A transient failure (counted against `max_deliveries`).
    Retry,
}

/// What to do with a delivered message that was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Not applied yet: deliver it again after `delay`.
    Redeliver {
        /// The backoff for this delivery.
        delay: Duration,
        /// Why.
        why: Redelivery,
    },
    /// Never to be applied: dead-letter it with the reason and terminate it.
    DeadLetter(String),
}

/// The disposition ladder, for replies and operator requests alike: the error applying
/// a message gave, and how often it was delivered, decide whether it is redelivered or
/// dead-lettered. `now` is compared with a request's expiry.
fn verdict(
    o: &RuntimeOptions,
    e: &RuntimeError,
    delivery_count: u32,
    source: Source<'_>,
    now: Timestamp,
) -> Verdict {
    let redeliver = |why| Verdict::Redeliver {
        delay: backoff(o.redelivery_delay, delivery_count),
        why,
    };
    match (e.disposition(), source) {
        // The store is down or busy: keep the message for as long as that lasts (not
        // counted against max_deliveries), backing off.
        (Disposition::Retry, _) if is_store_outage(e) => redeliver(Redelivery::StoreOutage),
        // Expired, and this build cannot run the saga (version skew): no build may
        // apply it any more, so it is not left to another one.
        (Disposition::Defer, Source::Request { id, expires_at }) if now > expires_at => {
            Verdict::DeadLetter(refused(
                id,
                format_args!("it expired, and this build cannot run the saga: {e}"),
            ))
        }
        // Version skew: a newer (or older) build beside this one must apply it. Never
        // counted against max_deliveries; dead-lettered only past max_deferrals.
        (Disposition::Defer, _) if delivery_count < o.max_deferrals => {
            redeliver(Redelivery::Deferred)
        }
        (Disposition::Retry, _) if delivery_count < o.max_deliveries => {
            redeliver(Redelivery::Retry)
        }
        (Disposition::Retry, _) => Verdict::DeadLetter(format!(
            "not applied after {delivery_count} deliveries: {e}"
        )),
        (Disposition::Defer, _) => Verdict::DeadLetter(format!(
            "not applied after {delivery_count} deliveries (max_deferrals), the last \
             deferred for version skew: no build running applied it: {e}"
        )),
        (Disposition::DeadLetter | Disposition::Refuse, _) => Verdict::DeadLetter(e.to_string()),
    }
}

/// Acknowledges, redelivers, defers or dead-letters a message by what applying it gave
/// ([`verdict`]).
async fn settle_delivery(
    shared: &Arc<Shared>,
    message: &Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
    saga_id: SagaId,
    result: Result<Applied, RuntimeError>,
    source: Source<'_>,
) {
    let what = source.what();
    let e = match result {
        Ok(applied) => {
            debug!(saga.id = %saga_id, ?applied, "{what} applied");
            return settle(acker.ack().await);
        }
        Err(e) => e,
    };
    let now = shared.clock.now();
    match verdict(&shared.options, &e, delivery_count, source, now) {
        Verdict::Redeliver { delay, why } => {
            match why {
                Redelivery::StoreOutage => {
                    if let RuntimeError::Store(err) = &e {
                        report_fatal(&shared.fatal, err);
                    }
                    warn!(saga.id = %saga_id, error = %e, delay_ms = delay.as_millis() as u64, "store unavailable; {what} redelivered later");
                }
                Redelivery::Deferred => {
                    // (The actor counted a deferral for data too new already.)
                    if !matches!(e, RuntimeError::DataTooNew(_)) {
                        RuntimeStats::incr(&shared.stats.deferred);
                    }
                    debug!(saga.id = %saga_id, error = %e, delay_ms = delay.as_millis() as u64, "{what} deferred to another build");
                }
                Redelivery::Retry => {
                    warn!(saga.id = %saga_id, error = %e, "{what} not applied; redelivering later");
                }
            }
            settle(acker.nak(delay).await)
        }
        Verdict::DeadLetter(reason) => {
            poison(
                shared,
                message,
                delivery_count,
                acker,
                Some(saga_id),
                reason,
            )
            .await
        }
    }
}

/// A store outage (or a fatal schema problem, which stops the process): never a reason
/// to give a message up.
fn is_store_outage(e: &RuntimeError) -> bool {
    matches!(
        e,
        RuntimeError::Store(StoreError::Unavailable(_) | StoreError::Schema(_))
    )
}

/// `base * 2^(n-1)`, at most 30 s.
fn backoff(base: Duration, delivery_count: u32) -> Duration {
    let exp = delivery_count.saturating_sub(1).min(8);
    (base * (1u32 << exp)).min(Duration::from_secs(30))
}

fn settle(result: Result<(), crate::ports::BusError>) {
    if let Err(e) = result {
        // The broker redelivers an unacknowledged message; the inbox/idempotency makes
        // that harmless.
        warn!(error = %e, "acknowledging a reply failed");
    }
}

/// Dead-letters a message that can never be processed, then terminates it.
async fn poison(
    shared: &Arc<Shared>,
    message: &Message,
    delivery_count: u32,
    acker: Box<dyn Acker>,
    saga_id: Option<SagaId>,
    reason: String,
) {
    let body_bytes = message.payload.len();
    poison_sized(
        shared,
        message,
        body_bytes,
        delivery_count,
        acker,
        saga_id,
        reason,
    )
    .await
}

/// [`poison`] of a message whose body had `body_bytes` bytes before the intake cut it.
async fn poison_sized(
    shared: &Arc<Shared>,
    message: &Message,
    body_bytes: usize,
    delivery_count: u32,
    acker: Box<dyn Acker>,
    saga_id: Option<SagaId>,
    reason: String,
) {
    // The reason may quote what the sender wrote: keep it short.
    let reason = crate::ports::cap(&reason, 2048).to_owned();
    RuntimeStats::incr(&shared.stats.poison);
    warn!(subject = %message.subject, reason, "poison message dead-lettered");
    let record = DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: DeadLetterCategory::Poison,
        saga_id,
        // Only what parses as a type or step name: these fields are not capped.
        saga_type: message
            .headers
            .get(wire::H_SAGA_TYPE)
            .filter(|t| SagaType::new(*t).is_ok())
            .map(str::to_owned),
        step: message
            .headers
            .get(wire::H_STEP)
            .filter(|s| crate::ids::StepName::new(*s).is_ok())
            .map(str::to_owned),
        kind: message
            .headers
            .get(wire::H_KIND)
            .and_then(|k| k.parse().ok()),
        reason: reason.clone(),
        attempts: delivery_count,
        message: Some(message.to_record_of(body_bytes)),
        at: shared.clock.now(),
        resolved_at: None,
    };
    // Also on the bus, for whoever watches dead letters: through the outbox, so the
    // announcement is as durable as the record.
    let outbox: Vec<_> = poison_announcement(&record, shared.options.claim_lease)
        .into_iter()
        .collect();
    let mut recorded = shared.store.record_poison(&record, &outbox).await;
    if let Err(e) = &recorded
        && !e.is_retryable()
        && !matches!(e, StoreError::Schema(_))
    {
        // The store refuses the raw message (say, bytes it cannot hold as text): keep
        // the record without it rather than redeliver the message forever.
        let mut bare = record.clone();
        bare.message = None;
        bare.reason = format!("{} (the raw message could not be stored: {e})", bare.reason);
        recorded = shared.store.record_poison(&bare, &outbox).await;
    }
    match recorded {
        Ok(()) => {
            publish_outbox(shared, outbox).await;
            settle(acker.term(&reason).await)
        }
        Err(e) => {
            report_fatal(&shared.fatal, &e);
            // Not recorded: keep the message (redeliver) rather than lose it.
            let delay = backoff(shared.options.redelivery_delay, delivery_count);
            warn!(error = %e, "recording a poison message failed; redelivering later");
            settle(acker.nak(delay).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> RuntimeOptions {
        RuntimeOptions {
            redelivery_delay: Duration::from_millis(100),
            max_deliveries: 3,
            max_deferrals: 5,
            ..RuntimeOptions::default()
        }
    }

    const NOW: Timestamp = Timestamp(1_000_000);

    fn too_new() -> RuntimeError {
        RuntimeError::DataTooNew("written by a newer build".into())
    }

    #[test]
    fn a_store_outage_is_redelivered_past_max_deliveries() {
        let down = RuntimeError::Store(StoreError::Unavailable("down".into()));
        assert_eq!(
            verdict(&options(), &down, 50, Source::Reply, NOW),
            Verdict::Redeliver {
                delay: Duration::from_millis(100 * 256),
                why: Redelivery::StoreOutage
            }
        );
    }

    #[test]
    fn a_transient_failure_is_dead_lettered_after_max_deliveries() {
        let gone = RuntimeError::ShuttingDown;
        assert_eq!(
            verdict(&options(), &gone, 2, Source::Reply, NOW),
            Verdict::Redeliver {
                delay: Duration::from_millis(200),
                why: Redelivery::Retry
            }
        );
        let Verdict::DeadLetter(reason) = verdict(&options(), &gone, 3, Source::Reply, NOW) else {
            panic!("dead-lettered after max_deliveries");
        };
        assert!(
            reason.starts_with("not applied after 3 deliveries"),
            "{reason}"
        );
    }

    #[test]
    fn version_skew_is_deferred_until_max_deferrals() {
        let skew = too_new();
        assert!(matches!(
            verdict(&options(), &skew, 4, Source::Reply, NOW),
            Verdict::Redeliver {
                why: Redelivery::Deferred,
                ..
            }
        ));
        let Verdict::DeadLetter(reason) = verdict(&options(), &skew, 5, Source::Reply, NOW) else {
            panic!("dead-lettered after max_deferrals");
        };
        assert!(reason.contains("max_deferrals"), "{reason}");
    }

    #[test]
    fn an_expired_request_this_build_cannot_run_is_dead_lettered_at_once() {
        let skew = too_new();
        let live = Source::Request {
            id: "op:alice:1",
            expires_at: NOW,
        };
        assert!(matches!(
            verdict(&options(), &skew, 1, live, NOW),
            Verdict::Redeliver { .. }
        ));
        let Verdict::DeadLetter(reason) = verdict(&options(), &skew, 1, live, Timestamp(NOW.0 + 1))
        else {
            panic!("an expired request is not deferred");
        };
        assert!(
            reason.starts_with("operator request op:alice:1 refused: it expired"),
            "{reason}"
        );
        // A reply has no expiry: deferred as before.
        assert!(matches!(
            verdict(&options(), &skew, 1, Source::Reply, Timestamp(NOW.0 + 1)),
            Verdict::Redeliver { .. }
        ));
    }

    #[test]
    fn a_refused_or_poison_input_is_dead_lettered_with_the_error() {
        let unknown = RuntimeError::UnknownSaga(SagaId::new());
        let Verdict::DeadLetter(reason) = verdict(&options(), &unknown, 1, Source::Reply, NOW)
        else {
            panic!("dead-lettered");
        };
        assert!(reason.starts_with("unknown saga"), "{reason}");
    }
}
