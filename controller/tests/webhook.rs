//! The admission webhook and status controller behind a real kube-apiserver (webhook
//! configurations with `clientConfig.url` and `caBundle`), a real registry, and images
//! signed with real cosign; requests made through `kube` clients of different identities.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gkm_api::{GKMCache, RESOLVED_DIGEST_ANNOTATION};
use gkm_testenv::image::{PushedImage, Target};
use gkm_testenv::pki::Ca;
use gkm_testenv::process::ServerProcess;
use gkm_testenv::{Cluster, Cosign, Registry, shared_cluster, shared_registry, unique_name};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// What every test shares: signing key, webhook address, the CA the apiserver trusts it by.
struct Env {
    cosign: Cosign,
    ca: Ca,
    dir: tempfile::TempDir,
    repo_prefix: String,
    /// The incoming registry of the policy's `promotion` (with the OCI referrers API).
    incoming: Registry,
    /// The promoter's own key (`promotion.signKey`).
    promoter: Cosign,
}

const SELECTOR: &str = "gkm-webhook-test";
/// The prefix of the namespaces the shared policy's podPolicy covers.
const POD_NS: &str = "wh-pods";
const TRUSTED_SA: (&str, &str) = ("gkm-system", "promoter");

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let cosign = rt.block_on(Cosign::generate()).unwrap();
            let ca = Ca::new("webhook-test-ca").unwrap();
            let dir = tempfile::tempdir().unwrap();
            let repo_prefix = format!("{}/trusted", shared_registry().host());
            let incoming = rt.block_on(Registry::start_with_referrers()).unwrap();
            let promoter = rt.block_on(Cosign::generate()).unwrap();
            Env {
                cosign,
                ca,
                dir,
                repo_prefix,
                incoming,
                promoter,
            }
        })
        .join()
        .unwrap()
    })
}

fn policy(env: &Env) -> String {
    let pem = env.cosign.public_key_pem().unwrap();
    let indented: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "authorities:\n  - name: test-key\n    key: |\n{indented}trustedRegistries:\n  - {}\nverification:\n  timeoutSeconds: 8\npodPolicy:\n  namespaces: [\"{POD_NS}-*\"]\n  verifySignatures: true\npromotion:\n  incoming: {}/dev\n  trusted: {}/promoted\n  signKey: {}\n",
        env.repo_prefix,
        env.incoming.host(),
        env.repo_prefix,
        env.promoter.key_path().display(),
    )
}

/// Starts a gkm-controller process serving admission on `port` (a free one when None),
/// with the status controller too unless `webhook_only`, under [`policy`] changed by
/// `edit`. It dies with the test process. Returns it, its admission port and its metrics
/// port.
fn start_controller(
    env: &Env,
    tag: &str,
    port: Option<u16>,
    webhook_only: bool,
    edit: fn(String) -> String,
) -> (ServerProcess, u16, u16) {
    start_controller_with(env, tag, port, webhook_only, edit, &[])
}

/// [`start_controller`], with a policy edit that may capture, and `extra` arguments.
fn start_controller_with(
    env: &Env,
    tag: &str,
    port: Option<u16>,
    webhook_only: bool,
    edit: impl FnOnce(String) -> String,
    extra: &[String],
) -> (ServerProcess, u16, u16) {
    let port = port.unwrap_or_else(|| gkm_testenv::process::free_port().unwrap());
    let metrics_port = gkm_testenv::process::free_port().unwrap();
    let d = env.dir.path().join(tag);
    if !d.join("tls.crt").exists() {
        let serving = env.ca.server("gkm-webhook", &[]).unwrap();
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("tls.crt"), &serving.cert_pem).unwrap();
        std::fs::write(d.join("tls.key"), &serving.key_pem).unwrap();
        std::fs::write(d.join("policy.yaml"), edit(policy(env))).unwrap();
    }
    let mut args = vec![
        format!("--listen=127.0.0.1:{port}"),
        format!("--metrics-addr=127.0.0.1:{metrics_port}"),
        format!("--tls-cert={}", d.join("tls.crt").display()),
        format!("--tls-key={}", d.join("tls.key").display()),
        format!("--policy={}", d.join("policy.yaml").display()),
        format!(
            "--trusted-user=system:serviceaccount:{}:{}",
            TRUSTED_SA.0, TRUSTED_SA.1
        ),
        format!("--insecure-registry={}", shared_registry().host()),
        format!("--insecure-registry={}", env.incoming.host()),
        format!(
            "--kubeconfig={}",
            shared_cluster().admin_kubeconfig().display()
        ),
        "--log=gkm=debug,gkm_controller=debug".to_string(),
    ];
    if webhook_only {
        args.push("--webhook-only".into());
    }
    args.extend_from_slice(extra);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gkm-controller"));
    let envs = [("COSIGN_PASSWORD", env.promoter.password())];
    let process = ServerProcess::start("gkm-controller", &bin, &args, &envs, &d).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            process.exited().is_none() && Instant::now() < deadline,
            "controller did not listen: {}",
            process.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (process, port, metrics_port)
}

/// Registers the webhooks for namespaces labelled `gkm-webhook-test=<value>`.
async fn register(cluster: &Cluster, env: &Env, value: &str, port: u16) {
    let name = format!("gkm-test-{value}");
    gkm_testenv::webhooks::register(cluster, &name, port, &env.ca.cert_pem, (SELECTOR, value))
        .await
        .unwrap();
}

/// A namespace the webhooks of `value` apply to, where alice and the trusted service
/// account may write caches (not status).
async fn namespace(cluster: &Cluster, value: &str) -> String {
    let sa_user = format!("system:serviceaccount:{}:{}", TRUSTED_SA.0, TRUSTED_SA.1);
    gkm_testenv::webhooks::editor_namespace(
        cluster,
        "wh",
        &[(SELECTOR, value)],
        &["alice", &sa_user],
    )
    .await
    .unwrap()
}

/// The shared webhook (started once per test binary): its admission port.
fn main_webhook() -> u16 {
    main_controller().1
}

/// The shared controller: its process, admission port and metrics port.
fn main_controller() -> &'static (ServerProcess, u16, u16) {
    static MAIN: OnceLock<(ServerProcess, u16, u16)> = OnceLock::new();
    MAIN.get_or_init(|| {
        // Kept for the whole test binary; it dies with the test process.
        let (process, port, metrics) = start_controller(env(), "main", None, false, |p| p);
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(register(
                shared_cluster(),
                env(),
                "main",
                port,
            ))
        })
        .join()
        .unwrap();
        (process, port, metrics)
    })
}

async fn push(repo: &str, tag: &str, seed: &str) -> PushedImage {
    push_to(shared_registry(), repo, tag, seed).await
}

fn cache(name: &str, image: &str, annotation: Option<&str>) -> GKMCache {
    let mut c = GKMCache::new(name, Default::default());
    c.spec.image = image.into();
    c.metadata.annotations =
        annotation.map(|d| [(RESOLVED_DIGEST_ANNOTATION.to_string(), d.to_string())].into());
    c
}

fn annotation(c: &GKMCache) -> Option<String> {
    c.metadata
        .annotations
        .as_ref()?
        .get(RESOLVED_DIGEST_ANNOTATION)
        .cloned()
}

/// Creates, retrying while the apiserver has not picked up a new webhook configuration.
async fn create(api: &Api<GKMCache>, c: &GKMCache) -> Result<GKMCache, kube::Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match api.create(&PostParams::default(), c).await {
            Err(kube::Error::Api(e))
                if e.message.contains("no endpoints") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            r => return r,
        }
    }
}

#[tokio::test]
async fn a_signed_image_by_tag_is_pinned_verified_and_promoted() {
    main_webhook();
    let cluster = shared_cluster();
    let ns = namespace(cluster, "main").await;
    let repo = format!("trusted/{}", unique_name("signed"));
    let img = push(&repo, "v1", "one").await;
    env().cosign.sign(&img.by_digest()).await.unwrap();

    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    // Alice tries to smuggle in a digest of her own: the webhook overwrites it.
    let forged = "sha256:".to_string() + &"0".repeat(64);
    let created = create(&alice, &cache("llama", &img.by_tag(), Some(&forged)))
        .await
        .unwrap();
    assert_eq!(
        annotation(&created).as_deref(),
        Some(img.digest.as_str()),
        "the digest the registry serves for the tag"
    );

    // The controller promotes it to status, with its provenance. Provenance may come a
    // retry later than the digest (30 s, when the controller's own verification could not
    // answer in time: other tests load the shared registry and controller).
    let admin: Api<GKMCache> = Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    let deadline = Instant::now() + Duration::from_secs(75);
    let status = loop {
        let c = admin.get("llama").await.unwrap();
        if let Some(s) = c
            .status
            .filter(|s| s.resolved_digest.is_some() && s.provenance.is_some())
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "status not promoted with provenance"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.resolved_digest.as_deref(), Some(img.digest.as_str()));
    assert!(status.last_updated.is_some());
    let verified = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Verified")
        .unwrap();
    assert_eq!(verified.status, "True");
    // Who vouched for it: the controller's own verification, recorded in status.
    let p = status.provenance.as_ref().expect("status.provenance");
    assert_eq!(
        (
            p.digest.as_str(),
            p.authority.as_str(),
            p.signature_format.as_str()
        ),
        (img.digest.as_str(), "test-key", "tag")
    );
    assert!(
        p.key_fingerprint
            .as_deref()
            .is_some_and(|f| f.starts_with("sha256:") && f.len() == 71),
        "{p:?}"
    );
    assert!(!p.attestation_required && p.attestations.is_empty());

    // Moving the tag afterwards does not change the cache's digest.
    let moved = push(&repo, "v1", "two").await;
    env().cosign.sign(&moved.by_digest()).await.unwrap();
    // (Retried on 409: the status controller may write status in between.)
    let updated = loop {
        let mut c = alice.get("llama").await.unwrap();
        c.metadata.labels = Some([("touched".to_string(), "yes".to_string())].into());
        match alice.replace("llama", &PostParams::default(), &c).await {
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            r => break r.unwrap(),
        }
    };
    assert_eq!(annotation(&updated).as_deref(), Some(img.digest.as_str()));
}

#[tokio::test]
async fn bad_images_are_denied_with_a_clear_message_and_nothing_is_stored() {
    main_webhook();
    let cluster = shared_cluster();
    let ns = namespace(cluster, "main").await;
    let unsigned = push(&format!("trusted/{}", unique_name("unsigned")), "v1", "u").await;
    let other_key = push(&format!("trusted/{}", unique_name("otherkey")), "v1", "o").await;
    Cosign::generate()
        .await
        .unwrap()
        .sign(&other_key.by_digest())
        .await
        .unwrap();
    let untrusted = push(&unique_name("elsewhere/signed"), "v1", "e").await;
    env().cosign.sign(&untrusted.by_digest()).await.unwrap();

    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    for (name, image, words) in [
        (
            "unsigned",
            unsigned.by_tag(),
            vec![unsigned.repository.clone()],
        ),
        (
            "other-key",
            other_key.by_tag(),
            vec![other_key.repository.clone()],
        ),
        (
            "untrusted",
            untrusted.by_tag(),
            vec![untrusted.repository.clone(), "trusted registry".into()],
        ),
        (
            "unparsable",
            "Not A Reference!!".to_string(),
            vec!["not a valid image reference".into()],
        ),
    ] {
        let err = create(&alice, &cache(name, &image, None))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("denied the request"), "{name}: {msg}");
        for w in words {
            assert!(msg.contains(&w), "{name}: {msg} should name {w}");
        }
        assert!(
            alice.get_opt(name).await.unwrap().is_none(),
            "{name} was stored"
        );
    }
}

#[tokio::test]
async fn only_the_trusted_service_account_may_touch_the_annotation_or_anyone_the_status() {
    main_webhook();
    let cluster = shared_cluster();
    let ns = namespace(cluster, "main").await;
    let img = push(&format!("trusted/{}", unique_name("guarded")), "v1", "g").await;
    env().cosign.sign(&img.by_digest()).await.unwrap();
    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    create(&alice, &cache("guarded", &img.by_tag(), None))
        .await
        .unwrap();

    let other = "sha256:".to_string() + &"f".repeat(64);
    let key = RESOLVED_DIGEST_ANNOTATION;
    // Change and remove by merge patch; change by update.
    for patch in [
        serde_json::json!({"metadata": {"annotations": {key: other}}}),
        serde_json::json!({"metadata": {"annotations": {key: null}}}),
    ] {
        let err = alice
            .patch("guarded", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("may not be added, changed or removed"),
            "{err}"
        );
    }
    // The status controller writes status concurrently, which moves the resourceVersion:
    // a 409 only means "read again".
    let err = loop {
        let mut c = alice.get("guarded").await.unwrap();
        c.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(key.to_string(), other.clone());
        match alice.replace("guarded", &PostParams::default(), &c).await {
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            r => break r.unwrap_err(),
        }
    };
    assert!(
        err.to_string()
            .contains("may not be added, changed or removed"),
        "{err}"
    );
    // Status is not alice's to write (RBAC on the subresource).
    let status = serde_json::json!({"status": {"resolvedDigest": other}});
    let err = alice
        .patch_status("guarded", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 403),
        "{err}"
    );
    assert_eq!(
        annotation(&alice.get("guarded").await.unwrap()).as_deref(),
        Some(img.digest.as_str())
    );

    // The trusted service account may.
    let promoter: Api<GKMCache> = Api::namespaced(
        cluster
            .service_account_client(TRUSTED_SA.0, TRUSTED_SA.1)
            .await
            .unwrap(),
        &ns,
    );
    let patch = serde_json::json!({"metadata": {"annotations": {key: other}}});
    let done = promoter
        .patch("guarded", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(annotation(&done).as_deref(), Some(other.as_str()));
}

#[tokio::test]
async fn with_the_webhook_down_creates_fail_and_recover_when_it_returns() {
    let cluster = shared_cluster();
    let env = env();
    let (controller, port, _) = start_controller(env, "down", None, true, |p| p);
    register(cluster, env, "down", port).await;
    let ns = namespace(cluster, "down").await;
    let img = push(&format!("trusted/{}", unique_name("downtest")), "v1", "d").await;
    env.cosign.sign(&img.by_digest()).await.unwrap();
    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    create(&alice, &cache("before", &img.by_tag(), None))
        .await
        .unwrap();

    controller.stop();
    let err = alice
        .create(
            &PostParams::default(),
            &cache("during", &img.by_tag(), None),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("failed calling webhook"),
        "fails closed: {err}"
    );
    assert!(alice.get_opt("during").await.unwrap().is_none());

    // Back on the same port: creates work again.
    let (_again, _, _) = start_controller(env, "down", Some(port), true, |p| p);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match alice
            .create(&PostParams::default(), &cache("after", &img.by_tag(), None))
            .await
        {
            Ok(c) => {
                assert_eq!(annotation(&c).as_deref(), Some(img.digest.as_str()));
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test]
async fn self_minted_certificates_are_trusted_through_the_ca_bundle_they_write() {
    let cluster = shared_cluster();
    let env = env();
    let port = gkm_testenv::process::free_port().unwrap();
    // Registered with the test CA: the controller must replace it with its own.
    register(cluster, env, "selfsigned", port).await;
    let d = env.dir.path().join("selfsigned");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("policy.yaml"), policy(env)).unwrap();
    let args = vec![
        format!("--listen=127.0.0.1:{port}"),
        "--metrics-addr=127.0.0.1:0".to_string(),
        "--self-signed-certs".to_string(),
        "--cert-host=127.0.0.1".to_string(),
        "--webhook-config=gkm-test-selfsigned".to_string(),
        format!("--tls-cert={}", d.join("tls/tls.crt").display()),
        format!("--tls-key={}", d.join("tls/tls.key").display()),
        format!("--policy={}", d.join("policy.yaml").display()),
        format!("--insecure-registry={}", shared_registry().host()),
        format!("--insecure-registry={}", env.incoming.host()),
        format!("--kubeconfig={}", cluster.admin_kubeconfig().display()),
        "--webhook-only".to_string(),
    ];
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gkm-controller"));
    let _controller = ServerProcess::start("gkm-controller", &bin, &args, &[], &d).unwrap();

    let ns = namespace(cluster, "selfsigned").await;
    let img = push(&format!("trusted/{}", unique_name("selfsigned")), "v1", "s").await;
    env.cosign.sign(&img.by_digest()).await.unwrap();
    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match alice
            .create(
                &PostParams::default(),
                &cache("minted", &img.by_tag(), None),
            )
            .await
        {
            Ok(c) => {
                assert_eq!(annotation(&c).as_deref(), Some(img.digest.as_str()));
                break;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "never trusted: {e}\n{}",
                    _controller.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let m = Api::<MutatingWebhookConfiguration>::all(cluster.admin_client().await.unwrap())
        .get("gkm-test-selfsigned")
        .await
        .unwrap();
    let bundle = m.webhooks.unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .unwrap();
    assert_ne!(
        bundle.0,
        env.ca.cert_pem.as_bytes(),
        "the caBundle is the controller's own CA"
    );
}

fn pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": image}]},
    }))
    .unwrap()
}

fn denial(r: Result<Pod, kube::Error>) -> String {
    match r {
        Err(kube::Error::Api(e)) if e.code == 400 || e.code == 403 => e.message,
        other => panic!("expected a denial, got {other:?}"),
    }
}

/// Registers the Pod policy's webhooks (`gkm-test-pods-<value>`) of the controller at
/// `port` for namespaces labelled `gkm-webhook-test=<value>`, and creates one such
/// namespace, which the policy covers.
async fn pod_policy_namespace(port: u16, value: &str) -> String {
    let cluster = shared_cluster();
    let (name, label) = (format!("gkm-test-pods-{value}"), (SELECTOR, value));
    gkm_testenv::webhooks::register_pod_policy(cluster, &name, port, &env().ca.cert_pem, label)
        .await
        .unwrap();
    gkm_testenv::webhooks::editor_namespace(cluster, POD_NS, &[label], &[])
        .await
        .unwrap()
}

/// Creates pods of `image` until one is denied (the API server picks a new webhook
/// configuration up shortly after it is written); the denied pod's name and the message.
async fn first_denial(pods: &Api<Pod>, image: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let name = format!("probe{attempt}");
        match pods
            .create(&PostParams::default(), &pod(&name, image))
            .await
        {
            Ok(_) => {
                pods.delete(&name, &Default::default()).await.unwrap();
                assert!(Instant::now() < deadline, "the pod webhook never answered");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return (name, denial(r)),
        }
    }
}

#[tokio::test]
async fn pod_policy_namespaces_run_only_signed_trusted_images_pinned_by_digest() {
    let port = main_webhook();
    let cluster = shared_cluster();
    let covered = pod_policy_namespace(port, "pods").await;
    let labels = [(SELECTOR, "pods")];
    let free = gkm_testenv::webhooks::editor_namespace(cluster, "wh-free", &labels, &[])
        .await
        .unwrap();
    let admin = cluster.admin_client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &covered);

    let untrusted = format!("docker.io/library/busybox@sha256:{}", "a".repeat(64));
    let (probe, message) = first_denial(&pods, &untrusted).await;
    assert!(
        message.contains(&format!("Pod {covered}/{probe}"))
            && message.contains(&format!(
                "image \"{untrusted}\" is not from a trusted registry (trusted: {})",
                env().repo_prefix
            )),
        "{message}"
    );

    let signed = push(&format!("trusted/{}", unique_name("podimg")), "v1", "p").await;
    env().cosign.sign(&signed.by_digest()).await.unwrap();
    let unsigned = push(
        &format!("trusted/{}", unique_name("podunsigned")),
        "v1",
        "u",
    )
    .await;

    pods.create(&PostParams::default(), &pod("ok", &signed.by_digest()))
        .await
        .unwrap();
    let by_tag = denial(
        pods.create(&PostParams::default(), &pod("tag", &signed.by_tag()))
            .await,
    );
    assert!(by_tag.contains("is not pinned by digest"), "{by_tag}");
    let no_sig = denial(
        pods.create(&PostParams::default(), &pod("nosig", &unsigned.by_digest()))
            .await,
    );
    assert!(
        no_sig.contains(&unsigned.digest) && no_sig.contains("signature"),
        "{no_sig}"
    );

    // A debugging container added later is held to the same rule.
    let debug = serde_json::json!({"spec": {"ephemeralContainers": [
        {"name": "dbg", "image": "debian:12"}
    ]}});
    let added = pods
        .patch_subresource(
            "ephemeralcontainers",
            "ok",
            &PatchParams::default(),
            &Patch::Strategic(debug),
        )
        .await;
    let added = denial(added);
    assert!(
        added.contains(r#"ephemeralContainers[0] "dbg": image "debian:12""#),
        "{added}"
    );

    // Namespaces the policy does not name are left alone.
    Api::<Pod>::namespaced(admin, &free)
        .create(&PostParams::default(), &pod("any", "busybox"))
        .await
        .unwrap();
}

/// Every image of a pod, by container kind (`initContainers`, `containers`,
/// `ephemeralContainers`).
fn images_of(p: &Pod) -> [Vec<String>; 3] {
    let spec = p.spec.as_ref().unwrap();
    [
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| c.image.clone().unwrap_or_default())
            .collect(),
        spec.containers
            .iter()
            .map(|c| c.image.clone().unwrap_or_default())
            .collect(),
        spec.ephemeral_containers
            .iter()
            .flatten()
            .map(|c| c.image.clone().unwrap_or_default())
            .collect(),
    ]
}

#[tokio::test]
async fn a_verified_tag_is_pinned_to_its_digest_in_every_container_kind() {
    // The issue's policy: tags allowed (requireDigest: false), signatures verified.
    let (_controller, port, _) = start_controller(env(), "tags", None, true, |p| {
        p.replace(
            "  verifySignatures: true\n",
            "  requireDigest: false\n  verifySignatures: true\n",
        )
    });
    let cluster = shared_cluster();
    let ns = pod_policy_namespace(port, "pin").await;
    let admin = cluster.admin_client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    first_denial(&pods, "busybox").await;

    let repo = format!("trusted/{}", unique_name("pinned"));
    let signed = push(&repo, "v1", "signed").await;
    env().cosign.sign(&signed.by_digest()).await.unwrap();
    let by_tag = signed.by_tag();
    let pinned = signed.by_digest();

    // Admitted by tag: every container kind runs the verified digest, not the tag.
    let mut t1 = pod("t1", &by_tag);
    t1.spec.as_mut().unwrap().init_containers = t1.spec.as_ref().map(|s| s.containers.clone());
    t1.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].name = "init".into();
    pods.create(&PostParams::default(), &t1).await.unwrap();
    let debug = serde_json::json!({"spec": {"ephemeralContainers": [
        {"name": "dbg", "image": by_tag}
    ]}});
    pods.patch_subresource(
        "ephemeralcontainers",
        "t1",
        &PatchParams::default(),
        &Patch::Strategic(debug),
    )
    .await
    .unwrap();
    let stored = pods.get("t1").await.unwrap();
    assert_eq!(
        images_of(&stored),
        [
            vec![pinned.clone()],
            vec![pinned.clone()],
            vec![pinned.clone()]
        ],
        "stored as admitted"
    );

    // The tag moves to unsigned content: a pod naming it at once (well within any cache's
    // lifetime) is denied, naming what the tag now resolves to.
    let moved = push(&repo, "v1", "unsigned").await;
    assert_ne!(moved.digest, signed.digest);
    let r = denial(
        pods.create(&PostParams::default(), &pod("t2", &by_tag))
            .await,
    );
    assert!(
        r.contains(&format!("no signatures found for {}", moved.by_digest())),
        "{r}"
    );
    // The pod admitted earlier still runs the digest that was verified.
    assert_eq!(
        images_of(&pods.get("t1").await.unwrap())[1],
        vec![pinned.clone()]
    );

    // Without the pinning webhook (skipped, or undone by a later mutating webhook) a tag
    // never reaches a pod: the validating webhook admits only digests that verify.
    Api::<MutatingWebhookConfiguration>::all(admin)
        .delete("gkm-test-pods-pin", &Default::default())
        .await
        .unwrap();
    let v2 = format!("{}:v2", signed.repository);
    gkm_testenv::image::push_manifest(
        shared_registry(),
        &repo,
        "v2",
        &signed.media_type,
        &signed.manifest,
    )
    .await
    .unwrap();
    // Pods admitted while the API server still calls the pinning webhook are removed.
    let (_, r) = first_denial(&pods, &v2).await;
    assert!(
        r.contains(&format!(
            r#"containers[0] "app": image "{v2}" is not pinned by digest"#
        )),
        "{r}"
    );
    pods.create(&PostParams::default(), &pod("t4", &pinned))
        .await
        .unwrap();
}

/// A pod whose containers mount `csi.gkm.io` volumes: `(container, volume, mountPath,
/// own TRITON_CACHE_DIR)`, each volume naming the GKMCache of the same name in `ns`.
fn cache_pod(ns: &str, name: &str, mounts: &[(&str, &str, &str, Option<&str>)]) -> Pod {
    let mut volumes: Vec<&str> = mounts.iter().map(|m| m.1).collect();
    volumes.dedup();
    let containers: Vec<serde_json::Value> = mounts
        .iter()
        .map(|(c, v, path, own)| {
            let mut c = serde_json::json!({"name": c, "image": "busybox",
                "volumeMounts": [{"name": v, "mountPath": path}]});
            if let Some(own) = own {
                c["env"] = serde_json::json!([{"name": "TRITON_CACHE_DIR", "value": own}]);
            }
            c
        })
        .collect();
    let volumes: Vec<serde_json::Value> = volumes
        .iter()
        .map(|v| {
            serde_json::json!({"name": v, "csi": {"driver": "csi.gkm.io",
                "volumeAttributes": {"csi.gkm.io/GKMCache": v, "csi.gkm.io/namespace": ns}}})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": containers, "volumes": volumes},
    }))
    .unwrap()
}

fn env_of(p: &Pod, container: &str) -> Vec<(String, String)> {
    p.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == container)
        .unwrap()
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn pods_that_mount_a_cache_get_its_variable_at_their_mount_path() {
    use gkm_testenv::image::{CacheKind, Compression, ImageBuilder};
    let port = main_webhook();
    let cluster = shared_cluster();
    gkm_testenv::webhooks::register_pod_env(
        cluster,
        "gkm-test-pod-env",
        port,
        &env().ca.cert_pem,
        (SELECTOR, "pod-env"),
    )
    .await
    .unwrap();
    let ns =
        gkm_testenv::webhooks::editor_namespace(cluster, "wh-env", &[(SELECTOR, "pod-env")], &[])
            .await
            .unwrap();
    let admin = cluster.admin_client().await.unwrap();

    // Two caches as the cache webhook leaves them: a Triton one and an Inductor one (the
    // kind comes from the image's labels).
    let caches: Api<GKMCache> = Api::namespaced(admin.clone(), &ns);
    for (name, kind) in [
        ("triton", CacheKind::Triton),
        ("inductor", CacheKind::Inductor),
    ] {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("k")).unwrap();
        std::fs::write(src.path().join("k/kernel.cubin"), name).unwrap();
        let image = ImageBuilder::mcv(
            kind,
            src.path(),
            &[Target::new("cuda", "90", 32)],
            Compression::Gzip,
        )
        .unwrap()
        .push(
            shared_registry(),
            &format!("trusted/{}", unique_name(name)),
            Some("v1"),
        )
        .await
        .unwrap();
        caches
            .create(
                &PostParams::default(),
                &cache(name, &image.by_tag(), Some(&image.digest)),
            )
            .await
            .unwrap();
    }

    let pods: Api<Pod> = Api::namespaced(admin, &ns);
    let mounts = [
        ("app", "triton", "/opt/kernels", None),
        ("own", "triton", "/cache", Some("/root/.triton")),
        ("torch", "inductor", "/inductor", None),
    ];
    // The API server picks a new webhook configuration up shortly after it is written.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut attempt = 0;
    let created = loop {
        attempt += 1;
        let p = pods
            .create(
                &PostParams::default(),
                &cache_pod(&ns, &format!("p{attempt}"), &mounts),
            )
            .await
            .unwrap();
        if !env_of(&p, "app").is_empty() || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        env_of(&created, "app"),
        [("TRITON_CACHE_DIR".to_string(), "/opt/kernels".to_string())]
    );
    assert_eq!(
        env_of(&created, "own"),
        [("TRITON_CACHE_DIR".to_string(), "/root/.triton".to_string())],
        "a container's own value is kept (the response warns)"
    );
    assert_eq!(
        env_of(&created, "torch"),
        [(
            "TORCHINDUCTOR_CACHE_DIR".to_string(),
            "/inductor".to_string()
        )]
    );

    // A cache that does not exist: the pod is admitted unchanged.
    let p = pods
        .create(
            &PostParams::default(),
            &cache_pod(&ns, "missing", &[("app", "nope", "/c", None)]),
        )
        .await
        .unwrap();
    assert!(env_of(&p, "app").is_empty());
}

/// Grants service account `ns/name` the right to promote (create on promotions.gkm.io)
/// and returns a token of it.
async fn promoter_token(cluster: &Cluster, ns: &str, name: &str, grant: bool) -> String {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
    let token = cluster.service_account_token(ns, name).await.unwrap();
    if grant {
        let admin = cluster.admin_client().await.unwrap();
        let pp = PatchParams::apply("gkm-test").force();
        let role: ClusterRole = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gkm-test-promoter"},
            "rules": [{"apiGroups": ["gkm.io"], "resources": ["promotions"], "verbs": ["create"]}],
        }))
        .unwrap();
        Api::<ClusterRole>::all(admin.clone())
            .patch("gkm-test-promoter", &pp, &Patch::Apply(&role))
            .await
            .unwrap();
        let binding = ClusterRoleBinding {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("gkm-test-promoter-{ns}-{name}")),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: "gkm-test-promoter".into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.into(),
                namespace: Some(ns.into()),
                ..Default::default()
            }]),
        };
        Api::<ClusterRoleBinding>::all(admin)
            .patch(
                binding.metadata.name.as_deref().unwrap(),
                &pp,
                &Patch::Apply(&binding),
            )
            .await
            .unwrap();
    }
    token
}

/// Calls verify-and-promote on the controller at `port`.
async fn promote_call(
    port: u16,
    token: Option<&str>,
    image: &str,
    digest: &str,
) -> (u16, serde_json::Value) {
    gkm_image::install_crypto();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(env().ca.cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let mut req = client
        .post(format!(
            "https://127.0.0.1:{port}/api/images/verify-and-promote"
        ))
        .json(&serde_json::json!({"image": image, "digest": digest}));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// Whether the shared (trusted) registry has the manifest `repo@digest`.
async fn in_trusted(repo: &str, digest: &str) -> bool {
    let r = gkm_image::oci::parse_reference(&format!("{repo}@{digest}")).unwrap();
    puller()
        .fetch_manifest_bytes(&r, 1 << 20)
        .await
        .unwrap()
        .is_some()
}

fn puller() -> gkm_image::oci::Puller {
    gkm_image::oci::Puller::new(
        gkm_image::oci::PullConfig {
            insecure_registries: vec![
                shared_registry().host().to_string(),
                env().incoming.host().to_string(),
            ],
            ..Default::default()
        },
        gkm_image::oci::Credentials::anonymous(),
    )
}

async fn push_to(registry: &Registry, repo: &str, tag: &str, seed: &str) -> PushedImage {
    let targets = [Target::new("cuda", "90", 32)];
    gkm_testenv::fixtures::push_kernel_cache(registry, repo, tag, seed, &targets)
        .await
        .unwrap()
}

#[tokio::test]
async fn verify_and_promote_copies_only_verified_images_for_allowed_callers() {
    let port = main_webhook();
    let cluster = shared_cluster();
    let incoming = &env().incoming;
    let name = unique_name("app");
    let signed = push_to(incoming, &format!("dev/{name}"), "v1", "s").await;
    env().cosign.sign(&signed.by_digest()).await.unwrap();
    let bundled = push_to(incoming, &format!("dev/{name}-b"), "v1", "b").await;
    env()
        .cosign
        .sign_bundle(&bundled.by_digest())
        .await
        .unwrap();
    let unsigned = push_to(incoming, &format!("dev/{name}-u"), "v1", "u").await;
    let target = |suffix: &str| format!("{}/promoted/{name}{suffix}", env().repo_prefix);

    // Who may call: no token 401, a token without the right 403; nothing is copied.
    let ci = unique_name("ci");
    let nobody = promoter_token(cluster, &ci, "nobody", false).await;
    let bot = promoter_token(cluster, &ci, "bot", true).await;
    let (code, body) = promote_call(port, None, &signed.by_tag(), &signed.digest).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) =
        promote_call(port, Some("not-a-token"), &signed.by_tag(), &signed.digest).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = promote_call(port, Some(&nobody), &signed.by_tag(), &signed.digest).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(&format!(
            "system:serviceaccount:{ci}:nobody may not promote"
        )),
        "{body}"
    );
    assert!(!in_trusted(&target(""), &signed.digest).await);

    // No signature: 400 with the reason; nothing is copied.
    let (code, body) = promote_call(port, Some(&bot), &unsigned.by_tag(), &unsigned.digest).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["reason"], "not_verified", "{body}");
    assert!(!in_trusted(&target("-u"), &unsigned.digest).await);

    // Signed in cosign's tag format: copied with its signature and tag, and signed by the
    // promoter too.
    let (code, body) = promote_call(port, Some(&bot), &signed.by_tag(), &signed.digest).await;
    assert_eq!(code, 200, "{body}");
    let promoted = format!("{}@{}", target(""), signed.digest);
    assert_eq!(body["promoted"], promoted.as_str(), "{body}");
    assert_eq!(body["digest"], signed.digest.as_str());
    assert_eq!(body["signed"], true);
    env().cosign.verify(&promoted).await.unwrap();
    env().promoter.verify(&promoted).await.unwrap();
    let tagged = gkm_image::oci::parse_reference(&format!("{}:v1", target(""))).unwrap();
    let (_, digest) = puller()
        .fetch_manifest_bytes(&tagged, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(digest, signed.digest, "the tag names the promoted digest");

    // Again: nothing left to copy.
    let (code, again) = promote_call(port, Some(&bot), &signed.by_tag(), &signed.digest).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["blobs_copied"], 0, "{again}");

    // A Sigstore bundle attached as an OCI 1.1 referrer travels too: the trusted registry
    // has no referrers API, so it is listed under the referrers tag, where GKM finds it.
    let (code, body) = promote_call(port, Some(&bot), &bundled.by_tag(), &bundled.digest).await;
    assert_eq!(code, 200, "{body}");
    let original_only = gkm_image::trust::TrustPolicy::from_yaml(
        &format!(
            "authorities:\n  - name: original\n    key: |\n{}trustedRegistries: [{}]\n",
            env()
                .cosign
                .public_key_pem()
                .unwrap()
                .lines()
                .map(|l| format!("      {l}\n"))
                .collect::<String>(),
            env().repo_prefix
        ),
        std::path::Path::new("."),
    )
    .unwrap();
    let verifier = gkm_image::trust::Verifier::new(original_only, puller());
    let v = verifier
        .verify_reference(&format!("{}@{}", target("-b"), bundled.digest))
        .await
        .unwrap();
    assert_eq!(v.authority, "original");
    assert_eq!(format!("{:?}", v.format), "Bundle", "{v:?}");

    // The promoted image is a cache image users may now apply by tag.
    let ns = namespace(cluster, "main").await;
    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    let created = create(
        &alice,
        &cache("promoted", &format!("{}:v1", target("")), None),
    )
    .await
    .unwrap();
    assert_eq!(
        annotation(&created).as_deref(),
        Some(signed.digest.as_str())
    );

    // Each outcome is counted under its label.
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", main_controller().2))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"gkm_controller_promotions_total{result="promoted"}"#,
        r#"gkm_controller_promotions_total{result="unauthenticated"}"#,
        r#"gkm_controller_promotions_total{result="forbidden"}"#,
        r#"gkm_controller_promotions_total{result="not_verified"}"#,
        r#"gkm_controller_verifications_total{result="verified"}"#,
        r#"gkm_controller_admissions_total{endpoint="mutate",decision="mutated"}"#,
        r#"gkm_controller_reconciles_total{result="ok"}"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test]
async fn the_promotion_api_refuses_tags_reserved_for_artifacts() {
    let port = main_webhook();
    let name = unique_name("app");
    let signed = push_to(&env().incoming, &format!("dev/{name}"), "v1", "r").await;
    env().cosign.sign(&signed.by_digest()).await.unwrap();
    let bot = promoter_token(shared_cluster(), &unique_name("ci"), "bot", true).await;
    let hex = &signed.digest[7..];
    for tag in [format!("sha256-{hex}.sig"), format!("sha256-{hex}")] {
        let image = format!("{}/dev/{name}:{tag}", env().incoming.host());
        let (code, body) = promote_call(port, Some(&bot), &image, &signed.digest).await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(body["reason"], "reserved_tag", "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains(&format!("tag {tag:?} is reserved for artifacts")),
            "{body}"
        );
    }
    let promoted = format!("{}/promoted/{name}", env().repo_prefix);
    assert!(
        !in_trusted(&promoted, &signed.digest).await,
        "nothing copied"
    );
    let (code, body) = promote_call(port, Some(&bot), &signed.by_tag(), &signed.digest).await;
    assert_eq!(code, 200, "an ordinary tag promotes: {body}");
}

#[tokio::test]
async fn an_admission_body_past_the_limit_is_413() {
    let port = main_webhook();
    gkm_image::install_crypto();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(env().ca.cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/validate");
    let big = vec![b' '; gkm_controller::webhook::server::MAX_ADMISSION_BODY + 1];
    let resp = client.post(&url).body(big).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    // Just under the limit is read (and is not an AdmissionReview).
    let under = vec![b' '; 1 << 20];
    let resp = client.post(&url).body(under).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

/// The `gkm` binary of this workspace.
fn gkm_bin() -> PathBuf {
    gkm_testenv::workspace_binary("gkm", "gkm")
}

/// Runs `gkm` with `args` and no kubeconfig; its exit code, stdout and stderr.
async fn gkm_cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(gkm_bin())
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The layers of `repo`'s `.att` manifest for `digest` in an htpasswd registry.
async fn attestation_layers(
    vault: &gkm_testenv::auth_registry::AuthRegistry,
    repo: &str,
    digest: &str,
) -> (String, Vec<serde_json::Value>) {
    use gkm_testenv::auth_registry::{PASSWORD, USER};
    let tag = format!("{}.att", digest.replace(':', "-"));
    let resp = reqwest::Client::new()
        .get(format!("http://{}/v2/{repo}/manifests/{tag}", vault.host()))
        .basic_auth(USER, Some(PASSWORD))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{repo}:{tag}: {}",
        resp.status()
    );
    let bytes = resp.text().await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&bytes).unwrap();
    (bytes, doc["layers"].as_array().cloned().unwrap_or_default())
}

/// Issue #14 end to end: a developer with push rights on the incoming registry only asks
/// the promoter through `gkm promote --server`; the trusted registry (which requires
/// credentials only the controller has) then holds the image, its signatures and a
/// verification attestation real cosign accepts; a policy that requires that attestation
/// admits the promoted cache and Pod, and denies, naming what is missing, an image put
/// there past the promoter, one attested by another key, of another type, or whose
/// attestation is about another digest; status records who vouched; re-promotion leaves
/// one attestation.
#[tokio::test]
async fn a_developer_promotes_through_the_server_and_policies_require_its_attestation() {
    use gkm_image::trust::attest::VERIFICATION_PREDICATE_TYPE as VERIFICATION;
    use gkm_testenv::auth_registry::{AuthMode, AuthRegistry};
    let env = env();
    let cluster = shared_cluster();
    let vault = AuthRegistry::start(AuthMode::Basic).await.unwrap();
    let ci = unique_name("ci");
    let indent = |pem: String| -> String { pem.lines().map(|l| format!("      {l}\n")).collect() };
    let (dev_pem, promoter_pem) = (
        indent(env.cosign.public_key_pem().unwrap()),
        indent(env.promoter.public_key_pem().unwrap()),
    );
    let (vault_host, incoming_host) = (vault.host().to_string(), env.incoming.host().to_string());
    let sign_key = env.promoter.key_path();
    let group = format!("system:serviceaccounts:{ci}");
    let policy = format!(
        "authorities:\n  - name: developers\n    key: |\n{dev_pem}  - name: promoter\n    key: |\n{promoter_pem}\
         trustedRegistries:\n  - {vault_host}/promoted\nverification:\n  timeoutSeconds: 8\n\
         podPolicy:\n  namespaces: [\"{POD_NS}-*\"]\n  verifySignatures: true\n\
         promotion:\n  incoming: {incoming_host}/dev\n  trusted: {vault_host}/promoted\n  signKey: {}\n\
         requiredAttestations:\n  - predicateType: {VERIFICATION}\n    authority: promoter\n    appliesTo: [caches, pods]\n\
         \x20   conditions:\n      - field: /caller/groups\n        contains: \"{group}\"\n",
        sign_key.display()
    );
    let (_controller, port, _) = start_controller_with(
        env,
        "provenance",
        None,
        false,
        |_| policy,
        &[
            format!("--registry-auth={}", vault.docker_config().display()),
            format!("--insecure-registry={vault_host}"),
        ],
    );
    register(cluster, env, "prov", port).await;
    let ns = namespace(cluster, "prov").await;

    // The developer: an incoming image signed with their key, a token that may promote,
    // and no credentials for the trusted registry (a write there is 401).
    let name = unique_name("kernels");
    let good = push_to(&env.incoming, &format!("dev/{name}"), "v1", "good").await;
    env.cosign.sign(&good.by_digest()).await.unwrap();
    let bypass = push_to(&env.incoming, &format!("dev/{name}"), "v2", "bypass").await;
    env.cosign.sign(&bypass.by_digest()).await.unwrap();
    let anonymous_write = reqwest::Client::new()
        .post(format!(
            "http://{vault_host}/v2/promoted/{name}/blobs/uploads/"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous_write.status().as_u16(), 401);
    let work = tempfile::tempdir().unwrap();
    let write = |file: &str, text: &str| {
        let p = work.path().join(file);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let token = write("token", &promoter_token(cluster, &ci, "dev", true).await);
    let nobody = write(
        "nobody",
        &promoter_token(cluster, &ci, "nobody", false).await,
    );
    let junk = write("junk", "not-a-token");
    let ca = write("ca.pem", &env.ca.cert_pem);
    let server = format!("https://127.0.0.1:{port}");
    let promote = |image: String, token: String| {
        let (server, ca, incoming_host) = (server.clone(), ca.clone(), incoming_host.clone());
        async move {
            gkm_cli(&[
                "promote",
                &image,
                "--server",
                &server,
                "--token-file",
                &token,
                "--ca-file",
                &ca,
                "--insecure-registry",
                &incoming_host,
            ])
            .await
        }
    };

    // Refusals, in words and exit codes a developer (or a CI job) can act on.
    let (code, _, err) = promote(good.by_tag(), junk.clone()).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("did not accept your credentials"), "{err}");
    let (code, _, err) = promote(good.by_tag(), nobody.clone()).await;
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains(&format!(
            "system:serviceaccount:{ci}:nobody may not promote"
        )),
        "{err}"
    );
    let unsigned = push_to(&env.incoming, &format!("dev/{name}-u"), "v1", "u").await;
    let (code, _, err) = promote(unsigned.by_tag(), token.clone()).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refused the image") && err.contains(&unsigned.digest),
        "{err}"
    );

    // The promotion, by tag (resolved in the incoming registry by the developer's gkm).
    let (code, out, err) = promote(good.by_tag(), token.clone()).await;
    assert_eq!(code, 0, "{err}");
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    let promoted = format!("{vault_host}/promoted/{name}@{}", good.digest);
    assert_eq!(done["promoted"], promoted.as_str(), "{done}");
    assert_eq!(done["signed"], true, "{done}");
    let att_tag = format!(
        "{vault_host}/promoted/{name}:{}.att",
        good.digest.replace(':', "-")
    );
    assert_eq!(done["attestation"], att_tag.as_str(), "{done}");
    // Real cosign accepts it with the promoter's public key (and the registry credentials).
    env.promoter
        .verify_attestation(&promoted, VERIFICATION, Some(&vault.docker_config()))
        .await
        .unwrap();
    assert!(
        env.cosign
            .verify_attestation(&promoted, VERIFICATION, Some(&vault.docker_config()))
            .await
            .is_err(),
        "the developer's key made no attestation"
    );

    // Put into the trusted registry past the promoter, with the developer's signature:
    // a cache of it is denied, naming the attestation; the promoted one is admitted.
    let local_policy = write(
        "local-policy.yaml",
        &format!(
            "authorities:\n  - name: developers\n    key: |\n{dev_pem}trustedRegistries: [{vault_host}/promoted]\n\
             promotion:\n  incoming: {incoming_host}/dev\n  trusted: {vault_host}/promoted\n"
        ),
    );
    let (code, _, err) = gkm_cli(&[
        "promote",
        &bypass.by_tag(),
        "--policy",
        &local_policy,
        "--registry-auth",
        &vault.docker_config().display().to_string(),
        "--insecure-registry",
        env.incoming.host(),
        "--insecure-registry",
        &vault_host,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let bypassed = format!("{vault_host}/promoted/{name}@{}", bypass.digest);

    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    let expect_denied = |what: &'static str, image: String| {
        let alice = alice.clone();
        async move {
            let c = cache(&unique_name("denied"), &image, None);
            let message = match create(&alice, &c).await {
                Err(kube::Error::Api(e)) => e.message,
                other => panic!("{what}: admitted: {other:?}"),
            };
            assert!(
                message.contains(&format!("an attestation of type {VERIFICATION}"))
                    && message.contains("\"promoter\""),
                "{what}: {message}"
            );
            message
        }
    };
    expect_denied("not promoted", bypassed.clone()).await;
    let admitted = create(
        &alice,
        &cache(
            "promoted",
            &format!("{vault_host}/promoted/{name}:v1"),
            None,
        ),
    )
    .await
    .unwrap();
    assert_eq!(annotation(&admitted).as_deref(), Some(good.digest.as_str()));

    // Attestations that do not count: another key, another predicate type, another digest.
    let other = Cosign::generate().await.unwrap();
    let predicate = done_predicate(&promoted, &group);
    other
        .attest(
            &bypassed,
            VERIFICATION,
            &predicate,
            Some(&vault.docker_config()),
        )
        .await
        .unwrap();
    expect_denied("another key", bypassed.clone()).await;
    env.promoter
        .attest(
            &bypassed,
            "https://example.com/other/v1",
            &predicate,
            Some(&vault.docker_config()),
        )
        .await
        .unwrap();
    expect_denied("another type", bypassed.clone()).await;
    let (manifest, _) = attestation_layers(&vault, &format!("promoted/{name}"), &good.digest).await;
    let put = reqwest::Client::new()
        .put(format!(
            "http://{vault_host}/v2/promoted/{name}/manifests/{}.att",
            bypass.digest.replace(':', "-")
        ))
        .basic_auth(
            gkm_testenv::auth_registry::USER,
            Some(gkm_testenv::auth_registry::PASSWORD),
        )
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let message = expect_denied("another digest", bypassed.clone()).await;
    assert!(message.contains(&bypass.digest), "{message}");

    // Pods under podPolicy: the same requirement.
    let covered = pod_policy_namespace(port, "prov").await;
    let pods: Api<Pod> = Api::namespaced(cluster.admin_client().await.unwrap(), &covered);
    let (_, message) = first_denial(&pods, &bypassed).await;
    assert!(
        message.contains(&format!("an attestation of type {VERIFICATION}")),
        "{message}"
    );
    pods.create(&PostParams::default(), &pod("attested", &promoted))
        .await
        .unwrap();

    // Status says who vouched and when; a user cannot write it.
    let admin: Api<GKMCache> = Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    let provenance = loop {
        let c = admin.get("promoted").await.unwrap();
        if let Some(p) = c.status.and_then(|s| s.provenance) {
            break p;
        }
        assert!(Instant::now() < deadline, "no status.provenance");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(provenance.digest, good.digest);
    assert!(
        ["promoter", "developers"].contains(&provenance.authority.as_str()),
        "{provenance:?}"
    );
    assert!(provenance.attestation_required, "{provenance:?}");
    assert_eq!(provenance.attestations, vec![VERIFICATION.to_string()]);
    let forged = serde_json::json!({"status": {"provenance": {
        "digest": good.digest, "authority": "alice", "signatureFormat": "tag",
        "attestationRequired": false, "attestations": [], "verifiedAt": "2020-01-01T00:00:00Z"}}});
    match alice
        .patch_status("promoted", &PatchParams::default(), &Patch::Merge(&forged))
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("alice wrote status: {other:?}"),
    }

    // Promoting the same digest again leaves one attestation.
    let (code, _, err) = promote(good.by_tag(), token.clone()).await;
    assert_eq!(code, 0, "{err}");
    let (_, layers) = attestation_layers(&vault, &format!("promoted/{name}"), &good.digest).await;
    let ours = layers
        .iter()
        .filter(|l| l["annotations"]["predicateType"] == VERIFICATION)
        .count();
    assert_eq!(ours, 1, "{layers:?}");

    // The documented developer workflow, unchanged: build, push, sign, promote, print.
    let cache_dir = gkm_testenv::fixtures::one_kernel_triton_cache(work.path()).unwrap();
    let path = format!(
        "{}:{}:/usr/bin:/bin",
        gkm_bin().parent().unwrap().display(),
        gkm_testenv::tools::tools_bin_dir().display()
    );
    let out = tokio::process::Command::new(
        gkm_testenv::workspace_root().join("examples/developer-workflow.sh"),
    )
    .env_clear()
    .env("PATH", path)
    .env("HOME", work.path())
    .env("KUBECONFIG", "/nonexistent/kubeconfig")
    .env("CACHE_DIR", &cache_dir)
    .env("IMAGE", format!("{incoming_host}/dev/{name}-ci:v3"))
    .env("COSIGN_KEY", env.cosign.key_path())
    .env("COSIGN_PASSWORD", env.cosign.password())
    .env("GKM_SERVER", &server)
    .env("GKM_TOKEN_FILE", &token)
    .env("GKM_CA_FILE", &ca)
    .env("INSECURE_REGISTRY", &incoming_host)
    .output()
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let printed = stdout.lines().last().unwrap_or_default();
    assert!(
        printed.starts_with(&format!("{vault_host}/promoted/{name}-ci@sha256:")),
        "{stdout}\n{stderr}"
    );
    env.promoter
        .verify_attestation(printed, VERIFICATION, Some(&vault.docker_config()))
        .await
        .unwrap();
}

/// A predicate shaped like the promoter's (so only the key, type or subject differs).
fn done_predicate(promoted: &str, group: &str) -> serde_json::Value {
    serde_json::json!({
        "incoming": promoted, "trusted": promoted,
        "verification": {"authority": "promoter", "signatureFormat": "tag"},
        "policy": {"sha256": "0"}, "verifiedAt": "2026-01-01T00:00:00Z",
        "caller": {"username": "x", "uid": "", "groups": [group]},
    })
}

/// Load: 500 caches created at once (10 signed images by tag, 50 caches each) through the
/// mutating and validating webhooks: every create succeeds, every cache gets its image's
/// verified digest, and the controller promotes every status. Prints the create latencies
/// and the time until every status is promoted. `GKM_LOAD_CACHES` changes the count.
#[tokio::test]
async fn five_hundred_caches_created_at_once_are_all_admitted_and_promoted() {
    use futures::StreamExt as _;
    // Statuses come from the shared controller's status controller; admission from a
    // webhook-only controller of its own, so the load does not slow other tests' admission.
    main_webhook();
    let (_process, port, _metrics) = start_controller(env(), "load", None, true, |p| p);
    let cluster = shared_cluster();
    register(cluster, env(), "load", port).await;
    let total: usize = std::env::var("GKM_LOAD_CACHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let ns = namespace(cluster, "load").await;
    let mut images = Vec::new();
    for i in 0..10 {
        let repo = format!("trusted/{}", unique_name(&format!("load{i}")));
        let img = push(&repo, "v1", &format!("load-{i}")).await;
        env().cosign.sign(&img.by_digest()).await.unwrap();
        images.push(img);
    }
    let alice: Api<GKMCache> = Api::namespaced(cluster.user_client("alice").await.unwrap(), &ns);
    // Warm the webhook's connection to the apiserver (its configuration may be new).
    create(&alice, &cache("warm", &images[0].by_tag(), None))
        .await
        .unwrap();
    let started = Instant::now();
    let results: Vec<(usize, Result<GKMCache, kube::Error>, Duration)> =
        futures::stream::iter(0..total)
            .map(|i| {
                let alice = alice.clone();
                let image = images[i % images.len()].by_tag();
                async move {
                    let t = Instant::now();
                    let r = alice
                        .create(
                            &PostParams::default(),
                            &cache(&format!("load-{i}"), &image, None),
                        )
                        .await;
                    (i, r, t.elapsed())
                }
            })
            .buffer_unordered(total)
            .collect()
            .await;
    let created_in = started.elapsed();
    let mut latencies: Vec<Duration> = Vec::new();
    for (i, r, took) in &results {
        let c = r
            .as_ref()
            .unwrap_or_else(|e| panic!("cache load-{i} was refused: {e}"));
        assert_eq!(
            annotation(c).as_deref(),
            Some(images[i % images.len()].digest.as_str()),
            "load-{i}"
        );
        latencies.push(*took);
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];

    let admin: Api<GKMCache> = Api::namespaced(cluster.admin_client().await.unwrap(), &ns);
    let deadline = Instant::now() + Duration::from_secs(120);
    let promoted_in = loop {
        let list = admin.list(&Default::default()).await.unwrap();
        let promoted = list
            .items
            .iter()
            .filter(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("load-"))
            })
            .filter(|c| {
                c.status.as_ref().and_then(|s| s.resolved_digest.as_ref()) == annotation(c).as_ref()
            })
            .count();
        if promoted == total {
            break started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{promoted} of {total} statuses promoted after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "{total} caches created at once: all admitted in {:.1} s (create latency p50 {:?}, p99 {:?}, max {:?}); every status promoted {:.1} s after the first create",
        created_in.as_secs_f64(),
        pct(50),
        pct(99),
        latencies[latencies.len() - 1],
        promoted_in.as_secs_f64()
    );
}
