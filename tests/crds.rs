//! GKM's custom resources against a real kube-apiserver, and the committed CRD YAML.

use std::process::Command;

use gkm::api::{ClusterGKMCache, GKMCache, GKMCacheSpec, crd_yaml, crds};
use gkm_testenv::tools::{self, Tool};
use gkm_testenv::{shared_cluster, workspace_root};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

/// `deploy/crds/` must be exactly what the types generate. To refresh it after changing
/// the types: `cargo run --bin gkm -- crds --write deploy/crds`.
#[test]
fn committed_crds_match_the_types() {
    let dir = workspace_root().join("deploy/crds");
    let mut expected: Vec<String> = Vec::new();
    for (file, crd) in crds() {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| {
            panic!("deploy/crds/{file} missing ({e}): run `gkm crds --write deploy/crds`")
        });
        assert!(
            committed == crd_yaml(&crd),
            "deploy/crds/{file} differs from the Rust types: run `cargo run --bin gkm -- crds --write deploy/crds`"
        );
        expected.push(file.to_string());
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(
        present, expected,
        "deploy/crds/ holds exactly the generated CRDs"
    );
}

fn cache_api_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("gkm.io", "v1alpha1", kind), plural)
}

/// A manifest of the earlier GKM, applied as it was written, is accepted and kept.
#[tokio::test]
async fn an_earlier_gkm_manifest_applies_unchanged() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("crd-legacy").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    let manifest: serde_json::Value = serde_norway::from_str(&format!(
        r#"
apiVersion: gkm.io/v1alpha1
kind: GKMCache
metadata:
  name: gkm-test-obj
  namespace: {ns}
  labels:
    gkm.io/signature-format: cosign-v2
spec:
  image: quay.io/gkm/cache-examples:vector-add-cache-rocm-v2
  accessModes:
    - ReadWriteOnce
  storageClassName: standard
  podTemplate:
    spec:
      tolerations:
        - key: gpu
          operator: Equal
          value: "true"
"#
    ))
    .unwrap();
    let obj: DynamicObject = serde_json::from_value(manifest).unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &cache_api_resource("GKMCache", "gkmcaches"),
    );
    api.create(&PostParams::default(), &obj)
        .await
        .expect("the earlier GKM's manifest is accepted");

    let typed: Api<GKMCache> = Api::namespaced(client, &ns);
    let back = typed.get("gkm-test-obj").await.unwrap();
    assert_eq!(
        back.spec.image,
        "quay.io/gkm/cache-examples:vector-add-cache-rocm-v2"
    );
    assert_eq!(
        back.spec.compat.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    assert_eq!(
        back.spec.compat.storage_class_name.as_deref(),
        Some("standard")
    );
    let tolerations = &back.spec.compat.pod_template.as_ref().unwrap()["spec"]["tolerations"];
    assert_eq!(
        tolerations[0]["key"], "gpu",
        "podTemplate is kept as written, not pruned"
    );
}

#[tokio::test]
async fn the_api_server_rejects_a_cache_without_an_image() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("crd-invalid").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &cache_api_resource("GKMCache", "gkmcaches"),
    );
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "gkm.io/v1alpha1", "kind": "GKMCache",
        "metadata": {"name": "no-image"},
        "spec": {"accessModes": ["ReadWriteOnce"]},
    }))
    .unwrap();
    let err = api.create(&PostParams::default(), &obj).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("spec.image") && msg.contains("Required"),
        "{msg}"
    );

    // An empty image and a bad namespace name in workloadNamespaces are refused too.
    let typed: Api<GKMCache> = Api::namespaced(client.clone(), &ns);
    let empty = GKMCache::new("empty-image", GKMCacheSpec::default());
    let err = typed
        .create(&PostParams::default(), &empty)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.image"), "{err}");

    let cluster_api: Api<DynamicObject> = Api::all_with(
        client,
        &cache_api_resource("ClusterGKMCache", "clustergkmcaches"),
    );
    let bad_ns: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "gkm.io/v1alpha1", "kind": "ClusterGKMCache",
        "metadata": {"name": gkm_testenv::unique_name("bad-ns")},
        "spec": {"image": "r.example/c:1", "workloadNamespaces": ["Not_A_Namespace"]},
    }))
    .unwrap();
    let err = cluster_api
        .create(&PostParams::default(), &bad_ns)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("workloadNamespaces"), "{err}");
}

#[tokio::test]
async fn status_is_a_subresource() {
    let cluster = shared_cluster();
    let client = cluster.admin_client().await.unwrap();
    let api: Api<ClusterGKMCache> = Api::all(client);
    let name = gkm_testenv::unique_name("status-sub");
    let mut cache = ClusterGKMCache::new(&name, Default::default());
    cache.spec.image = "r.example/c:1".into();
    cache.status = Some(gkm::api::CacheStatus {
        resolved_digest: Some("sha256:forged".into()),
        ..Default::default()
    });
    let created = api.create(&PostParams::default(), &cache).await.unwrap();
    assert_eq!(
        created.status, None,
        "a create cannot write status: it is a subresource"
    );
}

/// `kubectl get gkmc` shows the printer columns, filled from status.
#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let cluster = shared_cluster();
    let ns = cluster.new_namespace("crd-kubectl").await.unwrap();
    let client = cluster.admin_client().await.unwrap();
    let api: Api<GKMCache> = Api::namespaced(client, &ns);
    let mut cache = GKMCache::new("llama", GKMCacheSpec::default());
    cache.spec.image = "127.0.0.1:5000/kernels/llama:v1".into();
    api.create(&PostParams::default(), &cache).await.unwrap();
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let status = serde_json::json!({"status": {
        "resolvedDigest": digest,
        "shortDigest": gkm::api::short_digest(digest),
        "counts": {"nodesReady": 3, "nodesError": 0, "nodesIncompatible": 1, "pods": 5},
    }});
    api.patch_status(
        "llama",
        &Default::default(),
        &kube::api::Patch::Merge(status),
    )
    .await
    .unwrap();

    let kubectl = tools::locate(Tool::Kubectl).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(cluster.admin_kubeconfig())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&["get", "gkmc", "-n", &ns]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "IMAGE", "DIGEST", "READY-NODES", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..4],
        [
            "llama",
            "127.0.0.1:5000/kernels/llama:v1",
            "sha256:0123456789ab",
            "3"
        ],
        "{out}"
    );

    let wide = run(&["get", "gkmc", "-n", &ns, "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().contains("FULL-DIGEST"),
        "{wide}"
    );
    assert!(wide.contains(digest), "{wide}");

    // The short names of every kind resolve.
    for short in ["gkmc", "cgkmc", "gkmcn", "cgkmcn"] {
        run(&["get", short, "-A"]);
    }
}
