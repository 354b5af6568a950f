//! End-to-end tests of the fleet-state API on the real `restic-manager-server` binary: atomic asset uploads
//! (interrupted, refused, concurrent with downloads), heartbeat durability across SIGKILL, the `token` command line
//! against a running server, and admin authentication on every admin route.
//! Run `cargo build --workspace` first (`make test` does).

use std::fs;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use rm_e2e::*;
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;
const ADMIN: &str = "rm-e2e-admin-token-5d1c0f";
const UPLOAD_PATH: &str = "/api/v1/assets/agent-binaries/restic-manager-agent-linux-amd64";
const UPLOAD_ROUTE: &str = "/api/v1/assets/{kind}/{name}";

fn agent_dir(root: &Path) -> PathBuf {
    root.join("agent-binaries")
}

fn agent_file(root: &Path) -> PathBuf {
    agent_dir(root).join(LINUX_AMD64)
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `dir` holds exactly `names` (in particular no `.upload-*` temporary file).
fn assert_dir_is(dir: &Path, names: &[&str], context: &str) {
    let found = entries(dir);
    assert_eq!(
        found,
        names,
        "{context}: unexpected entries in {} (a temporary upload file left behind?)",
        dir.display()
    );
}

fn assert_unchanged(path: &Path, expected: &[u8], context: &str) {
    let now = fs::read(path).unwrap_or_else(|e| panic!("{context}: reading {}: {e}", path.display()));
    assert!(
        now == expected,
        "{context}: {} changed ({} bytes now, {} before)",
        path.display(),
        now.len(),
        expected.len()
    );
}

/// GET of the linux/amd64 agent returns exactly `content`, announced with its checksum.
fn assert_served(server: &Server, content: &[u8], context: &str) {
    let r = server.get(BINARY_PATH);
    assert_eq!(r.status, 200, "{context}: {}", r.text());
    assert_eq!(r.expect_header("x-checksum-sha256"), sha256_hex(content), "{context}");
    assert!(r.body == content, "{context}: the served body is not the expected version ({} bytes)", r.body.len());
}

/// A server with a fixed admin token whose data dir already holds `agent` as the linux/amd64 binary.
fn server_with_agent(agent: &[u8], builder: ServerBuilder) -> Server {
    let builder = builder.env("RM_ADMIN_TOKEN", ADMIN);
    write_file(&agent_file(builder.data_dir()), agent);
    builder.start()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// PUT `body` to `path` with the admin token (and `X-Checksum-Sha256` when given), `Content-Length` framing.
fn put(server: &Server, path: &str, body: &[u8], checksum: Option<&str>) -> Response {
    let auth = bearer(ADMIN);
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(sum) = checksum {
        headers.push(("X-Checksum-Sha256", sum));
    }
    http_request_with_body(server.addr(), "PUT", path, &headers, body)
        .unwrap_or_else(|e| panic!("PUT {path} failed: {e}\n{}", server.log_tail()))
}

/// The head of an upload request with the given framing header (`Content-Length` or `Transfer-Encoding: chunked`),
/// for a raw socket that then misbehaves.
fn upload_head(server: &Server, framing: (&str, &str)) -> Vec<u8> {
    request_head(server.addr(), "PUT", UPLOAD_PATH, &[("Authorization", &bearer(ADMIN)), framing])
}

/// A raw connection to the server, for a client that misbehaves on purpose.
fn raw_socket(server: &Server) -> TcpStream {
    connect(server.addr()).expect("connecting")
}

/// One chunk of chunked transfer coding.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Waits until the upload's temporary file exists in `dir` and holds at least `min` bytes: the server is streaming
/// the body to disk. Returns its name.
fn wait_for_temp_file(server: &Server, dir: &Path, min: u64) -> String {
    let found = poll(Duration::from_secs(10), || {
        fs::read_dir(dir).unwrap().map(Result::unwrap).find_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            (name.starts_with(".upload-") && entry.metadata().is_ok_and(|m| m.len() >= min)).then_some(name)
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "no .upload-* file of at least {min} bytes appeared in {} within 10s; entries: {:?}\n{}",
            dir.display(),
            entries(dir),
            server.log_tail()
        )
    })
}

fn is_upload_line(line: &Value) -> bool {
    line["target"] == "access" && line["method"] == "PUT" && line["route"] == UPLOAD_ROUTE
}

/// Waits for the access-log line of the `n`th upload request (the server writes it once the request is over) and
/// returns it.
fn wait_for_upload_line(server: &Server, n: usize, what: &str) -> Value {
    let lines = server.wait_for_log_lines(what, n, Duration::from_secs(10), is_upload_line);
    lines[n - 1].clone()
}

/// Closes with a RST instead of a FIN (SO_LINGER with a zero timeout).
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a descriptor owned by `stream`, with a correctly sized `linger` option.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------------------------

#[test]
fn interrupted_upload_leaves_old_file_and_no_temp() {
    let a = random_bytes(0xA1, 2 * MIB + 17);
    let server = server_with_agent(&a, Server::builder());
    let dir = agent_dir(server.data_dir());
    let b = random_bytes(0xB1, 3 * MIB);

    // (how the body is framed, how the client goes away)
    let cases = [
        ("content-length, 3 of 8 MiB, then FIN", false, false),
        ("chunked, cut inside a chunk, then FIN", true, false),
        ("content-length, 3 of 8 MiB, then RST", false, true),
    ];
    for (n, (case, chunked, rst)) in cases.into_iter().enumerate() {
        let mut stream = raw_socket(&server);
        let length = (8 * MIB).to_string();
        let framing = if chunked { ("Transfer-Encoding", "chunked") } else { ("Content-Length", length.as_str()) };
        stream.write_all(&upload_head(&server, framing)).unwrap();
        for piece in b.chunks(64 * 1024) {
            if chunked {
                stream.write_all(&chunk(piece)).unwrap();
            } else {
                stream.write_all(piece).unwrap();
            }
        }
        if chunked {
            // A chunk that announces 64 KiB and delivers half of it.
            stream.write_all(format!("{:x}\r\n", 64 * 1024).as_bytes()).unwrap();
            stream.write_all(&b[..32 * 1024]).unwrap();
        }
        // The server is writing the body to a temporary file in the target directory...
        let temp = wait_for_temp_file(&server, &dir, 2 * MIB as u64);
        // ...when the client goes away.
        if rst {
            reset_on_close(&stream);
        } else {
            stream.shutdown(Shutdown::Both).unwrap();
        }
        drop(stream);

        let line = wait_for_upload_line(&server, n + 1, &format!("for the interrupted upload ({case})"));
        let status = line["status"].as_u64().unwrap_or(0);
        assert!(!(200..300).contains(&status), "{case}: an interrupted upload was logged as {status}: {line}");
        eprintln!("{case}: temp file {temp}, access log: status {status}");
        assert_unchanged(&agent_file(server.data_dir()), &a, case);
        assert_dir_is(&dir, &[LINUX_AMD64], case);
        assert_served(&server, &a, case);
    }
    let uploads = server.log_json().into_iter().filter(|l| l["message"] == "asset uploaded").count();
    assert_eq!(uploads, 0, "an interrupted upload was reported as uploaded\n{}", server.log_tail());
}

#[test]
fn checksum_mismatch_is_refused() {
    let a = random_bytes(0xA2, 256 * 1024);
    let server = server_with_agent(&a, Server::builder().env("RM_MAX_UPLOAD_SIZE", "1MiB"));
    let dir = agent_dir(server.data_dir());
    let path = agent_file(server.data_dir());
    let b = random_bytes(0xB2, 512 * 1024);

    // A body that does not match its announced checksum.
    let wrong = sha256_hex(b"something else");
    let r = put(&server, UPLOAD_PATH, &b, Some(&wrong));
    assert_eq!(r.status, 422, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "checksum_mismatch", "{body}");
    assert_eq!(body["expected"], wrong, "{body}");
    assert_eq!(body["actual"], sha256_hex(&b), "{body}");
    assert_unchanged(&path, &a, "checksum mismatch");
    assert_dir_is(&dir, &[LINUX_AMD64], "checksum mismatch");

    // A checksum that is not one: refused before anything is written.
    let r = put(&server, UPLOAD_PATH, &b, Some("not-hex"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid_request");
    assert_unchanged(&path, &a, "malformed checksum");
    assert_dir_is(&dir, &[LINUX_AMD64], "malformed checksum");

    // Declared 2 MiB against a 1 MiB limit: answered from the headers alone, no body sent.
    let mut stream = raw_socket(&server);
    stream.write_all(&upload_head(&server, ("Content-Length", &(2 * MIB).to_string()))).unwrap();
    let r = read_response(&mut stream, &mut Vec::new(), false).expect("a response to the oversize head");
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    assert_eq!(r.json()["limit"], MIB, "{}", r.text());
    drop(stream);
    assert_unchanged(&path, &a, "declared oversize");
    assert_dir_is(&dir, &[LINUX_AMD64], "declared oversize");

    // Chunked, no declared size, running past the limit: refused mid-stream. The server answers and closes while
    // the client is still sending, so the response is read concurrently (before a RST can discard it).
    let stream = raw_socket(&server);
    let mut reader = stream.try_clone().unwrap();
    let got_response = Arc::new(AtomicBool::new(false));
    let flag = got_response.clone();
    let read_thread = std::thread::spawn(move || {
        let r = read_response(&mut reader, &mut Vec::new(), false);
        flag.store(true, Ordering::SeqCst);
        r
    });
    let mut writer = stream;
    let big = random_bytes(0xC2, 4 * MIB);
    let mut sent = 0;
    let mut write_error = None;
    writer.write_all(&upload_head(&server, ("Transfer-Encoding", "chunked"))).unwrap();
    for piece in big.chunks(32 * 1024) {
        if got_response.load(Ordering::SeqCst) {
            break;
        }
        match writer.write_all(&chunk(piece)) {
            Ok(()) => sent += piece.len(),
            Err(e) => {
                write_error = Some(e);
                break;
            }
        }
    }
    let r = read_thread.join().unwrap().unwrap_or_else(|e| {
        panic!("no response to the oversize chunked upload ({sent} bytes sent, write error {write_error:?}): {e}")
    });
    eprintln!("chunked oversize: refused after {sent} body bytes were sent (write error: {write_error:?})");
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    assert!(sent > MIB, "the server refused after {sent} bytes, before the limit was reached");
    drop(writer);
    assert_unchanged(&path, &a, "chunked oversize");
    assert_dir_is(&dir, &[LINUX_AMD64], "chunked oversize");

    // The limit is inclusive, and a correct upload after all these refusals replaces the file.
    let c = random_bytes(0xD2, MIB);
    let r = put(&server, UPLOAD_PATH, &c, Some(&sha256_hex(&c)));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["replaced"], true);
    assert_eq!(r.json()["size"], MIB);
    assert_dir_is(&dir, &[LINUX_AMD64], "after a good upload");
    assert_served(&server, &c, "after a good upload");
}

/// One download: when it ran, what it announced and which known version its body was.
struct Fetched {
    start: Instant,
    end: Instant,
    /// Index into the versions, or an error describing what came back.
    version: Result<usize, String>,
}

#[test]
fn concurrent_downloads_during_upload_each_get_one_version() {
    const SIZE: usize = 24 * MIB;
    const DOWNLOADERS: usize = 8;
    let versions: Arc<Vec<Vec<u8>>> = Arc::new((0..4).map(|i| random_bytes(0x30 + i, SIZE)).collect());
    let sums: Arc<Vec<String>> = Arc::new(versions.iter().map(|v| sha256_hex(v)).collect());
    let server = server_with_agent(&versions[0], Server::builder());
    let addr = server.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let fetched = Arc::new(Mutex::new(Vec::<Fetched>::new()));
    let threads: Vec<_> = (0..DOWNLOADERS)
        .map(|_| {
            let (versions, sums, stop, fetched) = (versions.clone(), sums.clone(), stop.clone(), fetched.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    let version = match http_get(addr, BINARY_PATH) {
                        Err(e) => Err(format!("request failed: {e}")),
                        Ok(r) if r.status != 200 => Err(format!("status {}: {}", r.status, r.text())),
                        Ok(r) => {
                            let announced = r.header("x-checksum-sha256").unwrap_or("(none)").to_string();
                            match versions.iter().position(|v| *v == r.body) {
                                Some(i) if sums[i] == announced => Ok(i),
                                Some(i) => Err(format!("body is version {i}, header says {announced}")),
                                None => Err(format!(
                                    "body ({} bytes, sha256 {}) is none of the versions; header says {announced}",
                                    r.body.len(),
                                    sha256_hex(&r.body)
                                )),
                            }
                        }
                    };
                    fetched.lock().unwrap().push(Fetched { start, end: Instant::now(), version });
                }
            })
        })
        .collect();

    // Let the downloads get going, then replace the file three times through the API.
    std::thread::sleep(Duration::from_millis(300));
    let mut uploads = Vec::new();
    for (i, version) in versions.iter().enumerate().skip(1) {
        let start = Instant::now();
        let r = put(&server, UPLOAD_PATH, version, Some(&sums[i]));
        let end = Instant::now();
        assert_eq!(r.status, 200, "upload of version {i}: {}", r.text());
        assert_eq!(r.json()["sha256"], sums[i]);
        assert_eq!(r.json()["replaced"], true);
        uploads.push((start, end));
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }

    let fetched = fetched.lock().unwrap();
    let errors: Vec<_> = fetched.iter().filter_map(|f| f.version.as_ref().err()).collect();
    assert!(errors.is_empty(), "{} of {} downloads were wrong: {errors:#?}", errors.len(), fetched.len());
    let mut straddling = 0;
    let mut old_after_replace = 0;
    for f in fetched.iter() {
        let v = *f.version.as_ref().unwrap();
        for (k, (up_start, up_end)) in uploads.iter().enumerate() {
            // Upload k installed version k + 1.
            if f.start > *up_end {
                assert!(v > k, "a download started after version {} was installed but got version {v}", k + 1);
            }
            if f.end < *up_start {
                assert!(v <= k, "a download finished before version {} was uploaded but got it", k + 1);
            }
            if f.start < *up_end && f.end > *up_end {
                straddling += 1;
                if v == k {
                    old_after_replace += 1;
                }
            }
        }
    }
    let per_version: Vec<usize> =
        (0..versions.len()).map(|i| fetched.iter().filter(|f| f.version == Ok(i)).count()).collect();
    let upload_ms: Vec<u128> = uploads.iter().map(|(s, e)| (*e - *s).as_millis()).collect();
    let download_ms: u128 = fetched.iter().map(|f| (f.end - f.start).as_millis()).sum::<u128>() / fetched.len() as u128;
    eprintln!(
        "{} downloads (per version {per_version:?}, {download_ms} ms on average); uploads took {upload_ms:?} ms; \
         {straddling} downloads were in flight when an upload finished, {old_after_replace} of them completed the \
         replaced version",
        fetched.len()
    );
    assert!(straddling >= 1, "no download overlapped the end of an upload: the test proved nothing");
    assert_served(&server, &versions[3], "after the uploads");
    assert_dir_is(&agent_dir(server.data_dir()), &[LINUX_AMD64], "after the uploads");
}

/// What one heartbeat thread saw.
#[derive(Debug, Default)]
struct HeartbeatLoad {
    /// Highest seq answered 200.
    acked: u64,
    /// Highest seq sent.
    sent: u64,
    /// Answers other than 200 (e.g. 503 busy), with the first one.
    refused: u64,
    first_refusal: Option<String>,
    /// Why the thread stopped, and when.
    stopped_by: Option<String>,
    stopped_at: Option<Instant>,
}

#[test]
fn heartbeats_survive_sigkill() {
    const AGENTS: usize = 16;
    // The admin token is the generated one in <data dir>/admin.token: the restart must pick up the same one.
    let mut server = Server::start();
    let token_file = fs::read_to_string(server.data_dir().join("admin.token")).unwrap();

    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": AGENTS, "expires_in": "1h"})));
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let agents: Vec<(String, String)> = (0..AGENTS)
        .map(|i| {
            let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&enroll_body(&token, &format!("hb-{i}"))));
            assert_eq!(r.status, 201, "enrollment {i}: {}", r.text());
            let v = r.json();
            (v["agent_id"].as_str().unwrap().to_string(), v["credential"].as_str().unwrap().to_string())
        })
        .collect();

    let addr = server.addr();
    let give_up = Arc::new(AtomicBool::new(false));
    let total_acked = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(AGENTS + 1));
    let threads: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, (id, credential))| {
            let (id, auth) = (id.clone(), bearer(credential));
            let (give_up, total_acked, start) = (give_up.clone(), total_acked.clone(), start.clone());
            std::thread::spawn(move || {
                let mut load = HeartbeatLoad::default();
                let mut conn = Conn::connect(addr).expect("connecting for heartbeats");
                start.wait();
                let stop = |load: &mut HeartbeatLoad, why: String| {
                    load.stopped_by = Some(why);
                    load.stopped_at = Some(Instant::now());
                };
                loop {
                    if give_up.load(Ordering::Relaxed) {
                        stop(&mut load, "gave up: the server was not killed".into());
                        break;
                    }
                    let seq = load.sent + 1;
                    let body = heartbeat_body(&format!("hb-{i}"), seq);
                    load.sent = seq;
                    match conn.request("POST", "/api/v1/agents/heartbeat", &[("Authorization", &auth), JSON], &body) {
                        Ok(r) if r.status == 200 && r.text().contains(&id) => {
                            load.acked = seq;
                            total_acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            load.refused += 1;
                            load.first_refusal.get_or_insert_with(|| format!("{}: {}", r.status, r.text()));
                        }
                        Err(e) => {
                            stop(&mut load, format!("{:?}: {e}", e.kind()));
                            break;
                        }
                    }
                }
                load
            })
        })
        .collect();

    start.wait();
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let acked_before_kill = total_acked.load(Ordering::SeqCst);
    let killed_at = Instant::now();
    let status = server.sigkill();
    eprintln!(
        "SIGKILL after {:?} of load ({acked_before_kill} heartbeats acknowledged): {status}",
        load_started.elapsed()
    );
    // Every thread must stop on its own once the connections die; this only bounds a hang.
    let watchdog = {
        let give_up = give_up.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(15));
            give_up.store(true, Ordering::SeqCst);
        })
    };
    let loads: Vec<HeartbeatLoad> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    drop(watchdog);

    for (i, load) in loads.iter().enumerate() {
        let why = load.stopped_by.as_deref().unwrap_or("?");
        assert!(!why.starts_with("gave up"), "agent {i}: heartbeats kept succeeding after the SIGKILL: {load:?}");
        assert!(load.stopped_at.is_some_and(|t| t >= killed_at), "agent {i} stopped before the kill: {load:?}");
        assert_eq!(load.refused, 0, "agent {i}: heartbeats were refused: {load:?}");
        assert!(load.acked > 0, "agent {i}: no heartbeat was acknowledged: {load:?}");
    }
    let total: u64 = loads.iter().map(|l| l.acked).sum();
    eprintln!(
        "acknowledged {total} heartbeats ({:.0}/s); per agent: {:?}",
        total as f64 / 1.5,
        loads.iter().map(|l| l.acked).collect::<Vec<_>>()
    );
    assert!(total > 500, "only {total} heartbeats were acknowledged before the kill: not a meaningful load");

    server.restart();
    assert_eq!(fs::read_to_string(server.data_dir().join("admin.token")).unwrap(), token_file, "admin token changed");
    let r = server.admin("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json()["agents"].as_array().expect("agents array").clone();
    assert_eq!(listed.len(), AGENTS, "{listed:?}");
    for ((id, _), load) in agents.iter().zip(&loads) {
        let rec = listed.iter().find(|a| a["id"] == id.as_str()).unwrap_or_else(|| panic!("agent {id} is gone"));
        let (last_seq, heartbeats) = (rec["last_seq"].as_u64().unwrap(), rec["heartbeats"].as_u64().unwrap());
        assert!(
            last_seq >= load.acked,
            "agent {id}: acknowledged seq {} but only {last_seq} survived the SIGKILL: {rec}",
            load.acked
        );
        assert!(last_seq <= load.sent, "agent {id}: stored seq {last_seq} was never sent (max {}): {rec}", load.sent);
        assert!(heartbeats >= load.acked && heartbeats <= load.sent, "agent {id}: heartbeats {heartbeats}, {load:?}");
    }
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

fn enroll_body(token: &str, hostname: &str) -> Value {
    json!({"token": token, "hostname": hostname, "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "e2e"})
}

fn heartbeat_body(hostname: &str, seq: u64) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"hostname": hostname, "os": "linux", "arch": "amd64", "version": "1.2.3", "commit": "e2e", "seq": seq}),
    )
    .unwrap()
}

/// Runs `restic-manager-server token …` against `data_dir`; returns (success, stdout, stderr).
fn token_cli(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = command(SERVER_BIN);
    cmd.arg("token").args(args).env("RM_DATA_DIR", data_dir);
    let out = run_bounded(cmd, Duration::from_secs(15));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The `id=` field of a `token` command's description line.
fn token_id(description: &str) -> String {
    description
        .split_whitespace()
        .find_map(|w| w.strip_prefix("id="))
        .unwrap_or_else(|| panic!("no id= in {description:?}"))
        .to_string()
}

#[test]
fn token_cli_and_enrollment_end_to_end() {
    let agent = random_bytes(0x55, 100_003);
    let server = server_with_agent(&agent, Server::builder());
    let enroll =
        |token: &str, host: &str| server.send("POST", "/api/v1/agents/enroll", &[], Some(&enroll_body(token, host)));

    // A one-use token from the command line, beside the running server.
    let (ok, stdout, stderr) = token_cli(server.data_dir(), &["create", "--uses", "1", "--expires", "1h"]);
    assert!(ok, "token create failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be the token alone: {stdout:?}");
    let once = lines[0].to_string();
    assert!(once.starts_with("rmenr_"), "{once:?}");
    assert!(stderr.contains("uses=0/1") && stderr.contains("status=active"), "{stderr}");
    let once_id = token_id(&stderr);

    let r = enroll(&once, "cli-host-1");
    assert_eq!(r.status, 201, "{}", r.text());
    let enrolled = r.json();
    let agent_id = enrolled["agent_id"].as_str().unwrap().to_string();
    let credential = enrolled["credential"].as_str().unwrap().to_string();
    assert!(credential.starts_with(&format!("rmagt_{agent_id}_")), "{enrolled}");

    let r = enroll(&once, "cli-host-2");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "token_used_up", "{}", r.text());

    let (ok, stdout, stderr) = token_cli(server.data_dir(), &["list"]);
    assert!(ok, "token list failed: {stderr}");
    let line = stdout.lines().find(|l| l.contains(&format!("id={once_id} "))).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("uses=1/1") && line.contains("status=used_up"), "{line}");
    assert!(!stdout.contains(&once), "token list printed a secret: {stdout}");

    // Another token, revoked from the command line before anyone uses it.
    let (ok, stdout, stderr) = token_cli(server.data_dir(), &["create", "--note", "to revoke"]);
    assert!(ok, "token create failed: {stderr}");
    let revoked = stdout.trim().to_string();
    let revoked_id = token_id(&stderr);
    let (ok, stdout, stderr) = token_cli(server.data_dir(), &["revoke", &revoked_id]);
    assert!(ok, "token revoke failed: {stderr}");
    assert!(stdout.contains("status=revoked"), "{stdout}");
    let r = enroll(&revoked, "cli-host-3");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "token_revoked", "{}", r.text());
    let (ok, _, stderr) = token_cli(server.data_dir(), &["revoke", "no-such-token"]);
    assert!(!ok && stderr.contains("no-such-token"), "revoking an unknown id: {stderr}");

    // The command line and the API see the same tokens.
    let r = server.admin("GET", "/api/v1/tokens", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let tokens = r.json()["tokens"].as_array().unwrap().clone();
    let status_of = |id: &str| tokens.iter().find(|t| t["id"] == id).map(|t| t["status"].clone());
    assert_eq!(status_of(&once_id), Some(json!("used_up")), "{tokens:?}");
    assert_eq!(status_of(&revoked_id), Some(json!("revoked")), "{tokens:?}");

    // The credential works.
    let auth = bearer(&credential);
    let r = http_request_with_body(
        server.addr(),
        "POST",
        "/api/v1/agents/heartbeat",
        &[("Authorization", &auth), JSON],
        &heartbeat_body("cli-host-1", 1),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // Audit: the enrollment, then a download with the sha256 of what was served.
    let r = server.admin("GET", "/api/v1/audit?kind=enroll", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.json()["events"].as_array().unwrap().clone();
    assert_eq!(events.len(), 1, "one successful enrollment, {events:?}");
    assert_eq!(events[0]["agent_id"], agent_id.as_str(), "{events:?}");
    assert_eq!(events[0]["remote_addr"], "127.0.0.1", "{events:?}");
    assert_eq!(events[0]["user_agent"], "rm-e2e", "{events:?}");

    assert_served(&server, &agent, "download");
    let sha = sha256_hex(&agent);
    let download = poll(Duration::from_secs(5), || {
        let r = server.admin("GET", "/api/v1/audit?kind=download", None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["events"].as_array().unwrap().first().cloned()
    })
    .unwrap_or_else(|| panic!("no download audit event within 5s\n{}", server.log_tail()));
    assert_eq!(download["sha256"], sha.as_str(), "{download}");
    assert_eq!(download["source"], "data-dir", "{download}");
    assert_eq!(download["remote_addr"], "127.0.0.1", "{download}");
    assert!(download["platform"].as_str().is_some_and(|p| p.contains("linux")), "{download}");
}

#[test]
fn admin_routes_reject_missing_and_wrong_tokens() {
    let builder = Server::builder().env("RM_ADMIN_TOKEN", ADMIN);
    let install = builder.data_dir().join("install");
    write_file(&install.join("x.sh"), b"original\n");
    let server = builder.start();

    // Credentials that are not the admin token, including real ones of other kinds.
    let r = server.admin("POST", "/api/v1/tokens", Some(&json!({"uses": 1})));
    assert_eq!(r.status, 201, "{}", r.text());
    let enroll_token = r.json()["token"].as_str().unwrap().to_string();
    let r = server.send("POST", "/api/v1/agents/enroll", &[], Some(&enroll_body(&enroll_token, "h")));
    assert_eq!(r.status, 201, "{}", r.text());
    let credential = r.json()["credential"].as_str().unwrap().to_string();
    let wrong = admin_auth::bad_credentials(ADMIN, &enroll_token, &credential);
    for (method, path, body) in admin_auth::ADMIN_ROUTES {
        for (what, auth) in &wrong {
            let mut headers = vec![JSON];
            if let Some(auth) = auth {
                headers.push(("Authorization", auth));
            }
            let r = http_request_with_body(server.addr(), method, path, &headers, body)
                .unwrap_or_else(|e| panic!("{method} {path} with {what}: {e}"));
            let context = format!("{method} {path} with {what}");
            assert_eq!(r.status, 401, "{context}: {}", r.text());
            assert_eq!(r.json()["error"], "unauthorized", "{context}: {}", r.text());
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{context}: {:?}", r.headers);
            assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{context}");
        }
    }

    // Nothing was written or removed, no token created or revoked, nothing audited as an upload or delete.
    assert_dir_is(&install, &["x.sh"], "after unauthorized requests");
    assert_unchanged(&install.join("x.sh"), b"original\n", "after unauthorized requests");
    let r = server.admin("GET", "/api/v1/tokens", None);
    let tokens = r.json()["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(tokens[0]["revoked_at"], Value::Null, "{tokens:?}");
    let r = server.admin("GET", "/api/v1/audit", None);
    let kinds: Vec<String> =
        r.json()["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["enroll"], "{}", r.text());

    // The same routes with the admin token are let through (so the 401s above were about the token).
    let auth = bearer(ADMIN);
    let lowercase = format!("bearer {ADMIN}");
    for (method, path, body) in admin_auth::ADMIN_ROUTES {
        let headers = [JSON, ("Authorization", if *method == "GET" { lowercase.as_str() } else { auth.as_str() })];
        let r = http_request_with_body(server.addr(), method, path, &headers, body).unwrap();
        assert_ne!(r.status, 401, "{method} {path} with the admin token: {}", r.text());
        assert!(r.status < 500, "{method} {path} with the admin token: {}", r.text());
    }
    assert_dir_is(&install, &["new.sh"], "after authorized requests");
}
