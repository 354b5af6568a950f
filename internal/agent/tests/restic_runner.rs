//! The agent's restic runner against the real restic (Debian's 0.14 at /usr/bin/restic here) and real local
//! repositories in temporary directories. Every outcome is checked against the repository with the restic CLI
//! directly, not through the runner. Without restic the tests skip (and fail under CI).

#![cfg(unix)]

#[path = "../../../tests/support/skip.rs"]
mod skip;

/// What `skip.rs` needs from the end-to-end harness.
mod bin {
    /// `<target dir>/debug`: the directory of this test executable without `deps`.
    pub(crate) fn profile_dir() -> std::path::PathBuf {
        let exe = std::env::current_exe().expect("the test executable");
        let mut dir = exe.parent().expect("a parent dir").to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        dir
    }
}

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rm_agent::restic::{self, Cancel, Job, MIN_VERSION, Outcome, Restic, Version};
use rm_protocol::backup::{AgentPlan, AgentRepository, FailureReason, OperationStatus, Progress, Snapshot, plan_tag};
use rm_protocol::retention::Retention;

const HOST: &str = "rm-test-host";
const PASSWORD: &str = "correct horse battery staple";

/// The host's restic, or `None` after recording the skip.
fn restic_or_skip() -> Option<Restic> {
    match restic::detect(None) {
        Ok(r) => Some(r),
        Err(e) => {
            skip::skip(format!("needs restic {MIN_VERSION}+ on PATH (Debian: apt-get install restic): {e}"));
            None
        }
    }
}

/// A temporary world: `src/` to back up, `repo/` (not initialised), `state/` (the agent's state dir).
struct World {
    dir: tempfile::TempDir,
    restic: Restic,
}

impl World {
    fn new(restic: &Restic) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        World { dir, restic: restic.clone() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn src(&self) -> PathBuf {
        self.path("src")
    }

    fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// The restic CLI on `repo` with `password`, without anything the runner does.
    fn cli(&self, repo: &Path, password: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(&self.restic.path);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RESTIC_") {
                cmd.env_remove(name);
            }
        }
        cmd.args(args)
            .env("RESTIC_REPOSITORY", repo)
            .env("RESTIC_PASSWORD", password)
            .env("RESTIC_CACHE_DIR", self.path("cli-cache"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn init(&self) {
        let out = self.cli(&self.repo(), PASSWORD, &["init"]);
        assert!(out.status.success(), "restic init: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `restic snapshots --json` on the repository, read by the test itself.
    fn snapshots(&self, repo: &Path) -> Vec<serde_json::Value> {
        let out = self.cli(repo, PASSWORD, &["snapshots", "--json"]);
        assert!(out.status.success(), "restic snapshots: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The paths in a snapshot (`restic ls`).
    fn ls(&self, snapshot: &str) -> Vec<String> {
        let out = self.cli(&self.repo(), PASSWORD, &["ls", snapshot]);
        assert!(out.status.success(), "restic ls: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().skip(1).map(str::to_string).collect()
    }

    /// Lock files in the repository (named by their 64-hex id; restic writes them through a temporary name first).
    fn locks(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(self.repo().join("locks")) else { return 0 };
        dir.filter_map(Result::ok)
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            })
            .count()
    }

    /// `len` bytes that do not compress or deduplicate, different for each `seed`.
    fn write_data(&self, rel: &str, len: usize, seed: u64) {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(len);
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    fn plan(&self, name: &str) -> AgentPlan {
        AgentPlan {
            name: name.into(),
            repository: "r".into(),
            paths: vec![self.src().display().to_string()],
            excludes: vec![],
            schedule: "@every 1h".into(),
            timezone: Default::default(),
            tags: vec![],
            one_file_system: false,
            exclude_caches: false,
            timeout_secs: 3600,
            jitter_secs: 0,
            retention: None,
        }
    }

    fn repository(&self, repo: &Path, password: &str) -> AgentRepository {
        AgentRepository {
            name: "r".into(),
            url: repo.display().to_string(),
            password: password.into(),
            env: BTreeMap::new(),
            ca_cert: None,
            auto_init: false,
            min_restic_version: None,
            prune: None,
            check: None,
        }
    }

    fn backup(&self, plan: &AgentPlan, repository: &AgentRepository) -> Outcome {
        self.backup_with(&self.restic, plan, repository, Cancel::default(), Duration::from_secs(60), &mut |_| {})
    }

    fn backup_with(
        &self,
        restic: &Restic,
        plan: &AgentPlan,
        repository: &AgentRepository,
        cancel: Cancel,
        timeout: Duration,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Outcome {
        let state = self.state();
        let job = Job { plan, repository, hostname: HOST, state_dir: &state, cancel, timeout };
        let outcome = restic::backup(restic, &job, on_progress);
        assert_no_secret_files(&state);
        outcome
    }
}

/// The password and CA files are gone whatever the outcome.
fn assert_no_secret_files(state: &Path) {
    let left: Vec<_> = std::fs::read_dir(state.join("tmp")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "secret files left in {}: {left:?}", state.join("tmp").display());
    let mode = std::fs::metadata(state.join("tmp")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

/// Writes an executable script atomically and waits until it can be run: another test's fork may briefly hold a
/// descriptor of the file open (ETXTBSY).
fn write_script(path: &Path, body: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match Command::new(path).arg("--probe").env("RM_PROBE", "1").output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot run {}: {e}", path.display()),
            Ok(_) => return,
        }
    }
}

fn assert_outcome(outcome: &Outcome, status: OperationStatus, reason: Option<FailureReason>) {
    assert_eq!((outcome.status, outcome.reason), (status, reason), "{outcome:#?}");
}

fn has_plan_snapshot(snapshots: &[Snapshot], plan: &str, id: &str) -> bool {
    snapshots.iter().any(|s| s.id == id && s.hostname == HOST && s.tags.contains(&plan_tag(plan)))
}

#[test]
fn detect_finds_restic_and_explains_what_is_not_usable() {
    let Some(found) = restic_or_skip() else { return };
    assert!(found.version >= MIN_VERSION, "{found:?}");
    assert!(found.path.is_absolute() && found.path.ends_with("restic"), "{found:?}");
    assert_eq!(restic::detect(Some(&found.path)).unwrap(), found);
    let info = restic::info(&Ok(found.clone()));
    assert_eq!(info.version, Some(found.version.to_string()));

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-restic");
    let err = restic::detect(Some(&missing)).unwrap_err();
    assert!(err.contains("not found") && err.contains("no-restic"), "{err}");
    let info = restic::info(&Err(err.clone()));
    assert_eq!((info.version, info.error), (None, Some(err)));

    let err = restic::detect(Some(dir.path())).unwrap_err();
    assert!(err.contains("is a directory"), "{err}");

    let plain = dir.path().join("plain");
    std::fs::write(&plain, "#!/bin/sh\necho restic 0.14.0\n").unwrap();
    let err = restic::detect(Some(&plain)).unwrap_err();
    assert!(err.contains("not executable"), "{err}");

    let old = dir.path().join("old-restic");
    write_script(&old, "#!/bin/sh\necho 'restic 0.12.1 compiled with go1.15.15 on linux/amd64'\n");
    let err = restic::detect(Some(&old)).unwrap_err();
    assert!(err.contains("0.12.1") && err.contains("too old") && err.contains("0.14.0"), "{err}");

    let dev = dir.path().join("dev-restic");
    write_script(
        &dev,
        "#!/bin/sh\necho 'restic 0.17.3-dev (compiled manually) compiled with go1.23.4 on linux/amd64'\n",
    );
    let ok = restic::detect(Some(&dev)).unwrap();
    assert_eq!(ok.version, Version { major: 0, minor: 17, patch: 3 });

    let other = dir.path().join("not-restic");
    write_script(&other, "#!/bin/sh\necho 'rsync  version 3.2.7'\n");
    let err = restic::detect(Some(&other)).unwrap_err();
    assert!(err.contains("does not look like restic") && err.contains("rsync"), "{err}");

    let failing = dir.path().join("failing-restic");
    write_script(&failing, "#!/bin/sh\necho 'cannot load libc' >&2\nexit 127\n");
    let err = restic::detect(Some(&failing)).unwrap_err();
    assert!(err.contains("exit code 127") && err.contains("cannot load libc"), "{err}");
}

#[test]
fn a_backup_reports_progress_summary_and_its_snapshot_and_honours_excludes() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    for i in 0..8 {
        w.write_data(&format!("src/data/f{i}.bin"), 1 << 20, i);
    }
    std::fs::write(w.path("src/keep.txt"), "keep me").unwrap();
    std::fs::write(w.path("src/skip.tmp"), "excluded by pattern").unwrap();
    std::fs::create_dir(w.path("src/cache")).unwrap();
    std::fs::write(w.path("src/cache/CACHEDIR.TAG"), "Signature: 8a477f597d28d172789f06886806bc55\n").unwrap();
    std::fs::write(w.path("src/cache/inside"), "excluded as a cache").unwrap();
    let mut plan = w.plan("home");
    plan.excludes = vec!["*.tmp".into()];
    plan.exclude_caches = true;
    plan.one_file_system = true;
    plan.tags = vec!["daily".into()];
    let repository = w.repository(&w.repo(), PASSWORD);

    let mut progress = Vec::new();
    let outcome = w.backup_with(&restic, &plan, &repository, Cancel::default(), Duration::from_secs(60), &mut |p| {
        progress.push(p.clone())
    });
    assert_outcome(&outcome, OperationStatus::Success, None);
    assert_eq!(outcome.exit_code, Some(0));
    assert!(!progress.is_empty(), "restic printed no status line");
    assert!(progress.iter().all(|p| (0.0..=1.0).contains(&p.percent_done)), "{progress:?}");
    let summary = outcome.summary.clone().expect("a summary");
    // 8 data files, keep.txt, and the cache's CACHEDIR.TAG (restic keeps the tag, not the rest of the cache).
    assert_eq!(summary.files_new, 10, "{summary:?}");
    assert!(summary.data_added >= 8 << 20, "{summary:?}");
    let id = summary.snapshot_id.clone().expect("a snapshot id");
    assert_eq!(id.len(), 64, "the short id of restic 0.14 is completed: {id}");
    let snapshots = outcome.snapshots.clone().expect("the plan's snapshots");
    assert_eq!(snapshots.len(), 1);
    assert!(has_plan_snapshot(&snapshots, "home", &id), "{snapshots:?}");
    assert_eq!(snapshots[0].tags, ["rm-plan:home", "daily"]);
    assert_eq!(snapshots[0].paths, [w.src().display().to_string()]);

    // Independently: the repository holds that snapshot, with host and tags, without the excluded files.
    let listed = w.snapshots(&w.repo());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["hostname"], HOST);
    assert_eq!(listed[0]["tags"], serde_json::json!(["rm-plan:home", "daily"]));
    let files = w.ls(&id);
    let src = w.src().display().to_string();
    assert!(files.contains(&format!("{src}/keep.txt")), "{files:?}");
    assert!(files.contains(&format!("{src}/data/f7.bin")), "{files:?}");
    assert!(files.contains(&format!("{src}/cache/CACHEDIR.TAG")), "{files:?}");
    assert!(!files.iter().any(|f| f.ends_with("skip.tmp") || f.contains("/cache/inside")), "{files:?}");
    assert!(w.state().join("restic-cache").is_dir(), "restic's cache lives in the state dir");

    // A second run lists both snapshots of the plan, and not another plan's.
    let other = w.plan("other");
    assert_outcome(&w.backup(&other, &repository), OperationStatus::Success, None);
    let again = w.backup(&plan, &repository);
    assert_outcome(&again, OperationStatus::Success, None);
    let snapshots = again.snapshots.unwrap();
    assert_eq!(snapshots.len(), 2, "{snapshots:?}");
    assert!(snapshots.iter().all(|s| s.tags.contains(&plan_tag("home"))));
    assert_eq!(again.summary.unwrap().files_unmodified, 10);
}

/// A plan that covers the agent's state directory (`/var/lib`, `/etc`) does not back up restic's cache or the
/// short-lived secret files, and still backs up the rest of that directory.
#[test]
fn the_state_directorys_cache_and_secret_files_are_never_backed_up() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    let state = w.path("src/state");
    std::fs::create_dir_all(state.join("restic-cache")).unwrap();
    std::fs::write(state.join("restic-cache/earlier"), "a cache file").unwrap();
    std::fs::write(state.join("agent.json"), "{}").unwrap();
    std::fs::write(w.path("src/keep.txt"), "keep me").unwrap();
    let plan = w.plan("p");
    let repository = w.repository(&w.repo(), PASSWORD);
    for _ in 0..2 {
        let job = Job {
            plan: &plan,
            repository: &repository,
            hostname: HOST,
            state_dir: &state,
            cancel: Cancel::default(),
            timeout: Duration::from_secs(60),
        };
        let outcome = restic::backup(&restic, &job, &mut |_| {});
        assert_outcome(&outcome, OperationStatus::Success, None);
        assert_no_secret_files(&state);
    }
    assert!(std::fs::read_dir(state.join("restic-cache")).unwrap().count() > 1, "restic's cache is there");
    let snapshots = w.snapshots(&w.repo());
    assert_eq!(snapshots.len(), 2);
    for snapshot in snapshots {
        let files = w.ls(snapshot["id"].as_str().unwrap());
        let src = w.src().display().to_string();
        assert!(files.contains(&format!("{src}/keep.txt")), "{files:?}");
        assert!(files.contains(&format!("{src}/state/agent.json")), "the rest of the state dir: {files:?}");
        assert!(
            !files.iter().any(|f| f.contains("/state/restic-cache") || f.contains("/state/tmp")),
            "the cache and the secret files' directory are excluded: {files:?}"
        );
    }
}

#[test]
fn a_wrong_password_is_reported_as_such() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    std::fs::write(w.path("src/a"), "a").unwrap();
    let outcome = w.backup(&w.plan("p"), &w.repository(&w.repo(), "not the password"));
    assert_outcome(&outcome, OperationStatus::Failed, Some(FailureReason::WrongPassword));
    let message = outcome.message.unwrap();
    assert!(message.contains("wrong password"), "{message}");
    assert!(!message.contains("not the password"), "{message}");
    assert!(w.snapshots(&w.repo()).is_empty());
}

#[test]
fn a_missing_repository_is_reported_or_initialised_with_auto_init() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    std::fs::write(w.path("src/a"), "a").unwrap();
    let plan = w.plan("p");
    let mut repository = w.repository(&w.repo(), PASSWORD);
    let outcome = w.backup(&plan, &repository);
    assert_outcome(&outcome, OperationStatus::Failed, Some(FailureReason::RepositoryMissing));
    let message = outcome.message.unwrap();
    assert!(message.starts_with("Fatal: "), "the Fatal line first: {message}");
    assert!(message.contains(&w.repo().display().to_string()), "{message}");
    assert!(!w.repo().exists(), "nothing created without auto_init");

    repository.auto_init = true;
    let outcome = w.backup(&plan, &repository);
    assert_outcome(&outcome, OperationStatus::Success, None);
    assert!(outcome.message.unwrap().contains("initialised the repository"));
    let id = outcome.summary.unwrap().snapshot_id.unwrap();
    let listed = w.snapshots(&w.repo());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
}

#[test]
fn unreadable_files_end_as_a_warning_that_names_them() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    std::fs::write(w.path("src/readable"), "fine").unwrap();
    let locked = w.path("src/unreadable");
    std::fs::write(&locked, "secret").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut plan = w.plan("p");
    let mut unreadable = vec![locked.display().to_string()];
    if std::fs::File::open(&locked).is_ok() {
        // Root reads a mode-000 file. A write-only sysctl is refused even to root (restic 0.14 then exits 3 with
        // "open /proc/sys/vm/drop_caches: permission denied"; one missing path among several only exits 0).
        let sysctl = Path::new("/proc/sys/vm/drop_caches");
        if !sysctl.exists() || std::fs::File::open(sysctl).is_ok() {
            skip::skip("running as root without a write-only /proc/sys/vm/drop_caches: no file restic cannot read");
            return;
        }
        unreadable = vec![sysctl.display().to_string()];
        plan.paths.push(sysctl.display().to_string());
    }
    let outcome = w.backup(&plan, &w.repository(&w.repo(), PASSWORD));
    assert_outcome(&outcome, OperationStatus::Warning, None);
    assert_eq!(outcome.exit_code, Some(3));
    let message = outcome.message.unwrap();
    for path in &unreadable {
        assert!(message.contains(&format!("open {path}: permission denied")), "{message}");
    }
    let id = outcome.summary.unwrap().snapshot_id.unwrap();
    assert!(has_plan_snapshot(&outcome.snapshots.unwrap(), "p", &id));
    assert_eq!(w.snapshots(&w.repo()).len(), 1, "a warning still made a snapshot");
}

#[test]
fn cancel_stops_restic_and_leaves_nothing_in_the_way() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    for i in 0..16 {
        w.write_data(&format!("src/f{i}"), 1 << 20, 100 + i);
    }
    let plan = w.plan("p");
    let repository = w.repository(&w.repo(), PASSWORD);
    let cancel = Cancel::default();
    let started = Instant::now();
    let outcome =
        w.backup_with(&restic, &plan, &repository, cancel.clone(), Duration::from_secs(60), &mut |_| cancel.cancel());
    assert_outcome(&outcome, OperationStatus::Cancelled, None);
    assert!(started.elapsed() < Duration::from_secs(10), "restic stopped on SIGINT, not after the grace period");
    assert!(outcome.summary.is_none() && outcome.snapshots.is_none());
    assert!(w.snapshots(&w.repo()).is_empty(), "no snapshot from a cancelled run");

    let outcome = w.backup(&plan, &repository);
    assert_outcome(&outcome, OperationStatus::Success, None);
    assert_eq!(w.snapshots(&w.repo()).len(), 1);

    let cancelled = Cancel::default();
    cancelled.cancel();
    let outcome = w.backup_with(&restic, &plan, &repository, cancelled, Duration::from_secs(60), &mut |_| {});
    assert_outcome(&outcome, OperationStatus::Cancelled, None);
}

#[test]
fn the_timeout_stops_restic() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    for i in 0..16 {
        w.write_data(&format!("src/f{i}"), 1 << 20, 200 + i);
    }
    let plan = w.plan("p");
    let repository = w.repository(&w.repo(), PASSWORD);
    let started = Instant::now();
    let outcome =
        w.backup_with(&restic, &plan, &repository, Cancel::default(), Duration::from_millis(300), &mut |_| {});
    assert_outcome(&outcome, OperationStatus::Failed, Some(FailureReason::Timeout));
    assert!(started.elapsed() < Duration::from_secs(10));
    let message = outcome.message.unwrap();
    assert!(message.contains("timeout of 300 ms"), "{message}");
    assert!(w.snapshots(&w.repo()).is_empty());
    assert_outcome(&w.backup(&plan, &repository), OperationStatus::Success, None);
}

/// Waits until `restic` (a child we started on the repository) has taken its lock: there are more than `before`.
fn wait_for_lock(w: &World, child: &mut std::process::Child, before: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    while w.locks() <= before {
        if let Some(status) = child.try_wait().unwrap() {
            let said = std::fs::read_to_string(w.path("cli-stderr")).unwrap_or_default();
            panic!("restic ended ({status}) before it locked the repository: {said}");
        }
        assert!(Instant::now() < until, "restic did not lock the repository");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_cli(w: &World, args: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(&w.restic.path);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RESTIC_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args)
        .env("RESTIC_REPOSITORY", w.repo())
        .env("RESTIC_PASSWORD", PASSWORD)
        .env("RESTIC_CACHE_DIR", w.path("cli-cache"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.path("cli-stderr")).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn stale_locks_do_not_block_and_a_live_exclusive_lock_is_reported() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    for i in 0..16 {
        w.write_data(&format!("src/f{i}"), 1 << 20, 300 + i);
    }
    let plan = w.plan("p");
    let repository = w.repository(&w.repo(), PASSWORD);

    // A backup killed with SIGKILL leaves its (non-exclusive) lock behind.
    let mut killed = spawn_cli(&w, &["backup", &w.src().display().to_string()]);
    wait_for_lock(&w, &mut killed, 0);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(w.locks(), 1, "the killed backup's lock stays");
    let outcome = w.backup(&plan, &repository);
    assert_outcome(&outcome, OperationStatus::Success, None);

    // An exclusive lock held by a live restic (`key passwd` waiting for the new password on stdin): locked. (The
    // killed backup's stale lock would keep restic 0.14 from taking an exclusive lock at all: removed first.)
    assert!(w.cli(&w.repo(), PASSWORD, &["unlock"]).status.success());
    assert_eq!(w.locks(), 0);
    let mut holder = spawn_cli(&w, &["key", "passwd"]);
    wait_for_lock(&w, &mut holder, 0);
    // The runner waits for it (5 s, then 10 s, …) until the next wait would pass the run's timeout: locked.
    let started = Instant::now();
    let short = Duration::from_secs(12);
    let outcome = w.backup_with(&restic, &plan, &repository, Cancel::default(), short, &mut |_| {});
    assert!(started.elapsed() >= Duration::from_secs(5), "it waited once: {:?}", started.elapsed());
    assert!(started.elapsed() < short, "no wait past the timeout: {:?}", started.elapsed());
    assert_outcome(&outcome, OperationStatus::Failed, Some(FailureReason::Locked));
    let message = outcome.message.unwrap();
    assert!(message.contains("repository is already locked exclusively"), "{message}");
    assert!(message.contains("restic unlock"), "the note says unlock was tried: {message}");
    assert!(message.contains("waited for it"), "the note says it waited: {message}");

    // The holder dies while a backup waits: its exclusive lock is stale then; after its wait the runner's
    // `restic unlock` removes it and the retry succeeds.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        holder.kill().unwrap();
        holder.wait().unwrap(); // reaped: its PID is gone, so restic sees its lock as stale
    });
    let outcome = w.backup(&plan, &repository);
    killer.join().unwrap();
    assert_outcome(&outcome, OperationStatus::Success, None);
    let message = outcome.message.unwrap();
    assert!(message.contains("restic unlock") && message.contains("waited for it"), "{message}");
    assert_eq!(w.snapshots(&w.repo()).len(), 2);
}

#[test]
fn restic_gone_at_run_time_is_unavailable_and_restic_errors_come_back_in_words() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    std::fs::write(w.path("src/a"), "a").unwrap();
    let plan = w.plan("p");
    let repository = w.repository(&w.repo(), PASSWORD);

    let gone = Restic { path: w.path("uninstalled/restic"), version: restic.version };
    let outcome = w.backup_with(&gone, &plan, &repository, Cancel::default(), Duration::from_secs(60), &mut |_| {});
    assert_outcome(&outcome, OperationStatus::Failed, Some(FailureReason::ResticUnavailable));
    assert!(outcome.message.unwrap().contains("restic not found at"));

    let mut missing_paths = plan.clone();
    missing_paths.paths = vec![w.path("nothing-here").display().to_string()];
    let outcome = w.backup(&missing_paths, &repository);
    assert_outcome(&outcome, OperationStatus::Failed, Some(FailureReason::Other));
    assert_eq!(outcome.exit_code, Some(1));
    let message = outcome.message.unwrap();
    assert!(message.starts_with("Fatal: all target directories/files do not exist"), "{message}");

    let mut bad_ca = repository.clone();
    bad_ca.ca_cert = Some("not a certificate".into());
    let outcome = w.backup(&plan, &bad_ca);
    assert_outcome(&outcome, OperationStatus::Failed, Some(FailureReason::Other));
    let message = outcome.message.unwrap();
    assert!(message.starts_with("cannot parse root certificate"), "{message}");
    assert_eq!(message.lines().count(), 1, "restic's Go stack trace is left out: {message}");
}

/// A CA certificate restic can parse (self-signed; validity does not matter for a local repository).
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBbTCCAROgAwIBAgIUb3F+NWko6INkkLhFt0zdAse6SIQwCgYIKoZIzj0EAwIw
DDEKMAgGA1UEAwwBeDAeFw0yNjEyMDIxMDA5NTVaFw0yNjEyMDMxMDA5NTVaMAwx
CjAIBgNVBAMMAXgwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARZ75Q4QY/kXyHU
/oGHksTcgZh6/v/uQxMIkxzB3ZyXtBj4aAtouYnvZT+Lg83y3RVa/4dZksmivb/Y
0Kx7NwCeo1MwUTAdBgNVHQ4EFgQU2yq8/hNVrj0P/c8RDx8OOwFwrEMwHwYDVR0j
BBgwFoAU2yq8/hNVrj0P/c8RDx8OOwFwrEMwDwYDVR0TAQH/BAUwAwEB/zAKBggq
hkjOPQQDAgNIADBFAiBXYHC/cYmOugQCPBe0DZmllzCfTCFGu6gfjMkyqHTmAQIh
ANBJmeK9DDDARTtreekjmx5qG6u+gS0V0rrjcsiFy2Zh
-----END CERTIFICATE-----
";

/// Run in a child test process whose environment carries restic variables of its own: none of them may reach
/// restic, the password travels only in a 0600 file that is gone afterwards, never in argv or the environment.
#[test]
fn secrets_travel_in_private_files_and_inherited_restic_variables_do_not_leak() {
    let Some(restic) = restic_or_skip() else { return };
    if std::env::var_os("RM_RESTIC_RUNNER_CHILD").is_some() {
        return secrets_scenario(&restic);
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "secrets_travel_in_private_files_and_inherited_restic_variables_do_not_leak"])
        .args(["--nocapture", "--test-threads=1"])
        .env("RM_RESTIC_RUNNER_CHILD", "1")
        .env("RESTIC_PASSWORD", "inherited-wrong-password")
        .env("RESTIC_PASSWORD_COMMAND", "echo inherited-wrong-password")
        .env("RESTIC_REPOSITORY", elsewhere.path())
        .env("RESTIC_CACHE_DIR", elsewhere.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the child test failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran the test:\n{text}");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0, "nothing went to the inherited repository");
}

fn secrets_scenario(restic: &Restic) {
    assert!(std::env::var_os("RESTIC_PASSWORD").is_some(), "the parent set the inherited variables");
    let w = World::new(restic);
    w.init();
    std::fs::write(w.path("src/a"), "a").unwrap();
    let log = w.path("restic-calls.log");
    let wrapper = w.path("restic-wrapper");
    write_script(
        &wrapper,
        &format!(
            r#"#!/bin/sh
[ -n "$RM_PROBE" ] && exit 0
{{
  printf 'ARGV'; for a in "$@"; do printf ' %s' "$a"; done; printf '\n'
  env | grep '^RESTIC_' | sed 's/^/ENV /'
  printf 'AWS %s\n' "$AWS_ACCESS_KEY_ID"
  printf 'PWFILE %s %s %s\n' "$RESTIC_PASSWORD_FILE" "$(stat -c %a "$RESTIC_PASSWORD_FILE")" "$(cat "$RESTIC_PASSWORD_FILE")"
  for a in "$@"; do case "$a" in --cacert=*) f="${{a#--cacert=}}"; printf 'CA %s %s %s\n' "$f" "$(stat -c %a "$f")" "$(head -n 1 "$f")";; esac; done
}} >> '{log}'
exec '{restic}' "$@"
"#,
            log = log.display(),
            restic = restic.path.display()
        ),
    );
    let wrapped = Restic { path: wrapper.clone(), version: restic.version };
    let plan = w.plan("p");
    let mut repository = w.repository(&w.repo(), PASSWORD);
    repository.ca_cert = Some(CA_PEM.into());
    repository.env.insert("AWS_ACCESS_KEY_ID".into(), "AKIA-TEST".into());
    repository.env.insert("RESTIC_PASSWORD".into(), "from-the-repository-env".into());
    let outcome = w.backup_with(&wrapped, &plan, &repository, Cancel::default(), Duration::from_secs(60), &mut |_| {});
    assert_outcome(&outcome, OperationStatus::Success, None);
    assert_eq!(outcome.snapshots.as_ref().map(Vec::len), Some(1), "{outcome:#?}");

    let log = std::fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = log.lines().filter(|l| l.starts_with("ARGV")).collect();
    let own = |dir: &str| format!("--exclude={}", w.state().join(dir).display());
    let backup = format!(
        "ARGV backup --json --host=rm-test-host --tag=rm-plan:p {} {} --cache-dir=",
        own("restic-cache"),
        own("tmp")
    );
    assert!(calls[0].starts_with(&backup), "{log}");
    assert!(calls[0].ends_with(&format!(" -- {}", w.src().display())), "{log}");
    assert!(calls[1].starts_with("ARGV snapshots --json --no-lock --host=rm-test-host --tag=rm-plan:p"), "{log}");
    assert!(calls.iter().all(|c| c.contains(&format!("--cache-dir={}", w.state().join("restic-cache").display()))));
    assert!(!log.contains("inherited-wrong-password") && !log.contains("from-the-repository-env"), "{log}");
    let env: Vec<&str> = log.lines().filter(|l| l.starts_with("ENV ")).map(|l| l.split('=').next().unwrap()).collect();
    assert!(env.iter().all(|v| *v == "ENV RESTIC_REPOSITORY" || *v == "ENV RESTIC_PASSWORD_FILE"), "{log}");
    assert!(log.contains(&format!("ENV RESTIC_REPOSITORY={}\n", w.repo().display())), "{log}");
    assert!(log.contains("AWS AKIA-TEST\n"), "{log}");
    for line in log.lines().filter(|l| l.starts_with("PWFILE ")) {
        let parts: Vec<&str> = line.splitn(4, ' ').collect();
        let file = Path::new(parts[1]);
        assert_eq!(file.parent().unwrap(), w.state().join("tmp"), "{line}");
        assert_eq!((parts[2], parts[3]), ("600", PASSWORD), "{line}");
        assert!(!file.exists(), "the password file is gone: {line}");
    }
    let ca_lines: Vec<&str> = log.lines().filter(|l| l.starts_with("CA ")).collect();
    assert_eq!(ca_lines.len(), calls.len(), "every call gets --cacert: {log}");
    for line in ca_lines {
        assert!(line.ends_with(" 600 -----BEGIN CERTIFICATE-----"), "{line}");
        assert!(!Path::new(line.split(' ').nth(1).unwrap()).exists(), "{line}");
    }
    // The runner does not put anything into the agent's own environment.
    assert_eq!(std::env::var("RESTIC_PASSWORD").unwrap(), "inherited-wrong-password");
    assert!(std::env::var_os("RESTIC_PASSWORD_FILE").is_none());
}

/// A restic that ignores SIGINT (from the start: the test's cancel follows its first progress line at once), records
/// its pid and reports progress.
fn stubborn_restic(w: &World) -> Restic {
    let path = w.path("stubborn-restic");
    write_script(
        &path,
        &format!(
            "#!/bin/sh\n[ -n \"$RM_PROBE\" ] && exit 0\ntrap '' INT\necho $$ > '{}'\n\
             echo '{{\"message_type\":\"status\",\"percent_done\":0.5,\"total_files\":2}}'\n\
             exec sleep 30\n",
            w.path("stubborn.pid").display()
        ),
    );
    Restic { path, version: MIN_VERSION }
}

fn is_running(pid_file: &Path) -> bool {
    let pid: libc::pid_t = std::fs::read_to_string(pid_file).unwrap().trim().parse().unwrap();
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn restic_that_ignores_sigint_is_killed_after_the_grace_period() {
    let w = World::new(&Restic { path: PathBuf::from("/bin/false"), version: MIN_VERSION });
    let stubborn = stubborn_restic(&w);
    let plan = w.plan("p");
    let repository = w.repository(&w.repo(), PASSWORD);
    let cancel = Cancel::default();
    let mut seen = Vec::new();
    let started = Instant::now();
    let outcome = w.backup_with(&stubborn, &plan, &repository, cancel.clone(), Duration::from_secs(60), &mut |p| {
        seen.push(p.percent_done);
        cancel.cancel();
    });
    let took = started.elapsed();
    assert_outcome(&outcome, OperationStatus::Cancelled, None);
    assert_eq!(seen, [0.5]);
    assert!(outcome.message.unwrap().contains("killed after it ignored SIGINT for 10 s"));
    assert!(took >= Duration::from_secs(10) && took < Duration::from_secs(20), "{took:?}");
    assert!(!is_running(&w.path("stubborn.pid")));
}

#[test]
fn a_panicking_progress_callback_kills_restic_and_removes_the_password_file() {
    let w = World::new(&Restic { path: PathBuf::from("/bin/false"), version: MIN_VERSION });
    let stubborn = stubborn_restic(&w);
    let plan = w.plan("p");
    let repository = w.repository(&w.repo(), PASSWORD);
    let state = w.state();
    let job = Job {
        plan: &plan,
        repository: &repository,
        hostname: HOST,
        state_dir: &state,
        cancel: Cancel::default(),
        timeout: Duration::from_secs(60),
    };
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        restic::backup(&stubborn, &job, &mut |_| panic!("the caller's callback failed"))
    }));
    assert!(panicked.is_err());
    assert_no_secret_files(&state);
    assert!(!is_running(&w.path("stubborn.pid")), "restic was killed when the runner unwound");
}

/// Whether process `pid` still runs (a zombie waiting for its reaper counts as gone).
#[cfg(target_os = "linux")]
fn alive(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Linux: a restic whose agent is SIGKILLed (outside systemd, nothing else stops it) gets SIGINT and ends, instead
/// of running on without a lease. The agent is a child test process that starts a backup with a "restic" that
/// records its pid and sleeps.
#[cfg(target_os = "linux")]
#[test]
fn restic_ends_when_the_agent_is_killed() {
    const CHILD: &str = "RM_RESTIC_PDEATH_PIDFILE";
    let name = "restic_ends_when_the_agent_is_killed";
    if let Some(pid_file) = std::env::var_os(CHILD) {
        let w = World::new(&Restic { path: PathBuf::from("/bin/false"), version: MIN_VERSION });
        let sleeper = w.path("sleepy-restic");
        let pid_file = Path::new(&pid_file);
        write_script(
            &sleeper,
            &format!(
                "#!/bin/sh\n[ -n \"$RM_PROBE\" ] && exit 0\necho $$ > '{tmp}' && mv '{tmp}' '{file}'\nexec sleep 60\n",
                tmp = pid_file.with_extension("tmp").display(),
                file = pid_file.display()
            ),
        );
        let restic = Restic { path: sleeper, version: MIN_VERSION };
        let outcome = w.backup_with(
            &restic,
            &w.plan("p"),
            &w.repository(&w.repo(), PASSWORD),
            Cancel::default(),
            Duration::from_secs(120),
            &mut |_| {},
        );
        panic!("the parent kills this process before restic ends: {outcome:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("restic.pid");
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, &pid_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while !pid_file.exists() {
        assert!(Instant::now() < until, "the child agent never started its restic");
        assert!(agent.try_wait().unwrap().is_none(), "the child agent ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: libc::pid_t = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(alive(pid), "restic runs");
    agent.kill().unwrap(); // SIGKILL: the agent cannot stop restic itself
    agent.wait().unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let survived = alive(pid);
    if survived {
        // SAFETY: kill(2) with a plain signal; the pid is the orphaned sleep this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(!survived, "restic outlived its agent");
}

#[test]
fn forget_removes_only_this_hosts_snapshots_of_the_plan_whatever_their_paths() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    std::fs::write(w.path("src/a.txt"), "a").unwrap();
    std::fs::create_dir(w.path("other")).unwrap();
    std::fs::write(w.path("other/b.txt"), "b").unwrap();
    let repository = w.repository(&w.repo(), PASSWORD);
    let mut plan = w.plan("home");
    let mut ours = Vec::new();
    for i in 0..4 {
        // The plan's paths and extra tags change halfway: still one group for retention.
        if i == 2 {
            plan.paths.push(w.path("other").display().to_string());
            plan.tags = vec!["moved".into()];
        }
        let out = w.backup(&plan, &repository);
        assert_outcome(&out, OperationStatus::Success, None);
        ours.push(out.summary.unwrap().snapshot_id.unwrap());
    }
    // Another host with the same plan tag, and this host's other plan: never touched.
    let src = w.src().display().to_string();
    for _ in 0..2 {
        let out = w.cli(&w.repo(), PASSWORD, &["backup", "-q", "--host", "other-host", "--tag", "rm-plan:home", &src]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_outcome(&w.backup(&w.plan("other-plan"), &repository), OperationStatus::Success, None);
    }
    assert_eq!(w.snapshots(&w.repo()).len(), 8);

    plan.retention = Some(Retention { last: Some(2), ..Default::default() });
    let state = w.state();
    let job = Job {
        plan: &plan,
        repository: &repository,
        hostname: HOST,
        state_dir: &state,
        cancel: Cancel::default(),
        timeout: Duration::from_secs(60),
    };
    let out = restic::forget(&restic, &job);
    assert_no_secret_files(&state);
    assert_outcome(&out, OperationStatus::Success, None);
    let summary = out.forget.clone().expect("a forget summary");
    assert_eq!((summary.removed, summary.kept), (2, 2), "{out:#?}");
    let mut removed = summary.removed_ids.clone();
    removed.sort();
    let mut want = vec![ours[0].clone(), ours[1].clone()];
    want.sort();
    assert_eq!(removed, want, "the two oldest of this host's plan went");
    let kept: Vec<String> = out.snapshots.clone().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(kept, vec![ours[3].clone(), ours[2].clone()], "the kept ones, newest first, are the report's list");

    // Checked with the restic CLI: 2 of ours, both of the other host's, both of the other plan's.
    let left = w.snapshots(&w.repo());
    let count = |host: &str, tag: &str| {
        left.iter().filter(|s| s["hostname"] == host && s["tags"].as_array().unwrap().iter().any(|t| t == tag)).count()
    };
    assert_eq!(left.len(), 6);
    assert_eq!(count(HOST, "rm-plan:home"), 2);
    assert_eq!(count("other-host", "rm-plan:home"), 2);
    assert_eq!(count(HOST, "rm-plan:other-plan"), 2);

    // Again: nothing more to remove.
    let again = restic::forget(&restic, &job);
    assert_outcome(&again, OperationStatus::Success, None);
    assert_eq!(again.forget.map(|f| (f.removed, f.kept)), Some((0, 2)));
    // A host with no snapshot of the plan: restic prints nothing. Not "kept 0" with an empty list that would wipe
    // the server's snapshots of the plan: a failure, no list.
    let job = Job { hostname: "nobody", ..job };
    let none = restic::forget(&restic, &job);
    assert_outcome(&none, OperationStatus::Failed, Some(FailureReason::Other));
    assert!(none.message.as_deref().unwrap().contains("printed no result"), "{none:?}");
    assert!(none.snapshots.is_none() && none.forget.is_none(), "{none:?}");
    assert_eq!(w.snapshots(&w.repo()).len(), 6);

    // A wrong password: a failed forget, in restic's words.
    let wrong = w.repository(&w.repo(), "not the password");
    let failed = restic::forget(&restic, &Job { repository: &wrong, hostname: HOST, ..job });
    assert_outcome(&failed, OperationStatus::Failed, Some(FailureReason::WrongPassword));
    assert_eq!(w.snapshots(&w.repo()).len(), 6);
}

/// A plan whose extra tags named another plan's tag (possible before plans were checked for it) made snapshots that
/// carry both plans' tags. restic 0.14 selects them for the other plan's forget; the dry run shows it, and nothing is
/// forgotten. The plan carrying the tag does not forget at all.
#[test]
fn a_snapshot_carrying_another_plans_tag_stops_that_plans_forget_before_anything_is_removed() {
    let Some(restic) = restic_or_skip() else { return };
    let w = World::new(&restic);
    w.init();
    std::fs::write(w.path("src/a.txt"), "a").unwrap();
    let repository = w.repository(&w.repo(), PASSWORD);
    let mut a = w.plan("a");
    a.tags = vec!["rm-plan:b".into()];
    let b = AgentPlan { retention: Some(Retention { last: Some(1), ..Default::default() }), ..w.plan("b") };
    for plan in [&a, &b, &b] {
        assert_outcome(&w.backup(plan, &repository), OperationStatus::Success, None);
    }
    assert_eq!(w.snapshots(&w.repo()).len(), 3);
    let state = w.state();
    let job = |plan| Job {
        plan,
        repository: &repository,
        hostname: HOST,
        state_dir: &state,
        cancel: Cancel::default(),
        timeout: Duration::from_secs(60),
    };
    // b keeps 1: without the check its forget would remove a's snapshot and b's older one.
    let out = restic::forget(&restic, &job(&b));
    assert_outcome(&out, OperationStatus::Failed, Some(FailureReason::Other));
    let message = out.message.clone().unwrap();
    assert!(message.starts_with("restic forget --dry-run selected snapshots that are not only"), "{message}");
    assert!(message.contains("rm-plan:a") && message.contains("nothing was forgotten"), "{message}");
    assert!(out.snapshots.is_none() && out.forget.is_none());
    assert_eq!(w.snapshots(&w.repo()).len(), 3, "nothing removed");
    // a's own forget is refused before restic runs.
    let a = AgentPlan { retention: Some(Retention { last: Some(1), ..Default::default() }), ..a };
    let out = restic::forget(&restic, &job(&a));
    assert_outcome(&out, OperationStatus::Failed, Some(FailureReason::Other));
    assert!(out.message.unwrap().contains("the plan's tags include \"rm-plan:b\""));
    assert_eq!(w.snapshots(&w.repo()).len(), 3);
    assert_no_secret_files(&state);
}
