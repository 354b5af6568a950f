//! Verified self-update, and the download-verify-smoke-swap steps it shares with installing restic
//! ([`crate::restic_install`]).
//!
//! 1. Download the served build into a temporary file in the executable's own directory (same filesystem, so the
//!    final swap is a rename).
//! 2. Check its size and SHA-256 against what the server announced; the download stops at the announced size.
//! 3. Make it executable and run `<new> --version`: it must exit 0 and close its output within 15 s and identify as
//!    the agent; it runs in its own process group, which is killed afterwards (SIGKILL), so nothing it starts can
//!    outlive the check or hold the agent up.
//! 4. Copy the running binary to `<exe>.previous` (for rollback), then swap the new one in atomically (a rename on
//!    Unix followed by a directory fsync; `self-replace` on Windows, where the running executable is locked).
//!
//! Any failure leaves the running binary untouched and is returned for the next heartbeat to report.
//!
//! [`revert`] is the way back ([`crate::trial`] calls it when the new build fails its trial start or crash-loops): a
//! copy of `<exe>.previous`, checked to be the build expected, swapped in the same way.

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
    let (want_sha, want_size) = announced(served.sha256.as_deref(), served.size, "its build")?;
    if crate::sha256_file(exe)? == want_sha {
        return Ok(Outcome::UpToDate);
    }
    let dir = exe.parent().ok_or_else(|| AgentError::Usage(format!("{} has no parent directory", exe.display())))?;
    let new = download_verified(
        client,
        credential,
        Locations { blob: served.blob_url.as_deref(), name: &served.url },
        (&want_sha, want_size),
        dir,
        ".restic-manager-agent-update-",
        show_progress,
        &|| false,
    )?;
    let version = smoke_test(&new)?;

    let previous = previous_path(exe);
    std::fs::copy(exe, &previous)
        .and_then(|_| std::fs::File::open(&previous)?.sync_all())
        .map_err(AgentError::io(format!("keeping the previous agent as {}", previous.display())))?;
    swap(new, exe, dir)?;
    Ok(Outcome::Updated { previous, version })
}

/// The SHA-256 (lowercase) and size a server announced for a file, checked to be there and well formed.
pub(crate) fn announced(sha256: Option<&str>, size: Option<u64>, what: &str) -> Result<(String, u64), AgentError> {
    let (Some(want_sha), Some(want_size)) = (sha256, size) else {
        return Err(AgentError::Verification(format!("the server announced no checksum for {what}")));
    };
    if !rm_protocol::validate::is_sha256_hex(want_sha) {
        return Err(AgentError::Verification(format!(
            "the server announced {:?}, not a SHA-256",
            crate::printable(want_sha)
        )));
    }
    Ok((want_sha.to_ascii_lowercase(), want_size))
}

/// Where a served file can be downloaded: by digest (`blob`, the server's `blob_url`: a URL that only ever serves
/// those bytes, so any HTTP cache in between may keep it) and by name (`url`, whatever the server serves now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Locations<'a> {
    pub blob: Option<&'a str>,
    pub name: &'a str,
}

impl<'a> Locations<'a> {
    /// The URLs in the order they are tried: the blob first, when the server named one.
    fn in_order(self) -> Vec<&'a str> {
        self.blob.into_iter().chain([self.name]).collect()
    }
}

/// Whether a failed download by digest is tried again by name: only when the server says it has no such blob (404:
/// the file was replaced between the announcement and the download, or the server predates blobs). Anything else
/// is the answer: a mismatch is refused wherever it came from, and another error of the same server would only
/// repeat. The check after the download does not change, so the name can never install other bytes than announced.
fn try_next_after(e: &AgentError) -> bool {
    matches!(e, AgentError::Server { status: 404, .. })
}

/// Downloads the file at `from` (its blob URL, else or on a 404 its name; see [`try_next_after`]) into a temporary
/// file in `dir` (same filesystem as the file it will replace), checks its size and SHA-256 against `want` (the
/// download stops at the announced size), syncs it, closes it and makes it executable. The temporary file is deleted
/// on any failure and whenever the returned path is dropped. `stopping` is asked before each chunk is written: once
/// it says yes, the download is abandoned (the agent is shutting down).
#[allow(clippy::too_many_arguments)]
pub(crate) fn download_verified(
    client: &Client,
    credential: Option<&str>,
    from: Locations<'_>,
    want: (&str, u64),
    dir: &Path,
    prefix: &str,
    show_progress: bool,
    stopping: &dyn Fn() -> bool,
) -> Result<tempfile::TempPath, AgentError> {
    let urls = from.in_order();
    for (i, url) in urls.iter().enumerate() {
        match download_one(client, credential, url, want, dir, prefix, show_progress, stopping) {
            Err(e) if i + 1 < urls.len() && try_next_after(&e) => crate::log(format!(
                "{} answered 404 ({e}); downloading {} instead",
                crate::printable(url),
                crate::printable(urls[i + 1])
            )),
            done => return done,
        }
    }
    unreachable!("the name is always tried last")
}

/// [`download_verified`] from one URL.
#[allow(clippy::too_many_arguments)]
fn download_one(
    client: &Client,
    credential: Option<&str>,
    url: &str,
    want: (&str, u64),
    dir: &Path,
    prefix: &str,
    show_progress: bool,
    stopping: &dyn Fn() -> bool,
) -> Result<tempfile::TempPath, AgentError> {
    let (want_sha, want_size) = want;
    let mut tmp = tempfile::Builder::new()
        .prefix(prefix)
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
    let mut hashing = HashingWriter { inner: tmp.as_file_mut(), hasher: sha2::Sha256::new(), stopping };
    // Never more than announced lands on disk: the download stops (and the temporary file is deleted) as soon as
    // the server sends a byte past `want_size`.
    let got_size = client
        .download(url, credential, want_size, &mut hashing, |done, _| {
            if let Some(bar) = &bar {
                bar.set_position(done);
            }
        })
        .map_err(
            |e| if stopping() { AgentError::Usage("download abandoned: the agent is stopping".into()) } else { e },
        )?;
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
            .map_err(AgentError::io("chmod of the download"))?;
    }
    Ok(new)
}

/// The name prefixes of the temporary files [`download_verified`] leaves beside the agent while it runs (an agent
/// killed mid-download leaves one behind).
pub(crate) const TEMP_PREFIXES: [&str; 2] = [".restic-manager-agent-update-", ".restic-manager-restic-"];

/// Removes the temporary downloads a previous agent left in `dir` (killed before it could delete them); returns how
/// many were removed. Called at `run`'s start, before this process downloads anything. Only regular files (not
/// symlinks) whose names start with one of [`TEMP_PREFIXES`].
pub fn remove_stale_downloads(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = TEMP_PREFIXES.iter().any(|p| name.starts_with(p));
        if ours && entry.file_type().is_ok_and(|t| t.is_file()) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Renames a verified download over `dest` (not a running executable) and syncs the directory: atomic, and the
/// rename survives a power loss.
pub(crate) fn install_file(new: tempfile::TempPath, dest: &Path, dir: &Path) -> Result<(), AgentError> {
    new.persist(dest).map_err(|e| AgentError::io(format!("renaming the download to {}", dest.display()))(e.error))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(AgentError::io(format!("syncing {}", dir.display())))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Unix: rename the already-synced download over the executable (atomic; the running process keeps its inode), then
/// sync the directory so the rename survives a power loss.
#[cfg(unix)]
fn swap(new: tempfile::TempPath, exe: &Path, dir: &Path) -> Result<(), AgentError> {
    new.persist(exe).map_err(|e| AgentError::io("swapping in the new agent")(e.error))?;
    sync_dir(dir)
}

/// Windows: a running executable cannot be overwritten; `self-replace` moves it aside first.
#[cfg(not(unix))]
fn swap(new: tempfile::TempPath, _exe: &Path, _dir: &Path) -> Result<(), AgentError> {
    self_replace::self_replace(&new).map_err(AgentError::io("swapping in the new agent"))
}

/// Puts `<exe>.previous` back over `exe`, only if it is the build `expected_sha` (the one this agent ran before): it
/// is copied into a temporary file beside `exe` while hashed, and the copy is swapped in (as in [`apply`]) only when
/// its SHA-256 matches, so a missing, changed or unknown `.previous` never replaces the agent. `exe` is checked
/// afterwards to hold exactly those bytes. `.previous` itself stays (it is the running build's copy again).
pub fn revert(exe: &Path, expected_sha: &str) -> Result<(), AgentError> {
    let previous = previous_path(exe);
    let refuse = |why: String| Err(AgentError::Revert(why));
    let dir = exe.parent().ok_or_else(|| AgentError::Usage(format!("{} has no parent directory", exe.display())))?;
    let mut source = match std::fs::File::open(&previous) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
        Ok(_) => return refuse(format!("{} is not a regular file", previous.display())),
        Err(e) => return refuse(format!("no previous build at {}: {e}", previous.display())),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIXES[0])
        .tempfile_in(dir)
        .map_err(AgentError::io(format!("creating a temporary file in {}", dir.display())))?;
    let mut hashing = HashingWriter { inner: tmp.as_file_mut(), hasher: sha2::Sha256::new(), stopping: &|| false };
    std::io::copy(&mut source, &mut hashing).map_err(AgentError::io(format!("copying {}", previous.display())))?;
    let got = hex::encode(hashing.hasher.finalize());
    let want = expected_sha.to_ascii_lowercase();
    if got != want {
        return refuse(format!(
            "{} is the build {got}, not {}, the one this agent ran before; refusing to swap in unknown bytes",
            previous.display(),
            crate::printable(&want)
        ));
    }
    tmp.as_file().sync_all().map_err(AgentError::io("syncing the restored agent"))?;
    let restored = tmp.into_temp_path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&restored, std::fs::Permissions::from_mode(0o755))
            .map_err(AgentError::io("chmod of the restored agent"))?;
    }
    swap(restored, exe, dir)?;
    let now = crate::sha256_file(exe)?;
    if now != want {
        return refuse(format!("{} is the build {now} after the swap, not {want}", exe.display()));
    }
    Ok(())
}

pub fn previous_path(exe: &Path) -> PathBuf {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(".previous");
    exe.with_file_name(name)
}

/// How long `<new> --version` may take: 15 s, or `RM_AGENT_SMOKE_TIMEOUT` (whole seconds). The variable exists for
/// the end-to-end tests; operators have no reason to set it.
pub(crate) fn smoke_timeout() -> Duration {
    std::env::var("RM_AGENT_SMOKE_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().trim_end_matches('s').parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(Duration::from_secs(15), Duration::from_secs)
}

/// Runs `<binary> --version`; it must exit 0, close its output and print `restic-manager-agent version=…` within
/// the time limit (15 s). The limit holds against the whole process tree: on Unix the candidate runs in its own
/// process group, and when the time is up (or when it exited but something it started still holds its output) the
/// group is killed with SIGKILL. The group is killed while its leader is still an unreaped zombie, so the group id
/// cannot have been reused by then.
pub(crate) fn smoke_test(binary: &Path) -> Result<String, AgentError> {
    smoke_test_within(binary, smoke_timeout())
}

fn smoke_test_within(binary: &Path, limit: Duration) -> Result<String, AgentError> {
    let out = smoke_run(binary, "--version", limit)?;
    let line = crate::printable(out.lines().next().unwrap_or_default().trim());
    if !line.starts_with("restic-manager-agent version=") {
        return Err(AgentError::SmokeTest(format!("--version printed {line:?}, not an agent version")));
    }
    Ok(line)
}

/// Runs `<binary> <arg>` as a smoke test and returns what it printed on stdout (at most 64 KiB): it must exit 0 and
/// close its output within `limit`. The limit holds against the whole process tree: on Unix the candidate runs in
/// its own process group, killed (SIGKILL) afterwards whatever happened, so nothing it starts outlives the check.
pub(crate) fn smoke_run(binary: &Path, arg: &str, limit: Duration) -> Result<String, AgentError> {
    let mut command = Command::new(binary);
    command.arg(arg).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command.spawn().map_err(|e| AgentError::SmokeTest(format!("cannot run it: {e}")))?;
    let deadline = Instant::now() + limit;
    // The output is read on its own thread so a pipe held open by a grandchild cannot block us; the thread ends
    // when the pipe closes (at the latest when the group is killed) and is not waited for otherwise.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(&mut stdout, 64 * 1024), &mut out);
        let _ = tx.send(out);
    });
    let exited = wait_exit_unreaped(&mut child, deadline)?;
    let output = if exited { rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok() } else { None };
    // Whatever happened: nothing the candidate started outlives the test.
    kill_tree(&mut child);
    let status = child.wait().map_err(|e| AgentError::SmokeTest(e.to_string()))?;
    let secs = limit.as_secs();
    if !exited {
        return Err(AgentError::SmokeTest(format!("{arg} did not finish within {secs} s; killed")));
    }
    let Some(out) = output else {
        return Err(AgentError::SmokeTest(format!(
            "{arg} exited but its output stayed open for {secs} s (it left a process behind); killed"
        )));
    };
    if !status.success() {
        return Err(AgentError::SmokeTest(format!("{arg} exited with {status}")));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Waits until `child` exits or `deadline` passes, without reaping it on Unix (`waitid` with `WNOWAIT`), so its pid
/// (and group id) stays reserved until [`kill_tree`] has run. Returns whether it exited.
#[cfg(unix)]
pub(crate) fn wait_exit_unreaped(child: &mut std::process::Child, deadline: Instant) -> Result<bool, AgentError> {
    let pid = child.id() as libc::id_t;
    loop {
        // SAFETY: waitid writes only into the zeroed siginfo_t we pass; the pid is our own unreaped child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(AgentError::SmokeTest(format!("waiting for the smoke test: {e}")));
        }
        // SAFETY: si_pid is valid to read after a successful waitid.
        if unsafe { info.si_pid() } != 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(not(unix))]
pub(crate) fn wait_exit_unreaped(child: &mut std::process::Child, deadline: Instant) -> Result<bool, AgentError> {
    loop {
        if child.try_wait().map_err(|e| AgentError::SmokeTest(e.to_string()))?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL to the candidate's process group (its leader is not reaped yet, so the group id is still ours).
#[cfg(unix)]
pub(crate) fn kill_tree(child: &mut std::process::Child) {
    // SAFETY: plain syscall; ESRCH (group already gone) is fine.
    unsafe {
        libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
    }
}

#[cfg(not(unix))]
pub(crate) fn kill_tree(child: &mut std::process::Child) {
    let _ = child.kill();
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stale_downloads_beside_the_agent_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for name in
            [".restic-manager-restic-abc123", ".restic-manager-agent-update-XyZ", "keep", "restic-manager-restic"]
        {
            std::fs::write(p.join(name), b"x").unwrap();
        }
        std::fs::create_dir(p.join(".restic-manager-restic-dir")).unwrap();
        std::os::unix::fs::symlink(p.join("keep"), p.join(".restic-manager-restic-link")).unwrap();
        assert_eq!(remove_stale_downloads(p), 2);
        let mut left: Vec<_> =
            std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(
            left,
            [".restic-manager-restic-dir", ".restic-manager-restic-link", "keep", "restic-manager-restic"]
        );
    }

    #[test]
    fn a_download_stops_writing_once_stopping() {
        use std::io::Write;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let stopping = || stop.load(std::sync::atomic::Ordering::SeqCst);
        let mut out = Vec::new();
        let mut w = HashingWriter { inner: &mut out, hasher: sha2::Sha256::new(), stopping: &stopping };
        w.write_all(b"first chunk").unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(w.write_all(b"second").unwrap_err().to_string().contains("stopping"));
        assert_eq!(out, b"first chunk");
    }

    /// A loopback HTTP server answering each path with its (status, body) from `routes` (anything else: 404), one
    /// connection per request; returns its base URL and the paths asked for, in order.
    fn serve(routes: Vec<(&'static str, u16, Vec<u8>)>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let (status, body) = routes
                    .iter()
                    .find(|(p, ..)| *p == path)
                    .map(|(_, s, b)| (*s, b.clone()))
                    .unwrap_or((404, br#"{"error":"not_found","message":"no such thing"}"#.to_vec()));
                seen.lock().unwrap().push(path);
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body));
            }
        });
        (base, asked)
    }

    /// The blob URL first; the name only when the blob is a 404; the digest check applies to either.
    #[test]
    fn downloads_by_digest_and_by_name_only_after_a_404() {
        let good = b"the announced build".to_vec();
        let sha = hex::encode(sha2::Sha256::digest(&good));
        let want = (sha.as_str(), good.len() as u64);
        let dir = tempfile::tempdir().unwrap();
        let fetch = |routes: Vec<(&'static str, u16, Vec<u8>)>, blob: bool| {
            let (base, asked) = serve(routes);
            let client = Client::new(&base, &crate::client::Trust::System, None).unwrap();
            let from = Locations { blob: blob.then_some("/blob"), name: "/name" };
            let got = download_verified(&client, None, from, want, dir.path(), ".t-", false, &|| false)
                .map(|p| std::fs::read(&p).unwrap());
            (got, asked.lock().unwrap().clone())
        };

        let (got, asked) = fetch(vec![("/blob", 200, good.clone()), ("/name", 200, b"other".to_vec())], true);
        assert_eq!((got.unwrap(), asked), (good.clone(), vec!["/blob".to_string()]));
        let (got, asked) = fetch(vec![("/name", 200, good.clone())], true);
        assert_eq!((got.unwrap(), asked), (good.clone(), vec!["/blob".to_string(), "/name".to_string()]));
        let (got, asked) = fetch(vec![("/blob", 200, b"other".to_vec()), ("/name", 200, good.clone())], false);
        assert_eq!((got.unwrap(), asked), (good.clone(), vec!["/name".to_string()]), "no blob URL: the name");
        // A server error is the answer, not a reason to try the name.
        let (got, asked) = fetch(vec![("/blob", 503, b"{}".to_vec()), ("/name", 200, good.clone())], true);
        assert!(matches!(got, Err(AgentError::Server { status: 503, .. })), "{got:?}");
        assert_eq!(asked, ["/blob"]);
        // Other bytes are refused wherever they come from, by digest or after the fallback.
        let tampered = b"the announced buile".to_vec();
        let (got, asked) = fetch(vec![("/blob", 200, tampered.clone()), ("/name", 200, good.clone())], true);
        assert!(matches!(got, Err(AgentError::Verification(_))), "{got:?}");
        assert_eq!(asked, ["/blob"]);
        let (got, _) = fetch(vec![("/name", 200, tampered)], true);
        assert!(matches!(got, Err(AgentError::Verification(_))), "{got:?}");
        let (got, _) = fetch(vec![], true);
        assert!(matches!(got, Err(AgentError::Server { status: 404, .. })), "both gone: {got:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "no temporary file is left behind: {left:?}");
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("candidate");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn alive(pid: i32) -> bool {
        // A zombie counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }

    #[test]
    fn smoke_test_accepts_an_agent_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let ok = script(dir.path(), "echo 'restic-manager-agent version=9.9.9 commit=x date=y'");
        assert_eq!(
            smoke_test_within(&ok, Duration::from_secs(5)).unwrap(),
            "restic-manager-agent version=9.9.9 commit=x date=y"
        );
        let bad = script(dir.path(), "echo hello");
        assert!(smoke_test_within(&bad, Duration::from_secs(5)).unwrap_err().to_string().contains("not an agent"));
        let failing = script(dir.path(), "echo 'restic-manager-agent version=1'; exit 3");
        assert!(smoke_test_within(&failing, Duration::from_secs(5)).unwrap_err().to_string().contains("exited with"));
    }

    #[test]
    fn revert_puts_back_only_the_expected_build() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("restic-manager-agent");
        let previous = previous_path(&exe);
        std::fs::write(&exe, b"new build").unwrap();
        let old_sha = hex::encode(sha2::Sha256::digest(b"old build"));
        let names = || {
            let mut n: Vec<_> =
                std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            n.sort();
            n
        };

        // Missing: refused, nothing touched.
        let e = revert(&exe, &old_sha).unwrap_err().to_string();
        assert!(e.contains("no previous build at") && e.contains(".previous"), "{e}");
        // The wrong bytes: refused, nothing touched, no temporary file left.
        std::fs::write(&previous, b"someone else's build").unwrap();
        let e = revert(&exe, &old_sha).unwrap_err().to_string();
        assert!(e.contains("refusing to swap in unknown bytes") && e.contains(&old_sha), "{e}");
        assert_eq!(std::fs::read(&exe).unwrap(), b"new build");
        assert_eq!(names(), ["restic-manager-agent", "restic-manager-agent.previous"]);
        std::fs::create_dir(dir.path().join("d.previous")).unwrap();
        let e = revert(&dir.path().join("d"), &old_sha).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir(dir.path().join("d.previous")).unwrap();

        // The build it ran before: swapped in, executable, `.previous` kept.
        std::fs::write(&previous, b"old build").unwrap();
        revert(&exe, &old_sha.to_ascii_uppercase()).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old build");
        assert_eq!(std::fs::metadata(&exe).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(names(), ["restic-manager-agent", "restic-manager-agent.previous"]);
    }

    #[test]
    fn smoke_test_limit_holds_against_a_grandchild_holding_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let candidate = script(
            dir.path(),
            &format!("echo 'restic-manager-agent version=9.9.9'\nsleep 600 &\necho $! > '{}'", pidfile.display()),
        );
        let started = Instant::now();
        let e = smoke_test_within(&candidate, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(e.contains("left a process behind"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !alive(pid)
        });
        assert!(gone, "the grandchild {pid} survived the smoke test");

        // A candidate that never exits is killed at the limit, with what it started.
        let hung = script(dir.path(), &format!("sleep 600 &\necho $! > '{}'\nwait", pidfile.display()));
        let started = Instant::now();
        let e = smoke_test_within(&hung, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(e.contains("did not finish"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        assert!(
            (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                !alive(pid)
            }),
            "{pid} survived"
        );
    }
}

struct HashingWriter<'a, W: std::io::Write> {
    inner: &'a mut W,
    hasher: sha2::Sha256,
    /// Asked before each write: yes fails it (the download is abandoned).
    stopping: &'a dyn Fn() -> bool,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.stopping)() {
            return Err(std::io::Error::other("the agent is stopping"));
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
