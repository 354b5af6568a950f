//! `/agent/*` and `/install/*`: the asset surface.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, header};
use std::sync::Arc;

use rm_assets::{AssetKind, Digest, NameError, Source, validate_name};
use rm_fleet::AuditEvent;
use rm_protocol::{Manifest, Platform};

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
    // Record downloads that send content, sampled so that no number of requests can grow the database without
    // bound; the audit log never delays or fails a download.
    let sha256 = digest.sha256_hex();
    let platform_name = platform.to_string();
    if method == Method::GET
        && response.status().is_success()
        && state.downloads().should_record(peer.map(|p| p.ip()), &platform_name, &sha256)
    {
        let event = AuditEvent {
            platform: Some(platform_name),
            sha256: Some(sha256),
            source: Some(source.as_str().into()),
            detail: response.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned),
            ..super::audit_event("download", peer, &headers)
        };
        if let Err(e) = state.fleet().submit("download audit record", move |c| rm_fleet::record_audit(c, &event)) {
            tracing::warn!(error = %e, "download audit record dropped");
        }
    }
    Ok(response)
}

/// `GET|HEAD /agent/blobs/sha256/{hex}`: the archived agent build with that SHA-256 (every build the server has
/// published is archived when first seen). The name is the content: lowercase hex only, and the bytes served are
/// checked to have that digest (a damaged archive file is a 404, logged).
pub async fn agent_blob(
    State(state): State<AppState>,
    method: Method,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(hex) = path?;
    let unknown =
        || ApiError::NotFound(format!("no agent build has sha256 {}", hex.chars().take(64).collect::<String>()));
    if !(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
        return Err(unknown());
    }
    let Some((response, digest, _)) = serve_asset(&state, AssetKind::AgentBuild, &hex, &method, &headers, None).await?
    else {
        return Err(unknown());
    };
    if digest.sha256_hex() != hex {
        tracing::error!(sha256 = %hex, actual = %digest.sha256_hex(), "an archived agent build does not match its name");
        return Err(unknown());
    }
    Ok(response)
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
    validate_name(&name)?;
    let (response, _, _) = serve_asset(&state, AssetKind::Install, &name, &method, &headers, base)
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
        match file_response::respond(representation, kind, method, headers) {
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
