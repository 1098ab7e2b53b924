//! `gkm-controller`: admission webhook and status controller. Parsing and logging only;
//! the work is in the `gkm_controller` library.

use clap::Parser;
use gkm_controller::run::{Args, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gkm::install_crypto();
    let args = Args::parse();
    let (log, json) = (args.log.clone(), args.log_json);
    let cfg = match args.check() {
        Ok(c) => c,
        Err(errs) => {
            eprintln!(
                "gkm-controller: invalid configuration:\n  - {}",
                errs.join("\n  - ")
            );
            std::process::exit(2);
        }
    };
    gkm::init_logging(&log, json)?;
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
