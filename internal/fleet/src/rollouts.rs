//! Staged agent rollouts (tables `agent_builds`, `published_builds`, `released_builds`, `rollouts`,
//! `rollout_hosts`). No HTTP: the server calls [`observe_published`] and [`advance`] from its rollout task, the
//! operator verbs from its routes and CLI, and [`desired_build`] from every heartbeat.
//!
//! A platform's hosts run its *released* build unless a rollout governs them. Publishing another build creates a
//! rollout (`pending`, or started with the server's default strategy). Starting it names its hosts (every live,
//! non-revoked agent of the target platforms), picks the canaries and cuts the rest into waves; [`advance`] then tells
//! each wave's hosts in turn, verifies them against their heartbeats, halts on a budget exceeded and, once the last
//! wave is done, releases the target. Every timestamp is stored, so a restarted server continues where it was; the
//! deadline and heartbeat-loss checks count from the server's start at the earliest, so the restart's own downtime
//! fails nobody.

use std::collections::{BTreeMap, HashMap};

use rm_protocol::rollout::{Budget, HostState, RolloutState, Strategy};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, record_audit};
use crate::labels::{self, Labels};
use crate::{DbError, Timestamp};

/// An archived agent build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    pub sha256: String,
    pub os: String,
    pub arch: String,
    pub size: u64,
    pub version: Option<String>,
    pub commit: Option<String>,
}

/// Records an archived build (a known SHA-256 is left alone).
pub fn record_build(c: &Connection, now: Timestamp, b: &BuildRecord) -> Result<(), DbError> {
    c.prepare_cached(
        "INSERT OR IGNORE INTO agent_builds (sha256, os, arch, size, version, commit_id, first_seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![b.sha256, b.os, b.arch, b.size as i64, b.version, b.commit, now])?;
    Ok(())
}

pub fn get_build(c: &Connection, sha256: &str) -> Result<Option<BuildRecord>, DbError> {
    Ok(c.prepare_cached("SELECT sha256, os, arch, size, version, commit_id FROM agent_builds WHERE sha256 = ?1")?
        .query_row([sha256], |r| {
            Ok(BuildRecord {
                sha256: r.get(0)?,
                os: r.get(1)?,
                arch: r.get(2)?,
                size: r.get::<_, i64>(3)?.max(0) as u64,
                version: r.get(4)?,
                commit: r.get(5)?,
            })
        })
        .optional()?)
}

/// The build a platform's hosts run outside any rollout.
pub fn released(c: &Connection, os: &str, arch: &str) -> Result<Option<String>, DbError> {
    Ok(c.prepare_cached("SELECT sha256 FROM released_builds WHERE os = ?1 AND arch = ?2")?
        .query_row([os, arch], |r| r.get(0))
        .optional()?)
}

fn set_released(c: &Connection, now: Timestamp, os: &str, arch: &str, sha256: &str) -> Result<(), DbError> {
    c.prepare_cached(
        "INSERT INTO released_builds (os, arch, sha256, released_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (os, arch) DO UPDATE SET sha256 = ?3, released_at = ?4",
    )?
    .execute(params![os, arch, sha256, now])?;
    Ok(())
}

/// One platform of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub os: String,
    pub arch: String,
    pub from_sha256: Option<String>,
    pub to_sha256: String,
    #[serde(default)]
    pub to_version: Option<String>,
}

/// One wave as fixed at start (index 0: the canaries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveInfo {
    pub name: String,
    /// The wave's budget as the strategy states it (`None` for the canaries: no failure tolerated).
    pub budget: Option<Budget>,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
}

/// A host named by a halt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltHost {
    pub agent_id: String,
    pub hostname: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltInfo {
    pub at: Timestamp,
    pub wave: u32,
    pub reason: String,
    pub hosts: Vec<HaltHost>,
}

/// A row of `rollouts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub id: u64,
    pub state: RolloutState,
    pub strategy: Strategy,
    pub targets: Vec<Target>,
    pub waves: Vec<WaveInfo>,
    pub current_wave: u32,
    pub wave_done_at: Option<Timestamp>,
    pub halt: Option<HaltInfo>,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub created_by: String,
}

impl Rollout {
    fn target_for(&self, os: &str, arch: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.os == os && t.arch == arch)
    }

    fn overlaps(&self, targets: &[Target]) -> bool {
        targets.iter().any(|t| self.target_for(&t.os, &t.arch).is_some())
    }
}

/// A row of `rollout_hosts`, with the agent's host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutHost {
    pub agent_id: String,
    pub hostname: String,
    pub wave: u32,
    pub state: HostState,
    pub from_sha256: Option<String>,
    pub target_sha256: String,
    pub rollback: bool,
    pub told_at: Option<Timestamp>,
    pub reported_at: Option<Timestamp>,
    pub verified_at: Option<Timestamp>,
    pub error: Option<String>,
}

/// Why an operator verb was refused (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutRefused {
    #[error("no rollout {0}")]
    NotFound(u64),
    #[error("rollout {id} is {state}; {verb} needs it {needs}")]
    State { id: u64, state: RolloutState, verb: &'static str, needs: &'static str },
    #[error("{0}")]
    OverBudget(String),
    #[error("{0}")]
    Invalid(String),
}

const ROLLOUT_COLUMNS: &str = "id, state, strategy, targets, waves, current_wave, wave_done_at, halt, created_at, \
                               started_at, finished_at, created_by";

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("rollout JSON serializes")
}

fn rollout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Rollout> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            Box::<dyn std::error::Error + Send + Sync>::from(e),
        )
    };
    let state: String = r.get(1)?;
    let strategy: String = r.get(2)?;
    let targets: String = r.get(3)?;
    let waves: String = r.get(4)?;
    let halt: Option<String> = r.get(7)?;
    Ok(Rollout {
        id: r.get::<_, i64>(0)? as u64,
        state: state.parse().map_err(|e| bad(1, e))?,
        strategy: serde_json::from_str(&strategy).map_err(|e| bad(2, e.to_string()))?,
        targets: serde_json::from_str(&targets).map_err(|e| bad(3, e.to_string()))?,
        waves: serde_json::from_str(&waves).map_err(|e| bad(4, e.to_string()))?,
        current_wave: r.get::<_, i64>(5)?.max(0) as u32,
        wave_done_at: r.get(6)?,
        halt: halt.map(|h| serde_json::from_str(&h)).transpose().map_err(|e| bad(7, e.to_string()))?,
        created_at: r.get(8)?,
        started_at: r.get(9)?,
        finished_at: r.get(10)?,
        created_by: r.get(11)?,
    })
}

/// Every rollout, newest first (at most `limit`).
pub fn list_rollouts(c: &Connection, limit: usize) -> Result<Vec<Rollout>, DbError> {
    let mut stmt = c.prepare(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id DESC LIMIT ?1"))?;
    let rows = stmt.query_map([limit as i64], rollout_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get_rollout(c: &Connection, id: u64) -> Result<Option<Rollout>, DbError> {
    Ok(c.query_row(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"), [id as i64], rollout_row)
        .optional()?)
}

fn rollouts_in(c: &Connection, states: &[RolloutState]) -> Result<Vec<Rollout>, DbError> {
    let list = states.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(",");
    let mut stmt = c.prepare(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state IN ({list}) ORDER BY id"))?;
    let rows = stmt.query_map([], rollout_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

const ACTIVE: [RolloutState; 4] =
    [RolloutState::Running, RolloutState::Paused, RolloutState::Halted, RolloutState::RollingBack];

/// The hosts of a rollout, by wave then host name.
pub fn rollout_hosts(c: &Connection, id: u64) -> Result<Vec<RolloutHost>, DbError> {
    let mut stmt = c.prepare(
        "SELECT h.agent_id, coalesce(a.hostname, ''), h.wave, h.state, h.from_sha256, h.target_sha256, h.rollback,
                h.told_at, h.reported_at, h.verified_at, h.error
         FROM rollout_hosts h LEFT JOIN agents a ON a.id = h.agent_id
         WHERE h.rollout_id = ?1 ORDER BY h.wave, a.hostname, h.agent_id",
    )?;
    let rows = stmt.query_map([id as i64], |r| {
        let state: String = r.get(3)?;
        Ok(RolloutHost {
            agent_id: r.get(0)?,
            hostname: r.get(1)?,
            wave: r.get::<_, i64>(2)?.max(0) as u32,
            state: state.parse().unwrap_or(HostState::Failed),
            from_sha256: r.get(4)?,
            target_sha256: r.get(5)?,
            rollback: r.get(6)?,
            told_at: r.get(7)?,
            reported_at: r.get(8)?,
            verified_at: r.get(9)?,
            error: r.get(10)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn save_host(c: &Connection, id: u64, h: &RolloutHost) -> Result<(), DbError> {
    c.prepare_cached(
        "INSERT INTO rollout_hosts (rollout_id, agent_id, wave, state, from_sha256, target_sha256, rollback, told_at,
                                    reported_at, verified_at, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (rollout_id, agent_id) DO UPDATE SET wave = ?3, state = ?4, from_sha256 = ?5, target_sha256 = ?6,
             rollback = ?7, told_at = ?8, reported_at = ?9, verified_at = ?10, error = ?11",
    )?
    .execute(params![
        id as i64,
        h.agent_id,
        h.wave as i64,
        h.state.as_str(),
        h.from_sha256,
        h.target_sha256,
        h.rollback,
        h.told_at,
        h.reported_at,
        h.verified_at,
        h.error,
    ])?;
    Ok(())
}

fn save_rollout(c: &Connection, r: &Rollout) -> Result<(), DbError> {
    c.prepare_cached(
        "UPDATE rollouts SET state = ?2, waves = ?3, current_wave = ?4, wave_done_at = ?5, halt = ?6, started_at = ?7,
                finished_at = ?8
         WHERE id = ?1",
    )?
    .execute(params![
        r.id as i64,
        r.state.as_str(),
        json(&r.waves),
        r.current_wave as i64,
        r.wave_done_at,
        r.halt.as_ref().map(json),
        r.started_at,
        r.finished_at,
    ])?;
    Ok(())
}

fn audit(c: &Connection, now: Timestamp, kind: &str, source: &str, detail: String) -> Result<(), DbError> {
    record_audit(
        c,
        &AuditEvent {
            at: now,
            kind: kind.into(),
            source: Some(source.into()),
            detail: Some(detail),
            ..Default::default()
        },
    )
}

/// Creates a rollout in state `pending`; pending rollouts of the same platforms are superseded. Each target's SHA-256
/// must be an archived build of that platform.
pub fn create_rollout(
    c: &Connection,
    now: Timestamp,
    targets: Vec<(String, String, String)>,
    strategy: &Strategy,
    created_by: &str,
) -> Result<Result<u64, RolloutRefused>, DbError> {
    if let Err(e) = strategy.validate() {
        return Ok(Err(RolloutRefused::Invalid(format!("strategy.{e}"))));
    }
    if targets.is_empty() {
        return Ok(Err(RolloutRefused::Invalid(
            "nothing to roll out: every platform's hosts are released on its served build".into(),
        )));
    }
    let mut resolved = Vec::new();
    for (os, arch, sha) in targets {
        let Some(build) = get_build(c, &sha)? else {
            return Ok(Err(RolloutRefused::Invalid(format!("targets: no archived agent build has sha256 {sha}"))));
        };
        if build.os != os || build.arch != arch {
            return Ok(Err(RolloutRefused::Invalid(format!(
                "targets: build {sha} is for {}/{}, not {os}/{arch}",
                build.os, build.arch
            ))));
        }
        if resolved.iter().any(|t: &Target| t.os == os && t.arch == arch) {
            return Ok(Err(RolloutRefused::Invalid(format!("targets: {os}/{arch} named twice"))));
        }
        let from = released(c, &os, &arch)?;
        resolved.push(Target { from_sha256: from, to_sha256: sha, to_version: build.version, os, arch });
    }
    supersede_pending(c, now, |old| old.overlaps(&resolved))?;
    c.prepare_cached(
        "INSERT INTO rollouts (state, strategy, targets, created_at, created_by) VALUES ('pending', ?1, ?2, ?3, ?4)",
    )?
    .execute(params![json(strategy), json(&resolved), now, created_by])?;
    let id = c.last_insert_rowid() as u64;
    let names: Vec<_> = resolved.iter().map(|t| format!("{}/{}→{}", t.os, t.arch, short(&t.to_sha256))).collect();
    audit(c, now, "rollout_created", created_by, format!("rollout {id}: {}", names.join(", ")))?;
    Ok(Ok(id))
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// Marks the pending rollouts `which` picks as superseded.
fn supersede_pending(c: &Connection, now: Timestamp, which: impl Fn(&Rollout) -> bool) -> Result<(), DbError> {
    for old in rollouts_in(c, &[RolloutState::Pending])?.iter().filter(|r| which(r)) {
        c.prepare_cached("UPDATE rollouts SET state = 'superseded', finished_at = ?2 WHERE id = ?1")?
            .execute(params![old.id as i64, now])?;
    }
    Ok(())
}

/// Settings [`start_rollout`] and [`advance`] need from the server.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// When this server process started: deadlines and heartbeat loss count from here at the earliest.
    pub booted_at: Timestamp,
    /// A host not seen for longer than this is not named by a starting rollout (it joins if it comes back).
    pub stale_after_secs: u64,
    /// `lost_after_secs` when the strategy has none (three heartbeat intervals).
    pub default_lost_after_secs: u64,
}

/// What an agent looks like to a rollout.
struct Member {
    id: String,
    os: String,
    arch: String,
    labels: Labels,
    binary_sha256: Option<String>,
    last_seen_at: Timestamp,
    update_sha256: Option<String>,
    update_error: Option<String>,
    revoked: bool,
}

fn members(c: &Connection) -> Result<Vec<Member>, DbError> {
    let mut stmt = c.prepare(
        "SELECT id, os, arch, labels, binary_sha256, last_seen_at, last_update_sha256, last_update_error,
                credential_revoked_at IS NOT NULL
         FROM agents ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Member {
            id: r.get(0)?,
            os: r.get(1)?,
            arch: r.get(2)?,
            labels: labels::from_json(&r.get::<_, String>(3)?),
            binary_sha256: r.get(4)?,
            last_seen_at: r.get(5)?,
            update_sha256: r.get(6)?,
            update_error: r.get(7)?,
            revoked: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn matches(selector: &BTreeMap<String, String>, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A random permutation (Fisher–Yates over the OS random source).
fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS random source");
        let j = (u64::from_le_bytes(b) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// The build `agent` should run now given its row in the newest rollout that named it (`None`: no row).
fn desired_from_row(
    state: RolloutState,
    host: HostState,
    from: Option<&str>,
    target: &str,
    rollback: bool,
) -> Option<String> {
    let on_target = || Some(target.to_string());
    let stays = || from.map(str::to_string);
    if rollback {
        return on_target(); // a row taken back targets its previous build
    }
    match state {
        RolloutState::Pending | RolloutState::Superseded => None,
        RolloutState::Running | RolloutState::Paused | RolloutState::Halted => match host {
            HostState::Updating | HostState::Settling | HostState::Verified => on_target(),
            HostState::Waiting | HostState::Failed | HostState::Skipped => stays(),
        },
        RolloutState::Completed => {
            if host == HostState::Verified {
                on_target()
            } else {
                stays()
            }
        }
        RolloutState::Aborted => match host {
            HostState::Settling | HostState::Verified => on_target(),
            _ => stays(),
        },
        RolloutState::RollingBack | RolloutState::RolledBack => stays(),
    }
}

/// The SHA-256 of the build agent `agent_id` (of `os`/`arch`) should run now: its row in the newest rollout that named
/// it, else the platform's released build; `None` when neither says (nothing released yet: the served build).
pub fn desired_build(c: &Connection, agent_id: &str, os: &str, arch: &str) -> Result<Option<String>, DbError> {
    let row = c
        .prepare_cached(
            "SELECT r.state, h.state, h.from_sha256, h.target_sha256, h.rollback
             FROM rollout_hosts h JOIN rollouts r ON r.id = h.rollout_id
             WHERE h.agent_id = ?1 AND r.state NOT IN ('pending', 'superseded')
             ORDER BY h.rollout_id DESC LIMIT 1",
        )?
        .query_row([agent_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })
        .optional()?;
    if let Some((state, host, from, target, rollback)) = row
        && let (Ok(state), Ok(host)) = (state.parse::<RolloutState>(), host.parse::<HostState>())
        && let Some(sha) = desired_from_row(state, host, from.as_deref(), &target, rollback)
    {
        return Ok(Some(sha));
    }
    released(c, os, arch)
}

/// A host named by a rollout, waiting for its wave: it comes from the build it should run now (its newest rollout's
/// or the released one, else the target's recorded starting build).
fn waiting_host(c: &Connection, m: &Member, target: &Target, wave: u32) -> Result<RolloutHost, DbError> {
    let from = desired_build(c, &m.id, &m.os, &m.arch)?.or_else(|| target.from_sha256.clone());
    Ok(RolloutHost {
        agent_id: m.id.clone(),
        hostname: String::new(),
        wave,
        state: HostState::Waiting,
        from_sha256: from,
        target_sha256: target.to_sha256.clone(),
        rollback: false,
        told_at: None,
        reported_at: None,
        verified_at: None,
        error: None,
    })
}

/// What [`observe_published`] found for one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub os: String,
    pub arch: String,
    pub sha256: String,
}

/// Records the builds served now (each already archived and recorded with [`record_build`]). A platform seen for
/// the first time is released on its build as is; a served build that differs from the released one, and was not
/// seen served before, becomes a rollout (one for all such platforms): started with `default` when the server has a
/// default strategy, else `pending`. A served build equal to the released one again supersedes pending rollouts of
/// that platform. Returns the rollout created, if any.
pub fn observe_published(
    c: &Connection,
    now: Timestamp,
    served: &[Published],
    default: Option<&Strategy>,
    tuning: Tuning,
) -> Result<Option<u64>, DbError> {
    let mut changed = Vec::new();
    for p in served {
        let seen: Option<String> = c
            .prepare_cached("SELECT sha256 FROM published_builds WHERE os = ?1 AND arch = ?2")?
            .query_row([&p.os, &p.arch], |r| r.get(0))
            .optional()?;
        if seen.as_deref() == Some(p.sha256.as_str()) {
            continue;
        }
        c.prepare_cached(
            "INSERT INTO published_builds (os, arch, sha256, seen_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (os, arch) DO UPDATE SET sha256 = ?3, seen_at = ?4",
        )?
        .execute(params![p.os, p.arch, p.sha256, now])?;
        match released(c, &p.os, &p.arch)? {
            None => {
                set_released(c, now, &p.os, &p.arch, &p.sha256)?;
                audit(c, now, "build_released", "publish", format!("{}/{} first seen: {}", p.os, p.arch, p.sha256))?;
            }
            Some(r) if r == p.sha256 => {
                supersede_pending(c, now, |old| old.target_for(&p.os, &p.arch).is_some())?;
            }
            Some(_) => changed.push((p.os.clone(), p.arch.clone(), p.sha256.clone())),
        }
    }
    if changed.is_empty() {
        return Ok(None);
    }
    let strategy = default.cloned().unwrap_or_default();
    let id = match create_rollout(c, now, changed, &strategy, "publish")? {
        Ok(id) => id,
        Err(e) => return Err(DbError::Failed(format!("creating the rollout of a published build: {e}"))),
    };
    if default.is_some() {
        // A refusal here cannot happen for a rollout just created; if it did, the rollout stays pending.
        let _ = start_rollout(c, now, id, "publish", tuning)?;
    }
    Ok(Some(id))
}

/// `pending` → `running`: names the hosts (live, not revoked, of the target platforms), picks the canaries, cuts the
/// rest into waves. Active rollouts of the same platforms are aborted (a newer target replaces theirs).
pub fn start_rollout(
    c: &Connection,
    now: Timestamp,
    id: u64,
    source: &str,
    tuning: Tuning,
) -> Result<Result<(), RolloutRefused>, DbError> {
    let Some(mut r) = get_rollout(c, id)? else { return Ok(Err(RolloutRefused::NotFound(id))) };
    if r.state != RolloutState::Pending {
        return Ok(Err(RolloutRefused::State { id, state: r.state, verb: "start", needs: "pending" }));
    }
    // Bring the rollouts this one may replace up to date first: a host that already reports their target counts as
    // updated when they are aborted (and so is taken forward from there, and back there by a rollback).
    advance(c, now, tuning)?;
    for old in rollouts_in(c, &ACTIVE)? {
        if old.overlaps(&r.targets) {
            let mut old = old;
            old.state = RolloutState::Aborted;
            old.finished_at = Some(now);
            save_rollout(c, &old)?;
            audit(c, now, "rollout_aborted", source, format!("rollout {}: replaced by rollout {id}", old.id))?;
        }
    }
    let mut hosts: Vec<Member> = members(c)?
        .into_iter()
        .filter(|m| {
            !m.revoked
                && r.target_for(&m.os, &m.arch).is_some()
                && now.saturating_sub(m.last_seen_at) <= tuning.stale_after_secs as i64
        })
        .collect();
    shuffle(&mut hosts);
    // Canaries: preferably hosts not already running the target.
    let s = r.strategy.clone();
    let mut candidates: Vec<usize> = (0..hosts.len())
        .filter(|&i| s.canaries.selector.as_ref().is_none_or(|sel| matches(sel, &hosts[i].labels)))
        .collect();
    candidates.sort_by_key(|&i| {
        let target = r.target_for(&hosts[i].os, &hosts[i].arch).map(|t| t.to_sha256.as_str());
        hosts[i].binary_sha256.as_deref() == target
    });
    let mut wave_of: Vec<Option<u32>> = vec![None; hosts.len()];
    for &i in candidates.iter().take(s.canaries.count as usize) {
        wave_of[i] = Some(0);
    }
    let rest = wave_of.iter().filter(|w| w.is_none()).count();
    for (n, wave) in s.waves.iter().enumerate() {
        let index = n as u32 + 1;
        let free: Vec<usize> = (0..hosts.len()).filter(|&i| wave_of[i].is_none()).collect();
        let take: Vec<usize> = match (&wave.selector, wave.percent) {
            (Some(sel), _) => free.into_iter().filter(|&i| matches(sel, &hosts[i].labels)).collect(),
            (None, Some(p)) => free.into_iter().take((rest * p as usize).div_ceil(100)).collect(),
            (None, None) => free,
        };
        for i in take {
            wave_of[i] = Some(index);
        }
    }
    // A final wave catches every host the listed ones did not name (with no waves listed, it is the only one).
    let leftover = wave_of.iter().any(Option::is_none);
    let listed = if s.waves.is_empty() || leftover { s.waves.len() + 1 } else { s.waves.len() } as u32;
    for w in wave_of.iter_mut().filter(|w| w.is_none()) {
        *w = Some(listed);
    }
    let mut waves = vec![WaveInfo { name: "canaries".into(), budget: None, started_at: None, finished_at: None }];
    for index in 1..=listed {
        let budget = s.waves.get(index as usize - 1).and_then(|w| w.budget).unwrap_or(s.failure_budget);
        waves.push(WaveInfo {
            name: format!("wave {index}"),
            budget: Some(budget),
            started_at: None,
            finished_at: None,
        });
    }
    for (m, wave) in hosts.iter().zip(wave_of) {
        let target = r.target_for(&m.os, &m.arch).expect("filtered on targets");
        save_host(c, id, &waiting_host(c, m, target, wave.expect("every host named"))?)?;
    }
    r.state = RolloutState::Running;
    r.started_at = Some(now);
    r.waves = waves;
    r.current_wave = 0;
    r.wave_done_at = None;
    save_rollout(c, &r)?;
    audit(c, now, "rollout_started", source, format!("rollout {id}: {} hosts", hosts.len()))?;
    Ok(Ok(()))
}

/// The operator verbs other than `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Pause,
    Resume { skip_failed: bool },
    Abort,
    Rollback,
}

/// Applies `verb` to rollout `id`.
pub fn act(
    c: &Connection,
    now: Timestamp,
    id: u64,
    verb: Verb,
    source: &str,
) -> Result<Result<(), RolloutRefused>, DbError> {
    let Some(mut r) = get_rollout(c, id)? else { return Ok(Err(RolloutRefused::NotFound(id))) };
    let refuse =
        |verb: &'static str, needs: &'static str| Ok(Err(RolloutRefused::State { id, state: r.state, verb, needs }));
    match verb {
        Verb::Pause => {
            if r.state != RolloutState::Running {
                return refuse("pause", "running");
            }
            r.state = RolloutState::Paused;
            save_rollout(c, &r)?;
            audit(c, now, "rollout_paused", source, format!("rollout {id}"))?;
        }
        Verb::Resume { skip_failed } => {
            if !matches!(r.state, RolloutState::Paused | RolloutState::Halted) {
                return refuse("resume", "paused or halted");
            }
            let mut hosts = rollout_hosts(c, id)?;
            if skip_failed {
                for h in hosts.iter_mut().filter(|h| h.state == HostState::Failed && !h.rollback) {
                    h.state = HostState::Skipped;
                    save_host(c, id, h)?;
                }
            }
            if let Some(over) = over_budget(&r, &hosts) {
                return Ok(Err(RolloutRefused::OverBudget(format!(
                    "{over}; resume with skip_failed to go on without the failed hosts, or roll back"
                ))));
            }
            r.state = RolloutState::Running;
            r.halt = None;
            save_rollout(c, &r)?;
            audit(c, now, "rollout_resumed", source, format!("rollout {id} (skip_failed={skip_failed})"))?;
        }
        Verb::Abort => {
            if !matches!(
                r.state,
                RolloutState::Pending | RolloutState::Running | RolloutState::Paused | RolloutState::Halted
            ) {
                return refuse("abort", "pending, running, paused or halted");
            }
            r.state = RolloutState::Aborted;
            r.finished_at = Some(now);
            save_rollout(c, &r)?;
            audit(c, now, "rollout_aborted", source, format!("rollout {id}"))?;
        }
        Verb::Rollback => {
            if !matches!(
                r.state,
                RolloutState::Running
                    | RolloutState::Paused
                    | RolloutState::Halted
                    | RolloutState::Completed
                    | RolloutState::Aborted
            ) {
                return refuse("rollback", "running, paused, halted, completed or aborted");
            }
            let newer: Option<i64> = c
                .prepare_cached(
                    "SELECT max(rollout_id) FROM rollout_hosts h JOIN rollouts r ON r.id = h.rollout_id
                     WHERE h.rollout_id > ?1 AND r.state NOT IN ('pending', 'superseded')",
                )?
                .query_row([id as i64], |row| row.get(0))
                .optional()?
                .flatten();
            if let Some(newer) = newer {
                return Ok(Err(RolloutRefused::Invalid(format!(
                    "rollout {newer} started after this one; roll that one back instead"
                ))));
            }
            let agents: HashMap<String, Member> = members(c)?.into_iter().map(|m| (m.id.clone(), m)).collect();
            let mut taken = 0;
            for mut h in rollout_hosts(c, id)? {
                let runs_target =
                    agents.get(&h.agent_id).and_then(|m| m.binary_sha256.as_deref()) == Some(h.target_sha256.as_str());
                let updated =
                    matches!(h.state, HostState::Updating | HostState::Settling | HostState::Verified) || runs_target;
                let Some(from) = h.from_sha256.clone() else { continue };
                if !updated || from == h.target_sha256 {
                    continue;
                }
                h.rollback = true;
                h.target_sha256 = from;
                h.state = HostState::Updating;
                h.told_at = Some(now);
                h.reported_at = None;
                h.verified_at = None;
                h.error = None;
                save_host(c, id, &h)?;
                taken += 1;
            }
            for t in &r.targets {
                if let Some(from) = &t.from_sha256 {
                    set_released(c, now, &t.os, &t.arch, from)?;
                }
            }
            r.state = RolloutState::RollingBack;
            r.halt = None;
            r.finished_at = None;
            save_rollout(c, &r)?;
            audit(c, now, "rollout_rollback", source, format!("rollout {id}: {taken} hosts taken back"))?;
        }
    }
    Ok(Ok(()))
}

/// Failures a wave tolerates (the canaries none).
pub fn wave_budget(r: &Rollout, wave: u32, hosts: usize) -> usize {
    match r.waves.get(wave as usize).and_then(|w| w.budget) {
        Some(b) => b.allowed(hosts),
        None => 0,
    }
}

/// The current wave's failures beyond its budget, in words.
fn over_budget(r: &Rollout, hosts: &[RolloutHost]) -> Option<String> {
    let wave: Vec<_> = hosts.iter().filter(|h| h.wave == r.current_wave && !h.rollback).collect();
    let failed = wave.iter().filter(|h| h.state == HostState::Failed).count();
    let allowed = wave_budget(r, r.current_wave, wave.len());
    let name = r.waves.get(r.current_wave as usize).map_or("the wave", |w| w.name.as_str());
    (failed > allowed)
        .then(|| format!("{failed} of {} hosts of {name} failed; its budget allows {allowed}", wave.len()))
}

/// What [`advance`] did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    WaveStarted { rollout: u64, wave: u32, hosts: usize },
    Halted { rollout: u64, reason: String },
    Completed { rollout: u64 },
    RolledBack { rollout: u64 },
}

/// Moves every active rollout on: hosts that enrolled since it started join their wave, told hosts are verified or
/// failed against their heartbeats, a wave over its budget halts the rollout, a finished wave starts the next after
/// `wait_secs`, and the last one completes it (its targets become the released builds).
pub fn advance(c: &Connection, now: Timestamp, tuning: Tuning) -> Result<Vec<Event>, DbError> {
    let active = rollouts_in(c, &ACTIVE)?;
    if active.is_empty() {
        return Ok(Vec::new());
    }
    let agents: HashMap<String, Member> = members(c)?.into_iter().map(|m| (m.id.clone(), m)).collect();
    let mut events = Vec::new();
    for mut r in active {
        let mut hosts = rollout_hosts(c, r.id)?;
        let mut dirty: Vec<usize> = Vec::new();
        if r.state != RolloutState::RollingBack {
            join_late(c, &r, &agents, &mut hosts, &mut dirty, now, tuning)?;
        }
        let lost_after = r.strategy.lost_after_secs.unwrap_or(tuning.default_lost_after_secs) as i64;
        for (i, h) in hosts.iter_mut().enumerate() {
            if check_host(h, agents.get(&h.agent_id), &r.strategy, lost_after, now, tuning.booted_at) {
                dirty.push(i);
            }
        }
        match r.state {
            RolloutState::Running => drive(c, &mut r, &mut hosts, &mut dirty, now, &mut events)?,
            RolloutState::RollingBack => {
                let open =
                    hosts.iter().any(|h| h.rollback && matches!(h.state, HostState::Updating | HostState::Settling));
                if !open {
                    r.state = RolloutState::RolledBack;
                    r.finished_at = Some(now);
                    save_rollout(c, &r)?;
                    audit(c, now, "rollout_rolled_back", "server", format!("rollout {}", r.id))?;
                    events.push(Event::RolledBack { rollout: r.id });
                }
            }
            _ => {}
        }
        dirty.sort_unstable();
        dirty.dedup();
        for i in dirty {
            save_host(c, r.id, &hosts[i])?;
        }
    }
    Ok(events)
}

/// Hosts of the target platforms that enrolled (or came back) after the start join: the first selector wave that
/// matches them, else the last wave.
fn join_late(
    c: &Connection,
    r: &Rollout,
    agents: &HashMap<String, Member>,
    hosts: &mut Vec<RolloutHost>,
    dirty: &mut Vec<usize>,
    now: Timestamp,
    tuning: Tuning,
) -> Result<(), DbError> {
    let named: std::collections::HashSet<&str> = hosts.iter().map(|h| h.agent_id.as_str()).collect();
    let mut joining = Vec::new();
    for m in agents.values() {
        let Some(target) = r.target_for(&m.os, &m.arch) else { continue };
        if m.revoked
            || named.contains(m.id.as_str())
            || now.saturating_sub(m.last_seen_at) > tuning.stale_after_secs as i64
        {
            continue;
        }
        let last = r.waves.len().saturating_sub(1).max(1) as u32;
        let wave = r
            .strategy
            .waves
            .iter()
            .position(|w| w.selector.as_ref().is_some_and(|s| matches(s, &m.labels)))
            .map_or(last, |p| p as u32 + 1);
        joining.push(waiting_host(c, m, target, wave)?);
    }
    for h in joining {
        dirty.push(hosts.len());
        hosts.push(h);
    }
    Ok(())
}

/// Verifies or fails one told host against its agent's heartbeats; true if the row changed.
fn check_host(
    h: &mut RolloutHost,
    agent: Option<&Member>,
    strategy: &Strategy,
    lost_after: i64,
    now: Timestamp,
    booted_at: Timestamp,
) -> bool {
    if !matches!(h.state, HostState::Updating | HostState::Settling) {
        return false;
    }
    let fail = |h: &mut RolloutHost, error: String| {
        h.state = HostState::Failed;
        h.error = Some(error);
        true
    };
    let Some(a) = agent else { return fail(h, "the agent was removed".into()) };
    if a.revoked {
        return fail(h, "the agent's credential was revoked".into());
    }
    let reported_failure = a.update_sha256.as_deref() == Some(h.target_sha256.as_str()) && a.update_error.is_some();
    let told_at = h.told_at.unwrap_or(now);
    let runs_target = a.binary_sha256.as_deref() == Some(h.target_sha256.as_str()) && a.last_seen_at >= told_at;
    match h.state {
        HostState::Updating => {
            if reported_failure {
                return fail(h, a.update_error.clone().unwrap_or_default());
            }
            if runs_target {
                h.state = HostState::Settling;
                h.reported_at = Some(a.last_seen_at.max(told_at));
                return true;
            }
            if now - told_at.max(booted_at) > strategy.deadline_secs as i64 {
                return fail(
                    h,
                    format!(
                        "did not report build {} within {} s of being told",
                        short(&h.target_sha256),
                        strategy.deadline_secs
                    ),
                );
            }
            false
        }
        HostState::Settling => {
            if a.binary_sha256.as_deref() != Some(h.target_sha256.as_str()) {
                let error = if reported_failure {
                    a.update_error.clone().unwrap_or_default()
                } else {
                    format!(
                        "went back to build {} after reporting the target",
                        short(a.binary_sha256.as_deref().unwrap_or("none"))
                    )
                };
                return fail(h, error);
            }
            if now - a.last_seen_at.max(booted_at) > lost_after {
                return fail(
                    h,
                    format!("stopped heartbeating after updating (no heartbeat for {} s)", now - a.last_seen_at),
                );
            }
            let reported = h.reported_at.unwrap_or(now);
            if now - reported >= strategy.settle_secs as i64 {
                h.state = HostState::Verified;
                h.verified_at = Some(now);
                return true;
            }
            false
        }
        _ => false,
    }
}

/// A running rollout: halt on a budget exceeded, tell waiting hosts, finish waves and the rollout.
fn drive(
    c: &Connection,
    r: &mut Rollout,
    hosts: &mut [RolloutHost],
    dirty: &mut Vec<usize>,
    now: Timestamp,
    events: &mut Vec<Event>,
) -> Result<(), DbError> {
    let last = r.waves.len().saturating_sub(1) as u32;
    loop {
        let w = r.current_wave;
        if let Some(info) = r.waves.get_mut(w as usize)
            && info.started_at.is_none()
        {
            info.started_at = Some(now);
            let size = hosts.iter().filter(|h| h.wave == w).count();
            events.push(Event::WaveStarted { rollout: r.id, wave: w, hosts: size });
        }
        if let Some(reason) = over_budget(r, hosts) {
            let failed = hosts
                .iter()
                .filter(|h| h.wave == w && h.state == HostState::Failed && !h.rollback)
                .take(100)
                .map(|h| HaltHost {
                    agent_id: h.agent_id.clone(),
                    hostname: h.hostname.clone(),
                    error: h.error.clone().unwrap_or_default(),
                })
                .collect();
            r.state = RolloutState::Halted;
            r.halt = Some(HaltInfo { at: now, wave: w, reason: reason.clone(), hosts: failed });
            save_rollout(c, r)?;
            audit(c, now, "rollout_halted", "server", format!("rollout {}: {reason}", r.id))?;
            events.push(Event::Halted { rollout: r.id, reason });
            return Ok(());
        }
        // Tell waiting hosts of this wave (and late joiners of earlier ones), within max_in_flight.
        let in_flight = hosts.iter().filter(|h| matches!(h.state, HostState::Updating | HostState::Settling)).count();
        let mut room = r.strategy.max_in_flight.map_or(usize::MAX, |m| (m as usize).saturating_sub(in_flight));
        for (i, h) in hosts.iter_mut().enumerate() {
            if room == 0 {
                break;
            }
            if h.state == HostState::Waiting && h.wave <= w {
                h.state = HostState::Updating;
                h.told_at = Some(now);
                dirty.push(i);
                room -= 1;
            }
        }
        let done = hosts
            .iter()
            .filter(|h| h.wave <= w)
            .all(|h| matches!(h.state, HostState::Verified | HostState::Failed | HostState::Skipped));
        if !done {
            save_rollout(c, r)?;
            return Ok(());
        }
        let done_at = *r.wave_done_at.get_or_insert(now);
        if let Some(info) = r.waves.get_mut(w as usize) {
            info.finished_at.get_or_insert(now);
        }
        if now - done_at < r.strategy.wait_secs as i64 && hosts.iter().any(|h| h.wave > w) {
            save_rollout(c, r)?;
            return Ok(());
        }
        // The next wave with hosts, or the end.
        let next = (w + 1..=last).find(|n| hosts.iter().any(|h| h.wave == *n));
        match next {
            Some(n) => {
                for skipped in w + 1..n {
                    if let Some(info) = r.waves.get_mut(skipped as usize) {
                        info.started_at.get_or_insert(now);
                        info.finished_at.get_or_insert(now);
                    }
                }
                r.current_wave = n;
                r.wave_done_at = None;
            }
            None => {
                r.state = RolloutState::Completed;
                r.finished_at = Some(now);
                for t in r.targets.clone() {
                    set_released(c, now, &t.os, &t.arch, &t.to_sha256)?;
                }
                save_rollout(c, r)?;
                audit(c, now, "rollout_completed", "server", format!("rollout {}", r.id))?;
                events.push(Event::Completed { rollout: r.id });
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Db, Heartbeat, NewToken, create_token, enroll, record_heartbeat};
    use rm_protocol::HostFacts;
    use rm_protocol::rollout::Wave;

    const OLD: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    const TUNING: Tuning = Tuning { booted_at: 0, stale_after_secs: 300, default_lost_after_secs: 3 };

    fn beat(c: &Connection, now: Timestamp, id: &str, sha: &str, error: Option<&str>) {
        let facts = HostFacts {
            hostname: format!("h-{id}"),
            os: "linux".into(),
            arch: "amd64".into(),
            version: "1".into(),
            commit: "c".into(),
        };
        let hb = Heartbeat {
            facts,
            binary_sha256: Some(sha.into()),
            last_update_error: error.map(str::to_string),
            last_update_sha256: error.map(|_| NEW.to_string()),
            trial: false,
            seq: 1,
            restic: None,
            config_revision: None,
        };
        record_heartbeat(c, now, id, &hb).unwrap();
    }

    fn states(c: &Connection, id: u64) -> Vec<(u32, HostState)> {
        rollout_hosts(c, id).unwrap().into_iter().map(|h| (h.wave, h.state)).collect()
    }

    #[test]
    fn waves_verify_halt_resume_complete_and_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("f.db")).unwrap();
        db.call_blocking(|c| {
            let (_, token) = create_token(c, 0, &NewToken { max_uses: Some(10), ..Default::default() })?;
            let facts = HostFacts {
                hostname: "h".into(),
                os: "linux".into(),
                arch: "amd64".into(),
                version: "1".into(),
                commit: "c".into(),
            };
            let ids: Vec<String> = (0..10).map(|_| enroll(c, 1, &token, &facts).unwrap().unwrap().agent_id).collect();
            for id in &ids {
                beat(c, 10, id, OLD, None);
            }
            for sha in [OLD, NEW] {
                let b = BuildRecord {
                    sha256: sha.into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                    size: 1,
                    version: None,
                    commit: None,
                };
                record_build(c, 10, &b)?;
            }
            let published =
                |sha: &str| vec![Published { os: "linux".into(), arch: "amd64".into(), sha256: sha.into() }];
            assert_eq!(observe_published(c, 10, &published(OLD), None, TUNING)?, None, "first sight releases");
            assert_eq!(desired_build(c, &ids[0], "linux", "amd64")?.as_deref(), Some(OLD));
            let pending = observe_published(c, 11, &published(NEW), None, TUNING)?.expect("a rollout");
            assert_eq!(get_rollout(c, pending)?.unwrap().state, RolloutState::Pending);
            assert_eq!(desired_build(c, &ids[0], "linux", "amd64")?.as_deref(), Some(OLD), "pending tells nobody");

            let strategy = Strategy {
                canaries: rm_protocol::rollout::Canaries { count: 1, selector: None },
                waves: vec![
                    Wave { percent: Some(30), ..Wave::default() },
                    Wave { percent: Some(70), ..Wave::default() },
                ],
                settle_secs: 2,
                deadline_secs: 30,
                ..Strategy::default()
            };
            let targets = vec![("linux".to_string(), "amd64".to_string(), NEW.to_string())];
            let id = create_rollout(c, 12, targets, &strategy, "api")?.unwrap();
            assert_eq!(get_rollout(c, pending)?.unwrap().state, RolloutState::Superseded);
            start_rollout(c, 12, id, "api", TUNING)?.unwrap();
            let sizes = |c: &Connection| {
                let mut n = [0; 3];
                for (w, _) in states(c, id) {
                    n[w as usize] += 1;
                }
                n
            };
            assert_eq!(sizes(c), [1, 3, 6]);
            advance(c, 12, TUNING)?;
            let told: Vec<_> = rollout_hosts(c, id)?.into_iter().filter(|h| h.state == HostState::Updating).collect();
            assert_eq!(told.len(), 1, "only the canary is told");
            assert_eq!(told[0].wave, 0);
            assert_eq!(desired_build(c, &told[0].agent_id, "linux", "amd64")?.as_deref(), Some(NEW));
            beat(c, 13, &told[0].agent_id, NEW, None);
            advance(c, 13, TUNING)?;
            assert!(states(c, id).contains(&(0, HostState::Settling)));
            beat(c, 15, &told[0].agent_id, NEW, None);
            advance(c, 15, TUNING)?;
            // The canary is verified, wave 1 is told at once (no wait).
            let wave1: Vec<_> = rollout_hosts(c, id)?.into_iter().filter(|h| h.wave == 1).collect();
            assert!(wave1.iter().all(|h| h.state == HostState::Updating), "{wave1:?}");
            assert!(rollout_hosts(c, id)?.iter().filter(|h| h.wave == 2).all(|h| h.state == HostState::Waiting));
            // One host of wave 1 reports a failed update: budget 0, halted.
            beat(c, 16, &wave1[0].agent_id, OLD, Some("update reverted: exited at start"));
            advance(c, 16, TUNING)?;
            let r = get_rollout(c, id)?.unwrap();
            assert_eq!(r.state, RolloutState::Halted);
            let halt = r.halt.unwrap();
            assert_eq!(halt.wave, 1);
            assert_eq!(halt.hosts.len(), 1);
            assert!(halt.hosts[0].error.contains("exited at start"), "{halt:?}");
            assert!(matches!(
                act(c, 17, id, Verb::Resume { skip_failed: false }, "api")?,
                Err(RolloutRefused::OverBudget(_))
            ));
            act(c, 17, id, Verb::Resume { skip_failed: true }, "api")?.unwrap();
            assert_eq!(desired_build(c, &wave1[0].agent_id, "linux", "amd64")?.as_deref(), Some(OLD), "skipped stays");
            // Everyone else updates and settles: the rollout completes and NEW is released.
            for t in [18, 21, 24, 27] {
                for h in rollout_hosts(c, id)? {
                    if h.state == HostState::Updating || h.state == HostState::Settling {
                        beat(c, t, &h.agent_id, NEW, None);
                    }
                }
                advance(c, t, TUNING)?;
            }
            assert_eq!(get_rollout(c, id)?.unwrap().state, RolloutState::Completed);
            assert_eq!(released(c, "linux", "amd64")?.as_deref(), Some(NEW));
            // Roll back: every updated host is told OLD again, and OLD is released.
            act(c, 28, id, Verb::Rollback, "api")?.unwrap();
            assert_eq!(released(c, "linux", "amd64")?.as_deref(), Some(OLD));
            let back: Vec<_> = rollout_hosts(c, id)?.into_iter().filter(|h| h.rollback).collect();
            assert_eq!(back.len(), 9);
            for h in &back {
                assert_eq!(desired_build(c, &h.agent_id, "linux", "amd64")?.as_deref(), Some(OLD));
                beat(c, 29, &h.agent_id, OLD, None);
            }
            advance(c, 29, TUNING)?;
            for h in &back {
                beat(c, 32, &h.agent_id, OLD, None);
            }
            advance(c, 32, TUNING)?;
            assert_eq!(get_rollout(c, id)?.unwrap().state, RolloutState::RolledBack);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_silent_host_after_updating_fails_and_the_deadline_counts_from_boot() {
        let mut h = RolloutHost {
            agent_id: "a".into(),
            hostname: String::new(),
            wave: 1,
            state: HostState::Settling,
            from_sha256: Some(OLD.into()),
            target_sha256: NEW.into(),
            rollback: false,
            told_at: Some(100),
            reported_at: Some(101),
            verified_at: None,
            error: None,
        };
        let m = Member {
            id: "a".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            labels: Labels::new(),
            binary_sha256: Some(NEW.into()),
            last_seen_at: 101,
            update_sha256: None,
            update_error: None,
            revoked: false,
        };
        let s = Strategy { settle_secs: 60, deadline_secs: 10, ..Strategy::default() };
        assert!(!check_host(&mut h, Some(&m), &s, 3, 103, 0));
        assert!(check_host(&mut h, Some(&m), &s, 3, 105, 0));
        assert_eq!(h.state, HostState::Failed);
        assert!(h.error.as_deref().unwrap().contains("stopped heartbeating"));
        // Told long ago, but the server restarted at 200: not failed for the downtime.
        let mut told = RolloutHost { state: HostState::Updating, reported_at: None, error: None, ..h };
        let stale = Member { binary_sha256: Some(OLD.into()), ..m };
        assert!(!check_host(&mut told, Some(&stale), &s, 3, 205, 200));
        assert!(check_host(&mut told, Some(&stale), &s, 3, 211, 200));
        assert!(told.error.as_deref().unwrap().contains("did not report"));
    }
}
