#!/usr/bin/env bash
# Installs what the backup tests drive for real, when it is missing: Debian's restic (0.14 on bookworm, the oldest
# version the agent supports) and an S3-compatible server that runs on loopback (PyPI's moto[server], pinned, into the
# venv target/moto-venv). Idempotent; root for apt. The tests find moto_server through RM_MOTO_SERVER, this venv, or
# PATH, and restic through RM_TEST_RESTIC or PATH. The notification tests' SMTP server is PyPI's aiosmtpd (pinned,
# into target/aiosmtpd-venv), found through RM_AIOSMTPD_PYTHON or that venv.
set -euo pipefail
cd "$(dirname "$0")/.."

moto_version=5.2.5
aiosmtpd_version=1.4.6
log() { printf '==> %s\n' "$*"; }

if ! command -v restic >/dev/null 2>&1; then
    log "installing restic (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq restic
fi
log "restic: $(restic version)"

venv=target/moto-venv
if [ ! -x "$venv/bin/moto_server" ] || ! "$venv/bin/python3" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
    log "installing moto[server]==$moto_version (PyPI) into $venv"
    mkdir -p target
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$moto_version"
fi
log "moto_server: $("$venv/bin/python3" -c 'import moto; print(moto.__version__)') at $venv/bin/moto_server"

venv=target/aiosmtpd-venv
if [ ! -x "$venv/bin/python3" ] || ! "$venv/bin/python3" -c "import importlib.metadata as m, sys; sys.exit(m.version('aiosmtpd') != '$aiosmtpd_version')" 2>/dev/null; then
    log "installing aiosmtpd==$aiosmtpd_version (PyPI) into $venv"
    mkdir -p target
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "aiosmtpd==$aiosmtpd_version"
fi
log "aiosmtpd: $("$venv/bin/python3" -c 'import importlib.metadata as m; print(m.version("aiosmtpd"))') at $venv"
