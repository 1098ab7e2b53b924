//! Path views: the group files of a cache, rewritten for the path a pod mounts it at.
//!
//! Triton's group files name their children by the absolute path the cache was captured
//! at, and a lookup keeps only the children that exist, so a cache mounted anywhere else
//! misses every kernel (measured on an H200 with Triton 3.6: the pod then crashes on a
//! read-only mount, or recompiles everything on a writable one). A view is a directory
//! that mirrors only the folders of the cache's group files and holds, for each one whose
//! children the pod would see elsewhere, a copy naming the children at the pod's path. The
//! node stacks it above the shared extracted tree as an overlay lower layer, so the tree
//! itself is never modified and every pod that mounts a digest at one path shares one view.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::triton::{self, MAX_JSON_BYTES};

/// Where a container sees the volume: its `volumeMounts[].mountPath`, and the `subPath` of
/// the volume it mounts there (empty for the whole volume).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountBase {
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub_path: String,
}

impl MountBase {
    /// The whole volume at `path`.
    pub fn at(path: impl Into<String>) -> Self {
        MountBase {
            path: path.into(),
            sub_path: String::new(),
        }
    }

    /// A stable name for this base: 32 hex digits of the sha256 of path and sub-path.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.path.as_bytes());
        h.update([0]);
        h.update(self.sub_path.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// Where the container sees the volume's file at `rel` (relative to the volume's root,
    /// `/`-separated), or `None` when its sub-path hides it.
    pub fn pod_path(&self, rel: &str) -> Option<String> {
        let sub = self.sub_path.trim_matches('/');
        let visible = if sub.is_empty() {
            rel
        } else if rel == sub {
            ""
        } else {
            rel.strip_prefix(sub)?.strip_prefix('/')?
        };
        let base = self.path.trim_end_matches('/');
        Some(match visible {
            "" if base.is_empty() => "/".to_string(),
            "" => base.to_string(),
            v => format!("{base}/{v}"),
        })
    }
}

impl std::fmt::Display for MountBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.sub_path.is_empty() {
            f.write_str(&self.path)
        } else {
            write!(f, "{} (subPath {})", self.path, self.sub_path)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ViewError + 'a {
    move |source| ViewError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`build`] found and wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Group files in the tree.
    pub groups: u64,
    /// Group files written into the view (those whose children the pod sees elsewhere
    /// than recorded, and that its sub-path does not hide).
    pub rewritten: u64,
}

/// Every group file of `tree`, as `(folder relative to the tree, file name)`, in a stable
/// order. Symbolic links are not followed.
pub fn group_files(tree: &Path) -> Result<Vec<(String, String)>, ViewError> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            tree.to_path_buf()
        } else {
            tree.join(&rel)
        };
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io("reading", &dir))?
            .collect::<Result<_, _>>()
            .map_err(io("reading", &dir))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let ft = e.file_type().map_err(io("reading", &e.path()))?;
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() && triton::is_group_file(&name) {
                out.push((rel.clone(), name));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A group file's children as the pod at `base` must see them, or `None` when nothing
/// changes (the children already name those paths, or the sub-path hides the group).
/// Children that were not recorded next to their group file are left as they are.
pub fn rewrite_group(
    rel_dir: &str,
    children: &BTreeMap<String, String>,
    base: &MountBase,
) -> Option<BTreeMap<String, String>> {
    base.pod_path(rel_dir)?;
    let mut changed = false;
    let rewritten = children
        .iter()
        .map(|(name, recorded)| {
            let moved = triton::capture_root(rel_dir, recorded).and_then(|_| {
                let file = recorded.rsplit_once('/')?.1;
                let rel = if rel_dir.is_empty() {
                    file.to_string()
                } else {
                    format!("{rel_dir}/{file}")
                };
                base.pod_path(&rel)
            });
            let path = moved.unwrap_or_else(|| recorded.clone());
            changed |= path != *recorded;
            (name.clone(), path)
        })
        .collect();
    changed.then_some(rewritten)
}

/// Writes the view of `tree` for `base` into `out` (an existing, empty directory): for each
/// group file [`rewrite_group`] changes, the rewritten file at the same relative path, in
/// folders that carry the tree's folder modes and owners (an overlay shows the upper-most
/// layer's folder attributes, so a view folder must not narrow who may enter). `out`
/// itself takes the tree root's mode and owner. Blocking.
pub fn build(tree: &Path, base: &MountBase, out: &Path) -> Result<ViewStats, ViewError> {
    let mut stats = ViewStats::default();
    copy_dir_attrs(tree, out)?;
    let mut made: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (rel_dir, name) in group_files(tree)? {
        stats.groups += 1;
        let src_dir = if rel_dir.is_empty() {
            tree.to_path_buf()
        } else {
            tree.join(&rel_dir)
        };
        let src = src_dir.join(&name);
        let meta = std::fs::symlink_metadata(&src).map_err(io("reading", &src))?;
        if meta.len() > MAX_JSON_BYTES {
            continue;
        }
        let bytes = std::fs::read(&src).map_err(io("reading", &src))?;
        let Some(children) = triton::parse_group(&bytes) else {
            continue;
        };
        let Some(rewritten) = rewrite_group(&rel_dir, &children, base) else {
            continue;
        };
        // The folders down to the group's, each once, with the tree's attributes.
        let mut rel = String::new();
        for part in rel_dir.split('/').filter(|p| !p.is_empty()) {
            if !rel.is_empty() {
                rel.push('/');
            }
            rel.push_str(part);
            if made.insert(rel.clone()) {
                let dst = out.join(&rel);
                std::fs::create_dir(&dst).map_err(io("creating", &dst))?;
                copy_dir_attrs(&tree.join(&rel), &dst)?;
            }
        }
        let dst = out.join(&rel_dir).join(&name);
        std::fs::write(&dst, triton::group_json(&rewritten)).map_err(io("writing", &dst))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o777))
            .map_err(io("setting the mode of", &dst))?;
        stats.rewritten += 1;
    }
    Ok(stats)
}

/// Gives `dst` the permission bits and owner of `src`.
fn copy_dir_attrs(src: &Path, dst: &Path) -> Result<(), ViewError> {
    let m = std::fs::metadata(src).map_err(io("reading", src))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .map_err(io("setting the mode of", dst))?;
    let (uid, gid) = (m.uid(), m.gid());
    let cur = std::fs::metadata(dst).map_err(io("reading", dst))?;
    if (cur.uid(), cur.gid()) != (uid, gid) {
        std::os::unix::fs::chown(dst, Some(uid), Some(gid))
            .map_err(io("setting the owner of", dst))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_paths_follow_the_mount_path_and_sub_path() {
        let b = MountBase::at("/cache/");
        assert_eq!(b.pod_path("KEY/a.cubin").unwrap(), "/cache/KEY/a.cubin");
        assert_eq!(b.pod_path("").unwrap(), "/cache");
        let s = MountBase {
            path: "/inductor".into(),
            sub_path: "triton/".into(),
        };
        assert_eq!(s.pod_path("triton/0/K/x").unwrap(), "/inductor/0/K/x");
        assert_eq!(s.pod_path("tritonx/0/K/x"), None, "not a path prefix");
        assert_eq!(s.pod_path("fxgraph/a"), None);
        assert_ne!(b.key(), s.key());
        assert_eq!(b.key().len(), 32);
    }

    #[test]
    fn groups_are_rewritten_only_where_the_pod_sees_them_elsewhere() {
        let children: BTreeMap<String, String> = [
            ("k.cubin".to_string(), "/tmp/tc/KEY/k.cubin".to_string()),
            ("k.json".to_string(), "/tmp/tc/KEY/k.json".to_string()),
            ("odd".to_string(), "/elsewhere/odd".to_string()),
        ]
        .into();
        let r = rewrite_group("KEY", &children, &MountBase::at("/mnt/kernels")).unwrap();
        assert_eq!(r["k.cubin"], "/mnt/kernels/KEY/k.cubin");
        assert_eq!(r["k.json"], "/mnt/kernels/KEY/k.json");
        assert_eq!(r["odd"], "/elsewhere/odd", "not next to its group: kept");
        assert_eq!(
            rewrite_group("KEY", &children, &MountBase::at("/tmp/tc")),
            None,
            "mounted where it was captured: nothing to change"
        );
        let hidden = MountBase {
            path: "/x".into(),
            sub_path: "other".into(),
        };
        assert_eq!(rewrite_group("KEY", &children, &hidden), None);
    }

    #[test]
    fn a_view_holds_rewritten_groups_in_folders_with_the_trees_modes() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        let key = tree.join("triton/0/KEY");
        std::fs::create_dir_all(&key).unwrap();
        std::fs::write(key.join("k.cubin"), b"\x7fELF").unwrap();
        std::fs::write(
            key.join("__grp__k.json"),
            br#"{"child_paths": {"k.cubin": "/tmp/ic/triton/0/KEY/k.cubin"}}"#,
        )
        .unwrap();
        std::fs::write(tree.join("triton/not_a_group.json"), b"{}").unwrap();
        std::fs::set_permissions(tree.join("triton"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        let out = d.path().join("view");
        std::fs::create_dir(&out).unwrap();
        let stats = build(&tree, &MountBase::at("/cache"), &out).unwrap();
        assert_eq!(
            stats,
            ViewStats {
                groups: 1,
                rewritten: 1
            }
        );
        let g =
            triton::parse_group(&std::fs::read(out.join("triton/0/KEY/__grp__k.json")).unwrap())
                .unwrap();
        assert_eq!(g["k.cubin"], "/cache/triton/0/KEY/k.cubin");
        assert!(
            !out.join("triton/0/KEY/k.cubin").exists(),
            "only group files"
        );
        assert!(!out.join("triton/not_a_group.json").exists());
        let mode = std::fs::metadata(out.join("triton")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o751);
    }
}
