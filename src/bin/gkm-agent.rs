//! `gkm-agent`: the node agent and CSI node plugin. Parsing and logging only; the work is
//! in `gkm::agent`.

use clap::Parser;
use gkm::agent::{self, AgentArgs};

// Two workers whatever the node size: the agent waits on I/O, and each worker thread costs
// memory (a malloc arena) on nodes with a hundred cores.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    agent::memory::limit_arenas();
    gkm::install_crypto();
    let cfg = match AgentArgs::parse().check() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gkm-agent: {e}");
            std::process::exit(2);
        }
    };
    cfg.log.init()?;
    agent::run(cfg, shutdown_signal()).await
}

/// SIGTERM (kubelet stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
