//! The `web_sessions` table: who signed in to the operator's page. The cookie carries a random secret that is stored
//! only as its hash (a copy of the database opens no session); each session has its own CSRF token, an idle expiry
//! (from the last request) and an absolute one (from sign-in), and is revoked at sign-out.

use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::secrets;
use crate::time::Timestamp;

/// What every session cookie value starts with (so an operator, and a secret scanner, can tell what it is).
pub const SESSION_PREFIX: &str = "rmweb_";

/// How long sessions live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Seconds without a request after which a session is dead.
    pub idle_secs: i64,
    /// Seconds after sign-in after which a session is dead, however busy.
    pub absolute_secs: i64,
}

/// A live session, as a request sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The token every state-changing form of this session must carry.
    pub csrf: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Signs in: a new session, answered as (cookie secret, session). Dead sessions are deleted on the way.
/// `web_token_id` is the web token signed in with (`None`: the admin token): revoking it ends the session, and the
/// session ends when the token expires.
pub fn create_session(
    conn: &Connection,
    now: Timestamp,
    limits: SessionLimits,
    remote_addr: Option<&str>,
    user_agent: Option<&str>,
    web_token_id: Option<&str>,
) -> Result<(String, Session), DbError> {
    delete_dead(conn, now, limits)?;
    let secret = format!("{SESSION_PREFIX}{}", secrets::random_secret());
    let mut expires_at = now.saturating_add(limits.absolute_secs);
    if let Some(id) = web_token_id {
        let token_expiry: Option<Timestamp> =
            conn.prepare_cached("SELECT expires_at FROM web_tokens WHERE id = ?1")?.query_row([id], |r| r.get(0))?;
        expires_at = token_expiry.map_or(expires_at, |t| t.min(expires_at));
    }
    let session = Session { csrf: secrets::random_secret(), created_at: now, expires_at };
    conn.prepare_cached(
        "INSERT INTO web_sessions
             (id_hash, csrf, created_at, last_seen_at, expires_at, remote_addr, user_agent, web_token_id)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        secrets::hash_secret(&secret).as_slice(),
        session.csrf,
        now,
        session.expires_at,
        remote_addr,
        user_agent,
        web_token_id
    ])?;
    Ok((secret, session))
}

/// The live session `secret` opens, its idle clock restarted; `None` for an unknown, revoked or expired one.
pub fn touch_session(
    conn: &Connection,
    now: Timestamp,
    limits: SessionLimits,
    secret: &str,
) -> Result<Option<Session>, DbError> {
    if !secret.starts_with(SESSION_PREFIX) {
        return Ok(None);
    }
    let hash = secrets::hash_secret(secret);
    let row = conn
        .prepare_cached(
            "SELECT csrf, created_at, last_seen_at, expires_at, revoked_at FROM web_sessions WHERE id_hash = ?1",
        )?
        .query_row([hash.as_slice()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Timestamp>(1)?,
                r.get::<_, Timestamp>(2)?,
                r.get::<_, Timestamp>(3)?,
                r.get::<_, Option<Timestamp>>(4)?,
            ))
        })
        .optional()?;
    let Some((csrf, created_at, last_seen_at, expires_at, revoked_at)) = row else { return Ok(None) };
    if revoked_at.is_some() || now >= expires_at || now.saturating_sub(last_seen_at) >= limits.idle_secs {
        return Ok(None);
    }
    if now > last_seen_at {
        conn.prepare_cached("UPDATE web_sessions SET last_seen_at = ?2 WHERE id_hash = ?1")?
            .execute(params![hash.as_slice(), now])?;
    }
    Ok(Some(Session { csrf, created_at, expires_at }))
}

/// Signs out: the session is dead from now on. `false` when there was no live session to revoke.
pub fn revoke_session(conn: &Connection, now: Timestamp, secret: &str) -> Result<bool, DbError> {
    let hash = secrets::hash_secret(secret);
    let changed = conn
        .prepare_cached("UPDATE web_sessions SET revoked_at = ?2 WHERE id_hash = ?1 AND revoked_at IS NULL")?
        .execute(params![hash.as_slice(), now])?;
    Ok(changed > 0)
}

/// Sessions that are revoked or past either expiry open nothing: their rows go.
fn delete_dead(conn: &Connection, now: Timestamp, limits: SessionLimits) -> Result<usize, DbError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM web_sessions WHERE revoked_at IS NOT NULL OR expires_at <= ?1 OR last_seen_at <= ?2",
        )?
        .execute(params![now, now.saturating_sub(limits.idle_secs)])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::schema::migrations().to_latest(&mut conn).unwrap();
        conn
    }

    const LIMITS: SessionLimits = SessionLimits { idle_secs: 100, absolute_secs: 1000 };

    fn rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM web_sessions", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_session_lives_until_idle_absolute_expiry_or_sign_out() {
        let conn = db();
        let (secret, session) = create_session(&conn, 1000, LIMITS, Some("127.0.0.1"), Some("test"), None).unwrap();
        assert!(secret.starts_with(SESSION_PREFIX));
        assert_eq!(session.expires_at, 2000);
        // Only the hash is stored.
        let stored: Vec<u8> = conn.query_row("SELECT id_hash FROM web_sessions", [], |r| r.get(0)).unwrap();
        assert_ne!(stored, secret.as_bytes());
        assert_eq!(touch_session(&conn, 1050, LIMITS, &secret).unwrap(), Some(session.clone()));
        // Each request restarts the idle clock: 1149 is 99 s after the last one.
        assert!(touch_session(&conn, 1149, LIMITS, &secret).unwrap().is_some());
        // Idle for 100 s: dead, and it stays dead.
        assert_eq!(touch_session(&conn, 1249, LIMITS, &secret).unwrap(), None);
        assert_eq!(touch_session(&conn, 1250, LIMITS, &secret).unwrap(), None);

        // Busy all along, but past the absolute expiry.
        let (busy, _) = create_session(&conn, 5000, LIMITS, None, None, None).unwrap();
        for t in (5050..6000).step_by(50) {
            assert!(touch_session(&conn, t, LIMITS, &busy).unwrap().is_some(), "at {t}");
        }
        assert_eq!(touch_session(&conn, 6000, LIMITS, &busy).unwrap(), None);

        // Signed out.
        let (out, _) = create_session(&conn, 7000, LIMITS, None, None, None).unwrap();
        assert!(revoke_session(&conn, 7001, &out).unwrap());
        assert!(!revoke_session(&conn, 7002, &out).unwrap(), "revoked once");
        assert_eq!(touch_session(&conn, 7002, LIMITS, &out).unwrap(), None);
    }

    #[test]
    fn unknown_or_foreign_secrets_open_nothing_and_dead_rows_are_deleted() {
        let conn = db();
        let (secret, session) = create_session(&conn, 1000, LIMITS, None, None, None).unwrap();
        for other in ["", "rmweb_", "rmweb_x", &secret[SESSION_PREFIX.len()..], &session.csrf, "rmadm_whatever"] {
            assert_eq!(touch_session(&conn, 1001, LIMITS, other).unwrap(), None, "{other:?}");
        }
        let (revoked, _) = create_session(&conn, 1000, LIMITS, None, None, None).unwrap();
        revoke_session(&conn, 1001, &revoked).unwrap();
        assert_eq!(rows(&conn), 2);
        // The next sign-in deletes the revoked row and keeps the live one.
        create_session(&conn, 1002, LIMITS, None, None, None).unwrap();
        assert_eq!(rows(&conn), 2);
        // Much later every earlier session is idle: only the new one is left.
        create_session(&conn, 9000, LIMITS, None, None, None).unwrap();
        assert_eq!(rows(&conn), 1);
    }
}
