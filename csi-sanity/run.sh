#!/usr/bin/env bash
# Runs csi-sanity v5.5.0 against gkm-agent on a temporary socket, with a real API server
# behind it (gkm-testenv up). GKM is a node-only plugin: the Controller specs and the one
# Node spec that needs CreateVolume are skipped. The junit report is kept in
# $GKM_REPORT_DIR (default ~/.cache/gkm/reports/csi-sanity-junit.xml).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/gkm/target}
TOOLS=${GKM_TOOLS_DIR:-$HOME/.cache/gkm/tools}/bin
REPORTS=${GKM_REPORT_DIR:-$HOME/.cache/gkm/reports}
BIN=$CARGO_TARGET_DIR/debug
[ -x "$TOOLS/csi-sanity" ] || { echo "csi-sanity: not installed (run scripts/install-tools.sh)" >&2; exit 1; }
cargo build --quiet --bin gkm-agent -p gkm -p gkm-testenv --bin gkm-testenv

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A real API server for the agent's cache lookups; it lives as long as its stdin is open.
mkfifo "$WORK/hold"
"$BIN/gkm-testenv" up <"$WORK/hold" >"$WORK/env.json" 2>"$WORK/env.log" &
PIDS+=($!)
exec 3>"$WORK/hold"
for _ in $(seq 300); do [ -s "$WORK/env.json" ] && break; sleep 0.1; done
[ -s "$WORK/env.json" ] || { echo "csi-sanity: test environment did not start:" >&2; cat "$WORK/env.log" >&2; exit 1; }
KUBECONFIG_PATH=$(sed -n 's/.*"kubeconfig":"\([^"]*\)".*/\1/p' "$WORK/env.json")

cat >"$WORK/gpus.yaml" <<'YAML'
gpus:
  - uuid: GPU-sanity
    backend: cuda
    arch: "90"
YAML
SOCK=$WORK/plugin/csi.sock
"$BIN/gkm-agent" --node-name=csi-sanity-node --csi-endpoint="unix://$SOCK" \
  --store-root="$WORK/store" --gpus-file="$WORK/gpus.yaml" --kubeconfig="$KUBECONFIG_PATH" \
  --health-addr=127.0.0.1:0 --log=warn 2>"$WORK/agent.log" &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
[ -S "$SOCK" ] || { echo "csi-sanity: gkm-agent did not open its socket:" >&2; cat "$WORK/agent.log" >&2; exit 1; }

mkdir -p "$REPORTS"
set +e
"$TOOLS/csi-sanity" \
  --csi.endpoint="unix://$SOCK" \
  --csi.mountdir="$WORK/mnt" \
  --csi.stagingdir="$WORK/staging" \
  --csi.junitfile="$REPORTS/csi-sanity-junit.xml" \
  --ginkgo.skip='\[Controller.Server\]|should remove target path' \
  --ginkgo.no-color \
  2>&1 | tee "$WORK/sanity.log"
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E '^Ran [0-9]+ of|Passed \|' "$WORK/sanity.log" | tr '\n' ' ')
echo "csi-sanity: exit $rc; $summary; junit: $REPORTS/csi-sanity-junit.xml"
if [ "$rc" -ne 0 ]; then
  echo "--- gkm-agent log ---" >&2
  tail -50 "$WORK/agent.log" >&2
fi
exit "$rc"
