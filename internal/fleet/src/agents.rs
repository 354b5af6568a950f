//! The `agents` table: enrollment (which consumes a token), credential checks and heartbeats.

use rm_protocol::HostFacts;
use rm_protocol::backup::ResticInfo;
use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::audit::{AuditEvent, record_audit};
use crate::labels::{self, Labels};
use crate::secrets;
use crate::time::Timestamp;
use crate::tokens::{EnrollError, check_enrollment_token};

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub agent_id: String,
    /// `rmagt_<id>_<secret>`: shown once, stored only as a hash.
    pub credential: String,
}

/// Consumes one use of `token` and registers a new agent. Nothing is written when the token is refused.
pub fn enroll(
    conn: &Connection,
    now: Timestamp,
    token: &str,
    facts: &HostFacts,
) -> Result<Result<Enrolled, EnrollError>, DbError> {
    let info = match check_enrollment_token(conn, now, token)? {
        Ok(info) => info,
        Err(e) => return Ok(Err(e)),
    };
    // Guarded update: even if two enrollments raced, the use count can never pass max_uses.
    let updated = conn
        .prepare_cached(
            "UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = ?1 AND (max_uses IS NULL OR uses < max_uses)",
        )?
        .execute([&info.id])?;
    if updated != 1 {
        return Ok(Err(EnrollError::UsedUp));
    }
    let agent_id = secrets::random_id();
    let credential = format!("{}{agent_id}_{}", secrets::AGENT_PREFIX, secrets::random_secret());
    conn.prepare_cached(
        "INSERT INTO agents (id, secret_hash, hostname, os, arch, agent_version, agent_commit, enrolled_at,
                             enrollment_token_id, last_seen_at, labels)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8, ?10)",
    )?
    .execute(params![
        agent_id,
        secrets::hash_secret(&credential).as_slice(),
        facts.hostname,
        facts.os,
        facts.arch,
        facts.version,
        facts.commit,
        now,
        info.id,
        labels::to_json(&info.labels)
    ])?;
    Ok(Ok(Enrolled { agent_id, credential }))
}

/// The agent a credential belongs to, if the credential is valid (constant-time check of the secret).
pub fn authenticate_agent(conn: &Connection, credential: &str) -> Result<Option<String>, DbError> {
    let Some((id, whole)) = secrets::split_agent_credential(credential) else { return Ok(None) };
    let stored: Option<Vec<u8>> = conn
        .prepare_cached("SELECT secret_hash FROM agents WHERE id = ?1 AND credential_revoked_at IS NULL")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    Ok(stored.filter(|s| secrets::verify(whole, s)).map(|_| id.to_string()))
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub facts: HostFacts,
    /// SHA-256 of the agent's own executable, when it reports one.
    pub binary_sha256: Option<String>,
    /// The error of the agent's last failed self-update, if any.
    pub last_update_error: Option<String>,
    /// The build `last_update_error` is about (refused or reverted), when the agent says.
    pub last_update_sha256: Option<String>,
    /// A new build on trial under the running agent: answered, never recorded (it is not what the host runs yet).
    pub trial: bool,
    /// The agent's own heartbeat counter (monotonic per agent process lifetime).
    pub seq: u64,
    /// The host's restic (`None`: the agent did not say; what was stored stays).
    pub restic: Option<ResticInfo>,
    /// The configuration revision the agent has applied (`None`: what was stored stays).
    pub config_revision: Option<u64>,
}

/// Records a heartbeat of the agent `id` (authenticated with [`authenticate_agent`] in the same operation).
pub fn record_heartbeat(conn: &Connection, now: Timestamp, id: &str, hb: &Heartbeat) -> Result<(), DbError> {
    conn.prepare_cached(
        "UPDATE agents SET hostname = ?2, os = ?3, arch = ?4, agent_version = ?5, agent_commit = ?6,
                binary_sha256 = ?7, last_update_error = ?8, last_seen_at = ?9, heartbeats = heartbeats + 1,
                last_seq = ?10,
                restic_version = CASE WHEN ?11 THEN ?12 ELSE restic_version END,
                restic_path = CASE WHEN ?11 THEN ?13 ELSE restic_path END,
                restic_error = CASE WHEN ?11 THEN ?14 ELSE restic_error END,
                config_revision = coalesce(?15, config_revision),
                restic_managed = CASE WHEN ?11 THEN ?16 ELSE restic_managed END,
                restic_install_error = CASE WHEN ?11 THEN ?17 ELSE restic_install_error END,
                last_update_sha256 = ?18
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        hb.facts.hostname,
        hb.facts.os,
        hb.facts.arch,
        hb.facts.version,
        hb.facts.commit,
        hb.binary_sha256,
        hb.last_update_error,
        now,
        hb.seq as i64,
        hb.restic.is_some(),
        hb.restic.as_ref().and_then(|r| r.version.as_deref()),
        hb.restic.as_ref().and_then(|r| r.path.as_deref()),
        hb.restic.as_ref().and_then(|r| r.error.as_deref()),
        hb.config_revision.map(|r| r.min(i64::MAX as u64) as i64),
        hb.restic.as_ref().is_some_and(|r| r.managed),
        hb.restic.as_ref().and_then(|r| r.install_error.as_deref()),
        hb.last_update_error.as_ref().and(hb.last_update_sha256.as_deref()),
    ])?;
    Ok(())
}

/// Records a heartbeat for an authenticated agent; `Ok(None)` when the credential is not valid (nothing written).
pub fn heartbeat(
    conn: &Connection,
    now: Timestamp,
    credential: &str,
    hb: &Heartbeat,
) -> Result<Option<String>, DbError> {
    let Some(id) = authenticate_agent(conn, credential)? else { return Ok(None) };
    record_heartbeat(conn, now, &id, hb)?;
    Ok(Some(id))
}

/// A row of `agents` (without the credential hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    pub agent_commit: String,
    pub binary_sha256: Option<String>,
    pub last_update_error: Option<String>,
    pub enrolled_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub heartbeats: u64,
    pub last_seq: u64,
    pub labels: Labels,
    /// The host's restic as last reported (`None`: never reported).
    pub restic: Option<ResticInfo>,
    /// The configuration revision the agent last said it applied.
    pub config_revision: Option<u64>,
    /// When an operator revoked the agent's credential (it is refused from then on).
    pub credential_revoked_at: Option<Timestamp>,
}

const AGENT_COLUMNS: &str = "id, hostname, os, arch, agent_version, agent_commit, binary_sha256, last_update_error,
                             enrolled_at, last_seen_at, heartbeats, last_seq, labels, restic_version, restic_path,
                             restic_error, config_revision, restic_managed, restic_install_error,
                             credential_revoked_at";

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRecord> {
    let (version, path, error): (Option<String>, Option<String>, Option<String>) = (r.get(13)?, r.get(14)?, r.get(15)?);
    let (managed, install_error): (bool, Option<String>) = (r.get(17)?, r.get(18)?);
    let restic = (version.is_some() || path.is_some() || error.is_some() || install_error.is_some())
        .then_some(ResticInfo { version, path, error, managed, install_error });
    Ok(AgentRecord {
        id: r.get(0)?,
        hostname: r.get(1)?,
        os: r.get(2)?,
        arch: r.get(3)?,
        agent_version: r.get(4)?,
        agent_commit: r.get(5)?,
        binary_sha256: r.get(6)?,
        last_update_error: r.get(7)?,
        enrolled_at: r.get(8)?,
        last_seen_at: r.get(9)?,
        heartbeats: r.get::<_, i64>(10)? as u64,
        last_seq: r.get::<_, i64>(11)? as u64,
        labels: labels::from_json(&r.get::<_, String>(12)?),
        restic,
        config_revision: r.get::<_, Option<i64>>(16)?.map(|v| v.max(0) as u64),
        credential_revoked_at: r.get(19)?,
    })
}

pub fn list_agents(conn: &Connection) -> Result<Vec<AgentRecord>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY hostname, id"))?;
    let rows = stmt.query_map([], agent_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The agents enrolled with enrollment token `token_id`, oldest enrollment first.
pub fn agents_enrolled_with(conn: &Connection, token_id: &str) -> Result<Vec<AgentRecord>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE enrollment_token_id = ?1 ORDER BY enrolled_at, id"
    ))?;
    let rows = stmt.query_map([token_id], agent_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get_agent(conn: &Connection, id: &str) -> Result<Option<AgentRecord>, DbError> {
    Ok(conn.query_row(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"), [id], agent_row).optional()?)
}

/// Revokes agent `id`'s credential: from now on its heartbeats, reports and downloads are refused (401), and the
/// host must enroll again. Records `audit` (kind `agent_revoked`). `Ok(None)`: no such agent; `Ok(Some(false))`:
/// already revoked (nothing written).
pub fn revoke_agent_credential(
    conn: &Connection,
    now: Timestamp,
    id: &str,
    mut audit: AuditEvent,
) -> Result<Option<bool>, DbError> {
    let Some(agent) = get_agent(conn, id)? else { return Ok(None) };
    if agent.credential_revoked_at.is_some() {
        return Ok(Some(false));
    }
    conn.prepare_cached("UPDATE agents SET credential_revoked_at = ?2 WHERE id = ?1")?.execute(params![id, now])?;
    audit.agent_id = Some(id.to_owned());
    audit.detail = Some(format!("credential of {id} ({}) revoked", agent.hostname));
    record_audit(conn, &audit)?;
    Ok(Some(true))
}

/// Replaces an agent's labels (validated with [`crate::labels::validate_labels`]), bumps the configuration revision
/// and records `audit` (kind `agent_labels`); `Ok(None)` when there is no such agent (nothing written).
pub fn set_labels(
    conn: &Connection,
    id: &str,
    new: &Labels,
    audit: AuditEvent,
) -> Result<Option<AgentRecord>, DbError> {
    let Some(before) = get_agent(conn, id)? else { return Ok(None) };
    conn.prepare_cached("UPDATE agents SET labels = ?2 WHERE id = ?1")?.execute(params![id, labels::to_json(new)])?;
    crate::plans::bump_config_revision(conn)?;
    let detail = format!("labels of {id}: {{{}}} -> {{{}}}", labels::describe(&before.labels), labels::describe(new));
    record_audit(
        conn,
        &AuditEvent { kind: "agent_labels".into(), agent_id: Some(id.to_owned()), detail: Some(detail), ..audit },
    )?;
    get_agent(conn, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;
    use crate::secrets::ENROLL_PREFIX;
    use crate::tokens::{NewToken, create_token, revoke_token};

    fn facts() -> HostFacts {
        HostFacts {
            hostname: "web-1".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            version: "1.0.0".into(),
            commit: "abc".into(),
        }
    }

    fn counts(conn: &Connection) -> (i64, i64) {
        let agents = conn.query_row("SELECT count(*) FROM agents", [], |r| r.get(0)).unwrap();
        let uses = conn.query_row("SELECT coalesce(sum(uses), 0) FROM enrollment_tokens", [], |r| r.get(0)).unwrap();
        (agents, uses)
    }

    #[test]
    fn every_invalid_token_kind_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("f.db")).unwrap();
        db.call_blocking(|c| {
            let t0 = 1_000;
            let (_, expired) = create_token(c, t0, &NewToken { expires_at: Some(t0 + 10), ..Default::default() })?;
            let (revoked_info, revoked) = create_token(c, t0, &NewToken::default())?;
            revoke_token(c, t0, &revoked_info.id)?;
            let (_, once) = create_token(c, t0, &NewToken { max_uses: Some(1), ..Default::default() })?;
            assert!(enroll(c, t0, &once, &facts())?.is_ok());
            let before = counts(c);
            let forged = format!("{ENROLL_PREFIX}{}", secrets::random_secret());
            for (token, want) in [
                (expired.as_str(), EnrollError::Expired),
                (revoked.as_str(), EnrollError::Revoked),
                (once.as_str(), EnrollError::UsedUp),
                (forged.as_str(), EnrollError::Unknown),
                ("", EnrollError::Unknown),
                ("rmadm_not_an_enrollment_token", EnrollError::Unknown),
            ] {
                assert_eq!(enroll(c, t0 + 100, token, &facts())?.unwrap_err(), want, "{token:?}");
                assert_eq!(counts(c), before, "{token:?} wrote something");
            }
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn use_count_is_enforced_and_credentials_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("f.db")).unwrap();
        db.call_blocking(|c| {
            let (_, token) = create_token(c, 0, &NewToken { max_uses: Some(2), ..Default::default() })?;
            let a = enroll(c, 1, &token, &facts())?.unwrap();
            let b = enroll(c, 2, &token, &facts())?.unwrap();
            assert_eq!(enroll(c, 3, &token, &facts())?.unwrap_err(), EnrollError::UsedUp);
            assert_ne!(a.agent_id, b.agent_id);
            assert_eq!(authenticate_agent(c, &a.credential)?, Some(a.agent_id.clone()));
            // b's secret with a's id, a truncated secret, garbage: all refused.
            let (_, b_secret) = b.credential.rsplit_once('_').unwrap();
            let forged = format!("rmagt_{}_{}", a.agent_id, b_secret);
            for bad in [forged.as_str(), &a.credential[..a.credential.len() - 1], "rmagt_x_y", ""] {
                assert_eq!(authenticate_agent(c, bad)?, None, "{bad:?}");
            }
            let hb = Heartbeat {
                facts: facts(),
                binary_sha256: Some("ff".into()),
                last_update_error: None,
                last_update_sha256: None,
                trial: false,
                seq: 7,
                restic: None,
                config_revision: None,
            };
            assert_eq!(heartbeat(c, 50, &a.credential, &hb)?, Some(a.agent_id.clone()));
            assert_eq!(heartbeat(c, 50, "rmagt_x_y", &hb)?, None);
            let agents = list_agents(c)?;
            let rec = agents.iter().find(|r| r.id == a.agent_id).unwrap();
            assert_eq!(
                (rec.last_seen_at, rec.heartbeats, rec.last_seq, rec.binary_sha256.as_deref()),
                (50, 1, 7, Some("ff"))
            );
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_revoked_credential_stops_authenticating_and_the_history_stays() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("f.db")).unwrap();
        db.call_blocking(|c| {
            let (_, token) = create_token(c, 0, &NewToken::default())?;
            let a = enroll(c, 1, &token, &facts())?.unwrap();
            let b = enroll(c, 1, &token, &facts())?.unwrap();
            let event = || AuditEvent { kind: "agent_revoked".into(), ..Default::default() };
            assert_eq!(revoke_agent_credential(c, 5, &a.agent_id, event())?, Some(true));
            assert_eq!(authenticate_agent(c, &a.credential)?, None);
            assert_eq!(authenticate_agent(c, &b.credential)?, Some(b.agent_id.clone()), "other agents unaffected");
            let record = get_agent(c, &a.agent_id)?.unwrap();
            assert_eq!(record.credential_revoked_at, Some(5));
            assert_eq!(revoke_agent_credential(c, 9, &a.agent_id, event())?, Some(false), "already revoked");
            assert_eq!(get_agent(c, &a.agent_id)?.unwrap().credential_revoked_at, Some(5));
            assert_eq!(revoke_agent_credential(c, 9, "nope", event())?, None);
            let audits: i64 =
                c.query_row("SELECT count(*) FROM audit_events WHERE kind = 'agent_revoked'", [], |r| r.get(0))?;
            assert_eq!(audits, 1);
            Ok(())
        })
        .unwrap();
    }
}
