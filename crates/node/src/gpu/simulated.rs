//! A simulated GPU inventory: a file naming the GPUs, for clusters and tests without any.
//!
//! The file is YAML (or JSON, chosen by a `.json` extension) with a `gpus` list whose
//! entries use the [`GpuInfo`] field names:
//!
//! ```yaml
//! gpus:
//!   - uuid: GPU-00000000-0000-0000-0000-000000000001   # required, unique
//!     backend: cuda                                    # required: cuda or hip
//!     arch: "90"                                       # required: 90, "sm_90", "gfx942"
//!     productName: NVIDIA H100 80GB HBM3               # optional
//!     warpSize: 32            # optional: 32 for cuda; 64 for gfx9, 32 for gfx10+
//!     vendor: nvidia          # optional: nvidia for cuda, amd for hip
//!     driverVersion: "580.65.06"                       # optional
//!     index: 0                # optional: position in the list
//! ```
//!
//! snake_case spellings (`warp_size`, ...) are accepted too. Every record is reported with
//! source `simulated`, whatever the file says, so a simulated node can never pass for a
//! real one. Fields are checked one by one so an error names the file and the field
//! (`gpus[1].arch`), not just a line number.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};

use super::Error;
use super::amd::GfxTarget;
use super::compat::{de_arch, de_backend, normalize_arch};
use super::nvml::NVIDIA_WARP_SIZE;
use crate::api::{GpuBackend, GpuInfo, GpuSource};

/// Each field with the spellings accepted for it (wire camelCase first).
const FIELDS: &[&[&str]] = &[
    &["index"],
    &["uuid"],
    &["vendor"],
    &["productName", "product_name"],
    &["backend"],
    &["arch"],
    &["warpSize", "warp_size"],
    &["driverVersion", "driver_version"],
    // Accepted so a dump of real GpuInfo records can be replayed; always overridden.
    &["source"],
];

/// Reads and checks the simulated inventory at `path`.
#[tracing::instrument(level = "debug", skip_all, fields(file = %path.display()))]
pub fn load(path: &Path) -> Result<Vec<GpuInfo>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse(&text, is_json).map_err(|(field, reason)| Error::Simulated {
        path: path.to_path_buf(),
        field,
        reason,
    })
}

/// A problem in the file: (where, what).
type Problem = (String, String);

/// Parses the text of a simulated inventory; errors are (field path, reason).
pub fn parse(text: &str, json: bool) -> Result<Vec<GpuInfo>, Problem> {
    let doc: Value = if json {
        serde_json::from_str(text).map_err(|e| ("(document)".to_string(), e.to_string()))?
    } else {
        serde_norway::from_str(text).map_err(|e| ("(document)".to_string(), e.to_string()))?
    };
    let Value::Mapping(top) = doc else {
        return Err((
            "(document)".into(),
            "expected a mapping with a `gpus` list".into(),
        ));
    };
    for key in top.keys() {
        if key.as_str() != Some("gpus") {
            return Err((
                key_name(key),
                "unknown top-level field; expected `gpus`".into(),
            ));
        }
    }
    let entries = match top.get("gpus") {
        Some(Value::Sequence(s)) => s,
        // `gpus:` with nothing after it: a node with no GPUs.
        Some(Value::Null) => return Ok(Vec::new()),
        Some(_) => return Err(("gpus".into(), "expected a list".into())),
        None => return Err(("gpus".into(), "missing".into())),
    };

    let mut gpus = Vec::with_capacity(entries.len());
    let mut uuids = BTreeSet::new();
    let mut indices = BTreeSet::new();
    for (position, entry) in entries.iter().enumerate() {
        let at = format!("gpus[{position}]");
        let Value::Mapping(map) = entry else {
            return Err((at, "expected a mapping of GPU fields".into()));
        };
        let gpu = entry_to_gpu(map, position, &at)?;
        if !uuids.insert(gpu.uuid.clone()) {
            return Err((
                format!("{at}.uuid"),
                format!("`{}` is listed twice", gpu.uuid),
            ));
        }
        if !indices.insert(gpu.index) {
            return Err((
                format!("{at}.index"),
                format!("{} is used twice", gpu.index),
            ));
        }
        gpus.push(gpu);
    }
    Ok(gpus)
}

#[derive(Deserialize)]
struct Arch(#[serde(deserialize_with = "de_arch")] String);

#[derive(Deserialize)]
struct Backend(#[serde(deserialize_with = "de_backend")] GpuBackend);

fn entry_to_gpu(map: &Mapping, position: usize, at: &str) -> Result<GpuInfo, Problem> {
    for key in map.keys() {
        let known = key
            .as_str()
            .is_some_and(|k| FIELDS.iter().any(|names| names.contains(&k)));
        if !known {
            let expected: Vec<&str> = FIELDS.iter().map(|names| names[0]).collect();
            return Err((
                format!("{at}.{}", key_name(key)),
                format!("unknown field; expected one of {}", expected.join(", ")),
            ));
        }
    }
    let get = |names: &[&str]| -> Result<Option<&Value>, Problem> {
        let present: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| map.contains_key(*n))
            .collect();
        if present.len() > 1 {
            return Err((
                format!("{at}.{}", names[0]),
                format!("given twice, as {}", present.join(" and ")),
            ));
        }
        Ok(present.first().and_then(|n| map.get(*n)))
    };
    let field = |names: &[&str]| -> Result<Option<(String, Value)>, Problem> {
        Ok(get(names)?.map(|v| (format!("{at}.{}", names[0]), v.clone())))
    };

    let uuid: String = required(field(&["uuid"])?, at, "uuid")?;
    if uuid.trim().is_empty() {
        return Err((format!("{at}.uuid"), "must not be empty".into()));
    }
    let Backend(backend) = required(field(&["backend"])?, at, "backend")?;
    let Arch(raw_arch) = required(field(&["arch"])?, at, "arch")?;
    let arch_at = format!("{at}.arch");
    let (arch, default_warp) = match backend {
        GpuBackend::Cuda => {
            let a = normalize_arch(&raw_arch);
            if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err((
                    arch_at,
                    format!("`{raw_arch}` is not a CUDA arch (like 90 or sm_90)"),
                ));
            }
            (a, NVIDIA_WARP_SIZE)
        }
        GpuBackend::Hip => {
            let t = GfxTarget::parse(&raw_arch).ok_or_else(|| {
                (
                    arch_at,
                    format!("`{raw_arch}` is not an AMD gfx arch (like gfx942)"),
                )
            })?;
            (t.to_string(), t.warp_size())
        }
    };
    let warp_size = match optional::<u32>(field(&["warpSize", "warp_size"])?)? {
        Some(w @ (32 | 64)) => w,
        Some(w) => {
            return Err((
                format!("{at}.warpSize"),
                format!("{w} is not a GPU warp size (32 or 64)"),
            ));
        }
        None => default_warp,
    };
    let index = match optional::<u32>(field(&["index"])?)? {
        Some(i) => i,
        None => u32::try_from(position)
            .map_err(|_| (format!("{at}.index"), "too many GPUs".to_string()))?,
    };
    let vendor = optional::<String>(field(&["vendor"])?)?.unwrap_or_else(|| {
        match backend {
            GpuBackend::Cuda => "nvidia",
            GpuBackend::Hip => "amd",
        }
        .to_string()
    });
    let product_name = optional::<String>(field(&["productName", "product_name"])?)?
        .unwrap_or_else(|| {
            format!(
                "Simulated {} GPU",
                super::compat::display_arch(backend, &arch)
            )
        });
    let driver_version = optional::<String>(field(&["driverVersion", "driver_version"])?)?;
    // Read only to reject a non-string; the record is always `simulated`.
    let _source = optional::<String>(field(&["source"])?)?;

    Ok(GpuInfo {
        index,
        uuid,
        vendor,
        product_name,
        backend,
        arch,
        warp_size,
        driver_version,
        source: GpuSource::Simulated,
    })
}

fn optional<T: DeserializeOwned>(field: Option<(String, Value)>) -> Result<Option<T>, Problem> {
    field
        .map(|(at, v)| serde_norway::from_value(v).map_err(|e| (at, e.to_string())))
        .transpose()
}

fn required<T: DeserializeOwned>(
    field: Option<(String, Value)>,
    at: &str,
    name: &str,
) -> Result<T, Problem> {
    optional(field)?.ok_or_else(|| (format!("{at}.{name}"), "missing".to_string()))
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "(key)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(yaml: &str) -> (String, String) {
        parse(yaml, false).unwrap_err()
    }

    #[test]
    fn minimal_entries_get_defaults() {
        let gpus = parse(
            "gpus:\n\
             - {uuid: GPU-n0, backend: cuda, arch: sm_90}\n\
             - {uuid: GPU-a0, backend: hip, arch: GFX90A}\n\
             - {uuid: GPU-a1, backend: hip, arch: gfx1100, index: 7}\n",
            false,
        )
        .unwrap();
        let got: Vec<(u32, &str, &str, u32, &str)> = gpus
            .iter()
            .map(|g| {
                (
                    g.index,
                    g.arch.as_str(),
                    g.vendor.as_str(),
                    g.warp_size,
                    g.product_name.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "90", "nvidia", 32, "Simulated sm_90 GPU"),
                (1, "gfx90a", "amd", 64, "Simulated gfx90a GPU"),
                (7, "gfx1100", "amd", 32, "Simulated gfx1100 GPU"),
            ]
        );
        assert!(gpus.iter().all(|g| g.source == GpuSource::Simulated));
    }

    #[test]
    fn full_entries_keep_their_values_but_not_their_source() {
        let gpus = parse(
            "gpus:\n\
             - uuid: GPU-1\n  vendor: nvidia\n  product_name: NVIDIA H100 80GB HBM3\n  \
               backend: CUDA\n  arch: 90\n  warp_size: 32\n  driverVersion: '580.65.06'\n  \
               source: nvml\n",
            false,
        )
        .unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].product_name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].arch, "90");
        assert_eq!(gpus[0].driver_version.as_deref(), Some("580.65.06"));
        assert_eq!(gpus[0].source, GpuSource::Simulated);
    }

    #[test]
    fn json_is_accepted() {
        let gpus = parse(
            r#"{"gpus":[{"uuid":"GPU-j","backend":"hip","arch":"gfx942","warpSize":64}]}"#,
            true,
        )
        .unwrap();
        assert_eq!(gpus[0].arch, "gfx942");
    }

    #[test]
    fn empty_list_is_a_node_without_gpus() {
        assert_eq!(parse("gpus: []\n", false).unwrap(), Vec::new());
        assert_eq!(parse("gpus:\n", false).unwrap(), Vec::new());
    }

    #[test]
    fn bad_input_names_the_field() {
        let ok = "uuid: GPU-1, backend: cuda, arch: '90'";
        for (yaml, field, reason) in [
            ("", "(document)", "expected a mapping"),
            ("- a\n", "(document)", "expected a mapping"),
            ("gpu: []\n", "gpu", "unknown top-level field"),
            ("{}\n", "gpus", "missing"),
            ("gpus: 3\n", "gpus", "expected a list"),
            ("gpus: [3]\n", "gpus[0]", "expected a mapping"),
            (
                "gpus: [{backend: cuda, arch: '90'}]",
                "gpus[0].uuid",
                "missing",
            ),
            (
                "gpus: [{uuid: '', backend: cuda, arch: '90'}]",
                "gpus[0].uuid",
                "empty",
            ),
            (
                "gpus: [{uuid: a, arch: '90'}]",
                "gpus[0].backend",
                "missing",
            ),
            (
                "gpus: [{uuid: a, backend: rocm, arch: '90'}]",
                "gpus[0].backend",
                "rocm",
            ),
            (
                "gpus: [{uuid: a, backend: cuda}]",
                "gpus[0].arch",
                "missing",
            ),
            (
                "gpus: [{uuid: a, backend: cuda, arch: gfx90a}]",
                "gpus[0].arch",
                "not a CUDA arch",
            ),
            (
                "gpus: [{uuid: a, backend: hip, arch: '90'}]",
                "gpus[0].arch",
                "not an AMD gfx arch",
            ),
            (
                "gpus: [{uuid: a, backend: hip, arch: [1]}]",
                "gpus[0].arch",
                "expected an arch",
            ),
            (
                "gpus: [{uuid: a, backend: cuda, arch: '90', warpSize: 48}]",
                "gpus[0].warpSize",
                "48",
            ),
            (
                "gpus: [{uuid: a, backend: cuda, arch: '90', warpSize: big}]",
                "gpus[0].warpSize",
                "invalid type",
            ),
            (
                "gpus: [{uuid: a, backend: cuda, arch: '90', warp: 32}]",
                "gpus[0].warp",
                "unknown field",
            ),
            (
                "gpus: [{uuid: a, backend: cuda, arch: '90', warpSize: 32, warp_size: 32}]",
                "gpus[0].warpSize",
                "given twice",
            ),
            (
                &format!("gpus: [{{{ok}}}, {{{ok}}}]"),
                "gpus[1].uuid",
                "listed twice",
            ),
            (
                "gpus: [{uuid: a, backend: cuda, arch: '90', index: 1}, \
                        {uuid: b, backend: cuda, arch: '90'}]",
                "gpus[1].index",
                "used twice",
            ),
        ] {
            let (got_field, got_reason) = problem(yaml);
            assert_eq!(got_field, field, "{yaml:?}: {got_reason}");
            assert!(
                got_reason.contains(reason),
                "{yaml:?}: {got_reason:?} should contain {reason:?}"
            );
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let msg = load(&missing).unwrap_err().to_string();
        assert!(msg.contains("nope.yaml"), "{msg}");

        let bad = dir.path().join("gpus.yaml");
        std::fs::write(&bad, "gpus: [{uuid: a, backend: cuda}]\n").unwrap();
        let msg = load(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("gpus.yaml") && msg.contains("gpus[0].arch: missing"),
            "{msg}"
        );
    }
}
