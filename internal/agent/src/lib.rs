//! The restic-manager agent as a library: `cmd/agent` parses flags and calls [`commands`].
//!
//! * [`config`]: the enrolled identity (server, agent id, credential), stored 0600 and replaced atomically.
//! * [`anchor`]: key-pinned trust: the server's certificate checked against `--pin`, stored as the only root.
//! * [`client`]: the HTTP client (ureq + rustls) for enrollment, heartbeats, the manifest and downloads.
//! * [`update`]: verified self-update: download beside the executable, check size and SHA-256, smoke-run
//!   `--version`, keep the previous binary, swap atomically.
//! * [`state`]: what `run` remembers between runs (the last failed self-update), next to the config.
//! * [`trial`]: a new build's trial start before the agent restarts into it, the revert when it fails, and the
//!   crash-loop marker `update-trial.json`.
//! * [`restic`]: the host's restic: detection and one backup.
//! * [`restic_install`]: the managed restic beside the agent, installed from the server like a self-update.
//! * [`backups`]: backup config sync, schedules, runs, leases and the report outbox.
//! * [`commands`]: `enroll`, `run`, `update`, `revert`, `status`.

pub mod anchor;
pub mod backups;
pub mod client;
pub mod commands;
pub mod config;
pub mod restic;
pub mod restic_install;
pub mod state;
pub mod trial;
pub mod update;

/// One line on stderr, the agent's log.
pub(crate) fn log(message: impl std::fmt::Display) {
    eprintln!("restic-manager-agent: {message}");
}

/// Everything that can go wrong, with messages written for the operator reading them.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Usage(String),
    #[error("config {path}: {reason}")]
    Config { path: std::path::PathBuf, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Network { url: String, reason: String },
    /// The server's certificate or TLS setup, in words (expired, wrong host, wrong key, not TLS at all).
    #[error("{0}")]
    Tls(String),
    #[error("the server answered {status}: {message} ({code})")]
    Server { status: u16, code: String, message: String },
    #[error("the downloaded agent does not match: {0}")]
    Verification(String),
    #[error("the new agent failed its smoke test: {0}")]
    SmokeTest(String),
    /// `<exe>.previous` refused for a revert (missing, or not the build expected), in words.
    #[error("cannot revert to the previous build: {0}")]
    Revert(String),
    /// A restic build from the server refused (mismatch or failed smoke run), in words.
    #[error("{0}")]
    ResticRefused(String),
    /// A link from the server that would downgrade to http or send the credential to another origin.
    #[error("refused the server's link: {0}")]
    Untrusted(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl AgentError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }
}

/// `text` safe to show on a terminal or in a log line: control characters (C0, DEL, C1: ANSI escapes, CR, LF) and
/// the bidirectional-text controls (U+200E/F, U+061C, U+202A–U+202E, U+2066–U+2069) are replaced by `\u{…}`
/// escapes. Everything the server sends (error messages, codes, URLs, checksums) goes through this before it is
/// printed.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi =
            matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &std::path::Path) -> Result<String, AgentError> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(AgentError::io(format!("reading {}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(AgentError::io(format!("reading {}", path.display())))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn server_text_is_made_printable() {
        assert_eq!(printable("plain text: ok"), "plain text: ok");
        assert_eq!(printable("red \x1b[31mALERT\x1b[0m"), "red \\u{1b}[31mALERT\\u{1b}[0m");
        assert_eq!(printable("a\r\nforged: line"), "a\\u{d}\\u{a}forged: line");
        assert_eq!(printable("x\u{9b}31m"), "x\\u{9b}31m", "C1 CSI");
        for bidi in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{061C}'] {
            let shown = printable(&format!("exe{bidi}txt.sh"));
            assert!(!shown.contains(bidi), "{shown:?}");
            assert!(shown.contains(&format!("\\u{{{:x}}}", bidi as u32)), "{shown:?}");
        }
        assert_eq!(printable("héllo ✓"), "héllo ✓", "ordinary non-ASCII text stays");
    }
}
