//! What the backup tests drive for real: the host's `restic` (Debian's 0.14 in CI), an S3-compatible server on
//! loopback (PyPI's `moto[server]`, installed by `scripts/test-tools.sh`), and enrolled agents running as child
//! processes with their logs kept.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::bin::{AGENT_BIN, command, run_bounded, wait_timeout};
use crate::poll::poll;
use crate::server::free_port;
use crate::skip::skip;

const TOOLS_HINT: &str = "run scripts/test-tools.sh (root), which installs Debian's restic and moto[server] from PyPI";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The restic the tests use (`RM_TEST_RESTIC`, else `restic` on PATH); skips the running test when there is none.
pub fn restic_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("RM_TEST_RESTIC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("restic"))
        .find(|p| p.is_file());
    if found.is_none() {
        skip(format!("restic not installed: {TOOLS_HINT}"));
    }
    found
}

/// A restic repository the test reaches with the restic CLI directly (not through our code).
#[derive(Clone)]
pub struct Repo {
    pub restic: PathBuf,
    pub url: String,
    pub password: String,
    pub env: Vec<(String, String)>,
}

impl Repo {
    pub fn new(restic: &Path, url: &str, password: &str) -> Repo {
        Repo { restic: restic.to_path_buf(), url: url.to_string(), password: password.to_string(), env: Vec::new() }
    }

    pub fn with_env(mut self, key: &str, value: &str) -> Repo {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `restic <args>` against this repository; the password through RESTIC_PASSWORD (a test's own process only).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.restic);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RESTIC_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RESTIC_REPOSITORY", &self.url).env("RESTIC_PASSWORD", &self.password).arg("--no-cache").args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs restic and panics with its output when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let out = run_bounded(self.command(args), Duration::from_secs(120));
        assert!(
            out.status.success(),
            "restic {args:?} on {} failed ({}): {}{}",
            self.url,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_run(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args), Duration::from_secs(120))
    }

    pub fn init(&self) {
        self.run(&["init"]);
    }

    /// `restic snapshots --json`, parsed.
    pub fn snapshots(&self) -> Vec<serde_json::Value> {
        let text = self.run(&["snapshots", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// Restores `snapshot` into `target` (restic recreates the absolute source paths below it).
    pub fn restore(&self, snapshot: &str, target: &Path) {
        self.run(&["restore", snapshot, "--target", &target.display().to_string()]);
    }
}

/// An S3-compatible server on loopback (moto), killed on drop. Any access key is accepted.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

pub const S3_ACCESS_KEY: &str = "rm-test-access";
pub const S3_SECRET_KEY: &str = "rm-test-secret-Wombat-31337";

impl S3Server {
    /// Starts moto on a free port; skips the running test when moto is not installed.
    pub fn start() -> Option<S3Server> {
        let candidates = [
            std::env::var_os("RM_MOTO_SERVER").map(PathBuf::from),
            Some(workspace_root().join("target/moto-venv/bin/moto_server")),
        ];
        let Some(bin) = candidates.into_iter().flatten().find(|p| p.is_file()) else {
            skip(format!("moto_server not installed: {TOOLS_HINT}"));
            return None;
        };
        let port = free_port().port();
        let dir = tempfile::tempdir().unwrap();
        let mut server = S3Server { child: None, port, dir, bin };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let log = fs::File::create(self.dir.path().join("moto.log")).unwrap();
        let child = Command::new(&self.bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let up = poll(Duration::from_secs(30), || TcpStream::connect(&addr).ok().map(|_| ()));
        assert!(up.is_some(), "moto did not listen on {addr}: {}", self.log());
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// `s3:http://127.0.0.1:<port>/<bucket>/<prefix>`
    pub fn url(&self, bucket_and_prefix: &str) -> String {
        format!("s3:http://127.0.0.1:{}/{bucket_and_prefix}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port (moto keeps nothing across a restart).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An agent enrolled with a test server, in its own directory, run as a child process.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub id: String,
    child: Option<Child>,
    runs: u32,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Enrolls with `server_url` using `token` (over loopback http).
    pub fn enroll(server_url: &str, token: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("etc/agent.json");
        let mut cmd = command(AGENT_BIN);
        cmd.args(["enroll", "--server", server_url, "--config"]).arg(&config).env("RM_ENROLL_TOKEN", token);
        let out = run_bounded(cmd, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "enroll failed: {stderr}");
        let saved: serde_json::Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
        let id = saved["agent_id"].as_str().unwrap().to_string();
        Agent { dir, id, child: None, runs: 0, env: Vec::new() }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("etc/agent.json")
    }

    /// The directory holding the config and everything the agent keeps beside it.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// An environment variable for every later run (e.g. `RM_RESTIC`).
    pub fn env(&mut self, key: &str, value: &str) -> &mut Agent {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("agent-{run}.log"))
    }

    /// Starts `run` (replacing nothing: the previous run must have ended).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the agent is already running");
        self.runs += 1;
        let log = fs::File::create(self.log_path(self.runs)).unwrap();
        let mut cmd = command(AGENT_BIN);
        cmd.arg("run").arg("--config").arg(self.config());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(cmd.spawn().unwrap());
    }

    /// `run --once`, bounded; returns its output.
    pub fn run_once(&self) -> Output {
        let mut cmd = command(AGENT_BIN);
        cmd.arg("run").arg("--once").arg("--config").arg(self.config());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run_bounded(cmd, Duration::from_secs(120))
    }

    /// Everything every run logged so far.
    pub fn log(&self) -> String {
        let mut all = String::new();
        for run in 1..=self.runs {
            if let Ok(mut f) = fs::File::open(self.log_path(run)) {
                let _ = f.read_to_string(&mut all);
            }
        }
        all
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// SIGTERM and wait for the exit (panics if it does not exit in time).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the agent is running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        match wait_timeout(&mut child, Duration::from_secs(30)) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                panic!("the agent did not exit within 30 s of SIGTERM: {}", self.log())
            }
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A wrapper script around the real restic that appends `start <ns> <pid>` / `end <ns> <pid>` lines for every
/// `backup` to `log`, so a test can see whether two backups ever overlapped.
pub fn timing_restic(dir: &Path, restic: &Path, log: &Path) -> PathBuf {
    let path = dir.join("restic-timed");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = backup ]; then\n  echo \"start $(date +%s%N) $$\" >> '{log}'\n  '{restic}' \"$@\"\n  \
         rc=$?\n  echo \"end $(date +%s%N) $$\" >> '{log}'\n  exit $rc\nfi\nexec '{restic}' \"$@\"\n",
        log = log.display(),
        restic = restic.display()
    );
    fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

impl Agent {
    /// `run --once` as if on another host: in its own UTS namespace whose hostname is `hostname` (`unshare --uts` as
    /// root, else `unshare --user --map-root-user --uts`), so restic's `--host` differs from this machine's. `None`
    /// when this machine allows neither (the caller then makes the other host's snapshots another way).
    pub fn run_once_as(&self, hostname: &str) -> Option<Output> {
        let prefix: &[&str] = if uts_namespace(&["--uts"]) {
            &["--uts"]
        } else if uts_namespace(&["--user", "--map-root-user", "--uts"]) {
            &["--user", "--map-root-user", "--uts"]
        } else {
            return None;
        };
        let agent = command(AGENT_BIN);
        let mut cmd = Command::new("unshare");
        cmd.args(prefix).args(["sh", "-c", "hostname \"$0\" && exec \"$@\"", hostname]);
        cmd.arg(agent.get_program()).arg("run").arg("--once").arg("--config").arg(self.config());
        for (key, value) in agent.get_envs() {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        Some(run_bounded(cmd, Duration::from_secs(120)))
    }
}

/// Whether [`Agent::run_once_as`] can run an agent under another hostname here.
pub fn uts_namespace_available() -> bool {
    uts_namespace(&["--uts"]) || uts_namespace(&["--user", "--map-root-user", "--uts"])
}

/// Whether `unshare <args> sh -c 'hostname x'` works here.
fn uts_namespace(args: &[&str]) -> bool {
    Command::new("unshare")
        .args(args)
        .args(["sh", "-c", "hostname rm-uts-probe && [ \"$(hostname)\" = rm-uts-probe ]"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A wrapper script around the real restic that appends `<command> <pid>` to `log` for every `prune` and `check`
/// and, for `prune`, first sleeps `prune_delay_secs` (interruptibly: SIGINT, as a dying agent sends, ends it), so a
/// test can count how many hosts really ran maintenance and kill one mid-prune.
pub fn maintenance_restic(dir: &Path, name: &str, restic: &Path, log: &Path, prune_delay_secs: u32) -> PathBuf {
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in\n  prune|check) echo \"$1 $$\" >> '{log}' ;;\nesac\nif [ \"$1\" = prune ] && [ {delay} -gt 0 ]; \
         then\n  sleep {delay} &\n  wait $!\nfi\nexec '{restic}' \"$@\"\n",
        log = log.display(),
        delay = prune_delay_secs,
        restic = restic.display()
    );
    fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The bytes of every file under `dir` (a local repository's size on disk, as far as restic's files go).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

impl S3Server {
    /// The loopback port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A TCP proxy on loopback to `127.0.0.1:<upstream>` that holds each chunk a client sends for a settable delay: a
/// restic run against S3 through it takes long enough to be caught holding its repository lock.
pub struct SlowProxy {
    port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SlowProxy {
    pub fn start(upstream: u16) -> SlowProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = delay_ms.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let delay = delay.clone();
                std::thread::spawn(move || {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                    let (Ok(mut from_client), Ok(mut to_up)) = (client.try_clone(), up.try_clone()) else { return };
                    let (mut from_up, mut to_client) = (up, client);
                    let back = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from_up, &mut to_client);
                        let _ = to_client.shutdown(std::net::Shutdown::Write);
                    });
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match from_client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let ms = delay.load(Ordering::SeqCst);
                        if ms > 0 {
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                        if to_up.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to_up.shutdown(std::net::Shutdown::Write);
                    let _ = back.join();
                });
            }
        });
        SlowProxy { port, delay_ms }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}
