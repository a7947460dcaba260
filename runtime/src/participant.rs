//! A helper to write participant services in Rust: subscribe to commands on a durable
//! consumer group (replicas share the work), decode the payload, call a handler, publish
//! its outcome with the right headers, then acknowledge.
//!
//! Commands are delivered at least once and every retry of a step carries the same
//! idempotency key. Give [`ParticipantOptions::dedupe`] a [`DedupeStore`] and repeated
//! keys are answered with the first success without calling the handler again (failures
//! are not remembered: a later attempt may succeed); without one, the handler itself
//! must be idempotent per key.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::field::Empty;
use tracing::{Instrument, info_span, warn};

use crate::machine::StepError;
use crate::ports::{Bus, BusError, Delivery};
use crate::trace::TraceContext;
use crate::wire::{self, IncomingCommand, Outcome};

/// Remembers successful outputs per idempotency key.
#[async_trait]
pub trait DedupeStore: Send + Sync + 'static {
    /// The output of an earlier success with this key.
    async fn get(&self, key: &str) -> Result<Option<Value>, String>;
    /// Records a success.
    async fn put(&self, key: &str, output: &Value) -> Result<(), String>;
}

/// An in-memory [`DedupeStore`] (lost on restart: use a durable one in production).
#[derive(Debug, Default)]
pub struct MemoryDedupe {
    // A std mutex: short critical sections, no await inside.
    done: Mutex<HashMap<String, Value>>,
}

#[async_trait]
impl DedupeStore for MemoryDedupe {
    async fn get(&self, key: &str) -> Result<Option<Value>, String> {
        let done = self.done.lock().map_err(|e| e.to_string())?;
        Ok(done.get(key).cloned())
    }

    async fn put(&self, key: &str, output: &Value) -> Result<(), String> {
        let mut done = self.done.lock().map_err(|e| e.to_string())?;
        done.insert(key.to_owned(), output.clone());
        Ok(())
    }
}

/// How a participant consumes.
#[derive(Clone, Default)]
pub struct ParticipantOptions {
    /// Commands handled at once (default 64).
    pub concurrency: Option<usize>,
    /// Answer repeated idempotency keys from here.
    pub dedupe: Option<Arc<dyn DedupeStore>>,
    /// The command schema versions (`Skald-Schema-Version`) this participant reads;
    /// another is answered with a permanent `unsupported_schema_version` failure naming
    /// it, without calling the handler. `None` (the default) accepts every version.
    pub accept_versions: Option<Vec<u32>>,
}

impl std::fmt::Debug for ParticipantOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantOptions")
            .field("concurrency", &self.concurrency)
            .field("dedupe", &self.dedupe.is_some())
            .field("accept_versions", &self.accept_versions)
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
    let dedupe = options.dedupe;
    let accept: Option<Arc<[u32]>> = options.accept_versions.map(Into::into);
    let metrics = Arc::new(crate::metrics::ParticipantMetrics::new(group));
    let task = tokio::spawn(async move {
        while let Some(delivery) = sub.next().await {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                break;
            };
            let bus = Arc::clone(&bus);
            let handler = Arc::clone(&handler);
            let dedupe = dedupe.clone();
            let accept = accept.clone();
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                handle(
                    bus,
                    delivery,
                    handler.as_ref(),
                    dedupe.as_deref(),
                    accept.as_deref(),
                    &metrics,
                )
                .await;
                drop(permit);
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

async fn handle<H, F>(
    bus: Arc<dyn Bus>,
    delivery: Delivery,
    handler: &H,
    dedupe: Option<&dyn DedupeStore>,
    accept: Option<&[u32]>,
    metrics: &crate::metrics::ParticipantMetrics,
) where
    H: Fn(IncomingCommand) -> F,
    F: Future<Output = Outcome>,
{
    let received = std::time::Instant::now();
    let (message, _, acker) = delivery.into_parts();
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
    async move {
        let key = command.envelope.idempotency_key.clone();
        let remembered = match dedupe {
            Some(d) => match d.get(&key).await {
                Ok(found) => found,
                Err(e) => {
                    warn!(error = %e, "dedupe store unavailable; the command will be redelivered");
                    settle(acker.nak(Duration::from_millis(500)).await);
                    return;
                }
            },
            None => None,
        };
        let outcome = match remembered {
            Some(output) => Outcome::Success(output),
            None => {
                let outcome = match refuse_version(&command, accept) {
                    Some(refusal) => {
                        if reply_and_settle(bus, &command, &refusal, acker).await {
                            metrics.record(&refusal, received.elapsed());
                        }
                        return;
                    }
                    None => handler(command.clone()).await,
                };
                if let (Some(d), Outcome::Success(output)) = (dedupe, &outcome)
                    && let Err(e) = d.put(&key, output).await
                {
                    warn!(error = %e, "recording the result failed; the command will be redelivered");
                    settle(acker.nak(Duration::from_millis(500)).await);
                    return;
                }
                outcome
            }
        };
        if reply_and_settle(bus, &command, &outcome, acker).await {
            metrics.record(&outcome, received.elapsed());
        }
    }
    .instrument(span)
    .await
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::ids::{CommandKind, SagaId, SagaType, StepName};
    use crate::machine::{Command, Timestamp};
    use crate::ports::{Headers, Message, Subscription};

    /// A bus that hands out pre-loaded commands and records published replies.
    #[derive(Default)]
    struct Scripted {
        commands: Mutex<Vec<Message>>,
        replies: Mutex<Vec<Message>>,
    }

    struct NoAck;

    #[async_trait]
    impl crate::ports::Acker for NoAck {
        async fn ack(self: Box<Self>) -> Result<(), BusError> {
            Ok(())
        }
        async fn nak(self: Box<Self>, _: Duration) -> Result<(), BusError> {
            Ok(())
        }
        async fn term(self: Box<Self>, _: &str) -> Result<(), BusError> {
            Ok(())
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
            let deliveries = msgs
                .into_iter()
                .map(|m| Delivery::new(m, 1, Box::new(NoAck)));
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
        let saga_id = SagaId::new();
        wire::encode_command(&Command {
            saga_id,
            saga_type: SagaType::new("t").expect("name"),
            step: StepName::new("s").expect("name"),
            kind: CommandKind::Action,
            attempt,
            subject: "skald.cmd.svc.do".into(),
            payload,
            idempotency_key: key.into(),
            message_id: format!("m{attempt}"),
            deadline: Timestamp(0),
            schema_version,
            definition_version: 1,
        })
        .expect("encode")
    }

    #[derive(serde::Deserialize)]
    struct Amount {
        cents: u64,
    }

    #[tokio::test]
    async fn dedupes_successes_and_decodes_typed_payloads() {
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
                dedupe: Some(Arc::new(MemoryDedupe::default())),
                accept_versions: None,
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
}
