//! `GET`/`HEAD /install/{name}` answered without the router.
//!
//! Install scripts are the smallest and most frequent downloads, and on them axum's routing and middleware stack
//! (route lookup, the method router, two layers each boxing a future and cloning a service) cost about a quarter of
//! the server's CPU. The connection loop asks [`FastPath::claims`] first and, for a request it claims, runs
//! [`FastPath::serve`] instead of the router. That does exactly what the router would do for that request:
//! - the same handler body (`routes::assets::install_response`), with the same base URL;
//! - the access-log line, with the route `/install/{name}`;
//! - a panic becomes the JSON 500, as `CatchPanicLayer` makes it;
//! - what axum's method router does to every response: a `Content-Length` from an exact body size when none is
//!   set, and no body for `HEAD`.
//!
//! It claims only what needs no decoding or routing decision: `GET` or `HEAD`, a path of `/install/` and one
//! segment without `%`. Everything else (and every request when the download gate is on, which is a layer) goes to
//! the router. `tests::the_fast_path_answers_what_the_router_answers` holds the two to the same answers.

use std::panic::AssertUnwindSafe;
#[cfg(test)]
use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http::{HeaderValue, Method, header};
use http_body::Body as _;

use crate::access_log::Pending;
use crate::log_buffer::Route;
use crate::public_url::BaseUrl;
use crate::state::AppState;

pub(crate) const PREFIX: &str = "/install/";
pub(crate) const ROUTE: &str = "/install/{name}";

#[derive(Clone)]
pub(crate) struct FastPath {
    state: AppState,
    /// Tells this server's answers apart in the raw path's per-thread memo.
    id: u64,
    /// Requests the raw path answered from its memo and otherwise (what its tests check it did).
    #[cfg(test)]
    pub(crate) raw_answers: Arc<[std::sync::atomic::AtomicU64; 2]>,
}

impl FastPath {
    /// `None` when the download gate is on: gated downloads go through its layer on the router.
    pub(crate) fn new(state: &AppState) -> Option<FastPath> {
        (!state.settings().require_download_auth).then(|| FastPath {
            state: state.clone(),
            id: crate::raw_path::next_server_id(),
            #[cfg(test)]
            raw_answers: Default::default(),
        })
    }

    /// Whether [`FastPath::serve`] answers this request.
    pub(crate) fn claims<B>(request: &http::Request<B>) -> bool {
        (request.method() == Method::GET || request.method() == Method::HEAD) && Self::name(request.uri()).is_some()
    }

    /// The install file a claimed request names.
    pub(crate) fn name(uri: &http::Uri) -> Option<&str> {
        uri.path().strip_prefix(PREFIX).filter(|name| !name.is_empty() && !name.contains(['/', '%']))
    }

    /// The router's answer to a request [`FastPath::claims`], with its access-log line.
    pub(crate) async fn serve<B>(&self, request: http::Request<B>) -> Response {
        let pending = Pending::start(&request, Some(Route::Fixed(ROUTE)));
        let response = self.answer(request).await;
        match pending {
            Some(pending) => pending.finish(response),
            None => response,
        }
    }

    /// [`FastPath::serve`] without the access-log line (the caller writes it: `raw_path`).
    pub(crate) async fn answer<B>(&self, request: http::Request<B>) -> Response {
        let (mut parts, _) = request.into_parts();
        let answer = AssertUnwindSafe(async {
            let BaseUrl(base) =
                BaseUrl::from_request_parts(&mut parts, &self.state).await.unwrap_or_else(|n| match n {});
            let name = &parts.uri.path()[PREFIX.len()..];
            crate::routes::assets::install_response(&self.state, base, &parts.method, name, &parts.headers)
                .await
                .into_response()
        })
        .catch_unwind()
        .await;
        let mut response = answer.unwrap_or_else(crate::panic_as_json);
        if !response.headers().contains_key(header::CONTENT_LENGTH)
            && let Some(exact) = response.body().size_hint().exact()
        {
            response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(exact));
        }
        if parts.method == Method::HEAD {
            *response.body_mut() = Body::empty();
        }
        response
    }

    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// A state for the install-file tests (here and `raw_path`): a bundled template `install.sh`, and in the data dir a
/// 10,000-byte `notes.txt` and a `.hidden` file. Returns the temporary dir, the data dir and the state.
#[cfg(test)]
pub(crate) fn install_files() -> (tempfile::TempDir, std::path::PathBuf, AppState) {
    let tmp = tempfile::tempdir().unwrap();
    let (data, bundled) = (tmp.path().join("data"), tmp.path().join("bundled"));
    std::fs::create_dir_all(bundled.join("install")).unwrap();
    std::fs::create_dir_all(data.join("install")).unwrap();
    std::fs::write(bundled.join("install/install.sh"), "#!/bin/sh\nSERVER='__RM_SERVER_URL__'\necho hi\n").unwrap();
    std::fs::write(data.join("install/notes.txt"), vec![b'x'; 10_000]).unwrap();
    std::fs::write(data.join("install/.hidden"), "secret").unwrap();
    let state = AppState::new(crate::Config {
        data_dir: data.clone(),
        bundled_dir: bundled,
        public_url: None,
        admin_token: Some("test-admin-token-0123456789".into()),
        settings: crate::Settings::default(),
    })
    .unwrap();
    (tmp, data, state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn claims_only_plain_install_names_read_with_get_or_head() {
        let claimed = |method: Method, uri: &str| {
            FastPath::claims(&http::Request::builder().method(method).uri(uri).body(()).unwrap())
        };
        assert!(claimed(Method::GET, "/install/install.sh"));
        assert!(claimed(Method::HEAD, "/install/install.sh?x=1"));
        assert!(claimed(Method::GET, "/install/..")); // refused by the handler, as through the router
        for (method, uri) in [
            (Method::POST, "/install/install.sh"),
            (Method::DELETE, "/install/install.sh"),
            (Method::GET, "/install/"),
            (Method::GET, "/install"),
            (Method::GET, "/install/a/b"),
            (Method::GET, "/install/install%2esh"),
            (Method::GET, "//install/install.sh"),
            (Method::GET, "/agent/binary"),
        ] {
            assert!(!claimed(method.clone(), uri), "{method} {uri}");
        }
    }

    /// Every request the fast path claims gets the router's answer: status, headers (but `Date`) and body.
    #[tokio::test]
    async fn the_fast_path_answers_what_the_router_answers() {
        let (_tmp, _, state) = install_files();
        let fast = FastPath::new(&state).expect("no download gate");
        let router = crate::app(state);
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 40000));
        let etag = {
            let r = router.clone().oneshot(request(Method::GET, "/install/notes.txt", &[], peer)).await.unwrap();
            r.headers()[header::ETAG].to_str().unwrap().to_owned()
        };
        type Case<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (Method::GET, "/install/install.sh", vec![]),
            (Method::GET, "/install/install.sh", vec![("host", "rm.example.com:8443")]),
            (Method::HEAD, "/install/install.sh", vec![("host", "rm.example.com")]),
            (Method::GET, "/install/notes.txt", vec![]),
            (Method::HEAD, "/install/notes.txt", vec![]),
            (Method::GET, "/install/notes.txt?cache=bust", vec![]),
            (Method::GET, "/install/notes.txt", vec![("if-none-match", etag.as_str())]),
            (Method::HEAD, "/install/notes.txt", vec![("if-none-match", etag.as_str())]),
            (Method::GET, "/install/notes.txt", vec![("if-none-match", "\"other\"")]),
            (Method::GET, "/install/notes.txt", vec![("range", "bytes=10-19")]),
            (Method::GET, "/install/notes.txt", vec![("range", "bytes=20000-")]),
            (Method::GET, "/install/missing.sh", vec![]),
            (Method::HEAD, "/install/missing.sh", vec![]),
            (Method::GET, "/install/..", vec![]),
            (Method::GET, "/install/.hidden", vec![]),
            (Method::GET, "/install/a%20b", vec![]),
        ];
        let rendered =
            router.clone().oneshot(request(Method::GET, "/install/install.sh", &[("host", "rm.example.com")], peer));
        let rendered = body_of(rendered.await.unwrap()).await;
        assert!(rendered.starts_with(b"#!/bin/sh\nSERVER='http://rm.example.com'\n"), "{rendered:?}");
        for (method, uri, headers) in cases {
            let what = format!("{method} {uri} {headers:?}");
            let via_router = router.clone().oneshot(request(method.clone(), uri, &headers, peer)).await.unwrap();
            let direct = request(method.clone(), uri, &headers, peer);
            if !FastPath::claims(&direct) {
                assert!(uri.contains('%'), "{what} should be claimed");
                continue;
            }
            let via_fast = fast.serve(direct).await;
            assert_eq!(via_fast.status(), via_router.status(), "{what}");
            let headers_of = |r: &Response| {
                let mut h: Vec<(String, String)> = r
                    .headers()
                    .iter()
                    .filter(|(name, _)| *name != header::DATE)
                    .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
                    .collect();
                h.sort();
                h
            };
            assert_eq!(headers_of(&via_fast), headers_of(&via_router), "{what}");
            let (fast_body, router_body) = (body_of(via_fast).await, body_of(via_router).await);
            assert_eq!(fast_body, router_body, "{what}");
        }
    }

    fn request(method: Method, uri: &str, headers: &[(&str, &str)], peer: std::net::SocketAddr) -> http::Request<Body> {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(Body::empty()).unwrap();
        request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        request
    }

    async fn body_of(response: Response) -> bytes::Bytes {
        http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes()
    }
}
