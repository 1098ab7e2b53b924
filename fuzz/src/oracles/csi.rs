//! CSI request validation (`gkm::csi`): what the node plugin reads from kubelet before it
//! mounts anything. Input: byte 0 chooses what the rest is:
//! - 0: a protobuf `NodePublishVolumeRequest` (`validate_publish`, then the pod volume its
//!   target path names, `volume_of_target`);
//! - 1: a target path and a pod uid, one per line (`validate_target`, `volume_of_target`);
//! - 2: a volume name line (empty: none), then a Pod's JSON (`PodMounts::from_pod`,
//!   `decide`);
//! - 3: volume attributes as a JSON object (`cache_ref_of_attributes`).
//!
//! Checks:
//! - an accepted target path is absolute, not `/`, and has only normal components (no
//!   empty, `.` or `..`), so the mount lands exactly where kubelet asked;
//! - an accepted publish has a volume id, a pod namespace and a non-empty cache name, and
//!   is read-only when CSI's `readonly` or `csi.gkm.io/writable: "false"` says so;
//! - the attributes name a namespaced cache only with a namespace attribute, and never both
//!   kinds at once;
//! - the volume found in a target path that `validate_target` accepts (the only ones the
//!   plugin reads it from) is one plain path component of that path, and belongs to the
//!   pod uid given;
//! - `decide` picks a mount path that some container really mounts the volume at, and
//!   warns whenever a container mounting the volume sees it elsewhere.

use std::collections::HashMap;
use std::path::{Component, Path};

use gkm::api::CacheRef;
use gkm::csi::pods::{PodMounts, decide, volume_of_target};
use gkm::csi::{
    ATTR_CACHE, ATTR_CLUSTER_CACHE, ATTR_NAMESPACE, ATTR_WRITABLE, CTX_POD_NAMESPACE, DRIVER_NAME,
    cache_ref_of_attributes, pb, validate_publish, validate_target,
};
use prost::Message;

use super::fields;

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode & 3 {
        0 => {
            if let Ok(req) = pb::NodePublishVolumeRequest::decode(rest) {
                check_publish(&req);
            }
        }
        1 => {
            let f = fields(rest, 2);
            let text = |i: usize| f.get(i).and_then(|b| std::str::from_utf8(b).ok());
            if let (Some(target), uid) = (text(0), text(1).unwrap_or("")) {
                check_target(target, uid);
            }
        }
        2 => {
            let f = fields(rest, 2);
            let Some(volume) = f.first().and_then(|b| std::str::from_utf8(b).ok()) else {
                return;
            };
            let Some(Ok(pod)) = f.get(1).map(|b| serde_json::from_slice(b)) else {
                return;
            };
            check_decide(
                &PodMounts::from_pod(&pod),
                (!volume.is_empty()).then_some(volume),
            );
        }
        _ => {
            if let Ok(attrs) = serde_json::from_slice::<HashMap<String, String>>(rest) {
                check_attributes(&attrs);
            }
        }
    }
}

fn check_publish(req: &pb::NodePublishVolumeRequest) {
    let Ok(p) = validate_publish(req) else {
        return;
    };
    assert!(!p.volume_id.is_empty());
    assert!(!p.pod_namespace.is_empty());
    assert_eq!(p.pod_namespace, req.volume_context[CTX_POD_NAMESPACE]);
    assert_eq!(
        p.target_path.as_os_str(),
        req.target_path.as_str(),
        "the target path was changed"
    );
    check_normal(&p.target_path);
    assert_eq!(
        Ok(&p.cache),
        cache_ref_of_attributes(&req.volume_context)
            .as_ref()
            .map_err(|_| ())
    );
    let writable_false = req
        .volume_context
        .get(ATTR_WRITABLE)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
    assert_eq!(p.read_only, req.readonly || writable_false, "{req:?}");
    check_target(&req.target_path, &p.pod_uid);
}

fn check_target(target: &str, uid: &str) {
    if let Ok(p) = validate_target(target) {
        assert_eq!(p.as_os_str(), target);
        check_normal(&p);
    }
    // The plugin reads the volume only from a target path `validate_target` accepted.
    let volume = volume_of_target(Path::new(target), uid);
    if let (Some(volume), Ok(_)) = (volume, validate_target(target)) {
        assert!(
            !volume.is_empty() && !volume.contains('/') && volume != "." && volume != "..",
            "{target:?} → volume {volume:?}"
        );
        let tail = format!("/volumes/kubernetes.io~csi/{volume}/mount");
        let normalised: Vec<_> = Path::new(target).components().collect();
        let rebuilt: std::path::PathBuf = normalised.iter().collect();
        assert!(
            rebuilt.to_string_lossy().ends_with(&tail),
            "{target:?} → volume {volume:?}"
        );
        if !uid.is_empty() {
            assert!(
                rebuilt
                    .to_string_lossy()
                    .ends_with(&format!("/pods/{uid}{tail}")),
                "{target:?} → volume {volume:?} of another pod than {uid:?}"
            );
        }
    }
}

/// Absolute, below `/`, and only normal components.
fn check_normal(p: &Path) {
    let mut c = p.components();
    assert_eq!(c.next(), Some(Component::RootDir), "{p:?}");
    let rest: Vec<_> = c.collect();
    assert!(!rest.is_empty(), "{p:?} is the root");
    assert!(
        rest.iter().all(|c| matches!(c, Component::Normal(_))),
        "{p:?} has a component that is not a name"
    );
    let s = p.to_string_lossy();
    assert!(
        !s.contains("//") && !s.ends_with('/') && !s.contains("/./"),
        "{s:?}"
    );
}

fn check_attributes(attrs: &HashMap<String, String>) {
    let set = |k: &str| attrs.get(k).is_some_and(|v| !v.is_empty());
    match cache_ref_of_attributes(attrs) {
        Ok(CacheRef::Namespaced { namespace, name }) => {
            assert!(set(ATTR_NAMESPACE) && set(ATTR_CACHE) && !set(ATTR_CLUSTER_CACHE));
            assert_eq!(
                (&namespace, &name),
                (&attrs[ATTR_NAMESPACE], &attrs[ATTR_CACHE])
            );
        }
        Ok(CacheRef::Cluster { name }) => {
            assert!(!set(ATTR_NAMESPACE));
            assert!(set(ATTR_CACHE) != set(ATTR_CLUSTER_CACHE), "{attrs:?}");
            assert!(!name.is_empty());
        }
        Err(_) => {}
    }
}

fn check_decide(pod: &PodMounts, volume: Option<&str>) {
    let d = decide(pod, volume);
    let ours: Vec<&str> = pod
        .volumes
        .iter()
        .filter(|(_, driver)| driver == DRIVER_NAME)
        .map(|(n, _)| n.as_str())
        .collect();
    let Some(volume) = volume.or(match ours.as_slice() {
        [one] => Some(*one),
        _ => None,
    }) else {
        assert_eq!(d.base, None, "a base without knowing the volume: {d:?}");
        assert!(d.warning.is_some());
        return;
    };
    let mounts: Vec<_> = pod
        .containers
        .iter()
        .flat_map(|(_, ms)| ms.iter())
        .filter(|m| m.volume == volume)
        .collect();
    if let Some(base) = &d.base {
        assert!(
            mounts.iter().any(|m| !m.sub_path_expr
                && m.mount_path == base.path
                && m.sub_path == base.sub_path),
            "{base:?} is not where any container mounts {volume:?}: {pod:?}"
        );
    }
    if d.warning.is_none() {
        for m in &mounts {
            assert!(
                !m.sub_path_expr,
                "no warning for a subPathExpr mount: {pod:?}"
            );
            let base = d.base.as_ref().expect("a base when nothing is wrong");
            assert!(
                m.mount_path == base.path && m.sub_path == base.sub_path,
                "no warning, but {m:?} is not at {base:?}"
            );
        }
    }
}
