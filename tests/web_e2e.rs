//! The operator's web page in a real browser: Debian's headless chromium through chromium-driver, against the real
//! server binary on a real socket. Sign-in, the fleet table refreshing itself, adding a host with the install line
//! read from the page and run with `sh`, sign-out; markup in labels and restic messages shown as text; cross-site
//! posts, missing CSRF tokens, idle sessions and repeated wrong tokens refused. Screenshots of each page go to
//! `target/web-screenshots/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

const ADMIN: &str = "web-e2e-admin-token-Quokka-4471";

/// A command whose environment cannot change what the installer does (no `RM_*`, no proxies), with `TMPDIR` set.
fn clean_sh(script: &str, tmpdir: &Path) -> Output {
    let mut cmd = Command::new("sh");
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("RM_") || k.to_ascii_lowercase().ends_with("_proxy") || k == "INVOCATION_ID" {
            cmd.env_remove(&key);
        }
    }
    cmd.env("TMPDIR", tmpdir).stdin(Stdio::null()).arg("-c").arg(script);
    run_bounded(cmd, Duration::from_secs(60))
}

fn tokens(server: &Server) -> Vec<Value> {
    let r = server.admin("GET", "/api/v1/tokens", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["tokens"].as_array().unwrap().clone()
}

fn agents(server: &Server) -> Vec<Value> {
    let r = server.admin("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["agents"].as_array().unwrap().clone()
}

/// Enrolls a host over the API (as an agent would), answering its id and credential.
fn enroll_by_api(server: &Server, hostname: &str) -> (String, String) {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1})));
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let body = json!({"token": token, "hostname": hostname, "os": "linux", "arch": "amd64", "version": "9.9.9",
                      "commit": "web"});
    let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (v["agent_id"].as_str().unwrap().to_string(), format!("Bearer {}", v["credential"].as_str().unwrap()))
}

/// A request with the session cookie and, for POST, a form body.
fn with_cookie(
    server: &Server,
    method: &str,
    path: &str,
    cookie: &str,
    extra: &[(&str, &str)],
    form: &str,
) -> Response {
    let cookie = format!("rm_session={cookie}");
    let mut headers = vec![("Cookie", cookie.as_str())];
    if method == "POST" {
        headers.push(("Content-Type", "application/x-www-form-urlencoded"));
    }
    headers.extend_from_slice(extra);
    http_request_with_body(server.addr(), method, path, &headers, form.as_bytes()).unwrap()
}

fn marker_set(browser: &Browser) -> bool {
    browser.script("return window.__rmMarker === 1;") == json!(true)
}

#[test]
fn sign_in_add_a_host_from_the_page_and_watch_the_fleet_without_reloading() {
    let Some(browser) = open_browser() else { return };
    let server = bundled_web_server(Server::builder(), ADMIN);

    // Every page needs a session: the browser is sent to sign in, and a wrong token is refused.
    browser.goto(&server.url("/"));
    assert!(browser.url().contains("/ui/login?next=%2F"), "{}", browser.url());
    browser.save_screenshot("login");
    browser.fill("#token", "not-the-admin-token-at-all");
    browser.click("form.signin button[type=submit]");
    assert!(browser.text("p.error").contains("not the admin token"), "{}", browser.source());
    browser.sign_in(&server, "/", ADMIN);
    assert_eq!(browser.text("h1"), "Fleet");
    assert!(browser.text("#fleet .empty").contains("No hosts yet"));
    let cookie = browser.cookie("rm_session").expect("a session cookie");
    assert!(cookie.starts_with("rmweb_"), "{cookie}");

    // Add hosts: a token with labels, and the exact install line for this server.
    browser.goto(&server.url("/ui/hosts/add"));
    browser.fill("input[name=uses]", "2");
    browser.fill("input[name=labels]", "role=web, site=lab");
    browser.fill("input[name=note]", "from the web page");
    browser.click("form.token button[type=submit]");
    let line = browser.text("#install-linux");
    assert!(
        line.starts_with(&format!("curl -fsSL {}/install/install.sh | RM_ENROLL_TOKEN=rmenr_", server.url(""))),
        "{line}"
    );
    assert!(browser.text("#install-windows").contains("install.ps1"));
    let listed = tokens(&server);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["labels"], json!({"role": "web", "site": "lab"}));
    assert_eq!(listed[0]["max_uses"], 2);
    assert!(browser.text("#wait").contains("Waiting for the first heartbeat"));
    browser.save_screenshot("add-hosts");
    browser.script("window.__rmMarker = 1;");

    // The line, run as a host would (into a temporary prefix, no service), then the agent's first heartbeat.
    let scratch = tempfile::tempdir().unwrap();
    let (prefix, tmpdir) = (scratch.path().join("prefix"), scratch.path().join("tmp"));
    fs::create_dir(&tmpdir).unwrap();
    let out = clean_sh(&format!("{line} --prefix '{}' --no-service", prefix.display()), &tmpdir);
    assert!(out.status.success(), "install: {}\n{}", String::from_utf8_lossy(&out.stderr), server.log_tail());
    let agent_bin = prefix.join("bin").join(AGENT_BIN);
    let mut run = Command::new(&agent_bin);
    run.arg("--config").arg(prefix.join("etc/restic-manager/agent.json")).args(["run", "--once"]);
    let beat = run_bounded(run, Duration::from_secs(30));
    assert!(beat.status.success(), "agent run --once: {}", String::from_utf8_lossy(&beat.stderr));
    let host = agents(&server).remove(0);
    let (host_id, hostname) =
        (host["id"].as_str().unwrap().to_string(), host["hostname"].as_str().unwrap().to_string());
    assert_eq!(host["labels"], json!({"role": "web", "site": "lab"}), "the token's labels: {host}");

    // The waiting block turns to "connected" by itself: no reload (the marker survives).
    eventually(Duration::from_secs(20), "the page to show the host connected", || {
        browser.exists("#wait.connected").then_some(())
    });
    assert!(browser.text("#wait").contains(&hostname), "{}", browser.text("#wait"));
    assert!(marker_set(&browser), "the page reloaded");

    // The fleet shows it; a second host enrolling appears in the open page by itself.
    browser.goto(&server.url("/"));
    let row = format!("tr[data-agent='{host_id}']");
    assert!(browser.text(&row).contains(&hostname));
    assert!(browser.text(&format!("{row} td.labels")).contains("role=web"));
    assert!(browser.text(&format!("{row} .seen")).contains("reporting"), "{}", browser.text(&row));
    browser.script("window.__rmMarker = 1;");
    let (second, _) = enroll_by_api(&server, "second-host");
    let second_row = format!("tr[data-agent='{second}']");
    eventually(Duration::from_secs(20), "the second host in the open fleet table", || {
        browser.exists(&second_row).then_some(())
    });
    assert!(marker_set(&browser), "the fleet page reloaded");
    assert_eq!(browser.text("#count-hosts"), "2");
    browser.save_screenshot("fleet");

    // Without JavaScript the same table is in the page itself.
    let plain = with_cookie(&server, "GET", "/", &cookie, &[], "");
    assert_eq!(plain.status, 200);
    assert!(plain.text().contains(&hostname) && plain.text().contains("second-host"), "{}", plain.text());
    assert!(plain.header("content-security-policy").is_some_and(|c| c.contains("script-src 'self'")));

    // The audit page lists the sign-in and the token.
    browser.goto(&server.url("/ui/audit"));
    let audit = browser.text("table.audit");
    assert!(
        audit.contains("web_sign_in") && audit.contains("web_sign_in_refused") && audit.contains("web_token_created"),
        "{audit}"
    );
    browser.save_screenshot("audit");

    // Sign out: the session is dead on the server, not only forgotten by the browser.
    browser.click("form.signout button");
    eventually(Duration::from_secs(10), "the signed-out page", || browser.url().contains("signed_out").then_some(()));
    let after = with_cookie(&server, "GET", "/", &cookie, &[], "");
    assert_eq!(after.status, 303, "{}", after.text());
    assert!(after.header("location").is_some_and(|l| l.starts_with("/ui/login")), "{:?}", after.headers);
    browser.goto(&server.url("/ui/audit"));
    assert!(browser.url().contains("/ui/login"), "{}", browser.url());
}

#[test]
fn markup_in_labels_and_restic_messages_is_shown_as_text() {
    let Some(browser) = open_browser() else { return };
    let server = bundled_web_server(Server::builder(), ADMIN);
    let (id, auth) = enroll_by_api(&server, "xss-host");
    let label = r#"<img src=x onerror="window.__xss=1">"#;
    let r = server.admin("PUT", &format!("/api/v1/agents/{id}/labels"), Some(&json!({"labels": {"note": label}})));
    assert_eq!(r.status, 200, "{}", r.text());
    let repo = tempfile::tempdir().unwrap();
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(&json!({"name": "main", "url": repo.path().display().to_string(), "password": "pw-web-e2e"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = server.admin(
        "POST",
        "/api/v1/plans",
        Some(&json!({"name": "web", "repository": "main", "paths": ["/srv"], "schedule": "@daily", "agents": [id]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let message = "<script>window.__xss=2</script><b>Fatal:</b> unable to open config file";
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let report = json!({"reports": [{"id": format!("op_{:032x}", 1), "plan": "web", "kind": "backup",
        "trigger": "schedule", "status": "failed", "started_at": now - 30, "finished_at": now - 20, "duration_ms": 10_000,
        "exit_code": 1, "message": message}]});
    let r = server.send("POST", "/api/v1/agents/reports", &[("Authorization", &auth)], Some(&report));
    assert_eq!(r.status, 200, "{}", r.text());

    // A hostile `next` does not take the operator away after sign-in.
    browser.goto(&server.url("/ui/login?next=//evil.example/"));
    browser.fill("#token", ADMIN);
    browser.click("form.signin button[type=submit]");
    eventually(Duration::from_secs(10), "the fleet page", || browser.url().ends_with(&server.url("/")).then_some(()));
    let row = format!("tr[data-agent='{id}']");
    assert_eq!(browser.text(&format!("{row} td.labels")), format!("note={label}"));
    let plans = browser.text(&format!("{row} td.plans"));
    assert!(plans.contains("web: failed") && plans.contains(message), "{plans}");
    assert!(!browser.exists(&format!("{row} img")) && !browser.exists(&format!("{row} b")), "markup was rendered");
    assert_eq!(browser.script("return window.__xss === undefined;"), json!(true), "a payload ran");
    assert_eq!(browser.text("#count-failed"), "1");
    browser.save_screenshot("fleet-failed");

    // The host page shows the same values as text.
    browser.goto(&server.url(&format!("/ui/hosts/{id}")));
    assert!(browser.text("dl.facts").contains(&format!("note={label}")), "{}", browser.text("dl.facts"));
    assert!(browser.text("table.operations").contains(message), "{}", browser.text("table.operations"));
    assert!(!browser.exists("main img") && !browser.exists("main b"), "markup was rendered on the host page");
    assert_eq!(browser.script("return window.__xss === undefined;"), json!(true), "a payload ran");
}

#[test]
fn cross_site_posts_and_forms_without_the_session_token_are_refused() {
    let Some(browser) = open_browser() else { return };
    let server = bundled_web_server(Server::builder(), ADMIN);
    browser.sign_in(&server, "/ui/hosts/add", ADMIN);
    let cookie = browser.cookie("rm_session").unwrap();
    let csrf = browser.script("return document.querySelector('input[name=csrf]').value;");
    let csrf = csrf.as_str().unwrap().to_string();

    // A page on another origin (same host, another port: the SameSite cookie still goes along) posts the form.
    let target = server.url("/ui/hosts/add");
    let attacker = FakeHttp::start(move |_| {
        let page = format!(
            "<!doctype html><form id=f method=post action='{target}'><input name=uses value=1>\
             <input name=csrf value=guess></form><script>document.getElementById('f').submit()</script>"
        );
        raw_response("200 OK", "text/html", page.as_bytes())
    });
    browser.goto(&attacker.base_url());
    eventually(Duration::from_secs(10), "the refusal", || browser.source().contains("another site").then_some(()));
    assert!(tokens(&server).is_empty(), "a cross-site post created a token");

    // Without a browser's headers, the CSRF token alone decides: missing or wrong is refused, right is taken.
    let form = "uses=1&expires=1h&labels=&note=raw";
    let r = with_cookie(&server, "POST", "/ui/hosts/add", &cookie, &[], form);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("reload it"), "{}", r.text());
    let r = with_cookie(&server, "POST", "/ui/hosts/add", &cookie, &[], &format!("{form}&csrf=wrong"));
    assert_eq!(r.status, 403);
    let origin = [("Origin", "http://evil.example")];
    let r = with_cookie(&server, "POST", "/ui/hosts/add", &cookie, &origin, &format!("{form}&csrf={csrf}"));
    assert_eq!(r.status, 403, "a foreign Origin with the right token");
    assert!(tokens(&server).is_empty());
    let own = server.url("");
    let r = with_cookie(&server, "POST", "/ui/hosts/add", &cookie, &[("Origin", &own)], &format!("{form}&csrf={csrf}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tokens(&server).len(), 1);
    // Bad input is a clear error and creates nothing.
    let r = with_cookie(&server, "POST", "/ui/hosts/add", &cookie, &[], &format!("uses=none&csrf={csrf}"));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("uses: &quot;none&quot; is not a whole number"), "{}", r.text());
    assert_eq!(tokens(&server).len(), 1);
    // A partial asked for without a session tells htmx to load the sign-in page.
    let r = http_request(server.addr(), "GET", "/ui/fleet/table", &[("HX-Request", "true")]).unwrap();
    assert_eq!((r.status, r.header("hx-redirect")), (401, Some("/ui/login")));
}

#[test]
fn idle_sessions_expire_and_wrong_tokens_are_rate_limited() {
    let Some(browser) = open_browser() else { return };
    let server = bundled_web_server(Server::builder().env("RM_WEB_SESSION_IDLE", "2s"), ADMIN);
    browser.sign_in(&server, "/ui/audit", ADMIN);
    assert!(browser.url().ends_with("/ui/audit"), "returned to the page asked for: {}", browser.url());
    std::thread::sleep(Duration::from_secs(3));
    browser.goto(&server.url("/ui/audit"));
    assert!(browser.url().contains("/ui/login?next=%2Fui%2Faudit"), "an idle session still served: {}", browser.url());

    // Five wrong tokens from one address; then even the right one waits.
    let login = |token: &str| {
        let body = format!("token={token}&next=%2F");
        http_request_with_body(
            server.addr(),
            "POST",
            "/ui/login",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        )
        .unwrap()
    };
    for i in 0..5 {
        assert_eq!(login(&format!("wrong-{i}")).status, 401, "attempt {i}");
    }
    let limited = login(ADMIN);
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert!(limited.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() <= 60));
    assert!(limited.header("set-cookie").is_none());
    assert!(limited.text().contains("too many failed sign-ins"), "{}", limited.text());
}

/// Screenshots are written where the README's come from.
#[allow(dead_code)]
fn docs_dir() -> PathBuf {
    workspace_root().join("docs")
}

/// The operation `id` of `agent` once it is final (success, warning, failed or cancelled).
fn final_operation(server: &Server, agent: &str, id: &str) -> Value {
    eventually(Duration::from_secs(120), "the operation to finish", || {
        let r = server.admin("GET", &format!("/api/v1/operations?agent={agent}&limit=50"), None);
        r.json()["operations"].as_array().unwrap().iter().find(|o| o["id"] == id && o["finished_at"].is_i64()).cloned()
    })
}

/// The query value `key` of the browser's current URL.
fn url_param(browser: &Browser, key: &str) -> Option<String> {
    let url = browser.url();
    let query = url.split_once('?')?.1;
    form_urlencoded_pairs(query).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%3A", ":")))
        .collect()
}

#[test]
fn the_host_page_backs_up_now_restores_and_revokes() {
    let Some(restic) = restic_binary() else { return };
    let Some(browser) = open_browser() else { return };
    let server = bundled_web_server(Server::builder(), ADMIN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src/docs");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    fs::write(src.join("sub/b.bin"), random_bytes(16, 300_000)).unwrap();
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1})));
    let mut agent = Agent::enroll(&server.url(""), r.json()["token"].as_str().unwrap());
    agent.env("RM_RESTIC", &restic.display().to_string());
    agent.start();
    let repo = work.path().join("repo");
    let r = server.admin(
        "POST",
        "/api/v1/repositories",
        Some(
            &json!({"name": "local", "url": repo.display().to_string(), "password": "pw-host-page", "auto_init": true}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = server.admin(
        "POST",
        "/api/v1/plans",
        Some(&json!({"name": "docs", "repository": "local", "paths": [src.display().to_string()],
                     "schedule": "@daily", "agents": [agent.id]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    eventually(Duration::from_secs(30), "the first heartbeat", || {
        agents(&server).iter().any(|a| a["id"] == agent.id.as_str() && a["heartbeats"].as_u64() > Some(0)).then_some(())
    });

    // From the fleet table to the host page.
    browser.sign_in(&server, "/", ADMIN);
    browser.click(&format!("tr[data-agent='{}'] a.hostname", agent.id));
    eventually(Duration::from_secs(10), "the host page", || browser.url().contains("/ui/hosts/").then_some(()));
    assert!(browser.text("dl.facts").contains(&agent.id));
    assert_eq!(browser.run(async |c| c.find_all(fantoccini::Locator::Css(".strip .day")).await).len(), 30);

    // "Back up now": the operation appears and turns to success in the open page (it refreshes while live).
    browser.click("tr[data-plan='docs'] button[type=submit]");
    eventually(Duration::from_secs(10), "the queued notice", || url_param(&browser, "queued"));
    let backup = url_param(&browser, "queued").unwrap();
    browser.script("window.__rmMarker = 1;");
    let status = format!("tr[data-operation='{backup}'] .status");
    eventually(Duration::from_secs(120), "the backup to succeed on the page", || {
        (browser.text_now(&status).as_deref() == Some("success")).then_some(())
    });
    assert!(marker_set(&browser), "the page reloaded");
    assert_eq!(final_operation(&server, &agent.id, &backup)["status"], "success");
    let audit = server.admin("GET", "/api/v1/audit?kind=plan_run_requested", None).json();
    assert_eq!(audit["events"].as_array().unwrap().len(), 1, "{audit}");

    // The snapshot is listed; restore it into a chosen directory and compare byte for byte.
    browser.goto(&browser.url());
    eventually(Duration::from_secs(30), "the snapshot on the host page", || {
        browser.goto(&server.url(&format!("/ui/hosts/{}", agent.id)));
        browser.exists("table.snapshots tr[data-snapshot]").then_some(())
    });
    assert!(browser.text(".strip").is_empty(), "cells have no text");
    assert!(browser.exists(".strip .day.ok"), "today's cell shows the success");
    browser.save_screenshot("host");
    browser.click("table.snapshots a[href*='/restore?snapshot=']");
    let target = work.path().join("restored");
    browser.fill("form.restore input[name=target]", &target.display().to_string());
    browser.fill("form.restore textarea[name=include]", &src.join("sub").display().to_string());
    browser.save_screenshot("restore");
    browser.click("form.restore button[type=submit]");
    eventually(Duration::from_secs(10), "the queued restore", || url_param(&browser, "queued"));
    let restore = url_param(&browser, "queued").unwrap();
    let done = final_operation(&server, &agent.id, &restore);
    assert_eq!(done["status"], "success", "{done}\n{}", agent.log());
    assert_eq!(done["kind"], "restore");
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(restored.join("sub/b.bin")).unwrap(), fs::read(src.join("sub/b.bin")).unwrap());
    assert!(!restored.join("a.txt").exists(), "only the included path was restored");

    // Bad input is shown on the form and queues nothing.
    browser.goto(&server.url(&format!("/ui/hosts/{}/restore", agent.id)));
    browser.fill("form.restore input[name=target]", "relative/dir");
    browser.click("form.restore button[type=submit]");
    assert!(browser.text("p.error").contains("target"), "{}", browser.text("main"));
    let ops = server.admin("GET", &format!("/api/v1/operations?agent={}&kind=restore", agent.id), None).json();
    assert_eq!(ops["operations"].as_array().unwrap().len(), 1, "{ops}");

    // Revoking the credential: the agent is refused from then on.
    browser.goto(&server.url(&format!("/ui/hosts/{}", agent.id)));
    browser.click("form.revoke input[name=confirm]");
    browser.click("form.revoke button[type=submit]");
    eventually(Duration::from_secs(10), "the revoked notice", || url_param(&browser, "revoked"));
    assert!(browser.text("main").contains("Revoked"), "{}", browser.text("main"));
    let config: Value = serde_json::from_slice(&fs::read(agent.config()).unwrap()).unwrap();
    let auth = format!("Bearer {}", config["credential"].as_str().unwrap());
    let r = server.send("GET", "/api/v1/agents/config", &[("Authorization", &auth)], None);
    assert_eq!(r.status, 401, "{}", r.text());
    let listed = agents(&server).into_iter().find(|a| a["id"] == agent.id.as_str()).unwrap();
    assert!(listed["credential_revoked_at"].is_i64(), "{listed}");
}

/// Under the server's own self-signed TLS: the session cookie is `Secure`, and the install line on the page carries
/// the certificate's key pin (the one the server logged); run with `sh`, it installs and the host connects.
#[test]
fn under_self_signed_tls_the_cookie_is_secure_and_the_install_line_is_pinned() {
    let (driver, chromium) = match browser_tools() {
        Ok(tools) => tools,
        Err(reason) => return skip(reason),
    };
    let tmp = tempfile::tempdir().unwrap();
    let (data, bundled) = (tmp.path().join("data"), tmp.path().join("bundled"));
    fs::create_dir_all(&data).unwrap();
    fs::create_dir_all(bundled.join("agent-binaries")).unwrap();
    fs::create_dir_all(bundled.join("install")).unwrap();
    fs::copy(binary(AGENT_BIN), bundled.join("agent-binaries").join(LINUX_AMD64)).unwrap();
    fs::copy(repo_file("scripts/install.sh"), bundled.join("install/install.sh")).unwrap();
    let log = tmp.path().join("server.log");
    let port = free_port().port();
    let child = command(SERVER_BIN)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--tls", "self-signed", "--log-format", "json"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--bundled-assets-dir")
        .arg(&bundled)
        .env("RM_ADMIN_TOKEN", ADMIN)
        .env("RM_HEARTBEAT_INTERVAL", "2s")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(child);
    let base = format!("https://127.0.0.1:{port}");
    let pin = eventually(Duration::from_secs(15), "the server's logged pin", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v["pin"].as_str().map(str::to_owned)))
    });

    let browser = Browser::start_with(&driver, &chromium, true);
    eventually(Duration::from_secs(15), "the sign-in page over https", || {
        browser.goto(&format!("{base}/"));
        browser.url().contains("/ui/login").then_some(())
    });
    browser.fill("#token", ADMIN);
    browser.click("form.signin button[type=submit]");
    eventually(Duration::from_secs(10), "the fleet page", || (browser.url() == format!("{base}/")).then_some(()));
    assert_eq!(browser.cookie_is_secure("rm_session"), Some(true), "the session cookie is Secure under TLS");

    browser.goto(&format!("{base}/ui/hosts/add"));
    browser.click("form.token button[type=submit]");
    let line = browser.text("#install-linux");
    assert!(line.starts_with(&format!("curl -fsSL --pinnedpubkey {pin} -k {base}/install/install.sh |")), "{line}");
    assert!(line.ends_with(&format!("sh -s -- --pin {pin}")), "{line}");
    assert!(browser.text("main").contains("self-signed"), "the page says why the line is pinned");
    browser.save_screenshot("add-hosts-tls");

    let scratch = tempfile::tempdir().unwrap();
    let (prefix, tmpdir) = (scratch.path().join("prefix"), scratch.path().join("tmp"));
    fs::create_dir(&tmpdir).unwrap();
    let out = clean_sh(&format!("{line} --prefix '{}' --no-service", prefix.display()), &tmpdir);
    assert!(out.status.success(), "install: {}", String::from_utf8_lossy(&out.stderr));
    let mut run = Command::new(prefix.join("bin").join(AGENT_BIN));
    run.arg("--config").arg(prefix.join("etc/restic-manager/agent.json")).args(["run", "--once"]);
    let beat = run_bounded(run, Duration::from_secs(30));
    assert!(beat.status.success(), "agent run --once: {}", String::from_utf8_lossy(&beat.stderr));
    eventually(Duration::from_secs(20), "the host connected on the page", || {
        browser.exists("#wait.connected").then_some(())
    });
}
