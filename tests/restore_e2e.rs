//! Restores and snapshot browsing end to end: a real server, enrolled agents running as processes, Debian's restic
//! 0.14, a local repository and an S3-compatible one (moto). The server's heartbeat interval stays at 60 s, so every
//! request that is taken within seconds was brought by the agent's long-poll, not by a heartbeat.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rm_e2e::*;
use serde_json::{Value, json};

const PASSWORD: &str = "repo-pw-Quokka-4410";
const HEARTBEAT: Duration = Duration::from_secs(60);

fn server(extra: &[(&str, &str)]) -> Server {
    let mut b = Server::builder().env("RM_HEARTBEAT_INTERVAL", "60s");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn token(server: &Server) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": "restore e2e", "uses": 5})));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

fn enroll(server: &Server, token: &str, restic: &Path) -> Agent {
    let mut agent = Agent::enroll(&server.url(""), token);
    agent.env("RM_RESTIC", &restic.display().to_string());
    agent
}

fn created(server: &Server, path: &str, body: Value) {
    let r = server.admin("POST", path, Some(&body));
    assert_eq!(r.status, 201, "{path}: {}", r.text());
}

fn operations(server: &Server, agent: &str) -> Vec<Value> {
    let r = server.admin("GET", &format!("/api/v1/operations?agent={agent}&limit=500"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["operations"].as_array().unwrap().clone()
}

fn operation(server: &Server, agent: &str, id: &str) -> Option<Value> {
    operations(server, agent).into_iter().find(|o| o["id"] == id)
}

fn is_final(op: &Value) -> bool {
    matches!(op["status"].as_str(), Some("success" | "warning" | "failed" | "cancelled"))
}

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

/// How long until the operation leaves `queued` (the agent took it).
fn time_to_take(server: &Server, agent: &Agent, id: &str, since: Instant) -> Duration {
    poll(HEARTBEAT, || operation(server, &agent.id, id).filter(|o| o["status"] != "queued").map(|_| ()))
        .unwrap_or_else(|| panic!("operation {id} still queued after {HEARTBEAT:?}:\n{}", agent.log()));
    since.elapsed()
}

fn run_now(server: &Server, plan: &str, agent: &Agent) -> String {
    let r = server.admin("POST", &format!("/api/v1/plans/{plan}/run"), Some(&json!({"agent": agent.id})));
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["operation_id"].as_str().unwrap().to_string()
}

fn restore(server: &Server, agent: &Agent, body: Value) -> String {
    let r = server.admin("POST", &format!("/api/v1/agents/{}/restore", agent.id), Some(&body));
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["operation_id"].as_str().unwrap().to_string()
}

/// Waits until the agent has heartbeated once (so a later fast answer cannot be its first heartbeat's).
fn wait_first_heartbeat(server: &Server, agent: &Agent) {
    let _ = server;
    eventually(Duration::from_secs(30), "the agent's first heartbeat", || {
        agent.log().contains("backup config revision").then_some(())
    });
}

/// A tree worth restoring: nested directories, spaces and non-ASCII names, an empty file, a symlink-free mix of small
/// files and a few MiB of seeded random data.
fn source_tree(root: &Path) -> PathBuf {
    let src = root.join("src");
    fs::create_dir_all(src.join("docs/deep/deeper")).unwrap();
    fs::create_dir_all(src.join("Grüße ünd Spaß/sub dir")).unwrap();
    fs::create_dir_all(src.join("data")).unwrap();
    fs::write(src.join("docs/readme.txt"), "hello restore\n").unwrap();
    fs::write(src.join("docs/deep/empty"), "").unwrap();
    fs::write(src.join("docs/deep/deeper/binary.bin"), random_bytes(7, 300_000)).unwrap();
    fs::write(src.join("Grüße ünd Spaß/sub dir/naïve café.txt"), "unicode\n").unwrap();
    fs::write(src.join("Grüße ünd Spaß/ünïcödé.bin"), random_bytes(8, 70_000)).unwrap();
    fs::write(src.join("data/big one.bin"), random_bytes(11, 3 * 1024 * 1024 + 17)).unwrap();
    fs::write(src.join("top level.txt"), "top\n").unwrap();
    src
}

/// Every entry under `dir` (relative path → contents; directories `None`).
fn tree(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
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

/// Asserts `restored` holds exactly `src`: the same entries, every file the same size and bytes.
fn assert_same_tree(restored: &Path, src: &Path) {
    let (got, want) = (tree(restored), tree(src));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "entries differ");
    for (path, bytes) in &want {
        let other = &got[path];
        assert_eq!(bytes.as_ref().map(Vec::len), other.as_ref().map(Vec::len), "size of {path}");
        assert!(bytes == other, "contents of {path} differ");
    }
}

/// `dir` as restic restores it under `target` (the absolute source path recreated below it).
fn under(target: &Path, dir: &Path) -> PathBuf {
    target.join(dir.strip_prefix("/").unwrap())
}

fn file_count_and_bytes(dir: &Path) -> (u64, u64) {
    tree(dir).values().flatten().fold((0, 0), |(n, b), f| (n + 1, b + f.len() as u64))
}

fn restore_count(server: &Server, agent: &Agent) -> usize {
    operations(server, &agent.id).iter().filter(|o| o["kind"] == "restore").count()
}

fn audit_count(server: &Server, kind: &str) -> usize {
    let r = server.admin("GET", &format!("/api/v1/audit?kind={kind}&limit=500"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["events"].as_array().unwrap().len()
}

/// Back up, then: restore into the default directory (byte for byte, reported success with counts), an `include` of
/// one subdirectory, a non-empty target refused without `overwrite` and left untouched, then restored over with
/// it; the files listing (one level, names/types/sizes, answered in seconds); hostile input refused, nothing queued.
#[test]
fn restore_into_fresh_and_existing_directories_and_list_files() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[]);
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path());
    let mut agent = enroll(&server, &token(&server), &restic);
    agent.start();
    wait_first_heartbeat(&server, &agent);
    let repo_dir = work.path().join("repo");
    created(
        &server,
        "/api/v1/repositories",
        json!({"name": "local", "url": repo_dir.display().to_string(), "password": PASSWORD, "auto_init": true}),
    );
    created(
        &server,
        "/api/v1/plans",
        json!({"name": "files", "repository": "local", "paths": [src.display().to_string()], "schedule": "@daily",
               "agents": [agent.id]}),
    );

    // Run now is taken through the long-poll, long before the next heartbeat.
    let asked = Instant::now();
    let backup = run_now(&server, "files", &agent);
    let took = time_to_take(&server, &agent, &backup, asked);
    assert!(took < Duration::from_secs(10), "run-now took {took:?} (heartbeat interval {HEARTBEAT:?})");
    eprintln!("figure: run-now taken by the agent {took:?} after the request (heartbeat interval {HEARTBEAT:?})");
    let done = wait_final(&server, &agent, &backup, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    let snaps = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD).snapshots();
    assert_eq!(snaps.len(), 1);
    let full_id = snaps[0]["id"].as_str().unwrap().to_string();
    let short_id = full_id[..8].to_string();

    // Into the default directory, by the short id.
    let asked = Instant::now();
    let op = restore(&server, &agent, json!({"snapshot": short_id}));
    let took = time_to_take(&server, &agent, &op, asked);
    assert!(took < Duration::from_secs(10), "restore took {took:?} to start");
    eprintln!("figure: restore taken by the agent {took:?} after the request");
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    eprintln!("figure: restore of {} into the default directory: {} ms", done["restore"]["bytes"], done["duration_ms"]);
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    assert_eq!((done["kind"].as_str(), done["plan"].as_str()), (Some("restore"), Some("files")), "{done}");
    assert!(done["duration_ms"].as_u64().is_some(), "{done}");
    let default_target = agent.state_dir().join("restores").join(&op);
    assert_eq!(done["restore"]["target"], default_target.display().to_string(), "{done}");
    assert_eq!(done["restore"]["snapshot"], full_id.as_str(), "{done}");
    assert_same_tree(&under(&default_target, &src), &src);
    let (files, bytes) = file_count_and_bytes(&src);
    assert_eq!(done["restore"]["files"].as_u64(), Some(files), "{done}");
    assert_eq!(done["restore"]["bytes"].as_u64(), Some(bytes), "{done}");
    assert!(bytes > 3 * 1024 * 1024, "a few MiB were restored");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&default_target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the default target is the agent's own");
    // A restore says nothing about the plan's backup health.
    let r = server.admin("GET", "/api/v1/agents", None);
    let view = r.json()["agents"].as_array().unwrap().iter().find(|a| a["id"] == agent.id.as_str()).cloned().unwrap();
    let plan = view["backups"].as_array().unwrap().iter().find(|b| b["plan"] == "files").cloned().unwrap();
    assert_eq!(plan["last_run"]["id"], backup.as_str(), "{plan}");

    // Only one subdirectory, into an explicit new directory.
    let only_docs = work.path().join("only docs");
    let include = src.join("Grüße ünd Spaß");
    let op = restore(
        &server,
        &agent,
        json!({"snapshot": full_id, "include": [include.display().to_string()],
               "target": only_docs.display().to_string()}),
    );
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    assert_same_tree(&under(&only_docs, &include), &include);
    let top: Vec<String> = fs::read_dir(under(&only_docs, &src))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(top, ["Grüße ünd Spaß"], "only the included directory was restored");

    // A non-empty target: refused at run time without overwrite, and left exactly as it was.
    let busy = work.path().join("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("keep.txt"), "mine\n").unwrap();
    let op = restore(&server, &agent, json!({"snapshot": short_id, "target": busy.display().to_string()}));
    let done = wait_final(&server, &agent, &op, Duration::from_secs(60));
    assert_eq!(done["status"], "failed", "{done}");
    let message = done["message"].as_str().unwrap();
    assert!(message.contains("not empty") && message.contains("overwrite"), "{message}");
    assert_eq!(tree(&busy), BTreeMap::from([("keep.txt".to_string(), Some(b"mine\n".to_vec()))]));
    let op = restore(
        &server,
        &agent,
        json!({"snapshot": short_id, "target": busy.display().to_string(), "overwrite": true}),
    );
    let done = wait_final(&server, &agent, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    assert_same_tree(&under(&busy, &src), &src);
    assert_eq!(fs::read(busy.join("keep.txt")).unwrap(), b"mine\n", "what was there stays");

    // The files listing: one level, answered through the long-poll.
    let list = |path: &str| {
        let started = Instant::now();
        let r = server.admin(
            "GET",
            &format!("/api/v1/agents/{}/snapshots/{short_id}/files?path={}", agent.id, encode(path)),
            None,
        );
        (r, started.elapsed())
    };
    let (r, took) = list(&src.display().to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took < Duration::from_secs(10), "listing took {took:?} (heartbeat interval {HEARTBEAT:?})");
    eprintln!("figure: files listing answered in {took:?} (heartbeat interval {HEARTBEAT:?})");
    let body = r.json();
    assert_eq!(body["snapshot"], full_id.as_str());
    let mut got: Vec<(String, String, Option<u64>)> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().into(), e["type"].as_str().unwrap().into(), e["size"].as_u64()))
        .collect();
    got.sort();
    let mut want: Vec<(String, String, Option<u64>)> = fs::read_dir(&src)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            let kind = if meta.is_dir() { "dir" } else { "file" };
            (e.file_name().to_string_lossy().into_owned(), kind.into(), meta.is_file().then_some(meta.len()))
        })
        .collect();
    want.sort();
    assert_eq!(got, want, "one level: names, types, sizes");
    assert!(body["entries"].as_array().unwrap().iter().all(|e| e["mtime"].is_string() && e["mode"].is_u64()));
    let (r, _) = list(&src.join("Grüße ünd Spaß").display().to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    let entries: Vec<(String, String, Option<u64>)> = r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().into(), e["type"].as_str().unwrap().into(), e["size"].as_u64()))
        .collect();
    assert_eq!(
        entries,
        [("sub dir".to_string(), "dir".to_string(), None), ("ünïcödé.bin".into(), "file".into(), Some(70_000))]
    );
    let (r, _) = list(&src.join("no such dir").display().to_string());
    assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("path_not_found")), "{}", r.text());
    let (r, _) = list(&src.join("top level.txt").display().to_string());
    assert_eq!(r.status, 404, "a file is not a directory: {}", r.text());

    // Hostile or wrong input: refused with a clear error, nothing queued, nothing audited.
    let before = (restore_count(&server, &agent), audit_count(&server, "restore_requested"));
    let path = format!("/api/v1/agents/{}/restore", agent.id);
    let unknown = "0123456789abcdef".repeat(4);
    for (body, status, words) in [
        (json!({"snapshot": short_id, "target": "relative/dir"}), 400, "target"),
        (json!({"snapshot": short_id, "target": "/tmp/../etc"}), 400, "target"),
        (json!({"snapshot": short_id, "include": ["/srv/\u{1b}[31mred"]}), 400, "include"),
        (json!({"snapshot": short_id, "include": ["docs"]}), 400, "include"),
        (json!({"snapshot": short_id, "target": "/tmp/a\nb"}), 400, "target"),
        (json!({"snapshot": "latest"}), 400, "snapshot"),
        (json!({"snapshot": short_id, "force": true}), 400, "force"),
        (json!({"snapshot": unknown}), 404, "snapshot"),
        (json!({"snapshot": short_id, "source_agent": "nobody"}), 400, "source_agent"),
    ] {
        let r = server.admin("POST", &path, Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["message"].as_str().unwrap_or_default().contains(words), "{body}: {}", r.text());
    }
    let r = server.admin("POST", "/api/v1/agents/nobody/restore", Some(&json!({"snapshot": short_id})));
    assert_eq!(r.status, 404, "{}", r.text());
    let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots/{short_id}/files?path=rel", agent.id), None);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots/{unknown}/files?path=/", agent.id), None);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "snapshot_not_found");
    assert_eq!((restore_count(&server, &agent), audit_count(&server, "restore_requested")), before);
    assert_eq!(server.get(&path).status, 405);
    let r = server.request("POST", &path, &[("authorization", "Bearer wrong")]);
    assert_eq!(r.status, 401);
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());

    // Without the long-poll (`run --once` has none), a restore rides the heartbeat answer; it runs once.
    let target = work.path().join("by heartbeat");
    let op = restore(&server, &agent, json!({"snapshot": short_id, "target": target.display().to_string()}));
    assert_eq!(operation(&server, &agent.id, &op).unwrap()["status"], "queued");
    let out = agent.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done = operation(&server, &agent.id, &op).unwrap();
    assert_eq!(done["status"], "success", "{done}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(&under(&target, &src), &src);
    let restores = restore_count(&server, &agent);
    let out = agent.run_once();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&op), "not run again");
    assert_eq!(restore_count(&server, &agent), restores);

    // A snapshot the server still knows but that is gone from the repository: the restore fails with restic's words.
    Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD).run(&["forget", &full_id]);
    let gone = work.path().join("gone");
    let op = restore(&server, &agent, json!({"snapshot": short_id, "target": gone.display().to_string()}));
    let out = agent.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done = operation(&server, &agent.id, &op).unwrap();
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done["message"].as_str().unwrap().contains("no matching ID found"), "{done}");
}

/// The long-poll itself: answered at once for a new `seen`, held while nothing is new, woken by a request.
#[test]
fn the_task_long_poll_waits_and_wakes() {
    let Some(restic) = restic_binary() else { return };
    let server = server(&[]);
    let agent = enroll(&server, &token(&server), &restic);
    let saved: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
    let bearer = format!("Bearer {}", saved["credential"].as_str().unwrap());
    let get = |query: &str| {
        let started = Instant::now();
        let r = server.request("GET", &format!("/api/v1/agents/tasks?{query}"), &[("authorization", bearer.as_str())]);
        assert_eq!(r.status, 200, "{}", r.text());
        (r.json(), started.elapsed())
    };
    let (first, took) = get("wait=20");
    assert!(took < Duration::from_secs(2), "no seen: answered at once ({took:?})");
    assert_eq!(first["run_now"], json!([]));
    let generation = first["generation"].as_u64().unwrap();
    let (same, took) = get(&format!("wait=2&seen={generation}"));
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(5), "held for wait ({took:?})");
    assert_eq!(same["generation"], generation);
    let (_, took) = get(&format!("wait=2&seen={}", generation + 7));
    assert!(took < Duration::from_secs(1), "another generation: at once ({took:?})");

    // A run-now request wakes a waiting long-poll at once.
    let work = tempfile::tempdir().unwrap();
    created(
        &server,
        "/api/v1/repositories",
        json!({"name": "r", "url": work.path().join("repo").display().to_string(), "password": PASSWORD}),
    );
    created(
        &server,
        "/api/v1/plans",
        json!({"name": "p", "repository": "r", "paths": ["/srv"], "schedule": "@daily", "agents": [agent.id]}),
    );
    let (woken, took) = std::thread::scope(|s| {
        let waiting = s.spawn(|| get(&format!("wait=20&seen={generation}")));
        std::thread::sleep(Duration::from_millis(500));
        let op = run_now(&server, "p", &agent);
        let (body, took) = waiting.join().unwrap();
        assert_eq!(body["run_now"][0]["operation_id"], op.as_str(), "{body}");
        (body, took)
    });
    assert!(took < Duration::from_secs(3), "woken by the request ({took:?})");
    assert_ne!(woken["generation"], generation);
    assert_eq!(server.request("GET", "/api/v1/agents/tasks", &[]).status, 401);
    let r = server.request("POST", "/api/v1/agents/tasks/ls_unknown", &[("authorization", bearer.as_str())]);
    assert!(r.status == 404 || r.status == 400, "{}", r.text());
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// On an S3 repository shared by two hosts: one host's snapshot restored onto the other (byte for byte), also from
/// the command line; a host without the repository refused; a listing through the other host; an offline agent's
/// listing answered 504 `agent_timeout` within the (shortened) wait.
#[test]
fn restore_onto_another_host_over_s3_and_offline_listing() {
    let Some(restic) = restic_binary() else { return };
    let Some(s3) = S3Server::start() else { return };
    // A short API timeout: the long-poll waits at most 5 s and a listing 4 s, so the offline case is quick.
    let server = server(&[("RM_API_TIMEOUT", "6s")]);
    let work = tempfile::tempdir().unwrap();
    let src = source_tree(work.path());
    let token = token(&server);
    let mut web = enroll(&server, &token, &restic);
    let mut db = enroll(&server, &token, &restic);
    let mut lonely = enroll(&server, &token, &restic);
    for a in [&mut web, &mut db, &mut lonely] {
        a.start();
    }
    let url = s3.url("rm-restore/fleet");
    created(
        &server,
        "/api/v1/repositories",
        json!({"name": "s3", "url": url, "password": PASSWORD, "auto_init": true,
               "env": {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}}),
    );
    let other_repo = work.path().join("other-repo");
    created(
        &server,
        "/api/v1/repositories",
        json!({"name": "other", "url": other_repo.display().to_string(), "password": PASSWORD, "auto_init": true}),
    );
    created(
        &server,
        "/api/v1/plans",
        json!({"name": "web-files", "repository": "s3", "paths": [src.display().to_string()], "schedule": "@daily",
               "agents": [web.id]}),
    );
    created(
        &server,
        "/api/v1/plans",
        json!({"name": "db-files", "repository": "s3", "paths": ["/nonexistent-db"], "schedule": "@daily",
               "agents": [db.id]}),
    );
    created(
        &server,
        "/api/v1/plans",
        json!({"name": "lonely-files", "repository": "other", "paths": ["/nonexistent"], "schedule": "@daily",
               "agents": [lonely.id]}),
    );
    let backup = run_now(&server, "web-files", &web);
    let done = wait_final(&server, &web, &backup, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}\n{}", web.log(), s3.log());
    let snapshot = done["summary"]["snapshot_id"].as_str().unwrap().to_string();

    // Onto the other host that has the repository.
    let target = work.path().join("on db");
    let op = restore(
        &server,
        &db,
        json!({"snapshot": snapshot, "source_agent": web.id, "target": target.display().to_string()}),
    );
    let done = wait_final(&server, &db, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", db.log());
    assert_eq!(done["agent_id"], db.id.as_str());
    assert_same_tree(&under(&target, &src), &src);

    // Onto a host without it: refused, nothing queued there.
    let r =
        server.admin("POST", &format!("/api/v1/agents/{}/restore", lonely.id), Some(&json!({"snapshot": snapshot})));
    assert_eq!((r.status, r.json()["error"].as_str()), (409, Some("repository_not_configured")), "{}", r.text());
    assert_eq!(restore_count(&server, &lonely), 0);

    // The command line: the same request, straight in the database; the agent's long-poll answers within its wait.
    let cli_target = work.path().join("from cli");
    let include = src.join("docs");
    let mut cmd = command(SERVER_BIN);
    cmd.args(["restore", "--agent", &db.id, "--snapshot", &snapshot[..8], "--include"])
        .arg(&include)
        .arg("--target")
        .arg(&cli_target)
        .env("RM_DATA_DIR", server.data_dir());
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let op = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let done = wait_final(&server, &db, &op, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}\n{}", db.log());
    assert_same_tree(&under(&cli_target, &include), &include);
    let mut cmd = command(SERVER_BIN);
    cmd.args(["restore", "--agent", &lonely.id, "--snapshot", &snapshot, "--target", "relative"])
        .env("RM_DATA_DIR", server.data_dir());
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("target"), "{}", String::from_utf8_lossy(&out.stderr));

    // A listing through the other host, of the first host's snapshot.
    let r = server.admin(
        "GET",
        &format!("/api/v1/agents/{}/snapshots/{snapshot}/files?path={}", db.id, src.display()),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["entries"].as_array().unwrap().len(), fs::read_dir(&src).unwrap().count());

    // The agent goes offline: the listing gives up with 504 agent_timeout, within the wait, and nothing is left.
    assert_eq!(db.stop().code(), Some(0), "{}", db.log());
    let started = Instant::now();
    let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots/{snapshot}/files?path=/", db.id), None);
    let took = started.elapsed();
    assert_eq!((r.status, r.json()["error"].as_str()), (504, Some("agent_timeout")), "{}", r.text());
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(6), "{took:?}");
    assert!(r.json()["message"].as_str().unwrap().contains("did not list"), "{}", r.text());
    assert!(!server.log().contains(S3_SECRET_KEY));
    for a in [&mut web, &mut lonely] {
        assert_eq!(a.stop().code(), Some(0), "{}", a.log());
    }
}
