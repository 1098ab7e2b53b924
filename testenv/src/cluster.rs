//! A real Kubernetes control plane: etcd plus kube-apiserver, with GKM's CRDs installed.
//!
//! There is no controller-manager, scheduler or kubelet: namespaces never finish deleting
//! (use [`unique_name`](crate::unique_name)), pods stay Pending unless a test sets
//! `spec.nodeName`, and Node objects are created by the tests that need them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::pki::{self, Ca, CertPair};
use crate::process::{self, ServerProcess};
use crate::tools::{self, Tool};
use crate::{Error, run_detached};

/// Users with static tokens, known to the apiserver from its token file. None of them has
/// any RBAC grant unless a test gives it one.
pub const STATIC_USERS: &[&str] = &["alice", "bob"];

/// Where a cluster's ports come from: free ones by default, or fixed ones.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    pub etcd_client_port: Option<u16>,
    pub etcd_peer_port: Option<u16>,
    pub apiserver_port: Option<u16>,
    /// Install GKM's CRDs from `deploy/crds/` (default true via [`Cluster::start`]).
    pub skip_crds: bool,
}

/// A running etcd + kube-apiserver pair. Dropping it stops both and removes their data.
pub struct Cluster {
    dir: PathBuf,
    url: String,
    ca_pem: String,
    admin: CertPair,
    // Field order is drop order: the apiserver goes before its etcd.
    apiserver: ServerProcess,
    etcd: ServerProcess,
}

impl Cluster {
    /// Starts a cluster on free ports and installs GKM's CRDs.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(opts: ClusterOptions) -> Result<Self, Error> {
        let apiserver_bin = tools::locate(Tool::KubeApiserver)?;
        let etcd_bin = tools::locate(Tool::Etcd)?;

        let etcd_client = pick_port(opts.etcd_client_port, "etcd client")?;
        let etcd_peer = pick_port(opts.etcd_peer_port, "etcd peer")?;
        let api_port = pick_port(opts.apiserver_port, "kube-apiserver secure port")?;

        let dir = process::work_dir("cluster")?;
        let etcd = start_etcd(&etcd_bin, &dir, etcd_client, etcd_peer).await?;

        let ca = Ca::new("gkm-testenv-ca")?;
        let serving = ca.server(
            "kube-apiserver",
            &["kubernetes", "kubernetes.default", "kubernetes.default.svc"],
        )?;
        let admin = ca.client("gkm-testenv-admin", Some("system:masters"))?;
        let (sa_key, sa_pub) = pki::signing_key_pem()?;
        let files = [
            ("ca.crt", ca.cert_pem.clone()),
            ("apiserver.crt", serving.cert_pem),
            ("apiserver.key", serving.key_pem),
            ("sa.key", sa_key),
            ("sa.pub", sa_pub),
            ("tokens.csv", token_file()),
        ];
        for (name, content) in &files {
            write_private(&dir.join(name), content)?;
        }

        let args = apiserver_args(&dir, api_port, etcd_client);
        let apiserver = ServerProcess::start("kube-apiserver", &apiserver_bin, &args, &[], &dir)?;
        let url = format!("https://127.0.0.1:{api_port}");
        let cluster = Self {
            dir,
            url,
            ca_pem: ca.cert_pem,
            admin,
            apiserver,
            etcd,
        };
        cluster.wait_apiserver(api_port).await?;
        cluster.write_kubeconfig("admin", &cluster.admin_auth())?;
        if !opts.skip_crds {
            cluster.install_crds().await?;
        }
        Ok(cluster)
    }

    async fn wait_apiserver(&self, port: u16) -> Result<(), Error> {
        let http = self.admin_http()?;
        let url = format!("{}/readyz", self.url);
        let ports = [(port, "secure port")];
        self.apiserver
            .wait_ready("/readyz", &ports, Duration::from_secs(90), || {
                let req = http.get(&url);
                async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
            })
            .await
    }

    /// The apiserver's URL (`https://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The cluster CA, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// This cluster's work directory (PKI, logs, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn apiserver(&self) -> &ServerProcess {
        &self.apiserver
    }

    pub fn etcd(&self) -> &ServerProcess {
        &self.etcd
    }

    /// Path of the admin kubeconfig (for kubectl).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// An HTTP client that presents the admin certificate (for raw API calls).
    pub fn admin_http(&self) -> Result<reqwest::Client, Error> {
        let identity = reqwest::Identity::from_pem(
            format!("{}{}", self.admin.cert_pem, self.admin.key_pem).as_bytes(),
        )
        .map_err(|e| Error::Other(format!("admin identity: {e}")))?;
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())
            .map_err(|e| Error::Other(format!("cluster CA: {e}")))?;
        crate::http_builder()
            .tls_certs_only([ca])
            .identity(identity)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Other(format!("admin HTTP client: {e}")))
    }

    /// A client with cluster-admin rights (a client certificate in `system:masters`).
    pub async fn admin_client(&self) -> Result<Client, Error> {
        self.client_from(&self.admin_kubeconfig()).await
    }

    /// A client for one of [`STATIC_USERS`], authenticated by its static token.
    pub async fn user_client(&self, user: &str) -> Result<Client, Error> {
        if !STATIC_USERS.contains(&user) {
            return Err(Error::Other(format!(
                "{user} is not a static user ({STATIC_USERS:?})"
            )));
        }
        let path = self.write_kubeconfig(user, &token_auth(&static_token(user)))?;
        self.client_from(&path).await
    }

    /// A client for service account `namespace/name`, created if missing, with a token
    /// issued by the apiserver's TokenRequest API: the identity a pod of that account has.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Client, Error> {
        let token = self.service_account_token(namespace, name).await?;
        let path = self.write_kubeconfig(&format!("sa-{namespace}-{name}"), &token_auth(&token))?;
        self.client_from(&path).await
    }

    /// A kubeconfig for service account `namespace/name` (created if missing), for a
    /// process that should run as that identity.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PathBuf, Error> {
        let token = self.service_account_token(namespace, name).await?;
        self.write_kubeconfig(&format!("sa-{namespace}-{name}"), &token_auth(&token))
    }

    /// A fresh token for service account `namespace/name` (created if missing).
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<String, Error> {
        let admin = self.admin_client().await?;
        self.ensure_namespace(namespace).await?;
        let sas: Api<ServiceAccount> = Api::namespaced(admin, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        sas.patch(name, &PatchParams::apply("gkm-testenv"), &Patch::Apply(&sa))
            .await
            .map_err(|e| Error::kube(format!("applying service account {namespace}/{name}"), e))?;
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let issued = sas
            .create_token_request(name, &PostParams::default(), &req)
            .await
            .map_err(|e| Error::kube(format!("requesting a token for {namespace}/{name}"), e))?;
        issued.status.and_then(|s| s.token).ok_or_else(|| {
            Error::Other(format!(
                "token request for {namespace}/{name} returned no token"
            ))
        })
    }

    /// Creates namespace `name` if it does not exist.
    pub async fn ensure_namespace(&self, name: &str) -> Result<(), Error> {
        let api: Api<Namespace> = Api::all(self.admin_client().await?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.patch(name, &PatchParams::apply("gkm-testenv"), &Patch::Apply(&ns))
            .await
            .map_err(|e| Error::kube(format!("applying namespace {name}"), e))?;
        Ok(())
    }

    /// The Events (`events.k8s.io/v1`) in `namespace` about the object named `name`, as
    /// `(reason, note)` pairs.
    pub async fn events_about(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<(String, String)>, Error> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.admin_client().await?, namespace);
        Ok(api
            .list(&Default::default())
            .await
            .map_err(|e| Error::kube(format!("listing Events in {namespace}"), e))?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect())
    }

    /// A new namespace with a unique name starting with `prefix`.
    pub async fn new_namespace(&self, prefix: &str) -> Result<String, Error> {
        let name = crate::unique_name(prefix);
        self.ensure_namespace(&name).await?;
        Ok(name)
    }

    /// Server-side applies every CRD under `deploy/crds/` and waits until each is
    /// Established.
    pub async fn install_crds(&self) -> Result<(), Error> {
        let dir = crate::workspace_root().join("deploy/crds");
        let client = self.admin_client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let mut names = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        entries.sort();
        for path in entries {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let crd: CustomResourceDefinition = serde_norway::from_str(&text)
                .map_err(|e| Error::Other(format!("{} is not a CRD: {e}", path.display())))?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply("gkm-testenv").force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|e| Error::kube(format!("applying CRD {name}"), e))?;
            names.push(name);
        }
        for name in names {
            let cond = kube::runtime::conditions::is_crd_established();
            tokio::time::timeout(
                Duration::from_secs(30),
                kube::runtime::wait::await_condition(api.clone(), &name, cond),
            )
            .await
            .map_err(|_| Error::Other(format!("CRD {name} not Established after 30s")))?
            .map_err(|e| Error::Other(format!("waiting for CRD {name}: {e}")))?;
        }
        Ok(())
    }

    async fn client_from(&self, kubeconfig: &Path) -> Result<Client, Error> {
        let kc = Kubeconfig::read_from(kubeconfig)
            .map_err(|e| Error::Other(format!("reading {}: {e}", kubeconfig.display())))?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Other(format!("loading {}: {e}", kubeconfig.display())))?;
        Client::try_from(config).map_err(|e| Error::kube("building a client", e))
    }

    fn admin_auth(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("client-certificate-data", b64(&self.admin.cert_pem)),
            ("client-key-data", b64(&self.admin.key_pem)),
        ])
    }

    /// Writes `<dir>/<identity>.kubeconfig` and returns its path.
    pub fn write_kubeconfig(
        &self,
        identity: &str,
        auth: &BTreeMap<&'static str, String>,
    ) -> Result<PathBuf, Error> {
        let user: serde_json::Map<String, serde_json::Value> = auth
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone().into()))
            .collect();
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "gkm-testenv", "cluster": {
                "server": self.url,
                "certificate-authority-data": b64(&self.ca_pem),
            }}],
            "users": [{"name": identity, "user": user}],
            "contexts": [{"name": identity, "context": {"cluster": "gkm-testenv", "user": identity}}],
            "current-context": identity,
        });
        let path = self.dir.join(format!("{identity}.kubeconfig"));
        let yaml =
            serde_norway::to_string(&doc).map_err(|e| Error::Other(format!("kubeconfig: {e}")))?;
        write_private(&path, &yaml)?;
        Ok(path)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.apiserver.stop();
        self.etcd.stop();
        process::remove_work_dir(&self.dir);
    }
}

/// The cluster shared by every test of this test binary, started on first use.
///
/// Panics with the start error, so every test that needs it fails with the reason.
pub fn shared_cluster() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        run_detached(|| Box::pin(async { Cluster::start().await.map_err(|e| e.to_string()) }))
    });
    match started {
        Ok(c) => c,
        Err(e) => panic!("the shared test cluster did not start: {e}"),
    }
}

fn pick_port(fixed: Option<u16>, what: &str) -> Result<u16, Error> {
    match fixed {
        Some(p) => process::ensure_port_free(p, what).map(|_| p),
        None => process::free_port(),
    }
}

async fn start_etcd(
    bin: &Path,
    dir: &Path,
    client: u16,
    peer: u16,
) -> Result<ServerProcess, Error> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let args: Vec<String> = vec![
        "--name=default".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=default={peer_url}"),
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ];
    let etcd = ServerProcess::start("etcd", bin, &args, &[], dir)?;
    let http = crate::http_builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;
    let health = format!("{client_url}/health");
    let ports = [(client, "client port"), (peer, "peer port")];
    etcd.wait_ready("/health", &ports, Duration::from_secs(30), || {
        let req = http.get(&health);
        async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
    })
    .await?;
    Ok(etcd)
}

fn apiserver_args(dir: &Path, port: u16, etcd_client: u16) -> Vec<String> {
    let f = |name: &str| dir.join(name).display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
        "--bind-address=127.0.0.1".into(),
        // Without it the apiserver exits on a host with no default route.
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", f("certs")),
        format!("--tls-cert-file={}", f("apiserver.crt")),
        format!("--tls-private-key-file={}", f("apiserver.key")),
        format!("--client-ca-file={}", f("ca.crt")),
        format!("--token-auth-file={}", f("tokens.csv")),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        format!("--service-account-key-file={}", f("sa.pub")),
        format!("--service-account-signing-key-file={}", f("sa.key")),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        "--authorization-mode=Node,RBAC".into(),
        // No controller-manager runs to create service-account tokens for pods.
        "--disable-admission-plugins=ServiceAccount".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

fn static_token(user: &str) -> String {
    format!("gkm-testenv-token-{user}")
}

fn token_file() -> String {
    STATIC_USERS
        .iter()
        .map(|u| format!("{},{u},uid-{u}\n", static_token(u)))
        .collect()
}

fn token_auth(token: &str) -> BTreeMap<&'static str, String> {
    BTreeMap::from([("token", token.to_string())])
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn write_private(path: &Path, content: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    f.write_all(content.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}
