//! The agent's subcommands.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::AgentError;
use rm_protocol::backup::ResticInfo;
use rm_protocol::{HeartbeatRequest, HeartbeatResponse, HostFacts, PROTOCOL_VERSION};

use crate::anchor;
use crate::backups::{self, Backups, Stop};
use crate::client::{Client, Trust, check_plain_http, host_facts, host_platform};
use crate::config::{self, AgentConfig};
use crate::state::{self, AgentState, FailedUpdate};
use crate::update::{self, Outcome};
use crate::{restic, restic_install, trial};

use crate::log;

/// How long `run --once` tries to deliver the reports of its runs before it fails.
const ONCE_FLUSH: Duration = Duration::from_secs(20);

/// Options shared by the commands that talk to a server.
#[derive(Default)]
pub struct Tls {
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
    /// `sha256//…`: trust the server whose certificate has this key, and only its certificate.
    pub pin: Option<String>,
    /// Allow plain http to a server that is not this machine.
    pub allow_plain_http: bool,
}

/// The client for an enrolled agent. A pinned agent checks the stored anchor against the pin first.
fn client_for(config_path: &Path, config: &AgentConfig) -> Result<Client, AgentError> {
    let trust = match (&config.pin, &config.cacert) {
        (Some(pin), _) => Trust::Pinned { pin: pin.clone(), anchor: anchor::path_for(config_path) },
        (None, Some(cacert)) => Trust::CaFile(cacert.clone()),
        (None, None) if config.insecure => Trust::Insecure,
        (None, None) => Trust::System,
    };
    Client::new(&config.server, &trust, config.allow_plain_http)
}

/// `enroll`: trades an enrollment token for an agent identity and stores it (mode 0600).
pub fn enroll(server: &str, token: &str, config_path: &Path, tls: Tls, force: bool) -> Result<(), AgentError> {
    if config_path.exists() && !force {
        let existing = config::load(config_path)?;
        return Err(AgentError::Usage(format!(
            "already enrolled as {} with {} ({}); pass --force to enroll again",
            existing.agent_id,
            existing.server,
            config_path.display()
        )));
    }
    let pin = match &tls.pin {
        Some(text) => Some(rm_protocol::pin::parse_pin(text).map_err(|e| AgentError::Usage(format!("--pin: {e}")))?),
        None => None,
    };
    if pin.is_some() && tls.insecure {
        return Err(AgentError::Usage("--pin and --insecure exclude each other: a pin is verification".into()));
    }
    if pin.is_some() && tls.cacert.is_some() {
        return Err(AgentError::Usage(
            "--pin and --cacert exclude each other: a pinned server's own certificate is the only root".into(),
        ));
    }
    let server = server.trim_end_matches('/');
    check_plain_http(server, Some(tls.allow_plain_http))?;
    let anchor_path = anchor::path_for(config_path);
    // With a pin, the server's certificate is checked before anything else (and before the token is sent).
    let (client, leaf) = match &pin {
        Some(pin) => {
            if !server.to_ascii_lowercase().starts_with("https://") {
                return Err(AgentError::Usage(format!("--pin needs an https:// server URL, not {server}")));
            }
            let leaf = anchor::fetch_pinned_leaf(server, pin)?;
            (Client::pinned(server, pin, &anchor_path, &leaf)?, Some(leaf))
        }
        None => {
            let trust = match &tls.cacert {
                Some(cacert) => Trust::CaFile(cacert.clone()),
                None if tls.insecure => Trust::Insecure,
                None => Trust::System,
            };
            (Client::new(server, &trust, Some(tls.allow_plain_http))?, None)
        }
    };
    let enrolled = client.enroll(token, host_facts()?)?;
    if let Some(leaf) = &leaf {
        anchor::save(&anchor_path, leaf)?;
    }
    let config = AgentConfig {
        server: client.base().to_string(),
        agent_id: enrolled.agent_id.clone(),
        credential: enrolled.credential,
        cacert: tls.cacert,
        insecure: tls.insecure,
        pin,
        allow_plain_http: Some(tls.allow_plain_http),
    };
    config::save(config_path, &config)?;
    log(format_args!(
        "enrolled as {} with {}; identity saved to {}",
        enrolled.agent_id,
        config.server,
        config_path.display()
    ));
    Ok(())
}

/// State carried between heartbeats.
struct Loop {
    seq: u64,
    /// `agent-state.json`: the failed update survives restarts and `run --once` invocations.
    state_path: PathBuf,
    saved: AgentState,
}

impl Loop {
    fn last_update_error(&self) -> Option<String> {
        self.saved.failed_update.as_ref().map(|f| f.error.clone())
    }

    /// Records (or clears, with `None`) the failed update, in memory and on disk. A state file that cannot be written
    /// is said once in the log; the agent goes on (it would only download the refused build once more).
    fn remember(&mut self, failed: Option<FailedUpdate>) {
        if self.saved.failed_update == failed {
            return;
        }
        self.saved.failed_update = failed;
        if let Err(e) = state::save(&self.state_path, &self.saved) {
            log(format_args!("cannot save the agent state: {e}"));
        }
    }

    fn request(&mut self, facts: &HostFacts, own_sha: &str, backups: &Extras) -> HeartbeatRequest {
        self.seq += 1;
        HeartbeatRequest {
            protocol: PROTOCOL_VERSION,
            facts: facts.clone(),
            binary_sha256: Some(own_sha.to_string()),
            last_update_error: self.last_update_error(),
            last_update_sha256: self.saved.failed_update.as_ref().map(|f| f.sha256.clone()),
            trial: crate::trial::is_trial(),
            seq: self.seq,
            restic: backups.0.clone(),
            config_revision: backups.1,
        }
    }
}

/// What heartbeats say about backups: the host's restic and the applied config revision.
type Extras = (Option<ResticInfo>, Option<u64>);

/// What every heartbeat is sent with.
struct Peer<'a> {
    client: &'a Client,
    config: &'a AgentConfig,
    facts: &'a HostFacts,
    exe: &'a Path,
    /// The SHA-256 of the build this process runs (hashed at start: the file may change under it).
    own_sha: &'a str,
}

/// One heartbeat, and a self-update if the server serves a different build (deferred while `restoring`: a restart
/// would cancel the restore). Returns the answer, the next interval and the SHA-256 of the build swapped in, if any
/// (the caller gives it its trial start, [`after_swap`]).
fn beat(
    peer: &Peer<'_>,
    state: &mut Loop,
    extras: &Extras,
    restoring: bool,
) -> Result<(HeartbeatResponse, Duration, Option<String>), AgentError> {
    let own_sha = peer.own_sha;
    let answer = peer.client.heartbeat(&peer.config.credential, &state.request(peer.facts, own_sha, extras))?;
    let interval = Duration::from_secs(answer.heartbeat_interval_secs.clamp(1, 24 * 3600));
    let served = answer.update.as_ref().and_then(|u| u.sha256.as_deref()).map(str::to_ascii_lowercase);
    if restoring && served.is_some_and(|s| s != own_sha) {
        log("the server serves a different build; updating once the running restore has finished");
        return Ok((answer, interval, None));
    }
    let updated = self_update(peer, state, extras, &answer, own_sha)?;
    Ok((answer, interval, updated))
}

/// Installs the build a heartbeat answer names, unless it is this one or was refused before; its SHA-256 if the
/// binary was replaced.
fn self_update(
    peer: &Peer<'_>,
    state: &mut Loop,
    extras: &Extras,
    answer: &HeartbeatResponse,
    own_sha: &str,
) -> Result<Option<String>, AgentError> {
    let Peer { client, config, facts, exe, .. } = *peer;
    let Some(served) = answer.update.clone() else { return Ok(None) };
    let Some(served_sha) = served.sha256.as_deref().map(str::to_ascii_lowercase) else {
        return Ok(None);
    };
    let failed_sha = state.saved.failed_update.as_ref().map(|f| f.sha256.clone());
    if failed_sha.as_deref() == Some(served_sha.as_str()) {
        return Ok(None); // refused before: not again until the server serves another build
    }
    if served_sha == own_sha {
        // The server names the build this agent runs (a rollout keeps a failed host on its previous build): nothing
        // to do, and the failure stays remembered and reported.
        return Ok(None);
    }
    if let Some(failed) = failed_sha {
        // The server moved on from the build that failed: that failure no longer describes anything.
        log(format_args!(
            "the server no longer serves the refused build {}; clearing its error",
            crate::printable(&failed)
        ));
        state.remember(None);
    }
    let shown = crate::printable(&served_sha);
    log(format_args!("update found: the server serves a different build ({shown}); updating"));
    match update::apply(client, Some(&config.credential), &served, exe, false) {
        Ok(Outcome::Updated { previous, version }) => {
            log(format_args!("updated to {version}; previous binary kept at {}", previous.display()));
            Ok(Some(served_sha))
        }
        Ok(Outcome::UpToDate) => Ok(None),
        Err(e) => {
            log(format_args!(
                "update refused, keeping the running agent (not retried until the server serves another build): {e}"
            ));
            state.remember(Some(FailedUpdate { sha256: served_sha, error: format!("update to {shown} failed: {e}") }));
            // Tell the server now rather than at the next heartbeat (which `run --once` never sends). If this one
            // does not get through, the next heartbeat carries the error anyway.
            let _ = client.heartbeat(&config.credential, &state.request(facts, own_sha, extras));
            Ok(None)
        }
    }
}

/// After a swap: the new build's trial start ([`trial::start`]); true when it passed (the caller restarts into it).
/// `update-trial.json` is written first, so the new build's starts are watched even when this process is killed
/// during the trial. A build that failed is reverted (and its marker removed), remembered and reported at once, and
/// this process goes on; when this agent is stopping, the swap is undone and nothing is remembered.
fn after_swap(peer: &Peer<'_>, state: &mut Loop, extras: &Extras, new_sha: &str, stop: &Stop, marker: &Path) -> bool {
    let shown = crate::printable(new_sha);
    let m = trial::Marker { sha256: new_sha.into(), previous_sha256: peer.own_sha.into(), starts: 0 };
    if let Err(e) = trial::save_marker(marker, &m) {
        log(format_args!("cannot save the update trial marker (a crash loop will not be caught): {e}"));
    }
    let revert = || {
        let reverted = update::revert(peer.exe, peer.own_sha);
        if reverted.is_ok() {
            trial::remove_marker(marker);
        }
        reverted
    };
    let why = match trial::start(peer.exe, trial::window(), stop) {
        // It ran but never reached the server, which answers this process: it would be cut off from every later
        // update (and from a rollback). When this heartbeat fails too, the server is down: not the build's fault.
        trial::Outcome::Passed { answered: Some(false) }
            if peer
                .client
                .heartbeat(&peer.config.credential, &state.request(peer.facts, peer.own_sha, extras))
                .is_ok() =>
        {
            format!(
                "the new build stayed up for {} s but none of its heartbeats was answered (this agent's are)",
                trial::window().as_secs()
            )
        }
        trial::Outcome::Passed { .. } => return true,
        trial::Outcome::Stopped => {
            match revert() {
                Ok(()) => log(format_args!("stopping during the trial of {shown}: the previous build is back")),
                Err(e) => log(format_args!("stopping during the trial of {shown}; it stays installed: {e}")),
            }
            return false;
        }
        trial::Outcome::Failed(why) => why,
    };
    let error = match revert() {
        Ok(()) => format!("update to {shown} reverted: {why}"),
        Err(e) => format!("update to {shown} failed its trial start ({why}), and {e}"),
    };
    log(format_args!("{error}; the running agent goes on (not retried until the server serves another build)"));
    state.remember(Some(FailedUpdate { sha256: new_sha.into(), error }));
    let _ = peer.client.heartbeat(&peer.config.credential, &state.request(peer.facts, peer.own_sha, extras));
    false
}

/// `run` as a trial child ([`trial`]): heartbeats only (the first at once, then each interval but at most 1 s
/// apart) until 2 s past the trial window, when the parent has stopped it already; nothing else (no backups, no
/// self-update, no restic install, no state written).
fn trial_run(config_path: &Path) -> Result<(), AgentError> {
    let config = config::load(config_path)?;
    let client = client_for(config_path, &config)?;
    let facts = host_facts()?;
    let own_sha = crate::sha256_file(&update::current_exe()?)?;
    let state_path = state::path_for(config_path);
    let saved = state::load(&state_path).unwrap_or_default();
    let mut state = Loop { seq: 0, state_path, saved };
    let stop = Arc::new(Stop::default());
    handle_signals(&stop);
    let window = trial::window();
    let until = std::time::Instant::now() + window + Duration::from_secs(2);
    log(format_args!(
        "{} on trial: heartbeats only, for {} s",
        rm_buildinfo::version_text("restic-manager-agent"),
        window.as_secs()
    ));
    let mut link = Link::Starting;
    // The parent reads these on stdout (see `trial::STARTED`).
    let say = |line: &str| {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{line}"); // not println!: a closed stdout must not panic
    };
    say(trial::STARTED);
    loop {
        let wait = match client.heartbeat(&config.credential, &state.request(&facts, &own_sha, &(None, None))) {
            Ok(answer) => {
                let interval = Duration::from_secs(answer.heartbeat_interval_secs.clamp(1, 24 * 3600));
                if matches!(link, Link::Starting | Link::Down { .. }) {
                    say(trial::ANSWERED);
                }
                link.answered(interval);
                interval
            }
            Err(e) => {
                link.failed(&e, Duration::from_secs(1));
                Duration::from_secs(1)
            }
        };
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stop.wait(wait.min(Duration::from_secs(1)).min(left)) {
            log("trial over");
            return Ok(());
        }
    }
}

/// SIGTERM/SIGINT set `stop`; a second one while stopping exits at once.
fn handle_signals(stop: &Arc<Stop>) {
    let stop = stop.clone();
    let handler = ctrlc::set_handler(move || {
        if stop.is_stopped() {
            std::process::exit(130);
        }
        stop.stop();
    });
    if let Err(e) = handler {
        log(format_args!("cannot handle SIGTERM/SIGINT ({e}); stopping will not be graceful"));
    }
}

/// Up to ±10 % of `d`, so a fleet restarted together does not heartbeat in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.subsec_nanos()) ^ std::process::id();
    let spread = d.as_millis() as u64 / 5; // 20 % wide window
    if spread == 0 {
        return d;
    }
    let offset = u64::from(nanos) % (spread + 1);
    (d + Duration::from_millis(offset)).saturating_sub(Duration::from_millis(spread / 2))
}

/// Whether the server answers heartbeats: the log gets one line when this changes, none per heartbeat.
enum Link {
    /// No heartbeat answered yet.
    Starting,
    Up,
    /// Failing since `since`; `failures` heartbeats so far; `why` names the kind of failure that was logged.
    Down {
        since: std::time::Instant,
        failures: u32,
        why: &'static str,
    },
}

impl Link {
    fn answered(&mut self, interval: Duration) {
        match std::mem::replace(self, Link::Up) {
            Link::Starting => log(format_args!("heartbeats answered; sending one every {interval:?}")),
            Link::Down { since, failures, .. } => log(format_args!(
                "server back after {failures} failed heartbeat(s) over {:?}",
                Duration::from_secs(since.elapsed().as_secs())
            )),
            Link::Up => {}
        }
    }

    fn failed(&mut self, e: &AgentError, retry: Duration) {
        let why = match e {
            AgentError::Network { .. } => "unreachable",
            AgentError::Server { .. } => "refusing heartbeats",
            _ => "failing",
        };
        match self {
            Link::Down { failures, why: logged, .. } if *logged == why => *failures += 1,
            _ => {
                let since = match self {
                    Link::Down { since, .. } => *since,
                    _ => std::time::Instant::now(),
                };
                let failures = match self {
                    Link::Down { failures, .. } => *failures + 1,
                    _ => 1,
                };
                log(format_args!(
                    "server {why}: {e}; retrying with backoff (first retry in {retry:?}), logged again when it is back"
                ));
                *self = Link::Down { since, failures, why };
            }
        }
    }
}

/// `run`: heartbeats forever (or once), with backoff on errors and self-update on a new served build; backups on the
/// server's plans (see [`crate::backups`]). SIGTERM/SIGINT (Ctrl-C, console close on Windows) cancel running backups,
/// flush the report outbox for up to 5 s and return.
pub fn run(config_path: &Path, once: bool, restic: Option<PathBuf>) -> Result<(), AgentError> {
    if trial::is_trial() {
        return trial_run(config_path);
    }
    let exe = update::current_exe()?;
    let own_sha = crate::sha256_file(&exe)?;
    // First, before anything else can fail: count this start of a build fresh from its trial.
    let marker_path = trial::marker_path(config_path);
    let mut probation = match trial::count_start(&marker_path, &own_sha) {
        trial::AtStart::Settled => None,
        trial::AtStart::Watching(m) => {
            log(format_args!(
                "start {} of this build since its trial (reverted after {})",
                m.starts,
                trial::MAX_STARTS
            ));
            Some(trial::Probation::new(marker_path.clone(), m))
        }
        trial::AtStart::CrashLoop(m) if trial::crash_looped(config_path, &exe, &m) => return restart(&exe),
        trial::AtStart::CrashLoop(_) => None,
    };
    let config = config::load(config_path)?;
    let client = Arc::new(client_for(config_path, &config)?);
    let facts = host_facts()?;
    let state_path = state::path_for(config_path);
    let saved = state::load(&state_path).unwrap_or_else(|e| {
        log(format_args!("ignoring the saved agent state: {e}"));
        AgentState::default()
    });
    let mut state = Loop { seq: 0, state_path, saved };
    let mut link = Link::Starting;
    let mut backoff = Duration::from_secs(1);
    log(format_args!(
        "{} running as agent {} against {}",
        rm_buildinfo::version_text("restic-manager-agent"),
        config.agent_id,
        config.server
    ));
    if let Some(failed) = &state.saved.failed_update {
        log(format_args!(
            "remembering the refused build {} (not retried until the server serves another one)",
            crate::printable(&failed.sha256)
        ));
    }
    if let Some(dir) = exe.parent() {
        let removed = update::remove_stale_downloads(dir);
        if removed > 0 {
            log(format_args!("removed {removed} unfinished download(s) an earlier agent left in {}", dir.display()));
        }
    }
    let stop = Arc::new(Stop::default());
    handle_signals(&stop);
    let server = backups::Authenticated { client: client.clone(), credential: config.credential.clone() };
    let settings = backups::Settings {
        config_path: config_path.to_path_buf(),
        agent_id: config.agent_id.clone(),
        hostname: facts.hostname.clone(),
        restic,
        managed_restic: Some(restic_install::managed_path(&exe)),
        state_dir: backups::state_dir_from_env(),
    };
    let mut restic_installs = ResticInstalls::default();
    let backups = Backups::start(Arc::new(server), settings)?;
    if !once {
        backups.start_scheduler();
        backups.start_task_poll(Some(stop.clone()));
    }
    let stopped = |backups: &Backups| {
        log("stopping");
        backups.shutdown();
        log("stopped");
        Ok(())
    };
    loop {
        if stop.is_stopped() {
            return stopped(&backups);
        }
        let extras = backups.heartbeat_fields();
        let peer = Peer { client: &client, config: &config, facts: &facts, exe: &exe, own_sha: &own_sha };
        let wait = match beat(&peer, &mut state, &extras, backups.restoring()) {
            Ok((answer, interval, swapped)) => {
                if let Some(new_sha) = swapped {
                    if after_swap(&peer, &mut state, &extras, &new_sha, &stop, &marker_path) {
                        backups.shutdown();
                        return restart(&exe);
                    }
                    if stop.is_stopped() {
                        return stopped(&backups);
                    }
                }
                backoff = Duration::from_secs(1);
                // Stayed up for the trial window with a heartbeat answered (or `--once` got its answer): proven.
                if let Some(p) = probation.take_if(|p| once || p.since.elapsed() >= trial::window()) {
                    p.passed();
                }
                backups.on_answer_then(&answer, |b| ensure_restic(&peer, b, &answer, &mut restic_installs, &stop));
                if once {
                    return finish_once(&backups, &stop);
                }
                link.answered(interval);
                jitter(interval)
            }
            Err(e) => {
                if once {
                    backups.close();
                    return Err(e);
                }
                link.failed(&e, backoff);
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(300));
                wait
            }
        };
        if stop.wait(wait) {
            return stopped(&backups);
        }
    }
}

/// What `run` remembers about the served restic between heartbeats.
#[derive(Default)]
struct ResticInstalls {
    /// The SHA-256 of a refused build: not tried again until the server serves another.
    refused: Option<String>,
    /// The (served SHA-256, required version, restic in use) last looked at with nothing (more) to do: skipped
    /// until one of them changes, so a heartbeat does not hash or run restic for nothing.
    settled: Option<(String, Option<restic::Version>, Result<restic::Restic, String>)>,
    /// After an install that failed for another reason than the build itself (network, server error, disk): the
    /// build, when to try it again, and the wait after that one.
    retry: Option<ResticRetry>,
}

struct ResticRetry {
    sha256: String,
    at: std::time::Instant,
    next: Duration,
}

/// The longest wait between two attempts to install a served restic that failed for a passing reason.
const RESTIC_RETRY_MAX: Duration = Duration::from_secs(3600);

/// The first wait after such a failure: 1 min, or `RM_AGENT_RESTIC_RETRY` (whole seconds; for the end-to-end
/// tests). It doubles up to [`RESTIC_RETRY_MAX`].
fn restic_retry_first() -> Duration {
    std::env::var("RM_AGENT_RESTIC_RETRY")
        .ok()
        .and_then(|v| v.trim().trim_end_matches('s').parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(Duration::from_secs(60), Duration::from_secs)
        .min(RESTIC_RETRY_MAX)
}

/// Whether an install error refuses the build itself (its size or hash does not match what the server announced,
/// or its smoke run failed): only then is the build not tried again until the server serves another.
fn refuses_the_build(e: &AgentError) -> bool {
    matches!(e, AgentError::ResticRefused(_) | AgentError::Verification(_) | AgentError::SmokeTest(_))
}

/// Installs the restic the heartbeat answer names when the host needs it ([`restic_install::reason_to_install`]):
/// not with `--restic`, and not a build refused before until the server serves another. An install that failed for
/// a passing reason (network, server error, disk) is tried again after 1 min, doubling up to 1 h.
fn ensure_restic(
    peer: &Peer<'_>,
    backups: &Backups,
    answer: &HeartbeatResponse,
    memo: &mut ResticInstalls,
    stop: &Stop,
) {
    let served_sha = answer.restic.as_ref().filter(|r| r.published).and_then(|r| r.sha256.as_deref());
    let (Some(served), Some(served_sha)) = (&answer.restic, served_sha.map(str::to_ascii_lowercase)) else {
        // Nothing served (any more): an earlier install error no longer says anything true.
        if memo.refused.take().is_some() | memo.retry.take().is_some() {
            backups.set_restic_install_error(None);
        }
        return;
    };
    if backups.restic_is_explicit() {
        return;
    }
    if memo.refused.as_deref() == Some(served_sha.as_str()) {
        return;
    }
    if memo.refused.take().is_some() {
        backups.set_restic_install_error(None); // the server moved on from the refused build
    }
    match &memo.retry {
        Some(r) if r.sha256 == served_sha && std::time::Instant::now() < r.at => return,
        Some(r) if r.sha256 != served_sha => memo.retry = None, // another build: try it now
        _ => {}
    }
    let key = (served_sha.clone(), backups.required_restic(), backups.restic());
    if memo.settled.as_ref() == Some(&key) {
        return;
    }
    let managed = backups.managed_restic();
    let Some(reason) = restic_install::reason_to_install(&key.2, managed.as_ref(), served, key.1) else {
        memo.settled = Some(key);
        return;
    };
    let dest = restic_install::managed_path(peer.exe);
    log(format_args!("installing the server's restic at {} ({reason})", dest.display()));
    let stopping = || stop.is_stopped();
    // Never a downgrade: below the managed restic in use, or below what a repository requires.
    let floor = managed.as_ref().map(|m| m.version).max(key.1);
    let credential = Some(peer.config.credential.as_str());
    match restic_install::install(peer.client, credential, served, &dest, false, &stopping, floor) {
        Ok(installed) => {
            if let restic_install::Installed::Installed { version, .. } = installed {
                log(format_args!("installed restic {version} at {}", dest.display()));
            }
            backups.set_restic_install_error(None);
            backups.redetect_restic();
            memo.retry = None;
            memo.settled = Some((served_sha, key.1, backups.restic()));
        }
        Err(e) if stop.is_stopped() => log(format_args!("restic install abandoned: {e}")),
        Err(e) if !refuses_the_build(&e) => {
            let wait = memo.retry.as_ref().map_or_else(restic_retry_first, |r| r.next);
            log(format_args!("restic install failed, retrying in {} s: {e}", wait.as_secs()));
            let shown = crate::printable(&served_sha);
            backups.set_restic_install_error(Some(format!(
                "install of restic {shown} failed, retrying in {} s: {e}",
                wait.as_secs()
            )));
            memo.retry = Some(ResticRetry {
                sha256: served_sha,
                at: std::time::Instant::now() + wait,
                next: (wait * 2).min(RESTIC_RETRY_MAX),
            });
        }
        Err(e) => {
            memo.retry = None;
            log(format_args!(
                "restic install refused, keeping the restic in use (not retried until the server serves another \
                 build): {e}"
            ));
            let shown = crate::printable(&served_sha);
            backups.set_restic_install_error(Some(format!("install of restic {shown} refused: {e}")));
            memo.refused = Some(served_sha);
        }
    }
}

/// `restic install`: installs (or replaces) the managed restic beside the agent with the server's build for this
/// platform, verified like a self-update.
pub fn restic_install(config_path: &Path) -> Result<(), AgentError> {
    let config = config::load(config_path)?;
    let client = client_for(config_path, &config)?;
    let platform = host_platform()?;
    let exe = update::current_exe()?;
    let served = client
        .served_restic(platform, &config.credential)?
        .ok_or_else(|| AgentError::Usage(format!("the server publishes no restic for {platform}")))?;
    let dest = restic_install::managed_path(&exe);
    match restic_install::install(&client, Some(&config.credential), &served, &dest, true, &|| false, None)? {
        restic_install::Installed::UpToDate => println!("restic at {} is the served build", dest.display()),
        restic_install::Installed::Installed { path, version } => {
            println!("installed restic {version} at {}", path.display())
        }
    }
    Ok(())
}

/// `run --once` after its heartbeat: waits for the run-now requests it started, then delivers every queued report
/// (failing if it cannot). A stop signal cancels the runs instead.
fn finish_once(backups: &Backups, stop: &Stop) -> Result<(), AgentError> {
    while !backups.wait_runs(Some(Duration::from_millis(200))) {
        if stop.is_stopped() {
            backups.shutdown();
            return Ok(());
        }
    }
    let flushed = backups.flush(ONCE_FLUSH);
    backups.close();
    flushed
}

/// After a successful self-update: under systemd (or another supervisor that sets INVOCATION_ID) exit with 75 so
/// the service manager restarts the new binary; otherwise replace this process with the new binary at `exe` (the
/// path found at start: asking again now would name the replaced, deleted file).
fn restart(exe: &Path) -> Result<(), AgentError> {
    if std::env::var_os("INVOCATION_ID").is_some() {
        log("exiting so the service manager starts the new binary");
        std::process::exit(75);
    }
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(exe).args(&args).exec();
        Err(AgentError::io(format!("restarting {}", exe.display()))(err))
    }
    #[cfg(not(unix))]
    {
        std::process::Command::new(exe).args(&args).spawn().map_err(AgentError::io("restarting the agent"))?;
        std::process::exit(0);
    }
}

/// `update`: installs the served build now (`--check`: only reports).
pub fn update(config_path: &Path, check: bool) -> Result<(), AgentError> {
    let config = config::load(config_path)?;
    let client = client_for(config_path, &config)?;
    let platform = host_platform()?;
    let exe = update::current_exe()?;
    let served = client
        .served_build(platform, &config.credential)?
        .ok_or_else(|| AgentError::Usage(format!("the server publishes no agent for {platform}")))?;
    let own = crate::sha256_file(&exe)?;
    let served_sha = crate::printable(&served.sha256.clone().unwrap_or_default());
    if check {
        if own == served_sha {
            println!("up to date ({own})");
        } else {
            println!("update available: running {own}, server serves {served_sha}");
        }
        return Ok(());
    }
    match update::apply(&client, Some(&config.credential), &served, &exe, true)? {
        Outcome::UpToDate => println!("up to date ({own})"),
        Outcome::Updated { previous, version } => {
            // No trial start here (the operator restarts the service), but its first starts are watched as after one.
            let marker = trial::Marker { sha256: served_sha.to_ascii_lowercase(), previous_sha256: own, starts: 0 };
            if let Err(e) = trial::save_marker(&trial::marker_path(config_path), &marker) {
                eprintln!("restic-manager-agent: cannot save the update trial marker: {e}");
            }
            println!("updated to {version}; previous binary kept at {}", previous.display());
            println!("restart the service to run it (systemctl restart restic-manager-agent)");
        }
    }
    Ok(())
}

/// `revert`: the operator's way back ([`trial::revert_by_operator`]); the service is restarted by the operator.
pub fn revert(config_path: &Path) -> Result<(), AgentError> {
    let (exe, own, expected) = trial::revert_by_operator(config_path)?;
    println!(
        "reverted {} to the build {expected}; {own} is not installed again until the server serves another",
        exe.display()
    );
    println!("restart the service to run it (systemctl restart restic-manager-agent)");
    Ok(())
}

/// `status`: this binary, its identity, its backups (restic, config revision, plans and their next run, queued
/// reports), and whether it matches what the server serves.
pub fn status(config_path: &Path, restic: Option<&Path>) -> Result<(), AgentError> {
    let exe = update::current_exe()?;
    let own = crate::sha256_file(&exe)?;
    println!("{}", rm_buildinfo::version_text("restic-manager-agent"));
    println!("binary: {} (sha256 {own})", exe.display());
    let config = config::load(config_path)?;
    println!("config: {}", config_path.display());
    println!("server: {}", config.server);
    println!("agent id: {}", config.agent_id);
    if let Ok(AgentState { failed_update: Some(failed) }) = state::load(&state::path_for(config_path)) {
        println!(
            "last update error: {} (not retried until the server serves another build)",
            crate::printable(&failed.error)
        );
    }
    match trial::load_marker(&trial::marker_path(config_path)) {
        Ok(Some(m)) => println!(
            "update trial: build {} (replacing {}) started {} time(s); reverted after {} starts that do not stay up",
            crate::printable(&m.sha256),
            crate::printable(&m.previous_sha256),
            m.starts,
            trial::MAX_STARTS
        ),
        Ok(None) => {}
        Err(e) => println!("update trial: {e}"),
    }
    for line in backups::status_lines(config_path, restic, &config.agent_id) {
        println!("{line}");
    }
    let platform = host_platform()?;
    match client_for(config_path, &config)?.served_build(platform, &config.credential) {
        Ok(Some(served)) => {
            let served_sha = crate::printable(&served.sha256.unwrap_or_default());
            let verdict = if served_sha == own { "up to date" } else { "out of date" };
            println!("served build: {served_sha} ({verdict})");
        }
        Ok(None) => println!("served build: none for {platform}"),
        Err(e) => println!("served build: unknown ({e})"),
    }
    Ok(())
}
