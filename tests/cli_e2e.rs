//! The server's command line as a new operator meets it: flags where they are typed, clear refusals, and logs and
//! help text fit to read.

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use rm_e2e::*;

fn server_cli(args: &[&str]) -> (bool, String, String) {
    let mut cmd = command(SERVER_BIN);
    cmd.args(args);
    let out = run_bounded(cmd, Duration::from_secs(15));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn data_dir_works_after_the_subcommand_and_a_wrong_one_creates_nothing() {
    let server = Server::start();
    let data = server.data_dir().to_str().unwrap().to_owned();
    // Before: `token create … --data-dir X` failed with "unexpected argument".
    let (ok, stdout, stderr) = server_cli(&["token", "create", "--uses", "1", "--data-dir", &data]);
    assert!(ok, "{stderr}");
    assert!(stdout.trim().starts_with("rmenr_"), "{stdout}");
    let (ok, stdout, stderr) = server_cli(&["token", "list", "--data-dir", &data]);
    assert!(ok && stdout.contains("status=active"), "{stdout}{stderr}");

    // Before: a mistyped data dir silently got a new, empty database.
    let tmp = tempfile::tempdir().unwrap();
    for typo in [tmp.path().join("mistyped"), tmp.path().to_path_buf()] {
        let (ok, _, stderr) = server_cli(&["token", "list", "--data-dir", typo.to_str().unwrap()]);
        assert!(!ok, "token list in {} succeeded", typo.display());
        assert!(stderr.contains("no database at") && stderr.contains("restic-manager.db"), "{stderr}");
    }
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the refusal wrote {left:?}");
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port();
    let child = command(SERVER_BIN)
        .args(["--listen", &addr.to_string(), "--data-dir", tmp.path().to_str().unwrap()])
        .args(["--bundled-assets-dir", tmp.path().join("none").to_str().unwrap(), "--log-format", "text"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the server to answer", || {
        http_get(addr, "/healthz").ok().filter(|r| r.status == 200)
    });
    let _ = http_get(addr, "/nope");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a piped log:\n{log}");
    assert!(!log.contains("Some("), "Debug formatting in the log:\n{log}");
}

#[test]
fn make_help_expands_nothing_it_cannot() {
    let mut cmd = std::process::Command::new("make");
    cmd.arg("-s").arg("help").current_dir(repo_file(""));
    let out = run_bounded(cmd, Duration::from_secs(15));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && help.contains("make run"), "{help}");
    assert!(!help.contains("$("), "unexpanded make variables in make help:\n{help}");
}
