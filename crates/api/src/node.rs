//! `GKMCacheNode` and `ClusterGKMCacheNode`: what one node's agent reports.
//!
//! One object per node (named after the node): `ClusterGKMCacheNode` for cluster caches,
//! and a `GKMCacheNode` in each namespace that has caches. Only `status` carries data; the
//! empty `spec` exists because every custom resource has one.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Per-node state of the namespaced caches of one namespace.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "gkm.io",
    version = "v1alpha1",
    kind = "GKMCacheNode",
    plural = "gkmcachenodes",
    shortname = "gkmcn",
    namespaced,
    status = "NodeStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct GKMCacheNodeSpec {}

/// Per-node state of the cluster caches.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "gkm.io",
    version = "v1alpha1",
    kind = "ClusterGKMCacheNode",
    plural = "clustergkmcachenodes",
    shortname = "cgkmcn",
    status = "NodeStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ClusterGKMCacheNodeSpec {}

/// What a node's agent reports: its GPUs, and per cache and digest how far it got.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The Kubernetes node this object describes (also the object's name).
    pub node_name: String,

    /// The node's GPUs, as the agent's inventory found them.
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,

    /// Cache name → digest → state on this node.
    #[serde(default)]
    pub caches: BTreeMap<String, BTreeMap<String, CacheDigestStatus>>,
}

/// One GPU of a node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    /// Index of the device on its node (NVML index, KFD node order, or file order).
    pub index: u32,
    /// Stable identity of the device (`GPU-…` for NVIDIA).
    pub uuid: String,
    /// `nvidia` or `amd`.
    pub vendor: String,
    pub product_name: String,
    pub backend: GpuBackend,
    /// `90` for sm_90 (compute capability major*10+minor); `gfx942` for AMD.
    pub arch: String,
    pub warp_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Where this record came from.
    pub source: GpuSource,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum GpuBackend {
    #[default]
    Cuda,
    Hip,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    Nvml,
    Sysfs,
    /// From a simulated inventory file: no real device stands behind it.
    #[default]
    Simulated,
}

/// The state of one digest of one cache on one node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheDigestStatus {
    pub state: CacheState,
    /// UUIDs of this node's GPUs that the cache's targets match.
    #[serde(default, rename = "compatibleGPUs")]
    pub compatible_gpus: Vec<String>,
    /// UUIDs of this node's GPUs that no target of the cache matches.
    #[serde(default, rename = "incompatibleGPUs")]
    pub incompatible_gpus: Vec<String>,
    /// Why each incompatible GPU does not match, or what went wrong, in words.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// Bytes of the extracted tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// While `Pulling`: bytes of the image's layers received so far (as the registry
    /// sends them, compressed), of `pullTotalBytes`. Refreshed every few seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled_bytes: Option<i64>,
    /// While `Pulling`: the layers' total size from the image manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_total_bytes: Option<i64>,
    /// `namespace/name` of the pods that mount this digest on this node, one per pod.
    #[serde(default)]
    pub pods: Vec<String>,
    /// The same pods with their uids (two pods of one name are two entries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_refs: Vec<PodRef>,
    /// Volumes of this cache and digest published on this node so far (one per pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_served: Option<i64>,
    /// Cache entries (kernels and launchers) that pods on this node compiled themselves
    /// because the cache did not hold them: the cache missed. Zero for a cache that hits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels_compiled: Option<i64>,
    /// The last miss, in words: the pod, how many entries it compiled, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_miss: Option<String>,
    /// The Triton versions of the cache's kernels (image label `triton-versions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triton_versions: Vec<String>,
    /// The Python ABI tags of the cache's launchers (image label `python-abis`).
    #[serde(default, rename = "pythonABIs", skip_serializing_if = "Vec::is_empty")]
    pub python_abis: Vec<String>,
    /// Where the cache was captured (image label `capture-path`); pods may mount it
    /// anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<Time>,
}

/// A pod, by namespace, name and uid (empty when unknown, as kubelet passes it in a CSI
/// publish only with `podInfoOnMount`).
#[derive(
    Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    /// `namespace/name`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum CacheState {
    /// Known to the agent, nothing done yet.
    #[default]
    Pending,
    Pulling,
    /// Extracted into the node's store and compatible with at least one GPU.
    Extracted,
    /// Mounted into at least one pod.
    InUse,
    /// No GPU of this node matches any target of the cache.
    Incompatible,
    /// A newer digest exists for the cache, but pods still use this one.
    Outdated,
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_status_uses_the_documented_field_names() {
        let s = CacheDigestStatus {
            state: CacheState::InUse,
            compatible_gpus: vec!["GPU-1".into()],
            incompatible_gpus: vec!["GPU-2".into()],
            reasons: vec!["GPU-2: arch 80 is not among the targets [90]".into()],
            size_bytes: Some(42),
            pods: vec!["ns/p".into()],
            pods_served: Some(3),
            kernels_compiled: Some(0),
            python_abis: vec!["cpython-312-x86_64-linux-gnu".into()],
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "InUse");
        assert_eq!(v["compatibleGPUs"][0], "GPU-1");
        assert_eq!(v["incompatibleGPUs"][0], "GPU-2");
        assert_eq!(v["sizeBytes"], 42);
        assert_eq!(v["podsServed"], 3);
        assert_eq!(v["kernelsCompiled"], 0);
        assert_eq!(v["pythonABIs"][0], "cpython-312-x86_64-linux-gnu");
    }

    #[test]
    fn gpu_enums_are_lowercase_on_the_wire() {
        let g = GpuInfo {
            backend: GpuBackend::Hip,
            source: GpuSource::Sysfs,
            ..Default::default()
        };
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["backend"], "hip");
        assert_eq!(v["source"], "sysfs");
    }
}
