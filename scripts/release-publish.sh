#!/bin/sh
# Creates (or, on a re-run, updates) the Gitea release of a tag and attaches files to it, for the release workflow.
#
# usage: scripts/release-publish.sh TAG NOTES FILE...
#   TAG    the release tag, vX.Y.Z[-PRE] or refs/tags/vX.Y.Z[-PRE] (checked with scripts/release-tags.sh); a tag with
#          a pre-release part makes a pre-release
#   NOTES  a file holding the release notes (the release body, Markdown)
#   FILE   files to attach, under their base name (paths of [A-Za-z0-9._/-] only)
#
# Environment:
#   RELEASE_SERVER_URL  the Gitea instance, e.g. https://git.example.org (github.server_url); the API is
#                       $RELEASE_SERVER_URL/api/v1
#   RELEASE_REPOSITORY  owner/name (github.repository)
#   RELEASE_TOKEN       a Gitea token that may write releases. It reaches curl in a header file (mode 0600), never
#                       on a command line, and is never printed.
#
# Steps: GET /repos/R/releases/tags/TAG; 404 -> POST /repos/R/releases, 200 -> PATCH /repos/R/releases/ID (a re-run
# updates the release an earlier run made, instead of failing on the existing tag). Then for each FILE: GET the
# release's assets, DELETE the ones of the same name, POST the file. Nothing goes to stdout; progress goes to stderr
# ("release ID: URL", "attached NAME"). Any answer other than 2xx (or a GET of the tag other than 200/404) stops it
# with the method, the URL and the start of the answer (printable characters, the token masked) on stderr, exit 1.
# Usage errors exit 2.
# Tools: curl, jq.
set -eu
LC_ALL=C
export LC_ALL

me=release-publish
here=$(cd "$(dirname "$0")" && pwd)
usage() {
    echo "usage: $0 TAG NOTES FILE...   (env: RELEASE_SERVER_URL, RELEASE_REPOSITORY, RELEASE_TOKEN)" >&2
    exit 2
}
die() { printf '%s: %s\n' "$me" "$*" >&2; exit 1; }
# Untrusted text for a message: quoted, characters outside a safe set (newlines included) as '?', at most 100.
shown() { printf "'%s'" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._:/@+-' '?' | cut -c1-100)"; }

[ $# -ge 3 ] || usage
tag=$1
notes=$2
shift 2
case $tag in -*) usage ;; esac

meta=$("$here/release-tags.sh" "$tag") || die "TAG $(shown "$tag") is not a release tag"
tag=${tag#refs/tags/}
version=$(printf '%s\n' "$meta" | sed -n 's/^version=//p')
prerelease=false
case $version in *-*) prerelease=true ;; esac

server=${RELEASE_SERVER_URL:-}
repo=${RELEASE_REPOSITORY:-}
case $server in
http://?* | https://?*) server=${server%/} ;;
*) die "RELEASE_SERVER_URL must be an http(s) URL, got $(shown "$server")" ;;
esac
case $server in *[!A-Za-z0-9._:/-]*) die "RELEASE_SERVER_URL has unexpected characters: $(shown "$server")" ;; esac
case $repo in
*/*/* | /* | */ | *[!A-Za-z0-9._/-]*) die "RELEASE_REPOSITORY must be OWNER/NAME, got $(shown "$repo")" ;;
*/*) ;;
*) die "RELEASE_REPOSITORY must be OWNER/NAME, got $(shown "$repo")" ;;
esac
[ -n "${RELEASE_TOKEN:-}" ] || die "RELEASE_TOKEN is empty"
case $RELEASE_TOKEN in *[!A-Za-z0-9._~+/=-]*) die "RELEASE_TOKEN has characters no token has" ;; esac
if [ ! -f "$notes" ] || [ ! -r "$notes" ]; then die "NOTES $(shown "$notes") is not a readable file"; fi
for file in "$@"; do
    # curl -F gives ';' and ',' a meaning: paths are kept to plain characters.
    case $file in
    -* | *[!A-Za-z0-9._/-]*) die "FILE $(shown "$file"): attachment paths are made of [A-Za-z0-9._/-]" ;;
    esac
    case ${file##*/} in
    '' | .*) die "FILE $(shown "$file"): an attachment's name may not be empty or start with '.'" ;;
    esac
    if [ ! -f "$file" ] || [ ! -r "$file" ]; then die "FILE $(shown "$file") is not a readable file"; fi
done
command -v curl >/dev/null 2>&1 || die "curl is not on PATH"
command -v jq >/dev/null 2>&1 || die "jq is not on PATH"

api="$server/api/v1/repos/$repo"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/release-publish.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The token goes to curl in a header file, not on its command line.
(umask 077 && printf 'Authorization: token %s\n' "$RELEASE_TOKEN" >"$tmp/auth")

# call METHOD URL [CURL ARGS...]: the response body in $tmp/body; the HTTP status on stdout (000: no answer, with
# curl's message in $tmp/curl-err).
call() {
    method=$1
    url=$2
    shift 2
    : >"$tmp/body"
    curl -sS -o "$tmp/body" -w '%{http_code}' -X "$method" -H @"$tmp/auth" -H 'Accept: application/json' \
        "$@" "$url" 2>"$tmp/curl-err" || :
}
# The start of the last answer (or curl's complaint), printable characters only.
answer() {
    if [ -s "$tmp/body" ]; then
        head -c 2000 "$tmp/body"
    else
        head -c 2000 "$tmp/curl-err"
    fi | tr -c '[:print:]' ' ' | sed "s|$RELEASE_TOKEN|<token>|g"
}
failed() { # METHOD URL CODE
    die "$1 $2 answered ${3:-000}: $(answer)"
}
ok() { # METHOD URL [CURL ARGS...]: like call, fails unless 2xx
    code=$(call "$@")
    case $code in
    2??) ;;
    *) failed "$1" "$2" "$code" ;;
    esac
}

jq -n --arg tag "$tag" --arg name "restic-manager $tag" --rawfile body "$notes" --argjson prerelease "$prerelease" \
    '{tag_name: $tag, name: $name, body: $body, draft: false, prerelease: $prerelease}' >"$tmp/release.json"

code=$(call GET "$api/releases/tags/$tag")
case $code in
200)
    id=$(jq -r .id "$tmp/body" 2>/dev/null) || id=
    case $id in '' | *[!0-9]*) die "GET $api/releases/tags/$tag: no release id in the answer: $(answer)" ;; esac
    ok PATCH "$api/releases/$id" -H 'Content-Type: application/json' --data-binary @"$tmp/release.json"
    ;;
404)
    ok POST "$api/releases" -H 'Content-Type: application/json' --data-binary @"$tmp/release.json"
    id=$(jq -r .id "$tmp/body" 2>/dev/null) || id=
    ;;
*) failed GET "$api/releases/tags/$tag" "$code" ;;
esac
case $id in '' | *[!0-9]*) die "no release id in the answer: $(answer)" ;; esac
printf '%s: release %s: %s\n' "$me" "$id" "$server/$repo/releases/tag/$tag" >&2

for file in "$@"; do
    name=${file##*/}
    ok GET "$api/releases/$id/assets"
    old_ids=$(jq -r --arg n "$name" '.[] | select(.name == $n) | .id' "$tmp/body" 2>/dev/null) ||
        die "GET $api/releases/$id/assets: not a list of assets: $(answer)"
    for old in $old_ids; do
        case $old in *[!0-9]*) die "GET $api/releases/$id/assets: asset id $(shown "$old") is not a number" ;; esac
        ok DELETE "$api/releases/$id/assets/$old"
    done
    ok POST "$api/releases/$id/assets?name=$name" -F "attachment=@$file"
    printf '%s: attached %s\n' "$me" "$name" >&2
done
