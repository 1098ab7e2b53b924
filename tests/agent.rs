//! The node agent's control loop against a real API server and registry: `gkm-agent` runs
//! as a process under its own service account and the RBAC of `deploy/agent/rbac.yaml`,
//! with a simulated GPU inventory, and is driven through its CSI socket like kubelet does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gkm::api::{CacheDigestStatus, CacheState, GKMCache, GKMCacheNode, RESOLVED_DIGEST_ANNOTATION};
use gkm::csi::pb::node_client::NodeClient;
use gkm::csi::pb::{self, volume_capability};
use gkm_testenv::faulty::StaticRegistry;
use gkm_testenv::image::{self, CacheKind, Compression, ImageBuilder, PushedImage, Target};
use gkm_testenv::process::ServerProcess;
use gkm_testenv::tools::{self, Tool};
use gkm_testenv::{shared_cluster, shared_registry, unique_name, workspace_root};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use tonic::Code;

/// Each test runs its own agent under its own node name: every agent watches every cache in
/// the cluster and writes its node's objects in every namespace, so two agents sharing a
/// name would overwrite each other's reports.
const NODE: &str = "gpu-node-1";
const VOLTA_NODE: &str = "gpu-node-volta";
const UNVERIFIED_NODE: &str = "gpu-node-unverified";
/// One GPU the test images target (sm_90) and one they do not (sm_80).
const GPUS: &str = "gpus:
  - uuid: GPU-h100
    productName: NVIDIA H100
    backend: cuda
    arch: \"90\"
  - uuid: GPU-a100
    productName: NVIDIA A100
    backend: cuda
    arch: \"80\"
";

/// The agent's RBAC from deploy/, applied once per test binary.
async fn agent_kubeconfig() -> PathBuf {
    static RBAC: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let cluster = shared_cluster();
    RBAC.get_or_init(|| async {
        cluster.ensure_namespace("gkm-system").await.unwrap();
        let out = Command::new(tools::locate(Tool::Kubectl).unwrap())
            .arg("--kubeconfig")
            .arg(cluster.admin_kubeconfig())
            .args(["apply", "--server-side", "--field-manager=gkm-test", "-f"])
            .arg(workspace_root().join("deploy/agent/rbac.yaml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
    cluster
        .service_account_kubeconfig("gkm-system", "gkm-agent")
        .await
        .unwrap()
}

/// A `gkm-agent` process with its own store and socket, as the `gkm-agent` service account.
struct Agent {
    process: ServerProcess,
    node: String,
    dir: PathBuf,
    socket: PathBuf,
    health: String,
}

impl Agent {
    async fn start(dir: &Path, node: &str, registry_host: &str, extra: &[&str]) -> Agent {
        let socket = dir.join("csi/csi.sock");
        std::fs::write(dir.join("gpus.yaml"), GPUS).unwrap();
        let port = gkm_testenv::process::free_port().unwrap();
        let health = format!("127.0.0.1:{port}");
        let mut args = vec![
            format!("--node-name={node}"),
            format!("--csi-endpoint=unix://{}", socket.display()),
            format!("--store-root={}", dir.join("store").display()),
            format!("--gpus-file={}", dir.join("gpus.yaml").display()),
            format!("--insecure-registry={registry_host}"),
            format!("--kubeconfig={}", agent_kubeconfig().await.display()),
            format!("--health-addr={health}"),
            "--gc-grace-seconds=0".to_string(),
            "--log=gkm=debug".to_string(),
            // These tests create no Pod objects: do not wait for them.
            "--pod-wait-millis=100".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_gkm-agent"));
        let process = ServerProcess::start(&unique_name("agent"), &bin, &args, &[], dir).unwrap();
        Agent {
            process,
            node: node.to_string(),
            dir: dir.to_path_buf(),
            socket,
            health,
        }
    }

    fn log(&self) -> String {
        self.process.log_tail()
    }

    async fn node(&self) -> NodeClient<tonic::transport::Channel> {
        match gkm::csi::server::connect_ready(&self.socket, Duration::from_secs(30)).await {
            Ok(ch) => NodeClient::new(ch),
            Err(why) => panic!("agent not ready ({why}); log:\n{}", self.log()),
        }
    }

    fn target(&self, volume: &str) -> PathBuf {
        self.dir.join("pods").join(volume).join("mount")
    }

    async fn publish(
        &self,
        volume: &str,
        ns: &str,
        cache: &str,
        pod: &str,
    ) -> Result<PathBuf, tonic::Status> {
        self.publish_as(volume, ns, cache, pod, true).await
    }

    /// [`Agent::publish`]; `readonly: false` gets the pod its private writable layer.
    async fn publish_as(
        &self,
        volume: &str,
        ns: &str,
        cache: &str,
        pod: &str,
        readonly: bool,
    ) -> Result<PathBuf, tonic::Status> {
        let target = self.target(volume);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let req = pb::NodePublishVolumeRequest {
            volume_id: volume.into(),
            target_path: target.display().to_string(),
            volume_capability: Some(pb::VolumeCapability {
                access_type: Some(volume_capability::AccessType::Mount(Default::default())),
                access_mode: Some(pb::volume_capability::AccessMode {
                    mode: pb::volume_capability::access_mode::Mode::SingleNodeReaderOnly as i32,
                }),
            }),
            readonly,
            volume_context: HashMap::from([
                (gkm::csi::ATTR_CACHE.to_string(), cache.to_string()),
                (gkm::csi::ATTR_NAMESPACE.to_string(), ns.to_string()),
                (gkm::csi::CTX_POD_NAMESPACE.to_string(), ns.to_string()),
                (gkm::csi::CTX_POD_NAME.to_string(), pod.to_string()),
                (gkm::csi::CTX_POD_UID.to_string(), format!("uid-{pod}")),
            ]),
            ..Default::default()
        };
        self.node().await.node_publish_volume(req).await?;
        Ok(target)
    }

    async fn unpublish(&self, volume: &str) {
        self.try_unpublish(volume).await.unwrap();
    }

    async fn try_unpublish(&self, volume: &str) -> Result<(), tonic::Status> {
        let req = pb::NodeUnpublishVolumeRequest {
            volume_id: volume.into(),
            target_path: self.target(volume).display().to_string(),
        };
        self.node().await.node_unpublish_volume(req).await?;
        Ok(())
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(&self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.process.pid() as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        while self.process.exited().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// (mounts under the pods' folder, volume records, private-layer folders): what a
    /// crash could leak.
    fn leftovers(&self) -> (usize, usize, usize) {
        let pods = self.dir.join("pods").display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&pods)))
            .count();
        let count = |sub: &str| {
            std::fs::read_dir(self.dir.join("store").join(sub))
                .map(|d| {
                    d.flatten()
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0)
        };
        (mounts, count("volumes"), count("overlays"))
    }

    fn extracted(&self, digest: &str) -> bool {
        self.dir
            .join("store/store/sha256")
            .join(digest.trim_start_matches("sha256:"))
            .exists()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Unmount whatever a failed test left, so the temporary folder can go.
        if let Ok(entries) = std::fs::read_dir(self.dir.join("pods")) {
            for e in entries.flatten() {
                let _ = rustix::mount::unmount(
                    e.path().join("mount"),
                    rustix::mount::UnmountFlags::DETACH,
                );
            }
        }
        self.process.stop();
    }
}

async fn push_cache(repo: &str, tag: &str, content: &str, targets: &[Target]) -> PushedImage {
    gkm_testenv::fixtures::push_kernel_cache(shared_registry(), repo, tag, content, targets)
        .await
        .unwrap()
}

fn cache(name: &str, image: &PushedImage) -> GKMCache {
    let mut c = GKMCache::new(name, Default::default());
    c.spec.image = image.by_tag();
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), image.digest.clone())].into());
    c
}

/// Waits until the node's GKMCacheNode in `ns` satisfies `ok`, returning it.
async fn wait_node(
    agent: &Agent,
    ns: &str,
    what: &str,
    ok: impl Fn(Option<&GKMCacheNode>) -> bool,
) -> Option<GKMCacheNode> {
    let api: Api<GKMCacheNode> =
        Api::namespaced(shared_cluster().admin_client().await.unwrap(), ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = api.get_opt(&agent.node).await.unwrap();
        if ok(got.as_ref()) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; node object: {}\nagent log:\n{}",
            serde_json::to_string_pretty(&got).unwrap(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies a Node object named `name` (no kubelet behind it) and returns its uid.
async fn ensure_node(name: &str) -> String {
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    Api::<k8s_openapi::api::core::v1::Node>::all(shared_cluster().admin_client().await.unwrap())
        .patch(
            name,
            &kube::api::PatchParams::apply("gkm-test"),
            &kube::api::Patch::Apply(&node),
        )
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap()
}

fn entry<'a>(
    n: Option<&'a GKMCacheNode>,
    cache: &str,
    digest: &str,
) -> Option<&'a CacheDigestStatus> {
    n?.status.as_ref()?.caches.get(cache)?.get(digest)
}

fn state(n: Option<&GKMCacheNode>, cache: &str, digest: &str) -> Option<CacheState> {
    entry(n, cache, digest).map(|e| e.state)
}

async fn event_reasons(ns: &str, object: &str) -> Vec<String> {
    shared_cluster()
        .events_about(ns, object)
        .await
        .unwrap()
        .into_iter()
        .map(|(reason, _)| reason)
        .collect()
}

async fn wait_event(ns: &str, object: &str, reason: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !event_reasons(ns, object).await.iter().any(|r| r == reason) {
        assert!(
            Instant::now() < deadline,
            "no {reason} Event on {ns}/{object}: {:?}",
            event_reasons(ns, object).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_cache_goes_from_create_to_use_to_update_to_delete() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent").await.unwrap();
    let repo = unique_name("agent/llama");
    let v1 = push_cache(&repo, "v1", "kernel v1", &[Target::new("cuda", "90", 32)]).await;
    let before = shared_registry().request_log().lines().count();
    let node_uid = ensure_node(NODE).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        NODE,
        shared_registry().host(),
        &["--pull-policy=eager"],
    )
    .await;
    let caches: Api<GKMCache> = Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    caches
        .create(&PostParams::default(), &cache("llama", &v1))
        .await
        .unwrap();

    // Created: extracted, with the GPU verdict per GPU.
    let n = wait_node(&agent, &ns, "v1 Extracted", |n| {
        state(n, "llama", &v1.digest) == Some(CacheState::Extracted)
    })
    .await;
    // Owned by its Node, so Kubernetes removes it with the node.
    let owners = n.as_ref().unwrap().metadata.owner_references.clone();
    let owner = &owners.unwrap_or_default()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Node", NODE));
    assert_eq!(owner.uid, node_uid);
    let e = entry(n.as_ref(), "llama", &v1.digest).unwrap();
    assert_eq!(e.compatible_gpus, vec!["GPU-h100"]);
    assert_eq!(e.incompatible_gpus, vec!["GPU-a100"]);
    assert!(
        e.reasons.iter().any(|r| r.contains("GPU-a100")),
        "{:?}",
        e.reasons
    );
    assert!(e.size_bytes.unwrap() > 0);
    assert!(e.last_updated.is_some());
    let status = n.as_ref().unwrap().status.as_ref().unwrap();
    assert_eq!(status.node_name, NODE);
    assert_eq!(status.gpus.len(), 2);
    assert!(
        status
            .gpus
            .iter()
            .all(|g| g.source == gkm::api::GpuSource::Simulated)
    );
    assert!(agent.extracted(&v1.digest));
    wait_event(&ns, "llama", "Extracted").await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    let extracted = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("Extracted"))
        .unwrap();
    assert_eq!(extracted.reporting_controller.as_deref(), Some("gkm-agent"));
    assert_eq!(extracted.reporting_instance.as_deref(), Some(NODE));
    assert_eq!(extracted.type_.as_deref(), Some("Normal"));
    let about = extracted.regarding.unwrap();
    assert_eq!(
        (about.kind.as_deref(), about.name.as_deref()),
        (Some("GKMCache"), Some("llama"))
    );

    // Published: in use by the pod.
    let t1 = agent.publish("vol-1", &ns, "llama", "pod-1").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(t1.join("abc123/kernel.cubin")).unwrap(),
        "kernel v1"
    );
    wait_node(&agent, &ns, "v1 InUse by pod-1", |n| {
        entry(n, "llama", &v1.digest)
            .is_some_and(|e| e.state == CacheState::InUse && e.pods == [format!("{ns}/pod-1")])
    })
    .await;

    // Updated: the new digest for new pods; the old one Outdated while pod-1 uses it.
    let v2 = push_cache(&repo, "v2", "kernel v2", &[Target::new("cuda", "90", 32)]).await;
    let patch = serde_json::json!({"metadata": {"annotations": {RESOLVED_DIGEST_ANNOTATION: v2.digest}}, "spec": {"image": v2.by_tag()}});
    caches
        .patch("llama", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_node(&agent, &ns, "v2 Extracted and v1 Outdated", |n| {
        state(n, "llama", &v2.digest) == Some(CacheState::Extracted)
            && entry(n, "llama", &v1.digest).is_some_and(|e| {
                e.state == CacheState::Outdated && e.pods == [format!("{ns}/pod-1")]
            })
    })
    .await;
    let t2 = agent.publish("vol-2", &ns, "llama", "pod-2").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(t2.join("abc123/kernel.cubin")).unwrap(),
        "kernel v2"
    );
    assert_eq!(
        std::fs::read_to_string(t1.join("abc123/kernel.cubin")).unwrap(),
        "kernel v1",
        "a running pod keeps its digest"
    );

    // The old digest's last unpublish: its entry goes, and GC collects it.
    agent.unpublish("vol-1").await;
    wait_node(&agent, &ns, "v1 gone", |n| {
        entry(n, "llama", &v1.digest).is_none()
            && state(n, "llama", &v2.digest) == Some(CacheState::InUse)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.extracted(&v1.digest) {
        assert!(
            Instant::now() < deadline,
            "v1 was not collected; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.extracted(&v2.digest));

    // Deleted: new publishes fail, the running pod keeps its mount, then everything goes.
    caches.delete("llama", &Default::default()).await.unwrap();
    wait_node(
        &agent,
        &ns,
        "the entries of the deleted cache removed",
        |n| {
            n.and_then(|n| n.status.as_ref())
                .is_some_and(|s| s.caches.is_empty())
        },
    )
    .await;
    let err = agent
        .publish("vol-3", &ns, "llama", "pod-3")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(
        std::fs::read_to_string(t2.join("abc123/kernel.cubin")).unwrap(),
        "kernel v2"
    );
    agent.unpublish("vol-2").await;
    wait_node(&agent, &ns, "the node object deleted", |n| n.is_none()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.extracted(&v2.digest) {
        assert!(
            Instant::now() < deadline,
            "v2 was not collected; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Never a pull by tag: every manifest the registry served for this repository was
    // asked for by digest (the tags were only pushed).
    let log = shared_registry().request_log();
    let served: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.contains(&repo) && l.contains("/manifests/") && !l.contains("PUT"))
        .collect();
    assert!(!served.is_empty(), "the registry log shows no pull");
    for line in served {
        assert!(
            line.contains("/manifests/sha256:"),
            "a manifest asked for by tag: {line}"
        );
    }

    // The agent's endpoints.
    let http = gkm_testenv::http_builder().build().unwrap();
    // The GC counts a digest once its tree is deleted, a moment after it disappears.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = http
            .get(format!("http://{}/metrics", agent.health))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("gkm_gc_removed_digests_total 2") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for m in [
        "gkm_csi_calls_total{op=\"publish\",code=\"OK\"}",
        "gkm_pulls_total{result=\"ok\"}",
        "gkm_gc_removed_digests_total 2",
        "gkm_node_status_writes_total",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }
    let ready = http
        .get(format!("http://{}/readyz", agent.health))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}

#[tokio::test]
async fn a_cache_no_gpu_can_use_shows_why_and_fails_the_publish() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-incompat").await.unwrap();
    let image = push_cache(
        &unique_name("agent/volta"),
        "v1",
        "sm70",
        &[Target::new("cuda", "70", 32)],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), VOLTA_NODE, shared_registry().host(), &[]).await;
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &cache("volta", &image))
        .await
        .unwrap();
    let n = wait_node(&agent, &ns, "Incompatible", |n| {
        state(n, "volta", &image.digest) == Some(CacheState::Incompatible)
    })
    .await;
    let e = entry(n.as_ref(), "volta", &image.digest).unwrap();
    assert_eq!(e.incompatible_gpus, vec!["GPU-h100", "GPU-a100"]);
    assert!(e.compatible_gpus.is_empty());
    assert_eq!(e.reasons.len(), 2, "{:?}", e.reasons);
    assert!(
        e.reasons.iter().all(|r| r.contains("70")),
        "{:?}",
        e.reasons
    );
    // On-demand: only the manifest and config were read; nothing was extracted.
    assert!(!agent.extracted(&image.digest));
    wait_event(&ns, "volta", "Incompatible").await;
    // The warning is about this node: its node object has it too, naming the cache.
    wait_event(&ns, VOLTA_NODE, "Incompatible").await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    let on_node = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("GKMCacheNode"))
        .unwrap();
    assert!(
        on_node
            .note
            .as_deref()
            .unwrap_or("")
            .contains(&format!("{ns}/volta")),
        "{:?}",
        on_node.note
    );

    let err = agent
        .publish("vol-x", &ns, "volta", "pod-x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("GPU-h100"), "{}", err.message());
}

#[tokio::test]
async fn a_cache_without_a_trusted_digest_is_ignored_with_an_event() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-unverified").await.unwrap();
    let repo = unique_name("agent/unsigned");
    let image = push_cache(&repo, "v1", "x", &[Target::new("cuda", "90", 32)]).await;
    let before = shared_registry().request_log().lines().count();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        UNVERIFIED_NODE,
        shared_registry().host(),
        &["--pull-policy=eager"],
    )
    .await;
    let mut c = cache("plain", &image);
    c.metadata.annotations = None;
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &c)
        .await
        .unwrap();
    wait_event(&ns, "plain", "NotVerified").await;
    // The object is created before its status is applied (two writes), so
    // wait for the status, not just the object.
    let n = wait_node(&agent, &ns, "a status without entries", |n| {
        n.is_some_and(|n| n.status.is_some())
    })
    .await;
    let status = n.unwrap().status.unwrap();
    assert!(status.caches.is_empty(), "{:?}", status.caches);
    assert!(!status.gpus.is_empty(), "the GPUs are still reported");
    let log = shared_registry().request_log();
    let pulled = log
        .lines()
        .skip(before)
        .any(|l| l.contains(&repo) && !l.contains("PUT"));
    assert!(!pulled, "the agent pulled an unverified cache");
}

#[tokio::test]
async fn the_agent_identity_cannot_touch_caches() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-rbac").await.unwrap();
    let image = push_cache(
        &unique_name("agent/rbac"),
        "v1",
        "x",
        &[Target::new("cuda", "90", 32)],
    )
    .await;
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &cache("c", &image))
        .await
        .unwrap();
    agent_kubeconfig().await;
    let as_agent: Api<GKMCache> = Api::namespaced(
        cluster
            .service_account_client("gkm-system", "gkm-agent")
            .await
            .unwrap(),
        &ns,
    );
    assert!(as_agent.get("c").await.is_ok(), "the agent can read caches");
    let forged = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let status = serde_json::json!({"status": {"resolvedDigest": forged}});
    let annotation =
        serde_json::json!({"metadata": {"annotations": {RESOLVED_DIGEST_ANNOTATION: forged}}});
    for (what, r) in [
        (
            "status",
            as_agent
                .patch_status("c", &PatchParams::default(), &Patch::Merge(&status))
                .await,
        ),
        (
            "annotation",
            as_agent
                .patch("c", &PatchParams::default(), &Patch::Merge(&annotation))
                .await,
        ),
    ] {
        match r {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {s:?}"),
            other => panic!("the agent could write a cache's {what}: {other:?}"),
        }
    }
}

/// A cache image big enough (incompressible) that a throttled registry takes seconds.
fn big_image(mib: usize) -> ImageBuilder {
    let src = tempfile::tempdir().unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bytes: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::create_dir_all(src.path().join("k")).unwrap();
    std::fs::write(src.path().join("k/kernel.bin"), bytes).unwrap();
    ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap()
}

/// The agent's resident memory (VmRSS), in KiB.
fn rss_kib(agent: &Agent) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", agent.process.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Load: 1,000 publish/unpublish cycles of writable overlay volumes by 50 concurrent pods
/// over 10 caches: every call succeeds, nothing is left (mounts, records, private layers),
/// and the agent's RSS after the run is close to what it was after the first round.
/// Prints the cycle latencies and the RSS. `GKM_LOAD_CYCLES` and `GKM_LOAD_PODS` change
/// the size.
#[tokio::test]
async fn a_thousand_publish_unpublish_cycles_leak_nothing_and_memory_stays_flat() {
    let env_or = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (cycles, pods) = (env_or("GKM_LOAD_CYCLES", 1000), env_or("GKM_LOAD_PODS", 50));
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-load").await.unwrap();
    let api = Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns);
    let mut digests = Vec::new();
    for i in 0..10 {
        let img = push_cache(
            &unique_name(&format!("agent/load{i}")),
            "v1",
            &format!("load-{i}"),
            &[Target::new("cuda", "90", 32)],
        )
        .await;
        api.create(&PostParams::default(), &cache(&format!("c{i}"), &img))
            .await
            .unwrap();
        digests.push(img.digest);
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "load-node",
        shared_registry().host(),
        &["--pull-policy=eager"],
    )
    .await;
    wait_node(&agent, &ns, "all ten Extracted", |n| {
        digests
            .iter()
            .enumerate()
            .all(|(i, d)| state(n, &format!("c{i}"), d) == Some(CacheState::Extracted))
    })
    .await;

    let per_pod = cycles.div_ceil(pods);
    let one_round = |round: usize| {
        let agent = &agent;
        let ns = &ns;
        futures::future::join_all((0..pods).map(move |p| async move {
            let volume = format!("load-{p}-{round}");
            let cache = format!("c{}", (p + round) % 10);
            let t = Instant::now();
            agent
                .publish_as(&volume, ns, &cache, &format!("pod-{p}"), false)
                .await
                .unwrap_or_else(|e| panic!("publish {volume}: {e}"));
            agent
                .try_unpublish(&volume)
                .await
                .unwrap_or_else(|e| panic!("unpublish {volume}: {e}"));
            t.elapsed()
        }))
    };
    let mut latencies = one_round(0).await;
    let warm_rss = rss_kib(&agent);
    let mut peak_rss = warm_rss;
    let started = Instant::now();
    for round in 1..per_pod {
        latencies.extend(one_round(round).await);
        peak_rss = peak_rss.max(rss_kib(&agent));
    }
    let took = started.elapsed();
    let end_rss = rss_kib(&agent);
    assert_eq!(
        agent.leftovers(),
        (0, 0, 0),
        "(mounts, records, private layers) left after the load"
    );
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "{} publish+unpublish cycles, {pods} pods at once over 10 caches: {:.1} s after the first round; cycle p50 {:.1?}, p99 {:.1?}; agent RSS {:.1} MiB after the first round, {:.1} MiB at the end (peak {:.1} MiB); leaked mounts, records, private layers: 0, 0, 0",
        latencies.len(),
        took.as_secs_f64(),
        pct(50),
        pct(99),
        warm_rss as f64 / 1024.0,
        end_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    // Flat within allocator noise. The bound catches state kept per cycle of more than
    // about 32 KiB (32 MiB over 1,000 cycles); smaller leaks show in the printed numbers.
    assert!(
        end_rss < warm_rss + 32 * 1024,
        "RSS grew from {warm_rss} KiB to {end_rss} KiB"
    );
}

/// SIGKILL of the agent while it publishes, and while it unpublishes, writable overlay
/// volumes, at random points: after each restart, kubelet's retries (publish again, then
/// unpublish) converge with exact counts (one mount, one record and one private layer per
/// published volume) and, once all are unpublished, nothing is left.
#[tokio::test]
async fn sigkill_during_publish_and_unpublish_leaks_nothing() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-kill").await.unwrap();
    let img = push_cache(
        &unique_name("agent/kill"),
        "v1",
        "killed",
        &[Target::new("cuda", "90", 32)],
    )
    .await;
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &cache("c", &img))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Agent::start(
            dir.path(),
            "kill-node",
            shared_registry().host(),
            &["--pull-policy=eager"],
        )
    };
    let mut agent = start().await;
    wait_node(&agent, &ns, "Extracted", |n| {
        state(n, "c", &img.digest) == Some(CacheState::Extracted)
    })
    .await;
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let mut next_delay = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Duration::from_millis(x % 250)
    };
    const VOLUMES: usize = 8;
    let (mut cut_publishes, mut cut_unpublishes) = (0, 0);
    // (mounts, records, private layers) the killed agent left, per kill.
    let mut at_kill = Vec::new();
    for round in 0..5 {
        let vols: Vec<String> = (0..VOLUMES).map(|i| format!("kill-{round}-{i}")).collect();
        // Publishes under way when the agent dies.
        let agent_ref = &agent;
        let pods: Vec<String> = vols.iter().map(|v| format!("p-{v}")).collect();
        let publishes = futures::future::join_all(
            vols.iter()
                .zip(&pods)
                .map(|(v, p)| agent_ref.publish_as(v, &ns, "c", p, false)),
        );
        let killed = async {
            tokio::time::sleep(next_delay()).await;
            agent_ref.kill().await;
        };
        let (results, ()) = tokio::join!(publishes, killed);
        cut_publishes += results.iter().filter(|r| r.is_err()).count();
        at_kill.push(agent.leftovers());
        drop(agent);
        agent = start().await;
        // kubelet retries each publish until it succeeds.
        for v in &vols {
            agent
                .publish_as(v, &ns, "c", &format!("p-{v}"), false)
                .await
                .unwrap_or_else(|e| panic!("{v}: {e}; log:\n{}", agent.log()));
        }
        assert_eq!(
            agent.leftovers(),
            (VOLUMES, VOLUMES, VOLUMES),
            "round {round}: (mounts, records, private layers) after the publishes"
        );

        // Unpublishes under way when the agent dies.
        let agent_ref = &agent;
        let unpublishes =
            futures::future::join_all(vols.iter().map(|v| agent_ref.try_unpublish(v)));
        let killed = async {
            tokio::time::sleep(next_delay()).await;
            agent_ref.kill().await;
        };
        let (results, ()) = tokio::join!(unpublishes, killed);
        cut_unpublishes += results.iter().filter(|r| r.is_err()).count();
        at_kill.push(agent.leftovers());
        drop(agent);
        agent = start().await;
        for v in &vols {
            agent
                .try_unpublish(v)
                .await
                .unwrap_or_else(|e| panic!("{v}: {e}; log:\n{}", agent.log()));
        }
        assert_eq!(
            agent.leftovers(),
            (0, 0, 0),
            "round {round}: (mounts, records, private layers) left after the unpublishes"
        );
    }
    println!(
        "5 rounds of {VOLUMES} writable volumes: {cut_publishes} publishes and {cut_unpublishes} unpublishes cut by SIGKILL, leaving (mounts, records, private layers) {at_kill:?}; after restarts and retries nothing leaked"
    );
    // Killing at random must have cut some calls, or the test proved nothing.
    assert!(cut_publishes + cut_unpublishes > 0);
}

/// The paths a registry serves for `img` in `repo` (manifest by digest, config, layers),
/// and the image's digest.
fn served_image(img: &ImageBuilder, repo: &str) -> (String, HashMap<String, (String, Vec<u8>)>) {
    let config = img.config();
    let (media_type, manifest) = img.manifest(&config);
    let digest = image::sha256_digest(&manifest);
    let mut served = HashMap::from([
        (
            format!("/v2/{repo}/manifests/{digest}"),
            (media_type, manifest),
        ),
        (
            format!("/v2/{repo}/blobs/{}", image::sha256_digest(&config)),
            ("application/octet-stream".to_string(), config.clone()),
        ),
    ]);
    for l in &img.layers {
        served.insert(
            format!("/v2/{repo}/blobs/{}", image::sha256_digest(&l.bytes)),
            ("application/octet-stream".to_string(), l.bytes.clone()),
        );
    }
    (digest, served)
}

/// A pull under way shows in the node status: `Pulling` with the bytes received so far
/// and the total, refreshed while it runs; gone once the digest is extracted.
#[tokio::test]
async fn a_running_pull_reports_its_bytes_in_the_node_status() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-progress").await.unwrap();
    let repo = "progress/cache";
    let img = big_image(8);
    let total: u64 = img.layers.iter().map(|l| l.bytes.len() as u64).sum();
    let (digest, served) = served_image(&img, repo);
    // About 8 s for the layer: more than one status refresh.
    let registry = StaticRegistry::start_throttled(served, Some(1 << 20))
        .await
        .unwrap();
    let mut c = GKMCache::new("slow", Default::default());
    c.spec.image = format!("{}/{repo}:v1", registry.host());
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), digest.clone())].into());
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &c)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        "progress-node",
        registry.host(),
        &["--pull-policy=eager"],
    )
    .await;
    let n = wait_node(&agent, &ns, "Pulling with bytes", |n| {
        entry(n, "slow", &digest).is_some_and(|e| {
            e.state == CacheState::Pulling && e.pulled_bytes.is_some_and(|b| b > 0)
        })
    })
    .await;
    let e = entry(n.as_ref(), "slow", &digest).unwrap();
    let first = e.pulled_bytes.unwrap();
    assert_eq!(e.pull_total_bytes, Some(total as i64));
    assert!(first <= total as i64);
    let n = wait_node(&agent, &ns, "more bytes or Extracted", |n| {
        entry(n, "slow", &digest).is_some_and(|e| {
            e.state == CacheState::Extracted || e.pulled_bytes.is_some_and(|b| b > first)
        })
    })
    .await;
    println!(
        "while pulling {total} bytes at 1 MiB/s the status said {first}, then {:?}",
        entry(n.as_ref(), "slow", &digest).unwrap().pulled_bytes
    );
    let n = wait_node(&agent, &ns, "Extracted", |n| {
        state(n, "slow", &digest) == Some(CacheState::Extracted)
    })
    .await;
    let e = entry(n.as_ref(), "slow", &digest).unwrap();
    assert_eq!((e.pulled_bytes, e.pull_total_bytes), (None, None));
}

/// Under the on-demand policy the first publish starts the pull: its bytes show in the
/// node status as well, while the publish waits.
#[tokio::test]
async fn a_pull_started_by_a_publish_reports_its_bytes_too() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-progress-od").await.unwrap();
    let repo = "progress/on-demand";
    let img = big_image(6);
    let total: u64 = img.layers.iter().map(|l| l.bytes.len() as u64).sum();
    let (digest, served) = served_image(&img, repo);
    let registry = StaticRegistry::start_throttled(served, Some(1 << 20))
        .await
        .unwrap();
    let mut c = GKMCache::new("lazy", Default::default());
    c.spec.image = format!("{}/{repo}:v1", registry.host());
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), digest.clone())].into());
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &c)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "progress-od-node", registry.host(), &[]).await;
    // On demand: inspected, not pulled, until a pod mounts it.
    wait_node(&agent, &ns, "Pending", |n| {
        state(n, "lazy", &digest) == Some(CacheState::Pending)
    })
    .await;
    let (published, seen) = tokio::join!(agent.publish("od-vol", &ns, "lazy", "od-pod"), async {
        let n = wait_node(&agent, &ns, "Pulling with bytes", |n| {
            entry(n, "lazy", &digest).is_some_and(|e| {
                e.state == CacheState::Pulling && e.pulled_bytes.is_some_and(|b| b > 0)
            })
        })
        .await;
        entry(n.as_ref(), "lazy", &digest).unwrap().clone()
    });
    published.unwrap_or_else(|e| panic!("publish: {e:?}\n{}", agent.log()));
    assert_eq!(seen.pull_total_bytes, Some(total as i64));
    println!(
        "a publish's pull of {total} bytes showed {:?} in the status",
        seen.pulled_bytes
    );
    let n = wait_node(&agent, &ns, "InUse", |n| {
        state(n, "lazy", &digest) == Some(CacheState::InUse)
    })
    .await;
    let e = entry(n.as_ref(), "lazy", &digest).unwrap();
    assert_eq!((e.pulled_bytes, e.pull_total_bytes), (None, None));
    agent.unpublish("od-vol").await;
}

/// The registry goes away before the agent's first pull and comes back 12 s later: the
/// node status says why meanwhile, the agent retries with a bounded, growing backoff (no
/// retry storm), and the digest is extracted once the registry answers again. Prints the
/// attempts and the recovery time.
#[tokio::test]
async fn a_registry_down_and_back_is_retried_with_backoff_and_recovers() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-outage").await.unwrap();
    let repo = "outage/cache";
    let (digest, served) = served_image(&big_image(1), repo);
    // Take a port, then go down.
    let host = StaticRegistry::start(HashMap::new())
        .await
        .unwrap()
        .host()
        .to_string();
    let mut c = GKMCache::new("outage", Default::default());
    c.spec.image = format!("{host}/{repo}:v1");
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), digest.clone())].into());
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &c)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "outage-node", &host, &["--pull-policy=eager"]).await;
    let down_since = Instant::now();
    let n = wait_node(&agent, &ns, "the Error state", |n| {
        state(n, "outage", &digest) == Some(CacheState::Error)
    })
    .await;
    let reasons = entry(n.as_ref(), "outage", &digest)
        .unwrap()
        .reasons
        .join("; ");
    assert!(
        reasons.contains(&host) && reasons.to_lowercase().contains("connect"),
        "the status should name the registry and the connection failure: {reasons}"
    );
    let first_error = down_since.elapsed();
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(down_since.elapsed())).await;
    // The whole log (agent.log() is its tail), this digest's attempts only: the agent
    // watches every cache of the shared cluster, other tests' too.
    let during = std::fs::read_to_string(agent.process.log_path())
        .unwrap()
        .lines()
        .filter(|l| l.contains("preparing the digest failed") && l.contains(&digest))
        .count();
    // Backoff 1, 2, 4, 8 s: at most 5 attempts in 12 s (each itself tries 3 times).
    assert!(
        (1..=5).contains(&during),
        "{during} failed attempts in 12 s; log:\n{}",
        agent.log()
    );

    let registry = StaticRegistry::start_on(&host, served).await.unwrap();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(60);
    let api: Api<GKMCacheNode> = Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    loop {
        let n = api.get_opt("outage-node").await.unwrap();
        if state(n.as_ref(), "outage", &digest) == Some(CacheState::Extracted) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not Extracted after the registry came back: {n:?}\nlog:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = back.elapsed();
    println!(
        "registry down {:.1} s: status Error after {:.1} s, {during} failed attempts (backoff 1, 2, 4, 8 s); extracted {:.1} s after it came back",
        back.duration_since(down_since).as_secs_f64(),
        first_error.as_secs_f64(),
        recovered.as_secs_f64()
    );
    // The next retry is at most the last backoff away (16 s after 4 failures).
    assert!(recovered < Duration::from_secs(20), "{recovered:?}");
    assert!(agent.extracted(&digest));
    drop(registry);
}

#[tokio::test]
async fn an_agent_killed_mid_extraction_converges_after_restart() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-restart").await.unwrap();
    let img = big_image(4);
    let repo = "restart/cache";
    let (digest, served) = served_image(&img, repo);
    // About 4 s for the layer.
    let registry = StaticRegistry::start_throttled(served, Some(1 << 20))
        .await
        .unwrap();
    let mut c = GKMCache::new("big", Default::default());
    c.spec.image = format!("{}/{repo}:v1", registry.host());
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), digest.clone())].into());
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &c)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let node = "restart-node";
    let agent = Agent::start(dir.path(), node, registry.host(), &["--pull-policy=eager"]).await;
    let tmp = dir.path().join("store/store/tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "the extraction never started; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(agent.process.pid() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    while agent.process.exited().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !agent.extracted(&digest),
        "a half-extracted tree became visible"
    );
    drop(agent);

    let agent = Agent::start(dir.path(), node, registry.host(), &["--pull-policy=eager"]).await;
    let api: Api<GKMCacheNode> = Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = api.get_opt(node).await.unwrap();
        if state(n.as_ref(), "big", &digest) == Some(CacheState::Extracted) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not Extracted after the restart: {n:?}\nlog:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.extracted(&digest));
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temporaries were left behind"
    );
}

/// An agent may start before its kubelet registered the Node (a harness, or a DaemonSet
/// pod scheduled early by a custom scheduler): the node objects it wrote are adopted by
/// the Node once it appears.
#[tokio::test]
async fn node_objects_are_adopted_by_a_node_that_appears_later() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("agent-owner").await.unwrap();
    let node = unique_name("gpu-node-late");
    let image = push_cache(
        &unique_name("agent/late"),
        "v1",
        "late",
        &[Target::new("cuda", "90", 32)],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &node, shared_registry().host(), &[]).await;
    Api::<GKMCache>::namespaced(cluster.admin_client().await.unwrap(), &ns)
        .create(&PostParams::default(), &cache("late", &image))
        .await
        .unwrap();
    let n = wait_node(&agent, &ns, "the node object", |n| n.is_some()).await;
    assert!(
        n.unwrap()
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "no Node yet: no owner"
    );
    let uid = ensure_node(&node).await;
    let n = wait_node(&agent, &ns, "the Node as owner", |n| {
        n.and_then(|n| n.metadata.owner_references.clone())
            .is_some_and(|o| o.iter().any(|r| r.kind == "Node" && r.uid == uid))
    })
    .await;
    assert!(n.unwrap().status.is_some(), "the status was kept");
}
