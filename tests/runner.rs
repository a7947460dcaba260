//! The checkout runner as a user runs it: a process killed with SIGKILL mid-run, then
//! `--resume` finishes every saga and the consistency check passes.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Wait;
use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::SqlitePoolOptions;

fn checkout_bin() -> PathBuf {
    // target/<profile>/deps/runner-<hash> -> target/<profile>/examples/checkout
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join("checkout");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it; or run `cargo build --example checkout`",
        bin.display()
    );
    bin
}

async fn counts(url: &str) -> (i64, i64) {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("open the runner's database");
    let row = sqlx::query(
        "SELECT COUNT(*) AS total, \
         COALESCE(SUM(status IN ('running', 'compensating')), 0) AS active FROM saga_instances",
    )
    .fetch_one(&pool)
    .await
    .expect("count sagas");
    pool.close().await;
    (row.get("total"), row.get("active"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_runner_resumes_and_stays_consistent() {
    let dir = std::env::temp_dir().join(format!("skald-runner-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = format!("sqlite://{}", dir.join("run.db").display());
    let bin = checkout_bin();

    let mut child = Command::new(&bin)
        .args([
            "--sagas",
            "5000",
            "--concurrency",
            "200",
            "--json",
            "--db",
            &db,
        ])
        .args(["--flaky-rate", "0.2", "--decline-rate", "0.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the runner");

    // Kill it once a good number of sagas exist, while many are in flight.
    let (total, active) = Wait::new("the runner to get going")
        .within(Duration::from_secs(60))
        .every(Duration::from_millis(20))
        .until_ok(async || {
            let going = async {
                if !dir.join("run.db").exists() {
                    return Err("no database yet".to_owned());
                }
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect(&db)
                    .await
                    .map_err(|e| e.to_string())?;
                let table =
                    sqlx::query("SELECT 1 FROM sqlite_master WHERE name = 'saga_instances'")
                        .fetch_optional(&pool)
                        .await
                        .ok()
                        .flatten();
                pool.close().await;
                if table.is_none() {
                    return Err("no saga_instances table yet".to_owned());
                }
                match counts(&db).await {
                    (total, active) if total >= 500 && active > 0 => Ok((total, active)),
                    (total, active) => Err(format!("{total} sagas, {active} active")),
                }
            }
            .await;
            if going.is_err() {
                assert!(
                    child.try_wait().expect("poll child").is_none(),
                    "the runner exited before it could be killed"
                );
            }
            going
        })
        .await;
    child.kill().expect("SIGKILL the runner");
    let status = child.wait().expect("reap");
    assert!(!status.success(), "killed, not finished");
    let (after_kill_total, after_kill_active) = counts(&db).await;
    assert!(after_kill_total >= total, "{after_kill_total} < {total}");
    assert!(
        after_kill_active > 0,
        "the kill left no saga unfinished (was {active} in flight)"
    );

    // Resume: finish everything, summarise and check every saga in the database.
    let out = Command::new(&bin)
        .args(["--resume", "--json", "--db", &db, "--timeout-secs", "120"])
        .args(["--flaky-rate", "0.2", "--decline-rate", "0.2"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run --resume");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a summary line");
    let summary: Value = serde_json::from_str(last).expect("the summary is JSON");
    assert!(out.status.success(), "--resume failed: {summary}");
    assert_eq!(summary["unfinished"], 0, "{summary}");
    assert_eq!(summary["consistent"], true, "{summary}");
    assert_eq!(
        summary["started"], after_kill_total,
        "every stored saga is counted: {summary}"
    );
    let settled = summary["completed"].as_i64().unwrap_or(0)
        + summary["compensated"].as_i64().unwrap_or(0)
        + summary["dead_lettered"].as_i64().unwrap_or(0);
    assert_eq!(settled, after_kill_total, "{summary}");
    assert_eq!(counts(&db).await.1, 0, "nothing left running");
    let _ = std::fs::remove_dir_all(&dir);
}
