//! The checks behind GKM's fuzz targets (docs/fuzzing.md). Each `check(data)` feeds
//! arbitrary bytes through one of GKM's parsers or validators and panics when a property
//! fails; libFuzzer reports a panic as a crash. The same modules are compiled into the
//! normal test suite by `#[path]`, which replays the corpus through them.

pub mod admission;
pub mod oracles;
pub mod replay;
