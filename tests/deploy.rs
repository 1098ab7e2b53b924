//! deploy/ is valid for a real API server (server-side dry run of the whole kustomization),
//! and its pieces agree on the names they refer to each other by.

use std::process::Command;

use gkm_testenv::tools::{self, Tool};
use gkm_testenv::{shared_cluster, workspace_root};

fn kubectl(args: &[&str]) -> String {
    let out = Command::new(tools::locate(Tool::Kubectl).unwrap())
        .arg("--kubeconfig")
        .arg(shared_cluster().admin_kubeconfig())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rendered() -> Vec<serde_json::Value> {
    let deploy = workspace_root().join("deploy");
    let yaml = kubectl(&["kustomize", deploy.to_str().unwrap()]);
    yaml.split("\n---\n")
        .map(|doc| serde_norway::from_str::<serde_json::Value>(doc).unwrap())
        .collect()
}

#[tokio::test]
async fn every_manifest_passes_a_server_side_dry_run() {
    let cluster = shared_cluster();
    // Namespaced objects dry-run only into an existing namespace.
    cluster.ensure_namespace("gkm-system").await.unwrap();
    let deploy = workspace_root().join("deploy");
    let out = kubectl(&[
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=gkm-deploy-test",
        "-k",
        deploy.to_str().unwrap(),
    ]);
    let objects = rendered();
    assert_eq!(out.lines().count(), objects.len(), "{out}");
    for o in &objects {
        let name = o["metadata"]["name"].as_str().unwrap();
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
}

#[test]
fn the_pieces_agree_on_names() {
    let objects = rendered();
    let find = |kind: &str| {
        objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .collect::<Vec<_>>()
    };
    let deployment = find("Deployment")[0];
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("{flag} not in {args:?}"))
    };
    let webhook_config = arg("--webhook-config");
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let w = find(kind)[0];
        assert_eq!(w["metadata"]["name"], webhook_config, "{kind}");
        let svc = &w["webhooks"][0]["clientConfig"]["service"];
        assert_eq!(svc["name"], arg("--service"), "{kind}");
        assert_eq!(w["webhooks"][0]["failurePolicy"], "Fail", "{kind}");
    }
    let role = find("ClusterRole")[0];
    let may_update = role["rules"].as_array().unwrap().iter().any(|r| {
        r["resourceNames"]
            .as_array()
            .is_some_and(|n| n.iter().any(|x| x == webhook_config))
    });
    assert!(
        may_update,
        "the controller's role covers its webhook configurations"
    );
    let service = find("Service")[0];
    assert_eq!(service["metadata"]["name"], arg("--service"));
    // The controller is the only one with status rights, and has nothing but status on caches.
    let status_rules: Vec<_> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resources"].to_string().contains("/status"))
        .collect();
    assert_eq!(status_rules.len(), 1);
    // The policy mount holds the file the controller reads.
    let policy_path = arg("--policy");
    assert!(policy_path.starts_with("/etc/gkm/policy/"));
    let cm = find("ConfigMap")[0];
    assert!(cm["data"][policy_path.rsplit('/').next().unwrap()].is_string());
}
