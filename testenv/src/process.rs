//! Child processes that never outlive the test process, and work directories that are
//! swept when an earlier test process was killed.
//!
//! Every server is spawned with `PR_SET_PDEATHSIG(SIGKILL)`. The kernel sends that signal
//! when the *thread* that forked the child exits, so all spawning happens on one thread that
//! lives as long as the process: when the test process exits or is killed, however it
//! dies, its servers die with it. Their work directories cannot clean themselves up after
//! a SIGKILL, so each is named after its owner (pid and start time) and the next harness
//! start removes those whose owner is gone.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Error;

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the testenv spawner thread");
        Mutex::new(tx)
    })
}

/// Spawns `cmd` so that it is killed when this process dies.
pub(crate) fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only prctl and getppid,
    // which are async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited before the child started"));
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| io::Error::other("testenv spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("testenv spawner thread is gone"))?
}

/// A server process started by the harness, with its output in a log file.
pub struct ServerProcess {
    name: String,
    child: Mutex<Child>,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `program` with `args`, output appended to `<dir>/<name>.log`. The process
    /// dies with this one, however this one dies.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        dir: &Path,
    ) -> Result<Self, Error> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log)
            .map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io("cloning a log handle", e))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(envs.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = spawn_tied(cmd).map_err(|source| Error::Spawn {
            name: name.to_string(),
            program: program.to_path_buf(),
            source,
        })?;
        Ok(Self {
            name: name.to_string(),
            child: Mutex::new(child),
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status, if the process has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()
            .ok()
            .flatten()
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 4096)
    }

    /// Fails with the log's tail if the process has exited; names a clashing port when the
    /// log says the address was in use.
    pub(crate) fn ensure_running(&self, ports: &[(u16, &str)]) -> Result<(), Error> {
        let Some(status) = self.exited() else {
            return Ok(());
        };
        let tail = self.log_tail();
        if tail.contains("address already in use") {
            for (port, what) in ports {
                if tail.contains(&format!(":{port}")) {
                    return Err(Error::PortInUse {
                        port: *port,
                        what: format!("{what} of {}", self.name),
                    });
                }
            }
        }
        Err(Error::Exited {
            name: self.name.clone(),
            status: status.to_string(),
            log_tail: tail,
        })
    }

    /// Polls `ready` every 50 ms until it is true, the process exits, or `timeout` passes.
    pub(crate) async fn wait_ready<F, Fut>(
        &self,
        what: &str,
        ports: &[(u16, &str)],
        timeout: Duration,
        mut ready: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        loop {
            self.ensure_running(ports)?;
            if ready().await {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(Error::NotReady {
                    name: self.name.clone(),
                    what: what.to_string(),
                    after: timeout,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process and reaps it.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::io("binding 127.0.0.1:0", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("reading a bound address", e))
}

/// Fails with [`Error::PortInUse`] naming `what` if `port` cannot be bound on loopback.
pub fn ensure_port_free(port: u16, what: &str) -> Result<(), Error> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(Error::PortInUse {
            port,
            what: what.to_string(),
        }),
        Err(e) => Err(Error::io(format!("binding 127.0.0.1:{port} for {what}"), e)),
    }
}

/// The root under which every harness work directory lives.
pub fn state_root() -> PathBuf {
    std::env::var_os("GKM_TESTENV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("gkm-testenv"))
}

/// `<pid>-<start time>` of a process, from `/proc`; None if it does not exist.
fn process_tag(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime) counted after the parenthesised command name, which may hold
    // spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid}-{start}"))
}

/// A fresh work directory owned by this process: `<root>/<pid>-<start>/<name>-<n>`.
pub(crate) fn work_dir(name: &str) -> Result<PathBuf, Error> {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(sweep_stale);
    let me = std::process::id();
    let tag = process_tag(me).unwrap_or_else(|| me.to_string());
    let owner = state_root().join(tag);
    fs::create_dir_all(&owner)
        .map_err(|e| Error::io(format!("creating {}", owner.display()), e))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(&owner)
        .map_err(|e| Error::io(format!("creating a work dir in {}", owner.display()), e))?;
    Ok(dir.keep())
}

/// Removes work directories whose owning process is gone.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(state_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if process_tag(pid).as_deref() != Some(name.as_str()) {
            // A test node of the dead owner may have left processes and cgroups.
            for child in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                crate::node::clean_stale(&child.path());
            }
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes this process's work directories (called when a shared environment stops).
pub(crate) fn remove_work_dir(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
}
