//! OCI images: references, registry credentials, digest-pinned pulls, the hardened
//! streaming extraction of their layers, and pushes (blobs, manifests, cross-registry
//! copies by digest).
//!
//! Nodes never resolve tags: [`PinnedRef`] only exists with a digest, and every manifest and
//! blob fetched through [`Puller`] is checked against the digest that named it.

pub mod auth;
pub mod extract;
pub mod image;
pub mod pull;
pub mod push;
pub mod reference;
pub mod source;

pub use auth::Credentials;
pub use extract::{Compression, ExtractError, Limits, Totals, Unsafe};
pub use image::{CacheLayout, ImageInfo};
pub use pull::{PullConfig, PullError, PullProgress, Puller};
pub use push::{BlobProgress, BlobState, PushError, PushProgress, Pusher};
pub use source::{Fault, ImageSource, InMemoryRegistry};

use std::fmt;

pub use oci_client::Reference;

/// An image reference that could not be parsed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("{reference:?} is not a valid image reference: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("{0:?} is not pinned by digest: nodes pull by digest only (REPO@sha256:<64 hex>)")]
    NotPinned(String),
    #[error(
        "{reference:?} has digest {digest:?}, but only sha256 digests of 64 hex digits are accepted"
    )]
    BadDigest { reference: String, digest: String },
}

/// Parses an image reference (registry with port, nested path, tag, digest), as oci-spec
/// does but without its regular expression ([`reference`]).
pub fn parse_reference(s: &str) -> Result<Reference, RefError> {
    reference::parse(s).map_err(|e| RefError::Invalid {
        reference: s.to_string(),
        reason: e.to_string(),
    })
}

/// The digest check GKM applies everywhere (defined in the API crate, which needs it for
/// the annotation).
pub use crate::api::sha256_hex;

/// A reference pinned to a sha256 digest: `registry/repo@sha256:…` (any tag is dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedRef {
    reference: Reference,
}

impl PinnedRef {
    /// Parses `s`, which must carry a digest.
    pub fn parse(s: &str) -> Result<Self, RefError> {
        let r = parse_reference(s)?;
        let Some(digest) = r.digest() else {
            return Err(RefError::NotPinned(s.to_string()));
        };
        Self::new(&r, digest).map_err(|e| match e {
            RefError::BadDigest { digest, .. } => RefError::BadDigest {
                reference: s.to_string(),
                digest,
            },
            e => e,
        })
    }

    /// `repo` (its tag, if any, ignored) at `digest`.
    pub fn new(repo: &Reference, digest: &str) -> Result<Self, RefError> {
        if sha256_hex(digest).is_none() {
            return Err(RefError::BadDigest {
                reference: repo.whole(),
                digest: digest.to_string(),
            });
        }
        Ok(Self {
            reference: Reference::with_digest(
                repo.registry().to_string(),
                repo.repository().to_string(),
                digest.to_string(),
            ),
        })
    }

    pub fn digest(&self) -> &str {
        self.reference
            .digest()
            .expect("a pinned reference has a digest")
    }

    /// The 64 hex digits of the digest.
    pub fn hex(&self) -> &str {
        sha256_hex(self.digest()).expect("checked at construction")
    }

    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    pub fn as_reference(&self) -> &Reference {
        &self.reference
    }

    /// The same repository at another digest (a platform manifest of an index).
    pub(crate) fn at(&self, digest: &str) -> Result<Self, RefError> {
        Self::new(&self.reference, digest)
    }
}

impl fmt::Display for PinnedRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}@{}",
            self.registry(),
            self.repository(),
            self.digest()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_registry_ports_nested_paths_tags_and_digests() {
        let r = parse_reference("127.0.0.1:5000/team/kernels/llama:v1").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "team/kernels/llama", Some("v1"))
        );
        let p = PinnedRef::parse(&format!("quay.io/gkm/cache:tag@{D}")).unwrap();
        assert_eq!(
            p.to_string(),
            format!("quay.io/gkm/cache@{D}"),
            "the tag is dropped"
        );
        assert_eq!(p.hex(), &D[7..]);
    }

    #[test]
    fn rejects_what_does_not_parse_or_is_not_pinned() {
        for bad in ["", "UPPER/case:tag", "a b", "reg:5000/x@sha256:zz"] {
            assert!(PinnedRef::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            PinnedRef::parse("quay.io/gkm/cache:v1"),
            Err(RefError::NotPinned("quay.io/gkm/cache:v1".into()))
        );
        let short = "quay.io/x@sha512:".to_string() + &"a".repeat(128);
        assert!(matches!(
            PinnedRef::parse(&short),
            Err(RefError::BadDigest { .. })
        ));
    }

    #[test]
    fn sha256_hex_is_strict() {
        assert!(sha256_hex(D).is_some());
        assert!(sha256_hex(&D.to_uppercase()).is_none());
        assert!(sha256_hex("sha256:abc").is_none());
    }
}
