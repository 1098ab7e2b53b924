#!/usr/bin/env bash
# Coverage-guided fuzzing of GKM's parsers and validators (docs/fuzzing.md), with
# cargo-fuzz and libFuzzer on the stable toolchain (`--sanitizer none`: the sanitizers need
# nightly; Rust's own checks, with debug assertions and overflow checks on, catch what the
# targets look for).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   fuzz each target (default: all) for SECONDS
#                                           (default 60), then print executions per second,
#                                           coverage and crashes per target
#   scripts/fuzz.sh --replay TARGET FILE... run inputs (a crash artifact) through a target
#   scripts/fuzz.sh --list                  the targets
#
# The seeds in fuzz/corpus/<target>/ are read, never written: what the fuzzer learns goes
# to $GKM_FUZZ_DIR/corpus/<target>/ (default ~/.cache/gkm/fuzz), kept between runs. A crash
# is saved to fuzz/artifacts/<target>/ and makes the script fail at the end; turn it into
# a regression test as docs/fuzzing.md says. The fast share of fuzzing, the corpus and
# fixed mutants of it replayed by `cargo test` (tests/fuzz_corpus.rs,
# controller/tests/fuzz_corpus.rs), needs none of this.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TARGETS=(extract reference labels triton view admission csi)
TOOLS_BIN=${GKM_TOOLS_DIR:-$HOME/.cache/gkm/tools}/bin
FUZZ_DIR=${GKM_FUZZ_DIR:-$HOME/.cache/gkm/fuzz}
export CARGO_TARGET_DIR=${GKM_FUZZ_TARGET_DIR:-$HOME/.cache/gkm/target-fuzz}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN_DIR=$CARGO_TARGET_DIR/$TRIPLE/release
# Memory a target may use before libFuzzer calls it a crash: extraction must stay bounded.
RSS_LIMIT_MB=${GKM_FUZZ_RSS_LIMIT_MB:-2048}

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

max_len() {
  case $1 in
    extract) echo 65536 ;; # several tar layers
    admission | csi) echo 16384 ;;
    *) echo 4096 ;;
  esac
}

build() {
  scripts/install-tools.sh cargo-fuzz >/dev/null
  local t0
  t0=$(date +%s)
  echo "==> building the fuzz targets (release, debug assertions, into $CARGO_TARGET_DIR)"
  (cd fuzz && "$TOOLS_BIN/cargo-fuzz" build --sanitizer none --release --debug-assertions "$@")
  echo "<== built in $(($(date +%s) - t0))s"
}

# Extraction makes a directory tree per input: in memory when /dev/shm is there.
tmpdir() {
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then echo /dev/shm; else echo "${TMPDIR:-/tmp}"; fi
}

case ${1:-} in
  -h | --help) usage ;;
  --list)
    printf '%s\n' "${TARGETS[@]}"
    exit 0
    ;;
  --replay)
    [ $# -ge 3 ] || usage
    target=$2
    shift 2
    build "$target"
    files=()
    for f in "$@"; do files+=("$(realpath "$f")"); done
    TMPDIR=$(tmpdir) "$BIN_DIR/$target" -rss_limit_mb="$RSS_LIMIT_MB" "${files[@]}"
    exit
    ;;
esac

SECONDS_PER_TARGET=60
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  SECONDS_PER_TARGET=$1
  shift
fi
if [ $# -gt 0 ]; then
  for t in "$@"; do
    [[ " ${TARGETS[*]} " == *" $t "* ]] || {
      echo "fuzz.sh: no target $t (scripts/fuzz.sh --list)" >&2
      exit 2
    }
  done
  TARGETS=("$@")
fi

build
mkdir -p "$FUZZ_DIR/logs"
summary=()
failed=()
for t in "${TARGETS[@]}"; do
  corpus=$FUZZ_DIR/corpus/$t
  artifacts=$ROOT/fuzz/artifacts/$t
  log=$FUZZ_DIR/logs/$t.log
  mkdir -p "$corpus" "$artifacts"
  echo "==> $t for ${SECONDS_PER_TARGET}s (log: $log)"
  t0=$(date +%s)
  rc=0
  # New inputs go to the first corpus folder; the committed seeds are only read.
  TMPDIR=$(tmpdir) "$BIN_DIR/$t" "$corpus" "$ROOT/fuzz/corpus/$t" \
    -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" -timeout=10 \
    -rss_limit_mb="$RSS_LIMIT_MB" -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$log" 2>&1 || rc=$?
  took=$(($(date +%s) - t0))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  units=$(find "$corpus" -type f | wc -l)
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5 | sed 's/^/    /'
  fi
  summary+=("$(printf '%-10s %6ss %10s runs %8s/s  %-22s corpus %5s  rss %5s MB  %s' \
    "$t" "$took" "${runs:-?}" "${eps:-?}" "${cov:-cov: ?}" "$units" "${rss:-?}" \
    "$([ "$rc" -eq 0 ] && echo ok || echo "CRASH (rc $rc)")")")
done

echo
echo "fuzz.sh: ${SECONDS_PER_TARGET}s per target"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashes in: ${failed[*]}; inputs in fuzz/artifacts/<target>/, logs in $FUZZ_DIR/logs/" >&2
  echo "fuzz.sh: replay one with: scripts/fuzz.sh --replay TARGET FILE" >&2
  exit 1
fi
