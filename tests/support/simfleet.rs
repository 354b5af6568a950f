//! A simulated fleet for the rollout tests: many lightweight in-process agents speaking the real agent protocol
//! (enroll, heartbeat, the heartbeat answer's `update`) to the real server, driven by a few OS threads over
//! keep-alive connections, plus real agent processes installed in temporary prefixes.
//!
//! A sim agent "updates" by reporting, from its next heartbeat, the build the server names (a sample downloads it
//! first and checks its SHA-256), or misbehaves as its [`Behaviour`] says. Every sim keeps a timeline of what it was
//! told and what it reported, so a test can check wave order and sizes, count the hosts updating at once and date
//! the moment a failure budget was exceeded. The helpers at the end drive the rollout admin API with JSON values
//! (not `rm-protocol`'s types, so a server answering another shape fails here).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::bin::{AGENT_BIN, LINUX_AMD64, binary, profile_dir, run_bounded};
use crate::files::{sha256_file, sha256_hex};
use crate::http::{Conn, Response, http_request, http_request_with_body};
use crate::server::Server;

/// What a sim agent does when the server names another build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Switches to the named build and reports it from its next heartbeat (sent at once, as a re-executed agent does).
    Healthy,
    /// Keeps running its build and reports `last_update_error: "injected failure"` with `last_update_sha256`.
    FailUpdate,
    /// Switches, reports the new build once, then never heartbeats again.
    VanishAfterUpdate,
}

/// One sim agent to enroll.
#[derive(Debug, Clone)]
pub struct SimSpec {
    pub hostname: String,
    /// The enrollment token (its labels become the agent's).
    pub token: String,
    pub behaviour: Behaviour,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A heartbeat answer named this build, different from the one the sim ran (stamped when the answer arrived;
    /// once per build named in a row).
    Told(String),
    /// The first heartbeat reporting this build as the one running (stamped when it was sent).
    Reported(String),
    /// The first heartbeat reporting the failed update to this build (stamped when it was sent).
    FailReported(String),
    /// The sim's last heartbeat was just sent; it sends no more.
    Vanished,
}

#[derive(Debug, Clone)]
pub struct Stamped {
    pub at: Instant,
    pub event: Event,
}

/// The message of a [`Behaviour::FailUpdate`] sim's failed update.
pub const INJECTED_FAILURE: &str = "injected failure";

/// A sample of sims downloads what it is told (one in this many, by index).
const DOWNLOAD_EVERY: usize = 100;

/// A sampled download's outcome, filled in by its thread when done.
type DownloadResult = Arc<Mutex<Option<Result<(), String>>>>;

/// One sim agent's state and history.
#[derive(Debug, Clone)]
pub struct SimAgent {
    pub index: usize,
    pub hostname: String,
    pub agent_id: String,
    credential: String,
    pub behaviour: Behaviour,
    /// The build it runs (its heartbeats' `binary_sha256`).
    pub running: String,
    /// The build the last answer named, when it differs from `running`.
    pub told: Option<String>,
    pub timeline: Vec<Stamped>,
    /// Heartbeats answered 200.
    pub heartbeats: u64,
    pub last_heartbeat: Option<Instant>,
    pub vanished: bool,
    /// Whether this sim downloads and checks the builds it is told (a sample).
    pub downloads: bool,
    interval: Duration,
    seq: u64,
    next_due: Instant,
    /// The build `running` was last reported as (None before the first heartbeat).
    reported: Option<String>,
    /// The build whose failed update this sim reports (FailUpdate).
    failed: Option<String>,
    /// The failure of `failed` has been reported at least once.
    failure_reported: bool,
    /// A download running on its own thread: the build and its result once done.
    download: Option<(String, DownloadResult)>,
}

impl SimAgent {
    /// When the first answer named `sha` (None if never).
    pub fn told_at(&self, sha: &str) -> Option<Instant> {
        self.first(|e| matches!(e, Event::Told(s) if s == sha))
    }

    /// When the first heartbeat reporting `sha` as running was sent.
    pub fn reported_at(&self, sha: &str) -> Option<Instant> {
        self.first(|e| matches!(e, Event::Reported(s) if s == sha))
    }

    /// When the first heartbeat reporting the failed update to `sha` was sent.
    pub fn fail_reported_at(&self, sha: &str) -> Option<Instant> {
        self.first(|e| matches!(e, Event::FailReported(s) if s == sha))
    }

    pub fn vanished_at(&self) -> Option<Instant> {
        self.first(|e| *e == Event::Vanished)
    }

    fn first(&self, pred: impl Fn(&Event) -> bool) -> Option<Instant> {
        self.timeline.iter().find(|s| pred(&s.event)).map(|s| s.at)
    }

    /// Every build it was told, in order.
    pub fn told(&self) -> Vec<(Instant, String)> {
        self.timeline
            .iter()
            .filter_map(|s| match &s.event {
                Event::Told(sha) => Some((s.at, sha.clone())),
                _ => None,
            })
            .collect()
    }

    /// The periods it was updating towards `sha`: from being told it to reporting it (`None`: not reported yet).
    pub fn updating(&self, sha: &str) -> Vec<(Instant, Option<Instant>)> {
        let mut out = Vec::new();
        let mut open: Option<Instant> = None;
        for s in &self.timeline {
            match &s.event {
                Event::Told(t) if t == sha => open = open.or(Some(s.at)),
                Event::Told(_) => {
                    if let Some(start) = open.take() {
                        out.push((start, Some(s.at)));
                    }
                }
                Event::Reported(r) if r == sha => {
                    if let Some(start) = open.take() {
                        out.push((start, Some(s.at)));
                    }
                }
                _ => {}
            }
        }
        if let Some(start) = open {
            out.push((start, None));
        }
        out
    }
}

/// The largest number of the `periods` (start, end; `None`: still open) overlapping at one instant.
pub fn max_concurrent(periods: &[(Instant, Option<Instant>)]) -> usize {
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for &(start, end) in periods {
        edges.push((start, 1));
        if let Some(end) = end {
            edges.push((end, -1));
        }
    }
    // Ends before starts at the same instant: a host reporting as another is told is not two at once.
    edges.sort_by_key(|&(at, delta)| (at, delta));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, delta) in edges {
        now += delta;
        max = max.max(now);
    }
    max as usize
}

struct Shared {
    addr: SocketAddr,
    agents: Vec<Mutex<SimAgent>>,
    stop: AtomicBool,
    /// Heartbeats answered 200, across all sims.
    heartbeats: AtomicU64,
    /// Heartbeats that failed (connection refused, reset, a non-200 status).
    heartbeat_errors: AtomicU64,
    /// The last few heartbeat errors, for failure messages.
    last_errors: Mutex<Vec<String>>,
    /// Sampled downloads checked against the SHA-256 they were named by, and the ones that did not match.
    downloads_ok: AtomicU64,
    download_errors: Mutex<Vec<String>>,
}

/// The simulated fleet: N enrolled sims heartbeating on a few threads until [`SimFleet::stop`] (or drop).
pub struct SimFleet {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    pub started: Instant,
}

/// OS threads driving the sims.
const THREADS: usize = 8;

impl SimFleet {
    /// Enrolls every spec (in parallel, on the driver threads) as a linux/amd64 agent running `initial_sha`, then
    /// starts heartbeating, the first heartbeats spread over one interval.
    pub fn start(addr: SocketAddr, initial_sha: &str, specs: Vec<SimSpec>) -> SimFleet {
        let specs = Arc::new(specs);
        let enrolled: Vec<(usize, String, String, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let specs = Arc::clone(&specs);
                    scope.spawn(move || {
                        let mut conn = Conn::connect(addr).expect("connecting to enroll");
                        let mut out = Vec::new();
                        for i in (t..specs.len()).step_by(THREADS) {
                            let s = &specs[i];
                            let body = json!({"token": s.token, "hostname": s.hostname, "os": "linux",
                                              "arch": "amd64", "version": "0.1.0", "commit": "sim"});
                            let r = post_json(&mut conn, "/api/v1/agents/enroll", None, &body)
                                .unwrap_or_else(|e| panic!("enrolling {}: {e}", s.hostname));
                            assert_eq!(r.status, 201, "enrolling {}: {}", s.hostname, r.text());
                            let v = r.json();
                            let id = v["agent_id"].as_str().expect("agent_id").to_string();
                            let cred = v["credential"].as_str().expect("credential").to_string();
                            let interval = v["heartbeat_interval_secs"].as_u64().expect("heartbeat_interval_secs");
                            out.push((i, id, cred, interval));
                        }
                        out
                    })
                })
                .collect();
            let mut all: Vec<_> = handles.into_iter().flat_map(|h| h.join().expect("enrolling thread")).collect();
            all.sort_by_key(|e| e.0);
            all
        });
        let started = Instant::now();
        let n = specs.len().max(1);
        let agents = enrolled
            .into_iter()
            .map(|(i, agent_id, credential, interval)| {
                let interval = Duration::from_secs(interval.max(1));
                Mutex::new(SimAgent {
                    index: i,
                    hostname: specs[i].hostname.clone(),
                    agent_id,
                    credential,
                    behaviour: specs[i].behaviour,
                    running: initial_sha.to_string(),
                    told: None,
                    timeline: Vec::new(),
                    heartbeats: 0,
                    last_heartbeat: None,
                    vanished: false,
                    downloads: i % DOWNLOAD_EVERY == 0,
                    interval,
                    seq: 0,
                    next_due: started + interval.mul_f64(i as f64 / n as f64),
                    reported: None,
                    failed: None,
                    failure_reported: false,
                    download: None,
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            addr,
            agents,
            stop: AtomicBool::new(false),
            heartbeats: AtomicU64::new(0),
            heartbeat_errors: AtomicU64::new(0),
            last_errors: Mutex::new(Vec::new()),
            downloads_ok: AtomicU64::new(0),
            download_errors: Mutex::new(Vec::new()),
        });
        let threads = (0..THREADS)
            .map(|t| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("simfleet-{t}"))
                    .spawn(move || drive(&shared, t))
                    .expect("spawning a sim thread")
            })
            .collect();
        SimFleet { shared, threads, started }
    }

    pub fn len(&self) -> usize {
        self.shared.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.agents.is_empty()
    }

    /// A copy of every sim's state, by index.
    pub fn snapshot(&self) -> Vec<SimAgent> {
        self.shared.agents.iter().map(|a| lock(a).clone()).collect()
    }

    /// How many sims run each build.
    pub fn running(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for a in &self.shared.agents {
            *out.entry(lock(a).running.clone()).or_default() += 1;
        }
        out
    }

    /// Heartbeats answered 200 so far (all sims).
    pub fn heartbeats(&self) -> u64 {
        self.shared.heartbeats.load(Ordering::Relaxed)
    }

    /// Failed heartbeats so far and the last few errors.
    pub fn heartbeat_errors(&self) -> (u64, Vec<String>) {
        (self.shared.heartbeat_errors.load(Ordering::Relaxed), lock(&self.shared.last_errors).clone())
    }

    /// Sampled downloads whose bytes matched the named SHA-256, and the failures.
    pub fn downloads(&self) -> (u64, Vec<String>) {
        (self.shared.downloads_ok.load(Ordering::Relaxed), lock(&self.shared.download_errors).clone())
    }

    /// Every sim has had at least one heartbeat answered.
    pub fn all_heartbeated(&self) -> bool {
        self.shared.agents.iter().all(|a| lock(a).heartbeats > 0)
    }

    /// Stops the driver threads (sims send nothing more) and waits for them.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// POST of a JSON body on a keep-alive connection, with an optional bearer credential.
fn post_json(conn: &mut Conn, path: &str, bearer: Option<&str>, body: &Value) -> io::Result<Response> {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    conn.request("POST", path, &headers, &serde_json::to_vec(body).unwrap())
}

/// One driver thread: the sims whose index is `t` modulo [`THREADS`], each heartbeating when due.
fn drive(shared: &Shared, t: usize) {
    let mine: Vec<usize> = (t..shared.agents.len()).step_by(THREADS).collect();
    let mut conn: Option<Conn> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut next = now + Duration::from_millis(50);
        for &i in &mine {
            let mut a = lock(&shared.agents[i]);
            if a.vanished {
                continue;
            }
            finish_download(shared, &mut a);
            if a.next_due <= Instant::now() {
                match beat(shared, &mut conn, &mut a) {
                    Ok(()) => {}
                    Err(e) => {
                        conn = None;
                        a.next_due = Instant::now() + Duration::from_millis(200);
                        shared.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                        let mut last = lock(&shared.last_errors);
                        if last.len() >= 5 {
                            last.remove(0);
                        }
                        last.push(format!("{}: {e}", a.hostname));
                    }
                }
            }
            next = next.min(a.next_due);
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
}

/// Takes a finished sampled download's result: the sim switches to the build when the bytes matched.
fn finish_download(shared: &Shared, a: &mut SimAgent) {
    let Some((sha, result)) = &a.download else { return };
    let Some(result) = lock(result).take() else { return };
    let sha = sha.clone();
    a.download = None;
    match result {
        Ok(()) => {
            shared.downloads_ok.fetch_add(1, Ordering::Relaxed);
            if a.told.as_deref() == Some(sha.as_str()) {
                switch(a, &sha);
            }
        }
        Err(e) => lock(&shared.download_errors).push(format!("{}: {e}", a.hostname)),
    }
}

/// The sim now runs `sha`; like a re-executed agent it heartbeats at once.
fn switch(a: &mut SimAgent, sha: &str) {
    a.running = sha.to_string();
    a.seq = 0;
    a.next_due = Instant::now();
}

/// One heartbeat and what the sim does with the answer. An error is a transport failure or a non-200 status.
fn beat(shared: &Shared, conn: &mut Option<Conn>, a: &mut SimAgent) -> io::Result<()> {
    a.seq += 1;
    let mut body = json!({"protocol": 1, "hostname": a.hostname, "os": "linux", "arch": "amd64",
                          "version": "0.1.0", "commit": "sim", "binary_sha256": a.running, "seq": a.seq});
    if let Some(failed) = &a.failed {
        body["last_update_error"] = json!(INJECTED_FAILURE);
        body["last_update_sha256"] = json!(failed);
    }
    let sent = Instant::now();
    let r = match conn.as_mut().map(|c| post_json(c, "/api/v1/agents/heartbeat", Some(&a.credential), &body)) {
        Some(Ok(r)) => r,
        // No connection yet, or the server closed the idle one: once more on a fresh connection.
        _ => {
            *conn = Some(Conn::connect(shared.addr)?);
            post_json(conn.as_mut().unwrap(), "/api/v1/agents/heartbeat", Some(&a.credential), &body)?
        }
    };
    if r.status != 200 {
        return Err(io::Error::other(format!("heartbeat answered {}: {}", r.status, r.text())));
    }
    let answered = Instant::now();
    shared.heartbeats.fetch_add(1, Ordering::Relaxed);
    a.heartbeats += 1;
    a.last_heartbeat = Some(sent);
    if a.reported.is_some() && a.reported.as_deref() != Some(a.running.as_str()) {
        a.timeline.push(Stamped { at: sent, event: Event::Reported(a.running.clone()) });
        if a.behaviour == Behaviour::VanishAfterUpdate {
            a.vanished = true;
            a.timeline.push(Stamped { at: sent, event: Event::Vanished });
            return Ok(());
        }
    }
    a.reported = Some(a.running.clone());
    if a.failed.is_some() && !a.failure_reported {
        a.failure_reported = true;
        a.timeline.push(Stamped { at: sent, event: Event::FailReported(a.failed.clone().unwrap()) });
    }
    let v = r.json();
    if let Some(secs) = v["heartbeat_interval_secs"].as_u64() {
        a.interval = Duration::from_secs(secs.max(1));
    }
    a.next_due = sent + a.interval;
    let update = &v["update"];
    let target = update["sha256"].as_str().filter(|_| update["published"].as_bool() != Some(false));
    let Some(target) = target.map(str::to_ascii_lowercase).filter(|t| *t != a.running) else {
        a.told = None;
        return Ok(());
    };
    if a.told.as_deref() != Some(target.as_str()) {
        a.told = Some(target.clone());
        a.timeline.push(Stamped { at: answered, event: Event::Told(target.clone()) });
    }
    match a.behaviour {
        Behaviour::FailUpdate => {
            if a.failed.as_deref() != Some(target.as_str()) {
                a.failed = Some(target);
                a.failure_reported = false;
                a.next_due = Instant::now();
            }
        }
        Behaviour::Healthy | Behaviour::VanishAfterUpdate => {
            if !a.downloads {
                switch(a, &target);
            } else if a.download.as_ref().is_none_or(|(sha, _)| *sha != target) {
                let url = update["url"].as_str().unwrap_or_default().to_string();
                a.download = Some((target.clone(), spawn_download(shared.addr, url, target)));
            }
        }
    }
    Ok(())
}

/// Downloads `url` (absolute or a path on the server) on its own thread and checks the bytes' SHA-256.
fn spawn_download(addr: SocketAddr, url: String, sha: String) -> DownloadResult {
    let result = Arc::new(Mutex::new(None));
    let out = Arc::clone(&result);
    std::thread::spawn(move || {
        let path = match url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) {
            Some(rest) => rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_else(|| "/".into()),
            None => url.clone(),
        };
        let r = match http_request(addr, "GET", &path, &[]) {
            Ok(r) if r.status == 200 && sha256_hex(&r.body) == sha => Ok(()),
            Ok(r) => {
                Err(format!("GET {url}: {} with {} bytes of SHA-256 {}", r.status, r.body.len(), sha256_hex(&r.body)))
            }
            Err(e) => Err(format!("GET {url}: {e}")),
        };
        *lock(&out) = Some(r);
    });
    result
}

// ---------------------------------------------------------------------------------------------------------------
// Real agents
// ---------------------------------------------------------------------------------------------------------------

/// A real agent process: the host agent copied into `<tmp>/bin/`, enrolled with its config in `<tmp>/etc/`, run
/// outside any service manager (so it re-executes itself after an update).
pub struct RealAgent {
    dir: tempfile::TempDir,
    pub agent_id: String,
    child: Option<Child>,
}

impl RealAgent {
    /// Copies `source` into a fresh prefix and enrolls it with `server_url` using `token`.
    pub fn install(server_url: &str, token: &str, source: &Path) -> RealAgent {
        let dir = tempfile::Builder::new().prefix("rm-e2e-real-agent-").tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        let mut agent = RealAgent { dir, agent_id: String::new(), child: None };
        fs::copy(source, agent.exe()).expect("copying the agent");
        let mut cmd = agent.command();
        cmd.args(["enroll", "--server", server_url, "--config"]).arg(agent.config()).env("RM_ENROLL_TOKEN", token);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        let saved: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
        agent.agent_id = saved["agent_id"].as_str().expect("agent_id").to_string();
        agent
    }

    pub fn exe(&self) -> PathBuf {
        self.dir.path().join("bin").join(AGENT_BIN)
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("etc/agent.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The installed agent, with an environment that cannot change what it does: no `RM_*`, no proxies, no
    /// `INVOCATION_ID` (it would exit after an update instead of re-executing itself).
    fn command(&self) -> Command {
        let mut cmd = Command::new(self.exe());
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("RM_") || k.to_ascii_lowercase().ends_with("_proxy") || k == "INVOCATION_ID" {
                cmd.env_remove(&key);
            }
        }
        cmd.env("RM_AGENT_TRIAL_SECS", "1").stdin(Stdio::null());
        cmd
    }

    /// Starts `run`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::File::create(self.log_path()).unwrap();
        let mut cmd = self.command();
        cmd.arg("run").arg("--config").arg(self.config()).stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(cmd.spawn().expect("starting the agent"));
    }

    /// SHA-256 of the agent file on disk.
    pub fn installed_sha(&self) -> String {
        sha256_file(&self.exe())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Panics (with its log) if the process exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait().expect("try_wait")
        {
            panic!("the real agent {} exited with {status}\n{}", self.agent_id, self.log());
        }
    }
}

impl Drop for RealAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Admin API helpers
// ---------------------------------------------------------------------------------------------------------------

/// The host agent binary (what the install tests publish); the build every fleet starts on.
pub fn host_agent() -> PathBuf {
    binary(AGENT_BIN)
}

/// Puts `bytes` in the bundled dir as the linux/amd64 agent (before the server starts).
pub fn bundle_agent(bundled_dir: &Path, bytes: &[u8]) {
    fs::write(bundled_dir.join("agent-binaries").join(LINUX_AMD64), bytes).expect("writing the bundled agent");
}

/// Publishes `bytes` as the linux/amd64 agent through the upload API.
pub fn upload_agent(server: &Server, bytes: &[u8]) {
    let auth = format!("Bearer {}", server.admin_token());
    let sum = sha256_hex(bytes);
    let path = format!("/api/v1/assets/agent-binaries/{LINUX_AMD64}");
    let r = http_request_with_body(
        server.addr(),
        "PUT",
        &path,
        &[("Authorization", &auth), ("X-Checksum-Sha256", &sum)],
        bytes,
    )
    .unwrap_or_else(|e| panic!("upload failed: {e}\n{}", server.log_tail()));
    assert!(matches!(r.status, 200 | 201), "upload: {} {}", r.status, r.text());
}

/// An enrollment token for `uses` enrollments whose agents get `labels`.
pub fn create_token(server: &Server, uses: usize, labels: Value) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": uses, "labels": labels})));
    assert_eq!(r.status, 201, "creating a token: {}", r.text());
    r.json()["token"].as_str().expect("token").to_string()
}

/// `GET /api/v1/rollouts`: newest first.
pub fn rollouts(server: &Server) -> Vec<Value> {
    let r = server.admin("GET", "/api/v1/rollouts", None);
    assert_eq!(r.status, 200, "GET /api/v1/rollouts: {} {}", r.status, r.text());
    r.json()["rollouts"].as_array().expect("rollouts array").clone()
}

/// `GET /api/v1/rollouts/{id}` (with `hosts`).
pub fn rollout(server: &Server, id: u64) -> Value {
    let r = server.admin("GET", &format!("/api/v1/rollouts/{id}"), None);
    assert_eq!(r.status, 200, "GET /api/v1/rollouts/{id}: {} {}", r.status, r.text());
    r.json()
}

/// `POST /api/v1/rollouts` with `body`; the raw answer.
pub fn create_rollout(server: &Server, body: &Value) -> Response {
    server.admin("POST", "/api/v1/rollouts", Some(body))
}

/// `POST /api/v1/rollouts/{id}/{verb}` (start, pause, resume, abort, rollback); the raw answer.
pub fn rollout_verb(server: &Server, id: u64, verb: &str, body: Option<&Value>) -> Response {
    server.admin("POST", &format!("/api/v1/rollouts/{id}/{verb}"), body)
}

/// The fleet view's agents.
pub fn fleet_agents(server: &Server) -> Vec<Value> {
    let r = server.admin("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "fleet view: {}", r.text());
    r.json()["agents"].as_array().expect("agents array").clone()
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn process_cpu(pid: i32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm in /proc stat") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the file (utime, stime) are the 12th and 13th after the command name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Writes `line` to `<target dir>/rollout-figures.txt` (replacing the last run's) and to stderr, marked
/// `ROLLOUT-FIGURES:`.
pub fn record_figures(line: &str) {
    eprintln!("ROLLOUT-FIGURES: {line}");
    let path = profile_dir().parent().expect("the profile dir is inside the target dir").join("rollout-figures.txt");
    fs::write(&path, format!("ROLLOUT-FIGURES: {line}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
