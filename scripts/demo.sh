#!/usr/bin/env bash
# GKM end to end on this machine, with real components (see examples/demo.rs): installs the
# test tools (cached under ~/.cache/gkm/tools), builds the binaries, and runs the demo.
# Needs root (the CSI plugin bind-mounts). Extra arguments go to the demo (--keep).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gkm/target}"
if [ "$(id -u)" != 0 ]; then
  echo "demo: run as root: the CSI plugin makes bind mounts" >&2
  exit 1
fi
echo "==> Tools: kube-apiserver, kubectl, etcd, cosign, crane (the first run builds them: several minutes)"
scripts/install-tools.sh
echo "==> Building gkm, gkm-agent, gkm-controller and the demo"
cargo build --workspace --bins --example demo
exec "$CARGO_TARGET_DIR/debug/examples/demo" --bin-dir "$CARGO_TARGET_DIR/debug" "$@"
