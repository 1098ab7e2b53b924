//! Benchmark (not a test) of the node agent's control loop against a real API server and
//! registry, with `gkm-agent` as a release-built process:
//! - idle RSS with CACHES caches (default 1,000) across NAMESPACES namespaces (default 50),
//!   once every node object reports every cache, measured from /proc;
//! - the time from creating a cache with a resolved digest to its node status showing
//!   Extracted, for a small image not seen before (ROUNDS rounds, eager pull policy).
//!
//! `cargo bench --bench agent`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gkm::api::{CacheState, GKMCache, GKMCacheNode, RESOLVED_DIGEST_ANNOTATION};
use gkm_testenv::image::{PushedImage, Target};
use gkm_testenv::process::{ServerProcess, free_port};
use gkm_testenv::{Cluster, Registry, unique_name};
use kube::api::{Api, ListParams, PostParams};

const NODE: &str = "bench-node";

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn push(registry: &Registry, content: &str) -> PushedImage {
    let repo = unique_name("bench/agent");
    let targets = [Target::new("cuda", "90", 32)];
    gkm_testenv::fixtures::push_kernel_cache(registry, &repo, "v1", content, &targets)
        .await
        .unwrap()
}

fn cache(name: &str, image: &PushedImage) -> GKMCache {
    let mut c = GKMCache::new(name, Default::default());
    c.spec.image = image.by_tag();
    c.metadata.annotations =
        Some([(RESOLVED_DIGEST_ANNOTATION.to_string(), image.digest.clone())].into());
    c
}

/// VmRSS, RssAnon and RssFile of `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    gkm::install_crypto();
    let (n_caches, n_ns, rounds) = (
        env_num("CACHES", 1000),
        env_num("NAMESPACES", 50),
        env_num("ROUNDS", 5),
    );
    let cluster = Cluster::start().await.unwrap();
    let registry = Registry::start().await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    let image = push(&registry, "shared kernel").await;

    let t = Instant::now();
    let mut namespaces = Vec::new();
    for i in 0..n_ns {
        let ns = format!("bench-{i}");
        cluster.ensure_namespace(&ns).await.unwrap();
        namespaces.push(ns);
    }
    for i in 0..n_caches {
        let ns = &namespaces[i % n_ns];
        Api::<GKMCache>::namespaced(client.clone(), ns)
            .create(
                &PostParams::default(),
                &cache(&format!("cache-{i}"), &image),
            )
            .await
            .unwrap();
    }
    eprintln!(
        "created {n_caches} caches in {n_ns} namespaces in {:.1?}",
        t.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gpus.yaml"),
        "gpus:\n  - uuid: GPU-bench\n    backend: cuda\n    arch: \"90\"\n",
    )
    .unwrap();
    let args = vec![
        format!("--node-name={NODE}"),
        format!(
            "--csi-endpoint=unix://{}",
            dir.path().join("csi.sock").display()
        ),
        format!("--store-root={}", dir.path().join("store").display()),
        format!("--gpus-file={}", dir.path().join("gpus.yaml").display()),
        format!("--insecure-registry={}", registry.host()),
        format!("--kubeconfig={}", cluster.admin_kubeconfig().display()),
        format!("--health-addr=127.0.0.1:{}", free_port().unwrap()),
        "--pull-policy=eager".to_string(),
        "--log=warn".to_string(),
    ];
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gkm-agent"));
    let started = Instant::now();
    let agent = ServerProcess::start("agent", &bin, &args, &[], dir.path()).unwrap();

    // Every node object reports every cache as Extracted (one shared digest).
    let nodes: Api<GKMCacheNode> = Api::all(client.clone());
    let per_ns = n_caches / n_ns;
    loop {
        let list = nodes.list(&ListParams::default()).await.unwrap();
        let done = list
            .items
            .iter()
            .filter(|n| {
                n.status.as_ref().is_some_and(|s| {
                    s.caches.len() >= per_ns
                        && s.caches
                            .values()
                            .all(|m| m.values().all(|e| e.state == CacheState::Extracted))
                })
            })
            .count();
        if done == n_ns {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {done} of {n_ns} node objects complete; log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let converged = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, anon, file) = rss_kib(agent.pid());
    println!(
        "agent with {n_caches} caches in {n_ns} namespaces: all node objects complete {:.2} s after start; idle RSS {:.1} MiB (heap and stacks {:.1} MiB, mapped binary {:.1} MiB; target < 32 MiB)",
        converged.as_secs_f64(),
        mib(rss),
        mib(anon),
        mib(file)
    );

    // Create -> Extracted for new small images.
    let ns = &namespaces[0];
    let caches = Api::<GKMCache>::namespaced(client.clone(), ns);
    let node_api: Api<GKMCacheNode> = Api::namespaced(client.clone(), ns);
    let mut times = Vec::new();
    for r in 0..rounds {
        let img = push(&registry, &format!("kernel round {r}")).await;
        let name = format!("fresh-{r}");
        let t = Instant::now();
        caches
            .create(&PostParams::default(), &cache(&name, &img))
            .await
            .unwrap();
        loop {
            let n = node_api.get(NODE).await.unwrap();
            let state = n
                .status
                .as_ref()
                .and_then(|s| s.caches.get(&name))
                .and_then(|m| m.get(&img.digest))
                .map(|e| e.state);
            if state == Some(CacheState::Extracted) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "round {r}: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "create -> node status Extracted (small image, {rounds} rounds): median {:.0} ms, max {:.0} ms",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "agent RSS after the rounds: {:.1} MiB",
        mib(rss_kib(agent.pid()).0)
    );
}
