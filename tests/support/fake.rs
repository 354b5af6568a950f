//! A misbehaving HTTP server, for tests of clients (the installer, the agent) facing a broken server.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A tiny HTTP/1.1 server on 127.0.0.1: every connection gets exactly one answer, the raw bytes
/// `respond(request_target)` returns, after which the connection is closed. Whatever those bytes are (a lying
/// `Content-Length`, an HTML page, ...) is what the client sees. A request body (by `Content-Length`) is read before
/// answering, so a client that sends one (an agent's heartbeat) sees the answer, not a reset. Every request head is
/// kept ([`FakeHttp::heads`]), so a test can tell which headers reached this server. Stopped and joined on drop.
pub struct FakeHttp {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    heads: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHttp {
    pub fn start(respond: impl Fn(&str) -> Vec<u8> + Send + 'static) -> FakeHttp {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (thread_stop, thread_requests, thread_heads) = (stop.clone(), requests.clone(), heads.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let Some((target, head)) = read_request(&mut stream) else { continue };
                thread_requests.lock().unwrap().push(target.clone());
                thread_heads.lock().unwrap().push(head);
                let _ = stream.write_all(&respond(&target));
                let _ = stream.flush();
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
        });
        FakeHttp { addr, stop, requests, heads, thread: Some(thread) }
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

    /// The request heads received so far (request line and headers, as sent), in order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads a request head (up to 64 KiB) and a `Content-Length` body (up to 1 MiB, discarded); returns the target
/// (`/path?query`) and the head as text. `None` on EOF, timeout or garbage.
fn read_request(stream: &mut TcpStream) -> Option<(String, String)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut slots);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(len)) => {
                let target = request.path?.to_string();
                let body_len = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                    .unwrap_or(0)
                    .min(1024 * 1024);
                let mut have = head.len() - len;
                while have < body_len {
                    let n = stream.read(&mut buf).ok()?;
                    if n == 0 {
                        break;
                    }
                    have += n;
                }
                return Some((target, String::from_utf8_lossy(&head[..len]).into_owned()));
            }
            Ok(httparse::Status::Partial) if head.len() <= 64 * 1024 => {}
            _ => return None,
        }
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
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
