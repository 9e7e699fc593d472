//! The operator's HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`
//! and `/readyz` for the kubelet's probes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// What the probes report. Live means the process still makes progress. Ready means a
/// sole replica's controllers have listed what they watch; a standby replica waiting for
/// the lease is ready as it starts, since the Service only carries metrics and a
/// not-ready standby would only block rollouts.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    failed: AtomicBool,
}

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The controller loop ended unexpectedly: liveness fails so the kubelet restarts us.
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

/// Counts of builds by phase, computed when scraped.
pub type BuildCounts = Arc<dyn Fn() -> Vec<(&'static str, i64)> + Send + Sync>;

/// Binds `addr` and serves until the process ends; returns the bound address
/// (useful with port 0).
pub async fn start(
    addr: &str,
    health: Arc<Health>,
    builds: BuildCounts,
) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })?;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let health = health.clone();
            let builds = builds.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let health = health.clone();
                    let builds = builds.clone();
                    async move { Ok::<_, Infallible>(route(&req, &health, &builds)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection");
                }
            });
        }
    });
    Ok(local)
}

fn route(req: &Request<Incoming>, health: &Health, builds: &BuildCounts) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let m = metrics::get();
            m.set_builds(&builds());
            match m.encode() {
                Ok(text) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding metrics failed\n".into(),
                ),
            }
        }
        "/healthz" | "/livez" => {
            if health.failed.load(Ordering::Relaxed) {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "controller stopped\n".into(),
                )
            } else {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            }
        }
        "/readyz" => {
            if health.ready.load(Ordering::Relaxed) && !health.failed.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting\n".into(),
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}
