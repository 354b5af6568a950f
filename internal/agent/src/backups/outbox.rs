//! Operation reports on their way to the server.
//!
//! Final reports are written to `outbox/` beside the config before anything else happens: one JSON file per
//! report, named `<20-digit sequence>-<operation id>.json` so the directory listing is the order they were made in,
//! written 0600 to a temporary file, synced and renamed (then the directory is synced). A sender thread posts them
//! oldest first in batches of at most [`BATCH_MAX`] and deletes the files only after the server's 200; while the
//! server is down it retries with backoff, and after a restart the files left are sent first. The server stores
//! reports by operation id, so a batch sent again after a lost answer changes nothing: a file is never given a new id.
//!
//! `running` reports (start and throttled progress) are not worth a disk write: they wait in memory, one per
//! operation (a newer one replaces it), and are dropped when the operation's final report is queued.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rm_protocol::backup::{OperationReport, ReportBatch};

use super::Server;
use crate::AgentError;

/// The most reports in one `POST /api/v1/agents/reports`.
pub const BATCH_MAX: usize = 500;

pub struct Outbox {
    dir: PathBuf,
    /// The next file's sequence number.
    next: Mutex<u64>,
    /// The latest `running` report of each operation not yet sent, with its generation.
    live: Mutex<BTreeMap<String, (u64, OperationReport)>>,
    generation: AtomicU64,
    /// Held while a batch is being sent (the sender thread and a flush never send the same files at once).
    sending: Mutex<()>,
    /// How many reports the next batch may hold: halved after the server refuses a batch (400, 409, 413, 422), so
    /// one bad report is isolated and set aside instead of blocking the queue.
    limit: AtomicUsize,
    /// Set on every new report and on stop; the sender waits on it.
    wake: Mutex<Wake>,
    cv: Condvar,
}

#[derive(Default)]
struct Wake {
    pending: bool,
    stopped: bool,
}

/// What one send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub reports: usize,
    /// Whether more reports are waiting.
    pub more: bool,
}

fn is_report_file(name: &str) -> bool {
    name.len() > 21 && name.as_bytes()[..20].iter().all(u8::is_ascii_digit) && name.ends_with(".json")
}

/// Syncs a directory, so a rename or a new file in it survives a crash (Unix; Windows has no directory handles).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

impl Outbox {
    /// Opens (creating, 0700) the outbox directory; temporary files a crash left behind are removed.
    pub fn open(dir: &Path) -> Result<Outbox, AgentError> {
        std::fs::create_dir_all(dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(AgentError::io(format!("restricting {}", dir.display())))?;
        }
        let mut last = 0;
        for name in Self::names(dir)? {
            if is_report_file(&name) {
                last = last.max(name[..20].parse::<u64>().unwrap_or(0));
            } else if name.starts_with(".agent-config-") {
                let _ = std::fs::remove_file(dir.join(&name));
            }
        }
        Ok(Outbox {
            dir: dir.to_path_buf(),
            next: Mutex::new(last + 1),
            live: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
            sending: Mutex::new(()),
            limit: AtomicUsize::new(BATCH_MAX),
            wake: Mutex::new(Wake::default()),
            cv: Condvar::new(),
        })
    }

    fn names(dir: &Path) -> Result<Vec<String>, AgentError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(AgentError::io(format!("reading {}", dir.display())))? {
            let entry = entry.map_err(AgentError::io(format!("reading {}", dir.display())))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The queued report files, oldest first.
    fn files(&self) -> Result<Vec<String>, AgentError> {
        Ok(Self::names(&self.dir)?.into_iter().filter(|n| is_report_file(n)).collect())
    }

    /// How many final reports wait on disk.
    pub fn len(&self) -> usize {
        self.files().map_or(0, |f| f.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many final reports wait in the outbox at `dir`, without opening it (for `status`).
    pub fn count(dir: &Path) -> usize {
        Self::names(dir).map_or(0, |n| n.iter().filter(|n| is_report_file(n)).count())
    }

    /// Queues a final report durably: when this returns `Ok` the report survives a crash. A report whose operation
    /// is already queued is not queued twice (the first final report of an operation is the one that counts).
    pub fn push(&self, report: &OperationReport) -> Result<(), AgentError> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let suffix = format!("-{}.json", report.id);
        if self.files()?.iter().any(|n| n.ends_with(&suffix)) {
            return Ok(());
        }
        let path = self.dir.join(format!("{:020}{suffix}", *next));
        let json = serde_json::to_vec(report).expect("a report serializes");
        crate::config::write_private(&path, &json)
            .map_err(|reason| AgentError::Config { path: path.clone(), reason })?;
        sync_dir(&self.dir);
        *next += 1;
        drop(next);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&report.id);
        self.notify();
        Ok(())
    }

    /// Sets the operation's pending `running` report (replacing one not yet sent).
    pub fn set_live(&self, report: OperationReport) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(report.id.clone(), (generation, report));
        self.notify();
    }

    /// The `running` reports waiting (tests and status).
    pub fn live_len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn notify(&self) {
        self.wake.lock().unwrap_or_else(|p| p.into_inner()).pending = true;
        self.cv.notify_all();
    }

    /// Makes the sender thread return.
    pub fn stop(&self) {
        self.wake.lock().unwrap_or_else(|p| p.into_inner()).stopped = true;
        self.cv.notify_all();
    }

    /// Waits until something is queued, `timeout` passes or the outbox is stopped; true when stopped.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.wake.lock().unwrap_or_else(|p| p.into_inner());
        let (mut guard, _) =
            self.cv.wait_timeout_while(guard, timeout, |w| !w.pending && !w.stopped).unwrap_or_else(|p| p.into_inner());
        guard.pending = false;
        guard.stopped
    }

    /// Sends one batch: queued files oldest first, then the pending `running` reports. Files are deleted and
    /// pending reports forgotten only after the server's 200.
    pub fn send_batch(&self, server: &dyn Server) -> Result<Sent, AgentError> {
        let _sending = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        let limit = self.limit.load(Ordering::SeqCst).clamp(1, BATCH_MAX);
        let names = self.files()?;
        let mut files = Vec::new();
        let mut reports = Vec::new();
        for name in names.iter().take(limit) {
            let path = self.dir.join(name);
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<OperationReport>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(report) => {
                    files.push(path);
                    reports.push(report);
                }
                Err(e) => {
                    // Written atomically, so this is damage from outside: keep it for the operator, out of the queue.
                    let aside = self.dir.join(format!("unreadable-{name}"));
                    crate::log(format_args!(
                        "outbox: {} is unreadable ({e}); moved to {}",
                        path.display(),
                        aside.display()
                    ));
                    let _ = std::fs::rename(&path, &aside);
                }
            }
        }
        let live: Vec<(String, u64)> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.iter()
                .take(limit - reports.len())
                .map(|(id, (g, r))| {
                    reports.push(r.clone());
                    (id.clone(), *g)
                })
                .collect()
        };
        if reports.is_empty() {
            return Ok(Sent { reports: 0, more: false });
        }
        let count = reports.len();
        match server.post_reports(&ReportBatch { reports }) {
            Ok(_) => {
                for path in &files {
                    if let Err(e) = std::fs::remove_file(path) {
                        crate::log(format_args!("outbox: cannot delete the sent {}: {e}", path.display()));
                    }
                }
                sync_dir(&self.dir);
                let mut pending = self.live.lock().unwrap_or_else(|p| p.into_inner());
                for (id, generation) in live {
                    if pending.get(&id).is_some_and(|(g, _)| *g == generation) {
                        pending.remove(&id);
                    }
                }
                let more = names.len() > files.len() || !pending.is_empty();
                self.limit.store(BATCH_MAX, Ordering::SeqCst);
                Ok(Sent { reports: count, more })
            }
            // 400/413/422: a report the server finds invalid or too large; 409: one it will never take from this
            // agent (an operation id another agent owns, e.g. after a re-enrolment that kept the state directory).
            Err(e @ AgentError::Server { status: 400 | 409 | 413 | 422, .. }) if count > 1 => {
                self.limit.store((count / 2).max(1), Ordering::SeqCst);
                Err(e)
            }
            Err(AgentError::Server { status: status @ (400 | 409 | 413 | 422), code, message }) => {
                // One report the server will never take: set it aside (kept on disk) rather than block the queue.
                if let Some(path) = files.first() {
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("report");
                    let aside = self.dir.join(format!("rejected-{name}"));
                    crate::log(format_args!(
                        "outbox: the server refuses {} ({status} {code}: {message}); moved to {}",
                        path.display(),
                        aside.display()
                    ));
                    let _ = std::fs::rename(path, &aside);
                } else if let Some((id, _)) = live.first() {
                    self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                }
                Ok(Sent { reports: 0, more: true })
            }
            Err(e) => Err(e),
        }
    }

    /// Sends until nothing is left or `deadline` passes; the error says how many final reports stay queued.
    pub fn flush(&self, server: &dyn Server, deadline: Instant) -> Result<(), AgentError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let error = match self.send_batch(server) {
                Ok(Sent { more: false, .. }) => return Ok(()),
                Ok(_) => continue,
                Err(e) => e,
            };
            if Instant::now() + backoff >= deadline {
                let queued = self.len();
                if queued == 0 {
                    return Ok(()); // only progress reports were left; not worth failing for
                }
                return Err(AgentError::Usage(format!(
                    "{queued} operation report(s) could not be delivered ({error}); they stay queued in {} and are \
                     sent by the next run",
                    self.dir.display()
                )));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// The sender thread: sends whenever something is queued, retries with backoff (1 s doubling to 60 s) while the
    /// server is unreachable, logs when delivery stops and resumes, and returns once [`Outbox::stop`] is called.
    pub fn run_sender(&self, server: &dyn Server) {
        let mut backoff = Duration::from_secs(1);
        let mut failing = false;
        loop {
            let wait = match self.send_batch(server) {
                Ok(Sent { more: true, .. }) => Duration::ZERO,
                Ok(Sent { .. }) => {
                    if failing {
                        crate::log("operation reports delivered again");
                        failing = false;
                    }
                    backoff = Duration::from_secs(1);
                    Duration::from_secs(60)
                }
                Err(e) => {
                    if !failing {
                        crate::log(format_args!(
                            "cannot deliver operation reports ({e}); retrying with backoff (final reports wait in {})",
                            self.dir.display()
                        ));
                        failing = true;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    wait
                }
            };
            if !wait.is_zero() && self.wait(wait) {
                return;
            }
            if self.wake.lock().unwrap_or_else(|p| p.into_inner()).stopped {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backups::tests::FakeServer;
    use rm_protocol::backup::{OperationKind, OperationStatus, Progress, Trigger};

    pub(crate) fn report(id: &str, status: OperationStatus) -> OperationReport {
        OperationReport {
            id: id.into(),
            plan: "p".into(),
            kind: OperationKind::Backup,
            trigger: Trigger::Schedule,
            status,
            started_at: 1,
            finished_at: None,
            duration_ms: None,
            summary: None,
            progress: None,
            message: None,
            reason: None,
            exit_code: None,
            snapshots: None,
            forget: None,
            restore: None,
            repository: None,
            maintenance: None,
        }
    }

    fn ids(batch: &ReportBatch) -> Vec<(String, OperationStatus)> {
        batch.reports.iter().map(|r| (r.id.clone(), r.status)).collect()
    }

    #[test]
    fn files_are_private_ordered_and_deleted_only_after_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox")).unwrap();
        for i in 0..12 {
            outbox.push(&report(&format!("op_{i:02}"), OperationStatus::Success)).unwrap();
        }
        assert_eq!(outbox.len(), 12);
        let names = outbox.files().unwrap();
        assert!(names[0].starts_with("00000000000000000001-op_00"), "{names:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for n in &names {
                let mode = std::fs::metadata(outbox.dir.join(n)).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{n}");
            }
        }
        assert_eq!(std::fs::read_dir(&outbox.dir).unwrap().count(), 12, "no temporary files");

        let server = FakeServer::default();
        server.down(true);
        assert!(outbox.send_batch(&server).is_err());
        assert_eq!(outbox.len(), 12, "nothing deleted without a 200");
        server.down(false);
        let sent = outbox.send_batch(&server).unwrap();
        assert_eq!(sent, Sent { reports: 12, more: false });
        assert!(outbox.is_empty());
        let batches = server.batches();
        let want: Vec<_> = (0..12).map(|i| (format!("op_{i:02}"), OperationStatus::Success)).collect();
        assert_eq!(ids(&batches[0]), want, "the refused attempt carried the same ids, in order");
        assert_eq!(ids(&batches[1]), want);
    }

    #[test]
    fn a_restart_resends_what_was_left_with_the_same_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        {
            let outbox = Outbox::open(&path).unwrap();
            outbox.push(&report("op_a", OperationStatus::Failed)).unwrap();
            outbox.push(&report("op_b", OperationStatus::Success)).unwrap();
            outbox.push(&report("op_a", OperationStatus::Cancelled)).unwrap();
            // A crash mid-write leaves at most a temporary file, which is never sent.
            std::fs::write(path.join(".agent-config-crash"), b"{\"half").unwrap();
        }
        let outbox = Outbox::open(&path).unwrap();
        assert_eq!(outbox.len(), 2, "one final report per operation");
        outbox.push(&report("op_c", OperationStatus::Warning)).unwrap();
        let server = FakeServer::default();
        outbox.flush(&server, Instant::now() + Duration::from_secs(5)).unwrap();
        let sent: Vec<_> = server.batches().iter().flat_map(ids).collect();
        assert_eq!(
            sent,
            [
                ("op_a".to_string(), OperationStatus::Failed),
                ("op_b".into(), OperationStatus::Success),
                ("op_c".into(), OperationStatus::Warning)
            ],
            "kept order across the restart, newer files after older ones"
        );
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
    }

    #[test]
    fn batches_are_bounded_and_a_refused_report_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox")).unwrap();
        for i in 0..(BATCH_MAX + 3) {
            outbox.push(&report(&format!("op_{i:04}"), OperationStatus::Success)).unwrap();
        }
        let server = FakeServer::default();
        assert_eq!(outbox.send_batch(&server).unwrap(), Sent { reports: BATCH_MAX, more: true });
        assert_eq!(outbox.send_batch(&server).unwrap(), Sent { reports: 3, more: false });

        outbox.push(&report("op_bad", OperationStatus::Success)).unwrap();
        outbox.push(&report("op_good", OperationStatus::Success)).unwrap();
        server.refuse("op_bad");
        outbox.flush(&server, Instant::now() + Duration::from_secs(10)).unwrap();
        assert!(server.stored().contains_key("op_good"));
        let left: Vec<_> = std::fs::read_dir(&outbox.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1);
        assert!(left[0].to_str().unwrap().starts_with("rejected-"), "{left:?}");
    }

    #[test]
    fn a_conflicting_report_is_set_aside_and_does_not_block_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox")).unwrap();
        outbox.push(&report("op_1", OperationStatus::Success)).unwrap();
        outbox.push(&report("op_theirs", OperationStatus::Success)).unwrap();
        outbox.push(&report("op_3", OperationStatus::Failed)).unwrap();
        let server = FakeServer::default();
        // The operation id belongs to another agent (409 `conflict`): never accepted from this one.
        server.refuse_with("op_theirs", 409);
        outbox.flush(&server, Instant::now() + Duration::from_secs(10)).unwrap();
        let stored = server.stored();
        assert_eq!(stored.keys().collect::<Vec<_>>(), ["op_1", "op_3"]);
        let left: Vec<_> = std::fs::read_dir(&outbox.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1);
        let name = left[0].to_str().unwrap();
        assert!(name.starts_with("rejected-") && name.ends_with("-op_theirs.json"), "{left:?}");
        assert!(server.batches().len() <= 6, "halved down to the one report, not retried forever");
    }

    #[test]
    fn progress_waits_in_memory_one_per_operation() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox")).unwrap();
        let server = FakeServer::default();
        server.down(true);
        for done in 0..10 {
            let mut r = report("op_x", OperationStatus::Running);
            r.progress = Some(Progress { files_done: done, ..Progress::default() });
            outbox.set_live(r);
        }
        assert!(outbox.send_batch(&server).is_err());
        assert_eq!(outbox.live_len(), 1, "only the latest progress waits");
        assert_eq!(server.batches()[0].reports[0].progress.as_ref().unwrap().files_done, 9);
        // The final report replaces it.
        outbox.push(&report("op_x", OperationStatus::Success)).unwrap();
        assert_eq!(outbox.live_len(), 0);
        server.down(false);
        outbox.flush(&server, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(ids(server.batches().last().unwrap()), [("op_x".to_string(), OperationStatus::Success)]);
    }

    #[test]
    fn the_sender_thread_delivers_after_the_server_returns_and_stops_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = std::sync::Arc::new(Outbox::open(&dir.path().join("outbox")).unwrap());
        let server = std::sync::Arc::new(FakeServer::default());
        server.down(true);
        outbox.push(&report("op_1", OperationStatus::Success)).unwrap();
        let thread = {
            let (outbox, server) = (outbox.clone(), server.clone());
            std::thread::spawn(move || outbox.run_sender(&*server))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(outbox.len(), 1);
        server.down(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !outbox.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(outbox.is_empty(), "delivered on the backoff retry");
        let started = Instant::now();
        outbox.stop();
        thread.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        let stored = server.stored();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored["op_1"], OperationStatus::Success);
    }
}
