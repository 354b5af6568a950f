#!/bin/sh
# Brings up what the image tests need on a machine without systemd: a Docker engine, a registry on loopback and the
# binfmt entry that lets arm64 containers run under qemu-user. Reuses an engine that already answers.
#
# usage: scripts/docker-env.sh up      start (idempotent), install Debian packages if missing (root)
#        scripts/docker-env.sh down    stop what `up` started (an engine found running is left alone)
#
# Environment: RM_DOCKER_ROOT (default /var/lib/restic-manager-ci) holds the engine's data root, the registry's
# storage, pid files and logs. RM_REGISTRY (default 127.0.0.1:5000) is where the registry listens.
set -eu

state=${RM_DOCKER_ROOT:-/var/lib/restic-manager-ci}
registry=${RM_REGISTRY:-127.0.0.1:5000}
# The engine's own CLI: a newer CLI earlier in PATH may lack the BuildKit integration the engine has.
PATH="/usr/bin:/usr/sbin:/bin:/sbin:$PATH"
export PATH

log() { printf 'docker-env: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

packages() {
    need=""
    for pair in dockerd:docker.io docker-registry:docker-registry skopeo:skopeo docker-compose:docker-compose \
        debootstrap:debootstrap qemu-aarch64-static:qemu-user-static; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || need="$need ${pair#*:}"
    done
    if [ -n "$need" ]; then
        log "installing$need"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086 # a list of package names
        apt-get install -y -qq $need >/dev/null
    fi
}

wait_for() { # SECONDS DESCRIPTION COMMAND...
    secs=$1 what=$2
    shift 2
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -le $((secs * 5)) ] || return 1
        sleep 0.2
    done
    log "$what ready"
}

engine_up() {
    if docker info >/dev/null 2>&1; then
        log "using the running engine ($(docker version -f '{{.Server.Version}}'))"
        return
    fi
    mkdir -p "$state/engine"
    log "starting dockerd (data root $state/engine, log $state/dockerd.log)"
    nohup dockerd --data-root "$state/engine" --pidfile "$state/dockerd.pid" >"$state/dockerd.log" 2>&1 &
    wait_for 60 dockerd docker info || { tail -20 "$state/dockerd.log" >&2; die "dockerd did not answer within 60 s"; }
    touch "$state/dockerd.ours"
}

registry_up() {
    if curl -fsS "http://$registry/v2/" >/dev/null 2>&1; then
        log "using the registry at $registry"
        return
    fi
    mkdir -p "$state/registry"
    cat >"$state/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $state/registry
  delete:
    enabled: true
http:
  addr: $registry
EOF
    log "starting docker-registry on $registry"
    nohup docker-registry serve "$state/registry.yml" >"$state/registry.log" 2>&1 &
    echo $! >"$state/registry.pid"
    wait_for 30 registry curl -fsS "http://$registry/v2/" || { tail -20 "$state/registry.log" >&2; die "registry did not start"; }
}

binfmt_up() {
    dir=/proc/sys/fs/binfmt_misc
    [ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null || {
        log "warning: cannot mount binfmt_misc; arm64 containers will not run"
        return 0
    }
    if [ ! -e "$dir/qemu-aarch64" ]; then
        conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        [ -r "$conf" ] || { log "warning: $conf missing; arm64 containers will not run"; return 0; }
        grep -v '^#' "$conf" >"$dir/register" || log "warning: could not register qemu-aarch64"
    fi
    [ -e "$dir/qemu-aarch64" ] && log "arm64 emulation registered"
    return 0
}

stop_pid() { # FILE NAME
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    if kill "$pid" 2>/dev/null; then
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        log "stopped $2"
    fi
    rm -f "$1"
}

case ${1:-} in
up)
    packages
    engine_up
    registry_up
    binfmt_up
    ;;
down)
    stop_pid "$state/registry.pid" registry
    if [ -e "$state/dockerd.ours" ]; then
        stop_pid "$state/dockerd.pid" dockerd
        rm -f "$state/dockerd.ours"
    fi
    ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
