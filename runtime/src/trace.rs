//! Trace context: W3C `traceparent` values and the ids of skald's spans.
//!
//! A saga is one trace, and its trace id is the saga's UUID, so the trace survives
//! restarts and passivation: every process that touches the saga, at any time, derives
//! the same ids. Span ids that cross a process boundary are derived too (FNV-1a of a
//! key, see [`span_id_of`]):
//!
//! - the saga's root span: `saga:<saga id>`;
//! - a step attempt: its command's message id (the parent-id of the command's
//!   `traceparent`);
//! - a participant's handling of a command: its reply's message id (the parent-id of
//!   the reply's `traceparent`, set by [`crate::participant`]).
//!
//! The runtime records these ids on its spans as the fields `trace_id`, `span_id` and
//! `parent_span_id`, so they appear in logs with no exporter. An exporter (the facade's
//! `otlp` feature) installs a [`SpanLinker`] with [`set_span_linker`] to give the spans
//! it exports exactly these ids and parents.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use tracing::field::Empty;

use crate::ids::{SagaId, SagaType};
use crate::ports::Message;
use crate::wire::{H_MSG_ID, H_TRACEPARENT, Reply};

/// A W3C trace context: trace id, parent (span) id, and the sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace id (never zero).
    pub trace_id: u128,
    /// The span id (never zero).
    pub span_id: u64,
    /// The `sampled` flag (bit 0 of trace-flags).
    pub sampled: bool,
}

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {value:?}: {reason}")]
pub struct TraceparentError {
    /// The value (at most 64 characters of it).
    pub value: String,
    /// Why.
    pub reason: &'static str,
}

impl TraceContext {
    /// The root context of a saga: trace id = the saga's UUID, span id = its root span's.
    pub fn for_saga(saga_id: &SagaId) -> TraceContext {
        TraceContext {
            trace_id: saga_id.as_uuid().as_u128().max(1),
            span_id: span_id_of_parts(&["saga:", &saga_id.to_string()]),
            sampled: true,
        }
    }

    /// A span of the same trace with the given span id.
    pub fn child(&self, span_id: u64) -> TraceContext {
        TraceContext {
            span_id: span_id.max(1),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// Parses a `traceparent` header: `version-traceid-parentid-flags`. Version `00`
    /// must have exactly four fields; a later version may append fields (W3C: parse the
    /// first four); `ff` is invalid. Ids must be lowercase hex and not all zero.
    pub fn parse(value: &str) -> Result<TraceContext, TraceparentError> {
        let err = |reason| TraceparentError {
            value: value.chars().take(64).collect(),
            reason,
        };
        let value = value.trim();
        let mut parts = value.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("expected version-traceid-parentid-flags"));
        };
        if version.len() != 2 || !is_lower_hex(version) {
            return Err(err("version must be 2 lowercase hex digits"));
        }
        if version == "ff" {
            return Err(err("version ff is invalid"));
        }
        if version == "00" && parts.next().is_some() {
            return Err(err("version 00 has exactly four fields"));
        }
        if trace.len() != 32 || !is_lower_hex(trace) {
            return Err(err("trace-id must be 32 lowercase hex digits"));
        }
        if span.len() != 16 || !is_lower_hex(span) {
            return Err(err("parent-id must be 16 lowercase hex digits"));
        }
        if flags.len() != 2 || !is_lower_hex(flags) {
            return Err(err("trace-flags must be 2 lowercase hex digits"));
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| err("trace-id"))?;
        let span_id = u64::from_str_radix(span, 16).map_err(|_| err("parent-id"))?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| err("trace-flags"))?;
        if trace_id == 0 {
            return Err(err("trace-id is all zeros"));
        }
        if span_id == 0 {
            return Err(err("parent-id is all zeros"));
        }
        Ok(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl fmt::Display for TraceContext {
    /// The `traceparent` header value (version `00`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

impl FromStr for TraceContext {
    type Err = TraceparentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceContext::parse(s)
    }
}

/// A stable, non-zero 64-bit span id for `key` (FNV-1a).
pub fn span_id_of(key: &str) -> u64 {
    span_id_of_parts(&[key])
}

/// [`span_id_of`] of the concatenation of `parts`, without building it.
pub fn span_id_of_parts(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.max(1)
}

/// Gives exported spans skald's ids. Installed once per process by an exporter (the
/// facade's `otlp` feature); without one, the ids live only in the span fields.
pub trait SpanLinker: Send + Sync + 'static {
    /// Makes `span` export with `own`'s trace and span id, as a child of `parent` (a span
    /// possibly in another process), or as the trace's root when `parent` is `None`.
    /// Called right after the span is created, before it is entered.
    fn link(&self, span: &tracing::Span, own: &TraceContext, parent: Option<&TraceContext>);
}

static LINKER: OnceLock<Box<dyn SpanLinker>> = OnceLock::new();

/// Installs the process's [`SpanLinker`]. Fails (giving it back) if one is installed.
pub fn set_span_linker(linker: Box<dyn SpanLinker>) -> Result<(), Box<dyn SpanLinker>> {
    LINKER.set(linker)
}

/// Records `own` and `parent` on `span` (fields `trace_id`, `span_id`,
/// `parent_span_id`, which the span must declare) and hands them to the linker.
pub(crate) fn annotate(span: &tracing::Span, own: &TraceContext, parent: Option<&TraceContext>) {
    if span.is_disabled() {
        return;
    }
    span.record("trace_id", tracing::field::display(own.trace_id_hex()));
    span.record("span_id", tracing::field::display(own.span_id_hex()));
    if let Some(p) = parent {
        span.record("parent_span_id", tracing::field::display(p.span_id_hex()));
    }
    if let Some(linker) = LINKER.get() {
        linker.link(span, own, parent);
    }
}

/// The saga's root span, opened by the start: id `saga:<saga id>`, no parent.
pub(crate) fn saga_span(id: &SagaId, saga_type: &SagaType) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "saga",
        saga.id = %id,
        saga.r#type = %saga_type,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
    );
    annotate(&span, &TraceContext::for_saga(id), None);
    span
}

/// The span applying a reply: a child of the span named by the reply's `traceparent`
/// (the participant's, or the step's when the participant echoed it). A reply with no
/// valid `traceparent` hangs under the step span its attempt's command had, and the
/// span says why in `traceparent.error`.
pub(crate) fn reply_span(reply: &Reply, message: &Message) -> tracing::Span {
    let span = tracing::info_span!(
        "reply",
        saga.id = %reply.saga_id,
        saga.r#type = %reply.saga_type,
        saga.step = %reply.step,
        step.kind = %reply.kind,
        step.attempt = reply.attempt,
        outcome = reply.outcome.as_str(),
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
        traceparent.error = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let root = TraceContext::for_saga(&reply.saga_id);
    let parent = match message.headers.get(H_TRACEPARENT).map(TraceContext::parse) {
        Some(Ok(cx)) if cx.trace_id == root.trace_id => cx,
        other => {
            let why = match other {
                Some(Ok(_)) => "another trace".to_owned(),
                Some(Err(e)) => e.to_string(),
                None => "missing".to_owned(),
            };
            span.record("traceparent.error", why);
            // The attempt's step span: the command's message id, as the machine forms it.
            root.child(span_id_of(&crate::ids::command_message_id(
                &reply.saga_id,
                &reply.step,
                reply.kind,
                reply.attempt,
            )))
        }
    };
    let key = message.headers.get(H_MSG_ID).unwrap_or_default();
    let own = parent.child(span_id_of_parts(&["apply:", key]));
    annotate(&span, &own, Some(&parent));
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        let saga = SagaId::new();
        let root = TraceContext::for_saga(&saga);
        assert_eq!(root.trace_id_hex(), saga.as_uuid().simple().to_string());
        let text = root.to_string();
        assert_eq!(text.len(), 55);
        assert!(text.starts_with("00-") && text.ends_with("-01"), "{text}");
        assert_eq!(TraceContext::parse(&text), Ok(root));
        let unsampled = TraceContext {
            sampled: false,
            ..root
        };
        assert!(unsampled.to_string().ends_with("-00"));
        assert_eq!(unsampled.to_string().parse(), Ok(unsampled));
    }

    #[test]
    fn accepts_the_w3c_example_and_later_versions() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContext::parse(tp).expect("valid");
        assert_eq!(cx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(cx.span_id, 0x00f067aa0ba902b7);
        assert!(cx.sampled);
        assert_eq!(cx.to_string(), tp);
        // A future version may carry more fields: the first four are read.
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-ever";
        assert_eq!(
            TraceContext::parse(future).expect("future").span_id,
            cx.span_id
        );
    }

    #[test]
    fn rejects_malformed_values() {
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        let s = "00f067aa0ba902b7";
        for bad in [
            String::new(),
            "garbage".to_owned(),
            format!("00-{t}-{s}"),
            format!("00-{t}-{s}-01-extra"),
            format!("ff-{t}-{s}-01"),
            format!("0-{t}-{s}-01"),
            format!("00-{}-{s}-01", t.to_uppercase()),
            format!("00-{}-{s}-01", &t[1..]),
            format!("00-{t}-{}-01", &s[1..]),
            format!("00-{t}-{s}-1"),
            format!("00-{t}-{s}-zz"),
            format!("00-{}-{s}-01", "0".repeat(32)),
            format!("00-{t}-{}-01", "0".repeat(16)),
            format!("00-{}x-{s}-01", &t[1..]),
        ] {
            assert!(TraceContext::parse(&bad).is_err(), "accepted {bad:?}");
        }
        let err =
            TraceContext::parse(&format!("00-{t}-{}-01", "0".repeat(16))).expect_err("zero span");
        assert!(err.to_string().contains("all zeros"), "{err}");
    }

    #[test]
    fn span_ids_are_stable_and_never_zero() {
        assert_eq!(span_id_of("a:b"), span_id_of_parts(&["a:", "b"]));
        assert_ne!(span_id_of("a"), span_id_of("b"));
        assert_ne!(span_id_of(""), 0);
        let cx = TraceContext::for_saga(&SagaId::new());
        assert_eq!(cx.child(0).span_id, 1);
    }
}
