//! The workspace binaries under test, and child processes run with a bound.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use crate::poll::poll;

pub const SERVER_BIN: &str = "restic-manager-server";
pub const AGENT_BIN: &str = "restic-manager-agent";
pub const LINUX_AMD64: &str = "restic-manager-agent-linux-amd64";
pub const LINUX_ARM64: &str = "restic-manager-agent-linux-arm64";
pub const WINDOWS_AMD64: &str = "restic-manager-agent-windows-amd64.exe";
pub const BINARY_PATH: &str = "/agent/binary?os=linux&arch=amd64";

/// `<target dir>/debug`: the directory of this test executable (which lives in `target/debug/deps`) without `deps`.
pub(crate) fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot locate the running test executable");
    let mut dir = exe.parent().expect("test executable has a parent dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// `<target dir>/debug/<name>`, found by walking up from this test executable.
/// Panics with instructions when the binary has not been built.
pub fn binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found (located from the test executable {}). The end-to-end tests run the real binaries: run `cargo build --workspace` \
         (or `make test`) first.",
        path.display(),
        std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default()
    );
    path
}

/// A `Command` for one of the workspace binaries with every inherited `RM_*` variable removed, so the caller's
/// environment cannot change what a test sees.
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(binary(name));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RM_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion within `timeout` (killing it otherwise) and returns its output.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdout(fs::File::create(&out_path).unwrap()).stderr(fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let status = match wait_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not exit within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default())
            );
        }
    };
    Output { status, stdout: fs::read(&out_path).unwrap(), stderr: fs::read(&err_path).unwrap() }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    poll(timeout, || child.try_wait().expect("try_wait"))
}
