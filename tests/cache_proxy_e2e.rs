//! A real HTTP cache in front of the real server: Debian's nginx with the configuration `deploy/README.md` documents
//! (read from that file, so the documented configuration is the tested one), started on a free loopback port.
//!
//! 200 lightweight clients fetch the manifest through the cache, take their platform's `blob_url` and download it
//! at once: every one gets the announced bytes, and the server serves that blob exactly once (counted in its own
//! access log). After an override upload the same clients, through the same cache and with no purge, get the new
//! build, again with one read at the server; the old blob URL still serves the old bytes from the cache, and the
//! names (`/agent/binary`, the manifest) are never answered stale.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use rm_e2e::{
    Response, Server, free_port, http_request, http_request_with_body, poll, random_bytes, repo_file, sha256_hex, tool,
    wait_timeout,
};

const AGENT: &str = "restic-manager-agent-linux-amd64";
const CLIENTS: usize = 200;
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The nginx configuration of `deploy/README.md`'s "Putting an HTTP cache in front": the first `nginx` block after
/// that heading.
fn documented_config() -> String {
    let readme = fs::read_to_string(repo_file("deploy/README.md")).unwrap();
    let section = readme.split("## Putting an HTTP cache in front").nth(1).expect("deploy/README.md has the section");
    let block = section.split("```nginx\n").nth(1).expect("the section has an nginx block");
    block.split("\n```").next().unwrap().to_string()
}

/// Replaces `from` (which must occur exactly once) by `to`.
fn substitute(config: &str, from: &str, to: &str) -> String {
    assert_eq!(config.matches(from).count(), 1, "the documented configuration should hold {from:?} once:\n{config}");
    config.replace(from, to)
}

/// nginx run by the test: its own prefix, pid, logs, temporary and cache paths under `dir`, in the foreground with
/// a master process, in a process group of its own. Stopped (SIGTERM, then SIGKILL of its group) on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx with the documented configuration in front of `origin`, on a free port (another one if the port
    /// was taken meanwhile). `None`: no nginx here (the test is skipped, and fails under CI).
    fn start(origin: SocketAddr, dir: &Path) -> Option<Nginx> {
        let nginx = tool("nginx", &["/usr/sbin/nginx"])?;
        for _ in 0..5 {
            let addr = free_port();
            let conf = dir.join("nginx.conf");
            fs::write(&conf, Self::config(origin, addr, dir)).unwrap();
            let stderr = fs::File::create(dir.join("nginx.stderr")).unwrap();
            let mut cmd = Command::new(&nginx);
            cmd.arg("-p").arg(dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("error.log"));
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
            let mut nginx = Nginx { child, addr, dir: dir.to_path_buf() };
            let up = poll(Duration::from_secs(20), || {
                if nginx.child.try_wait().unwrap().is_some() {
                    return Some(false);
                }
                http_request(addr, "GET", "/healthz", &[]).is_ok_and(|r| r.status == 200).then_some(true)
            });
            match up {
                Some(true) => return Some(nginx),
                Some(false) if nginx.log().contains("Address already in use") => continue,
                _ => panic!("nginx did not start on {addr} in front of {origin}:\n{}", nginx.log()),
            }
        }
        panic!("nginx found no free port in 5 attempts");
    }

    /// The documented `http { }` configuration with the test's addresses and cache path, wrapped in what a test
    /// instance needs (its own pid, logs and temporary paths; workers as this user).
    fn config(origin: SocketAddr, listen: SocketAddr, dir: &Path) -> String {
        let d = dir.display();
        let mut http = documented_config();
        http = substitute(&http, "/var/cache/nginx/restic-manager", &format!("{d}/cache"));
        http = substitute(&http, "server 10.0.0.5:8080;", &format!("server {origin};"));
        http = substitute(&http, "listen 80;", &format!("listen {listen};"));
        // Run as root (CI), nginx would switch its workers to `nobody`, who cannot write under a private temp dir.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 { "user root root;" } else { "" };
        format!(
            "{user}
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    log_format cache '$request_method $request_uri $status $upstream_cache_status';
    access_log {d}/access.log cache;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}
}}
"
        )
    }

    fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("--- nginx stderr ---\n{}--- error.log ---\n{}", read("nginx.stderr"), read("error.log"))
    }

    fn get(&self, path: &str) -> Response {
        http_request(self.addr, "GET", path, &[]).unwrap_or_else(|e| panic!("GET {path} through nginx: {e}"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signals to our own child and to the process group it leads (its workers); nothing else is in it.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

/// An agent build: incompressible bytes with a build-info marker, as the server reads it from real agents.
fn build(seed: u64, version: &str) -> Vec<u8> {
    let mut bytes = random_bytes(seed, 1 << 20);
    bytes.extend_from_slice(format!("\0rm-buildinfo:v1;version={version};commit=c{seed};date=d;\0").as_bytes());
    bytes
}

/// What one client saw: the manifest's digest, the blob URL it named, the bytes and headers of the download.
struct Fetched {
    sha256: String,
    blob_url: String,
    body_sha256: String,
    cache_control: String,
}

/// `CLIENTS` clients at once, each on its own connections: the manifest through the cache, then its linux/amd64
/// `blob_url`.
fn fetch_all(cache: &Nginx) -> Vec<Fetched> {
    let start = Arc::new(Barrier::new(CLIENTS));
    let base = format!("http://{}", cache.addr);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (start, base, addr) = (start.clone(), base.clone(), cache.addr);
            std::thread::spawn(move || {
                start.wait();
                let manifest = http_request(addr, "GET", "/agent/manifest", &[]).expect("manifest through the cache");
                assert_eq!(manifest.status, 200, "{}", manifest.text());
                let m = manifest.json();
                let entry =
                    m["agents"].as_array().unwrap().iter().find(|e| e["file"] == AGENT).cloned().expect("linux/amd64");
                let blob_url = entry["blob_url"].as_str().expect("the manifest names a blob URL").to_string();
                let path = blob_url.strip_prefix(&base).unwrap_or_else(|| panic!("{blob_url} is not on {base}"));
                let blob = http_request(addr, "GET", path, &[]).expect("blob through the cache");
                assert_eq!(blob.status, 200, "{blob_url}: {}", blob.text());
                Fetched {
                    sha256: entry["sha256"].as_str().unwrap().to_string(),
                    body_sha256: sha256_hex(&blob.body),
                    cache_control: blob.header("cache-control").unwrap_or_default().to_string(),
                    blob_url,
                }
            })
        })
        .collect();
    clients.into_iter().map(|c| c.join().expect("a client failed")).collect()
}

/// How many GETs of `path` the server answered 200 (its access log: one line per request, when its body ended).
fn origin_reads(server: &Server, path: &str) -> usize {
    server
        .log_json()
        .iter()
        .filter(|l| l["target"] == "access" && l["method"] == "GET" && l["uri"] == path && l["status"] == 200)
        .count()
}

/// Every client got the build the manifest named, by its blob URL, with the immutable header; and the server read
/// that blob exactly once.
fn assert_one_origin_read(server: &Server, cache: &Nginx, fetched: &[Fetched], want: &[u8], phase: &str) {
    let sha = sha256_hex(want);
    let path = format!("/agent/blobs/sha256/{sha}");
    for f in fetched {
        assert_eq!((f.sha256.as_str(), f.body_sha256.as_str()), (sha.as_str(), sha.as_str()), "{phase}");
        assert_eq!(f.blob_url, format!("http://{}{path}", cache.addr), "{phase}");
        assert_eq!(f.cache_control, IMMUTABLE, "{phase}: the blob's Cache-Control through the cache");
    }
    // The line is written when the server's body ends, which is before nginx hands the last byte to a client.
    poll(Duration::from_secs(10), || (origin_reads(server, &path) >= 1).then_some(()));
    let reads = origin_reads(server, &path);
    assert_eq!(
        reads, 1,
        "{phase}: {CLIENTS} clients through the cache should cost one read at the server, not {reads}"
    );
    let hits = fs::read_to_string(cache.dir.join("access.log")).unwrap();
    let hits = hits.lines().filter(|l| l.starts_with(&format!("GET {path} 200 HIT"))).count();
    assert_eq!(hits, CLIENTS - 1, "{phase}: every other client was served from the cache");
}

#[test]
fn two_hundred_clients_behind_nginx_cost_one_read_per_build_and_an_upload_needs_no_purge() {
    let v1 = build(1, "1.0.0");
    let builder = Server::builder().env("RM_TRUSTED_PROXIES", "127.0.0.1");
    fs::write(builder.bundled_dir().join("agent-binaries").join(AGENT), &v1).unwrap();
    let server = builder.start();
    let dir = tempfile::Builder::new().prefix("rm-nginx-").tempdir().unwrap();
    let Some(cache) = Nginx::start(server.addr(), dir.path()) else { return };

    // The names say no-cache through the cache, the blob immutable; the API is never stored.
    let manifest = cache.get("/agent/manifest");
    assert_eq!(manifest.header("cache-control"), Some("no-cache"));
    let sums = cache.get("/agent/SHA256SUMS");
    assert_eq!(sums.header("cache-control"), Some("no-cache"));
    assert!(sums.text().contains(&format!("{}  {AGENT}", sha256_hex(&v1))), "{}", sums.text());
    let named = cache.get("/agent/binary?os=linux&arch=amd64");
    assert_eq!((named.header("cache-control"), named.body == v1), (Some("no-cache"), true));
    let heartbeat = http_request_with_body(cache.addr, "POST", "/api/v1/agents/heartbeat", &[], b"{}").unwrap();
    assert_eq!((heartbeat.status, heartbeat.header("cache-control")), (401, Some("no-store")));

    let fetched = fetch_all(&cache);
    assert_one_origin_read(&server, &cache, &fetched, &v1, "first build");
    let old_blob = format!("/agent/blobs/sha256/{}", sha256_hex(&v1));
    let manifests =
        server.log_json().iter().filter(|l| l["target"] == "access" && l["uri"] == "/agent/manifest").count();
    assert_eq!(manifests, CLIENTS + 1, "every manifest request reached the server: names are never answered stale");

    // An override upload, straight to the server; nothing is purged from the cache.
    let v2 = build(2, "1.1.0");
    let auth = format!("Bearer {}", server.admin_token());
    let sha2 = sha256_hex(&v2);
    let uploaded = http_request_with_body(
        server.addr(),
        "PUT",
        &format!("/api/v1/assets/agent-binaries/{AGENT}"),
        &[("Authorization", &auth), ("X-Checksum-Sha256", &sha2)],
        &v2,
    )
    .unwrap();
    assert!(uploaded.status == 200 || uploaded.status == 201, "upload: {} {}", uploaded.status, uploaded.text());

    let fetched = fetch_all(&cache);
    assert_one_origin_read(&server, &cache, &fetched, &v2, "after the upload");
    // The name serves the new build at once; the old blob URL still serves the old bytes, from the cache.
    assert_eq!(sha256_hex(&cache.get("/agent/binary?os=linux&arch=amd64").body), sha2);
    let old = cache.get(&old_blob);
    assert_eq!((sha256_hex(&old.body), old.header("x-cache-status")), (sha256_hex(&v1), Some("HIT")));
    assert_eq!(origin_reads(&server, &old_blob), 1, "the old build was never read again");
    // An unknown digest is a 404 the cache does not keep.
    let unknown = format!("/agent/blobs/sha256/{}", sha256_hex(b"no such build"));
    for _ in 0..2 {
        let r = cache.get(&unknown);
        assert_eq!((r.status, r.header("cache-control")), (404, Some("no-store")));
    }
    let misses = server.log_json().iter().filter(|l| l["target"] == "access" && l["uri"] == unknown.as_str()).count();
    assert_eq!(misses, 2, "both 404s came from the server");
}
