//! An in-process bus with NATS subject semantics and consumer groups.
//!
//! Not durable: messages live only in channels. A `nak` redelivers the message to its
//! group after the delay; `ack` and `term` forget it. Publishing to a subject nobody
//! subscribes to drops the message, as NATS core does.
//!
//! Requests work as on NATS: [`Bus::serve`] joins a queue group of servers on subjects,
//! [`Bus::request`] hands the request to one server of every group serving it and
//! returns the first answer, or [`BusError::NoResponders`] at once when nobody serves
//! the subject. A plain publish reaches the servers too, with nowhere to answer. A
//! server holds at most its `capacity` of requests not yet read: past it a request goes
//! to another server of the group, or is dropped (as a NATS client drops messages for a
//! slow consumer). [`RequestSource::stop`] leaves the groups: new requests go to the
//! other servers, and the ones received before are still read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use skald_runtime::ports::{
    Acker, Bus, BusError, Delivery, Headers, Message, ReplyTo, Request, RequestSource,
    RequestStream, Responder, Subscription,
};
use tokio::sync::{mpsc, oneshot};

use crate::subject_matches;

struct Group {
    /// The subjects, as one key (`a|b`) identifying the group with its name.
    pattern: String,
    patterns: Vec<String>,
    name: String,
    members: Vec<mpsc::UnboundedSender<Delivery>>,
    next: AtomicUsize,
}

/// A queue group of servers of requests on a subject pattern: each member's id (a
/// server serving several subjects is a member of several groups) and its queue.
struct Servers {
    pattern: String,
    queue: String,
    members: Vec<(u64, mpsc::Sender<Request>)>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    // A std mutex: held to route one message, never across an await.
    groups: Mutex<Vec<Group>>,
    servers: Mutex<Vec<Servers>>,
    /// The id of the next server ([`Bus::serve`]).
    next_server: std::sync::atomic::AtomicU64,
}

/// Where the first answer to a request goes (every server it reached shares it).
type AnswerSlot = Arc<Mutex<Option<oneshot::Sender<(Headers, Bytes)>>>>;

/// Hands `message` to one member of every group of servers matching its subject, each
/// answering into `answer` (`None`: nowhere to answer). Returns how many groups had a
/// live member: a member whose queue is full is passed over, and a group whose members
/// are all full drops the request (its requester's answer slot is then dropped).
fn dispatch_request(inner: &Inner, message: &Message, answer: Option<&AnswerSlot>) -> usize {
    let Ok(mut servers) = inner.servers.lock() else {
        return 0;
    };
    let mut reached = 0;
    for group in servers.iter_mut() {
        if !subject_matches(&group.pattern, &message.subject) {
            continue;
        }
        group.members.retain(|(_, m)| !m.is_closed());
        let n = group.members.len();
        if n == 0 {
            continue;
        }
        reached += 1;
        let start = group.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let responder = MemoryResponder(answer.map(Arc::clone));
            let request = Request::new(message.clone(), Box::new(responder));
            if group.members[(start + i) % n].1.try_send(request).is_ok() {
                break;
            }
        }
    }
    reached
}

/// Answers a request of the in-process bus: the first answer of any server wins.
struct MemoryResponder(Option<AnswerSlot>);

#[async_trait]
impl Responder for MemoryResponder {
    fn reply_to(&self) -> ReplyTo<'_> {
        match self.0 {
            Some(_) => ReplyTo::Requester,
            None => ReplyTo::Nowhere,
        }
    }

    async fn respond(self: Box<Self>, headers: Headers, payload: Bytes) -> Result<(), BusError> {
        let Some(slot) = self.0 else {
            return Ok(());
        };
        let sender = slot.lock().ok().and_then(|mut s| s.take());
        if let Some(sender) = sender {
            // The requester may have given up: nothing to do then.
            let _ = sender.send((headers, payload));
        }
        Ok(())
    }
}

/// The requests of one server ([`Bus::serve`]).
struct MemoryRequests {
    bus: Weak<Inner>,
    id: u64,
    rx: mpsc::Receiver<Request>,
}

impl MemoryRequests {
    /// Leaves every group: the senders the groups held are dropped, so the queue ends
    /// once what it holds is read.
    fn leave(&self) {
        if let Some(inner) = self.bus.upgrade()
            && let Ok(mut servers) = inner.servers.lock()
        {
            for group in servers.iter_mut() {
                group.members.retain(|(id, _)| *id != self.id);
            }
            servers.retain(|g| !g.members.is_empty());
        }
    }
}

#[async_trait]
impl RequestSource for MemoryRequests {
    async fn next(&mut self) -> Option<Request> {
        self.rx.recv().await
    }

    async fn stop(&mut self) {
        self.leave();
    }
}

impl Drop for MemoryRequests {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The in-process bus. Cheap to clone; clones share subscriptions.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups = self.inner.groups.lock().map(|g| g.len()).unwrap_or(0);
        let servers = self.inner.servers.lock().map(|g| g.len()).unwrap_or(0);
        f.debug_struct("MemoryBus")
            .field("groups", &groups)
            .field("servers", &servers)
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
        dispatch_request(&self.inner, &message, None);
        dispatch(&self.inner, message, 1, None);
        Ok(())
    }

    async fn serve(
        &self,
        subjects: &[String],
        queue: &str,
        capacity: usize,
    ) -> Result<RequestStream, BusError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.inner.next_server.fetch_add(1, Ordering::Relaxed);
        let mut servers = self
            .inner
            .servers
            .lock()
            .map_err(|_| BusError::Other("memory bus lock poisoned".into()))?;
        for subject in subjects {
            match servers
                .iter_mut()
                .find(|g| g.pattern == *subject && g.queue == queue)
            {
                Some(g) => g.members.push((id, tx.clone())),
                None => servers.push(Servers {
                    pattern: subject.clone(),
                    queue: queue.to_owned(),
                    members: vec![(id, tx.clone())],
                    next: AtomicUsize::new(0),
                }),
            }
        }
        Ok(Box::new(MemoryRequests {
            bus: Arc::downgrade(&self.inner),
            id,
            rx,
        }))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let (tx, rx) = oneshot::channel();
        let slot: AnswerSlot = Arc::new(Mutex::new(Some(tx)));
        let message = Message {
            subject: subject.to_owned(),
            headers,
            payload,
        };
        if dispatch_request(&self.inner, &message, Some(&slot)) == 0 {
            return Err(BusError::NoResponders(subject.to_owned()));
        }
        drop(slot);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok((headers, payload))) => Ok(Message {
                subject: subject.to_owned(),
                headers,
                payload,
            }),
            // Every server dropped the request unanswered.
            Ok(Err(_)) => Err(BusError::Unavailable(format!(
                "request on {subject}: dropped unanswered"
            ))),
            Err(_) => Err(BusError::Unavailable(format!(
                "request on {subject}: no answer within {timeout:?}"
            ))),
        }
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
    use super::*;
    use bytes::Bytes;
    use futures_util::StreamExt;

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
    async fn requests_go_to_one_server_of_a_queue_and_nobody_is_no_responders() {
        let bus = MemoryBus::new();
        let ask = |bus: MemoryBus, subject: &'static str| async move {
            bus.request(
                subject,
                Headers::new(),
                Bytes::from_static(b"ping"),
                Duration::from_secs(5),
            )
            .await
        };
        assert_eq!(
            ask(bus.clone(), "svc.a").await,
            Err(BusError::NoResponders("svc.a".into()))
        );
        let mut s1 = bus.serve(&["svc.*".into()], "q", 8).await.expect("serve");
        let mut s2 = bus.serve(&["svc.*".into()], "q", 8).await.expect("serve");
        let asking = tokio::spawn(ask(bus.clone(), "svc.a"));
        // One of the two servers gets it; it answers.
        let request = tokio::select! {
            r = s1.next() => r.expect("a request"),
            r = s2.next() => r.expect("a request"),
        };
        assert_eq!(&request.message.payload[..], b"ping");
        let (_, responder) = request.into_parts();
        let mut headers = Headers::new();
        headers.insert("X", "1");
        responder
            .respond(headers, Bytes::from_static(b"pong"))
            .await
            .expect("respond");
        let answer = asking.await.expect("join").expect("answered");
        assert_eq!(&answer.payload[..], b"pong");
        assert_eq!(answer.headers.get("X"), Some("1"));
        // A request its server drops unanswered fails at once, not at the timeout.
        let asking = tokio::spawn(ask(bus.clone(), "svc.b"));
        let request = tokio::select! {
            r = s1.next() => r.expect("a request"),
            r = s2.next() => r.expect("a request"),
        };
        drop(request);
        assert!(matches!(
            asking.await.expect("join"),
            Err(BusError::Unavailable(_))
        ));
        // Servers that went away are no responders.
        drop((s1, s2));
        assert_eq!(
            ask(bus.clone(), "svc.a").await,
            Err(BusError::NoResponders("svc.a".into()))
        );
    }

    #[tokio::test]
    async fn a_full_server_drops_and_a_stopped_one_is_read_to_the_end() {
        let bus = MemoryBus::new();
        let mut server = bus
            .serve(&["svc.a".into(), "svc.b".into()], "q", 1)
            .await
            .expect("serve");
        let ask = |subject: &'static str| {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.request(
                    subject,
                    Headers::new(),
                    Bytes::from_static(b"ping"),
                    Duration::from_secs(5),
                )
                .await
            })
        };
        let first = ask("svc.b");
        // The first fills the queue of one: the second is dropped at once, unanswered.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = ask("svc.a");
        assert!(matches!(
            second.await.expect("join"),
            Err(BusError::Unavailable(_))
        ));
        // Stopped: nobody serves any more, and what was received is still read.
        server.stop().await;
        assert_eq!(
            ask("svc.a").await.expect("join"),
            Err(BusError::NoResponders("svc.a".into()))
        );
        let request = server.next().await.expect("the request received before");
        assert_eq!(request.message.subject, "svc.b");
        assert_eq!(request.reply_to(), ReplyTo::Requester);
        let (_, responder) = request.into_parts();
        responder
            .respond(Headers::new(), Bytes::from_static(b"pong"))
            .await
            .expect("respond");
        assert_eq!(
            &first.await.expect("join").expect("answered").payload[..],
            b"pong"
        );
        assert!(server.next().await.is_none(), "the source ended");
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
