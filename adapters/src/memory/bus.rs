//! An in-process bus with NATS subject semantics and consumer groups.
//!
//! Not durable: messages live only in channels. A `nak` redelivers the message to its
//! group after the delay; `ack` and `term` forget it. Publishing to a subject nobody
//! subscribes to drops the message, as NATS core does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use skald_runtime::ports::{Acker, Bus, BusError, Delivery, Message, Subscription};
use tokio::sync::mpsc;

use crate::subject_matches;

struct Group {
    /// The subjects, as one key (`a|b`) identifying the group with its name.
    pattern: String,
    patterns: Vec<String>,
    name: String,
    members: Vec<mpsc::UnboundedSender<Delivery>>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    // A std mutex: held to route one message, never across an await.
    groups: Mutex<Vec<Group>>,
}

/// The in-process bus. Cheap to clone; clones share subscriptions.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups = self.inner.groups.lock().map(|g| g.len()).unwrap_or(0);
        f.debug_struct("MemoryBus")
            .field("groups", &groups)
            .finish()
    }
}

impl MemoryBus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        MemoryBus::default()
    }
}

/// Routes `message` to one member of every group whose pattern matches (or of the one
/// group `only`, for a redelivery).
fn dispatch(inner: &Arc<Inner>, message: Message, count: u32, only: Option<(&str, &str)>) {
    let Ok(mut groups) = inner.groups.lock() else {
        return;
    };
    for group in groups.iter_mut() {
        if let Some((pattern, name)) = only {
            if group.pattern != pattern || group.name != name {
                continue;
            }
        } else if !group
            .patterns
            .iter()
            .any(|p| subject_matches(p, &message.subject))
        {
            continue;
        }
        group.members.retain(|m| !m.is_closed());
        let n = group.members.len();
        if n == 0 {
            continue;
        }
        let start = group.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let acker = MemoryAcker {
                bus: Arc::downgrade(inner),
                pattern: group.pattern.clone(),
                group: group.name.clone(),
                message: message.clone(),
                count,
            };
            let delivery = Delivery::new(message.clone(), count, Box::new(acker));
            if group.members[(start + i) % n].send(delivery).is_ok() {
                break;
            }
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, message: Message) -> Result<(), BusError> {
        dispatch(&self.inner, message, 1, None);
        Ok(())
    }

    async fn subscribe(&self, subjects: &[String], group: &str) -> Result<Subscription, BusError> {
        let subject = subjects.join("|");
        let subject = subject.as_str();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut groups = self
            .inner
            .groups
            .lock()
            .map_err(|_| BusError::Other("memory bus lock poisoned".into()))?;
        match groups
            .iter_mut()
            .find(|g| g.pattern == subject && g.name == group)
        {
            Some(g) => g.members.push(tx),
            None => groups.push(Group {
                pattern: subject.to_owned(),
                patterns: subjects.to_vec(),
                name: group.to_owned(),
                members: vec![tx],
                next: AtomicUsize::new(0),
            }),
        }
        Ok(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|d| (d, rx)) },
        )))
    }

    fn is_durable(&self) -> bool {
        false
    }
}

struct MemoryAcker {
    bus: Weak<Inner>,
    pattern: String,
    group: String,
    message: Message,
    count: u32,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        Ok(())
    }

    async fn nak(self: Box<Self>, delay: Duration) -> Result<(), BusError> {
        let this = *self;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(inner) = this.bus.upgrade() {
                dispatch(
                    &inner,
                    this.message,
                    this.count.saturating_add(1),
                    Some((&this.pattern, &this.group)),
                );
            }
        });
        Ok(())
    }

    async fn term(self: Box<Self>, _reason: &str) -> Result<(), BusError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures_util::StreamExt;
    use skald_runtime::ports::Headers;

    use super::*;

    fn msg(subject: &str) -> Message {
        Message {
            subject: subject.into(),
            headers: Headers::new(),
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn groups_share_and_fan_out() {
        let bus = MemoryBus::new();
        let mut a1 = bus
            .subscribe(&["skald.cmd.>".into()], "a")
            .await
            .expect("sub");
        let mut a2 = bus
            .subscribe(&["skald.cmd.>".into()], "a")
            .await
            .expect("sub");
        let mut b = bus
            .subscribe(&["skald.cmd.pay.*".into()], "b")
            .await
            .expect("sub");
        bus.publish(msg("skald.cmd.pay.charge")).await.expect("pub");
        bus.publish(msg("skald.cmd.pay.refund")).await.expect("pub");
        bus.publish(msg("other")).await.expect("pub");
        // Group a: one message each (round-robin); group b: both.
        let first = a1.next().await.expect("a1");
        let second = a2.next().await.expect("a2");
        assert_ne!(first.message.subject, second.message.subject);
        assert_eq!(
            b.next().await.expect("b").message.subject,
            "skald.cmd.pay.charge"
        );
        assert_eq!(
            b.next().await.expect("b").message.subject,
            "skald.cmd.pay.refund"
        );
    }

    #[tokio::test]
    async fn nak_redelivers_with_a_higher_count() {
        let bus = MemoryBus::new();
        let mut sub = bus.subscribe(&["x".into()], "g").await.expect("sub");
        bus.publish(msg("x")).await.expect("pub");
        let d = sub.next().await.expect("first");
        assert_eq!(d.delivery_count, 1);
        let (_, _, acker) = d.into_parts();
        acker.nak(Duration::from_millis(1)).await.expect("nak");
        let again = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("redelivered in time")
            .expect("message");
        assert_eq!(again.delivery_count, 2);
        assert_eq!(again.message.subject, "x");
    }
}
