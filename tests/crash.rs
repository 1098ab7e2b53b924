//! SIGKILL during `gkm pull`, at random points: the store never shows a partial tree, and
//! the next start removes what the killed process left.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gkm::store::{Store, StoreConfig};
use gkm_testenv::image::{CacheKind, Compression, ImageBuilder, Target};
use gkm_testenv::{shared_registry, unique_name};

/// Enough files that extraction takes a while, so kills land inside it.
fn big_tree(dir: &Path) {
    for d in 0..40 {
        let sub = dir.join(format!("{d:02x}{}", "0".repeat(30)));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..50 {
            let body: Vec<u8> = (0..(2048 + d * 97 + f * 13))
                .map(|i| (i * 7 + d + f) as u8)
                .collect();
            std::fs::write(sub.join(format!("k{f}.cubin")), body).unwrap();
        }
    }
}

/// Starts `gkm pull IMAGE --store STORE` in the background.
fn spawn_pull(image: &str, registry: &str, store: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_gkm"))
        .args([
            "pull",
            image,
            "--no-sync",
            "--insecure-registry",
            registry,
            "--store",
        ])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A small deterministic generator: the failing seed is printed, so a run can be repeated.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn sigkill_at_random_points_never_exposes_a_partial_tree() {
    let registry = shared_registry();
    let src = tempfile::tempdir().unwrap();
    big_tree(src.path());
    let image = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Gzip,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pushed = rt
        .block_on(image.push(registry, &unique_name("crash/big"), Some("v1")))
        .unwrap();
    let hex = pushed.digest.trim_start_matches("sha256:").to_string();

    let pull = |store: &Path| spawn_pull(&pushed.by_digest(), registry.host(), store);

    // How long one whole pull takes here.
    let base = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    assert!(pull(base.path()).wait().unwrap().success());
    let full = t0.elapsed();
    let expected_files = Store::open(StoreConfig {
        root: base.path().into(),
        ..Default::default()
    })
    .unwrap()
    .get(&pushed.digest)
    .unwrap()
    .expect("a complete pull leaves a tree")
    .meta
    .files;

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash test: full pull {full:?}, seed {seed}");
    let mut rng = Lcg(seed);
    let (mut mid_extraction, mut completed) = (0, 0);
    for round in 0..25 {
        let root = tempfile::tempdir().unwrap();
        let mut child = pull(root.path());
        // Stratified over 0..1.5x a full pull, jittered: early kills, kills deep inside the
        // extraction, and kills after it finished all happen.
        let jitter = (rng.next() % 1000) as f64 / 1000.0;
        let delay = full.mul_f64(1.5 * (round as f64 + jitter) / 25.0);
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();

        let visible = root.path().join("store/sha256").join(&hex);
        let tmp = root.path().join("store/tmp");
        let leftovers = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
        if leftovers > 0 {
            mid_extraction += 1;
        }
        if visible.exists() {
            // Visible means complete: metadata and every file are there.
            completed += 1;
            let store = Store::open(StoreConfig {
                root: root.path().into(),
                ..Default::default()
            })
            .unwrap();
            let e = store
                .get(&pushed.digest)
                .unwrap()
                .unwrap_or_else(|| panic!("round {round} (seed {seed}): tree without meta.json"));
            assert_eq!(e.meta.files, expected_files, "round {round} (seed {seed})");
            let mut n = 0;
            count_files(&e.rootfs(), &mut n);
            assert_eq!(
                n, expected_files,
                "round {round} (seed {seed}): a visible tree is complete"
            );
        } else {
            let _store = Store::open(StoreConfig {
                root: root.path().into(),
                ..Default::default()
            })
            .unwrap();
        }
        // Whatever the kill left in tmp/ is gone after the next open.
        assert_eq!(
            std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0),
            0,
            "round {round} (seed {seed}), {status}"
        );
    }
    eprintln!(
        "crash test: {mid_extraction} kills inside an extraction, {completed} after completion"
    );
    assert!(
        mid_extraction >= 5,
        "too few kills landed inside an extraction ({mid_extraction}); seed {seed}"
    );
}

fn count_files(dir: &Path, n: &mut u64) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            count_files(&e.path(), n);
        } else if t.is_file() {
            *n += 1;
        }
    }
}

#[test]
fn a_pull_resumes_cleanly_after_a_crash() {
    // A killed pull followed by a complete one gives the same tree as a clean pull.
    let registry = shared_registry();
    let src = tempfile::tempdir().unwrap();
    big_tree(src.path());
    let image = ImageBuilder::mcv(
        CacheKind::Triton,
        src.path(),
        &[Target::new("cuda", "90", 32)],
        Compression::Zstd,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pushed = rt
        .block_on(image.push(registry, &unique_name("crash/resume"), Some("v1")))
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let run = || spawn_pull(&pushed.by_digest(), registry.host(), root.path());
    let mut child = run();
    std::thread::sleep(Duration::from_millis(150));
    let _ = child.kill();
    child.wait().unwrap();
    assert!(run().wait().unwrap().success());
    let store = Store::open(StoreConfig {
        root: root.path().into(),
        ..Default::default()
    })
    .unwrap();
    let e = store.get(&pushed.digest).unwrap().unwrap();
    let mut n = 0;
    count_files(&e.mount_source(), &mut n);
    assert_eq!(n, 40 * 50);
}
