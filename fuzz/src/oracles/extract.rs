//! Layer extraction (`gkm::oci::extract::Extractor`): one to four layers, each a tar stream,
//! plain or compressed, applied in order into an empty root in a fresh temporary directory,
//! then `finish`ed, as the agent's pull does.
//!
//! Input: byte 0 chooses the encoding of every layer: bits 0-1 are 0 for plain tar, 1 for
//! tar that this harness gzips, 2 for tar that it compresses with zstd, 3 for bytes handed
//! to the decoder as they are (bit 2 chooses zstd over gzip). The rest is the layers,
//! separated by [`LAYER_SEPARATOR`].
//!
//! Checks, whatever the outcome:
//! - no panic (tar-rs, the decoders, the extractor's header guard);
//! - nothing is created, removed or changed next to the root (a sibling directory holds a
//!   canary file whose listing, size, mode, link count and content must not change);
//! - the totals stay within the limits given;
//! - an error's message stays short (names are quoted at most 256 bytes long).
//!
//! And when extraction succeeds, on the final tree:
//! - only directories, regular files and symlinks, with no setuid/setgid bit;
//! - the bytes of the distinct regular files are at most the bytes counted;
//! - every symlink resolves beneath the root as the kernel follows it (`openat2` with
//!   `RESOLVE_BENEATH`, which fails with `EXDEV` on any step above the root).
//!
//! Memory stays bounded: libFuzzer's `-rss_limit_mb` (scripts/fuzz.sh) fails the run.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use gkm::oci::extract::Extractor;
use gkm::oci::{Compression, Limits, Totals};

use super::split_on;

/// Separates layers in the input.
pub const LAYER_SEPARATOR: &[u8] = b"GKMLAYER";

/// Small limits, so that the fuzzer reaches them and each run stays fast.
pub const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_entries: 512,
};

/// Longest error message accepted (entry and target names are quoted at most 256 bytes).
const MAX_ERROR_MESSAGE: usize = 4096;

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("gkm-fuzz-extract-")
        .tempdir()
        .expect("a temporary directory");
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir(&root).expect("create root");
    fs::create_dir(&outside).expect("create sibling");
    fs::write(outside.join("canary"), b"canary").expect("write canary");
    let before = snapshot(&outside);

    let result = extract(&root, mode, rest);

    let mut names: Vec<_> = fs::read_dir(dir.path())
        .expect("list the temporary directory")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outside", "root"],
        "extraction changed what is next to the root"
    );
    assert_eq!(
        snapshot(&outside),
        before,
        "extraction changed a directory next to the root"
    );
    match result {
        Ok(totals) => check_tree(&root, totals),
        Err(message) => assert!(
            message.len() <= MAX_ERROR_MESSAGE,
            "an error message of {} bytes: {}...",
            message.len(),
            message.chars().take(300).collect::<String>()
        ),
    }
    make_removable(&root);
}

/// Applies the layers and finishes; the totals, or the error's message.
fn extract(root: &Path, mode: u8, layers: &[u8]) -> Result<Totals, String> {
    let mut ex = Extractor::new(root, LIMITS).expect("open the root");
    for (i, layer) in split_on(layers, LAYER_SEPARATOR, 4).into_iter().enumerate() {
        let (bytes, compression) = encode(mode, layer);
        let r = ex.apply_layer(&bytes[..], compression, &format!("sha256:layer{i}"));
        let t = ex.totals();
        assert!(t.bytes <= LIMITS.max_bytes, "{t:?} over {LIMITS:?}");
        assert!(t.entries <= LIMITS.max_entries + 1, "{t:?} over {LIMITS:?}");
        r.map_err(|e| e.to_string())?;
    }
    ex.finish().map_err(|e| e.to_string())
}

/// The layer's bytes as the extractor reads them, and their compression.
fn encode(mode: u8, layer: &[u8]) -> (Vec<u8>, Compression) {
    match mode & 3 {
        0 => (layer.to_vec(), Compression::None),
        1 => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(layer).expect("gzip into memory");
            (gz.finish().expect("gzip into memory"), Compression::Gzip)
        }
        2 => (
            zstd::encode_all(layer, 1).expect("zstd into memory"),
            Compression::Zstd,
        ),
        _ if mode & 4 == 0 => (layer.to_vec(), Compression::Gzip),
        _ => (layer.to_vec(), Compression::Zstd),
    }
}

/// One entry of a [`snapshot`]: name, size, mode, link count, content.
type Seen = (Vec<u8>, u64, u32, u64, Vec<u8>);

/// What must not change in a directory: each entry's name, size, mode, link count and
/// content.
fn snapshot(dir: &Path) -> Vec<Seen> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            let m = fs::symlink_metadata(e.path()).expect("stat");
            let content = if m.is_file() {
                fs::read(e.path()).expect("read")
            } else {
                Vec::new()
            };
            (
                e.file_name().as_bytes().to_vec(),
                m.len(),
                m.mode(),
                m.nlink(),
                content,
            )
        })
        .collect();
    out.sort();
    out
}

/// The properties of a successfully extracted tree.
fn check_tree(root: &Path, totals: Totals) {
    assert!(totals.bytes <= LIMITS.max_bytes, "{totals:?}");
    let root_fd = rustix::fs::open(
        root,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .expect("open root");
    let mut inodes = HashSet::new();
    let mut file_bytes = 0u64;
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(OsStr::from_bytes(&rel));
        // The extractor may have left a directory unreadable (mode 0): open it up to walk it.
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        for e in fs::read_dir(&dir).expect("list an extracted directory") {
            let e = e.expect("entry");
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(e.file_name().as_bytes());
            let m = fs::symlink_metadata(e.path()).expect("stat");
            let shown = String::from_utf8_lossy(&path);
            assert_eq!(m.mode() & 0o6000, 0, "{shown:?} kept a setuid/setgid bit");
            let ft = m.file_type();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                if inodes.insert((m.dev(), m.ino())) {
                    file_bytes += m.len();
                }
            } else if ft.is_symlink() {
                check_symlink(&root_fd, &path);
            } else {
                panic!("{shown:?} is neither a directory, a file nor a symlink: {ft:?}");
            }
        }
    }
    assert!(
        file_bytes <= totals.bytes,
        "{file_bytes} bytes in the tree, {totals:?} counted"
    );
}

/// A symlink of the final tree must resolve beneath the root.
fn check_symlink(root: &impl rustix::fd::AsFd, path: &[u8]) {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let r = rustix::fs::openat2(
        root,
        OsStr::from_bytes(path),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    );
    assert!(
        !matches!(r, Err(rustix::io::Errno::XDEV)),
        "symlink {:?} resolves outside the root",
        String::from_utf8_lossy(path)
    );
}

/// Lets the temporary directory's removal enter every directory, whatever mode the layer
/// gave it (the walk in `check_tree` does the same on success).
fn make_removable(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
}
