#!/bin/sh
# Computes the version compiled into the binaries and the image tags of a release, for the release workflow.
#
# usage: scripts/release-tags.sh REF              a tag push; REF is refs/tags/vX.Y.Z[-PRE] or the bare tag
#        scripts/release-tags.sh --dispatch SHA   a manual dispatch at commit SHA (7 to 40 hex digits)
#
# Prints exactly two lines on stdout, ready to append to $GITHUB_OUTPUT:
#   version=<version>
#   tags=<space-separated image tags>
#
#   vX.Y.Z           version X.Y.Z, tags vX.Y.Z X.Y X, plus latest when X >= 1
#   vX.Y.Z-PRE       a SemVer 2.0.0 pre-release: version X.Y.Z-PRE, tag vX.Y.Z-PRE only
#   --dispatch SHA   version 0.0.0-snapshot-<sha7>, tag snapshot-<sha7> (the first 7 hex digits, lowercase)
#
# X, Y and Z are decimal without leading zeros; PRE is dot-separated identifiers of [0-9A-Za-z-], numeric ones
# without leading zeros. Anything else is refused, including build metadata (+...), which a Docker tag cannot carry:
# a message on stderr, nothing at all on stdout, exit 1 (exit 2 for a wrong number of arguments or an unknown
# option). The input is never evaluated, and it is echoed in messages only with unsafe characters replaced by '?'.
# Every tag printed matches Docker's tag grammar [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
set -eu
LC_ALL=C
export LC_ALL

expected='expected refs/tags/vX.Y.Z, vX.Y.Z or a SemVer pre-release vX.Y.Z-PRE (e.g. v1.2.3, v1.2.3-rc.1), or --dispatch SHA'

usage() {
    echo "usage: $0 REF | $0 --dispatch SHA   (REF: refs/tags/vX.Y.Z[-PRE] or vX.Y.Z[-PRE])" >&2
    exit 2
}
die() { printf 'release-tags: %s\n' "$*" >&2; exit 1; }

# Untrusted text for a message: quoted, characters outside a safe set (newlines included) as '?', at most 100.
shown() { printf "'%s'" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._/+-' '?' | cut -c1-100)"; }

# A SemVer numeric identifier: 0, or decimal digits without a leading zero.
numeric() {
    case $1 in
    0) return 0 ;;
    '' | 0* | *[!0-9]*) return 1 ;;
    esac
}

# Prints the result once everything is known, after checking each tag against Docker's grammar.
emit() { # VERSION TAGS
    for t in $2; do
        case $t in
        [!A-Za-z0-9_]* | *[!A-Za-z0-9_.-]*) die "internal error: $(shown "$t") is not a valid Docker tag" ;;
        esac
        [ "${#t}" -le 128 ] || die "internal error: $(shown "$t") is longer than a Docker tag may be (128)"
    done
    printf 'version=%s\ntags=%s\n' "$1" "$2"
}

dispatch() { # SHA
    sha=$1
    case $sha in
    '' | *[!0-9A-Fa-f]*) die "--dispatch needs a commit SHA of 7 to 40 hex digits, got $(shown "$sha")" ;;
    esac
    if [ "${#sha}" -lt 7 ] || [ "${#sha}" -gt 40 ]; then
        die "--dispatch needs a commit SHA of 7 to 40 hex digits, got ${#sha} digits"
    fi
    rest=${sha#???????}
    short=$(printf '%s' "${sha%"$rest"}" | tr 'A-F' 'a-f')
    emit "0.0.0-snapshot-$short" "snapshot-$short"
}

release() { # REF
    ref=$1
    case $ref in
    '') die "empty ref; $expected" ;;
    refs/tags/*) tag=${ref#refs/tags/} ;;
    refs/heads/*) die "$(shown "$ref") is a branch; releases are built from tags ($expected)" ;;
    refs/*) die "$(shown "$ref") is not a tag ref; $expected" ;;
    *) tag=$ref ;;
    esac
    case $tag in
    '') die "empty tag in $(shown "$ref"); $expected" ;;
    *[!A-Za-z0-9.+-]*) die "tag $(shown "$tag") has characters a release tag cannot have; $expected" ;;
    *+*) die "tag $(shown "$tag") carries build metadata (+...), which a Docker tag cannot hold; tag the release without it" ;;
    v*) ;;
    [0-9]*) die "tag $(shown "$tag") lacks the leading v; $expected" ;;
    *) die "tag $(shown "$tag") is not a release tag; $expected" ;;
    esac

    version=${tag#v}
    case $version in
    *-*)
        core=${version%%-*}
        pre=${version#*-}
        [ -n "$pre" ] || die "tag $(shown "$tag") has an empty pre-release after '-'; $expected"
        ;;
    *)
        core=$version
        pre=
        ;;
    esac

    case $core in
    *.*.*.*) die "tag $(shown "$tag") has more than three version numbers; $expected" ;;
    *.*.*) ;;
    *) die "tag $(shown "$tag") needs three version numbers X.Y.Z; $expected" ;;
    esac
    x=${core%%.*}
    yz=${core#*.}
    y=${yz%%.*}
    z=${yz#*.}
    for n in "$x" "$y" "$z"; do
        numeric "$n" || die "tag $(shown "$tag"): X, Y and Z must be decimal numbers without leading zeros; $expected"
    done

    if [ -n "$pre" ]; then
        rest=$pre
        while :; do
            id=${rest%%.*}
            case $id in
            '') die "tag $(shown "$tag") has an empty pre-release identifier; $expected" ;;
            *[!0-9]*) ;; # alphanumeric: [0-9A-Za-z-] is all that is left after the character check above
            *) numeric "$id" || die "tag $(shown "$tag"): numeric pre-release identifier $id has a leading zero" ;;
            esac
            case $rest in
            *.*) rest=${rest#*.} ;;
            *) break ;;
            esac
        done
    fi

    [ "${#tag}" -le 128 ] || die "tag $(shown "$tag") is longer than a Docker tag may be (128 characters)"

    if [ -n "$pre" ]; then
        tags=$tag
    else
        tags="$tag $x.$y $x"
        [ "$x" = 0 ] || tags="$tags latest"
    fi
    emit "$version" "$tags"
}

case $# in
1)
    case $1 in
    --dispatch) usage ;;
    -*) echo "release-tags: unknown option $(shown "$1")" >&2; usage ;;
    esac
    release "$1"
    ;;
2)
    [ "$1" = --dispatch ] || usage
    dispatch "$2"
    ;;
*) usage ;;
esac
