//! The `SagaStore` contract, run against every store (memory, SQLite, PostgreSQL):
//! optimistic concurrency (also for journal-only writes), claimed wake-ups filtered by
//! the types a runtime can run, the outbox (leases, claims, deletion once published)
//! and the inbox (a message applied once is refused after), paging of active sagas,
//! dead letters and their resolution; keyed sagas (version-8 ids) among unkeyed ones:
//! never purged, listed newest first by creation time, paged once each; claims limited
//! to partitions (rows of no partition, written before partitions existed, claimed by
//! everyone), sets of leases, and the partitions migration over existing rows.

mod common;

use std::time::Duration;

use common::*;
use serde::{Deserialize, Serialize};
use skald::definition::{SagaDefinition, Step};
use skald::ids::{SagaId, SagaType};
use skald::machine::{Input, SagaState, SagaStatus, Timestamp, transition};
use skald::ports::{
    DeadLetterCategory, DeadLetterRecord, Headers, JOURNAL_SCHEMA_VERSION, JournalEntry, Message,
    OutboxMessage, SagaStore, SagaWrite, WriteOutcome,
};

/// A lease longer than any time step of these tests.
const LEASE: Duration = Duration::from_secs(3_600);

#[derive(Serialize, Deserialize)]
struct Data {
    n: u32,
}

fn definition(name: &str, version: u32) -> SagaDefinition<Data> {
    SagaDefinition::<Data>::builder(name, version)
        .step(
            Step::new("a")
                .action("skald.cmd.x.a", |d: &Data| d.n)
                .compensate("skald.cmd.x.undo", |d: &Data| d.n)
                .timeout(Duration::from_secs(10)),
        )
        .step(Step::new("b").action("skald.cmd.x.b", |d: &Data| d.n))
        .build()
        .expect("valid")
}

fn entry(at: u64, kind: &str) -> JournalEntry {
    JournalEntry {
        at: Timestamp(at),
        schema_version: JOURNAL_SCHEMA_VERSION,
        kind: kind.into(),
        body: serde_json::json!({ "input": { "input": kind } }),
    }
}

/// A started saga (running, waiting on step a until `t0 + 10 s`).
fn started(def: &SagaDefinition<Data>, t0: u64) -> SagaState {
    started_as(def, SagaId::new(), t0)
}

/// [`started`], with the id `id` (a keyed one: `SagaId::for_key`).
fn started_as(def: &SagaDefinition<Data>, id: SagaId, t0: u64) -> SagaState {
    let d = def.definition();
    let fresh = SagaState::new(id, d, serde_json::json!({ "n": 1 }), Timestamp(t0));
    transition(d, &fresh, &Input::Started, Timestamp(t0))
        .expect("start")
        .0
}

fn write(state: &SagaState, expected: u64, journal: &str) -> SagaWrite {
    SagaWrite {
        id: state.id,
        partition: state.id.partition(16),
        expected_version: expected,
        state: Some(state.clone()),
        journal: vec![entry(state.updated_at.0, journal)],
        dead_letter: None,
        resolve_dead_letters: false,
        outbox: Vec::new(),
        inbox: None,
    }
}

fn outbox_row(subject: &str, available_at: u64) -> OutboxMessage {
    let mut headers = Headers::new();
    headers.insert("Nats-Msg-Id", format!("id-{subject}"));
    OutboxMessage {
        id: uuid::Uuid::now_v7(),
        message: Message {
            subject: subject.into(),
            headers,
            payload: bytes::Bytes::from_static(b"{\"n\":1}"),
        },
        available_at: Timestamp(available_at),
    }
}

fn subjects(rows: &[OutboxMessage]) -> Vec<&str> {
    rows.iter().map(|r| r.message.subject.as_str()).collect()
}

async fn contract(kind: Backend) {
    let backend = Resources::new(kind).await;
    contract_on(backend.store.as_ref()).await;
}

async fn contract_on(store: &dyn SagaStore) {
    let def = definition("alpha", 1);
    let other_version = definition("alpha", 2);
    let other_type = definition("beta", 1);

    // Create, then a stale creation of the same id conflicts.
    let s1 = started(&def, 1_000);
    let out = store
        .commit(&[write(&s1, 0, "transition")], &[])
        .await
        .expect("commit");
    assert_eq!(out, vec![WriteOutcome::Committed { version: 1 }]);
    let out = store
        .commit(&[write(&s1, 0, "transition")], &[])
        .await
        .expect("commit");
    assert_eq!(
        out,
        vec![WriteOutcome::Conflict],
        "a second creation conflicts"
    );

    // An update on a stale version conflicts and writes nothing (not even its journal),
    // while the other writes of the same batch commit.
    let s2 = started(&def, 2_000);
    let out = store
        .commit(&[write(&s1, 7, "stale"), write(&s2, 0, "transition")], &[])
        .await
        .expect("commit");
    assert_eq!(
        out,
        vec![
            WriteOutcome::Conflict,
            WriteOutcome::Committed { version: 1 }
        ]
    );
    let journal = store.journal(s1.id).await.expect("journal");
    assert_eq!(
        journal.len(),
        1,
        "the conflicting write's journal entry was not kept"
    );

    // A journal-only write (an ignored input) is valid only on the version it read.
    let ignored = |expected| SagaWrite {
        id: s1.id,
        partition: s1.id.partition(16),
        expected_version: expected,
        state: None,
        journal: vec![entry(3_000, "ignored")],
        dead_letter: None,
        resolve_dead_letters: false,
        outbox: Vec::new(),
        inbox: None,
    };
    let out = store.commit(&[ignored(0)], &[]).await.expect("commit");
    assert_eq!(
        out,
        vec![WriteOutcome::Conflict],
        "ignored on a stale version"
    );
    let out = store.commit(&[ignored(1)], &[]).await.expect("commit");
    assert_eq!(out, vec![WriteOutcome::Committed { version: 1 }]);
    let kinds: Vec<_> = store
        .journal(s1.id)
        .await
        .expect("journal")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["transition", "ignored"]);
    assert_eq!(
        store
            .load(s1.id)
            .await
            .expect("load")
            .expect("exists")
            .version,
        1
    );

    // Wake-ups: only the (type, version) pairs asked for, due ones only, oldest first,
    // each claimed for a lease (a second claimer does not get it).
    let s3 = started(&other_version, 500);
    let s4 = started(&other_type, 500);
    store
        .commit(
            &[write(&s3, 0, "transition"), write(&s4, 0, "transition")],
            &[],
        )
        .await
        .expect("commit");
    let alpha1 = [(SagaType::new("alpha").expect("name"), 1)];
    let claim = |now: u64, types: &'static [(SagaType, u32)]| {
        store.claim_wakeups(Timestamp(now), types, None, 10, LEASE)
    };
    let alpha1: &'static [(SagaType, u32)] = Box::leak(Box::new(alpha1));
    assert_eq!(
        claim(11_500, alpha1).await.expect("claim"),
        vec![s1.id],
        "only what is due"
    );
    assert_eq!(
        claim(1_000_000, alpha1).await.expect("claim"),
        vec![s2.id],
        "s1 is claimed; other types and versions are left out"
    );
    let both: &'static [(SagaType, u32)] = Box::leak(Box::new([
        (SagaType::new("alpha").expect("name"), 2),
        (SagaType::new("beta").expect("name"), 1),
    ]));
    let mut due = claim(1_000_000, both).await.expect("claim");
    due.sort();
    let mut want = vec![s3.id, s4.id];
    want.sort();
    assert_eq!(due, want);
    assert!(claim(1_000_000, both).await.expect("claim").is_empty());
    assert_eq!(
        claim(10_000_000, alpha1).await.expect("claim"),
        vec![s1.id, s2.id],
        "once the leases end, both again, oldest first"
    );

    // Active sagas page in id order.
    let mut all = vec![s1.id, s2.id, s3.id, s4.id];
    all.sort();
    let first = store.active_sagas(None, 3).await.expect("active");
    let rest = store
        .active_sagas(first.last().copied(), 3)
        .await
        .expect("active");
    assert_eq!([first, rest].concat(), all);

    // Dead letters: a saga's, resolved by a later write; a poison message's, kept.
    let dead = |category, saga: Option<SagaId>| DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category,
        saga_id: saga,
        saga_type: Some("alpha".into()),
        step: Some("a".into()),
        kind: None,
        reason: "because".into(),
        attempts: 3,
        message: Some(serde_json::json!({ "subject": "x" })),
        at: Timestamp(5_000),
        resolved_at: None,
    };
    let mut failed = s2.clone();
    failed.status = SagaStatus::Failed;
    failed.pending = None;
    let mut w = write(&failed, 1, "transition");
    w.dead_letter = Some(dead(DeadLetterCategory::Saga, Some(s2.id)));
    assert_eq!(
        store.commit(&[w], &[]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 2 }]
    );
    store
        .record_poison(&dead(DeadLetterCategory::Poison, None), &[])
        .await
        .expect("poison");
    let open = store.dead_letters(true, 10).await.expect("dead letters");
    assert_eq!(open.len(), 2);
    assert_eq!(open[0].category, DeadLetterCategory::Poison, "newest first");
    assert_eq!(open[0].message, Some(serde_json::json!({ "subject": "x" })));
    let mut w = write(&started(&def, 6_000), 0, "transition");
    w.id = s2.id;
    w.state = Some(SagaState {
        id: s2.id,
        ..started(&def, 6_000)
    });
    w.expected_version = 2;
    w.resolve_dead_letters = true;
    assert_eq!(
        store.commit(&[w], &[]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 3 }]
    );
    let open = store.dead_letters(true, 10).await.expect("dead letters");
    assert_eq!(open.len(), 1, "the saga's dead letter is resolved");
    assert_eq!(store.dead_letters(false, 10).await.expect("all").len(), 2);

    // Listing by status.
    let running = store
        .list(Some(SagaStatus::Running), None, 100)
        .await
        .expect("list");
    assert_eq!(running.len(), 4);
    assert!(
        store
            .list(Some(SagaStatus::Failed), None, 100)
            .await
            .expect("list")
            .is_empty()
    );
}

/// The outbox and the inbox: rows held by their writer's lease, then claimed in commit
/// order for a lease, deleted once reported published; a message id applied once is
/// refused after, a conflicting write leaves no inbox entry, pruning forgets old ids.
async fn outbox_and_inbox(store: &dyn SagaStore) {
    let def = definition("gamma", 1);
    let s = started(&def, 1_000);
    let mut w = write(&s, 0, "transition");
    w.outbox = vec![
        outbox_row("skald.cmd.x.a", 6_000),
        outbox_row("skald.evt.gamma.started", 6_000),
    ];
    w.inbox = Some("reply:1".into());
    assert_eq!(
        store.commit(&[w.clone()], &[]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 1 }]
    );
    let (n, oldest) = store.outbox_backlog().await.expect("backlog");
    assert_eq!(n, 2);
    assert!(oldest.is_some());
    assert!(
        store
            .claim_outbox(Timestamp(5_999), None, LEASE, 10)
            .await
            .expect("claim")
            .is_empty(),
        "the writer's lease holds"
    );
    let claimed = store
        .claim_outbox(Timestamp(6_000), None, LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(
        subjects(&claimed),
        ["skald.cmd.x.a", "skald.evt.gamma.started"],
        "commit order"
    );
    assert_eq!(claimed[0].message, w.outbox[0].message, "stored as written");
    assert!(
        store
            .claim_outbox(Timestamp(6_000), None, LEASE, 10)
            .await
            .expect("claim")
            .is_empty(),
        "claimed rows are not handed out twice"
    );
    let again = store
        .claim_outbox(Timestamp(6_000 + 3_600_000), None, LEASE, 1)
        .await
        .expect("claim");
    assert_eq!(
        subjects(&again),
        ["skald.cmd.x.a"],
        "after the lease, again"
    );

    // The same message applied again: refused whole, nothing written.
    let mut next = s.clone();
    next.updated_at = Timestamp(7_000);
    let mut dup = write(&next, 1, "transition");
    dup.inbox = Some("reply:1".into());
    dup.outbox = vec![outbox_row("skald.cmd.x.b", 0)];
    assert_eq!(
        store.commit(&[dup], &[]).await.expect("commit"),
        vec![WriteOutcome::Duplicate]
    );
    assert_eq!(
        store.load(s.id).await.expect("load").expect("saga").version,
        1
    );
    assert_eq!(store.journal(s.id).await.expect("journal").len(), 1);

    // A conflicting write keeps no inbox entry: the message can still be applied.
    let mut stale = write(&next, 5, "transition");
    stale.inbox = Some("reply:2".into());
    assert_eq!(
        store.commit(&[stale], &[]).await.expect("commit"),
        vec![WriteOutcome::Conflict]
    );
    let mut fresh = write(&next, 1, "transition");
    fresh.inbox = Some("reply:2".into());
    assert_eq!(
        store.commit(&[fresh], &[]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 2 }]
    );

    // Reported published: deleted by the next commit (even one without writes).
    let ids: Vec<_> = w.outbox.iter().map(|r| r.id).collect();
    assert_eq!(store.commit(&[], &ids).await.expect("commit"), vec![]);
    assert_eq!(store.outbox_backlog().await.expect("backlog").0, 0);
    assert!(
        store
            .claim_outbox(Timestamp(u64::MAX / 4), None, LEASE, 10)
            .await
            .expect("claim")
            .is_empty()
    );

    // A poison message's announcement goes through the outbox too.
    let poison = DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: DeadLetterCategory::Poison,
        saga_id: None,
        saga_type: None,
        step: None,
        kind: None,
        reason: "undecodable".into(),
        attempts: 1,
        message: None,
        at: Timestamp(8_000),
        resolved_at: None,
    };
    store
        .record_poison(&poison, &[outbox_row("skald.dlq.unknown", 8_000)])
        .await
        .expect("poison");
    let claimed = store
        .claim_outbox(Timestamp(8_000), None, LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(subjects(&claimed), ["skald.dlq.unknown"]);

    // Pruning forgets ids recorded before the cut-off.
    assert_eq!(store.prune_inbox(Timestamp(1_000)).await.expect("prune"), 0);
    assert_eq!(
        store
            .prune_inbox(Timestamp(u64::MAX / 4))
            .await
            .expect("prune"),
        2
    );
    let mut after_prune = next.clone();
    after_prune.updated_at = Timestamp(9_000);
    let mut w = write(&after_prune, 2, "transition");
    w.inbox = Some("reply:1".into());
    assert_eq!(
        store.commit(&[w], &[]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 3 }]
    );
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(Backend::MemoryInProcess).await;
}

#[tokio::test]
async fn postgres_store_keeps_the_contract() {
    contract(Backend::PostgresNats).await;
}

/// PostgreSQL commits small batches with one call of `skald_commit` and large ones with
/// set-based statements: both keep the contract.
#[tokio::test]
async fn postgres_set_based_batches_keep_the_contract() {
    let db = PgDatabase::create().await;
    let store = skald::adapters::postgres::PostgresStore::connect_with(
        &db.url(),
        skald::adapters::postgres::PostgresOptions {
            single_call_max_writes: 0,
            ..Default::default()
        },
    )
    .await
    .expect("store");
    contract_on(&store).await;
    outbox_and_inbox(&store).await;
}

/// SQLite writes small batches row by row and large ones with set-based statements:
/// both keep the contract.
#[tokio::test]
async fn sqlite_set_based_batches_keep_the_contract() {
    let dir = TempDir::new();
    let store = skald::adapters::sqlite::SqliteStore::connect_with(
        &dir.sqlite_url(),
        skald::adapters::sqlite::SqliteOptions {
            per_row_max_writes: 0,
            ..Default::default()
        },
    )
    .await
    .expect("store");
    contract_on(&store).await;
    outbox_and_inbox(&store).await;
}

#[tokio::test]
async fn outbox_and_inbox_on_every_store() {
    for kind in [
        Backend::MemoryInProcess,
        Backend::SqliteInProcess,
        Backend::PostgresNats,
    ] {
        let backend = Resources::new(kind).await;
        outbox_and_inbox(backend.store.as_ref()).await;
    }
}

#[tokio::test]
async fn sqlite_store_keeps_the_contract() {
    contract(Backend::SqliteInProcess).await;
}

/// The operator's queries and the retention primitives, on `store`: `query` filters and
/// orders, `stats` counts, dead letters by type and id, unfinished sagas per version,
/// leases, and `purge_finished` deleting exactly the finished sagas older than a time.
async fn queries_and_retention(store: &dyn skald::ports::SagaQueries) {
    use skald::ports::{DeadLetterQuery, PurgeReport, SagaOrder, SagaQuery};

    let alpha = definition("alpha", 1);
    let alpha2 = definition("alpha", 2);
    let beta = definition("beta", 1);
    let finish = |s: &SagaState, status: SagaStatus, at: u64| {
        let mut s = s.clone();
        s.status = status;
        s.pending = None;
        s.updated_at = Timestamp(at);
        s
    };
    // Old finished (t=1,000..), a recent finished, running ones on two versions, and a
    // failed one with a dead letter.
    let old_done = started(&alpha, 1_000);
    let old_comp = started(&alpha, 1_100);
    let recent_done = started(&beta, 50_000);
    let running_v1 = started(&alpha, 2_000);
    let running_v2 = started(&alpha2, 60_000);
    let failed = started(&beta, 3_000);
    for s in [
        &old_done,
        &old_comp,
        &recent_done,
        &running_v1,
        &running_v2,
        &failed,
    ] {
        assert_eq!(
            store
                .commit(&[write(s, 0, "transition")], &[])
                .await
                .expect("create"),
            vec![WriteOutcome::Committed { version: 1 }]
        );
    }
    let mut writes = vec![
        write(
            &finish(&old_done, SagaStatus::Completed, 5_000),
            1,
            "transition",
        ),
        write(
            &finish(&old_comp, SagaStatus::Compensated, 6_000),
            1,
            "transition",
        ),
        write(
            &finish(&recent_done, SagaStatus::Completed, 70_000),
            1,
            "transition",
        ),
    ];
    let mut w = write(&finish(&failed, SagaStatus::Failed, 7_000), 1, "transition");
    w.dead_letter = Some(DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: DeadLetterCategory::Saga,
        saga_id: Some(failed.id),
        saga_type: Some("beta".into()),
        step: Some("a".into()),
        kind: None,
        reason: "gave up".into(),
        attempts: 3,
        message: None,
        at: Timestamp(7_000),
        resolved_at: None,
    });
    writes.push(w);
    for w in writes {
        assert_eq!(
            store.commit(&[w], &[]).await.expect("finish"),
            vec![WriteOutcome::Committed { version: 2 }]
        );
    }

    // Queries.
    let ids =
        |v: Vec<skald::ports::StoredSaga>| v.into_iter().map(|s| s.state.id).collect::<Vec<_>>();
    let running = store
        .query(&SagaQuery {
            statuses: vec![SagaStatus::Running],
            limit: 10,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(
        ids(running),
        vec![running_v2.id, running_v1.id],
        "newest first"
    );
    let beta_type = SagaType::new("beta").expect("type");
    let of_beta = store
        .query(&SagaQuery {
            saga_type: Some(beta_type.clone()),
            limit: 10,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(
        ids(of_beta),
        vec![recent_done.id, failed.id],
        "newest first by creation time (t=50,000, then t=3,000), whatever the id order"
    );
    let of_v2 = store
        .query(&SagaQuery {
            saga_type: Some(SagaType::new("alpha").expect("type")),
            definition_version: Some(2),
            limit: 10,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(ids(of_v2), vec![running_v2.id]);
    let stale = store
        .query(&SagaQuery {
            statuses: vec![SagaStatus::Running, SagaStatus::Failed],
            updated_before: Some(Timestamp(10_000)),
            order: SagaOrder::LeastRecentlyUpdated,
            limit: 10,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(
        ids(stale),
        vec![running_v1.id, failed.id],
        "least recently updated first"
    );
    let created_late = store
        .query(&SagaQuery {
            created_after: Some(Timestamp(50_000)),
            limit: 1,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(created_late.len(), 1, "limit");

    // Stats and unfinished versions.
    let stats = store.stats(Timestamp(50_000)).await.expect("stats");
    let count = |t: &str, v: u32, st: SagaStatus| {
        stats
            .counts
            .iter()
            .find(|c| c.saga_type == t && c.definition_version == v && c.status == st)
            .map_or(0, |c| c.count)
    };
    assert_eq!(count("alpha", 1, SagaStatus::Running), 1);
    assert_eq!(count("alpha", 2, SagaStatus::Running), 1);
    assert_eq!(count("beta", 1, SagaStatus::Failed), 1);
    assert_eq!((stats.started_since, stats.finished_since), (2, 1));
    assert_eq!(
        stats.oldest_active.as_ref().map(|o| o.0),
        Some(running_v1.id)
    );
    assert_eq!(stats.open_dead_letters, 1);
    let unfinished = store
        .unfinished_versions(&[SagaType::new("alpha").expect("type"), beta_type])
        .await
        .expect("unfinished");
    let unfinished: Vec<(&str, u32, u64)> = unfinished
        .iter()
        .map(|(t, v, n)| (t.as_str(), *v, *n))
        .collect();
    assert_eq!(
        unfinished,
        vec![("alpha", 1, 1), ("alpha", 2, 1), ("beta", 1, 1)]
    );

    // Dead letters by type, and by the saga's id.
    let of_alpha = store
        .find_dead_letters(&DeadLetterQuery {
            open_only: true,
            saga_type: Some("alpha".into()),
            category: None,
            limit: 10,
        })
        .await
        .expect("dead letters");
    assert!(of_alpha.is_empty());
    let by_saga = store
        .dead_letters_of(*failed.id.as_uuid())
        .await
        .expect("of");
    assert_eq!(by_saga.len(), 1);
    assert_eq!(
        store
            .dead_letters_of(by_saga[0].id)
            .await
            .expect("by id")
            .len(),
        1
    );

    // Leases: one holder at a time, renewable by it, free once expired.
    let l = Duration::from_secs(10);
    assert!(
        store
            .acquire_lease("retention", "p1", Timestamp(100_000), l)
            .await
            .expect("lease")
    );
    assert!(
        !store
            .acquire_lease("retention", "p2", Timestamp(105_000), l)
            .await
            .expect("lease")
    );
    assert!(
        store
            .acquire_lease("retention", "p1", Timestamp(105_000), l)
            .await
            .expect("renew")
    );
    assert!(
        !store
            .acquire_lease("retention", "p2", Timestamp(114_000), l)
            .await
            .expect("lease")
    );
    assert!(
        store
            .acquire_lease("retention", "p2", Timestamp(115_001), l)
            .await
            .expect("expired")
    );

    // Purge: exactly the finished sagas last changed before t=10,000, in batches.
    let first = store
        .purge_finished(Timestamp(10_000), 1)
        .await
        .expect("purge");
    assert_eq!(
        (first.sagas, first.journal_entries),
        (1, 2),
        "the oldest first, with its journal"
    );
    let second = store
        .purge_finished(Timestamp(10_000), 100)
        .await
        .expect("purge");
    assert_eq!(second.sagas, 1);
    assert_eq!(
        store
            .purge_finished(Timestamp(10_000), 100)
            .await
            .expect("purge")
            .sagas,
        0
    );
    for gone in [&old_done, &old_comp] {
        assert!(store.load(gone.id).await.expect("load").is_none());
        assert!(store.journal(gone.id).await.expect("journal").is_empty());
    }
    for kept in [&recent_done, &running_v1, &running_v2, &failed] {
        assert!(store.load(kept.id).await.expect("load").is_some());
    }
    assert_eq!(
        store
            .dead_letters_of(*failed.id.as_uuid())
            .await
            .expect("of")
            .len(),
        1
    );

    // Sweep totals per holder.
    let mut total = first;
    total.add(&second);
    total.inbox = 7;
    store
        .record_sweep("retention", "p2", Timestamp(120_000), &first)
        .await
        .expect("record");
    let rest = PurgeReport { inbox: 7, ..second };
    store
        .record_sweep("retention", "p2", Timestamp(121_000), &rest)
        .await
        .expect("record");
    let sweeps = store.stats(Timestamp(0)).await.expect("stats").sweeps;
    assert_eq!(sweeps.len(), 1);
    assert_eq!((sweeps[0].holder.as_str(), sweeps[0].runs), ("p2", 2));
    assert_eq!(sweeps[0].last_run, Timestamp(121_000));
    assert_eq!(sweeps[0].deleted, total);
}

#[tokio::test]
async fn operator_queries_and_retention_on_every_store() {
    queries_and_retention(&skald::adapters::memory::MemoryStore::new()).await;
    let dir = TempDir::new();
    let sqlite = skald::adapters::sqlite::SqliteStore::connect(&dir.sqlite_url())
        .await
        .expect("sqlite");
    queries_and_retention(&sqlite).await;
    let db = PgDatabase::create().await;
    let pg = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("postgres");
    queries_and_retention(&pg).await;
}

/// `shared_secret` on `a` and `b` (two handles on one store, as two processes have):
/// two concurrent first calls with different candidates get one value, the one stored;
/// later calls get it too whatever they offer; names are independent; an empty
/// candidate is refused.
async fn shared_secret_on(a: &dyn SagaStore, b: &dyn SagaStore) {
    for round in 0..8u8 {
        let name = format!("race-{round}");
        let (first, second) = ([round, 1, 1, 1].to_vec(), [round, 2, 2, 2, 2].to_vec());
        let (x, y) = tokio::join!(
            a.shared_secret(&name, &first),
            b.shared_secret(&name, &second),
        );
        let (x, y) = (x.expect("first"), y.expect("second"));
        assert_eq!(x, y, "two racing callers agree");
        assert!(
            x == [round, 1, 1, 1] || x == [round, 2, 2, 2, 2],
            "the value is one of the candidates: {x:?}"
        );
        for store in [a, b] {
            assert_eq!(
                store.shared_secret(&name, b"another").await.expect("later"),
                x,
                "a later caller reads the stored value"
            );
        }
    }
    // Any bytes, kept exactly.
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(
        a.shared_secret("reply-token", &all).await.expect("store"),
        all
    );
    assert_eq!(
        b.shared_secret("reply-token", &[9; 32])
            .await
            .expect("read"),
        all
    );
    assert_eq!(
        b.shared_secret("other", &[7; 32]).await.expect("other"),
        vec![7; 32]
    );
    assert!(a.shared_secret("empty", &[]).await.is_err());
    assert_eq!(
        a.shared_secret("empty", &[1]).await.expect("non-empty"),
        vec![1],
        "a refused empty candidate stored nothing"
    );
}

#[tokio::test]
async fn shared_secrets_agree_on_every_store() {
    let memory = skald::adapters::memory::MemoryStore::new();
    shared_secret_on(&memory, &memory.clone()).await;

    let dir = TempDir::new();
    let one = skald::adapters::sqlite::SqliteStore::connect(&dir.sqlite_url())
        .await
        .expect("sqlite");
    let two = skald::adapters::sqlite::SqliteStore::connect(&dir.sqlite_url())
        .await
        .expect("sqlite, second handle");
    shared_secret_on(&one, &two).await;

    let db = PgDatabase::create().await;
    let one = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("postgres");
    let two = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("postgres, second handle");
    shared_secret_on(&one, &two).await;
}

/// Many processes starting at once against one PostgreSQL database: every one of them
/// ends up with the same secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_shared_secret_under_a_crowd() {
    let db = PgDatabase::create().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(std::sync::Arc::new(
            skald::adapters::postgres::PostgresStore::connect(&db.url())
                .await
                .expect("postgres"),
        ));
    }
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let store = std::sync::Arc::clone(&stores[usize::from(i) % stores.len()]);
        tasks.push(tokio::spawn(async move {
            store.shared_secret("reply-token", &[i; 32]).await
        }));
    }
    let mut values = std::collections::BTreeSet::new();
    for t in tasks {
        values.insert(t.await.expect("task").expect("secret"));
    }
    assert_eq!(values.len(), 1, "{values:?}");
}

/// Retention of poison records: `purge_finished` deletes the poison dead letters of no
/// saga, or of a saga that no longer exists, recorded before the cut-off, oldest first
/// and at most `limit` a call, counting them in `dead_letters`; it keeps recent ones,
/// those of sagas that still exist, and saga dead letters.
async fn poison_retention(store: &dyn skald::ports::SagaQueries) {
    let def = definition("alpha", 1);
    let running = started(&def, 1_000);
    let done = started(&def, 1_100);
    for s in [&running, &done] {
        assert_eq!(
            store
                .commit(&[write(s, 0, "transition")], &[])
                .await
                .expect("create"),
            vec![WriteOutcome::Committed { version: 1 }]
        );
    }
    let mut finished = done.clone();
    finished.status = SagaStatus::Completed;
    finished.pending = None;
    finished.updated_at = Timestamp(5_000);
    assert_eq!(
        store
            .commit(&[write(&finished, 1, "transition")], &[])
            .await
            .expect("finish"),
        vec![WriteOutcome::Committed { version: 2 }]
    );
    let record = |category: DeadLetterCategory, saga: Option<SagaId>, at: u64| DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category,
        saga_id: saga,
        saga_type: Some("alpha".into()),
        step: None,
        kind: None,
        reason: format!("poison at {at}"),
        attempts: 1,
        message: Some(Message::to_record(&Message {
            subject: "skald.reply.x.alpha.0".into(),
            headers: Headers::new(),
            payload: bytes::Bytes::from_static(b"\xff not json"),
        })),
        at: Timestamp(at),
        resolved_at: None,
    };
    use DeadLetterCategory::{Poison, Saga};
    let no_saga_old = record(Poison, None, 1_000);
    let gone_saga_old = record(Poison, Some(SagaId::new()), 2_000);
    let no_saga_older = record(Poison, None, 900);
    let no_saga_recent = record(Poison, None, 20_000);
    let of_running = record(Poison, Some(running.id), 1_500);
    let of_done = record(Poison, Some(done.id), 1_200);
    let saga_category = record(Saga, None, 800);
    for r in [
        &no_saga_old,
        &gone_saga_old,
        &no_saga_older,
        &no_saga_recent,
        &of_running,
        &of_done,
        &saga_category,
    ] {
        store.record_poison(r, &[]).await.expect("record");
    }
    let ids = |v: Vec<DeadLetterRecord>| {
        let mut ids: Vec<uuid::Uuid> = v.into_iter().map(|r| r.id).collect();
        ids.sort();
        ids
    };
    // Batch of 1: the finished saga (its poison record with it) and the oldest orphan.
    let first = store
        .purge_finished(Timestamp(10_000), 1)
        .await
        .expect("purge");
    assert_eq!((first.sagas, first.dead_letters), (1, 2), "{first:?}");
    let left = ids(store.dead_letters(false, 100).await.expect("dl"));
    assert!(!left.contains(&of_done.id) && !left.contains(&no_saga_older.id));
    // The rest of the old orphans.
    let second = store
        .purge_finished(Timestamp(10_000), 100)
        .await
        .expect("purge");
    assert_eq!((second.sagas, second.dead_letters), (0, 2), "{second:?}");
    let third = store
        .purge_finished(Timestamp(10_000), 100)
        .await
        .expect("purge");
    assert_eq!(third, skald::ports::PurgeReport::default());
    let mut kept = vec![no_saga_recent.id, of_running.id, saga_category.id];
    kept.sort();
    assert_eq!(ids(store.dead_letters(false, 100).await.expect("dl")), kept);
    assert!(store.load(running.id).await.expect("load").is_some());
    // Once the cut-off passes it, the recent one goes too.
    let later = store
        .purge_finished(Timestamp(30_000), 100)
        .await
        .expect("purge");
    assert_eq!(later.dead_letters, 1, "{later:?}");
}

#[tokio::test]
async fn poison_records_of_no_saga_are_purged_on_every_store() {
    poison_retention(&skald::adapters::memory::MemoryStore::new()).await;
    let dir = TempDir::new();
    let sqlite = skald::adapters::sqlite::SqliteStore::connect(&dir.sqlite_url())
        .await
        .expect("sqlite");
    poison_retention(&sqlite).await;
    let db = PgDatabase::create().await;
    let pg = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("postgres");
    poison_retention(&pg).await;
}

/// A finished saga: `s` completed (or compensated) at `at`.
fn finished(s: &SagaState, status: SagaStatus, at: u64) -> SagaState {
    let mut s = s.clone();
    s.status = status;
    s.pending = None;
    s.updated_at = Timestamp(at);
    s
}

/// Creates `s` (version 1).
async fn create(store: &dyn SagaStore, s: &SagaState) {
    assert_eq!(
        store
            .commit(&[write(s, 0, "transition")], &[])
            .await
            .expect("create"),
        vec![WriteOutcome::Committed { version: 1 }],
        "{}",
        s.id
    );
}

/// Retention and keyed sagas, on `store`: a keyed saga (id from `SagaId::for_key`) is
/// never purged, however old, while an unkeyed one of the same age is; the keyed ones are
/// left out of the batch itself (older than every unkeyed one, they never fill a batch
/// of `limit`, nor hold back the unkeyed ones behind them), so a sweep that goes on while
/// batches are full ends, and one over old keyed sagas only deletes nothing. The key
/// still names its saga: a second creation of its id conflicts.
async fn keyed_retention(store: &dyn skald::ports::SagaQueries) {
    let def = definition("alpha", 1);
    let ty = SagaType::new("alpha").expect("type");
    let keyed_id = |key: &str| SagaId::for_key(&ty, key).expect("key");
    // Old keyed sagas, finished before every old unkeyed one: an "oldest first, then
    // skip the keyed ones" purge would select only them.
    let mut old_keyed = Vec::new();
    for (i, key) in ["order-1", "order-2", "order-3", "order-4", "order-5"]
        .into_iter()
        .enumerate()
    {
        let i = i as u64;
        let s = started_as(&def, keyed_id(key), 1_000 + i);
        assert_eq!(s.id.as_uuid().get_version_num(), 8);
        create(store, &s).await;
        let status = if i.is_multiple_of(2) {
            SagaStatus::Completed
        } else {
            SagaStatus::Compensated
        };
        let done = finished(&s, status, 2_000 + i);
        assert_eq!(
            store
                .commit(&[write(&done, 1, "transition")], &[])
                .await
                .expect("finish"),
            vec![WriteOutcome::Committed { version: 2 }]
        );
        old_keyed.push(done);
    }
    // A keyed saga's poison record is kept with it.
    let poison = DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: DeadLetterCategory::Poison,
        saga_id: Some(old_keyed[0].id),
        saga_type: Some("alpha".into()),
        step: None,
        kind: None,
        reason: "forged".into(),
        attempts: 1,
        message: None,
        at: Timestamp(1_500),
        resolved_at: None,
    };
    store.record_poison(&poison, &[]).await.expect("poison");
    // Unkeyed sagas of the same age (finished at t=3,000..), and a recent one.
    let mut old_unkeyed = Vec::new();
    for i in 0..3u64 {
        let s = started(&def, 1_000 + i);
        create(store, &s).await;
        let done = finished(&s, SagaStatus::Completed, 3_000 + i);
        store
            .commit(&[write(&done, 1, "transition")], &[])
            .await
            .expect("finish");
        old_unkeyed.push(done);
    }
    let recent_keyed = started_as(&def, keyed_id("order-recent"), 40_000);
    create(store, &recent_keyed).await;

    // The sweeper's loop: batches of 2 while a batch is full. It deletes exactly the old
    // unkeyed sagas, in two calls.
    let mut calls = 0;
    let mut purged = skald::ports::PurgeReport::default();
    loop {
        calls += 1;
        assert!(calls <= 3, "the sweep does not end: {purged:?}");
        let r = store
            .purge_finished(Timestamp(10_000), 2)
            .await
            .expect("purge");
        purged.add(&r);
        if r.sagas < 2 && r.dead_letters < 2 {
            break;
        }
    }
    assert_eq!(calls, 2, "{purged:?}");
    assert_eq!((purged.sagas, purged.journal_entries), (3, 6), "{purged:?}");
    assert_eq!(
        purged.dead_letters, 0,
        "the keyed saga's poison record is kept"
    );
    for gone in &old_unkeyed {
        assert!(store.load(gone.id).await.expect("load").is_none());
    }
    for kept in &old_keyed {
        let s = store.load(kept.id).await.expect("load").expect("kept");
        assert_eq!((s.state.status, s.version), (kept.status, 2));
        assert_eq!(store.journal(kept.id).await.expect("journal").len(), 2);
    }
    assert_eq!(
        store
            .dead_letters_of(poison.id)
            .await
            .expect("dead letters")
            .len(),
        1
    );

    // Only keyed sagas are old now: a sweep, however late, deletes nothing and stops.
    for limit in [1, 2, 1_000] {
        assert_eq!(
            store
                .purge_finished(Timestamp(u64::MAX / 4), limit)
                .await
                .expect("purge"),
            skald::ports::PurgeReport::default(),
            "limit {limit}"
        );
    }
    assert!(store.load(recent_keyed.id).await.expect("load").is_some());

    // The key still names its saga: creating it again conflicts.
    let again = started_as(&def, keyed_id("order-1"), 90_000);
    assert_eq!(
        store
            .commit(&[write(&again, 0, "transition")], &[])
            .await
            .expect("commit"),
        vec![WriteOutcome::Conflict]
    );
}

/// Listings with keyed and unkeyed sagas mixed, on `store`: keyed ids (version 8) are no
/// time order (nearly all sort above every version-7 id), yet `query` with
/// `SagaOrder::NewestFirst` lists newest first by creation time (the id breaking ties),
/// `stats` names the oldest active saga by creation time, and `list` pages through every
/// saga once, in id order.
async fn keyed_listings(store: &dyn skald::ports::SagaQueries) {
    use skald::ports::{SagaOrder, SagaQuery};

    let def = definition("alpha", 1);
    let ty = SagaType::new("alpha").expect("type");
    let keyed = |key: &str, t0: u64| started_as(&def, SagaId::for_key(&ty, key).expect("key"), t0);
    // Created at t = 1,000 (keyed, the oldest) .. 9,000 (unkeyed, the newest); two of
    // them at the same time.
    let sagas = vec![
        keyed("k-oldest", 1_000),
        started(&def, 2_000),
        keyed("k-2", 3_000),
        started(&def, 4_000),
        keyed("k-3", 5_000),
        keyed("k-tie", 6_000),
        started(&def, 6_000),
        keyed("k-4", 7_000),
        started(&def, 8_000),
        started(&def, 9_000),
    ];
    for s in &sagas {
        create(store, s).await;
    }
    let (oldest, newest) = (&sagas[0], &sagas[sagas.len() - 1]);
    let max_unkeyed = sagas
        .iter()
        .filter(|s| s.id.as_uuid().get_version_num() == 7)
        .map(|s| s.id)
        .max()
        .expect("unkeyed");
    assert!(
        oldest.id > max_unkeyed,
        "precondition: the oldest keyed id sorts above the unkeyed ids"
    );
    // Two of them finished: the listing is by creation, not last change.
    for s in [&sagas[1], &sagas[4]] {
        store
            .commit(
                &[write(
                    &finished(s, SagaStatus::Completed, 50_000),
                    1,
                    "transition",
                )],
                &[],
            )
            .await
            .expect("finish");
    }
    let mut by_creation: Vec<&SagaState> = sagas.iter().collect();
    by_creation.sort_by_key(|s| std::cmp::Reverse((s.created_at, s.id)));
    let want: Vec<SagaId> = by_creation.iter().map(|s| s.id).collect();
    assert_eq!(want[0], newest.id);

    let ids =
        |v: Vec<skald::ports::StoredSaga>| v.into_iter().map(|s| s.state.id).collect::<Vec<_>>();
    let all = store
        .query(&SagaQuery {
            order: SagaOrder::NewestFirst,
            limit: 100,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(ids(all), want, "newest first by creation time");
    let newest_three = store
        .query(&SagaQuery {
            limit: 3,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(
        ids(newest_three),
        want[..3],
        "the newest 3, keyed ones only if new"
    );
    let running = store
        .query(&SagaQuery {
            statuses: vec![SagaStatus::Running],
            limit: 100,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    let want_running: Vec<SagaId> = want
        .iter()
        .copied()
        .filter(|id| *id != sagas[1].id && *id != sagas[4].id)
        .collect();
    assert_eq!(ids(running), want_running);
    let since = store
        .query(&SagaQuery {
            created_after: Some(Timestamp(6_000)),
            limit: 100,
            ..SagaQuery::default()
        })
        .await
        .expect("query");
    assert_eq!(ids(since), want[..5]);

    // The oldest active saga is the one created first (keyed here), not the lowest id.
    let stats = store.stats(Timestamp(0)).await.expect("stats");
    assert_eq!(
        stats.oldest_active.map(|o| (o.0, o.2)),
        Some((oldest.id, Timestamp(1_000)))
    );

    // Paging with the cursor: every saga once, in id order, for any page size.
    let mut every: Vec<SagaId> = sagas.iter().map(|s| s.id).collect();
    every.sort();
    for page in [1, 3, 4, 100] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let got = store.list(None, after, page).await.expect("list");
            assert!(got.len() <= page);
            seen.extend(got.iter().map(|s| s.id));
            match got.last() {
                Some(last) if got.len() == page => after = Some(last.id),
                _ => break,
            }
        }
        assert_eq!(seen, every, "page size {page}");
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let got = store
            .list(Some(SagaStatus::Running), after, 2)
            .await
            .expect("list");
        seen.extend(got.iter().map(|s| s.id));
        match got.last() {
            Some(last) if got.len() == 2 => after = Some(last.id),
            _ => break,
        }
    }
    let mut running: Vec<SagaId> = want_running.clone();
    running.sort();
    assert_eq!(seen, running, "by status");
    let summary = store.list(None, None, 100).await.expect("list");
    let of = |id: SagaId| summary.iter().find(|s| s.id == id).expect("listed");
    assert_eq!(of(oldest.id).created_at, Timestamp(1_000));
    assert_eq!(of(sagas[4].id).status, SagaStatus::Completed);
}

#[tokio::test]
async fn keyed_sagas_are_never_purged_on_every_store() {
    keyed_retention(&skald::adapters::memory::MemoryStore::new()).await;
    let dir = TempDir::new();
    let sqlite = skald::adapters::sqlite::SqliteStore::connect(&dir.sqlite_url())
        .await
        .expect("sqlite");
    keyed_retention(&sqlite).await;
    let db = PgDatabase::create().await;
    let pg = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("postgres");
    keyed_retention(&pg).await;
}

#[tokio::test]
async fn listings_with_keyed_sagas_are_newest_first_by_creation_on_every_store() {
    keyed_listings(&skald::adapters::memory::MemoryStore::new()).await;
    let dir = TempDir::new();
    let sqlite = skald::adapters::sqlite::SqliteStore::connect(&dir.sqlite_url())
        .await
        .expect("sqlite");
    keyed_listings(&sqlite).await;
    let db = PgDatabase::create().await;
    let pg = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("postgres");
    keyed_listings(&pg).await;
}

/// The raw rows of a SQL store, for what the `SagaStore` contract cannot show: a saga
/// or outbox row as written before partitions existed (`partition_no` NULL), and the
/// partitions as stored.
#[derive(Clone, Copy)]
enum Raw<'a> {
    Sqlite(&'a sqlx::sqlite::SqlitePool),
    Postgres(&'a sqlx::postgres::PgPool),
}

impl Raw<'_> {
    /// Makes `id`'s row look created before partitions existed.
    async fn forget_partition(self, id: SagaId) {
        let updated = match self {
            Raw::Sqlite(pool) => {
                sqlx::query("UPDATE saga_instances SET partition_no = NULL WHERE id = ?")
                    .bind(id.to_string())
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            }
            Raw::Postgres(pool) => {
                sqlx::query("UPDATE saga_instances SET partition_no = NULL WHERE id = $1::uuid")
                    .bind(id.to_string())
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            }
        };
        assert_eq!(updated.expect("forget the partition"), 1);
    }

    /// `id`'s partition as stored.
    async fn saga_partition(self, id: SagaId) -> Option<i64> {
        match self {
            Raw::Sqlite(pool) => {
                sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT partition_no FROM saga_instances WHERE id = ?",
                )
                .bind(id.to_string())
                .fetch_one(pool)
                .await
            }
            Raw::Postgres(pool) => sqlx::query_scalar::<_, Option<i32>>(
                "SELECT partition_no FROM saga_instances WHERE id = $1::uuid",
            )
            .bind(id.to_string())
            .fetch_one(pool)
            .await
            .map(|p| p.map(i64::from)),
        }
        .expect("the saga's partition")
    }

    /// The outbox rows' subjects and partitions as stored, in commit order.
    async fn outbox_partitions(self) -> Vec<(String, Option<i64>)> {
        match self {
            Raw::Sqlite(pool) => {
                sqlx::query_as::<_, (String, Option<i64>)>(
                    "SELECT subject, partition_no FROM outbox ORDER BY seq",
                )
                .fetch_all(pool)
                .await
            }
            Raw::Postgres(pool) => sqlx::query_as::<_, (String, Option<i32>)>(
                "SELECT subject, partition_no FROM outbox ORDER BY seq",
            )
            .fetch_all(pool)
            .await
            .map(|rows| {
                rows.into_iter()
                    .map(|(s, p)| (s, p.map(i64::from)))
                    .collect()
            }),
        }
        .expect("the outbox's partitions")
    }

    /// Writes `s` (version 1) and an outbox row `subject` of it as a release before
    /// partitions did: with the columns of that schema only.
    async fn insert_old_rows(self, s: &SagaState, subject: &str) {
        let state = serde_json::to_string(s).expect("state");
        let headers = r#"[["Nats-Msg-Id","id-old"]]"#;
        let wake = s.wake_at().map(|t| i64::try_from(t.0).expect("time"));
        let (created, updated) = (s.created_at.0 as i64, s.updated_at.0 as i64);
        let row = uuid::Uuid::now_v7().to_string();
        match self {
            Raw::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO saga_instances (id, saga_type, definition_version, status, \
                     version, state, next_wakeup_ms, created_at_ms, updated_at_ms) \
                     VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)",
                )
                .bind(s.id.to_string())
                .bind(s.saga_type.as_str())
                .bind(i64::from(s.definition_version))
                .bind(s.status.as_str())
                .bind(&state)
                .bind(wake)
                .bind(created)
                .bind(updated)
                .execute(pool)
                .await
                .expect("old saga row");
                sqlx::query(
                    "INSERT INTO outbox (id, saga_id, subject, headers, payload, created_at_ms, \
                     available_at_ms) VALUES (?, ?, ?, ?, ?, ?, 0)",
                )
                .bind(&row)
                .bind(s.id.to_string())
                .bind(subject)
                .bind(headers)
                .bind(&b"{}"[..])
                .bind(created)
                .execute(pool)
                .await
                .expect("old outbox row");
            }
            Raw::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO saga_instances (id, saga_type, definition_version, status, \
                     version, state, next_wakeup_ms, created_at_ms, updated_at_ms) \
                     VALUES ($1::uuid, $2, $3, $4, 1, $5::jsonb, $6, $7, $8)",
                )
                .bind(s.id.to_string())
                .bind(s.saga_type.as_str())
                .bind(i32::try_from(s.definition_version).expect("version"))
                .bind(s.status.as_str())
                .bind(&state)
                .bind(wake)
                .bind(created)
                .bind(updated)
                .execute(pool)
                .await
                .expect("old saga row");
                sqlx::query(
                    "INSERT INTO outbox (id, saga_id, subject, headers, payload, created_at_ms, \
                     available_at_ms) VALUES ($1::uuid, $2::uuid, $3, $4::jsonb, $5, $6, 0)",
                )
                .bind(&row)
                .bind(s.id.to_string())
                .bind(subject)
                .bind(headers)
                .bind(&b"{}"[..])
                .bind(created)
                .execute(pool)
                .await
                .expect("old outbox row");
            }
        }
    }
}

/// `s`, changed at `at` (the same wake-up).
fn changed(s: &SagaState, at: u64) -> SagaState {
    let mut s = s.clone();
    s.updated_at = Timestamp(at);
    s
}

/// `w`, written for partition `partition`.
fn in_partition(mut w: SagaWrite, partition: u32) -> SagaWrite {
    w.partition = partition;
    w
}

/// The lease of these tests, in milliseconds.
const LEASE_MS: u64 = 3_600_000;

/// Claims limited to partitions, on `store`: the due wake-ups and the outbox rows of the
/// partitions asked for, and those of no partition (a saga created before partitions
/// existed, a poison message's announcement), which every claimer takes; `None` takes
/// every partition, `Some(&[])` only the rows of none. A saga stays in the partition it
/// was created in (or in none) whatever its later writes say; an outbox row is in its
/// write's partition. `raw` (the SQL stores) makes one saga look created before
/// partitions existed; the memory store has no such saga, and keeps it in partition 3.
async fn partition_claims(store: &dyn SagaStore, raw: Option<Raw<'_>>) {
    let def = definition("pi", 1);
    let pi: &[(SagaType, u32)] = &[(SagaType::new("pi").expect("name"), 1)];
    let claim = |now: u64, partitions: Option<&'static [u32]>| {
        store.claim_wakeups(Timestamp(now), pi, partitions, 10, LEASE)
    };
    // Due at 10,500 (s0), 11,000 (s1, partition 1) and 12,000 (s2, partition 2).
    let s0 = started(&def, 500);
    let s1 = started(&def, 1_000);
    let s2 = started(&def, 2_000);
    for (s, p) in [(&s0, 3), (&s1, 1), (&s2, 2)] {
        assert_eq!(
            store
                .commit(&[in_partition(write(s, 0, "transition"), p)], &[])
                .await
                .expect("create"),
            vec![WriteOutcome::Committed { version: 1 }]
        );
    }
    if let Some(raw) = raw {
        assert_eq!(raw.saga_partition(s1.id).await, Some(1));
        raw.forget_partition(s0.id).await;
    }
    // The saga of no partition, where the store has one: claimed by everyone.
    let none: Vec<SagaId> = raw.map(|_| s0.id).into_iter().collect();

    let t1 = 100_000;
    assert_eq!(
        claim(t1, Some(&[1])).await.expect("claim"),
        [none.clone(), vec![s1.id]].concat(),
        "partition 1 and the saga of none"
    );
    assert_eq!(claim(t1, Some(&[2])).await.expect("claim"), vec![s2.id]);
    assert!(claim(t1, Some(&[])).await.expect("claim").is_empty());
    let t2 = t1 + LEASE_MS;
    assert_eq!(
        claim(t2, Some(&[])).await.expect("claim"),
        none,
        "no partition: only the saga of none"
    );
    assert!(claim(t2, Some(&[7])).await.expect("claim").is_empty());
    let rest = if raw.is_some() {
        vec![s1.id, s2.id]
    } else {
        vec![s0.id, s1.id, s2.id]
    };
    assert_eq!(claim(t2, None).await.expect("claim"), rest, "None: all");
    let t3 = t2 + LEASE_MS;
    assert_eq!(
        claim(t3, None).await.expect("claim"),
        vec![s0.id, s1.id, s2.id],
        "None: all, oldest first"
    );

    // Later writes in other partitions (another partition count): the sagas stay where
    // they were created. (A state change ends the claims.)
    let s0 = changed(&s0, 20_000);
    let s1 = changed(&s1, 20_000);
    for (s, p) in [(&s0, 5), (&s1, 9)] {
        assert_eq!(
            store
                .commit(&[in_partition(write(s, 1, "transition"), p)], &[])
                .await
                .expect("update"),
            vec![WriteOutcome::Committed { version: 2 }]
        );
    }
    let t4 = t3 + LEASE_MS;
    assert_eq!(
        claim(t4, Some(&[5, 9])).await.expect("claim"),
        none,
        "s1 stays in partition 1, s0 in none"
    );
    assert_eq!(claim(t4, Some(&[1])).await.expect("claim"), vec![s1.id]);
    if let Some(raw) = raw {
        assert_eq!(raw.saga_partition(s0.id).await, None);
        assert_eq!(raw.saga_partition(s1.id).await, Some(1));
    } else {
        assert_eq!(claim(t4, Some(&[3])).await.expect("claim"), vec![s0.id]);
    }

    // Outbox rows: in their write's partition; a poison message's announcement in none.
    let mut w = in_partition(write(&changed(&s1, 21_000), 2, "transition"), 1);
    w.outbox = vec![outbox_row("one", 0)];
    store.commit(&[w], &[]).await.expect("commit");
    let poison = DeadLetterRecord {
        id: uuid::Uuid::now_v7(),
        category: DeadLetterCategory::Poison,
        saga_id: None,
        saga_type: None,
        step: None,
        kind: None,
        reason: "undecodable".into(),
        attempts: 1,
        message: None,
        at: Timestamp(21_000),
        resolved_at: None,
    };
    store
        .record_poison(&poison, &[outbox_row("none", 0)])
        .await
        .expect("poison");
    let mut w = in_partition(write(&changed(&s2, 21_000), 1, "transition"), 2);
    w.outbox = vec![outbox_row("two", 0)];
    store.commit(&[w], &[]).await.expect("commit");
    // A later write of s1 for partition 9: its row is in 9 (the write's partition).
    let mut w = in_partition(write(&changed(&s1, 22_000), 3, "transition"), 9);
    w.outbox = vec![outbox_row("nine", 0)];
    assert_eq!(
        store.commit(&[w], &[]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 4 }]
    );
    if let Some(raw) = raw {
        assert_eq!(
            raw.outbox_partitions().await,
            vec![
                ("one".to_owned(), Some(1)),
                ("none".to_owned(), None),
                ("two".to_owned(), Some(2)),
                ("nine".to_owned(), Some(9)),
            ]
        );
    }
    let outbox = |now: u64, partitions: Option<&'static [u32]>| async move {
        let rows = store
            .claim_outbox(Timestamp(now), partitions, LEASE, 10)
            .await
            .expect("claim");
        rows.iter()
            .map(|r| r.message.subject.clone())
            .collect::<Vec<String>>()
    };
    let t = 1_000_000;
    assert_eq!(outbox(t, Some(&[1])).await, ["one", "none"], "commit order");
    assert!(outbox(t, Some(&[1])).await.is_empty());
    assert_eq!(outbox(t, Some(&[2, 3])).await, ["two"]);
    assert_eq!(outbox(t, Some(&[9])).await, ["nine"]);
    let t = t + LEASE_MS;
    assert_eq!(outbox(t, Some(&[])).await, ["none"], "only the row of none");
    assert_eq!(outbox(t, None).await, ["one", "two", "nine"]);
    let t = t + LEASE_MS;
    assert_eq!(outbox(t, None).await, ["one", "none", "two", "nine"]);
}

#[tokio::test]
async fn claims_are_limited_to_partitions_on_every_store() {
    partition_claims(&skald::adapters::memory::MemoryStore::new(), None).await;
    // SQLite, row by row and set-based.
    for per_row_max_writes in [4, 0] {
        let dir = TempDir::new();
        let sqlite = skald::adapters::sqlite::SqliteStore::connect_with(
            &dir.sqlite_url(),
            skald::adapters::sqlite::SqliteOptions {
                per_row_max_writes,
                ..Default::default()
            },
        )
        .await
        .expect("sqlite");
        partition_claims(&sqlite, Some(Raw::Sqlite(sqlite.pool()))).await;
    }
    // PostgreSQL, through `skald_commit` and set-based.
    for single_call_max_writes in [16, 0] {
        let db = PgDatabase::create().await;
        let pg = skald::adapters::postgres::PostgresStore::connect_with(
            &db.url(),
            skald::adapters::postgres::PostgresOptions {
                single_call_max_writes,
                ..Default::default()
            },
        )
        .await
        .expect("postgres");
        partition_claims(&pg, Some(Raw::Postgres(pg.pool()))).await;
    }
}

/// The leases named by `prefix` held at `at`: (name, holder, until).
async fn held(store: &dyn SagaStore, prefix: &str, at: u64) -> Vec<(String, String, u64)> {
    store
        .leases(prefix, Timestamp(at))
        .await
        .expect("leases")
        .into_iter()
        .map(|l| (l.name, l.holder, l.until.0))
        .collect()
}

/// Sets of leases, on `store`: `acquire_leases` takes the free ones (or its holder's)
/// and answers which, a name given twice is one lease, two holders racing for the same
/// names get each name once between them; a lease is free once its end has passed
/// (`until < now`, as `acquire_lease`); `release_leases` ends only the holder's own;
/// `leases` lists those held, by string prefix (no wildcards), in name order.
async fn lease_sets(store: &dyn SagaStore) {
    let l = Duration::from_secs(10);
    let names = |ns: &[&str]| ns.iter().map(|n| (*n).to_owned()).collect::<Vec<String>>();
    let acquire = |ns: Vec<String>, holder: &'static str, at: u64| async move {
        let mut got = store
            .acquire_leases(&ns, holder, Timestamp(at), l)
            .await
            .expect("acquire");
        got.sort();
        got
    };
    let (n1, n2) = ("n1", "n2");
    let p = names(&["partition/1", "partition/10", "partition/2"]);
    assert_eq!(acquire(p.clone(), n1, 100_000).await, p, "free: all taken");
    assert_eq!(
        acquire(names(&["partition/2", "partition/3"]), n2, 105_000).await,
        names(&["partition/3"]),
        "another holder's are not free"
    );
    assert_eq!(
        acquire(
            names(&["partition/2", "partition/1", "partition/2"]),
            n1,
            106_000
        )
        .await,
        names(&["partition/1", "partition/2"]),
        "renewed by their holder, a name twice is one lease"
    );
    assert!(acquire(Vec::new(), n1, 106_000).await.is_empty());
    assert_eq!(
        acquire(names(&["node/n1"]), n1, 106_000).await,
        names(&["node/n1"])
    );
    assert_eq!(
        acquire(names(&["part_tion/9", "node/n2"]), n2, 106_000).await,
        names(&["node/n2", "part_tion/9"])
    );

    // Listed by prefix, in name order (bytes), while held.
    let lease = |name: &str, holder: &str, until: u64| (name.to_owned(), holder.to_owned(), until);
    assert_eq!(
        held(store, "partition/", 106_000).await,
        vec![
            lease("partition/1", n1, 116_000),
            lease("partition/10", n1, 110_000),
            lease("partition/2", n1, 116_000),
            lease("partition/3", n2, 115_000),
        ],
        "not part_tion/9: the prefix has no wildcards"
    );
    assert_eq!(
        held(store, "partition/10", 106_000).await,
        vec![lease("partition/10", n1, 110_000)],
        "partition/1 does not start with partition/10"
    );
    assert_eq!(
        held(store, "partition/1", 106_000).await,
        vec![
            lease("partition/1", n1, 116_000),
            lease("partition/10", n1, 110_000)
        ]
    );
    assert_eq!(
        held(store, "node/", 106_000).await,
        vec![lease("node/n1", n1, 116_000), lease("node/n2", n2, 116_000)]
    );
    assert_eq!(
        held(store, "part_tion/", 106_000).await,
        vec![lease("part_tion/9", n2, 116_000)]
    );
    assert!(held(store, "%", 106_000).await.is_empty());
    assert!(held(store, "Partition/", 106_000).await.is_empty(), "case");
    assert_eq!(held(store, "", 106_000).await.len(), 7);

    // Held up to its end, free after it.
    assert_eq!(held(store, "partition/10", 110_000).await.len(), 1);
    assert!(
        acquire(names(&["partition/10"]), n2, 110_000)
            .await
            .is_empty()
    );
    assert!(held(store, "partition/10", 110_001).await.is_empty());
    assert!(
        !store
            .acquire_lease("partition/10", n2, Timestamp(110_000), l)
            .await
            .expect("lease"),
        "acquire_lease: the same rule"
    );
    assert_eq!(
        acquire(names(&["partition/10"]), n2, 110_001).await,
        names(&["partition/10"])
    );
    assert_eq!(
        held(store, "partition/10", 110_001).await,
        vec![lease("partition/10", n2, 120_001)]
    );

    // Released: only the holder's own.
    store
        .release_leases(&names(&["partition/1", "partition/3", "partition/10"]), n2)
        .await
        .expect("release");
    store.release_leases(&[], n2).await.expect("release none");
    assert_eq!(
        held(store, "partition/", 110_001).await,
        vec![
            lease("partition/1", n1, 116_000),
            lease("partition/2", n1, 116_000)
        ]
    );
    assert_eq!(
        acquire(names(&["partition/3", "partition/10"]), n1, 110_002).await,
        names(&["partition/10", "partition/3"]),
        "released: free at once"
    );

    // Two holders racing for the same names: each name goes to one of them.
    let contested = names(&["partition/20", "partition/21", "partition/22"]);
    let (a, b) = tokio::join!(
        acquire(contested.clone(), "n3", 200_000),
        acquire(contested.clone(), "n4", 200_000)
    );
    let mut all = [a.clone(), b.clone()].concat();
    all.sort();
    assert_eq!(all, contested, "{a:?} {b:?}");
    for (name, holder, _) in held(store, "partition/2", 200_000).await {
        let winner = if a.contains(&name) { "n3" } else { "n4" };
        assert_eq!(holder, winner, "{name}");
    }
}

#[tokio::test]
async fn lease_sets_on_every_store() {
    lease_sets(&skald::adapters::memory::MemoryStore::new()).await;
    let dir = TempDir::new();
    let sqlite = skald::adapters::sqlite::SqliteStore::connect(&dir.sqlite_url())
        .await
        .expect("sqlite");
    lease_sets(&sqlite).await;
    let db = PgDatabase::create().await;
    let pg = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("postgres");
    lease_sets(&pg).await;
}

/// The last migration before partitions.
const BEFORE_PARTITIONS: i64 = 20261201000001;

/// A prepared start, as `start_in` takes it.
struct Start(SagaWrite);

impl AsRef<SagaWrite> for Start {
    fn as_ref(&self) -> &SagaWrite {
        &self.0
    }
}

/// What an upgrade leaves, on a store just migrated (`store`) over rows written before
/// partitions existed (`old`, with its outbox row `old`): those rows have no partition
/// and every claimer takes them; the old saga stays in none after a write of it; sagas
/// and rows written now have theirs.
async fn after_upgrade(store: &dyn SagaStore, raw: Raw<'_>, old: &SagaState) {
    assert_eq!(raw.saga_partition(old.id).await, None);
    assert_eq!(
        raw.outbox_partitions().await,
        vec![("old".to_owned(), None)]
    );
    let alpha: &[(SagaType, u32)] = &[(SagaType::new("alpha").expect("name"), 1)];
    assert_eq!(
        store
            .claim_wakeups(Timestamp(1_000_000), alpha, Some(&[]), 10, LEASE)
            .await
            .expect("claim"),
        vec![old.id],
        "an old saga is everyone's"
    );
    let rows = store
        .claim_outbox(Timestamp(1_000_000), Some(&[]), LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(subjects(&rows), ["old"], "an old row is everyone's");
    let loaded = store
        .load(old.id)
        .await
        .expect("load")
        .expect("the old saga");
    assert_eq!((&loaded.state, loaded.version), (old, 1), "read as written");
    // Written again: still in no partition; its new outbox row in the write's.
    let mut w = in_partition(write(&changed(old, 50_000), 1, "transition"), 4);
    w.outbox = vec![outbox_row("after", 0)];
    assert_eq!(
        store.commit(&[w], &[]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 2 }]
    );
    assert_eq!(raw.saga_partition(old.id).await, None);
    // Created now, by a commit and by a transactional start: in their partitions.
    let def = definition("alpha", 1);
    let fresh = started(&def, 60_000);
    store
        .commit(&[in_partition(write(&fresh, 0, "transition"), 11)], &[])
        .await
        .expect("create");
    assert_eq!(raw.saga_partition(fresh.id).await, Some(11));
    let begun = started(&def, 61_000);
    let mut start = in_partition(write(&begun, 0, "transition"), 12);
    start.outbox = vec![outbox_row("begun", 0)];
    let start = Start(start);
    let answer = match raw {
        Raw::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
            let answer = skald::adapters::sqlite::SqliteStore::start_in(&mut tx, &start).await;
            tx.commit().await.expect("commit");
            answer
        }
        Raw::Postgres(pool) => {
            let mut tx = pool.begin().await.expect("begin");
            let answer = skald::adapters::postgres::PostgresStore::start_in(&mut tx, &start).await;
            tx.commit().await.expect("commit");
            answer
        }
    };
    assert!(!answer.expect("start_in").is_existing());
    assert_eq!(raw.saga_partition(begun.id).await, Some(12));
    assert_eq!(
        raw.outbox_partitions().await,
        vec![
            ("old".to_owned(), None),
            ("after".to_owned(), Some(4)),
            ("begun".to_owned(), Some(12)),
        ]
    );
}

#[tokio::test]
async fn migrations_leave_existing_rows_in_no_partition_on_sql_stores() {
    let old = started(&definition("alpha", 1), 1_000);
    // SQLite: the schema of the release before, its rows, then this release's store.
    let dir = TempDir::new();
    let url = dir.sqlite_url();
    let pool = skald::adapters::sqlite::open_pool(&url, &Default::default())
        .await
        .expect("pool");
    skald::adapters::sqlite::MIGRATOR
        .run_to(BEFORE_PARTITIONS, &pool)
        .await
        .expect("the migrations before partitions");
    Raw::Sqlite(&pool).insert_old_rows(&old, "old").await;
    let sqlite = skald::adapters::sqlite::SqliteStore::connect(&url)
        .await
        .expect("migrated");
    after_upgrade(&sqlite, Raw::Sqlite(sqlite.pool()), &old).await;

    // PostgreSQL alike.
    let db = PgDatabase::create().await;
    let pool = skald::adapters::postgres::open_pool(&db.url(), &Default::default())
        .await
        .expect("pool");
    skald::adapters::postgres::MIGRATOR
        .run_to(BEFORE_PARTITIONS, &pool)
        .await
        .expect("the migrations before partitions");
    Raw::Postgres(&pool).insert_old_rows(&old, "old").await;
    let pg = skald::adapters::postgres::PostgresStore::connect(&db.url())
        .await
        .expect("migrated");
    after_upgrade(&pg, Raw::Postgres(pg.pool()), &old).await;
}
