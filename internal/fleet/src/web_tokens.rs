//! The `web_tokens` table: sign-in tokens for the operator's page, made by `restic-manager-server web-token create`
//! so that people can sign in without the admin token. The secret is shown once and stored only as its hash; a token
//! may expire, and revoking it also ends every session it opened (`web_sessions.web_token_id`).

use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::secrets;
use crate::time::Timestamp;

/// What every web token starts with (so an operator, and a secret scanner, can tell what it is).
pub const WEB_TOKEN_PREFIX: &str = "rmwtk_";

/// The longest note.
pub const MAX_NOTE: usize = 256;

/// A row of `web_tokens` (without the hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebTokenInfo {
    pub id: String,
    pub note: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

impl WebTokenInfo {
    /// `active`, `expired` or `revoked`.
    pub fn status(&self, now: Timestamp) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else {
            "active"
        }
    }

    pub fn is_live(&self, now: Timestamp) -> bool {
        self.status(now) == "active"
    }
}

/// A web token to create, checked ([`NewWebToken::validated`]).
#[derive(Debug, Clone, Default)]
pub struct NewWebToken {
    pub note: String,
    pub expires_at: Option<Timestamp>,
}

impl NewWebToken {
    /// Checks operator-supplied options.
    pub fn validated(
        note: &str,
        expires_in: Option<std::time::Duration>,
        now: Timestamp,
    ) -> Result<NewWebToken, String> {
        if note.len() > MAX_NOTE || note.chars().any(rm_protocol::validate::is_unsafe_char) {
            return Err(format!("note must be at most {MAX_NOTE} printable characters"));
        }
        let expires_at = match expires_in {
            None => None,
            Some(d) if d.is_zero() => return Err("expires must be a positive duration".into()),
            Some(d) => Some(now.saturating_add(i64::try_from(d.as_secs()).map_err(|_| "expires is too long")?)),
        };
        Ok(NewWebToken { note: note.to_owned(), expires_at })
    }
}

/// Creates a web token: answered as (row, secret). The secret is never stored.
pub fn create_web_token(
    conn: &Connection,
    now: Timestamp,
    new: &NewWebToken,
) -> Result<(WebTokenInfo, String), DbError> {
    let secret = format!("{WEB_TOKEN_PREFIX}{}", secrets::random_secret());
    let info = WebTokenInfo {
        id: secrets::random_id(),
        note: new.note.clone(),
        created_at: now,
        expires_at: new.expires_at,
        revoked_at: None,
    };
    conn.prepare_cached(
        "INSERT INTO web_tokens (id, secret_hash, note, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![info.id, secrets::hash_secret(&secret).as_slice(), info.note, now, info.expires_at])?;
    Ok((info, secret))
}

const COLUMNS: &str = "id, note, created_at, expires_at, revoked_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WebTokenInfo> {
    Ok(WebTokenInfo {
        id: r.get(0)?,
        note: r.get(1)?,
        created_at: r.get(2)?,
        expires_at: r.get(3)?,
        revoked_at: r.get(4)?,
    })
}

/// Every web token, oldest first.
pub fn list_web_tokens(conn: &Connection) -> Result<Vec<WebTokenInfo>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM web_tokens ORDER BY created_at, id"))?;
    Ok(stmt.query_map([], row)?.collect::<Result<_, _>>()?)
}

/// Revokes a web token and ends the sessions it opened; `Ok(None)` when there is no such token. Revoking twice keeps
/// the first time. Answers the row and how many live sessions were ended. (Run it through [`crate::Db::call`], which
/// makes both writes one transaction.)
pub fn revoke_web_token(conn: &Connection, now: Timestamp, id: &str) -> Result<Option<(WebTokenInfo, usize)>, DbError> {
    conn.prepare_cached("UPDATE web_tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1")?
        .execute(params![id, now])?;
    let Some(info) =
        conn.query_row(&format!("SELECT {COLUMNS} FROM web_tokens WHERE id = ?1"), [id], row).optional()?
    else {
        return Ok(None);
    };
    let ended = conn
        .prepare_cached("UPDATE web_sessions SET revoked_at = ?2 WHERE web_token_id = ?1 AND revoked_at IS NULL")?
        .execute(params![id, now])?;
    Ok(Some((info, ended)))
}

/// The live web token `secret` is, if any (unknown, expired and revoked ones are `None`).
pub fn verify_web_token(conn: &Connection, now: Timestamp, secret: &str) -> Result<Option<WebTokenInfo>, DbError> {
    if !secret.starts_with(WEB_TOKEN_PREFIX) {
        return Ok(None);
    }
    let hash = secrets::hash_secret(secret);
    let info = conn
        .query_row(&format!("SELECT {COLUMNS} FROM web_tokens WHERE secret_hash = ?1"), [hash.as_slice()], row)
        .optional()?;
    Ok(info.filter(|i| i.is_live(now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::{SessionLimits, create_session, touch_session};

    fn make(conn: &Connection, now: Timestamp, note: &str, secs: Option<u64>) -> (WebTokenInfo, String) {
        let new = NewWebToken::validated(note, secs.map(std::time::Duration::from_secs), now).unwrap();
        create_web_token(conn, now, &new).unwrap()
    }

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::schema::migrations().to_latest(&mut conn).unwrap();
        conn
    }

    const LIMITS: SessionLimits = SessionLimits { idle_secs: 100, absolute_secs: 1000 };

    #[test]
    fn a_web_token_verifies_until_it_expires_or_is_revoked() {
        let conn = db();
        let (info, secret) = make(&conn, 1000, "alice", Some(60));
        assert!(secret.starts_with(WEB_TOKEN_PREFIX));
        assert_eq!(info.expires_at, Some(1060));
        // Only the hash is stored.
        let stored: Vec<u8> = conn.query_row("SELECT secret_hash FROM web_tokens", [], |r| r.get(0)).unwrap();
        assert_eq!(stored, secrets::hash_secret(&secret).to_vec());
        assert_eq!(verify_web_token(&conn, 1001, &secret).unwrap(), Some(info.clone()));
        assert_eq!(verify_web_token(&conn, 1060, &secret).unwrap(), None, "expired");
        assert_eq!(list_web_tokens(&conn).unwrap()[0].status(1060), "expired");

        let (other, other_secret) = make(&conn, 1000, "", None);
        for wrong in ["", WEB_TOKEN_PREFIX, "rmadm_x", &other_secret[WEB_TOKEN_PREFIX.len()..], &other.id] {
            assert_eq!(verify_web_token(&conn, 1001, wrong).unwrap(), None, "{wrong:?}");
        }
        assert!(verify_web_token(&conn, 5000, &other_secret).unwrap().is_some(), "no expiry");
        let (revoked, ended) = revoke_web_token(&conn, 5001, &other.id).unwrap().unwrap();
        assert_eq!((revoked.revoked_at, ended), (Some(5001), 0));
        assert_eq!(revoke_web_token(&conn, 5002, &other.id).unwrap().unwrap().0.revoked_at, Some(5001), "first time");
        assert_eq!(verify_web_token(&conn, 5003, &other_secret).unwrap(), None);
        assert_eq!(revoke_web_token(&conn, 5003, "nope").unwrap(), None);
        assert_eq!(list_web_tokens(&conn).unwrap().len(), 2);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(NewWebToken::validated(&"x".repeat(MAX_NOTE + 1), None, 1).is_err());
        assert!(NewWebToken::validated("a\u{1b}[31m", None, 1).is_err());
        assert!(NewWebToken::validated("", Some(std::time::Duration::ZERO), 1).is_err());
        assert!(NewWebToken::validated("laptop", Some(std::time::Duration::from_secs(5)), 1).is_ok());
    }

    #[test]
    fn revoking_a_web_token_ends_its_sessions_only() {
        let conn = db();
        let (info, _) = make(&conn, 1000, "", None);
        let (mine, _) = create_session(&conn, 1000, LIMITS, None, None, Some(&info.id)).unwrap();
        let (admin, _) = create_session(&conn, 1000, LIMITS, None, None, None).unwrap();
        assert!(touch_session(&conn, 1001, LIMITS, &mine).unwrap().is_some());
        let (_, ended) = revoke_web_token(&conn, 1002, &info.id).unwrap().unwrap();
        assert_eq!(ended, 1);
        assert_eq!(touch_session(&conn, 1003, LIMITS, &mine).unwrap(), None);
        assert!(touch_session(&conn, 1003, LIMITS, &admin).unwrap().is_some(), "the admin's session lives on");
    }

    #[test]
    fn a_session_ends_when_its_web_token_expires() {
        let conn = db();
        let (info, _) = make(&conn, 1000, "", Some(50));
        let (secret, session) = create_session(&conn, 1000, LIMITS, None, None, Some(&info.id)).unwrap();
        assert_eq!(session.expires_at, 1050, "capped by the token's expiry");
        assert!(touch_session(&conn, 1049, LIMITS, &secret).unwrap().is_some());
        assert_eq!(touch_session(&conn, 1050, LIMITS, &secret).unwrap(), None);
    }
}
