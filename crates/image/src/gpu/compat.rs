//! Whether a kernel cache fits this node's GPUs.
//!
//! A cache image says what it was compiled for in its summary label
//! (`cache.triton.image/summary` or `cache.vllm.image/summary`), written by MCV and GKM:
//! `{"targets":[{"backend":"cuda","arch":"90","warp_size":32}, ...]}`. A GPU is compatible
//! when some target has its backend, its arch and its warp size. Arch spellings differ
//! between tools, so they are normalised before comparing: `sm_90`, `"90"` and `90` are the
//! same CUDA arch; AMD names compare case-insensitively and without target features
//! (`gfx90a:xnack-` is `gfx90a`), since the inventory reports the bare ISA.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::{SummaryError, backend_name};
use crate::api::{GpuBackend, GpuInfo};

/// One target a cache was compiled for.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct CacheTarget {
    #[serde(deserialize_with = "de_backend")]
    pub backend: GpuBackend,
    /// As the label wrote it (a JSON number becomes its decimal string); compare with
    /// [`CacheTarget::matches`] or [`normalize_arch`], never with `==`.
    #[serde(deserialize_with = "de_arch")]
    pub arch: String,
    pub warp_size: u32,
}

impl CacheTarget {
    /// Same backend, same normalised arch, same warp size.
    pub fn matches(&self, gpu: &GpuInfo) -> bool {
        self.backend == gpu.backend
            && normalize_arch(&self.arch) == normalize_arch(&gpu.arch)
            && self.warp_size == gpu.warp_size
    }
}

impl fmt::Display for CacheTarget {
    /// `cuda sm_90/warp 32`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/warp {}",
            backend_name(self.backend),
            display_arch(self.backend, &self.arch),
            self.warp_size
        )
    }
}

/// The summary label of a cache image. Fields other than `targets` (`ptx_version`,
/// `cuda_version`, ...) are accepted and ignored.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Summary {
    #[serde(default)]
    pub targets: Vec<CacheTarget>,
}

impl Summary {
    /// Parses the label's value (a JSON string).
    pub fn parse(label: &str) -> Result<Summary, SummaryError> {
        // serde's message quotes the offending value whole (a megabyte-long backend, say):
        // cut it as the label is cut.
        serde_json::from_str(label).map_err(|e| SummaryError {
            reason: format!("{} (in {})", cut(&e.to_string()), abbreviate(label)),
        })
    }

    /// Checks `gpus` against this summary's targets; see [`check`].
    pub fn check(&self, gpus: &[GpuInfo]) -> Verdict {
        check(gpus, &self.targets)
    }
}

/// What a cache's targets say about a set of GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The cache names no targets, so it makes no claim about GPUs: whether it may be used
    /// is the caller's policy, not a compatibility result.
    NoGpuClaim,
    /// Every GPU was checked against the targets.
    Checked(Compatibility),
}

/// The GPUs a cache fits and those it does not, with one reason per misfit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compatibility {
    /// UUIDs of GPUs some target matches, in inventory order.
    pub compatible: Vec<String>,
    /// UUIDs of GPUs no target matches, in inventory order.
    pub incompatible: Vec<String>,
    /// One sentence per incompatible GPU, in the same order.
    pub reasons: Vec<String>,
}

impl Compatibility {
    /// Whether at least one GPU can use the cache.
    pub fn any_compatible(&self) -> bool {
        !self.compatible.is_empty()
    }
}

/// Whether an image may be used on a node, and why not: the one rule the CSI publish and
/// the agent's node status share.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fitness {
    /// Whether a pod on this node may use the image.
    pub usable: bool,
    /// Whether the image names GPU targets at all.
    pub claimed: bool,
    pub compatible: Vec<String>,
    pub incompatible: Vec<String>,
    /// In words: why each incompatible GPU does not match, or why the image is refused.
    pub reasons: Vec<String>,
}

impl Fitness {
    /// Judges an image's summary label (`(kind, value)` of its `cache.<kind>.image/summary`
    /// label, as `oci::ImageInfo::summary_label` finds it) against `gpus`. Without one the
    /// image makes no GPU claim, and `allow_unclaimed` decides. A summary that does not
    /// parse is an error.
    pub fn of(
        summary_label: Option<(&str, &str)>,
        gpus: &[GpuInfo],
        allow_unclaimed: bool,
    ) -> Result<Fitness, SummaryError> {
        let unclaimed = |kind: Option<&str>| Fitness {
            usable: allow_unclaimed,
            claimed: false,
            reasons: if allow_unclaimed {
                vec![]
            } else {
                vec![format!(
                    "the image carries no GPU targets (no cache.{}.image/summary label) and this node requires them",
                    kind.unwrap_or("<kind>")
                )]
            },
            ..Default::default()
        };
        let Some((kind, label)) = summary_label else {
            return Ok(unclaimed(None));
        };
        let summary = Summary::parse(label).map_err(|e| SummaryError {
            reason: format!("label cache.{kind}.image/summary: {}", e.reason),
        })?;
        Ok(match summary.check(gpus) {
            Verdict::NoGpuClaim => unclaimed(Some(kind)),
            Verdict::Checked(c) => Fitness {
                usable: c.any_compatible(),
                claimed: true,
                reasons: if c.compatible.is_empty() && c.incompatible.is_empty() {
                    vec!["the node has no GPUs".into()]
                } else {
                    c.reasons
                },
                compatible: c.compatible,
                incompatible: c.incompatible,
            },
        })
    }
}

/// Checks each GPU against `targets`. An empty target list is [`Verdict::NoGpuClaim`].
#[tracing::instrument(level = "debug", skip_all, fields(gpus = gpus.len(), targets = targets.len()))]
pub fn check(gpus: &[GpuInfo], targets: &[CacheTarget]) -> Verdict {
    if targets.is_empty() {
        return Verdict::NoGpuClaim;
    }
    let mut result = Compatibility::default();
    for gpu in gpus {
        if targets.iter().any(|t| t.matches(gpu)) {
            result.compatible.push(gpu.uuid.clone());
        } else {
            result.incompatible.push(gpu.uuid.clone());
            result.reasons.push(mismatch_reason(gpu, targets));
        }
    }
    tracing::debug!(
        compatible = result.compatible.len(),
        incompatible = result.incompatible.len(),
        "cache checked against GPUs"
    );
    Verdict::Checked(result)
}

/// Why no target fits `gpu`, naming the GPU and the closest kind of miss: no target of the
/// backend, none of the arch, or the arch's targets use another warp size.
fn mismatch_reason(gpu: &GpuInfo, targets: &[CacheTarget]) -> String {
    let backend = backend_name(gpu.backend);
    let arch = normalize_arch(&gpu.arch);
    let same_arch: Vec<&CacheTarget> = targets
        .iter()
        .filter(|t| t.backend == gpu.backend && normalize_arch(&t.arch) == arch)
        .collect();
    let what = if !targets.iter().any(|t| t.backend == gpu.backend) {
        format!("no {backend} target")
    } else if same_arch.is_empty() {
        format!("no target for arch {arch}")
    } else {
        let mut warps: Vec<u32> = same_arch.iter().map(|t| t.warp_size).collect();
        warps.sort_unstable();
        warps.dedup();
        let warps: Vec<String> = warps.iter().map(ToString::to_string).collect();
        format!(
            "targets for arch {arch} use warp {}, the GPU runs warp {}",
            warps.join("/"),
            gpu.warp_size
        )
    };
    let mut listed: Vec<String> = Vec::new();
    for t in targets.iter().map(ToString::to_string) {
        if !listed.contains(&t) {
            listed.push(t);
        }
    }
    format!(
        "{} ({}, {backend} {}, warp {}): {what}; the cache has {}",
        gpu.uuid,
        gpu.product_name,
        display_arch(gpu.backend, &gpu.arch),
        gpu.warp_size,
        listed.join(", ")
    )
}

/// The comparable form of an arch: lower case, without `sm_`/`compute_` prefixes or target
/// features; a dotted compute capability (`9.0`) becomes `90`.
pub fn normalize_arch(arch: &str) -> String {
    let a = arch.trim().to_ascii_lowercase();
    let a = a.split(':').next().unwrap_or_default();
    let a = a
        .strip_prefix("sm_")
        .or_else(|| a.strip_prefix("compute_"))
        .unwrap_or(a);
    if let Some((major, minor)) = a.split_once('.')
        && let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>())
        && minor < 10
    {
        return (major * 10 + minor).to_string();
    }
    a.to_string()
}

/// How an arch reads to people: `sm_90` for CUDA, `gfx942` for HIP.
pub fn display_arch(backend: GpuBackend, arch: &str) -> String {
    let a = normalize_arch(arch);
    match backend {
        GpuBackend::Cuda if !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()) => {
            format!("sm_{a}")
        }
        _ => a,
    }
}

/// Characters of a label value quoted in an error message.
const QUOTED: usize = 200;

/// Label values end up in error messages; keep a huge one from flooding the log.
fn abbreviate(s: &str) -> String {
    match s.char_indices().nth(QUOTED) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// At most [`QUOTED`] characters of `s`, then `...`.
fn cut(s: &str) -> String {
    match s.char_indices().nth(QUOTED) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// `arch` is a string in GKM's own labels and a number in some MCV versions; take both.
pub fn de_arch<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct ArchVisitor;
    impl Visitor<'_> for ArchVisitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an arch as a string (\"90\", \"sm_90\", \"gfx942\") or an integer (90)")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            if v.trim().is_empty() {
                return Err(E::invalid_value(de::Unexpected::Str(v), &self));
            }
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            u64::try_from(v)
                .map(|v| v.to_string())
                .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
    }
    d.deserialize_any(ArchVisitor)
}

/// Backend names compare case-insensitively (`CUDA` is `cuda`).
pub fn de_backend<'de, D: Deserializer<'de>>(d: D) -> Result<GpuBackend, D::Error> {
    let s = String::deserialize(d)?;
    match s.to_ascii_lowercase().as_str() {
        "cuda" => Ok(GpuBackend::Cuda),
        "hip" => Ok(GpuBackend::Hip),
        _ => Err(de::Error::invalid_value(
            de::Unexpected::Str(&s),
            &"`cuda` or `hip`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GpuSource;

    fn gpu(uuid: &str, name: &str, backend: GpuBackend, arch: &str, warp: u32) -> GpuInfo {
        GpuInfo {
            index: 0,
            uuid: uuid.into(),
            vendor: match backend {
                GpuBackend::Cuda => "nvidia".into(),
                GpuBackend::Hip => "amd".into(),
            },
            product_name: name.into(),
            backend,
            arch: arch.into(),
            warp_size: warp,
            driver_version: None,
            source: GpuSource::Simulated,
        }
    }

    fn target(backend: GpuBackend, arch: &str, warp: u32) -> CacheTarget {
        CacheTarget {
            backend,
            arch: arch.into(),
            warp_size: warp,
        }
    }

    #[test]
    fn arch_forms_normalise_to_one() {
        for a in ["90", "sm_90", "SM_90", " sm_90 ", "compute_90", "9.0"] {
            assert_eq!(normalize_arch(a), "90", "{a:?}");
        }
        assert_eq!(normalize_arch("GFX90A"), "gfx90a");
        assert_eq!(normalize_arch("gfx90a:sramecc+:xnack-"), "gfx90a");
        assert_eq!(normalize_arch("12.0"), "120");
        assert_ne!(normalize_arch("sm_90a"), normalize_arch("90"));
        assert_eq!(display_arch(GpuBackend::Cuda, "90"), "sm_90");
        assert_eq!(display_arch(GpuBackend::Cuda, "sm_80"), "sm_80");
        assert_eq!(display_arch(GpuBackend::Hip, "GFX942"), "gfx942");
    }

    #[test]
    fn summary_accepts_string_and_number_arch() {
        let s = Summary::parse(
            r#"{"targets":[{"backend":"cuda","arch":"90","warp_size":32},
                           {"backend":"CUDA","arch":80,"warp_size":32},
                           {"backend":"hip","arch":"gfx942","warp_size":64}],
                "cuda_version":"12.4","ptx_version":84}"#,
        )
        .unwrap();
        assert_eq!(
            s.targets,
            vec![
                target(GpuBackend::Cuda, "90", 32),
                target(GpuBackend::Cuda, "80", 32),
                target(GpuBackend::Hip, "gfx942", 64),
            ]
        );
    }

    #[test]
    fn bad_summaries_say_what_is_wrong() {
        for (label, want) in [
            ("not json", "expected"),
            (
                r#"{"targets":[{"backend":"xpu","arch":"1","warp_size":32}]}"#,
                "xpu",
            ),
            (
                r#"{"targets":[{"backend":"cuda","arch":-3,"warp_size":32}]}"#,
                "-3",
            ),
            (
                r#"{"targets":[{"backend":"cuda","arch":"","warp_size":32}]}"#,
                "arch",
            ),
            (
                r#"{"targets":[{"backend":"cuda","arch":"90"}]}"#,
                "warp_size",
            ),
            (
                r#"{"targets":[{"backend":"cuda","arch":9.0,"warp_size":32}]}"#,
                "9",
            ),
        ] {
            let msg = Summary::parse(label).unwrap_err().to_string();
            assert!(msg.starts_with("cache summary label: "), "{msg}");
            assert!(msg.contains(want), "{label}: {msg} should mention {want}");
        }
    }

    #[test]
    fn empty_or_missing_targets_make_no_claim() {
        let gpus = [gpu("GPU-1", "H100", GpuBackend::Cuda, "90", 32)];
        for label in [r#"{"targets":[]}"#, "{}"] {
            let s = Summary::parse(label).unwrap();
            assert_eq!(s.check(&gpus), Verdict::NoGpuClaim, "{label}");
        }
    }

    #[test]
    fn sm_prefix_and_number_match_the_inventory_arch() {
        let gpus = [gpu("GPU-1", "NVIDIA H100", GpuBackend::Cuda, "90", 32)];
        for arch in ["90", "sm_90"] {
            let Verdict::Checked(c) = check(&gpus, &[target(GpuBackend::Cuda, arch, 32)]) else {
                panic!("targets were given")
            };
            assert_eq!(c.compatible, vec!["GPU-1"]);
            assert!(c.incompatible.is_empty() && c.reasons.is_empty());
        }
        let s =
            Summary::parse(r#"{"targets":[{"backend":"cuda","arch":90,"warp_size":32}]}"#).unwrap();
        assert!(matches!(s.check(&gpus), Verdict::Checked(c) if c.any_compatible()));
    }

    #[test]
    fn amd_arch_compares_case_insensitively() {
        let gpus = [gpu("GPU-a", "MI300X", GpuBackend::Hip, "gfx942", 64)];
        let Verdict::Checked(c) = check(&gpus, &[target(GpuBackend::Hip, "GFX942", 64)]) else {
            panic!("targets were given")
        };
        assert_eq!(c.compatible, vec!["GPU-a"]);
    }

    #[test]
    fn each_incompatible_gpu_gets_one_reason() {
        let gpus = [
            gpu("GPU-abc", "NVIDIA A100", GpuBackend::Cuda, "80", 32),
            gpu("GPU-def", "NVIDIA H100", GpuBackend::Cuda, "90", 32),
            gpu(
                "GPU-amd",
                "AMD Instinct MI210",
                GpuBackend::Hip,
                "gfx90a",
                64,
            ),
            gpu("GPU-w", "odd", GpuBackend::Cuda, "90", 64),
        ];
        let Verdict::Checked(c) = check(&gpus, &[target(GpuBackend::Cuda, "sm_90", 32)]) else {
            panic!("targets were given")
        };
        assert_eq!(c.compatible, vec!["GPU-def"]);
        assert_eq!(c.incompatible, vec!["GPU-abc", "GPU-amd", "GPU-w"]);
        assert_eq!(
            c.reasons,
            vec![
                "GPU-abc (NVIDIA A100, cuda sm_80, warp 32): no target for arch 80; \
                 the cache has cuda sm_90/warp 32",
                "GPU-amd (AMD Instinct MI210, hip gfx90a, warp 64): no hip target; \
                 the cache has cuda sm_90/warp 32",
                "GPU-w (odd, cuda sm_90, warp 64): targets for arch 90 use warp 32, \
                 the GPU runs warp 64; the cache has cuda sm_90/warp 32",
            ]
        );
        assert!(c.any_compatible());
    }

    #[test]
    fn no_gpus_is_checked_and_fits_nothing() {
        let Verdict::Checked(c) = check(&[], &[target(GpuBackend::Cuda, "90", 32)]) else {
            panic!("targets were given")
        };
        assert_eq!(c, Compatibility::default());
        assert!(!c.any_compatible());
    }

    #[test]
    fn long_labels_are_cut_in_errors() {
        let label = format!("{{\"targets\": {}", "x".repeat(10_000));
        let msg = Summary::parse(&label).unwrap_err().to_string();
        assert!(msg.len() < 400, "{msg}");
    }
}
