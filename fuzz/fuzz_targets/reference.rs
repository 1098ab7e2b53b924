#![no_main]
//! What this target checks: docs/fuzzing.md and `gkm_fuzz::oracles::reference`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| gkm_fuzz::oracles::reference::check(data));
