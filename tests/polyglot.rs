//! A participant in another language: the checkout runner, with no participants of its
//! own, drives sagas answered by a Python service written from docs/protocol.md alone
//! (tests/participants/checkout_participant.py, using only the nats-py client).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use skald::adapters::nats::{NatsBus, NatsOptions};

fn python() -> String {
    std::env::var("SKALD_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SKALD_TEST_PYTHON is not set: run the suite through scripts/test, which creates a \
             venv with nats-py (pip install nats-py) and sets it"
        )
    })
}

fn checkout_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join("checkout");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it",
        bin.display()
    );
    bin
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_participant_serves_the_checkout_saga() {
    let server = NatsServer::start();
    // The streams must exist before the participant's consumer is created.
    NatsBus::connect(NatsOptions::new(server.url()))
        .await
        .expect("create the streams");

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/participants/checkout_participant.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(server.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the Python participant");
    let stdout = child.stdout.take().expect("stdout");
    let participant = Reaper(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the participant's first line");
    assert_eq!(line.trim(), "ready", "the participant did not start");

    let dir = TempDir::new();
    let out = Command::new(checkout_bin())
        .args([
            "--sagas",
            "200",
            "--concurrency",
            "50",
            "--json",
            "--no-participants",
            "--no-check",
        ])
        .args([
            "--nats",
            &server.url(),
            "--db",
            &dir.sqlite_url(),
            "--timeout-secs",
            "120",
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run the checkout runner");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("JSON summary");
    assert!(out.status.success(), "runner failed: {summary}");
    assert_eq!(summary["started"], 200, "{summary}");
    assert_eq!(summary["completed"], 200, "{summary}");
    assert_eq!(summary["unfinished"], 0, "{summary}");
    assert_eq!(
        summary["consistent"],
        serde_json::Value::Null,
        "--no-check: {summary}"
    );
    drop(participant);
}
