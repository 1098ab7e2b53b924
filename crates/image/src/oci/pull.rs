//! Digest-pinned pulls: manifest (selecting this node's platform from an index), config
//! labels, and layers streamed straight into the extractor.
//!
//! Memory stays bounded whatever the image size: each layer flows through a small channel
//! from the network task to a blocking extraction thread, hashed on the way. A layer whose
//! bytes do not hash to its descriptor fails the pull after the last byte; the caller
//! extracts into a temporary directory and discards it, so nothing of it becomes visible.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use super::extract::{Compression, ExtractError, Extractor, Limits, Totals};
use super::image::{self, Descriptor, ImageInfo, RawConfig, RawManifest};
use super::{Credentials, PinnedRef, RefError};

/// How a node talks to registries.
#[derive(Clone, Debug)]
pub struct PullConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP; all others use HTTPS.
    pub insecure_registries: Vec<String>,
    pub connect_timeout: Duration,
    /// Longest wait for any single read, including between chunks of a blob.
    pub read_timeout: Duration,
    /// Attempts for each manifest/config fetch (and for a whole pull, by the store).
    pub attempts: u32,
    /// First backoff between attempts; doubles each time.
    pub backoff: Duration,
    /// The platform picked from an index (`linux`/`amd64` on x86-64).
    pub os: String,
    pub architecture: String,
    /// Largest config blob accepted.
    pub max_config_bytes: u64,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            attempts: 3,
            backoff: Duration::from_millis(500),
            os: "linux".into(),
            architecture: go_arch().into(),
            max_config_bytes: 4 << 20,
        }
    }
}

/// This machine's architecture as OCI platforms name it.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Ref(#[from] RefError),
    #[error("registry error for {image}: {}", with_root_cause(source))]
    Registry {
        image: String,
        #[source]
        source: OciDistributionError,
    },
    /// The registry answered 401 or 403: credentials missing, wrong, or without access.
    #[error("registry {registry} refused {image}: {status} ({hint})")]
    Denied {
        registry: String,
        image: String,
        /// `401 Unauthorized` or `403 Forbidden`.
        status: &'static str,
        hint: &'static str,
    },
    #[error("{what} of {image}: expected {expected}, got {actual}")]
    DigestMismatch {
        image: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} of {image} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        image: String,
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{image} is an index without a manifest for {os}/{architecture} (it has: {available})")]
    NoPlatform {
        image: String,
        os: String,
        architecture: String,
        available: String,
    },
    #[error("{image}: bad manifest: {reason}")]
    BadManifest { image: String, reason: String },
    #[error("{image}: layer {digest} has media type {media_type:?}, which GKM does not extract")]
    UnsupportedLayer {
        image: String,
        digest: String,
        media_type: String,
    },
    #[error("{image}: {source}")]
    Extract {
        image: String,
        #[source]
        source: ExtractError,
    },
    #[error("{image}: timed out after {after:?} {what}")]
    Timeout {
        image: String,
        what: String,
        after: Duration,
    },
    #[error("{image}: extraction task failed: {reason}")]
    Task { image: String, reason: String },
}

/// The registry's refusal of the credentials (`401`, `403`) as GKM words it, if `e` is one.
pub fn denial(e: &OciDistributionError) -> Option<(&'static str, &'static str)> {
    let unauthorized = (
        "401 Unauthorized",
        "the credentials for it are missing or wrong: see --registry-auth, or the cache's pull secret",
    );
    let forbidden = (
        "403 Forbidden",
        "the credentials are valid but lack access to this repository",
    );
    match e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => Some(unauthorized),
        OciDistributionError::ServerError { code: 401, .. } => Some(unauthorized),
        OciDistributionError::ServerError { code: 403, .. } => Some(forbidden),
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().find_map(|x| match x.code {
                oci_client::errors::OciErrorCode::Unauthorized => Some(unauthorized),
                oci_client::errors::OciErrorCode::Denied => Some(forbidden),
                _ => None,
            })
        }
        _ => None,
    }
}

/// A registry error about `image` (`registry/repo...`), with refusals of the credentials
/// named as such.
fn registry_error(image: &str, source: OciDistributionError) -> PullError {
    match denial(&source) {
        Some((status, hint)) => PullError::Denied {
            registry: image.split('/').next().unwrap_or(image).to_string(),
            image: image.to_string(),
            status,
            hint,
        },
        None => PullError::Registry {
            image: image.to_string(),
            source,
        },
    }
}

/// `e`'s message followed by its innermost cause when that says something more: reqwest
/// words a refused connection as "error sending request for url (…)" and keeps the
/// "Connection refused" several sources down, where a node status (one line of text)
/// would lose it.
fn with_root_cause(e: &OciDistributionError) -> String {
    let mut msg = e.to_string();
    let mut root: Option<&dyn std::error::Error> = None;
    let mut next = std::error::Error::source(e);
    while let Some(s) = next {
        root = Some(s);
        next = s.source();
    }
    if let Some(root) = root {
        let r = root.to_string();
        if !msg.contains(&r) {
            msg = format!("{msg}: {r}");
        }
    }
    msg
}

impl PullError {
    /// Whether trying again may help (network trouble, server errors), as opposed to an
    /// answer that will not change (not found, denied, bad content).
    pub fn is_retryable(&self) -> bool {
        match self {
            PullError::Registry { source, .. } => match source {
                OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
                OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
                _ => false,
            },
            PullError::Timeout { .. } => true,
            PullError::Extract { source, .. } => {
                // The stream broke (the network side tells the extractor through an io error).
                matches!(source, ExtractError::Corrupt { source, .. } if source.kind() == io::ErrorKind::ConnectionAborted)
            }
            _ => false,
        }
    }
}

/// How far a pull has come: bytes of layer blobs received out of their total. Shared
/// (`Arc`) between the pull, which adds to it as chunks arrive, and whoever shows it (the
/// `gkm` CLI's progress bar, the agent's log and node status), which read it when they like.
#[derive(Debug, Default)]
pub struct PullProgress {
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    /// `(digest, size)` of each layer, in the order they are streamed (one after the
    /// other: the first `done` bytes are the first layers').
    layers: std::sync::Mutex<Vec<(String, u64)>>,
}

impl PullProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of layer blobs received so far (compressed, as the registry sends them).
    pub fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The layers' total size from the manifest; 0 until the manifest is read.
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The layers as `(digest, size in bytes)`, in the order they are pulled; empty until
    /// the manifest is read.
    pub fn layers(&self) -> Vec<(String, u64)> {
        self.layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A new attempt of `layers` starts from zero.
    pub fn start(&self, layers: Vec<(String, u64)>) {
        let total = layers.iter().map(|(_, s)| s).sum();
        *self.layers.lock().unwrap_or_else(|e| e.into_inner()) = layers;
        self.total
            .store(total, std::sync::atomic::Ordering::Relaxed);
        self.done.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn add(&self, bytes: u64) {
        self.done
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Pulls images by digest. Cheap to clone; one per node is enough.
#[derive(Clone)]
pub struct Puller {
    client: Arc<oci_client::Client>,
    creds: Credentials,
    cfg: PullConfig,
    /// Whether it carries one cache's own credentials ([`Puller::with_credentials`]).
    own_credentials: bool,
}

impl Puller {
    pub fn new(cfg: PullConfig, creds: Credentials) -> Self {
        crate::install_crypto();
        let client = oci_client::Client::new(ClientConfig {
            protocol: if cfg.insecure_registries.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(cfg.insecure_registries.clone())
            },
            connect_timeout: Some(cfg.connect_timeout),
            read_timeout: Some(cfg.read_timeout),
            ..Default::default()
        });
        Self {
            client: Arc::new(client),
            creds,
            cfg,
            own_credentials: false,
        }
    }

    /// A puller with `extra` on top of this one's credentials, and a client of its own
    /// (oci-client caches bearer tokens per registry and repository: a token fetched with
    /// one cache's credentials must never answer for another's).
    pub fn with_credentials(&self, extra: &Credentials) -> Puller {
        Puller {
            own_credentials: true,
            ..Puller::new(self.cfg.clone(), self.creds.overlaid_with(extra))
        }
    }

    /// Whether this puller carries one cache's own credentials: what it pulls may be
    /// readable with those only.
    pub fn has_own_credentials(&self) -> bool {
        self.own_credentials
    }

    pub fn config(&self) -> &PullConfig {
        &self.cfg
    }

    /// Resolves a tag to the digest the registry serves for it now: the sha256 of the
    /// manifest's bytes, computed here. The registry's `Docker-Content-Digest` header is not
    /// the answer: the distribution spec lets it use another algorithm (sha512), and it is
    /// the registry's claim rather than the content's.
    ///
    /// For workstations and the admission webhook only: a node never resolves a tag, it
    /// pulls the digest that admission verified.
    pub async fn resolve_tag(
        &self,
        reference: &oci_client::Reference,
    ) -> Result<PinnedRef, PullError> {
        if let Some(d) = reference.digest() {
            return Ok(PinnedRef::new(reference, d)?);
        }
        let body = self
            .get_manifest(reference, &reference.whole(), "resolving the tag")
            .await?;
        Ok(PinnedRef::new(reference, &sha256_digest(&body))?)
    }

    /// GETs the manifest or index `reference` names: the registry's exact bytes, named
    /// `image` in errors. oci-client checks a `Docker-Content-Digest` header in sha256, sha384
    /// or sha512 against them and fails on one in another algorithm; the digest it returns
    /// is the header's, so callers hash the bytes themselves.
    async fn get_manifest(
        &self,
        reference: &oci_client::Reference,
        image: &str,
        what: &str,
    ) -> Result<Bytes, PullError> {
        let auth = self.creds.for_registry(reference.registry());
        let fetch = self
            .client
            .pull_manifest_raw(reference, &auth, image::ACCEPTED_MANIFESTS);
        let (body, _header_digest) = self.bounded(image, what, fetch).await?;
        Ok(body)
    }

    /// Fetches the manifest of `image` (picking this node's platform from an index) and its
    /// config, each checked against its digest.
    pub async fn resolve(&self, image: &PinnedRef) -> Result<ImageInfo, PullError> {
        let span = info_span!("resolve", image = %image);
        async {
            let top = self
                .retry("manifest", image, || self.fetch_manifest(image))
                .await?;
            let (manifest_ref, manifest) = if let Some(list) = top.manifests {
                let chosen = self.pick_platform(image, &list)?;
                let r = image.at(&chosen.digest)?;
                let m = self
                    .retry("platform manifest", &r, || self.fetch_manifest(&r))
                    .await?;
                (r, m)
            } else {
                (image.clone(), top)
            };
            let bad = |reason: &str| PullError::BadManifest {
                image: manifest_ref.to_string(),
                reason: reason.to_string(),
            };
            let config = manifest.config.ok_or_else(|| bad("no config descriptor"))?;
            let layers = manifest.layers.ok_or_else(|| bad("no layers"))?;
            for l in &layers {
                if image::layer_compression(&l.media_type).is_none() {
                    return Err(PullError::UnsupportedLayer {
                        image: manifest_ref.to_string(),
                        digest: l.digest.clone(),
                        media_type: l.media_type.clone(),
                    });
                }
            }
            let labels = self
                .retry("config", &manifest_ref, || {
                    self.fetch_config(&manifest_ref, &config)
                })
                .await?;
            Ok(ImageInfo {
                repository: format!("{}/{}", image.registry(), image.repository()),
                digest: image.digest().to_string(),
                manifest_digest: manifest_ref.digest().to_string(),
                layers,
                labels,
            })
        }
        .instrument(span)
        .await
    }

    /// Streams every layer of `info` into `dest` (an existing, empty directory).
    pub async fn extract_into(
        &self,
        image: &PinnedRef,
        info: &ImageInfo,
        dest: &Path,
        limits: Limits,
    ) -> Result<Totals, PullError> {
        self.extract_into_with(image, info, dest, limits, None)
            .await
    }

    /// [`Puller::extract_into`], counting received bytes into `progress` (restarted at 0
    /// of the layers' total).
    pub async fn extract_into_with(
        &self,
        image: &PinnedRef,
        info: &ImageInfo,
        dest: &Path,
        limits: Limits,
        progress: Option<&PullProgress>,
    ) -> Result<Totals, PullError> {
        if let Some(p) = progress {
            p.start(
                info.layers
                    .iter()
                    .map(|l| (l.digest.clone(), l.size))
                    .collect(),
            );
        }
        let name = image.to_string();
        let dest = dest.to_path_buf();
        let task_err = |reason: String| PullError::Task {
            image: name.clone(),
            reason,
        };
        let shown = dest.display().to_string();
        let mut extractor = tokio::task::spawn_blocking(move || Extractor::new(&dest, limits))
            .await
            .map_err(|e| task_err(e.to_string()))?
            .map_err(|e| task_err(format!("opening {shown}: {e}")))?;
        for layer in &info.layers {
            let compression = image::layer_compression(&layer.media_type).ok_or_else(|| {
                PullError::UnsupportedLayer {
                    image: name.clone(),
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                }
            })?;
            let span = info_span!("layer", digest = %layer.digest, size = layer.size);
            extractor = self
                .stream_layer(image, layer, compression, extractor, progress)
                .instrument(span)
                .await?;
        }
        tokio::task::spawn_blocking(move || extractor.finish())
            .await
            .map_err(|e| task_err(e.to_string()))?
            .map_err(|source| PullError::Extract {
                image: name.clone(),
                source,
            })
    }

    async fn stream_layer(
        &self,
        image: &PinnedRef,
        layer: &Descriptor,
        compression: Compression,
        mut extractor: Extractor,
        progress: Option<&PullProgress>,
    ) -> Result<Extractor, PullError> {
        let name = image.to_string();
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
        let layer_name = layer.digest.clone();
        let consumer = tokio::task::spawn_blocking(move || {
            let r = extractor.apply_layer(
                ChannelReader {
                    rx,
                    cur: Bytes::new(),
                },
                compression,
                &layer_name,
            );
            (extractor, r)
        });

        let produced = self.produce(image, layer, &tx, progress).await;
        if let Err(e) = &produced {
            // Stop the extractor; the blob is not what it claims to be.
            let _ = tx
                .send(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    e.to_string(),
                )))
                .await;
        }
        drop(tx);
        let (extractor, consumed) = consumer.await.map_err(|e| PullError::Task {
            image: name.clone(),
            reason: e.to_string(),
        })?;
        // The network side's error is the cause when both failed.
        produced?;
        consumed.map_err(|source| PullError::Extract {
            image: name,
            source,
        })?;
        Ok(extractor)
    }

    /// Sends the blob's bytes to the extractor, hashing them; checks size and digest.
    async fn produce(
        &self,
        image: &PinnedRef,
        layer: &Descriptor,
        tx: &mpsc::Sender<io::Result<Bytes>>,
        progress: Option<&PullProgress>,
    ) -> Result<(), PullError> {
        let name = image.to_string();
        let what = format!("layer {}", layer.digest);
        let desc = oci_descriptor(layer);
        let mut stream = self
            .client
            .pull_blob_stream(image.as_reference(), &desc)
            .await
            .map_err(|source| registry_error(&name, source))?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut stream_err = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    size += bytes.len() as u64;
                    if size > layer.size {
                        return Err(PullError::SizeMismatch {
                            image: name,
                            what,
                            expected: layer.size,
                            actual: size,
                        });
                    }
                    hasher.update(&bytes);
                    if let Some(p) = progress {
                        p.add(bytes.len() as u64);
                    }
                    if tx.send(Ok(bytes)).await.is_err() {
                        // The extractor stopped early; its error explains why.
                        return Ok(());
                    }
                }
                Err(e) => {
                    stream_err = Some(e);
                    break;
                }
            }
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if size == layer.size && actual != layer.digest {
            return Err(PullError::DigestMismatch {
                image: name,
                what,
                expected: layer.digest.clone(),
                actual,
            });
        }
        if let Some(e) = stream_err {
            return Err(PullError::Registry {
                image: name,
                source: OciDistributionError::IoError(e),
            });
        }
        if size != layer.size {
            return Err(PullError::SizeMismatch {
                image: name,
                what,
                expected: layer.size,
                actual: size,
            });
        }
        debug!(bytes = size, "layer streamed");
        Ok(())
    }

    async fn fetch_manifest(&self, r: &PinnedRef) -> Result<RawManifest, PullError> {
        let body = self
            .get_manifest(r.as_reference(), &r.to_string(), "fetching the manifest")
            .await?;
        check_digest(&r.to_string(), "manifest", r.digest(), &body)?;
        serde_json::from_slice(&body).map_err(|e| PullError::BadManifest {
            image: r.to_string(),
            reason: e.to_string(),
        })
    }

    async fn fetch_config(
        &self,
        r: &PinnedRef,
        desc: &Descriptor,
    ) -> Result<std::collections::BTreeMap<String, String>, PullError> {
        if desc.size > self.cfg.max_config_bytes {
            return Err(PullError::BadManifest {
                image: r.to_string(),
                reason: format!(
                    "config is {} bytes, over the limit of {}",
                    desc.size, self.cfg.max_config_bytes
                ),
            });
        }
        let mut buf = Vec::with_capacity(desc.size as usize);
        let oci_desc = oci_descriptor(desc);
        let fetch = self.client.pull_blob(r.as_reference(), &oci_desc, &mut buf);
        self.bounded(&r.to_string(), "fetching the config", fetch)
            .await?;
        check_digest(&r.to_string(), "config", &desc.digest, &buf)?;
        let cfg: RawConfig = serde_json::from_slice(&buf).map_err(|e| PullError::BadManifest {
            image: r.to_string(),
            reason: format!("config is not JSON: {e}"),
        })?;
        Ok(cfg.config.and_then(|c| c.labels).unwrap_or_default())
    }

    fn pick_platform<'a>(
        &self,
        image: &PinnedRef,
        list: &'a [Descriptor],
    ) -> Result<&'a Descriptor, PullError> {
        list.iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == self.cfg.os && p.architecture == self.cfg.architecture)
            })
            .ok_or_else(|| PullError::NoPlatform {
                image: image.to_string(),
                os: self.cfg.os.clone(),
                architecture: self.cfg.architecture.clone(),
                available: list
                    .iter()
                    .filter_map(|d| {
                        d.platform
                            .as_ref()
                            .map(|p| format!("{}/{}", p.os, p.architecture))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Runs one registry call under the overall timeout, naming `image` in its errors.
    async fn bounded<T>(
        &self,
        image: &str,
        what: &str,
        call: impl std::future::Future<Output = Result<T, OciDistributionError>>,
    ) -> Result<T, PullError> {
        let after = self.total_timeout();
        tokio::time::timeout(after, call)
            .await
            .map_err(|_| PullError::Timeout {
                image: image.to_string(),
                what: what.to_string(),
                after,
            })?
            .map_err(|source| registry_error(image, source))
    }

    fn total_timeout(&self) -> Duration {
        self.cfg.connect_timeout + self.cfg.read_timeout * 2
    }

    async fn retry<T, F, Fut>(
        &self,
        what: &str,
        image: &PinnedRef,
        mut f: F,
    ) -> Result<T, PullError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, PullError>>,
    {
        let mut delay = self.cfg.backoff;
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < self.cfg.attempts => {
                    warn!(%image, what, attempt, error = %e, "retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// `sha256:<hex>` of `bytes`: the only digest GKM names content by.
fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Fails unless `bytes` hash to `expected`.
fn check_digest(image: &str, what: &str, expected: &str, bytes: &[u8]) -> Result<(), PullError> {
    let actual = sha256_digest(bytes);
    if actual == expected {
        return Ok(());
    }
    Err(PullError::DigestMismatch {
        image: image.to_string(),
        what: what.to_string(),
        expected: expected.to_string(),
        actual,
    })
}

fn oci_descriptor(d: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        ..Default::default()
    }
}

/// A blocking `Read` over the chunks the network task sends.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// Raw access for signature verification (`gkm::trust`): manifests by tag or digest as the
/// registry's exact bytes, small blobs read whole under a size bound, and referrers.
/// Every call runs under the same overall timeout as the other registry calls.
impl Puller {
    /// Fetches the manifest or index that `reference` (tag or digest) names, as the exact
    /// bytes the registry served, with their digest; `Ok(None)` when the registry says it
    /// does not exist. A by-digest reference is checked against its digest; either way the
    /// returned digest is computed from the bytes, never taken from a header. Fails when the
    /// manifest is larger than `max_bytes` (oci-client buffers the response first, so the
    /// timeout is what bounds the transfer itself).
    pub async fn fetch_manifest_bytes(
        &self,
        reference: &oci_client::Reference,
        max_bytes: usize,
    ) -> Result<Option<(Vec<u8>, String)>, PullError> {
        let name = reference.whole();
        let body = match self
            .get_manifest(reference, &name, "fetching a manifest")
            .await
        {
            Ok(body) => body,
            Err(PullError::Registry { source, .. }) if Self::is_not_found(&source) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if body.len() > max_bytes {
            return Err(PullError::SizeMismatch {
                image: name,
                what: "manifest (limit)".into(),
                expected: max_bytes as u64,
                actual: body.len() as u64,
            });
        }
        let digest = sha256_digest(&body);
        if let Some(expected) = reference.digest() {
            check_digest(&name, "manifest", expected, &body)?;
        }
        Ok(Some((body.to_vec(), digest)))
    }

    /// Reads the blob `digest` of `size` bytes from `image`'s repository into memory,
    /// refusing it when `size` is over `max_bytes` and stopping as soon as the registry sends
    /// more than `size` bytes; the bytes are checked against `digest`.
    pub async fn fetch_blob_bytes(
        &self,
        image: &PinnedRef,
        digest: &str,
        size: u64,
        max_bytes: u64,
    ) -> Result<Vec<u8>, PullError> {
        let name = image.to_string();
        let what = format!("blob {digest}");
        if size > max_bytes {
            return Err(PullError::SizeMismatch {
                image: name,
                what: format!("{what} (limit)"),
                expected: max_bytes,
                actual: size,
            });
        }
        let auth = self.creds.for_registry(image.registry());
        self.client
            .store_auth_if_needed(image.as_reference().resolve_registry(), &auth)
            .await;
        let desc = OciDescriptor {
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        let read = async {
            let mut stream = self
                .client
                .pull_blob_stream(image.as_reference(), &desc)
                .await?;
            let mut buf = Vec::with_capacity(size as usize);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(OciDistributionError::IoError)?;
                if (buf.len() + chunk.len()) as u64 > size {
                    // Longer than its descriptor: stop reading, the size check below fails.
                    buf.extend_from_slice(&chunk[..(size as usize - buf.len())]);
                    return Ok((buf, true));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok((buf, false))
        };
        let (buf, overlong) = self.bounded(&name, "fetching a blob", read).await?;
        if overlong || buf.len() as u64 != size {
            return Err(PullError::SizeMismatch {
                image: name,
                what,
                expected: size,
                actual: if overlong { size + 1 } else { buf.len() as u64 },
            });
        }
        check_digest(&name, &what, digest, &buf)?;
        Ok(buf)
    }

    /// The referrers of `image`: the OCI 1.1 referrers API where the registry has it, else
    /// the referrers tag schema (tag `sha256-<hex>`), as oci-client implements both. An empty
    /// index when there are none.
    pub async fn list_referrers(
        &self,
        image: &PinnedRef,
    ) -> Result<oci_client::manifest::OciImageIndex, PullError> {
        let auth = self.creds.for_registry(image.registry());
        self.client
            .store_auth_if_needed(image.as_reference().resolve_registry(), &auth)
            .await;
        let list = self.client.pull_referrers(image.as_reference(), None);
        self.bounded(&image.to_string(), "listing referrers", list)
            .await
    }

    /// Whether the registry answered that the manifest (or repository) does not exist.
    fn is_not_found(e: &OciDistributionError) -> bool {
        use oci_client::errors::OciErrorCode;
        match e {
            OciDistributionError::ImageManifestNotFoundError(_) => true,
            OciDistributionError::ServerError { code, .. } => *code == 404,
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                    )
                })
            }
            _ => false,
        }
    }
}

/// The pull's decisions that need no registry: which manifest of an index a node takes,
/// and which failures are retried, how often and with what backoff.
#[cfg(test)]
mod tests {
    use super::image::Platform;
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn puller(attempts: u32) -> Puller {
        Puller::new(
            PullConfig {
                attempts,
                backoff: Duration::from_millis(1),
                os: "linux".into(),
                architecture: "amd64".into(),
                ..Default::default()
            },
            Credentials::anonymous(),
        )
    }

    fn image() -> PinnedRef {
        PinnedRef::parse(&format!("reg.io/team/cache@sha256:{}", "a".repeat(64))).unwrap()
    }

    fn entry(n: u8, os: &str, arch: &str) -> Descriptor {
        Descriptor {
            media_type: image::OCI_MANIFEST.into(),
            digest: format!("sha256:{}", hex::encode([n; 32])),
            size: 100,
            platform: Some(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
        }
    }

    #[test]
    fn a_node_takes_its_own_platform_from_an_index_or_says_what_there_is() {
        let p = puller(3);
        let list = [entry(1, "linux", "arm64"), entry(2, "linux", "amd64")];
        assert_eq!(
            p.pick_platform(&image(), &list).unwrap().digest,
            list[1].digest
        );
        let e = p
            .pick_platform(
                &image(),
                &[entry(1, "linux", "arm64"), entry(3, "windows", "amd64")],
            )
            .unwrap_err();
        assert!(matches!(e, PullError::NoPlatform { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("linux/amd64") && msg.contains("linux/arm64, windows/amd64"),
            "{msg}"
        );
    }

    fn timeout() -> PullError {
        PullError::Timeout {
            image: image().to_string(),
            what: "fetching a manifest".into(),
            after: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_and_the_pull_recovers() {
        let p = puller(3);
        let calls = AtomicU32::new(0);
        let got = p
            .retry("manifest", &image(), || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(timeout()),
                    _ => Ok("manifest"),
                }
            })
            .await;
        assert_eq!(got.unwrap(), "manifest");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_are_bounded_by_the_attempts() {
        let p = puller(4);
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = p
            .retry("manifest", &image(), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(timeout())
            })
            .await;
        assert!(matches!(got, Err(PullError::Timeout { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_answer_that_will_not_change_is_not_retried() {
        let p = puller(5);
        for e in [
            PullError::Denied {
                registry: "reg.io".into(),
                image: image().to_string(),
                status: "401 Unauthorized",
                hint: "no credentials",
            },
            PullError::BadManifest {
                image: image().to_string(),
                reason: "no layers".into(),
            },
        ] {
            assert!(!e.is_retryable(), "{e}");
            let calls = AtomicU32::new(0);
            let once = std::sync::Mutex::new(Some(e));
            let got: Result<(), _> = p
                .retry("manifest", &image(), || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let e = once.lock().unwrap().take();
                    async move { Err(e.expect("called once")) }
                })
                .await;
            assert!(got.is_err());
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
    }
}
