//! The Repositories and Plans pages in a real browser (headless chromium through chromium-driver) against the real
//! server binary: a repository and a plan created, edited and deleted through the pages and checked over the API;
//! secrets never in the page; an empty password on edit keeps the stored one; bad input is a 400 page with the
//! fleet's message that creates nothing; a repository that a plan uses cannot be deleted. Screenshots go to
//! `target/web-screenshots/repositories.png` and `plans.png`.

use std::path::Path;
use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

const ADMIN: &str = "web-plans-e2e-admin-token-Wombat-9120";
const PASSWORD: &str = "repo-password-Platypus-5531";
const ENV_SECRET: &str = "env-secret-Echidna-7702";

fn web_server() -> Server {
    Server::builder().env("RM_ADMIN_TOKEN", ADMIN).start()
}

/// Waits until the browser shows `path` (after a form's redirect).
fn arrived(browser: &Browser, server: &Server, path: &str) {
    let want = server.url(path);
    eventually(Duration::from_secs(10), path, || (browser.url() == want).then_some(()));
}

fn list(server: &Server, what: &str) -> Vec<Value> {
    let r = server.admin("GET", &format!("/api/v1/{what}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()[what].as_array().unwrap().clone()
}

/// The sealed password and environment of a repository, as stored.
fn sealed(server: &Server, name: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    let c = rusqlite::Connection::open(server.data_dir().join("restic-manager.db")).unwrap();
    c.query_row("SELECT password, env FROM repositories WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A form post with the session cookie, as a browser without JavaScript would send it.
fn post(server: &Server, path: &str, cookie: &str, fields: &[(&str, &str)]) -> Response {
    let body = fields.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect::<Vec<_>>().join("&");
    let cookie = format!("rm_session={cookie}");
    let headers = [("Cookie", cookie.as_str()), ("Content-Type", "application/x-www-form-urlencoded")];
    http_request_with_body(server.addr(), "POST", path, &headers, body.as_bytes()).unwrap()
}

fn enroll_with_labels(server: &Server, hostname: &str, labels: Value) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1, "labels": labels})));
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let body = json!({"token": token, "hostname": hostname, "os": "linux", "arch": "amd64", "version": "9.9.9",
                      "commit": "web"});
    let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["agent_id"].as_str().unwrap().to_string()
}

fn assert_no_secret(page: &str, at: &str) {
    assert!(!page.contains(PASSWORD), "{at}: the password is in the page");
    assert!(!page.contains(ENV_SECRET), "{at}: an environment value is in the page");
}

fn path_text(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn repositories_and_plans_are_managed_from_the_pages() {
    let Some(browser) = open_browser() else { return };
    let server = web_server();
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    enroll_with_labels(&server, "db-host", json!({"env": "prod", "role": "db"}));
    browser.sign_in(&server, "/ui/repositories", ADMIN);
    assert_eq!(browser.text("h1"), "Repositories");
    assert!(browser.text(".empty").contains("No repositories yet"));

    // Create a repository through the page.
    browser.fill("form.repository input[name=name]", "main");
    browser.fill("form.repository input[name=url]", &path_text(first.path()));
    browser.fill("form.repository input[name=password]", PASSWORD);
    browser.fill("form.repository textarea[name=env]", &format!("AWS_ACCESS_KEY_ID={ENV_SECRET}"));
    browser.submit("form.repository button[type=submit]");
    arrived(&browser, &server, "/ui/repositories");
    assert!(browser.text("tr[data-repository=main]").contains(&path_text(first.path())));
    assert_no_secret(&browser.source(), "the list");
    let repos = list(&server, "repositories");
    assert_eq!(repos.len(), 1, "{repos:?}");
    assert_eq!(repos[0]["url"], path_text(first.path()));
    assert_eq!(repos[0]["env_names"], json!(["AWS_ACCESS_KEY_ID"]));
    assert_eq!(repos[0]["auto_init"], false);
    let stored = sealed(&server, "main");

    // Edit: the page shows no secret; an empty password and the environment's names keep what is stored.
    browser.submit("tr[data-repository=main] td.name a");
    arrived(&browser, &server, "/ui/repositories/main");
    assert_no_secret(&browser.source(), "the edit page");
    assert_eq!(browser.script("return document.querySelector('input[name=password]').value;"), json!(""));
    assert_eq!(browser.text("textarea[name=env]"), "AWS_ACCESS_KEY_ID");
    browser.fill("form.repository input[name=url]", &path_text(second.path()));
    browser.click("form.repository input[name=auto_init]");
    browser.submit("form.repository button[type=submit]");
    arrived(&browser, &server, "/ui/repositories");
    let repos = list(&server, "repositories");
    assert_eq!((&repos[0]["url"], &repos[0]["auto_init"]), (&json!(path_text(second.path())), &json!(true)));
    assert_eq!(sealed(&server, "main"), stored, "an empty password and name-only env lines keep the secrets");
    let audit = server.admin("GET", "/api/v1/audit?kind=repository", None).text();
    assert!(audit.contains("updated main: url=") && !audit.contains("password replaced"), "{audit}");
    browser.save_screenshot("repositories");

    // Create a plan with a label selector.
    browser.goto(&server.url("/ui/plans"));
    let cookie = browser.cookie("rm_session").unwrap();
    let csrf = browser.script("return document.querySelector('input[name=csrf]').value;");
    let csrf = csrf.as_str().unwrap().to_string();
    browser.fill("form.plan input[name=name]", "etc");
    browser.fill("form.plan textarea[name=paths]", "/etc\n/srv/data");
    browser.fill("form.plan input[name=schedule]", "0 3 * * *");
    browser.fill("form.plan input[name=selector]", "env=prod, role=db");
    browser.fill("form.plan input[name=keep_daily]", "7");
    browser.submit("form.plan button[type=submit]");
    arrived(&browser, &server, "/ui/plans");
    let plans = list(&server, "plans");
    assert_eq!(plans.len(), 1, "{plans:?}");
    assert_eq!(plans[0]["selector"], json!({"env": "prod", "role": "db"}));
    assert_eq!(plans[0]["paths"], json!(["/etc", "/srv/data"]));
    assert_eq!(plans[0]["retention"], json!({"daily": 7}));
    assert_eq!(plans[0]["applies_to"].as_array().unwrap().len(), 1);
    let row = browser.text("tr[data-plan=etc]");
    assert!(row.contains("env=prod") && row.contains("db-host") && row.contains("daily=7"), "{row}");

    // Bad input: a 400 page with the fleet's message and the typed values; nothing is created.
    browser.fill("form.plan input[name=name]", "bad");
    browser.fill("form.plan textarea[name=paths]", "relative/path");
    browser.fill("form.plan input[name=schedule]", "@daily");
    browser.submit("form.plan button[type=submit]");
    assert!(browser.text("p.error").contains("is not absolute"), "{}", browser.source());
    assert_eq!(browser.script("return document.querySelector('input[name=name]').value;"), json!("bad"));
    let base = [("csrf", csrf.as_str()), ("name", "bad"), ("repository", "main")];
    let relative =
        post(&server, "/ui/plans", &cookie, &[&base[..], &[("paths", "etc"), ("schedule", "@daily")]].concat());
    assert_eq!(relative.status, 400, "{}", relative.text());
    assert!(relative.text().contains("paths: &quot;etc&quot; is not absolute"), "{}", relative.text());
    let schedule =
        post(&server, "/ui/plans", &cookie, &[&base[..], &[("paths", "/etc"), ("schedule", "whenever")]].concat());
    assert_eq!(schedule.status, 400, "{}", schedule.text());
    assert!(schedule.text().contains("schedule:"), "{}", schedule.text());
    let repo = post(
        &server,
        "/ui/repositories",
        &cookie,
        &[("csrf", &csrf), ("name", "x"), ("url", "relative"), ("password", PASSWORD)],
    );
    assert_eq!(repo.status, 400, "{}", repo.text());
    assert!(repo.text().contains("url must be an absolute local path"), "{}", repo.text());
    assert_no_secret(&repo.text(), "a refused repository form");
    assert_eq!(list(&server, "plans").len(), 1);
    assert_eq!(list(&server, "repositories").len(), 1);
    let forged = post(&server, "/ui/plans/etc/delete", &cookie, &[("csrf", "wrong")]);
    assert_eq!(forged.status, 403, "{}", forged.text());

    // Edit the plan: assign it by another label.
    browser.goto(&server.url("/ui/plans/etc"));
    assert_eq!(
        browser.script("return document.querySelector('input[name=selector]').value;"),
        json!("env=prod, role=db")
    );
    browser.fill("form.plan input[name=selector]", "env=staging");
    browser.submit("form.plan button[type=submit]");
    arrived(&browser, &server, "/ui/plans");
    let plans = list(&server, "plans");
    assert_eq!(plans[0]["selector"], json!({"env": "staging"}));
    assert_eq!(plans[0]["paths"], json!(["/etc", "/srv/data"]), "the other fields are kept");
    assert_eq!(plans[0]["applies_to"], json!([]));
    browser.save_screenshot("plans");

    // A repository that a plan uses cannot be deleted.
    browser.goto(&server.url("/ui/repositories/main"));
    browser.submit("form.delete button");
    assert!(browser.text("p.error").contains("is used by the plans etc"), "{}", browser.source());
    let refused = post(&server, "/ui/repositories/main/delete", &cookie, &[("csrf", &csrf)]);
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(list(&server, "repositories").len(), 1);

    // Delete the plan, then the repository.
    browser.goto(&server.url("/ui/plans/etc"));
    browser.submit("form.delete button");
    arrived(&browser, &server, "/ui/plans");
    assert!(list(&server, "plans").is_empty());
    browser.goto(&server.url("/ui/repositories/main"));
    browser.submit("form.delete button");
    arrived(&browser, &server, "/ui/repositories");
    assert!(list(&server, "repositories").is_empty());
    let audit = server.admin("GET", "/api/v1/audit", None).text();
    for kind in ["plan_created", "plan_updated", "plan_deleted", "deleted main"] {
        assert!(audit.contains(kind), "{kind} not audited: {audit}");
    }
}
