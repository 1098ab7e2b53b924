//! A `gkm-agent` process for tests: its own folder (store, socket, simulated GPUs), tied to
//! the test process, and kubelet-shaped target paths. The test passes the binary (cargo's
//! `CARGO_BIN_EXE_gkm-agent`); talking CSI to it is the test's business.

use std::path::{Path, PathBuf};

use crate::Error;
use crate::process::{ServerProcess, free_port};

/// How to start an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The `gkm-agent` binary.
    pub binary: PathBuf,
    pub node: String,
    pub kubeconfig: PathBuf,
    /// Registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The simulated GPU inventory (YAML).
    pub gpus: String,
    /// More flags.
    pub extra: Vec<String>,
}

/// A running agent. Dropping it stops the process and lazily unmounts whatever is still
/// mounted below its folder (a failed test must not leave mounts behind).
pub struct AgentProcess {
    process: ServerProcess,
    dir: PathBuf,
    socket: PathBuf,
    health: String,
}

impl AgentProcess {
    /// Starts an agent in `dir` (which must exist).
    pub fn start(dir: &Path, o: &AgentOptions) -> Result<Self, Error> {
        let socket = dir.join("csi/csi.sock");
        let gpus = dir.join("gpus.yaml");
        std::fs::write(&gpus, &o.gpus).map_err(|e| Error::io("writing gpus.yaml", e))?;
        let health = format!("127.0.0.1:{}", free_port()?);
        let mut args = vec![
            format!("--node-name={}", o.node),
            format!("--csi-endpoint=unix://{}", socket.display()),
            format!("--store-root={}", dir.join("store").display()),
            format!("--gpus-file={}", gpus.display()),
            format!("--kubeconfig={}", o.kubeconfig.display()),
            format!("--health-addr={health}"),
            "--log=gkm=debug".to_string(),
        ];
        for r in &o.insecure_registries {
            args.push(format!("--insecure-registry={r}"));
        }
        args.extend(o.extra.iter().cloned());
        let process = ServerProcess::start(
            &crate::unique_name(&format!("agent-{}", o.node)),
            &o.binary,
            &args,
            &[],
            dir,
        )?;
        Ok(Self {
            process,
            dir: dir.to_path_buf(),
            socket,
            health,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The store root.
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// `host:port` of /healthz, /readyz and /metrics.
    pub fn health_addr(&self) -> &str {
        &self.health
    }

    pub fn log(&self) -> String {
        self.process.log_tail()
    }

    /// The agent's whole log file.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The target path kubelet would give volume `volume` of the pod with `pod_uid`
    /// (`<dir>/kubelet/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`), its parent
    /// created as kubelet does.
    pub fn target(&self, pod_uid: &str, volume: &str) -> PathBuf {
        let dir = self.dir.join(format!(
            "kubelet/pods/{pod_uid}/volumes/kubernetes.io~csi/{volume}"
        ));
        let _ = std::fs::create_dir_all(&dir);
        dir.join("mount")
    }

    /// Stops the process (SIGKILL: no chance to clean up), leaving its folder as it is.
    pub fn kill(&self) {
        self.process.stop();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.process.stop();
        unmount_below(&self.dir);
    }
}

/// Lazily unmounts every mount below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| mp.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for mp in points {
        if let Ok(c) = std::ffi::CString::new(mp) {
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// A kubeconfig for the `gkm-system/gkm-agent` service account, with the agent's RBAC from
/// `deploy/agent/` applied (once per process), so tests run the agent with exactly the
/// rights it gets in a cluster.
pub async fn deployed_kubeconfig(cluster: &crate::Cluster) -> Result<PathBuf, Error> {
    static RBAC: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    RBAC.get_or_try_init(|| async {
        cluster.ensure_namespace("gkm-system").await?;
        let kubectl = crate::tools::locate(crate::Tool::Kubectl)?;
        let out = std::process::Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(cluster.admin_kubeconfig())
            .args(["apply", "--server-side", "--field-manager=gkm-test", "-f"])
            .arg(crate::workspace_root().join("deploy/agent/rbac.yaml"))
            .output()
            .map_err(|e| Error::io("running kubectl apply", e))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: "kubectl apply -f deploy/agent/rbac.yaml".into(),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    })
    .await?;
    cluster
        .service_account_kubeconfig("gkm-system", "gkm-agent")
        .await
}
