#!/bin/sh
# Stages a bundled-assets dir for local runs, laid out like /opt/restic-manager/dist in the image:
#   <dev>/bundled/agent-binaries/restic-manager-agent-<os>-<arch>   (the host agent just built)
#   <dev>/bundled/install/{install.sh,install.ps1,restic-manager-agent.service}   (when they exist)
#   <dev>/bundled/restic-binaries/restic-<os>-<arch> and restic-binaries.json   (the host's restic, when it has one:
#       $RESTIC, else restic on PATH; the sidecar records its version and SHA-256 as the image's does)
# and creates <dev>/data, the local data dir. Files are copied to a temp name and renamed into place, so a running
# server never serves a half-copied file.
set -eu

usage() { echo "usage: $0 BUILD_DIR DEV_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
build_dir=$1
dev_dir=$2
root=$(cd "$(dirname "$0")/.." && pwd)

case "$(uname -s)" in
    Linux) os=linux ;;
    *) echo "dev-bundle: unsupported host OS $(uname -s); supported: Linux" >&2; exit 1 ;;
esac
case "$(uname -m)" in
    x86_64 | amd64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) echo "dev-bundle: unsupported host architecture $(uname -m); supported: x86_64, aarch64" >&2; exit 1 ;;
esac

agent="$build_dir/restic-manager-agent"
[ -x "$agent" ] || { echo "dev-bundle: $agent not found; build it first (cargo build -p restic-manager-agent)" >&2; exit 1; }

bundled="$dev_dir/bundled"
mkdir -p "$bundled/agent-binaries" "$bundled/install" "$dev_dir/data"

place() { # SRC DEST MODE
    tmp="$2.tmp.$$"
    cp "$1" "$tmp"
    chmod "$3" "$tmp"
    mv -f "$tmp" "$2"
}

place "$agent" "$bundled/agent-binaries/restic-manager-agent-$os-$arch" 0755
for f in scripts/install.sh:0755 scripts/install.ps1:0644 deploy/restic-manager-agent.service:0644; do
    src="$root/${f%%:*}"
    [ -f "$src" ] && place "$src" "$bundled/install/$(basename "$src")" "${f##*:}"
done
restic_bin=${RESTIC:-$(command -v restic || true)}
restic_note="no restic on this host: none bundled"
if [ -n "$restic_bin" ] && [ -x "$restic_bin" ]; then
    restic_version=$("$restic_bin" version | sed -n '1s/^restic \([0-9][0-9.]*\).*/\1/p')
    if [ -n "$restic_version" ]; then
        mkdir -p "$bundled/restic-binaries"
        place "$restic_bin" "$bundled/restic-binaries/restic-$os-$arch" 0755
        restic_sha=$(sha256sum "$bundled/restic-binaries/restic-$os-$arch" | cut -d' ' -f1)
        printf '{"origin":"host %s","files":{"restic-%s-%s":{"version":"%s","sha256":"%s"}}}\n' \
            "$restic_bin" "$os" "$arch" "$restic_version" "$restic_sha" >"$bundled/restic-binaries/.sidecar.$$"
        mv -f "$bundled/restic-binaries/.sidecar.$$" "$bundled/restic-binaries/restic-binaries.json"
        restic_note="restic $restic_version from $restic_bin"
    fi
fi
echo "dev-bundle: $bundled ready ($os/$arch agent: $("$agent" --version); $restic_note)"
