//! The Assets page in a real browser (headless chromium through chromium-driver, the real server binary): the bundled
//! agent listed with its SHA-256, an override uploaded through the page's file input and then served, byte for byte,
//! by `/agent/binary`, removed again, and a hostile file name refused with nothing written. And web tokens from the
//! command line: `web-token create` against a data dir, sign in with it, `web-token revoke`, and its session is dead.

use std::fs;
use std::path::Path;
use std::time::Duration;

use fantoccini::Locator;
use rm_e2e::*;
use sha2::{Digest, Sha256};

const ADMIN: &str = "web-assets-e2e-admin-token-Wombat-9052";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Chooses `file` in the file input of form `form` (WebDriver types a path into a file input) and submits the form.
fn upload(browser: &Browser, form: &str, file: &Path) {
    let input = format!("{form} input[type=file]");
    let path = file.to_str().unwrap().to_owned();
    browser.run(async |c| {
        c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(&input)).await?.send_keys(&path).await
    });
    browser.click(&format!("{form} button[type=submit]"));
}

/// The text of the first element `css` selects right now (`None`: none), read in one script so that an htmx swap
/// in between cannot leave a stale element behind.
fn text_now(browser: &Browser, css: &str) -> Option<String> {
    let script = format!("var e = document.querySelector({css:?}); return e ? e.textContent.trim() : null;");
    browser.script(&script).as_str().map(str::to_owned)
}

fn served_agent(server: &Server) -> Vec<u8> {
    let r = server.get("/agent/binary?os=linux&arch=amd64");
    assert_eq!(r.status, 200, "{}", r.text());
    r.body
}

#[test]
fn upload_an_agent_override_through_the_page_see_it_served_and_remove_it() {
    let Some(browser) = open_browser() else { return };
    let server = bundled_web_server(Server::builder(), ADMIN);
    let bundled = fs::read(binary(AGENT_BIN)).unwrap();
    let bundled_sha = sha256_hex(&bundled);

    browser.sign_in(&server, "/ui/assets", ADMIN);
    assert_eq!(browser.text("h1"), "Assets");
    let row = "#agent-linux-amd64";
    assert_eq!(browser.text(&format!("{row} td.source")), "bundled");
    assert_eq!(browser.text(&format!("{row} td.sha256")), bundled_sha);
    assert!(!browser.text(&format!("{row} td.version")).is_empty(), "the bundled agent's version is shown");
    assert!(browser.text("#install-install\\.sh").contains("bundled"), "{}", browser.source());
    assert!(!browser.exists(&format!("{row} form.remove")), "nothing to remove yet");

    // Upload an override through the page.
    let tmp = tempfile::tempdir().unwrap();
    let override_bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let override_sha = sha256_hex(&override_bytes);
    let file = tmp.path().join("my-agent-build");
    fs::write(&file, &override_bytes).unwrap();
    upload(&browser, "#upload-agent-binaries-restic-manager-agent-linux-amd64", &file);
    eventually(Duration::from_secs(20), "the page to show the override", || {
        (text_now(&browser, &format!("{row} td.source")).as_deref() == Some("data-dir")).then_some(())
    });
    assert_eq!(browser.text(&format!("{row} td.sha256")), override_sha);
    assert!(browser.url().ends_with("/ui/assets"), "{}", browser.url());
    assert_eq!(served_agent(&server), override_bytes, "the uploaded bytes are served");
    assert_eq!(fs::read(server.data_dir().join("agent-binaries").join(LINUX_AMD64)).unwrap(), override_bytes);
    browser.save_screenshot("assets");

    // A hostile file name is refused, and nothing is written.
    let hostile = tmp.path().join("evil name;rm -rf.sh");
    fs::write(&hostile, b"#!/bin/sh\necho pwned\n").unwrap();
    upload(&browser, "#install-new", &hostile);
    let error = poll(Duration::from_secs(10), || text_now(&browser, "p.error")).unwrap_or_else(|| {
        fs::write("/tmp/web16-assets-src.html", browser.source()).unwrap();
        panic!("no refusal shown")
    });
    assert!(error.contains("file name may contain only"), "{error}\n{}", browser.source());
    let written: Vec<_> =
        fs::read_dir(server.data_dir().join("install")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(written.is_empty(), "the refused upload wrote {written:?}");

    // Remove the override: the bundled agent is served again.
    browser.goto(&server.url("/ui/assets"));
    browser.click(&format!("{row} form.remove button[type=submit]"));
    eventually(Duration::from_secs(20), "the page to show the bundled agent again", || {
        (text_now(&browser, &format!("{row} td.source")).as_deref() == Some("bundled")).then_some(())
    });
    assert_eq!(browser.text(&format!("{row} td.sha256")), bundled_sha);
    assert_eq!(served_agent(&server), bundled, "the bundled agent is served again");

    // Both changes are in the audit log.
    let r = server.admin("GET", "/api/v1/audit", None);
    let audit = r.text();
    assert!(audit.contains(&override_sha) && audit.contains("\"delete\""), "{audit}");
}

#[test]
fn uploads_without_the_csrf_token_or_over_the_limit_are_refused_and_write_nothing() {
    let server = bundled_web_server(Server::builder().env("RM_MAX_UPLOAD_SIZE", "1000"), ADMIN);
    let cookie = sign_in_by_http(&server, ADMIN).expect("the admin token signs in");
    let post = |csrf: &str, content: &[u8]| {
        let boundary = "rmboundary7";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n--{boundary}\r\n\
             Content-Disposition: form-data; name=\"file\"; filename=\"x.sh\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(content);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let cookie = format!("rm_session={cookie}");
        let headers = [("Cookie", cookie.as_str()), ("Content-Type", content_type.as_str())];
        http_request_with_body(server.addr(), "POST", "/ui/assets/install/x.sh", &headers, &body).unwrap()
    };
    let r = post("not-the-csrf-token", b"#!/bin/sh\n");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("<html"), "an HTML page: {}", r.text());
    let csrf = csrf_of(&server, &cookie);
    let r = post(&csrf, &[b'x'; 1001]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(!server.data_dir().join("install/x.sh").exists(), "nothing written");
    let r = post(&csrf, &[b'x'; 1000]);
    assert_eq!(r.status, 303, "exactly the limit is allowed: {}", r.text());
    assert_eq!(fs::read(server.data_dir().join("install/x.sh")).unwrap(), [b'x'; 1000]);
    // A directory in the way is refused too.
    fs::create_dir_all(server.data_dir().join("install/dir.sh")).unwrap();
    let cookie_header = format!("rm_session={cookie}");
    let r = http_request_with_body(
        server.addr(),
        "POST",
        "/ui/assets/install/dir.sh/delete",
        &[("Cookie", cookie_header.as_str()), ("Content-Type", "application/x-www-form-urlencoded")],
        format!("csrf={csrf}").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(server.data_dir().join("install/dir.sh").is_dir());
}

/// Signs in over HTTP with `token`: the session cookie's value, or `None` when refused.
fn sign_in_by_http(server: &Server, token: &str) -> Option<String> {
    let body = format!("token={token}&next=%2F");
    let r = http_request_with_body(
        server.addr(),
        "POST",
        "/ui/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .unwrap();
    let cookie = r.header("set-cookie")?;
    let value = cookie.strip_prefix("rm_session=")?.split(';').next()?.to_owned();
    (r.status == 303 && !value.is_empty()).then_some(value)
}

/// The CSRF token of the session, read from a page's sign-out form.
fn csrf_of(server: &Server, cookie: &str) -> String {
    let r = page(server, "/ui/assets", cookie);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let at = text.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    text[at..].split('"').next().unwrap().to_owned()
}

fn page(server: &Server, path: &str, cookie: &str) -> Response {
    let cookie = format!("rm_session={cookie}");
    http_request_with_body(server.addr(), "GET", path, &[("Cookie", cookie.as_str())], b"").unwrap()
}

fn server_cli(args: &[&str]) -> (bool, String, String) {
    let mut cmd = command(SERVER_BIN);
    cmd.args(args);
    let out = run_bounded(cmd, Duration::from_secs(15));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_web_token_from_the_command_line_signs_in_until_it_is_revoked() {
    let mut server = bundled_web_server(Server::builder(), ADMIN);
    let data = server.data_dir().to_str().unwrap().to_owned();
    // Created while the server is down, against its data dir; the server then starts on it.
    let mut token = String::new();
    server.restart_on_same_port(|| {
        let (ok, stdout, stderr) =
            server_cli(&["web-token", "create", "--note", "alice's laptop", "--expires", "30d", "--data-dir", &data]);
        assert!(ok, "{stderr}");
        assert!(stderr.contains("shown once") && stderr.contains("status=active"), "{stderr}");
        token = stdout.trim().to_owned();
    });
    assert!(token.starts_with("rmwtk_"), "{token}");
    let (ok, listed, stderr) = server_cli(&["web-token", "list", "--data-dir", &data]);
    assert!(ok && listed.contains("status=active") && listed.contains("alice's laptop"), "{listed}{stderr}");
    assert!(!listed.contains(&token), "list never shows the secret");
    let id = listed.split_whitespace().find_map(|w| w.strip_prefix("id=")).unwrap().to_owned();

    // Sign in with it; the admin token still works too; a wrong web token does not.
    let cookie = sign_in_by_http(&server, &token).expect("the web token signs in");
    assert_eq!(page(&server, "/ui/assets", &cookie).status, 200);
    let admin_cookie = sign_in_by_http(&server, ADMIN).expect("the admin token signs in");
    assert_eq!(sign_in_by_http(&server, &format!("{token}x")), None);
    let audit = server.admin("GET", "/api/v1/audit?kind=web_sign_in", None).text();
    assert!(audit.contains(&format!("web token {id}")) && audit.contains("admin token"), "{audit}");
    assert!(!audit.contains(&token), "the secret is never audited");

    // Revoked: its session is dead at once, the admin's lives on, and it no longer signs in.
    let (ok, stdout, stderr) = server_cli(&["web-token", "revoke", &id, "--data-dir", &data]);
    assert!(ok && stdout.contains("status=revoked") && stderr.contains("1 session(s) ended"), "{stdout}{stderr}");
    let r = page(&server, "/ui/assets", &cookie);
    assert_eq!(r.status, 303, "the revoked token's session is dead");
    assert!(r.header("location").unwrap_or_default().starts_with("/ui/login"), "{:?}", r.header("location"));
    assert_eq!(page(&server, "/ui/assets", &admin_cookie).status, 200);
    assert_eq!(sign_in_by_http(&server, &token), None, "a revoked token signs in no more");
    let (ok, _, stderr) = server_cli(&["web-token", "revoke", "nosuchtoken", "--data-dir", &data]);
    assert!(!ok && stderr.contains("no web token"), "{stderr}");
}
