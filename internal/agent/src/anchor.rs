//! Key-pinned trust for servers with their own (typically self-signed) certificate.
//!
//! `enroll --pin sha256//…` fetches `<server>/tls/cert.pem` once without verification, takes the leaf certificate,
//! and goes on only if the SHA-256 of its public key equals the pin. That leaf is then stored beside the config as
//! `server-cert.pem` and is the only root the agent trusts: rustls checks the handshake signature, the validity
//! dates and the host name against it. Nothing secret travels on the unverified request; a man in the middle can
//! serve the right certificate there, but cannot complete a later handshake without the pinned key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use rm_protocol::pin::pin_of_certificate;

use crate::AgentError;

/// File name of the stored anchor, in the config's directory.
pub const FILE_NAME: &str = "server-cert.pem";

/// Largest `/tls/cert.pem` accepted (a chain is a few KiB).
const MAX_PEM: u64 = 64 * 1024;

/// `server-cert.pem` in the config's directory.
pub fn path_for(config_path: &Path) -> PathBuf {
    config_path.with_file_name(FILE_NAME)
}

/// The words for a key that is not the pinned one.
pub fn mismatch(got: &str, pinned: &str) -> AgentError {
    AgentError::Tls(format!(
        "the server's certificate key is {got}, not the pinned {pinned}: refusing (wrong server or a man in the middle)"
    ))
}

/// Fetches `<base>/tls/cert.pem` without verifying the certificate and returns the leaf (DER) if its key has `pin`.
/// Everything else (no TLS, no such route, not PEM, a different key, a leaf that is not self-issued) is refused.
pub fn fetch_pinned_leaf(base: &str, pin: &str) -> Result<Vec<u8>, AgentError> {
    let url = format!("{base}/tls/cert.pem");
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .https_only(true)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(Some(Duration::from_secs(30)))
        .user_agent(format!("restic-manager-agent/{}", rm_buildinfo::current().version))
        .tls_config(ureq::tls::TlsConfig::builder().disable_verification(true).build())
        .build()
        .into();
    let mut response = http.get(&url).call().map_err(|e| crate::client::describe(&url, e))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(AgentError::Tls(format!(
            "the server does not publish its certificate (GET {} answered {status}); a server too old for --pin, \
             or not restic-manager: use --cacert instead",
            crate::printable(&url)
        )));
    }
    let pem =
        response.body_mut().with_config().limit(MAX_PEM).read_to_vec().map_err(|e| crate::client::describe(&url, e))?;
    let leaf = first_certificate(&pem)
        .ok_or_else(|| AgentError::Tls(format!("{} holds no PEM certificate", crate::printable(&url))))?;
    let got = pin_of_certificate(&leaf).map_err(|e| AgentError::Tls(format!("{}: {e}", crate::printable(&url))))?;
    if got != pin {
        return Err(mismatch(&got, pin));
    }
    check_self_issued(&leaf)?;
    Ok(leaf)
}

/// A pinned leaf becomes the trust anchor, so it must be its own issuer: a certificate issued by a CA would never
/// verify against itself. Such a server is trusted through its CA (`--cacert` or the system store) instead.
fn check_self_issued(der: &[u8]) -> Result<(), AgentError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| AgentError::Tls(format!("the server's certificate does not parse: {e}")))?;
    if cert.issuer().as_raw() != cert.subject().as_raw() {
        return Err(AgentError::Tls(format!(
            "the server's certificate is issued by {}, not self-signed: --pin anchors a self-signed certificate; \
             trust the CA instead (--cacert or the system trust store)",
            crate::printable(&cert.issuer().to_string())
        )));
    }
    Ok(())
}

fn first_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    ureq::tls::parse_pem(pem).find_map(|item| match item {
        Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.der().to_vec()),
        _ => None,
    })
}

/// Reads the stored anchor and refuses it unless its key has `pin` (a replaced file is not trusted).
pub fn load(path: &Path, pin: &str) -> Result<Vec<u8>, AgentError> {
    let fail = |reason: String| AgentError::Config { path: path.to_path_buf(), reason };
    let pem = std::fs::read(path).map_err(|e| {
        fail(format!(
            "cannot read the pinned server certificate: {e}; enroll again (restic-manager-agent enroll --pin …)"
        ))
    })?;
    let leaf = first_certificate(&pem).ok_or_else(|| fail("holds no PEM certificate".into()))?;
    let got = pin_of_certificate(&leaf).map_err(|e| fail(e.to_string()))?;
    if got != pin {
        return Err(fail(format!(
            "the stored server certificate's key is {got}, not the pinned {pin}: refusing (the file was replaced?)"
        )));
    }
    Ok(leaf)
}

/// Stores `der` as PEM at `path`: 0644 (a certificate is public), temporary file + rename.
pub fn save(path: &Path, der: &[u8]) -> Result<(), AgentError> {
    crate::config::write_file(path, pem(der).as_bytes(), 0o644)
        .map_err(|reason| AgentError::Config { path: path.to_path_buf(), reason })
}

/// One certificate as PEM.
pub fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
