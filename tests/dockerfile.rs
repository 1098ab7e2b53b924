//! The Dockerfile, read rather than built (no container engine needed): it builds binaries
//! the workspace defines, with a `cargo build` line cargo accepts, copies only paths that
//! exist, and installs every binary where deploy/ runs it from.
//!
//! The model is small on purpose: the Dockerfile instructions GKM uses (FROM, WORKDIR, RUN
//! with `cargo build`, `mkdir`, `cp`/`install`, COPY with and without `--from`), followed
//! closely enough to know which binary ends up at which path of the final image.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use gkm_testenv::workspace_root;
use serde_json::Value;

/// A workspace package and its binaries, as cargo itself reads the manifests.
struct Package {
    name: String,
    bins: Vec<String>,
}

struct Workspace {
    packages: Vec<Package>,
    /// What a bare `cargo build` in the workspace root builds.
    default_members: Vec<String>,
}

fn workspace() -> Workspace {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["metadata", "--no-deps", "--format-version=1", "--offline"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id_to_name: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let packages = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().unwrap().to_string(),
            bins: p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect(),
        })
        .collect();
    let default_members = meta["workspace_default_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id_to_name[id.as_str().unwrap()].to_string())
        .collect();
    Workspace {
        packages,
        default_members,
    }
}

impl Workspace {
    fn package(&self, name: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.name == name)
    }
}

/// One build stage: where its binaries are.
#[derive(Default)]
struct Stage {
    name: Option<String>,
    base: String,
    workdir: PathBuf,
    dirs: BTreeSet<PathBuf>,
    /// Path in the stage's filesystem → the workspace binary that is there.
    binaries: BTreeMap<PathBuf, String>,
}

impl Stage {
    fn resolve(&self, path: &str) -> PathBuf {
        normalize(&self.workdir.join(path))
    }
}

/// `a/./b/../c` → `a/c`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

struct Dockerfile {
    stages: Vec<Stage>,
    /// The final stage's ENTRYPOINT (exec form), if any.
    entrypoint: Option<String>,
    /// Everything that would break the build, or that does not match the workspace.
    problems: Vec<String>,
}

/// Instructions with continuation lines joined and comments dropped, each with its line.
fn instructions(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if current.is_empty() {
            start = i + 1;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((start, keyword.to_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// Exec form (`["a", "b"]`) or shell form, as words.
fn words(rest: &str) -> Vec<String> {
    if rest.starts_with('[') {
        let v: Vec<String> = serde_json::from_str(rest).unwrap();
        return v;
    }
    rest.split_whitespace()
        .map(|w| w.trim_matches(|c| c == '"' || c == '\'').to_string())
        .collect()
}

/// `dir/{a,b}` → `dir/a`, `dir/b` (one brace group, as a shell expands it).
fn brace_expand(word: &str) -> Vec<String> {
    if let (Some(open), Some(close)) = (word.find('{'), word.find('}'))
        && open < close
    {
        let (head, tail) = (&word[..open], &word[close + 1..]);
        return word[open + 1..close]
            .split(',')
            .map(|alt| format!("{head}{alt}{tail}"))
            .collect();
    }
    vec![word.to_string()]
}

/// The simple commands of a shell line: split at `&&`, `||`, `;` and `|`.
fn shell_commands(line: &str) -> Vec<Vec<String>> {
    let spaced = line
        .replace("&&", " ; ")
        .replace("||", " ; ")
        .replace([';', '|'], " ; ");
    let mut out = vec![Vec::new()];
    for w in words(&spaced) {
        if w == ";" {
            out.push(Vec::new());
        } else {
            out.last_mut().unwrap().extend(brace_expand(&w));
        }
    }
    out.retain(|c| !c.is_empty());
    out
}

/// `cargo build …`: which binaries it builds, checked the way cargo checks them.
fn cargo_build(
    ws: &Workspace,
    stage: &mut Stage,
    args: &[String],
    line: usize,
    problems: &mut Vec<String>,
) {
    let mut packages = Vec::new();
    let mut bins = Vec::new();
    let mut all_bins = false;
    let mut workspace = false;
    let mut profile = "debug".to_string();
    let mut target = None;
    let mut target_dir = "target".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .unwrap_or_default()
        };
        match flag {
            "-p" | "--package" => packages.push(value()),
            "--bin" => bins.push(value()),
            "--bins" => all_bins = true,
            "--workspace" | "--all" => workspace = true,
            "--release" | "-r" => profile = "release".into(),
            "--profile" => {
                profile = match value().as_str() {
                    "dev" | "test" => "debug".into(),
                    "bench" => "release".into(),
                    p => p.into(),
                }
            }
            "--target" => target = Some(value()),
            "--target-dir" => target_dir = value(),
            "--features" | "-F" | "-j" | "--jobs" | "--manifest-path" | "--config" | "--color"
            | "--message-format" | "-Z" => {
                value();
            }
            f if f.starts_with("-p") && f.len() > 2 => packages.push(f[2..].to_string()),
            _ => {}
        }
    }
    let selected: Vec<&Package> = if workspace {
        ws.packages.iter().collect()
    } else if packages.is_empty() {
        ws.default_members
            .iter()
            .filter_map(|n| ws.package(n))
            .collect()
    } else {
        packages
            .iter()
            .filter_map(|p| {
                let found = ws.package(p);
                if found.is_none() {
                    problems.push(format!(
                        "line {line}: cargo build -p {p}: no such package in the workspace"
                    ));
                }
                found
            })
            .collect()
    };
    let mut built = Vec::new();
    for b in &bins {
        if selected.iter().any(|p| p.bins.contains(b)) {
            built.push(b.clone());
        } else {
            let owner = ws.packages.iter().find(|p| p.bins.contains(b));
            problems.push(match owner {
                Some(p) => format!(
                    "line {line}: cargo build --bin {b}: {b} is a binary of package {}, which \
                     this command does not select (add -p {})",
                    p.name, p.name
                ),
                None => format!(
                    "line {line}: cargo build --bin {b}: no [[bin]] {b} in any workspace Cargo.toml"
                ),
            });
        }
    }
    if all_bins || bins.is_empty() {
        built.extend(selected.iter().flat_map(|p| p.bins.iter().cloned()));
    }
    let mut out_dir = stage.resolve(&target_dir);
    if let Some(t) = target {
        out_dir.push(t);
    }
    out_dir.push(profile);
    for b in built {
        stage.binaries.insert(out_dir.join(&b), b);
    }
}

/// `cp`/`install`/`mv` of binaries inside a stage.
fn copy_in_stage(stage: &mut Stage, args: &[String], line: usize, problems: &mut Vec<String>) {
    let mut operands = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        if args[0] == "install" && (a == "-m" || a == "-o" || a == "-g" || a == "--mode") {
            it.next();
        } else if !a.starts_with('-') {
            operands.push(a);
        }
    }
    let Some((dest, sources)) = operands.split_last() else {
        return;
    };
    let dest_dir =
        dest.ends_with('/') || sources.len() > 1 || stage.dirs.contains(&stage.resolve(dest));
    let dest = stage.resolve(dest);
    for s in sources {
        let src = stage.resolve(s);
        match stage.binaries.get(&src).cloned() {
            Some(bin) => {
                let to = if dest_dir {
                    dest.join(src.file_name().unwrap())
                } else {
                    dest.clone()
                };
                if args[0] == "mv" {
                    stage.binaries.remove(&src);
                }
                stage.binaries.insert(to, bin);
            }
            None if src.components().any(|c| c.as_os_str() == "target") => problems.push(format!(
                "line {line}: {} {s}: no `cargo build` before it in this stage builds that",
                args[0]
            )),
            None => {}
        }
    }
}

/// A COPY/ADD source from the build context (the workspace root) exists; `*` matches
/// within one path component.
fn context_path_exists(root: &Path, src: &str) -> bool {
    if !src.contains('*') {
        return root.join(src).exists();
    }
    let (dir, pattern) = src.rsplit_once('/').unwrap_or(("", src));
    let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
        return false;
    };
    let (head, tail) = pattern.split_once('*').unwrap();
    entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with(head) && name[head.len()..].ends_with(tail.trim_start_matches('*'))
    })
}

fn parse(ws: &Workspace) -> Dockerfile {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let mut stages: Vec<Stage> = Vec::new();
    let mut problems = Vec::new();
    let mut entrypoint = None;
    for (line, keyword, rest) in instructions(&text) {
        if keyword == "FROM" {
            let w = words(&rest);
            let w: Vec<_> = w.iter().filter(|x| !x.starts_with("--")).collect();
            let name = match w.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                name,
                base: w[0].to_string(),
                workdir: PathBuf::from("/"),
                ..Default::default()
            });
            entrypoint = None;
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            problems.push(format!("line {line}: {keyword} before FROM"));
            continue;
        };
        match keyword.as_str() {
            "WORKDIR" => stage.workdir = stage.resolve(&rest),
            "RUN" => {
                for cmd in shell_commands(&rest) {
                    match cmd[0].as_str() {
                        "cargo" if cmd.get(1).is_some_and(|c| c == "build") => {
                            cargo_build(ws, stage, &cmd[2..], line, &mut problems)
                        }
                        "mkdir" => {
                            for d in cmd[1..].iter().filter(|a| !a.starts_with('-')) {
                                let d = stage.resolve(d);
                                stage.dirs.insert(d);
                            }
                        }
                        "cp" | "install" | "mv" => copy_in_stage(stage, &cmd, line, &mut problems),
                        _ => {}
                    }
                }
            }
            "COPY" | "ADD" => {
                let w = words(&rest);
                let from = w
                    .iter()
                    .find_map(|f| f.strip_prefix("--from="))
                    .map(str::to_string);
                let operands: Vec<&String> = w.iter().filter(|x| !x.starts_with("--")).collect();
                let Some((dest, sources)) = operands.split_last() else {
                    problems.push(format!("line {line}: {keyword} without a destination"));
                    continue;
                };
                let dest_is_dir = dest.ends_with('/') || sources.len() > 1;
                let dest = stage.resolve(dest);
                let Some(from) = from else {
                    for s in sources {
                        if !context_path_exists(&root, s) {
                            problems.push(format!(
                                "line {line}: {keyword} {s}: no such path in the workspace"
                            ));
                        }
                    }
                    continue;
                };
                // --from names an earlier stage (by name or index) or else an image.
                let n = stages.len() - 1;
                let source = stages[..n].iter().enumerate().find(|(i, s)| {
                    s.name.as_deref() == Some(from.as_str()) || i.to_string() == from
                });
                let Some((_, source)) = source else {
                    continue;
                };
                let mut copied = Vec::new();
                for s in sources {
                    let src = normalize(&Path::new("/").join(s));
                    for (path, bin) in &source.binaries {
                        if *path == src {
                            let to = if dest_is_dir {
                                dest.join(path.file_name().unwrap())
                            } else {
                                dest.clone()
                            };
                            copied.push((to, bin.clone()));
                        } else if let Ok(rel) = path.strip_prefix(&src) {
                            copied.push((dest.join(rel), bin.clone()));
                        }
                    }
                }
                stages.last_mut().unwrap().binaries.extend(copied);
            }
            "ENTRYPOINT" => entrypoint = words(&rest).into_iter().next(),
            _ => {}
        }
    }
    Dockerfile {
        stages,
        entrypoint,
        problems,
    }
}

impl Dockerfile {
    /// Path in the final image → the binary there.
    fn installed(&self) -> &BTreeMap<PathBuf, String> {
        &self.stages.last().expect("a FROM").binaries
    }
}

#[test]
fn it_builds_and_copies_only_what_the_workspace_has() {
    let ws = workspace();
    let df = parse(&ws);
    assert!(
        df.problems.is_empty(),
        "Dockerfile:\n  {}",
        df.problems.join("\n  ")
    );
    assert!(df.stages.len() >= 2, "a builder stage and a runtime stage");
}

#[test]
fn the_image_holds_every_binary_of_the_agent_cli_and_controller() {
    let ws = workspace();
    let df = parse(&ws);
    let mut want: Vec<&String> = Vec::new();
    for package in ["gkm", "gkm-controller"] {
        let p = ws
            .package(package)
            .unwrap_or_else(|| panic!("package {package}"));
        assert!(!p.bins.is_empty(), "{package} has binaries");
        want.extend(&p.bins);
    }
    for expected in ["gkm", "gkm-agent", "gkm-controller"] {
        assert!(want.iter().any(|b| *b == expected), "[[bin]] {expected}");
    }
    let installed = df.installed();
    for bin in want {
        let at = Path::new("/usr/local/bin").join(bin);
        assert_eq!(
            installed.get(&at),
            Some(bin),
            "{} in the final image; it has {installed:?}",
            at.display()
        );
    }
    if let Some(e) = &df.entrypoint {
        assert!(
            installed.contains_key(Path::new(e)),
            "ENTRYPOINT {e} is not a binary the image installs"
        );
    }
}

/// Every workload in deploy/ that runs the gkm image runs a binary the image installs.
#[test]
fn deploy_commands_are_installed_binaries() {
    let ws = workspace();
    let df = parse(&ws);
    let installed = df.installed();
    let deploy = workspace_root().join("deploy");
    let kustomization: Value = serde_norway::from_str(
        &std::fs::read_to_string(deploy.join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let image_names: Vec<&str> = kustomization["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(image_names.contains(&"gkm"));

    let mut files = Vec::new();
    let mut dirs = vec![deploy];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    let mut runs = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let o: Value = serde::Deserialize::deserialize(doc).unwrap();
            let Some(containers) = o["spec"]["template"]["spec"]["containers"].as_array() else {
                continue;
            };
            for c in containers {
                let image = c["image"].as_str().unwrap();
                let name = image.split([':', '@']).next().unwrap();
                if !image_names.contains(&name) {
                    continue;
                }
                let command = c["command"][0]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| df.entrypoint.clone())
                    .unwrap_or_else(|| panic!("{}: {} has no command", f.display(), c["name"]));
                let bin = installed.get(Path::new(&command)).unwrap_or_else(|| {
                    panic!(
                        "{}: {} runs {command}, which the Dockerfile does not install \
                         (it installs {installed:?})",
                        f.display(),
                        c["name"]
                    )
                });
                runs.insert(
                    format!(
                        "{}/{}",
                        o["kind"].as_str().unwrap(),
                        o["metadata"]["name"].as_str().unwrap()
                    ),
                    bin.clone(),
                );
            }
        }
    }
    assert_eq!(
        runs.get("Deployment/gkm-controller").map(String::as_str),
        Some("gkm-controller"),
        "{runs:?}"
    );
    assert_eq!(
        runs.get("DaemonSet/gkm-agent").map(String::as_str),
        Some("gkm-agent"),
        "{runs:?}"
    );
}

/// The runtime stage has the C library the binaries were linked against (and that the
/// NVIDIA toolkit's injected libnvidia-ml needs): a glibc image of the builder's Debian
/// release, not scratch, static or musl.
#[test]
fn the_runtime_matches_the_builders_libc() {
    let ws = workspace();
    let df = parse(&ws);
    let runtime = &df.stages.last().unwrap().base;
    for bad in ["scratch", "alpine", "static", "musl"] {
        assert!(!runtime.contains(bad), "runtime image {runtime}: no glibc");
    }
    let releases = [("bullseye", "11"), ("bookworm", "12"), ("trixie", "13")];
    let release_of = |image: &str| {
        releases.iter().find(|(codename, number)| {
            image.contains(codename)
                || image.contains(&format!("debian{number}"))
                || image.contains(&format!("debian:{number}"))
        })
    };
    let builder = df
        .stages
        .iter()
        .rev()
        .skip(1)
        .find(|s| s.base.starts_with("rust:") || s.base.contains("/rust:"))
        .expect("a rust builder stage");
    let built_on = release_of(&builder.base).unwrap_or_else(|| {
        panic!(
            "builder {}: pin a Debian release in the tag (e.g. -bookworm)",
            builder.base
        )
    });
    assert_eq!(
        release_of(runtime),
        Some(built_on),
        "runtime {runtime} and builder {}: binaries need the builder's glibc or newer",
        builder.base
    );
}
