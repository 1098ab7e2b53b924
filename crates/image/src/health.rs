//! The plain-HTTP endpoints of GKM's long-running programs: `/healthz` (the process
//! serves), `/readyz` (what "ready" means is the program's: for the agent, the cache watch
//! has synced and the CSI plugin is ready) and `/metrics` (Prometheus text, from the
//! program's own registry).

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Answers `Err(reason)` while the program is not ready.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Renders the program's metrics in the Prometheus text format.
pub type Encoder = fn() -> String;

/// Binds `addr` (so a taken port fails the start) and returns the serving future.
pub async fn bind(
    addr: SocketAddr,
    ready: Readiness,
    metrics: Encoder,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(async move {
        loop {
            let (conn, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "health endpoint: accept");
                    continue;
                }
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let ready = ready.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &ready, metrics)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), svc)
                    .await
                {
                    debug!(error = %e, "health endpoint connection");
                }
            });
        }
    })
}

fn answer(req: &Request<Incoming>, ready: &Readiness, metrics: Encoder) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match ready() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("a static response is valid")
}
