//! Turns an opened asset into an HTTP response: validators, digests, conditionals and single ranges.
//!
//! Every header describes the opened handle, and the body is read from that same handle, so a response is always one
//! consistent version of the file. Evaluation follows RFC 9110 §13.2.2: If-Match / If-Unmodified-Since (412), then
//! If-None-Match / If-Modified-Since (304), then Range guarded by If-Range (§13.1.5).
//!
//! Range is honoured on GET only (§14.2: range handling is defined for GET; a HEAD answers what a plain GET would).
//! If-Range needs an exact, strong match: the current strong ETag byte for byte, or a valid HTTP-date equal to
//! Last-Modified; anything else, including an unparseable value, sends the whole current representation.
//! A 304 carries the representation's Content-Length (§8.6 allows it; never a 0 that differs from the 200's);
//! 412 and 416 carry the JSON error body like every other error, the 416 with `Content-Range: bytes */LEN`.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::SystemTime;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use headers::{ETag, HeaderMapExt, IfMatch, IfModifiedSince, IfNoneMatch, IfUnmodifiedSince, LastModified};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_range_header::RangeUnsatisfiableError;
use rm_assets::{AssetKind, OpenAsset};

use crate::header_names;

/// Where a response body comes from.
pub enum Content {
    /// The opened file: streamed from the handle the headers were taken from.
    File(std::fs::File),
    /// A remembered file version: opened only if a body is sent, and only if it is still that version.
    Known(std::sync::Arc<rm_assets::Known>),
    /// Rendered in memory (install scripts with the server URL filled in).
    Memory(bytes::Bytes),
}

/// The remembered file changed between lookup and open: redo the lookup.
#[derive(Debug)]
pub struct Stale;

/// Everything a response says about one version of an asset, and its bytes.
pub struct Representation {
    pub content: Content,
    pub len: u64,
    pub modified: SystemTime,
    pub source: rm_assets::Source,
    pub name: String,
    pub digest: std::sync::Arc<rm_assets::Digest>,
}

impl From<std::sync::Arc<rm_assets::Known>> for Representation {
    fn from(known: std::sync::Arc<rm_assets::Known>) -> Self {
        Representation {
            len: known.len,
            modified: known.modified,
            source: known.source,
            name: known.name.clone(),
            digest: known.digest.clone(),
            content: Content::Known(known),
        }
    }
}

impl From<OpenAsset> for Representation {
    fn from(asset: OpenAsset) -> Self {
        Representation {
            content: Content::File(asset.file),
            len: asset.len,
            modified: asset.modified,
            source: asset.source,
            name: asset.name,
            digest: asset.digest,
        }
    }
}

/// The headers of one representation that do not depend on the request, rendered once per file version: the
/// validators and digests (what a 304 carries), and the same plus Content-Type and Content-Disposition (a 200/206).
pub struct Prebuilt {
    sha256: [u8; 32],
    modified: SystemTime,
    source: rm_assets::Source,
    len: u64,
    etag: ETag,
    etag_text: String,
    validators: HeaderMap,
    full: HeaderMap,
}

impl Prebuilt {
    fn new(asset: &Representation, kind: AssetKind) -> Prebuilt {
        let sha_hex = asset.digest.sha256_hex();
        let etag_text = format!("\"sha256-{sha_hex}\"");
        let etag: ETag = etag_text.parse().expect("hex is a valid entity tag");
        let mut headers = HeaderMap::new();
        headers.typed_insert(etag.clone());
        headers.typed_insert(LastModified::from(asset.modified));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        insert(&mut headers, header_names::CHECKSUM_SHA256, &sha_hex);
        let b64 = base64::engine::general_purpose::STANDARD.encode(asset.digest.sha256);
        insert(&mut headers, header_names::REPR_DIGEST, &format!("sha-256=:{b64}:"));
        insert(&mut headers, header_names::ASSET_SOURCE, asset.source.as_str());
        if let Some(info) = &asset.digest.build_info {
            insert(&mut headers, header_names::AGENT_VERSION, &info.version);
            insert(&mut headers, header_names::AGENT_COMMIT, &info.commit);
        }
        let validators = headers.clone();
        let content_type = match kind {
            AssetKind::AgentBinary | AssetKind::ResticBinary | AssetKind::AgentBuild => {
                "application/octet-stream".to_string()
            }
            AssetKind::Install => mime_guess::from_path(&asset.name).first_or_octet_stream().essence_str().to_string(),
        };
        insert(&mut headers, header::CONTENT_TYPE.as_str(), &content_type);
        if matches!(kind, AssetKind::AgentBinary | AssetKind::ResticBinary | AssetKind::AgentBuild) {
            // The name passed the platform mapping (or is a hex digest): no quoting issues are possible.
            insert(
                &mut headers,
                header::CONTENT_DISPOSITION.as_str(),
                &format!("attachment; filename=\"{}\"", asset.name),
            );
        }
        Prebuilt {
            sha256: asset.digest.sha256,
            modified: asset.modified,
            source: asset.source,
            len: asset.len,
            etag,
            etag_text,
            validators,
            full: headers,
        }
    }

    fn describes(&self, asset: &Representation) -> bool {
        self.sha256 == asset.digest.sha256
            && self.modified == asset.modified
            && self.source == asset.source
            && self.len == asset.len
    }
}

/// [`Prebuilt`] headers per (kind, name), replaced when the name's representation changes; bounded.
///
/// One cache per thread (each connection thread keeps its own), not one behind a lock: a request then takes no lock
/// here, and cloning the headers into a response touches only reference counts this thread owns. A header value is
/// a reference-counted buffer; clones of one shared by every thread bounced its count between cores on every
/// response. Correctness does not depend on which copy answers: a hit is used only if it [`Prebuilt::describes`] the
/// representation at hand, and the headers are a function of that representation and the name.
#[derive(Default)]
pub struct HeaderCache;

const HEADER_CACHE_CAPACITY: usize = 1024;

type PerThread = std::collections::HashMap<AssetKind, std::collections::HashMap<String, Rc<Prebuilt>>>;

thread_local! {
    static PREBUILT: RefCell<PerThread> = RefCell::default();
}

impl HeaderCache {
    fn get(&self, asset: &Representation, kind: AssetKind) -> Rc<Prebuilt> {
        PREBUILT.with_borrow_mut(|map| {
            let names = map.entry(kind).or_default();
            if let Some(hit) = names.get(asset.name.as_str()).filter(|p| p.describes(asset)) {
                return hit.clone();
            }
            let built = Rc::new(Prebuilt::new(asset, kind));
            if names.len() >= HEADER_CACHE_CAPACITY {
                names.clear();
            }
            names.insert(asset.name.clone(), built.clone());
            built
        })
    }
}

pub fn respond(
    asset: Representation,
    kind: AssetKind,
    method: &Method,
    request: &HeaderMap,
    cache: &HeaderCache,
) -> Result<Response, Stale> {
    let prebuilt = cache.get(&asset, kind);
    let (etag, modified) = (&prebuilt.etag, asset.modified);

    if let Some(precondition) = precondition_failure(request, etag, modified) {
        let mut headers = prebuilt.validators.clone();
        match precondition {
            Precondition::NotModified => {
                // The length a 200 would announce (RFC 9110 §8.6, §15.4.5), not the 0 of the empty body. Hyper writes
                // it on a HEAD 304 and leaves it out of a GET 304, both of which the RFC allows.
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.len));
                return Ok(response(StatusCode::NOT_MODIFIED, headers, Body::empty()));
            }
            Precondition::Failed => return Ok(with_validators(crate::ApiError::PreconditionFailed, headers)),
        }
    }

    let len = asset.len;
    let (status, start, count, content_range) =
        match requested_range(method, request, &prebuilt.etag_text, modified, len) {
            RangeDecision::Full => (StatusCode::OK, 0, len, None),
            RangeDecision::Partial(start, end) => {
                (StatusCode::PARTIAL_CONTENT, start, end - start + 1, Some(format!("bytes {start}-{end}/{len}")))
            }
            RangeDecision::Unsatisfiable => {
                return Ok(with_validators(crate::ApiError::RangeNotSatisfiable(len), prebuilt.validators.clone()));
            }
        };
    let mut headers = prebuilt.full.clone();
    if let Some(range) = content_range {
        insert(&mut headers, header::CONTENT_RANGE.as_str(), &range);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));

    let body = if method == Method::HEAD || count == 0 {
        Body::empty()
    } else {
        match stream(asset, start, count) {
            Ok(Some(body)) => body,
            Ok(None) => return Err(Stale),
            Err(e) => return Ok(crate::ApiError::Internal(format!("reading an asset: {e}")).into_response()),
        }
    };
    // Content-Length is set above: hyper must not recompute it from an empty HEAD body.
    Ok(response(status, headers, body))
}

/// A response with exactly these headers (moved in whole; `(status, headers, body).into_response()` re-inserts
/// them one by one into an empty map).
fn response(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    let value = HeaderValue::from_str(value).expect("header values built here are visible ASCII");
    headers.insert(HeaderName::from_bytes(name.as_bytes()).expect("static header name"), value);
}

/// The JSON error answer, with the validators and digests of the current representation (what the client needs to
/// ask again). The error's own Content-Type, Content-Length and Content-Range win.
fn with_validators(error: crate::ApiError, validators: HeaderMap) -> Response {
    let mut response = error.into_response();
    for (name, value) in &validators {
        if !response.headers().contains_key(name) {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

enum Precondition {
    /// 412
    Failed,
    /// 304
    NotModified,
}

fn precondition_failure(request: &HeaderMap, etag: &ETag, modified: SystemTime) -> Option<Precondition> {
    if let Some(if_match) = request.typed_get::<IfMatch>() {
        if !if_match.precondition_passes(etag) {
            return Some(Precondition::Failed);
        }
    } else if let Some(since) = request.typed_get::<IfUnmodifiedSince>()
        && !since.precondition_passes(modified)
    {
        return Some(Precondition::Failed);
    }
    if let Some(if_none_match) = request.typed_get::<IfNoneMatch>() {
        if !if_none_match.precondition_passes(etag) {
            return Some(Precondition::NotModified);
        }
    } else if let Some(since) = request.typed_get::<IfModifiedSince>()
        && !since.is_modified(modified)
    {
        return Some(Precondition::NotModified);
    }
    None
}

enum RangeDecision {
    Full,
    /// Inclusive byte positions.
    Partial(u64, u64),
    Unsatisfiable,
}

fn requested_range(method: &Method, request: &HeaderMap, etag: &str, modified: SystemTime, len: u64) -> RangeDecision {
    // RFC 9110 §14.2: range handling is defined for GET only; a HEAD describes the full GET answer.
    if method != Method::GET {
        return RangeDecision::Full;
    }
    let Some(range) = request.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeDecision::Full;
    };
    if !if_range_matches(request, etag, modified) {
        return RangeDecision::Full;
    }
    let ranges = match http_range_header::parse_range_header(range) {
        Ok(parsed) => parsed.validate(len),
        Err(e) => Err(e),
    };
    match ranges {
        // A single range is served; several are answered with the whole file, which RFC 9110 §14.2 allows.
        Ok(ranges) if ranges.len() == 1 => RangeDecision::Partial(*ranges[0].start(), *ranges[0].end()),
        Ok(_) => RangeDecision::Full,
        // Malformed headers are ignored (RFC 9110 §14.2); unsatisfiable or abusive ones get a 416.
        Err(RangeUnsatisfiableError::Invalid(_)) => RangeDecision::Full,
        Err(_) => RangeDecision::Unsatisfiable,
    }
}

/// RFC 9110 §13.1.5: whether a Range may be served under the request's If-Range (true when there is none). A false
/// answer means "send the whole current representation", so any doubt answers false: several If-Range fields, a
/// value that is neither an entity tag nor an HTTP-date, a weak tag (If-Range uses the strong comparison; ours are
/// all strong, so that is byte equality with our ETag), or a date other than exactly Last-Modified (a later date
/// must not match: that is how a client would stitch two versions together).
///
/// Date strength (§13.1.5 wants a strong Last-Modified): we treat an exact match of Last-Modified, to the second, as
/// sufficient. The residual risk is two versions renamed into place within the same second of mtime; clients that
/// resume downloads of agents use the strong ETag, which has no such gap.
fn if_range_matches(request: &HeaderMap, etag: &str, modified: SystemTime) -> bool {
    let mut values = request.get_all(header::IF_RANGE).iter();
    let Some(value) = values.next() else { return true };
    if values.next().is_some() {
        return false;
    }
    let Ok(text) = value.to_str() else { return false };
    let text = text.trim();
    if text.starts_with('"') || text.starts_with("W/") {
        // Strong comparison; ours is a strong tag, so only the identical quoted string matches (never `W/…`).
        return text == etag;
    }
    let Ok(date) = httpdate::parse_http_date(text) else { return false };
    let seconds = modified.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).ok();
    seconds.is_some_and(|s| date == SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s))
}

/// `count` bytes from `start`: streamed from the file, or sliced from memory. `Ok(None)`: a remembered file changed.
fn stream(asset: Representation, start: u64, count: u64) -> std::io::Result<Option<Body>> {
    let file = match asset.content {
        Content::File(file) => file,
        // open + fstat of a local file: no waiting on I/O, fine on a runtime thread.
        Content::Known(known) => match known.open()? {
            Some(file) => file,
            None => return Ok(None),
        },
        Content::Memory(bytes) => return Ok(Some(Body::from(bytes.slice(start as usize..(start + count) as usize)))),
    };
    Ok(Some(Body::from_stream(crate::file_body::FileBody::new(file, start, count))))
}
