//! Where the harness finds the real programs it runs.
//!
//! `scripts/install-tools.sh` builds them into `~/.cache/gkm/tools/bin`; `GKM_TOOLS_DIR`
//! points elsewhere. etcd comes from the `etcd-bin-vendored` crate.

use std::path::{Path, PathBuf};

use crate::Error;

/// A program the harness runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    KubeApiserver,
    Kubectl,
    Etcd,
    Cosign,
    Crane,
    CsiSanity,
    /// A Python with PyPI's Triton (`install-tools.sh` makes a virtual environment).
    TritonPython,
    Kubelet,
    Containerd,
    /// containerd's client, to clean up a node's containers.
    Ctr,
    /// The pod sandbox's init process of the test node.
    Pause,
    /// The test node's CSI driver registrar.
    Registrar,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::KubeApiserver => "kube-apiserver",
            Tool::Kubectl => "kubectl",
            Tool::Etcd => "etcd",
            Tool::Cosign => "cosign",
            Tool::Crane => "crane",
            Tool::CsiSanity => "csi-sanity",
            Tool::TritonPython => "triton-python",
            Tool::Kubelet => "kubelet",
            Tool::Containerd => "containerd",
            Tool::Ctr => "ctr",
            Tool::Pause => "gkm-pause",
            Tool::Registrar => "gkm-registrar",
        }
    }
}

/// The folder `install-tools.sh` installs into.
pub fn tools_bin_dir() -> PathBuf {
    match std::env::var_os("GKM_TOOLS_DIR") {
        Some(d) => PathBuf::from(d).join("bin"),
        None => home().join(".cache/gkm/tools/bin"),
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The path of `tool`, or an error that names it and says how to install it.
pub fn locate(tool: Tool) -> Result<PathBuf, Error> {
    if tool == Tool::Etcd {
        if let Some(p) = std::env::var_os("GKM_ETCD") {
            return check(tool, PathBuf::from(p));
        }
        return etcd_bin_vendored::etcd_bin_path()
            .map_err(|e| Error::ToolMissing {
                tool: tool.name(),
                looked_at: PathBuf::from("etcd-bin-vendored"),
                hint: format!("the etcd-bin-vendored crate has no binary: {e}"),
            })
            .and_then(|p| check(tool, p.to_path_buf()));
    }
    locate_in(tool, &tools_bin_dir())
}

/// The path of `tool` inside `dir`, or [`Error::ToolMissing`].
pub fn locate_in(tool: Tool, dir: &Path) -> Result<PathBuf, Error> {
    check(tool, dir.join(tool.name()))
}

fn check(tool: Tool, path: PathBuf) -> Result<PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(path),
        _ => Err(Error::ToolMissing {
            tool: tool.name(),
            looked_at: path,
            hint: "run scripts/install-tools.sh (or set GKM_TOOLS_DIR)".into(),
        }),
    }
}
