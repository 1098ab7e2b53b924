//! What a pod compiled because its cache missed: the Triton entries it wrote into its
//! volume's private layer, and in words why they were not in the cache.
//!
//! A hit writes nothing (Triton only reads a group file and its children), so every group
//! file in a volume's writable layer is one kernel the pod compiled itself, and every
//! extension module (`*.<abi>.so`) one driver helper it built. Their metadata says which
//! Triton and which GPU target made them, which is usually the reason: the pod runs another
//! Triton, another Python, or another GPU than the cache was built with.

use std::collections::BTreeSet;
use std::path::Path;

use super::CacheLabels;
use super::triton::{self, KernelMetadata, MAX_JSON_BYTES};

/// Entries a pod compiled into its layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Kernels (group files).
    pub kernels: u64,
    /// Driver helpers (extension modules).
    pub launchers: u64,
    /// Kernel names, at most [`Compiled::MAX_NAMES`].
    pub names: BTreeSet<String>,
    pub triton_versions: BTreeSet<String>,
    /// `backend:arch:warp`.
    pub targets: BTreeSet<String>,
    pub python_abis: BTreeSet<String>,
}

impl Compiled {
    pub const MAX_NAMES: usize = 5;

    /// Kernels and helpers together: the cache entries the pod compiled.
    pub fn entries(&self) -> u64 {
        self.kernels + self.launchers
    }
}

/// Largest number of directory entries one scan reads; what lies beyond is not counted
/// (a pod that writes millions of files into its cache dir gets a lower bound).
const MAX_SCANNED: usize = 200_000;

/// Scans a volume's writable layer. A layer that does not exist counts nothing. Blocking.
pub fn scan(upper: &Path) -> std::io::Result<Compiled> {
    let mut out = Compiled::default();
    if !upper.is_dir() {
        return Ok(out);
    }
    let mut seen = 0usize;
    let mut stack = vec![upper.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            seen += 1;
            if seen > MAX_SCANNED {
                return Ok(out);
            }
            let ft = e.file_type()?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && triton::is_group_file(name) {
                out.kernels += 1;
                if let Some(m) = metadata_of(&dir, name) {
                    if let Some(n) = m.name.clone()
                        && out.names.len() < Compiled::MAX_NAMES
                    {
                        out.names.insert(n);
                    }
                    if let Some(v) = m.triton_version {
                        out.triton_versions.insert(v);
                    }
                    out.targets.insert(target_string(&m.target));
                }
            } else if ft.is_file()
                && let Some(abi) = triton::python_abi(name)
            {
                out.launchers += 1;
                out.python_abis.insert(abi.to_string());
            }
        }
    }
    Ok(out)
}

/// The metadata of the kernel whose group file `grp` sits in `dir` (`__grp__k.json` names
/// `k.json`, written beside it).
fn metadata_of(dir: &Path, grp: &str) -> Option<KernelMetadata> {
    let meta = dir.join(grp.strip_prefix(triton::GROUP_PREFIX)?);
    let m = std::fs::metadata(&meta).ok()?;
    if !m.is_file() || m.len() > MAX_JSON_BYTES {
        return None;
    }
    KernelMetadata::parse(&std::fs::read(meta).ok()?).ok()?
}

fn target_string(t: &crate::gpu::compat::CacheTarget) -> String {
    format!(
        "{}:{}:{}",
        crate::gpu::backend_name(t.backend),
        t.arch,
        t.warp_size
    )
}

/// Why a pod compiled `c` although it mounted a cache with `labels` and `targets`
/// (`backend:arch:warp`), in one sentence; `None` when it compiled nothing.
pub fn explain(c: &Compiled, labels: &CacheLabels, targets: &BTreeSet<String>) -> Option<String> {
    if c.entries() == 0 {
        return None;
    }
    let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
    let cache_versions: BTreeSet<String> = labels.triton_versions.iter().cloned().collect();
    let cache_abis: BTreeSet<String> = labels.python_abis.iter().cloned().collect();
    let mut why = Vec::new();
    if !c.triton_versions.is_empty()
        && !cache_versions.is_empty()
        && c.triton_versions.is_disjoint(&cache_versions)
    {
        why.push(format!(
            "the pod runs Triton {}, the cache holds kernels of Triton {}",
            list(&c.triton_versions),
            list(&cache_versions)
        ));
    }
    if !c.targets.is_empty() && !targets.is_empty() && c.targets.is_disjoint(targets) {
        why.push(format!(
            "the pod compiled for {}, the cache holds kernels for {}",
            list(&c.targets),
            list(targets)
        ));
    }
    if !c.python_abis.is_empty() && !cache_abis.is_empty() && c.python_abis.is_disjoint(&cache_abis)
    {
        why.push(format!(
            "the pod's Python builds {} launchers, the cache's are {}",
            list(&c.python_abis),
            list(&cache_abis)
        ));
    }
    let what = match (c.kernels, c.launchers) {
        (k, 0) => format!("{k} kernel(s)"),
        (0, l) => format!("{l} launcher(s)"),
        (k, l) => format!("{k} kernel(s) and {l} launcher(s)"),
    };
    let names = if c.names.is_empty() {
        String::new()
    } else {
        format!(" ({})", list(&c.names))
    };
    Some(if why.is_empty() {
        format!(
            "compiled {what}{names} the cache does not hold, with the cache's Triton and target: the pod runs other kernels, shapes or compile options than were captured"
        )
    } else {
        format!("compiled {what}{names}: {}", why.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(upper: &Path, key: &str, name: &str, version: &str, arch: u32) {
        let d = upper.join(key);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("{name}.json")),
            format!(
                r#"{{"name":"{name}","triton_version":"{version}","target":{{"backend":"cuda","arch":{arch},"warp_size":32}}}}"#
            ),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("__grp__{name}.json")),
            b"{\"child_paths\":{}}",
        )
        .unwrap();
    }

    #[test]
    fn an_empty_or_missing_layer_compiled_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(scan(d.path()).unwrap(), Compiled::default());
        assert_eq!(scan(&d.path().join("gone")).unwrap(), Compiled::default());
        assert_eq!(
            explain(
                &Compiled::default(),
                &CacheLabels::default(),
                &BTreeSet::new()
            ),
            None
        );
    }

    #[test]
    fn another_triton_version_is_named_as_the_reason() {
        let d = tempfile::tempdir().unwrap();
        kernel(d.path(), "A", "add_kernel", "3.5.0", 90);
        kernel(d.path(), "B", "softmax", "3.5.0", 90);
        let h = d.path().join("H");
        std::fs::create_dir(&h).unwrap();
        std::fs::write(
            h.join("__triton_launcher.cpython-311-x86_64-linux-gnu.so"),
            b"",
        )
        .unwrap();
        let c = scan(d.path()).unwrap();
        assert_eq!((c.kernels, c.launchers, c.entries()), (2, 1, 3));
        let labels = CacheLabels {
            triton_versions: vec!["3.6.0".into()],
            python_abis: vec!["cpython-312-x86_64-linux-gnu".into()],
            ..Default::default()
        };
        let targets: BTreeSet<String> = ["cuda:90:32".to_string()].into();
        let why = explain(&c, &labels, &targets).unwrap();
        assert!(why.contains("2 kernel(s) and 1 launcher(s)"), "{why}");
        assert!(
            why.contains("the pod runs Triton 3.5.0, the cache holds kernels of Triton 3.6.0"),
            "{why}"
        );
        assert!(why.contains("cpython-311"), "{why}");
        assert!(!why.contains("compiled for"), "same target: {why}");
    }

    #[test]
    fn same_version_and_target_means_other_kernels() {
        let d = tempfile::tempdir().unwrap();
        kernel(d.path(), "A", "new_kernel", "3.6.0", 90);
        let c = scan(d.path()).unwrap();
        let labels = CacheLabels {
            triton_versions: vec!["3.6.0".into()],
            ..Default::default()
        };
        let why = explain(&c, &labels, &["cuda:90:32".to_string()].into()).unwrap();
        assert!(why.contains("other kernels"), "{why}");
        assert!(why.contains("new_kernel"), "{why}");
        let other_gpu = explain(&c, &labels, &["cuda:80:32".to_string()].into()).unwrap();
        assert!(other_gpu.contains("compiled for cuda:90:32"), "{other_gpu}");
    }
}
