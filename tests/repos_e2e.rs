//! Repositories with the real binary: secrets sealed at rest under `<DataDir>/secret.key`. The plaintext password and
//! secret environment values, given through the API and through `repo add`, must appear in no database file (main,
//! WAL, shared memory), no log line, no audit entry and no API or CLI answer; they survive a restart; the key file is
//! 0600; a missing or different key is refused at start and by the CLI instead of being replaced.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use rm_e2e::*;
use serde_json::{Value, json};

const API_PASSWORD: &str = "api-pw-Capybara-5551212";
const API_ENV_SECRET: &str = "api-env-Okapi-24601";
const CLI_PASSWORD: &str = "cli-pw-Tardigrade-8080";
const CLI_ENV_SECRET: &str = "cli-env-Pangolin-4242";
const NEW_PASSWORD: &str = "new-pw-Quetzal-1999";
const SECRETS: &[&str] = &[API_PASSWORD, API_ENV_SECRET, CLI_PASSWORD, CLI_ENV_SECRET, NEW_PASSWORD];

/// Runs `restic-manager-server repo …` on `data_dir`, with `stdin` as standard input and extra environment.
fn repo_cli(data_dir: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = command(SERVER_BIN);
    cmd.arg("repo").args(args).env("RM_DATA_DIR", data_dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let input = tempfile::NamedTempFile::new().unwrap();
    if let Some(text) = stdin {
        fs::write(input.path(), text).unwrap();
        cmd.stdin(fs::File::open(input.path()).unwrap());
    }
    let out = run_bounded(cmd, Duration::from_secs(15));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn assert_no_secret(what: &str, bytes: &[u8]) {
    for secret in SECRETS {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} found in {what}");
    }
}

/// Every `restic-manager.db*` file's raw bytes.
fn assert_db_files_clean(data_dir: &Path) {
    let mut seen = 0;
    for entry in fs::read_dir(data_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("restic-manager.db") {
            assert_no_secret(&path.display().to_string(), &fs::read(&path).unwrap());
            seen += 1;
        }
    }
    assert!(seen >= 2, "the database and its WAL were read");
}

/// An admin request whose answer (head and body) is kept for the final check.
fn call(answers: &mut Vec<u8>, server: &Server, method: &str, path: &str, body: Option<&Value>) -> Response {
    let r = server.admin(method, path, body);
    answers.extend_from_slice(r.text().as_bytes());
    for (k, v) in &r.headers {
        answers.extend_from_slice(k.as_bytes());
        answers.extend_from_slice(v.as_bytes());
    }
    r
}

#[test]
fn repository_secrets_never_leave_the_server_in_clear() {
    let mut server = Server::builder().env("RM_LOG", "debug").start();
    let data = server.data_dir().to_path_buf();
    let mut answers: Vec<u8> = Vec::new();

    // The key file: 0600, 64 hex digits.
    let key_path = data.join("secret.key");
    assert_eq!(fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
    let key_text = fs::read_to_string(&key_path).unwrap();
    assert_eq!(key_text.trim_end().len(), 64);
    assert!(key_text.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));

    // One repository through the API …
    let body = json!({
        "name": "offsite", "url": "s3:s3.example.com/bucket", "password": API_PASSWORD,
        "env": {"AWS_ACCESS_KEY_ID": "AKIAE2E", "AWS_SECRET_ACCESS_KEY": API_ENV_SECRET}, "auto_init": true
    });
    let r = call(&mut answers, &server, "POST", "/api/v1/repositories", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["password_set"], true);
    let r = call(&mut answers, &server, "POST", "/api/v1/repositories", Some(&body));
    assert_eq!(r.status, 409, "{}", r.text());

    // … and one through the command line, beside the running server: password on stdin, env value from the
    // command's environment, never in argv.
    let (ok, out, err) = repo_cli(
        &data,
        &["add", "local", "--url", "/srv/restic", "--password-stdin", "--env", "B2_ACCOUNT_KEY"],
        Some(&format!("{CLI_PASSWORD}\n")),
        &[("B2_ACCOUNT_KEY", CLI_ENV_SECRET)],
    );
    assert!(ok, "{out}{err}");
    answers.extend_from_slice(format!("{out}{err}").as_bytes());
    // RM_REPO_PASSWORD works too; no password at all is refused.
    let (ok, out, err) =
        repo_cli(&data, &["add", "envpw", "--url", "/srv/e"], None, &[("RM_REPO_PASSWORD", CLI_PASSWORD)]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = repo_cli(&data, &["add", "nopw", "--url", "/srv/n"], None, &[]);
    assert!(!ok && err.contains("--password-stdin"), "{err}");
    let (ok, _, err) = repo_cli(&data, &["add", "dup", "--url", "relative"], None, &[("RM_REPO_PASSWORD", "x")]);
    assert!(!ok && err.contains("absolute local path"), "{err}");
    let (ok, _, err) = repo_cli(&data, &["add", "local", "--url", "/x"], None, &[("RM_REPO_PASSWORD", "x")]);
    assert!(!ok && err.contains("already exists"), "{err}");

    let r = call(&mut answers, &server, "GET", "/api/v1/repositories", None);
    let list = r.json()["repositories"].as_array().unwrap().clone();
    let names: Vec<&str> = list.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["envpw", "local", "offsite"]);
    assert_eq!(list[1]["env_names"], json!(["B2_ACCOUNT_KEY"]));

    // Replace a password, then restart: the new one is stored sealed and the old key still opens everything
    // (a start with a key that opens nothing is refused, so a successful start proves it).
    let r =
        call(&mut answers, &server, "PATCH", "/api/v1/repositories/offsite", Some(&json!({"password": NEW_PASSWORD})));
    assert_eq!(r.status, 200, "{}", r.text());
    server.restart();
    let r = call(&mut answers, &server, "GET", "/api/v1/repositories/offsite", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["password_set"], true);
    assert!(!server.log().contains("cannot be decrypted"), "{}", server.log_tail());
    // A second server process on the same data dir (the first still running) lists the same repositories.
    let second = Server::builder().with_data_dir(&data).start();
    let r = second.admin("GET", "/api/v1/repositories", None);
    assert_eq!(r.json()["repositories"].as_array().unwrap().len(), 3, "{}", r.text());
    let (ok, out, err) = repo_cli(&data, &["list", "--json"], None, &[]);
    assert!(ok && out.contains("\"offsite\""), "{out}{err}");
    answers.extend_from_slice(format!("{out}{err}").as_bytes());
    let (ok, out, err) = repo_cli(&data, &["rm", "envpw"], None, &[]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = repo_cli(&data, &["rm", "envpw"], None, &[]);
    assert!(!ok && err.contains("no repository"), "{err}");

    // The audit log names the changes but no secret.
    let r = call(&mut answers, &server, "GET", "/api/v1/audit?kind=repository", None);
    let details: Vec<String> =
        r.json()["events"].as_array().unwrap().iter().map(|e| e["detail"].as_str().unwrap().to_string()).collect();
    assert_eq!(details.len(), 5, "{details:?}");
    assert!(details.iter().any(|d| d.contains("password replaced")), "{details:?}");

    // Nowhere in clear: answers, logs of every process, database files.
    assert_no_secret("API and CLI answers", &answers);
    let mut logs = second.log();
    drop(second);
    logs.push_str(&server.log());
    for entry in fs::read_dir(server.root()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "stderr") {
            logs.push_str(&fs::read_to_string(&path).unwrap());
        }
    }
    assert!(logs.contains("repository created"), "the debug log was captured");
    assert_no_secret("the server logs", logs.as_bytes());
    assert!(!logs.contains(key_text.trim_end()), "the secret key was logged");
    assert_db_files_clean(&data);
    server.sigkill();
    assert_db_files_clean(&data);

    // Without its key the data dir is refused, by the server and by the CLI, and no new key replaces it.
    let kept = server.root().join("secret.key.kept");
    fs::rename(&key_path, &kept).unwrap();
    let (status, log) = Server::builder().with_data_dir(&data).run_expecting_exit(Duration::from_secs(15));
    assert!(!status.success());
    assert!(log.contains("secret.key is missing") && log.contains("restore"), "{log}");
    assert!(!key_path.exists(), "no new key was generated");
    let (ok, _, err) = repo_cli(&data, &["add", "x", "--url", "/x"], None, &[("RM_REPO_PASSWORD", "x")]);
    assert!(!ok && err.contains("secret.key is missing"), "{err}");

    // A different (valid) key opens nothing: refused too.
    fs::write(&key_path, format!("{}\n", "ab".repeat(32))).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    let (status, log) = Server::builder().with_data_dir(&data).run_expecting_exit(Duration::from_secs(15));
    assert!(!status.success());
    assert!(log.contains("does not decrypt"), "{log}");
    // A key readable by others is refused.
    fs::rename(&kept, &key_path).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
    let (status, log) = Server::builder().with_data_dir(&data).run_expecting_exit(Duration::from_secs(15));
    assert!(!status.success() && log.contains("chmod 600"), "{log}");

    // The original key, restored, starts again with everything readable.
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    let server = Server::builder().with_data_dir(&data).start();
    let r = server.admin("GET", "/api/v1/repositories", None);
    assert_eq!(r.json()["repositories"].as_array().unwrap().len(), 2, "{}", r.text());
}
