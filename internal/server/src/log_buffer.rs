//! Where log lines go: a shared in-memory buffer that one thread (`rm-log`) writes to stderr in batches.
//!
//! A busy server logs one access line per request. Writing each line with its own `write(2)`, or handing each line
//! to a thread through a channel that wakes it, costs a system call or a wake-up per request, which is as much as
//! serving a small file. Here a line is appended to a buffer under a short lock; the first line into an empty buffer
//! wakes the writer thread, which writes everything it has in one call: at once if its last write is [`GATHER`] ago,
//! else when [`GATHER`] has passed since it, gathering what arrives meanwhile. A quiet server's lines are therefore
//! written as they come; a busy one's in one `write` per [`GATHER`] (or per [`HIGH_WATER`] bytes, whichever comes
//! first). Nothing is dropped: past [`LIMIT`] bytes a logging thread waits for
//! the writer instead (backpressure rather than loss). Dropping the [`LogGuard`] writes what is left.
//!
//! Access-log lines are not even formatted where they happen: [`route_access_log`] makes the access log hand its
//! facts ([`AccessRecord`]) to the buffer, and the writer thread formats them, in the same text or JSON shape as
//! every other line (`tracing_subscriber`'s, which a test holds it to).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use axum::extract::MatchedPath;
use http::{Method, Uri};
use rm_assets::Source;

/// The least time between two writes while lines keep coming.
pub const GATHER: Duration = Duration::from_millis(10);
/// A buffer this full is written at once, without waiting for [`GATHER`] to end.
pub const HIGH_WATER: usize = 256 * 1024;
/// A buffer this full makes loggers wait for the writer.
pub const LIMIT: usize = 8 * 1024 * 1024;

struct Shared {
    state: Mutex<State>,
    /// Signalled when the buffer gets its first bytes, crosses [`HIGH_WATER`], or shutdown begins.
    wake_writer: Condvar,
    /// Signalled after each write, for loggers waiting at [`LIMIT`] and for the final flush.
    written: Condvar,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    /// About how many bytes `entries` will be once formatted.
    bytes: usize,
    closing: bool,
    /// The writer has taken a batch and is writing it.
    writing: bool,
}

enum Entry {
    /// A line `tracing_subscriber` formatted.
    Line(Vec<u8>),
    /// An access-log line still to be formatted.
    Access(AccessRecord),
}

/// The route template an access-log line names: the router's match, or a fixed template for a request answered
/// without the router (the install-file fast path).
#[derive(Clone, Debug)]
pub enum Route {
    Matched(MatchedPath),
    Fixed(&'static str),
}

impl Route {
    pub fn as_str(&self) -> &str {
        match self {
            Route::Matched(m) => m.as_str(),
            Route::Fixed(s) => s,
        }
    }
}

/// A request URI as an access-log line prints it, copied out of the request.
///
/// A `Uri` clone shares the connection's read buffer; holding it until the log thread formats the line would keep
/// hyper from reusing that buffer (a fresh allocation per request) and make the log thread free it, across threads
/// (glibc then contends for the arena's lock). Short URIs (nearly all) are stored inline: no allocation at all.
#[derive(Clone)]
pub enum UriText {
    Inline { len: u8, bytes: [u8; UriText::INLINE] },
    Heap(Box<str>),
}

impl UriText {
    const INLINE: usize = 94;

    /// The text `uri`'s `Display` gives.
    pub fn of(uri: &Uri) -> UriText {
        let plain = uri.scheme().is_none() && uri.authority().is_none();
        let text = match uri.path_and_query() {
            Some(pq) if plain => pq.as_str(),
            None if plain => "/",
            _ => return UriText::Heap(uri.to_string().into_boxed_str()),
        };
        if text.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            UriText::Inline { len: text.len() as u8, bytes }
        } else {
            UriText::Heap(text.into())
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Copied whole from a `&str` in `of`, so valid UTF-8 (the fallback is unreachable).
            UriText::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or("-"),
            UriText::Heap(s) => s,
        }
    }
}

impl std::fmt::Display for UriText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an access-log line says, as the access log hands it over.
pub struct AccessRecord {
    pub at: SystemTime,
    pub method: Method,
    pub route: Option<Route>,
    pub uri: UriText,
    pub peer: Option<SocketAddr>,
    pub status: u16,
    pub bytes: u64,
    pub complete: bool,
    pub duration: Duration,
    pub source: Option<Source>,
}

impl AccessRecord {
    /// The record as an ordinary `tracing` event: what the access log emits when [`route_access_log`] was not called,
    /// and the shape [`format_access`] reproduces.
    pub fn emit(&self) {
        let r = self;
        tracing::info!(
            target: "access",
            method = %r.method,
            route = %r.route.as_ref().map_or("-", Route::as_str),
            uri = %r.uri,
            peer = r.peer.map(|p| p.to_string()).unwrap_or_default(),
            status = r.status,
            bytes = r.bytes,
            complete = r.complete,
            duration_ms = r.duration.as_micros() as f64 / 1000.0,
            source = r.source.map_or("-", Source::as_str),
            "request"
        );
    }
}

/// How an access record is formatted: the `--log-format` of every other line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// What a formatted access line costs in the buffer's accounting.
const ACCESS_BYTES: usize = 200;

static ACCESS_SINK: OnceLock<(LogWriter, Format)> = OnceLock::new();

/// From now on the access log hands its records to `writer`, formatted as `format` (once per process; later calls
/// are ignored). Without this the access log emits ordinary `tracing` events.
pub fn route_access_log(writer: &LogWriter, format: Format) {
    let _ = ACCESS_SINK.set((writer.clone(), format));
}

/// Queues an access record if [`route_access_log`] was called; gives it back (`Some`) otherwise.
pub fn access(record: AccessRecord) -> Option<AccessRecord> {
    match ACCESS_SINK.get() {
        Some((writer, _)) => {
            writer.push(Entry::Access(record), ACCESS_BYTES);
            None
        }
        None => Some(record),
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `tracing_subscriber` writer: `make_writer` hands out a line buffer that is appended on drop.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes out what is buffered and stops the writer thread when dropped. Hold it for as long as the process logs.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the writer thread over `out` (stderr in production).
pub fn start(out: impl Write + Send + 'static) -> io::Result<(LogWriter, LogGuard)> {
    let shared =
        Arc::new(Shared { state: Mutex::new(State::default()), wake_writer: Condvar::new(), written: Condvar::new() });
    let writer_shared = shared.clone();
    let thread = std::thread::Builder::new().name("rm-log".into()).spawn(move || write_batches(&writer_shared, out))?;
    Ok((LogWriter { shared: shared.clone() }, LogGuard { shared, thread: Some(thread) }))
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut entries = Vec::new();
    let mut batch = Vec::new();
    let format = || ACCESS_SINK.get().map_or(Format::Text, |(_, f)| *f);
    let mut last_write: Option<std::time::Instant> = None;
    loop {
        let mut state = lock(&shared.state);
        while state.entries.is_empty() && !state.closing {
            state = shared.wake_writer.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let wait = last_write.map_or(Duration::ZERO, |t| GATHER.saturating_sub(t.elapsed()));
        if !state.closing && state.bytes < HIGH_WATER && !wait.is_zero() {
            // Gather: more lines arrive meanwhile and go out in the same write.
            state = shared
                .wake_writer
                .wait_timeout_while(state, wait, |s| !s.closing && s.bytes < HIGH_WATER)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let closing = state.closing;
        std::mem::swap(&mut entries, &mut state.entries);
        state.bytes = 0;
        state.writing = true;
        drop(state);
        // Room again for loggers waiting at the limit while this batch is formatted and written.
        shared.written.notify_all();
        for entry in entries.drain(..) {
            match entry {
                Entry::Line(line) => batch.extend_from_slice(&line),
                Entry::Access(record) => format_access(&mut batch, &record, format()),
            }
        }
        // A log that cannot be written has nowhere to report that: the lines are dropped, the server goes on.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        last_write = Some(std::time::Instant::now());
        batch.clear();
        if batch.capacity() > HIGH_WATER * 4 {
            batch = Vec::new();
        }
        if entries.capacity() > 64 * 1024 {
            entries = Vec::new();
        }
        let mut state = lock(&shared.state);
        state.writing = false;
        shared.written.notify_all();
        if closing && state.entries.is_empty() {
            return;
        }
    }
}

impl LogWriter {
    fn push(&self, entry: Entry, bytes: usize) {
        let mut state = lock(&self.shared.state);
        while state.bytes >= LIMIT && !state.closing {
            state = self.shared.written.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let was_empty = state.entries.is_empty();
        state.entries.push(entry);
        let crossed = state.bytes < HIGH_WATER && state.bytes + bytes >= HIGH_WATER;
        state.bytes += bytes;
        drop(state);
        if was_empty || crossed {
            self.shared.wake_writer.notify_one();
        }
    }
}

/// One access line, in `tracing_subscriber`'s shape for an `info!(target: "access", …, "request")` event with these
/// fields: text (`%` fields bare, strings quoted, the float as `{:?}`) or flattened JSON.
fn format_access(out: &mut Vec<u8>, r: &AccessRecord, format: Format) {
    use std::fmt::Write as _;
    let at = humantime::format_rfc3339_micros(r.at);
    let route = r.route.as_ref().map_or("-", Route::as_str);
    let duration_ms = r.duration.as_micros() as f64 / 1000.0;
    let source = r.source.map_or("-", Source::as_str);
    if format == Format::Text {
        // Straight into the batch: this runs once per request. A socket address and a source name have nothing
        // `Debug` would escape, so quoting them is what `{:?}` of their text gives.
        let peer = QuotedPeer(r.peer);
        STAMP.with_borrow_mut(|stamp| stamp.write(out, r.at));
        let _ = std::io::Write::write_fmt(
            out,
            format_args!(
                "  INFO access: request method={} route={route} uri={} peer={peer} status={} bytes={} complete={} \
                 duration_ms={} source=\"{source}\"\n",
                r.method,
                r.uri,
                r.status,
                r.bytes,
                r.complete,
                Millis(r.duration.as_micros())
            ),
        );
        return;
    }
    let mut line = String::with_capacity(ACCESS_BYTES);
    let peer = r.peer.map(|p| p.to_string()).unwrap_or_default();
    let _ = match format {
        Format::Text => unreachable!("written above"),
        Format::Json => {
            let s = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
            writeln!(
                line,
                "{{\"timestamp\":\"{at}\",\"level\":\"INFO\",\"message\":\"request\",\"method\":{},\"route\":{},\
                 \"uri\":{},\"peer\":{},\"status\":{},\"bytes\":{},\"complete\":{},\"duration_ms\":{},\"source\":{},\
                 \"target\":\"access\"}}",
                s(r.method.as_str()),
                s(route),
                s(r.uri.as_str()),
                s(&peer),
                r.status,
                r.bytes,
                r.complete,
                serde_json::to_string(&duration_ms).unwrap_or_else(|_| "0".into()),
                s(source),
            )
        }
    };
    out.extend_from_slice(line.as_bytes());
}

/// Whole microseconds as milliseconds, printed as `{:?}` prints the `f64` `micros / 1000.0` (the field's type
/// in a `tracing` event): the shortest decimal that reads back as that double, which for at most three decimals
/// is the exact quotient, with `.0` when it is whole.
struct Millis(u128);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (whole, mut frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 || whole >= 1_000_000_000_000 {
            // Past 13 integer digits `{:?}` may round or switch to an exponent: leave it to the float formatter.
            return if frac == 0 && whole < 1_000_000_000_000 {
                write!(f, "{whole}.0")
            } else {
                write!(f, "{:?}", self.0 as f64 / 1000.0)
            };
        }
        let mut digits = 3;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        write!(f, "{whole}.{frac:0digits$}")
    }
}

/// The RFC 3339 timestamp of a line (`tracing_subscriber`'s, microseconds, UTC), its date and time of day formatted
/// once per second.
#[derive(Default)]
struct Stamp {
    second: Option<u64>,
    prefix: Vec<u8>,
}

impl Stamp {
    fn write(&mut self, out: &mut Vec<u8>, at: SystemTime) {
        let Ok(since) = at.duration_since(SystemTime::UNIX_EPOCH) else {
            let _ = write!(out, "{}", humantime::format_rfc3339_micros(at));
            return;
        };
        if self.second != Some(since.as_secs()) {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            // "YYYY-MM-DDTHH:MM:SS.000000Z" without its fraction and zone.
            let text = humantime::format_rfc3339_micros(whole).to_string();
            self.prefix = text.as_bytes()[..text.len() - 7].to_vec();
            self.second = Some(since.as_secs());
        }
        out.extend_from_slice(&self.prefix);
        let _ = write!(out, "{:06}Z", since.subsec_micros());
    }
}

thread_local! {
    static STAMP: std::cell::RefCell<Stamp> = std::cell::RefCell::default();
}

/// A peer address as `{:?}` of its text prints it (`""` for none).
struct QuotedPeer(Option<SocketAddr>);

impl std::fmt::Display for QuotedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(peer) => write!(f, "\"{peer}\""),
            None => f.write_str("\"\""),
        }
    }
}

/// One event's bytes, appended to the shared buffer in one piece when the formatter is done with it.
pub struct Line {
    writer: LogWriter,
    bytes: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.bytes.is_empty() {
            let bytes = std::mem::take(&mut self.bytes);
            let len = bytes.len();
            self.writer.push(Entry::Line(bytes), len);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { writer: self.clone(), bytes: Vec::with_capacity(256) }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake_writer.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn uri_text_is_what_the_uri_displays_and_short_ones_are_inline() {
        let long = format!("/install/{}?q={}", "a".repeat(80), "b".repeat(40));
        for uri in ["/install/install.sh", "/install/install.sh?x=%22a%22&y=1", "*", long.as_str(), "http://h:1/p?q=1"]
        {
            let parsed: Uri = uri.parse().unwrap();
            let text = UriText::of(&parsed);
            assert_eq!(text.as_str(), parsed.to_string(), "{uri}");
            assert_eq!(text.to_string(), parsed.to_string());
            let inline = matches!(text, UriText::Inline { .. });
            assert_eq!(inline, uri.len() <= 94 && !uri.starts_with("http:"), "{uri}");
        }
    }

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(writer: &LogWriter, text: &str) {
        let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(writer);
        line.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_quiet_line_is_written_within_the_gather_time() {
        let sink = Sink::default();
        let (writer, _guard) = start(sink.clone()).unwrap();
        let started = Instant::now();
        log(&writer, "one\n");
        while sink.0.lock().unwrap().0.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(2), "a lone line was not written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.0.lock().unwrap().0, b"one\n");
    }

    #[test]
    fn many_lines_from_many_threads_arrive_whole_in_few_writes_and_the_guard_writes_the_rest() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        log(&writer, &format!("thread {t} line {i:05} {}\n", "x".repeat(40)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 40_000, "every line, none lost");
        for t in 0..4 {
            let mine: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(&format!("thread {t} "))).collect();
            assert_eq!(mine.len(), 10_000);
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "one thread's lines keep their order");
            assert!(mine.iter().all(|l| l.ends_with(&"x".repeat(40))), "no line is torn");
        }
        assert!(writes < 4_000, "{writes} writes for 40,000 lines: not batched");
    }

    /// Captures what a `tracing_subscriber` formatter writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Sink2;
        fn make_writer(&'a self) -> Sink2 {
            Sink2(self.0.clone())
        }
    }

    struct Sink2(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink2 {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The line `tracing_subscriber` writes for the access event the access log used to emit itself.
    fn tracing_line(r: &AccessRecord, format: Format) -> String {
        let capture = Capture::default();
        let builder = tracing_subscriber::fmt().with_writer(capture.clone()).with_ansi(false);
        let emit = || r.emit();
        match format {
            Format::Text => tracing::subscriber::with_default(builder.finish(), emit),
            Format::Json => tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), emit),
        }
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn durations_and_timestamps_print_as_the_float_and_humantime_print_them() {
        let mut micros: Vec<u128> = (0..20_000).collect();
        micros.extend([123_456, 1_500_000, 999_999_999, 86_400_000_000, u64::MAX as u128, 1_000_000_000_000_001]);
        for m in micros {
            assert_eq!(Millis(m).to_string(), format!("{:?}", m as f64 / 1000.0), "{m} µs");
        }
        let mut stamp = Stamp::default();
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_765_000_000);
        for step in 0..5_000u64 {
            let at = base + Duration::from_nanos(step * 987_654_321 % 7_000_000_000 + step * 1_000);
            let mut ours = Vec::new();
            stamp.write(&mut ours, at);
            assert_eq!(String::from_utf8(ours).unwrap(), humantime::format_rfc3339_micros(at).to_string());
        }
    }

    #[test]
    fn access_lines_have_the_shape_tracing_gives_every_other_line() {
        let records = [
            AccessRecord {
                at: SystemTime::now(),
                method: Method::GET,
                route: None,
                uri: UriText::of(&"/install/install.sh?x=%22a%22&y=1".parse().unwrap()),
                peer: Some("127.0.0.1:43700".parse().unwrap()),
                status: 304,
                bytes: 0,
                complete: true,
                duration: Duration::from_micros(10),
                source: Some(Source::Bundled),
            },
            AccessRecord {
                at: SystemTime::now(),
                method: Method::from_bytes(b"PROPFIND").unwrap(),
                route: None,
                uri: UriText::of(&"/nowhere".parse().unwrap()),
                peer: None,
                status: 404,
                bytes: 123,
                complete: false,
                duration: Duration::from_millis(1500),
                source: None,
            },
            AccessRecord {
                at: SystemTime::now(),
                method: Method::HEAD,
                route: Some(Route::Fixed("/install/{name}")),
                uri: UriText::of(&"/install/install.ps1".parse().unwrap()),
                peer: Some("[fe80::1%2]:443".parse().unwrap()),
                status: 200,
                bytes: 0,
                complete: true,
                duration: Duration::from_nanos(123_456),
                source: Some(Source::DataDir),
            },
        ];
        for r in &records {
            for format in [Format::Text, Format::Json] {
                let mut ours = Vec::new();
                format_access(&mut ours, r, format);
                let ours = String::from_utf8(ours).unwrap();
                let theirs = tracing_line(r, format);
                match format {
                    // Everything after the timestamp, byte for byte.
                    Format::Text => {
                        let tail = |l: &str| l.split_once(' ').unwrap().1.to_string();
                        assert_eq!(tail(&ours), tail(&theirs), "{ours}{theirs}");
                        assert!(humantime::parse_rfc3339(ours.split(' ').next().unwrap()).is_ok(), "{ours}");
                    }
                    Format::Json => {
                        let mut a: serde_json::Value = serde_json::from_str(&ours).unwrap();
                        let mut b: serde_json::Value = serde_json::from_str(&theirs).unwrap();
                        assert!(humantime::parse_rfc3339(a["timestamp"].as_str().unwrap()).is_ok(), "{ours}");
                        a.as_object_mut().unwrap().remove("timestamp");
                        b.as_object_mut().unwrap().remove("timestamp");
                        assert_eq!(a, b, "{ours}{theirs}");
                    }
                }
            }
        }
    }
}
