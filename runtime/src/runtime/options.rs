//! [`RuntimeOptions`]: the runtime's settings, their defaults, and the checks
//! [`RuntimeBuilder::start`](super::RuntimeBuilder::start) makes of them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::intake::MAX_REQUEST_TTL;
use crate::error::RuntimeError;

/// Runtime settings. Every field has a default ([`RuntimeOptions::default`]); every
/// field appeared in 0.1.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RuntimeOptions {
    /// Threads (one actix arbiter each) the instance actors are spread over. Store and
    /// bus I/O does not run on them but on the tokio runtime `start` was called from.
    /// Default: the number of cores.
    pub arbiters: usize,
    /// An active saga's actor is passivated (dropped from memory) after this long
    /// without input; settled sagas are passivated at once. Default: 30 s.
    #[serde(with = "crate::serde_millis")]
    pub idle_timeout: Duration,
    /// How often the store is swept for due wake-ups of sagas not in memory (a live
    /// saga arms its own timer): the most a passivated saga's retry or timeout fires
    /// late. Default: 500 ms.
    #[serde(with = "crate::serde_millis")]
    pub wakeup_poll_interval: Duration,
    /// Inbound messages (replies and operator requests) held at once, being applied or
    /// waiting for capacity; past it the intake stops reading and the broker keeps the
    /// rest. Shared among the reply consumers: one per saga type (at least 64 each), or
    /// on a node leasing partitions one per type and partition (at least 64 each, so a
    /// node holding every partition of a type may hold more than this unacknowledged,
    /// waiting in line). Default: 4096.
    pub max_in_flight_replies: usize,
    /// Most writes in one group-commit transaction: a larger batch commits more per
    /// round trip under load, at the cost of a longer transaction (under light load a
    /// write commits alone). Default: 512.
    pub commit_max_batch: usize,
    /// The first delay before a message that could not be applied is delivered again;
    /// it doubles with each delivery, up to 30 s. Default: 500 ms.
    #[serde(with = "crate::serde_millis")]
    pub redelivery_delay: Duration,
    /// Publish lifecycle events on `skald.evt.<saga_type>.<event>`. Default: true.
    pub publish_events: bool,
    /// The prefix of the durable consumers replies and operator requests are read with:
    /// `<reply_group>-<saga_type>` and `<reply_group>-op-<saga_type>`, one pair per
    /// registered type. Default: `skald-orchestrator`.
    pub reply_group: String,
    /// A reply that still cannot be applied after this many deliveries (the saga's actor
    /// unreachable, the bus failing) is dead-lettered with the last error instead of
    /// being redelivered forever. Default: 100. Neither a store that is unavailable nor
    /// version skew (a definition version or data schema this build lacks,
    /// `Disposition::Defer`) counts: such a reply waits, with backoff, for as long as
    /// the outage or the deploy lasts.
    pub max_deliveries: u32,
    /// How long a claim on a due wake-up or on outbox rows holds, and how long a writer
    /// keeps its own outbox rows before a relay may publish them. After a crash, what
    /// the dead process held is taken over within this time. Default: 5 s.
    #[serde(with = "crate::serde_millis")]
    pub claim_lease: Duration,
    /// How often the outbox relay looks for rows left unpublished. Default: 500 ms.
    #[serde(with = "crate::serde_millis")]
    pub outbox_poll_interval: Duration,
    /// Whether the outbox is stored: `None` (the default) stores it when the bus is
    /// durable (NATS JetStream), where a message committed but not yet published must
    /// survive a crash; an in-process bus loses everything with the process anyway, and
    /// a start re-sends the commands unfinished sagas wait on.
    pub outbox: Option<bool>,
    /// How long a consumed message's id stays in the inbox (a redelivery or a repeated
    /// publish within this time is recognised and dropped). At least
    /// [`MAX_REQUEST_TTL`], or `start` refuses it. Default: 24 h.
    #[serde(with = "crate::serde_millis")]
    pub inbox_retention: Duration,
    /// Finished (completed or compensated) sagas are deleted, with their journals and
    /// dead letters, this long after their last transition; `None` keeps them forever.
    /// Keyed sagas ([`Runtime::start_saga_keyed`](super::Runtime::start_saga_keyed)) are
    /// never deleted: a key names one saga for good. One process at a time sweeps (a
    /// lease in the store). Default: 7 days.
    #[serde(with = "crate::serde_millis_opt")]
    pub retention: Option<Duration>,
    /// How often the retention sweeper runs (it also trims the inbox past
    /// `inbox_retention`). Default: 60 s.
    #[serde(with = "crate::serde_millis")]
    pub sweep_interval: Duration,
    /// Attempts of one retry run journaled one by one; past them the run is compacted
    /// (a snapshot, then nothing until the run ends), so a step retried for days keeps
    /// a bounded journal. Default: 10.
    pub journal_retry_window: u32,
    /// How often the sampled gauges (sagas in flight, outbox backlog and lag, reply
    /// consumer lag) are read from the store and the broker; zero never samples them.
    /// Default: 10 s.
    #[serde(with = "crate::serde_millis")]
    pub metrics_interval: Duration,
    /// Operators whose signed requests are applied: name -> public NKey (`U...`). Empty
    /// (the default): a request is applied from anyone the broker lets publish on
    /// `skald.op.>`, and the name it claims is recorded as claimed. Not empty: a request
    /// must be signed by a listed key, and is recorded under that key's name; anything
    /// else is dead-lettered with the reason. A key that is not a public user NKey is
    /// refused at start.
    pub operators: BTreeMap<String, String>,
    /// Most headers an inbound message may carry; more is dead-lettered. Default: 64.
    pub max_headers: usize,
    /// Most bytes of one header (name and value) of an inbound message. Default: 4096.
    pub max_header_bytes: usize,
    /// Most body bytes of an inbound message. Default: 1 MiB (the broker's own default
    /// max payload).
    pub max_message_bytes: usize,
    /// Most bytes of inbound messages held at once (being applied or waiting for
    /// capacity): memory under a flood is bounded by bytes, not only by count. Default:
    /// 64 MiB.
    pub max_in_flight_bytes: usize,
    /// A message deferred this many times for version skew (no build running here can
    /// apply it) is dead-lettered with the reason. With the redelivery backoff capped at
    /// 30 s, the default outlasts a deploy by far (about 3.5 days), while a message no
    /// build will ever take (a retired definition version) stops occupying the
    /// consumer's pending slots. Default: 10,000.
    pub max_deferrals: u32,
    /// How often the sagas that [`SagaHandle`](super::SagaHandle)s wait for are looked
    /// up in the store (one query for all of them), for the ones another process
    /// settles: the most such an outcome reaches its handle late. This process's own
    /// settles reach their handles at once. Default: 500 ms.
    #[serde(with = "crate::serde_millis")]
    pub outcome_poll_interval: Duration,
    /// Whether this runtime consumes replies and operator requests. Default: true.
    /// False makes a runtime that starts sagas and waits on their handles while the
    /// orchestrators sharing its store and broker apply the replies (a service in front
    /// of orchestrator nodes): its sagas' replies go to them. Such a runtime reads
    /// nothing from the bus: it serves no start requests either (`start_requests`), so
    /// it may run as a NATS user that may only publish.
    pub consume: bool,
    /// Whether this runtime answers start requests on `skald.start.<saga_type>` for
    /// the types it registers (docs/protocol.md, "Starting a saga"), in the queue group
    /// `reply_group`: every request goes to one of the runtimes serving its type. Only
    /// a runtime that consumes (`consume`) serves them; on a bus that does not serve
    /// requests the runtime runs without them (and logs it). Default: true.
    pub start_requests: bool,
    /// Start requests being applied at once; past it (or past a budget of
    /// `max_in_flight_bytes` of their own) a request is refused `unavailable` at once,
    /// its body dropped, nothing stored. It is also how many requests the bus may hold
    /// received and not yet read, per saga type (at least 64; NATS: the subscription's
    /// capacity), past which it drops them unanswered. Default: 256.
    pub max_in_flight_starts: usize,
    /// The reply subjects start requests are answered on: those beginning with one of
    /// these prefixes. A prefix ending in `.` matches what follows it; any other (such
    /// as `_INBOX_`, for the per-user prefixes `_INBOX_<user>` of docs/security.md) must
    /// be followed by a token of at least one character and a `.`. Whatever is listed,
    /// a reply subject with a wildcard (`*`, `>`), white space, an empty token, or
    /// beginning with `$` or `skald.` is never answered; an empty prefix, or one
    /// beginning with `$` or `skald.`, matches nothing. A request naming another reply
    /// subject is neither applied nor answered (counted as `forged_reply` in
    /// `skald_start_requests_total`): the broker lets a requester name any reply
    /// subject, and an orchestrator answering with `allow_responses` may publish there
    /// whatever its permissions say. A request with no reply subject is applied and
    /// answered to nobody. Default: `_INBOX.` and `_INBOX_`.
    pub start_reply_prefixes: Vec<String>,
    /// A start request not yet under way this long after it was received (the store
    /// slow to answer whether its key's saga exists, under load) is refused
    /// `unavailable`, nothing stored, rather than started after its requester has
    /// probably given up (and, without a key, sent it again). Default: 5 s.
    #[serde(with = "crate::serde_millis")]
    pub max_start_wait: Duration,
    /// How many partitions the sagas are spread over (docs/scaling.md): fixed for the
    /// life of a store. The first runtime on a store records its count (this, or 16 when
    /// unset); later runtimes take the recorded count, and one configured with another
    /// count refuses to start. At most 1024. Default: unset.
    pub partitions: Option<u32>,
    /// How long a node's lease on its partitions (and on its membership) lasts without
    /// renewal: a node that dies leaves its partitions to the others after this long.
    /// Renewed every fifth of it. Only nodes that consume from a durable bus (NATS)
    /// lease partitions; a runtime on the in-process bus runs every partition, one that
    /// does not consume (`consume`) none. At least 1 s. Default: 5 s.
    #[serde(with = "crate::serde_millis")]
    pub partition_lease: Duration,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            arbiters: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            idle_timeout: Duration::from_secs(30),
            wakeup_poll_interval: Duration::from_millis(500),
            max_in_flight_replies: 4096,
            commit_max_batch: 512,
            redelivery_delay: Duration::from_millis(500),
            publish_events: true,
            reply_group: "skald-orchestrator".into(),
            max_deliveries: 100,
            claim_lease: Duration::from_secs(5),
            outbox_poll_interval: Duration::from_millis(500),
            inbox_retention: Duration::from_secs(24 * 3600),
            outbox: None,
            journal_retry_window: 10,
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            sweep_interval: Duration::from_secs(60),
            metrics_interval: Duration::from_secs(10),
            operators: BTreeMap::new(),
            max_headers: 64,
            max_header_bytes: 4096,
            max_message_bytes: 1024 * 1024,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_deferrals: 10_000,
            outcome_poll_interval: Duration::from_millis(500),
            consume: true,
            start_requests: true,
            max_in_flight_starts: 256,
            start_reply_prefixes: vec!["_INBOX.".into(), "_INBOX_".into()],
            max_start_wait: Duration::from_secs(5),
            partitions: None,
            partition_lease: Duration::from_secs(5),
        }
    }
}

impl RuntimeOptions {
    /// The settings `start` refuses, with what to change.
    pub(crate) fn validate(&self) -> Result<(), RuntimeError> {
        // An operator request is deduplicated by the inbox for as long as it may be
        // applied: the inbox must remember it at least that long.
        if self.inbox_retention < MAX_REQUEST_TTL {
            return Err(RuntimeError::InboxRetentionTooShort {
                configured: self.inbox_retention,
                minimum: MAX_REQUEST_TTL,
            });
        }
        if let Some(n) = self.partitions
            && !(1..=skald_core::ids::MAX_PARTITIONS).contains(&n)
        {
            return Err(RuntimeError::InvalidOption(format!(
                "partitions = {n}: a deployment has 1 to {} partitions",
                skald_core::ids::MAX_PARTITIONS
            )));
        }
        if self.partition_lease < Duration::from_secs(1) {
            return Err(RuntimeError::InvalidOption(format!(
                "partition-lease = {:?}: at least 1 s (it is renewed every fifth of it)",
                self.partition_lease
            )));
        }
        for (name, key) in &self.operators {
            crate::auth::check_operator_key(key).map_err(|e| RuntimeError::InvalidOperatorKey {
                name: name.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_validation() {
        assert_eq!(RuntimeOptions::default().validate(), Ok(()));
    }

    #[test]
    fn an_inbox_shorter_than_a_request_lives_is_refused() {
        let options = RuntimeOptions {
            inbox_retention: MAX_REQUEST_TTL - Duration::from_secs(1),
            ..RuntimeOptions::default()
        };
        assert!(matches!(
            options.validate(),
            Err(RuntimeError::InboxRetentionTooShort { minimum, .. }) if minimum == MAX_REQUEST_TTL
        ));
    }

    #[test]
    fn an_operator_key_that_is_not_a_public_nkey_is_refused() {
        let options = RuntimeOptions {
            operators: [("alice".to_owned(), "SUAnot-a-public-key".to_owned())].into(),
            ..RuntimeOptions::default()
        };
        assert!(matches!(
            options.validate(),
            Err(RuntimeError::InvalidOperatorKey { name, .. }) if name == "alice"
        ));
    }
}
