//! Notifications (issue 19): the `notify_channels`, `notify_rules`, `notify_states`, `notifications` and
//! `notification_attempts` tables.
//!
//! * Channels keep their secrets (a webhook's URL and token, the SMTP password) sealed under the data dir's key
//!   (context `notify-channel:<name>`); nothing here hands them out except [`take_due`] and [`channel_for_send`].
//! * [`detect`] compares the fleet's states (plan health per host, agent staleness, repository checks, rollouts)
//!   with the last state stored per subject and queues one message per *transition* and matching rule, in the same
//!   operation that stores the new state: a state that holds is never queued again, and a restart neither loses
//!   nor repeats one. A subject seen for the first time counts as coming from its good state (`never` for a plan,
//!   live for an agent, `never` for a check, not halted for a rollout).
//! * [`take_due`] / [`record_attempt`]: the delivery worker's side of the queue. An attempt and its outcome
//!   (delivered, retried with exponential backoff, or given up) are written together.

use std::collections::{BTreeMap, HashMap, HashSet};

use rm_protocol::backup::Health;
use rm_protocol::notify::{
    AttemptView, ChannelSecrets, ChannelSpec, DeliveryStatus, EventKind, EventPayload, HostRef, NotificationView,
    RuleSpec,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::audit::{AuditEvent, record_audit};
use crate::repositories::NameTaken;
use crate::sealing::{OpenError, SecretKey};
use crate::time::{Timestamp, rfc3339};

/// Longest answer kept per attempt.
const MAX_ANSWER: usize = 1000;
/// Messages handed to the worker at once.
const BATCH: usize = 16;

fn context(name: &str) -> String {
    format!("notify-channel:{name}")
}

/// A channel row without its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRow {
    /// The shown part (secrets `None`).
    pub spec: ChannelSpec,
    pub secrets_set: Vec<String>,
    pub created_at: Timestamp,
}

/// Inserts a validated channel, its secrets sealed, and records `audit` (names, never values).
pub fn create_channel(
    conn: &Connection,
    key: &SecretKey,
    now: Timestamp,
    spec: &ChannelSpec,
    audit: AuditEvent,
) -> Result<Result<ChannelRow, NameTaken>, DbError> {
    let (shown, secrets) = spec.clone().split_secrets();
    let sealed = key.seal(&context(&spec.name), &serde_json::to_vec(&secrets).expect("secrets serialise"));
    let config = serde_json::to_string(&shown).expect("a channel serialises");
    let inserted = conn
        .prepare_cached(
            "INSERT INTO notify_channels (name, kind, config, secrets, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO NOTHING",
        )?
        .execute(params![spec.name, spec.kind().as_str(), config, sealed, now])?;
    if inserted == 0 {
        return Ok(Err(NameTaken));
    }
    let detail = format!("created {} kind={} secrets=[{}]", spec.name, spec.kind(), secrets.names().join(","));
    record_audit(conn, &AuditEvent { kind: "notify_channel".into(), detail: Some(detail), ..audit })?;
    Ok(Ok(ChannelRow { spec: shown, secrets_set: secrets.names(), created_at: now }))
}

pub fn list_channels(conn: &Connection, key: &SecretKey) -> Result<Vec<ChannelRow>, DbError> {
    let mut stmt =
        conn.prepare_cached("SELECT name, config, secrets, created_at FROM notify_channels ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, Timestamp>(3)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, config, sealed, created_at) = row?;
        let Ok(spec) = serde_json::from_str::<ChannelSpec>(&config) else { continue };
        let secrets_set = open(key, &name, &sealed).map(|s| s.names()).unwrap_or_default();
        out.push(ChannelRow { spec, secrets_set, created_at });
    }
    Ok(out)
}

fn open(key: &SecretKey, name: &str, sealed: &[u8]) -> Result<ChannelSecrets, OpenError> {
    let plain = key.open(&context(name), sealed)?;
    serde_json::from_slice(&plain).map_err(|_| OpenError(context(name)))
}

/// The whole channel, secrets included, for sending: `Ok(None)` for an unknown name.
pub fn channel_for_send(
    conn: &Connection,
    key: &SecretKey,
    name: &str,
) -> Result<Option<Result<ChannelSpec, OpenError>>, DbError> {
    let row: Option<(String, Vec<u8>)> = conn
        .prepare_cached("SELECT config, secrets FROM notify_channels WHERE name = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((config, sealed)) = row else { return Ok(None) };
    let spec: ChannelSpec =
        serde_json::from_str(&config).map_err(|e| DbError::Failed(format!("channel {name}: {e}")))?;
    Ok(Some(open(key, name, &sealed).map(|s| spec.with_secrets(s))))
}

/// Deletes a channel (its rules and queued messages go with it); `Ok(false)` when there was none.
pub fn delete_channel(conn: &Connection, name: &str, audit: AuditEvent) -> Result<bool, DbError> {
    delete_named(conn, "DELETE FROM notify_channels WHERE name = ?1", "notify_channel", name, audit)
}

/// Runs `delete` (one `?1`, the name) and, if it removed a row, records the audit event `kind`.
fn delete_named(conn: &Connection, delete: &str, kind: &str, name: &str, audit: AuditEvent) -> Result<bool, DbError> {
    let deleted = conn.prepare_cached(delete)?.execute([name])? > 0;
    if deleted {
        let detail = format!("deleted {name}");
        record_audit(conn, &AuditEvent { kind: kind.into(), detail: Some(detail), ..audit })?;
    }
    Ok(deleted)
}

/// Sealed channel secrets, and how many `key` opens (for [`crate::sealing::unlock`]).
pub(crate) fn check_key(conn: &Connection, key: &SecretKey) -> Result<(u64, u64), DbError> {
    let mut stmt = conn.prepare_cached("SELECT name, secrets FROM notify_channels")?;
    let mut rows = stmt.query([])?;
    let (mut count, mut opened) = (0, 0);
    while let Some(r) = rows.next()? {
        let (name, sealed): (String, Vec<u8>) = (r.get(0)?, r.get(1)?);
        count += 1;
        if open(key, &name, &sealed).is_ok() {
            opened += 1;
        }
    }
    Ok((count, opened))
}

/// Why a rule was not created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleRefused {
    #[error("a rule named {0:?} exists")]
    NameTaken(String),
    #[error("no channel named {0:?}; create it first (POST /api/v1/channels)")]
    UnknownChannel(String),
}

pub fn create_rule(
    conn: &Connection,
    now: Timestamp,
    rule: &RuleSpec,
    audit: AuditEvent,
) -> Result<Result<(), RuleRefused>, DbError> {
    let channel: Option<String> = conn
        .prepare_cached("SELECT name FROM notify_channels WHERE name = ?1")?
        .query_row([&rule.channel], |r| r.get(0))
        .optional()?;
    if channel.is_none() {
        return Ok(Err(RuleRefused::UnknownChannel(rule.channel.clone())));
    }
    let events = serde_json::to_string(&rule.events).expect("events serialise");
    let labels = serde_json::to_string(&rule.labels).expect("labels serialise");
    let inserted = conn
        .prepare_cached(
            "INSERT INTO notify_rules (name, channel, events, labels, warning_digest, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
        )?
        .execute(params![rule.name, rule.channel, events, labels, rule.warning_digest, now])?;
    if inserted == 0 {
        return Ok(Err(RuleRefused::NameTaken(rule.name.clone())));
    }
    let detail = format!(
        "created {} channel={} events=[{}] labels={labels} warning_digest={}",
        rule.name,
        rule.channel,
        rule.events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(","),
        rule.warning_digest
    );
    record_audit(conn, &AuditEvent { kind: "notify_rule".into(), detail: Some(detail), ..audit })?;
    Ok(Ok(()))
}

pub fn list_rules(conn: &Connection) -> Result<Vec<(RuleSpec, Timestamp)>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, channel, events, labels, warning_digest, created_at FROM notify_rules ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        let events: String = r.get(2)?;
        let labels: String = r.get(3)?;
        Ok((
            RuleSpec {
                name: r.get(0)?,
                channel: r.get(1)?,
                events: serde_json::from_str(&events).unwrap_or_default(),
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                warning_digest: r.get(4)?,
            },
            r.get(5)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes a rule; `Ok(false)` when there was none.
pub fn delete_rule(conn: &Connection, name: &str, audit: AuditEvent) -> Result<bool, DbError> {
    delete_named(conn, "DELETE FROM notify_rules WHERE name = ?1", "notify_rule", name, audit)
}

/// What [`detect`] needs from the server.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// An agent without a heartbeat for this long is stale.
    pub stale_after_secs: u64,
    /// The server's start: an agent's silence counts from here at the earliest (a restart is not a stale fleet).
    pub booted_at: Timestamp,
    /// The web page's base URL (`https://rm.example.com`), for links to a host's page.
    pub link_base: Option<String>,
    /// How long a message is retried, from when it was queued.
    pub give_up_ms: i64,
    /// A rule's held warnings go out as one digest this long after the oldest.
    pub digest_every_secs: i64,
}

/// One transition found by [`detect`].
struct Found {
    subject: String,
    state: String,
    since: Timestamp,
    event: Option<EventPayload>,
}

fn payload(event: EventKind, state: &str, previous: Option<&str>, since: Timestamp) -> EventPayload {
    EventPayload {
        id: 0,
        event,
        state: state.to_owned(),
        previous_state: previous.map(str::to_owned),
        host: None,
        plan: None,
        repository: None,
        rollout: None,
        since,
        since_rfc3339: rfc3339(since),
        message: None,
        link: None,
        title: String::new(),
        text: String::new(),
        items: Vec::new(),
    }
}

/// The event a plan's health moving from `prev` to `cur` raises, if any.
fn plan_event(prev: &str, cur: Health) -> Option<EventKind> {
    if cur.as_str() == prev {
        return None;
    }
    match cur {
        Health::Failed => Some(EventKind::BackupFailed),
        Health::Warning => Some(EventKind::BackupWarning),
        Health::Overdue => Some(EventKind::BackupOverdue),
        Health::Ok if matches!(prev, "failed" | "warning" | "overdue") => Some(EventKind::BackupRecovered),
        _ => None,
    }
}

/// Compares every subject's state with the stored one and queues a message per transition and matching rule (plus
/// due warning digests), storing the new states in the same operation. Returns how many messages were queued.
pub fn detect(conn: &Connection, now: Timestamp, tuning: &Tuning) -> Result<usize, DbError> {
    let stored: HashMap<String, (String, Timestamp)> = {
        let mut stmt = conn.prepare_cached("SELECT subject, state, since FROM notify_states")?;
        stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?.collect::<Result<_, _>>()?
    };
    let mut found: Vec<Found> = Vec::new();

    // Hosts: staleness and each plan's health.
    let health = crate::operations::backup_health(conn, now)?;
    let repos: HashMap<String, String> = {
        let mut stmt = conn.prepare_cached("SELECT name, repository FROM plans")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
    };
    let mut stmt = conn.prepare_cached(
        "SELECT id, hostname, labels, last_seen_at FROM agents WHERE credential_revoked_at IS NULL ORDER BY id",
    )?;
    let agents: Vec<(String, String, String, Timestamp)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect::<Result<_, _>>()?;
    for (id, hostname, labels, last_seen_at) in agents {
        let labels: BTreeMap<String, String> = serde_json::from_str(&labels).unwrap_or_default();
        let host = HostRef { id: id.clone(), hostname, labels };
        let link = tuning.link_base.as_ref().map(|base| format!("{}/ui/hosts/{id}", base.trim_end_matches('/')));
        let with_host = |mut p: EventPayload| {
            p.host = Some(host.clone());
            p.link = link.clone();
            p
        };

        let subject = format!("agent:{id}");
        let silent_since = last_seen_at.max(tuning.booted_at);
        let stale = now.saturating_sub(silent_since) > tuning.stale_after_secs as i64;
        let state = if stale { "stale" } else { "live" };
        let prev = stored.get(&subject).map_or("live", |(s, _)| s.as_str());
        let event = match (prev, state) {
            ("live", "stale") => Some(EventKind::AgentStale),
            ("stale", "live") => Some(EventKind::AgentBack),
            _ => None,
        };
        let event = event.map(|kind| {
            let mut p = with_host(payload(kind, state, Some(prev), last_seen_at));
            if stale {
                p.message = Some(format!("no heartbeat since {}", rfc3339(last_seen_at)));
            }
            p
        });
        found.push(Found { subject, state: state.into(), since: last_seen_at, event });

        for plan in health.get(&id).map(Vec::as_slice).unwrap_or_default() {
            let subject = format!("plan:{id}\t{}", plan.plan);
            let prev = stored.get(&subject).map_or("never", |(s, _)| s.as_str());
            let finished = plan.last_run.as_ref().and_then(|r| r.finished_at);
            let since = match plan.health {
                Health::Overdue | Health::Never => {
                    stored.get(&subject).filter(|(s, _)| s == plan.health.as_str()).map_or(now, |(_, t)| *t)
                }
                _ => finished.unwrap_or(now),
            };
            let event = plan_event(prev, plan.health).map(|kind| {
                let mut p = with_host(payload(kind, plan.health.as_str(), Some(prev), since));
                p.plan = Some(plan.plan.clone());
                p.repository = repos.get(&plan.plan).cloned();
                p.message = match plan.health {
                    Health::Overdue => Some(match plan.last_success_at {
                        Some(t) => format!("no successful backup since {}", rfc3339(t)),
                        None => "no successful backup yet".into(),
                    }),
                    _ => plan.last_run.as_ref().and_then(|r| r.message.clone()),
                };
                p
            });
            found.push(Found { subject, state: plan.health.as_str().into(), since, event });
        }
    }

    // Repository checks.
    let mut repositories: Vec<_> = crate::maintenance::repository_health(conn)?.into_values().collect();
    repositories.sort_by(|a, b| a.repository.cmp(&b.repository));
    for repo in repositories {
        let subject = format!("check:{}", repo.repository);
        let state = repo.health.as_str();
        let prev = stored.get(&subject).map_or("never", |(s, _)| s.as_str());
        let since = repo.last_check.as_ref().map_or(now, |c| c.finished_at);
        let kind = match (prev, repo.health) {
            (p, Health::Failed) if p != "failed" => Some(EventKind::CheckFailed),
            ("failed", Health::Ok) => Some(EventKind::CheckRecovered),
            _ => None,
        };
        let event = kind.map(|kind| {
            let mut p = payload(kind, state, Some(prev), since);
            p.repository = Some(repo.repository.clone());
            p.message = repo.last_check.as_ref().and_then(|c| c.message.clone());
            p
        });
        found.push(Found { subject, state: state.into(), since, event });
    }

    // Rollouts.
    let mut stmt = conn.prepare_cached("SELECT id, state, halt FROM rollouts ORDER BY id")?;
    let rollouts: Vec<(i64, String, Option<String>)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    for (id, state, halt) in rollouts {
        let subject = format!("rollout:{id}");
        let prev = stored.get(&subject).map(|(s, _)| s.as_str());
        let halt: Option<serde_json::Value> = halt.and_then(|h| serde_json::from_str(&h).ok());
        let since = halt.as_ref().and_then(|h| h["at"].as_i64()).unwrap_or(now);
        let event = (state == "halted" && prev != Some("halted")).then(|| {
            let mut p = payload(EventKind::RolloutHalted, &state, prev, since);
            p.rollout = Some(id);
            p.message = halt.as_ref().and_then(|h| h["reason"].as_str()).map(str::to_owned);
            p
        });
        found.push(Found { subject, state, since, event });
    }

    // Store the states and queue the events, in this one operation.
    let rules = list_rules(conn)?;
    let now_ms = now.saturating_mul(1000);
    let mut queued = 0;
    let mut seen = HashSet::new();
    for f in found {
        // Written only when the state changes (an agent's heartbeats move nothing here).
        if stored.get(&f.subject).is_none_or(|(s, _)| *s != f.state) {
            conn.prepare_cached(
                "INSERT INTO notify_states (subject, state, since) VALUES (?1, ?2, ?3)
                 ON CONFLICT (subject) DO UPDATE SET state = excluded.state, since = excluded.since",
            )?
            .execute(params![f.subject, f.state, f.since])?;
        }
        seen.insert(f.subject);
        let Some(event) = f.event else { continue };
        let event = event.render();
        let labels = event.host.as_ref().map(|h| &h.labels);
        for (rule, _) in rules.iter().filter(|(r, _)| r.matches(event.event, labels)) {
            let held = rule.warning_digest && event.event == EventKind::BackupWarning;
            let status = if held { DeliveryStatus::Held } else { DeliveryStatus::Pending };
            enqueue(conn, &rule.channel, &rule.name, &event, status, now, now_ms + tuning.give_up_ms)?;
            queued += 1;
        }
    }
    for subject in stored.keys().filter(|s| !seen.contains(*s)) {
        conn.prepare_cached("DELETE FROM notify_states WHERE subject = ?1")?.execute([subject])?;
    }

    // Digests of held warnings.
    for (rule, _) in rules.iter().filter(|(r, _)| r.warning_digest) {
        let oldest: Option<Timestamp> = conn
            .prepare_cached("SELECT min(created_at) FROM notifications WHERE rule = ?1 AND status = 'held'")?
            .query_row([&rule.name], |r| r.get(0))?;
        let Some(oldest) = oldest.filter(|t| now - t >= tuning.digest_every_secs) else { continue };
        let mut stmt = conn.prepare_cached(
            "SELECT payload FROM notifications WHERE rule = ?1 AND status = 'held' ORDER BY id LIMIT 1000",
        )?;
        let items: Vec<EventPayload> = stmt
            .query_map([&rule.name], |r| r.get::<_, String>(0))?
            .filter_map(|p| p.ok().and_then(|p| serde_json::from_str(&p).ok()))
            .collect();
        let mut digest = payload(EventKind::WarningDigest, "warning", None, oldest);
        digest.items = items;
        let digest = digest.render();
        let id = enqueue(
            conn,
            &rule.channel,
            &rule.name,
            &digest,
            DeliveryStatus::Pending,
            now,
            now_ms + tuning.give_up_ms,
        )?;
        conn.prepare_cached(
            "UPDATE notifications SET status = 'digested', digest_id = ?2 WHERE rule = ?1 AND status = 'held'",
        )?
        .execute(params![rule.name, id])?;
        queued += 1;
    }
    Ok(queued)
}

fn enqueue(
    conn: &Connection,
    channel: &str,
    rule: &str,
    event: &EventPayload,
    status: DeliveryStatus,
    now: Timestamp,
    give_up_ms: i64,
) -> Result<i64, DbError> {
    let next = (status == DeliveryStatus::Pending).then_some(now.saturating_mul(1000));
    conn.prepare_cached(
        "INSERT INTO notifications (channel, rule, event, title, payload, status, created_at, next_attempt_ms, give_up_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        channel,
        rule,
        event.event.as_str(),
        event.title,
        serde_json::to_string(event).expect("a payload serialises"),
        status.as_str(),
        now,
        next,
        give_up_ms
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Deletes finished messages (delivered, failed, digested) queued before `before`, with their attempts; returns
/// how many. Pending and held messages stay whatever their age.
pub fn prune_notifications(conn: &Connection, before: Timestamp) -> Result<usize, DbError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM notifications WHERE created_at < ?1 AND status IN ('delivered', 'failed', 'digested')",
        )?
        .execute([before])?)
}

/// A message due for an attempt, with its channel (secrets opened) or why the channel cannot be used.
#[derive(Debug)]
pub struct Due {
    pub id: i64,
    pub channel: Result<ChannelSpec, String>,
    pub payload: EventPayload,
}

/// The pending messages whose next attempt is due at `now_ms`, oldest first, at most [`BATCH`].
pub fn take_due(conn: &Connection, key: &SecretKey, now_ms: i64) -> Result<Vec<Due>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, channel, payload FROM notifications
         WHERE status = 'pending' AND next_attempt_ms <= ?1 ORDER BY next_attempt_ms, id LIMIT 16",
    )?;
    debug_assert_eq!(BATCH, 16);
    let rows: Vec<(i64, String, String)> =
        stmt.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, channel, payload) in rows {
        let Ok(mut payload) = serde_json::from_str::<EventPayload>(&payload) else { continue };
        payload.id = id;
        let channel = match channel_for_send(conn, key, &channel)? {
            Some(Ok(spec)) => Ok(spec),
            Some(Err(e)) => Err(e.to_string()),
            None => Err(format!("channel {channel} was deleted")),
        };
        out.push(Due { id, channel, payload });
    }
    Ok(out)
}

/// When the next pending message is due (milliseconds), if any.
pub fn next_due_ms(conn: &Connection) -> Result<Option<i64>, DbError> {
    Ok(conn
        .prepare_cached("SELECT min(next_attempt_ms) FROM notifications WHERE status = 'pending'")?
        .query_row([], |r| r.get(0))?)
}

/// How retries back off: `base_ms` doubling per attempt, at most `max_ms` apart.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base_ms: i64,
    pub max_ms: i64,
}

impl Backoff {
    /// The delay after the `attempt`-th failed attempt (1-based).
    pub fn delay_ms(self, attempt: u32) -> i64 {
        let factor = 1i64.checked_shl(attempt.saturating_sub(1).min(40)).unwrap_or(i64::MAX);
        self.base_ms.saturating_mul(factor).min(self.max_ms).max(1)
    }
}

/// Records one attempt and its consequence in one operation: delivered, due again after the backoff, or given up
/// once the next attempt would fall after its retry window. Returns the status it leaves.
pub fn record_attempt(
    conn: &Connection,
    id: i64,
    now_ms: i64,
    ok: bool,
    answer: &str,
    backoff: Backoff,
) -> Result<Option<DeliveryStatus>, DbError> {
    let row: Option<(String, i64)> = conn
        .prepare_cached("SELECT status, give_up_ms FROM notifications WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((status, give_up_ms)) = row else { return Ok(None) };
    if status != "pending" {
        return Ok(status.parse().ok());
    }
    let n: u32 = conn
        .prepare_cached("SELECT count(*) FROM notification_attempts WHERE notification_id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let answer = rm_protocol::validate::clean_text(answer, MAX_ANSWER);
    conn.prepare_cached(
        "INSERT INTO notification_attempts (notification_id, n, at, ok, answer) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, n + 1, now_ms / 1000, ok, answer])?;
    let status = if ok {
        conn.prepare_cached(
            "UPDATE notifications SET status = 'delivered', delivered_at = ?2, next_attempt_ms = NULL WHERE id = ?1",
        )?
        .execute(params![id, now_ms / 1000])?;
        DeliveryStatus::Delivered
    } else {
        let next = now_ms.saturating_add(backoff.delay_ms(n + 1));
        if next > give_up_ms {
            conn.prepare_cached("UPDATE notifications SET status = 'failed', next_attempt_ms = NULL WHERE id = ?1")?
                .execute([id])?;
            DeliveryStatus::Failed
        } else {
            conn.prepare_cached("UPDATE notifications SET next_attempt_ms = ?2 WHERE id = ?1")?
                .execute(params![id, next])?;
            DeliveryStatus::Pending
        }
    };
    Ok(Some(status))
}

/// The newest messages first, optionally of one status, with their attempts.
pub fn list_notifications(
    conn: &Connection,
    status: Option<DeliveryStatus>,
    limit: u32,
) -> Result<Vec<NotificationView>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, channel, rule, event, title, status, created_at, next_attempt_ms, delivered_at, give_up_ms
         FROM notifications WHERE ?1 IS NULL OR status = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows: Vec<NotificationView> = stmt
        .query_map(params![status.map(|s| s.as_str()), limit], |r| {
            let event: String = r.get(3)?;
            let status: String = r.get(5)?;
            let next: Option<i64> = r.get(7)?;
            let give_up: i64 = r.get(9)?;
            Ok(NotificationView {
                id: r.get(0)?,
                channel: r.get(1)?,
                rule: r.get(2)?,
                event: event.parse().unwrap_or(EventKind::Test),
                title: r.get(4)?,
                status: status.parse().unwrap_or(DeliveryStatus::Pending),
                created_at: r.get(6)?,
                next_attempt_at: next.map(|ms| ms.div_euclid(1000)),
                delivered_at: r.get(8)?,
                give_up_at: give_up.div_euclid(1000),
                attempts: Vec::new(),
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut attempts =
        conn.prepare_cached("SELECT at, ok, answer FROM notification_attempts WHERE notification_id = ?1 ORDER BY n")?;
    let mut out = Vec::with_capacity(rows.len());
    for mut view in rows {
        view.attempts = attempts
            .query_map([view.id], |r| Ok(AttemptView { at: r.get(0)?, ok: r.get(1)?, answer: r.get(2)? }))?
            .collect::<Result<_, _>>()?;
        out.push(view);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;
    use rm_protocol::notify::ChannelKind;

    const T0: Timestamp = 1_700_000_000;

    fn setup() -> (tempfile::TempDir, Connection, SecretKey) {
        let dir = tempfile::tempdir().unwrap();
        drop(Db::open(&dir.path().join("f.db")).unwrap());
        let conn = Connection::open(dir.path().join("f.db")).unwrap();
        conn.execute_batch("PRAGMA foreign_keys=ON").unwrap();
        for (id, labels) in [("a1", r#"{"env":"prod"}"#), ("a2", r#"{"env":"dev"}"#)] {
            conn.execute(
                "INSERT INTO agents (id, secret_hash, hostname, os, arch, agent_version, agent_commit, enrolled_at,
                                     last_seen_at, labels)
                 VALUES (?1, x'00', ?1 || '.example', 'linux', 'amd64', '1', 'c', 1, ?2, ?3)",
                params![id, T0, labels],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO repositories (name, url, password, auto_init, created_at, updated_at)
             VALUES ('r', '/srv/r', x'00', 0, 1, 1)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO plans (name, repository, paths, excludes, schedule, timezone, tags, one_file_system,
                                exclude_caches, agents, selector, timeout_secs, jitter_secs, created_at, updated_at)
             VALUES ('home', 'r', '[\"/home\"]', '[]', '@every 1h', 'utc', '[]', 0, 0, '[]', '{\"env\":\"prod\"}',
                     3600, 0, ?1, ?1)",
            [T0],
        )
        .unwrap();
        let key = SecretKey::from_bytes(&[7; 32]);
        (dir, conn, key)
    }

    fn audit() -> AuditEvent {
        AuditEvent { at: T0, source: Some("test".into()), ..Default::default() }
    }

    fn hook(conn: &Connection, key: &SecretKey) {
        let spec = ChannelSpec {
            name: "hook".into(),
            kind: Some(ChannelKind::Webhook),
            url: Some("http://127.0.0.1:9/secret-path".into()),
            token: Some("tok-123".into()),
            ..Default::default()
        };
        create_channel(conn, key, T0, &spec, audit()).unwrap().unwrap();
    }

    fn finish(conn: &Connection, n: u32, status: &str, at: Timestamp) {
        let id = format!("op_{n:032x}");
        conn.execute(
            "INSERT INTO operations (id, agent_id, plan, kind, trigger, status, created_at, started_at, finished_at,
                                     message)
             VALUES (?1, 'a1', 'home', 'backup', 'schedule', ?2, ?3, ?3, ?3, 'restic said so')",
            params![id, status, at],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO plan_status (agent_id, plan, last_operation, last_status, last_finished_at, last_success_at)
             VALUES ('a1', 'home', ?1, ?2, ?3, CASE WHEN ?2 = 'failed' THEN NULL ELSE ?3 END)
             ON CONFLICT (agent_id, plan) DO UPDATE SET last_operation = ?1, last_status = ?2, last_finished_at = ?3,
               last_success_at = CASE WHEN ?2 = 'failed' THEN last_success_at ELSE ?3 END",
            params![id, status, at],
        )
        .unwrap();
    }

    fn tuning() -> Tuning {
        Tuning {
            stale_after_secs: 300,
            booted_at: 0,
            link_base: Some("https://rm.example".into()),
            give_up_ms: 60_000,
            digest_every_secs: 86_400,
        }
    }

    fn events(conn: &Connection) -> Vec<(String, String)> {
        list_notifications(conn, None, 100).unwrap().into_iter().rev().map(|n| (n.event.to_string(), n.rule)).collect()
    }

    #[test]
    fn secrets_are_sealed_and_never_listed() {
        let (_d, conn, key) = setup();
        hook(&conn, &key);
        let raw: Vec<u8> = conn.query_row("SELECT secrets FROM notify_channels", [], |r| r.get(0)).unwrap();
        let config: String = conn.query_row("SELECT config FROM notify_channels", [], |r| r.get(0)).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("secret-path") && !config.contains("secret-path"));
        assert!(!config.contains("tok-123"));
        let listed = list_channels(&conn, &key).unwrap();
        assert_eq!(listed[0].secrets_set, ["url", "token"]);
        assert_eq!(listed[0].spec.url, None);
        let full = channel_for_send(&conn, &key, "hook").unwrap().unwrap().unwrap();
        assert_eq!(full.url.as_deref(), Some("http://127.0.0.1:9/secret-path"));
        let other = SecretKey::from_bytes(&[8; 32]);
        assert!(channel_for_send(&conn, &other, "hook").unwrap().unwrap().is_err());
        assert_eq!(check_key(&conn, &other).unwrap(), (1, 0));
    }

    #[test]
    fn each_transition_is_queued_once_per_matching_rule() {
        let (_d, conn, key) = setup();
        hook(&conn, &key);
        let prod = RuleSpec {
            name: "prod".into(),
            channel: "hook".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            ..Default::default()
        };
        create_rule(&conn, T0, &prod, audit()).unwrap().unwrap();
        let dev = RuleSpec { name: "dev".into(), labels: [("env".into(), "dev".into())].into(), ..prod.clone() };
        create_rule(&conn, T0, &dev, audit()).unwrap().unwrap();
        assert_eq!(detect(&conn, T0 + 10, &tuning()).unwrap(), 0, "never ran: nothing to say");
        finish(&conn, 1, "failed", T0 + 20);
        assert_eq!(detect(&conn, T0 + 30, &tuning()).unwrap(), 1);
        assert_eq!(detect(&conn, T0 + 40, &tuning()).unwrap(), 0, "a state that holds is not sent again");
        finish(&conn, 2, "failed", T0 + 50);
        assert_eq!(detect(&conn, T0 + 60, &tuning()).unwrap(), 0, "failed again: still failed");
        finish(&conn, 3, "success", T0 + 70);
        assert_eq!(detect(&conn, T0 + 80, &tuning()).unwrap(), 1);
        assert_eq!(
            events(&conn),
            [("backup_failed".into(), "prod".into()), ("backup_recovered".into(), "prod".into())]
        );
        let due = take_due(&conn, &key, (T0 + 80) * 1000).unwrap();
        assert_eq!(due.len(), 2);
        let p = &due[0].payload;
        assert_eq!(p.host.as_ref().unwrap().hostname, "a1.example");
        assert_eq!((p.plan.as_deref(), p.repository.as_deref()), (Some("home"), Some("r")));
        assert_eq!(p.message.as_deref(), Some("restic said so"));
        assert_eq!(p.since, T0 + 20);
        assert_eq!(p.link.as_deref(), Some("https://rm.example/ui/hosts/a1"));
        assert!(p.text.contains("Host: a1.example (a1)") && p.text.contains("Since: "), "{}", p.text);
        assert_eq!(due[0].channel.as_ref().unwrap().token.as_deref(), Some("tok-123"));
    }

    #[test]
    fn stale_agents_count_from_the_servers_start_and_come_back() {
        let (_d, conn, key) = setup();
        hook(&conn, &key);
        let all = RuleSpec { name: "all".into(), channel: "hook".into(), ..Default::default() };
        create_rule(&conn, T0, &all, audit()).unwrap().unwrap();
        let booted = Tuning { booted_at: T0 + 1000, ..tuning() };
        assert_eq!(detect(&conn, T0 + 1100, &booted).unwrap(), 0, "silent, but the server just started");
        assert_eq!(detect(&conn, T0 + 1400, &booted).unwrap(), 2, "both agents stale");
        assert_eq!(detect(&conn, T0 + 1500, &booted).unwrap(), 0);
        conn.execute("UPDATE agents SET last_seen_at = ?1 WHERE id = 'a2'", [T0 + 1550]).unwrap();
        assert_eq!(detect(&conn, T0 + 1560, &booted).unwrap(), 1);
        let kinds: Vec<String> = events(&conn).into_iter().map(|e| e.0).collect();
        assert_eq!(kinds, ["agent_stale", "agent_stale", "agent_back"]);
    }

    #[test]
    fn attempts_back_off_deliver_once_and_give_up() {
        let (_d, conn, key) = setup();
        hook(&conn, &key);
        let all = RuleSpec { name: "all".into(), channel: "hook".into(), ..Default::default() };
        create_rule(&conn, T0, &all, audit()).unwrap().unwrap();
        finish(&conn, 1, "failed", T0);
        detect(&conn, T0, &tuning()).unwrap();
        let backoff = Backoff { base_ms: 1000, max_ms: 8000 };
        let id = take_due(&conn, &key, T0 * 1000).unwrap()[0].id;
        let at = |ms| record_attempt(&conn, id, T0 * 1000 + ms, false, "HTTP 500", backoff).unwrap();
        assert_eq!(at(0), Some(DeliveryStatus::Pending));
        assert!(take_due(&conn, &key, T0 * 1000 + 999).unwrap().is_empty(), "not before the backoff");
        assert_eq!(take_due(&conn, &key, T0 * 1000 + 1000).unwrap().len(), 1);
        assert_eq!(at(1000), Some(DeliveryStatus::Pending));
        assert_eq!(next_due_ms(&conn).unwrap(), Some(T0 * 1000 + 3000));
        let ok = record_attempt(&conn, id, T0 * 1000 + 3000, true, "HTTP 200", backoff).unwrap();
        assert_eq!(ok, Some(DeliveryStatus::Delivered));
        assert!(take_due(&conn, &key, i64::MAX).unwrap().is_empty(), "delivered is never due again");
        let view = &list_notifications(&conn, None, 10).unwrap()[0];
        assert_eq!(view.attempts.iter().map(|a| a.ok).collect::<Vec<_>>(), [false, false, true]);

        // A message whose retries would outlast the window is given up.
        finish(&conn, 2, "success", T0 + 10);
        detect(&conn, T0 + 10, &tuning()).unwrap();
        let id = take_due(&conn, &key, (T0 + 10) * 1000).unwrap()[0].id;
        let mut status = None;
        let mut t = (T0 + 10) * 1000;
        for _ in 0..20 {
            status = record_attempt(&conn, id, t, false, "refused", backoff).unwrap();
            if status != Some(DeliveryStatus::Pending) {
                break;
            }
            t = next_due_ms(&conn).unwrap().unwrap();
        }
        assert_eq!(status, Some(DeliveryStatus::Failed));
        assert!(t - (T0 + 10) * 1000 <= 60_000);
    }

    #[test]
    fn failed_checks_and_halted_rollouts_are_told_once_to_rules_without_labels() {
        let (_d, conn, key) = setup();
        hook(&conn, &key);
        let all = RuleSpec { name: "all".into(), channel: "hook".into(), ..Default::default() };
        create_rule(&conn, T0, &all, audit()).unwrap().unwrap();
        let prod = RuleSpec {
            name: "prod".into(),
            channel: "hook".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            ..Default::default()
        };
        create_rule(&conn, T0, &prod, audit()).unwrap().unwrap();
        detect(&conn, T0, &tuning()).unwrap();
        let check = |status: &str, at: Timestamp| {
            conn.execute(
                "INSERT INTO repository_maintenance (repository, kind, last_status, last_finished_at, health_status)
                 VALUES ('r', 'check', ?1, ?2, ?1)
                 ON CONFLICT (repository, kind) DO UPDATE SET last_status = ?1, last_finished_at = ?2, health_status = ?1",
                params![status, at],
            )
            .unwrap();
        };
        check("failed", T0 + 5);
        assert_eq!(detect(&conn, T0 + 10, &tuning()).unwrap(), 1, "one rule without labels takes it");
        assert_eq!(detect(&conn, T0 + 20, &tuning()).unwrap(), 0);
        check("success", T0 + 25);
        assert_eq!(detect(&conn, T0 + 30, &tuning()).unwrap(), 1);
        conn.execute(
            "INSERT INTO rollouts (id, state, strategy, targets, halt, created_at, created_by)
             VALUES (7, 'halted', '{}', '[]', '{\"at\": 1700000040, \"reason\": \"wave 1 over budget\"}', ?1, 'test')",
            [T0],
        )
        .unwrap();
        assert_eq!(detect(&conn, T0 + 50, &tuning()).unwrap(), 1);
        assert_eq!(detect(&conn, T0 + 60, &tuning()).unwrap(), 0);
        let kinds: Vec<String> = events(&conn).into_iter().map(|e| e.0).collect();
        assert_eq!(kinds, ["check_failed", "check_recovered", "rollout_halted"]);
        let due = take_due(&conn, &key, i64::MAX).unwrap();
        assert_eq!(due[0].payload.repository.as_deref(), Some("r"));
        assert_eq!(due[2].payload.rollout, Some(7));
        assert_eq!(due[2].payload.message.as_deref(), Some("wave 1 over budget"));
        assert_eq!(due[2].payload.since, 1_700_000_040);

        // Finished messages are pruned by age; pending ones stay.
        let id = due[0].id;
        record_attempt(&conn, id, T0 * 1000, true, "ok", Backoff { base_ms: 1, max_ms: 1 }).unwrap();
        assert_eq!(prune_notifications(&conn, T0 + 1000).unwrap(), 1);
        assert_eq!(list_notifications(&conn, None, 10).unwrap().len(), 2);
    }

    #[test]
    fn warnings_wait_for_the_digest() {
        let (_d, conn, key) = setup();
        hook(&conn, &key);
        let digest = RuleSpec {
            name: "daily".into(),
            channel: "hook".into(),
            events: vec![EventKind::BackupWarning],
            warning_digest: true,
            ..Default::default()
        };
        create_rule(&conn, T0, &digest, audit()).unwrap().unwrap();
        finish(&conn, 1, "warning", T0 + 10);
        assert_eq!(detect(&conn, T0 + 20, &tuning()).unwrap(), 1);
        assert!(take_due(&conn, &key, i64::MAX).unwrap().is_empty(), "held, not sent");
        assert_eq!(detect(&conn, T0 + 20 + 86_399, &tuning()).unwrap(), 0);
        assert_eq!(detect(&conn, T0 + 20 + 86_400, &tuning()).unwrap(), 1);
        let due = take_due(&conn, &key, i64::MAX).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].payload.event, EventKind::WarningDigest);
        assert_eq!(due[0].payload.items.len(), 1);
        assert_eq!(detect(&conn, T0 + 20 + 86_500, &tuning()).unwrap(), 0, "digested once");
    }
}
