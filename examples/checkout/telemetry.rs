//! The observability flags the runner and the participant share: metrics endpoint, log
//! format and (with the `otlp` feature) trace export; see docs/observability.md.

use anyhow::Context as _;
use clap::Args;
use skald::telemetry::{LogFormat, TelemetryGuard};

#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Off by
    /// default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Log lines on stderr as `text` or `json` (JSON lines carry the fields of every
    /// enclosing span: saga.id, saga.type, saga.step, trace_id, ...). RUST_LOG filters.
    #[arg(long, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// Export traces over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318).
    /// Only in builds with the `otlp` feature.
    #[cfg(feature = "otlp")]
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    /// Installs the subscriber (logs filtered by RUST_LOG, else `default_filter`; traces
    /// exported as `service` when an endpoint is given). Keep the guard until the end.
    pub fn init_logs(
        &self,
        default_filter: &str,
        service: &str,
    ) -> Result<TelemetryGuard, skald::telemetry::TelemetryError> {
        #[cfg(feature = "otlp")]
        let otlp = self
            .otlp_endpoint
            .as_deref()
            .map(|e| skald::telemetry::OtlpOptions::new(e, service));
        #[cfg(not(feature = "otlp"))]
        let otlp = {
            let _ = service;
            None
        };
        skald::telemetry::init_with_filter(default_filter, self.log_format, otlp)
    }

    /// Serves `/metrics` when `--metrics-addr` is given: before a runtime starts, since
    /// it registers its metrics with the recorder it finds.
    pub async fn serve_metrics(&self) -> anyhow::Result<Option<skald::metrics::MetricsHandle>> {
        match self.metrics_addr {
            Some(addr) => Ok(Some(
                skald::metrics::serve(addr)
                    .await
                    .with_context(|| format!("serving metrics on {addr}"))?,
            )),
            None => Ok(None),
        }
    }
}
