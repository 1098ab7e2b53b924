//! Writing to registries: blobs (from memory, a file, or streamed from another repository),
//! manifests by their exact bytes, and tags. `gkm build` pushes through it, and promotion
//! copies images and their signature artifacts with it.
//!
//! Every small call is bounded by a timeout; a streamed upload has no overall bound (a large
//! layer takes as long as the network needs) but fails once it stops moving.

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use sha2::{Digest, Sha256};

use super::{Credentials, PullConfig, Puller, Reference};

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{image}: {what}: {reason}")]
    Registry {
        image: String,
        what: String,
        reason: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Where a streamed blob upload stands ([`BlobProgress::state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// Bytes are being sent, or the registry's answer is awaited.
    Sending,
    /// The registry has the blob.
    Done,
    /// The upload failed (or was abandoned); the error goes to the pusher's caller.
    Failed,
}

/// One streamed blob upload (a `gkm build` layer, a blob copied by promotion): which blob,
/// its size, and how many bytes of it were handed to the connection so far. Shared (`Arc`)
/// between the [`Pusher`], which adds to it as chunks go out, and whoever shows it.
#[derive(Debug)]
pub struct BlobProgress {
    /// The blob's digest, `sha256:<hex>`.
    pub digest: String,
    /// What the blob is, as the pusher's caller named it (`the layer`, `blob sha256:…`).
    pub what: String,
    /// The blob's size in bytes.
    pub total: u64,
    done: AtomicU64,
    state: AtomicU8,
}

impl BlobProgress {
    fn new(digest: &str, what: &str, total: u64) -> Self {
        Self {
            digest: digest.to_string(),
            what: what.to_string(),
            total,
            done: AtomicU64::new(0),
            state: AtomicU8::new(0),
        }
    }

    /// Bytes of the blob sent so far (at most [`BlobProgress::total`] once the upload ends).
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Whether the upload is under way, done or failed.
    pub fn state(&self) -> BlobState {
        match self.state.load(Ordering::Acquire) {
            0 => BlobState::Sending,
            1 => BlobState::Done,
            _ => BlobState::Failed,
        }
    }

    fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    fn end(&self, state: BlobState) {
        let code = match state {
            BlobState::Sending => 0,
            BlobState::Done => 1,
            BlobState::Failed => 2,
        };
        self.state.store(code, Ordering::Release);
    }
}

/// The streamed uploads of a [`Pusher`] given it with [`Pusher::with_progress`], in the
/// order they started. Blobs the registry already had, and small blobs pushed from memory
/// (configs, signatures), are not listed: they take one quick request. Whoever shows
/// progress (the `gkm` CLI draws one bar per blob) polls [`PushProgress::blobs`].
#[derive(Debug, Default)]
pub struct PushProgress {
    blobs: std::sync::Mutex<Vec<Arc<BlobProgress>>>,
}

impl PushProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every upload started so far, oldest first; an index keeps naming the same blob.
    pub fn blobs(&self) -> Vec<Arc<BlobProgress>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn start(&self, digest: &str, what: &str, total: u64) -> Arc<BlobProgress> {
        let blob = Arc::new(BlobProgress::new(digest, what, total));
        self.blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(blob.clone());
        blob
    }
}

/// Pushes blobs and manifests to registries.
pub struct Pusher {
    client: oci_client::Client,
    creds: Credentials,
    puller: Puller,
    /// Bound on each small registry call (blob checks, config, manifests), and on the
    /// registry's answer once a streamed blob is sent.
    call_timeout: Duration,
    /// Longest time a streamed upload may send nothing.
    stall_timeout: Duration,
    /// Where streamed uploads are reported, when someone shows them.
    progress: Option<Arc<PushProgress>>,
}

impl Pusher {
    /// A pusher that talks plain HTTP to the `insecure` registries (`host[:port]`).
    pub fn new(insecure: Vec<String>, creds: Credentials) -> Self {
        crate::install_crypto();
        let client = oci_client::Client::new(ClientConfig {
            protocol: if insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(insecure.clone())
            },
            // One PUT per blob, streamed: every registry takes it.
            use_monolithic_push: true,
            connect_timeout: Some(Duration::from_secs(10)),
            // No read timeout: reqwest runs it while the request body is still being sent,
            // which would cut every upload longer than the timeout. Small calls are bounded
            // by `bounded`, streamed uploads by their stall watchdog.
            read_timeout: None,
            ..Default::default()
        });
        let puller = Puller::new(
            PullConfig {
                insecure_registries: insecure,
                ..Default::default()
            },
            creds.clone(),
        );
        Self {
            client,
            creds,
            puller,
            call_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(120),
            progress: None,
        }
    }

    /// This pusher, reporting each streamed blob upload into `progress`.
    pub fn with_progress(mut self, progress: Arc<PushProgress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The watchdog's record for a streamed upload, listed in `self.progress` if any.
    fn stream_progress(&self, digest: &str, what: &str, size: u64) -> Progress {
        Progress::new(self.progress.as_ref().map(|p| p.start(digest, what, size)))
    }

    /// The reader with the same registries and credentials.
    pub fn puller(&self) -> &Puller {
        &self.puller
    }

    async fn auth(&self, reference: &Reference) {
        self.client
            .store_auth_if_needed(
                reference.resolve_registry(),
                &self.creds.for_registry(reference.registry()),
            )
            .await;
    }

    async fn bounded<T>(
        &self,
        image: &str,
        what: &str,
        call: impl Future<Output = Result<T, OciDistributionError>>,
    ) -> Result<T, PushError> {
        let err = |reason: String| PushError::Registry {
            image: image.to_string(),
            what: what.to_string(),
            reason,
        };
        tokio::time::timeout(self.call_timeout, call)
            .await
            .map_err(|_| err(format!("timed out after {:?}", self.call_timeout)))?
            .map_err(|e| {
                err(match crate::oci::pull::denial(&e) {
                    Some((status, hint)) => format!("{status} ({hint})"),
                    None => e.to_string(),
                })
            })
    }

    /// Whether `reference`'s repository holds blob `digest`.
    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<bool, PushError> {
        self.auth(reference).await;
        self.bounded(
            &reference.whole(),
            &format!("checking blob {digest}"),
            self.client.blob_exists(reference, digest),
        )
        .await
    }

    /// Pushes `bytes` as a blob of `reference`'s repository unless it is there already.
    pub async fn push_bytes(
        &self,
        reference: &Reference,
        bytes: &[u8],
        what: &str,
    ) -> Result<(), PushError> {
        let digest = sha256_digest(bytes);
        if self.blob_exists(reference, &digest).await? {
            return Ok(());
        }
        let pushed = tokio::time::timeout(
            self.call_timeout,
            self.client.push_blob(reference, bytes.to_vec(), &digest),
        )
        .await
        .unwrap_or_else(|_| {
            Err(OciDistributionError::GenericError(Some(format!(
                "timed out after {:?}",
                self.call_timeout
            ))))
        });
        self.uploaded(reference, &digest, what, pushed).await
    }

    /// Pushes the `size` bytes of the file at `path` as blob `digest` unless it is there.
    pub async fn push_file(
        &self,
        reference: &Reference,
        path: &Path,
        digest: &str,
        size: u64,
        what: &str,
    ) -> Result<(), PushError> {
        if self.blob_exists(reference, digest).await? {
            return Ok(());
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| PushError::Io {
                what: "reading",
                path: path.display().to_string(),
                source,
            })?;
        let progress = self.stream_progress(digest, what, size);
        let stream = file_stream(file, size, progress.clone());
        self.push_stream(reference, stream, progress, digest, size, what)
            .await
    }

    /// Copies blob `digest` of `size` bytes from `source`'s repository to `target`'s,
    /// streamed (never whole in memory; oci-client checks the digest as it reads), unless
    /// `target` has it already. Returns whether bytes were sent.
    pub async fn copy_blob(
        &self,
        source: &Reference,
        target: &Reference,
        digest: &str,
        size: u64,
    ) -> Result<bool, PushError> {
        if self.blob_exists(target, digest).await? {
            return Ok(false);
        }
        self.auth(source).await;
        let desc = OciDescriptor {
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        let what = format!("blob {digest}");
        let body = self
            .bounded(
                &source.whole(),
                &format!("reading {what}"),
                self.client.pull_blob_stream(source, &desc),
            )
            .await?;
        let progress = self.stream_progress(digest, &what, size);
        let p = progress.clone();
        let (mut sent, total) = (0u64, size);
        let stream = body.stream.map(move |chunk| {
            p.touch();
            let chunk = chunk.map_err(OciDistributionError::IoError)?;
            p.advance(chunk.len() as u64);
            sent += chunk.len() as u64;
            if sent >= total {
                p.sent.store(true, Ordering::Release);
            }
            Ok(chunk)
        });
        self.push_stream(target, stream, progress, digest, size, &what)
            .await?;
        Ok(true)
    }

    async fn push_stream(
        &self,
        reference: &Reference,
        stream: impl Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static,
        progress: Progress,
        digest: &str,
        size: u64,
        what: &str,
    ) -> Result<(), PushError> {
        // Failed unless marked done, also when this future is dropped half-way.
        let _ended = progress.ended_on_drop();
        self.auth(reference).await;
        let upload = self
            .client
            .push_blob_stream(reference, stream, digest, Some(size));
        let pushed = tokio::select! {
            r = upload => r,
            stalled = progress.watchdog(self.stall_timeout, self.call_timeout) => {
                Err(OciDistributionError::GenericError(Some(stalled)))
            }
        };
        let result = self.uploaded(reference, digest, what, pushed).await;
        if result.is_ok() {
            progress.end(BlobState::Done);
        }
        result
    }

    /// Checks the outcome of a blob upload. Some registries (go-containerregistry's among
    /// them) answer a completed upload without the `Location` header the distribution spec
    /// asks for; oci-client calls that an error, so the blob's presence decides instead.
    async fn uploaded(
        &self,
        reference: &Reference,
        digest: &str,
        what: &str,
        result: Result<String, OciDistributionError>,
    ) -> Result<(), PushError> {
        let name = reference.whole();
        match result {
            Ok(_) => Ok(()),
            Err(OciDistributionError::RegistryNoLocationError) => {
                if self.blob_exists(reference, digest).await? {
                    Ok(())
                } else {
                    Err(PushError::Registry {
                        image: name,
                        what: format!("uploading {what} {digest}"),
                        reason: "the registry accepted the upload, but does not have the blob"
                            .into(),
                    })
                }
            }
            Err(e) => Err(PushError::Registry {
                image: name,
                what: format!("uploading {what} {digest}"),
                reason: e.to_string(),
            }),
        }
    }

    /// Puts `bytes` (exactly; never re-serialised, so the digest stays) as the manifest of
    /// `reference` (a tag or a digest) with `media_type`.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
        what: &str,
    ) -> Result<(), PushError> {
        // oci-client 0.18 panics when a by-digest manifest PUT is answered without a
        // `Location` header (go-containerregistry's registry does that): it strips the tag
        // from the URL to rebuild it. Naming the digest in the tag position puts the same
        // `PUT /v2/<repo>/manifests/<digest>` on the wire without that path.
        let by_digest;
        let reference = match reference.digest() {
            Some(d) => {
                by_digest = Reference::with_tag(
                    reference.registry().to_string(),
                    reference.repository().to_string(),
                    d.to_string(),
                );
                &by_digest
            }
            None => reference,
        };
        self.auth(reference).await;
        let content_type = media_type.parse().map_err(|_| PushError::Registry {
            image: reference.whole(),
            what: format!("pushing {what}"),
            reason: format!("media type {media_type:?} is not a valid header value"),
        })?;
        self.bounded(
            &reference.whole(),
            &format!("pushing {what}"),
            self.client
                .push_manifest_raw(reference, bytes, content_type),
        )
        .await?;
        Ok(())
    }
}

/// How far a streamed upload got: when it last took a chunk, and whether it took the last;
/// and, when someone shows uploads, its bytes in `blob`.
#[derive(Clone)]
struct Progress {
    last: Arc<std::sync::Mutex<Instant>>,
    sent: Arc<AtomicBool>,
    blob: Option<Arc<BlobProgress>>,
}

impl Progress {
    fn new(blob: Option<Arc<BlobProgress>>) -> Self {
        Self {
            last: Arc::new(std::sync::Mutex::new(Instant::now())),
            sent: Default::default(),
            blob,
        }
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// `bytes` more were handed to the connection.
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.blob {
            b.add(bytes);
        }
    }

    fn end(&self, state: BlobState) {
        if let Some(b) = &self.blob {
            b.end(state);
        }
    }

    /// A guard that marks the upload failed when dropped, unless it was marked done first.
    fn ended_on_drop(&self) -> impl Drop + use<> {
        struct Ended(Option<Arc<BlobProgress>>);
        impl Drop for Ended {
            fn drop(&mut self) {
                if let Some(b) = &self.0
                    && b.state() == BlobState::Sending
                {
                    b.end(BlobState::Failed);
                }
            }
        }
        Ended(self.blob.clone())
    }

    /// Resolves, with the reason, once nothing was taken for `stall` while sending, or the
    /// registry has not answered `answer` after the last byte.
    async fn watchdog(&self, stall: Duration, answer: Duration) -> String {
        loop {
            tokio::time::sleep(Duration::from_secs(1).min(stall)).await;
            let idle = self
                .last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            if self.sent.load(Ordering::Acquire) {
                if idle > answer {
                    return format!("the registry did not answer within {answer:?} of the upload");
                }
            } else if idle > stall {
                return format!("the upload made no progress for {stall:?}");
            }
        }
    }
}

/// The `size` bytes of the file as a stream of 1 MiB chunks, recording progress.
fn file_stream(
    file: tokio::fs::File,
    size: u64,
    progress: Progress,
) -> impl Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static {
    futures::stream::try_unfold((file, 0u64), move |(mut f, done)| {
        let progress = progress.clone();
        async move {
            use tokio::io::AsyncReadExt;
            progress.touch();
            if done >= size {
                return Ok(None);
            }
            let mut buf = vec![0u8; (1 << 20).min(size - done) as usize];
            let n = f
                .read(&mut buf)
                .await
                .map_err(OciDistributionError::IoError)?;
            if n == 0 {
                return Err(OciDistributionError::IoError(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended after {done} of {size} bytes"),
                )));
            }
            buf.truncate(n);
            progress.advance(n as u64);
            let done = done + n as u64;
            if done >= size {
                // The last chunk: from now on the registry's answer is awaited.
                progress.sent.store(true, Ordering::Release);
            }
            Ok(Some((bytes::Bytes::from(buf), (f, done))))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file streamed for upload counts every byte into its listed blob, which stays
    /// `Sending` until the upload ends, and reads `Failed` if it ends without being done.
    #[tokio::test]
    async fn streamed_bytes_are_counted_into_the_listed_blob() {
        let path = std::env::temp_dir().join(format!("gkm-push-progress-{}", std::process::id()));
        let size = (2 << 20) + 123;
        std::fs::write(&path, vec![7u8; size]).unwrap();
        let shown = PushProgress::new();
        let progress = Progress::new(Some(shown.start("sha256:ab", "the layer", size as u64)));
        let file = tokio::fs::File::open(&path).await.unwrap();
        let chunks: Vec<_> = file_stream(file, size as u64, progress.clone())
            .collect()
            .await;
        std::fs::remove_file(&path).unwrap();
        assert_eq!(chunks.len(), 3);
        let blobs = shown.blobs();
        assert_eq!(blobs.len(), 1);
        let blob = &blobs[0];
        assert_eq!(
            (blob.digest.as_str(), blob.what.as_str()),
            ("sha256:ab", "the layer")
        );
        assert_eq!((blob.done(), blob.total), (size as u64, size as u64));
        assert_eq!(blob.state(), BlobState::Sending);
        drop(progress.ended_on_drop());
        assert_eq!(blob.state(), BlobState::Failed);

        // Marked done first, the guard leaves it done; unlisted uploads count nothing.
        let done = Progress::new(Some(shown.start("sha256:cd", "blob sha256:cd", 1)));
        let guard = done.ended_on_drop();
        done.end(BlobState::Done);
        drop(guard);
        assert_eq!(shown.blobs()[1].state(), BlobState::Done);
        let unlisted = Progress::new(None);
        unlisted.advance(5);
        unlisted.end(BlobState::Done);
        assert_eq!(shown.blobs().len(), 2);
    }
}
