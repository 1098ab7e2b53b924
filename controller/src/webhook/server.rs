//! The HTTPS admission server (rustls): `POST /mutate`, `POST /validate` (caches),
//! `POST /validate-pods` and `POST /pin-pods` (the Pod policy), `POST /mutate-pods` (the
//! cache variables), `POST /api/images/verify-and-promote`,
//! `GET /healthz`, `GET /readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
    /// Pull credentials for node agents (needs API access).
    pub node_credentials: Option<crate::node_credentials::NodeCredentials>,
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

/// What a client of the server may hold, and for how long: anyone who reaches the Service
/// (admission, promotion and pull credentials share it) must not be able to pin its
/// connections or memory by being slow.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time to finish the TLS handshake.
    pub handshake: Duration,
    /// Time to send a request's headers (HTTP/1.1; hyper's `header_read_timeout`).
    pub headers: Duration,
    /// Time to send a request's body.
    pub body: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub connections: usize,
}

impl Default for Limits {
    /// 10 s for the handshake and the headers, 30 s for a body (the API server's longest
    /// webhook timeout), 1,024 connections.
    fn default() -> Self {
        Limits {
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(10),
            body: Duration::from_secs(30),
            connections: 1024,
        }
    }
}

/// Serves admission on `addr` until `shutdown` completes, within [`Limits::default`].
pub async fn serve<V: ImageVerifier, G: Gatekeeper>(
    routes: Arc<Routes<V, G>>,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    serve_within(routes, addr, tls, Limits::default(), shutdown).await
}

/// [`serve`] within `limits`.
pub async fn serve_within<V: ImageVerifier, G: Gatekeeper>(
    routes: Arc<Routes<V, G>>,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })?;
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let (permit, (tcp, peer)) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = async {
                let permit = slots.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => match accepted {
                (Ok(permit), Ok(a)) => (permit, a),
                (_, Err(e)) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
                // The semaphore is never closed.
                (Err(_), _) => return Ok(()),
            },
        };
        let (acceptor, routes) = (acceptor.clone(), routes.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake not finished in time");
                    return;
                }
            };
            let service =
                hyper::service::service_fn(move |req| handle(routes.clone(), limits.body, req));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.headers);
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

/// Largest AdmissionReview read. The API server caps a request body at 3 MiB and etcd an
/// object at 1.5 MiB; a review carries the object and its old version, so 16 MiB leaves
/// room while bounding what anyone who reaches the Service can make the controller hold.
pub const MAX_ADMISSION_BODY: usize = 16 << 20;

/// The admission endpoints, each one webhook of `deploy/controller/webhooks.yaml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/mutate`: pins a cache's digest.
    Mutate,
    /// `/validate`: guards the cache's digest annotation.
    Validate,
    /// `/mutate-pods`: the cache variables of containers that mount a cache.
    MutatePods,
    /// `/pin-pods`: resolves and pins Pod images under `podPolicy`.
    PinPods,
    /// `/validate-pods`: the Pod policy's final check.
    ValidatePods,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Mutate,
        Endpoint::Validate,
        Endpoint::MutatePods,
        Endpoint::PinPods,
        Endpoint::ValidatePods,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Mutate => "/mutate",
            Endpoint::Validate => "/validate",
            Endpoint::MutatePods => "/mutate-pods",
            Endpoint::PinPods => "/pin-pods",
            Endpoint::ValidatePods => "/validate-pods",
        }
    }

    pub fn from_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`, `GET /readyz`.
    Health,
    /// `POST` to an admission endpoint.
    Admission(Endpoint),
    /// `POST /api/images/verify-and-promote`.
    Promote,
    /// `POST /pull-credentials`.
    PullCredentials,
}

impl Route {
    /// The route of `method` and `path`; `None` for anything else (404).
    pub fn of(method: &Method, path: &str) -> Option<Route> {
        match (method, path) {
            (&Method::GET, "/healthz" | "/readyz") => Some(Route::Health),
            (&Method::POST, crate::promote::PATH) => Some(Route::Promote),
            (&Method::POST, crate::node_credentials::PATH) => Some(Route::PullCredentials),
            (&Method::POST, p) => Endpoint::from_path(p).map(Route::Admission),
            _ => None,
        }
    }
}

/// Why a request got no AdmissionReview or promotion answer. [`HttpError::status`] is the
/// one mapping to HTTP of everything the server refuses itself; the promotion API's own
/// refusals map through [`crate::promote::ApiError::status`].
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not found")]
    NotFound,
    #[error("a request body of more than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the body: {0}")]
    BadBody(String),
    #[error("the body was not sent within {0:?}")]
    SlowBody(Duration),
    #[error("not an AdmissionReview: {0}")]
    NotAReview(String),
    #[error("the answer could not be serialised: {0}")]
    Serialise(String),
}

impl HttpError {
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::BadBody(_) | HttpError::NotAReview(_) => StatusCode::BAD_REQUEST,
            HttpError::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            HttpError::Serialise(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A reply with JSON `body`; a value that cannot be serialised is a 500, never a 200 with
/// an empty body.
fn json_reply(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(bytes) => reply(status, "application/json", bytes),
        Err(e) => error_reply(&HttpError::Serialise(e.to_string())),
    }
}

fn error_reply(e: &HttpError) -> Response<Full<Bytes>> {
    reply(
        e.status(),
        "text/plain; charset=utf-8",
        e.to_string().into_bytes(),
    )
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// The body of `req`, at most `limit` bytes, sent within `within`.
async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    within: Duration,
) -> Result<Bytes, HttpError> {
    let read = http_body_util::Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(within, read).await {
        Err(_) => Err(HttpError::SlowBody(within)),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(HttpError::TooLarge { limit })
        }
        Ok(Err(e)) => Err(HttpError::BadBody(e.to_string())),
    }
}

async fn handle<V: ImageVerifier, G: Gatekeeper>(
    routes: Arc<Routes<V, G>>,
    within: Duration,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match Route::of(req.method(), req.uri().path()) {
        None => error_reply(&HttpError::NotFound),
        Some(Route::Health) => reply(StatusCode::OK, "text/plain; charset=utf-8", b"ok".to_vec()),
        Some(Route::Admission(endpoint)) => {
            match read_body(req, MAX_ADMISSION_BODY, within).await {
                Ok(body) => match answer(&routes.admission, endpoint, &body).await {
                    Ok(review) => reply(StatusCode::OK, "application/json", review),
                    Err(e) => error_reply(&e),
                },
                Err(e) => error_reply(&e),
            }
        }
        Some(Route::Promote) => promote(&routes, req, within).await,
        Some(Route::PullCredentials) => pull_credentials(&routes, req, within).await,
    };
    Ok(response)
}

/// `POST /api/images/verify-and-promote`: every answer, refusals included, is the API's
/// JSON and is counted in the promotions metric.
async fn promote<V: ImageVerifier, G: Gatekeeper>(
    routes: &Routes<V, G>,
    req: Request<Incoming>,
    within: Duration,
) -> Response<Full<Bytes>> {
    use crate::promote::ApiError;
    let Some(api) = &routes.promote else {
        let (status, body) = crate::promote::refuse(ApiError::NotServed);
        return json_reply(status, &body);
    };
    let authorization = authorization(&req);
    let (status, body) = match read_body(req, MAX_PROMOTE_BODY, within).await {
        Ok(body) => api.call(authorization.as_deref(), &body).await,
        Err(e) => crate::promote::refuse(ApiError::BadRequest(e.to_string())),
    };
    json_reply(status, &body)
}

/// The request's `Authorization` header, if it is text.
fn authorization(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `POST /pull-credentials`: every answer is JSON and counted in its metric.
async fn pull_credentials<V: ImageVerifier, G: Gatekeeper>(
    routes: &Routes<V, G>,
    req: Request<Incoming>,
    within: Duration,
) -> Response<Full<Bytes>> {
    use crate::node_credentials::{CredentialsError, MAX_BODY, refuse};
    let Some(api) = &routes.node_credentials else {
        let (status, body) = refuse(CredentialsError::NotServed);
        return json_reply(status, &body);
    };
    let authorization = authorization(&req);
    let (status, body) = match read_body(req, MAX_BODY, within).await {
        Ok(body) => api.call(authorization.as_deref(), &body).await,
        Err(HttpError::TooLarge { .. }) => refuse(CredentialsError::TooLarge),
        Err(e) => refuse(CredentialsError::BadRequest(e.to_string())),
    };
    json_reply(status, &body)
}

/// The AdmissionReview answering `body` POSTed to `endpoint`, serialised; an error when
/// `body` is no AdmissionReview (400) or the answer cannot be serialised (500). Everything
/// the server does with an admission request's bytes; public so the fuzz target feeds it
/// arbitrary bytes (docs/fuzzing.md).
pub async fn answer<V: ImageVerifier>(
    admission: &Admission<V>,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<Vec<u8>, HttpError> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| HttpError::NotAReview(e.to_string()))?;
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            let resp = AdmissionResponse::invalid(format!("not an admission request: {e}"));
            return serde_json::to_vec(&resp.into_review())
                .map_err(|e| HttpError::Serialise(e.to_string()));
        }
    };
    let span = info_span!(
        "admission",
        endpoint = %endpoint.path(),
        op = ?request.operation,
        kind = %request.kind.kind,
        object = %format!("{}/{}", request.namespace.clone().unwrap_or_default(), request.name),
        user = %request.user_info.username.clone().unwrap_or_default(),
    );
    let started = std::time::Instant::now();
    let decision = async {
        match endpoint {
            Endpoint::Mutate => admission.mutate(&request).await,
            Endpoint::Validate => admission.validate(&request).await,
            Endpoint::MutatePods => admission.mutate_pod(&request).await,
            Endpoint::PinPods => admission.pin_pod(&request).await,
            Endpoint::ValidatePods => admission.validate_pod(&request).await,
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
        endpoint.path().trim_start_matches('/'),
        outcome,
        started.elapsed().as_secs_f64(),
    );
    let review = decision.into_response(&request).into_review();
    serde_json::to_vec(&review).map_err(|e| HttpError::Serialise(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_only_those_are_served() {
        for e in Endpoint::ALL {
            assert_eq!(
                Route::of(&Method::POST, e.path()),
                Some(Route::Admission(e))
            );
            assert_eq!(Route::of(&Method::GET, e.path()), None, "{e:?} by GET");
        }
        assert_eq!(Route::of(&Method::GET, "/healthz"), Some(Route::Health));
        assert_eq!(Route::of(&Method::GET, "/readyz"), Some(Route::Health));
        assert_eq!(
            Route::of(&Method::POST, crate::promote::PATH),
            Some(Route::Promote)
        );
        assert_eq!(
            Route::of(&Method::POST, crate::node_credentials::PATH),
            Some(Route::PullCredentials)
        );
        assert_eq!(Route::of(&Method::GET, crate::node_credentials::PATH), None);
        assert_eq!(Route::of(&Method::POST, "/mutate/"), None);
        assert_eq!(Route::of(&Method::POST, "/"), None);
        assert_eq!(Route::of(&Method::DELETE, "/mutate"), None);
    }

    #[test]
    fn every_refusal_has_one_status_and_says_what_it_is() {
        for (e, status) in [
            (HttpError::NotFound, 404),
            (HttpError::TooLarge { limit: 10 }, 413),
            (HttpError::BadBody("x".into()), 400),
            (HttpError::SlowBody(Duration::from_secs(1)), 408),
            (HttpError::NotAReview("x".into()), 400),
            (HttpError::Serialise("x".into()), 500),
        ] {
            let r = error_reply(&e);
            assert_eq!(r.status().as_u16(), status, "{e:?}");
            assert_eq!(
                r.headers()[hyper::header::CONTENT_TYPE],
                "text/plain; charset=utf-8",
                "{e:?}: plain text is not labelled JSON"
            );
        }
        let ok = json_reply(StatusCode::OK, &serde_json::json!({"a": 1}));
        assert_eq!(
            ok.headers()[hyper::header::CONTENT_TYPE],
            "application/json"
        );
    }

    /// Denies every image: the limits test never asks.
    struct DenyAll;

    impl ImageVerifier for DenyAll {
        async fn verify(
            &self,
            image: &str,
            _: crate::verify::Scope,
        ) -> Result<crate::verify::VerifiedImage, crate::verify::Denial> {
            Err(crate::verify::Denial::new("not_verified", image))
        }
        fn pod_rules(&self) -> gkm_image::trust::PodRules {
            unreachable!("no pod is admitted in this test")
        }
    }

    /// Refuses every caller.
    struct Nobody;

    impl Gatekeeper for Nobody {
        async fn authenticate(
            &self,
            _: &str,
        ) -> Result<crate::promote::Caller, crate::promote::ApiError> {
            Err(crate::promote::ApiError::Unauthenticated("no one".into()))
        }
        async fn may_promote(
            &self,
            _: &crate::promote::Caller,
        ) -> Result<bool, crate::promote::ApiError> {
            Ok(false)
        }
    }

    /// A client that connects and sends nothing is cut off after the handshake limit; a
    /// client that sends headers but not the body they announce gets 408; with one
    /// connection allowed, a second client is served only once the first is gone.
    #[tokio::test]
    async fn slow_clients_are_cut_off_and_connections_are_capped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        gkm_image::install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let minted = crate::certs::mint(dir.path(), &["localhost".to_string()]).unwrap();
        let tls = tls_config(&minted.cert, &minted.key).unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let routes = Arc::new(Routes::<DenyAll, Nobody> {
            admission: Admission::new(DenyAll, vec![]),
            promote: None,
            node_credentials: None,
        });
        let limits = Limits {
            handshake: Duration::from_millis(300),
            headers: Duration::from_millis(300),
            body: Duration::from_millis(300),
            connections: 1,
        };
        tokio::spawn(serve_within(
            routes,
            addr,
            tls,
            limits,
            std::future::pending(),
        ));
        let connect = || async {
            for _ in 0..100 {
                if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the server did not listen on {addr}");
        };

        // Silent: holds the only connection until the handshake limit cuts it off.
        let mut silent = connect().await;
        let silent_closed = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
                .await
                .expect("a silent client is cut off");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
            std::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(minted.ca_pem.as_bytes()).unwrap()])
            .resolve("localhost", addr)
            .build()
            .unwrap();
        let health = http
            .get(format!("https://localhost:{}/healthz", addr.port()))
            .send()
            .await
            .unwrap();
        let served_at = std::time::Instant::now();
        assert_eq!(health.status(), 200);
        let cut_at = silent_closed.await.unwrap();
        assert!(
            cut_at <= served_at,
            "the second client was served while the first held the only connection"
        );

        // Headers announcing a body that never comes: 408, not a connection held open.
        let config = rustls::ClientConfig::builder()
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut minted.ca_pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                roots
            })
            .with_no_client_auth();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                connect().await,
            )
            .await
            .unwrap();
        tls.write_all(b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n{")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
}
