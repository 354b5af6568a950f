//! `GET /agent/manifest`: the agent builds a server publishes, one entry per platform (also the heartbeat's
//! `update`).

use rm_buildinfo::BuildInfo;
use serde::{Deserialize, Serialize};

use crate::platform::Platform;

/// One platform's published build (or its absence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformEntry {
    pub os: String,
    pub arch: String,
    pub file: String,
    #[serde(default)]
    pub published: bool,
    #[serde(default)]
    pub size: Option<u64>,
    /// Lowercase hex SHA-256 of the file.
    #[serde(default)]
    pub sha256: Option<String>,
    /// `data-dir` or `bundled`.
    #[serde(default)]
    pub source: Option<String>,
    /// HTTP date.
    #[serde(default)]
    pub last_modified: Option<String>,
    /// Where to download it by name (`/agent/binary?os=&arch=`, mutable: what it serves changes with the build):
    /// absolute when the server knows its public URL, else a path.
    pub url: String,
    /// Where to download these very bytes by digest (`/agent/blobs/sha256/<sha256>`, immutable: any HTTP cache may
    /// keep it forever), absolute or a path like `url`. Absent from servers before content-addressed downloads and
    /// for an unpublished build; an agent falls back to `url` when it is absent or answers 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_url: Option<String>,
    /// Build information embedded in the binary, when it carries a restic-manager marker.
    #[serde(default)]
    pub agent: Option<BuildInfo>,
}

impl PlatformEntry {
    /// The entry's platform, if it is one this build knows.
    pub fn platform(&self) -> Option<Platform> {
        Platform::parse(&self.os, &self.arch).ok()
    }
}

/// `GET /agent/manifest`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub server: BuildInfo,
    pub agents: Vec<PlatformEntry>,
    /// The restic builds the server hands out, one entry per platform (absent from servers before restic was served).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restic: Vec<crate::restic_dist::ResticEntry>,
}

impl Manifest {
    /// The published build for one platform.
    pub fn published(&self, platform: Platform) -> Option<&PlatformEntry> {
        self.agents.iter().find(|a| a.published && a.platform() == Some(platform))
    }
}
