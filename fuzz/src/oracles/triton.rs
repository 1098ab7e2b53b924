//! The Triton files `gkm build` reads (`gkm::kernel_cache::triton`): kernel metadata, group
//! files, and the names and paths in them. Input: the bytes of one JSON file, read as
//! metadata and as a group file; its first three lines (UTF-8) are also read as a group
//! file's folder, a child's recorded path, and a file name.
//!
//! Checks:
//! - `KernelMetadata::parse` never panics, and a target it accepts has a positive warp
//!   size and a non-blank arch, and survives the summary label `gkm build` writes from it:
//!   `Summary::parse` reads the same target back (a target it cannot read back would make
//!   every node refuse the image);
//! - `parse_group` then `group_json` then `parse_group` gives the same children;
//! - `capture_root(dir, recorded)` is a prefix that, with `/<dir>/<file>`, rebuilds the
//!   recorded path;
//! - `python_abi(name)` is a non-empty, dot-free tag that `name` ends with
//!   (`<module>.<tag>.so`);
//! - a Python ABI tag or a `triton_version` read from these files, written into the
//!   comma-separated label `gkm build` writes it to, reads back as that one value.

use std::collections::BTreeMap;

use gkm::gpu::compat::Summary;
use gkm::kernel_cache::labels::{PYTHON_ABIS, TRITON_VERSIONS};
use gkm::kernel_cache::triton::{
    KernelMetadata, capture_root, group_json, parse_group, python_abi,
};
use gkm::kernel_cache::{CacheKind, CacheLabels};

use super::fields;

pub fn check(data: &[u8]) {
    check_metadata(data);
    if let Some(children) = parse_group(data) {
        let bytes = group_json(&children);
        assert_eq!(parse_group(&bytes).as_ref(), Some(&children));
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let f = fields(s.as_bytes(), 4);
    let text = |i: usize| {
        f.get(i)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    };
    check_capture_root(text(0), text(1));
    check_python_abi(text(2));
    check_python_abi(text(1).rsplit('/').next().unwrap_or(""));
}

fn check_metadata(data: &[u8]) {
    let Ok(Some(m)) = KernelMetadata::parse(data) else {
        return;
    };
    assert!(m.target.warp_size > 0, "{m:?}");
    assert!(!m.target.arch.trim().is_empty(), "blank arch from {m:?}");
    let label = serde_json::to_string(&Summary {
        targets: vec![m.target.clone()],
    })
    .expect("a summary serialises");
    let read = Summary::parse(&label).unwrap_or_else(|e| {
        panic!(
            "metadata target {:?} gives a label nodes refuse: {e}",
            m.target
        )
    });
    assert_eq!(read.targets, vec![m.target]);
    if let Some(v) = &m.triton_version {
        assert_listed_as_itself(TRITON_VERSIONS, v);
    }
}

fn check_capture_root(rel_dir: &str, recorded: &str) {
    let Some(root) = capture_root(rel_dir, recorded) else {
        return;
    };
    let (_, file) = recorded
        .rsplit_once('/')
        .expect("a recorded path with a '/'");
    let suffix = if rel_dir.is_empty() {
        format!("/{file}")
    } else {
        format!("/{rel_dir}/{file}")
    };
    assert!(
        format!("{root}{suffix}") == recorded || (root == "/" && suffix == recorded),
        "capture_root({rel_dir:?}, {recorded:?}) = {root:?}"
    );
}

fn check_python_abi(name: &str) {
    let Some(tag) = python_abi(name) else {
        return;
    };
    assert!(!tag.is_empty() && !tag.contains('.'), "{name:?} → {tag:?}");
    assert!(
        name.ends_with(&format!(".{tag}.so")) && name.len() > tag.len() + 4,
        "{name:?} → {tag:?}: no module name"
    );
    assert_listed_as_itself(PYTHON_ABIS, tag);
}

/// A value `gkm build` writes into a comma-separated label (`python-abis`,
/// `triton-versions`) reads back as that one value.
fn assert_listed_as_itself(key: &str, value: &str) {
    let labels = BTreeMap::from([(CacheKind::Triton.label(key), value.to_string())]);
    let read = CacheLabels::read(&labels);
    let listed = match key {
        PYTHON_ABIS => read.python_abis,
        _ => read.triton_versions,
    };
    assert_eq!(listed, [value], "{value:?} in the {key} label");
}
