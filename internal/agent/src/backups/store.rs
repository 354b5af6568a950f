//! The backup files kept beside the agent config, each 0600 and replaced atomically ([`crate::config::write_private`]):
//! `backup-config.json` (the applied plans and repositories, secrets included, so schedules run while the server is
//! down) and `run-now.json` (the run-now operation ids already accepted, so a request the server repeats, or repeats
//! to a restarted agent, runs at most once).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use rm_protocol::backup::{AgentConfigBody, OperationReport};
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// How many accepted run-now ids are remembered (the server stops repeating a request once it has its report).
pub const ACCEPTED_MAX: usize = 1000;

/// Where the backup machinery keeps its files: the config's directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn for_config(config_path: &Path) -> Paths {
        let dir = config_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Paths { dir: dir.to_path_buf() }
    }
    pub fn backup_config(&self) -> PathBuf {
        self.dir.join("backup-config.json")
    }
    pub fn schedule_state(&self) -> PathBuf {
        self.dir.join("schedule-state.json")
    }
    pub fn run_now(&self) -> PathBuf {
        self.dir.join("run-now.json")
    }
    pub fn outbox(&self) -> PathBuf {
        self.dir.join("outbox")
    }
    pub fn open_operations(&self) -> PathBuf {
        self.dir.join("open-operations.json")
    }
}

/// Operations reported `running` whose final report is not written yet (`open-operations.json`): an agent that was
/// killed mid-run finds them at its next start and ends each with a `failed` report, so none stays `running` on the
/// server forever.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenOperations {
    #[serde(default)]
    pub operations: BTreeMap<String, OperationReport>,
}

fn config_error(path: &Path) -> impl FnOnce(String) -> AgentError + '_ {
    move |reason| AgentError::Config { path: path.to_path_buf(), reason }
}

/// Reads a JSON file; `None` when it does not exist.
pub(crate) fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, AgentError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| config_error(path)(format!("not valid: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(config_error(path)(e.to_string())),
    }
}

/// Writes a JSON file 0600, temp file + rename.
pub(crate) fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    let json = serde_json::to_vec_pretty(value).expect("serializes");
    crate::config::write_private(path, &json).map_err(config_error(path))
}

pub fn load_config(paths: &Paths) -> Result<Option<AgentConfigBody>, AgentError> {
    load_json(&paths.backup_config())
}

pub fn save_config(paths: &Paths, config: &AgentConfigBody) -> Result<(), AgentError> {
    save_json(&paths.backup_config(), config)
}

/// The run-now operation ids accepted, oldest first, at most [`ACCEPTED_MAX`].
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    #[serde(default)]
    pub ids: VecDeque<String>,
}

impl Accepted {
    pub fn load(paths: &Paths) -> Result<Accepted, AgentError> {
        Ok(load_json(&paths.run_now())?.unwrap_or_default())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.iter().any(|i| i == id)
    }

    /// Records `id` on disk before the caller runs it. `Ok(false)`: it was accepted before (do not run it again).
    /// On a write error nothing changes in memory either, so the caller can refuse the run.
    pub fn accept(&mut self, paths: &Paths, id: &str) -> Result<bool, AgentError> {
        if self.contains(id) {
            return Ok(false);
        }
        let mut next = self.clone();
        next.ids.push_back(id.to_string());
        while next.ids.len() > ACCEPTED_MAX {
            next.ids.pop_front();
        }
        save_json(&paths.run_now(), &next)?;
        *self = next;
        Ok(true)
    }
}

/// A new operation id: `op_` + 32 lowercase hex digits from the OS random source.
pub fn new_operation_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    format!("op_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_now_ids_are_accepted_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::for_config(&dir.path().join("agent.json"));
        let mut accepted = Accepted::load(&paths).unwrap();
        assert!(accepted.accept(&paths, "op_a").unwrap());
        assert!(!accepted.accept(&paths, "op_a").unwrap(), "same process");
        // A restarted agent reads the file before it runs anything.
        let mut restarted = Accepted::load(&paths).unwrap();
        assert!(!restarted.accept(&paths, "op_a").unwrap(), "after a restart");
        assert!(restarted.accept(&paths, "op_b").unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(paths.run_now()).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Bounded: the oldest ids go first.
        for i in 0..ACCEPTED_MAX {
            restarted.accept(&paths, &format!("op_{i}")).unwrap();
        }
        let reloaded = Accepted::load(&paths).unwrap();
        assert_eq!(reloaded.ids.len(), ACCEPTED_MAX);
        assert!(!reloaded.contains("op_a") && reloaded.contains(&format!("op_{}", ACCEPTED_MAX - 1)));
    }

    #[cfg(unix)]
    #[test]
    fn a_run_now_id_that_cannot_be_recorded_is_not_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths { dir: dir.path().join("missing-parent-is-a-file") };
        std::fs::write(&paths.dir, b"x").unwrap();
        let mut accepted = Accepted::default();
        assert!(accepted.accept(&paths, "op_a").is_err());
        assert!(!accepted.contains("op_a"));
    }

    #[test]
    fn operation_ids_are_op_and_32_hex() {
        let a = new_operation_id();
        assert_eq!(a.len(), 35);
        assert!(a.starts_with("op_") && a[3..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, new_operation_id());
    }
}
