//! One structured log line per request, written when the response body is finished or abandoned, so `bytes` is what
//! was actually sent and `complete` says whether the client got all of it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Frame, SizeHint};
use rm_assets::Source;

use crate::log_buffer::{AccessRecord, Route, UriText};

pub async fn log_request(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned().map(Route::Matched);
    let Some(pending) = Pending::start(&request, route) else { return next.run(request).await };
    pending.finish(next.run(request).await)
}

/// A request whose access-log line is written once its response body is done (the middleware above, and the
/// fast path that answers install files without the router).
pub(crate) struct Pending {
    method: Method,
    route: Option<Route>,
    uri: UriText,
    peer: Option<SocketAddr>,
    started: Instant,
}

impl Pending {
    /// `None` when the access log is filtered out (`RM_LOG=warn`, `access=off`): no line, no wrapping, no work.
    pub(crate) fn start<B>(request: &http::Request<B>, route: Option<Route>) -> Option<Pending> {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return None;
        }
        // Copies that share nothing with the request (see `UriText`); formatting waits until the line is written.
        Some(Pending {
            started: Instant::now(),
            route,
            peer: request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0),
            method: request.method().clone(),
            uri: UriText::of(request.uri()),
        })
    }

    /// Wraps the response body so that its end (or abandonment) writes the line.
    pub(crate) fn finish(self, response: Response) -> Response {
        let Pending { method, route, uri, peer, started } = self;
        let method_has_body = method != Method::HEAD;
        let line = Line {
            status: response.status(),
            source: response.extensions().get::<Source>().copied(),
            expected: response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .filter(|_| method_has_body),
            method,
            route,
            uri,
            peer,
            started,
        };
        response.map(|inner| Body::new(LoggedBody { inner, line: Some(line), bytes: 0, finished: false }))
    }
}

struct Line {
    method: Method,
    route: Option<Route>,
    uri: UriText,
    peer: Option<SocketAddr>,
    status: StatusCode,
    source: Option<Source>,
    started: Instant,
    /// Declared body length; hyper stops polling once it has sent that many bytes.
    expected: Option<u64>,
}

struct LoggedBody {
    inner: Body,
    line: Option<Line>,
    bytes: u64,
    finished: bool,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finished = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let Some(line) = self.line.take() else { return };
        let complete = self.finished
            || http_body::Body::is_end_stream(&self.inner)
            || line.expected.is_some_and(|n| self.bytes >= n);
        let record = AccessRecord {
            at: std::time::SystemTime::now(),
            method: line.method,
            route: line.route,
            uri: line.uri,
            peer: line.peer,
            status: line.status.as_u16(),
            bytes: self.bytes,
            complete,
            duration: line.started.elapsed(),
            source: line.source,
        };
        // Formatted and written by the log thread when the server routed the access log there (it does at start).
        if let Some(record) = crate::log_buffer::access(record) {
            record.emit();
        }
    }
}
