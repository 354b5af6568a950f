//! Repository maintenance: the prune and check policies (validated, stored as JSON on `repositories`), the
//! operator's run-now requests, the maintenance lease, and what finished maintenance runs leave behind
//! (`repository_maintenance`: last run per repository and kind, the newest slot a success covered, and so the
//! repository's health).
//!
//! The lease rules (see ARCHITECTURE.md, "Maintenance runs once per firing and yields to backups"):
//! * a maintenance lease is the repository's one run lease, marked with its kind and slot;
//! * a slot already covered by a successful run of that kind (`done_slot >= slot`) is answered [`MaintLease::Done`];
//! * it is not granted while another run holds the repository, nor while a backup asked for the repository's lease
//!   and was refused within the last [`BACKUP_WAIT_WINDOW`] seconds (backups waiting go first);
//! * backups never preempt a granted maintenance lease: they wait for it, as for any other holder.

use std::collections::HashMap;

use rm_protocol::backup::{FailureReason, Health, OperationKind, OperationStatus, Timezone};
use rm_protocol::maintenance::{
    self, AgentMaintenance, CheckPolicy, MaintenanceKind, MaintenanceLease, MaintenanceRun, MaintenanceSummary,
    PrunePolicy, RepositoryHealth,
};
use rm_protocol::schedule::{MAX_DURATION, Schedule, parse_duration};
use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::operations::{LEASE_TTL, Lease};
use crate::time::Timestamp;

/// A backup refused the lease this recently (seconds) counts as waiting: maintenance is not granted meanwhile.
/// Agents ask again at most 6 s apart while they wait, so a waiting backup keeps this fresh.
pub const BACKUP_WAIT_WINDOW: i64 = 15;
/// A maintenance run without a timeout gets this one.
pub const DEFAULT_TIMEOUT_SECS: u64 = 24 * 3600;
/// The largest default jitter of a maintenance firing.
const MAX_DEFAULT_JITTER_SECS: u64 = 600;
/// How far ahead of the server's clock a slot may be (the firing is never after the host fires it; this is the
/// largest jitter plus an allowance for hosts whose clock runs ahead). A later slot is refused at grant.
pub const MAX_SLOT_AHEAD_SECS: i64 = MAX_DEFAULT_JITTER_SECS as i64 + 300;
/// After its holder released a maintenance lease, its slot is not granted again until the run's final report
/// arrived, or this long (seconds) after the lease's last expiry (the report was lost; the slot may run again).
pub const REPORT_GRACE_SECS: i64 = 600;
/// A slot held off for waiting backups stops yielding to them after a quarter of its policy's interval, within these
/// bounds (seconds): backups that keep the repository busy cannot starve maintenance.
const YIELD_LIMIT_SECS: std::ops::RangeInclusive<i64> = 600..=6 * 3600;
/// A slot whose runs failed this many times is not granted again (the next firing tries afresh).
pub const MAX_FAILED_RUNS_PER_SLOT: i64 = 3;
/// A backup's wait is forgotten this long (seconds) after it last asked.
const WAIT_FORGET_SECS: i64 = 3600;
/// Grants are kept this long (seconds) after their lease's last expiry, for late reports of their operations.
const GRANT_KEEP_SECS: i64 = 30 * 24 * 3600;

fn checked_timeout(timeout: &Option<String>, field: &str) -> Result<Option<String>, String> {
    match timeout {
        None => Ok(None),
        Some(t) => {
            let d = parse_duration(t).map_err(|e| format!("{field}.timeout: {e}"))?;
            if d.is_zero() || d > MAX_DURATION {
                return Err(format!("{field}.timeout: must be above 0 and at most 366d"));
            }
            Ok(Some(format!("{}s", d.as_secs())))
        }
    }
}

fn checked_schedule(schedule: &str, field: &str) -> Result<String, String> {
    Schedule::parse(schedule).map_err(|e| format!("{field}.schedule: {e}"))?;
    Ok(schedule.trim().to_string())
}

/// A maintenance firing is one slot for every host that uses the repository: in each host's own local time the
/// hosts of different zones would fire (and run) it once per zone.
fn checked_timezone(timezone: Timezone, field: &str) -> Result<Timezone, String> {
    match timezone {
        Timezone::Utc => Ok(timezone),
        Timezone::Local => Err(format!(
            "{field}.timezone: \"local\" is not supported for maintenance (hosts in different zones would each run \
             the firing); use \"utc\" and write the schedule in UTC"
        )),
    }
}

/// Checks an operator's prune policy; the normalised policy (timeout in seconds) or an error naming the field.
pub fn validate_prune(p: &PrunePolicy) -> Result<PrunePolicy, String> {
    let schedule = checked_schedule(&p.schedule, "prune")?;
    let timezone = checked_timezone(p.timezone, "prune")?;
    if let Some(m) = &p.max_unused {
        maintenance::validate_max_unused(m).map_err(|e| format!("prune.{e}"))?;
    }
    Ok(PrunePolicy {
        schedule,
        timezone,
        max_unused: p.max_unused.clone(),
        timeout: checked_timeout(&p.timeout, "prune")?,
    })
}

/// Checks an operator's check policy (see [`validate_prune`]).
pub fn validate_check(p: &CheckPolicy) -> Result<CheckPolicy, String> {
    let schedule = checked_schedule(&p.schedule, "check")?;
    let timezone = checked_timezone(p.timezone, "check")?;
    if let Some(s) = &p.read_data_subset {
        maintenance::validate_read_data_subset(s).map_err(|e| format!("check.{e}"))?;
    }
    Ok(CheckPolicy {
        schedule,
        timezone,
        read_data_subset: p.read_data_subset.clone(),
        timeout: checked_timeout(&p.timeout, "check")?,
    })
}

/// A validated prune policy as stored: normalised (timeout in seconds), JSON.
pub(crate) fn prune_json(p: &Option<PrunePolicy>) -> Option<String> {
    let p = p.as_ref().map(|p| validate_prune(p).unwrap_or_else(|_| p.clone()));
    p.map(|p| serde_json::to_string(&p).expect("a policy serialises"))
}

/// A validated check policy as stored (see [`prune_json`]).
pub(crate) fn check_json(c: &Option<CheckPolicy>) -> Option<String> {
    let c = c.as_ref().map(|c| validate_check(c).unwrap_or_else(|_| c.clone()));
    c.map(|c| serde_json::to_string(&c).expect("a policy serialises"))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(v: Option<String>) -> Option<T> {
    v.and_then(|s| serde_json::from_str(&s).ok())
}

fn timeout_secs(t: &Option<String>) -> u64 {
    t.as_deref().and_then(|t| parse_duration(t).ok()).map_or(DEFAULT_TIMEOUT_SECS, |d| d.as_secs())
}

fn default_jitter(schedule: &str, timezone: rm_protocol::backup::Timezone, now: Timestamp) -> u64 {
    let at = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
    Schedule::parse(schedule)
        .map(|s| (s.interval(at, timezone).as_secs() / 20).min(MAX_DEFAULT_JITTER_SECS))
        .unwrap_or(0)
}

/// A repository's policies as agents receive them, with the operator's pending run-now requests.
pub fn agent_policies(
    conn: &Connection,
    now: Timestamp,
    repository: &str,
    prune: &Option<PrunePolicy>,
    check: &Option<CheckPolicy>,
) -> Result<(Option<AgentMaintenance>, Option<AgentMaintenance>), DbError> {
    let requested = |kind: MaintenanceKind| -> Result<Option<Timestamp>, DbError> {
        Ok(conn
            .prepare_cached("SELECT requested_at FROM repository_maintenance WHERE repository = ?1 AND kind = ?2")?
            .query_row(params![repository, kind.as_str()], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten())
    };
    let prune = match prune {
        Some(p) => Some(AgentMaintenance {
            schedule: p.schedule.clone(),
            timezone: p.timezone,
            max_unused: p.max_unused.clone(),
            read_data_subset: None,
            timeout_secs: timeout_secs(&p.timeout),
            jitter_secs: default_jitter(&p.schedule, p.timezone, now),
            requested_at: requested(MaintenanceKind::Prune)?,
        }),
        None => None,
    };
    let check = match check {
        Some(c) => Some(AgentMaintenance {
            schedule: c.schedule.clone(),
            timezone: c.timezone,
            max_unused: None,
            read_data_subset: c.read_data_subset.clone(),
            timeout_secs: timeout_secs(&c.timeout),
            jitter_secs: default_jitter(&c.schedule, c.timezone, now),
            requested_at: requested(MaintenanceKind::Check)?,
        }),
        None => None,
    };
    Ok((prune, check))
}

/// Why a run-now request for maintenance was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestRefused {
    #[error("repository {0:?}")]
    NoRepository(String),
    #[error("repository {repository:?} has no {kind} policy; set one first (PATCH /api/v1/repositories/{repository})")]
    NoPolicy { repository: String, kind: MaintenanceKind },
}

/// Records the operator's request to run `kind` on `repository` now (slot `now`) and bumps the configuration
/// revision, so the agents using the repository fetch it and fire once. Audited (kind `maintenance`).
pub fn request_maintenance(
    conn: &Connection,
    now: Timestamp,
    repository: &str,
    kind: MaintenanceKind,
    audit: crate::AuditEvent,
) -> Result<Result<Timestamp, RequestRefused>, DbError> {
    let column = match kind {
        MaintenanceKind::Prune => "prune_policy",
        MaintenanceKind::Check => "check_policy",
    };
    let policy: Option<Option<String>> = conn
        .query_row(&format!("SELECT {column} FROM repositories WHERE name = ?1"), [repository], |r| r.get(0))
        .optional()?;
    match policy {
        None => return Ok(Err(RequestRefused::NoRepository(repository.to_string()))),
        Some(None) => return Ok(Err(RequestRefused::NoPolicy { repository: repository.to_string(), kind })),
        Some(Some(_)) => {}
    }
    // Two requests within one second would share a slot: the second one moves a second on.
    let previous: Option<i64> = conn
        .prepare_cached("SELECT requested_at FROM repository_maintenance WHERE repository = ?1 AND kind = ?2")?
        .query_row(params![repository, kind.as_str()], |r| r.get::<_, Option<i64>>(0))
        .optional()?
        .flatten();
    let at = previous.map_or(now, |p| now.max(p + 1));
    conn.prepare_cached(
        "INSERT INTO repository_maintenance (repository, kind, requested_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (repository, kind) DO UPDATE SET requested_at = excluded.requested_at",
    )?
    .execute(params![repository, kind.as_str(), at])?;
    crate::plans::bump_config_revision(conn)?;
    crate::record_audit(
        conn,
        &crate::AuditEvent {
            kind: "maintenance".into(),
            detail: Some(format!("{kind} of {repository} requested (slot {at})")),
            ..audit
        },
    )?;
    Ok(Ok(at))
}

/// The answer to a maintenance lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaintLease {
    Granted {
        expires_at: Timestamp,
        ttl_secs: u64,
    },
    Busy {
        holder_agent: String,
        retry_after_secs: u64,
    },
    /// A successful run already covered this slot (or a later one): skip it.
    Done {
        done_slot: Timestamp,
    },
    /// The slot is later than any firing can be now (a forged or clock-skewed slot): refused, never granted.
    SlotAhead {
        latest: Timestamp,
    },
    /// The agent has no plan on the repository: it does not maintain it.
    NotUsed,
    /// Runs of this slot failed [`MAX_FAILED_RUNS_PER_SLOT`] times: it is given up (the next firing tries afresh).
    Exhausted {
        failed_runs: i64,
    },
}

/// Takes or renews a maintenance lease (rules in the module documentation). `max_ttl` caps the lifetime.
///
/// A request of the operation the lease row still names is a renewal, also after the lease's expiry (its restic
/// still holds the repository); it passes no gate. Every grant is recorded against the operation
/// (`maintenance_grants`): its success covers that slot only.
#[allow(clippy::too_many_arguments)]
pub fn take_maintenance_lease(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    repository: &str,
    operation_id: &str,
    ttl_secs: u64,
    max_ttl: u64,
    m: &MaintenanceLease,
) -> Result<MaintLease, DbError> {
    let held: Option<(String, String, Timestamp)> = conn
        .prepare_cached("SELECT agent_id, operation_id, expires_at FROM leases WHERE repository = ?1")?
        .query_row([repository], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let renewing = held.as_ref().is_some_and(|(a, o, _)| a == agent_id && o == operation_id);
    if !renewing {
        if !agent_uses(conn, agent_id, repository)? {
            return Ok(MaintLease::NotUsed);
        }
        if m.slot > now + MAX_SLOT_AHEAD_SECS {
            return Ok(MaintLease::SlotAhead { latest: now + MAX_SLOT_AHEAD_SECS });
        }
        let done: Option<i64> = conn
            .prepare_cached("SELECT done_slot FROM repository_maintenance WHERE repository = ?1 AND kind = ?2")?
            .query_row(params![repository, m.kind.as_str()], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten();
        if let Some(done_slot) = done.filter(|d| *d >= m.slot) {
            return Ok(MaintLease::Done { done_slot });
        }
        if let Some((holder_agent, _, expires_at)) = held.filter(|(_, _, e)| *e > now) {
            return Ok(MaintLease::Busy { holder_agent, retry_after_secs: (expires_at - now).max(1) as u64 });
        }
        let failed_runs: i64 = conn
            .prepare_cached(
                "SELECT count(*) FROM maintenance_grants g
                 JOIN operations o ON o.id = g.operation_id AND o.agent_id = g.agent_id
                 WHERE g.repository = ?1 AND g.kind = ?2 AND g.slot = ?3 AND o.status = 'failed'",
            )?
            .query_row(params![repository, m.kind.as_str(), m.slot], |r| r.get(0))?;
        if failed_runs >= MAX_FAILED_RUNS_PER_SLOT {
            return Ok(MaintLease::Exhausted { failed_runs });
        }
        // A run of this slot (or a later one) ended and released its lease, but its final report has not arrived:
        // its success would cover the slot, so nobody runs it again until the report says it did not.
        let pending: Option<(String, Timestamp)> = conn
            .prepare_cached(
                "SELECT g.agent_id, g.expires_at FROM maintenance_grants g
                 WHERE g.repository = ?1 AND g.kind = ?2 AND g.slot >= ?3 AND g.released = 1
                   AND g.expires_at + ?4 > ?5
                   AND NOT (g.agent_id = ?6 AND g.operation_id = ?7)
                   AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.id = g.operation_id AND o.agent_id = g.agent_id
                                   AND o.status IN ('success', 'warning', 'failed', 'cancelled'))
                 ORDER BY g.expires_at DESC LIMIT 1",
            )?
            .query_row(
                params![repository, m.kind.as_str(), m.slot, REPORT_GRACE_SECS, now, agent_id, operation_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((holder_agent, expires_at)) = pending {
            let retry = (expires_at + REPORT_GRACE_SECS - now).clamp(1, BACKUP_WAIT_WINDOW) as u64;
            return Ok(MaintLease::Busy { holder_agent, retry_after_secs: retry });
        }
        let waited: Option<i64> = conn
            .prepare_cached("SELECT max(asked_at) FROM lease_waits WHERE repository = ?1")?
            .query_row([repository], |r| r.get(0))?;
        if let Some(asked_at) = waited.filter(|t| now - *t < BACKUP_WAIT_WINDOW) {
            conn.prepare_cached(
                "INSERT INTO maintenance_waits (repository, kind, slot, first_refused_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (repository, kind, slot) DO NOTHING",
            )?
            .execute(params![repository, m.kind.as_str(), m.slot, now])?;
            let since: Timestamp = conn
                .prepare_cached(
                    "SELECT first_refused_at FROM maintenance_waits WHERE repository = ?1 AND kind = ?2 AND slot = ?3",
                )?
                .query_row(params![repository, m.kind.as_str(), m.slot], |r| r.get(0))?;
            if now - since < yield_limit(conn, repository, m.kind, now)? {
                return Ok(MaintLease::Busy {
                    holder_agent: String::new(),
                    retry_after_secs: (BACKUP_WAIT_WINDOW - (now - asked_at)).max(1) as u64,
                });
            }
            // Held off long enough: this slot goes before the backups now (they wait for it).
        }
    }
    let ttl = ttl_secs.clamp(*LEASE_TTL.start(), max_ttl.clamp(*LEASE_TTL.start(), *LEASE_TTL.end()));
    let expires_at = now + ttl as i64;
    if renewing {
        // The lease keeps the kind and slot it was granted for.
        conn.prepare_cached("UPDATE leases SET expires_at = ?2 WHERE repository = ?1")?
            .execute(params![repository, expires_at])?;
        conn.prepare_cached(
            "UPDATE maintenance_grants SET expires_at = max(expires_at, ?3) WHERE agent_id = ?1 AND operation_id = ?2",
        )?
        .execute(params![agent_id, operation_id, expires_at])?;
        return Ok(MaintLease::Granted { expires_at, ttl_secs: ttl });
    }
    conn.prepare_cached(
        "INSERT INTO leases (repository, agent_id, operation_id, expires_at, maintenance_kind, maintenance_slot)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (repository) DO UPDATE SET agent_id = excluded.agent_id, operation_id = excluded.operation_id,
            expires_at = excluded.expires_at, maintenance_kind = excluded.maintenance_kind,
            maintenance_slot = excluded.maintenance_slot",
    )?
    .execute(params![repository, agent_id, operation_id, expires_at, m.kind.as_str(), m.slot])?;
    conn.prepare_cached("DELETE FROM maintenance_grants WHERE expires_at < ?1")?.execute([now - GRANT_KEEP_SECS])?;
    conn.prepare_cached(
        "DELETE FROM maintenance_waits WHERE (repository = ?1 AND kind = ?2 AND slot <= ?3) OR first_refused_at < ?4",
    )?
    .execute(params![repository, m.kind.as_str(), m.slot, now - GRANT_KEEP_SECS])?;
    conn.prepare_cached(
        "INSERT INTO maintenance_grants (agent_id, operation_id, repository, kind, slot, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (agent_id, operation_id) DO UPDATE SET repository = excluded.repository, kind = excluded.kind,
            slot = excluded.slot, expires_at = excluded.expires_at, released = 0",
    )?
    .execute(params![agent_id, operation_id, repository, m.kind.as_str(), m.slot, expires_at])?;
    Ok(MaintLease::Granted { expires_at, ttl_secs: ttl })
}

/// How long a slot of `kind` on `repository` yields to waiting backups: a quarter of its policy's interval, within
/// [`YIELD_LIMIT_SECS`] (an hour without a policy).
fn yield_limit(conn: &Connection, repository: &str, kind: MaintenanceKind, now: Timestamp) -> Result<i64, DbError> {
    let column = match kind {
        MaintenanceKind::Prune => "prune_policy",
        MaintenanceKind::Check => "check_policy",
    };
    let policy: Option<String> = conn
        .query_row(&format!("SELECT {column} FROM repositories WHERE name = ?1"), [repository], |r| r.get(0))
        .optional()?
        .flatten();
    let schedule = policy
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|v| v.get("schedule").and_then(|s| s.as_str()).and_then(|s| Schedule::parse(s).ok()));
    let at = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
    Ok(match schedule {
        Some(s) => (s.interval(at, Timezone::Utc).as_secs() as i64 / 4)
            .clamp(*YIELD_LIMIT_SECS.start(), *YIELD_LIMIT_SECS.end()),
        None => 3600,
    })
}

/// Notes that `agent_id`'s `operation_id` released its lease of `repository`: if it was a maintenance lease, its
/// final report is on its way (see [`take_maintenance_lease`]).
pub(crate) fn note_release(
    conn: &Connection,
    agent_id: &str,
    repository: &str,
    operation_id: &str,
) -> Result<(), DbError> {
    conn.prepare_cached(
        "UPDATE maintenance_grants SET released = 1 WHERE agent_id = ?1 AND operation_id = ?2 AND repository = ?3",
    )?
    .execute(params![agent_id, operation_id, repository])?;
    Ok(())
}

/// Notes what a backup's lease request was answered: a refused one is a waiting backup (maintenance yields to it),
/// a granted one is no longer waiting (only its own wait is forgotten: other backups may still wait). Waits not
/// renewed for an hour are forgotten.
pub(crate) fn note_backup_lease(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    repository: &str,
    operation_id: &str,
    lease: &Lease,
) -> Result<(), DbError> {
    match lease {
        Lease::Busy { .. } => conn
            .prepare_cached(
                "INSERT INTO lease_waits (repository, agent_id, operation_id, asked_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (repository, agent_id, operation_id) DO UPDATE SET asked_at = excluded.asked_at",
            )?
            .execute(params![repository, agent_id, operation_id, now])?,
        Lease::Granted { .. } => conn
            .prepare_cached("DELETE FROM lease_waits WHERE repository = ?1 AND agent_id = ?2 AND operation_id = ?3")?
            .execute(params![repository, agent_id, operation_id])?,
    };
    conn.prepare_cached("DELETE FROM lease_waits WHERE asked_at < ?1")?.execute([now - WAIT_FORGET_SECS])?;
    Ok(())
}

/// Called for each stored final report of a repository-level operation: the last run per repository and kind,
/// on success the slot it covered, and for a check whose result is about the data, the repository's health.
/// Cancelled runs change nothing (like plan status). Runs are ordered by slot, then finish time: a report of an
/// older slot arriving late does not override a newer slot's result. The covered slot is the one granted to the
/// operation's lease (`maintenance_grants`), never after `now`; a report whose operation was never granted a slot
/// covers none.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_final(
    conn: &Connection,
    now: Timestamp,
    agent_id: &str,
    repository: &str,
    kind: OperationKind,
    operation_id: &str,
    status: OperationStatus,
    reason: Option<FailureReason>,
    finished_at: Timestamp,
    claimed_slot: Option<Timestamp>,
) -> Result<(), DbError> {
    let kind = match kind {
        OperationKind::Prune => MaintenanceKind::Prune,
        OperationKind::Check => MaintenanceKind::Check,
        _ => return Ok(()),
    };
    if status == OperationStatus::Cancelled || !status.is_final() {
        return Ok(());
    }
    let granted: Option<Timestamp> = conn
        .prepare_cached(
            "SELECT slot FROM maintenance_grants
             WHERE agent_id = ?1 AND operation_id = ?2 AND repository = ?3 AND kind = ?4",
        )?
        .query_row(params![agent_id, operation_id, repository, kind.as_str()], |r| r.get(0))
        .optional()?;
    // The covered slot is the granted one only; a run that was never granted one (it gave up waiting) is ordered by
    // the slot it names.
    let slot = granted.map(|s| s.min(now));
    let order_slot = granted.or(claimed_slot).map(|s| s.min(now));
    let success = matches!(status, OperationStatus::Success | OperationStatus::Warning);
    // Only a check's result about the data is the repository's health: not a lock held elsewhere, a timeout, or
    // restic missing on the host.
    let about_data = kind == MaintenanceKind::Check
        && (success
            || !matches!(
                reason,
                Some(FailureReason::Locked | FailureReason::Timeout | FailureReason::ResticUnavailable)
            ));
    conn.prepare_cached(
        "INSERT INTO repository_maintenance (repository, kind, last_operation, last_status, last_finished_at,
                                             last_success_at, done_slot, last_slot, health_status, health_slot,
                                             health_finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, CASE WHEN ?9 IS NULL THEN NULL ELSE ?8 END,
                 CASE WHEN ?9 IS NULL THEN NULL ELSE ?5 END)
         ON CONFLICT (repository, kind) DO UPDATE SET
            last_operation = CASE WHEN last_finished_at IS NULL
                                    OR (coalesce(excluded.last_slot, 0), excluded.last_finished_at)
                                       >= (coalesce(last_slot, 0), last_finished_at)
                                  THEN excluded.last_operation ELSE last_operation END,
            last_status = CASE WHEN last_finished_at IS NULL
                                 OR (coalesce(excluded.last_slot, 0), excluded.last_finished_at)
                                    >= (coalesce(last_slot, 0), last_finished_at)
                               THEN excluded.last_status ELSE last_status END,
            last_slot = CASE WHEN last_finished_at IS NULL
                               OR (coalesce(excluded.last_slot, 0), excluded.last_finished_at)
                                  >= (coalesce(last_slot, 0), last_finished_at)
                             THEN excluded.last_slot ELSE last_slot END,
            last_finished_at = CASE WHEN last_finished_at IS NULL
                                      OR (coalesce(excluded.last_slot, 0), excluded.last_finished_at)
                                         >= (coalesce(last_slot, 0), last_finished_at)
                                    THEN excluded.last_finished_at ELSE last_finished_at END,
            health_status = CASE WHEN excluded.health_status IS NOT NULL AND (health_finished_at IS NULL
                                   OR (coalesce(excluded.health_slot, 0), excluded.health_finished_at)
                                      >= (coalesce(health_slot, 0), health_finished_at))
                                 THEN excluded.health_status ELSE health_status END,
            health_slot = CASE WHEN excluded.health_status IS NOT NULL AND (health_finished_at IS NULL
                                 OR (coalesce(excluded.health_slot, 0), excluded.health_finished_at)
                                    >= (coalesce(health_slot, 0), health_finished_at))
                               THEN excluded.health_slot ELSE health_slot END,
            health_finished_at = CASE WHEN excluded.health_status IS NOT NULL AND (health_finished_at IS NULL
                                        OR (coalesce(excluded.health_slot, 0), excluded.health_finished_at)
                                           >= (coalesce(health_slot, 0), health_finished_at))
                                      THEN excluded.health_finished_at ELSE health_finished_at END,
            last_success_at = CASE WHEN excluded.last_success_at IS NULL THEN last_success_at
                                   ELSE max(coalesce(last_success_at, 0), excluded.last_success_at) END,
            done_slot = CASE WHEN excluded.done_slot IS NULL THEN done_slot
                             ELSE max(coalesce(done_slot, excluded.done_slot), excluded.done_slot) END,
            requested_at = CASE WHEN excluded.done_slot IS NOT NULL AND requested_at <= excluded.done_slot
                                THEN NULL ELSE requested_at END",
    )?
    .execute(params![
        repository,
        kind.as_str(),
        operation_id,
        status.as_str(),
        finished_at,
        success.then_some(finished_at),
        if success { slot } else { None },
        order_slot,
        about_data.then(|| status.as_str()),
    ])?;
    Ok(())
}

/// Every repository's maintenance state, by name (every repository, with `never` when nothing ran).
pub fn repository_health(conn: &Connection) -> Result<HashMap<String, RepositoryHealth>, DbError> {
    let mut out: HashMap<String, RepositoryHealth> = HashMap::new();
    let mut names = conn.prepare_cached("SELECT name FROM repositories")?;
    for name in names.query_map([], |r| r.get::<_, String>(0))? {
        let name = name?;
        out.insert(
            name.clone(),
            RepositoryHealth {
                repository: name,
                health: Health::Never,
                last_prune: None,
                last_check: None,
                last_success_prune_at: None,
                last_success_check_at: None,
            },
        );
    }
    let mut stmt = conn.prepare_cached(
        "SELECT m.repository, m.kind, m.last_status, m.last_finished_at, m.last_success_at, o.id, o.agent_id,
                o.message, o.maintenance, m.health_status
         FROM repository_maintenance m LEFT JOIN operations o ON o.id = m.last_operation
         WHERE m.last_status IS NOT NULL",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let repository: String = r.get(0)?;
        let Some(entry) = out.get_mut(&repository) else { continue };
        let kind: String = r.get(1)?;
        let status: String = r.get(2)?;
        let Ok(status) = status.parse::<OperationStatus>() else { continue };
        let run = MaintenanceRun {
            operation_id: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
            agent_id: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
            status,
            finished_at: r.get(3)?,
            message: r.get(7)?,
            summary: from_json::<MaintenanceSummary>(r.get(8)?),
        };
        let success_at: Option<i64> = r.get(4)?;
        match kind.parse::<MaintenanceKind>() {
            Ok(MaintenanceKind::Prune) => {
                entry.last_prune = Some(run);
                entry.last_success_prune_at = success_at;
            }
            Ok(MaintenanceKind::Check) => {
                let health = r.get::<_, Option<String>>(9)?.and_then(|s| s.parse::<OperationStatus>().ok());
                entry.health = maintenance::repository_health(health);
                entry.last_check = Some(run);
                entry.last_success_check_at = success_at;
            }
            Err(_) => {}
        }
    }
    Ok(out)
}

/// Whether a plan on `repository` applies to `agent_id`.
pub(crate) fn agent_uses(conn: &Connection, agent_id: &str, repository: &str) -> Result<bool, DbError> {
    let plans = crate::plans::plans_for_agent(conn, agent_id)?.unwrap_or_default();
    Ok(plans.iter().any(|p| p.plan.repository == repository))
}

/// Forgets the operator's run-now request of `kind` on `repository` (its policy was removed: a policy added again
/// later must not fire an old request). A run that succeeded for a request's slot forgets it too
/// ([`record_final`]).
pub(crate) fn forget_request(conn: &Connection, repository: &str, kind: MaintenanceKind) -> Result<(), DbError> {
    conn.prepare_cached("UPDATE repository_maintenance SET requested_at = NULL WHERE repository = ?1 AND kind = ?2")?
        .execute(params![repository, kind.as_str()])?;
    Ok(())
}

/// Forgets a deleted repository's maintenance state.
pub(crate) fn forget_repository(conn: &Connection, repository: &str) -> Result<(), DbError> {
    conn.prepare_cached("DELETE FROM repository_maintenance WHERE repository = ?1")?.execute([repository])?;
    conn.prepare_cached("DELETE FROM lease_waits WHERE repository = ?1")?.execute([repository])?;
    conn.prepare_cached("DELETE FROM maintenance_grants WHERE repository = ?1")?.execute([repository])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_policies_refuse_local_time_and_what_restic_refuses() {
        let prune = |tz, max: &str| PrunePolicy {
            schedule: "@daily".into(),
            timezone: tz,
            max_unused: Some(max.into()),
            timeout: None,
        };
        assert!(validate_prune(&prune(Timezone::Utc, "10%")).is_ok());
        let e = validate_prune(&prune(Timezone::Local, "10%")).unwrap_err();
        assert!(e.starts_with("prune.timezone:"), "{e}");
        let e = validate_prune(&prune(Timezone::Utc, "100%")).unwrap_err();
        assert!(e.starts_with("prune.max_unused"), "{e}");
        let check = |tz, subset: &str| CheckPolicy {
            schedule: "@weekly".into(),
            timezone: tz,
            read_data_subset: Some(subset.into()),
            timeout: None,
        };
        assert!(validate_check(&check(Timezone::Utc, "1/256")).is_ok());
        let e = validate_check(&check(Timezone::Local, "1/5")).unwrap_err();
        assert!(e.starts_with("check.timezone:"), "{e}");
        let e = validate_check(&check(Timezone::Utc, "1/300")).unwrap_err();
        assert!(e.starts_with("check.read_data_subset"), "{e}");
    }
}
