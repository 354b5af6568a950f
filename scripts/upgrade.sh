#!/bin/sh
# Moves a compose deployment of the server to another release, verifies it, and rolls back if it does not verify.
#
#   scripts/upgrade.sh [options] VERSION
#
# VERSION is a tag of the image repository (v1.2.3, 1.2, snapshot-abc1234, ...) or a digest (sha256:...). Steps:
#   1. resolve VERSION to a digest (docker pull; the repository is the pin's unless --repo) and read the version and
#      commit the image declares (OCI labels org.opencontainers.image.version/.revision); a vX.Y.Z tag must declare
#      version X.Y.Z
#   2. write the new digest to the pin file (scripts/image-pin.sh set: atomic; the compose file is never edited)
#   3. docker-compose up -d: the reference changed, so the server is recreated
#   4. wait until the container is healthy and GET /version reports the declared version and commit
#   5. on timeout, an unhealthy container or a mismatch: restore the previous pin, recreate, wait for it, exit 1
#
# Options:
#   --pin-file FILE       pin file (default deploy/image-pin.env; RM_PIN_FILE)
#   --compose-file FILE   compose file (default deploy/compose.yaml)
#   --project NAME        compose project name (default restic-manager; COMPOSE_PROJECT_NAME)
#   --repo REPO           image repository (default: the pinned reference's repository)
#   --url URL             where this host reaches the server (default http://127.0.0.1:${RM_PORT:-8080})
#   --timeout SECONDS     how long to wait for the new server (default 120); the previous one, when rolling back,
#                         gets at least 120 s whatever this says
#   --dry-run             resolve and print the plan; change nothing
# Exit status: 0 upgraded (or already there), 1 rolled back, 2 usage or resolution error (nothing changed),
# 3 rollback failed too (the deployment needs an operator).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
pin_file=${RM_PIN_FILE:-$root/deploy/image-pin.env}
compose_file=$root/deploy/compose.yaml
project=${COMPOSE_PROJECT_NAME:-restic-manager}
repo=""
url="http://127.0.0.1:${RM_PORT:-8080}"
timeout=120
dry_run=""
DOCKER=${DOCKER:-docker}
COMPOSE=${COMPOSE:-docker-compose}

say() { printf 'upgrade: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }
usage() { sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//' >&2; exit 2; }

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case $1 in
    --pin-file) need_value "$@"; pin_file=$2; shift 2 ;;
    --compose-file) need_value "$@"; compose_file=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --repo) need_value "$@"; repo=$2; shift 2 ;;
    --url) need_value "$@"; url=${2%/}; shift 2 ;;
    --timeout) need_value "$@"; timeout=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
    esac
done
[ $# -eq 1 ] || usage
target=$1
case $timeout in '' | *[!0-9]*) die "--timeout must be a whole number of seconds, got '$timeout'" ;; esac
case $target in
sha256:*)
    printf '%s\n' "${target#sha256:}" | grep -Eqx '[0-9a-f]{64}' || die "'$target' is not a sha256 digest" ;;
*)
    printf '%s\n' "$target" | grep -Eqx '[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}' || die "'$target' is not an image tag" ;;
esac
[ -f "$compose_file" ] || die "compose file $compose_file not found"

current=$("$root/scripts/image-pin.sh" get "$pin_file") || die "cannot read the current pin from $pin_file"
[ -n "$repo" ] || repo=${current%@sha256:*}

compose() { "$COMPOSE" --env-file "$pin_file" -f "$compose_file" -p "$project" "$@"; }

# --- 1. resolve ---------------------------------------------------------------------------------------------------
case $target in
sha256:*) source_ref="$repo@$target" ;;
*) source_ref="$repo:$target" ;;
esac
say "resolving $source_ref"
# The digest the registry names for exactly this reference (for a multi-arch image, the manifest list's); an image's
# RepoDigests may list several (one per way it was pulled or pushed), so take it from the pull itself.
pulled=$("$DOCKER" pull "$source_ref" 2>&1) || die "cannot pull $source_ref: $(printf '%s' "$pulled" | tail -n 1)"
digest=$(printf '%s\n' "$pulled" | sed -n 's/^Digest: \(sha256:[0-9a-f]\{64\}\)$/\1/p' | tail -n 1)
[ -n "$digest" ] || die "the registry gave no digest for $source_ref"
new_ref="$repo@$digest"
# declared REF: "VERSION COMMIT" as the image's OCI labels state them (a field is empty when its label is missing)
declared() {
    "$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}} {{index .Config.Labels "org.opencontainers.image.revision"}}' "$1"
}
want=$(declared "$new_ref")
want_version=${want% *}
want_commit=${want#* }
if [ -z "$want_version" ] || [ -z "$want_commit" ]; then
    die "$new_ref declares no version/revision label; it cannot be verified after deployment"
fi
case $target in
v[0-9]*.[0-9]*.[0-9]*)
    [ "$want_version" = "${target#v}" ] ||
        die "tag $target points at an image declaring version $want_version, not ${target#v}; refusing" ;;
esac

version_of() { # prints "VERSION COMMIT" from GET /version, or nothing
    body=$(curl -fsS --max-time 3 "$url/version" 2>/dev/null) || return 0
    v=$(printf '%s' "$body" | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')
    c=$(printf '%s' "$body" | sed -n 's/.*"commit":"\([^"]*\)".*/\1/p')
    [ -n "$v" ] && printf '%s %s\n' "$v" "$c"
    return 0
}
running=$(version_of)

if [ "$new_ref" = "$current" ]; then
    say "already pinned to $new_ref (version $want_version, commit $want_commit); running: ${running:-not reachable at $url}"
    [ -n "$dry_run" ] || exit 0
fi

say "plan:"
say "  pin file      $pin_file"
say "  current pin   $current"
say "  running       ${running:-not reachable at $url}"
say "  new pin       $new_ref"
say "  expect        version $want_version, commit $want_commit, healthy within ${timeout}s"
say "  on failure    restore $current and recreate"
if [ -n "$dry_run" ]; then
    say "dry run: nothing changed"
    exit 0
fi

# --- 2..4. move the pin, recreate, verify ------------------------------------------------------------------------------
backup=$(mktemp "$(dirname "$pin_file")/.image-pin.previous.XXXXXX")
cp -p "$pin_file" "$backup"
moved=""
trap 'rm -f "$backup"' EXIT
# Interrupted after the pin moved: put the previous one back and recreate, never leave a half-done upgrade.
# shellcheck disable=SC2317 # invoked by the trap below
interrupted() {
    if [ -n "$moved" ]; then
        say "interrupted: restoring $current and recreating"
        mv -f "$backup" "$pin_file"
        compose up -d --no-build server >&2 || say "recreating failed; the pin file names $current again: rerun compose up -d"
    fi
    exit 130
}
trap interrupted INT TERM

# wait_for SECONDS VERSION COMMIT: 0 once healthy and reporting VERSION COMMIT within SECONDS; 1 on timeout, an
# unhealthy container or a mismatch.
wait_for() {
    deadline=$(($(date +%s) + $1))
    reason="not healthy with the expected /version within $1s"
    shift
    while [ "$(date +%s)" -lt "$deadline" ]; do
        id=$(compose ps -q server 2>/dev/null | head -n 1)
        health=""
        [ -z "$id" ] || health=$("$DOCKER" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" 2>/dev/null || true)
        seen=$(version_of)
        case $health in
        unhealthy)
            reason="the container's healthcheck failed"
            break
            ;;
        healthy)
            if [ "$seen" = "$1 $2" ]; then
                return 0
            elif [ -n "$seen" ]; then
                reason="/version reports '$seen', expected '$1 $2'"
                break
            fi
            ;;
        esac
        sleep 1
    done
    say "$reason"
    return 1
}

started=$(date +%s)
"$root/scripts/image-pin.sh" set "$pin_file" "$new_ref"
moved=1
say "pinned $new_ref; recreating"
if compose up -d --no-build server && wait_for "$timeout" "$want_version" "$want_commit"; then
    say "upgraded to $new_ref: version $want_version, commit $want_commit, healthy after $(($(date +%s) - started))s"
    exit 0
fi

# --- 5. roll back ---------------------------------------------------------------------------------------------------
say "rolling back to $current"
mv -f "$backup" "$pin_file"
moved=""
# What the previous image should report: its labels, else what was running before the upgrade.
old=$(declared "$current" 2>/dev/null) || old=""
case $old in ?*' '?*) ;; *) old=$running ;; esac
if compose up -d --no-build server && { [ -z "$old" ] || wait_for "$((timeout > 120 ? timeout : 120))" "${old% *}" "${old#* }"; }; then
    say "rolled back: $current is serving again (${old:-version unknown}); the upgrade to $new_ref failed"
    exit 1
fi
say "ROLLBACK FAILED: $current did not come back healthy; the deployment needs an operator"
exit 3
