//! The server's own TLS on a real socket: a generated self-signed certificate, its key pin accepted by
//! `curl --pinnedpubkey` (a wrong pin refused), https links, certificate rotation under an open download, a broken
//! replacement refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rm_e2e::*;

const MIB: usize = 1 << 20;

/// A TLS server started by hand (the harness probes readiness over plain HTTP).
struct TlsServer {
    child: Child,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl TlsServer {
    fn start(agent: &[u8]) -> TlsServer {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let bundled = tmp.path().join("bundled");
        fs::create_dir_all(&data).unwrap();
        fs::create_dir_all(bundled.join("agent-binaries")).unwrap();
        fs::write(bundled.join("agent-binaries").join(LINUX_AMD64), agent).unwrap();
        fs::create_dir_all(bundled.join("install")).unwrap();
        fs::copy(repo_file("scripts/install.sh"), bundled.join("install/install.sh")).unwrap();
        let log = tmp.path().join("server.log");
        let port = free_port().port();
        let child = command(SERVER_BIN)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--tls", "self-signed", "--log-format", "json"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--bundled-assets-dir")
            .arg(&bundled)
            .env("RM_ADMIN_TOKEN", "tls-e2e-admin-token-0123456")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = TlsServer { child, port, data, log, _tmp: tmp };
        eventually(Duration::from_secs(15), "the TLS server to answer /readyz", || {
            server.curl(&["-k", &server.url("/readyz")]).status.success().then_some(())
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pin the server logged when it started.
    fn logged_pin(&self) -> String {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "TLS on: serving https")
            .and_then(|l| l["pin"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no pin in the log:\n{}", self.log()))
    }

    fn curl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("curl");
        cmd.args(["-q", "-sS", "--noproxy", "*", "--max-time", "60"]).args(args);
        run_bounded(cmd, Duration::from_secs(70))
    }

    fn tls_dir(&self) -> PathBuf {
        self.data.join("tls")
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh self-signed pair, made by the server binary itself in a throw-away data dir.
fn another_pair() -> (Vec<u8>, Vec<u8>) {
    let other = TlsServer::start(b"x");
    (fs::read(other.tls_dir().join("cert.pem")).unwrap(), fs::read(other.tls_dir().join("key.pem")).unwrap())
}

fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[test]
fn pinned_key_is_accepted_and_a_wrong_pin_refused() {
    let server = TlsServer::start(b"agent build");
    let pin = server.logged_pin();
    assert!(pin.starts_with("sha256//") && pin.len() == 52, "{pin}");
    let ok = server.curl(&["--pinnedpubkey", &pin, "-k", &server.url("/version")]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let wrong = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let refused = server.curl(&["--pinnedpubkey", wrong, "-k", &server.url("/version")]);
    assert_eq!(refused.status.code(), Some(90), "curl's pin mismatch exit code");
    // Without the pin and without -k: nobody vouches for a self-signed certificate.
    assert_eq!(server.curl(&[&server.url("/version")]).status.code(), Some(60));
    // With the certificate itself as the CA: valid for 127.0.0.1 and localhost, not for another name.
    let ca = server.tls_dir().join("cert.pem");
    let ca = ca.to_str().unwrap();
    assert!(server.curl(&["--cacert", ca, &server.url("/healthz")]).status.success());
    let other_name = format!("https://wrong.example:{}/healthz", server.port);
    let resolve = format!("wrong.example:{}:127.0.0.1", server.port);
    let r = server.curl(&["--cacert", ca, "--resolve", &resolve, &other_name]);
    assert_eq!(r.status.code(), Some(60), "wrong host name: {}", String::from_utf8_lossy(&r.stderr));
    // Plain HTTP to the TLS port gets no HTTP answer (the handshake fails and the connection closes).
    let plain = http_get(format!("127.0.0.1:{}", server.port).parse().unwrap(), "/healthz");
    assert!(plain.is_err(), "plain HTTP got an answer: {:?}", plain.map(|r| r.status));

    // The served certificate is the one in use; its key is the pin; links are https.
    let pem = server.curl(&["--pinnedpubkey", &pin, "-k", &server.url("/tls/cert.pem")]);
    assert_eq!(pem.stdout, fs::read(server.tls_dir().join("cert.pem")).unwrap());
    let manifest = server.curl(&["--pinnedpubkey", &pin, "-k", &server.url("/agent/manifest")]);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout).unwrap();
    let url = manifest["agents"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&server.url("/agent/binary?")), "{url}");

    // The container HEALTHCHECK probes over TLS, trusting exactly the local certificate's key.
    let mut cmd = command(SERVER_BIN);
    cmd.args(["healthcheck", "--listen", &format!("127.0.0.1:{}", server.port)]).arg("--data-dir").arg(&server.data);
    let out = run_bounded(cmd, Duration::from_secs(15));
    assert!(out.status.success(), "healthcheck over TLS: {}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = command(SERVER_BIN);
    cmd.args(["healthcheck", "--listen", &format!("127.0.0.1:{}", server.port), "--tls", "off"])
        .arg("--data-dir")
        .arg(&server.data);
    assert!(!run_bounded(cmd, Duration::from_secs(15)).status.success(), "a plain probe of a TLS port is unhealthy");

    // `token create` prints install lines with this pin.
    let mut cmd = command(SERVER_BIN);
    cmd.args(["token", "create", "--uses", "1", "--listen", &format!("127.0.0.1:{}", server.port)])
        .arg("--data-dir")
        .arg(&server.data);
    let out = run_bounded(cmd, Duration::from_secs(15));
    let hints = String::from_utf8_lossy(&out.stderr);
    assert!(
        hints.contains(&format!("curl -fsSL --pinnedpubkey {pin} -k {}", server.url("/install/install.sh"))),
        "{hints}"
    );
    assert!(hints.contains(&format!("--pin {pin}")), "{hints}");
}

#[test]
fn a_replaced_certificate_is_picked_up_without_dropping_a_download() {
    let agent = random_bytes(7, 48 * MIB);
    let server = TlsServer::start(&agent);
    let old_pin = server.logged_pin();
    let (cert, key) = another_pair();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("agent");
    // A slow download under the old certificate...
    let mut download = Command::new("curl")
        .args(["-q", "-sS", "--noproxy", "*", "--limit-rate", "16M", "--pinnedpubkey", &old_pin, "-k", "-o"])
        .arg(&target)
        .arg(server.url("/agent/binary?os=linux&arch=amd64"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the download to start", || {
        fs::metadata(&target).ok().filter(|m| m.len() > 0).map(drop)
    });
    // ...while the operator renews: key first, then certificate, each by rename.
    replace(&server.tls_dir().join("key.pem"), &key);
    replace(&server.tls_dir().join("cert.pem"), &cert);
    eventually(Duration::from_secs(10), "new connections to get the new certificate", || {
        let r = server.curl(&["-k", &server.url("/tls/cert.pem")]);
        (r.stdout == cert).then_some(())
    });
    let status = download.wait().unwrap();
    assert!(status.success(), "the download under the old certificate failed");
    assert_eq!(sha256_file(&target), sha256_hex(&agent), "the download is complete and intact");
    // The old pin no longer matches new connections.
    let r = server.curl(&["--pinnedpubkey", &old_pin, "-k", &server.url("/healthz")]);
    assert_eq!(r.status.code(), Some(90));
    assert!(server.log().contains("TLS certificate replaced"), "{}", server.log());

    // A broken replacement keeps the working certificate and says why.
    replace(
        &server.tls_dir().join("cert.pem"),
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    );
    eventually(Duration::from_secs(10), "the refusal to be logged", || {
        server.log().contains("does not load; keeping the one in use").then_some(())
    });
    let r = server.curl(&["-k", &server.url("/tls/cert.pem")]);
    assert_eq!(r.stdout, cert, "still the last good certificate");
}

#[test]
fn the_install_line_token_create_prints_installs_over_pinned_tls() {
    let agent = fs::read(binary(AGENT_BIN)).unwrap();
    let server = TlsServer::start(&agent);
    let mut cmd = command(SERVER_BIN);
    cmd.args(["token", "create", "--uses", "1", "--listen", &format!("127.0.0.1:{}", server.port)])
        .arg("--data-dir")
        .arg(&server.data);
    let out = run_bounded(cmd, Duration::from_secs(15));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hints = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = hints.lines().map(str::trim).find(|l| l.starts_with("curl ")).unwrap_or_else(|| panic!("{hints}"));
    let host = tempfile::tempdir().unwrap();
    let prefix = host.path().join("prefix");
    // The printed line as is, plus a prefix so the test needs no root.
    let script = format!("{line} --prefix {} --no-service", prefix.display());
    let mut sh = Command::new("sh");
    sh.args(["-euc", &script]).env_remove("RM_ENROLL_TOKEN").env("TMPDIR", host.path()).stdin(Stdio::null());
    let out = run_bounded(sh, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent trusts exactly this server's key from now on and heartbeats over TLS.
    let installed = prefix.join("bin").join(AGENT_BIN);
    let mut run = Command::new(&installed);
    run.args(["run", "--once"]).stdin(Stdio::null());
    let out = run_bounded(run, Duration::from_secs(60));
    assert!(out.status.success(), "run --once over pinned TLS: {}", String::from_utf8_lossy(&out.stderr));
    let agents =
        server.curl(&["-k", "-H", "Authorization: Bearer tls-e2e-admin-token-0123456", &server.url("/api/v1/agents")]);
    let agents: serde_json::Value = serde_json::from_slice(&agents.stdout).unwrap();
    assert_eq!(agents["agents"].as_array().map(Vec::len), Some(1), "{agents}");
    assert_eq!(agents["agents"][0]["state"], "current", "{agents}");
    // A new key (a different server, or a man in the middle) is refused in words.
    let (cert, key) = another_pair();
    replace(&server.tls_dir().join("key.pem"), &key);
    replace(&server.tls_dir().join("cert.pem"), &cert);
    eventually(Duration::from_secs(10), "the new certificate", || {
        (server.curl(&["-k", &server.url("/tls/cert.pem")]).stdout == cert).then_some(())
    });
    let mut run = Command::new(&installed);
    run.args(["run", "--once"]).stdin(Stdio::null());
    let out = run_bounded(run, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not the pinned"), "{stderr}");
}
