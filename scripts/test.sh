#!/usr/bin/env bash
# GKM's whole test suite on a fresh Debian machine: installs every tool the tests need
# (cached under ~/.cache/gkm), builds everything, runs every test against the real
# kube-apiserver, etcd, OCI registry and cosign. Prints the wall time of each step.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

# Builds live outside the clone, so a fresh clone on the same machine rebuilds little.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/gkm/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

timed() {
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "==> [$name] $*"
  if ! "$@"; then
    echo "test.sh: step [$name] failed" >&2
    return 1
  fi
  echo "<== [$name] $(($(date +%s) - t0))s"
}

T0=$(date +%s)
timed tools scripts/install-tools.sh
timed build cargo build --workspace --all-targets --locked
# Includes the fuzz targets' checks over their seed corpus and fixed mutants of it
# (tests/fuzz_corpus.rs, controller/tests/fuzz_corpus.rs); scripts/fuzz.sh runs libFuzzer.
timed test cargo test --workspace --locked --no-fail-fast
timed csi-sanity csi-sanity/run.sh
# The README's main-job command, end to end (its binaries were built above).
timed demo "$CARGO_TARGET_DIR/debug/examples/demo" --bin-dir "$CARGO_TARGET_DIR/debug"
echo "test.sh: all steps passed in $(($(date +%s) - T0))s"
