//! The restic-manager HTTP server as a library: [`app`] builds the router for in-process tests, [`run`] serves it on a
//! listener until a shutdown future resolves. `cmd/server` only parses flags and calls these.

mod access_log;
pub mod auth;
pub mod catalog;
mod conn;
mod conn_threads;
mod error;
mod fast_path;
mod file_body;
mod file_response;
pub mod healthcheck;
pub mod install_lines;
pub mod log_buffer;
mod maintenance;
pub mod notify;
mod public_url;
mod raw_path;
mod render;
pub mod rollouts;
mod routes;
pub use routes::notify::channel_view;
pub use routes::plans::plan_view;
pub use routes::repositories::repository_view;
/// The rollout verbs shared by `/api/v1/rollouts` and the `rollout` subcommand.
pub use routes::rollouts as rollout_api;
mod state;
mod tasks;
pub mod tls;
mod web;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use http::StatusCode;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::{info, warn};

pub use conn::raise_fd_limit;
pub use error::ApiError;
pub use public_url::{PublicUrl, TrustedProxies};
pub use state::{AppState, Config, DB_FILE, NetSettings, Settings, StartupError};

/// Custom response headers, named once.
pub mod header_names {
    /// Lowercase hex SHA-256 of the whole file.
    pub const CHECKSUM_SHA256: &str = "x-checksum-sha256";
    /// `data-dir` or `bundled`: which root served the file.
    pub const ASSET_SOURCE: &str = "x-asset-source";
    /// Build information read from an agent binary's embedded marker.
    pub const AGENT_VERSION: &str = "x-agent-version";
    pub const AGENT_COMMIT: &str = "x-agent-commit";
    /// RFC 9530 representation digest.
    pub const REPR_DIGEST: &str = "repr-digest";
}

/// Largest JSON body the agent and admin APIs accept.
pub(crate) const JSON_BODY_LIMIT: usize = 64 * 1024;

/// The full router. Every route is logged by the access log layer; a panicking handler still answers the JSON 500.
pub fn app(state: AppState) -> Router {
    with_layers(routes(&state), state)
}

/// Every route, grouped by the limits that apply to it.
fn routes(state: &AppState) -> Router<AppState> {
    use axum::extract::DefaultBodyLimit;
    use routes::{admin, agents, metrics, notify, operations, plans, repositories, restore, upload};

    let downloads = Router::new()
        .route("/agent/binary", get(routes::assets::agent_binary))
        .route("/agent/blobs/sha256/{hex}", get(routes::assets::agent_blob))
        .route("/agent/manifest", get(routes::assets::manifest))
        .route("/agent/SHA256SUMS", get(routes::assets::sha256sums))
        .route("/restic/binary", get(routes::assets::restic_binary))
        .route("/restic/blobs/sha256/{hex}", get(routes::assets::restic_blob))
        .route("/install/{name}", get(routes::assets::install_file));
    // Settings are fixed for the server's life: without the gate, downloads do not pass through it at all (every
    // layer costs a boxed future and a service clone per request, which shows on small files).
    let downloads = if state.settings().require_download_auth {
        downloads.route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_download_auth))
    } else {
        downloads
    };
    let api = Router::new()
        .route("/api/v1/agents/enroll", post(agents::enroll))
        .route("/api/v1/agents/heartbeat", post(agents::heartbeat))
        .route("/api/v1/agents/config", get(agents::config))
        .route("/api/v1/agents", get(admin::list_agents))
        .route("/api/v1/agents/{id}/labels", put(admin::set_labels))
        .route("/api/v1/agents/{id}/revoke", post(admin::revoke))
        .route("/api/v1/agents/leases", post(operations::take_lease))
        .route("/api/v1/agents/leases/{repository}", delete(operations::release_lease))
        .route("/api/v1/agents/{id}/snapshots", get(operations::list_snapshots))
        .route("/api/v1/agents/{id}/restore", post(restore::create))
        .route("/api/v1/agents/{id}/snapshots/{snapshot}/files", get(restore::files))
        .route("/api/v1/agents/tasks", get(restore::tasks))
        .route("/api/v1/operations", get(operations::list_operations))
        .route("/api/v1/operations/{id}/cancel", post(restore::cancel))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/tokens", get(admin::list_tokens).post(admin::create_token))
        .route("/api/v1/tokens/{id}", delete(admin::revoke_token))
        .route("/api/v1/audit", get(admin::list_audit))
        .route("/api/v1/repositories", get(repositories::list).post(repositories::create))
        .route("/api/v1/channels", get(notify::list).post(notify::create))
        .route("/api/v1/channels/{name}", delete(notify::delete))
        .route("/api/v1/channels/{name}/test", post(notify::test))
        .route("/api/v1/rules", get(notify::list_rules).post(notify::create_rule_route))
        .route("/api/v1/rules/{name}", delete(notify::delete_rule))
        .route("/api/v1/notifications", get(notify::notifications))
        .route(
            "/api/v1/repositories/{name}",
            get(repositories::get).patch(repositories::update).delete(repositories::delete),
        )
        .route("/api/v1/repositories/{name}/maintenance", post(repositories::run_maintenance))
        .route("/api/v1/plans", get(plans::list).post(plans::create))
        .route("/api/v1/plans/{name}", get(plans::get).patch(plans::update).delete(plans::delete))
        .route("/api/v1/plans/{name}/run", post(plans::run))
        .route("/api/v1/rollouts", get(routes::rollouts::list).post(routes::rollouts::create))
        .route("/api/v1/rollouts/{id}", get(routes::rollouts::get))
        .route("/api/v1/rollouts/{id}/{verb}", post(routes::rollouts::act))
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        // Small requests with small answers: bounded in time, body included. Downloads and uploads are not: a slow
        // but live transfer of a large agent must finish.
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.settings().api_timeout))
        .layer(axum::middleware::map_response_with_state(state.clone(), timeout_as_json))
        .layer(axum::middleware::map_response(no_store));
    // Report batches may list many snapshots: a larger body limit, the same time limit.
    let reports = Router::new()
        .route("/api/v1/agents/reports", post(operations::reports))
        .layer(DefaultBodyLimit::max(operations::REPORTS_BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.settings().api_timeout))
        .layer(axum::middleware::map_response_with_state(state.clone(), timeout_as_json))
        .layer(axum::middleware::map_response(no_store));
    // A listing answer may carry 10,000 entries.
    let listings = Router::new()
        .route("/api/v1/agents/tasks/{request_id}", post(restore::answer))
        .layer(DefaultBodyLimit::max(restore::LS_BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.settings().api_timeout))
        .layer(axum::middleware::map_response_with_state(state.clone(), timeout_as_json))
        .layer(axum::middleware::map_response(no_store));
    // Uploads enforce their own, configurable limit while streaming.
    let uploads = Router::new()
        .route("/api/v1/assets/{kind}/{name}", put(upload::put_asset).delete(upload::delete_asset))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(no_store));

    Router::new()
        .merge(downloads)
        .merge(api)
        .merge(reports)
        .merge(listings)
        .merge(uploads)
        .merge(web::routes(state))
        .route("/healthz", get(routes::ops::healthz))
        .route("/readyz", get(routes::ops::readyz))
        .route("/version", get(routes::ops::version))
        .route("/tls/cert.pem", get(routes::ops::tls_certificate))
}

/// The layers every route gets, outermost last: panics become the JSON 500, then the access log.
fn with_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(routes::ops::not_found)
        .method_not_allowed_fallback(routes::ops::method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_as_json))
        .layer(axum::middleware::from_fn(access_log::log_request))
        .with_state(state)
}

/// The timeout layer answers an empty 408; errors are JSON.
async fn timeout_as_json(State(state): State<AppState>, response: Response) -> Response {
    if response.status() == StatusCode::REQUEST_TIMEOUT && !response.headers().contains_key(http::header::CONTENT_TYPE)
    {
        return ApiError::Timeout(state.settings().api_timeout).into_response();
    }
    response
}

/// API answers (enrollment, heartbeats, `/metrics`, the admin API) are about one caller at one moment: no cache may
/// keep them, whatever sits in front of the server.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().entry(http::header::CACHE_CONTROL).or_insert(http::HeaderValue::from_static("no-store"));
    response
}

fn panic_as_json(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    ApiError::Internal(format!("handler panicked: {what}")).into_response()
}

/// Serves [`app`] on `listener` until `shutdown` resolves, then stops accepting, lets in-flight requests finish for
/// at most `grace`, and returns.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal_state = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal_state.begin_shutdown();
        info!(grace_secs = grace.as_secs_f64(), "shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let net = state.settings().net.clone();
    let tls = state.tls().map(|certs| {
        certs.watch(Duration::from_secs(1));
        certs.server_config()
    });
    if conn::serve(listener, app(state.clone()), fast_path::FastPath::new(&state), net, tls, stop_rx, grace).await {
        info!("all connections closed; stopped");
    } else {
        warn!(grace_secs = grace.as_secs_f64(), "grace period over; dropping the remaining connections");
    }
    Ok(())
}

/// Starts the rollout task: archives each published agent build, turns a new one into a rollout and moves rollouts
/// on every `--rollout-tick`. Call once, inside the runtime.
pub fn spawn_rollouts(state: &AppState) {
    rollouts::spawn(state);
}

/// Starts notification detection (every `--notify-tick`) and delivery. Call once, inside the runtime.
pub fn spawn_notifications(state: &AppState) {
    notify::spawn(state);
}

/// Starts the background upkeep of the data volume (audit retention). Call once, inside the runtime.
pub fn spawn_maintenance(state: &AppState) {
    maintenance::spawn(state);
}

/// Logs which agent platforms are published and fills the digest cache, so the first download of each binary does
/// not wait for hashing. Runs on a blocking thread; errors are logged, never fatal.
pub fn warm_up(state: &AppState) {
    for (platform, entry) in catalog::entries_blocking(state.store(), "") {
        match entry {
            Ok(e) if e.published => {
                info!(%platform, source = e.source.as_deref().unwrap_or("?"), sha256 = e.sha256.as_deref().unwrap_or("?"),
                agent_version = e.agent.as_ref().map(|a| a.version.as_str()).unwrap_or("unknown"), "agent binary published")
            }
            Ok(e) => {
                warn!(%platform, file = e.file, "agent binary not published (in neither the data dir nor the bundled dir)")
            }
            Err(err) => warn!(%platform, error = %err, "could not inspect an agent binary"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn state(dir: &std::path::Path, settings: Settings) -> AppState {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        AppState::new(Config {
            data_dir: dir.join("data"),
            bundled_dir: dir.join("bundled"),
            public_url: None,
            admin_token: Some("test-admin-token-0123456789".into()),
            settings,
        })
        .unwrap()
    }

    async fn json_of(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {bytes:?}"))
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_the_json_500_and_the_server_keeps_serving() {
        let tmp = tempfile::tempdir().unwrap();
        let state = state(tmp.path(), Settings::default());
        async fn panics() -> &'static str {
            panic!("boom in a handler")
        }
        let routes = routes(&state).route("/test/panic", get(panics));
        let app = with_layers(routes, state);
        let response = app.clone().oneshot(Request::get("/test/panic").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[http::header::CONTENT_TYPE], "application/json");
        let body = json_of(response).await;
        assert_eq!(body["error"], "internal");
        assert!(!body.to_string().contains("boom"), "panic text must not reach clients: {body}");
        let after = app.oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(after.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_stalled_api_request_times_out_with_json() {
        let tmp = tempfile::tempdir().unwrap();
        let settings = Settings { api_timeout: Duration::from_millis(200), ..Settings::default() };
        let state = state(tmp.path(), settings);
        // A heartbeat whose body never finishes arriving.
        let body = Body::from_stream(futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>());
        let request = Request::post("/api/v1/agents/heartbeat")
            .header("content-type", "application/json")
            .header("authorization", "Bearer rmagt_x_y")
            .body(body)
            .unwrap();
        let started = std::time::Instant::now();
        let response = app(state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(5));
        let body = json_of(response).await;
        assert_eq!(body["error"], "timeout", "{body}");
        // Downloads are not subject to it (a slow transfer of a large agent must finish): the route answers normally.
        let manifest = app(state).oneshot(Request::get("/agent/manifest").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(manifest.status(), StatusCode::OK);
    }
}
