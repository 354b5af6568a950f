#!/bin/sh
# Cross-compiles the release binaries into dist/, laid out like the image's /opt/restic-manager/dist:
#   dist/agent-binaries/restic-manager-agent-{linux-amd64,linux-arm64,windows-amd64.exe}   (static; Windows via mingw)
#   dist/install/{install.sh,install.ps1,restic-manager-agent.service}
#   dist/bin/restic-manager-server-linux-{amd64,arm64}                                       (static musl)
#   dist/SHA256SUMS
# VERSION, COMMIT and DATE from the environment are embedded (see internal/buildinfo/build.rs).
#
# usage: scripts/dist.sh [agents|all]    (default all; "agents" skips the servers)
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}
cd "$root"

cross_bin=$(scripts/cross-toolchain.sh)
PATH="$cross_bin:$PATH"
export PATH RUSTC_BOOTSTRAP=1
out="$root/dist"
mkdir -p "$out/agent-binaries" "$out/install" "$out/bin"

log() { printf 'dist: %s\n' "$*" >&2; }

# place SRC DEST MODE: copy under a temporary name, then rename (never a half-written file in dist/).
place() {
    cp "$1" "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}

musl() { # TRIPLE PACKAGE BINARY DEST
    log "building $2 for $1"
    RUSTFLAGS="-C link-self-contained=no" cargo zigbuild --release --locked --target "$1" \
        -Zbuild-std=std,panic_abort -p "$2" --target-dir "$root/target/cross-musl"
    place "$root/target/cross-musl/$1/release/$3" "$4" 0755
}

windows() { # PACKAGE BINARY DEST
    log "building $1 for x86_64-pc-windows-gnu"
    cargo build --release --locked --target x86_64-pc-windows-gnu -Zbuild-std=std,panic_abort -p "$1" \
        --target-dir "$root/target/cross-windows"
    place "$root/target/cross-windows/x86_64-pc-windows-gnu/release/$2.exe" "$3" 0755
}

musl x86_64-unknown-linux-musl restic-manager-agent restic-manager-agent "$out/agent-binaries/restic-manager-agent-linux-amd64"
musl aarch64-unknown-linux-musl restic-manager-agent restic-manager-agent "$out/agent-binaries/restic-manager-agent-linux-arm64"
windows restic-manager-agent restic-manager-agent "$out/agent-binaries/restic-manager-agent-windows-amd64.exe"
if [ "$what" = all ]; then
    musl x86_64-unknown-linux-musl restic-manager-server restic-manager-server "$out/bin/restic-manager-server-linux-amd64"
    musl aarch64-unknown-linux-musl restic-manager-server restic-manager-server "$out/bin/restic-manager-server-linux-arm64"
fi
place scripts/install.sh "$out/install/install.sh" 0755
place scripts/install.ps1 "$out/install/install.ps1" 0644
place deploy/restic-manager-agent.service "$out/install/restic-manager-agent.service" 0644

(cd "$out" && find agent-binaries bin -type f ! -name '*.tmp.*' | sort | xargs sha256sum >SHA256SUMS.tmp && mv -f SHA256SUMS.tmp SHA256SUMS)
log "done:"
cat "$out/SHA256SUMS" >&2
