//! # skald-adapters
//!
//! Implementations of skald's ports, one module and one cargo feature per technology:
//!
//! - `memory`: [`memory::MemoryBus`] (in-process bus, NATS subject semantics) and
//!   [`memory::MemoryStore`] (for tests and throwaway runs);
//! - `sqlite`: [`sqlite::SqliteStore`], the embedded default (a file, WAL mode);
//! - `postgres`: [`postgres::PostgresStore`], the production store (several skald
//!   processes may share it);
//! - `nats`: [`nats::NatsBus`], NATS JetStream, the production transport;
//! - `sqlite` / `postgres`: [`fence::SqliteFence`] and [`fence::PgFence`], the durable
//!   TCC fences of participant services (`skald_runtime::participant::fence`).
//!
//! Adapters convert their foreign errors into the port's error at the boundary.

#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod fence;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// When an outbox row was written: its UUID v7 carries the time.
#[cfg(any(feature = "memory", feature = "sqlite", feature = "postgres"))]
pub(crate) fn created_at(id: uuid::Uuid) -> skald_runtime::machine::Timestamp {
    id.get_timestamp()
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            skald_runtime::machine::Timestamp(
                secs.saturating_mul(1000) + u64::from(nanos / 1_000_000),
            )
        })
        .unwrap_or_default()
}

/// `url` with its secrets masked, for messages and logs: the password in the user info
/// or a `password=` parameter, and a NATS token (`nats://TOKEN@host`, user info without
/// a colon). A comma-separated list of URLs (NATS seed servers) is redacted URL by URL.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_one).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    let mut out = url.to_owned();
    // Without a scheme (`user:pass@host:4222`, which the NATS client accepts), the user
    // info starts the string, and user info without a colon is taken for a token.
    let start = out.find("://").map(|i| i + 3).or(Some(0));
    if let Some(start) = start {
        let scheme = if start == 0 {
            "nats".to_owned()
        } else {
            out[..start - 3].to_ascii_lowercase()
        };
        let end = out[start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| start + i);
        if let Some(at) = out[start..end].rfind('@').map(|i| start + i) {
            match out[start..at].find(':').map(|i| start + i) {
                Some(colon) => out.replace_range(colon + 1..at, "***"),
                // A NATS URL's user info without a password is a token.
                None if matches!(scheme.as_str(), "nats" | "tls" | "ws" | "wss") => {
                    out.replace_range(start..at, "***")
                }
                None => {}
            }
        }
    }
    if let Some(query) = out.find('?') {
        let (head, params) = out.split_at(query + 1);
        let params: Vec<String> = params
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out = format!("{head}{}", params.join("&"));
    }
    out
}

/// Whether `subject` matches the NATS `pattern` (`*` one token, `>` one or more tokens
/// at the end).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn passwords_are_redacted() {
        use super::redact_url;
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/skald"),
            "postgres://app:***@db:5432/skald"
        );
        assert_eq!(
            redact_url("postgres://app@db/skald"),
            "postgres://app@db/skald"
        );
        assert_eq!(
            redact_url("postgres://db/skald?user=app&password=s3cret"),
            "postgres://db/skald?user=app&password=***"
        );
        assert_eq!(redact_url("nats://t0ken@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact_url("nats://a:p1@h1:4222,nats://b:p2@h2:4222"),
            "nats://a:***@h1:4222,nats://b:***@h2:4222"
        );
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("u:p4ss@h:4222"), "u:***@h:4222");
        assert_eq!(redact_url("t0ken@h:4222"), "***@h:4222");
        assert_eq!(redact_url("h:4222"), "h:4222");
    }

    #[test]
    fn nats_wildcards() {
        assert!(subject_matches("skald.reply.>", "skald.reply.checkout"));
        assert!(subject_matches(
            "skald.cmd.*.charge",
            "skald.cmd.payment.charge"
        ));
        assert!(!subject_matches("skald.reply.>", "skald.reply"));
        assert!(!subject_matches("skald.cmd.*", "skald.cmd.a.b"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }
}
