//! Benchmark (not a test) of GKM's admission webhook behind a real kube-apiserver: the wall
//! time of `Api::<GKMCache>::create` as the unprivileged user `alice`, through both the
//! mutating and the validating webhook (`gkm-controller --webhook-only`, registered with
//! `clientConfig.url` + `caBundle` and a namespaceSelector):
//! - warm: every cache names the same signed image by tag (tag and verification caches hot);
//! - cold: every cache names a different image, pushed and signed with real cosign before
//!   timing starts (a tag resolution and a signature verification against the registry each);
//! - floor: the same creates in a namespace the webhooks do not select, interleaved with the
//!   warm ones, as the apiserver's own cost.
//!
//! `cargo bench -p gkm-controller --bench admission` (CREATES=300 COLD=40 by default).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use gkm_api::{GKMCache, RESOLVED_DIGEST_ANNOTATION};
use gkm_testenv::image::{CacheKind, Compression, ImageBuilder, PushedImage, Target};
use gkm_testenv::pki::Ca;
use gkm_testenv::process::ServerProcess;
use gkm_testenv::{Cluster, Cosign, Registry, unique_name};
use kube::api::{Api, Patch, PatchParams, PostParams};

const SELECTOR: &str = "gkm-webhook-bench";

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Starts `gkm-controller --webhook-only` on a free port and waits until it listens.
async fn start_controller(
    dir: &Path,
    ca: &Ca,
    policy: &str,
    registry: &str,
    kubeconfig: &Path,
) -> (ServerProcess, u16) {
    let port = gkm_testenv::process::free_port().unwrap();
    let serving = ca.server("gkm-webhook", &[]).unwrap();
    std::fs::write(dir.join("tls.crt"), &serving.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &serving.key_pem).unwrap();
    std::fs::write(dir.join("policy.yaml"), policy).unwrap();
    let args = vec![
        format!("--listen=127.0.0.1:{port}"),
        "--metrics-addr=127.0.0.1:0".to_string(),
        format!("--tls-cert={}", dir.join("tls.crt").display()),
        format!("--tls-key={}", dir.join("tls.key").display()),
        format!("--policy={}", dir.join("policy.yaml").display()),
        format!("--insecure-registry={registry}"),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--webhook-only".into(),
        "--log=warn".into(),
    ];
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gkm-controller"));
    let process = ServerProcess::start("gkm-controller", &bin, &args, &[], dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            process.exited().is_none() && Instant::now() < deadline,
            "controller did not listen: {}",
            process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (process, port)
}

/// Registers both webhooks for namespaces labelled `SELECTOR=on`.
async fn register(cluster: &Cluster, ca: &Ca, port: u16) {
    gkm_testenv::webhooks::register(cluster, "gkm-bench", port, &ca.cert_pem, (SELECTOR, "on"))
        .await
        .unwrap();
}

/// A namespace (selected by the webhooks or not) where alice may create caches.
async fn namespace(cluster: &Cluster, selected: bool) -> String {
    let labels: &[(&str, &str)] = if selected { &[(SELECTOR, "on")] } else { &[] };
    gkm_testenv::webhooks::editor_namespace(
        cluster,
        if selected { "wh" } else { "nowh" },
        labels,
        &["alice"],
    )
    .await
    .unwrap()
}

async fn push(registry: &Registry, repo: &str, seed: &str) -> PushedImage {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("k")).unwrap();
    std::fs::write(src.path().join("k/kernel.json"), seed).unwrap();
    ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap()
    .push(registry, repo, Some("v1"))
    .await
    .unwrap()
}

fn cache(name: &str, image: &str) -> GKMCache {
    let mut c = GKMCache::new(name, Default::default());
    c.spec.image = image.into();
    c
}

fn annotation(c: &GKMCache) -> Option<&str> {
    c.metadata
        .annotations
        .as_ref()?
        .get(RESOLVED_DIGEST_ANNOTATION)
        .map(String::as_str)
}

/// One timed create; the webhooked ones must come back pinned to `digest`.
async fn timed(api: &Api<GKMCache>, name: &str, img: &PushedImage, pinned: bool) -> Duration {
    let t0 = Instant::now();
    let created = api
        .create(&PostParams::default(), &cache(name, &img.by_tag()))
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    let took = t0.elapsed();
    if pinned {
        assert_eq!(annotation(&created), Some(img.digest.as_str()), "{name}");
    }
    took
}

/// Waits until the apiserver calls both webhooks: a create comes back pinned (mutating) and
/// alice's change of the annotation is denied (validating).
async fn wait_for_webhooks(alice: &Api<GKMCache>, img: &PushedImage) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        assert!(Instant::now() < deadline, "the webhooks never took effect");
        let name = format!("ready-{i}");
        let pinned = match alice
            .create(&PostParams::default(), &cache(&name, &img.by_tag()))
            .await
        {
            Ok(c) => annotation(&c).is_some(),
            Err(_) => false,
        };
        if pinned {
            let forged = "sha256:".to_string() + &"0".repeat(64);
            let patch = serde_json::json!({"metadata": {"annotations": {RESOLVED_DIGEST_ANNOTATION: forged}}});
            let denied = alice
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_err();
            if denied {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() {
    gkm_image::install_crypto();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let creates = env_num("CREATES", 300);
    let cold = env_num("COLD", 40);
    let cluster = Cluster::start().await.unwrap();
    let registry = Registry::start().await.unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let ca = Ca::new("webhook-bench-ca").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem = cosign.public_key_pem().unwrap();
    let key: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    let policy = format!(
        "authorities:\n  - name: bench-key\n    key: |\n{key}trustedRegistries:\n  - {}/trusted\nverification:\n  timeoutSeconds: 8\n",
        registry.host()
    );
    let (controller, port) = start_controller(
        dir.path(),
        &ca,
        &policy,
        registry.host(),
        &cluster.admin_kubeconfig(),
    )
    .await;
    register(&cluster, &ca, port).await;
    let with = namespace(&cluster, true).await;
    let without = namespace(&cluster, false).await;
    let user = cluster.user_client("alice").await.unwrap();
    let alice: Api<GKMCache> = Api::namespaced(user.clone(), &with);
    let floor_api: Api<GKMCache> = Api::namespaced(user, &without);

    // Every image pushed and signed before any timing.
    let warm_img = push(&registry, &unique_name("trusted/warm"), "warm").await;
    cosign.sign(&warm_img.by_digest()).await.unwrap();
    let t0 = Instant::now();
    let cold_imgs: Vec<PushedImage> = futures::stream::iter(0..cold)
        .map(|i| {
            let (registry, cosign) = (&registry, &cosign);
            async move {
                let repo = unique_name(&format!("trusted/cold{i}"));
                let img = push(registry, &repo, &format!("cold {i} {repo}")).await;
                cosign.sign(&img.by_digest()).await.unwrap();
                img
            }
        })
        .buffered(4)
        .collect()
        .await;
    let prep = t0.elapsed();

    wait_for_webhooks(&alice, &warm_img).await;
    for i in 0..10 {
        timed(&alice, &format!("prewarm-{i}"), &warm_img, true).await;
        timed(&floor_api, &format!("prewarm-{i}"), &warm_img, false).await;
    }

    // Warm, interleaved with the floor so both see the same machine.
    let (mut warm, mut floor) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    for i in 0..creates {
        warm.push(timed(&alice, &format!("warm-{i}"), &warm_img, true).await);
        floor.push(timed(&floor_api, &format!("floor-{i}"), &warm_img, false).await);
    }
    let warm_wall = t0.elapsed();
    let mut cold_t = Vec::new();
    for (i, img) in cold_imgs.iter().enumerate() {
        cold_t.push(timed(&alice, &format!("cold-{i}"), img, true).await);
    }
    let exited = controller.exited();
    drop(controller);

    for v in [&mut warm, &mut floor, &mut cold_t] {
        v.sort();
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "GKMCache creates as alice through the real kube-apiserver, {cores} cores \
         (gkm-controller --webhook-only --log=warn; {cold} cold images pushed+signed in {:.1} s beforehand)",
        prep.as_secs_f64()
    );
    println!(
        "{:<58} {:>6} {:>8} {:>8} {:>8}",
        "", "n", "p50 ms", "p99 ms", "max ms"
    );
    let row = |name: &str, v: &[Duration]| {
        println!(
            "{name:<58} {:>6} {:>8.2} {:>8.2} {:>8.2}",
            v.len(),
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(*v.last().unwrap())
        )
    };
    row("floor: no webhook (namespace not selected)", &floor);
    row("warm: same signed image by tag (mutate + validate)", &warm);
    row("cold: new signed image each (resolve + verify)", &cold_t);
    let verdict = |v: &[Duration], target: f64| {
        let p99 = ms(percentile(v, 0.99));
        format!(
            "p99 {p99:.2} ms (target < {target} ms: {})",
            if p99 < target { "met" } else { "MISSED" }
        )
    };
    println!("   warm {}", verdict(&warm, 10.0));
    println!("   cold {}", verdict(&cold_t, 100.0));
    println!(
        "   warm p50 over the floor: +{:.2} ms; warm+floor loop {:.1} s",
        ms(percentile(&warm, 0.5)) - ms(percentile(&floor, 0.5)),
        warm_wall.as_secs_f64()
    );
    assert!(exited.is_none(), "the controller exited: {exited:?}");
}
