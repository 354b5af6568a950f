//! Sign-in, sessions and request checks of the web page.
//!
//! Signing in with the admin token (or a web token, [`rm_fleet::web_tokens`]) creates a server-side session ([`rm_fleet::sessions`]); the browser holds only its
//! random id, in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` when the page is served over https). A form that
//! changes state must carry the session's CSRF token and, when the browser says where it comes from (`Origin`,
//! `Sec-Fetch-Site`), come from this server's own origin. Sign-in attempts are limited per client address.

use std::time::Instant;

use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use headers::HeaderMapExt;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use maud::html;
use rm_fleet::sessions::{Session, SessionLimits};
use serde::Deserialize;

use super::{PageError, layout};
use crate::auth::Peer;
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState};

pub(crate) const COOKIE: &str = "rm_session";

/// A signed-in operator: handlers that take this argument answer only inside a live session. Without one, a page
/// redirects to the sign-in page (and back afterwards); an htmx request is told to load the sign-in page.
pub(crate) struct WebUser {
    pub secret: String,
    pub session: Session,
}

impl WebUser {
    /// Refuses a state-changing request that is not this session's own: a missing or wrong CSRF token, or a browser
    /// that says the form came from another site.
    pub fn check_form(&self, csrf: &str, parts: &HeaderMap, state: &AppState) -> Result<(), PageError> {
        same_origin(parts, state)?;
        if !rm_fleet::secrets::verify(csrf, &rm_fleet::secrets::hash_secret(&self.session.csrf)) {
            return Err(forbidden("csrf_mismatch", "the form is out of date or was not sent by this page: reload it"));
        }
        Ok(())
    }
}

fn limits(state: &AppState) -> SessionLimits {
    let s = state.settings();
    SessionLimits {
        idle_secs: s.web_session_idle.as_secs().max(1) as i64,
        absolute_secs: s.web_session_max.as_secs().max(1) as i64,
    }
}

fn cookie_secret(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.typed_get::<headers::Cookie>()?;
    cookies.get(COOKIE).map(str::to_owned)
}

impl FromRequestParts<AppState> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let secret = cookie_secret(&parts.headers);
        let session = match secret.clone() {
            Some(secret) => {
                let limits = limits(state);
                state
                    .fleet()
                    .call(move |c| rm_fleet::sessions::touch_session(c, rm_fleet::now(), limits, &secret))
                    .await
                    .map_err(|e| PageError::from(e).into_response())?
            }
            None => None,
        };
        match (secret, session) {
            (Some(secret), Some(session)) => Ok(WebUser { secret, session }),
            _ => Err(sign_in_first(parts)),
        }
    }
}

/// Where a request without a live session goes.
fn sign_in_first(parts: &Parts) -> Response {
    if parts.headers.contains_key("hx-request") {
        // htmx swaps what it gets; this header makes it load the sign-in page instead.
        return (StatusCode::UNAUTHORIZED, [("hx-redirect", "/ui/login")], "signed out").into_response();
    }
    let next = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let query = form_urlencoded::Serializer::new(String::new()).append_pair("next", next).finish();
    Redirect::to(&format!("/ui/login?{query}")).into_response()
}

/// A local path to return to after sign-in: one that starts with a single `/` (never `//host` or `/\host`, which
/// browsers take for another site).
fn local_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.starts_with("/\\") && !n.contains(['\r', '\n']) => {
            n
        }
        _ => "/",
    }
}

fn forbidden(code: &'static str, message: &str) -> PageError {
    PageError(ApiError::refused(StatusCode::FORBIDDEN, code, message))
}

/// Refuses a request the browser says came from elsewhere: `Sec-Fetch-Site` other than `same-origin` (or `none`, a
/// typed URL), or an `Origin` whose host is neither the request's `Host` nor the configured public URL's.
fn same_origin(headers: &HeaderMap, state: &AppState) -> Result<(), PageError> {
    const REFUSED: &str = "this form was sent from another site; open the page on this server and submit it there";
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(forbidden("cross_site_request", REFUSED));
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/').to_ascii_lowercase());
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_ascii_lowercase);
    let public = state
        .public_url()
        .and_then(|u| u.as_str().split_once("://").map(|(_, rest)| rest.split('/').next().unwrap_or("").to_owned()));
    match origin_host {
        Some(o) if Some(&o) == host.as_ref() || Some(&o) == public.as_ref() => Ok(()),
        _ => Err(forbidden("cross_site_request", REFUSED)),
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct NextQuery {
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    signed_out: Option<String>,
}

/// `GET /ui/login`
pub(crate) async fn login_form(query: Result<Query<NextQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    // A malformed query is no reason to refuse the sign-in page: it returns to the fleet instead.
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let notice = q.signed_out.is_some().then_some("Signed out.");
    login_page(StatusCode::OK, local_next(q.next.as_deref()), notice, None)
}

fn login_page(status: StatusCode, next: &str, notice: Option<&str>, error: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(notice) = notice { p.notice { (notice) } }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form.signin method="post" action="/ui/login" {
            input type="hidden" name="next" value=(next);
            label for="token" { "Admin or web token" }
            input #token type="password" name="token" autocomplete="current-password" required autofocus;
            button type="submit" { "Sign in" }
        }
        p.hint {
            "The admin token is in " code { "<data-dir>/admin.token" } " unless the server was started with "
            code { "RM_ADMIN_TOKEN" } ". " code { "restic-manager-server web-token create" } " makes a web token."
        }
    };
    (status, layout::bare("Sign in", body)).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

/// `POST /ui/login`: the admin token or a live web token opens a session; wrong tokens are counted per address.
pub(crate) async fn login(
    State(state): State<AppState>,
    Peer(peer): Peer,
    base: BaseUrl,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    same_origin(&headers, &state)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let next = local_next(form.next.as_deref()).to_owned();
    let addr = peer.map(|p| p.ip());
    if let Err(wait) = state.sign_ins().check(addr, Instant::now()) {
        let secs = wait.as_secs().max(1);
        return Err(PageError(
            ApiError::refused(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sign_ins",
                format!("too many failed sign-ins from this address; try again in {secs} s"),
            )
            .with("retry_after_secs", secs),
        ));
    }
    let mut event = crate::routes::audit_event("web_sign_in", peer, &headers);
    let token = form.token.trim().to_owned();
    // The admin token, or a live web token (`restic-manager-server web-token create`): which one is audited, never
    // the secret.
    let signed_in_with = if state.admin_token().verify(&token) {
        Some(None)
    } else {
        state
            .fleet()
            .call(move |c| rm_fleet::web_tokens::verify_web_token(c, rm_fleet::now(), &token))
            .await?
            .map(|info| Some(info.id))
    };
    let Some(web_token_id) = signed_in_with else {
        state.sign_ins().fail(addr, Instant::now());
        event.kind = "web_sign_in_refused".into();
        state.fleet().call(move |c| rm_fleet::record_audit(c, &event)).await?;
        tracing::warn!(peer = %addr.map(|a| a.to_string()).unwrap_or_default(), "web sign-in refused: wrong token");
        return Ok(login_page(
            StatusCode::UNAUTHORIZED,
            &next,
            None,
            Some("That is not the admin token or a live web token."),
        ));
    };
    event.detail = Some(match &web_token_id {
        None => "admin token".to_owned(),
        Some(id) => format!("web token {id}"),
    });
    state.sign_ins().succeed(addr);
    let limits = limits(&state);
    let (remote, agent) = (event.remote_addr.clone(), event.user_agent.clone());
    let (secret, session) = state
        .fleet()
        .call(move |c| {
            rm_fleet::record_audit(c, &event)?;
            rm_fleet::sessions::create_session(
                c,
                rm_fleet::now(),
                limits,
                remote.as_deref(),
                agent.as_deref(),
                web_token_id.as_deref(),
            )
        })
        .await?;
    let secure = is_https(&state, &base);
    let max_age = (session.expires_at - session.created_at).max(0);
    let cookie = format!(
        "{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    let mut response = Redirect::to(&next).into_response();
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("cookie is ASCII"));
    Ok(response)
}

/// Whether the browser reached this page over https (the server's own TLS, or what a trusted proxy or the configured
/// public URL says).
fn is_https(state: &AppState, base: &BaseUrl) -> bool {
    state.tls().is_some() || base.0.as_deref().is_some_and(|b| b.starts_with("https://"))
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// `POST /ui/logout`: the session is revoked on the server and the cookie cleared.
pub(crate) async fn logout(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let event = crate::routes::audit_event("web_sign_out", peer, &headers);
    let secret = user.secret.clone();
    state
        .fleet()
        .call(move |c| {
            rm_fleet::sessions::revoke_session(c, rm_fleet::now(), &secret)?;
            rm_fleet::record_audit(c, &event)
        })
        .await?;
    let mut response = Redirect::to("/ui/login?signed_out=1").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("rm_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(local_next(Some("/ui/audit?kind=x")), "/ui/audit?kind=x");
        for bad in [None, Some(""), Some("//evil.example/"), Some("/\\evil.example"), Some("https://evil.example/")] {
            assert_eq!(local_next(bad), "/", "{bad:?}");
        }
        assert_eq!(local_next(Some("/a\r\nSet-Cookie: x")), "/");
    }
}
