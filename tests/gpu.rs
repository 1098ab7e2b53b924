//! The GPU inventory against fixture sysfs trees, a simulated inventory file, and the real
//! nvml-wrapper code driving a stub `libnvidia-ml` compiled from
//! `tests/fixtures/nvml-stub/nvml_stub.c`.

use std::path::{Path, PathBuf};
use std::process::Command;

use gkm::api::{GpuBackend, GpuInfo, GpuSource};
use gkm::gpu::{self, Inventory, Summary, Verdict};

fn fixture(rel: &str) -> PathBuf {
    gkm_testenv::workspace_root()
        .join("tests/fixtures")
        .join(rel)
}

/// An inventory that sees only the given sysfs tree: NVML points at a library that does
/// not exist, so a real NVIDIA GPU on the test machine cannot leak in.
fn amd_only(tree: &str) -> Inventory {
    Inventory {
        nvml_library: Some(PathBuf::from("/nonexistent/libnvidia-ml.so.1")),
        sysfs_root: fixture(&format!("gpu/{tree}")),
        simulated_file: None,
    }
}

/// An inventory that sees only the given NVML library (an empty sysfs tree).
fn nvml_only(lib: &Path, empty_sysfs: &Path) -> Inventory {
    Inventory {
        nvml_library: Some(lib.to_path_buf()),
        sysfs_root: empty_sysfs.to_path_buf(),
        simulated_file: None,
    }
}

#[test]
fn mi210_tree_has_one_cdna2_gpu() {
    let gpus = amd_only("kfd-mi210").discover().unwrap();
    assert_eq!(
        gpus,
        vec![GpuInfo {
            index: 0,
            uuid: "GPU-302862233cccb632".into(),
            vendor: "amd".into(),
            product_name: "aldebaran".into(),
            backend: GpuBackend::Hip,
            arch: "gfx90a".into(),
            warp_size: 64,
            driver_version: None,
            source: GpuSource::Sysfs,
        }]
    );
}

#[test]
fn mi300x_tree_has_two_gpus_in_node_order() {
    let gpus = amd_only("kfd-mi300x").discover().unwrap();
    assert_eq!(gpus.len(), 2, "{gpus:#?}");
    let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    assert_eq!(uuids, ["GPU-64744ae4536ce531", "GPU-b6728ba72d591132"]);
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g.index, i as u32);
        assert_eq!(g.arch, "gfx942");
        assert_eq!(g.warp_size, 64);
        assert_eq!(g.backend, GpuBackend::Hip);
        assert_eq!(g.vendor, "amd");
        // "ip discovery" is no product name.
        assert_eq!(g.product_name, "AMD gfx942");
        assert_eq!(g.driver_version.as_deref(), Some("6.12.12"));
        assert_eq!(g.source, GpuSource::Sysfs);
    }
}

#[test]
fn gfx1100_tree_has_one_rdna3_gpu_with_warp_32() {
    let gpus = amd_only("kfd-gfx1100").discover().unwrap();
    assert_eq!(gpus.len(), 1, "{gpus:#?}");
    let g = &gpus[0];
    assert_eq!(g.arch, "gfx1100");
    assert_eq!(g.warp_size, 32);
    // unique_id 0: the id comes from the node number.
    assert_eq!(g.uuid, "kfd-node-1");
    assert_eq!(g.product_name, "AMD gfx1100");
    assert_eq!(g.driver_version, None);
}

#[test]
fn simulated_file_is_the_whole_inventory() {
    let inv = Inventory {
        simulated_file: Some(fixture("gpu/simulated/mixed-node.yaml")),
        // Real sources that would add GPUs if they were consulted.
        sysfs_root: fixture("gpu/kfd-mi300x"),
        nvml_library: None,
    };
    let gpus = inv.discover().unwrap();
    let got: Vec<(u32, &str, &str, GpuBackend, &str, u32)> = gpus
        .iter()
        .map(|g| {
            (
                g.index,
                g.uuid.as_str(),
                g.product_name.as_str(),
                g.backend,
                g.arch.as_str(),
                g.warp_size,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                0,
                "GPU-5f3e0c9a-1b2d-4e6f-8a7b-9c0d1e2f3a4b",
                "NVIDIA H100 80GB HBM3",
                GpuBackend::Cuda,
                "90",
                32
            ),
            (
                1,
                "GPU-6457a1b2c3d4e5f6",
                "AMD Instinct MI300X",
                GpuBackend::Hip,
                "gfx942",
                64
            ),
            (
                5,
                "GPU-00000000000a1100",
                "Simulated gfx1100 GPU",
                GpuBackend::Hip,
                "gfx1100",
                32
            ),
        ]
    );
    assert!(gpus.iter().all(|g| g.source == GpuSource::Simulated));
    assert_eq!(gpus[0].driver_version.as_deref(), Some("580.65.06"));
    assert_eq!(gpus[1].vendor, "amd");
}

#[test]
fn bad_simulated_file_names_file_and_field() {
    let inv = Inventory {
        simulated_file: Some(fixture("gpu/simulated/bad-warp.json")),
        ..Default::default()
    };
    let msg = inv.discover().unwrap_err().to_string();
    assert!(
        msg.contains("bad-warp.json") && msg.contains("gpus[1].warpSize") && msg.contains("16"),
        "{msg}"
    );
}

#[test]
fn fixture_gpus_checked_against_a_cache_label() {
    let mut gpus = amd_only("kfd-mi210").discover().unwrap();
    gpus.extend(amd_only("kfd-mi300x").discover().unwrap());
    let summary = Summary::parse(
        r#"{"targets":[{"backend":"hip","arch":"gfx942","warp_size":64},
                       {"backend":"cuda","arch":90,"warp_size":32}]}"#,
    )
    .unwrap();
    let Verdict::Checked(c) = summary.check(&gpus) else {
        panic!("the label names targets")
    };
    assert_eq!(
        c.compatible,
        ["GPU-64744ae4536ce531", "GPU-b6728ba72d591132"]
    );
    assert_eq!(c.incompatible, ["GPU-302862233cccb632"]);
    assert_eq!(
        c.reasons,
        [
            "GPU-302862233cccb632 (aldebaran, hip gfx90a, warp 64): no target for arch gfx90a; \
          the cache has hip gfx942/warp 64, cuda sm_90/warp 32"
        ]
    );
    assert_eq!(
        Summary::parse(r#"{"targets":[]}"#).unwrap().check(&gpus),
        Verdict::NoGpuClaim
    );
}

/// Builds the NVML stub into `dir/libnvidia-ml.so.1` with the given `-D` defines.
fn build_stub(dir: &Path, defines: &[String]) -> PathBuf {
    let lib = dir.join("libnvidia-ml.so.1");
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(fixture("nvml-stub/nvml_stub.c"))
        .args(defines)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run gcc ({e}): the NVML tests build a stub libnvidia-ml with it; install gcc")
        });
    assert!(
        out.status.success(),
        "gcc failed to build the NVML stub:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

#[test]
fn nvml_stub_reports_two_h100s_and_is_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("shutdown.log");
    let lib = build_stub(
        dir.path(),
        &[format!("-DSTUB_SHUTDOWN_LOG=\"{}\"", log.display())],
    );
    let gpus = nvml_only(&lib, dir.path()).discover().unwrap();
    let expected = |index: u32, uuid: &str| GpuInfo {
        index,
        uuid: uuid.into(),
        vendor: "nvidia".into(),
        product_name: "NVIDIA H100 80GB HBM3".into(),
        backend: GpuBackend::Cuda,
        arch: "90".into(),
        warp_size: 32,
        driver_version: Some("580.65.06".into()),
        source: GpuSource::Nvml,
    };
    assert_eq!(
        gpus,
        vec![
            expected(0, "GPU-6f1a2b3c-0000-4d5e-8f90-a1b2c3d4e5f0"),
            expected(1, "GPU-6f1a2b3c-0001-4d5e-8f90-a1b2c3d4e5f1"),
        ]
    );
    // nvmlInit was balanced by exactly one nvmlShutdown.
    let calls = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("nvmlShutdown was never called ({e})"));
    assert_eq!(calls, "nvmlShutdown\n");

    let table = gpu::render_table(&gpus);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table.contains("NVIDIA H100 80GB HBM3") && table.contains("sm_90"),
        "{table}"
    );
}

#[test]
fn nvml_missing_library_means_no_nvidia_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let inv = nvml_only(&dir.path().join("libnvidia-ml.so.1"), dir.path());
    assert_eq!(inv.discover().unwrap(), Vec::new());
}

#[test]
fn nvml_without_kernel_driver_means_no_nvidia_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_stub(dir.path(), &["-DSTUB_DRIVER_NOT_LOADED".into()]);
    assert_eq!(nvml_only(&lib, dir.path()).discover().unwrap(), Vec::new());
}

#[test]
fn nvml_failure_after_init_names_call_and_device() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_stub(dir.path(), &["-DSTUB_UUID_FAILS_ON=1".into()]);
    let msg = nvml_only(&lib, dir.path())
        .discover()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("nvmlDeviceGetUUID") && msg.contains("device 1"),
        "{msg}"
    );
}

/// On a machine with real GPUs this reads them; without, it finds none. Either way the
/// default configuration must not fail.
#[test]
fn default_inventory_does_not_fail() {
    let gpus = Inventory::default().discover().unwrap();
    for g in &gpus {
        assert!(!g.uuid.is_empty() && !g.arch.is_empty(), "{g:?}");
        assert_ne!(g.source, GpuSource::Simulated);
    }
    println!("{}", gpu::render_table(&gpus));
}
