//! The server's restore and listing tasks on the agent, and the long-poll that brings them.
//!
//! A restore is accepted like a run-now request (open operation on disk, naming its target, then its id in
//! `run-now.json`, so a repeated request runs at most once), then runs on its own thread. It first takes this
//! agent's lock on the repository (which may wait for a backup), then the target: no other running restore of this
//! agent may use the same or a nested target, a symbolic link is refused, an existing target must be a directory
//! owned by the agent's user and not writable by group or others, and one with entries is refused unless the
//! request says `overwrite` (the default target `<state dir>/restores/<operation id>` is created 0700). The target is
//! checked again (same directory, still empty unless `overwrite`) right before each restic start.
//!
//! restic runs without the server's lease: `restic restore` takes a shared (non-exclusive) repository lock, so it
//! can run beside other hosts' backups, and the lease would stop their backups for as long as a restore takes.
//! restic 0.14's `forget`, `prune` and `check` take an exclusive lock: while one holds it, restic refuses the
//! restore (`locked`), so a restore that gets `locked` tries again with backoff for up to [`LOCKED_RETRY_FOR`]
//! (cancellable, logged); and a restore that runs makes another host's forget or prune fail `locked` meanwhile.
//!
//! A listing (`restic ls`, read-only, `--no-lock`) runs at once on its own thread without any lock and posts its
//! result back; it is never stored.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// How long a restore that restic refuses as `locked` (another host's forget, prune or check holds an exclusive
/// lock) is tried again before it fails.
pub(crate) const LOCKED_RETRY_FOR: Duration = Duration::from_secs(5 * 60);
/// The first pause after `locked`; doubled each time up to [`LOCKED_PAUSE_MAX`].
const LOCKED_PAUSE_FIRST: Duration = Duration::from_secs(5);
const LOCKED_PAUSE_MAX: Duration = Duration::from_secs(60);
/// Most `restic ls` run at once (more listings wait their turn).
const LS_CONCURRENT: usize = 2;

/// Listing ids already taken, the targets of running restores, and the running listings.
#[derive(Default)]
pub(crate) struct TaskState {
    ls_seen: std::sync::Mutex<VecDeque<String>>,
    /// Targets in use by running restores, with their operation ids.
    targets: std::sync::Mutex<Vec<(PathBuf, String)>>,
    /// Restores accepted and not finished (a self-update waits for them).
    restores: AtomicUsize,
    /// `restic ls` running now, and the condition a waiting listing waits on.
    ls_running: std::sync::Mutex<usize>,
    ls_cv: std::sync::Condvar,
}

impl Backups {
    /// Whether a restore is running (or accepted and waiting for its repository): a self-update waits meanwhile.
    pub fn restoring(&self) -> bool {
        self.inner.tasks.restores.load(Ordering::SeqCst) > 0
    }
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
        let op = start(inner, task);
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
    inner.tasks.restores.fetch_add(1, Ordering::SeqCst);
    let runner = inner.clone();
    let task = task.clone();
    let spawned = std::thread::Builder::new().name(format!("restore-{id}")).spawn(move || {
        let _active = ActiveGuard(&runner);
        run(&runner, &task, op);
        runner.tasks.restores.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        *lock(&inner.active) -= 1;
        inner.tasks.restores.fetch_sub(1, Ordering::SeqCst);
        crate::log(format_args!("cannot start a restore thread: {e}"));
    }
}

/// Where a restore goes: the task's target, else `<state dir>/restores/<operation id>`.
fn target_of(inner: &Inner, task: &RestoreTask) -> PathBuf {
    match &task.target {
        Some(t) => PathBuf::from(t),
        None => inner.state_dir.join("restores").join(&task.operation_id),
    }
}

/// [`Operation::start_kind`] for a restore, its target named in the open operation saved on disk (so the report
/// after a crash names it).
fn start(inner: &Inner, task: &RestoreTask) -> Operation {
    let mut report = runner::report(&task.operation_id, &task.plan, Trigger::RunNow, runner::now_secs());
    report.kind = OperationKind::Restore;
    report.restore = Some(RestoreResult {
        target: target_of(inner, task).display().to_string(),
        snapshot: Some(task.snapshot.clone()),
        files: None,
        bytes: None,
    });
    inner.open_operation(&report);
    inner.outbox.set_live(report.clone());
    crate::log(format_args!(
        "restore start: plan={} trigger=run_now operation={} target={}",
        crate::printable(&task.plan),
        task.operation_id,
        crate::printable(&target_of(inner, task).display().to_string())
    ));
    Operation { report, started: Instant::now() }
}

/// What the agent checks of a task itself (the server checked it too): also that target and includes are absolute
/// on this agent's platform (`C:/x` is not, on Linux).
fn check(task: &RestoreTask) -> Result<(), String> {
    if !is_snapshot_ref(&task.snapshot) {
        return Err("the restore names no valid snapshot id".into());
    }
    let native = |field: &str, path: &str| {
        check_path(field, path)?;
        if Path::new(path).is_absolute() {
            Ok(())
        } else {
            Err(format!("{field}: {path:?} is not an absolute path on this agent ({})", std::env::consts::OS))
        }
    };
    for path in &task.include {
        native("include", path)?;
    }
    if let Some(target) = &task.target {
        native("target", target)?;
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
        // A restore's slot is its own: removed once done (nobody waits on it), so the map does not grow.
        let mut slots = lock(&self.inner.slots);
        if slots.get(self.slot).is_some_and(|s| s.running.is_none() && s.waiting.is_none()) {
            slots.remove(self.slot);
        }
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
    let target = target_of(inner, task);
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

/// Takes the repository, then the target, and runs restic (again with backoff while the repository is `locked`);
/// the counts are restic's (≥ 0.16) or, for a target that was empty, counted.
fn execute(
    inner: &Arc<Inner>,
    op: &Operation,
    task: &RestoreTask,
    target: &Path,
    cancel: &Cancel,
) -> (Outcome, Option<(u64, u64)>) {
    let cancelled = || (runner::outcome(OperationStatus::Cancelled, None, "cancelled".into()), None);
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
    // The repository first (this may wait for a backup of this agent for hours), then the target: checked and
    // created only once nothing stands between the check and restic but the re-check below.
    if !inner.lock_repository(&repository.name, cancel) {
        return cancelled();
    }
    let _repository = RepoGuard { inner, repository: &repository.name };
    let _target = match claim_target(&inner.tasks, target, &task.operation_id) {
        Ok(guard) => guard,
        Err(message) => return (failed(message), None),
    };
    let prepared = match prepare_target(target, task.target.is_none(), task.overwrite) {
        Ok(prepared) => prepared,
        Err(message) => return (failed(message), None),
    };
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
    let includes: Vec<String> = task.include.iter().map(|p| glob_escape(p)).collect();
    let started = Instant::now();
    let mut pause = LOCKED_PAUSE_FIRST;
    let mut restored = loop {
        if let Err(message) = verify_target(target, &prepared, task.overwrite) {
            return (failed(message), None);
        }
        let restored = restic::restore::restore(&restic, &job, &task.snapshot, target, &includes, &mut on_progress);
        if restored.outcome.reason != Some(FailureReason::Locked) || cancel.is_cancelled() {
            break restored;
        }
        if started.elapsed() + pause > LOCKED_RETRY_FOR {
            let mut restored = restored;
            let said = restored.outcome.message.take().unwrap_or_default();
            restored.outcome.message = Some(format!(
                "the repository stayed locked by an exclusive operation (forget, prune or check of another host) \
                 for {} s of retrying: {said}",
                started.elapsed().as_secs()
            ));
            break restored;
        }
        crate::log(format_args!(
            "restore {}: repository {} is locked by an exclusive operation (another host's forget, prune or \
             check); trying again in {} s",
            task.operation_id,
            crate::printable(&repository.name),
            pause.as_secs()
        ));
        if !pause_unless_cancelled(cancel, pause) {
            return cancelled();
        }
        pause = (pause * 2).min(LOCKED_PAUSE_MAX);
    };
    if restored.outcome.status == OperationStatus::Success {
        let missing = unmatched_includes(target, &task.include);
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|p| crate::printable(p).to_string()).collect();
            restored.outcome = failed(format!(
                "nothing in snapshot {} matched the include path(s) {}: nothing was restored for them",
                task.snapshot,
                list.join(", ")
            ));
        }
    }
    let counts = match restored.counts {
        Some(RestoreCounts { files_restored: Some(f), bytes_restored: Some(b), .. }) => Some((f, b)),
        _ if prepared.fresh && restored.outcome.status == OperationStatus::Success => count_files(target),
        _ => None,
    };
    (restored.outcome, counts)
}

/// Sleeps `pause` in short steps; false when cancelled meanwhile.
fn pause_unless_cancelled(cancel: &Cancel, pause: Duration) -> bool {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        if cancel.is_cancelled() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
    !cancel.is_cancelled()
}

/// An include path as a restic pattern matching exactly that path: restic's `--include` takes glob patterns, so
/// `*`, `?`, `[`, `]` and `\` are escaped (a name like `we[ir]d` that a listing shows must restore itself).
fn glob_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if cfg!(windows) {
            // `\` separates there and escapes nothing: a class of one character instead.
            match c {
                '*' | '?' | '[' => {
                    out.push('[');
                    out.push(c);
                    out.push(']');
                }
                _ => out.push(c),
            }
        } else {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// The include paths that have nothing under the target after a restore (restic recreates each restored path below
/// the target; a POSIX path is checked, others are not).
fn unmatched_includes<'a>(target: &Path, include: &'a [String]) -> Vec<&'a str> {
    include
        .iter()
        .filter(|p| p.starts_with('/'))
        .filter(|p| {
            let rel = p.trim_start_matches('/');
            !rel.is_empty() && std::fs::symlink_metadata(target.join(rel)).is_err()
        })
        .map(String::as_str)
        .collect()
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

/// A target held by a running restore (released on drop).
struct TargetGuard<'a> {
    tasks: &'a TaskState,
    target: PathBuf,
}

impl Drop for TargetGuard<'_> {
    fn drop(&mut self) {
        lock(&self.tasks.targets).retain(|(t, _)| *t != self.target);
    }
}

/// Holds `target` for restore `id`; refused while a running restore uses the same, an enclosing or a nested target.
fn claim_target<'a>(tasks: &'a TaskState, target: &Path, id: &str) -> Result<TargetGuard<'a>, String> {
    let mut targets = lock(&tasks.targets);
    if let Some((other, by)) = targets.iter().find(|(t, _)| t.starts_with(target) || target.starts_with(t)) {
        return Err(format!(
            "the target {} overlaps the target {} of restore {by}, which is running; not restoring into it",
            target.display(),
            other.display()
        ));
    }
    targets.push((target.to_path_buf(), id.to_string()));
    Ok(TargetGuard { tasks, target: target.to_path_buf() })
}

/// The target directory as checked: whether it was new or empty, and which directory it is (device, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prepared {
    fresh: bool,
    identity: (u64, u64),
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn identity(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// An existing target must be owned by the agent's user and not writable by group or others (else someone else
/// could swap what is in it, or it, while restic writes).
#[cfg(unix)]
fn check_owner(target: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "the target {} is owned by another user (uid {}, the agent runs as uid {me}); not restoring into it",
            target.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the target {} is writable by group or others (mode {:o}); not restoring into it",
            target.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner(_: &Path, _: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
}

/// A symbolic link among the target's existing ancestors must belong to root or the agent's user (`/var/run` →
/// `/run` is fine; a link another user put in `/tmp` is not).
#[cfg(unix)]
fn check_ancestors(target: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut ancestors: Vec<&Path> = target.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.file_type().is_symlink() && meta.uid() != 0 && meta.uid() != me => {
                return Err(format!(
                    "the target {} goes through the symbolic link {} of another user (uid {}); not restoring \
                     through it",
                    target.display(),
                    dir.display(),
                    meta.uid()
                ));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_ancestors(_: &Path) -> Result<(), String> {
    Ok(())
}

fn is_empty(target: &Path) -> Result<bool, String> {
    let mut entries =
        std::fs::read_dir(target).map_err(|e| format!("cannot read the target {}: {e}", target.display()))?;
    Ok(entries.next().is_none())
}

fn not_empty(target: &Path) -> String {
    format!(
        "the target directory {} is not empty; not restoring into it (ask with overwrite to restore over what is \
         there)",
        target.display()
    )
}

/// Checks (and creates) the target directory. A symbolic link is refused (and one of another user among its
/// ancestors, [`check_ancestors`]), an existing directory must pass [`check_owner`], and one with entries is refused
/// unless `overwrite` (and is not touched).
fn prepare_target(target: &Path, default: bool, overwrite: bool) -> Result<Prepared, String> {
    check_ancestors(target)?;
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(format!("the target {} is a symbolic link; not restoring through it", target.display()))
        }
        Ok(meta) if meta.is_dir() => {
            check_owner(target, &meta)?;
            let fresh = is_empty(target)?;
            if !fresh && !overwrite {
                return Err(not_empty(target));
            }
            Ok(Prepared { fresh, identity: identity(&meta) })
        }
        Ok(_) => Err(format!("the target {} exists and is not a directory", target.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = target.parent() {
                if default {
                    // The default lives in the state directory: restored data is readable by the agent's user only.
                    create_private_dir(parent)
                } else {
                    std::fs::create_dir_all(parent)
                }
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            // The last component alone: mkdir never follows a symbolic link put there meanwhile (it fails).
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, if default { 0o700 } else { 0o777 });
            check_ancestors(target)?;
            builder.create(target).map_err(|e| format!("cannot create the target {}: {e}", target.display()))?;
            let meta = std::fs::symlink_metadata(target)
                .map_err(|e| format!("cannot use the target {}: {e}", target.display()))?;
            if !meta.is_dir() {
                return Err(format!("the target {} changed while it was created", target.display()));
            }
            Ok(Prepared { fresh: true, identity: identity(&meta) })
        }
        Err(e) => Err(format!("cannot use the target {}: {e}", target.display())),
    }
}

/// Checks, right before restic starts, that the target is still the directory [`prepare_target`] checked (not
/// replaced, not a symbolic link) and still empty unless `overwrite`.
fn verify_target(target: &Path, prepared: &Prepared, overwrite: bool) -> Result<(), String> {
    check_ancestors(target)?;
    let meta = std::fs::symlink_metadata(target)
        .map_err(|e| format!("the target {} is gone before restic started: {e}", target.display()))?;
    if meta.file_type().is_symlink() || !meta.is_dir() || identity(&meta) != prepared.identity {
        return Err(format!(
            "the target {} was replaced before restic started; not restoring into it",
            target.display()
        ));
    }
    if !overwrite && !is_empty(target)? {
        return Err(not_empty(target));
    }
    Ok(())
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
        let result = {
            let _turn = LsTurn::take(&inner.tasks);
            list(&inner, &task)
        };
        if let Err(e) = inner.server.post_ls_result(&task.request_id, &result) {
            crate::log(format_args!("cannot send the listing {}: {e}", task.request_id));
        }
    });
    if let Err(e) = spawned {
        crate::log(format_args!("cannot start a listing thread: {e}"));
    }
}

/// One of the [`LS_CONCURRENT`] turns to run `restic ls` (waited for; given back on drop).
struct LsTurn<'a>(&'a TaskState);

impl<'a> LsTurn<'a> {
    fn take(tasks: &'a TaskState) -> LsTurn<'a> {
        let running = lock(&tasks.ls_running);
        let mut running = tasks.ls_cv.wait_while(running, |n| *n >= LS_CONCURRENT).unwrap_or_else(|p| p.into_inner());
        *running += 1;
        LsTurn(tasks)
    }
}

impl Drop for LsTurn<'_> {
    fn drop(&mut self) {
        *lock(&self.0.ls_running) -= 1;
        self.0.ls_cv.notify_one();
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
/// Longest pause a busy server may ask for before the next long-poll.
const POLL_BUSY_MAX: Duration = Duration::from_secs(600);
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
                match tasks.retry_after_secs {
                    // The server holds as many long-polls as it allows: ask again later (heartbeats bring requests
                    // meanwhile).
                    Some(secs) => Duration::from_secs(secs.clamp(1, POLL_BUSY_MAX.as_secs())),
                    None => continue,
                }
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

    fn fresh(p: Result<Prepared, String>) -> Result<bool, String> {
        p.map(|p| p.fresh)
    }

    #[test]
    fn targets_with_entries_are_refused_unless_overwrite_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("state/restores/op_1");
        assert_eq!(fresh(prepare_target(&new, true, false)), Ok(true));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&new).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        assert_eq!(fresh(prepare_target(&new, true, false)), Ok(true), "empty: fine");
        std::fs::write(new.join("kept"), "x").unwrap();
        let e = prepare_target(&new, false, false).unwrap_err();
        assert!(e.contains("not empty") && e.contains("overwrite"), "{e}");
        assert_eq!(std::fs::read(new.join("kept")).unwrap(), b"x");
        assert_eq!(fresh(prepare_target(&new, false, true)), Ok(false));
        let e = prepare_target(&new.join("kept"), false, true).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        let explicit = dir.path().join("a/b/c");
        assert_eq!(fresh(prepare_target(&explicit, false, false)), Ok(true));
        assert!(explicit.is_dir());
        std::fs::create_dir_all(explicit.join("d")).unwrap();
        std::fs::write(explicit.join("d/f"), "12345").unwrap();
        std::fs::write(explicit.join("g"), "1").unwrap();
        assert_eq!(count_files(&explicit), Some((2, 6)));
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_and_shared_targets_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = prepare_target(&link, false, true).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // A directory others may write into: someone else could swap what restic writes through.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_target(&shared, false, false).unwrap_err();
        assert!(e.contains("writable by group or others") && e.contains("777"), "{e}");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(fresh(prepare_target(&shared, false, false)), Ok(true));
    }

    #[cfg(unix)]
    #[test]
    fn another_users_symlink_among_the_ancestors_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // The agent's own link: fine.
        assert_eq!(fresh(prepare_target(&link.join("mine"), false, false)), Ok(true));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // handing the link to another user needs root
        }
        let path = std::ffi::CString::new(link.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::lchown(path.as_ptr(), 54321, 54321) }, 0);
        let e = prepare_target(&link.join("theirs"), false, false).unwrap_err();
        assert!(e.contains("symbolic link") && e.contains("54321"), "{e}");
        assert!(!real.join("theirs").exists(), "nothing created through it");
    }

    #[cfg(unix)]
    #[test]
    fn a_target_swapped_after_the_check_is_refused_before_restic_starts() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let prepared = prepare_target(&target, false, false).unwrap();
        assert_eq!(verify_target(&target, &prepared, false), Ok(()));
        std::fs::remove_dir(&target).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
        let e = verify_target(&target, &prepared, false).unwrap_err();
        assert!(e.contains("replaced"), "{e}");
        std::fs::remove_file(&target).unwrap();
        std::fs::create_dir(&target).unwrap();
        let e = verify_target(&target, &prepared, false).unwrap_err();
        assert!(e.contains("replaced"), "another directory of the same name: {e}");
        let prepared = prepare_target(&target, false, false).unwrap();
        std::fs::write(target.join("new"), "x").unwrap();
        let e = verify_target(&target, &prepared, false).unwrap_err();
        assert!(e.contains("not empty"), "{e}");
        assert_eq!(verify_target(&target, &prepared, true), Ok(()));
    }

    #[test]
    fn running_restores_hold_their_targets_against_same_and_nested_ones() {
        let tasks = TaskState::default();
        let held = claim_target(&tasks, Path::new("/srv/restore"), "op_1").unwrap();
        for other in ["/srv/restore", "/srv/restore/sub", "/srv"] {
            let e = claim_target(&tasks, Path::new(other), "op_2").err().unwrap();
            assert!(e.contains("op_1") && e.contains("overlaps"), "{other}: {e}");
        }
        let sibling = claim_target(&tasks, Path::new("/srv/restore-2"), "op_3").unwrap();
        drop(held);
        assert!(claim_target(&tasks, Path::new("/srv/restore/sub"), "op_2").is_ok(), "released when done");
        drop(sibling);
    }

    #[test]
    fn includes_are_literal_paths_for_restic() {
        if cfg!(windows) {
            assert_eq!(glob_escape("C:\\a[b]*?"), "C:\\a[[]b][*][?]");
        } else {
            assert_eq!(glob_escape("/srv/we[ir]d/*.txt"), "/srv/we\\[ir\\]d/\\*.txt");
            assert_eq!(glob_escape("/a?b\\c"), "/a\\?b\\\\c");
            assert_eq!(glob_escape("/plain/Grüße dir"), "/plain/Grüße dir");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("srv/data")).unwrap();
        let include = vec!["/srv/data".to_string(), "/srv/missing".to_string(), "/".to_string()];
        assert_eq!(unmatched_includes(dir.path(), &include), ["/srv/missing"]);
    }

    #[test]
    fn listings_run_at_most_two_at_once() {
        let tasks = Arc::new(TaskState::default());
        let (peak, now) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (tasks, peak, now) = (tasks.clone(), peak.clone(), now.clone());
                std::thread::spawn(move || {
                    let _turn = LsTurn::take(&tasks);
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                    now.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), LS_CONCURRENT);
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
    fn the_open_operation_on_disk_names_the_target_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (backups, _server) = started(dir.path(), None);
        let task = RestoreTask {
            operation_id: "op_0123456789abcdef0123456789abcdee".into(),
            plan: "p".into(),
            repository: "r".into(),
            snapshot: "90a410e6".into(),
            include: vec![],
            target: Some("/srv/restored".into()),
            overwrite: false,
        };
        let op = start(&backups.inner, &task);
        let saved: crate::backups::store::OpenOperations =
            serde_json::from_slice(&std::fs::read(backups.inner.paths.open_operations()).unwrap()).unwrap();
        let report = &saved.operations[&task.operation_id];
        assert_eq!(report.kind, OperationKind::Restore);
        assert_eq!(report.restore.as_ref().unwrap().target, "/srv/restored", "a crash report names the target");
        op.finish(&backups.inner, failed("test".into()));
        backups.shutdown();
    }

    #[test]
    fn a_busy_server_s_back_off_hint_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let busy = AgentTasks { generation: 1, retry_after_secs: Some(30), ..Default::default() };
        let (backups, server) = started(dir.path(), Some(busy));
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(server.calls.load(Ordering::SeqCst), 1, "not asked again before the hint's 30 s");
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
            retry_after_secs: None,
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
        assert!(
            !lock(&backups.inner.slots).keys().any(|k| k.starts_with("restore:")),
            "a finished restore's slot is gone"
        );
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
        assert!(check(&RestoreTask { include: vec!["/a/../../etc".into()], ..task.clone() }).is_err());
        // Absolute on the agent's own platform only.
        let foreign = if cfg!(windows) { "/srv/x" } else { "C:/x" };
        let e = check(&RestoreTask { target: Some(foreign.into()), ..task.clone() }).unwrap_err();
        assert!(e.starts_with("target:") && e.contains("not an absolute path on this agent"), "{e}");
        assert!(check(&RestoreTask { include: vec![foreign.into()], ..task }).is_err());
    }
}
