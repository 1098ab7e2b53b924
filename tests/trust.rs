//! Signature verification against a real registry and real cosign signatures, and keyless
//! signatures built offline around a stand-in Fulcio and Rekor ([`FakeSigstore`]), with
//! forgeries that must be denied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use gkm::oci::{Credentials, PinnedRef, PullConfig, Puller, Reference};
use gkm::trust::tag::{
    BUNDLE_ANNOTATION, CERTIFICATE_ANNOTATION, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE,
    signature_tag,
};
use gkm::trust::{
    MAX_SIGNATURE_CHECKS, MAX_SIGNATURE_FETCHES, SignatureFormat, TrustPolicy, Verified, Verifier,
    VerifyError,
};
use gkm_testenv::cosign::{FakeSigstore, KeylessSigner, San};
use gkm_testenv::faulty::StaticRegistry;
use gkm_testenv::image::{
    self, Compression, ImageBuilder, LayerBuilder, MediaTypes, OCI_INDEX, OCI_MANIFEST, PushedImage,
};
use gkm_testenv::{Cosign, Registry, shared_registry, unique_name};
use sha2::{Digest, Sha256};

const BUNDLE_MT: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const ISSUER: &str = "https://token.actions.githubusercontent.com";
const WORKFLOW: &str =
    "https://github.com/gkm-dev/kernels/.github/workflows/build.yaml@refs/heads/main";

fn fixture(name: &str) -> std::path::PathBuf {
    gkm_testenv::workspace_root()
        .join("tests/fixtures/trust")
        .join(name)
}

/// A small image with unique content, pushed to `repo` (a fresh name when None).
async fn push_image(registry: &Registry, repo: &str) -> (String, PushedImage) {
    let mut layer = LayerBuilder::new();
    layer.file(
        "io.triton.cache/kernel.json",
        unique_name("content").as_bytes(),
        0o644,
    );
    let pushed = ImageBuilder::new(MediaTypes::Oci)
        .layer(layer.finish(Compression::Gzip, MediaTypes::Oci))
        .push(registry, repo, Some("v1"))
        .await
        .unwrap();
    (repo.to_string(), pushed)
}

fn pull_config(hosts: &[&str]) -> PullConfig {
    PullConfig {
        insecure_registries: hosts.iter().map(|h| h.to_string()).collect(),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn key_authority(name: &str, pem: &str) -> String {
    let body: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    format!("  - name: {name}\n    key: |\n{body}")
}

fn keyless_authority(name: &str, subject_line: &str, root: &Path) -> String {
    format!(
        "  - name: {name}\n    keyless:\n      issuer: {ISSUER}\n      {subject_line}\n      trustedRoot: {}\n",
        root.display()
    )
}

fn policy(authorities: &[String], trusted: &[&str], extra: &str) -> TrustPolicy {
    let yaml = format!(
        "authorities:\n{}trustedRegistries: [{}]\n{extra}",
        authorities.concat(),
        trusted.join(", ")
    );
    TrustPolicy::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn verifier(policy: TrustPolicy, registry: &Registry) -> Verifier {
    Verifier::with_config(
        policy,
        pull_config(&[registry.host()]),
        Credentials::anonymous(),
    )
}

/// A verifier of `registry` trusting `cosign`'s key as authority `k` (`extra`: more policy).
fn key_verifier(cosign: &Cosign, registry: &Registry, extra: &str) -> Verifier {
    let k = key_authority("k", &cosign.public_key_pem().unwrap());
    verifier(policy(&[k], &[registry.host()], extra), registry)
}

fn puller(registry: &Registry) -> Puller {
    Puller::new(pull_config(&[registry.host()]), Credentials::anonymous())
}

fn pinned(p: &PushedImage) -> PinnedRef {
    PinnedRef::parse(&p.by_digest()).unwrap()
}

fn denied(r: Result<Verified, VerifyError>) -> VerifyError {
    match r {
        Ok(v) => panic!("verification should have been denied, got {v:?}"),
        Err(e) => e,
    }
}

#[test]
fn the_verifier_can_be_shared_across_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Verifier>();
    shared::<Arc<Verifier>>();
}

#[tokio::test]
async fn key_signed_tag_format_verifies_for_ecdsa_rsa_and_ed25519() {
    let registry = shared_registry();
    let signers = [
        ("ecdsa-p256", Cosign::generate().await.unwrap()),
        (
            "rsa-3072",
            Cosign::import(&fixture("rsa-3072.key")).await.unwrap(),
        ),
        // cosign signs images with Ed25519ph (pre-hashed), not pure Ed25519.
        (
            "ed25519",
            Cosign::import(&fixture("ed25519.key")).await.unwrap(),
        ),
    ];
    let authorities: Vec<String> = signers
        .iter()
        .map(|(n, c)| key_authority(n, &c.public_key_pem().unwrap()))
        .collect();
    let v = verifier(policy(&authorities, &[registry.host()], ""), registry);
    for (name, cosign) in &signers {
        let (_, img) = push_image(registry, &unique_name(&format!("trust/tag-{name}"))).await;
        cosign.sign(&img.by_digest()).await.unwrap();
        let got = v.verify(&pinned(&img)).await.unwrap();
        assert_eq!(
            (got.digest.as_str(), got.authority.as_str(), got.format),
            (img.digest.as_str(), *name, SignatureFormat::Tag)
        );
        assert!(
            matches!(got.evidence, gkm::trust::Evidence::Layer { .. }),
            "{got:?}"
        );
    }
}

#[tokio::test]
async fn bundle_format_verifies_through_the_referrers_fallback_tag() {
    let registry = shared_registry();
    let signers = [
        ("ecdsa-p256", Cosign::generate().await.unwrap()),
        (
            "rsa-3072",
            Cosign::import(&fixture("rsa-3072.key")).await.unwrap(),
        ),
        (
            "ed25519",
            Cosign::import(&fixture("ed25519.key")).await.unwrap(),
        ),
    ];
    let authorities: Vec<String> = signers
        .iter()
        .map(|(n, c)| key_authority(n, &c.public_key_pem().unwrap()))
        .collect();
    let v = verifier(policy(&authorities, &[registry.host()], ""), registry);
    for (name, cosign) in &signers {
        let (repo, img) = push_image(registry, &unique_name(&format!("trust/bundle-{name}"))).await;
        cosign.sign_bundle(&img.by_digest()).await.unwrap();
        // crane has no referrers API: cosign wrote the fallback tag and no `.sig` tag.
        let p = puller(registry);
        let at = |tag: String| Reference::with_tag(registry.host().into(), repo.clone(), tag);
        let fallback = img.digest.replace(':', "-");
        assert!(
            p.fetch_manifest_bytes(&at(fallback), 1 << 20)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            p.fetch_manifest_bytes(&at(signature_tag(&img.digest)), 1 << 20)
                .await
                .unwrap()
                .is_none()
        );
        let got = v.verify(&pinned(&img)).await.unwrap();
        assert_eq!(
            (got.authority.as_str(), got.format),
            (*name, SignatureFormat::Bundle)
        );
    }
}

#[tokio::test]
async fn unsigned_images_are_denied() {
    let registry = shared_registry();
    let cosign = Cosign::generate().await.unwrap();
    let (_, img) = push_image(registry, &unique_name("trust/unsigned")).await;
    let v = verifier(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        registry,
    );
    let e = denied(v.verify(&pinned(&img)).await);
    assert!(matches!(e, VerifyError::NoSignatures { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("no signatures found for {}", img.by_digest())
    );
}

#[tokio::test]
async fn signatures_by_an_unknown_key_are_denied_in_both_formats() {
    let registry = shared_registry();
    let (signer, trusted) = (
        Cosign::generate().await.unwrap(),
        Cosign::generate().await.unwrap(),
    );
    let (_, img) = push_image(registry, &unique_name("trust/unknown-key")).await;
    signer.sign(&img.by_digest()).await.unwrap();
    signer.sign_bundle(&img.by_digest()).await.unwrap();
    let v = verifier(
        policy(
            &[key_authority("release", &trusted.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        registry,
    );
    let e = denied(v.verify(&pinned(&img)).await);
    let VerifyError::NotVerified { rejected, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(
        rejected.len(),
        2,
        "one tag-format signature and one bundle: {e}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&img.by_digest()), "{msg}");
    assert!(msg.contains("tag-format signature 1 of 1"), "{msg}");
    assert!(msg.contains("bundle 1 of 1"), "{msg}");
    assert_eq!(
        msg.matches("authority \"release\": signature does not verify")
            .count(),
        2,
        "{msg}"
    );
    // The right key verifies the very same signatures.
    let v = verifier(
        policy(
            &[key_authority("signer", &signer.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        registry,
    );
    assert_eq!(v.verify(&pinned(&img)).await.unwrap().authority, "signer");
}

/// Copies the `.sig` manifest of `from` to the signature tag of `to` (same repository).
async fn copy_signature_tag(registry: &Registry, repo: &str, from: &str, to: &str) {
    let src = Reference::with_tag(registry.host().into(), repo.into(), signature_tag(from));
    let (bytes, _) = puller(registry)
        .fetch_manifest_bytes(&src, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    image::push_manifest(registry, repo, &signature_tag(to), OCI_MANIFEST, &bytes)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_genuine_signature_of_another_digest_is_denied() {
    let registry = shared_registry();
    let cosign = Cosign::generate().await.unwrap();
    let repo = unique_name("trust/other-digest");
    let (_, signed) = push_image(registry, &repo).await;
    let (_, unsigned) = push_image(registry, &repo).await;
    cosign.sign(&signed.by_digest()).await.unwrap();
    // The attacker files the signed image's signature under the other image's tag.
    copy_signature_tag(registry, &repo, &signed.digest, &unsigned.digest).await;
    let v = verifier(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        registry,
    );
    assert!(v.verify(&pinned(&signed)).await.is_ok());
    let e = denied(v.verify(&pinned(&unsigned)).await).to_string();
    assert!(
        e.contains(&format!(
            "payload is a signature of {}, not of this image",
            signed.digest
        )),
        "{e}"
    );
    assert!(e.contains("does verify under authority \"k\""), "{e}");
}

#[tokio::test]
async fn a_bundle_about_another_digest_is_denied() {
    let registry = shared_registry();
    let cosign = Cosign::generate().await.unwrap();
    let repo = unique_name("trust/other-bundle");
    let (_, signed) = push_image(registry, &repo).await;
    let (_, target) = push_image(registry, &repo).await;
    cosign.sign_bundle(&signed.by_digest()).await.unwrap();
    let p = puller(registry);
    let at = |r: String| Reference::with_tag(registry.host().into(), repo.clone(), r);
    let (index, _) = p
        .fetch_manifest_bytes(&at(signed.digest.replace(':', "-")), 1 << 20)
        .await
        .unwrap()
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let referrer = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let referrer = Reference::with_digest(registry.host().into(), repo.clone(), referrer);
    let (manifest, _) = p
        .fetch_manifest_bytes(&referrer, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    // 1. The genuine referrer listed under the target's fallback tag: its subject says no.
    let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    push_index(registry, &repo, &target.digest, &[(&manifest, BUNDLE_MT)]).await;
    let v = verifier(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        registry,
    );
    let e = denied(v.verify(&pinned(&target)).await).to_string();
    assert!(e.contains("the referrer's subject is"), "{e}");
    // 2. A referrer whose (unsigned) subject is rewritten to the target: the signed
    //    statement still names the other image.
    m["subject"]["digest"] = target.digest.clone().into();
    m["subject"]["size"] = target.manifest.len().into();
    let forged = serde_json::to_vec(&m).unwrap();
    let forged_digest = image::sha256_digest(&forged);
    image::push_manifest(registry, &repo, &forged_digest, OCI_MANIFEST, &forged)
        .await
        .unwrap();
    push_index(registry, &repo, &target.digest, &[(&forged, BUNDLE_MT)]).await;
    let e = denied(v.verify(&pinned(&target)).await).to_string();
    assert!(
        e.contains(&format!(
            "statement is about sha256:{}",
            &signed.digest[7..]
        )),
        "{e}"
    );
    assert!(e.contains("does verify under authority \"k\""), "{e}");
}

#[tokio::test]
async fn a_payload_naming_this_digest_with_a_signature_over_other_bytes_is_denied() {
    let registry = shared_registry();
    let cosign = Cosign::generate().await.unwrap();
    let repo = unique_name("trust/forged-payload");
    let (_, signed) = push_image(registry, &repo).await;
    let (_, target) = push_image(registry, &repo).await;
    cosign.sign(&signed.by_digest()).await.unwrap();
    // A genuine signature from the signed image's layer, over a payload rewritten to name
    // the target digest.
    let layers = signature_layers(registry, &repo, &signed).await;
    let sig = layers[0]["annotations"][SIGNATURE_ANNOTATION]
        .as_str()
        .unwrap();
    let payload = cosign_payload(&format!("{}/{repo}", registry.host()), &target.digest);
    push_signature_tag(
        registry,
        &repo,
        &target.digest,
        &[(
            payload.into_bytes(),
            BTreeMap::from([(SIGNATURE_ANNOTATION.to_string(), sig.to_string())]),
        )],
    )
    .await;
    let v = verifier(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        registry,
    );
    let e = denied(v.verify(&pinned(&target)).await).to_string();
    assert!(
        e.contains("authority \"k\": signature does not verify"),
        "{e}"
    );
}

#[tokio::test]
async fn a_payload_blob_that_does_not_match_its_digest_is_refused() {
    // A registry that serves other bytes than the descriptor's digest (real ones cannot).
    let digest = format!("sha256:{}", "ab".repeat(32));
    let repo = "trust/lying";
    let honest = cosign_payload(&format!("x/{repo}"), &digest);
    let served = honest.replace("null", "{}  ");
    assert_eq!(served.len(), honest.len(), "same size, other bytes");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2, "digest": image::sha256_digest(b"{}")},
        "layers": [{
            "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
            "size": honest.len(),
            "digest": image::sha256_digest(honest.as_bytes()),
            // A well-formed ECDSA signature (r = s = 1), so the payload is fetched.
            "annotations": {SIGNATURE_ANNOTATION: "MAYCAQECAQE="},
        }],
    });
    let mut paths = HashMap::new();
    paths.insert(
        format!("/v2/{repo}/manifests/{}", signature_tag(&digest)),
        (OCI_MANIFEST.to_string(), manifest.to_string().into_bytes()),
    );
    paths.insert(
        format!(
            "/v2/{repo}/blobs/{}",
            image::sha256_digest(honest.as_bytes())
        ),
        (
            "application/octet-stream".to_string(),
            served.clone().into_bytes(),
        ),
    );
    let lying = StaticRegistry::start(paths).await.unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let v = Verifier::with_config(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[lying.host()],
            "",
        ),
        pull_config(&[lying.host()]),
        Credentials::anonymous(),
    );
    let e = denied(
        v.verify_reference(&format!("{}/{repo}@{digest}", lying.host()))
            .await,
    )
    .to_string();
    assert!(e.contains("payload unreadable"), "{e}");
    assert!(
        e.contains(&image::sha256_digest(honest.as_bytes()))
            && e.contains(&image::sha256_digest(served.as_bytes())),
        "names both digests: {e}"
    );
}

#[tokio::test]
async fn images_outside_the_trusted_registries_are_denied_without_a_registry_call() {
    let registry = Registry::start().await.unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let (_, img) = push_image(&registry, "teamx/cache").await;
    cosign.sign(&img.by_digest()).await.unwrap();
    let trusted = format!("{}/team", registry.host());
    let v = verifier(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[&trusted],
            "",
        ),
        &registry,
    );
    let before = registry.request_log().lines().count();
    let e = denied(v.verify(&pinned(&img)).await);
    assert!(matches!(e, VerifyError::UntrustedRegistry { .. }), "{e:?}");
    assert!(e.to_string().contains(&img.by_digest()), "{e}");
    assert!(e.to_string().contains(&trusted), "{e}");
    let after: Vec<String> = registry
        .request_log()
        .lines()
        .skip(before)
        .map(String::from)
        .collect();
    assert!(after.iter().all(|l| !l.contains("/v2/teamx")), "{after:?}");
    // The same image in the trusted repository verifies (prefix boundary: team/…).
    let (_, inside) = push_image(&registry, "team/cache").await;
    cosign.sign(&inside.by_digest()).await.unwrap();
    assert!(v.verify(&pinned(&inside)).await.is_ok());
}

#[test]
fn every_policy_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ecdsa = std::fs::read_to_string(fixture("p384.pub")).unwrap();
    let rsa_small = std::fs::read_to_string(fixture("rsa-1024.pub")).unwrap();
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    };
    let yaml = format!(
        r#"authorities:
  - name: not-pem
    key: hello
  - name: both
    key: x
    keyless: {{issuer: a, subject: b, trustedRoot: r.json}}
  - name: bad-regexp
    keyless:
      issuer: {ISSUER}
      subjectRegExp: "(unclosed"
      trustedRoot: missing.json
  - name: small-rsa
    key: |
{}  - name: p384
    key: |
{}  - name: not-pem
    key: hello
  - keyless: {{issuer: x}}
trustedRegistries: [reg.io/team, "https://reg.io/x", team/x]
verification: {{timeoutSeconds: 30, cacheTTLSeconds: soon}}
podPolicy: {{namespaces: ["ML_*"], requireDigest: "yes"}}
promotion: {{incoming: reg.io/incoming}}
verifcation: {{}}
"#,
        indent(&rsa_small),
        indent(&ecdsa)
    );
    let e = TrustPolicy::from_yaml(&yaml, dir.path()).unwrap_err();
    let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
    let expect = [
        "authorities[0].key: not a PEM public key",
        "authorities[1]: has both key and keyless",
        "authorities[2].keyless.subjectRegExp: not a valid regular expression",
        "authorities[2].keyless.trustedRoot:",
        "authorities[3].key: RSA key of 1024 bits is too small",
        "authorities[4].key: unsupported key type ECDSA P-384",
        "authorities[6].name: is required",
        "authorities[6].keyless: needs subject or subjectRegExp",
        "authorities[6].keyless.trustedRoot: is required",
        "trustedRegistries[1]: \"https://reg.io/x\" has a scheme",
        "trustedRegistries[2]: \"team/x\" does not start with a registry host",
        "verification.timeoutSeconds: 30 is out of range",
        "verification.cacheTTLSeconds: must be a whole number of seconds",
        "podPolicy.namespaces[0]: \"ML_*\" is not a namespace glob",
        "podPolicy.requireDigest: must be true or false",
        "promotion.trusted: is required",
        "verifcation: unknown field",
    ];
    for want in expect {
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "missing {want:?} in:\n{e}"
        );
    }
    assert!(
        problems
            .iter()
            .any(|p| p.contains("authorities[5].name") && p.contains("authorities[0]")),
        "duplicate name:\n{e}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("trust policy has {} problem(s):", problems.len()))
    );
}

#[test]
fn a_valid_policy_reads_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigstore::new().unwrap();
    std::fs::write(dir.path().join("root.json"), fake.trusted_root_json()).unwrap();
    let ed_pub = std::fs::read_to_string(fixture("ed25519.pub")).unwrap();
    let yaml = format!(
        "authorities:\n{}  - name: ci\n    keyless:\n      issuer: {ISSUER}\n      subjectRegExp: https://github\\.com/gkm-dev/.*\n      trustedRoot: root.json\ntrustedRegistries: [reg.io/team, \"localhost:5000\"]\nverification: {{timeoutSeconds: 5, cacheTTLSeconds: 0}}\npodPolicy: {{namespaces: [\"ml-*\"], verifySignatures: true}}\npromotion: {{incoming: in.reg.io/dev, trusted: reg.io/team, allowedGroups: [release], signKey: promote.key}}\n",
        key_authority("ed", &ed_pub)
    );
    let p = TrustPolicy::from_yaml(&yaml, dir.path()).unwrap();
    assert_eq!(p.authorities.len(), 2);
    assert_eq!(p.verification.timeout, Duration::from_secs(5));
    assert!(p.verification.cache_ttl.is_zero());
    assert!(
        p.pod_policy.covers("ml-train")
            && p.pod_policy.require_digest
            && p.pod_policy.verify_signatures
    );
    let promo = p.promotion.unwrap();
    assert_eq!(promo.sign_key.unwrap(), dir.path().join("promote.key"));
    assert_eq!(promo.allowed_groups, vec!["release".to_string()]);
    let r = gkm::oci::parse_reference("reg.io/team/kernels@sha256:0000000000000000000000000000000000000000000000000000000000000000").unwrap();
    assert!(p.trusted_registries.iter().any(|t| t.matches_reference(&r)));
}

#[tokio::test]
async fn successful_verifications_are_cached_without_touching_the_registry() {
    let registry = Registry::start().await.unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let (repo, img) = push_image(&registry, "trust/cached").await;
    cosign.sign(&img.by_digest()).await.unwrap();
    let authority = [key_authority("k", &cosign.public_key_pem().unwrap())];
    let v = Arc::new(verifier(
        policy(&authority, &[registry.host()], ""),
        &registry,
    ));
    let requests = || {
        registry
            .request_log()
            .lines()
            .filter(|l| l.contains(&format!("/v2/{repo}/")))
            .count()
    };
    let first = v.verify(&pinned(&img)).await.unwrap();
    let after_first = requests();
    assert!(after_first > 0);
    // Concurrent requests share the verifier; all are served from the cache.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (v, img) = (v.clone(), pinned(&img));
            tokio::spawn(async move { v.verify(&img).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), first);
    }
    assert_eq!(
        requests(),
        after_first,
        "cached verifications must not reach the registry"
    );
    // A reloaded policy starts a new generation: nothing verified before is trusted blindly.
    let g = v.generation();
    v.set_policy(policy(&authority, &[registry.host()], ""));
    assert_eq!(v.generation(), g + 1);
    v.verify(&pinned(&img)).await.unwrap();
    let after_reload = requests();
    assert!(after_reload > after_first);
    // With a TTL of zero nothing is cached.
    v.set_policy(policy(
        &authority,
        &[registry.host()],
        "verification: {cacheTTLSeconds: 0}\n",
    ));
    v.verify(&pinned(&img)).await.unwrap();
    let once = requests();
    v.verify(&pinned(&img)).await.unwrap();
    assert!(requests() > once && once > after_reload);
}

#[tokio::test]
async fn a_registry_that_never_answers_times_out_and_denies() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    // Accept connections and hold them open without a word.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let cosign = Cosign::generate().await.unwrap();
    let v = Verifier::with_config(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[&host],
            "verification: {timeoutSeconds: 1}\n",
        ),
        pull_config(&[&host]),
        Credentials::anonymous(),
    );
    let image = format!("{host}/silent/cache@sha256:{}", "cd".repeat(32));
    let start = Instant::now();
    let e = denied(v.verify_reference(&image).await);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(e, VerifyError::Timeout { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&image) && e.to_string().contains("timed out"),
        "{e}"
    );
    hold.abort();
}

#[tokio::test]
async fn an_unreachable_registry_denies_with_the_reason() {
    // A port nobody listens on.
    let host = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let cosign = Cosign::generate().await.unwrap();
    let v = Verifier::with_config(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[&host],
            "",
        ),
        pull_config(&[&host]),
        Credentials::anonymous(),
    );
    let image = format!("{host}/gone/cache@sha256:{}", "ef".repeat(32));
    let e = denied(v.verify_reference(&image).await);
    assert!(matches!(e, VerifyError::Registry { .. }), "{e:?}");
    assert!(e.to_string().contains(&image), "{e}");
}

// ---------------------------------------------------------------------------------------
// Bounds: a verifier examines a bounded number of signatures, without hiding a valid one.

/// The layers of the `.sig` manifest of `img` in `repo`.
async fn signature_layers(
    registry: &Registry,
    repo: &str,
    img: &PushedImage,
) -> Vec<serde_json::Value> {
    let at = Reference::with_tag(
        registry.host().into(),
        repo.into(),
        signature_tag(&img.digest),
    );
    let (bytes, _) = puller(registry)
        .fetch_manifest_bytes(&at, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    m["layers"].as_array().unwrap().clone()
}

/// Layers whose payloads are blobs of their own (absent here): each costs a fetch.
fn layers_with_payloads_of_their_own(
    valid: &serde_json::Value,
    n: usize,
) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let mut l = valid.clone();
            l["digest"] = format!("sha256:{i:064x}").into();
            l
        })
        .collect()
}

#[tokio::test]
async fn a_valid_signature_after_many_bad_ones_is_found() {
    let registry = shared_registry();
    let cosign = Cosign::generate().await.unwrap();
    let repo = unique_name("trust/many-bad");
    let (_, img) = push_image(registry, &repo).await;
    cosign.sign(&img.by_digest()).await.unwrap();
    let valid = signature_layers(registry, &repo, &img).await[0].clone();
    let v = key_verifier(&cosign, registry, "verification:\n  cacheTTLSeconds: 0\n");

    // The issue's `.sig`: 64 bad signatures, then the valid one. cosign accepts it.
    let mut layers = gkm_testenv::cosign::junk_signature_layers(&valid, 64, 0);
    layers.push(valid.clone());
    push_signature_layers(registry, &repo, &img.digest, &layers).await;
    cosign.verify(&img.by_digest()).await.unwrap();
    assert_eq!(v.verify(&pinned(&img)).await.unwrap().authority, "k");

    // Many more: malformed ones, more than a verification checks, as many well-formed ones
    // as it affords, and in front of all more layers with payloads of their own than it
    // fetches. The valid one is still found.
    let mut layers = layers_with_payloads_of_their_own(&valid, MAX_SIGNATURE_FETCHES + 20);
    layers.extend(gkm_testenv::cosign::junk_signature_layers(
        &valid,
        MAX_SIGNATURE_CHECKS * 2,
        300,
    ));
    layers.push(valid.clone());
    push_signature_layers(registry, &repo, &img.digest, &layers).await;
    let got = v.verify(&pinned(&img)).await.unwrap();
    assert_eq!(
        (got.authority.as_str(), got.format),
        ("k", SignatureFormat::Tag)
    );
    let gkm::trust::Evidence::Layer { signature, .. } = &got.evidence else {
        panic!("{got:?}");
    };
    assert_eq!(
        signature,
        valid["annotations"][SIGNATURE_ANNOTATION].as_str().unwrap()
    );
}

#[tokio::test]
async fn a_signature_manifest_of_junk_costs_a_bounded_number_of_fetches() {
    let registry = shared_registry();
    let cosign = Cosign::generate().await.unwrap();
    let stranger = Cosign::generate().await.unwrap();
    let repo = unique_name("trust/junk");
    let (_, img) = push_image(registry, &repo).await;
    stranger.sign(&img.by_digest()).await.unwrap();
    let valid = signature_layers(registry, &repo, &img).await[0].clone();
    let extra = 72;
    let layers = layers_with_payloads_of_their_own(&valid, MAX_SIGNATURE_FETCHES + extra);
    push_signature_layers(registry, &repo, &img.digest, &layers).await;
    let v = key_verifier(&cosign, registry, "");
    let before = registry.request_log().lines().count();
    let e = denied(v.verify(&pinned(&img)).await).to_string();
    let fetched = registry
        .request_log()
        .lines()
        .skip(before)
        .filter(|l| l.contains(&format!("/v2/{repo}/blobs/")))
        .count();
    assert_eq!(fetched, MAX_SIGNATURE_FETCHES, "{e}");
    let total = MAX_SIGNATURE_FETCHES + extra;
    assert!(
        e.contains(&format!(
            "{extra} of {total} tag-format signatures ({} layers {MAX_SIGNATURE_FETCHES}, ",
            signature_tag(&img.digest)
        )) && e.contains("not examined"),
        "{e}"
    );
    // The denial names a few and counts the rest.
    assert!(
        e.contains(&format!(
            "and {} more signatures rejected",
            MAX_SIGNATURE_FETCHES - 12
        )) && e.lines().count() < 20,
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Keyless: certificates from a stand-in Fulcio, SETs from a stand-in Rekor.

/// A simple-signing payload exactly as cosign writes it.
fn cosign_payload(repository: &str, digest: &str) -> String {
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{repository}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
    )
}

/// Pushes a `.sig` manifest for `digest` with one simple-signing layer per entry.
async fn push_signature_tag(
    registry: &Registry,
    repo: &str,
    digest: &str,
    layers: &[(Vec<u8>, BTreeMap<String, String>)],
) {
    let mut descs = Vec::new();
    for (payload, annotations) in layers {
        let d = image::push_blob(registry, repo, payload).await.unwrap();
        descs.push(serde_json::json!({
            "mediaType": SIMPLE_SIGNING_MEDIA_TYPE, "size": payload.len(), "digest": d,
            "annotations": annotations,
        }));
    }
    push_signature_layers(registry, repo, digest, &descs).await;
}

/// [`gkm_testenv::cosign::push_signature_layers`].
async fn push_signature_layers(
    registry: &Registry,
    repo: &str,
    digest: &str,
    descs: &[serde_json::Value],
) {
    gkm_testenv::cosign::push_signature_layers(registry, repo, digest, descs)
        .await
        .unwrap();
}

/// Pushes (or replaces) the referrers fallback index of `digest` listing `manifests`.
async fn push_index(registry: &Registry, repo: &str, digest: &str, manifests: &[(&[u8], &str)]) {
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": manifests.iter().map(|(m, at)| serde_json::json!({
            "mediaType": OCI_MANIFEST, "size": m.len(), "digest": image::sha256_digest(m), "artifactType": at,
        })).collect::<Vec<_>>(),
    });
    image::push_manifest(
        registry,
        repo,
        &digest.replace(':', "-"),
        OCI_INDEX,
        index.to_string().as_bytes(),
    )
    .await
    .unwrap();
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Genuine keyless evidence for one payload: what cosign would put in the annotations.
struct Evidence {
    payload: Vec<u8>,
    signature: Vec<u8>,
    cert_pem: String,
    bundle: String,
}

impl Evidence {
    fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                SIGNATURE_ANNOTATION.to_string(),
                B64.encode(&self.signature),
            ),
            (CERTIFICATE_ANNOTATION.to_string(), self.cert_pem.clone()),
            ("dev.sigstore.cosign/chain".to_string(), String::new()),
            (BUNDLE_ANNOTATION.to_string(), self.bundle.clone()),
        ])
    }
}

/// Signs `payload` with `signer` and logs it (genuinely) with `fake`'s Rekor at `time`.
fn genuine(fake: &FakeSigstore, signer: &KeylessSigner, payload: &[u8], time: i64) -> Evidence {
    let signature = signer.sign(payload);
    let body = FakeSigstore::hashedrekord_body(payload, &signature, &signer.cert_pem);
    Evidence {
        payload: payload.to_vec(),
        signature,
        cert_pem: signer.cert_pem.clone(),
        bundle: fake.tag_bundle_annotation(&body, time, 4242),
    }
}

struct KeylessSetup {
    fake: FakeSigstore,
    signer: KeylessSigner,
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

impl KeylessSetup {
    /// A signer with the same subject, certified for another OIDC issuer.
    fn other_issuer(&self) -> KeylessSigner {
        self.fake
            .issue(
                "https://accounts.google.com",
                San::Uri(WORKFLOW.into()),
                now() - 60,
                600,
            )
            .unwrap()
    }
}

fn keyless_setup() -> KeylessSetup {
    let fake = FakeSigstore::new().unwrap();
    let signer = fake
        .issue(ISSUER, San::Uri(WORKFLOW.into()), now() - 60, 600)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("trusted_root.json");
    std::fs::write(&root, fake.trusted_root_json()).unwrap();
    KeylessSetup {
        fake,
        signer,
        _dir: dir,
        root,
    }
}

fn keyless_verifier(s: &KeylessSetup, registry: &Registry, subject_line: &str) -> Verifier {
    verifier(
        policy(
            &[keyless_authority("ci", subject_line, &s.root)],
            &[registry.host()],
            "",
        ),
        registry,
    )
}

/// A new image in `repo` with one genuine keyless signature in the tag format, over the
/// payload cosign writes naming `docker_reference` (default: the image's own repository).
/// Returns the image and that payload.
async fn keyless_signed_image(
    s: &KeylessSetup,
    registry: &Registry,
    repo: &str,
    docker_reference: Option<&str>,
) -> (PushedImage, String) {
    let (_, img) = push_image(registry, repo).await;
    let here = format!("{}/{repo}", registry.host());
    let payload = cosign_payload(docker_reference.unwrap_or(&here), &img.digest);
    let ev = genuine(&s.fake, &s.signer, payload.as_bytes(), now());
    push_signature_tag(
        registry,
        repo,
        &img.digest,
        &[(ev.payload.clone(), ev.annotations())],
    )
    .await;
    (img, payload)
}

#[tokio::test]
async fn keyless_tag_signatures_verify_with_exact_and_regexp_subjects() {
    let registry = shared_registry();
    let s = keyless_setup();
    let repo = unique_name("trust/keyless");
    let (img, payload) = keyless_signed_image(&s, registry, &repo, None).await;
    for subject in [
        format!("subject: {WORKFLOW}"),
        "subjectRegExp: https://github\\.com/gkm-dev/.*@refs/heads/main".to_string(),
    ] {
        let got = keyless_verifier(&s, registry, &subject)
            .verify(&pinned(&img))
            .await
            .unwrap();
        assert_eq!(
            (got.authority.as_str(), got.format),
            ("ci", SignatureFormat::Tag)
        );
    }
    // Identity mismatches: another subject, a regexp that only matches unanchored, another
    // issuer.
    for (subject, want) in [
        (
            "subject: https://github.com/gkm-dev/other".to_string(),
            "does not match",
        ),
        (
            "subjectRegExp: github\\.com/gkm-dev".to_string(),
            "does not match",
        ),
    ] {
        let e = denied(
            keyless_verifier(&s, registry, &subject)
                .verify(&pinned(&img))
                .await,
        )
        .to_string();
        assert!(e.contains(want), "{subject}: {e}");
    }
    let other_issuer = s.other_issuer();
    let ev = genuine(&s.fake, &other_issuer, payload.as_bytes(), now());
    push_signature_tag(
        registry,
        &repo,
        &img.digest,
        &[(ev.payload.clone(), ev.annotations())],
    )
    .await;
    let e = denied(
        keyless_verifier(&s, registry, &format!("subject: {WORKFLOW}"))
            .verify(&pinned(&img))
            .await,
    )
    .to_string();
    assert!(
        e.contains("certificate issuer is \"https://accounts.google.com\""),
        "{e}"
    );
}

#[tokio::test]
async fn a_keyless_signature_naming_an_authority_is_examined_before_junk() {
    let registry = shared_registry();
    let s = keyless_setup();
    let repo = unique_name("trust/keyless-first");
    // Signed where it was built (another repository), so its payload is not the one this
    // repository's signatures would carry: only its certificate sets it apart.
    let elsewhere = Some("incoming.example.com/dev/app");
    let (img, _) = keyless_signed_image(&s, registry, &repo, elsewhere).await;
    let valid = signature_layers(registry, &repo, &img).await[0].clone();
    // In front, more signatures than a verification fetches, by a certificate of an
    // identity the policy does not name.
    let stranger = s.other_issuer();
    let mut foreign = valid.clone();
    foreign["annotations"][CERTIFICATE_ANNOTATION] = stranger.cert_pem.clone().into();
    let mut layers = layers_with_payloads_of_their_own(&foreign, MAX_SIGNATURE_FETCHES + 20);
    layers.push(valid);
    push_signature_layers(registry, &repo, &img.digest, &layers).await;
    let got = keyless_verifier(&s, registry, &format!("subject: {WORKFLOW}"))
        .verify(&pinned(&img))
        .await
        .unwrap();
    assert_eq!(
        (got.authority.as_str(), got.format),
        ("ci", SignatureFormat::Tag)
    );
}

#[tokio::test]
async fn keyless_forged_payload_with_a_genuine_certificate_and_bundle_is_denied() {
    let registry = shared_registry();
    let s = keyless_setup();
    let repo = unique_name("trust/keyless-forged-payload");
    let (_, signed) = push_image(registry, &repo).await;
    let (_, target) = push_image(registry, &repo).await;
    let base = format!("{}/{repo}", registry.host());
    // Genuine evidence for the signed image ...
    let ev = genuine(
        &s.fake,
        &s.signer,
        cosign_payload(&base, &signed.digest).as_bytes(),
        now(),
    );
    push_signature_tag(
        registry,
        &repo,
        &signed.digest,
        &[(ev.payload.clone(), ev.annotations())],
    )
    .await;
    let v = keyless_verifier(&s, registry, &format!("subject: {WORKFLOW}"));
    assert!(
        v.verify(&pinned(&signed)).await.is_ok(),
        "the genuine evidence verifies"
    );
    // ... reused, certificate, bundle and signature byte for byte, with a payload that
    // names the target image.
    let forged = cosign_payload(&base, &target.digest).into_bytes();
    push_signature_tag(
        registry,
        &repo,
        &target.digest,
        &[(forged.clone(), ev.annotations())],
    )
    .await;
    let e = denied(v.verify(&pinned(&target)).await).to_string();
    assert!(e.contains(&target.by_digest()), "{e}");
    assert!(
        e.contains(&format!(
            "Rekor entry does not match the signature: the entry records sha256 {}, but the payload hashes to {}",
            hex::encode(Sha256::digest(&ev.payload)),
            hex::encode(Sha256::digest(&forged))
        )),
        "{e}"
    );
}

#[tokio::test]
async fn keyless_forged_signature_is_denied() {
    let registry = shared_registry();
    let s = keyless_setup();
    let repo = unique_name("trust/keyless-forged-sig");
    let (_, img) = push_image(registry, &repo).await;
    let payload = cosign_payload(&format!("{}/{repo}", registry.host()), &img.digest).into_bytes();
    let ev = genuine(&s.fake, &s.signer, &payload, now());
    // The attacker's own key (a certificate for someone else) signs the genuine payload.
    let attacker = s
        .fake
        .issue(
            ISSUER,
            San::Email("mallory@example.com".into()),
            now() - 60,
            600,
        )
        .unwrap();
    let forged_sig = attacker.sign(&payload);
    let v = keyless_verifier(&s, registry, &format!("subject: {WORKFLOW}"));

    // 1. Genuine certificate and bundle, forged signature bytes: the log entry recorded
    //    another signature.
    let mut a = ev.annotations();
    a.insert(SIGNATURE_ANNOTATION.into(), B64.encode(&forged_sig));
    push_signature_tag(registry, &repo, &img.digest, &[(payload.clone(), a)]).await;
    let e = denied(v.verify(&pinned(&img)).await).to_string();
    assert!(e.contains("the entry records another signature"), "{e}");

    // 2. Even an entry that logged the forged signature with the genuine certificate (a log
    //    that did not check it) is refused: the signature does not verify under the
    //    certificate's key.
    let body = FakeSigstore::hashedrekord_body(&payload, &forged_sig, &s.signer.cert_pem);
    let mut a = ev.annotations();
    a.insert(SIGNATURE_ANNOTATION.into(), B64.encode(&forged_sig));
    a.insert(
        BUNDLE_ANNOTATION.into(),
        s.fake.tag_bundle_annotation(&body, now(), 4243),
    );
    push_signature_tag(registry, &repo, &img.digest, &[(payload.clone(), a)]).await;
    let e = denied(v.verify(&pinned(&img)).await).to_string();
    assert!(
        e.contains("signature does not verify under the certificate's key"),
        "{e}"
    );

    // 3. The untouched evidence verifies.
    push_signature_tag(
        registry,
        &repo,
        &img.digest,
        &[(payload.clone(), ev.annotations())],
    )
    .await;
    assert!(v.verify(&pinned(&img)).await.is_ok());
}

#[tokio::test]
async fn keyless_evidence_outside_the_trusted_root_or_time_is_denied() {
    let registry = shared_registry();
    let s = keyless_setup();
    let other = FakeSigstore::new().unwrap();
    let repo = unique_name("trust/keyless-untrusted");
    let (_, img) = push_image(registry, &repo).await;
    let payload = cosign_payload(&format!("{}/{repo}", registry.host()), &img.digest).into_bytes();
    let v = keyless_verifier(&s, registry, &format!("subject: {WORKFLOW}"));
    let check = |ev: Evidence, want: &'static str| {
        let (v, img, repo, payload) = (&v, &img, &repo, &payload);
        async move {
            push_signature_tag(
                registry,
                repo,
                &img.digest,
                &[(payload.clone(), ev.annotations())],
            )
            .await;
            let e = denied(v.verify(&pinned(img)).await).to_string();
            assert!(e.contains(want), "want {want:?}: {e}");
        }
    };
    // A certificate from another CA, logged by the trusted Rekor.
    let stranger = other
        .issue(ISSUER, San::Uri(WORKFLOW.into()), now() - 60, 600)
        .unwrap();
    check(
        genuine(&s.fake, &stranger, &payload, now()),
        "does not chain to the trusted root",
    )
    .await;
    // The trusted certificate, logged by an unknown Rekor.
    check(
        genuine(&other, &s.signer, &payload, now()),
        "is not in the trusted root",
    )
    .await;
    // A SET over another time than the bundle claims.
    let t = now();
    let mut ev = genuine(&s.fake, &s.signer, &payload, t);
    let (was, claimed) = (
        format!("\"integratedTime\":{t}"),
        format!("\"integratedTime\":{}", t - 1),
    );
    assert!(ev.bundle.contains(&was), "{}", ev.bundle);
    ev.bundle = ev.bundle.replace(&was, &claimed);
    check(ev, "SignedEntryTimestamp does not verify").await;
    // Logged an hour after the ten-minute certificate expired.
    check(
        genuine(&s.fake, &s.signer, &payload, now() + 3600),
        "is not valid at the log's integratedTime",
    )
    .await;
    // No bundle at all.
    let mut ev = genuine(&s.fake, &s.signer, &payload, now());
    ev.bundle = String::new();
    check(ev, "no Rekor bundle").await;
}

#[tokio::test]
async fn keyless_bundles_verify_and_a_forged_statement_is_denied() {
    let registry = shared_registry();
    let s = keyless_setup();
    let repo = unique_name("trust/keyless-bundle");
    let (_, img) = push_image(registry, &repo).await;
    let (_, target) = push_image(registry, &repo).await;
    let statement = |digest: &str| {
        format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"digest":{{"sha256":"{}"}}}}],"predicateType":"https://sigstore.dev/cosign/sign/v1"}}"#,
            &digest[7..]
        )
        .into_bytes()
    };
    let pae = |st: &[u8]| {
        let mut m = format!("DSSEv1 28 application/vnd.in-toto+json {} ", st.len()).into_bytes();
        m.extend_from_slice(st);
        m
    };
    let genuine_statement = statement(&img.digest);
    let sig = s.signer.sign(&pae(&genuine_statement));
    let body = FakeSigstore::dsse_body(&genuine_statement, &sig, &s.signer.cert_pem);
    let entry = s.fake.bundle_tlog_entry("dsse", &body, now(), 77);
    let bundle = |st: &[u8]| {
        serde_json::json!({
            "mediaType": BUNDLE_MT,
            "verificationMaterial": {
                "certificate": {"rawBytes": B64.encode(&s.signer.cert_der)},
                "tlogEntries": [entry.clone()],
            },
            "dsseEnvelope": {
                "payload": B64.encode(st),
                "payloadType": "application/vnd.in-toto+json",
                "signatures": [{"sig": B64.encode(&sig)}],
            },
        })
        .to_string()
        .into_bytes()
    };
    let attach = |subject: PushedImage, bundle: Vec<u8>| {
        let repo = repo.clone();
        async move {
            let layer = image::push_blob(registry, &repo, &bundle).await.unwrap();
            let empty = image::push_blob(registry, &repo, b"{}").await.unwrap();
            let manifest = serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUNDLE_MT,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": empty},
                "layers": [{"mediaType": BUNDLE_MT, "size": bundle.len(), "digest": layer}],
                "subject": {"mediaType": subject.media_type, "size": subject.manifest.len(), "digest": subject.digest},
            })
            .to_string()
            .into_bytes();
            let d = image::sha256_digest(&manifest);
            image::push_manifest(registry, &repo, &d, OCI_MANIFEST, &manifest)
                .await
                .unwrap();
            push_index(registry, &repo, &subject.digest, &[(&manifest, BUNDLE_MT)]).await;
        }
    };
    let v = keyless_verifier(&s, registry, &format!("subject: {WORKFLOW}"));
    attach(img.clone(), bundle(&genuine_statement)).await;
    let got = v.verify(&pinned(&img)).await.unwrap();
    assert_eq!(
        (got.authority.as_str(), got.format),
        ("ci", SignatureFormat::Bundle)
    );
    // Genuine certificate, log entry and signature around a statement about the target.
    attach(target.clone(), bundle(&statement(&target.digest))).await;
    let e = denied(v.verify(&pinned(&target)).await).to_string();
    assert!(e.contains("the entry records sha256"), "{e}");
    assert!(e.contains("but the statement hashes to"), "{e}");
}

#[tokio::test]
async fn bundles_attached_through_the_referrers_api_verify() {
    let registry = Registry::start_with_referrers().await.unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let other = Cosign::generate().await.unwrap();
    let (repo, img) = push_image(&registry, "trust/referrers").await;
    cosign.sign_bundle(&img.by_digest()).await.unwrap();
    other.sign_bundle(&img.by_digest()).await.unwrap();
    // This registry has the API: cosign attached the bundles without a fallback tag.
    let fallback = Reference::with_tag(
        registry.host().into(),
        repo.clone(),
        img.digest.replace(':', "-"),
    );
    assert!(
        puller(&registry)
            .fetch_manifest_bytes(&fallback, 1 << 20)
            .await
            .unwrap()
            .is_none()
    );
    let before = registry.request_log().lines().count();
    let v = verifier(
        policy(
            &[key_authority("k", &cosign.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        &registry,
    );
    let got = v.verify(&pinned(&img)).await.unwrap();
    assert_eq!(
        (got.authority.as_str(), got.format),
        ("k", SignatureFormat::Bundle)
    );
    let log: Vec<String> = registry
        .request_log()
        .lines()
        .skip(before)
        .map(String::from)
        .collect();
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("GET /v2/{repo}/referrers/{}", img.digest))),
        "the referrers API was asked: {log:?}"
    );
    // A key that signed nothing here finds two bundles, neither its own.
    let stranger = Cosign::generate().await.unwrap();
    let v = verifier(
        policy(
            &[key_authority("s", &stranger.public_key_pem().unwrap())],
            &[registry.host()],
            "",
        ),
        &registry,
    );
    let e = denied(v.verify(&pinned(&img)).await);
    let VerifyError::NotVerified { rejected, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(rejected.len(), 2, "{e}");
}
