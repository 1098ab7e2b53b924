//! Hardened, streaming extraction of OCI layer tarballs into one directory.
//!
//! Every filesystem call is made relative to a directory file descriptor, walking one path
//! component at a time with `O_NOFOLLOW`: extraction never follows a symlink, so no entry
//! can write outside the root, whatever earlier entries or layers put there. On top:
//! - `..` components and absolute paths are refused;
//! - symlinks whose target is absolute or climbs above the root, and hard links to paths
//!   outside the tree, are refused;
//! - device nodes, fifos and sparse files are refused;
//! - setuid/setgid bits are cleared (and logged);
//! - a path that appears twice in one layer is refused;
//! - total file bytes and entry count are bounded across all layers.
//!
//! A refused entry fails the whole extraction with an error naming the entry; the caller
//! extracts into a temporary directory and discards it, so nothing partial is ever visible.
//! Whiteouts (`.wh.<name>`, `.wh..wh..opq`) remove what lower layers put there.
//!
//! Symlink targets are checked lexically. A chain of links that each stay inside can still
//! resolve to the parent of the root when a pod reads them; that only reaches the pod's own
//! filesystem, and nothing on the host follows links in the store.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, Timestamps};
use rustix::io::Errno;
use tracing::warn;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Bounds on what one image may extract to, across all its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of regular-file content.
    pub max_bytes: u64,
    /// Total tar entries (files, directories, links, whiteouts).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsafe {
    #[error("its path contains '..'")]
    ParentTraversal,
    #[error("its path is absolute")]
    AbsolutePath,
    #[error("it is a symlink to {0:?}, outside the image root")]
    SymlinkEscape(String),
    #[error("it is a hard link to {0:?}, outside the image root")]
    HardlinkEscape(String),
    #[error("it is a hard link to {0:?}, which does not exist in the image")]
    HardlinkMissing(String),
    #[error("a parent directory ({0:?}) is a symlink")]
    ThroughSymlink(String),
    #[error("a parent ({0:?}) is not a directory")]
    ParentNotDirectory(String),
    #[error("it is a {0}, which a kernel cache must not contain")]
    SpecialFile(&'static str),
    #[error("it appears twice in the same layer")]
    Duplicate,
    #[error("its tar entry type {0:?} is not supported")]
    UnsupportedType(u8),
}

/// Errors of extraction; each names the entry and layer it happened at.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("refused entry {entry:?} of layer {layer}: {reason}")]
    Unsafe {
        entry: String,
        layer: String,
        reason: Unsafe,
    },
    #[error(
        "image exceeds the limit of {limit} bytes of file content at entry {entry:?} of layer {layer}"
    )]
    TooLarge {
        limit: u64,
        entry: String,
        layer: String,
    },
    #[error("image exceeds the limit of {limit} entries at entry {entry:?} of layer {layer}")]
    TooManyEntries {
        limit: u64,
        entry: String,
        layer: String,
    },
    #[error("layer {layer} is not a readable tar stream: {source}")]
    Corrupt { layer: String, source: io::Error },
    #[error("{op} {entry:?} (layer {layer}): {source}")]
    Io {
        op: &'static str,
        entry: String,
        layer: String,
        source: io::Error,
    },
}

/// What was extracted so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub entries: u64,
    pub bytes: u64,
    pub files: u64,
}

/// Extracts layers, in order, into one root directory.
pub struct Extractor {
    root: OwnedFd,
    limits: Limits,
    totals: Totals,
    preserve_owner: bool,
    layer: String,
    /// Normalised paths written by the current layer (duplicates, opaque whiteouts).
    layer_paths: HashSet<Vec<u8>>,
    /// The most recently used parent directory: tar streams group entries by directory.
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
    /// Directory modes and times, applied at the end so later entries can still be created.
    dir_attrs: Vec<(Vec<u8>, u32, u64)>,
    buf: Vec<u8>,
}

type Result<T, E = ExtractError> = std::result::Result<T, E>;

/// An entry path split into components, with `.` and empty components dropped.
fn normalise(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, Unsafe> {
    if raw.starts_with(b"/") {
        return Err(Unsafe::AbsolutePath);
    }
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Unsafe::ParentTraversal),
            c => comps.push(c),
        }
    }
    Ok(comps)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

/// Whether a symlink at `dir` (components below the root) pointing to `target` stays inside
/// the root, judged lexically.
fn symlink_stays_inside(dir: &[&[u8]], target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return false;
    }
    let mut depth = dir.len() as i64;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

impl Extractor {
    /// An extractor writing into the existing, empty directory `root`.
    pub fn new(root: &Path, limits: Limits) -> io::Result<Self> {
        let root = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_io)?;
        Ok(Self {
            root,
            limits,
            totals: Totals::default(),
            preserve_owner: rustix::process::geteuid().is_root(),
            layer: String::new(),
            layer_paths: HashSet::new(),
            parent_cache: None,
            dir_attrs: Vec::new(),
            buf: vec![0; 256 << 10],
        })
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Applies one layer. `name` identifies the layer in errors (its digest).
    pub fn apply_layer<R: Read>(
        &mut self,
        reader: R,
        compression: Compression,
        name: &str,
    ) -> Result<()> {
        self.layer = name.to_string();
        self.layer_paths.clear();
        self.parent_cache = None;
        let corrupt = |layer: &str, source: io::Error| ExtractError::Corrupt {
            layer: layer.to_string(),
            source,
        };
        let decoder: Box<dyn Read> = match compression {
            Compression::None => Box::new(reader),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(reader).map_err(|e| corrupt(name, e))?)
            }
        };
        let mut archive = tar::Archive::new(decoder);
        for entry in archive.entries().map_err(|e| corrupt(name, e))? {
            let mut entry = entry.map_err(|e| corrupt(name, e))?;
            self.apply_entry(&mut entry)?;
        }
        // Read to the end, so the caller's digest covers every byte of the blob.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| corrupt(name, e))?;
        Ok(())
    }

    /// Applies deferred directory modes and times. Call once, after the last layer.
    pub fn finish(mut self) -> Result<Totals> {
        // Deepest first, so a read-only parent is not locked before its children.
        let attrs = std::mem::take(&mut self.dir_attrs);
        for (path, mode, mtime) in attrs.iter().rev() {
            let comps: Vec<&[u8]> = path
                .split(|&b| b == b'/')
                .filter(|c| !c.is_empty())
                .collect();
            let Ok(fd) = self.open_dir_nofollow(&comps) else {
                continue; // removed by a later whiteout
            };
            let name = String::from_utf8_lossy(path).into_owned();
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(*mode))
                .map_err(|e| self.io_err("chmod", &name, e))?;
            let ts = timestamps(*mtime);
            rustix::fs::futimens(&fd, &ts).map_err(|e| self.io_err("set times of", &name, e))?;
        }
        Ok(self.totals)
    }

    fn io_err(&self, op: &'static str, entry: &str, e: Errno) -> ExtractError {
        ExtractError::Io {
            op,
            entry: entry.to_string(),
            layer: self.layer.clone(),
            source: errno_io(e),
        }
    }

    fn refuse(&self, entry: &str, reason: Unsafe) -> ExtractError {
        ExtractError::Unsafe {
            entry: entry.to_string(),
            layer: self.layer.clone(),
            reason,
        }
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let header = entry.header();
        let kind = header.entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }

        self.totals.entries += 1;
        if self.totals.entries > self.limits.max_entries {
            return Err(ExtractError::TooManyEntries {
                limit: self.limits.max_entries,
                entry: shown,
                layer: self.layer.clone(),
            });
        }

        let comps = normalise(&raw_path).map_err(|r| self.refuse(&shown, r))?;
        let Some((name, parent)) = comps.split_last() else {
            return Ok(()); // the root itself ("./")
        };
        let name: &[u8] = name;
        let full = join(&comps);

        // Whiteouts act on lower layers and are not materialised.
        if name == b".wh..wh..opq" {
            return self.opaque(parent, &shown);
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            return self.whiteout(parent, hidden, &shown);
        }

        if !self.layer_paths.insert(full.clone()) {
            return Err(self.refuse(&shown, Unsafe::Duplicate));
        }

        let mut mode = header.mode().map_err(|e| self.corrupt_entry(e))? & 0o7777;
        if mode & 0o6000 != 0 {
            warn!(entry = %shown, layer = %self.layer, mode = format!("{mode:o}"), "cleared setuid/setgid bits");
            mode &= !0o6000;
        }
        let mtime = header.mtime().unwrap_or(0);
        let owner = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));

        match kind {
            tar::EntryType::Directory => {
                let parent_fd = self.parent(parent, &shown)?;
                self.make_dir(&parent_fd, name, &shown)?;
                self.dir_attrs.push((full, mode, mtime));
                Ok(())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = header.size().map_err(|e| self.corrupt_entry(e))?;
                if self.totals.bytes + size > self.limits.max_bytes {
                    return Err(ExtractError::TooLarge {
                        limit: self.limits.max_bytes,
                        entry: shown,
                        layer: self.layer.clone(),
                    });
                }
                self.totals.bytes += size;
                self.totals.files += 1;
                let parent_fd = self.parent(parent, &shown)?;
                self.write_file(&parent_fd, name, entry, mode, mtime, owner, &shown)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.is_empty() || !symlink_stays_inside(parent, &target) {
                    let t = String::from_utf8_lossy(&target).into_owned();
                    return Err(self.refuse(&shown, Unsafe::SymlinkEscape(t)));
                }
                let parent_fd = self.parent(parent, &shown)?;
                self.clear(&parent_fd, name, &shown)?;
                rustix::fs::symlinkat(
                    OsStr::from_bytes(&target),
                    &parent_fd,
                    OsStr::from_bytes(name),
                )
                .map_err(|e| self.io_err("create symlink", &shown, e))
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let t = String::from_utf8_lossy(&target).into_owned();
                let tcomps = match normalise(&target) {
                    Ok(c) if !c.is_empty() => c,
                    _ => return Err(self.refuse(&shown, Unsafe::HardlinkEscape(t))),
                };
                let (tname, tparent) = tcomps.split_last().expect("checked non-empty");
                let tparent_fd = self
                    .open_dir_nofollow(tparent)
                    .map_err(|_| self.refuse(&shown, Unsafe::HardlinkMissing(t.clone())))?;
                let parent_fd = self.parent(parent, &shown)?;
                self.clear(&parent_fd, name, &shown)?;
                match rustix::fs::linkat(
                    &tparent_fd,
                    OsStr::from_bytes(tname),
                    &parent_fd,
                    OsStr::from_bytes(name),
                    AtFlags::empty(),
                ) {
                    Ok(()) => Ok(()),
                    Err(Errno::NOENT) => Err(self.refuse(&shown, Unsafe::HardlinkMissing(t))),
                    Err(e) => Err(self.io_err("create hard link", &shown, e)),
                }
            }
            tar::EntryType::Char => {
                Err(self.refuse(&shown, Unsafe::SpecialFile("character device")))
            }
            tar::EntryType::Block => Err(self.refuse(&shown, Unsafe::SpecialFile("block device"))),
            tar::EntryType::Fifo => Err(self.refuse(&shown, Unsafe::SpecialFile("fifo"))),
            other => Err(self.refuse(&shown, Unsafe::UnsupportedType(other.as_byte()))),
        }
    }

    fn corrupt_entry(&self, e: io::Error) -> ExtractError {
        ExtractError::Corrupt {
            layer: self.layer.clone(),
            source: e,
        }
    }

    /// Opens the directory `comps` below the root, creating missing directories, never
    /// following a symlink.
    fn parent(&mut self, comps: &[&[u8]], entry: &str) -> Result<OwnedFd> {
        let key = join(comps);
        if let Some((cached, fd)) = &self.parent_cache
            && *cached == key
        {
            return fd.try_clone().map_err(|e| ExtractError::Io {
                op: "duplicate descriptor for",
                entry: entry.to_string(),
                layer: self.layer.clone(),
                source: e,
            });
        }
        let mut cur = self.root.try_clone().map_err(|e| ExtractError::Io {
            op: "duplicate descriptor for",
            entry: entry.to_string(),
            layer: self.layer.clone(),
            source: e,
        })?;
        for (i, c) in comps.iter().enumerate() {
            let name = OsStr::from_bytes(c);
            let next = match open_dir_at(&cur, name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.io_err("create directory for", entry, e)),
                    }
                    open_dir_at(&cur, name)
                        .map_err(|e| self.parent_error(&cur, name, &comps[..=i], entry, e))?
                }
                Err(e) => return Err(self.parent_error(&cur, name, &comps[..=i], entry, e)),
            };
            cur = next;
        }
        let dup = cur.try_clone().map_err(|e| ExtractError::Io {
            op: "duplicate descriptor for",
            entry: entry.to_string(),
            layer: self.layer.clone(),
            source: e,
        })?;
        self.parent_cache = Some((key, dup));
        Ok(cur)
    }

    fn parent_error(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        prefix: &[&[u8]],
        entry: &str,
        e: Errno,
    ) -> ExtractError {
        let shown = String::from_utf8_lossy(&join(prefix)).into_owned();
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st)
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Symlink =>
            {
                self.refuse(entry, Unsafe::ThroughSymlink(shown))
            }
            Ok(st)
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    != rustix::fs::FileType::Directory =>
            {
                self.refuse(entry, Unsafe::ParentNotDirectory(shown))
            }
            _ => self.io_err("open parent directory of", entry, e),
        }
    }

    /// Opens an existing directory below the root without following symlinks or creating.
    fn open_dir_nofollow(&self, comps: &[&[u8]]) -> std::result::Result<OwnedFd, Errno> {
        let mut cur = self.root.try_clone().map_err(|_| Errno::MFILE)?;
        for c in comps {
            cur = open_dir_at(&cur, OsStr::from_bytes(c))?;
        }
        Ok(cur)
    }

    fn make_dir(&mut self, parent: &OwnedFd, name: &[u8], entry: &str) -> Result<()> {
        let n = OsStr::from_bytes(name);
        match rustix::fs::mkdirat(parent, n, Mode::from_raw_mode(0o755)) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => match rustix::fs::statat(parent, n, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st)
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory =>
                {
                    Ok(())
                }
                _ => {
                    self.clear(parent, name, entry)?;
                    rustix::fs::mkdirat(parent, n, Mode::from_raw_mode(0o755))
                        .map_err(|e| self.io_err("create directory", entry, e))
                }
            },
            Err(e) => Err(self.io_err("create directory", entry, e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file<R: Read>(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        content: &mut R,
        mode: u32,
        mtime: u64,
        owner: (u64, u64),
        entry: &str,
    ) -> Result<()> {
        self.clear(parent, name, entry)?;
        let fd = rustix::fs::openat(
            parent,
            OsStr::from_bytes(name),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.io_err("create file", entry, e))?;
        let mut file = std::fs::File::from(fd);
        loop {
            let n = match content.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.corrupt_entry(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| ExtractError::Io {
                    op: "write",
                    entry: entry.to_string(),
                    layer: self.layer.clone(),
                    source: e,
                })?;
        }
        if self.preserve_owner && owner != (0, 0) {
            let uid = rustix::process::Uid::from_raw(owner.0 as u32);
            let gid = rustix::process::Gid::from_raw(owner.1 as u32);
            rustix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(|e| self.io_err("chown", entry, e))?;
        }
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
            .map_err(|e| self.io_err("chmod", entry, e))?;
        rustix::fs::futimens(&file, &timestamps(mtime))
            .map_err(|e| self.io_err("set times of", entry, e))?;
        Ok(())
    }

    /// Removes whatever is at `parent/name` (a lower layer's entry), without following links.
    fn clear(&mut self, parent: &OwnedFd, name: &[u8], entry: &str) -> Result<()> {
        remove_at(parent, OsStr::from_bytes(name)).map_err(|e| self.io_err("replace", entry, e))?;
        // A removed directory may be the cached parent.
        self.parent_cache = None;
        Ok(())
    }

    fn whiteout(&mut self, parent: &[&[u8]], hidden: &[u8], entry: &str) -> Result<()> {
        let mut path = parent.to_vec();
        path.push(hidden);
        if self.layer_paths.contains(&join(&path)) {
            return Ok(()); // only lower layers are hidden
        }
        let Ok(dir) = self.open_dir_nofollow(parent) else {
            return Ok(()); // nothing below to hide
        };
        self.clear(&dir, hidden, entry)
    }

    fn opaque(&mut self, dir_comps: &[&[u8]], entry: &str) -> Result<()> {
        let dir = self.parent(dir_comps, entry)?;
        let prefix = join(dir_comps);
        let mut doomed: Vec<OsString> = Vec::new();
        let listing =
            rustix::fs::Dir::read_from(&dir).map_err(|e| self.io_err("list", entry, e))?;
        for child in listing {
            let child = child.map_err(|e| self.io_err("list", entry, e))?;
            let name = child.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let mut path = prefix.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            if !self.layer_paths.contains(&path) {
                doomed.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        for name in doomed {
            remove_at(&dir, &name)
                .map_err(|e| self.io_err("remove (opaque whiteout)", entry, e))?;
        }
        self.parent_cache = None;
        Ok(())
    }
}

fn open_dir_at(dir: &impl AsFd, name: &OsStr) -> std::result::Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes `dir/name` recursively if it exists, never following a symlink.
pub(crate) fn remove_at(dir: &impl AsFd, name: &OsStr) -> std::result::Result<(), Errno> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {
            let sub = open_dir_at(dir, name)?;
            let mut names = Vec::new();
            for child in rustix::fs::Dir::read_from(&sub)? {
                let child = child?;
                let n = child.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(OsStr::from_bytes(n).to_os_string());
                }
            }
            for n in names {
                remove_at(&sub, &n)?;
            }
            match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

fn timestamps(mtime: u64) -> Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: mtime as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tar entry with raw, unchecked fields: what an attacker can write.
    struct Raw<'a> {
        name: &'a [u8],
        kind: tar::EntryType,
        link: &'a [u8],
        mode: u32,
        data: &'a [u8],
    }

    fn file(name: &str, data: &'static [u8]) -> Raw<'static> {
        Raw {
            name: Box::leak(name.as_bytes().to_vec().into_boxed_slice()),
            kind: tar::EntryType::Regular,
            link: b"",
            mode: 0o644,
            data,
        }
    }

    fn tar_of(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_old();
            {
                let old = h.as_old_mut();
                old.name[..e.name.len()].copy_from_slice(e.name);
                old.linkname[..e.link.len()].copy_from_slice(e.link);
            }
            h.set_entry_type(e.kind);
            h.set_mode(e.mode);
            h.set_size(e.data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append(&h, e.data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn extract(layers: &[Vec<u8>], limits: Limits) -> (tempfile::TempDir, Result<Totals>) {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new(dir.path(), limits).unwrap();
        for (i, l) in layers.iter().enumerate() {
            if let Err(e) = x.apply_layer(&l[..], Compression::None, &format!("layer{i}")) {
                return (dir, Err(e));
            }
        }
        let r = x.finish();
        (dir, r)
    }

    fn refused(layers: &[Vec<u8>]) -> (String, Unsafe) {
        match extract(layers, Limits::default()).1 {
            Err(ExtractError::Unsafe { entry, reason, .. }) => (entry, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn plain_files_dirs_and_links_extract_with_modes() {
        let layer = tar_of(&[
            Raw {
                name: b"bin",
                kind: tar::EntryType::Directory,
                link: b"",
                mode: 0o750,
                data: b"",
            },
            Raw {
                name: b"bin/tool",
                kind: tar::EntryType::Regular,
                link: b"",
                mode: 0o755,
                data: b"#!/bin/sh\n",
            },
            Raw {
                name: b"./lib/libk.so",
                kind: tar::EntryType::Regular,
                link: b"",
                mode: 0o644,
                data: b"ELF",
            },
            Raw {
                name: b"lib/libk.so.1",
                kind: tar::EntryType::Symlink,
                link: b"libk.so",
                mode: 0o777,
                data: b"",
            },
            Raw {
                name: b"lib/hard",
                kind: tar::EntryType::Link,
                link: b"lib/libk.so",
                mode: 0o644,
                data: b"",
            },
        ]);
        let (dir, r) = extract(&[layer], Limits::default());
        let totals = r.unwrap();
        assert_eq!(totals.files, 2);
        assert_eq!(totals.bytes, 13);
        let root = dir.path();
        assert_eq!(
            std::fs::read(root.join("bin/tool")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert_eq!(
            std::fs::metadata(root.join("bin/tool"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::metadata(root.join("bin"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o750
        );
        assert_eq!(
            std::fs::read_link(root.join("lib/libk.so.1")).unwrap(),
            Path::new("libk.so")
        );
        let a = std::fs::metadata(root.join("lib/libk.so")).unwrap();
        let b = std::fs::metadata(root.join("lib/hard")).unwrap();
        assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
        assert_eq!(a.mtime(), 1_700_000_000);
    }

    #[test]
    fn parent_traversal_is_refused() {
        let (entry, why) = refused(&[tar_of(&[file("a/../../etc/passwd", b"x")])]);
        assert_eq!(
            (entry.as_str(), why),
            ("a/../../etc/passwd", Unsafe::ParentTraversal)
        );
    }

    #[test]
    fn absolute_paths_are_refused() {
        let (entry, why) = refused(&[tar_of(&[file("/etc/passwd", b"x")])]);
        assert_eq!((entry.as_str(), why), ("/etc/passwd", Unsafe::AbsolutePath));
    }

    #[test]
    fn symlinks_pointing_outside_are_refused() {
        for target in [&b"/etc/shadow"[..], b"../../x", b"a/../../../x"] {
            let layer = tar_of(&[Raw {
                name: b"d/evil",
                kind: tar::EntryType::Symlink,
                link: target,
                mode: 0o777,
                data: b"",
            }]);
            let (entry, why) = refused(&[layer]);
            assert_eq!(entry, "d/evil");
            assert!(
                matches!(why, Unsafe::SymlinkEscape(_)),
                "{target:?}: {why:?}"
            );
        }
        // Inside is fine, also when it climbs but stays below the root.
        let ok = tar_of(&[Raw {
            name: b"d/e/ok",
            kind: tar::EntryType::Symlink,
            link: b"../../f",
            mode: 0o777,
            data: b"",
        }]);
        extract(&[ok], Limits::default()).1.unwrap();
    }

    #[test]
    fn hard_links_outside_or_missing_are_refused() {
        let out = tar_of(&[Raw {
            name: b"h",
            kind: tar::EntryType::Link,
            link: b"../etc/passwd",
            mode: 0o644,
            data: b"",
        }]);
        assert!(matches!(refused(&[out]).1, Unsafe::HardlinkEscape(_)));
        let abs = tar_of(&[Raw {
            name: b"h",
            kind: tar::EntryType::Link,
            link: b"/etc/passwd",
            mode: 0o644,
            data: b"",
        }]);
        assert!(matches!(refused(&[abs]).1, Unsafe::HardlinkEscape(_)));
        let missing = tar_of(&[Raw {
            name: b"h",
            kind: tar::EntryType::Link,
            link: b"nothere",
            mode: 0o644,
            data: b"",
        }]);
        assert!(matches!(refused(&[missing]).1, Unsafe::HardlinkMissing(_)));
    }

    #[test]
    fn writing_through_a_symlinked_parent_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        // The symlink itself would be refused, so plant it the way a lower layer could not:
        // a relative link that stays inside, then a write through it that the walk refuses.
        let layer = tar_of(&[
            Raw {
                name: b"real",
                kind: tar::EntryType::Directory,
                link: b"",
                mode: 0o755,
                data: b"",
            },
            Raw {
                name: b"sneaky",
                kind: tar::EntryType::Symlink,
                link: b"real",
                mode: 0o777,
                data: b"",
            },
            file("sneaky/payload", b"x"),
        ]);
        let (entry, why) = refused(&[layer]);
        assert_eq!(
            (entry.as_str(), why),
            ("sneaky/payload", Unsafe::ThroughSymlink("sneaky".into()))
        );

        // Across layers too, and with a symlink planted to an absolute outside path by
        // something other than this extractor.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
        let mut x = Extractor::new(dir.path(), Limits::default()).unwrap();
        let err = x
            .apply_layer(
                &tar_of(&[file("escape/pwned", b"x")])[..],
                Compression::None,
                "l",
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Unsafe {
                    reason: Unsafe::ThroughSymlink(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            !outside.path().join("pwned").exists(),
            "nothing was written outside"
        );
    }

    #[test]
    fn device_nodes_and_fifos_are_refused() {
        for (kind, what) in [
            (tar::EntryType::Char, "character device"),
            (tar::EntryType::Block, "block device"),
            (tar::EntryType::Fifo, "fifo"),
        ] {
            let layer = tar_of(&[Raw {
                name: b"dev/x",
                kind,
                link: b"",
                mode: 0o600,
                data: b"",
            }]);
            assert_eq!(refused(&[layer]).1, Unsafe::SpecialFile(what));
        }
    }

    #[test]
    fn setuid_and_setgid_bits_are_cleared() {
        let layer = tar_of(&[Raw {
            name: b"su",
            kind: tar::EntryType::Regular,
            link: b"",
            mode: 0o6755,
            data: b"x",
        }]);
        let (dir, r) = extract(&[layer], Limits::default());
        r.unwrap();
        let mode = std::fs::metadata(dir.path().join("su"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn duplicate_entries_in_one_layer_are_refused() {
        let layer = tar_of(&[file("a", b"one"), file("./a", b"two")]);
        assert_eq!(refused(&[layer]), ("./a".into(), Unsafe::Duplicate));
    }

    #[test]
    fn later_layers_replace_and_whiteouts_remove() {
        let lower = tar_of(&[
            file("keep", b"1"),
            file("gone", b"1"),
            file("swap", b"old"),
            file("opq/old1", b"1"),
            file("opq/sub/old2", b"1"),
            file("dirfile/x", b"1"),
        ]);
        let upper = tar_of(&[
            file(".wh.gone", b""),
            file("swap", b"new"),
            file("opq/new", b"1"),
            file("opq/.wh..wh..opq", b""),
            file("dirfile", b"now a file"),
            file(".wh.never-existed", b""),
        ]);
        let (dir, r) = extract(&[lower, upper], Limits::default());
        r.unwrap();
        let root = dir.path();
        assert!(root.join("keep").exists());
        assert!(!root.join("gone").exists());
        assert!(
            !root.join(".wh.gone").exists(),
            "whiteouts are not materialised"
        );
        assert_eq!(std::fs::read(root.join("swap")).unwrap(), b"new");
        let mut opq: Vec<_> = std::fs::read_dir(root.join("opq"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        opq.sort();
        assert_eq!(
            opq,
            ["new"],
            "opaque whiteout hides the lower layer's content only"
        );
        assert_eq!(std::fs::read(root.join("dirfile")).unwrap(), b"now a file");
    }

    #[test]
    fn size_and_entry_bombs_are_stopped() {
        let layer = tar_of(&[file("a", b"0123456789"), file("b", b"0123456789")]);
        let limits = Limits {
            max_bytes: 15,
            max_entries: 100,
        };
        match extract(std::slice::from_ref(&layer), limits).1 {
            Err(ExtractError::TooLarge {
                limit: 15, entry, ..
            }) => assert_eq!(entry, "b"),
            other => panic!("{other:?}"),
        }
        let limits = Limits {
            max_bytes: 1 << 20,
            max_entries: 1,
        };
        match extract(&[layer], limits).1 {
            Err(ExtractError::TooManyEntries {
                limit: 1, entry, ..
            }) => assert_eq!(entry, "b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupt_streams_are_reported_with_the_layer() {
        let mut layer = tar_of(&[file("a", b"0123456789")]);
        layer.truncate(600);
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new(dir.path(), Limits::default()).unwrap();
        let err = x
            .apply_layer(&layer[..], Compression::None, "sha256:abc")
            .unwrap_err();
        assert!(err.to_string().contains("sha256:abc"), "{err}");
        let gz = b"\x1f\x8b\x08\x00garbage";
        let err = x
            .apply_layer(&gz[..], Compression::Gzip, "sha256:def")
            .unwrap_err();
        assert!(matches!(err, ExtractError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn compressed_layers_extract() {
        let layer = tar_of(&[file("k/z", b"zstd and gzip")]);
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&layer).unwrap();
            e.finish().unwrap()
        };
        let zs = zstd::encode_all(&layer[..], 1).unwrap();
        for (bytes, c) in [(gz, Compression::Gzip), (zs, Compression::Zstd)] {
            let dir = tempfile::tempdir().unwrap();
            let mut x = Extractor::new(dir.path(), Limits::default()).unwrap();
            x.apply_layer(&bytes[..], c, "l").unwrap();
            assert_eq!(
                std::fs::read(dir.path().join("k/z")).unwrap(),
                b"zstd and gzip"
            );
        }
    }

    #[test]
    fn symlink_check_is_lexical_depth() {
        assert!(symlink_stays_inside(&[b"a", b"b"], b"../../c"));
        assert!(!symlink_stays_inside(&[b"a", b"b"], b"../../../c"));
        assert!(!symlink_stays_inside(&[], b".."));
        assert!(symlink_stays_inside(&[], b"./x/../y"));
        assert!(!symlink_stays_inside(&[b"a"], b"/abs"));
    }
}
