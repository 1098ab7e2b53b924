//! Every kernel call the CSI plugin makes, behind one small trait: the real one uses
//! mount(2)/umount2(2) and statx(2); [`RecordingMounter`] records calls for unit tests of
//! the decision logic.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{AtFlags, CWD, StatxFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// What is at a target path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountState {
    /// Nothing there.
    Absent,
    /// A directory that is not a mount point.
    NotMounted,
    /// A mount point showing `source` (same device and inode).
    MountedFrom,
    /// A mount point showing something else.
    MountedOther,
}

pub trait Mounter: Send + Sync + 'static {
    /// Bind-mounts `source` at `target` (an existing directory), read-only, nosuid, nodev.
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()>;
    /// Unmounts `target`.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// What is at `target`, compared with `source` when given.
    fn state(&self, target: &Path, source: Option<&Path>) -> io::Result<MountState>;
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
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
        // A bind mount takes no flags of its own: read-only, nosuid and nodev come with a
        // remount. But a remount changes only the mount it is made on, not the copies that
        // propagation made of it (kubelet's pods folder is shared with the host, and the
        // runtime binds the host's copy into the pod). So the read-only mount is made on a
        // private staging point first and then bound onto the target: every copy of a new
        // mount inherits its flags. Never noexec: caches hold shared objects that are
        // dlopen'ed.
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

    fn state(&self, target: &Path, source: Option<&Path>) -> io::Result<MountState> {
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
        let Some(source) = source else {
            return Ok(MountState::MountedOther);
        };
        match statx(source)? {
            Some(s)
                if s.stx_ino == t.stx_ino
                    && s.stx_dev_major == t.stx_dev_major
                    && s.stx_dev_minor == t.stx_dev_minor =>
            {
                Ok(MountState::MountedFrom)
            }
            _ => Ok(MountState::MountedOther),
        }
    }
}

/// One call a [`RecordingMounter`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Bind { source: PathBuf, target: PathBuf },
    Unmount(PathBuf),
}

/// A fake kernel for unit tests: keeps a table of mounts and records every call. Targets
/// are "absent" unless the test created them as directories on disk.
#[derive(Default)]
pub struct RecordingMounter {
    pub calls: Mutex<Vec<Call>>,
    mounts: Mutex<HashMap<PathBuf, PathBuf>>,
    /// When set, the next bind fails with this errno.
    pub fail_next_bind: Mutex<Option<i32>>,
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

    pub fn is_mounted(&self, target: &Path) -> bool {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(target)
    }
}

impl Mounter for RecordingMounter {
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call::Bind {
                source: source.to_path_buf(),
                target: target.to_path_buf(),
            });
        if let Some(errno) = self
            .fail_next_bind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_path_buf(), source.to_path_buf());
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
            None => Err(io::Error::from_raw_os_error(libc_einval())),
        }
    }

    fn state(&self, target: &Path, source: Option<&Path>) -> io::Result<MountState> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match (mounts.get(target), source) {
            (Some(s), Some(src)) if s == src => MountState::MountedFrom,
            (Some(_), _) => MountState::MountedOther,
            (None, _) if target.is_dir() => MountState::NotMounted,
            (None, _) => MountState::Absent,
        })
    }
}

fn libc_einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
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
        assert_eq!(
            KernelMounter.state(&t, Some(d.path())).unwrap(),
            MountState::NotMounted
        );
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

        KernelMounter.bind_read_only(&src, &target).unwrap();
        let copy = host.join("vol");
        let result = std::panic::catch_unwind(|| {
            assert_eq!(std::fs::read(copy.join("kernel.so")).unwrap(), b"x");
            assert!(read_only(&target), "the target is writable");
            assert!(read_only(&copy), "the propagated copy is writable");
            assert!(std::fs::write(copy.join("new"), b"y").is_err());
        });
        for m in [&target, &copy, &host, &pods] {
            let _ = unmount(m, UnmountFlags::DETACH);
        }
        result.unwrap();
    }
}
