//! The operator API (`/api/v1/tokens`, `/api/v1/agents`, `/api/v1/audit`, `/api/v1/repositories`; plans and
//! operations are in [`crate::backup`]): request and
//! response bodies. These are API shapes, separate from the database rows they are built from, so a schema change
//! never leaks into the JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Unix seconds.
pub type Timestamp = i64;

/// `POST /api/v1/tokens`. Operator input: unknown fields are refused, so a typo is an error, not a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// How many enrollments the token allows (unlimited when absent).
    #[serde(default)]
    pub uses: Option<u32>,
    /// Lifetime such as `24h` or `30m` (no expiry when absent).
    #[serde(default)]
    pub expires_in: Option<String>,
    #[serde(default)]
    pub note: String,
    /// Labels every agent enrolled with this token starts with (`env=prod`); plans select agents by label.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Where an enrollment token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    Active,
    Expired,
    UsedUp,
    Revoked,
}

impl TokenStatus {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Expired => "expired",
            TokenStatus::UsedUp => "used_up",
            TokenStatus::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An enrollment token as the API shows it (never its secret, except once in [`TokenCreated`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub note: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked_at: Option<Timestamp>,
    pub status: TokenStatus,
    /// `created_at` and `expires_at` as RFC 3339.
    pub created: String,
    pub expires: Option<String>,
    /// Labels given to the agents it enrolls.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The answer to `POST /api/v1/tokens` (201): the token's secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub view: TokenView,
    pub token: String,
}

/// `GET /api/v1/tokens`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// How an agent compares with what the server serves for its platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Runs the build this server serves for its platform.
    Current,
    /// Runs a different build than the one served.
    OutOfDate,
    /// No heartbeat within the stale window.
    Stale,
    /// Nothing is served for its platform, or the served build cannot be compared.
    Unknown,
}

impl AgentState {
    pub const ALL: [AgentState; 4] =
        [AgentState::Current, AgentState::OutOfDate, AgentState::Stale, AgentState::Unknown];

    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Current => "current",
            AgentState::OutOfDate => "out_of_date",
            AgentState::Stale => "stale",
            AgentState::Unknown => "unknown",
        }
    }
}

spelled_enum!(AgentState, "state");

/// `GET /api/v1/agents?state=`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFilter {
    #[serde(default)]
    pub state: Option<AgentState>,
    /// Only agents whose backup health (their worst plan's) is this.
    #[serde(default)]
    pub health: Option<crate::backup::Health>,
}

/// One enrolled agent in the fleet view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub id: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    pub agent_commit: String,
    pub binary_sha256: Option<String>,
    pub last_update_error: Option<String>,
    pub enrolled_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub heartbeats: u64,
    pub last_seq: u64,
    pub state: AgentState,
    /// `last_seen_at` as RFC 3339.
    pub last_seen: String,
    /// SHA-256 of the build served for the agent's platform.
    pub served_sha256: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The host's restic as the agent last reported it.
    #[serde(default)]
    pub restic: Option<crate::backup::ResticInfo>,
    /// The worst health of the agent's plans (`null` when no plan applies to it).
    #[serde(default)]
    pub health: Option<crate::backup::Health>,
    /// Every plan that applies to the agent, with its last run and health.
    #[serde(default)]
    pub backups: Vec<crate::backup::PlanHealth>,
    /// The version of the restic served for the agent's platform, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restic_served: Option<String>,
    /// The host's restic against the served one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restic_drift: Option<crate::restic_dist::ResticDrift>,
    /// When an operator revoked the agent's credential (unix seconds); the agent is refused from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_revoked_at: Option<i64>,
}

/// `GET /api/v1/agents`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
    /// Agents per state (states without agents are absent).
    pub counts: BTreeMap<AgentState, usize>,
    /// Agents per backup health (agents without plans are not counted).
    #[serde(default)]
    pub health_counts: BTreeMap<crate::backup::Health, usize>,
    pub stale_after_secs: u64,
    /// Every repository's maintenance health (from checks) and last prune and check, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<crate::maintenance::RepositoryHealth>,
}

/// `GET /api/v1/audit?kind=&before=&limit=`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    pub kind: Option<String>,
    /// Page below this event id (keyset paging).
    #[serde(default)]
    pub before: Option<i64>,
    #[serde(default)]
    pub limit: Option<u32>,
}

/// One audit event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: Timestamp,
    pub kind: String,
    pub remote_addr: Option<String>,
    pub user_agent: Option<String>,
    pub agent_id: Option<String>,
    pub platform: Option<String>,
    pub sha256: Option<String>,
    pub source: Option<String>,
    pub detail: Option<String>,
}

/// `GET /api/v1/audit`: newest first; `next_before` pages on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    pub events: Vec<AuditEntry>,
    pub next_before: Option<i64>,
}

/// `POST /api/v1/repositories`. Operator input: unknown fields are refused. `password` and the `env` values are
/// stored encrypted and never returned.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRepository {
    pub name: String,
    /// A restic repository: an absolute local path or `sftp:`, `s3:`, `rest:`, `b2:`, `azure:`, `gs:`, `rclone:`.
    pub url: String,
    pub password: String,
    /// Environment for restic (e.g. `AWS_ACCESS_KEY_ID`); the values are secret.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// PEM certificate(s) restic should trust for this repository (`--cacert`).
    #[serde(default)]
    pub ca_cert: Option<String>,
    #[serde(default)]
    pub auto_init: bool,
    /// The oldest restic agents may use this repository with (`0.16.0`): an agent with an older one installs the
    /// server's restic first.
    #[serde(default)]
    pub min_restic_version: Option<String>,
    /// Prune on this schedule (one agent of those using the repository, under the server's maintenance lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<crate::maintenance::PrunePolicy>,
    /// Check on this schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::maintenance::CheckPolicy>,
}

/// `PATCH /api/v1/repositories/{name}`: each field present replaces the stored value (`env` replaces the whole
/// environment; `"ca_cert": null` removes the certificate); absent fields are kept.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRepository {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Absent: keep; `null`: remove; a string: replace.
    #[serde(default, deserialize_with = "present")]
    pub ca_cert: Option<Option<String>>,
    #[serde(default)]
    pub auto_init: Option<bool>,
    /// Absent: keep; `null`: remove; a string: replace.
    #[serde(default, deserialize_with = "present")]
    pub min_restic_version: Option<Option<String>>,
    /// Absent: keep; `null`: remove the policy; an object: replace it.
    #[serde(default, deserialize_with = "present_policy", skip_serializing_if = "Option::is_none")]
    pub prune: Option<Option<crate::maintenance::PrunePolicy>>,
    #[serde(default, deserialize_with = "present_policy", skip_serializing_if = "Option::is_none")]
    pub check: Option<Option<crate::maintenance::CheckPolicy>>,
}

fn present_policy<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Tells a present `null` (`Some(None)`) from an absent field (`None`, via `default`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Secrets are not printed: these bodies end up in error messages and logs.
impl std::fmt::Debug for CreateRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateRepository")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("auto_init", &self.auto_init)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UpdateRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateRepository")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("env", &self.env.as_ref().map(|e| e.keys().collect::<Vec<_>>()))
            .field("auto_init", &self.auto_init)
            .finish_non_exhaustive()
    }
}

/// A repository as the API shows it: which secrets are set, never their values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryView {
    pub name: String,
    pub url: String,
    pub password_set: bool,
    /// Names of the environment variables set (values are secret).
    pub env_names: Vec<String>,
    pub ca_cert_set: bool,
    pub auto_init: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_restic_version: Option<String>,
    /// RFC 3339.
    pub created: String,
    pub updated: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<crate::maintenance::PrunePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::maintenance::CheckPolicy>,
    /// Health (from checks) and the last prune and check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<crate::maintenance::RepositoryHealth>,
}

/// `GET /api/v1/repositories`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryList {
    pub repositories: Vec<RepositoryView>,
}
