//! Key-pinned bootstrap over TLS, end to end: the real server behind [`TlsProxy`] (rustls with rcgen certificates,
//! answering `/tls/cert.pem` as the server does when it speaks TLS), the real agent, real curl, `install.sh` under
//! dash. Loopback only. Run `cargo build --workspace` first.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rm_e2e::*;
use serde_json::{Value, json};

const ADMIN: &str = "rm-e2e-pin-admin-token-7f1d";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The real server with the host agent published for linux/amd64 and the repo's install script.
fn server() -> Server {
    let builder = ServerBuilder::new().env("RM_ADMIN_TOKEN", ADMIN);
    let bundled = builder.bundled_dir().to_path_buf();
    fs::copy(binary(AGENT_BIN), bundled.join("agent-binaries").join(LINUX_AMD64)).unwrap();
    fs::copy(repo_file("scripts/install.sh"), bundled.join("install/install.sh")).unwrap();
    builder.start()
}

fn token(server: &Server, uses: u64) -> String {
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({ "uses": uses, "note": "pin_e2e" })));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

/// `restic-manager-agent --config <config> <args>` with extra environment, bounded.
fn agent(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(AGENT_BIN);
    cmd.arg("--config").arg(config).args(args).envs(env.iter().copied());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().to_ascii_lowercase().ends_with("_proxy") || k == "INVOCATION_ID" {
            cmd.env_remove(k);
        }
    }
    run_bounded(cmd, TIMEOUT)
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", text(out));
}

#[track_caller]
fn refused(out: &Output, what: &str, words: &str) {
    assert!(!out.status.success(), "{what} should fail: {}", text(out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(words), "{what}: expected {words:?} in the error: {}", text(out));
    for noise in ["InvalidContentType", "rustls:", "io: "] {
        assert!(!err.contains(noise), "{what}: the error should be in words, not {noise:?}: {err}");
    }
}

fn enroll(config: &Path, server_url: &str, pin: &str, token: &str) -> Output {
    agent(config, &["enroll", "--server", server_url, "--pin", pin], &[("RM_ENROLL_TOKEN", token)])
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("rm-e2e-pin-").tempdir().unwrap();
    let config = dir.path().join("etc/agent.json");
    (dir, config)
}

fn entries(dir: &Path) -> Vec<String> {
    let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = read.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn self_signed_leaf_is_its_own_trust_anchor_and_renewals_keep_the_key() {
    let server = server();
    let key = new_key();
    let first = self_signed(&key, &CertSpec::default());
    let proxy = TlsProxy::start(server.addr(), &first);
    let (_dir, config) = scratch();

    let out = enroll(&config, &proxy.url(""), &first.pin, &token(&server, 1));
    ok(&out, "enroll --pin through the proxy");
    let anchor = config.with_file_name("server-cert.pem");
    let stored = fs::read_to_string(&anchor).expect("server-cert.pem beside the config");
    assert_eq!(stored.replace('\r', ""), first.pem.replace('\r', ""), "the leaf is the stored anchor");
    assert_eq!(fs::metadata(&anchor).unwrap().permissions().mode() & 0o777, 0o644);
    let saved: Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
    assert_eq!(saved["pin"], first.pin.as_str());
    assert_eq!(saved["server"], proxy.url("").as_str());
    assert_eq!(entries(config.parent().unwrap()), ["agent.json", "server-cert.pem"], "no temporary files left");

    ok(&agent(&config, &["run", "--once"], &[]), "run --once, pinned");
    ok(&agent(&config, &["update", "--check"], &[]), "update --check, pinned");
    let status = agent(&config, &["status"], &[]);
    ok(&status, "status, pinned");
    assert!(String::from_utf8_lossy(&status.stdout).contains("served build: "), "{}", text(&status));
    assert!(!String::from_utf8_lossy(&status.stdout).contains("unknown"), "{}", text(&status));

    // Renewed with the same key and the same subject: it chains to the old anchor as it is (same issuer name, same key).
    let same_subject = self_signed(&key, &CertSpec { serial: 3, ..CertSpec::default() });
    proxy.set_cert(&same_subject);
    let out = agent(&config, &["run", "--once"], &[]);
    ok(&out, "run --once, same key and subject");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("renewed"), "no re-anchoring needed: {}", text(&out));
    assert_eq!(fs::read_to_string(&anchor).unwrap().replace('\r', ""), first.pem.replace('\r', ""));

    // Renewed with the same key, another serial, validity and subject: it no longer chains to the stored anchor, so
    // the agent re-fetches it, sees the pinned key and re-anchors.
    let renewed = self_signed(
        &key,
        &CertSpec { common_name: "restic-manager renewed", serial: 2, not_before: (2024, 6, 1), ..CertSpec::default() },
    );
    proxy.set_cert(&renewed);
    let out = agent(&config, &["run", "--once"], &[]);
    ok(&out, "run --once after a renewal that kept the key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("renewed its certificate"), "{}", text(&out));
    assert_eq!(fs::read_to_string(&anchor).unwrap().replace('\r', ""), renewed.pem.replace('\r', ""), "re-anchored");
    ok(&agent(&config, &["update", "--check"], &[]), "update --check after the renewal");

    // A different key is refused, whatever the certificate says, and the anchor stays.
    let other = self_signed(&new_key(), &CertSpec::default());
    proxy.set_cert(&other);
    let out = agent(&config, &["run", "--once"], &[]);
    refused(&out, "run --once against another key", &format!("key is {}, not the pinned {}", other.pin, first.pin));
    assert!(String::from_utf8_lossy(&out.stderr).contains("man in the middle"), "{}", text(&out));
    assert_eq!(fs::read_to_string(&anchor).unwrap().replace('\r', ""), renewed.pem.replace('\r', ""));

    // A stored anchor whose key is not the pin (a replaced file) is refused at start, before any request.
    proxy.set_cert(&renewed);
    fs::write(&anchor, &other.pem).unwrap();
    for args in [&["run", "--once"][..], &["update", "--check"], &["status"]] {
        let out = agent(&config, args, &[]);
        refused(&out, &format!("{args:?} with a replaced anchor"), "not the pinned");
    }
}

#[test]
fn wrong_pin_is_refused_before_the_token_is_sent_and_nothing_is_written() {
    let server = server();
    let cert = self_signed(&new_key(), &CertSpec::default());
    let proxy = TlsProxy::start(server.addr(), &cert);
    let wrong = self_signed(&new_key(), &CertSpec::default()).pin;
    let token = token(&server, 1);
    let (dir, config) = scratch();
    let out = enroll(&config, &proxy.url(""), &wrong, &token);
    refused(
        &out,
        "enroll with the wrong pin",
        &format!(
            "the server's certificate key is {}, not the pinned {wrong}: refusing (wrong server or a man in the middle)",
            cert.pin
        ),
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "nothing written");
    // The one-use token was never sent: it still enrolls.
    ok(&enroll(&config, &proxy.url(""), &cert.pin, &token), "enroll with the right pin and the same token");

    // Malformed pins, --pin with http:// and --pin with --insecure are refused before any connection.
    let (dir, config) = scratch();
    for (args, words) in
        [(vec!["--pin", "sha256//short"], "not a pin"), (vec!["--pin", &cert.pin, "--insecure"], "cannot be used with")]
    {
        let url = proxy.url("");
        let mut all = vec!["enroll", "--server", &url];
        all.extend(args.iter().copied());
        let out = agent(&config, &all, &[("RM_ENROLL_TOKEN", "x")]);
        refused(&out, &format!("{all:?}"), words);
    }
    let http = server.url("");
    let out = agent(&config, &["enroll", "--server", &http, "--pin", &cert.pin], &[("RM_ENROLL_TOKEN", "x")]);
    refused(&out, "--pin with http://", "--pin needs an https:// server URL");
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "nothing written");
}

#[test]
fn expired_and_misnamed_certificates_are_explained() {
    let server = server();
    let key = new_key();
    let expired =
        self_signed(&key, &CertSpec { not_before: (2019, 1, 1), not_after: (2020, 1, 1), ..CertSpec::default() });
    let proxy = TlsProxy::start(server.addr(), &expired);
    let (dir, config) = scratch();
    let out = enroll(&config, &proxy.url(""), &expired.pin, &token(&server, 1));
    refused(
        &out,
        "enroll against an expired certificate",
        "the server's certificate has expired (not after 2020-01-01T00:00:00Z)",
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "nothing written");

    let misnamed = self_signed(&key, &CertSpec { names: &["other.example"], ..CertSpec::default() });
    proxy.set_cert(&misnamed);
    let out = enroll(&config, &proxy.url(""), &misnamed.pin, &token(&server, 1));
    refused(
        &out,
        "enroll against a certificate for another name",
        "the server's certificate is not valid for host 127.0.0.1",
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "nothing written");

    // Without a pin, a self-signed certificate is simply not trusted: the message says what to do.
    let out = agent(&config, &["enroll", "--server", &proxy.url("")], &[("RM_ENROLL_TOKEN", "x")]);
    refused(&out, "enroll without a pin", "--pin");
}

#[test]
fn https_to_a_plain_server_and_plain_http_to_another_host_are_explained() {
    let server = server();
    let (dir, config) = scratch();
    let https_to_plain = format!("https://{}", server.addr());
    let want =
        format!("the server at https://{} does not speak TLS; use http:// or enable TLS on the server", server.addr());
    let out = agent(&config, &["enroll", "--server", &https_to_plain], &[("RM_ENROLL_TOKEN", "x")]);
    refused(&out, "https:// to a plain server", &want);
    let pin = self_signed(&new_key(), &CertSpec::default()).pin;
    let out = enroll(&config, &https_to_plain, &pin, "x");
    refused(&out, "https:// to a plain server, pinned", &want);

    // Plain http to a host that is not this machine: refused before any connection (the name cannot even resolve,
    // and the answer comes at once), naming the flag.
    let started = Instant::now();
    let out = agent(&config, &["enroll", "--server", "http://rm-e2e.invalid:9"], &[("RM_ENROLL_TOKEN", "x")]);
    refused(&out, "plain http to another host", "--allow-plain-http");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing plain http"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    // With the flag it goes on to connect (and fails on the unresolvable name).
    let out = agent(
        &config,
        &["enroll", "--server", "http://rm-e2e.invalid:9", "--allow-plain-http"],
        &[("RM_ENROLL_TOKEN", "x")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"), "{}", text(&out));
    let out = agent(
        &config,
        &["enroll", "--server", "http://rm-e2e.invalid:9"],
        &[("RM_ENROLL_TOKEN", "x"), ("RM_ALLOW_PLAIN_HTTP", "true")],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"), "RM_ALLOW_PLAIN_HTTP: {}", text(&out));
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "nothing written");

    // A config that says plain http was not allowed is refused at run time too.
    fs::create_dir_all(config.parent().unwrap()).unwrap();
    let cfg = json!({"server": "http://rm-e2e.invalid:9", "agent_id": "a", "credential": "rmagt_a_x", "allow_plain_http": false});
    fs::write(&config, cfg.to_string()).unwrap();
    refused(&agent(&config, &["run", "--once"], &[]), "run with plain http to another host", "--allow-plain-http");
}

fn curl() -> Option<PathBuf> {
    tool("curl", &["/usr/bin/curl", "/bin/curl", "/usr/local/bin/curl"])
}

fn dash() -> Option<PathBuf> {
    tool("dash", &["/usr/bin/dash", "/bin/dash"])
}

#[test]
fn curl_checks_the_pin_even_with_insecure() {
    let Some(curl) = curl() else { return };
    let server = server();
    let cert = self_signed(&new_key(), &CertSpec::default());
    let proxy = TlsProxy::start(server.addr(), &cert);
    let wrong = self_signed(&new_key(), &CertSpec::default()).pin;
    let get = |pin: &str| {
        let mut cmd = Command::new(&curl);
        cmd.args(["-fsS", "--pinnedpubkey", pin, "-k", &proxy.url("/tls/cert.pem")]).stdin(Stdio::null());
        run_bounded(cmd, TIMEOUT)
    };
    let out = get(&cert.pin);
    ok(&out, "curl with the right pin");
    assert_eq!(String::from_utf8_lossy(&out.stdout), cert.pem);
    let out = get(&wrong);
    assert!(!out.status.success(), "curl with a wrong pin: {}", text(&out));
    assert_eq!(out.status.code(), Some(90), "CURLE_SSL_PINNEDPUBKEYNOTMATCH: {}", text(&out));
}

#[test]
fn install_sh_over_https_with_a_pin_under_dash() {
    let (Some(curl), Some(dash)) = (curl(), dash()) else { return };
    let server = server();
    let cert = self_signed(&new_key(), &CertSpec::default());
    let proxy = TlsProxy::start(server.addr(), &cert);
    let dir = tempfile::Builder::new().prefix("rm-e2e-pin-install-").tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let q = |w: &str| format!("'{}'", w.replace('\'', r"'\''"));
    let sh = |script: String| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).env("TMPDIR", &tmp).stdin(Stdio::null());
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("RM_") || name.to_ascii_lowercase().ends_with("_proxy") || name == "CURL_HOME" {
                cmd.env_remove(k);
            }
        }
        run_bounded(cmd, TIMEOUT)
    };
    let pipe = |pin: &str, env: &str| {
        format!(
            "{} -fsSL --pinnedpubkey {} -k {} | {env} {} -s -- --server {} --pin {} --prefix {} --no-service",
            q(curl.to_str().unwrap()),
            q(&cert.pin),
            q(&proxy.url("/install/install.sh")),
            q(dash.to_str().unwrap()),
            q(&proxy.url("")),
            q(pin),
            q(prefix.to_str().unwrap()),
        )
    };
    // A malformed pin and a pin with an http server fail before any request; so does a wrong pin (curl refuses).
    let before = server.log_json().iter().filter(|l| l["target"] == "access").count();
    for (pin, words) in [("sha256//abc", "not a pin"), ("sha1//AAAA", "not a pin")] {
        let out = sh(pipe(pin, ""));
        refused(&out, &format!("install.sh --pin {pin}"), words);
    }
    let out = sh(format!(
        "{} -fsSL --pinnedpubkey {} -k {} | {} -s -- --server {} --pin {} --prefix {} --no-service",
        q(curl.to_str().unwrap()),
        q(&cert.pin),
        q(&proxy.url("/install/install.sh")),
        q(dash.to_str().unwrap()),
        q(&server.url("")),
        q(&cert.pin),
        q(prefix.to_str().unwrap()),
    ));
    refused(&out, "install.sh --pin with an http server", "--pin needs an https:// server");
    let after = server.log_json().iter().filter(|l| l["target"] == "access").count();
    assert_eq!(after - before, 3, "only the three script downloads reached the server");
    let wrong = self_signed(&new_key(), &CertSpec::default()).pin;
    let out = sh(pipe(&wrong, ""));
    assert!(!out.status.success(), "install.sh with a wrong pin: {}", text(&out));
    assert!(!prefix.exists(), "nothing installed with a wrong pin: {}", text(&out));

    // The real thing.
    let out = sh(pipe(&cert.pin, &format!("RM_ENROLL_TOKEN={}", q(&token(&server, 1)))));
    ok(&out, "curl --pinnedpubkey | dash -s -- --pin");
    let config = prefix.join("etc/restic-manager/agent.json");
    let saved: Value =
        serde_json::from_slice(&fs::read(&config).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))).unwrap();
    assert_eq!(saved["pin"], cert.pin.as_str());
    assert!(config.with_file_name("server-cert.pem").is_file());
    assert_eq!(entries(&tmp), Vec::<String>::new(), "the installer cleaned up");
    let agent_bin = prefix.join("bin").join(AGENT_BIN);
    // The installed agent finds its config from its prefix.
    let mut cmd = Command::new(&agent_bin);
    cmd.args(["run", "--once"]).stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RM_") || k.to_string_lossy().to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(k);
        }
    }
    ok(&run_bounded(cmd, TIMEOUT), "the installed agent heartbeats through the pinned proxy");
}
