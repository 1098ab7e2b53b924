//! Registries that require credentials, as production ones do: Debian's `docker-registry`
//! (CNCF distribution 2.8) with htpasswd basic auth, or with the bearer-token flow real
//! registries use: the registry answers 401 with `WWW-Authenticate: Bearer realm=...`,
//! the client fetches a scoped JWT from the token service with its credentials, and the
//! registry verifies the token's signature (ES256, certificate chain in `x5c`), issuer,
//! audience, expiry and granted actions. The token service is [`TokenServer`], on
//! loopback.
//!
//! `install-tools.sh` unpacks the Debian package's binary into the tools directory (not
//! `apt-get install`: its maintainer scripts would start a system registry on port 5000).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::Error;
use crate::process::{self, ServerProcess};
use crate::tools::tools_bin_dir;

/// How a registry asks for credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// HTTP basic auth against an htpasswd file.
    Basic,
    /// The token flow: basic credentials at the token service, a bearer JWT at the
    /// registry.
    Token,
}

/// The one account every authenticated registry knows.
pub const USER: &str = "gkm-ci";
pub const PASSWORD: &str = "s3cret-pa55";

/// A running registry that requires [`USER`]/[`PASSWORD`].
pub struct AuthRegistry {
    host: String,
    dir: PathBuf,
    process: ServerProcess,
    mode: AuthMode,
    _token: Option<TokenServer>,
}

impl AuthRegistry {
    /// Starts a registry requiring credentials, in `mode`, on a free port.
    pub async fn start(mode: AuthMode) -> Result<Self, Error> {
        let bin = tools_bin_dir().join("docker-registry");
        if !bin.is_file() {
            return Err(Error::ToolMissing {
                tool: "docker-registry",
                looked_at: bin,
                hint: "run scripts/install-tools.sh (or set GKM_TOOLS_DIR)".into(),
            });
        }
        let dir = process::work_dir("auth-registry")?;
        let port = process::free_port()?;
        let host = format!("127.0.0.1:{port}");
        let (auth, token) = match mode {
            AuthMode::Basic => {
                let hash =
                    bcrypt::hash(PASSWORD, 4).map_err(|e| Error::Other(format!("bcrypt: {e}")))?;
                let htpasswd = dir.join("htpasswd");
                std::fs::write(&htpasswd, format!("{USER}:{hash}\n"))
                    .map_err(|e| Error::io("writing htpasswd", e))?;
                (
                    format!(
                        "  htpasswd:\n    realm: gkm-test\n    path: {}\n",
                        htpasswd.display()
                    ),
                    None,
                )
            }
            AuthMode::Token => {
                let t = TokenServer::start(&dir)?;
                (
                    format!(
                        "  token:\n    realm: {}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                        t.url(),
                        t.cert_path.display()
                    ),
                    Some(t),
                )
            }
        };
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n  secret: gkm-testenv-{port}\nauth:\n{auth}",
                dir.join("data").display()
            ),
        )
        .map_err(|e| Error::io("writing the registry config", e))?;
        let process = ServerProcess::start(
            "docker-registry",
            &bin,
            &["serve".to_string(), config.display().to_string()],
            &[],
            &dir,
        )?;
        let http = crate::http_builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;
        let url = format!("http://{host}/v2/");
        process
            .wait_ready(
                "/v2/",
                &[(port, "listen port")],
                Duration::from_secs(20),
                || {
                    let req = http.get(&url);
                    // Up means "asks for credentials".
                    async move { matches!(req.send().await, Ok(r) if r.status() == 401) }
                },
            )
            .await?;
        let r = Self {
            host,
            dir,
            process,
            mode,
            _token: token,
        };
        for (name, password) in [
            ("docker-config.json", PASSWORD),
            ("wrong-docker-config.json", "wrong"),
        ] {
            std::fs::write(
                r.dir.join(name),
                docker_config(&[(&r.host, USER, password)]),
            )
            .map_err(|e| Error::io(format!("writing {name}"), e))?;
        }
        Ok(r)
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// A docker config file with the right credentials for this registry.
    pub fn docker_config(&self) -> PathBuf {
        self.dir.join("docker-config.json")
    }

    /// A docker config file with a wrong password for this registry.
    pub fn wrong_docker_config(&self) -> PathBuf {
        self.dir.join("wrong-docker-config.json")
    }

    /// The registry's log (request lines with their status).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log_path()).unwrap_or_default()
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        self.process.stop();
        process::remove_work_dir(&self.dir);
    }
}

/// A docker config file (`{"auths": {host: {"auth": base64(user:password)}}}`) for
/// `(host, user, password)` entries.
pub fn docker_config(entries: &[(&str, &str, &str)]) -> String {
    let auths: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(host, user, password)| {
            (
                host.to_string(),
                serde_json::json!({"auth": STANDARD.encode(format!("{user}:{password}"))}),
            )
        })
        .collect();
    serde_json::json!({ "auths": auths }).to_string()
}

/// The audience (`service`) and issuer the registry expects in tokens.
const SERVICE: &str = "gkm-test-registry";
const ISSUER: &str = "gkm-testenv-token-service";

/// A token service for distribution's token auth: `GET /token?service=..&scope=..` with
/// basic credentials answers `{"token": JWT}` granting the requested actions (any for
/// [`USER`]); wrong credentials get 401. Tokens are ES256 JWTs with the signing
/// certificate in `x5c`, which the registry checks against `rootcertbundle`.
pub struct TokenServer {
    addr: SocketAddr,
    cert_path: PathBuf,
    /// Stops the server's thread.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Signer {
    key: p256::ecdsa::SigningKey,
    cert_der: Vec<u8>,
}

impl TokenServer {
    fn start(dir: &Path) -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Other(format!("token key: {e}")))?;
        let params = rcgen::CertificateParams::new(vec![ISSUER.to_string()])
            .map_err(|e| Error::Other(format!("token certificate: {e}")))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::Other(format!("token certificate: {e}")))?;
        let cert_path = dir.join("token-cert.pem");
        std::fs::write(&cert_path, cert.pem())
            .map_err(|e| Error::io("writing the token certificate", e))?;
        use p256::pkcs8::DecodePrivateKey;
        let signing = p256::ecdsa::SigningKey::from_pkcs8_der(&key.serialize_der())
            .map_err(|e| Error::Other(format!("token key: {e}")))?;
        let signer = Arc::new(Signer {
            key: signing,
            cert_der: cert.der().to_vec(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| Error::io("binding the token service", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the token service's address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring the token service's socket", e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // A thread and runtime of its own: a test may block its runtime while a client it
        // started waits for a token.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a tokio runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a listener on a runtime");
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let signer = signer.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let signer = signer.clone();
                                async move {
                                    Ok::<_, std::convert::Infallible>(answer(&signer, req))
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Self {
            addr,
            cert_path,
            stop: Some(stop),
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn reply(status: u16, body: String) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::new(body.into()))
        .expect("a valid response")
}

/// One token request.
fn answer(signer: &Signer, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .is_some_and(|raw| raw == format!("{USER}:{PASSWORD}").as_bytes());
    if !authorized {
        return reply(
            401,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#.into(),
        );
    }
    let query = req.uri().query().unwrap_or("");
    let mut access = Vec::new();
    for (k, v) in url_pairs(query) {
        // scope=repository:<name>:<actions>
        if k == "scope"
            && let Some(rest) = v.strip_prefix("repository:")
            && let Some((name, actions)) = rest.rsplit_once(':')
        {
            access.push(serde_json::json!({
                "type": "repository", "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = serde_json::json!({
        "typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&signer.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": USER, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    use p256::ecdsa::signature::Signer as _;
    let sig: p256::ecdsa::Signature = signer.key.sign(signing_input.as_bytes());
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
    reply(
        200,
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string(),
    )
}

/// `k=v&k=v` pairs of a query, percent-decoded.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
