//! cosign's tag format: the manifest under `<repo>:sha256-<hex>.sig`, one layer per
//! signature, each layer a simple-signing payload with its signature (and, for keyless, the
//! certificate and Rekor bundle) in annotations.
//!
//! Owns the names of that format and the claim check on the payload: the payload must be a
//! cosign container image signature whose `critical.image.docker-manifest-digest` is the
//! image's digest. `critical.identity.docker-reference` is not compared, as cosign does not
//! either: promotion copies an image with its signatures to another repository.

use serde::Deserialize;

/// Media type of a signature layer (the payload blob).
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Base64 of the signature over the exact payload bytes.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// PEM of the signing certificate (keyless).
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// JSON of the Rekor bundle (keyless): SignedEntryTimestamp and the log entry.
pub const BUNDLE_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
/// `critical.type` of every cosign image signature payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

/// The tag that holds the signatures of `digest` (`sha256:<hex>` → `sha256-<hex>.sig`).
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replace(':', "-"))
}

/// Why `tag` is reserved for artifacts, or `None` when it is an ordinary tag.
///
/// Tags of the form `<algorithm>-<64 hex>`, alone or with a `.suffix`, name the artifacts
/// of the image whose digest they spell: cosign's signatures (`.sig`), attestations
/// (`.att`) and SBOMs (`.sbom`), and the OCI referrers fallback index (no suffix; longer
/// digests are cut to 64 characters). Writing an image there replaces another digest's
/// artifacts, so GKM never sets such a tag on request.
pub fn reserved_tag(tag: &str) -> Option<String> {
    let (algorithm, rest) = tag.split_once('-')?;
    if !matches!(algorithm, "sha256" | "sha384" | "sha512") {
        return None;
    }
    let (hex, suffix) = match rest.split_once('.') {
        Some((hex, suffix)) => (hex, Some(suffix)),
        None => (rest, None),
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let digest = format!("{algorithm}:{hex}");
    Some(match suffix {
        None => format!("it is the OCI referrers fallback tag of {digest}"),
        Some("sig") => format!("it is cosign's signature tag of {digest}"),
        Some("att") => format!("it is cosign's attestation tag of {digest}"),
        Some("sbom") => format!("it is cosign's SBOM tag of {digest}"),
        Some(other) => format!("it has the form of an artifact tag (.{other}) of {digest}"),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not simple-signing JSON: {0}")]
    NotJson(String),
    #[error("payload type is {0:?}, not {PAYLOAD_TYPE:?}")]
    WrongType(String),
    #[error("payload is a signature of {got}, not of this image ({want})")]
    OtherDigest { want: String, got: String },
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    #[serde(rename = "type")]
    kind: String,
    image: ImageClaim,
}

#[derive(Deserialize)]
struct ImageClaim {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// Checks that `payload` claims to sign `digest`.
pub fn check_payload(payload: &[u8], digest: &str) -> Result<(), PayloadError> {
    let p: Payload =
        serde_json::from_slice(payload).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    if p.critical.kind != PAYLOAD_TYPE {
        return Err(PayloadError::WrongType(p.critical.kind));
    }
    if p.critical.image.digest != digest {
        return Err(PayloadError::OtherDigest {
            want: digest.to_string(),
            got: p.critical.image.digest,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:3adf18e5ca127807c16d3d099021bf087018731026c358ae5f073ee2e3ff8a49";

    #[test]
    fn reads_cosign_payloads() {
        // Byte for byte what cosign v3.1.2 writes.
        let p = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"127.0.0.1:5055/demo/app"}},"image":{{"docker-manifest-digest":"{D}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        assert_eq!(check_payload(p.as_bytes(), D), Ok(()));
        let other = D.replace("3adf", "0000");
        assert!(matches!(
            check_payload(p.as_bytes(), &other),
            Err(PayloadError::OtherDigest { .. })
        ));
        let typed = p.replace(
            "cosign container image signature",
            "atomic container signature",
        );
        assert!(matches!(
            check_payload(typed.as_bytes(), D),
            Err(PayloadError::WrongType(_))
        ));
        assert!(check_payload(b"{}", D).is_err());
    }

    #[test]
    fn tags_of_artifacts_are_reserved_and_others_are_not() {
        let hex = &D[7..];
        for (tag, why) in [
            (format!("sha256-{hex}"), "referrers fallback tag of sha256:"),
            (format!("sha256-{hex}.sig"), "signature tag of sha256:"),
            (format!("sha256-{hex}.att"), "attestation tag"),
            (format!("sha256-{hex}.sbom"), "SBOM tag"),
            (format!("sha256-{hex}.x"), "artifact tag (.x)"),
            (format!("sha512-{hex}"), "fallback tag of sha512:"),
            (
                format!("sha256-{}.sig", hex.to_uppercase()),
                "signature tag",
            ),
        ] {
            let reason = reserved_tag(&tag).unwrap_or_else(|| panic!("{tag} is reserved"));
            assert!(reason.contains(why), "{tag}: {reason}");
        }
        for tag in [
            "v1".to_string(),
            "latest".into(),
            format!("sha256-{}", &hex[1..]),
            format!("sha256-{hex}0"),
            format!("md5-{hex}"),
            format!("sha256_{hex}.sig"),
            format!("sha256-{}g.sig", &hex[1..]),
            format!("v-{hex}"),
        ] {
            assert_eq!(reserved_tag(&tag), None, "{tag}");
        }
    }

    #[test]
    fn names_the_signature_tag() {
        assert_eq!(
            signature_tag(D),
            "sha256-3adf18e5ca127807c16d3d099021bf087018731026c358ae5f073ee2e3ff8a49.sig"
        );
    }
}
