//! Where the pod sees its volume. A CSI publish names a target path on the node, never the
//! path inside the container; but a Triton cache only hits at the path its group files
//! name (see [`crate::kernel_cache::view`]). Kubelet passes the pod's name, namespace and
//! uid (the `CSIDriver` sets `podInfoOnMount`), and the target path names the pod's volume
//! (`.../pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`), so the plugin reads the
//! pod's `volumeMounts` of that volume from a [`PodSource`] (the agent's watch of this
//! node's pods) and decides, with [`decide`], the one path to rewrite the group files for.

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::Mutex;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;

use super::DRIVER_NAME;
pub use crate::api::PodRef;
use crate::kernel_cache::MountBase;

/// One `volumeMounts` entry of a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeMountInfo {
    pub volume: String,
    pub mount_path: String,
    pub sub_path: String,
    /// `subPathExpr` is set: the sub-path depends on the container's environment.
    pub sub_path_expr: bool,
}

/// A pod as far as mount paths go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMounts {
    pub uid: String,
    /// The pod's volumes: name → CSI driver (empty for volumes of other types).
    pub volumes: Vec<(String, String)>,
    /// Init and app containers in spec order: (`initContainers[0] "setup"`, mounts).
    pub containers: Vec<(String, Vec<VolumeMountInfo>)>,
}

impl PodMounts {
    /// Reads what matters of a Pod object. Ephemeral containers are left out: they are
    /// added to running pods, after the volume was published.
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let volumes = spec
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .map(|v| {
                (
                    v.name.clone(),
                    v.csi.as_ref().map(|c| c.driver.clone()).unwrap_or_default(),
                )
            })
            .collect();
        let mut containers = Vec::new();
        if let Some(spec) = spec {
            let lists = [
                (
                    "initContainers",
                    spec.init_containers.as_deref().unwrap_or(&[]),
                ),
                ("containers", spec.containers.as_slice()),
            ];
            for (list, cs) in lists {
                for (i, c) in cs.iter().enumerate() {
                    let mounts = c
                        .volume_mounts
                        .iter()
                        .flatten()
                        .map(|m| VolumeMountInfo {
                            volume: m.name.clone(),
                            mount_path: m.mount_path.clone(),
                            sub_path: m.sub_path.clone().unwrap_or_default(),
                            sub_path_expr: m
                                .sub_path_expr
                                .as_deref()
                                .is_some_and(|e| !e.is_empty()),
                        })
                        .collect();
                    containers.push((format!("{list}[{i}] {:?}", c.name), mounts));
                }
            }
        }
        PodMounts {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            volumes,
            containers,
        }
    }
}

/// Where the plugin finds pods.
pub trait PodSource: Send + Sync + 'static {
    /// The pod, `Ok(None)` when it is not (or no longer) there, or why it cannot be known.
    fn lookup<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Option<PodMounts>, String>>;
}

/// A fixed table of pods, for tests.
#[derive(Default)]
pub struct StaticPods(pub Mutex<HashMap<(String, String), PodMounts>>);

impl StaticPods {
    pub fn insert(&self, namespace: &str, name: &str, pod: PodMounts) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.into(), name.into()), pod);
    }
}

impl PodSource for StaticPods {
    fn lookup<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Option<PodMounts>, String>> {
        let found = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pod.namespace.clone(), pod.name.clone()))
            .cloned();
        Box::pin(async move { Ok(found) })
    }
}

/// The pod volume a kubelet target path belongs to:
/// `<kubelet root>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount` (kubelet's
/// `csi_mounter.go`). `None` for any other shape, or another pod's uid.
pub fn volume_of_target(target: &Path, pod_uid: &str) -> Option<String> {
    // Any component but the root and plain names (`..`, `.`) makes the path name
    // something else than it spells: no volume.
    let mut parts = Vec::new();
    for c in target.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => parts.push(s.to_str()?),
            _ => return None,
        }
    }
    match parts.as_slice() {
        [
            ..,
            "pods",
            uid,
            "volumes",
            "kubernetes.io~csi",
            volume,
            "mount",
        ] if pod_uid.is_empty() || *uid == pod_uid => Some(volume.to_string()),
        _ => None,
    }
}

/// What [`decide`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathDecision {
    /// The path to rewrite group files for, if one is known.
    pub base: Option<MountBase>,
    /// Why some or all containers will miss, in words; `None` when every container that
    /// mounts the volume sees it at `base`.
    pub warning: Option<String>,
}

/// Chooses where the group files must point, from the pod's `volumeMounts` of the volume
/// `volume` (or, when the target path did not name it, of the pod's one `csi.gkm.io`
/// volume). Containers that mount it at different paths cannot all hit: the path most of
/// them use wins (the first in spec order on a tie) and the warning names the others. A
/// `subPathExpr` mount cannot be predicted and is named too.
pub fn decide(pod: &PodMounts, volume: Option<&str>) -> PathDecision {
    let none = |warning: String| PathDecision {
        base: None,
        warning: Some(warning),
    };
    let volume = match volume {
        Some(v) => v.to_string(),
        None => {
            let ours: Vec<&str> = pod
                .volumes
                .iter()
                .filter(|(_, d)| d == DRIVER_NAME)
                .map(|(n, _)| n.as_str())
                .collect();
            match ours.as_slice() {
                [one] => one.to_string(),
                _ => {
                    return none(format!(
                        "cannot tell which of the pod's {} {DRIVER_NAME} volumes this is",
                        ours.len()
                    ));
                }
            }
        }
    };
    let mut bases: Vec<(MountBase, Vec<&str>)> = Vec::new();
    let mut unpredictable = Vec::new();
    for (container, mounts) in &pod.containers {
        for m in mounts.iter().filter(|m| m.volume == volume) {
            if m.sub_path_expr {
                unpredictable.push(container.as_str());
                continue;
            }
            let base = MountBase {
                path: m.mount_path.clone(),
                sub_path: m.sub_path.clone(),
            };
            match bases.iter_mut().find(|(b, _)| *b == base) {
                Some((_, cs)) => cs.push(container),
                None => bases.push((base, vec![container])),
            }
        }
    }
    let mut warning = Vec::new();
    if !unpredictable.is_empty() {
        warning.push(format!(
            "{} mount(s) volume {volume:?} with subPathExpr, whose path GKM cannot know: a kernel the cache holds is compiled again there",
            unpredictable.join(", ")
        ));
    }
    // Most containers first; a stable sort keeps spec order among equals.
    bases.sort_by_key(|(_, cs)| std::cmp::Reverse(cs.len()));
    let base = bases.first().map(|(b, _)| b.clone());
    if let Some((chosen, _)) = bases.first()
        && bases.len() > 1
    {
        let others: Vec<String> = bases[1..]
            .iter()
            .map(|(b, cs)| format!("{} at {b}", cs.join(", ")))
            .collect();
        warning.push(format!(
            "containers mount volume {volume:?} at different paths; its kernels are found at {chosen} only, and {} compile them again",
            others.join("; ")
        ));
    }
    PathDecision {
        base,
        warning: (!warning.is_empty()).then(|| warning.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(volume: &str, path: &str) -> VolumeMountInfo {
        VolumeMountInfo {
            volume: volume.into(),
            mount_path: path.into(),
            ..Default::default()
        }
    }

    fn pod(containers: Vec<(&str, Vec<VolumeMountInfo>)>) -> PodMounts {
        PodMounts {
            uid: "u1".into(),
            volumes: vec![
                ("kernels".into(), DRIVER_NAME.into()),
                ("data".into(), String::new()),
            ],
            containers: containers
                .into_iter()
                .map(|(c, m)| (c.to_string(), m))
                .collect(),
        }
    }

    #[test]
    fn the_target_path_names_the_volume_of_that_pod_only() {
        let t = Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/kernels/mount");
        assert_eq!(volume_of_target(t, "u1").as_deref(), Some("kernels"));
        assert_eq!(volume_of_target(t, "").as_deref(), Some("kernels"));
        assert_eq!(volume_of_target(t, "u2"), None);
        assert_eq!(
            volume_of_target(Path::new("/tmp/csi-sanity/target"), "u1"),
            None
        );
    }

    #[test]
    fn one_path_for_every_container_is_chosen_without_a_warning() {
        let p = pod(vec![
            (
                "containers[0] \"a\"",
                vec![mount("kernels", "/cache"), mount("data", "/d")],
            ),
            ("containers[1] \"b\"", vec![mount("kernels", "/cache")]),
        ]);
        let d = decide(&p, Some("kernels"));
        assert_eq!(d.base, Some(MountBase::at("/cache")));
        assert_eq!(d.warning, None);
        assert_eq!(
            decide(&p, None).base,
            Some(MountBase::at("/cache")),
            "the one gkm volume"
        );
    }

    #[test]
    fn different_paths_choose_the_most_used_and_name_the_others() {
        let p = pod(vec![
            ("containers[0] \"a\"", vec![mount("kernels", "/x")]),
            ("containers[1] \"b\"", vec![mount("kernels", "/cache")]),
            ("containers[2] \"c\"", vec![mount("kernels", "/cache")]),
        ]);
        let d = decide(&p, Some("kernels"));
        assert_eq!(d.base, Some(MountBase::at("/cache")));
        let w = d.warning.unwrap();
        assert!(w.contains("containers[0] \"a\" at /x"), "{w}");
        let tie = pod(vec![
            ("containers[0] \"a\"", vec![mount("kernels", "/x")]),
            ("containers[1] \"b\"", vec![mount("kernels", "/y")]),
        ]);
        assert_eq!(
            decide(&tie, Some("kernels")).base,
            Some(MountBase::at("/x"))
        );
    }

    #[test]
    fn sub_paths_are_kept_and_sub_path_exprs_warned_about() {
        let mut m = mount("kernels", "/tc");
        m.sub_path = "triton".into();
        let mut e = mount("kernels", "/e");
        e.sub_path_expr = true;
        let p = pod(vec![
            ("containers[0] \"a\"", vec![m]),
            ("containers[1] \"b\"", vec![e]),
        ]);
        let d = decide(&p, Some("kernels"));
        assert_eq!(d.base.unwrap().sub_path, "triton");
        assert!(d.warning.unwrap().contains("subPathExpr"));
    }

    #[test]
    fn a_volume_no_container_mounts_needs_no_path() {
        let p = pod(vec![("containers[0] \"a\"", vec![mount("data", "/d")])]);
        assert_eq!(
            decide(&p, Some("kernels")),
            PathDecision {
                base: None,
                warning: None
            }
        );
        let mut two = p.clone();
        two.volumes.push(("more".into(), DRIVER_NAME.into()));
        assert!(
            decide(&two, None)
                .warning
                .unwrap()
                .contains("2 csi.gkm.io volumes")
        );
    }
}
