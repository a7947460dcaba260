//! `skald serve`, an orchestrator node, as a process of its own: the demo binary's
//! `serve` (the checkout saga registered) migrates a fresh PostgreSQL database, applies
//! every reply of the sagas another process starts (a runtime that consumes nothing, as
//! a service in front of the nodes would be), reports it in its metrics, and stops with
//! exit code 0 on SIGTERM. A node that cannot reach its broker or use its database fails
//! fast with a message naming what to check, and one whose database loses a table under
//! it stops with the schema error (`Runtime::failed`).

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{
    ALL_SERVICES, DEADLINE, NatsServer, PgDatabase, TempDir, fast_timing, no_script, options,
    reliable, skald_command, start_participants, tea_order,
};
use skald::adapters::nats::{NatsBus, NatsOptions};
use skald::adapters::postgres::PostgresStore;
use skald::adapters::sqlite::SqliteStore;
use skald::machine::SagaStatus;
use skald::ports::Bus;
use skald::{Runtime, RuntimeOptions};
use skald_sagas::checkout::{CheckoutTiming, checkout_definition};
use skald_sagas::sim::MemoryLedger;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Sagas started by the test's process and run by the node.
const SAGAS: usize = 20;
/// How long a node may take to be ready (migrations, streams and consumers).
const STARTUP: Duration = Duration::from_secs(60);
/// How long a node may take to stop after SIGTERM.
const STOP: Duration = Duration::from_secs(30);

/// The checkout's timing with a reply timeout no slow machine reaches: the process that
/// only starts sagas must never be the one to time a step out.
fn patient_timing() -> CheckoutTiming {
    CheckoutTiming {
        timeout: Duration::from_secs(300),
        ..fast_timing()
    }
}

/// A `skald` process, its stderr read line by line.
struct Node {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Node {
    fn spawn(args: &[&str]) -> Node {
        let mut cmd = Command::from(skald_command(env!("CARGO_BIN_EXE_skald")));
        cmd.env("RUST_LOG", "warn")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("run the skald binary");
        let stderr = child.stderr.take().expect("its stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Node {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first stderr line containing `needle`, within `within`.
    async fn line_containing(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "the node closed its stderr before printing {needle:?} (exit: {:?}); it \
                     printed:\n{}",
                    self.child.try_wait(),
                    self.seen.join("\n")
                ),
                Err(_) => panic!(
                    "no {needle:?} from the node within {within:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends the signal `name` (`TERM`, `INT`).
    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the node runs");
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// The exit code (`None`: killed by a signal) and everything printed on stderr.
    async fn exit_within(mut self, within: Duration) -> (Option<i32>, String) {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait for the node"),
            Err(_) => panic!(
                "the node did not exit within {within:?}; it printed:\n{}",
                self.seen.join("\n")
            ),
        };
        // The reader ends at the pipe's end, which the exit closed.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            self.seen.push(line);
        }
        (status.code(), self.seen.join("\n"))
    }
}

/// `GET /metrics` over plain HTTP/1.1: the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the node's metrics");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut raw))
        .await
        .expect("a response in time")
        .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_owned()
}

/// The value of the series `series` (name and labels, as exported), if there is one.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A loopback port nothing listens on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sagas started by another process are applied by the node alone: it migrated the
/// fresh database, loads each saga cold on its first reply, never conflicts (it is the
/// only writer after the start), and stops gracefully, exit 0, on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_runs_the_sagas_another_process_starts_and_stops_on_sigterm() {
    let pg = PgDatabase::create().await;
    let nats = NatsServer::start();
    let db = pg.url();
    let mut node = Node::spawn(&[
        "serve",
        "--db",
        &db,
        "--nats",
        &nats.url(),
        "--metrics-addr",
        "127.0.0.1:0",
        "--ack-wait-secs",
        "5",
    ]);
    let ready = node.line_containing("skald serve: running", STARTUP).await;
    assert!(
        ready.starts_with("skald serve: running checkout v1 on postgres://")
            && ready.contains(&format!(" and {}", nats.url())),
        "{ready}"
    );
    let metrics: SocketAddr = ready
        .split_once("metrics on http://")
        .and_then(|(_, rest)| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {ready:?}"))
        .parse()
        .expect("the metrics address");
    // The node created skald's schema (the CLI's read-only open refuses a database
    // without it).
    PostgresStore::open_existing(&db)
        .await
        .expect("serve migrated the fresh database");

    // This process starts sagas and applies nothing: the participants answer, the node
    // applies the replies.
    let store = Arc::new(PostgresStore::connect(&db).await.expect("the store"));
    let bus: Arc<dyn Bus> = Arc::new(
        NatsBus::connect(NatsOptions {
            ack_wait: Duration::from_secs(5),
            ..NatsOptions::new(nats.url())
        })
        .await
        .expect("connect to NATS"),
    );
    let _participants = start_participants(
        Arc::clone(&bus),
        MemoryLedger::default(),
        reliable(),
        no_script(),
        ALL_SERVICES,
    )
    .await;
    let checkout = checkout_definition(patient_timing()).expect("valid definition");
    // The store's shared reply key (no explicit keys): the node has it too.
    let starter = Runtime::builder()
        .store(Arc::clone(&store))
        .bus(Arc::clone(&bus))
        .register(&checkout)
        .options(RuntimeOptions {
            consume: false,
            outcome_poll_interval: Duration::from_millis(100),
            ..options()
        })
        .start()
        .await
        .expect("the starting runtime");
    let mut handles = Vec::new();
    for i in 0..SAGAS {
        let order = tea_order(&format!("served-{i}"));
        handles.push(starter.start_saga(&checkout, &order).await.expect("start"));
    }
    let outcomes =
        futures_util::future::join_all(handles.iter().map(|h| h.outcome_within(DEADLINE))).await;
    for (handle, outcome) in handles.iter().zip(outcomes) {
        let outcome = outcome.unwrap_or_else(|e| {
            panic!(
                "saga {} has no outcome: {e}; the node printed:\n{}",
                handle.id(),
                node.seen.join("\n")
            )
        });
        assert_eq!(outcome.status, SagaStatus::Completed, "{}", handle.id());
        assert!(outcome.data.shipment_id.is_some(), "{:?}", outcome.data);
    }
    let stats = starter.stats();
    assert_eq!(
        stats.transitions, SAGAS as u64,
        "this process applied the starts only"
    );
    assert_eq!(stats.cold_activations, 0, "its actors were made by starts");
    starter.shutdown().await;

    // The node's metrics: every saga finished there, each loaded from the store once
    // (it was started elsewhere), none conflicting.
    let body = scrape(metrics).await;
    let ty = r#"{saga_type="checkout"}"#;
    let get = |name: &str| {
        sample(&body, &format!("{name}{ty}")).unwrap_or_else(|| panic!("no {name} in\n{body}"))
    };
    assert_eq!(get("skald_sagas_completed_total"), SAGAS as f64);
    assert_eq!(get("skald_sagas_started_total"), 0.0, "it starts no sagas");
    assert!(
        get("skald_cold_activations_total") >= SAGAS as f64,
        "every saga was loaded cold at the node:\n{body}"
    );
    assert_eq!(
        get("skald_commit_conflicts_total"),
        0.0,
        "the node is the only writer after the starts:\n{body}"
    );

    node.signal("TERM");
    let (code, stderr) = node.exit_within(STOP).await;
    assert_eq!(
        code,
        Some(0),
        "exit status after SIGTERM; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("skald serve: SIGTERM: stopping"),
        "{stderr}"
    );
    assert!(stderr.contains("skald serve: stopped"), "{stderr}");
}

/// A node fails at once, with the exit code and a message naming what to check, when
/// its broker is not there, its database cannot be opened, or `--nats` is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_start_says_what_to_check() {
    let dir = TempDir::new();
    let db = dir.sqlite_url();
    let nowhere = format!("nats://app:hunter2@127.0.0.1:{}", free_port());

    let began = Instant::now();
    let node = Node::spawn(&["serve", "--db", &db, "--nats", &nowhere]);
    let (code, stderr) = node.exit_within(DEADLINE).await;
    assert_eq!(code, Some(5), "no broker: exit 5; stderr:\n{stderr}");
    assert!(
        stderr.contains("cannot reach NATS") && stderr.contains("check --nats"),
        "{stderr}"
    );
    assert!(
        stderr.contains("nats://app:***@127.0.0.1") && !stderr.contains("hunter2"),
        "the URL is shown, its password is not: {stderr}"
    );
    assert!(!stderr.contains("skald serve: running"), "{stderr}");
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "fails fast: {:?}",
        began.elapsed()
    );

    // A database it cannot open (a directory that does not exist): exit 4, before NATS.
    let missing = format!(
        "sqlite://{}",
        dir.0.join("no-such-dir").join("skald.db").display()
    );
    let node = Node::spawn(&["serve", "--db", &missing, "--nats", &nowhere]);
    let (code, stderr) = node.exit_within(DEADLINE).await;
    assert_eq!(code, Some(4), "no database: exit 4; stderr:\n{stderr}");
    assert!(
        stderr.contains("cannot open the store") && stderr.contains("check --db"),
        "{stderr}"
    );

    // No --nats: bad usage.
    let node = Node::spawn(&["serve", "--db", &db]);
    let (code, stderr) = node.exit_within(DEADLINE).await;
    assert_eq!(code, Some(2), "no --nats: exit 2; stderr:\n{stderr}");
    assert!(stderr.contains("serve needs --nats URL"), "{stderr}");
}

/// A table dropped under a running node: the runtime reports the schema error
/// (`Runtime::failed`) and the node exits 4 with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_schema_breaks_stops_with_the_error() {
    let dir = TempDir::new();
    let db = dir.sqlite_url();
    let nats = NatsServer::start();
    let mut node = Node::spawn(&["serve", "--db", &db, "--nats", &nats.url()]);
    node.line_containing("skald serve: running", STARTUP).await;
    let store = SqliteStore::connect(&db)
        .await
        .expect("the node's database");
    // The outbox relay polls this table every 500 ms.
    sqlx::query("DROP TABLE outbox")
        .execute(store.pool())
        .await
        .expect("drop the outbox table");
    let (code, stderr) = node.exit_within(DEADLINE).await;
    assert_eq!(code, Some(4), "a schema error: exit 4; stderr:\n{stderr}");
    assert!(
        stderr.contains("the runtime stopped") && stderr.contains("outbox"),
        "names the problem: {stderr}"
    );
}
