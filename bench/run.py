#!/usr/bin/env python3
"""`make bench`: restic-manager-server vs nginx vs caddy on loopback, side by side in one run.

Every server serves the same files from the same directory: a 64 MiB and a 16 MiB random agent binary and a 4 KiB
install script. wrk drives each server in turn, the order rotating every round, at each concurrency, for:
  - large-file downloads (64 MiB; 16 MiB at 64 connections): bytes/s and requests/s, plus CPU seconds per GB served
    and our server's peak RSS (sampled from /proc every 50 ms);
  - the install script: requests/s and p99 latency (ours renders the server URL into it, as in production);
  - conditional revalidation with If-None-Match (304): requests/s - the agent update poll.
Then heartbeat ingestion (scripts/bench-heartbeat.sh) and `curl | sh` install time (hyperfine).

Writes bench/results/<date>.md and bench/results/<date>-throughput.png. A report, not a test: it asserts nothing.
Settings: BENCH_ROUNDS (3), BENCH_DURATION seconds per run (5), BENCH_CONCURRENCY ("1,16,64,256"),
BENCH_SKIP_EXTRAS=1 to skip the heartbeat and install benchmarks.
"""

import datetime
import json
import os
import platform
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
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DURATION = int(os.environ.get("BENCH_DURATION", "5"))
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,16,64,256").split(",")]
MIB = 1024 * 1024
LARGE, MEDIUM = "restic-manager-agent-linux-amd64", "restic-manager-agent-linux-arm64"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


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


class Server:
    """A server process plus the URLs of the three files on it."""

    def __init__(self, name, argv, env, paths, cwd=None):
        self.name, self.paths = name, paths
        self.port = env.pop("PORT")
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=cwd,
                                     stdout=self.log, stderr=self.log, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_http(self.url("script"))
        except SystemExit:
            self.stop()
            raise SystemExit(f"bench: {name} did not start; its output:\n{Path(self.log.name).read_text()[-2000:]}")

    def url(self, what):
        return self.base + self.paths[what]

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
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_servers(files, work):
    ours_bin = REPO / "target/release/restic-manager-server"
    data = work / "data"
    data.mkdir()
    ours = Server("restic-manager", [str(ours_bin)], {
        "PORT": (p := str(free_port())), "RM_LISTEN": f"127.0.0.1:{p}", "RM_DATA_DIR": str(data),
        "RM_BUNDLED_ASSETS_DIR": str(files), "RM_LOG": "warn", "RM_ADMIN_TOKEN": "bench-admin-token-0123456789",
        "RM_PUBLIC_URL": f"http://127.0.0.1:{p}",
    }, {"large": "/agent/binary?os=linux&arch=amd64", "medium": "/agent/binary?os=linux&arch=arm64",
        "script": "/install/install.sh"})

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
                                 "script": "/install/install.sh"})

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
                    "script": "/install/install.sh"})
    return [ours, nginx, caddy]


def wrk(url, conns, seconds, headers=(), timeout="60s"):
    threads = max(1, min(2, conns))
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", f"--timeout={timeout}", "-s",
           str(REPO / "bench/report.lua")]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    result = json.loads(line)
    result["seconds"] = result["duration_us"] / 1e6
    result["command"] = " ".join(cmd)
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


def run_matrix(servers):
    """scenario -> conns -> server name -> list of results (one per round)."""
    results = {}
    etags = {s.name: etag_of(s.url("script")) for s in servers}
    plan = [("large", c) for c in CONCURRENCY] + [("medium", 64)] \
        + [("script", c) for c in CONCURRENCY] + [("revalidate", c) for c in CONCURRENCY]
    for rnd in range(ROUNDS):
        order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
        for scenario, conns in plan:
            for s in order:
                if scenario == "revalidate":
                    fn = lambda: wrk(s.url("script"), conns, DURATION, [f"If-None-Match: {etags[s.name]}"], "5s")
                elif scenario == "script":
                    fn = lambda: wrk(s.url("script"), conns, DURATION, timeout="5s")
                else:
                    fn = lambda: wrk(s.url(scenario), conns, DURATION)
                r = measured(s, fn)
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


def extras(work):
    """Heartbeat ingestion and curl | sh install time."""
    out = {}
    hb = subprocess.run([str(REPO / "scripts/bench-heartbeat.sh")], capture_output=True, text=True,
                        env={**os.environ, "BENCH_DURATION": str(max(DURATION * 2, 10))})
    out["heartbeat"] = hb.stdout.strip() if hb.returncode == 0 else f"failed: {hb.stderr.strip()[-500:]}"

    bundled = work / "install-bundle"
    (bundled / "agent-binaries").mkdir(parents=True)
    (bundled / "install").mkdir()
    shutil.copy(REPO / "target/release/restic-manager-agent", bundled / "agent-binaries" / LARGE)
    shutil.copy(REPO / "scripts/install.sh", bundled / "install/install.sh")
    data = work / "install-data"
    data.mkdir()
    p = str(free_port())
    server = Server("install", [str(REPO / "target/release/restic-manager-server")], {
        "PORT": p, "RM_LISTEN": f"127.0.0.1:{p}", "RM_DATA_DIR": str(data), "RM_BUNDLED_ASSETS_DIR": str(bundled),
        "RM_LOG": "warn", "RM_ADMIN_TOKEN": "bench-admin-token-0123456789"}, {"script": "/install/install.sh"})
    prefix = work / "prefix"
    json_out = work / "hyperfine.json"
    pipeline = f"curl -fsSL {server.base}/install/install.sh | sh -s -- --prefix {prefix} --no-service"
    try:
        subprocess.run(["hyperfine", "--warmup", "2", "--runs", "20", "--prepare", f"rm -rf {prefix}",
                        "--export-json", str(json_out), "--command-name", "fresh install", pipeline,
                        "--command-name", "re-run (up to date)", "--prepare", "true", pipeline],
                       check=True, capture_output=True, text=True)
        out["install"] = json.loads(json_out.read_text())["results"]
        out["install_command"] = f"hyperfine --warmup 2 --runs 20 --prepare 'rm -rf PREFIX' '{pipeline}'"
        out["agent_size"] = (bundled / "agent-binaries" / LARGE).stat().st_size
    finally:
        server.stop()
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


def report(results, extra, versions, out_md, png):
    names = ["restic-manager", "nginx", "caddy"]
    L = [f"# Benchmark {datetime.date.today()}", "",
         f"Machine: {machine()}. Everything on loopback; wrk runs on the same cores as the servers.", "",
         "Versions: " + "; ".join(f"{k}: `{v}`" for k, v in versions.items()), "",
         f"Method: each server serves the same directory (64 MiB and 16 MiB random binaries, a 4 KiB install "
         f"script). For every scenario and concurrency the three servers run in turn, the order rotating each round; "
         f"{ROUNDS} rounds of {DURATION}s; figures are medians. Throughput counts every byte read, including "
         f"downloads still in flight when a run ends. CPU is user+system of the server's processes (nginx: master "
         f"and workers). Our server renders its URL into the install script on every request, as in production; "
         f"nginx and caddy serve it as a static file. nginx: `sendfile on; tcp_nopush on; open_file_cache; "
         f"access_log off; worker_processes auto`. caddy: `file_server`, logs off.", ""]
    h = results["large"]
    c64 = 64 if 64 in h else CONCURRENCY[-1]
    ratio = med(h[c64]["restic-manager"], throughput) / med(h[c64]["nginx"], throughput)
    L += [f"**Headline: large-file throughput at {c64} connections, ours / nginx = {ratio:.2f}** "
          f"(target ≥ 0.80: {'met' if ratio >= 0.8 else 'NOT met'}).", ""]
    L += ["## Large-file downloads (64 MiB)", "",
          "| conns | " + " | ".join(f"{n} GB/s" for n in names) + " | ours/nginx | "
          + " | ".join(f"{n} CPU s/GB" for n in names) + " | our peak RSS |",
          "|" + "---|" * (2 + 2 * len(names) + 1)]
    for c in CONCURRENCY:
        tp = [med(h[c][n], throughput) / 1e9 for n in names]
        cpu = [med(h[c][n], cpu_per_gb) for n in names]
        rss = max(r["peak_rss_mib"] for r in h[c]["restic-manager"])
        L.append(f"| {c} | " + " | ".join(f"{v:.2f}" for v in tp) + f" | {tp[0] / tp[1]:.2f} | "
                 + " | ".join(f"{v:.2f}" for v in cpu) + f" | {rss:.1f} MiB |")
    m = results["medium"][64]
    L += ["", "16 MiB at 64 connections: " + ", ".join(
        f"{n} {med(m[n], throughput) / 1e9:.2f} GB/s" for n in names), ""]
    rss256 = max(r["peak_rss_mib"] for r in h[max(CONCURRENCY)]["restic-manager"])
    L += [f"Peak RSS of our server at {max(CONCURRENCY)} concurrent 64 MiB downloads: {rss256:.1f} MiB "
          f"(target < 64 MiB: {'met' if rss256 < 64 else 'NOT met'}).", ""]
    for scenario, title in [("script", "Install script (4 KiB)"), ("revalidate", "Revalidation (If-None-Match → 304)")]:
        s = results[scenario]
        L += [f"## {title}", "", "| conns | " + " | ".join(f"{n} req/s" for n in names) + " | ours/nginx | "
              + " | ".join(f"{n} p99 ms" for n in names) + " |", "|" + "---|" * (2 + 2 * len(names))]
        for c in CONCURRENCY:
            r = [med(s[c][n], rps) for n in names]
            p99 = [med(s[c][n], lambda x: x["p99_ms"]) for n in names]
            L.append(f"| {c} | " + " | ".join(f"{v:,.0f}" for v in r) + f" | {r[0] / r[1]:.2f} | "
                     + " | ".join(f"{v:.2f}" for v in p99) + " |")
        L.append("")
    L += [f"![throughput]({png.name})", ""]
    if extra:
        L += ["## Heartbeat ingestion", "", "`scripts/bench-heartbeat.sh` (release server, 64 agents, wrk -c64):", "",
              extra["heartbeat"], ""]
        if "install" in extra:
            L += ["## `curl | sh` install, end to end", "",
                  f"`{extra['install_command']}` (agent: {extra['agent_size'] / MIB:.1f} MiB release build, "
                  f"--no-service, no enrollment):", "", "| case | mean | min | max |", "|---|---|---|---|"]
            for r in extra["install"]:
                L.append(f"| {r['command']} | {r['mean'] * 1000:.1f} ms | {r['min'] * 1000:.1f} ms | "
                         f"{r['max'] * 1000:.1f} ms |")
            L.append("")
    L += ["## Commands", "", "```", "make bench   # BENCH_ROUNDS, BENCH_DURATION, BENCH_CONCURRENCY, BENCH_SKIP_EXTRAS",
          "```", "", "wrk command lines of the last round:", "", "```"]
    seen = set()
    for scenario in results.values():
        for per_c in scenario.values():
            for rs in per_c.values():
                if rs[-1]["command"] not in seen:
                    seen.add(rs[-1]["command"])
                    L.append(rs[-1]["command"])
    L += ["```", ""]
    out_md.write_text("\n".join(L))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        # Redraw the plot from a saved run: bench/run.py --replot bench/results/<date>.json
        saved = json.loads(Path(sys.argv[2]).read_text())
        results = {sc: {int(c): per for c, per in by_c.items()} for sc, by_c in saved.items()}
        CONCURRENCY[:] = sorted(results["large"])
        plot(results, Path(sys.argv[2]).with_name(Path(sys.argv[2]).stem + "-throughput.png"))
        return
    for tool in ["wrk", "nginx", "caddy", "hyperfine", "gnuplot"]:
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is missing (make bench installs it with apt)")
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "restic-manager-server", "-p", "restic-manager-agent"],
                   cwd=REPO, check=True)
    versions = {
        "restic-manager": version_of([str(REPO / "target/release/restic-manager-server"), "--version"]),
        "nginx": version_of(["nginx", "-v"]), "caddy": version_of(["caddy", "version"]),
        "wrk": version_of(["wrk", "-v"]),
    }
    out_dir = REPO / "bench/results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="rm-bench-") as tmp:
        work = Path(tmp)
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
        extra = {} if os.environ.get("BENCH_SKIP_EXTRAS") == "1" else extras(work)
    png = out_dir / f"{stamp}-throughput.png"
    plot(results, png)
    md = out_dir / f"{stamp}.md"
    report(results, extra, versions, md, png)
    (out_dir / f"{stamp}.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {md} and {png}")
    print(md.read_text())


if __name__ == "__main__":
    main()
