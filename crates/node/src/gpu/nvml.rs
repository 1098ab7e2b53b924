//! NVIDIA GPUs through NVML.
//!
//! `libnvidia-ml` is loaded at run time (nvml-wrapper resolves every symbol lazily), so the
//! agent runs on nodes without NVIDIA drivers: a library that cannot be loaded, or one
//! whose kernel driver is absent, means "no NVIDIA GPUs" rather than an error. Anything that
//! fails after NVML came up is an error, because a half-read inventory would misreport the
//! node.

use std::ffi::OsStr;
use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use super::Error;
use crate::api::{GpuBackend, GpuInfo, GpuSource};

/// Every NVIDIA GPU executes 32-thread warps.
pub const NVIDIA_WARP_SIZE: u32 = 32;

/// What NVML says about one device, before it becomes a [`GpuInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmlDevice {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// CUDA compute capability (major, minor).
    pub compute_capability: (i32, i32),
}

/// The NVIDIA GPUs NVML reports, from the library at `lib_path` (or nvml-wrapper's default
/// `libnvidia-ml.so.1`). NVML is shut down again before this returns.
#[tracing::instrument(level = "debug", skip_all, fields(lib = ?lib_path))]
pub fn discover(lib_path: Option<&Path>) -> Result<Vec<GpuInfo>, Error> {
    let nvml = match init(lib_path) {
        Ok(nvml) => nvml,
        Err(e) if means_no_nvidia_gpus(&e) => {
            tracing::debug!(error = %e, "NVML unavailable: no NVIDIA GPUs on this node");
            return Ok(Vec::new());
        }
        Err(e) => {
            return Err(Error::Nvml {
                call: "nvmlInit_v2",
                device: None,
                error: e,
            });
        }
    };
    let driver = nvml.sys_driver_version().map_err(|e| Error::Nvml {
        call: "nvmlSystemGetDriverVersion",
        device: None,
        error: e,
    })?;
    let devices = read_devices(&nvml)?;
    // Dropping `Nvml` calls nvmlShutdown; do it before building the records so the library
    // is released as early as possible.
    drop(nvml);
    devices
        .into_iter()
        .map(|d| to_gpu_info(d, Some(driver.clone())))
        .collect()
}

fn init(lib_path: Option<&Path>) -> Result<Nvml, NvmlError> {
    let mut builder = Nvml::builder();
    if let Some(path) = lib_path {
        builder.lib_path(OsStr::new(path));
    }
    builder.init()
}

/// Whether an error from initialising NVML means the node simply has no NVIDIA GPUs: the
/// library cannot be loaded (missing, or not a loadable object), or it loads but finds no
/// NVIDIA kernel driver.
pub fn means_no_nvidia_gpus(error: &NvmlError) -> bool {
    matches!(
        error,
        NvmlError::LibloadingError(_) | NvmlError::DriverNotLoaded | NvmlError::LibraryNotFound
    )
}

fn read_devices(nvml: &Nvml) -> Result<Vec<NvmlDevice>, Error> {
    let count = nvml.device_count().map_err(|e| Error::Nvml {
        call: "nvmlDeviceGetCount_v2",
        device: None,
        error: e,
    })?;
    (0..count)
        .map(|index| {
            let err = |call| {
                move |e| Error::Nvml {
                    call,
                    device: Some(index),
                    error: e,
                }
            };
            let device = nvml
                .device_by_index(index)
                .map_err(err("nvmlDeviceGetHandleByIndex_v2"))?;
            let cc = device
                .cuda_compute_capability()
                .map_err(err("nvmlDeviceGetCudaComputeCapability"))?;
            Ok(NvmlDevice {
                index,
                uuid: device.uuid().map_err(err("nvmlDeviceGetUUID"))?,
                name: device.name().map_err(err("nvmlDeviceGetName"))?,
                compute_capability: (cc.major, cc.minor),
            })
        })
        .collect()
}

/// The record for one NVML device: arch is the compute capability as major*10+minor.
pub fn to_gpu_info(device: NvmlDevice, driver_version: Option<String>) -> Result<GpuInfo, Error> {
    let arch =
        cuda_arch(device.compute_capability.0, device.compute_capability.1).ok_or_else(|| {
            Error::NvmlData {
                device: device.index,
                reason: format!(
                    "compute capability {}.{} is not a valid CUDA architecture",
                    device.compute_capability.0, device.compute_capability.1
                ),
            }
        })?;
    if device.uuid.trim().is_empty() {
        return Err(Error::NvmlData {
            device: device.index,
            reason: "empty UUID".into(),
        });
    }
    Ok(GpuInfo {
        index: device.index,
        uuid: device.uuid,
        vendor: "nvidia".into(),
        product_name: device.name,
        backend: GpuBackend::Cuda,
        arch,
        warp_size: NVIDIA_WARP_SIZE,
        driver_version,
        source: GpuSource::Nvml,
    })
}

/// `"90"` for compute capability 9.0; `None` for values no GPU has (negative, minor >= 10,
/// major 0).
pub fn cuda_arch(major: i32, minor: i32) -> Option<String> {
    if major <= 0 || !(0..10).contains(&minor) {
        return None;
    }
    Some((major * 10 + minor).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_is_major_times_ten_plus_minor() {
        assert_eq!(cuda_arch(9, 0).as_deref(), Some("90"));
        assert_eq!(cuda_arch(8, 6).as_deref(), Some("86"));
        assert_eq!(cuda_arch(12, 0).as_deref(), Some("120"));
        assert_eq!(cuda_arch(0, 0), None);
        assert_eq!(cuda_arch(8, 10), None);
        assert_eq!(cuda_arch(-1, 0), None);
    }

    #[test]
    fn device_becomes_a_cuda_record() {
        let d = NvmlDevice {
            index: 1,
            uuid: "GPU-1234".into(),
            name: "NVIDIA A100-SXM4-80GB".into(),
            compute_capability: (8, 0),
        };
        let g = to_gpu_info(d, Some("580.65.06".into())).unwrap();
        assert_eq!(g.index, 1);
        assert_eq!(g.arch, "80");
        assert_eq!(g.backend, GpuBackend::Cuda);
        assert_eq!(g.warp_size, 32);
        assert_eq!(g.vendor, "nvidia");
        assert_eq!(g.source, GpuSource::Nvml);
        assert_eq!(g.driver_version.as_deref(), Some("580.65.06"));
    }

    #[test]
    fn nonsense_from_nvml_is_an_error_naming_the_device() {
        let d = NvmlDevice {
            index: 2,
            uuid: "GPU-1".into(),
            name: "x".into(),
            compute_capability: (0, 0),
        };
        let msg = to_gpu_info(d, None).unwrap_err().to_string();
        assert!(msg.contains("device 2") && msg.contains("0.0"), "{msg}");
    }

    #[test]
    fn only_load_and_driver_failures_mean_no_gpus() {
        assert!(means_no_nvidia_gpus(&NvmlError::DriverNotLoaded));
        assert!(means_no_nvidia_gpus(&NvmlError::LibraryNotFound));
        assert!(!means_no_nvidia_gpus(&NvmlError::NoPermission));
        assert!(!means_no_nvidia_gpus(&NvmlError::FailedToLoadSymbol(
            "nvmlInit_v2".into()
        )));
    }

    #[test]
    fn missing_library_is_no_gpus() {
        let gpus = discover(Some(Path::new("/nonexistent/libnvidia-ml.so.1"))).unwrap();
        assert!(gpus.is_empty());
    }
}
