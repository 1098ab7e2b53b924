//! `gkm promote --server`: the developer's side of promotion. Instead of copying with its
//! own registry credentials, `gkm` asks a running controller's
//! `POST /api/images/verify-and-promote` (see `docs/trust.md`) to verify and promote, with
//! a Kubernetes bearer token; only the controller writes the trusted registry.
//!
//! The token and the CA come from the current kubeconfig context unless `--token-file` and
//! `--ca-file` say otherwise. The API's answers are mapped to words and exit codes in one
//! table, [`ClientError::exit_code`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;

use super::Promoted;

/// The path of the controller's promotion API.
pub const PROMOTE_PATH: &str = "/api/images/verify-and-promote";

/// Where and how to reach the promoter.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// `https://host[:port]` of the controller's API (a path, if any, is replaced).
    pub server: String,
    /// A file holding the bearer token (default: the current kubeconfig context's token).
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that signs the server's certificate (default: the current kubeconfig
    /// cluster's CA, then the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Gives up after this long (the promoter copies every blob: large caches take time).
    pub timeout: Duration,
}

/// Why a promotion through the API did not happen. Each names what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--server {server}: {reason}")]
    BadServer { server: String, reason: String },
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    NoCredentials(String),
    #[error("--ca-file {}: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("could not reach the promoter at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The API answered with a refusal; `status` is its HTTP status.
    #[error("{}", refusal_words(*status, message, reason))]
    Refused {
        status: u16,
        /// The API's `reason` label (`not_verified`, `forbidden`, ...).
        reason: String,
        /// The API's `error` text, which names the image.
        message: String,
    },
    #[error("{url} answered {status} with a body that is not the promotion API's: {body}")]
    BadAnswer {
        url: String,
        status: u16,
        body: String,
    },
}

impl ClientError {
    /// The process exit code: 2 the request itself was refused (fix the image, digest or
    /// tag), 3 not authenticated, 4 not allowed, 5 the server or the network failed (retry
    /// later), 1 anything on this side (flags, files, kubeconfig).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused { status, .. } => match status {
                400 | 404 | 409 | 413 | 422 => 2,
                401 => 3,
                403 => 4,
                _ => 5,
            },
            ClientError::Unreachable { .. } | ClientError::BadAnswer { .. } => 5,
            _ => 1,
        }
    }
}

fn refusal_words(status: u16, message: &str, reason: &str) -> String {
    match status {
        400 => format!(
            "the promoter refused the image: {message} (check that it is in the incoming \
             registry, signed by an authority the cluster trusts, and that the digest is the \
             one you signed)"
        ),
        401 => format!(
            "the promoter did not accept your credentials: {message} (the token is missing, \
             expired or not one the cluster issued; log in again or pass --token-file)"
        ),
        403 => format!(
            "you may not promote images: {message} (ask a cluster admin for `create` on \
             `promotions.gkm.io`)"
        ),
        409 => format!("the promoter refused the tag: {message}"),
        501 => format!("this cluster's controller has no promotion configured: {message}"),
        s if s >= 500 => format!(
            "the promoter failed ({s}, {reason}): {message} (nothing was changed by this \
             request; try again later or ask the cluster admin)"
        ),
        s => format!("the promoter answered {s} ({reason}): {message}"),
    }
}

#[derive(Deserialize)]
struct ApiRefusal {
    error: String,
    #[serde(default)]
    reason: String,
}

/// Asks the promoter at `opts.server` to verify and promote `image` at `digest`.
///
/// Errors: [`ClientError`]; the request is sent once (the API is idempotent, so running
/// the command again after a failure is safe).
pub async fn promote_via_server(
    opts: &ServerOptions,
    image: &str,
    digest: &str,
) -> Result<Promoted, ClientError> {
    let url = endpoint(&opts.server)?;
    let (token, kube_ca) = credentials(opts).await?;
    let mut builder = reqwest::Client::builder()
        .timeout(opts.timeout)
        .connect_timeout(Duration::from_secs(10));
    match &opts.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| ClientError::Read {
                what: "--ca-file",
                path: path.clone(),
                source,
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::BadCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(ClientError::BadCa {
                    path: path.clone(),
                    reason: "holds no PEM certificate".into(),
                });
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        None => {
            for der in kube_ca {
                if let Ok(c) = reqwest::Certificate::from_der(&der) {
                    builder = builder.add_root_certificate(c);
                }
            }
        }
    }
    let client = builder.build().map_err(|e| ClientError::BadServer {
        server: opts.server.clone(),
        reason: e.to_string(),
    })?;
    let answer = client
        .post(&url)
        .bearer_auth(token)
        .json(&serde_json::json!({"image": image, "digest": digest}))
        .send()
        .await
        .map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
    let status = answer.status().as_u16();
    let body = answer.bytes().await.map_err(|e| ClientError::Unreachable {
        url: url.clone(),
        reason: error_chain(&e),
    })?;
    if status == 200 {
        return serde_json::from_slice(&body).map_err(|_| bad_answer(&url, status, &body));
    }
    match serde_json::from_slice::<ApiRefusal>(&body) {
        Ok(r) => Err(ClientError::Refused {
            status,
            reason: r.reason,
            message: r.error,
        }),
        Err(_) => Err(bad_answer(&url, status, &body)),
    }
}

fn bad_answer(url: &str, status: u16, body: &[u8]) -> ClientError {
    let text = String::from_utf8_lossy(body);
    let shown: String = text.chars().take(200).collect();
    ClientError::BadAnswer {
        url: url.to_string(),
        status,
        body: shown,
    }
}

/// reqwest's error with its causes, which say what failed (TLS, DNS, refused).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut words = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        words.push_str(": ");
        words.push_str(&c.to_string());
        cause = c.source();
    }
    words
}

/// The API's URL from `--server`: `https://host[:port]` (plain `http` only for loopback
/// addresses, where a token cannot be sniffed off the wire).
fn endpoint(server: &str) -> Result<String, ClientError> {
    let bad = |reason: &str| ClientError::BadServer {
        server: server.to_string(),
        reason: reason.to_string(),
    };
    let url = reqwest::Url::parse(server).map_err(|e| bad(&e.to_string()))?;
    let host = url.host_str().ok_or_else(|| bad("names no host"))?;
    match url.scheme() {
        "https" => {}
        "http" if matches!(host, "127.0.0.1" | "localhost" | "[::1]") => {}
        "http" => return Err(bad("must be https: the request carries your token")),
        other => return Err(bad(&format!("scheme {other} is not https"))),
    }
    let mut url = url;
    url.set_path(PROMOTE_PATH);
    url.set_query(None);
    Ok(url.to_string())
}

/// The bearer token and the kubeconfig cluster's CA certificates (DER).
async fn credentials(opts: &ServerOptions) -> Result<(String, Vec<Vec<u8>>), ClientError> {
    let kube = kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default()).await;
    let token = match &opts.token_file {
        Some(path) => read_token(path, "--token-file")?,
        None => {
            let config = kube.as_ref().map_err(|e| {
                ClientError::NoCredentials(format!(
                    "no token: pass --token-file, or use a kubeconfig whose current context \
                     has a token (reading it: {e})"
                ))
            })?;
            match (&config.auth_info.token, &config.auth_info.token_file) {
                (Some(t), _) => t.expose_secret().trim().to_string(),
                (None, Some(f)) => read_token(Path::new(f), "the kubeconfig's tokenFile")?,
                (None, None) => {
                    return Err(ClientError::NoCredentials(
                        "no token: the current kubeconfig context's user has no token or \
                         tokenFile (client certificates and exec plugins cannot be sent to \
                         the promoter); pass --token-file"
                            .into(),
                    ));
                }
            }
        }
    };
    if token.is_empty() {
        return Err(ClientError::NoCredentials("no token: it is empty".into()));
    }
    let ca = kube.ok().and_then(|c| c.root_cert).unwrap_or_default();
    Ok((token, ca))
}

fn read_token(path: &Path, what: &'static str) -> Result<String, ClientError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|source| ClientError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_https_except_on_loopback() {
        assert_eq!(
            endpoint("https://gkm.example:8443").unwrap(),
            "https://gkm.example:8443/api/images/verify-and-promote"
        );
        assert_eq!(
            endpoint("https://gkm.example/some/path?x=1").unwrap(),
            "https://gkm.example/api/images/verify-and-promote"
        );
        assert!(endpoint("http://127.0.0.1:8080").is_ok());
        let e = endpoint("http://gkm.example").unwrap_err().to_string();
        assert!(e.contains("must be https"), "{e}");
        assert!(endpoint("gkm.example").is_err());
        assert!(endpoint("ftp://gkm.example").is_err());
    }

    #[test]
    fn every_answer_has_one_exit_code_and_words_for_a_developer() {
        let refused = |status| ClientError::Refused {
            status,
            reason: "r".into(),
            message: "incoming.example/dev/x@sha256:ab: unsigned".into(),
        };
        for (status, code, words) in [
            (400, 2, "signed by an authority"),
            (409, 2, "refused the tag"),
            (401, 3, "--token-file"),
            (403, 4, "promotions.gkm.io"),
            (501, 5, "no promotion configured"),
            (502, 5, "try again later"),
            (503, 5, "try again later"),
        ] {
            let e = refused(status);
            assert_eq!(e.exit_code(), code, "{status}");
            let text = e.to_string();
            assert!(text.contains(words), "{status}: {text}");
            assert!(text.contains("incoming.example/dev/x"), "{status}: {text}");
        }
        let e = ClientError::Unreachable {
            url: "u".into(),
            reason: "r".into(),
        };
        assert_eq!(e.exit_code(), 5);
        assert_eq!(ClientError::NoCredentials("x".into()).exit_code(), 1);
    }
}
