//! The restic-manager agent as a library: `cmd/agent` parses flags and calls [`commands`].
//!
//! * [`config`]: the enrolled identity (server, agent id, credential), stored 0600 and replaced atomically.
//! * [`client`]: the HTTP client (ureq + rustls) for enrollment, heartbeats, the manifest and downloads.
//! * [`update`]: verified self-update: download beside the executable, check size and SHA-256, smoke-run
//!   `--version`, keep the previous binary, swap atomically.
//! * [`commands`]: `enroll`, `run`, `update`, `status`.

pub mod client;
pub mod commands;
pub mod config;
pub mod update;

/// Everything that can go wrong, with messages written for the operator reading them.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Usage(String),
    #[error("config {path}: {reason}")]
    Config { path: std::path::PathBuf, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Network { url: String, reason: String },
    #[error("the server answered {status}: {message} ({code})")]
    Server { status: u16, code: String, message: String },
    #[error("the downloaded agent does not match: {0}")]
    Verification(String),
    #[error("the new agent failed its smoke test: {0}")]
    SmokeTest(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl AgentError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &std::path::Path) -> Result<String, AgentError> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(AgentError::io(format!("reading {}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(AgentError::io(format!("reading {}", path.display())))?;
    Ok(hex::encode(hasher.finalize()))
}
