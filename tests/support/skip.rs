//! Tests that cannot run on this machine say so, and are counted as skipped rather than passed.
//!
//! libtest has no runtime skip, so a test that lacks an input calls [`skip`] and returns. [`skip`] appends
//! `<test binary>::<test name>\t<reason>` to the skip log (`RM_SKIP_LOG`, else `<target dir>/test-skips.log`) and
//! writes `SKIP` with the reason straight to the process's stderr (not through libtest's capture, so it shows without
//! `--nocapture`). `scripts/test-summary.sh` reads the log and moves those tests from passed to skipped in the
//! closing line. Under CI nothing may skip: there [`skip`] panics with the reason instead.

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;

use crate::bin::profile_dir;

/// Whether this is a CI run (`CI` set, non-empty and not `false`), where every test must run.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// Where skips are recorded: `RM_SKIP_LOG`, else `test-skips.log` in the target dir.
pub fn skip_log() -> PathBuf {
    match std::env::var_os("RM_SKIP_LOG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => profile_dir().parent().expect("the profile dir is inside the target dir").join("test-skips.log"),
    }
}

/// `<test binary>::<test name>` of the running test: the executable's name without cargo's `-<hash>`, and the
/// name libtest gives the test's thread.
fn test_id() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_ref().and_then(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let binary = match stem.rsplit_once('-') {
        Some((name, hash)) if !hash.is_empty() && hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
        _ => stem,
    };
    let thread = std::thread::current();
    format!("{binary}::{}", thread.name().unwrap_or("?"))
}

/// Records that the running test cannot run here and why; the caller returns right after. `reason` should name
/// what makes the test run (a make target, a package). Panics under CI.
pub fn skip(reason: impl Display) {
    let reason = reason.to_string().replace(['\n', '\t'], " ");
    let id = test_id();
    assert!(!under_ci(), "{id} would skip, and nothing may skip under CI: {reason}");
    // A test that skips several parts is still one skipped test: record it once (libtest runs each test on its own
    // thread).
    thread_local!(static RECORDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if RECORDED.with(|r| r.replace(true)) {
        let _ = std::io::stderr().write_all(format!("\nSKIP {id} (part): {reason}\n").as_bytes());
        return;
    }
    let log = skip_log();
    let line = format!("{id}\t{reason}\n");
    let recorded =
        std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = recorded {
        panic!("{id} skips ({reason}) but the skip cannot be recorded in {}: {e}", log.display());
    }
    // Straight to fd 2, past libtest's output capture; one write, starting on a fresh line.
    let _ = std::io::stderr().write_all(format!("\nSKIP {id}: {reason}\n").as_bytes());
}
