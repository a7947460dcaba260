//! Logs and traces for skald's binaries and examples: one call installs the process's
//! `tracing` subscriber. Libraries never install one; a program that has its own
//! subscriber does not need this module.
//!
//! - Logs: `RUST_LOG` filters (default `info`); text for people, or JSON lines with the
//!   fields of every enclosing span (`saga.id`, `saga.type`, `saga.step`, `trace_id`,
//!   ...) on each line.
//! - Traces (cargo feature `otlp`): spans are exported over OTLP/HTTP (protobuf) to a
//!   collector, with the ids skald derives (trace id = saga id; see
//!   [`skald_runtime::trace`]), so runtime and participant spans of one saga form one
//!   trace across processes and restarts.
//!
//! # Examples
//!
//! ```no_run
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use skald::telemetry::{self, LogFormat};
//! let _guard = telemetry::init(LogFormat::Json, None)?;
//! tracing::info!("logging as JSON lines");
//! # Ok(()) }
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, span fields inline (the default).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields`, `target`, `span` (the
    /// current span's fields) and `spans` (every enclosing span's fields).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: expected text or json")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Where and as whom traces are exported (cargo feature `otlp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpOptions {
    /// The collector's OTLP/HTTP endpoint, `http://` only (e.g. a collector or agent
    /// at `http://127.0.0.1:4318`). Without a path, `/v1/traces` is appended.
    pub endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// How long one export may take. Default: 10 s.
    pub timeout: Duration,
}

impl OtlpOptions {
    /// Export to `endpoint` as `service_name`, with the default timeout.
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        OtlpOptions {
            endpoint: endpoint.into(),
            service_name: service_name.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The traces URL: the endpoint, with `/v1/traces` when it has no path.
    pub fn traces_url(&self) -> String {
        let e = self.endpoint.trim_end_matches('/');
        let after_scheme = e.split_once("://").map_or(e, |(_, rest)| rest);
        if after_scheme.contains('/') {
            e.to_owned()
        } else {
            format!("{e}/v1/traces")
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A global subscriber is already installed, or the filter is invalid.
    #[error("cannot install the tracing subscriber: {0}")]
    Subscriber(String),
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Otlp(String),
    /// OTLP export was asked for, but this build lacks the `otlp` feature.
    #[error("OTLP export needs skald built with the `otlp` cargo feature")]
    OtlpDisabled,
}

/// Keeps the exporter alive; dropping it flushes the spans not yet exported.
#[must_use = "dropping the guard shuts trace export down"]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard").finish_non_exhaustive()
    }
}

impl TelemetryGuard {
    /// Exports the spans ended so far now (blocks until done or timed out).
    pub fn flush(&self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "flushing trace export failed");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs the process's subscriber: logs on stderr in `format`, filtered by
/// `RUST_LOG` (default `info`), and, when `otlp` is given (cargo feature `otlp`), trace
/// export. Call once, early in `main`; keep the guard until the end.
pub fn init(
    format: LogFormat,
    otlp: Option<OtlpOptions>,
) -> Result<TelemetryGuard, TelemetryError> {
    init_with_filter("info", format, otlp)
}

/// [`init`], with `default_filter` (an `EnvFilter` directive such as `warn` or
/// `skald=debug`) used when `RUST_LOG` is unset.
pub fn init_with_filter(
    default_filter: &str,
    format: LogFormat,
    otlp: Option<OtlpOptions>,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otlp")]
    {
        let (layer, provider) = match otlp {
            Some(o) => {
                let (layer, provider) = otlp::layer(&o)?;
                (Some(layer), Some(provider))
            }
            None => (None, None),
        };
        registry
            .with(layer)
            .try_init()
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
        Ok(TelemetryGuard { provider })
    }
    #[cfg(not(feature = "otlp"))]
    {
        if otlp.is_some() {
            return Err(TelemetryError::OtlpDisabled);
        }
        registry
            .try_init()
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
        Ok(TelemetryGuard {})
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    //! The OTLP/HTTP exporter, skald's span ids, and a small blocking HTTP client.

    use std::cell::Cell;
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::time::Duration;

    use bytes::Bytes;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    };
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
    use skald_runtime::trace::{SpanLinker, TraceContext};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::registry::LookupSpan;

    use super::{OtlpOptions, TelemetryError};

    pub(super) type OtelLayer<S> =
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>;

    /// The exporting layer and its provider (kept by the guard, to flush on drop).
    pub(super) fn layer<S>(
        o: &OtlpOptions,
    ) -> Result<(OtelLayer<S>, SdkTracerProvider), TelemetryError>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let url = o.traces_url();
        if !url.starts_with("http://") {
            return Err(TelemetryError::Otlp(format!(
                "endpoint {url}: only http:// is supported (put a collector or agent in front \
                 of a TLS endpoint)"
            )));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(BlockingHttp { timeout: o.timeout })
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(o.timeout)
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(SkaldIds::default())
            .with_resource(
                Resource::builder()
                    .with_service_name(o.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("skald");
        // One linker per process; a second init (tests) keeps the first, which works
        // for any provider (it only talks to the span's own layer).
        let _ = skald_runtime::trace::set_span_linker(Box::new(OtelLinker));
        Ok((tracing_opentelemetry::layer().with_tracer(tracer), provider))
    }

    thread_local! {
        /// The ids the next span built on this thread gets (set by [`OtelLinker`]).
        static NEXT_IDS: Cell<Option<(u128, u64)>> = const { Cell::new(None) };
    }

    /// Random ids, except for the span [`OtelLinker`] is building right now.
    #[derive(Debug, Default)]
    struct SkaldIds(RandomIdGenerator);

    impl IdGenerator for SkaldIds {
        fn new_trace_id(&self) -> TraceId {
            match NEXT_IDS.with(Cell::get) {
                Some((trace, _)) => TraceId::from(trace),
                None => self.0.new_trace_id(),
            }
        }

        fn new_span_id(&self) -> SpanId {
            match NEXT_IDS.with(Cell::get) {
                Some((_, span)) => SpanId::from(span),
                None => self.0.new_span_id(),
            }
        }
    }

    /// Gives a skald span its derived ids and its (possibly remote) parent: sets the
    /// parent, then has the layer build the span at once, on this thread, while the id
    /// generator hands out the ids asked for.
    struct OtelLinker;

    impl SpanLinker for OtelLinker {
        fn link(&self, span: &tracing::Span, own: &TraceContext, parent: Option<&TraceContext>) {
            let cx = match parent {
                Some(p) => {
                    opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                        TraceId::from(p.trace_id),
                        SpanId::from(p.span_id),
                        if p.sampled {
                            TraceFlags::SAMPLED
                        } else {
                            TraceFlags::default()
                        },
                        true,
                        TraceState::default(),
                    ))
                }
                // A root: no parent, whatever span encloses this one.
                None => opentelemetry::Context::new(),
            };
            if span.set_parent(cx).is_err() {
                return; // no OpenTelemetry layer, or the span was already built
            }
            NEXT_IDS.with(|c| c.set(Some((own.trace_id, own.span_id))));
            let _ = span.context();
            NEXT_IDS.with(|c| c.set(None));
        }
    }

    /// OTLP/HTTP over a plain TCP connection, one request per connection. The SDK's
    /// batch processor exports from a thread of its own, blocking, so a blocking client
    /// costs nothing and needs no async runtime, TLS stack or HTTP crate.
    #[derive(Debug)]
    struct BlockingHttp {
        timeout: Duration,
    }

    type HttpResult = Result<http::Response<Bytes>, opentelemetry_http::HttpError>;

    #[async_trait::async_trait]
    impl opentelemetry_http::HttpClient for BlockingHttp {
        async fn send_bytes(&self, request: http::Request<Bytes>) -> HttpResult {
            post(&request, self.timeout)
        }
    }

    fn post(request: &http::Request<Bytes>, timeout: Duration) -> HttpResult {
        let uri = request.uri();
        if uri.scheme_str() != Some("http") {
            return Err(format!("{uri}: only http:// is supported").into());
        }
        let host = uri.host().ok_or_else(|| format!("{uri}: no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = (host, port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!(
            "{} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
            request.method(),
            request.body().len()
        );
        for (name, value) in request.headers() {
            if name == http::header::CONTENT_LENGTH || name == http::header::CONNECTION {
                continue;
            }
            head.push_str(name.as_str());
            head.push_str(": ");
            head.push_str(value.to_str().unwrap_or_default());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(request.body())?;
        stream.flush()?;
        let mut raw = Vec::new();
        stream.take(4 * 1024 * 1024).read_to_end(&mut raw)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("response without a header end")?;
        let head = String::from_utf8_lossy(&raw[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let body = Bytes::copy_from_slice(&raw[split + 4..]);
        Ok(http::Response::builder().status(status).body(body)?)
    }
}
