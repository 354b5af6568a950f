//! Repository maintenance on the wire: the `prune` and `check` policies of a repository (operator input, views, and
//! what an agent using the repository receives), the maintenance lease an agent asks for before it runs one
//! (`LeaseRequest::maintenance`), what a maintenance operation reports, and a repository's health.
//!
//! A policy fires on every agent that uses the repository; the server's maintenance lease lets exactly one of them
//! run a given firing (its `slot`): the others are told the slot is done (409 `maintenance_done`) or busy (409
//! `repository_busy`, wait and ask again).
//!
//! Agent-facing bodies never refuse unknown fields; operator input does.

use serde::{Deserialize, Serialize};

use crate::admin::Timestamp;
use crate::backup::{Health, Timezone};

/// The two repository-level maintenance jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceKind {
    /// `restic prune --max-unused …`
    Prune,
    /// `restic check [--read-data-subset …]`
    Check,
}

impl MaintenanceKind {
    pub const ALL: [MaintenanceKind; 2] = [MaintenanceKind::Prune, MaintenanceKind::Check];

    pub fn as_str(self) -> &'static str {
        match self {
            MaintenanceKind::Prune => "prune",
            MaintenanceKind::Check => "check",
        }
    }

    /// The operation kind a run of this job is reported as.
    pub fn operation_kind(self) -> crate::backup::OperationKind {
        match self {
            MaintenanceKind::Prune => crate::backup::OperationKind::Prune,
            MaintenanceKind::Check => crate::backup::OperationKind::Check,
        }
    }
}

spelled_enum!(MaintenanceKind, "maintenance kind");

/// A repository's prune policy as the operator gives it. Operator input: unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrunePolicy {
    /// Cron (`0 4 * * 0`, `@weekly`) or `@every 7d`.
    pub schedule: String,
    #[serde(default)]
    pub timezone: Timezone,
    /// restic's `--max-unused`: `10%` (below 100%), `5G`, `500M`, `0` or `unlimited` (restic's default, `5%`, when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unused: Option<String>,
    /// Run timeout such as `6h` (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A repository's check policy as the operator gives it. Without `read_data_subset` it checks the structure only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckPolicy {
    pub schedule: String,
    #[serde(default)]
    pub timezone: Timezone,
    /// restic's `--read-data-subset`: `n/t` (1 ≤ n ≤ t ≤ 256) or a percentage `p%` (0 < p ≤ 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_data_subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A maintenance policy as an agent receives it (on [`crate::backup::AgentRepository`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMaintenance {
    pub schedule: String,
    #[serde(default)]
    pub timezone: Timezone,
    /// Prune only: `--max-unused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unused: Option<String>,
    /// Check only: `--read-data-subset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_data_subset: Option<String>,
    /// restic is stopped after this long.
    pub timeout_secs: u64,
    /// Each host delays every firing by a fixed offset in `0..jitter_secs` (the slot stays the firing itself).
    #[serde(default)]
    pub jitter_secs: u64,
    /// The operator asked for a run now (`POST /api/v1/repositories/{name}/maintenance`): one more firing, at this
    /// time (Unix seconds), which is also its slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Timestamp>,
}

/// `LeaseRequest::maintenance`: the lease is for this maintenance firing. 200: run it. 409 `repository_busy`: wait
/// and ask again. 409 `maintenance_done` ([`MAINTENANCE_DONE`]): another agent already ran this slot (or a later
/// one) successfully; skip it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceLease {
    pub kind: MaintenanceKind,
    /// The scheduled firing (Unix seconds, without the host's jitter offset): the same on every agent.
    pub slot: Timestamp,
}

/// The error code of the answer "this slot is done".
pub const MAINTENANCE_DONE: &str = "maintenance_done";

/// What a maintenance operation reports besides the common fields (`OperationReport::maintenance`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MaintenanceSummary {
    /// The firing this run was for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<Timestamp>,
    /// Prune: what restic said it removes (`total prune: 12 blobs / 3.051 MiB`), and its byte figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_bytes: Option<u64>,
    /// Prune: the size of the repository's blobs before and after, from restic 0.14's text: `size_after` is its
    /// `remaining: … / <size>` line, `size_before` that plus its `total prune: … / <size>` line. Blob sizes, not the
    /// pack files on disk (restic 0.14 prints no figure for those).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_after: Option<u64>,
    /// Check: the errors restic printed (at most 50 lines).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Check: the `--read-data-subset` used, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_data_subset: Option<String>,
}

/// `POST /api/v1/repositories/{name}/maintenance`: run the repository's prune or check now (on one of the agents that
/// use it). Operator input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunMaintenance {
    pub kind: MaintenanceKind,
}

/// The answer to [`RunMaintenance`] (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceRequested {
    pub repository: String,
    pub kind: MaintenanceKind,
    /// The slot the agents run (the request's time).
    pub requested_at: Timestamp,
}

/// The last run of one maintenance job of a repository, in views.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceRun {
    pub operation_id: String,
    pub agent_id: String,
    pub status: crate::backup::OperationStatus,
    pub finished_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<MaintenanceSummary>,
}

/// A repository's maintenance state: its health (from checks) and the last prune and check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryHealth {
    pub repository: String,
    /// `failed` after a failed check (until a check succeeds), `ok` after a successful one, `never` before any.
    pub health: Health,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prune: Option<MaintenanceRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<MaintenanceRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_prune_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_check_at: Option<Timestamp>,
}

/// A repository's health from its last finished check (a cancelled one does not count).
pub fn repository_health(last_check: Option<crate::backup::OperationStatus>) -> Health {
    use crate::backup::OperationStatus::*;
    match last_check {
        None | Some(Queued | Running | Cancelled) => Health::Never,
        Some(Success) => Health::Ok,
        Some(Warning) => Health::Warning,
        Some(Failed) => Health::Failed,
    }
}

/// Checks restic's `--max-unused` as restic 0.14 takes it: `unlimited`, a percentage `p%` (0 ≤ p < 100) or a whole
/// size `n[k|K|m|M|g|G|t|T]`.
pub fn validate_max_unused(value: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "max_unused {:?} must be a percentage below 100 (10%), a whole size (5G, 500M, 0) or \"unlimited\"",
            value.chars().take(32).collect::<String>()
        )
    };
    if value == "unlimited" {
        return Ok(());
    }
    if let Some(p) = value.strip_suffix('%') {
        let n: f64 = decimal(p).ok_or_else(bad)?;
        // restic refuses 100% ("must be below 100%"); `unlimited` is the way to say it.
        return if (0.0..100.0).contains(&n) { Ok(()) } else { Err(bad()) };
    }
    let digits = value.strip_suffix(['k', 'K', 'm', 'M', 'g', 'G', 't', 'T']).unwrap_or(value);
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    Ok(())
}

/// Checks restic's `--read-data-subset` as restic 0.14 takes it: `n/t` with 1 ≤ n ≤ t ≤ 256, or `p%` with
/// 0 < p ≤ 100.
pub fn validate_read_data_subset(value: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "read_data_subset {:?} must be n/t with 1 <= n <= t <= 256 (1/5) or a percentage above 0 and at most 100 (10%)",
            value.chars().take(32).collect::<String>()
        )
    };
    if let Some(p) = value.strip_suffix('%') {
        let n = decimal(p).ok_or_else(bad)?;
        return if n > 0.0 && n <= 100.0 { Ok(()) } else { Err(bad()) };
    }
    let (n, t) = value.split_once('/').ok_or_else(bad)?;
    let number = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (number(n), number(t)) {
        (Some(n), Some(t)) if n >= 1 && n <= t && t <= MAX_SUBSET_GROUPS => Ok(()),
        _ => Err(bad()),
    }
}

/// The largest `t` of `--read-data-subset=n/t` restic accepts.
pub const MAX_SUBSET_GROUPS: u32 = 256;

/// `12`, `12.5` (digits with at most one point; no sign, no exponent).
fn decimal(s: &str) -> Option<f64> {
    let ok = !s.is_empty()
        && s.len() <= 12
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.bytes().filter(|b| *b == b'.').count() <= 1
        && !s.starts_with('.')
        && !s.ends_with('.');
    ok.then(|| s.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_unused_is_validated_strictly() {
        // As /usr/bin/restic 0.14 takes them (`prune --dry-run --max-unused=…`); it refuses 100% and 1.5G.
        for ok in ["10%", "0%", "99.9%", "2.5%", "5G", "500M", "500m", "5t", "0", "1k", "unlimited", "123456"] {
            assert!(validate_max_unused(ok).is_ok(), "{ok}");
        }
        for bad in ["", "%", "100%", "101%", "-1%", "1e3%", "5GB", "5 G", "G", "ten", "1.5G", "Unlimited", ".5%", "5.%"]
        {
            let e = validate_max_unused(bad).unwrap_err();
            assert!(e.starts_with("max_unused"), "{bad}: {e}");
        }
    }

    #[test]
    fn read_data_subset_is_validated_strictly() {
        // restic 0.14: "t must be at most 256".
        for ok in ["1/5", "5/5", "1/1", "1/256", "256/256", "10%", "100%", "0.5%"] {
            assert!(validate_read_data_subset(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "0/5", "6/5", "1/0", "1/257", "257/257", "1/", "/5", "a/b", "0%", "101%", "10", "1/5/6", "-1/5", "5G",
            "1 /5",
        ] {
            let e = validate_read_data_subset(bad).unwrap_err();
            assert!(e.starts_with("read_data_subset"), "{bad}: {e}");
        }
    }

    #[test]
    fn health_follows_the_last_check() {
        use crate::backup::OperationStatus::*;
        assert_eq!(repository_health(None), Health::Never);
        assert_eq!(repository_health(Some(Failed)), Health::Failed);
        assert_eq!(repository_health(Some(Success)), Health::Ok);
        assert_eq!(repository_health(Some(Cancelled)), Health::Never);
    }

    #[test]
    fn bodies_without_the_maintenance_fields_read_and_write_as_before() {
        use crate::backup::{AgentRepository, LeaseGranted, LeaseRequest, OperationReport};
        let lease = r#"{"repository":"r","operation_id":"op_1","ttl_secs":120}"#;
        let parsed: LeaseRequest = serde_json::from_str(lease).unwrap();
        assert_eq!(parsed.maintenance, None);
        assert_eq!(serde_json::to_string(&parsed).unwrap(), lease, "an issue-14 lease request, unchanged");
        let granted = r#"{"repository":"r","operation_id":"op_1","expires_at":5}"#;
        assert_eq!(serde_json::to_string(&serde_json::from_str::<LeaseGranted>(granted).unwrap()).unwrap(), granted);
        let repo = r#"{"name":"r","url":"/r","password":"p","env":{},"ca_cert":null,"auto_init":false}"#;
        let parsed: AgentRepository = serde_json::from_str(repo).unwrap();
        assert_eq!((parsed.prune.is_none(), serde_json::to_string(&parsed).unwrap()), (true, repo.to_string()));
        let report =
            r#"{"id":"op_1","plan":"p","kind":"backup","trigger":"schedule","status":"running","started_at":1}"#;
        let parsed: OperationReport = serde_json::from_str(report).unwrap();
        let text = serde_json::to_string(&parsed).unwrap();
        assert!(!text.contains("repository") && !text.contains("maintenance"), "{text}");
        // A maintenance lease request as this version sends it.
        let m = LeaseRequest {
            maintenance: Some(MaintenanceLease { kind: MaintenanceKind::Prune, slot: 7 }),
            ..parsed_lease()
        };
        assert!(serde_json::to_string(&m).unwrap().ends_with(r#""maintenance":{"kind":"prune","slot":7}}"#));
    }

    fn parsed_lease() -> crate::backup::LeaseRequest {
        serde_json::from_str(r#"{"repository":"r","operation_id":"op_1","ttl_secs":120}"#).unwrap()
    }

    #[test]
    fn agent_policies_read_without_optional_fields() {
        let p: AgentMaintenance = serde_json::from_str(r#"{"schedule":"@daily","timeout_secs":60,"new":1}"#).unwrap();
        assert_eq!((p.timezone, p.jitter_secs, p.requested_at), (Timezone::Utc, 0, None));
        let text = serde_json::to_string(&p).unwrap();
        assert!(!text.contains("requested_at") && !text.contains("max_unused"), "{text}");
        assert!(serde_json::from_str::<PrunePolicy>(r#"{"schedule":"@daily","oops":1}"#).is_err());
    }
}
