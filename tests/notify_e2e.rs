//! Notifications with the real binary (issue 19): a webhook receiver and an SMTP server (PyPI's aiosmtpd) on
//! loopback started by the test; agents that report runs over HTTP with their credentials, and one real agent whose
//! restic backup fails on a wrong repository password and then recovers. Short `--notify-tick` and retry backoff so
//! the whole file runs in seconds.

use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

const PUBLIC: &str = "https://rm.example.test";

fn server() -> Server {
    Server::builder()
        .env("RM_NOTIFY_TICK", "200ms")
        .env("RM_NOTIFY_RETRY_BASE", "300ms")
        .env("RM_NOTIFY_RETRY_MAX", "1s")
        .env("RM_HEARTBEAT_INTERVAL", "1s")
        .env("RM_PUBLIC_URL", PUBLIC)
        .start()
}

fn created(r: Response) -> Value {
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

struct HttpAgent {
    id: String,
    auth: String,
}

/// Enrolls a host over HTTP with a token carrying `labels`.
fn enroll(server: &Server, hostname: &str, labels: Value) -> HttpAgent {
    let token = created(server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1, "labels": labels}))));
    let body = json!({"token": token["token"], "hostname": hostname, "os": "linux", "arch": "amd64",
                      "version": "1.2.3", "commit": "e2e"});
    let v = created(server.send("POST", "/api/v1/agents/enroll", &[], Some(&body)));
    HttpAgent {
        id: v["agent_id"].as_str().unwrap().into(),
        auth: format!("Bearer {}", v["credential"].as_str().unwrap()),
    }
}

/// A finished backup of plan `home`, reported as the agent would.
fn report(server: &Server, agent: &HttpAgent, n: u32, status: &str, finished_at: i64) {
    let mut r = json!({
        "id": format!("op_{n:032x}"), "plan": "home", "kind": "backup", "trigger": "schedule", "status": status,
        "started_at": finished_at - 5, "finished_at": finished_at, "duration_ms": 5000,
        "exit_code": if status == "success" { 0 } else { 1 },
    });
    if status == "failed" {
        r["message"] = json!("Fatal: wrong password or no key found");
        r["reason"] = json!("wrong_password");
    } else {
        r["summary"] = json!({"files_new": 1, "snapshot_id": format!("{n:064x}")});
    }
    let body = json!({ "reports": [r] });
    let answer = server.send("POST", "/api/v1/agents/reports", &[("Authorization", &agent.auth)], Some(&body));
    assert_eq!(answer.status, 200, "{}", answer.text());
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn notifications(server: &Server) -> Vec<Value> {
    let r = server.admin("GET", "/api/v1/notifications", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["notifications"].as_array().unwrap().clone()
}

/// The messages (not test samples) a sink accepted.
fn events(sink: &WebhookSink) -> Vec<Received> {
    sink.accepted().into_iter().filter(|r| r.header("x-restic-manager-event").as_deref() != Some("test")).collect()
}

/// Two hosts with plan `home` on repository `main`, `env=prod` and `env=dev`.
fn fleet(server: &Server) -> (HttpAgent, HttpAgent) {
    let prod = enroll(server, "web-prod", json!({"env": "prod"}));
    let dev = enroll(server, "web-dev", json!({"env": "dev"}));
    created(server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "main", "url": "/srv/restic", "password": "repo-password-1"})),
    ));
    created(server.admin(
        "POST",
        "/api/v1/plans",
        Some(&json!({"name": "home", "repository": "main", "paths": ["/home"], "schedule": "@every 24h",
                     "agents": [prod.id, dev.id]})),
    ));
    (prod, dev)
}

#[test]
fn a_webhook_gets_each_transition_once_through_500s_and_label_rules_route_prod_not_dev() {
    let server = server();
    let hook = WebhookSink::start();
    let (prod, dev) = fleet(&server);
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&json!({"name": "oncall", "kind": "webhook", "url": hook.url("/hook/secret-path"),
                     "token": "hook-token-Quokka"})),
    ));
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&json!({"name": "chat", "kind": "slack", "url": hook.url("/slack")})),
    ));
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&json!({"name": "push", "kind": "ntfy", "url": hook.url("/topic")})),
    ));
    let closed = ClosedPort::new();
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&json!({"name": "nowhere", "kind": "webhook", "url": format!("http://{}/", closed.addr)})),
    ));
    let listed = server.admin("GET", "/api/v1/channels", None).text();
    assert!(!listed.contains("secret-path") && !listed.contains("Quokka"), "{listed}");

    // The test action reports the receiver's answer, in each body format.
    let t = server.admin("POST", "/api/v1/channels/oncall/test", None);
    assert_eq!(t.status, 200, "{}", t.text());
    assert_eq!((t.json()["ok"].as_bool(), t.json()["answer"].as_str()), (Some(true), Some("HTTP 200 answer0")));
    let sample = hook.received().pop().unwrap();
    assert_eq!(sample.json()["event"], "test");
    assert_eq!(sample.header("authorization").as_deref(), Some("Bearer hook-token-Quokka"));
    assert!(server.admin("POST", "/api/v1/channels/chat/test", None).json()["ok"].as_bool().unwrap());
    let slack = hook.received().pop().unwrap();
    assert!(slack.head.starts_with("POST /slack "), "{}", slack.head);
    assert!(slack.json()["text"].as_str().unwrap().starts_with("*restic-manager test notification*"));
    assert!(server.admin("POST", "/api/v1/channels/push/test", None).json()["ok"].as_bool().unwrap());
    let ntfy = hook.received().pop().unwrap();
    assert_eq!(ntfy.header("title").as_deref(), Some("restic-manager test notification"));
    assert!(String::from_utf8_lossy(&ntfy.body).contains("this channel works"));
    hook.answer(&[500]);
    let t = server.admin("POST", "/api/v1/channels/push/test", None).json();
    assert_eq!((t["ok"].as_bool(), t["answer"].as_str()), (Some(false), Some("HTTP 500 answer0")));
    let t = server.admin("POST", "/api/v1/channels/nowhere/test", None).json();
    assert_eq!(t["ok"], false);
    assert!(t["answer"].as_str().unwrap().starts_with("HTTP request failed"), "{t}");
    let before = hook.received().len();

    created(server.admin(
        "POST",
        "/api/v1/rules",
        Some(&json!({"name": "prod-oncall", "channel": "oncall", "labels": {"env": "prod"}})),
    ));
    // The receiver fails three times, then takes it.
    hook.answer(&[500, 500, 500]);
    let failed_at = now() - 1;
    report(&server, &prod, 1, "failed", failed_at);
    report(&server, &dev, 2, "failed", failed_at);
    let got = poll(Duration::from_secs(30), || (events(&hook).len() == 1).then_some(()));
    assert!(got.is_some(), "not delivered: {:?}\n{}", hook.received(), server.log_tail());
    std::thread::sleep(Duration::from_secs(2)); // ten ticks and several retry intervals
    assert_eq!(hook.received().len() - before, 4, "three 500s, then one 200, nothing after");
    let message = events(&hook).remove(0);
    let body = message.json();
    assert_eq!(body["event"], "backup_failed");
    assert_eq!(body["state"], "failed");
    assert_eq!(body["previous_state"], "never");
    assert_eq!(body["host"]["hostname"], "web-prod");
    assert_eq!(body["host"]["id"], prod.id.as_str());
    assert_eq!(body["host"]["labels"], json!({"env": "prod"}));
    assert_eq!(body["plan"], "home");
    assert_eq!(body["repository"], "main");
    assert_eq!(body["since"], failed_at);
    assert_eq!(body["message"], "Fatal: wrong password or no key found");
    assert_eq!(body["link"], format!("{PUBLIC}/ui/hosts/{}", prod.id));
    assert!(body["text"].as_str().unwrap().contains("Host: web-prod"), "{body}");
    assert_eq!(message.header("x-restic-manager-notification"), Some(body["id"].to_string()));

    // One message, for prod only; its four attempts with their answers.
    let list = notifications(&server);
    assert_eq!(list.len(), 1, "dev's failure matched no rule: {list:?}");
    assert_eq!(list[0]["status"], "delivered");
    let answers: Vec<&str> =
        list[0]["attempts"].as_array().unwrap().iter().map(|a| a["answer"].as_str().unwrap()).collect();
    assert_eq!(answers, ["HTTP 500 answer0", "HTTP 500 answer0", "HTTP 500 answer0", "HTTP 200 answer0"]);

    // Failing again changes nothing; recovering is one message; dev's recovery goes nowhere.
    report(&server, &prod, 3, "failed", now());
    std::thread::sleep(Duration::from_secs(1));
    report(&server, &prod, 4, "success", now());
    report(&server, &dev, 5, "success", now());
    let got = poll(Duration::from_secs(30), || (events(&hook).len() == 2).then_some(()));
    assert!(got.is_some(), "recovery not delivered: {:?}", notifications(&server));
    std::thread::sleep(Duration::from_secs(2));
    let all = events(&hook);
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].json()["event"], "backup_recovered");
    assert_eq!(all[1].json()["previous_state"], "failed");
    assert_eq!(notifications(&server).len(), 2);

    // The changes were audited, without secrets.
    let audit = server.admin("GET", "/api/v1/audit", None).text();
    assert!(audit.contains("notify_channel") && audit.contains("notify_rule") && audit.contains("notify_channel_test"));
    assert!(!audit.contains("secret-path") && !audit.contains("Quokka"), "{audit}");
}

#[test]
fn a_killed_server_delivers_its_undelivered_message_after_restart_once() {
    let mut server = server();
    let hook = WebhookSink::start();
    let (prod, _dev) = fleet(&server);
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&json!({"name": "oncall", "kind": "webhook", "url": hook.url("/")})),
    ));
    created(server.admin("POST", "/api/v1/rules", Some(&json!({"name": "all", "channel": "oncall"}))));
    hook.answer(&[503; 10_000]);
    report(&server, &prod, 1, "failed", now());
    let tried = poll(Duration::from_secs(30), || (!hook.received().is_empty()).then_some(()));
    assert!(tried.is_some(), "never attempted: {}", server.log_tail());

    server.restart(); // SIGKILL, then a new process on the same data dir
    hook.clear_answers();
    let got = poll(Duration::from_secs(30), || (hook.accepted().len() == 1).then_some(()));
    assert!(got.is_some(), "not delivered after the restart: {:?}\n{}", notifications(&server), server.log_tail());
    let list = notifications(&server);
    assert_eq!(list.len(), 1, "the restart did not queue the transition again: {list:?}");
    assert_eq!(list[0]["status"], "delivered");
    assert!(list[0]["attempts"].as_array().unwrap().len() >= 2);

    // Another restart sends nothing: the message is delivered, the state already notified.
    let received = hook.received().len();
    server.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hook.received().len(), received, "{:?}", hook.received());
    assert_eq!(notifications(&server).len(), 1);
}

#[test]
fn smtp_gets_one_mail_when_a_real_backup_fails_on_a_wrong_password_and_one_when_it_recovers() {
    let Some(restic) = restic_binary() else { return };
    let Some(smtp) = SmtpSink::start() else { return };
    let server = server();
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&json!({"name": "mail", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": smtp.port(),
                     "smtp_tls": "none", "from": "restic-manager@example.test", "to": ["ops@example.test"]})),
    ));
    let t = server.admin("POST", "/api/v1/channels/mail/test", None);
    assert_eq!(t.status, 200, "{}", t.text());
    assert_eq!(t.json()["ok"], true, "{}\n{}", t.text(), smtp.log());
    assert!(t.json()["answer"].as_str().unwrap().starts_with("SMTP 250"), "{}", t.text());
    assert_eq!(smtp.messages().len(), 1);
    created(server.admin(
        "POST",
        "/api/v1/rules",
        Some(&json!({"name": "backups", "channel": "mail", "events": ["backup_failed", "backup_recovered"]})),
    ));

    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("file.txt"), "hello notifications\n").unwrap();
    let repo_dir = work.path().join("repo");
    Repo::new(&restic, &repo_dir.display().to_string(), "the-real-password").init();
    created(server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "vault", "url": repo_dir.display().to_string(), "password": "not-the-password"})),
    ));
    let token = created(server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1}))));
    let mut agent = Agent::enroll(&server.url(""), token["token"].as_str().unwrap());
    agent.env("RM_RESTIC", &restic.display().to_string());
    agent.start();
    created(server.admin(
        "POST",
        "/api/v1/plans",
        Some(&json!({"name": "nightly", "repository": "vault", "paths": [src.display().to_string()],
                     "schedule": "@every 24h", "agents": [agent.id]})),
    ));
    let run = |server: &Server| {
        let r = server.admin("POST", "/api/v1/plans/nightly/run", Some(&json!({"agent": agent.id})));
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["operation_id"].as_str().unwrap().to_string()
    };
    let final_status = |server: &Server, id: &str| {
        let found = poll(Duration::from_secs(90), || {
            let ops = server.admin("GET", &format!("/api/v1/operations?agent={}", agent.id), None).json();
            ops["operations"].as_array().unwrap().iter().find(|o| o["id"] == id && o["finished_at"].is_i64()).cloned()
        });
        found.unwrap_or_else(|| panic!("operation {id} did not finish\n{}", agent.log()))
    };

    let failed = final_status(&server, &run(&server));
    assert_eq!((failed["status"].as_str(), failed["reason"].as_str()), (Some("failed"), Some("wrong_password")));
    let got = poll(Duration::from_secs(30), || (smtp.messages().len() == 2).then_some(()));
    assert!(got.is_some(), "no failure mail: {:?}\n{}", notifications(&server), smtp.log());
    let mail = unfold(&smtp.messages()[1]);
    assert!(mail.contains("Subject: Backup failed: "), "{mail}");
    assert!(mail.contains("To: ops@example.test"), "{mail}");
    assert!(mail.contains("Plan: nightly") && mail.contains("Repository: vault"), "{mail}");
    assert!(mail.contains("State: failed (was never)") && mail.contains("Since: "), "{mail}");
    assert!(mail.contains("password"), "restic's message is in the mail: {mail}");
    assert!(mail.contains(&format!("Link: {PUBLIC}/ui/hosts/{}", agent.id)), "{mail}");

    let r = server.admin("PATCH", "/api/v1/repositories/vault", Some(&json!({"password": "the-real-password"})));
    assert_eq!(r.status, 200, "{}", r.text());
    let ok = final_status(&server, &run(&server));
    assert_eq!(ok["status"], "success", "{ok}");
    let got = poll(Duration::from_secs(30), || (smtp.messages().len() == 3).then_some(()));
    assert!(got.is_some(), "no recovery mail: {:?}", notifications(&server));
    let mail = unfold(&smtp.messages()[2]);
    assert!(mail.contains("Subject: Backup ok again: ") && mail.contains("State: ok (was failed)"), "{mail}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(smtp.messages().len(), 3, "exactly one mail per transition");
    let list = notifications(&server);
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|n| n["status"] == "delivered"
        && n["attempts"][0]["answer"].as_str().unwrap().starts_with("SMTP 250")), "{list:?}");
    agent.stop();
}

/// Undoes quoted-printable soft line breaks and header folding, so the test reads the text as sent.
fn unfold(mail: &str) -> String {
    mail.replace("=\r\n", "").replace("=\n", "").replace("\r\n ", " ").replace("\n ", " ").replace("=3D", "=")
}

#[test]
fn smtp_authenticates_and_never_falls_back_to_plain_text_when_starttls_is_asked() {
    let Some(smtp) = SmtpSink::with_auth("rm-mailer", "smtp-Pass-Wombat") else { return };
    let server = server();
    let channel = |name: &str, tls: &str, user: &str, password: &str| {
        json!({"name": name, "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": smtp.port(), "smtp_tls": tls,
               "username": user, "password": password, "from": "rm@example.test", "to": ["ops@example.test"]})
    };
    created(server.admin("POST", "/api/v1/channels", Some(&channel("good", "none", "rm-mailer", "smtp-Pass-Wombat"))));
    created(server.admin("POST", "/api/v1/channels", Some(&channel("bad", "none", "rm-mailer", "wrong-password"))));
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&channel("tls", "starttls", "rm-mailer", "smtp-Pass-Wombat")),
    ));
    let listed = server.admin("GET", "/api/v1/channels", None).text();
    assert!(!listed.contains("Wombat"), "{listed}");

    let t = server.admin("POST", "/api/v1/channels/good/test", None).json();
    assert_eq!(t["ok"], true, "{t}\n{}", smtp.log());
    assert!(t["answer"].as_str().unwrap().starts_with("SMTP 250"), "{t}");
    assert_eq!(smtp.messages().len(), 1);
    let t = server.admin("POST", "/api/v1/channels/bad/test", None).json();
    assert_eq!(t["ok"], false, "{t}");
    assert!(t["answer"].as_str().unwrap().contains("535"), "the server's refusal is reported: {t}");
    // This server offers no STARTTLS: the message is not sent in clear instead.
    let t = server.admin("POST", "/api/v1/channels/tls/test", None).json();
    assert_eq!(t["ok"], false, "{t}");
    assert!(t["answer"].as_str().unwrap().to_lowercase().contains("tls"), "refused for want of TLS: {t}");
    assert_eq!(smtp.messages().len(), 1, "nothing sent without the TLS that was asked for");
}

fn cli(server: &Server, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = command(SERVER_BIN);
    cmd.args(args)
        .env("RM_DATA_DIR", server.data_dir())
        .env("RM_BUNDLED_ASSETS_DIR", server.bundled_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn the_channel_rule_and_notifications_commands_match_the_api() {
    let server = server();
    let hook = WebhookSink::start();
    let spec = json!({"name": "ops", "kind": "webhook", "url": hook.url("/cli-secret"), "token": "cli-Token-Numbat"});
    let (ok, out, err) = cli(&server, &["channel", "add"], Some(&spec.to_string()));
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&server, &["channel", "add"], Some(&spec.to_string()));
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(&server, &["channel", "add"], Some(r#"{"name":"x","kind":"webhook"}"#));
    assert!(!ok && err.contains("url is required"), "{err}");
    let (ok, out, _) = cli(&server, &["channel", "list"], None);
    assert!(ok && out.contains("ops\twebhook\thttp://127.0.0.1:") && out.contains("url,token"), "{out}");
    assert!(!out.contains("cli-secret") && !out.contains("Numbat"), "{out}");
    let api = server.admin("GET", "/api/v1/channels", None).json();
    assert_eq!(api["channels"][0]["name"], "ops");

    let (ok, out, err) = cli(
        &server,
        &[
            "rule",
            "add",
            "prod",
            "--channel",
            "ops",
            "--event",
            "backup_failed,backup_recovered",
            "--label",
            "env=prod",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&server, &["rule", "add", "x", "--channel", "missing"], None);
    assert!(!ok && err.contains("no channel named"), "{err}");
    let rules = server.admin("GET", "/api/v1/rules", None).json();
    assert_eq!(rules["rules"][0]["events"], json!(["backup_failed", "backup_recovered"]));
    assert_eq!(rules["rules"][0]["labels"], json!({"env": "prod"}));

    let (ok, out, err) = cli(&server, &["channel", "test", "ops"], None);
    assert!(ok && out.starts_with("HTTP 200"), "{out}{err}");
    let sample = hook.received().pop().unwrap();
    assert_eq!(sample.header("authorization").as_deref(), Some("Bearer cli-Token-Numbat"));
    hook.answer(&[500]);
    let (ok, out, _) = cli(&server, &["channel", "test", "ops"], None);
    assert!(!ok && out.starts_with("HTTP 500"), "{out}");

    // What the running server queues, the command shows.
    let (prod, _dev) = fleet(&server);
    report(&server, &prod, 1, "failed", now());
    let got = poll(Duration::from_secs(30), || (events(&hook).len() == 1).then_some(()));
    assert!(got.is_some(), "{}", server.log_tail());
    let (ok, out, _) = cli(&server, &["notifications", "--status", "delivered"], None);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert!(ok && listed["notifications"].as_array().unwrap().len() == 1, "{out}");
    assert_eq!(listed["notifications"][0]["event"], "backup_failed");

    let (ok, _, _) = cli(&server, &["rule", "rm", "prod"], None);
    assert!(ok);
    let (ok, _, _) = cli(&server, &["channel", "rm", "ops"], None);
    assert!(ok);
    assert_eq!(server.admin("GET", "/api/v1/channels", None).json()["channels"], json!([]));
    let audit = server.admin("GET", "/api/v1/audit", None).text();
    assert!(audit.contains("\"source\":\"cli\"") || audit.contains("cli"), "{audit}");
    assert!(!audit.contains("Numbat") && !audit.contains("cli-secret"), "{audit}");
}

#[test]
fn a_stale_agent_is_told_once_and_its_return_once_and_warnings_wait_for_the_digest() {
    let server = Server::builder()
        .env("RM_NOTIFY_TICK", "200ms")
        .env("RM_NOTIFY_RETRY_BASE", "300ms")
        .env("RM_STALE_AFTER", "2s")
        .env("RM_NOTIFY_DIGEST_EVERY", "3s")
        .start();
    let hook = WebhookSink::start();
    let (prod, dev) = fleet(&server);
    created(server.admin(
        "POST",
        "/api/v1/channels",
        Some(&json!({"name": "oncall", "kind": "webhook", "url": hook.url("/")})),
    ));
    created(server.admin(
        "POST",
        "/api/v1/rules",
        Some(&json!({"name": "liveness", "channel": "oncall", "events": ["agent_stale", "agent_back"],
                     "labels": {"env": "prod"}})),
    ));
    created(server.admin(
        "POST",
        "/api/v1/rules",
        Some(&json!({"name": "daily", "channel": "oncall", "events": ["backup_warning"], "warning_digest": true})),
    ));
    let kinds = |hook: &WebhookSink| -> Vec<String> {
        events(hook).iter().map(|r| r.json()["event"].as_str().unwrap().to_string()).collect()
    };

    // Both hosts end with a warning: held, then one digest naming both.
    report(&server, &prod, 1, "warning", now());
    report(&server, &dev, 2, "warning", now());
    let held = poll(Duration::from_secs(10), || {
        let list = notifications(&server);
        (list.iter().filter(|n| n["status"] == "held").count() == 2).then_some(())
    });
    assert!(held.is_some(), "{:?}", notifications(&server));
    assert!(kinds(&hook).iter().all(|k| k != "backup_warning"), "no single warning sent: {:?}", kinds(&hook));

    // Nobody heartbeats: prod goes stale (dev too, but no rule takes it).
    let stale = poll(Duration::from_secs(20), || kinds(&hook).contains(&"agent_stale".to_string()).then_some(()));
    assert!(stale.is_some(), "{:?}", notifications(&server));
    let digest = poll(Duration::from_secs(20), || {
        events(&hook).into_iter().find(|r| r.json()["event"] == "warning_digest").map(|r| r.json())
    })
    .unwrap_or_else(|| panic!("no digest: {:?}", notifications(&server)));
    let hosts: Vec<&str> =
        digest["items"].as_array().unwrap().iter().map(|i| i["host"]["hostname"].as_str().unwrap()).collect();
    assert_eq!(hosts.len(), 2, "{digest}");
    assert!(hosts.contains(&"web-prod") && hosts.contains(&"web-dev"), "{digest}");
    assert!(digest["text"].as_str().unwrap().contains("Backup warning: web-dev / home"), "{digest}");

    let body =
        json!({"hostname": "web-prod", "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "e2e", "seq": 1});
    let r = server.send("POST", "/api/v1/agents/heartbeat", &[("Authorization", &prod.auth)], Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    let back = poll(Duration::from_secs(10), || kinds(&hook).contains(&"agent_back".to_string()).then_some(()));
    assert!(back.is_some(), "{:?}", kinds(&hook));
    // Well inside the 2 s after which it would be stale again.
    std::thread::sleep(Duration::from_millis(500));
    let mut seen = kinds(&hook);
    seen.sort();
    assert_eq!(seen, ["agent_back", "agent_stale", "warning_digest"], "each once, dev's staleness to nobody");
}
