//! The agent's enrolled identity on disk.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::AgentError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentConfig {
    pub server: String,
    pub agent_id: String,
    /// `rmagt_<id>_<secret>`: the bearer credential. The file is 0600 for this reason.
    pub credential: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cacert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// `RM_AGENT_CONFIG`, else the platform's system location.
pub fn default_path() -> PathBuf {
    if let Some(path) = std::env::var_os("RM_AGENT_CONFIG") {
        return PathBuf::from(path);
    }
    if cfg!(windows) {
        let base = std::env::var_os("ProgramData").map_or_else(|| PathBuf::from(r"C:\ProgramData"), PathBuf::from);
        base.join("restic-manager").join("agent.json")
    } else {
        PathBuf::from("/etc/restic-manager/agent.json")
    }
}

pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
    let fail = |reason: String| AgentError::Config { path: path.to_path_buf(), reason };
    let text = fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            fail("does not exist; enroll first (restic-manager-agent enroll --server URL --token TOKEN)".into())
        }
        _ => fail(e.to_string()),
    })?;
    serde_json::from_str(&text).map_err(|e| fail(format!("not a valid agent config: {e}")))
}

/// Writes the config readable by its owner only, via a temporary file renamed into place.
pub fn save(path: &Path, config: &AgentConfig) -> Result<(), AgentError> {
    let fail = |reason: String| AgentError::Config { path: path.to_path_buf(), reason };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let mut tmp =
        tempfile::Builder::new().prefix(".agent-config-").tempfile_in(dir).map_err(|e| fail(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(fs::Permissions::from_mode(0o600)).map_err(|e| fail(e.to_string()))?;
    }
    let json = serde_json::to_vec_pretty(config).expect("config serializes");
    tmp.write_all(&json).and_then(|()| tmp.as_file().sync_all()).map_err(|e| fail(e.to_string()))?;
    tmp.persist(path).map_err(|e| fail(e.error.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/restic-manager/agent.json");
        let config = AgentConfig {
            server: "http://127.0.0.1:8080".into(),
            agent_id: "abc".into(),
            credential: "rmagt_abc_secret".into(),
            cacert: None,
            insecure: false,
        };
        save(&path, &config).unwrap();
        assert_eq!(load(&path).unwrap(), config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
        let missing = load(&dir.path().join("nope.json")).unwrap_err().to_string();
        assert!(missing.contains("enroll first"), "{missing}");
    }
}
