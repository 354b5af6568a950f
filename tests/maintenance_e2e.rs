//! Repository maintenance end to end: a real server, three real agents sharing one repository, Debian's restic 0.14,
//! a local repository and an S3 one (moto on loopback). A wrapper around restic logs every `prune`/`check` it starts
//! (so "exactly one host pruned" is counted from the processes, not from our reports) and can make prune slow.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rm_e2e::*;
use serde_json::{Value, json};

const PASSWORD: &str = "maint-pw-Narwhal-5521";
/// Never fires during a test: maintenance runs only when the test asks for it.
const NEVER: &str = "0 3 1 1 *";

fn server(extra: &[(&str, &str)]) -> Server {
    let mut b = Server::builder().env("RM_HEARTBEAT_INTERVAL", "1s");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn token(server: &Server, labels: Value) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": "maintenance e2e", "labels": labels})));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

fn enroll(server: &Server, restic: &Path) -> Agent {
    let mut agent = Agent::enroll(&server.url(""), &token(server, json!({"fleet": "m"})));
    agent.env("RM_RESTIC", &restic.display().to_string());
    agent
}

fn post(server: &Server, path: &str, body: Value, want: u16) -> Value {
    let r = server.admin("POST", path, Some(&body));
    assert_eq!(r.status, want, "{path}: {}", r.text());
    r.json()
}

fn run_now(server: &Server, plan: &str, agent: &str) -> String {
    post(server, &format!("/api/v1/plans/{plan}/run"), json!({"agent": agent}), 202)["operation_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn maintain(server: &Server, repository: &str, kind: &str) -> i64 {
    let r = post(server, &format!("/api/v1/repositories/{repository}/maintenance"), json!({"kind": kind}), 202);
    r["requested_at"].as_i64().unwrap()
}

fn operations(server: &Server, query: &str) -> Vec<Value> {
    let r = server.admin("GET", &format!("/api/v1/operations?limit=500&{query}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["operations"].as_array().unwrap().clone()
}

fn is_final(op: &Value) -> bool {
    matches!(op["status"].as_str(), Some("success" | "warning" | "failed" | "cancelled"))
}

fn logs(agents: &[&Agent], server: &Server) -> String {
    let mut out = String::new();
    for a in agents {
        out += &format!("--- agent {}\n{}\n", a.id, a.log());
    }
    out + "--- server\n" + &server.log_tail()
}

fn wait_final(server: &Server, id: &str, timeout: Duration, agents: &[&Agent]) -> Value {
    poll(timeout, || operations(server, "").into_iter().find(|o| o["id"] == id).filter(is_final))
        .unwrap_or_else(|| panic!("operation {id} not final within {timeout:?}\n{}", logs(agents, server)))
}

/// Waits for an operation of `repository` matching `pred`; panics with every log when none shows up.
fn find_op(server: &Server, repository: &str, agents: &[&Agent], what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    poll(Duration::from_secs(90), || {
        operations(server, &format!("repository={repository}")).into_iter().find(|o| pred(o))
    })
    .unwrap_or_else(|| panic!("waited 90 s for {what}\n{}", logs(agents, server)))
}

fn repository_view(server: &Server, name: &str) -> Value {
    let r = server.admin("GET", "/api/v1/repositories", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["repositories"].as_array().unwrap().iter().find(|v| v["name"] == name).cloned().unwrap()
}

fn fleet_repository(server: &Server, name: &str) -> Value {
    let r = server.admin("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json()["repositories"].as_array().cloned().unwrap_or_default();
    list.into_iter().find(|v| v["repository"] == name).unwrap_or(Value::Null)
}

fn lines(log: &Path, word: &str) -> usize {
    fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.starts_with(word)).count()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Three agents on one local repository; the operator's prune fires on all three: exactly one runs restic prune,
/// the other two are told the slot is done; the backups the three run while it prunes wait for it and all their
/// snapshots are in the repository afterwards; prune frees the space a forgotten snapshot held.
#[test]
fn three_agents_one_prune_and_no_backup_lost() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[]);
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("maintenance.log");
    let wrapper = maintenance_restic(work.path(), "restic-m", &restic, &log, 3);
    let repo_dir = work.path().join("repo");
    let repo = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD);
    repo.init();
    // Data only a forgotten snapshot references: what prune frees.
    let garbage = work.path().join("garbage");
    fs::create_dir_all(&garbage).unwrap();
    fs::write(garbage.join("old.bin"), random_bytes(99, 6_000_000)).unwrap();
    repo.run(&["backup", "--host", "gone", &garbage.display().to_string()]);
    let gone = repo.snapshots()[0]["id"].as_str().unwrap().to_string();
    repo.run(&["forget", &gone]);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data.bin"), random_bytes(1, 500_000)).unwrap();

    post(
        &server,
        "/api/v1/repositories",
        json!({"name": "shared", "url": repo_dir.display().to_string(), "password": PASSWORD,
               "prune": {"schedule": NEVER, "max_unused": "0"}}),
        201,
    );
    post(
        &server,
        "/api/v1/plans",
        json!({"name": "data", "repository": "shared", "paths": [src.display().to_string()], "schedule": NEVER,
               "selector": {"fleet": "m"}}),
        201,
    );
    let mut agents: Vec<Agent> = (0..3).map(|_| enroll(&server, &wrapper)).collect();
    for a in &mut agents {
        a.start();
    }
    let all: Vec<&Agent> = agents.iter().collect();
    // A first backup each (they take turns on the repository's lease).
    let mut backups: Vec<String> = agents.iter().map(|a| run_now(&server, "data", &a.id)).collect();
    for id in &backups {
        assert_eq!(wait_final(&server, id, Duration::from_secs(120), &all)["status"], "success");
    }

    let before = dir_size(&repo_dir);
    let slot = maintain(&server, "shared", "prune");
    // The prune starts on one host (after the backups stopped asking for the repository) …
    let pruning = find_op(&server, "shared", &all, "a prune operation", |o| o["kind"] == "prune");
    // … and backups asked for meanwhile, on every host, wait for it and then run.
    fs::write(src.join("more.bin"), random_bytes(2, 300_000)).unwrap();
    backups.extend(agents.iter().map(|a| run_now(&server, "data", &a.id)));
    let done = wait_final(&server, pruning["id"].as_str().unwrap(), Duration::from_secs(120), &all);
    assert_eq!(done["status"], "success", "{done}\n{}", logs(&all, &server));
    let mut snapshot_ids = Vec::new();
    for id in &backups {
        let op = wait_final(&server, id, Duration::from_secs(120), &all);
        assert_eq!(op["status"], "success", "{op}");
        snapshot_ids.push(op["summary"]["snapshot_id"].as_str().unwrap().to_string());
    }
    // The two other hosts fired the same slot and were told it was done.
    let pruner = done["agent_id"].as_str().unwrap().to_string();
    for a in agents.iter().filter(|a| a.id != pruner) {
        eventually(Duration::from_secs(60), format!("agent {} skipping the done slot", a.id), || {
            a.log().contains("skipped: another agent already ran it").then_some(())
        });
    }

    // Exactly one prune: one operation, one restic prune process on all three hosts.
    let prunes: Vec<Value> =
        operations(&server, "repository=shared").into_iter().filter(|o| o["kind"] == "prune").collect();
    assert_eq!(prunes.len(), 1, "{prunes:?}");
    assert_eq!(prunes.iter().filter(|o| o["status"] == "success").count(), 1);
    assert_eq!(lines(&log, "prune"), 1, "{}", fs::read_to_string(&log).unwrap());
    assert_eq!(done["plan"], "");
    assert_eq!(done["repository"], "shared");
    assert_eq!(done["maintenance"]["slot"], slot);
    assert!(done["duration_ms"].as_u64().is_some());
    let removed = done["maintenance"]["removed_bytes"].as_u64().expect("prune reports what it removed");
    // Every backup's snapshot is in the repository (read with restic itself) and it checks clean.
    let listed: Vec<String> = repo.snapshots().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    for id in &snapshot_ids {
        assert!(listed.iter().any(|l| l.starts_with(id.as_str())), "snapshot {id} lost: {listed:?}");
    }
    assert_eq!(listed.len(), 6, "{listed:?}");
    repo.run(&["check"]);
    let after = dir_size(&repo_dir);
    println!(
        "prune figures: repository {before} bytes before, {after} bytes after ({} freed on disk); restic said it \
         removed {removed} bytes ({})",
        before as i64 - after as i64,
        done["maintenance"]["removed"]
    );
    assert!(after + 5_000_000 < before, "prune freed the forgotten data: {before} -> {after}");
    assert!(removed >= 5_000_000, "{done}");
    // The repository view shows the last prune; health needs a check and stays `never`.
    let view = repository_view(&server, "shared");
    assert_eq!(view["prune"], json!({"schedule": NEVER, "timezone": "utc", "max_unused": "0"}));
    assert_eq!(view["maintenance"]["last_prune"]["operation_id"], done["id"]);
    assert_eq!(view["maintenance"]["health"], "never");
    // The command line lists the repository's operations.
    let mut cmd = command(SERVER_BIN);
    cmd.args(["operations", "--repository", "shared"]).env("RM_DATA_DIR", server.data_dir());
    let out = run_bounded(cmd, Duration::from_secs(30));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let prunes = table.lines().filter(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.contains(&"repo:shared") && cols.contains(&"prune")
    });
    assert_eq!(prunes.count(), 1, "{table}");
}

/// A lease holder SIGKILLed mid-prune (S3 repository) while its restic holds the repository's lock (a proxy slows
/// restic's S3 requests so the test sees the lock; restic is frozen and killed with its agent, as when a host dies,
/// so the lock stays): its lease lapses after the server's short --max-lease-ttl and another agent, which waited on
/// the busy repository, takes the same slot over, removes the dead run's lock (stale: same host, process gone) and
/// completes it. The killed agent's prune is reported cancelled when it starts again.
#[test]
fn killed_prune_holder_is_taken_over_on_s3() {
    let Some(restic) = restic_binary() else { return };
    let Some(s3) = S3Server::start() else { return };
    let server = server(&[("RM_MAX_LEASE_TTL", "10s")]);
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("maintenance.log");
    let quick = maintenance_restic(work.path(), "restic-quick", &restic, &log, 0);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data.bin"), random_bytes(3, 200_000)).unwrap();
    // Agents reach S3 through the proxy; the test's own restic goes direct.
    let proxy = SlowProxy::start(s3.port());
    let url = format!("s3:http://127.0.0.1:{}/rm-maint/shared", proxy.port());
    let direct = Repo::new(&restic, &s3.url("rm-maint/shared"), PASSWORD)
        .with_env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .with_env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
    let locks = || direct.run(&["list", "locks", "--no-lock"]).lines().filter(|l| !l.trim().is_empty()).count();
    post(
        &server,
        "/api/v1/repositories",
        json!({"name": "s3", "url": url, "password": PASSWORD, "auto_init": true,
               "env": {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY},
               "prune": {"schedule": NEVER, "max_unused": "10%", "timeout": "10m"}}),
        201,
    );
    post(
        &server,
        "/api/v1/plans",
        json!({"name": "data", "repository": "s3", "paths": [src.display().to_string()], "schedule": NEVER,
               "selector": {"fleet": "m"}}),
        201,
    );
    let mut holder = enroll(&server, &quick);
    let mut others: Vec<Agent> = (0..2).map(|_| enroll(&server, &quick)).collect();
    holder.start();
    let first = run_now(&server, "data", &holder.id);
    assert_eq!(wait_final(&server, &first, Duration::from_secs(120), &[&holder])["status"], "success");

    proxy.set_delay(Duration::from_millis(400));
    let slot = maintain(&server, "s3", "prune");
    let running = find_op(&server, "s3", &[&holder], "the holder's prune running", |o| {
        o["kind"] == "prune" && o["status"] == "running"
    });
    assert_eq!(running["agent_id"], holder.id.as_str());
    eventually(Duration::from_secs(30), "restic prune started on the holder", || {
        (lines(&log, "prune") == 1).then_some(())
    });
    // The wrapper exec's restic: the PID it logged is restic's.
    let pid: i32 = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("prune ").map(|p| p.trim().parse().unwrap()))
        .unwrap();
    eventually(Duration::from_secs(30), "the holder's restic holding the repository lock", || {
        (locks() > 0).then_some(())
    });
    // A host dying: restic stops where it is (no SIGINT cleanup), then the agent and restic are killed.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    holder.signal(libc::SIGKILL);
    let killed_at = now();
    holder.kill(); // reap it
    unsafe { libc::kill(pid, libc::SIGKILL) };
    proxy.set_delay(Duration::ZERO);
    assert_eq!(locks(), 1, "the dead holder's lock stays in the repository");
    for a in &mut others {
        a.start();
    }
    let all: Vec<&Agent> = others.iter().collect();
    let takeover = find_op(&server, "s3", &all, "another agent's prune", |o| {
        o["kind"] == "prune" && o["agent_id"] != holder.id.as_str()
    });
    let done = wait_final(&server, takeover["id"].as_str().unwrap(), Duration::from_secs(120), &all);
    assert_eq!(done["status"], "success", "{done}\n{}\n{}", logs(&all, &server), s3.log());
    assert_eq!(done["maintenance"]["slot"], slot);
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("restic unlock"), "the takeover removed the dead run's lock: {done}");
    assert_eq!(locks(), 0);
    let waited = done["started_at"].as_i64().unwrap() - killed_at;
    println!(
        "takeover: the slot's prune restarted on another agent {waited} s after the holder was killed (lease ttl 10 s)"
    );
    assert!(waited >= 5, "the new holder waited for the dead holder's lease to lapse ({waited} s)");
    // One of the two waiting agents ran it; the other was told the slot was done.
    // restic prune started three times: the dead holder's, and the takeover's first try (locked by the dead run) and
    // its retry after `restic unlock`; the bystander started none.
    assert_eq!(
        lines(&log, "prune"),
        3,
        "the dead holder's and the takeover's two: {}",
        fs::read_to_string(&log).unwrap()
    );
    let bystander = others.iter().find(|a| a.id != done["agent_id"].as_str().unwrap()).unwrap();
    eventually(Duration::from_secs(60), "the bystander skipping the done slot", || {
        bystander.log().contains("skipped: another agent already ran it").then_some(())
    });
    // The killed holder, started again, reports its interrupted prune as cancelled (not a result about the data);
    // the slot stays done.
    holder.start();
    let interrupted = wait_final(&server, running["id"].as_str().unwrap(), Duration::from_secs(60), &[&holder]);
    assert_eq!(interrupted["status"], "cancelled", "{interrupted}");
    let prunes: Vec<Value> =
        operations(&server, "repository=s3").into_iter().filter(|o| o["kind"] == "prune").collect();
    assert_eq!(prunes.iter().filter(|o| o["status"] == "success").count(), 1, "{prunes:?}");
    assert_eq!(direct.snapshots().len(), 1);
    direct.run(&["check"]);
}

/// A corrupted pack file makes `check --read-data-subset 100%` fail: the operation names restic's error, and the
/// repository's health reads `failed` in `/api/v1/repositories`, the fleet view, `/metrics` and `agents list`; a
/// later successful check (the pack repaired) clears it.
#[test]
fn a_corrupted_pack_fails_the_check_and_the_repository_health() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[]);
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("maintenance.log");
    let wrapper = maintenance_restic(work.path(), "restic-m", &restic, &log, 0);
    let repo_dir = work.path().join("repo");
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data.bin"), random_bytes(5, 2_000_000)).unwrap();
    post(
        &server,
        "/api/v1/repositories",
        json!({"name": "local", "url": repo_dir.display().to_string(), "password": PASSWORD, "auto_init": true,
               "check": {"schedule": NEVER, "read_data_subset": "100%"}}),
        201,
    );
    post(
        &server,
        "/api/v1/plans",
        json!({"name": "data", "repository": "local", "paths": [src.display().to_string()], "schedule": NEVER,
               "selector": {"fleet": "m"}}),
        201,
    );
    let mut agent = enroll(&server, &wrapper);
    agent.start();
    let op = run_now(&server, "data", &agent.id);
    assert_eq!(wait_final(&server, &op, Duration::from_secs(120), &[&agent])["status"], "success");

    // Overwrite bytes in the middle of the largest pack.
    let mut packs: Vec<_> = walk(&repo_dir.join("data"));
    packs.sort_by_key(|p| fs::metadata(p).unwrap().len());
    let pack = packs.last().expect("a pack file").clone();
    let original = fs::read(&pack).unwrap();
    let mut damaged = original.clone();
    let mid = damaged.len() / 2;
    damaged[mid..mid + 64].copy_from_slice(&[0x55; 64]);
    let mut perms = fs::metadata(&pack).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&pack, perms).unwrap();
    fs::write(&pack, &damaged).unwrap();

    let started = Instant::now();
    maintain(&server, "local", "check");
    let check = find_op(&server, "local", &[&agent], "a check operation", |o| o["kind"] == "check");
    let check = wait_final(&server, check["id"].as_str().unwrap(), Duration::from_secs(120), &[&agent]);
    println!("check of the damaged repository: {} in {:?}", check["status"], started.elapsed());
    assert_eq!(check["status"], "failed", "{check}");
    assert_eq!(check["maintenance"]["read_data_subset"], "100%");
    let errors = check["maintenance"]["errors"].as_array().cloned().unwrap_or_default();
    assert!(!errors.is_empty(), "check's errors are reported: {check}");
    assert!(check["message"].as_str().unwrap().contains("repository contains errors"), "{check}");
    assert_eq!(lines(&log, "check"), 1);

    let view = repository_view(&server, "local");
    assert_eq!(view["maintenance"]["health"], "failed", "{view}");
    assert_eq!(view["maintenance"]["last_check"]["operation_id"], check["id"]);
    assert_eq!(fleet_repository(&server, "local")["health"], "failed");
    let metrics = server.admin("GET", "/metrics", None).text();
    assert!(
        metrics.contains("restic_manager_repository_health{repository=\"local\",health=\"failed\"} 1"),
        "{metrics}"
    );
    let out = run_bounded(
        {
            let mut cmd = command(SERVER_BIN);
            cmd.args(["agents", "list"]).env("RM_DATA_DIR", server.data_dir());
            cmd
        },
        Duration::from_secs(30),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.lines().any(|l| l.starts_with("local  failed")), "{table}");

    // Repaired: the next check succeeds and clears the failure.
    fs::write(&pack, &original).unwrap();
    maintain(&server, "local", "check");
    let second =
        find_op(&server, "local", &[&agent], "a second check", |o| o["kind"] == "check" && o["id"] != check["id"]);
    let second = wait_final(&server, second["id"].as_str().unwrap(), Duration::from_secs(120), &[&agent]);
    assert_eq!(second["status"], "success", "{second}");
    assert_eq!(repository_view(&server, "local")["maintenance"]["health"], "ok");
    assert_eq!(fleet_repository(&server, "local")["health"], "ok");
}

/// The operator API refuses bad policies naming the field, and maintenance of a repository without that policy.
#[test]
fn policies_are_validated_and_maintenance_needs_one() {
    let server = server(&[]);
    for (body, field) in [
        (json!({"prune": {"schedule": "@every 1d", "max_unused": "ten"}}), "prune.max_unused"),
        (json!({"check": {"schedule": "@every 1d", "read_data_subset": "6/5"}}), "check.read_data_subset"),
        (json!({"check": {"schedule": "not cron"}}), "check.schedule"),
        (json!({"prune": {"schedule": "@daily", "timeout": "soon"}}), "prune.timeout"),
        (json!({"prune": {"schedule": "@daily", "bogus": 1}}), "bogus"),
        // What restic 0.14 refuses, and local time (one slot per zone).
        (json!({"prune": {"schedule": "@daily", "max_unused": "100%"}}), "prune.max_unused"),
        (json!({"check": {"schedule": "@daily", "read_data_subset": "1/300"}}), "check.read_data_subset"),
        (json!({"prune": {"schedule": "0 4 * * 0", "timezone": "local"}}), "prune.timezone"),
        (json!({"check": {"schedule": "0 5 * * 0", "timezone": "local"}}), "check.timezone"),
    ] {
        let mut full = json!({"name": "r", "url": "/srv/r", "password": "x"});
        full.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let r = server.admin("POST", "/api/v1/repositories", Some(&full));
        assert_eq!(r.status, 400, "{full}: {}", r.text());
        assert!(r.text().contains(field), "{field}: {}", r.text());
    }
    post(&server, "/api/v1/repositories", json!({"name": "r", "url": "/srv/r", "password": "x"}), 201);
    let r = server.admin("POST", "/api/v1/repositories/r/maintenance", Some(&json!({"kind": "prune"})));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "no_maintenance_policy");
    let r = server.admin("POST", "/api/v1/repositories/nope/maintenance", Some(&json!({"kind": "prune"})));
    assert_eq!(r.status, 404, "{}", r.text());
    // A policy set later (PATCH), shown normalised, removed with null.
    let r = server.admin(
        "PATCH",
        "/api/v1/repositories/r",
        Some(&json!({"prune": {"schedule": "@every 7d", "max_unused": "5G", "timeout": "2h"}})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["prune"],
        json!({"schedule": "@every 7d", "timezone": "utc", "max_unused": "5G", "timeout": "7200s"})
    );
    let r = server.admin(
        "PATCH",
        "/api/v1/repositories/r",
        Some(&json!({"check": {"schedule": "@daily", "timezone": "local"}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("check.timezone"), "{}", r.text());
    maintain(&server, "r", "prune");
    let r = server.admin("PATCH", "/api/v1/repositories/r", Some(&json!({"prune": null})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("prune").is_none(), "{}", r.text());
    let audit = server.admin("GET", "/api/v1/audit?kind=maintenance", None);
    assert!(audit.text().contains("prune of r requested"), "{}", audit.text());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
