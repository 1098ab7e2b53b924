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
    #[command(flatten)]
    pub registry: crate::cmdline::RegistryArgs,
    #[command(flatten)]
    pub kube: crate::cmdline::KubeArgs,
    /// Seconds a publish waits for an extraction before asking kubelet to retry.
    #[arg(long, env = "GKM_PUBLISH_TIMEOUT_SECONDS", default_value_t = 90)]
    pub publish_timeout_seconds: u64,
    /// Seconds an unused, unwanted digest stays before garbage collection.
    #[arg(long, env = "GKM_GC_GRACE_SECONDS", default_value_t = 600)]
    pub gc_grace_seconds: u64,
    /// When to pull a cache's digest: `on-demand` reads only its manifest and config (to
    /// report GPU compatibility) and extracts at the first publish; `eager` extracts every
    /// compatible cache as soon as it has a trusted digest.
    #[arg(long, env = "GKM_PULL_POLICY", value_enum, default_value_t = PullPolicy::OnDemand)]
    pub pull_policy: PullPolicy,
    /// Address of the plain-HTTP /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "GKM_HEALTH_ADDR", default_value = DEFAULT_HEALTH_ADDR)]
    pub health_addr: String,
    /// Seconds between garbage-collection sweeps of the store (also run after unpublishes).
    #[arg(long, env = "GKM_GC_INTERVAL_SECONDS", default_value_t = 60)]
    pub gc_interval_seconds: u64,
    /// Milliseconds a publish waits for its pod to appear in the agent's watch of this
    /// node's pods (to learn where the pod mounts the volume) before it mounts without a
    /// path view, with a Warning Event on the pod.
    #[arg(long, env = "GKM_POD_WAIT_MILLIS", default_value_t = 2000)]
    pub pod_wait_millis: u64,
    /// Seconds between scans of live volumes' private layers for kernels the pods
    /// compiled (cache misses, shown in node status and as Events).
    #[arg(long, env = "GKM_MISS_SCAN_INTERVAL_SECONDS", default_value_t = 60)]
    pub miss_scan_interval_seconds: u64,
    /// Refuse caches whose image carries no GPU targets.
    #[arg(long, env = "GKM_REQUIRE_GPU_CLAIMS", default_value_t = false)]
    pub require_gpu_claims: bool,
    /// The controller's HTTPS base URL, asked for the pull credentials of caches that
    /// name `imagePullSecrets`; empty: such caches cannot be pulled on this node.
    #[arg(
        long,
        env = "GKM_CONTROLLER_URL",
        default_value = "https://gkm-controller.gkm-system.svc"
    )]
    pub controller_url: String,
    /// The CA (PEM) of the controller's serving certificate. Default: the `caBundle` of
    /// the MutatingWebhookConfiguration named by --webhook-config.
    #[arg(long, env = "GKM_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,
    /// The controller's MutatingWebhookConfiguration, whose `caBundle` is the CA the
    /// controller is trusted by when --controller-ca is not given.
    #[arg(long, env = "GKM_WEBHOOK_CONFIG", default_value = "gkm")]
    pub webhook_config: String,
    /// The agent's projected service-account token of audience `gkm.io/pull-credentials`
    /// (re-read at each request).
    #[arg(
        long,
        env = "GKM_CREDENTIALS_TOKEN",
        default_value = "/var/run/secrets/gkm.io/pull-credentials/token"
    )]
    pub credentials_token: PathBuf,
    #[command(flatten)]
    pub log: crate::cmdline::LogArgs,
}

/// Where the agent serves /healthz, /readyz and /metrics unless told otherwise.
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:9810";

/// When the agent pulls a cache's digest.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// At the first publish (the manifest and config are read at once, for GPU checks).
    #[default]
    OnDemand,
    /// As soon as a compatible cache has a trusted digest.
    Eager,
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
    pub registry: crate::cmdline::RegistryArgs,
    pub kube: crate::cmdline::KubeArgs,
    pub publish_timeout: Duration,
    pub gc_grace: Duration,
    pub require_gpu_claims: bool,
    pub pull_policy: PullPolicy,
    pub health_addr: std::net::SocketAddr,
    pub gc_interval: Duration,
    pub miss_scan_interval: Duration,
    pub pod_wait: Duration,
    /// How to ask the controller for pull credentials; `None`: never.
    pub credentials: Option<crate::pull_credentials::BrokerConfig>,
    pub log: crate::cmdline::LogArgs,
}

use crate::cmdline::ConfigErrors;

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
        if let Some(why) = crate::csi::mount::unusable_layer_path(&self.store_root) {
            errs.push(format!("--store-root {}: {why}", self.store_root.display()));
        }
        if let Some(f) = &self.gpus_file
            && !f.is_file()
        {
            errs.push(format!("--gpus-file {}: no such file", f.display()));
        }
        self.registry.check(&mut errs);
        self.kube.check(&mut errs);
        self.log.check(&mut errs);
        if self.publish_timeout_seconds == 0 || self.publish_timeout_seconds >= 120 {
            errs.push(format!(
                "--publish-timeout-seconds {}: must be between 1 and 119 (kubelet gives up on a call after 120)",
                self.publish_timeout_seconds
            ));
        }
        let health_addr = self.health_addr.parse().unwrap_or_else(|_| {
            errs.push(format!(
                "--health-addr {:?}: must be IP:PORT, e.g. {DEFAULT_HEALTH_ADDR}",
                self.health_addr
            ));
            DEFAULT_HEALTH_ADDR.parse().expect("the default parses")
        });
        if self.gc_interval_seconds == 0 {
            errs.push("--gc-interval-seconds 0: must be at least 1".to_string());
        }
        if self.pod_wait_millis >= 60_000 {
            errs.push(format!(
                "--pod-wait-millis {}: must be under 60000 (kubelet gives up on a publish after 120 s)",
                self.pod_wait_millis
            ));
        }
        if self.miss_scan_interval_seconds == 0 {
            errs.push("--miss-scan-interval-seconds 0: must be at least 1".to_string());
        }
        let credentials = if self.controller_url.trim().is_empty() {
            None
        } else {
            if !self.controller_url.starts_with("https://") {
                errs.push(format!(
                    "--controller-url {:?}: must be https:// (credentials are sent over it)",
                    self.controller_url
                ));
            }
            if self.controller_ca.is_none() && self.webhook_config.trim().is_empty() {
                errs.push(
                    "--webhook-config is empty and no --controller-ca is given: the controller's CA is unknown"
                        .to_string(),
                );
            }
            Some(crate::pull_credentials::BrokerConfig {
                url: self.controller_url.trim().to_string(),
                token_file: self.credentials_token.clone(),
                ca: match &self.controller_ca {
                    Some(f) => crate::pull_credentials::ControllerCa::File(f.clone()),
                    None => crate::pull_credentials::ControllerCa::Webhook(
                        self.webhook_config.trim().to_string(),
                    ),
                },
                timeout: Duration::from_secs(10),
            })
        };
        if let Some(f) = &self.controller_ca
            && !f.is_file()
        {
            errs.push(format!("--controller-ca {}: no such file", f.display()));
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
            registry: self.registry,
            kube: self.kube,
            publish_timeout: Duration::from_secs(self.publish_timeout_seconds),
            gc_grace: Duration::from_secs(self.gc_grace_seconds),
            require_gpu_claims: self.require_gpu_claims,
            pull_policy: self.pull_policy,
            health_addr,
            gc_interval: Duration::from_secs(self.gc_interval_seconds),
            miss_scan_interval: Duration::from_secs(self.miss_scan_interval_seconds),
            pod_wait: Duration::from_millis(self.pod_wait_millis),
            credentials,
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
            "--health-addr=9810",
            "--gc-interval-seconds=0",
        ])
        .unwrap();
        let err = args.check().unwrap_err();
        assert_eq!(err.0.len(), 9, "{err}");
        let text = err.to_string();
        for words in [
            "node name",
            "--csi-endpoint",
            "--store-root",
            "--gpus-file",
            "120",
            "--insecure-registry",
            "--log",
            "--health-addr",
            "--gc-interval-seconds",
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
        assert_eq!(cfg.pull_policy, PullPolicy::OnDemand);
        assert_eq!(cfg.health_addr.to_string(), DEFAULT_HEALTH_ADDR);
    }
}
