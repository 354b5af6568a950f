#!/bin/sh
# Builds local stand-ins for the public base images deploy/Dockerfile.server names, for machines that cannot pull
# from any registry. On a normal build host this script is not needed: the Dockerfile's defaults pull the real ones.
#
#   debian:bookworm                        debootstrap --variant=minbase, with the suites the public image lists
#                                          (bookworm, bookworm-updates, bookworm-security: rustc-web 1.9x lives
#                                          only in bookworm-security)
#   gcr.io/distroless/static-debian12:nonroot
#                                          FROM scratch: passwd/group with nonroot (65532), CA certificates,
#                                          tzdata, /tmp 1777, USER 65532 -- what the final stage relies on
#
# usage: scripts/base-images.sh [--force]     (root; installs debootstrap if missing; skips images that exist)
set -eu

PATH="/usr/bin:/usr/sbin:/bin:/sbin:$PATH"
export PATH
debian=${RM_DEBIAN_IMAGE:-debian:bookworm}
distroless=${RM_DISTROLESS_IMAGE:-gcr.io/distroless/static-debian12:nonroot}
mirror=${RM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
force=${1:-}

log() { printf 'base-images: %s\n' "$*" >&2; }

exists() { [ "$force" != --force ] && docker image inspect "$1" >/dev/null 2>&1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/rm-base.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

if exists "$debian"; then
    log "$debian present"
else
    command -v debootstrap >/dev/null 2>&1 || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
    }
    log "debootstrap bookworm (minbase) for $debian"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -20 "$work/debootstrap.log" >&2
        exit 1
    }
    rm -f "$work/rootfs/etc/apt/sources.list"
    cat >"$work/rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -c . | docker import \
        --change 'CMD ["bash"]' \
        --change 'LABEL org.opencontainers.image.description="local stand-in for debian:bookworm"' \
        - "$debian" >/dev/null
    log "built $debian ($(docker image inspect -f '{{.Size}}' "$debian") bytes)"
fi

if exists "$distroless"; then
    log "$distroless present"
else
    ctx="$work/distroless"
    mkdir -p "$ctx/etc/ssl/certs" "$ctx/tmp" "$ctx/home/nonroot" "$ctx/usr/share"
    cat >"$ctx/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat >"$ctx/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/etc/ssl/certs/ca-certificates.crt"
    [ -d /usr/share/zoneinfo ] && cp -a /usr/share/zoneinfo "$ctx/usr/share/zoneinfo"
    # No RUN: this stage builds for any --platform without emulation.
    cat >"$ctx/Dockerfile" <<'EOF'
FROM scratch
COPY --chown=0:0 etc/ /etc/
COPY --chown=0:0 usr/ /usr/
COPY --chown=65532:65532 home/nonroot/ /home/nonroot/
COPY --chown=0:0 tmp/ /tmp/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot
LABEL org.opencontainers.image.description="local stand-in for gcr.io/distroless/static-debian12:nonroot"
EOF
    chmod 1777 "$ctx/tmp"
    for platform in linux/amd64 linux/arm64; do
        # One tag holds one platform in this engine; the build picks by --platform, so keep a tag per platform
        # and point the public name at the host's.
        DOCKER_BUILDKIT=1 docker build -q --platform "$platform" -t "$distroless-${platform#linux/}" "$ctx" >/dev/null
    done
    docker tag "$distroless-$(docker version -f '{{.Server.Arch}}')" "$distroless"
    log "built $distroless (+ -amd64, -arm64)"
fi
