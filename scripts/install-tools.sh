#!/usr/bin/env bash
# Installs the real components that GKM's tests run against, on a fresh Debian machine.
#
# Idempotent: every tool is built once into $GKM_TOOLS_DIR (default ~/.cache/gkm/tools)
# under a versioned name; a rerun finds it and skips the build. Go's module and build
# caches live under $HOME too, so even a changed version rebuilds quickly.
#
# Prints each tool's version at the end. Any failure names the step that failed.
#
# Tools:
#   kube-apiserver, kubectl  built from the Go module proxy (the staging replace pattern)
#   cosign                   signs and verifies test images (cosign v3)
#   crane                    the OCI registry (`crane registry serve`, with referrers API)
#   csi-sanity               CSI conformance
#   etcd                     comes from the `etcd-bin-vendored` crate (a dev-dependency),
#                            so cargo fetches it; nothing to do here.
#   skopeo, umoci            Debian packages, used by the extraction benchmark as a baseline.
#   kubelet                  built from the same throwaway module as kube-apiserver
#   containerd, containerd-shim-runc-v2, ctr
#                            containerd 2.x from the Go module proxy (no btrfs/devmapper/zfs)
#   runc, busybox-static, containernetworking-plugins
#                            Debian packages for the test node (runc runs the containers,
#                            busybox is the test image, the loopback CNI plugin makes the
#                            node Ready)
#   gkm-pause                the pod sandbox's init process (testenv/node/pause), static
#   gkm-registrar            registers csi.gkm.io with the test node's kubelet
#                            (testenv/node/registrar; node-driver-registrar's role)
#   docker-registry          Debian's (CNCF distribution 2.8), unpacked: registries that
#                            require credentials (htpasswd, token auth)
#   triton-python            a Python virtual environment with PyPI's Triton wheel, whose
#                            compiler and cache manager decide hit or miss in the cache tests
#                            (it compiles for cuda:90 and gfx942 on a CPU).
#   cargo-fuzz               from crates.io (`cargo install --locked`), for scripts/fuzz.sh
#                            (docs/fuzzing.md); the test command itself does not use it.
#
# `scripts/install-tools.sh cargo-fuzz` installs only the named tool (scripts/fuzz.sh does).
set -Eeuo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.36.3}
COSIGN_VERSION=${COSIGN_VERSION:-v3.1.2}
CRANE_VERSION=${CRANE_VERSION:-v0.21.9}
CSI_SANITY_VERSION=${CSI_SANITY_VERSION:-v5.5.0}
# The newest containerd 2.x the Go module proxy serves (kubelet 1.36 needs 2.x).
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
# The Triton of the H200 fixture (../shared/fixtures): its metadata says 3.6.0.
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
CARGO_FUZZ_VERSION=${CARGO_FUZZ_VERSION:-0.13.2}

TOOLS_DIR=${GKM_TOOLS_DIR:-$HOME/.cache/gkm/tools}
BIN=$TOOLS_DIR/bin
# Never download a Go toolchain: build with the one installed here.
export GOTOOLCHAIN=local
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

STEP=start
trap 'echo "install-tools: FAILED at step [$STEP] (line $LINENO): see the output above" >&2' ERR

step() {
  STEP=$1
  echo "==> [$STEP] $2"
}

now() { date +%s; }

mkdir -p "$BIN" "$TOOLS_DIR/src"

# go_tool NAME MODULE/PATH VERSION: `go install` into a versioned file, then link NAME to it.
go_tool() {
  local name=$1 pkg=$2 version=$3
  local target=$BIN/$name-$version
  step "$name" "$pkg@$version"
  if [ -x "$target" ]; then
    echo "    cached: $target"
  else
    local t0 tmp
    t0=$(now)
    tmp=$(mktemp -d)
    GOBIN=$tmp go install -trimpath "$pkg@$version"
    mv "$tmp/$name" "$target"
    rm -rf "$tmp"
    echo "    built in $(($(now) - t0))s"
  fi
  ln -sfn "$name-$version" "$BIN/$name"
}

# Kubernetes binaries cannot be `go install`ed: k8s.io/kubernetes maps its staging modules
# with replace directives, which only apply in a main module. So build from a throwaway
# module that copies those replaces, pointing each at the matching published version.
kube_tools() {
  local v=$KUBE_VERSION
  local staging_v="v0.${v#v1.}"
  if [ -x "$BIN/kube-apiserver-$v" ] && [ -x "$BIN/kubectl-$v" ] && [ -x "$BIN/kubelet-$v" ]; then
    step kube-apiserver "cached: $BIN/kube-apiserver-$v, kubectl, kubelet"
  else
    step kube-module "throwaway module for k8s.io/kubernetes@$v (staging at $staging_v)"
    local dir=$TOOLS_DIR/src/kube-$v
    mkdir -p "$dir"
    local gomod
    gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [ -f "$gomod" ] || { echo "could not download k8s.io/kubernetes@$v" >&2; false; }
    {
      echo "module gkm.local/kubetools"
      echo
      echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
      echo
      echo "require k8s.io/kubernetes $v"
      echo
      # The staging list changes between minors: read it from kubernetes' own go.mod.
      grep -E '^[[:space:]]*k8s\.io/[^ ]+ => \./staging/src/' "$gomod" |
        awk -v sv="$staging_v" '{ printf "replace %s => %s %s\n", $1, $1, sv }'
    } >"$dir/go.mod"
    cat >"$dir/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
EOF
    (cd "$dir" && go mod tidy)
    # Stamp the real version: the apiserver derives its emulation version from it.
    local minor=${v#v1.}
    minor=${minor%%.*}
    local ldflags="-X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    local t0 cmd
    for cmd in kube-apiserver kubectl kubelet; do
      [ -x "$BIN/$cmd-$v" ] && continue
      step "$cmd" "go build (the first build takes a while on 2 cores)"
      t0=$(now)
      (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$BIN/$cmd-$v" "k8s.io/kubernetes/cmd/$cmd")
      echo "    built in $(($(now) - t0))s"
    done
  fi
  ln -sfn "kube-apiserver-$v" "$BIN/kube-apiserver"
  ln -sfn "kubectl-$v" "$BIN/kubectl"
  ln -sfn "kubelet-$v" "$BIN/kubelet"
}

debian_packages() {
  step debian "skopeo umoci (extraction benchmark baseline); runc busybox-static containernetworking-plugins (test node)"
  local missing=()
  for p in skopeo umoci runc; do
    command -v "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ -x /bin/busybox ] || missing+=(busybox-static)
  [ -x /usr/lib/cni/loopback ] || missing+=(containernetworking-plugins)
  if [ ${#missing[@]} -eq 0 ]; then
    echo "    present"
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "    need root to install: ${missing[*]}" >&2
    false
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# go-containerregistry's registry with the OCI 1.1 referrers API on (crane's `registry serve`
# leaves it off), from testenv/referrers-registry. The cached name carries the ggcr version
# and a hash of the program's source, so a change to it rebuilds.
referrers_registry() {
  local src
  src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../testenv/referrers-registry" && pwd)
  local hash
  hash=$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-12)
  local v=$CRANE_VERSION-$hash
  local target=$BIN/referrers-registry-$v
  step referrers-registry "go-containerregistry pkg/registry@$CRANE_VERSION with referrers"
  if [ -x "$target" ]; then
    echo "    cached: $target"
  else
    local t0 dir
    t0=$(now)
    # Build from a copy: GOFLAGS=-mod=mod may rewrite go.mod/go.sum, never in the checkout.
    dir=$(mktemp -d)
    cp "$src/main.go" "$src/go.mod" "$src/go.sum" "$dir/"
    (cd "$dir" && go build -trimpath -o "$target" .)
    rm -rf "$dir"
    echo "    built in $(($(now) - t0))s"
  fi
  ln -sfn "referrers-registry-$v" "$BIN/referrers-registry"
}

# containerd 2.x, its runc shim and ctr, under versioned names.
containerd_tools() {
  local v=$CONTAINERD_VERSION
  step containerd "github.com/containerd/containerd/v2@$v (containerd, containerd-shim-runc-v2, ctr)"
  local cmd
  if [ -x "$BIN/containerd-$v" ] && [ -x "$BIN/containerd-shim-runc-v2-$v" ] && [ -x "$BIN/ctr-$v" ]; then
    echo "    cached: $BIN/containerd-$v"
  else
    local t0 tmp
    t0=$(now)
    tmp=$(mktemp -d)
    GOBIN=$tmp go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
      -ldflags "-X github.com/containerd/containerd/v2/version.Version=$v" \
      "github.com/containerd/containerd/v2/cmd/containerd@$v" \
      "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$v" \
      "github.com/containerd/containerd/v2/cmd/ctr@$v"
    for cmd in containerd containerd-shim-runc-v2 ctr; do
      mv "$tmp/$cmd" "$BIN/$cmd-$v"
    done
    rm -rf "$tmp"
    echo "    built in $(($(now) - t0))s"
  fi
  # containerd finds its shim on PATH by this exact name.
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    ln -sfn "$cmd-$v" "$BIN/$cmd"
  done
}

# go_program NAME DIR FILE...: builds the Go program in testenv/DIR (static) as
# $BIN/NAME-<hash of FILEs>, linked as $BIN/NAME. Built from a copy: GOFLAGS=-mod=mod may
# rewrite go.mod/go.sum, never in the checkout.
go_program() {
  local name=$1 sub=$2
  shift 2
  local src
  src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../testenv/$sub" && pwd)
  local hash
  hash=$(cd "$src" && cat "$@" | sha256sum | cut -c1-12)
  local target=$BIN/$name-$hash
  step "$name" "testenv/$sub (static)"
  if [ -x "$target" ]; then
    echo "    cached: $target"
  else
    local t0 dir
    t0=$(now)
    dir=$(mktemp -d)
    (cd "$src" && cp "$@" "$dir/")
    (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$target" .)
    rm -rf "$dir"
    echo "    built in $(($(now) - t0))s"
  fi
  ln -sfn "$name-$hash" "$BIN/$name"
}

# CNCF distribution's registry (Debian's docker-registry), for the tests of registries that
# require credentials (htpasswd and token auth). Unpacked, not installed: the package's
# maintainer scripts would start a system registry on port 5000.
docker_registry() {
  local v=2.8.2 deb=2.8.2+ds1-1
  local target=$BIN/docker-registry-$v
  step docker-registry "Debian docker-registry $v (unpacked)"
  if [ -x "$target" ]; then
    echo "    cached: $target"
  else
    local dir
    dir=$(mktemp -d)
    (cd "$dir" && apt-get download "docker-registry=$deb" >/dev/null 2>&1 || {
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      apt-get download "docker-registry=$deb" >/dev/null
    })
    dpkg -x "$dir"/docker-registry_*.deb "$dir/x"
    mv "$dir/x/usr/bin/docker-registry" "$target"
    rm -rf "$dir"
    echo "    unpacked"
  fi
  ln -sfn "docker-registry-$v" "$BIN/docker-registry"
}

# A virtual environment with Triton, linked as $BIN/triton-python.
triton_python() {
  local v=$TRITON_VERSION
  local venv=$TOOLS_DIR/py-triton-$v
  step triton "PyPI triton==$v in a virtual environment"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$v')" 2>/dev/null; then
    echo "    cached: $venv"
  else
    local t0
    t0=$(now)
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
      # Debian's python3 keeps venv in a package of its own.
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      rm -rf "$venv"
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check "triton==$v"
    echo "    installed in $(($(now) - t0))s"
  fi
  # A wrapper, not a link: Python finds its virtual environment from the path it was
  # started by, and a link in $BIN would start the base interpreter.
  rm -f "$BIN/triton-python"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$venv/bin/python" >"$BIN/triton-python"
  chmod +x "$BIN/triton-python"
}

# cargo-fuzz into a versioned cargo root, linked as $BIN/cargo-fuzz. It drives libFuzzer
# on the stable toolchain with `--sanitizer none`.
cargo_fuzz() {
  local v=$CARGO_FUZZ_VERSION
  local root=$TOOLS_DIR/cargo-fuzz-$v
  step cargo-fuzz "crates.io cargo-fuzz@$v"
  if [ -x "$root/bin/cargo-fuzz" ]; then
    echo "    cached: $root/bin/cargo-fuzz"
  else
    local t0
    t0=$(now)
    # Its own throwaway target directory, not the one the test command exported.
    env -u CARGO_TARGET_DIR cargo install --locked --quiet --version "$v" --root "$root" cargo-fuzz
    echo "    built in $(($(now) - t0))s"
  fi
  ln -sfn "../cargo-fuzz-$v/bin/cargo-fuzz" "$BIN/cargo-fuzz"
}

if [ $# -gt 0 ]; then
  for tool in "$@"; do
    case $tool in
      cargo-fuzz) cargo_fuzz ;;
      *)
        echo "install-tools: $tool cannot be installed on its own (only cargo-fuzz)" >&2
        exit 2
        ;;
    esac
  done
  exit 0
fi

T_ALL=$(now)
kube_tools
go_tool cosign github.com/sigstore/cosign/v3/cmd/cosign "$COSIGN_VERSION"
go_tool crane github.com/google/go-containerregistry/cmd/crane "$CRANE_VERSION"
go_tool csi-sanity github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity "$CSI_SANITY_VERSION"
containerd_tools
debian_packages
referrers_registry
# The test node's pod sandbox init process, and its CSI driver registrar (the role of
# node-driver-registrar, which the Go module proxy refuses to serve).
go_program gkm-pause node/pause main.go go.mod
go_program gkm-registrar node/registrar main.go go.mod go.sum
docker_registry
triton_python
cargo_fuzz

step versions "installed into $BIN"
STEP=versions
printf '    %-15s %s\n' kube-apiserver "$("$BIN/kube-apiserver" --version)"
printf '    %-15s %s\n' kubectl "$("$BIN/kubectl" version --client 2>/dev/null | sed -n 1p)"
printf '    %-15s %s\n' cosign "$("$BIN/cosign" version 2>&1 | sed -n 's/^GitVersion: *//p')"
printf '    %-15s %s\n' crane "$("$BIN/crane" version)"
printf '    %-15s %s\n' csi-sanity "$("$BIN/csi-sanity" --version 2>&1 | sed -n 1p)"
printf '    %-15s %s\n' skopeo "$(skopeo --version)"
printf '    %-15s %s\n' umoci "$(umoci --version)"
printf '    %-15s %s\n' kubelet "$("$BIN/kubelet" --version)"
printf '    %-15s %s\n' containerd "$("$BIN/containerd" --version)"
printf '    %-15s %s\n' runc "$(runc --version | sed -n 1p)"
printf '    %-15s %s\n' busybox "$(/bin/busybox --help 2>&1 | sed -n 1p)"
printf '    %-15s %s\n' docker-registry "$("$BIN/docker-registry" --version)"
printf '    %-15s %s\n' triton "$("$BIN/triton-python" -c 'import sys, triton; print(triton.__version__, "on Python", sys.version.split()[0])')"
printf '    %-15s %s\n' cargo-fuzz "$("$BIN/cargo-fuzz" --version)"
printf '    %-15s %s\n' etcd "from the etcd-bin-vendored crate (cargo)"
echo "install-tools: done in $(($(now) - T_ALL))s"
