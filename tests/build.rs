//! `gkm build` against real components: a registry (crane's), GKM's own inspect, store and
//! verifier, the real `cosign verify`, and skopeo reading the OCI layout.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gkm::cli::{self, BuildRequest};
use gkm::cmdline::RegistryArgs;
use gkm::gpu::Inventory;
use gkm::oci::{Credentials, PinnedRef, PullConfig, Puller, Reference};
use gkm::store::{Store, StoreConfig};
use gkm::trust::{TrustPolicy, Verifier};
use gkm_testenv::fixtures::triton_like_cache;
use gkm_testenv::{Cosign, Registry, shared_registry, unique_name};

fn registry_options(registry: &Registry) -> RegistryArgs {
    RegistryArgs {
        insecure_registries: vec![registry.host().to_string()],
        registry_auth: None,
    }
}

fn puller(registry: &Registry) -> Puller {
    Puller::new(
        PullConfig {
            insecure_registries: vec![registry.host().to_string()],
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        Credentials::anonymous(),
    )
}

/// A Triton cache as Triton writes it: hash-named folders, each with a kernel's metadata
/// JSON (`target`), its group file and binaries (from the shared generator), plus an
/// executable launcher and a symlink to it. Kernels for sm_90 and sm_80.
fn triton_cache(dir: &Path, seed: u64) {
    triton_like_cache(dir, 300_000, 40, seed).unwrap();
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    for (i, f) in folders.iter().enumerate() {
        let arch = if i % 2 == 0 { 90 } else { 80 };
        let name = format!("kernel_{i}");
        std::fs::write(
            f.join(format!("{name}.json")),
            format!(
                r#"{{"hash": "{}", "target": {{"backend": "cuda", "arch": {arch}, "warp_size": 32}}, "num_warps": 4, "num_stages": 3, "debug": false, "name": "{name}"}}"#,
                f.file_name().unwrap().to_string_lossy()
            ),
        )
        .unwrap();
        std::fs::write(
            f.join(format!("__grp__{name}.json")),
            format!(r#"{{"child_paths": {{"{name}.json": "x"}}}}"#),
        )
        .unwrap();
    }
    std::fs::write(dir.join("__triton_launcher.so"), b"\x7fELF launcher").unwrap();
    std::fs::set_permissions(
        dir.join("__triton_launcher.so"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("__triton_launcher.so", dir.join("launcher.so")).unwrap();
}

/// path → (mode, content or link target) for every entry below `root`.
fn snapshot(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if m.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, (0, target.into_os_string().into_encoded_bytes()));
            } else if m.is_dir() {
                out.insert(rel, (m.permissions().mode() & 0o7777, Vec::new()));
                walk(root, &p, out);
            } else {
                let mode = m.permissions().mode() & 0o7777;
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Runs the `gkm` binary; returns (success, stdout, stderr).
async fn gkm(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gkm"))
        .args(args)
        .env_remove("COSIGN_PASSWORD")
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn request(dir: &Path, kind: &str, reference: Option<String>) -> BuildRequest {
    BuildRequest {
        dir: dir.to_path_buf(),
        kind: kind.into(),
        reference,
        targets: Vec::new(),
        sign_key: None,
        oci_layout: None,
        quiet: false,
    }
}

#[tokio::test]
async fn a_built_image_inspects_and_extracts_to_its_source_tree() {
    let registry = shared_registry();
    let src = tempfile::tempdir().unwrap();
    triton_cache(src.path(), 7);
    let repo = format!("{}/{}", registry.host(), unique_name("build/triton"));
    let (ok, stdout, stderr) = gkm(
        &[
            "build",
            src.path().to_str().unwrap(),
            "--kind",
            "triton",
            "-t",
            &format!("{repo}:v1"),
            "--insecure-registry",
            registry.host(),
        ],
        &[],
    )
    .await;
    assert!(ok, "{stderr}");
    let pushed = stdout.lines().last().unwrap().to_string();
    assert!(pushed.starts_with(&format!("{repo}@sha256:")), "{stdout}");
    let pinned = PinnedRef::parse(&pushed).unwrap();

    // `gkm inspect` (by tag) sees the targets, and a simulated H100 fits.
    let gpus = src
        .path()
        .parent()
        .unwrap()
        .join(unique_name("gpus") + ".yaml");
    std::fs::write(
        &gpus,
        "gpus:\n  - uuid: GPU-1\n    backend: cuda\n    arch: \"90\"\n",
    )
    .unwrap();
    let inventory = Inventory {
        simulated_file: Some(gpus.clone()),
        ..Default::default()
    };
    let report = cli::inspect(
        &format!("{repo}:v1"),
        &registry_options(registry),
        &inventory,
    )
    .await
    .unwrap();
    std::fs::remove_file(&gpus).unwrap();
    assert_eq!(report.image, pushed);
    assert_eq!(report.kind.as_deref(), Some("triton"));
    assert_eq!(report.targets, ["cuda sm_80/warp 32", "cuda sm_90/warp 32"]);
    assert_eq!(report.compatible, ["GPU-1"]);
    let folders = std::fs::read_dir(src.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(
        report.info.labels["cache.triton.image/entry-count"],
        folders.to_string()
    );

    // The agent's store extracts exactly the source tree, where pods see it.
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig {
        root: root.path().to_path_buf(),
        sync: false,
        ..Default::default()
    })
    .unwrap();
    let e = store.ensure(&pinned, &puller(registry)).await.unwrap();
    assert_eq!(e.mount_source(), e.rootfs().join("io.triton.cache"));
    assert_eq!(snapshot(&e.mount_source()), snapshot(src.path()));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(e.rootfs().join("io.triton.manifest/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["kind"], "triton");
    assert_eq!(manifest["triton"].as_array().unwrap().len(), folders);
    let size: u64 = report.info.labels["cache.triton.image/cache-size-bytes"]
        .parse()
        .unwrap();
    assert_eq!(e.meta.size_bytes, size + manifest_size(&e.rootfs()));
}

fn manifest_size(rootfs: &Path) -> u64 {
    std::fs::metadata(rootfs.join("io.triton.manifest/manifest.json"))
        .unwrap()
        .len()
}

#[tokio::test]
async fn the_same_tree_builds_to_the_same_digest() {
    let registry = shared_registry();
    let a = tempfile::tempdir().unwrap();
    triton_cache(a.path(), 11);
    // A copy made later: other times, same content and modes.
    let b = tempfile::tempdir().unwrap();
    triton_cache(b.path(), 11);
    let repo = format!("{}/{}", registry.host(), unique_name("build/determinism"));
    let opts = registry_options(registry);
    let first = cli::build(
        &request(a.path(), "triton", Some(format!("{repo}:a"))),
        &opts,
    )
    .await
    .unwrap();
    let second = cli::build(
        &request(a.path(), "triton", Some(format!("{repo}:b"))),
        &opts,
    )
    .await
    .unwrap();
    let copy = cli::build(
        &request(b.path(), "triton", Some(format!("{repo}:c"))),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(first, second);
    assert_eq!(first, copy);
    // And a change of content is a new digest.
    std::fs::write(a.path().join("extra.bin"), b"x").unwrap();
    let changed = cli::build(
        &request(a.path(), "triton", Some(format!("{repo}:d"))),
        &opts,
    )
    .await
    .unwrap();
    assert_ne!(first, changed);
}

fn key_policy(pem: &str, registry: &Registry) -> TrustPolicy {
    let key: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    let yaml = format!(
        "authorities:\n  - name: builder\n    key: |\n{key}trustedRegistries: [{}]\n",
        registry.host()
    );
    TrustPolicy::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

#[tokio::test]
async fn sign_key_signs_what_cosign_and_gkm_both_verify() {
    let registry = shared_registry();
    let cosign = Cosign::generate().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    triton_cache(src.path(), 13);
    let repo = format!("{}/{}", registry.host(), unique_name("build/signed"));
    let key = cosign.key_path();
    let args = |tag: &str| -> Vec<String> {
        [
            "build",
            src.path().to_str().unwrap(),
            "--kind",
            "triton",
            "-t",
            &format!("{repo}:{tag}"),
            "--insecure-registry",
            registry.host(),
            "--sign-key",
            key.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // A wrong password fails before anything is built or pushed.
    let wrong = args("wrong");
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = gkm(&wrong, &[("COSIGN_PASSWORD", "not-it")]).await;
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("wrong password") && stderr.contains(key.to_str().unwrap()),
        "{stderr}"
    );
    let tag = Reference::with_tag(
        registry.host().into(),
        repo.split_once('/').unwrap().1.into(),
        "wrong".into(),
    );
    assert_eq!(
        puller(registry)
            .fetch_manifest_bytes(&tag, 1 << 20)
            .await
            .unwrap(),
        None,
        "nothing was pushed"
    );

    let good = args("v1");
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = gkm(&good, &[("COSIGN_PASSWORD", "gkm-testenv")]).await;
    assert!(ok, "{stderr}");
    let pushed = stdout.lines().last().unwrap().to_string();
    assert!(stderr.contains(".sig"), "{stderr}");

    // The real cosign accepts it...
    let out = cosign.verify(&pushed).await.unwrap();
    assert!(out.contains("cosign container image signature"), "{out}");
    // ... and so does GKM's verifier, under a key authority.
    let verifier = Verifier::new(
        key_policy(&cosign.public_key_pem().unwrap(), registry),
        puller(registry),
    );
    let pinned = PinnedRef::parse(&pushed).unwrap();
    let v = verifier.verify(&pinned).await.unwrap();
    assert_eq!(
        (v.digest.as_str(), v.authority.as_str()),
        (pinned.digest(), "builder")
    );

    // Building and signing again adds no second copy of the same signature.
    let again = args("v2");
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let (ok, stdout2, stderr) = gkm(&again, &[("COSIGN_PASSWORD", "gkm-testenv")]).await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout2.lines().last().unwrap(), pushed);
    let sig = Reference::with_tag(
        pinned.registry().into(),
        pinned.repository().into(),
        gkm::trust::tag::signature_tag(pinned.digest()),
    );
    let (bytes, _) = puller(registry)
        .fetch_manifest_bytes(&sig, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(m["layers"].as_array().unwrap().len(), 1, "{m}");
}

#[tokio::test]
async fn oci_layout_output_is_a_valid_layout() {
    let src = tempfile::tempdir().unwrap();
    triton_cache(src.path(), 17);
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("layout");
    let mut req = request(src.path(), "triton", Some("v1".into()));
    req.oci_layout = Some(layout.clone());
    let line = cli::build(&req, &RegistryArgs::default()).await.unwrap();
    let (path, digest) = line.rsplit_once('@').unwrap();
    assert_eq!(path, layout.display().to_string());

    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(marker["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = &index["manifests"][0];
    assert_eq!(m["digest"], digest);
    assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "v1");
    // Every blob is there and hashes to its name.
    let blob = |d: &str| {
        let bytes = std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
        assert_eq!(gkm::build::sha256_digest(&bytes), d);
        bytes
    };
    let manifest: serde_json::Value = serde_json::from_slice(&blob(digest)).unwrap();
    blob(manifest["config"]["digest"].as_str().unwrap());
    blob(manifest["layers"][0]["digest"].as_str().unwrap());

    // A second image under another name joins the first; the same name is replaced.
    std::fs::write(src.path().join("extra.bin"), b"x").unwrap();
    let mut req2 = request(src.path(), "triton", Some("v2".into()));
    req2.oci_layout = Some(layout.clone());
    cli::build(&req2, &RegistryArgs::default()).await.unwrap();
    cli::build(&req2, &RegistryArgs::default()).await.unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{index}");

    // skopeo reads it as an image, labels and all.
    if let Ok(out) = std::process::Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:v1", layout.display())])
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["Digest"], digest);
        assert!(
            v["Labels"]["cache.triton.image/summary"]
                .as_str()
                .unwrap()
                .contains(r#""arch":"90""#),
            "{v}"
        );
    } else {
        eprintln!("skopeo is not installed: the layout was checked by reading it back only");
    }
}

#[tokio::test]
async fn a_vllm_cache_without_targets_needs_target_flags() {
    let src = tempfile::tempdir().unwrap();
    let entry = src
        .path()
        .join("torch_compile_cache/edf531ca35/rank_0_0/backbone");
    std::fs::create_dir_all(&entry).unwrap();
    std::fs::write(entry.join("computation_graph.py"), b"# graph").unwrap();
    std::fs::write(entry.join("cache_key_factors.json"), br#"{"env": {}}"#).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut req = request(src.path(), "vllm", Some("v1".into()));
    req.oci_layout = Some(out.path().join("layout"));
    let e = cli::build(&req, &RegistryArgs::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no GPU targets found") && e.contains("--target"),
        "{e}"
    );
    assert!(!out.path().join("layout").exists(), "nothing written");

    req.targets = vec!["cuda:90:32".into()];
    cli::build(&req, &RegistryArgs::default()).await.unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("layout/index.json")).unwrap())
            .unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_options_are_refused_before_building() {
    let src = tempfile::tempdir().unwrap();
    triton_cache(src.path(), 19);
    let opts = RegistryArgs::default();
    let mut req = request(src.path(), "triton", None);
    let e = cli::build(&req, &opts).await.unwrap_err().to_string();
    assert!(e.contains("-t REF"), "{e}");
    req.reference = Some(format!("r.example/x@sha256:{}", "a".repeat(64)));
    let e = cli::build(&req, &opts).await.unwrap_err().to_string();
    assert!(e.contains("by tag"), "{e}");
    req.reference = Some("v1".into());
    req.oci_layout = Some(src.path().join("layout"));
    req.sign_key = Some(src.path().join("cosign.key"));
    let e = cli::build(&req, &opts).await.unwrap_err().to_string();
    assert!(e.contains("--oci-layout"), "{e}");
    let mut req = request(src.path(), "onnx", Some("r.example/x:v1".into()));
    let e = cli::build(&req, &opts).await.unwrap_err().to_string();
    assert!(e.contains("triton"), "{e}");
    req.kind = "triton".into();
    req.targets = vec!["cuda:90".into()];
    let e = cli::build(&req, &opts).await.unwrap_err().to_string();
    assert!(e.contains("BACKEND:ARCH:WARP"), "{e}");
}

/// `gkm ARGS` under util-linux's `script`, which gives it a pseudo-terminal (stdout and
/// stderr both go to it, and come back as `script`'s stdout); with a TERM, as a terminal
/// has one (CI runs with none, and indicatif draws nothing on a dumb terminal).
async fn gkm_on_a_terminal(args: &[&str]) -> std::process::Output {
    let cmd = std::iter::once(env!("CARGO_BIN_EXE_gkm"))
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    tokio::process::Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("TERM", "xterm-256color")
        .env_remove("COSIGN_PASSWORD")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// `gkm build` shows its uploads as `docker push` does (one bar per blob: bytes, rate, ETA;
/// a line per blob pushed) on a terminal, nothing with `--quiet` or when stderr is not a
/// terminal, and prints the same final line, `REPO@DIGEST`, in every case.
#[tokio::test]
async fn gkm_build_shows_upload_progress_on_a_terminal_only() {
    let registry = shared_registry();
    let repo = format!("{}/{}", registry.host(), unique_name("build/progress"));
    // A different cache each time: a layer the registry has already is not uploaded.
    let cache = |seed: u64| {
        let dir = tempfile::tempdir().unwrap();
        triton_cache(dir.path(), seed);
        dir
    };
    let args = |dir: &Path, tag: &str, extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "build",
            dir.to_str().unwrap(),
            "--kind",
            "triton",
            "-t",
            &format!("{repo}:{tag}"),
            "--insecure-registry",
            registry.host(),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // What the build reports on stderr: `… layer sha256:<hex> (…); image sha256:<hex>`.
    let built = |out: &str| -> (String, String) {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("layer sha256:"))
            .unwrap_or_else(|| panic!("no layer line:\n{out}"));
        let word = |after: &str| {
            line.split(after)
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        (word("layer "), word("image "))
    };

    // On a terminal: the layer's line (`pushed sha256:<12 hex>: 288.20 KiB in 0s`), then
    // the final line.
    let src = cache(21);
    let a = args(src.path(), "tty", &[]);
    let tty = gkm_on_a_terminal(&a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let lines = terminal_lines(&tty.stdout);
    let shown = lines.join("\n");
    assert!(tty.status.success(), "{shown}");
    let (layer, image) = built(&shown);
    let pushed = format!("pushed {}:", &layer[..19]);
    let line = lines
        .iter()
        .find(|l| l.contains(&pushed))
        .unwrap_or_else(|| panic!("no progress on a terminal ({pushed}):\n{shown}"));
    assert!(line.contains("B in "), "no byte count: {line}");
    assert_eq!(lines.last().unwrap(), &format!("{repo}@{image}"), "{shown}");

    // Quiet on a terminal, and not a terminal: only the final line.
    let src = cache(22);
    let a = args(src.path(), "quiet", &["--quiet"]);
    let quiet = gkm_on_a_terminal(&a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let lines = terminal_lines(&quiet.stdout);
    let shown = lines.join("\n");
    assert!(quiet.status.success(), "{shown}");
    assert!(
        !shown.contains("pushed sha256:") && !shown.contains("pushing"),
        "--quiet shows progress:\n{shown}"
    );
    let (_, image) = built(&shown);
    assert_eq!(lines.last().unwrap(), &format!("{repo}@{image}"), "{shown}");

    let src = cache(23);
    let a = args(src.path(), "piped", &[]);
    let (ok, stdout, stderr) = gkm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    assert!(ok, "{stderr}");
    assert!(
        !stderr.contains("pushed sha256:") && !stderr.contains("pushing"),
        "a pipe shows progress:\n{stderr}"
    );
    let (_, image) = built(&stderr);
    assert_eq!(stdout, format!("{repo}@{image}\n"));
}

/// `out` as the terminal's lines of text: ANSI control sequences (colours, line clearing)
/// removed, and a carriage return (indicatif redrawing a line) taken as a line break.
fn terminal_lines(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    let mut plain = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, then one final byte in @..~.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .split(['\r', '\n'])
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}
