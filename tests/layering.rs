//! The layering holds, at two levels:
//! - crates: `gkm-api` <- `gkm-image` <- `gkm-node` <- `gkm`, and `gkm-controller` on
//!   `gkm-image` only. Cargo itself refuses a cycle between crates; these tests check that
//!   the controller links none of the node side (NVML, CSI gRPC, mounts) and that the API
//!   crate stays plain types.
//! - modules: no import cycle between the top-level modules of each crate. A cycle means a
//!   type sits in the wrong module (the store once imported the CSI plugin for its cache
//!   key; admission's verifier returned a webhook type); the test names the modules and the
//!   files that close it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gkm_testenv::workspace_root;

/// module -> (module it uses -> a file where it does).
type Graph = BTreeMap<String, BTreeMap<String, PathBuf>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::<module>` uses of each top-level module under `root`, outside tests.
fn graph(root: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| f.strip_prefix(root).ok())
        .filter_map(|rel| rel.components().next())
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .filter(|m| !matches!(m.as_str(), "lib" | "main" | "bin"))
        .collect();
    let path_use = regex::Regex::new(r"crate::([a-z_][a-z0-9_]*)").unwrap();
    let group_use = regex::Regex::new(r"crate::\{([^}]*)\}").unwrap();
    let mut g = Graph::new();
    for file in &files {
        let rel = file.strip_prefix(root).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if !modules.contains(&top) {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        // Test modules may reach anywhere; they come last in each file here.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let mut used: Vec<String> = path_use
            .captures_iter(code)
            .map(|c| c[1].to_string())
            .collect();
        for c in group_use.captures_iter(code) {
            used.extend(
                c[1].split(',')
                    .filter_map(|p| p.trim().split("::").next())
                    .map(str::to_string),
            );
        }
        for m in used {
            if m != top && modules.contains(&m) {
                g.entry(top.clone())
                    .or_default()
                    .entry(m)
                    .or_insert_with(|| rel.to_path_buf());
            }
        }
    }
    g
}

/// A cycle through `start`, as the modules on it, if there is one.
fn cycle_through(g: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flat_map(|m| m.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

fn assert_acyclic(root: &Path, min_modules: usize) {
    let g = graph(root);
    assert!(
        g.len() >= min_modules,
        "{}: only {} modules found",
        root.display(),
        g.len()
    );
    for module in g.keys() {
        if let Some(cycle) = cycle_through(&g, module) {
            let steps: Vec<String> = cycle
                .iter()
                .zip(cycle.iter().cycle().skip(1))
                .map(|(a, b)| format!("{a} -> {b} (in {})", g[a][b].display()))
                .collect();
            panic!("{}: an import cycle: {}", root.display(), steps.join(", "));
        }
    }
}

#[test]
fn the_modules_of_each_crate_form_no_import_cycle() {
    // The minimum guards against a path that silently stopped matching any file.
    for (dir, min) in [
        ("crates/image/src", 5),
        ("crates/node/src", 2),
        ("controller/src", 3),
        ("src", 1),
    ] {
        assert_acyclic(&workspace_root().join(dir), min);
    }
}

/// The packages in `package`'s normal (non-dev) dependency tree, as `cargo tree` lists them,
/// down to `depth` (None: all the way).
fn dependencies(package: &str, depth: Option<u32>) -> BTreeSet<String> {
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args([
        "tree", "--locked", "-e", "normal", "--prefix", "none", "-p", package,
    ]);
    if let Some(d) = depth {
        cmd.args(["--depth", &d.to_string()]);
    }
    let out = cmd.output().expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != package)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_controller_links_nothing_of_the_node_side() {
    let deps = dependencies("gkm-controller", None);
    assert!(deps.contains("gkm-image"), "{deps:?}");
    for node_only in [
        "gkm-node",
        "gkm",
        "nvml-wrapper",
        "tonic",
        "prost",
        "protoc-bin-vendored",
    ] {
        assert!(
            !deps.contains(node_only),
            "gkm-controller depends on {node_only}: {deps:?}"
        );
    }
}

#[test]
fn the_api_crate_is_plain_types() {
    let direct = dependencies("gkm-api", Some(1));
    let allowed = [
        "k8s-openapi",
        "kube",
        "schemars",
        "serde",
        "serde_json",
        "serde_norway",
        "thiserror",
    ];
    let extra: Vec<&String> = direct
        .iter()
        .filter(|d| !allowed.contains(&d.as_str()))
        .collect();
    assert!(extra.is_empty(), "gkm-api gained dependencies {extra:?}");
}

#[test]
fn a_cycle_is_found_and_named() {
    let g: Graph = [
        ("store", [("csi", "store/mod.rs")]),
        ("csi", [("store", "csi/mod.rs")]),
        ("api", [("oci", "api/mod.rs")]),
    ]
    .into_iter()
    .map(|(a, edges)| {
        (
            a.to_string(),
            edges
                .into_iter()
                .map(|(b, f)| (b.to_string(), PathBuf::from(f)))
                .collect(),
        )
    })
    .collect();
    assert_eq!(
        cycle_through(&g, "store"),
        Some(vec!["store".to_string(), "csi".to_string()])
    );
    assert_eq!(cycle_through(&g, "api"), None);
}
