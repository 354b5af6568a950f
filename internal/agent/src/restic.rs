//! Running the host's restic: finding it and its version, one backup with `--json` (progress, summary, errors,
//! exit codes), `init` when the repository is missing and the plan allows it, and the plan's snapshots afterwards.
//!
//! * `output`: restic's words and JSON lines, parsed without trusting them; exit codes and messages → endings.
//! * [`restore`]: `restic restore` and `restic ls` for the server's restore and listing tasks.
//! * `maintenance`: `prune` and `check` (text output: prune's figures, check's errors).
//! * `process`: the child process: environment without inherited `RESTIC_*`, 0600 secret files, pipes read on
//!   threads, SIGINT-then-kill on cancel or timeout, SIGINT when the agent dies (Linux).

mod maintenance;
mod output;
mod process;
pub mod restore;

pub use maintenance::{MaintenanceJob, maintain};

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use output::{Ending, Line};
use process::{Stop, Stream};

use rm_protocol::backup::{
    AgentPlan, AgentRepository, BackupSummary, FailureReason, OperationStatus, Progress, ResticInfo, Snapshot,
};
use rm_protocol::retention::{ForgetSummary, MAX_REMOVED_IDS, Retention};

/// The oldest restic the agent supports (Debian bookworm's).
pub const MIN_VERSION: Version = Version { major: 0, minor: 14, patch: 0 };

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A usable restic: its executable and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restic {
    pub path: PathBuf,
    pub version: Version,
}

/// How long `restic version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds restic (`explicit`, else `restic` on `PATH`), runs `restic version` and checks it is at least
/// [`MIN_VERSION`]. The error says in words what is wrong (not found, not runnable, too old).
pub fn detect(explicit: Option<&Path>) -> Result<Restic, String> {
    let path = match explicit {
        Some(path) => check_explicit(path)?,
        None => find_on_path()?,
    };
    let version = run_version(&path)?;
    if version < MIN_VERSION {
        return Err(format!(
            "restic {version} at {} is too old: restic-manager needs restic {MIN_VERSION} or newer",
            path.display()
        ));
    }
    Ok(Restic { path, version })
}

/// The executable's file name: `restic`, on Windows `restic.exe`.
const EXE_NAME: &str = if cfg!(windows) { "restic.exe" } else { "restic" };

fn check_explicit(path: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("restic not found at {} (the --restic path)", path.display()),
        _ => format!("cannot use restic at {}: {e}", path.display()),
    })?;
    if meta.is_dir() {
        return Err(format!("{} is a directory, not the restic executable (the --restic path)", path.display()));
    }
    if !is_executable(&meta) {
        return Err(format!("{} is not executable (no execute permission); chmod +x it", path.display()));
    }
    Ok(path.to_path_buf())
}

fn find_on_path() -> Result<PathBuf, String> {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    let mut not_executable = None;
    for dir in std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()) {
        let candidate = dir.join(EXE_NAME);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() && is_executable(&meta) => return Ok(candidate),
            Ok(meta) if meta.is_file() => {
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    Err(match not_executable {
        Some(found) => format!("found {} on PATH, but it is not executable (no execute permission)", found.display()),
        None => format!(
            "restic is not installed: no {EXE_NAME} in any directory of PATH; install restic {MIN_VERSION} or newer, \
             or give its path with --restic"
        ),
    })
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &std::fs::Metadata) -> bool {
    true
}

/// Why restic could not be started, in words.
fn spawn_error(path: &Path, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!("restic not found at {} (is it still installed?)", path.display()),
        std::io::ErrorKind::PermissionDenied => {
            format!("cannot run restic at {}: not executable (permission denied)", path.display())
        }
        _ => format!("cannot run restic at {}: {e}", path.display()),
    }
}

fn run_version(path: &Path) -> Result<Version, String> {
    let cmd = process::command(path, &["version".into()], &[]);
    let mut stdout = String::new();
    let mut tail = output::Tail::default();
    let deadline = Instant::now().checked_add(VERSION_TIMEOUT);
    let exit = process::run(cmd, &Cancel::default(), deadline, 4096, &mut |stream, line| match stream {
        Stream::Stdout if stdout.len() < 16 * 1024 => {
            stdout.push_str(&line);
            stdout.push('\n');
        }
        _ => tail.push(&line),
    })
    .map_err(|e| spawn_error(path, &e))?;
    if exit.stopped.is_some() {
        return Err(format!(
            "{} did not answer `restic version` within {} s",
            path.display(),
            VERSION_TIMEOUT.as_secs()
        ));
    }
    if exit.code != Some(0) {
        let said = tail.message().map(|m| format!(": {m}")).unwrap_or_default();
        return Err(format!("`{} version` failed ({}){said}", path.display(), ended(&exit)));
    }
    output::parse_version(&stdout).ok_or_else(|| {
        let first = stdout.lines().find(|l| !l.trim().is_empty()).unwrap_or("nothing");
        let first: String = crate::printable(first).chars().take(200).collect();
        format!("{} does not look like restic: `restic version` printed {first:?}", path.display())
    })
}

/// "exit code 1", "killed by signal 9".
fn ended(exit: &process::Exit) -> String {
    match (exit.code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "no exit code".to_string(),
    }
}

/// Finds the best restic: `explicit` (`--restic`) always wins; otherwise the newer of `restic` on `PATH` and the
/// agent's managed restic at `managed` (installed from the server; PATH's on a tie, so a host's own restic is used
/// while it is as good).
pub fn detect_best(explicit: Option<&Path>, managed: Option<&Path>) -> Result<Restic, String> {
    best_of(explicit, managed, || detect(None))
}

/// [`detect_best`] with `on_path` finding `PATH`'s restic (the tests give their own).
fn best_of(
    explicit: Option<&Path>,
    managed: Option<&Path>,
    on_path: impl FnOnce() -> Result<Restic, String>,
) -> Result<Restic, String> {
    let Some(managed) = managed.filter(|_| explicit.is_none()) else { return detect(explicit) };
    let host = on_path();
    if !managed.exists() {
        return host;
    }
    match (host, detect(Some(managed))) {
        (Ok(host), Ok(mine)) => Ok(if mine.version > host.version { mine } else { host }),
        (Ok(host), Err(_)) => Ok(host),
        (Err(_), Ok(mine)) => Ok(mine),
        (Err(host), Err(mine)) => Err(format!("{host}; the managed restic: {mine}")),
    }
}

/// Parses `restic version` output (`restic 0.14.0 compiled with …`).
pub fn parse_version_output(text: &str) -> Option<Version> {
    output::parse_version(text)
}

/// What heartbeats say about the host's restic.
pub fn info(detected: &Result<Restic, String>) -> ResticInfo {
    info_managed(detected, None)
}

/// [`info`], saying whether the restic found is the agent's managed one (at `managed`).
pub fn info_managed(detected: &Result<Restic, String>, managed: Option<&Path>) -> ResticInfo {
    match detected {
        Ok(r) => ResticInfo {
            version: Some(r.version.to_string()),
            path: Some(r.path.display().to_string()),
            managed: managed.is_some_and(|m| m == r.path),
            ..ResticInfo::default()
        },
        Err(e) => ResticInfo { error: Some(e.clone()), ..ResticInfo::default() },
    }
}

/// Stops a running backup: set by config removal or agent shutdown. restic gets SIGINT (Windows: is killed), and is
/// killed if it has not exited within a grace period; the outcome is `cancelled`.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One backup to run.
pub struct Job<'a> {
    pub plan: &'a AgentPlan,
    pub repository: &'a AgentRepository,
    /// `--host`: this machine's hostname as the agent read it when it started (`gethostname`, sanitised), which is
    /// also what it reports to the server; not a name fixed at enrolment.
    pub hostname: &'a str,
    /// The agent's state directory: restic's cache (`restic-cache/`) and the short-lived 0600 password and CA files
    /// live under it.
    pub state_dir: &'a Path,
    pub cancel: Cancel,
    /// After this long restic is stopped as for a cancel, and the outcome is `failed` with reason `timeout`.
    pub timeout: Duration,
}

/// How a backup ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `success`, `warning`, `failed` or `cancelled`.
    pub status: OperationStatus,
    pub summary: Option<BackupSummary>,
    pub message: Option<String>,
    pub reason: Option<FailureReason>,
    pub exit_code: Option<i32>,
    /// After a success or warning: the plan's snapshots on this host, the newest [`REPORT_SNAPSHOTS_MAX`], newest
    /// first (`None` if listing them failed). After a forget: the ones it kept.
    pub snapshots: Option<Vec<Snapshot>>,
    /// A forget's counts and removed ids.
    pub forget: Option<ForgetSummary>,
}

impl Outcome {
    fn failed(reason: FailureReason, message: String, exit_code: Option<i32>) -> Outcome {
        Outcome {
            status: OperationStatus::Failed,
            summary: None,
            message: Some(message),
            reason: Some(reason),
            exit_code,
            snapshots: None,
            forget: None,
        }
    }

    fn cancelled(message: String, exit_code: Option<i32>) -> Outcome {
        Outcome {
            status: OperationStatus::Cancelled,
            summary: None,
            message: Some(message),
            reason: None,
            exit_code,
            snapshots: None,
            forget: None,
        }
    }
}

/// Removes the 0600 secret files (password, CA certificate) a killed agent left under `<state_dir>/tmp`.
/// `Backups::start` calls it once, before any backup runs (it would remove a running backup's files); on Linux a
/// restic the killed agent started cannot still be reading them, as it got SIGINT when the agent died. Returns how
/// many it removed.
pub fn remove_stale_secrets(state_dir: &Path) -> std::io::Result<usize> {
    process::remove_stale(state_dir)
}

/// Runs one backup of `job.plan` into `job.repository`, calling `on_progress` for each restic `status` line
/// (unthrottled: the caller throttles what it sends). Never panics on restic's output; every way it can end is an
/// [`Outcome`].
///
/// When restic says the repository is missing and the repository has `auto_init`, `restic init` runs and the
/// backup is tried once more; when restic says the repository is locked, `restic unlock` (which removes only stale
/// locks) runs and the backup is tried once more. `job.timeout` bounds all of it. After a success or warning the
/// plan's snapshots on this host are listed, and the summary's snapshot id (short in restic 0.14) is completed to the
/// full id from that list.
pub fn backup(restic: &Restic, job: &Job<'_>, on_progress: &mut dyn FnMut(&Progress)) -> Outcome {
    if job.cancel.is_cancelled() {
        return Outcome::cancelled("cancelled before restic started".into(), None);
    }
    let deadline = Instant::now().checked_add(job.timeout);
    match Runner::new(restic, job, deadline) {
        Ok(runner) => runner.backup(on_progress),
        Err(message) => Outcome::failed(FailureReason::Other, message, None),
    }
}

/// Applies the plan's retention policy: `restic forget --json` for this host's snapshots of this plan only
/// ([`forget_filter_args`]: `--host`, the plan tag, and `--group-by host` so they form one group whatever their paths
/// and extra tags), with the policy's keep flags, never `--prune`.
///
/// Refused before restic runs: a policy with options this agent does not know (it would keep less than asked) or that
/// fails validation (stored before a check existed), and a plan whose own tags include a plan tag (its snapshots
/// carry another plan's tag). Then `forget --dry-run` first: only when every snapshot it lists is this host's and
/// carries exactly this plan's tag (no other `rm-plan:` tag) does the real forget run, and its result is checked the
/// same way. A forget that prints no group (no snapshot matched, or a policy restic 0.14 ignores) fails and never
/// replaces the server's snapshot list. A locked repository gets one `restic unlock` (stale locks only) and one more
/// try. A success carries the [`ForgetSummary`] and, as `snapshots`, the ones restic kept (the plan's snapshots on
/// this host now). `job.timeout` bounds it all.
pub fn forget(restic: &Restic, job: &Job<'_>) -> Outcome {
    let Some(retention) = job.plan.retention.as_ref().filter(|r| !r.keeps_nothing()) else {
        // Never run forget without a keep option: restic would refuse, and a future one might remove everything.
        return Outcome::failed(FailureReason::Other, "the plan has no retention policy to apply".into(), None);
    };
    if let Err(e) = retention.check_known() {
        return Outcome::failed(FailureReason::Other, format!("forget not run: {e}"), None);
    }
    let prefix = rm_protocol::backup::PLAN_TAG_PREFIX;
    if let Some(tag) = job.plan.tags.iter().find(|t| t.starts_with(prefix)) {
        let message = format!(
            "forget not run: the plan's tags include {:?}; {prefix}… tags are restic-manager's own, and snapshots \
             carrying another plan's tag could be forgotten by that plan's retention. Remove the tag from the plan",
            crate::printable(tag)
        );
        return Outcome::failed(FailureReason::Other, message, None);
    }
    if job.cancel.is_cancelled() {
        return Outcome::cancelled("cancelled before restic started".into(), None);
    }
    let deadline = Instant::now().checked_add(job.timeout);
    match Runner::new(restic, job, deadline) {
        Ok(runner) => runner.forget(retention),
        Err(message) => Outcome::failed(FailureReason::Other, message, None),
    }
}

/// What selects the snapshots a forget may touch: this host (`--host`), this plan (its `rm-plan:` tag), all of them
/// one group (`--group-by host`: the host is fixed by the filter, so paths or extra tags that changed over time do not
/// split them into groups that would each keep their own).
pub fn forget_filter_args(hostname: &str, plan: &str) -> Vec<OsString> {
    vec![
        "--json".into(),
        flag("--host=", hostname.as_ref()),
        flag("--tag=", rm_protocol::backup::plan_tag(plan).as_ref()),
        "--group-by=host".into(),
    ]
}

/// This host's snapshot of this plan: made under `hostname`, and its only plan tag (`rm-plan:…`) is `tag`.
fn is_own_snapshot(s: &Snapshot, hostname: &str, tag: &str) -> bool {
    let mut plan_tags = s.tags.iter().filter(|t| t.starts_with(rm_protocol::backup::PLAN_TAG_PREFIX)).peekable();
    s.hostname == hostname && plan_tags.peek().is_some() && plan_tags.all(|t| t == tag)
}

/// Outputs kept per line: `status` lines with many `current_files` are the longest restic prints.
const MAX_LINE: usize = 256 * 1024;
/// `snapshots --json` prints one line for all snapshots.
const MAX_SNAPSHOTS_OUTPUT: usize = 64 * 1024 * 1024;

/// Repository variables that would contradict the repository's own URL and password.
const RESERVED_ENV: &[&str] = &[
    "RESTIC_REPOSITORY",
    "RESTIC_REPOSITORY_FILE",
    "RESTIC_PASSWORD",
    "RESTIC_PASSWORD_FILE",
    "RESTIC_PASSWORD_COMMAND",
];

/// One job's restic invocations: shared environment, global flags and secret files (removed when dropped).
struct Runner<'a> {
    restic: &'a Restic,
    job: &'a Job<'a>,
    deadline: Option<Instant>,
    env: Vec<(OsString, OsString)>,
    /// `--cache-dir=…` and `--cacert=…`, given to every command.
    global: Vec<OsString>,
    _password: process::SecretFile,
    _cacert: Option<process::SecretFile>,
    /// How often this run waited for a lock another live run holds ([`Runner::wait_for_lock`]).
    lock_waits: std::cell::Cell<u32>,
}

/// What a run notes after `restic unlock`.
pub(crate) const UNLOCKED: &str = "the repository was locked; ran restic unlock (stale locks only)";

/// Adds `text` to a run's notes once.
pub(crate) fn note(notes: &mut Vec<String>, text: &str) {
    if !notes.iter().any(|n| n == text) {
        notes.push(text.to_string());
    }
}

/// The first wait for another run's repository lock; each further one doubles, up to [`LOCK_WAIT_MAX`].
const LOCK_WAIT_FIRST: Duration = Duration::from_secs(5);
const LOCK_WAIT_MAX: Duration = Duration::from_secs(60);
/// A run without a deadline waits for a lock at most this many times.
const LOCK_WAITS_UNBOUNDED: u32 = 120;

/// restic could not be started: why, in words.
struct Unavailable(String);

impl From<Unavailable> for Outcome {
    fn from(Unavailable(message): Unavailable) -> Outcome {
        Outcome::failed(FailureReason::ResticUnavailable, message, None)
    }
}

/// One restic run, read.
struct Run {
    exit: process::Exit,
    tail: output::Tail,
    summary: Option<BackupSummary>,
}

/// What a run came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Restic(Ending),
    Stopped(Stop),
}

impl Run {
    fn end(&self) -> End {
        match (self.exit.code, self.exit.stopped) {
            // restic finished just as it was stopped: what it made counts.
            (Some(0 | 3), _) | (_, None) => End::Restic(output::classify(self.exit.code, &self.tail.words())),
            (_, Some(stop)) => End::Stopped(stop),
        }
    }

    fn message_or(&self, fallback: impl FnOnce() -> String) -> String {
        self.tail.message().unwrap_or_else(fallback)
    }
}

impl<'a> Runner<'a> {
    fn new(restic: &'a Restic, job: &'a Job<'a>, deadline: Option<Instant>) -> Result<Runner<'a>, String> {
        let plan_tag = rm_protocol::backup::plan_tag(&job.plan.name);
        if let Some(tag) = std::iter::once(&plan_tag).chain(&job.plan.tags).find(|t| t.contains(',')) {
            return Err(format!("the tag {tag:?} contains a comma, which restic reads as two tags"));
        }
        let dir = process::secret_dir(job.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", job.state_dir.join("tmp").display()))?;
        let password = process::SecretFile::create(&dir, job.repository.password.as_bytes())
            .map_err(|e| format!("cannot write the password file in {}: {e}", dir.display()))?;
        let cacert = match &job.repository.ca_cert {
            Some(pem) if !pem.trim().is_empty() => Some(
                process::SecretFile::create(&dir, pem.as_bytes())
                    .map_err(|e| format!("cannot write the CA certificate file in {}: {e}", dir.display()))?,
            ),
            _ => None,
        };

        let mut env: Vec<(OsString, OsString)> = job
            .repository
            .env
            .iter()
            .filter(|(k, v)| {
                !k.is_empty()
                    && !k.contains(['=', '\0'])
                    && !v.contains('\0')
                    && !RESERVED_ENV.iter().any(|r| k.eq_ignore_ascii_case(r))
            })
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        env.push(("RESTIC_REPOSITORY".into(), job.repository.url.clone().into()));
        env.push(("RESTIC_PASSWORD_FILE".into(), password.path().into()));

        let mut global = vec![flag("--cache-dir=", job.state_dir.join("restic-cache").as_os_str())];
        if let Some(ca) = &cacert {
            global.push(flag("--cacert=", ca.path().as_os_str()));
        }
        // restic 0.16 and later wait for a lock themselves; the runner's own waits (for 0.14 and 0.15) stay as a
        // fallback.
        if (restic.version.major, restic.version.minor) >= (0, 16) {
            global.push("--retry-lock=1m".into());
        }
        Ok(Runner {
            restic,
            job,
            deadline,
            env,
            global,
            _password: password,
            _cacert: cacert,
            lock_waits: std::cell::Cell::new(0),
        })
    }

    /// restic found the repository locked by another run that is alive (its stale locks were already removed): waits
    /// before the next try, 5 s and then doubling up to a minute, and says so once in `notes`. False, without
    /// waiting, when the wait would pass the run's deadline (or, without one, after [`LOCK_WAITS_UNBOUNDED`] waits);
    /// false as soon as the run is cancelled.
    pub(crate) fn wait_for_lock(&self, notes: &mut Vec<String>) -> bool {
        let n = self.lock_waits.get();
        let pause = LOCK_WAIT_FIRST.saturating_mul(1 << n.min(8)).min(LOCK_WAIT_MAX);
        let fits = match self.deadline {
            Some(deadline) => Instant::now() + pause < deadline,
            None => n < LOCK_WAITS_UNBOUNDED,
        };
        if !fits || self.job.cancel.is_cancelled() {
            return false;
        }
        if n == 0 {
            notes.push("the repository was locked by another run; waited for it".into());
        }
        self.lock_waits.set(n + 1);
        let end = Instant::now() + pause;
        while Instant::now() < end {
            if self.job.cancel.is_cancelled() {
                return false;
            }
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(200)));
        }
        !self.job.cancel.is_cancelled()
    }

    fn backup(&self, on_progress: &mut dyn FnMut(&Progress)) -> Outcome {
        let mut notes: Vec<String> = Vec::new();
        let mut init_tried = false;
        let mut unlock_tried = false;
        loop {
            let run = match self.run(self.backup_args(), MAX_LINE, Some(on_progress)) {
                Ok(run) => run,
                Err(unavailable) => return unavailable.into(),
            };
            match run.end() {
                End::Restic(Ending::RepositoryMissing) if self.job.repository.auto_init && !init_tried => {
                    init_tried = true;
                    let init = match self.run(self.args("init", &[]), MAX_LINE, None) {
                        Ok(init) => init,
                        Err(unavailable) => return unavailable.into(),
                    };
                    match init.end() {
                        End::Stopped(stop) => return self.stopped(stop, &init),
                        // Another host may have initialised it in the meantime: the retry tells.
                        End::Restic(Ending::Success) => notes.push("initialised the repository (auto_init)".into()),
                        End::Restic(_) => {
                            notes.push(format!("restic init failed: {}", init.message_or(|| ended(&init.exit))))
                        }
                    }
                }
                End::Restic(Ending::Locked) if !unlock_tried => {
                    unlock_tried = true;
                    let unlock = match self.run(self.args("unlock", &[]), MAX_LINE, None) {
                        Ok(unlock) => unlock,
                        Err(unavailable) => return unavailable.into(),
                    };
                    match unlock.end() {
                        End::Stopped(stop) => return self.stopped(stop, &unlock),
                        End::Restic(_) => note(&mut notes, UNLOCKED),
                    }
                }
                // After a wait the holder may have died: its lock is stale then, and the next unlock removes it.
                End::Restic(Ending::Locked) if self.wait_for_lock(&mut notes) => unlock_tried = false,
                End::Restic(Ending::Locked) if self.job.cancel.is_cancelled() => {
                    return Outcome::cancelled(
                        "cancelled while waiting for the repository's lock".into(),
                        run.exit.code,
                    );
                }
                end => return self.finish(end, run, notes),
            }
        }
    }

    fn finish(&self, end: End, run: Run, notes: Vec<String>) -> Outcome {
        // restic's words first (its `Fatal:` line leads), then what the runner did about them.
        let message = |run: &Run, fallback: &str| {
            let mut parts = vec![run.message_or(|| fallback.to_string())];
            if run.exit.code.is_none() && !run.tail.is_empty() {
                parts.push(format!("restic {}", ended(&run.exit)));
            }
            parts.extend(notes.iter().cloned());
            parts.join("\n")
        };
        let code = run.exit.code;
        let ending = match end {
            End::Stopped(stop) => return self.stopped(stop, &run),
            End::Restic(ending) => ending,
        };
        let reason = match ending {
            Ending::Success | Ending::Warning => {
                let warning = ending == Ending::Warning;
                let mut summary = run.summary.clone();
                let snapshots = self.snapshots();
                if let (Some(summary), Some(snapshots)) = (&mut summary, &snapshots) {
                    complete_snapshot_id(summary, snapshots);
                }
                let text = if warning {
                    Some(message(&run, "restic could not read some files"))
                } else {
                    let mut parts: Vec<String> = run.tail.message().into_iter().collect();
                    parts.extend(notes.iter().cloned());
                    (!parts.is_empty()).then(|| parts.join("\n"))
                };
                return Outcome {
                    status: if warning { OperationStatus::Warning } else { OperationStatus::Success },
                    summary,
                    message: text,
                    reason: None,
                    exit_code: code,
                    snapshots,
                    forget: None,
                };
            }
            Ending::Interrupted => {
                return Outcome::cancelled(message(&run, "restic was interrupted (SIGINT)"), code);
            }
            Ending::RepositoryMissing => FailureReason::RepositoryMissing,
            Ending::WrongPassword => FailureReason::WrongPassword,
            Ending::Locked => FailureReason::Locked,
            Ending::Other => FailureReason::Other,
        };
        let fallback = format!("restic failed ({})", ended(&run.exit));
        Outcome::failed(reason, message(&run, &fallback), code)
    }

    fn forget_args(&self, retention: &Retention, dry_run: bool) -> Vec<OsString> {
        let mut args = forget_filter_args(self.job.hostname, &self.job.plan.name);
        if dry_run {
            args.insert(0, "--dry-run".into());
        }
        args.extend(retention.restic_args().into_iter().map(OsString::from));
        self.args("forget", &args)
    }

    /// The dry run, then (when it listed only this host's snapshots of this plan) the forget.
    fn forget(&self, retention: &Retention) -> Outcome {
        let mut notes: Vec<String> = Vec::new();
        let mut unlock_tried = false;
        let (stdout, run) = match self.forget_once(retention, true, &mut notes, &mut unlock_tried) {
            Ok(done) => done,
            Err(outcome) => return *outcome,
        };
        if let Err(outcome) = self.forget_result(&stdout, &run, true) {
            return *outcome;
        }
        let (stdout, run) = match self.forget_once(retention, false, &mut notes, &mut unlock_tried) {
            Ok(done) => done,
            Err(outcome) => return *outcome,
        };
        match self.forget_result(&stdout, &run, false) {
            Ok(result) => self.forgotten(result, &run, notes),
            Err(outcome) => *outcome,
        }
    }

    /// One `forget` (or `forget --dry-run`) to its end: its stdout and run when restic exited 0, else the outcome.
    fn forget_once(
        &self,
        retention: &Retention,
        dry_run: bool,
        notes: &mut Vec<String>,
        unlock_tried: &mut bool,
    ) -> Result<(String, Run), Box<Outcome>> {
        loop {
            let mut stdout = String::new();
            let run = self
                .run_collect(self.forget_args(retention, dry_run), &mut stdout)
                .map_err(|unavailable| Box::new(unavailable.into()))?;
            let ending = match run.end() {
                End::Stopped(stop) => return Err(Box::new(self.stopped(stop, &run))),
                End::Restic(ending) => ending,
            };
            if ending == Ending::Locked && *unlock_tried && self.wait_for_lock(notes) {
                *unlock_tried = false;
                continue;
            }
            let message = |run: &Run, fallback: String| {
                let mut parts = vec![run.message_or(|| fallback)];
                parts.extend(notes.iter().cloned());
                parts.join("\n")
            };
            let reason = match ending {
                Ending::Success => return Ok((stdout, run)),
                Ending::Locked if !*unlock_tried => {
                    *unlock_tried = true;
                    let unlock = self
                        .run(self.args("unlock", &[]), MAX_LINE, None)
                        .map_err(|unavailable| Box::new(unavailable.into()))?;
                    if let End::Stopped(stop) = unlock.end() {
                        return Err(Box::new(self.stopped(stop, &unlock)));
                    }
                    note(notes, UNLOCKED);
                    continue;
                }
                Ending::Locked if self.job.cancel.is_cancelled() => {
                    let message = "cancelled while waiting for the repository's lock".to_string();
                    return Err(Box::new(Outcome::cancelled(message, run.exit.code)));
                }
                Ending::Interrupted => {
                    let message = message(&run, "restic was interrupted (SIGINT)".into());
                    return Err(Box::new(Outcome::cancelled(message, run.exit.code)));
                }
                Ending::RepositoryMissing => FailureReason::RepositoryMissing,
                Ending::WrongPassword => FailureReason::WrongPassword,
                Ending::Locked => FailureReason::Locked,
                Ending::Warning | Ending::Other => FailureReason::Other,
            };
            let what = if dry_run { "restic forget --dry-run" } else { "restic forget" };
            let fallback = format!("{what} failed ({})", ended(&run.exit));
            return Err(Box::new(Outcome::failed(reason, message(&run, fallback), run.exit.code)));
        }
    }

    /// A forget's (or dry run's) JSON, checked: it printed at least one group, and every snapshot in it is this
    /// host's and carries this plan's tag and no other plan's.
    fn forget_result(&self, stdout: &str, run: &Run, dry_run: bool) -> Result<output::Forgotten, Box<Outcome>> {
        let what = if dry_run { "restic forget --dry-run" } else { "restic forget" };
        let done = if dry_run { "nothing was forgotten" } else { "restic has already applied the policy" };
        let fail = |message: String| Err(Box::new(Outcome::failed(FailureReason::Other, message, run.exit.code)));
        let Some(result) = output::parse_forget(stdout) else {
            let first = stdout.lines().find(|l| !l.trim().is_empty()).unwrap_or("nothing");
            let first: String = crate::printable(first).chars().take(200).collect();
            return fail(format!("{what} exited 0 but did not print its JSON result (printed {first:?}); {done}"));
        };
        if result.groups == 0 {
            // After a backup that made a snapshot there is always one; restic 0.14 also prints nothing for a policy it
            // ignores (`--keep-within=0d`). Either way the server's snapshot list must not be replaced by nothing.
            return fail(format!(
                "{what} printed no result: no snapshot of plan {} on host {} matched, or restic ignored the policy; \
                 {done}",
                self.job.plan.name, self.job.hostname
            ));
        }
        let tag = rm_protocol::backup::plan_tag(&self.job.plan.name);
        let foreign: Vec<String> = result
            .removed
            .iter()
            .chain(&result.kept)
            .filter(|s| !is_own_snapshot(s, self.job.hostname, &tag))
            .map(|s| {
                let tags: Vec<&str> = s.tags.iter().map(String::as_str).filter(|t| t.starts_with("rm-")).collect();
                format!("{} (host {}, tags {})", s.short_id, s.hostname, tags.join(","))
            })
            .collect();
        if !foreign.is_empty() {
            let shown: Vec<&str> = foreign.iter().take(10).map(String::as_str).collect();
            let more = if foreign.len() > 10 { format!(" and {} more", foreign.len() - 10) } else { String::new() };
            return fail(format!(
                "{what} selected snapshots that are not only this host's snapshots of plan {}: {}{more}; {done}. A \
                 snapshot carrying another plan's tag (from a plan whose tags included rm-plan:…) or made under this \
                 hostname by another machine must be re-tagged or removed by hand",
                self.job.plan.name,
                shown.join(", ")
            ));
        }
        Ok(result)
    }

    /// A checked forget result as the outcome: its counts, and the snapshots restic kept.
    fn forgotten(&self, result: output::Forgotten, run: &Run, notes: Vec<String>) -> Outcome {
        let summary = ForgetSummary {
            removed: result.removed.len() as u64,
            kept: result.kept.len() as u64,
            removed_ids: result.removed.iter().take(MAX_REMOVED_IDS).map(|s| s.id.to_ascii_lowercase()).collect(),
        };
        let mut parts: Vec<String> = run.tail.message().into_iter().collect();
        parts.extend(notes);
        Outcome {
            status: OperationStatus::Success,
            summary: None,
            message: (!parts.is_empty()).then(|| parts.join("\n")),
            reason: None,
            exit_code: run.exit.code,
            snapshots: Some(newest_snapshots(result.kept)),
            forget: Some(summary),
        }
    }

    /// Runs restic with `args`, keeping its stdout whole in `stdout` (up to [`MAX_SNAPSHOTS_OUTPUT`]) and its stderr
    /// in the tail.
    fn run_collect(&self, args: Vec<OsString>, stdout: &mut String) -> Result<Run, Unavailable> {
        let mut tail = output::Tail::default();
        let mut on_line = |stream: Stream, line: String| match stream {
            Stream::Stdout if stdout.len() + line.len() < MAX_SNAPSHOTS_OUTPUT => {
                stdout.push_str(&line);
                stdout.push('\n');
            }
            Stream::Stdout => {}
            _ => tail.push_line(&output::parse_line(&line)),
        };
        let cmd = process::command(&self.restic.path, &args, &self.env);
        let exit = process::run(cmd, &self.job.cancel, self.deadline, MAX_SNAPSHOTS_OUTPUT, &mut on_line)
            .map_err(|e| Unavailable(spawn_error(&self.restic.path, &e)))?;
        Ok(Run { exit, tail, summary: None })
    }

    fn stopped(&self, stop: Stop, run: &Run) -> Outcome {
        let killed = if run.exit.killed {
            format!(", and killed after it ignored SIGINT for {} s", process::GRACE.as_secs())
        } else {
            String::new()
        };
        match stop {
            Stop::Cancelled => Outcome::cancelled(format!("cancelled: restic was stopped{killed}"), run.exit.code),
            Stop::TimedOut => Outcome::failed(
                FailureReason::Timeout,
                format!(
                    "restic ran longer than the plan's timeout of {} and was stopped{killed}",
                    human_duration(self.job.timeout)
                ),
                run.exit.code,
            ),
        }
    }

    /// The plan's snapshots on this host, or `None` if restic could not list them.
    fn snapshots(&self) -> Option<Vec<Snapshot>> {
        let tag = rm_protocol::backup::plan_tag(&self.job.plan.name);
        let args = self.args(
            "snapshots",
            &[
                "--json".into(),
                "--no-lock".into(),
                flag("--host=", self.job.hostname.as_ref()),
                flag("--tag=", tag.as_ref()),
            ],
        );
        let mut stdout = String::new();
        let mut on_line = |stream: Stream, line: String| {
            if stream == Stream::Stdout && stdout.len() + line.len() < MAX_SNAPSHOTS_OUTPUT {
                stdout.push_str(&line);
                stdout.push('\n');
            }
        };
        let cmd = process::command(&self.restic.path, &args, &self.env);
        let exit = process::run(cmd, &self.job.cancel, self.deadline, MAX_SNAPSHOTS_OUTPUT, &mut on_line).ok()?;
        if exit.code != Some(0) {
            return None;
        }
        output::parse_snapshots(&stdout).map(newest_snapshots)
    }

    fn backup_args(&self) -> Vec<OsString> {
        let plan = self.job.plan;
        let mut args: Vec<OsString> = vec![
            "--json".into(),
            flag("--host=", self.job.hostname.as_ref()),
            flag("--tag=", rm_protocol::backup::plan_tag(&plan.name).as_ref()),
        ];
        args.extend(plan.tags.iter().map(|t| flag("--tag=", t.as_ref())));
        if plan.one_file_system {
            args.push("--one-file-system".into());
        }
        if plan.exclude_caches {
            args.push("--exclude-caches".into());
        }
        args.extend(plan.excludes.iter().map(|x| flag("--exclude=", x.as_ref())));
        // restic's cache and the secret files are never backed up, also when a plan covers the state directory
        // (`/var/lib`, or `/etc` when it is the config's directory).
        for own in ["restic-cache", "tmp"] {
            args.push(flag("--exclude=", exclude_pattern(&self.job.state_dir.join(own)).as_os_str()));
        }
        let mut args = self.args("backup", &args);
        args.push("--".into());
        args.extend(plan.paths.iter().map(OsString::from));
        args
    }

    /// `<command> <args> --cache-dir=… [--cacert=…]`
    fn args(&self, command: &str, args: &[OsString]) -> Vec<OsString> {
        let mut all: Vec<OsString> = vec![command.into()];
        all.extend(args.iter().cloned());
        all.extend(self.global.iter().cloned());
        all
    }

    /// Runs restic with `args`, reading its output: `status` lines go to `on_progress`, the summary is kept, the
    /// rest of what it says goes to the tail. `Err` is the outcome when restic cannot be started.
    fn run(
        &self,
        args: Vec<OsString>,
        max_line: usize,
        mut on_progress: Option<&mut dyn FnMut(&Progress)>,
    ) -> Result<Run, Unavailable> {
        let mut tail = output::Tail::default();
        let mut summary = None;
        let mut on_line = |_stream: Stream, line: String| match output::parse_line(&line) {
            Line::Status(progress) => {
                if let Some(f) = on_progress.as_mut() {
                    f(&progress);
                }
            }
            Line::Summary(s) => summary = Some(s),
            other => tail.push_line(&other),
        };
        let cmd = process::command(&self.restic.path, &args, &self.env);
        let exit = process::run(cmd, &self.job.cancel, self.deadline, max_line, &mut on_line)
            .map_err(|e| Unavailable(spawn_error(&self.restic.path, &e)))?;
        Ok(Run { exit, tail, summary })
    }
}

/// The most snapshots a report carries. The server refuses a report with more than 10,000 snapshots (400) or a
/// batch body over 8 MiB, and a refused final report is set aside for good; a plan that keeps more snapshots than
/// this reports its newest [`REPORT_SNAPSHOTS_MAX`] (the server then lists those: they replace the plan's earlier
/// list).
pub const REPORT_SNAPSHOTS_MAX: usize = 1000;

/// The newest [`REPORT_SNAPSHOTS_MAX`] of `snapshots`, newest first (by their RFC 3339 time; one whose time does not
/// parse counts as the oldest).
fn newest_snapshots(mut snapshots: Vec<Snapshot>) -> Vec<Snapshot> {
    let time = |s: &Snapshot| chrono::DateTime::parse_from_rfc3339(&s.time).ok();
    snapshots.sort_by_cached_key(|s| std::cmp::Reverse(time(s)));
    snapshots.truncate(REPORT_SNAPSHOTS_MAX);
    snapshots
}

/// An exclude pattern matching exactly `path` (made absolute): on Unix restic's pattern characters (`*`, `?`, `[`,
/// `\`) are escaped with a backslash.
fn exclude_pattern(path: &Path) -> OsString {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    #[cfg(unix)]
    {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let mut out = Vec::new();
        for &b in path.as_os_str().as_bytes() {
            if matches!(b, b'*' | b'?' | b'[' | b'\\') {
                out.push(b'\\');
            }
            out.push(b);
        }
        OsString::from_vec(out)
    }
    #[cfg(not(unix))]
    path.into_os_string()
}

/// `prefix` followed by `value`, as one argument (`--exclude=-x` cannot be mistaken for a flag).
fn flag(prefix: &str, value: &OsStr) -> OsString {
    let mut arg = OsString::from(prefix);
    arg.push(value);
    arg
}

/// restic 0.14's summary names the snapshot by its short id; newer versions by the full one. Use the full id when
/// exactly one listed snapshot has it as a prefix.
fn complete_snapshot_id(summary: &mut BackupSummary, snapshots: &[Snapshot]) {
    let Some(id) = summary.snapshot_id.as_deref().filter(|id| !id.is_empty()) else {
        return;
    };
    let mut matching = snapshots.iter().filter(|s| s.id.starts_with(id));
    if let (Some(one), None) = (matching.next(), matching.next()) {
        summary.snapshot_id = Some(one.id.clone());
    }
}

/// `90 s`, `15 min`, `2 h 5 min`.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{} ms", d.as_millis()),
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s % 3600 / 60 == 0 => format!("{} h", s / 3600),
        s => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_best_restic_is_explicit_else_the_newer_of_path_and_managed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = |name: &str, version: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\necho 'restic {version} compiled with go1.21 on linux/amd64'\n"))
                .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let (path_old, path_new, path_tie) = (fake("p14", "0.14.0"), fake("p17", "0.17.0"), fake("p16", "0.16.0"));
        let managed = fake("restic-manager-restic", "0.16.0");
        let explicit = fake("explicit", "0.14.1");
        let on_path = |p: &PathBuf| {
            let p = p.clone();
            move || detect(Some(&p))
        };
        let best = |explicit: Option<&Path>, on: &PathBuf| best_of(explicit, Some(&managed), on_path(on)).unwrap().path;
        assert_eq!(best(None, &path_old), managed, "managed newer than PATH's");
        assert_eq!(best(None, &path_new), path_new, "PATH's newer than managed");
        assert_eq!(best(None, &path_tie), path_tie, "a tie goes to PATH's");
        assert_eq!(best(Some(&explicit), &path_new), explicit, "--restic wins over both");
        let missing = dir.path().join("absent");
        let none = || Err::<Restic, String>("restic is not installed".into());
        assert_eq!(best_of(None, Some(&missing), on_path(&path_old)).unwrap().path, path_old, "no managed restic");
        assert_eq!(best_of(None, Some(&managed), none).unwrap().path, managed, "no restic on PATH");
        assert!(best_of(None, Some(&missing), none).is_err());
    }

    #[test]
    fn short_snapshot_ids_are_completed_when_unambiguous() {
        let snap = |id: &str| Snapshot { id: id.into(), ..Snapshot::default() };
        let mut summary = BackupSummary { snapshot_id: Some("90a410e6".into()), ..BackupSummary::default() };
        complete_snapshot_id(&mut summary, &[snap("11aa"), snap("90a410e6ffff")]);
        assert_eq!(summary.snapshot_id.as_deref(), Some("90a410e6ffff"));
        let mut summary = BackupSummary { snapshot_id: Some("90".into()), ..BackupSummary::default() };
        complete_snapshot_id(&mut summary, &[snap("90aa"), snap("90bb")]);
        assert_eq!(summary.snapshot_id.as_deref(), Some("90"), "ambiguous: left as restic said");
    }

    #[test]
    fn a_report_carries_the_newest_snapshots_only() {
        let snap = |i: usize, time: String| Snapshot { id: format!("{i:064x}"), time, ..Snapshot::default() };
        // Shuffled times, some with another offset (the same instant written differently sorts by instant).
        let mut all: Vec<Snapshot> = (0..2500)
            .map(|i| {
                let t = chrono::DateTime::from_timestamp(1_700_000_000 + (i as i64) * 60, 123_000_000).unwrap();
                let time = if i % 3 == 0 {
                    t.with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap()).to_rfc3339()
                } else {
                    t.to_rfc3339()
                };
                snap(i, time)
            })
            .collect();
        all.reverse();
        all.swap(0, 1700);
        all.push(snap(9999, "not a time".into()));
        let kept = newest_snapshots(all);
        assert_eq!(kept.len(), REPORT_SNAPSHOTS_MAX);
        let ids: Vec<usize> = kept.iter().map(|s| usize::from_str_radix(&s.id, 16).unwrap()).collect();
        let want: Vec<usize> = (1500..2500).rev().collect();
        assert_eq!(ids, want, "the newest 1,000, newest first");
        let few = newest_snapshots(vec![snap(1, "2026-01-01T00:00:00Z".into()), snap(2, "x".into())]);
        assert_eq!(few.len(), 2, "fewer than the cap: all kept");
    }

    #[cfg(unix)]
    #[test]
    fn the_state_directory_is_excluded_exactly() {
        assert_eq!(exclude_pattern(Path::new("/var/lib/restic-manager/tmp")), "/var/lib/restic-manager/tmp");
        assert_eq!(exclude_pattern(Path::new("/srv/a*b?[c]\\d/tmp")), "/srv/a\\*b\\?\\[c]\\\\d/tmp");
        let relative = exclude_pattern(Path::new("state/tmp"));
        assert!(Path::new(&relative).is_absolute() && relative.to_str().unwrap().ends_with("/state/tmp"));
    }

    #[test]
    fn forget_argv_selects_this_host_and_plan_only_and_carries_no_password() {
        let dir = tempfile::tempdir().unwrap();
        let plan = AgentPlan {
            name: "home".into(),
            repository: "r".into(),
            paths: vec!["/home".into()],
            excludes: vec![],
            schedule: "@daily".into(),
            timezone: Default::default(),
            tags: vec!["extra".into()],
            one_file_system: false,
            exclude_caches: false,
            timeout_secs: 60,
            jitter_secs: 0,
            retention: Some(Retention {
                last: Some(3),
                weekly: Some(4),
                within: Some("1y2m".into()),
                keep_tag: vec!["gold".into()],
                ..Default::default()
            }),
        };
        let repository = AgentRepository {
            name: "r".into(),
            url: "/srv/restic".into(),
            password: "sw0rdfish-secret".into(),
            env: Default::default(),
            ca_cert: None,
            auto_init: false,
            min_restic_version: None,
            prune: None,
            check: None,
        };
        let job = Job {
            plan: &plan,
            repository: &repository,
            hostname: "web-1",
            state_dir: dir.path(),
            cancel: Cancel::default(),
            timeout: Duration::from_secs(60),
        };
        let restic = Restic { path: "/usr/bin/restic".into(), version: MIN_VERSION };
        let runner = Runner::new(&restic, &job, None).unwrap();
        let args: Vec<String> = runner
            .forget_args(plan.retention.as_ref().unwrap(), false)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let cache = format!("--cache-dir={}", dir.path().join("restic-cache").display());
        assert_eq!(
            args,
            [
                "forget",
                "--json",
                "--host=web-1",
                "--tag=rm-plan:home",
                "--group-by=host",
                "--keep-last=3",
                "--keep-weekly=4",
                "--keep-within=1y2m",
                "--keep-tag=gold",
                cache.as_str(),
            ]
        );
        assert!(!args.iter().any(|a| a.contains("--prune")), "prune is never part of forget");
        assert!(!args.iter().any(|a| a.contains("extra")), "the plan's extra tags do not narrow or split the groups");
        assert!(!args.iter().any(|a| a.contains("sw0rdfish")), "the password goes through a 0600 file");
        let env: Vec<String> = runner.env.iter().map(|(k, _)| k.to_string_lossy().into_owned()).collect();
        assert!(env.contains(&"RESTIC_PASSWORD_FILE".to_string()) && !env.contains(&"RESTIC_PASSWORD".to_string()));

        // A plan without a policy, or an empty one, never runs forget.
        let bare = AgentPlan { retention: Some(Retention::default()), ..plan.clone() };
        let out = forget(&restic, &Job { plan: &bare, ..job });
        assert_eq!(out.status, OperationStatus::Failed);
        assert!(out.message.unwrap().contains("no retention policy"));
    }

    fn forget_plan(tags: Vec<String>, retention: Retention) -> AgentPlan {
        AgentPlan {
            name: "home".into(),
            repository: "r".into(),
            paths: vec!["/home".into()],
            excludes: vec![],
            schedule: "@daily".into(),
            timezone: Default::default(),
            tags,
            one_file_system: false,
            exclude_caches: false,
            timeout_secs: 60,
            jitter_secs: 0,
            retention: Some(retention),
        }
    }

    /// A snapshot as `forget --json` lists it.
    fn listed(id: char, host: &str, tags: &[&str]) -> String {
        serde_json::json!({"time": "2026-12-02T10:00:00Z", "paths": ["/home"], "hostname": host, "tags": tags,
                           "id": id.to_string().repeat(64), "short_id": id.to_string().repeat(8)})
        .to_string()
    }

    /// One group as restic 0.14 prints it.
    fn group(keep: &[String], remove: &[String]) -> String {
        format!(
            r#"[{{"tags":null,"host":"web-1","paths":null,"keep":[{}],"remove":[{}],"reasons":[]}}]"#,
            keep.join(","),
            remove.join(",")
        )
    }

    /// Runs the forget of `plan` with a fake restic printing `dry` for `forget --dry-run` and `real` for `forget`;
    /// returns the outcome and the restic commands run (one line each).
    #[cfg(unix)]
    fn fake_forget(plan: &AgentPlan, dry: &str, real: &str) -> (Outcome, Vec<String>) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let (dry_file, real_file) = (dir.path().join("dry.json"), dir.path().join("real.json"));
        std::fs::write(&dry_file, dry).unwrap();
        std::fs::write(&real_file, real).unwrap();
        let script = dir.path().join("restic");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{log}'\nif [ \"$1\" = forget ] && [ \"$2\" = --dry-run ]; then cat \
                 '{dry}'; else cat '{real}'; fi\n",
                log = log.display(),
                dry = dry_file.display(),
                real = real_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let repository = AgentRepository {
            name: "r".into(),
            url: "/srv/restic".into(),
            password: "pw".into(),
            env: Default::default(),
            ca_cert: None,
            auto_init: false,
            min_restic_version: None,
            prune: None,
            check: None,
        };
        let job = Job {
            plan,
            repository: &repository,
            hostname: "web-1",
            state_dir: dir.path(),
            cancel: Cancel::default(),
            timeout: Duration::from_secs(30),
        };
        let out = forget(&Restic { path: script, version: MIN_VERSION }, &job);
        let calls = std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect();
        (out, calls)
    }

    #[cfg(unix)]
    #[test]
    fn forget_runs_only_after_a_clean_dry_run_and_its_result_is_checked() {
        let keep2 = Retention { last: Some(2), ..Default::default() };
        let plan = forget_plan(vec!["extra".into()], keep2.clone());
        let own = |id| listed(id, "web-1", &["rm-plan:home", "extra"]);
        let clean = group(&[own('a'), own('b')], &[own('c')]);

        // Clean: the dry run, then the forget; its counts and kept snapshots are reported.
        let (out, calls) = fake_forget(&plan, &clean, &clean);
        assert_eq!(out.status, OperationStatus::Success, "{out:?}");
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(calls[0].starts_with("forget --dry-run --json --host=web-1 --tag=rm-plan:home"), "{calls:?}");
        assert!(calls[1].starts_with("forget --json --host=web-1 --tag=rm-plan:home") && !calls[1].contains("dry"));
        assert_eq!(out.forget, Some(ForgetSummary { removed: 1, kept: 2, removed_ids: vec!["c".repeat(64)] }));
        assert_eq!(out.snapshots.unwrap().len(), 2);

        // The dry run lists a snapshot that also carries another plan's tag (a plan whose tags were `rm-plan:home`),
        // or another host's: nothing is forgotten.
        let foreign_tag = listed('d', "web-1", &["rm-plan:other", "rm-plan:home"]);
        let other_host = listed('e', "web-2", &["rm-plan:home"]);
        let untagged = listed('f', "web-1", &["home"]);
        for (intruder, says) in [
            (&foreign_tag, "dddddddd (host web-1, tags rm-plan:other,rm-plan:home)"),
            (&other_host, "eeeeeeee"),
            (&untagged, "ffffffff"),
        ] {
            let dirty = group(&[own('a')], std::slice::from_ref(intruder));
            let (out, calls) = fake_forget(&plan, &dirty, &clean);
            assert_eq!(out.status, OperationStatus::Failed, "{out:?}");
            assert_eq!(calls.len(), 1, "only the dry run ran: {calls:?}");
            let message = out.message.unwrap();
            assert!(message.starts_with("restic forget --dry-run selected snapshots that are not only"), "{message}");
            assert!(message.contains(says) && message.contains("nothing was forgotten"), "{message}");
            assert!(out.snapshots.is_none() && out.forget.is_none());
        }

        // A clean dry run, then a forget whose result is not (the repository changed in between): failed, and the
        // server's snapshot list is left alone.
        let (out, calls) = fake_forget(&plan, &clean, &group(&[own('a')], std::slice::from_ref(&foreign_tag)));
        assert_eq!((out.status, calls.len()), (OperationStatus::Failed, 2));
        assert!(out.message.unwrap().contains("restic has already applied the policy"));
        assert!(out.snapshots.is_none());

        // restic printed nothing (no snapshot matched, or restic 0.14 with --keep-within=0d): never "kept 0" and an
        // empty snapshot list.
        let (out, calls) = fake_forget(&plan, "", "");
        assert_eq!((out.status, calls.len()), (OperationStatus::Failed, 1), "{out:?}");
        assert!(out.message.unwrap().contains("printed no result"));
        assert!(out.snapshots.is_none() && out.forget.is_none());
        let (out, _) = fake_forget(&plan, &clean, "\n");
        assert_eq!(out.status, OperationStatus::Failed);
        assert!(out.snapshots.is_none() && out.forget.is_none(), "{out:?}");

        // Refused before restic runs: a plan carrying a plan tag among its own tags, a policy with options this
        // agent does not know, a policy that keeps nothing by restic's reading.
        let tagged = forget_plan(vec!["rm-plan:other".into()], keep2.clone());
        let (out, calls) = fake_forget(&tagged, &clean, &clean);
        assert_eq!((out.status, calls.len()), (OperationStatus::Failed, 0));
        assert!(out.message.unwrap().contains("the plan's tags include \"rm-plan:other\""));
        let newer: Retention = serde_json::from_str(r#"{"last":2,"keep_size":"1G"}"#).unwrap();
        let (out, calls) = fake_forget(&forget_plan(vec![], newer), &clean, &clean);
        assert_eq!((out.status, calls.len()), (OperationStatus::Failed, 0));
        let message = out.message.unwrap();
        assert!(message.contains("the policy has options this agent does not know: keep_size; update the agent"));
        for stored in [r#"{"keep_tag":[""]}"#, r#"{"within":"0d"}"#] {
            let (out, calls) = fake_forget(&forget_plan(vec![], serde_json::from_str(stored).unwrap()), &clean, &clean);
            assert_eq!((out.status, calls.len()), (OperationStatus::Failed, 0), "{stored}: {out:?}");
        }
    }

    #[test]
    fn own_snapshots_carry_exactly_this_plans_tag_and_this_host() {
        let snap = |host: &str, tags: &[&str]| Snapshot {
            hostname: host.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Snapshot::default()
        };
        let own = |s: &Snapshot| is_own_snapshot(s, "h", "rm-plan:p");
        assert!(own(&snap("h", &["rm-plan:p"])));
        assert!(own(&snap("h", &["x", "rm-plan:p", "rm-plan:p"])));
        assert!(!own(&snap("h", &["rm-plan:p", "rm-plan:q"])));
        assert!(!own(&snap("h", &["rm-plan:pq"])));
        assert!(!own(&snap("h", &["x"])));
        assert!(!own(&snap("H", &["rm-plan:p"])));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(300)), "300 ms");
        assert_eq!(human_duration(Duration::from_secs(90)), "90 s");
        assert_eq!(human_duration(Duration::from_secs(900)), "15 min");
        assert_eq!(human_duration(Duration::from_secs(86400)), "24 h");
        assert_eq!(human_duration(Duration::from_secs(7500)), "2 h 5 min");
    }
}
