//! Every kernel call the CSI plugin makes, behind one small trait: the real one uses
//! mount(2)/umount2(2), statx(2) and `/proc/self/mountinfo`; [`RecordingMounter`] records
//! calls for unit tests of the decision logic.
//!
//! A volume is one of two mounts ([`MountSpec`]): the shared extracted tree bound
//! read-only, or an overlay whose lower layers are the tree (and, above it, the path view
//! of [`crate::kernel_cache::view`]) with, for a writable volume, an upper and work
//! directory private to the volume. Both are `nosuid,nodev` and never `noexec`: caches
//! hold shared objects that are `dlopen`ed (Triton's launchers).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{AtFlags, CWD, StatxFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// A volume's private directories for a writable overlay (same filesystem, as overlayfs
/// requires).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpperDirs {
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// What a volume's mount shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountSpec {
    /// `source` bound read-only.
    Bind { source: PathBuf },
    /// An overlay of `lowers` (top-most first; at least two without `upper`, as overlayfs
    /// requires), writable into `upper` when given, else read-only.
    Overlay {
        lowers: Vec<PathBuf>,
        upper: Option<UpperDirs>,
    },
}

impl MountSpec {
    /// The overlay options string (`lowerdir=a:b[,upperdir=u,workdir=w]`).
    fn overlay_data(lowers: &[PathBuf], upper: Option<&UpperDirs>) -> String {
        let lower = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        match upper {
            Some(u) => format!(
                "lowerdir={lower},upperdir={},workdir={}",
                u.upper.display(),
                u.work.display()
            ),
            None => format!("lowerdir={lower}"),
        }
    }

    /// Whether the volume is writable.
    pub fn writable(&self) -> bool {
        matches!(self, MountSpec::Overlay { upper: Some(_), .. })
    }
}

/// Why a path cannot be a layer: overlayfs separates its options with `,` and its lower
/// layers with `:`, and GKM compares paths with the kernel's mount table, which escapes
/// whitespace and `\`. `None` when `path` is fine.
pub fn unusable_layer_path(path: &Path) -> Option<&'static str> {
    let s = path.to_str()?;
    if s.contains([',', ':', '\\']) || s.chars().any(char::is_whitespace) {
        Some(
            "contains a comma, colon, backslash or whitespace, which overlay mount options cannot carry",
        )
    } else {
        None
    }
}

/// What is at a target path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountState {
    /// Nothing there.
    Absent,
    /// A directory that is not a mount point.
    NotMounted,
    /// A mount point showing exactly the expected mount.
    MountedFrom,
    /// A mount point showing something else.
    MountedOther,
}

/// Who made the mount at a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountOwner {
    /// No mount there.
    Nobody,
    /// A mount of the store's trees: an overlay whose layers, or a bind whose source, lie
    /// in the store.
    Gkm,
    /// Something else, described (`tmpfs none`).
    Other(String),
}

pub trait Mounter: Send + Sync + 'static {
    /// Mounts `spec` at `target` (an existing directory), nosuid, nodev.
    fn mount(&self, spec: &MountSpec, target: &Path) -> io::Result<()>;
    /// Unmounts `target`.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// What is at `target`, compared with `expected` when given.
    fn state(&self, target: &Path, expected: Option<&MountSpec>) -> io::Result<MountState>;
    /// Who made the top-most mount at `target`: GKM (a mount of the store at
    /// `store_root`) or someone else.
    fn owner(&self, target: &Path, store_root: &Path) -> io::Result<MountOwner>;
}

/// The real kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelMounter;

fn statx(path: &Path) -> io::Result<Option<rustix::fs::Statx>> {
    match rustix::fs::statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
    ) {
        Ok(s) => Ok(Some(s)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Mounter for KernelMounter {
    fn mount(&self, spec: &MountSpec, target: &Path) -> io::Result<()> {
        match spec {
            MountSpec::Bind { source } => bind_read_only(source, target),
            MountSpec::Overlay { lowers, upper } => {
                // A new mount (unlike a bind's remount) takes its flags at creation, so every
                // copy that propagation makes of it has them too.
                let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
                if upper.is_none() {
                    flags |= MountFlags::RDONLY;
                }
                let data = std::ffi::CString::new(MountSpec::overlay_data(lowers, upper.as_ref()))
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                Ok(rustix::mount::mount(
                    "overlay",
                    target,
                    "overlay",
                    flags,
                    Some(data.as_c_str()),
                )?)
            }
        }
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => Ok(()),
            // Still busy (a process has a file open): detach now, the kernel frees it later.
            Err(rustix::io::Errno::BUSY) => {
                Ok(rustix::mount::unmount(target, UnmountFlags::DETACH)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn state(&self, target: &Path, expected: Option<&MountSpec>) -> io::Result<MountState> {
        let Some(t) = statx(target)? else {
            return Ok(MountState::Absent);
        };
        let parent = target.parent().unwrap_or(Path::new("/"));
        let Some(p) = statx(parent)? else {
            return Ok(MountState::Absent);
        };
        // A bind mount on the same filesystem keeps st_dev; the mount id tells them apart.
        if t.stx_mnt_id == p.stx_mnt_id {
            return Ok(MountState::NotMounted);
        }
        let same = match expected {
            None => false,
            Some(MountSpec::Bind { source }) => match statx(source)? {
                Some(s) => {
                    s.stx_ino == t.stx_ino
                        && s.stx_dev_major == t.stx_dev_major
                        && s.stx_dev_minor == t.stx_dev_minor
                }
                None => false,
            },
            Some(MountSpec::Overlay { lowers, upper }) => {
                // An overlay's root has no inode of the layers: compare the mount table's
                // entry for this mount id with the options it was made with.
                match mountinfo_entry(t.stx_mnt_id)? {
                    Some(e) => {
                        // The layer options, exactly: a writable overlay of the same lower
                        // layers is not the read-only one.
                        let layers = |opts: Vec<&str>| {
                            let mut v: Vec<String> = opts
                                .into_iter()
                                .filter(|o| {
                                    ["lowerdir=", "upperdir=", "workdir="]
                                        .iter()
                                        .any(|p| o.starts_with(p))
                                })
                                .map(str::to_string)
                                .collect();
                            v.sort();
                            v
                        };
                        let want = MountSpec::overlay_data(lowers, upper.as_ref());
                        e.fstype == "overlay"
                            && layers(want.split(',').collect())
                                == layers(e.super_options.iter().map(String::as_str).collect())
                    }
                    None => false,
                }
            }
        };
        Ok(if same {
            MountState::MountedFrom
        } else {
            MountState::MountedOther
        })
    }

    fn owner(&self, target: &Path, store_root: &Path) -> io::Result<MountOwner> {
        let (Some(t), Some(p)) = (
            statx(target)?,
            statx(target.parent().unwrap_or(Path::new("/")))?,
        ) else {
            return Ok(MountOwner::Nobody);
        };
        if t.stx_mnt_id == p.stx_mnt_id {
            return Ok(MountOwner::Nobody);
        }
        Ok(match mountinfo_entry(t.stx_mnt_id)? {
            Some(e) if made_by_gkm(&e, store_root) => MountOwner::Gkm,
            Some(e) => MountOwner::Other(format!("{} mount of {}", e.fstype, e.root)),
            None => MountOwner::Other("a mount missing from the mount table".into()),
        })
    }
}

/// Whether mountinfo entry `e` (of the mount at a target) shows one of the store's trees:
/// an overlay naming a layer under `store_root`, or a bind of a directory under the
/// store's `store/sha256/` (the entry's root is that directory, relative to its
/// filesystem, which is the store's own or one the store lies in).
fn made_by_gkm(e: &MountInfoEntry, store_root: &Path) -> bool {
    let root = store_root.display().to_string();
    if e.fstype == "overlay" {
        return e
            .super_options
            .iter()
            .any(|o| o.starts_with("lowerdir=") && o.contains(&format!("{root}/")));
    }
    e.root.contains("/store/sha256/")
}

/// A bind mount takes no flags of its own: read-only, nosuid and nodev come with a
/// remount. But a remount changes only the mount it is made on, not the copies that
/// propagation made of it (kubelet's pods folder is shared with the host, and the runtime
/// binds the host's copy into the pod). So the read-only mount is made on a private
/// staging point first and then bound onto the target: every copy of a new mount inherits
/// its flags.
fn bind_read_only(source: &Path, target: &Path) -> io::Result<()> {
    let stage = tempfile::Builder::new()
        .prefix("gkm-stage-")
        .tempdir_in(std::env::temp_dir())?;
    rustix::mount::mount_bind(source, stage.path())?;
    let flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
    let result = rustix::mount::mount_remount(stage.path(), flags, "")
        .and_then(|()| rustix::mount::mount_bind(stage.path(), target));
    // The target keeps its own mount; the staging point goes either way.
    let _ = rustix::mount::unmount(stage.path(), UnmountFlags::DETACH);
    Ok(result?)
}

/// One line of `/proc/self/mountinfo`, as far as GKM reads it (proc(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfoEntry {
    pub mount_id: u64,
    /// The path of the mount's root within its filesystem (a bind's source).
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub super_options: Vec<String>,
}

/// Parses one mountinfo line: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] -
/// FSTYPE SOURCE SUPEROPTS`, with `\ooo` octal escapes in the paths and options.
pub fn parse_mountinfo_line(line: &str) -> Option<MountInfoEntry> {
    let (head, tail) = line.split_once(" - ")?;
    let mut h = head.split(' ');
    let mount_id = h.next()?.parse().ok()?;
    let root = unescape(h.nth(2)?);
    let mount_point = unescape(h.next()?);
    let mut t = tail.split(' ');
    let fstype = t.next()?.to_string();
    let _source = t.next()?;
    let super_options = t.next().unwrap_or("").split(',').map(unescape).collect();
    Some(MountInfoEntry {
        mount_id,
        root,
        mount_point: PathBuf::from(mount_point),
        fstype,
        super_options,
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount table's entry for `mount_id` (statx's `stx_mnt_id`).
fn mountinfo_entry(mount_id: u64) -> io::Result<Option<MountInfoEntry>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table
        .lines()
        .filter_map(parse_mountinfo_line)
        .find(|e| e.mount_id == mount_id))
}

/// One call a [`RecordingMounter`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Mount { spec: MountSpec, target: PathBuf },
    Unmount(PathBuf),
}

/// A fake kernel for unit tests: keeps a table of mounts and records every call. Targets
/// are "absent" unless the test created them as directories on disk.
#[derive(Default)]
pub struct RecordingMounter {
    pub calls: Mutex<Vec<Call>>,
    mounts: Mutex<HashMap<PathBuf, MountSpec>>,
    /// When set, the next mount fails with this errno.
    pub fail_next_mount: Mutex<Option<i32>>,
    /// When set, every writable overlay fails with this errno (a store on a filesystem
    /// that cannot be an overlay's upper layer).
    pub refuse_upper: Mutex<Option<i32>>,
}

impl RecordingMounter {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets a mount behind the plugin's back (as if someone unmounted it).
    pub fn vanish(&self, target: &Path) {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(target);
    }

    /// Puts a mount there behind the plugin's back (as someone else would).
    pub fn plant(&self, target: &Path, spec: MountSpec) {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_path_buf(), spec);
    }

    pub fn is_mounted(&self, target: &Path) -> bool {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(target)
    }

    /// What is mounted at `target`.
    pub fn mounted(&self, target: &Path) -> Option<MountSpec> {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(target)
            .cloned()
    }
}

impl Mounter for RecordingMounter {
    fn mount(&self, spec: &MountSpec, target: &Path) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call::Mount {
                spec: spec.clone(),
                target: target.to_path_buf(),
            });
        if let Some(errno) = self
            .fail_next_mount
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if spec.writable()
            && let Some(errno) = *self.refuse_upper.lock().unwrap_or_else(|e| e.into_inner())
        {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_path_buf(), spec.clone());
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call::Unmount(target.to_path_buf()));
        match self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(target)
        {
            Some(_) => Ok(()),
            None => Err(io::Error::from_raw_os_error(
                rustix::io::Errno::INVAL.raw_os_error(),
            )),
        }
    }

    fn owner(&self, target: &Path, store_root: &Path) -> io::Result<MountOwner> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match mounts.get(target) {
            None => MountOwner::Nobody,
            Some(MountSpec::Bind { source }) if source.starts_with(store_root) => MountOwner::Gkm,
            Some(MountSpec::Overlay { lowers, .. })
                if lowers.iter().any(|l| l.starts_with(store_root)) =>
            {
                MountOwner::Gkm
            }
            Some(other) => MountOwner::Other(format!("{other:?}")),
        })
    }

    fn state(&self, target: &Path, expected: Option<&MountSpec>) -> io::Result<MountState> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match (mounts.get(target), expected) {
            (Some(s), Some(want)) if s == want => MountState::MountedFrom,
            (Some(_), _) => MountState::MountedOther,
            (None, _) if target.is_dir() => MountState::NotMounted,
            (None, _) => MountState::Absent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_sees_a_plain_directory_as_not_mounted() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        assert_eq!(KernelMounter.state(&t, None).unwrap(), MountState::Absent);
        std::fs::create_dir(&t).unwrap();
        let spec = MountSpec::Bind {
            source: d.path().to_path_buf(),
        };
        assert_eq!(
            KernelMounter.state(&t, Some(&spec)).unwrap(),
            MountState::NotMounted
        );
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let e = parse_mountinfo_line(
            "812 27 0:95 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my\\040vol/mount rw,nosuid,nodev,relatime shared:412 - overlay overlay rw,lowerdir=/a:/b,upperdir=/u,workdir=/w",
        )
        .unwrap();
        assert_eq!(e.mount_id, 812);
        assert_eq!(e.root, "/");
        assert_eq!(
            e.mount_point,
            PathBuf::from("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my vol/mount")
        );
        assert_eq!(e.fstype, "overlay");
        assert!(e.super_options.contains(&"lowerdir=/a:/b".to_string()));
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }

    #[test]
    fn layer_paths_that_mount_options_cannot_carry_are_named() {
        assert!(unusable_layer_path(Path::new("/var/lib/gkm")).is_none());
        for bad in ["/var/lib/g,km", "/a:b", "/a b", "/a\\b"] {
            assert!(unusable_layer_path(Path::new(bad)).is_some(), "{bad}");
        }
    }

    fn read_only(path: &Path) -> bool {
        let st = rustix::fs::statvfs(path).unwrap();
        st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY)
    }

    /// Kubelet's pods folder is shared with the host; the pod gets the host's copy of the
    /// mount. A second peer of a shared mount stands in for the host's copy here.
    #[test]
    fn every_propagated_copy_of_a_publish_is_read_only() {
        use rustix::mount::{MountPropagationFlags, mount_bind, mount_change, unmount};
        let d = tempfile::tempdir().unwrap();
        let (pods, host, src) = (
            d.path().join("pods"),
            d.path().join("host"),
            d.path().join("src"),
        );
        for p in [&pods, &host, &src] {
            std::fs::create_dir(p).unwrap();
        }
        std::fs::write(src.join("kernel.so"), b"x").unwrap();
        mount_bind(&pods, &pods).unwrap();
        mount_change(&pods, MountPropagationFlags::SHARED).unwrap();
        mount_bind(&pods, &host).unwrap();
        let target = pods.join("vol");
        std::fs::create_dir(&target).unwrap();

        let spec = MountSpec::Bind {
            source: src.clone(),
        };
        KernelMounter.mount(&spec, &target).unwrap();
        let copy = host.join("vol");
        let result = std::panic::catch_unwind(|| {
            assert_eq!(std::fs::read(copy.join("kernel.so")).unwrap(), b"x");
            assert!(read_only(&target), "the target is writable");
            assert!(read_only(&copy), "the propagated copy is writable");
            assert!(std::fs::write(copy.join("new"), b"y").is_err());
            assert_eq!(
                KernelMounter.state(&target, Some(&spec)).unwrap(),
                MountState::MountedFrom
            );
        });
        for m in [&target, &copy, &host, &pods] {
            let _ = unmount(m, UnmountFlags::DETACH);
        }
        result.unwrap();
    }

    /// A writable overlay: writes land in the upper directory only; the kernel's mount
    /// table identifies it, and another overlay does not pass for it.
    #[test]
    fn an_overlay_writes_into_its_upper_and_is_recognised_by_its_options() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| {
            let p = d.path().join(n);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let (lower, view, upper, work, target) =
            (p("lower"), p("view"), p("upper"), p("work"), p("t"));
        std::fs::write(lower.join("k.cubin"), b"elf").unwrap();
        std::fs::write(view.join("__grp__k.json"), b"{}").unwrap();
        let spec = MountSpec::Overlay {
            lowers: vec![view.clone(), lower.clone()],
            upper: Some(UpperDirs {
                upper: upper.clone(),
                work: work.clone(),
            }),
        };
        KernelMounter.mount(&spec, &target).unwrap();
        let result = std::panic::catch_unwind(|| {
            assert_eq!(std::fs::read(target.join("k.cubin")).unwrap(), b"elf");
            assert!(target.join("__grp__k.json").exists());
            std::fs::write(target.join("new.cubin"), b"miss").unwrap();
            assert!(upper.join("new.cubin").exists());
            assert!(!lower.join("new.cubin").exists());
            assert_eq!(
                KernelMounter.state(&target, Some(&spec)).unwrap(),
                MountState::MountedFrom
            );
            let read_only = MountSpec::Overlay {
                lowers: vec![view.clone(), lower.clone()],
                upper: None,
            };
            assert_eq!(
                KernelMounter.state(&target, Some(&read_only)).unwrap(),
                MountState::MountedOther
            );
            let opts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let line = opts
                .lines()
                .find(|l| l.contains(&*target.to_string_lossy()))
                .unwrap();
            assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
            assert!(!line.contains("noexec"), "{line}");
        });
        let _ = rustix::mount::unmount(&target, UnmountFlags::DETACH);
        result.unwrap();
    }
}
