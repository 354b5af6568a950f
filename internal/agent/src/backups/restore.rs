//! The server's restore and listing tasks on the agent, and the long-poll that brings them.
//!
//! A restore is accepted like a run-now request (open operation on disk, then its id in `run-now.json`, so a
//! repeated request runs at most once), then runs on its own thread: the target directory is checked at run time
//! (an existing directory with entries is refused unless the request says `overwrite`; the default target
//! `<state dir>/restores/<operation id>` is created 0700), and restic runs under this agent's lock on the repository
//! like a backup, but without the server's lease: `restic restore` takes a shared (non-exclusive) repository lock,
//! so it can run beside other hosts' backups, and the lease would stop their backups for as long as a restore takes.
//! Only an exclusive lock (prune) conflicts, and restic itself refuses that (the restore fails `locked`).
//!
//! A listing (`restic ls`, read-only, `--no-lock`) runs at once on its own thread without any lock and posts its
//! result back; it is never stored.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rm_protocol::backup::{AgentRepository, FailureReason, OperationKind, OperationStatus, Progress, Trigger};
use rm_protocol::restore::{
    LsResult, LsTask, MAX_TASKS_WAIT_SECS, RestoreResult, RestoreTask, check_path, is_snapshot_ref,
};

use super::runner::{self, Operation, PROGRESS_EVERY, Throttle};
use super::{ActiveGuard, Backups, Claimed, Inner, lock, valid_operation_id};
use crate::restic::restore::{RepoJob, RestoreCounts};
use crate::restic::{self, Cancel, Outcome};

/// A restore may run this long.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// A listing may run this long (the server stops waiting sooner).
const LS_TIMEOUT: Duration = Duration::from_secs(60);
/// How many listing ids are remembered.
const LS_SEEN_MAX: usize = 1000;

/// Listing ids already taken.
#[derive(Default)]
pub(crate) struct TaskState {
    ls_seen: std::sync::Mutex<VecDeque<String>>,
}

/// A restore task from a heartbeat or tasks answer: accepted once, then run on its own thread.
pub(crate) fn accept(inner: &Arc<Inner>, task: &RestoreTask) {
    if inner.stopping.load(Ordering::SeqCst) {
        return; // not accepted: the server repeats it to the next process
    }
    let id = &task.operation_id;
    if !valid_operation_id(id) {
        crate::log(format_args!("ignoring a restore request with an invalid operation id {}", crate::printable(id)));
        return;
    }
    let op = {
        let mut accepted = lock(&inner.accepted);
        if accepted.contains(id) {
            return;
        }
        let op = Operation::start_kind(inner, id.clone(), &task.plan, Trigger::RunNow, OperationKind::Restore);
        if let Err(e) = accepted.accept(&inner.paths, id) {
            drop(accepted);
            let message = format!("the agent cannot record restore requests on disk ({e}); not run");
            op.finish(inner, runner::outcome(OperationStatus::Failed, Some(FailureReason::Other), message));
            return;
        }
        op
    };
    if let Err(message) = check(task) {
        op.finish(inner, runner::outcome(OperationStatus::Failed, Some(FailureReason::Other), message));
        return;
    }
    *lock(&inner.active) += 1;
    let runner = inner.clone();
    let task = task.clone();
    let spawned = std::thread::Builder::new().name(format!("restore-{id}")).spawn(move || {
        let _active = ActiveGuard(&runner);
        run(&runner, &task, op);
    });
    if let Err(e) = spawned {
        *lock(&inner.active) -= 1;
        crate::log(format_args!("cannot start a restore thread: {e}"));
    }
}

/// What the agent checks of a task itself (the server checked it too).
fn check(task: &RestoreTask) -> Result<(), String> {
    if !is_snapshot_ref(&task.snapshot) {
        return Err("the restore names no valid snapshot id".into());
    }
    for path in &task.include {
        check_path("include", path)?;
    }
    if let Some(target) = &task.target {
        check_path("target", target)?;
    }
    Ok(())
}

/// Releases the restore's slot.
struct SlotGuard<'a> {
    inner: &'a Inner,
    slot: &'a str,
    id: &'a str,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.inner.release(self.slot, self.id);
    }
}

fn failed(message: String) -> Outcome {
    runner::outcome(OperationStatus::Failed, Some(FailureReason::Other), message)
}

fn run(inner: &Arc<Inner>, task: &RestoreTask, mut op: Operation) {
    let id = task.operation_id.as_str();
    // A slot of its own (plan names have no ':'), so shutdown cancels it like any run.
    let slot = format!("restore:{id}");
    let cancel = Cancel::default();
    match inner.claim(&slot, id, &cancel, false) {
        Claimed::Run => {}
        Claimed::Cancelled(why) | Claimed::Busy(why) => {
            return op.finish(inner, runner::outcome(OperationStatus::Cancelled, None, why));
        }
    }
    let _slot = SlotGuard { inner, slot: &slot, id };
    let target = match &task.target {
        Some(t) => PathBuf::from(t),
        None => inner.state_dir.join("restores").join(id),
    };
    op.report.restore = Some(RestoreResult {
        target: target.display().to_string(),
        snapshot: Some(task.snapshot.clone()),
        files: None,
        bytes: None,
    });
    let (mut outcome, counts) = execute(inner, &op, task, &target, &cancel);
    if outcome.status == OperationStatus::Cancelled {
        if let Some(why) = inner.cancel_reason(&slot, id) {
            outcome.message = Some(why);
        }
    }
    if let (Some(result), Some((files, bytes))) = (op.report.restore.as_mut(), counts) {
        result.files = Some(files);
        result.bytes = Some(bytes);
        if outcome.status == OperationStatus::Success {
            let said = outcome.message.take().map(|m| format!("\n{m}")).unwrap_or_default();
            outcome.message = Some(format!("restored {files} file(s), {bytes} bytes, into {}{said}", target.display()));
        }
    }
    op.finish(inner, outcome);
}

/// The repository named by the task, from the applied config (fetched again once if it is not there).
fn repository(inner: &Inner, name: &str) -> Option<AgentRepository> {
    let find = || lock(&inner.config).as_ref().and_then(|c| c.repositories.iter().find(|r| r.name == name).cloned());
    find().or_else(|| {
        inner.sync_config();
        find()
    })
}

/// Prepares the target and runs restic; the counts are restic's (≥ 0.16) or, for a target that was empty, counted.
fn execute(
    inner: &Arc<Inner>,
    op: &Operation,
    task: &RestoreTask,
    target: &Path,
    cancel: &Cancel,
) -> (Outcome, Option<(u64, u64)>) {
    let Some(repository) = repository(inner, &task.repository) else {
        let message = format!(
            "repository {} is not in this agent's backup config (no plan of this agent uses it)",
            task.repository
        );
        return (failed(message), None);
    };
    let restic = match inner.restic_for_run() {
        Ok(r) => r,
        Err(e) => return (runner::outcome(OperationStatus::Failed, Some(FailureReason::ResticUnavailable), e), None),
    };
    let fresh = match prepare_target(target, task.target.is_none(), task.overwrite) {
        Ok(fresh) => fresh,
        Err(message) => return (failed(message), None),
    };
    if !inner.lock_repository(&repository.name, cancel) {
        return (runner::outcome(OperationStatus::Cancelled, None, "cancelled".into()), None);
    }
    let _repository = RepoGuard { inner, repository: &repository.name };
    let job = RepoJob {
        repository: &repository,
        state_dir: &inner.state_dir,
        cancel: cancel.clone(),
        timeout: RESTORE_TIMEOUT,
    };
    let mut throttle = Throttle::new(PROGRESS_EVERY, op.started);
    let mut on_progress = |p: &Progress| {
        if throttle.ready(Instant::now()) {
            let mut r = op.report.clone();
            r.progress = Some(p.clone());
            inner.outbox.set_live(r);
        }
    };
    let restored = restic::restore::restore(&restic, &job, &task.snapshot, target, &task.include, &mut on_progress);
    let counts = match restored.counts {
        Some(RestoreCounts { files_restored: Some(f), bytes_restored: Some(b), .. }) => Some((f, b)),
        _ if fresh && restored.outcome.status == OperationStatus::Success => count_files(target),
        _ => None,
    };
    (restored.outcome, counts)
}

struct RepoGuard<'a> {
    inner: &'a Inner,
    repository: &'a str,
}

impl Drop for RepoGuard<'_> {
    fn drop(&mut self) {
        self.inner.unlock_repository(self.repository);
    }
}

/// Checks (and creates) the target directory; true when it is new or empty. An existing directory with entries is
/// refused unless `overwrite`, and is not touched.
fn prepare_target(target: &Path, default: bool, overwrite: bool) -> Result<bool, String> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            let mut entries =
                std::fs::read_dir(target).map_err(|e| format!("cannot read the target {}: {e}", target.display()))?;
            if entries.next().is_none() {
                return Ok(true);
            }
            if overwrite {
                return Ok(false);
            }
            Err(format!(
                "the target directory {} is not empty; not restoring into it (ask with overwrite to restore over \
                 what is there)",
                target.display()
            ))
        }
        Ok(_) => Err(format!("the target {} exists and is not a directory", target.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if default {
                // The default lives in the state directory: restored data is readable by the agent's user only.
                if let Some(parent) = target.parent() {
                    create_private_dir(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                }
                create_private_dir(target)
            } else {
                std::fs::create_dir_all(target)
            }
            .map_err(|e| format!("cannot create the target {}: {e}", target.display()))?;
            Ok(true)
        }
        Err(e) => Err(format!("cannot use the target {}: {e}", target.display())),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Regular files under `dir` and their bytes (symbolic links are not followed).
fn count_files(dir: &Path) -> Option<(u64, u64)> {
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()? {
            let entry = entry.ok()?;
            let meta = entry.path().symlink_metadata().ok()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    Some((files, bytes))
}

/// A listing task: run once, on its own thread, and its result posted back.
pub(crate) fn ls(inner: &Arc<Inner>, task: &LsTask) {
    {
        let mut seen = lock(&inner.tasks.ls_seen);
        if seen.contains(&task.request_id) {
            return;
        }
        seen.push_back(task.request_id.clone());
        while seen.len() > LS_SEEN_MAX {
            seen.pop_front();
        }
    }
    let valid_id = task.request_id.len() <= 64
        && task.request_id.starts_with("ls_")
        && task.request_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_id {
        crate::log(format_args!(
            "ignoring a listing request with an invalid id {}",
            crate::printable(&task.request_id)
        ));
        return;
    }
    let inner = inner.clone();
    let task = task.clone();
    let spawned = std::thread::Builder::new().name("ls".into()).spawn(move || {
        let result = list(&inner, &task);
        if let Err(e) = inner.server.post_ls_result(&task.request_id, &result) {
            crate::log(format_args!("cannot send the listing {}: {e}", task.request_id));
        }
    });
    if let Err(e) = spawned {
        crate::log(format_args!("cannot start a listing thread: {e}"));
    }
}

fn list(inner: &Inner, task: &LsTask) -> LsResult {
    let error = |message: String| LsResult { error: Some(message), ..Default::default() };
    if !is_snapshot_ref(&task.snapshot) {
        return error("the listing names no valid snapshot id".into());
    }
    if let Err(message) = check_path("path", &task.path) {
        return error(message);
    }
    let Some(repository) = repository(inner, &task.repository) else {
        return error(format!("repository {} is not in this agent's backup config", task.repository));
    };
    let restic = match inner.restic_for_run() {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let job = RepoJob {
        repository: &repository,
        state_dir: &inner.state_dir,
        cancel: Cancel::default(),
        timeout: LS_TIMEOUT,
    };
    restic::restore::ls(&restic, &job, &task.snapshot, &task.path)
}

/// Longest pause after the long-poll failed.
const POLL_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often a server without the long-poll (404) is asked again (it may have been upgraded).
const POLL_UNSUPPORTED_RETRY: Duration = Duration::from_secs(600);

/// The long-poll loop (its own thread while `run` runs): keeps one `GET /api/v1/agents/tasks` open and acts on
/// each answer as on a heartbeat answer's run-now and restore requests, plus listings.
pub(crate) fn poll(inner: &Arc<Inner>, heartbeat: Option<Arc<super::Stop>>) {
    let mut seen: Option<u64> = None;
    let mut backoff = Duration::from_secs(1);
    let mut said_unsupported = false;
    while !inner.stopping.load(Ordering::SeqCst) {
        let pause = match inner.server.tasks(seen, MAX_TASKS_WAIT_SECS) {
            Ok(Some(tasks)) => {
                backoff = Duration::from_secs(1);
                seen = Some(tasks.generation);
                match &heartbeat {
                    // Run-now and restore requests also ride the heartbeat answer, which brings the configuration
                    // revision and the served restic with them: a heartbeat now applies a new plan (and installs a
                    // restic it needs) before running the request, in the order an answer is handled.
                    Some(heartbeat) if !tasks.run_now.is_empty() || !tasks.restore.is_empty() => heartbeat.wake(),
                    Some(_) => {}
                    None => {
                        for request in &tasks.run_now {
                            Backups::run_now(inner, request);
                        }
                        for task in &tasks.restore {
                            accept(inner, task);
                        }
                    }
                }
                for task in &tasks.ls {
                    ls(inner, task);
                }
                continue;
            }
            Ok(None) => {
                if !said_unsupported {
                    crate::log(
                        "the server has no task long-poll (older server): run-now and restore requests arrive with heartbeats",
                    );
                    said_unsupported = true;
                }
                POLL_UNSUPPORTED_RETRY
            }
            Err(_) => {
                // The heartbeat loop says when the server is unreachable; here only wait and ask again.
                seen = None;
                let pause = backoff;
                backoff = (backoff * 2).min(POLL_BACKOFF_MAX);
                pause
            }
        };
        let until = Instant::now() + pause;
        while Instant::now() < until && !inner.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_with_entries_are_refused_unless_overwrite_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("state/restores/op_1");
        assert_eq!(prepare_target(&fresh, true, false), Ok(true));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        assert_eq!(prepare_target(&fresh, true, false), Ok(true), "empty: fine");
        std::fs::write(fresh.join("kept"), "x").unwrap();
        let e = prepare_target(&fresh, false, false).unwrap_err();
        assert!(e.contains("not empty") && e.contains("overwrite"), "{e}");
        assert_eq!(std::fs::read(fresh.join("kept")).unwrap(), b"x");
        assert_eq!(prepare_target(&fresh, false, true), Ok(false));
        let e = prepare_target(&fresh.join("kept"), false, true).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        let explicit = dir.path().join("a/b/c");
        assert_eq!(prepare_target(&explicit, false, false), Ok(true));
        assert!(explicit.is_dir());
        std::fs::create_dir_all(explicit.join("d")).unwrap();
        std::fs::write(explicit.join("d/f"), "12345").unwrap();
        std::fs::write(explicit.join("g"), "1").unwrap();
        assert_eq!(count_files(&explicit), Some((2, 6)));
    }

    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use rm_protocol::backup::{AgentConfigBody, LeaseRequest, ReportAck, ReportBatch, RunNow};
    use rm_protocol::restore::AgentTasks;

    use crate::AgentError;
    use crate::backups::tests::FakeServer;
    use crate::backups::{Server, Settings};
    use crate::client::Lease;

    /// The fake server plus the long-poll: `answer` is what every tasks call gets (`None`: 404, an older server).
    struct PollServer {
        fake: Arc<FakeServer>,
        answer: Option<AgentTasks>,
        calls: AtomicUsize,
        ls_posts: Mutex<Vec<(String, LsResult)>>,
    }

    impl Server for PollServer {
        fn agent_config(&self) -> Result<AgentConfigBody, AgentError> {
            self.fake.agent_config()
        }
        fn post_reports(&self, batch: &ReportBatch) -> Result<ReportAck, AgentError> {
            self.fake.post_reports(batch)
        }
        fn take_lease(&self, request: &LeaseRequest) -> Result<Lease, AgentError> {
            self.fake.take_lease(request)
        }
        fn release_lease(&self, repository: &str, id: &str) -> Result<(), AgentError> {
            self.fake.release_lease(repository, id)
        }
        fn tasks(&self, _seen: Option<u64>, _wait: u64) -> Result<Option<AgentTasks>, AgentError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) > 0 {
                // A held long-poll: the same answer again after a while.
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(self.answer.clone())
        }
        fn post_ls_result(&self, request_id: &str, result: &LsResult) -> Result<(), AgentError> {
            lock(&self.ls_posts).push((request_id.to_string(), result.clone()));
            Ok(())
        }
    }

    fn started(dir: &Path, answer: Option<AgentTasks>) -> (Backups, Arc<PollServer>) {
        let server = Arc::new(PollServer {
            fake: Arc::new(FakeServer::default()),
            answer,
            calls: AtomicUsize::new(0),
            ls_posts: Mutex::new(Vec::new()),
        });
        let settings = Settings {
            config_path: dir.join("agent.json"),
            agent_id: "agent-1".into(),
            hostname: "host".into(),
            restic: Some(dir.join("no-such-restic")),
            state_dir: None,
            managed_restic: None,
        };
        let backups = Backups::start(server.clone(), settings).unwrap();
        backups.start_task_poll(None);
        (backups, server)
    }

    #[test]
    fn an_older_server_without_the_long_poll_is_not_asked_in_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let (backups, server) = started(dir.path(), None);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(server.calls.load(Ordering::SeqCst), 1, "asked once, then left to heartbeats");
        backups.shutdown();
    }

    #[test]
    fn long_poll_tasks_run_once_however_often_they_are_repeated() {
        const RUN: &str = "op_0123456789abcdef0123456789abcdef";
        const RESTORE: &str = "op_fedcba9876543210fedcba9876543210";
        let dir = tempfile::tempdir().unwrap();
        let tasks = AgentTasks {
            generation: 7,
            run_now: vec![RunNow { operation_id: RUN.into(), plan: "ghost".into() }],
            restore: vec![RestoreTask {
                operation_id: RESTORE.into(),
                plan: "ghost".into(),
                repository: "nope".into(),
                snapshot: "90a410e6".into(),
                include: vec![],
                target: None,
                overwrite: false,
            }],
            ls: vec![LsTask {
                request_id: "ls_1".into(),
                repository: "nope".into(),
                snapshot: "90a410e6".into(),
                path: "/".into(),
            }],
        };
        let (backups, server) = started(dir.path(), Some(tasks));
        let finals = |id: &str| {
            server
                .fake
                .batches()
                .iter()
                .flat_map(|b| b.reports.clone())
                .filter(|r| r.id == id && r.status.is_final())
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while (finals(RUN) == 0 || finals(RESTORE) == 0 || lock(&server.ls_posts).is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(700)); // several more identical answers
        assert!(server.calls.load(Ordering::SeqCst) >= 5, "the long-poll kept asking");
        assert_eq!((finals(RUN), finals(RESTORE)), (1, 1), "each operation ran and was reported once");
        let stored = server.fake.stored();
        assert_eq!(stored.get(RESTORE), Some(&OperationStatus::Failed));
        let restore_report = server
            .fake
            .batches()
            .iter()
            .flat_map(|b| b.reports.clone())
            .find(|r| r.id == RESTORE && r.status.is_final())
            .unwrap();
        assert_eq!(restore_report.kind, OperationKind::Restore);
        assert!(restore_report.message.as_deref().unwrap().contains("repository nope"), "{restore_report:?}");
        let target = restore_report.restore.expect("the report names the target").target;
        assert!(target.ends_with(&format!("restores/{RESTORE}")), "{target}");
        let posts = lock(&server.ls_posts).clone();
        assert_eq!(posts.len(), 1, "the listing ran once: {posts:?}");
        assert!(posts[0].1.error.as_deref().unwrap().contains("nope"), "{posts:?}");
        backups.shutdown();
    }

    #[test]
    fn tasks_are_checked_by_the_agent_too() {
        let task = RestoreTask {
            operation_id: "op_1".into(),
            plan: "p".into(),
            repository: "r".into(),
            snapshot: "90a410e6".into(),
            include: vec![],
            target: None,
            overwrite: false,
        };
        assert!(check(&task).is_ok());
        assert!(check(&RestoreTask { snapshot: "latest".into(), ..task.clone() }).is_err());
        assert!(check(&RestoreTask { target: Some("../x".into()), ..task.clone() }).is_err());
        assert!(check(&RestoreTask { include: vec!["/a/../../etc".into()], ..task }).is_err());
    }
}
