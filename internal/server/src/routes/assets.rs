//! `/agent/*` and `/install/*`: the asset surface.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, header};
use std::sync::Arc;

use rm_assets::{AssetKind, Digest, NameError, Source, validate_name};
use rm_fleet::AuditEvent;
use rm_protocol::{Manifest, PLATFORMS, Platform};

use crate::auth::Peer;
use crate::file_response::Representation;
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState, catalog, file_response};

/// `GET|HEAD /agent/binary?os=&arch=`
pub async fn agent_binary(
    State(state): State<AppState>,
    Peer(peer): Peer,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let platform = parse_platform_query(query.as_deref())?;
    let (response, digest, source) =
        serve_asset(&state, AssetKind::AgentBinary, platform.file_name(), &method, &headers, None)
            .await?
            .ok_or(ApiError::BinaryNotPublished(platform))?;
    record_download(&state, peer, &method, &headers, &response, Some(platform), &digest, source.as_str());
    Ok(response)
}

/// Records downloads that send content, sampled so that no number of requests can grow the database without bound;
/// the audit log never delays or fails a download. `platform: None` (an archived build): the platform it was
/// archived for, looked up on the database thread.
#[allow(clippy::too_many_arguments)]
fn record_download(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    method: &Method,
    headers: &HeaderMap,
    response: &Response,
    platform: Option<Platform>,
    digest: &Digest,
    source: &str,
) {
    let sha256 = digest.sha256_hex();
    let platform_name = platform.map(|p| p.to_string());
    if !(method == Method::GET
        && response.status().is_success()
        && state.downloads().should_record(peer.map(|p| p.ip()), platform_name.as_deref().unwrap_or(""), &sha256))
    {
        return;
    }
    let event = AuditEvent {
        platform: platform_name,
        sha256: Some(sha256),
        source: Some(source.into()),
        detail: response.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned),
        ..super::audit_event("download", peer, headers)
    };
    let recorded = state.fleet().submit("download audit record", move |c| {
        let mut event = event;
        if event.platform.is_none()
            && let Some(build) = rm_fleet::rollouts::get_build(c, event.sha256.as_deref().unwrap_or_default())?
        {
            event.platform = Some(format!("{}/{}", build.os, build.arch));
        }
        rm_fleet::record_audit(c, &event)
    });
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "download audit record dropped");
    }
}

/// What a content-addressed download may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blob {
    Agent,
    Restic,
}

impl Blob {
    fn what(self) -> &'static str {
        match self {
            Blob::Agent => "agent build",
            Blob::Restic => "restic build",
        }
    }

    /// The kind of the platforms' served files.
    fn served(self) -> AssetKind {
        match self {
            Blob::Agent => AssetKind::AgentBinary,
            Blob::Restic => AssetKind::ResticBinary,
        }
    }

    fn file_name(self, platform: Platform) -> &'static str {
        match self {
            Blob::Agent => platform.file_name(),
            Blob::Restic => platform.restic_file_name(),
        }
    }
}

/// `Cache-Control` of a blob: the URL names its bytes, so they never change and any cache may keep them for a year
/// without asking again. Behind the download gate the answer depends on the request's credential: `private`, so no
/// shared cache stores it (RFC 9111 §3.5: a shared cache may only reuse a response to an authenticated request when
/// it says `public`), while an agent's own cache still may.
fn blob_cache_control(state: &AppState) -> HeaderValue {
    if state.settings().require_download_auth {
        HeaderValue::from_static("private, max-age=31536000, immutable")
    } else {
        HeaderValue::from_static("public, max-age=31536000, immutable")
    }
}

/// `GET|HEAD /agent/blobs/sha256/{hex}`: the agent build with that SHA-256. Every build the server has published is
/// archived when the rollout task first sees it (`AssetKind::AgentBuild`), and that archive is asked first; a build
/// published since the last tick is found as a platform's served binary (data dir, then bundled) with that digest.
pub async fn agent_blob(
    State(state): State<AppState>,
    Peer(peer): Peer,
    method: Method,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let found = serve_blob(&state, Blob::Agent, &method, path, &headers).await;
    if let Ok((response, digest, platform, source)) = &found {
        record_download(&state, peer, &method, &headers, response, *platform, digest, source);
    }
    blob_response(&state, found.map(|(response, ..)| response))
}

/// `GET|HEAD /restic/blobs/sha256/{hex}`: the restic build with that SHA-256 among the platforms' served ones (no
/// archive: restic is not rolled out; no download audit, as for `/restic/binary`).
pub async fn restic_blob(
    State(state): State<AppState>,
    method: Method,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let found = serve_blob(&state, Blob::Restic, &method, path, &headers).await;
    blob_response(&state, found.map(|(response, ..)| response))
}

/// A blob's answer: the immutable `Cache-Control` on the answers that describe its bytes (200, 206, 304, HEAD);
/// anything else is `no-store`: a 404 so that a digest published later is never hidden by a remembered one, a 412
/// or 416 because it depends on the request's own headers.
fn blob_response(state: &AppState, found: Result<Response, ApiError>) -> Response {
    let mut response = found.unwrap_or_else(IntoResponse::into_response);
    let status = response.status();
    let cache = if status.is_success() || status == http::StatusCode::NOT_MODIFIED {
        blob_cache_control(state)
    } else {
        HeaderValue::from_static("no-store")
    };
    response.headers_mut().insert(header::CACHE_CONTROL, cache);
    response
}

/// Finds and answers a blob request: the response, the digest of the bytes it serves (always the requested one),
/// the platform whose served file it is (`None`: the archive) and the source. Lowercase hex only; anything else,
/// and a digest nothing has, is a 404.
async fn serve_blob(
    state: &AppState,
    blob: Blob,
    method: &Method,
    path: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
) -> Result<(Response, Arc<Digest>, Option<Platform>, &'static str), ApiError> {
    let Path(hex) = path?;
    let unknown = || {
        let shown: String = hex.chars().take(64).collect();
        ApiError::NotFound(format!("no {} has sha256 {shown}", blob.what()))
    };
    if !(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
        return Err(unknown());
    }
    if blob == Blob::Agent
        && let Some((response, digest, _)) =
            serve_asset(state, AssetKind::AgentBuild, &hex, method, headers, None).await?
    {
        if digest.sha256_hex() == hex {
            return Ok((response, digest, None, "archive"));
        }
        tracing::error!(sha256 = %hex, actual = %digest.sha256_hex(), "an archived agent build does not match its name");
    }
    for platform in PLATFORMS {
        let name = blob.file_name(platform);
        if !served_digest_is(state, blob.served(), name, &hex).await {
            continue;
        }
        // Replaced since the look: the answer describes the bytes it serves, so a different digest shows here and
        // the file is no longer this blob.
        if let Some((response, digest, source)) = serve_asset(state, blob.served(), name, method, headers, None).await?
            && digest.sha256_hex() == hex
        {
            return Ok((response, digest, Some(platform), source.as_str()));
        }
    }
    Err(unknown())
}

/// Whether the platform's served file of `kind` has the SHA-256 `hex` now: the remembered version (a `stat` or two)
/// when still current, else a full lookup on a blocking thread (hashed once per file version). A file that cannot be
/// read is not this blob (logged; its own name answers the error).
async fn served_digest_is(state: &AppState, kind: AssetKind, name: &'static str, hex: &str) -> bool {
    if let Some(known) = state.store().known(kind, name) {
        return known.digest.sha256_hex() == hex;
    }
    let shared = state.clone();
    let looked = tokio::task::spawn_blocking(move || shared.store().open(kind, name).map(|a| a.map(|a| a.digest)));
    match looked.await {
        Ok(Ok(digest)) => digest.is_some_and(|d| d.sha256_hex() == hex),
        Ok(Err(e)) => {
            tracing::debug!(file = name, error = %e, "a served file could not be read for a blob lookup");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "a blob lookup task failed");
            false
        }
    }
}

/// `GET|HEAD /restic/binary?os=&arch=`: the restic build for a platform, found and verified like the agent's (no
/// download audit: agents fetch it only when they install it, and the install is in their heartbeat).
pub async fn restic_binary(
    State(state): State<AppState>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let platform = parse_platform_query(query.as_deref())?;
    let (response, _, _) =
        serve_asset(&state, AssetKind::ResticBinary, platform.restic_file_name(), &method, &headers, None)
            .await?
            .ok_or(ApiError::ResticNotPublished(platform))?;
    Ok(response)
}

/// `GET|HEAD /install/<name>`
pub async fn install_file(
    State(state): State<AppState>,
    BaseUrl(base): BaseUrl,
    method: Method,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // The only way Path<String> fails here is a percent-decoding that is not UTF-8.
    let Path(name) = name.map_err(|_| ApiError::InvalidName(NameError::BadCharacter))?;
    install_response(&state, base, &method, &name, &headers).await
}

/// The answer for install file `name` (already percent-decoded): the handler above and the fast path that skips the
/// router (`crate::fast_path`) both end here.
pub(crate) async fn install_response(
    state: &AppState,
    base: Option<String>,
    method: &Method,
    name: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    validate_name(name)?;
    let (response, _, _) = serve_asset(state, AssetKind::Install, name, method, headers, base)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("install file {name:?}")))?;
    Ok(response)
}

/// Looks an asset up and answers the request. Fast path: a remembered file version still in place (a `stat` or two,
/// no blocking-pool hop; 304s and HEADs never open the file). Otherwise, or if the remembered file changed before
/// its body was opened, the full contained lookup on a blocking thread. `base` is filled into install templates.
async fn serve_asset(
    state: &AppState,
    kind: AssetKind,
    name: &str,
    method: &Method,
    headers: &HeaderMap,
    base: Option<String>,
) -> Result<Option<(Response, Arc<Digest>, Source)>, ApiError> {
    let template = kind == AssetKind::Install && crate::render::is_template(name);
    let base = || if template { base.clone() } else { None };
    let fast = state.store().known(kind, name).and_then(|known| {
        if template {
            crate::render::cached(&known, base().as_deref(), state.render_cache())
        } else {
            Some(known.into())
        }
    });
    let mut representation = match fast {
        Some(r) => r,
        None => match full_lookup(state, kind, name, base()).await? {
            Some(r) => r,
            None => return Ok(None),
        },
    };
    loop {
        let (digest, source) = (representation.digest.clone(), representation.source);
        match file_response::respond(representation, kind, method, headers, state.header_cache()) {
            Ok(mut response) => {
                response.extensions_mut().insert(source);
                return Ok(Some((response, digest, source)));
            }
            // Only a remembered file can be stale; a full lookup yields an open handle, so this loops at most once.
            Err(file_response::Stale) => match full_lookup(state, kind, name, base()).await? {
                Some(r) => representation = r,
                None => return Ok(None),
            },
        }
    }
}

/// The full lookup (and rendering) on a blocking thread.
async fn full_lookup(
    state: &AppState,
    kind: AssetKind,
    name: &str,
    base: Option<String>,
) -> Result<Option<Representation>, ApiError> {
    let (state, name) = (state.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || {
        let Some(asset) = state.store().open(kind, &name)? else { return Ok(None) };
        if kind == AssetKind::Install && crate::render::is_template(&name) {
            return crate::render::render(asset, base.as_deref(), state.render_cache()).map(Some);
        }
        Ok(Some(asset.into()))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("lookup task failed: {e}")))?
}

/// Exactly one `os` and one `arch`; other parameters (cache busters) are ignored.
fn parse_platform_query(query: Option<&str>) -> Result<Platform, ApiError> {
    let (mut os, mut arch) = (None, None);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let slot = match &*key {
            "os" => &mut os,
            "arch" => &mut arch,
            _ => continue,
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(ApiError::InvalidPlatformQuery(format!("query parameter {key:?} given more than once")));
        }
    }
    match (os, arch) {
        (Some(os), Some(arch)) => Ok(Platform::parse(&os, &arch)?),
        _ => Err(ApiError::InvalidPlatformQuery("both os and arch are required, e.g. ?os=linux&arch=amd64".into())),
    }
}

/// `GET /agent/manifest`
pub async fn manifest(State(state): State<AppState>, base: BaseUrl) -> Result<Response, ApiError> {
    let base = base.or_relative();
    let agents = catalog::entries(&state, base.clone()).await?;
    let restic = catalog::restic_entries(&state, base).await?;
    let mut response = Json(Manifest { server: rm_buildinfo::current(), agents, restic }).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// `GET /agent/SHA256SUMS`: `sha256sum -c` input for every published binary, the agents' and then restic's.
pub async fn sha256sums(State(state): State<AppState>, base: BaseUrl) -> Result<Response, ApiError> {
    let base = base.or_relative();
    let agents = catalog::entries(&state, base.clone()).await?;
    let restic = catalog::restic_entries(&state, base).await?;
    let body: String = agents
        .into_iter()
        .map(|e| (e.sha256, e.file))
        .chain(restic.into_iter().map(|e| (e.sha256, e.file)))
        .filter_map(|(sha, file)| Some(format!("{}  {file}\n", sha?)))
        .collect();
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    Ok((headers, body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_query_needs_exactly_one_of_each() {
        assert_eq!(
            parse_platform_query(Some("os=linux&arch=arm64")).unwrap().file_name(),
            "restic-manager-agent-linux-arm64"
        );
        assert!(parse_platform_query(Some("arch=amd64&os=windows&cache=1")).is_ok());
        for bad in [
            None,
            Some(""),
            Some("os=linux"),
            Some("os=linux&arch=amd64&os=windows"),
            Some("os=linux&arch=amd64&arch=amd64"),
        ] {
            assert!(parse_platform_query(bad).is_err(), "{bad:?}");
        }
    }
}
