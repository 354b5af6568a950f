//! Retention end to end with the real binaries: a server, enrolled agents running `run --once`, Debian's restic 0.14
//! and a local repository shared by two hosts and two plans. What is left in the repository is checked with the restic
//! CLI directly; the server's snapshot list and its forget operations must agree with it.

use std::fs;
use std::path::Path;
use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

const PASSWORD: &str = "repo-pw-Retention-4471";
const HOST_B: &str = "rm-retention-b";

fn token(server: &Server) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": "retention e2e"})));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

fn enroll(server: &Server, restic: &Path) -> Agent {
    let mut agent = Agent::enroll(&server.url(""), &token(server));
    agent.env("RM_RESTIC", &restic.display().to_string());
    agent
}

fn operations(server: &Server, query: &str) -> Vec<Value> {
    let r = server.admin("GET", &format!("/api/v1/operations?{query}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["operations"].as_array().unwrap().clone()
}

fn operation(server: &Server, id: &str) -> Value {
    operations(server, "limit=500").into_iter().find(|o| o["id"] == id).unwrap_or(Value::Null)
}

/// Queues a run of `plan` on `agent` and runs the agent once (as `host`, when given), which takes it, backs up,
/// applies the plan's retention and delivers the reports. Returns the backup operation, final.
fn run(server: &Server, agent: &Agent, plan: &str, host: Option<&str>) -> Value {
    let r = server.admin("POST", &format!("/api/v1/plans/{plan}/run"), Some(&json!({"agent": agent.id})));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["operation_id"].as_str().unwrap().to_string();
    let out = match host {
        Some(host) => agent.run_once_as(host).expect("checked by the caller"),
        None => agent.run_once(),
    };
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "run --once failed: {said}");
    let op = operation(server, &id);
    assert_eq!(op["status"], "success", "{op}\n{said}");
    op
}

/// (hostname, plan tag) of a snapshot as restic lists it.
fn owner(s: &Value) -> (String, Vec<String>) {
    let tags = s["tags"].as_array().map(|t| t.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect());
    (s["hostname"].as_str().unwrap_or_default().to_string(), tags.unwrap_or_default())
}

fn ids_of(snapshots: &[Value], host: &str, tag: &str) -> Vec<String> {
    let mut ids: Vec<String> = snapshots
        .iter()
        .filter(|s| {
            let (h, tags) = owner(s);
            h == host && tags.iter().any(|t| t == tag)
        })
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The full id of the snapshot a backup operation made (restic 0.14's summary names it by its short id).
fn full_id(snapshots_ever: &[String], op: &Value) -> String {
    let short = op["summary"]["snapshot_id"].as_str().unwrap_or_else(|| panic!("no snapshot id: {op}"));
    let matching: Vec<&String> = snapshots_ever.iter().filter(|id| id.starts_with(short)).collect();
    assert_eq!(matching.len(), 1, "{short} among {snapshots_ever:?}");
    matching[0].clone()
}

/// Seven backups of host A with `last: 3` leave exactly A's three newest snapshots of the plan; host B's snapshots
/// of the same plan and A's snapshots of another plan are untouched (restic CLI); the server's snapshot list and the
/// seven forget operations say the same.
#[test]
fn keep_last_3_after_7_backups_touches_only_this_host_and_plan() {
    let Some(restic) = restic_binary() else { return };
    let server = Server::builder().start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("file.txt"), "retained\n").unwrap();
    let repo_dir = work.path().join("repo");
    let a = enroll(&server, &restic);
    let b = enroll(&server, &restic);

    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "shared", "url": repo_dir.display().to_string(), "password": PASSWORD,
                     "auto_init": true})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let plan = |name: &str, agents: Vec<&str>, retention: Value| {
        let mut body = json!({"name": name, "repository": "shared", "paths": [src.display().to_string()],
                              "schedule": "0 3 * * *", "agents": agents});
        if !retention.is_null() {
            body["retention"] = retention;
        }
        let r = server.admin("POST", "/api/v1/plans", Some(&body));
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()
    };
    let docs = plan("docs", vec![&a.id, &b.id], json!({"last": 3}));
    assert_eq!(docs["retention"], json!({"last": 3}), "{docs}");
    plan("other", vec![&a.id], Value::Null);
    let repo = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD);

    // Host B (a real agent under another hostname when this machine allows it) backs up plan docs twice.
    let b_host_real = uts_namespace_available();
    if b_host_real {
        run(&server, &b, "docs", Some(HOST_B));
        run(&server, &b, "docs", Some(HOST_B));
    } else {
        eprintln!("no UTS namespace here: host B's snapshots are made with the restic CLI (--host {HOST_B})");
        run(&server, &a, "other", None); // initialises the repository
        for _ in 0..2 {
            repo.run(&["backup", "-q", "--host", HOST_B, "--tag", "rm-plan:docs", &src.display().to_string()]);
        }
    }
    // Host A backs up plan other twice (no retention).
    let host_a = {
        let r = server.admin("GET", "/api/v1/agents", None);
        let agents = r.json()["agents"].as_array().unwrap().clone();
        agents.iter().find(|x| x["id"] == a.id.as_str()).unwrap()["hostname"].as_str().unwrap().to_string()
    };
    assert_ne!(host_a, HOST_B);
    while ids_of(&repo.snapshots(), &host_a, "rm-plan:other").len() < 2 {
        run(&server, &a, "other", None);
    }
    let before = repo.snapshots();
    let b_ids = ids_of(&before, HOST_B, "rm-plan:docs");
    let other_ids = ids_of(&before, &host_a, "rm-plan:other");
    assert_eq!((b_ids.len(), other_ids.len()), (2, 2), "{before:?}");

    // Seven backups of docs on A, each followed by its forget.
    let mut made = Vec::new();
    let mut ever: Vec<String> = Vec::new();
    for n in 1..=7 {
        let op = run(&server, &a, "docs", None);
        ever.extend(ids_of(&repo.snapshots(), &host_a, "rm-plan:docs"));
        ever.sort();
        ever.dedup();
        made.push(full_id(&ever, &op));
        let left = ids_of(&repo.snapshots(), &host_a, "rm-plan:docs");
        assert_eq!(left.len(), n.min(3), "after backup {n}: {left:?}");
    }

    // The repository, read with restic: A's three newest of docs, all of B's, all of A's other plan.
    let after = repo.snapshots();
    let mut newest: Vec<String> = made[4..].to_vec();
    newest.sort();
    assert_eq!(ids_of(&after, &host_a, "rm-plan:docs"), newest, "the three newest of A's docs are left");
    assert_eq!(ids_of(&after, HOST_B, "rm-plan:docs"), b_ids, "another host's snapshots of the same plan");
    assert_eq!(ids_of(&after, &host_a, "rm-plan:other"), other_ids, "this host's snapshots of another plan");
    assert_eq!(after.len(), 7, "{after:?}");

    // The forget operations: one per backup, same trigger, what they removed adds up to the four oldest.
    let forgets = operations(&server, &format!("kind=forget&agent={}&plan=docs&limit=500", a.id));
    assert_eq!(forgets.len(), 7, "{forgets:?}");
    let mut removed: Vec<String> = Vec::new();
    for (i, f) in forgets.iter().rev().enumerate() {
        assert_eq!((f["kind"].as_str(), f["status"].as_str()), (Some("forget"), Some("success")), "{f}");
        assert_eq!(f["trigger"], "run_now", "{f}");
        assert!(f["duration_ms"].as_u64().is_some(), "{f}");
        let n = i + 1;
        assert_eq!(f["forget"]["kept"], n.min(3), "forget {n}: {f}");
        assert_eq!(f["forget"]["removed"], usize::from(n > 3), "forget {n}: {f}");
        removed.extend(f["forget"]["removed_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()));
    }
    assert_eq!(removed, made[..4].to_vec(), "each forget removed the oldest, in order");
    let ms = |ops: &[Value]| ops.iter().filter_map(|o| o["duration_ms"].as_u64()).collect::<Vec<_>>();
    eprintln!(
        "figures: backups of docs on A (ms) {:?}; their forgets (ms) {:?}",
        ms(&operations(&server, &format!("kind=backup&agent={}&plan=docs", a.id))),
        ms(&forgets)
    );
    assert!(operations(&server, "kind=forget&plan=other").is_empty(), "no retention, no forget");
    let backups = operations(&server, &format!("kind=backup&agent={}&plan=docs", a.id));
    assert_eq!(backups.len(), 7);
    assert!(backups.iter().all(|o| o["kind"] == "backup"));
    if b_host_real {
        let b_forgets = operations(&server, &format!("kind=forget&agent={}", b.id));
        assert_eq!(b_forgets.len(), 2, "B applied its own retention: {b_forgets:?}");
        assert!(b_forgets.iter().all(|f| f["status"] == "success" && f["forget"]["removed"] == 0), "{b_forgets:?}");
    }

    // The server's snapshot list for A agrees with restic.
    let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", a.id), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json()["snapshots"].as_array().unwrap().clone();
    let listed_ids = |plan: &str| {
        let mut ids: Vec<String> =
            listed.iter().filter(|s| s["plan"] == plan).map(|s| s["id"].as_str().unwrap().to_string()).collect();
        ids.sort();
        ids
    };
    assert_eq!(listed_ids("docs"), newest, "{listed:?}");
    assert_eq!(listed_ids("other"), other_ids, "{listed:?}");

    // The forgets left the plan's health to the backups: ok, its last run a backup.
    let r = server.admin("GET", "/api/v1/agents", None);
    let view = r.json()["agents"].as_array().unwrap().iter().find(|x| x["id"] == a.id.as_str()).cloned().unwrap();
    let health = view["backups"].as_array().unwrap().iter().find(|p| p["plan"] == "docs").cloned().unwrap();
    assert_eq!(health["health"], "ok", "{health}");
    assert_eq!(health["last_run"]["kind"], "backup", "{health}");

    // The command line lists forgets too.
    let mut cmd = command(SERVER_BIN);
    cmd.args(["operations", "--kind", "forget", "--plan", "docs", "--agent", &a.id])
        .env("RM_DATA_DIR", server.data_dir());
    let out = run_bounded(cmd, Duration::from_secs(15));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().filter(|l| l.contains(" forget ")).count(), 7, "{text}");
    assert!(text.contains("removed 1, kept 3"), "{text}");
}

/// Policies are checked field by field (400 naming the field, nothing changed), set and cleared by PATCH (`null`),
/// each change bumping the configuration revision; the command line's `--keep-*` flags make the same policy.
#[test]
fn retention_policies_are_validated_set_and_cleared() {
    let server = Server::builder().start();
    let work = tempfile::tempdir().unwrap();
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "r", "url": work.path().join("repo").display().to_string(), "password": PASSWORD})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let base = json!({"name": "p", "repository": "r", "paths": ["/srv"], "schedule": "@daily"});
    let with = |retention: Value| {
        let mut body = base.clone();
        body["retention"] = retention;
        body
    };
    for (retention, field) in [
        (json!({}), "retention: the policy keeps nothing"),
        (json!({"keep_tag": []}), "retention: the policy keeps nothing"),
        (json!({"last": 0}), "retention.last"),
        (json!({"daily": 2_000_000}), "retention.daily"),
        (json!({"within": "7 days"}), "retention.within"),
        (json!({"within": "1d1y"}), "retention.within"),
        (json!({"keep_tag": ["a,b"]}), "retention.keep_tag"),
        (json!({"keep_tag": [""]}), "retention.keep_tag"),
        (json!({"within": "0d"}), "retention.within"),
        (json!({"within": "0y0h"}), "retention.within"),
        (json!({"keep_last": 3}), "retention.keep_last: unknown field"),
    ] {
        let r = server.admin("POST", "/api/v1/plans", Some(&with(retention.clone())));
        assert_eq!(r.status, 400, "{retention}: {}", r.text());
        let message = r.json()["message"].as_str().unwrap_or_default().to_string();
        assert!(message.starts_with(field), "{retention}: {message}");
    }
    let r = server.admin("POST", "/api/v1/plans", Some(&with(json!({"last": -1}))));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(server.admin("GET", "/api/v1/plans", None).json()["plans"].as_array().unwrap().is_empty());

    let revision = || -> u64 {
        let data = server.data_dir().join("restic-manager.db");
        let conn = rusqlite::Connection::open(data).unwrap();
        conn.query_row("SELECT revision FROM config_revision", [], |r| r.get::<_, i64>(0)).unwrap() as u64
    };
    let policy = json!({"last": 3, "daily": 7, "within": "1y2m", "keep_tag": ["gold"]});
    let r = server.admin("POST", "/api/v1/plans", Some(&with(policy.clone())));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["retention"], policy);
    let rev = revision();

    // A bad PATCH changes nothing; a good one replaces; null clears; absent leaves it.
    let r = server.admin("PATCH", "/api/v1/plans/p", Some(&json!({"retention": {"hourly": 0}})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(server.admin("GET", "/api/v1/plans/p", None).json()["retention"], policy);
    assert_eq!(revision(), rev);
    let r = server.admin("PATCH", "/api/v1/plans/p", Some(&json!({"retention": {"weekly": 4}})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["retention"], json!({"weekly": 4}));
    assert_eq!(revision(), rev + 1);
    let r = server.admin("PATCH", "/api/v1/plans/p", Some(&json!({"tags": ["x"]})));
    assert_eq!(r.json()["retention"], json!({"weekly": 4}), "absent: unchanged");
    let r = server.admin("PATCH", "/api/v1/plans/p", Some(&json!({"retention": null})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("retention").is_none(), "cleared: {}", r.json());
    assert_eq!(revision(), rev + 3);

    // The command line: --keep-* flags, refused policies, and the policy in `plan list`.
    let cli = |args: &[&str]| {
        let mut cmd = command(SERVER_BIN);
        cmd.args(args).env("RM_DATA_DIR", server.data_dir());
        let out = run_bounded(cmd, Duration::from_secs(15));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let add = ["plan", "add", "q", "--repo", "r", "--path", "/srv", "--schedule", "@daily"];
    let (ok, _, err) = cli(&[&add[..], &["--keep-within", "7 d"]].concat());
    assert!(!ok && err.contains("retention.within"), "{err}");
    let (ok, _, err) = cli(&[&add[..], &["--keep-last", "0"]].concat());
    assert!(!ok && err.contains("keep-last"), "{err}");
    let (ok, out, err) = cli(&[&add[..], &["--keep-last", "2", "--keep-within", "30d", "--keep-tag", "gold"]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("keep last=2 within=30d tag=gold"), "{out}");
    let q = server.admin("GET", "/api/v1/plans/q", None).json();
    assert_eq!(q["retention"], json!({"last": 2, "within": "30d", "keep_tag": ["gold"]}));
    let (ok, out, _) = cli(&["plan", "list"]);
    assert!(ok && out.lines().any(|l| l.starts_with("p\t") && l.contains("keep all")), "{out}");
}

/// A forget that fails is its own failed operation: the backup before it stays a success, the plan's health stays
/// `ok`, the snapshot list is the backup's, and the agent's next run forgets again.
#[test]
fn a_failed_forget_is_its_own_failure() {
    let Some(restic) = restic_binary() else { return };
    let server = Server::builder().start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("file.txt"), "kept\n").unwrap();
    let repo_dir = work.path().join("repo");
    // restic, except that `forget` fails the way restic does when it cannot lock the repository.
    let wrapper = work.path().join("restic-no-forget");
    let switch = work.path().join("forget-fails");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = forget ] && [ -e '{switch}' ]; then\n  echo 'Fatal: unable to create lock in \
             backend: permission denied' >&2\n  exit 1\nfi\nexec '{restic}' \"$@\"\n",
            switch = switch.display(),
            restic = restic.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(&switch, "").unwrap();
    let a = enroll(&server, &wrapper);
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "r", "url": repo_dir.display().to_string(), "password": PASSWORD, "auto_init": true})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let body = json!({"name": "p", "repository": "r", "paths": [src.display().to_string()], "schedule": "@daily",
                      "agents": [a.id], "retention": {"last": 1}});
    let r = server.admin("POST", "/api/v1/plans", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());

    let first = run(&server, &a, "p", None);
    let second = run(&server, &a, "p", None);
    assert_eq!((first["status"].as_str(), second["status"].as_str()), (Some("success"), Some("success")));
    let forgets = operations(&server, "kind=forget");
    assert_eq!(forgets.len(), 2, "{forgets:?}");
    for f in &forgets {
        assert_eq!(f["status"], "failed", "{f}");
        assert!(f["message"].as_str().unwrap_or_default().contains("unable to create lock"), "{f}");
        assert!(f.get("forget").is_none(), "{f}");
    }
    let repo = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD);
    assert_eq!(repo.snapshots().len(), 2, "nothing was forgotten");
    let listed = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", a.id), None).json();
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 2, "{listed}");
    let r = server.admin("GET", "/api/v1/agents", None);
    let view = r.json()["agents"].as_array().unwrap().iter().find(|x| x["id"] == a.id.as_str()).cloned().unwrap();
    assert_eq!(view["backups"][0]["health"], "ok", "{view}");
    assert_eq!(view["backups"][0]["last_run"]["id"], second["id"], "{view}");

    // forget works again: the next run's forget leaves one snapshot, and the server's list follows.
    fs::remove_file(&switch).unwrap();
    run(&server, &a, "p", None);
    let forgets = operations(&server, "kind=forget");
    assert_eq!(forgets[0]["status"], "success", "{forgets:?}");
    assert_eq!((forgets[0]["forget"]["removed"].as_u64(), forgets[0]["forget"]["kept"].as_u64()), (Some(2), Some(1)));
    let left = repo.snapshots();
    assert_eq!(left.len(), 1);
    let listed = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", a.id), None).json();
    let listed = listed["snapshots"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], left[0]["id"]);
}

/// Queues a run of `plan` on `agent` and runs the agent once; returns the backup operation as it ended, whatever
/// its status.
fn run_any(server: &Server, agent: &Agent, plan: &str) -> Value {
    let r = server.admin("POST", &format!("/api/v1/plans/{plan}/run"), Some(&json!({"agent": agent.id})));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["operation_id"].as_str().unwrap().to_string();
    let out = agent.run_once();
    assert!(out.status.success(), "run --once failed: {}", String::from_utf8_lossy(&out.stderr));
    operation(server, &id)
}

/// restic behind a switch file: `fail` makes `backup` fail without a snapshot, `warning` makes it exit 3 after a real
/// backup (a snapshot made, some files unread), `foreign` makes `forget` (and its dry run) list a snapshot of this
/// host carrying another plan's tag too, `empty` makes `forget` print nothing; anything else is restic itself.
/// `foreign` prints `<dir>/foreign.json`.
fn switched_restic(dir: &Path, restic: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let mode = dir.join("mode");
    let script = format!(
        "#!/bin/sh\nmode=$(cat '{mode}' 2>/dev/null)\ncase \"$1:$mode\" in\n  backup:fail) echo 'Fatal: unable to open \
         config file: permission denied' >&2; exit 1 ;;\n  backup:warning) '{restic}' \"$@\"; exit 3 ;;\n  \
         forget:foreign) cat '{dir}/foreign.json'; exit 0 ;;\n  forget:empty) exit 0 ;;\nesac\nexec '{restic}' \"$@\"\n",
        mode = mode.display(),
        restic = restic.display(),
        dir = dir.display()
    );
    let wrapper = dir.join("restic-switched");
    fs::write(&wrapper, script).unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    (wrapper, mode)
}

/// A warning backup (a snapshot was made) is followed by forget; a failed one is not. A forget whose dry run lists a
/// snapshot carrying another plan's tag, or that prints nothing, fails without forgetting and leaves the server's
/// snapshot list as the backup reported it.
#[test]
fn forget_follows_snapshots_only_and_refuses_foreign_or_empty_results() {
    let Some(restic) = restic_binary() else { return };
    let server = Server::builder().start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("file.txt"), "kept\n").unwrap();
    let repo_dir = work.path().join("repo");
    let (wrapper, mode) = switched_restic(work.path(), &restic);
    let a = enroll(&server, &wrapper);
    // What the agent reports as its hostname is restic's --host: the foreign snapshot is this host's, of plan p and q.
    let agents = server.admin("GET", "/api/v1/agents", None).json();
    let host = agents["agents"][0]["hostname"].as_str().unwrap().to_string();
    let foreign = json!([{"tags": null, "host": host, "paths": null, "remove": null, "reasons": [],
        "keep": [{"id": "ab".repeat(32), "short_id": "abababab", "time": "2026-12-02T10:00:00Z", "hostname": host,
                  "paths": ["/srv"], "tags": ["rm-plan:p", "rm-plan:q"]}]}]);
    fs::write(work.path().join("foreign.json"), foreign.to_string()).unwrap();
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "r", "url": repo_dir.display().to_string(), "password": PASSWORD, "auto_init": true})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let body = json!({"name": "p", "repository": "r", "paths": [src.display().to_string()], "schedule": "@daily",
                      "agents": [a.id], "retention": {"last": 1}});
    assert_eq!(server.admin("POST", "/api/v1/plans", Some(&body)).status, 201);
    let forgets = || operations(&server, "kind=forget");
    let listed = || {
        let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", a.id), None);
        let mut ids: Vec<String> =
            r.json()["snapshots"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
        ids.sort();
        ids
    };
    let repo = Repo::new(&restic, &repo_dir.display().to_string(), PASSWORD);
    let in_repo = || {
        let mut ids: Vec<String> = repo.snapshots().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
        ids.sort();
        ids
    };

    // A backup (which initialises the repository), then a warning backup: each followed by a forget.
    run(&server, &a, "p", None);
    fs::write(&mode, "warning").unwrap();
    let op = run_any(&server, &a, "p");
    assert_eq!(op["status"], "warning", "{op}");
    assert_eq!(forgets().len(), 2, "{:?}", forgets());
    assert!(forgets().iter().all(|f| f["status"] == "success"), "{:?}", forgets());
    assert_eq!(in_repo().len(), 1, "forget kept 1");

    // A failed backup: no forget.
    fs::write(&mode, "fail").unwrap();
    let op = run_any(&server, &a, "p");
    assert_eq!(op["status"], "failed", "{op}");
    assert_eq!(forgets().len(), 2, "no forget after a failed backup: {:?}", forgets());

    // The dry run lists a snapshot carrying another plan's tag: failed, nothing forgotten, the list is the backup's.
    fs::write(src.join("file.txt"), "changed\n").unwrap();
    fs::write(&mode, "foreign").unwrap();
    run(&server, &a, "p", None);
    let f = forgets()[0].clone();
    assert_eq!(f["status"], "failed", "{f}");
    let message = f["message"].as_str().unwrap_or_default();
    assert!(message.contains("dry-run selected snapshots that are not only") && message.contains("rm-plan:q"), "{f}");
    assert!(f.get("forget").is_none(), "{f}");
    assert_eq!(in_repo().len(), 2, "nothing was forgotten");
    assert_eq!(listed(), in_repo(), "the server lists what the backup reported");

    // forget prints nothing (as restic 0.14 does for a policy it ignores): failed, and the list is not wiped.
    fs::write(&mode, "empty").unwrap();
    run(&server, &a, "p", None);
    let f = forgets()[0].clone();
    assert_eq!(f["status"], "failed", "{f}");
    assert!(f["message"].as_str().unwrap_or_default().contains("printed no result"), "{f}");
    assert_eq!(in_repo().len(), 3);
    assert_eq!(listed(), in_repo(), "not an empty list");
    assert_eq!(forgets().len(), 4, "{:?}", forgets());
}

/// The reserved `rm-` tag prefix is refused (API and command line, nothing stored); a plan with retention whose
/// agents report the same hostname carries a warning in its view and in `plan list`.
#[test]
fn reserved_tags_are_refused_and_shared_hostnames_are_warned_about() {
    let server = Server::builder().start();
    let work = tempfile::tempdir().unwrap();
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "r", "url": work.path().join("repo").display().to_string(), "password": PASSWORD})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let a = Agent::enroll(&server.url(""), &token(&server));
    let b = Agent::enroll(&server.url(""), &token(&server));
    for tag in ["rm-plan:q", "rm-anything"] {
        let body = json!({"name": "p", "repository": "r", "paths": ["/srv"], "schedule": "@daily", "tags": [tag]});
        let r = server.admin("POST", "/api/v1/plans", Some(&body));
        assert_eq!(r.status, 400, "{}", r.text());
        let message = r.json()["message"].as_str().unwrap_or_default().to_string();
        assert!(message.starts_with("tags:") && message.contains("reserved"), "{message}");
    }
    assert!(server.admin("GET", "/api/v1/plans", None).json()["plans"].as_array().unwrap().is_empty());
    let body = json!({"name": "p", "repository": "r", "paths": ["/srv"], "schedule": "@daily",
                      "agents": [a.id, b.id], "retention": {"last": 3}});
    let r = server.admin("POST", "/api/v1/plans", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = server.admin("PATCH", "/api/v1/plans/p", Some(&json!({"tags": ["ok", "rm-plan:q"]})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(server.admin("GET", "/api/v1/plans/p", None).json().get("tags").unwrap().as_array().unwrap().is_empty());

    // Both agents run on this machine: the same hostname, and the plan has retention.
    let view = server.admin("GET", "/api/v1/plans/p", None).json();
    let warnings = view["warnings"].as_array().cloned().unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{view}");
    let w = warnings[0].as_str().unwrap();
    assert!(w.contains(&a.id) && w.contains(&b.id) && w.contains("same hostname"), "{w}");
    let list = server.admin("GET", "/api/v1/plans", None).json();
    assert_eq!(list["plans"][0]["warnings"], view["warnings"]);
    let cli = |args: &[&str]| {
        let mut cmd = command(SERVER_BIN);
        cmd.args(args).env("RM_DATA_DIR", server.data_dir());
        let out = run_bounded(cmd, Duration::from_secs(15));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, err) = cli(&["plan", "list"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "one line per plan on standard output: {out}");
    assert!(err.contains("warning: plan p: agents") && err.contains("same hostname"), "{err}");
    let (ok, _, err) =
        cli(&["plan", "add", "q", "--repo", "r", "--path", "/srv", "--schedule", "@daily", "--tag", "rm-plan:p"]);
    assert!(!ok && err.contains("tags:") && err.contains("reserved"), "{err}");

    // Without retention there is nothing to warn about.
    let r = server.admin("PATCH", "/api/v1/plans/p", Some(&json!({"retention": null})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("warnings").is_none(), "{}", r.json());
    let (_, _, err) = cli(&["plan", "list"]);
    assert!(!err.contains("warning"), "{err}");
}
