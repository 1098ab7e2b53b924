//! Benchmark (not a test) of the CSI plugin over its unix socket, as root with real mounts:
//! - p50/p99 of sequential NodePublishVolume + NodeUnpublishVolume pairs of an extracted
//!   Triton cache (50 kernels with group files), each volume a writable overlay with the
//!   path view for the pod's mount path, beside the floor measured in the same run
//!   (mkdir of the target, upper and work directories + the same overlay mount; umount +
//!   rmdir, straight through the kernel), with volume records fsynced (the default) and not;
//! - concurrent publishes of one cache that is not extracted yet: all must succeed, with
//!   exactly one extraction (counted from the registry's requests for its layer).
//!
//! `cargo bench --bench publish` (PAIRS=1000 CONCURRENT=200 by default). Caches are resolved
//! from an in-memory table filled from the real API server, as the agent's watch cache does;
//! every pod mounts its volume at `/cache` (a pod source answering so), as one Deployment's
//! pods do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gkm::api::{GKMCache, RESOLVED_DIGEST_ANNOTATION};
use gkm::csi::pb::node_client::NodeClient;
use gkm::csi::pb::{self, volume_capability};
use gkm::csi::{
    ATTR_CACHE, ATTR_NAMESPACE, CTX_POD_NAME, CTX_POD_NAMESPACE, CTX_POD_UID, KernelMounter,
    MountSpec, Mounter, Plugin, PluginConfig, PodMounts, PodRef, PodSource, ResolvedCache,
    StaticResolver, UpperDirs,
};
use gkm::oci::{Credentials, PullConfig, Puller};
use gkm::store::{Store, StoreConfig};
use gkm_testenv::image::{CacheKind, Compression, ImageBuilder, PushedImage, Target};
use gkm_testenv::{Cluster, Registry, unique_name};
use kube::api::{Api, PostParams};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn push(registry: &Registry, seed: &str) -> PushedImage {
    let src = tempfile::tempdir().unwrap();
    for i in 0..50 {
        let key = format!("{seed}{i:04}");
        let d = src.path().join(&key);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("kernel.cubin"), vec![i as u8; 4096]).unwrap();
        std::fs::write(d.join("kernel.json"), format!("{{\"n\":{i}}}")).unwrap();
        std::fs::write(
            d.join("__grp__kernel.json"),
            format!(
                "{{\"child_paths\":{{\"kernel.cubin\":\"/capture/{key}/kernel.cubin\",\"kernel.json\":\"/capture/{key}/kernel.json\"}}}}"
            ),
        )
        .unwrap();
    }
    ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap()
    .push(registry, &unique_name("bench/publish"), Some("v1"))
    .await
    .unwrap()
}

/// Creates a GKMCache as the webhook leaves it; returns what the watch cache would hold.
async fn cache(cluster: &Cluster, ns: &str, name: &str, image: &PushedImage) -> ResolvedCache {
    let api: Api<GKMCache> = Api::namespaced(cluster.admin_client().await.unwrap(), ns);
    let mut c = GKMCache::new(name, Default::default());
    c.spec.image = image.by_tag();
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), image.digest.clone())].into());
    let created = api.create(&PostParams::default(), &c).await.unwrap();
    ResolvedCache::from_namespaced(&created).unwrap()
}

fn publish_req(vol: &str, target: &Path, ns: &str, cache: &str) -> pb::NodePublishVolumeRequest {
    let ctx: HashMap<String, String> = [
        (ATTR_CACHE, cache),
        (ATTR_NAMESPACE, ns),
        (CTX_POD_NAMESPACE, ns),
        (CTX_POD_NAME, vol),
        (CTX_POD_UID, vol),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    pb::NodePublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(volume_capability::AccessMode { mode: 1 }),
        }),
        volume_context: ctx,
        ..Default::default()
    }
}

fn unpublish_req(vol: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
    }
}

/// Every pod mounts its one `csi.gkm.io` volume at `/cache`.
struct AllAtCache;

impl PodSource for AllAtCache {
    fn lookup<'a>(
        &'a self,
        pod: &'a PodRef,
    ) -> futures::future::BoxFuture<'a, Result<Option<PodMounts>, String>> {
        let p = PodMounts {
            uid: pod.uid.clone(),
            volumes: vec![("kernels".into(), gkm::csi::DRIVER_NAME.into())],
            containers: vec![(
                "containers[0] \"app\"".into(),
                vec![gkm::csi::pods::VolumeMountInfo {
                    volume: "kernels".into(),
                    mount_path: "/cache".into(),
                    ..Default::default()
                }],
            )],
        };
        Box::pin(async move { Ok(Some(p)) })
    }
}

/// A plugin served on a unix socket, over its own store.
struct Node {
    store: Arc<Store>,
    channel: tonic::transport::Channel,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(
        work: &Path,
        registry: &Registry,
        resolver: Arc<StaticResolver>,
        sync_records: bool,
    ) -> Node {
        let root = work.join(format!("store-{sync_records}"));
        let store = Arc::new(
            Store::open(StoreConfig {
                root: root.clone(),
                sync: false,
                sync_records,
                ..Default::default()
            })
            .unwrap(),
        );
        let puller = Puller::new(
            PullConfig {
                insecure_registries: vec![registry.host().to_string()],
                ..Default::default()
            },
            Credentials::anonymous(),
        );
        let gpus = gkm::gpu::simulated::parse(
            "gpus:\n  - uuid: GPU-bench\n    backend: cuda\n    arch: \"90\"\n",
            false,
        )
        .unwrap();
        let cfg = PluginConfig {
            node_name: "bench".into(),
            ..Default::default()
        };
        let plugin = Arc::new(Plugin::new(
            cfg,
            store.clone(),
            puller,
            resolver,
            KernelMounter,
            gpus,
        ));
        plugin.set_pod_source(Arc::new(AllAtCache));
        plugin.probe_upper_layers().unwrap();
        let socket = root.join("csi.sock");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let socket = socket.clone();
            async move {
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                let _ = gkm::csi::server::serve(plugin, &socket, shutdown).await;
            }
        });
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let channel = gkm::csi::server::connect(&socket).await.unwrap();
        Node {
            store,
            channel,
            stop,
            server,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

/// Sorted latencies of one sequential run.
struct Sequential {
    floor_mount: Vec<Duration>,
    floor_pair: Vec<Duration>,
    publish: Vec<Duration>,
    pair: Vec<Duration>,
}

/// Publish+unpublish pairs, interleaved with the kernel floor so both see the same machine.
async fn sequential(
    node: &Node,
    pods: &Path,
    ns: &str,
    image: &PushedImage,
    pairs: usize,
    tag: &str,
) -> Sequential {
    let mut client = NodeClient::new(node.channel.clone());
    let warm = pods.join(format!("warmup-{tag}"));
    client
        .node_publish_volume(publish_req("warmup", &warm, ns, "warm"))
        .await
        .unwrap();
    client
        .node_unpublish_volume(unpublish_req("warmup", &warm))
        .await
        .unwrap();
    let extracted = node.store.get(&image.digest).unwrap().unwrap();
    let view = node
        .store
        .ensure_view(
            &extracted,
            &gkm::kernel_cache::MountBase::at("/cache"),
            "floor",
        )
        .unwrap()
        .expect("the cache's group files need a view");
    let lowers = vec![view, extracted.mount_source()];
    let mut s = Sequential {
        floor_mount: Vec::new(),
        floor_pair: Vec::new(),
        publish: Vec::new(),
        pair: Vec::new(),
    };
    for i in 0..pairs {
        let ft = pods.join(format!("floor-{tag}-{i}"));
        let (upper, work) = (
            pods.join(format!("floor-u-{tag}-{i}")),
            pods.join(format!("floor-w-{tag}-{i}")),
        );
        let t0 = Instant::now();
        for d in [&ft, &upper, &work] {
            std::fs::create_dir(d).unwrap();
        }
        let spec = MountSpec::Overlay {
            lowers: lowers.clone(),
            upper: Some(UpperDirs {
                upper: upper.clone(),
                work: work.clone(),
            }),
        };
        KernelMounter.mount(&spec, &ft).unwrap();
        let t1 = Instant::now();
        KernelMounter.unmount(&ft).unwrap();
        std::fs::remove_dir(&ft).unwrap();
        std::fs::remove_dir(&upper).unwrap();
        std::fs::remove_dir_all(&work).unwrap();
        s.floor_mount.push(t1 - t0);
        s.floor_pair.push(t0.elapsed());

        let vol = format!("vol-{tag}-{i}");
        let target: PathBuf = pods.join(&vol);
        let t0 = Instant::now();
        client
            .node_publish_volume(publish_req(&vol, &target, ns, "warm"))
            .await
            .unwrap();
        let t1 = Instant::now();
        client
            .node_unpublish_volume(unpublish_req(&vol, &target))
            .await
            .unwrap();
        s.publish.push(t1 - t0);
        s.pair.push(t0.elapsed());
    }
    for v in [
        &mut s.floor_mount,
        &mut s.floor_pair,
        &mut s.publish,
        &mut s.pair,
    ] {
        v.sort();
    }
    s
}

fn main() {
    gkm::install_crypto();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let pairs = env_num("PAIRS", 1000);
    let concurrent = env_num("CONCURRENT", 200);
    let cluster = Cluster::start().await.unwrap();
    let registry = Registry::start().await.unwrap();
    let ns = cluster.new_namespace("bench").await.unwrap();
    let warm_image = push(&registry, "w").await;
    let cold_image = push(&registry, "c").await;
    let resolver = Arc::new(StaticResolver::default());
    resolver.insert(cache(&cluster, &ns, "warm", &warm_image).await);
    resolver.insert(cache(&cluster, &ns, "cold", &cold_image).await);

    let work = tempfile::tempdir().unwrap();
    let pods = work.path().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let mut runs = Vec::new();
    let mut node = None;
    for sync_records in [true, false] {
        if let Some(old) = node.take() {
            Node::stop(old).await;
        }
        let n = Node::start(work.path(), &registry, resolver.clone(), sync_records).await;
        runs.push((
            sync_records,
            sequential(
                &n,
                &pods,
                &ns,
                &warm_image,
                pairs,
                &sync_records.to_string(),
            )
            .await,
        ));
        node = Some(n);
    }
    let node = node.expect("a node ran");

    // Concurrent publishes of a cache nobody extracted yet.
    let manifest: serde_json::Value = serde_json::from_slice(&cold_image.manifest).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer_gets = |log: &str| {
        log.lines()
            .filter(|l| l.contains("GET /v2/") && l.contains(&format!("/blobs/{layer}")))
            .count()
    };
    let before = layer_gets(&registry.request_log());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrent {
        let mut client = NodeClient::new(node.channel.clone());
        let target = pods.join(format!("cold-{i}"));
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            client
                .node_publish_volume(publish_req(&format!("cold-{i}"), &target, &ns, "cold"))
                .await
        }));
    }
    let mut ok = 0;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    let cold_wall = t0.elapsed();
    let layer_fetches = layer_gets(&registry.request_log()) - before;
    let records = node
        .store
        .volumes()
        .iter()
        .filter(|v| v.digest == cold_image.digest)
        .count();
    for v in node.store.volumes() {
        let _ = KernelMounter.unmount(&v.target_path);
    }
    node.stop().await;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("CSI publish over the unix socket, {pairs} sequential pairs, {cores} cores");
    println!("{:<48} {:>10} {:>10}", "", "p50 µs", "p99 µs");
    let row = |name: &str, v: &[Duration]| {
        println!(
            "{name:<48} {:>10.0} {:>10.0}",
            us(percentile(v, 0.5)),
            us(percentile(v, 0.99))
        )
    };
    for (sync, s) in &runs {
        println!(
            "-- {}",
            if *sync {
                "volume records fsynced (default)"
            } else {
                "volume records not fsynced"
            }
        );
        row("floor: mkdir x3 + overlay mount", &s.floor_mount);
        row("floor: + umount + rmdir x3", &s.floor_pair);
        row("NodePublishVolume", &s.publish);
        row("NodePublishVolume + NodeUnpublishVolume", &s.pair);
        let p99 = percentile(&s.publish, 0.99);
        println!(
            "   publish p99 {:.2} ms (target < 3 ms); {:.1}x the floor's p99 (target within 5x)",
            p99.as_secs_f64() * 1e3,
            p99.as_secs_f64() / percentile(&s.floor_mount, 0.99).as_secs_f64()
        );
    }
    println!(
        "{concurrent} concurrent publishes of an unextracted cache: {ok} succeeded, {} failed, layer fetched {layer_fetches} time(s) (1 = one extraction), {records} volume records, {:.2} s",
        errors.len(),
        cold_wall.as_secs_f64()
    );
    if let Some(e) = errors.first() {
        println!("first error: {e}");
    }
}
