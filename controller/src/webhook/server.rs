//! The HTTPS admission server (rustls): `POST /mutate`, `POST /validate` (caches),
//! `POST /validate-pods` and `POST /pin-pods` (the Pod policy), `POST /mutate-pods` (the
//! cache variables), `POST /api/images/verify-and-promote`,
//! `GET /healthz`, `GET /readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span, warn};

use super::Admission;
use crate::promote::{Gatekeeper, PromoteApi};
use crate::verify::ImageVerifier;

/// What the server answers: admission always, promotion when configured with a client.
pub struct Routes<V: ImageVerifier, G: Gatekeeper> {
    pub admission: Admission<V>,
    pub promote: Option<PromoteApi<G>>,
}

/// Promotion bodies are small JSON documents.
const MAX_PROMOTE_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reading TLS material {path}: {reason}")]
    Tls { path: String, reason: String },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Loads a PEM certificate chain and private key into a rustls server configuration.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let err = |p: &Path, reason: String| ServerError::Tls {
        path: p.display().to_string(),
        reason,
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).map_err(|e| err(cert, e.to_string()))?,
    ))
    .collect::<Result<_, _>>()
    .map_err(|e| err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(cert, "no certificate in the file".into()));
    }
    let key_der = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).map_err(|e| err(key, e.to_string()))?,
    ))
    .map_err(|e| err(key, e.to_string()))?
    .ok_or_else(|| err(key, "no private key in the file".into()))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| err(cert, e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves admission on `addr` until `shutdown` completes.
pub async fn serve<V: ImageVerifier, G: Gatekeeper>(
    routes: Arc<Routes<V, G>>,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })?;
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let (acceptor, routes) = (acceptor.clone(), routes.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| handle(routes.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Largest AdmissionReview read. The API server caps a request body at 3 MiB and etcd an
/// object at 1.5 MiB; a review carries the object and its old version, so 16 MiB leaves
/// room while bounding what anyone who reaches the Service can make the controller hold.
pub const MAX_ADMISSION_BODY: usize = 16 << 20;

async fn handle<V: ImageVerifier, G: Gatekeeper>(
    routes: Arc<Routes<V, G>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let admission = &routes.admission;
    let reply = |status: StatusCode, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz" | "/readyz") => Ok(reply(StatusCode::OK, b"ok".to_vec())),
        (
            &Method::POST,
            "/mutate" | "/validate" | "/validate-pods" | "/pin-pods" | "/mutate-pods",
        ) => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_ADMISSION_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    let why = format!("an AdmissionReview of more than {MAX_ADMISSION_BODY} bytes");
                    return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, why.into_bytes()));
                }
                Err(e) => return Ok(reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes())),
            };
            let (status, body) = answer(admission, &path, &body).await;
            Ok(reply(status, body))
        }
        (&Method::POST, crate::promote::PATH) => {
            let Some(api) = &routes.promote else {
                let body = serde_json::json!({"error": "promotion is not served (the controller runs without API server access)", "reason": "not_configured"});
                return Ok(reply(
                    StatusCode::NOT_IMPLEMENTED,
                    body.to_string().into_bytes(),
                ));
            };
            let authorization = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = match http_body_util::Limited::new(req.into_body(), MAX_PROMOTE_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let body = serde_json::json!({"error": format!("reading the body: {e}"), "reason": "bad_request"});
                    return Ok(reply(
                        StatusCode::BAD_REQUEST,
                        body.to_string().into_bytes(),
                    ));
                }
            };
            let (status, body) = api.call(authorization.as_deref(), &body).await;
            Ok(reply(status, body.to_string().into_bytes()))
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, b"not found".to_vec())),
    }
}

/// The answer to an AdmissionReview `body` POSTed to `endpoint` (`/mutate`, `/validate`,
/// `/mutate-pods`; anything else is `/validate-pods`): the HTTP status and the response
/// body. Everything the server does with an admission request's bytes; public so the fuzz
/// target feeds it arbitrary bytes (docs/fuzzing.md).
pub async fn answer<V: ImageVerifier>(
    admission: &Admission<V>,
    endpoint: &str,
    body: &[u8],
) -> (StatusCode, Vec<u8>) {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not an AdmissionReview: {e}").into_bytes(),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            let resp = AdmissionResponse::invalid(format!("not an admission request: {e}"));
            return (
                StatusCode::OK,
                serde_json::to_vec(&resp.into_review()).unwrap_or_default(),
            );
        }
    };
    let span = info_span!(
        "admission",
        endpoint = %endpoint,
        op = ?request.operation,
        kind = %request.kind.kind,
        object = %format!("{}/{}", request.namespace.clone().unwrap_or_default(), request.name),
        user = %request.user_info.username.clone().unwrap_or_default(),
    );
    let started = std::time::Instant::now();
    let decision = async {
        match endpoint {
            "/mutate" => admission.mutate(&request).await,
            "/validate" => admission.validate(&request).await,
            "/mutate-pods" => admission.mutate_pod(&request).await,
            "/pin-pods" => admission.pin_pod(&request).await,
            _ => admission.validate_pod(&request).await,
        }
    }
    .instrument(span)
    .await;
    let outcome = match &decision {
        super::Decision::Allow { .. } => "allowed",
        super::Decision::SetDigest { .. } | super::Decision::Patch { .. } => "mutated",
        super::Decision::Deny(_) => "denied",
    };
    crate::metrics::global().admission(
        endpoint.trim_start_matches('/'),
        outcome,
        started.elapsed().as_secs_f64(),
    );
    let review = decision.into_response(&request).into_review();
    (
        StatusCode::OK,
        serde_json::to_vec(&review).unwrap_or_default(),
    )
}
