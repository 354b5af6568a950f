//! Install scripts learn the server's URL from the server: the placeholder `__RM_SERVER_URL__` in `*.sh` and `*.ps1`
//! files is replaced by the base URL ([`crate::public_url::base_url`]: the configured public URL, else a strictly
//! validated Host). That value contains only URL-safe characters, never quotes, `$`, backticks, semicolons, spaces or
//! newlines, so it cannot break out of the single-quoted string the scripts keep it in. Without a usable base URL the
//! placeholder stays and the scripts ask for `--server`.
//!
//! The rendered bytes are a representation of their own: length, ETag and digests describe them, not the file.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rm_assets::{Digest, OpenAsset};
use sha2::Digest as _;

use crate::ApiError;
use crate::file_response::{Content, Representation};

pub const PLACEHOLDER: &str = "__RM_SERVER_URL__";
/// Scripts larger than this are served as they are (an install script is a few KiB).
const MAX_TEMPLATE: u64 = 1024 * 1024;

pub fn is_template(name: &str) -> bool {
    name.ends_with(".sh") || name.ends_with(".ps1")
}

/// Fills in the base URL (blocking: reads the file from its open handle).
pub fn render(asset: OpenAsset, base: Option<&str>) -> Result<Representation, ApiError> {
    let Some(base) = base else { return Ok(asset.into()) };
    debug_assert!(base.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~/:[]%".contains(&b)));
    if asset.len > MAX_TEMPLATE {
        return Ok(asset.into());
    }
    let mut raw = vec![0u8; asset.len as usize];
    asset.file.read_exact_at(&mut raw, 0).map_err(|e| ApiError::Internal(format!("reading {}: {e}", asset.name)))?;
    let Some(rendered) = replace_all(&raw, PLACEHOLDER.as_bytes(), base.as_bytes()) else {
        return Ok(asset.into());
    };
    let bytes = bytes::Bytes::from(rendered);
    let digest = Digest { sha256: sha2::Sha256::digest(&bytes).into(), build_info: None };
    Ok(Representation {
        len: bytes.len() as u64,
        content: Content::Memory(bytes),
        modified: asset.modified,
        source: asset.source,
        name: asset.name,
        digest: Arc::new(digest),
    })
}

/// Byte-level replacement (scripts need not be UTF-8); `None` when `needle` does not occur.
fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(haystack.len() + with.len());
    let mut rest = haystack;
    let mut found = false;
    while let Some(pos) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(with);
        rest = &rest[pos + needle.len()..];
        found = true;
    }
    out.extend_from_slice(rest);
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_every_occurrence_bytewise() {
        assert_eq!(replace_all(b"a__X__b__X__", b"__X__", b"u"), Some(b"aubu".to_vec()));
        assert_eq!(replace_all(b"\xff__X__\xfe", b"__X__", b"u"), Some(b"\xffu\xfe".to_vec()));
        assert_eq!(replace_all(b"nothing", b"__X__", b"u"), None);
    }
}
