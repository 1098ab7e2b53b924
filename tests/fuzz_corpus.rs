//! The fuzz targets' checks (fuzz/src/oracles, docs/fuzzing.md) as normal tests: each
//! replays its target's seed corpus and a fixed set of mutants of it, so `cargo test`
//! runs a few seconds of every fuzzer without libFuzzer. The named tests below are inputs
//! the coverage-guided fuzzer found failing, kept after the fix.

#[path = "../fuzz/src/oracles/mod.rs"]
mod oracles;
#[path = "../fuzz/src/replay.rs"]
mod replay;

use std::path::PathBuf;

fn corpus(target: &str) -> PathBuf {
    gkm_testenv::workspace_root()
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, check: fn(&[u8]), mutants: usize) {
    let n = replay::replay(target, &corpus(target), check, mutants);
    assert!(n > mutants);
}

#[test]
fn fuzz_corpus_extract() {
    replay("extract", oracles::extract::check, 1500);
}

#[test]
fn fuzz_corpus_reference() {
    replay("reference", oracles::reference::check, 5000);
}

#[test]
fn fuzz_corpus_labels() {
    replay("labels", oracles::labels::check, 5000);
}

#[test]
fn fuzz_corpus_triton() {
    replay("triton", oracles::triton::check, 5000);
}

#[test]
fn fuzz_corpus_view() {
    replay("view", oracles::view::check, 5000);
}

#[test]
fn fuzz_corpus_csi() {
    replay("csi", oracles::csi::check, 5000);
}

// Inputs the fuzzers found failing, each kept as the test of what it exercises.

/// triton: `python_abi` read `.0", "nam6_64-linux-gnu.so` (the third line here) as an
/// extension module with ABI tag `0", "nam6_64-linux-gnu`: no module name, and a tag that
/// could hold the comma that separates the `python-abis` label's values.
#[test]
fn fuzz_triton_python_abi_needs_a_module_name_and_a_plain_tag() {
    use gkm::kernel_cache::triton::python_abi;
    oracles::triton::check(
        b"{\"target\": {\"backend\": \"hip\", \"arch\": \"gfx942:sramecc+:xnack-\", \"warp_size\": 64}, {triton_versiamecc+:xnack-\", \"warp_size\": 64}, \"triton_version\": \"3.6ton_launcher.cpython-312-x86_64-linux-gnu.so\n.0\", \"nam6_64-linux-gnu.so\ne\": \"k\"}",
    );
    assert_eq!(python_abi(".abi3.so"), None);
    assert_eq!(python_abi("m.abi3,cpython-312.so"), None);
    assert_eq!(python_abi("m.abi3.so"), Some("abi3"));
}

/// triton: kernel metadata whose arch normalises to nothing (`:gfx942:...` keeps what is
/// before the first `:`) was accepted with arch "", and `gkm build` would have written a
/// summary label that every node refuses to parse.
#[test]
fn fuzz_triton_metadata_arch_that_normalises_to_nothing_is_refused() {
    let input = br#"{"target": {"backend": "hip", "arch": ":gfx942:sramecc+:xnack-", "warp_size": 64}, "triton_version": "[.6.0", "name": "k"}"#;
    oracles::triton::check(input);
    assert!(gkm::kernel_cache::triton::KernelMetadata::parse(input).is_err());
}

/// reference: `r1B5000/x__y/z-1.2:t5` parsed (as oci-spec parses it) to the Docker Hub
/// repository `r1B5000/x__y/z-1.2`, whose `whole()`, `docker.io/r1B5000/...`, no parser
/// accepts; Docker refuses such a name as not lowercase, and so does GKM now.
#[test]
fn fuzz_reference_uppercase_docker_hub_repository_is_refused() {
    oracles::reference::check(b"r1B5000/x__y/z-1.2:t5");
    assert!(gkm::oci::parse_reference("r1B5000/x__y/z-1.2:t5").is_err());
    assert!(gkm::oci::parse_reference("r1b5000/x__y/z-1.2:t5").is_ok());
}

/// triton: a `triton_version` of `3.,.0` was kept, and `gkm build` would have listed it in
/// the comma-separated `triton-versions` label as the two versions `3.` and `.0`.
#[test]
fn fuzz_triton_version_with_a_comma_is_left_out() {
    let input = br#"{"target": {"backend": "hip", "arch": "ck-", "warp_size": 64}, "triton_version": "3.,.0", "name": "k"}"#;
    oracles::triton::check(input);
    let m = gkm::kernel_cache::triton::KernelMetadata::parse(input)
        .unwrap()
        .unwrap();
    assert_eq!(m.triton_version, None);
}

/// labels: a summary label whose `backend` is a 2 KB string gave a 2.3 KB error (serde's
/// message quotes the value whole), which goes into node status and logs; the label itself
/// was already cut to 200 characters, now serde's message is too.
#[test]
fn fuzz_labels_summary_error_stays_short_for_a_long_value() {
    let input =
        std::fs::read(gkm_testenv::workspace_root().join("fuzz/regressions/labels-long-backend"))
            .unwrap();
    oracles::labels::check(&input);
    let long = format!(
        r#"{{"targets":[{{"backend":"{}","arch":"90","warp_size":32}}]}}"#,
        "x".repeat(1 << 20)
    );
    let e = gkm::gpu::Summary::parse(&long).unwrap_err().to_string();
    assert!(e.len() < 1024, "{} bytes", e.len());
}

/// view: a group child recorded as `/` (no file name) was moved to the mount path itself,
/// `/acche`, and rewriting that view again moved it to `/acche/acche`: `capture_root` now
/// needs a file name, so such a child is left as it is.
#[test]
fn fuzz_view_child_without_a_file_name_is_not_moved() {
    oracles::view::check(b"\n/acche\n\n{\"child_paths\": {\"adde\": \"/\"}}");
    assert_eq!(gkm::kernel_cache::triton::capture_root("", "/"), None);
    assert_eq!(
        gkm::kernel_cache::triton::capture_root("K", "/tmp/K/"),
        None
    );
}

/// csi: `volume_of_target` drops `..` components (it keeps only normal ones), so
/// `.../kernels/mount/../` named the volume `kernels`. Only a target path that
/// `validate_target` accepted reaches it, and that refuses `..`; `crates/node/src/csi/pods.rs` is left
/// as it is (docs/fuzzing.md, Findings).
#[test]
fn fuzz_csi_target_with_dot_dot_never_reaches_volume_of_target() {
    let input = b"\x01/..i-0a1b2c\"b/var/lib/kubelet/pods/6d6ce3b-22a4\x00-4a8e-9a43-1c2f0e8d7b11/volumes/kubernetes.io~csi/kernels/mount/../";
    oracles::csi::check(input);
    let target = std::str::from_utf8(&input[1..]).unwrap();
    assert!(gkm::csi::validate_target(target).is_err());
    // And the function itself refuses a `..`, should it ever see one.
    let path = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/kernels/mount/../";
    assert_eq!(
        gkm::csi::pods::volume_of_target(std::path::Path::new(path), ""),
        None
    );
    let path = path.trim_end_matches("../");
    assert_eq!(
        gkm::csi::pods::volume_of_target(std::path::Path::new(path), "u1").as_deref(),
        Some("kernels")
    );
}
