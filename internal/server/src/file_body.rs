//! The body of a file response, read from the open handle with positional reads.
//!
//! Reads are done inline on the async worker when the data is already in the page cache (`preadv2` with
//! `RWF_NOWAIT`, which fails with `EAGAIN` instead of waiting for the disk), and on the blocking pool only when they
//! would block. Handing every chunk to the blocking pool and back made thread wake-ups the largest cost of serving a
//! cached agent binary (perf: ~47 % of server CPU in context switching); agents are small and hot, so most reads now
//! stay on the worker. A worker never waits on the disk.
//!
//! Reading from the cache can outrun the socket, so at most [`IN_FLIGHT`] chunks per download are alive at once,
//! however long the client takes: each chunk carries a guard that releases its slot when hyper drops it after
//! writing, and the body reads nothing more until then. A client that stops reading therefore pins at most two
//! chunks (hyper's buffer limit, set in `conn.rs`, makes it one in practice) until the send timeout closes its
//! connection. A consumer must drop the chunks it has written: one that keeps them (`collect()`) gets two and then
//! waits forever, so in-process tests use files of at most two chunks.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use futures_util::task::AtomicWaker;
use tokio::task::JoinHandle;

/// Read size: large enough to keep syscalls per GB low, small enough for 256 concurrent downloads to stay within a
/// few tens of MiB.
pub const CHUNK: usize = 64 * 1024;
/// Chunks of one download that may exist at once (read but not yet written to the socket).
pub const IN_FLIGHT: usize = 2;

/// Counts a download's live chunks and wakes the body when one is released.
#[derive(Default)]
struct Gate {
    live: AtomicUsize,
    waker: AtomicWaker,
}

/// Owns one chunk's bytes; dropping it (hyper has written it) frees a slot.
struct Tracked<T> {
    bytes: T,
    gate: Arc<Gate>,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Tracked<T> {
    fn as_ref(&self) -> &[u8] {
        self.bytes.as_ref()
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        self.gate.live.fetch_sub(1, Ordering::AcqRel);
        self.gate.waker.wake();
    }
}

pub struct FileBody {
    file: Arc<File>,
    pos: u64,
    end: u64,
    pending: Option<JoinHandle<io::Result<Vec<u8>>>>,
    gate: Arc<Gate>,
}

impl FileBody {
    /// `count` bytes from `start` of `file`.
    pub fn new(file: File, start: u64, count: u64) -> FileBody {
        FileBody { file: Arc::new(file), pos: start, end: start + count, pending: None, gate: Arc::default() }
    }

    /// Hands a chunk out, counting it as live until hyper drops it.
    fn emit<T: AsRef<[u8]> + Send + 'static>(&mut self, bytes: T) -> Bytes {
        let len = bytes.as_ref().len();
        self.pos += len as u64;
        self.gate.live.fetch_add(1, Ordering::AcqRel);
        Bytes::from_owner(Tracked { bytes, gate: self.gate.clone() })
    }

    /// Whether another chunk may be read now; registers for a wake-up when a chunk is released otherwise.
    fn has_room(&mut self, cx: &mut Context<'_>) -> bool {
        if self.gate.live.load(Ordering::Acquire) < IN_FLIGHT {
            return true;
        }
        self.gate.waker.register(cx.waker());
        // A chunk may have been released between the check and the registration.
        self.gate.live.load(Ordering::Acquire) < IN_FLIGHT
    }
}

impl Stream for FileBody {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pending) = this.pending.as_mut() {
                let joined = std::task::ready!(Pin::new(pending).poll(cx));
                this.pending = None;
                return Poll::Ready(Some(match joined {
                    Ok(Ok(chunk)) if chunk.is_empty() => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    Ok(Ok(chunk)) => Ok(this.emit(chunk)),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(io::Error::other(e)),
                }));
            }
            if this.pos >= this.end {
                return Poll::Ready(None);
            }
            if !this.has_room(cx) {
                return Poll::Pending;
            }
            let want = usize::try_from(this.end - this.pos).unwrap_or(usize::MAX).min(CHUNK);
            match read_cached(&this.file, want, this.pos) {
                Some(Ok(chunk)) if !chunk.is_empty() => return Poll::Ready(Some(Ok(this.emit(chunk)))),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                // Not cached (or nothing read): read on the blocking pool.
                _ => {
                    let (file, pos) = (this.file.clone(), this.pos);
                    this.pending = Some(tokio::task::spawn_blocking(move || read_at(&file, want, pos)));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        (left.div_ceil(CHUNK), Some(left.div_ceil(CHUNK)))
    }
}

fn read_at(file: &File, want: usize, pos: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; want];
    let n = file.read_at(&mut buf, pos)?;
    buf.truncate(n);
    Ok(buf)
}

/// A read that succeeds only from the page cache: `None` when it would block (or the kernel cannot tell), so the
/// caller reads on the blocking pool instead.
#[cfg(target_os = "linux")]
fn read_cached(file: &File, want: usize, pos: u64) -> Option<io::Result<BytesMut>> {
    use std::os::fd::AsRawFd;
    let mut buf = BytesMut::with_capacity(want);
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: want };
    let offset = libc::off_t::try_from(pos).ok()?;
    // SAFETY: the iovec points at `want` bytes of capacity owned by `buf`, which outlives the call; the kernel writes
    // at most `want` bytes there and returns how many.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => None,
            _ => Some(Err(e)),
        };
    }
    // SAFETY: the kernel initialised the first `n` (<= want) bytes.
    unsafe { buf.set_len(n as usize) };
    Some(Ok(buf))
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_: &File, _: usize, _: u64) -> Option<io::Result<BytesMut>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    async fn collect(file: File, start: u64, count: u64) -> io::Result<Vec<u8>> {
        let mut body = FileBody::new(file, start, count);
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn reads_exactly_the_requested_window() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&data).unwrap();
        for (start, count) in [(0, data.len()), (1, 70_000), (65_536, 65_536), (299_999, 1), (123, 0)] {
            let got = collect(tmp.reopen().unwrap(), start as u64, count as u64).await.unwrap();
            assert_eq!(got, data[start..start + count], "{start}+{count}");
        }
    }

    #[tokio::test]
    async fn a_consumer_that_keeps_chunks_gets_two_however_long_it_waits() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![1u8; CHUNK * 6]).unwrap();
        let mut body = FileBody::new(tmp.reopen().unwrap(), 0, (CHUNK * 6) as u64);
        let kept = [body.next().await.unwrap().unwrap(), body.next().await.unwrap().unwrap()];
        // Before: a timer let one more chunk through every 100 ms, so a stalled socket accumulated them.
        let third = tokio::time::timeout(std::time::Duration::from_millis(500), body.next()).await;
        assert!(third.is_err(), "a third chunk was read while two were alive");
        drop(kept);
        assert_eq!(body.next().await.unwrap().unwrap().len(), CHUNK);
    }

    #[tokio::test]
    async fn at_most_two_chunks_are_alive_until_the_consumer_drops_them() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![7u8; CHUNK * 5]).unwrap();
        let mut body = FileBody::new(tmp.reopen().unwrap(), 0, (CHUNK * 5) as u64);
        let first = body.next().await.unwrap().unwrap();
        let second = body.next().await.unwrap().unwrap();
        // A third read must wait for a slot.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut body).poll_next(&mut cx).is_pending());
        drop(first);
        let third = body.next().await.unwrap().unwrap();
        assert_eq!((second.len(), third.len()), (CHUNK, CHUNK));
    }

    #[tokio::test]
    async fn a_file_shorter_than_promised_is_an_error_not_a_short_body() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&[1u8; 1000]).unwrap();
        let err = collect(tmp.reopen().unwrap(), 0, 5000).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
