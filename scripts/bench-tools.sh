#!/bin/sh
# Installs what `make bench` needs: wrk, nginx, caddy, hyperfine, gnuplot, curl and perf (linux-perf) from Debian's
# packages, and inferno (inferno-collapse-perf, inferno-flamegraph: the flame graphs) with cargo. Needs root.
set -eu
missing=""
for pair in wrk:wrk nginx:nginx-light caddy:caddy hyperfine:hyperfine gnuplot:gnuplot-nox curl:curl perf:linux-perf; do
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
if ! command -v inferno-collapse-perf >/dev/null 2>&1 || ! command -v inferno-flamegraph >/dev/null 2>&1; then
    echo "bench-tools: installing inferno (cargo install inferno --locked)" >&2
    cargo install --quiet inferno --locked
fi
