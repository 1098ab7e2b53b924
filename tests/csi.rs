//! The CSI plugin with real mounts (root), driven over its unix socket the way kubelet
//! drives it for an inline ephemeral volume, against a real API server and registry.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gkm::api::{ClusterGKMCache, GKMCache, RESOLVED_DIGEST_ANNOTATION};
use gkm::csi::pb;
use gkm::csi::pb::node_client::NodeClient;
use gkm::csi::{
    ATTR_CACHE, ATTR_CLUSTER_CACHE, ATTR_NAMESPACE, CTX_POD_NAME, CTX_POD_NAMESPACE, CTX_POD_UID,
};
use gkm_testenv::image::{CacheKind, Compression, ImageBuilder, PushedImage, Target};
use gkm_testenv::process::ServerProcess;
use gkm_testenv::{shared_cluster, shared_registry, unique_name};
use kube::api::{Api, ObjectMeta, PostParams};
use tonic::Code;

const GPUS: &str = "gpus:\n  - uuid: GPU-sim-h100\n    productName: NVIDIA H100\n    backend: cuda\n    arch: \"90\"\n";

/// A `gkm-agent` process with its own store and socket.
struct Agent {
    process: ServerProcess,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start_in(dir: tempfile::TempDir) -> Agent {
        let socket = dir.path().join("csi/csi.sock");
        std::fs::write(dir.path().join("gpus.yaml"), GPUS).unwrap();
        let args = vec![
            "--node-name=node-1".to_string(),
            format!("--csi-endpoint=unix://{}", socket.display()),
            format!("--store-root={}", dir.path().join("store").display()),
            format!("--gpus-file={}", dir.path().join("gpus.yaml").display()),
            format!("--insecure-registry={}", shared_registry().host()),
            format!(
                "--kubeconfig={}",
                shared_cluster().admin_kubeconfig().display()
            ),
            "--log=gkm=debug".to_string(),
            // These tests create no Pod objects: do not wait for them.
            "--pod-wait-millis=100".to_string(),
            // Many agents run at once here: each on a port of its own.
            "--health-addr=127.0.0.1:0".to_string(),
        ];
        // Tied to the test process: a killed test run leaves no agent behind.
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_gkm-agent"));
        let process = ServerProcess::start("agent", &bin, &args, &[], dir.path()).unwrap();
        Agent {
            process,
            dir,
            socket,
        }
    }

    fn start() -> Agent {
        Self::start_in(tempfile::tempdir().unwrap())
    }

    async fn node(&self) -> NodeClient<tonic::transport::Channel> {
        match gkm::csi::server::connect_ready(&self.socket, Duration::from_secs(20)).await {
            Ok(ch) => NodeClient::new(ch),
            Err(why) => panic!("agent not ready ({why}); log:\n{}", self.log()),
        }
    }

    fn log(&self) -> String {
        self.process.log_tail()
    }

    /// Kills the agent (no chance to clean up) and returns its folder for a restart.
    fn kill(mut self) -> tempfile::TempDir {
        self.process.stop();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        std::mem::forget(self);
        dir
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A kubelet-style target path for a volume.
    fn target(&self, pod_uid: &str, vol: &str) -> PathBuf {
        let dir = self.dir.path().join(format!(
            "kubelet/pods/{pod_uid}/volumes/kubernetes.io~csi/{vol}"
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("mount")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process.stop();
        unmount_below(self.dir.path());
    }
}

/// Lazily unmounts anything still mounted below `dir` (a failed test must not leave
/// mounts behind).
fn unmount_below(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    for line in info.lines() {
        if let Some(mp) = line.split(' ').nth(4)
            && mp.starts_with(&prefix)
        {
            let _ = rustix::mount::unmount(mp, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// The mount options of `target` from the mount table (one look, for assertions).
fn mount_options(target: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let t = target.display().to_string();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(t.as_str()))
        .map(|l| l.split(' ').nth(5).unwrap().to_string())
}

/// What kubelet sends for an inline ephemeral volume with podInfoOnMount.
fn kubelet_publish(
    vol: &str,
    target: &Path,
    attrs: &[(&str, &str)],
    pod_ns: &str,
    pod: &str,
) -> pb::NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ctx.insert(CTX_POD_NAME.into(), pod.into());
    ctx.insert(CTX_POD_NAMESPACE.into(), pod_ns.into());
    ctx.insert(CTX_POD_UID.into(), format!("uid-{pod}"));
    ctx.insert(
        "csi.storage.k8s.io/serviceAccount.name".into(),
        "default".into(),
    );
    ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    pb::NodePublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(
                pb::volume_capability::MountVolume::default(),
            )),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: false,
        volume_context: ctx,
        ..Default::default()
    }
}

fn unpublish(vol: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
    }
}

struct Fixture {
    src: tempfile::TempDir,
    image: PushedImage,
}

async fn push_cache(targets: &[Target]) -> Fixture {
    let src = tempfile::tempdir().unwrap();
    for d in ["0a1b", "ffee"] {
        std::fs::create_dir_all(src.path().join(d)).unwrap();
        std::fs::write(
            src.path().join(d).join("kernel.cubin"),
            format!("cubin {d}"),
        )
        .unwrap();
        std::fs::write(
            src.path().join(d).join("kernel.json"),
            format!("{{\"name\":\"{d}\"}}"),
        )
        .unwrap();
    }
    let image = ImageBuilder::mcv(CacheKind::Triton, src.path(), targets, Compression::Gzip)
        .unwrap()
        .push(shared_registry(), &unique_name("csi/cache"), Some("v1"))
        .await
        .unwrap();
    Fixture { src, image }
}

/// A GKMCache as the webhook would leave it: image by tag, verified digest annotated.
async fn create_cache(ns: &str, name: &str, f: &Fixture) {
    let api: Api<GKMCache> = Api::namespaced(shared_cluster().admin_client().await.unwrap(), ns);
    let mut c = GKMCache::new(name, Default::default());
    c.spec.image = f.image.by_tag();
    c.metadata.annotations = Some(
        [(
            RESOLVED_DIGEST_ANNOTATION.to_string(),
            f.image.digest.clone(),
        )]
        .into(),
    );
    api.create(&PostParams::default(), &c).await.unwrap();
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dir).unwrap() {
        let p = d.unwrap().path();
        if p.is_dir() {
            for (n, c) in files(&p) {
                out.push((
                    format!("{}/{n}", p.file_name().unwrap().to_string_lossy()),
                    c,
                ));
            }
        } else {
            out.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn pods_get_private_views_of_one_shared_digest_and_stay_in_their_namespace() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("csi-a").await.unwrap();
    let fx = push_cache(&[Target::new("cuda", "90", 32)]).await;
    create_cache(&ns, "llama", &fx).await;
    let agent = Agent::start();
    let mut node = agent.node().await;
    let attrs = [(ATTR_CACHE, "llama"), (ATTR_NAMESPACE, ns.as_str())];

    // Pod 1: the target holds the cache tree, writable into the volume's own layer,
    // nosuid, nodev.
    let t1 = agent.target("uid-p1", "cache");
    node.node_publish_volume(kubelet_publish("csi-vol-1", &t1, &attrs, &ns, "p1"))
        .await
        .unwrap();
    assert_eq!(
        files(&t1),
        files(fx.src.path()),
        "the pod sees io.triton.cache/ at its mount path"
    );
    let opts = mount_options(&t1).expect("the target is a mount point");
    for o in ["rw", "nosuid", "nodev"] {
        assert!(opts.split(',').any(|x| x == o), "{o} missing in {opts}");
    }
    assert!(
        !opts.split(',').any(|x| x == "noexec"),
        "caches hold dlopen'ed objects: {opts}"
    );

    // Idempotent: kubelet's retry of the same call succeeds and changes nothing.
    node.node_publish_volume(kubelet_publish("csi-vol-1", &t1, &attrs, &ns, "p1"))
        .await
        .unwrap();

    // Pod 2 shares the one extracted digest.
    let t2 = agent.target("uid-p2", "cache");
    node.node_publish_volume(kubelet_publish("csi-vol-2", &t2, &attrs, &ns, "p2"))
        .await
        .unwrap();
    let ino = |p: &Path| {
        std::fs::metadata(p.join("0a1b/kernel.cubin"))
            .unwrap()
            .ino()
    };
    assert_eq!(ino(&t1), ino(&t2), "one extracted tree serves both pods");
    let digests = std::fs::read_dir(agent.store().join("store/sha256"))
        .unwrap()
        .count();
    assert_eq!(digests, 1);

    // A pod's write lands in its own layer: not in the shared tree, not in pod 2's view.
    std::fs::write(t1.join("0a1b/compiled-on-a-miss"), b"x").unwrap();
    std::fs::write(t1.join("0a1b/kernel.cubin"), b"overwritten").unwrap();
    let shared = agent
        .store()
        .join("store/sha256")
        .join(fx.image.digest.trim_start_matches("sha256:"))
        .join("rootfs/io.triton.cache/0a1b");
    assert!(!shared.join("compiled-on-a-miss").exists());
    assert_eq!(
        std::fs::read(shared.join("kernel.cubin")).unwrap(),
        b"cubin 0a1b"
    );
    assert!(!t2.join("0a1b/compiled-on-a-miss").exists());
    assert_eq!(
        std::fs::read(t2.join("0a1b/kernel.cubin")).unwrap(),
        b"cubin 0a1b"
    );

    // Strictly read-only when the pod asks: writes fail.
    let t5 = agent.target("uid-p5", "cache");
    let mut ro = kubelet_publish("csi-vol-5", &t5, &attrs, &ns, "p5");
    ro.readonly = true;
    node.node_publish_volume(ro).await.unwrap();
    let err = std::fs::write(t5.join("0a1b/evil"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error()),
        "{err}"
    );
    assert!(mount_options(&t5).unwrap().split(',').any(|x| x == "ro"));
    node.node_unpublish_volume(unpublish("csi-vol-5", &t5))
        .await
        .unwrap();

    // A pod of another namespace is refused, and nothing is mounted for it.
    let other = cluster.new_namespace("csi-b").await.unwrap();
    let t3 = agent.target("uid-p3", "cache");
    let err = node
        .node_publish_volume(kubelet_publish("csi-vol-3", &t3, &attrs, &other, "p3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(mount_options(&t3).is_none());

    // An unknown cache.
    let err = node
        .node_publish_volume(kubelet_publish(
            "csi-vol-4",
            &t3,
            &[(ATTR_CACHE, "nope"), (ATTR_NAMESPACE, &ns)],
            &ns,
            "p4",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Unpublish removes the mount and the target; the digest stays while pod 2 uses it.
    node.node_unpublish_volume(unpublish("csi-vol-1", &t1))
        .await
        .unwrap();
    assert!(!t1.exists() && mount_options(&t1).is_none());
    node.node_unpublish_volume(unpublish("csi-vol-1", &t1))
        .await
        .unwrap();
    assert!(!t2.join("0a1b/kernel.cubin").exists() || mount_options(&t2).is_some());
    let store = agent.store();
    let agent_dir = agent.kill();
    assert!(gc(&store).is_empty(), "in use by pod 2: nothing to collect");

    // After the last unpublish, GC reclaims the digest.
    let agent = Agent::start_in(agent_dir);
    let mut node = agent.node().await;
    node.node_unpublish_volume(unpublish("csi-vol-2", &t2))
        .await
        .unwrap();
    assert!(mount_options(&t2).is_none());
    let store = agent.store();
    let _dir = agent.kill();
    assert_eq!(gc(&store), std::slice::from_ref(&fx.image.digest));
}

/// `gkm gc --store DIR` (the agent holds the store's lock while it runs).
fn gc(store: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_gkm"))
        .args(["gc", "--store"])
        .arg(store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("removed ").map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_restarted_agent_unpublishes_what_it_mounted_before() {
    let cluster = shared_cluster();
    let fx = push_cache(&[Target::new("cuda", "sm_90", 32)]).await;
    let name = unique_name("shared-cache");
    let api: Api<ClusterGKMCache> = Api::all(cluster.admin_client().await.unwrap());
    let mut c = ClusterGKMCache::new(&name, Default::default());
    c.spec.image = fx.image.by_tag();
    c.metadata = ObjectMeta {
        name: Some(name.clone()),
        annotations: Some(
            [(
                RESOLVED_DIGEST_ANNOTATION.to_string(),
                fx.image.digest.clone(),
            )]
            .into(),
        ),
        ..Default::default()
    };
    api.create(&PostParams::default(), &c).await.unwrap();

    let agent = Agent::start();
    let mut node = agent.node().await;
    let (ta, tb) = (agent.target("uid-a", "c"), agent.target("uid-b", "c"));
    for (vol, t, pod) in [("vol-a", &ta, "a"), ("vol-b", &tb, "b")] {
        node.node_publish_volume(kubelet_publish(
            vol,
            t,
            &[(ATTR_CLUSTER_CACHE, &name)],
            "anywhere",
            pod,
        ))
        .await
        .unwrap();
    }
    // The agent dies with live mounts; one of them is then unmounted behind its back.
    let dir = agent.kill();
    rustix::mount::unmount(&tb, rustix::mount::UnmountFlags::empty()).unwrap();

    let agent = Agent::start_in(dir);
    let mut node = agent.node().await;
    // Kubelet publishes a running pod's volume again after a restart: the live overlay is
    // recognised (OK, nothing remounted) and keeps what the pod wrote.
    std::fs::write(ta.join("written-by-the-pod"), b"x").unwrap();
    node.node_publish_volume(kubelet_publish(
        "vol-a",
        &ta,
        &[(ATTR_CLUSTER_CACHE, &name)],
        "anywhere",
        "a",
    ))
    .await
    .unwrap();
    assert!(ta.join("written-by-the-pod").exists());
    node.node_unpublish_volume(unpublish("vol-a", &ta))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish("vol-b", &tb))
        .await
        .unwrap();
    assert!(!ta.exists() && !tb.exists());
    assert!(mount_options(&ta).is_none());
    let records = std::fs::read_dir(agent.store().join("volumes"))
        .unwrap()
        .count();
    assert_eq!(records, 0, "refcounts exact: no record left");
    let layers = std::fs::read_dir(agent.store().join("overlays"))
        .unwrap()
        .count();
    assert_eq!(layers, 0, "no private layer left");
}

#[tokio::test]
async fn a_cache_for_other_gpus_fails_the_precondition() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("csi-gpu").await.unwrap();
    let fx = push_cache(&[Target::new("hip", "gfx942", 64)]).await;
    create_cache(&ns, "amd-only", &fx).await;
    let agent = Agent::start();
    let mut node = agent.node().await;
    let t = agent.target("uid-x", "c");
    let err = node
        .node_publish_volume(kubelet_publish(
            "vol-x",
            &t,
            &[(ATTR_CACHE, "amd-only"), (ATTR_NAMESPACE, &ns)],
            &ns,
            "x",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("GPU-sim-h100") && err.message().contains("gfx942"),
        "{}",
        err.message()
    );
    assert!(mount_options(&t).is_none());
}

/// Kinds of hostile CSI requests, with real mounts over the socket: a volume id of 128
/// bytes that are not file-name material works; a target that already holds someone
/// else's mount (tmpfs) is neither mounted over nor ever unmounted by GKM.
#[tokio::test]
async fn odd_volume_ids_and_foreign_mounts_at_the_target() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("csi-hostile").await.unwrap();
    let fx = push_cache(&[Target::new("cuda", "90", 32)]).await;
    create_cache(&ns, "c8", &fx).await;
    let agent = Agent::start();
    let mut node = agent.node().await;
    let attrs = [(ATTR_CACHE, "c8"), (ATTR_NAMESPACE, ns.as_str())];

    let id = ":".repeat(128);
    let t = agent.target("uid-colons", "cache");
    node.node_publish_volume(kubelet_publish(&id, &t, &attrs, &ns, "colons"))
        .await
        .unwrap();
    assert!(mount_options(&t).is_some());
    node.node_unpublish_volume(unpublish(&id, &t))
        .await
        .unwrap();
    let err = node
        .node_publish_volume(kubelet_publish(&"x".repeat(129), &t, &attrs, &ns, "long"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let f = agent.target("uid-foreign", "cache");
    std::fs::create_dir_all(&f).unwrap();
    rustix::mount::mount(
        "none",
        &f,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    std::fs::write(f.join("theirs"), b"x").unwrap();
    let err = node
        .node_publish_volume(kubelet_publish("csi-v5", &f, &attrs, &ns, "over"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("tmpfs"), "{err:?}");
    for _ in 0..2 {
        let err = node
            .node_unpublish_volume(unpublish("csi-v5", &f))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    assert!(
        f.join("theirs").exists(),
        "the foreign tmpfs is still there"
    );
    rustix::mount::unmount(&f, rustix::mount::UnmountFlags::empty()).unwrap();
}
