#!/bin/sh
# Installs the cross-compilation toolchain for the agents and prints the PATH directory to use.
#
# rustup here has the host target only, so cross builds use Debian's rustc-web/cargo-web (with rust-web-src and
# -Zbuild-std), zig (PyPI ziglang, driven by crates.io cargo-zigbuild) to link static musl binaries, and Debian's
# mingw-w64 for Windows. Everything comes from package registries. Runners for the results: qemu-user-static (arm64)
# and wine64 (Windows). Idempotent; needs root for apt.
#
# zig and cargo-zigbuild are pinned (ZIGLANG_VERSION, CARGO_ZIGBUILD_VERSION) so that a host build and the image's
# build stage link with the same tools; deploy/Dockerfile.server runs this script too (with RM_CROSS_RUNNERS=0: no
# qemu/wine in an image build).
#
# usage: scripts/cross-toolchain.sh [BIN_DIR]     (default $RM_CROSS_BIN, else target/cross-bin); prints BIN_DIR.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=${1:-${RM_CROSS_BIN:-$root/target/cross-bin}}
ziglang_version=${ZIGLANG_VERSION:-0.17.1}
zigbuild_version=${CARGO_ZIGBUILD_VERSION:-0.24.1}
runners="qemu-user-static wine64"
[ "${RM_CROSS_RUNNERS:-1}" = 0 ] && runners=""

log() { printf 'cross-toolchain: %s\n' "$*" >&2; }

need_apt=""
for pkg in rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 python3-venv $runners; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_apt="$need_apt $pkg"
done
# rustc-web 1.9x lives in bookworm-security; stale package lists only offer the older bookworm build.
if ! /usr/bin/rustc --version 2>/dev/null | grep -q '^rustc 1\.9[0-9]'; then
    need_apt="$need_apt rustc-web cargo-web rust-web-src"
fi
if [ -n "$need_apt" ]; then
    log "installing$need_apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # a list of package names
    apt-get install -y -qq $need_apt >/dev/null
fi

# zig: the pinned ziglang wheel, from the python on PATH if it has exactly that version, else from a venv.
python=python3
have=$(python3 -c 'import importlib.metadata as m; print(m.version("ziglang"))' 2>/dev/null || true)
if [ "$have" != "$ziglang_version" ]; then
    venv=${RM_ZIG_VENV:-$(dirname "$bin_dir")/zig-venv}
    python="$venv/bin/python3"
    if ! "$python" -c 'import importlib.metadata as m; assert m.version("ziglang") == "'"$ziglang_version"'"' 2>/dev/null; then
        log "installing ziglang $ziglang_version (PyPI) into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "ziglang==$ziglang_version"
    fi
fi
zig_dir=$("$python" -c 'import ziglang, os; print(os.path.dirname(ziglang.__file__))')

zigbuild=$(command -v cargo-zigbuild || echo "${CARGO_HOME:-$HOME/.cargo}/bin/cargo-zigbuild")
if ! "$zigbuild" --version 2>/dev/null | grep -qx "cargo-zigbuild $zigbuild_version"; then
    log "installing cargo-zigbuild $zigbuild_version (crates.io)"
    cargo install -q --locked --version "$zigbuild_version" cargo-zigbuild
    zigbuild=$(command -v cargo-zigbuild || echo "${CARGO_HOME:-$HOME/.cargo}/bin/cargo-zigbuild")
fi

# Debian's toolchain (rustc-web/cargo-web) installs as /usr/bin/rustc and /usr/bin/cargo, behind rustup's in PATH.
find_debian() { # NAME
    if [ -x "/usr/bin/$1" ] && "/usr/bin/$1" --version 2>/dev/null | grep -q '1\.9[0-9]'; then
        echo "/usr/bin/$1"
    else
        return 1
    fi
}
rustc=$(find_debian rustc) || { log "Debian's rustc-web not found"; exit 1; }
cargo=$(find_debian cargo) || { log "Debian's cargo-web not found"; exit 1; }
rustdoc=$(find_debian rustdoc || true)

mkdir -p "$bin_dir"
ln -sf "$rustc" "$bin_dir/rustc"
ln -sf "$cargo" "$bin_dir/cargo"
[ -n "$rustdoc" ] && ln -sf "$rustdoc" "$bin_dir/rustdoc"
ln -sf "$zig_dir/zig" "$bin_dir/zig"
ln -sf "$zigbuild" "$bin_dir/cargo-zigbuild"
log "$("$bin_dir/rustc" --version), zig $("$bin_dir/zig" version)"
echo "$bin_dir"
