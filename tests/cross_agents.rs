//! The cross-compiled agents in `dist/` (from `make dist`) on their own platforms: the static linux/amd64 build
//! natively, linux/arm64 under qemu-user, windows/amd64 under wine. Each also enrolls and sends a heartbeat to a real
//! server. `.ci/run` builds `dist/` first; without it (or without qemu/wine) these tests are skipped (`rm_e2e::skip`),
//! except under CI, where they fail.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rm_e2e::*;

fn dist_binary(file: &str) -> Option<PathBuf> {
    let path = repo_file("dist/agent-binaries").join(file);
    if !path.is_file() {
        skip(format!("{} not built: run `make dist-agents` (root)", path.display()));
        return None;
    }
    // dist/ is built separately; after a commit it is stale until rebuilt. Under CI (which builds it from the same
    // checkout right before the tests) a different build is a failure (`skip` panics there); elsewhere a skip.
    let embedded = fs::read(&path).ok().and_then(|b| rm_buildinfo::scan(&b)).map(|info| info.version_line());
    let host = host_version_line();
    if embedded.as_deref() != Some(host.trim_start_matches("restic-manager-agent ")) {
        skip(format!("{} embeds {embedded:?} but this tree builds {host:?}: run `make dist-agents`", path.display()));
        return None;
    }
    Some(path)
}

/// A command from a program and its arguments (`run_bounded` takes it by value).
fn cmd(program: impl AsRef<std::ffi::OsStr>, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Builds the agent's command lines: `program [leading...] <agent arguments>`.
fn runner<'a>(program: &'a Path, leading: &'a [&'a Path]) -> impl FnMut(&[&str]) -> Command + 'a {
    move |args| {
        let mut c = Command::new(program);
        c.args(leading).args(args);
        c
    }
}

/// The `--version` line of the host agent built from the same tree: the cross builds must embed the same values.
fn host_version_line() -> String {
    let mut agent = command(AGENT_BIN);
    agent.arg("--version");
    let out = run_bounded(agent, Duration::from_secs(10));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn elf_facts(bytes: &[u8]) -> (u16, bool) {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF");
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([bytes[54], bytes[55]]) as usize;
    let phnum = u16::from_le_bytes([bytes[56], bytes[57]]) as usize;
    // PT_INTERP (3) means a dynamic loader is needed.
    let dynamic = (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) == 3
    });
    (machine, !dynamic)
}

/// Enrolls `runner agent` against a fresh server and sends one heartbeat; returns the fleet view row.
fn enroll_and_beat(runner: &mut dyn FnMut(&[&str]) -> Command, os: &str, arch: &str) -> serde_json::Value {
    let server = Server::builder().env("RM_ADMIN_TOKEN", "cross-admin-token-0123456789").start();
    let token = server.admin("POST", "/api/v1/tokens", Some(&serde_json::json!({"uses": 1}))).json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.json");
    let config = config.to_str().unwrap();
    let url = server.url("");
    let out = run_bounded(
        runner(&["enroll", "--server", &url, "--token", &token, "--config", config]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    let out = run_bounded(runner(&["run", "--once", "--config", config]), Duration::from_secs(120));
    assert!(out.status.success(), "run --once failed: {}", String::from_utf8_lossy(&out.stderr));
    let view = server.admin("GET", "/api/v1/agents", None).json();
    let agents = view["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{view}");
    assert_eq!((agents[0]["os"].as_str(), agents[0]["arch"].as_str()), (Some(os), Some(arch)));
    assert_eq!(agents[0]["heartbeats"], 1);
    agents[0].clone()
}

#[test]
fn linux_amd64_agent_is_static_and_works() {
    let Some(bin) = dist_binary(LINUX_AMD64) else { return };
    let (machine, is_static) = elf_facts(&fs::read(&bin).unwrap());
    assert_eq!((machine, is_static), (62, true), "x86-64 (62), statically linked");
    let out = run_bounded(cmd(&bin, &["--version".as_ref()]), Duration::from_secs(10));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), host_version_line());
    let row = enroll_and_beat(&mut runner(&bin, &[]), "linux", "amd64");
    assert_eq!(row["binary_sha256"], sha256_file(&bin));
}

#[test]
fn linux_arm64_agent_runs_under_qemu() {
    let Some(bin) = dist_binary(LINUX_ARM64) else { return };
    let (machine, is_static) = elf_facts(&fs::read(&bin).unwrap());
    assert_eq!((machine, is_static), (183, true), "aarch64 (183), statically linked");
    let Some(qemu) = tool("qemu-aarch64-static", &["/usr/bin/qemu-aarch64-static", "/usr/bin/qemu-aarch64"]) else {
        return;
    };
    let out = run_bounded(cmd(&qemu, &[bin.as_os_str(), "--version".as_ref()]), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), host_version_line());
    let row = enroll_and_beat(&mut runner(&qemu, &[&bin]), "linux", "arm64");
    assert_eq!(row["binary_sha256"], sha256_file(&bin));
}

#[test]
fn windows_amd64_agent_runs_under_wine() {
    let Some(bin) = dist_binary(WINDOWS_AMD64) else { return };
    let bytes = fs::read(&bin).unwrap();
    assert_eq!(&bytes[..2], b"MZ");
    let pe = u32::from_le_bytes(bytes[0x3c..0x40].try_into().unwrap()) as usize;
    assert_eq!(&bytes[pe..pe + 4], b"PE\0\0");
    assert_eq!(u16::from_le_bytes([bytes[pe + 4], bytes[pe + 5]]), 0x8664, "x86-64 PE");
    let Some(wine) = tool("wine64", &["/usr/bin/wine64", "/usr/lib/wine/wine64"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    if !wine_shim(dir.path()) {
        return;
    }
    let exe = dir.path().join("restic-manager-agent.exe");
    fs::copy(&bin, &exe).unwrap();
    let prefix = dir.path().join("wineprefix");
    let mut wine_cmd = |args: &[&str]| {
        let mut c = Command::new(&wine);
        c.arg(&exe).args(args).env("WINEPREFIX", &prefix).env("WINEDEBUG", "-all");
        c
    };
    let out = run_bounded(wine_cmd(&["--version"]), Duration::from_secs(180));
    assert!(out.status.success(), "wine: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), host_version_line());
    let row = enroll_and_beat(&mut wine_cmd, "windows", "amd64");
    assert_eq!(row["binary_sha256"], sha256_file(&exe));
}
