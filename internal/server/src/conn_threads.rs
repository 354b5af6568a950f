//! Connection threads: every accepted connection is served, from its first byte to its close, on one of a few
//! threads that each run their own single-threaded tokio runtime (and so their own epoll and timers), as nginx's
//! worker processes do.
//!
//! On the shared work-stealing runtime only one worker polls the I/O driver; the others sleep on a condition
//! variable and are woken (a futex call and a context switch) each time the driver thread finds more ready sockets
//! than it runs itself. For small responses on a busy machine those wake-ups were the largest single cost left
//! (issue 18's profiles: `try_to_wake_up`, `finish_task_switch`). A thread that owns its sockets' readiness never
//! wakes another thread for a request. What crosses threads is one hand-off per *connection*: the accept loop
//! (on the main runtime, where the connection limit and eviction live) gives the socket to the thread serving the
//! fewest connections.
//!
//! Anything a handler spawns runs on the connection's thread, blocking work on that runtime's own blocking pool.
//! The server's background tasks (rollouts, notifications, maintenance) stay on the main runtime.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;

/// Where connections are served.
pub(crate) enum ConnThreads {
    /// On the runtime that accepts them (`--conn-threads 0`).
    Shared,
    /// On these threads.
    Own { threads: Vec<ConnThread>, stop: watch::Sender<bool>, joins: Vec<std::thread::JoinHandle<()>> },
}

pub(crate) struct ConnThread {
    handle: Handle,
    /// Connections this thread is serving now.
    load: Arc<AtomicUsize>,
}

/// Counts a connection against its thread until dropped (when the connection's task ends or is dropped).
pub(crate) struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many connection threads to start by default: one per CPU the process may run on.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl ConnThreads {
    /// Starts `count` threads (none for 0: connections stay on the calling runtime).
    pub(crate) fn start(count: usize) -> io::Result<ConnThreads> {
        if count == 0 {
            return Ok(ConnThreads::Shared);
        }
        let (stop, stopped) = watch::channel(false);
        let mut threads = Vec::with_capacity(count);
        let mut joins = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("rm-conn-{i}-blocking"))
                .build()?;
            threads.push(ConnThread { handle: runtime.handle().clone(), load: Arc::new(AtomicUsize::new(0)) });
            let mut stopped = stopped.clone();
            joins.push(std::thread::Builder::new().name(format!("rm-conn-{i}")).spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
                // What is still running here was given up by `serve` (its grace period is over): drop it.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })?);
        }
        Ok(ConnThreads::Own { threads, stop, joins })
    }

    /// How many threads serve connections (0: the shared runtime).
    pub(crate) fn count(&self) -> usize {
        match self {
            ConnThreads::Shared => 0,
            ConnThreads::Own { threads, .. } => threads.len(),
        }
    }

    /// Runs `serve(load)` on the thread with the fewest connections; `load` counts it there until dropped.
    /// The future is built here and first polled on that thread, so a socket it registers (`from_std`) belongs
    /// to that thread's reactor.
    pub(crate) fn spawn<Fut>(&self, serve: impl FnOnce(Option<Load>) -> Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        match self {
            ConnThreads::Shared => {
                tokio::spawn(serve(None));
            }
            ConnThreads::Own { threads, .. } => {
                let thread = threads.iter().min_by_key(|t| t.load.load(Ordering::Acquire)).expect("at least one");
                thread.load.fetch_add(1, Ordering::AcqRel);
                thread.handle.spawn(serve(Some(Load(thread.load.clone()))));
            }
        }
    }

    /// Stops the threads, dropping the connections still on them, and waits (at most a second) for them to end.
    pub(crate) async fn stop(self) {
        let ConnThreads::Own { stop, joins, .. } = self else { return };
        let _ = stop.send(true);
        let joined = tokio::task::spawn_blocking(move || joins.into_iter().for_each(|j| drop(j.join())));
        let _ = tokio::time::timeout(Duration::from_secs(1), joined).await;
    }

    /// Connections per thread now (tests).
    #[cfg(test)]
    pub(crate) fn loads(&self) -> Vec<usize> {
        match self {
            ConnThreads::Shared => Vec::new(),
            ConnThreads::Own { threads, .. } => threads.iter().map(|t| t.load.load(Ordering::Acquire)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_least_busy_thread_and_run_there() {
        let threads = ConnThreads::start(2).unwrap();
        assert_eq!(threads.count(), 2);
        let (release, released) = watch::channel(false);
        let (names_tx, mut names_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let (mut released, names_tx) = (released.clone(), names_tx.clone());
            threads.spawn(move |load| async move {
                let _load = load.expect("counted on its thread");
                let _ = names_tx.send(std::thread::current().name().unwrap_or("").to_string());
                let _ = released.wait_for(|r| *r).await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(names_rx.recv().await.unwrap());
        }
        names.sort();
        assert_eq!(names, ["rm-conn-0", "rm-conn-0", "rm-conn-1", "rm-conn-1"]);
        assert_eq!(threads.loads(), [2, 2]);
        release.send(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while threads.loads() != [0, 0] {
            assert!(std::time::Instant::now() < deadline, "loads {:?}", threads.loads());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        threads.stop().await;
    }

    #[tokio::test]
    async fn stopping_drops_what_still_runs_and_zero_threads_means_the_calling_runtime() {
        let threads = ConnThreads::start(1).unwrap();
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        threads.spawn(move |_| async move {
            let _dropped = dropped_tx;
            std::future::pending::<()>().await;
        });
        threads.stop().await;
        // The sender went away with the task: the receiver sees it closed rather than waiting forever.
        assert!(tokio::time::timeout(Duration::from_secs(5), dropped_rx).await.unwrap().is_err());

        let shared = ConnThreads::start(0).unwrap();
        assert_eq!(shared.count(), 0);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let here = std::thread::current().id();
        shared.spawn(move |load| async move {
            let _ = tx.send((load.is_none(), std::thread::current().id()));
        });
        assert_eq!(rx.await.unwrap(), (true, here));
        shared.stop().await;
    }
}
