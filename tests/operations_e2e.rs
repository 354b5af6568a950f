//! Operations with the real binary: agents (enrolled over HTTP, then acting as plain HTTP clients with their
//! credentials) report runs, take repository leases; the operator lists operations and snapshots, sees each host's
//! backup health in `GET /api/v1/agents`, `?health=` and `agents list`, and scrapes `/metrics`.
//!
//! Plans are rows the test writes into the server's database with SQL (the plans API is built separately), beside the
//! running server: SQLite in WAL mode with a busy timeout, as the `repo` command does. The server reads the `plans`
//! table on every fleet view, so no restart is needed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn op_id(n: u32) -> String {
    format!("op_{n:032x}")
}

struct Agent {
    id: String,
    auth: String,
}

/// Enrolls a host over HTTP with a fresh token.
fn enroll(server: &Server, hostname: &str) -> Agent {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1})));
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let body = json!({"token": token, "hostname": hostname, "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "e2e"});
    let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    Agent { id: v["agent_id"].as_str().unwrap().into(), auth: format!("Bearer {}", v["credential"].as_str().unwrap()) }
}

fn as_agent(server: &Server, agent: &Agent, method: &str, path: &str, body: Option<&Value>) -> Response {
    server.send(method, path, &[("Authorization", &agent.auth)], body)
}

fn report(n: u32, plan: &str, status: &str, started_at: i64) -> Value {
    let mut r = json!({
        "id": op_id(n), "plan": plan, "kind": "backup", "trigger": "schedule", "status": status,
        "started_at": started_at,
    });
    if status != "running" {
        r["finished_at"] = json!(started_at + 12);
        r["duration_ms"] = json!(12_500);
        r["exit_code"] = json!(match status {
            "success" => 0,
            "warning" => 3,
            _ => 1,
        });
        r["summary"] = json!({"files_new": 3, "data_added": 1000 + n, "total_duration": 12.5,
                              "snapshot_id": format!("{n:064x}")});
    }
    if status == "failed" {
        r["message"] = json!("Fatal: wrong password or no key found");
        r["reason"] = json!("wrong_password");
    }
    r
}

fn send_reports(server: &Server, agent: &Agent, reports: &[Value]) -> Response {
    as_agent(server, agent, "POST", "/api/v1/agents/reports", Some(&json!({ "reports": reports })))
}

fn db(data_dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(data_dir.join("restic-manager.db")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// A plan row as the plans API would write it (migration 6's columns; list-valued fields as JSON).
fn insert_plan(data_dir: &Path, name: &str, schedule: &str, agents: &[&str], selector: Value, updated_at: i64) {
    db(data_dir)
        .execute(
            "INSERT INTO plans (name, repository, paths, excludes, schedule, timezone, tags, one_file_system,
                                exclude_caches, agents, selector, timeout_secs, jitter_secs, created_at, updated_at)
             VALUES (?1, 'main', '[\"/srv\"]', '[]', ?2, 'utc', '[]', 0, 0, ?3, ?4, 3600, 0, ?5, ?5)",
            rusqlite::params![name, schedule, serde_json::to_string(agents).unwrap(), selector.to_string(), updated_at],
        )
        .unwrap();
}

fn agents_cli(server: &Server, args: &[&str]) -> (bool, String, String) {
    cli(server, "agents", args)
}

fn cli(server: &Server, command_name: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = command(SERVER_BIN);
    cmd.arg(command_name)
        .args(args)
        .env("RM_DATA_DIR", server.data_dir())
        .env("RM_BUNDLED_ASSETS_DIR", server.bundled_dir());
    let out = run_bounded(cmd, Duration::from_secs(15));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A sample of the exposition text: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus/OpenMetrics text strictly enough to catch a malformed exposition: every line is a `# HELP`,
/// `# TYPE` or `# EOF` comment or a sample `name{k="v",…} value` of a declared metric; `# EOF` ends it.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut declared = BTreeMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends with # EOF");
    let is_name = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_alphabetic() || b == b'_' || b == b':' || (i > 0 && b.is_ascii_digit()))
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(is_name(name) && ["gauge", "counter", "info", "unknown"].contains(&kind), "{line:?}");
            declared.insert(name.to_string(), kind.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(is_name(rest.split(' ').next().unwrap()), "{line:?}");
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                    // Values here hold no escaped quotes (ids, host names, plan names, enum words).
                    let (value, after) = after.split_once('"').unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(is_name(key), "{line:?}");
                    labels.insert(key.to_string(), value.to_string());
                    rest = after.strip_prefix(',').unwrap_or(after);
                }
                (name, labels)
            }
            None => (series, BTreeMap::new()),
        };
        assert!(declared.contains_key(name), "sample of an undeclared metric: {line:?}");
        samples.push(Sample { name: name.into(), labels, value });
    }
    samples
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect()
}

fn one(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = find(samples, name, labels);
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].value
}

#[test]
fn reports_operations_health_leases_and_metrics() {
    let server = Server::start();
    let data = server.data_dir().to_path_buf();
    let t = now();

    let ok = enroll(&server, "ok-host");
    let warn = enroll(&server, "warn-host");
    let failed = enroll(&server, "failed-host");
    let overdue = enroll(&server, "overdue-host");
    let never = enroll(&server, "never-host");
    let planless = enroll(&server, "planless-host");

    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "main", "url": "/srv/restic", "password": "e2e-password"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // "hourly" names five agents; "nightly" selects by label, and only ok-host carries it.
    insert_plan(&data, "hourly", "@every 1h", &[&ok.id, &warn.id, &failed.id, &overdue.id, &never.id], json!({}), t);
    insert_plan(&data, "nightly", "0 3 * * *", &[], json!({"env": "prod"}), t);
    db(&data).execute("UPDATE agents SET labels = '{\"env\":\"prod\"}' WHERE id = ?1", [&ok.id]).unwrap();

    // Before any report: every planned host is `never`, the planless one has no health.
    let list = server.admin("GET", "/api/v1/agents", None).json();
    assert_eq!(list["health_counts"], json!({"never": 5}), "{list}");

    // --- Reports ---------------------------------------------------------------------------------------------
    let mut ok_success = report(1, "hourly", "success", t - 100);
    ok_success["snapshots"] = json!([
        {"id": "a".repeat(64), "short_id": "aaaaaaaa", "time": "2026-01-01T10:00:00+02:00", "hostname": "ok-host",
         "paths": ["/srv"], "tags": ["rm-plan:hourly"]},
        {"id": "b".repeat(64), "short_id": "bbbbbbbb", "time": "2026-01-01T09:30:00Z", "hostname": "ok-host",
         "paths": ["/srv"], "tags": ["rm-plan:hourly"]},
    ]);
    let ok_batch = vec![report(1, "hourly", "running", t - 100), ok_success, report(2, "nightly", "success", t - 50)];
    let r = send_reports(&server, &ok, &ok_batch);
    assert_eq!((r.status, r.json()["accepted"].clone()), (200, json!(3)), "{}", r.text());
    assert_eq!(send_reports(&server, &warn, &[report(3, "hourly", "warning", t - 90)]).status, 200);
    assert_eq!(send_reports(&server, &failed, &[report(4, "hourly", "failed", t - 80)]).status, 200);
    // overdue-host: its only success is three hours old, more than twice the hourly interval.
    assert_eq!(send_reports(&server, &overdue, &[report(5, "hourly", "success", t - 3 * 3600)]).status, 200);

    // A resent batch is acknowledged and changes nothing.
    let before = server.admin("GET", "/api/v1/operations", None).text();
    let r = send_reports(&server, &ok, &ok_batch);
    assert_eq!((r.status, r.json()["accepted"].clone()), (200, json!(3)), "{}", r.text());
    let mut late_failure = report(1, "hourly", "failed", t - 100);
    late_failure["message"] = json!("must not replace the success");
    assert_eq!(send_reports(&server, &ok, &[late_failure]).status, 200);
    assert_eq!(server.admin("GET", "/api/v1/operations", None).text(), before, "resent reports changed operations");

    // Refusals: no or a wrong credential, an invalid report (nothing of the batch stored), another agent's id.
    let r = server.send("POST", "/api/v1/agents/reports", &[], Some(&json!({"reports": []})));
    assert_eq!(r.status, 401, "{}", r.text());
    let r = server.send(
        "POST",
        "/api/v1/agents/reports",
        &[("Authorization", "Bearer rmagt_nobody_x")],
        Some(&json!({"reports": [report(50, "hourly", "success", t)]})),
    );
    assert_eq!(r.status, 401, "{}", r.text());
    let r = send_reports(&server, &ok, &[report(60, "hourly", "success", t), report(61, "hourly", "queued", t)]);
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("invalid_request")), "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("queued"), "{}", r.text());
    let r = send_reports(&server, &warn, &[report(62, "hourly", "success", t), report(1, "hourly", "success", t)]);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("another agent"), "{}", r.text());
    assert_eq!(server.admin("GET", "/api/v1/operations", None).text(), before, "a refused batch stored something");
    let r = server.send(
        "POST",
        "/api/v1/agents/reports",
        &[("Authorization", &ok.auth), ("Content-Type", "application/json")],
        None,
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // --- Operations listing -----------------------------------------------------------------------------------
    let page = server.admin("GET", "/api/v1/operations", None).json();
    let ids: Vec<&str> = page["operations"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [op_id(5), op_id(4), op_id(3), op_id(2), op_id(1)], "newest first: {page}");
    assert_eq!(page["next_before"], Value::Null);
    let first = &page["operations"][4];
    assert_eq!(first["hostname"], "ok-host");
    assert_eq!(first["status"], "success");
    assert_eq!(first["summary"]["data_added"], 1001);
    let failed_op = &page["operations"][1];
    assert_eq!(
        (&failed_op["reason"], &failed_op["message"], &failed_op["exit_code"]),
        (&json!("wrong_password"), &json!("Fatal: wrong password or no key found"), &json!(1))
    );
    let filtered = |q: &str| -> Vec<String> {
        let r = server.admin("GET", &format!("/api/v1/operations?{q}"), None);
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        r.json()["operations"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(filtered(&format!("agent={}", ok.id)), [op_id(2), op_id(1)]);
    assert_eq!(filtered("plan=nightly"), [op_id(2)]);
    assert_eq!(filtered("status=failed"), [op_id(4)]);
    assert_eq!(filtered(&format!("agent={}&plan=hourly&status=success", ok.id)), [op_id(1)]);
    // Keyset paging, two at a time, sees every operation once.
    let mut seen = Vec::new();
    let mut cursor: Option<i64> = None;
    for _ in 0..10 {
        let q = cursor.map_or_else(|| "limit=2".to_string(), |b| format!("limit=2&before={b}"));
        let page = server.admin("GET", &format!("/api/v1/operations?{q}"), None).json();
        seen.extend(page["operations"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap().to_string()));
        match page["next_before"].as_i64() {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    for bad in ["limit=0", "limit=501", "status=bogus", "colour=red", "before=x"] {
        let r = server.admin("GET", &format!("/api/v1/operations?{bad}"), None);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(server.get("/api/v1/operations").status, 401);

    // --- Snapshots --------------------------------------------------------------------------------------------
    let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", ok.id), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let snaps = r.json();
    assert_eq!(snaps["agent_id"], ok.id.as_str());
    let snap_ids: Vec<&str> =
        snaps["snapshots"].as_array().unwrap().iter().map(|s| s["short_id"].as_str().unwrap()).collect();
    // 09:30Z is newer than 10:00+02:00 (08:00Z).
    assert_eq!(snap_ids, ["bbbbbbbb", "aaaaaaaa"], "{snaps}");
    assert_eq!(snaps["snapshots"][0]["plan"], "hourly");
    assert_eq!(snaps["snapshots"][0]["paths"], json!(["/srv"]));
    let r = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", warn.id), None);
    assert_eq!(r.json()["snapshots"], json!([]));
    assert_eq!(server.admin("GET", "/api/v1/agents/nosuchagent/snapshots", None).status, 404);
    assert_eq!(server.get(&format!("/api/v1/agents/{}/snapshots", ok.id)).status, 401);

    // --- Health in the fleet view -----------------------------------------------------------------------------
    let list = server.admin("GET", "/api/v1/agents", None).json();
    let by_host: BTreeMap<&str, &Value> =
        list["agents"].as_array().unwrap().iter().map(|a| (a["hostname"].as_str().unwrap(), a)).collect();
    for (host, health) in [
        ("ok-host", json!("ok")),
        ("warn-host", json!("warning")),
        ("failed-host", json!("failed")),
        ("overdue-host", json!("overdue")),
        ("never-host", json!("never")),
        ("planless-host", Value::Null),
    ] {
        assert_eq!(by_host[host]["health"], health, "{host}: {}", by_host[host]);
    }
    let ok_plans: Vec<&str> =
        by_host["ok-host"]["backups"].as_array().unwrap().iter().map(|p| p["plan"].as_str().unwrap()).collect();
    assert_eq!(ok_plans, ["hourly", "nightly"]);
    let hourly = &by_host["ok-host"]["backups"][0];
    assert_eq!((&hourly["last_run"]["id"], &hourly["last_success_at"]), (&json!(op_id(1)), &json!(t - 88)));
    assert_eq!(by_host["planless-host"]["backups"], json!([]));
    assert_eq!(
        list["health_counts"],
        json!({"ok": 1, "warning": 1, "failed": 1, "overdue": 1, "never": 1}),
        "{}",
        list["health_counts"]
    );
    for (health, host) in [
        ("ok", "ok-host"),
        ("warning", "warn-host"),
        ("failed", "failed-host"),
        ("overdue", "overdue-host"),
        ("never", "never-host"),
    ] {
        let r = server.admin("GET", &format!("/api/v1/agents?health={health}"), None);
        let hosts: Vec<String> =
            r.json()["agents"].as_array().unwrap().iter().map(|a| a["hostname"].as_str().unwrap().into()).collect();
        assert_eq!(hosts, [host], "?health={health}");
    }
    assert_eq!(server.admin("GET", "/api/v1/agents?health=great", None).status, 400);
    assert_eq!(
        server.admin("GET", "/api/v1/agents?state=unknown&health=failed", None).json()["agents"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The same through `agents list` on the data dir.
    let (success, out, err) = agents_cli(&server, &["list"]);
    assert!(success, "{out}{err}");
    assert!(out.lines().next().unwrap().contains("HEALTH"), "{out}");
    let row =
        |host: &str| out.lines().find(|l| l.starts_with(host)).unwrap_or_else(|| panic!("{host} in {out}")).to_string();
    assert!(row("failed-host").split_whitespace().any(|w| w == "failed"), "{out}");
    assert!(row("planless-host").split_whitespace().any(|w| w == "-"), "{out}");
    assert!(out.contains("backup health: ok=1 warning=1 failed=1 overdue=1 never=1"), "{out}");
    let (success, out, err) = agents_cli(&server, &["list", "--health", "overdue"]);
    assert!(success, "{out}{err}");
    let hosts: Vec<&str> =
        out.lines().skip(1).filter(|l| l.contains("-host")).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(hosts, ["overdue-host"], "{out}");
    let (success, _, err) = agents_cli(&server, &["list", "--health", "bad"]);
    assert!(!success && err.contains("overdue"), "{err}");

    // And `operations`.
    let (success, out, err) = cli(&server, "operations", &["--status", "failed"]);
    assert!(success, "{out}{err}");
    assert!(out.lines().next().unwrap().starts_with("STARTED"), "{out}");
    assert!(out.contains("failed-host") && out.contains(&op_id(4)) && out.contains("wrong password"), "{out}");
    assert!(!out.contains("ok-host"), "{out}");
    let (success, out, err) = cli(&server, "operations", &["--agent", &ok.id, "--plan", "hourly", "--json"]);
    assert!(success, "{out}{err}");
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["operations"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["operations"][0]["id"], op_id(1));

    // --- Leases -----------------------------------------------------------------------------------------------
    let lease = |agent: &Agent, op: u32, repo: &str| {
        as_agent(
            &server,
            agent,
            "POST",
            "/api/v1/agents/leases",
            Some(&json!({"repository": repo, "operation_id": op_id(op), "ttl_secs": 300})),
        )
    };
    let r = lease(&ok, 100, "main");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["operation_id"], op_id(100));
    let expires = r.json()["expires_at"].as_i64().unwrap();
    assert!((t + 290..=now() + 300).contains(&expires), "{expires}");
    let r = lease(&warn, 101, "main");
    assert_eq!(r.status, 409, "{}", r.text());
    // ErrorBody flattens its details: `details.retry_after_secs` in Rust is a top-level field in JSON.
    let busy = r.json();
    assert_eq!(busy["error"], "repository_busy");
    assert_eq!(busy["holder_agent"], ok.id.as_str());
    let retry = busy["retry_after_secs"].as_u64().unwrap();
    assert!((1..=300).contains(&retry), "{busy}");
    assert_eq!(r.header("retry-after"), Some(retry.to_string().as_str()));
    assert_eq!(lease(&ok, 100, "main").status, 200, "the holder renews");
    assert_eq!(lease(&warn, 101, "other").status, 200, "another repository is free");
    // Only the holder's release frees it.
    let release = |agent: &Agent, op: u32| {
        as_agent(&server, agent, "DELETE", &format!("/api/v1/agents/leases/main?operation_id={}", op_id(op)), None)
    };
    assert_eq!(release(&warn, 101).status, 204);
    assert_eq!(lease(&warn, 101, "main").status, 409);
    assert_eq!(release(&ok, 100).status, 204);
    assert_eq!(lease(&warn, 101, "main").status, 200);
    assert_eq!(lease(&ok, 100, "Not A Name").status, 400);
    assert_eq!(
        as_agent(
            &server,
            &ok,
            "POST",
            "/api/v1/agents/leases",
            Some(&json!({"repository": "main", "operation_id": "x", "ttl_secs": 60}))
        )
        .status,
        400
    );
    assert_eq!(as_agent(&server, &ok, "DELETE", "/api/v1/agents/leases/main", None).status, 400);
    assert_eq!(server.send("POST", "/api/v1/agents/leases", &[], Some(&json!({}))).status, 401);

    // --- Metrics ----------------------------------------------------------------------------------------------
    assert_eq!(server.get("/metrics").status, 401, "metrics need the admin token by default");
    let r = server.request("GET", "/metrics", &[("Authorization", "Bearer not-the-admin-token")]);
    assert_eq!(r.status, 401);
    let r = server.admin("GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("application/openmetrics-text"), "{:?}", r.headers);
    let samples = parse_exposition(&r.text());
    let labels = |a: &Agent, host: &'static str, plan: &'static str| {
        [("agent_id", a.id.clone()), ("hostname", host.into()), ("plan", plan.into())]
    };
    let l = labels(&ok, "ok-host", "hourly");
    let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(one(&samples, "restic_manager_backup_last_success_timestamp_seconds", &l), (t - 88) as f64);
    assert_eq!(one(&samples, "restic_manager_backup_bytes_added", &l), 1001.0);
    assert_eq!(one(&samples, "restic_manager_backup_duration_seconds", &l), 12.5);
    let status_of = |l: &[(&str, &str)], status: &str| {
        let mut l = l.to_vec();
        l.push(("status", status));
        one(&samples, "restic_manager_backup_last_status", &l)
    };
    assert_eq!((status_of(&l, "success"), status_of(&l, "failed")), (1.0, 0.0));
    let f = labels(&failed, "failed-host", "hourly");
    let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!((status_of(&f, "success"), status_of(&f, "failed")), (0.0, 1.0));
    assert!(find(&samples, "restic_manager_backup_last_success_timestamp_seconds", &f).is_empty());
    for (agent, host, health) in [
        (&ok, "ok-host", "ok"),
        (&failed, "failed-host", "failed"),
        (&never, "never-host", "never"),
        (&overdue, "overdue-host", "overdue"),
    ] {
        let all = find(
            &samples,
            "restic_manager_backup_health",
            &[("agent_id", &agent.id), ("plan", "hourly"), ("hostname", host)],
        );
        assert_eq!(all.len(), 5, "{host}: one series per health state");
        let current: Vec<&str> = all.iter().filter(|s| s.value == 1.0).map(|s| s.labels["health"].as_str()).collect();
        assert_eq!(current, [health], "{host}");
    }
    assert!(find(&samples, "restic_manager_backup_health", &[("agent_id", &planless.id)]).is_empty());
    assert_eq!(one(&samples, "restic_manager_agents", &[("state", "unknown")]), 6.0);
    assert_eq!(one(&samples, "restic_manager_agents", &[("state", "current")]), 0.0);
    for health in ["ok", "warning", "failed", "overdue", "never"] {
        assert_eq!(one(&samples, "restic_manager_agents_health", &[("health", health)]), 1.0, "{health}");
    }
}

#[test]
fn metrics_can_be_public() {
    let server = Server::builder().env("RM_METRICS_PUBLIC", "true").start();
    let r = server.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    let samples = parse_exposition(&r.text());
    assert_eq!(one(&samples, "restic_manager_agents", &[("state", "stale")]), 0.0);
    assert!(find(&samples, "restic_manager_backup_health", &[]).is_empty());
}

#[test]
fn a_report_may_list_ten_thousand_snapshots_but_bodies_are_bounded() {
    let server = Server::start();
    let agent = enroll(&server, "big-host");
    let t = now();
    let snapshot = |i: usize| {
        json!({"id": format!("{i:064x}"), "short_id": format!("{i:08x}"),
               "time": format!("2026-01-01T00:{:02}:{:02}Z", (i / 60) % 60, i % 60),
               "hostname": "big-host", "paths": ["/srv/data"], "tags": ["rm-plan:big"]})
    };
    let mut big = report(1, "big", "success", t - 60);
    big["snapshots"] = Value::Array((0..10_000).map(snapshot).collect());
    let r = send_reports(&server, &agent, &[big]);
    assert_eq!(r.status, 200, "{}", r.text());
    let list = server.admin("GET", &format!("/api/v1/agents/{}/snapshots", agent.id), None).json();
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 10_000);
    // One more is refused, and so is a body over 8 MiB; neither stores anything.
    let mut over = report(2, "big", "success", t - 30);
    over["snapshots"] = Value::Array((0..10_001).map(snapshot).collect());
    let r = send_reports(&server, &agent, &[over]);
    assert_eq!(r.status, 400, "{}", r.text());
    let mut huge = report(3, "big", "failed", t - 20);
    huge["message"] = json!("x".repeat(9 * 1024 * 1024));
    let r = send_reports(&server, &agent, &[huge]);
    assert_eq!((r.status, r.json()["error"].as_str()), (413, Some("payload_too_large")), "{}", r.text());
    let ops = server.admin("GET", "/api/v1/operations", None).json();
    assert_eq!(ops["operations"].as_array().unwrap().len(), 1, "{ops}");
    // A long message within the body limit is kept, cut to 8 KiB.
    let mut long = report(4, "big", "failed", t - 10);
    long["message"] = json!("y".repeat(100_000));
    assert_eq!(send_reports(&server, &agent, &[long]).status, 200);
    let ops = server.admin("GET", "/api/v1/operations?status=failed", None).json();
    assert_eq!(ops["operations"][0]["message"].as_str().unwrap().len(), 8 * 1024);
}
