//! What an extracted tree held when GKM wrote it, and whether it still does.
//!
//! At extraction, after the last layer and before the tree becomes visible, the store
//! records every entry of `rootfs/` in `tree.json` beside `meta.json`: directories with
//! their mode, regular files with mode, size and sha256, symlinks with their target. The
//! bytes come straight from layers whose digests were checked while they streamed, so the
//! record is what the image holds. [`compare`] (pure) names every difference between a
//! record and a fresh walk: a file changed, added, removed, retyped or re-moded behind
//! GKM's back.
//!
//! The walk reads every byte back (from the page cache right after an extraction);
//! `docs/reliability.md` gives its cost per GiB.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file name of the record, beside `meta.json`.
pub const RECORD_FILE: &str = "tree.json";

/// Bumped when the record's meaning changes; a record of another version is not compared.
pub const RECORD_VERSION: u32 = 1;

/// One entry under `rootfs/`, by its path relative to it (`/`-separated; a name that is not
/// UTF-8 is recorded lossily, on both sides of a comparison alike).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        size: u64,
        sha256: String,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// Anything else (GKM's extraction refuses devices and FIFOs, so it appears only when
    /// something was added behind its back).
    Other {
        path: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Other { path } => path,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Entry::Dir { .. } => "directory",
            Entry::File { .. } => "file",
            Entry::Symlink { .. } => "symlink",
            Entry::Other { .. } => "special file",
        }
    }
}

/// `tree.json`: the entries, sorted by path.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Record {
    pub version: u32,
    pub entries: Vec<Entry>,
}

impl Record {
    /// Total bytes of the regular files.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }
}

/// One way a tree differs from its record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    Missing {
        path: String,
    },
    Added {
        path: String,
    },
    /// Same path, another kind, mode, size, content or link target: `what` says which.
    Changed {
        path: String,
        what: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Missing { path } => write!(f, "{path}: missing"),
            Difference::Added { path } => write!(f, "{path}: not in the image"),
            Difference::Changed { path, what } => write!(f, "{path}: {what}"),
        }
    }
}

/// Walks `root` without following symlinks and records every entry, hashing each regular
/// file. Errors name the path.
pub fn record(root: &Path) -> io::Result<Record> {
    let mut entries = Vec::new();
    walk(root, root, &mut entries)?;
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(Record {
        version: RECORD_VERSION,
        entries,
    })
}

fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> io::Result<()> {
    let named = |e: io::Error, p: &Path| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    for child in fs::read_dir(dir).map_err(|e| named(e, dir))? {
        let child = child.map_err(|e| named(e, dir))?;
        let path = child.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| named(e, &path))?;
        let rel = relative(root, &path);
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push(Entry::Dir { path: rel, mode });
            walk(root, &path, out)?;
        } else if ft.is_file() {
            out.push(Entry::File {
                path: rel,
                mode,
                size: meta.len(),
                sha256: hash_file(&path).map_err(|e| named(e, &path))?,
            });
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(|e| named(e, &path))?;
            out.push(Entry::Symlink {
                path: rel,
                target: String::from_utf8_lossy(target.as_os_str().as_bytes()).into_owned(),
            });
        } else {
            out.push(Entry::Other { path: rel });
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Every difference between `expected` (the record) and `actual` (a fresh walk), in path
/// order. Empty when the tree is as extracted.
pub fn compare(expected: &Record, actual: &Record) -> Vec<Difference> {
    let mut out = Vec::new();
    let (mut a, mut b) = (
        expected.entries.iter().peekable(),
        actual.entries.iter().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(e), None) => {
                out.push(Difference::Missing {
                    path: e.path().into(),
                });
                a.next();
            }
            (None, Some(g)) => {
                out.push(Difference::Added {
                    path: g.path().into(),
                });
                b.next();
            }
            (Some(e), Some(g)) => match e.path().cmp(g.path()) {
                std::cmp::Ordering::Less => {
                    out.push(Difference::Missing {
                        path: e.path().into(),
                    });
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push(Difference::Added {
                        path: g.path().into(),
                    });
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if let Some(what) = changed(e, g) {
                        out.push(Difference::Changed {
                            path: e.path().into(),
                            what,
                        });
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

/// How `found` differs from `expected` at the same path, in words.
fn changed(expected: &Entry, found: &Entry) -> Option<String> {
    match (expected, found) {
        (Entry::Dir { mode: m1, .. }, Entry::Dir { mode: m2, .. }) => {
            (m1 != m2).then(|| format!("mode {m2:o}, recorded {m1:o}"))
        }
        (
            Entry::File {
                mode: m1,
                size: s1,
                sha256: h1,
                ..
            },
            Entry::File {
                mode: m2,
                size: s2,
                sha256: h2,
                ..
            },
        ) => {
            if s1 != s2 {
                Some(format!("{s2} bytes, recorded {s1}"))
            } else if h1 != h2 {
                Some(format!("content changed (sha256 {h2}, recorded {h1})"))
            } else {
                (m1 != m2).then(|| format!("mode {m2:o}, recorded {m1:o}"))
            }
        }
        (Entry::Symlink { target: t1, .. }, Entry::Symlink { target: t2, .. }) => {
            (t1 != t2).then(|| format!("points to {t2:?}, recorded {t1:?}"))
        }
        (Entry::Other { .. }, Entry::Other { .. }) => None,
        (e, f) => Some(format!("a {}, recorded as a {}", f.kind(), e.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::write(d.path().join("a/b/k.cubin"), b"kernel").unwrap();
        fs::write(d.path().join("a/k.json"), b"{}").unwrap();
        std::os::unix::fs::symlink("b/k.cubin", d.path().join("a/link")).unwrap();
        d
    }

    #[test]
    fn an_untouched_tree_matches_its_record() {
        let d = tree();
        let r = record(d.path()).unwrap();
        assert_eq!(r.entries.len(), 5, "{r:?}");
        assert_eq!(r.bytes(), 8);
        assert!(compare(&r, &record(d.path()).unwrap()).is_empty());
        // The record survives its JSON form.
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn every_kind_of_change_is_named() {
        let d = tree();
        let before = record(d.path()).unwrap();
        fs::write(d.path().join("a/b/k.cubin"), b"KERNEL").unwrap(); // same size
        fs::remove_file(d.path().join("a/k.json")).unwrap();
        fs::write(d.path().join("a/extra"), b"x").unwrap();
        fs::remove_file(d.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("a/link")).unwrap();
        fs::set_permissions(d.path().join("a/b"), fs::Permissions::from_mode(0o777)).unwrap();
        let diffs: Vec<String> = compare(&before, &record(d.path()).unwrap())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(diffs.len(), 5, "{diffs:#?}");
        assert!(diffs[0].starts_with("a/b: mode 777"), "{diffs:#?}");
        assert!(
            diffs[1].starts_with("a/b/k.cubin: content changed"),
            "{diffs:#?}"
        );
        assert_eq!(diffs[2], "a/extra: not in the image");
        assert_eq!(diffs[3], "a/k.json: missing");
        assert!(diffs[4].contains("/etc/passwd"), "{diffs:#?}");
    }

    #[test]
    fn a_file_replaced_by_a_symlink_is_a_change_of_kind() {
        let d = tree();
        let before = record(d.path()).unwrap();
        fs::remove_file(d.path().join("a/k.json")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("a/k.json")).unwrap();
        let diffs = compare(&before, &record(d.path()).unwrap());
        assert_eq!(
            diffs,
            [Difference::Changed {
                path: "a/k.json".into(),
                what: "a symlink, recorded as a file".into()
            }]
        );
    }
}
