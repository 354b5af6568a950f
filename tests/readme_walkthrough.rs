//! The README's local walkthrough, run as written: the commands are read from the block after `<!-- walkthrough -->`,
//! so the README and this test cannot drift. `make run` runs in a scratch directory that links the checkout's
//! Makefile, scripts, deploy files and built binaries (so `.dev/` is the scratch one); the only substitution is the
//! port, because 8080 may be taken.

use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use rm_e2e::*;

fn walkthrough() -> Vec<String> {
    let readme = fs::read_to_string(repo_file("README.md")).unwrap();
    let after = readme.split("<!-- walkthrough -->").nth(1).expect("README has a <!-- walkthrough --> block");
    let block = after.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

#[test]
fn the_readme_walkthrough_works_as_written() {
    let lines = walkthrough();
    assert!(lines.len() >= 3, "{lines:?}");
    let scratch = tempfile::tempdir().unwrap();
    for name in ["Makefile", "scripts", "deploy", "target"] {
        symlink(repo_file(name), scratch.path().join(name)).unwrap();
    }
    let port = free_port().port();
    // `make run` without its compile step (`make test` built everything; a nested cargo would wait on its lock).
    let mut server = Command::new("make")
        .args(["-s", "-o", "build", "run", &format!("PORT={port}")])
        .current_dir(scratch.path())
        .env_remove("MAKEFLAGS")
        .env_remove("RM_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(fs::File::create(scratch.path().join("server.log")).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually(Duration::from_secs(30), "make run to serve", || {
        http_get(addr, "/readyz").ok().filter(|r| r.status == 200)
    });

    let script = lines.join("\n").replace("8080", &port.to_string());
    let mut cmd = Command::new("sh");
    cmd.args(["-euc", &script]).current_dir(scratch.path()).stdin(Stdio::null());
    for var in ["RM_DATA_DIR", "RM_AGENT_CONFIG", "RM_ENROLL_TOKEN", "http_proxy", "HTTP_PROXY"] {
        cmd.env_remove(var);
    }
    let out = run_bounded(cmd, Duration::from_secs(120));
    // SAFETY: kill(2) on the process group of our own child.
    unsafe { libc::kill(-(server.id() as i32), libc::SIGTERM) };
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walkthrough failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server\n{}",
        fs::read_to_string(scratch.path().join("server.log")).unwrap_or_default()
    );
    let row = stdout.lines().find(|l| l.contains("linux/")).unwrap_or_else(|| panic!("no agent row:\n{stdout}"));
    assert!(row.split_whitespace().any(|w| w == "current"), "the walkthrough's host is not current: {row}");
    assert!(stdout.trim_end().ends_with("1 agents (current=1)"), "{stdout}");
}
