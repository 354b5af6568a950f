#!/usr/bin/env python3
"""`make bench`: restic-manager-server vs nginx vs caddy on loopback, side by side in one run.

Every server serves the same files from the same directory: a 64 MiB and a 16 MiB random agent binary and a 4 KiB
install script. wrk drives each server in turn, the order rotating every round, at each concurrency, for:
  - large-file downloads (64 MiB; 16 MiB at 64 connections): bytes/s and requests/s, plus CPU seconds per GB served
    and our server's peak RSS (sampled from /proc every 50 ms);
  - the install script: requests/s and p99 latency (ours renders the server URL into it, as in production);
  - conditional revalidation with If-None-Match (304): requests/s - the agent update poll.
Then heartbeat ingestion (scripts/bench-heartbeat.sh) and `curl | sh` install time (hyperfine). Our server always
runs at its default log level (RM_LOG unset: info), so its access log is on and its cost is in the figures; its
stderr goes to a file in the work dir, and the report counts the lines. nginx runs with `access_log off` and caddy
without logs: the baseline issue 18 defines.

After the measured runs (so profiling does not disturb the figures), each scenario is run once more at 64
connections against a profiling build of our server (`cargo build --profile profiling`: release with symbols and
line tables) under `perf record`, and rendered with inferno into a flame graph; the report lists the top 15
self-time symbols of each.

Writes <out>/<date>.md, <date>.json, <date>-throughput.png and <date>-flame-<scenario>.svg. A report, not a test:
it asserts nothing. Every command in the report is relative to the repository root, with the temporary work dir as
$WORK, ports as $PORT and process ids as $PID.

Settings (environment):
  BENCH_ROUNDS          rounds of the matrix (3)
  BENCH_DURATION        seconds per wrk run (5)
  BENCH_CONCURRENCY     connection counts ("1,16,64,256")
  BENCH_SCENARIOS       which of large,script,revalidate to run (all); "large" includes the 16 MiB run
  BENCH_SKIP_EXTRAS=1   skip the heartbeat and `curl | sh` benchmarks (and the heartbeat flame graph)
  BENCH_SKIP_FLAMES=1   skip the profiling runs and flame graphs
  BENCH_HEARTBEAT_BASELINE  heartbeats/s the heartbeat target (>= 1.5x) is measured against, "VALUE" or
                        "VALUE@COMMIT" (default: HEARTBEAT_BASELINE below)
  BENCH_OUT             output directory (bench/results)
A quick subset: BENCH_DURATION=2 BENCH_ROUNDS=1 BENCH_CONCURRENCY=64 BENCH_SCENARIOS=script BENCH_SKIP_EXTRAS=1
BENCH_SKIP_FLAMES=1 python3 bench/run.py
"""

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target").resolve()
OURS_BIN = TARGET / "release/restic-manager-server"
PROFILING_BIN = TARGET / "profiling/restic-manager-server"
OUT = Path(os.environ.get("BENCH_OUT") or REPO / "bench/results").resolve()
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DURATION = int(os.environ.get("BENCH_DURATION", "5"))
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,16,64,256").split(",")]
ALL_SCENARIOS = ["large", "script", "revalidate"]
SCENARIOS = [s.strip() for s in os.environ.get("BENCH_SCENARIOS", ",".join(ALL_SCENARIOS)).split(",") if s.strip()]
SKIP_EXTRAS = os.environ.get("BENCH_SKIP_EXTRAS") == "1"
SKIP_FLAMES = os.environ.get("BENCH_SKIP_FLAMES") == "1"
MIB = 1024 * 1024
LARGE, MEDIUM = "restic-manager-agent-linux-amd64", "restic-manager-agent-linux-arm64"
ADMIN_TOKEN = "bench-admin-token-0123456789"

# Targets (issue 18). Small requests: ours / nginx at these connection counts.
SMALL_TARGET, SMALL_TARGET_CONNS = 1.0, (64, 256)
# Heartbeats: at least this many times the baseline, heartbeats/s as scripts/bench-heartbeat.sh measures it.
HEARTBEAT_TARGET = 1.5
# (heartbeats/s, the commit it was measured at) before the work on issue 18, from
# `BENCH_SERVER_BIN=<release build of 669ffd6> BENCH_DURATION=8s scripts/bench-heartbeat.sh` on the bench machine.
HEARTBEAT_BASELINE = (14106, "669ffd6")
# Large downloads must not be slower than in the previous report: its 64 MiB GB/s per connection count.
LARGE_PREVIOUS = {"report": "bench/results/2026-11-23.md", "commit": "f6409f703b45fa72c01688482f4590cd0ed343b2",
                  "note": "measured with RM_LOG=warn, access log off",
                  "gbps": {1: 2.47, 16: 3.42, 64: 2.99, 256: 2.94}}
# Flame graphs: connections and seconds of each profiling run, sampling frequency.
FLAME_CONNS, FLAME_SECONDS, PERF_FREQ = 64, min(max(DURATION, 3), 5), 499

WORK = None  # the run's temporary directory, shown as $WORK


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def portable(text):
    """Text as the report shows it: paths relative to the repository root, the work dir as $WORK, ports as $PORT."""
    text = str(text)
    if WORK is not None:
        text = text.replace(str(WORK), "$WORK")
    # The work dirs of scripts/bench-heartbeat.sh (mktemp rm-bench.XXXXXX), should one show up.
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/rm-bench[.\-_]\w+", "$WORK", text)
    for path, name in [(TARGET, "$CARGO_TARGET_DIR"), (OUT, "$BENCH_OUT")]:
        if not path.is_relative_to(REPO):
            text = text.replace(str(path), name)
    text = text.replace(str(REPO) + "/", "").replace(str(REPO), ".")
    return re.sub(r"\b(127\.0\.0\.1|localhost):\d+", r"\1:$PORT", text)


def quote(arg):
    """Shell-quotes one argument, leaving the report's placeholders ($WORK, $PORT, ...) readable as variables."""
    if re.fullmatch(r"[\w@%+=:,./$-]+", arg):
        return arg
    if "$" in arg and not re.search(r'["\\`!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def command(argv, env=None):
    """A command line for the report: `portable` arguments, shell-quoted, with its environment in front."""
    words = [f"{k}={quote(portable(v))}" for k, v in (env or {}).items()]
    return " ".join(words + [quote(portable(a)) for a in argv])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not come up")


def version_of(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def inferno_version():
    out = subprocess.run(["cargo", "install", "--list"], capture_output=True, text=True).stdout
    m = re.search(r"^inferno (v\S+):", out, re.M)
    return f"inferno {m.group(1)}" if m else "inferno (version unknown: not installed with cargo install)"


class Server:
    """A server process (stdout and stderr into <work>/<name>.log) plus the URLs of the three files on it."""

    def __init__(self, name, argv, env, paths, work, cwd=None, unset=()):
        self.name, self.paths, self.argv = name, paths, argv
        self.port = env.pop("PORT")
        self.env = env
        self.log_path = work / f"{name}.log"
        self.log = self.log_path.open("wb")
        full_env = {k: v for k, v in os.environ.items() if k not in unset}
        self.proc = subprocess.Popen(argv, env={**full_env, **env}, cwd=cwd,
                                     stdout=self.log, stderr=self.log, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_http(self.url("script"))
        except SystemExit:
            self.stop()
            raise SystemExit(f"bench: {name} did not start; its output:\n{self.log_path.read_text()[-2000:]}")

    def url(self, what):
        return self.base + self.paths[what]

    def command(self):
        """How it was started, as the report shows it."""
        return command(self.argv, self.env) + f" >{portable(self.log_path)} 2>&1"

    def pids(self):
        """The server and its children (nginx workers)."""
        pids = [self.proc.pid]
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        pids.append(int(p.name))
                except (OSError, IndexError, ValueError):
                    pass
        return pids

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def rss_kib(self):
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def start_ours(name, binary, files, work):
    """Our server at its default log level: RM_LOG (and RM_LOG_FORMAT) unset, so info, text lines, access log on."""
    data = work / f"{name}-data"
    data.mkdir()
    p = str(free_port())
    return Server(name, [str(binary)], {
        "PORT": p, "RM_LISTEN": f"127.0.0.1:{p}", "RM_DATA_DIR": str(data), "RM_BUNDLED_ASSETS_DIR": str(files),
        "RM_ADMIN_TOKEN": ADMIN_TOKEN, "RM_PUBLIC_URL": f"http://127.0.0.1:{p}",
    }, {"large": "/agent/binary?os=linux&arch=amd64", "medium": "/agent/binary?os=linux&arch=arm64",
        "script": "/install/install.sh"}, work, unset=("RM_LOG", "RM_LOG_FORMAT"))


def start_servers(files, work):
    ours = start_ours("restic-manager", OURS_BIN, files, work)

    nginx_dir = work / "nginx"
    nginx_dir.mkdir()
    p = str(free_port())
    (nginx_dir / "nginx.conf").write_text(f"""
worker_processes auto;
pid {nginx_dir}/nginx.pid;
error_log {nginx_dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    open_file_cache max=1000 inactive=60s;
    default_type application/octet-stream;
    client_body_temp_path {nginx_dir}/body;
    proxy_temp_path {nginx_dir}/proxy;
    fastcgi_temp_path {nginx_dir}/fastcgi;
    uwsgi_temp_path {nginx_dir}/uwsgi;
    scgi_temp_path {nginx_dir}/scgi;
    server {{
        listen 127.0.0.1:{p};
        root {files};
    }}
}}
""")
    nginx = Server("nginx", ["nginx", "-c", str(nginx_dir / "nginx.conf"), "-p", str(nginx_dir), "-g", "daemon off;"],
                   {"PORT": p}, {"large": f"/agent-binaries/{LARGE}", "medium": f"/agent-binaries/{MEDIUM}",
                                 "script": "/install/install.sh"}, work)

    caddy_dir = work / "caddy"
    caddy_dir.mkdir()
    p = str(free_port())
    (caddy_dir / "Caddyfile").write_text(f"""{{
    admin off
    auto_https off
}}
http://127.0.0.1:{p} {{
    root * {files}
    file_server
}}
""")
    caddy = Server("caddy", ["caddy", "run", "--config", str(caddy_dir / "Caddyfile"), "--adapter", "caddyfile"],
                   {"PORT": p, "HOME": str(caddy_dir), "XDG_DATA_HOME": str(caddy_dir), "XDG_CONFIG_HOME": str(caddy_dir)},
                   {"large": f"/agent-binaries/{LARGE}", "medium": f"/agent-binaries/{MEDIUM}",
                    "script": "/install/install.sh"}, work)
    return [ours, nginx, caddy]


def wrk_argv(url, conns, seconds, headers=(), timeout="60s"):
    threads = max(1, min(2, conns))
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", f"--timeout={timeout}", "-s",
           str(REPO / "bench/report.lua")]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    return cmd


def wrk(argv):
    """Runs wrk with bench/report.lua; its JSON line, plus seconds and the command as the report shows it."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    result["seconds"] = result["duration_us"] / 1e6
    result["command"] = command(argv)
    return result


def measured(server, fn):
    """Runs fn() while sampling the server's RSS; adds CPU seconds and peak RSS to its result."""
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], server.rss_kib())
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    cpu0 = server.cpu_seconds()
    t.start()
    result = fn()
    stop.set()
    t.join()
    result["cpu_seconds"] = server.cpu_seconds() - cpu0
    result["peak_rss_mib"] = peak[0] / 1024
    return result


def etag_of(url):
    req = urllib.request.Request(url, method="HEAD")
    return urllib.request.urlopen(req, timeout=5).headers["ETag"]


def scenario_wrk(server, scenario, conns, seconds, etag):
    """The wrk argv of one scenario against one server."""
    if scenario == "revalidate":
        return wrk_argv(server.url("script"), conns, seconds, [f"If-None-Match: {etag}"], "5s")
    if scenario == "script":
        return wrk_argv(server.url("script"), conns, seconds, timeout="5s")
    return wrk_argv(server.url(scenario), conns, seconds)


def run_matrix(servers):
    """scenario -> conns -> server name -> list of results (one per round)."""
    results = {}
    etags = {s.name: etag_of(s.url("script")) for s in servers}
    plan = []
    if "large" in SCENARIOS:
        plan += [("large", c) for c in CONCURRENCY] + [("medium", 64)]
    for scenario in ["script", "revalidate"]:
        if scenario in SCENARIOS:
            plan += [(scenario, c) for c in CONCURRENCY]
    for rnd in range(ROUNDS):
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
        for scenario, conns in plan:
            for s in order:
                argv = scenario_wrk(s, scenario, conns, DURATION, etags[s.name])
                r = measured(s, lambda: wrk(argv))
                results.setdefault(scenario, {}).setdefault(conns, {}).setdefault(s.name, []).append(r)
                log(f"round {rnd + 1}/{ROUNDS} {scenario:10} c={conns:<3} {s.name:14} "
                    f"{r['bytes'] / r['seconds'] / 1e6:9.1f} MB/s {r['requests'] / r['seconds']:10.1f} req/s "
                    f"p99 {r['p99_ms']:.2f} ms rss {r['peak_rss_mib']:.1f} MiB")
    return results


def med(rs, key):
    return statistics.median(key(r) for r in rs)


def throughput(r):
    return r["bytes"] / r["seconds"]


def rps(r):
    return r["requests"] / r["seconds"]


def cpu_per_gb(r):
    return r["cpu_seconds"] / (r["bytes"] / 1e9) if r["bytes"] else float("nan")


def log_stats(path):
    """Lines in one of our server's logs (text or JSON lines) and how many are the access log's."""
    lines = access = warnings = 0
    with open(path, "rb") as f:
        for line in f:
            lines += 1
            if b" access: " in line or b'"target":"access"' in line:
                access += 1
            elif re.search(rb"\b(WARN|ERROR)\b", line) and b"agent binary not published" not in line:
                warnings += 1
    return {"path": portable(path), "lines": lines, "access": access, "warnings": warnings,
            "mib": Path(path).stat().st_size / MIB}


def heartbeat_rps(markdown):
    """The heartbeats/s figure of scripts/bench-heartbeat.sh's markdown, or None."""
    m = re.search(r"^\| heartbeats/s \| ([\d.]+) \|", markdown, re.M)
    return float(m.group(1)) if m else None


def heartbeat_log(markdown):
    """What scripts/bench-heartbeat.sh's markdown says about the server's log, as log_stats has it."""
    def row(pattern):
        m = re.search(r"^\| " + pattern + r" \| (\d+) \|", markdown, re.M)
        return int(m.group(1)) if m else 0
    mib = re.search(r"^\| server log lines \(`[^`]*`, ([\d.]+) MiB\)", markdown, re.M)
    return {"path": "$WORK/server.log", "lines": row(r"server log lines \([^)]*\)"),
            "access": row(r"access log lines \([^)]*\)"), "mib": float(mib.group(1)) if mib else 0.0,
            "warnings": row("unexpected warnings and errors in the server log"),
            "requests": row(r"requests in [\d.]+ s")}


def heartbeat_baseline():
    """(heartbeats/s or None, where it comes from)."""
    env = os.environ.get("BENCH_HEARTBEAT_BASELINE", "").strip()
    if env:
        value, _, commit = env.partition("@")
        return float(value), f"BENCH_HEARTBEAT_BASELINE{', commit ' + commit if commit else ''}"
    value, commit = HEARTBEAT_BASELINE
    return value, f"HEARTBEAT_BASELINE in bench/run.py{', commit ' + commit if commit else ''}"


def extras(work):
    """Heartbeat ingestion and curl | sh install time."""
    out = {}
    hb_env = {"BENCH_DURATION": str(max(DURATION * 2, 10)), "BENCH_SERVER_BIN": str(OURS_BIN)}
    hb = subprocess.run([str(REPO / "scripts/bench-heartbeat.sh")], capture_output=True, text=True,
                        env={**os.environ, **hb_env})
    out["heartbeat"] = portable(hb.stdout.strip()) if hb.returncode == 0 else f"failed: {hb.stderr.strip()[-500:]}"
    out["heartbeat_command"] = command(["scripts/bench-heartbeat.sh"], hb_env)
    out["heartbeat_rps"] = heartbeat_rps(hb.stdout) if hb.returncode == 0 else None
    out["heartbeat_log"] = heartbeat_log(hb.stdout)

    bundled = work / "install-bundle"
    (bundled / "agent-binaries").mkdir(parents=True)
    (bundled / "install").mkdir()
    shutil.copy(TARGET / "release/restic-manager-agent", bundled / "agent-binaries" / LARGE)
    shutil.copy(REPO / "scripts/install.sh", bundled / "install/install.sh")
    data = work / "install-data"
    data.mkdir()
    p = str(free_port())
    server = Server("install", [str(OURS_BIN)], {
        "PORT": p, "RM_LISTEN": f"127.0.0.1:{p}", "RM_DATA_DIR": str(data), "RM_BUNDLED_ASSETS_DIR": str(bundled),
        "RM_ADMIN_TOKEN": ADMIN_TOKEN}, {"script": "/install/install.sh"}, work, unset=("RM_LOG", "RM_LOG_FORMAT"))
    prefix = work / "prefix"
    json_out = work / "hyperfine.json"
    pipeline = f"curl -fsSL {server.base}/install/install.sh | sh -s -- --prefix {prefix} --no-service"
    argv = ["hyperfine", "--warmup", "2", "--runs", "20", "--prepare", f"rm -rf {prefix}",
            "--export-json", str(json_out), "--command-name", "fresh install", pipeline,
            "--command-name", "re-run (up to date)", "--prepare", "true", pipeline]
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
        out["install"] = json.loads(json_out.read_text())["results"]
        out["install_command"] = command(argv)
        out["agent_size"] = (bundled / "agent-binaries" / LARGE).stat().st_size
        out["install_server"] = server.command()
    finally:
        server.stop()
    out["install_log"] = log_stats(server.log_path)
    return out


# ---- flame graphs ----

def perf_mode():
    """The perf record arguments: the cycles hardware event when the machine has a PMU, else cpu-clock (VMs)."""
    probe = subprocess.run(["perf", "stat", "-x,", "-e", "cycles", "true"], capture_output=True, text=True)
    event = "cycles" if probe.returncode == 0 and "<not" not in probe.stderr else "cpu-clock"
    # DWARF unwinding: the release build (std included) has no frame pointers, but it has .eh_frame.
    return ["-e", event, "-F", str(PERF_FREQ), "--call-graph", "dwarf,32768", "-m", "64M"]


def perf_report_top(data, n=15):
    """The top n self-time symbols: [(percent, "k" or ".", symbol)]."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "symbol", "--stdio",
                          "-g", "none", "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    top = []
    for line in out.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+\[(.)\]\s+(.*?)(?:\s+-\s+-)?\s*$", line)  # "- -": empty IPC columns
        if m:
            top.append((float(m.group(1)), m.group(2), m.group(3)))
    return top[:n]


def render_flame(data, svg, title, countname):
    """perf script | inferno-collapse-perf | inferno-flamegraph > svg (inferno weighs stacks by the event's period:
    nanoseconds for cpu-clock, cycles for cycles)."""
    script = subprocess.Popen(["perf", "script", "-i", str(data)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    folded = subprocess.run(["inferno-collapse-perf"], stdin=script.stdout, capture_output=True, check=True).stdout
    script.stdout.close()
    script.wait()
    with svg.open("wb") as f:
        subprocess.run(["inferno-flamegraph", "--title", title, "--countname", countname], input=folded, stdout=f,
                       check=True)
    return f"perf script -i {portable(data)} | inferno-collapse-perf | inferno-flamegraph --title {quote(title)} " \
           f"--countname {countname} >{portable(svg)}"


def record(pid, data, load, perf_args):
    """Runs load() while `perf record` is attached to pid; returns perf's summary line."""
    perf_log = data.with_suffix(".log")
    # perf opens an event per thread of the process and gives up (ESRCH) when one exits meanwhile, as the runtime's
    # idle blocking-pool threads do: try again.
    for attempt in range(5):
        with perf_log.open("wb") as errors:
            perf = subprocess.Popen(["perf", "record", *perf_args, "-p", str(pid), "-o", str(data)],
                                    stdout=errors, stderr=errors)
        time.sleep(0.5)  # attach before the load starts
        if perf.poll() is None:
            break
        log(f"perf record failed (attempt {attempt + 1}): {perf_log.read_text().strip().splitlines()[:2]}")
    else:
        raise RuntimeError(f"perf record failed: {perf_log.read_text()[-500:]}")
    try:
        load()
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=120)
    return perf_summary(perf_log.read_text())


def perf_summary(stderr):
    """perf record's own summary, e.g. "851 samples, 26.9 MB of perf data", and any lost samples it reported."""
    m = re.search(r"Captured and wrote ([\d.]+ [KMG]B) .*\((\d+) samples\)", stderr)
    lost = [l.strip() for l in stderr.splitlines() if "lost" in l.lower()]
    return (f"{m.group(2)} samples, {m.group(1)} of perf data" if m else "perf printed no summary") \
        + "".join(f"; {portable(l)}" for l in lost)


FLAME_TITLES = {"large": "64 MiB download", "script": "install script (4 KiB)", "revalidate": "304 revalidation",
                "heartbeat": "heartbeat POST"}


def flames(files, work, stamp):
    """One profiling run per scenario at FLAME_CONNS connections, after the measured runs."""
    perf_args = perf_mode()
    out = {"perf_args": perf_args, "runs": {}}
    scenarios = [s for s in ALL_SCENARIOS if s in SCENARIOS] + ([] if SKIP_EXTRAS else ["heartbeat"])
    server = start_ours("restic-manager-profiling", PROFILING_BIN, files, work) if set(scenarios) - {"heartbeat"} \
        else None
    try:
        etag = server and etag_of(server.url("script"))
        for scenario in scenarios:
            data = work / f"perf-{scenario}.data"
            svg = OUT / f"{stamp}-flame-{scenario}.svg"
            run = out["runs"][scenario] = {"svg": svg.name}
            perf_shown = command(["perf", "record", *perf_args, "-p", "PID", "-o", str(data)]).replace(
                "-p PID", "-p $PID")
            try:
                if scenario == "heartbeat":
                    hb_env = {"BENCH_SERVER_BIN": str(PROFILING_BIN), "BENCH_PERF_DATA": str(data),
                              "BENCH_PERF_ARGS": " ".join(perf_args), "BENCH_DURATION": f"{FLAME_SECONDS}s",
                              "BENCH_CONNECTIONS": str(FLAME_CONNS)}
                    log(f"profiling heartbeat ({FLAME_SECONDS}s at {FLAME_CONNS} connections)")
                    hb = subprocess.run([str(REPO / "scripts/bench-heartbeat.sh")], capture_output=True, text=True,
                                        env={**os.environ, **hb_env})
                    if hb.returncode != 0:
                        raise RuntimeError(hb.stderr.strip()[-500:])
                    run["perf"] = perf_summary(hb.stderr)
                    run["commands"] = [command(["scripts/bench-heartbeat.sh"], hb_env) + "  # runs, during its wrk:",
                                       perf_shown]
                else:
                    argv = scenario_wrk(server, scenario, FLAME_CONNS, FLAME_SECONDS, etag)
                    log(f"profiling {scenario} ({FLAME_SECONDS}s at {FLAME_CONNS} connections)")
                    run["perf"] = record(server.proc.pid, data, lambda: subprocess.run(
                        argv, capture_output=True, check=True), perf_args)
                    run["commands"] = [perf_shown + " &  # attached to our server, stopped with SIGINT after:",
                                       command(argv)]
                log(f"rendering {svg.name}")
                title = f"restic-manager-server: {FLAME_TITLES[scenario]}, {FLAME_CONNS} connections"
                countname = "ns" if "cpu-clock" in perf_args else "cycles"
                run["commands"].append(render_flame(data, svg, title, countname))
                run["commands"].append(f"perf report -i {portable(data)} --no-children --sort symbol --stdio -g none")
                run["top"] = perf_report_top(data)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                run["error"] = str(e)
                log(f"flame graph {scenario} failed: {e}")
            finally:
                data.unlink(missing_ok=True)
    finally:
        if server:
            server.stop()
            out["log"] = log_stats(server.log_path)
    return out


def plot(results, png):
    data = png.with_suffix(".dat")
    names = ["restic-manager", "nginx", "caddy"]
    with data.open("w") as f:
        for c in CONCURRENCY:
            row = [med(results["large"][c][n], throughput) / 1e9 for n in names]
            f.write(f"{c} " + " ".join(f"{v:.4f}" for v in row) + "\n")
    script = f"""
set terminal pngcairo size 900,560 font "sans,11"
set output "{png}"
set title "64 MiB agent download throughput on loopback (median of {ROUNDS} rounds, {DURATION}s each)"
set xlabel "concurrent connections"
set ylabel "GB/s"
set logscale x 2
set xrange [0.8:{max(CONCURRENCY) * 1.25}]
set xtics ({", ".join(f'"{c}" {c}' for c in CONCURRENCY)})
set yrange [0:*]
set key top left
set grid
plot "{data}" using 1:2 with linespoints lw 2 pt 7 title "restic-manager", \\
     "{data}" using 1:3 with linespoints lw 2 pt 5 title "nginx (sendfile)", \\
     "{data}" using 1:4 with linespoints lw 2 pt 9 title "caddy file_server" noenhanced
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    data.unlink()


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return f"{os.cpu_count()} CPUs ({cpu}), {int(mem) // 1024 // 1024} GiB RAM, Linux {platform.release()}"


def met(ok):
    return "met" if ok else "not met"


def demote(markdown):
    """Headings of an embedded report one level down."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.M)


def md_cell(text):
    return text.replace("|", "\\|").replace("`", "'")


def report(results, extra, flame, logs, versions, server_commands, out_md, png):
    names = ["restic-manager", "nginx", "caddy"]
    L = [f"# Benchmark {datetime.date.today()}", "",
         f"Machine: {machine()}. Everything on loopback; wrk runs on the same cores as the servers.", "",
         "Versions: " + "; ".join(f"{k}: `{v}`" for k, v in versions.items()), "",
         f"Method: each server serves the same directory (64 MiB and 16 MiB random binaries, a 4 KiB install "
         f"script). For every scenario and concurrency the three servers run in turn, the order rotating each round; "
         f"{ROUNDS} round{'s' * (ROUNDS != 1)} of {DURATION}s; figures are medians. Throughput counts every byte read, including "
         f"downloads still in flight when a run ends. CPU is user+system of the server's processes (nginx: master "
         f"and workers). Our server renders its URL into the install script on every request, as in production; "
         f"nginx and caddy serve it as a static file. Our server runs at its default log level (RM_LOG unset: "
         f"`info`), so its access log is on and its cost is in every figure (see \"Our access log\"). nginx: "
         f"`sendfile on; tcp_nopush on; open_file_cache; access_log off; worker_processes auto` (access log off: "
         f"the baseline issue 18 defines). caddy: `file_server`, logs off.", "",
         f"Scenarios: {', '.join(SCENARIOS)}; connections: {', '.join(map(str, CONCURRENCY))}"
         f"{'; heartbeat and install benchmarks skipped (BENCH_SKIP_EXTRAS=1)' if SKIP_EXTRAS else ''}"
         f"{'; flame graphs skipped (BENCH_SKIP_FLAMES=1)' if SKIP_FLAMES else ''}.", ""]

    targets = []
    if "large" in results:
        h = results["large"]
        c64 = 64 if 64 in h else CONCURRENCY[-1]
        ratio = med(h[c64]["restic-manager"], throughput) / med(h[c64]["nginx"], throughput)
        L += [f"**Headline: large-file throughput at {c64} connections, ours / nginx = {ratio:.2f}** "
              f"(target ≥ 0.80: {met(ratio >= 0.8)}).", ""]
        prev = LARGE_PREVIOUS
        for c in CONCURRENCY:
            if c in prev["gbps"]:
                now = med(h[c]["restic-manager"], throughput) / 1e9
                targets.append(f"Large downloads (64 MiB), {c} connections: {now:.2f} GB/s, previous report "
                               f"{prev['gbps'][c]:.2f} GB/s ({now / prev['gbps'][c]:.2f}×); target not slower: "
                               f"{met(now >= prev['gbps'][c])}")
    for scenario, title in [("script", "Install script (4 KiB)"), ("revalidate", "304 revalidation")]:
        if scenario not in results:
            continue
        for c in SMALL_TARGET_CONNS:
            if c in results[scenario]:
                s = results[scenario][c]
                r = med(s["restic-manager"], rps) / med(s["nginx"], rps)
                targets.append(f"{title}, {c} connections: ours/nginx {r:.2f}; target ≥ {SMALL_TARGET:.1f}×: "
                               f"{met(r >= SMALL_TARGET)}")
            else:
                targets.append(f"{title}, {c} connections: not measured (BENCH_CONCURRENCY); "
                               f"target ≥ {SMALL_TARGET:.1f}×: not measured")
    if extra:
        baseline, source = heartbeat_baseline()
        hb = extra.get("heartbeat_rps")
        if hb is None:
            targets.append(f"Heartbeats: no figure (the benchmark failed); target ≥ {HEARTBEAT_TARGET}× baseline: "
                           f"not measured")
        elif baseline is None:
            targets.append(f"Heartbeats: {hb:,.0f}/s; target ≥ {HEARTBEAT_TARGET}× baseline: baseline not set "
                           f"(HEARTBEAT_BASELINE in bench/run.py, or BENCH_HEARTBEAT_BASELINE)")
        else:
            targets.append(f"Heartbeats: {hb:,.0f}/s, baseline {baseline:,.0f}/s ({source}) = {hb / baseline:.2f}×; "
                           f"target ≥ {HEARTBEAT_TARGET}×: {met(hb >= HEARTBEAT_TARGET * baseline)}")
    L += ["## Targets", ""] + [f"- {t}" for t in targets] + [""]
    if "large" in results:
        L += [f"Previous report: `{LARGE_PREVIOUS['report']}`, server at commit "
              f"`{LARGE_PREVIOUS['commit'][:12]}` ({LARGE_PREVIOUS['note']}; figures in LARGE_PREVIOUS in "
              f"bench/run.py).", ""]

    if "large" in results:
        h = results["large"]
        L += ["## Large-file downloads (64 MiB)", "",
              "| conns | " + " | ".join(f"{n} GB/s" for n in names) + " | ours/nginx | ours previous GB/s | "
              "ours now/previous | " + " | ".join(f"{n} CPU s/GB" for n in names) + " | our peak RSS |",
              "|" + "---|" * (4 + 2 * len(names) + 1)]
        for c in CONCURRENCY:
            tp = [med(h[c][n], throughput) / 1e9 for n in names]
            cpu = [med(h[c][n], cpu_per_gb) for n in names]
            rss = max(r["peak_rss_mib"] for r in h[c]["restic-manager"])
            prev = LARGE_PREVIOUS["gbps"].get(c)
            L.append(f"| {c} | " + " | ".join(f"{v:.2f}" for v in tp) + f" | {tp[0] / tp[1]:.2f} | "
                     + (f"{prev:.2f} | {tp[0] / prev:.2f}" if prev else "– | –") + " | "
                     + " | ".join(f"{v:.2f}" for v in cpu) + f" | {rss:.1f} MiB |")
        m = results["medium"][64]
        L += ["", "16 MiB at 64 connections: " + ", ".join(
            f"{n} {med(m[n], throughput) / 1e9:.2f} GB/s" for n in names), ""]
        rss256 = max(r["peak_rss_mib"] for r in h[max(CONCURRENCY)]["restic-manager"])
        L += [f"Peak RSS of our server at {max(CONCURRENCY)} concurrent 64 MiB downloads: {rss256:.1f} MiB "
              f"(target < 64 MiB: {met(rss256 < 64)}).", "", f"![throughput]({png.name})", ""]
    for scenario, title in [("script", "Install script (4 KiB)"), ("revalidate", "Revalidation (If-None-Match → 304)")]:
        if scenario not in results:
            continue
        s = results[scenario]
        L += [f"## {title}", "", "| conns | " + " | ".join(f"{n} req/s" for n in names) + " | ours/nginx | "
              + " | ".join(f"{n} p99 ms" for n in names) + " |", "|" + "---|" * (2 + 2 * len(names))]
        for c in CONCURRENCY:
            r = [med(s[c][n], rps) for n in names]
            p99 = [med(s[c][n], lambda x: x["p99_ms"]) for n in names]
            L.append(f"| {c} | " + " | ".join(f"{v:,.0f}" for v in r) + f" | {r[0] / r[1]:.2f} | "
                     + " | ".join(f"{v:.2f}" for v in p99) + " |")
        L.append("")
        for c in SMALL_TARGET_CONNS:
            if c in s:
                ratio = med(s[c]["restic-manager"], rps) / med(s[c]["nginx"], rps)
                L.append(f"At {c} connections ours/nginx = {ratio:.2f}: target ≥ {SMALL_TARGET:.1f}×: "
                         f"{met(ratio >= SMALL_TARGET)}.  ")
            else:
                L.append(f"At {c} connections: not measured (BENCH_CONCURRENCY).  ")
        L.append("")

    L += ["## Our access log", "",
          "Our server runs with RM_LOG unset (its default, `info`: access log on) and its stderr in a file in the "
          "work dir, removed with it after the run. Lines with target `access` are the access log (one per "
          "request, written when the response ends or is abandoned).", "",
          "| run | log | format | lines | access lines | other warnings/errors | size | requests wrk completed |",
          "|---|---|---|---|---|---|---|---|"]
    for name, st, fmt, requests in logs:
        check = "" if requests is None else f"{requests:,}" + ("" if st["access"] >= requests else
                                                                " — fewer access lines: was the log on?")
        L.append(f"| {name} | `{st['path']}` | {fmt} | {st['lines']:,} | {st['access']:,} | {st['warnings']:,} | "
                 f"{st['mib']:.1f} MiB | {check or '–'} |")
    L += ["", "wrk counts completed responses only; a download cut off at the end of a run is logged too, so access "
          "lines ≥ completed requests when the log is on.", ""]

    if extra:
        hb_lines = [f"`{extra['heartbeat_command']}` (release server, 64 agents, wrk -c64):", "",
                    demote(extra["heartbeat"]), ""]
        L += ["## Heartbeat ingestion", ""] + hb_lines
        if "install" in extra:
            L += ["## `curl | sh` install, end to end", "",
                  f"`{extra['install_command']}` (agent: {extra['agent_size'] / MIB:.1f} MiB release build, "
                  f"--no-service, no enrollment; server: `{extra['install_server']}`):", "",
                  "| case | mean | min | max |", "|---|---|---|---|"]
            for r in extra["install"]:
                L.append(f"| {r['command']} | {r['mean'] * 1000:.1f} ms | {r['min'] * 1000:.1f} ms | "
                         f"{r['max'] * 1000:.1f} ms |")
            L.append("")

    if flame:
        event = flame["perf_args"][flame["perf_args"].index("-e") + 1]
        L += ["## Flame graphs", "",
              f"After the measured runs, one {FLAME_SECONDS}s run per scenario at {FLAME_CONNS} connections against "
              f"`{portable(PROFILING_BIN)}` (`cargo build --profile profiling -p restic-manager-server`: the "
              f"release profile with `debug = \"line-tables-only\"` and `strip = \"none\"`, same code, symbols and "
              f"line tables kept; the release build strips them), same settings and log level as the measured "
              f"server, with `perf record {' '.join(flame['perf_args'])}` attached to it (event `{event}`"
              f"{': no hardware PMU in this VM' if event == 'cpu-clock' else ''}; DWARF call graphs because the "
              f"build has no frame pointers; kernel.perf_event_paranoid={perf_paranoid()}). Self time is the "
              f"percentage of samples whose innermost frame is the symbol; `[k]` kernel, `[.]` user space.", ""]
        for scenario, run in flame["runs"].items():
            L += [f"### {FLAME_TITLES[scenario]}", ""]
            if "error" in run:
                L += [f"Failed: `{md_cell(portable(' '.join(run['error'].split())))[:400]}`", ""]
                continue
            L += [f"[{run['svg']}]({run['svg']}) ({run.get('perf', '')})", "", "```"] + run["commands"] + ["```", "",
                  "| self % | | symbol |", "|---|---|---|"]
            for pct, kind, sym in run["top"]:
                L.append(f"| {pct:.2f} | [{kind}] | `{md_cell(sym)[:160]}` |")
            L.append("")

    L += ["## Commands", "", "```",
          "make bench   # BENCH_ROUNDS, BENCH_DURATION, BENCH_CONCURRENCY, BENCH_SCENARIOS, BENCH_SKIP_EXTRAS, "
          "BENCH_SKIP_FLAMES, BENCH_OUT",
          "```", "", "Servers ($WORK: the run's temporary directory; $PORT: a free port per server):", "", "```"]
    L += server_commands
    L += ["```", "", "wrk command lines of the last round:", "", "```"]
    seen = {}
    for scenario in results.values():
        for per_c in scenario.values():
            for name, rs in per_c.items():
                seen.setdefault(rs[-1]["command"], []).append(name)
    L += [f"{cmd}  # {', '.join(who)}" for cmd, who in seen.items()]
    L += ["```", ""]
    out_md.write_text("\n".join(L))


def perf_paranoid():
    try:
        return Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    except OSError:
        return "unknown"


def main():
    global WORK
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        # Redraw the plot from a saved run: bench/run.py --replot bench/results/<date>.json
        saved = json.loads(Path(sys.argv[2]).read_text())
        results = {sc: {int(c): per for c, per in by_c.items()} for sc, by_c in saved.items()}
        if "large" not in results:
            raise SystemExit("bench: that run has no large-download figures to plot")
        CONCURRENCY[:] = sorted(results["large"])
        plot(results, Path(sys.argv[2]).with_name(Path(sys.argv[2]).stem + "-throughput.png"))
        return
    unknown = [s for s in SCENARIOS if s not in ALL_SCENARIOS]
    if unknown or not SCENARIOS:
        raise SystemExit(f"bench: BENCH_SCENARIOS takes a comma list of {','.join(ALL_SCENARIOS)} (got {unknown})")
    tools = ["wrk", "nginx", "caddy", "hyperfine", "gnuplot"]
    if not SKIP_FLAMES:
        tools += ["perf", "inferno-collapse-perf", "inferno-flamegraph"]
    for tool in tools:
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is missing (make bench installs it: scripts/bench-tools.sh)")
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "restic-manager-server", "-p", "restic-manager-agent"],
                   cwd=REPO, check=True)
    if not SKIP_FLAMES:
        log("building the profiling server (release with symbols and line tables)")
        subprocess.run(["cargo", "build", "--profile", "profiling", "-q", "-p", "restic-manager-server"],
                       cwd=REPO, check=True)
    versions = {
        "restic-manager": version_of([str(OURS_BIN), "--version"]),
        "nginx": version_of(["nginx", "-v"]), "caddy": version_of(["caddy", "version"]),
        "wrk": version_of(["wrk", "-v"]),
    }
    if not SKIP_FLAMES:
        versions["perf"] = version_of(["perf", "--version"])
        versions["inferno"] = inferno_version()
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    flame = None
    with tempfile.TemporaryDirectory(prefix="rm-bench-") as tmp:
        work = WORK = Path(tmp)
        os.chmod(work, 0o755)  # nginx workers run as nobody
        files = work / "files"
        (files / "agent-binaries").mkdir(parents=True)
        (files / "install").mkdir()
        (files / "agent-binaries" / LARGE).write_bytes(os.urandom(64 * MIB))
        (files / "agent-binaries" / MEDIUM).write_bytes(os.urandom(16 * MIB))
        script = ("#!/bin/sh\nRM_DEFAULT_SERVER='__RM_SERVER_URL__'\n"
                  + "# padding to 4 KiB\n" * 300)[:4096 - 10] + "\nmain\n}\n"
        (files / "install" / "install.sh").write_text(script)
        for p in files.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        servers = start_servers(files, work)
        try:
            results = run_matrix(servers)
        finally:
            for s in servers:
                s.stop()
        server_commands = [f"{s.command()}  # {s.name}" for s in servers]
        ours_requests = sum(r["requests"] for sc in results.values() for per_c in sc.values()
                            for r in per_c["restic-manager"])
        logs = [("measured runs", log_stats(servers[0].log_path), "text", ours_requests)]
        extra = {} if SKIP_EXTRAS else extras(work)
        if extra:
            logs.append(("heartbeat (scripts/bench-heartbeat.sh, its own $WORK)", extra["heartbeat_log"], "JSON",
                         extra["heartbeat_log"]["requests"]))
            logs.append(("`curl \\| sh` (hyperfine)", extra["install_log"], "text", None))
        if not SKIP_FLAMES:
            flame = flames(files, work, stamp)
            if "log" in flame:
                logs.append(("flame graphs (profiling build)", flame["log"], "text", None))
    png = OUT / f"{stamp}-throughput.png"
    if "large" in results:
        plot(results, png)
    md = OUT / f"{stamp}.md"
    report(results, extra, flame, logs, versions, server_commands, md, png)
    (OUT / f"{stamp}.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {md}" + (f" and {png}" if "large" in results else ""))
    print(md.read_text())


if __name__ == "__main__":
    main()
