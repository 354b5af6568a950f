#!/bin/sh
# Everything the release workflow needs to know before it builds: the version and image tags
# (scripts/release-tags.sh), the commit and its date, the registry and image name (scripts/release-image.sh) and the
# image references to push.
#
# usage: scripts/release-meta.sh            print the result on stdout
#        scripts/release-meta.sh --github   append it to $GITHUB_OUTPUT and (as REL_* variables) to $GITHUB_ENV,
#                                           with a short summary on stderr and nothing on stdout
#
# Runs in the git checkout of the commit being released. Environment (event values reach it through env:):
#   EVENT   push (a tag push) or workflow_dispatch (github.event_name)
#   REF     the tag ref of a push, refs/tags/vX.Y.Z[-PRE] (github.ref)
#   SHA     the commit or annotated tag object id (github.sha); resolved to its commit with git
#   SERVER_URL, OWNER, REGISTRY_VAR, IMAGE_NAME_VAR   as for scripts/release-image.sh
#
# Output (stdout, or appended to $GITHUB_OUTPUT with --github):
#   version=<version>             tags=<space-separated tags>    commit=<40 hex>
#   date=<commit date, UTC, YYYY-MM-DDTHH:MM:SSZ>                registry=<registry>
#   image=<registry/path>         refs=<image:tag,image:tag,...>
# one per line, in that order. With --github, $GITHUB_ENV gets REL_VERSION, REL_TAGS, REL_COMMIT, REL_DATE and
# REL_IMAGE. Everything is computed before anything is written: on any error nothing at all reaches stdout or the
# two files, a message goes to stderr and the exit status is 1 (2 for usage errors).
set -eu
LC_ALL=C
export LC_ALL

here=$(cd "$(dirname "$0")" && pwd)
usage() {
    echo "usage: $0 [--github]   (input from EVENT, REF, SHA, SERVER_URL, OWNER, REGISTRY_VAR, IMAGE_NAME_VAR)" >&2
    exit 2
}
die() { printf 'release-meta: %s\n' "$*" >&2; exit 1; }
shown() { printf "'%s'" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._:/@+-' '?' | cut -c1-100)"; }
# The value of KEY in KEY=VALUE lines.
field() { printf '%s\n' "$2" | sed -n "s/^$1=//p"; }

github=
case $# in
0) ;;
1) [ "$1" = --github ] || usage; github=1 ;;
*) usage ;;
esac
if [ -n "$github" ]; then
    [ -n "${GITHUB_OUTPUT:-}" ] || die "--github needs GITHUB_OUTPUT"
    [ -n "${GITHUB_ENV:-}" ] || die "--github needs GITHUB_ENV"
fi

event=${EVENT:-}
sha=${SHA:-}
case $sha in
'' | *[!0-9A-Fa-f]*) die "SHA must be a commit or tag object id in hex, got $(shown "$sha")" ;;
esac
# An annotated tag's object id resolves to its commit; a commit id stays as it is.
commit=$(git rev-parse -q --verify "$sha^{commit}") || die "SHA $(shown "$sha") is not a commit in this repository"
case $event in
workflow_dispatch) meta=$("$here/release-tags.sh" --dispatch "$commit") || exit 1 ;;
push) meta=$("$here/release-tags.sh" "${REF:-}") || exit 1 ;;
*) die "EVENT must be push or workflow_dispatch, got $(shown "$event")" ;;
esac
version=$(field version "$meta")
tags=$(field tags "$meta")
case $version in '' | *[!A-Za-z0-9.+_-]*) die "unusable version $(shown "$version")" ;; esac
case $tags in '' | *[!A-Za-z0-9._\ -]*) die "unusable tags $(shown "$tags")" ;; esac
# Deterministic: the commit's own date, not the wall clock.
date=$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ "$commit") ||
    die "cannot read the date of $commit"

names=$("$here/release-image.sh") || exit 1
registry=$(field registry "$names")
image=$(field image "$names")

refs=""
for t in $tags; do refs="$refs${refs:+,}$image:$t"; done

outputs=$(printf '%s\n' "version=$version" "tags=$tags" "commit=$commit" "date=$date" "registry=$registry" \
    "image=$image" "refs=$refs")
if [ -z "$github" ]; then
    printf '%s\n' "$outputs"
    exit 0
fi
printf '%s\n' "$outputs" >>"$GITHUB_OUTPUT"
printf '%s\n' "REL_VERSION=$version" "REL_TAGS=$tags" "REL_COMMIT=$commit" "REL_DATE=$date" "REL_IMAGE=$image" \
    >>"$GITHUB_ENV"
printf '%s: version %s, commit %s, date %s\n' release-meta "$version" "$commit" "$date" >&2
printf '%s: image %s, tags %s\n' release-meta "$image" "$tags" >&2
