//! GKM's admission webhooks in a test cluster: registration by URL with a CA bundle, for the
//! namespaces carrying one label, and namespaces where given users may edit caches.

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use crate::{Cluster, Error};

/// Registers (server-side applies) a Mutating- and a ValidatingWebhookConfiguration named
/// `name` for GKM's caches, calling `https://127.0.0.1:<port>/{mutate,validate}` trusted by
/// `ca_pem`, for namespaces labelled `label`. failurePolicy Fail, timeout 10 s.
pub async fn register(
    cluster: &Cluster,
    name: &str,
    port: u16,
    ca_pem: &str,
    label: (&str, &str),
) -> Result<(), Error> {
    let rules = vec![RuleWithOperations {
        api_groups: Some(vec!["gkm.io".into()]),
        api_versions: Some(vec!["v1alpha1".into()]),
        operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
        resources: Some(vec!["gkmcaches".into(), "clustergkmcaches".into()]),
        scope: None,
    }];
    let pair = Pair {
        mutating: ("mutate.gkm.io", "mutate"),
        validating: ("validate.gkm.io", "validate"),
        reinvocation: None,
    };
    pair.register(cluster, name, (port, ca_pem), label, rules)
        .await
}

/// The two webhooks of a Mutating- and ValidatingWebhookConfiguration pair: each as
/// `(webhook name, path)`, and the mutating one's reinvocationPolicy.
struct Pair {
    mutating: (&'static str, &'static str),
    validating: (&'static str, &'static str),
    reinvocation: Option<&'static str>,
}

impl Pair {
    /// Server-side applies both configurations, named `name`, calling
    /// `https://127.0.0.1:<port>/<path>` trusted by `ca_pem` (`at`) on `rules`, for
    /// namespaces labelled `label`. failurePolicy Fail, timeout 10 s.
    async fn register(
        &self,
        cluster: &Cluster,
        name: &str,
        at: (u16, &str),
        label: (&str, &str),
        rules: Vec<RuleWithOperations>,
    ) -> Result<(), Error> {
        let (port, ca_pem) = at;
        let client = cluster.admin_client().await?;
        let meta = ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let m = MutatingWebhookConfiguration {
            metadata: meta.clone(),
            webhooks: Some(vec![MutatingWebhook {
                name: self.mutating.0.into(),
                admission_review_versions: vec!["v1".into()],
                client_config: local(port, self.mutating.1, ca_pem),
                failure_policy: Some("Fail".into()),
                side_effects: "None".into(),
                timeout_seconds: Some(10),
                namespace_selector: Some(labelled(label)),
                reinvocation_policy: self.reinvocation.map(String::from),
                rules: Some(rules.clone()),
                ..Default::default()
            }]),
        };
        let v = ValidatingWebhookConfiguration {
            metadata: meta,
            webhooks: Some(vec![ValidatingWebhook {
                name: self.validating.0.into(),
                admission_review_versions: vec!["v1".into()],
                client_config: local(port, self.validating.1, ca_pem),
                failure_policy: Some("Fail".into()),
                side_effects: "None".into(),
                timeout_seconds: Some(10),
                namespace_selector: Some(labelled(label)),
                rules: Some(rules),
                ..Default::default()
            }]),
        };
        let pp = PatchParams::apply("gkm-testenv").force();
        let ctx = |e| Error::kube(format!("registering webhooks {name}"), e);
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .patch(name, &pp, &Patch::Apply(&m))
            .await
            .map_err(ctx)?;
        Api::<ValidatingWebhookConfiguration>::all(client)
            .patch(name, &pp, &Patch::Apply(&v))
            .await
            .map_err(ctx)?;
        Ok(())
    }
}

/// `https://127.0.0.1:<port>/<path>`, trusted by `ca_pem`.
fn local(port: u16, path: &str, ca_pem: &str) -> WebhookClientConfig {
    WebhookClientConfig {
        url: Some(format!("https://127.0.0.1:{port}/{path}")),
        ca_bundle: Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec())),
        service: None,
    }
}

/// Rules matching `operations` on core `v1` `resources`.
fn pod_rules(operations: &[&str], resources: &[&str]) -> Vec<RuleWithOperations> {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    vec![RuleWithOperations {
        api_groups: Some(vec!["".into()]),
        api_versions: Some(vec!["v1".into()]),
        operations: Some(strings(operations)),
        resources: Some(strings(resources)),
        scope: None,
    }]
}

/// The namespaces carrying `label`.
fn labelled(label: (&str, &str)) -> LabelSelector {
    LabelSelector {
        match_labels: Some([(label.0.to_string(), label.1.to_string())].into()),
        ..Default::default()
    }
}

/// Registers (server-side applies) the Pod policy's two webhooks, as deployed, named `name`:
/// a MutatingWebhookConfiguration calling `https://127.0.0.1:<port>/pin-pods` (pinning
/// verified tags to their digest, reinvocationPolicy IfNeeded) and a
/// ValidatingWebhookConfiguration calling `/validate-pods`, trusted by `ca_pem`, for pods
/// and ephemeral containers in namespaces labelled `label`. Both failurePolicy Fail,
/// timeout 10 s.
pub async fn register_pod_policy(
    cluster: &Cluster,
    name: &str,
    port: u16,
    ca_pem: &str,
    label: (&str, &str),
) -> Result<(), Error> {
    let rules = pod_rules(&["CREATE", "UPDATE"], &["pods", "pods/ephemeralcontainers"]);
    let pair = Pair {
        mutating: ("pod-pin.gkm.io", "pin-pods"),
        validating: ("pods.gkm.io", "validate-pods"),
        reinvocation: Some("IfNeeded"),
    };
    pair.register(cluster, name, (port, ca_pem), label, rules)
        .await
}

/// Registers (server-side applies) a MutatingWebhookConfiguration named `name` for the
/// cache variables of pods, calling `https://127.0.0.1:<port>/mutate-pods` trusted by
/// `ca_pem`, for pod creates in namespaces labelled `label`. failurePolicy Ignore, as
/// deployed.
pub async fn register_pod_env(
    cluster: &Cluster,
    name: &str,
    port: u16,
    ca_pem: &str,
    label: (&str, &str),
) -> Result<(), Error> {
    let client = cluster.admin_client().await?;
    let m = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "pod-env.gkm.io".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: local(port, "mutate-pods", ca_pem),
            failure_policy: Some("Ignore".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(10),
            namespace_selector: Some(labelled(label)),
            rules: Some(pod_rules(&["CREATE"], &["pods"])),
            ..Default::default()
        }]),
    };
    Api::<MutatingWebhookConfiguration>::all(client)
        .patch(
            name,
            &PatchParams::apply("gkm-testenv").force(),
            &Patch::Apply(&m),
        )
        .await
        .map_err(|e| Error::kube(format!("registering the pod-env webhook {name}"), e))?;
    Ok(())
}

/// A new namespace (`<prefix>-…`, with `labels`) where each of `users` may create, read,
/// update and patch GKMCaches, but not their status.
pub async fn editor_namespace(
    cluster: &Cluster,
    prefix: &str,
    labels: &[(&str, &str)],
    users: &[&str],
) -> Result<String, Error> {
    let name = crate::unique_name(prefix);
    let client = cluster.admin_client().await?;
    let ctx = |what: &str| {
        let what = format!("{what} in {name}");
        move |e| Error::kube(what, e)
    };
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .map_err(ctx("creating the namespace"))?;
    let role = Role {
        metadata: ObjectMeta {
            name: Some("cache-editor".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["gkm.io".into()]),
            resources: Some(vec!["gkmcaches".into()]),
            verbs: ["create", "get", "list", "update", "patch"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(client.clone(), &name)
        .create(&PostParams::default(), &role)
        .await
        .map_err(ctx("creating the role"))?;
    for (i, user) in users.iter().enumerate() {
        let rb = RoleBinding {
            metadata: ObjectMeta {
                name: Some(format!("cache-editor-{i}")),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: "cache-editor".into(),
            },
            subjects: Some(vec![Subject {
                kind: "User".into(),
                name: user.to_string(),
                api_group: Some("rbac.authorization.k8s.io".into()),
                namespace: None,
            }]),
        };
        Api::<RoleBinding>::namespaced(client.clone(), &name)
            .create(&PostParams::default(), &rb)
            .await
            .map_err(ctx("binding the role"))?;
    }
    Ok(name)
}
