#!/bin/sh
# Pins a release's image digest in deploy/image-pin.env on main, for the release workflow: one commit pushed to the
# origin of a checkout of main, retried on top of the newest main when someone else pushed first.
#
# usage: scripts/release-pin.sh TAG REF CHECKOUT
#   TAG       the release tag, vX.Y.Z[-PRE] or refs/tags/vX.Y.Z[-PRE] (checked with scripts/release-tags.sh)
#   REF       the pushed image by digest, NAME@sha256:<64 hex> (checked by scripts/image-pin.sh set)
#   CHECKOUT  a git work tree whose remote `origin` holds the main branch to commit to
#
# Nothing goes to stdout; messages (and git's) go to stderr.
# The pin follows the highest final release. It stays as it is (exit 0, with a note) for
#   - a pre-release (vX.Y.Z-PRE), and
#   - a tag that is not the highest vX.Y.Z tag of the repository in the working directory (the release checkout,
#     with its tags), e.g. a patch v1.2.4 of an older line once v1.3.0 exists.
# Otherwise each of 3 tries fetches origin/main, resets CHECKOUT to it, sets the pin with scripts/image-pin.sh (the
# one next to this script), commits "release TAG: pin REF [skip ci]" and pushes to main; a rejected push waits
# try*RM_PIN_RETRY_DELAY seconds (default 5) and tries again on the newest main. That rebuild is a rebase that cannot
# conflict: the commit touches one file, rewritten from scratch each time. When main already pins REF nothing is
# committed. Exit 1 when all 3 pushes fail or anything else does (messages on stderr), 2 on usage errors.
set -eu
LC_ALL=C
export LC_ALL

me=release-pin
here=$(cd "$(dirname "$0")" && pwd)
pin_file=deploy/image-pin.env
usage() {
    echo "usage: $0 TAG REF CHECKOUT" >&2
    exit 2
}
err() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { err "$*"; exit 1; }
shown() { printf "'%s'" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._:/@+-' '?' | cut -c1-100)"; }

[ $# -eq 3 ] || usage
tag=$1
ref=$2
checkout=$3
case $tag in -*) usage ;; esac
case $ref in '' | -*) usage ;; esac
[ -n "$checkout" ] || usage

meta=$("$here/release-tags.sh" "$tag") || die "TAG $(shown "$tag") is not a release tag"
tag=${tag#refs/tags/}
version=$(printf '%s\n' "$meta" | sed -n 's/^version=//p')
delay=${RM_PIN_RETRY_DELAY:-5}
case $delay in '' | *[!0-9]*) die "RM_PIN_RETRY_DELAY must be a number of seconds, got $(shown "$delay")" ;; esac

case $version in *-* | *+*)
    err "$tag is a pre-release: $pin_file stays as it is"
    exit 0
    ;;
esac
# X.Y.Z compared number by number (sort -V is not POSIX).
highest=$(git tag --list 'v*.*.*' | grep -Ex 'v[0-9]+\.[0-9]+\.[0-9]+' | sed 's/^v//' |
    sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1) || die "cannot list the release tags in $(pwd)"
if [ "v$highest" != "$tag" ]; then
    err "$tag is not the highest release (v${highest:-?}): $pin_file stays as it is"
    exit 0
fi

[ -d "$checkout" ] || die "CHECKOUT $(shown "$checkout") is not a directory"
cd "$checkout"
git rev-parse -q --is-inside-work-tree >/dev/null 2>&1 || die "CHECKOUT $(shown "$checkout") is not a git work tree"
git config user.name "restic-manager release"
git config user.email "release@restic-manager.invalid"
for try in 1 2 3; do
    git fetch -q --depth=1 origin main || die "cannot fetch main from origin"
    git reset -q --hard FETCH_HEAD
    "$here/image-pin.sh" set "$PWD/$pin_file" "$ref" || die "cannot set the pin to $(shown "$ref")"
    if [ -z "$(git status --porcelain -- "$pin_file")" ]; then
        err "$pin_file already pins $ref"
        exit 0
    fi
    git add "$pin_file"
    git commit -q -m "release $tag: pin $ref [skip ci]"
    if git push -q origin HEAD:main; then
        err "pinned $ref on main ($(git rev-parse HEAD))"
        exit 0
    fi
    err "warning: pushing the pin failed (try $try of 3); retrying on the newest main"
    [ "$try" -eq 3 ] || sleep $((try * delay))
done
die "could not push the pin to main after 3 tries"
