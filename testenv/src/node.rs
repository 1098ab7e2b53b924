//! A real Kubernetes node for end-to-end tests: containerd 2.x with Debian's runc, kubelet
//! registered against the harness's API server as a Ready Node, and `gkm-agent` as its CSI
//! node plugin (registered with kubelet by `gkm-registrar`, a small stand-in for
//! node-driver-registrar: `testenv/node/registrar`), in one private mount namespace, so kubelet's rshared root, the container mounts and GKM's volume mounts never
//! reach the host and vanish with the namespace.
//!
//! What this machine needs, found the hard way (`../shared/KUBELET.md` on the machines GKM
//! was built on): cgroup v1 hierarchies (`failCgroupV1: false`, the cgroup root created in
//! each hierarchy beforehand), no CAP_SYS_RESOURCE (`restrict_oom_score_adj`), a loopback
//! node IP refused (kubelet picks eth0 and listens on loopback only: read container output
//! from the pod log files, not `kubectl logs`), hostNetwork pods only (a loopback-only CNI
//! config makes the node Ready), images imported or pulled from the harness's registry
//! (`imagePullCredentialsVerificationPolicy: NeverVerify`). Kubelet and containerd write a
//! few paths whatever their root directories say (`/var/lib/kubelet/device-plugins`,
//! `/var/log/containers`, `/run/containerd`): in the namespace, per-node directories are
//! bound over `/var/lib`, `/var/log` and `/run`, so nothing is written on the host.
//!
//! Teardown (also when the test process was killed: the next harness start finds the node's
//! state file in a dead owner's work directory) kills every process of the namespace
//! (container shims outlive containerd), removes the node's cgroups and its directory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, DeleteParams, ListParams};
use serde::{Deserialize, Serialize};

use crate::image::{Compression, ImageBuilder, LayerBuilder, MediaTypes};
use crate::process::{ServerProcess, free_port, work_dir};
use crate::tools::{Tool, locate, tools_bin_dir};
use crate::{Cluster, Error, Registry};

/// The cgroup v1 hierarchies kubelet and runc use.
const CGROUP_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "pids", "systemd", "devices", "freezer", "blkio",
    "unified",
];

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The Node's name (unique: every test node of a shared cluster has its own).
    pub name: String,
    /// The `gkm-agent` binary.
    pub agent_binary: PathBuf,
    /// The agent's kubeconfig (its service account).
    pub agent_kubeconfig: PathBuf,
    /// The simulated GPU inventory (YAML).
    pub gpus: String,
    /// More agent flags.
    pub agent_extra: Vec<String>,
}

/// The images pods of a test node run, in the harness's registry.
#[derive(Clone, Debug)]
pub struct NodeImages {
    /// The sandbox image (`gkm-pause` as `/pause`).
    pub pause: String,
    /// Debian's static busybox as `/bin/*`; entrypoint `/bin/sh`.
    pub busybox: String,
}

/// What a later harness start needs to clean up after a killed test process.
#[derive(Serialize, Deserialize)]
struct NodeState {
    cgroup: String,
    /// `mnt:[inode]` of the node's mount namespace.
    mount_namespace: String,
}

const STATE_FILE: &str = "node-state.json";

/// A running node.
pub struct TestNode {
    name: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    holder: ServerProcess,
    namespace: String,
    cgroup: String,
    containerd: Mutex<Option<ServerProcess>>,
    kubelet: Mutex<Option<ServerProcess>>,
    agent: Mutex<Option<ServerProcess>>,
    registrar: Mutex<Option<ServerProcess>>,
    kubelet_args: Vec<String>,
    agent_args: Vec<String>,
    opts: NodeOptions,
    images: NodeImages,
}

/// Pushes the node's images to `registry` once per process.
pub async fn node_images(registry: &Registry) -> Result<NodeImages, Error> {
    static IMAGES: tokio::sync::OnceCell<NodeImages> = tokio::sync::OnceCell::const_new();
    IMAGES
        .get_or_try_init(|| async {
            let pause = std::fs::read(locate(Tool::Pause)?)
                .map_err(|e| Error::io("reading gkm-pause", e))?;
            let mut layer = LayerBuilder::new();
            layer.file("pause", &pause, 0o755);
            let p = ImageBuilder::new(MediaTypes::Oci)
                .layer(layer.finish(Compression::Gzip, MediaTypes::Oci))
                .runnable(&["/pause"], &[])
                .push(registry, "gkm-node/pause", Some("v1"))
                .await?;
            let busybox = std::fs::read("/bin/busybox").map_err(|e| {
                Error::io(
                    "reading /bin/busybox (Debian busybox-static; run scripts/install-tools.sh)",
                    e,
                )
            })?;
            let mut layer = LayerBuilder::new();
            for d in ["bin", "etc", "tmp"] {
                layer.dir(d, 0o755);
            }
            layer.file("bin/busybox", &busybox, 0o755);
            for applet in [
                "sh",
                "ls",
                "cat",
                "sleep",
                "echo",
                "find",
                "grep",
                "touch",
                "id",
                "sha256sum",
                "sort",
                "wc",
                "test",
                "mkdir",
                "rm",
                "stat",
                "head",
            ] {
                layer.symlink(&format!("bin/{applet}"), "busybox");
            }
            layer.file(
                "etc/passwd",
                b"root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000::/:/bin/sh\n",
                0o644,
            );
            let b = ImageBuilder::new(MediaTypes::Oci)
                .layer(layer.finish(Compression::Gzip, MediaTypes::Oci))
                .runnable(&["/bin/sh"], &["PATH=/bin"])
                .push(registry, "gkm-node/busybox", Some("1.35"))
                .await?;
            Ok(NodeImages {
                pause: p.by_tag(),
                busybox: b.by_tag(),
            })
        })
        .await
        .cloned()
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

/// `mnt:[inode]` of process `pid`'s mount namespace.
fn mount_namespace(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

impl TestNode {
    /// Starts containerd, kubelet (waiting for the Node to be Ready) and the agent (waiting
    /// for kubelet to list `csi.gkm.io` on the CSINode) against `cluster`, pulling images
    /// from `registry`. The `CSIDriver` must exist (see [`apply_csidriver`]).
    pub async fn start(
        cluster: &Cluster,
        registry: &Registry,
        opts: NodeOptions,
    ) -> Result<Self, Error> {
        let images = node_images(registry).await?;
        // Short: kubelet's plugin sockets live below it, and a unix socket's path holds at
        // most 107 bytes.
        let dir = work_dir("n")?;
        for d in [
            "run",
            "var-log",
            "var-lib",
            "containerd",
            "cni/net.d",
            "kubelet/root",
            "pod-logs",
        ] {
            std::fs::create_dir_all(dir.join(d)).map_err(io(format!("creating {d}")))?;
        }
        // The mount namespace: per-node directories over the host paths kubelet and
        // containerd write whatever their configuration says.
        let script = format!(
            "mount --bind {d}/run /run && mount --bind {d}/var-log /var/log && mount --bind {d}/var-lib /var/lib && touch {d}/holder-ready && exec sleep infinity",
            d = dir.display()
        );
        let holder = ServerProcess::start(
            "holder",
            Path::new("/usr/bin/unshare"),
            &[
                "--mount".into(),
                "--propagation".into(),
                "private".into(),
                "sh".into(),
                "-c".into(),
                script,
            ],
            &[],
            &dir,
        )?;
        wait(
            Duration::from_secs(10),
            "the node's mount namespace",
            || holder.exited().is_none() && dir.join("holder-ready").exists(),
        )
        .await
        .map_err(|e| with_log(e, &holder))?;
        let namespace = mount_namespace(holder.pid())
            .ok_or_else(|| Error::Other("the holder has no mount namespace".into()))?;
        let cgroup = format!("gkm-{}", opts.name);
        std::fs::write(
            dir.join(STATE_FILE),
            serde_json::to_vec(&NodeState {
                cgroup: cgroup.clone(),
                mount_namespace: namespace.clone(),
            })
            .expect("JSON into memory"),
        )
        .map_err(io("writing the node's state file"))?;
        create_cgroups(&cgroup)?;

        let kubelet_root = dir.join("kubelet/root");
        let (kubelet_port, healthz_port) = (free_port()?, free_port()?);
        std::fs::write(
            dir.join("containerd/config.toml"),
            containerd_config(&dir, registry, &images),
        )
        .map_err(io("writing containerd's config"))?;
        std::fs::write(
            dir.join("cni/net.d/10-loopback.conflist"),
            r#"{"cniVersion": "1.0.0", "name": "gkm-lo", "plugins": [{"type": "loopback"}]}"#,
        )
        .map_err(io("writing the CNI config"))?;
        std::fs::write(
            dir.join("kubelet-config.yaml"),
            kubelet_config(
                &dir,
                &cluster.dir().join("ca.crt"),
                &cgroup,
                kubelet_port,
                healthz_port,
            ),
        )
        .map_err(io("writing kubelet's config"))?;
        let kubelet_args = vec![
            format!("--config={}", dir.join("kubelet-config.yaml").display()),
            format!("--kubeconfig={}", cluster.admin_kubeconfig().display()),
            format!("--root-dir={}", kubelet_root.display()),
            format!("--cert-dir={}", dir.join("kubelet/pki").display()),
            format!("--hostname-override={}", opts.name),
            "--v=2".into(),
        ];
        let agent_args = vec![
            format!("--node-name={}", opts.name),
            format!(
                "--csi-endpoint=unix://{}",
                kubelet_root.join("plugins/csi.gkm.io/csi.sock").display()
            ),
            format!("--store-root={}", dir.join("gkm").display()),
            format!("--gpus-file={}", dir.join("gpus.yaml").display()),
            format!("--kubeconfig={}", opts.agent_kubeconfig.display()),
            format!("--health-addr=127.0.0.1:{}", free_port()?),
            format!("--insecure-registry={}", registry.host()),
            "--log=gkm=debug".into(),
        ]
        .into_iter()
        .chain(opts.agent_extra.iter().cloned())
        .collect();
        std::fs::write(dir.join("gpus.yaml"), &opts.gpus).map_err(io("writing gpus.yaml"))?;

        let node = TestNode {
            name: opts.name.clone(),
            dir,
            kubeconfig: cluster.admin_kubeconfig(),
            holder,
            namespace,
            cgroup,
            containerd: Mutex::new(None),
            kubelet: Mutex::new(None),
            agent: Mutex::new(None),
            registrar: Mutex::new(None),
            kubelet_args,
            agent_args,
            opts,
            images,
        };
        node.start_containerd().await?;
        node.start_kubelet()?;
        let nodes: Api<Node> = Api::all(cluster.admin_client().await?);
        let name = node.name.clone();
        wait_async(Duration::from_secs(90), "the Node to be Ready", || {
            let (nodes, name) = (nodes.clone(), name.clone());
            async move { node_ready(&nodes, &name).await }
        })
        .await
        .map_err(|e| node.with_logs(e))?;
        node.start_agent()?;
        let root = node.kubelet_root();
        let registrar = node.spawn(
            "gkm-registrar",
            &locate(Tool::Registrar)?,
            &[
                format!(
                    "--csi-endpoint={}",
                    root.join("plugins/csi.gkm.io/csi.sock").display()
                ),
                format!(
                    "--registration-dir={}",
                    root.join("plugins_registry").display()
                ),
            ],
        )?;
        *node.registrar.lock().unwrap_or_else(|e| e.into_inner()) = Some(registrar);
        node.wait_registered(cluster).await?;
        Ok(node)
    }

    /// Runs `program args` in the node's mount namespace, with the tools on PATH.
    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> Result<ServerProcess, Error> {
        let mut all = vec![
            format!("--mount=/proc/{}/ns/mnt", self.holder.pid()),
            "--".into(),
            program.display().to_string(),
        ];
        all.extend(args.iter().cloned());
        let path = format!(
            "{}:{}",
            tools_bin_dir().display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        ServerProcess::start(
            name,
            Path::new("/usr/bin/nsenter"),
            &all,
            &[("PATH", &path)],
            &self.dir,
        )
    }

    async fn start_containerd(&self) -> Result<(), Error> {
        let p = self.spawn(
            "containerd",
            &locate(Tool::Containerd)?,
            &[format!(
                "--config={}",
                self.dir.join("containerd/config.toml").display()
            )],
        )?;
        let sock = self.dir.join("containerd/containerd.sock");
        wait(Duration::from_secs(30), "containerd's socket", || {
            p.exited().is_none() && sock.exists()
        })
        .await
        .map_err(|e| with_log(e, &p))?;
        *self.containerd.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok(())
    }

    fn start_kubelet(&self) -> Result<(), Error> {
        let p = self.spawn("kubelet", &locate(Tool::Kubelet)?, &self.kubelet_args)?;
        *self.kubelet.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok(())
    }

    fn start_agent(&self) -> Result<(), Error> {
        let p = self.spawn("gkm-agent", &self.opts.agent_binary, &self.agent_args)?;
        *self.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok(())
    }

    /// Waits until kubelet lists `csi.gkm.io` on this node's CSINode.
    async fn wait_registered(&self, cluster: &Cluster) -> Result<(), Error> {
        let csinodes: Api<CSINode> = Api::all(cluster.admin_client().await?);
        let name = self.name.clone();
        wait_async(
            Duration::from_secs(60),
            "kubelet to register csi.gkm.io",
            || {
                let (csinodes, name) = (csinodes.clone(), name.clone());
                async move {
                    csinodes
                        .get_opt(&name)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|c| c.spec.drivers.iter().any(|d| d.name == "csi.gkm.io"))
                }
            },
        )
        .await
        .map_err(|e| self.with_logs(e))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The images pods on this node run.
    pub fn images(&self) -> &NodeImages {
        &self.images
    }

    /// The agent's store root.
    pub fn store(&self) -> PathBuf {
        self.dir.join("gkm")
    }

    /// Kubelet's root directory (`pods/<uid>/volumes/...`).
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet/root")
    }

    /// Restarts kubelet (SIGKILL, then a new one with the same configuration), as a node
    /// upgrade or crash would.
    pub fn restart_kubelet(&self) -> Result<(), Error> {
        if let Some(p) = self
            .kubelet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            p.stop();
        }
        self.start_kubelet()
    }

    /// Restarts the agent (SIGKILL: no chance to clean up), then a new one on the same store.
    pub async fn restart_agent(&self, cluster: &Cluster) -> Result<(), Error> {
        if let Some(p) = self.agent.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
        self.start_agent()?;
        self.wait_registered(cluster).await
    }

    /// The output of container `container` of pod `namespace/pod` (its first run), from
    /// kubelet's pod log files, without the CRI prefix of each line.
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> Option<String> {
        let prefix = format!("{namespace}_{pod}_");
        let dir = std::fs::read_dir(self.dir.join("pod-logs"))
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?
            .path();
        let text = std::fs::read_to_string(dir.join(container).join("0.log")).ok()?;
        // `<time> <stream> <P|F> <line>`
        Some(
            text.lines()
                .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    /// The last lines of kubelet's, containerd's and the agent's logs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (what, p) in [
            ("kubelet", &self.kubelet),
            ("containerd", &self.containerd),
            ("agent", &self.agent),
            ("registrar", &self.registrar),
        ] {
            if let Some(p) = p.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                out.push_str(&format!("--- {what}\n{}\n", p.log_tail()));
            }
        }
        out
    }

    /// The agent's log tail.
    pub fn agent_log(&self) -> String {
        self.agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| p.log_tail())
            .unwrap_or_default()
    }

    fn with_logs(&self, e: Error) -> Error {
        Error::Other(format!("{e}\n{}", self.logs()))
    }

    /// Stops the node: deletes its pods (kubelet unpublishes their volumes), stops kubelet,
    /// the agent and containerd, kills whatever is left in its mount namespace, removes its
    /// cgroups, its directory, and its Node and CSINode objects.
    pub async fn stop(self, cluster: &Cluster) -> Result<(), Error> {
        let client = cluster.admin_client().await?;
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());
        let on_node = ListParams::default().fields(&format!("spec.nodeName={}", self.name));
        if let Ok(list) = pods.list(&on_node).await {
            for p in list.items {
                let (Some(ns), Some(name)) = (p.metadata.namespace, p.metadata.name) else {
                    continue;
                };
                let _ = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
                    .delete(&name, &DeleteParams::default().grace_period(1))
                    .await;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match pods.list(&on_node).await {
                    Ok(l) if l.items.is_empty() => break,
                    _ => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        }
        self.teardown();
        let _ = Api::<Node>::all(client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await;
        let _ = Api::<CSINode>::all(client)
            .delete(&self.name, &DeleteParams::default())
            .await;
        Ok(())
    }

    fn teardown(&self) {
        for p in [
            &self.kubelet,
            &self.registrar,
            &self.agent,
            &self.containerd,
        ] {
            if let Some(p) = p.lock().unwrap_or_else(|e| e.into_inner()).take() {
                p.stop();
            }
        }
        kill_namespace(&self.namespace);
        self.holder.stop();
        // Containers run in mount namespaces of their own: find them by cgroup.
        kill_cgroup(&self.cgroup);
        remove_cgroups(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Where kubectl finds the cluster this node is in.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if self.dir.exists() {
            self.teardown();
        }
    }
}

/// Cleans up after a node whose test process died (called for each stale work directory).
pub(crate) fn clean_stale(dir: &Path) {
    let Ok(bytes) = std::fs::read(dir.join(STATE_FILE)) else {
        return;
    };
    let Ok(state) = serde_json::from_slice::<NodeState>(&bytes) else {
        return;
    };
    kill_namespace(&state.mount_namespace);
    kill_cgroup(&state.cgroup);
    remove_cgroups(&state.cgroup);
}

/// SIGKILLs every process in cgroup `name` and below (the pids hierarchy), until none is
/// left: containers, which live in mount namespaces of their own.
fn kill_cgroup(name: &str) {
    let root = Path::new("/sys/fs/cgroup/pids").join(name);
    for _ in 0..50 {
        let mut pids = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from the cgroup and a constant signal.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILLs every process in mount namespace `ns` (`mnt:[inode]`) until none is left.
fn kill_namespace(ns: &str) {
    for _ in 0..50 {
        let pids: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                *pid != std::process::id() && mount_namespace(*pid).as_deref() == Some(ns)
            })
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from /proc and a constant signal.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create_cgroups(name: &str) -> Result<(), Error> {
    for c in CGROUP_CONTROLLERS.iter().filter(|c| **c != "unified") {
        let base = Path::new("/sys/fs/cgroup").join(c);
        if !base.is_dir() {
            continue;
        }
        std::fs::create_dir_all(base.join(name))
            .map_err(io(format!("creating the {c} cgroup {name}")))?;
        if *c == "cpuset" {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read(base.join(f)).map_err(io(format!("reading {f}")))?;
                std::fs::write(base.join(name).join(f), v).map_err(io(format!("writing {f}")))?;
            }
        }
    }
    Ok(())
}

/// Removes cgroup `name` and everything below it in every hierarchy (deepest first; a
/// cgroup goes once its processes are gone).
fn remove_cgroups(name: &str) {
    for _ in 0..20 {
        let mut left = false;
        for c in CGROUP_CONTROLLERS {
            let root = Path::new("/sys/fs/cgroup").join(c).join(name);
            if !root.exists() {
                continue;
            }
            let mut dirs = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
                dirs.push(d);
            }
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = std::fs::remove_dir(&d);
            }
            left |= root.exists();
        }
        if !left {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn containerd_config(dir: &Path, registry: &Registry, images: &NodeImages) -> String {
    let d = dir.display();
    let host = registry.host();
    let certs = dir.join("containerd/certs.d").join(host);
    let _ = std::fs::create_dir_all(&certs);
    let _ = std::fs::write(
        certs.join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    );
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("runc");
    format!(
        r#"version = 3
root = "{d}/containerd/root"
state = "{d}/containerd/state"

[grpc]
  address = "{d}/containerd/containerd.sock"

[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"

[debug]
  level = "info"

[plugins]
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{pause}"
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = "{d}/containerd/certs.d"
  [plugins.'io.containerd.cri.v1.runtime']
    # This VM has no CAP_SYS_RESOURCE: runc must not lower oom_score_adj.
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "{runc}"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = "{d}/cni/net.d"
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
"#,
        pause = images.pause
    )
}

fn kubelet_config(dir: &Path, ca: &Path, cgroup: &str, port: u16, healthz: u16) -> String {
    let d = dir.display();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
containerRuntimeEndpoint: unix://{d}/containerd/containerd.sock
imageServiceEndpoint: unix://{d}/containerd/containerd.sock
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
failSwapOn: false
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imagePullCredentialsVerificationPolicy: NeverVerify
registerNode: true
serializeImagePulls: false
syncFrequency: 5s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
volumeStatsAggPeriod: 0s
podLogsDir: {d}/pod-logs
volumePluginDir: {d}/kubelet/flexvolume
"#,
        ca = ca.display()
    )
}

async fn node_ready(nodes: &Api<Node>, name: &str) -> bool {
    nodes.get_opt(name).await.ok().flatten().is_some_and(|n| {
        n.status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

async fn wait(after: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<(), Error> {
    wait_async(after, what, || std::future::ready(done())).await
}

async fn wait_async<F, Fut>(after: Duration, what: &str, mut done: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + after;
    while !done().await {
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                name: "test node".into(),
                what: what.into(),
                after,
                log_tail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

fn with_log(e: Error, p: &ServerProcess) -> Error {
    Error::Other(format!("{e}; {} log:\n{}", p.name(), p.log_tail()))
}

/// Applies `deploy/agent/csidriver.yaml` (kubelet reads `podInfoOnMount` from it).
pub async fn apply_csidriver(cluster: &Cluster) -> Result<(), Error> {
    let kubectl = locate(Tool::Kubectl)?;
    let out = std::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(cluster.admin_kubeconfig())
        .args(["apply", "--server-side", "--field-manager=gkm-test", "-f"])
        .arg(crate::workspace_root().join("deploy/agent/csidriver.yaml"))
        .output()
        .map_err(io("running kubectl apply"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: "kubectl apply -f deploy/agent/csidriver.yaml".into(),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}
