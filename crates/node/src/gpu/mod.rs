//! This node's GPUs, and whether a kernel cache fits them.
//!
//! The module owns three ways of finding GPUs and one way of judging a cache against them:
//!
//! - [`nvml`]: NVIDIA devices through NVML (`libnvidia-ml`, loaded at run time; a node
//!   without the library has no NVIDIA GPUs, which is not an error).
//! - [`amd`]: AMD devices from the kernel's KFD topology in sysfs (`gfx_target_version`),
//!   with a configurable sysfs root so fixture trees can stand in for a real node.
//! - [`simulated`]: a file naming the GPUs, for clusters and tests without any.
//! - [`compat`] (from `gkm_image::gpu`, re-exported): the cache image's summary label
//!   (`{"targets":[...]}`) checked against the GPUs: same backend, same arch, same warp size.
//!
//! [`Inventory`] ties the sources together for the agent and the CLI; [`render_table`]
//! formats the result for `gkm gpus`. Every record is an [`api::GpuInfo`], the type
//! the node status carries on the wire.
//!
//! The calls here block (NVML, sysfs reads): async callers run them on a blocking thread.
//!
//! [`api::GpuInfo`]: crate::api::GpuInfo

pub mod amd;
pub mod nvml;
pub mod simulated;

use std::path::{Path, PathBuf};

use crate::api::{GpuInfo, GpuSource};

pub use gkm_image::gpu::{
    CacheTarget, Compatibility, Fitness, Summary, SummaryError, Verdict, backend_name, compat,
};

/// Default root of sysfs, where the KFD topology lives.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

/// Everything that can go wrong while finding this node's GPUs.
///
/// Each message names the file, device or label concerned and says why; the underlying
/// error's text is part of the message (not a separate `source`), so a caller that prints
/// only `Display` still sees the whole story.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An NVML call failed after the library was loaded.
    #[error("NVML {call}{}: {error}", device_suffix(*.device))]
    Nvml {
        call: &'static str,
        device: Option<u32>,
        error: nvml_wrapper::error::NvmlError,
    },

    /// NVML answered, but with something GKM cannot use.
    #[error("NVML device {device}: {reason}")]
    NvmlData { device: u32, reason: String },

    /// A file or directory could not be read.
    #[error("cannot read {}: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A KFD topology file was read but does not say what it should.
    #[error("KFD topology {}: {reason}", .path.display())]
    Topology { path: PathBuf, reason: String },

    /// A simulated inventory file is malformed; `field` locates the offending entry.
    #[error("simulated GPU inventory {}: {field}: {reason}", .path.display())]
    Simulated {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

fn device_suffix(device: Option<u32>) -> String {
    match device {
        Some(i) => format!(" (device {i})"),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn io(path: &Path, error: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Where to look for this node's GPUs.
///
/// With `simulated_file` set only that file counts: a simulated node must not also report
/// whatever real devices the machine happens to have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    /// Path (or file name, resolved by the dynamic loader) of `libnvidia-ml`; `None` means
    /// nvml-wrapper's default, `libnvidia-ml.so.1`.
    pub nvml_library: Option<PathBuf>,
    /// Root of sysfs; the KFD topology is read under `<root>/class/kfd/kfd/topology`.
    pub sysfs_root: PathBuf,
    /// A simulated inventory file (YAML or JSON) that replaces discovery.
    pub simulated_file: Option<PathBuf>,
}

impl Default for Inventory {
    fn default() -> Self {
        Inventory {
            nvml_library: None,
            sysfs_root: PathBuf::from(DEFAULT_SYSFS_ROOT),
            simulated_file: None,
        }
    }
}

impl Inventory {
    /// The node's GPUs: the simulated ones when a file is configured, else NVIDIA (NVML)
    /// followed by AMD (KFD). Indices are per source (NVML index, KFD order).
    #[tracing::instrument(level = "debug", skip_all, fields(
        simulated = ?self.simulated_file,
        nvml = ?self.nvml_library,
        sysfs = %self.sysfs_root.display(),
    ))]
    pub fn discover(&self) -> Result<Vec<GpuInfo>, Error> {
        if let Some(file) = &self.simulated_file {
            let gpus = simulated::load(file)?;
            tracing::debug!(count = gpus.len(), "simulated GPUs");
            return Ok(gpus);
        }
        let mut gpus = nvml::discover(self.nvml_library.as_deref())?;
        let nvidia = gpus.len();
        gpus.extend(amd::discover(&self.sysfs_root)?);
        tracing::debug!(nvidia, amd = gpus.len() - nvidia, "GPUs found");
        Ok(gpus)
    }
}

/// A plain-text table of `gpus` for `gkm gpus`: one header line, one line per GPU, columns
/// padded to their widest cell. An empty inventory says so instead of printing a bare header.
pub fn render_table(gpus: &[GpuInfo]) -> String {
    if gpus.is_empty() {
        return "No GPUs found.\n".to_string();
    }
    const HEADER: [&str; 9] = [
        "INDEX", "UUID", "VENDOR", "PRODUCT", "BACKEND", "ARCH", "WARP", "DRIVER", "SOURCE",
    ];
    let rows: Vec<[String; 9]> = gpus
        .iter()
        .map(|g| {
            [
                g.index.to_string(),
                g.uuid.clone(),
                g.vendor.clone(),
                g.product_name.clone(),
                backend_name(g.backend).to_string(),
                compat::display_arch(g.backend, &g.arch),
                g.warp_size.to_string(),
                g.driver_version.clone().unwrap_or_else(|| "-".to_string()),
                source_name(g.source).to_string(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = HEADER.map(str::to_string);
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn source_name(source: GpuSource) -> &'static str {
    match source {
        GpuSource::Nvml => "nvml",
        GpuSource::Sysfs => "sysfs",
        GpuSource::Simulated => "simulated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GpuBackend;

    fn gpu(index: u32, uuid: &str, driver: Option<&str>) -> GpuInfo {
        GpuInfo {
            index,
            uuid: uuid.into(),
            vendor: "nvidia".into(),
            product_name: "NVIDIA H100 80GB HBM3".into(),
            backend: GpuBackend::Cuda,
            arch: "90".into(),
            warp_size: 32,
            driver_version: driver.map(Into::into),
            source: GpuSource::Nvml,
        }
    }

    #[test]
    fn table_has_a_header_and_aligned_rows() {
        let table = render_table(&[
            gpu(0, "GPU-aaaa", Some("580.65.06")),
            gpu(1, "GPU-bbbbbbbb", None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("INDEX  UUID"), "{table}");
        for col in [
            "VENDOR", "PRODUCT", "BACKEND", "ARCH", "WARP", "DRIVER", "SOURCE",
        ] {
            assert!(lines[0].contains(col), "missing {col}: {table}");
        }
        assert!(lines[1].contains("sm_90") && lines[1].contains("580.65.06"));
        assert!(lines[2].contains(" - ") && lines[2].ends_with("nvml"));
        // Columns line up: PRODUCT starts at the same offset on every line.
        let col = lines[0].find("PRODUCT").unwrap();
        assert_eq!(lines[1].find("NVIDIA H100"), Some(col));
        assert_eq!(lines[2].find("NVIDIA H100"), Some(col));
    }

    #[test]
    fn empty_table_says_so() {
        assert_eq!(render_table(&[]), "No GPUs found.\n");
    }

    #[test]
    fn errors_name_the_thing_and_the_reason() {
        let e = Error::io(
            Path::new("/sys/x/properties"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let msg = e.to_string();
        assert!(
            msg.contains("/sys/x/properties") && msg.contains("not found"),
            "{msg}"
        );

        let e = Error::Nvml {
            call: "nvmlDeviceGetUUID",
            device: Some(3),
            error: nvml_wrapper::error::NvmlError::GpuLost,
        };
        let msg = e.to_string();
        assert!(msg.contains("nvmlDeviceGetUUID (device 3)"), "{msg}");
    }

    #[test]
    fn simulated_file_replaces_discovery() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gpus.yaml");
        std::fs::write(
            &file,
            "gpus:\n  - uuid: GPU-sim-0\n    backend: hip\n    arch: gfx942\n",
        )
        .unwrap();
        let inv = Inventory {
            simulated_file: Some(file),
            ..Default::default()
        };
        let gpus = inv.discover().unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].source, GpuSource::Simulated);
    }
}
