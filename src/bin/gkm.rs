//! `gkm`: the operator's command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gkm", version, about = "GPU Kernel Manager")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print GKM's CustomResourceDefinitions as YAML, or write them into a folder.
    Crds {
        /// Write one file per CRD into this folder instead of printing.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crds { write } => crds(write),
    }
}

fn crds(write: Option<PathBuf>) -> Result<()> {
    for (file, crd) in gkm::api::crds() {
        let yaml = gkm::api::crd_yaml(&crd);
        match &write {
            Some(dir) => {
                let path = dir.join(file);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
