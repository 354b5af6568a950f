//! Running the host's restic: finding it and its version, one backup with `--json` (progress, summary, errors,
//! exit codes), `init` when the repository is missing and the plan allows it, and the plan's snapshots afterwards.
//!
//! INTERFACE ONLY in this commit: the bodies are being written (issue 14); every call reports restic as unavailable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rm_protocol::backup::{
    AgentPlan, AgentRepository, BackupSummary, FailureReason, OperationStatus, Progress, ResticInfo, Snapshot,
};

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

/// Finds restic (`explicit`, else `restic` on `PATH`), runs `restic version` and checks it is at least
/// [`MIN_VERSION`]. The error says in words what is wrong (not found, not runnable, too old).
pub fn detect(explicit: Option<&Path>) -> Result<Restic, String> {
    let _ = explicit;
    Err("restic support is not built yet".into())
}

/// What heartbeats say about the host's restic.
pub fn info(detected: &Result<Restic, String>) -> ResticInfo {
    match detected {
        Ok(r) => {
            ResticInfo { version: Some(r.version.to_string()), path: Some(r.path.display().to_string()), error: None }
        }
        Err(e) => ResticInfo { version: None, path: None, error: Some(e.clone()) },
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
    /// `--host`: the enrolled hostname.
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
    /// After a success or warning: the plan's snapshots on this host (`None` if listing them failed).
    pub snapshots: Option<Vec<Snapshot>>,
}

/// Runs one backup of `job.plan` into `job.repository`, calling `on_progress` for each restic `status` line
/// (unthrottled: the caller throttles what it sends). Never panics on restic's output; every way it can end is an
/// [`Outcome`].
pub fn backup(restic: &Restic, job: &Job<'_>, on_progress: &mut dyn FnMut(&Progress)) -> Outcome {
    let _ = (restic, job, on_progress);
    Outcome {
        status: OperationStatus::Failed,
        summary: None,
        message: Some("restic support is not built yet".into()),
        reason: Some(FailureReason::ResticUnavailable),
        exit_code: None,
        snapshots: None,
    }
}
