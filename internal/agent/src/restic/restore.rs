//! `restic restore` and `restic ls` for the server's restore and listing tasks.
//!
//! restic 0.14 prints no progress or summary for a restore (only `restoring <Snapshot …> to …`), restic 0.16 and
//! newer print `status` and `summary` JSON lines with `--json`: both are read, and what a restore does not say the
//! caller may count itself. `restic ls --json <snapshot> <dir>` prints the snapshot as one line, then the directory
//! itself and its direct children (0.14; newer versions list the same without `--recursive`): only direct children
//! are kept, at most [`MAX_ENTRIES`], and restic is stopped once that many were read.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use rm_protocol::backup::{AgentRepository, FailureReason, OperationStatus, Progress};
use rm_protocol::restore::{FileEntry, LsResult, MAX_ENTRIES};
use serde::Deserialize;

use super::output::{self, Ending, Line};
use super::process::{self, Stream};
use super::{Cancel, Outcome, RESERVED_ENV, Restic, ended, flag, spawn_error};

/// The repository a task opens, and where restic's cache and the secret files go.
pub struct RepoJob<'a> {
    pub repository: &'a AgentRepository,
    pub state_dir: &'a Path,
    pub cancel: Cancel,
    pub timeout: Duration,
}

/// restic's environment for one repository: its URL, a 0600 password file (and CA file), its env; removed on drop.
struct Env {
    vars: Vec<(OsString, OsString)>,
    global: Vec<OsString>,
    _password: process::SecretFile,
    _cacert: Option<process::SecretFile>,
}

impl Env {
    fn new(job: &RepoJob<'_>) -> Result<Env, String> {
        let dir = process::secret_dir(job.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", job.state_dir.join("tmp").display()))?;
        let password = process::SecretFile::create(&dir, job.repository.password.as_bytes())
            .map_err(|e| format!("cannot write the password file in {}: {e}", dir.display()))?;
        let cacert = match &job.repository.ca_cert {
            Some(pem) if !pem.trim().is_empty() => Some(
                process::SecretFile::create(&dir, pem.as_bytes())
                    .map_err(|e| format!("cannot write the CA certificate file in {}: {e}", dir.display()))?,
            ),
            _ => None,
        };
        let mut vars: Vec<(OsString, OsString)> = job
            .repository
            .env
            .iter()
            .filter(|(k, v)| {
                !k.is_empty()
                    && !k.contains(['=', '\0'])
                    && !v.contains('\0')
                    && !RESERVED_ENV.iter().any(|r| k.eq_ignore_ascii_case(r))
            })
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        vars.push(("RESTIC_REPOSITORY".into(), job.repository.url.clone().into()));
        vars.push(("RESTIC_PASSWORD_FILE".into(), password.path().into()));
        let mut global = vec![flag("--cache-dir=", job.state_dir.join("restic-cache").as_os_str())];
        if let Some(ca) = &cacert {
            global.push(flag("--cacert=", ca.path().as_os_str()));
        }
        Ok(Env { vars, global, _password: password, _cacert: cacert })
    }

    fn args(&self, command: &str, args: Vec<OsString>) -> Vec<OsString> {
        let mut all: Vec<OsString> = vec![command.into()];
        all.extend(self.global.iter().cloned());
        all.extend(args);
        all
    }
}

/// What restic ≥ 0.16 says at the end of a restore.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RestoreCounts {
    pub files_restored: Option<u64>,
    pub bytes_restored: Option<u64>,
    pub total_files: Option<u64>,
    pub total_bytes: Option<u64>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    message_type: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RestoreStatus {
    percent_done: f64,
    total_files: u64,
    files_restored: u64,
    total_bytes: u64,
    bytes_restored: u64,
    seconds_elapsed: u64,
}

/// How a restore ended, and the counts restic gave (≥ 0.16).
pub struct Restored {
    pub outcome: Outcome,
    pub counts: Option<RestoreCounts>,
}

/// Runs `restic restore <snapshot> --target <target> [--include P]…` (`snapshot` and paths checked by the caller).
pub fn restore(
    restic: &Restic,
    job: &RepoJob<'_>,
    snapshot: &str,
    target: &Path,
    include: &[String],
    on_progress: &mut dyn FnMut(&Progress),
) -> Restored {
    let failed = |reason, message: String, code| Restored {
        outcome: Outcome {
            status: OperationStatus::Failed,
            summary: None,
            message: Some(message),
            reason: Some(reason),
            exit_code: code,
            snapshots: None,
            forget: None,
        },
        counts: None,
    };
    if job.cancel.is_cancelled() {
        return Restored { outcome: Outcome::cancelled("cancelled before restic started".into(), None), counts: None };
    }
    let env = match Env::new(job) {
        Ok(env) => env,
        Err(message) => return failed(FailureReason::Other, message, None),
    };
    let mut args: Vec<OsString> = vec!["--json".into(), flag("--target=", target.as_os_str())];
    args.extend(include.iter().map(|p| flag("--include=", p.as_ref())));
    // The snapshot id last, after `--`: it is hex, but nothing the server sends is read as a flag.
    args.push("--".into());
    args.push(snapshot.into());
    let args = env.args("restore", args);
    let mut tail = output::Tail::default();
    let mut counts = None;
    let mut on_line = |_stream: Stream, line: String| {
        let kind = serde_json::from_str::<Message>(&line).map(|m| m.message_type).unwrap_or_default();
        match kind.as_str() {
            "summary" => counts = serde_json::from_str::<RestoreCounts>(&line).ok(),
            "status" => {
                if let Ok(s) = serde_json::from_str::<RestoreStatus>(&line) {
                    on_progress(&Progress {
                        percent_done: if s.percent_done.is_finite() { s.percent_done } else { 0.0 },
                        total_files: s.total_files,
                        files_done: s.files_restored,
                        total_bytes: s.total_bytes,
                        bytes_done: s.bytes_restored,
                        seconds_elapsed: s.seconds_elapsed,
                        seconds_remaining: None,
                    });
                }
            }
            _ => match output::parse_line(&line) {
                Line::Status(_) | Line::Summary(_) => {}
                other => tail.push_line(&other),
            },
        }
    };
    let deadline = Instant::now().checked_add(job.timeout);
    let cmd = process::command(&restic.path, &args, &env.vars);
    let exit = match process::run(cmd, &job.cancel, deadline, 256 * 1024, &mut on_line) {
        Ok(exit) => exit,
        Err(e) => return failed(FailureReason::ResticUnavailable, spawn_error(&restic.path, &e), None),
    };
    let code = exit.code;
    if let (Some(stop), false) = (exit.stopped, code == Some(0)) {
        return Restored {
            outcome: match stop {
                process::Stop::Cancelled => Outcome::cancelled("cancelled: restic was stopped".into(), code),
                process::Stop::TimedOut => Outcome::failed(
                    FailureReason::Timeout,
                    format!("the restore ran longer than {} s and was stopped", job.timeout.as_secs()),
                    code,
                ),
            },
            counts,
        };
    }
    let message = tail.message();
    let reason = match output::classify(code, &tail.words()) {
        Ending::Success => {
            let outcome = Outcome {
                status: OperationStatus::Success,
                summary: None,
                message,
                reason: None,
                exit_code: code,
                snapshots: None,
                forget: None,
            };
            return Restored { outcome, counts };
        }
        Ending::Interrupted => {
            return Restored {
                outcome: Outcome::cancelled(message.unwrap_or_else(|| "restic was interrupted".into()), code),
                counts,
            };
        }
        Ending::RepositoryMissing => FailureReason::RepositoryMissing,
        Ending::WrongPassword => FailureReason::WrongPassword,
        Ending::Locked => FailureReason::Locked,
        Ending::Warning | Ending::Other => FailureReason::Other,
    };
    let message = message.unwrap_or_else(|| format!("restic restore failed ({})", ended(&exit)));
    failed(reason, message, code)
}

/// One node of `restic ls --json`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Node {
    struct_type: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    path: String,
    size: Option<u64>,
    mode: Option<u64>,
    mtime: Option<String>,
}

/// `path` without trailing slashes (`/` stays `/`).
fn trimmed(path: &str) -> &str {
    let t = path.trim_end_matches('/');
    if t.is_empty() { "/" } else { t }
}

/// The directory holding `path` (`/a/b` → `/a`, `/a` → `/`).
fn parent(path: &str) -> &str {
    match trimmed(path).rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

/// What the lines of `restic ls --json` come to for directory `dir`.
#[derive(Default)]
struct Listing {
    dir: String,
    entries: Vec<FileEntry>,
    /// The directory's own node (absent for `/`, which has none).
    itself: Option<String>,
    truncated: bool,
}

impl Listing {
    /// Takes one output line; false once enough was read (the caller stops restic).
    fn push(&mut self, line: &str) -> bool {
        let Ok(node) = serde_json::from_str::<Node>(line) else { return true };
        if node.struct_type != "node" {
            return true;
        }
        if trimmed(&node.path) == self.dir {
            self.itself = Some(node.kind);
            return true;
        }
        if parent(&node.path) != self.dir || node.name.is_empty() {
            return true;
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.truncated = true;
            return false;
        }
        self.entries.push(FileEntry {
            name: node.name,
            kind: node.kind,
            size: node.size,
            mtime: node.mtime,
            mode: node.mode.map(|m| (m & 0o7777) as u32),
        });
        true
    }
}

/// Lists directory `dir` of `snapshot` one level deep (`restic ls --json --no-lock`). Never fails: an error is in
/// the result.
pub fn ls(restic: &Restic, job: &RepoJob<'_>, snapshot: &str, dir: &str) -> LsResult {
    let error = |message: String, not_found: bool| LsResult { error: Some(message), not_found, ..Default::default() };
    let env = match Env::new(job) {
        Ok(env) => env,
        Err(message) => return error(message, false),
    };
    let args = env.args("ls", vec!["--json".into(), "--no-lock".into(), "--".into(), snapshot.into(), dir.into()]);
    let mut listing = Listing { dir: trimmed(dir).to_string(), ..Default::default() };
    let mut tail = output::Tail::default();
    // Stopped early once the listing is full; the job's own cancel stops it too.
    let enough = Cancel::default();
    let outer = job.cancel.clone();
    let stop = enough.clone();
    let mut on_line = |stream: Stream, line: String| {
        if outer.is_cancelled() {
            stop.cancel();
        }
        match stream {
            Stream::Stdout => {
                if !listing.push(&line) {
                    stop.cancel();
                }
            }
            Stream::Stderr => tail.push_line(&output::parse_line(&line)),
        }
    };
    let deadline = Instant::now().checked_add(job.timeout);
    let cmd = process::command(&restic.path, &args, &env.vars);
    let exit = match process::run(cmd, &enough, deadline, 64 * 1024, &mut on_line) {
        Ok(exit) => exit,
        Err(e) => return error(spawn_error(&restic.path, &e), false),
    };
    if listing.truncated {
        return LsResult { entries: listing.entries, truncated: true, ..Default::default() };
    }
    if exit.stopped.is_some() && exit.code != Some(0) {
        return error(format!("restic ls was stopped ({})", ended(&exit)), false);
    }
    if exit.code != Some(0) {
        return error(tail.message().unwrap_or_else(|| format!("restic ls failed ({})", ended(&exit))), false);
    }
    match listing.itself.as_deref() {
        Some("dir") => {}
        None if listing.dir == "/" || !listing.entries.is_empty() => {}
        None => return error(format!("{dir} is not in snapshot {snapshot}"), true),
        Some(kind) => return error(format!("{dir} is a {kind} in snapshot {snapshot}, not a directory"), true),
    }
    listing.entries.sort_by(|a, b| a.name.cmp(&b.name));
    LsResult { entries: listing.entries, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_keep_direct_children_only() {
        let mut l = Listing { dir: "/srv/data".into(), ..Default::default() };
        let lines = [
            r#"{"time":"2026-12-02T13:17:45Z","paths":["/srv/data"],"id":"82","struct_type":"snapshot"}"#,
            r#"{"name":"data","type":"dir","path":"/srv/data","mode":2147484141,"struct_type":"node"}"#,
            r#"{"name":"a b","type":"dir","path":"/srv/data/a b","mode":2147484141,"struct_type":"node"}"#,
            r#"{"name":"f1","type":"file","path":"/srv/data/f1","size":3,"mode":420,"mtime":"2026-12-02T13:17:36Z","struct_type":"node"}"#,
            r#"{"name":"deep","type":"file","path":"/srv/data/a b/deep","size":9,"struct_type":"node"}"#,
            "not json",
        ];
        for line in lines {
            assert!(l.push(line));
        }
        assert_eq!(l.itself.as_deref(), Some("dir"));
        let names: Vec<_> = l.entries.iter().map(|e| (e.name.as_str(), e.kind.as_str(), e.size, e.mode)).collect();
        assert_eq!(names, [("a b", "dir", None, Some(0o755)), ("f1", "file", Some(3), Some(0o644))]);
        let mut root = Listing { dir: "/".into(), ..Default::default() };
        assert!(root.push(r#"{"name":"srv","type":"dir","path":"/srv","struct_type":"node"}"#));
        assert!(root.push(r#"{"name":"x","type":"dir","path":"/srv/x","struct_type":"node"}"#));
        assert_eq!(root.entries.len(), 1);
        assert_eq!((parent("/a/b/"), parent("/a"), trimmed("/a/b/")), ("/a", "/", "/a/b"));
    }

    #[test]
    fn a_full_listing_stops_reading() {
        let mut l = Listing { dir: "/d".into(), ..Default::default() };
        for i in 0..MAX_ENTRIES {
            let line = format!(r#"{{"name":"f{i}","type":"file","path":"/d/f{i}","struct_type":"node"}}"#);
            assert!(l.push(&line));
        }
        assert!(!l.push(r#"{"name":"more","type":"file","path":"/d/more","struct_type":"node"}"#));
        assert!(l.truncated);
        assert_eq!(l.entries.len(), MAX_ENTRIES);
    }
}
