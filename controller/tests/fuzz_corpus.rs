//! The admission fuzz target's checks (fuzz/src/admission.rs, docs/fuzzing.md) as a normal
//! test: its seed corpus and a fixed set of mutants through the webhook's request path.
//! The named tests below are inputs the coverage-guided fuzzer found failing, kept after
//! the fix.

#[path = "../../fuzz/src/admission.rs"]
mod admission;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn fuzz_corpus_admission() {
    let dir = gkm_testenv::workspace_root().join("fuzz/corpus/admission");
    let n = replay::replay("admission", &dir, admission::check, 3000);
    assert!(n > 3000);
}
