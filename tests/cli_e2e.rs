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

#[test]
fn agents_list_shows_the_fleet_without_curl() {
    let mut builder = Server::builder().env("RM_ADMIN_TOKEN", "cli-e2e-admin-token-012345");
    fs::create_dir_all(builder.bundled_dir().join("agent-binaries")).unwrap();
    fs::write(builder.bundled_dir().join("agent-binaries").join(LINUX_AMD64), b"served build").unwrap();
    builder = builder.env("RM_LOG", "info");
    let server = builder.start();
    let token = server.admin("POST", "/api/v1/tokens", Some(&serde_json::json!({}))).json()["token"].clone();
    for host in ["db-1", "web-1"] {
        let body = serde_json::json!({"token": token, "hostname": host, "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "c"});
        assert_eq!(server.send("POST", "/api/v1/agents/enroll", &[], Some(&body)).status, 201);
    }
    let dirs = [
        "--data-dir",
        server.data_dir().to_str().unwrap(),
        "--bundled-assets-dir",
        server.bundled_dir().to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = server_cli(&[&["agents", "list"][..], &dirs].concat());
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("HOSTNAME") && lines[0].contains("STATE"), "{stdout}");
    assert!(lines[1].starts_with("db-1") && lines[2].starts_with("web-1"), "{stdout}");
    assert!(lines[1].contains("linux/amd64") && lines[1].contains("1.2.3") && lines[1].contains("unknown"), "{stdout}");
    assert_eq!(lines.last().unwrap(), &"2 agents (unknown=2)", "{stdout}");

    let (ok, stdout, _) = server_cli(&[&["agents", "list", "--json"][..], &dirs].concat());
    assert!(ok);
    let view: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let api = server.admin("GET", "/api/v1/agents", None).json();
    assert_eq!(view["agents"].as_array().unwrap().len(), 2);
    assert_eq!(view["counts"], api["counts"], "the CLI and the API classify alike");

    let (ok, stdout, _) = server_cli(&[&["agents", "list", "--state", "stale"][..], &dirs].concat());
    assert!(ok && stdout.lines().count() == 2 && stdout.ends_with("0 of 2 agents (unknown=2)\n"), "{stdout}");
    let (ok, _, stderr) = server_cli(&[&["agents", "list", "--state", "gone"][..], &dirs].concat());
    assert!(!ok && stderr.contains("out_of_date"), "{stderr}");
}

#[test]
fn a_taken_port_leaves_the_data_dir_untouched_and_host_names_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = command(SERVER_BIN);
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir", tmp.path().to_str().unwrap()]);
    cmd.args(["--bundled-assets-dir", tmp.path().join("none").to_str().unwrap()]);
    let out = run_bounded(cmd, Duration::from_secs(15));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot listen") && stderr.contains("--listen") && stderr.contains("PORT="), "{stderr}");
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a failed start wrote {left:?}");
    drop(taken);

    // `localhost:PORT` is accepted (it used to be refused as not an IP address).
    let addr = free_port();
    let mut child = command(SERVER_BIN)
        .args(["--listen", &format!("localhost:{}", addr.port()), "--data-dir", tmp.path().to_str().unwrap()])
        .args(["--bundled-assets-dir", tmp.path().join("none").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the server on localhost", || {
        http_get(addr, "/healthz").ok().filter(|r| r.status == 200)
    });
    let _ = child.kill();
    let _ = child.wait();
}
