//! Repository maintenance on the agent: each repository of the applied config with a prune or check policy is one
//! scheduled entry (`prune:<repository>`, `check:<repository>`), fired by the scheduler thread with this host's
//! jitter offset like a plan, plus the operator's run-now requests (`requested_at`). State in
//! `maintenance-state.json` beside the config (0600, temp + rename).
//!
//! A firing runs only under the server's maintenance lease for its slot (the firing time, the same on every host):
//! * `done` (another agent already ran the slot): skipped, nothing reported;
//! * busy (another run holds the repository, or backups wait for it): asked again every few seconds until the
//!   entry's next firing; this agent's own repository lock is not held while waiting, so its backups go on;
//! * the server cannot be asked: asked again the same way; maintenance never runs without the lease.
//!
//! Once granted: this agent's repository lock, the lease renewed on a thread, restic `prune`/`check`, and one
//! operation of kind `prune`/`check` naming the repository, reported like a backup's. Stopping the agent or a config
//! without the policy cancels the run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rm_protocol::backup::{
    AgentConfigBody, AgentRepository, LeaseRequest, OperationReport, OperationStatus, Timezone, Trigger,
};
use rm_protocol::maintenance::{AgentMaintenance, MaintenanceKind, MaintenanceLease};
use serde::{Deserialize, Serialize};

use super::runner::{self, LEASE_TTL_SECS, Operation};
use super::scheduler::{ScheduleState, Scheduled};
use super::{Claimed, Inner, lock, store};
use crate::client::Lease;
use crate::restic::{self, Cancel};

/// The longest wait between two lease requests while a slot waits.
const POLL_MAX_SECS: u64 = 5;
/// A requested run (or one without a next firing) waits at most this long for the lease.
const REQUEST_WAIT: Duration = Duration::from_secs(6 * 3600);

/// One scheduled maintenance job of one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `prune:<repository>` or `check:<repository>`: the slot key and schedule-state name (plan names cannot contain
    /// `:`, so they never collide).
    pub key: String,
    pub kind: MaintenanceKind,
    pub repository: String,
    pub policy: AgentMaintenance,
}

impl Scheduled for Entry {
    fn name(&self) -> &str {
        &self.key
    }
    fn schedule(&self) -> &str {
        &self.policy.schedule
    }
    fn timezone(&self) -> Timezone {
        self.policy.timezone
    }
    fn jitter_secs(&self) -> u64 {
        self.policy.jitter_secs
    }
}

pub fn key(kind: MaintenanceKind, repository: &str) -> String {
    format!("{kind}:{repository}")
}

/// Whether a slot key names a maintenance entry (not a plan).
pub fn is_key(name: &str) -> bool {
    name.contains(':')
}

/// The maintenance entries of a config: every repository's prune and check policy.
pub fn entries(config: &AgentConfigBody) -> Vec<Entry> {
    let mut out = Vec::new();
    for r in &config.repositories {
        for (kind, policy) in [(MaintenanceKind::Prune, &r.prune), (MaintenanceKind::Check, &r.check)] {
            if let Some(policy) = policy {
                out.push(Entry { key: key(kind, &r.name), kind, repository: r.name.clone(), policy: policy.clone() });
            }
        }
    }
    out
}

/// A repository as backups compare it: without its maintenance policies, so a new policy or run-now request does
/// not cancel the backups that use the repository.
pub fn without_policies(mut r: AgentRepository) -> AgentRepository {
    r.prune = None;
    r.check = None;
    r
}

/// `maintenance-state.json`: the schedule state of the entries, and the newest run-now request handled per entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceState {
    #[serde(default)]
    pub schedule: ScheduleState,
    #[serde(default)]
    pub requested: BTreeMap<String, i64>,
}

impl MaintenanceState {
    /// Entries due now: scheduled firings (slot = the firing) and requests not handled yet (slot = the request's
    /// time). Marks them handled; drops the state of removed entries. Returns whether anything changed.
    pub fn take_due(
        &mut self,
        entries: &[Entry],
        agent_id: &str,
        now: DateTime<Utc>,
        started: DateTime<Utc>,
    ) -> (Vec<(Entry, Trigger, i64)>, bool) {
        let before = self.clone();
        self.schedule.reconcile(entries, now);
        self.requested.retain(|k, _| entries.iter().any(|e| &e.key == k));
        let mut due = Vec::new();
        for d in self.schedule.take_due(entries, agent_id, now, started) {
            if let Some(e) = entries.iter().find(|e| e.key == d.plan) {
                due.push((e.clone(), d.trigger, d.firing.timestamp()));
            }
        }
        for e in entries {
            let Some(at) = e.policy.requested_at else { continue };
            if self.requested.get(&e.key).is_some_and(|handled| *handled >= at) {
                continue;
            }
            self.requested.insert(e.key.clone(), at);
            if !due.iter().any(|(d, _, _)| d.key == e.key) {
                due.push((e.clone(), Trigger::RunNow, at));
            }
        }
        let changed = *self != before;
        (due, changed)
    }
}

/// The agent's path for the maintenance state.
pub fn state_path(paths: &store::Paths) -> std::path::PathBuf {
    paths.dir.join("maintenance-state.json")
}

/// Starts one maintenance run on its own thread.
pub(crate) fn spawn(inner: &Arc<Inner>, entry: Entry, trigger: Trigger, slot: i64) {
    *lock(&inner.active) += 1;
    let runner = inner.clone();
    let spawned = std::thread::Builder::new().name(format!("maint-{}", entry.key)).spawn(move || {
        let _active = super::ActiveGuard(&runner);
        run(&runner, &entry, trigger, slot);
    });
    if let Err(e) = spawned {
        *lock(&inner.active) -= 1;
        crate::log(format_args!("cannot start a maintenance thread: {e}"));
    }
}

fn trigger_name(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Schedule => "schedule",
        Trigger::CatchUp => "catch_up",
        Trigger::RunNow => "run_now",
    }
}

struct Release<'a> {
    inner: &'a Inner,
    key: &'a str,
    id: &'a str,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.inner.release(self.key, self.id);
    }
}

struct Unlock<'a>(&'a Inner, &'a str);

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        self.0.unlock_repository(self.1);
    }
}

/// A granted maintenance lease, renewed on a thread and released on drop.
struct Held {
    renewer: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    inner: Arc<Inner>,
    repository: String,
    id: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.renewer.take() {
            drop(stop);
            let _ = thread.join();
        }
        let _ = self.inner.server.release_lease(&self.repository, &self.id);
    }
}

/// What waiting for the lease came to.
enum Waited {
    Granted(Held),
    Done,
    GaveUp(String),
    Cancelled,
}

/// One firing of `entry` (slot `slot`): wait for the lease, run, report.
fn run(inner: &Arc<Inner>, entry: &Entry, trigger: Trigger, slot: i64) {
    let cancel = Cancel::default();
    let id = store::new_operation_id();
    match inner.claim(&entry.key, &id, &cancel, false) {
        Claimed::Run => {}
        Claimed::Busy(other) => {
            crate::log(format_args!("{} skipped: still running as operation {other}", crate::printable(&entry.key)));
            return;
        }
        Claimed::Cancelled(_) => return,
    }
    let _slot = Release { inner, key: &entry.key, id: &id };
    let restic = match inner.restic_for_run() {
        Ok(r) => r,
        Err(e) => {
            crate::log(format_args!("{} of slot {slot} not run: {}", entry.key, crate::printable(&e)));
            return;
        }
    };
    // Bounded by the entry's next firing: a slot nobody could run gives way to the next one.
    let now = Utc::now();
    let until = super::scheduler::next_run(entry, &inner.agent_id, now)
        .and_then(|t| (t - now).to_std().ok())
        .unwrap_or(REQUEST_WAIT)
        .min(REQUEST_WAIT);
    let (held, _local) = match wait_for_lease(inner, entry, &id, slot, &cancel, Instant::now() + until) {
        (Waited::Granted(held), local) => (held, local),
        (Waited::Done, _) => {
            crate::log(format_args!(
                "{} of slot {slot} skipped: another agent already ran it",
                crate::printable(&entry.key)
            ));
            return;
        }
        (Waited::GaveUp(why), _) => {
            crate::log(format_args!("{} of slot {slot} not run: {why}", crate::printable(&entry.key)));
            // Reported, so a slot that never ran shows (a locked-like failure: it says nothing about the data).
            let mut report = runner::report(&id, "", trigger, runner::now_secs());
            report.kind = entry.kind.operation_kind();
            report.repository = Some(entry.repository.clone());
            report.maintenance =
                Some(rm_protocol::maintenance::MaintenanceSummary { slot: Some(slot), ..Default::default() });
            report.status = OperationStatus::Failed;
            report.reason = Some(rm_protocol::backup::FailureReason::Locked);
            report.message = Some(format!("not run: {why}"));
            report.finished_at = Some(report.started_at);
            report.duration_ms = Some(0);
            inner.finish_operation(&report);
            return;
        }
        (Waited::Cancelled, _) => return,
    };
    let Some(repository) =
        lock(&inner.config).as_ref().and_then(|c| c.repositories.iter().find(|r| r.name == entry.repository).cloned())
    else {
        return;
    };
    let mut report = runner::report(&id, "", trigger, runner::now_secs());
    report.kind = entry.kind.operation_kind();
    report.repository = Some(entry.repository.clone());
    report.maintenance = Some(rm_protocol::maintenance::MaintenanceSummary { slot: Some(slot), ..Default::default() });
    inner.open_operation(&report);
    inner.outbox.set_live(report.clone());
    crate::log(format_args!(
        "{} start: repository={} slot={slot} trigger={} operation={id}",
        entry.kind,
        crate::printable(&entry.repository),
        trigger_name(trigger)
    ));
    let op = Operation { report, started: Instant::now() };
    let option = match entry.kind {
        MaintenanceKind::Prune => entry.policy.max_unused.as_deref(),
        MaintenanceKind::Check => entry.policy.read_data_subset.as_deref(),
    };
    let timeout = match entry.policy.timeout_secs {
        0 => Duration::from_secs(24 * 3600),
        s => Duration::from_secs(s),
    };
    let job = restic::MaintenanceJob {
        kind: entry.kind,
        repository: &repository,
        option,
        state_dir: &inner.state_dir,
        cancel: cancel.clone(),
        timeout,
    };
    let (mut outcome, mut summary) = restic::maintain(&restic, &job);
    if outcome.status == OperationStatus::Cancelled {
        if let Some(why) = inner.cancel_reason(&entry.key, &id) {
            outcome.message = Some(why);
        }
    }
    summary.slot = Some(slot);
    finish(inner, entry.kind, op, outcome, summary);
    drop(held); // the lease and the repository only after the report is on disk
}

fn finish(
    inner: &Inner,
    kind: MaintenanceKind,
    mut op: Operation,
    outcome: restic::Outcome,
    summary: rm_protocol::maintenance::MaintenanceSummary,
) {
    let r: &mut OperationReport = &mut op.report;
    r.status = outcome.status;
    r.message = outcome.message;
    r.reason = outcome.reason;
    r.exit_code = outcome.exit_code;
    r.maintenance = Some(summary);
    r.progress = None;
    r.finished_at = Some(runner::now_secs());
    r.duration_ms = Some(op.started.elapsed().as_millis() as u64);
    inner.finish_operation(r);
    let mut line = format!(
        "{} end: repository={} status={} operation={} duration={:.1}s",
        kind,
        crate::printable(r.repository.as_deref().unwrap_or("")),
        r.status,
        r.id,
        op.started.elapsed().as_secs_f64()
    );
    if let Some(m) = &r.message {
        line.push_str(&format!(" message={}", crate::printable(m)));
    }
    crate::log(line);
}

/// Asks for the maintenance lease until it is granted, the slot is done, `until` passes or the run is cancelled.
/// This agent's repository lock is taken before each request and kept only when the lease is granted, so a backup
/// of this agent never waits for it while the lease is busy.
fn wait_for_lease<'a>(
    inner: &'a Arc<Inner>,
    entry: &'a Entry,
    id: &str,
    slot: i64,
    cancel: &Cancel,
    until: Instant,
) -> (Waited, Option<Unlock<'a>>) {
    let request = LeaseRequest {
        repository: entry.repository.clone(),
        operation_id: id.to_string(),
        ttl_secs: LEASE_TTL_SECS,
        maintenance: Some(MaintenanceLease { kind: entry.kind, slot }),
    };
    let mut said_busy = false;
    let mut last_error: Option<String> = None;
    loop {
        if cancel.is_cancelled() {
            return (Waited::Cancelled, None);
        }
        if Instant::now() >= until {
            let why = match last_error {
                Some(e) => format!("the server could not be asked for the maintenance lease ({e})"),
                None => "the repository stayed busy until the next firing".into(),
            };
            return (Waited::GaveUp(why), None);
        }
        let mut wait = POLL_MAX_SECS;
        if inner.try_lock_repository(&entry.repository) {
            let local = Unlock(inner, &entry.repository);
            match inner.server.take_lease(&request) {
                Ok(Lease::Granted(granted)) => {
                    let renewer = runner::renewer(
                        inner.clone(),
                        request,
                        runner::renew_every(granted.ttl_secs),
                        Some(cancel.clone()),
                    );
                    let held = Held {
                        renewer: Some(renewer),
                        inner: inner.clone(),
                        repository: entry.repository.clone(),
                        id: id.to_string(),
                    };
                    return (Waited::Granted(held), Some(local));
                }
                Ok(Lease::Done) => return (Waited::Done, None),
                Ok(Lease::Busy { retry_after_secs }) => {
                    if !said_busy {
                        crate::log(format_args!(
                            "{} of slot {slot}: repository busy (another run holds it or backups wait); waiting",
                            crate::printable(&entry.key)
                        ));
                        said_busy = true;
                    }
                    wait = retry_after_secs.clamp(1, POLL_MAX_SECS);
                }
                // Refused for good (a slot ahead of the server's clock, a repository this agent does not use, a slot
                // whose runs failed too often): asking again would not change the answer.
                Err(crate::AgentError::Server { status: status @ (400 | 403 | 409), code, message }) => {
                    return (
                        Waited::GaveUp(format!(
                            "the server refused the maintenance lease ({status} {code}: {message})"
                        )),
                        None,
                    );
                }
                Err(e) => {
                    if last_error.is_none() {
                        crate::log(format_args!(
                            "{} of slot {slot}: cannot ask for the maintenance lease ({e}); asking again",
                            crate::printable(&entry.key)
                        ));
                    }
                    last_error = Some(e.to_string());
                }
            }
            drop(local);
        }
        if !runner::sleep_unless(cancel, runner::poll_wait(wait)) {
            return (Waited::Cancelled, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(schedule: &str, requested_at: Option<i64>) -> AgentMaintenance {
        AgentMaintenance {
            schedule: schedule.into(),
            timezone: Timezone::Utc,
            max_unused: None,
            read_data_subset: None,
            timeout_secs: 60,
            jitter_secs: 0,
            requested_at,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn the_lease_is_waited_for_without_the_local_lock_and_never_skipped() {
        use crate::backups::tests::{FakeServer, start};
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        let backups = start(dir.path(), &server);
        let inner = &backups.inner;
        let entry = Entry {
            key: key(MaintenanceKind::Check, "r"),
            kind: MaintenanceKind::Check,
            repository: "r".into(),
            policy: policy("@daily", None),
        };
        let soon = || Instant::now() + Duration::from_secs(4);
        // Busy once, then granted: holds the lease and this agent's repository lock.
        server.busy(1);
        let (waited, local) = wait_for_lease(inner, &entry, "op_a", 100, &Cancel::default(), soon());
        assert!(matches!(waited, Waited::Granted(_)) && local.is_some());
        assert_eq!(server.lease_requests(), 2);
        assert!(!inner.try_lock_repository("r"), "held while the lease is");
        drop((waited, local));
        assert!(inner.try_lock_repository("r"), "released with the lease");
        // While this agent's own backup holds the repository, the server is not even asked; the wait gives up at its
        // deadline rather than run.
        let before = server.lease_requests();
        let (waited, _) = wait_for_lease(inner, &entry, "op_b", 100, &Cancel::default(), Instant::now());
        assert!(matches!(waited, Waited::GaveUp(_)));
        assert_eq!(server.lease_requests(), before);
        inner.unlock_repository("r");
        // The slot is done elsewhere: skipped, the local lock given back.
        server.slot_done(true);
        let (waited, local) = wait_for_lease(inner, &entry, "op_c", 100, &Cancel::default(), soon());
        assert!(matches!(waited, Waited::Done) && local.is_none());
        assert!(inner.try_lock_repository("r"));
        inner.unlock_repository("r");
        server.slot_done(false);
        // The server cannot be asked: maintenance never runs without the lease.
        server.lease_fail(1000, 0);
        let (waited, _) =
            wait_for_lease(inner, &entry, "op_d", 100, &Cancel::default(), Instant::now() + Duration::from_secs(2));
        assert!(matches!(&waited, Waited::GaveUp(why) if why.contains("could not be asked")));
        // Refused for good (400: a slot ahead of the server's clock; 403: a repository this agent does not use; 409: a
        // slot whose runs failed too often): no asking again until the deadline.
        for status in [400, 403, 409] {
            server.lease_fail(1000, status);
            let before = server.lease_requests();
            let started = Instant::now();
            let (waited, _) = wait_for_lease(inner, &entry, "op_e", 100, &Cancel::default(), soon());
            assert!(matches!(&waited, Waited::GaveUp(why) if why.contains("refused")), "{status}");
            assert_eq!(server.lease_requests(), before + 1);
            assert!(started.elapsed() < Duration::from_secs(1));
            assert!(inner.try_lock_repository("r"), "the local lock given back");
            inner.unlock_repository("r");
        }
    }

    #[test]
    fn scheduled_firings_and_requests_are_due_once_each() {
        let entry = |requested| Entry {
            key: key(MaintenanceKind::Prune, "r"),
            kind: MaintenanceKind::Prune,
            repository: "r".into(),
            policy: policy("@every 1h", requested),
        };
        let mut state = MaintenanceState::default();
        let start = at(3600 * 10 + 5);
        let (due, changed) = state.take_due(&[entry(None)], "a", start, start);
        assert!(due.is_empty() && changed, "first sight waits for the next firing");
        let (due, _) = state.take_due(&[entry(None)], "a", at(3600 * 11), start);
        assert_eq!(
            due.iter().map(|(e, t, s)| (e.key.as_str(), *t, *s)).collect::<Vec<_>>(),
            [("prune:r", Trigger::Schedule, 3600 * 11)]
        );
        // A run-now request fires once, with its own time as the slot.
        let req = 3600 * 11 + 100;
        let (due, _) = state.take_due(&[entry(Some(req))], "a", at(req + 1), start);
        assert_eq!(due.iter().map(|(_, t, s)| (*t, *s)).collect::<Vec<_>>(), [(Trigger::RunNow, req)]);
        let (due, changed) = state.take_due(&[entry(Some(req))], "a", at(req + 2), start);
        assert!(due.is_empty() && !changed);
        // A removed policy drops its state.
        let (_, changed) = state.take_due(&[], "a", at(req + 3), start);
        assert!(changed && state.requested.is_empty() && state.schedule.plans.is_empty());
        assert!(is_key("prune:r") && !is_key("daily"));
    }
}
