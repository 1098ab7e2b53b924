//! The node agent: configuration, the watch cache the CSI plugin resolves caches from, and
//! the wiring of store, GPU inventory, registry access and CSI plugin into one process.

pub mod config;
pub mod watch;

use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::info;

pub use config::{AgentArgs, AgentConfig, ConfigErrors};

use crate::csi::{self, KernelMounter, Plugin, PluginConfig};
use crate::gpu::Inventory;
use crate::oci::{Credentials, PullConfig, Puller};
use crate::store::{Store, StoreConfig};

/// Runs the agent until `shutdown` completes.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let store = Arc::new(
        Store::open(StoreConfig {
            root: cfg.store_root.clone(),
            gc_grace: cfg.gc_grace,
            ..Default::default()
        })
        .context("opening the store")?,
    );
    let inventory = Inventory {
        nvml_library: cfg.nvml_library.clone(),
        sysfs_root: cfg.sysfs_root.clone(),
        simulated_file: cfg.gpus_file.clone(),
    };
    let gpus = tokio::task::spawn_blocking(move || inventory.discover())
        .await?
        .context("discovering GPUs")?;
    info!(node = %cfg.node_name, gpus = gpus.len(), "GPU inventory");
    let creds = match &cfg.registry_auth {
        Some(f) => Credentials::from_file(f)?,
        None => Credentials::anonymous(),
    };
    let puller = Puller::new(
        PullConfig {
            insecure_registries: cfg.insecure_registries.clone(),
            ..Default::default()
        },
        creds,
    );
    let client = kube_client(&cfg).await?;
    let plugin = Arc::new(Plugin::new(
        PluginConfig {
            node_name: cfg.node_name.clone(),
            publish_timeout: cfg.publish_timeout,
            allow_unclaimed: !cfg.require_gpu_claims,
            ..Default::default()
        },
        store,
        puller,
        Arc::new(watch::WatchResolver::start(client)),
        KernelMounter,
        gpus,
    ));
    let dropped = plugin.reconcile_records()?;
    info!(socket = %cfg.socket.display(), stale_records = dropped, "serving CSI");
    csi::server::serve(plugin, &cfg.socket, shutdown).await?;
    Ok(())
}

async fn kube_client(cfg: &AgentConfig) -> Result<kube::Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("finding the cluster (in-cluster or kubeconfig)")?,
    };
    Ok(kube::Client::try_from(config)?)
}
