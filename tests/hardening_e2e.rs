//! Attacks on the real server binary that once succeeded, each reproduced here: links that downgraded to `http://`
//! behind a TLS proxy, a data volume filled through downloads, upload temp files left by a crash, a heartbeat that
//! told an unauthenticated caller how its body was wrong, and terminal escapes stored from agents.

use std::fs;

use rm_e2e::*;
use serde_json::{Value, json};

const TEMPLATE: &str = "#!/bin/sh\n{\nRM_DEFAULT_SERVER='__RM_SERVER_URL__'\necho \"$RM_DEFAULT_SERVER\"\n}\n";

/// A server with an agent build and an install template in its bundled dir.
fn server_with(env: &[(&str, &str)]) -> Server {
    let mut builder = Server::builder();
    fs::create_dir_all(builder.bundled_dir().join("agent-binaries")).unwrap();
    fs::create_dir_all(builder.bundled_dir().join("install")).unwrap();
    fs::write(builder.bundled_dir().join("agent-binaries").join(LINUX_AMD64), b"agent build one").unwrap();
    fs::write(builder.bundled_dir().join("install/install.sh"), TEMPLATE).unwrap();
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    builder.start()
}

/// Enrolls one agent; returns its credential.
fn enroll(server: &Server) -> String {
    let token = server.admin("POST", "/api/v1/tokens", Some(&json!({}))).json()["token"].as_str().unwrap().to_owned();
    let body =
        json!({"token": token, "hostname": "web-1", "os": "linux", "arch": "amd64", "version": "1", "commit": "c"});
    let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["credential"].as_str().unwrap().to_owned()
}

fn heartbeat(server: &Server, credential: &str, extra: &[(&str, &str)], body: &Value) -> Response {
    let auth = format!("Bearer {credential}");
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    server.send("POST", "/api/v1/agents/heartbeat", &headers, Some(body))
}

fn beat_body() -> Value {
    json!({"hostname": "web-1", "os": "linux", "arch": "amd64", "version": "1", "commit": "c", "seq": 1})
}

/// Every link this request would be given: the installer's default server, manifest URLs, the heartbeat's URL. Their
/// blob URLs are checked here to have the same origin as these names.
fn links(server: &Server, credential: &str, headers: &[(&str, &str)]) -> Vec<String> {
    let script = server.request("GET", "/install/install.sh", headers).text();
    let default = script.lines().find(|l| l.starts_with("RM_DEFAULT_SERVER=")).unwrap().to_owned();
    let manifest = server.request("GET", "/agent/manifest", headers).json();
    let beat = heartbeat(server, credential, headers, &beat_body()).json();
    let blobs = [&manifest["agents"][0]["blob_url"], &beat["update"]["blob_url"]];
    let blobs: Vec<String> =
        blobs.iter().map(|b| b.as_str().expect("a published build has a blob URL").to_owned()).collect();
    for blob in &blobs {
        assert!(blob.contains("/agent/blobs/sha256/"), "{blob}");
    }
    let names = [manifest["agents"][0]["url"].as_str().unwrap(), beat["update"]["url"].as_str().unwrap()];
    // Each blob URL has its name's origin: whatever decides one decides the other.
    for (name, blob) in names.iter().zip(&blobs) {
        assert_eq!(name.split("/agent/").next(), blob.split("/agent/").next(), "{name} / {blob}");
    }
    vec![default, names[0].to_owned(), names[1].to_owned()]
}

#[test]
fn links_never_downgrade_behind_a_tls_proxy() {
    let server = server_with(&[]);
    let credential = enroll(&server);
    let direct = links(&server, &credential, &[]);
    let origin = format!("http://127.0.0.1:{}", server.port());
    assert_eq!(direct[0], format!("RM_DEFAULT_SERVER='{origin}'"), "a direct request: this server speaks HTTP");
    assert!(direct[1].starts_with(&origin) && direct[2].starts_with(&origin), "{direct:?}");

    // A TLS-terminating proxy that nobody declared: before the fix every link was http://<Host>, so the agent sent
    // its credential in cleartext to port 80. Now: no scheme is guessed, links are relative, the installer asks.
    for forwarded in [
        vec![("X-Forwarded-Proto", "https")],
        vec![("Forwarded", "for=192.0.2.1;proto=https;host=rm.example.com")],
        vec![("X-Forwarded-Host", "rm.example.com")],
    ] {
        let got = links(&server, &credential, &forwarded);
        assert_eq!(got[0], "RM_DEFAULT_SERVER='__RM_SERVER_URL__'", "{forwarded:?}");
        assert!(got[1].starts_with("/agent/binary?") && got[2].starts_with("/agent/binary?"), "{forwarded:?}: {got:?}");
        assert!(!got.iter().any(|l| l.contains("http://")), "{forwarded:?}: {got:?}");
    }
    assert!(server.log().contains("--trusted-proxies"), "the operator is told what to set:\n{}", server.log_tail());

    // The same proxy, declared: its scheme and host are believed.
    let trusted = server_with(&[("RM_TRUSTED_PROXIES", "127.0.0.0/8")]);
    let credential = enroll(&trusted);
    let via_proxy =
        links(&trusted, &credential, &[("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "rm.example.com")]);
    assert_eq!(via_proxy[0], "RM_DEFAULT_SERVER='https://rm.example.com'");
    assert!(via_proxy[1..].iter().all(|l| l.starts_with("https://rm.example.com/agent/binary?")), "{via_proxy:?}");
    // A trusted proxy forwarding a hostile host or an unknown scheme gets no link at all.
    for hostile in [
        vec![("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "x';id;'")],
        vec![("X-Forwarded-Proto", "javascript")],
    ] {
        let got = links(&trusted, &credential, &hostile);
        assert_eq!(got[0], "RM_DEFAULT_SERVER='__RM_SERVER_URL__'", "{hostile:?}");
    }
}

#[test]
fn heartbeats_check_the_credential_before_the_body() {
    let server = server_with(&[]);
    let credential = enroll(&server);
    let garbage = json!({"hostname": "no spaces allowed", "os": "plan9", "arch": "mips"});
    // Before the fix a forged credential with a bad body got a 400 describing the body.
    for forged in ["rmagt_nobody_secret", "garbage"] {
        let r = heartbeat(&server, forged, &[], &garbage);
        assert_eq!(r.status, 401, "{forged}: {}", r.text());
        assert_eq!(r.json()["error"], "unauthorized");
    }
    let r = heartbeat(&server, &credential, &[], &garbage);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(heartbeat(&server, &credential, &[], &beat_body()).status, 200);
}

/// Characters that rewrite a terminal or reorder a page: ANSI escapes, CR/LF, NUL, bidi overrides and isolates.
const HOSTILE: [&str; 5] =
    ["\u{1b}[2J\u{1b}[31mpwned", "line\r\nInjected: yes", "nul\u{0}byte", "\u{202e}exe.txt", "a\u{2066}b\u{2069}"];

#[test]
fn terminal_escapes_and_bidi_controls_are_never_stored() {
    let server = server_with(&[]);
    let credential = enroll(&server);
    for hostile in HOSTILE {
        // Identity fields are refused outright…
        for field in ["version", "commit"] {
            let mut body = beat_body();
            body[field] = json!(hostile);
            assert_eq!(heartbeat(&server, &credential, &[], &body).status, 400, "{field}={hostile:?}");
        }
        let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": hostile})));
        assert_eq!(r.status, 400, "note={hostile:?}: {}", r.text());
        // …free text (an update error) is kept, with every such character blanked.
        let mut body = beat_body();
        body["last_update_error"] = json!(format!("update failed: {hostile}"));
        assert_eq!(heartbeat(&server, &credential, &[], &body).status, 200);
        let stored = server.admin("GET", "/api/v1/agents", None).json()["agents"][0]["last_update_error"].clone();
        let stored = stored.as_str().unwrap();
        assert!(stored.starts_with("update failed: "), "{stored:?}");
        assert!(rm_protocol_safe(stored), "{hostile:?} stored as {stored:?}");
    }
    // A user agent with a bidi override (header values cannot carry ESC or CR/LF, but UTF-8 passes).
    let r = server.request("GET", "/agent/binary?os=linux&arch=amd64", &[("User-Agent", "curl\u{202e}8.0")]);
    assert_eq!(r.status, 200);
    let events = eventually(std::time::Duration::from_secs(10), "the download audit record", || {
        let page = server.admin("GET", "/api/v1/audit?kind=download", None).json();
        page["events"].as_array().filter(|e| !e.is_empty()).cloned()
    });
    let agent = events[0]["user_agent"].as_str().unwrap();
    assert!(rm_protocol_safe(agent), "{agent:?}");
}

fn rm_protocol_safe(text: &str) -> bool {
    !text.chars().any(|c| {
        c.is_control()
            || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })
}

/// Files named `.upload-*` in the data dir's override dirs.
fn staging_files(server: &Server) -> Vec<std::path::PathBuf> {
    ["agent-binaries", "install"]
        .iter()
        .filter_map(|sub| fs::read_dir(server.data_dir().join(sub)).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".upload-"))
        .collect()
}

#[test]
fn upload_temp_files_left_by_a_kill_are_removed_at_start() {
    use std::io::Write;
    let mut server = server_with(&[("RM_ADMIN_TOKEN", "hardening-admin-token-0123")]);
    let mut uploads = Vec::new();
    for round in 0..3 {
        // An upload that announced 8 MiB and sent 1 MiB; the server has the temporary file open when it dies.
        let auth = format!("Bearer {}", server.admin_token());
        let path = format!("/api/v1/assets/agent-binaries/{LINUX_AMD64}");
        let head =
            request_head(server.addr(), "PUT", &path, &[("Authorization", &auth), ("Content-Length", "8388608")]);
        let mut stream = connect(server.addr()).unwrap();
        stream.write_all(&head).unwrap();
        stream.write_all(&vec![round as u8; 1 << 20]).unwrap();
        eventually(std::time::Duration::from_secs(10), "the upload's temporary file", || {
            (!staging_files(&server).is_empty()).then_some(())
        });
        server.sigkill();
        uploads.push(stream);
        assert_eq!(staging_files(&server).len(), 1, "SIGKILL leaves the temporary file (the attack)");
        server.restart();
        assert_eq!(staging_files(&server), Vec::<std::path::PathBuf>::new(), "restart {round} cleaned up");
    }
    assert!(server.log().contains("removed upload temporary files"), "{}", server.log_tail());
    // The bundled agent is still what is served; the dead uploads never became an override.
    let r = server.get("/agent/binary?os=linux&arch=amd64");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"agent build one"[..]));
}

/// A tmpfs of `mib` MiB mounted for one test (root only), unmounted when dropped.
struct SmallVolume {
    dir: tempfile::TempDir,
}

impl SmallVolume {
    fn mount(mib: u32) -> Option<SmallVolume> {
        let dir = tempfile::Builder::new().prefix("rm-e2e-volume-").tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallVolume { dir }),
            Ok(o) => {
                skip(format!(
                    "cannot mount a {mib} MiB tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skip(format!("cannot run mount: {e}"));
                None
            }
        }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn free_bytes(&self) -> u64 {
        let out = std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(self.path()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// `count` one-byte range requests over `connections` keep-alive connections; returns how long they took.
fn range_flood(server: &Server, connections: usize, count: usize) -> std::time::Duration {
    let started = std::time::Instant::now();
    let addr = server.addr();
    let threads: Vec<_> = (0..connections)
        .map(|i| {
            std::thread::spawn(move || {
                let mut conn = Conn::connect(addr).unwrap();
                let ua = format!("flood-{i}");
                for _ in 0..count / connections {
                    let r = conn
                        .request(
                            "GET",
                            "/agent/binary?os=linux&arch=amd64",
                            &[("Range", "bytes=0-0"), ("User-Agent", &ua)],
                            b"",
                        )
                        .unwrap();
                    assert_eq!(r.status, 206);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    started.elapsed()
}

#[test]
fn downloads_cannot_fill_the_data_volume_and_a_full_volume_keeps_agents_served() {
    let Some(volume) = SmallVolume::mount(16) else { return };
    let data = volume.path().join("data");
    fs::create_dir(&data).unwrap();
    let mut builder = Server::builder().with_data_dir(&data);
    fs::create_dir_all(builder.bundled_dir().join("agent-binaries")).unwrap();
    fs::write(builder.bundled_dir().join("agent-binaries").join(LINUX_AMD64), b"agent build one").unwrap();
    builder = builder.env("RM_ADMIN_TOKEN", "hardening-admin-token-0123");
    let server = builder.start();
    let credential = enroll(&server);

    // The attack: before the fix each request wrote an audit row and 30,000 of them filled this volume in 6 s.
    let free_before = volume.free_bytes();
    let took = range_flood(&server, 4, 30_000);
    let free_after = volume.free_bytes();
    let downloads =
        server.admin("GET", "/api/v1/audit?kind=download&limit=1000", None).json()["events"].as_array().unwrap().len();
    eprintln!(
        "30,000 one-byte range requests in {took:.1?}: {downloads} download records, volume free {} -> {} KiB",
        free_before / 1024,
        free_after / 1024
    );
    assert!(downloads <= 4, "one record per client, platform and build and interval, got {downloads}");
    assert!(free_before - free_after.min(free_before) < 2 << 20, "the volume shrank by more than 2 MiB");

    // Fill the volume to the last byte, as something else on it might.
    let filler = volume.path().join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
        let _ = f.sync_all();
    }
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.json()["reason"].as_str().unwrap().contains("full"), "{}", ready.text());
    assert_eq!(server.get("/healthz").status, 200);
    // Agents keep getting answers (and their updates) while nothing can be written…
    let mut saw_full = false;
    for i in 0..200 {
        let r = heartbeat(&server, &credential, &[], &beat_body());
        assert_eq!(r.status, 200, "heartbeat {i} on a full volume: {}", r.text());
        assert!(r.json()["update"]["sha256"].is_string());
        // …while writes that need space say so in words (507), never a bare 500.
        let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"note": format!("{i:0>200}")})));
        match r.status {
            201 => {}
            507 => {
                assert_eq!(r.json()["error"], "storage_full", "{}", r.text());
                saw_full = true;
                break;
            }
            other => panic!("token creation on a full volume answered {other}: {}", r.text()),
        }
    }
    assert!(saw_full, "200 token creations fit on a full volume?");
    let r = heartbeat(&server, &credential, &[], &beat_body());
    assert_eq!(r.status, 200);
    assert!(r.json()["config_revision"].is_u64(), "the unrecorded answer still carries the revision: {}", r.text());
    let r = server.get("/agent/binary?os=linux&arch=amd64");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"agent build one"[..]));

    // Space comes back: so does readiness, and writes work again.
    fs::remove_file(&filler).unwrap();
    eventually(std::time::Duration::from_secs(10), "ready again after freeing space", || {
        (server.get("/readyz").status == 200).then_some(())
    });
    assert_eq!(server.admin("POST", "/api/v1/tokens", Some(&json!({}))).status, 201);
    drop(server);
}
