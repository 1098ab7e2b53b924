//! A registry that serves exactly the bytes a test gives it, over plain HTTP/1.1.
//!
//! Real registries verify blob digests when storing and when serving (crane answers
//! "Unknown blob" for a corrupted file), so they cannot be made to send content that does
//! not match its digest, nor a `Docker-Content-Digest` of their own choosing. This stand-in
//! exists only for those faults.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::Error;

/// Serves `GET`/`HEAD` of fixed paths (`/v2/<repo>/manifests/<ref>`, `/v2/<repo>/blobs/<d>`).
pub struct StaticRegistry {
    host: String,
    task: tokio::task::JoinHandle<()>,
}

/// What one path answers: content type and body.
pub type Content = (String, Vec<u8>);

impl StaticRegistry {
    /// Starts serving `paths` on a free loopback port, on the current tokio runtime.
    pub async fn start(paths: HashMap<String, Content>) -> Result<Self, Error> {
        Self::start_throttled(paths, None).await
    }

    /// [`StaticRegistry::start`] on `host` (`127.0.0.1:<port>`): a registry brought back
    /// where it was, after a test took it down by dropping it.
    pub async fn start_on(host: &str, paths: HashMap<String, Content>) -> Result<Self, Error> {
        Self::serve_on(host, paths, HashMap::new(), None).await
    }

    /// [`StaticRegistry::start`], sending bodies at about `bytes_per_second` (so a pull can
    /// be caught, and killed, halfway).
    pub async fn start_throttled(
        paths: HashMap<String, Content>,
        bytes_per_second: Option<u64>,
    ) -> Result<Self, Error> {
        Self::serve(paths, HashMap::new(), bytes_per_second).await
    }

    /// [`StaticRegistry::start`], adding `headers` (name, value) to the answers for their
    /// path: a `Docker-Content-Digest` in another algorithm, or one that lies.
    pub async fn start_with_headers(
        paths: HashMap<String, Content>,
        headers: HashMap<String, Vec<(String, String)>>,
    ) -> Result<Self, Error> {
        Self::serve(paths, headers, None).await
    }

    async fn serve(
        paths: HashMap<String, Content>,
        headers: HashMap<String, Vec<(String, String)>>,
        bytes_per_second: Option<u64>,
    ) -> Result<Self, Error> {
        Self::serve_on("127.0.0.1:0", paths, headers, bytes_per_second).await
    }

    async fn serve_on(
        address: &str,
        paths: HashMap<String, Content>,
        headers: HashMap<String, Vec<(String, String)>>,
        bytes_per_second: Option<u64>,
    ) -> Result<Self, Error> {
        // tokio sets SO_REUSEADDR, so a port just given up binds again at once.
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| Error::io("binding the static registry", e))?;
        let host = listener
            .local_addr()
            .map_err(|e| Error::io("reading the static registry's address", e))?
            .to_string();
        let paths = Arc::new(paths);
        let headers = Arc::new(headers);
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let paths = paths.clone();
                let headers = headers.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let mut first = text.lines().next().unwrap_or("").split_whitespace();
                    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                    let path = path.split('?').next().unwrap_or("");
                    let (status, ctype, body): (&str, &str, &[u8]) = if path == "/v2/" {
                        ("200 OK", "application/json", b"{}")
                    } else if let Some((t, b)) = paths.get(path) {
                        ("200 OK", t.as_str(), b.as_slice())
                    } else {
                        (
                            "404 Not Found",
                            "application/json",
                            br#"{"errors":[{"code":"NOT_FOUND"}]}"#,
                        )
                    };
                    let extra: String = headers
                        .get(path)
                        .into_iter()
                        .flatten()
                        .map(|(name, value)| format!("{name}: {value}\r\n"))
                        .collect();
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                    if method != "HEAD" {
                        match bytes_per_second {
                            None => {
                                let _ = conn.write_all(body).await;
                            }
                            Some(rate) => {
                                // Ten chunks a second.
                                let chunk = (rate / 10).max(1) as usize;
                                for part in body.chunks(chunk) {
                                    if conn.write_all(part).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                                }
                            }
                        }
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
        Ok(Self { host, task })
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for StaticRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}
