//! A new build's trial start, and the crash-loop marker.
//!
//! After [`crate::update::apply`] swapped a new build in, `run` does not restart into it blindly: [`start`] runs it
//! as a child with the same arguments and `RM_AGENT_TRIAL=1`, under which `run` only heartbeats and exits once the
//! trial window ([`window`]: 10 s, or `RM_AGENT_TRIAL_SECS`) is over. A child that ends before the window (any
//! status) or cannot be started fails the trial: `run` puts `<exe>.previous` back ([`crate::update::revert`]) and
//! keeps running. A child still up at the window's end is stopped (Unix: SIGTERM, SIGKILL after 10 s) and passes,
//! unless it said on stdout that its trial started ([`STARTED`]) but never that a heartbeat was answered
//! ([`ANSWERED`]) while `run`'s own heartbeat right after is answered: a build that cannot reach the server would
//! be cut off from every later update and rollback, so it is reverted too. A build that does not know the variable
//! just runs and is stopped, which passes (it says neither line).
//!
//! A build that passes but then dies at start (under a service manager that restarts it) is caught by
//! `update-trial.json` beside the config ([`Marker`]): written after a passed trial, counted up at each start of
//! that build ([`count_start`]), reverted on the fourth start, removed once the build has had a heartbeat answered
//! and stayed up for the trial window. [`revert_by_operator`] is the `revert` subcommand's side of it.
//!
//! The child runs in its own process group, killed (SIGKILL) once the trial is over, so nothing it started outlives
//! it; on Linux it also gets SIGKILL when the agent dies (`PR_SET_PDEATHSIG`; that signal follows the spawning thread,
//! and [`start`] is called from `run`'s own thread, which lives as long as the agent).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backups::Stop;
use crate::{AgentError, log, printable};

/// Set to `1` in the environment of the trial child.
pub const TRIAL_ENV: &str = "RM_AGENT_TRIAL";

/// What a trial child prints on stdout when its trial starts ([`STARTED`]) and when a heartbeat of its was answered
/// ([`ANSWERED`]), so the parent can tell a build that runs but cannot reach the server from one that does not speak
/// this protocol (an older build: not judged on its heartbeats).
pub const STARTED: &str = "restic-manager-agent trial: started";
pub const ANSWERED: &str = "restic-manager-agent trial: heartbeat answered";

/// How many starts of a build fresh from its trial may end without it staying up before it is reverted.
pub const MAX_STARTS: u32 = 3;

/// How much of a trial child's stderr the failure message keeps (its end).
const TAIL_BYTES: usize = 2048;
/// How much of that the failure message shows.
const TAIL_CHARS: usize = 768;
/// Longest output line forwarded to the log.
const MAX_LINE: u64 = 4096;

/// Whether this process is a trial child.
pub fn is_trial() -> bool {
    std::env::var_os(TRIAL_ENV).is_some_and(|v| v == "1")
}

/// The trial window: 10 s, or `RM_AGENT_TRIAL_SECS` (whole seconds; it exists for the end-to-end tests, like
/// `RM_AGENT_SMOKE_TIMEOUT`).
pub fn window() -> Duration {
    std::env::var("RM_AGENT_TRIAL_SECS")
        .ok()
        .and_then(|v| v.trim().trim_end_matches('s').parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(Duration::from_secs(10), Duration::from_secs)
}

/// How a trial ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still running at the window's end (then stopped). `answered`: `None` when the build does not speak the trial
    /// protocol, else whether one of its heartbeats was answered.
    Passed { answered: Option<bool> },
    /// Ended early or could not be started: why, in words (`the new build exited …`).
    Failed(String),
    /// This agent is stopping; the child was killed.
    Stopped,
}

/// Runs `exe` as a trial child with this process's arguments for `window` (see the module docs). Blocks; `stop`
/// ends it early.
pub fn start(exe: &Path, window: Duration, stop: &Stop) -> Outcome {
    start_with(exe, std::env::args_os().skip(1).collect(), window, stop)
}

fn start_with(exe: &Path, args: Vec<std::ffi::OsString>, window: Duration, stop: &Stop) -> Outcome {
    let mut command = Command::new(exe);
    command.args(args).env(TRIAL_ENV, "1").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    #[cfg(target_os = "linux")]
    die_with_parent(&mut command);
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Outcome::Failed(format!("the new build could not be started: {e}")),
    };
    log(format_args!("trial start of the new build for {} s (pid {})", window.as_secs(), child.id()));
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_BYTES)));
    let said = Arc::new(Mutex::new((false, false))); // (STARTED, ANSWERED) seen on stdout
    let (done_tx, done_rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward(out, Sink::Protocol(said.clone()), None);
    }
    if let Some(err) = child.stderr.take() {
        forward(err, Sink::Tail(tail.clone()), Some(done_tx));
    }
    let deadline = started + window;
    let early = loop {
        let step = (Instant::now() + Duration::from_millis(200)).min(deadline);
        match crate::update::wait_exit_unreaped(&mut child, step) {
            Ok(true) => break Some(None),
            Ok(false) => {}
            Err(e) => break Some(Some(e.to_string())),
        }
        if Instant::now() >= deadline {
            break None;
        }
        if stop.is_stopped() {
            crate::update::kill_tree(&mut child);
            let _ = child.wait();
            return Outcome::Stopped;
        }
    };
    match early {
        Some(wait_error) => {
            // Its last words: the stderr pipe closes when it exits, unless something it started still holds it.
            let _ = done_rx.recv_timeout(Duration::from_secs(1));
            crate::update::kill_tree(&mut child);
            let status = child.wait().map_or_else(|e| format!("an unknown status ({e})"), |s| s.to_string());
            let secs = started.elapsed().as_secs();
            let said = tail_text(&lock(&tail));
            let said = if said.is_empty() { "(no output on stderr)".to_string() } else { said };
            let why = match wait_error {
                Some(e) => format!("the new build could not be watched ({e}); it was killed"),
                None => format!("the new build exited {secs} s after start with {status}: {said}"),
            };
            Outcome::Failed(why)
        }
        None => {
            terminate(&mut child);
            log("the new build stayed up for its trial window");
            let (started, answered) = *lock(&said);
            Outcome::Passed { answered: started.then_some(answered) }
        }
    }
}

/// Stops a trial child that stayed up: SIGTERM, then (after 10 s) SIGKILL to its group, which also ends anything it
/// started; reaped.
fn terminate(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        // SAFETY: plain syscall on our own unreaped child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = crate::update::wait_exit_unreaped(child, Instant::now() + Duration::from_secs(10));
    }
    crate::update::kill_tree(child);
    let _ = child.wait();
}

/// Linux: the trial child gets SIGKILL when the agent (the thread that spawned it) dies.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe calls (prctl,
    // getppid) and builds an io::Error from a raw code, which does not allocate.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Where [`forward`] puts a stream besides the log.
enum Sink {
    /// stderr: its last [`TAIL_BYTES`].
    Tail(Arc<Mutex<VecDeque<u8>>>),
    /// stdout: whether [`STARTED`] and [`ANSWERED`] were printed (those lines are not logged).
    Protocol(Arc<Mutex<(bool, bool)>>),
}

/// Reads `stream` on its own thread to its end, logging each line (prefixed, made printable) and feeding `sink`.
/// `done` is sent when the stream closed. The thread is never waited for: a grandchild holding the pipe open keeps
/// only it alive.
fn forward(stream: impl Read + Send + 'static, sink: Sink, done: Option<mpsc::Sender<()>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            match &sink {
                Sink::Tail(tail) => {
                    let mut tail = lock(tail);
                    tail.extend(&line);
                    let extra = tail.len().saturating_sub(TAIL_BYTES);
                    tail.drain(..extra);
                }
                Sink::Protocol(said) if text == STARTED => {
                    lock(said).0 = true;
                    continue;
                }
                Sink::Protocol(said) if text == ANSWERED => {
                    lock(said).1 = true;
                    continue;
                }
                Sink::Protocol(_) => {}
            }
            let text = text.strip_prefix("restic-manager-agent: ").unwrap_or(text);
            log(format_args!("trial: {}", printable(text)));
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    });
}

/// The kept stderr as one printable line: its non-empty lines joined with ` | `, its last [`TAIL_CHARS`] characters
/// (the server keeps 1,024 of a `last_update_error`, so the end, the last words, must fit).
fn tail_text(tail: &VecDeque<u8>) -> String {
    let bytes: Vec<u8> = tail.iter().copied().collect();
    let text = String::from_utf8_lossy(&bytes);
    let joined = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(printable).collect::<Vec<_>>().join(" | ");
    let count = joined.chars().count();
    if count <= TAIL_CHARS {
        return joined;
    }
    format!("…{}", joined.chars().skip(count - TAIL_CHARS).collect::<String>())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `update-trial.json`: a build that passed its trial and has not yet proven it stays up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    /// The new build (lowercase hex SHA-256).
    pub sha256: String,
    /// The build it replaced, the one a revert puts back (`<exe>.previous` must be exactly that).
    pub previous_sha256: String,
    /// Starts of the new build so far.
    pub starts: u32,
}

/// `update-trial.json` in the config's directory.
pub fn marker_path(config_path: &Path) -> PathBuf {
    config_path.with_file_name("update-trial.json")
}

/// The marker; `None` when there is none.
pub fn load_marker(path: &Path) -> Result<Option<Marker>, AgentError> {
    let fail = |reason: String| AgentError::Config { path: path.to_path_buf(), reason };
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| fail(format!("not a valid trial marker: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Saves the marker (0600, temporary file + rename).
pub fn save_marker(path: &Path, marker: &Marker) -> Result<(), AgentError> {
    let json = serde_json::to_vec_pretty(marker).expect("marker serializes");
    crate::config::write_private(path, &json).map_err(|reason| AgentError::Config { path: path.to_path_buf(), reason })
}

/// Removes the marker (a missing one is fine; any other failure is logged).
pub fn remove_marker(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log(format_args!("cannot remove {}: {e}", path.display())),
    }
}

/// A start of a build on probation (counted by [`count_start`]). [`Probation::passed`] removes the marker; dropped
/// without that when `run` returns (stopped, `--once` done, an error), the start is not counted after all: only a
/// start that ends in a crash (a panic, a signal, an abort) counts towards the crash loop. So a `run --once` from
/// cron while the server is down, or an operator's restarts, never revert a good build.
pub struct Probation {
    path: PathBuf,
    marker: Marker,
    pub since: Instant,
}

impl Probation {
    pub fn new(path: PathBuf, marker: Marker) -> Probation {
        Probation { path, marker, since: Instant::now() }
    }

    /// Had a heartbeat answered and stayed up for the trial window: the marker is done with.
    pub fn passed(self) {
        remove_marker(&self.path);
        std::mem::forget(self);
    }
}

impl Drop for Probation {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        match load_marker(&self.path) {
            Ok(Some(mut m)) if m == self.marker => {
                m.starts = m.starts.saturating_sub(1);
                if let Err(e) = save_marker(&self.path, &m) {
                    log(format_args!("cannot update the update trial marker: {e}"));
                }
            }
            _ => {} // gone, or changed by another update: nothing to take back
        }
    }
}

/// What [`count_start`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum AtStart {
    /// No marker for this build.
    Settled,
    /// This build is on probation: the marker (its start counted and saved).
    Watching(Marker),
    /// This build has started more than [`MAX_STARTS`] times without staying up: revert it.
    CrashLoop(Marker),
}

/// At a (non-trial) `run`'s start, before anything else that can fail: counts this start against a marker that
/// names `own_sha` and saves it. A marker for another build (a revert happened, or another update) is removed; an
/// unreadable one too, as there is nothing left to compare against.
pub fn count_start(path: &Path, own_sha: &str) -> AtStart {
    let mut marker = match load_marker(path) {
        Ok(Some(m)) if m.sha256.eq_ignore_ascii_case(own_sha) => m,
        Ok(None) => return AtStart::Settled,
        Ok(Some(_)) => {
            remove_marker(path);
            return AtStart::Settled;
        }
        Err(e) => {
            log(format_args!("ignoring and removing the update trial marker: {e}"));
            remove_marker(path);
            return AtStart::Settled;
        }
    };
    marker.starts = marker.starts.saturating_add(1);
    if let Err(e) = save_marker(path, &marker) {
        log(format_args!("cannot count this start in the update trial marker: {e}"));
    }
    if marker.starts > MAX_STARTS { AtStart::CrashLoop(marker) } else { AtStart::Watching(marker) }
}

/// At `run`'s start, for a build fresh from its trial that has now started more than [`MAX_STARTS`] times without
/// staying up: the marker is removed, `<exe>.previous` put back (only if it is the build the marker names) and the
/// failure remembered in `agent-state.json` for the next heartbeat. True when reverted (the caller restarts into the
/// old build); false when the revert was refused (this build goes on, the failure remembered).
pub(crate) fn crash_looped(config_path: &Path, exe: &Path, marker: &Marker) -> bool {
    remove_marker(&marker_path(config_path));
    let shown = printable(&marker.sha256);
    let why = format!(
        "crash-looped at start: started {} times without staying up for {} s",
        marker.starts,
        window().as_secs()
    );
    let reverted = crate::update::revert(exe, &marker.previous_sha256);
    let error = match &reverted {
        Ok(()) => format!("update to {shown} reverted: {why}"),
        Err(e) => format!("update to {shown} {why}, and {e}"),
    };
    log(&error);
    remember(config_path, &marker.sha256.to_ascii_lowercase(), error);
    reverted.is_ok()
}

/// The failed update in `agent-state.json` (a state that cannot be written is logged: the build would only be
/// downloaded once more).
fn remember(config_path: &Path, sha256: &str, error: String) {
    let state_path = crate::state::path_for(config_path);
    let mut saved = crate::state::load(&state_path).unwrap_or_default();
    saved.failed_update = Some(crate::state::FailedUpdate { sha256: sha256.to_string(), error });
    if let Err(e) = crate::state::save(&state_path, &saved) {
        log(format_args!("cannot save the agent state: {e}"));
    }
}

/// `revert`: puts `<exe>.previous` back over this binary and remembers this build as failed (not installed again
/// until the server serves another). With a trial marker for this build, `.previous` must be the build the marker
/// names; without one, it must be another build that passes the smoke test. Returns the executable, the build it
/// replaced and the build put back.
pub fn revert_by_operator(config_path: &Path) -> Result<(PathBuf, String, String), AgentError> {
    let exe = crate::update::current_exe()?;
    let own = crate::sha256_file(&exe)?;
    let previous = crate::update::previous_path(&exe);
    let path = marker_path(config_path);
    let marker = load_marker(&path).ok().flatten().filter(|m| m.sha256.eq_ignore_ascii_case(&own));
    let expected = match marker {
        Some(m) => m.previous_sha256,
        None => {
            let sha = crate::sha256_file(&previous).map_err(|e| AgentError::Revert(e.to_string()))?;
            if sha == own {
                return Err(AgentError::Revert(format!("{} is this build already", previous.display())));
            }
            crate::update::smoke_test(&previous)
                .map_err(|e| AgentError::Revert(format!("{} is not a working agent: {e}", previous.display())))?;
            sha
        }
    };
    crate::update::revert(&exe, &expected)?;
    remove_marker(&path);
    remember(config_path, &own, format!("update to {own} reverted by the operator (restic-manager-agent revert)"));
    Ok((exe, own, expected))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }

    #[test]
    fn a_build_that_exits_at_once_fails_with_its_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let exe = script(
            dir.path(),
            "agent",
            "echo \"trial=$RM_AGENT_TRIAL args=$*\" >&2\necho 'boom: \x1b[31m' >&2\nexit 1",
        );
        let started = Instant::now();
        let got = start_with(&exe, vec!["run".into(), "--once".into()], Duration::from_secs(5), &Stop::default());
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let Outcome::Failed(why) = got else { panic!("{got:?}") };
        assert!(why.starts_with("the new build exited 0 s after start with exit status: 1: "), "{why}");
        assert!(why.contains("trial=1 args=run --once | boom: \\u{1b}[31m"), "{why}");
        let mut long = VecDeque::new();
        long.extend(format!("first\n{}\nlast words\n", "x".repeat(3000)).bytes());
        long.drain(..long.len() - TAIL_BYTES);
        let shown = tail_text(&long);
        assert_eq!(shown.chars().count(), TAIL_CHARS + 1);
        assert!(shown.starts_with('…') && shown.ends_with("x | last words"), "{shown}");
    }

    #[test]
    fn a_build_that_stays_up_passes_and_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let exe = script(dir.path(), "agent", &format!("echo $$ > '{}'\nexec sleep 600", pidfile.display()));
        let started = Instant::now();
        let got = start_with(&exe, vec![], Duration::from_secs(1), &Stop::default());
        assert_eq!(got, Outcome::Passed { answered: None }, "a build that does not speak the protocol");
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        assert!(!alive(pid), "the trial child {pid} was left running");
        let speaks = |answered: bool| {
            let then = if answered { format!("echo '{ANSWERED}'") } else { String::new() };
            script(dir.path(), "agent", &format!("echo '{STARTED}'\n{then}\nexec sleep 600"))
        };
        for answered in [false, true] {
            let got = start_with(&speaks(answered), vec![], Duration::from_secs(1), &Stop::default());
            assert_eq!(got, Outcome::Passed { answered: Some(answered) });
        }
    }

    #[test]
    fn a_grandchild_holding_the_pipes_does_not_hang_the_trial() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let exe = script(
            dir.path(),
            "agent",
            &format!("sleep 600 &\necho $! > '{}'\necho dying >&2\nexit 2", pidfile.display()),
        );
        let started = Instant::now();
        let got = start_with(&exe, vec![], Duration::from_secs(5), &Stop::default());
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        let Outcome::Failed(why) = got else { panic!("{got:?}") };
        assert!(why.contains("exit status: 2: dying"), "{why}");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        assert!(
            (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                !alive(pid)
            }),
            "the grandchild {pid} survived the trial"
        );
    }

    #[test]
    fn a_missing_build_fails_and_a_stop_ends_the_trial() {
        let dir = tempfile::tempdir().unwrap();
        let got = start_with(&dir.path().join("nope"), vec![], Duration::from_secs(1), &Stop::default());
        assert!(matches!(&got, Outcome::Failed(w) if w.contains("could not be started")), "{got:?}");
        let exe = script(dir.path(), "agent", "exec sleep 600");
        let stop = Stop::default();
        stop.stop();
        let started = Instant::now();
        assert_eq!(start_with(&exe, vec![], Duration::from_secs(30), &stop), Outcome::Stopped);
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[test]
    fn starts_are_counted_until_a_crash_loop() {
        let dir = tempfile::tempdir().unwrap();
        let path = marker_path(&dir.path().join("agent.json"));
        assert_eq!(path, dir.path().join("update-trial.json"));
        assert_eq!(count_start(&path, "aa"), AtStart::Settled);
        let marker = Marker { sha256: "AA".into(), previous_sha256: "bb".into(), starts: 0 };
        save_marker(&path, &marker).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        for n in 1..=MAX_STARTS {
            assert_eq!(count_start(&path, "aa"), AtStart::Watching(Marker { starts: n, ..marker.clone() }));
            assert_eq!(load_marker(&path).unwrap().unwrap().starts, n, "saved at once");
        }
        assert_eq!(count_start(&path, "aa"), AtStart::CrashLoop(Marker { starts: MAX_STARTS + 1, ..marker.clone() }));
        // A start that ends without a crash is taken back; one that passed removes the marker.
        save_marker(&path, &marker).unwrap();
        let AtStart::Watching(m) = count_start(&path, "aa") else { panic!() };
        drop(Probation::new(path.clone(), m));
        assert_eq!(load_marker(&path).unwrap().unwrap().starts, 0, "a clean end does not count");
        let AtStart::Watching(m) = count_start(&path, "aa") else { panic!() };
        Probation::new(path.clone(), m).passed();
        assert!(!path.exists());
        save_marker(&path, &marker).unwrap();
        // Another build's marker (or a corrupt one) is dropped.
        assert_eq!(count_start(&path, "cc"), AtStart::Settled);
        assert!(!path.exists());
        std::fs::write(&path, b"{").unwrap();
        assert_eq!(count_start(&path, "aa"), AtStart::Settled);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file left");
    }
}
