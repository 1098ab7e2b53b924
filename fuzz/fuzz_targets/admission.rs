#![no_main]
//! What this target checks: docs/fuzzing.md and `gkm_fuzz::admission`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| gkm_fuzz::admission::check(data));
