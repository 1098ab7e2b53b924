//! The agent's configuration: parsed in one place from flags and environment, and checked
//! as a whole, so one start reports every bad value at once.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::csi::DEFAULT_SOCKET;

/// Flags (each also readable from the environment variable named beside it).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "gkm-agent",
    version,
    about = "GKM node agent and CSI node plugin (csi.gkm.io)"
)]
pub struct AgentArgs {
    /// This node's Kubernetes name (the CSI node id).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// CSI endpoint: unix://PATH or a plain socket path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = concat!("unix://", "/var/lib/kubelet/plugins/csi.gkm.io/csi.sock"))]
    pub csi_endpoint: String,
    /// Root of the node's store.
    #[arg(long, env = "GKM_STORE_ROOT", default_value = "/var/lib/gkm")]
    pub store_root: PathBuf,
    /// A simulated GPU inventory file instead of the real devices.
    #[arg(long, env = "GKM_GPUS_FILE")]
    pub gpus_file: Option<PathBuf>,
    /// Root of sysfs (AMD KFD topology).
    #[arg(long, env = "GKM_SYSFS_ROOT", default_value = crate::gpu::DEFAULT_SYSFS_ROOT)]
    pub sysfs_root: PathBuf,
    /// libnvidia-ml to load (default: the loader's libnvidia-ml.so.1).
    #[arg(long, env = "GKM_NVML_LIBRARY")]
    pub nvml_library: Option<PathBuf>,
    /// Registries (host[:port]) spoken to over plain HTTP. Repeatable; comma-separated in
    /// the environment.
    #[arg(
        long = "insecure-registry",
        env = "GKM_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials: a docker config file (a dockerconfigjson Secret, mounted).
    #[arg(long, env = "GKM_REGISTRY_AUTH")]
    pub registry_auth: Option<PathBuf>,
    /// Kubeconfig (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds a publish waits for an extraction before asking kubelet to retry.
    #[arg(long, env = "GKM_PUBLISH_TIMEOUT_SECONDS", default_value_t = 90)]
    pub publish_timeout_seconds: u64,
    /// Seconds an unused, unwanted digest stays before garbage collection.
    #[arg(long, env = "GKM_GC_GRACE_SECONDS", default_value_t = 600)]
    pub gc_grace_seconds: u64,
    /// Refuse caches whose image carries no GPU targets.
    #[arg(long, env = "GKM_REQUIRE_GPU_CLAIMS", default_value_t = false)]
    pub require_gpu_claims: bool,
    /// Log as JSON lines.
    #[arg(long, env = "GKM_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// Log filter, e.g. `info` or `gkm=debug`.
    #[arg(long, env = "GKM_LOG", default_value = "info")]
    pub log: String,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub socket: PathBuf,
    pub store_root: PathBuf,
    pub gpus_file: Option<PathBuf>,
    pub sysfs_root: PathBuf,
    pub nvml_library: Option<PathBuf>,
    pub insecure_registries: Vec<String>,
    pub registry_auth: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub publish_timeout: Duration,
    pub gc_grace: Duration,
    pub require_gpu_claims: bool,
    pub log_json: bool,
    pub log: String,
}

/// Every problem with a configuration, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl AgentArgs {
    pub fn check(self) -> Result<AgentConfig, ConfigErrors> {
        let mut errs = Vec::new();
        if self.node_name.trim().is_empty() {
            errs.push("node name is empty: set --node-name or NODE_NAME (the downward API's spec.nodeName)".to_string());
        }
        let socket = match self
            .csi_endpoint
            .strip_prefix("unix://")
            .unwrap_or(&self.csi_endpoint)
        {
            p if p.starts_with('/') => PathBuf::from(p),
            _ => {
                errs.push(format!(
                    "--csi-endpoint {:?}: must be unix:///absolute/path",
                    self.csi_endpoint
                ));
                PathBuf::from(DEFAULT_SOCKET)
            }
        };
        if !self.store_root.is_absolute() {
            errs.push(format!(
                "--store-root {}: must be an absolute path",
                self.store_root.display()
            ));
        }
        for (flag, file) in [
            ("--gpus-file", &self.gpus_file),
            ("--registry-auth", &self.registry_auth),
            ("--kubeconfig", &self.kubeconfig),
        ] {
            if let Some(f) = file
                && !f.is_file()
            {
                errs.push(format!("{flag} {}: no such file", f.display()));
            }
        }
        if self.publish_timeout_seconds == 0 || self.publish_timeout_seconds >= 120 {
            errs.push(format!(
                "--publish-timeout-seconds {}: must be between 1 and 119 (kubelet gives up on a call after 120)",
                self.publish_timeout_seconds
            ));
        }
        for r in &self.insecure_registries {
            if r.is_empty() || r.contains('/') {
                errs.push(format!("--insecure-registry {r:?}: must be host[:port]"));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            errs.push(format!("--log {:?}: not a log filter", self.log));
        }
        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        Ok(AgentConfig {
            node_name: self.node_name,
            socket,
            store_root: self.store_root,
            gpus_file: self.gpus_file,
            sysfs_root: self.sysfs_root,
            nvml_library: self.nvml_library,
            insecure_registries: self.insecure_registries,
            registry_auth: self.registry_auth,
            kubeconfig: self.kubeconfig,
            publish_timeout: Duration::from_secs(self.publish_timeout_seconds),
            gc_grace: Duration::from_secs(self.gc_grace_seconds),
            require_gpu_claims: self.require_gpu_claims,
            log_json: self.log_json,
            log: self.log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let args = AgentArgs::try_parse_from([
            "gkm-agent",
            "--node-name=",
            "--csi-endpoint=tcp://0.0.0.0:1",
            "--store-root=relative",
            "--gpus-file=/nonexistent/gpus.yaml",
            "--publish-timeout-seconds=300",
            "--insecure-registry=http://r/x",
            "--log=[[[",
        ])
        .unwrap();
        let err = args.check().unwrap_err();
        assert_eq!(err.0.len(), 7, "{err}");
        let text = err.to_string();
        for words in [
            "node name",
            "--csi-endpoint",
            "--store-root",
            "--gpus-file",
            "120",
            "--insecure-registry",
            "--log",
        ] {
            assert!(text.contains(words), "{words}: {text}");
        }
    }

    #[test]
    fn defaults_are_the_documented_paths() {
        let cfg = AgentArgs::try_parse_from(["gkm-agent", "--node-name=n1"])
            .unwrap()
            .check()
            .unwrap();
        assert_eq!(cfg.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(cfg.store_root, PathBuf::from("/var/lib/gkm"));
        assert_eq!(cfg.publish_timeout, Duration::from_secs(90));
    }
}
