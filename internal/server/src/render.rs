//! Install scripts learn the server's URL from the server: the placeholder `__RM_SERVER_URL__` in `*.sh` and `*.ps1`
//! files is replaced by the base URL ([`crate::public_url::base_url`]: the configured public URL, else a strictly
//! validated Host). That value contains only URL-safe characters, never quotes, `$`, backticks, semicolons, spaces or
//! newlines, so it cannot break out of the single-quoted string the scripts keep it in. Without a usable base URL the
//! placeholder stays and the scripts ask for `--server`.
//!
//! The rendered bytes are a representation of their own: length, ETag and digests describe them, not the file.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use rm_assets::{Digest, Known, OpenAsset};
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
pub fn render(asset: OpenAsset, base: Option<&str>, cache: &RenderCache) -> Result<Representation, ApiError> {
    let Some(base) = base else { return Ok(asset.into()) };
    if asset.len > MAX_TEMPLATE {
        return Ok(asset.into());
    }
    let mut raw = vec![0u8; asset.len as usize];
    asset.file.read_exact_at(&mut raw, 0).map_err(|e| ApiError::Internal(format!("reading {}: {e}", asset.name)))?;
    match cache.get_or_render(&asset.digest, base, || Some(raw)) {
        Some(rendered) => Ok(rendered.representation(asset.modified, asset.source, asset.name)),
        None => Ok(asset.into()),
    }
}

/// The fast path: a remembered script version whose rendering for `base` is cached. `None`: do the full lookup.
pub fn cached(known: &Arc<Known>, base: Option<&str>, cache: &RenderCache) -> Option<Representation> {
    let Some(base) = base else { return Some(known.clone().into()) };
    if known.len > MAX_TEMPLATE {
        return Some(known.clone().into());
    }
    let rendered = cache.get(&known.digest, base)?;
    Some(match rendered {
        Rendered::Unchanged => known.clone().into(),
        rendered => rendered.representation(known.modified, known.source, known.name.clone()),
    })
}

/// A rendering of one file version for one base URL.
#[derive(Clone)]
pub enum Rendered {
    /// The file has no placeholder: serve it as it is.
    Unchanged,
    Bytes(bytes::Bytes, Arc<Digest>),
}

impl Rendered {
    fn representation(
        &self,
        modified: std::time::SystemTime,
        source: rm_assets::Source,
        name: String,
    ) -> Representation {
        let Rendered::Bytes(bytes, digest) = self else { unreachable!("callers handle Unchanged") };
        Representation {
            len: bytes.len() as u64,
            content: Content::Memory(bytes.clone()),
            modified,
            source,
            name,
            digest: digest.clone(),
        }
    }
}

/// Renderings keyed by (file sha256, base URL). Bounded: a flood of Host values only recycles it.
#[derive(Default)]
pub struct RenderCache {
    map: Mutex<HashMap<([u8; 32], String), Rendered>>,
}

const RENDER_CACHE_ENTRIES: usize = 64;

impl RenderCache {
    fn get(&self, file: &Digest, base: &str) -> Option<Rendered> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&(file.sha256, base.to_string())).cloned()
    }

    /// The rendering of `raw()` for `base`; `None` when the file has no placeholder.
    fn get_or_render(&self, file: &Digest, base: &str, raw: impl FnOnce() -> Option<Vec<u8>>) -> Option<Rendered> {
        if let Some(hit) = self.get(file, base) {
            return match hit {
                Rendered::Unchanged => None,
                bytes => Some(bytes),
            };
        }
        let rendered = match replace_all(&raw()?, PLACEHOLDER.as_bytes(), base.as_bytes()) {
            None => Rendered::Unchanged,
            Some(out) => {
                let digest = Digest { sha256: sha2::Sha256::digest(&out).into(), build_info: None };
                Rendered::Bytes(bytes::Bytes::from(out), Arc::new(digest))
            }
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RENDER_CACHE_ENTRIES {
            map.clear();
        }
        map.insert((file.sha256, base.to_string()), rendered.clone());
        match rendered {
            Rendered::Unchanged => None,
            bytes => Some(bytes),
        }
    }
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
