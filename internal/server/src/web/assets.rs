//! The Assets page: per platform the served agent and restic (source, version, commit, size, SHA-256) from the same
//! catalog as `/agent/manifest`, and the install files. Overrides are uploaded with a plain multipart form (htmx sends
//! the same form and shows its progress) and stored through the API's own upload code ([`upload::store_upload`]):
//! same name checks, size limit, atomic write and audit. Removing an override serves the bundled file again.

use axum::Form;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use maud::{Markup, html};
use rm_assets::{AssetKind, Source};
use rm_protocol::PLATFORMS;

use super::PageError;
use super::layout::{self, Nav};
use super::session::{CsrfForm, WebUser};
use crate::auth::Peer;
use crate::public_url::BaseUrl;
use crate::routes::upload;
use crate::{ApiError, AppState, catalog};

/// Room in an upload's body for the multipart framing and the CSRF field, on top of the API's upload limit (which
/// the file itself is held to, byte for byte).
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// The body limit of the upload routes: the API's upload limit plus [`MULTIPART_OVERHEAD`].
pub(crate) fn upload_body_limit(state: &AppState) -> usize {
    usize::try_from(state.settings().max_upload_bytes.saturating_add(MULTIPART_OVERHEAD)).unwrap_or(usize::MAX)
}

/// One served file, as a row shows it.
struct Served {
    kind: AssetKind,
    name: String,
    source: Option<String>,
    version: Option<String>,
    commit: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
}

/// The install files both roots hold, each as the store finds it (data dir first). Blocking.
fn install_files(state: &AppState) -> Result<Vec<Served>, ApiError> {
    let store = state.store();
    let names = store.names(AssetKind::Install).map_err(|e| ApiError::Internal(format!("listing install/: {e}")))?;
    let mut files = Vec::new();
    for name in names {
        let Some(found) = store.open(AssetKind::Install, &name)? else { continue };
        files.push(Served {
            kind: AssetKind::Install,
            name,
            source: Some(found.source.as_str().into()),
            version: None,
            commit: None,
            size: Some(found.len),
            sha256: Some(found.digest.sha256_hex()),
        });
    }
    Ok(files)
}

/// `GET /ui/assets`
pub(crate) async fn page(user: WebUser, State(state): State<AppState>, base: BaseUrl) -> Result<Response, PageError> {
    let base = base.or_relative();
    let agents = catalog::entries(&state, base.clone()).await?;
    let restic = catalog::restic_entries(&state, base).await?;
    let shared = state.clone();
    let install = tokio::task::spawn_blocking(move || install_files(&shared))
        .await
        .map_err(|e| ApiError::Internal(format!("listing install files failed: {e}")))??;
    let body = html! {
        h1 { "Assets" }
        p.hint {
            "What this server serves: a file in the data dir overrides the bundled one of the same name. "
            "Hashes are those of " a href="/agent/manifest" { "/agent/manifest" } "."
        }
        table.assets {
            thead { tr {
                th { "Platform" } th { "File" } th { "Source" } th { "Version" } th { "Commit" } th { "Size" }
                th { "SHA-256" } th { "Override" }
            } }
            tbody {
                @for platform in PLATFORMS {
                    @let agent = agents.iter().find(|e| e.platform() == Some(platform));
                    @let restic = restic.iter().find(|e| e.platform() == Some(platform));
                    (row(&user, &platform.to_string(), "agent", &format!("agent-{}-{}", platform.os.as_str(),
                        platform.arch.as_str()), &Served {
                        kind: AssetKind::AgentBinary,
                        name: platform.file_name().into(),
                        source: agent.and_then(|e| e.source.clone()),
                        version: agent.and_then(|e| e.agent.as_ref()).map(|b| b.version.clone()),
                        commit: agent.and_then(|e| e.agent.as_ref()).map(|b| b.commit.clone()),
                        size: agent.and_then(|e| e.size),
                        sha256: agent.and_then(|e| e.sha256.clone()),
                    }))
                    (row(&user, &platform.to_string(), "restic", &format!("restic-{}-{}", platform.os.as_str(),
                        platform.arch.as_str()), &Served {
                        kind: AssetKind::ResticBinary,
                        name: platform.restic_file_name().into(),
                        source: restic.and_then(|e| e.source.clone()),
                        version: restic.and_then(|e| match (&e.version, &e.package_version) {
                            (Some(v), Some(p)) => Some(format!("{v} ({p})")),
                            (v, _) => v.clone(),
                        }),
                        commit: None,
                        size: restic.and_then(|e| e.size),
                        sha256: restic.and_then(|e| e.sha256.clone()),
                    }))
                }
            }
        }
        h2 { "Install files" }
        @if install.is_empty() { p.empty { "No install files." } } @else {
            table.install {
                thead { tr {
                    th { "File" } th { "Source" } th { "Size" } th { "SHA-256" } th { "Override" }
                } }
                tbody {
                    @for file in &install {
                        tr id={ "install-" (file.name) } {
                            td { code { (file.name) } }
                            td.source { (file.source.as_deref().unwrap_or("")) }
                            td.size { (file.size.map(human_size).unwrap_or_default()) }
                            td.sha256 { code { (file.sha256.as_deref().unwrap_or("")) } }
                            td { (override_forms(&user, file)) }
                        }
                    }
                }
            }
        }
        h3 { "Add or replace an install file" }
        (upload_form(&user, "/ui/assets/install", "install-new", "Upload"))
        p.hint { "The file keeps its own name, which may contain only letters, digits, '.', '_' and '-'." }
    };
    Ok(layout::page("Assets", Nav::Assets, &user, body).into_response())
}

fn row(user: &WebUser, platform: &str, what: &str, id: &str, file: &Served) -> Markup {
    html! {
        tr id=(id) {
            td { (platform) }
            td { (what) br; small { code { (file.name) } } }
            @match &file.source {
                Some(source) => td.source { (source) },
                None => td.source.none { "not published" },
            }
            td.version { (file.version.as_deref().unwrap_or("")) }
            td.commit { code { (file.commit.as_deref().map(|c| c.chars().take(12).collect::<String>()).unwrap_or_default()) } }
            td.size { (file.size.map(human_size).unwrap_or_default()) }
            td.sha256 { code { (file.sha256.as_deref().unwrap_or("")) } }
            td { (override_forms(user, file)) }
        }
    }
}

/// Upload (or replace) an override; remove it when the data dir has one.
fn override_forms(user: &WebUser, file: &Served) -> Markup {
    let action = format!("/ui/assets/{}/{}", file.kind.subdir(), file.name);
    let id = format!("upload-{}-{}", file.kind.subdir(), file.name);
    html! {
        (upload_form(user, &action, &id, "Upload override"))
        @if file.source.as_deref() == Some(Source::DataDir.as_str()) {
            form.remove method="post" action={ (action) "/delete" } {
                (layout::csrf_field(user))
                button type="submit" { "Remove override" }
            }
        }
    }
}

/// A file input posted as `multipart/form-data`: the CSRF field first (it is checked before the file is read), then
/// the file. htmx sends the same form, so its upload progress can be shown (`static/app.js`).
fn upload_form(user: &WebUser, action: &str, id: &str, label: &str) -> Markup {
    html! {
        form.upload id=(id) method="post" action=(action) enctype="multipart/form-data"
            hx-post=(action) hx-encoding="multipart/form-data" hx-target="main" hx-select="main" hx-swap="outerHTML" {
            (layout::csrf_field(user))
            input type="file" name="file" required aria-label=(label);
            button type="submit" { (label) }
            progress hidden value="0" max="100" {}
        }
    }
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b < 1024 => format!("{b} B"),
        b if b < 1024 * 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    }
}

/// `POST /ui/assets/{kind}/{name}`: an override for a fixed name (a platform's binary, an install file).
pub(crate) async fn upload(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, PageError> {
    let Path((kind, name)) = path.map_err(|_| ApiError::InvalidName(rm_assets::NameError::BadCharacter))?;
    receive(user, state, peer, headers, kind, Some(name), multipart).await
}

/// `POST /ui/assets/{kind}`: an override named as the uploaded file is (new install files).
pub(crate) async fn upload_named_by_file(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, PageError> {
    let Path(kind) = path.map_err(|_| ApiError::InvalidName(rm_assets::NameError::BadCharacter))?;
    receive(user, state, peer, headers, kind, None, multipart).await
}

fn multipart_error(e: MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(limit)
    } else {
        ApiError::UploadAborted(e.body_text())
    }
}

/// Checks the CSRF field (it must come first), then streams the file field into the API's upload code.
async fn receive(
    user: WebUser,
    state: AppState,
    peer: Option<std::net::SocketAddr>,
    headers: HeaderMap,
    kind: String,
    name: Option<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, PageError> {
    let limit = state.settings().max_upload_bytes;
    let declared: Option<u64> =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(MULTIPART_OVERHEAD)) {
        return Err(ApiError::PayloadTooLarge(limit).into());
    }
    let mut multipart = multipart.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let not_this_page = || ApiError::InvalidRequest("the upload form was not sent by this page: reload it".into());
    let csrf = multipart.next_field().await.map_err(|e| multipart_error(e, limit))?.ok_or_else(not_this_page)?;
    if csrf.name() != Some("csrf") {
        return Err(not_this_page().into());
    }
    let csrf = csrf.text().await.map_err(|e| multipart_error(e, limit))?;
    user.check_form(&csrf, &headers, &state)?;
    let file = multipart.next_field().await.map_err(|e| multipart_error(e, limit))?.ok_or_else(not_this_page)?;
    if file.name() != Some("file") {
        return Err(not_this_page().into());
    }
    let name = match name {
        Some(name) => name,
        None => match file.file_name() {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => return Err(ApiError::InvalidRequest("choose a file to upload".into()).into()),
        },
    };
    // A form sent without a chosen file has an empty file part with no name: never an override.
    if file.file_name().is_none_or(str::is_empty) {
        return Err(ApiError::InvalidRequest("choose a file to upload".into()).into());
    }
    let body = file.map(|chunk| chunk.map_err(|e| multipart_error(e, limit)));
    upload::store_upload(&state, peer, &headers, &kind, &name, None, None, body).await?;
    Ok(Redirect::to("/ui/assets").into_response())
}

/// `POST /ui/assets/{kind}/{name}/delete`: removes the data-dir override; the bundled file is served again.
pub(crate) async fn delete(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let Path((kind, name)) = path.map_err(|_| ApiError::InvalidName(rm_assets::NameError::BadCharacter))?;
    upload::remove_override(&state, peer, &headers, &kind, &name).await?;
    Ok(Redirect::to("/ui/assets").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(2048), "2.0 KiB");
        assert_eq!(human_size(5 * 1024 * 1024 + 1024 * 512), "5.5 MiB");
    }
}
