#!/bin/sh
# Derives the registry and the image name a release is pushed to, for the release workflow.
#
# usage: scripts/release-image.sh          (no arguments; everything comes from the environment)
#
# Environment (the workflow passes the event values through env:):
#   SERVER_URL      the Gitea instance, e.g. https://git.example.org (github.server_url)
#   OWNER           the repository owner (github.repository_owner)
#   REGISTRY_VAR    optional registry host[:port] (vars.REGISTRY); default: the host[:port] of SERVER_URL
#   IMAGE_NAME_VAR  optional repository path in the registry (vars.IMAGE_NAME); default: OWNER/restic-manager
#
# Prints exactly two lines on stdout, ready to append to $GITHUB_OUTPUT:
#   registry=<registry, lowercased>
#   image=<registry>/<path, lowercased>
#
# The image must consist of [a-z0-9._:/-] after lowercasing, hold at least one '/', and neither start nor end with
# '/' nor contain '//'. Anything else is refused: a message on stderr, nothing at all on stdout, exit 1 (exit 2 when
# arguments are given). Values are never evaluated, and they are echoed in messages only with unsafe characters
# replaced by '?'.
set -eu
LC_ALL=C
export LC_ALL

usage() {
    echo "usage: $0   (input from SERVER_URL, OWNER, REGISTRY_VAR, IMAGE_NAME_VAR)" >&2
    exit 2
}
die() { printf 'release-image: %s\n' "$*" >&2; exit 1; }
# Untrusted text for a message: quoted, characters outside a safe set (newlines included) as '?', at most 100.
shown() { printf "'%s'" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._:/@+-' '?' | cut -c1-100)"; }
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

[ $# -eq 0 ] || usage

registry=${REGISTRY_VAR:-}
if [ -z "$registry" ]; then
    registry=${SERVER_URL:-}
    registry=${registry#*://}
    registry=${registry%%/*}
fi
registry=$(lower "$registry")
owner=${OWNER:-}
name=${IMAGE_NAME_VAR:-$owner/restic-manager}
image=$(lower "$registry/$name")

case $image in
*[!a-z0-9._:/-]* | */ | *//* | /*) die "unusable image name $(shown "$image") (registry $(shown "$registry"), path $(shown "$name")); set vars.REGISTRY / vars.IMAGE_NAME" ;;
*/*) ;;
*) die "unusable image name $(shown "$image"): no path after the registry" ;;
esac

printf 'registry=%s\nimage=%s\n' "$registry" "$image"
