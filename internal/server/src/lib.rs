//! The restic-manager HTTP server as a library: [`app`] builds the router for in-process tests, [`run`] serves it on a
//! listener until a shutdown future resolves. `cmd/server` only parses flags and calls these.

mod access_log;
pub mod auth;
mod error;
mod file_body;
mod file_response;
pub mod healthcheck;
mod public_url;
mod render;
mod routes;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::{delete, get, post, put};
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use error::ApiError;
pub use public_url::PublicUrl;
pub use state::{AppState, Config, DB_FILE, Settings, StartupError};

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

/// The full router. Every route is logged by the access log layer.
pub fn app(state: AppState) -> Router {
    use axum::extract::DefaultBodyLimit;
    use routes::{admin, agents, upload};

    let downloads = Router::new()
        .route("/agent/binary", get(routes::assets::agent_binary))
        .route("/agent/manifest", get(routes::assets::manifest))
        .route("/agent/SHA256SUMS", get(routes::assets::sha256sums))
        .route("/install/{name}", get(routes::assets::install_file))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_download_auth));
    let api = Router::new()
        .route("/api/v1/agents/enroll", post(agents::enroll))
        .route("/api/v1/agents/heartbeat", post(agents::heartbeat))
        .route("/api/v1/agents", get(admin::list_agents))
        .route("/api/v1/tokens", get(admin::list_tokens).post(admin::create_token))
        .route("/api/v1/tokens/{id}", delete(admin::revoke_token))
        .route("/api/v1/audit", get(admin::list_audit))
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT));
    // Uploads enforce their own, configurable limit while streaming.
    let uploads = Router::new()
        .route("/api/v1/assets/{kind}/{name}", put(upload::put_asset).delete(upload::delete_asset))
        .layer(DefaultBodyLimit::disable());

    Router::new()
        .merge(downloads)
        .merge(api)
        .merge(uploads)
        .route("/healthz", get(routes::ops::healthz))
        .route("/readyz", get(routes::ops::readyz))
        .route("/version", get(routes::ops::version))
        .fallback(routes::ops::not_found)
        .method_not_allowed_fallback(routes::ops::method_not_allowed)
        .layer(axum::middleware::from_fn(access_log::log_request))
        .with_state(state)
}

/// Serves [`app`] on `listener` until `shutdown` resolves, then stops accepting, lets in-flight requests finish for
/// at most `grace`, and returns.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let signal_state = state.clone();
    let signal = async move {
        shutdown.await;
        signal_state.begin_shutdown();
        info!(grace_secs = grace.as_secs_f64(), "shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    };
    let make_service = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, make_service).with_graceful_shutdown(signal);
    let deadline = async move {
        let _ = stop_rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => {
            info!("all connections closed; stopped");
            result
        }
        () = deadline => {
            warn!(grace_secs = grace.as_secs_f64(), "grace period over; dropping the remaining connections");
            Ok(())
        }
    }
}

/// Logs which agent platforms are published and fills the digest cache, so the first download of each binary does
/// not wait for hashing. Runs on a blocking thread; errors are logged, never fatal.
pub fn warm_up(state: &AppState) {
    for entry in routes::assets::platform_entries(state, "") {
        match entry {
            Ok(e) if e.published => {
                info!(platform = %e.platform, source = e.source.unwrap_or("?"), sha256 = e.sha256.as_deref().unwrap_or("?"),
                agent_version = e.agent.as_ref().map(|a| a.version.as_str()).unwrap_or("unknown"), "agent binary published")
            }
            Ok(e) => {
                warn!(platform = %e.platform, file = e.file, "agent binary not published (in neither the data dir nor the bundled dir)")
            }
            Err(err) => warn!(error = %err, "could not inspect an agent binary"),
        }
    }
}
