//! The transport security flags every skald binary takes (the `skald` CLI, the checkout
//! runner, the participant, the operator demo): how to authenticate to NATS and whether
//! to use TLS. One [`clap::Args`] group, [`NatsArgs`], flattened into each binary's
//! arguments and mapped onto [`NatsOptions`].
//!
//! | flag | environment | what it does |
//! |------|-------------|--------------|
//! | `--creds PATH` | `SKALD_NATS_CREDS` | a NATS credentials file (user JWT and NKey seed, as `nsc` writes it) |
//! | `--nkey SEED_FILE` | `SKALD_NATS_NKEY` | a file holding an NKey user seed (`SU...`), for NKey authentication without a JWT |
//! | `--user NAME` | `SKALD_NATS_USER` | a user name (with `--password`) |
//! | `--password SECRET` | `SKALD_NATS_PASSWORD` | its password (with `--user`) |
//! | `--token SECRET` | `SKALD_NATS_TOKEN` | a token |
//! | `--tls-ca PATH` | `SKALD_NATS_TLS_CA` | PEM root certificates to trust (besides the system's) |
//! | `--tls-cert PATH` | `SKALD_NATS_TLS_CERT` | PEM client certificate, for mutual TLS (with `--tls-key`) |
//! | `--tls-key PATH` | `SKALD_NATS_TLS_KEY` | its PEM private key (with `--tls-cert`) |
//! | `--inbox-prefix PREFIX` | `SKALD_NATS_INBOX_PREFIX` | this client's response subjects (default `_INBOX`): one per NATS user, e.g. `_INBOX_payment` |
//!
//! The authentication methods exclude one another (`--creds`, `--nkey`, `--user` and
//! `--password`, `--token`). Any `--tls-*` flag requires TLS (a server that does not
//! offer it is refused); a `tls://` URL does too. Prefer the environment or a file to a
//! secret on the command line (other users may see a process's arguments). Secrets are
//! never shown: not in `--help` (`hide_env_values`), not in errors, not in `Debug`.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;
use skald_adapters::nats::{NatsBus, NatsOptions};
use skald_adapters::redact_url;
use skald_runtime::ports::BusError;

/// The help section of the flags.
const HEADING: &str = "NATS authentication and TLS";

/// How to authenticate to NATS and whether to use TLS: flatten it into a binary's
/// arguments (`#[command(flatten)] nats_auth: NatsArgs`), then
/// [`NatsArgs::configure`] or [`NatsArgs::connect`]. See the module docs for the flags.
///
/// The flags are global (they may follow a subcommand), so clap does not check how they
/// combine (its `requires` and `conflicts_with` misjudge global flags split between a
/// command and its subcommand, or between a flag and the environment):
/// [`NatsArgs::validate`] does, and `configure` calls it.
#[derive(Clone, Default, PartialEq, Eq, Args)]
pub struct NatsArgs {
    /// A NATS credentials file (user JWT and NKey seed, as `nsc` writes it).
    #[arg(long, env = "SKALD_NATS_CREDS", value_name = "PATH", global = true, help_heading = HEADING)]
    pub creds: Option<PathBuf>,
    /// A file holding an NKey user seed (SU...), for NKey authentication without a JWT.
    #[arg(long, env = "SKALD_NATS_NKEY", value_name = "SEED_FILE", global = true, help_heading = HEADING)]
    pub nkey: Option<PathBuf>,
    /// A NATS user name (with --password).
    #[arg(long, env = "SKALD_NATS_USER", value_name = "NAME", global = true, help_heading = HEADING)]
    pub user: Option<String>,
    /// The user's password (with --user; prefer the environment variable to the flag).
    #[arg(
        long,
        env = "SKALD_NATS_PASSWORD",
        hide_env_values = true,
        value_name = "SECRET",
        global = true,
        help_heading = HEADING
    )]
    pub password: Option<String>,
    /// A NATS token (prefer the environment variable to the flag).
    #[arg(
        long,
        env = "SKALD_NATS_TOKEN",
        hide_env_values = true,
        value_name = "SECRET",
        global = true,
        help_heading = HEADING
    )]
    pub token: Option<String>,
    /// PEM root certificates to trust (besides the system's); requires TLS.
    #[arg(
        long,
        env = "SKALD_NATS_TLS_CA",
        value_name = "PATH",
        global = true,
        help_heading = HEADING
    )]
    pub tls_ca: Option<PathBuf>,
    /// A PEM client certificate for mutual TLS (with --tls-key); requires TLS.
    #[arg(long, env = "SKALD_NATS_TLS_CERT", value_name = "PATH", global = true, help_heading = HEADING)]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's PEM private key (with --tls-cert); requires TLS.
    #[arg(long, env = "SKALD_NATS_TLS_KEY", value_name = "PATH", global = true, help_heading = HEADING)]
    pub tls_key: Option<PathBuf>,
    /// The prefix of this client's response subjects (default `_INBOX`): give each NATS
    /// user its own, e.g. `_INBOX_payment`, and permit it only `_INBOX_payment.>`, so no
    /// client can read another's JetStream responses (docs/security.md).
    #[arg(long, env = "SKALD_NATS_INBOX_PREFIX", value_name = "PREFIX", global = true, help_heading = HEADING)]
    pub inbox_prefix: Option<String>,
}

/// Shows which secrets are set, never their values.
impl fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("NatsArgs")
            .field("creds", &self.creds)
            .field("nkey", &self.nkey)
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("token", &secret(&self.token))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

/// Why the transport flags cannot be used, or NATS cannot be reached with them. The
/// message names flags, files and the URL (its password redacted), never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NatsArgsError {
    /// A flag is wrong: a missing or unreadable file, a file that holds no NKey seed,
    /// half of a pair.
    #[error("{0}")]
    Invalid(String),
    /// NATS could not be reached (or refused the connection) with these options.
    #[error("{0}")]
    Connect(String),
}

fn invalid(message: String) -> NatsArgsError {
    NatsArgsError::Invalid(message)
}

/// Checks that `path` (given with `flag`) is a readable file, for an error before
/// connecting rather than a TLS or credentials error from inside the client.
fn existing_file(flag: &str, path: &Path) -> Result<PathBuf, NatsArgsError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(path.to_path_buf()),
        Ok(_) => Err(invalid(format!("{flag} {}: not a file", path.display()))),
        Err(e) => Err(invalid(format!("{flag} {}: {e}", path.display()))),
    }
}

/// Reads an NKey user seed (`SU...`) from `path` (surrounding whitespace trimmed). The
/// error names the file, never its content.
pub fn read_nkey_seed(flag: &str, path: &Path) -> Result<String, NatsArgsError> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        invalid(format!(
            "{flag} {}: cannot read the NKey seed file: {e}",
            path.display()
        ))
    })?;
    let seed = raw.trim();
    let plausible = seed.len() > 2
        && seed.starts_with("SU")
        && seed
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !plausible {
        return Err(invalid(format!(
            "{flag} {}: the file does not hold an NKey user seed (one line starting with SU, \
             as `nsc` or `nk -gen user` writes it)",
            path.display()
        )));
    }
    Ok(seed.to_owned())
}

impl NatsArgs {
    /// Whether any flag is set.
    pub fn is_empty(&self) -> bool {
        *self == NatsArgs::default()
    }

    /// Whether TLS is required by these flags (any `--tls-*`).
    pub fn requires_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some()
    }

    /// Checks how the flags combine, naming flags and variables only: one way to
    /// authenticate at most (`--creds`, `--nkey`, `--user` with `--password`, or
    /// `--token`), and both halves of a pair (a user and its password, a certificate and
    /// its key).
    pub fn validate(&self) -> Result<(), NatsArgsError> {
        let methods: Vec<&str> = [
            (self.creds.is_some(), "--creds (SKALD_NATS_CREDS)"),
            (self.nkey.is_some(), "--nkey (SKALD_NATS_NKEY)"),
            (
                self.user.is_some() || self.password.is_some(),
                "--user/--password (SKALD_NATS_USER/SKALD_NATS_PASSWORD)",
            ),
            (self.token.is_some(), "--token (SKALD_NATS_TOKEN)"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if methods.len() > 1 {
            return Err(invalid(format!(
                "give one way to authenticate to NATS, not {}",
                methods.join(" and ")
            )));
        }
        match (&self.user, &self.password) {
            (Some(_), None) => {
                return Err(invalid(
                    "--user needs --password (or SKALD_NATS_PASSWORD)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "--password (or SKALD_NATS_PASSWORD) needs --user (or SKALD_NATS_USER)".into(),
                ));
            }
            _ => {}
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => Err(invalid(
                "--tls-cert needs --tls-key (or SKALD_NATS_TLS_KEY): the client \
                 certificate's private key"
                    .into(),
            )),
            (None, Some(_)) => Err(invalid(
                "--tls-key needs --tls-cert (or SKALD_NATS_TLS_CERT): the client certificate \
                 it belongs to"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// `options` with these flags' authentication and TLS settings: checks how the flags
    /// combine ([`validate`](Self::validate)), reads the NKey seed file, and checks that
    /// the other files exist.
    pub fn configure(&self, mut options: NatsOptions) -> Result<NatsOptions, NatsArgsError> {
        self.validate()?;
        if let Some(path) = &self.creds {
            options.credentials_file = Some(existing_file("--creds", path)?);
        }
        if let Some(path) = &self.nkey {
            options.nkey_seed = Some(read_nkey_seed("--nkey", path)?);
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options.user_password = Some((user.clone(), password.clone()));
        }
        if let Some(token) = &self.token {
            options.token = Some(token.clone());
        }
        if let Some(path) = &self.tls_ca {
            options.root_certificates = Some(existing_file("--tls-ca", path)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options.client_certificate = Some((
                existing_file("--tls-cert", cert)?,
                existing_file("--tls-key", key)?,
            ));
        }
        if self.requires_tls() {
            options.require_tls = true;
        }
        if let Some(prefix) = &self.inbox_prefix {
            if prefix.is_empty()
                || prefix.split('.').any(|t| {
                    t.is_empty() || t.contains(['*', '>']) || t.contains(char::is_whitespace)
                })
            {
                return Err(invalid(format!(
                    "--inbox-prefix {prefix:?}: a subject prefix without wildcards or spaces, \
                     e.g. _INBOX_payment"
                )));
            }
            options.inbox_prefix = Some(prefix.clone());
        }
        Ok(options)
    }

    /// [`configure`](Self::configure)s `options` and connects. A connection error names
    /// the URL with its password redacted.
    pub async fn connect(&self, options: NatsOptions) -> Result<NatsBus, NatsArgsError> {
        let options = self.configure(options)?;
        let url = options.url.clone();
        NatsBus::connect(options)
            .await
            .map_err(|e| NatsArgsError::Connect(connect_error(&url, &e)))
    }
}

/// A NATS connection error in words, with `url` (which the bus's messages name as
/// given) redacted wherever it appears.
pub fn connect_error(url: &str, e: &BusError) -> String {
    let redacted = redact_url(url);
    let message = if url.is_empty() {
        e.to_string()
    } else {
        e.to_string().replace(url, &redacted)
    };
    if message.contains(&redacted) {
        message
    } else {
        format!("NATS at {redacted}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        nats: NatsArgs,
    }

    fn parse(args: &[&str]) -> Result<NatsArgs, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|t| t.nats)
    }

    #[test]
    fn tls_flags_require_tls_and_come_in_pairs() {
        let dir = std::env::temp_dir().join(format!("skald-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (ca, cert, key) = (dir.join("ca.pem"), dir.join("c.pem"), dir.join("k.pem"));
        for f in [&ca, &cert, &key] {
            std::fs::write(f, "pem").expect("write");
        }
        let a = NatsArgs {
            tls_ca: Some(ca.clone()),
            ..NatsArgs::default()
        };
        let o = a.configure(NatsOptions::new("nats://h:4222")).expect("ok");
        assert!(o.require_tls);
        assert_eq!(o.root_certificates, Some(ca));
        let half = NatsArgs {
            tls_cert: Some(cert.clone()),
            ..NatsArgs::default()
        };
        let e = half
            .configure(NatsOptions::new("nats://h:4222"))
            .expect_err("no key");
        assert!(e.to_string().contains("--tls-cert needs --tls-key"), "{e}");
        let both = NatsArgs {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            ..NatsArgs::default()
        };
        let o = both.configure(NatsOptions::new("nats://h")).expect("ok");
        assert_eq!(o.client_certificate, Some((cert, key)));
        assert!(o.require_tls);
        let missing = NatsArgs {
            tls_ca: Some(dir.join("nope.pem")),
            ..NatsArgs::default()
        };
        let e = missing
            .configure(NatsOptions::new("nats://h"))
            .expect_err("missing");
        assert!(
            matches!(&e, NatsArgsError::Invalid(m) if m.starts_with("--tls-ca ")),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nkey_seed_files_are_read_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("skald-nkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("seed");
        std::fs::write(&good, "  SUAEXAMPLESEED234\n").expect("write");
        let a = NatsArgs {
            nkey: Some(good),
            ..NatsArgs::default()
        };
        let o = a.configure(NatsOptions::new("nats://h")).expect("ok");
        assert_eq!(o.nkey_seed.as_deref(), Some("SUAEXAMPLESEED234"));
        let bad = dir.join("bad");
        std::fs::write(&bad, "not-a-seed-but-a-secret").expect("write");
        let e = NatsArgs {
            nkey: Some(bad),
            ..NatsArgs::default()
        }
        .configure(NatsOptions::new("nats://h"))
        .expect_err("not a seed");
        assert!(e.to_string().contains("NKey user seed"), "{e}");
        assert!(!e.to_string().contains("not-a-seed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flags_parse_and_exclude_one_another() {
        let a = parse(&["--user", "app", "--password", "hunter2"]).expect("parse");
        assert_eq!(a.user.as_deref(), Some("app"));
        let o = a.configure(NatsOptions::new("nats://h")).expect("ok");
        assert_eq!(
            o.user_password,
            Some(("app".to_owned(), "hunter2".to_owned()))
        );
        for bad in [
            &["--user", "app"][..],
            &["--password", "hunter2"],
            &["--token", "t0k", "--user", "a", "--password", "hunter2"],
            &["--creds", "x.creds", "--token", "t0k"],
            &["--tls-key", "k.pem"],
        ] {
            let e = parse(bad)
                .expect("clap leaves the combination to validate")
                .validate()
                .expect_err("refused");
            let shown = format!("{e} {e:?}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("t0k"),
                "{shown}"
            );
        }
    }

    #[test]
    fn debug_and_errors_hide_secrets() {
        let a = NatsArgs {
            user: Some("app".into()),
            password: Some("hunter2".into()),
            token: Some("t0ken".into()),
            ..NatsArgs::default()
        };
        let shown = format!("{a:?}");
        assert!(
            shown.contains("app") && !shown.contains("hunter2") && !shown.contains("t0ken"),
            "{shown}"
        );
        let e = BusError::Unavailable(
            "cannot connect to NATS at nats://app:hunter2@h:4222: refused".into(),
        );
        let m = connect_error("nats://app:hunter2@h:4222", &e);
        assert!(
            !m.contains("hunter2") && m.contains("nats://app:***@h:4222"),
            "{m}"
        );
        let m = connect_error("nats://h:4222", &BusError::Other("timed out".into()));
        assert!(m.starts_with("NATS at nats://h:4222: "), "{m}");
    }

    #[test]
    fn several_seed_urls_pass_through_and_are_redacted() {
        let urls = "nats://app:hunter2@a:4222,nats://b:4223,nats://t0ken@c:4224";
        let a = NatsArgs::default();
        let o = a.configure(NatsOptions::new(urls)).expect("ok");
        assert_eq!(o.servers().len(), 3);
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("t0ken") && shown.contains("b:4223"),
            "{shown}"
        );
        let e = BusError::Unavailable(format!("cannot connect to NATS at {urls}: refused"));
        let m = connect_error(urls, &e);
        assert!(
            !m.contains("hunter2")
                && !m.contains("t0ken")
                && m.contains("nats://app:***@a:4222,nats://b:4223,nats://***@c:4224"),
            "{m}"
        );
    }
}
