//! deploy/ is valid for a real API server (server-side dry run of the whole kustomization),
//! its pieces agree on the names they refer to each other by, and the agent's DaemonSet
//! agrees with the agent's own defaults (socket, store, sysfs, health endpoints).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory, Parser};
use gkm::agent::AgentArgs;
use gkm::csi::{DEFAULT_SOCKET, DRIVER_NAME};
use gkm_testenv::tools::{self, Tool};
use gkm_testenv::{shared_cluster, workspace_root};
use serde_json::Value;

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

fn rendered() -> Vec<Value> {
    let deploy = workspace_root().join("deploy");
    let yaml = kubectl(&["kustomize", deploy.to_str().unwrap()]);
    yaml.split("\n---\n")
        .map(|doc| serde_norway::from_str::<Value>(doc).unwrap())
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
        for hook in w["webhooks"].as_array().unwrap() {
            let svc = &hook["clientConfig"]["service"];
            assert_eq!(svc["name"], arg("--service"), "{kind}");
            // Fail closed, except the cache variables of pods: a pod the webhook could
            // not reach starts without them and compiles its kernels (docs/cache-hits.md).
            let policy = if hook["name"] == "pod-env.gkm.io" {
                "Ignore"
            } else {
                "Fail"
            };
            assert_eq!(hook["failurePolicy"], policy, "{kind} {}", hook["name"]);
            // Only the paths gkm-controller serves (controller/src/webhook/server.rs).
            assert!(
                [
                    "/mutate",
                    "/validate",
                    "/validate-pods",
                    "/pin-pods",
                    "/mutate-pods"
                ]
                .contains(&svc["path"].as_str().unwrap_or("")),
                "{kind} {}: path {}",
                hook["name"],
                svc["path"]
            );
        }
    }
    // Pinning a pod to the verified digest is a security decision: its own fail-closed
    // mutating webhook (not the Ignore one of the cache variables), for the same pods as
    // the Pod policy's validating webhook.
    let hook = |kind: &str, name: &str| {
        find(kind)[0]["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("{kind} has no {name}"))
            .clone()
    };
    let pin = hook("MutatingWebhookConfiguration", "pod-pin.gkm.io");
    let pods = hook("ValidatingWebhookConfiguration", "pods.gkm.io");
    assert_eq!(pin["clientConfig"]["service"]["path"], "/pin-pods");
    assert_eq!(pin["failurePolicy"], "Fail");
    assert_eq!(pin["namespaceSelector"], pods["namespaceSelector"]);
    assert_eq!(pin["rules"], pods["rules"]);
    // The controller's role: the one bound to the Deployment's service account.
    let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let role = cluster_role_of(&objects, "gkm-system", sa);
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

/// The ClusterRole bound (by a ClusterRoleBinding) to the service account `namespace/name`.
fn cluster_role_of<'a>(objects: &'a [Value], namespace: &str, name: &str) -> &'a Value {
    let bindings: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding")
        .filter(|b| {
            b["subjects"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == name
                        && s["namespace"] == namespace
                })
            })
        })
        .collect();
    assert_eq!(
        bindings.len(),
        1,
        "one ClusterRoleBinding for the service account {namespace}/{name}"
    );
    let role_ref = &bindings[0]["roleRef"];
    assert_eq!(role_ref["kind"], "ClusterRole");
    objects
        .iter()
        .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == role_ref["name"])
        .unwrap_or_else(|| panic!("no ClusterRole {}", role_ref["name"]))
}

/// Flags the agent gained with its health endpoints and pull policy. Where the agent does
/// not (yet) read the variable, the DaemonSet must still say the documented default.
const DOCUMENTED_DEFAULTS: [(&str, &str); 2] = [
    ("GKM_HEALTH_ADDR", "0.0.0.0:9810"),
    ("GKM_PULL_POLICY", "on-demand"),
];

/// Variables the agent does not read: the NVIDIA container toolkit does.
const FOR_THE_NVIDIA_TOOLKIT: [&str; 2] = ["NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"];

struct Pod<'a> {
    spec: &'a Value,
}

impl<'a> Pod<'a> {
    fn container(&self, name: &str) -> &'a Value {
        self.spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// The volume whose hostPath is `path`.
    fn host_path_volume(&self, path: &Path) -> &'a Value {
        self.spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["hostPath"]["path"].as_str().map(Path::new) == Some(path))
            .unwrap_or_else(|| panic!("no hostPath volume for {}", path.display()))
    }

    /// `container`'s mount of the hostPath `path`.
    fn mount_of(&self, container: &'a Value, path: &Path) -> &'a Value {
        let volume = &self.host_path_volume(path)["name"];
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| &m["name"] == volume)
            .unwrap_or_else(|| {
                panic!(
                    "{} does not mount {} (volume {volume})",
                    container["name"],
                    path.display()
                )
            })
    }

    fn mount_path_of(&self, container: &'a Value, path: &Path) -> PathBuf {
        PathBuf::from(
            self.mount_of(container, path)["mountPath"]
                .as_str()
                .unwrap(),
        )
    }
}

fn arg_value<'a>(container: &'a Value, flag: &str) -> &'a str {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().unwrap().strip_prefix(&format!("{flag}=")))
        .unwrap_or_else(|| panic!("{flag} not in {}", container["args"]))
}

/// The container port a probe (or anything naming a port by name or number) reaches.
fn port_number(pod: &Pod, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().unwrap();
    pod.spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_agent_daemonset_matches_the_agent_defaults() {
    let objects = rendered();
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "gkm-agent")
        .expect("the gkm-agent DaemonSet");
    let pod = Pod {
        spec: &ds["spec"]["template"]["spec"],
    };
    let agent = pod.container("agent");
    let registrar = pod.container("node-driver-registrar");
    let probe = pod.container("livenessprobe");

    let defaults = AgentArgs::try_parse_from(["gkm-agent", "--node-name=n"])
        .unwrap()
        .check()
        .unwrap();
    let default_socket = Path::new(DEFAULT_SOCKET);
    assert_eq!(defaults.socket, default_socket);

    // The agent as the DaemonSet configures it: every variable set on the container is one
    // the agent reads, and parses through the agent's own flags.
    let command = AgentArgs::command();
    let flag_of_env: HashMap<String, &clap::Arg> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a)))
        .collect();
    let mut args = vec!["gkm-agent".to_string()];
    let mut env = HashMap::new();
    for e in agent["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if name == "NODE_NAME" {
            assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
            args.push("--node-name=n".into());
            continue;
        }
        let value = e["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has a literal value"));
        env.insert(name, value);
        if FOR_THE_NVIDIA_TOOLKIT.contains(&name) {
            continue;
        }
        match flag_of_env.get(name) {
            // A switch (--log-json) reads its variable as clap's env does: anything but a
            // "false"-like word turns it on.
            Some(arg) if !arg.get_action().takes_values() => {
                let off = ["", "0", "n", "no", "f", "false", "off"];
                if !off.contains(&value.to_ascii_lowercase().as_str()) {
                    args.push(format!("--{}", arg.get_long().unwrap()));
                }
            }
            Some(arg) => args.push(format!("--{}={value}", arg.get_long().unwrap())),
            None => assert!(
                DOCUMENTED_DEFAULTS.iter().any(|(n, _)| *n == name),
                "the DaemonSet sets {name}, which gkm-agent does not read"
            ),
        }
    }
    for (name, default) in DOCUMENTED_DEFAULTS {
        assert_eq!(env.get(name), Some(&default), "{name}");
        if let Some(arg) = flag_of_env.get(name) {
            let agent_default: Vec<_> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(agent_default, [default], "the agent's default for {name}");
        }
    }
    assert_eq!(env.get("NVIDIA_VISIBLE_DEVICES"), Some(&"all"));
    assert_eq!(env.get("NVIDIA_DRIVER_CAPABILITIES"), Some(&"utility"));
    let configured = AgentArgs::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .check()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));

    // The socket: kubelet is told the default path on the host; the agent listens in its
    // mount of that path's directory; the sidecars reach it through theirs.
    assert_eq!(
        arg_value(registrar, "--kubelet-registration-path"),
        DEFAULT_SOCKET
    );
    let plugin_dir = default_socket.parent().unwrap();
    assert_eq!(
        plugin_dir.file_name().unwrap().to_str(),
        Some(DRIVER_NAME),
        "the plugin directory is named after the driver"
    );
    let socket_name = default_socket.file_name().unwrap();
    let in_agent = pod.mount_path_of(agent, plugin_dir);
    assert_eq!(
        configured.socket,
        in_agent.join(socket_name),
        "CSI_ENDPOINT"
    );
    for sidecar in [registrar, probe] {
        let csi_address = PathBuf::from(arg_value(sidecar, "--csi-address"));
        assert_eq!(
            csi_address,
            pod.mount_path_of(sidecar, plugin_dir).join(socket_name),
            "{}",
            sidecar["name"]
        );
    }

    // kubelet's registration directory, beside its plugins directory.
    let plugins = plugin_dir.parent().unwrap();
    assert_eq!(plugins.file_name().unwrap(), "plugins");
    let kubelet_root = plugins.parent().unwrap();
    assert_eq!(
        pod.mount_path_of(registrar, &kubelet_root.join("plugins_registry")),
        Path::new("/registration")
    );

    // The pods directory, at the same path (kubelet names target paths on the host) and
    // Bidirectional, so the agent's mounts reach the host. Only a privileged container may
    // have that, and only the agent is privileged.
    let pods_dir = kubelet_root.join("pods");
    assert_eq!(pod.mount_path_of(agent, &pods_dir), pods_dir);
    assert_eq!(
        pod.mount_of(agent, &pods_dir)["mountPropagation"],
        "Bidirectional"
    );
    assert_eq!(agent["securityContext"]["privileged"], true);
    for sidecar in [registrar, probe] {
        assert_ne!(sidecar["securityContext"]["privileged"], true);
        assert_eq!(
            sidecar["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        for m in sidecar["volumeMounts"].as_array().unwrap() {
            assert_ne!(
                m["mountPropagation"], "Bidirectional",
                "{}",
                sidecar["name"]
            );
        }
    }

    // The store: the agent's default root, the same path on the host and in the container
    // (records and logs name store paths), and what the agent is configured with.
    let store = &defaults.store_root;
    assert_eq!(pod.mount_path_of(agent, store), *store);
    assert_eq!(
        pod.host_path_volume(store)["hostPath"]["type"],
        "DirectoryOrCreate"
    );
    assert_eq!(configured.store_root, *store);
    if let Some(root) = env.get("GKM_STORE_ROOT") {
        assert_eq!(Path::new(root), store);
    }

    // sysfs for the AMD KFD topology: the container's own /sys, or the host's mounted
    // read-only where GKM_SYSFS_ROOT points.
    let sysfs = Path::new(gkm::gpu::DEFAULT_SYSFS_ROOT);
    if configured.sysfs_root != sysfs {
        assert_eq!(pod.mount_path_of(agent, sysfs), configured.sysfs_root);
        assert_eq!(pod.mount_of(agent, sysfs)["readOnly"], true);
    }

    // Health: readiness from the agent's own /readyz (GKM_HEALTH_ADDR's port), liveness
    // from the livenessprobe sidecar's /healthz (CSI Probe over the socket).
    let health_port: u64 = env["GKM_HEALTH_ADDR"]
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let readiness = &agent["readinessProbe"]["httpGet"];
    assert_eq!(readiness["path"], "/readyz");
    assert_eq!(port_number(&pod, &readiness["port"]), health_port);
    let liveness = &agent["livenessProbe"]["httpGet"];
    assert_eq!(liveness["path"], "/healthz");
    let probe_port: u64 = arg_value(probe, "--health-port").parse().unwrap();
    assert_eq!(port_number(&pod, &liveness["port"]), probe_port);
    assert_ne!(probe_port, health_port);

    // The CSIDriver, as DESIGN.md fixes it.
    let driver = objects
        .iter()
        .find(|o| o["kind"] == "CSIDriver")
        .expect("a CSIDriver");
    assert_eq!(driver["metadata"]["name"], DRIVER_NAME);
    let spec = &driver["spec"];
    assert_eq!(spec["attachRequired"], false);
    assert_eq!(spec["podInfoOnMount"], true);
    assert_eq!(
        spec["volumeLifecycleModes"],
        serde_json::json!(["Ephemeral"])
    );
    assert_eq!(spec["fsGroupPolicy"], "None");
    assert_ne!(spec["requiresRepublish"], true);

    // Identity: the DaemonSet's service account exists beside it and is bound to a role
    // that can read caches and write node objects, and nothing about caches themselves.
    let namespace = ds["metadata"]["namespace"].as_str().unwrap();
    let sa = pod.spec["serviceAccountName"].as_str().unwrap();
    assert!(
        objects.iter().any(|o| o["kind"] == "ServiceAccount"
            && o["metadata"]["name"] == sa
            && o["metadata"]["namespace"] == namespace),
        "ServiceAccount {namespace}/{sa}"
    );
    let role = cluster_role_of(&objects, namespace, sa);
    let grants = |resource: &str, verb: &str| {
        role["rules"].as_array().unwrap().iter().any(|r| {
            r["apiGroups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == "gkm.io")
                && r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == resource)
                && r["verbs"].as_array().unwrap().iter().any(|v| v == verb)
        })
    };
    for resource in ["gkmcaches", "clustergkmcaches"] {
        assert!(grants(resource, "watch"), "{resource}");
        for sub in ["", "/status"] {
            for verb in ["create", "update", "patch", "delete", "*"] {
                assert!(
                    !grants(&format!("{resource}{sub}"), verb),
                    "{verb} {resource}{sub}"
                );
            }
        }
    }
    for resource in ["gkmcachenodes/status", "clustergkmcachenodes/status"] {
        assert!(grants(resource, "patch"), "{resource}");
    }

    // Both workloads run the one gkm image, rewritten by the kustomization.
    let controller = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(
        agent["image"],
        controller["spec"]["template"]["spec"]["containers"][0]["image"]
    );
}
