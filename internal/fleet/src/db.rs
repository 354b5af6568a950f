//! The database thread.
//!
//! One connection, owned by one thread. Callers send closures; the thread takes every operation queued at that
//! moment, runs each inside its own savepoint of one `BEGIN IMMEDIATE` transaction, commits once, and only then
//! answers the callers. Many concurrent heartbeats therefore cost one commit, and an answer always means "on disk"
//! (WAL, `synchronous=NORMAL`: durable against a process crash such as SIGKILL; an OS crash may lose the last
//! commits, never corrupt the database). An operation that fails or panics rolls back to its savepoint without
//! touching the others.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::schema;

const QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "database {path} has schema version {found}, newer than this server supports ({supported}); \
         run the newer server version or restore a backup taken before the upgrade"
    )]
    TooNew { path: PathBuf, found: usize, supported: usize },
    #[error("the data volume is full: the database cannot write")]
    Full,
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("database operation failed: {0}")]
    Failed(String),
    #[error("the database thread has stopped")]
    Closed,
    #[error("the database queue is full")]
    Busy,
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) { DbError::Full } else { DbError::Sqlite(e) }
    }
}

impl DbError {
    /// The answer every operation of a batch gets when the batch's commit failed.
    fn commit_failed(e: &rusqlite::Error) -> DbError {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => DbError::Full,
            _ => DbError::Failed(format!("commit failed: {e}")),
        }
    }
}

type Reply = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// Handle to the database thread; cheap to clone.
#[derive(Clone)]
pub struct Db {
    tx: mpsc::Sender<Job>,
}

impl Db {
    /// Opens (creating if needed) and migrates the database, then starts its thread.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = open_connection(path)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        thread::Builder::new().name("rm-db".into()).spawn(move || writer(conn, rx)).map_err(|e| DbError::Open {
            path: path.into(),
            reason: format!("cannot start the database thread: {e}"),
        })?;
        Ok(Db { tx })
    }

    /// Runs `op` in the database thread and returns its result once committed.
    pub async fn call<T, F>(&self, op: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (job, rx) = job(op);
        self.tx.send(job).await.map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// The same from synchronous code (command-line tools); must not be called on an async runtime thread.
    pub fn call_blocking<T, F>(&self, op: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (job, rx) = job(op);
        self.tx.blocking_send(job).map_err(|_| DbError::Closed)?;
        rx.blocking_recv().map_err(|_| DbError::Closed)?
    }

    /// Queues `op` without waiting for it (audit records on the download path). Fails if the queue is full.
    pub fn submit<F>(&self, what: &'static str, op: F) -> Result<(), DbError>
    where
        F: FnOnce(&Connection) -> Result<(), DbError> + Send + 'static,
    {
        let (job, rx) = job(op);
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DbError::Busy,
            mpsc::error::TrySendError::Closed(_) => DbError::Closed,
        })?;
        tokio::spawn(async move {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "{what} was not recorded"),
                Err(_) => warn!("{what} was not recorded: database thread stopped"),
            }
        });
        Ok(())
    }
}

fn job<T, F>(op: F) -> (Job, oneshot::Receiver<Result<T, DbError>>)
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move |conn| {
        let changes_before = conn.total_changes();
        let result = catch_unwind(AssertUnwindSafe(|| op(conn)))
            .unwrap_or_else(|_| Err(DbError::Failed("the operation panicked".into())));
        // An operation that changed nothing does not depend on the commit: a failed commit (a full volume) must not
        // turn a read into an error.
        let wrote = conn.total_changes() != changes_before;
        let ok = result.is_ok();
        let reply: Reply = Box::new(move |commit_error| {
            let result = match commit_error {
                Some(e) if wrote => Err(DbError::commit_failed(e)),
                _ => result,
            };
            let _ = tx.send(result);
        });
        (ok, reply)
    });
    (job, rx)
}

fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let outcome = run_batch(&mut conn, batch, &mut replies);
        if let Err(e) = &outcome {
            // A full volume fails every batch until space is freed: say so once a minute, not per batch.
            let full = e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull);
            if !full || quiet_for(Duration::from_secs(60)) {
                error!(error = %e, operations = replies.len(), "database transaction failed");
            }
        }
        let commit_error = outcome.err();
        for reply in replies {
            reply(commit_error.as_ref());
        }
    }
}

/// True at most once per `period` (for log lines that would otherwise repeat per batch).
fn quiet_for(period: Duration) -> bool {
    use std::sync::Mutex;
    use std::time::Instant;
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_some_and(|t| t.elapsed() < period) {
        return false;
    }
    *last = Some(Instant::now());
    true
}

fn run_batch(conn: &mut Connection, batch: Vec<Job>, replies: &mut Vec<Reply>) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for job in batch {
        tx.prepare_cached("SAVEPOINT op")?.execute([])?;
        let (ok, reply) = job(&tx);
        replies.push(reply);
        if ok {
            tx.prepare_cached("RELEASE op")?.execute([])?;
        } else {
            tx.execute_batch("ROLLBACK TO op; RELEASE op")?;
        }
    }
    tx.commit()
}

/// The database holds audit data (addresses, host names) and secret hashes: owner-only, like the admin token.
/// SQLite gives its `-wal` and `-shm` files the database file's permissions.
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            warn!(path = %path.display(), "database file was readable by others; setting mode 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map(drop)
        }
        Err(e) => Err(e),
    }
}

fn open_connection(path: &Path) -> Result<Connection, DbError> {
    let fail = |reason: String| DbError::Open { path: path.to_path_buf(), reason };
    restrict_permissions(path).map_err(|e| {
        fail(format!(
            "cannot create or secure it: {e}; check that the directory exists and the server user can write it"
        ))
    })?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| fail(e.to_string()))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(|e| fail(e.to_string()))?;
    // Every statement is prepared once per connection (`prepare_cached`): parsing SQL was the largest cost of a
    // heartbeat. rusqlite keeps 16 by default, fewer than the statements one heartbeat runs.
    conn.set_prepared_statement_cache_capacity(256);
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(|e| fail(explain(&e)))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(fail(format!("cannot switch to WAL journal mode (got {mode})")));
    }
    conn.execute_batch("PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;").map_err(|e| fail(explain(&e)))?;
    let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0)).map_err(|e| fail(explain(&e)))?;
    if check != "ok" {
        return Err(fail(format!("integrity check failed: {check}; restore a backup")));
    }
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| fail(explain(&e)))?;
    let found = usize::try_from(found).unwrap_or(usize::MAX);
    if found > schema::latest_version() {
        return Err(DbError::TooNew { path: path.to_path_buf(), found, supported: schema::latest_version() });
    }
    schema::migrations().to_latest(&mut conn).map_err(|e| fail(format!("migration failed: {e}")))?;
    Ok(conn)
}

fn explain(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            "not a SQLite database (corrupt or a different file); restore a backup".into()
        }
        Some(rusqlite::ErrorCode::ReadOnly) | Some(rusqlite::ErrorCode::CannotOpen) => {
            format!("{e}: check that the server user can write the file and its directory")
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn a_read_in_a_batch_whose_commit_fails_still_answers() {
        // One batch, as the writer thread runs it; the commit fails (a deferred foreign key violated by the write,
        // standing in for a full volume).
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("t.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        let (write, mut write_rx) = job(|c| Ok(c.execute("INSERT INTO child VALUES (42)", [])?));
        let (read, mut read_rx) = job(|c| Ok(c.query_row("SELECT count(*) FROM parent", [], |r| r.get::<_, i64>(0))?));
        let mut replies = Vec::new();
        let outcome = run_batch(&mut conn, vec![write, read], &mut replies);
        let commit_error = outcome.expect_err("the batch's commit fails");
        for reply in replies {
            reply(Some(&commit_error));
        }
        assert!(write_rx.try_recv().unwrap().is_err(), "the write reports the failed commit");
        assert_eq!(read_rx.try_recv().unwrap().unwrap(), 0, "the read changed nothing and keeps its answer");
    }

    #[test]
    fn a_failed_operation_rolls_back_alone() {
        let (_dir, db) = temp_db();
        db.call_blocking(|c| Ok(c.execute_batch("CREATE TABLE t (v INTEGER)")?)).unwrap();
        let bad = db.call_blocking(|c| {
            c.execute("INSERT INTO t VALUES (1)", [])?;
            Err::<(), _>(DbError::Failed("refused".into()))
        });
        assert!(bad.is_err());
        let panicked = db.call_blocking(|c| -> Result<(), DbError> {
            c.execute("INSERT INTO t VALUES (2)", [])?;
            panic!("boom")
        });
        assert!(panicked.is_err());
        db.call_blocking(|c| Ok(c.execute("INSERT INTO t VALUES (3)", [])?)).unwrap();
        let rows: Vec<i64> = db
            .call_blocking(|c| {
                let mut s = c.prepare("SELECT v FROM t")?;
                Ok(s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
            })
            .unwrap();
        assert_eq!(rows, [3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_operations_all_commit() {
        let (_dir, db) = temp_db();
        db.call(|c| Ok(c.execute_batch("CREATE TABLE t (v INTEGER)")?)).await.unwrap();
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move { db.call(move |c| Ok(c.execute("INSERT INTO t VALUES (?1)", [i])?)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let n: i64 = db.call(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?)).await.unwrap();
        assert_eq!(n, 500);
    }

    #[test]
    fn migrates_from_every_earlier_version_and_refuses_newer() {
        let dir = tempfile::tempdir().unwrap();
        for start in 0..schema::latest_version() {
            let path = dir.path().join(format!("v{start}.db"));
            let mut conn = Connection::open(&path).unwrap();
            schema::migrations().to_version(&mut conn, start).unwrap();
            if start >= 1 {
                conn.execute(
                    "INSERT INTO agents (id, secret_hash, hostname, os, arch, agent_version, agent_commit, enrolled_at, last_seen_at)
                     VALUES ('a1', x'00', 'h', 'linux', 'amd64', '1', 'c', 1, 2)",
                    [],
                )
                .unwrap();
            }
            drop(conn);
            let db = Db::open(&path).unwrap();
            let (version, agents): (i64, i64) = db
                .call_blocking(|c| {
                    Ok((
                        c.query_row("PRAGMA user_version", [], |r| r.get(0))?,
                        c.query_row("SELECT count(*) FROM agents", [], |r| r.get(0))?,
                    ))
                })
                .unwrap();
            assert_eq!(version as usize, schema::latest_version(), "from v{start}");
            assert_eq!(agents, i64::from(start >= 1), "data kept from v{start}");
        }
        let newer = dir.path().join("newer.db");
        Connection::open(&newer).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
        let err = Db::open(&newer).err().unwrap().to_string();
        assert!(err.contains("schema version 99") && err.contains("newer than this server"), "{err}");
    }

    #[test]
    fn database_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, db) = temp_db();
        db.call_blocking(|c| Ok(c.execute_batch("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1)")?)).unwrap();
        for name in ["t.db", "t.db-wal", "t.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
        // An existing database with looser permissions is tightened.
        let loose = dir.path().join("loose.db");
        Connection::open(&loose).unwrap().execute_batch("CREATE TABLE x (v INTEGER)").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Db::open(&loose).unwrap());
        assert_eq!(std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn corrupt_and_unwritable_databases_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        let err = Db::open(&junk).err().unwrap().to_string();
        assert!(err.contains("not a SQLite database"), "{err}");
        let err = Db::open(&dir.path().join("missing-dir/x.db")).err().unwrap().to_string();
        assert!(err.contains("unable to open") || err.contains("check that"), "{err}");
    }
}
