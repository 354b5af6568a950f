//! End-to-end tests of the install path: `scripts/install.sh` served by the real `restic-manager-server` (with its
//! URL filled in), run by real POSIX shells (`dash`, `busybox sh`) with `curl | sh`, enrolling the real agent, which
//! then heartbeats and updates itself. Also: every way the installer can fail leaves an existing agent untouched, a
//! truncated script does nothing, a hostile `Host` cannot inject into the script, and the systemd unit verifies.
//! Run `cargo build --workspace` first (`make test` does).
//!
//! Everything installs into temporary prefixes with `--no-service`; nothing here touches `/usr/local` or systemd.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rm_e2e::*;
use serde_json::{Value, json};

const ADMIN: &str = "rm-e2e-install-admin-token-31c9";
const UPLOAD_PATH: &str = "/api/v1/assets/agent-binaries/restic-manager-agent-linux-amd64";
const UNIT: &str = "restic-manager-agent.service";
/// Bound for one run of the installer (normally well under a second).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The shells the installer must work under: (name for messages, program and leading arguments).
const SHELLS: [(&str, &[&str]); 2] = [("dash", &["dash"]), ("busybox sh", &["busybox", "sh"])];

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// The real host agent (what the tests publish and install).
fn host_agent() -> PathBuf {
    binary(AGENT_BIN)
}

/// A server whose bundled dir holds the install script and unit from the repo and, when `publish_agent`, a copy of
/// the host agent as the linux/amd64 binary. Fixed admin token.
///
/// `RM_ROLLOUT_STRATEGY=immediate`: an upload is served to every host at once (the tests below rely on that).
fn install_server(builder: ServerBuilder, publish_agent: bool) -> Server {
    let builder = builder.env("RM_ADMIN_TOKEN", ADMIN).env("RM_ROLLOUT_STRATEGY", "immediate");
    let bundled = builder.bundled_dir().to_path_buf();
    if publish_agent {
        fs::copy(host_agent(), bundled.join("agent-binaries").join(LINUX_AMD64)).expect("copying the host agent");
    }
    fs::copy(repo_file("scripts/install.sh"), bundled.join("install/install.sh")).expect("copying install.sh");
    fs::copy(repo_file("deploy/restic-manager-agent.service"), bundled.join("install").join(UNIT))
        .expect("copying the unit");
    builder.start()
}

/// A fresh enrollment token allowing `uses` enrollments.
fn create_token(server: &Server, uses: u64) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({ "uses": uses, "note": "install_e2e" })));
    assert_eq!(r.status, 201, "creating a token: {}", r.text());
    r.json()["token"].as_str().expect("token in the answer").to_string()
}

/// The fleet view's agents.
fn agents(server: &Server) -> Vec<Value> {
    let r = server.admin("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "fleet view: {}", r.text());
    r.json()["agents"].as_array().expect("agents array").clone()
}

/// The access-log lines written so far.
fn access_lines(server: &Server) -> Vec<Value> {
    server.log_json().into_iter().filter(|l| l["target"] == "access").collect()
}

/// GETs of an agent binary (HEADs do not count): `/agent/binary?…` or a rollout's `/agent/blobs/sha256/…`.
fn binary_downloads(server: &Server) -> usize {
    let download = |u: &str| u.starts_with("/agent/binary") || u.starts_with("/agent/blobs/");
    access_lines(server).iter().filter(|l| l["method"] == "GET" && l["uri"].as_str().is_some_and(download)).count()
}

/// Single-quotes a word for `sh -c`.
fn q(word: impl AsRef<str>) -> String {
    format!("'{}'", word.as_ref().replace('\'', r"'\''"))
}

fn qp(path: &Path) -> String {
    q(path.to_str().expect("UTF-8 temp path"))
}

/// A command with an environment that cannot change what the installer does: no `RM_*` (e.g. `RM_ENROLL_TOKEN`), no
/// proxies (curl would send 127.0.0.1 requests to them), no `INVOCATION_ID` (the agent would exit instead of
/// re-executing itself after an update), and `TMPDIR` pointing at `tmpdir` so leftovers of `mktemp -d` are visible.
fn clean_command(program: impl AsRef<std::ffi::OsStr>, tmpdir: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("RM_")
            || k.to_ascii_lowercase().ends_with("_proxy")
            || k == "INVOCATION_ID"
            || k == "CURL_HOME"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("TMPDIR", tmpdir).stdin(Stdio::null());
    cmd
}

/// Runs `script` with `sh -c`, bounded.
fn sh(script: &str, tmpdir: &Path) -> Output {
    let mut cmd = clean_command("sh", tmpdir);
    cmd.arg("-c").arg(script);
    run_bounded(cmd, SCRIPT_TIMEOUT)
}

/// `<shell> <script file> <args>`, bounded, with extra environment.
fn run_script(shell: &[&str], script: &Path, args: &[&str], tmpdir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = clean_command(shell[0], tmpdir);
    cmd.args(&shell[1..]).arg(script).args(args).envs(env.iter().copied());
    run_bounded(cmd, SCRIPT_TIMEOUT)
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The names in `dir`, sorted (empty when `dir` does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = read.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).permissions().mode() & 0o7777
}

/// An installation prefix in a temp dir, plus a `TMPDIR` for the installer.
struct Prefix {
    _dir: tempfile::TempDir,
    root: PathBuf,
    tmpdir: PathBuf,
}

impl Prefix {
    fn new() -> Prefix {
        let dir = tempfile::Builder::new().prefix("rm-e2e-install-").tempdir().expect("tempdir");
        let root = dir.path().join("prefix");
        let tmpdir = dir.path().join("tmp");
        fs::create_dir(&tmpdir).unwrap();
        Prefix { root, tmpdir, _dir: dir }
    }

    /// The temp dir holding `prefix/` and `tmp/`, for other scratch files.
    fn scratch(&self) -> &Path {
        self.root.parent().unwrap()
    }

    fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    fn agent(&self) -> PathBuf {
        self.bin_dir().join(AGENT_BIN)
    }

    fn config(&self) -> PathBuf {
        self.root.join("etc/restic-manager/agent.json")
    }

    fn arg(&self) -> String {
        self.root.to_str().unwrap().to_string()
    }

    /// `mktemp -d` leftovers: the installer must remove its work dir on every exit path.
    fn assert_tmpdir_clean(&self, context: &str) {
        assert_eq!(entries(&self.tmpdir), Vec::<String>::new(), "{context}: the installer left files in TMPDIR");
    }
}

/// `curl -fsSL <url>/install/install.sh | <shell> -s -- <args>`.
fn curl_pipe(server: &Server, shell: &[&str], args: &[String], tmpdir: &Path) -> Output {
    let args: Vec<String> = args.iter().map(q).collect();
    let script =
        format!("curl -fsSL {} | {} -s -- {}", q(server.url("/install/install.sh")), shell.join(" "), args.join(" "));
    sh(&script, tmpdir)
}

/// `curl | dash` into a fresh prefix (no service) with a one-use enrollment token; the install must succeed.
fn enrolled_install(server: &Server) -> Prefix {
    let prefix = Prefix::new();
    let args = ["--prefix".into(), prefix.arg(), "--no-service".into(), "--token".into(), create_token(server, 1)];
    assert_success(&curl_pipe(server, &["dash"], &args, &prefix.tmpdir), "install");
    prefix
}

fn assert_success(out: &Output, context: &str) {
    assert!(
        out.status.success(),
        "{context}: exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr_of(out)
    );
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(Child);

/// The installed agent running (`run`, outside any service manager: no INVOCATION_ID, so it re-executes itself
/// after an update) with `env`; its stdout and stderr go to the returned log file.
fn run_agent(prefix: &Prefix, env: &[(&str, &str)]) -> (KillOnDrop, PathBuf) {
    let log_path = prefix.scratch().join("agent.log");
    let mut cmd = clean_command(prefix.agent(), &prefix.tmpdir);
    cmd.envs(env.iter().copied())
        .arg("--config")
        .arg(prefix.config())
        .arg("run")
        .stdout(fs::File::create(&log_path).unwrap())
        .stderr(fs::File::create(&log_path).unwrap().try_clone().unwrap());
    (KillOnDrop(cmd.spawn().expect("starting the agent")), log_path)
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` (which returns `Ok` when done, `Err(state)` otherwise) until it succeeds or `timeout` passes; panics
/// with the last state and `context()` then.
fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
    context: impl Fn() -> String,
) -> T {
    let mut state = String::new();
    let done = poll(timeout, || check().map_err(|last| state = last).ok());
    done.unwrap_or_else(|| panic!("waited {timeout:?} for {what}; last state: {state}\n{}", context()))
}

// ---------------------------------------------------------------------------------------------------------------
// 1. curl | sh
// ---------------------------------------------------------------------------------------------------------------

fn curl_pipe_sh_installs_enrolls_and_heartbeats(shell_name: &str, shell: &[&str]) {
    let server = install_server(Server::builder(), true);
    let token = create_token(&server, 5);
    let prefix = Prefix::new();
    let args = ["--prefix".into(), prefix.arg(), "--no-service".into(), "--token".into(), token.clone()];

    let out = curl_pipe(&server, shell, &args, &prefix.tmpdir);
    assert_success(&out, &format!("{shell_name}: first install"));
    let served = server.request("HEAD", BINARY_PATH, &[]);
    assert_eq!(served.status, 200);
    let served_sha = served.expect_header("x-checksum-sha256").to_string();
    assert_eq!(served_sha, sha256_file(&host_agent()), "the server serves the host agent");
    assert_eq!(sha256_file(&prefix.agent()), served_sha, "{shell_name}: the installed agent is the served build");
    assert_eq!(mode(&prefix.agent()) & 0o777, 0o755, "{shell_name}: the installed agent is executable");
    assert_eq!(entries(&prefix.bin_dir()), [AGENT_BIN], "{shell_name}: a temporary file was left in bin/");
    prefix.assert_tmpdir_clean(shell_name);

    let config = prefix.config();
    assert!(config.is_file(), "{shell_name}: no config at {}\n{}", config.display(), stderr_of(&out));
    assert_eq!(mode(&config), 0o600, "{shell_name}: the config holds a credential and must be 0600");
    let config_bytes = fs::read(&config).unwrap();
    let identity: Value = serde_json::from_slice(&config_bytes).expect("config is JSON");
    assert_eq!(identity["server"], server.url(""), "{shell_name}: enrolled with the server the script came from");

    let listed = agents(&server);
    assert_eq!(listed.len(), 1, "{shell_name}: one agent enrolled: {listed:?}");
    assert_eq!(listed[0]["id"], identity["agent_id"]);
    assert_eq!(binary_downloads(&server), 1, "{shell_name}: the binary was downloaded once");

    // The installed agent heartbeats with the stored identity.
    let mut run = clean_command(prefix.agent(), &prefix.tmpdir);
    run.arg("--config").arg(&config).args(["run", "--once"]);
    let beat = run_bounded(run, Duration::from_secs(20));
    assert_success(&beat, &format!("{shell_name}: agent run --once"));
    let agent = agents(&server).remove(0);
    assert!(agent["heartbeats"].as_u64().unwrap() >= 1, "{shell_name}: no heartbeat recorded: {agent}");
    assert_eq!(agent["state"], "current", "{shell_name}: {agent}");
    assert_eq!(agent["binary_sha256"], served_sha.as_str(), "{shell_name}: {agent}");

    // Re-running is a no-op: no download, no second enrollment.
    let again = curl_pipe(&server, shell, &args, &prefix.tmpdir);
    assert_success(&again, &format!("{shell_name}: second install"));
    let said = stderr_of(&again);
    assert!(said.contains("already the served build"), "{shell_name}: second run did not say so:\n{said}");
    assert_eq!(agents(&server).len(), 1, "{shell_name}: the second run enrolled again");
    assert!(fs::read(&config).unwrap() == config_bytes, "{shell_name}: the second run rewrote the config");
    assert_eq!(binary_downloads(&server), 1, "{shell_name}: the second run downloaded the binary again");
    let tokens = server.admin("GET", "/api/v1/tokens", None).json();
    assert_eq!(tokens["tokens"][0]["uses"], 1, "{shell_name}: the token was used again: {tokens}");
    assert_eq!(sha256_file(&prefix.agent()), served_sha);
    assert_eq!(entries(&prefix.bin_dir()), [AGENT_BIN]);
    prefix.assert_tmpdir_clean(shell_name);
}

#[test]
fn curl_pipe_sh_installs_enrolls_and_heartbeats_dash() {
    curl_pipe_sh_installs_enrolls_and_heartbeats(SHELLS[0].0, SHELLS[0].1);
}

#[test]
fn curl_pipe_sh_installs_enrolls_and_heartbeats_busybox() {
    curl_pipe_sh_installs_enrolls_and_heartbeats(SHELLS[1].0, SHELLS[1].1);
}

// ---------------------------------------------------------------------------------------------------------------
// 2. The server URL in the script
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn served_script_knows_its_server_and_ignores_hostile_hosts() {
    let server = install_server(Server::builder(), true);
    let base = server.url("");

    // Fetched with curl, the script defaults to the server it came from: no --server needed.
    let prefix = Prefix::new();
    let script = prefix.scratch().join("served.sh");
    let fetched =
        sh(&format!("curl -fsSL -o {} {}", qp(&script), q(server.url("/install/install.sh"))), &prefix.tmpdir);
    assert_success(&fetched, "fetching install.sh");
    let text = fs::read_to_string(&script).unwrap();
    assert!(text.contains(&format!("RM_DEFAULT_SERVER='{base}'")), "the served script does not name {base}");
    assert!(!text.contains("__RM_SERVER_URL__"), "placeholder left in the served script");
    for (name, shell) in SHELLS {
        let out = run_script(shell, &script, &["--prefix", &prefix.arg(), "--no-service"], &prefix.tmpdir, &[]);
        assert_success(&out, &format!("{name}: served script without --server"));
        let said = stderr_of(&out);
        assert!(said.contains(&format!("from {base}")) || said.contains("already the served build"), "{name}:\n{said}");
        assert!(said.contains(&format!("--server {base}")), "{name}: the enroll hint should name {base}:\n{said}");
        assert_eq!(sha256_file(&prefix.agent()), sha256_file(&host_agent()), "{name}");
        assert!(!prefix.config().exists(), "{name}: enrolled without a token");
        prefix.assert_tmpdir_clean(name);
    }
    // Control: the unrendered script from the repo knows no server.
    let raw = run_script(&["dash"], &repo_file("scripts/install.sh"), &["--dry-run"], &prefix.tmpdir, &[]);
    assert!(!raw.status.success() && stderr_of(&raw).contains("--server"), "raw script: {}", stderr_of(&raw));

    // A hostile Host header is not placed into the script: the placeholder stays and the script asks for --server.
    let scratch = tempfile::Builder::new().prefix("rm-e2e-host-").tempdir().unwrap();
    let unique = format!("{}-{}", std::process::id(), scratch.path().file_name().unwrap().to_string_lossy());
    let marker = Path::new("/tmp").join(format!("PWNED-{unique}"));
    let m = marker.to_str().unwrap();
    let hostile = [
        format!("x$(touch {m})"),
        format!("x`touch {m}`"),
        format!("x';touch {m};'"),
        format!("x\";touch {m};\""),
        format!("x;touch {m}"),
        format!("x|touch {m}"),
        format!("x&touch {m}&"),
        format!("[$(touch {m})]:80"),
        format!("127.0.0.1:{}/$(touch {m})", server.port()),
        format!("x${{IFS}}y$(touch${{IFS}}{m})"),
        "x'y".to_string(),
        "x\\y".to_string(),
    ];
    for (i, host) in hostile.iter().enumerate() {
        let file = scratch.path().join(format!("hostile-{i}.sh"));
        let mut curl = clean_command("curl", scratch.path());
        curl.args(["-fsS", "--max-time", "10", "-H"])
            .arg(format!("Host: {host}"))
            .arg("-o")
            .arg(&file)
            .arg(server.url("/install/install.sh"));
        let got = run_bounded(curl, SCRIPT_TIMEOUT);
        assert_success(&got, &format!("GET install.sh with Host {host:?}"));
        let text = fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("RM_DEFAULT_SERVER='__RM_SERVER_URL__'"),
            "Host {host:?}: the placeholder was replaced: {:?}",
            text.lines().find(|l| l.starts_with("RM_DEFAULT_SERVER="))
        );
        assert!(!text.contains("PWNED"), "Host {host:?} made it into the script");
        for (name, shell) in SHELLS {
            let p = Prefix::new();
            let out = run_script(shell, &file, &["--dry-run", "--prefix", &p.arg(), "--no-service"], &p.tmpdir, &[]);
            let said = stderr_of(&out);
            assert!(!out.status.success(), "{name}, Host {host:?}: the script ran without a server:\n{said}");
            assert!(said.contains("--server"), "{name}, Host {host:?}: should ask for --server:\n{said}");
            assert!(!p.root.exists(), "{name}, Host {host:?}: created the prefix");
            assert!(!marker.exists(), "{name}, Host {host:?}: the injected command ran ({m} exists)");
        }
    }
    assert!(!marker.exists(), "the injected command ran ({m} exists)");
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Failed installs keep the existing agent
// ---------------------------------------------------------------------------------------------------------------

/// How one failure case is set up: the `--server` URL, extra PATH entries, and what the message must mention.
struct Failure {
    name: &'static str,
    server: String,
    path_prepend: Option<PathBuf>,
    /// Substrings (case-insensitive) the error on stderr must contain.
    mentions: Vec<String>,
}

const HTML: &[u8] = b"<html>oops</html>";

fn sums_line(sha: &str) -> Vec<u8> {
    format!("{sha}  {LINUX_AMD64}\n").into_bytes()
}

/// A fake server that answers `/agent/SHA256SUMS` with `sums` and `/agent/binary` with `binary` (raw responses).
fn fake_agent_server(sums: Vec<u8>, binary: Vec<u8>) -> FakeHttp {
    FakeHttp::start(move |target| {
        if target.starts_with("/agent/SHA256SUMS") {
            raw_response("200 OK", "text/plain", &sums)
        } else if target.starts_with("/agent/binary") {
            binary.clone()
        } else {
            raw_response("404 Not Found", "application/json", br#"{"error":"not_found","message":"no"}"#)
        }
    })
}

#[test]
fn failed_installs_keep_the_existing_agent() {
    let real = install_server(Server::builder(), true);
    let unpublished = install_server(Server::builder(), false);
    let closed = ClosedPort::new();
    let other_build = sha256_hex(b"some other agent build");

    // (c) every request answered 200 with an HTML page
    let html_everywhere = FakeHttp::start(|_| raw_response("200 OK", "text/html", HTML));
    // (c') a valid SHA256SUMS, but the binary is an HTML page served with 200
    let html_binary = fake_agent_server(sums_line(&other_build), raw_response("200 OK", "text/html", HTML));
    // (d) the binary does not match the published checksum
    let payload = random_bytes(0xD, 200 * 1024);
    let mismatch =
        fake_agent_server(sums_line(&other_build), raw_response("200 OK", "application/octet-stream", &payload));
    // (e) Content-Length larger than what is sent before the connection closes
    let mut truncated = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    truncated.extend_from_slice(&payload[..payload.len() / 2]);
    let cut_short = fake_agent_server(sums_line(&sha256_hex(&payload)), truncated);
    // (g) listed in SHA256SUMS, but the download answers 404
    let gone = fake_agent_server(
        sums_line(&other_build),
        raw_response("404 Not Found", "application/json", br#"{"error":"binary_not_published","message":"x"}"#),
    );
    // (h) a file with the right checksum that is not a runnable agent
    let not_agent = b"#!/bin/sh\nexit 3\n".to_vec();
    let bad_build = fake_agent_server(
        sums_line(&sha256_hex(&not_agent)),
        raw_response("200 OK", "application/octet-stream", &not_agent),
    );

    // (f) a fake uname reporting an unsupported architecture
    let fake_bin = tempfile::Builder::new().prefix("rm-e2e-uname-").tempdir().unwrap();
    let uname = fake_bin.path().join("uname");
    write_file(&uname, b"#!/bin/sh\ncase \"$1\" in\n  -m) echo mips64 ;;\n  *) echo Linux ;;\nesac\n");
    fs::set_permissions(&uname, fs::Permissions::from_mode(0o755)).unwrap();

    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cases = [
        Failure {
            name: "(a) server down",
            server: format!("http://{}", closed.addr),
            path_prepend: None,
            mentions: s(&[&closed.addr.to_string()]),
        },
        Failure {
            name: "(b) binary not published",
            server: unpublished.url(""),
            path_prepend: None,
            mentions: s(&["linux/amd64"]),
        },
        Failure {
            name: "(c) HTML page with 200 for everything",
            server: html_everywhere.base_url(),
            path_prepend: None,
            mentions: s(&["html"]),
        },
        Failure {
            name: "(c') HTML page with 200 instead of the binary",
            server: html_binary.base_url(),
            path_prepend: None,
            mentions: s(&["html"]),
        },
        Failure {
            name: "(d) checksum mismatch",
            server: mismatch.base_url(),
            path_prepend: None,
            mentions: s(&["checksum", &other_build]),
        },
        Failure {
            name: "(e) truncated download",
            server: cut_short.base_url(),
            path_prepend: None,
            mentions: s(&["download"]),
        },
        Failure {
            name: "(f) unsupported architecture",
            server: real.url(""),
            path_prepend: Some(fake_bin.path().to_path_buf()),
            mentions: s(&["mips64", "amd64", "arm64"]),
        },
        Failure { name: "(g) download 404", server: gone.base_url(), path_prepend: None, mentions: s(&["download"]) },
        Failure {
            name: "(h) not a runnable agent",
            server: bad_build.base_url(),
            path_prepend: None,
            mentions: s(&["agent"]),
        },
    ];

    let script = repo_file("scripts/install.sh");
    let original_sha = sha256_file(&host_agent());
    let token = create_token(&real, 10);
    for case in &cases {
        for (shell_name, shell) in SHELLS {
            let context = format!("{} under {shell_name}", case.name);
            // An existing, working install.
            let prefix = Prefix::new();
            fs::create_dir_all(prefix.bin_dir()).unwrap();
            fs::copy(host_agent(), prefix.agent()).unwrap();
            let before = sha256_file(&prefix.agent());
            assert_eq!(before, original_sha);

            let mut env = Vec::new();
            let path;
            if let Some(dir) = &case.path_prepend {
                path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
                env.push(("PATH", path.as_str()));
            }
            let args = ["--prefix", &prefix.arg(), "--no-service", "--server", &case.server, "--token", &token];
            let started = Instant::now();
            let out = run_script(shell, &script, &args, &prefix.tmpdir, &env);
            let said = stderr_of(&out);
            eprintln!("{context}: {} in {:?}: {}", out.status, started.elapsed(), said.trim().replace('\n', " | "));

            assert!(!out.status.success(), "{context}: the installer succeeded:\n{said}");
            assert!(said.contains("error"), "{context}: no error message on stderr:\n{said}");
            for want in &case.mentions {
                assert!(
                    said.to_ascii_lowercase().contains(&want.to_ascii_lowercase()),
                    "{context}: the message should mention {want:?}:\n{said}"
                );
            }
            assert_eq!(sha256_file(&prefix.agent()), before, "{context}: the existing agent was changed");
            assert_eq!(mode(&prefix.agent()) & 0o777, 0o755, "{context}: the existing agent's mode changed");
            assert_eq!(entries(&prefix.bin_dir()), [AGENT_BIN], "{context}: temporary file left in bin/");
            assert!(!prefix.config().exists(), "{context}: enrolled although the install failed");
            prefix.assert_tmpdir_clean(&context);
        }
    }
    // The fake servers saw what the cases claim: the failures happened where they were meant to.
    assert!(html_binary.requests().iter().any(|t| t.starts_with("/agent/binary")), "(c') never asked for the binary");
    assert!(cut_short.requests().iter().any(|t| t.starts_with("/agent/binary")), "(e) never asked for the binary");
    assert!(bad_build.requests().iter().any(|t| t.starts_with("/agent/binary")), "(h) never asked for the binary");
    assert_eq!(binary_downloads(&real), 0, "(f) downloaded a binary for an unsupported platform");
    assert_eq!(agents(&real).len(), 0, "a failed install enrolled");
}

// ---------------------------------------------------------------------------------------------------------------
// 4. A truncated script does nothing
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn truncated_script_does_nothing() {
    // No agent is published on this server. A truncated script that wrongly runs anyway then stops at the checksum
    // list (which the access log records) instead of installing into a default prefix such as /usr/local: with its
    // arguments cut off, a partial `main` line would run with the defaults.
    let server = install_server(Server::builder(), false);
    let script_path = "/install/install.sh";
    let r = server.get(script_path);
    assert_eq!(r.status, 200);
    let full = r.body;
    // Everything the test itself asked for so far is logged before the runs start; any later line is the scripts'.
    server.wait_for_log_lines("for the script download", 1, Duration::from_secs(5), |l| l["uri"] == script_path);
    let baseline = access_lines(&server).len();
    let len = full.len();
    // The last line that calls `main "$@"` (possibly indented, possibly followed by a closing brace).
    let call = b"main \"$@\"";
    let call_at = full.windows(call.len()).rposition(|w| w == call).expect("install.sh calls main \"$@\"");
    let main_line = full[..call_at].iter().rposition(|&b| b == b'\n').map_or(0, |nl| nl + 1);
    let after_call = call_at + call.len() + 1;

    // Every 97 bytes, the last 20 offsets before the end (up to, not including, the complete script without its
    // final newline), right before the `main` line and at each byte inside it.
    let mut cuts: Vec<usize> = (0..len).step_by(97).collect();
    cuts.extend(len.saturating_sub(21)..len - 1);
    cuts.extend(main_line..after_call.min(len - 1));
    cuts.sort_unstable();
    cuts.dedup();

    let scratch = tempfile::Builder::new().prefix("rm-e2e-trunc-").tempdir().unwrap();
    let input = scratch.path().join("input.sh");
    let watched = scratch.path().join("watched");
    let tmpdir = scratch.path().join("tmp");
    fs::create_dir_all(&watched).unwrap();
    fs::create_dir_all(&tmpdir).unwrap();
    let prefix = watched.join("prefix");
    let args =
        ["-s", "--", "--prefix", prefix.to_str().unwrap(), "--no-service", "--server", &server.url(""), "--token", "T"];

    let mut acted = Vec::new();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for (shell_name, shell) in SHELLS {
        for &cut in &cuts {
            fs::write(&input, &full[..cut]).unwrap();
            let requests_before = access_lines(&server).len();
            let mut cmd = clean_command(shell[0], &tmpdir);
            cmd.args(&shell[1..]).args(args).stdin(fs::File::open(&input).unwrap());
            let out = run_bounded(cmd, SCRIPT_TIMEOUT);
            *statuses.entry(format!("{shell_name}: {}", out.status)).or_default() += 1;
            let created = entries(&watched);
            let requests = access_lines(&server).len() - requests_before;
            if !created.is_empty() || requests > 0 || !entries(&tmpdir).is_empty() {
                let tail = String::from_utf8_lossy(&full[cut.saturating_sub(24)..cut]).into_owned();
                acted.push(format!(
                    "{shell_name}, cut at {cut}/{len} (…{tail:?}): {}, created {created:?}, {requests} request(s), \
                     stderr: {}",
                    out.status,
                    stderr_of(&out).trim().replace('\n', " | ")
                ));
                let _ = fs::remove_dir_all(&prefix);
            }
        }
    }
    // Requests are logged when their response ends: wait for a marker request's line before the final count.
    let sentinel = "/healthz?truncation-test-sentinel";
    assert_eq!(server.get(sentinel).status, 200);
    server.wait_for_log_lines("for the sentinel request", 1, Duration::from_secs(5), |l| l["uri"] == sentinel);
    let stray: Vec<String> = access_lines(&server)[baseline..]
        .iter()
        .filter(|l| l["uri"] != sentinel)
        .map(|l| format!("{} {} -> {}", l["method"], l["uri"], l["status"]))
        .collect();
    eprintln!("{} cuts per shell; exit statuses: {statuses:?}", cuts.len());
    assert!(
        acted.is_empty() && stray.is_empty(),
        "a truncated install.sh acted:\n{}\nrequests that reached the server: {stray:?}",
        acted.join("\n")
    );

    // Control: the complete script (with or without its final newline) does reach the server, so the check above
    // can see a script that acts.
    for complete in [len, len - 1] {
        fs::write(&input, &full[..complete]).unwrap();
        let before = access_lines(&server).len();
        let mut cmd = clean_command("dash", &tmpdir);
        cmd.args(args).stdin(fs::File::open(&input).unwrap());
        let out = run_bounded(cmd, SCRIPT_TIMEOUT);
        assert!(!out.status.success(), "nothing is published, so the complete script must fail: {}", stderr_of(&out));
        assert!(stderr_of(&out).contains("linux/amd64"), "{}", stderr_of(&out));
        server.wait_for_log_lines(
            "for the complete script's SHA256SUMS request",
            before + 1,
            Duration::from_secs(5),
            |l| l["target"] == "access",
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Self-update
// ---------------------------------------------------------------------------------------------------------------

fn upload_agent(server: &Server, bytes: &[u8]) {
    let auth = format!("Bearer {ADMIN}");
    let sum = sha256_hex(bytes);
    let r = http_request_with_body(
        server.addr(),
        "PUT",
        UPLOAD_PATH,
        &[("Authorization", &auth), ("X-Checksum-Sha256", &sum)],
        bytes,
    )
    .unwrap_or_else(|e| panic!("upload failed: {e}\n{}", server.log_tail()));
    assert!(matches!(r.status, 200 | 201), "upload: {} {}", r.status, r.text());
    // With `RM_ROLLOUT_STRATEGY=immediate` the server turns the upload into a running rollout within a tick; wait
    // for it, so the next heartbeat names the new build. A build that is already the released one makes none.
    let started = std::time::Instant::now();
    loop {
        let r = server.request("GET", "/api/v1/rollouts", &[("Authorization", &auth)]);
        let named = r.json()["rollouts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .find(|ro| ro["targets"].as_array().is_some_and(|t| t.iter().any(|t| t["to_sha256"] == sum.as_str())));
        match named {
            Some(ro) if ro["state"] != "pending" => return,
            None if started.elapsed() > Duration::from_secs(3) => return,
            _ if started.elapsed() > Duration::from_secs(15) => {
                panic!("no rollout of {sum} started: {}\n{}", r.text(), server.log_tail())
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn self_update_converges_and_rejects_broken_builds() {
    let server = install_server(Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s"), true);
    let prefix = enrolled_install(&server);
    let old = fs::read(prefix.agent()).unwrap();
    let old_sha = sha256_hex(&old);
    let agent_id = agents(&server)[0]["id"].as_str().unwrap().to_string();

    // The running agent, outside any service manager (no INVOCATION_ID: it re-executes itself after an update), with
    // a 2 s trial start of each new build.
    let (mut child, log_path) = run_agent(&prefix, &[("RM_AGENT_TRIAL_SECS", "2")]);
    let agent_log =
        || format!("--- agent log ---\n{}\n{}", fs::read_to_string(&log_path).unwrap_or_default(), server.log_tail());
    let view =
        |server: &Server| agents(server).into_iter().find(|a| a["id"] == agent_id.as_str()).expect("agent listed");
    wait_until(
        "the first heartbeat",
        Duration::from_secs(10),
        || {
            let a = view(&server);
            if a["heartbeats"].as_u64() > Some(0) && a["state"] == "current" { Ok(()) } else { Err(a.to_string()) }
        },
        agent_log,
    );

    // A new build: the same agent with bytes appended (still runs, different SHA-256).
    let mut new = old.clone();
    new.extend_from_slice(b"\nrm-e2e: a new build of the agent\n");
    let new_sha = sha256_hex(&new);
    upload_agent(&server, &new);
    let previous = prefix.bin_dir().join(format!("{AGENT_BIN}.previous"));
    wait_until(
        "the agent to install the new build, try it for 2 s, restart and report it",
        Duration::from_secs(25),
        || {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("the agent process exited with {status}\n{}", agent_log());
            }
            let installed = sha256_file(&prefix.agent());
            let kept = if previous.exists() { sha256_file(&previous) } else { "(none)".into() };
            let a = view(&server);
            // The trial child's heartbeats name the new build already: done once the agent restarted into it.
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let restarted = log.rsplit_once("the new build stayed up for its trial window").unwrap_or_default().1;
            if installed == new_sha
                && kept == old_sha
                && a["state"] == "current"
                && a["binary_sha256"] == new_sha.as_str()
                && restarted.contains("running as agent")
            {
                Ok(())
            } else {
                Err(format!("installed {installed}, previous {kept}, fleet view {a}"))
            }
        },
        agent_log,
    );
    assert_eq!(mode(&prefix.agent()) & 0o777, 0o755, "the updated agent keeps its mode");
    let mut expected = vec![AGENT_BIN.to_string(), format!("{AGENT_BIN}.previous")];
    expected.sort();
    assert_eq!(entries(&prefix.bin_dir()), expected, "temporary files left in bin/ after the update");

    // A broken build: fails its smoke test (`--version` exits 3). The agent keeps running the good build and reports.
    let broken = b"#!/bin/sh\nexit 3\n".to_vec();
    upload_agent(&server, &broken);
    let reported = wait_until(
        "the agent to report the failed update",
        Duration::from_secs(10),
        || {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("the agent process exited with {status}\n{}", agent_log());
            }
            let a = view(&server);
            match a["last_update_error"].as_str() {
                Some(_) if a["state"] == "out_of_date" => Ok(a),
                _ => Err(a.to_string()),
            }
        },
        agent_log,
    );
    let error = reported["last_update_error"].as_str().unwrap();
    assert!(error.contains("smoke test"), "last_update_error should name the smoke test: {error}");
    assert!(error.contains(&sha256_hex(&broken)), "last_update_error should name the refused build: {error}");
    assert_eq!(reported["binary_sha256"], new_sha.as_str(), "{reported}");
    assert_eq!(reported["served_sha256"], sha256_hex(&broken).as_str(), "{reported}");
    // A few more heartbeats: no retry loop replaces the binary, the process stays up.
    let beats = reported["heartbeats"].as_u64().unwrap();
    wait_until(
        "two more heartbeats",
        Duration::from_secs(10),
        || {
            let a = view(&server);
            if a["heartbeats"].as_u64().unwrap() >= beats + 2 { Ok(()) } else { Err(a.to_string()) }
        },
        agent_log,
    );
    assert!(child.0.try_wait().unwrap().is_none(), "the agent exited after the failed update\n{}", agent_log());
    assert_eq!(sha256_file(&prefix.agent()), new_sha, "the broken build replaced the good one\n{}", agent_log());
    assert_eq!(sha256_file(&previous), old_sha);
    assert_eq!(entries(&prefix.bin_dir()), expected, "temporary files left in bin/ after the refused update");
    let a = view(&server);
    assert_eq!(a["state"], "out_of_date", "{a}");
    assert!(a["last_update_error"].as_str().is_some_and(|e| e.contains("smoke test")), "{a}");
    drop(child);
}

/// A build that passes its smoke test (`--version`) but exits 1 as soon as it runs, leaving behind a process that
/// holds its stdout and stderr open for ten minutes (its pid in `pidfile`).
fn dies_at_start(pidfile: &Path) -> Vec<u8> {
    format!(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then\n  echo 'restic-manager-agent version=9.9.9 commit=x date=y'\n  exit 0\n\
         fi\nsleep 600 &\necho $! > {}\necho 'rm-e2e: this build dies at start' >&2\nexit 1\n",
        qp(pidfile)
    )
    .into_bytes()
}

#[test]
fn a_build_that_dies_at_start_is_reverted_by_the_agent() {
    let server = install_server(Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s"), true);
    let prefix = enrolled_install(&server);
    let old = fs::read(prefix.agent()).unwrap();
    let old_sha = sha256_hex(&old);
    let agent_id = agents(&server)[0]["id"].as_str().unwrap().to_string();
    let marker = prefix.root.join("etc/restic-manager/update-trial.json");
    let previous = prefix.bin_dir().join(format!("{AGENT_BIN}.previous"));
    let expected_bin = {
        let mut e = vec![AGENT_BIN.to_string(), format!("{AGENT_BIN}.previous")];
        e.sort();
        e
    };

    let (mut child, log_path) = run_agent(&prefix, &[("RM_AGENT_TRIAL_SECS", "2")]);
    let agent_log =
        || format!("--- agent log ---\n{}\n{}", fs::read_to_string(&log_path).unwrap_or_default(), server.log_tail());
    let view =
        |server: &Server| agents(server).into_iter().find(|a| a["id"] == agent_id.as_str()).expect("agent listed");
    let up = |child: &mut KillOnDrop| {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the agent process exited with {status}\n{}", agent_log());
        }
    };
    wait_until(
        "the first heartbeat",
        Duration::from_secs(10),
        || if view(&server)["heartbeats"].as_u64() > Some(0) { Ok(()) } else { Err(view(&server).to_string()) },
        agent_log,
    );

    // Served a build that passes `--version` and dies when run: swapped in, tried, reverted by the agent itself.
    let left_behind = KillPidFile(prefix.scratch().join("left-behind.pid"));
    let crashing = dies_at_start(&left_behind.0);
    let crashing_sha = sha256_hex(&crashing);
    upload_agent(&server, &crashing);
    let reported = wait_until(
        "the agent to try the build, revert it and report it",
        Duration::from_secs(20),
        || {
            up(&mut child);
            let a = view(&server);
            match a["last_update_error"].as_str() {
                Some(e) if e.contains("reverted") && a["binary_sha256"] == old_sha.as_str() => Ok(a),
                _ => Err(a.to_string()),
            }
        },
        agent_log,
    );
    let error = reported["last_update_error"].as_str().unwrap();
    assert!(error.starts_with(&format!("update to {crashing_sha} reverted: the new build exited ")), "{error}");
    assert!(error.contains("exit status: 1") && error.contains("rm-e2e: this build dies at start"), "{error}");
    assert_eq!(reported["served_sha256"], crashing_sha.as_str(), "{reported}");
    assert_eq!(fs::read(prefix.agent()).unwrap(), old, "the agent binary is not byte-identical to the one before");
    assert_eq!(mode(&prefix.agent()) & 0o777, 0o755);
    assert_eq!(fs::read(&previous).unwrap(), old, ".previous is still the running build's copy");
    assert_eq!(entries(&prefix.bin_dir()), expected_bin, "temporary files left in bin/ after the revert");
    assert!(!marker.exists(), "a reverted build leaves no trial marker");
    let log = fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("trial: rm-e2e: this build dies at start"), "the child's stderr is forwarded:\n{log}");
    // What it left holding its pipes neither held the agent up (the error names "0 s" or "1 s") nor outlived it.
    assert!(error.contains("exited 0 s after") || error.contains("exited 1 s after"), "{error}");
    let pid = left_behind.pid().expect("the build ran and wrote its grandchild's pid");
    eventually(Duration::from_secs(5), format_args!("the grandchild {pid} to be killed"), || {
        (!alive(pid)).then_some(())
    });

    // Later heartbeats: the build is not downloaded again, the process stays up, the error stays.
    let downloads = binary_downloads(&server);
    let beats = view(&server)["heartbeats"].as_u64().unwrap();
    wait_until(
        "three more heartbeats",
        Duration::from_secs(15),
        || {
            up(&mut child);
            let a = view(&server);
            if a["heartbeats"].as_u64().unwrap() >= beats + 3 { Ok(()) } else { Err(a.to_string()) }
        },
        agent_log,
    );
    assert_eq!(binary_downloads(&server), downloads, "the reverted build was downloaded again\n{}", agent_log());
    let a = view(&server);
    assert_eq!(a["binary_sha256"], old_sha.as_str(), "{a}");
    assert!(a["last_update_error"].as_str().is_some_and(|e| e.contains("reverted")), "{a}");
    assert_eq!(fs::read(prefix.agent()).unwrap(), old);

    // A build that runs (and speaks the trial protocol) but never gets a heartbeat through, while the agent's own
    // heartbeats are answered: it would be cut off from every later update, so it is reverted too, with what it
    // started.
    let pidfile = KillPidFile(prefix.scratch().join("mute.pid"));
    let mute = format!(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'restic-manager-agent version=9.9.9 commit=x date=y'; exit 0; \
         fi\necho 'restic-manager-agent trial: started'\nsleep 600 &\necho $! > {}\nwait\n",
        qp(&pidfile.0)
    );
    let mute_sha = sha256_hex(mute.as_bytes());
    upload_agent(&server, mute.as_bytes());
    let reported = wait_until(
        "the agent to try the mute build, revert it and report it",
        Duration::from_secs(20),
        || {
            up(&mut child);
            let a = view(&server);
            match a["last_update_error"].as_str() {
                Some(e) if e.contains(&mute_sha) && a["binary_sha256"] == old_sha.as_str() => Ok(a),
                _ => Err(a.to_string()),
            }
        },
        agent_log,
    );
    let error = reported["last_update_error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("update to {mute_sha} reverted: the new build stayed up for 2 s but none of its"))
            && error.contains("heartbeats was answered"),
        "{error}"
    );
    assert_eq!(fs::read(prefix.agent()).unwrap(), old);
    assert_eq!(entries(&prefix.bin_dir()), expected_bin, "temporary files left in bin/ after the revert");
    let pid = pidfile.pid().expect("the mute build ran");
    eventually(Duration::from_secs(5), format_args!("what the mute build started ({pid}) to be killed"), || {
        (!alive(pid)).then_some(())
    });

    // A good new build still goes through its trial, is installed and reported; its marker goes once it stayed up.
    let mut new = old.clone();
    new.extend_from_slice(b"\nrm-e2e: a good build after a reverted one\n");
    let new_sha = sha256_hex(&new);
    upload_agent(&server, &new);
    wait_until(
        "the agent to install the good build through its trial and report it",
        Duration::from_secs(25),
        || {
            up(&mut child);
            let a = view(&server);
            // The trial child's heartbeats already name the new build: done only once the agent restarted into it
            // (the same pid: it re-executes itself) and the new process settled (its marker gone).
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let restarted = log.rsplit_once("the new build stayed up for its trial window").unwrap_or_default().1;
            if sha256_file(&prefix.agent()) == new_sha
                && a["binary_sha256"] == new_sha.as_str()
                && a["last_update_error"].is_null()
                && a["state"] == "current"
                && restarted.contains("running as agent")
                && !marker.exists()
            {
                Ok(())
            } else {
                Err(format!("installed {}, marker {}, fleet view {a}", sha256_file(&prefix.agent()), marker.exists()))
            }
        },
        agent_log,
    );
    assert_eq!(fs::read(&previous).unwrap(), old, ".previous is the build before the good one");
    assert_eq!(entries(&prefix.bin_dir()), expected_bin, "temporary files left in bin/ after the update");
    drop(child);

    // A crash loop of that build (as a service manager restarting it would see): its fourth start since the trial
    // reverts it. The marker is written as the agent writes it after a passed trial, three starts counted already.
    let crash_marker = json!({ "sha256": new_sha, "previous_sha256": old_sha, "starts": 3 });
    fs::write(&marker, crash_marker.to_string()).unwrap();
    let config = prefix.config();
    let status = agent_cmd(&prefix.agent(), &["--config", config.to_str().unwrap(), "status"], &prefix.tmpdir);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains(&format!("update trial: build {new_sha} (replacing {old_sha}) started 3 time(s)")),
        "{shown}"
    );
    let mut cmd = clean_command(prefix.agent(), &prefix.tmpdir);
    cmd.arg("--config").arg(prefix.config()).args(["run", "--once"]);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert_success(&out, "run --once of a crash-looping build");
    let said = stderr_of(&out);
    assert_eq!(fs::read(prefix.agent()).unwrap(), old, "the crash-looping build was not reverted:\n{said}");
    assert!(!marker.exists(), "{said}");
    let a = view(&server);
    let error = a["last_update_error"].as_str().unwrap_or_else(|| panic!("no error reported: {a}\n{said}"));
    assert!(
        error.contains(&format!("update to {new_sha} reverted: crash-looped at start: started 4 times")),
        "{error}"
    );
    assert_eq!(a["binary_sha256"], old_sha.as_str(), "the old build runs again and says so: {a}\n{said}");
    assert_eq!(entries(&prefix.bin_dir()), expected_bin);

    // `revert` refuses a `.previous` it cannot vouch for, and touches nothing.
    fs::write(&previous, b"#!/bin/sh\necho not an agent\n").unwrap();
    let out = agent_cmd(&prefix.agent(), &["--config", config.to_str().unwrap(), "revert"], &prefix.tmpdir);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr_of(&out).contains("cannot revert to the previous build"), "{}", stderr_of(&out));
    assert_eq!(fs::read(prefix.agent()).unwrap(), old);
    assert_eq!(entries(&prefix.bin_dir()), expected_bin);
}

#[test]
fn an_agent_stopped_or_killed_during_a_trial_leaves_no_trial_child() {
    let server = install_server(Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s"), true);
    let prefix = enrolled_install(&server);
    let old = fs::read(prefix.agent()).unwrap();
    let etc = prefix.root.join("etc/restic-manager");
    let marker = etc.join("update-trial.json");
    let mut new = old.clone();
    new.extend_from_slice(b"\nrm-e2e: a build on a long trial\n");
    let new_sha = sha256_hex(&new);
    upload_agent(&server, &new);
    // The pid of the trial child the agent logged (a 60 s window: the test ends it long before).
    let trial_pid = |log_path: &Path, server: &Server| {
        let log = || fs::read_to_string(log_path).unwrap_or_default();
        let pid = wait_until(
            "the trial start",
            Duration::from_secs(20),
            || {
                let log = log();
                let pid = log.split("for 60 s (pid ").nth(1).and_then(|r| r.split(')').next()?.parse::<i32>().ok());
                pid.filter(|_| log.contains("trial: heartbeats answered")).ok_or(log)
            },
            || format!("--- agent log ---\n{}\n{}", log(), server.log_tail()),
        );
        assert!(alive(pid), "the trial child {pid}");
        pid
    };

    // SIGTERM during the trial: the child is stopped, the previous build put back, nothing remembered, a clean exit.
    let (mut child, log_path) = run_agent(&prefix, &[("RM_AGENT_TRIAL_SECS", "60")]);
    let pid = trial_pid(&log_path, &server);
    assert_eq!(sha256_file(&prefix.agent()), new_sha, "the build on trial is in place");
    assert!(marker.exists(), "its starts are watched from before the trial");
    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_timeout(&mut child.0, Duration::from_secs(15)).expect("the agent to stop on SIGTERM");
    let log = fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(!alive(pid), "the trial child {pid} outlived the agent\n{log}");
    assert!(log.contains("the previous build is back"), "{log}");
    assert_eq!(fs::read(prefix.agent()).unwrap(), old, "{log}");
    assert!(!marker.exists(), "{log}");
    let state = fs::read_to_string(etc.join("agent-state.json")).unwrap_or_default();
    assert!(!state.contains("failed_update"), "a stop is not the build's fault: {state}");
    drop(child);

    // SIGKILL during the trial: the child dies with the agent (PR_SET_PDEATHSIG); the build on trial stays installed,
    // unproven: its marker counts its starts.
    let (mut child, log_path) = run_agent(&prefix, &[("RM_AGENT_TRIAL_SECS", "60")]);
    let pid = trial_pid(&log_path, &server);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    eventually(Duration::from_secs(5), format_args!("the trial child {pid} to die with the agent"), || {
        (!alive(pid)).then_some(())
    });
    assert_eq!(sha256_file(&prefix.agent()), new_sha);
    let m: Value = serde_json::from_slice(&fs::read(&marker).unwrap()).unwrap();
    assert_eq!(m, json!({ "sha256": new_sha, "previous_sha256": sha256_hex(&old), "starts": 0 }));
    assert_eq!(mode(&marker), 0o600);
}

// ---------------------------------------------------------------------------------------------------------------
// 6, 7. The unit file and the script itself
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn systemd_unit_is_hardened() {
    let unit = fs::read_to_string(repo_file("deploy/restic-manager-agent.service")).unwrap();
    let service: Vec<&str> = unit
        .lines()
        .skip_while(|l| l.trim() != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .map(str::trim)
        .collect();
    for want in ["NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure"] {
        assert!(service.contains(&want), "[Service] lacks {want}");
    }
    assert!(
        service.iter().any(|l| l.starts_with("ProtectHome=") && !l.ends_with("=no") && !l.ends_with("=false")),
        "[Service] lacks ProtectHome"
    );
    assert!(
        service.contains(&"ExecStart=/usr/local/bin/restic-manager-agent run --config /etc/restic-manager/agent.json"),
        "install.sh rewrites /usr/local/bin and /etc/restic-manager/agent.json in ExecStart: {service:?}"
    );
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !have("systemd-analyze") {
        return skip("systemd-analyze not installed: apt-get install systemd");
    }
    let unit = fs::read_to_string(repo_file("deploy/restic-manager-agent.service")).unwrap();
    let dir = tempfile::Builder::new().prefix("rm-e2e-unit-").tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::copy(host_agent(), bin.join(AGENT_BIN)).unwrap();
    let path = dir.path().join(UNIT);
    fs::write(&path, unit.replace("/usr/local/bin", bin.to_str().unwrap())).unwrap();
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg(&path).env("SYSTEMD_LOG_COLOR", "0");
    let out = run_bounded(cmd, Duration::from_secs(30));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr_of(&out));
    assert!(out.status.success(), "systemd-analyze verify failed ({}):\n{said}", out.status);
    // Unknown keys and unparsable values are only warnings (exit 0): none may concern our unit.
    let warnings: Vec<&str> = said.lines().filter(|l| l.contains(UNIT)).collect();
    assert!(warnings.is_empty(), "systemd-analyze verify warned about the unit:\n{}", warnings.join("\n"));
}

/// `make lint` runs shellcheck on the script; here the shells it must run under parse it.
#[test]
fn posix_shells_parse_the_script() {
    let script = repo_file("scripts/install.sh");
    for (name, shell) in SHELLS {
        let mut cmd = Command::new(shell[0]);
        cmd.args(&shell[1..]).arg("-n").arg(&script);
        let out = run_bounded(cmd, Duration::from_secs(10));
        assert_success(&out, &format!("{name} -n install.sh"));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Credentials, downgrades and hostile update announcements
// ---------------------------------------------------------------------------------------------------------------

/// The credential the hand-written agent identities below carry.
const CREDENTIAL: &str = "rmagt_e2eagent_c0ffee-secret-never-elsewhere";

/// A copy of the host agent in `<dir>/bin` with an identity enrolled at `server`; returns (agent, config).
fn hand_enrolled_agent(dir: &Path, server: &str) -> (PathBuf, PathBuf) {
    let agent = dir.join("bin").join(AGENT_BIN);
    fs::create_dir_all(agent.parent().unwrap()).unwrap();
    fs::copy(host_agent(), &agent).unwrap();
    let config = dir.join("agent.json");
    let identity = json!({ "server": server, "agent_id": "e2eagent", "credential": CREDENTIAL });
    fs::write(&config, serde_json::to_vec(&identity).unwrap()).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    (agent, config)
}

/// A heartbeat answer (200, JSON) announcing `update` as the served build.
fn heartbeat_answer(update: Value) -> Vec<u8> {
    let body = json!({ "protocol": 1, "agent_id": "e2eagent", "heartbeat_interval_secs": 60, "update": update });
    raw_response("200 OK", "application/json", body.to_string().as_bytes())
}

/// A linux/amd64 platform entry for a build of `size` bytes and `sha256` at `url`.
fn served_entry(url: &str, size: u64, sha256: &str) -> Value {
    json!({ "os": "linux", "arch": "amd64", "file": LINUX_AMD64, "published": true, "size": size,
            "sha256": sha256, "url": url })
}

#[test]
fn agent_sends_its_credential_only_to_the_enrolled_origin() {
    // The other origin: records whatever reaches it, and would hand out a "build".
    let other = FakeHttp::start(|_| raw_response("200 OK", "application/octet-stream", b"not for you"));
    let elsewhere = format!("{}/agent/binary?os=linux&arch=amd64", other.base_url());
    let sha = sha256_hex(b"not for you");
    let entry = served_entry(&elsewhere, 11, &sha);
    let manifest = json!({ "server": { "version": "9", "commit": "x", "date": "y" }, "agents": [entry.clone()] });
    // The enrolled server announces a build on the other origin, in heartbeats and in its manifest.
    let enrolled = FakeHttp::start(move |target| {
        if target.starts_with("/api/v1/agents/heartbeat") {
            heartbeat_answer(entry.clone())
        } else if target.starts_with("/agent/manifest") {
            raw_response("200 OK", "application/json", manifest.to_string().as_bytes())
        } else {
            raw_response("404 Not Found", "application/json", br#"{"error":"not_found","message":"no"}"#)
        }
    });
    let dir = tempfile::Builder::new().prefix("rm-e2e-origin-").tempdir().unwrap();
    let (agent, config) = hand_enrolled_agent(dir.path(), &enrolled.base_url());
    let before = sha256_file(&agent);

    let mut said = Vec::new();
    for args in [&["run", "--once"][..], &["update"], &["update", "--check"], &["status"]] {
        let mut cmd = clean_command(&agent, dir.path());
        cmd.arg("--config").arg(&config).args(args);
        let out = run_bounded(cmd, Duration::from_secs(20));
        said.push(format!("{args:?}: {}\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), stderr_of(&out)));
    }
    let said = said.join("\n");
    let leaked: Vec<String> = other.heads().into_iter().filter(|h| h.contains(CREDENTIAL)).collect();
    assert!(leaked.is_empty(), "the credential reached another origin:\n{}\n--- agent ---\n{said}", leaked.join("\n"));
    assert_eq!(other.requests(), Vec::<String>::new(), "the agent fetched from an origin it never enrolled with");
    assert!(said.contains("not on the server this agent enrolled with"), "the refusal is not explained:\n{said}");
    assert_eq!(sha256_file(&agent), before, "the agent was replaced");
    assert_eq!(entries(&dir.path().join("bin")), [AGENT_BIN], "files left next to the agent");
    // The enrolled server itself did get the credential, on the heartbeat and on the manifest.
    let heads = enrolled.heads();
    for path in ["/api/v1/agents/heartbeat", "/agent/manifest"] {
        assert!(
            heads.iter().any(|h| h.contains(path) && h.contains(&format!("Bearer {CREDENTIAL}"))),
            "no {path} request with the credential reached the enrolled server:\n{heads:?}"
        );
    }
}

#[test]
fn agent_stops_a_download_at_the_announced_size() {
    const ANNOUNCED: u64 = 1000;
    const SENT: usize = 16 * 1024 * 1024;
    let bytes = random_bytes(7, SENT);
    let mut close_delimited =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n".to_vec();
    close_delimited.extend_from_slice(&bytes);
    let mut chunked = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\
                        Connection: close\r\n\r\n"
        .to_vec();
    for chunk in bytes.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");

    for (name, body) in [("no Content-Length", close_delimited), ("chunked", chunked)] {
        let entry = served_entry("/agent/binary?os=linux&arch=amd64", ANNOUNCED, &sha256_hex(&bytes[..1000]));
        let fake = FakeHttp::start(move |target| {
            if target.starts_with("/api/v1/agents/heartbeat") { heartbeat_answer(entry.clone()) } else { body.clone() }
        });
        let dir = tempfile::Builder::new().prefix("rm-e2e-size-").tempdir().unwrap();
        let (agent, config) = hand_enrolled_agent(dir.path(), &fake.base_url());
        let before = sha256_file(&agent);
        let mut cmd = clean_command(&agent, dir.path());
        cmd.arg("--config").arg(&config).args(["run", "--once"]);
        // No file the agent writes may grow past the announced size plus one 64 KiB read: beyond that the kernel
        // stops it with SIGXFSZ, which fails the test below.
        let limit = ANNOUNCED + 64 * 1024;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = run_bounded(cmd, Duration::from_secs(30));
        let said = stderr_of(&out);
        assert!(out.status.success(), "{name}: the agent did not stop at the announced size: {}\n{said}", out.status);
        assert!(said.contains(&format!("more than the {ANNOUNCED} bytes it announced")), "{name}:\n{said}");
        assert_eq!(sha256_file(&agent), before, "{name}: the agent was replaced");
        assert_eq!(entries(&dir.path().join("bin")), [AGENT_BIN], "{name}: the temporary file was left behind");
        assert!(fake.requests().iter().any(|t| t.starts_with("/agent/binary")), "{name}: never asked for the binary");
    }
}

/// Kills (SIGKILL) the process whose pid is in a file, on drop: cleanup for a grandchild a broken agent left.
struct KillPidFile(PathBuf);

impl KillPidFile {
    fn pid(&self) -> Option<i32> {
        fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
}

impl Drop for KillPidFile {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain syscall on a pid this test's candidate started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[test]
fn smoke_test_limit_holds_against_a_grandchild_holding_stdout() {
    let server = install_server(Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s"), true);
    let prefix = enrolled_install(&server);
    let good_sha = sha256_file(&prefix.agent());
    let agent_id = agents(&server)[0]["id"].as_str().unwrap().to_string();

    let (mut child, log_path) = run_agent(&prefix, &[("RM_AGENT_SMOKE_TIMEOUT", "2")]);
    let agent_log =
        || format!("--- agent log ---\n{}\n{}", fs::read_to_string(&log_path).unwrap_or_default(), server.log_tail());
    let view =
        |server: &Server| agents(server).into_iter().find(|a| a["id"] == agent_id.as_str()).expect("agent listed");
    wait_until(
        "the first heartbeat",
        Duration::from_secs(10),
        || if view(&server)["heartbeats"].as_u64() > Some(0) { Ok(()) } else { Err(view(&server).to_string()) },
        agent_log,
    );

    // A "build" that identifies as the agent, exits 0, and leaves a child holding its stdout for ten minutes.
    let pidfile = KillPidFile(prefix.scratch().join("grandchild.pid"));
    let candidate = format!(
        "#!/bin/sh\necho 'restic-manager-agent version=9.9.9 commit=e2e date=2000-01-01'\nsleep 600 &\necho $! > {}\n",
        qp(&pidfile.0)
    );
    let started = Instant::now();
    upload_agent(&server, candidate.as_bytes());
    let reported = wait_until(
        "the agent to refuse the build and report it (2 s smoke limit + a heartbeat)",
        Duration::from_secs(12),
        || {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("the agent process exited with {status}\n{}", agent_log());
            }
            let a = view(&server);
            if a["last_update_error"].as_str().is_some_and(|e| e.contains("smoke test")) {
                Ok(a)
            } else {
                Err(a.to_string())
            }
        },
        agent_log,
    );
    eprintln!("refused and reported after {:?}", started.elapsed());
    let error = reported["last_update_error"].as_str().unwrap();
    assert!(error.contains("left a process behind"), "{error}");
    let pid = pidfile.pid().expect("the candidate ran and wrote its grandchild's pid");
    eventually(Duration::from_secs(5), format_args!("the grandchild {pid} to be killed"), || {
        (!alive(pid)).then_some(())
    });
    // The agent goes on heartbeating, with the good build.
    let beats = view(&server)["heartbeats"].as_u64().unwrap();
    wait_until(
        "two more heartbeats",
        Duration::from_secs(10),
        || {
            let a = view(&server);
            if a["heartbeats"].as_u64().unwrap() >= beats + 2 { Ok(()) } else { Err(a.to_string()) }
        },
        agent_log,
    );
    assert_eq!(sha256_file(&prefix.agent()), good_sha, "the refused build replaced the agent");
    let mut expected = vec![AGENT_BIN.to_string()];
    expected.extend(entries(&prefix.bin_dir()).into_iter().filter(|n| n.ends_with(".previous")));
    expected.sort();
    assert_eq!(entries(&prefix.bin_dir()), expected, "temporary files left in bin/");
}

/// `Authorization: Bearer <token>` in a 0600 file, for `curl -H @file` (the token stays off the command line).
fn header_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("auth.header");
    fs::write(&path, format!("Authorization: Bearer {token}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `curl -H @header | <shell> -s -- <args>` with `RM_ENROLL_TOKEN` (when given) and extra PATH entries.
fn curl_pipe_authed(
    server: &Server,
    shell: &[&str],
    header: &Path,
    args: &[String],
    tmpdir: &Path,
    env: &[(&str, &str)],
) -> Output {
    let args: Vec<String> = args.iter().map(q).collect();
    let script = format!(
        "curl -fsSL -H @{} {} | {} -s -- {}",
        qp(header),
        q(server.url("/install/install.sh")),
        shell.join(" "),
        args.join(" ")
    );
    let mut cmd = clean_command("sh", tmpdir);
    cmd.arg("-c").arg(script).envs(env.iter().copied());
    run_bounded(cmd, SCRIPT_TIMEOUT)
}

#[test]
fn require_download_auth_install_update_and_status() {
    let server = install_server(Server::builder().env("RM_REQUIRE_DOWNLOAD_AUTH", "true"), true);
    assert_eq!(server.get("/agent/SHA256SUMS").status, 401, "the server must require download auth");
    for (i, (name, shell)) in SHELLS.into_iter().enumerate() {
        let token = create_token(&server, 1);
        let prefix = Prefix::new();
        let header = header_file(prefix.scratch(), &token);
        let mut args = vec!["--prefix".to_string(), prefix.arg(), "--no-service".into()];
        // dash: the token in the environment (the documented form); busybox: on the command line.
        let env: Vec<(&str, &str)> = if i == 0 {
            vec![("RM_ENROLL_TOKEN", token.as_str())]
        } else {
            args.extend(["--token".to_string(), token.clone()]);
            vec![]
        };
        let out = curl_pipe_authed(&server, shell, &header, &args, &prefix.tmpdir, &env);
        assert_success(&out, &format!("{name}: install from a server requiring download auth"));
        assert_eq!(sha256_file(&prefix.agent()), sha256_file(&host_agent()), "{name}");
        assert!(prefix.config().is_file(), "{name}: not enrolled");
        prefix.assert_tmpdir_clean(name);

        let agent = |args: &[&str]| {
            let mut cmd = clean_command(prefix.agent(), &prefix.tmpdir);
            cmd.arg("--config").arg(prefix.config()).args(args);
            let out = run_bounded(cmd, Duration::from_secs(30));
            assert_success(&out, &format!("{name}: agent {args:?}"));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let status = agent(&["status"]);
        assert!(status.contains("(up to date)"), "{name}: status could not read the manifest:\n{status}");
        let check = agent(&["update", "--check"]);
        assert!(check.starts_with("up to date"), "{name}: update --check:\n{check}");

        // A new build: `update --check` sees it and `update` installs it, both through the gated routes.
        let mut new = fs::read(host_agent()).unwrap();
        new.extend_from_slice(format!("\nrm-e2e: gated build {i}\n").as_bytes());
        upload_agent(&server, &new);
        let check = agent(&["update", "--check"]);
        assert!(check.starts_with("update available"), "{name}: update --check:\n{check}");
        let updated = agent(&["update"]);
        assert!(updated.contains("updated to"), "{name}: update:\n{updated}");
        assert_eq!(sha256_file(&prefix.agent()), sha256_hex(&new), "{name}: update did not install the new build");
        upload_agent(&server, &fs::read(host_agent()).unwrap());
    }
}

/// A directory with a `curl` that records its arguments (one invocation per line) in `log`, then runs the real one.
fn recording_curl(dir: &Path, log: &Path) -> PathBuf {
    let shims = dir.join("shims");
    fs::create_dir_all(&shims).unwrap();
    let real = ["/usr/bin/curl", "/bin/curl", "/usr/local/bin/curl"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("curl is installed");
    let shim = shims.join("curl");
    write_file(&shim, format!("#!/bin/sh\nprintf 'curl %s\\n' \"$*\" >> {}\nexec {real} \"$@\"\n", qp(log)).as_bytes());
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();
    shims
}

#[test]
fn installer_keeps_the_token_off_command_lines_and_https_on_https() {
    let scratch = tempfile::Builder::new().prefix("rm-e2e-argv-").tempdir().unwrap();
    let log = scratch.path().join("argv.log");
    let shims = recording_curl(scratch.path(), &log);
    let path = format!("{}:{}", shims.display(), std::env::var("PATH").unwrap_or_default());
    // The published "agent" records its own arguments, then runs the real agent.
    let wrapper =
        format!("#!/bin/sh\nprintf 'agent %s\\n' \"$*\" >> {}\nexec {} \"$@\"\n", qp(&log), qp(&host_agent()));
    let builder = Server::builder().env("RM_REQUIRE_DOWNLOAD_AUTH", "true");
    write_file(&builder.bundled_dir().join("agent-binaries").join(LINUX_AMD64), wrapper.as_bytes());
    let server = install_server(builder, false);

    for (name, shell) in SHELLS {
        let token = create_token(&server, 1);
        let prefix = Prefix::new();
        let header = header_file(prefix.scratch(), &token);
        let args = ["--prefix".to_string(), prefix.arg(), "--no-service".into(), "--token".into(), token.clone()];
        let out = curl_pipe_authed(&server, shell, &header, &args, &prefix.tmpdir, &[("PATH", &path)]);
        assert_success(&out, &format!("{name}: install"));
        assert!(prefix.config().is_file(), "{name}: not enrolled\n{}", stderr_of(&out));
        let recorded = fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = recorded.lines().collect();
        for want in ["curl ", "agent --version", "agent enroll "] {
            assert!(lines.iter().any(|l| l.starts_with(want)), "{name}: no `{want}…` was recorded:\n{recorded}");
        }
        let sums = lines.iter().find(|l| l.contains("/agent/SHA256SUMS")).expect("curl fetched SHA256SUMS");
        assert!(sums.contains("--proto =http,https --proto-redir =http,https"), "{name}: {sums}");
        assert!(sums.contains("--config "), "{name}: the token is not sent from a config file: {sums}");
        assert!(!recorded.contains(&token), "{name}: the token is on a command line:\n{recorded}");
        assert!(!stderr_of(&out).contains(&token), "{name}: the token was printed:\n{}", stderr_of(&out));
        prefix.assert_tmpdir_clean(name);
        fs::remove_file(&log).unwrap();
    }

    // An https server: curl may speak https only, redirects included. (No TLS server here: the download fails, but
    // the recorded arguments show the restriction.)
    let closed = ClosedPort::new();
    let https = format!("https://{}", closed.addr);
    let prefix = Prefix::new();
    let token = "rmenr_e2e-https-token";
    let script = repo_file("scripts/install.sh");
    let env = [("PATH", path.as_str()), ("RM_ENROLL_TOKEN", token)];
    let out = run_script(
        &["dash"],
        &script,
        &["--server", &https, "--prefix", &prefix.arg(), "--no-service"],
        &prefix.tmpdir,
        &env,
    );
    assert!(!out.status.success(), "no TLS server listens, the install must fail");
    let recorded = fs::read_to_string(&log).unwrap_or_default();
    let sums = recorded.lines().find(|l| l.contains("/agent/SHA256SUMS")).unwrap_or_else(|| panic!("{recorded}"));
    assert!(sums.contains("--proto =https --proto-redir =https"), "{sums}");
    assert!(!recorded.contains(token), "the token is on a command line:\n{recorded}");
    prefix.assert_tmpdir_clean("https");
    fs::remove_file(&log).unwrap();

    // Served over https, the script refuses an http --server before any request.
    let target = FakeHttp::start(|_| raw_response("200 OK", "text/plain", b""));
    let rendered = prefix.scratch().join("rendered.sh");
    let text = fs::read_to_string(&script).unwrap().replace("__RM_SERVER_URL__", &https);
    fs::write(&rendered, text).unwrap();
    for (name, shell) in SHELLS {
        let args = ["--server", &target.base_url(), "--prefix", &prefix.arg(), "--no-service"];
        let out = run_script(shell, &rendered, &args, &prefix.tmpdir, &env);
        assert!(!out.status.success(), "{name}: an http --server was accepted after an https download");
        assert!(stderr_of(&out).contains("refusing to downgrade"), "{name}: {}", stderr_of(&out));
        assert!(!log.exists(), "{name}: curl ran: {}", fs::read_to_string(&log).unwrap_or_default());
        prefix.assert_tmpdir_clean(name);
    }
    assert_eq!(target.requests(), Vec::<String>::new(), "the http server was contacted");
}

/// Without curl, GNU Wget downloads: the token from a `WGETRC` file (not argv), and no redirects.
#[test]
fn installer_with_gnu_wget_keeps_the_token_off_command_lines() {
    let Some(real_wget) = ["/usr/bin/wget", "/bin/wget"].into_iter().find(|p| Path::new(p).is_file()) else {
        return skip("GNU Wget not installed: apt-get install wget");
    };
    let scratch = tempfile::Builder::new().prefix("rm-e2e-wget-").tempdir().unwrap();
    // A PATH of every system tool but curl, and a wget that records its arguments.
    let farm = scratch.path().join("farm");
    fs::create_dir_all(&farm).unwrap();
    for dir in ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let Ok(read) = fs::read_dir(dir) else { continue };
        for entry in read.flatten() {
            let name = entry.file_name();
            if name == "curl" || name == "wget" || farm.join(&name).symlink_metadata().is_ok() {
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), farm.join(&name)).unwrap();
        }
    }
    let log = scratch.path().join("argv.log");
    let shim = farm.join("wget");
    write_file(
        &shim,
        format!("#!/bin/sh\nprintf 'wget %s\\n' \"$*\" >> {}\nexec {real_wget} \"$@\"\n", qp(&log)).as_bytes(),
    );
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();
    let path = farm.to_str().unwrap();

    let server = install_server(Server::builder().env("RM_REQUIRE_DOWNLOAD_AUTH", "true"), true);
    let token = create_token(&server, 1);
    let prefix = Prefix::new();
    let script = repo_file("scripts/install.sh");
    let args = ["--server", &server.url(""), "--prefix", &prefix.arg(), "--no-service"];
    let env = [("PATH", path), ("RM_ENROLL_TOKEN", token.as_str())];
    let out = run_script(&["dash"], &script, &args, &prefix.tmpdir, &env);
    assert_success(&out, "install with GNU Wget");
    assert!(prefix.config().is_file(), "not enrolled");
    let recorded = fs::read_to_string(&log).unwrap();
    assert!(recorded.lines().any(|l| l.contains("/agent/SHA256SUMS") && l.contains("--max-redirect=0")), "{recorded}");
    assert!(!recorded.contains(&token), "the token is on wget's command line:\n{recorded}");
    prefix.assert_tmpdir_clean("wget");
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Following the README as a new user: the dry-run plan, a prefix install that finds its own config, a failed
//    update that is remembered, a log that says what changed, a self-explaining --help
// ---------------------------------------------------------------------------------------------------------------

/// Whether the installer would see systemd on this host (its `has_systemd`).
fn host_has_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("systemctl").is_file()))
}

/// Every file under `dir` with its SHA-256 (directories as `<dir>/`), sorted: to compare a tree before and after.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(read) = fs::read_dir(dir) else { return out };
    for entry in read {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.push(format!("{}/", path.display()));
            out.extend(tree(&path));
        } else {
            out.push(format!("{} {}", path.display(), sha256_file(&path)));
        }
    }
    out.sort();
    out
}

#[test]
fn dry_run_plan_says_what_would_really_happen() {
    let server = install_server(Server::builder(), true);
    let token = create_token(&server, 5);
    let base = server.url("");
    let served_sha = sha256_file(&host_agent());
    let systemd = host_has_systemd();

    // One prefix that is already installed and enrolled (by a real run), for the rows that find it so.
    let installed = Prefix::new();
    let args = ["--prefix".into(), installed.arg(), "--no-service".into(), "--token".into(), token.clone()];
    assert_success(&curl_pipe(&server, &["dash"], &args, &installed.tmpdir), "real install");
    let installed_tree = tree(&installed.root);
    let tokens_before = server.admin("GET", "/api/v1/tokens", None).json()["tokens"].clone();
    let downloads_before = binary_downloads(&server);

    /// `fresh`: a new prefix (else the installed one); the flags after --prefix; lines the plan must contain and
    /// words it must not.
    struct Row {
        name: &'static str,
        fresh: bool,
        flags: Vec<String>,
        want: Vec<String>,
        not: Vec<&'static str>,
    }
    let fresh_plan = |p: &Prefix| {
        let agent = p.agent().display().to_string();
        let config = p.config().display().to_string();
        (agent, config)
    };
    let no_service_line =
        |agent: &str| format!("--no-service: would not install or start a service; run the agent with: {agent} run");
    let service_line = |agent: &str, config: &str| {
        if systemd {
            format!("would install the systemd unit /etc/systemd/system/{UNIT} (running {agent} with {config})")
        } else {
            "systemd is not running on this host: would not install a service".to_string()
        }
    };
    for (shell_name, shell) in SHELLS {
        let fresh = Prefix::new();
        let (agent, config) = fresh_plan(&fresh);
        let (old_agent, old_config) = fresh_plan(&installed);
        let download = format!(
            "would download {base}/agent/blobs/sha256/{served_sha} (else {base}/agent/binary?os=linux&arch=amd64), \
             verify sha256 {served_sha} and install it as {agent}"
        );
        let rows = vec![
            Row {
                name: "--no-service, no token",
                fresh: true,
                flags: vec!["--no-service".into()],
                want: vec![
                    download.clone(),
                    format!(
                        "no token: would skip enrollment (already enrolled elsewhere, or enroll later); nothing is written to {config}"
                    ),
                    no_service_line(&agent),
                ],
                not: vec!["would enroll", "would install the systemd", "would run"],
            },
            Row {
                name: "--no-service with a token",
                fresh: true,
                flags: vec!["--no-service".into(), "--token".into(), token.clone()],
                want: vec![
                    download.clone(),
                    format!(
                        "would enroll with {base} (token from the environment) and save the identity to {config} (mode 0600)"
                    ),
                    no_service_line(&agent),
                ],
                not: vec!["no token", "would install the systemd", "would run"],
            },
            Row {
                name: "token and service",
                fresh: true,
                flags: vec!["--token".into(), token.clone()],
                want: vec![
                    download.clone(),
                    format!(
                        "would enroll with {base} (token from the environment) and save the identity to {config} (mode 0600)"
                    ),
                    service_line(&agent, &config),
                ],
                not: vec!["no token", "--no-service"],
            },
            Row {
                name: "no token, service",
                fresh: true,
                flags: vec![],
                want: vec![download.clone(), format!("no token: would skip enrollment"), service_line(&agent, &config)],
                not: vec!["would enroll", "--no-service"],
            },
            Row {
                name: "already installed and enrolled, with a token",
                fresh: false,
                flags: vec!["--no-service".into(), "--token".into(), token.clone()],
                want: vec![
                    format!("{old_agent} is already the served build ({served_sha})"),
                    format!("already enrolled ({old_config} exists); not enrolling again"),
                    no_service_line(&old_agent),
                ],
                not: vec!["would download", "would enroll", "no token"],
            },
        ];
        for row in rows {
            let p = if row.fresh { &fresh } else { &installed };
            let mut args = vec!["--dry-run".to_string(), "--prefix".into(), p.arg()];
            args.extend(row.flags.iter().cloned());
            let out = curl_pipe(&server, shell, &args, &p.tmpdir);
            let context = format!("{shell_name}, {}", row.name);
            assert_success(&out, &context);
            let said = stderr_of(&out);
            let lines: Vec<&str> =
                said.lines().map(|l| l.strip_prefix("restic-manager install: ").unwrap_or(l)).collect();
            for want in &row.want {
                assert!(
                    lines.iter().any(|l| l.starts_with(want.as_str())),
                    "{context}: no plan line {want:?}:\n{said}"
                );
            }
            for not in &row.not {
                assert!(!said.contains(not), "{context}: the plan says {not:?}:\n{said}");
            }
            assert!(lines.contains(&"dry run: done, nothing was changed"), "{context}:\n{said}");
            // Nothing written: no fresh prefix, the installed one unchanged, the token unused, no download.
            assert!(!fresh.root.exists(), "{context}: the dry run created {}", fresh.root.display());
            assert_eq!(tree(&installed.root), installed_tree, "{context}: the dry run changed the installed prefix");
            p.assert_tmpdir_clean(&context);
        }
    }
    assert_eq!(server.admin("GET", "/api/v1/tokens", None).json()["tokens"], tokens_before, "a dry run used the token");
    assert_eq!(agents(&server).len(), 1, "a dry run enrolled");
    assert_eq!(binary_downloads(&server), downloads_before, "a dry run downloaded the agent");
}

/// `<agent> <args>` with a clean environment (no `RM_AGENT_CONFIG`) and no `--config`, bounded.
fn agent_cmd(agent: &Path, args: &[&str], tmpdir: &Path) -> Output {
    let mut cmd = clean_command(agent, tmpdir);
    cmd.args(args);
    run_bounded(cmd, Duration::from_secs(30))
}

#[test]
fn prefix_install_finds_its_config_without_a_flag() {
    let server = install_server(Server::builder(), true);
    let token = create_token(&server, 1);
    let prefix = Prefix::new();
    let args = ["--prefix".into(), prefix.arg(), "--no-service".into(), "--token".into(), token];
    let out = curl_pipe(&server, &["dash"], &args, &prefix.tmpdir);
    assert_success(&out, "install");
    assert!(prefix.config().is_file(), "install.sh wrote no {}", prefix.config().display());
    let config = prefix.config().display().to_string();
    // The installer's hint needs no --config either.
    assert!(
        stderr_of(&out).contains(&format!("run the agent with: {} run\n", prefix.agent().display())),
        "{}",
        stderr_of(&out)
    );

    let status = agent_cmd(&prefix.agent(), &["status"], &prefix.tmpdir);
    assert_success(&status, "status without --config");
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains(&format!("config: {config}\n")), "status did not use {config}:\n{said}");
    let agent_id = agents(&server)[0]["id"].as_str().unwrap().to_string();
    assert!(said.contains(&format!("agent id: {agent_id}\n")), "{said}");
    assert!(said.contains("(up to date)"), "{said}");

    let beat = agent_cmd(&prefix.agent(), &["run", "--once"], &prefix.tmpdir);
    assert_success(&beat, "run --once without --config");
    let a = agents(&server).remove(0);
    assert_eq!(a["heartbeats"], 1, "run --once did not heartbeat: {a}");

    // --help shows the path this binary uses by default.
    let help = agent_cmd(&prefix.agent(), &["--help"], &prefix.tmpdir);
    assert_success(&help, "--help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains(&format!("[default: {config}]")), "--help does not show the default config path:\n{help}");

    // RM_AGENT_CONFIG and --config still win.
    let elsewhere = prefix.scratch().join("elsewhere.json");
    let mut cmd = clean_command(prefix.agent(), &prefix.tmpdir);
    cmd.env("RM_AGENT_CONFIG", &elsewhere).arg("status");
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(!out.status.success() && stderr_of(&out).contains(&elsewhere.display().to_string()), "{}", stderr_of(&out));
    let out = agent_cmd(&prefix.agent(), &["--config", elsewhere.to_str().unwrap(), "status"], &prefix.tmpdir);
    assert!(!out.status.success() && stderr_of(&out).contains(&elsewhere.display().to_string()), "{}", stderr_of(&out));
}

#[test]
fn agent_help_describes_every_flag_and_the_default_config() {
    let dir = tempfile::Builder::new().prefix("rm-e2e-help-").tempdir().unwrap();
    let agent = dir.path().join("opt/bin").join(AGENT_BIN);
    fs::create_dir_all(agent.parent().unwrap()).unwrap();
    fs::copy(host_agent(), &agent).unwrap();
    let default = dir.path().join("opt/etc/restic-manager/agent.json");
    for (args, flags) in [
        (&["--help"][..], &["--config", "--help", "--version"][..]),
        (&["enroll", "--help"], &["--config", "--server", "--token", "--cacert", "--insecure", "--force", "--help"]),
        (&["run", "--help"], &["--config", "--once", "--help"]),
        (&["update", "--help"], &["--config", "--check", "--help"]),
        (&["status", "--help"], &["--config", "--help"]),
    ] {
        for long in [false, true] {
            let mut args = args.to_vec();
            if !long {
                *args.last_mut().unwrap() = "-h";
            }
            let out = agent_cmd(&agent, &args, dir.path());
            assert_success(&out, &format!("{args:?}"));
            let help = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(help.contains(&format!("[default: {}]", default.display())), "{args:?}: no default path:\n{help}");
            let lines: Vec<&str> = help.lines().collect();
            for flag in flags {
                let at = lines
                    .iter()
                    .position(|l| {
                        l.starts_with(' ')
                            && l.trim_start().starts_with('-')
                            && l.trim_start().split([',', ' ']).any(|w| w == *flag)
                    })
                    .unwrap_or_else(|| panic!("{args:?}: {flag} not listed:\n{help}"));
                // The description follows the flag and its value name on the same line (-h) or on the next (--help).
                let same_line = lines[at].trim_start().split_once("  ").map(|(_, d)| d.trim()).unwrap_or("");
                let described =
                    if same_line.is_empty() { lines.get(at + 1).map_or("", |l| l.trim()) } else { same_line };
                assert!(
                    !described.is_empty() && !described.starts_with('['),
                    "{args:?}: {flag} has no description ({described:?}):\n{help}"
                );
            }
        }
    }
    let enroll = agent_cmd(&agent, &["enroll", "-h"], dir.path());
    let enroll = String::from_utf8_lossy(&enroll.stdout);
    assert!(enroll.contains("server's URL"), "{enroll}");
    assert!(enroll.contains("enrollment token"), "{enroll}");
}

#[test]
fn failed_self_update_is_remembered_between_runs() {
    let server = install_server(Server::builder(), true);
    let prefix = enrolled_install(&server);
    let good = fs::read(prefix.agent()).unwrap();
    let state_file = prefix.root.join("etc/restic-manager/agent-state.json");
    let once = || {
        let mut cmd = clean_command(prefix.agent(), &prefix.tmpdir);
        cmd.env("RM_AGENT_TRIAL_SECS", "2").arg("--config").arg(prefix.config()).args(["run", "--once"]);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert_success(&out, "run --once");
        stderr_of(&out)
    };

    // A build that fails its smoke test (`--version` exits 3).
    let broken = b"#!/bin/sh\nexit 3\n".to_vec();
    let broken_sha = sha256_hex(&broken);
    upload_agent(&server, &broken);
    let downloads = binary_downloads(&server);
    let mut said = Vec::new();
    for run in 1..=2 {
        said.push(once());
        let all = said.join("\n---\n");
        assert_eq!(
            binary_downloads(&server),
            downloads + 1,
            "run {run}: the refused build was downloaded again:\n{all}"
        );
        let a = agents(&server).remove(0);
        let error = a["last_update_error"]
            .as_str()
            .unwrap_or_else(|| panic!("run {run}: no error in the fleet view: {a}\n{all}"));
        assert!(error.contains("smoke test") && error.contains(&broken_sha), "run {run}: {error}");
        assert_eq!(a["heartbeats"].as_u64(), Some(run + 1), "run {run}: {a}");
        assert_eq!(sha256_hex(&fs::read(prefix.agent()).unwrap()), sha256_hex(&good), "run {run}: agent replaced");
    }
    assert_eq!(mode(&state_file), 0o600, "the state file");
    let saved: Value = serde_json::from_slice(&fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(saved["failed_update"]["sha256"], broken_sha.as_str(), "{saved}");
    assert_eq!(said.iter().filter(|s| s.contains("update found")).count(), 1, "{said:?}");

    // status says so.
    let status = agent_cmd(&prefix.agent(), &["--config", prefix.config().to_str().unwrap(), "status"], &prefix.tmpdir);
    assert!(String::from_utf8_lossy(&status.stdout).contains("last update error: update to"), "{status:?}");

    // A different build clears it: installed, and the fleet view forgets the error.
    let mut new = good.clone();
    new.extend_from_slice(b"\nrm-e2e: a fixed build\n");
    let new_sha = sha256_hex(&new);
    upload_agent(&server, &new);
    let third = once();
    assert_eq!(sha256_file(&prefix.agent()), new_sha, "the new build was not installed:\n{third}");
    let a = agents(&server).remove(0);
    assert_eq!(a["last_update_error"], Value::Null, "the error survived a different build: {a}\n{third}");
    assert_eq!(a["binary_sha256"], new_sha.as_str(), "{a}");
    let saved: Value = serde_json::from_slice(&fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(saved.get("failed_update"), None, "{saved}");
    assert!(third.contains("stayed up for its trial window"), "{third}");
    let marker = prefix.root.join("etc/restic-manager/update-trial.json");
    assert!(!marker.exists(), "`run --once` of the new build answered: its trial marker is done with:\n{third}");
}

#[test]
fn running_agent_logs_state_changes_once() {
    let mut server = install_server(Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s"), true);
    let prefix = enrolled_install(&server);

    let log_path = prefix.scratch().join("agent.stderr");
    let mut cmd = clean_command(prefix.agent(), &prefix.tmpdir);
    cmd.arg("run").stdout(Stdio::null()).stderr(fs::File::create(&log_path).unwrap());
    let mut child = KillOnDrop(cmd.spawn().expect("starting the agent"));
    let agent_log = || fs::read_to_string(&log_path).unwrap_or_default();
    let heartbeats = |server: &Server| agents(server)[0]["heartbeats"].as_u64().unwrap();
    let wait_beats = |server: &Server, n: u64, what: &str| {
        let from = heartbeats(server);
        wait_until(
            what,
            Duration::from_secs(20),
            || if heartbeats(server) >= from + n { Ok(()) } else { Err(heartbeats(server).to_string()) },
            || format!("--- agent ---\n{}\n{}", agent_log(), server.log_tail()),
        );
    };
    wait_beats(&server, 3, "three heartbeats");

    // Down for a few heartbeats (1 s interval; retries after 1 s, 2 s), then back on the same port.
    server.restart_on_same_port(|| {
        eventually(Duration::from_secs(10), "the agent to notice the server is gone", || {
            agent_log().contains("unreachable").then_some(())
        });
        std::thread::sleep(Duration::from_secs(4));
    });
    eventually(
        Duration::from_secs(20),
        format_args!("the agent to notice the server is back:\n{}", agent_log()),
        || agent_log().contains("server back").then_some(()),
    );
    wait_beats(&server, 3, "three heartbeats after the restart");

    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    wait_timeout(&mut child.0, Duration::from_secs(10)).expect("the agent to exit on SIGTERM");
    let log = agent_log();
    let count = |word: &str| log.lines().filter(|l| l.contains(word)).count();
    assert_eq!(count("unreachable"), 1, "one 'unreachable' line:\n{log}");
    assert_eq!(count("server back"), 1, "one 'back' line:\n{log}");
    assert_eq!(count("running as agent"), 1, "{log}");
    assert_eq!(count("heartbeats answered"), 1, "{log}");
    // Backups add a line for the restic found (or not), one when the backup config is applied (its revision does
    // not change here), and two for the graceful stop on SIGTERM; none of them per heartbeat either.
    assert!(count("backup config revision") <= 1, "{log}");
    assert_eq!(count("stopped"), 1, "SIGTERM stops the agent gracefully:\n{log}");
    let backups = [
        "restic-manager-agent: restic ",
        "restic-manager-agent: backup config revision",
        "restic-manager-agent: stopping",
        "restic-manager-agent: stopped",
    ];
    let heartbeat_lines = log.lines().filter(|l| !backups.iter().any(|b| l.starts_with(b))).count();
    assert_eq!(heartbeat_lines, 4, "nothing logged per heartbeat (6+ heartbeats, several failed):\n{log}");
}

// ---------------------------------------------------------------------------------------------------------------
// install.sh --with-restic
// ---------------------------------------------------------------------------------------------------------------

/// The host platform's restic file name on the server.
fn host_restic_file() -> &'static str {
    if std::env::consts::ARCH == "aarch64" { "restic-linux-arm64" } else { "restic-linux-amd64" }
}

fn curl_pipe_sh_with_restic_installs_a_working_restic(shell_name: &str, shell: &[&str]) {
    let Some(restic) = restic_binary() else { return };
    let builder = Server::builder();
    let restic_dir = builder.bundled_dir().join("restic-binaries");
    fs::create_dir_all(&restic_dir).unwrap();
    fs::copy(&restic, restic_dir.join(host_restic_file())).unwrap();
    let server = install_server(builder, true);
    let restic_sha = sha256_file(&restic);
    let token = create_token(&server, 5);
    let prefix = Prefix::new();
    let args =
        ["--prefix".into(), prefix.arg(), "--no-service".into(), "--with-restic".into(), "--token".into(), token];

    let out = curl_pipe(&server, shell, &args, &prefix.tmpdir);
    assert_success(&out, &format!("{shell_name}: install --with-restic"));
    let managed = prefix.bin_dir().join("restic-manager-restic");
    assert_eq!(sha256_file(&managed), restic_sha, "{shell_name}: the installed restic is the served one");
    assert_eq!(mode(&managed) & 0o777, 0o755);
    assert_eq!(entries(&prefix.bin_dir()), [AGENT_BIN, "restic-manager-restic"], "{shell_name}: leftovers in bin/");
    assert!(stderr_of(&out).contains("(restic 0.14"), "{shell_name}: {}", stderr_of(&out));
    let version = run_bounded(clean_command(&managed, &prefix.tmpdir).tap_arg("version"), SCRIPT_TIMEOUT);
    assert_success(&version, "the installed restic runs");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("restic 0.14"), "{version:?}");
    prefix.assert_tmpdir_clean(shell_name);

    // The installed agent, on a PATH without restic, runs the installed restic and says so.
    let empty = prefix.scratch().join("empty-path");
    fs::create_dir_all(&empty).unwrap();
    let mut run = clean_command(prefix.agent(), &prefix.tmpdir);
    run.env("PATH", &empty).arg("--config").arg(prefix.config()).args(["run", "--once"]);
    assert_success(&run_bounded(run, Duration::from_secs(30)), "agent run --once");
    let agent = agents(&server).remove(0);
    assert_eq!(agent["restic"]["version"], "0.14.0", "{agent}");
    assert_eq!(agent["restic"]["managed"], true, "{agent}");

    // Again: nothing downloaded. Then a non-restic build served (a data-dir override): refused, the restic stays.
    let again = curl_pipe(&server, shell, &args, &prefix.tmpdir);
    assert_success(&again, &format!("{shell_name}: second install"));
    assert!(stderr_of(&again).contains("already the served restic"), "{}", stderr_of(&again));
    let data_restic = server.data_dir().join("restic-binaries");
    fs::create_dir_all(&data_restic).unwrap();
    let fake = data_restic.join(host_restic_file());
    fs::write(&fake, "#!/bin/sh\necho 'hello, not restic'\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let refused = curl_pipe(&server, shell, &args, &prefix.tmpdir);
    assert_success(&refused, &format!("{shell_name}: a refused restic only warns"));
    assert!(stderr_of(&refused).contains("warning: restic not installed"), "{}", stderr_of(&refused));
    assert!(stderr_of(&refused).contains("is not restic 0.14 or newer"), "{}", stderr_of(&refused));
    assert_eq!(sha256_file(&managed), restic_sha, "{shell_name}: the refused build replaced restic");
    assert_eq!(entries(&prefix.bin_dir()), [AGENT_BIN, "restic-manager-restic"]);
    prefix.assert_tmpdir_clean(shell_name);

    // On a fresh host, restic that cannot be installed (a version line the agent would refuse; one that does not run,
    // like Debian's restic on a host without glibc >= 2.34) leaves the agent installed and enrolled.
    for (body, said) in [
        ("echo 'restic 1x.2 compiled with go1.19'", "is not restic 0.14 or newer"),
        ("echo 'restic 0.13.9 compiled with go1.19'", "is not restic 0.14 or newer"),
        ("exit 127", "does not run on this host"),
    ] {
        fs::write(&fake, format!("#!/bin/sh\n{body}\n")).unwrap();
        let fresh = Prefix::new();
        let args = ["--prefix".into(), fresh.arg(), "--no-service".into(), "--with-restic".into(), "--token".into()];
        let args: Vec<String> = args.into_iter().chain([create_token(&server, 5)]).collect();
        let out = curl_pipe(&server, shell, &args, &fresh.tmpdir);
        assert_success(&out, &format!("{shell_name}: {body}: the agent install goes on"));
        assert!(stderr_of(&out).contains(said), "{body}: {}", stderr_of(&out));
        assert!(stderr_of(&out).contains("done (without restic"), "{body}: {}", stderr_of(&out));
        assert!(fresh.config().is_file(), "{shell_name}: {body}: not enrolled");
        assert_eq!(entries(&fresh.bin_dir()), [AGENT_BIN], "{shell_name}: {body}");
        fresh.assert_tmpdir_clean(shell_name);
    }
}

/// `Command::arg` returning the command, for one-liners.
trait TapArg {
    fn tap_arg(self, arg: &str) -> Self;
}

impl TapArg for Command {
    fn tap_arg(mut self, arg: &str) -> Command {
        self.arg(arg);
        self
    }
}

#[test]
fn curl_pipe_sh_with_restic_installs_a_working_restic_dash() {
    curl_pipe_sh_with_restic_installs_a_working_restic(SHELLS[0].0, SHELLS[0].1);
}

#[test]
fn curl_pipe_sh_with_restic_installs_a_working_restic_busybox() {
    curl_pipe_sh_with_restic_installs_a_working_restic(SHELLS[1].0, SHELLS[1].1);
}
