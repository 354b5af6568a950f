//! Where log lines go: a shared in-memory buffer that one thread (`rm-log`) writes to stderr in batches.
//!
//! A busy server logs one access line per request. Writing each line with its own `write(2)`, or handing each line
//! to a thread through a channel that wakes it, costs a system call or a wake-up per request, which is as much as
//! serving a small file. Here a line is appended to a buffer under a short lock; the first line into an empty buffer
//! wakes the writer thread, which waits [`GATHER`] for more, then writes everything it has in one call. A quiet
//! server's lines are therefore written within [`GATHER`]; a busy one's in one `write` per [`GATHER`] (or per
//! [`HIGH_WATER`] bytes, whichever comes first). Nothing is dropped: past [`LIMIT`] bytes a logging thread waits for
//! the writer instead (backpressure rather than loss). Dropping the [`LogGuard`] writes what is left.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long the writer gathers lines after the first one arrives in an empty buffer.
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
    buffer: Vec<u8>,
    closing: bool,
    /// The writer has taken a batch and is writing it.
    writing: bool,
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
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake_writer: Condvar::new(),
        written: Condvar::new(),
    });
    let writer_shared = shared.clone();
    let thread = std::thread::Builder::new().name("rm-log".into()).spawn(move || write_batches(&writer_shared, out))?;
    Ok((LogWriter { shared: shared.clone() }, LogGuard { shared, thread: Some(thread) }))
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = lock(&shared.state);
        while state.buffer.is_empty() && !state.closing {
            state = shared.wake_writer.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if !state.closing && state.buffer.len() < HIGH_WATER {
            // Gather: more lines arrive meanwhile and go out in the same write.
            state = shared
                .wake_writer
                .wait_timeout_while(state, GATHER, |s| !s.closing && s.buffer.len() < HIGH_WATER)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let closing = state.closing;
        std::mem::swap(&mut batch, &mut state.buffer);
        state.writing = true;
        drop(state);
        // A log that cannot be written has nowhere to report that: the lines are dropped, the server goes on.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > HIGH_WATER * 4 {
            batch = Vec::new();
        }
        let mut state = lock(&shared.state);
        state.writing = false;
        shared.written.notify_all();
        if closing && state.buffer.is_empty() {
            return;
        }
    }
}

impl LogWriter {
    fn append(&self, line: &[u8]) {
        let mut state = lock(&self.shared.state);
        while state.buffer.len() >= LIMIT && !state.closing {
            state = self.shared.written.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let was_empty = state.buffer.is_empty();
        state.buffer.extend_from_slice(line);
        let crossed = state.buffer.len() >= HIGH_WATER && state.buffer.len() - line.len() < HIGH_WATER;
        drop(state);
        if was_empty || crossed {
            self.shared.wake_writer.notify_one();
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
            self.writer.append(&self.bytes);
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
}
