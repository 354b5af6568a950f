//! A real browser for the web page tests: Debian's headless `chromium`, driven over WebDriver by `chromedriver`
//! (package `chromium-driver`) through fantoccini. Each [`Browser`] has its own driver process, profile directory
//! and tokio runtime, so tests stay synchronous like the rest of the suite.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::poll::poll;

/// `chromedriver` and `chromium` on PATH, or why not (the skip reason).
pub fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let find = |name: &str| {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    };
    let driver = find("chromedriver").ok_or("chromedriver not installed: apt-get install chromium-driver")?;
    let chromium = find("chromium").ok_or("chromium not installed: apt-get install chromium")?;
    Ok((driver, chromium))
}

/// A browser for a test, or `None` after recording the skip (never under CI) when chromium is not installed.
pub fn open_browser() -> Option<Browser> {
    match browser_tools() {
        Ok((driver, chromium)) => Some(Browser::start(&driver, &chromium)),
        Err(reason) => {
            crate::skip(reason);
            None
        }
    }
}

/// A server for the web page tests: the host agent, the install script and the unit bundled, `admin` as the admin
/// token and a 2 s heartbeat interval.
pub fn bundled_web_server(builder: crate::ServerBuilder, admin: &str) -> crate::Server {
    use crate::{AGENT_BIN, LINUX_AMD64, binary, repo_file};
    let builder = builder.env("RM_ADMIN_TOKEN", admin).env("RM_HEARTBEAT_INTERVAL", "2s");
    let bundled = builder.bundled_dir().to_path_buf();
    std::fs::copy(binary(AGENT_BIN), bundled.join("agent-binaries").join(LINUX_AMD64)).unwrap();
    std::fs::copy(repo_file("scripts/install.sh"), bundled.join("install/install.sh")).unwrap();
    std::fs::copy(
        repo_file("deploy/restic-manager-agent.service"),
        bundled.join("install/restic-manager-agent.service"),
    )
    .unwrap();
    builder.start()
}

/// One headless chromium session.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a session in a fresh profile.
    pub fn start(driver: &Path, chromium: &Path) -> Browser {
        Browser::start_with(driver, chromium, false)
    }

    /// [`Browser::start`]; `accept_insecure_certs` lets it open a server with a self-signed certificate.
    pub fn start_with(driver: &Path, chromium: &Path, accept_insecure_certs: bool) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let profile = tempfile::Builder::new().prefix("rm-e2e-chromium-").tempdir().unwrap();
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let capabilities = json!({
            "acceptInsecureCerts": accept_insecure_certs,
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.path().display())],
            }
        });
        let capabilities = match capabilities {
            serde_json::Value::Object(map) => map,
            _ => unreachable!(),
        };
        let url = format!("http://127.0.0.1:{port}");
        let client = poll(Duration::from_secs(30), || {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            runtime
                .block_on(ClientBuilder::new(connector).capabilities(capabilities.clone()).connect(&url))
                .map_err(|e| eprintln!("waiting for chromedriver: {e}"))
                .ok()
        })
        .expect("chromedriver did not open a browser session within 30 s");
        Browser { runtime, client: Some(client), driver, _profile: profile }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    /// Runs a WebDriver call to completion.
    pub fn run<T>(&self, f: impl AsyncFnOnce(&Client) -> Result<T, fantoccini::error::CmdError>) -> T {
        self.runtime.block_on(f(self.client())).unwrap_or_else(|e| panic!("WebDriver: {e}"))
    }

    pub fn goto(&self, url: &str) {
        self.run(async |c| c.goto(url).await)
    }

    pub fn url(&self) -> String {
        self.run(async |c| c.current_url().await).to_string()
    }

    pub fn source(&self) -> String {
        self.run(async |c| c.source().await)
    }

    /// The text of the first element `css` selects, waiting up to 10 s for it to exist. An element that a refresh
    /// swaps out while it is read is looked up again.
    pub fn text(&self, css: &str) -> String {
        poll(Duration::from_secs(10), || self.text_now(css))
            .unwrap_or_else(|| panic!("no element matches {css:?} within 10 s:\n{}", self.source()))
    }

    /// The text of the first element `css` selects now, if one does. An element that htmx swaps out between the lookup
    /// and the read answers `None` (for polling), where [`Browser::text`] would fail on the stale element.
    pub fn text_now(&self, css: &str) -> Option<String> {
        self.runtime.block_on(async {
            let element = self.client().find(Locator::Css(css)).await.ok()?;
            element.text().await.ok()
        })
    }

    /// Whether an element matches `css` now.
    pub fn exists(&self, css: &str) -> bool {
        self.run(async |c| Ok(!c.find_all(Locator::Css(css)).await?.is_empty()))
    }

    /// Types `text` into the field `css` selects (after clearing it).
    pub fn fill(&self, css: &str, text: &str) {
        self.run(async |c| {
            let field = c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(css)).await?;
            field.clear().await?;
            field.send_keys(text).await
        })
    }

    pub fn click(&self, css: &str) {
        self.run(async |c| {
            c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(css)).await?.click().await
        })
    }

    /// Clicks `css` (a submit button or a link) and waits up to 10 s until the browser shows the *next* document:
    /// a form that posts to the page it is on ends on the same URL, so waiting for the URL alone could read the old
    /// page (and the server before it handled the post).
    pub fn submit(&self, css: &str) {
        self.script("window.__rm_before_submit = true; return null;");
        self.click(css);
        crate::eventually(Duration::from_secs(10), format!("the page after clicking {css}"), || {
            let state = self.runtime.block_on(
                self.client()
                    .execute("return window.__rm_before_submit === true ? 'old' : document.readyState;", vec![]),
            );
            (state.ok()? == serde_json::json!("complete")).then_some(())
        });
    }

    /// Runs `script` in the page and answers its return value.
    pub fn script(&self, script: &str) -> serde_json::Value {
        self.run(async |c| c.execute(script, vec![]).await)
    }

    /// The value of cookie `name` for the current page, if it is set.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.runtime.block_on(self.client().get_named_cookie(name)).ok().map(|c| c.value().to_string())
    }

    /// Whether cookie `name` of the current page carries the `Secure` attribute.
    pub fn cookie_is_secure(&self, name: &str) -> Option<bool> {
        self.runtime.block_on(self.client().get_named_cookie(name)).ok().and_then(|c| c.secure())
    }

    /// Signs in at `path` of `server` with `token`: the page must send the browser to sign in first, then back.
    pub fn sign_in(&self, server: &crate::Server, path: &str, token: &str) {
        self.goto(&server.url(path));
        assert!(self.url().contains("/ui/login"), "not sent to sign in: {}", self.url());
        self.fill("#token", token);
        self.click("form.signin button[type=submit]");
        crate::eventually(Duration::from_secs(10), "the page after sign-in", || {
            (!self.url().contains("/ui/login")).then_some(())
        });
    }

    /// Writes a PNG of the viewport to `target/web-screenshots/<name>.png` (`make screenshots` copies them to docs).
    pub fn save_screenshot(&self, name: &str) {
        self.screenshot(&crate::workspace_root().join("target/web-screenshots").join(format!("{name}.png")));
    }

    /// Writes a PNG of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        let png = self.run(async |c| c.screenshot().await);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ =
                self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), client.close()).await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
