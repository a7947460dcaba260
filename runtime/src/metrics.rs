//! What the runtime measures, recorded through the [`metrics`] facade: a no-op
//! until the process installs a recorder (the facade's `skald::metrics::serve` installs
//! a Prometheus one). docs/observability.md lists every metric with its meaning.
//!
//! Handles are registered once, when the runtime starts, for every registered saga
//! type, step and kind, so recording on the hot path is an atomic operation: no label
//! strings built, no registry lookup. The flip side: a recorder installed after
//! [`crate::runtime::RuntimeBuilder::start`] sees nothing of that runtime, so install
//! it first.
//!
//! Gauges that describe shared state (sagas in flight, the outbox, the reply
//! consumer's lag) are sampled from the store and the broker every
//! `RuntimeOptions::metrics_interval` by `sampler`, so they are right across
//! restarts, passivation and several processes sharing one store (each process
//! reports the same shared value: aggregate them with `max`, not `sum`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ::metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use tracing::debug;

use crate::actors::Shared;
use crate::definition::Definition;
use crate::ids::{CommandKind, SagaType};
use crate::machine::{Effect, EventKind, Input, Phase, SagaState, Timestamp};

/// `skald_sagas_started_total{saga_type}`: sagas started (counter).
pub const SAGAS_STARTED: &str = "skald_sagas_started_total";
/// `skald_sagas_completed_total{saga_type}`: sagas whose every step succeeded.
pub const SAGAS_COMPLETED: &str = "skald_sagas_completed_total";
/// `skald_sagas_compensated_total{saga_type}`: sagas that finished compensated.
pub const SAGAS_COMPENSATED: &str = "skald_sagas_compensated_total";
/// `skald_sagas_dead_lettered_total{saga_type}`: sagas dead-lettered for an operator.
pub const SAGAS_DEAD_LETTERED: &str = "skald_sagas_dead_lettered_total";
/// `skald_step_duration_seconds{saga_type,step,kind}`: command sent to reply applied,
/// per attempt (histogram).
pub const STEP_DURATION: &str = "skald_step_duration_seconds";
/// `skald_step_retries_total{saga_type,step,kind}`: retries scheduled.
pub const STEP_RETRIES: &str = "skald_step_retries_total";
/// `skald_sagas_in_flight{saga_type}`: sagas running or compensating in the store
/// (sampled gauge).
pub const SAGAS_IN_FLIGHT: &str = "skald_sagas_in_flight";
/// `skald_live_actors`: saga instance actors in memory in this process (gauge).
pub const LIVE_ACTORS: &str = "skald_live_actors";
/// `skald_outbox_backlog`: unpublished outbox rows (sampled gauge).
pub const OUTBOX_BACKLOG: &str = "skald_outbox_backlog";
/// `skald_outbox_lag_seconds`: age of the oldest unpublished outbox row (sampled gauge).
pub const OUTBOX_LAG: &str = "skald_outbox_lag_seconds";
/// `skald_reply_consumer_lag`: replies not yet processed by the reply consumer group
/// (sampled gauge; buses that cannot tell do not set it).
pub const REPLY_CONSUMER_LAG: &str = "skald_reply_consumer_lag";
/// `skald_commit_conflicts_total{saga_type}`: commits of a saga's transition refused
/// because another writer moved the saga on since this process read it (another process
/// applied an input to it): the instance reloads the saga and decides again (counter).
pub const COMMIT_CONFLICTS: &str = "skald_commit_conflicts_total";
/// `skald_cold_activations_total{saga_type}`: instance actors activated by loading their
/// saga from the store, i.e. not created by a start in this process: the first input of
/// a saga started elsewhere, one that passivated, or one whose actor crashed (counter).
pub const COLD_ACTIVATIONS: &str = "skald_cold_activations_total";
/// `skald_partitions_held`: partitions this node holds (gauge; docs/scaling.md).
pub const PARTITIONS_HELD: &str = "skald_partitions_held";
/// `skald_partition_handovers_total{event}`: partitions this node `taken`, `released`
/// (handed over cleanly) or `lost` (its lease ended before it could renew it) (counter).
pub const PARTITION_HANDOVERS: &str = "skald_partition_handovers_total";
/// `skald_store_commit_duration_seconds`: one group commit's store transaction.
pub const COMMIT_DURATION: &str = "skald_store_commit_duration_seconds";
/// `skald_store_commit_batch_size`: writes in one group commit.
pub const COMMIT_BATCH_SIZE: &str = "skald_store_commit_batch_size";

/// `skald_participant_commands_total{group,outcome}`: commands a participant built with
/// [`crate::participant`] answered, by outcome (`success`, `failure`, `retryable`).
pub const PARTICIPANT_COMMANDS: &str = "skald_participant_commands_total";
/// `skald_participant_command_duration_seconds{group,outcome}`: command received to
/// reply published, in a participant built with [`crate::participant`].
pub const PARTICIPANT_DURATION: &str = "skald_participant_command_duration_seconds";

/// `skald_start_requests_total{saga_type,answer}`: start requests over the bus
/// (`skald.start.<saga_type>`), by answer: `started`, `existing`, the refusal's code
/// (`invalid_data`, `invalid_key`, `invalid_request`, `too_large`, `unavailable`,
/// `version_skew`, `unknown_outcome`, `internal`), or `forged_reply` for a request
/// neither applied nor answered because its reply subject is no requester's inbox
/// (`RuntimeOptions::start_reply_prefixes`).
pub const START_REQUESTS: &str = "skald_start_requests_total";

/// Label: the saga type.
pub const LABEL_SAGA_TYPE: &str = "saga_type";
/// Label: the step name.
pub const LABEL_STEP: &str = "step";
/// Label: `action` or `compensation`.
pub const LABEL_KIND: &str = "kind";

/// Registers the help text and units of every metric with the installed recorder.
pub fn describe() {
    describe_counter!(SAGAS_STARTED, "Sagas started.");
    describe_counter!(SAGAS_COMPLETED, "Sagas finished with every step succeeded.");
    describe_counter!(
        SAGAS_COMPENSATED,
        "Sagas finished after compensating their completed steps."
    );
    describe_counter!(
        SAGAS_DEAD_LETTERED,
        "Sagas dead-lettered: a compensation could not be done."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Step attempts: command sent to reply applied."
    );
    describe_counter!(STEP_RETRIES, "Step retries scheduled.");
    describe_counter!(
        COMMIT_CONFLICTS,
        "Transitions refused at commit: another writer moved the saga on (reloaded and decided again)."
    );
    describe_counter!(
        COLD_ACTIVATIONS,
        "Saga instance actors activated by loading the saga from the store (not started here)."
    );
    describe_gauge!(PARTITIONS_HELD, "Partitions this node holds.");
    describe_counter!(
        PARTITION_HANDOVERS,
        "Partitions taken, released (handed over) or lost (lease ended) by this node."
    );
    describe_gauge!(
        SAGAS_IN_FLIGHT,
        "Sagas running or compensating in the store (sampled)."
    );
    describe_gauge!(
        LIVE_ACTORS,
        "Saga instance actors in memory in this process."
    );
    describe_gauge!(OUTBOX_BACKLOG, "Unpublished outbox rows (sampled).");
    describe_gauge!(
        OUTBOX_LAG,
        Unit::Seconds,
        "Age of the oldest unpublished outbox row (sampled)."
    );
    describe_gauge!(
        REPLY_CONSUMER_LAG,
        "Replies not yet processed by the reply consumer group (sampled)."
    );
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Group commit store transactions."
    );
    describe_histogram!(COMMIT_BATCH_SIZE, "Writes per group commit.");
    describe_counter!(
        PARTICIPANT_COMMANDS,
        "Commands answered by a participant, by outcome."
    );
    describe_counter!(
        START_REQUESTS,
        "Start requests over the bus, by answer (started, existing, or the refusal's code)."
    );
    describe_histogram!(
        PARTICIPANT_DURATION,
        Unit::Seconds,
        "Participant: command received to reply published."
    );
}

/// A participant's handles, one per outcome (registered when it starts serving).
pub(crate) struct ParticipantMetrics {
    by_outcome: [(Counter, Histogram); 3],
}

impl ParticipantMetrics {
    pub(crate) fn new(group: &str) -> Self {
        let make = |outcome: &'static str| {
            let labels = [("group", group.to_owned()), ("outcome", outcome.to_owned())];
            (
                counter!(PARTICIPANT_COMMANDS, &labels),
                histogram!(PARTICIPANT_DURATION, &labels),
            )
        };
        ParticipantMetrics {
            by_outcome: [make("success"), make("failure"), make("retryable")],
        }
    }

    pub(crate) fn record(&self, outcome: &crate::wire::Outcome, took: Duration) {
        use crate::wire::Outcome;
        let (count, duration) = &self.by_outcome[match outcome {
            Outcome::Success(_) => 0,
            Outcome::Failure(_) => 1,
            Outcome::Retryable(_) => 2,
        }];
        count.increment(1);
        duration.record(took.as_secs_f64());
    }
}

struct KindMetrics {
    duration: Histogram,
    retries: Counter,
}

impl KindMetrics {
    fn new(ty: &SagaType, step: &str, kind: CommandKind) -> Self {
        let labels = [
            (LABEL_SAGA_TYPE, ty.as_str().to_owned()),
            (LABEL_STEP, step.to_owned()),
            (LABEL_KIND, kind.as_str().to_owned()),
        ];
        KindMetrics {
            duration: histogram!(STEP_DURATION, &labels),
            retries: counter!(STEP_RETRIES, &labels),
        }
    }
}

struct StepMetrics {
    action: KindMetrics,
    compensation: Option<KindMetrics>,
}

struct TypeMetrics {
    started: Counter,
    completed: Counter,
    compensated: Counter,
    dead_lettered: Counter,
    conflicts: Counter,
    cold_activations: Counter,
    in_flight: Gauge,
    /// By definition version, then step index (versions may differ in their steps; a
    /// step of the same name shares its series across versions).
    steps: BTreeMap<u32, Vec<StepMetrics>>,
}

/// The runtime's metric handles.
pub(crate) struct Metrics {
    types: HashMap<SagaType, TypeMetrics>,
    pub(crate) live_actors: Gauge,
    pub(crate) partitions_held: Gauge,
    outbox_backlog: Gauge,
    outbox_lag: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers the handles of every registered definition (every version).
    pub(crate) fn new<'a>(definitions: impl IntoIterator<Item = &'a Arc<Definition>>) -> Self {
        describe();
        let mut types: HashMap<SagaType, TypeMetrics> = HashMap::new();
        for def in definitions {
            let ty = def.saga_type();
            let m = types.entry(ty.clone()).or_insert_with(|| {
                let label = [(LABEL_SAGA_TYPE, ty.as_str().to_owned())];
                TypeMetrics {
                    started: counter!(SAGAS_STARTED, &label),
                    completed: counter!(SAGAS_COMPLETED, &label),
                    compensated: counter!(SAGAS_COMPENSATED, &label),
                    dead_lettered: counter!(SAGAS_DEAD_LETTERED, &label),
                    conflicts: counter!(COMMIT_CONFLICTS, &label),
                    cold_activations: counter!(COLD_ACTIVATIONS, &label),
                    in_flight: gauge!(SAGAS_IN_FLIGHT, &label),
                    steps: BTreeMap::new(),
                }
            });
            let steps = def
                .steps()
                .iter()
                .map(|s| StepMetrics {
                    action: KindMetrics::new(ty, s.name().as_str(), CommandKind::Action),
                    compensation: s.compensation().map(|_| {
                        KindMetrics::new(ty, s.name().as_str(), CommandKind::Compensation)
                    }),
                })
                .collect();
            m.steps.insert(def.version(), steps);
        }
        Metrics {
            types,
            live_actors: gauge!(LIVE_ACTORS),
            partitions_held: gauge!(PARTITIONS_HELD),
            outbox_backlog: gauge!(OUTBOX_BACKLOG),
            outbox_lag: gauge!(OUTBOX_LAG),
        }
    }

    fn kind(
        &self,
        ty: &SagaType,
        version: u32,
        step: usize,
        kind: CommandKind,
    ) -> Option<&KindMetrics> {
        let s = self.types.get(ty)?.steps.get(&version)?.get(step)?;
        match kind {
            CommandKind::Action => Some(&s.action),
            CommandKind::Compensation => s.compensation.as_ref(),
        }
    }

    /// Counts a commit of a `saga_type` saga refused for a version conflict.
    pub(crate) fn commit_conflict(&self, saga_type: &SagaType) {
        if let Some(t) = self.types.get(saga_type) {
            t.conflicts.increment(1);
        }
    }

    /// Counts a partition `taken`, `released` or `lost`.
    pub(crate) fn partition_handover(&self, event: &'static str) {
        counter!(PARTITION_HANDOVERS, "event" => event).increment(1);
    }

    /// Counts an instance actor of a `saga_type` saga activated from the store.
    pub(crate) fn cold_activation(&self, saga_type: &SagaType) {
        if let Some(t) = self.types.get(saga_type) {
            t.cold_activations.increment(1);
        }
    }

    /// Records a committed transition: `before` is the state the input was applied to,
    /// `effects` what the transition produced, `now` the time it was applied.
    pub(crate) fn transition(
        &self,
        def: &Definition,
        before: &SagaState,
        input: &Input,
        effects: &[Effect],
        now: Timestamp,
    ) {
        let Some(ty) = self.types.get(&before.saga_type) else {
            return;
        };
        // A reply to the attempt in flight: how long since its command was sent (the
        // deadline is the send time plus the step's timeout, both in the saga's state,
        // so this holds across restarts and passivation; millisecond resolution).
        if let (
            Input::StepSucceeded { kind, attempt, .. } | Input::StepFailed { kind, attempt, .. },
            Some(p),
        ) = (input, before.pending)
            && p.kind == *kind
            && p.attempt == *attempt
            && let Phase::AwaitingReply { deadline } = p.phase
            && let Some(step) = def.step(p.step)
            && let Some(m) = self.kind(&before.saga_type, def.version(), p.step, p.kind)
        {
            let sent = Timestamp(
                deadline
                    .as_millis()
                    .saturating_sub(u64::try_from(step.timeout().as_millis()).unwrap_or(0)),
            );
            m.duration.record(sent.until(now).as_secs_f64());
        }
        for effect in effects {
            let Effect::EmitLifecycleEvent(ev) = effect else {
                continue;
            };
            match ev.event {
                EventKind::Started => ty.started.increment(1),
                EventKind::Completed => ty.completed.increment(1),
                EventKind::Compensated => ty.compensated.increment(1),
                EventKind::DeadLettered => ty.dead_lettered.increment(1),
                EventKind::RetryScheduled => {
                    if let (Some(step), Some(kind)) = (&ev.step, ev.kind)
                        && let Some(i) = def.step_index(step.as_str())
                        && let Some(m) = self.kind(&before.saga_type, def.version(), i, kind)
                    {
                        m.retries.increment(1);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Samples the shared gauges every `metrics_interval` (zero: never): sagas in flight per
/// type, the outbox backlog and lag, and the reply consumer's lag.
pub(crate) async fn sampler(shared: Arc<Shared>) {
    let interval = shared.options.metrics_interval;
    if interval.is_zero() {
        return;
    }
    let group = &shared.options.reply_group;
    let m = &shared.metrics;
    loop {
        // The consumers read: one per registered type on a bus only this runtime reads;
        // on a node leasing partitions, one per type and partition held; a runtime that
        // reads nothing reports the deployment's, every partition's.
        let consumers: Vec<(String, String)> = match shared.ownership.mode() {
            mode @ (crate::partitions::Mode::Leased | crate::partitions::Mode::Nothing) => {
                let held: Arc<[u32]> = match mode {
                    crate::partitions::Mode::Leased => shared.ownership.held(),
                    _ => (0..shared.ownership.count()).collect(),
                };
                shared
                    .definitions
                    .types()
                    .flat_map(|t| {
                        let held = Arc::clone(&held);
                        (0..held.len()).map(move |i| {
                            let p = &held[i];
                            (
                                crate::wire::reply_partition_filter(t, *p),
                                crate::runtime::partition_consumer(group, t, *p),
                            )
                        })
                    })
                    .collect()
            }
            _ => shared
                .definitions
                .types()
                .map(|t| {
                    (
                        crate::wire::reply_filter(t),
                        crate::runtime::reply_consumer(group, t),
                    )
                })
                .collect(),
        };
        match shared.store.in_flight_counts().await {
            Ok(counts) => {
                for (ty, tm) in &m.types {
                    let n = counts.iter().find(|(t, _)| t == ty).map_or(0, |(_, n)| *n);
                    tm.in_flight.set(n as f64);
                }
            }
            Err(e) => debug!(error = %e, "metrics: counting sagas in flight failed"),
        }
        match shared.store.outbox_backlog().await {
            Ok((rows, oldest)) => {
                m.outbox_backlog.set(rows as f64);
                let lag = oldest.map_or(Duration::ZERO, |t| t.until(shared.clock.now()));
                m.outbox_lag.set(lag.as_secs_f64());
            }
            Err(e) => debug!(error = %e, "metrics: reading the outbox backlog failed"),
        }
        // One consumer per registered type reads its replies: their lags add up.
        // (A node holding no partition reads none: 0, not the last value it had.)
        let mut total: Option<u64> =
            (shared.ownership.mode() == crate::partitions::Mode::Leased).then_some(0);
        for (subject, group) in &consumers {
            match shared.bus.consumer_lag(subject, group).await {
                Ok(Some(lag)) => total = Some(total.unwrap_or(0) + lag),
                Ok(None) => {}
                Err(e) => debug!(error = %e, "metrics: reading a reply consumer's lag failed"),
            }
        }
        // Registered on the first answer: a bus that cannot tell (the in-process one)
        // shows no series rather than a misleading 0.
        if let Some(lag) = total {
            gauge!(REPLY_CONSUMER_LAG).set(lag as f64);
        }
        tokio::time::sleep(interval).await;
    }
}

/// Histogram buckets for the Prometheus exporter: seconds for durations, counts for
/// batch sizes. The exporter's defaults suit web requests; these suit sagas (a step of
/// a millisecond to a minute) and group commits (1 to thousands of writes).
pub mod buckets {
    /// Step and commit durations, seconds.
    pub const SECONDS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    /// Group commit batch sizes.
    pub const BATCH: &[f64] = &[
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
    ];
}

/// Counts one start request answered over the bus.
pub(crate) fn start_request(saga_type: &SagaType, answer: &str) {
    counter!(
        START_REQUESTS,
        LABEL_SAGA_TYPE => saga_type.as_str().to_owned(),
        "answer" => answer.to_owned()
    )
    .increment(1);
}
