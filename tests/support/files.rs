//! Test data: hashes, reproducible random bytes, file writes.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A path in the repository checkout (`rel` relative to its root).
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").join(rel)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `len` pseudo-random bytes from `seed` (SplitMix64): incompressible, reproducible, different per seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `bytes` to `path`, creating parent dirs.
pub fn write_file(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Replaces `path` atomically: writes a temp file in the same directory, then renames it over `path`.
pub fn replace_atomically(path: &Path, bytes: &[u8]) {
    let dir = path.parent().expect("path has a parent");
    let mut tmp = tempfile::Builder::new().prefix(".replace-").tempfile_in(dir).expect("temp file next to target");
    tmp.write_all(bytes).unwrap();
    tmp.as_file().sync_all().unwrap();
    tmp.persist(path).unwrap_or_else(|e| panic!("renaming over {}: {e}", path.display()));
}

/// SHA-256 of a file's contents (streamed), lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let mut file = fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hex::encode(hasher.finalize())
}
