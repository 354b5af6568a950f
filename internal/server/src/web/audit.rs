//! The audit page: newest first, 50 to a page, filtered by kind; "Older" pages on with the last id seen.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::PageError;
use super::layout::{self, Nav};
use super::session::WebUser;
use crate::{ApiError, AppState};

const PAGE: u32 = 50;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    before: String,
}

/// `GET /ui/audit`
pub(crate) async fn page(
    user: WebUser,
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PageError> {
    let Query(q) = query.map_err(ApiError::from)?;
    let kind = Some(q.kind.trim().to_owned()).filter(|k| !k.is_empty());
    let before = match q.before.trim() {
        "" => None,
        b => Some(b.parse::<i64>().map_err(|_| ApiError::InvalidRequest(format!("before: {b:?} is not an id")))?),
    };
    let filter = kind.clone();
    let events = state.fleet().call(move |c| rm_fleet::list_audit(c, filter.as_deref(), before, PAGE)).await?;
    let older = (events.len() == PAGE as usize).then(|| events.last().map(|e| e.id)).flatten().map(|id| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("kind", kind.as_deref().unwrap_or(""))
            .append_pair("before", &id.to_string())
            .finish()
    });
    let body = html! {
        h1 { "Audit" }
        form.filters method="get" action="/ui/audit" {
            label { "Kind " input type="text" name="kind" value=(q.kind) placeholder="e.g. enroll"; }
            button type="submit" { "Filter" }
        }
        @if events.is_empty() { p.empty { "No events." } } @else {
            table.audit {
                thead { tr { th { "When" } th { "Kind" } th { "Agent" } th { "From" } th { "Detail" } } }
                tbody {
                    @for e in &events {
                        tr {
                            td { (rm_fleet::rfc3339(e.at)) }
                            td { code { (e.kind) } }
                            td { (e.agent_id.as_deref().unwrap_or("")) }
                            td { (e.remote_addr.as_deref().unwrap_or("")) }
                            td {
                                (e.detail.as_deref().unwrap_or(""))
                                @if let Some(p) = &e.platform { " " (p) }
                                @if let Some(s) = &e.source { " (" (s) ")" }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(older) = older { p { a href={ "/ui/audit?" (older) } { "Older events" } } }
    };
    Ok(layout::page("Audit", Nav::Audit, &user, body).into_response())
}
