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

    /// The text of the first element `css` selects, waiting up to 10 s for it to exist.
    pub fn text(&self, css: &str) -> String {
        self.run(async |c| c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(css)).await?.text().await)
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
