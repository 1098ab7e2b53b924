//! `gkm-controller`: admission webhook and status controller. Parsing and logging only;
//! the work is in the `gkm_controller` library.

use clap::Parser;
use gkm_controller::run::{Args, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gkm_image::install_crypto();
    let cfg = match Args::parse().check() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gkm-controller: {e}");
            std::process::exit(2);
        }
    };
    cfg.log.init()?;
    run(cfg, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
    .await
}
