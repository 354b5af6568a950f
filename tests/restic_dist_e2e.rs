//! restic served by the server and installed by agents, end to end: the real server and agent binaries, Debian's
//! restic 0.14 dropped into the data dir as the host platform's restic build, agents run with a `PATH` that has no
//! restic, a real backup with the installed restic, and refused builds (a script, random bytes, a checksum that
//! does not match) that leave the previous restic in place.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

const PASSWORD: &str = "restic-dist-pw-Quokka-42";

/// The host platform's restic file name (the tests run on linux amd64 or arm64).
fn host_restic_name() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "restic-linux-arm64",
        _ => "restic-linux-amd64",
    }
}

fn host_query() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "/restic/binary?os=linux&arch=arm64",
        _ => "/restic/binary?os=linux&arch=amd64",
    }
}

fn server() -> Server {
    Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s").start()
}

/// Puts `bytes` into the server's data dir as the host platform's restic (temp file + rename).
fn publish_restic(server: &Server, bytes: &[u8]) -> String {
    let dir = server.data_dir().join("restic-binaries");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(host_restic_name());
    replace_atomically(&path, bytes);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    sha256_hex(bytes)
}

/// `PUT /api/v1/assets/restic-binaries/<name>` with the admin token.
fn upload_restic(server: &Server, name: &str, bytes: &[u8]) -> Response {
    let auth = format!("Bearer {}", server.admin_token());
    let sha = sha256_hex(bytes);
    let headers = [("Authorization", auth.as_str()), ("X-Checksum-Sha256", sha.as_str())];
    http_request_with_body(server.addr(), "PUT", &format!("/api/v1/assets/restic-binaries/{name}"), &headers, bytes)
        .unwrap()
}

/// Writes the sidecar into the data dir: `version` for the file with `sha256`.
fn publish_sidecar(server: &Server, sha256: &str, version: &str) {
    let dir = server.data_dir().join("restic-binaries");
    fs::create_dir_all(&dir).unwrap();
    let body = json!({"origin": "test", "files": {host_restic_name(): {"version": version, "sha256": sha256}}});
    replace_atomically(&dir.join("restic-binaries.json"), body.to_string().as_bytes());
}

/// An agent installed as a copy in its own `bin/` (its managed restic lands beside it), enrolled with the server,
/// run with a `PATH` that holds no restic.
struct HostAgent {
    dir: tempfile::TempDir,
    id: String,
    child: Option<Child>,
}

impl HostAgent {
    fn enroll(server: &Server) -> HostAgent {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        fs::create_dir_all(dir.path().join("empty-path")).unwrap();
        let exe = dir.path().join("bin/restic-manager-agent");
        fs::copy(binary(AGENT_BIN), &exe).unwrap();
        let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": "restic dist"})));
        assert_eq!(r.status, 201, "{}", r.text());
        let token = r.json()["token"].as_str().unwrap().to_string();
        let mut agent = HostAgent { dir, id: String::new(), child: None };
        let mut cmd = agent.command();
        cmd.args(["enroll", "--server", &server.url("")]).env("RM_ENROLL_TOKEN", token);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
        let saved: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
        agent.id = saved["agent_id"].as_str().unwrap().to_string();
        agent
    }

    fn exe(&self) -> PathBuf {
        self.dir.path().join("bin/restic-manager-agent")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("etc/agent.json")
    }

    fn managed(&self) -> PathBuf {
        self.dir.path().join("bin/restic-manager-restic")
    }

    /// The copied agent with `--config`, no inherited `RM_*`, and a `PATH` without restic.
    fn command(&self) -> Command {
        let mut cmd = Command::new(self.exe());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RM_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PATH", self.dir.path().join("empty-path")).env("RM_AGENT_SMOKE_TIMEOUT", "10");
        cmd.arg("--config").arg(self.config()).stdin(Stdio::null());
        cmd
    }

    fn restic_install(&self) -> Output {
        let mut cmd = self.command();
        cmd.args(["restic", "install"]);
        run_bounded(cmd, Duration::from_secs(120))
    }

    fn start(&mut self) {
        self.start_with(&[]);
    }

    fn start_with(&mut self, env: &[(&str, &str)]) {
        let log = fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        cmd.arg("run").stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(cmd.spawn().unwrap());
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn agent_view(server: &Server, id: &str) -> Value {
    let r = server.admin("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["agents"].as_array().unwrap().iter().find(|a| a["id"] == id).cloned().expect("agent listed")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn served_restic_is_listed_installed_reported_and_runs_a_backup() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let bytes = fs::read(&restic).unwrap();
    let sha = publish_restic(&server, &bytes);
    publish_sidecar(&server, &sha, "0.14.0");

    // The manifest and SHA256SUMS list it with its checksum; the download is those bytes.
    let m = server.get("/agent/manifest").json();
    let entry = m["restic"].as_array().unwrap().iter().find(|e| e["file"] == host_restic_name()).cloned().unwrap();
    assert_eq!(entry["sha256"], sha.as_str(), "{m}");
    assert_eq!(entry["size"], bytes.len() as u64, "{m}");
    assert_eq!(entry["published"], true);
    assert_eq!(entry["version"], "0.14.0", "the sidecar names these bytes: {m}");
    let sums = server.get("/agent/SHA256SUMS").text();
    assert!(sums.lines().any(|l| l == format!("{sha}  {}", host_restic_name())), "{sums}");
    let download = server.get(host_query());
    assert_eq!(download.status, 200);
    assert_eq!(sha256_hex(&download.body), sha);

    // An agent on a host without restic installs the served one beside itself and reports it.
    let mut agent = HostAgent::enroll(&server);
    assert!(!agent.managed().exists());
    let started = std::time::Instant::now();
    agent.start();
    let view = eventually(Duration::from_secs(60), "the agent reports the installed restic", || {
        let v = agent_view(&server, &agent.id);
        (v["restic"]["version"] == "0.14.0" && v["restic"]["managed"] == true).then_some(v)
    });
    eprintln!(
        "FIGURE agent start -> served restic ({:.1} MiB) installed and reported: {:.2} s (1 s heartbeats)",
        bytes.len() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(view["restic"]["path"], agent.managed().display().to_string().as_str(), "{view}");
    assert!(view["restic"]["error"].is_null(), "{view}");
    assert_eq!(view["restic_served"], "0.14.0", "{view}");
    assert_eq!(view["restic_drift"], "current", "{view}");
    assert_eq!(sha256_file(&agent.managed()), sha);
    assert!(agent.log().contains("installed restic 0.14.0"), "{}", agent.log());
    let by_digest = format!("/restic/blobs/sha256/{sha}");
    let fetched = server.log_json().into_iter().filter(|l| l["target"] == "access" && l["status"] == 200);
    let fetched: Vec<String> = fetched.filter_map(|l| l["uri"].as_str().map(str::to_owned)).collect();
    assert!(fetched.contains(&by_digest), "the agent downloads by digest: {fetched:?}");
    // The host's PATH was never written to.
    assert_eq!(fs::read_dir(agent.dir.path().join("empty-path")).unwrap().count(), 0);

    // The agents list shows the version and its drift.
    let mut cmd = command(SERVER_BIN);
    cmd.args(["agents", "list", "--data-dir"]).arg(server.data_dir());
    cmd.arg("--bundled-assets-dir").arg(server.bundled_dir());
    let out = run_bounded(cmd, Duration::from_secs(30));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(table.lines().next().unwrap().ends_with("RESTIC"), "{table}");
    assert!(table.contains("0.14.0 (current)"), "{table}");
    let metrics = server.admin("GET", "/metrics", None).text();
    assert!(metrics.contains("restic_manager_agents_restic{drift=\"current\"} 1"), "{metrics}");
    assert!(metrics.contains("restic_manager_agents_restic{drift=\"missing\"} 0"), "{metrics}");

    // A real backup with the installed restic.
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), random_bytes(7, 50_000)).unwrap();
    let repo_dir = work.path().join("repo");
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "local", "url": repo_dir.display().to_string(), "password": PASSWORD,
                     "auto_init": true, "min_restic_version": "0.14.0"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["min_restic_version"], "0.14.0");
    let r = server.admin(
        "POST",
        "/api/v1/plans",
        Some(&json!({"name": "docs", "repository": "local", "paths": [src.display().to_string()],
                     "schedule": "0 3 * * *", "agents": [agent.id]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = server.admin("POST", "/api/v1/plans/docs/run", Some(&json!({"agent": agent.id})));
    assert_eq!(r.status, 202, "{}", r.text());
    let op = r.json()["operation_id"].as_str().unwrap().to_string();
    let done = eventually(Duration::from_secs(90), "the backup finishes", || {
        let r = server.admin("GET", &format!("/api/v1/operations?agent={}", agent.id), None);
        let ops = r.json()["operations"].as_array().cloned().unwrap_or_default();
        ops.into_iter().find(|o| o["id"] == op.as_str() && o["status"] != "queued" && o["status"] != "running")
    });
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    let snaps = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD).snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");

    // A repository requiring a newer restic than any served is refused by validation if malformed…
    let r = server.admin("PATCH", "/api/v1/repositories/local", Some(&json!({"min_restic_version": "latest"})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("min_restic_version"), "{}", r.text());
}

#[test]
fn refused_builds_leave_the_previous_restic_in_place() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let real = fs::read(&restic).unwrap();
    let real_sha = publish_restic(&server, &real);
    let agent = HostAgent::enroll(&server);
    // The upload API takes only the platform table's names (and the sidecar).
    let r = upload_restic(&server, "restic-linux-x86_64", b"x");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("restic-linux-amd64, restic-linux-arm64, restic-windows-amd64.exe"), "{}", r.text());

    let out = agent.restic_install();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("installed restic 0.14.0"), "{out:?}");
    assert_eq!(sha256_file(&agent.managed()), real_sha);
    let again = agent.restic_install();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("is the served build"), "{again:?}");

    // A shell script that prints something else, then random bytes: refused by the smoke run.
    let script = b"#!/bin/sh\necho 'definitely not restic'\n".to_vec();
    let cases: [(&str, Vec<u8>, &str); 2] =
        [("a script", script, "not restic's version"), ("random bytes", random_bytes(99, 200_000), "cannot run it")];
    for (what, bytes, says) in cases {
        // Through the upload API (an operator's override, 0755 in the data dir).
        let r = upload_restic(&server, host_restic_name(), &bytes);
        assert_eq!(r.status, 200, "{}", r.text());
        let uploaded = server.data_dir().join("restic-binaries").join(host_restic_name());
        assert_eq!(fs::metadata(&uploaded).unwrap().permissions().mode() & 0o777, 0o755);
        let out = agent.restic_install();
        let err = stderr(&out);
        assert!(!out.status.success(), "{what} was installed: {err}");
        assert!(err.contains("failed its smoke run") && err.contains(says), "{what}: {err}");
        assert_eq!(sha256_file(&agent.managed()), real_sha, "{what} replaced the managed restic");
        let leftovers: Vec<_> = fs::read_dir(agent.dir.path().join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    // A server announcing another checksum than the bytes it sends: refused before anything runs.
    let other_sha = sha256_hex(b"some other restic");
    let size = real.len() as u64;
    let body = real.clone();
    let fake = FakeHttp::start(move |target| {
        if target.starts_with("/agent/manifest") {
            let m = json!({
                "server": {"version": "1", "commit": "x", "date": "y"},
                "agents": [],
                "restic": [{"os": "linux", "arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                            "file": host_restic_name(), "published": true, "size": size, "sha256": other_sha,
                            "url": host_query()}]
            });
            raw_response("200 OK", "application/json", m.to_string().as_bytes())
        } else if target.starts_with("/restic/binary") {
            raw_response("200 OK", "application/octet-stream", &body)
        } else {
            raw_response("404 Not Found", "application/json", br#"{"error":"not_found","message":"no"}"#)
        }
    });
    let mut config: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
    config["server"] = json!(fake.base_url());
    fs::write(agent.config(), config.to_string()).unwrap();
    let out = agent.restic_install();
    let err = stderr(&out);
    assert!(!out.status.success(), "a mismatching build was installed: {err}");
    assert!(err.contains("does not match") && err.contains("sha256"), "{err}");
    assert_eq!(sha256_file(&agent.managed()), real_sha);
}

#[test]
fn a_refused_newer_build_is_reported_and_the_working_restic_stays() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let real = fs::read(&restic).unwrap();
    let real_sha = publish_restic(&server, &real);
    let mut agent = HostAgent::enroll(&server);
    assert!(agent.restic_install().status.success());

    // The server now serves a "newer" restic (so says the sidecar) that is a script printing something else.
    let bogus = b"#!/bin/sh\necho 'restic? no: hello'\n".to_vec();
    let bogus_sha = publish_restic(&server, &bogus);
    publish_sidecar(&server, &bogus_sha, "0.99.0");
    agent.start();
    let view = eventually(Duration::from_secs(60), "the refused install in the heartbeat", || {
        let v = agent_view(&server, &agent.id);
        v["restic"]["install_error"].is_string().then_some(v)
    });
    let error = view["restic"]["install_error"].as_str().unwrap();
    assert!(error.contains("smoke run") && error.contains(&bogus_sha), "{view}");
    assert_eq!(view["restic"]["version"], "0.14.0", "{view}");
    assert_eq!(view["restic"]["managed"], true, "{view}");
    assert_eq!(view["restic_served"], "0.99.0", "{view}");
    assert_eq!(view["restic_drift"], "behind", "{view}");
    assert_eq!(sha256_file(&agent.managed()), real_sha);
    // Not retried while the server serves the same refused build.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.log().matches("restic install refused").count(), 1, "{}", agent.log());

    // The server stops serving restic: the refusal no longer says anything true and goes.
    fs::remove_file(server.data_dir().join("restic-binaries").join(host_restic_name())).unwrap();
    eventually(Duration::from_secs(30), "the stale install error cleared", || {
        agent_view(&server, &agent.id)["restic"]["install_error"].is_null().then_some(())
    });
}

/// Runs the plan `plan` now on `agent` and waits for its final report.
fn run_plan(server: &Server, plan: &str, agent: &HostAgent) -> Value {
    let r = server.admin("POST", &format!("/api/v1/plans/{plan}/run"), Some(&json!({"agent": agent.id})));
    assert_eq!(r.status, 202, "{}", r.text());
    let op = r.json()["operation_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(90), "the run finishes", || {
        let r = server.admin("GET", &format!("/api/v1/operations?agent={}", agent.id), None);
        let ops = r.json()["operations"].as_array().cloned().unwrap_or_default();
        ops.into_iter().find(|o| o["id"] == op.as_str() && o["status"] != "queued" && o["status"] != "running")
    })
}

#[test]
fn a_repository_requiring_a_newer_restic_gets_the_served_one_and_path_restic_is_untouched() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    // The served "0.15.1": a wrapper that says so and runs the real restic for everything else (older than 0.16, so
    // the agent passes none of the 0.16-only flags such as `--retry-lock` that the real 0.14 would refuse).
    let wrapper = format!(
        "#!/bin/sh\nif [ \"$1\" = version ]; then echo 'restic 0.15.1 compiled with go1.19 on linux'; exit 0; fi\n\
         exec '{}' \"$@\"\n",
        restic.display()
    );
    let wrapper_sha = publish_restic(&server, wrapper.as_bytes());
    publish_sidecar(&server, &wrapper_sha, "0.15.1");
    let mut agent = HostAgent::enroll(&server);
    let host_restic = agent.dir.path().join("empty-path/restic");
    std::os::unix::fs::symlink(&restic, &host_restic).unwrap();
    agent.start();

    // A working host restic is kept while nothing requires more.
    let view = eventually(Duration::from_secs(30), "the host's restic reported", || {
        let v = agent_view(&server, &agent.id);
        (v["restic"]["version"] == "0.14.0").then_some(v)
    });
    assert!(view["restic"]["managed"].is_null() || view["restic"]["managed"] == false, "{view}");
    assert_eq!(view["restic_drift"], "behind", "{view}");
    assert!(!agent.managed().exists());

    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("b.bin"), random_bytes(11, 30_000)).unwrap();
    let repo_dir = work.path().join("repo");
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "newer", "url": repo_dir.display().to_string(), "password": PASSWORD,
                     "auto_init": true, "min_restic_version": "0.15.0"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = server.admin(
        "POST",
        "/api/v1/plans",
        Some(&json!({"name": "docs", "repository": "newer", "paths": [src.display().to_string()],
                     "schedule": "0 3 * * *", "agents": [agent.id]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let done = run_plan(&server, "docs", &agent);
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    assert_eq!(sha256_file(&agent.managed()), wrapper_sha);
    assert!(agent.log().contains("a repository requires restic 0.15.0, this host runs 0.14.0"), "{}", agent.log());
    let view = eventually(Duration::from_secs(30), "the managed restic reported", || {
        let v = agent_view(&server, &agent.id);
        (v["restic"]["version"] == "0.15.1").then_some(v)
    });
    assert_eq!(view["restic"]["managed"], true, "{view}");
    assert_eq!(view["restic_drift"], "current", "{view}");
    assert_eq!(Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD).snapshots().len(), 1);
    // The host's own restic is what it was.
    assert_eq!(fs::read_link(&host_restic).unwrap(), restic);

    // A requirement nothing served meets: the run fails and says why.
    let r = server.admin("PATCH", "/api/v1/repositories/newer", Some(&json!({"min_restic_version": "0.17.0"})));
    assert_eq!(r.status, 200, "{}", r.text());
    let failed = run_plan(&server, "docs", &agent);
    assert_eq!(failed["status"], "failed", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(message.contains("requires restic 0.17.0") && message.contains("0.15.1"), "{failed}");
    assert!(message.contains("the server serves no restic known to be new enough"), "{failed}");
}

/// Whether a request line downloads restic: by name or, as agents do when the server names one, by digest.
fn restic_download(request_line: &str) -> bool {
    request_line.contains("/restic/binary") || request_line.contains("/restic/blobs/sha256/")
}

/// A plain-HTTP proxy in front of the server that answers the first `failures` restic downloads (by name or by
/// digest: [`restic_download`]) with 503 and forwards everything else, asking for `Connection: close` so every
/// request comes on a connection of its own and is seen here. Its threads end with the test process.
struct FailingProxy {
    addr: std::net::SocketAddr,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FailingProxy {
    fn start(upstream: std::net::SocketAddr, failures: usize) -> FailingProxy {
        Self::start_throttled(upstream, failures, None)
    }

    /// `throttle`: a restic download's answer is forwarded 64 KiB at a time with this pause between chunks.
    fn start_throttled(upstream: std::net::SocketAddr, failures: usize, throttle: Option<Duration>) -> FailingProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = failed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let first = text.lines().next().unwrap_or_default().to_string();
                    if restic_download(&first)
                        && counter
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < failures).then_some(n + 1))
                            .is_ok()
                    {
                        let _ = client.write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                        return;
                    }
                    let mut forwarded = String::new();
                    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
                        if !line.to_ascii_lowercase().starts_with("connection:") {
                            forwarded.push_str(line);
                            forwarded.push_str("\r\n");
                        }
                    }
                    forwarded.push_str("connection: close\r\n\r\n");
                    let Ok(mut server) = std::net::TcpStream::connect(upstream) else { return };
                    if server.write_all(forwarded.as_bytes()).is_err() {
                        return;
                    }
                    let (mut from_client, mut to_server) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from_client, &mut to_server);
                    });
                    match throttle.filter(|_| restic_download(&first)) {
                        None => {
                            let _ = std::io::copy(&mut server, &mut client);
                        }
                        Some(pause) => {
                            let mut buf = vec![0u8; 64 * 1024];
                            while let Ok(n @ 1..) = server.read(&mut buf) {
                                if client.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                std::thread::sleep(pause);
                            }
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        FailingProxy { addr, failed }
    }
}

#[test]
fn a_failed_download_is_retried_not_refused() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let bytes = fs::read(&restic).unwrap();
    let sha = publish_restic(&server, &bytes);
    publish_sidecar(&server, &sha, "0.14.0");
    let mut agent = HostAgent::enroll(&server);
    // The agent talks to the server through a proxy that fails the first restic download with 503.
    let proxy = FailingProxy::start(server.addr(), 1);
    let mut config: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
    config["server"] = json!(format!("http://{}", proxy.addr));
    fs::write(agent.config(), config.to_string()).unwrap();
    agent.start_with(&[("RM_AGENT_RESTIC_RETRY", "2")]);

    let view = poll(Duration::from_secs(60), || {
        let v = agent_view(&server, &agent.id);
        v["restic"]["install_error"].as_str().is_some_and(|e| e.contains("retrying")).then_some(v)
    })
    .unwrap_or_else(|| panic!("no install error saying retrying\n{}", agent.log()));
    assert!(view["restic"]["install_error"].as_str().unwrap().contains("503"), "{view}");
    // Tried again after the short test backoff: installed, reported, and the error is gone.
    let view = eventually(Duration::from_secs(60), "the retried install", || {
        let v = agent_view(&server, &agent.id);
        (v["restic"]["managed"] == true && v["restic"]["install_error"].is_null()).then_some(v)
    });
    assert_eq!(view["restic"]["version"], "0.14.0", "{view}");
    assert_eq!(sha256_file(&agent.managed()), sha);
    assert_eq!(proxy.failed.load(std::sync::atomic::Ordering::SeqCst), 1);
    let log = agent.log();
    assert!(log.contains("restic install failed, retrying in 2 s"), "{log}");
    assert!(!log.contains("restic install refused"), "{log}");
}

/// `run --once`: one heartbeat (and nothing installed: these agents' restic is not what is tested).
fn heartbeat_once(agent: &HostAgent) -> Output {
    let mut cmd = agent.command();
    cmd.args(["run", "--once"]);
    run_bounded(cmd, Duration::from_secs(60))
}

#[test]
fn an_unreadable_restic_file_or_sidecar_is_unpublished_not_an_error() {
    let server = server();
    let agent = HostAgent::enroll(&server);
    // A Unix socket cannot be opened (ENXIO), even by root: an honest I/O error on the store's open path.
    let dir = server.data_dir().join("restic-binaries");
    fs::create_dir_all(&dir).unwrap();
    let _build = std::os::unix::net::UnixListener::bind(dir.join(host_restic_name())).unwrap();
    let _sidecar = std::os::unix::net::UnixListener::bind(dir.join("restic-binaries.json")).unwrap();

    let out = heartbeat_once(&agent);
    assert!(out.status.success(), "the heartbeat failed: {}", stderr(&out));
    let m = server.get("/agent/manifest");
    assert_eq!(m.status, 200, "{}", m.text());
    let entry = m.json()["restic"].as_array().unwrap().iter().find(|e| e["file"] == host_restic_name()).cloned();
    assert_eq!(entry.unwrap()["published"], false);
    let sums = server.get("/agent/SHA256SUMS");
    assert_eq!(sums.status, 200, "{}", sums.text());
    assert!(!sums.text().contains(host_restic_name()), "{}", sums.text());
    let view = agent_view(&server, &agent.id);
    assert!(view["restic_served"].is_null(), "{view}");
    let metrics = server.admin("GET", "/metrics", None);
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    let log = server.log();
    assert!(log.contains("cannot be read; treated as not published"), "{log}");
}

#[test]
fn each_restic_build_is_described_by_either_roots_sidecar() {
    let server = server();
    // The image's restic and its sidecar (bundled), and an operator's data-dir sidecar for a Windows build only.
    let bundled = server.bundled_dir().join("restic-binaries");
    fs::create_dir_all(&bundled).unwrap();
    let bytes = b"#!/bin/sh\necho 'restic 0.14.0 compiled with go1.19'\n".to_vec();
    fs::write(bundled.join(host_restic_name()), &bytes).unwrap();
    let sha = sha256_hex(&bytes);
    let image = json!({"origin": "image", "files": {host_restic_name(): {"version": "0.14.0", "sha256": sha,
                                                                     "package_version": "0.14.0-1+b5"}}});
    fs::write(bundled.join("restic-binaries.json"), image.to_string()).unwrap();
    let windows = b"MZ not really".to_vec();
    let data = server.data_dir().join("restic-binaries");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("restic-windows-amd64.exe"), &windows).unwrap();
    let own = json!({"origin": "operator", "files": {"restic-windows-amd64.exe":
                                                     {"version": "0.17.3", "sha256": sha256_hex(&windows)}}});
    fs::write(data.join("restic-binaries.json"), own.to_string()).unwrap();

    for _ in 0..2 {
        // (twice: the second answer may come from what the first lookup remembered)
        let m = server.get("/agent/manifest").json();
        let find = |file: &str| m["restic"].as_array().unwrap().iter().find(|e| e["file"] == file).cloned().unwrap();
        let host = find(host_restic_name());
        assert_eq!(host["source"], "bundled", "{m}");
        assert_eq!(host["version"], "0.14.0", "the bundled sidecar still describes the bundled build: {m}");
        assert_eq!(host["package_version"], "0.14.0-1+b5", "{m}");
        assert_eq!(find("restic-windows-amd64.exe")["version"], "0.17.3", "{m}");
    }
}

#[test]
fn stopping_abandons_a_restic_download_and_a_restart_removes_leftovers() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let bytes = fs::read(&restic).unwrap();
    publish_restic(&server, &bytes);
    let mut agent = HostAgent::enroll(&server);
    // A slow download (64 KiB every 50 ms: restic would take well over a minute) through the proxy.
    let proxy = FailingProxy::start_throttled(server.addr(), 0, Some(Duration::from_millis(50)));
    let mut config: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
    config["server"] = json!(format!("http://{}", proxy.addr));
    fs::write(agent.config(), config.to_string()).unwrap();
    let bin = agent.dir.path().join("bin");
    let temp_files = || {
        fs::read_dir(&bin)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".restic-manager-restic-"))
            .collect::<Vec<_>>()
    };
    // A leftover of an agent killed mid-download.
    fs::write(bin.join(".restic-manager-restic-Left0v"), b"partial").unwrap();
    agent.start();
    eventually(Duration::from_secs(30), "the download under way", || {
        let files = temp_files();
        (files.len() == 1 && files[0] != ".restic-manager-restic-Left0v").then_some(())
    });
    let child = agent.child.as_mut().unwrap();
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let asked = std::time::Instant::now();
    let status = eventually(Duration::from_secs(30), "the agent exits", || child.try_wait().unwrap());
    let took = asked.elapsed();
    eprintln!("FIGURE SIGTERM during a restic download -> agent exited: {:.2} s", took.as_secs_f64());
    assert!(took < Duration::from_secs(10), "SIGTERM waited {took:?} for the download\n{}", agent.log());
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert_eq!(temp_files(), Vec::<String>::new(), "{}", agent.log());
    assert!(!agent.managed().exists());
    let log = agent.log();
    assert!(log.contains("removed 1 unfinished download(s)"), "{log}");
    assert!(log.contains("restic install abandoned"), "{log}");
}

#[test]
fn an_older_served_restic_never_replaces_a_newer_managed_one() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    // The server serves Debian's 0.14 with no sidecar (its version unknown until the smoke run).
    let bytes = fs::read(&restic).unwrap();
    publish_restic(&server, &bytes);
    let mut agent = HostAgent::enroll(&server);
    // The managed restic in use says 0.16.0; a repository of the agent's plan requires 0.17.0.
    let newer = format!(
        "#!/bin/sh\nif [ \"$1\" = version ]; then echo 'restic 0.16.0 compiled with go1.21 on linux'; exit 0; fi\n\
         exec '{}' \"$@\"\n",
        restic.display()
    );
    fs::write(agent.managed(), &newer).unwrap();
    fs::set_permissions(agent.managed(), fs::Permissions::from_mode(0o755)).unwrap();
    let managed_sha = sha256_file(&agent.managed());
    let work = tempfile::tempdir().unwrap();
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "newest", "url": work.path().join("repo").display().to_string(), "password": PASSWORD,
                     "min_restic_version": "0.17.0"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = server.admin(
        "POST",
        "/api/v1/plans",
        Some(&json!({"name": "docs", "repository": "newest", "paths": [work.path().display().to_string()],
                     "schedule": "0 3 * * *", "agents": [agent.id]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    agent.start();

    let view = poll(Duration::from_secs(60), || {
        let v = agent_view(&server, &agent.id);
        v["restic"]["install_error"].is_string().then_some(v)
    })
    .unwrap_or_else(|| panic!("no install error\n{}", agent.log()));
    let error = view["restic"]["install_error"].as_str().unwrap();
    assert!(error.contains("older than the 0.17.0"), "{view}");
    assert_eq!(sha256_file(&agent.managed()), managed_sha, "the managed restic was downgraded\n{}", agent.log());
    assert_eq!(view["restic"]["version"], "0.16.0", "{view}");

    // An explicit `restic install` may still put the served one in place.
    agent.child.take().map(|mut c| (c.kill(), c.wait()));
    let out = agent.restic_install();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_file(&agent.managed()), sha256_hex(&bytes));
}
