#!/usr/bin/env bash
# The developer's side of GKM's two-registry flow, as a CI job runs it:
#
#   gkm build (push to the incoming registry) -> cosign sign -> gkm promote --server
#   -> print the promoted, digest-pinned reference to put in manifests
#
# The job needs write access to the incoming registry only: the cluster's promoter
# (gkm-controller) verifies the signature and copies the image into the trusted registry,
# signs it and attests the verification (docs/trust.md). Nothing here writes there.
#
# Inputs (environment):
#   CACHE_DIR          the cache to ship (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, ...)
#   IMAGE              where to push it, by tag: incoming.example.com/dev/llama-kernels:v1
#   COSIGN_KEY         the job's cosign private key (password in COSIGN_PASSWORD)
#   GKM_SERVER         the promoter: https://gkm-controller.gkm-system.svc (or a forwarded port)
#   KIND               optional: triton (default), inductor or vllm
#   GKM_TOKEN_FILE     optional: a Kubernetes token allowed to create promotions.gkm.io
#                      (default: the current kubeconfig context's token)
#   GKM_CA_FILE        optional: the CA of the controller's serving certificate
#   REGISTRY_AUTH      optional: docker config with credentials for the incoming registry
#   INSECURE_REGISTRY  optional: a registry host spoken to over plain HTTP (test setups)
#   COSIGN_SIGN_FLAGS  optional: extra `cosign sign` flags (default: offline,
#                      --tlog-upload=false, in cosign's tag format; set to
#                      "--new-bundle-format=false" to upload to Rekor)
#
# Why the tag format: the promoter attests in cosign's `.att` tag, and cosign 3's
# `verify-attestation` reads only Sigstore bundles (OCI referrers) when an image has any,
# so an image signed as a bundle would hide the promoter's attestation from cosign (GKM's
# own admission reads it either way). See docs/trust.md.
#
# Output: progress on stderr; the last stdout line is REGISTRY/REPO@sha256:... in the
# trusted registry. Exit codes are gkm's (docs/trust.md): 2 the promoter refused the
# image, 3 not authenticated, 4 not allowed, 5 the promoter or network failed.
set -euo pipefail

: "${CACHE_DIR:?set CACHE_DIR to the cache directory to ship}"
: "${IMAGE:?set IMAGE to the incoming image, by tag}"
: "${COSIGN_KEY:?set COSIGN_KEY to the cosign private key}"
: "${GKM_SERVER:?set GKM_SERVER to the promoter URL}"
KIND="${KIND:-triton}"
COSIGN_SIGN_FLAGS="${COSIGN_SIGN_FLAGS---tlog-upload=false --use-signing-config=false --new-bundle-format=false}"

registry_flags=()
cosign_flags=()
if [[ -n "${REGISTRY_AUTH:-}" ]]; then
  registry_flags+=(--registry-auth "$REGISTRY_AUTH")
  # cosign reads credentials where docker keeps them.
  docker_dir="$(mktemp -d)"
  trap 'rm -rf "$docker_dir"' EXIT
  cp "$REGISTRY_AUTH" "$docker_dir/config.json"
  export DOCKER_CONFIG="$docker_dir"
fi
if [[ -n "${INSECURE_REGISTRY:-}" ]]; then
  registry_flags+=(--insecure-registry "$INSECURE_REGISTRY")
  cosign_flags+=(--allow-http-registry)
fi
server_flags=(--server "$GKM_SERVER")
[[ -n "${GKM_TOKEN_FILE:-}" ]] && server_flags+=(--token-file "$GKM_TOKEN_FILE")
[[ -n "${GKM_CA_FILE:-}" ]] && server_flags+=(--ca-file "$GKM_CA_FILE")

echo "building $IMAGE from $CACHE_DIR ($KIND)" >&2
pushed="$(gkm build "$CACHE_DIR" --kind "$KIND" -t "$IMAGE" "${registry_flags[@]}" | tail -n 1)"
case "$pushed" in
  *@sha256:*) ;;
  *) echo "gkm build printed no digest-pinned reference: $pushed" >&2; exit 1 ;;
esac
echo "pushed $pushed" >&2

# Sign the digest, never the tag: the tag may move before the promoter reads it.
# shellcheck disable=SC2086 # COSIGN_SIGN_FLAGS is a list of flags
cosign sign --key "$COSIGN_KEY" $COSIGN_SIGN_FLAGS "${cosign_flags[@]}" -y "$pushed" >&2

echo "asking $GKM_SERVER to verify and promote it" >&2
answer="$(gkm promote "$IMAGE" --digest "${pushed##*@}" "${server_flags[@]}" "${registry_flags[@]}")"
promoted="$(printf '%s' "$answer" | sed -n 's/^ *"promoted": "\(.*\)",\{0,1\}$/\1/p')"
if [[ -z "$promoted" ]]; then
  echo "the promoter's answer names no promoted image: $answer" >&2
  exit 1
fi
echo "promoted; use this reference in GKMCache.spec.image or a Pod:" >&2
echo "$promoted"
