//! `GET /metrics`: the fleet's backups in the Prometheus (OpenMetrics) text format, built through `prometheus-client`
//! at scrape time from one database read (agents and backup health) and the catalog, so it never drifts from
//! `GET /api/v1/agents`. Needs the admin token unless the operator passed `--metrics-public`.
//!
//! Per agent and plan (labels `agent_id`, `hostname`, `plan`):
//! - `restic_manager_backup_last_success_timestamp_seconds`: Unix time of the last success or warning (absent if none);
//! - `restic_manager_backup_last_status{status=…}`: one series per final status (`success`, `warning`, `failed`,
//!   `cancelled`), 1 for the last run's and 0 for the others (all 0 before the first run), so an alert is
//!   `restic_manager_backup_last_status{status="failed"} == 1`;
//! - `restic_manager_backup_health{health=…}`: the same style over `ok`, `warning`, `failed`, `overdue`, `never`;
//! - `restic_manager_backup_bytes_added` and `restic_manager_backup_duration_seconds`: of the last finished run
//!   (absent before it).
//!
//! Fleet: `restic_manager_agents{state=…}` (every state, 0 included) and `restic_manager_agents_health{health=…}`
//! (agents by their worst plan; agents without plans are not counted), `restic_manager_agents_restic{drift=…}`
//! (every drift, 0 included: `current`, `behind`, `ahead`, `missing`, `unknown` against the served restic).
//!
//! Per repository (label `repository`): `restic_manager_repository_health{health=…}` (from its last check: `ok`,
//! `failed`, `never` …, one series per state as above) and `restic_manager_repository_last_maintenance_timestamp_
//! seconds{kind="prune"|"check"}`: Unix time of the last successful prune or check (absent if none).

use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::header;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rm_protocol::admin::{AgentFilter, AgentList, AgentState};
use rm_protocol::backup::{Health, OperationStatus};
use rm_protocol::restic_dist::ResticDrift;

use crate::auth::Admin;
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState, catalog};

/// The media type of what `prometheus_client::encoding::text` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;
type IntFamily = Family<Labels, Gauge>;
type FloatFamily = Family<Labels, Gauge<f64, AtomicU64>>;

const FINAL_STATUSES: [OperationStatus; 4] =
    [OperationStatus::Success, OperationStatus::Warning, OperationStatus::Failed, OperationStatus::Cancelled];

/// The exposition text for a fleet view.
pub fn render(view: &AgentList) -> String {
    let last_success = IntFamily::default();
    let last_status = IntFamily::default();
    let health = IntFamily::default();
    let bytes_added = IntFamily::default();
    let duration = FloatFamily::default();
    let agents = IntFamily::default();
    let agents_health = IntFamily::default();
    let repository_health = IntFamily::default();
    let last_maintenance = IntFamily::default();
    for repo in &view.repositories {
        for h in Health::ALL {
            let labels = vec![("repository", repo.repository.clone()), ("health", h.as_str().to_owned())];
            repository_health.get_or_create(&labels).set(i64::from(repo.health == h));
        }
        for (kind, at) in [("prune", repo.last_success_prune_at), ("check", repo.last_success_check_at)] {
            if let Some(at) = at {
                last_maintenance
                    .get_or_create(&vec![("repository", repo.repository.clone()), ("kind", kind.to_owned())])
                    .set(at);
            }
        }
    }
    for agent in &view.agents {
        for plan in &agent.backups {
            let labels: Labels =
                vec![("agent_id", agent.id.clone()), ("hostname", agent.hostname.clone()), ("plan", plan.plan.clone())];
            let with = |key: &'static str, value: &str| {
                let mut l = labels.clone();
                l.push((key, value.to_owned()));
                l
            };
            if let Some(at) = plan.last_success_at {
                last_success.get_or_create(&labels).set(at);
            }
            let last = plan.last_run.as_ref();
            for status in FINAL_STATUSES {
                let current = last.is_some_and(|r| r.status == status);
                last_status.get_or_create(&with("status", status.as_str())).set(i64::from(current));
            }
            for h in Health::ALL {
                health.get_or_create(&with("health", h.as_str())).set(i64::from(plan.health == h));
            }
            if let Some(run) = last {
                if let Some(summary) = &run.summary {
                    bytes_added.get_or_create(&labels).set(i64::try_from(summary.data_added).unwrap_or(i64::MAX));
                }
                let seconds = run
                    .duration_ms
                    .map(|ms| ms as f64 / 1000.0)
                    .or_else(|| run.summary.as_ref().map(|s| s.total_duration));
                if let Some(seconds) = seconds {
                    duration.get_or_create(&labels).set(seconds);
                }
            }
        }
    }
    for state in AgentState::ALL {
        let n = view.counts.get(&state).copied().unwrap_or(0);
        agents.get_or_create(&vec![("state", state.as_str().to_owned())]).set(n as i64);
    }
    for h in Health::ALL {
        let n = view.health_counts.get(&h).copied().unwrap_or(0);
        agents_health.get_or_create(&vec![("health", h.as_str().to_owned())]).set(n as i64);
    }
    let agents_restic = IntFamily::default();
    for drift in ResticDrift::ALL {
        let n = view.agents.iter().filter(|a| a.restic_drift == Some(drift)).count();
        agents_restic.get_or_create(&vec![("drift", drift.as_str().to_owned())]).set(n as i64);
    }
    let mut registry = Registry::default();
    registry.register(
        "restic_manager_backup_last_success_timestamp_seconds",
        "Unix time of the last successful (or warning) backup of a plan on a host",
        last_success,
    );
    registry.register(
        "restic_manager_backup_last_status",
        "1 for the status of the last finished backup of a plan on a host, 0 for the other statuses",
        last_status,
    );
    registry.register(
        "restic_manager_backup_health",
        "1 for the backup health of a plan on a host, 0 for the other states",
        health,
    );
    registry.register(
        "restic_manager_backup_bytes_added",
        "Bytes the last finished backup of a plan on a host added to the repository",
        bytes_added,
    );
    registry.register(
        "restic_manager_backup_duration_seconds",
        "Duration of the last finished backup of a plan on a host",
        duration,
    );
    registry.register("restic_manager_agents", "Enrolled agents by state", agents);
    registry.register(
        "restic_manager_repository_health",
        "1 for the maintenance health of a repository (from its last check), 0 for the other states",
        repository_health,
    );
    registry.register(
        "restic_manager_repository_last_maintenance_timestamp_seconds",
        "Unix time of the last successful prune or check of a repository",
        last_maintenance,
    );
    registry.register("restic_manager_agents_health", "Agents by backup health (their worst plan)", agents_health);
    registry.register(
        "restic_manager_agents_restic",
        "Agents by their restic against the one served for their platform (agents that never reported restic are not counted)",
        agents_restic,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// `GET /metrics`
pub async fn metrics(
    admin: Result<Admin, ApiError>,
    State(state): State<AppState>,
    base: BaseUrl,
) -> Result<Response, ApiError> {
    if !state.settings().metrics_public {
        admin?;
    }
    let view = catalog::fleet_view_now(&state, base.or_relative(), &AgentFilter::default()).await?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&view)).into_response())
}
