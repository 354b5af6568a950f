//! "Plans": what each plan backs up, where, when and on which hosts (agent ids and/or a label selector, "assign by
//! label"), with its retention; create, edit and delete through the API's own functions ([`crate::routes::plans`]),
//! so checks (`NewPlan::validated`) and audit events (`plan_created`, `plan_updated`, `plan_deleted`) are the API's.

use std::collections::BTreeMap;

use axum::Form;
use axum::extract::rejection::{FormRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderMap, StatusCode};
use maud::{Markup, html};
use rm_protocol::backup::{CreatePlan, PlanView, Timezone, UpdatePlan};
use rm_protocol::retention::Retention;
use serde::Deserialize;

use super::layout::{self, Nav};
use super::session::WebUser;
use super::{PageError, forms};
use crate::auth::Peer;
use crate::routes::plans as api;
use crate::{ApiError, AppState};

/// The create and edit form, as the browser sends it.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PlanForm {
    #[serde(default)]
    csrf: String,
    /// Create only (the edit page takes the name from the path).
    #[serde(default)]
    name: String,
    #[serde(default)]
    repository: String,
    /// One a line.
    #[serde(default)]
    paths: String,
    /// One a line.
    #[serde(default)]
    excludes: String,
    #[serde(default)]
    schedule: String,
    /// `utc` or `local`.
    #[serde(default)]
    timezone: String,
    /// Separated by commas or spaces.
    #[serde(default)]
    tags: String,
    #[serde(default)]
    one_file_system: Option<String>,
    #[serde(default)]
    exclude_caches: Option<String>,
    /// Agent ids, separated by commas or spaces.
    #[serde(default)]
    agents: String,
    /// `key=value` pairs, separated by commas or new lines.
    #[serde(default)]
    selector: String,
    /// Empty: the default (24h).
    #[serde(default)]
    timeout: String,
    /// Empty: the schedule's default.
    #[serde(default)]
    jitter: String,
    #[serde(default)]
    keep_last: String,
    #[serde(default)]
    keep_hourly: String,
    #[serde(default)]
    keep_daily: String,
    #[serde(default)]
    keep_weekly: String,
    #[serde(default)]
    keep_monthly: String,
    #[serde(default)]
    keep_yearly: String,
    #[serde(default)]
    keep_within: String,
    /// Separated by commas or spaces.
    #[serde(default)]
    keep_tag: String,
}

fn timezone(text: &str) -> Result<Timezone, String> {
    match text.trim() {
        "" | "utc" => Ok(Timezone::Utc),
        "local" => Ok(Timezone::Local),
        other => Err(format!("timezone: {:?} is neither utc nor local", other.chars().take(32).collect::<String>())),
    }
}

fn timezone_text(tz: Timezone) -> &'static str {
    match tz {
        Timezone::Utc => "utc",
        Timezone::Local => "local",
    }
}

impl PlanForm {
    /// The retention policy: `None` when no keep option is filled in (every snapshot is kept).
    fn retention(&self) -> Result<Option<Retention>, String> {
        let r = Retention {
            last: forms::count("retention.last", &self.keep_last)?,
            hourly: forms::count("retention.hourly", &self.keep_hourly)?,
            daily: forms::count("retention.daily", &self.keep_daily)?,
            weekly: forms::count("retention.weekly", &self.keep_weekly)?,
            monthly: forms::count("retention.monthly", &self.keep_monthly)?,
            yearly: forms::count("retention.yearly", &self.keep_yearly)?,
            within: forms::optional(&self.keep_within),
            keep_tag: forms::words(&self.keep_tag),
            unknown: BTreeMap::new(),
        };
        Ok((!r.keeps_nothing()).then_some(r))
    }

    /// The API's create body; the checks are the API's (`NewPlan::validated`).
    fn create(&self) -> Result<CreatePlan, String> {
        Ok(CreatePlan {
            name: self.name.trim().to_owned(),
            repository: self.repository.trim().to_owned(),
            paths: forms::lines(&self.paths),
            excludes: forms::lines(&self.excludes),
            schedule: self.schedule.trim().to_owned(),
            timezone: timezone(&self.timezone)?,
            tags: forms::words(&self.tags),
            one_file_system: forms::ticked(&self.one_file_system),
            exclude_caches: forms::ticked(&self.exclude_caches),
            agents: forms::words(&self.agents),
            selector: forms::pairs("selector", &self.selector)?,
            timeout: forms::optional(&self.timeout),
            jitter: forms::optional(&self.jitter),
            retention: self.retention()?,
        })
    }

    /// The API's update body: every field of the form replaces the stored one. An empty timeout is the default; an
    /// empty jitter, or the shown one with a new schedule, lets the server pick the schedule's default.
    fn changes(&self, current: &PlanView) -> Result<UpdatePlan, String> {
        let c = self.create()?;
        let schedule_changed = c.schedule != current.schedule;
        let jitter = c.jitter.filter(|j| !(schedule_changed && *j == forms::duration_text(current.jitter_secs)));
        let timeout = c.timeout.unwrap_or_else(|| forms::duration_text(rm_fleet::plans::DEFAULT_TIMEOUT.as_secs()));
        Ok(UpdatePlan {
            repository: Some(c.repository),
            paths: Some(c.paths),
            excludes: Some(c.excludes),
            schedule: Some(c.schedule),
            timezone: Some(c.timezone),
            tags: Some(c.tags),
            one_file_system: Some(c.one_file_system),
            exclude_caches: Some(c.exclude_caches),
            agents: Some(c.agents),
            selector: Some(c.selector),
            timeout: Some(timeout),
            jitter,
            retention: Some(c.retention),
        })
    }

    /// The form as the edit page first shows it.
    fn of(p: &PlanView) -> PlanForm {
        let r = p.retention.clone().unwrap_or_default();
        let n = |c: Option<u32>| c.map(|n| n.to_string()).unwrap_or_default();
        PlanForm {
            csrf: String::new(),
            name: p.name.clone(),
            repository: p.repository.clone(),
            paths: p.paths.join("\n"),
            excludes: p.excludes.join("\n"),
            schedule: p.schedule.clone(),
            timezone: timezone_text(p.timezone).into(),
            tags: p.tags.join(", "),
            one_file_system: p.one_file_system.then(String::new),
            exclude_caches: p.exclude_caches.then(String::new),
            agents: p.agents.join(", "),
            selector: forms::pairs_text(&p.selector),
            timeout: forms::duration_text(p.timeout_secs),
            jitter: forms::duration_text(p.jitter_secs),
            keep_last: n(r.last),
            keep_hourly: n(r.hourly),
            keep_daily: n(r.daily),
            keep_weekly: n(r.weekly),
            keep_monthly: n(r.monthly),
            keep_yearly: n(r.yearly),
            keep_within: r.within.unwrap_or_default(),
            keep_tag: r.keep_tag.join(", "),
        }
    }
}

/// Every plan, the hostnames of the agents, and the repositories' names.
async fn views(state: &AppState) -> Result<(Vec<PlanView>, BTreeMap<String, String>, Vec<String>), PageError> {
    Ok(state
        .fleet()
        .call(|c| {
            let repositories = rm_fleet::list_repositories(c)?.into_iter().map(|r| r.name).collect();
            Ok((api::plan_views(c)?, rm_fleet::plans::agent_hostnames(c)?, repositories))
        })
        .await?)
}

/// `GET /ui/plans`
pub(crate) async fn list(user: WebUser, State(state): State<AppState>) -> Result<Response, PageError> {
    let form = PlanForm { schedule: "@daily".into(), ..Default::default() };
    list_page(&user, &state, StatusCode::OK, &form, None).await
}

async fn list_page(
    user: &WebUser,
    state: &AppState,
    status: StatusCode,
    form: &PlanForm,
    error: Option<&str>,
) -> Result<Response, PageError> {
    let (plans, hosts, repositories) = views(state).await?;
    let body = html! {
        h1 { "Plans" }
        @if plans.is_empty() {
            p.empty { "No plans yet. A plan says what to back up, into which repository, when, and on which hosts." }
        } @else {
            table.plans {
                thead { tr {
                    th { "Name" } th { "Repository" } th { "Paths" } th { "Schedule" } th { "Hosts selected by" }
                    th { "Retention" } th { "Applies to" }
                } }
                tbody { @for p in &plans { (row(p, &hosts)) } }
            }
        }
        h2 #create { "New plan" }
        @if repositories.is_empty() {
            p.empty { "Define a " a href="/ui/repositories" { "repository" } " first: every plan backs up into one." }
        } @else {
            (plan_form(user, form, None, &repositories, error))
        }
    };
    Ok((status, layout::page("Plans", Nav::Plans, user, body)).into_response())
}

fn row(p: &PlanView, hosts: &BTreeMap<String, String>) -> Markup {
    html! {
        tr data-plan=(p.name) {
            td.name { a href={ "/ui/plans/" (p.name) } { (p.name) } }
            td { a href={ "/ui/repositories/" (p.repository) } { (p.repository) } }
            td.paths { @for path in &p.paths { code { (path) } br; } }
            td { code { (p.schedule) } " " small { (timezone_text(p.timezone)) } }
            td.selector {
                @for a in &p.agents { span.agent { code { (a) } } " " }
                @for (k, v) in &p.selector { span.label { (k) "=" (v) } " " }
                @if p.agents.is_empty() && p.selector.is_empty() { span.none { "no host" } }
            }
            td.retention {
                @match &p.retention { Some(r) => code { (r.describe()) }, None => span.none { "keep all" } }
            }
            td.applies {
                @if p.applies_to.is_empty() { span.none { "no host yet" } }
                @for id in &p.applies_to {
                    span.hostname title=(id) { (hosts.get(id).map_or(id.as_str(), String::as_str)) } " "
                }
                @for w in &p.warnings { br; small.error { (w) } }
            }
        }
    }
}

/// The create form (`current: None`) or the edit form of `current`.
fn plan_form(
    user: &WebUser,
    form: &PlanForm,
    current: Option<&PlanView>,
    repositories: &[String],
    error: Option<&str>,
) -> Markup {
    let action = match current {
        Some(p) => format!("/ui/plans/{}", p.name),
        None => "/ui/plans".to_owned(),
    };
    let keep = |name: &str, label: &str, value: &str| {
        html! { label.keep { (label) input type="number" min="1" name=(name) value=(value); } }
    };
    html! {
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form.edit.plan method="post" action=(action) {
            (layout::csrf_field(user))
            @if current.is_none() {
                label { "Name" input type="text" name="name" value=(form.name) required placeholder="etc-daily"; }
            }
            label { "Repository" select name="repository" {
                @for r in repositories { option value=(r) selected[*r == form.repository] { (r) } }
            } }
            label.wide { "Paths" textarea name="paths" rows="3" required placeholder="/etc" { (form.paths) }
                small { "One absolute path a line." } }
            label.wide { "Excludes" textarea name="excludes" rows="2" placeholder="*.tmp" { (form.excludes) }
                small { "One restic pattern a line." } }
            label { "Schedule" input type="text" name="schedule" value=(form.schedule) required
                placeholder="0 3 * * *, @daily, @every 6h"; }
            label { "Time zone" select name="timezone" {
                option value="utc" selected[form.timezone != "local"] { "utc" }
                option value="local" selected[form.timezone == "local"] { "the host's local time" }
            } }
            label.wide { "Hosts with these labels" input type="text" name="selector" value=(form.selector)
                placeholder="env=prod, role=db";
                small { "key=value pairs; a host must carry all of them." } }
            label.wide { "Hosts by id" input type="text" name="agents" value=(form.agents) placeholder="agent ids";
                small { "Also applies to these agents, whatever their labels." } }
            label { "Tags" input type="text" name="tags" value=(form.tags) placeholder="tag1, tag2"; }
            label { "Timeout" input type="text" name="timeout" value=(form.timeout) placeholder="24h"; }
            label { "Jitter" input type="text" name="jitter" value=(form.jitter) placeholder="the schedule's default"; }
            label.check { input type="checkbox" name="one_file_system" value="1"
                checked[forms::ticked(&form.one_file_system)]; "One file system" }
            label.check { input type="checkbox" name="exclude_caches" value="1"
                checked[forms::ticked(&form.exclude_caches)]; "Exclude caches" }
            fieldset.retention {
                legend { "Retention (empty: keep every snapshot)" }
                (keep("keep_last", "Last", &form.keep_last))
                (keep("keep_hourly", "Hourly", &form.keep_hourly))
                (keep("keep_daily", "Daily", &form.keep_daily))
                (keep("keep_weekly", "Weekly", &form.keep_weekly))
                (keep("keep_monthly", "Monthly", &form.keep_monthly))
                (keep("keep_yearly", "Yearly", &form.keep_yearly))
                label.keep { "Within" input type="text" name="keep_within" value=(form.keep_within) placeholder="7d"; }
                label.keep { "Tags" input type="text" name="keep_tag" value=(form.keep_tag); }
            }
            button type="submit" { (if current.is_some() { "Save" } else { "Create plan" }) }
        }
    }
}

/// `POST /ui/plans`
pub(crate) async fn create(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    form: Result<Form<PlanForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let outcome = match form.create() {
        Ok(spec) => api::create_plan(&state, peer, &headers, spec).await.map(drop).map_err(forms::fixable),
        Err(message) => Err(Ok((StatusCode::BAD_REQUEST, message))),
    };
    match outcome {
        Ok(()) => Ok(Redirect::to("/ui/plans").into_response()),
        Err(Ok((status, message))) => list_page(&user, &state, status, &form, Some(&message)).await,
        Err(Err(page)) => Err(page),
    }
}

/// `GET /ui/plans/{name}`
pub(crate) async fn edit(
    user: WebUser,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, PageError> {
    let name = api::name_param(path)?;
    let view = api::get_plan(&state, name).await?;
    edit_page(&user, &state, StatusCode::OK, &view, &PlanForm::of(&view), None).await
}

async fn edit_page(
    user: &WebUser,
    state: &AppState,
    status: StatusCode,
    view: &PlanView,
    form: &PlanForm,
    error: Option<&str>,
) -> Result<Response, PageError> {
    let (_, hosts, repositories) = views(state).await?;
    let title = format!("Plan {}", view.name);
    let body = html! {
        p.back { a href="/ui/plans" { "← Plans" } }
        h1 { "Plan " code { (view.name) } }
        p.hint {
            "Applies to: "
            @if view.applies_to.is_empty() { "no host yet." }
            @for id in &view.applies_to { span.hostname title=(id) { (hosts.get(id).map_or(id.as_str(), String::as_str)) } " " }
        }
        @for w in &view.warnings { p.error { (w) } }
        (plan_form(user, form, Some(view), &repositories, error))
        h2 { "Delete" }
        p.hint { "Deleting the plan stops its backups on every host and cancels its queued runs; the snapshots stay in the repository." }
        form.delete method="post" action={ "/ui/plans/" (view.name) "/delete" } {
            (layout::csrf_field(user))
            button.danger type="submit" { "Delete plan" }
        }
    };
    Ok((status, layout::page(&title, Nav::Plans, user, body)).into_response())
}

/// `POST /ui/plans/{name}`
pub(crate) async fn update(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<PlanForm>, FormRejection>,
) -> Result<Response, PageError> {
    let name = api::name_param(path)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let view = api::get_plan(&state, name.clone()).await?;
    let outcome = match form.changes(&view) {
        Ok(changes) => api::update_plan(&state, peer, &headers, name, changes).await.map(drop).map_err(forms::fixable),
        Err(message) => Err(Ok((StatusCode::BAD_REQUEST, message))),
    };
    match outcome {
        Ok(()) => Ok(Redirect::to("/ui/plans").into_response()),
        Err(Ok((status, message))) => edit_page(&user, &state, status, &view, &form, Some(&message)).await,
        Err(Err(page)) => Err(page),
    }
}

#[derive(Deserialize)]
pub(crate) struct DeleteForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/plans/{name}/delete`
pub(crate) async fn delete(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<DeleteForm>, FormRejection>,
) -> Result<Response, PageError> {
    let name = api::name_param(path)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    api::delete_plan(&state, peer, &headers, &name).await?;
    Ok(Redirect::to("/ui/plans").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form() -> PlanForm {
        PlanForm {
            name: " etc ".into(),
            repository: "main".into(),
            paths: "/etc\r\n\r\n  /srv/data \n".into(),
            excludes: "*.tmp\n".into(),
            schedule: " @daily ".into(),
            timezone: "local".into(),
            tags: "a, b c".into(),
            one_file_system: Some("1".into()),
            agents: "ag_1 ag_2".into(),
            selector: "env=prod,\nrole = db".into(),
            keep_daily: "7".into(),
            keep_tag: "keep".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_form_becomes_the_api_body() {
        let c = form().create().unwrap();
        assert_eq!((c.name.as_str(), c.schedule.as_str()), ("etc", "@daily"));
        assert_eq!(c.paths, ["/etc", "/srv/data"]);
        assert_eq!(c.excludes, ["*.tmp"]);
        assert_eq!(c.timezone, Timezone::Local);
        assert_eq!(c.tags, ["a", "b", "c"]);
        assert!(c.one_file_system && !c.exclude_caches);
        assert_eq!(c.agents, ["ag_1", "ag_2"]);
        assert_eq!(c.selector, BTreeMap::from([("env".into(), "prod".into()), ("role".into(), "db".into())]));
        assert_eq!((c.timeout, c.jitter), (None, None));
        let r = c.retention.unwrap();
        assert_eq!((r.daily, r.keep_tag), (Some(7), vec!["keep".to_string()]));
        let all = PlanForm { keep_daily: String::new(), keep_tag: String::new(), ..form() }.create().unwrap();
        assert_eq!(all.retention, None, "no keep option: keep every snapshot");
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = |f: PlanForm| f.create().unwrap_err();
        assert!(bad(PlanForm { selector: "env".into(), ..form() }).starts_with("selector:"));
        assert!(bad(PlanForm { keep_daily: "many".into(), ..form() }).starts_with("retention.daily:"));
        assert!(bad(PlanForm { timezone: "mars".into(), ..form() }).starts_with("timezone:"));
        // The checks themselves are the fleet's.
        let relative = PlanForm { paths: "etc".into(), ..form() }.create().unwrap();
        assert!(rm_fleet::NewPlan::validated(relative).unwrap_err().starts_with("paths:"));
    }

    #[test]
    fn an_edit_replaces_every_field_and_round_trips() {
        let spec = form().create().unwrap();
        let stored = rm_fleet::NewPlan::validated(spec).unwrap();
        let info = rm_fleet::PlanInfo { plan: stored, created_at: 0, updated_at: 0 };
        let view = crate::routes::plans::plan_view(info, &[], &BTreeMap::new());
        let shown = PlanForm::of(&view);
        assert_eq!(shown.selector, "env=prod, role=db");
        assert_eq!(shown.paths, "/etc\n/srv/data");
        let same = shown.changes(&view).unwrap();
        assert_eq!(same.selector.as_ref(), Some(&view.selector));
        assert_eq!(same.timeout.as_deref(), Some("1d"));
        assert_eq!(same.jitter.as_deref(), Some(forms::duration_text(view.jitter_secs).as_str()));
        // A new schedule with the jitter as shown takes the new schedule's default.
        let hourly = PlanForm { schedule: "@hourly".into(), ..shown.clone() }.changes(&view).unwrap();
        assert_eq!(hourly.jitter, None);
        let cleared = PlanForm { keep_daily: String::new(), keep_tag: String::new(), ..shown }.changes(&view).unwrap();
        assert_eq!(cleared.retention, Some(None));
    }
}
