#![no_main]
//! What this target checks: docs/fuzzing.md and `gkm_fuzz::oracles::csi`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| gkm_fuzz::oracles::csi::check(data));
