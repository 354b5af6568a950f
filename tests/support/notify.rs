//! Receivers for the notification tests: [`WebhookSink`], an HTTP server on loopback that keeps every request (head
//! and body) and answers with the statuses a test queues, and [`SmtpSink`], PyPI's `aiosmtpd` (installed by
//! `scripts/test-tools.sh` into `target/aiosmtpd-venv`, or `RM_AIOSMTPD_PYTHON`) writing each message it accepts
//! into a maildir.

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backup::workspace_root;
use crate::poll::poll;
use crate::server::free_port;
use crate::skip::skip;

/// One request a [`WebhookSink`] received, and the status it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub head: String,
    pub body: Vec<u8>,
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// An HTTP receiver on 127.0.0.1: one request per connection; answers the next queued status (200 when none).
pub struct WebhookSink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<Received>>>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebhookSink {
    pub fn start() -> WebhookSink {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let statuses = Arc::new(Mutex::new(VecDeque::new()));
        let (s, r, q) = (stop.clone(), received.clone(), statuses.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let Some((head, body)) = read(&mut stream) else { continue };
                let status = q.lock().unwrap().pop_front().unwrap_or(200);
                r.lock().unwrap().push(Received { head, body, status });
                let text = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 7\r\nconnection: close\r\n\r\nanswer{}",
                    status % 10
                );
                let _ = stream.write_all(text.as_bytes());
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
        });
        WebhookSink { addr, stop, received, statuses, thread: Some(thread) }
    }

    /// `http://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next requests are answered with these statuses, in order.
    pub fn answer(&self, statuses: &[u16]) {
        self.statuses.lock().unwrap().extend(statuses);
    }

    /// Every later request is answered 200 (queued statuses dropped).
    pub fn clear_answers(&self) {
        self.statuses.lock().unwrap().clear();
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The requests answered 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        self.received().into_iter().filter(|r| (200..300).contains(&r.status)).collect()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// `aiosmtpd` on a free loopback port, storing every accepted message in a maildir. Killed on drop.
pub struct SmtpSink {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl SmtpSink {
    /// Starts it; skips the running test (returns `None`) when aiosmtpd is not installed.
    pub fn start() -> Option<SmtpSink> {
        SmtpSink::launch(None)
    }

    /// The same, but requiring `AUTH` with this login and password (`tests/fixtures/smtp-auth-server.py`).
    pub fn with_auth(user: &str, password: &str) -> Option<SmtpSink> {
        SmtpSink::launch(Some((user, password)))
    }

    fn launch(auth: Option<(&str, &str)>) -> Option<SmtpSink> {
        let candidates = [
            std::env::var_os("RM_AIOSMTPD_PYTHON").map(PathBuf::from),
            Some(workspace_root().join("target/aiosmtpd-venv/bin/python3")),
        ];
        let python = candidates.into_iter().flatten().find(|p| {
            p.is_file() && Command::new(p).args(["-c", "import aiosmtpd"]).status().is_ok_and(|s| s.success())
        });
        let Some(python) = python else {
            skip("aiosmtpd not installed: run scripts/test-tools.sh, which installs it from PyPI");
            return None;
        };
        let port = free_port().port();
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("mail");
        let log = fs::File::create(dir.path().join("smtpd.log")).unwrap();
        let mut cmd = Command::new(&python);
        match auth {
            None => {
                cmd.args([
                    "-m",
                    "aiosmtpd",
                    "-n",
                    "-l",
                    &format!("127.0.0.1:{port}"),
                    "-c",
                    "aiosmtpd.handlers.Mailbox",
                ]);
                cmd.arg(&maildir);
            }
            Some((user, password)) => {
                cmd.arg(workspace_root().join("tests/fixtures/smtp-auth-server.py"))
                    .arg(port.to_string())
                    .arg(&maildir);
                cmd.env("RM_TEST_SMTP_USER", user).env("RM_TEST_SMTP_PASSWORD", password);
            }
        }
        let child =
            cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("starting aiosmtpd");
        let sink = SmtpSink { child, port, dir };
        let addr = format!("127.0.0.1:{port}");
        let up = poll(Duration::from_secs(30), || TcpStream::connect(&addr).ok().map(|_| ()));
        assert!(up.is_some(), "aiosmtpd did not listen on {addr}: {}", sink.log());
        Some(sink)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
    }

    /// Every message received so far (raw RFC 5322 text), oldest first.
    pub fn messages(&self) -> Vec<String> {
        let new = self.dir.path().join("mail/new");
        let mut files: Vec<_> = fs::read_dir(&new).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        files.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
        files.iter().filter_map(|p| fs::read_to_string(p).ok()).collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
