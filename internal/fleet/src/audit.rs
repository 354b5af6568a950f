//! The `audit_events` table: downloads, enrollments, uploads and deletions, paged newest first.

use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::time::Timestamp;

/// A row of `audit_events`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    conn.prepare_cached(
        "INSERT INTO audit_events (at, kind, remote_addr, user_agent, agent_id, platform, sha256, source, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        e.at,
        e.kind,
        e.remote_addr,
        e.user_agent,
        e.agent_id,
        e.platform,
        e.sha256,
        e.source,
        e.detail
    ])?;
    Ok(())
}

/// Most rows one retention step deletes: a large backlog is cut in steps, each its own short operation, so the
/// database thread never stalls heartbeats for long and a nearly full volume needs little WAL space at a time.
pub const PRUNE_STEP: u64 = 5_000;

/// One retention step: deletes up to [`PRUNE_STEP`] of the oldest events that are older than `cutoff` or beyond the
/// newest `max_events`. Returns how many were deleted; call again while it returns [`PRUNE_STEP`]. Freed pages are
/// reused by later inserts, so the file stops growing.
pub fn prune_audit(conn: &Connection, cutoff: Timestamp, max_events: u64) -> Result<u64, DbError> {
    // The oldest id kept by the count limit (everything below it goes); none when there are fewer events.
    let keep_from: Option<i64> = match max_events {
        0 => Some(i64::MAX),
        n => conn
            .prepare_cached("SELECT id FROM audit_events ORDER BY id DESC LIMIT 1 OFFSET ?1")?
            .query_row([i64::try_from(n - 1).unwrap_or(i64::MAX)], |r| r.get(0))
            .optional()?,
    };
    let deleted = conn
        .prepare_cached(
            "DELETE FROM audit_events WHERE id IN (
             SELECT id FROM audit_events WHERE at < ?1 OR id < ?2 ORDER BY id LIMIT ?3)",
        )?
        .execute(params![cutoff, keep_from.unwrap_or(i64::MIN), PRUNE_STEP as i64])?;
    Ok(deleted as u64)
}

/// Rewrites the probe row: fails (with [`DbError::Full`] on a full volume) when the database cannot write.
pub fn probe_write(conn: &Connection, now: Timestamp) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO write_probe (id, probed_at) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET probed_at = ?1",
    )?
    .execute([now])?;
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

    #[test]
    fn retention_deletes_by_age_then_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("f.db")).unwrap();
        db.call_blocking(|c| {
            for at in 0..100 {
                record_audit(c, &AuditEvent { at, kind: "download".into(), ..Default::default() })?;
            }
            assert_eq!(prune_audit(c, 10, 1000)?, 10, "older than the cutoff");
            assert_eq!(prune_audit(c, 10, 50)?, 40, "beyond the newest 50");
            assert_eq!(prune_audit(c, 10, 0)?, 50, "max 0 keeps nothing");
            for at in 50..100 {
                record_audit(c, &AuditEvent { at, kind: "download".into(), ..Default::default() })?;
            }
            let left = list_audit(c, None, None, 1000)?;
            assert_eq!((left.len(), left.first().unwrap().at, left.last().unwrap().at), (50, 99, 50));
            assert_eq!(prune_audit(c, 10, 50)?, 0);
            probe_write(c, 5)?;
            probe_write(c, 6)?;
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
