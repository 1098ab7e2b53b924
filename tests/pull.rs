//! Digest-pinned pulls from a real registry into the store, compared file by file with the
//! source tree.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gkm::oci::{Credentials, ExtractError, PinnedRef, PullConfig, PullError, Puller, Unsafe};
use gkm::store::{Extracted, Store, StoreConfig, StoreError};
use gkm_testenv::faulty::{Content, StaticRegistry};
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

/// A puller for `fake` that tries each request once: its faults do not go away.
fn fake_puller(fake: &StaticRegistry) -> Puller {
    Puller::new(
        PullConfig {
            insecure_registries: vec![fake.host().to_string()],
            attempts: 1,
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

/// What a registry serves for `image` in `repo`, by path: its manifest under its digest and
/// under each of `tags`, its config and its layers. Also the manifest's digest and bytes.
fn served(
    repo: &str,
    image: &ImageBuilder,
    tags: &[&str],
) -> (HashMap<String, Content>, String, Vec<u8>) {
    let config = image.config();
    let (media_type, manifest) = image.manifest(&config);
    let digest = image::sha256_digest(&manifest);
    let blob = |bytes: &[u8]| {
        (
            format!("/v2/{repo}/blobs/{}", image::sha256_digest(bytes)),
            ("application/octet-stream".to_string(), bytes.to_vec()),
        )
    };
    let mut paths: HashMap<String, Content> = image.layers.iter().map(|l| blob(&l.bytes)).collect();
    paths.extend([blob(&config)]);
    for r in tags.iter().copied().chain([digest.as_str()]) {
        paths.insert(
            format!("/v2/{repo}/manifests/{r}"),
            (media_type.clone(), manifest.clone()),
        );
    }
    (paths, digest, manifest)
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
    let repo = "pull/corrupt";
    let (mut served, manifest_digest, _) = served(repo, &image, &[]);

    // Same length, one byte flipped near the end: the whole stream is extracted before the
    // digest can be known to be wrong.
    let mut corrupt = layer.bytes.clone();
    let n = corrupt.len();
    corrupt[n - 20] ^= 0xff;
    served.insert(
        format!("/v2/{repo}/blobs/{layer_digest}"),
        ("application/octet-stream".to_string(), corrupt),
    );
    let fake = StaticRegistry::start(served).await.unwrap();
    let puller = fake_puller(&fake);

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

#[tokio::test]
async fn a_non_sha256_digest_header_is_recomputed_from_the_body() {
    use sha2::{Digest, Sha384, Sha512};
    let mut l = LayerBuilder::new();
    l.file("io.triton.cache/k.json", b"{}", 0o644);
    let image =
        ImageBuilder::new(MediaTypes::Oci).layer(l.finish(Compression::Gzip, MediaTypes::Oci));
    let repo = "bh/digest-header";
    let (paths, digest, manifest) = served(repo, &image, &["v1"]);
    let lie = format!("sha512:{}", hex::encode(Sha512::digest(b"other bytes")));
    for (header, honest) in [
        (
            format!("sha512:{}", hex::encode(Sha512::digest(&manifest))),
            true,
        ),
        (
            format!("sha384:{}", hex::encode(Sha384::digest(&manifest))),
            true,
        ),
        (lie.clone(), false),
    ] {
        let headers = [
            format!("/v2/{repo}/manifests/v1"),
            format!("/v2/{repo}/manifests/{digest}"),
        ]
        .map(|p| {
            (
                p,
                vec![("Docker-Content-Digest".to_string(), header.clone())],
            )
        })
        .into();
        let fake = StaticRegistry::start_with_headers(paths.clone(), headers)
            .await
            .unwrap();
        let puller = fake_puller(&fake);
        let tagged = gkm::oci::parse_reference(&format!("{}/{repo}:v1", fake.host())).unwrap();
        let resolved = puller.resolve_tag(&tagged).await;
        if !honest {
            // A header that does not match the bytes: the registry contradicts itself.
            let err = resolved.unwrap_err();
            assert!(err.to_string().contains(&lie), "{err}");
            continue;
        }
        // Tag resolution (gkm inspect, admission) names the sha256 of the bytes...
        let pinned = resolved.unwrap_or_else(|e| panic!("{header}: {e}"));
        assert_eq!(pinned.digest(), digest, "{header}");
        // ...as does the verifier's raw fetch by tag...
        let (_, fetched) = puller
            .fetch_manifest_bytes(&tagged, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fetched, digest);
        // ...and the pinned pull goes through with the same header on the digest.
        let root = tempfile::tempdir().unwrap();
        let e = store(root.path()).ensure(&pinned, &puller).await.unwrap();
        assert_eq!(
            std::fs::read(e.mount_source().join("k.json")).unwrap(),
            b"{}"
        );
    }
}

/// Pushes `image` to the shared registry under a new repository named from `prefix`, and
/// pulls it by digest into `store`.
async fn push_and_pull(
    image: &ImageBuilder,
    prefix: &str,
    store: &Store,
) -> Result<Extracted, StoreError> {
    let registry = shared_registry();
    let pushed = image
        .push(registry, &unique_name(prefix), None)
        .await
        .unwrap();
    let pinned = PinnedRef::parse(&pushed.by_digest()).unwrap();
    store.ensure(&pinned, &puller(registry)).await
}

#[tokio::test]
async fn hostile_whiteouts_hard_links_and_extended_headers_leave_nothing_in_the_store() {
    let raw = |name: &[u8], kind: u8, size: u64, link: &[u8], data: &[u8]| {
        image::raw_entry(name, kind, size, link, 0o755, data)
    };
    let mut cache = LayerBuilder::new();
    cache.file("io.triton.cache/k.json", b"{}", 0o644);
    let cache = cache.finish(Compression::Gzip, MediaTypes::Oci);
    // The whiteout of `..`: the parent of the extraction root.
    let mut dotdot = LayerBuilder::new();
    dotdot.raw(&raw(b".wh...", b'0', 0, b"", b""));
    // A symlink eight levels down and eight up, hard linked at the top: /etc.
    let mut hardlink = LayerBuilder::new();
    hardlink
        .dir("a/b/c/d/e/f/g/h", 0o755)
        .raw(&raw(
            b"a/b/c/d/e/f/g/h/l",
            b'2',
            0,
            b"../../../../../../../../etc",
            b"",
        ))
        .raw(&raw(b"top", b'1', 0, b"a/b/c/d/e/f/g/h/l", b""));
    // A PAX header of 2 MiB (a one-kilobyte gzip layer).
    let record = [
        b"2097152 comment=".as_slice(),
        &vec![b'A'; 2097152 - 17],
        b"\n",
    ]
    .concat();
    let mut pax = LayerBuilder::new();
    pax.raw(&raw(
        b"PaxHeaders/x",
        b'x',
        record.len() as u64,
        b"",
        &record,
    ))
    .file("io.triton.cache/k.json", b"{}", 0o644);
    type Case = (&'static str, LayerBuilder, fn(&Unsafe) -> bool);
    let cases: [Case; 3] = [
        ("whiteout", dotdot, |r| matches!(r, Unsafe::BadWhiteout(_))),
        ("hardlink", hardlink, |r| {
            matches!(r, Unsafe::HardlinkToEscapingSymlink(_))
        }),
        ("pax", pax, |r| {
            matches!(r, Unsafe::ExtendedHeaderTooLarge { .. })
        }),
    ];
    for (name, upper, expected) in cases {
        let image = ImageBuilder::new(MediaTypes::Oci)
            .layer(cache.clone())
            .layer(upper.finish(Compression::Gzip, MediaTypes::Oci));
        let root = tempfile::tempdir().unwrap();
        let store = store(root.path());
        let err = push_and_pull(&image, &format!("pull/hostile-{name}"), &store)
            .await
            .unwrap_err();
        match &err {
            StoreError::Pull(PullError::Extract {
                source: ExtractError::Unsafe { reason, .. },
                ..
            }) => assert!(expected(reason), "{name}: {err}"),
            other => panic!("{name}: {other}"),
        }
        assert!(store.digests().unwrap().is_empty(), "{name}");
        assert_eq!(
            std::fs::read_dir(root.path().join("store/tmp"))
                .unwrap()
                .count(),
            0,
            "{name}: no temporary left"
        );
        assert!(
            root.path().join("store").is_dir(),
            "{name}: the store itself is intact"
        );
    }
}

#[tokio::test]
async fn a_pull_counts_written_bytes_and_takes_the_last_layers_directory_mode() {
    let mut lower = LayerBuilder::new();
    lower
        .dir("io.triton.cache", 0o700)
        .file("io.triton.cache/k.json", b"{}", 0o600);
    // The upper layer names the directory again, 0755, and adds a file whose ustar size
    // says 0 and whose PAX `size` says 10 MiB.
    let n: usize = 10 << 20;
    let record = b"17 size=10485760\n"; // the record's length includes its own digits
    let mut upper = LayerBuilder::new();
    upper
        .dir("io.triton.cache", 0o755)
        .raw(&image::raw_entry(
            b"PaxHeaders/big",
            b'x',
            record.len() as u64,
            b"",
            0o644,
            record,
        ))
        .raw(&image::raw_entry(
            b"io.triton.cache/big",
            b'0',
            0,
            b"",
            0o644,
            &vec![7u8; n],
        ));
    let image = ImageBuilder::new(MediaTypes::Oci)
        .layer(lower.finish(Compression::Gzip, MediaTypes::Oci))
        .layer(upper.finish(Compression::Zstd, MediaTypes::Oci));
    let root = tempfile::tempdir().unwrap();
    let e = push_and_pull(&image, "pull/last-layer", &store(root.path()))
        .await
        .unwrap();
    let dir = std::fs::metadata(e.mount_source()).unwrap();
    assert_eq!(
        dir.permissions().mode() & 0o7777,
        0o755,
        "a non-root pod can enter it"
    );
    assert_eq!(
        std::fs::metadata(e.mount_source().join("big"))
            .unwrap()
            .len(),
        n as u64
    );
    assert_eq!(
        e.meta.size_bytes,
        n as u64 + 2,
        "sizeBytes is what was written"
    );
    assert_eq!(e.meta.files, 2);
}

/// A size-limited tmpfs mounted for one test, unmounted (lazily) when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "gkm-small-disk",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the test suite runs as root)"
        );
        SmallDisk { dir }
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Bytes in use on it.
    fn used(&self) -> u64 {
        let s = rustix::fs::statvfs(self.dir.path()).unwrap();
        (s.f_blocks - s.f_bfree) * s.f_frsize
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Disk full during extraction: the pull fails naming the cause, nothing partial becomes
/// visible, every byte written is given back, and the same pull succeeds once there is
/// room (issue #16's fault list).
#[tokio::test]
async fn a_full_disk_fails_the_pull_cleanly_and_it_succeeds_once_there_is_room() {
    // 12 MiB that gzip cannot shrink (a xorshift stream), in a 4 MiB store.
    let src = tempfile::tempdir().unwrap();
    let d = src.path().join("c0ffee");
    std::fs::create_dir_all(&d).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..12 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(d.join("kernel.cubin"), &noise).unwrap();
    std::fs::write(d.join("kernel.json"), br#"{"name":"k"}"#).unwrap();
    let image = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap();
    let registry = shared_registry();
    let pushed = image
        .push(registry, &unique_name("pull/diskfull"), None)
        .await
        .unwrap();
    let pinned = PinnedRef::parse(&pushed.by_digest()).unwrap();

    let disk = SmallDisk::mount("4m");
    let store = store(disk.dir.path());
    let before = disk.used();
    let err = store.ensure(&pinned, &puller(registry)).await.unwrap_err();
    let words = format!("{err:#}");
    assert!(
        words.contains("No space left on device") || words.contains("os error 28"),
        "the cause is named: {words}"
    );
    assert!(
        store.digests().unwrap().is_empty(),
        "nothing partial is visible"
    );
    assert_eq!(
        std::fs::read_dir(disk.dir.path().join("store/tmp"))
            .unwrap()
            .count(),
        0,
        "no temporary left"
    );
    let after = disk.used();
    assert!(
        after <= before + 64 * 1024,
        "space given back: {before} bytes used before, {after} after"
    );
    println!("disk full: {before} B used before, {after} B after the failed pull: {words}");

    // Room again: the same pull completes.
    disk.resize("64m");
    let done = store.ensure(&pinned, &puller(registry)).await.unwrap();
    assert_eq!(store.digests().unwrap(), vec![done.digest.clone()]);
}

/// A file of a shared tree changed behind GKM's back: found by the check the agent runs
/// at start (and `gkm fsck`), which names the file; an idle tree is removed and the next
/// use extracts it again, intact; a tree a volume uses is left alone.
#[tokio::test]
async fn a_tree_changed_behind_gkms_back_is_found_and_extracted_again() {
    use gkm::store::{TreeCheck, check_tree};
    let registry = shared_registry();
    let src = tempfile::tempdir().unwrap();
    cache_tree(src.path(), 3);
    let image = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap();
    let pushed = image
        .push(registry, &unique_name("pull/fsck"), None)
        .await
        .unwrap();
    let pinned = PinnedRef::parse(&pushed.by_digest()).unwrap();
    let digest = pinned.digest().to_string();
    let root = tempfile::tempdir().unwrap();

    let store_a = store(root.path());
    let extracted = store_a.ensure(&pinned, &puller(registry)).await.unwrap();
    let TreeCheck::Intact { files, .. } = check_tree(root.path(), &digest).unwrap() else {
        panic!("a fresh extraction is intact");
    };
    assert_eq!(files, extracted.meta.files);
    drop(store_a);

    // Behind GKM's back (the agent is down): one kernel rewritten, same size.
    let kernel = std::fs::read_dir(extracted.mount_source())
        .unwrap()
        .flatten()
        .map(|e| e.path().join("kernel.cubin"))
        .find(|p| p.is_file())
        .unwrap();
    let mut bytes = std::fs::read(&kernel).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&kernel, &bytes).unwrap();
    let rel = kernel
        .strip_prefix(extracted.rootfs())
        .unwrap()
        .display()
        .to_string();

    // `gkm fsck` (read-only) names the file and exits 1.
    let fsck = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_gkm"))
            .arg("fsck")
            .arg("--store")
            .arg(root.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = fsck(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("DAMAGED") && stdout.contains(&format!("{rel}: content changed")),
        "{stdout}"
    );

    // The agent's start-up check: in use, the tree is left for its pods...
    let store_b = store(root.path());
    let mut rec: gkm::store::VolumeRecord = serde_json::from_value(serde_json::json!({
        "volumeId": "v1", "targetPath": "/t", "digest": digest, "cacheKind": "GKMCache",
        "cacheNamespace": "ns", "cacheName": "c", "podNamespace": "ns", "podName": "p",
        "podUid": "u"
    }))
    .unwrap();
    store_b.record_volume(&rec).unwrap();
    assert!(store_b.verify_idle().await.unwrap().is_empty());
    assert!(!store_b.repair(&digest).await.unwrap());
    assert!(extracted.rootfs().exists());
    // ...idle, it is removed, and the next use extracts it again, intact.
    rec = store_b.remove_volume(&rec.volume_id).unwrap().unwrap();
    assert_eq!(rec.volume_id, "v1");
    let checked = store_b.verify_idle().await.unwrap();
    assert!(
        matches!(&checked[..], [(d, TreeCheck::Damaged { differences })]
            if *d == digest && differences.len() == 1),
        "{checked:?}"
    );
    assert!(!extracted.rootfs().exists());
    assert!(store_b.get(&digest).unwrap().is_none());
    store_b.ensure(&pinned, &puller(registry)).await.unwrap();
    assert_eq!(std::fs::read(&kernel).unwrap()[0], bytes[0] ^ 0xff);
    drop(store_b);
    let out = fsck(&[&digest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));

    // `gkm fsck --repair` removes a damaged idle tree itself.
    std::fs::write(extracted.mount_source().join("added.bin"), b"x").unwrap();
    let out = fsck(&["--repair"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("added.bin: not in the image") && stdout.contains("removed"),
        "{stdout}"
    );
    assert!(!extracted.rootfs().exists());
}

/// `gkm pull` shows a progress bar (bytes, rate, ETA) on a terminal, nothing with `--quiet`
/// or when stderr is not a terminal, and prints the same final lines in every case. The
/// terminal is util-linux's `script`, which gives the command a pseudo-terminal.
#[tokio::test]
async fn gkm_pull_shows_progress_on_a_terminal_only() {
    // 3 MiB of incompressible bytes, sent at 2 MiB/s: the bar has time to draw.
    let src = tempfile::tempdir().unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bytes: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.path().join("kernel.bin"), bytes).unwrap();
    let img = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap();
    let (paths, digest, _) = served("progress/cache", &img, &[]);
    let registry = StaticRegistry::start_throttled(paths, Some(2 << 20))
        .await
        .unwrap();
    let image = format!("{}/progress/cache@{digest}", registry.host());
    let pull = |store: &Path, extra: &str| {
        format!(
            "{} pull {image} --store {} --insecure-registry {} --no-sync {extra}",
            env!("CARGO_BIN_EXE_gkm"),
            store.display(),
            registry.host()
        )
    };
    // A terminal has a TERM (CI runs with none, and indicatif draws nothing on a dumb one).
    let run = |cmd: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .args(["-c", &cmd])
                .env("TERM", "xterm-256color")
                .output()
                .unwrap()
        })
    };

    // On a terminal: the bar, then the final lines.
    let store = tempfile::tempdir().unwrap();
    let tty = run(format!(
        "script -qefc '{}' /dev/null",
        pull(store.path(), "")
    ))
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("pulling") && shown.contains("MiB") && shown.contains("ETA"),
        "no progress bar on a terminal:\n{shown}"
    );
    // One bar per layer, as `docker pull` shows them, each leaving its line when done.
    assert!(
        shown.contains("pulled sha256:") && shown.contains("MiB in"),
        "no line for the finished layer:\n{shown}"
    );
    assert!(
        shown.contains(&format!("digest:       {digest}")),
        "{shown}"
    );

    // Quiet on a terminal, and not a terminal: only the final lines.
    let (quiet_store, piped_store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (how, cmd) in [
        (
            "--quiet on a terminal",
            format!(
                "script -qefc '{}' /dev/null",
                pull(quiet_store.path(), "--quiet")
            ),
        ),
        ("a pipe", pull(piped_store.path(), "")),
    ] {
        let out = run(cmd).await.unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{how}: {all}");
        assert!(!all.contains("ETA"), "{how} shows a bar:\n{all}");
        assert!(
            all.contains(&format!("digest:       {digest}")),
            "{how}: {all}"
        );
    }
}

/// Concurrent calls for one digest pull it once, and each learns whether it was the one
/// that pulled: the CSI plugin relies on this to make a cache that waited on another
/// cache's pull (perhaps with that cache's credentials) prove its own access to the digest.
#[tokio::test]
async fn of_concurrent_calls_only_the_one_that_pulled_says_so() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("kernel.bin"), vec![7u8; 1 << 20]).unwrap();
    let img = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::None,
    )
    .unwrap();
    let (paths, digest, _) = served("race/cache", &img, &[]);
    // 1 MiB at 2 MiB/s: the second call arrives while the first is pulling.
    let registry = StaticRegistry::start_throttled(paths, Some(2 << 20))
        .await
        .unwrap();
    let pinned = PinnedRef::parse(&format!("{}/race/cache@{digest}", registry.host())).unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = store(root.path());
    let puller = fake_puller(&registry);
    let first = store.ensure_reporting(&pinned, &puller, None);
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !store.pulling().is_empty(),
            "the first call is pulling when the second arrives"
        );
        store.ensure_reporting(&pinned, &puller, None).await
    };
    let (first, second) = tokio::join!(first, second);
    let (a, pulled_a) = first.unwrap();
    let (b, pulled_b) = second.unwrap();
    assert_eq!((pulled_a, pulled_b), (true, false));
    assert_eq!(a.dir, b.dir);
    let (_, again) = store
        .ensure_reporting(&pinned, &puller, None)
        .await
        .unwrap();
    assert!(!again, "an extracted digest is not pulled again");
}
