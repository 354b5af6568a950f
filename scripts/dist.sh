#!/bin/sh
# Cross-compiles the release binaries into dist/, laid out like the image's /opt/restic-manager/dist:
#   dist/agent-binaries/restic-manager-agent-{linux-amd64,linux-arm64,windows-amd64.exe}   (static; Windows via mingw)
#   dist/install/{install.sh,install.ps1,restic-manager-agent.service}
#   dist/bin/restic-manager-server-linux-{amd64,arm64}                                       (static musl)
#   dist/SHA256SUMS
# The same script runs on a host (`make dist`) and inside deploy/Dockerfile.server's build stage, so both produce the
# same bytes for the same VERSION, COMMIT and DATE (embedded, see internal/buildinfo/build.rs): paths are trimmed
# (-Ztrim-paths), the Windows linker writes no timestamp and links from a fixed target dir (see win_target).
#
# usage: scripts/dist.sh [all | PART...]     PART: agents, install, server-amd64, server-arm64, servers
#        (default all; "agents" alone also places the install files, as it always has)
# Environment: DIST_DIR (default ./dist), RM_CROSS_RUNNERS=0 to skip qemu/wine (the image build does).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ $# -gt 0 ] || set -- all
[ "$*" = agents ] && set -- agents install

agents="" install="" server_amd64="" server_arm64=""
for part in "$@"; do
    case $part in
    all) agents=1 install=1 server_amd64=1 server_arm64=1 ;;
    agents) agents=1 ;;
    install) install=1 ;;
    server-amd64) server_amd64=1 ;;
    server-arm64) server_arm64=1 ;;
    servers) server_amd64=1 server_arm64=1 ;;
    *)
        echo "dist: unknown part '$part' (expected all, agents, install, server-amd64, server-arm64, servers)" >&2
        exit 2
        ;;
    esac
done

cross_bin=$(scripts/cross-toolchain.sh)
PATH="$cross_bin:$PATH"
export PATH RUSTC_BOOTSTRAP=1
out=${DIST_DIR:-$root/dist}
mkdir -p "$out/agent-binaries" "$out/install" "$out/bin"

log() { printf 'dist: %s\n' "$*" >&2; }

# place SRC DEST MODE: copy under a temporary name, then rename (never a half-written file in dist/).
place() {
    cp "$1" "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}

# Build paths (checkout, cargo home, sysroot) never reach the binaries, so the host and the image build agree.
export CARGO_PROFILE_RELEASE_TRIM_PATHS=all

musl() { # TRIPLE PACKAGE BINARY DEST
    log "building $2 for $1"
    RUSTFLAGS="-C link-self-contained=no" cargo zigbuild --release --locked --target "$1" -Ztrim-paths \
        -Zbuild-std=std,panic_abort -p "$2" --target-dir "$root/target/cross-musl"
    place "$root/target/cross-musl/$1/release/$3" "$4" 0755
}

# The mingw linker orders the import tables by the paths of its inputs, which come from the target dir and from
# /usr (mingw's import libraries): a checkout under /work and one under /src give different bytes. A fixed target dir
# for the Windows build keeps the order, and the bytes, the same on every machine and in the image build.
win_target=${RM_WINDOWS_TARGET_DIR:-/tmp/restic-manager-build-$(id -u)/cross-windows}

windows() { # PACKAGE BINARY DEST
    log "building $1 for x86_64-pc-windows-gnu"
    RUSTFLAGS="-C link-arg=-Wl,--no-insert-timestamp" cargo build --release --locked --target x86_64-pc-windows-gnu \
        -Ztrim-paths -Zbuild-std=std,panic_abort -p "$1" --target-dir "$win_target"
    place "$win_target/x86_64-pc-windows-gnu/release/$2.exe" "$3" 0755
}

if [ -n "$agents" ]; then
    musl x86_64-unknown-linux-musl restic-manager-agent restic-manager-agent "$out/agent-binaries/restic-manager-agent-linux-amd64"
    musl aarch64-unknown-linux-musl restic-manager-agent restic-manager-agent "$out/agent-binaries/restic-manager-agent-linux-arm64"
    windows restic-manager-agent restic-manager-agent "$out/agent-binaries/restic-manager-agent-windows-amd64.exe"
fi
[ -z "$server_amd64" ] ||
    musl x86_64-unknown-linux-musl restic-manager-server restic-manager-server "$out/bin/restic-manager-server-linux-amd64"
[ -z "$server_arm64" ] ||
    musl aarch64-unknown-linux-musl restic-manager-server restic-manager-server "$out/bin/restic-manager-server-linux-arm64"
if [ -n "$install" ]; then
    place scripts/install.sh "$out/install/install.sh" 0755
    place scripts/install.ps1 "$out/install/install.ps1" 0644
    place deploy/restic-manager-agent.service "$out/install/restic-manager-agent.service" 0644
fi

(cd "$out" && find agent-binaries bin -type f ! -name '*.tmp.*' | sort | xargs -r sha256sum >SHA256SUMS.tmp && mv -f SHA256SUMS.tmp SHA256SUMS)
log "done:"
cat "$out/SHA256SUMS" >&2
