//! Restores and snapshot browsing on the wire: the operator's restore request (`POST /api/v1/agents/{id}/restore`)
//! and file listing (`GET /api/v1/agents/{id}/snapshots/{snapshot}/files?path=`), the restore and listing tasks an
//! agent receives (in heartbeat answers and from the long-poll `GET /api/v1/agents/tasks`), the listing it posts back
//! (`POST /api/v1/agents/tasks/{request_id}`) and what a restore operation reports.
//!
//! Agent-facing bodies never refuse unknown fields; operator input does. The path checks below are applied by the
//! server to operator input and again by the agent to what it receives.

use serde::{Deserialize, Serialize};

use crate::backup::RunNow;
use crate::validate::is_printable;

/// Longest path (include, target, listed directory) accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Most include paths one restore may name.
pub const MAX_INCLUDES: usize = 256;
/// Most entries one listing carries (a larger directory is cut, with `truncated` set).
pub const MAX_ENTRIES: usize = 10_000;
/// Longest wait an agent may ask of `GET /api/v1/agents/tasks` (the server may cut it shorter).
pub const MAX_TASKS_WAIT_SECS: u64 = 25;

// ---------------------------------------------------------------------------------------------------------------
// Operator API
// ---------------------------------------------------------------------------------------------------------------

/// `POST /api/v1/agents/{id}/restore` (admin): restore a snapshot the server knows from reports onto agent `{id}`.
/// Answered 202 [`crate::backup::OperationCreated`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRestore {
    /// The snapshot's full id (64 hex) or a unique prefix of at least 8 hex digits (restic's short id).
    pub snapshot: String,
    /// Absolute paths inside the snapshot to restore (restic's `--include`); empty: everything.
    #[serde(default)]
    pub include: Vec<String>,
    /// An absolute directory on the target host; default: `<agent state dir>/restores/<operation id>`.
    #[serde(default)]
    pub target: Option<String>,
    /// Restore into a directory that already has entries (otherwise the agent refuses at run time).
    #[serde(default)]
    pub overwrite: bool,
    /// The agent whose reported snapshots `snapshot` is looked up in (default: every agent's).
    #[serde(default)]
    pub source_agent: Option<String>,
}

/// `GET /api/v1/agents/{id}/snapshots/{snapshot}/files?path=`: one directory level of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    /// The snapshot's full id.
    pub snapshot: String,
    pub path: String,
    pub entries: Vec<FileEntry>,
    /// The directory has more than [`MAX_ENTRIES`] entries; the first ones are listed.
    #[serde(default)]
    pub truncated: bool,
}

/// One entry of a listed directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    /// `file`, `dir`, `symlink`, `dev`, `chardev`, `fifo`, `socket` or `irregular`, as restic says.
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes, for files.
    #[serde(default)]
    pub size: Option<u64>,
    /// RFC 3339, as restic prints it.
    #[serde(default)]
    pub mtime: Option<String>,
    /// Permission bits (`0o755` = 493), without the type bits.
    #[serde(default)]
    pub mode: Option<u32>,
}

// ---------------------------------------------------------------------------------------------------------------
// Agent ⇄ server
// ---------------------------------------------------------------------------------------------------------------

/// A restore request riding a heartbeat answer or a tasks answer. Repeated until the agent reports the operation
/// (at least once); the agent runs each `operation_id` at most once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTask {
    pub operation_id: String,
    /// The plan that made the snapshot (the operation is reported under it).
    pub plan: String,
    /// The repository, by name, as in the agent's backup config.
    pub repository: String,
    /// The full snapshot id.
    pub snapshot: String,
    #[serde(default)]
    pub include: Vec<String>,
    /// `None`: `<state dir>/restores/<operation id>`.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
}

/// A listing request: run `restic ls` and post the result to `POST /api/v1/agents/tasks/{request_id}`. Not
/// stored by the server: one that is not answered in time is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsTask {
    pub request_id: String,
    pub repository: String,
    pub snapshot: String,
    pub path: String,
}

/// `GET /api/v1/agents/tasks?wait=<secs>&seen=<generation>` (agent credential): answered at once when the agent's
/// task generation differs from `seen` (or `seen` is absent), otherwise when something new arrives for the agent or
/// after `wait` seconds. Lists everything pending for the agent each time; the agent runs each id at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTasks {
    /// Send it back as `seen` to wait for the next change.
    pub generation: u64,
    #[serde(default)]
    pub run_now: Vec<RunNow>,
    #[serde(default)]
    pub restore: Vec<RestoreTask>,
    #[serde(default)]
    pub ls: Vec<LsTask>,
    /// The server holds as many long-polls as it allows: the agent should wait this long before asking again
    /// (heartbeats still bring its requests meanwhile). Absent when the long-poll was served normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

/// `POST /api/v1/agents/tasks/{request_id}`: the answer to an [`LsTask`]. `error` is restic's message when it
/// failed (no such path, unknown snapshot …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsResult {
    #[serde(default)]
    pub entries: Vec<FileEntry>,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// With `error`: the path is not in the snapshot, or is not a directory.
    #[serde(default)]
    pub not_found: bool,
}

/// What a restore operation reports besides its status (in `OperationReport.restore`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreResult {
    /// The directory restored into.
    pub target: String,
    /// The snapshot restored (full id).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Files and bytes restored, when known (restic ≥ 0.16 says; for a fresh target the agent counts them).
    #[serde(default)]
    pub files: Option<u64>,
    #[serde(default)]
    pub bytes: Option<u64>,
}

// ---------------------------------------------------------------------------------------------------------------
// Checks both ends apply
// ---------------------------------------------------------------------------------------------------------------

/// An absolute path on the agent's host: POSIX `/…` or Windows `C:\…` / `C:/…`.
pub fn is_absolute(path: &str) -> bool {
    let b = path.as_bytes();
    path.starts_with('/')
        || (b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'\\' | b'/'))
}

/// Checks a path from an operator or the server: 1..=[`MAX_PATH`] bytes, no control or bidi characters, absolute,
/// and no `.` or `..` component. The error names `field`.
pub fn check_path(field: &str, path: &str) -> Result<(), String> {
    let shown: String = path.chars().take(80).map(|c| if c.is_control() { '?' } else { c }).collect();
    if !is_printable(path, MAX_PATH) {
        return Err(format!("{field}: {shown:?} must be 1-{MAX_PATH} bytes without control characters"));
    }
    if !is_absolute(path) {
        return Err(format!("{field}: {shown:?} is not absolute (/… or C:\\…)"));
    }
    if path.split(['/', '\\']).any(|c| c == ".." || c == ".") {
        return Err(format!("{field}: {shown:?} must not contain . or .. components"));
    }
    Ok(())
}

/// [`check_path`], and absolute on the target agent's recorded OS (`std::env::consts::OS`: `windows` needs
/// `C:\…`/`C:/…`, every other OS `/…`; an empty or unknown OS word is not checked further).
pub fn check_path_for_os(field: &str, path: &str, os: &str) -> Result<(), String> {
    check_path(field, path)?;
    let b = path.as_bytes();
    let drive = b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'\\' | b'/');
    let posix_os =
        matches!(os, "linux" | "macos" | "freebsd" | "openbsd" | "netbsd" | "dragonfly" | "solaris" | "illumos");
    if os == "windows" && !drive {
        return Err(format!("{field}: {path:?} is not absolute on Windows (C:\\…), the target agent's OS"));
    }
    if posix_os && !path.starts_with('/') {
        return Err(format!("{field}: {path:?} is not absolute on {os} (/…), the target agent's OS"));
    }
    Ok(())
}

/// A snapshot id as an operator may write it: 8..=64 hex digits (restic's short id is 8).
pub fn is_snapshot_ref(value: &str) -> bool {
    (8..=64).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks a restore request's fields (not whether the snapshot, agents or repository exist).
pub fn check_restore(r: &CreateRestore) -> Result<(), String> {
    if !is_snapshot_ref(&r.snapshot) {
        return Err("snapshot: must be a snapshot id (8 to 64 hex digits)".into());
    }
    if r.include.len() > MAX_INCLUDES {
        return Err(format!("include: at most {MAX_INCLUDES} paths"));
    }
    for p in &r.include {
        check_path("include", p)?;
    }
    if let Some(t) = &r.target {
        check_path("target", t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_printable_and_without_dot_components() {
        for good in ["/", "/srv/data", "/srv/Grüße ünd spaces", "C:\\Users\\x", "d:/data"] {
            assert!(check_path("target", good).is_ok(), "{good:?}");
        }
        for (bad, words) in [
            ("", "must be 1-"),
            ("relative/dir", "not absolute"),
            ("/srv/../etc", ". or .."),
            ("/srv/./x", ". or .."),
            ("C:\\a\\..\\b", ". or .."),
            ("/srv/a\nb", "control"),
            ("/srv/\u{1b}[31m", "control"),
            ("/srv/\u{202e}txt", "control"),
        ] {
            let e = check_path("target", bad).unwrap_err();
            assert!(e.starts_with("target: ") && e.contains(words), "{bad:?}: {e}");
        }
        assert!(check_path("target", &format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn paths_are_checked_against_the_target_agents_os() {
        assert!(check_path_for_os("target", "/srv/x", "linux").is_ok());
        let e = check_path_for_os("target", "C:/x", "linux").unwrap_err();
        assert!(e.starts_with("target: ") && e.contains("linux"), "{e}");
        assert!(check_path_for_os("include", "C:\\Users\\x", "windows").is_ok());
        assert!(check_path_for_os("include", "d:/data", "windows").is_ok());
        let e = check_path_for_os("include", "/srv/x", "windows").unwrap_err();
        assert!(e.starts_with("include: ") && e.contains("Windows"), "{e}");
        assert!(check_path_for_os("target", "C:/x", "").is_ok(), "an unknown OS: the generic check only");
        assert!(check_path_for_os("target", "relative", "").is_err());
    }

    #[test]
    fn restore_requests_are_checked_field_by_field() {
        let ok = CreateRestore { snapshot: "90a410e6".into(), ..Default::default() };
        assert!(check_restore(&ok).is_ok());
        let bad = |r: CreateRestore| check_restore(&r).unwrap_err();
        assert!(bad(CreateRestore { snapshot: "90a410e".into(), ..ok.clone() }).starts_with("snapshot:"));
        assert!(bad(CreateRestore { snapshot: "latest".into(), ..ok.clone() }).starts_with("snapshot:"));
        assert!(bad(CreateRestore { include: vec!["etc".into()], ..ok.clone() }).starts_with("include:"));
        assert!(bad(CreateRestore { target: Some("tmp/x".into()), ..ok.clone() }).starts_with("target:"));
        let unknown = serde_json::from_str::<CreateRestore>(r#"{"snapshot":"90a410e6","force":true}"#);
        assert!(unknown.is_err(), "operator input refuses unknown fields");
    }

    #[test]
    fn agent_bodies_read_with_unknown_fields_and_defaults() {
        let t: AgentTasks = serde_json::from_str(r#"{"generation":3,"future":1}"#).unwrap();
        assert_eq!(t, AgentTasks { generation: 3, ..Default::default() });
        let r: RestoreTask =
            serde_json::from_str(r#"{"operation_id":"op_1","plan":"p","repository":"r","snapshot":"ab","extra":[1]}"#)
                .unwrap();
        assert_eq!(r.target, None);
        assert!(!r.overwrite && r.include.is_empty());
        let e: FileEntry = serde_json::from_str(r#"{"name":"a","type":"dir"}"#).unwrap();
        assert_eq!(serde_json::to_value(&e).unwrap()["type"], "dir");
    }
}
