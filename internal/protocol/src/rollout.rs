//! Staged agent rollouts: `POST/GET /api/v1/rollouts`, `GET /api/v1/rollouts/{id}` and
//! `POST /api/v1/rollouts/{id}/{start|pause|resume|abort|rollback}`.
//!
//! A rollout moves the hosts of one or more platforms from the build each runs now to a target build (named by its
//! SHA-256). Its strategy updates `canaries` first, then each wave in order; a wave's hosts are told only when the
//! wave starts, at most `max_in_flight` at a time. A host's update is *verified* when it heartbeats with the target's
//! SHA-256 within `deadline_secs` of being told and keeps heartbeating for `settle_secs`; it *fails* when the agent
//! reports the update failed (or reverted), misses the deadline, or stops heartbeating (`lost_after_secs`) after
//! updating. More failures in a wave than its budget (any failure among the canaries) halt the rollout.
//!
//! Operator input here is strict (unknown fields are refused); what the server answers is read leniently.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How many failures a wave tolerates: a count of hosts, or a percentage of the wave's hosts (rounded down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Budget {
    Count(u32),
    Percent(u32),
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::Count(0)
    }
}

impl Budget {
    /// The number of failures a wave of `hosts` hosts tolerates.
    pub fn allowed(self, hosts: usize) -> usize {
        match self {
            Budget::Count(n) => n as usize,
            Budget::Percent(p) => hosts * p.min(100) as usize / 100,
        }
    }
}

/// The hosts updated first. `selector`: the canaries are picked among hosts carrying all these labels (at random
/// among them when more match than `count`); absent: at random among all hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canaries {
    #[serde(default)]
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
}

/// One wave: the not yet named hosts carrying all of `selector`'s labels, or `percent` of the hosts left after the
/// canaries (rounded up). Exactly one of the two. The last wave always catches every host not yet named (a final
/// wave is added when the listed ones leave some out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// This wave's budget instead of the strategy's `failure_budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// How a rollout proceeds. The defaults are the cautious case: one canary, then the rest in one wave, no failure
/// tolerated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    #[serde(default = "one_canary")]
    pub canaries: Canaries,
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// Wait between the end of one wave (every host verified or failed) and the start of the next.
    #[serde(default)]
    pub wait_secs: u64,
    /// How long a told host has to heartbeat with the target build.
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    /// How long a host must keep heartbeating with the target build to count as verified.
    #[serde(default = "default_settle")]
    pub settle_secs: u64,
    /// A host that has not heartbeated for this long after updating has failed (default: three heartbeat intervals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_secs: Option<u64>,
    /// Failures a wave tolerates (canaries tolerate none).
    #[serde(default)]
    pub failure_budget: Budget,
    /// At most this many hosts updating (told, not yet verified or failed) at once; absent: a whole wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

fn one_canary() -> Canaries {
    Canaries { count: 1, selector: None }
}
fn default_deadline() -> u64 {
    600
}
fn default_settle() -> u64 {
    60
}

impl Default for Strategy {
    fn default() -> Strategy {
        Strategy {
            canaries: one_canary(),
            waves: Vec::new(),
            wait_secs: 0,
            deadline_secs: default_deadline(),
            settle_secs: default_settle(),
            lost_after_secs: None,
            failure_budget: Budget::default(),
            max_in_flight: None,
        }
    }
}

/// The longest deadline, settle time or wait accepted (30 days).
pub const MAX_DURATION_SECS: u64 = 30 * 24 * 3600;

impl Strategy {
    /// Every host at once, nothing verified beyond the target being reported: the behaviour before rollouts
    /// (`--rollout-strategy immediate`).
    pub fn immediate() -> Strategy {
        Strategy {
            canaries: Canaries::default(),
            waves: vec![Wave { percent: Some(100), ..Wave::default() }],
            wait_secs: 0,
            deadline_secs: 3600,
            settle_secs: 0,
            lost_after_secs: None,
            failure_budget: Budget::Percent(100),
            max_in_flight: None,
        }
    }

    /// Checks the strategy, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let labels = |field: &str, s: &Option<BTreeMap<String, String>>| match s {
            Some(s) if s.is_empty() => Err(format!("{field}: a selector needs at least one label")),
            _ => Ok(()),
        };
        labels("canaries.selector", &self.canaries.selector)?;
        if self.canaries.selector.is_some() && self.canaries.count == 0 {
            return Err("canaries.count: a canary selector needs a count of at least 1".into());
        }
        for (i, w) in self.waves.iter().enumerate() {
            let field = format!("waves[{i}]");
            match (&w.selector, w.percent) {
                (Some(_), Some(_)) => return Err(format!("{field}: either selector or percent, not both")),
                (None, None) => return Err(format!("{field}: needs a selector or a percent")),
                (_, Some(p)) if !(1..=100).contains(&p) => return Err(format!("{field}.percent: 1..=100, not {p}")),
                _ => {}
            }
            labels(&format!("{field}.selector"), &w.selector)?;
            if let Some(Budget::Percent(p)) = w.budget
                && p > 100
            {
                return Err(format!("{field}.budget.percent: 0..=100, not {p}"));
            }
        }
        if let Budget::Percent(p) = self.failure_budget
            && p > 100
        {
            return Err(format!("failure_budget.percent: 0..=100, not {p}"));
        }
        for (field, v) in [("wait_secs", self.wait_secs), ("deadline_secs", self.deadline_secs)]
            .into_iter()
            .chain([("settle_secs", self.settle_secs)])
            .chain(self.lost_after_secs.map(|v| ("lost_after_secs", v)))
        {
            if v > MAX_DURATION_SECS {
                return Err(format!("{field}: at most {MAX_DURATION_SECS} (30 days), not {v}"));
            }
        }
        if self.deadline_secs == 0 {
            return Err("deadline_secs: at least 1".into());
        }
        if self.lost_after_secs == Some(0) {
            return Err("lost_after_secs: at least 1".into());
        }
        if self.max_in_flight == Some(0) {
            return Err("max_in_flight: at least 1".into());
        }
        Ok(())
    }
}

/// One platform's move: from the build the fleet runs to `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub os: String,
    pub arch: String,
    /// Lowercase hex SHA-256 of a build the server has (served now, or archived when it was served).
    pub sha256: String,
}

/// `POST /api/v1/rollouts`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// Absent: every platform whose served build differs from the one the fleet was released on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<TargetSpec>>,
    /// Absent: the server's default strategy (`--rollout-strategy`), else [`Strategy::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Start it at once (default: `pending` until `start`).
    #[serde(default)]
    pub start: bool,
}

/// `POST /api/v1/rollouts/{id}/resume`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRollout {
    /// Mark the failed hosts of the current wave as skipped (they stay on their previous build and no longer count
    /// against the budget). Without it, a wave still over its budget cannot be resumed.
    #[serde(default)]
    pub skip_failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Created, waiting for `start`.
    Pending,
    Running,
    /// Stopped by the operator: no host is told; `resume` goes on.
    Paused,
    /// Stopped by itself: a wave's failures exceeded its budget (see `halt`).
    Halted,
    /// Every wave done; the target is now the fleet's build.
    Completed,
    /// Stopped for good by the operator: hosts not yet updated stay where they are.
    Aborted,
    /// Updated hosts are being told to go back to their previous build.
    RollingBack,
    RolledBack,
    /// A newer build was published before this pending rollout started.
    Superseded,
}

impl RolloutState {
    pub const ALL: [RolloutState; 9] = [
        RolloutState::Pending,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Halted,
        RolloutState::Completed,
        RolloutState::Aborted,
        RolloutState::RollingBack,
        RolloutState::RolledBack,
        RolloutState::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Pending => "pending",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Superseded => "superseded",
        }
    }

    /// Running, paused, halted or rolling back: it governs what its hosts run.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutState::Running | RolloutState::Paused | RolloutState::Halted | RolloutState::RollingBack)
    }
}
spelled_enum!(RolloutState, "rollout state");

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Its wave has not started (or `max_in_flight` holds it back).
    Waiting,
    /// Told to update; the target not reported yet.
    Updating,
    /// Reported the target; heartbeating for `settle_secs` before it counts.
    Settling,
    Verified,
    Failed,
    /// Failed, and the operator chose to go on without it (it stays on its previous build).
    Skipped,
}

impl HostState {
    pub const ALL: [HostState; 6] = [
        HostState::Waiting,
        HostState::Updating,
        HostState::Settling,
        HostState::Verified,
        HostState::Failed,
        HostState::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Waiting => "waiting",
            HostState::Updating => "updating",
            HostState::Settling => "settling",
            HostState::Verified => "verified",
            HostState::Failed => "failed",
            HostState::Skipped => "skipped",
        }
    }
}
spelled_enum!(HostState, "rollout host state");

/// One platform of a rollout as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetView {
    pub os: String,
    pub arch: String,
    /// The build the platform's fleet was released on when the rollout was created (hosts may differ: each host's
    /// own previous build is in its row).
    #[serde(default)]
    pub from_sha256: Option<String>,
    pub to_sha256: String,
    /// The target's embedded version, when it carries one.
    #[serde(default)]
    pub to_version: Option<String>,
}

/// One wave's progress (wave 0 is the canaries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveView {
    pub index: u32,
    /// `canaries`, `wave 1`, …
    pub name: String,
    pub hosts: u32,
    /// Failures the wave tolerates.
    pub budget: u32,
    #[serde(default)]
    pub counts: BTreeMap<HostState, u32>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
}

/// A host that failed, as a halt names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedHost {
    pub agent_id: String,
    pub hostname: String,
    pub error: String,
}

/// Why a rollout halted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    /// RFC 3339.
    pub at: String,
    pub wave: u32,
    pub reason: String,
    pub hosts: Vec<FailedHost>,
}

/// One host of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutHostView {
    pub agent_id: String,
    pub hostname: String,
    pub wave: u32,
    pub state: HostState,
    /// The build it ran when the rollout named it (where `rollback` takes it).
    #[serde(default)]
    pub from_sha256: Option<String>,
    /// The build it is told to run now (the rollout's target, or `from_sha256` during a rollback).
    pub target_sha256: String,
    /// Whether this host is being taken back (rollback) rather than forward.
    #[serde(default)]
    pub rollback: bool,
    #[serde(default)]
    pub told_at: Option<String>,
    #[serde(default)]
    pub reported_at: Option<String>,
    #[serde(default)]
    pub verified_at: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A rollout as the API shows it (`hosts` only from `GET /api/v1/rollouts/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: u64,
    pub state: RolloutState,
    pub strategy: Strategy,
    pub targets: Vec<TargetView>,
    /// The wave running now (or where it stopped).
    #[serde(default)]
    pub current_wave: u32,
    pub waves: Vec<WaveView>,
    /// Hosts per state across waves.
    #[serde(default)]
    pub counts: BTreeMap<HostState, u32>,
    #[serde(default)]
    pub halt: Option<Halt>,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// `api`, `cli` or `publish` (created by a new build).
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<RolloutHostView>,
}

/// `GET /api/v1/rollouts` (newest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutList {
    pub rollouts: Vec<RolloutView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse_strictly_and_validate() {
        let s: Strategy = serde_json::from_str(
            r#"{"canaries":{"count":2,"selector":{"env":"canary"}},"waves":[{"percent":25},{"selector":{"env":"prod"},
            "budget":{"percent":10}}],"wait_secs":0,"deadline_secs":30,"settle_secs":5,"failure_budget":{"count":1}}"#,
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.waves[1].budget, Some(Budget::Percent(10)));
        assert!(serde_json::from_str::<Strategy>(r#"{"wave":[]}"#).is_err(), "typo refused");
        let d: Strategy = serde_json::from_str("{}").unwrap();
        assert_eq!(d, Strategy::default());
        let bad = |json: &str| serde_json::from_str::<Strategy>(json).unwrap().validate().unwrap_err();
        assert!(bad(r#"{"waves":[{"percent":0}]}"#).contains("waves[0].percent"));
        assert!(bad(r#"{"waves":[{}]}"#).contains("waves[0]"));
        assert!(bad(r#"{"waves":[{"percent":5,"selector":{"a":"b"}}]}"#).contains("not both"));
        assert!(bad(r#"{"deadline_secs":0}"#).contains("deadline_secs"));
        assert!(bad(r#"{"failure_budget":{"percent":101}}"#).contains("failure_budget"));
        assert!(bad(r#"{"canaries":{"count":1,"selector":{}}}"#).contains("canaries.selector"));
        Strategy::immediate().validate().unwrap();
    }

    #[test]
    fn budgets() {
        assert_eq!(Budget::Count(3).allowed(10), 3);
        assert_eq!(Budget::Percent(10).allowed(25), 2);
        assert_eq!(Budget::Percent(100).allowed(7), 7);
        assert_eq!(Budget::default().allowed(1000), 0);
    }
}
