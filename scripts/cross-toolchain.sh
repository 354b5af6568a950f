#!/bin/sh
# Installs the cross-compilation toolchain for the agents and prints the PATH directory to use.
#
# rustup here has the host target only, so cross builds use Debian's rustc-web/cargo-web (with rust-web-src and
# -Zbuild-std), zig (PyPI ziglang, driven by crates.io cargo-zigbuild) to link static musl binaries, and Debian's
# mingw-w64 for Windows. Everything comes from package registries. Runners for the results: qemu-user-static (arm64)
# and wine64 (Windows). Idempotent; needs root for apt.
#
# usage: scripts/cross-toolchain.sh [BIN_DIR]     (default target/cross-bin); prints BIN_DIR on stdout.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=${1:-$root/target/cross-bin}

log() { printf 'cross-toolchain: %s\n' "$*" >&2; }

need_apt=""
for pkg in rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 qemu-user-static wine64; do
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

if ! python3 -c 'import ziglang' 2>/dev/null; then
    log "installing ziglang (PyPI)"
    python3 -m pip install -q ziglang
fi
zig_dir=$(python3 -c 'import ziglang, os; print(os.path.dirname(ziglang.__file__))')

if ! command -v cargo-zigbuild >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-zigbuild" ]; then
    log "installing cargo-zigbuild (crates.io)"
    cargo install -q --locked cargo-zigbuild
fi
zigbuild=$(command -v cargo-zigbuild || echo "$HOME/.cargo/bin/cargo-zigbuild")

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
