//! Backups end to end with the real binaries: a server, enrolled agents running as processes, Debian's restic 0.14 and
//! real storage (a local directory and an S3-compatible server on loopback). What a test checks about a repository it
//! checks with the restic CLI directly, never through our code.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rm_e2e::*;
use serde_json::{Value, json};

const PASSWORD: &str = "repo-pw-Axolotl-7731";

/// A server that asks for a heartbeat every second (so run-now requests are taken within a second or two).
fn server() -> Server {
    Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s").start()
}

fn token(server: &Server, labels: Value) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": "backups e2e", "labels": labels})));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

fn enroll(server: &Server, restic: &Path, labels: Value) -> Agent {
    let mut agent = Agent::enroll(&server.url(""), &token(server, labels));
    agent.env("RM_RESTIC", &restic.display().to_string());
    agent
}

fn create_repo(server: &Server, body: Value) {
    let r = server.admin("POST", "/api/v1/repositories", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
}

fn create_plan(server: &Server, body: Value) {
    let r = server.admin("POST", "/api/v1/plans", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
}

fn run_now(server: &Server, plan: &str, agent: &str) -> String {
    let r = server.admin("POST", &format!("/api/v1/plans/{plan}/run"), Some(&json!({"agent": agent})));
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["operation_id"].as_str().unwrap().to_string()
}

fn operations(server: &Server, query: &str) -> Vec<Value> {
    let r = server.admin("GET", &format!("/api/v1/operations?{query}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["operations"].as_array().unwrap().clone()
}

fn operation(server: &Server, agent: &str, id: &str) -> Option<Value> {
    operations(server, &format!("agent={agent}&limit=500")).into_iter().find(|o| o["id"] == id)
}

/// Waits for the operation `id` to reach a final status and returns it.
fn wait_final(server: &Server, agent: &Agent, id: &str, timeout: Duration) -> Value {
    poll(timeout, || operation(server, &agent.id, id).filter(is_final)).unwrap_or_else(|| {
        panic!(
            "operation {id} not final within {timeout:?}: {:?}\nagent log:\n{}\nserver log:\n{}",
            operation(server, &agent.id, id),
            agent.log(),
            server.log_tail()
        )
    })
}

fn is_final(op: &Value) -> bool {
    matches!(op["status"].as_str(), Some("success" | "warning" | "failed" | "cancelled"))
}

fn agent_view(server: &Server, id: &str) -> Value {
    let r = server.admin("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["agents"].as_array().unwrap().iter().find(|a| a["id"] == id).cloned().expect("agent listed")
}

fn plan_health(server: &Server, agent: &str, plan: &str) -> Value {
    let view = agent_view(server, agent);
    view["backups"].as_array().unwrap().iter().find(|b| b["plan"] == plan).cloned().unwrap_or(Value::Null)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A source tree worth comparing: nested directories, an empty file, a binary file, a non-ASCII name.
fn source_tree(root: &Path, big: usize) -> PathBuf {
    let src = root.join("src");
    fs::create_dir_all(src.join("docs/deep/deeper")).unwrap();
    fs::create_dir_all(src.join("cache")).unwrap();
    fs::write(src.join("docs/readme.txt"), "hello restic\n").unwrap();
    fs::write(src.join("docs/deep/empty"), "").unwrap();
    fs::write(src.join("docs/deep/deeper/binary.bin"), random_bytes(7, 300_000)).unwrap();
    fs::write(src.join("Grüße ünd spaces.txt"), "non-ascii name\n").unwrap();
    fs::write(src.join("cache/skip.tmp"), "excluded\n").unwrap();
    if big > 0 {
        fs::write(src.join("big.bin"), random_bytes(11, big)).unwrap();
    }
    src
}

/// Every file under `dir` (relative path → contents), directories as `None`.
fn tree(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                out.insert(rel, None);
                stack.push(path);
            } else {
                out.insert(rel, Some(fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// enroll → repository (local dir, auto_init) and plan → run now → the snapshot is in the repository (restic CLI) and
/// in the server's snapshot list → restore reproduces the tree byte for byte; health, `agents list`, /metrics; the
/// password appears in no database file, server log, audit entry or API answer, and the agent keeps its copy 0600.
#[test]
fn local_repository_backup_restore_and_secrets() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path(), 0);
    let repo_dir = work.path().join("repo");
    let mut agent = enroll(&server, &restic, json!({"env": "prod"}));
    agent.start();

    create_repo(
        &server,
        json!({"name": "local", "url": repo_dir.display().to_string(), "password": PASSWORD,
                               "auto_init": true}),
    );
    create_plan(
        &server,
        json!({"name": "docs", "repository": "local", "paths": [src.display().to_string()],
                               "excludes": ["*.tmp"], "schedule": "0 3 * * *", "tags": ["e2e"],
                               "selector": {"env": "prod"}}),
    );
    let op = run_now(&server, "docs", &agent.id);
    let done = wait_final(&server, &agent, &op, Duration::from_secs(90));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    assert_eq!(done["trigger"], "run_now", "{done}");
    let snapshot_id = done["summary"]["snapshot_id"].as_str().expect("summary names the snapshot").to_string();
    assert!(done["summary"]["files_new"].as_u64().unwrap() >= 4, "{done}");
    assert!(done["duration_ms"].as_u64().is_some(), "{done}");

    // The repository, read with restic itself.
    let repo = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD);
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let snap = &snaps[0];
    assert!(snap["id"].as_str().unwrap().starts_with(&snapshot_id[..8]), "{snap} vs {snapshot_id}");
    let hostname = agent_view(&server, &agent.id)["hostname"].as_str().unwrap().to_string();
    assert_eq!(snap["hostname"], hostname.as_str(), "{snap}");
    let tags: Vec<&str> = snap["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(tags.contains(&"rm-plan:docs") && tags.contains(&"e2e"), "{tags:?}");

    // What the agent reported, without the server opening the repository.
    let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", agent.id), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json()["snapshots"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["plan"], "docs");
    assert_eq!(listed[0]["id"], snap["id"]);

    // Restore reproduces the source byte for byte, without the excluded file.
    let target = work.path().join("restore");
    repo.restore(snap["id"].as_str().unwrap(), &target);
    let restored = tree(&target.join(src.strip_prefix("/").unwrap()));
    let mut expected = tree(&src);
    expected.remove("cache/skip.tmp");
    assert_eq!(restored.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    assert!(restored == expected, "restored contents differ");

    // Health and the fleet view.
    let health = plan_health(&server, &agent.id, "docs");
    assert_eq!(health["health"], "ok", "{health}");
    assert_eq!(health["last_run"]["id"], op.as_str(), "{health}");
    let view = agent_view(&server, &agent.id);
    assert_eq!(view["health"], "ok", "{view}");
    assert!(view["restic"]["version"].as_str().is_some_and(|v| v.starts_with("0.")), "{view}");
    let r = server.admin("GET", "/api/v1/agents?health=ok", None);
    assert!(r.json()["agents"].as_array().unwrap().iter().any(|a| a["id"] == agent.id.as_str()), "{}", r.text());
    let r = server.admin("GET", "/api/v1/agents?health=failed", None);
    assert!(r.json()["agents"].as_array().unwrap().is_empty(), "{}", r.text());
    let mut cmd = command(SERVER_BIN);
    cmd.args(["agents", "list"]).env("RM_DATA_DIR", server.data_dir());
    let out = run_bounded(cmd, Duration::from_secs(15));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = listing.lines().find(|l| l.contains(&agent.id)).unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains("ok"), "{listing}");

    // Metrics (admin-authenticated by default).
    let r = server.admin("GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = r.text();
    let success_line = metrics
        .lines()
        .find(|l| l.starts_with("restic_manager_backup_last_success_timestamp_seconds") && l.contains("plan=\"docs\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    let value: f64 = success_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((value as i64 - now()).abs() < 300, "{success_line}");
    assert_eq!(server.get("/metrics").status, 401);

    // Secrets: the agent's copy is 0600; the password is nowhere on the server side.
    let saved = fs::read_dir(agent.state_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| contains(&fs::read(p).unwrap_or_default(), PASSWORD))
        .collect::<Vec<_>>();
    assert!(!saved.is_empty(), "the agent keeps its configuration beside agent.json");
    for path in &saved {
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} holds the password with mode {mode:o}", path.display());
    }
    for path in files_under(server.data_dir()) {
        if !path.starts_with(server.data_dir().join("tls")) {
            assert!(!contains(&fs::read(&path).unwrap_or_default(), PASSWORD), "password in {}", path.display());
        }
    }
    assert!(!server.log().contains(PASSWORD), "password in the server log");
    assert!(!agent.log().contains(PASSWORD), "password in the agent log");
    for path in ["/api/v1/audit?limit=500", "/api/v1/repositories", "/api/v1/plans", "/api/v1/agents", "/metrics"] {
        let r = server.admin("GET", path, None);
        assert!(!r.text().contains(PASSWORD), "password in {path}");
    }
    let ops = server.admin("GET", "/api/v1/operations", None).text();
    assert!(!ops.contains(PASSWORD), "password in operations");
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
}

/// The same against an S3-compatible server; then that server goes away: the run fails with restic's message, the
/// health says so, and the agent keeps running and succeeds once the storage is back.
#[test]
fn s3_repository_backup_and_storage_outage() {
    let Some(restic) = restic_binary() else { return };
    let Some(mut s3) = S3Server::start() else { return };
    let server = server();
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path(), 0);
    let mut agent = enroll(&server, &restic, json!({}));
    agent.start();
    let url = s3.url("rm-bucket/fleet");
    create_repo(
        &server,
        json!({"name": "s3", "url": url, "password": PASSWORD, "auto_init": true,
                               "env": {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}}),
    );
    create_plan(
        &server,
        json!({"name": "s3-docs", "repository": "s3", "paths": [src.display().to_string()],
                               "schedule": "@every 24h", "agents": [agent.id]}),
    );
    let op = run_now(&server, "s3-docs", &agent.id);
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}\n{}", agent.log(), s3.log());

    let repo = Repo::new(&restic, &url, PASSWORD)
        .with_env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .with_env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let target = work.path().join("restore");
    repo.restore(snaps[0]["id"].as_str().unwrap(), &target);
    assert!(tree(&target.join(src.strip_prefix("/").unwrap())) == tree(&src), "restored contents differ");
    assert!(!server.log().contains(S3_SECRET_KEY), "S3 secret in the server log");

    // The storage goes away.
    s3.stop();
    let op = run_now(&server, "s3-docs", &agent.id);
    let failed = wait_final(&server, &agent, &op, Duration::from_secs(180));
    assert_eq!(failed["status"], "failed", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "a failure carries restic's message: {failed}");
    assert_eq!(plan_health(&server, &agent.id, "s3-docs")["health"], "failed");
    assert!(agent.is_running(), "the agent survives a failed backup: {}", agent.log());

    // Back (empty: moto keeps nothing), and auto_init makes a new repository.
    s3.restart();
    let op = run_now(&server, "s3-docs", &agent.id);
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    assert_eq!(plan_health(&server, &agent.id, "s3-docs")["health"], "ok");
}

/// Two agents share one repository and are asked to back up at the same moment: restic never runs on it twice at
/// once (a wrapper around the real restic logs every backup's start and end), and both runs succeed.
#[test]
fn two_agents_sharing_a_repository_never_overlap() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path(), 40 * 1024 * 1024);
    let timing = work.path().join("timing.log");
    let wrapper = timing_restic(work.path(), &restic, &timing);
    let repo_dir = work.path().join("shared");
    Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD).init();
    create_repo(&server, json!({"name": "shared", "url": repo_dir.display().to_string(), "password": PASSWORD}));
    let mut a = enroll(&server, &wrapper, json!({"role": "web"}));
    let mut b = enroll(&server, &wrapper, json!({"role": "web"}));
    a.start();
    b.start();
    create_plan(
        &server,
        json!({"name": "web", "repository": "shared", "paths": [src.display().to_string()],
                               "schedule": "@every 24h", "selector": {"role": "web"}}),
    );
    for round in 0..2 {
        let ops = [(run_now(&server, "web", &a.id), &a), (run_now(&server, "web", &b.id), &b)];
        for (op, agent) in &ops {
            let done = wait_final(&server, agent, op, Duration::from_secs(120));
            assert_eq!(done["status"], "success", "round {round}: {done}");
        }
    }
    let log = fs::read_to_string(&timing).unwrap();
    let events: Vec<(&str, u128)> = log
        .lines()
        .map(|l| {
            let mut parts = l.split(' ');
            (parts.next().unwrap(), parts.next().unwrap().parse().unwrap())
        })
        .collect();
    assert_eq!(events.len(), 8, "four backups, each started and ended: {log}");
    let mut sorted = events.clone();
    sorted.sort_by_key(|e| e.1);
    for pair in sorted.chunks(2) {
        assert_eq!((pair[0].0, pair[1].0), ("start", "end"), "two backups overlapped: {log}");
    }
    assert_eq!(Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD).snapshots().len(), 4);
}

/// Failures end as reported operations with a clear message and the right health, and the agent keeps running:
/// wrong password, repository missing without auto_init, restic not installed.
#[test]
fn failures_are_reported_and_the_agent_keeps_running() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path(), 0);
    let mut agent = enroll(&server, &restic, json!({}));
    agent.start();

    // A repository made with another password.
    let wrong_dir = work.path().join("wrong");
    Repo::new(&restic, &wrong_dir.display().to_string(), "the-real-password").init();
    create_repo(&server, json!({"name": "wrong", "url": wrong_dir.display().to_string(), "password": PASSWORD}));
    // A repository that does not exist, without auto_init.
    let missing_dir = work.path().join("missing");
    create_repo(&server, json!({"name": "missing", "url": missing_dir.display().to_string(), "password": PASSWORD}));
    let paths = json!([src.display().to_string()]);
    for (plan, repo) in [("p-wrong", "wrong"), ("p-missing", "missing")] {
        create_plan(
            &server,
            json!({"name": plan, "repository": repo, "paths": paths, "schedule": "@every 24h",
                                   "agents": [agent.id]}),
        );
    }
    let wrong = wait_final(&server, &agent, &run_now(&server, "p-wrong", &agent.id), Duration::from_secs(90));
    assert_eq!(
        (wrong["status"].as_str(), wrong["reason"].as_str()),
        (Some("failed"), Some("wrong_password")),
        "{wrong}"
    );
    assert!(wrong["message"].as_str().unwrap().contains("password"), "{wrong}");
    let missing = wait_final(&server, &agent, &run_now(&server, "p-missing", &agent.id), Duration::from_secs(90));
    assert_eq!(
        (missing["status"].as_str(), missing["reason"].as_str()),
        (Some("failed"), Some("repository_missing")),
        "{missing}"
    );
    assert!(!missing_dir.join("config").exists(), "no repository was created without auto_init");
    assert_eq!(plan_health(&server, &agent.id, "p-wrong")["health"], "failed");
    assert_eq!(plan_health(&server, &agent.id, "p-missing")["health"], "failed");
    let r = server.admin("GET", "/api/v1/agents?health=failed", None);
    assert!(r.json()["agents"].as_array().unwrap().iter().any(|a| a["id"] == agent.id.as_str()), "{}", r.text());
    assert!(agent.is_running(), "{}", agent.log());

    // A file restic cannot read: the snapshot is made, the run ends as a warning naming the file. Root reads a
    // mode-000 file, but not a write-only sysctl (restic 0.14 then exits 3).
    let locked = src.join("docs/locked");
    fs::write(&locked, "no access").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let mut unreadable = locked.display().to_string();
    if fs::File::open(&locked).is_ok() {
        unreadable = "/proc/sys/vm/drop_caches".to_string();
        if fs::File::open(&unreadable).is_ok() {
            skip("running as root without a write-only /proc/sys/vm/drop_caches: no file restic cannot read");
            return;
        }
    }
    let ok_dir = work.path().join("ok");
    create_repo(
        &server,
        json!({"name": "ok", "url": ok_dir.display().to_string(), "password": PASSWORD,
                               "auto_init": true}),
    );
    create_plan(
        &server,
        json!({"name": "p-warn", "repository": "ok",
                               "paths": [src.display().to_string(), unreadable], "schedule": "@every 24h",
                               "agents": [agent.id]}),
    );
    let warned = wait_final(&server, &agent, &run_now(&server, "p-warn", &agent.id), Duration::from_secs(90));
    assert_eq!(warned["status"], "warning", "{warned}");
    assert_eq!(warned["exit_code"], 3, "{warned}");
    assert!(warned["message"].as_str().unwrap().contains(&unreadable), "{warned}");
    assert!(warned["summary"]["snapshot_id"].is_string(), "a warning still made a snapshot: {warned}");
    assert_eq!(Repo::new(&restic, &ok_dir.display().to_string(), PASSWORD).snapshots().len(), 1);
    assert_eq!(plan_health(&server, &agent.id, "p-warn")["health"], "warning");

    // A host without restic: reported in the heartbeat, and a run fails in words instead of crashing the agent.
    let mut bare = enroll(&server, Path::new("/nonexistent/restic"), json!({}));
    bare.start();
    let r = server.admin("PATCH", "/api/v1/plans/p-wrong", Some(&json!({"agents": [agent.id, bare.id]})));
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(Duration::from_secs(30), "the restic error in the fleet view", || {
        agent_view(&server, &bare.id)["restic"]["error"].as_str().map(str::to_string)
    });
    let none = wait_final(&server, &bare, &run_now(&server, "p-wrong", &bare.id), Duration::from_secs(60));
    assert_eq!(
        (none["status"].as_str(), none["reason"].as_str()),
        (Some("failed"), Some("restic_unavailable")),
        "{none}"
    );
    assert!(bare.is_running(), "{}", bare.log());
    assert_eq!(bare.stop().code(), Some(0));
}

/// The agent is SIGKILLed in the middle of a backup: after it restarts the next run succeeds (no stale lock blocks
/// it). The server goes down during a run: the result is delivered after it returns, exactly once.
#[test]
fn killed_agent_and_server_outage_during_a_run() {
    let Some(restic) = restic_binary() else { return };
    let mut server = server();
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path(), 200 * 1024 * 1024);
    let repo_dir = work.path().join("repo");
    create_repo(
        &server,
        json!({"name": "r", "url": repo_dir.display().to_string(), "password": PASSWORD,
                               "auto_init": true}),
    );
    let mut agent = enroll(&server, &restic, json!({}));
    agent.start();
    create_plan(
        &server,
        json!({"name": "big", "repository": "r", "paths": [src.display().to_string()],
                               "schedule": "@every 24h", "agents": [agent.id]}),
    );

    // SIGKILL mid-backup.
    let op = run_now(&server, "big", &agent.id);
    eventually(Duration::from_secs(60), "the backup running", || {
        operation(&server, &agent.id, &op).filter(|o| o["status"] == "running").map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.signal(libc::SIGKILL);
    agent.kill();
    agent.start();
    let again = run_now(&server, "big", &agent.id);
    let done = wait_final(&server, &agent, &again, Duration::from_secs(180));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    // The run the kill interrupted is not left `running` forever: the restarted agent reports it.
    let killed = wait_final(&server, &agent, &op, Duration::from_secs(30));
    assert_eq!(killed["status"], "failed", "{killed}");

    // The server goes down while a backup runs, and comes back after it ended.
    fs::write(src.join("big.bin"), random_bytes(12, 200 * 1024 * 1024)).unwrap();
    let repo = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD);
    let before = repo.snapshots().len();
    let op = run_now(&server, "big", &agent.id);
    eventually(Duration::from_secs(60), "the backup running", || {
        operation(&server, &agent.id, &op).filter(|o| o["status"] == "running").map(|_| ())
    });
    server.restart_on_same_port(|| {
        // Down until the agent's restic has made its snapshot and the agent has had time to try to report it.
        eventually(Duration::from_secs(180), "the new snapshot", || (repo.snapshots().len() > before).then_some(()));
        std::thread::sleep(Duration::from_secs(3));
    });
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    let all = operations(&server, &format!("agent={}&plan=big&limit=500", agent.id));
    assert_eq!(all.iter().filter(|o| o["id"] == op.as_str()).count(), 1, "{all:?}");
    assert!(agent.is_running(), "{}", agent.log());
}

/// A one-minute schedule fires on time twice; the agent is then stopped across a firing and, started again, catches
/// up once (trigger `catch_up`), not once per missed firing, and goes on with the schedule.
#[test]
fn a_one_minute_schedule_fires_on_time_and_a_stopped_host_catches_up_once() {
    let Some(restic) = restic_binary() else { return };
    let server = server();
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path(), 0);
    let repo_dir = work.path().join("repo");
    create_repo(
        &server,
        json!({"name": "r", "url": repo_dir.display().to_string(), "password": PASSWORD,
                               "auto_init": true}),
    );
    let mut agent = enroll(&server, &restic, json!({}));
    // Start a few seconds before a minute boundary, so the first firing comes soon.
    while now() % 60 < 45 || now() % 60 > 52 {
        std::thread::sleep(Duration::from_millis(500));
    }
    agent.start();
    create_plan(
        &server,
        json!({"name": "minutely", "repository": "r", "paths": [src.display().to_string()],
                               "schedule": "@every 1m", "jitter": "0s", "agents": [agent.id]}),
    );
    let agent_id = agent.id.clone();
    let scheduled = |server: &Server| {
        let mut ops = operations(server, &format!("agent={agent_id}&plan=minutely&limit=500"));
        ops.reverse(); // oldest first
        ops
    };
    let ops = poll(Duration::from_secs(150), || {
        let ops = scheduled(&server);
        (ops.iter().filter(|o| is_final(o)).count() >= 2).then_some(ops)
    })
    .unwrap_or_else(|| panic!("two scheduled runs: {:?}\n{}", scheduled(&server), agent.log()));
    for op in ops.iter().take(2) {
        assert_eq!(op["trigger"], "schedule", "{op}");
        assert_eq!(op["status"], "success", "{op}");
        let started = op["started_at"].as_i64().unwrap();
        assert!(started % 60 <= 5, "a run of @every 1m started {} s after the minute: {op}", started % 60);
    }
    let first = ops[0]["started_at"].as_i64().unwrap();
    assert_eq!(ops[1]["started_at"].as_i64().unwrap() / 60, first / 60 + 1, "consecutive minutes: {ops:?}");

    // Down across the next firing.
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
    let down_at = now();
    while now() / 60 == down_at / 60 || now() % 60 < 8 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = scheduled(&server).len();
    agent.start();
    let ops = poll(Duration::from_secs(40), || {
        let ops = scheduled(&server);
        ops.iter().skip(before).any(|o| o["trigger"] == "catch_up" && is_final(o)).then_some(ops)
    })
    .unwrap_or_else(|| panic!("a catch-up run: {:?}\n{}", scheduled(&server), agent.log()));
    std::thread::sleep(Duration::from_secs(3));
    let ops_after = scheduled(&server);
    let catch_ups = ops_after.iter().skip(before).filter(|o| o["trigger"] == "catch_up").count();
    assert_eq!(catch_ups, 1, "one catch-up, not one per missed firing: {ops:?}");
    assert_eq!(agent.stop().code(), Some(0));
}
