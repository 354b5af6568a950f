#!/usr/bin/env bash
# Heartbeat throughput benchmark (a report, not a test; `make test` does not run it).
#
# Builds the release server, runs it on 127.0.0.1 with a throw-away data dir and its default log level (RM_LOG unset:
# info, so the access log is on, as an operator runs it; JSON lines, as deploy/compose.yaml, into the work dir's
# server.log), publishes a dummy linux/amd64 agent (so every heartbeat answer carries an update entry, as in
# production), enrolls BENCH_AGENTS agents and drives POST /api/v1/agents/heartbeat with wrk (bench/heartbeat.lua).
# Prints a markdown table: heartbeats/s, p50/p99 latency, errors, what the server stored and logged, and the server's
# CPU time per thread. Commands are shown relative to the repository, the work dir as $WORK and the port as $PORT.
#
#   scripts/bench-heartbeat.sh
#   BENCH_DURATION=60s BENCH_CONNECTIONS=128 BENCH_AGENTS=128 scripts/bench-heartbeat.sh
#
# BENCH_SERVER_BIN runs that server binary instead of building the release one. BENCH_PERF_DATA=FILE records the
# server with `perf record $BENCH_PERF_ARGS -p PID -o FILE` (default args: -F 499 -g) while wrk runs; perf disturbs
# the figures of such a run (bench/run.py uses it for the flame graph, after its measured runs).
#
# Needs cargo, curl, jq and wrk (and perf for BENCH_PERF_DATA); missing packages are installed with apt-get when running as root.
set -euo pipefail

DURATION=${BENCH_DURATION:-20s}
THREADS=${BENCH_THREADS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
AGENTS=${BENCH_AGENTS:-64}
TARGET_RPS=${BENCH_TARGET_RPS:-5000}
TARGET_P99_MS=${BENCH_TARGET_P99_MS:-50}

cd "$(dirname "$0")/.."
repo=$(pwd)

log() { printf '%s\n' "$*" >&2; }
die() {
    log "bench-heartbeat: $*"
    exit 1
}

# ---- tools ----
missing=()
for tool in curl jq wrk; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; install them (apt-get install -y ${missing[*]}) or run as root"
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2; then
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
    fi
fi

# ---- build ----
if [[ -n ${BENCH_SERVER_BIN:-} ]]; then
    bin=$BENCH_SERVER_BIN
    [[ -x $bin ]] || die "BENCH_SERVER_BIN=$bin is not an executable"
else
    log "building the release server"
    cargo build --release -p restic-manager-server >&2
    bin=${CARGO_TARGET_DIR:-$repo/target}/release/restic-manager-server
    [[ -x $bin ]] || die "$bin was not built"
fi

# ---- server ----
work=$(mktemp -d "${TMPDIR:-/tmp}/rm-bench.XXXXXX")
server_pid=
perf_pid=
cleanup() {
    if [[ -n $perf_pid ]] && kill -0 "$perf_pid" 2>/dev/null; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
    fi
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/data/agent-binaries" "$work/bundled"
head -c $((8 * 1024 * 1024)) /dev/urandom >"$work/data/agent-binaries/restic-manager-agent-linux-amd64"
admin_token="bench-admin-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=${BENCH_PORT:-}
if [[ -z $port ]]; then
    for _ in $(seq 50); do
        candidate=$((20000 + RANDOM % 30000))
        if ! port_in_use "$candidate"; then
            port=$candidate
            break
        fi
    done
    [[ -n $port ]] || die "found no free port"
fi
base="http://127.0.0.1:$port"

# RM_LOG is left to the server's default (info): the access log's cost belongs in the figure.
env -u RM_LOG RM_LISTEN="127.0.0.1:$port" RM_DATA_DIR="$work/data" RM_BUNDLED_ASSETS_DIR="$work/bundled" \
    RM_LOG_FORMAT=json RM_ADMIN_TOKEN="$admin_token" "$bin" 2>"$work/server.log" &
server_pid=$!

for _ in $(seq 100); do
    curl -fsS --noproxy '*' -o /dev/null "$base/readyz" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || die "the server exited: $(cat "$work/server.log")"
    sleep 0.1
done
curl -fsS --noproxy '*' -o /dev/null "$base/readyz" || die "the server did not become ready on $base"

api() { curl -fsS --noproxy '*' -H 'Content-Type: application/json' "$@"; }

# ---- agents ----
log "enrolling $AGENTS agents"
token=$(api -X POST -H "Authorization: Bearer $admin_token" -d "{\"uses\":$AGENTS,\"expires_in\":\"1h\"}" \
    "$base/api/v1/tokens" | jq -er .token)
creds="$work/credentials"
for i in $(seq "$AGENTS"); do
    body="{\"token\":\"$token\",\"hostname\":\"bench-$i\",\"os\":\"linux\",\"arch\":\"amd64\",\"version\":\"bench\",\"commit\":\"bench\"}"
    credential=$(api -X POST -d "$body" "$base/api/v1/agents/enroll" | jq -er .credential)
    printf 'bench-%s %s\n' "$i" "$credential" >>"$creds"
done
read -r first_host first_credential <"$creds"
api -o /dev/null -X POST -H "Authorization: Bearer $first_credential" \
    -d "{\"hostname\":\"$first_host\",\"os\":\"linux\",\"arch\":\"amd64\",\"version\":\"bench\",\"commit\":\"bench\",\"seq\":0}" \
    "$base/api/v1/agents/heartbeat" || die "a heartbeat was refused"

# CPU time (utime + stime, in clock ticks) of each server thread: "tid name ticks" lines.
thread_cpu() {
    local task name stat rest
    for task in /proc/"$server_pid"/task/*; do
        name=$(tr ' ' '_' <"$task/comm" 2>/dev/null) || continue
        stat=$(cat "$task/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        # shellcheck disable=SC2086 # split the fields on purpose
        set -- $rest
        printf '%s %s %s\n' "${task##*/}" "$name" $((${12} + ${13}))
    done
}
thread_cpu >"$work/cpu.before"

# ---- load ----
# A command as the report shows it: the work dir as $WORK, the port as $PORT (the script runs in the repository root).
shown() {
    local text="$*"
    text=${text//$work/\$WORK}
    text=${text//$base/http://127.0.0.1:\$PORT}
    printf '%s' "${text//-p $server_pid /-p \$PID }"
}
wrk_cmd=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --timeout 5s -s bench/heartbeat.lua "$base"
    -- "$creds" "$THREADS")
perf_cmd=()
if [[ -n ${BENCH_PERF_DATA:-} ]]; then
    command -v perf >/dev/null 2>&1 || die "BENCH_PERF_DATA is set but perf is missing (apt-get install linux-perf)"
    read -r -a perf_args <<<"${BENCH_PERF_ARGS:--F 499 -g}"
    perf_cmd=(perf record "${perf_args[@]}" -p "$server_pid" -o "$BENCH_PERF_DATA")
    log "profiling: ${perf_cmd[*]}"
    # perf gives up (ESRCH) when one of the server's threads exits while it attaches: try again.
    for attempt in 1 2 3 4 5; do
        "${perf_cmd[@]}" 2>"$work/perf.log" &
        perf_pid=$!
        sleep 0.5 # attach before the load starts
        kill -0 "$perf_pid" 2>/dev/null && break
        perf_pid=
        log "perf record failed (attempt $attempt): $(head -n 2 "$work/perf.log")"
    done
    [[ -n $perf_pid ]] || die "perf record failed: $(cat "$work/perf.log")"
fi
log "running: ${wrk_cmd[*]}"
TIMEFORMAT='%U %S'
{ time "${wrk_cmd[@]}" >"$work/wrk.out"; } 2>"$work/wrk.time"
thread_cpu >"$work/cpu.after"
if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    perf_pid=
    cat "$work/perf.log" >&2
fi
cat "$work/wrk.out" >&2

bench=$(grep '^BENCH ' "$work/wrk.out") || die "wrk printed no BENCH line"
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" ${bench#BENCH }"; }
requests=$(field requests)
stored=$(api -H "Authorization: Bearer $admin_token" "$base/api/v1/agents" | jq '[.agents[].heartbeats] | add')
stored=$((stored - 1)) # the sanity heartbeat above
read -r wrk_user wrk_sys <"$work/wrk.time"
clk=$(getconf CLK_TCK)
duration_s=$(field duration_s)
# The log: every line, the access log's (one per request), and the warnings and errors among them (the startup notes
# about the platforms without a published agent are expected).
log_lines=$(wc -l <"$work/server.log")
log_mib=$(awk -v b="$(wc -c <"$work/server.log")" 'BEGIN { printf "%.1f", b / 1048576 }')
access_lines=$(grep -c '"target":"access"' "$work/server.log" || true)
grep -E '"level":"(WARN|ERROR)"' "$work/server.log" | grep -v 'agent binary not published' >"$work/server.warnings" || true
warnings=$(grep -c . "$work/server.warnings" || true)

# ---- report ----
cat <<EOF

## Heartbeat benchmark

\`$(shown "${wrk_cmd[*]}")\` (\$WORK: the run's temporary work dir); $(nproc) CPUs, wrk and the server on the
same host. The server runs at its default log level (RM_LOG unset: info, access log on), JSON lines into
\`\$WORK/server.log\` (removed with \$WORK when the script ends).
EOF
if ((${#perf_cmd[@]})); then
    echo
    echo "Profiled run, perf disturbs these figures: \`$(shown "${perf_cmd[*]}")\` during the load."
fi
cat <<EOF

| metric | value |
|---|---|
| heartbeats/s | $(field rps) |
| latency p50 | $(field p50_ms) ms |
| latency p90 | $(field p90_ms) ms |
| latency p99 | $(field p99_ms) ms |
| latency max | $(field max_ms) ms |
| requests in ${duration_s} s | $requests |
| non-2xx (HTTP status >= 400) | $(field status_errors) |
| socket errors (connect/read/write/timeout) | $(field connect_errors)/$(field read_errors)/$(field write_errors)/$(field timeouts) |
| heartbeats stored by the server | $stored |
| server log lines (\`\$WORK/server.log\`, $log_mib MiB) | $log_lines |
| access log lines (target \`access\`) | $access_lines |
| unexpected warnings and errors in the server log | $warnings |
| wrk CPU (user+sys) | $(awk -v u="$wrk_user" -v s="$wrk_sys" 'BEGIN { printf "%.1f s", u + s }') |

Server CPU time per thread name during the run (the blocking pool's threads share the runtime workers' name;
threads that exited during the run are not counted):

| thread | threads | CPU s | % of one core |
|---|---|---|---|
EOF
awk -v clk="$clk" -v secs="$duration_s" '
    FNR == NR { before[$1] = $3; next }
    { cpu[$2] += ($3 - before[$1]) / clk; n[$2]++ }
    END {
        for (name in cpu) if (cpu[name] > 0.005) printf "| %s | %d | %.2f | %.0f%% |\n", name, n[name], cpu[name], 100 * cpu[name] / secs
    }
' "$work/cpu.before" "$work/cpu.after" | sort -t'|' -k4 -rn

rps=$(field rps)
p99=$(field p99_ms)
echo
if awk -v r="$rps" -v p="$p99" -v tr="$TARGET_RPS" -v tp="$TARGET_P99_MS" 'BEGIN { exit !(r >= tr && p < tp) }'; then
    echo "Target met: ${rps} heartbeats/s >= ${TARGET_RPS} and p99 ${p99} ms < ${TARGET_P99_MS} ms."
else
    echo "TARGET MISSED: ${rps} heartbeats/s (target >= ${TARGET_RPS}), p99 ${p99} ms (target < ${TARGET_P99_MS} ms)."
fi
if [[ $warnings -gt 0 ]]; then
    echo
    echo "Unexpected server log lines (first 5):"
    head -n 5 "$work/server.warnings"
fi
