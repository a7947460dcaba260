//! The `SagaStore` contract, run against every store: optimistic concurrency (also for
//! journal-only writes), wake-ups filtered by the types a runtime can run, paging of
//! active sagas, dead letters and their resolution.

mod common;

use std::time::Duration;

use common::*;
use serde::{Deserialize, Serialize};
use skald::definition::{SagaDefinition, Step};
use skald::ids::{SagaId, SagaType};
use skald::machine::{Input, SagaState, SagaStatus, Timestamp, transition};
use skald::ports::{
    DeadLetterCategory, DeadLetterRecord, JOURNAL_SCHEMA_VERSION, JournalEntry, SagaWrite,
    WriteOutcome,
};

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
    let d = def.definition();
    let fresh = SagaState::new(
        SagaId::new(),
        d,
        serde_json::json!({ "n": 1 }),
        Timestamp(t0),
    );
    transition(d, &fresh, &Input::Started, Timestamp(t0))
        .expect("start")
        .0
}

fn write(state: &SagaState, expected: u64, journal: &str) -> SagaWrite {
    SagaWrite {
        id: state.id,
        expected_version: expected,
        state: Some(state.clone()),
        journal: vec![entry(state.updated_at.0, journal)],
        dead_letter: None,
        resolve_dead_letters: false,
    }
}

async fn contract(kind: StoreKind) {
    let backend = Backend::new(kind).await;
    let store = backend.store.as_ref();
    let def = definition("alpha", 1);
    let other_version = definition("alpha", 2);
    let other_type = definition("beta", 1);

    // Create, then a stale creation of the same id conflicts.
    let s1 = started(&def, 1_000);
    let out = store
        .commit(&[write(&s1, 0, "transition")])
        .await
        .expect("commit");
    assert_eq!(out, vec![WriteOutcome::Committed { version: 1 }]);
    let out = store
        .commit(&[write(&s1, 0, "transition")])
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
        .commit(&[write(&s1, 7, "stale"), write(&s2, 0, "transition")])
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
        expected_version: expected,
        state: None,
        journal: vec![entry(3_000, "ignored")],
        dead_letter: None,
        resolve_dead_letters: false,
    };
    let out = store.commit(&[ignored(0)]).await.expect("commit");
    assert_eq!(
        out,
        vec![WriteOutcome::Conflict],
        "ignored on a stale version"
    );
    let out = store.commit(&[ignored(1)]).await.expect("commit");
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

    // Wake-ups: only the (type, version) pairs asked for, oldest first, due ones only.
    let s3 = started(&other_version, 500);
    let s4 = started(&other_type, 500);
    store
        .commit(&[write(&s3, 0, "transition"), write(&s4, 0, "transition")])
        .await
        .expect("commit");
    let alpha1 = [(SagaType::new("alpha").expect("name"), 1)];
    let due = store
        .due_wakeups(Timestamp(1_000_000), &alpha1, 10)
        .await
        .expect("due");
    assert_eq!(
        due,
        vec![s1.id, s2.id],
        "oldest first, other types and versions left out"
    );
    let due = store
        .due_wakeups(Timestamp(11_500), &alpha1, 10)
        .await
        .expect("due");
    assert_eq!(due, vec![s1.id], "only what is due");
    let both = [
        (SagaType::new("alpha").expect("name"), 2),
        (SagaType::new("beta").expect("name"), 1),
    ];
    let mut due = store
        .due_wakeups(Timestamp(1_000_000), &both, 10)
        .await
        .expect("due");
    due.sort();
    let mut want = vec![s3.id, s4.id];
    want.sort();
    assert_eq!(due, want);

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
    };
    let mut failed = s2.clone();
    failed.status = SagaStatus::Failed;
    failed.pending = None;
    let mut w = write(&failed, 1, "transition");
    w.dead_letter = Some(dead(DeadLetterCategory::Saga, Some(s2.id)));
    assert_eq!(
        store.commit(&[w]).await.expect("commit"),
        vec![WriteOutcome::Committed { version: 2 }]
    );
    store
        .record_poison(&dead(DeadLetterCategory::Poison, None))
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
        store.commit(&[w]).await.expect("commit"),
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

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(StoreKind::Memory).await;
}

#[tokio::test]
async fn sqlite_store_keeps_the_contract() {
    contract(StoreKind::Sqlite).await;
}
