//! Secrets the server must be able to read back (repository passwords, secret environment values), encrypted at rest.
//!
//! XChaCha20-Poly1305 under one 256-bit key in `<DataDir>/secret.key` (64 hex digits, mode 0600, created by
//! write-then-link on first start, never logged). Each value is stored as `nonce (24 random bytes) || ciphertext`,
//! and bound to its row by associated data (`repo-password:<name>`), so a ciphertext copied to another row, a
//! flipped byte or another key fails to open instead of yielding wrong plaintext.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::Db;
use crate::secrets::random_id;

pub const SECRET_KEY_FILE: &str = "secret.key";
const NONCE_LEN: usize = 24;

/// The key that seals stored secrets. Cheap to clone; its `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretKey {
    cipher: Arc<XChaCha20Poly1305>,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "{path} is missing, but the database holds {count} repositories or notification channels whose secrets \
         only the original key can decrypt; restore secret.key from a backup of the data dir (a new key would make \
         them unreadable)"
    )]
    MissingWithSecrets { path: PathBuf, count: u64 },
    #[error("{path} is missing; the server creates it on its first start (start the server once, or check --data-dir)")]
    Missing { path: PathBuf },
    #[error(
        "{path} does not decrypt any of the {count} stored secrets (repositories, notification channels): it is \
         not the key they were sealed with; restore the original secret.key"
    )]
    WrongKey { path: PathBuf, count: u64 },
    #[error(transparent)]
    Db(#[from] crate::DbError),
}

/// A stored value that did not open: wrong key, damaged or moved ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stored secret ({0}) cannot be decrypted: the ciphertext is damaged or was sealed under another key")]
pub struct OpenError(pub String);

impl SecretKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> SecretKey {
        SecretKey { cipher: Arc::new(XChaCha20Poly1305::new(bytes.into())) }
    }

    /// Encrypts `plaintext` for the row and field named by `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let sealed = self
            .cipher
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: context.as_bytes() })
            .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`SecretKey::seal`] produced for the same `context`.
    pub fn open(&self, context: &str, stored: &[u8]) -> Result<Vec<u8>, OpenError> {
        let fail = || OpenError(context.to_owned());
        if stored.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, sealed) = stored.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| fail())?;
        self.cipher.decrypt(&XNonce::from(nonce), Payload { msg: sealed, aad: context.as_bytes() }).map_err(|_| fail())
    }

    /// Reads `<dir>/secret.key`; `Ok(None)` when it does not exist. A file readable by group or others, or one that
    /// is not exactly 64 hex digits (a trailing newline allowed), is refused.
    pub fn load(dir: &Path) -> Result<Option<SecretKey>, KeyError> {
        let path = dir.join(SECRET_KEY_FILE);
        let err = |reason: String| KeyError::File { path: path.clone(), reason };
        let content = match fs::read(&path) {
            Ok(content) => content,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        };
        let mode = fs::metadata(&path).map_err(|e| err(e.to_string()))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode {:o} lets others read the key that protects the repository passwords; chmod 600 it",
                mode & 0o777
            )));
        }
        let text = content.strip_suffix(b"\n").unwrap_or(&content);
        let bytes = parse_hex_key(text).ok_or_else(|| {
            err("not a secret key (expected exactly 64 hex digits); restore the original file".to_owned())
        })?;
        Ok(Some(SecretKey::from_bytes(&bytes)))
    }

    /// Creates `<dir>/secret.key` with a new random key (0600, written to a temporary file and hard-linked, so it is
    /// never half-written and never replaces an existing key). If another process created it first, theirs is used.
    fn create(dir: &Path) -> Result<SecretKey, KeyError> {
        let path = dir.join(SECRET_KEY_FILE);
        let io_err = |e: io::Error| KeyError::File { path: path.clone(), reason: format!("cannot create: {e}") };
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = dir.join(format!(".{SECRET_KEY_FILE}.{}", random_id()));
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_err)?;
        let written = file.write_all(format!("{hex}\n").as_bytes()).and_then(|()| file.sync_all());
        if let Err(e) = written.and_then(|()| fs::hard_link(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            if e.kind() == io::ErrorKind::AlreadyExists {
                return SecretKey::load(dir)?.ok_or(KeyError::Missing { path });
            }
            return Err(io_err(e));
        }
        fs::remove_file(&tmp).map_err(io_err)?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        Ok(SecretKey::from_bytes(&bytes))
    }
}

fn parse_hex_key(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Where the key came from, for the log (never the key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    Loaded,
    Created,
}

/// Loads the data dir's secret key and checks it against the database: the server (`create`) makes a new key only
/// while no sealed secret exists; the command-line tools never make one. A key that opens none of the stored
/// secrets is refused. Blocks the calling thread (it runs the check from a thread of its own, so it may be called
/// from async code at startup).
pub fn unlock(db: &Db, dir: &Path, create: bool) -> Result<(SecretKey, KeyOrigin), KeyError> {
    let path = dir.join(SECRET_KEY_FILE);
    let (key, origin) = match SecretKey::load(dir)? {
        Some(key) => (key, KeyOrigin::Loaded),
        None => {
            let count = blocking(db, crate::repositories::count_sealed)?;
            if count > 0 {
                return Err(KeyError::MissingWithSecrets { path, count });
            }
            if !create {
                return Err(KeyError::Missing { path });
            }
            (SecretKey::create(dir)?, KeyOrigin::Created)
        }
    };
    let check = key.clone();
    let (count, opened) = blocking(db, move |c| crate::repositories::check_key(c, &check))?;
    if count > 0 && opened == 0 {
        return Err(KeyError::WrongKey { path, count });
    }
    if opened < count {
        tracing::warn!(
            damaged = count - opened,
            "some repository secrets cannot be decrypted; replace their passwords (PATCH /api/v1/repositories/NAME)"
        );
    }
    Ok((key, origin))
}

/// `Db::call_blocking` from a thread outside any async runtime.
fn blocking<T: Send + 'static>(
    db: &Db,
    op: impl FnOnce(&rusqlite::Connection) -> Result<T, crate::DbError> + Send + 'static,
) -> Result<T, crate::DbError> {
    std::thread::scope(|s| s.spawn(|| db.call_blocking(op)).join().unwrap_or(Err(crate::DbError::Closed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let key = SecretKey::from_bytes(&[7; 32]);
        let a = key.seal("repo-password:a", b"hunter2");
        let b = key.seal("repo-password:a", b"hunter2");
        assert_ne!(a, b, "random nonces");
        assert!(!a.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(key.open("repo-password:a", &a).unwrap(), b"hunter2");
        assert!(key.open("repo-password:b", &a).is_err(), "moved to another row");
        assert!(SecretKey::from_bytes(&[8; 32]).open("repo-password:a", &a).is_err(), "other key");
        for i in 0..a.len() {
            let mut flipped = a.clone();
            flipped[i] ^= 1;
            assert!(key.open("repo-password:a", &flipped).is_err(), "byte {i}");
        }
        assert!(key.open("repo-password:a", &a[..10]).is_err());
    }

    #[test]
    fn key_file_is_created_0600_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        assert!(SecretKey::load(dir.path()).unwrap().is_none());
        let key = SecretKey::create(dir.path()).unwrap();
        let path = dir.path().join(SECRET_KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim_end().len(), 64);
        let sealed = key.seal("x", b"v");
        let again = SecretKey::load(dir.path()).unwrap().unwrap();
        assert_eq!(again.open("x", &sealed).unwrap(), b"v");
        // Creating again never replaces the existing key.
        let third = SecretKey::create(dir.path()).unwrap();
        assert_eq!(third.open("x", &sealed).unwrap(), b"v");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary files left");
    }

    #[test]
    fn loose_or_malformed_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        SecretKey::create(dir.path()).unwrap();
        let path = dir.path().join(SECRET_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        for bad in ["", "abc\n", &"g".repeat(64), &"a".repeat(63), &"a".repeat(66)] {
            fs::write(&path, bad).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = SecretKey::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("64 hex digits"), "{bad:?}: {err}");
        }
    }
}
