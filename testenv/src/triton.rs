//! Real Triton, for the tests where a kernel cache's behaviour matters: PyPI's wheel (in the
//! virtual environment `install-tools.sh` makes) compiles kernels for `cuda:90:32` and
//! `hip:gfx942:64` on a CPU, and its own `FileCacheManager` decides hit or miss exactly as
//! in a pod. The commands live in `testenv/triton/gkm_triton.py`; each prints one JSON line.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::Error;
use crate::tools::{Tool, locate};

/// What a `lookup` found: Triton's `FileCacheManager.get_group` with the directory as its
/// cache dir, for every group file in it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Lookup {
    pub groups: u64,
    /// Groups whose every child resolved to a file under the directory.
    pub resolved: u64,
    /// Up to five groups that did not, with the children Triton could not find.
    pub missing: Vec<serde_json::Value>,
    /// Triton's version.
    pub triton: String,
}

/// What a `compile` (or `capture`) did.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Compile {
    pub kernels: u64,
    /// Files Triton created or changed in the cache dir (empty: every kernel hit).
    pub written: Vec<String>,
    /// The exception Triton raised, if any (for example EROFS on a read-only cache).
    pub error: Option<String>,
    pub seconds: f64,
}

/// The Python with Triton and the test script.
#[derive(Clone, Debug)]
pub struct Triton {
    python: PathBuf,
    script: PathBuf,
}

impl Triton {
    /// Finds the virtual environment's Python (or names the install step).
    pub fn locate() -> Result<Self, Error> {
        Ok(Self {
            python: locate(Tool::TritonPython)?,
            script: crate::workspace_root().join("testenv/triton/gkm_triton.py"),
        })
    }

    fn run<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T, Error> {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .args(args)
            // Triton's own per-user caches (~/.triton) stay out of the way of the test.
            .env("TRITON_HOME", std::env::temp_dir().join("gkm-triton-home"))
            .output()
            .map_err(|e| Error::io(format!("running {}", self.python.display()), e))?;
        let command = format!("gkm_triton.py {}", args.join(" "));
        if !out.status.success() {
            return Err(Error::Command {
                command,
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.trim()).map_err(|e| Error::Command {
            command,
            status: format!("unreadable output ({e})"),
            output: format!("{line}\n{}", String::from_utf8_lossy(&out.stderr)),
        })
    }

    /// Compiles the test kernels for each target (`cuda:90:32`, `hip:gfx942:64`) into the
    /// Triton cache `dir`.
    pub fn capture(&self, dir: &Path, targets: &[&str]) -> Result<Compile, Error> {
        let d = dir.display().to_string();
        let mut args = vec!["capture", d.as_str()];
        args.extend(targets);
        self.run(&args)
    }

    /// Whether every group file in `dir` resolves, with `dir` as Triton's cache dir.
    pub fn lookup(&self, dir: &Path) -> Result<Lookup, Error> {
        let d = dir.display().to_string();
        self.run(&["lookup", d.as_str()])
    }

    /// Compiles the test kernels (or, with `new`, one the capture does not hold) with
    /// `dir` as the cache dir.
    pub fn compile(&self, dir: &Path, targets: &[&str], new: bool) -> Result<Compile, Error> {
        let d = dir.display().to_string();
        let mut args = vec!["compile", d.as_str()];
        args.extend(targets);
        if new {
            args.push("--new");
        }
        self.run(&args)
    }
}
