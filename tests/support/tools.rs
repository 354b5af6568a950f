//! External tools some tests need (emulators, cross compilers), and how to get them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::bin::run_bounded;
use crate::skip::skip;

/// What installs `name`: the Debian package, and the make target that installs it.
fn install_hint(name: &str) -> String {
    if name == "nginx" {
        // The HTTP cache of tests/cache_proxy_e2e.rs; .ci/run installs it.
        return "apt-get install nginx-light (.ci/run installs it)".into();
    }
    let package = match name {
        "qemu-aarch64-static" => "qemu-user-static",
        "wine64" => "wine64",
        "x86_64-w64-mingw32-gcc" => "gcc-mingw-w64-x86-64",
        other => other,
    };
    // scripts/cross-toolchain.sh (run by `make dist-agents`) installs the cross compilers and their runners.
    format!("apt-get install {package}, or `make dist-agents` (root), which installs it")
}

/// Whether `tool` is on `PATH`.
pub fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool} >/dev/null 2>&1")]).status().is_ok_and(|s| s.success())
}

/// The first of `candidates` that exists; otherwise the running test is skipped (see [`skip`]), naming the tool and
/// how to install it, and the caller returns.
pub fn tool(name: &str, candidates: &[&str]) -> Option<PathBuf> {
    let found = candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    if found.is_none() {
        skip(format!("{name} not installed: {}", install_hint(name)));
    }
    found
}

/// Wine 8.0 lacks `ProcessPrng` (bcryptprimitives.dll), which Rust's std imports: a tiny stand-in DLL built with the
/// same mingw compiler goes next to the .exe in `dir`. A test fixture only; it never ships. `false` when mingw is
/// missing (the test is then skipped).
pub fn wine_shim(dir: &Path) -> bool {
    let Some(gcc) = tool("x86_64-w64-mingw32-gcc", &["/usr/bin/x86_64-w64-mingw32-gcc"]) else { return false };
    let src = crate::files::repo_file("tests/fixtures/bcryptprimitives-shim.c");
    let mut build = Command::new(gcc);
    build.args(["-O2", "-shared", "-o"]).arg(dir.join("bcryptprimitives.dll")).arg(src).arg("-ladvapi32");
    let out = run_bounded(build, Duration::from_secs(60));
    assert!(out.status.success(), "building the wine shim: {}", String::from_utf8_lossy(&out.stderr));
    true
}
