//! A small HTTP/1.1 client over `std::net::TcpStream`: one request writer, one response reader (heads parsed by
//! `httparse`, bodies framed by `Content-Length`, chunked coding or the end of the connection).
//!
//! Tests that misbehave on purpose (slow, truncated or oversized bodies) write to a raw socket from [`connect`],
//! starting with [`request_head`], and read the answer with [`read_response`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Socket read/write timeout for every connection made by this client.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// More response headers than any of ours carries.
const MAX_HEADERS: usize = 64;

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
        header(&self.headers, name)
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

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A connection to `addr` with the client's read/write timeouts.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// A request head: the request line, `Host`, `User-Agent: rm-e2e`, then `headers` and the blank line. The only
/// place a request is written.
pub fn request_head(host: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rm-e2e\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Writes one request: the head (with `Content-Length` when there is a body, or when the method is one that
/// normally carries one), then `body`.
fn write_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let length = body.len().to_string();
    let mut all = headers.to_vec();
    if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE") {
        all.push(("Content-Length", &length));
    }
    let mut bytes = request_head(stream.peer_addr()?, method, path, &all);
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)
}

/// Header names (lowercased) and values, in the order received.
type Headers = Vec<(String, String)>;

/// Parses a response head; `None` while `raw` does not hold a complete one yet. Returns the head's length too.
fn parse_response_head(raw: &[u8]) -> io::Result<Option<(usize, u16, Headers)>> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut slots);
    let len = match head.parse(raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(invalid(format!("{e} in the response head {:?}", String::from_utf8_lossy(raw))));
        }
    };
    let status = head.code.ok_or_else(|| invalid("no status code"))?;
    let headers = head
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect();
    Ok(Some((len, status, headers)))
}

/// Parses a complete response head given without its closing blank line (e.g. one head from `curl -D`).
pub fn parse_head(head: &str) -> io::Result<(u16, Vec<(String, String)>)> {
    let raw = format!("{}\r\n\r\n", head.trim_end_matches("\r\n"));
    match parse_response_head(raw.as_bytes())? {
        Some((_, status, headers)) => Ok((status, headers)),
        None => Err(invalid(format!("incomplete response head {head:?}"))),
    }
}

/// Message framing over a stream; bytes read beyond the current message stay in `buf`.
/// One `read`, retried when a signal interrupted it (EINTR: tests that signal child processes see these).
fn read_retrying(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

struct ByteReader<'a> {
    stream: &'a mut TcpStream,
    buf: &'a mut Vec<u8>,
}

impl ByteReader<'_> {
    /// Reads once more from the stream into `buf`; an error at the end of the connection.
    fn more(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = read_retrying(self.stream, &mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn read_exact_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.more()?;
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(self.buf, rest))
    }

    /// Everything up to and including `pattern`.
    fn read_until_pattern(&mut self, pattern: &[u8]) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.windows(pattern.len()).position(|w| w == pattern) {
                return self.read_exact_bytes(end + pattern.len());
            }
            self.more()?;
        }
    }

    /// The response head: (status, headers). Its bytes are consumed from `buf`.
    fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        loop {
            if let Some((len, status, headers)) = parse_response_head(self.buf)? {
                self.buf.drain(..len);
                return Ok((status, headers));
            }
            self.more().map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the response head")
                }
                _ => e,
            })?;
        }
    }

    /// A chunked body, up to and including the trailer section (none expected) and its empty line.
    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_until_pattern(b"\r\n")?;
            let field = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let size = usize::from_str_radix(field.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid(format!("bad chunk size {field:?}")))?;
            if size == 0 {
                while self.read_until_pattern(b"\r\n")?.len() > 2 {}
                return Ok(body);
            }
            let chunk = self.read_exact_bytes(size + 2)?;
            if &chunk[size..] != b"\r\n" {
                return Err(invalid("chunk not followed by CRLF"));
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }

    /// Everything until the server closes the connection.
    fn read_to_close(&mut self) -> io::Result<Vec<u8>> {
        let mut body = std::mem::take(self.buf);
        self.stream.read_to_end(&mut body)?;
        Ok(body)
    }
}

/// Reads one response: the head, then a body delimited by `Content-Length`, chunked encoding or the end of the
/// connection. `buf` holds bytes read from `stream` but not consumed yet; whatever follows this response stays in it.
pub fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> io::Result<Response> {
    let mut reader = ByteReader { stream, buf };
    let (status, headers) = reader.read_head()?;
    let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if chunked {
        reader.read_chunked()?
    } else if let Some(length) = header(&headers, "content-length") {
        let length: usize = length.parse().map_err(|_| invalid(format!("bad content-length {length:?}")))?;
        reader.read_exact_bytes(length)?
    } else {
        reader.read_to_close()?
    };
    Ok(Response { status, headers, body })
}

/// One request on a fresh connection with `Connection: close`.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    http_request_with_body(addr, method, path, headers, &[])
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
    let mut all = headers.to_vec();
    all.push(("Connection", "close"));
    write_request(&mut stream, method, path, &all, body)?;
    read_response(&mut stream, &mut Vec::new(), method == "HEAD")
}

pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    http_request(addr, "GET", path, &[])
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

    /// Sends one request and reads its response.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
        write_request(&mut self.stream, method, path, headers, body)?;
        read_response(&mut self.stream, &mut self.buf, method == "HEAD")
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
        write_request(&mut stream, "GET", path, &[("Connection", "close")], &[])?;
        let mut pending = Vec::new();
        let (status, headers) = ByteReader { stream: &mut stream, buf: &mut pending }.read_head()?;
        Ok(Download { stream, status, headers, pending, received: 0 })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn content_length(&self) -> u64 {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no usable content-length in {:?}", self.headers))
    }

    /// Reads up to `buf.len()` body bytes; 0 means the server closed the connection.
    pub fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = if self.pending.is_empty() {
            read_retrying(&mut self.stream, buf)?
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
