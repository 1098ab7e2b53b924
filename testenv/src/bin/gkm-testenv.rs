//! `gkm-testenv up`: starts a cluster (etcd + kube-apiserver with GKM's CRDs) and a
//! registry, prints where they are, and keeps them until interrupted or until stdin closes.
//! Everything it started dies with it, even on SIGKILL.
//!
//! `gkm-testenv gen-cache DIR MIB FILES`: writes a deterministic Triton-like cache tree.

use anyhow::{Context, Result, bail};
use tokio::io::AsyncReadExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("gen-cache") {
        let (Some(dir), Some(mib), Some(files)) = (args.get(1), args.get(2), args.get(3)) else {
            bail!("usage: gkm-testenv gen-cache DIR MIB FILES");
        };
        let dir = std::path::Path::new(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let g = gkm_testenv::fixtures::triton_like_cache(
            dir,
            mib.parse::<u64>()? << 20,
            files.parse()?,
            42,
        )?;
        println!("{} files, {} bytes", g.files, g.bytes);
        return Ok(());
    }
    if args.first().map(String::as_str) != Some("up") {
        bail!(
            "usage: gkm-testenv up   (starts etcd, kube-apiserver and a registry; Ctrl-C stops them)"
        );
    }
    let cluster = gkm_testenv::Cluster::start()
        .await
        .context("starting the cluster")?;
    let registry = gkm_testenv::Registry::start()
        .await
        .context("starting the registry")?;
    let info = serde_json::json!({
        "kubeconfig": cluster.admin_kubeconfig(),
        "apiserver": cluster.url(),
        "registry": registry.host(),
        "pids": {
            "etcd": cluster.etcd().pid(),
            "kube-apiserver": cluster.apiserver().pid(),
            "registry": registry.process().pid(),
        },
    });
    println!("{info}");
    eprintln!(
        "ready: export KUBECONFIG={}",
        cluster.admin_kubeconfig().display()
    );
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        // Closing stdin stops it too, so a parent can hold it by a pipe.
        _ = async { while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {} } => {}
    }
    Ok(())
}
