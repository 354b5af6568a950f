//! What the agent remembers between runs, beside its identity: `agent-state.json` next to the config (0600,
//! replaced atomically). Today that is the last failed self-update (refused, or reverted after its trial start, a
//! crash loop or the operator's `revert`), so a build that failed is neither downloaded again by the next `run` (or
//! `run --once`) nor forgotten in the heartbeats' `last_update_error` and `last_update_sha256`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::AgentError;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentState {
    /// The served build that failed to install, until the server serves another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_update: Option<FailedUpdate>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedUpdate {
    /// Lowercase hex SHA-256 of the refused build.
    pub sha256: String,
    /// What went wrong, as reported in `last_update_error`.
    pub error: String,
}

/// `agent-state.json` in the config's directory.
pub fn path_for(config_path: &Path) -> PathBuf {
    config_path.with_file_name("agent-state.json")
}

/// The saved state; a missing file is the empty state. An unreadable or invalid file is reported as an error so the
/// caller can say so and go on with the empty state (a lost state only means one more download).
pub fn load(path: &Path) -> Result<AgentState, AgentError> {
    let fail = |reason: String| AgentError::Config { path: path.to_path_buf(), reason };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| fail(format!("not a valid agent state: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Saves the state (0600, temporary file + rename).
pub fn save(path: &Path, state: &AgentState) -> Result<(), AgentError> {
    let json = serde_json::to_vec_pretty(state).expect("state serializes");
    crate::config::write_private(path, &json).map_err(|reason| AgentError::Config { path: path.to_path_buf(), reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("agent.json"));
        assert_eq!(path, dir.path().join("agent-state.json"));
        assert_eq!(load(&path).unwrap(), AgentState::default());
        let state = AgentState { failed_update: Some(FailedUpdate { sha256: "ab".repeat(32), error: "smoke".into() }) };
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), state);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("not a valid agent state"));
    }
}
