//! Change notification for the asset directories (inotify), so a remembered lookup can be trusted without a `stat`.
//!
//! One inotify instance watches every kind's subdir of both roots (content and name changes: create, delete,
//! rename, write, attribute change) and the roots themselves (a subdir created, removed or renamed). A thread
//! (`rm-asset-watch`) waits for events and drains them inside a *generation* window: it makes the generation odd,
//! reads every queued event (re-adding watches when subdirs came or went), then makes it even again.
//!
//! A remembered lookup records the generation it *started* under (only an even one). It may be used without a `stat`
//! when, in this order, the generation still equals it, the inotify queue is empty (`FIONREAD`), and the generation
//! still equals it. The kernel queues an event before the changing system call returns, so for a request that begins
//! after a change: either the event is still queued (the queue check fails), or the thread has read it, which it
//! does only while the generation is odd and after having moved it past every value recorded before the change.
//! Either way the request falls back to `stat` and the full lookup. A queue overflow is itself a queued event.
//! Where inotify is unavailable (or a watch cannot be added) the store uses `stat` for every request, as before.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tracing::{debug, warn};

/// Events on files inside a watched subdir.
const SUBDIR_EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW);
/// Events on a root: only names coming and going (the database beside the subdirs is written all the time).
const ROOT_EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

pub(crate) struct Watch {
    /// A duplicate of the inotify descriptor, for asking how many bytes of events are queued; the draining thread
    /// owns the instance itself.
    queue: OwnedFd,
    generation: AtomicU64,
}

impl Watch {
    /// Watches `subdirs` of each root and starts the draining thread; `None` (logged) where inotify is unavailable.
    pub(crate) fn start(roots: &[PathBuf], subdirs: &[&'static str]) -> Option<Arc<Watch>> {
        let inotify = match Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "no file-change notification (inotify); every asset request re-checks its file with stat");
                return None;
            }
        };
        let mut watched = Watched { roots: roots.to_vec(), subdirs: subdirs.to_vec(), descriptors: HashMap::new() };
        let queue = watched.refresh(&inotify).and_then(|()| inotify.as_fd().try_clone_to_owned());
        let queue = match queue {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot watch the asset dirs (inotify); every asset request re-checks its file with stat");
                return None;
            }
        };
        let watch = Arc::new(Watch { queue, generation: AtomicU64::new(0) });
        let weak = Arc::downgrade(&watch);
        let spawned =
            std::thread::Builder::new().name("rm-asset-watch".into()).spawn(move || drain(inotify, weak, watched));
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the asset watch thread; every asset request re-checks its file with stat");
            return None;
        }
        Some(watch)
    }

    /// The generation a lookup starting now records: `None` while events are being drained.
    pub(crate) fn current(&self) -> Option<u64> {
        let g = self.generation.load(Ordering::SeqCst);
        (g % 2 == 0).then_some(g)
    }

    /// Whether nothing in the watched dirs has changed since a lookup started under generation `g`.
    pub(crate) fn unchanged_since(&self, g: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == g && queued_bytes(self.queue.as_fd()) == Some(0) && {
            std::sync::atomic::fence(Ordering::SeqCst);
            self.generation.load(Ordering::SeqCst) == g
        }
    }
}

/// Whether every root is on a local file system. inotify reports only changes made through this kernel: a data dir on
/// NFS, SMB or a FUSE mount can change under it unseen, so such roots are re-checked with `stat` on every request.
pub(crate) fn local(roots: &[PathBuf]) -> bool {
    // f_type values from linux/magic.h (and FUSE's, 9p's, ceph's).
    const REMOTE: [i64; 8] =
        [0x6969, 0xFF53_4D42, 0xFE53_4D42, 0x517B, 0x6573_5546, 0x0102_1997, 0x00C3_6400, 0x0BD0_0BD0];
    roots.iter().all(|root| {
        let Ok(path) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) else { return false };
        // SAFETY: statfs fills the zeroed struct; the path is a valid NUL-terminated string.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
            return false;
        }
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        let kind = fs.f_type as i64;
        let remote = REMOTE.contains(&kind);
        if remote {
            tracing::info!(root = %root.display(), fs_type = format!("{kind:#x}"),
                "asset root is on a network or FUSE file system: every asset request re-checks its file with stat");
        }
        !remote
    })
}

/// Bytes of events waiting in the queue; `None` if the kernel will not say (then nothing is trusted).
fn queued_bytes(fd: BorrowedFd<'_>) -> Option<libc::c_int> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n)
}

/// Which directories are watched, and by which descriptor.
struct Watched {
    roots: Vec<PathBuf>,
    subdirs: Vec<&'static str>,
    descriptors: HashMap<WatchDescriptor, PathBuf>,
}

impl Watched {
    /// (Re-)adds a watch for every root and every existing subdir. Adding a watch for a path already watched through
    /// the same inode returns the same descriptor, so this is idempotent; descriptors of directories that went away
    /// are dropped by the kernel (an `IGNORED` event), and here when that event is read.
    fn refresh(&mut self, inotify: &Inotify) -> io::Result<()> {
        for root in &self.roots {
            let wd = inotify.watches().add(root, ROOT_EVENTS)?;
            self.descriptors.insert(wd, root.clone());
            for subdir in &self.subdirs {
                let dir = root.join(subdir);
                match inotify.watches().add(&dir, SUBDIR_EVENTS) {
                    Ok(wd) => {
                        self.descriptors.insert(wd, dir);
                    }
                    // Absent, or not a real directory (a symlinked subdir is never served): the root's watch sees it
                    // appear.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => {}
                    Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
                }
            }
        }
        Ok(())
    }
}

fn drain(mut inotify: Inotify, watch: Weak<Watch>, mut watched: Watched) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let Some(w) = watch.upgrade() else { return };
        // Wake at least once a second to notice that the store is gone.
        let mut pollfd = libc::pollfd { fd: inotify.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, valid for the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 1000) };
        if ready <= 0 {
            if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                warn!(error = %io::Error::last_os_error(), "asset watch: poll failed");
                std::thread::sleep(Duration::from_secs(1));
            }
            continue;
        }
        w.generation.fetch_add(1, Ordering::SeqCst); // odd: draining
        let mut refresh = false;
        loop {
            match inotify.read_events(&mut buffer) {
                Ok(events) => {
                    let mut any = false;
                    for event in events {
                        any = true;
                        if event.mask.intersects(EventMask::ISDIR | EventMask::IGNORED | EventMask::Q_OVERFLOW)
                            || event.mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                        {
                            refresh = true;
                        }
                        if event.mask.contains(EventMask::IGNORED) {
                            watched.descriptors.remove(&event.wd);
                        }
                        debug!(dir = ?watched.descriptors.get(&event.wd), name = ?event.name.map(OsStr::to_owned),
                            mask = ?event.mask, "asset dir changed");
                    }
                    if !any {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!(error = %e, "asset watch: reading events failed");
                    break;
                }
            }
        }
        if refresh && let Err(e) = watched.refresh(&inotify) {
            // Without the watch the generation must never be trusted again: leave it odd for good.
            warn!(error = %e, "asset watch: cannot re-add a watch; every asset request re-checks its file with stat");
            return;
        }
        w.generation.fetch_add(1, Ordering::SeqCst); // even: settled
    }
}
