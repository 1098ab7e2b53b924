//! `gkm promote` and `gkm verify` between two real registries, with images signed by real
//! cosign: only verified images are copied, their signatures travel with them, a copy cut
//! short is finished by the next run, and the promoted image verifies in the trusted
//! registry. (The controller's HTTP API over the same code is tested in the controller
//! crate, behind a real API server.)

use std::path::Path;
use std::process::Output;

use gkm::oci::{Credentials, PullConfig, Puller, Pusher};
use gkm_testenv::fixtures::push_kernel_cache;
use gkm_testenv::image::{PushedImage, Target};
use gkm_testenv::{Cosign, Registry, shared_registry, unique_name};

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

fn write_policy(dir: &Path, signer: &Cosign, incoming: &str, trusted: &str) -> String {
    let key: String = signer
        .public_key_pem()
        .unwrap()
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!(
            "authorities:\n  - name: release\n    key: |\n{key}trustedRegistries: [{trusted}]\npromotion:\n  incoming: {incoming}\n  trusted: {trusted}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn promote_copies_verified_images_with_their_signatures_and_finishes_a_cut_short_copy() {
    let incoming = Registry::start().await.unwrap();
    let trusted_host = shared_registry().host();
    let trusted = format!("{trusted_host}/{}", unique_name("released"));
    let signer = Cosign::generate().await.unwrap();
    let promoter = Cosign::generate().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &signer,
        &format!("{}/dev", incoming.host()),
        &trusted,
    );
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
