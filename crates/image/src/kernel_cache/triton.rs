//! Triton's cache format, as `triton.runtime.cache.FileCacheManager` writes it (Triton 3.x):
//!
//! - one folder per kernel compilation, named by the base32 of its cache key;
//! - in it, one file per compilation stage (`<name>.ttir`, `.ttgir`, `.llir`, `.ptx`,
//!   `.cubin`, or `.amdgcn`/`.hsaco` for AMD), the kernel metadata `<name>.json` (with
//!   `target: {backend, arch, warp_size}` and `triton_version`), and the group file
//!   `__grp__<name>.json`: `{"child_paths": {"<file>": "<absolute path>", ...}}`;
//! - driver helper folders holding one shared object each (`cuda_utils.<abi>.so`,
//!   `__triton_launcher.<abi>.so`), `dlopen`ed from the cache by the running process.
//!
//! A lookup (`FileCacheManager.get_group`) keeps only the children whose absolute path
//! exists, and `triton.compile` counts a hit only when the metadata child is among them. So
//! the absolute paths in group files decide whether a cache hits at a given path: that is
//! why [`super::view`] rewrites them for the pod's mount path.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::api::GpuBackend;
use crate::gpu::compat::{CacheTarget, normalize_arch};

/// The prefix of a group file's name: `__grp__<kernel>.json`.
pub const GROUP_PREFIX: &str = "__grp__";

/// Largest group or metadata file GKM reads (Triton's are a few KiB).
pub const MAX_JSON_BYTES: u64 = 4 << 20;

/// Whether `name` is a group file's name.
pub fn is_group_file(name: &str) -> bool {
    name.starts_with(GROUP_PREFIX) && name.ends_with(".json")
}

/// A kernel's metadata (`<kernel>.json`), as far as GKM reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelMetadata {
    pub name: Option<String>,
    pub hash: Option<String>,
    pub target: CacheTarget,
    /// `triton_version`, written by Triton 3.x; absent in older caches, and left out when
    /// it is not a plain version (letters, digits, `.+-_!`), which could not be listed in
    /// the comma-separated `triton-versions` label.
    pub triton_version: Option<String>,
    pub ptx_version: Option<u64>,
    pub num_warps: Option<u64>,
    pub num_stages: Option<u64>,
    pub debug: Option<bool>,
}

impl KernelMetadata {
    /// Reads `bytes` as kernel metadata: `Ok(None)` when it is some other JSON (or not JSON,
    /// or no `target` object with a `backend`); `Err(reason)` when it is kernel metadata
    /// whose target GKM cannot use (another backend, no arch, no warp size).
    pub fn parse(bytes: &[u8]) -> Result<Option<Self>, String> {
        let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
            return Ok(None);
        };
        let Some(target) = v.get("target").and_then(Value::as_object) else {
            return Ok(None);
        };
        let Some(backend) = target.get("backend") else {
            return Ok(None);
        };
        let backend = backend
            .as_str()
            .ok_or_else(|| "target.backend is not a string".to_string())
            .and_then(parse_backend)?;
        // An arch that normalises to nothing (`:xnack-`, `sm_`) would be written into the
        // summary label as "", which every node refuses to read.
        let arch = match target.get("arch") {
            Some(Value::String(a)) => normalize_arch(a),
            Some(Value::Number(n)) if n.is_u64() => n.to_string(),
            _ => String::new(),
        };
        if arch.is_empty() {
            return Err("target.arch is neither a name nor a number".into());
        }
        let warp_size = target
            .get("warp_size")
            .and_then(Value::as_u64)
            .and_then(|w| u32::try_from(w).ok())
            .filter(|w| *w > 0)
            .ok_or_else(|| "target.warp_size is not a positive number".to_string())?;
        let str_field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let num_field = |k: &str| v.get(k).and_then(Value::as_u64);
        Ok(Some(KernelMetadata {
            name: str_field("name"),
            hash: str_field("hash"),
            target: CacheTarget {
                backend,
                arch,
                warp_size,
            },
            triton_version: str_field("triton_version").filter(|v| is_plain_version(v)),
            ptx_version: num_field("ptx_version"),
            num_warps: num_field("num_warps"),
            num_stages: num_field("num_stages"),
            debug: v.get("debug").and_then(Value::as_bool),
        }))
    }
}

/// A PEP 440 version's characters only (`3.6.0`, `3.6.0+git1a2b3c`), not empty.
fn is_plain_version(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_' | b'!'))
}

/// `cuda` or `hip`, or why not.
pub fn parse_backend(s: &str) -> Result<GpuBackend, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "cuda" => Ok(GpuBackend::Cuda),
        "hip" => Ok(GpuBackend::Hip),
        other => Err(format!(
            "backend {other:?} is not one GKM can match against GPUs (cuda, hip)"
        )),
    }
}

/// A group file's children: file name → absolute path, or `None` when `bytes` is not a
/// group file (Triton then treats the group as absent too).
pub fn parse_group(bytes: &[u8]) -> Option<BTreeMap<String, String>> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let children = v.get("child_paths")?.as_object()?;
    children
        .iter()
        .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// A group file's bytes, as `FileCacheManager.put_group` writes them.
pub fn group_json(children: &BTreeMap<String, String>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "child_paths": children })).expect("JSON into memory")
}

/// The directory a cache was captured at, from one child of a group file: the child's
/// recorded path minus `/<rel_dir>/<file>`, where `rel_dir` is the group file's folder
/// relative to the cache root. `None` when the path does not end that way (the child was
/// not written next to its group file, as Triton always does), or names no file (ends
/// with `/`).
pub fn capture_root(rel_dir: &str, recorded: &str) -> Option<String> {
    let file = recorded.rsplit_once('/')?.1;
    if file.is_empty() {
        return None;
    }
    let suffix = if rel_dir.is_empty() {
        format!("/{file}")
    } else {
        format!("/{rel_dir}/{file}")
    };
    let root = recorded.strip_suffix(&suffix)?;
    Some(if root.is_empty() { "/" } else { root }.to_string())
}

/// The Python ABI tag of an extension module's file name (`cpython-312-x86_64-linux-gnu`
/// of `__triton_launcher.cpython-312-x86_64-linux-gnu.so`; `abi3` of `x.abi3.so`), the
/// suffix CPython's `EXT_SUFFIX` gives it. `None` for other files: no module name, or a
/// tag of other characters than CPython's tags use (letters, digits, `-`, `_`), which
/// could not be listed in the comma-separated `python-abis` label.
pub fn python_abi(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(".so")?;
    let (module, tag) = stem.split_once('.')?;
    let tag_ok = !tag.is_empty()
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (!module.is_empty() && tag_ok).then_some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_of_triton_3_6_is_read_with_its_version() {
        let m = KernelMetadata::parse(
            br#"{"hash":"49","target":{"backend":"cuda","arch":90,"warp_size":32},"num_warps":4,"triton_version":"3.6.0","name":"add_kernel"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(m.target.arch, "90");
        assert_eq!(m.triton_version.as_deref(), Some("3.6.0"));
        assert_eq!(m.name.as_deref(), Some("add_kernel"));
        let amd = KernelMetadata::parse(
            br#"{"target":{"backend":"hip","arch":"gfx942","warp_size":64}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(amd.target.arch, "gfx942");
        assert_eq!(
            KernelMetadata::parse(b"{\"child_paths\":{}}").unwrap(),
            None
        );
        assert_eq!(KernelMetadata::parse(b"not json").unwrap(), None);
        assert!(
            KernelMetadata::parse(br#"{"target":{"backend":"cuda","arch":90}}"#)
                .unwrap_err()
                .contains("warp_size")
        );
    }

    #[test]
    fn group_files_round_trip_and_other_json_is_not_a_group() {
        let g = parse_group(br#"{"child_paths": {"k.cubin": "/tmp/tc/KEY/k.cubin"}}"#).unwrap();
        assert_eq!(g["k.cubin"], "/tmp/tc/KEY/k.cubin");
        assert_eq!(parse_group(&group_json(&g)).unwrap(), g);
        assert_eq!(parse_group(br#"{"child_paths": {"k": 3}}"#), None);
        assert_eq!(parse_group(br#"{"other": {}}"#), None);
        assert_eq!(parse_group(b"\xff"), None);
    }

    #[test]
    fn the_capture_root_is_the_path_above_the_group_folder() {
        assert_eq!(
            capture_root("KEY", "/tmp/tc/KEY/add.cubin").as_deref(),
            Some("/tmp/tc")
        );
        assert_eq!(
            capture_root("triton/0/KEY", "/tmp/ic/triton/0/KEY/k.json").as_deref(),
            Some("/tmp/ic")
        );
        assert_eq!(capture_root("KEY", "/KEY/a").as_deref(), Some("/"));
        assert_eq!(capture_root("KEY", "/tmp/tc/OTHER/add.cubin"), None);
        assert_eq!(capture_root("KEY", "relative"), None);
    }

    #[test]
    fn python_abi_tags_come_from_extension_file_names() {
        assert_eq!(
            python_abi("__triton_launcher.cpython-312-x86_64-linux-gnu.so"),
            Some("cpython-312-x86_64-linux-gnu")
        );
        assert_eq!(python_abi("x.abi3.so"), Some("abi3"));
        assert_eq!(python_abi("libfoo.so"), None);
        assert_eq!(python_abi("add_kernel.cubin"), None);
    }
}
