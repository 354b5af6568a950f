#!/bin/sh
# Checks that every image reference resolves in its registry to one expected manifest digest: the release workflow
# runs it after the push, so a tag that did not move (or moved to something else) fails the release.
#
# For each REF the raw top-level manifest is fetched as the registry serves it (for a multi-arch image that is the
# manifest list / OCI index, never a per-platform manifest) and the SHA-256 of those exact bytes is compared with
# DIGEST. A reference that cannot be fetched counts as a failure.
#
# usage: scripts/release-verify.sh DIGEST REF...
#   DIGEST  sha256:<64 lowercase hex>, e.g. build-push-action's `digest` output
#   REF     an image reference, e.g. registry.example.org/acme/restic-manager:v1.2.3 (a docker:// prefix is accepted)
#
# Output: one line per reference on stdout,
#   ok  REF sha256:...
#   MISMATCH REF sha256:... (expected sha256:...)
#   UNRESOLVED REF (expected sha256:...)          (the error goes to stderr)
# Exit status: 0 all match, 1 any mismatch or unresolved reference, 2 usage error.
#
# Tools: `skopeo inspect --raw docker://REF` when skopeo is on PATH, else `docker buildx imagetools inspect --raw REF`
# (docker is ${DOCKER:-docker}). RM_VERIFY_TOOL=skopeo|buildx forces one. Credentials come from the usual places
# (docker login writes ~/.docker/config.json, which both tools read).
# RM_REGISTRY_INSECURE=1: the registry speaks plain HTTP (a loopback test registry): adds --tls-verify=false for
# skopeo. buildx ignores it; configure such a registry in the builder instead (buildkitd.toml:
# [registry."HOST:PORT"] http = true).
# RM_VERIFY_ATTEMPTS (default 3): tries per reference when fetching fails (not when the digest differs).
set -eu

me=release-verify
usage() {
    echo "usage: scripts/release-verify.sh DIGEST REF..." >&2
    exit 2
}
err() { printf '%s: %s\n' "$me" "$*" >&2; }

[ $# -ge 2 ] || usage
expected=$1
shift
case $expected in
sha256:*) hex=${expected#sha256:} ;;
*) hex="" ;;
esac
if [ "${#hex}" -ne 64 ] || [ -n "$(printf '%s' "$hex" | tr -d '0-9a-f')" ]; then
    err "DIGEST must be sha256:<64 lowercase hex>, got '$expected'"
    usage
fi
for ref in "$@"; do
    case $ref in
    "" | -*)
        err "not an image reference: '$ref'"
        usage
        ;;
    esac
done

tool=${RM_VERIFY_TOOL:-}
if [ -z "$tool" ]; then
    if command -v skopeo >/dev/null 2>&1; then tool=skopeo; else tool=buildx; fi
fi
docker=${DOCKER:-docker}
case $tool in
skopeo) command -v skopeo >/dev/null 2>&1 || { err "skopeo is not on PATH"; exit 1; } ;;
buildx)
    # shellcheck disable=SC2086 # DOCKER may carry options, e.g. "docker --context ci"
    $docker buildx version >/dev/null 2>&1 || {
        if [ -n "${RM_VERIFY_TOOL:-}" ]; then err "'$docker buildx' is not available"; else
            err "neither skopeo nor '$docker buildx' is available"
        fi
        exit 1
    }
    ;;
*)
    err "RM_VERIFY_TOOL must be skopeo or buildx, got '$tool'"
    exit 2
    ;;
esac

attempts=${RM_VERIFY_ATTEMPTS:-3}
case $attempts in '' | *[!0-9]*) attempts=3 ;; esac
[ "$attempts" -ge 1 ] || attempts=1

if command -v sha256sum >/dev/null 2>&1; then
    sha256() { sha256sum "$1" | cut -d' ' -f1; }
else
    sha256() { shasum -a 256 "$1" | cut -d' ' -f1; }
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/release-verify.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# fetch REF FILE: the raw top-level manifest bytes of REF into FILE (written to a file, never through $(...), which
# would strip trailing newlines and change the digest).
fetch() {
    case $tool in
    skopeo)
        if [ "${RM_REGISTRY_INSECURE:-0}" = 1 ]; then
            skopeo inspect --raw --tls-verify=false "docker://$1" >"$2" 2>"$tmp/stderr"
        else
            skopeo inspect --raw "docker://$1" >"$2" 2>"$tmp/stderr"
        fi
        ;;
    buildx)
        # shellcheck disable=SC2086 # see above
        $docker buildx imagetools inspect --raw "$1" >"$2" 2>"$tmp/stderr"
        ;;
    esac
}

failed=0
for ref in "$@"; do
    ref=${ref#docker://}
    try=1
    got=""
    while :; do
        if fetch "$ref" "$tmp/manifest" && [ -s "$tmp/manifest" ]; then
            got=sha256:$(sha256 "$tmp/manifest")
            break
        fi
        if [ "$try" -ge "$attempts" ]; then
            err "cannot fetch the manifest of $ref with $tool after $try attempt(s):"
            sed "s/^/$me:   /" "$tmp/stderr" >&2
            break
        fi
        try=$((try + 1))
        sleep $((try * 2))
    done
    if [ -z "$got" ]; then
        echo "UNRESOLVED $ref (expected $expected)"
        failed=1
    elif [ "$got" = "$expected" ]; then
        echo "ok  $ref $got"
    else
        echo "MISMATCH $ref $got (expected $expected)"
        failed=1
    fi
done

if [ "$failed" -ne 0 ]; then
    err "not every reference resolves to $expected"
    exit 1
fi
