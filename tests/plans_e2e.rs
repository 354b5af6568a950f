//! Backup plans with the real binary: plan CRUD and its errors through the API and the `plan` commands, labels from
//! enrollment tokens and `PUT /api/v1/agents/{id}/labels` deciding which agents a selector picks, heartbeat answers
//! that carry the configuration revision (changed by every plan change) and run-now requests, and
//! `GET /api/v1/agents/config`, which hands out decrypted repository secrets over loopback and refuses them over
//! plain HTTP to a non-loopback peer (`secrets_need_tls`) unless a trusted proxy says the client used https.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

const PASSWORD: &str = "plans-pw-Axolotl-31337";

fn enroll_body(token: &str, hostname: &str) -> Value {
    json!({"token": token, "hostname": hostname, "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "e2e"})
}

/// Creates an enrollment token (with `labels`) and enrolls one agent with it; returns (agent id, credential).
fn enroll_with_labels(server: &Server, hostname: &str, labels: Value) -> (String, String) {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1, "labels": labels})));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["labels"], labels, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&enroll_body(&token, hostname)));
    assert_eq!(r.status, 201, "{}", r.text());
    (r.json()["agent_id"].as_str().unwrap().to_string(), r.json()["credential"].as_str().unwrap().to_string())
}

fn heartbeat(server: &Server, credential: &str, extra: Value) -> Value {
    let mut body =
        json!({"hostname": "h", "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "e2e", "seq": 1});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let auth = format!("Bearer {credential}");
    let r = server.send("POST", "/api/v1/agents/heartbeat", &[("Authorization", &auth)], Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn add_repository(server: &Server, name: &str) {
    let body = json!({"name": name, "url": "/srv/restic/e2e", "password": PASSWORD,
                      "env": {"RESTIC_COMPRESSION": "max"}, "auto_init": true});
    let r = server.admin("POST", "/api/v1/repositories", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
}

fn agent_view(server: &Server, id: &str) -> Value {
    let r = server.admin("GET", "/api/v1/agents", None);
    r.json()["agents"].as_array().unwrap().iter().find(|a| a["id"] == id).cloned().unwrap()
}

fn audit_kinds(server: &Server) -> Vec<String> {
    let r = server.admin("GET", "/api/v1/audit?limit=1000", None);
    r.json()["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect()
}

fn error_of(r: &Response) -> (u16, String, String) {
    let body = r.json();
    (r.status, body["error"].as_str().unwrap_or_default().into(), body["message"].as_str().unwrap_or_default().into())
}

#[test]
fn plans_are_created_listed_changed_and_deleted_with_clear_errors() {
    let server = Server::start();
    add_repository(&server, "main");
    let plan = json!({"name": "nightly", "repository": "main", "paths": ["/srv/data", "C:\\Users"],
                      "excludes": ["*.tmp"], "schedule": "0 3 * * *", "tags": ["daily"]});

    // Invalid input: 400 naming the field; nothing stored.
    let bad = |patch: Value| {
        let mut body = plan.clone();
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        error_of(&server.admin("POST", "/api/v1/plans", Some(&body)))
    };
    for (patch, field) in [
        (json!({"name": "Nightly Plan"}), "name"),
        (json!({"repository": "nope"}), "repository"),
        (json!({"paths": []}), "paths"),
        (json!({"paths": ["relative/dir"]}), "paths"),
        (json!({"paths": ["/a\u{1b}[31m"]}), "paths"),
        (json!({"tags": ["a,b"]}), "tags"),
        (json!({"schedule": "61 * * * *"}), "schedule"),
        (json!({"schedule": "@every 5s"}), "schedule"),
        (json!({"timeout": "forever"}), "timeout"),
        (json!({"jitter": "5 parsecs"}), "jitter"),
        (json!({"selector": {"Env": "prod"}}), "selector"),
        (json!({"agents": ["ghost"]}), "agents"),
        (json!({"surprise": true}), "surprise"),
    ] {
        let (status, code, message) = bad(patch.clone());
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{patch}: {message}");
        assert!(message.contains(field), "{patch}: {message:?} does not name {field}");
    }
    assert_eq!(server.admin("GET", "/api/v1/plans", None).json()["plans"], json!([]));

    // Created with defaults: 24h timeout, jitter a twentieth of the interval capped at 10m.
    let r = server.admin("POST", "/api/v1/plans", Some(&plan));
    assert_eq!(r.status, 201, "{}", r.text());
    let view = r.json();
    assert_eq!((view["timeout_secs"].as_u64(), view["jitter_secs"].as_u64()), (Some(86_400), Some(600)), "{view}");
    assert_eq!(view["timezone"], "utc");
    assert_eq!(view["applies_to"], json!([]));
    let r = server.admin("POST", "/api/v1/plans", Some(&plan));
    let (status, code, message) = error_of(&r);
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    assert!(message.contains("already exists"), "{message}");

    let r = server.admin("GET", "/api/v1/plans/nightly", None);
    assert_eq!(r.json()["paths"], json!(["/srv/data", "C:\\Users"]));
    let r = server.admin("GET", "/api/v1/plans/nothing", None);
    assert_eq!(error_of(&r).0, 404);
    assert_eq!(error_of(&r).1, "plan_not_found");

    // PATCH replaces what it names; a new schedule brings its own default jitter.
    let r =
        server.admin("PATCH", "/api/v1/plans/nightly", Some(&json!({"schedule": "@every 1h", "timezone": "local"})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["schedule"].as_str(), r.json()["jitter_secs"].as_u64()), (Some("@every 1h"), Some(180)));
    assert_eq!(r.json()["tags"], json!(["daily"]));
    assert_eq!(error_of(&server.admin("PATCH", "/api/v1/plans/nightly", Some(&json!({})))).0, 400);
    let (status, _, message) =
        error_of(&server.admin("PATCH", "/api/v1/plans/nightly", Some(&json!({"jitter": "2h"}))));
    assert!(status == 400 && message.contains("jitter"), "{message}");
    assert_eq!(
        error_of(&server.admin("PATCH", "/api/v1/plans/nothing", Some(&json!({"tags": []})))).1,
        "plan_not_found"
    );

    // The repository cannot be deleted while the plan uses it.
    let r = server.admin("DELETE", "/api/v1/repositories/main", None);
    let (status, code, message) = error_of(&r);
    assert_eq!((status, code.as_str()), (409, "repository_in_use"), "{message}");
    assert!(message.contains("nightly"), "{message}");
    assert_eq!(r.json()["plans"], json!(["nightly"]));

    let r = server.admin("DELETE", "/api/v1/plans/nightly", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(error_of(&server.admin("DELETE", "/api/v1/plans/nightly", None)).1, "plan_not_found");
    assert_eq!(server.admin("DELETE", "/api/v1/repositories/main", None).status, 200);
    let kinds = audit_kinds(&server);
    for kind in ["plan_created", "plan_updated", "plan_deleted"] {
        assert_eq!(kinds.iter().filter(|k| *k == kind).count(), 1, "{kind} in {kinds:?}");
    }
}

#[test]
fn labels_select_agents_and_heartbeats_carry_the_revision_and_run_now() {
    let server = Server::start();
    add_repository(&server, "main");
    let (prod, prod_cred) = enroll_with_labels(&server, "web-1", json!({"env": "prod", "team": "web"}));
    let (dev, dev_cred) = enroll_with_labels(&server, "dev-1", json!({}));
    assert_eq!(agent_view(&server, &prod)["labels"], json!({"env": "prod", "team": "web"}));
    assert_eq!(agent_view(&server, &dev)["labels"], json!({}));
    let r = server.admin("GET", "/api/v1/tokens", None);
    assert!(
        r.json()["tokens"].as_array().unwrap().iter().any(|t| t["labels"] == json!({"env": "prod", "team": "web"}))
    );

    let first = heartbeat(&server, &prod_cred, json!({}));
    let revision = first["config_revision"].as_u64().expect("heartbeat answers carry the revision");
    assert!(first.get("run_now").is_none(), "{first}");

    let plan = json!({"name": "web", "repository": "main", "paths": ["/var/www"], "schedule": "@daily",
                      "selector": {"env": "prod"}});
    let r = server.admin("POST", "/api/v1/plans", Some(&plan));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["applies_to"], json!([prod]));
    let after_create = heartbeat(&server, &prod_cred, json!({}))["config_revision"].as_u64().unwrap();
    assert!(after_create > revision, "{after_create} > {revision}");
    let r = server.admin("PATCH", "/api/v1/plans/web", Some(&json!({"excludes": ["*.log"]})));
    assert_eq!(r.status, 200, "{}", r.text());
    let after_patch = heartbeat(&server, &dev_cred, json!({}))["config_revision"].as_u64().unwrap();
    assert!(after_patch > after_create, "{after_patch} > {after_create}");

    // Labels through the API: validated, 404 for an unknown agent, and they change what the selector picks.
    let put = |id: &str, body: Value| server.admin("PUT", &format!("/api/v1/agents/{id}/labels"), Some(&body));
    assert_eq!(error_of(&put("nobody", json!({"labels": {"env": "prod"}}))).0, 404);
    let (status, _, message) = error_of(&put(&dev, json!({"labels": {"Env!": "prod"}})));
    assert!(status == 400 && message.contains("label key"), "{message}");
    let (status, _, message) = error_of(&put(&dev, json!({"labels": {"env": "a\nb"}})));
    assert!(status == 400 && message.contains("value"), "{message}");
    let r = put(&dev, json!({"labels": {"env": "prod"}}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["labels"], json!({"env": "prod"}));
    assert_eq!(agent_view(&server, &dev)["labels"], json!({"env": "prod"}));
    let after_labels = heartbeat(&server, &dev_cred, json!({}))["config_revision"].as_u64().unwrap();
    assert!(after_labels > after_patch, "{after_labels} > {after_patch}");
    let mut applies: Vec<String> = server.admin("GET", "/api/v1/plans/web", None).json()["applies_to"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    applies.sort();
    let mut both = vec![prod.clone(), dev.clone()];
    both.sort();
    assert_eq!(applies, both);
    assert!(put(&dev, json!({"labels": {}})).status == 200);
    assert!(audit_kinds(&server).iter().any(|k| k == "agent_labels"));

    // Heartbeats store what the agent says about restic and the revision it applied.
    let restic = json!({"version": "0.14.0", "path": "/usr/bin/restic"});
    heartbeat(&server, &prod_cred, json!({"restic": restic, "config_revision": after_labels}));
    assert_eq!(
        agent_view(&server, &prod)["restic"],
        json!({"version": "0.14.0", "path": "/usr/bin/restic", "error": null})
    );
    heartbeat(&server, &prod_cred, json!({}));
    assert_eq!(agent_view(&server, &prod)["restic"]["version"], "0.14.0", "an absent restic leaves what was stored");

    // Run now: 202 with an operation id that rides every heartbeat answer while it is queued.
    let run = |plan: &str, agent: &str| {
        server.admin("POST", &format!("/api/v1/plans/{plan}/run"), Some(&json!({"agent": agent})))
    };
    let r = run("web", &prod);
    assert_eq!(r.status, 202, "{}", r.text());
    let op = r.json()["operation_id"].as_str().unwrap().to_string();
    assert!(
        op.len() == 35
            && op.starts_with("op_")
            && op[3..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{op}"
    );
    for _ in 0..2 {
        let answer = heartbeat(&server, &prod_cred, json!({}));
        assert_eq!(answer["run_now"], json!([{"operation_id": op, "plan": "web"}]), "{answer}");
    }
    assert!(heartbeat(&server, &dev_cred, json!({})).get("run_now").is_none(), "only the agent's own runs");
    let (status, code, message) = error_of(&run("web", &dev));
    assert_eq!((status, code.as_str()), (409, "plan_not_assigned"), "{message}");
    assert_eq!(error_of(&run("nothing", &prod)).1, "plan_not_found");
    let (status, code, _) = error_of(&run("web", "nobody"));
    assert_eq!((status, code.as_str()), (404, "not_found"));
    assert_eq!(error_of(&server.admin("POST", "/api/v1/plans/web/run", Some(&json!({"agent": prod, "x": 1})))).0, 400);
    assert!(audit_kinds(&server).iter().any(|k| k == "plan_run_requested"));
}

fn config(addr: SocketAddr, credential: &str, extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {credential}");
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    http_request(addr, "GET", "/api/v1/agents/config", &headers).unwrap()
}

#[test]
fn agent_config_over_loopback_carries_plans_and_decrypted_secrets() {
    let server = Server::builder().env("RM_LOG", "debug").start();
    add_repository(&server, "main");
    add_repository(&server, "unused");
    let (agent, credential) = enroll_with_labels(&server, "db-1", json!({"role": "db"}));
    let (_, other) = enroll_with_labels(&server, "other-1", json!({}));
    let plan = json!({"name": "db", "repository": "main", "paths": ["/var/lib/db"], "schedule": "*/5 * * * *",
                      "selector": {"role": "db"}, "tags": ["db"], "one_file_system": true, "timeout": "2h",
                      "jitter": "30s"});
    assert_eq!(server.admin("POST", "/api/v1/plans", Some(&plan)).status, 201);
    let explicit = json!({"name": "etc", "repository": "main", "paths": ["/etc"], "schedule": "@daily",
                          "agents": [agent]});
    assert_eq!(server.admin("POST", "/api/v1/plans", Some(&explicit)).status, 201);

    let r = config(server.addr(), &credential, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let revision = heartbeat(&server, &credential, json!({}))["config_revision"].clone();
    assert_eq!(body["revision"], revision);
    let names: Vec<&str> = body["plans"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["db", "etc"]);
    let db = &body["plans"][0];
    assert_eq!((db["timeout_secs"].as_u64(), db["jitter_secs"].as_u64()), (Some(7200), Some(30)));
    assert_eq!((db["one_file_system"].as_bool(), db["tags"].clone()), (Some(true), json!(["db"])));
    let repos = body["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 1, "only the repositories its plans use: {body}");
    assert_eq!(repos[0]["password"], PASSWORD);
    assert_eq!(repos[0]["env"], json!({"RESTIC_COMPRESSION": "max"}));
    assert_eq!(repos[0]["auto_init"], true);

    // Another agent gets none of it; a missing or wrong credential gets nothing.
    let r = config(server.addr(), &other, &[]);
    assert_eq!((r.json()["plans"].clone(), r.json()["repositories"].clone()), (json!([]), json!([])));
    let r = http_request(server.addr(), "GET", "/api/v1/agents/config", &[]).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(config(server.addr(), "rmagt_x_y", &[]).status, 401);
    // A loopback peer that forwards for someone else is a proxy nobody declared: no secrets.
    let r = config(server.addr(), &credential, &[("X-Forwarded-Proto", "https")]);
    assert_eq!(error_of(&r).1, "secrets_need_tls", "{}", r.text());
    assert!(!server.log().contains(PASSWORD), "the password is never logged");
}

/// An IPv4 address of this machine that is not loopback (through getifaddrs).
fn non_loopback_ipv4() -> Option<Ipv4Addr> {
    let mut found = None;
    // SAFETY: getifaddrs fills a list we only read and then free with freeifaddrs; every pointer is checked.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
            if up && !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_unspecified() {
                    found = Some(ip);
                    break;
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

#[test]
fn agent_config_is_refused_over_plain_http_to_a_non_loopback_peer() {
    let Some(ip) = non_loopback_ipv4() else {
        skip("this machine has no non-loopback IPv4 address to reach the server on");
        return;
    };
    // The server listens everywhere and trusts the machine's own address as a proxy, so one server shows both: the
    // address itself (plain HTTP, no proxy word) is refused; with the trusted proxy's https it is not.
    let server = Server::builder()
        .listen_on(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        .env("RM_TRUSTED_PROXIES", &ip.to_string())
        .start();
    add_repository(&server, "main");
    let (agent, credential) = enroll_with_labels(&server, "far-1", json!({}));
    let plan = json!({"name": "far", "repository": "main", "paths": ["/srv"], "schedule": "@daily", "agents": [agent]});
    assert_eq!(server.admin("POST", "/api/v1/plans", Some(&plan)).status, 201);
    let remote = SocketAddr::new(IpAddr::V4(ip), server.port());

    for headers in [&[][..], &[("X-Forwarded-Proto", "http")][..], &[("Forwarded", "for=192.0.2.77;proto=http")][..]] {
        let r = config(remote, &credential, headers);
        let (status, code, message) = error_of(&r);
        assert_eq!((status, code.as_str()), (403, "secrets_need_tls"), "{headers:?}: {}", r.text());
        assert!(message.contains("TLS") && message.contains("--trusted-proxies"), "{message}");
        assert!(!r.text().contains(PASSWORD));
    }
    // Heartbeats still work over the same plain connection (they carry no secrets).
    let auth = format!("Bearer {credential}");
    let hb = json!({"hostname": "far-1", "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "e2e"});
    let r = http_request_with_body(
        remote,
        "POST",
        "/api/v1/agents/heartbeat",
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        &serde_json::to_vec(&hb).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The trusted proxy says its client used https.
    for header in [("X-Forwarded-Proto", "https"), ("Forwarded", "for=192.0.2.77;proto=https")] {
        let r = config(remote, &credential, &[header]);
        assert_eq!(r.status, 200, "{header:?}: {}", r.text());
        assert_eq!(r.json()["repositories"][0]["password"], PASSWORD);
    }
    assert!(server.log().contains("refused to send repository secrets over plain HTTP"));
    assert!(!server.log().contains(PASSWORD));
}

/// Runs `restic-manager-server ARGS…` on `data_dir`; returns (success, stdout, stderr).
fn cli(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = command(SERVER_BIN);
    cmd.args(args).env("RM_DATA_DIR", data_dir);
    let out = run_bounded(cmd, Duration::from_secs(15));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn plan_token_and_label_commands_work_beside_the_running_server() {
    let server = Server::start();
    let data = server.data_dir().to_path_buf();
    add_repository(&server, "main");

    // token create --label: the labels go to the agents it enrolls.
    let (ok, token, err) = cli(&data, &["token", "create", "--label", "env=prod", "--label", "site=berlin"]);
    assert!(ok, "{err}");
    assert!(err.contains("labels=env=prod,site=berlin"), "{err}");
    let (ok, _, err) = cli(&data, &["token", "create", "--label", "Env=prod"]);
    assert!(!ok && err.contains("label key"), "{err}");
    let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&enroll_body(token.trim(), "cli-1")));
    assert_eq!(r.status, 201, "{}", r.text());
    let agent = r.json()["agent_id"].as_str().unwrap().to_string();
    assert_eq!(agent_view(&server, &agent)["labels"], json!({"env": "prod", "site": "berlin"}));

    // plan add: errors first, then a plan selected by label.
    let (ok, _, err) = cli(&data, &["plan", "add", "p", "--repo", "nope", "--path", "/srv", "--schedule", "@daily"]);
    assert!(!ok && err.contains("no repository named \"nope\""), "{err}");
    let (ok, _, err) = cli(&data, &["plan", "add", "p", "--repo", "main", "--path", "srv", "--schedule", "@daily"]);
    assert!(!ok && err.contains("paths"), "{err}");
    let (ok, _, err) = cli(&data, &["plan", "add", "p", "--repo", "main", "--path", "/srv", "--schedule", "@often"]);
    assert!(!ok && err.contains("schedule"), "{err}");
    let (ok, out, err) = cli(
        &data,
        &[
            "plan",
            "add",
            "site",
            "--repo",
            "main",
            "--path",
            "/srv/www",
            "--path",
            "/etc",
            "--exclude",
            "*.cache",
            "--schedule",
            "30 2 * * *",
            "--timezone",
            "local",
            "--tag",
            "web",
            "--one-file-system",
            "--exclude-caches",
            "--selector",
            "site=berlin",
            "--timeout",
            "3h",
            "--jitter",
            "2m",
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("site") && out.contains(&agent), "{out}");
    let r = server.admin("GET", "/api/v1/plans/site", None);
    let view = r.json();
    assert_eq!(view["paths"], json!(["/srv/www", "/etc"]));
    assert_eq!(
        (view["timezone"].as_str(), view["timeout_secs"].as_u64(), view["jitter_secs"].as_u64()),
        (Some("local"), Some(10_800), Some(120))
    );
    assert_eq!((view["one_file_system"].as_bool(), view["exclude_caches"].as_bool()), (Some(true), Some(true)));
    assert_eq!(view["applies_to"], json!([agent]));
    let (ok, _, err) = cli(&data, &["plan", "add", "site", "--repo", "main", "--path", "/srv", "--schedule", "@daily"]);
    assert!(!ok && err.contains("already exists"), "{err}");

    let (ok, out, _) = cli(&data, &["plan", "list", "--json"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["plans"][0]["name"], "site");
    let (ok, out, _) = cli(&data, &["plan", "list"]);
    assert!(ok && out.starts_with("site\t"), "{out}");

    // plan run prints the operation id, which the agent's heartbeat answer then carries.
    let (ok, out, err) = cli(&data, &["plan", "run", "site", "--agent", &agent]);
    assert!(ok, "{err}");
    let op = out.trim().to_string();
    assert!(op.starts_with("op_") && op.len() == 35, "{op}");
    let (ok, _, err) = cli(&data, &["plan", "run", "site", "--agent", "nobody"]);
    assert!(!ok && err.contains("no agent"), "{err}");
    let (ok, _, err) = cli(&data, &["plan", "run", "none", "--agent", &agent]);
    assert!(!ok && err.contains("was not found"), "{err}");

    // agents label replaces the labels; the plan no longer applies, so a run is refused.
    let (ok, out, err) = cli(&data, &["agents", "label", &agent, "site=paris"]);
    assert!(ok && out.contains("site=paris"), "{out}{err}");
    assert_eq!(agent_view(&server, &agent)["labels"], json!({"site": "paris"}));
    let (ok, _, err) = cli(&data, &["plan", "run", "site", "--agent", &agent]);
    assert!(!ok && err.contains("does not apply"), "{err}");
    let (ok, _, err) = cli(&data, &["agents", "label", "nobody", "a=b"]);
    assert!(!ok && err.contains("no agent"), "{err}");
    let (ok, _, _) = cli(&data, &["agents", "label", &agent]);
    assert!(ok);
    assert_eq!(agent_view(&server, &agent)["labels"], json!({}));

    // The repository is in use; plan rm frees it.
    let (ok, _, err) = cli(&data, &["repo", "rm", "main"]);
    assert!(!ok && err.contains("used by the plans site"), "{err}");
    let (ok, out, err) = cli(&data, &["plan", "rm", "site"]);
    assert!(ok && out.contains("deleted site"), "{out}{err}");
    let (ok, _, err) = cli(&data, &["plan", "rm", "site"]);
    assert!(!ok && err.contains("no plan"), "{err}");
    let (ok, _, err) = cli(&data, &["repo", "rm", "main"]);
    assert!(ok, "{err}");
    let r = server.admin("GET", "/api/v1/audit?limit=1000", None);
    let cli_plan_events = r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source"] == "cli" && e["kind"].as_str().unwrap().starts_with("plan_"))
        .count();
    assert_eq!(cli_plan_events, 3, "created, run requested, deleted: {}", r.text());
}
