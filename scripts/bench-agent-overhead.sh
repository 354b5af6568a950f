#!/usr/bin/env bash
# Agent overhead benchmark (a report, not a test; `make test` does not run it): the wall time of a backup the agent
# runs (run-now request → `restic-manager-agent run --once`: heartbeat, configuration fetch, lease, restic, snapshot
# listing, report delivered) against the same `restic backup` run directly on the same data into a fresh repository
# of the same kind. Target: agent ≤ 1.05 × direct.
#
# Builds the release server and agent, generates BENCH_DATA_MB of incompressible data (a few large files and many
# small ones), then alternates direct and agent runs for BENCH_ROUNDS rounds after one untimed warm-up (page cache),
# each into a freshly initialised repository. Prints a markdown table with every round and the medians.
#
#   scripts/bench-agent-overhead.sh
#   BENCH_DATA_MB=2048 BENCH_ROUNDS=5 scripts/bench-agent-overhead.sh
#
# Needs cargo, curl, jq and restic (installed with apt-get when missing and running as root).
set -euo pipefail

DATA_MB=${BENCH_DATA_MB:-512}
ROUNDS=${BENCH_ROUNDS:-3}
TARGET_RATIO=${BENCH_TARGET_RATIO:-1.05}

cd "$(dirname "$0")/.."
repo=$(pwd)
log() { printf '%s\n' "$*" >&2; }
die() {
    log "bench-agent-overhead: $*"
    exit 1
}

missing=()
for tool in curl jq restic; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; install them (apt-get install -y ${missing[*]}) or run as root"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
fi

log "building the release server and agent"
cargo build --release -p restic-manager-server -p restic-manager-agent >&2
target=${CARGO_TARGET_DIR:-$repo/target}/release
server_bin=$target/restic-manager-server
agent_bin=$target/restic-manager-agent

work=$(mktemp -d "${TMPDIR:-/tmp}/rm-bench-agent.XXXXXX")
server_pid=
cleanup() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# ---- data: 3/4 in eight large files, 1/4 in 64 KiB files ----
log "generating ${DATA_MB} MiB of data"
data=$work/data
mkdir -p "$data/large" "$data/small"
large_mb=$((DATA_MB * 3 / 4 / 8))
for i in $(seq 8); do
    head -c $((large_mb * 1024 * 1024)) /dev/urandom >"$data/large/file-$i.bin"
done
small_count=$((DATA_MB * 16 / 4))
for dir in $(seq 0 15); do
    mkdir -p "$data/small/$dir"
done
head -c $((small_count * 65536)) /dev/urandom | split -b 65536 -a 5 - "$data/small/chunk-"
i=0
for f in "$data"/small/chunk-*; do
    mv "$f" "$data/small/$((i % 16))/"
    i=$((i + 1))
done
files=$(find "$data" -type f | wc -l)

# ---- server and agent ----
password="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
admin_token="bench-admin-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port=$((20000 + RANDOM % 30000))
base="http://127.0.0.1:$port"
mkdir -p "$work/server" "$work/bundled"
RM_LISTEN="127.0.0.1:$port" RM_DATA_DIR="$work/server" RM_BUNDLED_ASSETS_DIR="$work/bundled" RM_LOG=warn \
    RM_ADMIN_TOKEN="$admin_token" RM_HEARTBEAT_INTERVAL=1s "$server_bin" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 100); do
    curl -fsS --noproxy '*' -o /dev/null "$base/readyz" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || die "the server exited: $(cat "$work/server.log")"
    sleep 0.1
done
api() { curl -fsS --noproxy '*' -H 'Content-Type: application/json' -H "Authorization: Bearer $admin_token" "$@"; }
token=$(api -X POST -d '{"uses":1}' "$base/api/v1/tokens" | jq -er .token)
config=$work/agent/etc/agent.json
RM_ENROLL_TOKEN=$token "$agent_bin" enroll --server "$base" --config "$config" 2>/dev/null
agent_id=$(jq -er .agent_id "$config")
agent_repo=$work/repo-agent
api -o /dev/null -X POST "$base/api/v1/repositories" \
    -d "$(jq -n --arg url "$agent_repo" --arg pw "$password" '{name:"bench",url:$url,password:$pw}')"
api -o /dev/null -X POST "$base/api/v1/plans" -d "$(jq -n --arg p "$data" --arg a "$agent_id" \
    '{name:"bench",repository:"bench",paths:[$p],schedule:"@every 24h",jitter:"0s",agents:[$a]}')"

now_ns() { date +%s%N; }
direct_run() { # repository dir → milliseconds
    rm -rf "$1" "$work/cache-direct"
    RESTIC_PASSWORD=$password restic -r "$1" init >/dev/null 2>&1
    local t0 t1
    t0=$(now_ns)
    RESTIC_PASSWORD=$password restic -r "$1" backup --json --host bench --tag rm-plan:bench \
        --cache-dir "$work/cache-direct" "$data" >/dev/null
    t1=$(now_ns)
    echo $(((t1 - t0) / 1000000))
}
agent_run() { # → milliseconds
    rm -rf "$agent_repo"
    RESTIC_PASSWORD=$password restic -r "$agent_repo" init >/dev/null 2>&1
    local op t0 t1 status
    op=$(api -X POST -d "{\"agent\":\"$agent_id\"}" "$base/api/v1/plans/bench/run" | jq -er .operation_id)
    t0=$(now_ns)
    RM_RESTIC=$(command -v restic) "$agent_bin" run --once --config "$config" 2>>"$work/agent.log"
    t1=$(now_ns)
    status=$(api "$base/api/v1/operations?agent=$agent_id&limit=500" | jq -r --arg op "$op" \
        '.operations[] | select(.id == $op) | .status')
    [[ $status == success ]] || die "the agent's run $op ended $status: $(tail -5 "$work/agent.log")"
    echo $(((t1 - t0) / 1000000))
}

log "warm-up (untimed)"
direct_run "$work/repo-warm" >/dev/null
rm -rf "$work/repo-warm"
direct=()
agent=()
for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then
        direct+=("$(direct_run "$work/repo-direct")")
        agent+=("$(agent_run)")
    else
        agent+=("$(agent_run)")
        direct+=("$(direct_run "$work/repo-direct")")
    fi
    log "round $round: direct ${direct[-1]} ms, agent ${agent[-1]} ms"
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
direct_median=$(median "${direct[@]}")
agent_median=$(median "${agent[@]}")
ratio=$(awk -v a="$agent_median" -v d="$direct_median" 'BEGIN { printf "%.3f", a / d }')

cat <<EOF

## Agent overhead benchmark

\`scripts/bench-agent-overhead.sh\` with BENCH_DATA_MB=$DATA_MB, BENCH_ROUNDS=$ROUNDS: $files files, $(restic version | cut -d' ' -f1-2),
$(nproc) CPUs; every run into a freshly initialised local repository, direct and agent runs alternating after one
warm-up. "agent" is \`restic-manager-agent run --once\` after a run-now request: heartbeat, configuration fetch,
lease, the same \`restic backup --json\`, \`restic snapshots\` for the report, the report delivered.

| round | direct restic (ms) | agent run (ms) | ratio |
|---|---|---|---|
EOF
for i in "${!direct[@]}"; do
    awk -v r="$((i + 1))" -v d="${direct[$i]}" -v a="${agent[$i]}" 'BEGIN { printf "| %d | %d | %d | %.3f |\n", r, d, a, a / d }'
done
echo "| median | $direct_median | $agent_median | $ratio |"
echo
if awk -v r="$ratio" -v t="$TARGET_RATIO" 'BEGIN { exit !(r <= t) }'; then
    echo "Target met: agent / direct = $ratio <= $TARGET_RATIO."
else
    echo "TARGET MISSED: agent / direct = $ratio (target <= $TARGET_RATIO)."
fi
