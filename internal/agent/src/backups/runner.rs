//! One operation from start to final report: the plan's slot (a plan runs once at a time), this agent's lock on the
//! repository (one restic per repository here), the server's lease on it (one restic per repository in the fleet),
//! restic itself with throttled progress, and the final report, written to the outbox before anything is released.
//! A plan with a retention policy then runs `restic forget` as its own operation (kind `forget`, same trigger), still
//! holding the repository and its lease, after a backup that made a snapshot (success or warning).

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rm_protocol::backup::{
    AgentPlan, AgentRepository, FailureReason, LeaseRequest, OperationKind, OperationReport, OperationStatus, Progress,
    Trigger,
};

use super::{Claimed, Inner};
use crate::AgentError;
use crate::client::Lease;
use crate::restic::{self, Cancel, Outcome, Restic};

/// Progress goes to the server at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The lease lapses this long after its last renewal.
pub const LEASE_TTL_SECS: u64 = 120;
/// How often a held lease is renewed.
pub const LEASE_RENEW: Duration = Duration::from_secs(30);
/// A plan without a timeout (0) gets this one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Lets one progress report through per interval.
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    last: Instant,
}

impl Throttle {
    /// The first report may go `every` after `start` (the `running` report was just sent).
    pub fn new(every: Duration, start: Instant) -> Throttle {
        Throttle { every, last: start }
    }

    pub fn ready(&mut self, now: Instant) -> bool {
        if now.duration_since(self.last) >= self.every {
            self.last = now;
            true
        } else {
            false
        }
    }
}

pub(super) fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(super) fn report(id: &str, plan: &str, trigger: Trigger, started_at: i64) -> OperationReport {
    OperationReport {
        id: id.to_string(),
        plan: plan.to_string(),
        kind: OperationKind::Backup,
        trigger,
        status: OperationStatus::Running,
        started_at,
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

/// The longest wait between two attempts at a busy repository's lease.
const LEASE_POLL_MAX_SECS: u64 = 5;
/// A server answering lease requests with an error (before the repository was seen busy) is asked this many times,
/// this far apart, before the run goes on without a lease.
const LEASE_SERVER_ATTEMPTS: u32 = 3;
const LEASE_SERVER_RETRY: Duration = if cfg!(test) { Duration::from_millis(300) } else { Duration::from_secs(6) };

fn trigger_name(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Schedule => "schedule",
        Trigger::CatchUp => "catch_up",
        Trigger::RunNow => "run_now",
    }
}

/// An operation that has started (its `running` report is out): it ends with exactly one final report.
pub(super) struct Operation {
    pub report: OperationReport,
    pub started: Instant,
}

impl Operation {
    /// Starts an operation: recorded as open on disk (so a crash still ends it with a report), `running` queued.
    pub fn start(inner: &Inner, id: String, plan: &str, trigger: Trigger) -> Operation {
        Operation::start_kind(inner, id, plan, trigger, OperationKind::Backup)
    }

    /// [`Operation::start`] of another kind than backup.
    pub fn start_kind(inner: &Inner, id: String, plan: &str, trigger: Trigger, kind: OperationKind) -> Operation {
        let mut report = report(&id, plan, trigger, now_secs());
        report.kind = kind;
        inner.open_operation(&report);
        inner.outbox.set_live(report.clone());
        crate::log(format_args!(
            "{} start: plan={} trigger={} operation={id}",
            kind_word(kind),
            crate::printable(plan),
            trigger_name(trigger)
        ));
        Operation { report, started: Instant::now() }
    }

    /// The final report: written to the outbox, the operation closed, one log line.
    pub fn finish(mut self, inner: &Inner, outcome: Outcome) {
        let r = &mut self.report;
        r.status = outcome.status;
        r.summary = outcome.summary;
        r.message = outcome.message;
        r.reason = outcome.reason;
        r.exit_code = outcome.exit_code;
        r.snapshots = outcome.snapshots;
        r.forget = outcome.forget;
        r.progress = None;
        r.finished_at = Some(now_secs());
        r.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        inner.finish_operation(r);
        let mut line = format!(
            "{} end: plan={} trigger={} status={} operation={} duration={:.1}s",
            kind_word(r.kind),
            crate::printable(&r.plan),
            trigger_name(r.trigger),
            r.status,
            r.id,
            self.started.elapsed().as_secs_f64()
        );
        if let Some(f) = &r.forget {
            line.push_str(&format!(" removed={} kept={}", f.removed, f.kept));
        }
        if let Some(m) = &r.message {
            line.push_str(&format!(" message={}", crate::printable(m)));
        }
        crate::log(line);
    }
}

pub(super) fn outcome(status: OperationStatus, reason: Option<FailureReason>, message: String) -> Outcome {
    Outcome { status, summary: None, message: Some(message), reason, exit_code: None, snapshots: None, forget: None }
}

/// `run` for backups (the log's words since issue 14), else the kind's name.
fn kind_word(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::Backup => "run",
        OperationKind::Forget => "forget",
        OperationKind::Prune => "prune",
        OperationKind::Check => "check",
        OperationKind::Restore => "restore",
    }
}

/// Runs `plan` once. `run_now`: the server's operation id, already accepted and reported `running`; such a run waits
/// for the plan's current run to end instead of being skipped.
pub(super) fn run(inner: &Arc<Inner>, plan: &str, trigger: Trigger, run_now: Option<Operation>) {
    let cancel = Cancel::default();
    let id = run_now.as_ref().map_or_else(super::store::new_operation_id, |o| o.report.id.clone());
    let claimed = inner.claim(plan, &id, &cancel, run_now.is_some());
    let op = match (claimed, run_now) {
        (Claimed::Busy(other), None) => {
            crate::log(format_args!(
                "run skipped: plan={} trigger={} (still running as operation {other})",
                crate::printable(plan),
                trigger_name(trigger)
            ));
            return;
        }
        (Claimed::Busy(other), Some(op)) => {
            let message =
                format!("plan {plan} already has a run waiting (operation {other}); this one was merged into it");
            return op.finish(inner, outcome(OperationStatus::Cancelled, None, message));
        }
        (Claimed::Cancelled(why), Some(op)) => {
            return op.finish(inner, outcome(OperationStatus::Cancelled, None, why));
        }
        (Claimed::Cancelled(_), None) => return,
        (Claimed::Run, Some(op)) => op,
        (Claimed::Run, None) => Operation::start(inner, id.clone(), plan, trigger),
    };
    let _slot = SlotGuard { inner, plan, id: &id };
    let (end, held, ran) = execute(inner, &op, plan, &id, &cancel);
    let made_snapshot = matches!(end.status, OperationStatus::Success | OperationStatus::Warning);
    op.finish(inner, end);
    // Retention, in the same hold of the repository and its lease as the backup (forget changes the repository),
    // with the plan's policy as it is now: a change of the policy alone does not cancel a running backup, so it may
    // have been changed, or removed (then no forget), while the backup ran.
    // A run cancelled meanwhile (the plan changed or was removed, the agent is stopping) does not forget.
    if let Some(mut ran) = ran.filter(|_| made_snapshot && !cancel.is_cancelled()) {
        ran.plan.retention = inner.current_retention(plan);
        if ran.plan.retention.is_some() {
            forget(inner, &ran, trigger, &cancel, &id);
        }
    }
    drop(held); // the lease and the repository only after the reports are on disk
}

/// What a backup ran with, for the forget after it.
struct Ran {
    plan: AgentPlan,
    repository: AgentRepository,
    restic: Restic,
    timeout: Duration,
}

/// The forget after a backup of `ran.plan` (operation `backup_id`): its own operation, reported like a backup;
/// its failure is its own and leaves the backup's report as it is.
fn forget(inner: &Arc<Inner>, ran: &Ran, trigger: Trigger, cancel: &Cancel, backup_id: &str) {
    let plan = ran.plan.name.as_str();
    let op = Operation::start_kind(inner, super::store::new_operation_id(), plan, trigger, OperationKind::Forget);
    let job = restic::Job {
        plan: &ran.plan,
        repository: &ran.repository,
        hostname: &inner.hostname,
        state_dir: &inner.state_dir,
        cancel: cancel.clone(),
        timeout: ran.timeout,
    };
    let mut end = restic::forget(&ran.restic, &job);
    if end.status == OperationStatus::Cancelled {
        if let Some(why) = inner.cancel_reason(plan, backup_id) {
            end.message = Some(match end.message.take() {
                Some(m) if !m.is_empty() => format!("{why} ({m})"),
                _ => why,
            });
        }
    }
    op.finish(inner, end);
}

/// What a run holds until its final report is written: the server's lease (released first), then this agent's lock
/// on the repository.
#[derive(Default)]
struct Held<'a> {
    _lease: Option<LeaseHold>,
    _repository: Option<RepoGuard<'a>>,
}

struct SlotGuard<'a> {
    inner: &'a Inner,
    plan: &'a str,
    id: &'a str,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.inner.release(self.plan, self.id);
    }
}

struct RepoGuard<'a> {
    inner: &'a Inner,
    repository: String,
}

impl Drop for RepoGuard<'_> {
    fn drop(&mut self) {
        self.inner.unlock_repository(&self.repository);
    }
}

/// Why the agent runs no newer restic, as far as it knows.
fn no_newer_restic(inner: &Inner) -> String {
    if inner.restic_path.is_some() {
        return "--restic names it, so the agent installs none".into();
    }
    match super::lock(&inner.restic_install_error).as_deref() {
        Some(e) => format!("installing the server's restic failed: {e}"),
        None => "the server serves no restic known to be new enough".into(),
    }
}

/// Everything between the claim and the final report; what it returns holds the repository (and its lease) until
/// the caller has written the report.
fn execute<'a>(
    inner: &'a Arc<Inner>,
    op: &Operation,
    plan: &str,
    id: &str,
    cancel: &Cancel,
) -> (Outcome, Held<'a>, Option<Ran>) {
    let mut held = Held::default();
    let cancelled = |inner: &Inner| {
        let why = inner.cancel_reason(plan, id).unwrap_or_else(|| "cancelled".into());
        outcome(OperationStatus::Cancelled, None, why)
    };
    let Some((plan_def, repository)) = inner.snapshot_plan(plan, id) else {
        let message = format!("plan {plan} is not in this agent's backup config (removed?)");
        return (outcome(OperationStatus::Cancelled, None, message), held, None);
    };
    let restic = match inner.restic_for_run() {
        Ok(r) => r,
        Err(e) => return (outcome(OperationStatus::Failed, Some(FailureReason::ResticUnavailable), e), held, None),
    };
    if let Some(required) = repository.min_restic_version.as_deref()
        && let Some((major, minor, patch)) = rm_protocol::restic_dist::parse_version(required)
        && restic.version < (restic::Version { major, minor, patch })
    {
        let message = format!(
            "repository {} requires restic {required} or newer; this host runs restic {} ({}) and {}",
            repository.name,
            restic.version,
            restic.path.display(),
            no_newer_restic(inner)
        );
        return (outcome(OperationStatus::Failed, Some(FailureReason::ResticUnavailable), message), held, None);
    }
    if !inner.lock_repository(&repository.name, cancel) {
        return (cancelled(inner), held, None);
    }
    held._repository = Some(RepoGuard { inner, repository: repository.name.clone() });
    let Some(lease) = LeaseHold::acquire(inner, &repository.name, id, cancel) else {
        return (cancelled(inner), held, None);
    };
    held._lease = Some(lease);
    if cancel.is_cancelled() {
        return (cancelled(inner), held, None);
    }
    let timeout = match plan_def.timeout_secs {
        0 => DEFAULT_TIMEOUT,
        s => Duration::from_secs(s),
    };
    let job = restic::Job {
        plan: &plan_def,
        repository: &repository,
        hostname: &inner.hostname,
        state_dir: &inner.state_dir,
        cancel: cancel.clone(),
        timeout,
    };
    let mut throttle = Throttle::new(PROGRESS_EVERY, op.started);
    let mut on_progress = |p: &Progress| {
        if throttle.ready(Instant::now()) {
            let mut r = op.report.clone();
            r.progress = Some(p.clone());
            inner.outbox.set_live(r);
        }
    };
    let mut end = restic::backup(&restic, &job, &mut on_progress);
    if end.status == OperationStatus::Cancelled {
        if let Some(why) = inner.cancel_reason(plan, id) {
            end.message = Some(match end.message.take() {
                Some(m) if !m.is_empty() => format!("{why} ({m})"),
                _ => why,
            });
        }
    }
    let ran = Ran { plan: plan_def, repository, restic, timeout };
    (end, held, Some(ran))
}

/// The server's lease on a repository while restic runs: renewed on a thread, released on drop.
struct LeaseHold {
    held: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    inner: Arc<Inner>,
    repository: String,
    id: String,
}

impl LeaseHold {
    /// Takes the lease, waiting while another agent holds it. `None`: cancelled while waiting.
    ///
    /// A server that cannot be asked does not stop backups: when it cannot be reached at all (network, TLS) the run
    /// goes on without the lease at once; when it answers with an error (5xx, 401, …) the lease is asked for
    /// [`LEASE_SERVER_ATTEMPTS`] times, [`LEASE_SERVER_RETRY`] apart, before the run goes on without it. Either is
    /// said once in the log until a lease is granted again; restic's own repository lock still protects the data.
    /// Once the repository was seen busy, though, another agent is known to use it: an error then only means ask
    /// again at the same poll interval (cancellably), never run beside it.
    fn acquire(inner: &Arc<Inner>, repository: &str, id: &str, cancel: &Cancel) -> Option<LeaseHold> {
        let request = LeaseRequest {
            repository: repository.to_string(),
            operation_id: id.to_string(),
            ttl_secs: LEASE_TTL_SECS,
            maintenance: None,
        };
        let mut hold =
            LeaseHold { held: None, inner: inner.clone(), repository: repository.to_string(), id: id.to_string() };
        // Set once the repository was seen busy: the poll interval (seconds) to keep asking at.
        let mut busy_poll: Option<u64> = None;
        let mut said_error = false;
        let mut server_errors = 0;
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            let error = match inner.server.take_lease(&request) {
                Ok(Lease::Granted(granted)) => {
                    if inner.lease_unreachable.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        crate::log("repository leases granted again");
                    }
                    hold.held = Some(renewer(inner.clone(), request, renew_every(granted.ttl_secs), None));
                    return Some(hold);
                }
                // Only maintenance lease requests are answered "done"; a backup's never is. Ask again.
                Ok(Lease::Done) => {
                    if !sleep_unless(cancel, poll_wait(LEASE_POLL_MAX_SECS)) {
                        return None;
                    }
                    continue;
                }
                Ok(Lease::Busy { retry_after_secs }) => {
                    if busy_poll.is_none() {
                        crate::log(format_args!(
                            "repository {} is busy (another agent runs restic on it); operation {id} waits",
                            crate::printable(repository)
                        ));
                    }
                    // The server's retry_after is when the lease would lapse; a holder usually releases it
                    // sooner, so ask again within a few seconds (with jitter, so waiting agents do not ask together).
                    let base = retry_after_secs.clamp(1, LEASE_POLL_MAX_SECS);
                    busy_poll = Some(base);
                    if !sleep_unless(cancel, poll_wait(base)) {
                        return None;
                    }
                    continue;
                }
                Err(e) => e,
            };
            if let Some(base) = busy_poll {
                if !said_error {
                    crate::log(format_args!(
                        "cannot ask for the lease on busy repository {} ({error}); operation {id} keeps waiting",
                        crate::printable(repository)
                    ));
                    said_error = true;
                }
                if !sleep_unless(cancel, poll_wait(base)) {
                    return None;
                }
                continue;
            }
            let unreachable = matches!(error, AgentError::Network { .. } | AgentError::Tls(_));
            if !unreachable {
                server_errors += 1;
                if server_errors < LEASE_SERVER_ATTEMPTS {
                    if !sleep_unless(cancel, LEASE_SERVER_RETRY) {
                        return None;
                    }
                    continue;
                }
            }
            if !inner.lease_unreachable.swap(true, std::sync::atomic::Ordering::SeqCst) {
                crate::log(format_args!(
                    "cannot take repository leases ({error}); backups run without them while this lasts \
                     (restic's own repository locks keep the data safe)"
                ));
            }
            return Some(hold);
        }
    }
}

/// The wait before asking again for a busy repository's lease: `base` seconds plus up to 1 s of jitter.
pub(super) fn poll_wait(base: u64) -> Duration {
    Duration::from_secs(base) + Duration::from_millis(random_below(1000))
}

/// How often a lease of `ttl_secs` (as granted; `None` from servers that do not say) is renewed: every
/// [`LEASE_RENEW`], or a third of a shorter lifetime the server granted, so two renewals may fail before it lapses.
pub(super) fn renew_every(ttl_secs: Option<u64>) -> Duration {
    match ttl_secs {
        Some(ttl) => (Duration::from_secs(ttl) / 3).clamp(Duration::from_secs(1), LEASE_RENEW),
        None => LEASE_RENEW,
    }
}

/// Renews `request`'s lease every `every` until told to stop. When the server answers that the lease went to another
/// run (or the slot is done), `lost` (if any) is cancelled: a maintenance run must not go on holding restic's
/// exclusive lock beside the lease's new holder. A backup's run goes on (restic's own lock protects the data).
pub(super) fn renewer(
    inner: Arc<Inner>,
    request: LeaseRequest,
    every: Duration,
    lost: Option<Cancel>,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
            match inner.server.take_lease(&request) {
                Ok(Lease::Granted(_)) => {}
                Ok(Lease::Busy { .. } | Lease::Done) => {
                    crate::log(format_args!(
                        "the lease on repository {} was taken by another agent while operation {} runs{}",
                        crate::printable(&request.repository),
                        request.operation_id,
                        if lost.is_some() { "; stopping it" } else { "" }
                    ));
                    if let Some(cancel) = &lost {
                        cancel.cancel();
                        return;
                    }
                }
                Err(_) => {} // the server is down: the run goes on; the lease lapses by itself
            }
        }
    });
    (tx, thread)
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.held.take() {
            drop(stop);
            let _ = thread.join();
            let _ = self.inner.server.release_lease(&self.repository, &self.id);
        }
    }
}

/// Sleeps `d` in short steps; false as soon as `cancel` is set.
pub(super) fn sleep_unless(cancel: &Cancel, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if cancel.is_cancelled() {
            return false;
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(200)));
    }
    !cancel.is_cancelled()
}

fn random_below(n: u64) -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    u64::from_le_bytes(bytes) % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_throttled_to_one_report_per_interval() {
        let start = Instant::now();
        let mut t = Throttle::new(PROGRESS_EVERY, start);
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert!(!t.ready(at(0)), "the running report just went out");
        assert!(!t.ready(at(4_999)));
        assert!(t.ready(at(5_000)));
        assert!(!t.ready(at(6_000)));
        assert!(!t.ready(at(9_999)));
        assert!(t.ready(at(10_000)));
        // A status line every 100 ms for a minute: 12 reports at most.
        let mut t = Throttle::new(PROGRESS_EVERY, start);
        assert_eq!((0..600).filter(|i| t.ready(at(i * 100))).count(), 11);
    }

    #[test]
    fn a_busy_repository_is_waited_for_and_an_unreachable_server_does_not_block() {
        use crate::backups::tests::{FakeServer, start};
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        let backups = start(dir.path(), &server);
        let inner = &backups.inner;
        server.busy(1);
        let started = Instant::now();
        let lease = LeaseHold::acquire(inner, "r", "op_a", &Cancel::default()).expect("granted");
        assert!(lease.held.is_some());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(4), "{waited:?}");
        assert_eq!(server.lease_requests(), 2);
        drop(lease);

        // Busy, then cancelled while waiting: no lease, promptly.
        server.busy(100);
        let cancel = Cancel::default();
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.cancel();
        });
        let started = Instant::now();
        assert!(LeaseHold::acquire(inner, "r", "op_b", &cancel).is_none());
        assert!(started.elapsed() < Duration::from_secs(2));
        t.join().unwrap();

        // The server is down: the run goes on without a lease.
        server.busy(0);
        server.down(true);
        let lease = LeaseHold::acquire(inner, "r", "op_c", &Cancel::default()).expect("runs anyway");
        assert!(lease.held.is_none());
        assert!(inner.lease_unreachable.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn lease_errors_after_a_busy_answer_keep_the_run_waiting() {
        use crate::backups::tests::{FakeServer, start};
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        let backups = start(dir.path(), &server);
        let inner = &backups.inner;
        // Busy, then unreachable twice (a timeout, say), then granted: it waited, and holds the lease.
        server.busy(1);
        server.lease_fail(2, 0);
        let started = Instant::now();
        let lease = LeaseHold::acquire(inner, "r", "op_a", &Cancel::default()).expect("granted");
        assert!(lease.held.is_some(), "never ran beside the other agent");
        assert_eq!(server.lease_requests(), 4);
        assert!(started.elapsed() >= Duration::from_secs(3), "polled at the busy interval: {:?}", started.elapsed());
        drop(lease);
        // Busy, then server errors without end: waits until cancelled, never runs without the lease.
        server.busy(1);
        server.lease_fail(1000, 500);
        let cancel = Cancel::default();
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(3500));
            c.cancel();
        });
        assert!(LeaseHold::acquire(inner, "r", "op_b", &cancel).is_none(), "cancelled, not run");
        t.join().unwrap();
        assert!(!inner.lease_unreachable.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_failing_lease_server_is_retried_a_few_times_then_the_run_goes_on() {
        use crate::backups::tests::{FakeServer, start};
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        let backups = start(dir.path(), &server);
        let inner = &backups.inner;
        // Two 500s, then granted: the run holds the lease.
        server.lease_fail(2, 500);
        let started = Instant::now();
        let lease = LeaseHold::acquire(inner, "r", "op_a", &Cancel::default()).expect("granted");
        assert!(lease.held.is_some());
        assert_eq!(server.lease_requests(), 3);
        assert!(started.elapsed() >= LEASE_SERVER_RETRY * 2);
        drop(lease);
        // A server that keeps answering 401: after the bounded attempts, the run goes on without a lease.
        server.lease_fail(1000, 401);
        let lease = LeaseHold::acquire(inner, "r", "op_b", &Cancel::default()).expect("runs anyway");
        assert!(lease.held.is_none());
        assert_eq!(server.lease_requests(), 3 + LEASE_SERVER_ATTEMPTS as usize);
        assert!(inner.lease_unreachable.load(std::sync::atomic::Ordering::SeqCst));
        // Unreachable (connection refused, DNS, timeout): without a lease at once.
        server.lease_fail(1000, 0);
        let before = server.lease_requests();
        let lease = LeaseHold::acquire(inner, "r", "op_c", &Cancel::default()).expect("runs anyway");
        assert!(lease.held.is_none());
        assert_eq!(server.lease_requests(), before + 1);
    }

    #[test]
    fn a_cancelled_wait_returns_promptly() {
        let cancel = Cancel::default();
        let c = cancel.clone();
        let t = std::thread::spawn(move || sleep_unless(&c, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        cancel.cancel();
        assert!(!t.join().unwrap());
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(sleep_unless(&Cancel::default(), Duration::from_millis(10)));
    }
}
