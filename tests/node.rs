//! GKM on a real node: kubelet v1.36, containerd 2.x and runc start pods whose inline
//! `csi.gkm.io` volumes the agent (registered with kubelet by itself) publishes, against the
//! real API server with GKM's controller and webhooks, a real registry and an image signed
//! with real cosign. The cache is the real Triton cache captured on an H200
//! (`tests/fixtures/h200`). Containers report what they see in their logs.
//!
//! One test walks the scenarios in order on one node (starting a node costs seconds, and
//! the restarts must not disturb other tests): a cold and a warm pod, what a pod's writes
//! reach, a strictly read-only volume, the refusals (another namespace, a missing cache,
//! other GPUs), kubelet and agent restarts under a running pod, deletion and GC. It prints
//! the times it measured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gkm::api::{GKMCache, GKMCacheNode, RESOLVED_DIGEST_ANNOTATION};
use gkm_testenv::agent::deployed_kubeconfig;
use gkm_testenv::controller::{ControllerOptions, ControllerProcess, key_policy};
use gkm_testenv::node::{NodeOptions, TestNode, apply_csidriver};
use gkm_testenv::{Cosign, shared_cluster, shared_registry, unique_name};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use sha2::{Digest, Sha256};

const LABEL: (&str, &str) = ("gkm.io/e2e", "node");
const GPUS: &str = "gpus:\n  - uuid: GPU-sim-h200\n    productName: NVIDIA H200 (simulated)\n    backend: cuda\n    arch: \"90\"\n";

/// A pod on the node, with one container running `script` and the cache volume `kernels`
/// (naming `cache` of `cache_ns`, with extra `attrs`) at `mount_path`.
fn pod(
    node: &TestNode,
    name: &str,
    cache_ns: &str,
    cache: &str,
    attrs: &[(&str, &str)],
    mount_path: &str,
    script: &str,
) -> Pod {
    let mut volume_attributes: BTreeMap<String, String> = [
        ("csi.gkm.io/GKMCache".to_string(), cache.to_string()),
        ("csi.gkm.io/namespace".to_string(), cache_ns.to_string()),
    ]
    .into();
    for (k, v) in attrs {
        volume_attributes.insert(k.to_string(), v.to_string());
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node.name(),
            "hostNetwork": true,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": node.images().busybox,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/sh", "-c", script],
                "volumeMounts": [{"name": "kernels", "mountPath": mount_path}]}],
            "volumes": [{"name": "kernels", "csi": {"driver": "csi.gkm.io",
                "volumeAttributes": volume_attributes}}],
        }
    }))
    .unwrap()
}

/// What every container prints: each file of the cache with its sha256, one group file,
/// the cache variable, whether a write works; then, every second, whether a kernel file is
/// still readable.
fn report(mount: &str, write_as: &str) -> String {
    format!(
        "cd {mount} || exit 1; echo FILES-BEGIN; find . -type f | sort | while read f; do sha256sum \"$f\"; done; echo FILES-END; \
         echo GROUP \"$(cat $(find . -name '__grp__add_kernel.json' | sort | head -1))\"; \
         echo ENV=$TRITON_CACHE_DIR; \
         if touch {mount}/{write_as} 2>/dev/null; then echo WRITE-OK; else echo WRITE-REFUSED; fi; \
         i=0; while true; do i=$((i+1)); if test -f \"$(find . -name add_kernel.json | head -1)\"; then echo TICK $i ok; else echo TICK $i gone; fi; sleep 1; done"
    )
}

/// The cache tree's files as the container's `sha256sum` prints them.
fn tree_hashes(root: &Path) -> Vec<String> {
    gkm_testenv::fixtures::hash_tree(root)
        .unwrap()
        .into_iter()
        .map(|(rel, hash)| without_group_hash(&format!("{hash}  ./{rel}")))
        .collect()
}

/// The file list a container printed. Group files are compared by name only: the pod sees
/// them rewritten for its mount path (their children are checked separately).
fn lines_between(log: &str, begin: &str, end: &str) -> Vec<String> {
    log.lines()
        .skip_while(|l| *l != begin)
        .skip(1)
        .take_while(|l| *l != end)
        .map(without_group_hash)
        .collect()
}

fn without_group_hash(line: &str) -> String {
    if line.contains("/__grp__") {
        format!("<group>{}", &line[64..])
    } else {
        line.to_string()
    }
}

async fn wait<T>(
    what: &str,
    secs: u64,
    node: &TestNode,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            node.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn running(pods: &Api<Pod>, name: &str) -> bool {
    pods.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.status?.phase)
        .as_deref()
        == Some("Running")
}

/// The notes of the Events about pod `name` in `ns`.
async fn pod_events(ns: &str, name: &str) -> String {
    shared_cluster()
        .events_about(ns, name)
        .await
        .unwrap()
        .into_iter()
        .map(|(r, n)| format!("{r}: {n}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `gkm build DIR -t REF --sign-key KEY` (extra flags appended); the digest pushed.
fn build_signed(dir: &Path, reference: &str, cosign: &Cosign, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_gkm"))
        .arg("build")
        .arg(dir)
        .args(["--kind", "triton", "-t", reference])
        .arg(format!("--insecure-registry={}", shared_registry().host()))
        .arg("--sign-key")
        .arg(cosign.key_path())
        .args(extra)
        .env("COSIGN_PASSWORD", cosign.password())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gkm build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .rsplit_once('@')
        .unwrap()
        .1
        .to_string()
}

/// `gkm-controller`, built beside `gkm` by a workspace build (`cargo test --workspace`).
fn controller_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_gkm")).with_file_name("gkm-controller");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace (cargo build --workspace)",
        p.display()
    );
    p
}

/// Creates a pod running [`report`] at `mount` with the cache `llama` of `ns`, waits for it
/// to run and report; returns it and its report.
async fn reporting_pod(
    node: &TestNode,
    pods: &Api<Pod>,
    ns: &str,
    name: &str,
    attrs: &[(&str, &str)],
    mount: &str,
    write_as: &str,
) -> (Pod, String) {
    let created = pods
        .create(
            &PostParams::default(),
            &pod(
                node,
                name,
                ns,
                "llama",
                attrs,
                mount,
                &report(mount, write_as),
            ),
        )
        .await
        .unwrap();
    wait(&format!("{name} Running"), 120, node, async || {
        running(pods, name).await.then_some(())
    })
    .await;
    let log = wait(&format!("{name}'s report"), 60, node, async || {
        node.container_log(ns, name, "main")
            .filter(|l| l.contains("TICK 1 "))
    })
    .await;
    (created, log)
}

/// The volume id kubelet gives an inline volume: `csi-` + sha256(pod uid + volume name).
fn volume_id(uid: &str) -> String {
    format!(
        "csi-{}",
        hex::encode(Sha256::digest(format!("{uid}kernels")))
    )
}

#[tokio::test]
async fn a_real_node_runs_pods_with_gkm_caches() {
    let started = Instant::now();
    let cluster = shared_cluster();
    let registry = shared_registry();
    apply_csidriver(cluster).await.unwrap();
    let work = tempfile::tempdir().unwrap();

    // GKM's controller with its webhooks, trusting one cosign key.
    let cosign = Cosign::generate().await.unwrap();
    let controller = ControllerProcess::start(
        cluster,
        work.path(),
        &ControllerOptions {
            binary: controller_binary(),
            policy: key_policy(
                &cosign.public_key_pem().unwrap(),
                &format!("{}/", registry.host()),
            ),
            insecure_registries: vec![registry.host().to_string()],
            label: (LABEL.0.into(), LABEL.1.into()),
        },
    )
    .await
    .unwrap();
    let ns = gkm_testenv::webhooks::editor_namespace(cluster, "node-e2e", &[LABEL], &[])
        .await
        .unwrap();
    let other = gkm_testenv::webhooks::editor_namespace(cluster, "node-other", &[LABEL], &[])
        .await
        .unwrap();

    // The real H200 Triton cache, and one built for other GPUs, signed and applied by tag.
    let fixture =
        gkm_testenv::workspace_root().join("tests/fixtures/h200/h200-triton-inductor-caches.tgz");
    let tar = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(work.path())
        .arg("tc")
        .output()
        .unwrap();
    assert!(tar.status.success());
    let tree = work.path().join("tc");
    let repo = format!("{}/{}", registry.host(), unique_name("node/kernels"));
    let digest = build_signed(&tree, &format!("{repo}:v1"), &cosign, &[]);
    let other_gpus = build_signed(
        &tree,
        &format!("{repo}:gfx90a"),
        &cosign,
        &["--target", "hip:gfx90a:64"],
    );
    let admin = cluster.admin_client().await.unwrap();
    let caches: Api<GKMCache> = Api::namespaced(admin.clone(), &ns);
    for (name, tag) in [("llama", "v1"), ("for-amd", "gfx90a")] {
        let mut c = GKMCache::new(name, Default::default());
        c.spec.image = format!("{repo}:{tag}");
        let deadline = Instant::now() + Duration::from_secs(15);
        let created = loop {
            match caches.create(&PostParams::default(), &c).await {
                Err(kube::Error::Api(e))
                    if e.message.contains("no endpoints") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                r => break r.unwrap_or_else(|e| panic!("{e}\n{}", controller.log())),
            }
        };
        let annotated = created
            .metadata
            .annotations
            .and_then(|a| a.get(RESOLVED_DIGEST_ANNOTATION).cloned());
        assert_eq!(
            annotated.as_deref(),
            Some(if tag == "v1" {
                digest.as_str()
            } else {
                other_gpus.as_str()
            }),
            "the webhook pins the verified digest"
        );
    }

    // The node: kubelet registers the Node; the agent registers csi.gkm.io with kubelet.
    let t0 = Instant::now();
    let node = TestNode::start(
        cluster,
        registry,
        NodeOptions {
            name: unique_name("gkm-node"),
            agent_binary: PathBuf::from(env!("CARGO_BIN_EXE_gkm-agent")),
            agent_kubeconfig: deployed_kubeconfig(cluster).await.unwrap(),
            gpus: GPUS.into(),
            agent_extra: vec![
                "--gc-grace-seconds=2".into(),
                "--gc-interval-seconds=1".into(),
                "--miss-scan-interval-seconds=1".into(),
            ],
        },
    )
    .await
    .unwrap();
    let node_up = t0.elapsed();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let want_files = tree_hashes(&tree);

    // 1. A cold pod: the digest is pulled and extracted at its first publish.
    let t0 = Instant::now();
    let (a, log_a) = reporting_pod(&node, &pods, &ns, "pod-a", &[], "/cache", "written-by-a").await;
    let cold = t0.elapsed();
    assert_eq!(
        lines_between(&log_a, "FILES-BEGIN", "FILES-END"),
        want_files,
        "the container reads every file of the verified cache"
    );
    let group = log_a.lines().find(|l| l.starts_with("GROUP ")).unwrap();
    assert!(
        group.contains("\"/cache/") && !group.contains("/tmp/tc"),
        "a group file inside the container names the container's mountPath: {group}"
    );
    assert!(
        log_a.contains("ENV=/cache"),
        "the Pod webhook set TRITON_CACHE_DIR: {log_a}"
    );
    assert!(log_a.contains("WRITE-OK"), "{log_a}");
    let a_uid = a.metadata.uid.clone().unwrap();
    let a_upper = node
        .store()
        .join("overlays")
        .join(gkm::store::volume_key(&volume_id(&a_uid)))
        .join("upper");
    assert!(
        a_upper.join("written-by-a").exists(),
        "the write landed in pod-a's own layer"
    );
    let shared = node
        .store()
        .join("store/sha256")
        .join(digest.trim_start_matches("sha256:"))
        .join("rootfs/io.triton.cache");
    assert!(
        !shared.join("written-by-a").exists(),
        "the shared tree is untouched"
    );

    // kubectl get gkmcachenode shows the pod while it runs.
    let kubectl = gkm_testenv::tools::locate(gkm_testenv::Tool::Kubectl).unwrap();
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(cluster.admin_kubeconfig())
        .args([
            "get",
            "gkmcachenode",
            "-n",
            &ns,
            node.name(),
            "-o",
            "jsonpath={.status.caches.llama}",
        ])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!("{ns}/pod-a")) && shown.contains(&a_uid),
        "{shown}"
    );

    // 2. A warm pod at another path: extracted already; sees none of pod-a's writes.
    let t0 = Instant::now();
    let (_, log_b) = reporting_pod(
        &node,
        &pods,
        &ns,
        "pod-b",
        &[],
        "/opt/kernels",
        "written-by-b",
    )
    .await;
    let warm = t0.elapsed();
    assert_eq!(
        lines_between(&log_b, "FILES-BEGIN", "FILES-END"),
        want_files,
        "no trace of pod-a's write"
    );
    assert!(log_b.contains("\"/opt/kernels/"), "{log_b}");
    assert!(log_b.contains("ENV=/opt/kernels"), "{log_b}");

    // 3. Strictly read-only when asked: writes fail.
    let (_, log_ro) = reporting_pod(
        &node,
        &pods,
        &ns,
        "pod-ro",
        &[("csi.gkm.io/writable", "false")],
        "/cache",
        "x",
    )
    .await;
    assert!(log_ro.contains("WRITE-REFUSED"), "{log_ro}");
    assert!(
        log_ro.contains("\"/cache/"),
        "read-only volumes still hit: {log_ro}"
    );

    // 4. Refusals, as kubelet reports them on the pod.
    let other_pods: Api<Pod> = Api::namespaced(admin.clone(), &other);
    other_pods
        .create(
            &PostParams::default(),
            &pod(&node, "thief", &ns, "llama", &[], "/cache", "sleep 3600"),
        )
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod(
            &node,
            "lost",
            &ns,
            "no-such-cache",
            &[],
            "/cache",
            "sleep 3600",
        ),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod(
            &node,
            "wrong-gpu",
            &ns,
            "for-amd",
            &[],
            "/cache",
            "sleep 3600",
        ),
    )
    .await
    .unwrap();
    for (pod_ns, name, words) in [
        (other.as_str(), "thief", "PermissionDenied"),
        (ns.as_str(), "lost", "NotFound"),
        (ns.as_str(), "wrong-gpu", "FailedPrecondition"),
    ] {
        let events = wait(&format!("{name}'s FailedMount"), 60, &node, async || {
            let e = pod_events(pod_ns, name).await;
            e.contains(words).then_some(e)
        })
        .await;
        match name {
            "thief" => assert!(events.contains("may not mount GKMCache"), "{events}"),
            "lost" => assert!(events.contains("no-such-cache not found"), "{events}"),
            _ => assert!(
                events.contains("not compatible with any GPU") && events.contains("GPU-sim-h200"),
                "{events}"
            ),
        }
        assert!(!running(&Api::namespaced(admin.clone(), pod_ns), name).await);
    }

    // 5. Kubelet and agent restarts under a running pod: its mount stays; cleanup works.
    let ticks = |log: &str| log.lines().filter(|l| l.starts_with("TICK ")).count();
    for restarted in ["kubelet", "agent"] {
        let before = ticks(&node.container_log(&ns, "pod-a", "main").unwrap());
        match restarted {
            "kubelet" => node.restart_kubelet().unwrap(),
            _ => node.restart_agent(cluster).await.unwrap(),
        }
        wait(
            &format!("pod-a ticking after the {restarted} restart"),
            60,
            &node,
            async || {
                let l = node.container_log(&ns, "pod-a", "main")?;
                (ticks(&l) > before + 5).then_some(())
            },
        )
        .await;
    }
    let log_a = node.container_log(&ns, "pod-a", "main").unwrap();
    assert!(!log_a.contains(" gone"), "pod-a lost its cache:\n{log_a}");
    assert!(running(&pods, "pod-a").await);

    // 6. Deleting the pods unmounts and removes their volumes; with the cache gone too, GC
    // collects the digest after its grace period.
    for name in ["pod-a", "pod-b", "pod-ro", "lost", "wrong-gpu"] {
        pods.delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }
    other_pods
        .delete("thief", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let volumes = node.store().join("volumes");
    wait("every volume record removed", 60, &node, async || {
        (std::fs::read_dir(&volumes).map(|d| d.count()).unwrap_or(0) == 0).then_some(())
    })
    .await;
    assert!(!a_upper.exists(), "pod-a's private layer is gone");
    assert_eq!(
        std::fs::read_dir(node.store().join("overlays"))
            .unwrap()
            .count(),
        0,
        "no private layer left"
    );
    // The agent writes the node status after it removes the records: wait for it.
    let node_objects = Api::<GKMCacheNode>::namespaced(admin.clone(), &ns);
    wait("node status lists no pod", 30, &node, async || {
        let status = node_objects.get(node.name()).await.ok()?.status?;
        let entry = status.caches.get("llama")?.get(&digest)?;
        entry.pods.is_empty().then_some(())
    })
    .await;
    caches
        .delete("llama", &DeleteParams::default())
        .await
        .unwrap();
    caches
        .delete("for-amd", &DeleteParams::default())
        .await
        .unwrap();
    wait("GC to collect the digest", 60, &node, async || {
        (!shared.exists()).then_some(())
    })
    .await;

    node.stop(cluster).await.unwrap();
    println!(
        "real node: up (kubelet Ready, csi.gkm.io registered) in {:.1} s; pod Running with a cold cache (pull + extract) {:.2} s, with the cache extracted {:.2} s; whole test {:.1} s",
        node_up.as_secs_f64(),
        cold.as_secs_f64(),
        warm.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(controller);
}
