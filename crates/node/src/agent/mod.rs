//! The node agent: configuration, the watch cache the CSI plugin resolves caches from,
//! the control loop that reports this node's state (node objects, Events, GC), the health
//! and metrics endpoints, and the wiring of all of it with the store, GPU inventory,
//! registry access and CSI plugin into one process.

pub mod config;
pub mod memory;
pub mod reconcile;
pub mod status;
pub mod watch;

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::health;
use tracing::info;

pub use config::{AgentArgs, AgentConfig, PullPolicy};

use crate::csi::{self, CacheResolver, KernelMounter, Plugin, PluginConfig};
use crate::gpu::Inventory;
use crate::store::{Store, StoreConfig};

/// At start, checks every tree no volume uses against the record written when it was
/// extracted: one changed while the agent was down is removed, and extracted again when a
/// cache or pod next wants it. Logs one summary line.
async fn verify_store(store: Arc<Store>) {
    let started = std::time::Instant::now();
    match store.verify_idle().await {
        Ok(results) => {
            let mut bytes = 0;
            let (mut intact, mut damaged, mut unrecorded) = (0, 0, 0);
            for (_, check) in &results {
                match check {
                    crate::store::TreeCheck::Intact { bytes: b, .. } => {
                        intact += 1;
                        bytes += b;
                    }
                    crate::store::TreeCheck::Damaged { .. } => damaged += 1,
                    crate::store::TreeCheck::Unrecorded => unrecorded += 1,
                }
            }
            info!(
                intact,
                damaged,
                unrecorded,
                bytes,
                seconds = started.elapsed().as_secs_f64(),
                "idle trees verified against their records"
            );
        }
        Err(e) => tracing::warn!(error = %e, "verifying the store's idle trees failed"),
    }
}

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
    let puller = cfg.registry.puller()?;
    let client = cfg.kube.client().await?;
    let (queue, rx) = reconcile::WorkQueue::new();
    let caches = Arc::new(watch::WatchResolver::start_notifying(client.clone(), {
        let q = queue.clone();
        move |scope| q.add(scope)
    }));
    let broker = cfg
        .credentials
        .clone()
        .map(|c| Arc::new(crate::pull_credentials::Broker::new(c, client.clone())));
    let plugin = Plugin::new(
        PluginConfig {
            node_name: cfg.node_name.clone(),
            publish_timeout: cfg.publish_timeout,
            allow_unclaimed: !cfg.require_gpu_claims,
            pod_wait: cfg.pod_wait,
            ..Default::default()
        },
        store.clone(),
        puller.clone(),
        caches.clone(),
        KernelMounter,
        gpus.clone(),
    );
    let plugin = Arc::new(match broker {
        Some(b) => plugin.with_credentials(b),
        None => plugin,
    });
    let ctx = Arc::new(reconcile::Context::new(
        reconcile::LoopConfig {
            node: cfg.node_name.clone(),
            policy: cfg.pull_policy,
            allow_unclaimed: !cfg.require_gpu_claims,
            gc_interval: cfg.gc_interval,
            miss_scan_interval: cfg.miss_scan_interval,
        },
        client.clone(),
        store.clone(),
        puller,
        caches.clone(),
        gpus,
        queue.clone(),
    ));
    plugin.on_volume_change(Box::new({
        let ctx = Arc::downgrade(&ctx);
        move |event| {
            if let Some(ctx) = ctx.upgrade() {
                ctx.volume_event(event);
            }
        }
    }));
    plugin.set_pod_source(Arc::new(watch::PodWatch::start(
        client.clone(),
        &cfg.node_name,
    )));
    // Where the store cannot hold a writable layer, volumes are read-only (each publish
    // says so in a Warning Event on its pod).
    let _ = plugin.probe_upper_layers();
    let dropped = plugin.reconcile_records()?;

    let ready: health::Readiness = Arc::new({
        let (plugin, caches) = (plugin.clone(), caches.clone());
        move || {
            if !caches.ready() {
                return Err("the cache watch has not synced".into());
            }
            if !plugin.is_ready() {
                return Err("the CSI plugin is not ready".into());
            }
            Ok(())
        }
    });
    let health = health::bind(cfg.health_addr, ready, || crate::metrics::global().encode())
        .await
        .with_context(|| format!("binding --health-addr {}", cfg.health_addr))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let tasks = [
        tokio::spawn(health),
        tokio::spawn(reconcile::run_loop(ctx.clone(), rx, stopped())),
        tokio::spawn(reconcile::gc_loop(ctx.clone())),
        tokio::spawn(reconcile::miss_loop(ctx.clone())),
        tokio::spawn(reconcile::owner_loop(ctx.clone())),
        tokio::spawn(ctx.clone().watch_pulls()),
        tokio::spawn({
            let ctx = ctx.clone();
            async move { reconcile::queue_startup_work(&ctx).await }
        }),
        tokio::spawn(verify_store(store.clone())),
    ];
    info!(
        socket = %cfg.socket.display(),
        health = %cfg.health_addr,
        policy = ?cfg.pull_policy,
        stale_records = dropped,
        "serving CSI"
    );
    // The CSI server finishes the calls in flight before returning; the control loop
    // stops between reconciles. Extractions cut short leave only temporaries, removed at
    // the next start.
    let served = csi::server::serve(plugin, &cfg.socket, shutdown).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }
    served?;
    info!("stopped");
    Ok(())
}
