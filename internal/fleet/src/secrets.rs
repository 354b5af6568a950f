//! Random secrets, their stored form (SHA-256; the secrets are 256-bit random, so a slow hash adds nothing), and
//! constant-time comparison. Prefixes tell an operator (and secret scanners) what a token is.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const ADMIN_PREFIX: &str = "rmadm_";
pub const ENROLL_PREFIX: &str = "rmenr_";
pub const AGENT_PREFIX: &str = "rmagt_";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

pub type SecretHash = [u8; 32];

/// 32 random bytes, base64url without padding (43 characters).
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A short random identifier for rows an operator sees (agent ids, token ids): 12 base32-ish characters.
pub fn random_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char).collect()
}

pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares a presented secret with a stored hash in constant time.
pub fn verify(presented: &str, stored: &[u8]) -> bool {
    let hash = hash_secret(presented);
    stored.len() == hash.len() && bool::from(hash.ct_eq(stored))
}

/// An agent credential is `rmagt_<agent id>_<secret>`: the id finds the row, the secret is checked against its hash.
pub fn split_agent_credential(credential: &str) -> Option<(&str, &str)> {
    let rest = credential.strip_prefix(AGENT_PREFIX)?;
    let (id, _) = rest.split_once('_')?;
    (!id.is_empty()).then_some((id, credential))
}

/// The admin token's hash, from `RM_ADMIN_TOKEN` or the token file in the data dir (created 0600 on first start).
pub struct AdminToken {
    hash: SecretHash,
    /// Where it came from, for the log (never the token itself).
    pub origin: AdminTokenOrigin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTokenOrigin {
    Environment,
    File { path: PathBuf, created: bool },
}

impl AdminToken {
    pub fn from_value(token: &str) -> Result<AdminToken, String> {
        if token.trim() != token || token.len() < 16 {
            return Err("the admin token must be at least 16 characters without surrounding white space".into());
        }
        Ok(AdminToken { hash: hash_secret(token), origin: AdminTokenOrigin::Environment })
    }

    /// Reads `<dir>/admin.token`, or creates it with a new random token (mode 0600, written to a temporary file and
    /// renamed, so a crash never leaves a half-written token).
    pub fn load_or_create(dir: &Path) -> io::Result<AdminToken> {
        let path = dir.join(ADMIN_TOKEN_FILE);
        match fs::read_to_string(&path) {
            Ok(content) => {
                let token = content.trim();
                if token.is_empty() {
                    return Err(io::Error::other(format!(
                        "{} is empty; delete it to generate a new token",
                        path.display()
                    )));
                }
                let mode = fs::metadata(&path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "admin token file is readable by others; chmod 600 it");
                }
                Ok(AdminToken { hash: hash_secret(token), origin: AdminTokenOrigin::File { path, created: false } })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let token = format!("{ADMIN_PREFIX}{}", random_secret());
                let tmp = dir.join(format!(".{ADMIN_TOKEN_FILE}.{}", random_id()));
                let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
                let written = file.write_all(format!("{token}\n").as_bytes()).and_then(|()| file.sync_all());
                if let Err(e) = written.and_then(|()| fs::hard_link(&tmp, &path)) {
                    let _ = fs::remove_file(&tmp);
                    // Another process created it first: use theirs.
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        return AdminToken::load_or_create(dir);
                    }
                    return Err(e);
                }
                fs::remove_file(&tmp)?;
                fs::File::open(dir)?.sync_all()?;
                Ok(AdminToken { hash: hash_secret(&token), origin: AdminTokenOrigin::File { path, created: true } })
            }
            Err(e) => Err(e),
        }
    }

    pub fn verify(&self, presented: &str) -> bool {
        verify(presented, &self.hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_verify_only_themselves() {
        let (a, b) = (random_secret(), random_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        let stored = hash_secret(&a);
        assert!(verify(&a, &stored));
        assert!(!verify(&b, &stored));
        assert!(!verify("", &stored));
        assert!(!verify(&a, &stored[..31]));
    }

    #[test]
    fn agent_credentials_split_into_id_and_whole() {
        assert_eq!(split_agent_credential("rmagt_abc_xyz"), Some(("abc", "rmagt_abc_xyz")));
        assert_eq!(split_agent_credential("rmagt__xyz"), None);
        assert_eq!(split_agent_credential("rmenr_abc_xyz"), None);
        assert_eq!(split_agent_credential("rmagt_abc"), None);
    }

    #[test]
    fn admin_token_file_is_created_0600_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = AdminToken::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        assert_eq!(first.origin, AdminTokenOrigin::File { path: path.clone(), created: true });
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let token = fs::read_to_string(&path).unwrap().trim().to_string();
        assert!(token.starts_with(ADMIN_PREFIX));
        let second = AdminToken::load_or_create(dir.path()).unwrap();
        assert!(matches!(second.origin, AdminTokenOrigin::File { created: false, .. }));
        assert!(second.verify(&token) && first.verify(&token));
        assert!(!second.verify("rmadm_wrong"));
        // Nothing else is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn env_admin_token_must_be_long_enough() {
        assert!(AdminToken::from_value("short").is_err());
        assert!(AdminToken::from_value(" padded-token-value ").is_err());
        assert!(AdminToken::from_value("a-long-enough-admin-token").unwrap().verify("a-long-enough-admin-token"));
    }
}
