//! `gkm promote` and `gkm verify` between two real registries, with images signed by real
//! cosign: only verified images are copied, their signatures travel with them, a copy cut
//! short is finished by the next run, and the promoted image verifies in the trusted
//! registry. (The controller's HTTP API over the same code is tested in the controller
//! crate, behind a real API server.)

use std::path::Path;
use std::process::Output;

use gkm::oci::{Credentials, PullConfig, Puller, Pusher};
use gkm::trust::tag::signature_tag;
use gkm_testenv::cosign::{junk_signature_layers, push_signature_layers};
use gkm_testenv::fixtures::push_kernel_cache;
use gkm_testenv::image::{self, OCI_MANIFEST, PushedImage, Target};
use gkm_testenv::{Cosign, Registry, shared_registry, unique_name};

const BUNDLE_MT: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

fn gkm(args: &[&str], envs: &[(&str, &str)]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gkm"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

async fn push(registry: &Registry, repo: &str, seed: &str) -> PushedImage {
    let targets = [Target::new("cuda", "90", 32)];
    push_kernel_cache(registry, repo, "v1", seed, &targets)
        .await
        .unwrap()
}

/// Writes a policy trusting one key, `authority` (its name and signer), at `path`.
fn write_policy(path: &Path, authority: (&str, &Cosign), incoming: &str, trusted: &str) -> String {
    let (name, signer) = authority;
    let key: String = signer
        .public_key_pem()
        .unwrap()
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    std::fs::write(
        path,
        format!(
            "authorities:\n  - name: {name}\n    key: |\n{key}trustedRegistries: [{trusted}]\npromotion:\n  incoming: {incoming}\n  trusted: {trusted}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// An incoming registry (with the OCI referrers API or without), a fresh trusted
/// repository prefix in the shared registry, the key whose signatures the policy trusts, a
/// promoter key, and the policy file.
struct Setup {
    incoming: Registry,
    trusted_host: &'static str,
    trusted: String,
    signer: Cosign,
    promoter: Cosign,
    dir: tempfile::TempDir,
    policy: String,
}

impl Setup {
    async fn new(referrers: bool) -> Self {
        let incoming = if referrers {
            Registry::start_with_referrers().await.unwrap()
        } else {
            Registry::start().await.unwrap()
        };
        let trusted_host = shared_registry().host();
        let trusted = format!("{trusted_host}/{}", unique_name("released"));
        let signer = Cosign::generate().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let policy = write_policy(
            &dir.path().join("policy.yaml"),
            ("release", &signer),
            &format!("{}/dev", incoming.host()),
            &trusted,
        );
        Self {
            incoming,
            trusted_host,
            trusted,
            signer,
            promoter: Cosign::generate().await.unwrap(),
            dir,
            policy,
        }
    }

    /// `gkm ARGS`, speaking plain HTTP to both registries, with the promoter's password.
    fn gkm(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend([
            "--insecure-registry",
            self.incoming.host(),
            "--insecure-registry",
            self.trusted_host,
        ]);
        gkm(&all, &[("COSIGN_PASSWORD", self.promoter.password())])
    }

    /// A puller for both registries.
    fn puller(&self) -> Puller {
        Puller::new(
            PullConfig {
                insecure_registries: vec![self.incoming.host().into(), self.trusted_host.into()],
                ..Default::default()
            },
            Credentials::anonymous(),
        )
    }

    /// The manifest `reference` names, if there is one.
    async fn manifest(&self, reference: &str) -> Option<Vec<u8>> {
        let r = gkm::oci::parse_reference(reference).unwrap();
        self.puller()
            .fetch_manifest_bytes(&r, 1 << 20)
            .await
            .unwrap()
            .map(|(b, _)| b)
    }
}

#[tokio::test]
async fn promote_copies_verified_images_with_their_signatures_and_finishes_a_cut_short_copy() {
    let Setup {
        incoming,
        trusted_host,
        trusted,
        signer,
        promoter,
        dir,
        policy,
    } = Setup::new(false).await;
    let insecure = [
        "--insecure-registry",
        incoming.host(),
        "--insecure-registry",
        trusted_host,
    ];

    // Unsigned: refused, nothing copied.
    let unsigned = push(&incoming, "dev/team/unsigned", "u").await;
    let by_tag = unsigned.by_tag();
    let mut args = vec!["promote", &by_tag, "--policy", &policy];
    args.extend(insecure);
    let out = gkm(&args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("was not promoted") && stderr.contains("no signatures found"),
        "{stderr}"
    );
    let puller = Puller::new(
        PullConfig {
            insecure_registries: vec![incoming.host().into(), trusted_host.into()],
            ..Default::default()
        },
        Credentials::anonymous(),
    );
    let target = |img: &PushedImage, name: &str| {
        gkm::oci::parse_reference(&format!("{trusted}/team/{name}@{}", img.digest)).unwrap()
    };
    assert!(
        puller
            .fetch_manifest_bytes(&target(&unsigned, "unsigned"), 1 << 20)
            .await
            .unwrap()
            .is_none()
    );

    // Signed, and a copy cut short earlier: its layer is already in the trusted repository.
    let signed = push(&incoming, "dev/team/app", "s").await;
    signer.sign(&signed.by_digest()).await.unwrap();
    let pusher = Pusher::new(
        vec![incoming.host().into(), trusted_host.into()],
        Credentials::anonymous(),
    );
    let manifest: serde_json::Value = serde_json::from_slice(&signed.manifest).unwrap();
    let layer = &manifest["layers"][0];
    let src = gkm::oci::parse_reference(&signed.by_digest()).unwrap();
    assert!(
        pusher
            .copy_blob(
                &src,
                &target(&signed, "app"),
                layer["digest"].as_str().unwrap(),
                layer["size"].as_u64().unwrap(),
            )
            .await
            .unwrap()
    );
    let by_tag = signed.by_tag();
    let key = promoter.key_path().display().to_string();
    let mut args = vec![
        "promote",
        &by_tag,
        "--digest",
        &signed.digest,
        "--policy",
        &policy,
        "--sign-key",
        &key,
    ];
    args.extend(insecure);
    let out = gkm(&args, &[("COSIGN_PASSWORD", promoter.password())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let promoted = format!("{trusted}/team/app@{}", signed.digest);
    assert_eq!(done["promoted"], promoted.as_str(), "{done}");
    assert_eq!(done["tag"], "v1");
    assert_eq!(
        done["blobs_copied"], 1,
        "only the config was left to copy: {done}"
    );
    assert_eq!(
        done["signatures"][0],
        format!("sha256-{}.sig", &signed.digest[7..])
    );
    assert_eq!(done["signed"], true);

    // The trusted copy verifies: by the original signer (its signature travelled), by
    // real cosign, and by the promoter's key.
    let tagged = format!("{trusted}/team/app:v1");
    let mut args = vec!["verify", &tagged, "--policy", &policy];
    args.extend(insecure);
    let out = gkm(&args, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("{promoted}: verified by release")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    signer.verify(&promoted).await.unwrap();
    promoter.verify(&promoted).await.unwrap();

    // Promoting again changes nothing.
    let mut args = vec!["promote", &by_tag, "--policy", &policy];
    args.extend(insecure);
    let out = gkm(&args, &[]);
    assert!(out.status.success());
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["blobs_copied"], 0, "{again}");
    assert_eq!(again["signatures"].as_array().unwrap().len(), 0, "{again}");

    // A promoter key that cannot be read: refused before anything is copied.
    let other = push(&incoming, "dev/team/other", "o").await;
    signer.sign(&other.by_digest()).await.unwrap();
    let by_tag = other.by_tag();
    let missing = dir.path().join("missing.key").display().to_string();
    let mut args = vec![
        "promote",
        &by_tag,
        "--policy",
        &policy,
        "--sign-key",
        &missing,
    ];
    args.extend(insecure);
    let out = gkm(&args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("promotion.signKey"),
        "{stderr}"
    );
    assert!(
        puller
            .fetch_manifest_bytes(&target(&other, "other"), 1 << 20)
            .await
            .unwrap()
            .is_none()
    );

    // Outside the incoming registry: refused with the reason.
    let elsewhere = format!("{trusted_host}/other/app@{}", signed.digest);
    let mut args = vec!["promote", &elsewhere, "--policy", &policy];
    args.extend(insecure);
    let out = gkm(&args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("is not in the incoming registry"),
        "{stderr}"
    );
}

/// `s.gkm(args)`, which must succeed; its JSON output.
fn succeeds(s: &Setup, args: &[&str]) -> serde_json::Value {
    let out = s.gkm(args);
    assert!(
        out.status.success(),
        "gkm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `s.gkm(args)`, which must fail; its stderr.
fn fails(s: &Setup, args: &[&str]) -> String {
    let out = s.gkm(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "gkm {args:?} succeeded: {stderr}");
    stderr
}

/// The output of `gkm verify IMAGE --policy POLICY`, which must succeed.
fn verified(s: &Setup, image: &str, policy: &str) -> String {
    let out = s.gkm(&["verify", image, "--policy", policy]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_promoters_signature_is_examined_first() {
    let s = Setup::new(false).await;
    let img = push(&s.incoming, "dev/team/app", "a").await;
    s.signer.sign(&img.by_digest()).await.unwrap();
    // Anyone who may push to the incoming repository puts junk before the valid signature.
    let sig_tag = signature_tag(&img.digest);
    let incoming_sig = format!("{}/dev/team/app:{sig_tag}", s.incoming.host());
    let m: serde_json::Value =
        serde_json::from_slice(&s.manifest(&incoming_sig).await.unwrap()).unwrap();
    let valid = m["layers"][0].clone();
    let mut layers = junk_signature_layers(&valid, 64, 200);
    layers.push(valid.clone());
    push_signature_layers(&s.incoming, "dev/team/app", &img.digest, &layers)
        .await
        .unwrap();

    let key = s.promoter.key_path().display().to_string();
    let by_tag = img.by_tag();
    let done = succeeds(
        &s,
        &[
            "promote",
            &by_tag,
            "--policy",
            &s.policy,
            "--sign-key",
            &key,
        ],
    );
    assert_eq!(done["signed"], true, "{done}");
    assert_eq!(done["authority"], "release", "{done}");

    // A cluster trusting only the promoter's key (as trust.md suggests) accepts the copy,
    // as cosign does.
    let promoted = format!("{}/team/app@{}", s.trusted, img.digest);
    let promoter_only = write_policy(
        &s.dir.path().join("promoter-only.yaml"),
        ("promoter", &s.promoter),
        &format!("{}/dev", s.incoming.host()),
        &s.trusted,
    );
    let out = verified(&s, &promoted, &promoter_only);
    assert!(out.contains("verified by promoter"), "{out}");
    s.promoter.verify(&promoted).await.unwrap();
    // In the trusted `.sig`, the promoter's signature leads, then the one that verified.
    let trusted_sig = format!("{}/team/app:{sig_tag}", s.trusted);
    let m: serde_json::Value =
        serde_json::from_slice(&s.manifest(&trusted_sig).await.unwrap()).unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 64 + 200 + 2);
    assert_eq!(layers[1], valid);
    assert_ne!(
        layers[0]["digest"], valid["digest"],
        "the promoter's payload"
    );
    // The original signer's signature verifies there too.
    let out = verified(&s, &promoted, &s.policy);
    assert!(out.contains("verified by release"), "{out}");
}

#[tokio::test]
async fn a_valid_bundle_among_junk_referrers_is_promoted_first() {
    let s = Setup::new(true).await;
    let repo = "dev/team/app";
    let img = push(&s.incoming, repo, "b").await;
    // Referrers that claim, in their annotations, to be cosign signatures, attached before
    // the genuine one.
    let empty = image::push_blob(&s.incoming, repo, b"{}").await.unwrap();
    let mut junk = Vec::new();
    for i in 0..40 {
        let blob = format!(r#"{{"mediaType":"{BUNDLE_MT}","junk":{i}}}"#);
        let digest = image::push_blob(&s.incoming, repo, blob.as_bytes())
            .await
            .unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUNDLE_MT,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": BUNDLE_MT, "digest": digest, "size": blob.len()}],
            "subject": {"mediaType": img.media_type, "digest": img.digest, "size": img.manifest.len()},
            "annotations": {"dev.sigstore.bundle.predicateType": "https://sigstore.dev/cosign/sign/v1"},
        })
        .to_string();
        let at = image::sha256_digest(manifest.as_bytes());
        image::push_manifest(&s.incoming, repo, &at, OCI_MANIFEST, manifest.as_bytes())
            .await
            .unwrap();
        junk.push(at);
    }
    s.signer.sign_bundle(&img.by_digest()).await.unwrap();
    let by_tag = img.by_tag();
    let done = succeeds(&s, &["promote", &by_tag, "--policy", &s.policy]);
    assert_eq!(done["authority"], "release", "{done}");
    // The trusted registry has no referrers API: the fallback index lists every referrer,
    // the one that verified first.
    let fallback = format!("{}/team/app:{}", s.trusted, img.digest.replace(':', "-"));
    let index: serde_json::Value =
        serde_json::from_slice(&s.manifest(&fallback).await.unwrap()).unwrap();
    let listed = index["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), junk.len() + 1, "{index}");
    let first = listed[0]["digest"].as_str().unwrap();
    assert!(!junk.iter().any(|j| j == first), "{index}");
    let promoted = format!("{}/team/app@{}", s.trusted, img.digest);
    let out = verified(&s, &promoted, &s.policy);
    assert!(out.contains("verified by release (Bundle)"), "{out}");
}

#[tokio::test]
async fn promotion_refuses_tags_reserved_for_artifacts() {
    let s = Setup::new(false).await;
    let v = push(&s.incoming, "dev/team/app", "v").await;
    s.signer.sign(&v.by_digest()).await.unwrap();
    succeeds(&s, &["promote", &v.by_tag(), "--policy", &s.policy]);
    let x = push_kernel_cache(
        &s.incoming,
        "dev/team/app",
        "x",
        "x",
        &[Target::new("cuda", "90", 32)],
    )
    .await
    .unwrap();
    s.signer.sign(&x.by_digest()).await.unwrap();
    let trusted_app = format!("{}/team/app", s.trusted);
    let sig_of_v = format!("{trusted_app}:{}", signature_tag(&v.digest));
    let signatures_of_v = s.manifest(&sig_of_v).await.unwrap();

    // Another image under a tag of V's artifacts: refused, naming the tag and why.
    let hex = &v.digest[7..];
    for (tag, why) in [
        (format!("sha256-{hex}.sig"), "cosign's signature tag of"),
        (format!("sha256-{hex}"), "the OCI referrers fallback tag of"),
        (format!("sha256-{hex}.att"), "cosign's attestation tag of"),
        (format!("sha256-{hex}.sbom"), "cosign's SBOM tag of"),
    ] {
        let image = format!("{}/dev/team/app:{tag}", s.incoming.host());
        let e = fails(
            &s,
            &[
                "promote", &image, "--digest", &x.digest, "--policy", &s.policy,
            ],
        );
        assert!(
            e.contains(&format!("tag {tag:?} is reserved for artifacts"))
                && e.contains(&format!("{why} {}", v.digest)),
            "{e}"
        );
    }
    // Nothing was written: X is not in the trusted repository, V's signatures are as they
    // were, and V verifies.
    assert!(
        s.manifest(&format!("{trusted_app}@{}", x.digest))
            .await
            .is_none()
    );
    assert_eq!(s.manifest(&sig_of_v).await.unwrap(), signatures_of_v);
    let out = verified(&s, &format!("{trusted_app}@{}", v.digest), &s.policy);
    assert!(out.contains("verified by release"), "{out}");

    // A tag that names an artifact under an ordinary name is not overwritten either.
    let trusted_repo = trusted_app
        .strip_prefix(&format!("{}/", s.trusted_host))
        .unwrap();
    image::push_manifest(
        shared_registry(),
        trusted_repo,
        "release",
        OCI_MANIFEST,
        &signatures_of_v,
    )
    .await
    .unwrap();
    let image = format!("{}/dev/team/app:release", s.incoming.host());
    let e = fails(
        &s,
        &[
            "promote", &image, "--digest", &x.digest, "--policy", &s.policy,
        ],
    );
    assert!(
        e.contains("names a signature or attestation manifest")
            && e.contains("GKM does not set a tag over an artifact"),
        "{e}"
    );
    assert_eq!(
        s.manifest(&format!("{trusted_app}:release")).await.unwrap(),
        signatures_of_v
    );
    // An ordinary tag promotes X: the refusals were about the tags.
    let done = succeeds(&s, &["promote", &x.by_tag(), "--policy", &s.policy]);
    assert_eq!(done["tag"], "x", "{done}");
}

/// `gkm promote` shows its copies as `docker push` does (one bar per blob: bytes, rate,
/// ETA; a line per blob copied) on a terminal, nothing with `--quiet` or when stderr is not
/// a terminal, and prints the same JSON in every case. The terminal is util-linux's
/// `script`, with a TERM (CI runs with none; indicatif draws nothing on a dumb terminal).
#[tokio::test]
async fn gkm_promote_shows_copy_progress_on_a_terminal_only() {
    let s = &Setup::new(false).await;
    let on_a_terminal = |args: &[&str]| {
        let cmd = std::iter::once(env!("CARGO_BIN_EXE_gkm"))
            .chain(args.iter().copied())
            .chain([
                "--insecure-registry",
                s.incoming.host(),
                "--insecure-registry",
                s.trusted_host,
            ])
            .collect::<Vec<_>>()
            .join(" ");
        std::process::Command::new("script")
            .args(["-qefc", &cmd, "/dev/null"])
            .env("TERM", "xterm-256color")
            .output()
            .unwrap()
    };
    // The JSON that ends what the terminal shows.
    let json = |lines: &[String]| -> serde_json::Value {
        let shown = lines.join("\n");
        let start = lines
            .iter()
            .rposition(|l| l == "{")
            .unwrap_or_else(|| panic!("no JSON:\n{shown}"));
        serde_json::from_str(&lines[start..].join("\n")).unwrap_or_else(|e| panic!("{e}:\n{shown}"))
    };
    let checked = |done: &serde_json::Value, img: &PushedImage, name: &str| {
        assert_eq!(
            done["promoted"],
            format!("{}/team/{name}@{}", s.trusted, img.digest),
            "{done}"
        );
        // Blobs were sent: a quiet run had something to show.
        assert!(done["blobs_copied"].as_u64().unwrap() >= 1, "{done}");
    };
    // Content of its own each time: a blob the trusted registry has is not copied.
    let signed = |name: &'static str| async move {
        let img = push(&s.incoming, &format!("dev/team/{name}"), &unique_name(name)).await;
        s.signer.sign(&img.by_digest()).await.unwrap();
        img
    };

    // On a terminal: a line per blob copied (`  copied sha256:<12 hex>: 1.50 KiB in 0s`).
    let img = signed("tty").await;
    let out = on_a_terminal(&["promote", &img.by_tag(), "--policy", &s.policy]);
    let lines = terminal_lines(&out.stdout);
    let shown = lines.join("\n");
    assert!(out.status.success(), "{shown}");
    let layer =
        serde_json::from_slice::<serde_json::Value>(&img.manifest).unwrap()["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
    let copied = format!("copied {}:", &layer[..19]);
    let line = lines
        .iter()
        .find(|l| l.contains(&copied))
        .unwrap_or_else(|| panic!("no progress on a terminal ({copied}):\n{shown}"));
    assert!(line.contains("B in "), "no byte count: {line}");
    checked(&json(&lines), &img, "tty");

    // Quiet on a terminal, and not a terminal: only the JSON.
    let img = signed("quiet").await;
    let out = on_a_terminal(&["promote", &img.by_tag(), "--policy", &s.policy, "--quiet"]);
    let lines = terminal_lines(&out.stdout);
    let shown = lines.join("\n");
    assert!(out.status.success(), "{shown}");
    assert!(
        !shown.contains("copied sha256:") && !shown.contains("copying"),
        "--quiet shows progress:\n{shown}"
    );
    checked(&json(&lines), &img, "quiet");

    let img = signed("piped").await;
    let out = s.gkm(&["promote", &img.by_tag(), "--policy", &s.policy]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("copied sha256:") && !stderr.contains("copying"),
        "a pipe shows progress:\n{stderr}"
    );
    checked(&serde_json::from_slice(&out.stdout).unwrap(), &img, "piped");
}

/// `out` as the terminal's lines of text: ANSI control sequences (colours, line clearing)
/// removed, and a carriage return (indicatif redrawing a line) taken as a line break.
fn terminal_lines(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    let mut plain = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, then one final byte in @..~.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .split(['\r', '\n'])
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}
