#!/bin/sh
# Installs what `make bench` needs from Debian's packages: wrk, nginx, caddy, hyperfine, gnuplot. Needs root.
set -eu
missing=""
for pair in wrk:wrk nginx:nginx-light caddy:caddy hyperfine:hyperfine gnuplot:gnuplot-nox curl:curl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
if [ -n "$missing" ]; then
    echo "bench-tools: installing$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # a list of package names
    apt-get install -y -qq $missing >/dev/null
    # The packages start system services; the benchmark runs its own instances.
    for service in nginx caddy; do
        if command -v service >/dev/null 2>&1; then service "$service" stop >/dev/null 2>&1 || true; fi
    done
fi
