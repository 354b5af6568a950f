//! Fleet state kept in `<DataDir>/restic-manager.db`: enrollment tokens, enrolled agents and the audit log, plus the
//! secrets that guard them. No HTTP here, and no API shapes: the functions take and return database rows; the
//! server turns them into the bodies of `rm_protocol::admin`.
//!
//! All database work runs on one dedicated thread ([`db::Db`]) that commits queued operations together (group commit):
//! the async runtime never blocks on SQLite, and an operation is acknowledged only after its transaction committed.
//!
//! One module per table: [`tokens`], [`agents`], [`audit`], [`repositories`] (whose secrets [`sealing`] encrypts),
//! [`plans`] (with the configuration revision and run-now requests), [`operations`] (operation reports, plan status,
//! snapshots, leases and backup health), [`restores`] (restore requests and snapshot lookups), [`maintenance`]
//! (prune/check policies, maintenance leases, repository health), [`notify`] (notification channels, rules,
//! transitions and the delivery queue); [`labels`] are the agents' labels.

pub mod agents;
pub mod audit;
pub mod db;
pub mod labels;
pub mod maintenance;
pub mod notify;
pub mod operations;
pub mod plans;
pub mod repositories;
pub mod restores;
pub mod rollouts;
pub mod schema;
pub mod sealing;
pub mod secrets;
pub mod sessions;
pub mod time;
pub mod tokens;
pub mod web_tokens;

pub use agents::{
    AgentRecord, Enrolled, Heartbeat, authenticate_agent, enroll, get_agent, heartbeat, list_agents, record_heartbeat,
    revoke_agent_credential, set_labels,
};
pub use audit::{AuditEvent, list_audit, probe_write, prune_audit, record_audit};
pub use db::{Db, DbError};
pub use labels::{Labels, validate_labels};
pub use maintenance::{MaintLease, repository_health, request_maintenance, take_maintenance_lease};
pub use operations::{
    IngestError, Lease, backup_health, get_operation, ingest_reports, list_operations, list_snapshots, release_lease,
    take_lease, take_lease_capped, worst_health,
};
pub use plans::{
    NewPlan, PlanInfo, PlanRefused, QueuedRun, bump_config_revision, config_revision, create_plan, delete_plan,
    get_plan, list_plans, plans_for_agent, queued_runs, request_run, update_plan,
};
pub use repositories::{
    NameTaken, NewRepository, RepositoryChanges, RepositoryInUse, RepositoryInfo, RepositorySecrets, create_repository,
    delete_repository, get_repository, list_repositories, repository_secrets, update_repository,
};
/// The connection type database operations receive.
pub use rusqlite::Connection;
pub use sealing::{KeyError, KeyOrigin, SecretKey, unlock};
pub use time::{Timestamp, now, rfc3339};
pub use tokens::{EnrollError, NewToken, TokenInfo, check_enrollment_token, create_token, list_tokens, revoke_token};
