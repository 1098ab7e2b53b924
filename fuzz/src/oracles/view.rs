//! Path views (`gkm::kernel_cache::view`): a group file's children rewritten for the path
//! a pod mounts the cache at. Input: three lines (the group file's folder relative to the
//! cache root, the mount path, the sub-path), then a group file's JSON.
//!
//! Checks:
//! - `MountBase::pod_path` never hides a path when there is no sub-path, and every path it
//!   gives ends with the part of the file's path the sub-path leaves visible;
//! - `rewrite_group` keeps the children's names, moves a child only to the pod path of
//!   `<folder>/<its file>` (under the mount path), and is idempotent: rewriting its own
//!   output changes nothing, so a view rebuilt from a view is the same view;
//! - `MountBase::key` is 32 hex digits.

use std::collections::BTreeMap;

use gkm::kernel_cache::MountBase;
use gkm::kernel_cache::triton::parse_group;
use gkm::kernel_cache::view::rewrite_group;

use super::fields;

pub fn check(data: &[u8]) {
    let f = fields(data, 4);
    let text = |i: usize| f.get(i).and_then(|b| std::str::from_utf8(b).ok());
    let (Some(rel_dir), Some(path), Some(sub_path)) = (text(0), text(1), text(2)) else {
        return;
    };
    let base = MountBase {
        path: path.to_string(),
        sub_path: sub_path.to_string(),
    };
    let key = base.key();
    assert!(key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()));
    check_pod_path(&base, rel_dir);
    let children = f.get(3).and_then(|b| parse_group(b)).unwrap_or_default();
    for recorded in children.values() {
        if let Some((_, file)) = recorded.rsplit_once('/') {
            let rel = if rel_dir.is_empty() {
                file.to_string()
            } else {
                format!("{rel_dir}/{file}")
            };
            check_pod_path(&base, &rel);
        }
    }
    check_rewrite(rel_dir, &children, &base);
}

fn check_pod_path(base: &MountBase, rel: &str) {
    let sub = base.sub_path.trim_matches('/');
    let Some(p) = base.pod_path(rel) else {
        assert!(!sub.is_empty(), "{base:?} hides {rel:?} without a sub-path");
        return;
    };
    let visible = if sub.is_empty() {
        rel
    } else if rel == sub {
        ""
    } else {
        rel.strip_prefix(sub)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or_else(|| panic!("{base:?} shows {rel:?} at {p:?}, outside its sub-path"))
    };
    assert!(p.ends_with(visible), "{base:?}: {rel:?} at {p:?}");
    let mount = base.path.trim_end_matches('/');
    assert!(
        p.starts_with(mount) || (mount.is_empty() && p.starts_with('/')),
        "{base:?}: {rel:?} at {p:?}, outside the mount path"
    );
}

fn check_rewrite(rel_dir: &str, children: &BTreeMap<String, String>, base: &MountBase) {
    let Some(new) = rewrite_group(rel_dir, children, base) else {
        return;
    };
    assert!(base.pod_path(rel_dir).is_some(), "rewrote a hidden group");
    assert!(
        new.keys().eq(children.keys()),
        "rewriting changed the children's names"
    );
    assert_ne!(&new, children, "a rewrite that changes nothing");
    for (name, path) in &new {
        let recorded = &children[name];
        if path == recorded {
            continue;
        }
        let file = recorded
            .rsplit_once('/')
            .map(|(_, f)| f)
            .unwrap_or_else(|| panic!("moved {recorded:?}, which names no folder"));
        let rel = if rel_dir.is_empty() {
            file.to_string()
        } else {
            format!("{rel_dir}/{file}")
        };
        assert_eq!(Some(path), base.pod_path(&rel).as_ref(), "{recorded:?}");
    }
    assert_eq!(
        rewrite_group(rel_dir, &new, base),
        None,
        "rewriting a rewritten group changes it again: {children:?} → {new:?}"
    );
}
