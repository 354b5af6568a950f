//! The real `restic-manager-server`, spawned on a free 127.0.0.1 port with throw-away data and bundled dirs.
//!
//! Every wait here is bounded and fails with a message that includes the server's log.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use crate::bin::{SERVER_BIN, command, wait_timeout};
use crate::http::{Response, http_request, http_request_with_body};
use crate::poll::poll;

/// How long the server may take to answer `/readyz` after being spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Configures a server before it starts. Creating the builder creates the temp dirs, so files can be put in place
/// before the server sees them.
pub struct ServerBuilder {
    tmp: tempfile::TempDir,
    data_dir: PathBuf,
    bundled_dir: PathBuf,
    env: Vec<(String, String)>,
    /// `RLIMIT_NOFILE` (soft and hard) for the server process.
    fd_limit: Option<u64>,
    /// The address to listen on instead of 127.0.0.1 (e.g. 0.0.0.0, to be reached on a non-loopback address).
    listen_ip: Option<IpAddr>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerBuilder {
    /// Temp layout: `data/{agent-binaries,install}`, `bundled/{agent-binaries,install}`, `outside/` (in neither
    /// root) and `server.stderr`.
    pub fn new() -> ServerBuilder {
        let tmp = tempfile::Builder::new().prefix("rm-e2e-").tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let bundled_dir = tmp.path().join("bundled");
        for root in [&data_dir, &bundled_dir] {
            for sub in ["agent-binaries", "install"] {
                fs::create_dir_all(root.join(sub)).unwrap();
            }
        }
        fs::create_dir_all(tmp.path().join("outside")).unwrap();
        ServerBuilder { tmp, data_dir, bundled_dir, env: Vec::new(), fd_limit: None, listen_ip: None }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bundled_dir(&self) -> &Path {
        &self.bundled_dir
    }

    /// Passes `RM_DATA_DIR=path` instead of the created data dir.
    pub fn with_data_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.data_dir = path.into();
        self
    }

    /// Passes `RM_BUNDLED_ASSETS_DIR=path` instead of the created bundled dir.
    pub fn with_bundled_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.bundled_dir = path.into();
        self
    }

    /// `RM_SHUTDOWN_GRACE`, e.g. "20s".
    pub fn grace(self, grace: &str) -> Self {
        self.env("RM_SHUTDOWN_GRACE", grace)
    }

    /// Any extra environment variable (applied after the defaults, so it can override them).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Listens on `ip` (a free port) instead of 127.0.0.1; the harness still talks to it over 127.0.0.1 when `ip` is
    /// unspecified (0.0.0.0).
    pub fn listen_on(mut self, ip: IpAddr) -> Self {
        self.listen_ip = Some(ip);
        self
    }

    /// Runs the server with `RLIMIT_NOFILE` set to `limit` (soft and hard), as `prlimit --nofile=limit` would.
    pub fn fd_limit(mut self, limit: u64) -> Self {
        self.fd_limit = Some(limit);
        self
    }

    fn stderr_path(&self) -> PathBuf {
        self.tmp.path().join("server.stderr")
    }

    fn spawn(&self, listen: SocketAddr) -> Child {
        let mut cmd = command(SERVER_BIN);
        cmd.env("RM_DATA_DIR", &self.data_dir)
            .env("RM_BUNDLED_ASSETS_DIR", &self.bundled_dir)
            .env("RM_LISTEN", listen.to_string())
            .env("RM_LOG_FORMAT", "json")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.stderr_path()).expect("creating the stderr capture file"));
        if let Some(limit) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
            // SAFETY: setrlimit is async-signal-safe; the closure touches nothing but its copied argument.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                });
            }
        }
        cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
    }

    /// Starts the server and waits until it is listening on its port and `/readyz` answers 200.
    pub fn start(self) -> Server {
        let (child, addr) = self.launch();
        Server { child: Some(child), addr, builder: self, restarts: 0 }
    }

    /// Spawns the server on a free port and waits until it is ready.
    fn launch(&self) -> (Child, SocketAddr) {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let addr = match (free_port(), self.listen_ip) {
                (free, Some(ip)) => SocketAddr::new(ip, free.port()),
                (free, None) => free,
            };
            let mut child = self.spawn(addr);
            match self.wait_ready(&mut child, addr) {
                Ready::Yes => return (child, addr),
                // Another process took the port between our probe and the server's bind: try another one.
                Ready::PortTaken => continue,
            }
        }
        panic!("could not start the server on a free port in {ATTEMPTS} attempts\n{}", self.log_tail());
    }

    fn wait_ready(&self, child: &mut Child, addr: SocketAddr) -> Ready {
        let listening = addr.to_string();
        let addr = connectable(addr);
        let ready = poll(READY_TIMEOUT, || {
            if let Some(status) = child.try_wait().expect("try_wait") {
                if self.log().to_ascii_lowercase().contains("address already in use") {
                    return Some(Ready::PortTaken);
                }
                panic!("the server exited during startup with {status}\n{}", self.log_tail());
            }
            // Only trust /readyz once our own process logged that it bound this port: another test's server could
            // otherwise be the one answering.
            let bound =
                self.log_json().iter().any(|l| l["message"] == "listening" && l["addr"].as_str() == Some(&*listening));
            (bound && http_request(addr, "GET", "/readyz", &[]).is_ok_and(|r| r.status == 200)).then_some(Ready::Yes)
        });
        ready.unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server did not become ready (GET /readyz == 200 on {addr}) within {READY_TIMEOUT:?}\n{}",
                self.log_tail()
            );
        })
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// The stderr lines that are JSON objects.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        format!("--- server stderr (last {} lines) ---\n{}\n--- end ---", tail.len(), tail.join("\n"))
    }

    /// Runs the server expecting it to fail at startup; returns its exit status and stderr. Panics if it is still
    /// running after `timeout`.
    pub fn run_expecting_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.spawn(free_port());
        match wait_timeout(&mut child, timeout) {
            Some(status) => (status, fs::read_to_string(self.stderr_path()).unwrap_or_default()),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server was expected to exit at startup but was still running after {timeout:?}; stderr:\n{}",
                    fs::read_to_string(self.stderr_path()).unwrap_or_default()
                );
            }
        }
    }
}

enum Ready {
    Yes,
    PortTaken,
}

/// A running `restic-manager-server`; killed (SIGKILL) on drop if still running.
pub struct Server {
    child: Option<Child>,
    addr: SocketAddr,
    builder: ServerBuilder,
    /// How many times [`Server::restart`] ran.
    restarts: usize,
}

impl Server {
    /// A server with default settings and empty asset dirs.
    pub fn start() -> Server {
        ServerBuilder::new().start()
    }

    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }

    /// Where to connect: the listen address (127.0.0.1 for an unspecified one).
    pub fn addr(&self) -> SocketAddr {
        connectable(self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn data_dir(&self) -> &Path {
        self.builder.data_dir()
    }

    pub fn bundled_dir(&self) -> &Path {
        self.builder.bundled_dir()
    }

    /// The temp dir holding both roots; `outside/` in it is in neither root.
    pub fn root(&self) -> &Path {
        self.builder.root()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server already reaped").id() as i32
    }

    /// Everything the server wrote to stderr so far.
    /// Its stderr so far, once settled: the server writes its log in batches at most 10 ms apart, so the file is read
    /// again until it stops growing for 30 ms (at most 2 s).
    pub fn log(&self) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut text = self.builder.log();
        loop {
            std::thread::sleep(Duration::from_millis(30));
            let again = self.builder.log();
            if again.len() == text.len() || std::time::Instant::now() > deadline {
                return again;
            }
            text = again;
        }
    }

    /// The stderr lines that are JSON objects.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.builder.log_tail()
    }

    /// Polls the JSON log until `pred` matches `min` lines (returns them) or `timeout` passes (panics).
    pub fn wait_for_log_lines(
        &self,
        what: &str,
        min: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut found = Vec::new();
        let done = poll(timeout, || {
            found = self.log_json().into_iter().filter(|l| pred(l)).collect();
            (found.len() >= min).then_some(())
        });
        assert!(
            done.is_some(),
            "waited {timeout:?} for {min} log line(s) {what}, found {}\n{}",
            found.len(),
            self.log_tail()
        );
        found
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with the pid of our own, not yet reaped, child.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed: {}", self.pid(), io::Error::last_os_error());
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Whether the process is still running (reaps it if not).
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("server already reaped");
        child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(self.child.as_mut().expect("server already reaped"), timeout)
    }

    /// GET `path` on this server (raw HTTP/1.1, `Connection: close`).
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[])
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        http_request(self.addr(), method, path, headers)
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}\n{}", self.log_tail()))
    }

    /// The admin token: `RM_ADMIN_TOKEN` when the builder set it, else the one the server keeps in
    /// `<data dir>/admin.token` (generated at its first start).
    pub fn admin_token(&self) -> String {
        if let Some((_, value)) = self.builder.env.iter().rev().find(|(k, _)| k == "RM_ADMIN_TOKEN") {
            return value.clone();
        }
        let path = self.data_dir().join("admin.token");
        let token = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        token.trim().to_string()
    }

    /// A request carrying `Authorization: Bearer <admin token>` and, when `body` is given, that JSON body.
    pub fn admin(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Response {
        let auth = format!("Bearer {}", self.admin_token());
        self.send(method, path, &[("Authorization", &auth)], body)
    }

    /// A request with an optional JSON body (sent with `Content-Type: application/json`).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Response {
        let mut headers = headers.to_vec();
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        http_request_with_body(self.addr(), method, path, &headers, body.as_deref().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}\n{}", self.log_tail()))
    }

    /// SIGKILLs the server (no shutdown of any kind) and reaps it.
    pub fn sigkill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the server was still running 10s after SIGKILL\n{}", self.log_tail()))
    }

    /// Starts a new server process on the same data dir, bundled dir and environment (so the same admin token),
    /// on a new port, after killing the current one if it still runs. The previous process's stderr is kept as
    /// `server.<n>.stderr` next to `server.stderr`.
    pub fn restart(&mut self) {
        self.kill();
        self.child = None;
        self.restarts += 1;
        let kept = self.builder.root().join(format!("server.{}.stderr", self.restarts));
        let _ = fs::rename(self.builder.stderr_path(), &kept);
        let (child, addr) = self.builder.launch();
        self.child = Some(child);
        self.addr = addr;
    }

    /// Stops the server (SIGKILL) and starts a new process on the same port, data dir, bundled dir and environment,
    /// after `downtime` has run (the port is closed meanwhile: clients see "connection refused"). For clients that
    /// keep the server's URL, such as an enrolled agent. The previous process's stderr is kept as
    /// `server.<n>.stderr`. Panics if another process took the port meanwhile.
    pub fn restart_on_same_port(&mut self, downtime: impl FnOnce()) {
        self.kill();
        self.child = None;
        self.restarts += 1;
        let kept = self.builder.root().join(format!("server.{}.stderr", self.restarts));
        let _ = fs::rename(self.builder.stderr_path(), &kept);
        downtime();
        let mut child = self.builder.spawn(self.addr);
        match self.builder.wait_ready(&mut child, self.addr) {
            Ready::Yes => self.child = Some(child),
            Ready::PortTaken => panic!("port {} was taken while the server was down", self.addr),
        }
    }

    /// Like [`Server::restart_on_same_port`], but stops the server the orderly way: SIGTERM, then waits for it to
    /// exit (panics if it is still running after 60 s). Returns the old process's exit status.
    pub fn sigterm_restart_on_same_port(&mut self, downtime: impl FnOnce()) -> ExitStatus {
        self.sigterm();
        let status = self
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the server was still running 60 s after SIGTERM\n{}", self.log_tail()));
        self.restart_on_same_port(downtime);
        status
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// 127.0.0.1 for an unspecified address (0.0.0.0): where a server listening there is reached locally.
fn connectable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()) } else { addr }
}

/// A port on 127.0.0.1 that was free a moment ago (bound to :0, read, released).
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    listener.local_addr().unwrap()
}

/// A 127.0.0.1 TCP port that is bound but not listening for as long as this value lives: connections to it are
/// refused, and no other process can start listening on it meanwhile.
pub struct ClosedPort {
    fd: i32,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        // SAFETY: plain socket calls on a descriptor we own; the sockaddr structs are fully initialised.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            sa.sin_port = 0;
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len);
            assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
            let mut out: libc::sockaddr_in = std::mem::zeroed();
            let mut out_len = len;
            let rc = libc::getsockname(fd, (&mut out as *mut libc::sockaddr_in).cast(), &mut out_len);
            assert_eq!(rc, 0, "getsockname: {}", io::Error::last_os_error());
            let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, u16::from_be(out.sin_port)));
            ClosedPort { fd, addr }
        }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

impl Drop for ClosedPort {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor created in `new`, exactly once.
        unsafe { libc::close(self.fd) };
    }
}

// ---------------------------------------------------------------------------------------------------------------
