//! The CSI plugin resolves caches from the agent's watch cache: a publish for a known
//! cache works while the API server is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gkm::agent::watch::WatchResolver;
use gkm::api::CacheRef;
use gkm::api::{GKMCache, RESOLVED_DIGEST_ANNOTATION};
use gkm::csi::{CacheResolver, Plugin, PluginConfig, PublishRequest, RecordingMounter};
use gkm::oci::{Credentials, PullConfig, Puller};
use gkm::store::{Store, StoreConfig};
use gkm_testenv::image::{CacheKind, Compression, ImageBuilder, Target};
use gkm_testenv::{Cluster, shared_registry, unique_name};
use kube::api::{Api, PostParams};

#[tokio::test]
async fn a_known_cache_publishes_while_the_api_server_is_down() {
    // A cluster of its own: this test stops its API server.
    let cluster = Cluster::start().await.unwrap();
    let registry = shared_registry();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("k")).unwrap();
    std::fs::write(src.path().join("k/kernel.json"), b"{}").unwrap();
    let image = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap()
    .push(registry, &unique_name("watch/cache"), Some("v1"))
    .await
    .unwrap();
    let ns = cluster.new_namespace("watch").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    let mut c = GKMCache::new("llama", Default::default());
    c.spec.image = image.by_tag();
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), image.digest.clone())].into());
    Api::<GKMCache>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &c)
        .await
        .unwrap();

    let resolver = Arc::new(WatchResolver::start(client));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !resolver.ready() {
        assert!(Instant::now() < deadline, "the watch did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = CacheRef::Namespaced {
        namespace: ns.clone(),
        name: "llama".into(),
    };
    // The create may reach the store just after the initial list: wait for it.
    while resolver.resolve(&key).await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the cache never reached the watch cache"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(StoreConfig {
            root: dir.path().join("store"),
            sync: false,
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
        "gpus:\n  - uuid: GPU-w\n    backend: cuda\n    arch: \"90\"\n",
        false,
    )
    .unwrap();
    let plugin = Plugin::new(
        PluginConfig::default(),
        store,
        puller,
        resolver.clone(),
        RecordingMounter::default(),
        gpus,
    );

    cluster.apiserver().stop();
    assert!(
        cluster.apiserver().exited().is_some(),
        "the API server is down"
    );

    let target = dir.path().join("pod/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    plugin
        .publish(&PublishRequest {
            volume_id: "vol-1".into(),
            target_path: target.clone(),
            cache: key,
            pod_namespace: ns.clone(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            read_only: false,
        })
        .await
        .expect("published from the watch cache");
    assert!(plugin.mounter().is_mounted(&target));
    assert_eq!(plugin.store().volume("vol-1").unwrap().digest, image.digest);
}
