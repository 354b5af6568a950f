//! restic itself, served like the agent: the published restic build per platform (`GET /restic/binary`, listed in
//! `/agent/manifest` and `SHA256SUMS`), the sidecar the release image writes beside the bundled builds, and how a
//! host's restic compares with the served one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::platform::Platform;

/// The sidecar beside the restic builds (`restic-binaries/restic-binaries.json`), written when the image is built:
/// the server cannot run a foreign-architecture binary to ask its version, and a Go binary does not carry its
/// version in a form that can be found reliably in its bytes.
pub const SIDECAR_NAME: &str = "restic-binaries.json";

/// One platform's published restic (or its absence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResticEntry {
    pub os: String,
    pub arch: String,
    pub file: String,
    #[serde(default)]
    pub published: bool,
    #[serde(default)]
    pub size: Option<u64>,
    /// Lowercase hex SHA-256 of the file.
    #[serde(default)]
    pub sha256: Option<String>,
    /// `data-dir` or `bundled`.
    #[serde(default)]
    pub source: Option<String>,
    /// HTTP date.
    #[serde(default)]
    pub last_modified: Option<String>,
    /// Where to download it by name (`/restic/binary?os=&arch=`, mutable), absolute or a path.
    pub url: String,
    /// Where to download these very bytes by digest (`/restic/blobs/sha256/<sha256>`, immutable), absolute or a path
    /// like `url`; absent from older servers and for an unpublished build (then, or on a 404, `url` is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_url: Option<String>,
    /// restic's version (`0.14.0`), from the sidecar when it lists this very file (same SHA-256); `None`: unknown.
    #[serde(default)]
    pub version: Option<String>,
    /// The distribution package it came from (`0.14.0-1+b5`), from the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_version: Option<String>,
}

impl ResticEntry {
    /// The entry's platform, if it is one this build knows.
    pub fn platform(&self) -> Option<Platform> {
        Platform::parse(&self.os, &self.arch).ok()
    }
}

/// `restic-binaries.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResticSidecar {
    /// Where the builds came from, e.g. `debian bookworm restic`.
    #[serde(default)]
    pub origin: Option<String>,
    /// File name → facts.
    #[serde(default)]
    pub files: BTreeMap<String, SidecarFile>,
}

/// One file in the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarFile {
    /// restic's own version, `0.14.0`.
    pub version: String,
    /// The package version, `0.14.0-1+b5`.
    #[serde(default)]
    pub package_version: Option<String>,
    pub sha256: String,
}

impl ResticSidecar {
    /// What the sidecar says about `file`, only if it describes these bytes (an operator's override with the same
    /// name but other content gets no borrowed version) with a plain version ([`is_plain_version`]).
    pub fn describe(&self, file: &str, sha256: &str) -> Option<&SidecarFile> {
        self.files.get(file).filter(|f| f.sha256.eq_ignore_ascii_case(sha256) && is_plain_version(&f.version))
    }
}

/// `MAJOR.MINOR` or `MAJOR.MINOR.PATCH`, digits only (at most 9 each): what a sidecar's `version` must be, since it
/// is shown and compared as it is.
pub fn is_plain_version(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The longest package version shown.
pub const MAX_PACKAGE_VERSION: usize = 64;

/// `major.minor.patch` (a missing patch is 0; a leading `v` and a suffix after the digits are ignored).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let token = text.trim();
    let token = token.strip_prefix('v').unwrap_or(token);
    let end = token.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(token.len());
    let mut parts = token[..end].split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = match parts.next() {
        None | Some("") => 0,
        Some(p) => p.parse().ok()?,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((major, minor, patch))
}

/// A host's restic against the one served for its platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResticDrift {
    /// The same version as the served one.
    Current,
    /// Older than the served one.
    Behind,
    /// Newer than the served one.
    Ahead,
    /// The host has no usable restic.
    Missing,
    /// The served version (or the host's) is not known, or nothing is served.
    Unknown,
}

impl ResticDrift {
    pub const ALL: [ResticDrift; 5] =
        [ResticDrift::Current, ResticDrift::Behind, ResticDrift::Ahead, ResticDrift::Missing, ResticDrift::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            ResticDrift::Current => "current",
            ResticDrift::Behind => "behind",
            ResticDrift::Ahead => "ahead",
            ResticDrift::Missing => "missing",
            ResticDrift::Unknown => "unknown",
        }
    }

    /// `host`: the version the agent reports (`None`: no usable restic); `served`: the served version, if known.
    pub fn of(host: Option<&str>, served: Option<&str>) -> ResticDrift {
        let Some(host) = host else { return ResticDrift::Missing };
        match (parse_version(host), served.and_then(parse_version)) {
            (Some(h), Some(s)) if h == s => ResticDrift::Current,
            (Some(h), Some(s)) if h < s => ResticDrift::Behind,
            (Some(_), Some(_)) => ResticDrift::Ahead,
            _ => ResticDrift::Unknown,
        }
    }
}
spelled_enum!(ResticDrift, "restic drift");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_versions_are_plain() {
        for good in ["0.14.0", "0.16", "1.0.10", "123456789.0"] {
            assert!(is_plain_version(good), "{good:?}");
        }
        for bad in ["", "0", "v0.14.0", "0.14.0-rc1", "0.14.0.1", "0..1", "0.1x", " 0.14", "0.14\n", "1234567890.1"] {
            assert!(!is_plain_version(bad), "{bad:?}");
        }
    }

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(parse_version("0.14.0"), Some((0, 14, 0)));
        assert_eq!(parse_version("v0.16"), Some((0, 16, 0)));
        assert_eq!(parse_version("0.17.3-dev"), Some((0, 17, 3)));
        for bad in ["", "x", "1", "1.2.3.4", "token0.14"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
        assert_eq!(ResticDrift::of(Some("0.14.0"), Some("0.14.0")), ResticDrift::Current);
        assert_eq!(ResticDrift::of(Some("0.14.0"), Some("0.16.4")), ResticDrift::Behind);
        assert_eq!(ResticDrift::of(Some("0.17.0"), Some("0.16.4")), ResticDrift::Ahead);
        assert_eq!(ResticDrift::of(None, Some("0.16.4")), ResticDrift::Missing);
        assert_eq!(ResticDrift::of(Some("0.14.0"), None), ResticDrift::Unknown);
        assert_eq!("behind".parse::<ResticDrift>(), Ok(ResticDrift::Behind));
    }

    #[test]
    fn the_sidecar_describes_only_the_bytes_it_names() {
        let sha = "ab".repeat(32);
        let sidecar: ResticSidecar = serde_json::from_value(serde_json::json!({
            "origin": "debian bookworm",
            "files": {"restic-linux-amd64": {"version": "0.14.0", "package_version": "0.14.0-1+b5", "sha256": sha}},
            "later": true
        }))
        .unwrap();
        assert_eq!(sidecar.describe("restic-linux-amd64", &sha).unwrap().version, "0.14.0");
        assert!(sidecar.describe("restic-linux-amd64", &"cd".repeat(32)).is_none());
        assert!(sidecar.describe("restic-linux-arm64", &sha).is_none());
    }
}
