//! Deterministic Triton-like kernel caches for benchmarks: hash-named folders, each with a
//! few small text files (JSON, IR) and compiled binaries, plus some large objects; and a
//! one-kernel cache image for tests that need many small distinct images.

use std::io::Write;
use std::path::Path;

use crate::Error;

/// What a generated tree holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Generated {
    pub files: u64,
    pub bytes: u64,
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WORDS: &[&str] = &[
    "tt.load",
    "tt.store",
    "tt.dot",
    "arith.addf",
    "arith.mulf",
    "%arg0",
    "%c0_i32",
    "tensor<128x64xf16>",
    "#blocked",
    "scf.for",
    "tt.splat",
    "tt.make_range",
    "llvm.getelementptr",
    "nvvm.barrier0",
    "ld.global.v4.b32",
    "mma.sync.aligned.m16n8k16",
    "{\"num_warps\": 4",
    "\"num_stages\": 3",
    "\"shared\": 49152}",
    "\n",
];

/// The smallest Triton cache `gkm build --kind triton` accepts: `<dir>/cache/KEY1/` with
/// one kernel's metadata (cuda sm_90, warp 32) and a stand-in cubin. Returns the cache dir.
pub fn one_kernel_triton_cache(dir: &Path) -> Result<std::path::PathBuf, Error> {
    let k = dir.join("cache/KEY1");
    std::fs::create_dir_all(&k).map_err(|e| Error::io("creating the cache folder", e))?;
    std::fs::write(
        k.join("k.json"),
        br#"{"name":"k","target":{"backend":"cuda","arch":90,"warp_size":32}}"#,
    )
    .map_err(|e| Error::io("writing k.json", e))?;
    std::fs::write(k.join("k.cubin"), b"\x7fELF cubin")
        .map_err(|e| Error::io("writing k.cubin", e))?;
    Ok(dir.join("cache"))
}

/// Writes about `total_bytes` in about `files` files below `dir` (which must exist).
pub fn triton_like_cache(
    dir: &Path,
    total_bytes: u64,
    files: u64,
    seed: u64,
) -> Result<Generated, Error> {
    let mut rng = XorShift(seed | 1);
    // Sizes first: 60% small text, 36% mid binaries, 4% large binaries; scaled to the total.
    let mut plan: Vec<(bool, u64)> = (0..files)
        .map(|i| match i % 25 {
            0 => (false, 1_000_000 + rng.below(4_000_000)),
            1..=9 => (false, 20_000 + rng.below(100_000)),
            _ => (true, 1_000 + rng.below(12_000)),
        })
        .collect();
    let planned: u64 = plan.iter().map(|p| p.1).sum();
    let scale = total_bytes as f64 / planned as f64;
    for p in &mut plan {
        p.1 = ((p.1 as f64) * scale) as u64;
    }

    let mut out = Generated::default();
    let mut buf = Vec::new();
    for (i, (text, size)) in plan.into_iter().enumerate() {
        let folder = dir.join(format!(
            "{:016x}{:016x}",
            i as u64 / 6,
            seed.wrapping_mul(i as u64 / 6 + 1)
        ));
        if i % 6 == 0 {
            std::fs::create_dir_all(&folder)
                .map_err(|e| Error::io(format!("creating {}", folder.display()), e))?;
        }
        buf.clear();
        if text {
            while (buf.len() as u64) < size {
                buf.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
                buf.push(b' ');
            }
            buf.truncate(size as usize);
        } else {
            // Compiled code compresses a little: runs of repeated words among random ones.
            while (buf.len() as u64) < size {
                let w = rng.next();
                let repeat = if w & 3 == 0 { 4 } else { 1 };
                for _ in 0..repeat {
                    buf.extend_from_slice(&w.to_le_bytes());
                }
            }
            buf.truncate(size as usize);
        }
        let name = match (text, i % 3) {
            (true, 0) => "kernel.json",
            (true, 1) => "kernel.ttgir",
            (true, _) => "kernel.llir",
            (false, 0) => "kernel.cubin",
            (false, 1) => "kernel.so",
            (false, _) => "kernel.hsaco",
        };
        let path = folder.join(format!("{}-{name}", i % 6));
        let mut f = std::fs::File::create(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        f.write_all(&buf)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        out.files += 1;
        out.bytes += size;
    }
    Ok(out)
}

/// Pushes `registry/repo:tag`: an MCV Triton cache image of one kernel
/// (`abc123/kernel.cubin` holding `content`), claiming `targets`.
pub async fn push_kernel_cache(
    registry: &crate::Registry,
    repo: &str,
    tag: &str,
    content: &str,
    targets: &[crate::image::Target],
) -> Result<crate::image::PushedImage, Error> {
    let src = tempfile::tempdir().map_err(|e| Error::io("creating a temporary folder", e))?;
    let kernel = src.path().join("abc123");
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(kernel.join(name), bytes)
            .map_err(|e| Error::io(format!("writing {name}"), e))
    };
    std::fs::create_dir_all(&kernel).map_err(|e| Error::io("creating the kernel folder", e))?;
    write("kernel.cubin", content.as_bytes())?;
    write(
        "kernel.json",
        br#"{"name":"kernel","target":{"backend":"cuda","arch":90,"warp_size":32}}"#,
    )?;
    crate::image::ImageBuilder::mcv(
        crate::image::CacheKind::Triton,
        src.path(),
        targets,
        crate::image::Compression::Gzip,
    )?
    .push(registry, repo, Some(tag))
    .await
}

/// Every regular file below `root` (symbolic links not followed): its path relative to
/// `root` → the hex sha256 of its content. For comparing trees byte for byte.
pub fn hash_tree(root: &Path) -> Result<std::collections::BTreeMap<String, String>, Error> {
    use sha2::{Digest, Sha256};
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in
            std::fs::read_dir(&d).map_err(|e| Error::io(format!("reading {}", d.display()), e))?
        {
            let e = e.map_err(|e| Error::io(format!("reading {}", d.display()), e))?;
            let p = e.path();
            let ft = e
                .file_type()
                .map_err(|e| Error::io(format!("stat {}", p.display()), e))?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let bytes = std::fs::read(&p)
                    .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
                let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
                out.insert(rel, hex::encode(Sha256::digest(bytes)));
            }
        }
    }
    Ok(out)
}
