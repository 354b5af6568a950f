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
    /// `sha256//…`: the server's key. The certificate it was checked against is stored beside this file
    /// ([`crate::anchor`]) and is the only root trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Whether the operator allowed plain http to a non-loopback server at enrollment. Absent in configs written
    /// before this existed: such an agent keeps working (with a warning) rather than lose its server on upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plain_http: Option<bool>,
}

/// Where the identity is kept when neither `--config` nor `RM_AGENT_CONFIG` says: next to where this executable is
/// installed (see [`default_path_for`]).
pub fn default_path() -> PathBuf {
    let exe = std::env::current_exe().ok().map(|e| fs::canonicalize(&e).unwrap_or(e));
    default_path_for(exe.as_deref())
}

/// The default config path for an agent installed at `exe`, the same rule `install.sh --prefix P` follows:
/// `<P>/bin/restic-manager-agent` keeps its identity in `<P>/etc/restic-manager/agent.json`, except for the system
/// prefixes `/`, `/usr` and `/usr/local`, whose agents (like one outside any `bin/` directory) use
/// `/etc/restic-manager/agent.json`. Windows: `%ProgramData%\restic-manager\agent.json` (what `install.ps1` writes).
pub fn default_path_for(exe: Option<&Path>) -> PathBuf {
    if cfg!(windows) {
        let base = std::env::var_os("ProgramData").map_or_else(|| PathBuf::from(r"C:\ProgramData"), PathBuf::from);
        return base.join("restic-manager").join("agent.json");
    }
    let system = PathBuf::from("/etc/restic-manager/agent.json");
    let Some(prefix) = exe.and_then(Path::parent).filter(|bin| bin.file_name() == Some("bin".as_ref())) else {
        return system;
    };
    let Some(prefix) = prefix.parent() else { return system };
    if [Path::new(""), Path::new("/"), Path::new("/usr"), Path::new("/usr/local")].contains(&prefix) {
        return system;
    }
    prefix.join("etc").join("restic-manager").join("agent.json")
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
    write_private(path, &serde_json::to_vec_pretty(config).expect("config serializes"))
        .map_err(|reason| AgentError::Config { path: path.to_path_buf(), reason })
}

/// Writes `bytes` to `path` (creating its directory) readable by the owner only (0600 on Unix): a temporary file in
/// the same directory, synced, then renamed over `path`, so a reader sees the old or the new file, never half of one.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    write_file(path, bytes, 0o600)
}

/// As [`write_private`], with the given Unix mode.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut tmp = tempfile::Builder::new().prefix(".agent-config-").tempfile_in(dir).map_err(|e| e.to_string())?;
    #[cfg(not(unix))]
    let _ = mode;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())?;
    }
    tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all()).map_err(|e| e.to_string())?;
    tmp.persist(path).map_err(|e| e.error.to_string())?;
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
            pin: None,
            allow_plain_http: Some(false),
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

    #[cfg(unix)]
    #[test]
    fn default_path_follows_the_install_prefix() {
        let system = PathBuf::from("/etc/restic-manager/agent.json");
        for (exe, want) in [
            ("/opt/rm/bin/restic-manager-agent", PathBuf::from("/opt/rm/etc/restic-manager/agent.json")),
            ("/home/u/.local/bin/restic-manager-agent", PathBuf::from("/home/u/.local/etc/restic-manager/agent.json")),
            ("/usr/local/bin/restic-manager-agent", system.clone()),
            ("/usr/bin/restic-manager-agent", system.clone()),
            ("/bin/restic-manager-agent", system.clone()),
            ("/work/target/debug/restic-manager-agent", system.clone()),
            ("restic-manager-agent", system.clone()),
        ] {
            assert_eq!(default_path_for(Some(Path::new(exe))), want, "{exe}");
        }
        assert_eq!(default_path_for(None), system);
    }
}
