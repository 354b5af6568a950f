//! The `plans` table: what to back up (paths, excludes, tags, options), where (a repository), when (a schedule) and
//! on which agents (explicit ids and/or a label selector). Also the fleet-wide `config_revision` that every change
//! to plans, repositories or labels bumps, and run-now requests (queued `operations` rows that ride heartbeat
//! answers until the agent reports them).
//!
//! List-valued columns hold JSON (read and written whole). Every change records its own audit event
//! (`plan_created`, `plan_updated`, `plan_deleted`, `plan_run_requested`) in the same operation.

use std::collections::BTreeMap;
use std::time::Duration;

use rm_protocol::backup::{
    CreatePlan, OperationStatus, PLAN_TAG_PREFIX, RESERVED_TAG_PREFIX, Timezone, UpdatePlan, plan_applies,
};
use rm_protocol::retention::Retention;
use rm_protocol::schedule::{Schedule, parse_duration};
use rm_protocol::validate::{is_printable, is_unsafe_char};
use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::audit::{AuditEvent, record_audit};
use crate::labels::{self, Labels};
use crate::time::Timestamp;

/// The run timeout when a plan names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The largest default jitter (the default is a twentieth of the schedule's interval, at most this).
pub const MAX_DEFAULT_JITTER: Duration = Duration::from_secs(600);
/// Most run-now requests one heartbeat answer carries.
pub const MAX_RUN_NOW: usize = 100;
// The heartbeat's queued-work queries say `LIMIT 100` literally: a bound LIMIT makes SQLite re-plan the statement on
// every execution (its plan depends on the value), which cost a quarter of a heartbeat's database time.
const _: () = assert!(MAX_RUN_NOW == 100);
const MAX_PATHS: usize = 256;
const MAX_PATH: usize = 4096;
const MAX_EXCLUDES: usize = 1024;
const MAX_TAGS: usize = 32;
const MAX_TAG: usize = 128;
const MAX_AGENTS: usize = 10_000;

/// A plan, checked (by [`NewPlan::validated`]) or as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPlan {
    pub name: String,
    pub repository: String,
    pub paths: Vec<String>,
    pub excludes: Vec<String>,
    pub schedule: String,
    pub timezone: Timezone,
    pub tags: Vec<String>,
    pub one_file_system: bool,
    pub exclude_caches: bool,
    /// Sorted, without duplicates.
    pub agents: Vec<String>,
    pub selector: Labels,
    pub timeout_secs: u64,
    pub jitter_secs: u64,
    /// `None`: every snapshot is kept (no forget runs).
    pub retention: Option<Retention>,
}

/// A row of `plans`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInfo {
    pub plan: NewPlan,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl PlanInfo {
    /// Whether the plan applies to an agent with these labels (`rm_protocol::backup::plan_applies`).
    pub fn applies_to(&self, agent_id: &str, labels: &Labels) -> bool {
        plan_applies(&self.plan.agents, &self.plan.selector, agent_id, labels)
    }

    /// The schedule's interval now (what `overdue` is measured in and the default jitter derives from).
    pub fn interval(&self) -> Duration {
        interval_of(&self.plan.schedule, self.plan.timezone)
    }
}

/// Why a plan change or a run-now request was refused (nothing written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanRefused {
    /// Invalid input; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("a plan named {0:?} already exists")]
    NameTaken(String),
    #[error("plan {0:?} was not found")]
    NotFound(String),
    #[error("repository: there is no repository named {0:?}")]
    UnknownRepository(String),
    #[error("agents: no enrolled agent has the id {0:?}")]
    UnknownAgent(String),
    /// Run now: the plan does not apply to the agent.
    #[error(
        "plan {plan:?} does not apply to agent {agent:?} (neither named in its agents nor matched by its selector)"
    )]
    NotAssigned { plan: String, agent: String },
}

fn interval_of(schedule: &str, tz: Timezone) -> Duration {
    Schedule::parse(schedule).map(|s| s.interval(chrono::Utc::now(), tz)).unwrap_or(Duration::from_secs(86_400))
}

/// An absolute path on the agent's host: POSIX `/…` or Windows `C:\…` (or `C:/…`).
pub fn is_absolute_path(path: &str) -> bool {
    let b = path.as_bytes();
    path.starts_with('/')
        || (b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'\\' | b'/'))
}

fn validate_paths(paths: &[String]) -> Result<(), String> {
    if paths.is_empty() {
        return Err("paths: at least one path to back up is needed".into());
    }
    if paths.len() > MAX_PATHS {
        return Err(format!("paths: at most {MAX_PATHS} paths"));
    }
    for path in paths {
        if !is_printable(path, MAX_PATH) {
            return Err(format!("paths: {:?} must be 1-{MAX_PATH} bytes without control characters", shown(path)));
        }
        if !is_absolute_path(path) {
            return Err(format!("paths: {:?} is not absolute (/… or C:\\…)", shown(path)));
        }
    }
    Ok(())
}

fn validate_excludes(excludes: &[String]) -> Result<(), String> {
    if excludes.len() > MAX_EXCLUDES {
        return Err(format!("excludes: at most {MAX_EXCLUDES} patterns"));
    }
    for pattern in excludes {
        if !is_printable(pattern, MAX_PATH) {
            return Err(format!(
                "excludes: {:?} must be 1-{MAX_PATH} bytes without control characters",
                shown(pattern)
            ));
        }
    }
    Ok(())
}

fn validate_tags(tags: &[String]) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!("tags: at most {MAX_TAGS} tags"));
    }
    for tag in tags {
        if !is_printable(tag, MAX_TAG) || tag.contains(',') || tag.chars().any(char::is_whitespace) {
            return Err(format!(
                "tags: {:?} must be 1-{MAX_TAG} printable characters without commas or white space (restic \
                 separates tags with commas)",
                shown(tag)
            ));
        }
        if tag.starts_with(RESERVED_TAG_PREFIX) {
            return Err(format!(
                "tags: {:?} starts with {RESERVED_TAG_PREFIX:?}, which is reserved for restic-manager's own tags \
                 (every snapshot of a plan carries {PLAN_TAG_PREFIX}<plan>; another plan's tag would put these \
                 snapshots under that plan's retention)",
                shown(tag)
            ));
        }
    }
    Ok(())
}

/// `0`, `0s`, `0m` … (no jitter) or a duration.
fn parse_jitter(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if !t.is_empty() && t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).bytes().all(|b| b == b'0') {
        return Ok(Duration::ZERO);
    }
    parse_duration(t)
}

/// The default jitter for a schedule: a twentieth of its interval, at most 10 minutes.
pub fn default_jitter(interval: Duration) -> Duration {
    (interval / 20).min(MAX_DEFAULT_JITTER)
}

impl NewPlan {
    /// Checks operator input (API and command line alike); the error names the field. That the repository and the
    /// agents exist is checked when the plan is stored.
    pub fn validated(spec: CreatePlan) -> Result<NewPlan, String> {
        rm_protocol::validate::name("name", &spec.name)?;
        rm_protocol::validate::name("name", &spec.repository).map_err(|e| format!("repository: {e}"))?;
        validate_paths(&spec.paths)?;
        validate_excludes(&spec.excludes)?;
        validate_tags(&spec.tags)?;
        let schedule_text = spec.schedule.trim().to_owned();
        let schedule = Schedule::parse(&schedule_text).map_err(|e| format!("schedule: {e}"))?;
        let interval = schedule.interval(chrono::Utc::now(), spec.timezone);
        let timeout = match &spec.timeout {
            Some(t) => parse_duration(t).map_err(|e| format!("timeout: {e}"))?,
            None => DEFAULT_TIMEOUT,
        };
        let jitter = match &spec.jitter {
            Some(j) => parse_jitter(j).map_err(|e| format!("jitter: {e}"))?,
            None => default_jitter(interval),
        };
        if !jitter.is_zero() && jitter >= interval {
            return Err(format!(
                "jitter: {}s must be shorter than the schedule's interval ({}s)",
                jitter.as_secs(),
                interval.as_secs()
            ));
        }
        labels::validate_labels("selector", &spec.selector)?;
        if let Some(retention) = &spec.retention {
            retention.validate()?;
        }
        let mut agents = spec.agents;
        if agents.len() > MAX_AGENTS {
            return Err(format!("agents: at most {MAX_AGENTS} agent ids"));
        }
        if let Some(bad) = agents.iter().find(|a| !is_printable(a, 64) || a.chars().any(is_unsafe_char)) {
            return Err(format!("agents: {:?} is not an agent id", shown(bad)));
        }
        agents.sort();
        agents.dedup();
        Ok(NewPlan {
            name: spec.name,
            repository: spec.repository,
            paths: spec.paths,
            excludes: spec.excludes,
            schedule: schedule_text,
            timezone: spec.timezone,
            tags: spec.tags,
            one_file_system: spec.one_file_system,
            exclude_caches: spec.exclude_caches,
            agents,
            selector: spec.selector,
            timeout_secs: timeout.as_secs(),
            jitter_secs: jitter.as_secs(),
            retention: spec.retention,
        })
    }

    /// The plan with `changes` applied, checked as a whole. A new schedule without a new jitter gets the new
    /// schedule's default jitter.
    pub fn changed(&self, changes: &UpdatePlan) -> Result<NewPlan, String> {
        let schedule_changed = changes.schedule.as_ref().is_some_and(|s| s.trim() != self.schedule);
        let jitter = match (&changes.jitter, schedule_changed) {
            (Some(j), _) => Some(j.clone()),
            (None, true) => None,
            (None, false) => Some(format!("{}s", self.jitter_secs)),
        };
        let c = changes.clone();
        NewPlan::validated(CreatePlan {
            name: self.name.clone(),
            repository: c.repository.unwrap_or_else(|| self.repository.clone()),
            paths: c.paths.unwrap_or_else(|| self.paths.clone()),
            excludes: c.excludes.unwrap_or_else(|| self.excludes.clone()),
            schedule: c.schedule.unwrap_or_else(|| self.schedule.clone()),
            timezone: c.timezone.unwrap_or(self.timezone),
            tags: c.tags.unwrap_or_else(|| self.tags.clone()),
            one_file_system: c.one_file_system.unwrap_or(self.one_file_system),
            exclude_caches: c.exclude_caches.unwrap_or(self.exclude_caches),
            agents: c.agents.unwrap_or_else(|| self.agents.clone()),
            selector: c.selector.unwrap_or_else(|| self.selector.clone()),
            timeout: Some(c.timeout.unwrap_or_else(|| format!("{}s", self.timeout_secs))),
            jitter,
            retention: c.retention.unwrap_or_else(|| self.retention.clone()),
        })
    }

    /// For the audit log.
    fn describe(&self) -> String {
        format!(
            "repository={} paths=[{}] schedule={:?} timezone={:?} agents=[{}] selector={{{}}} retention={}",
            self.repository,
            self.paths.join(","),
            self.schedule,
            self.timezone,
            self.agents.join(","),
            labels::describe(&self.selector),
            self.retention.as_ref().map_or_else(|| "none".to_string(), |r| format!("{{{}}}", r.describe()))
        )
    }
}

/// Whether an update changes nothing at all (an empty PATCH is refused by the API).
pub fn is_empty_update(u: &UpdatePlan) -> bool {
    *u == UpdatePlan::default()
}

fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

fn json(list: &[String]) -> String {
    serde_json::to_string(list).expect("a string list serialises")
}

fn timezone_text(tz: Timezone) -> &'static str {
    match tz {
        Timezone::Utc => "utc",
        Timezone::Local => "local",
    }
}

const COLUMNS: &str = "name, repository, paths, excludes, schedule, timezone, tags, one_file_system, exclude_caches, \
                       agents, selector, timeout_secs, jitter_secs, created_at, updated_at, retention";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PlanInfo> {
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let text: String = r.get(i)?;
        Ok(serde_json::from_str(&text).unwrap_or_default())
    };
    let selector: String = r.get(10)?;
    let timezone: String = r.get(5)?;
    let retention: Option<String> = r.get(15)?;
    Ok(PlanInfo {
        plan: NewPlan {
            name: r.get(0)?,
            repository: r.get(1)?,
            paths: list(2)?,
            excludes: list(3)?,
            schedule: r.get(4)?,
            timezone: if timezone == "local" { Timezone::Local } else { Timezone::Utc },
            tags: list(6)?,
            one_file_system: r.get(7)?,
            exclude_caches: r.get(8)?,
            agents: list(9)?,
            selector: labels::from_json(&selector),
            timeout_secs: r.get::<_, i64>(11)?.max(0) as u64,
            jitter_secs: r.get::<_, i64>(12)?.max(0) as u64,
            retention: None,
        },
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
    })
    .map(|mut info| {
        // A policy that no longer reads (written by a newer server, say) counts as none rather than hiding the plan.
        info.plan.retention = retention.as_deref().and_then(|t| serde_json::from_str(t).ok());
        info
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration revision
// ---------------------------------------------------------------------------------------------------------------

/// The fleet-wide desired-configuration revision (heartbeat answers carry it; agents refetch when it changed).
pub fn config_revision(conn: &Connection) -> Result<u64, DbError> {
    let revision: Option<i64> = conn
        .prepare_cached("SELECT revision FROM config_revision WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(revision.unwrap_or(1).max(0) as u64)
}

/// Bumps the revision after a change to plans, repositories or labels; returns the new one.
pub fn bump_config_revision(conn: &Connection) -> Result<u64, DbError> {
    let revision: i64 = conn
        .prepare_cached(
            "INSERT INTO config_revision (id, revision) VALUES (1, 2)
         ON CONFLICT (id) DO UPDATE SET revision = revision + 1 RETURNING revision",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(revision.max(0) as u64)
}

// ---------------------------------------------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------------------------------------------

/// Checks what only the database knows: the repository and every named agent exist.
fn check_references(conn: &Connection, plan: &NewPlan) -> Result<Result<(), PlanRefused>, DbError> {
    if crate::repositories::get_repository(conn, &plan.repository)?.is_none() {
        return Ok(Err(PlanRefused::UnknownRepository(plan.repository.clone())));
    }
    let mut stmt = conn.prepare_cached("SELECT 1 FROM agents WHERE id = ?1")?;
    for agent in &plan.agents {
        if !stmt.exists([agent])? {
            return Ok(Err(PlanRefused::UnknownAgent(agent.clone())));
        }
    }
    Ok(Ok(()))
}

fn write_row(conn: &Connection, plan: &NewPlan, now: Timestamp, insert: bool) -> Result<usize, DbError> {
    let sql = if insert {
        "INSERT INTO plans (name, repository, paths, excludes, schedule, timezone, tags, one_file_system,
                            exclude_caches, agents, selector, timeout_secs, jitter_secs, created_at, updated_at,
                            retention)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15) ON CONFLICT (name) DO NOTHING"
    } else {
        "UPDATE plans SET repository = ?2, paths = ?3, excludes = ?4, schedule = ?5, timezone = ?6, tags = ?7,
                one_file_system = ?8, exclude_caches = ?9, agents = ?10, selector = ?11, timeout_secs = ?12,
                jitter_secs = ?13, updated_at = ?14, retention = ?15
         WHERE name = ?1"
    };
    Ok(conn.execute(
        sql,
        params![
            plan.name,
            plan.repository,
            json(&plan.paths),
            json(&plan.excludes),
            plan.schedule,
            timezone_text(plan.timezone),
            json(&plan.tags),
            plan.one_file_system,
            plan.exclude_caches,
            json(&plan.agents),
            labels::to_json(&plan.selector),
            plan.timeout_secs as i64,
            plan.jitter_secs as i64,
            now,
            plan.retention.as_ref().map(|r| serde_json::to_string(r).expect("a retention policy serialises")),
        ],
    )?)
}

fn record(conn: &Connection, audit: AuditEvent, kind: &str, detail: String) -> Result<(), DbError> {
    record_audit(conn, &AuditEvent { kind: kind.into(), detail: Some(detail), ..audit })
}

/// Stores a validated plan, bumps the configuration revision and records `plan_created` (`audit` says who and
/// where). Refused (nothing written) when the name is taken, the repository or a named agent does not exist.
pub fn create_plan(
    conn: &Connection,
    now: Timestamp,
    plan: &NewPlan,
    audit: AuditEvent,
) -> Result<Result<PlanInfo, PlanRefused>, DbError> {
    if let Err(refused) = check_references(conn, plan)? {
        return Ok(Err(refused));
    }
    if write_row(conn, plan, now, true)? == 0 {
        return Ok(Err(PlanRefused::NameTaken(plan.name.clone())));
    }
    bump_config_revision(conn)?;
    record(conn, audit, "plan_created", format!("created {} {}", plan.name, plan.describe()))?;
    Ok(Ok(get_plan(conn, &plan.name)?.expect("the row was just inserted")))
}

pub fn list_plans(conn: &Connection) -> Result<Vec<PlanInfo>, DbError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM plans ORDER BY name"))?;
    Ok(stmt.query_map([], row)?.collect::<Result<_, _>>()?)
}

pub fn get_plan(conn: &Connection, name: &str) -> Result<Option<PlanInfo>, DbError> {
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM plans WHERE name = ?1"), [name], row).optional()?)
}

/// Applies `changes` (checked as a whole with the stored plan), bumps the revision and records `plan_updated`.
pub fn update_plan(
    conn: &Connection,
    now: Timestamp,
    name: &str,
    changes: &UpdatePlan,
    audit: AuditEvent,
) -> Result<Result<PlanInfo, PlanRefused>, DbError> {
    let Some(current) = get_plan(conn, name)? else { return Ok(Err(PlanRefused::NotFound(name.to_owned()))) };
    let plan = match current.plan.changed(changes) {
        Ok(plan) => plan,
        Err(e) => return Ok(Err(PlanRefused::Invalid(e))),
    };
    if let Err(refused) = check_references(conn, &plan)? {
        return Ok(Err(refused));
    }
    write_row(conn, &plan, now, false)?;
    bump_config_revision(conn)?;
    record(conn, audit, "plan_updated", format!("updated {name} {}", plan.describe()))?;
    Ok(Ok(get_plan(conn, name)?.expect("the row exists")))
}

/// Deletes a plan, cancels its queued run-now requests, bumps the revision and records `plan_deleted`; `false`
/// when there was none (nothing written).
pub fn delete_plan(conn: &Connection, now: Timestamp, name: &str, audit: AuditEvent) -> Result<bool, DbError> {
    if conn.prepare_cached("DELETE FROM plans WHERE name = ?1")?.execute([name])? == 0 {
        return Ok(false);
    }
    conn.prepare_cached(
        "UPDATE operations SET status = 'cancelled', finished_at = ?2, message = 'the plan was deleted'
         WHERE plan = ?1 AND status = 'queued'",
    )?
    .execute(params![name, now])?;
    bump_config_revision(conn)?;
    record(conn, audit, "plan_deleted", format!("deleted {name}"))?;
    Ok(true)
}

/// The names of the plans that use a repository.
pub fn plans_using(conn: &Connection, repository: &str) -> Result<Vec<String>, DbError> {
    let mut stmt = conn.prepare_cached("SELECT name FROM plans WHERE repository = ?1 ORDER BY name")?;
    Ok(stmt.query_map([repository], |r| r.get(0))?.collect::<Result<_, _>>()?)
}

/// Every enrolled agent's id and labels.
pub fn agent_labels(conn: &Connection) -> Result<Vec<(String, Labels)>, DbError> {
    let mut stmt = conn.prepare_cached("SELECT id, labels FROM agents ORDER BY id")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, labels::from_json(&r.get::<_, String>(1)?))))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every enrolled agent's hostname (as it last reported it), by agent id.
pub fn agent_hostnames(conn: &Connection) -> Result<BTreeMap<String, String>, DbError> {
    let mut stmt = conn.prepare_cached("SELECT id, hostname FROM agents")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What an operator should know about a plan: with a retention policy, agents it applies to that report the same
/// hostname (restic's `--host` is the agent's hostname, so each one's forget treats the other's snapshots of the plan
/// as its own). `applies_to`: the plan's agents ([`applies_to`]); `hostnames`: [`agent_hostnames`].
pub fn plan_warnings(plan: &PlanInfo, applies_to: &[String], hostnames: &BTreeMap<String, String>) -> Vec<String> {
    // A plan stored before tags were checked: its agents refuse to forget for it until the tag is removed.
    let mut warnings: Vec<String> = plan
        .plan
        .tags
        .iter()
        .filter(|t| t.starts_with(RESERVED_TAG_PREFIX))
        .map(|t| {
            format!(
                "tags: {:?} starts with the reserved {RESERVED_TAG_PREFIX:?}; its snapshots may fall under another \
                 plan's retention, and agents do not forget for this plan until the tag is removed",
                shown(t)
            )
        })
        .collect();
    if plan.plan.retention.is_none() {
        return warnings;
    }
    let mut by_host: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for id in applies_to {
        if let Some(host) = hostnames.get(id) {
            by_host.entry(host.as_str()).or_default().push(id.as_str());
        }
    }
    warnings.extend(by_host.into_iter().filter(|(_, ids)| ids.len() > 1).map(|(host, ids)| {
        format!(
            "agents {} report the same hostname {host:?}: restic tells hosts apart by hostname, so this plan's \
                 retention treats their snapshots as one host's and each one's forget may remove the others'; give \
                 the machines distinct hostnames",
            ids.join(", ")
        )
    }));
    warnings
}

/// The enrolled agents a plan applies to now, in id order.
pub fn applies_to(plan: &PlanInfo, agents: &[(String, Labels)]) -> Vec<String> {
    agents.iter().filter(|(id, labels)| plan.applies_to(id, labels)).map(|(id, _)| id.clone()).collect()
}

/// The plans that apply to one agent; `None` when there is no such agent.
pub fn plans_for_agent(conn: &Connection, agent_id: &str) -> Result<Option<Vec<PlanInfo>>, DbError> {
    let labels: Option<String> = conn
        .prepare_cached("SELECT labels FROM agents WHERE id = ?1")?
        .query_row([agent_id], |r| r.get(0))
        .optional()?;
    let Some(labels) = labels.map(|l| labels::from_json(&l)) else { return Ok(None) };
    Ok(Some(list_plans(conn)?.into_iter().filter(|p| p.applies_to(agent_id, &labels)).collect()))
}

// ---------------------------------------------------------------------------------------------------------------
// Run now
// ---------------------------------------------------------------------------------------------------------------

/// `op_` + 32 lowercase hex digits from the OS random source.
pub fn new_operation_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("op_{hex}")
}

/// Queues a run of `plan` on `agent_id` (an `operations` row: kind backup, trigger run_now, status queued) and
/// records `plan_run_requested`; returns the operation id. Refused (nothing written) for an unknown plan or agent,
/// or a plan that does not apply to the agent.
pub fn request_run(
    conn: &Connection,
    now: Timestamp,
    plan: &str,
    agent_id: &str,
    audit: AuditEvent,
) -> Result<Result<String, PlanRefused>, DbError> {
    let Some(info) = get_plan(conn, plan)? else { return Ok(Err(PlanRefused::NotFound(plan.to_owned()))) };
    let labels: Option<String> = conn
        .prepare_cached("SELECT labels FROM agents WHERE id = ?1")?
        .query_row([agent_id], |r| r.get(0))
        .optional()?;
    let Some(labels) = labels.map(|l| labels::from_json(&l)) else {
        return Ok(Err(PlanRefused::UnknownAgent(agent_id.to_owned())));
    };
    if !info.applies_to(agent_id, &labels) {
        return Ok(Err(PlanRefused::NotAssigned { plan: plan.to_owned(), agent: agent_id.to_owned() }));
    }
    let id = new_operation_id();
    conn.prepare_cached(
        "INSERT INTO operations (id, agent_id, plan, kind, trigger, status, created_at)
         VALUES (?1, ?2, ?3, 'backup', 'run_now', ?4, ?5)",
    )?
    .execute(params![id, agent_id, plan, OperationStatus::Queued.as_str(), now])?;
    record(
        conn,
        AuditEvent { agent_id: Some(agent_id.to_owned()), ..audit },
        "plan_run_requested",
        format!("run {plan} on {agent_id}: {id}"),
    )?;
    Ok(Ok(id))
}

/// A run-now request not yet taken by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRun {
    pub operation_id: String,
    pub plan: String,
}

/// The agent's queued run-now requests, oldest first, at most [`MAX_RUN_NOW`].
pub fn queued_runs(conn: &Connection, agent_id: &str) -> Result<Vec<QueuedRun>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, plan FROM operations WHERE agent_id = ?1 AND status = 'queued' AND kind = 'backup'
         ORDER BY seq LIMIT 100",
    )?;
    let rows = stmt.query_map(params![agent_id], |r| Ok(QueuedRun { operation_id: r.get(0)?, plan: r.get(1)? }))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What a heartbeat answer carries besides updates: the configuration revision and the agent's queued run-now
/// requests (reads only: the full-volume fallback of the heartbeat can answer them too).
pub fn heartbeat_directives(conn: &Connection, agent_id: &str) -> Result<(u64, Vec<QueuedRun>), DbError> {
    Ok((config_revision(conn)?, queued_runs(conn, agent_id)?))
}

/// What the plans of `plans` need of the repositories: their names, once each, in order.
pub fn repositories_of(plans: &[PlanInfo]) -> Vec<String> {
    let mut names: Vec<String> = plans.iter().map(|p| p.plan.repository.clone()).collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::repositories::{NewRepository, create_repository, delete_repository};
    use crate::sealing::SecretKey;
    use crate::tokens::{NewToken, create_token};
    use crate::{Db, agents};

    fn spec(name: &str) -> CreatePlan {
        CreatePlan {
            name: name.into(),
            repository: "repo".into(),
            paths: vec!["/srv/data".into()],
            schedule: "0 3 * * *".into(),
            ..Default::default()
        }
    }

    fn invalid(s: CreatePlan) -> String {
        NewPlan::validated(s).unwrap_err()
    }

    #[test]
    fn plans_are_validated_field_by_field() {
        let plan = NewPlan::validated(spec("nightly")).unwrap();
        assert_eq!(plan.timeout_secs, 24 * 3600);
        assert_eq!(plan.jitter_secs, 600, "a twentieth of a day, capped at 10m");
        let every = NewPlan::validated(CreatePlan { schedule: "@every 1h".into(), ..spec("p") }).unwrap();
        assert_eq!(every.jitter_secs, 180);
        let windows = CreatePlan {
            paths: vec!["C:\\Users".into(), "d:/data".into()],
            tags: vec!["daily".into()],
            excludes: vec!["*.tmp".into()],
            timeout: Some("2h".into()),
            jitter: Some("0".into()),
            agents: vec!["b".into(), "a".into(), "b".into()],
            selector: BTreeMap::from([("env".into(), "prod".into())]),
            ..spec("p")
        };
        let plan = NewPlan::validated(windows).unwrap();
        assert_eq!((plan.timeout_secs, plan.jitter_secs), (7200, 0));
        assert_eq!(plan.agents, ["a", "b"]);

        assert!(invalid(spec("Bad Name")).starts_with("name"));
        assert!(invalid(CreatePlan { repository: "".into(), ..spec("p") }).starts_with("repository"));
        assert!(invalid(CreatePlan { paths: vec![], ..spec("p") }).starts_with("paths"));
        for bad in ["relative/x", "", "/a\nb", "C:", "\\\\server\\share"] {
            assert!(invalid(CreatePlan { paths: vec![bad.into()], ..spec("p") }).starts_with("paths"), "{bad:?}");
        }
        assert!(invalid(CreatePlan { excludes: vec!["a\u{1b}[0m".into()], ..spec("p") }).starts_with("excludes"));
        for bad in ["a,b", "", "a b", "x\u{202e}"] {
            assert!(invalid(CreatePlan { tags: vec![bad.into()], ..spec("p") }).starts_with("tags"), "{bad:?}");
        }
        // Another plan's tag would put this plan's snapshots under that plan's retention: the rm- prefix is ours.
        for reserved in ["rm-plan:other", "rm-plan:p", "rm-future"] {
            let e = invalid(CreatePlan { tags: vec!["ok".into(), reserved.into()], ..spec("p") });
            assert!(e.starts_with("tags:") && e.contains("reserved"), "{reserved:?}: {e}");
        }
        assert!(NewPlan::validated(CreatePlan { tags: vec!["RM-plan:x".into(), "rmx".into()], ..spec("p") }).is_ok());
        assert!(invalid(CreatePlan { schedule: "61 * * * *".into(), ..spec("p") }).starts_with("schedule"));
        assert!(invalid(CreatePlan { schedule: "@every 10s".into(), ..spec("p") }).starts_with("schedule"));
        assert!(invalid(CreatePlan { timeout: Some("soon".into()), ..spec("p") }).starts_with("timeout"));
        assert!(invalid(CreatePlan { jitter: Some("5x".into()), ..spec("p") }).starts_with("jitter"));
        let long_jitter = CreatePlan { schedule: "@every 1h".into(), jitter: Some("2h".into()), ..spec("p") };
        assert!(invalid(long_jitter).contains("shorter than the schedule's interval"));
        let bad_selector = CreatePlan { selector: BTreeMap::from([("Env".into(), "x".into())]), ..spec("p") };
        assert!(invalid(bad_selector).starts_with("selector"));
        let bad_value = CreatePlan { selector: BTreeMap::from([("env".into(), "a\tb".into())]), ..spec("p") };
        assert!(invalid(bad_value).starts_with("selector"));
    }

    #[test]
    fn plans_with_retention_warn_about_agents_sharing_a_hostname_and_reserved_tags() {
        let keep = Retention { last: Some(3), ..Default::default() };
        let info = |retention: Option<Retention>, tags: Vec<String>| PlanInfo {
            plan: NewPlan { retention, tags, ..NewPlan::validated(spec("p")).unwrap() },
            created_at: 0,
            updated_at: 0,
        };
        let hosts: BTreeMap<String, String> =
            [("a1", "web"), ("a2", "db"), ("a3", "web"), ("a4", "web")].map(|(a, h)| (a.into(), h.into())).into();
        let applies = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let warned = plan_warnings(&info(Some(keep.clone()), vec![]), &applies(&["a1", "a2", "a3"]), &hosts);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].starts_with("agents a1, a3 report the same hostname \"web\""), "{warned:?}");
        assert!(plan_warnings(&info(Some(keep.clone()), vec![]), &applies(&["a1", "a2"]), &hosts).is_empty());
        assert!(plan_warnings(&info(None, vec![]), &applies(&["a1", "a3", "a4"]), &hosts).is_empty(), "no retention");
        // A tag stored before tags were checked is named, with or without retention.
        let old = plan_warnings(&info(None, vec!["ok".into(), "rm-plan:q".into()]), &[], &hosts);
        assert_eq!(old.len(), 1, "{old:?}");
        assert!(old[0].starts_with("tags: \"rm-plan:q\""), "{old:?}");
    }

    #[test]
    fn a_changed_schedule_takes_its_default_jitter_unless_one_is_given() {
        let plan = NewPlan::validated(CreatePlan { jitter: Some("1m".into()), ..spec("p") }).unwrap();
        let same = plan.changed(&UpdatePlan { tags: Some(vec!["x".into()]), ..Default::default() }).unwrap();
        assert_eq!((same.jitter_secs, same.tags.clone()), (60, vec!["x".to_string()]));
        let hourly = plan.changed(&UpdatePlan { schedule: Some("@every 1h".into()), ..Default::default() }).unwrap();
        assert_eq!(hourly.jitter_secs, 180);
        let given = UpdatePlan { schedule: Some("@every 1h".into()), jitter: Some("30s".into()), ..Default::default() };
        assert_eq!(plan.changed(&given).unwrap().jitter_secs, 30);
        assert!(
            plan.changed(&UpdatePlan { paths: Some(vec![]), ..Default::default() }).unwrap_err().starts_with("paths")
        );
    }

    #[test]
    fn retention_is_validated_set_kept_and_cleared_by_updates() {
        let keep3 = Retention { last: Some(3), ..Default::default() };
        let plan = NewPlan::validated(CreatePlan { retention: Some(keep3.clone()), ..spec("p") }).unwrap();
        assert_eq!(plan.retention, Some(keep3.clone()));
        let nothing = CreatePlan { retention: Some(Retention::default()), ..spec("p") };
        assert!(invalid(nothing).starts_with("retention: the policy keeps nothing"));
        let bad = CreatePlan {
            retention: Some(Retention { within: Some("7 days".into()), ..Default::default() }),
            ..spec("p")
        };
        assert!(invalid(bad).starts_with("retention.within"));
        // Absent: unchanged; a policy: replaced; null: cleared.
        let same = plan.changed(&UpdatePlan { tags: Some(vec!["x".into()]), ..Default::default() }).unwrap();
        assert_eq!(same.retention, Some(keep3));
        let daily = Retention { daily: Some(7), ..Default::default() };
        let replaced =
            plan.changed(&UpdatePlan { retention: Some(Some(daily.clone())), ..Default::default() }).unwrap();
        assert_eq!(replaced.retention, Some(daily));
        let cleared = plan.changed(&UpdatePlan { retention: Some(None), ..Default::default() }).unwrap();
        assert_eq!(cleared.retention, None);
        let refused = plan.changed(&UpdatePlan { retention: Some(Some(Retention::default())), ..Default::default() });
        assert!(refused.unwrap_err().contains("keeps nothing"));
        assert!(!is_empty_update(&UpdatePlan { retention: Some(None), ..Default::default() }));
    }

    fn repo(name: &str) -> NewRepository {
        NewRepository {
            name: name.into(),
            url: "/srv/restic".into(),
            password: "pw".into(),
            env: BTreeMap::new(),
            ca_cert: None,
            auto_init: true,
            min_restic_version: None,
            prune: None,
            check: None,
        }
    }

    fn facts(host: &str) -> rm_protocol::HostFacts {
        rm_protocol::HostFacts {
            hostname: host.into(),
            os: "linux".into(),
            arch: "amd64".into(),
            version: "1".into(),
            commit: "c".into(),
        }
    }

    fn audit_kinds(c: &Connection) -> Vec<String> {
        let mut s = c.prepare("SELECT kind FROM audit_events ORDER BY id").unwrap();
        s.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn plans_apply_to_agents_and_every_change_bumps_the_revision() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let key = SecretKey::from_bytes(&[3; 32]);
        db.call_blocking(move |c| {
            let a = AuditEvent::default;
            assert_eq!(config_revision(c)?, 1);
            create_repository(c, &key, 1, &repo("repo"), a())?.unwrap();
            assert_eq!(config_revision(c)?, 2, "a repository change bumps");
            let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
            let (_, prod_token) = create_token(c, 1, &NewToken { labels: labels.clone(), ..Default::default() })?;
            let (_, bare_token) = create_token(c, 1, &NewToken::default())?;
            let prod = agents::enroll(c, 2, &prod_token, &facts("p1"))?.unwrap().agent_id;
            let bare = agents::enroll(c, 2, &bare_token, &facts("b1"))?.unwrap().agent_id;
            assert_eq!(agents::get_agent(c, &prod)?.unwrap().labels, labels, "token labels are copied");
            assert_eq!(config_revision(c)?, 2, "enrolling changes no agent's configuration");

            // Unknown repository or agent: refused, nothing written.
            let mut unknown = NewPlan::validated(spec("nightly")).unwrap();
            unknown.repository = "nope".into();
            assert_eq!(create_plan(c, 3, &unknown, a())?, Err(PlanRefused::UnknownRepository("nope".into())));
            let ghost = NewPlan::validated(CreatePlan { agents: vec!["ghost".into()], ..spec("nightly") }).unwrap();
            assert_eq!(create_plan(c, 3, &ghost, a())?, Err(PlanRefused::UnknownAgent("ghost".into())));
            assert!(list_plans(c)?.is_empty());
            assert_eq!(config_revision(c)?, 2);

            let keep = Retention { last: Some(3), within: Some("7d".into()), ..Default::default() };
            let by_label = CreatePlan { selector: labels.clone(), retention: Some(keep.clone()), ..spec("nightly") };
            let plan = create_plan(c, 3, &NewPlan::validated(by_label.clone()).unwrap(), a())?.unwrap();
            assert_eq!(config_revision(c)?, 3);
            assert_eq!(get_plan(c, "nightly")?.unwrap().plan.retention, Some(keep), "stored and read back");
            assert_eq!(
                create_plan(c, 4, &NewPlan::validated(by_label).unwrap(), a())?,
                Err(PlanRefused::NameTaken("nightly".into()))
            );
            assert_eq!(applies_to(&plan, &agent_labels(c)?), vec![prod.clone()]);
            assert_eq!(plans_for_agent(c, &prod)?.unwrap().len(), 1);
            assert!(plans_for_agent(c, &bare)?.unwrap().is_empty());
            assert!(plans_for_agent(c, "ghost")?.is_none());

            // Labels set later make the plan apply, and bump.
            agents::set_labels(c, &bare, &labels, a())?.unwrap();
            assert_eq!(config_revision(c)?, 4);
            assert!(agents::set_labels(c, "ghost", &labels, a())?.is_none());
            assert_eq!(applies_to(&plan, &agent_labels(c)?).len(), 2);

            // An explicit id applies without labels; an update bumps.
            agents::set_labels(c, &bare, &Labels::new(), a())?.unwrap();
            let changes = UpdatePlan { agents: Some(vec![bare.clone()]), ..Default::default() };
            let updated = update_plan(c, 5, "nightly", &changes, a())?.unwrap();
            assert_eq!(updated.plan.agents, vec![bare.clone()]);
            assert_eq!((updated.created_at, updated.updated_at), (3, 5));
            assert_eq!(config_revision(c)?, 6);
            assert_eq!(applies_to(&updated, &agent_labels(c)?).len(), 2);
            let bad = UpdatePlan { repository: Some("nope".into()), ..Default::default() };
            assert_eq!(update_plan(c, 6, "nightly", &bad, a())?, Err(PlanRefused::UnknownRepository("nope".into())));
            assert_eq!(update_plan(c, 6, "other", &changes, a())?, Err(PlanRefused::NotFound("other".into())));
            assert_eq!(config_revision(c)?, 6);
            let cleared = UpdatePlan { retention: Some(None), ..Default::default() };
            assert_eq!(update_plan(c, 5, "nightly", &cleared, a())?.unwrap().plan.retention, None);
            assert_eq!(config_revision(c)?, 7, "a retention change bumps");

            // The repository cannot go while the plan uses it.
            let in_use = delete_repository(c, "repo", a())?.unwrap_err();
            assert_eq!(in_use.plans, vec!["nightly".to_string()]);
            assert!(in_use.to_string().contains("nightly"));

            // Run now: queued for an agent it applies to, refused otherwise; delete cancels queued runs.
            let op = request_run(c, 7, "nightly", &prod, a())?.unwrap();
            assert!(op.starts_with("op_") && op.len() == 35 && op[3..].bytes().all(|b| b.is_ascii_hexdigit()));
            let op2 = request_run(c, 8, "nightly", &prod, a())?.unwrap();
            assert_eq!(
                queued_runs(c, &prod)?,
                vec![
                    QueuedRun { operation_id: op.clone(), plan: "nightly".into() },
                    QueuedRun { operation_id: op2, plan: "nightly".into() }
                ]
            );
            agents::set_labels(c, &prod, &Labels::new(), a())?.unwrap();
            assert_eq!(
                request_run(c, 9, "nightly", &prod, a())?,
                Err(PlanRefused::NotAssigned { plan: "nightly".into(), agent: prod.clone() })
            );
            assert_eq!(request_run(c, 9, "none", &prod, a())?, Err(PlanRefused::NotFound("none".into())));
            assert_eq!(request_run(c, 9, "nightly", "ghost", a())?, Err(PlanRefused::UnknownAgent("ghost".into())));
            let before = config_revision(c)?;
            assert!(delete_plan(c, 10, "nightly", a())?);
            assert!(!delete_plan(c, 10, "nightly", a())?);
            assert_eq!(config_revision(c)?, before + 1);
            assert!(queued_runs(c, &prod)?.is_empty(), "queued runs of a deleted plan are cancelled");
            assert_eq!(delete_repository(c, "repo", a())?, Ok(true));
            let kinds = audit_kinds(c);
            for kind in ["plan_created", "plan_updated", "plan_deleted", "plan_run_requested", "agent_labels"] {
                assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
            }
            Ok(())
        })
        .unwrap();
    }
}
