//! The host page (`GET /ui/hosts/{id}`): the host's facts, its credential (revoke), its plans with "Back up now", a
//! 30-day strip of its operations, the operations themselves (refreshing while any is queued or running), its
//! snapshots, and the restore form (`GET`/`POST /ui/hosts/{id}/restore`).

use std::collections::BTreeMap;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderMap, StatusCode};
use maud::{Markup, html};
use rm_protocol::admin::{AgentFilter, AgentView};
use rm_protocol::backup::{OperationQuery, OperationStatus, OperationView, PlanSnapshot};
use rm_protocol::restore::CreateRestore;
use serde::{Deserialize, Serialize};

use super::PageError;
use super::layout::{self, Nav};
use super::session::WebUser;
use crate::auth::Peer;
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState, catalog};

/// Operations shown in the table (the strip counts up to [`rm_fleet::operations::MAX_PAGE`] of the last 30 days).
const OPERATIONS_SHOWN: usize = 25;
const STRIP_DAYS: i64 = 30;
const DAY: i64 = 86_400;

type PathId = Result<Path<String>, axum::extract::rejection::PathRejection>;

fn agent_id(path: PathId) -> Result<String, PageError> {
    let Path(id) = path?;
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()) {
        return Err(ApiError::NotFound("agent".into()).into());
    }
    Ok(id)
}

/// The host as the fleet view shows it, or a 404.
async fn host_view(state: &AppState, base: BaseUrl, id: &str) -> Result<AgentView, PageError> {
    let list = catalog::fleet_view_now(state, base.or_relative(), &AgentFilter::default()).await?;
    list.agents
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("agent {:?}", id.chars().take(64).collect::<String>())).into())
}

/// A serde enum's wire name (`"backup"`, `"schedule"`).
fn wire<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct HostQuery {
    /// An operation just queued from this page (shown as a notice).
    #[serde(default)]
    queued: String,
    #[serde(default)]
    revoked: String,
}

/// `GET /ui/hosts/{id}`
pub(crate) async fn page(
    user: WebUser,
    State(state): State<AppState>,
    base: BaseUrl,
    path: PathId,
    query: Result<Query<HostQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PageError> {
    let id = agent_id(path)?;
    let Query(query) = query.map_err(ApiError::from)?;
    let host = host_view(&state, base, &id).await?;
    let lookup = id.clone();
    let since = rm_fleet::now() - STRIP_DAYS * DAY;
    let (operations, snapshots) = state
        .fleet()
        .call(move |c| {
            let q = OperationQuery {
                agent: Some(lookup.clone()),
                limit: Some(rm_fleet::operations::MAX_PAGE),
                ..Default::default()
            };
            let (ops, _) = rm_fleet::list_operations(c, &q)?;
            Ok((ops, rm_fleet::list_snapshots(c, &lookup)?.unwrap_or_default()))
        })
        .await?;
    let recent: Vec<&OperationView> = operations.iter().filter(|o| o.created_at >= since).collect();
    let body = html! {
        h1 { "Host " span.hostname { (host.hostname) } }
        @if !query.queued.is_empty() {
            p.notice { "Queued: operation " code { (query.queued) } ". It appears below as the agent takes it." }
        }
        @if !query.revoked.is_empty() { p.notice { "The credential is revoked: this agent is refused from now on." } }
        (facts(&host))
        h2 { "Backups" }
        (plans(&user, &host))
        h2 { "Last 30 days" }
        (strip(&recent, rm_fleet::now()))
        h2 { "Operations" }
        (operations_block(&id, &operations))
        h2 { "Snapshots" }
        (snapshots_table(&id, &snapshots))
        h2 { "Credential" }
        (credential(&user, &host))
    };
    Ok(layout::page(&host.hostname, Nav::Fleet, &user, body).into_response())
}

fn facts(host: &AgentView) -> Markup {
    let restic = host.restic.as_ref();
    html! {
        dl.facts {
            dt { "Agent id" } dd { code { (host.id) } }
            dt { "Platform" } dd { (host.os) "/" (host.arch) }
            dt { "Agent" } dd { (host.agent_version) " (" (host.agent_commit) ") · " (host.state.as_str()) }
            @if let Some(error) = &host.last_update_error { dt { "Last update error" } dd.error { (error) } }
            dt { "Labels" } dd {
                @if host.labels.is_empty() { span.none { "none" } }
                @for (k, v) in &host.labels { span.label { (k) "=" (v) } " " }
            }
            dt { "Enrolled" } dd { (rm_fleet::rfc3339(host.enrolled_at)) }
            dt { "Last seen" } dd { (host.last_seen) " (" (layout::ago(rm_fleet::now() - host.last_seen_at)) ", "
                (host.heartbeats) " heartbeats)" }
            dt { "restic" } dd {
                @match restic.and_then(|r| r.version.as_deref()) {
                    Some(v) => { (v) }
                    None => span.none { "none reported" },
                }
                @if let Some(path) = restic.and_then(|r| r.path.as_deref()) { " at " code { (path) } }
                @if restic.is_some_and(|r| r.managed) { " (installed by restic-manager)" }
                @if let Some(served) = &host.restic_served { " · served: " (served) }
                @if let Some(e) = restic.and_then(|r| r.error.as_deref().or(r.install_error.as_deref())) {
                    br; span.error { (e) }
                }
            }
        }
    }
}

fn plans(user: &WebUser, host: &AgentView) -> Markup {
    html! {
        @if host.backups.is_empty() { p.empty { "No plan applies to this host." } } @else {
            table.plans {
                thead { tr { th { "Plan" } th { "Health" } th { "Last run" } th { "Last success" } th {} } }
                tbody {
                    @for plan in &host.backups {
                        tr data-plan=(plan.plan) {
                            td { (plan.plan) }
                            td { span class={ "health " (plan.health.as_str()) } { (plan.health.as_str()) } }
                            td {
                                @if let Some(run) = &plan.last_run {
                                    (run.status.as_str()) " · " (rm_fleet::rfc3339(run.finished_at.unwrap_or(run.created_at)))
                                    @if let Some(m) = &run.message { br; small.message { (m) } }
                                } @else { span.none { "never" } }
                            }
                            td { (plan.last_success_at.map(rm_fleet::rfc3339).unwrap_or_default()) }
                            td {
                                form.inline method="post" action={ "/ui/hosts/" (host.id) "/run" } {
                                    (layout::csrf_field(user))
                                    input type="hidden" name="plan" value=(plan.plan);
                                    button type="submit" disabled[host.credential_revoked_at.is_some()] { "Back up now" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The worst status of one day: failed (or cancelled) over warning over success; running or queued otherwise.
fn day_class(statuses: &[OperationStatus]) -> &'static str {
    use OperationStatus::*;
    if statuses.iter().any(|s| matches!(s, Failed | Cancelled)) {
        "failed"
    } else if statuses.contains(&Warning) {
        "warning"
    } else if statuses.contains(&Success) {
        "ok"
    } else if statuses.is_empty() {
        "none"
    } else {
        "running"
    }
}

/// One cell per UTC day, oldest first, coloured by the day's worst operation; each says its counts on hover.
fn strip(operations: &[&OperationView], now: i64) -> Markup {
    let today = now.div_euclid(DAY);
    let mut days: BTreeMap<i64, Vec<OperationStatus>> = BTreeMap::new();
    for op in operations {
        days.entry(op.started_at.unwrap_or(op.created_at).div_euclid(DAY)).or_default().push(op.status);
    }
    html! {
        div.strip role="img" aria-label="Operations of the last 30 days, one cell per day" {
            @for day in (today - STRIP_DAYS + 1)..=today {
                @let statuses = days.get(&day).map(Vec::as_slice).unwrap_or(&[]);
                @let date = rm_fleet::rfc3339(day * DAY);
                @let title = day_title(&date[..10], statuses);
                span class={ "day " (day_class(statuses)) } title=(title) data-day=(&date[..10]) {}
            }
        }
    }
}

fn day_title(date: &str, statuses: &[OperationStatus]) -> String {
    if statuses.is_empty() {
        return format!("{date}: no operations");
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in statuses {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!("{date}: {}", parts.join(", "))
}

/// The newest operations; refreshes itself every 3 s while one of them is queued or running.
fn operations_block(agent_id: &str, operations: &[OperationView]) -> Markup {
    let shown = &operations[..operations.len().min(OPERATIONS_SHOWN)];
    let live = shown.iter().any(|o| matches!(o.status, OperationStatus::Queued | OperationStatus::Running));
    html! {
        div #operations hx-get=[live.then(|| format!("/ui/hosts/{agent_id}/operations"))]
            hx-trigger=[live.then_some("every 3s")] hx-swap="outerHTML" {
            @if shown.is_empty() { p.empty { "No operations yet." } } @else {
                table.operations {
                    thead { tr {
                        th { "Started" } th { "Kind" } th { "Plan" } th { "Trigger" } th { "Status" } th { "Duration" }
                        th { "Result" }
                    } }
                    tbody {
                        @for op in shown {
                            tr data-operation=(op.id) {
                                td { (rm_fleet::rfc3339(op.started_at.unwrap_or(op.created_at))) }
                                td { (wire(&op.kind)) }
                                td { (op.repository.as_deref().unwrap_or(&op.plan)) }
                                td { (wire(&op.trigger)) }
                                td { span class={ "status " (op.status.as_str()) } { (op.status.as_str()) } }
                                td { (op.duration_ms.map(|d| format!("{:.1} s", d as f64 / 1000.0)).unwrap_or_default()) }
                                td.result { (result(op)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn result(op: &OperationView) -> Markup {
    html! {
        @if let Some(p) = &op.progress && matches!(op.status, OperationStatus::Running) {
            progress max="1" value=(p.percent_done.clamp(0.0, 1.0)) {} " " (format!("{:.0} %", p.percent_done * 100.0))
        }
        @if let Some(s) = &op.summary {
            (s.files_new) " new, " (s.files_changed) " changed files; " (bytes(s.data_added)) " added"
            @if let Some(id) = &s.snapshot_id { " → " code { (id.chars().take(8).collect::<String>()) } }
        }
        @if let Some(r) = &op.restore {
            "into " code { (r.target) }
            @if let Some(b) = r.bytes { " (" (bytes(b)) ")" }
        }
        @if let Some(f) = &op.forget { (f.removed) " removed, " (f.kept) " kept" }
        @if let Some(m) = &op.message { br; small.message { (m) } }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// `GET /ui/hosts/{id}/operations`: the operations block, for htmx.
pub(crate) async fn operations(_: WebUser, State(state): State<AppState>, path: PathId) -> Result<Response, PageError> {
    let id = agent_id(path)?;
    let lookup = id.clone();
    let ops = state
        .fleet()
        .call(move |c| {
            let q = OperationQuery { agent: Some(lookup), limit: Some(OPERATIONS_SHOWN as u32), ..Default::default() };
            Ok(rm_fleet::list_operations(c, &q)?.0)
        })
        .await?;
    Ok(operations_block(&id, &ops).into_response())
}

fn snapshots_table(agent_id: &str, snapshots: &[PlanSnapshot]) -> Markup {
    html! {
        @if snapshots.is_empty() { p.empty { "No snapshots reported yet." } } @else {
            table.snapshots {
                thead { tr { th { "Time" } th { "Id" } th { "Plan" } th { "Paths" } th { "Tags" } th {} } }
                tbody {
                    @for s in snapshots {
                        tr data-snapshot=(s.snapshot.id) {
                            td { (s.snapshot.time) }
                            td { code { (s.snapshot.short_id) } }
                            td { (s.plan) }
                            td { @for p in &s.snapshot.paths { code { (p) } " " } }
                            td { @for t in &s.snapshot.tags { span.label { (t) } " " } }
                            td { a href={ "/ui/hosts/" (agent_id) "/restore?snapshot=" (s.snapshot.id) } { "Restore…" } }
                        }
                    }
                }
            }
        }
    }
}

fn credential(user: &WebUser, host: &AgentView) -> Markup {
    html! {
        @if let Some(at) = host.credential_revoked_at {
            p.error { "Revoked " (rm_fleet::rfc3339(at)) ". The host must enroll again to report." }
        } @else {
            p { "The agent authenticates with its own credential, made at enrollment. Revoking it refuses this agent from
                now on (its history stays); the host must enroll again with a new token." }
            form.revoke method="post" action={ "/ui/hosts/" (host.id) "/revoke" } {
                (layout::csrf_field(user))
                label.check { input type="checkbox" name="confirm" value="yes" required; " I want to revoke this host's credential" }
                button.danger type="submit" { "Revoke credential" }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct RunForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    plan: String,
}

/// `POST /ui/hosts/{id}/run`: "Back up now" for one plan; the agent is woken and takes it within a moment.
pub(crate) async fn run(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: PathId,
    form: Result<Form<RunForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    let id = agent_id(path)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let operation_id = crate::routes::plans::request_run(&state, peer, &headers, &form.plan, &id).await?;
    let query = form_urlencoded::Serializer::new(String::new()).append_pair("queued", &operation_id).finish();
    Ok(Redirect::to(&format!("/ui/hosts/{id}?{query}")).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct ConfirmForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: String,
}

/// `POST /ui/hosts/{id}/revoke`
pub(crate) async fn revoke(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: PathId,
    form: Result<Form<ConfirmForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    let id = agent_id(path)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    if form.confirm != "yes" {
        return Err(ApiError::InvalidRequest("tick the box to confirm the revocation".into()).into());
    }
    let event = crate::routes::audit_event("agent_revoked", peer, &headers);
    crate::routes::admin::revoke_agent(&state, event, &id).await?;
    Ok(Redirect::to(&format!("/ui/hosts/{id}?revoked=1")).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RestoreQuery {
    #[serde(default)]
    snapshot: String,
}

/// The restore form's fields, as typed.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RestoreForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    snapshot: String,
    /// Absolute paths inside the snapshot, one per line; empty: everything.
    #[serde(default)]
    include: String,
    /// Empty: a new directory under the agent's state dir.
    #[serde(default)]
    target: String,
    #[serde(default)]
    overwrite: Option<String>,
    /// The host to restore onto; empty: this one.
    #[serde(default)]
    onto: String,
}

impl RestoreForm {
    /// The API request (validated by the fleet layer, like the API's) and the host it goes to.
    fn request(&self, source: &str) -> (String, CreateRestore) {
        let onto = match self.onto.trim() {
            "" => source.to_owned(),
            o => o.to_owned(),
        };
        let include = self.include.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
        let target = Some(self.target.trim().to_owned()).filter(|t| !t.is_empty());
        let spec = CreateRestore {
            snapshot: self.snapshot.trim().to_owned(),
            include,
            target,
            overwrite: self.overwrite.is_some(),
            source_agent: (onto != source).then(|| source.to_owned()),
        };
        (onto, spec)
    }
}

/// `GET /ui/hosts/{id}/restore?snapshot=`
pub(crate) async fn restore_form(
    user: WebUser,
    State(state): State<AppState>,
    base: BaseUrl,
    path: PathId,
    query: Result<Query<RestoreQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PageError> {
    let id = agent_id(path)?;
    let Query(query) = query.map_err(ApiError::from)?;
    let values = RestoreForm { snapshot: query.snapshot, ..Default::default() };
    restore_page(&state, base, &user, &id, &values, None, StatusCode::OK).await
}

async fn restore_page(
    state: &AppState,
    base: BaseUrl,
    user: &WebUser,
    id: &str,
    values: &RestoreForm,
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response, PageError> {
    let list = catalog::fleet_view_now(state, base.or_relative(), &AgentFilter::default()).await?;
    let Some(host) = list.agents.iter().find(|a| a.id == id) else {
        return Err(ApiError::NotFound(format!("agent {:?}", id.chars().take(64).collect::<String>())).into());
    };
    let lookup = id.to_owned();
    let snapshots = state.fleet().call(move |c| Ok(rm_fleet::list_snapshots(c, &lookup)?.unwrap_or_default())).await?;
    let body = html! {
        h1 { "Restore from " span.hostname { (host.hostname) } }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form.restore method="post" action={ "/ui/hosts/" (id) "/restore" } {
            (layout::csrf_field(user))
            label { "Snapshot"
                select name="snapshot" required {
                    @for s in &snapshots {
                        option value=(s.snapshot.id) selected[s.snapshot.id == values.snapshot] {
                            (s.snapshot.time) " · " (s.snapshot.short_id) " · " (s.plan)
                        }
                    }
                }
            }
            label { "Paths to restore (one per line; empty: everything)"
                textarea name="include" rows="3" placeholder="/srv/data/important" { (values.include) } }
            label { "Target directory on the host (empty: a new directory under the agent's state dir)"
                input type="text" name="target" value=(values.target) placeholder="/srv/restore"; }
            label.check { input type="checkbox" name="overwrite" value="yes" checked[values.overwrite.is_some()];
                " Restore into a directory that already has files (overwrite)" }
            label { "Restore onto"
                select name="onto" {
                    option value="" { "this host (" (host.hostname) ")" }
                    @for other in list.agents.iter().filter(|a| a.id != id) {
                        option value=(other.id) selected[other.id == values.onto] { (other.hostname) " (" (other.id) ")" }
                    }
                }
            }
            button type="submit" { "Restore" }
        }
        p.hint { "Another host can restore only from a repository its own plans use." }
        p { a href={ "/ui/hosts/" (id) } { "Back to the host" } }
    };
    Ok((status, layout::page("Restore", Nav::Fleet, user, body)).into_response())
}

/// `POST /ui/hosts/{id}/restore`: queues the restore (validated as the API does) and shows the host it runs on.
pub(crate) async fn restore(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    base: BaseUrl,
    headers: HeaderMap,
    path: PathId,
    form: Result<Form<RestoreForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    let id = agent_id(path)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let (onto, spec) = form.request(&id);
    match crate::routes::restore::request(&state, peer, &headers, &onto, spec).await {
        Ok(operation_id) => {
            let query = form_urlencoded::Serializer::new(String::new()).append_pair("queued", &operation_id).finish();
            Ok(Redirect::to(&format!("/ui/hosts/{onto}?{query}")).into_response())
        }
        Err(e) => {
            let (status, body) = e.status_and_body();
            if status.is_client_error() {
                restore_page(&state, base, &user, &id, &form, Some(&body.message), status).await
            } else {
                Err(PageError(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_shows_its_worst_operation() {
        use OperationStatus::*;
        assert_eq!(day_class(&[]), "none");
        assert_eq!(day_class(&[Success, Success]), "ok");
        assert_eq!(day_class(&[Success, Warning]), "warning");
        assert_eq!(day_class(&[Warning, Failed, Success]), "failed");
        assert_eq!(day_class(&[Cancelled]), "failed");
        assert_eq!(day_class(&[Running]), "running");
        assert_eq!(day_title("2026-12-01", &[Success, Failed, Success]), "2026-12-01: 1 failed, 2 success");
    }

    #[test]
    fn the_restore_form_becomes_the_api_request() {
        let form = RestoreForm {
            snapshot: " abcdef12 ".into(),
            include: "/srv/a\n\n  /srv/b  \n".into(),
            target: "".into(),
            overwrite: Some("yes".into()),
            onto: "".into(),
            ..Default::default()
        };
        let (onto, spec) = form.request("host-a");
        assert_eq!(onto, "host-a");
        assert_eq!(spec.snapshot, "abcdef12");
        assert_eq!(spec.include, vec!["/srv/a", "/srv/b"]);
        assert_eq!((spec.target, spec.overwrite, spec.source_agent), (None, true, None));
        let other = RestoreForm { snapshot: "abcdef12".into(), onto: "host-b".into(), ..Default::default() };
        let (onto, spec) = other.request("host-a");
        assert_eq!((onto.as_str(), spec.source_agent.as_deref(), spec.overwrite), ("host-b", Some("host-a"), false));
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
