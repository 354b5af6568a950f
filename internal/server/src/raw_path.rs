//! `GET`/`HEAD /install/{name}` answered straight off the socket, before hyper sees the connection.
//!
//! Install scripts and their revalidations are the smallest and most frequent requests a fleet makes, and for them
//! hyper's connection machinery (dispatch, the service future, header maps in and out, body boxes) cost as much as
//! the answer. So a connection starts here ([`crate::conn`] runs the loop): for each request head,
//! - **memo hit**: the exact head bytes (and whether the peer is a trusted proxy, which is all the answer reads of
//!   the peer) were answered on this thread before, and the install file that answer was made from is still what a
//!   full lookup would find ([`AssetStore::still_current`]: the re-validation, an atomic load and one `ioctl`). The
//!   remembered status line, headers and body go out in one write with the current `Date`.
//! - **miss**: the head is parsed with `httparse` (hyper's parser, with hyper's defaults). A request that
//!   [`FastPath::claims`] and that needs nothing of HTTP/1 beyond its head (HTTP/1.1; no `Content-Length`,
//!   `Transfer-Encoding`, `Connection`, `Expect` or `Upgrade`) gets [`FastPath::answer`], the router's answer,
//!   serialised as hyper serialises it; an answer made from a known file version is remembered.
//! - **anything else** (another path or method, HTTP/1.0, a body, a head `httparse` refuses or that ends in bare
//!   LFs, a head over [`MAX_HEAD`]): the connection, with every byte read so far, goes to hyper for the rest of its
//!   life (`conn::WatchedIo` hands hyper those bytes first). Nothing is consumed before that decision, so hyper sees exactly what the client sent.
//!
//! Same answer either way: `tests::the_raw_path_writes_what_hyper_writes` compares the bytes on the wire.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use rm_assets::{AssetKind, Known, Source};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::auth::ConnTls;
use crate::fast_path::{FastPath, ROUTE};
use crate::log_buffer::{AccessRecord, Route, UriText};

/// A request head longer than this goes to hyper (whose own limit then applies).
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Headers a claimed request may have (more: hyper's).
const MAX_HEADERS: usize = 64;
/// Bodies up to this size are remembered with their answer.
const MEMO_BODY_MAX: usize = 64 * 1024;
/// Bytes of answers remembered per thread and server; the memo starts over when it would grow past this.
const MEMO_BYTES: usize = 8 * 1024 * 1024;

/// What [`head`] found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// A request head of this many bytes, ending in CRLF CRLF.
    Complete(usize),
    /// Not all of it yet.
    Partial,
    /// Not one for the raw path: hyper reads this connection from here.
    Foreign,
}

/// Where the first request head in `buf` ends.
pub(crate) fn head(buf: &[u8]) -> Head {
    if let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") {
        return if end + 4 <= MAX_HEAD { Head::Complete(end + 4) } else { Head::Foreign };
    }
    // No CRLF CRLF yet: more may come, unless the head already ended some other way (bare LFs) or cannot be one.
    if buf.len() >= MAX_HEAD {
        return Head::Foreign;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(buf) {
        Ok(httparse::Status::Partial) => Head::Partial,
        _ => Head::Foreign,
    }
}

/// What [`RawPath::respond`] did with a request.
pub(crate) enum Handled {
    /// Answered; the connection may carry on.
    Answered,
    /// Not a request for the raw path; nothing was written.
    NotClaimed,
}

/// The raw path of one connection.
pub(crate) struct RawPath {
    fast: FastPath,
    peer: SocketAddr,
    tls: ConnTls,
    trusted: bool,
    /// The bytes of the answer being written (kept for the next one).
    out: Vec<u8>,
}

impl RawPath {
    pub(crate) fn new(fast: FastPath, peer: SocketAddr, tls: ConnTls) -> RawPath {
        let trusted = fast.state().settings().trusted_proxies.contains(peer.ip());
        RawPath { fast, peer, tls, trusted, out: Vec::new() }
    }

    /// Answers the request whose head (and nothing more) is `head`, on `io`.
    pub(crate) async fn respond<S: AsyncWrite + Unpin>(&mut self, head: &[u8], io: &mut S) -> io::Result<Handled> {
        let started = Instant::now();
        let key = MemoKey { server: self.fast.id(), trusted: self.trusted };
        if let Some(memo) = MEMO.with_borrow(|m| m.get(&key).and_then(|m| m.answers.get(head).cloned()))
            && self.fast.state().store().still_current(&memo.known)
        {
            self.out.clear();
            self.out.extend_from_slice(&memo.head);
            end_head(&mut self.out);
            self.out.extend_from_slice(&memo.body);
            let written = write(io, &self.out).await;
            let (method, uri) = (memo.method.clone(), memo.uri.clone());
            self.log(method, uri, memo.status, memo.body.len() as u64, written.is_ok(), started, memo.source);
            #[cfg(test)]
            self.fast.raw_answers[0].fetch_add(1, Ordering::Relaxed);
            return written.map(|()| Handled::Answered);
        }
        let Some(request) = parse(head, self.peer, self.tls) else { return Ok(Handled::NotClaimed) };
        let (method, uri) = (request.method().clone(), UriText::of(request.uri()));
        let known =
            FastPath::name(request.uri()).and_then(|name| self.fast.state().store().known(AssetKind::Install, name));
        // Boxed: the answer's future is large, and a connection's future is as large as its largest state for as
        // long as the connection lives.
        let (parts, body) = Box::pin(self.fast.answer(request)).await.into_parts();
        #[cfg(test)]
        self.fast.raw_answers[1].fetch_add(1, Ordering::Relaxed);
        let (status, source) = (parts.status, parts.extensions.get::<Source>().copied());
        let with_body = can_have_body(&method, status);
        // The fast path gives every answer a `Content-Length` (which hyper writes as is, and then sends that much).
        let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let length = if with_body { declared.or(body.size_hint().exact()) } else { Some(0) };
        let Some(length) = length else {
            self.log(method, uri, status.as_u16(), 0, false, started, source);
            return Err(io::Error::other("an install answer without a known length"));
        };
        self.out.clear();
        encode_head(&mut self.out, &method, status, &parts.headers, length);
        let head_len = self.out.len();
        end_head(&mut self.out);
        let body = if !with_body {
            Bytes::new()
        } else if length <= MEMO_BODY_MAX as u64 {
            match body.collect().await.map(|c| c.to_bytes()) {
                Ok(bytes) if bytes.len() as u64 == length => bytes,
                Ok(_) => {
                    self.log(method, uri, status.as_u16(), 0, false, started, source);
                    return Err(io::Error::other("an install file's body is not its declared length"));
                }
                Err(e) => {
                    self.log(method, uri, status.as_u16(), 0, false, started, source);
                    return Err(io::Error::other(format!("reading an install file: {e}")));
                }
            }
        } else {
            // A large body: streamed frame by frame, as hyper would, and not remembered.
            let mut sent = 0u64;
            let streamed = stream(io, &self.out, body, &mut sent).await;
            self.log(method, uri, status.as_u16(), sent, streamed.is_ok(), started, source);
            return streamed.map(|()| Handled::Answered);
        };
        self.out.extend_from_slice(&body);
        let written = write(io, &self.out).await;
        self.log(method.clone(), uri.clone(), status.as_u16(), body.len() as u64, written.is_ok(), started, source);
        written?;
        if let Some(known) = known.filter(|_| matches!(status, StatusCode::OK | StatusCode::NOT_MODIFIED)) {
            let memo = Memo {
                known,
                head: Bytes::copy_from_slice(&self.out[..head_len]),
                body,
                method,
                uri,
                status: status.as_u16(),
                source,
            };
            remember(key, head, memo);
        }
        Ok(Handled::Answered)
    }

    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        method: Method,
        uri: UriText,
        status: u16,
        bytes: u64,
        complete: bool,
        started: Instant,
        source: Option<Source>,
    ) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        let record = AccessRecord {
            at: SystemTime::now(),
            method,
            route: Some(Route::Fixed(ROUTE)),
            uri,
            peer: Some(self.peer),
            status,
            bytes,
            complete,
            duration: started.elapsed(),
            source,
        };
        if let Some(record) = crate::log_buffer::access(record) {
            record.emit();
        }
    }
}

fn remember(key: MemoKey, head: &[u8], memo: Memo) {
    let size = head.len() + memo.head.len() + memo.body.len();
    MEMO.with_borrow_mut(|all| {
        let memos = all.entry(key).or_default();
        if memos.bytes + size > MEMO_BYTES {
            memos.answers.clear();
            memos.bytes = 0;
        }
        memos.bytes += size;
        if let Some(old) = memos.answers.insert(head.into(), Arc::new(memo)) {
            memos.bytes -= head.len() + old.head.len() + old.body.len();
        }
    });
}

/// Writes `head` and then `body` frame by frame, counting the body bytes sent.
async fn stream<S: AsyncWrite + Unpin>(io: &mut S, head: &[u8], mut body: Body, sent: &mut u64) -> io::Result<()> {
    io.write_all(head).await?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| io::Error::other(format!("reading an install file: {e}")))?;
        if let Ok(mut data) = frame.into_data() {
            while data.has_remaining() {
                let n = io.write(data.chunk()).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                data.advance(n);
                *sent += n as u64;
            }
        }
    }
    io.flush().await
}
async fn write<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// The request, if the raw path answers it: what [`FastPath::claims`], in HTTP/1.1, framed by its head alone.
fn parse(head: &[u8], peer: SocketAddr, tls: ConnTls) -> Option<http::Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return None,
    }
    if parsed.version != Some(1) {
        return None;
    }
    let method = match parsed.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return None,
    };
    let uri: http::Uri = parsed.path?.parse().ok()?;
    FastPath::name(&uri)?;
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if [header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::CONNECTION, header::EXPECT, header::UPGRADE]
            .contains(&name)
        {
            return None;
        }
        map.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    let mut request = http::Request::new(Body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = map;
    request.extensions_mut().insert(ConnectInfo(peer));
    request.extensions_mut().insert(tls);
    FastPath::claims(&request).then_some(request)
}

/// Whether a response to `method` with `status` carries a body (hyper's rule for a server).
fn can_have_body(method: &Method, status: StatusCode) -> bool {
    *method != Method::HEAD && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// The status line and headers as hyper writes them, without `Date` and the blank line: lower-case names in the map's
/// order; a `Content-Length` from the map unless the body is empty and the request is not `HEAD` (where hyper drops
/// it: a 304 to a `GET` has none, one to a `HEAD` keeps it), else one hyper adds.
fn encode_head(out: &mut Vec<u8>, method: &Method, status: StatusCode, headers: &HeaderMap, length: u64) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let head_request = *method == Method::HEAD;
    let empty = length == 0;
    let mut wrote_length = false;
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            if wrote_length || (empty && !head_request) {
                continue;
            }
            wrote_length = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let length_allowed = !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    if !wrote_length && length_allowed && !(empty && head_request) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(length.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// `Date` (hyper's format, made once a second per thread) and the blank line that ends the head.
fn end_head(out: &mut Vec<u8>) {
    DATE.with_borrow_mut(|date| {
        let now = SystemTime::now();
        let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now).into_bytes());
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&date.1);
        out.extend_from_slice(b"\r\n\r\n");
    });
}

/// A remembered answer.
struct Memo {
    /// The file version it was made from: a hit needs it still current.
    known: Arc<Known>,
    /// Status line and headers, without `Date` and the blank line.
    head: Bytes,
    /// Empty for `HEAD` and 304.
    body: Bytes,
    method: Method,
    uri: UriText,
    status: u16,
    source: Option<Source>,
}

/// Answers differ by server (tests run several in one process) and by whether the peer's forwarding headers count.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct MemoKey {
    server: u64,
    trusted: bool,
}

#[derive(Default)]
struct Memos {
    answers: HashMap<Box<[u8]>, Arc<Memo>>,
    bytes: usize,
}

thread_local! {
    static MEMO: RefCell<HashMap<MemoKey, Memos>> = RefCell::default();
    static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
}

/// A unique number per [`FastPath`] (so per server), for [`MemoKey`].
pub(crate) fn next_server_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    struct Servers {
        _tmp: tempfile::TempDir,
        data: std::path::PathBuf,
        raw: SocketAddr,
        hyper: SocketAddr,
        /// The raw path's answers: from its memo, and made.
        answers: Arc<[AtomicU64; 2]>,
        _stop: tokio::sync::watch::Sender<bool>,
    }

    impl Servers {
        fn answers(&self) -> [u64; 2] {
            [self.answers[0].load(Ordering::Relaxed), self.answers[1].load(Ordering::Relaxed)]
        }
    }

    /// One state served twice: with the raw path, and by hyper alone.
    async fn servers() -> Servers {
        let (tmp, data, state) = crate::fast_path::install_files();
        std::fs::write(data.join("install/large.bin"), (0..200_000u32).map(|i| i as u8).collect::<Vec<_>>()).unwrap();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut addrs = Vec::new();
        let mut answers = None;
        for raw_path in [true, false] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            let net = crate::NetSettings { raw_path, conn_threads: Some(1), ..Default::default() };
            let (router, fast, stop_rx) = (crate::app(state.clone()), FastPath::new(&state), stop_rx.clone());
            answers = answers.or_else(|| fast.as_ref().map(|f| f.raw_answers.clone()));
            tokio::spawn(crate::conn::serve(listener, router, fast, net, None, stop_rx, Duration::from_secs(1)));
        }
        Servers { _tmp: tmp, data, raw: addrs[0], hyper: addrs[1], answers: answers.unwrap(), _stop: stop }
    }

    /// Sends each request (in the given pieces) on one connection and reads each answer whole; the `Date` value is
    /// blanked. An answer cut short by the server closing is returned as far as it came.
    async fn exchange(addr: SocketAddr, requests: &[Vec<&[u8]>]) -> Vec<String> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let mut answers = Vec::new();
        for pieces in requests {
            for piece in pieces {
                stream.write_all(piece).await.unwrap();
                if pieces.len() > 1 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            // A write of several requests at once has as many answers.
            let sent = pieces.concat();
            let mut heads: Vec<bool> = Vec::new();
            let mut rest = sent.as_slice();
            while let Some(end) = memchr::memmem::find(rest, b"\r\n\r\n") {
                heads.push(rest.starts_with(b"HEAD"));
                rest = &rest[end + 4..];
            }
            if heads.is_empty() {
                heads.push(sent.starts_with(b"HEAD"));
            }
            for head_request in heads {
                answers.push(read_answer(&mut stream, &mut buf, head_request).await);
            }
        }
        answers
    }

    async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> String {
        loop {
            if let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n").map(|e| e + 4) {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut response = httparse::Response::new(&mut headers);
                response.parse(&buf[..end]).unwrap();
                let status = response.code.unwrap();
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap());
                let body = if head_request || status == 304 { 0 } else { length };
                if buf.len() >= end + body {
                    let answer: Vec<u8> = buf.drain(..end + body).collect();
                    return blank_date(&String::from_utf8_lossy(&answer));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("an answer within 5 s")
                .unwrap_or(0);
            if n == 0 {
                return format!("[closed after {:?}]", String::from_utf8_lossy(&std::mem::take(buf)));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn blank_date(answer: &str) -> String {
        answer
            .split("\r\n")
            .map(|line| if line.starts_with("date: ") { "date: -" } else { line })
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    fn get(path: &str, headers: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nhost: rm.example.com\r\n{headers}\r\n").into_bytes()
    }

    /// The same requests, on connections of the same shape, get the same bytes back from the raw path as from hyper
    /// (`Date` aside), the second and third time (memo hits) as the first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_raw_path_writes_what_hyper_writes() {
        let s = servers().await;
        let etag = {
            let answers = exchange(s.hyper, &[vec![&get("/install/notes.txt", "")]]).await;
            let line = answers[0].split("\r\n").find(|l| l.starts_with("etag: ")).unwrap().to_owned();
            line["etag: ".len()..].to_owned()
        };
        let inm = format!("if-none-match: {etag}\r\n");
        let (script, notes) = (get("/install/install.sh", ""), get("/install/notes.txt", ""));
        let head = b"HEAD /install/install.sh HTTP/1.1\r\nhost: rm.example.com:8443\r\n\r\n".to_vec();
        let (not_modified, other) =
            (get("/install/notes.txt", &inm), get("/install/notes.txt", "if-none-match: \"x\"\r\n"));
        let head_304 = format!("HEAD /install/notes.txt HTTP/1.1\r\n{inm}\r\n").into_bytes();
        let range = get("/install/notes.txt", "range: bytes=10-19\r\n");
        let unsatisfiable = get("/install/notes.txt", "range: bytes=20000-\r\n");
        let (missing, dots, hidden) =
            (get("/install/missing.sh", ""), get("/install/..", ""), get("/install/.hidden", ""));
        let (large, healthz) = (get("/install/large.bin", ""), get("/healthz", ""));
        let pipelined = [script.clone(), not_modified.clone(), head.clone()].concat();
        let absolute =
            b"GET http://rm.example.com/install/install.sh HTTP/1.1\r\nhost: rm.example.com\r\n\r\n".to_vec();
        let http10 = b"GET /install/install.sh HTTP/1.0\r\nhost: rm.example.com\r\n\r\n".to_vec();
        let close = get("/install/install.sh", "connection: close\r\n");
        let bare_lf = b"GET /install/install.sh HTTP/1.1\nhost: rm.example.com\n\n".to_vec();
        let post = b"POST /install/install.sh HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc".to_vec();
        let no_host = b"GET /install/install.sh HTTP/1.1\r\n\r\n".to_vec();
        let one = |r: &Vec<u8>| vec![r.clone()];
        let connections: Vec<Vec<Vec<u8>>> = vec![
            vec![script.clone(), script.clone(), script.clone(), no_host.clone(), no_host.clone()],
            vec![head.clone(), head.clone(), head_304.clone(), head_304.clone()],
            vec![notes.clone(), not_modified.clone(), not_modified.clone(), other.clone(), other, range.clone(), range],
            vec![unsatisfiable.clone(), unsatisfiable, missing.clone(), missing, dots, hidden],
            vec![large.clone(), large, notes.clone()],
            vec![pipelined.clone(), pipelined],
            vec![script.clone(), healthz, script.clone(), not_modified.clone()],
            vec![absolute.clone(), absolute],
            one(&http10),
            vec![script.clone(), close, script.clone()],
            one(&bare_lf),
            vec![script.clone(), post, script.clone()],
        ];
        assert_eq!(s.answers(), [0, 0]);
        for requests in &connections {
            let pieces: Vec<Vec<&[u8]>> = requests.iter().map(|r| vec![r.as_slice()]).collect();
            let via_raw = exchange(s.raw, &pieces).await;
            let via_hyper = exchange(s.hyper, &pieces).await;
            assert_eq!(
                via_raw,
                via_hyper,
                "{:?}",
                requests.iter().map(|r| String::from_utf8_lossy(r)).collect::<Vec<_>>()
            );
        }
        // Of the 45 requests above, hyper alone answers 9: from /healthz, HTTP/1.0, `connection: close`, the bare-LF
        // head and the POST on. The raw path answers 36, 17 of them from its memo: a repeat of a 200 or 304 made from
        // a file version the store already knew when the request came (not the very first install.sh, nor the 206,
        // 416, 404, 400 and large answers, which are never remembered).
        assert_eq!(s.answers(), [17, 19]);
        // A head that arrives a few bytes at a time, and one split right before its blank line.
        let trickled: Vec<&[u8]> = script.chunks(7).collect();
        let split: Vec<&[u8]> = vec![&not_modified[..not_modified.len() - 2], &not_modified[not_modified.len() - 2..]];
        for pieces in [trickled, split] {
            let via_raw = exchange(s.raw, &[pieces.clone(), pieces.clone()]).await;
            assert_eq!(via_raw, exchange(s.hyper, &[pieces.clone(), pieces]).await);
        }
        drop(s);
    }

    /// A remembered answer is never given for a file that changed since: an override dropped into the data dir is
    /// served on the next request, on the same connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remembered_answer_gives_way_to_a_changed_file() {
        let s = servers().await;
        let script = get("/install/install.sh", "");
        let mut stream = TcpStream::connect(s.raw).await.unwrap();
        let mut buf = Vec::new();
        for _ in 0..3 {
            stream.write_all(&script).await.unwrap();
            let answer = read_answer(&mut stream, &mut buf, false).await;
            assert!(answer.ends_with("SERVER='http://rm.example.com'\necho hi\n"), "{answer}");
        }
        assert_eq!(s.answers(), [1, 2], "the third answer comes from the memo");
        for version in ["one", "two"] {
            let tmp = s.data.join("install/.install.sh.tmp");
            std::fs::write(&tmp, format!("#!/bin/sh\necho {version}\n")).unwrap();
            std::fs::rename(&tmp, s.data.join("install/install.sh")).unwrap();
            stream.write_all(&script).await.unwrap();
            let answer = read_answer(&mut stream, &mut buf, false).await;
            assert!(answer.ends_with(&format!("\necho {version}\n")), "{answer}");
            assert!(answer.contains("x-asset-source: data-dir"), "{answer}");
        }
        // The answer after a change is made afresh (and the one after that remembered and given again).
        assert_eq!(s.answers()[0], 1);
        stream.write_all(&script).await.unwrap();
        assert!(read_answer(&mut stream, &mut buf, false).await.ends_with("\necho two\n"));
        stream.write_all(&script).await.unwrap();
        assert!(read_answer(&mut stream, &mut buf, false).await.ends_with("\necho two\n"));
        assert_eq!(s.answers()[0], 2);
    }

    #[test]
    fn heads_end_at_crlf_crlf_and_anything_else_is_hyper_s() {
        assert_eq!(head(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET"), Head::Complete(27));
        assert_eq!(head(b"GET / HTTP/1.1\r\nhost: x\r\n"), Head::Partial);
        assert_eq!(head(b""), Head::Partial);
        assert_eq!(head(b"GET / HTTP/1.1\nhost: x\n\n"), Head::Foreign);
        assert_eq!(head(b"\x16\x03\x01\x02\x00"), Head::Foreign); // a TLS hello on the plain port
        assert_eq!(head(&[b'a'; MAX_HEAD]), Head::Foreign);
        let long = [b"GET / HTTP/1.1\r\nx: ".as_slice(), &[b'a'; MAX_HEAD], b"\r\n\r\n"].concat();
        assert_eq!(head(&long), Head::Foreign);
    }
}
