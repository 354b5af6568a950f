//! The `enrollment_tokens` table: tokens an operator creates so hosts can enroll. The secret is shown once and
//! stored only as a hash.

use rm_protocol::admin::TokenStatus;
use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::labels::Labels;
use crate::secrets::{self, ENROLL_PREFIX};
use crate::time::Timestamp;

#[derive(Debug, Clone, Default)]
pub struct NewToken {
    pub max_uses: Option<u32>,
    pub expires_at: Option<Timestamp>,
    pub note: String,
    /// Labels every agent enrolled with the token starts with.
    pub labels: Labels,
}

impl NewToken {
    /// Checks operator-supplied options (API and command line alike).
    pub fn validated(
        uses: Option<u32>,
        expires_in: Option<std::time::Duration>,
        note: String,
        labels: Labels,
        now: Timestamp,
    ) -> Result<NewToken, String> {
        if uses == Some(0) {
            return Err("uses must be at least 1".into());
        }
        if note.len() > 256 || note.chars().any(rm_protocol::validate::is_unsafe_char) {
            return Err("note must be at most 256 printable characters".into());
        }
        let expires_at = match expires_in {
            None => None,
            Some(d) if d.is_zero() => return Err("expires must be a positive duration".into()),
            Some(d) => Some(now.saturating_add(i64::try_from(d.as_secs()).map_err(|_| "expires is too long")?)),
        };
        crate::labels::validate_labels("labels", &labels)?;
        Ok(NewToken { max_uses: uses, expires_at, note, labels })
    }
}

/// A row of `enrollment_tokens` (without the hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub note: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked_at: Option<Timestamp>,
    pub labels: Labels,
}

impl TokenInfo {
    pub fn status(&self, now: Timestamp) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if self.expires_at.is_some_and(|t| t <= now) {
            TokenStatus::Expired
        } else if self.max_uses.is_some_and(|m| self.uses >= m) {
            TokenStatus::UsedUp
        } else {
            TokenStatus::Active
        }
    }
}

/// Creates a token and returns it with its secret, which is shown once and stored only as a hash.
pub fn create_token(conn: &Connection, now: Timestamp, new: &NewToken) -> Result<(TokenInfo, String), DbError> {
    let id = secrets::random_id();
    let secret = format!("{ENROLL_PREFIX}{}", secrets::random_secret());
    conn.prepare_cached(
        "INSERT INTO enrollment_tokens (id, token_hash, note, created_at, expires_at, max_uses, labels)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id,
        secrets::hash_secret(&secret).as_slice(),
        new.note,
        now,
        new.expires_at,
        new.max_uses,
        crate::labels::to_json(&new.labels)
    ])?;
    let info = TokenInfo {
        id,
        note: new.note.clone(),
        created_at: now,
        expires_at: new.expires_at,
        max_uses: new.max_uses,
        uses: 0,
        revoked_at: None,
        labels: new.labels.clone(),
    };
    Ok((info, secret))
}

const TOKEN_COLUMNS: &str = "id, note, created_at, expires_at, max_uses, uses, revoked_at, labels";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.get(0)?,
        note: r.get(1)?,
        created_at: r.get(2)?,
        expires_at: r.get(3)?,
        max_uses: r.get(4)?,
        uses: r.get(5)?,
        revoked_at: r.get(6)?,
        labels: crate::labels::from_json(&r.get::<_, String>(7)?),
    })
}

pub fn list_tokens(conn: &Connection) -> Result<Vec<TokenInfo>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_at, id"))?;
    Ok(stmt.query_map([], token_row)?.collect::<Result<_, _>>()?)
}

/// Revokes a token; `Ok(None)` when there is no such token. Revoking twice keeps the first time.
pub fn revoke_token(conn: &Connection, now: Timestamp, id: &str) -> Result<Option<TokenInfo>, DbError> {
    conn.prepare_cached("UPDATE enrollment_tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1")?
        .execute(params![id, now])?;
    Ok(conn
        .query_row(&format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE id = ?1"), [id], token_row)
        .optional()?)
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
            |r| Ok((token_row(r)?, r.get(8)?)),
        )
        .optional()?;
    let Some((info, stored)) = row else { return Ok(Err(EnrollError::Unknown)) };
    if !secrets::verify(token, &stored) {
        return Ok(Err(EnrollError::Unknown));
    }
    Ok(match info.status(now) {
        TokenStatus::Revoked => Err(EnrollError::Revoked),
        TokenStatus::Expired => Err(EnrollError::Expired),
        TokenStatus::UsedUp => Err(EnrollError::UsedUp),
        TokenStatus::Active => Ok(info),
    })
}
