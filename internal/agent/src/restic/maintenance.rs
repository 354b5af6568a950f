//! Repository maintenance with the host's restic: `prune --max-unused …` and `check [--read-data-subset …]`, with
//! the same environment, secret files, cancel and timeout handling as backups (the parent module's `Runner`). Their
//! output is text (restic 0.14 has no JSON for either): prune's "total prune: … / …" and "remaining: … / …" lines
//! give what it removed and the size after; check's error lines are kept for the report.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use rm_protocol::backup::{AgentPlan, AgentRepository, FailureReason, OperationStatus};
use rm_protocol::maintenance::{MaintenanceKind, MaintenanceSummary};

use super::output::{self, Ending, Line};
use super::process::{self, Stream};
use super::{Cancel, Job, Outcome, Restic, Runner, Unavailable, ended, flag, human_duration, spawn_error};

/// At most this many check error lines go into a report.
pub const MAX_CHECK_ERRORS: usize = 50;

/// One maintenance run to do.
pub struct MaintenanceJob<'a> {
    pub kind: MaintenanceKind,
    pub repository: &'a AgentRepository,
    /// `--max-unused` (prune) or `--read-data-subset` (check).
    pub option: Option<&'a str>,
    pub state_dir: &'a Path,
    pub cancel: Cancel,
    pub timeout: Duration,
}

/// Runs a prune or check; every way it can end is an [`Outcome`] plus what it found.
pub fn maintain(restic: &Restic, job: &MaintenanceJob<'_>) -> (Outcome, MaintenanceSummary) {
    let mut summary = MaintenanceSummary::default();
    if job.kind == MaintenanceKind::Check {
        summary.read_data_subset = job.option.map(str::to_owned);
    }
    if job.cancel.is_cancelled() {
        return (Outcome::cancelled("cancelled before restic started".into(), None), summary);
    }
    // The runner is the backup's; a maintenance run has no plan, so it gets an empty one (no paths, no tags).
    let plan = AgentPlan {
        name: String::new(),
        repository: job.repository.name.clone(),
        paths: Vec::new(),
        excludes: Vec::new(),
        schedule: String::new(),
        timezone: Default::default(),
        tags: Vec::new(),
        one_file_system: false,
        exclude_caches: false,
        timeout_secs: job.timeout.as_secs(),
        jitter_secs: 0,
        retention: None,
    };
    let backup_job = Job {
        plan: &plan,
        repository: job.repository,
        hostname: "",
        state_dir: job.state_dir,
        cancel: job.cancel.clone(),
        timeout: job.timeout,
    };
    let deadline = Instant::now().checked_add(job.timeout);
    let runner = match Runner::new(restic, &backup_job, deadline) {
        Ok(r) => r,
        Err(message) => return (Outcome::failed(FailureReason::Other, message, None), summary),
    };
    let mut args: Vec<OsString> = Vec::new();
    match (job.kind, job.option) {
        (MaintenanceKind::Prune, Some(max)) => args.push(flag("--max-unused=", max.as_ref())),
        (MaintenanceKind::Check, Some(subset)) => args.push(flag("--read-data-subset=", subset.as_ref())),
        (_, None) => {}
    }
    let mut notes = Vec::new();
    let mut unlock_tried = false;
    loop {
        let run = match run_text(&runner, job.kind.as_str(), &args) {
            Ok(run) => run,
            Err(unavailable) => return (unavailable.into(), summary),
        };
        if let Some(stop) = run.exit.stopped.filter(|_| run.exit.code != Some(0)) {
            let killed = if run.exit.killed { ", and killed after it ignored SIGINT" } else { "" };
            let outcome = match stop {
                process::Stop::Cancelled => {
                    Outcome::cancelled(format!("cancelled: restic was stopped{killed}"), run.exit.code)
                }
                process::Stop::TimedOut => Outcome::failed(
                    FailureReason::Timeout,
                    format!(
                        "restic {} ran longer than its timeout of {} and was stopped{killed}",
                        job.kind,
                        human_duration(job.timeout)
                    ),
                    run.exit.code,
                ),
            };
            return (outcome, summary);
        }
        let ending = output::classify(run.exit.code, &run.tail.words());
        if ending == Ending::Locked && !unlock_tried {
            unlock_tried = true;
            let _ = run_text(&runner, "unlock", &[]);
            super::note(&mut notes, super::UNLOCKED);
            continue;
        }
        // Another live run (a backup that went on without the lease, or a dead host's lock restic does not see as
        // stale yet) holds restic's lock: wait for it until the run's timeout.
        if ending == Ending::Locked && runner.wait_for_lock(&mut notes) {
            unlock_tried = false; // the holder may have died meanwhile: its lock is stale then
            continue;
        }
        if ending == Ending::Locked && job.cancel.is_cancelled() {
            return (
                Outcome::cancelled("cancelled while waiting for the repository's lock".into(), run.exit.code),
                summary,
            );
        }
        match job.kind {
            MaintenanceKind::Prune => read_prune(&run.lines, &mut summary),
            // Only a failed check has errors to report (a successful one's other lines are noise).
            MaintenanceKind::Check if !matches!(ending, Ending::Success | Ending::Warning) => {
                summary.errors = check_errors(&run.lines)
            }
            MaintenanceKind::Check => {}
        }
        let mut parts: Vec<String> = Vec::new();
        let status = match ending {
            Ending::Success | Ending::Warning => {
                if let Some(removed) = &summary.removed {
                    parts.push(format!("removed {removed}"));
                }
                if job.kind == MaintenanceKind::Check {
                    parts.push("no errors were found".into());
                }
                OperationStatus::Success
            }
            Ending::Interrupted => OperationStatus::Cancelled,
            _ => {
                parts.push(
                    run.tail.message().unwrap_or_else(|| format!("restic {} failed ({})", job.kind, ended(&run.exit))),
                );
                OperationStatus::Failed
            }
        };
        parts.extend(notes);
        let reason = match (status, ending) {
            (OperationStatus::Failed, Ending::RepositoryMissing) => Some(FailureReason::RepositoryMissing),
            (OperationStatus::Failed, Ending::WrongPassword) => Some(FailureReason::WrongPassword),
            (OperationStatus::Failed, Ending::Locked) => Some(FailureReason::Locked),
            (OperationStatus::Failed, _) => Some(FailureReason::Other),
            _ => None,
        };
        let outcome = Outcome {
            status,
            summary: None,
            message: (!parts.is_empty()).then(|| parts.join("\n")),
            reason,
            exit_code: run.exit.code,
            snapshots: None,
            forget: None,
        };
        return (outcome, summary);
    }
}

/// One text-mode restic run: the tail for messages, and every line (bounded) for the figures and errors.
struct TextRun {
    exit: process::Exit,
    tail: output::Tail,
    lines: Vec<String>,
}

/// Lines kept of one prune or check (progress lines excluded).
const MAX_LINES: usize = 2_000;

fn run_text(runner: &Runner<'_>, command: &str, args: &[OsString]) -> Result<TextRun, Unavailable> {
    let mut tail = output::Tail::default();
    let mut lines = Vec::new();
    let mut on_line = |_stream: Stream, line: String| {
        let parsed = output::parse_line(&line);
        tail.push_line(&parsed);
        let progress = line.trim_start().starts_with('[');
        if !progress && !matches!(parsed, Line::Ignored) && lines.len() < MAX_LINES {
            lines.push(line);
        }
    };
    let all = runner.args(command, args);
    let cmd = process::command(&runner.restic.path, &all, &runner.env);
    let exit = process::run(cmd, &runner.job.cancel, runner.deadline, 64 * 1024, &mut on_line)
        .map_err(|e| Unavailable(spawn_error(&runner.restic.path, &e)))?;
    Ok(TextRun { exit, tail, lines })
}

/// Prune's figures: `total prune: 12 blobs / 3.051 MiB` and `remaining: 40 blobs / 10.2 MiB` (blob sizes; the size
/// before is their sum).
fn read_prune(lines: &[String], summary: &mut MaintenanceSummary) {
    let figure = |label: &str| -> Option<(String, Option<u64>)> {
        let line = lines.iter().find_map(|l| l.trim().strip_prefix(label).map(str::trim))?;
        let bytes = line.split_once('/').and_then(|(_, size)| parse_size(size.trim()));
        Some((line.to_string(), bytes))
    };
    if let Some((text, bytes)) = figure("total prune:") {
        summary.removed = Some(text.chars().take(200).collect());
        summary.removed_bytes = bytes;
    }
    if let Some((_, Some(after))) = figure("remaining:") {
        summary.size_after = Some(after);
        summary.size_before = summary.removed_bytes.map(|r| r + after);
    }
}

/// `3.051 MiB`, `333 B`, `1.5 GiB` → bytes.
fn parse_size(text: &str) -> Option<u64> {
    let (number, unit) = text.split_once(' ')?;
    let n: f64 = number.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then(|| (n * scale as f64).round() as u64)
}

/// restic check's informational lines; everything else it prints is an error (or a warning) worth reporting.
const CHECK_INFO: &[&str] = &[
    "using temporary cache",
    "create exclusive lock",
    "load indexes",
    "check all packs",
    "check snapshots, trees and blobs",
    "read all data",
    "no errors were found",
    "created new cache",
];

fn check_errors(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .filter(|l| !CHECK_INFO.iter().any(|info| l.starts_with(info)))
        .filter(|l| !(l.starts_with("read ") && l.ends_with("of data packs")))
        // `read group #1 of 0 data packs (out of total 2 packs in 2 groups)` (--read-data-subset=n/t)
        .filter(|l| !(l.starts_with("read group #") && l.contains(" data packs (out of total ")))
        .filter(|l| !l.starts_with("Fatal: repository contains errors"))
        .take(MAX_CHECK_ERRORS)
        .map(|l| l.chars().take(1024).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn prune_figures_are_read_from_its_text() {
        let out = "loading indexes...\nto repack:             0 blobs / 0 B\nthis removes:          0 blobs / 0 B\n\
                   to delete:             1 blobs / 333 B\ntotal prune:           3 blobs / 2.000 MiB\n\
                   remaining:             6 blobs / 4.769 MiB\nunused size after prune: 0 B (0.00% of remaining size)\n";
        let mut s = MaintenanceSummary::default();
        read_prune(&lines(out), &mut s);
        assert_eq!(s.removed.as_deref(), Some("3 blobs / 2.000 MiB"));
        assert_eq!(s.removed_bytes, Some(2 * 1024 * 1024));
        assert_eq!(s.size_after, Some((4.769f64 * 1048576.0).round() as u64));
        assert_eq!(s.size_before, Some(s.removed_bytes.unwrap() + s.size_after.unwrap()));
        let mut none = MaintenanceSummary::default();
        read_prune(&lines("total prune: nonsense\n"), &mut none);
        assert_eq!((none.removed_bytes, none.size_after), (None, None));
        assert_eq!(parse_size("333 B"), Some(333));
        assert_eq!(parse_size("-1 B"), None);
        assert_eq!(parse_size("1 PB"), None);
    }

    #[test]
    fn check_errors_leave_the_informational_lines_out() {
        let out = "using temporary cache in /tmp/x\ncreate exclusive lock for repository\nload indexes\n\
                   check all packs\ncheck snapshots, trees and blobs\nread 100.0% of data packs\n\
                   read group #1 of 0 data packs (out of total 2 packs in 2 groups)\n\
                   Pack ID does not match, want 23d9, got 2f09\nFatal: repository contains errors\n";
        assert_eq!(check_errors(&lines(out)), ["Pack ID does not match, want 23d9, got 2f09"]);
        let many: Vec<String> = (0..200).map(|i| format!("error {i}")).collect();
        assert_eq!(check_errors(&many).len(), MAX_CHECK_ERRORS);
    }
}
