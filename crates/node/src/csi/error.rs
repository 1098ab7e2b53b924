//! CSI errors and the one table that maps them to gRPC status codes.

use std::path::PathBuf;
use std::time::Duration;

use tonic::{Code, Status};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("target path {path:?} {reason}")]
    BadTargetPath { path: String, reason: &'static str },
    #[error("volume capability: {0}")]
    BadCapability(String),
    #[error("volume attributes: {0}")]
    BadAttributes(String),
    #[error("{kind} {cache} not found")]
    NotFound { kind: &'static str, cache: String },
    #[error("pod {pod} may not mount {kind} {cache}: {reason}")]
    Denied {
        pod: String,
        kind: &'static str,
        cache: String,
        reason: String,
    },
    #[error(
        "{kind} {cache} has no verified digest yet (the admission webhook sets gkm.io/resolvedDigest)"
    )]
    NotVerified { kind: &'static str, cache: String },
    #[error("{cache} ({digest}) is not compatible with any GPU of node {node}: {}", reasons.join("; "))]
    Incompatible {
        cache: String,
        digest: String,
        node: String,
        reasons: Vec<String>,
    },
    #[error("{cache} ({digest}) carries no GPU targets, and this node only accepts caches that do")]
    NoGpuClaim { cache: String, digest: String },
    #[error("{cache} ({digest}) is still being pulled after {after:?}; kubelet will retry")]
    StillExtracting {
        cache: String,
        digest: String,
        after: Duration,
    },
    #[error("cannot use {cache}: {source}")]
    Store {
        cache: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot look up caches: {0}")]
    ResolverUnavailable(String),
    #[error("{0}")]
    Credentials(#[source] crate::pull_credentials::CredentialsError),
    #[error("volume {volume} is already published at {existing}, not {requested}")]
    AlreadyPublished {
        volume: String,
        existing: PathBuf,
        requested: PathBuf,
    },
    #[error("an operation on volume {0} is already in progress")]
    Busy(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume records: {0}")]
    Records(#[source] Box<StoreError>),
    #[error("volume_id {prefix:?}… is {len} bytes; CSI allows at most 128")]
    VolumeIdTooLong { prefix: String, len: usize },
    #[error(
        "target path {target} already has a mount GKM did not make ({what}); GKM neither mounts over nor removes it"
    )]
    ForeignMount { target: PathBuf, what: String },
}

impl CsiError {
    /// The gRPC code of each error: the only place this decision is made.
    pub fn code(&self) -> Code {
        match self {
            CsiError::Missing(_)
            | CsiError::VolumeIdTooLong { .. }
            | CsiError::BadTargetPath { .. }
            | CsiError::BadCapability(_)
            | CsiError::BadAttributes(_) => Code::InvalidArgument,
            CsiError::NotFound { .. } => Code::NotFound,
            CsiError::Denied { .. } => Code::PermissionDenied,
            CsiError::Incompatible { .. }
            | CsiError::NoGpuClaim { .. }
            | CsiError::ForeignMount { .. } => Code::FailedPrecondition,
            // Kubelet retries these; the condition is expected to pass.
            CsiError::NotVerified { .. }
            | CsiError::StillExtracting { .. }
            | CsiError::ResolverUnavailable(_) => Code::Unavailable,
            CsiError::Store { source, .. } => match source.as_ref() {
                StoreError::Pull(p) if p.is_retryable() => Code::Unavailable,
                // The image itself is unusable (refused entry, digest mismatch, not found).
                StoreError::Pull(_) | StoreError::BadDigest(_) => Code::FailedPrecondition,
                _ => Code::Internal,
            },
            // A pod arriving, a Secret fixed or the controller back changes these.
            CsiError::Credentials(e) if e.is_retryable() => Code::Unavailable,
            CsiError::Credentials(_) => Code::FailedPrecondition,
            CsiError::AlreadyPublished { .. } => Code::AlreadyExists,
            CsiError::Busy(_) => Code::Aborted,
            CsiError::Io { .. } | CsiError::Records(_) => Code::Internal,
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CsiError::Missing(_) => "missing_field",
            CsiError::BadTargetPath { .. } => "bad_target_path",
            CsiError::BadCapability(_) => "bad_capability",
            CsiError::BadAttributes(_) => "bad_attributes",
            CsiError::NotFound { .. } => "not_found",
            CsiError::Denied { .. } => "denied",
            CsiError::NotVerified { .. } => "not_verified",
            CsiError::Incompatible { .. } => "incompatible",
            CsiError::NoGpuClaim { .. } => "no_gpu_claim",
            CsiError::StillExtracting { .. } => "still_extracting",
            CsiError::Store { .. } => "store",
            CsiError::ResolverUnavailable(_) => "resolver_unavailable",
            CsiError::Credentials(_) => "pull_credentials",
            CsiError::AlreadyPublished { .. } => "already_published",
            CsiError::Busy(_) => "busy",
            CsiError::Io { .. } => "io",
            CsiError::Records(_) => "records",
            CsiError::VolumeIdTooLong { .. } => "volume_id_too_long",
            CsiError::ForeignMount { .. } => "foreign_mount",
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
