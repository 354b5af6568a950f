//! The accept loop and the life of one connection: hyper's HTTP/1 connection driven by hand (rather than
//! `axum::serve`) so that every connection is bounded in time and their number in count.
//!
//! - **Request head**: a connection must deliver a complete request head within `header_read_timeout` of being
//!   accepted (or, on a keep-alive connection, of the first byte of its next request).
//! - **Idle**: a keep-alive connection with no request in progress is closed after `idle_timeout`.
//! - **Send stall**: a response write that makes no progress for `send_timeout` (the client stopped reading) closes
//!   the connection; a slow reader that keeps taking bytes is never cut.
//! - **Request body rate**: a request body that delivers fewer than `body_min_bytes` in a `body_rate_window` while
//!   the handler waits for it fails ([`MinRate`]); the upload handler then drops (deletes) its temporary file.
//! - **Count**: at most `max_connections` at once. At the limit, or when accept fails for lack of file descriptors,
//!   the connection that has been waiting longest for a request (idle or with an unfinished head) is closed to make
//!   room, so `/healthz` keeps answering while slow clients hold connections; with none to close, the new connection
//!   is closed at once. Accept failures are logged (at most every few seconds) and followed by a short pause.
//!
//! A connection starts on the raw path ([`crate::raw_path`], install files answered straight off the socket) and
//! moves to hyper for good at its first request that path does not take.
//!
//! Each connection has a watchdog that ticks a few times per shortest timeout and reads the timestamps the
//! connection's socket wrapper ([`WatchedIo`]) and request guards ([`ActiveGuard`]) keep; closing a connection is
//! dropping its hyper future, which closes the socket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::NetSettings;
use crate::auth::ConnTls;
use crate::conn_threads::{self, ConnThreads};
use crate::fast_path::FastPath;
use crate::raw_path::{self, Handled, Head, RawPath};

/// Connections served at once when `--max-connections` is not given (capped by the file-descriptor limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// File descriptors kept free of connections for the database, asset files being served, uploads and logs.
pub const FD_RESERVE: usize = 64;
/// hyper's per-connection buffer limit (request head, and queued response bytes before it stops polling the body):
/// one file chunk, so a download whose client stopped reading holds one chunk in hyper, not six.
const MAX_BUF: usize = crate::file_body::CHUNK;
/// Pause after an accept failure such as EMFILE, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning per this interval for accept failures and for the connection limit.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd's default soft limit is 1024); returns (before, after).
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        let before = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok((before, lim.rlim_cur))
    }
}

fn fd_soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

/// The connection limit: the configured one, else [`DEFAULT_MAX_CONNECTIONS`] capped to the fd limit minus
/// [`FD_RESERVE`].
pub fn max_connections(configured: Option<usize>) -> usize {
    let fd_room = fd_soft_limit().map(|n| usize::try_from(n).unwrap_or(usize::MAX).saturating_sub(FD_RESERVE));
    match configured {
        Some(n) => {
            if fd_room.is_some_and(|room| n > room) {
                warn!(
                    max_connections = n,
                    fd_limit = fd_soft_limit(),
                    "--max-connections is above the file-descriptor limit minus {FD_RESERVE}; accepts will fail \
                     (EMFILE) before the limit is reached"
                );
            }
            n.max(1)
        }
        None => DEFAULT_MAX_CONNECTIONS.min(fd_room.unwrap_or(DEFAULT_MAX_CONNECTIONS)).max(16),
    }
}

/// Milliseconds since the first call, plus one (0 means "not set" in the timestamps below).
fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// What the watchdog and the eviction policy know about one connection.
struct ConnState {
    /// Requests whose head arrived and whose response body hyper has not dropped yet.
    active: AtomicUsize,
    /// When the connection started waiting for the current request head (accept, or the first byte after idling).
    head_started: AtomicU64,
    /// When the last response finished (or the connection was accepted).
    idle_since: AtomicU64,
    /// When a write first returned `Pending` with no write progress since.
    write_blocked_since: AtomicU64,
    /// What the connection has been told to do: [`GO_ON`], [`DRAIN`] or [`CLOSE`]; `waker` is woken on a change.
    /// An atomic and the task's own waker rather than `Notify`s: polling a `Notify` locks its waiter list, and the
    /// connection loop polls its signals every time it wakes (once per request), so a `Notify` shared by every
    /// connection (shutdown) was a lock all connection threads took per request.
    order: AtomicU8,
    waker: AtomicWaker,
}

/// [`ConnState::order`]: serve on.
const GO_ON: u8 = 0;
/// Finish the request in progress, then close (shutdown).
const DRAIN: u8 = 1;
/// Close now (evicted to make room).
const CLOSE: u8 = 2;

impl ConnState {
    fn new() -> ConnState {
        let now = now_ms();
        ConnState {
            active: AtomicUsize::new(0),
            head_started: AtomicU64::new(now),
            idle_since: AtomicU64::new(now),
            write_blocked_since: AtomicU64::new(0),
            order: AtomicU8::new(GO_ON),
            waker: AtomicWaker::new(),
        }
    }

    /// Raises the order to `order` (never lowers it) and wakes the connection.
    fn tell(&self, order: u8) {
        if self.order.fetch_max(order, Ordering::AcqRel) < order {
            self.waker.wake();
        }
    }

    /// Resolves once the order is at least `at_least`.
    fn ordered(&self, at_least: u8) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.order.load(Ordering::Acquire) >= at_least {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.order.load(Ordering::Acquire) >= at_least { Poll::Ready(()) } else { Poll::Pending }
        })
    }

    /// A request head is complete; its response is not finished yet.
    fn begin_request(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
    }

    fn end_request(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(now_ms(), Ordering::Release);
            self.head_started.store(0, Ordering::Release);
        }
    }

    fn on_read(&self) {
        if self.active.load(Ordering::Acquire) == 0 {
            let _ = self.head_started.compare_exchange(0, now_ms(), Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Why the connection must be closed now, if it must.
    fn expired(&self, limits: &NetSettings) -> Option<&'static str> {
        let now = now_ms();
        let older = |t: u64, d: Duration| t != 0 && now.saturating_sub(t) >= d.as_millis() as u64;
        if older(self.write_blocked_since.load(Ordering::Acquire), limits.send_timeout) {
            return Some("send_timeout");
        }
        if self.active.load(Ordering::Acquire) == 0 {
            let head = self.head_started.load(Ordering::Acquire);
            if head != 0 {
                return older(head, limits.header_read_timeout).then_some("header_read_timeout");
            }
            return older(self.idle_since.load(Ordering::Acquire), limits.idle_timeout).then_some("idle_timeout");
        }
        None
    }

    /// When the connection last did something, if it has no request in progress (an eviction candidate).
    fn waiting_since(&self) -> Option<u64> {
        if self.active.load(Ordering::Acquire) != 0 || self.order.load(Ordering::Acquire) == CLOSE {
            return None;
        }
        let head = self.head_started.load(Ordering::Acquire);
        Some(if head != 0 { head } else { self.idle_since.load(Ordering::Acquire) })
    }
}

/// Counts a request as in progress until hyper drops its response body.
struct ActiveGuard(Arc<ConnState>);

impl ActiveGuard {
    fn new(state: Arc<ConnState>) -> ActiveGuard {
        state.begin_request();
        ActiveGuard(state)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// A response body that keeps its request counted as active.
struct GuardedBody {
    inner: Body,
    _guard: ActiveGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, recording reads and write progress for the watchdog. What the raw path read but did not answer
/// (`read_ahead`) is read first, so hyper sees exactly what the client sent.
struct WatchedIo<S> {
    inner: S,
    state: Arc<ConnState>,
    read_ahead: Bytes,
}

impl<S> WatchedIo<S> {
    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Pending => {
                let _ =
                    self.state.write_blocked_since.compare_exchange(0, now_ms(), Ordering::AcqRel, Ordering::Acquire);
            }
            Poll::Ready(Ok(n)) if *n > 0 => self.state.write_blocked_since.store(0, Ordering::Release),
            Poll::Ready(_) => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.read_ahead.is_empty() {
            // Counted by `on_read` when they came off the socket.
            let n = self.read_ahead.len().min(buf.remaining());
            buf.put_slice(&self.read_ahead[..n]);
            self.read_ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that fails when fewer than `min_bytes` arrive within `window` of the handler starting to wait
/// for them. Time the handler spends elsewhere (writing to disk) does not count: bytes that arrived meanwhile are
/// handed out before the timer is looked at.
pub(crate) struct MinRate<B> {
    inner: B,
    min_bytes: u64,
    window: Duration,
    got: u64,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> MinRate<B> {
    pub(crate) fn new(inner: B, min_bytes: u64, window: Duration) -> MinRate<B> {
        MinRate { inner, min_bytes, window, got: 0, deadline: None }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body arrived slower than {min_bytes} bytes per {window:?}")]
pub(crate) struct TooSlow {
    min_bytes: u64,
    window: Duration,
}

impl<B> http_body::Body for MinRate<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.got += data.len() as u64;
                    if this.got >= this.min_bytes {
                        this.got = 0;
                        this.deadline = None;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.min_bytes > 0 {
                    let window = this.window;
                    let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(window)));
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Box::new(TooSlow { min_bytes: this.min_bytes, window }))));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The live connections.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    empty: Notify,
}

impl Registry {
    fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn insert(&self, state: Arc<ConnState>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, state);
        id
    }

    fn remove(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(&id);
        if conns.is_empty() {
            self.empty.notify_waiters();
        }
    }

    /// Closes the connection that has waited longest for a request; false when every connection is busy.
    fn evict_one(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = conns.values().filter_map(|c| c.waiting_since().map(|t| (t, c))).min_by_key(|(t, _)| *t);
        match oldest {
            Some((_, c)) => {
                c.tell(CLOSE);
                true
            }
            None => false,
        }
    }

    /// Tells every connection to finish its request and close.
    fn drain_all(&self) {
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).values() {
            c.tell(DRAIN);
        }
    }

    async fn wait_empty(&self) {
        loop {
            let notified = self.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Logs a recurring condition at most once per [`WARN_EVERY`], with how often it happened in between.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(events since the last log line)` when it is time to log again.
    fn hit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed) + 1)
    }
}

/// Errors of one incoming connection that say nothing about the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Serves `router` on `listener` until `stop` turns true; then stops accepting, asks every connection to finish its
/// request and close, and waits at most `grace` for them. Returns whether every connection closed in time.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    fast: Option<FastPath>,
    net: NetSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> bool {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let max = max_connections(net.max_connections);
    let threads = match ConnThreads::start(net.conn_threads.unwrap_or_else(conn_threads::default_count)) {
        Ok(threads) => threads,
        Err(e) => {
            warn!(error = %e, "cannot start the connection threads; serving connections on the main runtime");
            ConnThreads::Shared
        }
    };
    info!(
        max_connections = max,
        header_read_timeout_secs = net.header_read_timeout.as_secs_f64(),
        idle_timeout_secs = net.idle_timeout.as_secs_f64(),
        send_timeout_secs = net.send_timeout.as_secs_f64(),
        body_min_bytes = net.body_min_bytes,
        body_rate_window_secs = net.body_rate_window.as_secs_f64(),
        conn_threads = threads.count(),
        "connection limits"
    );
    let registry = Arc::new(Registry::default());
    spawn_heap_trimmer(&registry);
    let net = Arc::new(net);
    let mut accept_warn = Throttle::default();
    let mut limit_warn = Throttle::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) if is_connection_error(&e) => {
                debug!(error = %e, "an incoming connection failed before it was accepted");
                continue;
            }
            Err(e) => {
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                let evicted = out_of_fds && registry.evict_one();
                if let Some(count) = accept_warn.hit() {
                    warn!(error = %e, failures = count, connections = registry.len(), closed_a_waiting_connection = evicted,
                        "accepting a connection failed; pausing briefly");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if registry.len() >= max {
            let evicted = registry.evict_one();
            if let Some(count) = limit_warn.hit() {
                warn!(
                    max_connections = max,
                    events = count,
                    closed_a_waiting_connection = evicted,
                    "connection limit reached; {}",
                    if evicted {
                        "closing the connection that waited longest for a request"
                    } else {
                        "every connection is busy, closing the new one"
                    }
                );
            }
            if !evicted {
                drop(stream);
                continue;
            }
        }
        // Off this runtime's reactor, onto the serving thread's (`from_std` runs there, at the task's first poll).
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                debug!(%peer, error = %e, "an accepted connection could not be handed over");
                continue;
            }
        };
        let state = Arc::new(ConnState::new());
        let id = registry.insert(state.clone());
        let (registry, net, tls) = (registry.clone(), net.clone(), tls.clone());
        let routes = Routes { router: router.clone(), fast: fast.clone() };
        threads.spawn(move |load| async move {
            let _load = load;
            let stream = match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%peer, error = %e, "an accepted connection could not be registered");
                    registry.remove(id);
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            match tls {
                None => serve_connection(stream, fd, (peer, ConnTls(false)), state, routes, &net).await,
                Some(acceptor) => {
                    // The handshake counts as reading the request head: same deadline, and it can be evicted.
                    let handshake = tokio::time::timeout(net.header_read_timeout, acceptor.accept(stream));
                    tokio::select! {
                        result = handshake => match result {
                            Ok(Ok(tls_stream)) => {
                                serve_connection(tls_stream, fd, (peer, ConnTls(true)), state, routes, &net).await
                            }
                            Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => debug!(%peer, "TLS handshake timed out"),
                        },
                        () = state.ordered(CLOSE) => debug!(%peer, "closing a connection in its TLS handshake to make room"),
                    }
                }
            }
            registry.remove(id);
        });
    }
    drop(listener);
    registry.drain_all();
    let open = registry.len();
    let closed = open == 0 || {
        debug!(open, "waiting for open connections");
        tokio::time::timeout(grace, registry.wait_empty()).await.is_ok()
    };
    threads.stop().await;
    closed
}

/// What answers a connection's requests: the fast path for what it claims, else the router.
#[derive(Clone)]
struct Routes {
    router: Router,
    fast: Option<FastPath>,
}

async fn serve_connection<S>(
    stream: S,
    fd: std::os::fd::RawFd,
    (peer, tls): (SocketAddr, ConnTls),
    state: Arc<ConnState>,
    routes: Routes,
    net: &NetSettings,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Bytes in the kernel's send queue at the last tick: when writes are blocked but this shrinks, the client is
    // reading (slowly); the kernel only wakes a writer once a third of a large send buffer is free.
    let mut last_outq = None;
    let raw = routes.fast.clone().filter(|_| net.raw_path).map(|fast| RawPath::new(fast, peer, tls));
    let service_state = state.clone();
    let (min_bytes, window) = (net.body_min_bytes, net.body_rate_window);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let guard = ActiveGuard::new(service_state.clone());
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(tls);
        let request = request.map(|body| Body::new(MinRate::new(body, min_bytes, window)));
        let routes = routes.clone();
        async move {
            let response = match routes.fast {
                Some(fast) if FastPath::claims(&request) => fast.serve(request).await,
                _ => routes.router.oneshot(request).await.unwrap_or_else(|never: Infallible| match never {}),
            };
            Ok::<_, Infallible>(response.map(|inner| Body::new(GuardedBody { inner, _guard: guard })))
        }
    });
    let mut io = WatchedIo { inner: stream, state: state.clone(), read_ahead: Bytes::new() };
    let conn_state = state.clone();
    let conn = async move {
        if let Some(mut raw) = raw {
            // The unanswered bytes are copied out, so that a connection hyper serves (a long download, say) does
            // not keep the raw path's read buffer.
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            match Box::pin(raw_phase(&mut io, &mut buf, &mut raw, &conn_state)).await {
                Ok(true) => io.read_ahead = Bytes::copy_from_slice(&buf),
                Ok(false) => return Ok(()),
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Our watchdog enforces --header-read-timeout and --idle-timeout; hyper's own 30 s head timeout (on by
            // default once a timer is set, and running on idle keep-alive connections too) would override both.
            .header_read_timeout(None)
            .max_buf_size(MAX_BUF)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => result.map_err(ConnError::Http),
            // Shutdown: finish the request in progress, then close.
            () = conn_state.ordered(DRAIN) => {
                conn.as_mut().graceful_shutdown();
                conn.await.map_err(ConnError::Http)
            }
        }
    };
    tokio::pin!(conn);
    let shortest = net.header_read_timeout.min(net.idle_timeout).min(net.send_timeout);
    let mut tick = tokio::time::interval((shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = state.ordered(CLOSE) => {
                debug!(%peer, "closing a waiting connection to make room");
                return;
            }
            _ = tick.tick() => {
                if state.write_blocked_since.load(Ordering::Acquire) != 0 {
                    let outq = send_queue_len(fd);
                    if outq != last_outq {
                        last_outq = outq;
                        state.write_blocked_since.store(now_ms(), Ordering::Release);
                    }
                }
                if let Some(reason) = state.expired(net) {
                    debug!(%peer, reason, "closing the connection");
                    return;
                }
            }
        }
    }
}

/// The raw path's read buffer at first: room for a typical request head (curl's is under 100 bytes) and a few
/// pipelined ones, and small, because it is freed when hyper takes the connection over. It grows while a longer
/// head arrives, up to [`raw_path::MAX_HEAD`].
const READ_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Io(io::Error),
    #[error(transparent)]
    Http(hyper::Error),
}

/// Answers the requests [`RawPath`] takes, one after another, until one it does not (`Ok(true)`: hyper serves the
/// rest of the connection, starting with what is in `buf`) or the connection is done (`Ok(false)`). Shutdown
/// closes a connection waiting for its next request, and one that has just been answered.
async fn raw_phase<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut WatchedIo<S>,
    buf: &mut BytesMut,
    raw: &mut RawPath,
    state: &ConnState,
) -> io::Result<bool> {
    loop {
        let len = match raw_path::head(buf) {
            Head::Complete(len) => len,
            Head::Foreign => return Ok(true),
            Head::Partial => {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(buf.capacity().max(READ_CHUNK));
                }
                tokio::select! {
                    biased;
                    read = io.read_buf(buf) => if read? == 0 { return Ok(false) },
                    // A head only begun is hyper's to finish (gracefully, as it is told to at once).
                    () = state.ordered(DRAIN) => return Ok(!buf.is_empty()),
                }
                continue;
            }
        };
        state.begin_request();
        let handled = raw.respond(&buf[..len], io).await;
        state.end_request();
        match handled? {
            Handled::NotClaimed => return Ok(true),
            Handled::Answered => buf.advance(len),
        }
        if state.order.load(Ordering::Acquire) >= DRAIN {
            return Ok(false);
        }
    }
}

/// Unsent plus unacknowledged bytes in `fd`'s send queue (`SIOCOUTQ`).
#[cfg(target_os = "linux")]
fn send_queue_len(fd: std::os::fd::RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int; `fd` is the connection's socket, open while the task runs.
    (unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } == 0).then_some(n)
}

#[cfg(not(target_os = "linux"))]
fn send_queue_len(_: std::os::fd::RawFd) -> Option<i32> {
    None
}

/// Gives freed heap back to the OS after connections close: glibc keeps freed 64 KiB chunks in its arenas, so a
/// burst of stalled downloads would otherwise leave the process at its peak size. Checks every 5 s, trims when
/// connections went away since the last check.
fn spawn_heap_trimmer(registry: &Arc<Registry>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let registry = Arc::downgrade(registry);
        tokio::spawn(async move {
            let mut before = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(registry) = registry.upgrade() else { return };
                let now = registry.len();
                if now < before {
                    // SAFETY: malloc_trim only releases free memory.
                    unsafe { libc::malloc_trim(0) };
                }
                before = now;
            }
        });
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = registry;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body_of(
        pieces: usize,
        every: Duration,
        then_stall: bool,
    ) -> http_body_util::StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Unpin> {
        let stream = futures_util::stream::unfold(0, move |i| async move {
            if i == pieces {
                if then_stall {
                    std::future::pending::<()>().await;
                }
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Frame::data(Bytes::from(vec![0u8; 60]))), i + 1))
        });
        http_body_util::StreamBody::new(Box::pin(stream))
    }

    // A paused clock: the windows are decided by the code under test, not by how loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_slow_steady_body_passes_and_a_stalled_one_fails() {
        // 60 bytes every 80 ms: 150 bytes per 200 ms window, above the 100 required.
        let mut steady = MinRate::new(body_of(8, Duration::from_millis(80), false), 100, Duration::from_millis(200));
        let mut got = 0;
        while let Some(frame) = steady.frame().await {
            got += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
        }
        assert_eq!(got, 480);

        let mut stalled = MinRate::new(body_of(1, Duration::ZERO, true), 100, Duration::from_millis(200));
        assert!(stalled.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let err = stalled.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("slower than"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
