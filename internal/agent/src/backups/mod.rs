//! Backups on the agent: the server's plans applied and kept on disk, schedules fired here (so backups run while the
//! server is down), run-now requests run at most once, one restic per repository, and every run reported.
//!
//! * [`store`]: `backup-config.json`, `run-now.json`, `open-operations.json` beside the agent config, and operation
//!   ids.
//! * [`scheduler`]: next firings with the per-host jitter offset, catch-up after downtime, `schedule-state.json`.
//! * [`outbox`]: final reports on disk until the server has them; `running`/progress reports in memory.
//! * [`runner`]: one operation: plan slot, repository lock, server lease, restic, final report.
//! * [`restore`]: restore and listing tasks, and the long-poll that brings them (and run-now requests) at once.
//! * [`maintenance`]: the repositories' prune and check: scheduled per repository, run under the server's
//!   maintenance lease, reported as operations of the repository.
//!
//! [`Backups`] ties them together for `commands::run`: [`Backups::heartbeat_fields`] for each heartbeat,
//! [`Backups::on_answer`] for each answer (config sync, run-now), the scheduler thread, and shutdown.

pub mod maintenance;
pub mod outbox;
pub mod restore;
pub mod runner;
pub mod scheduler;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rm_protocol::HeartbeatResponse;
use rm_protocol::backup::{
    AgentConfigBody, AgentPlan, AgentRepository, FailureReason, LeaseRequest, OperationKind, OperationReport,
    OperationStatus, ReportAck, ReportBatch, ResticInfo, RunNow, Trigger,
};
use rm_protocol::restore::{AgentTasks, LsResult};
use rm_protocol::retention::Retention;

use crate::AgentError;
use crate::client::{Client, Lease};
use crate::restic::{self, Cancel, Restic};
use outbox::Outbox;
use runner::Operation;
use scheduler::ScheduleState;
use store::{Accepted, OpenOperations, Paths};

/// How often restic is looked for again while it works (a failed detection is retried before every run).
pub const DETECT_EVERY: Duration = Duration::from_secs(600);
/// On shutdown: how long running backups get to stop and be reported, and how long the outbox gets to flush.
const SHUTDOWN_RUNS: Duration = Duration::from_secs(30);
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// The server's backup endpoints, as the agent uses them (a trait so tests can stand in for the server).
pub trait Server: Send + Sync {
    fn agent_config(&self) -> Result<AgentConfigBody, AgentError>;
    fn post_reports(&self, batch: &ReportBatch) -> Result<ReportAck, AgentError>;
    fn take_lease(&self, request: &LeaseRequest) -> Result<Lease, AgentError>;
    fn release_lease(&self, repository: &str, operation_id: &str) -> Result<(), AgentError>;
    /// `GET /api/v1/agents/tasks` (long-poll); `Ok(None)`: the server has no such endpoint (older than restores).
    fn tasks(&self, _seen: Option<u64>, _wait_secs: u64) -> Result<Option<AgentTasks>, AgentError> {
        Ok(None)
    }
    /// `POST /api/v1/agents/tasks/{request_id}`: a listing's answer.
    fn post_ls_result(&self, _request_id: &str, _result: &LsResult) -> Result<(), AgentError> {
        Err(AgentError::Usage("this server takes no listings".into()))
    }
}

/// The real server: the agent's client and credential.
pub struct Authenticated {
    pub client: Arc<Client>,
    pub credential: String,
}

impl Server for Authenticated {
    fn agent_config(&self) -> Result<AgentConfigBody, AgentError> {
        self.client.agent_config(&self.credential)
    }
    fn post_reports(&self, batch: &ReportBatch) -> Result<ReportAck, AgentError> {
        self.client.post_reports(&self.credential, batch)
    }
    fn take_lease(&self, request: &LeaseRequest) -> Result<Lease, AgentError> {
        self.client.take_lease(&self.credential, request)
    }
    fn release_lease(&self, repository: &str, operation_id: &str) -> Result<(), AgentError> {
        self.client.release_lease(&self.credential, repository, operation_id)
    }
    fn tasks(&self, seen: Option<u64>, wait_secs: u64) -> Result<Option<AgentTasks>, AgentError> {
        self.client.tasks(&self.credential, seen, wait_secs)
    }
    fn post_ls_result(&self, request_id: &str, result: &LsResult) -> Result<(), AgentError> {
        self.client.post_ls_result(&self.credential, request_id, result)
    }
}

/// A stop request that sleepers notice at once (the heartbeat loop waits on it instead of `thread::sleep`), and a
/// wake-up that ends one wait early without stopping (the task long-poll asks for a heartbeat now).
#[derive(Default)]
pub struct Stop {
    state: Mutex<StopState>,
    cv: Condvar,
}

#[derive(Default)]
struct StopState {
    stopped: bool,
    woken: bool,
}

impl Stop {
    pub fn stop(&self) {
        lock(&self.state).stopped = true;
        self.cv.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        lock(&self.state).stopped
    }

    /// Ends the current (or next) [`Stop::wait`] early, as if its time had passed.
    pub fn wake(&self) {
        lock(&self.state).woken = true;
        self.cv.notify_all();
    }

    /// Sleeps up to `d` or until [`Stop::wake`]; true if stopped (at once when already stopped).
    pub fn wait(&self, d: Duration) -> bool {
        let guard = lock(&self.state);
        let (mut guard, _) =
            self.cv.wait_timeout_while(guard, d, |s| !s.stopped && !s.woken).unwrap_or_else(|p| p.into_inner());
        guard.woken = false;
        guard.stopped
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `run` needs to know to run backups.
pub struct Settings {
    pub config_path: PathBuf,
    pub agent_id: String,
    /// restic's `--host`: this machine's hostname as the agent read it when it started (`gethostname`, sanitised; the
    /// name it reports to the server too), not a name fixed at enrolment.
    pub hostname: String,
    /// `--restic`; `None`: `restic` on `PATH` or the managed restic, whichever is newer.
    pub restic: Option<PathBuf>,
    /// The managed restic's path ([`crate::restic_install::managed_path`]); `None`: not considered.
    pub managed_restic: Option<PathBuf>,
    /// Where restic's cache and the short-lived secret files go ([`state_dir_from_env`]); `None`: the config's
    /// directory.
    pub state_dir: Option<PathBuf>,
}

/// The agent's state directory from `$STATE_DIRECTORY`, which systemd sets from the unit's `StateDirectory=`
/// (`/var/lib/restic-manager`; the first entry when it lists several, colon-separated). `None` when it is not set.
pub fn state_dir_from_env() -> Option<PathBuf> {
    state_dir_from(std::env::var_os("STATE_DIRECTORY"))
}

fn state_dir_from(value: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let value = value?;
    #[cfg(unix)]
    let first = {
        use std::os::unix::ffi::OsStrExt;
        let bytes = value.as_bytes();
        let end = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
        PathBuf::from(std::ffi::OsStr::from_bytes(&bytes[..end]))
    };
    #[cfg(not(unix))]
    let first = PathBuf::from(value);
    (!first.as_os_str().is_empty()).then_some(first)
}

struct Detection {
    result: Result<Restic, String>,
    at: Instant,
}

/// A run holding (or waiting for) a plan's slot.
struct Claim {
    id: String,
    cancel: Cancel,
    /// The plan and repository the run uses, once it has read them: a config that changes either cancels it.
    uses: Option<(AgentPlan, AgentRepository)>,
    /// Why it was cancelled, for its report.
    reason: Option<String>,
}

impl Claim {
    fn new(id: &str, cancel: &Cancel) -> Claim {
        Claim { id: id.to_string(), cancel: cancel.clone(), uses: None, reason: None }
    }

    fn cancel(&mut self, reason: &str) {
        if self.reason.is_none() {
            self.reason = Some(reason.to_string());
        }
        self.cancel.cancel();
    }
}

/// A plan runs once at a time; one run-now request may wait for the current run.
#[derive(Default)]
struct Slot {
    running: Option<Claim>,
    waiting: Option<Claim>,
}

pub(crate) enum Claimed {
    Run,
    /// Not run: the plan is busy with this operation.
    Busy(String),
    /// Cancelled while waiting, with the reason.
    Cancelled(String),
}

pub(crate) struct Inner {
    server: Arc<dyn Server>,
    paths: Paths,
    /// restic's cache (`restic-cache/`) and the short-lived secret files (`tmp/`): the state directory, else the
    /// config's directory.
    state_dir: PathBuf,
    agent_id: String,
    hostname: String,
    restic_path: Option<PathBuf>,
    managed_restic: Option<PathBuf>,
    restic: Mutex<Detection>,
    /// Why the last install of the served restic was refused (`None`: none refused, or the last one worked).
    restic_install_error: Mutex<Option<String>>,
    config: Mutex<Option<AgentConfigBody>>,
    slots: Mutex<HashMap<String, Slot>>,
    slots_cv: Condvar,
    repositories: Mutex<HashSet<String>>,
    repositories_cv: Condvar,
    outbox: Arc<Outbox>,
    accepted: Mutex<Accepted>,
    open: Mutex<OpenOperations>,
    schedule: Mutex<ScheduleState>,
    maintenance: Mutex<maintenance::MaintenanceState>,
    poke: Mutex<bool>,
    poke_cv: Condvar,
    stopping: AtomicBool,
    active: Mutex<usize>,
    active_cv: Condvar,
    /// Whether "cannot take leases" was logged (cleared when a lease is granted again).
    lease_unreachable: AtomicBool,
    /// The last config fetch error logged (each different error once).
    config_error: Mutex<Option<String>>,
    started: DateTime<Utc>,
    /// Listing ids already taken (a repeated tasks answer runs each once).
    tasks: restore::TaskState,
}

const STOPPING: &str = "the agent is stopping";

impl Inner {
    fn applied_revision(&self) -> Option<u64> {
        lock(&self.config).as_ref().map(|c| c.revision)
    }

    fn plans(&self) -> Option<Vec<AgentPlan>> {
        lock(&self.config).as_ref().map(|c| c.plans.clone())
    }

    fn knows(&self, plan: &str) -> bool {
        lock(&self.config).as_ref().is_some_and(|c| c.plans.iter().any(|p| p.name == plan))
    }

    /// Records a started operation on disk (so a crash still ends it with a report).
    fn open_operation(&self, report: &OperationReport) {
        let mut open = lock(&self.open);
        open.operations.insert(report.id.clone(), report.clone());
        if let Err(e) = store::save_json(&self.paths.open_operations(), &*open) {
            crate::log(format_args!("cannot record the running operation {}: {e}", report.id));
        }
    }

    /// Queues the final report durably, then forgets the operation as open.
    fn finish_operation(&self, report: &OperationReport) {
        if let Err(e) = self.outbox.push(report) {
            crate::log(format_args!(
                "cannot queue the report of operation {} on disk ({e}); sending it from memory only",
                report.id
            ));
            self.outbox.set_live(report.clone());
        }
        let mut open = lock(&self.open);
        if open.operations.remove(&report.id).is_some() {
            if let Err(e) = store::save_json(&self.paths.open_operations(), &*open) {
                crate::log(format_args!("cannot update {}: {e}", self.paths.open_operations().display()));
            }
        }
    }

    /// Takes the plan's slot. `may_wait`: wait (cancellably) for the current run instead of being skipped.
    fn claim(&self, plan: &str, id: &str, cancel: &Cancel, may_wait: bool) -> Claimed {
        if self.stopping.load(Ordering::SeqCst) {
            return Claimed::Cancelled(STOPPING.into());
        }
        let mut slots = lock(&self.slots);
        let slot = slots.entry(plan.to_string()).or_default();
        let Some(running) = &slot.running else {
            slot.running = Some(Claim::new(id, cancel));
            return Claimed::Run;
        };
        if let Some(waiting) = &slot.waiting {
            return Claimed::Busy(waiting.id.clone());
        }
        if !may_wait {
            return Claimed::Busy(running.id.clone());
        }
        slot.waiting = Some(Claim::new(id, cancel));
        loop {
            slots = self.slots_cv.wait_timeout(slots, Duration::from_secs(1)).unwrap_or_else(|p| p.into_inner()).0;
            let slot = slots.get_mut(plan).expect("slots are never removed");
            if cancel.is_cancelled() || self.stopping.load(Ordering::SeqCst) {
                let reason = slot.waiting.take().and_then(|c| c.reason);
                return Claimed::Cancelled(reason.unwrap_or_else(|| STOPPING.into()));
            }
            if slot.running.is_none() {
                slot.running = slot.waiting.take();
                return Claimed::Run;
            }
        }
    }

    fn release(&self, plan: &str, id: &str) {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get_mut(plan) {
            if slot.running.as_ref().is_some_and(|c| c.id == id) {
                slot.running = None;
            }
        }
        drop(slots);
        self.slots_cv.notify_all();
    }

    /// The plan's retention policy in the config applied now (`None`: no policy, or the plan is gone).
    fn current_retention(&self, plan: &str) -> Option<Retention> {
        let config = lock(&self.config);
        config.as_ref()?.plans.iter().find(|p| p.name == plan)?.retention.clone()
    }

    fn cancel_reason(&self, plan: &str, id: &str) -> Option<String> {
        let slots = lock(&self.slots);
        let slot = slots.get(plan)?;
        [&slot.running, &slot.waiting].into_iter().flatten().find(|c| c.id == id).and_then(|c| c.reason.clone())
    }

    /// The plan and repository a claimed run uses, remembered in its slot (a later config that changes them cancels
    /// the run).
    fn snapshot_plan(&self, plan: &str, id: &str) -> Option<(AgentPlan, AgentRepository)> {
        let config = lock(&self.config);
        let uses = effective(config.as_ref()?, plan)?;
        let mut slots = lock(&self.slots);
        if let Some(claim) = slots.get_mut(plan).and_then(|s| s.running.as_mut()).filter(|c| c.id == id) {
            claim.uses = Some(uses.clone());
        }
        Some(uses)
    }

    /// restic for a run: detected again first if the last detection failed.
    fn restic_for_run(&self) -> Result<Restic, String> {
        let mut d = lock(&self.restic);
        if d.result.is_err() {
            self.detect(&mut d);
        }
        d.result.clone()
    }

    fn detect(&self, d: &mut Detection) {
        let result = restic::detect_best(self.restic_path.as_deref(), self.managed_restic.as_deref());
        if result != d.result {
            match &result {
                Ok(r) => crate::log(format_args!("restic {} found at {}", r.version, r.path.display())),
                Err(e) => crate::log(format_args!(
                    "restic unavailable: {}; backups fail until it is installed (looked for again before each run)",
                    crate::printable(e)
                )),
            }
        }
        *d = Detection { result, at: Instant::now() };
    }

    /// Waits (cancellably) until no other run of this agent uses `repository`, then holds it.
    fn lock_repository(&self, repository: &str, cancel: &Cancel) -> bool {
        let mut held = lock(&self.repositories);
        let mut said = false;
        loop {
            if cancel.is_cancelled() {
                return false;
            }
            if held.insert(repository.to_string()) {
                return true;
            }
            if !said {
                crate::log(format_args!(
                    "repository {} is in use by another run of this agent; waiting",
                    crate::printable(repository)
                ));
                said = true;
            }
            held = self
                .repositories_cv
                .wait_timeout(held, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Holds `repository` if no other run of this agent uses it; false at once otherwise.
    fn try_lock_repository(&self, repository: &str) -> bool {
        lock(&self.repositories).insert(repository.to_string())
    }

    fn unlock_repository(&self, repository: &str) {
        lock(&self.repositories).remove(repository);
        self.repositories_cv.notify_all();
    }

    /// Applies a backup config: saved first (when it came from the server), runs of changed or removed plans
    /// cancelled, schedules brought in line.
    fn apply(&self, config: AgentConfigBody, save: bool) {
        let mut current = lock(&self.config);
        if save {
            if let Err(e) = store::save_config(&self.paths, &config) {
                crate::log(format_args!("cannot save the backup config (applied in memory only): {e}"));
            }
        }
        for plan in &config.plans {
            let name = crate::printable(&plan.name);
            if let Err(e) = rm_protocol::schedule::Schedule::parse(&plan.schedule) {
                crate::log(format_args!("plan {name} is never scheduled: {}", crate::printable(&e)));
            }
            if !config.repositories.iter().any(|r| r.name == plan.repository) {
                crate::log(format_args!(
                    "plan {name} names repository {}, which the config does not contain; its runs fail",
                    crate::printable(&plan.repository)
                ));
            }
        }
        {
            let mut slots = lock(&self.slots);
            let entries = maintenance::entries(&config);
            for (name, slot) in slots.iter_mut() {
                if maintenance::is_key(name) {
                    // A maintenance run goes on through policy changes; a removed policy (or repository) stops it.
                    if !entries.iter().any(|e| &e.key == name) {
                        let why = "the repository's maintenance policy was removed from this agent's config";
                        for c in [&mut slot.running, &mut slot.waiting].into_iter().flatten() {
                            c.cancel(why);
                        }
                    }
                    continue;
                }
                let now = effective(&config, name);
                let why = if now.is_none() {
                    "the plan was removed from this agent's backup config"
                } else {
                    "the plan was changed; the next run uses its new settings"
                };
                if let Some(c) = slot.running.as_mut() {
                    if c.uses.as_ref().is_some_and(|used| !same_run(now.as_ref(), used)) {
                        c.cancel(why);
                    }
                }
                if let (None, Some(w)) = (&now, slot.waiting.as_mut()) {
                    w.cancel(why);
                }
            }
        }
        let revision = config.revision;
        let count = config.plans.len();
        let plans = config.plans.clone();
        *current = Some(config);
        drop(current);
        let mut schedule = lock(&self.schedule);
        if schedule.reconcile(&plans, Utc::now()) {
            self.save_schedule(&schedule);
        }
        drop(schedule);
        *lock(&self.config_error) = None;
        crate::log(format_args!("backup config revision {revision} applied: {count} plan(s)"));
        self.wake_scheduler();
    }

    fn save_schedule(&self, schedule: &ScheduleState) {
        if let Err(e) = store::save_json(&self.paths.schedule_state(), schedule) {
            crate::log(format_args!("cannot save the schedule state: {e}"));
        }
    }

    /// Fetches and applies the server's backup config; false (logged once per distinct error) if it cannot.
    fn sync_config(&self) -> bool {
        match self.server.agent_config() {
            Ok(config) => {
                self.apply(config, true);
                true
            }
            Err(e) => {
                let text = e.to_string();
                let mut last = lock(&self.config_error);
                if last.as_deref() != Some(text.as_str()) {
                    crate::log(format_args!("cannot fetch the backup config (kept the applied one): {text}"));
                    *last = Some(text);
                }
                false
            }
        }
    }

    fn wake_scheduler(&self) {
        *lock(&self.poke) = true;
        self.poke_cv.notify_all();
    }

    fn sleep_scheduler(&self, d: Duration) {
        let guard = lock(&self.poke);
        let (mut guard, _) = self
            .poke_cv
            .wait_timeout_while(guard, d, |poked| !*poked && !self.stopping.load(Ordering::SeqCst))
            .unwrap_or_else(|p| p.into_inner());
        *guard = false;
    }
}

/// Whether a run that started with `used` may go on under the plan and repository `now`: all the same except,
/// perhaps, the retention policy (read again just before the forget after the backup, so changing only the policy
/// does not cancel backups fleet-wide).
fn same_run(now: Option<&(AgentPlan, AgentRepository)>, used: &(AgentPlan, AgentRepository)) -> bool {
    now.is_some_and(|(plan, repository)| {
        repository == &used.1 && AgentPlan { retention: used.0.retention.clone(), ..plan.clone() } == used.0
    })
}

/// The plan named `plan` in `config` and its repository.
fn effective(config: &AgentConfigBody, plan: &str) -> Option<(AgentPlan, AgentRepository)> {
    let p = config.plans.iter().find(|p| p.name == plan)?;
    let r = config.repositories.iter().find(|r| r.name == p.repository)?;
    Some((p.clone(), maintenance::without_policies(r.clone())))
}

struct ActiveGuard<'a>(&'a Inner);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.active) -= 1;
        self.0.active_cv.notify_all();
    }
}

fn spawn_run(inner: &Arc<Inner>, plan: String, trigger: Trigger, op: Option<Operation>) {
    *lock(&inner.active) += 1;
    let runner = inner.clone();
    let spawned = std::thread::Builder::new().name(format!("run-{plan}")).spawn(move || {
        let _active = ActiveGuard(&runner);
        runner::run(&runner, &plan, trigger, op);
    });
    if let Err(e) = spawned {
        *lock(&inner.active) -= 1;
        crate::log(format_args!("cannot start a run thread: {e}"));
    }
}

/// The agent's backup machinery while `run` runs.
pub struct Backups {
    inner: Arc<Inner>,
    sender: Mutex<Option<JoinHandle<()>>>,
    scheduler: Mutex<Option<JoinHandle<()>>>,
}

impl Backups {
    /// Loads what is on disk (applied config, schedule state, accepted run-now ids, queued reports), ends operations
    /// a previous process left running with a `failed` report, detects restic and starts the report sender.
    pub fn start(server: Arc<dyn Server>, settings: Settings) -> Result<Backups, AgentError> {
        let paths = Paths::for_config(&settings.config_path);
        let outbox = Arc::new(Outbox::open(&paths.outbox())?);
        let or_default = |what: &str, e: AgentError| {
            crate::log(format_args!("ignoring the saved {what}: {e}"));
        };
        let accepted = Accepted::load(&paths).unwrap_or_else(|e| {
            or_default("run-now ids", e);
            Accepted::default()
        });
        let schedule: ScheduleState = store::load_json(&paths.schedule_state())
            .unwrap_or_else(|e| {
                or_default("schedule state", e);
                None
            })
            .unwrap_or_default();
        let maintenance_state: maintenance::MaintenanceState = store::load_json(&maintenance::state_path(&paths))
            .unwrap_or_else(|e| {
                or_default("maintenance state", e);
                None
            })
            .unwrap_or_default();
        let open: OpenOperations = store::load_json(&paths.open_operations())
            .unwrap_or_else(|e| {
                or_default("open operations", e);
                None
            })
            .unwrap_or_default();
        let saved = store::load_config(&paths).unwrap_or_else(|e| {
            or_default("backup config", e);
            None
        });
        let state_dir = settings.state_dir.clone().unwrap_or_else(|| paths.dir.clone());
        // Before anything runs restic: the secret files a killed agent left, also under the config's directory,
        // where an older agent kept them.
        let mut dirs = vec![state_dir.clone()];
        if paths.dir != state_dir {
            dirs.push(paths.dir.clone());
        }
        for dir in dirs {
            match restic::remove_stale_secrets(&dir) {
                Ok(0) => {}
                Ok(n) => crate::log(format_args!(
                    "removed {n} secret file(s) a stopped agent left in {}",
                    dir.join("tmp").display()
                )),
                Err(e) => crate::log(format_args!("cannot remove stale secret files in {}: {e}", dir.display())),
            }
        }
        let inner = Arc::new(Inner {
            server,
            paths,
            state_dir,
            agent_id: settings.agent_id,
            hostname: settings.hostname,
            restic_path: settings.restic,
            managed_restic: settings.managed_restic,
            restic_install_error: Mutex::new(None),
            restic: Mutex::new(Detection { result: Err("not looked for yet".into()), at: Instant::now() }),
            config: Mutex::new(None),
            slots: Mutex::new(HashMap::new()),
            slots_cv: Condvar::new(),
            repositories: Mutex::new(HashSet::new()),
            repositories_cv: Condvar::new(),
            outbox,
            accepted: Mutex::new(accepted),
            open: Mutex::new(OpenOperations::default()),
            schedule: Mutex::new(schedule),
            maintenance: Mutex::new(maintenance_state),
            poke: Mutex::new(false),
            poke_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            active: Mutex::new(0),
            active_cv: Condvar::new(),
            lease_unreachable: AtomicBool::new(false),
            config_error: Mutex::new(None),
            started: Utc::now(),
            tasks: Default::default(),
        });
        // Operations a killed agent left running end now, with a report saying so. A run-now among them is accepted
        // first, in case the agent died before it could record that (a repeated request must not run it again).
        for (_, mut report) in open.operations {
            // Only a backup has a run-now id from the server; a forget after it inherited the trigger, not the id.
            if report.kind == OperationKind::Backup
                && report.trigger == Trigger::RunNow
                && valid_operation_id(&report.id)
            {
                if let Err(e) = lock(&inner.accepted).accept(&inner.paths, &report.id) {
                    crate::log(format_args!("cannot record run-now operation {} as accepted: {e}", report.id));
                }
            }
            let started = report.started_at;
            let stopped = "the agent stopped before this run finished (killed, crashed or the host went down)";
            if matches!(report.kind, OperationKind::Prune | OperationKind::Check) {
                // A maintenance run's interruption says nothing about the repository's data (and another agent may
                // have taken its slot over since): cancelled, not failed.
                report.status = OperationStatus::Cancelled;
                report.reason = None;
            } else {
                report.status = OperationStatus::Failed;
                report.reason = Some(FailureReason::Other);
            }
            report.message = Some(stopped.into());
            report.progress = None;
            report.finished_at = Some(runner::now_secs().max(started));
            crate::log(format_args!(
                "operation {} of plan {} was interrupted; reported {}",
                report.id,
                crate::printable(&report.plan),
                report.status
            ));
            inner.finish_operation(&report);
        }
        if inner.paths.open_operations().exists() {
            let _ = store::save_json(&inner.paths.open_operations(), &OpenOperations::default());
        }
        {
            let mut d = lock(&inner.restic);
            inner.detect(&mut d);
        }
        if let Some(config) = saved {
            inner.apply(config, false);
        }
        let sender = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("report-sender".into())
                .spawn(move || inner.outbox.run_sender(&*inner.server))
                .map_err(AgentError::io("starting the report sender"))?
        };
        Ok(Backups { inner, sender: Mutex::new(Some(sender)), scheduler: Mutex::new(None) })
    }

    /// What each heartbeat says about backups: the host's restic (detected again every [`DETECT_EVERY`]) and the
    /// applied config revision.
    pub fn heartbeat_fields(&self) -> (Option<ResticInfo>, Option<u64>) {
        let info = {
            let mut d = lock(&self.inner.restic);
            if d.at.elapsed() >= DETECT_EVERY {
                self.inner.detect(&mut d);
            }
            restic::info_managed(&d.result, self.inner.managed_restic.as_deref())
        };
        let install_error = lock(&self.inner.restic_install_error).clone();
        (Some(ResticInfo { install_error, ..info }), self.inner.applied_revision())
    }

    /// The restic runs would use now (as last detected).
    pub fn restic(&self) -> Result<Restic, String> {
        lock(&self.inner.restic).result.clone()
    }

    /// The managed restic, if this agent considers one and it is installed and works.
    pub fn managed_restic(&self) -> Option<Restic> {
        let path = self.inner.managed_restic.as_deref().filter(|p| p.exists())?;
        restic::detect(Some(path)).ok()
    }

    /// Whether `--restic` names the executable (then nothing is installed automatically).
    pub fn restic_is_explicit(&self) -> bool {
        self.inner.restic_path.is_some()
    }

    /// Looks for restic again now (after an install).
    pub fn redetect_restic(&self) {
        let mut d = lock(&self.inner.restic);
        self.inner.detect(&mut d);
    }

    /// Records (or clears) why the last restic install was refused; every heartbeat says it.
    pub fn set_restic_install_error(&self, error: Option<String>) {
        *lock(&self.inner.restic_install_error) = error;
    }

    /// The highest restic version the applied plans' repositories require, if any.
    pub fn required_restic(&self) -> Option<restic::Version> {
        let config = lock(&self.inner.config);
        config
            .as_ref()?
            .repositories
            .iter()
            .filter_map(|r| r.min_restic_version.as_deref())
            .filter_map(rm_protocol::restic_dist::parse_version)
            .map(|(major, minor, patch)| restic::Version { major, minor, patch })
            .max()
    }

    /// Acts on a heartbeat answer: fetches the config when its revision moved, starts the run-now requests.
    pub fn on_answer(&self, answer: &HeartbeatResponse) {
        self.on_answer_then(answer, |_| {});
    }

    /// [`Backups::on_answer`], calling `between` after the config sync and before the run-now requests start (the
    /// restic install, which depends on the repositories' requirements and must precede the runs).
    pub fn on_answer_then(&self, answer: &HeartbeatResponse, between: impl FnOnce(&Backups)) {
        if let Some(revision) = answer.config_revision {
            if self.inner.applied_revision() != Some(revision) {
                self.inner.sync_config();
            }
        }
        between(self);
        for request in &answer.run_now {
            Backups::run_now(&self.inner, request);
        }
        for task in &answer.restore {
            restore::accept(&self.inner, task);
        }
    }

    /// Starts the thread that keeps one `GET /api/v1/agents/tasks` open (not in `run --once`): run-now, restore and
    /// listing requests arrive at once instead of at the next heartbeat. A server without it (404) leaves them to
    /// heartbeats. With `heartbeat` (what `run` does), run-now and restore requests wake the heartbeat loop instead of
    /// running from here, so the answer's new configuration and restic are applied first; listings run from here.
    pub fn start_task_poll(&self, heartbeat: Option<Arc<Stop>>) {
        let inner = self.inner.clone();
        let spawned =
            std::thread::Builder::new().name("task-poll".into()).spawn(move || restore::poll(&inner, heartbeat));
        if let Err(e) = spawned {
            crate::log(format_args!("cannot start the task long-poll ({e}); tasks arrive with heartbeats"));
        }
    }

    /// A run-now request: recorded as an open operation and accepted on disk (in that order), reported `running`
    /// at once, then run on its own
    /// thread with the same plan and repository rules as scheduled runs.
    fn run_now(inner: &Arc<Inner>, request: &RunNow) {
        if inner.stopping.load(Ordering::SeqCst) {
            return; // not accepted: the server repeats it to the next process
        }
        let id = &request.operation_id;
        if !valid_operation_id(id) {
            crate::log(format_args!(
                "ignoring a run-now request with an invalid operation id {}",
                crate::printable(id)
            ));
            return;
        }
        // The open operation is on disk before the id is accepted: a crash between the two writes leaves an open
        // run-now operation, which the next start reports failed and accepts (so it is neither lost nor run twice).
        let op = {
            let mut accepted = lock(&inner.accepted);
            if accepted.contains(id) {
                return;
            }
            let op = Operation::start(inner, id.clone(), &request.plan, Trigger::RunNow);
            if let Err(e) = accepted.accept(&inner.paths, id) {
                drop(accepted);
                let message = format!("the agent cannot record run-now requests on disk ({e}); not run");
                op.finish(inner, runner::outcome(OperationStatus::Failed, Some(FailureReason::Other), message));
                return;
            }
            op
        };
        if !inner.knows(&request.plan) {
            inner.sync_config();
        }
        if !inner.knows(&request.plan) {
            let message = format!(
                "plan {} is not in this agent's backup config (revision {}); it was removed or does not apply to \
                 this agent",
                request.plan,
                inner.applied_revision().map_or_else(|| "none".to_string(), |r| r.to_string())
            );
            op.finish(inner, runner::outcome(OperationStatus::Failed, Some(FailureReason::Other), message));
            return;
        }
        spawn_run(inner, request.plan.clone(), Trigger::RunNow, Some(op));
    }

    /// Starts the scheduler thread (not in `run --once`).
    pub fn start_scheduler(&self) {
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new().name("scheduler".into()).spawn(move || scheduler_loop(&inner));
        match spawned {
            Ok(handle) => *lock(&self.scheduler) = Some(handle),
            Err(e) => crate::log(format_args!("cannot start the scheduler: {e}")),
        }
    }

    /// Waits until no run is in progress, at most `timeout` (`None`: no limit); true if none is.
    pub fn wait_runs(&self, timeout: Option<Duration>) -> bool {
        let active = lock(&self.inner.active);
        let busy = |n: &mut usize| *n > 0;
        match timeout {
            None => {
                let _idle = self.inner.active_cv.wait_while(active, busy).unwrap_or_else(|p| p.into_inner());
                true
            }
            Some(t) => {
                let (n, _) =
                    self.inner.active_cv.wait_timeout_while(active, t, busy).unwrap_or_else(|p| p.into_inner());
                *n == 0
            }
        }
    }

    /// Sends every queued report, waiting at most `timeout`; the error says how many stay queued.
    pub fn flush(&self, timeout: Duration) -> Result<(), AgentError> {
        self.inner.outbox.flush(&*self.inner.server, Instant::now() + timeout)
    }

    /// Stops: no new runs, running backups cancelled (their `cancelled` reports queued), the outbox flushed for up
    /// to 5 s. What is not delivered stays on disk for the next start.
    pub fn shutdown(&self) {
        let inner = &self.inner;
        if inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        inner.wake_scheduler();
        {
            let mut slots = lock(&inner.slots);
            let mut cancelled = 0;
            for slot in slots.values_mut() {
                for claim in [&mut slot.running, &mut slot.waiting].into_iter().flatten() {
                    claim.cancel(STOPPING);
                    cancelled += 1;
                }
            }
            if cancelled > 0 {
                crate::log(format_args!("stopping: cancelling {cancelled} run(s)"));
            }
        }
        inner.slots_cv.notify_all();
        if !self.wait_runs(Some(SHUTDOWN_RUNS)) {
            crate::log("runs still ending at shutdown; they are reported as interrupted at the next start");
        }
        if let Some(s) = lock(&self.scheduler).take() {
            let _ = s.join();
        }
        self.close();
        match self.flush(SHUTDOWN_FLUSH) {
            Ok(()) => {}
            Err(e) => crate::log(format_args!("at shutdown: {e}")),
        }
    }

    /// Stops the report sender thread (after `run --once` has flushed).
    pub fn close(&self) {
        self.inner.outbox.stop();
        if let Some(s) = lock(&self.sender).take() {
            let _ = s.join();
        }
    }
}

/// `op_` + 32 lowercase hex, as the protocol names operations.
fn valid_operation_id(id: &str) -> bool {
    id.len() == 35 && id.starts_with("op_") && id[3..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn scheduler_loop(inner: &Arc<Inner>) {
    loop {
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let now = Utc::now();
        let mut wait = Duration::from_secs(60);
        if let Some(plans) = inner.plans() {
            let mut schedule = lock(&inner.schedule);
            let changed = schedule.reconcile(&plans, now);
            let due = schedule.take_due(&plans, &inner.agent_id, now, inner.started);
            if changed || !due.is_empty() {
                inner.save_schedule(&schedule);
            }
            if let Some(next) = schedule.next_wake(&plans, &inner.agent_id, now) {
                wait = wait.min((next - now).to_std().unwrap_or(Duration::ZERO));
            }
            drop(schedule);
            for d in due {
                spawn_run(inner, d.plan, d.trigger, None);
            }
        }
        let entries = lock(&inner.config).as_ref().map(maintenance::entries);
        if let Some(entries) = entries {
            let mut state = lock(&inner.maintenance);
            let (due, changed) = state.take_due(&entries, &inner.agent_id, now, inner.started);
            if changed {
                if let Err(e) = store::save_json(&maintenance::state_path(&inner.paths), &*state) {
                    crate::log(format_args!("cannot save the maintenance state: {e}"));
                }
            }
            if let Some(next) = state.schedule.next_wake(&entries, &inner.agent_id, now) {
                wait = wait.min((next - now).to_std().unwrap_or(Duration::ZERO));
            }
            drop(state);
            for (entry, trigger, slot) in due {
                maintenance::spawn(inner, entry, trigger, slot);
            }
        }
        inner.sleep_scheduler(wait);
    }
}

/// `status`: restic, the applied config, each plan's next run and the outbox, as lines.
pub fn status_lines(config_path: &Path, restic_path: Option<&Path>, agent_id: &str) -> Vec<String> {
    let paths = Paths::for_config(config_path);
    let mut lines = Vec::new();
    let managed = crate::update::current_exe().ok().map(|exe| crate::restic_install::managed_path(&exe));
    lines.push(match restic::detect_best(restic_path, managed.as_deref()) {
        Ok(r) => format!("restic: {} ({})", r.version, r.path.display()),
        Err(e) => format!("restic: unavailable ({})", crate::printable(&e)),
    });
    match store::load_config(&paths) {
        Ok(Some(config)) => {
            lines.push(format!("backup config: revision {} ({} plan(s))", config.revision, config.plans.len()));
            let now = Utc::now();
            for plan in &config.plans {
                let next = scheduler::next_run(plan, agent_id, now)
                    .map_or_else(|| "never (invalid schedule)".to_string(), |t| t.to_rfc3339());
                lines.push(format!(
                    "  plan {}: {} → {}, next run {next}",
                    crate::printable(&plan.name),
                    crate::printable(&plan.schedule),
                    crate::printable(&plan.repository)
                ));
            }
            for entry in maintenance::entries(&config) {
                let next = scheduler::next_run(&entry, agent_id, now)
                    .map_or_else(|| "never (invalid schedule)".to_string(), |t| t.to_rfc3339());
                lines.push(format!(
                    "  {} of repository {}: {}, next run {next} (one agent of those using it runs each firing)",
                    entry.kind,
                    crate::printable(&entry.repository),
                    crate::printable(&entry.policy.schedule)
                ));
            }
        }
        Ok(None) => lines.push("backup config: none applied yet".into()),
        Err(e) => lines.push(format!("backup config: unreadable ({e})")),
    }
    lines.push(format!("outbox: {} report(s) waiting", Outbox::count(&paths.outbox())));
    lines
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use rm_protocol::backup::LeaseGranted;

    /// A stand-in for the server: records every report batch (refused ones too), stores reports by id without
    /// overwriting a final status, serves a config, grants leases.
    #[derive(Default)]
    pub(crate) struct FakeServer {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        down: bool,
        batches: Vec<ReportBatch>,
        stored: BTreeMap<String, OperationStatus>,
        /// Report ids the server refuses, with the status it answers.
        refuse: HashMap<String, u16>,
        config: Option<AgentConfigBody>,
        config_fetches: usize,
        /// How many lease requests still answer 409 `repository_busy`.
        busy: u32,
        /// Then how many lease requests still fail, and how: an HTTP status, or 0 for an unreachable server.
        lease_fail: (u32, u16),
        lease_requests: usize,
        /// Maintenance lease requests (after the busy ones) answer `maintenance_done`.
        slot_done: bool,
    }

    impl FakeServer {
        pub(crate) fn down(&self, down: bool) {
            lock(&self.state).down = down;
        }
        pub(crate) fn refuse(&self, id: &str) {
            self.refuse_with(id, 400);
        }
        pub(crate) fn refuse_with(&self, id: &str, status: u16) {
            lock(&self.state).refuse.insert(id.into(), status);
        }
        pub(crate) fn batches(&self) -> Vec<ReportBatch> {
            lock(&self.state).batches.clone()
        }
        pub(crate) fn stored(&self) -> BTreeMap<String, OperationStatus> {
            lock(&self.state).stored.clone()
        }
        pub(crate) fn busy(&self, times: u32) {
            lock(&self.state).busy = times;
        }
        /// The next `times` lease requests (after the busy ones) fail with `status` (0: the server is unreachable).
        pub(crate) fn lease_fail(&self, times: u32, status: u16) {
            lock(&self.state).lease_fail = (times, status);
        }
        pub(crate) fn slot_done(&self, done: bool) {
            lock(&self.state).slot_done = done;
        }
        pub(crate) fn lease_requests(&self) -> usize {
            lock(&self.state).lease_requests
        }
        pub(crate) fn serve(&self, config: AgentConfigBody) {
            lock(&self.state).config = Some(config);
        }
        fn unreachable() -> AgentError {
            AgentError::Network { url: "fake".into(), reason: "down".into() }
        }
    }

    impl Server for FakeServer {
        fn agent_config(&self) -> Result<AgentConfigBody, AgentError> {
            let mut s = lock(&self.state);
            s.config_fetches += 1;
            if s.down {
                return Err(Self::unreachable());
            }
            s.config.clone().ok_or(AgentError::Server { status: 404, code: "not_found".into(), message: "none".into() })
        }
        fn post_reports(&self, batch: &ReportBatch) -> Result<ReportAck, AgentError> {
            let mut s = lock(&self.state);
            s.batches.push(batch.clone());
            if s.down {
                return Err(Self::unreachable());
            }
            if let Some(status) = batch.reports.iter().find_map(|r| s.refuse.get(&r.id)) {
                return Err(AgentError::Server { status: *status, code: "refused".into(), message: "no".into() });
            }
            for r in &batch.reports {
                let entry = s.stored.entry(r.id.clone()).or_insert(r.status);
                if !entry.is_final() {
                    *entry = r.status;
                }
            }
            Ok(ReportAck { accepted: batch.reports.len() })
        }
        fn take_lease(&self, request: &LeaseRequest) -> Result<Lease, AgentError> {
            let mut s = lock(&self.state);
            s.lease_requests += 1;
            if s.down {
                return Err(Self::unreachable());
            }
            if s.busy > 0 {
                s.busy -= 1;
                return Ok(Lease::Busy { retry_after_secs: 1 });
            }
            if s.slot_done && request.maintenance.is_some() {
                return Ok(Lease::Done);
            }
            if s.lease_fail.0 > 0 {
                s.lease_fail.0 -= 1;
                return Err(match s.lease_fail.1 {
                    0 => Self::unreachable(),
                    status => AgentError::Server { status, code: "internal".into(), message: "no".into() },
                });
            }
            Ok(Lease::Granted(LeaseGranted {
                repository: request.repository.clone(),
                operation_id: request.operation_id.clone(),
                expires_at: 0,
                ttl_secs: None,
            }))
        }
        fn release_lease(&self, _: &str, _: &str) -> Result<(), AgentError> {
            Ok(())
        }
    }

    fn config(revision: u64) -> AgentConfigBody {
        AgentConfigBody {
            revision,
            plans: vec![AgentPlan {
                name: "home".into(),
                repository: "local".into(),
                paths: vec!["/home".into()],
                excludes: vec![],
                schedule: "@every 1h".into(),
                timezone: Default::default(),
                tags: vec![],
                one_file_system: false,
                exclude_caches: false,
                timeout_secs: 60,
                jitter_secs: 0,
                retention: None,
            }],
            repositories: vec![AgentRepository {
                name: "local".into(),
                url: "/nonexistent/repo".into(),
                password: "secret".into(),
                env: BTreeMap::new(),
                ca_cert: None,
                auto_init: false,
                min_restic_version: None,
                prune: None,
                check: None,
            }],
        }
    }

    fn answer(revision: Option<u64>, run_now: &[(&str, &str)]) -> HeartbeatResponse {
        HeartbeatResponse {
            protocol: 1,
            agent_id: "agent-1".into(),
            heartbeat_interval_secs: 30,
            server: None,
            update: None,
            config_revision: revision,
            run_now: run_now
                .iter()
                .map(|(id, plan)| RunNow { operation_id: id.to_string(), plan: plan.to_string() })
                .collect(),
            restore: Vec::new(),
            restic: None,
        }
    }

    pub(crate) fn start(dir: &Path, server: &Arc<FakeServer>) -> Backups {
        let settings = Settings {
            config_path: dir.join("agent.json"),
            agent_id: "agent-1".into(),
            hostname: "host".into(),
            // Never a real restic: these tests are about bookkeeping, whatever restic the machine has.
            restic: Some(dir.join("no-such-restic")),
            managed_restic: None,
            state_dir: None,
        };
        Backups::start(server.clone(), settings).unwrap()
    }

    /// [`start`] with a fake restic: `backup` waits for `<dir>/go` when `<dir>/wait` exists, then exits with the code
    /// in `<dir>/backup-code` (0, 1, 3 or 130); `snapshots` lists none; `forget` lists one snapshot of plan home on
    /// host `host` kept. Every command's first word goes to `<dir>/calls`.
    #[cfg(unix)]
    fn start_with_fake_restic(dir: &Path, server: &Arc<FakeServer>) -> Backups {
        use std::os::unix::fs::PermissionsExt;
        let d = dir.display();
        let kept = r#"[{"host":"host","keep":[{"id":"aaaa","short_id":"aaaa","time":"2026-12-02T10:00:00Z","hostname":"host","tags":["rm-plan:home"]}],"remove":null,"reasons":[]}]"#;
        let script = format!(
            "#!/bin/sh\necho \"$1\" >> '{d}/calls'\ncase \"$1\" in\n  version) echo 'restic 0.14.0 compiled with go1.19 \
             on linux/amd64' ;;\n  backup) if [ -e '{d}/wait' ]; then while [ ! -e '{d}/go' ]; do sleep 0.05; done; fi\n    \
             exit $(cat '{d}/backup-code') ;;\n  snapshots) echo '[]' ;;\n  forget) echo '{kept}' ;;\nesac\nexit 0\n"
        );
        let path = dir.join("fake-restic");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let settings = Settings {
            config_path: dir.join("agent.json"),
            agent_id: "agent-1".into(),
            hostname: "host".into(),
            restic: Some(path),
            state_dir: None,
            managed_restic: None,
        };
        Backups::start(server.clone(), settings).unwrap()
    }

    fn with_retention(revision: u64, retention: Option<rm_protocol::retention::Retention>) -> AgentConfigBody {
        let mut c = config(revision);
        c.plans[0].retention = retention;
        c
    }

    /// Runs plan home now (its backup exiting with `code`) and returns the final reports: (kind, status) in order,
    /// and the restic commands run.
    #[cfg(unix)]
    fn run_home(code: i32, during: impl FnOnce(&Backups)) -> (Vec<(OperationKind, OperationStatus)>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("backup-code"), code.to_string()).unwrap();
        std::fs::write(dir.path().join("wait"), "").unwrap();
        let server = Arc::new(FakeServer::default());
        let keep3 = rm_protocol::retention::Retention { last: Some(3), ..Default::default() };
        server.serve(with_retention(1, Some(keep3)));
        let backups = start_with_fake_restic(dir.path(), &server);
        backups.on_answer(&answer(Some(1), &[(OP1, "home")]));
        let calls = || std::fs::read_to_string(dir.path().join("calls")).unwrap_or_default();
        let started = Instant::now();
        while !calls().contains("backup") {
            assert!(started.elapsed() < Duration::from_secs(20), "the backup never started: {}", calls());
            std::thread::sleep(Duration::from_millis(20));
        }
        during(&backups);
        std::fs::write(dir.path().join("go"), "").unwrap();
        assert!(backups.wait_runs(Some(Duration::from_secs(20))));
        backups.flush(Duration::from_secs(5)).unwrap();
        backups.close();
        let finals = server
            .batches()
            .iter()
            .flat_map(|b| b.reports.clone())
            .filter(|r| r.status.is_final())
            .map(|r| (r.kind, r.status))
            .collect();
        (finals, calls().lines().map(str::to_owned).collect())
    }

    #[cfg(unix)]
    #[test]
    fn forget_follows_only_backups_that_made_a_snapshot_with_the_policy_as_it_is_then() {
        use OperationKind::{Backup, Forget};
        use OperationStatus::{Cancelled, Failed, Success, Warning};
        let (finals, calls) = run_home(0, |_| {});
        assert_eq!(finals, [(Backup, Success), (Forget, Success)], "{calls:?}");
        assert_eq!(calls.iter().filter(|c| *c == "forget").count(), 2, "the dry run and the forget: {calls:?}");
        // A warning backup made a snapshot: forget runs.
        let (finals, _) = run_home(3, |_| {});
        assert_eq!(finals, [(Backup, Warning), (Forget, Success)]);
        // A failed or cancelled backup: no forget.
        for (code, status) in [(1, Failed), (130, Cancelled)] {
            let (finals, calls) = run_home(code, |_| {});
            assert_eq!(finals, [(Backup, status)], "exit {code}");
            assert!(!calls.iter().any(|c| c == "forget"), "exit {code}: {calls:?}");
        }
        // Only the policy changed while the backup ran: the backup goes on, and forget uses the new policy; the
        // policy removed meanwhile: no forget.
        let daily = rm_protocol::retention::Retention { daily: Some(7), ..Default::default() };
        let (finals, _) = run_home(0, |b| b.inner.apply(with_retention(2, Some(daily)), false));
        assert_eq!(finals, [(Backup, Success), (Forget, Success)], "a policy change does not cancel the backup");
        let (finals, calls) = run_home(0, |b| b.inner.apply(with_retention(2, None), false));
        assert_eq!(finals, [(Backup, Success)], "the policy was removed: {calls:?}");
        assert!(!calls.iter().any(|c| c == "forget"));
        // Anything else changed: the running backup is cancelled as before, and no forget follows.
        let mut moved =
            with_retention(2, Some(rm_protocol::retention::Retention { last: Some(1), ..Default::default() }));
        moved.plans[0].paths = vec!["/elsewhere".into()];
        let cancelled = std::cell::Cell::new(false);
        let (finals, calls) = run_home(0, |b| {
            b.inner.apply(moved, false);
            cancelled.set(b.inner.cancel_reason("home", OP1).is_some_and(|w| w.contains("changed")));
        });
        assert!(cancelled.get(), "a change of the paths cancels the running backup");
        // (This fake backup outlives the interrupt and exits 0; whatever the backup's ending, no forget follows a
        // cancelled run, not even a cancelled one.)
        assert_eq!(finals.len(), 1, "{finals:?} {calls:?}");
        assert_eq!(finals[0].0, Backup);
        assert!(!calls.iter().any(|c| c == "forget"), "{calls:?}");
    }

    #[test]
    fn a_saved_config_keeps_policy_options_this_agent_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        let mut newer = config(5);
        newer.plans[0].retention =
            Some(serde_json::from_str(r#"{"last":3,"keep_size":"10G"}"#).expect("agents read newer policies"));
        server.serve(newer);
        let backups = start(dir.path(), &server);
        backups.on_answer(&answer(Some(5), &[]));
        backups.close();
        let text = std::fs::read_to_string(dir.path().join("backup-config.json")).unwrap();
        assert!(text.contains("keep_size"), "{text}");
        let saved = store::load_config(&Paths::for_config(&dir.path().join("agent.json"))).unwrap().unwrap();
        let policy = saved.plans[0].retention.clone().unwrap();
        assert!(policy.check_known().unwrap_err().contains("keep_size"), "a restarted agent still refuses to forget");
    }

    #[test]
    fn a_forget_interrupted_by_a_kill_is_not_taken_for_an_accepted_run_now() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::for_config(&dir.path().join("agent.json"));
        let mut open = OpenOperations::default();
        let mut forget = runner::report(OP2, "home", Trigger::RunNow, 5);
        forget.kind = OperationKind::Forget;
        open.operations.insert(OP2.into(), forget);
        open.operations.insert(OP1.into(), runner::report(OP1, "home", Trigger::RunNow, 5));
        store::save_json(&paths.open_operations(), &open).unwrap();
        let server = Arc::new(FakeServer::default());
        let backups = start(dir.path(), &server);
        let accepted = Accepted::load(&paths).unwrap();
        assert!(accepted.contains(OP1), "the backup's run-now id is recorded");
        assert!(!accepted.contains(OP2), "the forget's own id is not a run-now request");
        backups.flush(Duration::from_secs(5)).unwrap();
        backups.close();
        assert_eq!(server.stored()[OP2], OperationStatus::Failed, "both reported");
        assert_eq!(server.stored()[OP1], OperationStatus::Failed);
    }

    const OP1: &str = "op_0123456789abcdef0123456789abcdef";
    const OP2: &str = "op_fedcba9876543210fedcba9876543210";

    #[test]
    fn config_is_synced_saved_and_run_now_runs_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        server.serve(config(3));
        let backups = start(dir.path(), &server);
        assert_eq!(backups.heartbeat_fields().1, None, "no config applied yet");
        backups.on_answer(&answer(Some(3), &[(OP1, "home")]));
        assert_eq!(backups.heartbeat_fields().1, Some(3));
        let info = backups.heartbeat_fields().0.unwrap();
        assert!(info.error.is_some() && info.version.is_none(), "{info:?}");
        let saved = store::load_config(&Paths::for_config(&dir.path().join("agent.json"))).unwrap().unwrap();
        assert_eq!(saved, config(3));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("backup-config.json")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(backups.wait_runs(Some(Duration::from_secs(20))));
        backups.flush(Duration::from_secs(5)).unwrap();
        backups.close();
        let first = server.batches().len();
        assert_eq!(server.stored()[OP1], OperationStatus::Failed, "no restic here: failed, reported");
        let sent: Vec<_> = server.batches().iter().flat_map(|b| b.reports.clone()).filter(|r| r.id == OP1).collect();
        let last = sent.last().unwrap();
        assert_eq!(last.reason, Some(FailureReason::ResticUnavailable));
        assert_eq!(last.trigger, Trigger::RunNow);
        assert!(last.finished_at.is_some() && last.duration_ms.is_some());
        drop(backups);

        // The restarted agent gets the same request again (the server repeats until it sees the report): ignored.
        let restarted = start(dir.path(), &server);
        assert_eq!(restarted.heartbeat_fields().1, Some(3), "the saved config is applied at start");
        restarted.on_answer(&answer(Some(3), &[(OP1, "home")]));
        assert!(restarted.wait_runs(Some(Duration::from_secs(20))));
        restarted.flush(Duration::from_secs(5)).unwrap();
        restarted.close();
        let again: usize = server.batches()[first..].iter().flat_map(|b| &b.reports).filter(|r| r.id == OP1).count();
        assert_eq!(again, 0, "not run again");
    }

    #[test]
    fn an_unknown_plan_fails_clearly_after_a_config_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        server.serve(config(1));
        let backups = start(dir.path(), &server);
        backups.on_answer(&answer(Some(1), &[(OP2, "nope")]));
        backups.flush(Duration::from_secs(5)).unwrap();
        backups.close();
        let reports: Vec<_> = server.batches().iter().flat_map(|b| b.reports.clone()).collect();
        let last = reports.iter().rev().find(|r| r.id == OP2).unwrap();
        assert_eq!(last.status, OperationStatus::Failed);
        assert!(last.message.as_deref().unwrap().contains("plan nope is not in this agent's backup config"));
        assert_eq!(lock(&server.state).config_fetches, 2, "fetched once more before giving up");
    }

    #[test]
    fn a_run_interrupted_by_a_kill_is_reported_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::for_config(&dir.path().join("agent.json"));
        let mut open = OpenOperations::default();
        open.operations.insert(OP1.into(), runner::report(OP1, "home", Trigger::Schedule, 5));
        store::save_json(&paths.open_operations(), &open).unwrap();
        let server = Arc::new(FakeServer::default());
        server.down(true);
        let backups = start(dir.path(), &server);
        assert_eq!(Outbox::count(&paths.outbox()), 1, "queued on disk before anything else");
        server.down(false);
        backups.flush(Duration::from_secs(5)).unwrap();
        backups.close();
        assert_eq!(server.stored()[OP1], OperationStatus::Failed);
        let left: OpenOperations = store::load_json(&paths.open_operations()).unwrap().unwrap();
        assert!(left.operations.is_empty());
    }

    #[test]
    fn a_run_now_interrupted_before_it_was_accepted_is_reported_once_and_not_run_again() {
        // A crash after the open operation was recorded and before run-now.json was written.
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::for_config(&dir.path().join("agent.json"));
        let mut open = OpenOperations::default();
        open.operations.insert(OP1.into(), runner::report(OP1, "home", Trigger::RunNow, 5));
        store::save_json(&paths.open_operations(), &open).unwrap();
        assert!(!paths.run_now().exists());
        let server = Arc::new(FakeServer::default());
        server.serve(config(1));
        let backups = start(dir.path(), &server);
        assert!(Accepted::load(&paths).unwrap().contains(OP1), "accepted at start");
        // The server repeats the request until it has the report: not run again.
        backups.on_answer(&answer(Some(1), &[(OP1, "home")]));
        assert!(backups.wait_runs(Some(Duration::from_secs(20))));
        backups.flush(Duration::from_secs(5)).unwrap();
        backups.close();
        assert_eq!(server.stored()[OP1], OperationStatus::Failed);
        let reports: Vec<_> = server.batches().iter().flat_map(|b| b.reports.clone()).filter(|r| r.id == OP1).collect();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0].message.as_deref().unwrap().contains("the agent stopped before this run finished"));
    }

    #[test]
    fn a_run_now_is_recorded_open_before_it_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::for_config(&dir.path().join("agent.json"));
        // run-now.json cannot be written (a directory is in its place).
        std::fs::create_dir(paths.run_now()).unwrap();
        let server = Arc::new(FakeServer::default());
        server.serve(config(1));
        let backups = start(dir.path(), &server);
        backups.on_answer(&answer(Some(1), &[(OP1, "home")]));
        assert!(backups.wait_runs(Some(Duration::from_secs(20))));
        backups.flush(Duration::from_secs(5)).unwrap();
        backups.close();
        // Not lost: the server hears it failed, and nothing is left open.
        assert_eq!(server.stored()[OP1], OperationStatus::Failed);
        let last = server.batches().iter().flat_map(|b| b.reports.clone()).rfind(|r| r.id == OP1).unwrap();
        assert!(last.message.as_deref().unwrap().contains("cannot record run-now requests"), "{last:?}");
        let left: OpenOperations = store::load_json(&paths.open_operations()).unwrap().unwrap();
        assert!(left.operations.is_empty());
    }

    #[test]
    fn shutdown_is_prompt_and_the_stop_wakes_sleepers() {
        let stop = Arc::new(Stop::default());
        let s = stop.clone();
        let t = std::thread::spawn(move || s.wait(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        stop.stop();
        assert!(t.join().unwrap());
        assert!(started.elapsed() < Duration::from_secs(1));

        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        server.serve(config(1));
        let backups = start(dir.path(), &server);
        backups.on_answer(&answer(Some(1), &[]));
        backups.start_scheduler();
        let started = Instant::now();
        backups.shutdown();
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[test]
    fn a_changed_or_removed_plan_cancels_its_run_and_busy_plans_are_not_stacked() {
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(FakeServer::default());
        let backups = start(dir.path(), &server);
        let inner = &backups.inner;
        inner.apply(config(1), false);
        let cancel = Cancel::default();
        assert!(matches!(inner.claim("home", OP1, &cancel, false), Claimed::Run));
        assert!(inner.snapshot_plan("home", OP1).is_some());
        // A scheduled firing while the plan runs is skipped, not queued.
        assert!(matches!(inner.claim("home", "op_other", &Cancel::default(), false), Claimed::Busy(id) if id == OP1));
        // Another plan added: this run goes on.
        let mut more = config(2);
        let mut other = more.plans[0].clone();
        other.name = "other".into();
        more.plans.push(other);
        inner.apply(more.clone(), false);
        assert!(!cancel.is_cancelled());
        // Its repository's password changed: cancelled, and the report will say why.
        let mut changed = more.clone();
        changed.revision = 3;
        changed.repositories[0].password = "new".into();
        inner.apply(changed, false);
        assert!(cancel.is_cancelled());
        assert!(inner.cancel_reason("home", OP1).unwrap().contains("changed"));
        inner.release("home", OP1);

        // A run-now waits for the running plan; removing the plan cancels the waiter.
        let running = Cancel::default();
        assert!(matches!(inner.claim("other", OP1, &running, false), Claimed::Run));
        inner.snapshot_plan("other", OP1).unwrap();
        let waiter = {
            let inner = inner.clone();
            std::thread::spawn(move || match inner.claim("other", OP2, &Cancel::default(), true) {
                Claimed::Cancelled(why) => why,
                _ => "not cancelled".into(),
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(inner.claim("other", "op_third", &Cancel::default(), true), Claimed::Busy(id) if id == OP2));
        inner.apply(config(4), false);
        assert!(running.is_cancelled());
        assert!(waiter.join().unwrap().contains("removed"));
    }

    #[test]
    fn one_run_per_repository_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let backups = start(dir.path(), &Arc::new(FakeServer::default()));
        let inner = backups.inner.clone();
        assert!(inner.lock_repository("r", &Cancel::default()));
        assert!(inner.lock_repository("s", &Cancel::default()), "other repositories run in parallel");
        let second = {
            let inner = inner.clone();
            std::thread::spawn(move || {
                let got = inner.lock_repository("r", &Cancel::default());
                (got, Instant::now())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let released = Instant::now();
        inner.unlock_repository("r");
        let (got, at) = second.join().unwrap();
        assert!(got && at >= released, "the second run started only after the first released the repository");
        // A waiter that is cancelled gives up.
        let cancel = Cancel::default();
        let waiter = {
            let (inner, cancel) = (inner.clone(), cancel.clone());
            std::thread::spawn(move || inner.lock_repository("r", &cancel))
        };
        std::thread::sleep(Duration::from_millis(100));
        cancel.cancel();
        assert!(!waiter.join().unwrap());
    }

    #[test]
    fn the_state_directory_comes_from_systemd() {
        assert_eq!(state_dir_from(None), None);
        assert_eq!(state_dir_from(Some("".into())), None);
        assert_eq!(state_dir_from(Some("/var/lib/restic-manager".into())), Some("/var/lib/restic-manager".into()));
        #[cfg(unix)]
        assert_eq!(state_dir_from(Some("/var/lib/a:/var/lib/b".into())), Some("/var/lib/a".into()));
        let dir = tempfile::tempdir().unwrap();
        let backups = start(dir.path(), &Arc::new(FakeServer::default()));
        assert_eq!(backups.inner.state_dir, dir.path(), "without it: the config's directory");
    }

    #[test]
    fn secret_files_a_killed_agent_left_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        for d in [&state, dir.path()] {
            std::fs::create_dir_all(d.join("tmp")).unwrap();
            std::fs::write(d.join("tmp/restic-secret-left"), "hunter2").unwrap();
        }
        let server = Arc::new(FakeServer::default());
        let settings = Settings {
            config_path: dir.path().join("agent.json"),
            agent_id: "agent-1".into(),
            hostname: "host".into(),
            restic: Some(dir.path().join("no-such-restic")),
            managed_restic: None,
            state_dir: Some(state.clone()),
        };
        let backups = Backups::start(server, settings).unwrap();
        assert_eq!(backups.inner.state_dir, state);
        assert!(!state.join("tmp/restic-secret-left").exists());
        assert!(!dir.path().join("tmp/restic-secret-left").exists(), "also where an older agent kept them");
        backups.close();
    }

    #[test]
    fn operation_ids_are_checked() {
        assert!(valid_operation_id(OP1));
        assert!(valid_operation_id(&store::new_operation_id()));
        for bad in ["op_", "op_0123456789ABCDEF0123456789abcdef", "xx_0123456789abcdef0123456789abcdef", "../etc"] {
            assert!(!valid_operation_id(bad), "{bad}");
        }
    }
}
