//! Review fixes on restores, end to end (a real server, agents as processes, Debian's restic 0.14, local
//! repositories): include paths are literal (glob characters escaped) and one that matched nothing fails; a restore
//! refused `locked` by another host's exclusive operation (a `restic prune` held stopped) is retried and succeeds
//! once the lock is gone; a queued restore can be cancelled before its agent takes it; long-polls take at most half
//! the connection limit, so `/healthz` still gets in.

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rm_e2e::*;
use serde_json::{Value, json};

const PASSWORD: &str = "repo-pw-Wombat-8812";

fn server(extra: &[(&str, &str)]) -> Server {
    let mut b = Server::builder().env("RM_HEARTBEAT_INTERVAL", "60s");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn enrolled(server: &Server, restic: &Path) -> Agent {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": "restore fixes e2e", "uses": 5})));
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let mut agent = Agent::enroll(&server.url(""), &token);
    agent.env("RM_RESTIC", &restic.display().to_string());
    agent
}

fn created(server: &Server, path: &str, body: Value) {
    let r = server.admin("POST", path, Some(&body));
    assert_eq!(r.status, 201, "{path}: {}", r.text());
}

fn operation(server: &Server, agent: &str, id: &str) -> Option<Value> {
    let r = server.admin("GET", &format!("/api/v1/operations?agent={agent}&limit=500"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["operations"].as_array().unwrap().iter().find(|o| o["id"] == id).cloned()
}

fn is_final(op: &Value) -> bool {
    matches!(op["status"].as_str(), Some("success" | "warning" | "failed" | "cancelled"))
}

fn wait_final(server: &Server, agent: &Agent, id: &str, timeout: Duration) -> Value {
    poll(timeout, || operation(server, &agent.id, id).filter(is_final)).unwrap_or_else(|| {
        panic!(
            "operation {id} not final within {timeout:?}: {:?}\nagent log:\n{}",
            operation(server, &agent.id, id),
            agent.log()
        )
    })
}

fn restore(server: &Server, agent: &Agent, body: Value) -> String {
    let r = server.admin("POST", &format!("/api/v1/agents/{}/restore", agent.id), Some(&body));
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["operation_id"].as_str().unwrap().to_string()
}

/// A repository and a plan on it for `agent`, one backup of `src` run now; returns the repository and the
/// snapshot's full id.
fn backed_up(server: &Server, agent: &Agent, restic: &Path, repo_dir: &Path, src: &Path) -> (Repo, String) {
    created(
        server,
        "/api/v1/repositories",
        json!({"name": "local", "url": repo_dir.display().to_string(), "password": PASSWORD, "auto_init": true}),
    );
    created(
        server,
        "/api/v1/plans",
        json!({"name": "files", "repository": "local", "paths": [src.display().to_string()], "schedule": "@daily",
               "agents": [agent.id]}),
    );
    let r = server.admin("POST", "/api/v1/plans/files/run", Some(&json!({"agent": agent.id})));
    assert_eq!(r.status, 202, "{}", r.text());
    let backup = r.json()["operation_id"].as_str().unwrap().to_string();
    let done = wait_final(server, agent, &backup, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    let repo = Repo::new(restic, &repo_dir.display().to_string(), PASSWORD);
    let id = repo.snapshots()[0]["id"].as_str().unwrap().to_string();
    (repo, id)
}

/// Names restic would read as glob patterns: each restores itself only (before the fix `we[ir]d` matched `weid`
/// and `werd`, not itself, and the restore of nothing was reported a success). An include matching nothing fails.
#[test]
fn includes_are_literal_and_one_matching_nothing_fails() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for (name, body) in [("we[ir]d", "brackets"), ("weid", "decoy i"), ("werd", "decoy r"), ("star*.txt", "star")] {
        fs::write(src.join(name), body).unwrap();
    }
    fs::write(src.join("starry.txt"), "decoy star").unwrap();
    fs::write(src.join("back\\slash?"), "backslash").unwrap();
    let mut agent = enrolled(&server, &restic);
    agent.start();
    let (_repo, snapshot) = backed_up(&server, &agent, &restic, &work.path().join("repo"), &src);

    let target = work.path().join("literal");
    let include: Vec<String> =
        ["we[ir]d", "star*.txt", "back\\slash?"].iter().map(|n| src.join(n).display().to_string()).collect();
    let op = restore(
        &server,
        &agent,
        json!({"snapshot": snapshot, "include": include, "target": target.display().to_string()}),
    );
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    let restored = target.join(src.strip_prefix("/").unwrap());
    let mut names: Vec<String> =
        fs::read_dir(&restored).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["back\\slash?", "star*.txt", "we[ir]d"], "each name itself, no decoy");
    assert_eq!(fs::read_to_string(restored.join("we[ir]d")).unwrap(), "brackets");
    assert_eq!(done["restore"]["files"].as_u64(), Some(3), "{done}");

    let missing = src.join("not-there").display().to_string();
    let op = restore(
        &server,
        &agent,
        json!({"snapshot": snapshot, "include": [missing], "target": work.path().join("none").display().to_string()}),
    );
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "failed", "{done}");
    let message = done["message"].as_str().unwrap();
    assert!(message.contains("matched the include") && message.contains("not-there"), "{message}");
    agent.stop();
}

/// Whether a finished lock file is in `locks/` (the local backend writes `<id>-tmp-…` first, then renames it).
fn locked(locks: &Path) -> bool {
    fs::read_dir(locks).is_ok_and(|d| {
        d.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
        })
    })
}

/// Starts `restic prune` on `repo` and stops it (SIGSTOP) while it holds its exclusive lock; `None` if it finished
/// before it could be caught.
#[allow(clippy::zombie_processes, reason = "a stopped prune is handed to the caller, which waits for it")]
fn prune_holding_the_lock(repo: &Repo, repo_dir: &Path) -> Option<Child> {
    let locks = repo_dir.join("locks");
    let mut child = repo.command(&["prune"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if locked(&locks) {
            let stopped = Command::new("kill").args(["-STOP", &child.id().to_string()]).status().unwrap();
            assert!(stopped.success());
            if locked(&locks) {
                return Some(child);
            }
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            let _ = child.wait();
            return None;
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("restic prune took no lock within 30 s");
}

/// restic 0.14's prune (like forget and check) holds an exclusive lock: a restore started meanwhile is refused
/// `locked` by restic; the agent tries again with backoff (before the fix it failed at once) and the restore
/// succeeds once the prune has ended.
#[test]
fn a_restore_refused_locked_is_retried_until_the_exclusive_lock_is_gone() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/file.bin"), random_bytes(3, 200_000)).unwrap();
    let mut agent = enrolled(&server, &restic);
    agent.start();
    let repo_dir = work.path().join("repo");
    let (repo, snapshot) = backed_up(&server, &agent, &restic, &repo_dir, &src);

    let mut prune = None;
    for _ in 0..10 {
        prune = prune_holding_the_lock(&repo, &repo_dir);
        if prune.is_some() {
            break;
        }
    }
    let Some(mut prune) = prune else { panic!("could not catch restic prune holding its lock in 10 tries") };
    let asked = Instant::now();
    let op = restore(&server, &agent, json!({"snapshot": snapshot}));
    eventually(Duration::from_secs(60), "the agent retrying the locked restore", || {
        agent.log().contains("is locked by an exclusive operation").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let now = operation(&server, &agent.id, &op).unwrap();
    assert_eq!(now["status"], "running", "still trying, not failed: {now}");
    let cont = Command::new("kill").args(["-CONT", &prune.id().to_string()]).status().unwrap();
    assert!(cont.success());
    let pruned = prune.wait().unwrap();
    assert!(pruned.success(), "the prune itself ended well");
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    let restored = agent.state_dir().join("restores").join(&op).join(src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(restored.join("d/file.bin")).unwrap(), random_bytes(3, 200_000));
    eprintln!("figure: a restore behind a held exclusive lock succeeded {:?} after the request", asked.elapsed());
    agent.stop();
}

/// A restore queued for an agent that is not running is cancelled by the operator (204, audited); asked again 409,
/// an unknown id 404; the agent, started afterwards, never runs it.
#[test]
fn a_queued_restore_can_be_cancelled_before_the_agent_takes_it() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x").unwrap();
    let mut agent = enrolled(&server, &restic);
    agent.start();
    let (_repo, snapshot) = backed_up(&server, &agent, &restic, &work.path().join("repo"), &src);
    agent.stop();

    let op = restore(&server, &agent, json!({"snapshot": snapshot}));
    let r = server.admin("POST", &format!("/api/v1/operations/{op}/cancel"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = server.admin("POST", &format!("/api/v1/operations/{op}/cancel"), None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "not_queued", "{}", r.text());
    let r = server.admin("POST", "/api/v1/operations/op_0123456789abcdef0123456789abcdef/cancel", None);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = server.admin("GET", "/api/v1/audit?kind=operation_cancelled", None);
    assert_eq!(r.json()["events"].as_array().unwrap().len(), 1, "{}", r.text());

    agent.start();
    eventually(Duration::from_secs(30), "the agent's first heartbeat", || {
        agent.log().contains("backup config revision").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let view = operation(&server, &agent.id, &op).unwrap();
    assert_eq!(view["status"], "cancelled", "{view}");
    assert!(view["message"].as_str().unwrap().contains("cancelled by an operator"), "{view}");
    assert!(!agent.log().contains(&op), "the agent never saw it:\n{}", agent.log());
    assert!(!agent.state_dir().join("restores").join(&op).exists());
    agent.stop();
}

/// With `--max-connections 4`, at most two long-polls are held; the others are answered at once with
/// `retry_after_secs`, and `/healthz` is answered while two are held (before the fix four held long-polls took
/// every connection).
#[test]
fn long_polls_leave_room_for_other_requests() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[("RM_MAX_CONNECTIONS", "4")]);
    let agent = enrolled(&server, &restic);
    let saved: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
    let auth = format!("Bearer {}", saved["credential"].as_str().unwrap());
    let headers = [("authorization", auth.as_str())];
    let first = Conn::connect(server.addr()).unwrap().request("GET", "/api/v1/agents/tasks", &headers, b"").unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    let generation = first.json()["generation"].as_u64().unwrap();
    let path = format!("/api/v1/agents/tasks?wait=25&seen={generation}");
    let polls: Vec<_> = (0..4)
        .map(|_| {
            let (addr, path, auth) = (server.addr(), path.clone(), auth.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut conn = Conn::connect(addr).unwrap();
                let r = conn.request("GET", &path, &[("authorization", auth.as_str())], b"");
                (r.ok().map(|r| r.json()), started.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let health = http_get(server.addr(), "/healthz").expect("healthz answered");
    let took = started.elapsed();
    assert_eq!(health.status, 200);
    assert!(took < Duration::from_secs(3), "healthz took {took:?}");
    eprintln!("figure: /healthz answered in {took:?} with long-polls at the cap");
    let answers: Vec<_> = polls.into_iter().map(|t| t.join().unwrap()).collect();
    let turned_away: Vec<_> = answers
        .iter()
        .filter(|(r, took)| r.as_ref().is_some_and(|r| r["retry_after_secs"] == 30) && *took < Duration::from_secs(2))
        .collect();
    assert_eq!(turned_away.len(), 2, "two answered at once with the hint: {answers:?}");
    let held = answers.iter().filter(|(r, _)| r.as_ref().is_none_or(|r| r["retry_after_secs"].is_null())).count();
    assert_eq!(held, 2, "two held (the test's reads give up after 10 s): {answers:?}");
}
