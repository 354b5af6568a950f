//! `scripts/test-summary.sh`, which prints `make test`'s closing line: a fake cargo log and a fake skip log in, the
//! closing line, the listed skips and the exit code out.

use std::process::Command;
use std::time::Duration;

use rm_e2e::run_bounded;

/// Three binaries: six tests pass, one fails, one is ignored.
const LOG: &str = "\
   Compiling rm-e2e v0.1.0 (/src/tests)
    Finished `test` profile [unoptimized + debuginfo] target(s) in 9.99s
     Running unittests src/lib.rs (target/debug/deps/rm_server-0123456789abcdef)

running 2 tests
test tests::one ... ok
test tests::two ... ignored

test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

     Running tests/cross_agents.rs (target/debug/deps/cross_agents-fedcba9876543210)

running 3 tests
test linux_amd64_agent_is_static_and_works ... ok
test linux_arm64_agent_runs_under_qemu ... ok
test windows_amd64_agent_runs_under_wine ... ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/server_e2e.rs (target/debug/deps/server_e2e-00aa11bb22cc33dd)

running 3 tests
test a_passes ... ok
test b_fails ... FAILED
test c_passes ... ok

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s
";

/// The same run with the failure fixed.
fn green() -> String {
    LOG.replace("test b_fails ... FAILED", "test b_fails ... ok")
        .replace("FAILED. 2 passed; 1 failed;", "ok. 3 passed; 0 failed;")
}

const ARM_LISTED: &str = "skipped: cross_agents::linux_arm64_agent_runs_under_qemu: qemu-aarch64-static not installed";
const WINE_LISTED: &str = "skipped: cross_agents::windows_amd64_agent_runs_under_wine: wine64 not installed";
const ARM: &str = "cross_agents::linux_arm64_agent_runs_under_qemu\tqemu-aarch64-static not installed\n";
const WINE: &str = "cross_agents::windows_amd64_agent_runs_under_wine\twine64 not installed\n";

struct Case {
    what: &'static str,
    log: String,
    /// `None`: no skip log at all.
    skips: Option<String>,
    ci: Option<&'static str>,
    closing: &'static str,
    listed: &'static [&'static str],
    exit: i32,
}

fn case(what: &'static str, log: String, skips: Option<String>, closing: &'static str, exit: i32) -> Case {
    Case { what, log, skips, ci: None, closing, listed: &[], exit }
}

#[test]
fn closing_line_counts_recorded_skips_as_skipped() {
    let cases = [
        case("nothing skipped", green(), None, "tests: 7 passed, 0 failed, 1 skipped", 0),
        case("an empty skip log", green(), Some(String::new()), "tests: 7 passed, 0 failed, 1 skipped", 0),
        case("a failure", LOG.to_string(), None, "tests: 6 passed, 1 failed, 1 skipped", 1),
        Case {
            listed: &[ARM_LISTED, WINE_LISTED],
            ..case("two skips", green(), Some(format!("{ARM}{WINE}")), "tests: 5 passed, 0 failed, 3 skipped", 0)
        },
        Case {
            listed: &[ARM_LISTED],
            ..case(
                "one skip recorded twice",
                green(),
                Some(format!("{ARM}{ARM}")),
                "tests: 6 passed, 0 failed, 2 skipped",
                0,
            )
        },
        Case {
            listed: &[ARM_LISTED],
            ..case(
                "a skip and a failure",
                LOG.to_string(),
                Some(ARM.to_string()),
                "tests: 5 passed, 1 failed, 2 skipped",
                1,
            )
        },
        case(
            "a test that recorded a skip, then failed, stays a failure",
            LOG.to_string(),
            Some("server_e2e::b_fails\tno tool\n".to_string()),
            "tests: 6 passed, 1 failed, 1 skipped",
            1,
        ),
        Case {
            ci: Some("true"),
            listed: &[ARM_LISTED],
            ..case("a skip under CI", green(), Some(ARM.to_string()), "tests: 6 passed, 0 failed, 2 skipped", 1)
        },
        Case {
            ci: Some("false"),
            listed: &[ARM_LISTED],
            ..case("a skip with CI=false", green(), Some(ARM.to_string()), "tests: 6 passed, 0 failed, 2 skipped", 0)
        },
        Case {
            ci: Some("1"),
            ..case("CI and nothing skipped", green(), Some(String::new()), "tests: 7 passed, 0 failed, 1 skipped", 0)
        },
        case(
            "no test ran",
            "error: could not compile `rm-e2e`\n".to_string(),
            None,
            "tests: 0 passed, 0 failed, 0 skipped",
            1,
        ),
        case(
            "a stale skip log listing more tests than passed",
            LOG.lines().take(10).collect::<Vec<_>>().join("\n"),
            Some(format!("{ARM}{WINE}")),
            "tests: 1 passed, 0 failed, 1 skipped",
            1,
        ),
    ];
    let script = rm_e2e::repo_file("scripts/test-summary.sh");
    for c in cases {
        let dir = tempfile::tempdir().unwrap();
        let (log, skips) = (dir.path().join("test.log"), dir.path().join("test-skips.log"));
        std::fs::write(&log, &c.log).unwrap();
        if let Some(text) = &c.skips {
            std::fs::write(&skips, text).unwrap();
        }
        let mut cmd = Command::new("sh");
        cmd.arg(&script).arg(&log).arg(&skips).env_remove("CI").env_remove("RM_SKIP_LOG");
        if let Some(ci) = c.ci {
            cmd.env("CI", ci);
        }
        let out = run_bounded(cmd, Duration::from_secs(10));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let what = c.what;
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.last().copied(), Some(c.closing), "{what}: stdout {stdout:?}, stderr {stderr:?}");
        assert_eq!(&lines[..lines.len() - 1], c.listed, "{what}: the skipped tests listed before the closing line");
        assert_eq!(out.status.code(), Some(c.exit), "{what}: exit status; stderr {stderr:?}");
        if c.ci.is_some_and(|ci| ci != "false") && !c.listed.is_empty() {
            assert!(stderr.contains("skipped under CI"), "{what}: {stderr:?}");
        }
    }
}
