//! Per-cache pull credentials end to end, against registries that require credentials
//! (basic auth, and the bearer-token flow), a real API server, `gkm-controller` and
//! `gkm-agent` under the RBAC of `deploy/`:
//! - admission resolves and verifies a cache's image with its own `imagePullSecrets`, and
//!   denies, naming the Secret and the reason, when they are missing, of the wrong type,
//!   or absent (the registry's 401);
//! - the status controller records provenance with them;
//! - an agent with no registry credentials of its own pulls such a cache at publish, with
//!   credentials the controller hands it only while a pod on its node mounts the cache,
//!   and only the entry for the cache's registry;
//! - the endpoint refuses other identities, other nodes, tokens of another audience.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gkm::api::{
    ClusterGKMCache, ClusterGKMCacheSpec, GKMCache, GKMCacheSpec, PullSecretRef,
    RESOLVED_DIGEST_ANNOTATION,
};
use gkm::csi::pb::node_client::NodeClient;
use gkm::csi::pb::{self, volume_capability};
use gkm_testenv::auth_registry::{AuthMode, AuthRegistry, PASSWORD, USER, docker_config};
use gkm_testenv::process::{ServerProcess, free_port};
use gkm_testenv::tools::{self, Tool};
use gkm_testenv::{Cosign, shared_cluster, unique_name, workspace_root};
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Container, Namespace, Node, Pod, PodSpec, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

const LABEL: (&str, &str) = ("gkm-pull-secrets-test", "on");
const AGENT_NS: &str = "gkm-system";
const NODE: &str = "gpu-node-creds";
const OTHER_NODE: &str = "gpu-node-elsewhere";
const AUDIENCE: &str = "gkm.io/pull-credentials";
const GPUS: &str = "gpus:
  - uuid: GPU-h100
    productName: NVIDIA H100
    backend: cuda
    arch: \"90\"
";

fn gkm(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_gkm"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gkm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Builds, pushes and signs a one-kernel Triton cache into `reg`; returns
/// `(tag reference, digest)`.
fn push_signed(reg: &AuthRegistry, cosign: &Cosign, work: &Path, repo: &str) -> (String, String) {
    let src = gkm_testenv::fixtures::one_kernel_triton_cache(&work.join(repo)).unwrap();
    let image = format!("{}/{}:v1", reg.host(), unique_name(repo));
    let out = gkm(
        &[
            "build",
            path(&src),
            "--kind",
            "triton",
            "-t",
            &image,
            "--registry-auth",
            path(&reg.docker_config()),
            "--insecure-registry",
            reg.host(),
            "--sign-key",
            path(&cosign.key_path()),
        ],
        &[("COSIGN_PASSWORD", cosign.password())],
    );
    let pinned = out.lines().last().unwrap().to_string();
    let digest = pinned.rsplit_once('@').unwrap().1.to_string();
    (image, digest)
}

fn kubectl_apply(file: &str) {
    let out = Command::new(tools::locate(Tool::Kubectl).unwrap())
        .arg("--kubeconfig")
        .arg(shared_cluster().admin_kubeconfig())
        .args(["apply", "--server-side", "--field-manager=gkm-test", "-f"])
        .arg(workspace_root().join(file))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn docker_config_secret(ns: &str, name: &str, type_: &str, json: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(json.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

fn cache(ns: &str, name: &str, image: &str, secrets: &[&str]) -> GKMCache {
    let mut c = GKMCache::new(
        name,
        GKMCacheSpec {
            image: image.into(),
            image_pull_secrets: secrets
                .iter()
                .map(|s| PullSecretRef {
                    name: s.to_string(),
                })
                .collect(),
            ..Default::default()
        },
    );
    c.metadata.namespace = Some(ns.into());
    c
}

/// A pod bound to `node` that mounts `cache` of `ns` (no kubelet runs it: the API object
/// is what the controller checks).
fn cache_pod(ns: &str, name: &str, node: &str, attrs: &[(&str, &str)], sa: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: sa.map(str::to_string),
            containers: vec![Container {
                name: "main".into(),
                image: Some("registry.example/app:v1".into()),
                ..Default::default()
            }],
            volumes: (!attrs.is_empty()).then(|| {
                vec![Volume {
                    name: "kernels".into(),
                    csi: Some(CSIVolumeSource {
                        driver: "csi.gkm.io".into(),
                        volume_attributes: Some(
                            attrs
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect(),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A token of service account `ns/sa` for `audience`, bound to `pod` when given (then the
/// API server's TokenReview names the pod's node).
async fn token(ns: &str, sa: &str, audience: &str, pod: Option<&Pod>) -> String {
    let client = shared_cluster().admin_client().await.unwrap();
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client, ns)
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .expect("a token")
}

async fn wait_digest(api: &Api<GKMCache>, name: &str) -> GKMCache {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = api.get(name).await.unwrap();
        let promoted = c
            .status
            .as_ref()
            .is_some_and(|s| s.resolved_digest.is_some() && s.provenance.is_some());
        if promoted {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no promoted digest with provenance: {:?}",
            c.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn publish_req(target: &Path, ns: &str, cache: &str, pod: &str) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: unique_name("vol"),
        target_path: target.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeReaderOnly as i32,
            }),
        }),
        readonly: true,
        volume_context: HashMap::from([
            (gkm::csi::ATTR_CACHE.to_string(), cache.to_string()),
            (gkm::csi::ATTR_NAMESPACE.to_string(), ns.to_string()),
            (gkm::csi::CTX_POD_NAMESPACE.to_string(), ns.to_string()),
            (gkm::csi::CTX_POD_NAME.to_string(), pod.to_string()),
            (gkm::csi::CTX_POD_UID.to_string(), format!("uid-{pod}")),
        ]),
        ..Default::default()
    }
}

/// POSTs to the controller's /pull-credentials; returns the status and JSON body.
async fn ask(
    http: &reqwest::Client,
    port: u16,
    token: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut req = http
        .post(format!("https://127.0.0.1:{port}/pull-credentials"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caches_pull_with_their_own_secrets_and_only_nodes_running_their_pods_get_them() {
    let cluster = shared_cluster();
    let admin = cluster.admin_client().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let basic = AuthRegistry::start(AuthMode::Basic).await.unwrap();
    let bearer = AuthRegistry::start(AuthMode::Token).await.unwrap();
    let cosign = Cosign::generate().await.unwrap();
    let (basic_image, basic_digest) = push_signed(&basic, &cosign, work.path(), "creds/basic");
    let (token_image, token_digest) = push_signed(&bearer, &cosign, work.path(), "creds/token");

    // The deployed RBAC of both components; the controller runs as its service account.
    cluster.ensure_namespace(AGENT_NS).await.unwrap();
    kubectl_apply("deploy/controller/rbac.yaml");
    kubectl_apply("deploy/agent/rbac.yaml");
    let controller_kubeconfig = cluster
        .service_account_kubeconfig(AGENT_NS, "gkm-controller")
        .await
        .unwrap();
    let agent_kubeconfig = cluster
        .service_account_kubeconfig(AGENT_NS, "gkm-agent")
        .await
        .unwrap();

    // Namespaces: the tenant's, and the one the policy names for cluster caches' secrets.
    let team = cluster.new_namespace("creds-team").await.unwrap();
    let vault = cluster.new_namespace("creds-vault").await.unwrap();
    let labelled = Namespace {
        metadata: ObjectMeta {
            name: Some(team.clone()),
            labels: Some(BTreeMap::from([(LABEL.0.into(), LABEL.1.into())])),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(admin.clone())
        .patch(
            &team,
            &PatchParams::apply("gkm-test"),
            &Patch::Apply(&labelled),
        )
        .await
        .unwrap();

    // The controller: no registry credentials of its own.
    let ca = gkm_testenv::pki::Ca::new("pull-secrets-ca").unwrap();
    let serving = ca.server("gkm-webhook", &[]).unwrap();
    let cdir = work.path().join("controller");
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::write(cdir.join("tls.crt"), &serving.cert_pem).unwrap();
    std::fs::write(cdir.join("tls.key"), &serving.key_pem).unwrap();
    std::fs::write(cdir.join("ca.crt"), &ca.cert_pem).unwrap();
    let mut policy = gkm_testenv::controller::key_policy(
        &cosign.public_key_pem().unwrap(),
        &format!("{}/", basic.host()),
    );
    policy.push_str(&format!(
        "  - {}/\npullSecretNamespace: {vault}\n",
        bearer.host()
    ));
    std::fs::write(cdir.join("policy.yaml"), &policy).unwrap();
    let port = free_port().unwrap();
    let args = vec![
        format!("--listen=127.0.0.1:{port}"),
        "--metrics-addr=127.0.0.1:0".to_string(),
        format!("--tls-cert={}", cdir.join("tls.crt").display()),
        format!("--tls-key={}", cdir.join("tls.key").display()),
        format!("--policy={}", cdir.join("policy.yaml").display()),
        format!("--kubeconfig={}", controller_kubeconfig.display()),
        format!("--insecure-registry={}", basic.host()),
        format!("--insecure-registry={}", bearer.host()),
        "--log=gkm=debug,gkm_controller=debug".to_string(),
    ];
    let bin = gkm_testenv::workspace_binary("gkm-controller", "gkm-controller");
    let controller = ServerProcess::start("gkm-controller", &bin, &args, &[], &cdir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            controller.exited().is_none() && Instant::now() < deadline,
            "controller did not listen: {}",
            controller.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Named `gkm`, as deployed: the agent reads the controller's CA from it.
    gkm_testenv::webhooks::register(cluster, "gkm", port, &ca.cert_pem, LABEL)
        .await
        .unwrap();

    // Secrets: the right ones carry an entry for another registry too, which no node
    // may ever be handed.
    let secrets = Api::<Secret>::namespaced(admin.clone(), &team);
    let both = |host: &str| {
        docker_config(&[
            (host, USER, PASSWORD),
            ("other.registry.example", "someone", "elsewhere-password"),
        ])
    };
    let pp = PostParams::default();
    for s in [
        docker_config_secret(
            &team,
            "basic-creds",
            "kubernetes.io/dockerconfigjson",
            &both(basic.host()),
        ),
        docker_config_secret(
            &team,
            "token-creds",
            "kubernetes.io/dockerconfigjson",
            &both(bearer.host()),
        ),
        docker_config_secret(&team, "opaque", "Opaque", &both(basic.host())),
    ] {
        secrets.create(&pp, &s).await.unwrap();
    }
    Api::<Secret>::namespaced(admin.clone(), &vault)
        .create(
            &pp,
            &docker_config_secret(
                &vault,
                "shared-creds",
                "kubernetes.io/dockerconfigjson",
                &both(bearer.host()),
            ),
        )
        .await
        .unwrap();

    // Admission: denials name the Secret or the registry's answer.
    let caches = Api::<GKMCache>::namespaced(admin.clone(), &team);
    for (name, secrets, want) in [
        ("no-secret", vec![], "401"),
        (
            "missing",
            vec!["nope"],
            &*format!("pull secret {team}/nope does not exist"),
        ),
        ("opaque", vec!["opaque"], "has type \"Opaque\""),
        ("wrong-registry", vec!["token-creds"], "401"),
    ] {
        let err = caches
            .create(&pp, &cache(&team, name, &basic_image, &secrets))
            .await
            .expect_err(name);
        assert!(err.to_string().contains(want), "{name}: {err}");
    }
    // With their own secrets: admitted at the pushed digest, through both auth flows.
    for (name, image, secret, digest) in [
        ("basic", &basic_image, "basic-creds", &basic_digest),
        ("bearer", &token_image, "token-creds", &token_digest),
    ] {
        let c = caches
            .create(&pp, &cache(&team, name, image, &[secret]))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", controller.log_tail()));
        assert_eq!(
            c.metadata.annotations.unwrap()[RESOLVED_DIGEST_ANNOTATION],
            *digest,
            "{name}"
        );
        // The status controller verified it again for provenance, with the same secret.
        let c = wait_digest(&caches, name).await;
        assert_eq!(c.status.unwrap().provenance.unwrap().digest, *digest);
    }
    // A cluster cache's secrets come from the policy's namespace only.
    let cluster_caches = Api::<ClusterGKMCache>::all(admin.clone());
    let shared = unique_name("shared-creds");
    let mut cc = ClusterGKMCache::new(
        &shared,
        ClusterGKMCacheSpec {
            image: token_image.clone(),
            image_pull_secrets: vec![PullSecretRef {
                name: "shared-creds".into(),
            }],
            ..Default::default()
        },
    );
    let c = cluster_caches.create(&pp, &cc).await.unwrap();
    assert_eq!(
        c.metadata.annotations.unwrap()[RESOLVED_DIGEST_ANNOTATION],
        token_digest
    );
    cc.metadata.name = Some(unique_name("tenant-secret"));
    cc.spec.image_pull_secrets = vec![PullSecretRef {
        name: "token-creds".into(),
    }];
    let err = cluster_caches.create(&pp, &cc).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("pull secret {vault}/token-creds does not exist")),
        "a cluster cache read a tenant's secret: {err}"
    );

    // Nodes, and a pod of the agent on NODE whose bound token the agent presents.
    let nodes = Api::<Node>::all(admin.clone());
    for n in [NODE, OTHER_NODE] {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(n.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        nodes
            .patch(n, &PatchParams::apply("gkm-test"), &Patch::Apply(&node))
            .await
            .unwrap();
    }
    let agent_pods = Api::<Pod>::namespaced(admin.clone(), AGENT_NS);
    let agent_pod = agent_pods
        .create(
            &pp,
            &cache_pod(
                AGENT_NS,
                &unique_name("gkm-agent"),
                NODE,
                &[],
                Some("gkm-agent"),
            ),
        )
        .await
        .unwrap();
    let other_agent_pod = agent_pods
        .create(
            &pp,
            &cache_pod(
                AGENT_NS,
                &unique_name("gkm-agent"),
                OTHER_NODE,
                &[],
                Some("gkm-agent"),
            ),
        )
        .await
        .unwrap();
    let agent_token = token(AGENT_NS, "gkm-agent", AUDIENCE, Some(&agent_pod)).await;
    let adir = work.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    std::fs::write(adir.join("token"), &agent_token).unwrap();
    let agent = gkm_testenv::agent::AgentProcess::start(
        &adir,
        &gkm_testenv::agent::AgentOptions {
            binary: PathBuf::from(env!("CARGO_BIN_EXE_gkm-agent")),
            node: NODE.into(),
            kubeconfig: agent_kubeconfig.clone(),
            insecure_registries: vec![basic.host().into(), bearer.host().into()],
            gpus: GPUS.into(),
            extra: vec![
                format!("--controller-url=https://127.0.0.1:{port}"),
                format!("--credentials-token={}", adir.join("token").display()),
                "--pod-wait-millis=100".into(),
            ],
        },
    )
    .unwrap();
    let mut csi =
        match gkm::csi::server::connect_ready(agent.socket(), Duration::from_secs(30)).await {
            Ok(ch) => NodeClient::new(ch),
            Err(why) => panic!("agent not ready ({why}): {}", agent.log()),
        };

    // No pod on the node mounts the cache yet: the controller hands nothing out, and the
    // publish says why (kubelet retries it).
    let target = agent.target("uid-early", "kernels");
    let status = csi
        .node_publish_volume(publish_req(&target, &team, "basic", "early"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "no pod on node {NODE} mounts GKMCache {team}/basic"
        )),
        "{status:?}"
    );

    // A pod on this node mounts it: the publish pulls with the cache's own credentials.
    let pods = Api::<Pod>::namespaced(admin.clone(), &team);
    for (pod, cache_name) in [("basic-user", "basic"), ("bearer-user", "bearer")] {
        let attrs = [
            (gkm::csi::ATTR_CACHE, cache_name),
            (gkm::csi::ATTR_NAMESPACE, team.as_str()),
        ];
        pods.create(&pp, &cache_pod(&team, pod, NODE, &attrs, None))
            .await
            .unwrap();
        let target = agent.target(&format!("uid-{pod}"), "kernels");
        csi.node_publish_volume(publish_req(&target, &team, cache_name, pod))
            .await
            .unwrap_or_else(|e| panic!("{cache_name}: {e:?}\n{}", agent.log()));
        let files = walk(&target);
        assert!(
            files.iter().any(|f| f.ends_with(".json")),
            "{cache_name}: the cache's files are mounted: {files:?}"
        );
    }
    let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
    assert!(
        !log.contains(PASSWORD) && !log.contains("elsewhere-password"),
        "the agent logged a credential"
    );

    // The endpoint itself: what each caller gets.
    gkm::install_crypto();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let basic_req = serde_json::json!({"kind": "GKMCache", "namespace": team, "name": "basic"});
    let (status, body) = ask(&http, port, Some(&agent_token), basic_req.clone()).await;
    assert_eq!(status, 200, "{body}");
    let hosts: Vec<&String> = body["auths"].as_object().unwrap().keys().collect();
    assert_eq!(
        hosts,
        vec![basic.host()],
        "only the image's registry: {body}"
    );
    let other_node_token = token(AGENT_NS, "gkm-agent", AUDIENCE, Some(&other_agent_pod)).await;
    // (Creates the tenant's service account; no controller-manager makes `default` here.)
    cluster
        .service_account_token(&team, "tenant")
        .await
        .unwrap();
    let tenant_token = token(&team, "tenant", AUDIENCE, None).await;
    let api_audience_token = cluster
        .service_account_token(AGENT_NS, "gkm-agent")
        .await
        .unwrap();
    let unbound_token = token(AGENT_NS, "gkm-agent", AUDIENCE, None).await;
    for (who, tok, want_status, want_reason) in [
        ("no token", None, 401, "no_token"),
        (
            "the API server's audience",
            Some(api_audience_token.as_str()),
            401,
            "unauthenticated",
        ),
        (
            "a tenant's service account",
            Some(tenant_token.as_str()),
            403,
            "not_the_agent",
        ),
        (
            "a token bound to no pod",
            Some(unbound_token.as_str()),
            403,
            "no_node",
        ),
        (
            "the agent of another node",
            Some(other_node_token.as_str()),
            403,
            "not_entitled",
        ),
    ] {
        let (status, body) = ask(&http, port, tok, basic_req.clone()).await;
        assert_eq!(status, want_status, "{who}: {body}");
        assert_eq!(body["reason"], want_reason, "{who}: {body}");
        assert!(body.get("auths").is_none(), "{who} got credentials: {body}");
    }
    // A cache no pod of the node mounts: refused before the node learns whether it
    // exists. A name that is no Kubernetes name never reaches the API server.
    let (status, body) = ask(
        &http,
        port,
        Some(&agent_token),
        serde_json::json!({"kind": "GKMCache", "namespace": team, "name": "absent"}),
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("not_entitled")),
        "{body}"
    );
    let (status, body) = ask(
        &http,
        port,
        Some(&agent_token),
        serde_json::json!({"kind": "GKMCache", "namespace": team, "name": "a/../b"}),
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    // A tenant of another namespace names the same private digest with no credentials:
    // admitted from the verification memory, but the node that holds the tree pulled with
    // `basic`'s Secret serves it only to caches that can read it themselves.
    let thief = cluster.new_namespace("creds-thief").await.unwrap();
    let mut labelled_thief = labelled.clone();
    labelled_thief.metadata.name = Some(thief.clone());
    Api::<Namespace>::all(admin.clone())
        .patch(
            &thief,
            &PatchParams::apply("gkm-test"),
            &Patch::Apply(&labelled_thief),
        )
        .await
        .unwrap();
    let by_digest = format!("{}@{basic_digest}", basic_image.rsplit_once(':').unwrap().0);
    Api::<GKMCache>::namespaced(admin.clone(), &thief)
        .create(&pp, &cache(&thief, "copy", &by_digest, &[]))
        .await
        .unwrap();
    let attrs = [
        (gkm::csi::ATTR_CACHE, "copy"),
        (gkm::csi::ATTR_NAMESPACE, thief.as_str()),
    ];
    Api::<Pod>::namespaced(admin.clone(), &thief)
        .create(&pp, &cache_pod(&thief, "copier", NODE, &attrs, None))
        .await
        .unwrap();
    let target = agent.target("uid-copier", "kernels");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        // Until the agent's watch has the new cache, the publish says it does not know it.
        match csi
            .node_publish_volume(publish_req(&target, &thief, "copy", "copier"))
            .await
        {
            Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => break s,
            Ok(_) => panic!("a cache without credentials mounted a privately pulled tree"),
        }
    };
    assert!(
        status.message().contains("401"),
        "the refusal names the registry's answer: {status:?}"
    );

    // Once the pod is leaving (no kubelet here confirms it: it stays, terminating), the
    // node is no longer entitled; nor by a mirror pod, which a node makes itself.
    pods.delete("basic-user", &Default::default())
        .await
        .unwrap();
    let mirror = Pod {
        metadata: ObjectMeta {
            name: Some("static-basic".into()),
            namespace: Some(team.clone()),
            annotations: Some(BTreeMap::from([(
                "kubernetes.io/config.mirror".to_string(),
                "0123".to_string(),
            )])),
            ..Default::default()
        },
        ..cache_pod(
            &team,
            "static-basic",
            NODE,
            &[
                (gkm::csi::ATTR_CACHE, "basic"),
                (gkm::csi::ATTR_NAMESPACE, team.as_str()),
            ],
            None,
        )
    };
    pods.create(&pp, &mirror).await.unwrap();
    let (status, body) = ask(&http, port, Some(&agent_token), basic_req.clone()).await;
    assert_eq!(
        status, 403,
        "served with a terminating and a mirror pod: {body}"
    );
    assert_eq!(body["reason"], "not_entitled");
    drop(agent);
}

/// Every file below `dir`, as paths relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}
