#!/bin/sh
# Reads, checks and writes the deploy pin file, deploy/image-pin.env: the server image deploy/compose.yaml runs,
# pinned by digest. The file holds `#` comment lines, empty lines and exactly one line
#   RM_IMAGE=NAME@sha256:<64 lowercase hex digits>
# where NAME is a Docker repository name (an optional registry host[:port], then lowercase path components
# [a-z0-9]+([._-][a-z0-9]+)* separated by /) without a tag, and the value has no quotes and nothing after the digest.
# The file is parsed as data here; it is never sourced or evaluated by a shell.
#
# usage: scripts/image-pin.sh check [FILE]     exit 0 when FILE is valid (default: deploy/image-pin.env of this
#                                              repo); the all-zero placeholder digest passes with a warning
#        scripts/image-pin.sh get [FILE]       check, then print the RM_IMAGE value on stdout
#        scripts/image-pin.sh set FILE REF     check REF, then replace the RM_IMAGE line of FILE keeping every other
#                                              line, or create FILE with a comment header. Written to a temp file in
#                                              FILE's directory and renamed over FILE (mode kept); on any failure
#                                              FILE is left as it was and no temp file remains.
#
# Problems go to stderr as "image-pin: FILE:LINE: why" and exit 1; usage errors exit 2.
set -eu
LC_ALL=C
export LC_ALL

root=$(cd "$(dirname "$0")/.." && pwd)
zeros=0000000000000000000000000000000000000000000000000000000000000000
form='NAME@sha256:<64 lowercase hex digits>'
tab=$(printf '\t')
cr=$(printf '\r')

usage() {
    echo "usage: $0 check [FILE] | $0 get [FILE] | $0 set FILE REF   (FILE defaults to deploy/image-pin.env)" >&2
    exit 2
}
die() { printf 'image-pin: %s\n' "$*" >&2; exit 1; }
# Reports a problem at WHERE (FILE:LINE, FILE or REF) and remembers that there was one.
problem() { printf 'image-pin: %s: %s\n' "$1" "$2" >&2; bad=1; }
# Untrusted text for a message: quoted, characters outside a safe set (newlines included) as '?', at most 100.
shown() { printf "'%s'" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._:/@+=-' '?' | cut -c1-100)"; }

# host_ok HOST[:PORT]: a registry host: dot-separated labels [A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?, optional port.
host_ok() {
    h=$1
    case $h in
    *:*)
        port=${h#*:}
        h=${h%%:*}
        case $port in '' | *[!0-9]*) return 1 ;; esac
        [ "${#port}" -le 5 ] || return 1
        ;;
    esac
    while :; do
        hlabel=${h%%.*}
        case $hlabel in '' | *[!A-Za-z0-9-]* | -* | *-) return 1 ;; esac
        case $h in
        *.*) h=${h#*.} ;;
        *) break ;;
        esac
    done
}

# repo_name NAME: a Docker repository name: [host[:port]/]component(/component)*, as in the header.
repo_name() {
    n=$1
    [ "${#n}" -le 255 ] || return 1
    case $n in
    */*)
        first=${n%%/*}
        # Docker's rule: a first component with a '.' or ':', or localhost, is a registry host.
        case $first in
        localhost | *.* | *:*)
            host_ok "$first" || return 1
            n=${n#*/}
            ;;
        esac
        ;;
    esac
    while :; do
        comp=${n%%/*}
        case $comp in
        '' | *[!a-z0-9._-]* | [._-]* | *[._-] | *[._-][._-]*) return 1 ;;
        esac
        case $n in
        */*) n=${n#*/} ;;
        *) break ;;
        esac
    done
}

# check_ref VALUE WHERE: returns 0 when VALUE is NAME@sha256:<64 lowercase hex>; otherwise reports the first reason
# at WHERE and returns 1. Sets placeholder=1 for the all-zero digest.
check_ref() {
    v=$1
    where=$2
    placeholder=0
    case $v in
    '') problem "$where" "RM_IMAGE is empty; pin a digest: $form" ;;
    *"$cr"*) problem "$where" "RM_IMAGE has a carriage return (CRLF line ending?); use LF line endings" ;;
    *\"* | *\'*) problem "$where" "RM_IMAGE is quoted; write the value without quotes: RM_IMAGE=$form" ;;
    *'$'* | *'`'*) problem "$where" "RM_IMAGE contains '\$' or a backtick; the value must be a literal $form" ;;
    *" " | *"$tab") problem "$where" "RM_IMAGE has trailing whitespace; nothing may follow the digest" ;;
    *" "* | *"$tab"*) problem "$where" "RM_IMAGE has whitespace in it; expected RM_IMAGE=$form" ;;
    *[!A-Za-z0-9._:/@-]*) problem "$where" "RM_IMAGE has characters no image reference has: $(shown "$v")" ;;
    *@*@*) problem "$where" "RM_IMAGE has more than one '@': $(shown "$v"); expected $form" ;;
    *@*) ;;
    *)
        case ${v##*/} in
        *:*) problem "$where" "RM_IMAGE is pinned by tag ($(shown "$v")); pin a digest: $form" ;;
        *) problem "$where" "RM_IMAGE has no digest ($(shown "$v")); pin a digest: $form" ;;
        esac
        ;;
    esac
    [ "$bad" -eq 0 ] || return 1

    name=${v%@*}
    digest=${v#*@}
    case $digest in
    sha256:*) hex=${digest#sha256:} ;;
    *)
        problem "$where" "RM_IMAGE digest $(shown "$digest") is not sha256:<64 lowercase hex digits>"
        return 1
        ;;
    esac
    case $hex in
    '' | *[!0-9A-Fa-f]*) problem "$where" "RM_IMAGE digest is not sha256:<64 lowercase hex digits>: $(shown "$digest")" ;;
    *[A-F]*) problem "$where" "RM_IMAGE digest has uppercase hex digits; write it in lowercase" ;;
    *) [ "${#hex}" -eq 64 ] || problem "$where" "RM_IMAGE digest has ${#hex} hex digits; a sha256 digest has 64" ;;
    esac
    [ "$bad" -eq 0 ] || return 1

    case ${name##*/} in
    *:*)
        problem "$where" "RM_IMAGE is pinned by tag as well as digest ($(shown "$name")); drop the tag: $form"
        return 1
        ;;
    esac
    if ! repo_name "$name"; then
        problem "$where" "RM_IMAGE name $(shown "$name") is not a repository name ([host[:port]/]lowercase/path)"
        return 1
    fi
    [ "$hex" != "$zeros" ] || placeholder=1
}

# check_file FILE [NAME]: checks every line of FILE, reporting each problem as NAME:LINE (NAME defaults to FILE). Sets
# value (the RM_IMAGE value) and pin_line (its line number); placeholder=1 for the all-zero digest. 1 on problems.
check_file() {
    f=$1
    label=${2:-$1}
    bad=0
    found=0
    lineno=0
    value=
    pin_line=
    pin_placeholder=0
    if [ ! -e "$f" ]; then
        problem "$label" "no such file"
        return 1
    fi
    if [ ! -f "$f" ] || [ ! -r "$f" ]; then
        problem "$label" "not a readable regular file"
        return 1
    fi
    while IFS= read -r line || [ -n "$line" ]; do
        lineno=$((lineno + 1))
        at="$label:$lineno"
        case $line in
        '' | '#'*) ;;
        RM_IMAGE=*)
            found=$((found + 1))
            if [ "$found" -gt 1 ]; then
                problem "$at" "duplicate RM_IMAGE line (the first is line $pin_line); keep exactly one"
            else
                pin_line=$lineno
                value=${line#RM_IMAGE=}
                was_bad=$bad
                bad=0
                check_ref "$value" "$at" || :
                pin_placeholder=$placeholder
                [ "$was_bad" -eq 0 ] || bad=1
            fi
            ;;
        *"$cr") problem "$at" "carriage return at the end of the line (CRLF line endings?); use LF line endings" ;;
        'RM_IMAGE '* | "RM_IMAGE$tab"*) problem "$at" "whitespace around '='; write RM_IMAGE=$form" ;;
        ' '* | "$tab"*) problem "$at" "leading whitespace; comments start with # in the first column" ;;
        'export '*) problem "$at" "'export' is not allowed here; write RM_IMAGE=$form" ;;
        *=*)
            key=${line%%=*}
            case $key in
            '' | [0-9]* | *[!A-Za-z0-9_]*) problem "$at" "unexpected line; expected # comments, empty lines and one RM_IMAGE=$form" ;;
            *) problem "$at" "unexpected setting $key; this file holds RM_IMAGE only" ;;
            esac
            ;;
        *) problem "$at" "unexpected line; expected # comments, empty lines and one RM_IMAGE=$form" ;;
        esac
    done <"$f"
    [ "$found" -gt 0 ] || problem "$label" "no RM_IMAGE line; add one: RM_IMAGE=$form"
    placeholder=$pin_placeholder
    return "$bad"
}

warn_placeholder() { # WHERE
    printf 'image-pin: warning: %s: no release pinned yet (all-zero placeholder digest); the release workflow or scripts/upgrade.sh records one\n' "$1" >&2
}

tmp=
cleanup() { if [ -n "$tmp" ]; then rm -f "$tmp"; fi; }
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

set_pin() { # FILE REF
    file=$1
    ref=$2
    bad=0
    check_ref "$ref" REF || die "$file left unchanged"
    case $file in
    '') die "empty FILE" ;;
    */*) dir=${file%/*} ;;
    *) dir=. ;;
    esac
    [ -n "$dir" ] || dir=/
    [ -d "$dir" ] || die "$file: directory $dir does not exist"
    [ ! -L "$file" ] || die "$file is a symlink; pass the file it points to"
    if [ -e "$file" ] && [ ! -f "$file" ]; then die "$file is not a regular file"; fi

    tmp=$(mktemp "$dir/.image-pin.XXXXXX") || die "cannot create a temp file in $dir"
    if [ -e "$file" ]; then
        cp -p "$file" "$tmp" # FILE's mode (and owner, where allowed) for the replacement
        count=0
        while IFS= read -r line || [ -n "$line" ]; do
            case $line in
            RM_IMAGE=*)
                count=$((count + 1))
                printf 'RM_IMAGE=%s\n' "$ref"
                ;;
            *) printf '%s\n' "$line" ;;
            esac
        done <"$file" >"$tmp"
        [ "$count" -le 1 ] || die "$file has $count RM_IMAGE lines; keep one by hand, then run set again ($file left unchanged)"
        [ "$count" -eq 1 ] || printf 'RM_IMAGE=%s\n' "$ref" >>"$tmp"
    else
        cat >"$tmp" <<EOF
# The restic-manager server image deploy/compose.yaml runs, pinned by digest (never by tag).
# Written by scripts/image-pin.sh set; checked by scripts/image-pin.sh check. Read as data, never sourced.
RM_IMAGE=$ref
EOF
        chmod "$(printf '%o' $((0666 & ~0$(umask))))" "$tmp"
    fi
    # The whole result must pass, so a file with other problems is not silently rewritten.
    bad=0
    if ! check_file "$tmp" "$file"; then
        die "$file left unchanged: with the new RM_IMAGE it would still not pass check"
    fi
    mv -f "$tmp" "$file"
    tmp=
    printf 'image-pin: %s: RM_IMAGE=%s\n' "$file" "$ref" >&2
    [ "$placeholder" -eq 0 ] || warn_placeholder "$file:$pin_line"
}

case ${1:-} in
check | get)
    [ $# -le 2 ] || usage
    if [ $# -eq 2 ]; then file=$2; else file="$root/deploy/image-pin.env"; fi
    check_file "$file" || exit 1
    [ "$placeholder" -eq 0 ] || warn_placeholder "$file:$pin_line"
    [ "$1" = check ] || printf '%s\n' "$value"
    ;;
set)
    [ $# -eq 3 ] || usage
    set_pin "$2" "$3"
    ;;
*) usage ;;
esac
