//! A cache that hits: real Triton (PyPI's wheel, compiling for GPU targets on the CPU)
//! captures a cache in one directory; `gkm build` packages it; the agent pulls it and
//! publishes it through its CSI socket; the container runtime's part is played by a bind
//! mount of the volume's target path onto the container's `mountPath`, a *different* path
//! that only the Pod object (in the real API server, read by the agent's pod watch) names.
//! Triton's own `FileCacheManager` then decides hit or miss there, as in a pod: every group
//! resolves and a compile of the same kernels writes nothing; a new kernel compiles into
//! the volume's private layer; the shared tree stays byte-identical; another pod does not
//! see the first pod's writes; unpublish removes the private layer; the node status counts
//! what pods compiled; a strictly read-only volume still hits and refuses the miss. The same
//! for an Inductor tree and for the real caches captured on an H200 (`tests/fixtures/h200`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gkm::api::{GKMCache, GKMCacheNode, RESOLVED_DIGEST_ANNOTATION};
use gkm::csi::pb;
use gkm::csi::pb::node_client::NodeClient;
use gkm_testenv::agent::{AgentOptions, AgentProcess, deployed_kubeconfig};
use gkm_testenv::triton::Triton;
use gkm_testenv::{shared_cluster, shared_registry, unique_name};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

const GPUS: &str = "gpus:\n  - uuid: GPU-sim-h100\n    productName: NVIDIA H100\n    backend: cuda\n    arch: \"90\"\n  - uuid: GPU-sim-mi300\n    productName: AMD MI300X\n    backend: hip\n    arch: gfx942\n";
const TARGETS: [&str; 2] = ["cuda:90:32", "hip:gfx942:64"];

/// An agent on a node of its own.
struct Node {
    agent: AgentProcess,
    name: String,
    dir: tempfile::TempDir,
}

/// A pod on the node with its volume published and "mounted in its container".
struct PodVolume {
    name: String,
    uid: String,
    target: PathBuf,
    /// Where the container sees the volume (its `mountPath`).
    mount_path: PathBuf,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let name = unique_name("hit-node");
        let agent = AgentProcess::start(
            dir.path(),
            &AgentOptions {
                binary: PathBuf::from(env!("CARGO_BIN_EXE_gkm-agent")),
                node: name.clone(),
                kubeconfig: deployed_kubeconfig(shared_cluster()).await.unwrap(),
                insecure_registries: vec![shared_registry().host().to_string()],
                gpus: GPUS.into(),
                extra: vec!["--miss-scan-interval-seconds=1".into()],
            },
        )
        .unwrap();
        Node { agent, name, dir }
    }

    async fn client(&self) -> NodeClient<tonic::transport::Channel> {
        match gkm::csi::server::connect_ready(self.agent.socket(), Duration::from_secs(30)).await {
            Ok(ch) => NodeClient::new(ch),
            Err(why) => panic!("agent not ready ({why}):\n{}", self.agent.log()),
        }
    }

    /// Creates a Pod on this node whose container mounts the cache's volume `kernels` at a
    /// path of its own, publishes the volume as kubelet would, and binds the target onto
    /// that path as the container runtime would.
    async fn pod(&self, ns: &str, cache: &str, attrs: &[(&str, &str)]) -> PodVolume {
        let name = unique_name("pod");
        let mount_path = self.dir.path().join("containers").join(&name).join("cache");
        std::fs::create_dir_all(&mount_path).unwrap();
        let mut volume_attributes: BTreeMap<String, String> = [
            ("csi.gkm.io/GKMCache".to_string(), cache.to_string()),
            ("csi.gkm.io/namespace".to_string(), ns.to_string()),
        ]
        .into();
        for (k, v) in attrs {
            volume_attributes.insert(k.to_string(), v.to_string());
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "nodeName": self.name,
                "containers": [{"name": "app", "image": "busybox",
                    "volumeMounts": [{"name": "kernels", "mountPath": mount_path.display().to_string()}]}],
                "volumes": [{"name": "kernels", "csi": {"driver": "csi.gkm.io",
                    "volumeAttributes": volume_attributes.clone()}}],
            }
        }))
        .unwrap();
        let api: Api<Pod> = Api::namespaced(shared_cluster().admin_client().await.unwrap(), ns);
        let uid = api
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap();
        let target = self.agent.target(&uid, "kernels");
        let mut ctx: HashMap<String, String> = volume_attributes.into_iter().collect();
        ctx.insert(gkm::csi::CTX_POD_NAME.into(), name.clone());
        ctx.insert(gkm::csi::CTX_POD_NAMESPACE.into(), ns.into());
        ctx.insert(gkm::csi::CTX_POD_UID.into(), uid.clone());
        ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        let req = pb::NodePublishVolumeRequest {
            volume_id: format!(
                "csi-{}",
                hex::encode(Sha256::digest(format!("{uid}kernels")))
            ),
            target_path: target.display().to_string(),
            volume_capability: Some(pb::VolumeCapability {
                access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
                access_mode: Some(pb::volume_capability::AccessMode {
                    mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }),
            volume_context: ctx,
            ..Default::default()
        };
        self.client()
            .await
            .node_publish_volume(req)
            .await
            .unwrap_or_else(|e| panic!("publish: {e}\n{}", self.agent.log()));
        // The container runtime's bind of the volume into the container.
        rustix::mount::mount_bind_recursive(&target, &mount_path).unwrap();
        PodVolume {
            name,
            uid,
            target,
            mount_path,
        }
    }

    async fn unpublish(&self, p: &PodVolume) {
        rustix::mount::unmount(&p.mount_path, rustix::mount::UnmountFlags::DETACH).unwrap();
        let req = pb::NodeUnpublishVolumeRequest {
            volume_id: format!(
                "csi-{}",
                hex::encode(Sha256::digest(format!("{}kernels", p.uid)))
            ),
            target_path: p.target.display().to_string(),
        };
        self.client()
            .await
            .node_unpublish_volume(req)
            .await
            .unwrap();
    }

    /// The volume's private layer (the agent names it after the volume id).
    fn upper(&self, p: &PodVolume) -> PathBuf {
        let id = format!(
            "csi-{}",
            hex::encode(Sha256::digest(format!("{}kernels", p.uid)))
        );
        self.agent
            .store()
            .join("overlays")
            .join(gkm::store::volume_key(&id))
            .join("upper")
    }

    /// The shared extracted tree of `digest`: every file and its sha256.
    fn shared_tree(&self, digest: &str) -> BTreeMap<String, String> {
        let root = self
            .agent
            .store()
            .join("store/sha256")
            .join(digest.trim_start_matches("sha256:"))
            .join("rootfs");
        gkm_testenv::fixtures::hash_tree(&root).unwrap()
    }
}

/// `gkm build DIR --kind KIND -t REPO:v1`, pushed to the shared registry; the digest.
fn gkm_build(dir: &Path, kind: &str) -> (String, String) {
    let repo = format!(
        "{}/{}",
        shared_registry().host(),
        unique_name("hit/kernels")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_gkm"))
        .arg("build")
        .arg(dir)
        .args(["--kind", kind, "-t", &format!("{repo}:v1")])
        .arg(format!("--insecure-registry={}", shared_registry().host()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gkm build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let digest = line.rsplit_once('@').unwrap().1.to_string();
    (format!("{repo}:v1"), digest)
}

/// A GKMCache as the webhook leaves it (image by tag, verified digest annotated).
async fn cache(ns: &str, image: &str, digest: &str) -> String {
    let name = unique_name("kernels");
    let api: Api<GKMCache> = Api::namespaced(shared_cluster().admin_client().await.unwrap(), ns);
    let mut c = GKMCache::new(&name, Default::default());
    c.spec.image = image.to_string();
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), digest.to_string())].into());
    api.create(&PostParams::default(), &c).await.unwrap();
    name
}

/// Waits for this node's GKMCacheNode to report `f` of the cache's digest entry.
async fn wait_status(
    ns: &str,
    node: &Node,
    cache: &str,
    digest: &str,
    what: &str,
    f: impl Fn(&gkm::api::CacheDigestStatus) -> bool,
) -> gkm::api::CacheDigestStatus {
    let api: Api<GKMCacheNode> =
        Api::namespaced(shared_cluster().admin_client().await.unwrap(), ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = api
            .get_opt(&node.name)
            .await
            .unwrap()
            .and_then(|n| n.status)
            .and_then(|s| s.caches.get(cache).and_then(|m| m.get(digest)).cloned());
        if let Some(e) = e.as_ref().filter(|e| f(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "node status never showed {what}: {e:?}\nagent log:\n{}",
            node.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The notes of Events with `reason` about `regarding` in `ns`.
async fn events(ns: &str, regarding: &str, reason: &str) -> Vec<String> {
    shared_cluster()
        .events_about(ns, regarding)
        .await
        .unwrap()
        .into_iter()
        .filter(|(r, _)| r == reason)
        .map(|(_, note)| note)
        .collect()
}

#[tokio::test]
async fn a_triton_cache_captured_elsewhere_hits_at_the_pods_mount_path() {
    let triton = Triton::locate().unwrap();
    let work = tempfile::tempdir().unwrap();
    let capture = work.path().join("capture/triton");
    let c = triton.capture(&capture, &TARGETS).unwrap();
    assert_eq!((c.kernels, c.error.as_deref()), (6, None), "{c:?}");
    let (image, digest) = gkm_build(&capture, "triton");
    // Nothing may resolve through the capture directory: a pod never sees it.
    std::fs::remove_dir_all(&capture).unwrap();

    let node = Node::start().await;
    let ns = shared_cluster().new_namespace("hit").await.unwrap();
    let name = cache(&ns, &image, &digest).await;

    let a = node.pod(&ns, &name, &[]).await;
    let tree = node.shared_tree(&digest);
    let l = triton.lookup(&a.mount_path).unwrap();
    assert_eq!(
        (l.groups, l.resolved),
        (6, 6),
        "every group resolves at the pod's path: {l:?}"
    );
    let hit = triton.compile(&a.mount_path, &TARGETS, false).unwrap();
    assert_eq!(hit.error, None, "{hit:?}");
    assert!(hit.written.is_empty(), "a hit writes nothing: {hit:?}");

    let miss = triton
        .compile(&a.mount_path, &["cuda:90:32"], true)
        .unwrap();
    assert_eq!(miss.error, None, "a miss compiles without error: {miss:?}");
    assert!(!miss.written.is_empty(), "{miss:?}");
    let upper = node.upper(&a);
    for w in &miss.written {
        assert!(upper.join(w).is_file(), "{w} is in the pod's private layer");
    }
    assert_eq!(
        node.shared_tree(&digest),
        tree,
        "the shared tree is byte-identical"
    );

    // A second pod: its own path, none of the first pod's writes.
    let b = node.pod(&ns, &name, &[]).await;
    assert_eq!(triton.lookup(&b.mount_path).unwrap().resolved, 6);
    for w in &miss.written {
        assert!(
            !b.mount_path.join(w).exists(),
            "{w} leaked into another pod's volume"
        );
    }

    // While the pod runs, the agent's scan already counts the miss.
    wait_status(&ns, &node, &name, &digest, "kernels compiled so far", |e| {
        e.kernels_compiled.unwrap_or(0) >= 1
    })
    .await;
    node.unpublish(&a).await;
    assert!(!upper.exists(), "unpublish removes the private layer");
    let e = wait_status(&ns, &node, &name, &digest, "the final counts", |e| {
        e.pods_served == Some(2) && e.last_miss.is_some()
    })
    .await;
    assert_eq!(
        e.kernels_compiled,
        Some(
            miss.written
                .iter()
                .filter(|w| w.contains("__grp__"))
                .count() as i64
        )
    );
    assert!(e.last_miss.as_deref().unwrap().contains(&a.name), "{e:?}");
    assert_eq!(e.triton_versions, ["3.6.0"]);
    assert_eq!(
        e.capture_path.as_deref(),
        Some(capture.to_str().unwrap()),
        "the capture path is recorded"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&ns, &name, "KernelsCompiled").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no KernelsCompiled Event on the cache"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Strictly read-only: still a hit (the view is a read-only layer), and a miss fails.
    let ro = node
        .pod(&ns, &name, &[("csi.gkm.io/writable", "false")])
        .await;
    assert_eq!(triton.lookup(&ro.mount_path).unwrap().resolved, 6);
    let hit = triton.compile(&ro.mount_path, &TARGETS, false).unwrap();
    assert_eq!(
        (hit.error.as_deref(), hit.written.len()),
        (None, 0),
        "{hit:?}"
    );
    let refused = triton
        .compile(&ro.mount_path, &["cuda:90:32"], true)
        .unwrap();
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or("")
            .contains("Read-only file system"),
        "{refused:?}"
    );
    for p in [&b, &ro] {
        node.unpublish(p).await;
    }
}

#[tokio::test]
async fn an_inductor_cache_hits_under_its_triton_device_folder() {
    let triton = Triton::locate().unwrap();
    let work = tempfile::tempdir().unwrap();
    let capture = work.path().join("inductor");
    // Inductor points Triton at <TORCHINDUCTOR_CACHE_DIR>/triton/<device>.
    let c = triton
        .capture(&capture.join("triton/0"), &["cuda:90:32"])
        .unwrap();
    assert_eq!(c.error, None, "{c:?}");
    std::fs::create_dir_all(capture.join("fxgraph/ab")).unwrap();
    std::fs::write(capture.join("fxgraph/ab/entry"), b"pickled graph").unwrap();
    let (image, digest) = gkm_build(&capture, "inductor");
    std::fs::remove_dir_all(&capture).unwrap();

    let node = Node::start().await;
    let ns = shared_cluster().new_namespace("hit").await.unwrap();
    let name = cache(&ns, &image, &digest).await;
    let p = node.pod(&ns, &name, &[]).await;
    let dir = p.mount_path.join("triton/0");
    let l = triton.lookup(&dir).unwrap();
    assert_eq!((l.groups, l.resolved), (3, 3), "{l:?}");
    let hit = triton.compile(&dir, &["cuda:90:32"], false).unwrap();
    assert_eq!(
        (hit.error.as_deref(), hit.written.len()),
        (None, 0),
        "{hit:?}"
    );
    assert_eq!(
        std::fs::read(p.mount_path.join("fxgraph/ab/entry")).unwrap(),
        b"pickled graph"
    );
    let miss = triton.compile(&dir, &["cuda:90:32"], true).unwrap();
    assert_eq!(miss.error, None, "{miss:?}");
    assert!(node.upper(&p).join("triton/0").is_dir());
    node.unpublish(&p).await;
}

/// The real caches captured on an H200: every group of the Triton tree and of the Inductor
/// tree resolves at another path. (The kernels cannot be compiled again here: their keys
/// hash the H200 machine's Triton build, so a compile would miss; the lookup is the part of
/// Triton that decides hit or miss for a key.)
#[tokio::test]
async fn the_h200_caches_resolve_at_another_path() {
    let triton = Triton::locate().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fixture =
        gkm_testenv::workspace_root().join("tests/fixtures/h200/h200-triton-inductor-caches.tgz");
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (tc_image, tc_digest) = gkm_build(&work.path().join("tc"), "triton");
    let (ic_image, ic_digest) = gkm_build(&work.path().join("ic"), "inductor");

    let node = Node::start().await;
    let ns = shared_cluster().new_namespace("hit").await.unwrap();
    let tc = cache(&ns, &tc_image, &tc_digest).await;
    let ic = cache(&ns, &ic_image, &ic_digest).await;

    let t = node.pod(&ns, &tc, &[]).await;
    let l = triton.lookup(&t.mount_path).unwrap();
    assert_eq!((l.groups, l.resolved), (6, 6), "{l:?}");
    let tree = node.shared_tree(&tc_digest);
    let miss = triton
        .compile(&t.mount_path, &["cuda:90:32"], true)
        .unwrap();
    assert_eq!(miss.error, None, "{miss:?}");
    assert_eq!(node.shared_tree(&tc_digest), tree);
    let e = wait_status(&ns, &node, &tc, &tc_digest, "labels", |e| {
        e.capture_path.is_some()
    })
    .await;
    assert_eq!(e.capture_path.as_deref(), Some("/tmp/tc"));
    assert_eq!(e.triton_versions, ["3.6.0"]);
    assert_eq!(e.python_abis, ["cpython-312-x86_64-linux-gnu"]);

    let i = node.pod(&ns, &ic, &[]).await;
    let l = triton.lookup(&i.mount_path.join("triton/0")).unwrap();
    assert!(l.groups >= 10, "{l:?}");
    assert_eq!(l.resolved, l.groups, "{l:?}");
    for p in [&t, &i] {
        node.unpublish(p).await;
    }
}
