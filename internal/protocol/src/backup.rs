//! Backups on the wire: what the server tells an agent to back up (`GET /api/v1/agents/config`), what the agent
//! reports about each run (`POST /api/v1/agents/reports`), the repository leases that keep two agents from running
//! restic on one repository at the same time (`POST/DELETE /api/v1/agents/leases`), and the operator API's plan,
//! operation and snapshot bodies (`/api/v1/plans`, `/api/v1/operations`, `/api/v1/agents/{id}/snapshots`).
//!
//! Agent-facing bodies never refuse unknown fields (see the crate's compatibility rule); operator input does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::admin::Timestamp;
use crate::retention::{ForgetSummary, Retention, double_option};

// ---------------------------------------------------------------------------------------------------------------
// Shared vocabulary
// ---------------------------------------------------------------------------------------------------------------

/// Which clock a plan's cron expression reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timezone {
    #[default]
    Utc,
    /// The agent host's local time.
    Local,
}

/// What an operation does. Issue 14 runs backups; the rest are named so later kinds need no protocol change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    Backup,
    Forget,
    Prune,
    Check,
    Restore,
}

/// Why an operation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The plan's schedule fired.
    Schedule,
    /// A run the schedule missed while the host was off, run once at start.
    CatchUp,
    /// `POST /api/v1/plans/{name}/run`.
    RunNow,
}

/// Where an operation stands. `queued` exists only on the server (a run-now request not yet taken by the agent);
/// `success`, `warning`, `failed` and `cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Queued,
    Running,
    Success,
    /// restic exit code 3: a snapshot was made but some files could not be read.
    Warning,
    Failed,
    Cancelled,
}

impl OperationStatus {
    pub const ALL: [OperationStatus; 6] = [
        OperationStatus::Queued,
        OperationStatus::Running,
        OperationStatus::Success,
        OperationStatus::Warning,
        OperationStatus::Failed,
        OperationStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OperationStatus::Queued => "queued",
            OperationStatus::Running => "running",
            OperationStatus::Success => "success",
            OperationStatus::Warning => "warning",
            OperationStatus::Failed => "failed",
            OperationStatus::Cancelled => "cancelled",
        }
    }

    /// Whether nothing more will happen to the operation.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OperationStatus::Success | OperationStatus::Warning | OperationStatus::Failed | OperationStatus::Cancelled
        )
    }
}

spelled_enum!(OperationStatus, "status");

/// Why a failed operation failed, when the agent could tell (from restic's exit code or its message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// No repository at the URL (and `auto_init` is off, or init failed).
    RepositoryMissing,
    WrongPassword,
    /// The repository is locked by another process and the lock is not stale.
    Locked,
    /// The plan's run timeout passed; restic was stopped.
    Timeout,
    /// restic is not installed, or not runnable, or older than 0.14.
    ResticUnavailable,
    /// Anything else; `message` says what restic said.
    Other,
}

/// A plan's or a host's backup health, worst first when ordered by [`Health::severity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// The last run succeeded, within twice the schedule's interval.
    Ok,
    /// The last run ended with a warning (some files unreadable), within twice the schedule's interval.
    Warning,
    /// The last run failed (or was cancelled).
    Failed,
    /// No successful run within twice the schedule's interval.
    Overdue,
    /// The plan never ran on this host.
    Never,
}

impl Health {
    pub const ALL: [Health; 5] = [Health::Ok, Health::Warning, Health::Failed, Health::Overdue, Health::Never];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Warning => "warning",
            Health::Failed => "failed",
            Health::Overdue => "overdue",
            Health::Never => "never",
        }
    }

    /// Higher is worse: a host's health is its worst plan's.
    pub fn severity(self) -> u8 {
        match self {
            Health::Ok => 0,
            Health::Never => 1,
            Health::Warning => 2,
            Health::Overdue => 3,
            Health::Failed => 4,
        }
    }
}

spelled_enum!(Health, "health");

/// restic's `summary` message of a backup, as far as restic 0.14 already prints it. Unknown fields are ignored so
/// newer restic versions parse too.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupSummary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub dirs_new: u64,
    pub dirs_changed: u64,
    pub dirs_unmodified: u64,
    pub data_blobs: i64,
    pub tree_blobs: i64,
    pub data_added: u64,
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
    /// Seconds, as restic reports it.
    pub total_duration: f64,
    pub snapshot_id: Option<String>,
}

/// restic's latest `status` message of a running backup (sent to the server throttled).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// 0.0 ..= 1.0
    pub percent_done: f64,
    pub total_files: u64,
    pub files_done: u64,
    pub total_bytes: u64,
    pub bytes_done: u64,
    pub seconds_elapsed: u64,
    pub seconds_remaining: Option<u64>,
}

/// One snapshot, as `restic snapshots --json` describes it (the fields we keep).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// The full snapshot id (64 hex).
    pub id: String,
    pub short_id: String,
    /// RFC 3339, as restic prints it.
    pub time: String,
    pub hostname: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
}

/// The tag every snapshot of a plan carries, so snapshots can be told apart by plan: `rm-plan:<name>`.
pub fn plan_tag(plan: &str) -> String {
    format!("{PLAN_TAG_PREFIX}{plan}")
}

/// What every plan tag starts with ([`plan_tag`]).
pub const PLAN_TAG_PREFIX: &str = "rm-plan:";

/// Tags starting with this are restic-manager's own ([`plan_tag`] and any later ones): a plan's extra `tags` may not
/// use it, or one plan's snapshots could carry another plan's tag and fall under that plan's retention.
pub const RESERVED_TAG_PREFIX: &str = "rm-";

// ---------------------------------------------------------------------------------------------------------------
// Agent ⇄ server
// ---------------------------------------------------------------------------------------------------------------

/// What an agent knows about the host's restic, in every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResticInfo {
    /// `0.14.0`; absent when restic could not be run.
    #[serde(default)]
    pub version: Option<String>,
    /// The executable the agent runs.
    #[serde(default)]
    pub path: Option<String>,
    /// Why restic is unusable (not found, not runnable, older than 0.14), in words.
    #[serde(default)]
    pub error: Option<String>,
    /// The executable is the agent's managed restic (installed from the server), not the host's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub managed: bool,
    /// Why the last install of the served restic was refused (the restic in use stays), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_error: Option<String>,
}

/// A run-now request riding a heartbeat answer. The server repeats it in every answer until the agent reports the
/// operation (at least once); the agent runs each `operation_id` at most once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunNow {
    pub operation_id: String,
    pub plan: String,
}

/// A repository as an agent receives it: with its secrets (sent only over TLS or to a loopback peer).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRepository {
    pub name: String,
    pub url: String,
    pub password: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub ca_cert: Option<String>,
    #[serde(default)]
    pub auto_init: bool,
    /// The oldest restic this repository may be used with (`0.16.0`); an agent with an older one installs the
    /// server's restic first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_restic_version: Option<String>,
    /// The repository's prune policy, for the agents whose plans use it (issue 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<crate::maintenance::AgentMaintenance>,
    /// The repository's check policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::maintenance::AgentMaintenance>,
}

impl std::fmt::Debug for AgentRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRepository")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("auto_init", &self.auto_init)
            .field("prune", &self.prune)
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

/// A plan as an agent receives it: everything needed to run it without asking the server again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPlan {
    pub name: String,
    /// The name of one of [`AgentConfigBody::repositories`].
    pub repository: String,
    pub paths: Vec<String>,
    #[serde(default)]
    pub excludes: Vec<String>,
    /// A cron expression (5 or 6 fields, `@daily` …) or `@every <duration>`; see [`crate::schedule`].
    pub schedule: String,
    #[serde(default)]
    pub timezone: Timezone,
    /// Extra tags (the plan tag [`plan_tag`] is always added).
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub one_file_system: bool,
    #[serde(default)]
    pub exclude_caches: bool,
    /// restic is stopped (SIGINT, then killed) after this long.
    pub timeout_secs: u64,
    /// Each host delays every scheduled run by a fixed offset in `0..jitter_secs`, derived from its agent id and the
    /// plan, so a fleet sharing a repository does not start together.
    #[serde(default)]
    pub jitter_secs: u64,
    /// After each backup that made a snapshot, `restic forget` with this policy for this host's snapshots of the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// `GET /api/v1/agents/config` (agent credential): the agent's plans and their repositories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfigBody {
    /// Matches the `config_revision` of heartbeat answers; the agent sends back the one it applied.
    pub revision: u64,
    pub plans: Vec<AgentPlan>,
    pub repositories: Vec<AgentRepository>,
}

/// One operation's state, sent by the agent when it starts, while it runs (throttled progress) and when it ends.
/// The server keys reports by `id`: a repeated report changes nothing, a final status is never overwritten, so an
/// agent may resend its on-disk queue after any failure without a run being counted twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationReport {
    /// `op_` + 32 hex: the server's id for run-now, the agent's own for scheduled runs.
    pub id: String,
    pub plan: String,
    pub kind: OperationKind,
    pub trigger: Trigger,
    pub status: OperationStatus,
    pub started_at: Timestamp,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub summary: Option<BackupSummary>,
    #[serde(default)]
    pub progress: Option<Progress>,
    /// restic's message (its last error lines) for warnings and failures; a short note otherwise.
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub reason: Option<FailureReason>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// After a successful backup: every snapshot of this plan on this host (replaces what the server had).
    #[serde(default)]
    pub snapshots: Option<Vec<Snapshot>>,
    /// A `forget` operation's result: what it removed and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forget: Option<ForgetSummary>,
    /// A restore's target directory and what it restored (kind `restore` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<crate::restore::RestoreResult>,
    /// A repository-level operation (prune, check) names its repository here; its `plan` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// What a prune or check did (slot, space removed, check errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<crate::maintenance::MaintenanceSummary>,
}

/// `POST /api/v1/agents/reports`: the agent's queued reports, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportBatch {
    pub reports: Vec<OperationReport>,
}

/// The answer to a [`ReportBatch`] (200): every report is stored (or was already); the agent drops them from its
/// queue. A batch is all or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAck {
    pub accepted: usize,
}

/// `POST /api/v1/agents/leases`: take (or renew, with the same `operation_id`) the run lease of a repository.
/// 200 [`LeaseGranted`]; 409 `repository_busy` with `details.retry_after_secs` while another agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub repository: String,
    pub operation_id: String,
    /// The lease lapses this long after the last renewal (an agent that died stops blocking others).
    pub ttl_secs: u64,
    /// A maintenance lease (prune, check) for one scheduled firing; absent for a backup's run lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<crate::maintenance::MaintenanceLease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGranted {
    pub repository: String,
    pub operation_id: String,
    pub expires_at: Timestamp,
    /// The lifetime granted (the server may cap the one asked for); the holder renews well within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

// ---------------------------------------------------------------------------------------------------------------
// Operator API
// ---------------------------------------------------------------------------------------------------------------

/// `POST /api/v1/plans`. Operator input: unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePlan {
    pub name: String,
    pub repository: String,
    pub paths: Vec<String>,
    #[serde(default)]
    pub excludes: Vec<String>,
    /// Cron (`0 3 * * *`, `@daily`) or `@every 6h`.
    pub schedule: String,
    #[serde(default)]
    pub timezone: Timezone,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub one_file_system: bool,
    #[serde(default)]
    pub exclude_caches: bool,
    /// Agent ids the plan applies to.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Labels an agent must all carry for the plan to apply to it (in addition to `agents`). Empty: no selector.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Run timeout such as `2h` (default 24h).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Spread of scheduled starts across hosts such as `5m` (default: a twentieth of the interval, at most 10m).
    #[serde(default)]
    pub jitter: Option<String>,
    /// Which snapshots each host keeps (`restic forget` after each backup). Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// `PATCH /api/v1/plans/{name}`: each field present replaces the stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatePlan {
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub paths: Option<Vec<String>>,
    #[serde(default)]
    pub excludes: Option<Vec<String>>,
    #[serde(default)]
    pub schedule: Option<String>,
    #[serde(default)]
    pub timezone: Option<Timezone>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub one_file_system: Option<bool>,
    #[serde(default)]
    pub exclude_caches: Option<bool>,
    #[serde(default)]
    pub agents: Option<Vec<String>>,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub jitter: Option<String>,
    /// A policy replaces the plan's; `null` removes it (keep every snapshot); absent leaves it.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    pub retention: Option<Option<Retention>>,
}

/// A plan as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    pub name: String,
    pub repository: String,
    pub paths: Vec<String>,
    pub excludes: Vec<String>,
    pub schedule: String,
    pub timezone: Timezone,
    pub tags: Vec<String>,
    pub one_file_system: bool,
    pub exclude_caches: bool,
    pub agents: Vec<String>,
    pub selector: BTreeMap<String, String>,
    pub timeout_secs: u64,
    pub jitter_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// The agents the plan applies to now (explicit ids and selector matches).
    pub applies_to: Vec<String>,
    /// RFC 3339.
    pub created: String,
    pub updated: String,
    /// What the operator should know, in words: e.g. agents the plan applies to that report the same hostname while
    /// the plan has a retention policy. Absent when there is nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `GET /api/v1/plans`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanList {
    pub plans: Vec<PlanView>,
}

/// `POST /api/v1/plans/{name}/run`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunPlan {
    pub agent: String,
}

/// The answer to [`RunPlan`] (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationCreated {
    pub operation_id: String,
}

/// `GET /api/v1/operations?agent=&plan=&status=&kind=&before=&limit=`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationQuery {
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub status: Option<OperationStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<OperationKind>,
    /// Repository-level operations (prune, check) of this repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Page below this cursor (the previous page's `next_before`).
    #[serde(default)]
    pub before: Option<i64>,
    #[serde(default)]
    pub limit: Option<u32>,
}

/// One operation as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationView {
    pub id: String,
    pub agent_id: String,
    pub hostname: Option<String>,
    pub plan: String,
    pub kind: OperationKind,
    pub trigger: Trigger,
    pub status: OperationStatus,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub duration_ms: Option<u64>,
    pub summary: Option<BackupSummary>,
    pub progress: Option<Progress>,
    pub message: Option<String>,
    pub reason: Option<FailureReason>,
    pub exit_code: Option<i32>,
    /// What a `forget` operation removed and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forget: Option<ForgetSummary>,
    /// A restore's target directory and what it restored (kind `restore` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<crate::restore::RestoreResult>,
    /// Set for repository-level operations (prune, check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<crate::maintenance::MaintenanceSummary>,
}

/// `GET /api/v1/operations`: newest first; `next_before` pages on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationPage {
    pub operations: Vec<OperationView>,
    pub next_before: Option<i64>,
}

/// `GET /api/v1/agents/{id}/snapshots`: what the agent last reported, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub agent_id: String,
    pub snapshots: Vec<PlanSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSnapshot {
    pub plan: String,
    #[serde(flatten)]
    pub snapshot: Snapshot,
}

/// `PUT /api/v1/agents/{id}/labels`: replaces the agent's labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetLabels {
    pub labels: BTreeMap<String, String>,
}

/// One plan on one host in the fleet view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanHealth {
    pub plan: String,
    pub health: Health,
    /// The newest finished operation of the plan on the host.
    pub last_run: Option<OperationView>,
    pub last_success_at: Option<Timestamp>,
}

/// Whether a plan applies to an agent: the agent is named in `agents`, or `selector` is not empty and the agent
/// carries every one of its labels.
pub fn plan_applies(
    agents: &[String],
    selector: &BTreeMap<String, String>,
    agent_id: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    agents.iter().any(|a| a == agent_id)
        || (!selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A plan's health on one host. `last` is the newest finished run's status and time; `last_success_at` the newest
/// success or warning (both made a snapshot); `interval` the schedule's interval; `assigned_at` when the plan began
/// to apply (its creation or last change), so a plan that never ran becomes `overdue` after two intervals rather than
/// staying `never` forever.
pub fn health(
    last: Option<(OperationStatus, Timestamp)>,
    last_success_at: Option<Timestamp>,
    now: Timestamp,
    interval_secs: u64,
    assigned_at: Timestamp,
) -> Health {
    let window = i64::try_from(interval_secs).unwrap_or(i64::MAX / 2).saturating_mul(2);
    match last {
        None if now - assigned_at > window => Health::Overdue,
        None => Health::Never,
        Some((OperationStatus::Failed | OperationStatus::Cancelled, _)) => Health::Failed,
        Some(_) if last_success_at.is_none_or(|t| now - t > window) => Health::Overdue,
        Some((OperationStatus::Warning, _)) => Health::Warning,
        Some(_) => Health::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_apply_by_id_or_by_every_label() {
        let labels: BTreeMap<_, _> = [("env".to_string(), "prod".to_string()), ("db".into(), "pg".into())].into();
        let sel = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(plan_applies(&["a1".into()], &BTreeMap::new(), "a1", &BTreeMap::new()));
        assert!(!plan_applies(&[], &BTreeMap::new(), "a1", &labels));
        assert!(plan_applies(&[], &sel(&[("env", "prod")]), "a1", &labels));
        assert!(!plan_applies(&[], &sel(&[("env", "prod"), ("db", "mysql")]), "a1", &labels));
    }

    #[test]
    fn health_follows_the_last_run_and_the_interval() {
        use OperationStatus::*;
        let h = |last, success, now| health(last, success, now, 100, 0);
        assert_eq!(h(None, None, 150), Health::Never);
        assert_eq!(h(None, None, 250), Health::Overdue);
        assert_eq!(h(Some((Success, 1000)), Some(1000), 1100), Health::Ok);
        assert_eq!(h(Some((Warning, 1000)), Some(1000), 1100), Health::Warning);
        assert_eq!(h(Some((Failed, 1100)), Some(1000), 1150), Health::Failed);
        assert_eq!(h(Some((Success, 1000)), Some(1000), 1201), Health::Overdue);
        assert_eq!(h(Some((Cancelled, 1000)), None, 1001), Health::Failed);
    }
}
