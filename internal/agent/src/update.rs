//! Verified self-update.
//!
//! 1. Download the served build into a temporary file in the executable's own directory (same filesystem, so the
//!    final swap is a rename).
//! 2. Check its size and SHA-256 against what the server announced.
//! 3. Make it executable and run `<new> --version`: it must exit 0 within 15 s and identify as the agent.
//! 4. Copy the running binary to `<exe>.previous` (for rollback), then swap the new one in atomically (a rename on
//!    Unix followed by a directory fsync; `self-replace` on Windows, where the running executable is locked).
//!
//! Any failure leaves the running binary untouched and is returned for the next heartbeat to report.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::AgentError;
use rm_protocol::PlatformEntry;

use crate::client::Client;

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    UpToDate,
    Updated { previous: PathBuf, version: String },
}

/// The running executable (resolved through symlinks).
pub fn current_exe() -> Result<PathBuf, AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::io("locating the running executable"))?;
    Ok(std::fs::canonicalize(&exe).unwrap_or(exe))
}

/// Replaces `exe` with the served build if it differs. `show_progress` draws a bar on a terminal.
pub fn apply(
    client: &Client,
    credential: Option<&str>,
    served: &PlatformEntry,
    exe: &Path,
    show_progress: bool,
) -> Result<Outcome, AgentError> {
    let (Some(want_sha), Some(want_size)) = (served.sha256.as_deref(), served.size) else {
        return Err(AgentError::Verification("the server announced no checksum for its build".into()));
    };
    if crate::sha256_file(exe)? == want_sha {
        return Ok(Outcome::UpToDate);
    }
    let dir = exe.parent().ok_or_else(|| AgentError::Usage(format!("{} has no parent directory", exe.display())))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".restic-manager-agent-update-")
        .tempfile_in(dir)
        .map_err(AgentError::io(format!("creating a temporary file in {}", dir.display())))?;

    let bar = (show_progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(want_size);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("static template"),
        );
        bar
    });
    let mut hashing = HashingWriter { inner: tmp.as_file_mut(), hasher: sha2::Sha256::new() };
    let got_size = client.download(&served.url, credential, &mut hashing, |done, _| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let got_sha = hex::encode(hashing.hasher.finalize());
    if got_size != want_size {
        return Err(AgentError::Verification(format!("got {got_size} bytes, the server announced {want_size}")));
    }
    if got_sha != want_sha {
        return Err(AgentError::Verification(format!("sha256 {got_sha}, the server announced {want_sha}")));
    }
    tmp.as_file().sync_all().map_err(AgentError::io("syncing the download"))?;
    // Close the write handle before executing it (Linux refuses to run a file open for writing).
    let new = tmp.into_temp_path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755))
            .map_err(AgentError::io("chmod of the new agent"))?;
    }
    let version = smoke_test(&new)?;

    let previous = previous_path(exe);
    std::fs::copy(exe, &previous)
        .and_then(|_| std::fs::File::open(&previous)?.sync_all())
        .map_err(AgentError::io(format!("keeping the previous agent as {}", previous.display())))?;
    swap(new, exe, dir)?;
    Ok(Outcome::Updated { previous, version })
}

/// Unix: rename the already-synced download over the executable (atomic; the running process keeps its inode), then
/// sync the directory so the rename survives a power loss.
#[cfg(unix)]
fn swap(new: tempfile::TempPath, exe: &Path, dir: &Path) -> Result<(), AgentError> {
    new.persist(exe).map_err(|e| AgentError::io("swapping in the new agent")(e.error))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(AgentError::io(format!("syncing {}", dir.display())))
}

/// Windows: a running executable cannot be overwritten; `self-replace` moves it aside first.
#[cfg(not(unix))]
fn swap(new: tempfile::TempPath, _exe: &Path, _dir: &Path) -> Result<(), AgentError> {
    self_replace::self_replace(&new).map_err(AgentError::io("swapping in the new agent"))
}

pub fn previous_path(exe: &Path) -> PathBuf {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(".previous");
    exe.with_file_name(name)
}

/// Runs `<binary> --version`; it must succeed within 15 s and print `restic-manager-agent version=…`.
fn smoke_test(binary: &Path) -> Result<String, AgentError> {
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| AgentError::SmokeTest(format!("cannot run it: {e}")))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| AgentError::SmokeTest(e.to_string()))? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(AgentError::SmokeTest("--version did not finish within 15 s".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    if !status.success() {
        return Err(AgentError::SmokeTest(format!("--version exited with {status}")));
    }
    let line = out.lines().next().unwrap_or_default().trim().to_string();
    if !line.starts_with("restic-manager-agent version=") {
        return Err(AgentError::SmokeTest(format!("--version printed {line:?}, not an agent version")));
    }
    Ok(line)
}

struct HashingWriter<'a, W: std::io::Write> {
    inner: &'a mut W,
    hasher: sha2::Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
