//! End-to-end tests: the real `restic-manager-server` binary, spawned as a child process, on a real 127.0.0.1 socket.
//! Run `cargo build --workspace` first (`make test` does).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rm_e2e::*;
use serde_json::json;
use sha2::{Digest as _, Sha256};

const MIB: usize = 1024 * 1024;

fn agent_path(root: &Path, file: &str) -> std::path::PathBuf {
    root.join("agent-binaries").join(file)
}

fn install_path(root: &Path, name: &str) -> std::path::PathBuf {
    root.join("install").join(name)
}

/// Parses `curl -D` output: the last response head in the dump (curl writes one per response it received).
fn parse_curl_head(dump: &[u8]) -> (u16, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(dump);
    let last = text.split("\r\n\r\n").filter(|h| h.starts_with("HTTP/")).last().expect("no response head in dump");
    parse_head(last).expect("parsable head")
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
}

/// curl with no config file, no proxy, a bound run time, and only the given arguments.
fn curl(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("/usr/bin/curl");
    cmd.arg("-q").args(["--noproxy", "*", "--max-time", "30", "-sS"]).args(args);
    for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "CURL_HOME"] {
        cmd.env_remove(var);
    }
    run_bounded(cmd, Duration::from_secs(40))
}

/// Polls until connecting fails or the server no longer reports ready; panics after `timeout`.
fn wait_until_not_accepting(addr: SocketAddr, timeout: Duration) -> String {
    let what = format!("the server to stop accepting connections or being ready after SIGTERM on {addr}");
    eventually(timeout, what, || {
        if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            return Some(format!("connect failed: {e}"));
        }
        match http_get(addr, "/readyz") {
            Err(e) => Some(format!("request failed: {e}")),
            Ok(r) if r.status != 200 => Some(format!("/readyz answered {}", r.status)),
            Ok(_) => None,
        }
    })
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).env("TZ", "UTC").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------------------------------

#[test]
fn version_flags_report_build_info() {
    let server = Server::start();
    let r = server.get("/version");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.expect_header("content-type").starts_with("application/json"));
    let json = r.json();
    let field = |k: &str| -> String {
        let v = json[k].as_str().unwrap_or_else(|| panic!("/version has no string {k:?}: {json}"));
        assert!(!v.is_empty() && !v.contains(char::is_whitespace), "/version {k} = {v:?}");
        v.to_string()
    };
    let (version, commit, date) = (field("version"), field("commit"), field("date"));

    for name in [SERVER_BIN, AGENT_BIN] {
        let mut cmd = command(name);
        cmd.arg("--version");
        let out = run_bounded(cmd, Duration::from_secs(10));
        assert!(out.status.success(), "{name} --version exited with {}", out.status);
        let stdout = String::from_utf8(out.stdout).expect("utf-8 --version output");
        assert_eq!(stdout.lines().count(), 1, "{name} --version printed {stdout:?}");
        assert_eq!(
            stdout.trim_end(),
            format!("{name} version={version} commit={commit} date={date}"),
            "{name} --version disagrees with the running server's GET /version"
        );
    }

    if date != "unknown" {
        let b = date.as_bytes();
        let shape_ok = b.len() == 20
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'Z',
                _ => c.is_ascii_digit(),
            });
        assert!(shape_ok, "date {date:?} is not YYYY-MM-DDTHH:MM:SSZ");
    }
}

/// Without a COMMIT build variable the commit comes from git: it must be the checkout's HEAD. (That `--version` of
/// both binaries and the server's `/version` agree is `version_flags_report_build_info`.)
#[test]
fn binaries_embed_the_checkout_head() {
    if std::env::var("COMMIT").is_ok_and(|v| !v.trim().is_empty()) {
        return skip("COMMIT is set, so the binaries embed it instead of git's HEAD: unset COMMIT and run `make test`");
    }
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return skip("git cannot read this checkout's HEAD: run `make test` in a git checkout with git installed");
    };
    let mut cmd = command(SERVER_BIN);
    cmd.arg("--version");
    let out = run_bounded(cmd, Duration::from_secs(10));
    assert!(out.status.success(), "{SERVER_BIN} --version exited with {}", out.status);
    let line = String::from_utf8(out.stdout).expect("utf-8 --version output");
    let commit = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("commit="))
        .unwrap_or_else(|| panic!("no commit= in {line:?}"));
    assert_eq!(
        commit, head,
        "the binaries embed commit {commit} but HEAD is {head}: they are stale; run `cargo build --workspace`"
    );
}

#[test]
fn four_lookup_cases_over_a_real_socket() {
    let server = Server::start();
    let (data, bundled) = (server.data_dir().to_path_buf(), server.bundled_dir().to_path_buf());
    write_file(&install_path(&data, "data-only.sh"), b"#!/bin/sh\necho data-only\n");
    write_file(&install_path(&bundled, "bundled-only.sh"), b"#!/bin/sh\necho bundled-only\n");
    write_file(&install_path(&data, "both.sh"), b"#!/bin/sh\necho from-data\n");
    write_file(&install_path(&bundled, "both.sh"), b"#!/bin/sh\necho from-bundled\n");
    let (arm_data, arm_bundled, win_bundled) = (random_bytes(1, 70_001), random_bytes(2, 80_002), random_bytes(3, 900));
    write_file(&agent_path(&data, LINUX_ARM64), &arm_data);
    write_file(&agent_path(&bundled, LINUX_ARM64), &arm_bundled);
    write_file(&agent_path(&bundled, WINDOWS_AMD64), &win_bundled);

    let cases: [(&str, &[u8], &str); 5] = [
        ("/install/data-only.sh", b"#!/bin/sh\necho data-only\n", "data-dir"),
        ("/install/bundled-only.sh", b"#!/bin/sh\necho bundled-only\n", "bundled"),
        ("/install/both.sh", b"#!/bin/sh\necho from-data\n", "data-dir"),
        ("/agent/binary?os=linux&arch=arm64", &arm_data, "data-dir"),
        ("/agent/binary?os=windows&arch=amd64", &win_bundled, "bundled"),
    ];
    for (path, want, source) in cases {
        let r = server.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.body, want, "{path}: wrong body");
        assert_eq!(r.expect_header("x-asset-source"), source, "{path}");
        assert_eq!(r.expect_header("x-checksum-sha256"), sha256_hex(want), "{path}");
        assert_eq!(r.expect_header("content-length"), want.len().to_string(), "{path}");
    }

    let r = server.get(BINARY_PATH);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.expect_header("content-type").starts_with("application/json"));
    assert_eq!(r.header("x-asset-source"), None);
    let json = r.json();
    assert_eq!(json["error"], "binary_not_published", "{json}");
    assert_eq!(json["file"], LINUX_AMD64, "{json}");

    let r = server.get("/install/x.sh");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "not_found", "{}", r.text());
}

#[test]
fn curl_downloads_match_checksum_headers() {
    let server = Server::start();
    let content = random_bytes(42, 3 * MIB);
    write_file(&agent_path(server.bundled_dir(), LINUX_AMD64), &content);
    let work = tempfile::tempdir().unwrap();
    let (head_file, body_file) = (work.path().join("head"), work.path().join("body"));
    let url = server.url(BINARY_PATH);

    let out = curl(&["-f", "-D", head_file.to_str().unwrap(), "-o", body_file.to_str().unwrap(), &url]);
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let (status, headers) = parse_curl_head(&fs::read(&head_file).unwrap());
    let body = fs::read(&body_file).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), content.len());
    let digest = Sha256::digest(&body);
    let hex = hex::encode(digest);
    assert_eq!(hex, sha256_hex(&content), "curl downloaded different bytes than the file");
    assert_eq!(header(&headers, "x-checksum-sha256"), hex);
    let etag = header(&headers, "etag");
    assert_eq!(etag, format!("\"sha256-{hex}\""));
    let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
    assert_eq!(header(&headers, "repr-digest"), format!("sha-256=:{b64}:"));
    assert_eq!(header(&headers, "content-length"), content.len().to_string());
    assert_eq!(header(&headers, "accept-ranges"), "bytes");
    assert_eq!(header(&headers, "x-asset-source"), "bundled");

    // A single range.
    let (head2, part) = (work.path().join("head2"), work.path().join("part"));
    let out = curl(&["-f", "-r", "100-199", "-D", head2.to_str().unwrap(), "-o", part.to_str().unwrap(), &url]);
    assert!(out.status.success(), "curl -r failed: {}", String::from_utf8_lossy(&out.stderr));
    let (status, headers) = parse_curl_head(&fs::read(&head2).unwrap());
    assert_eq!(status, 206);
    assert_eq!(header(&headers, "content-range"), format!("bytes 100-199/{}", content.len()));
    assert_eq!(header(&headers, "content-length"), "100");
    assert_eq!(fs::read(&part).unwrap(), &content[100..200]);

    // Conditional: the client already has this version.
    let (head3, body3) = (work.path().join("head3"), work.path().join("body3"));
    let if_none_match = format!("If-None-Match: {etag}");
    let out = curl(&[
        "-H",
        &if_none_match,
        "-D",
        head3.to_str().unwrap(),
        "-o",
        body3.to_str().unwrap(),
        "-w",
        "%{http_code} %{size_download}",
        &url,
    ]);
    assert!(out.status.success(), "curl If-None-Match failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "304 0");
    let (status, headers) = parse_curl_head(&fs::read(&head3).unwrap());
    assert_eq!(status, 304);
    assert_eq!(header(&headers, "etag"), etag);
    assert!(fs::read(&body3).map(|b| b.is_empty()).unwrap_or(true), "304 with a body");
}

#[test]
fn rename_during_slow_download_serves_one_version() {
    let server = Server::start();
    let path = agent_path(server.data_dir(), LINUX_AMD64);
    let (a, b) = (random_bytes(0xA, 48 * MIB), random_bytes(0xB, 48 * MIB));
    let (sha_a, sha_b) = (sha256_hex(&a), sha256_hex(&b));
    write_file(&path, &a);

    let mut dl = Download::start(server.addr(), BINARY_PATH).expect("starting the download");
    assert_eq!(dl.status, 200);
    assert_eq!(dl.content_length(), a.len() as u64);
    let announced = dl.header("x-checksum-sha256").expect("checksum header").to_string();
    assert_eq!(announced, sha_a, "the download did not start on version A");
    let mut body = Vec::with_capacity(a.len());
    dl.read_until(&mut body, MIB, 64 * 1024, Duration::ZERO).unwrap();
    assert_eq!(body.len(), MIB, "connection closed early");

    // The client is paused; with its small receive buffer the server can be at most a few MiB ahead, so most of A
    // is still unread by the server when B takes its name.
    replace_atomically(&path, &b);

    dl.read_until(&mut body, 4 * MIB, 16 * 1024, Duration::from_millis(1)).unwrap();
    dl.read_to_end(&mut body).unwrap();
    assert_eq!(body.len() as u64, dl.content_length(), "body length differs from content-length");
    // sha256(body): hashing 48 MiB in a debug build takes about a second, so skip it when body == A (whose hash
    // is already known).
    let got = if body == a { sha_a.clone() } else { sha256_hex(&body) };
    assert_eq!(got, announced, "the body does not match its own checksum header: versions were mixed");
    assert_eq!(got, sha_a, "the in-flight download did not serve version A");

    let r = server.get(BINARY_PATH);
    assert_eq!(r.status, 200);
    assert_eq!(r.expect_header("x-checksum-sha256"), sha_b);
    assert_eq!(r.expect_header("etag"), format!("\"sha256-{sha_b}\""));
    assert_eq!(r.body.len(), b.len());
    assert!(r.body == b, "a new request after the rename must get version B's bytes");
}

#[test]
fn sigterm_lets_inflight_download_finish() {
    let mut server = Server::builder().grace("20s").start();
    let content = random_bytes(5, 32 * MIB);
    write_file(&agent_path(server.data_dir(), LINUX_AMD64), &content);

    let mut dl = Download::start(server.addr(), BINARY_PATH).expect("starting the download");
    assert_eq!(dl.status, 200);
    assert_eq!(dl.content_length(), content.len() as u64);
    let mut body = Vec::with_capacity(content.len());
    dl.read_until(&mut body, 2 * MIB, 64 * 1024, Duration::ZERO).unwrap();

    server.sigterm();
    let how = wait_until_not_accepting(server.addr(), Duration::from_secs(5));
    eprintln!("after SIGTERM: {how}");
    assert!(server.is_running(), "the server exited with a download in flight and 20s of grace\n{}", server.log_tail());

    dl.read_until(&mut body, 6 * MIB, 16 * 1024, Duration::from_millis(1)).unwrap();
    dl.read_to_end(&mut body).unwrap();
    let finished = Instant::now();
    assert_eq!(body.len(), content.len(), "the in-flight download was cut short by the shutdown");
    assert!(body == content, "the in-flight download's bytes differ from the file");

    let status = server.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!("the server did not exit within 5s of its last download finishing\n{}", server.log_tail())
    });
    assert!(status.success(), "exit status after a graceful shutdown: {status}\n{}", server.log_tail());
    eprintln!("exited {:?} after the download finished", finished.elapsed());
    let log = server.log_json();
    assert!(log.iter().any(|l| l["message"] == "SIGTERM received"), "{}", server.log_tail());
    assert!(log.iter().any(|l| l["message"] == "all connections closed; stopped"), "{}", server.log_tail());
    let access: Vec<_> = log.iter().filter(|l| l["target"] == "access" && l["route"] == "/agent/binary").collect();
    assert_eq!(access.len(), 1, "{access:?}");
    assert_eq!(access[0]["complete"], true);
    assert_eq!(access[0]["bytes"], content.len());
}

#[test]
fn sigterm_grace_is_bounded() {
    let mut server = Server::builder().grace("1s").start();
    write_file(&agent_path(server.data_dir(), LINUX_AMD64), &random_bytes(6, 32 * MIB));

    let mut dl = Download::start(server.addr(), BINARY_PATH).expect("starting the download");
    assert_eq!(dl.status, 200);
    let mut body = Vec::new();
    dl.read_until(&mut body, 256 * 1024, 64 * 1024, Duration::ZERO).unwrap();
    // From here on the client reads nothing: the server's writes stall on full socket buffers.

    let signalled = Instant::now();
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!("the server was still running 5s after SIGTERM with a 1s grace\n{}", server.log_tail())
    });
    let took = signalled.elapsed();
    assert!(status.success(), "exit status: {status}\n{}", server.log_tail());
    assert!(took >= Duration::from_millis(900), "exited after {took:?}: the in-flight request got no grace at all");
    assert!(
        server.log_json().iter().any(|l| l["message"] == "grace period over; dropping the remaining connections"),
        "{}",
        server.log_tail()
    );
    drop(dl);
}

#[test]
fn healthcheck_subcommand_exit_codes() {
    let server = Server::start();
    let timeout = Duration::from_secs(15);

    let mut cmd = command(SERVER_BIN);
    cmd.args(["healthcheck", "--url", &server.url("/healthz")]);
    let out = run_bounded(cmd, timeout);
    assert!(out.status.success(), "healthcheck failed: {} {}", out.status, String::from_utf8_lossy(&out.stderr));

    // Nothing listens on a bound-but-not-listening port: refused.
    let closed = ClosedPort::new();
    let mut cmd = command(SERVER_BIN);
    cmd.args(["healthcheck", "--url", &format!("http://{}/healthz", closed.addr)]);
    let out = run_bounded(cmd, timeout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "healthcheck against a closed port: {} {stderr}", out.status);
    assert!(stderr.contains("unhealthy") && stderr.contains(&closed.addr.to_string()), "stderr: {stderr:?}");

    // A server that answers, but not 2xx.
    let mut cmd = command(SERVER_BIN);
    cmd.args(["healthcheck", "--url", &server.url("/no-such-path")]);
    let out = run_bounded(cmd, timeout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "healthcheck of a 404: {} {stderr}", out.status);
    assert!(stderr.contains("404"), "stderr: {stderr:?}");

    // The URL defaults to /healthz on RM_LISTEN.
    let mut cmd = command(SERVER_BIN);
    cmd.arg("healthcheck").env("RM_LISTEN", server.addr().to_string());
    let out = run_bounded(cmd, timeout);
    assert!(out.status.success(), "healthcheck via RM_LISTEN: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
}

#[test]
fn startup_errors_are_clear() {
    let timeout = Duration::from_secs(10);

    for format in ["json", "text"] {
        let builder = Server::builder();
        let missing = builder.root().join("no-such-data-dir");
        let (status, stderr) = builder.with_data_dir(&missing).env("RM_LOG_FORMAT", format).run_expecting_exit(timeout);
        assert!(!status.success(), "started without a data dir ({format})");
        assert!(stderr.contains(missing.to_str().unwrap()), "{format}: path not in stderr:\n{stderr}");
        assert!(stderr.contains("does not exist"), "{format}: stderr:\n{stderr}");
    }

    let builder = Server::builder();
    let file = builder.root().join("a-file");
    fs::write(&file, b"not a dir").unwrap();
    let (status, stderr) = builder.with_data_dir(&file).run_expecting_exit(timeout);
    assert!(!status.success(), "started with a regular file as data dir");
    assert!(stderr.contains(file.to_str().unwrap()), "path not in stderr:\n{stderr}");
    assert!(stderr.contains("not a directory"), "stderr:\n{stderr}");

    // A missing bundled dir is fine: the data dir alone is served.
    let builder = Server::builder();
    let missing = builder.root().join("no-such-bundled-dir");
    let server = builder.with_bundled_dir(&missing).start();
    let r = server.get("/readyz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    let r = server.get(BINARY_PATH);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "binary_not_published");
    write_file(&install_path(server.data_dir(), "install.sh"), b"echo hi\n");
    let r = server.get("/install/install.sh");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"echo hi\n"[..]));
}

#[test]
fn access_log_has_one_line_per_request() {
    let server = Server::start();
    let content = random_bytes(9, 300_007);
    write_file(&agent_path(server.bundled_dir(), LINUX_AMD64), &content);
    let big = random_bytes(10, 16 * MIB);
    write_file(&agent_path(server.data_dir(), LINUX_ARM64), &big);

    let r = server.get(BINARY_PATH);
    assert_eq!((r.status, r.body.len()), (200, content.len()));
    let is_binary = |l: &serde_json::Value| l["target"] == "access" && l["route"] == "/agent/binary";
    let lines = server.wait_for_log_lines("for the download", 1, Duration::from_secs(5), is_binary);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["bytes"], content.len(), "{line}");
    assert_eq!(line["complete"], true, "{line}");
    assert_eq!(line["source"], "bundled", "{line}");
    assert!(line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
    assert_eq!(line["uri"], BINARY_PATH, "{line}");

    // Three requests, three lines.
    for _ in 0..3 {
        assert_eq!(server.get("/version").status, 200);
    }
    let is_version = |l: &serde_json::Value| l["target"] == "access" && l["route"] == "/version";
    server.wait_for_log_lines("for /version", 3, Duration::from_secs(5), is_version);
    std::thread::sleep(Duration::from_millis(100));
    let n = server.log_json().iter().filter(|l| is_version(l)).count();
    assert_eq!(n, 3, "three requests to /version logged {n} lines\n{}", server.log_tail());

    // An abandoned download is logged as incomplete, with what was actually sent.
    let mut dl = Download::start(server.addr(), "/agent/binary?os=linux&arch=arm64").unwrap();
    let mut body = Vec::new();
    dl.read_until(&mut body, MIB, 64 * 1024, Duration::ZERO).unwrap();
    drop(dl);
    let is_arm = |l: &serde_json::Value| l["target"] == "access" && l["uri"] == "/agent/binary?os=linux&arch=arm64";
    let lines = server.wait_for_log_lines("for the abandoned download", 1, Duration::from_secs(10), is_arm);
    let line = &lines[0];
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(line["source"], "data-dir", "{line}");
    let sent = line["bytes"].as_u64().expect("bytes is a number");
    assert!(sent >= MIB as u64 && sent < big.len() as u64, "bytes {sent} for an abandoned download: {line}");

    // Install files (answered without the router) are logged the same way: 200, HEAD, 304, 404 and a refused name.
    write_file(&install_path(server.data_dir(), "install.sh"), b"#!/bin/sh\necho from-the-data-dir\n");
    let r = server.get("/install/install.sh?v=1");
    assert_eq!(r.status, 200, "{}", r.text());
    let etag = r.header("etag").unwrap().to_owned();
    assert_eq!(server.request("HEAD", "/install/install.sh", &[]).status, 200);
    assert_eq!(server.request("GET", "/install/install.sh", &[("If-None-Match", &etag)]).status, 304);
    assert_eq!(server.get("/install/missing.sh").status, 404);
    assert_eq!(server.get("/install/..").status, 400);
    let is_install = |l: &serde_json::Value| l["target"] == "access" && l["route"] == "/install/{name}";
    let lines = server.wait_for_log_lines("for the install files", 5, Duration::from_secs(5), is_install);
    let seen: Vec<_> = lines.iter().map(|l| (l["method"].clone(), l["uri"].clone(), l["status"].clone())).collect();
    assert_eq!(
        seen,
        [
            (json!("GET"), json!("/install/install.sh?v=1"), json!(200)),
            (json!("HEAD"), json!("/install/install.sh"), json!(200)),
            (json!("GET"), json!("/install/install.sh"), json!(304)),
            (json!("GET"), json!("/install/missing.sh"), json!(404)),
            (json!("GET"), json!("/install/.."), json!(400)),
        ],
        "{lines:?}"
    );
    assert_eq!(
        (&lines[0]["bytes"], &lines[0]["complete"], &lines[0]["source"]),
        (&json!(r.body.len()), &json!(true), &json!("data-dir"))
    );
    assert_eq!((&lines[1]["bytes"], &lines[1]["complete"]), (&json!(0), &json!(true)), "{}", lines[1]);
    assert!(lines.iter().all(|l| l["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:"))), "{lines:?}");
}

#[test]
fn symlink_out_of_root_is_refused_on_a_real_socket() {
    const SECRET: &str = "TOP-SECRET-e2e-7f3a";
    let server = Server::start();
    let outside = server.root().join("outside").join("secret");
    fs::write(&outside, SECRET).unwrap();
    symlink(&outside, agent_path(server.data_dir(), LINUX_AMD64)).unwrap();
    fs::write(server.data_dir().join("restic-manager.db"), SECRET).unwrap();
    symlink("../restic-manager.db", install_path(server.data_dir(), "db.sh")).unwrap();
    symlink(&outside, install_path(server.data_dir(), "abs.sh")).unwrap();

    for method in ["GET", "HEAD"] {
        let r = server.request(method, BINARY_PATH, &[]);
        assert_eq!(r.status, 404, "{method}: {}", r.text());
        assert!(!r.text().contains(SECRET), "{method}: secret leaked");
        assert!(r.header("x-checksum-sha256").is_none() && r.header("etag").is_none(), "{:?}", r.headers);
        if method == "GET" {
            assert_eq!(r.json()["error"], "binary_not_published");
        }
    }
    for path in ["/install/db.sh", "/install/abs.sh"] {
        let r = server.get(path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "not_found", "{path}");
        assert!(!r.text().contains(SECRET), "{path}: secret leaked");
    }

    let manifest = server.get("/agent/manifest");
    assert_eq!(manifest.status, 200);
    assert!(!manifest.text().contains(SECRET));
    let agents = manifest.json()["agents"].as_array().expect("agents array").clone();
    let linux = agents.iter().find(|a| a["file"] == LINUX_AMD64).expect("linux/amd64 in manifest");
    assert_eq!(linux["published"], false, "{linux}");
    let sums = server.get("/agent/SHA256SUMS");
    assert_eq!(sums.status, 200);
    assert!(!sums.text().contains(LINUX_AMD64), "{}", sums.text());

    // The refusal is the symlink's fault, not a broken setup: a real file in the same place is served.
    fs::remove_file(agent_path(server.data_dir(), LINUX_AMD64)).unwrap();
    write_file(&agent_path(server.data_dir(), LINUX_AMD64), b"real agent");
    let r = server.get(BINARY_PATH);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"real agent"[..]));
}

/// Item 11 of the security review: replacing an agent by rename while it is being hashed must never answer 503.
/// Unlinking the replaced inode bumps its ctime; that is not an in-place rewrite. Two swappers rename versions over
/// the served file as fast as they can for a bounded time: one writes each version to a fresh temp file (the
/// replaced inode's link count drops to 0), one hard-links pooled copies into place (it drops to 1, and pooled
/// inodes are linked again while they may be being hashed). Meanwhile clients GET, HEAD and resume with If-Range;
/// every answer must be one whole version that matches its own checksum header.
#[test]
fn rename_storm_never_answers_503_and_never_mixes_versions() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const SIZE: usize = 4 * MIB;
    const VERSIONS: u64 = 4;
    const STORM: Duration = Duration::from_secs(3);
    let server = Server::start();
    let target = agent_path(server.data_dir(), LINUX_AMD64);
    let versions: Arc<Vec<Vec<u8>>> = Arc::new((0..VERSIONS).map(|i| random_bytes(0x5707 + i, SIZE)).collect());
    let by_sha: Arc<HashMap<String, usize>> =
        Arc::new(versions.iter().enumerate().map(|(i, v)| (sha256_hex(v), i)).collect());
    // Pooled copies on the same file system, outside the served dir, for the hard-link swapper.
    let pool = server.root().join("pool");
    fs::create_dir_all(&pool).unwrap();
    for (i, v) in versions.iter().enumerate() {
        write_file(&pool.join(i.to_string()), v);
    }
    write_file(&target, &versions[0]);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let fresh_swapper = {
        let (stop, swaps, versions, target) = (stop.clone(), swaps.clone(), versions.clone(), target.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                replace_atomically(&target, &versions[i % versions.len()]);
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let link_swapper = {
        let (stop, swaps, pool, target) = (stop.clone(), swaps.clone(), pool.clone(), target.clone());
        std::thread::spawn(move || {
            let tmp = target.with_file_name(".link-swap");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let _ = fs::remove_file(&tmp);
                fs::hard_link(pool.join((i % VERSIONS).to_string()), &tmp).unwrap();
                fs::rename(&tmp, &target).unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    #[derive(Default, Debug)]
    struct Counts {
        requests: u64,
        unavailable: u64,
        partial: u64,
        failures: Vec<String>,
    }
    let addr = server.addr();
    let client = |kind: &'static str| {
        let (stop, versions, by_sha) = (stop.clone(), versions.clone(), by_sha.clone());
        std::thread::spawn(move || {
            let mut c = Counts::default();
            // Bounded: the storm's deadline, and a request cap as a second guard.
            while !stop.load(Ordering::Relaxed) && c.requests < 100_000 {
                c.requests += 1;
                let r = match kind {
                    "head" => http_request(addr, "HEAD", BINARY_PATH, &[]),
                    "resume" => {
                        // A client resuming with the ETag of what it has: 206 only for that very version.
                        let etag =
                            format!("\"sha256-{}\"", sha256_hex(&versions[c.requests as usize % versions.len()]));
                        http_request(
                            addr,
                            "GET",
                            BINARY_PATH,
                            &[("Range", "bytes=1000000-1999999"), ("If-Range", &etag)],
                        )
                    }
                    _ => http_request(addr, "GET", BINARY_PATH, &[]),
                };
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        c.failures.push(format!("{kind}: {e}"));
                        continue;
                    }
                };
                if r.status == 503 {
                    c.unavailable += 1;
                    continue;
                }
                let sha = r.header("x-checksum-sha256").unwrap_or_default().to_string();
                let Some(&v) = by_sha.get(&sha) else {
                    c.failures.push(format!("{kind}: status {} with unknown checksum {sha:?}: {}", r.status, r.text()));
                    continue;
                };
                let ok = match (kind, r.status) {
                    ("head", 200) => r.body.is_empty() && r.header("content-length") == Some(&SIZE.to_string()),
                    ("resume", 206) => {
                        c.partial += 1;
                        r.header("etag") == Some(format!("\"sha256-{sha}\"").as_str())
                            && r.body == versions[v][1_000_000..2_000_000]
                    }
                    (_, 200) => r.body.len() == SIZE && sha256_hex(&r.body) == sha,
                    _ => false,
                };
                if !ok {
                    c.failures.push(format!(
                        "{kind}: status {} body of {} bytes does not match {sha}",
                        r.status,
                        r.body.len()
                    ));
                }
            }
            c
        })
    };
    let clients = [client("get"), client("get"), client("head"), client("resume")];
    let started = Instant::now();
    std::thread::sleep(STORM);
    stop.store(true, Ordering::Relaxed);
    fresh_swapper.join().unwrap();
    link_swapper.join().unwrap();
    let mut total = Counts::default();
    for c in clients {
        let c = c.join().unwrap();
        total.requests += c.requests;
        total.unavailable += c.unavailable;
        total.partial += c.partial;
        total.failures.extend(c.failures);
    }
    let swaps = swaps.load(Ordering::Relaxed);
    println!(
        "rename storm: {} requests ({} ranged 206), {swaps} swaps in {:?}, {} answered 503, {} failures",
        total.requests,
        total.partial,
        started.elapsed(),
        total.unavailable,
        total.failures.len()
    );
    assert!(total.failures.is_empty(), "{:?}\n{}", &total.failures[..total.failures.len().min(10)], server.log_tail());
    assert_eq!(total.unavailable, 0, "503 during rename replacement\n{}", server.log_tail());
    assert!(swaps >= 100 && total.requests >= 20, "too little happened: {swaps} swaps, {} requests", total.requests);
    let log = server.log();
    assert!(!log.contains("asset_unstable") && !log.contains("rewritten in place"), "{}", server.log_tail());
}

/// What hyper actually writes for the conditional and range answers (the in-process tests see axum's view only):
/// HEAD ignores Range, a 304 never says `Content-Length: 0`, 412/416 and path rejections are JSON.
#[test]
fn conditional_and_range_answers_on_the_wire() {
    let server = Server::start();
    let content = random_bytes(77, 100_000);
    write_file(&agent_path(server.data_dir(), LINUX_AMD64), &content);
    let len = content.len().to_string();
    let etag = server.get(BINARY_PATH).expect_header("etag").to_string();

    let r = server.request("HEAD", BINARY_PATH, &[("Range", "bytes=0-9")]);
    assert_eq!((r.status, r.header("content-length")), (200, Some(len.as_str())), "{:?}", r.headers);
    assert_eq!(r.header("content-range"), None);

    // HEAD 304: the representation's length; GET 304: hyper leaves it out. Never a 0 that contradicts the 200.
    let r = server.request("HEAD", BINARY_PATH, &[("If-None-Match", &etag)]);
    assert_eq!((r.status, r.header("content-length")), (304, Some(len.as_str())), "{:?}", r.headers);
    let r = server.request("GET", BINARY_PATH, &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    assert_ne!(r.header("content-length"), Some("0"), "{:?}", r.headers);

    let r =
        server.request("GET", BINARY_PATH, &[("Range", "bytes=10-19"), ("If-Range", "Fri, 01 Jan 2100 00:00:00 GMT")]);
    assert_eq!((r.status, r.body.len()), (200, content.len()), "a later If-Range date must not resume");
    let r = server.request("GET", BINARY_PATH, &[("Range", "bytes=10-19"), ("If-Range", "garbage")]);
    assert_eq!((r.status, r.body.len()), (200, content.len()), "an unparseable If-Range must not resume");

    let r = server.request("GET", BINARY_PATH, &[("If-Match", "\"sha256-other\"")]);
    assert_eq!((r.status, r.expect_header("content-type")), (412, "application/json"));
    assert_eq!(r.json()["error"], "precondition_failed");
    let r = server.request("GET", BINARY_PATH, &[("Range", "bytes=999999-")]);
    assert_eq!((r.status, r.expect_header("content-range")), (416, format!("bytes */{len}").as_str()));
    assert_eq!(r.json()["error"], "range_not_satisfiable");

    let r = server.admin("DELETE", "/api/v1/tokens/%ff", None);
    assert_eq!((r.status, r.expect_header("content-type")), (400, "application/json"), "{}", r.text());
    assert_eq!(r.json()["error"], "invalid_request");
}
