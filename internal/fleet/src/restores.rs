//! The `restores` table and snapshot lookups: restore requests (an `operations` row of kind `restore`, queued until
//! the agent reports it, plus what was asked for), the restore tasks heartbeat and tasks answers carry, and finding
//! a snapshot the server knows from reports (full id or unique prefix) with the repository its plan uses.
//!
//! A restore is refused (nothing written) unless the snapshot is known, its plan still exists (that is how its
//! repository is known), and the target agent has a plan of its own on that repository (so its backup config holds
//! the repository's URL and secrets). Every request records `restore_requested` in the same operation.

use rm_protocol::backup::OperationStatus;
use rm_protocol::restore::{CreateRestore, RestoreResult, RestoreTask, check_path_for_os, check_restore};
use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::audit::{AuditEvent, record_audit};
use crate::plans::{get_plan, new_operation_id, plans_for_agent};
use crate::time::Timestamp;

/// Why a restore or a listing was refused (nothing written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreRefused {
    /// Invalid input; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("agent {0:?} was not found")]
    UnknownAgent(String),
    #[error("source_agent: no enrolled agent has the id {0:?}")]
    UnknownSourceAgent(String),
    #[error("snapshot {0:?} is not among the snapshots agents reported")]
    SnapshotNotFound(String),
    #[error("snapshot: {0:?} matches several snapshots; give more of its id")]
    AmbiguousSnapshot(String),
    #[error("snapshot {snapshot}: its plan {plan:?} no longer exists, so its repository is unknown")]
    PlanGone { snapshot: String, plan: String },
    #[error(
        "agent {agent:?} has no plan on repository {repository:?}, so it cannot open it: assign it a plan on that \
         repository first"
    )]
    RepositoryNotConfigured { agent: String, repository: String },
}

/// A snapshot the server knows, with where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    /// The full id (lowercase hex).
    pub id: String,
    pub plan: String,
    pub repository: String,
    /// The agent that reported it.
    pub agent_id: String,
}

/// Finds the snapshot whose id starts with `reference` (8..=64 hex digits, any case) among what agents reported
/// (only `source_agent`'s when given), and its repository through its plan. Refused when none or several distinct
/// snapshots match, or when the plan is gone.
pub fn find_snapshot(
    conn: &Connection,
    reference: &str,
    source_agent: Option<&str>,
) -> Result<Result<SnapshotRef, RestoreRefused>, DbError> {
    if !rm_protocol::restore::is_snapshot_ref(reference) {
        return Ok(Err(RestoreRefused::Invalid("snapshot: must be a snapshot id (8 to 64 hex digits)".into())));
    }
    let prefix = reference.to_ascii_lowercase();
    // Hex digits only, so the pattern has no LIKE wildcards of its own.
    let pattern = format!("{prefix}%");
    let mut stmt = conn.prepare_cached(
        "SELECT id, plan, agent_id FROM snapshots WHERE id LIKE ?1 AND (?2 IS NULL OR agent_id = ?2)
         ORDER BY id, agent_id LIMIT 10",
    )?;
    let found: Vec<(String, String, String)> = stmt
        .query_map(params![pattern, source_agent], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let Some((id, plan, agent_id)) = found.first().cloned() else {
        return Ok(Err(RestoreRefused::SnapshotNotFound(prefix)));
    };
    if found.iter().any(|(other, _, _)| *other != id) {
        return Ok(Err(RestoreRefused::AmbiguousSnapshot(prefix)));
    }
    let Some(info) = get_plan(conn, &plan)? else {
        return Ok(Err(RestoreRefused::PlanGone { snapshot: id, plan }));
    };
    Ok(Ok(SnapshotRef { id, plan, repository: info.plan.repository, agent_id }))
}

/// Whether agent `agent_id` exists (`None`: no) and has a plan on `repository`.
fn agent_has_repository(conn: &Connection, agent_id: &str, repository: &str) -> Result<Option<bool>, DbError> {
    Ok(plans_for_agent(conn, agent_id)?.map(|plans| plans.iter().any(|p| p.plan.repository == repository)))
}

/// Resolves `reference` for agent `agent_id` to act on (restore or list): the snapshot (among `source_agent`'s when
/// given, else every agent's) and a check that the agent exists and can open its repository.
pub fn snapshot_for_agent(
    conn: &Connection,
    agent_id: &str,
    reference: &str,
    source_agent: Option<&str>,
) -> Result<Result<SnapshotRef, RestoreRefused>, DbError> {
    let known = conn.prepare_cached("SELECT 1 FROM agents WHERE id = ?1")?.exists([agent_id])?;
    if !known {
        return Ok(Err(RestoreRefused::UnknownAgent(agent_id.to_owned())));
    }
    if let Some(source) = source_agent {
        if !conn.prepare_cached("SELECT 1 FROM agents WHERE id = ?1")?.exists([source])? {
            return Ok(Err(RestoreRefused::UnknownSourceAgent(source.to_owned())));
        }
    }
    let snapshot = match find_snapshot(conn, reference, source_agent)? {
        Ok(s) => s,
        Err(refused) => return Ok(Err(refused)),
    };
    if agent_has_repository(conn, agent_id, &snapshot.repository)? != Some(true) {
        return Ok(Err(RestoreRefused::RepositoryNotConfigured {
            agent: agent_id.to_owned(),
            repository: snapshot.repository,
        }));
    }
    Ok(Ok(snapshot))
}

/// Queues a restore on `agent_id` (an `operations` row: kind restore, trigger run_now, status queued, under the
/// snapshot's plan; and its `restores` row) and records `restore_requested`; returns the operation id and the
/// snapshot. Refused (nothing written) for invalid input, an unknown agent or snapshot, or an agent without the
/// snapshot's repository.
pub fn request_restore(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    spec: &CreateRestore,
    audit: AuditEvent,
) -> Result<Result<(String, SnapshotRef), RestoreRefused>, DbError> {
    if let Err(message) = check_restore(spec) {
        return Ok(Err(RestoreRefused::Invalid(message)));
    }
    let snapshot = match snapshot_for_agent(conn, agent_id, &spec.snapshot, spec.source_agent.as_deref())? {
        Ok(s) => s,
        Err(refused) => return Ok(Err(refused)),
    };
    // Absolute on the target agent's own OS, as far as the server knows it (the agent checks again).
    let os: String = conn.prepare_cached("SELECT os FROM agents WHERE id = ?1")?.query_row([agent_id], |r| r.get(0))?;
    let paths =
        spec.include.iter().map(|p| ("include", p.as_str())).chain(spec.target.as_deref().map(|t| ("target", t)));
    for (field, path) in paths {
        if let Err(message) = check_path_for_os(field, path, &os) {
            return Ok(Err(RestoreRefused::Invalid(message)));
        }
    }
    let id = new_operation_id();
    conn.prepare_cached(
        "INSERT INTO operations (id, agent_id, plan, kind, trigger, status, created_at)
         VALUES (?1, ?2, ?3, 'restore', 'run_now', ?4, ?5)",
    )?
    .execute(params![id, agent_id, snapshot.plan, OperationStatus::Queued.as_str(), now])?;
    conn.prepare_cached(
        "INSERT INTO restores (operation_id, agent_id, source_agent, plan, repository, snapshot, include, target,
                               overwrite)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        id,
        agent_id,
        snapshot.agent_id,
        snapshot.plan,
        snapshot.repository,
        snapshot.id,
        serde_json::to_string(&spec.include).unwrap_or_else(|_| "[]".into()),
        spec.target,
        spec.overwrite,
    ])?;
    let target = spec.target.as_deref().unwrap_or("(default)");
    let detail = format!(
        "restore snapshot {} (plan {}, repository {}, from agent {}) on {agent_id} into {target}{}{}: {id}",
        snapshot.id,
        snapshot.plan,
        snapshot.repository,
        snapshot.agent_id,
        if spec.include.is_empty() { String::new() } else { format!(" include {}", spec.include.join(",")) },
        if spec.overwrite { " overwrite" } else { "" },
    );
    record_audit(
        conn,
        &AuditEvent {
            kind: "restore_requested".into(),
            agent_id: Some(agent_id.to_owned()),
            detail: Some(detail),
            ..audit
        },
    )?;
    Ok(Ok((id, snapshot)))
}

/// The agent's queued restores (not yet reported), oldest first, at most [`MAX_RUN_NOW`].
pub fn queued_restores(conn: &Connection, agent_id: &str) -> Result<Vec<RestoreTask>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.id, r.plan, r.repository, r.snapshot, r.include, r.target, r.overwrite
         FROM operations o JOIN restores r ON r.operation_id = o.id
         WHERE o.agent_id = ?1 AND o.status = 'queued' AND o.kind = 'restore' ORDER BY o.seq LIMIT 100",
    )?;
    let rows = stmt.query_map(params![agent_id], |r| {
        let include: String = r.get(4)?;
        Ok(RestoreTask {
            operation_id: r.get(0)?,
            plan: r.get(1)?,
            repository: r.get(2)?,
            snapshot: r.get(3)?,
            include: serde_json::from_str(&include).unwrap_or_default(),
            target: r.get(5)?,
            overwrite: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// How long a restore may stay queued (its agent offline or never taking it) before it is cancelled.
pub const RESTORE_QUEUE_TTL_SECS: i64 = 24 * 3600;

/// Cancels the restores queued longer than [`RESTORE_QUEUE_TTL_SECS`] (of `agent_id` only, when given): status
/// `cancelled`, with a message saying why. Called before restores are handed to an agent and by the server's
/// maintenance loop. Returns how many were cancelled.
pub fn expire_queued_restores(conn: &Connection, now: Timestamp, agent_id: Option<&str>) -> Result<usize, DbError> {
    let cutoff = now.saturating_sub(RESTORE_QUEUE_TTL_SECS);
    let message = format!(
        "cancelled: the restore stayed queued for more than {} h without its agent taking it (offline?); request          it again",
        RESTORE_QUEUE_TTL_SECS / 3600
    );
    let n = conn
        .prepare_cached(
            "UPDATE operations SET status = 'cancelled', finished_at = ?1, message = ?2
             WHERE kind = 'restore' AND status = 'queued' AND created_at < ?3 AND (?4 IS NULL OR agent_id = ?4)",
        )?
        .execute(params![now, message, cutoff, agent_id])?;
    Ok(n)
}

/// Why an operation was not cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("operation {0:?} was not found")]
    NotFound(String),
    #[error("operation {id} is {status}: only a queued operation (not yet taken by its agent) can be cancelled")]
    NotQueued { id: String, status: String },
}

/// Cancels a queued operation (a restore or a run-now its agent has not taken yet): status `cancelled`, and
/// `operation_cancelled` recorded. Refused (nothing written) when it is unknown or no longer queued.
pub fn cancel_queued_operation(
    conn: &Connection,
    now: Timestamp,
    id: &str,
    audit: AuditEvent,
) -> Result<Result<(), CancelRefused>, DbError> {
    let found: Option<(String, String, String, String)> = conn
        .prepare_cached("SELECT agent_id, plan, kind, status FROM operations WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some((agent_id, plan, kind, status)) = found else {
        return Ok(Err(CancelRefused::NotFound(id.to_owned())));
    };
    if status != OperationStatus::Queued.as_str() {
        return Ok(Err(CancelRefused::NotQueued { id: id.to_owned(), status }));
    }
    conn.prepare_cached(
        "UPDATE operations SET status = 'cancelled', finished_at = ?2, message = 'cancelled by an operator before          the agent took it' WHERE id = ?1 AND status = 'queued'",
    )?
    .execute(params![id, now])?;
    record_audit(
        conn,
        &AuditEvent {
            kind: "operation_cancelled".into(),
            agent_id: Some(agent_id),
            detail: Some(format!("cancel queued {kind} {id} (plan {plan})")),
            ..audit
        },
    )?;
    Ok(Ok(()))
}

/// Stores what the agent reported about a restore (called while ingesting its report).
pub(crate) fn store_result(conn: &Connection, operation_id: &str, result: &RestoreResult) -> rusqlite::Result<()> {
    let clean = RestoreResult {
        target: rm_protocol::validate::clean_text(&result.target, rm_protocol::restore::MAX_PATH),
        snapshot: result
            .snapshot
            .as_ref()
            .filter(|s| s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .cloned(),
        files: result.files,
        bytes: result.bytes,
    };
    conn.prepare_cached("UPDATE restores SET result = ?2 WHERE operation_id = ?1")?
        .execute(params![operation_id, serde_json::to_string(&clean).ok()])?;
    Ok(())
}

/// What the agent reported about a restore, if anything.
pub fn result_of(conn: &Connection, operation_id: &str) -> Result<Option<RestoreResult>, DbError> {
    let text: Option<Option<String>> = conn
        .prepare_cached("SELECT result FROM restores WHERE operation_id = ?1")?
        .query_row([operation_id], |r| r.get(0))
        .optional()?;
    Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rm_protocol::backup::{CreatePlan, OperationKind, OperationReport, Snapshot, Trigger};

    use super::*;
    use crate::plans::{NewPlan, create_plan, queued_runs};
    use crate::repositories::{NewRepository, create_repository};
    use crate::sealing::SecretKey;
    use crate::tokens::{NewToken, create_token};
    use crate::{Db, agents, ingest_reports};

    const T0: Timestamp = 1_700_000_000;

    fn setup() -> (tempfile::TempDir, Db, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("fleet.db")).unwrap();
        let ids = db
            .call_blocking(|c| {
                let key = SecretKey::from_bytes(&[3; 32]);
                for name in ["shared", "other"] {
                    let repo = NewRepository {
                        name: name.into(),
                        url: format!("/srv/{name}"),
                        password: "pw".into(),
                        env: BTreeMap::new(),
                        ca_cert: None,
                        auto_init: true,
                        min_restic_version: None,
                        prune: None,
                        check: None,
                    };
                    create_repository(c, &key, T0, &repo, AuditEvent::default())?.unwrap();
                }
                let (_, token) = create_token(c, T0, &NewToken::default())?;
                let mut ids = Vec::new();
                for host in ["web", "db", "lonely"] {
                    let facts = rm_protocol::HostFacts {
                        hostname: host.into(),
                        os: "linux".into(),
                        arch: "amd64".into(),
                        version: "1".into(),
                        commit: "c".into(),
                    };
                    ids.push(agents::enroll(c, T0, &token, &facts)?.unwrap().agent_id);
                }
                let plan = |name: &str, repo: &str, agents: Vec<String>| {
                    NewPlan::validated(CreatePlan {
                        name: name.into(),
                        repository: repo.into(),
                        paths: vec!["/srv/data".into()],
                        schedule: "@daily".into(),
                        agents,
                        selector: BTreeMap::new(),
                        ..Default::default()
                    })
                    .unwrap()
                };
                create_plan(c, T0, &plan("web-files", "shared", vec![ids[0].clone()]), AuditEvent::default())?.unwrap();
                create_plan(c, T0, &plan("db-files", "shared", vec![ids[1].clone()]), AuditEvent::default())?.unwrap();
                create_plan(c, T0, &plan("lonely-files", "other", vec![ids[2].clone()]), AuditEvent::default())?
                    .unwrap();
                Ok(ids)
            })
            .unwrap();
        (dir, db, ids)
    }

    fn report_snapshots(db: &Db, agent: &str, plan: &str, ids: &[&str]) {
        let snapshots: Vec<Snapshot> = ids
            .iter()
            .map(|id| Snapshot {
                id: id.to_string(),
                short_id: id[..8].into(),
                time: "2026-01-01T00:00:00Z".into(),
                ..Default::default()
            })
            .collect();
        let report = OperationReport {
            id: new_operation_id(),
            plan: plan.into(),
            kind: OperationKind::Backup,
            trigger: Trigger::Schedule,
            status: OperationStatus::Success,
            started_at: T0,
            finished_at: Some(T0 + 1),
            duration_ms: Some(1000),
            summary: None,
            progress: None,
            message: None,
            reason: None,
            exit_code: Some(0),
            snapshots: Some(snapshots),
            restore: None,
            forget: None,
            repository: None,
            maintenance: None,
        };
        let agent = agent.to_owned();
        db.call_blocking(move |c| Ok(ingest_reports(c, T0 + 2, &agent, &[report]).unwrap())).unwrap();
    }

    #[test]
    fn restores_resolve_snapshots_and_refuse_hosts_without_the_repository() {
        let (_dir, db, ids) = setup();
        let full_a = format!("aaaa1111{}", "0".repeat(56));
        let full_b = format!("aaaa2222{}", "1".repeat(56));
        report_snapshots(&db, &ids[0], "web-files", &[&full_a, &full_b]);
        let ids2 = ids.clone();
        let (fa, fb) = (full_a.clone(), full_b.clone());
        db.call_blocking(move |c| {
            let ids = ids2;
            let spec = |snapshot: &str| CreateRestore { snapshot: snapshot.into(), ..Default::default() };
            // Short id, any case: found, with its repository.
            let (op, snap) = request_restore(c, T0, &ids[0], &spec("AAAA1111"), AuditEvent::default())?.unwrap();
            assert_eq!(
                (snap.id.as_str(), snap.repository.as_str(), snap.plan.as_str()),
                (fa.as_str(), "shared", "web-files")
            );
            // Onto another host with a plan on the same repository: queued there, from the web host's snapshots.
            let other =
                CreateRestore { source_agent: Some(ids[0].clone()), target: Some("/restore/here".into()), ..spec(&fb) };
            let (op2, _) = request_restore(c, T0, &ids[1], &other, AuditEvent::default())?.unwrap();
            // A host without the repository, unknown, ambiguous and invalid snapshots: refused.
            let refused = |agent: &str, s: CreateRestore| {
                request_restore(c, T0, agent, &s, AuditEvent::default()).map(|r| r.unwrap_err())
            };
            assert!(matches!(refused(&ids[2], spec("aaaa1111"))?, RestoreRefused::RepositoryNotConfigured { .. }));
            assert!(matches!(refused(&ids[0], spec("bbbb1111"))?, RestoreRefused::SnapshotNotFound(_)));
            assert!(matches!(refused(&ids[0], spec("aaaa1111aaaa"))?, RestoreRefused::SnapshotNotFound(_)));
            assert!(matches!(refused(&ids[0], spec("aaaa"))?, RestoreRefused::Invalid(_)));
            assert!(matches!(refused("nobody", spec("aaaa1111"))?, RestoreRefused::UnknownAgent(_)));
            let relative = CreateRestore { target: Some("x/y".into()), ..spec("aaaa1111") };
            assert!(matches!(refused(&ids[0], relative)?, RestoreRefused::Invalid(m) if m.starts_with("target:")));
            let src = CreateRestore { source_agent: Some(ids[1].clone()), ..spec("aaaa1111") };
            assert!(matches!(refused(&ids[0], src)?, RestoreRefused::SnapshotNotFound(_)));
            // What the agents receive; run-now requests do not include restores.
            let web = queued_restores(c, &ids[0])?;
            assert_eq!(web.len(), 1);
            assert_eq!((web[0].operation_id.as_str(), web[0].target.as_deref()), (op.as_str(), None));
            let db_host = queued_restores(c, &ids[1])?;
            assert_eq!(db_host[0].operation_id, op2);
            assert_eq!(db_host[0].target.as_deref(), Some("/restore/here"));
            assert_eq!(db_host[0].snapshot, fb);
            assert!(queued_runs(c, &ids[0])?.is_empty());
            let n: i64 = c.query_row("SELECT count(*) FROM operations WHERE kind = 'restore'", [], |r| r.get(0))?;
            assert_eq!(n, 2, "refusals wrote nothing");
            let audits: i64 =
                c.query_row("SELECT count(*) FROM audit_events WHERE kind = 'restore_requested'", [], |r| r.get(0))?;
            assert_eq!(audits, 2);
            Ok(())
        })
        .unwrap();
        // Another host reported a snapshot with the same short id: ambiguous, unless the source agent is named.
        let full_c = format!("aaaa2222{}", "3".repeat(56));
        report_snapshots(&db, &ids[1], "db-files", &[&full_c]);
        let (a0, fb) = (ids[0].clone(), full_b.clone());
        db.call_blocking(move |c| {
            assert!(matches!(find_snapshot(c, "aaaa2222", None)?, Err(RestoreRefused::AmbiguousSnapshot(_))));
            assert_eq!(find_snapshot(c, "aaaa2222", Some(&a0))?.unwrap().id, fb);
            assert_eq!(find_snapshot(c, &full_c, None)?.unwrap().plan, "db-files");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_reported_restore_keeps_its_result_and_leaves_plan_health_alone() {
        let (_dir, db, ids) = setup();
        let full = format!("cccc3333{}", "2".repeat(56));
        report_snapshots(&db, &ids[0], "web-files", &[&full]);
        let agent = ids[0].clone();
        db.call_blocking(move |c| {
            let spec = CreateRestore { snapshot: full.clone(), ..Default::default() };
            let (op, _) = request_restore(c, T0, &agent, &spec, AuditEvent::default())?.unwrap();
            let before: String =
                c.query_row("SELECT last_status FROM plan_status WHERE agent_id = ?1", [&agent], |r| r.get(0))?;
            let report = OperationReport {
                id: op.clone(),
                plan: "web-files".into(),
                kind: OperationKind::Restore,
                trigger: Trigger::RunNow,
                status: OperationStatus::Failed,
                started_at: T0 + 10,
                finished_at: Some(T0 + 20),
                duration_ms: Some(10_000),
                summary: None,
                progress: None,
                message: Some("target not empty".into()),
                reason: None,
                exit_code: None,
                snapshots: None,
                forget: None,
                repository: None,
                maintenance: None,
                restore: Some(RestoreResult {
                    target: "/var/x".into(),
                    snapshot: Some(full.clone()),
                    files: None,
                    bytes: None,
                }),
            };
            ingest_reports(c, T0 + 30, &agent, &[report]).unwrap();
            let after: String =
                c.query_row("SELECT last_status FROM plan_status WHERE agent_id = ?1", [&agent], |r| r.get(0))?;
            assert_eq!(before, after, "a failed restore does not fail the backup plan");
            let view = crate::get_operation(c, &op)?.unwrap();
            assert_eq!(view.kind, OperationKind::Restore);
            assert_eq!(view.restore.unwrap().target, "/var/x");
            assert!(queued_restores(c, &agent)?.is_empty(), "reported: no longer delivered");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn paths_are_checked_against_the_target_agents_recorded_os() {
        let (_dir, db, ids) = setup();
        let full = format!("dddd4444{}", "5".repeat(56));
        report_snapshots(&db, &ids[0], "web-files", &[&full]);
        let agent = ids[0].clone();
        db.call_blocking(move |c| {
            let spec = |target: &str| CreateRestore {
                snapshot: full.clone(),
                target: Some(target.into()),
                ..Default::default()
            };
            // A Linux agent: a Windows path is not absolute there.
            let e = request_restore(c, T0, &agent, &spec("C:/restore"), AuditEvent::default())?.unwrap_err();
            assert!(matches!(&e, RestoreRefused::Invalid(m) if m.starts_with("target:") && m.contains("linux")), "{e}");
            let windows_include = CreateRestore { include: vec!["D:\\data".into()], target: None, ..spec("/x") };
            let e = request_restore(c, T0, &agent, &windows_include, AuditEvent::default())?.unwrap_err();
            assert!(matches!(&e, RestoreRefused::Invalid(m) if m.starts_with("include:")), "{e}");
            assert!(request_restore(c, T0, &agent, &spec("/restore"), AuditEvent::default())?.is_ok());
            c.execute("UPDATE agents SET os = 'windows' WHERE id = ?1", [&agent])?;
            assert!(request_restore(c, T0, &agent, &spec("C:/restore"), AuditEvent::default())?.is_ok());
            let e = request_restore(c, T0, &agent, &spec("/restore"), AuditEvent::default())?.unwrap_err();
            assert!(matches!(&e, RestoreRefused::Invalid(m) if m.contains("Windows")), "{e}");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn old_queued_restores_expire_and_queued_operations_can_be_cancelled() {
        let (_dir, db, ids) = setup();
        let full = format!("eeee5555{}", "6".repeat(56));
        report_snapshots(&db, &ids[0], "web-files", &[&full]);
        let agent = ids[0].clone();
        db.call_blocking(move |c| {
            let spec = CreateRestore { snapshot: full.clone(), ..Default::default() };
            let (old, _) = request_restore(c, T0, &agent, &spec, AuditEvent::default())?.unwrap();
            let later = T0 + RESTORE_QUEUE_TTL_SECS - 100;
            let (young, _) = request_restore(c, later, &agent, &spec, AuditEvent::default())?.unwrap();
            let (third, _) = request_restore(c, later, &agent, &spec, AuditEvent::default())?.unwrap();
            assert_eq!(expire_queued_restores(c, later, None)?, 0, "none older than the limit yet");
            let now = T0 + RESTORE_QUEUE_TTL_SECS + 1;
            assert_eq!(expire_queued_restores(c, now, Some("someone-else"))?, 0);
            assert_eq!(expire_queued_restores(c, now, Some(&agent))?, 1);
            let view = crate::get_operation(c, &old)?.unwrap();
            assert_eq!(view.status, OperationStatus::Cancelled);
            assert!(view.message.as_deref().unwrap().contains("queued for more than 24 h"), "{view:?}");
            let queued: Vec<String> = queued_restores(c, &agent)?.into_iter().map(|t| t.operation_id).collect();
            assert_eq!(queued, [young.clone(), third.clone()]);
            // An operator cancels a queued one; a final or unknown one is refused, nothing written.
            cancel_queued_operation(c, now, &young, AuditEvent::default())?.unwrap();
            assert_eq!(crate::get_operation(c, &young)?.unwrap().status, OperationStatus::Cancelled);
            let refused = cancel_queued_operation(c, now, &young, AuditEvent::default())?.unwrap_err();
            assert!(refused.to_string().contains("is cancelled"), "{refused}");
            assert!(matches!(
                cancel_queued_operation(c, now, "op_nope", AuditEvent::default())?,
                Err(CancelRefused::NotFound(_))
            ));
            let queued: Vec<String> = queued_restores(c, &agent)?.into_iter().map(|t| t.operation_id).collect();
            assert_eq!(queued, [third]);
            let audits: i64 =
                c.query_row("SELECT count(*) FROM audit_events WHERE kind = 'operation_cancelled'", [], |r| r.get(0))?;
            assert_eq!(audits, 1);
            Ok(())
        })
        .unwrap();
    }
}
