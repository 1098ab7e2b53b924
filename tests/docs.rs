//! The README and docs/ stay true: every `gkm` subcommand and flag, every `gkm-agent` and
//! `gkm-controller` flag, and every script they name exists. (docs/design.md is the
//! contract, which names things still to be built, and is left out.) The README's main-job
//! command itself runs in the test command (scripts/test.sh runs the demo).

use std::path::{Path, PathBuf};
use std::process::Command;

use gkm_testenv::workspace_root;

/// README.md and docs/*.md except the contract.
fn documents() -> Vec<(PathBuf, String)> {
    let root = workspace_root();
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") && !p.ends_with("design.md") {
            files.push(p);
        }
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

/// Command lines of `program`: from code blocks and inline code, with `cargo run --bin X --`
/// read as `X`.
fn command_lines(text: &str, program: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut candidates: Vec<String> = text.lines().map(str::to_string).collect();
    for line in text.lines() {
        candidates.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
    }
    let cargo = format!("cargo run --bin {program} -- ");
    for c in candidates {
        let c = c.trim().trim_start_matches("$ ");
        let c = c.split(" #").next().unwrap_or(c);
        // `VAR=value gkm ...`
        let c = c
            .split_whitespace()
            .skip_while(|w| w.contains('=') && !w.starts_with('-'))
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(rest) = c.strip_prefix(&cargo) {
            out.push(format!("{program} {rest}"));
        } else if c.starts_with(&format!("{program} ")) {
            out.push(c.to_string());
        }
    }
    out
}

fn flags(line: &str) -> Vec<String> {
    line.split_whitespace()
        .filter(|w| w.starts_with("--") && w.chars().nth(2).is_some_and(|c| c.is_ascii_lowercase()))
        .map(|w| {
            w.split('=')
                .next()
                .unwrap()
                .trim_end_matches([',', ')', '`', '.'])
                .to_string()
        })
        .collect()
}

fn help(bin: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The controller binary, built if this test runs alone.
fn controller_bin() -> PathBuf {
    gkm_testenv::workspace_binary("gkm-controller", "gkm-controller")
}

#[test]
fn every_gkm_command_and_flag_in_the_docs_exists() {
    let gkm = PathBuf::from(env!("CARGO_BIN_EXE_gkm"));
    let mut checked = 0;
    for (path, text) in documents() {
        for line in command_lines(&text, "gkm") {
            let Some(sub) = line.split_whitespace().nth(1) else {
                continue;
            };
            if sub.starts_with('-') || !sub.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                continue;
            }
            let usage = help(&gkm, &[sub]).unwrap_or_else(|| {
                panic!("{}: `gkm {sub}` is not a command ({line})", path.display())
            });
            for f in flags(&line) {
                assert!(
                    usage.contains(&f),
                    "{}: `gkm {sub}` has no {f} ({line})",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "only {checked} gkm commands found in the docs"
    );
}

#[test]
fn every_agent_and_controller_flag_in_the_docs_exists() {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_gkm-agent"));
    let gkm = PathBuf::from(env!("CARGO_BIN_EXE_gkm"));
    let programs = [("gkm-agent", agent), ("gkm-controller", controller_bin())];
    let mut everything = String::new();
    for (program, bin) in &programs {
        let usage = help(bin, &[]).unwrap();
        for (path, text) in documents() {
            for line in command_lines(&text, program) {
                for f in flags(&line) {
                    assert!(
                        usage.contains(&f),
                        "{}: {program} has no {f} ({line})",
                        path.display()
                    );
                }
            }
        }
        everything.push_str(&usage);
    }
    // Every subcommand `gkm --help` lists.
    let top = help(&gkm, &[]).unwrap();
    let subs: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|s| *s != "help")
        .collect();
    assert!(
        subs.contains(&"build") && subs.contains(&"promote"),
        "{subs:?}"
    );
    for sub in subs {
        everything.push_str(&help(&gkm, &[sub]).unwrap());
    }
    // Any flag anywhere (tables, prose): some GKM program has it, or it belongs to a tool
    // the docs show.
    for (path, text) in documents() {
        let words = text.replace(['`', '|', '"', '\''], " ");
        for f in flags(&words) {
            assert!(
                everything.contains(&f) || OTHER_TOOLS_FLAGS.contains(&f.as_str()),
                "{}: no GKM program has {f}",
                path.display()
            );
        }
    }
}

/// Flags of other programs the docs show (kubectl, cargo, cosign, the demo, scripts/fuzz.sh
/// and cargo-fuzz).
const OTHER_TOOLS_FLAGS: &[&str] = &[
    "--replay",
    "--list",
    "--sanitizer",
    "--cacert",
    "--server-side",
    "--dry-run",
    "--field-manager",
    "--overwrite",
    "--bin",
    "--lib",
    "--nocapture",
    "--type",
    "--new-bundle-format",
    "--tlog-upload",
    "--use-signing-config",
    "--workspace",
    "--test",
    "--bench",
    "--example",
    "--all-targets",
    "--check",
    "--keep",
    "--bin-dir",
    "--key",
    "--insecure-ignore-tlog",
    "--allow-http-registry",
    "--allow-insecure-registry",
    "--locked",
    "--release",
    "--help",
    "--kubeconfig",
    "--namespace",
    "--output",
    "--selector",
    "--show-labels",
    "--all-namespaces",
    "--previous",
    "--tail",
    "--since",
    "--force-conflicts",
    "--prune",
    "--wait",
    "--for",
    "--timeout",
    "--context",
    "--field-selector",
    "--sort-by",
    "--type",
    "--from-file",
    "--from-literal",
    "--docker-server",
    "--docker-username",
    "--docker-password",
    // The CSI sidecars in deploy/agent/daemonset.yaml.
    "--kubelet-registration-path",
    "--csi-address",
    "--health-port",
    "--http-endpoint",
];

#[test]
fn every_script_the_docs_name_exists() {
    let root = workspace_root();
    for (path, text) in documents() {
        for word in text.split(|c: char| c.is_whitespace() || "`()[]:,".contains(c)) {
            let word = word.trim_end_matches('.');
            if (word.starts_with("scripts/") || word.starts_with("benches/")) && !word.contains('*')
            {
                assert!(
                    root.join(word).exists(),
                    "{}: {word} does not exist",
                    path.display()
                );
            }
        }
    }
}
