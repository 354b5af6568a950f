//! The agent's managed restic: the restic build the server serves for this platform, installed with the same
//! verification as the agent's own self-update ([`crate::update`]): download into a temporary file beside the
//! target, size and SHA-256 against what the server announced over the trusted connection, a smoke run
//! (`<new> version` must print `restic X.Y.Z …`, at least [`restic::MIN_VERSION`], within the smoke-test limit),
//! then an atomic rename and a directory fsync.
//!
//! Where: `restic-manager-restic` (`.exe` on Windows) beside the agent's executable. That directory is already
//! writable for the agent (its self-update swaps itself there; the systemd unit's `ReadWritePaths=`), `install.sh
//! --with-restic` puts it in the same place, and the name can never be a host's own `restic` on `PATH`, which is
//! therefore never replaced. [`restic::detect_best`] considers it beside `PATH`'s restic; `--restic` wins over both.
//!
//! When (see [`reason_to_install`]): the host has no usable restic, the applied plans' repositories require a newer
//! one than the agent runs, or the server serves a newer restic than the managed one installed earlier. A refused
//! build (its SHA-256: size, hash or smoke run) is not tried again until the server serves another one; any other
//! failure (network, server error, disk) is tried again after a capped backoff. The error rides every heartbeat.

use std::path::{Path, PathBuf};

use rm_protocol::restic_dist::ResticEntry;

use crate::AgentError;
use crate::client::Client;
use crate::restic::{self, Restic, Version};
use crate::update;

/// The managed restic's file name.
pub const MANAGED_NAME: &str = if cfg!(windows) { "restic-manager-restic.exe" } else { "restic-manager-restic" };

/// The managed restic beside the agent executable `exe`.
pub fn managed_path(exe: &Path) -> PathBuf {
    exe.with_file_name(MANAGED_NAME)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The managed restic already is the served build.
    UpToDate,
    /// Installed (or replaced) at `path`; the smoke run said `version`.
    Installed { path: PathBuf, version: Version },
}

/// The served restic's version, when the server knows it.
fn served_version(served: &ResticEntry) -> Option<Version> {
    let (major, minor, patch) = rm_protocol::restic_dist::parse_version(served.version.as_deref()?)?;
    Some(Version { major, minor, patch })
}

/// Why the served restic should be installed now, or `None`. `current`: what the agent would run;
/// `managed`: the managed restic, if one is installed and works; `required`: the highest `min_restic_version` of
/// the applied plans' repositories.
pub fn reason_to_install(
    current: &Result<Restic, String>,
    managed: Option<&Restic>,
    served: &ResticEntry,
    required: Option<Version>,
) -> Option<String> {
    if !served.published || served.sha256.is_none() {
        return None;
    }
    let offered = served_version(served);
    match current {
        Err(e) => return Some(format!("no usable restic ({})", crate::printable(e))),
        Ok(r) => {
            if let Some(required) = required.filter(|&req| r.version < req) {
                // Only worth it if the served one is (or may be) new enough.
                if offered.is_none_or(|v| v >= required) {
                    return Some(format!("a repository requires restic {required}, this host runs {}", r.version));
                }
            }
        }
    }
    match (managed, offered) {
        (Some(m), Some(v)) if v > m.version => {
            Some(format!("the server serves restic {v}, newer than the managed {}", m.version))
        }
        _ => None,
    }
}

/// Installs the served restic at `dest` unless it already is that build. Any failure leaves `dest` as it was.
/// `stopping` abandons the download once it says yes (the agent is shutting down). `floor`: the swap is refused
/// when the smoke run says an older restic (no downgrade below the managed restic in use or a repository's
/// `min_restic_version`); `None` (an explicit `restic install`) installs whatever the server serves.
#[allow(clippy::too_many_arguments)]
pub fn install(
    client: &Client,
    credential: Option<&str>,
    served: &ResticEntry,
    dest: &Path,
    show_progress: bool,
    stopping: &dyn Fn() -> bool,
    floor: Option<Version>,
) -> Result<Installed, AgentError> {
    if !served.published {
        return Err(AgentError::Usage(format!("the server publishes no restic for {}/{}", served.os, served.arch)));
    }
    let (want_sha, want_size) = update::announced(served.sha256.as_deref(), served.size, "its restic")?;
    if dest.is_file() && crate::sha256_file(dest)? == want_sha {
        return Ok(Installed::UpToDate);
    }
    let dir = dest.parent().ok_or_else(|| AgentError::Usage(format!("{} has no parent directory", dest.display())))?;
    let new = update::download_verified(
        client,
        credential,
        update::Locations { blob: served.blob_url.as_deref(), name: &served.url },
        (&want_sha, want_size),
        dir,
        ".restic-manager-restic-",
        show_progress,
        stopping,
    )
    .map_err(refused)?;
    let version = smoke_test(&new).map_err(refused)?;
    if let Some(floor) = floor.filter(|&f| version < f) {
        return Err(AgentError::ResticRefused(format!(
            "the downloaded restic is {version}, older than the {floor} this host needs (the managed restic in use or \
             a repository's min_restic_version); not installed"
        )));
    }
    update::install_file(new, dest, dir)?;
    Ok(Installed::Installed { path: dest.to_path_buf(), version })
}

/// The shared steps' errors, worded for restic (they speak of "the agent" otherwise).
fn refused(e: AgentError) -> AgentError {
    match e {
        AgentError::Verification(m) => AgentError::ResticRefused(format!("the downloaded restic does not match: {m}")),
        AgentError::SmokeTest(m) => {
            AgentError::ResticRefused(format!("the downloaded restic failed its smoke run: {m}"))
        }
        other => other,
    }
}

/// `<candidate> version` must print restic's version line, of a supported restic.
fn smoke_test(candidate: &Path) -> Result<Version, AgentError> {
    let out = update::smoke_run(candidate, "version", update::smoke_timeout())?;
    let version = restic::parse_version_output(&out).ok_or_else(|| {
        let first = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("nothing");
        let first: String = crate::printable(first).chars().take(200).collect();
        AgentError::SmokeTest(format!("`version` printed {first:?}, not restic's version"))
    })?;
    if version < restic::MIN_VERSION {
        return Err(AgentError::SmokeTest(format!(
            "it is restic {version}; restic-manager needs {} or newer",
            restic::MIN_VERSION
        )));
    }
    Ok(version)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("candidate");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn entry(version: Option<&str>) -> ResticEntry {
        ResticEntry {
            os: "linux".into(),
            arch: "amd64".into(),
            file: "restic-linux-amd64".into(),
            published: true,
            size: Some(1),
            sha256: Some("ab".repeat(32)),
            source: None,
            last_modified: None,
            url: "/restic/binary?os=linux&arch=amd64".into(),
            blob_url: None,
            version: version.map(str::to_owned),
            package_version: None,
        }
    }

    fn restic(path: &str, v: (u32, u32, u32)) -> Restic {
        Restic { path: path.into(), version: Version { major: v.0, minor: v.1, patch: v.2 } }
    }

    #[test]
    fn the_smoke_test_wants_a_supported_restic() {
        let dir = tempfile::tempdir().unwrap();
        let ok = script(dir.path(), "echo 'restic 0.16.4 compiled with go1.21 on linux/amd64'");
        assert_eq!(smoke_test(&ok).unwrap(), Version { major: 0, minor: 16, patch: 4 });
        let other = script(dir.path(), "echo 'hello from a script'");
        assert!(smoke_test(&other).unwrap_err().to_string().contains("not restic's version"));
        let old = script(dir.path(), "echo 'restic 0.12.1 compiled with go1.15'");
        assert!(smoke_test(&old).unwrap_err().to_string().contains("needs 0.14.0 or newer"));
        let failing = script(dir.path(), "echo 'restic 0.16.0'; exit 2");
        assert!(smoke_test(&failing).unwrap_err().to_string().contains("exited with"));
    }

    #[test]
    fn install_only_when_needed() {
        let served = entry(Some("0.16.4"));
        let none: Result<Restic, String> = Err("restic is not installed".into());
        assert!(reason_to_install(&none, None, &served, None).unwrap().contains("no usable restic"));
        let host = Ok(restic("/usr/bin/restic", (0, 14, 0)));
        assert_eq!(reason_to_install(&host, None, &served, None), None, "a working host restic is kept");
        let req = Some(Version { major: 0, minor: 15, patch: 0 });
        assert!(reason_to_install(&host, None, &served, req).unwrap().contains("requires restic 0.15.0"));
        let too_high = Some(Version { major: 0, minor: 17, patch: 0 });
        assert_eq!(reason_to_install(&host, None, &served, too_high), None, "the served one would not help");
        let managed = restic("/opt/bin/restic-manager-restic", (0, 15, 0));
        assert!(reason_to_install(&host, Some(&managed), &served, None).unwrap().contains("newer than the managed"));
        assert_eq!(reason_to_install(&host, Some(&managed), &entry(None), None), None, "unknown: keep");
        let unpublished = ResticEntry { published: false, ..served };
        assert_eq!(reason_to_install(&none, None, &unpublished, None), None);
    }
}
