//! The sidecar's HTTP endpoints (`--http-addr`), for Kubernetes probes and Prometheus:
//!
//! - `GET /healthz`: 200 while the process runs (a liveness probe).
//! - `GET /readyz`: 200 once the mount answers a `stat` of its root, 503 before (the store is
//!   still being checked, the kernel mount is not made yet), when the stat does not answer
//!   within [`PROBE_TIMEOUT`], while the store does not answer (an outage: known metadata is
//!   still served, reads of what is not cached fail with EIO), and from the moment shutdown
//!   starts. A startup probe on it holds
//!   the application container back until its files are there.
//! - `GET /metrics`: every metric in the Prometheus text format (see [`crate::metrics`]).
//!
//! HTTP/1.1 through `hyper`; anything else is 404 (or 405 for methods other than GET/HEAD).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::fs::Fs;

/// How long `/readyz` waits for the stat of the mount root. Kubernetes probes time out after 1 s
/// by default; answering "not ready" a little before that says more than a probe timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// A client that sends no complete request headers within this is disconnected.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoints report on, shared with the mount's lifecycle.
pub struct Health {
    mountpoint: PathBuf,
    /// Set once the mount answers (and its readahead is set); cleared when shutdown starts.
    mounted: AtomicBool,
    /// A stat of the root is running: a hung mount must not pile up one blocked thread per probe.
    probing: AtomicBool,
    /// The filesystem, once built, for the gauges refreshed at each scrape.
    fs: OnceLock<Arc<Fs>>,
}

impl Health {
    pub fn new(mountpoint: PathBuf) -> Arc<Health> {
        Arc::new(Health {
            mountpoint,
            mounted: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            fs: OnceLock::new(),
        })
    }

    /// The mount answers (`true`) or is going away (`false`).
    pub fn set_mounted(&self, mounted: bool) {
        self.mounted.store(mounted, Ordering::Relaxed);
    }

    /// The filesystem whose gauges `/metrics` refreshes.
    pub fn set_fs(&self, fs: Arc<Fs>) {
        let _ = self.fs.set(fs);
    }

    /// Ready: mounted, and a stat of the mount root answered by the mount in time.
    async fn ready(self: &Arc<Self>) -> Result<(), String> {
        if !self.mounted.load(Ordering::Relaxed) {
            return Err("not mounted".into());
        }
        if let Some(fs) = self.fs.get()
            && let Some(since) = fs.store_unreachable_since()
            && !fs.probe_store(PROBE_TIMEOUT / 2).await
        {
            return Err(format!(
                "the store has not answered for {}s",
                since.elapsed().as_secs()
            ));
        }
        if self.probing.swap(true, Ordering::Relaxed) {
            return Err("an earlier stat of the mount root has not answered yet".into());
        }
        let me = self.clone();
        let stat = tokio::task::spawn_blocking(move || {
            let result = std::fs::metadata(&me.mountpoint);
            me.probing.store(false, Ordering::Relaxed);
            result
        });
        match tokio::time::timeout(PROBE_TIMEOUT, stat).await {
            Err(_) => Err(format!(
                "a stat of the mount root did not answer within {PROBE_TIMEOUT:?}"
            )),
            Ok(Err(e)) => Err(format!("the stat of the mount root failed: {e}")),
            Ok(Ok(Err(e))) => Err(format!("stat of the mount root: {e}")),
            // A stat of the mount's root answers the root inode; the directory underneath has another.
            Ok(Ok(Ok(m))) if m.ino() != crate::fs::ROOT_INO => Err("not mounted".into()),
            Ok(Ok(Ok(_))) => Ok(()),
        }
    }
}

/// Listens on `addr` (before anything else starts, so a wrong address fails at once).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the endpoints on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, health.clone()));
            let mut conn = http1::Builder::new();
            conn.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = conn.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    health: Arc<Health>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match health.ready().await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => {
            if let Some(fs) = health.fs.get().cloned() {
                let _ = tokio::task::spawn_blocking(move || fs.publish_gauges()).await;
            }
            let mut r = text(StatusCode::OK, crate::metrics::render());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz or /metrics\n".into(),
        ),
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
