//! Fleet state kept in `<DataDir>/restic-manager.db`: enrollment tokens, enrolled agents and the audit log, plus the
//! secrets that guard them. No HTTP here.
//!
//! All database work runs on one dedicated thread ([`db::Db`]) that commits queued operations together (group commit):
//! the async runtime never blocks on SQLite, and an operation is acknowledged only after its transaction committed.

pub mod db;
pub mod model;
pub mod schema;
pub mod secrets;

pub use db::{Db, DbError};
pub use model::*;
