#!/bin/sh
# Builds the server image from deploy/Dockerfile.server with the version, commit and date taken from git (what
# `make image` runs). VERSION, COMMIT, DATE in the environment win over git, as in the release workflow.
#
# usage: scripts/image.sh [--platform linux/amd64|linux/arm64] [--tag NAME:TAG] [-- EXTRA DOCKER BUILD ARGS...]
#        (defaults: the engine's platform, restic-manager:dev)
#
# As in internal/buildinfo: VERSION is `git describe --tags --match 'v[0-9]*'` without the v (else dev), COMMIT
# `git rev-parse HEAD`, DATE the commit date in UTC (deterministic: rebuilding a commit embeds the same date).
# The host's CA bundle, when present, is passed as the optional `cacert` secret (never stored in a layer).
# Prints the image size and the build time.
# On machines that cannot pull, run scripts/base-images.sh once first (local stand-ins for the base images).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The engine's own CLI: a newer CLI earlier in PATH may lack the BuildKit integration the engine has.
PATH="/usr/bin:$PATH"
export PATH DOCKER_BUILDKIT=1

platform="" tag=restic-manager:dev
while [ $# -gt 0 ]; do
    case $1 in
    --platform) platform=${2:?--platform needs a value}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --) shift; break ;;
    *) echo "image: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
    esac
done

git_or() { # DEFAULT GIT-ARGS...
    d=$1
    shift
    git "$@" 2>/dev/null || echo "$d"
}
: "${VERSION:=$(git_or vdev describe --tags --match 'v[0-9]*' | sed 's/^v//')}"
: "${COMMIT:=$(git_or none rev-parse HEAD)}"
: "${DATE:=$(TZ=UTC git_or unknown log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ)}"
source_url=${SOURCE_URL:-$(git_or "" remote get-url origin)}

# Base images: BUILD_IMAGE / RUNTIME_IMAGE from the environment override the Dockerfile's public defaults. An engine
# tag holds one platform, so for a foreign --platform the runtime stand-in from scripts/base-images.sh lives under
# its own tag (...:nonroot-arm64); use it when it is there rather than try to pull.
if [ -z "${RUNTIME_IMAGE:-}" ] && [ -n "$platform" ]; then
    standin="gcr.io/distroless/static-debian12:nonroot-${platform#linux/}"
    if docker image inspect -f '{{.Config.Labels}}' "$standin" 2>/dev/null | grep -q 'local stand-in'; then
        RUNTIME_IMAGE=$standin
        printf 'image: runtime base %s (local stand-in)\n' "$standin" >&2
    fi
fi
[ -z "${BUILD_IMAGE:-}" ] || set -- --build-arg "BUILD_IMAGE=$BUILD_IMAGE" "$@"
[ -z "${RUNTIME_IMAGE:-}" ] || set -- --build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE" "$@"
set -- "$@" --build-arg "VERSION=$VERSION" --build-arg "COMMIT=$COMMIT" --build-arg "DATE=$DATE" \
    --build-arg "SOURCE_URL=$source_url" -f deploy/Dockerfile.server -t "$tag" "$@"
[ -z "$platform" ] || set -- --platform "$platform" "$@"
[ ! -s /etc/ssl/certs/ca-certificates.crt ] || set -- --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt "$@"

printf 'image: building %s%s (version %s, commit %s, date %s)\n' "$tag" "${platform:+ for $platform}" \
    "$VERSION" "$COMMIT" "$DATE" >&2
start=$(date +%s)
docker build "$@" .
size=$(docker image inspect -f '{{.Size}}' "$tag")
printf 'image: %s built in %ss, %s bytes (%s MiB)\n' "$tag" "$(($(date +%s) - start))" "$size" \
    "$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }')" >&2
