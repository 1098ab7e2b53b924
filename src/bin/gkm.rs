//! `gkm`: the operator's command line. Parsing only; the work is in `gkm::cli`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gkm::cli;
use gkm::cmdline::RegistryArgs;
use gkm::gpu::Inventory;

#[derive(Parser)]
#[command(name = "gkm", version, about = "GPU Kernel Manager")]
struct Cli {
    /// Log filter (e.g. `debug`, `gkm=trace`); logs go to stderr.
    #[arg(long, global = true, env = "GKM_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct GpuArgs {
    /// A simulated GPU inventory (YAML or JSON) instead of the real devices.
    #[arg(long = "gpus-file", value_name = "FILE")]
    simulated: Option<PathBuf>,
    /// Root of sysfs, where the AMD KFD topology is read.
    #[arg(long, value_name = "DIR", default_value = gkm::gpu::DEFAULT_SYSFS_ROOT)]
    sysfs_root: PathBuf,
    /// Path of libnvidia-ml (default: the dynamic loader's libnvidia-ml.so.1).
    #[arg(long, value_name = "FILE")]
    nvml_library: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// List this node's GPUs (NVIDIA through NVML, AMD through KFD sysfs, or simulated).
    Gpus {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's labels, GPU targets and size, and whether this node's GPUs match.
    Inspect {
        /// Image reference, by tag or digest.
        image: String,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        gpu: GpuArgs,
        /// Print JSON instead of a report.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image by digest and extract it into a store, as the node agent does.
    Pull {
        /// Image reference pinned by digest: REPO@sha256:<hex>.
        image: String,
        /// The store's root folder.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/gkm")]
        store: PathBuf,
        /// Skip flushing the filesystem before the tree becomes visible.
        #[arg(long)]
        no_sync: bool,
        /// No progress bar (it is shown only when stderr is a terminal anyway).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Package a Triton, Inductor (torch.compile) or vLLM cache directory as an OCI image
    /// (MCV layout) and push it.
    Build {
        /// The cache directory (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, or a vLLM cache
        /// root).
        dir: PathBuf,
        /// What the directory holds.
        #[arg(long, value_parser = ["triton", "inductor", "vllm"])]
        kind: String,
        /// Where to push: REGISTRY/REPO[:TAG]; with --oci-layout, the image's name there.
        #[arg(
            short = 't',
            long = "tag",
            value_name = "REF",
            required_unless_present = "oci_layout"
        )]
        reference: Option<String>,
        /// A GPU target BACKEND:ARCH:WARP (e.g. cuda:90:32), replacing those found in the
        /// cache's kernel metadata. Repeatable.
        #[arg(long = "target", value_name = "BACKEND:ARCH:WARP")]
        targets: Vec<String>,
        /// Sign the pushed digest (cosign tag format) with this private key: a cosign key
        /// (password from COSIGN_PASSWORD) or a PKCS#8/SEC1 ECDSA P-256 PEM.
        #[arg(long = "sign-key", value_name = "KEY")]
        sign_key: Option<PathBuf>,
        /// Write an OCI image layout directory instead of pushing.
        #[arg(long = "oci-layout", value_name = "PATH")]
        oci_layout: Option<PathBuf>,
        /// No progress bars for packing and uploading (they are shown only when stderr is a
        /// terminal anyway).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Verify an image's signatures under a trust policy, as GKM's admission does.
    Verify {
        /// Image reference, by tag or digest.
        image: String,
        /// The trust policy file (the controller's ConfigMap).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Verify an incoming image and copy it, with its signatures, into the trusted
    /// registry (the policy's `promotion`); prints what was done as JSON.
    Promote {
        /// The incoming image, by tag or digest.
        image: String,
        /// The digest to promote (default: the image's digest, or its tag resolved once).
        #[arg(long, value_name = "sha256:HEX")]
        digest: Option<String>,
        /// The trust policy file: its authorities and `promotion` section (promotes with
        /// this machine's registry credentials; not with --server).
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "server",
            conflicts_with = "server"
        )]
        policy: Option<PathBuf>,
        /// Sign the promoted digest with this key (overrides promotion.signKey).
        #[arg(long = "sign-key", value_name = "KEY", conflicts_with = "server")]
        sign_key: Option<PathBuf>,
        /// Ask the cluster's promoter (the controller's API, `https://host[:port]`) to
        /// verify and promote, with a Kubernetes token; nothing is written from here.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// The bearer token for --server (default: the current kubeconfig context's).
        #[arg(long = "token-file", value_name = "FILE", requires = "server")]
        token_file: Option<PathBuf>,
        /// PEM CA bundle for --server's certificate (default: the kubeconfig cluster's CA).
        #[arg(long = "ca-file", value_name = "FILE", requires = "server")]
        ca_file: Option<PathBuf>,
        /// Seconds to wait for --server's answer (promotion copies every blob).
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 600,
            requires = "server"
        )]
        timeout: u64,
        /// No copy progress bars (they are shown only when stderr is a terminal anyway;
        /// with --server the cluster copies, and nothing is shown).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Remove every extracted image of a store that no volume uses.
    Gc {
        #[arg(long, value_name = "DIR", default_value = "/var/lib/gkm")]
        store: PathBuf,
    },
    /// Check extracted images against what was extracted: every file's content, size and
    /// mode, every symlink, nothing added or removed. Reads every byte. Exits 1 when a tree
    /// differs; with --repair such a tree is removed, to be extracted again at its next use.
    Fsck {
        #[arg(long, value_name = "DIR", default_value = "/var/lib/gkm")]
        store: PathBuf,
        /// Remove each damaged tree that no volume uses (takes the store's lock: stop the
        /// agent first, or let it repair idle trees itself when it starts).
        #[arg(long)]
        repair: bool,
        /// Digests to check (sha256:<hex>); all of the store's by default.
        #[arg(value_name = "DIGEST")]
        digests: Vec<String>,
    },
    /// Print GKM's CustomResourceDefinitions as YAML, or write them into a folder.
    Crds {
        /// Write one file per CRD into this folder instead of printing.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

impl From<GpuArgs> for Inventory {
    fn from(a: GpuArgs) -> Self {
        Inventory {
            nvml_library: a.nvml_library,
            sysfs_root: a.sysfs_root,
            simulated_file: a.simulated,
        }
    }
}

/// Exit codes: 0 done, 1 failed, 2 bad arguments (clap) or a request the promoter refused,
/// 3 and 4 not authenticated or not allowed by the promoter, 5 the promoter or the network
/// failed (`gkm promote --server`; see [`gkm::promote::client::ClientError::exit_code`]).
fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", gkm::cli::report(&e));
            let code = e
                .downcast_ref::<gkm::promote::client::ClientError>()
                .map_or(1, |c| c.exit_code());
            std::process::ExitCode::from(code)
        }
    }
}

async fn run() -> Result<()> {
    gkm::install_crypto();
    let cli = Cli::parse();
    gkm::init_logging(&cli.log, false).context("--log")?;
    match cli.command {
        Command::Gpus { gpu, json } => print!("{}", cli::gpus(&gpu.into(), json)?),
        Command::Inspect {
            image,
            registry,
            gpu,
            json,
        } => {
            let report = cli::inspect(&image, &registry, &gpu.into()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Command::Pull {
            image,
            store,
            no_sync,
            quiet,
            registry,
        } => {
            print!(
                "{}",
                cli::pull(&image, store, !no_sync, quiet, &registry).await?
            )
        }
        Command::Build {
            dir,
            kind,
            reference,
            targets,
            sign_key,
            oci_layout,
            quiet,
            registry,
        } => {
            let req = cli::BuildRequest {
                dir,
                kind,
                reference,
                targets,
                sign_key,
                oci_layout,
                quiet,
            };
            println!("{}", cli::build(&req, &registry).await?);
        }
        Command::Verify {
            image,
            policy,
            registry,
        } => print!("{}", cli::verify(&image, &policy, &registry).await?),
        Command::Promote {
            image,
            digest,
            policy,
            sign_key,
            server,
            token_file,
            ca_file,
            timeout,
            quiet,
            registry,
        } => {
            let done = match (server, policy) {
                (Some(server), _) => {
                    let opts = gkm::promote::client::ServerOptions {
                        server,
                        token_file,
                        ca_file,
                        timeout: std::time::Duration::from_secs(timeout),
                    };
                    cli::promote_via_server(&image, digest.as_deref(), &opts, &registry).await?
                }
                (None, Some(policy)) => {
                    let req = cli::PromoteRequest {
                        image,
                        digest,
                        policy,
                        sign_key,
                        quiet,
                    };
                    cli::promote(&req, &registry).await?
                }
                (None, None) => unreachable!("clap requires --policy without --server"),
            };
            println!("{}", serde_json::to_string_pretty(&done)?);
        }
        Command::Gc { store } => {
            for d in cli::gc(store).await? {
                println!("removed {d}");
            }
        }
        Command::Fsck {
            store,
            repair,
            digests,
        } => {
            let report = cli::fsck(store, digests, repair).await?;
            print!("{}", report.text);
            if report.damaged > 0 {
                anyhow::bail!(
                    "{} of {} trees differ from what was extracted{}",
                    report.damaged,
                    report.checked,
                    if repair {
                        ""
                    } else {
                        "; `gkm fsck --repair` (agent stopped) removes them, to be extracted again"
                    }
                );
            }
        }
        Command::Crds { write } => crds(write)?,
    }
    Ok(())
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
