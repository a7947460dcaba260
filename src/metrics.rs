//! The Prometheus endpoint: [`serve`] installs a Prometheus recorder as the process's
//! [`metrics`](::metrics) recorder and answers `GET /metrics` on a plain HTTP/1.1
//! listener (no web framework: one request per connection, then close).
//!
//! What the runtime records is listed in [`skald_runtime::metrics`] and in
//! docs/observability.md. Install the recorder before starting the runtime: the
//! runtime registers its metric handles when it starts.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info};

pub use skald_runtime::metrics::*;

/// Why the endpoint could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The process already has a `metrics` recorder (one per process).
    #[error("a metrics recorder is already installed in this process")]
    RecorderInstalled,
    /// The exporter refused its configuration.
    #[error("metrics exporter: {0}")]
    Exporter(String),
}

/// The running endpoint; dropping it stops serving (the recorder stays installed).
#[derive(Debug)]
pub struct MetricsHandle {
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    task: JoinHandle<()>,
}

impl MetricsHandle {
    /// The address the endpoint listens on (the port chosen when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current metrics in the Prometheus text format, as `GET /metrics` answers.
    pub fn render(&self) -> String {
        self.prometheus.run_upkeep();
        self.prometheus.render()
    }
}

impl Drop for MetricsHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr` (`127.0.0.1:0`
/// picks a free port: see [`MetricsHandle::local_addr`]). Must run inside a tokio
/// runtime. Fails if the process already has a recorder.
///
/// # Examples
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let metrics = skald::metrics::serve("127.0.0.1:9464".parse()?).await?;
/// println!("metrics on http://{}/metrics", metrics.local_addr());
/// // ... then start the runtime.
/// # Ok(()) }
/// ```
pub async fn serve(addr: SocketAddr) -> Result<MetricsHandle, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let exporter = |e: metrics_exporter_prometheus::BuildError| match e {
        metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder(_) => {
            MetricsError::RecorderInstalled
        }
        other => MetricsError::Exporter(other.to_string()),
    };
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            skald_runtime::metrics::buckets::SECONDS,
        )
        .map_err(exporter)?
        .set_buckets_for_metric(
            Matcher::Full(COMMIT_BATCH_SIZE.into()),
            skald_runtime::metrics::buckets::BATCH,
        )
        .map_err(exporter)?
        .install_recorder()
        .map_err(exporter)?;
    describe();
    info!(addr = %local, "metrics endpoint listening");
    let handle = prometheus.clone();
    let task = tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let handle = handle.clone();
                        tokio::spawn(async move {
                            if let Err(e) = respond(stream, &handle).await {
                                debug!(%peer, error = %e, "metrics request failed");
                            }
                        });
                    }
                    Err(e) => {
                        debug!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = upkeep.tick() => handle.run_upkeep(),
            }
        }
    });
    Ok(MetricsHandle {
        addr: local,
        prometheus,
        task,
    })
}

/// The longest request head read (a scraper sends a few hundred bytes).
const MAX_HEAD: usize = 8 * 1024;

/// Reads one request head and answers it: `GET /metrics` (or `HEAD`) with the metrics,
/// anything else with 404 (other paths) or 405 (other methods).
async fn respond(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            handle.run_upkeep();
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}
