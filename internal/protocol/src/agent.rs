//! What an agent sends and receives: `POST /api/v1/agents/enroll` and `POST /api/v1/agents/heartbeat`.

use rm_buildinfo::BuildInfo;
use serde::{Deserialize, Serialize};

use crate::backup::{ResticInfo, RunNow};
use crate::manifest::PlatformEntry;
use crate::{PROTOCOL_VERSION, protocol_v1};

/// What an agent says about its host and itself, on enrollment and with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    /// The agent's own version and commit.
    pub version: String,
    pub commit: String,
}

/// `POST /api/v1/agents/enroll`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    #[serde(default = "protocol_v1")]
    pub protocol: u32,
    /// May instead be sent as `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(flatten)]
    pub facts: HostFacts,
}

impl EnrollRequest {
    pub fn new(token: &str, facts: HostFacts) -> EnrollRequest {
        EnrollRequest { protocol: PROTOCOL_VERSION, token: Some(token.to_owned()), facts }
    }
}

/// The answer to an enrollment (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    #[serde(default = "protocol_v1")]
    pub protocol: u32,
    pub agent_id: String,
    /// `rmagt_<id>_<secret>`: the agent's bearer credential, returned this once.
    pub credential: String,
    pub heartbeat_interval_secs: u64,
}

/// `POST /api/v1/agents/heartbeat` with `Authorization: Bearer <agent credential>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    #[serde(default = "protocol_v1")]
    pub protocol: u32,
    #[serde(flatten)]
    pub facts: HostFacts,
    /// SHA-256 of the agent's own executable.
    #[serde(default)]
    pub binary_sha256: Option<String>,
    /// The error of the agent's last failed self-update.
    #[serde(default)]
    pub last_update_error: Option<String>,
    /// The SHA-256 of the build `last_update_error` is about (the build refused or reverted; absent from agents
    /// before rollouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_sha256: Option<String>,
    /// Sent by a new build on trial under the running agent (`RM_AGENT_TRIAL`): it proves the build can talk to the
    /// server, but is not yet what the host runs, so the server answers it without recording it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trial: bool,
    /// The agent's heartbeat counter (per process lifetime).
    #[serde(default)]
    pub seq: u64,
    /// The host's restic (absent from agents older than backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restic: Option<ResticInfo>,
    /// The backup configuration revision the agent has applied (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<u64>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    #[serde(default = "protocol_v1")]
    pub protocol: u32,
    pub agent_id: String,
    pub heartbeat_interval_secs: u64,
    /// The server's own build (always sent; optional for an agent reading it).
    #[serde(default)]
    pub server: Option<BuildInfo>,
    /// The agent build this agent should run now (`null` when none is published): the build its rollout wave is on,
    /// not merely the newest one.
    #[serde(default)]
    pub update: Option<PlatformEntry>,
    /// The agent's desired backup configuration revision: when it differs from the one the agent applied, the agent
    /// fetches `GET /api/v1/agents/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<u64>,
    /// Run-now requests not yet reported by the agent (repeated until they are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run_now: Vec<RunNow>,
    /// Restore requests not yet reported by the agent (repeated until they are; absent from older servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore: Vec<crate::restore::RestoreTask>,
    /// The restic build the server serves for the agent's platform, when one is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restic: Option<crate::restic_dist::ResticEntry>,
}
