//! The server's own TLS (rustls, ring): the certificate and key come from `--tls-cert`/`--tls-key`, else from
//! `<DataDir>/tls/cert.pem` and `key.pem`; with `--tls self-signed` and neither, a key and a self-signed certificate
//! are generated there on first start and reused after. A replaced certificate is picked up without a restart (the
//! files are checked every second; open connections keep theirs); a broken replacement keeps the old one and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// File names under `<DataDir>/tls/`.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// How the server decides whether to speak TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS when a certificate is configured or present in `<DataDir>/tls/`, plain HTTP otherwise.
    #[default]
    Auto,
    /// As `Auto`, but generate a self-signed certificate when there is none.
    SelfSigned,
    /// Plain HTTP even if certificate files exist.
    Off,
}

impl std::str::FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "auto" => Ok(TlsMode::Auto),
            "self-signed" => Ok(TlsMode::SelfSigned),
            "off" => Ok(TlsMode::Off),
            other => Err(format!("{other:?}: use auto, self-signed or off")),
        }
    }
}

/// What TLS needs at start.
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Names and addresses the generated certificate is valid for (besides `localhost`, 127.0.0.1 and ::1).
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert and --tls-key go together")]
    HalfConfigured,
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
}

/// A certificate in use: the rustls key, its pin and when it ends.
struct Loaded {
    key: Arc<CertifiedKey>,
    pin: String,
    stamp: Stamp,
}

/// What identifies the files' versions: (modified, length) of both.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, 0));
    [one(cert), one(key)]
}

/// The certificate rustls presents, replaceable while the server runs.
#[derive(Debug)]
pub struct Certificates {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CurrentCert>>,
}

#[derive(Debug)]
struct CurrentCert {
    key: Arc<CertifiedKey>,
    pin: String,
    stamp: Stamp,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).key.clone())
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let stamp = stamp(cert_path, key_path);
    let file_error = |path: &Path, reason: String| TlsError::File { path: path.to_path_buf(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| file_error(cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(cert_path, format!("not a PEM certificate chain: {e}")))?;
    let leaf = chain.first().ok_or_else(|| file_error(cert_path, "contains no certificate".into()))?;
    let pin = rm_protocol::pin::pin_of_certificate(leaf).map_err(|e| file_error(cert_path, e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_error(key_path, format!("no private key: {e}")))?;
    let signing = any_supported_type(&key).map_err(|e| file_error(key_path, format!("unsupported key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| file_error(key_path, format!("does not belong to the certificate: {e}")))?;
    Ok(Loaded { key: Arc::new(certified), pin, stamp })
}

impl Certificates {
    /// Loads the pair; errors name the file and what is wrong with it.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Certificates, TlsError> {
        let loaded = read_pair(cert_path, key_path)?;
        Ok(Certificates {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Arc::new(CurrentCert { key: loaded.key, pin: loaded.pin, stamp: loaded.stamp })),
        })
    }

    /// The public key pin of the certificate in use (`sha256//…`).
    pub fn pin(&self) -> String {
        self.current.read().unwrap_or_else(|p| p.into_inner()).pin.clone()
    }

    /// The pin hosts install with: `Some` when the certificate in use is self-signed (no public CA vouches for it),
    /// `None` for a publicly issued one.
    pub fn bootstrap_pin(&self) -> Option<String> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        let leaf = current.key.cert.first()?;
        rm_protocol::pin::is_self_signed(leaf).ok()?.then(|| current.pin.clone())
    }

    /// The certificate chain in use as PEM (leaf first): what `GET /tls/cert.pem` answers, so an agent holding only
    /// the pin can learn the certificate to anchor on.
    pub fn chain_pem(&self) -> String {
        use base64::Engine as _;
        let current = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = String::new();
        for der in &current.key.cert {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Reloads the pair if either file changed; a pair that does not load keeps the old one (logged once per
    /// change). Returns whether a new certificate is in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.cert_path, &self.key_path);
        let previous = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        if now == previous.stamp {
            return false;
        }
        match read_pair(&self.cert_path, &self.key_path) {
            Ok(loaded) => {
                info!(path = %self.cert_path.display(), pin = loaded.pin, "TLS certificate replaced; new connections use it");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(CurrentCert { key: loaded.key, pin: loaded.pin, stamp: loaded.stamp });
                true
            }
            Err(e) => {
                warn!(error = %e, "the replaced TLS certificate or key does not load; keeping the one in use");
                // Remember the broken version so the warning is not repeated every second.
                let kept = CurrentCert { key: previous.key.clone(), pin: previous.pin.clone(), stamp: now };
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(kept);
                false
            }
        }
    }

    /// The rustls configuration: HTTP/1.1, this resolver.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Checks the files every `period` until the runtime stops.
    pub fn watch(self: &Arc<Self>, period: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let check = this.clone();
                let _ = tokio::task::spawn_blocking(move || check.reload_if_changed()).await;
            }
        });
    }
}

/// Decides and prepares TLS at start: `None` for plain HTTP.
pub fn setup(config: &TlsConfig, data_dir: &Path) -> Result<Option<Arc<Certificates>>, TlsError> {
    let (cert, key) = match (&config.cert, &config.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => (data_dir.join("tls").join(CERT_FILE), data_dir.join("tls").join(KEY_FILE)),
        _ => return Err(TlsError::HalfConfigured),
    };
    if config.mode == TlsMode::Off {
        return Ok(None);
    }
    let present = cert.exists() || key.exists();
    if !present {
        if config.mode != TlsMode::SelfSigned || config.cert.is_some() {
            if config.cert.is_some() {
                return Err(TlsError::File { path: cert, reason: "does not exist".into() });
            }
            return Ok(None);
        }
        generate_self_signed(&cert, &key, &config.names)?;
    }
    Ok(Some(Arc::new(Certificates::load(&cert, &key)?)))
}

/// A new P-256 key and a self-signed certificate for `localhost`, the loopback addresses and `names`, valid for ten
/// years, written key first (0600) and each by write-then-rename, so a crash leaves no half-written pair.
pub fn generate_self_signed(cert: &Path, key: &Path, names: &[String]) -> Result<(), TlsError> {
    let generate = |e: &dyn std::fmt::Display| TlsError::Generate(e.to_string());
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    sans.extend(names.iter().filter(|n| !n.is_empty()).cloned());
    sans.dedup();
    let mut params = rcgen::CertificateParams::new(sans).map_err(|e| generate(&e))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "restic-manager");
    // From the start of last year (clocks are not all right) to ten years on.
    let year = current_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| generate(&e))?;
    let certificate = params.self_signed(&key_pair).map_err(|e| generate(&e))?;
    let dir = cert.parent().ok_or_else(|| TlsError::Generate("certificate path has no directory".into()))?;
    let io = |path: &Path, e: std::io::Error| TlsError::File { path: path.to_path_buf(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    write_atomically(key, key_pair.serialize_pem().as_bytes(), 0o600).map_err(|e| io(key, e))?;
    write_atomically(cert, certificate.pem().as_bytes(), 0o644).map_err(|e| io(cert, e))?;
    info!(path = %cert.display(), "generated a self-signed TLS certificate");
    Ok(())
}

/// The current UTC year (exact enough for certificate validity bounds a year wide).
fn current_year() -> i32 {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tls-").tempfile_in(dir)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("tls").join(CERT_FILE), dir.join("tls").join(KEY_FILE))
    }

    #[test]
    fn self_signed_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let auto = TlsConfig::default();
        assert!(setup(&auto, dir.path()).unwrap().is_none(), "no files, auto: plain HTTP");
        let config =
            TlsConfig { mode: TlsMode::SelfSigned, names: vec!["rm.example.com".into()], ..Default::default() };
        let first = setup(&config, dir.path()).unwrap().expect("TLS");
        let (cert, key) = pair(dir.path());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let der = CertificateDer::from_pem_file(&cert).unwrap();
        assert_eq!(first.pin(), rm_protocol::pin::pin_of_certificate(&der).unwrap());
        let served = CertificateDer::from_pem_slice(first.chain_pem().as_bytes()).unwrap();
        assert_eq!(served, der, "the served PEM is the certificate in use");
        assert!(first.pin().starts_with("sha256//"));
        let second = setup(&config, dir.path()).unwrap().unwrap();
        assert_eq!(first.pin(), second.pin(), "reused, not regenerated");
        // Files present: auto uses them too; off ignores them.
        assert!(setup(&auto, dir.path()).unwrap().is_some());
        assert!(setup(&TlsConfig { mode: TlsMode::Off, ..Default::default() }, dir.path()).unwrap().is_none());
    }

    #[test]
    fn replacement_is_picked_up_and_a_broken_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path());
        generate_self_signed(&cert, &key, &[]).unwrap();
        let certs = Certificates::load(&cert, &key).unwrap();
        let old = certs.pin();
        assert!(!certs.reload_if_changed(), "unchanged files");
        generate_self_signed(&cert, &key, &[]).unwrap();
        assert!(certs.reload_if_changed());
        let new = certs.pin();
        assert_ne!(old, new);
        // A half-finished copy: the certificate of one pair, the key of none.
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(!certs.reload_if_changed());
        assert_eq!(certs.pin(), new, "the working certificate stays");
    }

    #[test]
    fn bad_configurations_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let half = TlsConfig { cert: Some(dir.path().join("c.pem")), ..Default::default() };
        assert!(matches!(setup(&half, dir.path()), Err(TlsError::HalfConfigured)));
        let missing = TlsConfig {
            cert: Some(dir.path().join("c.pem")),
            key: Some(dir.path().join("k.pem")),
            ..Default::default()
        };
        let err = setup(&missing, dir.path()).unwrap_err().to_string();
        assert!(err.contains("c.pem") && err.contains("does not exist"), "{err}");
        std::fs::write(dir.path().join("c.pem"), "not a certificate").unwrap();
        std::fs::write(dir.path().join("k.pem"), "not a key").unwrap();
        let err = setup(&missing, dir.path()).unwrap_err().to_string();
        assert!(err.contains("c.pem"), "{err}");
    }
}
