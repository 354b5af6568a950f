//! `/agent/*` and `/install/*`: the asset surface.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, header};
use rm_assets::platform::PLATFORMS;
use rm_assets::store::StoreError;
use rm_assets::{AssetKind, NameError, OpenAsset, Platform, validate_name};
use rm_buildinfo::BuildInfo;
use serde::Serialize;

use crate::auth::Peer;
use crate::file_response::Representation;
use crate::public_url::base_url;
use crate::{ApiError, AppState, file_response};
use rm_fleet::model::AuditEvent;

/// `GET|HEAD /agent/binary?os=&arch=`
pub async fn agent_binary(
    State(state): State<AppState>,
    Peer(peer): Peer,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let platform = parse_platform_query(query.as_deref())?;
    let asset = open(&state, AssetKind::AgentBinary, platform.file_name())
        .await?
        .ok_or(ApiError::BinaryNotPublished(platform))?;
    let audit = AuditEvent {
        at: rm_fleet::now(),
        kind: "download".into(),
        remote_addr: peer.map(|p| p.ip().to_string()),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect()),
        platform: Some(platform.to_string()),
        sha256: Some(asset.digest.sha256_hex()),
        source: Some(asset.source.as_str().into()),
        ..Default::default()
    };
    let response = respond(asset, AssetKind::AgentBinary, &method, &headers);
    // Record downloads that send content; the audit log never delays or fails a download.
    if method == Method::GET && response.status().is_success() {
        let detail = response.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let event = AuditEvent { detail, ..audit };
        if let Err(e) = state.fleet().submit("download audit record", move |c| rm_fleet::model::record_audit(c, &event))
        {
            tracing::warn!(error = %e, "download audit record dropped");
        }
    }
    Ok(response)
}

/// `GET|HEAD /install/<name>`
pub async fn install_file(
    State(state): State<AppState>,
    method: Method,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // The only way Path<String> fails here is a percent-decoding that is not UTF-8.
    let Path(name) = name.map_err(|_| ApiError::InvalidName(NameError::BadCharacter))?;
    validate_name(&name)?;
    let asset = open(&state, AssetKind::Install, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("install file {name:?}")))?;
    if crate::render::is_template(&name) {
        let base = base_url(state.public_url(), &headers);
        let rendered = tokio::task::spawn_blocking(move || crate::render::render(asset, base.as_deref()))
            .await
            .map_err(|e| ApiError::Internal(format!("render task failed: {e}")))??;
        return Ok(respond(rendered, AssetKind::Install, &method, &headers));
    }
    Ok(respond(asset, AssetKind::Install, &method, &headers))
}

fn respond(asset: impl Into<Representation>, kind: AssetKind, method: &Method, headers: &HeaderMap) -> Response {
    let asset = asset.into();
    let source = asset.source;
    let mut response = file_response::respond(asset, kind, method, headers);
    response.extensions_mut().insert(source);
    response
}

/// Opens an asset on a blocking thread (lookup, open and, on a cache miss, hashing all block).
async fn open(state: &AppState, kind: AssetKind, name: &str) -> Result<Option<OpenAsset>, ApiError> {
    let (state, name) = (state.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || state.store().open(kind, &name))
        .await
        .map_err(|e| ApiError::Internal(format!("lookup task failed: {e}")))?
        .map_err(ApiError::from)
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
            return Err(ApiError::InvalidRequest(format!("query parameter {key:?} given more than once")));
        }
    }
    match (os, arch) {
        (Some(os), Some(arch)) => Ok(Platform::parse(&os, &arch)?),
        _ => Err(ApiError::InvalidRequest("both os and arch are required, e.g. ?os=linux&arch=amd64".into())),
    }
}

/// One platform's line in the manifest.
#[derive(Debug, Serialize)]
pub struct PlatformEntry {
    #[serde(skip)]
    pub platform: Platform,
    pub os: &'static str,
    pub arch: &'static str,
    pub file: &'static str,
    pub published: bool,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub source: Option<&'static str>,
    pub last_modified: Option<String>,
    pub url: String,
    /// Build information embedded in the binary, when it carries a restic-manager marker.
    pub agent: Option<BuildInfo>,
}

/// Looks at one platform's binary (blocking). `base` prefixes the download URL.
pub fn platform_entry(state: &AppState, platform: Platform, base: &str) -> Result<PlatformEntry, StoreError> {
    let asset = state.store().open(AssetKind::AgentBinary, platform.file_name())?;
    Ok(PlatformEntry {
        platform,
        os: platform.os.as_str(),
        arch: platform.arch.as_str(),
        file: platform.file_name(),
        published: asset.is_some(),
        size: asset.as_ref().map(|a| a.len),
        sha256: asset.as_ref().map(|a| a.digest.sha256_hex()),
        source: asset.as_ref().map(|a| a.source.as_str()),
        last_modified: asset.as_ref().map(|a| httpdate::fmt_http_date(a.modified)),
        url: format!("{base}/agent/binary?os={}&arch={}", platform.os.as_str(), platform.arch.as_str()),
        agent: asset.and_then(|a| a.digest.build_info.clone()),
    })
}

/// Looks at every platform's binary (blocking).
pub fn platform_entries(state: &AppState, base: &str) -> Vec<Result<PlatformEntry, StoreError>> {
    PLATFORMS.iter().map(|&platform| platform_entry(state, platform, base)).collect()
}

/// The entry for one platform, from a blocking thread.
pub async fn served_entry(
    state: &AppState,
    platform: Platform,
    base: String,
) -> Result<Option<PlatformEntry>, ApiError> {
    let state = state.clone();
    let entry = tokio::task::spawn_blocking(move || platform_entry(&state, platform, &base))
        .await
        .map_err(|e| ApiError::Internal(format!("lookup task failed: {e}")))??;
    Ok(Some(entry))
}

pub async fn entries(state: &AppState, headers: &HeaderMap) -> Result<Vec<PlatformEntry>, ApiError> {
    let base = base_url(state.public_url(), headers).unwrap_or_default();
    let state = state.clone();
    tokio::task::spawn_blocking(move || platform_entries(&state, &base))
        .await
        .map_err(|e| ApiError::Internal(format!("manifest task failed: {e}")))?
        .into_iter()
        .map(|entry| entry.map_err(ApiError::from))
        .collect()
}

#[derive(Serialize)]
struct Manifest {
    server: BuildInfo,
    agents: Vec<PlatformEntry>,
}

/// `GET /agent/manifest`
pub async fn manifest(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let agents = entries(&state, &headers).await?;
    let mut response = Json(Manifest { server: rm_buildinfo::current(), agents }).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// `GET /agent/SHA256SUMS`: `sha256sum -c` input for every published binary.
pub async fn sha256sums(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let body: String = entries(&state, &headers)
        .await?
        .into_iter()
        .filter_map(|e| Some(format!("{}  {}\n", e.sha256?, e.file)))
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
