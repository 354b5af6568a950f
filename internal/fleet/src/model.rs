//! Fleet operations. Each function runs inside one database-thread operation (see [`crate::db`]); the ones that can
//! refuse (bad token, bad credential) check everything before they write anything.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::DbError;
use crate::secrets::{self, ENROLL_PREFIX};

/// Unix seconds.
pub type Timestamp = i64;

pub fn now() -> Timestamp {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub fn rfc3339(ts: Timestamp) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(ts.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

// ---- enrollment tokens ----

#[derive(Debug, Clone, Default)]
pub struct NewToken {
    pub max_uses: Option<u32>,
    pub expires_at: Option<Timestamp>,
    pub note: String,
}

impl NewToken {
    /// Checks operator-supplied options (API and command line alike).
    pub fn validated(
        uses: Option<u32>,
        expires_in: Option<std::time::Duration>,
        note: String,
        now: Timestamp,
    ) -> Result<NewToken, String> {
        if uses == Some(0) {
            return Err("uses must be at least 1".into());
        }
        if note.len() > 256 || note.chars().any(char::is_control) {
            return Err("note must be at most 256 printable characters".into());
        }
        let expires_at = match expires_in {
            None => None,
            Some(d) if d.is_zero() => return Err("expires must be a positive duration".into()),
            Some(d) => Some(now.saturating_add(i64::try_from(d.as_secs()).map_err(|_| "expires is too long")?)),
        };
        Ok(NewToken { max_uses: uses, expires_at, note })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub note: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked_at: Option<Timestamp>,
}

impl TokenInfo {
    pub fn status(&self, now: Timestamp) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else if self.max_uses.is_some_and(|m| self.uses >= m) {
            "used_up"
        } else {
            "active"
        }
    }
}

/// Creates a token and returns it with its secret, which is shown once and stored only as a hash.
pub fn create_token(conn: &Connection, now: Timestamp, new: &NewToken) -> Result<(TokenInfo, String), DbError> {
    let id = secrets::random_id();
    let secret = format!("{ENROLL_PREFIX}{}", secrets::random_secret());
    conn.execute(
        "INSERT INTO enrollment_tokens (id, token_hash, note, created_at, expires_at, max_uses) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, secrets::hash_secret(&secret).as_slice(), new.note, now, new.expires_at, new.max_uses],
    )?;
    let info = TokenInfo {
        id,
        note: new.note.clone(),
        created_at: now,
        expires_at: new.expires_at,
        max_uses: new.max_uses,
        uses: 0,
        revoked_at: None,
    };
    Ok((info, secret))
}

const TOKEN_COLUMNS: &str = "id, note, created_at, expires_at, max_uses, uses, revoked_at";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.get(0)?,
        note: r.get(1)?,
        created_at: r.get(2)?,
        expires_at: r.get(3)?,
        max_uses: r.get(4)?,
        uses: r.get(5)?,
        revoked_at: r.get(6)?,
    })
}

pub fn list_tokens(conn: &Connection) -> Result<Vec<TokenInfo>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_at, id"))?;
    Ok(stmt.query_map([], token_row)?.collect::<Result<_, _>>()?)
}

/// Revokes a token; `Ok(None)` when there is no such token. Revoking twice keeps the first time.
pub fn revoke_token(conn: &Connection, now: Timestamp, id: &str) -> Result<Option<TokenInfo>, DbError> {
    conn.execute("UPDATE enrollment_tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1", params![id, now])?;
    Ok(conn
        .query_row(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE id = ?1"), [id], token_row)
        .optional()?)
}

// ---- enrollment and heartbeats ----

/// What an agent says about its host and itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    pub agent_commit: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("the enrollment token has expired")]
    Expired,
    #[error("the enrollment token has been used up")]
    UsedUp,
    #[error("the enrollment token has been revoked")]
    Revoked,
}

impl EnrollError {
    pub fn code(self) -> &'static str {
        match self {
            EnrollError::Unknown => "token_unknown",
            EnrollError::Expired => "token_expired",
            EnrollError::UsedUp => "token_used_up",
            EnrollError::Revoked => "token_revoked",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub agent_id: String,
    /// `rmagt_<id>_<secret>`: shown once, stored only as a hash.
    pub credential: String,
}

/// Checks an enrollment token without writing anything.
pub fn check_enrollment_token(
    conn: &Connection,
    now: Timestamp,
    token: &str,
) -> Result<Result<TokenInfo, EnrollError>, DbError> {
    if !token.starts_with(ENROLL_PREFIX) {
        return Ok(Err(EnrollError::Unknown));
    }
    let hash = secrets::hash_secret(token);
    let row: Option<(TokenInfo, Vec<u8>)> = conn
        .query_row(
            &format!("SELECT {TOKEN_COLUMNS}, token_hash FROM enrollment_tokens WHERE token_hash = ?1"),
            [hash.as_slice()],
            |r| Ok((token_row(r)?, r.get(7)?)),
        )
        .optional()?;
    let Some((info, stored)) = row else { return Ok(Err(EnrollError::Unknown)) };
    if !secrets::verify(token, &stored) {
        return Ok(Err(EnrollError::Unknown));
    }
    Ok(match info.status(now) {
        "revoked" => Err(EnrollError::Revoked),
        "expired" => Err(EnrollError::Expired),
        "used_up" => Err(EnrollError::UsedUp),
        _ => Ok(info),
    })
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
    let updated = conn.execute(
        "UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = ?1 AND (max_uses IS NULL OR uses < max_uses)",
        [&info.id],
    )?;
    if updated != 1 {
        return Ok(Err(EnrollError::UsedUp));
    }
    let agent_id = secrets::random_id();
    let credential = format!("{}{agent_id}_{}", secrets::AGENT_PREFIX, secrets::random_secret());
    conn.execute(
        "INSERT INTO agents (id, secret_hash, hostname, os, arch, agent_version, agent_commit, enrolled_at,
                             enrollment_token_id, last_seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8)",
        params![
            agent_id,
            secrets::hash_secret(&credential).as_slice(),
            facts.hostname,
            facts.os,
            facts.arch,
            facts.agent_version,
            facts.agent_commit,
            now,
            info.id
        ],
    )?;
    Ok(Ok(Enrolled { agent_id, credential }))
}

/// The agent a credential belongs to, if the credential is valid (constant-time check of the secret).
pub fn authenticate_agent(conn: &Connection, credential: &str) -> Result<Option<String>, DbError> {
    let Some((id, whole)) = secrets::split_agent_credential(credential) else { return Ok(None) };
    let stored: Option<Vec<u8>> =
        conn.query_row("SELECT secret_hash FROM agents WHERE id = ?1", [id], |r| r.get(0)).optional()?;
    Ok(stored.filter(|s| secrets::verify(whole, s)).map(|_| id.to_string()))
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub facts: HostFacts,
    /// SHA-256 of the agent's own executable, when it reports one.
    pub binary_sha256: Option<String>,
    /// The error of the agent's last failed self-update, if any.
    pub last_update_error: Option<String>,
    /// The agent's own heartbeat counter (monotonic per agent process lifetime).
    pub seq: u64,
}

/// Records a heartbeat for an authenticated agent; `Ok(None)` when the credential is not valid (nothing written).
pub fn heartbeat(
    conn: &Connection,
    now: Timestamp,
    credential: &str,
    hb: &Heartbeat,
) -> Result<Option<String>, DbError> {
    let Some(id) = authenticate_agent(conn, credential)? else { return Ok(None) };
    conn.execute(
        "UPDATE agents SET hostname = ?2, os = ?3, arch = ?4, agent_version = ?5, agent_commit = ?6,
                binary_sha256 = ?7, last_update_error = ?8, last_seen_at = ?9, heartbeats = heartbeats + 1,
                last_seq = ?10
         WHERE id = ?1",
        params![
            id,
            hb.facts.hostname,
            hb.facts.os,
            hb.facts.arch,
            hb.facts.agent_version,
            hb.facts.agent_commit,
            hb.binary_sha256,
            hb.last_update_error,
            now,
            hb.seq as i64
        ],
    )?;
    Ok(Some(id))
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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
}

pub fn list_agents(conn: &Connection) -> Result<Vec<AgentRecord>, DbError> {
    let mut stmt = conn.prepare(
        "SELECT id, hostname, os, arch, agent_version, agent_commit, binary_sha256, last_update_error,
                enrolled_at, last_seen_at, heartbeats, last_seq
         FROM agents ORDER BY hostname, id",
    )?;
    let rows = stmt.query_map([], |r| {
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
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- audit ----

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: i64,
    pub at: Timestamp,
    pub kind: String,
    pub remote_addr: Option<String>,
    pub user_agent: Option<String>,
    pub agent_id: Option<String>,
    pub platform: Option<String>,
    pub sha256: Option<String>,
    pub source: Option<String>,
    pub detail: Option<String>,
}

pub fn record_audit(conn: &Connection, e: &AuditEvent) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO audit_events (at, kind, remote_addr, user_agent, agent_id, platform, sha256, source, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![e.at, e.kind, e.remote_addr, e.user_agent, e.agent_id, e.platform, e.sha256, e.source, e.detail],
    )?;
    Ok(())
}

/// Newest first; `before` is the id to page below (keyset paging), `limit` at most 1000.
pub fn list_audit(
    conn: &Connection,
    kind: Option<&str>,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<AuditEvent>, DbError> {
    let mut stmt = conn.prepare(
        "SELECT id, at, kind, remote_addr, user_agent, agent_id, platform, sha256, source, detail FROM audit_events
         WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![kind, before, limit.min(1000)], |r| {
        Ok(AuditEvent {
            id: r.get(0)?,
            at: r.get(1)?,
            kind: r.get(2)?,
            remote_addr: r.get(3)?,
            user_agent: r.get(4)?,
            agent_id: r.get(5)?,
            platform: r.get(6)?,
            sha256: r.get(7)?,
            source: r.get(8)?,
            detail: r.get(9)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;

    fn facts() -> HostFacts {
        HostFacts {
            hostname: "web-1".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            agent_version: "1.0.0".into(),
            agent_commit: "abc".into(),
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
            let hb = Heartbeat { facts: facts(), binary_sha256: Some("ff".into()), last_update_error: None, seq: 7 };
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
    fn audit_pages_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("f.db")).unwrap();
        db.call_blocking(|c| {
            for i in 0..25 {
                let kind = if i % 5 == 0 { "enroll" } else { "download" };
                record_audit(c, &AuditEvent { at: i, kind: kind.into(), ..Default::default() })?;
            }
            let page1 = list_audit(c, None, None, 10)?;
            assert_eq!(page1.iter().map(|e| e.at).collect::<Vec<_>>(), (15..25).rev().collect::<Vec<_>>());
            let page2 = list_audit(c, None, Some(page1.last().unwrap().id), 10)?;
            assert_eq!(page2.first().unwrap().at, 14);
            assert_eq!(list_audit(c, Some("enroll"), None, 100)?.len(), 5);
            Ok(())
        })
        .unwrap();
    }
}
