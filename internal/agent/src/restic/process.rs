//! restic as a child process: its environment (the agent's, minus every inherited `RESTIC_*`), the short-lived 0600
//! secret files it reads, pipes read on their own threads so the child never blocks on a full pipe, and stopping it
//! on cancel or timeout (SIGINT so restic removes its lock, then kill after a grace period; Windows: kill). On Linux
//! restic also gets SIGINT when the agent dies (parent-death signal).

use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::Cancel;

/// How often the child, the cancel flag and the deadline are looked at.
const POLL: Duration = Duration::from_millis(100);
/// How long restic gets after SIGINT to clean up (remove its lock) before it is killed.
pub(crate) const GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the rest of restic's output once it has exited (a grandchild such as `ssh` or `rclone`
/// may hold the pipes open for longer; its output is then left unread).
const DRAIN: Duration = Duration::from_secs(2);

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Why we stopped restic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Cancelled,
    TimedOut,
}

/// How a run ended.
#[derive(Debug)]
pub(crate) struct Exit {
    pub code: Option<i32>,
    /// The signal that ended restic (unix), if it did not exit by itself.
    pub signal: Option<i32>,
    /// Set when we stopped restic (it may still have exited 0 if it finished at that moment).
    pub stopped: Option<Stop>,
    /// Whether restic ignored SIGINT for the grace period and was killed.
    pub killed: bool,
}

/// Whether an environment variable is restic's own configuration, which must not reach restic from the agent's
/// environment (it would leak into, or override, the plan's repository and password).
pub(crate) fn is_restic_var(name: &OsStr) -> bool {
    name.to_str().is_some_and(|n| n.len() >= 7 && n[..7].eq_ignore_ascii_case("RESTIC_"))
}

/// A restic command: the agent's environment without `RESTIC_*`, plus `env`; stdin closed so restic can never wait
/// for a password on it; stdout and stderr piped.
pub(crate) fn command(restic: &Path, args: &[OsString], env: &[(OsString, OsString)]) -> Command {
    let mut cmd = Command::new(restic);
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if is_restic_var(&name) {
            cmd.env_remove(&name);
        }
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    #[cfg(target_os = "linux")]
    die_with_parent(&mut cmd);
    cmd
}

/// Linux: restic gets SIGINT (removes its lock and exits) when the agent dies, also from a SIGKILL outside systemd,
/// instead of running on without a lease and with secret files the next start removes.
///
/// The parent-death signal fires when the *thread* that forked the child exits, not the process: [`run`] spawns
/// restic and waits for it on the same thread (the run's), and returns only once restic has ended, so the signal
/// cannot fire while the agent lives.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe calls (prctl,
    // getppid) and builds an io::Error from a raw code, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The agent died between fork and prctl: the signal will never come, so do not start restic at all.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Kills and reaps the child if the runner unwinds (a panicking progress callback) before it ended.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` to its end, handing each output line (without its line end, invalid UTF-8 replaced, cut at
/// `max_line` bytes) to `on_line` on this thread. Stops restic when `cancel` is set or `deadline` passes. An error
/// means restic could not be started (or waited for). restic is spawned and waited for on the calling thread, which
/// its parent-death signal depends on (see `die_with_parent`).
pub(crate) fn run(
    mut cmd: Command,
    cancel: &Cancel,
    deadline: Option<Instant>,
    max_line: usize,
    on_line: &mut dyn FnMut(Stream, String),
) -> io::Result<Exit> {
    let mut child = cmd.spawn()?;
    let (tx, rx) = mpsc::channel::<(Stream, String)>();
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, Stream::Stdout, max_line, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, Stream::Stderr, max_line, tx.clone());
    }
    drop(tx);
    let mut guard = ChildGuard(Some(child));
    let child = guard.0.as_mut().expect("the child is there until the end");

    let mut stopped: Option<Stop> = None;
    let mut stop_sent: Option<Instant> = None;
    let mut killed = false;
    let mut readers_done = false;
    // Once both pipes are closed restic is exiting: look again soon rather than a whole POLL later (each restic call
    // of a backup would otherwise add up to 100 ms).
    let mut exiting_poll = Duration::from_millis(1);
    let status: ExitStatus = loop {
        if !readers_done {
            match rx.recv_timeout(POLL) {
                Ok((stream, line)) => on_line(stream, line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => readers_done = true,
            }
        } else {
            std::thread::sleep(exiting_poll);
            exiting_poll = (exiting_poll * 2).min(POLL);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let now = Instant::now();
        match stop_sent {
            None => {
                stopped = if cancel.is_cancelled() {
                    Some(Stop::Cancelled)
                } else if deadline.is_some_and(|d| now >= d) {
                    Some(Stop::TimedOut)
                } else {
                    None
                };
                if stopped.is_some() {
                    stop_sent = Some(now);
                    killed = interrupt(child);
                }
            }
            Some(sent) if !killed && now.duration_since(sent) >= GRACE => {
                let _ = child.kill();
                killed = true;
            }
            Some(_) => {}
        }
    };
    guard.0 = None;

    // The rest of the output, unless something else still holds the pipes.
    let drain_until = Instant::now() + DRAIN;
    while !readers_done {
        let left = drain_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok((stream, line)) => on_line(stream, line),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => readers_done = true,
        }
    }

    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    #[cfg(not(unix))]
    let signal = None;
    Ok(Exit { code: status.code(), signal, stopped, killed })
}

/// Asks restic to stop: SIGINT, so it removes its lock and exits 130. Returns whether the child was killed
/// outright instead (Windows, which has no SIGINT for a child without a console).
#[cfg(unix)]
fn interrupt(child: &mut Child) -> bool {
    match libc::pid_t::try_from(child.id()) {
        Ok(pid) => {
            // SAFETY: kill(2) with a plain signal number has no memory-safety preconditions. The pid is our
            // child's, which has not been reaped yet (try_wait just said it is running), so it cannot have been
            // reused by another process.
            let sent = unsafe { libc::kill(pid, libc::SIGINT) };
            if sent == 0 {
                return false;
            }
            let _ = child.kill();
            true
        }
        Err(_) => {
            let _ = child.kill();
            true
        }
    }
}

#[cfg(not(unix))]
fn interrupt(child: &mut Child) -> bool {
    let _ = child.kill();
    true
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    which: Stream,
    max_line: usize,
    tx: mpsc::Sender<(Stream, String)>,
) {
    let name = match which {
        Stream::Stdout => "restic-stdout",
        Stream::Stderr => "restic-stderr",
    };
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        let mut buf = Vec::new();
        let mut receiver_gone = false;
        loop {
            buf.clear();
            match read_line_capped(&mut reader, &mut buf, max_line) {
                Ok(0) => break,
                Ok(_) => {
                    // Once nobody listens, keep reading anyway so the child never blocks on a full pipe.
                    if !receiver_gone {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        receiver_gone = tx.send((which, line)).is_err();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });
    // Without a thread the pipe is dropped: restic gets EPIPE on that stream instead of blocking.
    drop(spawned);
}

/// Reads one line (through `\n`) into `buf`, keeping at most `max` bytes of it and skipping the rest. Returns the
/// number of bytes consumed (0 at the end).
fn read_line_capped(reader: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let n = chunk.len();
        reader.consume(n);
        consumed += n;
        if done {
            return Ok(consumed);
        }
    }
}

/// A secret restic reads from a file (the repository password, a CA certificate): created 0600 under the agent's
/// state dir (`tmp/`, 0700), removed when dropped, including on errors and panics. A file left by a killed agent
/// is removed by [`remove_stale`].
pub(crate) struct SecretFile(tempfile::NamedTempFile);

pub(crate) const SECRET_PREFIX: &str = "restic-secret-";

impl SecretFile {
    pub fn create(dir: &Path, contents: &[u8]) -> io::Result<SecretFile> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(SECRET_PREFIX);
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let mut file = builder.tempfile_in(dir)?;
        file.write_all(contents)?;
        file.flush()?;
        Ok(SecretFile(file))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// `<state_dir>/tmp`, created 0700 (and made 0700 if it exists).
pub(crate) fn secret_dir(state_dir: &Path) -> io::Result<PathBuf> {
    let dir = state_dir.join("tmp");
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(&dir)?;
    #[cfg(unix)]
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir)
}

/// Removes secret files a killed agent left in `<state_dir>/tmp`. Only safe while no backup runs (at start).
pub(crate) fn remove_stale(state_dir: &Path) -> io::Result<usize> {
    let dir = state_dir.join("tmp");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(SECRET_PREFIX) && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restic_variables_are_recognised() {
        for name in ["RESTIC_PASSWORD", "RESTIC_REPOSITORY", "restic_password_command", "RESTIC_"] {
            assert!(is_restic_var(OsStr::new(name)), "{name}");
        }
        for name in ["RESTICX", "AWS_ACCESS_KEY_ID", "MY_RESTIC_PASSWORD", "PATH", ""] {
            assert!(!is_restic_var(OsStr::new(name)), "{name}");
        }
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_skipped() {
        let text = format!("short\n{}\nlast without newline", "x".repeat(100));
        let mut reader = BufReader::with_capacity(7, text.as_bytes());
        let mut lines = Vec::new();
        let mut buf = Vec::new();
        while read_line_capped(&mut reader, &mut buf, 10).unwrap() > 0 {
            lines.push(String::from_utf8(buf.clone()).unwrap());
            buf.clear();
        }
        assert_eq!(lines, ["short\n", "xxxxxxxxxx", "last witho"]);
    }

    #[test]
    fn secret_files_are_private_and_removed() {
        let state = tempfile::tempdir().unwrap();
        let dir = secret_dir(state.path()).unwrap();
        let file = SecretFile::create(&dir, b"hunter2").unwrap();
        let path = file.path().to_path_buf();
        assert_eq!(std::fs::read(&path).unwrap(), b"hunter2");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        }
        drop(file);
        assert!(!path.exists());

        let left = SecretFile::create(&dir, b"x").unwrap();
        let left_path = left.path().to_path_buf();
        std::mem::forget(left); // as if the agent had been killed
        std::fs::write(dir.join("unrelated"), b"y").unwrap();
        assert_eq!(remove_stale(state.path()).unwrap(), 1);
        assert!(!left_path.exists() && dir.join("unrelated").exists());
    }
}
