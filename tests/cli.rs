//! The `skald` operator CLI, end to end: real sagas run by a runtime on NATS JetStream
//! and a real store (PostgreSQL, and SQLite), leaving one saga in every state; then the
//! CLI binary, as an operator would run it, reads them, travels in time, re-drives a
//! dead-lettered saga to `compensated`, cancels a running one, finds a stuck one, and
//! fails with the documented exit codes on bad input.
//!
//! Without a broker: the transport flags parse, and no password or token reaches
//! `--help`, an error or `Debug`; arguments and stored rows the CLI reaches cannot make
//! it panic (a time with multi-byte characters, a journal that does not fit a shorter
//! definition); `skald sagas` lists newest first by creation time with keyed sagas
//! among unkeyed ones.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use skald::definition::{SagaDefinition, Step};
use skald::ids::SagaId;
use skald::machine::SagaStatus;
use skald::participant::{ParticipantHandle, serve};
use skald::ports::Bus;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{Checkout, CheckoutTiming, checkout_definition};
use skald_sagas::scripted::Scripted;
use skald_sagas::sim::SimServices;

/// Runs the `skald` binary; returns (exit code, stdout, stderr).
async fn skald(db: &str, nats: Option<&str>, args: &[&str]) -> (i32, String, String) {
    skald_with_env(db, nats, args, &[]).await
}

/// Like [`skald`], with these environment variables (and none other of skald's).
async fn skald_with_env(
    db: &str,
    nats: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut cmd = skald_command(env!("CARGO_BIN_EXE_skald"));
    // (The operator's name defaults to the OS user's.)
    cmd.env_remove("USER");
    cmd.envs(env.iter().copied());
    cmd.arg("--db").arg(db);
    if let Some(url) = nats {
        cmd.arg("--nats").arg(url);
    }
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run the skald binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`skald`], expecting exit code 0 and JSON on stdout.
async fn skald_json(db: &str, nats: Option<&str>, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--json");
    let (code, out, err) = skald(db, nats, &all).await;
    assert_eq!(code, 0, "skald {args:?} failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("skald {args:?}: not JSON ({e}): {out}"))
}

/// The scripted participants (`skald_sagas::scripted`): `ok-*` complete, `decline-*`
/// are compensated, `broken-*` are dead-lettered while the release is broken, `hang-*`
/// never get a shipping reply.
async fn participants(bus: &Arc<dyn Bus>, scripted: &Scripted) -> Vec<ParticipantHandle> {
    let mut handles = Vec::new();
    for (service, subject) in SimServices::services() {
        let scripted = scripted.clone();
        handles.push(
            serve(Arc::clone(bus), subject, service, 64, move |cmd| {
                let scripted = scripted.clone();
                async move { scripted.handle(cmd).await }
            })
            .await
            .expect("serve"),
        );
    }
    handles
}

async fn runtime(backend: &Resources, checkout: &SagaDefinition<Checkout>) -> Runtime {
    Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(backend.bus().await)
        .register(checkout)
        .options(RuntimeOptions {
            arbiters: 2,
            wakeup_poll_interval: Duration::from_millis(50),
            ..RuntimeOptions::default()
        })
        .start()
        .await
        .expect("start the runtime")
}

/// The checkout saga (type `checkout`, version 1) with its steps in another order, as a
/// careless change would leave it.
fn reordered_checkout() -> SagaDefinition<Checkout> {
    let step = |name: &str, subject: &str| {
        Step::new(name).action(
            subject.to_owned(),
            |c: &Checkout| json!({ "order_id": c.order_id }),
        )
    };
    SagaDefinition::<Checkout>::builder("checkout", 1)
        .step(step("charge_payment", "skald.cmd.payment.charge"))
        .step(step("reserve_inventory", "skald.cmd.inventory.reserve"))
        .step(step("ship_order", "skald.cmd.shipping.ship"))
        .build()
        .expect("valid")
}

fn statuses(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().expect("id").to_owned(),
                s["status"].as_str().expect("status").to_owned(),
            )
        })
        .collect()
}

async fn operator_cli_end_to_end(kind: Backend) {
    let backend = Resources::new(kind).await;
    let db = match &backend.pg {
        Some(pg) => pg.url(),
        None => backend.dir.sqlite_url(),
    };
    let db = db.as_str();
    let nats_url = backend.nats.as_ref().expect("a NATS backend").url();
    let nats = Some(nats_url.as_str());
    // The definition the `skald` binary knows: the default checkout timing.
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let scripted = Scripted::new(Duration::from_millis(30));
    let bus = backend.bus().await;
    let _participants = participants(&bus, &scripted).await;
    let rt = runtime(&backend, &checkout).await;

    // One saga in every state.
    let ok = rt
        .start_saga(&checkout, &tea_order("ok-1"))
        .await
        .expect("start")
        .id();
    let declined = rt
        .start_saga(&checkout, &tea_order("decline-1"))
        .await
        .expect("start")
        .id();
    let broken = rt
        .start_saga(&checkout, &tea_order("broken-1"))
        .await
        .expect("start")
        .id();
    let to_cancel = rt
        .start_saga(&checkout, &tea_order("slow-1"))
        .await
        .expect("start")
        .id();
    let hanging = rt
        .start_saga(&checkout, &tea_order("hang-2"))
        .await
        .expect("start")
        .id();
    wait_status(backend.store.as_ref(), ok, SagaStatus::Completed).await;
    wait_status(backend.store.as_ref(), declined, SagaStatus::Compensated).await;
    wait_status(backend.store.as_ref(), broken, SagaStatus::Failed).await;
    wait_saga(backend.store.as_ref(), to_cancel, "charging", |s| {
        s.state.pending.is_some_and(|p| p.step == 1)
    })
    .await;
    wait_saga(backend.store.as_ref(), hanging, "at step 2", |s| {
        s.state.pending.is_some_and(|p| p.step == 2)
    })
    .await;

    // --- sagas: every state, filters, the table.
    let all = skald_json(db, None, &["sagas"]).await;
    let want: HashMap<String, String> = [
        (ok, "completed"),
        (declined, "compensated"),
        (broken, "failed"),
        (to_cancel, "running"),
        (hanging, "running"),
    ]
    .into_iter()
    .map(|(id, s)| (id.to_string(), s.to_owned()))
    .collect();
    assert_eq!(statuses(&all), want);
    let failed = skald_json(db, None, &["sagas", "--status", "failed"]).await;
    assert_eq!(
        statuses(&failed).into_keys().collect::<Vec<_>>(),
        vec![broken.to_string()]
    );
    assert_eq!(failed[0]["step"], "reserve_inventory");
    assert_eq!(failed[0]["kind"], "compensation");
    let finished = skald_json(
        db,
        None,
        &[
            "sagas",
            "--status",
            "completed,compensated",
            "--since",
            "1h",
        ],
    )
    .await;
    assert_eq!(finished.as_array().map(Vec::len), Some(2));
    assert_eq!(
        skald_json(db, None, &["sagas", "--type", "other"]).await,
        json!([])
    );
    let (code, table, _) = skald(db, None, &["sagas"]).await;
    assert_eq!(code, 0);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "TYPE", "VER", "STATUS", "STEP", "ATTEMPT", "AGE", "UPDATED"
        ]
    );
    let row = |id: SagaId| {
        table
            .lines()
            .find(|l| l.starts_with(&id.to_string()))
            .unwrap_or_else(|| panic!("no row for {id} in\n{table}"))
            .to_owned()
    };
    assert!(
        row(broken).contains("failed") && row(broken).contains("reserve_inventory (undo)"),
        "{table}"
    );
    let cells: Vec<String> = row(hanging).split_whitespace().map(str::to_owned).collect();
    assert_eq!(
        cells[1..6],
        ["checkout", "1", "running", "ship_order", "1"],
        "{table}"
    );
    assert!(row(ok).contains("completed"), "{table}");

    // --- show: state, data and the journal as a timeline.
    let (code, shown, _) = skald(db, None, &["show", &broken.to_string()]).await;
    assert_eq!(code, 0);
    for needle in [
        "status    failed",
        "dead letter  reserve_inventory (compensation) gave up after 1 attempts: warehouse_offline",
        "reply: charge_payment action #1 failed: card_declined",
        "sent reserve_inventory compensation #1 on skald.cmd.inventory.release",
        "dead-lettered: reserve_inventory compensation after 1 attempts",
        "\"order_id\": \"broken-1\"",
    ] {
        assert!(shown.contains(needle), "missing {needle:?} in\n{shown}");
    }
    let doc = skald_json(db, None, &["show", &broken.to_string()]).await;
    let journal = backend.store.journal(broken).await.expect("journal");
    assert_eq!(doc["journal"].as_array().map(Vec::len), Some(journal.len()));
    assert_eq!(doc["saga"]["status"], "failed");
    assert_eq!(doc["saga"]["data"]["reservation_id"], "rsv-broken-1");

    // --- at: time travel to between step 1 and step 2 of the completed saga.
    let journal = backend.store.journal(ok).await.expect("journal");
    let (after_step_1, after_step_2) = (journal[1].at.as_millis(), journal[2].at.as_millis());
    assert!(after_step_2 > after_step_1 + 10, "the charge takes 30 ms");
    let between = (after_step_1 + 10).to_string();
    let then = skald_json(db, None, &["at", &ok.to_string(), "--time", &between]).await;
    assert_eq!(then["journal_entries"], 2);
    assert_eq!(then["state"]["status"], "running");
    assert_eq!(
        then["state"]["completed_steps"],
        json!(["reserve_inventory"])
    );
    assert_eq!(then["state"]["step"], "charge_payment");
    assert_eq!(then["state"]["data"]["reservation_id"], "rsv-ok-1");
    assert_eq!(then["state"]["data"]["payment_id"], Value::Null);
    assert_eq!(then["divergence"], Value::Null);
    let (code, text, _) = skald(db, None, &["at", &ok.to_string(), "--time", &between]).await;
    assert_eq!(code, 0);
    assert!(text.contains("done      reserve_inventory\n"), "{text}");
    let now = skald_json(db, None, &["at", &ok.to_string(), "--time", "-0s"]).await;
    assert_eq!(now["state"]["status"], "completed");
    assert_eq!(now["state"]["data"]["shipment_id"], "shp-ok-1");
    let (code, _, err) = skald(
        db,
        None,
        &["at", &ok.to_string(), "--time", "2000-01-01T00:00:00Z"],
    )
    .await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("did not exist yet"), "{err}");

    // --- dlq list / show.
    let open = skald_json(db, None, &["dlq", "list"]).await;
    let open = open.as_array().expect("list");
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["saga_id"], broken.to_string());
    assert_eq!(open[0]["category"], "saga");
    assert_eq!(open[0]["step"], "reserve_inventory");
    assert_eq!(open[0]["kind"], "compensation");
    assert_eq!(open[0]["attempts"], 1);
    let (code, text, _) = skald(db, None, &["dlq", "show", &broken.to_string()]).await;
    assert_eq!(code, 0);
    assert!(
        text.contains("state        open") && text.contains(&format!("skald dlq redrive {broken}")),
        "{text}"
    );

    // --- redrive: refused without NATS, refused for a saga that is not failed; then
    // with the participant fixed, the dead-lettered saga is compensated.
    let (code, _, err) = skald(db, None, &["dlq", "redrive", &broken.to_string()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--nats"), "{err}");
    let (code, _, err) = skald(db, nats, &["dlq", "redrive", &ok.to_string()]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("not dead-lettered"), "{err}");
    scripted.set_release_broken(false);
    let redriven = skald_json(
        db,
        nats,
        &["dlq", "redrive", &broken.to_string(), "--operator", "alice"],
    )
    .await;
    assert_eq!(redriven[0]["result"], "applied", "{redriven}");
    assert_eq!(redriven[0]["detail"], "compensating");
    assert!(
        redriven[0]["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("op:alice:"))
    );
    wait_status(backend.store.as_ref(), broken, SagaStatus::Compensated).await;
    assert_eq!(skald_json(db, None, &["dlq", "list"]).await, json!([]));
    let history = skald_json(db, None, &["dlq", "list", "--all"]).await;
    assert!(history[0]["resolved_at_ms"].is_u64(), "{history}");
    let (_, shown, _) = skald(db, None, &["show", &broken.to_string()]).await;
    assert!(
        shown.contains("re-driven by an operator [op:alice:"),
        "{shown}"
    );

    // --- cancel: a running saga is compensated; a finished one is refused.
    let cancelled = skald_json(
        db,
        nats,
        &[
            "cancel",
            &to_cancel.to_string(),
            "--reason",
            "customer called",
        ],
    )
    .await;
    assert_eq!(cancelled[0]["result"], "applied", "{cancelled}");
    assert_eq!(
        cancelled[0]["detail"], "running: waits for the step in flight, then compensates",
        "{cancelled}"
    );
    // The charge is in flight: the cancel waits for its answer (never abandons it).
    let waiting = backend
        .store
        .load(to_cancel)
        .await
        .expect("load")
        .expect("saga");
    assert_eq!(waiting.state.status, SagaStatus::Running);
    assert!(waiting.state.cancel.is_some(), "{:?}", waiting.state);
    scripted.release_slow_charges();
    // The charge succeeded: it is refunded, then the reservation released.
    let done = wait_status(backend.store.as_ref(), to_cancel, SagaStatus::Compensated).await;
    assert_eq!(done.state.completed, 2, "reserve and charge took effect");
    let (code, _, err) = skald(db, nats, &["cancel", &ok.to_string()]).await;
    assert_eq!(code, 6, "{err}");

    // --- stuck: the saga whose shipping never answers, once it waited 1 s.
    let stuck = wait_until("the hanging saga to be flagged stuck", || async {
        let list = skald_json(db, None, &["stuck", "--older-than", "1s"]).await;
        (!list.as_array().expect("list").is_empty()).then_some(list)
    })
    .await;
    assert_eq!(
        statuses(&stuck).into_keys().collect::<Vec<_>>(),
        vec![hanging.to_string()]
    );
    assert!(
        stuck[0]["why"]
            .as_str()
            .is_some_and(|w| w.contains("awaiting a reply")),
        "{stuck}"
    );
    // By default (3 times its 10 s timeout) it is not stuck yet.
    assert_eq!(skald_json(db, None, &["stuck"]).await, json!([]));

    // --- stats.
    let stats = skald_json(db, None, &["stats"]).await;
    let count = |status: &str| {
        stats["counts"]
            .as_array()
            .expect("counts")
            .iter()
            .find(|c| c["status"] == status)
            .map_or(0, |c| c["count"].as_u64().unwrap_or(0))
    };
    assert_eq!(
        (count("completed"), count("compensated"), count("running")),
        (1, 3, 1),
        "{stats}"
    );
    assert_eq!(stats["started"], 5);
    assert_eq!(stats["finished"], 4);
    assert_eq!(stats["open_dead_letters"], 0);
    assert_eq!(stats["oldest_active"]["id"], hanging.to_string());

    // --- a request no runtime is there to apply stays queued, and is applied later.
    rt.shutdown().await;
    let (code, out, err) = skald(db, nats, &["cancel", &hanging.to_string(), "--wait", "1s"]).await;
    assert_eq!(code, 7, "{err}\n{out}");
    assert!(out.contains("pending"), "{out}");
    let rt = runtime(&backend, &checkout).await;
    // Applied by the next runtime: the cancel waits for the shipment in flight, which
    // never answers; a shipment cannot be undone, so the saga is dead-lettered for an
    // operator to find out whether it shipped (never `compensated` around it).
    let failed = wait_status(backend.store.as_ref(), hanging, SagaStatus::Failed).await;
    let dl = failed.state.dead_letter.expect("a dead letter");
    assert_eq!(dl.error.code, "in_doubt_without_compensation", "{dl:?}");
    assert_eq!(dl.step_name.as_str(), "ship_order");
    assert!(failed.state.cancel.is_some(), "the cancel stays recorded");
    rt.shutdown().await;

    // --- replay: the registered definition takes every saga's recorded path; one with
    // its steps reordered diverges at the first command.
    let (code, out, err) = skald(db, None, &["replay", "--type", "checkout", "--all"]).await;
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("5 sagas: 5 same, 0 diverged"), "{out}");
    let reordered = skald::cli::Cli::new().register(&reordered_checkout());
    let e = reordered
        .run([
            "--db", db, "--json", "replay", "--type", "checkout", "--all",
        ])
        .await
        .expect_err("a reordered definition diverges");
    assert_eq!(e.status, skald::cli::ExitStatus::Diverged, "{}", e.message);
    let report: Value = serde_json::from_str(&e.output).expect("JSON");
    for r in report.as_array().expect("list") {
        assert_eq!(r["result"], "diverged", "{r}");
        assert_eq!(r["divergence"]["entry"], 0, "{r}");
        assert_eq!(r["divergence"]["input"], "started", "{r}");
    }
    let one = reordered
        .run(["--db", db, "replay", &ok.to_string()])
        .await
        .expect_err("diverges");
    assert!(
        one.output.contains("diverges at entry #0 (started"),
        "{}",
        one.output
    );

    // --- bad input: the documented exit codes.
    let (code, _, err) = skald(db, None, &["show", &SagaId::new().to_string()]).await;
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = skald(db, None, &["show", "not-an-id"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = skald(db, None, &["sagas", "--status", "sleeping"]).await;
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_on_postgres_nats() {
    operator_cli_end_to_end(Backend::PostgresNats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_on_sqlite_nats() {
    operator_cli_end_to_end(Backend::SqliteNats).await;
}

/// Operator requests from the CLI against a runtime with an operator allowlist: an
/// unsigned request and one signed by an unlisted key are refused as unverified, one
/// that expired before a runtime got it is refused as expired, and one signed by the
/// listed operator is applied; the CLI says which, with exit code 6 for a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_requests_are_signed_and_their_refusals_named() {
    let backend = Resources::new(Backend::SqliteNats).await;
    let db = backend.dir.sqlite_url();
    let db = db.as_str();
    let nats_url = backend.nats.as_ref().expect("a NATS backend").url();
    let nats = Some(nats_url.as_str());
    let checkout = checkout_definition(CheckoutTiming::default()).expect("valid");
    let scripted = Scripted::new(Duration::from_millis(30));
    let bus = backend.bus().await;
    let _participants = participants(&bus, &scripted).await;
    let alice = nkeys::KeyPair::new_user();
    let mallory = nkeys::KeyPair::new_user();
    let seed_file = |name: &str, key: &nkeys::KeyPair| {
        let path = backend.dir.0.join(format!("{name}.nk"));
        std::fs::write(&path, format!("{}\n", key.seed().expect("seed"))).expect("write");
        path.display().to_string()
    };
    let (alice_seed, mallory_seed) = (seed_file("alice", &alice), seed_file("mallory", &mallory));
    // The runtime's clock, moved past the expired request's expiry before it is sent: on
    // loopback a request can be applied within its 1 ms.
    let clock =
        skald::ports::ManualClock::new(skald::ports::Clock::now(&skald::ports::SystemClock));
    let rt = Runtime::builder()
        .store(Arc::clone(&backend.store))
        .bus(backend.bus().await)
        .register(&checkout)
        .clock(Arc::new(clock.clone()))
        .options(RuntimeOptions {
            arbiters: 2,
            wakeup_poll_interval: Duration::from_millis(50),
            operators: [("alice".to_owned(), alice.public_key())].into(),
            ..RuntimeOptions::default()
        })
        .start()
        .await
        .expect("start the runtime");
    let hanging = rt
        .start_saga(&checkout, &tea_order("hang-1"))
        .await
        .expect("start")
        .id();
    wait_saga(backend.store.as_ref(), hanging, "at step 2", |s| {
        s.state.pending.is_some_and(|p| p.step == 2)
    })
    .await;
    let id = hanging.to_string();
    let cancel = |extra: &[&str]| {
        let mut args = vec![
            "cancel",
            id.as_str(),
            "--operator",
            "alice",
            "--wait",
            "20s",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        skald(db, nats, &args).await
    };
    for (what, extra, want) in [
        ("unsigned", vec![], "unverified operator"),
        (
            "signed by an unlisted key",
            vec!["--operator-nkey", mallory_seed.as_str()],
            "unverified operator",
        ),
        (
            "expired",
            vec!["--operator-nkey", alice_seed.as_str(), "--ttl", "1ms"],
            "expired",
        ),
    ] {
        if what == "expired" {
            clock.advance(Duration::from_secs(60));
        }
        let (code, out, err) = run(cancel(&extra)).await;
        assert_eq!(code, 6, "{what}: {err}\n{out}");
        assert!(
            out.contains("refused") && out.contains(want),
            "{what}: {out}"
        );
        assert!(
            err.contains("refused: ") && err.contains(want),
            "{what}: {err}"
        );
        assert!(!format!("{out}{err}").contains(&alice.seed().expect("seed")));
    }
    let unchanged = backend
        .store
        .load(hanging)
        .await
        .expect("load")
        .expect("saga");
    assert!(unchanged.state.cancel.is_none(), "{:?}", unchanged.state);
    // Signed by alice, within its time: applied.
    let (code, out, err) = run(cancel(&["--operator-nkey", alice_seed.as_str()])).await;
    assert_eq!(code, 0, "{err}\n{out}");
    assert!(out.contains("applied"), "{out}");
    let cancelled = backend
        .store
        .load(hanging)
        .await
        .expect("load")
        .expect("saga");
    assert!(cancelled.state.cancel.is_some(), "{:?}", cancelled.state);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_names_what_is_wrong_with_the_database() {
    let dir = TempDir::new();
    // No such file.
    let missing = format!("sqlite://{}", dir.0.join("missing.db").display());
    let (code, _, err) = skald(&missing, None, &["sagas"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no SQLite database at"), "{err}");
    // A database without skald's schema.
    let empty = dir.0.join("empty.db");
    std::fs::write(&empty, b"").expect("create an empty file");
    let (code, _, err) = skald(&format!("sqlite://{}", empty.display()), None, &["stats"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no skald schema"), "{err}");
    let pg = PgDatabase::create().await;
    let (code, _, err) = skald(&pg.url(), None, &["stats"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no skald schema"), "{err}");
    // Nothing listens there (port 1), and the password is not shown.
    let (code, _, err) = skald(
        "postgres://skald:secret@127.0.0.1:1/skald",
        None,
        &["sagas"],
    )
    .await;
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("cannot connect to PostgreSQL") && !err.contains("secret"),
        "{err}"
    );
    // Not a URL skald knows.
    let (code, _, err) = skald("mysql://localhost/db", None, &["sagas"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("unsupported database URL"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Without a broker: transport flags, secrets, and no panics.

/// A saga of the test's own type `shop`, with steps `a`, `b`, `c` (v1).
#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    done: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Receipt {
    receipt: String,
}

fn shop(version: u32, steps: &[&str]) -> SagaDefinition<Order> {
    steps
        .iter()
        .fold(SagaDefinition::<Order>::builder("shop", version), |b, s| {
            b.step(
                Step::new(*s)
                    .action(format!("skald.cmd.{s}.do"), |o: &Order| json!(o.done))
                    .on_success(|o: &mut Order, r: Receipt| o.done.push(r.receipt))
                    .compensate(format!("skald.cmd.{s}.undo"), |_: &Order| json!({})),
            )
        })
        .build()
        .expect("valid")
}

/// Writes a `shop` v1 saga straight into a fresh SQLite store: started, `a` and `b`
/// done, `c` in flight. Its journal is the start, then a snapshot of that state (as a
/// compacted retry run or `skald migrate-payloads` leaves one): a definition with fewer
/// steps meets step index 2 there, before any transition could diverge.
async fn seeded_store(dir: &TempDir) -> (String, SagaId) {
    use skald::journal::{JournalRecord, Transition};
    use skald::machine::{Input, SagaState, Timestamp, transition};
    use skald::ports::{Clock, JournalEntry, SagaWrite, SystemClock};
    use skald::replay::snapshot;

    let url = dir.sqlite_url();
    let store = skald::adapters::sqlite::SqliteStore::connect(&url)
        .await
        .expect("create the store");
    let def = shop(1, &["a", "b", "c"]);
    let def = def.definition();
    let t0 = SystemClock.now().as_millis() - 60_000;
    let id = SagaId::new();
    let start = SagaState::new(id, def, json!({ "done": [] }), Timestamp(t0));
    let success = |step: &str, receipt: &str| Input::StepSucceeded {
        step: skald::ids::StepName::new(step).expect("name"),
        kind: skald::ids::CommandKind::Action,
        attempt: 1,
        output: json!({ "receipt": receipt }),
    };
    let mut state = start.clone();
    let mut first = None;
    for (i, input) in [Input::Started, success("a", "ra"), success("b", "rb")]
        .into_iter()
        .enumerate()
    {
        let at = Timestamp(t0 + 1_000 * (i as u64 + 1));
        let (next, effects) = transition(def, &state, &input, at).expect("applies");
        if i == 0 {
            let record = Transition::new(&input, &next, &effects, Some(&start), None);
            first = Some(JournalEntry::new(at, &JournalRecord::Transition(record)));
        }
        state = next;
    }
    assert_eq!(state.pending.map(|p| p.step), Some(2));
    let snapshot = JournalEntry::new(Timestamp(t0 + 10_000), &snapshot(&state, "compacted"));
    let write = SagaWrite {
        id,
        partition: id.partition(16),
        expected_version: 0,
        state: Some(state),
        journal: vec![first.expect("the start"), snapshot],
        dead_letter: None,
        resolve_dead_letters: false,
        outbox: Vec::new(),
        inbox: None,
    };
    let outcome = skald::ports::SagaStore::commit(&store, &[write], &[])
        .await
        .expect("commit");
    assert!(
        matches!(
            outcome.first(),
            Some(skald::ports::WriteOutcome::Committed { .. })
        ),
        "{outcome:?}"
    );
    (url, id)
}

/// The NATS flags through clap, as every binary flattens them.
#[derive(Debug, clap::Parser)]
struct WithNats {
    #[command(flatten)]
    nats: skald::cli::NatsArgs,
}

fn parse_nats(args: &[&str]) -> Result<skald::cli::NatsArgs, clap::Error> {
    use clap::Parser as _;
    WithNats::try_parse_from(std::iter::once("bin").chain(args.iter().copied())).map(|w| w.nats)
}

#[test]
fn the_nats_flags_parse() {
    use std::path::PathBuf;
    let a = parse_nats(&[
        "--creds",
        "ops.creds",
        "--tls-ca",
        "ca.pem",
        "--tls-cert",
        "client.pem",
        "--tls-key",
        "client.key",
    ])
    .expect("parses");
    assert_eq!(a.creds, Some(PathBuf::from("ops.creds")));
    assert_eq!(
        (a.tls_ca, a.tls_cert, a.tls_key),
        (
            Some(PathBuf::from("ca.pem")),
            Some(PathBuf::from("client.pem")),
            Some(PathBuf::from("client.key"))
        )
    );
    let a = parse_nats(&["--nkey", "svc.nk"]).expect("parses");
    assert_eq!(a.nkey, Some(PathBuf::from("svc.nk")));
    let a = parse_nats(&["--user", "ops", "--password", "pw-f1ag"]).expect("parses");
    assert_eq!(
        (a.user.as_deref(), a.password.as_deref()),
        (Some("ops"), Some("pw-f1ag"))
    );
    let a = parse_nats(&["--token", "tok-f1ag"]).expect("parses");
    assert_eq!(a.token.as_deref(), Some("tok-f1ag"));
    assert!(parse_nats(&[]).expect("parses").is_empty());
    // Half a pair, or two authentication methods: refused (by `validate`: the flags are
    // global, which clap cannot check across a command and its subcommand), naming
    // flags only.
    for bad in [
        &["--user", "ops"][..],
        &["--password", "pw-f1ag"],
        &["--tls-cert", "client.pem"],
        &["--tls-key", "client.key"],
        &[
            "--token",
            "tok-f1ag",
            "--user",
            "ops",
            "--password",
            "pw-f1ag",
        ],
        &["--creds", "ops.creds", "--nkey", "svc.nk"],
        &["--nkey", "svc.nk", "--token", "tok-f1ag"],
    ] {
        let e = parse_nats(bad)
            .expect("parses")
            .validate()
            .expect_err("refused");
        let shown = format!("{e}\n{e:?}");
        assert!(
            !shown.contains("pw-f1ag") && !shown.contains("tok-f1ag"),
            "{bad:?}: {shown}"
        );
    }
}

#[test]
fn nats_args_debug_hides_the_secrets() {
    let a = parse_nats(&["--user", "ops", "--password", "pw-f1ag"]).expect("parses");
    let shown = format!("{a:?}");
    assert!(
        shown.contains("ops") && !shown.contains("pw-f1ag"),
        "{shown}"
    );
    let a = parse_nats(&["--token", "tok-f1ag"]).expect("parses");
    let shown = format!("{a:?} {a:#?}");
    assert!(!shown.contains("tok-f1ag"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_help_and_errors() {
    let dir = TempDir::new();
    let (db, id) = seeded_store(&dir).await;
    let id = id.to_string();
    let env = [
        ("SKALD_NATS_PASSWORD", "pw-fr0m-env"),
        ("SKALD_NATS_TOKEN", "tok-fr0m-env"),
    ];
    let secrets = [
        "pw-fr0m-env",
        "tok-fr0m-env",
        "pw-f1ag",
        "tok-f1ag",
        "url-s3cret",
    ];
    let clean = |what: &str, out: &str| {
        for s in secrets {
            assert!(!out.contains(s), "{what} shows {s}:\n{out}");
        }
    };
    // --help, of the CLI and of a command that sends: every flag, no value.
    for args in [
        &["--help"][..],
        &["cancel", "--help"],
        &["dlq", "redrive", "--help"],
    ] {
        let (code, out, err) = skald_with_env(&db, None, args, &env).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        clean("--help", &out);
        for flag in [
            "--creds",
            "--nkey",
            "--user",
            "--password",
            "--token",
            "--tls-ca",
            "--tls-cert",
            "--tls-key",
            "SKALD_NATS_PASSWORD",
        ] {
            assert!(out.contains(flag), "{args:?} --help lacks {flag}:\n{out}");
        }
        if args[0] != "--help" {
            for flag in ["--operator-nkey", "--if-version", "--ttl"] {
                assert!(out.contains(flag), "{args:?} --help lacks {flag}:\n{out}");
            }
        }
    }
    // Usage errors: two authentication methods; a password from the environment with a
    // token on the command line.
    let (code, out, err) = skald_with_env(
        &db,
        None,
        &[
            "--user",
            "ops",
            "--password",
            "pw-f1ag",
            "--token",
            "tok-f1ag",
            "sagas",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    clean("a conflict", &format!("{out}{err}"));
    let (code, out, err) = skald_with_env(&db, None, &["--user", "ops", "sagas"], &[env[1]]).await;
    assert_eq!(code, 2, "{err}");
    clean("a conflict with the environment", &format!("{out}{err}"));
    // A certificate without its key.
    let (code, _, err) = skald(&db, None, &["--tls-cert", "client.pem", "sagas"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-key"), "{err}");
    // NATS unreachable (port 1), with a password in the URL and one in the flags: the
    // broker's exit code, the URL redacted, neither password shown.
    let (code, out, err) = skald_with_env(
        &db,
        Some("nats://ops:url-s3cret@127.0.0.1:1"),
        &["cancel", &id, "--user", "ops", "--password", "pw-f1ag"],
        &[],
    )
    .await;
    assert_eq!(code, 5, "{err}\n{out}");
    clean("a connection error", &format!("{out}{err}"));
    assert!(err.contains("nats://ops:***@127.0.0.1:1"), "{err}");
    let (code, out, err) = skald_with_env(
        &db,
        Some("nats://127.0.0.1:1"),
        &["cancel", &id, "--user", "ops"],
        &[env[0]],
    )
    .await;
    assert_eq!(code, 5, "{err}\n{out}");
    clean("a connection error", &format!("{out}{err}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_files_and_request_flags_are_checked_before_sending() {
    let dir = TempDir::new();
    let (db, id) = seeded_store(&dir).await;
    let id = id.to_string();
    let nats = Some("nats://127.0.0.1:1");
    let not_a_seed = dir.0.join("not-a-seed");
    std::fs::write(&not_a_seed, "s3cret-but-no-seed\n").expect("write");
    let not_a_seed = not_a_seed.display().to_string();
    // --nkey and --operator-nkey: a file that holds no seed is a usage error naming the
    // file, not its content.
    for args in [
        vec!["--nkey", not_a_seed.as_str(), "cancel", id.as_str()],
        vec![
            "cancel",
            id.as_str(),
            "--operator-nkey",
            not_a_seed.as_str(),
        ],
    ] {
        let (code, out, err) = skald(&db, nats, &args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("NKey user seed") && err.contains(&not_a_seed),
            "{err}"
        );
        assert!(!format!("{out}{err}").contains("s3cret"), "{err}");
    }
    let missing = dir.0.join("missing.creds").display().to_string();
    let (code, _, err) = skald(&db, nats, &["--creds", &missing, "cancel", &id]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--creds") && err.contains(&missing), "{err}");
    // --ttl: more than the hour runtimes accept, or nothing at all.
    for ttl in ["2h", "0s"] {
        let (code, _, err) = skald(&db, nats, &["cancel", &id, "--ttl", ttl]).await;
        assert_eq!(code, 2, "--ttl {ttl}: {err}");
        assert!(err.contains("--ttl"), "{err}");
    }
    // --if-version: the saga is at version 1, so 7 is refused before sending.
    let (code, _, err) = skald(&db, nats, &["cancel", &id, "--if-version", "7"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("at version 1, not 7"), "{err}");
    let (code, _, err) = skald(&db, nats, &["dlq", "redrive", "--all", "--if-version", "1"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--if-version"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_with_multibyte_characters_are_usage_errors() {
    let dir = TempDir::new();
    let (db, id) = seeded_store(&dir).await;
    let id = id.to_string();
    for time in [
        "2026-11-24T03:50:12é1:00",
        "2026-11-24T03:50:12€",
        "2026-11-24T03:50:12.5€:00",
        "2026-11-24T03:50:12+€:00",
        "2026-11-24T03:5€:12Z",
        "ééééééééééééééééééééé",
        "-5€",
        "€",
    ] {
        let (code, _, err) = skald(&db, None, &["at", &id, "--time", time]).await;
        assert_eq!(code, 2, "--time {time}: {err}");
        assert!(err.contains("invalid time"), "--time {time}: {err}");
    }
    // Durations too (no panic; clap's usage error).
    let (code, _, err) = skald(&db, None, &["stuck", "--older-than", "5€"]).await;
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_beyond_a_shorter_definition_is_an_error_not_a_panic() {
    use skald::cli::{Cli, ExitStatus};
    let dir = TempDir::new();
    let (db, id) = seeded_store(&dir).await;
    let id = id.to_string();
    let db = db.as_str();
    let cli = Cli::new()
        .register(&shop(1, &["a", "b", "c"]))
        .register(&shop(2, &["a", "b"]))
        .register(&shop(3, &["a"]));
    // Its own definition: the same path.
    let out = cli
        .run(["--db", db, "replay", &id])
        .await
        .expect("the same path");
    assert!(out.contains("1 sagas: 1 same"), "{out}");
    // Against versions with fewer steps: the snapshot names step index 2 (and 2
    // completed steps), which they do not have.
    for (against, what) in [("2", "pending.step is 2"), ("3", "completed is 2")] {
        let e = cli
            .run(["--db", db, "--json", "replay", &id, "--against", against])
            .await
            .expect_err("does not fit");
        assert_eq!(e.status, ExitStatus::CannotReplay, "{}", e.message);
        let report: Value = serde_json::from_str(&e.output).expect("JSON");
        assert_eq!(report[0]["result"], "cannot_replay", "{report}");
        let error = report[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("does not fit") && error.contains(what),
            "--against {against}: {error}"
        );
    }
    // A v1 edited in place to fewer steps: time travel says so.
    let edited = Cli::new().register(&shop(1, &["a"]));
    let e = edited
        .run(["--db", db, "at", &id, "--time", "-0s"])
        .await
        .expect_err("does not fit");
    assert_eq!(e.status, ExitStatus::CannotReplay, "{}", e.message);
    assert!(e.message.contains("does not fit"), "{}", e.message);
    // Before the snapshot, time travel under it still works.
    let e = edited
        .run(["--db", db, "at", &id, "--time", "-55s"])
        .await
        .expect("the start alone fits");
    assert!(e.contains("status    running"), "{e}");
}

/// `skald sagas` lists newest first by creation time, and `skald stats` names the oldest
/// active saga by creation time, with keyed sagas (version-8 ids, no time order: nearly
/// all sort above every unkeyed id) among unkeyed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_are_listed_by_creation_time_with_keyed_ones_among_them() {
    use skald::cli::Cli;
    use skald::machine::{Input, SagaState, Timestamp, transition};
    use skald::ports::{Clock, SagaWrite, SystemClock};

    let dir = TempDir::new();
    let url = dir.sqlite_url();
    let store = skald::adapters::sqlite::SqliteStore::connect(&url)
        .await
        .expect("create the store");
    let def = shop(1, &["a", "b", "c"]);
    let d = def.definition();
    let t0 = SystemClock.now().as_millis() - 600_000;
    let keyed = |key: &str| SagaId::for_key(d.saga_type(), key).expect("key");
    // Oldest first: keyed, unkeyed, keyed, unkeyed, unkeyed (the newest), a minute apart.
    let ids = [
        keyed("order-1"),
        SagaId::new(),
        keyed("order-2"),
        SagaId::new(),
        SagaId::new(),
    ];
    for (i, id) in ids.iter().enumerate() {
        let at = Timestamp(t0 + 60_000 * i as u64);
        let fresh = SagaState::new(*id, d, json!({ "done": [] }), at);
        let (state, _) = transition(d, &fresh, &Input::Started, at).expect("start");
        let write = SagaWrite {
            id: *id,
            partition: id.partition(16),
            expected_version: 0,
            state: Some(state),
            journal: Vec::new(),
            dead_letter: None,
            resolve_dead_letters: false,
            outbox: Vec::new(),
            inbox: None,
        };
        let outcome = skald::ports::SagaStore::commit(&store, &[write], &[])
            .await
            .expect("commit");
        assert!(
            matches!(
                outcome.first(),
                Some(skald::ports::WriteOutcome::Committed { .. })
            ),
            "{outcome:?}"
        );
    }
    assert!(
        ids[0] > ids[4],
        "precondition: the oldest (keyed) id sorts above the newest"
    );
    let newest_first: Vec<String> = ids.iter().rev().map(ToString::to_string).collect();

    let cli = Cli::new().register(&def);
    let db = url.as_str();
    let out = cli
        .run(["--db", db, "--json", "sagas"])
        .await
        .expect("sagas");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    let listed: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, newest_first, "newest first by creation time");
    // The newest 2: both unkeyed, however high the keyed ids sort.
    let table = cli
        .run(["--db", db, "sagas", "--limit", "2"])
        .await
        .expect("sagas");
    let rows: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|cell| cell.parse::<SagaId>().is_ok())
        .collect();
    assert_eq!(rows, newest_first[..2], "{table}");
    assert!(table.contains("showing the newest 2"), "{table}");
    // The oldest active saga is the one created first: keyed here.
    let stats = cli.run(["--db", db, "stats"]).await.expect("stats");
    assert!(
        stats.contains(&format!("oldest active: {} (shop)", ids[0])),
        "{stats}"
    );
}
