//! The fleet page (`GET /`): counts, then one row per host, filtered by state, backup health and label. The table
//! refreshes itself through htmx (`GET /ui/fleet/table` answers the same block); without JavaScript the filter form
//! and a reload do the same.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use rm_protocol::admin::{AgentFilter, AgentList, AgentState, AgentView};
use rm_protocol::backup::Health;
use rm_protocol::restic_dist::ResticDrift;
use serde::Deserialize;

use super::PageError;
use super::layout::{self, Nav};
use super::session::WebUser;
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState, catalog};

/// How often the table refreshes itself.
const REFRESH_SECS: u64 = 5;

/// The filter, as the form sends it: empty fields mean "any".
#[derive(Debug, Default, Deserialize)]
pub(crate) struct FleetQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    health: String,
    /// `key=value` or `key`.
    #[serde(default)]
    label: String,
}

struct Filter {
    api: AgentFilter,
    label: Option<(String, Option<String>)>,
}

impl FleetQuery {
    fn parse(&self) -> Result<Filter, ApiError> {
        let invalid = |e: String| ApiError::InvalidRequest(e);
        let state = match self.state.trim() {
            "" => None,
            s => Some(s.parse::<AgentState>().map_err(invalid)?),
        };
        let health = match self.health.trim() {
            "" => None,
            h => Some(h.parse::<Health>().map_err(invalid)?),
        };
        let label = match self.label.trim() {
            "" => None,
            l => match l.split_once('=') {
                Some((k, v)) => Some((k.trim().to_owned(), Some(v.trim().to_owned()))),
                None => Some((l.to_owned(), None)),
            },
        };
        Ok(Filter { api: AgentFilter { state, health }, label })
    }

    /// The query string that reproduces this filter (for the refresh URL).
    fn to_query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("state", &self.state)
            .append_pair("health", &self.health)
            .append_pair("label", &self.label)
            .finish()
    }
}

fn has_label(agent: &AgentView, label: &Option<(String, Option<String>)>) -> bool {
    match label {
        None => true,
        Some((key, None)) => agent.labels.contains_key(key),
        Some((key, Some(value))) => agent.labels.get(key) == Some(value),
    }
}

async fn view(state: &AppState, base: BaseUrl, query: &FleetQuery) -> Result<AgentList, PageError> {
    let filter = query.parse()?;
    let mut list = catalog::fleet_view_now(state, base.or_relative(), &filter.api).await?;
    list.agents.retain(|a| has_label(a, &filter.label));
    Ok(list)
}

/// `GET /`
pub(crate) async fn page(
    user: WebUser,
    State(state): State<AppState>,
    base: BaseUrl,
    query: Result<Query<FleetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PageError> {
    let Query(query) = query.map_err(ApiError::from)?;
    let list = view(&state, base, &query).await?;
    let body = html! {
        h1 { "Fleet" }
        (filter_form(&query))
        (block(&state, &list, &query))
    };
    Ok(layout::page("Fleet", Nav::Fleet, &user, body).into_response())
}

/// `GET /ui/fleet/table`: the counts and the table, for htmx to swap in.
pub(crate) async fn table(
    _: WebUser,
    State(state): State<AppState>,
    base: BaseUrl,
    query: Result<Query<FleetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PageError> {
    let Query(query) = query.map_err(ApiError::from)?;
    let list = view(&state, base, &query).await?;
    Ok(block(&state, &list, &query).into_response())
}

fn filter_form(query: &FleetQuery) -> Markup {
    let option = |value: &str, current: &str| {
        html! { option value=(value) selected[value == current] { (if value.is_empty() { "any" } else { value }) } }
    };
    html! {
        form.filters method="get" action="/" {
            label { "State " select name="state" {
                (option("", &query.state))
                @for s in AgentState::ALL { (option(s.as_str(), &query.state)) }
            } }
            label { "Backups " select name="health" {
                (option("", &query.health))
                @for h in Health::ALL { (option(h.as_str(), &query.health)) }
            } }
            label { "Label " input type="text" name="label" value=(query.label) placeholder="key=value"; }
            button type="submit" { "Filter" }
        }
    }
}

/// How recently a host reported, against the heartbeat interval: `reporting` within two intervals, `overdue` after
/// that, `stale` once the stale window passed.
fn last_seen(state: &AppState, agent: &AgentView, now: i64) -> (&'static str, String) {
    let age = now - agent.last_seen_at;
    let interval = state.settings().heartbeat_interval.as_secs() as i64;
    let word = if agent.state == AgentState::Stale || age >= state.settings().stale_after.as_secs() as i64 {
        "stale"
    } else if age > 2 * interval.max(1) {
        "overdue"
    } else {
        "reporting"
    };
    (word, layout::ago(age))
}

/// The dot of a row: the worst of the host's reporting and its backups.
fn dot(agent: &AgentView) -> &'static str {
    match (agent.state, agent.health) {
        (AgentState::Stale, _) | (_, Some(Health::Failed)) => "bad",
        (_, Some(Health::Warning | Health::Overdue)) | (AgentState::OutOfDate, _) => "warn",
        (_, Some(Health::Never)) | (AgentState::Unknown, _) => "unknown",
        _ => "good",
    }
}

fn count(list: &AgentList, state: AgentState) -> usize {
    list.counts.get(&state).copied().unwrap_or(0)
}

fn block(state: &AppState, list: &AgentList, query: &FleetQuery) -> Markup {
    let now = rm_fleet::now();
    let health = |h: Health| list.health_counts.get(&h).copied().unwrap_or(0);
    let total: usize = list.counts.values().sum();
    html! {
        div #fleet hx-get={ "/ui/fleet/table?" (query.to_query()) } hx-trigger={ "every " (REFRESH_SECS) "s" }
            hx-swap="outerHTML" {
            dl.counts {
                div { dt { "Hosts" } dd #count-hosts { (total) } }
                div { dt { "Current" } dd #count-current { (count(list, AgentState::Current)) } }
                div { dt { "Out of date" } dd #count-out-of-date { (count(list, AgentState::OutOfDate)) } }
                div { dt { "Stale" } dd #count-stale { (count(list, AgentState::Stale)) } }
                div.good { dt { "Backups ok" } dd #count-ok { (health(Health::Ok)) } }
                div.warn { dt { "Warning" } dd #count-warning { (health(Health::Warning)) } }
                div.bad { dt { "Failed" } dd #count-failed { (health(Health::Failed)) } }
                div.warn { dt { "Overdue" } dd #count-overdue { (health(Health::Overdue)) } }
            }
            @if list.agents.is_empty() {
                p.empty {
                    @if total == 0 { "No hosts yet. " a href="/ui/hosts/add" { "Add hosts" } " to enroll the first one." }
                    @else { "No host matches this filter." }
                }
            } @else {
                table.fleet {
                    thead { tr {
                        th { span.sr { "Status" } } th { "Host" } th { "Labels" } th { "Platform" } th { "Agent" }
                        th { "Last seen" } th { "Backups" } th { "restic" }
                    } }
                    tbody {
                        @for agent in &list.agents { (row(state, agent, now)) }
                    }
                }
            }
        }
    }
}

fn row(state: &AppState, agent: &AgentView, now: i64) -> Markup {
    let (seen, ago) = last_seen(state, agent, now);
    let agent_class = match agent.state {
        AgentState::Current => "current",
        AgentState::OutOfDate => "out-of-date",
        AgentState::Stale | AgentState::Unknown => "unknown",
    };
    html! {
        tr data-agent=(agent.id) {
            td { span class={ "dot " (dot(agent)) } title=(agent.state.as_str()) {} }
            td.host { a.hostname href={ "/ui/hosts/" (agent.id) } { (agent.hostname) } br; small.id { (agent.id) } }
            td.labels {
                @for (k, v) in &agent.labels { span.label { (k) "=" (v) } " " }
            }
            td { (agent.os) "/" (agent.arch) }
            td { span class={ "version " (agent_class) } title=(agent.state.as_str()) { (agent.agent_version) } }
            td { span class={ "seen " (seen) } { (seen) } " " small { (ago) } }
            td.plans {
                @if agent.backups.is_empty() { span.none { "no plan" } }
                @for plan in &agent.backups {
                    div.plan {
                        span class={ "health " (plan.health.as_str()) } title=[plan_title(plan)] {
                            (plan.plan) ": " (plan.health.as_str())
                        }
                        @if matches!(plan.health, Health::Failed | Health::Warning)
                            && let Some(message) = plan.last_run.as_ref().and_then(|r| r.message.as_deref())
                        {
                            " " small.message { (truncate_chars(message, 200)) }
                        }
                    }
                }
            }
            td { (restic(agent)) }
        }
    }
}

/// At most `max` characters of `text`, with an ellipsis when cut.
fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn plan_title(plan: &rm_protocol::backup::PlanHealth) -> Option<String> {
    let run = plan.last_run.as_ref()?;
    Some(match &run.message {
        Some(message) => format!("{}: {}", run.status.as_str(), message),
        None => run.status.as_str().to_owned(),
    })
}

fn restic(agent: &AgentView) -> Markup {
    let Some(info) = &agent.restic else { return html! { span.none { "not reported" } } };
    let drift = match agent.restic_drift {
        Some(ResticDrift::Current) => "current",
        Some(ResticDrift::Behind) => "out-of-date",
        Some(ResticDrift::Missing) => "missing",
        Some(ResticDrift::Ahead) | Some(ResticDrift::Unknown) | None => "unknown",
    };
    let served = agent.restic_served.as_deref().map(|v| format!("served: {v}"));
    html! {
        @match &info.version {
            Some(v) => span class={ "version " (drift) } title=[served] { (v) },
            None => span class="version missing" title=[info.error.clone()] { "none" },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_parses_or_names_what_is_wrong() {
        let q = FleetQuery { state: "stale".into(), health: "".into(), label: " env = prod ".into() };
        let f = q.parse().unwrap();
        assert_eq!(f.api.state, Some(AgentState::Stale));
        assert_eq!(f.api.health, None);
        assert_eq!(f.label, Some(("env".into(), Some("prod".into()))));
        let bad = FleetQuery { state: "<script>".into(), ..Default::default() };
        assert!(bad.parse().is_err());
        let bad = FleetQuery { health: "great".into(), ..Default::default() };
        assert!(bad.parse().is_err());
    }
}
