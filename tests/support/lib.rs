//! Harness for the end-to-end tests: runs the real `restic-manager-server` binary on a real 127.0.0.1 socket with
//! throw-away data and bundled dirs, and talks to it with raw HTTP/1.1 over `std::net::TcpStream`.
//!
//! Every wait here is bounded and fails with a message that includes the server's log.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const SERVER_BIN: &str = "restic-manager-server";
pub const AGENT_BIN: &str = "restic-manager-agent";
pub const LINUX_AMD64: &str = "restic-manager-agent-linux-amd64";
pub const LINUX_ARM64: &str = "restic-manager-agent-linux-arm64";
pub const WINDOWS_AMD64: &str = "restic-manager-agent-windows-amd64.exe";
pub const BINARY_PATH: &str = "/agent/binary?os=linux&arch=amd64";

/// How long the server may take to answer `/readyz` after being spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read/write timeout for every request made by this harness.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------------------------

/// `<target dir>/debug/<name>`, found by walking up from this test executable (which lives in `target/debug/deps`).
/// Panics with instructions when the binary has not been built.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("cannot locate the running test executable");
    let mut dir = exe.parent().expect("test executable has a parent dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found (located from the test executable {}). The end-to-end tests run the real binaries: run `cargo build --workspace` \
         (or `make test`) first.",
        path.display(),
        exe.display()
    );
    path
}

/// A `Command` for one of the workspace binaries with every inherited `RM_*` variable removed, so the caller's
/// environment cannot change what a test sees.
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(binary(name));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RM_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion within `timeout` (killing it otherwise) and returns its output.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdout(fs::File::create(&out_path).unwrap()).stderr(fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let status = match wait_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not exit within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default())
            );
        }
    };
    Output { status, stdout: fs::read(&out_path).unwrap(), stderr: fs::read(&err_path).unwrap() }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------------------------

/// Configures a server before it starts. Creating the builder creates the temp dirs, so files can be put in place
/// before the server sees them.
pub struct ServerBuilder {
    tmp: tempfile::TempDir,
    data_dir: PathBuf,
    bundled_dir: PathBuf,
    env: Vec<(String, String)>,
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
        ServerBuilder { tmp, data_dir, bundled_dir, env: Vec::new() }
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
            let addr = free_port();
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
        let deadline = Instant::now() + READY_TIMEOUT;
        let listening = addr.to_string();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                if self.log().to_ascii_lowercase().contains("address already in use") {
                    return Ready::PortTaken;
                }
                panic!("the server exited during startup with {status}\n{}", self.log_tail());
            }
            // Only trust /readyz once our own process logged that it bound this port: another test's server could
            // otherwise be the one answering.
            let bound =
                self.log_json().iter().any(|l| l["message"] == "listening" && l["addr"].as_str() == Some(&*listening));
            if bound && http_request(addr, "GET", "/readyz", &[]).is_ok_and(|r| r.status == 200) {
                return Ready::Yes;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not become ready (GET /readyz == 200 on {addr}) within {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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
    pub fn log(&self) -> String {
        self.builder.log()
    }

    /// The stderr lines that are JSON objects.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.builder.log_json()
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
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<_> = self.log_json().into_iter().filter(|l| pred(l)).collect();
            if found.len() >= min {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {min} log line(s) {what}, found {}\n{}",
                found.len(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
        http_request(self.addr, method, path, headers)
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
        http_request_with_body(self.addr, method, path, &headers, body.as_deref().unwrap_or_default())
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
// HTTP
// ---------------------------------------------------------------------------------------------------------------

/// A complete response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Lowercased names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The value of a header (first occurrence), by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// Panics unless the header is present.
    pub fn expect_header(&self, name: &str) -> &str {
        self.header(name).unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("body is not JSON ({e}): status {}, body {:?}", self.status, String::from_utf8_lossy(&self.body))
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn write_request(stream: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<()> {
    let host = stream.peer_addr()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rm-e2e\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a response head (status line and headers, without the blank line).
pub fn parse_head(head: &str) -> io::Result<(u16, Vec<(String, String)>)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {head:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x status line"));
    }
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad status code"))?;
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok((status, headers))
}

/// One request on a fresh connection with `Connection: close`; the body is read until the server closes.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    let mut stream = connect(addr)?;
    write_request(&mut stream, method, path, headers)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let end = find(&raw, b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the response head"))?;
    let (status, headers) = parse_head(&String::from_utf8_lossy(&raw[..end]))?;
    let mut body = raw.split_off(end + 4);
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response { status, headers, body })
}

/// Like [`http_request`], with `body` sent after a `Content-Length` header.
pub fn http_request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut stream = connect(addr)?;
    let length = body.len().to_string();
    let mut all = headers.to_vec();
    if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE") {
        all.push(("Content-Length", &length));
    }
    write_request(&mut stream, method, path, &all)?;
    stream.write_all(body)?;
    read_response(&mut stream, &mut Vec::new(), method == "HEAD")
}

/// Reads one response: the head, then a body delimited by `Content-Length`, chunked encoding or the end of the
/// connection. `buf` holds bytes read from `stream` but not consumed yet; whatever follows this response stays in it.
pub fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> io::Result<Response> {
    let mut reader = ByteReader { stream, buf };
    let head = reader.read_until_pattern(b"\r\n\r\n")?;
    let (status, headers) = parse_head(&String::from_utf8_lossy(&head[..head.len() - 4]))?;
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if chunked {
        let mut body = Vec::new();
        loop {
            let line = reader.read_until_pattern(b"\r\n")?;
            let field = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let size = usize::from_str_radix(field.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {field:?}")))?;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                while reader.read_until_pattern(b"\r\n")?.len() > 2 {}
                break body;
            }
            body.extend_from_slice(&reader.read_exact_bytes(size + 2)?[..size]);
        }
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad content-length {length:?}")))?;
        reader.read_exact_bytes(length)?
    } else {
        let mut body = std::mem::take(reader.buf);
        reader.stream.read_to_end(&mut body)?;
        body
    };
    Ok(Response { status, headers, body })
}

/// Message framing over a stream; bytes read beyond the current message stay in `buf`.
struct ByteReader<'a> {
    stream: &'a mut TcpStream,
    buf: &'a mut Vec<u8>,
}

impl ByteReader<'_> {
    fn fill(&mut self, want: usize) -> io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        while self.buf.len() < want {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }

    fn read_exact_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        self.fill(n)?;
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(self.buf, rest))
    }

    /// Everything up to and including `pattern`.
    fn read_until_pattern(&mut self, pattern: &[u8]) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = find(self.buf, pattern) {
                return self.read_exact_bytes(end + pattern.len());
            }
            let want = self.buf.len() + 1;
            self.fill(want)?;
        }
    }
}

/// A keep-alive HTTP/1.1 connection for many requests in a row (heartbeat load).
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: Vec::new() })
    }

    /// Sends one request (with `Content-Length` when `body` is not empty) and reads its response.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
        let host = self.stream.peer_addr()?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rm-e2e\r\n");
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes)?;
        read_response(&mut self.stream, &mut self.buf, method == "HEAD")
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    http_request(addr, "GET", path, &[])
}

fn dechunk(mut raw: &[u8]) -> io::Result<Vec<u8>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed chunked body");
    let mut out = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").ok_or_else(bad)?;
        let size_field = std::str::from_utf8(&raw[..line_end]).map_err(|_| bad())?;
        let size = usize::from_str_radix(size_field.split(';').next().unwrap_or("").trim(), 16).map_err(|_| bad())?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// A download whose body the test reads at its own pace, on a connection with a small receive buffer (so the
/// server cannot race far ahead of the reader).
pub struct Download {
    stream: TcpStream,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Body bytes that arrived together with the head and were not handed out yet.
    pending: Vec<u8>,
    /// Body bytes handed out so far.
    pub received: u64,
}

/// Receive buffer for [`Download`] connections.
const DOWNLOAD_RCVBUF: i32 = 128 * 1024;

impl Download {
    /// Connects, sends `GET path` and reads the response head.
    pub fn start(addr: SocketAddr, path: &str) -> io::Result<Download> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        set_rcvbuf(&stream, DOWNLOAD_RCVBUF)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut stream = stream;
        write_request(&mut stream, "GET", path, &[])?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(end) = find(&raw, b"\r\n\r\n") {
                break end;
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the response head"));
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let (status, headers) = parse_head(&String::from_utf8_lossy(&raw[..end]))?;
        let pending = raw.split_off(end + 4);
        Ok(Download { stream, status, headers, pending, received: 0 })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> u64 {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no usable content-length in {:?}", self.headers))
    }

    /// Reads up to `buf.len()` body bytes; 0 means the server closed the connection.
    pub fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = if self.pending.is_empty() {
            self.stream.read(buf)?
        } else {
            let n = self.pending.len().min(buf.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            n
        };
        self.received += n as u64;
        Ok(n)
    }

    /// Reads body bytes into `out` until it holds `target` bytes in total or the connection closes.
    pub fn read_until(&mut self, out: &mut Vec<u8>, target: usize, chunk: usize, pause: Duration) -> io::Result<()> {
        let mut buf = vec![0u8; chunk];
        while out.len() < target {
            let want = chunk.min(target - out.len());
            let n = self.read_some(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        Ok(())
    }

    /// Reads until the server closes the connection.
    pub fn read_to_end(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.read_until(out, usize::MAX, 256 * 1024, Duration::ZERO)
    }
}

fn set_rcvbuf(stream: &TcpStream, bytes: i32) -> io::Result<()> {
    // SAFETY: setsockopt on a descriptor owned by `stream`, with a correctly sized int option.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

// ---------------------------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------------------------

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `len` pseudo-random bytes from `seed` (SplitMix64): incompressible, reproducible, different per seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `bytes` to `path`, creating parent dirs.
pub fn write_file(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Replaces `path` atomically: writes a temp file in the same directory, then renames it over `path`.
pub fn replace_atomically(path: &Path, bytes: &[u8]) {
    let dir = path.parent().expect("path has a parent");
    let mut tmp = tempfile::Builder::new().prefix(".replace-").tempfile_in(dir).expect("temp file next to target");
    tmp.write_all(bytes).unwrap();
    tmp.as_file().sync_all().unwrap();
    tmp.persist(path).unwrap_or_else(|e| panic!("renaming over {}: {e}", path.display()));
}

/// SHA-256 of a file's contents (streamed), lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let mut file = fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hex::encode(hasher.finalize())
}

// ---------------------------------------------------------------------------------------------------------------
// A misbehaving HTTP server
// ---------------------------------------------------------------------------------------------------------------

/// A tiny HTTP/1.1 server on 127.0.0.1 for tests of clients facing a broken server: every connection gets exactly
/// one answer, the raw bytes `respond(request_target)` returns, after which the connection is closed. Whatever those
/// bytes are (a lying `Content-Length`, an HTML page, ...) is what the client sees. Stopped and joined on drop.
pub struct FakeHttp {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHttp {
    pub fn start(respond: impl Fn(&str) -> Vec<u8> + Send + 'static) -> FakeHttp {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (thread_stop, thread_requests) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let Some(target) = read_request_target(&mut stream) else { continue };
                thread_requests.lock().unwrap().push(target.clone());
                let _ = stream.write_all(&respond(&target));
                let _ = stream.flush();
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
        });
        FakeHttp { addr, stop, requests, thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request targets received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads a request head (up to 64 KiB) and returns its target (`/path?query`); `None` on EOF, timeout or garbage.
fn read_request_target(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&head, b"\r\n\r\n").is_none() {
        if head.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    text.lines().next()?.split(' ').nth(1).map(str::to_string)
}

/// A complete `HTTP/1.1` response with `Content-Length` and `Connection: close`, e.g. `raw_response("200 OK", ..)`.
pub fn raw_response(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The first of `candidates` that exists, or `None` after printing a SKIP note naming the tool.
pub fn tool(name: &str, candidates: &[&str]) -> Option<PathBuf> {
    let found = candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    if found.is_none() {
        eprintln!("SKIP: {name} not installed");
    }
    found
}

/// Wine 8.0 lacks `ProcessPrng` (bcryptprimitives.dll), which Rust's std imports: a tiny stand-in DLL built with the
/// same mingw compiler goes next to the .exe in `dir`. A test fixture only; it never ships. `false` when mingw is
/// missing (after a SKIP note).
pub fn wine_shim(dir: &Path) -> bool {
    let Some(gcc) = tool("x86_64-w64-mingw32-gcc", &["/usr/bin/x86_64-w64-mingw32-gcc"]) else { return false };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bcryptprimitives-shim.c");
    let mut build = Command::new(gcc);
    build.args(["-O2", "-shared", "-o"]).arg(dir.join("bcryptprimitives.dll")).arg(src).arg("-ladvapi32");
    let out = run_bounded(build, Duration::from_secs(60));
    assert!(out.status.success(), "building the wine shim: {}", String::from_utf8_lossy(&out.stderr));
    true
}
