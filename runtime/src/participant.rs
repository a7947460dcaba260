//! A helper to write participant services in Rust: subscribe to commands on a durable
//! consumer group (replicas share the work), decode the payload, call a handler, publish
//! its outcome with the right headers, then acknowledge.
//!
//! Commands are delivered at least once, every retry of a step carries the same
//! idempotency key, and a compensation may overtake the action it undoes. Give
//! [`ParticipantOptions::fence`] a [`Fence`] (the TCC fence, see [`fence`]) and the
//! helper keeps its rules around the handler:
//!
//! - an action is claimed atomically before its handler runs: a key with a final outcome
//!   is answered with it, a key being handled elsewhere is not answered yet (the broker
//!   redelivers the command later), a key whose compensation came first
//!   is refused (`compensated`);
//! - a compensation of an action that never took effect is answered success without
//!   calling the handler, and leaves a tombstone that refuses the action if it comes
//!   later; a compensation of a succeeded action calls the handler, which reads the
//!   action's recorded output with [`action_output`];
//! - every `retryable` answer is remembered for its attempt, which gets it again;
//! - a command whose `Skald-Deadline` passed before its handler would start is answered
//!   `retryable`, code `deadline_passed`, without calling the handler;
//! - the fence being unreachable leaves the command unacknowledged: it is redelivered.
//!
//! Without a fence, the handler itself must be idempotent per key and cope with a
//! compensation arriving first.

pub mod fence;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::field::Empty;
use tracing::{Instrument, debug, info_span, warn};

pub use self::fence::{
    ActionClaim, CompensationClaim, DEFAULT_LEASE, Fence, FenceError, FenceRecord, MemoryFence,
};
use crate::ids::CommandKind;
use crate::machine::StepError;
use crate::ports::{Bus, BusError, Clock, Delivery, SystemClock};
use crate::trace::TraceContext;
use crate::wire::{self, IncomingCommand, Outcome};

/// The code of the `retryable` answer to a command whose deadline passed before its
/// handler would start.
pub const DEADLINE_PASSED_CODE: &str = "deadline_passed";

tokio::task_local! {
    /// The recorded output of the action a compensation handler undoes.
    static ACTION_OUTPUT: Option<Value>;
}

/// In a compensation handler called by the helper with a fence: the recorded success
/// output of the action it undoes (say the `payment_id` a refund needs).
///
/// `None` outside such a handler, without a fence, and when the action's outcome is
/// unknown: its claim's lease passed while it was running (a crashed or stuck replica),
/// so it may or may not have taken effect: undo by action key
/// ([`IncomingCommand::action_key`]), and succeed when there is nothing to undo.
///
/// A task-local: read it in the handler (before or after an `.await`), not in a task
/// the handler spawns.
pub fn action_output() -> Option<Value> {
    ACTION_OUTPUT.try_with(Clone::clone).ok().flatten()
}

/// How a participant consumes.
#[derive(Clone, Default)]
pub struct ParticipantOptions {
    /// Commands handled at once (default 64).
    pub concurrency: Option<usize>,
    /// The TCC fence kept around the handler (see the module documentation): a durable
    /// one (`skald-adapters`' SQLite or PostgreSQL fence) when the participant has
    /// replicas or its effects outlive the process; [`MemoryFence`] otherwise. `None`:
    /// every delivery calls the handler.
    pub fence: Option<Arc<dyn Fence>>,
    /// The command schema versions (`Skald-Schema-Version`) this participant reads;
    /// another is answered with a permanent `unsupported_schema_version` failure naming
    /// it, without calling the handler (nor consulting the fence). `None` (the default)
    /// accepts every version.
    pub accept_versions: Option<Vec<u32>>,
    /// A simulation hook: how long to hold back the answer to a command (`None`: reply
    /// at once). Asked when the command arrives; the effect is applied (or the fence
    /// consulted) at once, and the reply published and the command acknowledged only
    /// once that time has passed, without holding one of the `concurrency` slots. Used
    /// to play a participant whose answers are late (skald times the step out and
    /// compensates it while it has in fact been applied).
    pub hold_reply: Option<HoldReply>,
    /// The clock a command's `Skald-Deadline` is compared with (default: the system
    /// clock; skald's deadlines are its wall clock). A command whose deadline has passed
    /// before its handler would start is answered `retryable`, code `deadline_passed`,
    /// without calling the handler (skald has stopped waiting for that attempt and sends
    /// another); with a fence, that answer is remembered for the attempt.
    pub clock: Option<Arc<dyn Clock>>,
    /// Size limits on a command, checked before it is decoded; one past them is
    /// terminated (it is not skald's). Default: [`wire::InboundLimits::default`].
    pub limits: wire::InboundLimits,
}

/// See [`ParticipantOptions::hold_reply`].
pub type HoldReply = Arc<dyn Fn(&IncomingCommand) -> Option<Duration> + Send + Sync>;

impl std::fmt::Debug for ParticipantOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantOptions")
            .field("concurrency", &self.concurrency)
            .field("fence", &self.fence.is_some())
            .field("accept_versions", &self.accept_versions)
            .field("hold_reply", &self.hold_reply.is_some())
            .field("clock", &self.clock)
            .field("limits", &self.limits)
            .finish()
    }
}

/// A running participant; dropping it (or [`ParticipantHandle::stop`]) stops it.
#[derive(Debug)]
pub struct ParticipantHandle {
    task: JoinHandle<()>,
}

impl ParticipantHandle {
    /// Stops consuming. Commands not yet acknowledged are redelivered by a durable bus.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for ParticipantHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves commands on `subject` (e.g. `skald.cmd.payment.>`) in consumer group `group`,
/// at most `concurrency` at a time. See [`serve_with`].
pub async fn serve<H, F>(
    bus: Arc<dyn Bus>,
    subject: &str,
    group: &str,
    concurrency: usize,
    handler: H,
) -> Result<ParticipantHandle, BusError>
where
    H: Fn(IncomingCommand) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    let options = ParticipantOptions {
        concurrency: Some(concurrency),
        ..ParticipantOptions::default()
    };
    serve_with(bus, subject, group, options, handler).await
}

/// Serves commands on `subject` in consumer group `group`.
///
/// A command that cannot be decoded is terminated (there is nowhere to reply) and
/// logged; a reply that cannot be published is not acknowledged, so the command comes
/// again.
pub async fn serve_with<H, F>(
    bus: Arc<dyn Bus>,
    subject: &str,
    group: &str,
    options: ParticipantOptions,
    handler: H,
) -> Result<ParticipantHandle, BusError>
where
    H: Fn(IncomingCommand) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    let mut sub = bus.subscribe(&[subject.to_owned()], group).await?;
    let handler = Arc::new(handler);
    let limit = Arc::new(Semaphore::new(options.concurrency.unwrap_or(64).max(1)));
    let setup = Arc::new(Setup {
        fence: options.fence,
        accept: options.accept_versions.map(Into::into),
        hold_reply: options.hold_reply,
        clock: options.clock.unwrap_or_else(|| Arc::new(SystemClock)),
        metrics: crate::metrics::ParticipantMetrics::new(group),
        limits: options.limits,
    });
    let task = tokio::spawn(async move {
        while let Some(delivery) = sub.next().await {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                break;
            };
            let bus = Arc::clone(&bus);
            let handler = Arc::clone(&handler);
            let setup = Arc::clone(&setup);
            tokio::spawn(async move {
                handle(bus, delivery, handler.as_ref(), &setup, permit).await;
            });
        }
    });
    Ok(ParticipantHandle { task })
}

/// Adapts a handler of typed payloads: the command's JSON is decoded as `P`; a payload
/// that does not decode is answered with a permanent `bad_request` failure naming the
/// serde error.
pub fn typed<P, H, F>(
    handler: H,
) -> impl Fn(IncomingCommand) -> futures_util::future::BoxFuture<'static, Outcome> + Send + Sync + 'static
where
    P: DeserializeOwned + Send + 'static,
    H: Fn(IncomingCommand, P) -> F + Send + Sync + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    let handler = Arc::new(handler);
    move |cmd: IncomingCommand| {
        let handler = Arc::clone(&handler);
        Box::pin(async move {
            match P::deserialize(&cmd.payload) {
                Ok(payload) => handler(cmd, payload).await,
                Err(e) => failure(
                    "bad_request",
                    format!("payload of {} does not decode: {e}", cmd.subject),
                ),
            }
        })
    }
}

/// What every command of one participant is handled with.
struct Setup {
    fence: Option<Arc<dyn Fence>>,
    accept: Option<Arc<[u32]>>,
    hold_reply: Option<HoldReply>,
    clock: Arc<dyn Clock>,
    metrics: crate::metrics::ParticipantMetrics,
    limits: wire::InboundLimits,
}

async fn handle<H, F>(
    bus: Arc<dyn Bus>,
    delivery: Delivery,
    handler: &H,
    setup: &Setup,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    H: Fn(IncomingCommand) -> F,
    F: Future<Output = Outcome>,
{
    let received = std::time::Instant::now();
    let (message, _, acker) = delivery.into_parts();
    // Past the limits: the body is not decoded. When the headers say who to answer,
    // the command is answered with a permanent failure (it was not applied), so the
    // saga learns why instead of timing out; otherwise it is terminated.
    if let Err(reason) = setup.limits.check(&message) {
        match wire::decode_command_head(&message) {
            Ok(command) => {
                warn!(subject = %message.subject, reason, "oversized command refused");
                let refusal =
                    Outcome::Failure(crate::machine::StepError::new("oversized_command", reason));
                match bus.publish(wire::encode_reply(&command, &refusal)).await {
                    Ok(()) => settle(acker.ack().await),
                    Err(e) => {
                        warn!(error = %e, "publishing a refusal failed; redelivering later");
                        settle(acker.nak(Duration::from_secs(1)).await)
                    }
                }
            }
            Err(_) => {
                warn!(subject = %message.subject, reason, "oversized command terminated");
                settle(acker.term(&reason).await);
            }
        }
        return;
    }
    let command = match wire::decode_command(&message) {
        Ok(c) => c,
        Err(e) => {
            warn!(subject = %message.subject, error = %e, "undecodable command terminated");
            settle(acker.term(&e.to_string()).await);
            return;
        }
    };
    // One span per command handled, in the saga's trace: a child of the step span that
    // sent the command, with the id the reply's traceparent names (see
    // `wire::reply_traceparent`).
    let span = info_span!(
        "participant",
        saga.id = %command.envelope.saga_id,
        saga.r#type = %command.envelope.saga_type,
        saga.step = %command.envelope.step,
        step.kind = %command.envelope.kind,
        step.attempt = command.envelope.attempt,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
    );
    if let (Some(parent), Some(own)) = (
        command
            .traceparent
            .as_deref()
            .and_then(|tp| TraceContext::parse(tp).ok()),
        wire::reply_traceparent(&command),
    ) {
        crate::trace::annotate(&span, &own, Some(&parent));
    }
    let hold_until = setup
        .hold_reply
        .as_ref()
        .and_then(|hold| hold(&command))
        .map(|d| tokio::time::Instant::now() + d);
    async move {
        let outcome = match refuse_version(&command, setup.accept.as_deref()) {
            Some(refusal) => refusal,
            None => match setup.fence.as_deref() {
                None => match past_deadline(&command, setup.clock.as_ref()) {
                    Some(late) => Outcome::Retryable(late),
                    None => handler(command.clone()).await,
                },
                Some(fence) => match fenced(fence, &command, handler, setup.clock.as_ref()).await {
                    Ok(Some(outcome)) => outcome,
                    Ok(None) => {
                        // Another delivery of the key is being handled: no answer yet
                        // (an `in_progress` would tell skald nothing it can act on); the
                        // broker brings the command back when that one is done.
                        debug!("the key is being handled by another delivery; redelivered later");
                        settle(acker.nak(BUSY_REDELIVERY).await);
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "the fence is unavailable; the command will be redelivered");
                        settle(acker.nak(Duration::from_millis(500)).await);
                        return;
                    }
                },
            },
        };
        let took = received.elapsed();
        if let Some(until) = hold_until {
            drop(permit);
            tokio::time::sleep_until(until).await;
        }
        if reply_and_settle(bus, &command, &outcome, acker).await {
            setup.metrics.record(&outcome, took);
        }
    }
    .instrument(span)
    .await
}

/// How soon a command whose key another delivery is handling comes back.
const BUSY_REDELIVERY: Duration = Duration::from_secs(1);

/// Whether the fence answered that another delivery holds the key right now.
fn is_busy(answer: &Outcome) -> bool {
    matches!(answer, Outcome::Retryable(e)
        if e.code == fence::IN_PROGRESS_CODE || e.code == fence::ACTION_IN_PROGRESS_CODE)
}

/// Handles `command` inside the fence: claim, run the handler if the claim says so,
/// record its outcome. What to reply (`None`: nothing yet, another delivery holds the
/// key); an error when the fence could not be consulted or written (nothing is lost: the
/// command is redelivered).
async fn fenced<H, F>(
    fence: &dyn Fence,
    command: &IncomingCommand,
    handler: &H,
    clock: &dyn Clock,
) -> Result<Option<Outcome>, FenceError>
where
    H: Fn(IncomingCommand) -> F,
    F: Future<Output = Outcome>,
{
    let key = command.action_key();
    let attempt = command.envelope.attempt;
    match command.envelope.kind {
        CommandKind::Action => match fence.claim_action(&key, attempt).await? {
            ActionClaim::Answer(answer) if is_busy(&answer) => Ok(None),
            ActionClaim::Answer(answer) => {
                debug!(outcome = answer.as_str(), "answered by the fence");
                Ok(Some(answer))
            }
            ActionClaim::Run => {
                // Past its deadline: give the claim back with a `retryable` remembered
                // for this attempt, without starting the work.
                let outcome = match past_deadline(command, clock) {
                    Some(late) => Outcome::Retryable(late),
                    None => call(handler, command, None).await,
                };
                persist(|| fence.finish_action(&key, attempt, &outcome))
                    .await
                    .map(Some)
            }
        },
        CommandKind::Compensation => match fence.claim_compensation(&key, attempt).await? {
            CompensationClaim::Answer(answer) if is_busy(&answer) => Ok(None),
            CompensationClaim::Answer(answer) => {
                debug!(outcome = answer.as_str(), "answered by the fence");
                Ok(Some(answer))
            }
            CompensationClaim::Undo { action_output } => {
                let outcome = match past_deadline(command, clock) {
                    Some(late) => Outcome::Retryable(late),
                    None => call(handler, command, action_output).await,
                };
                persist(|| fence.finish_compensation(&key, attempt, &outcome))
                    .await
                    .map(Some)
            }
        },
    }
}

/// The `deadline_passed` error of a command whose `Skald-Deadline` has passed by `clock`.
fn past_deadline(command: &IncomingCommand, clock: &dyn Clock) -> Option<StepError> {
    let deadline = command.deadline_ms;
    (deadline != 0 && clock.now().as_millis() > deadline).then(|| {
        StepError::new(
            DEADLINE_PASSED_CODE,
            format!("not started before its deadline ({deadline} ms since the epoch)"),
        )
    })
}

/// Calls the handler with `action_output` readable through [`action_output`], both while
/// the handler builds its future and while the future runs.
async fn call<H, F>(handler: &H, command: &IncomingCommand, action_output: Option<Value>) -> Outcome
where
    H: Fn(IncomingCommand) -> F,
    F: Future<Output = Outcome>,
{
    let future = ACTION_OUTPUT.sync_scope(action_output.clone(), || handler(command.clone()));
    ACTION_OUTPUT.scope(action_output, future).await
}

/// Records a handler's outcome, trying a fence that is unavailable a few times more
/// (the effect is done: the record is worth a short wait) before giving up. Given up,
/// the claim stays until its lease passes and the command is redelivered.
async fn persist<'a, W>(mut write: W) -> Result<Outcome, FenceError>
where
    W: FnMut() -> futures_util::future::BoxFuture<'a, Result<Outcome, FenceError>>,
{
    let mut wait = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        match write().await {
            Err(e) if e.is_retryable() && tries < 3 => {
                tries += 1;
                warn!(error = %e, "recording the outcome in the fence failed; trying again");
                tokio::time::sleep(wait).await;
                wait *= 4;
            }
            done => return done,
        }
    }
}

/// A permanent failure for a command whose schema version is not in `accept`.
fn refuse_version(command: &IncomingCommand, accept: Option<&[u32]>) -> Option<Outcome> {
    let accept = accept?;
    if accept.contains(&command.schema_version) {
        return None;
    }
    let accepted: Vec<String> = accept.iter().map(u32::to_string).collect();
    Some(Outcome::Failure(StepError::new(
        "unsupported_schema_version",
        format!(
            "command schema version {} on {} is not accepted (this participant reads {})",
            command.schema_version,
            command.subject,
            accepted.join(", ")
        ),
    )))
}

/// Publishes the reply, then acknowledges the command (or has it redelivered when the
/// reply could not be published). Whether the reply was published.
async fn reply_and_settle(
    bus: Arc<dyn Bus>,
    command: &IncomingCommand,
    outcome: &Outcome,
    acker: Box<dyn crate::ports::Acker>,
) -> bool {
    let reply = wire::encode_reply(command, outcome);
    match bus.publish(reply).await {
        Ok(()) => {
            settle(acker.ack().await);
            true
        }
        Err(e) => {
            warn!(error = %e, "publishing the reply failed; the command will be redelivered");
            settle(acker.nak(Duration::from_millis(200)).await);
            false
        }
    }
}

/// Logs a settlement that failed: the broker redelivers the command, and the
/// idempotency key makes that harmless, but the operator should see it.
fn settle(result: Result<(), BusError>) {
    if let Err(e) = result {
        warn!(error = %e, "settling a command with the broker failed; it may be redelivered");
    }
}

/// Shorthand for a permanent failure outcome.
pub fn failure(code: &str, message: impl Into<String>) -> Outcome {
    Outcome::Failure(StepError::new(code, message))
}

/// Shorthand for a retryable failure outcome.
pub fn retryable(code: &str, message: impl Into<String>) -> Outcome {
    Outcome::Retryable(StepError::new(code, message))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::ids::{SagaId, SagaType, StepName};
    use crate::machine::{Command, Timestamp};
    use crate::ports::{Headers, ManualClock, Message, Subscription};

    /// A bus that hands out pre-loaded commands and records published replies.
    #[derive(Default)]
    struct Scripted {
        commands: Mutex<Vec<Message>>,
        replies: Mutex<Vec<Message>>,
        settled: Arc<Mutex<Vec<&'static str>>>,
    }

    /// Records how each delivery was settled (`ack`, `nak`, `term`) in `Scripted::settled`.
    struct Recording(Arc<Mutex<Vec<&'static str>>>);

    impl Recording {
        fn push(&self, what: &'static str) -> Result<(), BusError> {
            self.0
                .lock()
                .map_err(|e| BusError::Other(e.to_string()))?
                .push(what);
            Ok(())
        }
    }

    #[async_trait]
    impl crate::ports::Acker for Recording {
        async fn ack(self: Box<Self>) -> Result<(), BusError> {
            self.push("ack")
        }
        async fn nak(self: Box<Self>, _: Duration) -> Result<(), BusError> {
            self.push("nak")
        }
        async fn term(self: Box<Self>, _: &str) -> Result<(), BusError> {
            self.push("term")
        }
    }

    #[async_trait]
    impl Bus for Scripted {
        async fn publish(&self, message: Message) -> Result<(), BusError> {
            self.replies
                .lock()
                .map_err(|e| BusError::Other(e.to_string()))?
                .push(message);
            Ok(())
        }
        async fn subscribe(&self, _: &[String], _: &str) -> Result<Subscription, BusError> {
            let msgs: Vec<_> = std::mem::take(
                &mut *self
                    .commands
                    .lock()
                    .map_err(|e| BusError::Other(e.to_string()))?,
            );
            let settled = Arc::clone(&self.settled);
            let deliveries = msgs
                .into_iter()
                .map(move |m| Delivery::new(m, 1, Box::new(Recording(Arc::clone(&settled)))));
            Ok(Box::pin(
                futures_util::stream::iter(deliveries).chain(futures_util::stream::pending()),
            ))
        }
        fn is_durable(&self) -> bool {
            false
        }
    }

    fn command(key: &str, attempt: u32, payload: Value) -> Message {
        command_v(key, attempt, payload, 1)
    }

    fn command_v(key: &str, attempt: u32, payload: Value, schema_version: u32) -> Message {
        encode(
            key,
            CommandKind::Action,
            None,
            attempt,
            payload,
            schema_version,
        )
    }

    /// A compensation undoing the action of idempotency key `action_key`.
    fn compensation(key: &str, action_key: &str, attempt: u32) -> Message {
        encode(
            key,
            CommandKind::Compensation,
            Some(action_key),
            attempt,
            serde_json::json!({}),
            1,
        )
    }

    fn encode(
        key: &str,
        kind: CommandKind,
        action_key: Option<&str>,
        attempt: u32,
        payload: Value,
        schema_version: u32,
    ) -> Message {
        let saga_id = SagaId::new();
        wire::encode_command(&Command {
            saga_id,
            saga_type: SagaType::new("t").expect("name"),
            step: StepName::new("s").expect("name"),
            kind,
            attempt,
            subject: "skald.cmd.svc.do".into(),
            payload,
            idempotency_key: key.into(),
            message_id: format!("m{attempt}"),
            deadline: Timestamp(0),
            schema_version,
            definition_version: 1,
            action_key: action_key.map(str::to_owned),
            in_doubt: false,
        })
        .expect("encode")
    }

    /// Polls `check` until it gives a value, for at most 10 s.
    async fn wait_for<T>(check: impl Fn() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "condition in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `bus` has `n` replies, then decodes them.
    async fn replies(bus: &Scripted, n: usize) -> Vec<wire::Reply> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while bus.replies.lock().expect("lock").len() < n {
            assert!(tokio::time::Instant::now() < deadline, "replies in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bus.replies
            .lock()
            .expect("lock")
            .iter()
            .map(|m| wire::decode_reply(m).expect("reply"))
            .collect()
    }

    #[derive(serde::Deserialize)]
    struct Amount {
        cents: u64,
    }

    #[tokio::test]
    async fn oversized_commands_are_refused_without_calling_the_handler() {
        let bus = Arc::new(Scripted::default());
        let mut many = command("k1", 1, serde_json::json!({}));
        for i in 0..100 {
            many.headers.append(format!("X-{i}"), "v");
        }
        let mut long = command("k2", 1, serde_json::json!({}));
        long.headers.insert("X-Long", "v".repeat(5000));
        let big = command("k3", 1, serde_json::json!({ "pad": "x".repeat(2 << 20) }));
        let fine = command("k4", 1, serde_json::json!({}));
        let mut headless = command("k5", 1, serde_json::json!({ "pad": "x".repeat(2 << 20) }));
        headless.headers = Headers::new();
        *bus.commands.lock().expect("lock") = vec![many, long, big, fine, headless];
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let _handle = serve(bus.clone(), "skald.cmd.svc.>", "svc", 1, move |_cmd| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Outcome::Success(serde_json::json!({})) }
        })
        .await
        .expect("serve");
        let settled = Arc::clone(&bus.settled);
        let outcomes = wait_for(|| {
            let s = settled.lock().expect("lock").clone();
            (s.len() == 5).then_some(s)
        })
        .await;
        // Answered (a permanent failure saying why) where the headers say who to answer;
        // terminated where they do not.
        assert_eq!(outcomes, vec!["ack", "ack", "ack", "ack", "term"]);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "only the command within the limits"
        );
        let codes: Vec<String> = replies(&bus, 4)
            .await
            .into_iter()
            .map(|r| match r.outcome {
                Outcome::Failure(e) => e.code,
                other => other.as_str().to_owned(),
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                "oversized_command",
                "oversized_command",
                "oversized_command",
                "success"
            ]
        );
    }

    #[tokio::test]
    async fn the_fence_answers_repeated_keys_and_typed_payloads_decode() {
        let bus = Arc::new(Scripted::default());
        let mut garbage = command("k3", 1, serde_json::json!({"cents": 5}));
        garbage.headers = Headers::new();
        *bus.commands.lock().expect("lock") = vec![
            command("k1", 1, serde_json::json!({"cents": 5})),
            command("k1", 2, serde_json::json!({"cents": 5})),
            command("k2", 1, serde_json::json!({"nope": true})),
            garbage,
        ];
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let handle = serve_with(
            bus.clone(),
            "skald.cmd.svc.>",
            "svc",
            ParticipantOptions {
                concurrency: Some(1),
                fence: Some(Arc::new(MemoryFence::new())),
                ..ParticipantOptions::default()
            },
            typed(move |_cmd, p: Amount| {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move { Outcome::Success(serde_json::json!({ "charged": p.cents, "call": n })) }
            }),
        )
        .await
        .expect("serve");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while bus.replies.lock().expect("lock").len() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "replies in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let replies = bus.replies.lock().expect("lock").clone();
        let decoded: Vec<_> = replies
            .iter()
            .map(|m| wire::decode_reply(m).expect("reply"))
            .collect();
        // The second attempt of the same key got the first success, without a second call.
        assert_eq!(decoded[0].outcome, decoded[1].outcome);
        assert_eq!(
            decoded[0].outcome,
            Outcome::Success(serde_json::json!({"charged": 5, "call": 0}))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The undecodable payload is a permanent failure naming the problem.
        match &decoded[2].outcome {
            Outcome::Failure(e) => assert_eq!(e.code, "bad_request"),
            other => panic!("expected a failure, got {other:?}"),
        }
        // The command without headers got no reply at all (terminated).
        assert_eq!(replies.len(), 3);
        handle.stop();
    }

    #[tokio::test]
    async fn a_schema_version_not_accepted_is_refused_by_name_without_calling_the_handler() {
        let bus = Arc::new(Scripted::default());
        *bus.commands.lock().expect("lock") = vec![
            command_v("k1", 1, serde_json::json!({"cents": 5}), 2),
            command_v("k2", 1, serde_json::json!({"cents": 5}), 3),
        ];
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let handle = serve_with(
            bus.clone(),
            "skald.cmd.svc.>",
            "svc",
            ParticipantOptions {
                concurrency: Some(1),
                accept_versions: Some(vec![1, 2]),
                ..ParticipantOptions::default()
            },
            move |_cmd| {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Outcome::Success(serde_json::json!({})) }
            },
        )
        .await
        .expect("serve");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while bus.replies.lock().expect("lock").len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "replies in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let replies = bus.replies.lock().expect("lock").clone();
        let outcomes: Vec<Outcome> = replies
            .iter()
            .map(|m| wire::decode_reply(m).expect("reply").outcome)
            .collect();
        assert!(outcomes.contains(&Outcome::Success(serde_json::json!({}))));
        let refusal = outcomes
            .iter()
            .find_map(|o| match o {
                Outcome::Failure(e) => Some(e.clone()),
                _ => None,
            })
            .expect("a refusal");
        assert_eq!(refusal.code, "unsupported_schema_version");
        assert!(
            refusal.message.contains("schema version 3") && refusal.message.contains("reads 1, 2"),
            "{}",
            refusal.message
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the handler saw only the accepted one"
        );
        handle.stop();
    }

    #[tokio::test]
    async fn compensations_get_the_action_output_and_a_compensation_first_refuses_the_action() {
        let bus = Arc::new(Scripted::default());
        *bus.commands.lock().expect("lock") = vec![
            command("a1", 1, serde_json::json!({})),
            compensation("c1", "a1", 1),
            compensation("c1", "a1", 2),
            compensation("c2", "a2", 1),
            command("a2", 1, serde_json::json!({})),
        ];
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let handle = serve_with(
            bus.clone(),
            "skald.cmd.svc.>",
            "svc",
            ParticipantOptions {
                concurrency: Some(1),
                fence: Some(Arc::new(MemoryFence::new())),
                ..ParticipantOptions::default()
            },
            move |cmd: IncomingCommand| {
                seen.lock()
                    .expect("lock")
                    .push(cmd.envelope.idempotency_key.clone());
                async move {
                    tokio::task::yield_now().await;
                    match cmd.envelope.kind {
                        CommandKind::Action => {
                            Outcome::Success(serde_json::json!({"payment_id": "p1"}))
                        }
                        CommandKind::Compensation => {
                            Outcome::Success(serde_json::json!({ "undid": action_output() }))
                        }
                    }
                }
            },
        )
        .await
        .expect("serve");
        let outcomes: Vec<Outcome> = replies(&bus, 5)
            .await
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        let undone = Outcome::Success(serde_json::json!({"undid": {"payment_id": "p1"}}));
        assert_eq!(
            outcomes[1], undone,
            "the action's output reached the handler"
        );
        assert_eq!(
            outcomes[2], undone,
            "the second delivery got the recorded answer"
        );
        assert_eq!(
            outcomes[3],
            Outcome::Success(Value::Null),
            "an empty rollback"
        );
        assert_eq!(outcomes[4], fence::refused(), "the late action is refused");
        assert_eq!(*calls.lock().expect("lock"), vec!["a1", "c1"]);
        assert_eq!(action_output(), None, "nothing outside a handler");
        handle.stop();
    }

    #[tokio::test]
    async fn two_deliveries_of_one_key_at_once_run_the_handler_once() {
        let bus = Arc::new(Scripted::default());
        *bus.commands.lock().expect("lock") = vec![
            command("k", 1, serde_json::json!({})),
            command("k", 2, serde_json::json!({})),
        ];
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let handle = serve_with(
            bus.clone(),
            "skald.cmd.svc.>",
            "svc",
            ParticipantOptions {
                concurrency: Some(2),
                fence: Some(Arc::new(MemoryFence::new())),
                ..ParticipantOptions::default()
            },
            move |_cmd| {
                counted.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Outcome::Success(serde_json::json!("done"))
                }
            },
        )
        .await
        .expect("serve");
        let outcomes: Vec<Outcome> = replies(&bus, 1)
            .await
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(outcomes, vec![Outcome::Success(serde_json::json!("done"))]);
        // The delivery that found the key held was not answered (its holder's outcome
        // was unknown then), but handed back to the broker for later.
        let settled = wait_for(|| {
            let s = bus.settled.lock().expect("lock").clone();
            (s.len() >= 2).then_some(s)
        })
        .await;
        assert!(
            settled.contains(&"nak") && settled.contains(&"ack"),
            "{settled:?}"
        );
        assert_eq!(bus.replies.lock().expect("lock").len(), 1);
        handle.stop();
    }

    #[tokio::test]
    async fn a_held_reply_comes_late_without_holding_a_slot() {
        let bus = Arc::new(Scripted::default());
        *bus.commands.lock().expect("lock") = vec![
            command("late", 1, serde_json::json!({})),
            command("prompt", 1, serde_json::json!({})),
        ];
        let started = tokio::time::Instant::now();
        let handle = serve_with(
            bus.clone(),
            "skald.cmd.svc.>",
            "svc",
            ParticipantOptions {
                concurrency: Some(1),
                fence: Some(Arc::new(MemoryFence::new())),
                hold_reply: Some(Arc::new(|cmd: &IncomingCommand| {
                    (cmd.envelope.idempotency_key == "late").then_some(Duration::from_millis(300))
                })),
                ..ParticipantOptions::default()
            },
            |cmd: IncomingCommand| async move {
                Outcome::Success(serde_json::json!(cmd.envelope.idempotency_key))
            },
        )
        .await
        .expect("serve");
        let first = replies(&bus, 1).await;
        assert_eq!(
            first[0].outcome,
            Outcome::Success(serde_json::json!("prompt")),
            "the held command does not hold the only slot"
        );
        assert!(started.elapsed() < Duration::from_millis(300));
        let both = replies(&bus, 2).await;
        assert_eq!(both[1].outcome, Outcome::Success(serde_json::json!("late")));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(*bus.settled.lock().expect("lock"), vec!["ack", "ack"]);
        handle.stop();
    }

    #[tokio::test]
    async fn a_command_past_its_deadline_is_not_started_and_the_answer_is_remembered() {
        let bus = Arc::new(Scripted::default());
        let late = |attempt: u32, deadline: u64| {
            let mut m = command("k", attempt, serde_json::json!({}));
            m.headers.insert(wire::H_DEADLINE, deadline.to_string());
            m
        };
        let future = u64::MAX / 2;
        *bus.commands.lock().expect("lock") = vec![
            late(1, 1),
            // Another delivery of attempt 1 (say its deadline now reads later): the same
            // answer, never the work.
            late(1, future),
            late(2, future),
        ];
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let handle = serve_with(
            bus.clone(),
            "skald.cmd.svc.>",
            "svc",
            ParticipantOptions {
                concurrency: Some(1),
                fence: Some(Arc::new(MemoryFence::new())),
                ..ParticipantOptions::default()
            },
            move |_cmd| {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Outcome::Success(serde_json::json!("done")) }
            },
        )
        .await
        .expect("serve");
        let outcomes: Vec<Outcome> = replies(&bus, 3)
            .await
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        for o in &outcomes[..2] {
            match o {
                Outcome::Retryable(e) => assert_eq!(e.code, DEADLINE_PASSED_CODE),
                other => panic!("expected deadline_passed, got {other:?}"),
            }
        }
        assert_eq!(outcomes[2], Outcome::Success(serde_json::json!("done")));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "only attempt 2 ran");
        handle.stop();

        // Without a fence, too (nothing to remember it in).
        let bus = Arc::new(Scripted::default());
        *bus.commands.lock().expect("lock") = vec![late(1, 1)];
        let handle = serve_with(
            bus.clone(),
            "skald.cmd.svc.>",
            "svc",
            ParticipantOptions::default(),
            |_cmd| async { Outcome::Success(Value::Null) },
        )
        .await
        .expect("serve");
        match &replies(&bus, 1).await[0].outcome {
            Outcome::Retryable(e) => assert_eq!(e.code, DEADLINE_PASSED_CODE),
            other => panic!("expected deadline_passed, got {other:?}"),
        }
        handle.stop();
    }

    /// A fence that fails: every claim, or (`claims`) only the writes after the handler.
    struct Broken {
        claims: bool,
    }

    #[async_trait]
    impl Fence for Broken {
        async fn claim_action(&self, _: &str, _: u32) -> Result<ActionClaim, FenceError> {
            if self.claims {
                Ok(ActionClaim::Run)
            } else {
                Err(FenceError::Unavailable("down".into()))
            }
        }
        async fn finish_action(&self, _: &str, _: u32, _: &Outcome) -> Result<Outcome, FenceError> {
            Err(FenceError::Unavailable("down".into()))
        }
        async fn claim_compensation(
            &self,
            _: &str,
            _: u32,
        ) -> Result<CompensationClaim, FenceError> {
            Err(FenceError::Unavailable("down".into()))
        }
        async fn finish_compensation(
            &self,
            _: &str,
            _: u32,
            _: &Outcome,
        ) -> Result<Outcome, FenceError> {
            Err(FenceError::Unavailable("down".into()))
        }
        async fn record(&self, _: &str) -> Result<Option<FenceRecord>, FenceError> {
            Err(FenceError::Unavailable("down".into()))
        }
    }

    #[tokio::test]
    async fn a_fence_that_fails_leaves_the_command_to_be_redelivered() {
        for claims in [false, true] {
            let bus = Arc::new(Scripted::default());
            *bus.commands.lock().expect("lock") = vec![
                command("k", 1, serde_json::json!({})),
                compensation("c", "k", 1),
            ];
            let calls = Arc::new(AtomicUsize::new(0));
            let counted = Arc::clone(&calls);
            let handle = serve_with(
                bus.clone(),
                "skald.cmd.svc.>",
                "svc",
                ParticipantOptions {
                    concurrency: Some(1),
                    fence: Some(Arc::new(Broken { claims })),
                    ..ParticipantOptions::default()
                },
                move |_cmd| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Outcome::Success(Value::Null) }
                },
            )
            .await
            .expect("serve");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while bus.settled.lock().expect("lock").len() < 2 {
                assert!(tokio::time::Instant::now() < deadline, "settled in time");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(*bus.settled.lock().expect("lock"), vec!["nak", "nak"]);
            assert!(bus.replies.lock().expect("lock").is_empty(), "no reply");
            assert_eq!(
                calls.load(Ordering::SeqCst),
                usize::from(claims),
                "the handler ran only when the claim worked"
            );
            handle.stop();
        }
    }

    /// The rules of the fence, on [`MemoryFence`] (the SQL fences run the same checks in
    /// tests/fence.rs).
    mod memory_fence {
        use super::*;
        use crate::participant::fence::conformance::{self, Subject};

        const LEASE: Duration = Duration::from_secs(30);

        async fn check<'a, F>(check: impl FnOnce(Subject<'a>) -> F)
        where
            F: Future<Output = Result<(), String>> + 'a,
        {
            let clock: &'static ManualClock =
                Box::leak(Box::new(ManualClock::new(Timestamp(1_000_000))));
            let fence: &'static MemoryFence = Box::leak(Box::new(
                MemoryFence::new()
                    .with_lease(LEASE)
                    .with_clock(Arc::new(clock.clone())),
            ));
            let subject = Subject {
                fence,
                clock,
                lease: LEASE,
            };
            if let Err(e) = check(subject).await {
                panic!("{e}");
            }
        }

        #[tokio::test]
        async fn rule_1_2_a_success_is_answered_to_every_delivery() {
            check(conformance::success_is_answered_to_every_delivery).await;
        }

        #[tokio::test]
        async fn rule_1_2_a_failure_is_answered_to_every_delivery() {
            check(conformance::failure_is_answered_to_every_delivery).await;
        }

        #[tokio::test]
        async fn rule_1_a_live_claim_is_in_progress() {
            check(conformance::a_live_claim_is_in_progress).await;
        }

        #[tokio::test]
        async fn rule_1_2_retryable_is_remembered_per_attempt() {
            check(conformance::retryable_is_remembered_per_attempt).await;
        }

        #[tokio::test]
        async fn rule_3_a_compensation_undoes_a_success_once() {
            check(conformance::compensation_undoes_a_success_once).await;
        }

        #[tokio::test]
        async fn rule_3_a_failed_compensation_is_retried() {
            check(conformance::a_failed_compensation_is_retried).await;
        }

        #[tokio::test]
        async fn rule_3_1_a_compensation_first_refuses_the_action() {
            check(conformance::compensation_first_refuses_the_action).await;
        }

        #[tokio::test]
        async fn rule_3_nothing_applied_is_an_empty_rollback() {
            check(conformance::nothing_applied_is_an_empty_rollback).await;
        }

        #[tokio::test]
        async fn rule_3_a_compensation_waits_for_a_running_action() {
            check(conformance::compensation_waits_for_a_running_action).await;
        }

        #[tokio::test]
        async fn rule_4_an_expired_action_claim_is_taken_over() {
            check(conformance::an_expired_action_claim_is_taken_over).await;
        }

        #[tokio::test]
        async fn rule_4_a_compensation_takes_over_an_expired_action() {
            check(conformance::compensation_takes_over_an_expired_action).await;
        }

        #[tokio::test]
        async fn rule_4_an_expired_compensation_claim_is_taken_over() {
            check(conformance::an_expired_compensation_claim_is_taken_over).await;
        }

        #[tokio::test]
        async fn every_rule_in_turn() {
            check(conformance::check_all).await;
        }

        #[tokio::test]
        async fn concurrent_claimers_run_each_key_once() {
            let fence = Arc::new(MemoryFence::new());
            let runs = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let fence = Arc::clone(&fence);
                let runs = Arc::clone(&runs);
                tasks.push(tokio::spawn(async move {
                    for k in 0..50 {
                        let key = format!("k{k}");
                        if fence.claim_action(&key, 1).await.expect("claim") == ActionClaim::Run {
                            runs.fetch_add(1, Ordering::SeqCst);
                            fence
                                .finish_action(&key, 1, &Outcome::Success(Value::Null))
                                .await
                                .expect("finish");
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
            assert_eq!(runs.load(Ordering::SeqCst), 50);
        }
    }
}
