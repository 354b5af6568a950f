//! "Add hosts": create an enrollment token, show the exact install lines for this server (with the key pin when its
//! certificate is self-signed), then wait live for the first heartbeat of a host enrolled with that token.

use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use maud::{Markup, html};
use rm_fleet::NewToken;
use serde::Deserialize;

use super::PageError;
use super::layout::{self, Nav};
use super::session::WebUser;
use crate::auth::Peer;
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState, install_lines};

/// `GET /ui/hosts/add`
pub(crate) async fn form(user: WebUser) -> Response {
    let body = html! {
        h1 { "Add hosts" }
        (token_form(&user, &TokenForm::default(), None))
    };
    layout::page("Add hosts", Nav::AddHosts, &user, body).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct TokenForm {
    #[serde(default)]
    csrf: String,
    /// Empty: unlimited.
    #[serde(default)]
    uses: String,
    /// A duration (`24h`, `7d`); empty: never.
    #[serde(default)]
    expires: String,
    /// `key=value` pairs, separated by commas or new lines.
    #[serde(default)]
    labels: String,
    #[serde(default)]
    note: String,
}

impl Default for TokenForm {
    fn default() -> Self {
        TokenForm {
            csrf: String::new(),
            uses: "1".into(),
            expires: "24h".into(),
            labels: String::new(),
            note: String::new(),
        }
    }
}

impl TokenForm {
    fn validated(&self, now: rm_fleet::Timestamp) -> Result<NewToken, String> {
        let uses = match self.uses.trim() {
            "" => None,
            u => Some(u.parse::<u32>().map_err(|_| format!("uses: {u:?} is not a whole number (empty: unlimited)"))?),
        };
        let expires = match self.expires.trim() {
            "" => None,
            e => Some(humantime::parse_duration(e).map_err(|err| format!("expires: {e:?}: {err}"))?),
        };
        let mut labels = rm_fleet::Labels::new();
        for pair in self.labels.split([',', '\n']).map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("labels: {pair:?} is not key=value"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        NewToken::validated(uses, expires, self.note.trim().to_owned(), labels, now)
    }
}

fn token_form(user: &WebUser, values: &TokenForm, error: Option<&str>) -> Markup {
    html! {
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form.token method="post" action="/ui/hosts/add" {
            (layout::csrf_field(user))
            label { "Enrollments allowed" input type="number" name="uses" min="1" value=(values.uses)
                placeholder="unlimited"; }
            label { "Expires after" input type="text" name="expires" value=(values.expires) placeholder="never"; }
            label { "Labels" input type="text" name="labels" value=(values.labels) placeholder="env=prod, site=a"; }
            label { "Note" input type="text" name="note" value=(values.note) maxlength="256"; }
            button type="submit" { "Create enrollment token" }
        }
        p.hint { "Hosts enrolled with the token start with its labels, so plans that select them apply at once." }
    }
}

/// `POST /ui/hosts/add`: creates the token and shows it once, with the install lines.
pub(crate) async fn create(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    base: BaseUrl,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let now = rm_fleet::now();
    let new = match form.validated(now) {
        Ok(new) => new,
        Err(error) => {
            let body = html! { h1 { "Add hosts" } (token_form(&user, &form, Some(&error))) };
            let page = layout::page("Add hosts", Nav::AddHosts, &user, body);
            return Ok((http::StatusCode::BAD_REQUEST, page).into_response());
        }
    };
    let mut event = crate::routes::audit_event("web_token_created", peer, &headers);
    let (info, token) = state
        .fleet()
        .call(move |c| {
            let (info, token) = rm_fleet::create_token(c, now, &new)?;
            event.detail = Some(format!("enrollment token {}", info.id));
            rm_fleet::record_audit(c, &event)?;
            Ok((info, token))
        })
        .await?;
    let pin = state.tls().and_then(|c| c.bootstrap_pin());
    let url = base.0.filter(|u| install_lines::is_shell_safe(u));
    let shown_url = url.clone().unwrap_or_else(|| "https://SERVER".into());
    let linux = install_lines::linux(&shown_url, &token, pin.as_deref());
    let windows = install_lines::windows(&shown_url, &token);
    let uses = info.max_uses.map_or("unlimited enrollments".to_owned(), |m| format!("{m} enrollment(s)"));
    let expires = info.expires_at.map_or("never expires".to_owned(), |t| format!("expires {}", rm_fleet::rfc3339(t)));
    let body = html! {
        h1 { "Add hosts" }
        p.notice { "Enrollment token " code { (info.id) } " created: " (uses) ", " (expires) ". It is shown only now." }
        @if url.is_none() {
            p.error { "This server does not know the address hosts reach it under: replace SERVER, or set "
                code { "--public-url" } "." }
        }
        h2 { "Linux (as root)" }
        (copyable("install-linux", &linux))
        h2 { "Windows (elevated PowerShell)" }
        (copyable("install-windows", &windows))
        @if pin.is_some() {
            p.hint { "The certificate is self-signed: curl and the agent check its key against the pin. The Windows
                installer cannot pin a key, so trust the certificate on Windows hosts first." }
        }
        h2 { "First heartbeat" }
        (wait_block(&info.id, &[]))
    };
    Ok(layout::page("Add hosts", Nav::AddHosts, &user, body).into_response())
}

fn copyable(id: &str, line: &str) -> Markup {
    html! {
        div.copyable {
            pre id=(id) { code { (line) } }
            button type="button" class="copy" data-copy=(id) hidden { "Copy" }
        }
    }
}

/// Waits (polling every 2 s) until a host enrolled with the token sent its first heartbeat.
fn wait_block(token_id: &str, agents: &[rm_fleet::AgentRecord]) -> Markup {
    let connected: Vec<_> = agents.iter().filter(|a| a.heartbeats > 0).collect();
    let enrolled_only: Vec<_> = agents.iter().filter(|a| a.heartbeats == 0).collect();
    html! {
        @if connected.is_empty() {
            div #wait.waiting hx-get={ "/ui/hosts/add/" (token_id) "/wait" } hx-trigger="every 2s" hx-swap="outerHTML" {
                p { span.spinner {} "Waiting for the first heartbeat of a host enrolled with this token…" }
                @for a in &enrolled_only { p { "Enrolled: " span.hostname { (a.hostname) } ", waiting for its heartbeat." } }
                noscript { p { a href={ "/ui/hosts/add/" (token_id) "/wait" } { "Check again" } } }
            }
        } @else {
            div #wait.connected {
                @for a in &connected {
                    p { span class="dot good" {} "Connected: " span.hostname { (a.hostname) } " (" code { (a.id) } ", "
                        (a.os) "/" (a.arch) ", agent " (a.agent_version) ")." }
                }
                p { a href="/" { "See it in the fleet" } }
            }
        }
    }
}

/// `GET /ui/hosts/add/{token_id}/wait`: the waiting block, for htmx (or a reload without JavaScript).
pub(crate) async fn wait(
    user: WebUser,
    State(state): State<AppState>,
    headers: HeaderMap,
    token_id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, PageError> {
    let Path(token_id) = token_id?;
    if token_id.is_empty() || token_id.len() > 32 || !token_id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::InvalidRequest("not an enrollment token id".into()).into());
    }
    let lookup = token_id.clone();
    let agents = state.fleet().call(move |c| rm_fleet::agents::agents_enrolled_with(c, &lookup)).await?;
    let block = wait_block(&token_id, &agents);
    if headers.contains_key("hx-request") {
        return Ok(block.into_response());
    }
    Ok(layout::page("Add hosts", Nav::AddHosts, &user, html! { h1 { "Add hosts" } (block) }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_is_checked_field_by_field() {
        let form = |uses: &str, expires: &str, labels: &str| TokenForm {
            uses: uses.into(),
            expires: expires.into(),
            labels: labels.into(),
            ..Default::default()
        };
        let ok = form("3", "2h", "env=prod, site = a\nrole=db").validated(1000).unwrap();
        assert_eq!(ok.max_uses, Some(3));
        assert_eq!(ok.expires_at, Some(1000 + 7200));
        assert_eq!(ok.labels.len(), 3);
        assert_eq!(ok.labels["site"], "a");
        let unlimited = form("", "", "").validated(1000).unwrap();
        assert_eq!((unlimited.max_uses, unlimited.expires_at), (None, None));
        assert!(form("x", "", "").validated(0).unwrap_err().starts_with("uses:"));
        assert!(form("0", "", "").validated(0).is_err());
        assert!(form("1", "soon", "").validated(0).unwrap_err().starts_with("expires:"));
        assert!(form("1", "", "novalue").validated(0).unwrap_err().starts_with("labels:"));
    }
}
