//! Replaying a fuzz target's corpus as a normal test: every seed of `fuzz/corpus/<target>/`,
//! then a fixed number of mutants of them (bit flips, interesting bytes, cuts, repeats and
//! splices, from a fixed seed), through the target's check. No coverage guidance: this
//! is the few-seconds share of fuzzing that `cargo test` (and so CI) runs; scripts/fuzz.sh
//! runs the coverage-guided fuzzer.

use std::path::Path;

/// Bytes the mutator likes to write: path and JSON punctuation, tar's digits, boundaries.
const INTERESTING: &[u8] = b"\x00\xff\x7f\x80/.:@\"{}[],0179\n\\-_ ";

/// Runs `check` over every file in `dir` and `mutants` mutants of them. Returns how many
/// inputs ran. A failing input is written to the system's temporary directory, and its
/// path is in the panic message.
pub fn replay(target: &str, dir: &Path, check: fn(&[u8]), mutants: usize) -> usize {
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading the corpus {}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("corpus entry");
            let bytes = std::fs::read(e.path()).expect("corpus file");
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    for (name, bytes) in &seeds {
        run(target, name, bytes, check);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for i in 0..mutants {
        let (name, base) = &seeds[rng.below(seeds.len())];
        let other = &seeds[rng.below(seeds.len())].1;
        let input = mutate(&mut rng, base, other);
        run(target, &format!("mutant {i} of {name}"), &input, check);
    }
    seeds.len() + mutants
}

fn run(target: &str, what: &str, input: &[u8], check: fn(&[u8])) {
    if std::panic::catch_unwind(|| check(input)).is_err() {
        let path =
            std::env::temp_dir().join(format!("gkm-fuzz-{target}-failure-{}", std::process::id()));
        let _ = std::fs::write(&path, input);
        panic!(
            "fuzz target {target} failed on {what} (input saved at {}; rerun it with \
             scripts/fuzz.sh --replay {target} FILE)",
            path.display()
        );
    }
}

/// xorshift64: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough in `0..n`; `n` must not be 0.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One to four random edits of `base`, sometimes splicing in part of `other`.
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(INTERESTING[rng.below(INTERESTING.len())]);
            continue;
        }
        let at = rng.below(v.len());
        match rng.below(7) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = INTERESTING[rng.below(INTERESTING.len())],
            2 => v.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            3 => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at..end);
            }
            4 => v.truncate(at),
            5 => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            _ if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(256)).min(other.len());
                v.splice(at..at, other[from..end].iter().copied());
            }
            _ => v[at] = v[at].wrapping_add(1),
        }
    }
    v
}
