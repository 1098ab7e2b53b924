//! Hardened, streaming extraction of OCI layer tarballs into one directory.
//!
//! Every filesystem call is made relative to a directory file descriptor, walking one path
//! component at a time with `O_NOFOLLOW`: extraction never follows a symlink, so no entry
//! can write outside the root, whatever earlier entries or layers put there. On top:
//! - `..` components and absolute paths are refused, and so are paths and link targets
//!   longer than `PATH_MAX` (4096 bytes);
//! - symlinks whose target is absolute or climbs above the root, and hard links to paths
//!   outside the tree, are refused; a hard link to a symlink is checked as that symlink
//!   from the link's own directory, since that is where its relative target is read;
//! - after the last layer, every symlink is resolved through the final tree (symlinks met
//!   on the way included, at most 40 of them), and one that ends above the root is refused:
//!   a later layer may have changed what an earlier, checked link passes through;
//! - device nodes, fifos and sparse files are refused;
//! - setuid/setgid bits are cleared (and logged);
//! - a path that appears twice in one layer is refused;
//! - a whiteout must name an entry (`.wh.`, `.wh..` and `.wh...` are refused);
//! - PAX extended headers and GNU long names/links are refused over 1 MiB from their header,
//!   before their body is read (Go's archive/tar bound, CVE-2022-2879);
//! - total file bytes (as written, whatever header field declared them) and entry count are
//!   bounded across all layers.
//!
//! A refused entry fails the whole extraction with an error naming the entry (at most 256
//! bytes of its name); the caller extracts into a temporary directory and discards it, so
//! nothing partial is ever visible. Whiteouts (`.wh.<name>`, `.wh..wh..opq`) remove what
//! lower layers put there. A directory named by several layers gets the mode, owner and
//! times of the last one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;
use tracing::warn;

/// Largest PAX extended header or GNU long name/link body accepted, in bytes: Go's
/// archive/tar bound since CVE-2022-2879.
pub const MAX_EXTENDED_HEADER: u64 = 1 << 20;

/// Longest entry path or link target accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// How much of a name an error message quotes.
const SHOWN_NAME: usize = 256;

/// Symlinks followed while resolving one link at the end (Linux's `MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: u32 = 40;

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
    #[error("its path or link target is {0} bytes long, over the limit of {MAX_PATH}")]
    NameTooLong(usize),
    #[error("it is a symlink to {0:?}, outside the image root")]
    SymlinkEscape(String),
    #[error(
        "it is a symlink to {0:?}, which resolves outside the image root through other symlinks"
    )]
    SymlinkChainEscape(String),
    #[error("it is a symlink to {0:?}, which does not resolve within {MAX_SYMLINK_HOPS} links")]
    SymlinkLoop(String),
    #[error("it is a hard link to {0:?}, outside the image root")]
    HardlinkEscape(String),
    #[error(
        "it is a hard link to a symlink to {0:?}, which leaves the image root from the link's directory"
    )]
    HardlinkToEscapingSymlink(String),
    #[error("it is a hard link to {0:?}, which does not exist in the image")]
    HardlinkMissing(String),
    #[error("it is a whiteout of {0:?}, which is not the name of an entry")]
    BadWhiteout(String),
    #[error("its {kind} is {size} bytes, over the limit of {MAX_EXTENDED_HEADER}")]
    ExtendedHeaderTooLarge { kind: &'static str, size: u64 },
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

/// A directory's attributes as the last layer naming it declared them.
#[derive(Clone, Copy, Debug)]
struct DirAttrs {
    mode: u32,
    mtime: u64,
    owner: (u64, u64),
}

/// Extracts layers, in order, into one root directory.
pub struct Extractor {
    root: OwnedFd,
    limits: Limits,
    totals: Totals,
    preserve_owner: bool,
    layer: String,
    /// Every layer applied so far, for errors found after the last one.
    layers: Vec<String>,
    /// Normalised paths written by the current layer (duplicates, opaque whiteouts).
    layer_paths: HashSet<Vec<u8>>,
    /// The most recently used parent directory: tar streams group entries by directory.
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
    /// Directory attributes by path, applied at the end so later entries can still be
    /// created; a later layer's entry for the same directory replaces the earlier one.
    dir_attrs: BTreeMap<Vec<u8>, DirAttrs>,
    /// Where symlinks (and hard links to symlinks) were made, with the index of the layer
    /// that made each: resolved through the final tree by `finish`.
    links: BTreeMap<Vec<u8>, usize>,
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

/// The non-empty components of a path this module joined.
fn split(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect()
}

/// Whether `name` names one entry of a directory: not empty, `.`, `..`, nor a path.
fn is_plain_name(name: &[u8]) -> bool {
    !matches!(name, b"" | b"." | b"..") && !name.contains(&b'/')
}

/// `raw` for an error message: lossy UTF-8 of at most [`SHOWN_NAME`] bytes, since a name
/// can be a megabyte long.
fn bounded(raw: &[u8]) -> String {
    match raw.get(..SHOWN_NAME) {
        Some(head) if raw.len() > SHOWN_NAME => {
            format!("{}... ({} bytes)", String::from_utf8_lossy(head), raw.len())
        }
        _ => String::from_utf8_lossy(raw).into_owned(),
    }
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

/// A tar-rs error, or a refusal the [`HeaderGuard`] carried through it.
fn tar_error(layer: &str, e: io::Error) -> ExtractError {
    e.downcast::<ExtractError>()
        .unwrap_or_else(|source| ExtractError::Corrupt {
            layer: layer.to_string(),
            source,
        })
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
            layers: Vec::new(),
            layer_paths: HashSet::new(),
            parent_cache: None,
            dir_attrs: BTreeMap::new(),
            links: BTreeMap::new(),
            buf: vec![0; 256 << 10],
        })
    }

    /// What was extracted so far.
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
        self.layers.push(name.to_string());
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
        let mut archive = tar::Archive::new(HeaderGuard::new(decoder, name));
        for entry in archive.entries().map_err(|e| tar_error(name, e))? {
            let mut entry = entry.map_err(|e| tar_error(name, e))?;
            self.apply_entry(&mut entry)?;
        }
        // Read to the end, so the caller's digest covers every byte of the blob.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| corrupt(name, e))?;
        Ok(())
    }

    /// Checks every symlink against the final tree, then applies deferred directory modes,
    /// owners and times. Call once, after the last layer.
    pub fn finish(mut self) -> Result<Totals> {
        self.check_links()?;
        let mut attrs: Vec<_> = std::mem::take(&mut self.dir_attrs).into_iter().collect();
        // Deepest first, so a parent that ends up read-only or unsearchable is changed after
        // its children.
        attrs.sort_by_key(|(path, _)| Reverse(path.iter().filter(|&&b| b == b'/').count()));
        for (path, a) in &attrs {
            let Ok(fd) = self.open_dir_nofollow(&split(path)) else {
                continue; // replaced by something else since
            };
            let name = bounded(path);
            if self.preserve_owner {
                let uid = rustix::process::Uid::from_raw(a.owner.0 as u32);
                let gid = rustix::process::Gid::from_raw(a.owner.1 as u32);
                rustix::fs::fchown(&fd, Some(uid), Some(gid))
                    .map_err(|e| self.io_err("chown", &name, e))?;
            }
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(a.mode))
                .map_err(|e| self.io_err("chmod", &name, e))?;
            rustix::fs::futimens(&fd, &timestamps(a.mtime))
                .map_err(|e| self.io_err("set times of", &name, e))?;
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

    fn too_large(&self, entry: &str) -> ExtractError {
        ExtractError::TooLarge {
            limit: self.limits.max_bytes,
            entry: entry.to_string(),
            layer: self.layer.clone(),
        }
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = bounded(&raw_path);
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

        if raw_path.len() > MAX_PATH {
            return Err(self.refuse(&shown, Unsafe::NameTooLong(raw_path.len())));
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
            if !is_plain_name(hidden) {
                return Err(self.refuse(&shown, Unsafe::BadWhiteout(bounded(hidden))));
            }
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
        let link = entry.link_name_bytes().map(|t| t.into_owned());
        if let Some(t) = &link
            && t.len() > MAX_PATH
        {
            return Err(self.refuse(&shown, Unsafe::NameTooLong(t.len())));
        }
        let target = link.unwrap_or_default();
        if kind != tar::EntryType::Directory {
            // Whatever was here is replaced, a lower directory with everything below it.
            self.forget_dir_attrs(&full);
        }

        match kind {
            tar::EntryType::Directory => {
                let parent_fd = self.parent(parent, &shown)?;
                self.make_dir(&parent_fd, name, &shown)?;
                self.dir_attrs.insert(full, DirAttrs { mode, mtime, owner });
                Ok(())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // tar-rs's size: the PAX `size` record where there is one, not the ustar
                // field. `write_file` counts what is written, this fails before writing.
                if self.totals.bytes.saturating_add(entry.size()) > self.limits.max_bytes {
                    return Err(self.too_large(&shown));
                }
                self.totals.files += 1;
                let parent_fd = self.parent(parent, &shown)?;
                self.write_file(&parent_fd, name, entry, mode, mtime, owner, &shown)
            }
            tar::EntryType::Symlink => {
                if target.is_empty() || !symlink_stays_inside(parent, &target) {
                    return Err(self.refuse(&shown, Unsafe::SymlinkEscape(bounded(&target))));
                }
                let parent_fd = self.parent(parent, &shown)?;
                self.clear(&parent_fd, name, &shown)?;
                rustix::fs::symlinkat(
                    OsStr::from_bytes(&target),
                    &parent_fd,
                    OsStr::from_bytes(name),
                )
                .map_err(|e| self.io_err("create symlink", &shown, e))?;
                self.links.insert(full, self.layers.len().saturating_sub(1));
                Ok(())
            }
            tar::EntryType::Link => self.hard_link(parent, name, full, &target, &shown),
            tar::EntryType::Char => {
                Err(self.refuse(&shown, Unsafe::SpecialFile("character device")))
            }
            tar::EntryType::Block => Err(self.refuse(&shown, Unsafe::SpecialFile("block device"))),
            tar::EntryType::Fifo => Err(self.refuse(&shown, Unsafe::SpecialFile("fifo"))),
            other => Err(self.refuse(&shown, Unsafe::UnsupportedType(other.as_byte()))),
        }
    }

    /// Makes `parent/name` (`full`) a hard link to `target`, a path in the tree.
    fn hard_link(
        &mut self,
        parent: &[&[u8]],
        name: &[u8],
        full: Vec<u8>,
        target: &[u8],
        entry: &str,
    ) -> Result<()> {
        let t = bounded(target);
        let tcomps = match normalise(target) {
            Ok(c) if !c.is_empty() => c,
            _ => return Err(self.refuse(entry, Unsafe::HardlinkEscape(t))),
        };
        let Some((tname, tparent)) = tcomps.split_last() else {
            return Err(self.refuse(entry, Unsafe::HardlinkEscape(t)));
        };
        let tname = OsStr::from_bytes(tname);
        let tparent_fd = self
            .open_dir_nofollow(tparent)
            .map_err(|_| self.refuse(entry, Unsafe::HardlinkMissing(t.clone())))?;
        // A hard link to a symlink is the same symlink under a second name, and its relative
        // target is read from wherever that name is: check it from the link's directory.
        let is_symlink = match rustix::fs::statat(&tparent_fd, tname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => FileType::from_raw_mode(st.st_mode) == FileType::Symlink,
            Err(Errno::NOENT) => return Err(self.refuse(entry, Unsafe::HardlinkMissing(t))),
            Err(e) => return Err(self.io_err("inspect hard link target of", entry, e)),
        };
        if is_symlink {
            let points_to = rustix::fs::readlinkat(&tparent_fd, tname, Vec::new())
                .map_err(|e| self.io_err("read symlink behind hard link", entry, e))?
                .into_bytes();
            if !symlink_stays_inside(parent, &points_to) {
                return Err(self.refuse(
                    entry,
                    Unsafe::HardlinkToEscapingSymlink(bounded(&points_to)),
                ));
            }
        }
        let parent_fd = self.parent(parent, entry)?;
        self.clear(&parent_fd, name, entry)?;
        match rustix::fs::linkat(
            &tparent_fd,
            tname,
            &parent_fd,
            OsStr::from_bytes(name),
            AtFlags::empty(),
        ) {
            Ok(()) => {}
            Err(Errno::NOENT) => return Err(self.refuse(entry, Unsafe::HardlinkMissing(t))),
            Err(e) => return Err(self.io_err("create hard link", entry, e)),
        }
        if is_symlink {
            self.links.insert(full, self.layers.len().saturating_sub(1));
        }
        Ok(())
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
        let shown = bounded(&join(prefix));
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                self.refuse(entry, Unsafe::ThroughSymlink(shown))
            }
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
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
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(()),
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
            // The bytes written are what counts, whatever a header declared.
            let total = self.totals.bytes.saturating_add(n as u64);
            if total > self.limits.max_bytes {
                return Err(self.too_large(entry));
            }
            self.totals.bytes = total;
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

    /// Drops the recorded attributes of the directory at `path` and of every directory below
    /// it: what is made there next starts afresh.
    fn forget_dir_attrs(&mut self, path: &[u8]) {
        self.dir_attrs.remove(path);
        if self.dir_attrs.is_empty() {
            return;
        }
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        let below: Vec<Vec<u8>> = self
            .dir_attrs
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.dir_attrs.remove(&k);
        }
    }

    fn whiteout(&mut self, parent: &[&[u8]], hidden: &[u8], entry: &str) -> Result<()> {
        let mut path = parent.to_vec();
        path.push(hidden);
        let path = join(&path);
        if self.layer_paths.contains(&path) {
            return Ok(()); // only lower layers are hidden
        }
        let Ok(dir) = self.open_dir_nofollow(parent) else {
            return Ok(()); // nothing below to hide
        };
        self.forget_dir_attrs(&path);
        self.clear(&dir, hidden, entry)
    }

    fn opaque(&mut self, dir_comps: &[&[u8]], entry: &str) -> Result<()> {
        let dir = self.parent(dir_comps, entry)?;
        let prefix = join(dir_comps);
        let mut doomed: Vec<(Vec<u8>, OsString)> = Vec::new();
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
                doomed.push((path, OsStr::from_bytes(name).to_os_string()));
            }
        }
        for (path, name) in doomed {
            self.forget_dir_attrs(&path);
            remove_at(&dir, &name)
                .map_err(|e| self.io_err("remove (opaque whiteout)", entry, e))?;
        }
        self.parent_cache = None;
        Ok(())
    }

    /// Refuses any symlink (or hard link to one) that, in the final tree, resolves above the
    /// root: each was checked lexically when made, but a later entry may have replaced a
    /// directory it passes through with a symlink.
    fn check_links(&self) -> Result<()> {
        for (path, &layer) in &self.links {
            let comps = split(path);
            let Some((name, dir)) = comps.split_last() else {
                continue;
            };
            let Ok(dir_fd) = self.open_dir_nofollow(dir) else {
                continue; // removed by a later layer
            };
            // EINVAL (no longer a symlink) and ENOENT (removed): nothing to check.
            let Ok(target) = rustix::fs::readlinkat(&dir_fd, OsStr::from_bytes(name), Vec::new())
            else {
                continue;
            };
            if let Err(reason) = self.resolve(dir, target.as_bytes()) {
                return Err(ExtractError::Unsafe {
                    entry: bounded(path),
                    layer: self.layers.get(layer).cloned().unwrap_or_default(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Follows `target`, read in the directory `dir`, through the tree as the kernel would:
    /// a symlink met on the way is replaced by its target, `..` goes to the real parent.
    /// Fails when that climbs above the root, or takes more than [`MAX_SYMLINK_HOPS`] links.
    /// Past a missing component or a non-directory the kernel stops; the rest is still
    /// checked lexically.
    fn resolve(&self, dir: &[&[u8]], target: &[u8]) -> std::result::Result<(), Unsafe> {
        let escape = || Unsafe::SymlinkChainEscape(bounded(target));
        let mut cur: Vec<Vec<u8>> = dir.iter().map(|c| c.to_vec()).collect();
        let Ok(mut cur_fd) = self.open_dir_nofollow(dir) else {
            return Ok(());
        };
        // Components still to walk, the next one last.
        let mut todo: Vec<Vec<u8>> = target.rsplit(|&b| b == b'/').map(<[u8]>::to_vec).collect();
        // Components past the point where the tree stopped, walked lexically.
        let mut lexical = 0usize;
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            match c.as_slice() {
                b"" | b"." => {}
                b".." if lexical > 0 => lexical -= 1,
                b".." => {
                    if cur.pop().is_none() {
                        return Err(escape());
                    }
                    let refs: Vec<&[u8]> = cur.iter().map(Vec::as_slice).collect();
                    match self.open_dir_nofollow(&refs) {
                        Ok(fd) => cur_fd = fd,
                        Err(_) => return Ok(()),
                    }
                }
                _ if lexical > 0 => lexical += 1,
                name => {
                    let n = OsStr::from_bytes(name);
                    let kind = rustix::fs::statat(&cur_fd, n, AtFlags::SYMLINK_NOFOLLOW)
                        .map(|st| FileType::from_raw_mode(st.st_mode));
                    match kind {
                        Ok(FileType::Symlink) => {
                            hops += 1;
                            if hops > MAX_SYMLINK_HOPS {
                                return Err(Unsafe::SymlinkLoop(bounded(target)));
                            }
                            let Ok(next) = rustix::fs::readlinkat(&cur_fd, n, Vec::new()) else {
                                return Ok(());
                            };
                            let next = next.as_bytes();
                            if next.starts_with(b"/") {
                                return Err(escape());
                            }
                            todo.extend(next.rsplit(|&b| b == b'/').map(<[u8]>::to_vec));
                        }
                        Ok(FileType::Directory) => match open_dir_at(&cur_fd, n) {
                            Ok(fd) => {
                                cur_fd = fd;
                                cur.push(c);
                            }
                            Err(_) => lexical += 1,
                        },
                        _ => lexical += 1,
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sits between the decompressor and tar-rs, and refuses a PAX extended header or GNU long
/// name/link over [`MAX_EXTENDED_HEADER`], and a GNU sparse entry, from its header block,
/// before tar-rs reads what follows it.
///
/// tar-rs cannot be told to: tar 0.4.46 reads each such body whole (`read_all` in
/// `EntriesFields::next_entry`) with no limit, and collects a sparse entry's extension
/// blocks likewise. Measured before this guard: a 522 KB gzip layer holding one 512 MiB
/// PAX record peaked at 578 MiB RSS, one with a 512 MiB GNU long name at 3.1 GiB.
///
/// To know which bytes are headers, the guard follows the framing tar-rs follows, with
/// tar-rs's own header parsing: a 512-byte header, then its size rounded up to 512, where
/// the size of an entry that is not itself an extension is the `size` record of the PAX
/// header tar-rs applied to it. Where tar-rs stops (end of archive, bad checksum or size)
/// the guard stops following and passes the rest through.
struct HeaderGuard<R> {
    inner: R,
    layer: String,
    /// Bytes read ahead (a header, a PAX body) and not yet handed on.
    ahead: Vec<u8>,
    ahead_pos: usize,
    /// Bytes of the current entry's body and padding still to pass through.
    body_left: u64,
    /// The `size` record of the PAX header waiting for its entry.
    pax_size: Option<u64>,
    done: bool,
}

const BLOCK: usize = 512;

impl<R: Read> HeaderGuard<R> {
    fn new(inner: R, layer: &str) -> Self {
        Self {
            inner,
            layer: layer.to_string(),
            ahead: Vec::new(),
            ahead_pos: 0,
            body_left: 0,
            pax_size: None,
            done: false,
        }
    }

    /// Reads the next header (and a PAX body) into `ahead`, or fails when it is refused.
    fn next_header(&mut self) -> io::Result<()> {
        self.ahead.clear();
        self.ahead_pos = 0;
        self.ahead.resize(BLOCK, 0);
        let got = read_full(&mut self.inner, &mut self.ahead)?;
        self.ahead.truncate(got);
        if got < BLOCK || self.ahead.iter().all(|&b| b == 0) {
            self.done = true; // the end, or a short block tar-rs fails on
            return Ok(());
        }
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(&self.ahead);
        let size = match (checksum_matches(&header), header.entry_size()) {
            (true, Ok(size)) => size,
            _ => {
                self.done = true; // tar-rs fails on this header
                return Ok(());
            }
        };
        let kind = header.entry_type();
        let extension = match kind.as_byte() {
            b'x' => Some("PAX extended header"),
            b'g' => Some("PAX global header"),
            b'L' => Some("GNU long name"),
            b'K' => Some("GNU long link name"),
            _ => None,
        };
        if let Some(kind) = extension
            && size > MAX_EXTENDED_HEADER
        {
            return Err(self.refusal(&header, Unsafe::ExtendedHeaderTooLarge { kind, size }));
        }
        if kind.is_gnu_sparse() {
            return Err(self.refusal(&header, Unsafe::SpecialFile("sparse file")));
        }
        let Some(padded) = size
            .checked_add(BLOCK as u64 - 1)
            .map(|s| s & !(BLOCK as u64 - 1))
        else {
            self.done = true; // tar-rs: "size overflow"
            return Ok(());
        };
        let recognised = header.as_gnu().is_some() || header.as_ustar().is_some();
        if recognised && kind.is_pax_local_extensions() {
            // Read here (at most 1 MiB) for its `size` record; tar-rs reads it again from
            // `ahead`.
            let body = padded as usize; // <= MAX_EXTENDED_HEADER + 511
            self.ahead.resize(BLOCK + body, 0);
            let got = read_full(&mut self.inner, &mut self.ahead[BLOCK..])?;
            self.ahead.truncate(BLOCK + got);
            if got < body {
                self.done = true; // tar-rs fails on the short body
                return Ok(());
            }
            self.pax_size = pax_size(&self.ahead[BLOCK..BLOCK + size as usize]);
            return Ok(());
        }
        if recognised && (kind.is_gnu_longname() || kind.is_gnu_longlink()) {
            // tar-rs keeps a pending PAX header for the entry after these.
            self.body_left = padded;
            return Ok(());
        }
        // An entry tar-rs hands on: the PAX header before it (if any) is used up by it.
        let pax_size = self.pax_size.take();
        self.body_left = match pax_size {
            Some(s) if extension.is_none() => {
                let Some(p) = s
                    .checked_add(BLOCK as u64 - 1)
                    .map(|s| s & !(BLOCK as u64 - 1))
                else {
                    self.done = true;
                    return Ok(());
                };
                p
            }
            _ => padded,
        };
        Ok(())
    }

    fn refusal(&self, header: &tar::Header, reason: Unsafe) -> io::Error {
        io::Error::other(ExtractError::Unsafe {
            entry: bounded(&header.path_bytes()),
            layer: self.layer.clone(),
            reason,
        })
    }
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(ready) = self.ahead.get(self.ahead_pos..)
                && !ready.is_empty()
            {
                let n = buf.len().min(ready.len());
                buf[..n].copy_from_slice(&ready[..n]);
                self.ahead_pos += n;
                return Ok(n);
            }
            if self.done {
                return self.inner.read(buf);
            }
            if self.body_left > 0 {
                let want = usize::try_from(self.body_left).map_or(buf.len(), |l| l.min(buf.len()));
                let n = self.inner.read(&mut buf[..want])?;
                self.body_left -= n as u64;
                return Ok(n);
            }
            self.next_header()?;
            if self.ahead.is_empty() {
                return Ok(0);
            }
        }
    }
}

/// Whether `header`'s checksum is right, computed as tar-rs does.
fn checksum_matches(header: &tar::Header) -> bool {
    let bytes = header.as_bytes();
    let sum: u32 = bytes[..148]
        .iter()
        .chain(&bytes[156..])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * 32;
    header.cksum().is_ok_and(|c| c == sum)
}

/// The `size` record of a PAX header, read as tar-rs reads it: the first `size` key, and
/// nothing when a record before it, or its value, is malformed.
fn pax_size(body: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(body) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn open_dir_at(dir: &impl AsFd, name: &OsStr) -> std::result::Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes `dir/name` recursively if it exists, never following a symlink. `name` must be
/// one plain name: empty, `.`, `..` and anything with a `/` fail with `EINVAL`, since they
/// would reach `dir` itself or beyond it.
pub(crate) fn remove_at(dir: &impl AsFd, name: &OsStr) -> std::result::Result<(), Errno> {
    if !is_plain_name(name.as_bytes()) {
        return Err(Errno::INVAL);
    }
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
    #[derive(Clone, Copy)]
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
        let r = extract_into(dir.path(), layers, limits);
        (dir, r)
    }

    fn extract_into(root: &Path, layers: &[Vec<u8>], limits: Limits) -> Result<Totals> {
        let mut x = Extractor::new(root, limits).unwrap();
        for (i, l) in layers.iter().enumerate() {
            x.apply_layer(&l[..], Compression::None, &format!("layer{i}"))?;
        }
        x.finish()
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

    /// A ustar header block with raw, unchecked fields (checksum set by `block`).
    fn ustar(name: &[u8], kind: u8, size: u64, link: &[u8]) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_mode(0o644);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }

    /// `h` (checksummed) followed by `data` padded to whole blocks.
    fn block(h: &tar::Header, data: &[u8]) -> Vec<u8> {
        let mut h = h.clone();
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    /// PAX records, each `<len> <key>=<value>\n`.
    fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in records {
            let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
            let mut len = body.len() + 1;
            while format!("{len}").len() + body.len() != len {
                len += 1;
            }
            out.extend_from_slice(format!("{len}").as_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    fn end() -> Vec<u8> {
        vec![0; 1024]
    }

    /// A layer of one extension header (`x`, `L`, `K`) with `body`, then the entry (`h`
    /// with `data`) it describes.
    fn extended(kind: u8, body: &[u8], h: &tar::Header, data: &[u8]) -> Vec<u8> {
        let name: &[u8] = if kind == b'x' {
            b"PaxHeaders/e"
        } else {
            b"././@LongLink"
        };
        [
            block(&ustar(name, kind, body.len() as u64, b""), body),
            block(h, data),
            end(),
        ]
        .concat()
    }

    /// Fails every read: what follows a header that must not be read.
    struct Poison;
    impl Read for Poison {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("read past the header"))
        }
    }

    /// The error of a layer made of `head` and then bytes that fail to read: an extractor
    /// that reads past `head` fails with those instead.
    fn refused_at_header(head: Vec<u8>) -> ExtractError {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new(dir.path(), Limits::default()).unwrap();
        let layer = io::Cursor::new(head).chain(Poison);
        x.apply_layer(layer, Compression::None, "l").unwrap_err()
    }

    #[test]
    fn whiteouts_naming_dot_dot_or_slashes_are_refused() {
        let lower = tar_of(&[file("io.triton.cache/k.json", b"{}")]);
        for wh in [
            ".wh...",
            ".wh..",
            ".wh.",
            "./.wh...",
            "io.triton.cache/.wh...",
            "io.triton.cache/.wh..",
            "io.triton.cache/.wh.",
        ] {
            let scratch = tempfile::tempdir().unwrap();
            let parent = scratch.path().join("parent");
            let root = parent.join("rootfs");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(parent.join("canary"), b"x").unwrap();
            let upper = tar_of(&[file(wh, b"")]);
            match extract_into(&root, &[lower.clone(), upper], Limits::default()) {
                Err(ExtractError::Unsafe {
                    entry,
                    reason: Unsafe::BadWhiteout(_),
                    ..
                }) => assert_eq!(entry, wh),
                other => panic!("{wh}: expected a refusal, got {other:?}"),
            }
            assert!(parent.join("canary").exists(), "{wh}: outside the root");
            assert!(
                root.join("io.triton.cache/k.json").exists(),
                "{wh}: the directory it sits in"
            );
        }

        // The removal primitive itself takes one plain name only.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        for name in ["", ".", "..", "a/b", "../x", "a/"] {
            assert_eq!(
                remove_at(&fd, OsStr::new(name)),
                Err(Errno::INVAL),
                "{name:?}"
            );
        }
        assert!(dir.path().join("a/b").is_dir());
    }

    #[test]
    fn a_hard_link_to_a_symlink_is_checked_where_it_lands() {
        // Eight levels down, eight up: inside where it is, /etc from the root.
        let escaping = Raw {
            name: b"a/b/c/d/e/f/g/h/l",
            kind: tar::EntryType::Symlink,
            link: b"../../../../../../../../etc",
            mode: 0o777,
            data: b"",
        };
        let top = Raw {
            name: b"top",
            kind: tar::EntryType::Link,
            link: b"a/b/c/d/e/f/g/h/l",
            mode: 0o777,
            data: b"",
        };
        let one_layer = tar_of(&[
            Raw {
                name: b"a/b/c/d/e/f/g/h",
                kind: tar::EntryType::Directory,
                link: b"",
                mode: 0o755,
                data: b"",
            },
            escaping,
            top,
        ]);
        let (entry, why) = refused(&[one_layer]);
        assert_eq!(entry, "top");
        assert_eq!(
            why,
            Unsafe::HardlinkToEscapingSymlink("../../../../../../../../etc".into())
        );
        // The symlink from a lower layer, the link in an upper one.
        let (entry, why) = refused(&[tar_of(&[escaping]), tar_of(&[top])]);
        assert_eq!(entry, "top");
        assert!(
            matches!(why, Unsafe::HardlinkToEscapingSymlink(_)),
            "{why:?}"
        );

        // A hard link to a symlink that stays inside from where the link is, too, is fine.
        let ok = tar_of(&[
            Raw {
                name: b"x/l",
                kind: tar::EntryType::Symlink,
                link: b"../f",
                mode: 0o777,
                data: b"",
            },
            Raw {
                name: b"y/l2",
                kind: tar::EntryType::Link,
                link: b"x/l",
                mode: 0o777,
                data: b"",
            },
        ]);
        let (dir, r) = extract(&[ok], Limits::default());
        r.unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("y/l2")).unwrap(),
            Path::new("../f")
        );
    }

    #[test]
    fn a_symlink_chain_that_leaves_the_root_is_refused() {
        let link = |name: &'static [u8], target: &'static [u8]| Raw {
            name,
            kind: tar::EntryType::Symlink,
            link: target,
            mode: 0o777,
            data: b"",
        };
        let dir = |name: &'static [u8]| Raw {
            name,
            kind: tar::EntryType::Directory,
            link: b"",
            mode: 0o755,
            data: b"",
        };
        // `a/b` is the root; `l` is lexically `.` but really the root's parent.
        let (entry, why) = refused(&[tar_of(&[
            dir(b"a"),
            link(b"a/b", b".."),
            link(b"l", b"a/b/../.."),
        ])]);
        assert_eq!(entry, "l");
        assert_eq!(why, Unsafe::SymlinkChainEscape("a/b/../..".into()));

        // Checked against the final tree: an upper layer turns a directory the lower
        // layer's link passes through into a symlink.
        let lower = tar_of(&[dir(b"a"), dir(b"a/b"), link(b"l", b"a/b/../..")]);
        extract(std::slice::from_ref(&lower), Limits::default())
            .1
            .unwrap();
        let upper = tar_of(&[link(b"a/b", b"..")]);
        match extract(&[lower, upper], Limits::default()).1 {
            Err(ExtractError::Unsafe {
                entry,
                layer,
                reason: Unsafe::SymlinkChainEscape(_),
            }) => assert_eq!((entry.as_str(), layer.as_str()), ("l", "layer0")),
            other => panic!("{other:?}"),
        }

        // Loops are refused; chains that stay inside are not.
        let (_, why) = refused(&[tar_of(&[link(b"x", b"y"), link(b"y", b"x")])]);
        assert!(matches!(why, Unsafe::SymlinkLoop(_)), "{why:?}");
        let (root, r) = extract(
            &[tar_of(&[
                dir(b"c"),
                link(b"a", b"c"),
                link(b"d/up", b".."),
                link(b"l", b"a/../d/up/c/missing/.."),
                link(b"dangling", b"nothing/here"),
            ])],
            Limits::default(),
        );
        r.unwrap();
        assert!(root.path().join("l").is_symlink());
    }

    #[test]
    fn extended_headers_are_bounded() {
        // Each claims more than the bound and is followed by bytes that must not be read:
        // an unbounded reader fails on those (or runs out of memory) instead.
        for (kind, what) in [
            (b'x', "PAX extended header"),
            (b'g', "PAX global header"),
            (b'L', "GNU long name"),
            (b'K', "GNU long link name"),
        ] {
            for size in [MAX_EXTENDED_HEADER + 1, 64 << 30] {
                let err = refused_at_header(block(&ustar(b"././@LongLink", kind, size, b""), b""));
                match &err {
                    ExtractError::Unsafe {
                        reason: Unsafe::ExtendedHeaderTooLarge { kind, size: s },
                        ..
                    } => assert_eq!((*kind, *s), (what, size)),
                    other => panic!("{what} of {size}: {other}"),
                }
                assert!(
                    err.to_string().contains("over the limit of 1048576"),
                    "{err}"
                );
            }
        }

        // A GNU sparse entry is refused before its extension blocks are collected.
        let mut sparse = tar::Header::new_gnu();
        sparse.as_gnu_mut().unwrap().isextended[0] = 1;
        sparse.set_entry_type(tar::EntryType::GNUSparse);
        sparse.set_path("holes").unwrap();
        sparse.set_size(0);
        sparse.set_mode(0o644);
        let err = refused_at_header(block(&sparse, b""));
        assert!(
            matches!(
                err,
                ExtractError::Unsafe {
                    reason: Unsafe::SpecialFile("sparse file"),
                    ..
                }
            ),
            "{err}"
        );

        // At the bound exactly, a PAX header is read (and applied to its entry).
        let mut records = pax(&[("path", b"k.json")]);
        let want = MAX_EXTENDED_HEADER as usize - records.len();
        let mut k = want - 20;
        while pax(&[("comment", &vec![b'A'; k])]).len() < want {
            k += 1;
        }
        records.extend(pax(&[("comment", &vec![b'A'; k])]));
        assert_eq!(records.len() as u64, MAX_EXTENDED_HEADER);
        let layer = extended(b'x', &records, &ustar(b"short", b'0', 2, b""), b"{}");
        let (dir, r) = extract(&[layer], Limits::default());
        r.unwrap();
        assert_eq!(std::fs::read(dir.path().join("k.json")).unwrap(), b"{}");
    }

    #[test]
    fn names_in_errors_are_bounded() {
        // A 1 MiB GNU long name (within the header bound) on an entry that is refused.
        let long = [b"../".as_slice(), &vec![b'a'; (1 << 20) - 3]].concat();
        let layer = extended(b'L', &long, &ustar(b"x", b'0', 1, b""), b"1");
        let (_, r) = extract(&[layer], Limits::default());
        let err = r.unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Unsafe {
                    reason: Unsafe::NameTooLong(1_048_576),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().len() < 1024,
            "{} bytes",
            err.to_string().len()
        );
        assert!(err.to_string().contains("... (1048576 bytes)"), "{err}");

        // Under PATH_MAX, refused for another reason: still quoted in part.
        let long = format!("../{}", "b".repeat(4000));
        let layer = extended(b'L', long.as_bytes(), &ustar(b"x", b'0', 0, b""), b"");
        let (entry, why) = refused(&[layer]);
        assert_eq!(why, Unsafe::ParentTraversal);
        assert!(
            entry.len() < 300 && entry.ends_with("... (4003 bytes)"),
            "{entry}"
        );

        // And a symlink target.
        let target = "../".repeat(1000);
        let layer = extended(b'K', target.as_bytes(), &ustar(b"l", b'2', 0, b""), b"");
        let (_, why) = refused(&[layer]);
        match why {
            Unsafe::SymlinkEscape(t) => assert!(t.ends_with("... (3000 bytes)"), "{t}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_byte_limit_counts_what_is_written() {
        // The ustar size says 0; the PAX `size` (which tar-rs reads the data by) 10 MiB.
        let n = 10usize << 20;
        let records = pax(&[("size", n.to_string().as_bytes())]);
        let layer = extended(b'x', &records, &ustar(b"big", b'0', 0, b""), &vec![7u8; n]);
        let (dir, r) = extract(std::slice::from_ref(&layer), Limits::default());
        assert_eq!(
            r.unwrap(),
            Totals {
                entries: 1,
                bytes: n as u64,
                files: 1
            }
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("big")).unwrap().len(),
            n as u64
        );

        let limits = Limits {
            max_bytes: 1 << 20,
            max_entries: 10,
        };
        match extract(&[layer], limits).1 {
            Err(ExtractError::TooLarge { entry, limit, .. }) => {
                assert_eq!((entry.as_str(), limit), ("big", 1 << 20))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_last_layer_sets_a_directorys_mode() {
        let dir_entry = |name: &[u8], mode: u32, mtime: u64, uid: u64| {
            let mut h = ustar(name, b'5', 0, b"");
            h.set_mode(mode);
            h.set_mtime(mtime);
            h.set_uid(uid);
            h.set_gid(uid);
            block(&h, b"")
        };
        let file_entry = |name: &[u8]| block(&ustar(name, b'0', 2, b""), b"{}");
        let lower = [
            dir_entry(b"io.triton.cache/", 0o700, 1_600_000_000, 1000),
            dir_entry(b"io.triton.cache/sub/", 0o750, 1_600_000_000, 1000),
            file_entry(b"io.triton.cache/k.json"),
            dir_entry(b"gone/", 0o700, 1_600_000_000, 1000),
            end(),
        ]
        .concat();
        let upper = [
            dir_entry(b"io.triton.cache/", 0o755, 1_700_000_000, 2000),
            // Whited out, then made again as a parent only: the lower mode is gone with it.
            block(&ustar(b".wh.gone", b'0', 0, b""), b""),
            file_entry(b"gone/k.json"),
            end(),
        ]
        .concat();
        let (dir, r) = extract(&[lower, upper], Limits::default());
        r.unwrap();
        let meta = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap();
        let cache = meta("io.triton.cache");
        assert_eq!(cache.permissions().mode() & 0o7777, 0o755);
        assert_eq!(cache.mtime(), 1_700_000_000);
        if rustix::process::geteuid().is_root() {
            assert_eq!((cache.uid(), cache.gid()), (2000, 2000));
            assert_eq!(meta("io.triton.cache/sub").uid(), 1000);
        }
        assert_eq!(
            meta("io.triton.cache/sub").permissions().mode() & 0o7777,
            0o750
        );
        assert_eq!(meta("gone").permissions().mode() & 0o7777, 0o755);
    }

    #[test]
    fn extensions_within_the_bounds_still_apply() {
        let long_dir = "d".repeat(150);
        let long_name = format!("{long_dir}/{}", "f".repeat(120));
        let records = pax(&[("path", long_name.as_bytes()), ("size", b"5")]);
        let global = pax(&[("comment", b"layer-wide")]);
        let link_target = format!("{long_dir}/{}", "t".repeat(100));
        let layer = [
            block(
                &ustar(b"pax_global_header", b'g', global.len() as u64, b""),
                &global,
            ),
            // PAX path and size (the ustar size is 0), then the data.
            block(
                &ustar(b"PaxHeaders/a", b'x', records.len() as u64, b""),
                &records,
            ),
            block(&ustar(b"a", b'0', 0, b""), b"hello"),
            // A PAX size, then a GNU long name, then the entry both describe.
            block(
                &ustar(
                    b"PaxHeaders/b",
                    b'x',
                    pax(&[("size", b"3")]).len() as u64,
                    b"",
                ),
                &pax(&[("size", b"3")]),
            ),
            block(
                &ustar(b"././@LongLink", b'L', long_dir.len() as u64 + 4, b""),
                format!("{long_dir}/bee").as_bytes(),
            ),
            block(&ustar(b"b", b'0', 0, b""), b"bee"),
            // A GNU long link name.
            block(
                &ustar(b"././@LongLink", b'K', link_target.len() as u64, b""),
                link_target.as_bytes(),
            ),
            block(&ustar(b"l", b'2', 0, b""), b""),
            block(&ustar(b"after", b'0', 2, b""), b"ok"),
            end(),
        ]
        .concat();
        let (dir, r) = extract(&[layer], Limits::default());
        let totals = r.unwrap();
        assert_eq!((totals.files, totals.bytes), (3, 10));
        let root = dir.path();
        assert_eq!(std::fs::read(root.join(&long_name)).unwrap(), b"hello");
        assert_eq!(
            std::fs::read(root.join(&long_dir).join("bee")).unwrap(),
            b"bee"
        );
        assert_eq!(
            std::fs::read_link(root.join("l")).unwrap(),
            Path::new(&link_target)
        );
        assert_eq!(std::fs::read(root.join("after")).unwrap(), b"ok");
    }
}
