#!/usr/bin/env bash
# Operation report ingestion benchmark (a report, not a test; `make test` does not run it).
#
# Builds the release server, runs it on 127.0.0.1 with a throw-away data dir (RM_LOG=warn), enrolls BENCH_AGENTS
# agents and drives POST /api/v1/agents/reports with wrk (bench/reports.lua): every request a batch of BENCH_BATCH
# new final reports (default 1: the hardest case, one credential check and one commit share per report). Prints a
# markdown table: reports/s, p50/p99 latency per request, errors, how many operations the server stored, and the
# server's CPU time per thread. Target: >= 2,000 reports/s with p99 < 50 ms.
#
#   scripts/bench-reports.sh
#   BENCH_DURATION=60s BENCH_CONNECTIONS=128 BENCH_AGENTS=128 BENCH_BATCH=10 scripts/bench-reports.sh
#
# Needs cargo, curl, jq and wrk; missing packages are installed with apt-get when running as root.
set -euo pipefail

DURATION=${BENCH_DURATION:-20s}
THREADS=${BENCH_THREADS:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
AGENTS=${BENCH_AGENTS:-64}
BATCH=${BENCH_BATCH:-1}
TARGET_RPS=${BENCH_TARGET_RPS:-2000}
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
for tool in curl jq wrk sqlite3; do
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
log "building the release server"
cargo build --release -p restic-manager-server >&2
bin=${CARGO_TARGET_DIR:-$repo/target}/release/restic-manager-server
[[ -x $bin ]] || die "$bin was not built"

# ---- server ----
work=$(mktemp -d "${TMPDIR:-/tmp}/rm-bench.XXXXXX")
server_pid=
cleanup() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/data/agent-binaries" "$work/bundled"
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

RM_LISTEN="127.0.0.1:$port" RM_DATA_DIR="$work/data" RM_BUNDLED_ASSETS_DIR="$work/bundled" RM_LOG=warn \
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
read -r _ first_credential <"$creds"
now=$(date +%s)
api -o /dev/null -X POST -H "Authorization: Bearer $first_credential" \
    -d "{\"reports\":[{\"id\":\"op_ffffffffffffffffffffffffffffffff\",\"plan\":\"bench\",\"kind\":\"backup\",\"trigger\":\"schedule\",\"status\":\"running\",\"started_at\":$now}]}" \
    "$base/api/v1/agents/reports" || die "a report was refused"

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
wrk_cmd=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --timeout 5s -s "$repo/bench/reports.lua" "$base"
    -- "$creds" "$THREADS" "$BATCH")
log "running: ${wrk_cmd[*]}"
TIMEFORMAT='%U %S'
{ time "${wrk_cmd[@]}" >"$work/wrk.out"; } 2>"$work/wrk.time"
thread_cpu >"$work/cpu.after"
cat "$work/wrk.out" >&2

bench=$(grep '^BENCH ' "$work/wrk.out") || die "wrk printed no BENCH line"
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" ${bench#BENCH }"; }
requests=$(field requests)
# Read beside the running server (WAL): every acknowledged report must be there.
stored=$(sqlite3 "$work/data/restic-manager.db" "SELECT count(*) FROM operations WHERE status = 'success'")
reports_per_s=$(awk -v r="$(field rps)" -v b="$BATCH" 'BEGIN { printf "%.0f", r * b }')
read -r wrk_user wrk_sys <"$work/wrk.time"
clk=$(getconf CLK_TCK)
duration_s=$(field duration_s)
# The startup notes about the platforms without a published agent are expected.
grep -v 'agent binary not published' "$work/server.log" >"$work/server.warnings" || true
warnings=$(grep -c . "$work/server.warnings" || true)

# ---- report ----
cat <<EOF

## Operation report ingestion benchmark

\`${wrk_cmd[*]}\` (credentials file and port vary per run); $(nproc) CPUs, wrk and the server on the same host.

| metric | value |
|---|---|
| reports/s | $reports_per_s |
| requests/s (batches of $BATCH) | $(field rps) |
| latency p50 | $(field p50_ms) ms |
| latency p90 | $(field p90_ms) ms |
| latency p99 | $(field p99_ms) ms |
| latency max | $(field max_ms) ms |
| requests in ${duration_s} s | $requests |
| non-2xx (HTTP status >= 400) | $(field status_errors) |
| socket errors (connect/read/write/timeout) | $(field connect_errors)/$(field read_errors)/$(field write_errors)/$(field timeouts) |
| reports sent (requests x batch; some of the last may be unanswered) | $((requests * BATCH)) |
| operations stored by the server | $stored |
| unexpected server log lines (RM_LOG=warn) | $warnings |
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

rps=$reports_per_s
p99=$(field p99_ms)
echo
if awk -v r="$rps" -v p="$p99" -v tr="$TARGET_RPS" -v tp="$TARGET_P99_MS" 'BEGIN { exit !(r >= tr && p < tp) }'; then
    echo "Target met: ${rps} reports/s >= ${TARGET_RPS} and p99 ${p99} ms < ${TARGET_P99_MS} ms."
else
    echo "TARGET MISSED: ${rps} reports/s (target >= ${TARGET_RPS}), p99 ${p99} ms (target < ${TARGET_P99_MS} ms)."
fi
if [[ $warnings -gt 0 ]]; then
    echo
    echo "Unexpected server log lines (first 5):"
    head -n 5 "$work/server.warnings"
fi
