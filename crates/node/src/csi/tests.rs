//! Decision logic of the plugin, against a recording mounter and a fixed resolver.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Code;

use super::mount::Call;
use super::*;
use crate::api::{GpuBackend, GpuSource};
use crate::oci::{CacheLayout, Credentials, ImageInfo, PullConfig};
use crate::store::{Meta, StoreConfig};

const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const UNCLAIMED: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    resolver: Arc<StaticResolver>,
    plugin: Plugin<StaticResolver, RecordingMounter>,
}

fn h100() -> GpuInfo {
    GpuInfo {
        index: 0,
        uuid: "GPU-h100".into(),
        vendor: "nvidia".into(),
        product_name: "NVIDIA H100".into(),
        backend: GpuBackend::Cuda,
        arch: "90".into(),
        warp_size: 32,
        driver_version: None,
        source: GpuSource::Simulated,
    }
}

/// Puts an extracted digest into the store as an extraction would leave it.
fn plant(root: &Path, digest: &str, summary: Option<&str>) {
    let dir = root.join("store/sha256").join(&digest[7..]);
    std::fs::create_dir_all(dir.join("rootfs/io.triton.cache")).unwrap();
    let mut labels = std::collections::BTreeMap::new();
    if let Some(s) = summary {
        labels.insert("cache.triton.image/summary".to_string(), s.to_string());
    }
    let meta = Meta {
        image: ImageInfo {
            repository: "r.example/k".into(),
            digest: digest.into(),
            manifest_digest: digest.into(),
            layers: vec![],
            labels,
        },
        layout: CacheLayout::Mcv(crate::kernel_cache::CacheKind::Triton),
        files: 1,
        size_bytes: 1,
        entries: 1,
        private: false,
    };
    std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
}

fn env_with(cfg: PluginConfig, gpus: Vec<GpuInfo>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("gkm");
    let store = Store::open(StoreConfig {
        root: root.clone(),
        sync: false,
        ..Default::default()
    })
    .unwrap();
    plant(
        &root,
        DIGEST,
        Some(r#"{"targets":[{"backend":"cuda","arch":"90","warp_size":32}]}"#),
    );
    plant(&root, UNCLAIMED, None);
    let resolver = Arc::new(StaticResolver::default());
    let cache = |key: CacheRef, digest: Option<&str>, ns: &[&str]| ResolvedCache {
        key,
        image: "r.example/k:v1".into(),
        digest: digest.map(str::to_string),
        workload_namespaces: ns.iter().map(|s| s.to_string()).collect(),
        image_pull_secrets: vec![],
    };
    resolver.insert(cache(ns_key("team-a", "llama"), Some(DIGEST), &[]));
    resolver.insert(cache(ns_key("team-a", "unverified"), None, &[]));
    resolver.insert(cache(ns_key("team-a", "plain"), Some(UNCLAIMED), &[]));
    resolver.insert(cache(cluster_key("shared"), Some(DIGEST), &[]));
    resolver.insert(cache(cluster_key("restricted"), Some(DIGEST), &["team-b"]));
    let puller = Puller::new(PullConfig::default(), Credentials::anonymous());
    let plugin = Plugin::new(
        cfg,
        Arc::new(store),
        puller,
        resolver.clone(),
        RecordingMounter::default(),
        gpus,
    );
    Env {
        _dir: dir,
        root,
        resolver,
        plugin,
    }
}

fn env() -> Env {
    env_with(
        PluginConfig {
            node_name: "node-1".into(),
            ..Default::default()
        },
        vec![h100()],
    )
}

fn ns_key(ns: &str, name: &str) -> CacheRef {
    CacheRef::Namespaced {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn cluster_key(name: &str) -> CacheRef {
    CacheRef::Cluster { name: name.into() }
}

impl Env {
    fn target(&self, vol: &str) -> PathBuf {
        let t = self.root.join("pods").join(vol);
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
        t
    }

    fn req(&self, vol: &str, cache: CacheRef, pod_ns: &str) -> PublishRequest {
        PublishRequest {
            volume_id: vol.into(),
            target_path: self.target(vol),
            cache,
            pod_namespace: pod_ns.into(),
            pod_name: "pod".into(),
            pod_uid: "uid-1".into(),
            read_only: false,
        }
    }

    /// The writable overlay a volume of the planted digest gets (no view: the planted tree
    /// has no group files).
    fn overlay(&self, vol: &str) -> MountSpec {
        let d = self.plugin.store().volume_dirs(vol);
        MountSpec::Overlay {
            lowers: vec![self.source()],
            upper: Some(UpperDirs {
                upper: d.upper,
                work: d.work,
            }),
        }
    }

    fn source(&self) -> PathBuf {
        self.root
            .join("store/sha256")
            .join(&DIGEST[7..])
            .join("rootfs/io.triton.cache")
    }
}

#[tokio::test]
async fn publish_mounts_the_cache_tree_once_and_records_it() {
    let e = env();
    let req = e.req("vol-1", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    assert_eq!(
        e.plugin.mounter().calls(),
        [Call::Mount {
            spec: e.overlay("vol-1"),
            target: req.target_path.clone()
        }]
    );
    let dirs = e.plugin.store().volume_dirs("vol-1");
    assert!(
        dirs.upper.is_dir() && dirs.work.is_dir(),
        "private layer created"
    );
    let rec = e.plugin.store().volume("vol-1").unwrap();
    assert_eq!(
        (rec.digest.as_str(), rec.pod_namespace.as_str()),
        (DIGEST, "team-a")
    );

    // Already done: the same call again makes no kernel call.
    e.plugin.publish(&req).await.unwrap();
    assert_eq!(
        e.plugin.mounter().calls().len(),
        1,
        "already mounted: zero mount calls"
    );
}

#[tokio::test]
async fn a_publish_that_crashed_after_its_record_is_finished() {
    let e = env();
    let req = e.req("vol-crash", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    // The agent died after writing the record, before (or losing) the mount.
    e.plugin.mounter().vanish(&req.target_path);
    e.plugin.publish(&req).await.unwrap();
    assert!(e.plugin.mounter().is_mounted(&req.target_path));
    assert_eq!(e.plugin.mounter().calls().len(), 2);
}

#[tokio::test]
async fn a_running_pod_keeps_its_digest_after_the_cache_changes() {
    let e = env();
    let req = e.req("vol-keep", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    // The cache now points at another digest; the retry of this volume keeps the old one.
    e.resolver.insert(ResolvedCache {
        key: ns_key("team-a", "llama"),
        image: "r.example/k:v2".into(),
        digest: Some(UNCLAIMED.into()),
        workload_namespaces: vec![],
        image_pull_secrets: vec![],
    });
    e.plugin.publish(&req).await.unwrap();
    assert_eq!(e.plugin.store().volume("vol-keep").unwrap().digest, DIGEST);
    assert_eq!(e.plugin.mounter().calls().len(), 1);
}

#[tokio::test]
async fn the_same_volume_at_another_target_is_already_exists() {
    let e = env();
    e.plugin
        .publish(&e.req("vol-2", ns_key("team-a", "llama"), "team-a"))
        .await
        .unwrap();
    let mut other = e.req("vol-2", ns_key("team-a", "llama"), "team-a");
    other.target_path = e.target("elsewhere");
    let err = e.plugin.publish(&other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
}

#[tokio::test]
async fn namespaces_are_isolated() {
    let e = env();
    let err = e
        .plugin
        .publish(&e.req("v", ns_key("team-a", "llama"), "team-b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.to_string().contains("team-a") && err.to_string().contains("team-b"),
        "{err}"
    );

    let err = e
        .plugin
        .publish(&e.req("v", cluster_key("restricted"), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.to_string().contains("workloadNamespaces"), "{err}");

    e.plugin
        .publish(&e.req("v1", cluster_key("restricted"), "team-b"))
        .await
        .unwrap();
    e.plugin
        .publish(&e.req("v2", cluster_key("shared"), "anyone"))
        .await
        .unwrap();
    assert!(e.plugin.mounter().calls().len() == 2);
    assert!(
        e.plugin.store().volume("v").is_none(),
        "a denied publish records nothing"
    );
}

#[tokio::test]
async fn unknown_and_unverified_caches() {
    let e = env();
    let err = e
        .plugin
        .publish(&e.req("v", ns_key("team-a", "nope"), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = e
        .plugin
        .publish(&e.req("v", ns_key("team-a", "unverified"), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(e.plugin.mounter().calls().is_empty());
}

#[tokio::test]
async fn incompatible_gpus_fail_the_precondition_with_reasons() {
    let mut a100 = h100();
    a100.uuid = "GPU-a100".into();
    a100.arch = "80".into();
    let e = env_with(
        PluginConfig {
            node_name: "node-a100".into(),
            ..Default::default()
        },
        vec![a100],
    );
    let err = e
        .plugin
        .publish(&e.req("v", ns_key("team-a", "llama"), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("GPU-a100") && msg.contains("node-a100") && msg.contains("80"),
        "{msg}"
    );
    assert!(e.plugin.store().volume("v").is_none());

    let none = env_with(PluginConfig::default(), vec![]);
    let err = none
        .plugin
        .publish(&none.req("v", ns_key("team-a", "llama"), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn images_without_gpu_claims_follow_the_policy() {
    let e = env();
    e.plugin
        .publish(&e.req("v", ns_key("team-a", "plain"), "team-a"))
        .await
        .unwrap();
    let strict = env_with(
        PluginConfig {
            allow_unclaimed: false,
            ..Default::default()
        },
        vec![h100()],
    );
    let err = strict
        .plugin
        .publish(&strict.req("v", ns_key("team-a", "plain"), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn a_failed_mount_leaves_no_record() {
    let e = env();
    *e.plugin.mounter().fail_next_mount.lock().unwrap() = Some(1); // EPERM
    let err = e
        .plugin
        .publish(&e.req("v", ns_key("team-a", "llama"), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(
        e.plugin.store().volume("v").is_none(),
        "refcounts stay exact"
    );
    assert!(
        !e.plugin.store().volume_dirs("v").dir.exists(),
        "no private layer left behind"
    );
}

#[tokio::test]
async fn unpublish_is_idempotent_and_survives_a_vanished_mount() {
    let e = env();
    let req = e.req("vol-u", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    e.plugin.unpublish("vol-u", &req.target_path).await.unwrap();
    assert_eq!(
        e.plugin.mounter().calls()[1],
        Call::Unmount(req.target_path.clone())
    );
    assert!(!req.target_path.exists(), "target removed");
    assert_eq!(e.plugin.store().refcount(DIGEST), 0);
    assert!(
        !e.plugin.store().volume_dirs("vol-u").dir.exists(),
        "the private layer goes with the volume"
    );

    // Again: nothing to do, no kernel call, OK.
    e.plugin.unpublish("vol-u", &req.target_path).await.unwrap();
    assert_eq!(e.plugin.mounter().calls().len(), 2);

    // A mount that vanished behind the plugin's back.
    let req = e.req("vol-v", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    e.plugin.mounter().vanish(&req.target_path);
    e.plugin.unpublish("vol-v", &req.target_path).await.unwrap();
    assert!(
        !e.plugin
            .mounter()
            .calls()
            .contains(&Call::Unmount(req.target_path.clone()))
    );
    assert!(e.plugin.store().volume("vol-v").is_none());
}

#[tokio::test]
async fn concurrent_calls_for_one_volume_are_aborted() {
    let e = env();
    let _held = e.plugin.lock_volume("vol-busy").unwrap();
    let err = e
        .plugin
        .unpublish("vol-busy", &e.target("vol-busy"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
}

fn publish_request(vol: &str, target: &str, ctx: &[(&str, &str)]) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.into(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode { mode: 1 }),
        }),
        volume_context: ctx
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

#[test]
fn validation_names_the_bad_field() {
    let pod = (CTX_POD_NAMESPACE, "ns");
    let ok = publish_request(
        "v",
        "/var/lib/kubelet/pods/u/volumes/x/mount",
        &[(ATTR_CACHE, "c"), (ATTR_NAMESPACE, "ns"), pod],
    );
    assert_eq!(validate_publish(&ok).unwrap().cache, ns_key("ns", "c"));
    let cluster = publish_request("v", "/t", &[(ATTR_CACHE, "c"), pod]);
    assert_eq!(
        validate_publish(&cluster).unwrap().cache,
        cluster_key("c"),
        "no namespace: the cluster cache"
    );

    let cases: Vec<(pb::NodePublishVolumeRequest, &str)> = vec![
        (
            publish_request("", "/t", &[(ATTR_CACHE, "c"), pod]),
            "volume_id",
        ),
        (
            publish_request("v", "", &[(ATTR_CACHE, "c"), pod]),
            "target_path",
        ),
        (
            publish_request("v", "relative/t", &[(ATTR_CACHE, "c"), pod]),
            "not absolute",
        ),
        (
            publish_request("v", "/a/../t", &[(ATTR_CACHE, "c"), pod]),
            "not normalised",
        ),
        (
            publish_request("v", "/a//t", &[(ATTR_CACHE, "c"), pod]),
            "not normalised",
        ),
        (
            publish_request("v", "/a/t/", &[(ATTR_CACHE, "c"), pod]),
            "not normalised",
        ),
        (publish_request("v", "/t", &[pod]), "is required"),
        (
            publish_request(
                "v",
                "/t",
                &[(ATTR_CACHE, "c"), (ATTR_CLUSTER_CACHE, "d"), pod],
            ),
            "not both",
        ),
        (
            publish_request(
                "v",
                "/t",
                &[(ATTR_CLUSTER_CACHE, "d"), (ATTR_NAMESPACE, "x"), pod],
            ),
            "does not apply",
        ),
        (
            publish_request("v", "/t", &[(ATTR_CACHE, "c")]),
            "pod.namespace",
        ),
        (
            pb::NodePublishVolumeRequest {
                volume_capability: None,
                ..publish_request("v", "/t", &[(ATTR_CACHE, "c"), pod])
            },
            "volume_capability",
        ),
        (
            pb::NodePublishVolumeRequest {
                volume_capability: Some(pb::VolumeCapability {
                    access_type: Some(pb::volume_capability::AccessType::Block(Default::default())),
                    access_mode: Some(pb::volume_capability::AccessMode { mode: 1 }),
                }),
                ..publish_request("v", "/t", &[(ATTR_CACHE, "c"), pod])
            },
            "block",
        ),
    ];
    for (req, words) in cases {
        let err = validate_publish(&req).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(
            err.to_string().contains(words),
            "{err:?} should mention {words:?}"
        );
    }
}

#[tokio::test]
async fn records_of_vanished_mounts_are_dropped_at_start() {
    let e = env();
    let live = e.req("vol-live", ns_key("team-a", "llama"), "team-a");
    let gone = e.req("vol-gone", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&live).await.unwrap();
    e.plugin.publish(&gone).await.unwrap();
    e.plugin.mounter().vanish(&gone.target_path);
    assert_eq!(e.plugin.reconcile_records().unwrap(), 1);
    assert!(e.plugin.store().volume("vol-live").is_some());
    assert!(e.plugin.store().volume("vol-gone").is_none());
    assert_eq!(e.plugin.store().refcount(DIGEST), 1);
}

/// A listener that keeps every event.
fn events(e: &Env) -> Arc<Mutex<Vec<VolumeEvent>>> {
    let seen: Arc<Mutex<Vec<VolumeEvent>>> = Arc::default();
    let s = seen.clone();
    e.plugin
        .on_volume_change(Box::new(move |ev| s.lock().unwrap().push(ev.clone())));
    seen
}

fn warnings(seen: &Mutex<Vec<VolumeEvent>>) -> Vec<(&'static str, String)> {
    seen.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            VolumeEvent::Warning {
                reason, message, ..
            } => Some((*reason, message.clone())),
            _ => None,
        })
        .collect()
}

/// Gives the planted digest a Triton kernel whose group file names `/capture`.
fn plant_kernel(e: &Env) {
    let key = e.source().join("KEYA");
    std::fs::create_dir_all(&key).unwrap();
    std::fs::write(key.join("k.cubin"), b"\x7fELF").unwrap();
    std::fs::write(
        key.join("k.json"),
        br#"{"name":"k","triton_version":"3.6.0","target":{"backend":"cuda","arch":90,"warp_size":32}}"#,
    )
    .unwrap();
    std::fs::write(
        key.join("__grp__k.json"),
        br#"{"child_paths":{"k.cubin":"/capture/KEYA/k.cubin","k.json":"/capture/KEYA/k.json"}}"#,
    )
    .unwrap();
}

/// A pod whose container mounts volume `kernels` at `path`, and a kubelet-shaped target.
fn pod_at(e: &Env, pods: &StaticPods, path: &str) -> PublishRequest {
    let mut req = e.req("vol-k", ns_key("team-a", "llama"), "team-a");
    req.target_path = e
        .root
        .join("kubelet/pods/uid-1/volumes/kubernetes.io~csi/kernels/mount");
    std::fs::create_dir_all(req.target_path.parent().unwrap()).unwrap();
    pods.insert(
        "team-a",
        "pod",
        PodMounts {
            uid: "uid-1".into(),
            volumes: vec![("kernels".into(), DRIVER_NAME.into())],
            containers: vec![(
                "containers[0] \"app\"".into(),
                vec![pods::VolumeMountInfo {
                    volume: "kernels".into(),
                    mount_path: path.into(),
                    ..Default::default()
                }],
            )],
        },
    );
    req
}

#[tokio::test]
async fn a_view_for_the_pods_mount_path_sits_above_the_shared_tree() {
    let e = env();
    plant_kernel(&e);
    let pods = Arc::new(StaticPods::default());
    e.plugin.set_pod_source(pods.clone());
    let seen = events(&e);
    let req = pod_at(&e, &pods, "/opt/kernels");
    e.plugin.publish(&req).await.unwrap();

    let Some(MountSpec::Overlay { lowers, upper }) = e.plugin.mounter().mounted(&req.target_path)
    else {
        panic!("not an overlay");
    };
    assert!(upper.is_some(), "writable by default");
    assert_eq!(lowers.len(), 2, "{lowers:?}");
    assert_eq!(lowers[1], e.source(), "the shared tree at the bottom");
    let grp = std::fs::read(lowers[0].join("KEYA/__grp__k.json")).unwrap();
    let children = crate::kernel_cache::triton::parse_group(&grp).unwrap();
    assert_eq!(children["k.cubin"], "/opt/kernels/KEYA/k.cubin");
    assert_eq!(
        std::fs::read(e.source().join("KEYA/__grp__k.json")).unwrap(),
        br#"{"child_paths":{"k.cubin":"/capture/KEYA/k.cubin","k.json":"/capture/KEYA/k.json"}}"#,
        "the shared tree is never modified"
    );
    assert!(warnings(&seen).is_empty(), "{:?}", warnings(&seen));
    let rec = e.plugin.store().volume("vol-k").unwrap();
    assert!(matches!(
        rec.mount,
        VolumeMount::Overlay { writable: true, base: Some(ref b), .. } if b.path == "/opt/kernels"
    ));

    // A second pod at the same path shares the view.
    let mut second = req.clone();
    second.volume_id = "vol-k2".into();
    second.pod_uid = String::new();
    second.target_path = e.target("vol-k2");
    e.plugin.publish(&second).await.unwrap();
    let Some(MountSpec::Overlay { lowers: l2, .. }) =
        e.plugin.mounter().mounted(&second.target_path)
    else {
        panic!("not an overlay");
    };
    assert_eq!(l2[0], lowers[0], "one view per digest and path");
}

#[tokio::test]
async fn a_read_only_volume_still_hits_through_a_read_only_overlay() {
    let e = env();
    plant_kernel(&e);
    let pods = Arc::new(StaticPods::default());
    e.plugin.set_pod_source(pods.clone());
    let mut req = pod_at(&e, &pods, "/cache");
    req.read_only = true;
    e.plugin.publish(&req).await.unwrap();
    let Some(MountSpec::Overlay { lowers, upper }) = e.plugin.mounter().mounted(&req.target_path)
    else {
        panic!("not an overlay");
    };
    assert_eq!((lowers.len(), upper), (2, None));
    assert!(!e.plugin.store().volume_dirs("vol-k").dir.exists());

    // Without group files there is nothing to rewrite: a plain read-only bind.
    let plain = e.req("vol-plain", ns_key("team-a", "plain"), "team-a");
    let plain = PublishRequest {
        read_only: true,
        ..plain
    };
    e.plugin.publish(&plain).await.unwrap();
    assert!(matches!(
        e.plugin.mounter().mounted(&plain.target_path),
        Some(MountSpec::Bind { .. })
    ));
}

#[tokio::test]
async fn a_store_that_cannot_hold_a_writable_layer_falls_back_to_read_only_with_a_warning() {
    let e = env();
    *e.plugin.mounter().refuse_upper.lock().unwrap() = Some(22); // EINVAL, as overlayfs says
    let why = e.plugin.probe_upper_layers().unwrap_err();
    assert!(
        why.contains("cannot hold an overlay's writable layer"),
        "{why}"
    );
    let seen = events(&e);
    let req = e.req("vol-ro", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    assert!(
        !e.plugin
            .mounter()
            .mounted(&req.target_path)
            .unwrap()
            .writable()
    );
    let w = warnings(&seen);
    assert!(
        w.iter()
            .any(|(r, m)| *r == reasons::READ_ONLY_FALLBACK && m.contains("EROFS")),
        "{w:?}"
    );
    let overlays = e.root.join("overlays");
    assert_eq!(
        std::fs::read_dir(&overlays).unwrap().count(),
        0,
        "a read-only volume has no private layer, and the probe left nothing"
    );
}

#[tokio::test]
async fn a_pod_the_agent_cannot_see_still_mounts_with_a_warning() {
    let e = env_with(
        PluginConfig {
            node_name: "node-1".into(),
            pod_wait: Duration::from_millis(100),
            ..Default::default()
        },
        vec![h100()],
    );
    plant_kernel(&e);
    e.plugin.set_pod_source(Arc::new(StaticPods::default()));
    let seen = events(&e);
    let req = e.req("vol-unseen", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    let spec = e.plugin.mounter().mounted(&req.target_path).unwrap();
    assert!(spec.writable(), "misses compile into the private layer");
    let w = warnings(&seen);
    assert!(
        w.iter()
            .any(|(r, m)| *r == reasons::MOUNT_PATH && m.contains("team-a/pod")),
        "{w:?}"
    );
}

#[tokio::test]
async fn an_unpublish_counts_what_the_pod_compiled_and_says_why() {
    let e = env();
    plant_kernel(&e);
    let seen = events(&e);
    let req = e.req("vol-miss", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    // What a miss leaves in the private layer: a kernel of another Triton.
    let upper = e.plugin.store().volume_dirs("vol-miss").upper;
    let key = upper.join("NEWKEY");
    std::fs::create_dir_all(&key).unwrap();
    std::fs::write(
        key.join("k2.json"),
        br#"{"name":"k2","triton_version":"3.5.0","target":{"backend":"cuda","arch":90,"warp_size":32}}"#,
    )
    .unwrap();
    std::fs::write(key.join("__grp__k2.json"), b"{\"child_paths\":{}}").unwrap();
    e.plugin
        .unpublish("vol-miss", &req.target_path)
        .await
        .unwrap();
    let ev = seen.lock().unwrap().clone();
    let (compiled, why) = ev
        .iter()
        .find_map(|e| match e {
            VolumeEvent::Unpublished { compiled, why, .. } => Some((compiled.clone(), why.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(compiled.kernels, 1);
    let why = why.unwrap();
    assert!(why.contains("pod team-a/pod"), "{why}");
    let usage = e
        .plugin
        .store()
        .usage("GKMCache/team-a/llama", DIGEST)
        .unwrap();
    assert_eq!((usage.pods_served, usage.kernels_compiled), (1, 1));
    assert!(!upper.exists(), "the layer goes with the volume");
}

#[tokio::test]
async fn a_crash_between_record_and_mount_gets_a_fresh_private_layer() {
    let e = env();
    let req = e.req("vol-c", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    let upper = e.plugin.store().volume_dirs("vol-c").upper;
    std::fs::write(upper.join("stale"), b"from the lost mount").unwrap();
    e.plugin.mounter().vanish(&req.target_path);
    e.plugin.publish(&req).await.unwrap();
    assert!(e.plugin.mounter().is_mounted(&req.target_path));
    assert!(!upper.join("stale").exists(), "a new mount starts empty");
}

#[tokio::test]
async fn writable_false_and_csi_readonly_both_ask_for_read_only() {
    let pod = (CTX_POD_NAMESPACE, "ns");
    let ro = publish_request(
        "v",
        "/t",
        &[(ATTR_CACHE, "c"), pod, (ATTR_WRITABLE, "False")],
    );
    assert!(validate_publish(&ro).unwrap().read_only);
    let mut csi_ro = publish_request("v", "/t", &[(ATTR_CACHE, "c"), pod]);
    csi_ro.readonly = true;
    assert!(validate_publish(&csi_ro).unwrap().read_only);
    let rw = publish_request("v", "/t", &[(ATTR_CACHE, "c"), pod]);
    assert!(!validate_publish(&rw).unwrap().read_only);
    let bad = publish_request("v", "/t", &[(ATTR_CACHE, "c"), pod, (ATTR_WRITABLE, "yes")]);
    let err = validate_publish(&bad).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.to_string().contains(ATTR_WRITABLE), "{err}");
}

#[tokio::test]
async fn volume_ids_of_any_bytes_up_to_128_work_and_longer_ones_are_invalid() {
    let e = env();
    for id in [
        ":".repeat(128),
        "../".repeat(42),
        "é".repeat(64),
        format!("csi-{}", "f".repeat(124)),
        "a\u{0}b with spaces/and/slashes".to_string(),
    ] {
        assert!(id.len() <= 128, "{}", id.len());
        let mut req = e.req("x", ns_key("team-a", "llama"), "team-a");
        req.volume_id = id.clone();
        e.plugin
            .publish(&req)
            .await
            .unwrap_or_else(|err| panic!("{id:?}: {err}"));
        assert_eq!(e.plugin.store().volume(&id).unwrap().volume_id, id);
        e.plugin.unpublish(&id, &req.target_path).await.unwrap();
        assert!(e.plugin.store().volume(&id).is_none());
    }
    let long = "v".repeat(129);
    let err = validate_volume_id(&long).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.to_string().contains("129 bytes"), "{err}");
    assert!(
        err.to_string().len() < 200,
        "the message quotes a prefix only: {err}"
    );
}

#[tokio::test]
async fn a_target_that_is_already_a_foreign_mount_is_neither_mounted_over_nor_removed() {
    let e = env();
    let req = e.req("vol-f", ns_key("team-a", "llama"), "team-a");
    std::fs::create_dir_all(&req.target_path).unwrap();
    let tmpfs = MountSpec::Bind {
        source: PathBuf::from("/somebody/else"),
    };
    e.plugin.mounter().plant(&req.target_path, tmpfs.clone());
    let err = e.plugin.publish(&req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("GKM did not make"), "{err}");
    assert!(
        e.plugin.store().volume("vol-f").is_none(),
        "nothing recorded"
    );
    // Unpublish of that target, with or without a record, leaves the foreign mount.
    let err = e
        .plugin
        .unpublish("vol-f", &req.target_path)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(
        e.plugin.mounter().mounted(&req.target_path),
        Some(tmpfs.clone())
    );

    // A foreign mount stacked on a published volume: unpublish refuses and keeps the
    // record, so a later unpublish (once it is gone) still cleans up.
    let req = e.req("vol-s", ns_key("team-a", "llama"), "team-a");
    e.plugin.publish(&req).await.unwrap();
    e.plugin.mounter().plant(&req.target_path, tmpfs.clone());
    let err = e
        .plugin
        .unpublish("vol-s", &req.target_path)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(e.plugin.store().volume("vol-s").is_some());
    e.plugin.mounter().vanish(&req.target_path);
    e.plugin.unpublish("vol-s", &req.target_path).await.unwrap();
    assert!(e.plugin.store().volume("vol-s").is_none());
    assert!(
        !e.plugin
            .mounter()
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Unmount(t) if *t == e.target("vol-f"))),
        "the foreign mount was never unmounted"
    );
}
