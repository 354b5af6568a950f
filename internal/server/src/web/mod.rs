//! The operator's web page: server-rendered HTML (maud, escaped by construction) on the same router, state and error
//! type as the API. Every read view works without JavaScript; the vendored htmx only refreshes parts of a page.
//! Pages need a signed-in session ([`session`]); every form that changes state carries the session's CSRF token and
//! must come from this server's own origin.

mod assets;
mod audit;
mod enroll;
mod fleet;
mod forms;
mod host;
mod layout;
mod plans;
mod repositories;
pub(crate) mod session;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};

use crate::{ApiError, AppState};

/// The vendored htmx (npm `htmx.org` 2.0.11, 0BSD, `static/htmx-LICENSE.txt`); the name carries the version, so it
/// is served as immutable.
const HTMX: &[u8] = include_bytes!("static/htmx-2.0.11.min.js");
const HTMX_PATH: &str = "/ui/static/htmx-2.0.11.min.js";
const STYLE: &[u8] = include_bytes!("static/style.css");
const APP_JS: &[u8] = include_bytes!("static/app.js");
/// Largest form body a page accepts.
const FORM_LIMIT: usize = 16 * 1024;

/// Every page and its partials.
pub(crate) fn routes(state: &AppState) -> Router<AppState> {
    use axum::extract::DefaultBodyLimit;
    use tower_http::timeout::TimeoutLayer;
    Router::new()
        .route("/", get(fleet::page))
        .route("/ui", get(|| async { Redirect::to("/") }))
        .route("/ui/fleet/table", get(fleet::table))
        .route("/ui/login", get(session::login_form).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/hosts/add", get(enroll::form).post(enroll::create))
        .route("/ui/hosts/add/{token_id}/wait", get(enroll::wait))
        // Host
        .route("/ui/hosts/{id}", get(host::page))
        .route("/ui/hosts/{id}/operations", get(host::operations))
        .route("/ui/hosts/{id}/run", post(host::run))
        .route("/ui/hosts/{id}/revoke", post(host::revoke))
        .route("/ui/hosts/{id}/restore", get(host::restore_form).post(host::restore))
        .route("/ui/audit", get(audit::page))
        // Repositories and plans
        .route("/ui/repositories", get(repositories::list).post(repositories::create))
        .route("/ui/repositories/{name}", get(repositories::edit).post(repositories::update))
        .route("/ui/repositories/{name}/delete", post(repositories::delete))
        .route("/ui/plans", get(plans::list).post(plans::create))
        .route("/ui/plans/{name}", get(plans::edit).post(plans::update))
        .route("/ui/plans/{name}/delete", post(plans::delete))
        .route("/ui/static/{name}", get(static_file))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.settings().api_timeout))
        // Assets. The page and removals are small forms like the others; an upload's body is bounded by the API's
        // upload limit (plus the multipart framing), not FORM_LIMIT, and, like the API's uploads, by no request
        // timeout (the connection's minimum body rate still applies).
        .merge(
            Router::new()
                .route("/ui/assets", get(assets::page))
                .route("/ui/assets/{kind}/{name}/delete", post(assets::delete))
                .layer(DefaultBodyLimit::max(FORM_LIMIT))
                .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.settings().api_timeout))
                .route("/ui/assets/{kind}", post(assets::upload_named_by_file))
                .route("/ui/assets/{kind}/{name}", post(assets::upload))
                .layer(DefaultBodyLimit::max(assets::upload_body_limit(state))),
        )
        .layer(axum::middleware::from_fn(security_headers))
}

/// No framing, no foreign scripts, styles or form targets, no caching of pages that show the fleet.
async fn security_headers(request: Request, next: Next) -> Response {
    let is_static = request.uri().path().starts_with("/ui/static/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !is_static {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// `GET /ui/static/{name}`: the stylesheet, the page script and htmx, from the binary.
async fn static_file(Path(name): Path<String>) -> Response {
    let (body, content_type, cache) = match name.as_str() {
        "style.css" => (STYLE, "text/css; charset=utf-8", "no-cache"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8", "no-cache"),
        _ if format!("/ui/static/{name}") == HTMX_PATH => {
            (HTMX, "text/javascript; charset=utf-8", "public, max-age=31536000, immutable")
        }
        _ => return PageError(ApiError::NotFound(format!("static file {:?}", truncate(&name, 64)))).into_response(),
    };
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, cache)], body).into_response()
}

/// An error on a page: the API's status and message, as HTML.
pub(crate) struct PageError(pub ApiError);

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, body) = self.0.status_and_body();
        let title = status.canonical_reason().unwrap_or("Error");
        let markup = layout::bare(
            title,
            maud::html! {
                h1 { (status.as_u16()) " " (title) }
                p.error { (body.message) }
                p { a href="/" { "Back to the fleet" } }
            },
        );
        let mut response = (status, markup).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS
            && let Some(secs) = body.details.get("retry_after_secs").and_then(|v| v.as_u64())
        {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// Failed sign-ins per client address (IPv6 per /64), a fixed window each: after [`SignInLimiter::MAX_FAILURES`]
/// failures, every attempt from that address (the right token too) is refused until the window ends. A map of
/// bounded size: when it is full, addresses it cannot hold share one entry.
#[derive(Default)]
pub struct SignInLimiter {
    windows: Mutex<HashMap<SignInLimiterKey, (Instant, u32)>>,
}

impl SignInLimiter {
    pub const MAX_FAILURES: u32 = 5;
    pub const WINDOW: Duration = Duration::from_secs(60);
    const MAX_ENTRIES: usize = 10_000;

    /// `Err(wait)` while `addr` may not try again.
    pub fn check(&self, addr: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let key = SignInLimiterKey::of(addr);
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let entry = windows.get(&key).or_else(|| windows.get(&SignInLimiterKey::Overflow));
        match entry {
            Some((start, failures)) if *failures >= Self::MAX_FAILURES && now < *start + Self::WINDOW => {
                Err(*start + Self::WINDOW - now)
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed attempt.
    pub fn fail(&self, addr: Option<IpAddr>, now: Instant) {
        let mut key = SignInLimiterKey::of(addr);
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if !windows.contains_key(&key) && windows.len() >= Self::MAX_ENTRIES {
            windows.retain(|_, (start, _)| now < *start + Self::WINDOW);
            if windows.len() >= Self::MAX_ENTRIES {
                key = SignInLimiterKey::Overflow;
            }
        }
        let entry = windows.entry(key).or_insert((now, 0));
        if now >= entry.0 + Self::WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }

    /// A successful sign-in clears the address's failures.
    pub fn succeed(&self, addr: Option<IpAddr>) {
        self.windows.lock().unwrap_or_else(|p| p.into_inner()).remove(&SignInLimiterKey::of(addr));
    }
}

/// What failed sign-ins are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SignInLimiterKey {
    V4(u32),
    /// The /64 network of an IPv6 address (one host can hold all of it).
    V6(u64),
    /// No address known (in-process tests), or the map is full.
    Overflow,
}

impl SignInLimiterKey {
    fn of(addr: Option<IpAddr>) -> SignInLimiterKey {
        match addr.map(|a| a.to_canonical()) {
            Some(IpAddr::V4(v4)) => SignInLimiterKey::V4(v4.into()),
            Some(IpAddr::V6(v6)) => SignInLimiterKey::V6((u128::from(v6) >> 64) as u64),
            None => SignInLimiterKey::Overflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_refuses_after_five_failures_until_the_window_ends() {
        let limiter = SignInLimiter::default();
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..SignInLimiter::MAX_FAILURES {
            assert!(limiter.check(a, t0).is_ok(), "attempt {i}");
            limiter.fail(a, t0);
        }
        let wait = limiter.check(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(limiter.check(b, t0).is_ok(), "another address is not limited");
        assert!(limiter.check(a, t0 + SignInLimiter::WINDOW).is_ok(), "the window ended");
        // A new window starts counting from zero.
        limiter.fail(a, t0 + SignInLimiter::WINDOW);
        assert!(limiter.check(a, t0 + SignInLimiter::WINDOW).is_ok());
        // Success clears the count.
        for _ in 0..4 {
            limiter.fail(b, t0);
        }
        limiter.succeed(b);
        limiter.fail(b, t0);
        assert!(limiter.check(b, t0).is_ok());
    }

    #[test]
    fn ipv6_addresses_of_one_64_share_a_window() {
        let limiter = SignInLimiter::default();
        let t0 = Instant::now();
        for i in 0..SignInLimiter::MAX_FAILURES {
            limiter.fail(Some(format!("2001:db8:1:2::{i:x}").parse().unwrap()), t0);
        }
        assert!(limiter.check(Some("2001:db8:1:2:ffff::1".parse().unwrap()), t0).is_err());
        assert!(limiter.check(Some("2001:db8:1:3::1".parse().unwrap()), t0).is_ok());
    }
}
