//! The `operations`, `plan_status`, `snapshots` and `leases` tables: what agents report about each run, what the
//! operator lists, the per-host backup health, and the repository leases that keep two agents from running restic on
//! one repository at the same time.
//!
//! Reports are keyed by their operation id: a repeated report changes nothing and a final status is never overwritten,
//! so an agent may resend its on-disk queue after any failure. A batch is all or nothing (its own savepoint).
//!
//! The views returned here are `rm_protocol::backup`'s (`OperationView`, `PlanHealth`, `PlanSnapshot`): they are
//! plain data built from rows, shared by the API, the command line and the metrics.

use std::collections::{BTreeMap, HashMap};

use rm_protocol::backup::{
    self, BackupSummary, FailureReason, Health, OperationKind, OperationQuery, OperationReport, OperationStatus,
    OperationView, PlanHealth, PlanSnapshot, Progress, Snapshot, Timezone, Trigger,
};
use rm_protocol::retention::{ForgetSummary, MAX_REMOVED_IDS};
use rm_protocol::schedule::Schedule;
use rm_protocol::validate::{is_printable, is_unsafe_char};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::DbError;
use crate::time::Timestamp;

/// Longest plan name a report may carry.
pub const MAX_PLAN_NAME: usize = 128;
/// Messages longer than this (bytes) are cut.
pub const MAX_MESSAGE: usize = 8 * 1024;
/// Most snapshots one report may list.
pub const MAX_SNAPSHOTS: usize = 10_000;
/// Most reports in one batch.
pub const MAX_BATCH: usize = 1_000;
/// How far in the future (agent clock skew) a report's times may lie.
const MAX_CLOCK_SKEW: i64 = 86_400;
/// Default and largest page of [`list_operations`].
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;
/// Lease lifetimes are clamped to this range (seconds).
pub const LEASE_TTL: std::ops::RangeInclusive<u64> = 10..=3600;

/// Why a batch of reports was refused; nothing of it was stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("report {index}: {reason}")]
    Invalid { index: usize, reason: String },
    #[error("operation {id} belongs to another agent")]
    ForeignOperation { id: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for IngestError {
    fn from(e: rusqlite::Error) -> IngestError {
        IngestError::Db(e.into())
    }
}

/// `op_` followed by 32 lowercase hex digits.
pub fn is_operation_id(id: &str) -> bool {
    id.len() == 35 && id.starts_with("op_") && id[3..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A message from restic, made safe to store and show: line breaks and tabs kept, other unsafe characters blanked,
/// cut to [`MAX_MESSAGE`] bytes on a character boundary.
fn clean_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE));
    for c in text.chars() {
        if out.len() + c.len_utf8() > MAX_MESSAGE {
            break;
        }
        out.push(if c == '\n' || c == '\t' || !is_unsafe_char(c) { c } else { ' ' });
    }
    out
}

fn check_snapshot(s: &Snapshot) -> Result<(), String> {
    let hex = |v: &str, max: usize| !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(&s.id, 64) {
        return Err(format!("snapshot id {:?} is not 1..=64 hex digits", s.id.chars().take(80).collect::<String>()));
    }
    if !s.short_id.is_empty() && !hex(&s.short_id, 64) {
        return Err(format!("snapshot {}: short_id is not hex", s.id));
    }
    if !is_printable(&s.time, 64) {
        return Err(format!("snapshot {}: time must be 1..=64 printable characters", s.id));
    }
    if !s.hostname.is_empty() && !is_printable(&s.hostname, 253) {
        return Err(format!("snapshot {}: hostname is not printable", s.id));
    }
    if s.paths.len() > 1_000 || s.paths.iter().any(|p| !is_printable(p, 4096)) {
        return Err(format!("snapshot {}: at most 1000 printable paths of at most 4096 bytes", s.id));
    }
    if s.tags.len() > 100 || s.tags.iter().any(|t| !is_printable(t, 256)) {
        return Err(format!("snapshot {}: at most 100 printable tags of at most 256 bytes", s.id));
    }
    Ok(())
}

/// A report, checked and normalised (message cleaned).
fn checked(now: Timestamp, r: &OperationReport) -> Result<OperationReport, String> {
    if !is_operation_id(&r.id) {
        return Err(format!("id {:?} is not op_ + 32 lowercase hex digits", r.id.chars().take(64).collect::<String>()));
    }
    match &r.repository {
        // A repository-level operation (prune, check): no plan, a repository name.
        Some(repository) => {
            if !matches!(r.kind, OperationKind::Prune | OperationKind::Check) {
                return Err(format!("{}: only prune and check operations name a repository", r.id));
            }
            rm_protocol::validate::name("name", repository).map_err(|e| format!("{}: repository: {e}", r.id))?;
            if !r.plan.is_empty() {
                return Err(format!("{}: plan must be empty in an operation that names a repository", r.id));
            }
        }
        None if !is_printable(&r.plan, MAX_PLAN_NAME) => {
            return Err(format!("{}: plan must be 1..={MAX_PLAN_NAME} printable characters", r.id));
        }
        None => {}
    }
    if let Some(m) = &r.maintenance {
        if m.errors.len() > 1_000 || m.errors.iter().any(|e| e.len() > MAX_MESSAGE) {
            return Err(format!("{}: maintenance.errors: at most 1000 lines of at most {MAX_MESSAGE} bytes", r.id));
        }
        let texts = [&m.removed, &m.read_data_subset];
        if texts.iter().any(|t| t.as_deref().is_some_and(|t| !is_printable(t, 256))) {
            return Err(format!("{}: maintenance: removed and read_data_subset must be printable", r.id));
        }
    }
    if r.status == OperationStatus::Queued {
        return Err(format!("{}: status queued is the server's, not a report", r.id));
    }
    let latest = now + MAX_CLOCK_SKEW;
    if r.started_at <= 0 || r.started_at > latest {
        return Err(format!("{}: started_at {} is not a time up to a day ahead of the server's", r.id, r.started_at));
    }
    if let Some(f) = r.finished_at {
        if f < r.started_at || f > latest {
            return Err(format!("{}: finished_at {f} is before started_at or more than a day ahead", r.id));
        }
    }
    if r.finished_at.is_some() && !r.status.is_final() {
        return Err(format!("{}: finished_at is set but status {} is not final", r.id, r.status));
    }
    if let Some(d) = r.duration_ms {
        if d > i64::MAX as u64 {
            return Err(format!("{}: duration_ms is out of range", r.id));
        }
    }
    if let Some(id) = r.summary.as_ref().and_then(|s| s.snapshot_id.as_deref()) {
        if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{}: summary.snapshot_id is not hex", r.id));
        }
    }
    if let Some(p) = &r.progress {
        if !p.percent_done.is_finite() {
            return Err(format!("{}: progress.percent_done is not a number", r.id));
        }
    }
    if let Some(s) = &r.summary {
        if !s.total_duration.is_finite() {
            return Err(format!("{}: summary.total_duration is not a number", r.id));
        }
    }
    if let Some(f) = &r.forget {
        if r.kind != OperationKind::Forget {
            return Err(format!("{}: forget is only for operations of kind forget", r.id));
        }
        if f.removed_ids.len() > MAX_REMOVED_IDS {
            return Err(format!("{}: forget.removed_ids lists at most {MAX_REMOVED_IDS} ids", r.id));
        }
        if let Some(bad) =
            f.removed_ids.iter().find(|id| id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!(
                "{}: forget.removed_ids: {:?} is not 1..=64 hex digits",
                r.id,
                bad.chars().take(80).collect::<String>()
            ));
        }
        if (f.removed_ids.len() as u64) > f.removed {
            return Err(format!("{}: forget.removed_ids lists more ids than forget.removed counts", r.id));
        }
    }
    if let Some(list) = &r.snapshots {
        if list.len() > MAX_SNAPSHOTS {
            return Err(format!("{}: at most {MAX_SNAPSHOTS} snapshots per report", r.id));
        }
        for s in list {
            check_snapshot(s).map_err(|e| format!("{}: {e}", r.id))?;
        }
    }
    let mut r = r.clone();
    r.message = r.message.as_deref().map(clean_message);
    if let Some(m) = &mut r.maintenance {
        m.errors = m.errors.iter().map(|e| clean_message(e)).collect();
    }
    Ok(r)
}

/// The JSON spelling of a unit enum (`"run_now"` → `run_now`).
fn word<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => other.map(|v| v.to_string()).unwrap_or_default(),
    }
}

fn from_word<T: DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

fn json<T: Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref().and_then(|v| serde_json::to_string(v).ok())
}

/// Stores a batch of reports from `agent_id` (authenticated by the caller). All or nothing: an invalid report or an
/// operation id of another agent refuses the whole batch and nothing is written. A new id is inserted; an id whose
/// operation is final is left as it is (a resent report changes nothing); a queued or running one is updated. A final
/// report updates the plan's status on the host, and a report with `snapshots` replaces the host's snapshots of that
/// plan. Returns how many reports the batch had (stored or already stored).
pub fn ingest_reports(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    reports: &[OperationReport],
) -> Result<usize, IngestError> {
    if reports.len() > MAX_BATCH {
        return Err(IngestError::Invalid { index: MAX_BATCH, reason: format!("at most {MAX_BATCH} reports a batch") });
    }
    let reports: Vec<OperationReport> = reports
        .iter()
        .enumerate()
        .map(|(index, r)| checked(now, r).map_err(|reason| IngestError::Invalid { index, reason }))
        .collect::<Result<_, _>>()?;
    conn.execute_batch("SAVEPOINT ingest")?;
    match store_reports(conn, now, agent_id, &reports) {
        Ok(()) => {
            conn.execute_batch("RELEASE ingest")?;
            Ok(reports.len())
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO ingest; RELEASE ingest")?;
            Err(e)
        }
    }
}

fn store_reports(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    reports: &[OperationReport],
) -> Result<(), IngestError> {
    let mut find = conn.prepare_cached("SELECT agent_id, plan, status, kind FROM operations WHERE id = ?1")?;
    for (index, r) in reports.iter().enumerate() {
        let existing: Option<(String, String, String, String)> =
            find.query_row([&r.id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))).optional()?;
        let finished_at = r.finished_at.or(r.status.is_final().then_some(now));
        match existing {
            Some((owner, ..)) if owner != agent_id => return Err(IngestError::ForeignOperation { id: r.id.clone() }),
            Some((_, plan, ..)) if plan != r.plan => {
                return Err(IngestError::Invalid {
                    index,
                    reason: format!("{}: the operation is of plan {plan:?}, not {:?}", r.id, r.plan),
                });
            }
            // The stored row's kind is what the operation is (a queued run-now is a backup, a restore a restore): a
            // report saying otherwise would, say, let a backup's snapshot list replace the plan's under another kind.
            Some((_, _, _, kind)) if kind != word(&r.kind) => {
                return Err(IngestError::Invalid {
                    index,
                    reason: format!("{}: the operation is of kind {kind}, not {}", r.id, word(&r.kind)),
                });
            }
            Some((_, _, status, _)) if from_word::<OperationStatus>(&status).is_none_or(|s| s.is_final()) => continue,
            Some(_) => {
                conn.prepare_cached(
                    "UPDATE operations SET status = ?2, started_at = ?3, finished_at = ?4, duration_ms = ?5,
                            summary = coalesce(?6, summary), progress = coalesce(?7, progress), message = ?8,
                            reason = ?9, exit_code = ?10, forget = coalesce(?11, forget),
                            maintenance = coalesce(?12, maintenance)
                     WHERE id = ?1",
                )?
                .execute(params![
                    r.id,
                    r.status.as_str(),
                    r.started_at,
                    finished_at,
                    r.duration_ms.map(|d| d as i64),
                    json(&r.summary),
                    json(&r.progress),
                    r.message,
                    r.reason.as_ref().map(word),
                    r.exit_code,
                    json(&r.forget),
                    json(&r.maintenance),
                ])?;
            }
            None => {
                conn.prepare_cached(
                    "INSERT INTO operations (id, agent_id, plan, kind, trigger, status, created_at, started_at,
                                             finished_at, duration_ms, summary, progress, message, reason, exit_code,
                                             forget, repository, maintenance)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                )?
                .execute(params![
                    r.id,
                    agent_id,
                    r.plan,
                    word(&r.kind),
                    word(&r.trigger),
                    r.status.as_str(),
                    now,
                    r.started_at,
                    finished_at,
                    r.duration_ms.map(|d| d as i64),
                    json(&r.summary),
                    json(&r.progress),
                    r.message,
                    r.reason.as_ref().map(word),
                    r.exit_code,
                    json(&r.forget),
                    r.repository,
                    json(&r.maintenance),
                ])?;
            }
        }
        if let Some(repository) = &r.repository {
            // Only an agent that uses the repository (a plan of it applies to the agent) moves its health and
            // covered slots; another agent's report is stored as an operation and changes nothing else.
            if let (true, Some(finished_at)) = (r.status.is_final(), finished_at) {
                if crate::maintenance::agent_uses(conn, agent_id, repository)? {
                    crate::maintenance::record_final(
                        conn,
                        now,
                        agent_id,
                        repository,
                        r.kind,
                        &r.id,
                        r.status,
                        r.reason,
                        finished_at,
                        r.maintenance.as_ref().and_then(|m| m.slot),
                    )?;
                }
            }
            continue; // no plan status, no snapshots
        }
        // A cancelled run (the agent stopped, the plan changed, a run-now merged into another) says nothing about
        // the plan's health: the status stays what the last run that ended on its own made it.
        // Only backups make a plan's health: a forget (retention after a backup) is its own operation, listed and
        // counted in the operations, but its failure does not undo the snapshot the backup made; a restore (reported
        // under the snapshot's plan) says nothing about it either.
        let counts = r.kind == OperationKind::Backup && r.status.is_final() && r.status != OperationStatus::Cancelled;
        if let (true, Some(finished_at)) = (counts, finished_at) {
            let success = matches!(r.status, OperationStatus::Success | OperationStatus::Warning);
            // An older run's report arriving after a newer one's does not move the status back.
            conn.prepare_cached(
                "INSERT INTO plan_status (agent_id, plan, last_operation, last_status, last_finished_at,
                                          last_success_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (agent_id, plan) DO UPDATE SET
                    last_operation = CASE WHEN excluded.last_finished_at >= last_finished_at
                                          THEN excluded.last_operation ELSE last_operation END,
                    last_status = CASE WHEN excluded.last_finished_at >= last_finished_at
                                       THEN excluded.last_status ELSE last_status END,
                    last_success_at = CASE WHEN excluded.last_success_at IS NULL THEN last_success_at
                                           WHEN last_success_at IS NULL
                                                OR excluded.last_success_at > last_success_at
                                           THEN excluded.last_success_at ELSE last_success_at END,
                    last_finished_at = max(last_finished_at, excluded.last_finished_at)",
            )?
            .execute(params![
                agent_id,
                r.plan,
                r.id,
                r.status.as_str(),
                finished_at,
                success.then_some(finished_at)
            ])?;
        }
        if let (OperationKind::Restore, Some(result)) = (r.kind, &r.restore) {
            crate::restores::store_result(conn, &r.id, result)?;
        }
        if let Some(list) = &r.snapshots {
            conn.prepare_cached("DELETE FROM snapshots WHERE agent_id = ?1 AND plan = ?2")?
                .execute(params![agent_id, r.plan])?;
            let mut insert = conn.prepare_cached(
                "INSERT OR REPLACE INTO snapshots (agent_id, plan, id, short_id, time, hostname, paths, tags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for s in list {
                insert.execute(params![
                    agent_id,
                    r.plan,
                    s.id.to_ascii_lowercase(),
                    s.short_id.to_ascii_lowercase(),
                    s.time,
                    s.hostname,
                    serde_json::to_string(&s.paths).unwrap_or_else(|_| "[]".into()),
                    serde_json::to_string(&s.tags).unwrap_or_else(|_| "[]".into()),
                ])?;
            }
        }
    }
    Ok(())
}

const VIEW_COLUMNS: &str = "o.seq, o.id, o.agent_id, a.hostname, o.plan, o.kind, o.trigger, o.status, o.created_at,
     o.started_at, o.finished_at, o.duration_ms, o.summary, o.progress, o.message, o.reason, o.exit_code, o.forget,
     o.repository, o.maintenance";

/// An operation row (selected with [`VIEW_COLUMNS`] from `operations o LEFT JOIN agents a`) and its `seq`.
fn view_of(row: &Row<'_>) -> rusqlite::Result<(i64, OperationView)> {
    let text = |i: usize| row.get::<_, Option<String>>(i);
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, format!("unknown {what}").into())
    };
    let kind: String = row.get(5)?;
    let trigger: String = row.get(6)?;
    let status: String = row.get(7)?;
    Ok((
        row.get(0)?,
        OperationView {
            id: row.get(1)?,
            agent_id: row.get(2)?,
            hostname: row.get(3)?,
            plan: row.get(4)?,
            kind: from_word::<OperationKind>(&kind).ok_or_else(|| bad(5, "kind"))?,
            trigger: from_word::<Trigger>(&trigger).ok_or_else(|| bad(6, "trigger"))?,
            status: from_word::<OperationStatus>(&status).ok_or_else(|| bad(7, "status"))?,
            created_at: row.get(8)?,
            started_at: row.get(9)?,
            finished_at: row.get(10)?,
            duration_ms: row.get::<_, Option<i64>>(11)?.map(|d| d.max(0) as u64),
            summary: text(12)?.and_then(|s| serde_json::from_str::<BackupSummary>(&s).ok()),
            progress: text(13)?.and_then(|s| serde_json::from_str::<Progress>(&s).ok()),
            message: row.get(14)?,
            reason: text(15)?.and_then(|s| from_word::<FailureReason>(&s)),
            exit_code: row.get(16)?,
            forget: text(17)?.and_then(|s| serde_json::from_str::<ForgetSummary>(&s).ok()),
            restore: None, // filled in by `with_restore` where restores are shown
            repository: row.get(18)?,
            maintenance: text(19)?.and_then(|s| serde_json::from_str(&s).ok()),
        },
    ))
}

/// One page of operations, newest first (by `seq`), filtered by agent, plan and status, below the `before` cursor.
/// `limit` defaults to [`DEFAULT_PAGE`] and is capped at [`MAX_PAGE`]. The second value is the cursor of the next
/// page when this one is full.
pub fn list_operations(
    conn: &Connection,
    query: &OperationQuery,
) -> Result<(Vec<OperationView>, Option<i64>), DbError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let mut sql = format!("SELECT {VIEW_COLUMNS} FROM operations o LEFT JOIN agents a ON a.id = o.agent_id WHERE 1");
    // Only the filters given are in the statement, so SQLite can use the matching index; one cached statement each.
    if query.agent.is_some() {
        sql += " AND o.agent_id = :agent";
    }
    if query.plan.is_some() {
        sql += " AND o.plan = :plan";
    }
    if query.status.is_some() {
        sql += " AND o.status = :status";
    }
    if query.kind.is_some() {
        sql += " AND o.kind = :kind";
    }
    if query.repository.is_some() {
        sql += " AND o.repository = :repository";
    }
    if query.before.is_some() {
        sql += " AND o.seq < :before";
    }
    sql += " ORDER BY o.seq DESC LIMIT :limit";
    let mut stmt = conn.prepare_cached(&sql)?;
    let status = query.status.map(OperationStatus::as_str);
    let kind = query.kind.as_ref().map(word);
    let mut named: Vec<(&str, &dyn rusqlite::ToSql)> = vec![(":limit", &limit)];
    if let Some(agent) = &query.agent {
        named.push((":agent", agent));
    }
    if let Some(plan) = &query.plan {
        named.push((":plan", plan));
    }
    if let Some(status) = &status {
        named.push((":status", status));
    }
    if let Some(kind) = &kind {
        named.push((":kind", kind));
    }
    if let Some(repository) = &query.repository {
        named.push((":repository", repository));
    }
    if let Some(before) = &query.before {
        named.push((":before", before));
    }
    let rows: Vec<(i64, OperationView)> = stmt.query_map(named.as_slice(), view_of)?.collect::<Result<_, _>>()?;
    let next = (rows.len() == limit as usize).then(|| rows.last().map(|(seq, _)| *seq)).flatten();
    let views = rows.into_iter().map(|(_, v)| with_restore(conn, v)).collect::<Result<_, _>>()?;
    Ok((views, next))
}

/// One operation by id.
pub fn get_operation(conn: &Connection, id: &str) -> Result<Option<OperationView>, DbError> {
    let sql =
        format!("SELECT {VIEW_COLUMNS} FROM operations o LEFT JOIN agents a ON a.id = o.agent_id WHERE o.id = ?1");
    conn.prepare_cached(&sql)?.query_row([id], view_of).optional()?.map(|(_, v)| with_restore(conn, v)).transpose()
}

/// A restore operation's view with what its agent reported about the restore (target, counts).
fn with_restore(conn: &Connection, mut view: OperationView) -> Result<OperationView, DbError> {
    if view.kind == OperationKind::Restore {
        view.restore = crate::restores::result_of(conn, &view.id)?;
    }
    Ok(view)
}

/// What an agent last reported about its snapshots, newest first; `None` for an unknown agent.
pub fn list_snapshots(conn: &Connection, agent_id: &str) -> Result<Option<Vec<PlanSnapshot>>, DbError> {
    let known = conn.prepare_cached("SELECT 1 FROM agents WHERE id = ?1")?.exists([agent_id])?;
    if !known {
        return Ok(None);
    }
    let mut stmt = conn
        .prepare_cached("SELECT plan, id, short_id, time, hostname, paths, tags FROM snapshots WHERE agent_id = ?1")?;
    let mut list: Vec<PlanSnapshot> = stmt
        .query_map([agent_id], |r| {
            let paths: String = r.get(5)?;
            let tags: String = r.get(6)?;
            Ok(PlanSnapshot {
                plan: r.get(0)?,
                snapshot: Snapshot {
                    id: r.get(1)?,
                    short_id: r.get(2)?,
                    time: r.get(3)?,
                    hostname: r.get(4)?,
                    paths: serde_json::from_str(&paths).unwrap_or_default(),
                    tags: serde_json::from_str(&tags).unwrap_or_default(),
                },
            })
        })?
        .collect::<Result<_, _>>()?;
    // restic prints local times with their offset (and nanoseconds): compare instants, not strings.
    let instant = |s: &PlanSnapshot| chrono::DateTime::parse_from_rfc3339(&s.snapshot.time).ok();
    list.sort_by(|a, b| instant(b).cmp(&instant(a)).then_with(|| b.snapshot.time.cmp(&a.snapshot.time)));
    Ok(Some(list))
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// The caller holds the repository's lease until `expires_at`.
    Granted { expires_at: Timestamp },
    /// Another run holds it; try again in `retry_after_secs`.
    Busy { holder_agent: String, holder_operation: String, retry_after_secs: u64 },
}

/// Takes or renews the run lease of `repository` for `agent_id`'s operation `operation_id`: granted when the lease is
/// free, expired, or already this operation's; `expires_at = now + ttl` with the ttl clamped to [`LEASE_TTL`].
pub fn take_lease(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    repository: &str,
    operation_id: &str,
    ttl_secs: u64,
) -> Result<Lease, DbError> {
    take_lease_capped(conn, now, agent_id, repository, operation_id, ttl_secs, *LEASE_TTL.end())
}

/// [`take_lease`] with the lifetime also capped at `max_ttl` (the server's `--max-lease-ttl`). A refused request is
/// noted as a waiting backup, which maintenance yields to ([`crate::maintenance`]).
pub fn take_lease_capped(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    repository: &str,
    operation_id: &str,
    ttl_secs: u64,
    max_ttl: u64,
) -> Result<Lease, DbError> {
    let lease = take_backup_lease(conn, now, agent_id, repository, operation_id, ttl_secs, max_ttl)?;
    crate::maintenance::note_backup_lease(conn, now, agent_id, repository, operation_id, &lease)?;
    Ok(lease)
}

fn take_backup_lease(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    repository: &str,
    operation_id: &str,
    ttl_secs: u64,
    max_ttl: u64,
) -> Result<Lease, DbError> {
    let held: Option<(String, String, Timestamp)> = conn
        .prepare_cached("SELECT agent_id, operation_id, expires_at FROM leases WHERE repository = ?1")?
        .query_row([repository], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((holder_agent, holder_operation, expires_at)) = held {
        let ours = holder_agent == agent_id && holder_operation == operation_id;
        if !ours && expires_at > now {
            return Ok(Lease::Busy {
                holder_agent,
                holder_operation,
                retry_after_secs: (expires_at - now).max(1) as u64,
            });
        }
    }
    let max_ttl = max_ttl.clamp(*LEASE_TTL.start(), *LEASE_TTL.end());
    let ttl = ttl_secs.clamp(*LEASE_TTL.start(), max_ttl) as i64;
    let expires_at = now + ttl;
    conn.prepare_cached(
        "INSERT INTO leases (repository, agent_id, operation_id, expires_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (repository) DO UPDATE SET agent_id = excluded.agent_id,
            operation_id = excluded.operation_id, expires_at = excluded.expires_at,
            maintenance_kind = NULL, maintenance_slot = NULL",
    )?
    .execute(params![repository, agent_id, operation_id, expires_at])?;
    Ok(Lease::Granted { expires_at })
}

/// Releases the lease of `repository` if `agent_id`'s `operation_id` holds it; whether it did.
pub fn release_lease(conn: &Connection, agent_id: &str, repository: &str, operation_id: &str) -> Result<bool, DbError> {
    let n = conn
        .prepare_cached("DELETE FROM leases WHERE repository = ?1 AND agent_id = ?2 AND operation_id = ?3")?
        .execute(params![repository, agent_id, operation_id])?;
    if n == 1 {
        crate::maintenance::note_release(conn, agent_id, repository, operation_id)?;
    }
    Ok(n == 1)
}

/// What the health rule needs of a plan.
struct PlanRule {
    name: String,
    agents: Vec<String>,
    selector: BTreeMap<String, String>,
    interval_secs: u64,
    updated_at: Timestamp,
}

/// Every plan, with its schedule's interval as of `now` (a schedule that does not parse counts as daily).
fn plan_rules(conn: &Connection, now: Timestamp) -> Result<Vec<PlanRule>, DbError> {
    let at = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
    let mut stmt =
        conn.prepare_cached("SELECT name, schedule, timezone, agents, selector, updated_at FROM plans ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        let schedule: String = r.get(1)?;
        let timezone: String = r.get(2)?;
        let agents: String = r.get(3)?;
        let selector: String = r.get(4)?;
        let tz = from_word::<Timezone>(&timezone).unwrap_or_default();
        let interval_secs = Schedule::parse(&schedule).map(|s| s.interval(at, tz).as_secs()).unwrap_or(86_400);
        Ok(PlanRule {
            name: r.get(0)?,
            agents: serde_json::from_str(&agents).unwrap_or_default(),
            selector: serde_json::from_str(&selector).unwrap_or_default(),
            interval_secs: interval_secs.max(1),
            updated_at: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A `plan_status` row with its operation.
struct LastRun {
    view: Option<OperationView>,
    status: OperationStatus,
    finished_at: Timestamp,
    success_at: Option<Timestamp>,
}

/// Per agent (every enrolled one, by id), the plans that apply to it with their last finished run, last success and
/// health, in plan name order. An agent no plan applies to has an empty list.
pub fn backup_health(conn: &Connection, now: Timestamp) -> Result<HashMap<String, Vec<PlanHealth>>, DbError> {
    let plans = plan_rules(conn, now)?;
    let mut status: HashMap<(String, String), LastRun> = HashMap::new();
    let sql = format!(
        "SELECT {VIEW_COLUMNS}, ps.agent_id, ps.plan, ps.last_status, ps.last_finished_at, ps.last_success_at
         FROM plan_status ps LEFT JOIN operations o ON o.id = ps.last_operation
         LEFT JOIN agents a ON a.id = o.agent_id"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let view = row.get::<_, Option<String>>(1)?.is_some().then(|| view_of(row)).transpose()?.map(|(_, v)| v);
        let last: String = row.get(22)?;
        let Some(last) = from_word::<OperationStatus>(&last) else { continue };
        let run = LastRun { view, status: last, finished_at: row.get(23)?, success_at: row.get(24)? };
        status.insert((row.get(20)?, row.get(21)?), run);
    }
    let mut out = HashMap::new();
    let mut agents = conn.prepare_cached("SELECT id, labels FROM agents")?;
    let mut rows = agents.query([])?;
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let labels: String = row.get(1)?;
        let labels: BTreeMap<String, String> = serde_json::from_str(&labels).unwrap_or_default();
        let list: Vec<PlanHealth> = plans
            .iter()
            .filter(|p| backup::plan_applies(&p.agents, &p.selector, &id, &labels))
            .map(|p| {
                let known = status.get(&(id.clone(), p.name.clone()));
                let last = known.map(|k| (k.status, k.finished_at));
                let last_success_at = known.and_then(|k| k.success_at);
                PlanHealth {
                    plan: p.name.clone(),
                    health: backup::health(last, last_success_at, now, p.interval_secs, p.updated_at),
                    last_run: known.and_then(|k| k.view.clone()),
                    last_success_at,
                }
            })
            .collect();
        out.insert(id, list);
    }
    Ok(out)
}

/// A host's health: its worst plan's ([`Health::severity`]); `None` when no plan applies to it.
pub fn worst_health(plans: &[PlanHealth]) -> Option<Health> {
    plans.iter().map(|p| p.health).max_by_key(|h| h.severity())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;

    const T0: Timestamp = 1_700_000_000;

    fn setup() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        drop(Db::open(&dir.path().join("f.db")).unwrap());
        let conn = Connection::open(dir.path().join("f.db")).unwrap();
        for (id, host, labels) in [("a1", "web-1", r#"{"env":"prod"}"#), ("a2", "web-2", "{}"), ("a3", "db-1", "{}")] {
            conn.execute(
                "INSERT INTO agents (id, secret_hash, hostname, os, arch, agent_version, agent_commit, enrolled_at,
                                     last_seen_at, labels)
                 VALUES (?1, x'00', ?2, 'linux', 'amd64', '1', 'c', 1, 1, ?3)",
                params![id, host, labels],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO repositories (name, url, password, auto_init, created_at, updated_at)
             VALUES ('r', '/srv/r', x'00', 0, 1, 1)",
            [],
        )
        .unwrap();
        (dir, conn)
    }

    fn add_plan(conn: &Connection, name: &str, schedule: &str, agents: &str, selector: &str, updated_at: Timestamp) {
        conn.execute(
            "INSERT INTO plans (name, repository, paths, excludes, schedule, timezone, tags, one_file_system,
                                exclude_caches, agents, selector, timeout_secs, jitter_secs, created_at, updated_at)
             VALUES (?1, 'r', '[\"/etc\"]', '[]', ?2, 'utc', '[]', 0, 0, ?3, ?4, 3600, 0, ?5, ?5)",
            params![name, schedule, agents, selector, updated_at],
        )
        .unwrap();
    }

    fn op_id(n: u32) -> String {
        format!("op_{n:032x}")
    }

    fn report(n: u32, plan: &str, status: OperationStatus, at: Timestamp) -> OperationReport {
        OperationReport {
            id: op_id(n),
            plan: plan.into(),
            kind: OperationKind::Backup,
            trigger: Trigger::Schedule,
            status,
            started_at: at,
            finished_at: status.is_final().then_some(at + 10),
            duration_ms: status.is_final().then_some(10_000),
            summary: None,
            progress: None,
            message: None,
            reason: None,
            exit_code: None,
            snapshots: None,
            forget: None,
            restore: None,
            repository: None,
            maintenance: None,
        }
    }

    fn snapshot(id: char, time: &str) -> Snapshot {
        Snapshot {
            id: id.to_string().repeat(64),
            short_id: id.to_string().repeat(8),
            time: time.into(),
            hostname: "web-1".into(),
            paths: vec!["/etc".into()],
            tags: vec!["rm-plan:daily".into()],
        }
    }

    #[test]
    fn forget_reports_replace_snapshots_but_leave_the_plans_health_alone() {
        let (_dir, c) = setup();
        add_plan(&c, "daily", "@daily", r#"["a1"]"#, "{}", T0 - 10);
        let mut backup = report(1, "daily", OperationStatus::Success, T0);
        backup.snapshots = Some(vec![snapshot('a', "2026-01-01T00:00:00Z"), snapshot('b', "2026-01-02T00:00:00Z")]);
        ingest_reports(&c, T0 + 20, "a1", &[backup]).unwrap();
        let health = || backup_health(&c, T0 + 100).unwrap()["a1"][0].clone();
        assert_eq!(health().health, Health::Ok);

        // A failed forget: listed, but the plan stays ok and its last run stays the backup.
        let mut failed = report(2, "daily", OperationStatus::Failed, T0 + 30);
        failed.kind = OperationKind::Forget;
        failed.message = Some("Fatal: unable to create lock".into());
        ingest_reports(&c, T0 + 50, "a1", &[failed]).unwrap();
        let h = health();
        assert_eq!((h.health, h.last_run.unwrap().id), (Health::Ok, op_id(1)));

        // A successful forget replaces the snapshot list with what it kept and stores what it removed.
        let mut forget = report(3, "daily", OperationStatus::Success, T0 + 60);
        forget.kind = OperationKind::Forget;
        forget.trigger = Trigger::RunNow;
        let summary = ForgetSummary { removed: 1, kept: 1, removed_ids: vec!["a".repeat(64)] };
        forget.forget = Some(summary.clone());
        forget.snapshots = Some(vec![snapshot('b', "2026-01-02T00:00:00Z")]);
        ingest_reports(&c, T0 + 80, "a1", &[forget.clone()]).unwrap();
        let listed = list_snapshots(&c, "a1").unwrap().unwrap();
        assert_eq!(listed.iter().map(|s| s.snapshot.id.clone()).collect::<Vec<_>>(), vec!["b".repeat(64)]);
        assert_eq!(health().last_run.unwrap().id, op_id(1));
        let view = get_operation(&c, &op_id(3)).unwrap().unwrap();
        assert_eq!((view.kind, view.trigger, view.forget), (OperationKind::Forget, Trigger::RunNow, Some(summary)));

        // The kind filter.
        let by_kind = |kind| {
            let q = OperationQuery { kind: Some(kind), ..Default::default() };
            list_operations(&c, &q).unwrap().0.into_iter().map(|v| v.id).collect::<Vec<_>>()
        };
        assert_eq!(by_kind(OperationKind::Forget), vec![op_id(3), op_id(2)]);
        assert_eq!(by_kind(OperationKind::Backup), vec![op_id(1)]);
        assert!(by_kind(OperationKind::Prune).is_empty());

        // A forget summary that does not add up, or on a backup, refuses the batch.
        let before = dump(&c);
        let mut bad = forget.clone();
        bad.id = op_id(4);
        bad.forget = Some(ForgetSummary { removed: 0, kept: 0, removed_ids: vec!["a".repeat(64)] });
        assert!(ingest_reports(&c, T0 + 90, "a1", &[bad.clone()]).unwrap_err().to_string().contains("forget.removed"));
        bad.forget = Some(ForgetSummary { removed: 1, kept: 0, removed_ids: vec!["x; drop".into()] });
        assert!(ingest_reports(&c, T0 + 90, "a1", &[bad.clone()]).unwrap_err().to_string().contains("hex"));
        bad.kind = OperationKind::Backup;
        bad.forget = Some(ForgetSummary::default());
        assert!(ingest_reports(&c, T0 + 90, "a1", &[bad]).unwrap_err().to_string().contains("kind forget"));
        assert_eq!(dump(&c), before, "nothing written");
    }

    /// An update must match the stored row's plan and kind: a report claiming a queued run-now backup is a forget
    /// (or of another plan) is refused whole, and the row is left as it is.
    #[test]
    fn an_update_of_another_kind_or_plan_than_stored_is_refused() {
        let (_dir, c) = setup();
        add_plan(&c, "daily", "@daily", r#"["a1"]"#, "{}", T0 - 10);
        ingest_reports(&c, T0, "a1", &[report(1, "daily", OperationStatus::Running, T0)]).unwrap();
        let before = dump(&c);
        let mut as_forget = report(1, "daily", OperationStatus::Success, T0);
        as_forget.kind = OperationKind::Forget;
        as_forget.forget = Some(ForgetSummary::default());
        as_forget.snapshots = Some(vec![]);
        let err = ingest_reports(&c, T0 + 10, "a1", &[as_forget]).unwrap_err();
        assert!(matches!(err, IngestError::Invalid { index: 0, .. }), "{err}");
        assert!(err.to_string().contains("is of kind backup, not forget"), "{err}");
        let other_plan = report(1, "weekly", OperationStatus::Success, T0);
        assert!(ingest_reports(&c, T0 + 10, "a1", &[other_plan]).unwrap_err().to_string().contains("of plan"));
        assert_eq!(dump(&c), before, "nothing written");
        assert_eq!(get_operation(&c, &op_id(1)).unwrap().unwrap().kind, OperationKind::Backup);
        // The same kind goes through.
        ingest_reports(&c, T0 + 10, "a1", &[report(1, "daily", OperationStatus::Success, T0)]).unwrap();
        assert_eq!(get_operation(&c, &op_id(1)).unwrap().unwrap().status, OperationStatus::Success);
    }

    fn dump(conn: &Connection) -> String {
        let mut out = String::new();
        for table in ["operations", "plan_status", "snapshots"] {
            let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2")).unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    Ok((0..n).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect::<Vec<_>>().join("|"))
                })
                .unwrap();
            for row in rows {
                out += &format!("{table}: {}\n", row.unwrap());
            }
        }
        out
    }

    #[test]
    fn a_resent_batch_changes_nothing_and_final_is_never_overwritten() {
        let (_d, c) = setup();
        let mut done = report(1, "daily", OperationStatus::Success, T0);
        done.summary = Some(BackupSummary { data_added: 42, snapshot_id: Some("ab".repeat(32)), ..Default::default() });
        done.snapshots = Some(vec![snapshot('a', "2023-11-14T22:13:30Z")]);
        let batch = vec![report(1, "daily", OperationStatus::Running, T0), done.clone()];
        assert_eq!(ingest_reports(&c, T0 + 20, "a1", &batch).unwrap(), 2);
        let before = dump(&c);
        assert_eq!(ingest_reports(&c, T0 + 99, "a1", &batch).unwrap(), 2);
        assert_eq!(dump(&c), before, "a resent batch changes nothing");
        // A late "running" or a different final for the same id is ignored too.
        let mut failed = report(1, "daily", OperationStatus::Failed, T0 + 50);
        failed.message = Some("late".into());
        ingest_reports(&c, T0 + 99, "a1", &[report(1, "daily", OperationStatus::Running, T0), failed]).unwrap();
        assert_eq!(dump(&c), before);
        let op = get_operation(&c, &op_id(1)).unwrap().unwrap();
        assert_eq!(
            (op.status, op.hostname.as_deref(), op.summary.unwrap().data_added),
            (OperationStatus::Success, Some("web-1"), 42)
        );
    }

    #[test]
    fn a_batch_is_all_or_nothing() {
        let (_d, c) = setup();
        ingest_reports(&c, T0, "a2", &[report(9, "daily", OperationStatus::Running, T0)]).unwrap();
        let before = dump(&c);
        // An invalid report anywhere refuses the batch before anything is written.
        let mut bad = report(3, "daily", OperationStatus::Success, T0);
        bad.id = "op_XYZ".into();
        let err = ingest_reports(&c, T0, "a1", &[report(2, "daily", OperationStatus::Success, T0), bad]).unwrap_err();
        assert!(matches!(err, IngestError::Invalid { index: 1, .. }), "{err}");
        // An id owned by another agent refuses the batch after earlier reports were written: rolled back.
        let err = ingest_reports(
            &c,
            T0,
            "a1",
            &[report(2, "daily", OperationStatus::Success, T0), report(9, "daily", OperationStatus::Success, T0)],
        )
        .unwrap_err();
        assert!(matches!(&err, IngestError::ForeignOperation { id } if *id == op_id(9)), "{err}");
        assert!(err.to_string().contains("another agent"));
        assert_eq!(dump(&c), before);
        // Each refusal kind.
        let cases: Vec<(OperationReport, &str)> = vec![
            (OperationReport { plan: String::new(), ..report(4, "x", OperationStatus::Running, T0) }, "plan"),
            (OperationReport { plan: "a\u{1b}[31m".into(), ..report(4, "x", OperationStatus::Running, T0) }, "plan"),
            (report(4, "daily", OperationStatus::Queued, T0), "queued"),
            (report(4, "daily", OperationStatus::Running, T0 + 10 * 86_400), "started_at"),
            (OperationReport { finished_at: Some(T0 - 5), ..report(4, "d", OperationStatus::Success, T0) }, "finished"),
            (
                OperationReport {
                    id: "op_".to_string() + &"A".repeat(32),
                    ..report(4, "d", OperationStatus::Running, T0)
                },
                "id",
            ),
            (
                OperationReport {
                    snapshots: Some(vec![snapshot('a', "t"); MAX_SNAPSHOTS + 1]),
                    ..report(4, "d", OperationStatus::Success, T0)
                },
                "snapshots",
            ),
            (
                OperationReport {
                    snapshots: Some(vec![Snapshot { id: "../x".into(), ..snapshot('a', "t") }]),
                    ..report(4, "d", OperationStatus::Success, T0)
                },
                "snapshot id",
            ),
        ];
        for (r, want) in cases {
            let err = ingest_reports(&c, T0, "a1", &[r]).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        assert_eq!(dump(&c), before);
    }

    #[test]
    fn long_messages_are_cut_and_cleaned() {
        let (_d, c) = setup();
        let mut r = report(5, "daily", OperationStatus::Failed, T0);
        r.message = Some(format!("line one\n\u{1b}[2Jline two\u{202e}{}", "é".repeat(10_000)));
        r.reason = Some(FailureReason::WrongPassword);
        r.exit_code = Some(12);
        ingest_reports(&c, T0 + 20, "a1", &[r]).unwrap();
        let op = get_operation(&c, &op_id(5)).unwrap().unwrap();
        let m = op.message.unwrap();
        assert!(m.len() <= MAX_MESSAGE && m.starts_with("line one\n [2Jline two "), "{:?}", &m[..30]);
        assert_eq!((op.reason, op.exit_code), (Some(FailureReason::WrongPassword), Some(12)));
    }

    #[test]
    fn plan_status_follows_the_newest_final_and_snapshots_are_replaced() {
        let (_d, c) = setup();
        let mut first = report(1, "daily", OperationStatus::Success, T0);
        first.snapshots = Some(vec![snapshot('a', "2023-11-14T22:13:30Z"), snapshot('b', "2023-11-15T00:13:30+02:00")]);
        ingest_reports(&c, T0 + 20, "a1", &[first]).unwrap();
        let status = |c: &Connection| -> (String, String, i64, Option<i64>) {
            c.query_row(
                "SELECT last_operation, last_status, last_finished_at, last_success_at FROM plan_status
                 WHERE agent_id = 'a1' AND plan = 'daily'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap()
        };
        assert_eq!(status(&c), (op_id(1), "success".into(), T0 + 10, Some(T0 + 10)));
        let snaps = list_snapshots(&c, "a1").unwrap().unwrap();
        // 00:13:30+02:00 is 22:13:30Z: equal instants; a (later string) first among equals is fine, both present.
        assert_eq!(snaps.len(), 2);
        // A failure later: status failed, last success kept.
        ingest_reports(&c, T0 + 200, "a1", &[report(2, "daily", OperationStatus::Failed, T0 + 100)]).unwrap();
        assert_eq!(status(&c), (op_id(2), "failed".into(), T0 + 110, Some(T0 + 10)));
        // An older run's final report arriving late does not move the status back, but its success counts.
        ingest_reports(&c, T0 + 300, "a1", &[report(3, "daily", OperationStatus::Warning, T0 + 50)]).unwrap();
        assert_eq!(status(&c), (op_id(2), "failed".into(), T0 + 110, Some(T0 + 60)));
        // A cancelled run (agent stopped, plan changed) leaves the status as it was.
        ingest_reports(&c, T0 + 350, "a1", &[report(6, "daily", OperationStatus::Cancelled, T0 + 300)]).unwrap();
        assert_eq!(status(&c), (op_id(2), "failed".into(), T0 + 110, Some(T0 + 60)));
        // A new snapshot list replaces the old one (for this plan only).
        let mut other = report(4, "weekly", OperationStatus::Success, T0 + 400);
        other.snapshots = Some(vec![snapshot('c', "2023-11-20T00:00:00Z")]);
        let mut next = report(5, "daily", OperationStatus::Success, T0 + 400);
        next.snapshots = Some(vec![snapshot('d', "2023-11-21T00:00:00Z"), snapshot('a', "2023-11-14T22:13:30Z")]);
        ingest_reports(&c, T0 + 500, "a1", &[other, next]).unwrap();
        let ids: Vec<(String, char)> = list_snapshots(&c, "a1")
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|s| (s.plan, s.snapshot.id.chars().next().unwrap()))
            .collect();
        assert_eq!(ids, [("daily".into(), 'd'), ("weekly".into(), 'c'), ("daily".into(), 'a')]);
        assert_eq!(list_snapshots(&c, "a2").unwrap().unwrap(), []);
        assert_eq!(list_snapshots(&c, "nobody").unwrap(), None);
    }

    #[test]
    fn queued_operations_are_updated_by_their_agent_only() {
        let (_d, c) = setup();
        c.execute(
            "INSERT INTO operations (id, agent_id, plan, kind, trigger, status, created_at)
             VALUES (?1, 'a1', 'daily', 'backup', 'run_now', 'queued', ?2)",
            params![op_id(7), T0],
        )
        .unwrap();
        let err = ingest_reports(&c, T0, "a2", &[report(7, "daily", OperationStatus::Running, T0)]).unwrap_err();
        assert!(matches!(err, IngestError::ForeignOperation { .. }));
        let err = ingest_reports(&c, T0, "a1", &[report(7, "weekly", OperationStatus::Running, T0)]).unwrap_err();
        assert!(err.to_string().contains("plan"), "{err}");
        let mut running = report(7, "daily", OperationStatus::Running, T0 + 1);
        running.progress = Some(Progress { percent_done: 0.5, ..Default::default() });
        ingest_reports(&c, T0 + 2, "a1", &[running]).unwrap();
        let op = get_operation(&c, &op_id(7)).unwrap().unwrap();
        assert_eq!(
            (op.status, op.trigger, op.started_at, op.created_at),
            (OperationStatus::Running, Trigger::RunNow, Some(T0 + 1), T0)
        );
        assert_eq!(op.progress.unwrap().percent_done, 0.5);
        ingest_reports(&c, T0 + 30, "a1", &[report(7, "daily", OperationStatus::Cancelled, T0 + 1)]).unwrap();
        let op = get_operation(&c, &op_id(7)).unwrap().unwrap();
        assert_eq!((op.status, op.finished_at), (OperationStatus::Cancelled, Some(T0 + 11)));
        assert_eq!(op.progress.unwrap().percent_done, 0.5, "progress kept when a report has none");
    }

    #[test]
    fn operations_page_newest_first_with_filters() {
        let (_d, c) = setup();
        let mut batch = Vec::new();
        for n in 0..25u32 {
            let plan = if n % 2 == 0 { "daily" } else { "weekly" };
            let status = if n % 5 == 0 { OperationStatus::Failed } else { OperationStatus::Success };
            batch.push(report(n, plan, status, T0 + n as i64));
        }
        ingest_reports(&c, T0 + 100, "a1", &batch).unwrap();
        ingest_reports(&c, T0 + 100, "a2", &[report(100, "daily", OperationStatus::Running, T0)]).unwrap();
        let q = |agent: Option<&str>, plan: Option<&str>, status, before, limit| OperationQuery {
            agent: agent.map(Into::into),
            plan: plan.map(Into::into),
            status,
            kind: None,
            repository: None,
            before,
            limit,
        };
        let (all, next) = list_operations(&c, &q(None, None, None, None, None)).unwrap();
        assert_eq!((all.len(), next), (26, None));
        assert_eq!(all[0].id, op_id(100));
        assert_eq!(all[0].hostname.as_deref(), Some("web-2"));
        // Keyset paging through a1's operations, 10 at a time.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let (page, next) = list_operations(&c, &q(Some("a1"), None, None, before, Some(10))).unwrap();
            seen.extend(page.into_iter().map(|o| o.id));
            match next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, (0..25u32).rev().map(op_id).collect::<Vec<_>>());
        let (failed, _) =
            list_operations(&c, &q(None, Some("daily"), Some(OperationStatus::Failed), None, None)).unwrap();
        assert_eq!(failed.iter().map(|o| o.id.clone()).collect::<Vec<_>>(), [op_id(20), op_id(10), op_id(0)]);
        let (capped, _) = list_operations(&c, &q(None, None, None, None, Some(100_000))).unwrap();
        assert_eq!(capped.len(), 26);
    }

    #[test]
    fn leases_are_exclusive_renewable_expire_and_release() {
        let (_d, c) = setup();
        let (a, b) = (op_id(1), op_id(2));
        assert_eq!(take_lease(&c, T0, "a1", "r", &a, 60).unwrap(), Lease::Granted { expires_at: T0 + 60 });
        assert_eq!(
            take_lease(&c, T0 + 20, "a2", "r", &b, 60).unwrap(),
            Lease::Busy { holder_agent: "a1".into(), holder_operation: a.clone(), retry_after_secs: 40 }
        );
        // The same agent with another operation waits too; the holder renews.
        assert!(matches!(take_lease(&c, T0 + 20, "a1", "r", &b, 60).unwrap(), Lease::Busy { .. }));
        assert_eq!(take_lease(&c, T0 + 30, "a1", "r", &a, 60).unwrap(), Lease::Granted { expires_at: T0 + 90 });
        // Other repositories are independent; ttl is clamped.
        assert_eq!(take_lease(&c, T0, "a2", "s", &b, 1).unwrap(), Lease::Granted { expires_at: T0 + 10 });
        assert_eq!(take_lease(&c, T0, "a2", "t", &b, 999_999).unwrap(), Lease::Granted { expires_at: T0 + 3600 });
        // Expired: another agent takes it.
        assert_eq!(take_lease(&c, T0 + 90, "a2", "r", &b, 60).unwrap(), Lease::Granted { expires_at: T0 + 150 });
        // Only the holder's release counts.
        assert!(!release_lease(&c, "a1", "r", &a).unwrap());
        assert!(!release_lease(&c, "a2", "r", &a).unwrap());
        assert!(matches!(take_lease(&c, T0 + 100, "a1", "r", &a, 60).unwrap(), Lease::Busy { .. }));
        assert!(release_lease(&c, "a2", "r", &b).unwrap());
        assert!(matches!(take_lease(&c, T0 + 100, "a1", "r", &a, 60).unwrap(), Lease::Granted { .. }));
    }

    fn maint(
        kind: rm_protocol::maintenance::MaintenanceKind,
        slot: Timestamp,
    ) -> rm_protocol::maintenance::MaintenanceLease {
        rm_protocol::maintenance::MaintenanceLease { kind, slot }
    }

    fn maintenance_report(
        n: u32,
        repository: &str,
        status: OperationStatus,
        at: Timestamp,
        slot: Timestamp,
    ) -> OperationReport {
        OperationReport {
            plan: String::new(),
            kind: OperationKind::Prune,
            repository: Some(repository.into()),
            maintenance: Some(rm_protocol::maintenance::MaintenanceSummary { slot: Some(slot), ..Default::default() }),
            ..report(n, "", status, at)
        }
    }

    #[test]
    fn maintenance_leases_run_each_slot_once_and_yield_to_waiting_backups() {
        use crate::maintenance::{BACKUP_WAIT_WINDOW, MaintLease, take_maintenance_lease};
        use rm_protocol::maintenance::MaintenanceKind::{Check, Prune};
        let (_d, c) = setup();
        add_plan(&c, "daily", "@daily", r#"["a1", "a2"]"#, "{}", T0);
        let (a, b, x) = (op_id(1), op_id(2), op_id(3));
        let slot = T0 - 100;
        let take = |now, agent: &str, op: &str, kind, slot| {
            take_maintenance_lease(&c, now, agent, "r", op, 60, 3600, &maint(kind, slot)).unwrap()
        };
        // Free: granted; the others are told busy; the holder renews.
        assert_eq!(take(T0, "a1", &a, Prune, slot), MaintLease::Granted { expires_at: T0 + 60, ttl_secs: 60 });
        assert_eq!(
            take(T0 + 5, "a2", &b, Prune, slot),
            MaintLease::Busy { holder_agent: "a1".into(), retry_after_secs: 55 }
        );
        assert!(
            matches!(take(T0 + 20, "a1", &a, Prune, slot), MaintLease::Granted { expires_at, .. } if expires_at == T0 + 80)
        );
        // A backup asking meanwhile waits behind the maintenance lease (it is not preempted).
        assert!(matches!(take_lease(&c, T0 + 21, "a3", "r", &x, 60).unwrap(), Lease::Busy { .. }));
        // The holder succeeds: its slot is done for everyone, also for a request of an older slot.
        ingest_reports(&c, T0 + 30, "a1", &[maintenance_report(1, "r", OperationStatus::Success, T0, slot)]).unwrap();
        assert!(release_lease(&c, "a1", "r", &a).unwrap());
        assert_eq!(take(T0 + 31, "a2", &b, Prune, slot), MaintLease::Done { done_slot: slot });
        assert_eq!(take(T0 + 31, "a2", &b, Prune, slot - 3600), MaintLease::Done { done_slot: slot });
        // The backup that waited recently goes first: no maintenance lease until it stopped asking for a while.
        assert!(matches!(take(T0 + 31, "a2", &b, Check, slot), MaintLease::Busy { .. }));
        assert!(matches!(take_lease(&c, T0 + 32, "a3", "r", &x, 60).unwrap(), Lease::Granted { .. }));
        assert!(release_lease(&c, "a3", "r", &x).unwrap());
        // Once granted, the backup is no longer waiting: maintenance of another kind (or a later slot) may run.
        assert!(matches!(take(T0 + 33, "a2", &b, Check, slot), MaintLease::Granted { .. }));
        // Its holder dies: after the lease lapses another agent takes the same slot over.
        assert!(matches!(take(T0 + 40, "a1", &a, Check, slot), MaintLease::Busy { .. }));
        assert!(matches!(take(T0 + 33 + 60, "a1", &a, Check, slot), MaintLease::Granted { .. }));
        // A failed run does not cover its slot; the failure is the repository's health.
        let mut failed = maintenance_report(4, "r", OperationStatus::Failed, T0 + 100, slot);
        failed.kind = OperationKind::Check;
        ingest_reports(&c, T0 + 120, "a1", &[failed]).unwrap();
        release_lease(&c, "a1", "r", &a).unwrap();
        assert!(matches!(take(T0 + 121, "a2", &op_id(5), Check, slot), MaintLease::Granted { .. }));
        // A later slot is not covered by an earlier success; backups refused within the window hold maintenance off.
        release_lease(&c, "a2", "r", &op_id(5)).unwrap();
        take_lease(&c, T0 + 200, "a3", "r", &x, 60).unwrap();
        assert!(matches!(take_lease(&c, T0 + 201, "a2", "r", &op_id(6), 60).unwrap(), Lease::Busy { .. }));
        release_lease(&c, "a3", "r", &x).unwrap();
        assert!(matches!(take(T0 + 202, "a1", &op_id(7), Prune, slot + 1), MaintLease::Busy { .. }));
        assert!(matches!(
            take(T0 + 201 + BACKUP_WAIT_WINDOW, "a1", &op_id(7), Prune, slot + 1),
            MaintLease::Granted { .. }
        ));
        // The server's cap shortens a maintenance lease as it does a backup's.
        release_lease(&c, "a1", "r", &op_id(7)).unwrap();
        let capped =
            take_maintenance_lease(&c, T0 + 300, "a1", "r", &op_id(8), 120, 10, &maint(Prune, slot + 2)).unwrap();
        assert_eq!(capped, MaintLease::Granted { expires_at: T0 + 310, ttl_secs: 10 });
        assert!(
            matches!(take_lease_capped(&c, T0 + 311, "a2", "s", &x, 120, 15).unwrap(), Lease::Granted { expires_at } if expires_at == T0 + 326)
        );
    }

    #[test]
    fn repository_health_follows_the_last_check() {
        use crate::maintenance::repository_health;
        let (_d, c) = setup();
        // `setup` defines repository r; a plan on it applies to a1 and a2, not a3.
        add_plan(&c, "daily", "@daily", r#"["a1", "a2"]"#, "{}", T0);
        assert_eq!(repository_health(&c).unwrap()["r"].health, Health::Never);
        let check = |n, status, at| OperationReport {
            kind: OperationKind::Check,
            ..maintenance_report(n, "r", status, at, at)
        };
        // An agent without a plan on the repository cannot move its health (its report is still stored).
        ingest_reports(&c, T0 + 10, "a3", &[check(8, OperationStatus::Failed, T0)]).unwrap();
        assert_eq!(repository_health(&c).unwrap()["r"].health, Health::Never);
        assert!(get_operation(&c, &op_id(8)).unwrap().is_some());
        ingest_reports(&c, T0 + 20, "a1", &[check(1, OperationStatus::Failed, T0)]).unwrap();
        let h = repository_health(&c).unwrap().remove("r").unwrap();
        assert_eq!(
            (h.health, h.last_check.as_ref().unwrap().operation_id.as_str()),
            (Health::Failed, op_id(1).as_str())
        );
        // A cancelled check says nothing; a successful one clears the failure; a prune does not touch health.
        ingest_reports(&c, T0 + 40, "a1", &[check(2, OperationStatus::Cancelled, T0 + 30)]).unwrap();
        assert_eq!(repository_health(&c).unwrap()["r"].health, Health::Failed);
        ingest_reports(&c, T0 + 60, "a2", &[maintenance_report(3, "r", OperationStatus::Failed, T0 + 50, T0)]).unwrap();
        assert_eq!(repository_health(&c).unwrap()["r"].health, Health::Failed);
        ingest_reports(&c, T0 + 90, "a2", &[check(4, OperationStatus::Success, T0 + 70)]).unwrap();
        let h = repository_health(&c).unwrap().remove("r").unwrap();
        assert_eq!((h.health, h.last_prune.unwrap().status), (Health::Ok, OperationStatus::Failed));
        // The listing shows repository operations, filtered by repository; a repository report needs a valid name
        // and a maintenance kind.
        let q = OperationQuery { repository: Some("r".into()), ..Default::default() };
        let (ops, _) = list_operations(&c, &q).unwrap();
        assert_eq!(ops.len(), 5, "a3's included");
        assert!(ops.iter().all(|o| o.repository.as_deref() == Some("r") && o.plan.is_empty()));
        let bad = OperationReport {
            kind: OperationKind::Backup,
            ..maintenance_report(9, "r", OperationStatus::Success, T0, T0)
        };
        assert!(ingest_reports(&c, T0, "a1", &[bad]).unwrap_err().to_string().contains("only prune and check"));
        let bad =
            OperationReport { plan: "daily".into(), ..maintenance_report(9, "r", OperationStatus::Success, T0, T0) };
        assert!(ingest_reports(&c, T0, "a1", &[bad]).unwrap_err().to_string().contains("plan must be empty"));
        let bad = maintenance_report(9, "../r", OperationStatus::Success, T0, T0);
        assert!(ingest_reports(&c, T0, "a1", &[bad]).unwrap_err().to_string().contains("repository"));
    }

    #[test]
    fn health_per_agent_and_plan() {
        let (_d, c) = setup();
        let hour = 3600;
        // "hourly" applies to a1 (label) and a2 (id); "daily" to a1 only; nothing to a3.
        add_plan(&c, "hourly", "@every 1h", r#"["a2"]"#, r#"{"env":"prod"}"#, T0);
        add_plan(&c, "daily", "0 3 * * *", r#"["a1"]"#, "{}", T0);
        let now = T0 + hour;
        let h = backup_health(&c, now).unwrap();
        let names = |h: &HashMap<String, Vec<PlanHealth>>, id: &str| {
            h[id].iter().map(|p| (p.plan.clone(), p.health)).collect::<Vec<_>>()
        };
        assert_eq!(names(&h, "a1"), [("daily".into(), Health::Never), ("hourly".into(), Health::Never)]);
        assert_eq!(names(&h, "a3"), []);
        assert_eq!(worst_health(&h["a3"]), None);
        // a1: hourly succeeded with a warning, daily succeeded; a2: hourly failed.
        ingest_reports(&c, now, "a1", &[report(1, "hourly", OperationStatus::Warning, now - 100)]).unwrap();
        ingest_reports(&c, now, "a1", &[report(2, "daily", OperationStatus::Success, now - 100)]).unwrap();
        ingest_reports(&c, now, "a2", &[report(3, "hourly", OperationStatus::Failed, now - 100)]).unwrap();
        let h = backup_health(&c, now).unwrap();
        assert_eq!(names(&h, "a1"), [("daily".into(), Health::Ok), ("hourly".into(), Health::Warning)]);
        assert_eq!(worst_health(&h["a1"]), Some(Health::Warning));
        assert_eq!(worst_health(&h["a2"]), Some(Health::Failed));
        let last = h["a1"][1].last_run.as_ref().unwrap();
        assert_eq!((last.id.as_str(), last.hostname.as_deref()), (op_id(1).as_str(), Some("web-1")));
        assert_eq!(h["a1"][1].last_success_at, Some(now - 90));
        // Three hours later the hourly plan is overdue on a1, the daily one is not.
        let later = now + 3 * hour;
        let h = backup_health(&c, later).unwrap();
        assert_eq!(names(&h, "a1"), [("daily".into(), Health::Ok), ("hourly".into(), Health::Overdue)]);
        // A plan that never ran becomes overdue after two intervals from its assignment.
        add_plan(&c, "fresh", "@every 1h", r#"["a3"]"#, "{}", later);
        assert_eq!(backup_health(&c, later + 60).unwrap()["a3"][0].health, Health::Never);
        assert_eq!(backup_health(&c, later + 3 * hour).unwrap()["a3"][0].health, Health::Overdue);
    }

    #[test]
    fn a_released_slot_waits_for_its_report_and_renewals_pass_the_gates() {
        use crate::maintenance::{MAX_SLOT_AHEAD_SECS, MaintLease, REPORT_GRACE_SECS, take_maintenance_lease};
        use rm_protocol::maintenance::MaintenanceKind::Prune;
        let (_d, c) = setup();
        add_plan(&c, "daily", "@daily", r#"["a1", "a2", "a3", "a4"]"#, "{}", T0);
        let (a, b, x, y) = (op_id(1), op_id(2), op_id(3), op_id(4));
        let slot = T0 - 100;
        let take = |now, agent: &str, op: &str, slot| {
            take_maintenance_lease(&c, now, agent, "r", op, 60, 3600, &maint(Prune, slot)).unwrap()
        };
        // An agent without a plan on the repository does not maintain it.
        assert_eq!(take(T0, "a9", &op_id(9), slot), MaintLease::NotUsed);
        // a1 runs the slot and releases its lease before the server has its report: the slot is not granted again
        // until the report arrives; its success then covers the slot.
        assert!(matches!(take(T0, "a1", &a, slot), MaintLease::Granted { .. }));
        assert!(release_lease(&c, "a1", "r", &a).unwrap());
        assert!(matches!(take(T0 + 5, "a2", &b, slot), MaintLease::Busy { holder_agent, .. } if holder_agent == "a1"));
        assert!(matches!(take(T0 + 5, "a2", &b, slot - 10), MaintLease::Busy { .. }), "an older slot too");
        // The report claims a later slot than granted: only the granted one is covered.
        ingest_reports(
            &c,
            T0 + 6,
            "a1",
            &[maintenance_report(1, "r", OperationStatus::Success, T0 + 4, slot + 999_999)],
        )
        .unwrap();
        assert_eq!(take(T0 + 7, "a2", &b, slot), MaintLease::Done { done_slot: slot });
        assert!(matches!(take(T0 + 7, "a2", &b, slot + 50), MaintLease::Granted { .. }));
        // A failed report frees the slot at once.
        assert!(release_lease(&c, "a2", "r", &b).unwrap());
        assert!(matches!(take(T0 + 8, "a1", &op_id(5), slot + 50), MaintLease::Busy { .. }));
        ingest_reports(&c, T0 + 9, "a2", &[maintenance_report(2, "r", OperationStatus::Failed, T0 + 8, slot + 50)])
            .unwrap();
        assert!(matches!(take(T0 + 9, "a1", &op_id(5), slot + 50), MaintLease::Granted { .. }));
        // A report that never comes holds the slot off only for the grace after the lease's last expiry.
        assert!(release_lease(&c, "a1", "r", &op_id(5)).unwrap());
        assert!(matches!(
            take(T0 + 9 + 60 + REPORT_GRACE_SECS - 1, "a2", &op_id(6), slot + 50),
            MaintLease::Busy { .. }
        ));
        assert!(matches!(
            take(T0 + 9 + 60 + REPORT_GRACE_SECS, "a2", &op_id(6), slot + 50),
            MaintLease::Granted { .. }
        ));
        release_lease(&c, "a2", "r", &op_id(6)).unwrap();
        ingest_reports(&c, T0 + 700, "a2", &[maintenance_report(6, "r", OperationStatus::Failed, T0 + 700, slot + 50)])
            .unwrap();
        // A slot whose runs failed three times is given up.
        for n in 0..3 {
            let op = op_id(20 + n);
            assert!(matches!(take(T0 + 800, "a3", &op, slot + 55), MaintLease::Granted { .. }), "{n}");
            release_lease(&c, "a3", "r", &op).unwrap();
            let failed = maintenance_report(20 + n, "r", OperationStatus::Failed, T0 + 800, slot + 55);
            ingest_reports(&c, T0 + 800, "a3", &[failed]).unwrap();
        }
        assert_eq!(take(T0 + 801, "a2", &op_id(23), slot + 55), MaintLease::Exhausted { failed_runs: 3 });
        // A renewal after the lease's expiry, while the lease row still names the operation, is a renewal: not held
        // off by a backup that waits meanwhile.
        let t = T0 + 1000;
        assert!(matches!(take(t, "a1", &a, slot + 60), MaintLease::Granted { .. }));
        assert!(matches!(take_lease(&c, t + 50, "a3", "r", &x, 60).unwrap(), Lease::Busy { .. }));
        assert!(
            matches!(take(t + 65, "a1", &a, slot + 60), MaintLease::Granted { expires_at, .. } if expires_at == t + 125)
        );
        // Two backups wait; one granted (and renewing) does not forget the other: maintenance still yields.
        assert!(matches!(take_lease(&c, t + 126, "a3", "r", &x, 60).unwrap(), Lease::Granted { .. }));
        assert!(matches!(take_lease(&c, t + 127, "a4", "r", &y, 60).unwrap(), Lease::Busy { .. }));
        assert!(matches!(take_lease(&c, t + 128, "a3", "r", &x, 60).unwrap(), Lease::Granted { .. }));
        assert!(release_lease(&c, "a3", "r", &x).unwrap());
        assert!(matches!(take(t + 130, "a2", &op_id(7), slot + 70), MaintLease::Busy { .. }));
        assert!(matches!(take_lease(&c, t + 131, "a4", "r", &y, 60).unwrap(), Lease::Granted { .. }));
        assert!(release_lease(&c, "a4", "r", &y).unwrap());
        assert!(matches!(take(t + 132, "a2", &op_id(7), slot + 70), MaintLease::Granted { .. }));
        release_lease(&c, "a2", "r", &op_id(7)).unwrap();
        // A slot later than any firing can be is refused, whoever asks.
        let far = t + 200 + MAX_SLOT_AHEAD_SECS + 1;
        assert_eq!(
            take(t + 200, "a1", &op_id(8), far),
            MaintLease::SlotAhead { latest: t + 200 + MAX_SLOT_AHEAD_SECS }
        );
    }

    #[test]
    fn only_data_results_of_checks_make_repository_health_ordered_by_slot() {
        use crate::maintenance::{MaintLease, repository_health, take_maintenance_lease};
        use rm_protocol::maintenance::MaintenanceKind::Check;
        let (_d, c) = setup();
        add_plan(&c, "daily", "@daily", r#"["a1", "a2"]"#, "{}", T0);
        let run = |n: u32, agent: &str, slot, at, status, reason| {
            let op = op_id(n);
            let granted = take_maintenance_lease(&c, at, agent, "r", &op, 60, 3600, &maint(Check, slot)).unwrap();
            assert!(matches!(granted, MaintLease::Granted { .. }), "{granted:?}");
            release_lease(&c, agent, "r", &op).unwrap();
            let report =
                OperationReport { kind: OperationKind::Check, reason, ..maintenance_report(n, "r", status, at, slot) };
            ingest_reports(&c, at + 1, agent, &[report]).unwrap();
        };
        let health = || repository_health(&c).unwrap()["r"].health;
        run(1, "a1", T0, T0 + 10, OperationStatus::Success, None);
        assert_eq!(health(), Health::Ok);
        // Locked and timed-out checks are listed as the last check but leave the health alone.
        run(2, "a1", T0 + 100, T0 + 110, OperationStatus::Failed, Some(FailureReason::Locked));
        run(3, "a2", T0 + 200, T0 + 210, OperationStatus::Failed, Some(FailureReason::Timeout));
        let h = repository_health(&c).unwrap().remove("r").unwrap();
        assert_eq!((h.health, h.last_check.unwrap().operation_id), (Health::Ok, op_id(3)));
        // A check that found errors fails it.
        run(4, "a2", T0 + 300, T0 + 310, OperationStatus::Failed, Some(FailureReason::Other));
        assert_eq!(health(), Health::Failed);
        // Another run of an older slot was granted and released, then the next slot's check succeeded; the older
        // run's failure (an interrupted run reported after a restart) arrives later and does not override it.
        let older = take_maintenance_lease(&c, T0 + 350, "a2", "r", &op_id(6), 60, 3600, &maint(Check, T0 + 350));
        assert!(matches!(older.unwrap(), MaintLease::Granted { .. }));
        release_lease(&c, "a2", "r", &op_id(6)).unwrap();
        run(5, "a1", T0 + 400, T0 + 410, OperationStatus::Success, None);
        assert_eq!(health(), Health::Ok);
        let late = OperationReport {
            id: op_id(6),
            kind: OperationKind::Check,
            reason: Some(FailureReason::Other),
            ..maintenance_report(6, "r", OperationStatus::Failed, T0 + 500, T0 + 350)
        };
        ingest_reports(&c, T0 + 501, "a2", &[late]).unwrap();
        let h = repository_health(&c).unwrap().remove("r").unwrap();
        assert_eq!((h.health, h.last_check.unwrap().operation_id), (Health::Ok, op_id(5)));
    }

    #[test]
    fn a_run_now_request_is_forgotten_once_a_run_covered_it_or_its_policy_went() {
        use crate::maintenance::{
            MaintLease, agent_policies, forget_request, request_maintenance, take_maintenance_lease,
        };
        use rm_protocol::maintenance::{MaintenanceKind::Prune, PrunePolicy};
        let (_d, c) = setup();
        add_plan(&c, "daily", "@daily", r#"["a1"]"#, "{}", T0);
        c.execute("UPDATE repositories SET prune_policy = '{\"schedule\":\"@daily\"}' WHERE name = 'r'", []).unwrap();
        let policy = Some(PrunePolicy { schedule: "@daily".into(), ..Default::default() });
        let requested = || agent_policies(&c, T0, "r", &policy, &None).unwrap().0.unwrap().requested_at;
        let at = request_maintenance(&c, T0, "r", Prune, Default::default()).unwrap().unwrap();
        assert_eq!(requested(), Some(at));
        // A failed run leaves it pending; a success for its slot forgets it (a new agent does not run it again).
        let op = op_id(1);
        assert!(matches!(
            take_maintenance_lease(&c, T0 + 1, "a1", "r", &op, 60, 3600, &maint(Prune, at)).unwrap(),
            MaintLease::Granted { .. }
        ));
        ingest_reports(&c, T0 + 2, "a1", &[maintenance_report(1, "r", OperationStatus::Failed, T0 + 2, at)]).unwrap();
        release_lease(&c, "a1", "r", &op_id(1)).unwrap();
        assert_eq!(requested(), Some(at));
        let op = op_id(2);
        assert!(matches!(
            take_maintenance_lease(&c, T0 + 2, "a1", "r", &op, 60, 3600, &maint(Prune, at)).unwrap(),
            MaintLease::Granted { .. }
        ));
        ingest_reports(&c, T0 + 3, "a1", &[maintenance_report(2, "r", OperationStatus::Success, T0 + 3, at)]).unwrap();
        assert_eq!(requested(), None);
        // A request whose policy is removed is forgotten with it.
        request_maintenance(&c, T0 + 10, "r", Prune, Default::default()).unwrap().unwrap();
        assert!(requested().is_some());
        forget_request(&c, "r", Prune).unwrap();
        assert_eq!(requested(), None);
    }

    #[test]
    fn a_slot_held_off_by_backups_for_a_quarter_of_its_interval_goes_first() {
        use crate::maintenance::{MaintLease, take_maintenance_lease};
        use rm_protocol::maintenance::MaintenanceKind::Check;
        let (_d, c) = setup();
        add_plan(&c, "daily", "@daily", r#"["a1", "a2"]"#, "{}", T0);
        // A daily check: it yields to waiting backups for 6 h (a quarter of a day), then goes first.
        c.execute("UPDATE repositories SET check_policy = '{\"schedule\":\"@daily\"}' WHERE name = 'r'", []).unwrap();
        let slot = T0;
        let mut t = T0;
        let mut backups = 0;
        loop {
            // A stream of backups keeps the repository busy: one holds it, another always waits.
            let (x, y) = (op_id(1000 + backups), op_id(2000 + backups));
            backups += 1;
            take_lease(&c, t, "a1", "r", &x, 60).unwrap();
            assert!(matches!(take_lease(&c, t + 1, "a2", "r", &y, 60).unwrap(), Lease::Busy { .. }));
            release_lease(&c, "a1", "r", &x).unwrap();
            let m = take_maintenance_lease(&c, t + 2, "a2", "r", &op_id(1), 60, 3600, &maint(Check, slot)).unwrap();
            if let MaintLease::Granted { .. } = m {
                break;
            }
            assert!(t + 2 - T0 < 6 * 3600, "still held off after 6 h");
            t += 600;
        }
        assert!(t + 2 - T0 >= 6 * 3600, "yielded for a quarter of the interval first ({} s)", t + 2 - T0);
        // A backup asking now waits for the check.
        assert!(matches!(take_lease(&c, t + 3, "a1", "r", &op_id(3), 60).unwrap(), Lease::Busy { .. }));
    }
}
