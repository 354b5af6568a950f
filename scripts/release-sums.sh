#!/bin/sh
# Copies the agent binaries and install files out of a release image's /opt/restic-manager/dist and writes their
# SHA256SUMS: the checksums published in the release notes are those of the bytes the image serves.
#
# usage: scripts/release-sums.sh [--platform OS/ARCH] IMAGE OUTDIR
#   IMAGE   an image reference, local or pullable, e.g. registry.example.org/acme/restic-manager@sha256:<digest>
#   OUTDIR  created if missing; gets (replacing earlier copies of the same names)
#             OUTDIR/agent-binaries/   restic-manager-agent-linux-amd64, -linux-arm64, -windows-amd64.exe (+ any others)
#             OUTDIR/install/          install.sh, install.ps1, restic-manager-agent.service (+ any others)
#             OUTDIR/SHA256SUMS        sha256sum format, paths relative to OUTDIR, sorted by path
#   --platform  passed to docker pull and docker create (which variant of a multi-arch image to read); with it the
#               image is always pulled, without it only when it is not present locally.
#
# The SHA256SUMS content is also printed on stdout. The container is created, never started, and removed on exit,
# also on failure. A reference that was not present before is removed again afterwards (the engine is left as it
# was found): engines with the classic image store keep one platform per reference, so the next call can pull
# another platform of the same digest. Fails (exit 1) if any of the three agents or the three install files is
# missing; 2 on usage errors.
# Environment: DOCKER (default docker), the docker command.
set -eu

me=release-sums
usage() {
    echo "usage: scripts/release-sums.sh [--platform OS/ARCH] IMAGE OUTDIR" >&2
    exit 2
}
err() { printf '%s: %s\n' "$me" "$*" >&2; }
die() {
    err "$*"
    exit 1
}

platform=""
case ${1:-} in
--platform)
    [ $# -ge 2 ] || usage
    platform=$2
    shift 2
    ;;
--platform=*)
    platform=${1#--platform=}
    shift
    ;;
esac
[ $# -eq 2 ] || usage
image=$1 outdir=$2
case $image in "" | -*) usage ;; esac
[ -n "$outdir" ] || usage
if [ -n "$platform" ]; then
    case $platform in */*) ;; *) err "--platform wants OS/ARCH, e.g. linux/amd64, got '$platform'" && usage ;; esac
fi

agents="restic-manager-agent-linux-amd64 restic-manager-agent-linux-arm64 restic-manager-agent-windows-amd64.exe"
installs="install.sh install.ps1 restic-manager-agent.service"
dist=/opt/restic-manager/dist

# DOCKER may carry options ("docker --context ci"), so it is split on purpose.
dk() {
    # shellcheck disable=SC2086
    ${DOCKER:-docker} "$@"
}

cid="" stage="" pulled=""
cleanup() {
    if [ -n "$cid" ]; then
        dk rm -f "$cid" >/dev/null 2>&1 || err "warning: could not remove container $cid"
    fi
    if [ -n "$pulled" ]; then
        dk image rm "$image" >/dev/null 2>&1 || err "warning: could not remove the reference $image"
    fi
    if [ -n "$stage" ]; then rm -rf "$stage"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

present=""
if dk image inspect "$image" >/dev/null 2>&1; then present=1; fi
if [ -n "$platform" ]; then
    if [ -z "$present" ]; then pulled=1; fi
    hint=""
    if [ -n "$present" ]; then
        hint=" (present locally, perhaps for another platform: an engine with the classic image store keeps one"
        hint="$hint platform per reference; remove it or pass the digest of that platform's manifest)"
    fi
    dk pull -q --platform "$platform" "$image" >/dev/null || die "cannot pull $image for $platform$hint"
elif [ -z "$present" ]; then
    pulled=1
    dk pull -q "$image" >/dev/null || die "cannot pull $image"
fi

# The container is never started; the command only satisfies images without ENTRYPOINT/CMD (it is an argument to
# the server's entrypoint otherwise).
if [ -n "$platform" ]; then
    cid=$(dk create --platform "$platform" "$image" release-sums-unused) || die "cannot create a container from $image"
else
    cid=$(dk create "$image" release-sums-unused) || die "cannot create a container from $image"
fi

mkdir -p "$outdir"
stage=$(mktemp -d "$outdir/.release-sums.XXXXXX")
dk cp "$cid:$dist/." "$stage/dist" || die "cannot copy $dist out of $image"

missing=""
for f in $agents; do
    [ -f "$stage/dist/agent-binaries/$f" ] || missing="$missing agent-binaries/$f"
done
for f in $installs; do
    [ -f "$stage/dist/install/$f" ] || missing="$missing install/$f"
done
[ -z "$missing" ] || die "$image lacks in $dist:$missing"

for d in agent-binaries install; do
    rm -rf "${outdir:?}/$d"
    mv "$stage/dist/$d" "$outdir/$d"
done

(
    cd "$outdir"
    find agent-binaries install -type f | LC_ALL=C sort | while IFS= read -r f; do
        sha256sum "$f"
    done
) >"$stage/SHA256SUMS"
mv "$stage/SHA256SUMS" "$outdir/SHA256SUMS"
cat "$outdir/SHA256SUMS"
err "$(wc -l <"$outdir/SHA256SUMS" | tr -d ' ') files from $image${platform:+ ($platform)} in $outdir"
