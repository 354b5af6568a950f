//! The release image as operators and hosts use it: built by the real Dockerfile, run read-only with a named volume,
//! installed from by a second container, deployed by digest through compose and upgraded/rolled back by
//! `scripts/upgrade.sh`, published under the fanned-out tags.
//!
//! `tests/fixtures/image-fixtures.sh` (run by `.ci/run` before `make test`) builds the images, starts the engine and
//! the loopback registry, and writes `target/image-fixtures.env`. Without that file (`make image-fixtures`, root)
//! these tests are skipped (`rm_e2e::skip`); under CI they fail instead.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rm_e2e::*;

const DOCKER: &str = "/usr/bin/docker";
const DIST: &str = "/opt/restic-manager/dist";
const SERVER_PATH: &str = "/usr/local/bin/restic-manager-server";
const MIB: u64 = 1024 * 1024;

/// `target/image-fixtures.env` as a map, or `None` (the test is skipped) when the fixtures were not built.
fn fixtures() -> Option<HashMap<String, String>> {
    let path = repo_file("target/image-fixtures.env");
    let Ok(text) = fs::read_to_string(&path) else {
        skip(format!("{} missing: run `make image-fixtures` (root; .ci/run does)", path.display()));
        return None;
    };
    let map: HashMap<String, String> =
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    // A stale file from an earlier session, with the engine gone, is a skip too.
    if !run(docker(&["image", "inspect", &map["RM_IT_IMAGE_A"]]), 30).status.success() {
        skip(format!(
            "image {} is gone although the fixtures were built (engine not running?): rerun `make image-fixtures` (root)",
            map["RM_IT_IMAGE_A"]
        ));
        return None;
    }
    Some(map)
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("rm-it-{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new(DOCKER);
    c.args(args);
    c
}

fn run(cmd: Command, secs: u64) -> Output {
    run_bounded(cmd, Duration::from_secs(secs))
}

/// Runs and insists on success; returns trimmed stdout.
fn ok(cmd: Command, secs: u64) -> String {
    let described = format!("{cmd:?}");
    let out = run(cmd, secs);
    assert!(
        out.status.success(),
        "{described} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn inspect(image: &str, format: &str) -> String {
    ok(docker(&["image", "inspect", "-f", format, image]), 30)
}

/// A docker object removed when the test ends, passed or not.
struct Cleanup(Vec<Vec<String>>);

impl Cleanup {
    fn new() -> Self {
        Cleanup(Vec::new())
    }
    fn later(&mut self, args: &[&str]) {
        self.0.push(args.iter().map(|s| s.to_string()).collect());
    }

    /// A new named volume, removed with the rest.
    fn volume(&mut self) -> String {
        let name = unique("data");
        ok(docker(&["volume", "create", &name]), 30);
        self.later(&["volume", "rm", "-f", &name]);
        name
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in self.0.iter().rev() {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = run(docker(&args), 60);
        }
    }
}

/// `docker run -d` of the server image, read-only, with `volume` on the data dir and the port published on
/// 127.0.0.1; returns (container id, host address, seconds from `docker run` until /healthz answered 200).
fn start_server(cleanup: &mut Cleanup, image: &str, volume: &str, extra: &[&str]) -> (String, SocketAddr, f64) {
    let name = unique("srv");
    let started = Instant::now();
    let mut args = vec!["run", "-d", "--name", &name, "--read-only", "-p", "127.0.0.1::8080"];
    let mount = format!("{volume}:/var/lib/restic-manager");
    args.extend(["-v", &mount]);
    args.extend(extra);
    args.push(image);
    let id = ok(docker(&args), 60);
    cleanup.later(&["rm", "-f", "-v", &id]);
    let port = ok(docker(&["port", &id, "8080/tcp"]), 30);
    let addr: SocketAddr = port.lines().find(|l| l.starts_with("127.0.0.1:")).unwrap().parse().unwrap();
    let up = poll(Duration::from_secs(60), || answers_healthz(addr).then_some(()));
    assert!(up.is_some(), "no /healthz within 60 s: {}", ok(docker(&["logs", &id]), 30));
    (id, addr, started.elapsed().as_secs_f64())
}

fn answers_healthz(addr: SocketAddr) -> bool {
    http_get(addr, "/healthz").is_ok_and(|r| r.status == 200)
}

/// Copies `path` out of a container (or a created one) into `dest`.
fn copy_out(container: &str, path: &str, dest: &Path) {
    ok(docker(&["cp", &format!("{container}:{path}"), dest.to_str().unwrap()]), 60);
}

fn version_line(name: &str, version: &str, commit: &str, date: &str) -> String {
    format!("{name} version={version} commit={commit} date={date}")
}

/// One entry of `tar -tv --numeric-owner`: mode string, "uid/gid", size.
#[derive(Debug, Clone)]
struct Entry {
    mode: String,
    owner: String,
    size: u64,
}

/// The image's filesystem as the kernel will see it: `docker export` of a created container, listed by tar.
fn filesystem(cleanup: &mut Cleanup, image: &str) -> BTreeMap<String, Entry> {
    let id = ok(docker(&["create", image]), 60);
    cleanup.later(&["rm", "-f", &id]);
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("fs.tar");
    ok(docker(&["export", "-o", tar.to_str().unwrap(), &id]), 120);
    let mut list = Command::new("tar");
    list.args(["-tv", "--numeric-owner", "-f"]).arg(&tar);
    ok(list, 60)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let path = f[5..].join(" ");
            let path = path.split(" -> ").next().unwrap().trim_start_matches("./").trim_end_matches('/').to_string();
            (path, Entry { mode: f[0].to_string(), owner: f[1].to_string(), size: f[2].parse().unwrap() })
        })
        .collect()
}

#[test]
fn image_layout_owners_modes_user_and_metadata() {
    let Some(fx) = fixtures() else { return };
    let mut cleanup = Cleanup::new();
    for (image, arch) in [(&fx["RM_IT_IMAGE_A"], "amd64"), (&fx["RM_IT_IMAGE_A_ARM64"], "arm64")] {
        assert_eq!(inspect(image, "{{.Architecture}}"), arch);
        assert_eq!(inspect(image, "{{.Config.User}}"), "65532:65532", "non-root");
        assert_eq!(inspect(image, "{{json .Config.Volumes}}"), r#"{"/var/lib/restic-manager":{}}"#);
        assert_eq!(inspect(image, "{{json .Config.Entrypoint}}"), format!(r#"["{SERVER_PATH}"]"#));
        assert_eq!(
            inspect(image, "{{json .Config.Healthcheck.Test}}"),
            format!(r#"["CMD","{SERVER_PATH}","healthcheck"]"#)
        );
        let label =
            |key: &str| inspect(image, &format!("{{{{index .Config.Labels \"org.opencontainers.image.{key}\"}}}}"));
        assert_eq!(label("version"), fx["RM_IT_VERSION_A"]);
        assert_eq!(label("revision"), fx["RM_IT_COMMIT_A"]);
        assert_eq!(label("created"), fx["RM_IT_DATE_A"]);
        assert!(inspect(image, "{{json .Config.Labels}}").contains("org.opencontainers.image.source"));

        let fs = filesystem(&mut cleanup, image);
        let ours: BTreeMap<&str, &Entry> =
            fs.iter().filter(|(p, _)| p.starts_with("opt/restic-manager")).map(|(p, e)| (p.as_str(), e)).collect();
        let expected = [
            ("opt/restic-manager", "drwxr-xr-x"),
            ("opt/restic-manager/dist", "drwxr-xr-x"),
            ("opt/restic-manager/dist/agent-binaries", "drwxr-xr-x"),
            ("opt/restic-manager/dist/agent-binaries/restic-manager-agent-linux-amd64", "-rwxr-xr-x"),
            ("opt/restic-manager/dist/agent-binaries/restic-manager-agent-linux-arm64", "-rwxr-xr-x"),
            ("opt/restic-manager/dist/agent-binaries/restic-manager-agent-windows-amd64.exe", "-rwxr-xr-x"),
            ("opt/restic-manager/dist/install", "drwxr-xr-x"),
            ("opt/restic-manager/dist/install/install.ps1", "-rw-r--r--"),
            ("opt/restic-manager/dist/install/install.sh", "-rwxr-xr-x"),
            ("opt/restic-manager/dist/install/restic-manager-agent.service", "-rw-r--r--"),
            ("opt/restic-manager/dist/restic-binaries", "drwxr-xr-x"),
            ("opt/restic-manager/dist/restic-binaries/restic-binaries.json", "-rw-r--r--"),
            ("opt/restic-manager/dist/restic-binaries/restic-linux-amd64", "-rwxr-xr-x"),
            ("opt/restic-manager/dist/restic-binaries/restic-linux-arm64", "-rwxr-xr-x"),
        ];
        let got: Vec<(&str, &str)> = ours.iter().map(|(p, e)| (*p, e.mode.as_str())).collect();
        assert_eq!(got, expected, "exactly the bundled layout, with these modes ({arch})");
        for (path, entry) in &ours {
            assert_eq!(entry.owner, "0/0", "{path} is root-owned");
        }
        let server = &fs["usr/local/bin/restic-manager-server"];
        assert_eq!((server.mode.as_str(), server.owner.as_str()), ("-rwxr-xr-x", "0/0"));
        let data = &fs["var/lib/restic-manager"];
        assert_eq!((data.mode.as_str(), data.owner.as_str()), ("drwx------", "65532/65532"), "data dir for the user");
        assert!(!fs.contains_key("bin/sh") && !fs.contains_key("usr/bin/sh"), "no shell in the final stage");

        let size: u64 = inspect(image, "{{.Size}}").parse().unwrap();
        let agents: Vec<String> = ours
            .iter()
            .filter(|(p, _)| p.contains("/agent-binaries/") || p.contains("/restic-binaries/restic-linux"))
            .map(|(p, e)| format!("{} {:.2} MiB", p.rsplit('/').next().unwrap(), e.size as f64 / MIB as f64))
            .collect();
        eprintln!(
            "FIGURE image {image} ({arch}): {:.2} MiB; server {:.2} MiB; {}",
            size as f64 / MIB as f64,
            server.size as f64 / MIB as f64,
            agents.join(", ")
        );
        // 40 MiB before restic was bundled; Debian's two restic builds add about 36 MiB.
        assert!(size < 80 * MIB, "image {image} is {size} bytes; the budget is 80 MiB");
    }
    eprintln!(
        "FIGURE build seconds: A amd64 {}, A arm64 {}, B amd64 after a version change {}",
        fx["RM_IT_BUILD_SECONDS_A"], fx["RM_IT_BUILD_SECONDS_A_ARM64"], fx["RM_IT_BUILD_SECONDS_B"]
    );
}

#[test]
fn every_binary_in_the_image_reports_the_build_args() {
    let Some(fx) = fixtures() else { return };
    let (v, c, d) = (&fx["RM_IT_VERSION_A"], &fx["RM_IT_COMMIT_A"], &fx["RM_IT_DATE_A"]);
    let image = &fx["RM_IT_IMAGE_A"];
    assert_eq!(ok(docker(&["run", "--rm", image, "--version"]), 60), version_line(SERVER_BIN, v, c, d));
    let entrypoint = format!("{DIST}/agent-binaries/{LINUX_AMD64}");
    assert_eq!(
        ok(docker(&["run", "--rm", "--entrypoint", &entrypoint, image, "--version"]), 60),
        version_line(AGENT_BIN, v, c, d)
    );
}

/// The arm64 agent in the amd64 image, and the arm64 image itself, run through the kernel's qemu-user binfmt entry.
#[test]
fn arm64_binaries_report_the_build_args_and_serve_under_emulation() {
    let Some(fx) = fixtures() else { return };
    if !Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists() {
        return skip("no qemu-aarch64 binfmt entry: run `make image-fixtures` (root), which registers it");
    }
    let (v, c, d) = (&fx["RM_IT_VERSION_A"], &fx["RM_IT_COMMIT_A"], &fx["RM_IT_DATE_A"]);
    let image = &fx["RM_IT_IMAGE_A"];
    let entrypoint = format!("{DIST}/agent-binaries/{LINUX_ARM64}");
    assert_eq!(
        ok(docker(&["run", "--rm", "--entrypoint", &entrypoint, image, "--version"]), 60),
        version_line(AGENT_BIN, v, c, d)
    );
    let mut cleanup = Cleanup::new();
    let arm = &fx["RM_IT_IMAGE_A_ARM64"];
    assert_eq!(
        ok(docker(&["run", "--rm", "--platform", "linux/arm64", arm, "--version"]), 60),
        version_line(SERVER_BIN, v, c, d)
    );
    // The arm64 image also serves (emulated here): /version and a bundled agent.
    let volume = cleanup.volume();
    let (_, addr, _) = start_server(&mut cleanup, arm, &volume, &["--platform", "linux/arm64"]);
    let version = http_get(addr, "/version").unwrap().json();
    assert_eq!((version["version"].as_str(), version["commit"].as_str()), (Some(v.as_str()), Some(c.as_str())));
    let agent = http_get(addr, "/agent/binary?os=linux&arch=arm64").unwrap();
    assert_eq!((agent.status, agent.expect_header("x-asset-source")), (200, "bundled"));
}

/// The Windows agent, copied out of the image, under wine.
#[test]
fn the_windows_agent_in_the_image_reports_the_build_args_under_wine() {
    let Some(fx) = fixtures() else { return };
    let image = &fx["RM_IT_IMAGE_A"];
    let mut cleanup = Cleanup::new();
    let id = ok(docker(&["create", image]), 60);
    cleanup.later(&["rm", "-f", &id]);
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("restic-manager-agent.exe");
    copy_out(&id, &format!("{DIST}/agent-binaries/{WINDOWS_AMD64}"), &exe);
    let Some(wine) = tool("wine64", &["/usr/bin/wine64", "/usr/lib/wine/wine64"]) else { return };
    if !wine_shim(dir.path()) {
        return;
    }
    let mut cmd = Command::new(wine);
    cmd.arg(&exe).arg("--version").env("WINEPREFIX", dir.path().join("prefix")).env("WINEDEBUG", "-all");
    let want = version_line(AGENT_BIN, &fx["RM_IT_VERSION_A"], &fx["RM_IT_COMMIT_A"], &fx["RM_IT_DATE_A"]);
    assert_eq!(ok(cmd, 180), want);
}

/// The host's `dist/` (make dist-agents), when it was built from this tree with the image's build values; otherwise
/// the test is skipped.
fn host_dist(fx: &HashMap<String, String>) -> Option<PathBuf> {
    let dir = repo_file("dist/agent-binaries");
    let want = format!("version={} commit={} date={}", fx["RM_IT_VERSION_A"], fx["RM_IT_COMMIT_A"], fx["RM_IT_DATE_A"]);
    let embedded = fs::read(dir.join(LINUX_AMD64)).ok().and_then(|b| rm_buildinfo::scan(&b)).map(|i| i.version_line());
    if embedded.as_deref() == Some(want.as_str()) {
        return Some(dir);
    }
    skip(format!("dist/ embeds {embedded:?}, the image {want:?}: run `make dist-agents` (root)"));
    None
}

/// The agents in the image are byte for byte the host's `dist/` build of the same tree (the build is reproducible).
/// What the image serves is its own files (`read_only_container_serves_the_bundled_assets_and_data_dir_overrides`).
#[test]
fn the_image_agents_are_the_host_dist_build() {
    let Some(fx) = fixtures() else { return };
    let Some(host) = host_dist(&fx) else { return };
    let mut cleanup = Cleanup::new();
    let id = ok(docker(&["create", &fx["RM_IT_IMAGE_A"]]), 60);
    cleanup.later(&["rm", "-f", &id]);
    let bundled = tempfile::tempdir().unwrap();
    copy_out(&id, DIST, bundled.path());
    for file in [LINUX_AMD64, LINUX_ARM64, WINDOWS_AMD64] {
        let in_image = fs::read(bundled.path().join("dist/agent-binaries").join(file)).unwrap();
        let built = fs::read(host.join(file)).unwrap();
        assert!(in_image == built, "{file}: the image's build differs from the host's dist/ build");
    }
}

/// Runs `script` in a throw-away container with the volume at /data (what an operator does with a shell).
fn on_volume(fx: &HashMap<String, String>, volume: &str, script: &str) -> String {
    let mount = format!("{volume}:/data");
    ok(docker(&["run", "--rm", "-v", &mount, &fx["RM_IT_HELPER_IMAGE"], "sh", "-euc", script]), 60)
}

#[test]
fn read_only_container_serves_the_bundled_assets_and_data_dir_overrides() {
    let Some(fx) = fixtures() else { return };
    let mut cleanup = Cleanup::new();
    let volume = cleanup.volume();
    let (id, addr, ready) = start_server(&mut cleanup, &fx["RM_IT_IMAGE_A"], &volume, &[]);
    eprintln!("FIGURE docker run -> /healthz 200: {ready:.2} s");
    assert_eq!(inspect_container(&id, "{{.HostConfig.ReadonlyRootfs}}"), "true");

    let bundled = tempfile::tempdir().unwrap();
    copy_out(&id, DIST, bundled.path());
    let bundled = bundled.path().join("dist");
    let platforms =
        [("linux", "amd64", LINUX_AMD64), ("linux", "arm64", LINUX_ARM64), ("windows", "amd64", WINDOWS_AMD64)];
    let mut sums = String::new();
    for (os, arch, file) in platforms {
        let resp = http_get(addr, &format!("/agent/binary?os={os}&arch={arch}")).unwrap();
        assert_eq!(resp.status, 200, "{os}/{arch}");
        let in_image = fs::read(bundled.join("agent-binaries").join(file)).unwrap();
        assert!(resp.body == in_image, "{file}: served bytes differ from the image's file");
        assert_eq!(resp.expect_header("x-checksum-sha256"), sha256_hex(&resp.body));
        assert_eq!(resp.expect_header("x-asset-source"), "bundled");
        assert_eq!(resp.expect_header("x-agent-commit"), fx["RM_IT_COMMIT_A"]);
        sums.push_str(&format!("{}  {file}\n", sha256_hex(&in_image)));
    }
    let listed = http_get(addr, "/agent/SHA256SUMS").unwrap();
    assert_eq!(listed.status, 200);
    for line in sums.lines() {
        assert!(String::from_utf8_lossy(&listed.body).contains(line), "{line} missing from /agent/SHA256SUMS");
    }
    // restic for linux amd64 and arm64, from Debian's packages: served as in the image, listed in the manifest and
    // SHA256SUMS with the SHA-256 and version the image's sidecar records.
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs::read(bundled.join("restic-binaries/restic-binaries.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&http_get(addr, "/agent/manifest").unwrap().body).unwrap();
    for arch in ["amd64", "arm64"] {
        let file = format!("restic-linux-{arch}");
        let in_image = fs::read(bundled.join("restic-binaries").join(&file)).unwrap();
        let sha = sha256_hex(&in_image);
        let described = &sidecar["files"][&file];
        assert_eq!(described["sha256"], sha.as_str(), "{file}: the sidecar records its checksum: {sidecar}");
        let version = described["version"].as_str().unwrap();
        assert!(version.starts_with("0.") && version.split('.').count() == 3, "{file}: version {version}");
        assert!(described["package_version"].as_str().unwrap().starts_with(version), "{sidecar}");
        let resp = http_get(addr, &format!("/restic/binary?os=linux&arch={arch}")).unwrap();
        assert_eq!(resp.status, 200, "{file}");
        assert!(resp.body == in_image, "{file}: served bytes differ from the image's file");
        let entry = manifest["restic"].as_array().unwrap().iter().find(|e| e["file"] == file.as_str()).unwrap();
        assert_eq!(
            (&entry["sha256"], &entry["version"]),
            (&serde_json::json!(sha), &serde_json::json!(version)),
            "{manifest}"
        );
        assert!(
            String::from_utf8_lossy(&listed.body).contains(&format!("{sha}  {file}\n")),
            "{file} missing from /agent/SHA256SUMS"
        );
        eprintln!(
            "FIGURE image restic {file}: {version} ({}), {:.2} MiB",
            described["package_version"],
            in_image.len() as f64 / MIB as f64
        );
    }
    assert_eq!(
        http_get(addr, "/restic/binary?os=windows&arch=amd64").unwrap().status,
        404,
        "windows: operator-supplied"
    );

    // Install files: the unit verbatim, the scripts with this server's URL filled in.
    let unit = http_get(addr, "/install/restic-manager-agent.service").unwrap();
    assert_eq!(unit.body, fs::read(bundled.join("install/restic-manager-agent.service")).unwrap());
    let script = http_get(addr, "/install/install.sh").unwrap();
    let served = String::from_utf8(script.body).unwrap();
    let url = format!("http://{addr}");
    assert!(served.contains(&format!("'{url}'")), "install.sh does not name {url}");
    let original = fs::read_to_string(bundled.join("install/install.sh")).unwrap();
    assert_eq!(served.replace(&url, "__RM_SERVER_URL__"), original);

    // The server created its state in the volume as the non-root user, private.
    let listing =
        on_volume(&fx, &volume, "stat -c '%n %u %a' /data/restic-manager.db /data/admin.token /data/secret.key");
    assert_eq!(
        listing,
        "/data/restic-manager.db 65532 600\n/data/admin.token 65532 600\n/data/secret.key 65532 600".to_string()
    );

    // An operator drops an override into the volume: it shadows the bundled file; removing it restores the bundled.
    on_volume(
        &fx,
        &volume,
        "mkdir -p /data/agent-binaries && printf 'operator build' >/data/agent-binaries/.tmp && \
         mv /data/agent-binaries/.tmp /data/agent-binaries/restic-manager-agent-linux-arm64",
    );
    let over = http_get(addr, "/agent/binary?os=linux&arch=arm64").unwrap();
    assert_eq!((over.status, over.body.as_slice()), (200, b"operator build".as_slice()));
    assert_eq!(over.expect_header("x-asset-source"), "data-dir");
    assert_eq!(over.expect_header("x-checksum-sha256"), sha256_hex(b"operator build"));
    let other = http_get(addr, "/agent/binary?os=linux&arch=amd64").unwrap();
    assert_eq!(other.expect_header("x-asset-source"), "bundled", "only the overridden platform changes");
    on_volume(&fx, &volume, "rm /data/agent-binaries/restic-manager-agent-linux-arm64");
    let back = http_get(addr, "/agent/binary?os=linux&arch=arm64").unwrap();
    assert_eq!(back.expect_header("x-asset-source"), "bundled");
    assert!(back.body == fs::read(bundled.join("agent-binaries").join(LINUX_ARM64)).unwrap());
}

fn inspect_container(id: &str, format: &str) -> String {
    ok(docker(&["inspect", "-f", format, id]), 30)
}

#[test]
fn a_host_container_installs_with_curl_pipe_sh_and_enrolls() {
    let Some(fx) = fixtures() else { return };
    let mut cleanup = Cleanup::new();
    let network = unique("net");
    ok(docker(&["network", "create", &network]), 30);
    let volume = cleanup.volume();
    cleanup.later(&["network", "rm", &network]);
    let admin = "image-test-admin-token-0123456789abcdef";
    let name = unique("server");
    let admin_env = format!("RM_ADMIN_TOKEN={admin}");
    let (id, addr, _) = start_server(
        &mut cleanup,
        &fx["RM_IT_IMAGE_A"],
        &volume,
        &["--network", &network, "--network-alias", &name, "-e", &admin_env],
    );
    let token = ok(docker(&["exec", &id, SERVER_PATH, "token", "create", "--uses", "1", "--note", "image test"]), 60);

    let script = format!(
        "curl -fsSL http://{name}:8080/install/install.sh | sh -s -- --token '{token}' --prefix /opt/rm --no-service \
         --allow-plain-http \
         && /opt/rm/bin/restic-manager-agent run --once --config /opt/rm/etc/restic-manager/agent.json \
         && /opt/rm/bin/restic-manager-agent --version"
    );
    let out =
        ok(docker(&["run", "--rm", "--network", &network, &fx["RM_IT_CLIENT_IMAGE"], "sh", "-euc", &script]), 300);
    assert_eq!(
        out.lines().last().unwrap(),
        version_line(AGENT_BIN, &fx["RM_IT_VERSION_A"], &fx["RM_IT_COMMIT_A"], &fx["RM_IT_DATE_A"])
    );

    let auth = format!("Bearer {admin}");
    let view = http_request(addr, "GET", "/api/v1/agents", &[("Authorization", &auth)]).unwrap().json();
    let agents = view["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{view}");
    assert_eq!((agents[0]["os"].as_str(), agents[0]["arch"].as_str()), (Some("linux"), Some("amd64")));
    assert_eq!(agents[0]["state"], "current", "{view}");
    assert!(agents[0]["heartbeats"].as_u64().unwrap() >= 1, "{view}");
    let served = http_get(addr, "/agent/binary?os=linux&arch=amd64").unwrap();
    assert_eq!(agents[0]["binary_sha256"], served.expect_header("x-checksum-sha256"));
}

/// A compose deployment in a temp dir: its own pin file, project name and port.
struct Deployment {
    dir: tempfile::TempDir,
    project: String,
    port: u16,
}

impl Deployment {
    fn pin_file(&self) -> PathBuf {
        self.dir.path().join("image-pin.env")
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("RM_PORT", self.port.to_string())
            .env("RM_HEALTH_INTERVAL", "1s")
            .env("RM_ADMIN_TOKEN", "upgrade-test-admin-token-0123456789")
            .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
            .env_remove("RM_IMAGE");
    }

    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("--env-file").arg(self.pin_file()).arg("-f").arg(repo_file("deploy/compose.yaml"));
        cmd.args(["-p", &self.project]).args(args);
        self.env(&mut cmd);
        cmd
    }

    fn upgrade_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(repo_file("scripts/upgrade.sh"));
        cmd.arg("--pin-file").arg(self.pin_file());
        cmd.args(["--project", &self.project, "--url", &format!("http://127.0.0.1:{}", self.port), "--timeout", "60"]);
        cmd.args(args);
        self.env(&mut cmd);
        cmd
    }

    fn upgrade(&self, args: &[&str]) -> Output {
        let out = run(self.upgrade_command(args), 300);
        eprintln!("upgrade {args:?} -> {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        out
    }

    fn container(&self) -> String {
        ok(self.compose(&["ps", "-q", "server"]), 60)
    }

    fn version(&self) -> (String, String) {
        let v = http_get(SocketAddr::from(([127, 0, 0, 1], self.port)), "/version").unwrap().json();
        (v["version"].as_str().unwrap().to_string(), v["commit"].as_str().unwrap().to_string())
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = run(self.compose(&["down", "-v", "--timeout", "5"]), 120);
    }
}

#[test]
fn upgrade_by_digest_verifies_the_new_build_and_rolls_back_a_bad_one() {
    let Some(fx) = fixtures() else { return };
    let repo = &fx["RM_IT_REPO"];
    let deployment =
        Deployment { dir: tempfile::tempdir().unwrap(), project: unique("compose"), port: free_port().port() };
    let pin = deployment.pin_file();
    let pin_a = format!("{repo}@{}", fx["RM_IT_DIGEST_A"]);
    let pin_b = format!("{repo}@{}", fx["RM_IT_DIGEST_B"]);
    let mut set = Command::new(repo_file("scripts/image-pin.sh"));
    set.arg("set").arg(&pin).arg(&pin_a);
    ok(set, 30);
    let compose_before = fs::read(repo_file("deploy/compose.yaml")).unwrap();

    ok(deployment.compose(&["up", "-d"]), 300);
    let a = (fx["RM_IT_VERSION_A"].clone(), fx["RM_IT_COMMIT_A"].clone());
    let b = (fx["RM_IT_VERSION_B"].clone(), fx["RM_IT_COMMIT_B"].clone());
    let addr = SocketAddr::from(([127, 0, 0, 1], deployment.port));
    eventually(Duration::from_secs(60), "the pinned deployment to come up", || answers_healthz(addr).then_some(()));
    assert_eq!(deployment.version(), a);
    // State that must survive upgrades and rollbacks: an enrollment token in the data volume.
    let auth = "Bearer upgrade-test-admin-token-0123456789";
    let created = http_request_with_body(
        addr,
        "POST",
        "/api/v1/tokens",
        &[("Authorization", auth), ("Content-Type", "application/json")],
        br#"{"note":"kept"}"#,
    )
    .unwrap();
    assert_eq!(created.status, 201, "{}", String::from_utf8_lossy(&created.body));

    // --dry-run: the plan names the new digest; nothing changes.
    let first = deployment.container();
    let pin_bytes = fs::read(&pin).unwrap();
    let out = deployment.upgrade(&["--dry-run", "v0.9.1"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&pin_b), "the plan names {pin_b}");
    assert_eq!(fs::read(&pin).unwrap(), pin_bytes, "dry run left the pin alone");
    assert_eq!(deployment.container(), first, "dry run recreated nothing");

    // A real upgrade: pin moved to B's digest, container recreated, /version verified.
    let out = deployment.upgrade(&["v0.9.1"]);
    assert!(out.status.success(), "upgrade failed");
    assert_eq!(
        fs::read_to_string(&pin).unwrap().lines().find(|l| l.starts_with("RM_IMAGE=")).unwrap(),
        format!("RM_IMAGE={pin_b}")
    );
    assert_ne!(deployment.container(), first);
    assert_eq!(deployment.version(), b);
    let pin_b_bytes = fs::read(&pin).unwrap();

    // An image whose healthcheck fails: rolled back to B, which keeps serving.
    let out = deployment.upgrade(&["broken-health"]);
    assert_eq!(out.status.code(), Some(1), "a failed upgrade exits 1 after rolling back");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("healthcheck failed") && said.contains("rolled back"), "{said}");
    assert_eq!(fs::read(&pin).unwrap(), pin_b_bytes, "previous pin restored byte for byte");
    assert_eq!(deployment.version(), b);
    assert_eq!(inspect_container(&deployment.container(), "{{.State.Health.Status}}"), "healthy");

    // An image that claims a version and commit its binaries do not have: the mismatch is caught and rolled back.
    let out = deployment.upgrade(&["v0.9.2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/version reports"), "mismatch named");
    assert_eq!(fs::read(&pin).unwrap(), pin_b_bytes);
    assert_eq!(deployment.version(), b);

    // A version that does not exist: refused before anything changes.
    let before = deployment.container();
    let out = deployment.upgrade(&["v9.9.9"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!((fs::read(&pin).unwrap(), deployment.container()), (pin_b_bytes.clone(), before));

    // No healthy answer within --timeout: rolled back too.
    let out = deployment.upgrade(&["--timeout", "1", "it-a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("within 1s"), "timeout named");
    assert_eq!((fs::read(&pin).unwrap(), deployment.version()), (pin_b_bytes.clone(), b.clone()));

    // Interrupted after the pin moved (SIGTERM while waiting): the previous pin is restored and recreated.
    let mut child = deployment.upgrade_command(&["broken-health"]).stderr(Stdio::null()).spawn().unwrap();
    eventually(Duration::from_secs(120), "the pin to move", || (fs::read(&pin).unwrap() != pin_b_bytes).then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut child, Duration::from_secs(120)).expect("upgrade.sh did not exit after SIGTERM");
    assert_eq!(status.code(), Some(130));
    assert_eq!(fs::read(&pin).unwrap(), pin_b_bytes, "previous pin restored");
    eventually(Duration::from_secs(60), "the previous build to come back after the interrupt", || {
        http_get(addr, "/version").is_ok_and(|r| r.json()["commit"] == b.1.as_str()).then_some(())
    });

    let tokens = http_request(addr, "GET", "/api/v1/tokens", &[("Authorization", auth)]).unwrap().json();
    assert!(tokens.to_string().contains("kept"), "the data volume survived: {tokens}");
    assert_eq!(fs::read(repo_file("deploy/compose.yaml")).unwrap(), compose_before, "compose file untouched");
    let leftovers: Vec<_> = fs::read_dir(deployment.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("image-pin.env")], "no temp or backup files left");
}

#[test]
fn release_tags_share_one_digest_and_the_published_sums_match_the_agents() {
    let Some(fx) = fixtures() else { return };
    let repo = &fx["RM_IT_REPO"];
    let refs: Vec<String> = fx["RM_IT_TAGS_B"].split_whitespace().map(|t| format!("{repo}:{t}")).collect();
    assert_eq!(fx["RM_IT_TAGS_B"], "v0.9.1 0.9 0", "v0.x: no latest");
    let verify = |refs: &[String]| {
        let mut cmd = Command::new(repo_file("scripts/release-verify.sh"));
        cmd.arg(&fx["RM_IT_DIGEST_B"]).args(refs).env("RM_REGISTRY_INSECURE", "1");
        run(cmd, 120)
    };
    let out = verify(&refs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let mut with_other = refs.clone();
    with_other.push(format!("{repo}:it-a"));
    let out = verify(&with_other);
    assert_eq!(out.status.code(), Some(1), "a tag on another digest is caught");
    assert!(String::from_utf8_lossy(&out.stdout).contains("MISMATCH"));

    let dir = tempfile::tempdir().unwrap();
    let mut sums = Command::new(repo_file("scripts/release-sums.sh"));
    sums.args(["--platform", "linux/amd64", &format!("{repo}@{}", fx["RM_IT_DIGEST_B"])]).arg(dir.path());
    sums.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    ok(sums, 300);
    let listed = fs::read_to_string(dir.path().join("SHA256SUMS")).unwrap();
    for file in [LINUX_AMD64, LINUX_ARM64, WINDOWS_AMD64] {
        let path = dir.path().join("agent-binaries").join(file);
        let bytes = fs::read(&path).unwrap();
        assert!(listed.contains(&format!("{}  agent-binaries/{file}", sha256_hex(&bytes))), "{file} in {listed}");
        let info = rm_buildinfo::scan(&bytes).expect("build marker");
        assert_eq!(
            info.version_line(),
            format!("version={} commit={} date={}", fx["RM_IT_VERSION_B"], fx["RM_IT_COMMIT_B"], fx["RM_IT_DATE_B"])
        );
    }
}
