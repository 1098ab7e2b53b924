#!/usr/bin/env bash
# Benchmark (not a test): `gkm pull` of a ~1 GiB Triton-like kernel cache (tens of thousands
# of files, one gzip layer) from a local registry, beside
#   - the floor: `tar -xzf` of the same layer from local disk, and
#   - `skopeo copy` + `umoci unpack` of the same image;
# then `gkm fsck` of the pulled tree beside `sha256sum` of its files (the floor).
# Prints wall seconds and peak RSS of each (median of REPS runs) and the ratios the targets
# are stated in. Usage: benches/pull.sh   (MIB=1024 FILES=30000 REPS=3 by default)
set -Eeuo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/gkm/target}
MIB=${MIB:-1024}
FILES=${FILES:-30000}
REPS=${REPS:-3}
TOOLS=${GKM_TOOLS_DIR:-$HOME/.cache/gkm/tools}/bin
WORK=$(mktemp -d /var/tmp/gkm-bench.XXXXXX)
REG_PID=
cleanup() {
  [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

for t in crane skopeo umoci /usr/bin/time; do
  command -v "$t" >/dev/null || [ -x "$TOOLS/$t" ] || { echo "bench: $t missing (run scripts/install-tools.sh)" >&2; exit 1; }
done

echo "==> building release binaries"
cargo build --release --quiet --bin gkm -p gkm -p gkm-testenv --bin gkm-testenv
GKM=$CARGO_TARGET_DIR/release/gkm

echo "==> generating a ${MIB} MiB cache in ${FILES} files"
"$CARGO_TARGET_DIR/release/gkm-testenv" gen-cache "$WORK/src/io.triton.cache" "$MIB" "$FILES"
mkdir -p "$WORK/src/io.triton.manifest"
echo '{}' >"$WORK/src/io.triton.manifest/manifest.json"
tar -C "$WORK/src" -czf "$WORK/layer.tar.gz" io.triton.cache io.triton.manifest
echo "    layer: $(stat -c %s "$WORK/layer.tar.gz") bytes gzip"
rm -rf "$WORK/src"

mkdir -p "$WORK/registry"
"$TOOLS/crane" registry serve --address 127.0.0.1:0 --disk "$WORK/registry" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do
  PORT=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$WORK/registry.log")
  [ -n "$PORT" ] && break
  sleep 0.1
done
[ -n "$PORT" ] || { echo "bench: the registry did not start:" >&2; cat "$WORK/registry.log" >&2; exit 1; }
REG=127.0.0.1:$PORT
"$TOOLS/crane" append --insecure --oci-empty-base -f "$WORK/layer.tar.gz" -t "$REG/bench/triton:v1" >/dev/null 2>&1
# umoci needs the platform in the config; the empty base has none.
IMAGE=$("$TOOLS/crane" mutate --insecure --set-platform linux/amd64 "$REG/bench/triton:v1" -t "$REG/bench/triton:v1" 2>/dev/null | tail -1)
echo "    pushed $IMAGE"

# run NAME CMD...: appends "seconds kib" of one run to $WORK/NAME.
run() {
  local name=$1
  shift
  sync
  sleep 1
  /usr/bin/time -f '%e %M' -o "$WORK/time.out" "$@" >/dev/null 2>"$WORK/err.out" || {
    echo "bench: $name failed:" >&2
    cat "$WORK/err.out" >&2
    exit 1
  }
  cat "$WORK/time.out" >>"$WORK/$name"
}

for rep in $(seq "$REPS"); do
  echo "==> round $rep/$REPS"
  rm -rf "$WORK/out" && mkdir "$WORK/out"
  run tar tar -xzf "$WORK/layer.tar.gz" -C "$WORK/out"
  rm -rf "$WORK/out" "$WORK/store"
  run gkm-nosync "$GKM" pull "$IMAGE" --store "$WORK/store" --insecure-registry "$REG" --no-sync
  rm -rf "$WORK/store"
  run gkm "$GKM" pull "$IMAGE" --store "$WORK/store" --insecure-registry "$REG"
  # The verification pass over the tree just pulled, beside hashing the same files with
  # sha256sum (its floor); both read from the page cache.
  run fsck "$GKM" fsck --store "$WORK/store"
  run sha256sum sh -c "find '$WORK/store/store/sha256' -path '*/rootfs/*' -type f -print0 | xargs -0 sha256sum"
  rm -rf "$WORK/store" "$WORK/oci" "$WORK/bundle"
  run skopeo skopeo copy --quiet --src-tls-verify=false "docker://$REG/bench/triton:v1" "oci:$WORK/oci:v1"
  run umoci umoci unpack --image "$WORK/oci:v1" "$WORK/bundle"
  rm -rf "$WORK/oci" "$WORK/bundle"
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { awk -v c="$2" '{print $c}' "$WORK/$1" | median; }
T_TAR=$(col tar 1)
T_GKM=$(col gkm-nosync 1)
T_GKMS=$(col gkm 1)
# skopeo + umoci per round, then the median of the sums.
T_SU=$(paste "$WORK/skopeo" "$WORK/umoci" | awk '{print $1 + $3}' | median)
M_GKM=$(col gkm-nosync 2)
M_GKMS=$(col gkm 2)
M_SU=$(paste "$WORK/skopeo" "$WORK/umoci" | awk '{print ($2 > $4 ? $2 : $4)}' | median)

echo
echo "pull of a $MIB MiB, $FILES-file cache (one gzip layer), median of $REPS, $(nproc) cores"
printf '%-32s %10s %14s\n' "" "seconds" "peak RSS MiB"
printf '%-32s %10s %14.1f\n' "tar -xzf (floor, local file)" "$T_TAR" "$(col tar 2 | awk '{print $1/1024}')"
printf '%-32s %10s %14.1f\n' "gkm pull --no-sync" "$T_GKM" "$(echo "$M_GKM" | awk '{print $1/1024}')"
printf '%-32s %10s %14.1f\n' "gkm pull (syncfs before rename)" "$T_GKMS" "$(echo "$M_GKMS" | awk '{print $1/1024}')"
printf '%-32s %10s %14.1f\n' "skopeo copy + umoci unpack" "$T_SU" "$(echo "$M_SU" | awk '{print $1/1024}')"
echo
awk -v g="$T_GKM" -v t="$T_TAR" -v s="$T_SU" -v gs="$T_GKMS" 'BEGIN {
  printf "gkm / tar floor:           %.2fx (target <= 1.3x)\n", g / t
  printf "gkm (synced) / tar floor:  %.2fx\n", gs / t
  printf "skopeo+umoci / gkm:        %.2fx faster (target >= 1.5x)\n", s / g
}'
T_FSCK=$(col fsck 1)
T_SUM=$(col sha256sum 1)
awk -v f="$T_FSCK" -v h="$T_SUM" -v mib="$MIB" 'BEGIN {
  printf "gkm fsck:                  %.2f s per GiB; sha256sum floor %.2f s per GiB (%.2fx)\n", f * 1024 / mib, h * 1024 / mib, f / h
}'
awk -v m="$M_GKMS" -v n="$M_GKM" 'BEGIN { x = (m > n ? m : n) / 1024; printf "gkm peak RSS:              %.1f MiB (target < 64 MiB)\n", x }'
