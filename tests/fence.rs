//! The TCC fence on real databases: a SQLite file and PostgreSQL (a database of the
//! test's own on the server at `SKALD_TEST_PG_URL`, which `scripts/test` provisions).
//!
//! - every rule (the conformance checks of `skald::participant::fence::conformance`),
//!   once per store;
//! - replicas racing: two fences (two pools) on one database, many tasks claiming the
//!   same 50 keys at once: each effect applied exactly once; actions racing their
//!   compensations: every applied action undone, every refused one not;
//! - a compensation before its action: the action refused by another replica;
//! - leases: a crashed holder's claim taken over once the lease has passed, by an action
//!   or by a compensation (which then refuses the action);
//! - the outcome recorded in the handler's own transaction (`finish_action_in`),
//!   committed and rolled back;
//! - the participant helper end to end: two replicas (two consumer groups of an
//!   in-process bus, so each gets every command) sharing one fence;
//! - group commit: hundreds of concurrent actions and compensations on two fences
//!   racing on the same keys (many operations per transaction, several on one key):
//!   each effect applied exactly once; a batch whose transaction fails (a held lock, a
//!   serialization failure, a write the database refuses) answers every caller an error
//!   and commits nothing; a key the database refuses fails only its own operations.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{DEADLINE, PgDatabase, TempDir, Wait};
use futures_util::StreamExt;
use serde_json::{Value, json};
use skald::adapters::fence::{PgFence, SqliteFence};
use skald::adapters::memory::MemoryBus;
use skald::ids::{CommandKind, SagaId, SagaType, StepName, idempotency_key};
use skald::machine::{Command, Timestamp};
use skald::participant::fence::conformance::{self, Subject};
use skald::participant::fence::{
    ACTION_IN_PROGRESS_CODE, ActionState, CompensationState, IN_PROGRESS_CODE, refused,
};
use skald::participant::{
    self, ActionClaim, CompensationClaim, DEFAULT_LEASE, Fence, ParticipantOptions,
};
use skald::ports::{Bus, Clock, ManualClock};
use skald::wire::{self, IncomingCommand, Outcome};

/// The lease of the conformance checks (the clock is a `ManualClock`).
const LEASE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A database of the test's own, removed when dropped.
struct FenceDb {
    kind: Kind,
    url: String,
    _dir: Option<TempDir>,
    _pg: Option<PgDatabase>,
}

impl FenceDb {
    async fn new(kind: Kind) -> FenceDb {
        match kind {
            Kind::Sqlite => {
                let dir = TempDir::new();
                FenceDb {
                    kind,
                    url: format!("sqlite://{}", dir.0.join("fence.db").display()),
                    _dir: Some(dir),
                    _pg: None,
                }
            }
            Kind::Postgres => {
                let pg = PgDatabase::create().await;
                FenceDb {
                    kind,
                    url: pg.url(),
                    _dir: None,
                    _pg: Some(pg),
                }
            }
        }
    }

    /// A fence of its own (its own pool: another replica), with `lease` and, when
    /// given, `clock`.
    async fn fence(&self, lease: Duration, clock: Option<Arc<dyn Clock>>) -> Arc<dyn Fence> {
        match self.kind {
            Kind::Sqlite => {
                let mut f = SqliteFence::connect(&self.url)
                    .await
                    .expect("open the SQLite fence")
                    .with_lease(lease);
                if let Some(c) = clock {
                    f = f.with_clock(c);
                }
                Arc::new(f)
            }
            Kind::Postgres => {
                let mut f = PgFence::connect(&self.url)
                    .await
                    .expect("connect the PostgreSQL fence")
                    .with_lease(lease);
                if let Some(c) = clock {
                    f = f.with_clock(c);
                }
                Arc::new(f)
            }
        }
    }
}

/// One test per conformance check per store.
macro_rules! rules {
    ($($rule:ident),* $(,)?) => {
        mod sqlite_rules {
            use super::*;
            $(
                #[tokio::test]
                async fn $rule() {
                    check(Kind::Sqlite, |s| Box::pin(conformance::$rule(s))).await;
                }
            )*
        }
        mod postgres_rules {
            use super::*;
            $(
                #[tokio::test]
                async fn $rule() {
                    check(Kind::Postgres, |s| Box::pin(conformance::$rule(s))).await;
                }
            )*
        }
    };
}

rules!(
    success_is_answered_to_every_delivery,
    failure_is_answered_to_every_delivery,
    a_live_claim_is_in_progress,
    retryable_is_remembered_per_attempt,
    compensation_undoes_a_success_once,
    a_failed_compensation_is_retried,
    compensation_first_refuses_the_action,
    nothing_applied_is_an_empty_rollback,
    compensation_waits_for_a_running_action,
    an_expired_action_claim_is_taken_over,
    compensation_takes_over_an_expired_action,
    an_expired_compensation_claim_is_taken_over,
);

/// Runs one conformance check against a fresh fence of `kind` on a manual clock.
async fn check(
    kind: Kind,
    run: impl for<'a> FnOnce(Subject<'a>) -> futures_util::future::BoxFuture<'a, Result<(), String>>,
) {
    let db = FenceDb::new(kind).await;
    let clock = ManualClock::new(Timestamp(1_700_000_000_000));
    let fence = db.fence(LEASE, Some(Arc::new(clock.clone()))).await;
    let subject = Subject {
        fence: fence.as_ref(),
        clock: &clock,
        lease: LEASE,
    };
    if let Err(e) = run(subject).await {
        panic!("{kind:?}: {e}");
    }
}

/// Two replicas (fences on two pools), four tasks each, all claiming the same 50 keys
/// in different orders: each key runs once, and every delivery is answered with its
/// success.
async fn racing_replicas_apply_each_effect_once(kind: Kind) {
    let db = FenceDb::new(kind).await;
    let replicas = [
        db.fence(DEFAULT_LEASE, None).await,
        db.fence(DEFAULT_LEASE, None).await,
    ];
    let applied: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut tasks = Vec::new();
    for (r, fence) in replicas.iter().enumerate() {
        for t in 0..4usize {
            let fence = Arc::clone(fence);
            let applied = Arc::clone(&applied);
            tasks.push(tokio::spawn(async move {
                for i in 0..50usize {
                    let key = format!("race:{}:action", (i + 7 * t + 3 * r) % 50);
                    let attempt = u32::try_from(1 + t % 2).expect("small");
                    loop {
                        match fence.claim_action(&key, attempt).await.expect("claim") {
                            ActionClaim::Run => {
                                *applied
                                    .lock()
                                    .expect("lock")
                                    .entry(key.clone())
                                    .or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(2)).await;
                                let answer = fence
                                    .finish_action(&key, attempt, &Outcome::Success(json!(key)))
                                    .await
                                    .expect("finish");
                                assert_eq!(answer, Outcome::Success(json!(key)));
                                break;
                            }
                            ActionClaim::Answer(Outcome::Success(v)) => {
                                assert_eq!(v, json!(key), "the recorded output");
                                break;
                            }
                            ActionClaim::Answer(Outcome::Retryable(e))
                                if e.code == IN_PROGRESS_CODE =>
                            {
                                tokio::time::sleep(Duration::from_millis(3)).await;
                            }
                            ActionClaim::Answer(other) => panic!("{key}: unexpected {other:?}"),
                        }
                    }
                }
            }));
        }
    }
    // The claimers retry until their key settles: bounded here, so a fence that never
    // settles fails the test instead of hanging it.
    for t in tasks {
        tokio::time::timeout(DEADLINE, t)
            .await
            .expect("every claimer settles its keys in time")
            .expect("a claimer panicked");
    }
    let applied = applied.lock().expect("lock").clone();
    assert_eq!(applied.len(), 50, "every key ran");
    for (key, n) in &applied {
        assert_eq!(*n, 1, "{kind:?}: {key} applied {n} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_racing_replicas_apply_each_effect_once() {
    racing_replicas_apply_each_effect_once(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_racing_replicas_apply_each_effect_once() {
    racing_replicas_apply_each_effect_once(Kind::Postgres).await;
}

/// For 50 keys, one replica delivers the action while the other delivers its
/// compensation, at once: an action that ran is undone (with its output) exactly once;
/// one refused never ran. Never an action applied and left.
async fn actions_racing_their_compensations_are_never_left_applied(kind: Kind) {
    let db = FenceDb::new(kind).await;
    let a = db.fence(DEFAULT_LEASE, None).await;
    let b = db.fence(DEFAULT_LEASE, None).await;
    let applied: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let undone: Arc<Mutex<HashMap<String, Vec<Option<Value>>>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let key = format!("pair:{i}:action");
        let (fence, applied, k) = (Arc::clone(&a), Arc::clone(&applied), key.clone());
        tasks.push(tokio::spawn(async move {
            // A retryable answer is remembered for its attempt: retry with the next one,
            // as skald does.
            for attempt in 1.. {
                match fence.claim_action(&k, attempt).await.expect("claim") {
                    ActionClaim::Run => {
                        *applied.lock().expect("lock").entry(k.clone()).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        fence
                            .finish_action(&k, attempt, &Outcome::Success(json!({"id": k})))
                            .await
                            .expect("finish");
                        return;
                    }
                    ActionClaim::Answer(o) if o == refused() => return,
                    ActionClaim::Answer(Outcome::Retryable(_)) => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    ActionClaim::Answer(other) => panic!("{k}: unexpected {other:?}"),
                }
            }
        }));
        let (fence, undone, k) = (Arc::clone(&b), Arc::clone(&undone), key);
        tasks.push(tokio::spawn(async move {
            for attempt in 1.. {
                match fence.claim_compensation(&k, attempt).await.expect("claim") {
                    CompensationClaim::Undo { action_output } => {
                        undone
                            .lock()
                            .expect("lock")
                            .entry(k.clone())
                            .or_default()
                            .push(action_output);
                        fence
                            .finish_compensation(&k, attempt, &Outcome::Success(json!("refunded")))
                            .await
                            .expect("finish");
                        return;
                    }
                    CompensationClaim::Answer(Outcome::Success(_)) => return,
                    CompensationClaim::Answer(Outcome::Retryable(e)) => {
                        assert!(
                            e.code == ACTION_IN_PROGRESS_CODE || e.code == IN_PROGRESS_CODE,
                            "{e}"
                        );
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    CompensationClaim::Answer(other) => panic!("{k}: unexpected {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(DEADLINE, t)
            .await
            .expect("every task settles its key in time")
            .expect("a task panicked");
    }
    let applied = applied.lock().expect("lock").clone();
    let undone = undone.lock().expect("lock").clone();
    for i in 0..50 {
        let key = format!("pair:{i}:action");
        let ran = applied.get(&key).copied().unwrap_or(0);
        let undos = undone.get(&key).cloned().unwrap_or_default();
        assert!(ran <= 1, "{kind:?}: {key} applied {ran} times");
        if ran == 1 {
            assert_eq!(
                undos,
                vec![Some(json!({"id": key}))],
                "{kind:?}: {key} applied, so undone once with its output"
            );
        } else {
            assert!(
                undos.is_empty(),
                "{kind:?}: {key} never applied, never undone"
            );
            let record = a.record(&key).await.expect("record").expect("a tombstone");
            assert_eq!(record.comp_state, CompensationState::Tombstone);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_actions_racing_their_compensations_are_never_left_applied() {
    actions_racing_their_compensations_are_never_left_applied(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_actions_racing_their_compensations_are_never_left_applied() {
    actions_racing_their_compensations_are_never_left_applied(Kind::Postgres).await;
}

/// A compensation reaching one replica before its action reaches the other: an empty
/// rollback, and the action refused there, on every attempt.
async fn a_compensation_first_refuses_the_action_on_another_replica(kind: Kind) {
    let db = FenceDb::new(kind).await;
    let a = db.fence(DEFAULT_LEASE, None).await;
    let b = db.fence(DEFAULT_LEASE, None).await;
    let key = "first:action";
    assert_eq!(
        a.claim_compensation(key, 1).await.expect("claim"),
        CompensationClaim::Answer(Outcome::Success(Value::Null))
    );
    for attempt in [1, 2, 3] {
        assert_eq!(
            b.claim_action(key, attempt).await.expect("claim"),
            ActionClaim::Answer(refused()),
            "attempt {attempt}"
        );
    }
    let record = b.record(key).await.expect("record").expect("a record");
    assert_eq!(record.comp_state, CompensationState::Tombstone);
    assert_eq!(record.action_state, ActionState::Idle);
}

#[tokio::test]
async fn sqlite_a_compensation_first_refuses_the_action_on_another_replica() {
    a_compensation_first_refuses_the_action_on_another_replica(Kind::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_compensation_first_refuses_the_action_on_another_replica() {
    a_compensation_first_refuses_the_action_on_another_replica(Kind::Postgres).await;
}

/// Real time, a short lease: a replica claims and "crashes" (never finishes); the other
/// is answered `in_progress` until the lease passes, then takes the claim over. A
/// compensation finding a crashed action's claim undoes it without an output, and the
/// action is refused afterwards.
async fn a_crashed_holders_claim_is_taken_over_after_the_lease(kind: Kind) {
    // Long enough that a slow machine answers the second delivery within it.
    let lease = Duration::from_millis(1_500);
    let db = FenceDb::new(kind).await;
    let crashed = db.fence(lease, None).await;
    let survivor = db.fence(lease, None).await;

    assert_eq!(
        crashed
            .claim_action("lease:action", 1)
            .await
            .expect("claim"),
        ActionClaim::Run
    );
    match survivor
        .claim_action("lease:action", 2)
        .await
        .expect("claim")
    {
        ActionClaim::Answer(Outcome::Retryable(e)) => assert_eq!(e.code, IN_PROGRESS_CODE),
        other => panic!("expected in_progress, got {other:?}"),
    }
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    // `in_progress` is not remembered (the holder's outcome was unknown): the same
    // attempt takes the claim over once the lease has passed.
    assert_eq!(
        survivor
            .claim_action("lease:action", 2)
            .await
            .expect("claim"),
        ActionClaim::Run,
        "taken over after the lease"
    );
    let done = Outcome::Success(json!("second"));
    survivor
        .finish_action("lease:action", 2, &done)
        .await
        .expect("finish");
    // The crashed holder coming back late gets the recorded answer.
    assert_eq!(
        crashed
            .finish_action("lease:action", 1, &Outcome::Success(json!("first")))
            .await
            .expect("finish"),
        done
    );

    assert_eq!(
        crashed
            .claim_action("lease2:action", 1)
            .await
            .expect("claim"),
        ActionClaim::Run
    );
    match survivor
        .claim_compensation("lease2:action", 1)
        .await
        .expect("claim")
    {
        CompensationClaim::Answer(Outcome::Retryable(e)) => {
            assert_eq!(e.code, ACTION_IN_PROGRESS_CODE);
        }
        other => panic!("expected action_in_progress, got {other:?}"),
    }
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert_eq!(
        survivor
            .claim_compensation("lease2:action", 2)
            .await
            .expect("claim"),
        CompensationClaim::Undo {
            action_output: None
        },
        "the action may have been applied: undo it by key"
    );
    survivor
        .finish_compensation("lease2:action", 2, &Outcome::Success(json!("undone")))
        .await
        .expect("finish");
    assert_eq!(
        survivor
            .claim_action("lease2:action", 2)
            .await
            .expect("claim"),
        ActionClaim::Answer(refused())
    );
}

#[tokio::test]
async fn sqlite_a_crashed_holders_claim_is_taken_over_after_the_lease() {
    a_crashed_holders_claim_is_taken_over_after_the_lease(Kind::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_crashed_holders_claim_is_taken_over_after_the_lease() {
    a_crashed_holders_claim_is_taken_over_after_the_lease(Kind::Postgres).await;
}

#[tokio::test]
async fn sqlite_the_outcome_commits_with_the_handlers_own_transaction() {
    let dir = TempDir::new();
    let url = format!("sqlite://{}", dir.0.join("fence.db").display());
    let fence = SqliteFence::connect(&url)
        .await
        .expect("open")
        .with_lease(Duration::from_millis(300));
    sqlx::query("CREATE TABLE payments (key TEXT NOT NULL, cents INTEGER NOT NULL)")
        .execute(fence.pool())
        .await
        .expect("create payments");
    let paid = Outcome::Success(json!({"payment_id": "p1"}));

    // Committed: the payment and the record together.
    assert_eq!(
        fence.claim_action("tx:action", 1).await.expect("claim"),
        ActionClaim::Run
    );
    let mut tx = fence
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    sqlx::query("INSERT INTO payments (key, cents) VALUES (?, 500)")
        .bind("tx:action")
        .execute(&mut *tx)
        .await
        .expect("pay");
    let answer = fence
        .finish_action_in(&mut tx, "tx:action", 1, &paid)
        .await
        .expect("record in the transaction");
    assert_eq!(answer, paid);
    tx.commit().await.expect("commit");
    // The helper's own finish afterwards finds it recorded; later deliveries get it.
    assert_eq!(
        fence
            .finish_action("tx:action", 1, &Outcome::Success(json!("other")))
            .await
            .expect("finish"),
        paid
    );
    assert_eq!(
        fence.claim_action("tx:action", 2).await.expect("claim"),
        ActionClaim::Answer(paid.clone())
    );

    // Rolled back: neither the payment nor the record; after the lease the next
    // delivery runs on a clean slate.
    assert_eq!(
        fence.claim_action("rb:action", 1).await.expect("claim"),
        ActionClaim::Run
    );
    let mut tx = fence
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin");
    sqlx::query("INSERT INTO payments (key, cents) VALUES (?, 500)")
        .bind("rb:action")
        .execute(&mut *tx)
        .await
        .expect("pay");
    fence
        .finish_action_in(&mut tx, "rb:action", 1, &paid)
        .await
        .expect("record in the transaction");
    tx.rollback().await.expect("rollback");
    let record = fence
        .record("rb:action")
        .await
        .expect("record")
        .expect("claimed");
    assert_eq!(record.action_state, ActionState::Running);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM payments WHERE key = 'rb:action'")
        .fetch_one(fence.pool())
        .await
        .expect("count");
    assert_eq!(n, 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        fence.claim_action("rb:action", 1).await.expect("claim"),
        ActionClaim::Run
    );
}

#[tokio::test]
async fn postgres_the_outcome_commits_with_the_handlers_own_transaction() {
    let pg = PgDatabase::create().await;
    let fence = PgFence::connect(&pg.url())
        .await
        .expect("connect")
        .with_lease(Duration::from_millis(300));
    sqlx::query("CREATE TABLE payments (key text NOT NULL, cents bigint NOT NULL)")
        .execute(fence.pool())
        .await
        .expect("create payments");
    let paid = Outcome::Success(json!({"payment_id": "p1"}));

    assert_eq!(
        fence.claim_action("tx:action", 1).await.expect("claim"),
        ActionClaim::Run
    );
    let mut tx = fence.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO payments (key, cents) VALUES ($1, 500)")
        .bind("tx:action")
        .execute(&mut *tx)
        .await
        .expect("pay");
    let answer = fence
        .finish_action_in(&mut tx, "tx:action", 1, &paid)
        .await
        .expect("record in the transaction");
    assert_eq!(answer, paid);
    tx.commit().await.expect("commit");
    assert_eq!(
        fence
            .finish_action("tx:action", 1, &Outcome::Success(json!("other")))
            .await
            .expect("finish"),
        paid
    );
    assert_eq!(
        fence.claim_action("tx:action", 2).await.expect("claim"),
        ActionClaim::Answer(paid.clone())
    );

    assert_eq!(
        fence.claim_action("rb:action", 1).await.expect("claim"),
        ActionClaim::Run
    );
    let mut tx = fence.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO payments (key, cents) VALUES ($1, 500)")
        .bind("rb:action")
        .execute(&mut *tx)
        .await
        .expect("pay");
    fence
        .finish_action_in(&mut tx, "rb:action", 1, &paid)
        .await
        .expect("record in the transaction");
    tx.rollback().await.expect("rollback");
    let record = fence
        .record("rb:action")
        .await
        .expect("record")
        .expect("claimed");
    assert_eq!(record.action_state, ActionState::Running);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM payments WHERE key = 'rb:action'")
        .fetch_one(fence.pool())
        .await
        .expect("count");
    assert_eq!(n, 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        fence.claim_action("rb:action", 1).await.expect("claim"),
        ActionClaim::Run
    );
}

#[tokio::test]
async fn postgres_purge_forgets_only_settled_old_records() {
    let pg = PgDatabase::create().await;
    let clock = ManualClock::new(Timestamp(1_000_000));
    let fence = PgFence::connect(&pg.url())
        .await
        .expect("connect")
        .with_clock(Arc::new(clock.clone()));
    fence.claim_action("old:action", 1).await.expect("claim");
    fence
        .finish_action("old:action", 1, &Outcome::Success(Value::Null))
        .await
        .expect("finish");
    fence.claim_action("held:action", 1).await.expect("claim");
    clock.advance(Duration::from_secs(3_600));
    fence
        .claim_compensation("new:action", 1)
        .await
        .expect("claim");
    let purged = fence
        .purge_before(Timestamp(1_000_000 + 60_000))
        .await
        .expect("purge");
    assert_eq!(purged, 1);
    assert!(fence.record("old:action").await.expect("record").is_none());
    assert!(fence.record("held:action").await.expect("record").is_some());
    assert!(fence.record("new:action").await.expect("record").is_some());
}

/// A command of saga `saga`'s step `step`, as skald sends it.
fn command(saga: SagaId, kind: CommandKind, attempt: u32) -> skald::ports::Message {
    let step = StepName::new("charge").expect("name");
    let action_key = idempotency_key(&saga, &step, CommandKind::Action);
    wire::encode_command(&Command {
        saga_id: saga,
        saga_type: SagaType::new("t").expect("name"),
        step: step.clone(),
        kind,
        attempt,
        subject: match kind {
            CommandKind::Action => "skald.cmd.pay.charge".into(),
            CommandKind::Compensation => "skald.cmd.pay.refund".into(),
        },
        payload: json!({"cents": 500}),
        idempotency_key: idempotency_key(&saga, &step, kind),
        message_id: format!("{saga}:{kind}:{attempt}"),
        deadline: Timestamp(0),
        schema_version: 1,
        definition_version: 1,
        action_key: (kind == CommandKind::Compensation).then_some(action_key),
        in_doubt: false,
    })
    .expect("encode")
}

/// The participant helper end to end: two replicas, each with its own fence on one
/// database, each receiving every command (two consumer groups). Actions apply once;
/// compensations sent before their actions refuse them; compensations of applied
/// actions run once, with the action's output.
async fn two_replicas_behind_the_helper(kind: Kind) {
    let db = FenceDb::new(kind).await;
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let mut replies = bus
        .subscribe(&["skald.reply.pay.t.0".to_owned()], "orchestrator")
        .await
        .expect("subscribe replies");
    let applied: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let undone: Arc<Mutex<HashMap<String, Vec<Option<Value>>>>> = Arc::default();
    let mut handles = Vec::new();
    for replica in ["replica-a", "replica-b"] {
        let (applied, undone) = (Arc::clone(&applied), Arc::clone(&undone));
        let handle = participant::serve_with(
            Arc::clone(&bus),
            "skald.cmd.pay.>",
            replica,
            ParticipantOptions {
                concurrency: Some(8),
                fence: Some(db.fence(DEFAULT_LEASE, None).await),
                ..ParticipantOptions::default()
            },
            move |cmd: IncomingCommand| {
                let (applied, undone) = (Arc::clone(&applied), Arc::clone(&undone));
                async move {
                    let key = cmd.action_key();
                    match cmd.envelope.kind {
                        CommandKind::Action => {
                            *applied
                                .lock()
                                .expect("lock")
                                .entry(key.clone())
                                .or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Outcome::Success(json!({ "payment_id": key }))
                        }
                        CommandKind::Compensation => {
                            let output = participant::action_output();
                            undone
                                .lock()
                                .expect("lock")
                                .entry(key)
                                .or_default()
                                .push(output);
                            Outcome::Success(json!("refunded"))
                        }
                    }
                }
            },
        )
        .await
        .expect("serve");
        handles.push(handle);
    }
    let mut next_replies = async |n: usize| -> Vec<wire::Reply> {
        let mut got = Vec::new();
        Wait::new(format!("{n} replies"))
            .receive(
                async || replies.next().await,
                async |delivery| {
                    let (message, _, acker) = delivery.into_parts();
                    got.push(wire::decode_reply(&message).expect("a reply"));
                    acker.ack().await.expect("ack");
                    got.len() == n
                },
            )
            .await;
        got
    };

    let paid: Vec<SagaId> = (0..20).map(|_| SagaId::new()).collect();
    let cancelled: Vec<SagaId> = (0..10).map(|_| SagaId::new()).collect();
    // Compensations first for the cancelled sagas (the action timed out at skald while
    // its command sat in the broker): empty rollbacks, answered by both replicas.
    for saga in &cancelled {
        bus.publish(command(*saga, CommandKind::Compensation, 1))
            .await
            .expect("publish");
    }
    for reply in next_replies(20).await {
        assert_eq!(
            reply.outcome,
            Outcome::Success(Value::Null),
            "empty rollback"
        );
    }
    // Then every action, to both replicas at once.
    for saga in paid.iter().chain(&cancelled) {
        bus.publish(command(*saga, CommandKind::Action, 1))
            .await
            .expect("publish");
    }
    let action_replies = next_replies(60).await;
    for reply in &action_replies {
        let key = idempotency_key(&reply.saga_id, &reply.step, CommandKind::Action);
        if cancelled.contains(&reply.saga_id) {
            assert_eq!(
                reply.outcome,
                refused(),
                "{key}: refused after its compensation"
            );
        } else {
            match &reply.outcome {
                Outcome::Success(v) => assert_eq!(v, &json!({ "payment_id": key })),
                Outcome::Retryable(e) => assert_eq!(e.code, IN_PROGRESS_CODE),
                other => panic!("{key}: unexpected {other:?}"),
            }
        }
    }
    // Then the compensations of the paid sagas.
    for saga in &paid {
        bus.publish(command(*saga, CommandKind::Compensation, 1))
            .await
            .expect("publish");
    }
    next_replies(40).await;

    let applied = applied.lock().expect("lock").clone();
    let undone = undone.lock().expect("lock").clone();
    for saga in &paid {
        let key = idempotency_key(
            saga,
            &StepName::new("charge").expect("name"),
            CommandKind::Action,
        );
        assert_eq!(applied.get(&key), Some(&1), "{kind:?}: {key} applied once");
        assert_eq!(
            undone.get(&key),
            Some(&vec![Some(json!({ "payment_id": key }))]),
            "{kind:?}: {key} undone once, with the action's output"
        );
    }
    for saga in &cancelled {
        let key = idempotency_key(
            saga,
            &StepName::new("charge").expect("name"),
            CommandKind::Action,
        );
        assert_eq!(applied.get(&key), None, "{kind:?}: {key} never applied");
        assert_eq!(undone.get(&key), None, "{kind:?}: {key}: nothing to undo");
    }
    drop(handles);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_replicas_behind_the_helper() {
    two_replicas_behind_the_helper(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_replicas_behind_the_helper() {
    two_replicas_behind_the_helper(Kind::Postgres).await;
}

/// Hundreds of callers at once on two fences (two writer tasks, two pools) on one
/// database, racing on the same keys with actions and compensations: the operations of
/// one key land in one batch, across batches of one fence, and across the two fences'
/// batches, and still each action's effect applies at most once, exactly once where no
/// compensation came first, and an applied action is undone exactly once.
async fn many_concurrent_operations_apply_each_effect_once(kind: Kind) {
    const KEYS: usize = 120;
    /// Action deliveries per key per fence.
    const RACERS: usize = 3;
    let db = FenceDb::new(kind).await;
    let replicas = [
        db.fence(DEFAULT_LEASE, None).await,
        db.fence(DEFAULT_LEASE, None).await,
    ];
    let key = |i: usize| format!("many:{i}:action");
    // Every third key also gets a compensation from each fence.
    let compensated = |i: usize| i.is_multiple_of(3);
    let callers = KEYS * RACERS * 2 + KEYS.div_ceil(3) * 2;
    let start = Arc::new(tokio::sync::Barrier::new(callers));
    let applied: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let answered: Arc<Mutex<HashMap<String, Vec<Value>>>> = Arc::default();
    let undone: Arc<Mutex<HashMap<String, Vec<Option<Value>>>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..KEYS {
        for (r, fence) in replicas.iter().enumerate() {
            for racer in 0..RACERS {
                let (fence, start, k) = (Arc::clone(fence), Arc::clone(&start), key(i));
                let (applied, answered) = (Arc::clone(&applied), Arc::clone(&answered));
                tasks.push(tokio::spawn(async move {
                    start.wait().await;
                    let mine = Outcome::Success(json!({ "key": k, "by": [r, racer] }));
                    for attempt in 1..200 {
                        match fence.claim_action(&k, attempt).await.expect("claim") {
                            ActionClaim::Run => {
                                *applied.lock().expect("lock").entry(k.clone()).or_default() += 1;
                                tokio::task::yield_now().await;
                                let answer = fence
                                    .finish_action(&k, attempt, &mine)
                                    .await
                                    .expect("finish");
                                assert_eq!(answer, mine, "{k}: the holder's own outcome");
                                let Outcome::Success(v) = answer else {
                                    unreachable!()
                                };
                                answered.lock().expect("lock").entry(k).or_default().push(v);
                                return;
                            }
                            ActionClaim::Answer(Outcome::Success(v)) => {
                                answered.lock().expect("lock").entry(k).or_default().push(v);
                                return;
                            }
                            ActionClaim::Answer(o) if o == refused() => return,
                            ActionClaim::Answer(Outcome::Retryable(e)) => {
                                assert_eq!(e.code, IN_PROGRESS_CODE, "{k}");
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            ActionClaim::Answer(other) => panic!("{k}: unexpected {other:?}"),
                        }
                    }
                    panic!("{k}: never settled");
                }));
            }
            if compensated(i) {
                let (fence, start, k) = (Arc::clone(fence), Arc::clone(&start), key(i));
                let undone = Arc::clone(&undone);
                tasks.push(tokio::spawn(async move {
                    start.wait().await;
                    for attempt in 1..200 {
                        match fence.claim_compensation(&k, attempt).await.expect("claim") {
                            CompensationClaim::Undo { action_output } => {
                                undone
                                    .lock()
                                    .expect("lock")
                                    .entry(k.clone())
                                    .or_default()
                                    .push(action_output);
                                fence
                                    .finish_compensation(
                                        &k,
                                        attempt,
                                        &Outcome::Success(json!("refunded")),
                                    )
                                    .await
                                    .expect("finish");
                                return;
                            }
                            CompensationClaim::Answer(Outcome::Success(_)) => return,
                            CompensationClaim::Answer(Outcome::Retryable(e)) => {
                                assert!(
                                    e.code == ACTION_IN_PROGRESS_CODE || e.code == IN_PROGRESS_CODE,
                                    "{k}: {e}"
                                );
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            CompensationClaim::Answer(other) => {
                                panic!("{k}: unexpected {other:?}")
                            }
                        }
                    }
                    panic!("{k}: the compensation never settled");
                }));
            }
        }
    }
    for t in tasks {
        t.await.expect("a caller panicked");
    }
    let applied = applied.lock().expect("lock").clone();
    let answered = answered.lock().expect("lock").clone();
    let undone = undone.lock().expect("lock").clone();
    for i in 0..KEYS {
        let k = key(i);
        let ran = applied.get(&k).copied().unwrap_or(0);
        let answers = answered.get(&k).cloned().unwrap_or_default();
        let undos = undone.get(&k).cloned().unwrap_or_default();
        if !compensated(i) {
            assert_eq!(ran, 1, "{kind:?}: {k} applied {ran} times");
            assert_eq!(
                answers.len(),
                RACERS * 2,
                "{kind:?}: {k}: every delivery answered"
            );
        }
        assert!(ran <= 1, "{kind:?}: {k} applied {ran} times");
        if let Some(first) = answers.first() {
            assert!(
                answers.iter().all(|a| a == first),
                "{kind:?}: {k}: every delivery gets the same answer: {answers:?}"
            );
        }
        if ran == 1 {
            assert!(!answers.is_empty(), "{kind:?}: {k}: the holder's answer");
            if compensated(i) {
                assert_eq!(
                    undos,
                    vec![Some(answers[0].clone())],
                    "{kind:?}: {k} applied, so undone once with its output"
                );
            }
        } else {
            assert!(
                undos.is_empty(),
                "{kind:?}: {k} never applied, never undone"
            );
            let record = replicas[0]
                .record(&k)
                .await
                .expect("record")
                .expect("a tombstone");
            assert_eq!(record.comp_state, CompensationState::Tombstone, "{k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_many_concurrent_operations_apply_each_effect_once() {
    many_concurrent_operations_apply_each_effect_once(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_many_concurrent_operations_apply_each_effect_once() {
    many_concurrent_operations_apply_each_effect_once(Kind::Postgres).await;
}

/// How the database refuses the fence's writes in [`refuse_writes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Every write, with an error that passes (PostgreSQL: a serialization failure).
    Passing,
    /// Every write, with an error that does not pass.
    Every,
    /// The writes of the key `poison:action` only.
    Poison,
}

/// Makes the database refuse the fence's writes (after it has read, decided and would
/// answer), with a trigger; `None` removes it.
async fn refuse_writes(db: &FenceDb, refusal: Option<Refusal>) {
    match db.kind {
        Kind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.expect("open");
            for sql in [
                "DROP TRIGGER IF EXISTS refuse_insert",
                "DROP TRIGGER IF EXISTS refuse_update",
            ] {
                sqlx::query(sql).execute(&pool).await.expect("drop trigger");
            }
            if let Some(refusal) = refusal {
                assert_ne!(refusal, Refusal::Passing, "SQLite: hold its write lock");
                let when = if refusal == Refusal::Poison {
                    "WHEN NEW.key = 'poison:action'"
                } else {
                    ""
                };
                for (name, event) in [("refuse_insert", "INSERT"), ("refuse_update", "UPDATE")] {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "CREATE TRIGGER {name} BEFORE {event} ON skald_fence {when} \
                         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                    )))
                    .execute(&pool)
                    .await
                    .expect("create trigger");
                }
            }
            pool.close().await;
        }
        Kind::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
            sqlx::query("DROP TRIGGER IF EXISTS refuse ON skald_fence")
                .execute(&pool)
                .await
                .expect("drop trigger");
            sqlx::query(
                "CREATE OR REPLACE FUNCTION refuse_fence_write() RETURNS trigger \
                 LANGUAGE plpgsql AS $$ BEGIN \
                 IF TG_ARGV[0] = 'passing' THEN \
                 RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'serialization_failure'; \
                 END IF; \
                 RAISE EXCEPTION 'refused by the test'; END $$",
            )
            .execute(&pool)
            .await
            .expect("create function");
            if let Some(refusal) = refusal {
                // A change of state: the batch's own writes, not its locking no-op update.
                let changed = "(NEW.action_state IS DISTINCT FROM OLD.action_state \
                               OR NEW.comp_state IS DISTINCT FROM OLD.comp_state)";
                let (when, arg) = match refusal {
                    Refusal::Passing => (changed.to_owned(), "passing"),
                    Refusal::Every => (changed.to_owned(), "refused"),
                    Refusal::Poison => (
                        format!("NEW.key = 'poison:action' AND {changed}"),
                        "refused",
                    ),
                };
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE TRIGGER refuse BEFORE UPDATE ON skald_fence FOR EACH ROW \
                     WHEN ({when}) EXECUTE FUNCTION refuse_fence_write('{arg}')"
                )))
                .execute(&pool)
                .await
                .expect("create trigger");
            }
            pool.close().await;
        }
    }
}

/// Claims `keys` (attempt 1) all at once through `fence`, each from a task of its own.
async fn claim_all(fence: &Arc<dyn Fence>, keys: &[String]) -> Vec<Result<ActionClaim, String>> {
    let start = Arc::new(tokio::sync::Barrier::new(keys.len()));
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (fence, start, k) = (Arc::clone(fence), Arc::clone(&start), k.clone());
            tokio::spawn(async move {
                start.wait().await;
                fence.claim_action(&k, 1).await.map_err(|e| {
                    if e.is_retryable() {
                        format!("retryable: {e}")
                    } else {
                        format!("permanent: {e}")
                    }
                })
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("a caller panicked"));
    }
    answers
}

/// A batch whose transaction fails (after the rules have decided what to answer) answers
/// every one of its callers with an error, retryable when the failure passes, and
/// commits nothing of theirs: the same deliveries run once the failure is gone.
async fn a_failed_batch_answers_every_caller_with_an_error(kind: Kind) {
    let db = FenceDb::new(kind).await;
    let keys: Vec<String> = (0..64).map(|i| format!("failing:{i}:action")).collect();
    let fence = match kind {
        // SQLite: its write lock held by another connection past the busy timeout.
        Kind::Sqlite => {
            let options = skald::adapters::sqlite::SqliteOptions {
                busy_timeout: Duration::from_millis(100),
                ..Default::default()
            };
            let pool = skald::adapters::sqlite::open_pool(&db.url, &options)
                .await
                .expect("open");
            let fence: Arc<dyn Fence> =
                Arc::new(SqliteFence::with_pool(pool).await.expect("the fence"));
            fence
        }
        Kind::Postgres => db.fence(DEFAULT_LEASE, None).await,
    };
    let passing = match kind {
        Kind::Sqlite => {
            let holder = sqlx::SqlitePool::connect(&db.url).await.expect("open");
            let mut lock = holder.begin_with("BEGIN IMMEDIATE").await.expect("lock");
            let answers = claim_all(&fence, &keys).await;
            sqlx::query("SELECT 1")
                .execute(&mut *lock)
                .await
                .expect("still held");
            lock.rollback().await.expect("release");
            holder.close().await;
            answers
        }
        Kind::Postgres => {
            refuse_writes(&db, Some(Refusal::Passing)).await;
            claim_all(&fence, &keys).await
        }
    };
    for (k, a) in keys.iter().zip(&passing) {
        match a {
            Err(e) => assert!(e.starts_with("retryable"), "{kind:?}: {k}: {e}"),
            Ok(claim) => panic!("{kind:?}: {k} answered {claim:?} though its batch failed"),
        }
    }
    refuse_writes(&db, Some(Refusal::Every)).await;
    for (k, a) in keys.iter().zip(claim_all(&fence, &keys).await) {
        assert!(
            a.is_err(),
            "{kind:?}: {k} answered {a:?} though its batch failed"
        );
    }
    refuse_writes(&db, None).await;
    for k in &keys {
        assert_eq!(
            fence.record(k).await.expect("record"),
            None,
            "{kind:?}: {k}: nothing committed"
        );
    }
    for (k, a) in keys.iter().zip(claim_all(&fence, &keys).await) {
        assert_eq!(
            a,
            Ok(ActionClaim::Run),
            "{kind:?}: {k}: nothing was decided"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_failed_batch_answers_every_caller_with_an_error() {
    a_failed_batch_answers_every_caller_with_an_error(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_failed_batch_answers_every_caller_with_an_error() {
    a_failed_batch_answers_every_caller_with_an_error(Kind::Postgres).await;
}

/// A key whose write the database refuses (for good) fails its own operations only, not
/// those batched with it.
async fn a_refused_key_fails_only_its_own_operations(kind: Kind) {
    let db = FenceDb::new(kind).await;
    let fence = db.fence(DEFAULT_LEASE, None).await;
    refuse_writes(&db, Some(Refusal::Poison)).await;
    let mut keys: Vec<String> = (0..63).map(|i| format!("healthy:{i}:action")).collect();
    keys.insert(31, "poison:action".into());
    for (k, a) in keys.iter().zip(claim_all(&fence, &keys).await) {
        if k == "poison:action" {
            assert!(a.is_err(), "{kind:?}: {k} answered {a:?}");
        } else {
            assert_eq!(a, Ok(ActionClaim::Run), "{kind:?}: {k}");
            let record = fence.record(k).await.expect("record").expect("committed");
            assert_eq!(record.action_state, ActionState::Running, "{k}");
        }
    }
    assert_eq!(fence.record("poison:action").await.expect("record"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_refused_key_fails_only_its_own_operations() {
    a_refused_key_fails_only_its_own_operations(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_refused_key_fails_only_its_own_operations() {
    a_refused_key_fails_only_its_own_operations(Kind::Postgres).await;
}
