//! AMD GPUs from the kernel's KFD topology in sysfs.
//!
//! The amdgpu driver publishes one directory per HSA agent under
//! `<sysfs>/class/kfd/kfd/topology/nodes/<n>/`: CPUs and GPUs alike. Each has a
//! `properties` file of `key value` lines; a GPU's `gfx_target_version` encodes its ISA
//! (`major*10000 + minor*100 + stepping`) and is 0 for CPUs. Reading sysfs needs no vendor
//! tools (rocminfo, amd-smi) in the agent's image, and a configurable root lets fixture trees
//! stand in for a real node.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::Error;
use crate::api::{GpuBackend, GpuInfo, GpuSource};

/// Where the KFD topology nodes live, relative to the sysfs root.
pub const TOPOLOGY_NODES: &str = "class/kfd/kfd/topology/nodes";

/// Where a DKMS-installed amdgpu module reports its version, relative to the sysfs root.
/// In-tree drivers have no such file; the driver version is then unknown.
pub const AMDGPU_VERSION: &str = "module/amdgpu/version";

/// An AMD GPU ISA, as in `gfx90a`: a decimal major version, then minor and stepping as one
/// hex digit each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GfxTarget {
    pub major: u32,
    pub minor: u32,
    pub stepping: u32,
}

impl GfxTarget {
    /// Decodes KFD's `gfx_target_version` (90010 → gfx90a). `None` for 0 (a CPU) and for
    /// values whose minor or stepping do not fit the one hex digit of a gfx name.
    pub fn from_target_version(version: u32) -> Option<Self> {
        let t = GfxTarget {
            major: version / 10_000,
            minor: version / 100 % 100,
            stepping: version % 100,
        };
        (t.major > 0 && t.minor < 16 && t.stepping < 16).then_some(t)
    }

    /// The `gfx_target_version` KFD would report for this target.
    pub fn target_version(self) -> u32 {
        self.major * 10_000 + self.minor * 100 + self.stepping
    }

    /// Parses a gfx name such as `gfx942`, `GFX90A` or `gfx90a:sramecc+:xnack-` (target
    /// features after `:` do not change the ISA and are ignored).
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        let base = name.split(':').next().unwrap_or_default();
        let digits = base.strip_prefix("gfx")?;
        if digits.len() < 3 || !digits.is_ascii() {
            return None;
        }
        let (major, rest) = digits.split_at(digits.len() - 2);
        if !major.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut hex = rest.chars().map(|c| c.to_digit(16));
        let (Some(Some(minor)), Some(Some(stepping))) = (hex.next(), hex.next()) else {
            return None;
        };
        let major: u32 = major.parse().ok()?;
        (major > 0).then_some(GfxTarget {
            major,
            minor,
            stepping,
        })
    }

    /// Wavefront size the compilers (Triton, hipcc) target by default: 64 on GCN and CDNA
    /// (gfx9 and older), 32 on RDNA (gfx10 and later).
    pub fn warp_size(self) -> u32 {
        if self.major >= 10 { 32 } else { 64 }
    }
}

impl fmt::Display for GfxTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gfx{}{:x}{:x}", self.major, self.minor, self.stepping)
    }
}

/// Parses a KFD `properties` file: one `key value` pair per line. Blank lines are skipped;
/// a line without a value is an error (the file would be truncated or not KFD's).
pub fn parse_properties(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut props = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let Some(key) = words.next() else { continue };
        let Some(value) = words.next() else {
            return Err(format!("line {}: `{key}` has no value", n + 1));
        };
        props.insert(key.to_string(), value.to_string());
    }
    Ok(props)
}

/// The AMD GPUs of the KFD topology under `sysfs_root`, ordered by node number. No
/// topology directory means no AMD GPUs (no amdgpu driver loaded).
#[tracing::instrument(level = "debug", skip_all, fields(root = %sysfs_root.display()))]
pub fn discover(sysfs_root: &Path) -> Result<Vec<GpuInfo>, Error> {
    let nodes_dir = sysfs_root.join(TOPOLOGY_NODES);
    let Some(nodes) = list_nodes(&nodes_dir)? else {
        tracing::debug!(dir = %nodes_dir.display(), "no KFD topology: no AMD GPUs");
        return Ok(Vec::new());
    };
    let driver_version = read_optional(&sysfs_root.join(AMDGPU_VERSION))?;
    let mut gpus = Vec::new();
    for (number, dir) in nodes {
        let props_path = dir.join("properties");
        let text = std::fs::read_to_string(&props_path).map_err(|e| Error::io(&props_path, e))?;
        let props = parse_properties(&text).map_err(|reason| Error::Topology {
            path: props_path.clone(),
            reason,
        })?;
        let name = read_optional(&dir.join("name"))?;
        let index = gpus.len() as u32;
        let node = KfdNode {
            number,
            props: &props,
            name: name.as_deref(),
        };
        match node_to_gpu(index, &node, driver_version.as_deref()) {
            Ok(Some(gpu)) => {
                tracing::debug!(node = number, uuid = %gpu.uuid, arch = %gpu.arch, "AMD GPU");
                gpus.push(gpu);
            }
            Ok(None) => tracing::trace!(node = number, "KFD node is a CPU"),
            Err(reason) => {
                return Err(Error::Topology {
                    path: props_path,
                    reason,
                });
            }
        }
    }
    Ok(gpus)
}

/// Numbered node directories, sorted numerically (node 10 after node 9); `None` when the
/// directory does not exist.
fn list_nodes(dir: &Path) -> Result<Option<Vec<(u32, PathBuf)>>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut nodes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        // Only numbered entries are nodes; anything else is not KFD's to interpret.
        if let Some(number) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            nodes.push((number, entry.path()));
        }
    }
    nodes.sort_by_key(|(n, _)| *n);
    Ok(Some(nodes))
}

/// The trimmed contents of a small sysfs file, or `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// One KFD topology node as read from sysfs.
#[derive(Clone, Copy, Debug)]
pub struct KfdNode<'a> {
    /// The node's directory number.
    pub number: u32,
    pub props: &'a BTreeMap<String, String>,
    /// Contents of the node's `name` file, if any.
    pub name: Option<&'a str>,
}

/// The record for one KFD node: `Ok(None)` for a CPU node, `Err(reason)` when a GPU node's
/// properties cannot be interpreted.
pub fn node_to_gpu(
    index: u32,
    node: &KfdNode<'_>,
    driver_version: Option<&str>,
) -> Result<Option<GpuInfo>, String> {
    let version: u32 = prop_number(node.props, "gfx_target_version")?
        .ok_or("no gfx_target_version")?
        .try_into()
        .map_err(|_| "gfx_target_version out of range".to_string())?;
    if version == 0 {
        return Ok(None);
    }
    let target = GfxTarget::from_target_version(version)
        .ok_or_else(|| format!("gfx_target_version {version} is not a valid gfx target"))?;
    let uuid = match prop_number(node.props, "unique_id")? {
        Some(id) if id != 0 => format!("GPU-{id:016x}"),
        // Older kernels and some consumer boards report no unique_id; the node number is
        // stable for a given set of devices and is what KFD itself uses to name the agent.
        _ => format!("kfd-node-{}", node.number),
    };
    Ok(Some(GpuInfo {
        index,
        uuid,
        vendor: "amd".into(),
        product_name: product_name(node.name, target),
        backend: GpuBackend::Hip,
        arch: target.to_string(),
        warp_size: target.warp_size(),
        driver_version: driver_version.map(str::to_string),
        source: GpuSource::Sysfs,
    }))
}

/// The node's `name` when it says something; KFD names IP-discovery ASICs (gfx942, gfx11)
/// just "ip discovery", which is no product name, so those fall back to the ISA.
fn product_name(name: Option<&str>, target: GfxTarget) -> String {
    match name.map(str::trim) {
        Some(n) if !n.is_empty() && n != "ip discovery" => n.to_string(),
        _ => format!("AMD {target}"),
    }
}

fn prop_number(props: &BTreeMap<String, String>, key: &str) -> Result<Option<u64>, String> {
    props
        .get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("{key} `{v}` is not an unsigned integer"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_versions_decode_to_gfx_names() {
        for (version, name) in [
            (90010, "gfx90a"),
            (90402, "gfx942"),
            (110000, "gfx1100"),
            (100300, "gfx1030"),
            (90008, "gfx908"),
            (90500, "gfx950"),
            (120001, "gfx1201"),
            (80003, "gfx803"),
        ] {
            let t = GfxTarget::from_target_version(version).unwrap();
            assert_eq!(t.to_string(), name, "{version}");
            assert_eq!(GfxTarget::parse(name), Some(t), "{name}");
            assert_eq!(t.target_version(), version, "{name}");
        }
    }

    #[test]
    fn invalid_target_versions_are_rejected() {
        assert_eq!(GfxTarget::from_target_version(0), None);
        assert_eq!(GfxTarget::from_target_version(99), None); // major 0
        assert_eq!(GfxTarget::from_target_version(91600), None); // minor 16
        assert_eq!(GfxTarget::from_target_version(90016), None); // stepping 16
    }

    #[test]
    fn gfx_names_parse_leniently_but_not_loosely() {
        let gfx90a = GfxTarget::from_target_version(90010);
        assert_eq!(GfxTarget::parse("GFX90A"), gfx90a);
        assert_eq!(GfxTarget::parse(" gfx90a:sramecc+:xnack- "), gfx90a);
        for bad in [
            "",
            "gfx",
            "gfx9",
            "90a",
            "gfx9z0",
            "gfxa0a",
            "gfx9-generic",
            "gfx0ab",
        ] {
            assert_eq!(GfxTarget::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn warp_size_is_64_on_cdna_and_32_on_rdna() {
        let warp = |v| GfxTarget::from_target_version(v).unwrap().warp_size();
        assert_eq!(warp(90010), 64);
        assert_eq!(warp(90402), 64);
        assert_eq!(warp(80003), 64);
        assert_eq!(warp(100300), 32);
        assert_eq!(warp(110000), 32);
        assert_eq!(warp(120001), 32);
    }

    #[test]
    fn properties_are_key_value_lines() {
        let p = parse_properties("cpu_cores_count 0\n\nsimd_count 416\nunique_id 42\n").unwrap();
        assert_eq!(p["simd_count"], "416");
        assert_eq!(p.len(), 3);
        let e = parse_properties("simd_count 416\nvendor_id\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("vendor_id"), "{e}");
    }

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cpu_nodes_are_skipped() {
        let p = props(&[("cpu_cores_count", "64"), ("gfx_target_version", "0")]);
        let node = KfdNode {
            number: 0,
            props: &p,
            name: None,
        };
        assert_eq!(node_to_gpu(0, &node, None), Ok(None));
    }

    #[test]
    fn gpu_node_uses_unique_id_and_name() {
        let p = props(&[
            ("gfx_target_version", "90010"),
            ("unique_id", "12345678901234567890"),
        ]);
        let node = KfdNode {
            number: 3,
            props: &p,
            name: Some("aldebaran"),
        };
        let g = node_to_gpu(1, &node, Some("6.8.5")).unwrap().unwrap();
        assert_eq!(g.uuid, "GPU-ab54a98ceb1f0ad2");
        assert_eq!(g.index, 1);
        assert_eq!(g.arch, "gfx90a");
        assert_eq!(g.warp_size, 64);
        assert_eq!(g.product_name, "aldebaran");
        assert_eq!(g.backend, GpuBackend::Hip);
        assert_eq!(g.source, GpuSource::Sysfs);
        assert_eq!(g.driver_version.as_deref(), Some("6.8.5"));
    }

    #[test]
    fn gpu_node_without_unique_id_or_name_falls_back() {
        for p in [
            props(&[("gfx_target_version", "110000"), ("unique_id", "0")]),
            props(&[("gfx_target_version", "110000")]),
        ] {
            for name in [None, Some(""), Some("ip discovery")] {
                let node = KfdNode {
                    number: 2,
                    props: &p,
                    name,
                };
                let g = node_to_gpu(0, &node, None).unwrap().unwrap();
                assert_eq!(g.uuid, "kfd-node-2");
                assert_eq!(g.product_name, "AMD gfx1100");
                assert_eq!(g.warp_size, 32);
            }
        }
    }

    #[test]
    fn bad_gpu_properties_say_why() {
        let cases = [
            (props(&[]), "no gfx_target_version"),
            (props(&[("gfx_target_version", "x")]), "`x` is not"),
            (props(&[("gfx_target_version", "91700")]), "91700"),
            (
                props(&[("gfx_target_version", "90010"), ("unique_id", "-1")]),
                "unique_id",
            ),
        ];
        for (p, want) in cases {
            let node = KfdNode {
                number: 1,
                props: &p,
                name: None,
            };
            let e = node_to_gpu(0, &node, None).unwrap_err();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn missing_topology_means_no_amd_gpus() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(discover(dir.path()).unwrap(), Vec::new());
    }

    #[test]
    fn nodes_are_ordered_numerically_and_indexed_among_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = dir.path().join(TOPOLOGY_NODES);
        // Node 0 a CPU; GPU nodes 2, 9, 10 (10 sorts before 2 as text); a stray file.
        for (n, version) in [(0, 0), (10, 110000), (2, 90010), (9, 90402)] {
            let node = nodes.join(n.to_string());
            std::fs::create_dir_all(&node).unwrap();
            std::fs::write(
                node.join("properties"),
                format!("cpu_cores_count 0\ngfx_target_version {version}\nunique_id 0\n"),
            )
            .unwrap();
        }
        std::fs::write(nodes.join("README"), "not a node").unwrap();
        let gpus = discover(dir.path()).unwrap();
        let got: Vec<(u32, &str, &str)> = gpus
            .iter()
            .map(|g| (g.index, g.uuid.as_str(), g.arch.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "kfd-node-2", "gfx90a"),
                (1, "kfd-node-9", "gfx942"),
                (2, "kfd-node-10", "gfx1100"),
            ]
        );
    }

    #[test]
    fn unreadable_node_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join(TOPOLOGY_NODES).join("1");
        std::fs::create_dir_all(&node).unwrap();
        let msg = discover(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("nodes/1/properties"), "{msg}");

        std::fs::write(node.join("properties"), "gfx_target_version 91700\n").unwrap();
        let msg = discover(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("nodes/1/properties") && msg.contains("91700"),
            "{msg}"
        );
    }
}
