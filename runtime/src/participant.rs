//! A helper to write participant services in Rust: subscribe to commands, call a
//! handler, publish its outcome with the right headers, then acknowledge.
//!
//! The handler must be idempotent per idempotency key (commands are delivered at least
//! once, and every retry of a step carries the same key).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{Instrument, info_span, warn};

use crate::machine::StepError;
use crate::ports::{Bus, BusError, Delivery};
use crate::wire::{self, IncomingCommand, Outcome};

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

/// Serves commands on `subject` (e.g. `skald.cmd.payment.>`) in consumer group `group`
/// (replicas of one service share the work), at most `concurrency` at a time.
///
/// A command that cannot be decoded is terminated (there is nowhere to reply) and
/// logged; a reply that cannot be published is not acknowledged, so the command comes
/// again.
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
    let mut sub = bus.subscribe(&[subject.to_owned()], group).await?;
    let handler = Arc::new(handler);
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let task = tokio::spawn(async move {
        while let Some(delivery) = sub.next().await {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                break;
            };
            let bus = Arc::clone(&bus);
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                handle(bus, delivery, handler.as_ref()).await;
                drop(permit);
            });
        }
    });
    Ok(ParticipantHandle { task })
}

async fn handle<H, F>(bus: Arc<dyn Bus>, delivery: Delivery, handler: &H)
where
    H: Fn(IncomingCommand) -> F,
    F: Future<Output = Outcome>,
{
    let (message, _, acker) = delivery.into_parts();
    let command = match wire::decode_command(&message) {
        Ok(c) => c,
        Err(e) => {
            warn!(subject = %message.subject, error = %e, "undecodable command terminated");
            let _ = acker.term(&e.to_string()).await;
            return;
        }
    };
    let span = info_span!(
        "participant",
        saga.id = %command.envelope.saga_id,
        saga.r#type = %command.envelope.saga_type,
        saga.step = %command.envelope.step,
        kind = %command.envelope.kind,
        attempt = command.envelope.attempt,
    );
    async move {
        let outcome = handler(command.clone()).await;
        let reply = wire::encode_reply(&command, &outcome);
        match bus.publish(reply).await {
            Ok(()) => {
                let _ = acker.ack().await;
            }
            Err(e) => {
                warn!(error = %e, "publishing the reply failed; the command will be redelivered");
                let _ = acker.nak(Duration::from_millis(200)).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Shorthand for a permanent failure outcome.
pub fn failure(code: &str, message: impl Into<String>) -> Outcome {
    Outcome::Failure(StepError::new(code, message))
}

/// Shorthand for a retryable failure outcome.
pub fn retryable(code: &str, message: impl Into<String>) -> Outcome {
    Outcome::Retryable(StepError::new(code, message))
}
