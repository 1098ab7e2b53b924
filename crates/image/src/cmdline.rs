//! Command-line plumbing shared by `gkm`, `gkm-agent` and `gkm-controller`: the clap
//! argument groups each flattens (so a flag means the same everywhere, with one
//! environment variable), their checks, which add every bad value to one list
//! ([`ConfigErrors`]: one start reports them all, as linkerd2-proxy's config does), and the
//! clients they build.

use std::path::PathBuf;

use crate::oci::{Credentials, PullConfig, Puller, Pusher};

/// Every problem with a configuration, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// How to reach registries.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// A registry (`host[:port]`) spoken to over plain HTTP. Repeatable; comma-separated in
    /// the environment.
    #[arg(
        long = "insecure-registry",
        env = "GKM_INSECURE_REGISTRIES",
        value_delimiter = ',',
        value_name = "HOST"
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials: a docker config file (`{"auths": {...}}`; in a cluster, a
    /// mounted `kubernetes.io/dockerconfigjson` Secret).
    #[arg(long = "registry-auth", env = "GKM_REGISTRY_AUTH", value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,
}

impl RegistryArgs {
    /// Adds a problem to `errs` for each bad value: a host that is not `host[:port]`, a
    /// credentials file that is not there.
    pub fn check(&self, errs: &mut Vec<String>) {
        for r in &self.insecure_registries {
            if r.is_empty() || r.contains('/') || r.contains("://") {
                errs.push(format!("--insecure-registry {r:?}: must be host[:port]"));
            }
        }
        if let Some(f) = &self.registry_auth
            && !f.is_file()
        {
            errs.push(format!("--registry-auth {}: no such file", f.display()));
        }
    }

    /// The credentials file's contents, or anonymous access without one.
    ///
    /// Errors: the file cannot be read or is not a docker config.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        Ok(match &self.registry_auth {
            Some(f) => Credentials::from_file(f)?,
            None => Credentials::anonymous(),
        })
    }

    /// A client for reads, with these settings.
    pub fn puller(&self) -> anyhow::Result<Puller> {
        Ok(Puller::new(
            PullConfig {
                insecure_registries: self.insecure_registries.clone(),
                ..Default::default()
            },
            self.credentials()?,
        ))
    }

    /// A client for writes (and reads), with these settings.
    pub fn pusher(&self) -> anyhow::Result<Pusher> {
        Ok(Pusher::new(
            self.insecure_registries.clone(),
            self.credentials()?,
        ))
    }
}

/// How to reach the Kubernetes API server.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// Kubeconfig (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
}

impl KubeArgs {
    pub fn check(&self, errs: &mut Vec<String>) {
        if let Some(f) = &self.kubeconfig
            && !f.is_file()
        {
            errs.push(format!("--kubeconfig {}: no such file", f.display()));
        }
    }

    /// A client of the cluster: `--kubeconfig`'s, else in-cluster, else the default
    /// kubeconfig.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        use anyhow::Context;
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
            }
            None => kube::Config::infer()
                .await
                .context("finding the cluster (in-cluster or kubeconfig)")?,
        };
        Ok(kube::Client::try_from(config)?)
    }
}

/// How a daemon logs.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log filter, e.g. `info` or `gkm=debug`.
    #[arg(long, env = "GKM_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines.
    #[arg(long, env = "GKM_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

impl LogArgs {
    pub fn check(&self, errs: &mut Vec<String>) {
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            errs.push(format!("--log {:?}: not a log filter", self.log));
        }
    }

    /// Starts logging to stderr.
    pub fn init(&self) -> Result<(), tracing_subscriber::filter::ParseError> {
        crate::init_logging(&self.log, self.log_json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Both {
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        kube: KubeArgs,
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn each_group_reports_every_bad_value() {
        let args = Both::try_parse_from([
            "x",
            "--insecure-registry=http://r.io",
            "--insecure-registry=r.io:5000,",
            "--registry-auth=/no/such/auth.json",
            "--kubeconfig=/no/such/kubeconfig",
            "--log=gkm=notalevel",
        ])
        .unwrap();
        let mut errs = Vec::new();
        args.registry.check(&mut errs);
        args.kube.check(&mut errs);
        args.log.check(&mut errs);
        let all = errs.join("\n");
        for words in [
            "--insecure-registry \"http://r.io\": must be host[:port]",
            "--insecure-registry \"\": must be host[:port]",
            "--registry-auth /no/such/auth.json: no such file",
            "--kubeconfig /no/such/kubeconfig: no such file",
            "--log \"gkm=notalevel\": not a log filter",
        ] {
            assert!(all.contains(words), "{words} missing from:\n{all}");
        }
        assert_eq!(errs.len(), 5, "{all}");
        let good = Both::try_parse_from(["x", "--insecure-registry=r.io:5000"]).unwrap();
        let mut errs = Vec::new();
        good.registry.check(&mut errs);
        good.kube.check(&mut errs);
        good.log.check(&mut errs);
        assert!(errs.is_empty(), "{errs:?}");
    }
}
