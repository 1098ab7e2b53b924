//! GKM end to end on one machine, with real components: etcd and kube-apiserver, an OCI
//! registry, `gkm-controller` with its admission webhooks, `gkm-agent` with a simulated GPU
//! inventory; then a real Triton kernel cache (captured on an H200 at `/tmp/tc`, from
//! `tests/fixtures/h200`) is built and signed with `gkm build`, applied as a `GKMCache` with
//! kubectl, and delivered into a pod the way kubelet and the container runtime do, at
//! another path than the one it was captured at; Triton's own lookup then finds every
//! kernel there, and the pod's private write does not reach the shared tree.
//!
//! Run it through `scripts/demo.sh` (which installs the tools and builds the binaries):
//! `cargo run --example demo -- --bin-dir TARGET/debug [--keep]`. Everything it starts
//! dies with it; `--keep` leaves the cluster up until Ctrl-C.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gkm::api::{GKMCache, GKMCacheNode, RESOLVED_DIGEST_ANNOTATION};
use gkm::csi::pb::{self, node_client::NodeClient, volume_capability};
use gkm_testenv::pki::Ca;
use gkm_testenv::process::{ServerProcess, free_port};
use gkm_testenv::tools::{self, Tool};
use gkm_testenv::{Cluster, Cosign, Registry, workspace_root};
use kube::api::Api;

const NODE: &str = "gpu-node-1";
const GPUS: &str = "gpus:
  - uuid: GPU-5f1c-h100
    productName: NVIDIA H100 80GB HBM3 (simulated)
    backend: cuda
    arch: \"90\"
  - uuid: GPU-77ab-a100
    productName: NVIDIA A100-SXM4-40GB (simulated)
    backend: cuda
    arch: \"80\"
";

struct Steps {
    n: usize,
    total: usize,
    started: Instant,
}

impl Steps {
    fn next(&mut self, what: &str) {
        self.n += 1;
        println!(
            "\n\x1b[1m==> [{}/{}] {what}\x1b[0m  ({:.1} s)",
            self.n,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn show(label: &str, text: &str) {
    for line in text.trim_end().lines() {
        println!("    {label}{line}");
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(tools::locate(Tool::Kubectl)?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

async fn wait<T>(what: &str, secs: u64, mut probe: impl AsyncFnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    gkm::install_crypto();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bin_dir = args
        .iter()
        .position(|a| a == "--bin-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .context(
            "usage: demo --bin-dir DIR [--keep]  (DIR holds gkm, gkm-agent, gkm-controller)",
        )?;
    let keep = args.iter().any(|a| a == "--keep");
    for b in ["gkm", "gkm-agent", "gkm-controller"] {
        if !bin_dir.join(b).is_file() {
            bail!(
                "{} is missing: build with `cargo build --workspace --bins`",
                bin_dir.join(b).display()
            );
        }
    }
    let work = tempfile::Builder::new().prefix("gkm-demo-").tempdir()?;
    let w = work.path();
    let mut steps = Steps {
        n: 0,
        total: 11,
        started: Instant::now(),
    };

    steps.next("Starting etcd and kube-apiserver (GKM's CRDs installed), and an OCI registry");
    let cluster = Cluster::start().await.context("starting the API server")?;
    let registry = Registry::start().await.context("starting the registry")?;
    let admin = cluster.admin_kubeconfig();
    show(
        "",
        &format!("API server {}  registry {}", cluster.url(), registry.host()),
    );
    show("$ ", "kubectl get crd");
    show("  ", &kubectl(&admin, &["get", "crd", "-o", "name"])?);

    steps.next("Starting gkm-controller (admission webhook and status controller) with a cosign key as the trust policy");
    let cosign = Cosign::generate().await?;
    let pem = cosign.public_key_pem()?;
    let indented: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    let policy = format!(
        "authorities:\n  - name: demo-key\n    key: |\n{indented}trustedRegistries:\n  - {}/\n",
        registry.host()
    );
    std::fs::write(w.join("policy.yaml"), &policy)?;
    show("policy.yaml  ", &policy);
    let ca = Ca::new("gkm-demo-ca")?;
    let serving = ca.server("gkm-webhook", &[])?;
    std::fs::write(w.join("tls.crt"), &serving.cert_pem)?;
    std::fs::write(w.join("tls.key"), &serving.key_pem)?;
    let port = free_port()?;
    let controller = ServerProcess::start(
        "gkm-controller",
        &bin_dir.join("gkm-controller"),
        &[
            format!("--listen=127.0.0.1:{port}"),
            "--metrics-addr=127.0.0.1:0".to_string(),
            format!("--tls-cert={}", w.join("tls.crt").display()),
            format!("--tls-key={}", w.join("tls.key").display()),
            format!("--policy={}", w.join("policy.yaml").display()),
            format!("--insecure-registry={}", registry.host()),
            format!("--kubeconfig={}", admin.display()),
        ],
        &[],
        w,
    )?;
    wait("the webhook to listen", 30, async || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await
    .with_context(|| controller.log_tail())?;
    gkm_testenv::webhooks::register(&cluster, "gkm", port, &ca.cert_pem, ("gkm.io/demo", "on"))
        .await?;
    gkm_testenv::webhooks::register_pod_env(
        &cluster,
        "gkm-pod-env",
        port,
        &ca.cert_pem,
        ("gkm.io/demo", "on"),
    )
    .await?;
    let ns = gkm_testenv::webhooks::editor_namespace(
        &cluster,
        "ml-team",
        &[("gkm.io/demo", "on")],
        &["alice"],
    )
    .await?;
    cluster.user_client("alice").await?;
    let alice = cluster.dir().join("alice.kubeconfig");
    show(
        "",
        &format!("webhooks registered for namespace {ns}, where user alice may edit caches"),
    );

    steps.next("Starting gkm-agent (node agent and CSI plugin) as service account gkm-system/gkm-agent, with simulated GPUs");
    cluster.ensure_namespace("gkm-system").await?;
    kubectl(
        &admin,
        &[
            "apply",
            "--server-side",
            "-f",
            &workspace_root()
                .join("deploy/agent/rbac.yaml")
                .display()
                .to_string(),
        ],
    )?;
    let agent_kc = cluster
        .service_account_kubeconfig("gkm-system", "gkm-agent")
        .await?;
    std::fs::write(w.join("gpus.yaml"), GPUS)?;
    let socket = w.join("plugins/csi.gkm.io/csi.sock");
    let agent = ServerProcess::start(
        "gkm-agent",
        &bin_dir.join("gkm-agent"),
        &[
            format!("--node-name={NODE}"),
            format!("--csi-endpoint=unix://{}", socket.display()),
            format!("--store-root={}", w.join("store").display()),
            format!("--gpus-file={}", w.join("gpus.yaml").display()),
            format!("--insecure-registry={}", registry.host()),
            format!("--kubeconfig={}", agent_kc.display()),
            format!("--health-addr=127.0.0.1:{}", free_port()?),
            "--pull-policy=eager".into(),
        ],
        &[],
        w,
    )?;
    let gpus = Command::new(bin_dir.join("gkm"))
        .args(["gpus", "--gpus-file"])
        .arg(w.join("gpus.yaml"))
        .output()?;
    show("$ ", "gkm gpus --gpus-file gpus.yaml");
    show("  ", &String::from_utf8_lossy(&gpus.stdout));

    steps.next(
        "Building and signing an image of a real Triton cache (captured on an H200 at /tmp/tc) with `gkm build`",
    );
    let fixture = workspace_root().join("tests/fixtures/h200/h200-triton-inductor-caches.tgz");
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(w)
        .arg("tc")
        .output()?;
    if !untar.status.success() {
        bail!(
            "unpacking {}: {}",
            fixture.display(),
            String::from_utf8_lossy(&untar.stderr)
        );
    }
    let src = w.join("tc");
    let image = format!("{}/ml/llama-kernels:v1", registry.host());
    show(
        "$ ",
        &format!("gkm build tc --kind triton -t {image} --sign-key cosign.key"),
    );
    let out = Command::new(bin_dir.join("gkm"))
        .arg("build")
        .arg(&src)
        .args([
            "--kind",
            "triton",
            "-t",
            &image,
            "--insecure-registry",
            registry.host(),
            "--sign-key",
        ])
        .arg(cosign.key_path())
        .env("COSIGN_PASSWORD", cosign.password())
        .output()?;
    if !out.status.success() {
        bail!("gkm build failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    show("  ", &String::from_utf8_lossy(&out.stdout));
    let inspect = Command::new(bin_dir.join("gkm"))
        .args([
            "inspect",
            &image,
            "--insecure-registry",
            registry.host(),
            "--gpus-file",
        ])
        .arg(w.join("gpus.yaml"))
        .output()?;
    show("$ ", &format!("gkm inspect {image}"));
    show(
        "  ",
        &String::from_utf8_lossy(&inspect.stdout)
            .lines()
            .filter(|l| !l.starts_with("  cache.") && !l.starts_with("Labels:"))
            .collect::<Vec<_>>()
            .join("\n"),
    );

    steps
        .next("alice applies a GKMCache naming the image by tag; the webhook pins and verifies it");
    let manifest = format!(
        "apiVersion: gkm.io/v1alpha1\nkind: GKMCache\nmetadata:\n  name: llama-kernels\n  namespace: {ns}\nspec:\n  image: {image}\n"
    );
    std::fs::write(w.join("cache.yaml"), &manifest)?;
    show("cache.yaml  ", &manifest);
    show("$ ", "kubectl apply -f cache.yaml   (as alice)");
    show(
        "  ",
        &kubectl(
            &alice,
            &["apply", "-f", &w.join("cache.yaml").display().to_string()],
        )?,
    );
    let caches: Api<GKMCache> = Api::namespaced(cluster.admin_client().await?, &ns);
    let c = caches.get("llama-kernels").await?;
    let digest = c
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RESOLVED_DIGEST_ANNOTATION))
        .cloned()
        .context("no resolved digest")?;
    show(
        "",
        &format!("metadata.annotations[{RESOLVED_DIGEST_ANNOTATION}] = {digest}"),
    );

    steps.next("The controller promotes the verified digest to the cache's status");
    wait("status.resolvedDigest", 60, async || {
        let c = caches.get("llama-kernels").await.ok()?;
        (c.status?.resolved_digest? == digest).then_some(())
    })
    .await?;
    show("$ ", "kubectl get gkmcache");
    show("  ", &kubectl(&admin, &["get", "gkmcache", "-n", &ns])?);

    steps.next(
        "The agent pulls the digest (never the tag), checks each GPU and reports the node's status",
    );
    let nodes: Api<GKMCacheNode> = Api::namespaced(cluster.admin_client().await?, &ns);
    let n = wait("node status Extracted", 120, async || {
        let e = entry(&nodes, &digest).await?;
        (e.state == gkm::api::CacheState::Extracted).then_some(e)
    })
    .await
    .with_context(|| agent.log_tail())?;
    show(
        "",
        &format!("GKMCacheNode {ns}/{NODE}: llama-kernels@{}", &digest[..19]),
    );
    show("  ", &serde_norway::to_string(&n)?);

    steps
        .next("A pod mounts the cache at a path of its own; admission sets TRITON_CACHE_DIR to it");
    // The container's mountPath. The demo plays the container runtime, so the path lies in
    // its folder; any path works.
    let mount_path = w.join("pod-root/models/kernels");
    std::fs::create_dir_all(&mount_path)?;
    let pod_yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: vllm-server-0\n  namespace: {ns}\nspec:\n  nodeName: {NODE}\n  containers:\n    - name: server\n      image: vllm/vllm-openai\n      volumeMounts: [{{name: kernels, mountPath: {}}}]\n  volumes:\n    - name: kernels\n      csi:\n        driver: csi.gkm.io\n        volumeAttributes:\n          csi.gkm.io/GKMCache: llama-kernels\n          csi.gkm.io/namespace: {ns}\n",
        mount_path.display()
    );
    std::fs::write(w.join("pod.yaml"), &pod_yaml)?;
    show("pod.yaml  ", &pod_yaml);
    show("$ ", "kubectl apply -f pod.yaml");
    show(
        "  ",
        &kubectl(
            &admin,
            &["apply", "-f", &w.join("pod.yaml").display().to_string()],
        )?,
    );
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(cluster.admin_client().await?, &ns);
    let pod = pods.get("vllm-server-0").await?;
    let uid = pod.metadata.uid.clone().context("the pod has no uid")?;
    for e in pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.env.iter().flatten())
    {
        show(
            "",
            &format!(
                "env set by GKM's Pod webhook: {}={}",
                e.name,
                e.value.clone().unwrap_or_default()
            ),
        );
    }

    steps.next("kubelet's NodePublishVolume, and the runtime's bind into the container");
    let target = w.join(format!(
        "pods/{uid}/volumes/kubernetes.io~csi/kernels/mount"
    ));
    std::fs::create_dir_all(target.parent().unwrap())?;
    let ch = gkm::csi::server::connect(&socket).await?;
    let req = pb::NodePublishVolumeRequest {
        volume_id: "csi-demo-volume-1".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        volume_context: HashMap::from([
            (
                gkm::csi::ATTR_CACHE.to_string(),
                "llama-kernels".to_string(),
            ),
            (gkm::csi::ATTR_NAMESPACE.to_string(), ns.clone()),
            (gkm::csi::CTX_POD_NAMESPACE.to_string(), ns.clone()),
            (
                gkm::csi::CTX_POD_NAME.to_string(),
                "vllm-server-0".to_string(),
            ),
            (gkm::csi::CTX_POD_UID.to_string(), uid.clone()),
        ]),
        ..Default::default()
    };
    NodeClient::new(ch.clone()).node_publish_volume(req).await?;
    rustix::mount::mount_bind_recursive(&target, &mount_path)?;
    show("", &format!("target {}", target.display()));
    show(
        "",
        &format!("  seen by the container at {}", mount_path.display()),
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(line) = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*target.to_string_lossy()))
    {
        let opts = line.split(' ').nth(5).unwrap_or("");
        show(
            "",
            &format!(
                "  an overlay mount ({opts}): the shared tree read-only below, the path view above it, a private layer on top"
            ),
        );
    }
    let group = std::fs::read_dir(&mount_path)?
        .flatten()
        .find_map(|e| {
            std::fs::read_dir(e.path())
                .ok()?
                .flatten()
                .find(|f| f.file_name().to_string_lossy().starts_with("__grp__"))
        })
        .context("no group file in the cache")?;
    let text = std::fs::read_to_string(group.path())?;
    show(
        "",
        &format!(
            "{} names its children at the pod's path:",
            group.path().strip_prefix(&mount_path)?.display()
        ),
    );
    show("  ", &text.chars().take(200).collect::<String>());

    steps.next("Real Triton in the pod's place: its own cache manager finds every kernel at the mount path");
    let triton = gkm_testenv::triton::Triton::locate()?;
    let l = triton.lookup(&mount_path)?;
    show(
        "",
        &format!(
            "Triton {}: {} of {} kernels resolve at {} (FileCacheManager.get_group, TRITON_CACHE_DIR={})",
            l.triton,
            l.resolved,
            l.groups,
            mount_path.display(),
            mount_path.display()
        ),
    );
    if l.resolved != l.groups || l.groups == 0 {
        bail!("the cache does not hit at the pod's path: {:?}", l.missing);
    }
    let shared = w
        .join("store/store/sha256")
        .join(digest.trim_start_matches("sha256:"))
        .join("rootfs/io.triton.cache");
    let miss = triton.compile(&mount_path, &["cuda:90:32"], true)?;
    if let Some(e) = &miss.error {
        bail!("a miss crashed Triton: {e}");
    }
    show(
        "",
        &format!(
            "a kernel the cache lacks compiled without error ({} files written into the pod's private layer)",
            miss.written.len()
        ),
    );
    let leaked: Vec<&String> = miss
        .written
        .iter()
        .filter(|f| shared.join(f).exists())
        .collect();
    if !leaked.is_empty() {
        bail!("the pod's writes reached the shared tree: {leaked:?}");
    }
    show(
        "",
        "the shared tree is unchanged: none of those files is in it",
    );
    let in_use = wait("InUse", 30, async || {
        let e = entry(&nodes, &digest).await?;
        (e.state == gkm::api::CacheState::InUse).then_some(e)
    })
    .await?;
    show(
        "",
        &format!("node status: {:?}, pods {:?}", in_use.state, in_use.pods),
    );

    steps.next("A tamper attempt: alice points the protected annotation at another digest");
    let forged = format!("{RESOLVED_DIGEST_ANNOTATION}=sha256:{}", "0".repeat(64));
    show(
        "$ ",
        &format!("kubectl annotate gkmcache llama-kernels {forged} --overwrite   (as alice)"),
    );
    match kubectl(
        &alice,
        &[
            "annotate",
            "-n",
            &ns,
            "gkmcache",
            "llama-kernels",
            &forged,
            "--overwrite",
        ],
    ) {
        Err(e) => show("  denied: ", &e.to_string()),
        Ok(out) => bail!("the tamper attempt was admitted: {out}"),
    }

    show("$ ", "kubectl get gkmcache,gkmcachenode");
    show(
        "  ",
        &kubectl(&admin, &["get", "gkmcache,gkmcachenode", "-n", &ns])?,
    );

    let unpublish = pb::NodeUnpublishVolumeRequest {
        volume_id: "csi-demo-volume-1".into(),
        target_path: target.display().to_string(),
    };
    if keep {
        println!(
            "\nKept running. export KUBECONFIG={}  (Ctrl-C stops everything)",
            admin.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    rustix::mount::unmount(&mount_path, rustix::mount::UnmountFlags::DETACH)?;
    NodeClient::new(ch).node_unpublish_volume(unpublish).await?;
    let done = wait("the miss counted", 30, async || {
        let e = entry(&nodes, &digest).await?;
        e.last_miss.is_some().then_some(e)
    })
    .await?;
    show(
        "",
        &format!(
            "after the pod: podsServed {}, kernelsCompiled {}: {}",
            done.pods_served.unwrap_or(0),
            done.kernels_compiled.unwrap_or(0),
            done.last_miss.unwrap_or_default()
        ),
    );
    drop((agent, controller, registry, cluster));
    println!(
        "\n\x1b[1mDone in {:.1} s.\x1b[0m Everything it started has stopped and its files are removed.",
        steps.started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// This node's status entry of the demo's cache and `digest`, once it exists.
async fn entry(nodes: &Api<GKMCacheNode>, digest: &str) -> Option<gkm::api::CacheDigestStatus> {
    let n = nodes.get_opt(NODE).await.ok()??;
    n.status?.caches.get("llama-kernels")?.get(digest).cloned()
}
