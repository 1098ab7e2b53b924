//! Digest-pinned pulls from a real registry into the store, compared file by file with the
//! source tree.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gkm::oci::{Credentials, PinnedRef, PullConfig, PullError, Puller};
use gkm::store::{Store, StoreConfig, StoreError};
use gkm_testenv::faulty::StaticRegistry;
use gkm_testenv::image::{
    self, CacheKind, Compression, ImageBuilder, LayerBuilder, MediaTypes, Target,
};
use gkm_testenv::{Registry, shared_registry, unique_name};
use std::collections::HashMap;

fn puller(registry: &Registry) -> Puller {
    Puller::new(
        PullConfig {
            insecure_registries: vec![registry.host().to_string()],
            ..Default::default()
        },
        Credentials::anonymous(),
    )
}

fn store(dir: &Path) -> Store {
    Store::open(StoreConfig {
        root: dir.to_path_buf(),
        sync: false,
        ..Default::default()
    })
    .unwrap()
}

/// A Triton-like cache tree: nested hash folders, binaries, JSON, an executable, a symlink.
fn cache_tree(dir: &Path, seed: u8) {
    for k in 0..5u8 {
        let d = dir.join(format!("{:02x}{:030x}", k ^ seed, k as u128 * 7919));
        std::fs::create_dir_all(&d).unwrap();
        let blob: Vec<u8> = (0..(1000 + k as usize * 3001))
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        std::fs::write(d.join("kernel.cubin"), &blob).unwrap();
        std::fs::write(
            d.join("kernel.json"),
            format!(r#"{{"name":"k{k}","num_warps":4}}"#),
        )
        .unwrap();
        std::fs::write(d.join("__grp__kernel.json"), b"{}").unwrap();
    }
    std::fs::write(dir.join("launcher.so"), b"\x7fELF shared object").unwrap();
    std::fs::set_permissions(
        dir.join("launcher.so"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("launcher.so", dir.join("launcher.so.1")).unwrap();
}

/// path → (mode, content or link target) for every entry below `root`.
fn snapshot(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(
                    rel,
                    (
                        0,
                        std::fs::read_link(&p)
                            .unwrap()
                            .into_os_string()
                            .into_encoded_bytes(),
                    ),
                );
            } else if m.is_dir() {
                out.insert(rel, (mode, Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

#[tokio::test]
async fn an_mcv_image_extracts_to_exactly_its_source_tree() {
    let registry = shared_registry();
    for compression in [Compression::Gzip, Compression::Zstd] {
        let src = tempfile::tempdir().unwrap();
        cache_tree(src.path(), 1);
        let targets = [Target::new("cuda", "90", 32)];
        let image =
            ImageBuilder::mcv(CacheKind::Triton, src.path(), &targets, compression).unwrap();
        let pushed = image
            .push(registry, &unique_name("pull/mcv"), Some("v1"))
            .await
            .unwrap();

        let root = tempfile::tempdir().unwrap();
        let store = store(root.path());
        let pinned = PinnedRef::parse(&pushed.by_digest()).unwrap();
        let extracted = store.ensure(&pinned, &puller(registry)).await.unwrap();

        assert_eq!(
            extracted.mount_source(),
            extracted.rootfs().join("io.triton.cache")
        );
        assert_eq!(
            snapshot(&extracted.mount_source()),
            snapshot(src.path()),
            "{compression:?}"
        );
        assert_eq!(extracted.meta.image.summary_label().unwrap().0, "triton");
        assert_eq!(
            extracted.meta.files,
            5 * 3 + 1 + 1,
            "cache files plus the manifest"
        );
        assert!(
            extracted
                .rootfs()
                .join("io.triton.manifest/manifest.json")
                .is_file()
        );
        // The same digest again is served from the store.
        let again = store.ensure(&pinned, &puller(registry)).await.unwrap();
        assert_eq!(again, extracted);
    }
}

#[tokio::test]
async fn layers_apply_in_order_with_whiteouts_and_docker_media_types() {
    let registry = shared_registry();
    for (media, c1, c2) in [
        (MediaTypes::Oci, Compression::Gzip, Compression::Zstd),
        (MediaTypes::Docker, Compression::Gzip, Compression::None),
    ] {
        let image = ImageBuilder::new(media)
            .layer(lower_layer().finish(c1, media))
            .layer(upper_layer().finish(c2, media));
        let pushed = image
            .push(registry, &unique_name("pull/layers"), Some("v1"))
            .await
            .unwrap();
        let root = tempfile::tempdir().unwrap();
        let e = store(root.path())
            .ensure(
                &PinnedRef::parse(&pushed.by_digest()).unwrap(),
                &puller(registry),
            )
            .await
            .unwrap();
        let snap = snapshot(&e.mount_source());
        let files: Vec<(&str, &[u8], u32)> = snap
            .iter()
            .filter(|(_, (_, c))| !c.is_empty())
            .map(|(p, (m, c))| (p.as_str(), c.as_slice(), *m))
            .collect();
        assert_eq!(
            files,
            [
                ("app/keep", &b"keep"[..], 0o644),
                ("app/opaque/new", b"new", 0o644),
                ("app/replace", b"new", 0o600)
            ],
            "{media:?}"
        );
    }
}

fn lower_layer() -> LayerBuilder {
    let mut l = LayerBuilder::new();
    l.dir("app", 0o755)
        .file("app/keep", b"keep", 0o644)
        .file("app/remove-me", b"x", 0o644)
        .file("app/replace", b"old", 0o644)
        .dir("app/opaque", 0o755)
        .file("app/opaque/old", b"old", 0o644);
    l
}

fn upper_layer() -> LayerBuilder {
    let mut l = LayerBuilder::new();
    l.whiteout("app/remove-me")
        .file("app/replace", b"new", 0o600)
        .opaque("app/opaque")
        .file("app/opaque/new", b"new", 0o644);
    l
}

#[tokio::test]
async fn an_index_resolves_to_this_nodes_platform() {
    let registry = shared_registry();
    let repo = unique_name("pull/index");
    let mut amd = LayerBuilder::new();
    amd.file("arch", b"amd64", 0o644);
    let mut arm = LayerBuilder::new();
    arm.file("arch", b"arm64", 0o644);
    let a = ImageBuilder::new(MediaTypes::Oci)
        .layer(amd.finish(Compression::Gzip, MediaTypes::Oci))
        .push(registry, &repo, None)
        .await
        .unwrap();
    let b = ImageBuilder::new(MediaTypes::Oci)
        .platform("linux", "arm64")
        .layer(arm.finish(Compression::Gzip, MediaTypes::Oci))
        .push(registry, &repo, None)
        .await
        .unwrap();
    let index = image::push_index(
        registry,
        &repo,
        "multi",
        &[(&b, "linux", "arm64"), (&a, "linux", "amd64")],
    )
    .await
    .unwrap();

    let root = tempfile::tempdir().unwrap();
    let e = store(root.path())
        .ensure(
            &PinnedRef::parse(&index.by_digest()).unwrap(),
            &puller(registry),
        )
        .await
        .unwrap();
    assert_eq!(std::fs::read(e.rootfs().join("arch")).unwrap(), b"amd64");
    assert_eq!(
        e.meta.image.digest, index.digest,
        "stored under the digest it was named by"
    );
    assert_eq!(e.meta.image.manifest_digest, a.digest);

    // An index without this platform says which ones it has.
    let only_arm = image::push_index(registry, &repo, "arm-only", &[(&b, "linux", "arm64")])
        .await
        .unwrap();
    let err = store(tempfile::tempdir().unwrap().path())
        .ensure(
            &PinnedRef::parse(&only_arm.by_digest()).unwrap(),
            &puller(registry),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("linux/arm64") && err.to_string().contains("amd64"),
        "{err}"
    );
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_leaves_nothing_behind() {
    let src = tempfile::tempdir().unwrap();
    cache_tree(src.path(), 2);
    let image = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "80", 32)],
        Compression::Gzip,
    )
    .unwrap();
    let layer = &image.layers[0];
    let layer_digest = image::sha256_digest(&layer.bytes);
    let config = image.config();
    let (media_type, manifest) = image.manifest(&config);
    let manifest_digest = image::sha256_digest(&manifest);

    // Same length, one byte flipped near the end: the whole stream is extracted before the
    // digest can be known to be wrong.
    let mut corrupt = layer.bytes.clone();
    let n = corrupt.len();
    corrupt[n - 20] ^= 0xff;
    let repo = "pull/corrupt";
    let served = HashMap::from([
        (
            format!("/v2/{repo}/manifests/{manifest_digest}"),
            (media_type, manifest),
        ),
        (
            format!("/v2/{repo}/blobs/{}", image::sha256_digest(&config)),
            ("application/octet-stream".to_string(), config.clone()),
        ),
        (
            format!("/v2/{repo}/blobs/{layer_digest}"),
            ("application/octet-stream".to_string(), corrupt),
        ),
    ]);
    let fake = StaticRegistry::start(served).await.unwrap();
    let puller = Puller::new(
        PullConfig {
            insecure_registries: vec![fake.host().to_string()],
            attempts: 1,
            ..Default::default()
        },
        Credentials::anonymous(),
    );

    let root = tempfile::tempdir().unwrap();
    let store = store(root.path());
    let pinned = PinnedRef::parse(&format!("{}/{repo}@{manifest_digest}", fake.host())).unwrap();
    let err = store.ensure(&pinned, &puller).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Pull(PullError::DigestMismatch { expected, .. }) if *expected == layer_digest),
        "{err}"
    );
    assert!(
        store.digests().unwrap().is_empty(),
        "no tree became visible"
    );
    assert_eq!(
        std::fs::read_dir(root.path().join("store/tmp"))
            .unwrap()
            .count(),
        0,
        "no temporary left"
    );
}

#[tokio::test]
async fn a_blob_longer_than_its_descriptor_is_cut_off() {
    let registry = shared_registry();
    let repo = unique_name("pull/short-descriptor");
    let mut l = LayerBuilder::new();
    l.file("f", &[7u8; 100_000], 0o644);
    let image =
        ImageBuilder::new(MediaTypes::Oci).layer(l.finish(Compression::None, MediaTypes::Oci));
    let layer = &image.layers[0];
    image::push_blob(registry, &repo, &layer.bytes)
        .await
        .unwrap();
    let config = image.config();
    image::push_blob(registry, &repo, &config).await.unwrap();
    // The manifest understates the layer's size: a registry serving more bytes than that
    // must not be read on and on.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": image::OCI_MANIFEST,
        "config": {"mediaType": image::OCI_CONFIG, "digest": image::sha256_digest(&config), "size": config.len()},
        "layers": [{"mediaType": layer.media_type, "digest": image::sha256_digest(&layer.bytes), "size": 1000}],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = image::push_manifest(registry, &repo, "v1", image::OCI_MANIFEST, &bytes)
        .await
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let store = store(root.path());
    let err = store
        .ensure(
            &PinnedRef::parse(&format!("{}/{repo}@{digest}", registry.host())).unwrap(),
            &puller(registry),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Pull(PullError::SizeMismatch { expected: 1000, .. })
        ),
        "{err}"
    );
    assert!(store.digests().unwrap().is_empty());
}

#[tokio::test]
async fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let registry = shared_registry();
    let mut l = LayerBuilder::new();
    l.file("f", b"x", 0o644);
    let pushed = ImageBuilder::new(MediaTypes::Oci)
        .layer(l.finish(Compression::Gzip, MediaTypes::Oci))
        .push(registry, &unique_name("pull/wrongdigest"), Some("v1"))
        .await
        .unwrap();
    // Ask for the right repository at a digest that exists nowhere.
    let other = format!("{}@sha256:{}", pushed.repository, "ab".repeat(32));
    let root = tempfile::tempdir().unwrap();
    let err = store(root.path())
        .ensure(&PinnedRef::parse(&other).unwrap(), &puller(registry))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&"ab".repeat(32)), "{err}");
    assert!(!err.to_string().is_empty());
}

#[tokio::test]
async fn pulls_never_ask_for_a_tag() {
    let registry = Registry::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    cache_tree(src.path(), 3);
    let image = ImageBuilder::mcv(
        CacheKind::Vllm,
        src.path(),
        &[Target::new("hip", "gfx942", 64)],
        Compression::Gzip,
    )
    .unwrap();
    let pushed = image
        .push(&registry, "pull/bytag", Some("latest"))
        .await
        .unwrap();
    let before = registry.request_log().lines().count();
    let root = tempfile::tempdir().unwrap();
    let e = store(root.path())
        .ensure(
            &PinnedRef::parse(&pushed.by_digest()).unwrap(),
            &puller(&registry),
        )
        .await
        .unwrap();
    assert_eq!(e.mount_source(), e.rootfs().join("io.vllm.cache"));
    let log = registry.request_log();
    let served: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.contains("/manifests/") || l.contains("/blobs/"))
        .collect();
    assert!(!served.is_empty());
    for line in &served {
        assert!(line.contains("sha256:"), "a request not by digest: {line}");
        assert!(
            !line.contains(":latest") && !line.contains("/latest"),
            "{line}"
        );
    }
}
