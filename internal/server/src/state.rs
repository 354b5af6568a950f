//! Shared server state.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rm_assets::AssetStore;
use rm_assets::store::StoreError;
use rm_fleet::secrets::{AdminToken, AdminTokenOrigin};
use rm_fleet::{Db, DbError};
use tracing::info;

use crate::PublicUrl;

/// File name of the fleet database inside the data dir.
pub const DB_FILE: &str = "restic-manager.db";

/// What the server needs to start, independent of how it was parsed.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub bundled_dir: PathBuf,
    pub public_url: Option<PublicUrl>,
    /// `RM_ADMIN_TOKEN`; when absent the token lives in `<DataDir>/admin.token`.
    pub admin_token: Option<String>,
    pub settings: Settings,
}

/// Tunables with defaults that suit a fleet of thousands of hosts.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often agents are told to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// An agent without a heartbeat for this long is `stale`.
    pub stale_after: Duration,
    /// Largest accepted asset upload, in bytes.
    pub max_upload_bytes: u64,
    /// Downloads need an agent credential or an active enrollment token.
    pub require_download_auth: bool,
    /// Peers whose `Forwarded` / `X-Forwarded-*` headers are believed for the public scheme and host.
    pub trusted_proxies: crate::TrustedProxies,
    /// Audit events older than this are deleted.
    pub audit_retention: Duration,
    /// At most this many audit events are kept (the oldest go first).
    pub audit_max_events: u64,
    /// At most one download record per client address, platform and build in this interval.
    pub download_audit_interval: Duration,
    /// Whether and with which certificate the server speaks TLS.
    pub tls: crate::tls::TlsConfig,
    /// Longest an agent or admin API request may take, body included (downloads and uploads are not limited).
    pub api_timeout: Duration,
    /// Connection limits and timeouts (see [`crate::conn`]).
    pub net: NetSettings,
    /// `GET /metrics` answers without the admin token.
    pub metrics_public: bool,
    /// The longest repository lease granted (backup and maintenance); an agent that dies stops blocking the
    /// repository after at most this long. Agents renew at a third of the lifetime granted.
    pub max_lease_ttl: Duration,
    /// A web session with no request for this long is dead.
    pub web_session_idle: Duration,
    /// A web session is dead this long after sign-in, however busy.
    pub web_session_max: Duration,
    /// What a newly published agent build starts: `None` a pending rollout, else a rollout with this strategy.
    pub rollout_strategy: Option<rm_protocol::rollout::Strategy>,
    /// How often rollouts move on.
    pub rollout_tick: Duration,
    /// How often notification events are looked for (state transitions).
    pub notify_tick: Duration,
    /// The first retry of a failed notification waits this long, doubling per attempt up to `notify_retry_max`.
    pub notify_retry_base: Duration,
    pub notify_retry_max: Duration,
    /// A notification not delivered this long after it was queued is given up (`failed`).
    pub notify_give_up: Duration,
    /// Held warnings of a `warning_digest` rule go out together this long after the oldest.
    pub notify_digest_every: Duration,
}

/// How long a connection may take to send a request head, stay idle, stall a response or trickle a request body, and
/// how many connections are served at once.
#[derive(Clone, Debug)]
pub struct NetSettings {
    /// From accept (or the first byte of a later request on a keep-alive connection) to a complete request head.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
    /// A response write that makes no progress for this long (the client stopped reading) closes the connection.
    pub send_timeout: Duration,
    /// A request body must deliver at least this many bytes per [`NetSettings::body_rate_window`] while the handler
    /// waits for it (0 disables the check).
    pub body_min_bytes: u64,
    pub body_rate_window: Duration,
    /// Connections served at once; `None` = 4096, capped to the file-descriptor limit minus a reserve.
    pub max_connections: Option<usize>,
    /// Threads that serve connections, each with its own runtime (`conn_threads`); `None` = one per CPU, 0 = on
    /// the main runtime.
    pub conn_threads: Option<usize>,
    /// Whether install-file requests are answered off the socket before hyper (`raw_path`); off only to compare the
    /// two in tests.
    pub raw_path: bool,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            body_min_bytes: 1024 * 30,
            body_rate_window: Duration::from_secs(30),
            max_connections: None,
            conn_threads: None,
            raw_path: true,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_interval: Duration::from_secs(60),
            stale_after: Duration::from_secs(300),
            max_upload_bytes: 512 * 1024 * 1024,
            require_download_auth: false,
            api_timeout: Duration::from_secs(30),
            trusted_proxies: Default::default(),
            tls: Default::default(),
            audit_retention: Duration::from_secs(90 * 24 * 3600),
            audit_max_events: 100_000,
            download_audit_interval: Duration::from_secs(600),
            net: NetSettings::default(),
            metrics_public: false,
            max_lease_ttl: Duration::from_secs(3600),
            web_session_idle: Duration::from_secs(3600),
            web_session_max: Duration::from_secs(12 * 3600),
            rollout_strategy: None,
            rollout_tick: Duration::from_secs(1),
            notify_tick: Duration::from_secs(15),
            notify_retry_base: Duration::from_secs(30),
            notify_retry_max: Duration::from_secs(3600),
            notify_give_up: Duration::from_secs(24 * 3600),
            notify_digest_every: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("admin token: {0}")]
    AdminToken(String),
    #[error("secret key: {0}")]
    SecretKey(#[from] rm_fleet::KeyError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: AssetStore,
    fleet: Db,
    admin_token: AdminToken,
    secret_key: rm_fleet::SecretKey,
    public_url: Option<PublicUrl>,
    settings: Settings,
    render_cache: crate::render::RenderCache,
    header_cache: crate::file_response::HeaderCache,
    restic_lookups: crate::catalog::ResticLookups,
    downloads: crate::maintenance::DownloadSampler,
    tls: Option<Arc<crate::tls::Certificates>>,
    shutting_down: AtomicBool,
    tasks: crate::tasks::Tasks,
    sign_ins: crate::web::SignInLimiter,
    started_at: rm_fleet::Timestamp,
}

impl AppState {
    /// Checks the directories (see [`AssetStore::new`]), opens and migrates the database, loads or creates the admin
    /// token, loads or creates the secret key (checked against the sealed secrets), and builds the state.
    pub fn new(config: Config) -> Result<AppState, StartupError> {
        let store = AssetStore::new(&config.data_dir, &config.bundled_dir)?;
        match store.remove_stale_staging() {
            Ok(0) => {}
            Ok(n) => info!(files = n, "removed upload temporary files left by an earlier process"),
            Err(e) => tracing::warn!(error = %e, "could not clean upload temporary files"),
        }
        let tls = crate::tls::setup(&config.settings.tls, store.data_dir())?;
        if let Some(certs) = &tls {
            info!(certificate = %certs.cert_path().display(), pin = certs.pin(), "TLS on: serving https");
        }
        let fleet = Db::open(&store.data_dir().join(DB_FILE))?;
        let admin_token = match config.admin_token.as_deref() {
            Some(value) => AdminToken::from_value(value).map_err(StartupError::AdminToken)?,
            None => {
                AdminToken::load_or_create(store.data_dir()).map_err(|e| StartupError::AdminToken(e.to_string()))?
            }
        };
        match &admin_token.origin {
            AdminTokenOrigin::Environment => info!("admin token taken from RM_ADMIN_TOKEN"),
            AdminTokenOrigin::File { path, created: true } => {
                info!(path = %path.display(), "generated a new admin token (mode 0600); read it from this file")
            }
            AdminTokenOrigin::File { path, created: false } => info!(path = %path.display(), "admin token loaded"),
        }
        // Created on first start, refused if missing or wrong while sealed secrets exist: never a silent new key.
        let (secret_key, origin) = rm_fleet::unlock(&fleet, store.data_dir(), true)?;
        match origin {
            rm_fleet::KeyOrigin::Created => {
                info!("generated the secret key that encrypts repository secrets (mode 0600)")
            }
            rm_fleet::KeyOrigin::Loaded => info!("secret key loaded"),
        }
        Ok(AppState {
            inner: Arc::new(Inner {
                started_at: rm_fleet::now(),
                store,
                fleet,
                admin_token,
                secret_key,
                public_url: config.public_url,
                downloads: crate::maintenance::DownloadSampler::new(config.settings.download_audit_interval),
                tls,
                settings: config.settings,
                render_cache: Default::default(),
                header_cache: Default::default(),
                restic_lookups: Default::default(),
                shutting_down: AtomicBool::new(false),
                tasks: Default::default(),
                sign_ins: Default::default(),
            }),
        })
    }

    pub fn store(&self) -> &AssetStore {
        &self.inner.store
    }

    pub fn fleet(&self) -> &Db {
        &self.inner.fleet
    }

    pub fn admin_token(&self) -> &AdminToken {
        &self.inner.admin_token
    }

    /// The key that seals repository passwords and secret environment values.
    pub fn secret_key(&self) -> &rm_fleet::SecretKey {
        &self.inner.secret_key
    }

    /// When this process built its state (Unix seconds).
    pub fn started_at(&self) -> rm_fleet::Timestamp {
        self.inner.started_at
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The certificates when the server speaks TLS itself.
    pub fn tls(&self) -> Option<&Arc<crate::tls::Certificates>> {
        self.inner.tls.as_ref()
    }

    pub(crate) fn downloads(&self) -> &crate::maintenance::DownloadSampler {
        &self.inner.downloads
    }

    /// What each agent's long-poll waits for, and the pending snapshot listings.
    pub(crate) fn tasks(&self) -> &crate::tasks::Tasks {
        &self.inner.tasks
    }

    /// Failed sign-ins per client address.
    pub(crate) fn sign_ins(&self) -> &crate::web::SignInLimiter {
        &self.inner.sign_ins
    }

    pub(crate) fn render_cache(&self) -> &crate::render::RenderCache {
        &self.inner.render_cache
    }

    /// Response headers rendered once per file version.
    pub(crate) fn header_cache(&self) -> &crate::file_response::HeaderCache {
        &self.inner.header_cache
    }

    pub(crate) fn restic_lookups(&self) -> &crate::catalog::ResticLookups {
        &self.inner.restic_lookups
    }

    pub fn public_url(&self) -> Option<&PublicUrl> {
        self.inner.public_url.as_ref()
    }

    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }
}
