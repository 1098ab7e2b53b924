//! The environment a delivered cache needs (`POST /mutate-pods`): for each container that
//! mounts a `csi.gkm.io` volume, the variable that points its framework at the mount path
//! (`TRITON_CACHE_DIR` for a Triton cache, `TORCHINDUCTOR_CACHE_DIR` for an Inductor one,
//! `VLLM_CACHE_ROOT` for vLLM), unless the container sets it itself; then a warning in the
//! admission response says the cache will not be used. The kind comes from the cache
//! image's labels (`cache.<kind>.image/*`), read by digest, once per digest.
//!
//! Other warnings: a volume whose cache GKM cannot find or has not verified yet, and a
//! volume or mount marked `readOnly` (a kernel the cache lacks then fails to compile with
//! EROFS instead of compiling into the pod's private layer).
//!
//! The webhook is registered with `failurePolicy: Ignore`: a pod it could not reach starts
//! without the variables and compiles its kernels as if it had no cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use gkm_api::CacheRef;
use gkm_api::volume::DRIVER_NAME;
use gkm_image::kernel_cache::CacheKind;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, Operation};
use serde_json::Value;
use tracing::info;

use super::Decision;

/// Where the webhook learns a cache's kind.
pub trait CacheKindSource: Send + Sync + 'static {
    /// The kind of the cache `key` names, or why it cannot be known, in words naming it.
    fn kind<'a>(&'a self, key: &'a CacheRef) -> BoxFuture<'a, Result<CacheKind, String>>;
}

/// One `csi.gkm.io` volume of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheVolume {
    pub name: String,
    /// The cache its attributes name, or why they name none.
    pub cache: Result<CacheRef, String>,
    /// `csi.readOnly: true`.
    pub read_only: bool,
}

/// The `csi.gkm.io` volumes of a Pod object (its JSON).
pub fn cache_volumes(pod: &Value) -> Vec<CacheVolume> {
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let csi = v.get("csi")?;
            if csi.get("driver").and_then(Value::as_str) != Some(DRIVER_NAME) {
                return None;
            }
            let attrs: HashMap<String, String> = csi
                .get("volumeAttributes")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            Some(CacheVolume {
                name: v.get("name").and_then(Value::as_str)?.to_string(),
                cache: gkm_api::volume::cache_ref_of_attributes(&attrs).map_err(|e| e.to_string()),
                read_only: csi.get("readOnly").and_then(Value::as_bool) == Some(true),
            })
        })
        .collect()
}

/// The JSON patch and warnings for a pod whose `csi.gkm.io` volumes have the given kinds
/// (volume name → kind, or why it is unknown). Pure.
pub fn plan(
    pod: &Value,
    kinds: &HashMap<String, Result<CacheKind, String>>,
) -> (Vec<Value>, Vec<String>) {
    let mut patch = Vec::new();
    let mut warnings = Vec::new();
    for v in cache_volumes(pod) {
        if let Some(Err(why)) = kinds.get(&v.name) {
            warnings.push(format!(
                "volume {:?}: {why}; GKM sets no cache variable for it",
                v.name
            ));
        }
        if v.read_only {
            warnings.push(format!(
                "volume {:?} is readOnly: a kernel its cache lacks fails to compile (EROFS); without readOnly it compiles into the pod's private layer",
                v.name
            ));
        }
    }
    for list in ["initContainers", "containers"] {
        let containers = pod
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (i, c) in containers.iter().enumerate() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            let env: Vec<&Value> = c
                .get("env")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .collect();
            let mut added: Vec<(String, String)> = Vec::new();
            for m in c
                .get("volumeMounts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (Some(vol), Some(path)) = (
                    m.get("name").and_then(Value::as_str),
                    m.get("mountPath").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let Some(Ok(kind)) = kinds.get(vol) else {
                    continue;
                };
                let var = kind.env_var();
                if m.get("readOnly").and_then(Value::as_bool) == Some(true) {
                    warnings.push(format!(
                        "{list}[{i}] {name:?} mounts volume {vol:?} readOnly: a kernel its cache lacks fails to compile (EROFS)"
                    ));
                }
                let own = env
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some(var));
                match own {
                    Some(e) => {
                        let value = e.get("value").and_then(Value::as_str);
                        if value != Some(path) {
                            warnings.push(format!(
                                "{list}[{i}] {name:?} sets {var}={}, but mounts the {kind} cache of volume {vol:?} at {path}: the cache is not used unless {var}={path}",
                                value.map_or("(from a reference)".to_string(), |v| format!("{v:?}")),
                            ));
                        }
                    }
                    None => match added.iter().find(|(v, _)| v == var) {
                        Some((_, first)) if first != path => warnings.push(format!(
                            "{list}[{i}] {name:?} mounts two {kind} caches ({first} and {path}); {var} points at {first}"
                        )),
                        Some(_) => {}
                        None => added.push((var.to_string(), path.to_string())),
                    },
                }
            }
            if added.is_empty() {
                continue;
            }
            let vars: Vec<Value> = added
                .iter()
                .map(|(n, v)| serde_json::json!({"name": n, "value": v}))
                .collect();
            if c.get("env").and_then(Value::as_array).is_some() {
                for v in vars {
                    patch.push(serde_json::json!({
                        "op": "add", "path": format!("/spec/{list}/{i}/env/-"), "value": v,
                    }));
                }
            } else {
                patch.push(serde_json::json!({
                    "op": "add", "path": format!("/spec/{list}/{i}/env"), "value": vars,
                }));
            }
        }
    }
    (patch, warnings)
}

/// The mutating rule for Pods: look up the kind of each cache the pod's volumes name, then
/// [`plan`]. Only CREATE: a pod's environment cannot change afterwards.
pub async fn mutate(
    kinds: Option<&dyn CacheKindSource>,
    req: &AdmissionRequest<DynamicObject>,
) -> Decision {
    let allow = |warnings| Decision::Allow { warnings };
    if req.operation != Operation::Create {
        return allow(Vec::new());
    }
    let Some(pod) = req
        .object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
    else {
        return allow(Vec::new());
    };
    let volumes = cache_volumes(&pod);
    if volumes.is_empty() {
        return allow(Vec::new());
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    let mut found: HashMap<String, Result<CacheKind, String>> = HashMap::new();
    for v in &volumes {
        let kind = match (&v.cache, kinds) {
            (Err(why), _) => Err(why.clone()),
            (Ok(_), None) => Err(
                "the GKM controller runs without API server access and cannot read caches".into(),
            ),
            // The plugin refuses another namespace's cache; say so now.
            (Ok(CacheRef::Namespaced { namespace: ns, .. }), _) if *ns != namespace => {
                Err(format!(
                    "it names a GKMCache of namespace {ns}, and pods may only mount their own namespace's caches"
                ))
            }
            (Ok(key), Some(k)) => k.kind(key).await,
        };
        found.insert(v.name.clone(), kind);
    }
    let (patch, warnings) = plan(&pod, &found);
    if patch.is_empty() {
        return allow(warnings);
    }
    info!(vars = patch.len(), "setting cache variables");
    match serde_json::from_value::<json_patch::Patch>(Value::Array(patch)) {
        Ok(patch) => Decision::Patch { patch, warnings },
        Err(e) => allow(vec![format!("GKM could not build its patch: {e}")]),
    }
}

/// Kinds from the API server (the cache object's verified digest) and the registry (that
/// digest's config labels, remembered per digest: a digest's labels never change).
pub struct ApiCacheKinds {
    pub client: kube::Client,
    pub puller: gkm_image::oci::Puller,
    /// Longest one registry read may take (the webhook's own timeout is longer).
    pub timeout: Duration,
    by_digest: Mutex<HashMap<String, CacheKind>>,
}

impl ApiCacheKinds {
    pub fn new(client: kube::Client, puller: gkm_image::oci::Puller, timeout: Duration) -> Self {
        Self {
            client,
            puller,
            timeout,
            by_digest: Mutex::default(),
        }
    }

    async fn lookup(&self, key: &CacheRef) -> Result<CacheKind, String> {
        use gkm_api::volume::ResolvedCache;
        use gkm_api::{ClusterGKMCache, GKMCache};
        let not_found = || format!("{} {key} not found", key.kind());
        let cache = match key {
            CacheRef::Namespaced { namespace, name } => {
                kube::Api::<GKMCache>::namespaced(self.client.clone(), namespace)
                    .get_opt(name)
                    .await
                    .map_err(|e| format!("reading {} {key}: {e}", key.kind()))?
                    .and_then(|c| ResolvedCache::from_namespaced(&c))
            }
            CacheRef::Cluster { name } => kube::Api::<ClusterGKMCache>::all(self.client.clone())
                .get_opt(name)
                .await
                .map_err(|e| format!("reading {} {key}: {e}", key.kind()))?
                .and_then(|c| ResolvedCache::from_cluster(&c)),
        }
        .ok_or_else(not_found)?;
        let digest = cache
            .digest
            .ok_or_else(|| format!("{} {key} has no verified digest yet", key.kind()))?;
        if let Some(k) = self
            .by_digest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
        {
            return Ok(*k);
        }
        let reference = gkm_image::oci::parse_reference(&cache.image).map_err(|e| e.to_string())?;
        let pinned =
            gkm_image::oci::PinnedRef::new(&reference, &digest).map_err(|e| e.to_string())?;
        let info = tokio::time::timeout(self.timeout, self.puller.resolve(&pinned))
            .await
            .map_err(|_| format!("reading {pinned} timed out after {:?}", self.timeout))?
            .map_err(|e| format!("reading {pinned}: {e}"))?;
        let kind = info.cache_labels().kind.ok_or_else(|| {
            format!(
                "the image of {} {key} carries no cache.<kind>.image labels, so its kind is unknown",
                key.kind()
            )
        })?;
        self.by_digest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, kind);
        Ok(kind)
    }
}

impl CacheKindSource for ApiCacheKinds {
    fn kind<'a>(&'a self, key: &'a CacheRef) -> BoxFuture<'a, Result<CacheKind, String>> {
        Box::pin(self.lookup(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: Value, volumes: Value) -> Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ml"},
            "spec": {"containers": containers, "volumes": volumes},
        })
    }

    fn kernels_volume() -> Value {
        serde_json::json!([{"name": "kernels", "csi": {"driver": "csi.gkm.io",
            "volumeAttributes": {"csi.gkm.io/GKMCache": "llama", "csi.gkm.io/namespace": "ml"}}}])
    }

    fn kinds(k: Result<CacheKind, String>) -> HashMap<String, Result<CacheKind, String>> {
        [("kernels".to_string(), k)].into()
    }

    #[test]
    fn a_container_that_mounts_a_triton_cache_gets_triton_cache_dir_at_its_path() {
        let p = pod(
            serde_json::json!([
                {"name": "app", "volumeMounts": [{"name": "kernels", "mountPath": "/opt/k"}]},
                {"name": "side", "env": [{"name": "X", "value": "1"}],
                 "volumeMounts": [{"name": "kernels", "mountPath": "/k2"}]},
                {"name": "none"},
            ]),
            kernels_volume(),
        );
        let (patch, warnings) = plan(&p, &kinds(Ok(CacheKind::Triton)));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            patch,
            vec![
                serde_json::json!({"op": "add", "path": "/spec/containers/0/env",
                    "value": [{"name": "TRITON_CACHE_DIR", "value": "/opt/k"}]}),
                serde_json::json!({"op": "add", "path": "/spec/containers/1/env/-",
                    "value": {"name": "TRITON_CACHE_DIR", "value": "/k2"}}),
            ]
        );
        let (inductor, _) = plan(&p, &kinds(Ok(CacheKind::Inductor)));
        assert!(inductor[0].to_string().contains("TORCHINDUCTOR_CACHE_DIR"));
    }

    #[test]
    fn a_container_that_sets_its_own_value_is_warned_not_changed() {
        let p = pod(
            serde_json::json!([{"name": "app",
                "env": [{"name": "TRITON_CACHE_DIR", "value": "/root/.triton"}],
                "volumeMounts": [{"name": "kernels", "mountPath": "/cache"}]}]),
            kernels_volume(),
        );
        let (patch, warnings) = plan(&p, &kinds(Ok(CacheKind::Triton)));
        assert!(patch.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("TRITON_CACHE_DIR=\"/root/.triton\"")
                && warnings[0].contains("/cache"),
            "{warnings:?}"
        );
        let same = pod(
            serde_json::json!([{"name": "app",
                "env": [{"name": "TRITON_CACHE_DIR", "value": "/cache"}],
                "volumeMounts": [{"name": "kernels", "mountPath": "/cache"}]}]),
            kernels_volume(),
        );
        assert_eq!(plan(&same, &kinds(Ok(CacheKind::Triton))), (vec![], vec![]));
    }

    #[test]
    fn unknown_caches_and_read_only_volumes_are_warned_about() {
        let mut vols = kernels_volume();
        vols[0]["csi"]["readOnly"] = Value::Bool(true);
        let p = pod(
            serde_json::json!([{"name": "app",
                "volumeMounts": [{"name": "kernels", "mountPath": "/cache", "readOnly": true}]}]),
            vols,
        );
        let (patch, warnings) = plan(&p, &kinds(Err("GKMCache ml/llama not found".into())));
        assert!(patch.is_empty());
        assert!(warnings[0].contains("ml/llama not found"), "{warnings:?}");
        assert!(warnings[1].contains("readOnly"), "{warnings:?}");
        let (_, w) = plan(&p, &kinds(Ok(CacheKind::Triton)));
        assert_eq!(w.len(), 2, "volume and mount readOnly: {w:?}");
    }

    #[test]
    fn other_drivers_and_bad_attributes_are_read_as_such() {
        let vols = serde_json::json!([
            {"name": "a", "csi": {"driver": "other.csi.io"}},
            {"name": "b", "csi": {"driver": "csi.gkm.io", "volumeAttributes": {}}},
            {"name": "c", "emptyDir": {}},
        ]);
        let v = cache_volumes(&pod(serde_json::json!([]), vols));
        assert_eq!(v.len(), 1);
        assert!(v[0].cache.as_ref().unwrap_err().contains("is required"));
    }
}
