//! The fleet API in-process: enrollment, heartbeats, the fleet view, uploads, audit, auth.

#[path = "../../../tests/support/admin_auth.rs"]
mod admin_auth;
mod common;

use std::fs;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use rm_server::Settings;
use serde_json::{Value, json};

fn host(name: &str) -> Value {
    json!({"hostname": name, "os": "linux", "arch": "amd64", "version": "1.0.0", "commit": "c0ffee"})
}

async fn token(f: &Fixture, body: Value) -> String {
    let r = f.admin(Method::POST, "/api/v1/tokens", body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    r.json()["token"].as_str().unwrap().to_string()
}

async fn enroll(f: &Fixture, token: &str, name: &str) -> (String, String) {
    let mut body = host(name);
    body["token"] = token.into();
    let r = f.post_json("/api/v1/agents/enroll", None, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let j = r.json();
    (j["agent_id"].as_str().unwrap().into(), j["credential"].as_str().unwrap().into())
}

async fn agent_count(f: &Fixture) -> usize {
    f.admin(Method::GET, "/api/v1/agents", Value::Null).await.json()["agents"].as_array().unwrap().len()
}

#[tokio::test]
async fn enrollment_refusals_are_401_and_write_nothing() {
    let f = Fixture::new();
    let once = token(&f, json!({"uses": 1})).await;
    let revoked = token(&f, json!({"note": "to revoke"})).await;
    let list = f.admin(Method::GET, "/api/v1/tokens", Value::Null).await.json();
    let revoked_id =
        list["tokens"].as_array().unwrap().iter().find(|t| t["note"] == "to revoke").unwrap()["id"].clone();
    let r = f.admin(Method::DELETE, &format!("/api/v1/tokens/{}", revoked_id.as_str().unwrap()), Value::Null).await;
    assert_eq!(r.json()["status"], "revoked");
    enroll(&f, &once, "first").await;
    assert_eq!(agent_count(&f).await, 1);

    // An expired token: made directly in the database with an expiry in the past.
    let expired = f
        .state
        .fleet()
        .call(|c| {
            let new = rm_fleet::NewToken { expires_at: Some(rm_fleet::now() - 1), ..Default::default() };
            rm_fleet::create_token(c, rm_fleet::now() - 10, &new).map(|(_, t)| t)
        })
        .await
        .unwrap();
    let audit_before =
        f.admin(Method::GET, "/api/v1/audit", Value::Null).await.json()["events"].as_array().unwrap().len();
    for (token, code) in [
        (once.as_str(), "token_used_up"),
        (revoked.as_str(), "token_revoked"),
        (expired.as_str(), "token_expired"),
        ("rmenr_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "token_unknown"),
        ("garbage", "token_unknown"),
    ] {
        let mut body = host("intruder");
        body["token"] = token.into();
        let r = f.post_json("/api/v1/agents/enroll", None, body).await;
        assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::UNAUTHORIZED, Some(code)), "{token}");
    }
    assert_eq!(agent_count(&f).await, 1, "a refused enrollment wrote an agent");
    let audit_after =
        f.admin(Method::GET, "/api/v1/audit", Value::Null).await.json()["events"].as_array().unwrap().len();
    assert_eq!(audit_before, audit_after, "a refused enrollment wrote an audit event");
    let r = f.post_json("/api/v1/agents/enroll", None, host("no-token")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn enrollment_validates_host_facts() {
    let f = Fixture::new();
    let t = token(&f, json!({})).await;
    for (field, value) in [
        ("hostname", json!("")),
        ("hostname", json!("a b")),
        // Markup never becomes a hostname, so the web page never has one to show.
        ("hostname", json!("<img src=x onerror=alert(1)>")),
        ("hostname", json!("h\"><script>")),
        ("hostname", json!("x".repeat(300))),
        ("os", json!("darwin")),
        ("arch", json!("x86_64")),
        ("version", json!("")),
        ("commit", json!("a\nb")),
    ] {
        let mut body = host("h");
        body["token"] = t.clone().into();
        body[field] = value.clone();
        let r = f.post_json("/api/v1/agents/enroll", None, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{field}={value}");
    }
    let r = f
        .call(
            Method::POST,
            "/api/v1/agents/enroll",
            None,
            &[("content-type", "application/json")],
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    let big = vec![b' '; 100 * 1024];
    let r = f.call(Method::POST, "/api/v1/agents/enroll", None, &[("content-type", "application/json")], big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(agent_count(&f).await, 0);
}

#[tokio::test]
async fn heartbeat_reports_the_served_build_and_the_fleet_view_classifies() {
    let f = Fixture::with(None, Settings { stale_after: Duration::from_secs(3600), ..Settings::default() });
    let served = pseudo_random(4096, 9);
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, &served);
    let t = token(&f, json!({"uses": 3})).await;
    let (current_id, current) = enroll(&f, &t, "current").await;
    let (old_id, old) = enroll(&f, &t, "old").await;

    let mut hb = host("current");
    hb["binary_sha256"] = sha_hex(&served).into();
    hb["seq"] = 1.into();
    let r = f.post_json("/api/v1/agents/heartbeat", Some(&current), hb).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    let j = r.json();
    assert_eq!(j["agent_id"], current_id.as_str());
    assert_eq!(j["update"]["sha256"], sha_hex(&served));
    assert_eq!(j["update"]["size"], 4096);
    assert_eq!(j["update"]["url"], "/agent/binary?os=linux&arch=amd64");
    assert_eq!(j["update"]["blob_url"], format!("/agent/blobs/sha256/{}", sha_hex(&served)));
    assert_eq!(r.header("cache-control"), "no-store", "a heartbeat answer is never cached");
    assert_eq!(j["heartbeat_interval_secs"], 60);

    let mut hb = host("old");
    hb["binary_sha256"] = "0".repeat(64).into();
    hb["last_update_error"] = "smoke test failed".into();
    assert_eq!(f.post_json("/api/v1/agents/heartbeat", Some(&old), hb).await.status, StatusCode::OK);

    let view = f.admin(Method::GET, "/api/v1/agents", Value::Null).await.json();
    let state_of =
        |id: &str| view["agents"].as_array().unwrap().iter().find(|a| a["id"] == id).unwrap()["state"].clone();
    assert_eq!(state_of(&current_id), "current");
    assert_eq!(state_of(&old_id), "out_of_date");
    assert_eq!(view["counts"], json!({"current": 1, "out_of_date": 1}));
    let old_row = view["agents"].as_array().unwrap().iter().find(|a| a["id"] == old_id.as_str()).unwrap().clone();
    assert_eq!(old_row["last_update_error"], "smoke test failed");

    let only_old = f.admin(Method::GET, "/api/v1/agents?state=out_of_date", Value::Null).await.json();
    assert_eq!(only_old["agents"].as_array().unwrap().len(), 1);
    let r = f.admin(Method::GET, "/api/v1/agents?state=bogus", Value::Null).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Bad credentials are refused and change nothing.
    for bad in [None, Some("rmagt_nope_nope"), Some(ADMIN)] {
        let r = f.post_json("/api/v1/agents/heartbeat", bad, host("x")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad:?}");
    }
    let mut forged = host("x");
    forged["binary_sha256"] = "not-hex".into();
    assert_eq!(f.post_json("/api/v1/agents/heartbeat", Some(&current), forged).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn agents_without_heartbeats_become_stale() {
    let f = Fixture::with(None, Settings { stale_after: Duration::from_secs(0), ..Settings::default() });
    let t = token(&f, json!({})).await;
    let (id, _) = enroll(&f, &t, "quiet").await;
    // last_seen is the enrollment time; with a zero window, a second later it is stale.
    f.state
        .fleet()
        .call(move |c| Ok(c.execute("UPDATE agents SET last_seen_at = last_seen_at - 5 WHERE id = ?1", [id])?))
        .await
        .unwrap();
    let view = f.admin(Method::GET, "/api/v1/agents?state=stale", Value::Null).await.json();
    assert_eq!(view["agents"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn upload_replaces_atomically_and_delete_restores_bundled() {
    let f = Fixture::new();
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, b"bundled build");
    let uri = format!("/api/v1/assets/agent-binaries/{LINUX_AMD64}");
    let v1 = pseudo_random(200_000, 3);
    let r = f.call(Method::PUT, &uri, Some(ADMIN), &[("x-checksum-sha256", &sha_hex(&v1))], v1.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    assert_eq!(
        (r.json()["sha256"].as_str(), r.json()["replaced"].as_bool()),
        (Some(sha_hex(&v1).as_str()), Some(false))
    );
    let got = f.get("/agent/binary?os=linux&arch=amd64").await;
    assert_eq!((got.body.as_slice(), got.header("x-asset-source")), (v1.as_slice(), "data-dir"));

    let v2 = pseudo_random(100, 4);
    let r = f.call(Method::PUT, &uri, Some(ADMIN), &[], v2.clone()).await;
    assert_eq!((r.status, r.json()["replaced"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(f.get("/agent/binary?os=linux&arch=amd64").await.body, v2);

    // A checksum mismatch changes nothing and leaves no temporary file.
    let r = f.call(Method::PUT, &uri, Some(ADMIN), &[("x-checksum-sha256", &sha_hex(b"other"))], v1.clone()).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("checksum_mismatch")));
    assert_eq!(f.get("/agent/binary?os=linux&arch=amd64").await.body, v2);
    let entries: Vec<_> =
        fs::read_dir(f.data.join("agent-binaries")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, [LINUX_AMD64], "only the target remains");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(f.data.join("agent-binaries").join(LINUX_AMD64)).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o755);

    let r = f.admin(Method::DELETE, &uri, Value::Null).await;
    assert_eq!(r.status, StatusCode::OK);
    let got = f.get("/agent/binary?os=linux&arch=amd64").await;
    assert_eq!((got.body.as_slice(), got.header("x-asset-source")), (&b"bundled build"[..], "bundled"));
    assert_eq!(f.admin(Method::DELETE, &uri, Value::Null).await.status, StatusCode::NOT_FOUND);

    let kinds: Vec<String> = f.admin(Method::GET, "/api/v1/audit?limit=10", Value::Null).await.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "upload").count(), 2);
    assert_eq!(kinds.iter().filter(|k| *k == "delete").count(), 1);
}

#[tokio::test]
async fn upload_names_sizes_and_checksum_headers_are_validated() {
    let f = Fixture::with(None, Settings { max_upload_bytes: 1000, ..Settings::default() });
    for (uri, want) in [
        ("/api/v1/assets/agent-binaries/restic-manager-agent-darwin-amd64", StatusCode::BAD_REQUEST),
        ("/api/v1/assets/agent-binaries/..", StatusCode::BAD_REQUEST),
        ("/api/v1/assets/install/.hidden", StatusCode::BAD_REQUEST),
        ("/api/v1/assets/install/..%2f..%2fadmin.token", StatusCode::BAD_REQUEST),
        ("/api/v1/assets/install/%00", StatusCode::BAD_REQUEST),
        ("/api/v1/assets/secrets/x", StatusCode::NOT_FOUND),
        ("/api/v1/assets/..%2f/x", StatusCode::NOT_FOUND),
    ] {
        let r = f.call(Method::PUT, uri, Some(ADMIN), &[], b"data".to_vec()).await;
        assert_eq!(r.status, want, "{uri}");
    }
    let r = f.call(Method::PUT, "/api/v1/assets/install/big.sh", Some(ADMIN), &[], vec![b'x'; 1001]).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));
    let r = f
        .call(Method::PUT, "/api/v1/assets/install/x.sh", Some(ADMIN), &[("x-checksum-sha256", "xyz")], b"x".to_vec())
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(!f.data.join("install/big.sh").exists() && !f.data.join("install/x.sh").exists());
    // Only the database, its WAL files and the admin token: nothing written outside the asset dirs.
    let r = f.call(Method::PUT, "/api/v1/assets/install/ok.sh", Some(ADMIN), &[], b"echo ok".to_vec()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(f.get("/install/ok.sh").await.body, b"echo ok");
}

#[tokio::test]
async fn every_admin_route_rejects_missing_and_wrong_tokens() {
    let f = Fixture::new();
    f.put(&f.data, "install", "x.sh", b"original\n");
    let enroll_token = token(&f, json!({"uses": 1})).await;
    let (_, credential) = enroll(&f, &enroll_token, "h").await;
    // The same table as the end-to-end test (tests/fleet_e2e.rs).
    for (method, uri, body) in admin_auth::ADMIN_ROUTES {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        for (what, auth) in admin_auth::bad_credentials(ADMIN, &enroll_token, &credential) {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(auth) = &auth {
                headers.push(("authorization", auth));
            }
            let r = f.call(method.clone(), uri, None, &headers, body.to_vec()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {uri} with {what}");
            assert_eq!(r.json()["error"], "unauthorized", "{method} {uri} with {what}");
            assert_eq!(r.header("www-authenticate"), "Bearer", "{method} {uri} with {what}");
        }
    }
    assert_eq!(fs::read(f.data.join("install/x.sh")).unwrap(), b"original\n");
    assert!(!f.data.join("install/new.sh").exists());
    let r = f.admin(Method::GET, "/api/v1/repositories", Value::Null).await;
    assert_eq!(r.json()["repositories"], json!([]), "no repository was created");
}

#[tokio::test]
async fn every_web_page_needs_a_live_session() {
    let f = Fixture::new();
    for (method, uri, body) in admin_auth::WEB_ROUTES {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        for (what, cookie) in admin_auth::bad_sessions(ADMIN) {
            for hx in [false, true] {
                let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
                if let Some(cookie) = &cookie {
                    headers.push(("cookie", cookie));
                }
                if hx {
                    headers.push(("hx-request", "true"));
                }
                // The admin token as a bearer header is the API's credential, not a session.
                let r = f.call(method.clone(), uri, Some(ADMIN), &headers, body.to_vec()).await;
                let at = format!("{method} {uri} with {what} (htmx: {hx})");
                if hx {
                    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{at}");
                    assert_eq!(r.header("hx-redirect"), "/ui/login", "{at}");
                } else {
                    assert_eq!(r.status, StatusCode::SEE_OTHER, "{at}");
                    assert!(r.header("location").starts_with("/ui/login?next=%2F"), "{at}: {}", r.header("location"));
                }
                assert!(r.header("set-cookie").is_empty(), "{at}: no session is handed out");
            }
        }
    }
    let r = f.admin(Method::GET, "/api/v1/tokens", Value::Null).await;
    assert_eq!(r.json()["tokens"], json!([]), "no enrollment token was created");
    // The sign-in page and the static files are public; nothing else under /ui is.
    assert_eq!(f.get("/ui/login").await.status, StatusCode::OK);
    assert_eq!(f.get("/ui/static/style.css").await.status, StatusCode::OK);
    assert_eq!(f.get("/ui/static/..%2fstyle.css").await.status, StatusCode::NOT_FOUND);
    assert_eq!(f.get("/ui/static/secret").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn downloads_are_audited_and_can_require_a_token() {
    let f = Fixture::with(None, Settings { require_download_auth: true, ..Settings::default() });
    let bytes = pseudo_random(1000, 5);
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, &bytes);
    f.put(&f.bundled, "install", "install.sh", b"echo hi");
    let r = f.get("/agent/binary?os=linux&arch=amd64").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.get("/install/install.sh").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.get("/agent/manifest").await.status, StatusCode::UNAUTHORIZED);
    let blob = format!("/agent/blobs/sha256/{}", sha_hex(&bytes));
    assert_eq!(f.get(&blob).await.status, StatusCode::UNAUTHORIZED, "blobs are gated like names");
    assert_eq!(f.get(&format!("/restic/blobs/sha256/{}", sha_hex(&bytes))).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.get("/healthz").await.status, StatusCode::OK, "health stays public");

    let t = token(&f, json!({})).await;
    let r = f.call(Method::GET, "/install/install.sh", Some(&t), &[], vec![]).await;
    assert_eq!(r.status, StatusCode::OK, "an active enrollment token may fetch the installer");
    let (_, credential) = enroll(&f, &t, "h").await;
    let r = f
        .call(Method::GET, "/agent/binary?os=linux&arch=amd64", Some(&credential), &[("user-agent", "agent/1")], vec![])
        .await;
    assert_eq!(r.body, bytes);
    let r = f.call(Method::GET, "/agent/binary?os=linux&arch=amd64", Some("rmagt_x_y"), &[], vec![]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Behind the gate a blob depends on the credential: no shared cache may keep it (`private`), a client's may.
    let r = f.call(Method::GET, &blob, Some(&credential), &[], vec![]).await;
    assert_eq!((r.status, r.body == bytes), (StatusCode::OK, true));
    assert_eq!(r.header("cache-control"), "private, max-age=31536000, immutable");
    assert_eq!(f.call(Method::GET, &blob, Some("rmagt_x_y"), &[], vec![]).await.status, StatusCode::UNAUTHORIZED);

    // The audit record is written asynchronously: poll briefly.
    let mut found = None;
    for _ in 0..50 {
        let events = f.admin(Method::GET, "/api/v1/audit?kind=download", Value::Null).await.json();
        if let Some(e) = events["events"].as_array().unwrap().first() {
            found = Some(e.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = found.expect("download audit event");
    assert_eq!((e["platform"].as_str(), e["source"].as_str()), (Some("linux/amd64"), Some("bundled")));
    assert_eq!(e["sha256"], sha_hex(&bytes));
    assert_eq!(e["user_agent"], "agent/1");
}

#[tokio::test]
async fn audit_pages_with_next_before() {
    let f = Fixture::new();
    for i in 0..7 {
        f.call(Method::PUT, &format!("/api/v1/assets/install/f{i}.sh"), Some(ADMIN), &[], b"x".to_vec()).await;
    }
    let p1 = f.admin(Method::GET, "/api/v1/audit?limit=5", Value::Null).await.json();
    assert_eq!(p1["events"].as_array().unwrap().len(), 5);
    let next = p1["next_before"].as_i64().expect("a next page");
    let p2 = f.admin(Method::GET, &format!("/api/v1/audit?limit=5&before={next}"), Value::Null).await.json();
    assert_eq!(p2["events"].as_array().unwrap().len(), 2);
    assert!(p2["next_before"].is_null());
    assert_eq!(f.admin(Method::GET, "/api/v1/audit?limit=0", Value::Null).await.status, StatusCode::BAD_REQUEST);
}

/// Every route that takes a Path, Query or Json extractor, fed values that do not decode or do not fit: whatever
/// the status, the answer is a 4xx with the JSON error body (axum's own rejections answer text/plain).
#[tokio::test]
async fn hostile_extractor_values_get_json_errors() {
    let f = Fixture::new();
    let big = vec![b'x'; 70 * 1024];
    let json = "application/json";
    // (method, uri, content type, body)
    let cases: Vec<(Method, &str, Option<&str>, Vec<u8>)> = vec![
        // Path
        (Method::DELETE, "/api/v1/tokens/%ff", None, vec![]),
        (Method::DELETE, "/api/v1/tokens/%c3%28", None, vec![]),
        (Method::DELETE, "/api/v1/tokens/%00", None, vec![]),
        (Method::DELETE, "/api/v1/tokens/%2e%2e%2fx", None, vec![]),
        (Method::GET, "/install/%ff", None, vec![]),
        (Method::GET, "/install/%2e%2e", None, vec![]),
        (Method::PUT, "/api/v1/assets/install/%ff", None, b"x".to_vec()),
        (Method::PUT, "/api/v1/assets/%ff/x.sh", None, b"x".to_vec()),
        (Method::DELETE, "/api/v1/assets/install/%ff", None, vec![]),
        (Method::DELETE, "/api/v1/assets/%fe%ff/%ff", None, vec![]),
        // Query
        (Method::GET, "/api/v1/agents?state=%ff", None, vec![]),
        (Method::GET, "/api/v1/agents?state=bogus", None, vec![]),
        (Method::GET, "/api/v1/agents?state=current&state=stale", None, vec![]),
        (Method::GET, "/api/v1/audit?limit=%ff", None, vec![]),
        (Method::GET, "/api/v1/audit?limit=-1", None, vec![]),
        (Method::GET, "/api/v1/audit?limit=99999999999999999999999", None, vec![]),
        (Method::GET, "/api/v1/audit?before=abc", None, vec![]),
        (Method::GET, "/api/v1/audit?kind=%ff&before=%ff", None, vec![]),
        (Method::GET, "/agent/binary?os=%ff&arch=%ff", None, vec![]),
        (Method::GET, "/agent/binary?os=linux&arch=amd64&os=linux", None, vec![]),
        // Json
        (Method::POST, "/api/v1/tokens", Some(json), b"{".to_vec()),
        (Method::POST, "/api/v1/tokens", Some(json), b"\xff\xfe".to_vec()),
        (Method::POST, "/api/v1/tokens", None, b"{}".to_vec()),
        (Method::POST, "/api/v1/tokens", Some("text/plain"), b"{}".to_vec()),
        (Method::POST, "/api/v1/tokens", Some(json), br#"{"uses": "many"}"#.to_vec()),
        (Method::POST, "/api/v1/tokens", Some(json), big.clone()),
        (Method::POST, "/api/v1/agents/enroll", Some(json), b"\xff".to_vec()),
        (Method::POST, "/api/v1/agents/enroll", None, b"{}".to_vec()),
        (Method::POST, "/api/v1/agents/enroll", Some(json), br#"{"hostname": 5}"#.to_vec()),
        (Method::POST, "/api/v1/agents/enroll", Some(json), big.clone()),
        (Method::POST, "/api/v1/agents/heartbeat", Some(json), b"[]".to_vec()),
        (Method::POST, "/api/v1/agents/heartbeat", Some(json), b"\xff".to_vec()),
    ];
    for (method, uri, content_type, body) in cases {
        let headers: Vec<(&str, &str)> = content_type.map(|c| ("content-type", c)).into_iter().collect();
        // Admin routes with the admin token, the heartbeat with some bearer: the extractor is what is under test.
        let auth = if uri.contains("heartbeat") { "rmagt_x_y" } else { ADMIN };
        let r = f.call(method.clone(), uri, Some(auth), &headers, body).await;
        let what = format!("{method} {uri} {content_type:?}");
        assert!(r.status.is_client_error(), "{what}: {}", r.status);
        assert_eq!(r.header("content-type"), "application/json", "{what}: {} {:?}", r.status, r.body);
        assert!(r.json()["error"].is_string(), "{what}: {:?}", r.json());
    }
}

/// PUT or DELETE of a name that is a directory in the data dir is the operator's conflict (409, JSON), not a 500;
/// the directory is left alone and no temporary file stays behind.
#[tokio::test]
async fn put_or_delete_of_a_directory_name_is_a_409() {
    let f = Fixture::new();
    fs::create_dir_all(f.data.join("install/somedir/inner")).unwrap();
    fs::create_dir_all(f.data.join("agent-binaries").join(LINUX_AMD64)).unwrap();
    let binary = format!("/api/v1/assets/agent-binaries/{LINUX_AMD64}");
    for uri in ["/api/v1/assets/install/somedir", binary.as_str()] {
        for method in [Method::PUT, Method::DELETE] {
            let r = f.call(method.clone(), uri, Some(ADMIN), &[], b"content".to_vec()).await;
            assert_eq!(r.status, StatusCode::CONFLICT, "{method} {uri}: {:?}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.header("content-type"), "application/json");
            assert_eq!(r.json()["error"], "conflict", "{method} {uri}");
        }
    }
    assert!(f.data.join("install/somedir/inner").is_dir());
    assert!(f.data.join("agent-binaries").join(LINUX_AMD64).is_dir());
    for dir in ["install", "agent-binaries"] {
        let leftovers: Vec<_> = fs::read_dir(f.data.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[tokio::test]
async fn only_platform_errors_list_the_supported_platforms() {
    let f = Fixture::new();
    let r = f.admin(Method::GET, "/api/v1/agents?state=bogus", Value::Null).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let body = r.json();
    assert!(body.get("supported").is_none(), "{body}");
    let message = body["message"].as_str().unwrap();
    assert_eq!(message.matches("out_of_date").count(), 1, "the valid states are named once: {message}");
    // No Content-Type: a client error about the body, nothing about platforms.
    let r = f.call(Method::POST, "/api/v1/agents/enroll", None, &[], b"{}".to_vec()).await;
    assert!(r.status.is_client_error(), "{}", r.status);
    assert!(r.json().get("supported").is_none(), "{}", r.json());
    for platform_query in
        ["/agent/binary?os=linux", "/agent/binary?os=linux&arch=amd64&os=linux", "/agent/binary?os=x&arch=y"]
    {
        let r = f.get(platform_query).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{platform_query}");
        assert_eq!(r.json()["supported"].as_array().map(Vec::len), Some(3), "{platform_query}: {}", r.json());
    }
}

const REPO_PASSWORD: &str = "repo-pw-Axolotl-8675309";
const REPO_ENV_SECRET: &str = "env-secret-Narwhal-31337";

fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(vec!["minio.internal".into()]).unwrap().self_signed(&key).unwrap().pem()
}

/// Every byte an API answer carried, for the "no secret in any response" check.
struct Seen(Vec<u8>);

impl Seen {
    async fn admin(&mut self, f: &Fixture, method: Method, uri: &str, body: Value) -> Reply {
        let r = f.admin(method, uri, body).await;
        self.0.extend_from_slice(&r.body);
        for (name, value) in &r.headers {
            self.0.extend_from_slice(name.as_str().as_bytes());
            self.0.extend_from_slice(value.as_bytes());
        }
        r
    }

    fn assert_clean(&self, secrets: &[&str]) {
        for secret in secrets {
            assert!(!self.0.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} in a response");
        }
    }
}

#[tokio::test]
async fn repositories_are_created_listed_patched_and_deleted_without_showing_secrets() {
    let f = Fixture::new();
    let mut seen = Seen(Vec::new());
    let r = seen
        .admin(
            &f,
            Method::POST,
            "/api/v1/repositories",
            json!({
                "name": "offsite", "url": "s3:s3.example.com/backups", "password": REPO_PASSWORD,
                "env": {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": REPO_ENV_SECRET},
                "ca_cert": ca_pem(), "auto_init": true
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let view = r.json();
    assert_eq!(view["name"], "offsite");
    assert_eq!(view["url"], "s3:s3.example.com/backups");
    assert_eq!(view["password_set"], true);
    assert_eq!(view["env_names"], json!(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]));
    assert_eq!(view["ca_cert_set"], true);
    assert_eq!(view["auto_init"], true);
    assert!(view.get("password").is_none() && view.get("env").is_none());

    let r = seen
        .admin(
            &f,
            Method::POST,
            "/api/v1/repositories",
            json!({"name": "local", "url": "/srv/restic", "password": "x"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["auto_init"], false);
    assert_eq!(r.json()["env_names"], json!([]));
    assert_eq!(r.json()["ca_cert_set"], false);

    // Duplicate: 409, and the stored password is unchanged.
    let r = seen
        .admin(&f, Method::POST, "/api/v1/repositories", json!({"name": "offsite", "url": "/other", "password": "y"}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.json()["error"], "conflict");

    let r = seen.admin(&f, Method::GET, "/api/v1/repositories", Value::Null).await;
    let names: Vec<_> = r.json()["repositories"].as_array().unwrap().iter().map(|v| v["name"].clone()).collect();
    assert_eq!(names, vec![json!("local"), json!("offsite")]);
    let r = seen.admin(&f, Method::GET, "/api/v1/repositories/offsite", Value::Null).await;
    assert_eq!(r.json(), view);

    // The stored secrets decrypt to what was sent.
    let key = f.state.secret_key().clone();
    let secrets = f
        .state
        .fleet()
        .call(move |c| rm_fleet::repository_secrets(c, &key, "offsite"))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(secrets.password, REPO_PASSWORD);
    assert_eq!(secrets.env["AWS_SECRET_ACCESS_KEY"], REPO_ENV_SECRET);

    // PATCH: replace the password and the environment, clear the certificate; other fields are kept.
    let r = seen
        .admin(
            &f,
            Method::PATCH,
            "/api/v1/repositories/offsite",
            json!({"password": "replaced-Pangolin", "env": {"B2_ACCOUNT_KEY": "k"}, "ca_cert": null}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    let patched = r.json();
    assert_eq!(patched["env_names"], json!(["B2_ACCOUNT_KEY"]));
    assert_eq!(patched["ca_cert_set"], false);
    assert_eq!(patched["auto_init"], true);
    assert_eq!(patched["url"], view["url"]);
    assert_eq!(patched["created"], view["created"]);
    let key = f.state.secret_key().clone();
    let secrets =
        f.state.fleet().call(move |c| rm_fleet::repository_secrets(c, &key, "offsite")).await.unwrap().unwrap();
    assert_eq!(secrets.unwrap().password, "replaced-Pangolin");
    // Absent fields are kept; an empty PATCH is refused.
    let r = seen.admin(&f, Method::PATCH, "/api/v1/repositories/offsite", json!({"auto_init": false})).await;
    assert_eq!(r.json()["env_names"], json!(["B2_ACCOUNT_KEY"]));
    let r = seen.admin(&f, Method::PATCH, "/api/v1/repositories/offsite", json!({})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Unknown names: 404 everywhere.
    for method in [Method::GET, Method::PATCH, Method::DELETE] {
        let r = seen.admin(&f, method.clone(), "/api/v1/repositories/nope", json!({"auto_init": true})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method}");
        assert_eq!(r.json()["error"], "not_found");
    }
    let r = seen.admin(&f, Method::GET, "/api/v1/repositories/BAD%20NAME", Value::Null).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = seen.admin(&f, Method::DELETE, "/api/v1/repositories/offsite", Value::Null).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = seen.admin(&f, Method::GET, "/api/v1/repositories/offsite", Value::Null).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Audited without secrets.
    let r = seen.admin(&f, Method::GET, "/api/v1/audit?kind=repository", Value::Null).await;
    let details: Vec<String> =
        r.json()["events"].as_array().unwrap().iter().map(|e| e["detail"].as_str().unwrap().to_string()).collect();
    assert_eq!(details.len(), 5, "{details:?}");
    assert!(details[0].starts_with("deleted offsite"), "{details:?}");
    assert!(details.iter().any(|d| d.contains("password replaced")), "{details:?}");
    assert!(details.last().unwrap().contains("created offsite"), "{details:?}");
    seen.assert_clean(&[REPO_PASSWORD, REPO_ENV_SECRET, "replaced-Pangolin", "AKIAEXAMPLE"]);
}

#[tokio::test]
async fn repository_input_is_validated_and_refusals_write_nothing() {
    let f = Fixture::new();
    let ok = json!({"name": "r", "url": "/srv/restic", "password": "p"});
    let with = |field: &str, value: Value| {
        let mut body = ok.clone();
        body[field] = value;
        body
    };
    let cases = [
        ("empty name", with("name", json!(""))),
        ("upper-case name", with("name", json!("Repo"))),
        ("name with a slash", with("name", json!("a/b"))),
        ("name too long", with("name", json!("a".repeat(64)))),
        ("relative path", with("url", json!("srv/restic"))),
        ("unknown scheme", with("url", json!("ftp://host/r"))),
        ("empty url", with("url", json!(""))),
        ("scheme only", with("url", json!("s3:"))),
        ("control character", with("url", json!("/srv/\u{7}r"))),
        ("bidi character", with("url", json!("/srv/\u{202e}r"))),
        ("password in a rest URL", with("url", json!("rest:https://u:pw@host/"))),
        ("empty password", with("password", json!(""))),
        ("password too long", with("password", json!("p".repeat(4097)))),
        ("lower-case env name", with("env", json!({"aws_key": "v"}))),
        ("env name with a dash", with("env", json!({"A-B": "v"}))),
        ("env name starting with a digit", with("env", json!({"1A": "v"}))),
        (
            "too many env variables",
            with("env", Value::Object((0..65).map(|i| (format!("V{i}"), json!("v"))).collect())),
        ),
        ("not PEM", with("ca_cert", json!("hello"))),
        ("a key, not a certificate", with("ca_cert", json!(rcgen::KeyPair::generate().unwrap().serialize_pem()))),
        (
            "PEM that is not X.509",
            with("ca_cert", json!("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")),
        ),
        ("unknown field", with("passwd", json!("p"))),
        ("missing password", json!({"name": "r", "url": "/srv/restic"})),
        ("wrong type", with("auto_init", json!("yes"))),
    ];
    for (what, body) in cases {
        let r = f.admin(Method::POST, "/api/v1/repositories", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {:?}", r.json());
        assert_eq!(r.json()["error"], "invalid_request", "{what}");
        assert!(!r.json()["message"].as_str().unwrap_or("").is_empty(), "{what}: {:?}", r.json());
    }
    let r = f.admin(Method::GET, "/api/v1/repositories", Value::Null).await;
    assert_eq!(r.json()["repositories"], json!([]));
    let r = f.admin(Method::GET, "/api/v1/audit?kind=repository", Value::Null).await;
    assert_eq!(r.json()["events"], json!([]));

    // PATCH validates the same way and leaves the row alone.
    assert_eq!(f.admin(Method::POST, "/api/v1/repositories", ok.clone()).await.status, StatusCode::CREATED);
    for (what, body) in [
        ("relative path", json!({"url": "x"})),
        ("empty password", json!({"password": ""})),
        ("bad env", json!({"env": {"a": "b"}})),
        ("bad ca_cert", json!({"ca_cert": "x"})),
        ("rename", json!({"name": "s"})),
    ] {
        let r = f.admin(Method::PATCH, "/api/v1/repositories/r", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {:?}", r.json());
    }
    let r = f.admin(Method::GET, "/api/v1/repositories/r", Value::Null).await;
    assert_eq!(r.json()["url"], "/srv/restic");
    assert_eq!(r.json()["created"], r.json()["updated"]);
}

#[tokio::test]
async fn the_secret_key_file_is_0600_and_32_bytes() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let path = f.data.join("secret.key");
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.trim_end().len(), 64);
    assert!(text.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test]
async fn channels_keep_secrets_write_only_and_refuse_bad_input_with_400() {
    let f = Fixture::new();
    let slack = json!({"name": "chat", "kind": "slack", "url": "https://hooks.example.com/services/T0/B0/s3cr3t-Path"});
    let r = f.admin(Method::POST, "/api/v1/channels", slack.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let mail = json!({"name": "mail", "kind": "email", "smtp_host": "smtp.example.com", "username": "rm",
                      "password": "smtp-Pa55word", "from": "rm@example.com", "to": ["ops@example.com"]});
    assert_eq!(f.admin(Method::POST, "/api/v1/channels", mail).await.status, StatusCode::CREATED);
    assert_eq!(f.admin(Method::POST, "/api/v1/channels", slack).await.status, StatusCode::CONFLICT);

    let list = f.admin(Method::GET, "/api/v1/channels", Value::Null).await;
    let text = String::from_utf8_lossy(&list.body).into_owned();
    assert!(!text.contains("s3cr3t") && !text.contains("Pa55word"), "{text}");
    let channels = list.json()["channels"].as_array().unwrap().clone();
    assert_eq!(channels[0]["name"], "chat");
    assert_eq!(channels[0]["url_origin"], "https://hooks.example.com");
    assert_eq!(channels[0]["secrets_set"], json!(["url"]));
    assert_eq!(channels[1]["secrets_set"], json!(["password"]));
    let audit = f.admin(Method::GET, "/api/v1/audit", Value::Null).await;
    let audit = String::from_utf8_lossy(&audit.body).into_owned();
    assert!(audit.contains("notify_channel") && !audit.contains("s3cr3t") && !audit.contains("Pa55word"));

    for (body, want) in [
        (
            json!({"name": "x", "kind": "email", "smtp_host": "mail.example.com", "smtp_tls": "none",
                "from": "a@b.c", "to": ["d@e.f"]}),
            "loopback",
        ),
        (json!({"name": "x", "kind": "webhook"}), "url is required"),
        (json!({"name": "x", "kind": "webhook", "url": "http://h/", "to": ["a@b.c"]}), "to does not apply"),
        (json!({"name": "x", "kind": "pager", "url": "http://h/"}), "unknown variant"),
        (json!({"name": "x", "kind": "webhook", "url": "http://h/", "passwrd": "typo"}), "unknown field"),
    ] {
        let r = f.admin(Method::POST, "/api/v1/channels", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{want}: {:?}", r.json());
        assert!(r.json()["message"].as_str().unwrap().contains(want), "{want}: {:?}", r.json());
    }

    let rule = json!({"name": "prod", "channel": "chat", "events": ["backup_failed"], "labels": {"env": "prod"}});
    assert_eq!(f.admin(Method::POST, "/api/v1/rules", rule).await.status, StatusCode::CREATED);
    let r = f.admin(Method::POST, "/api/v1/rules", json!({"name": "y", "channel": "nope"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["message"].as_str().unwrap().contains("no channel named"));
    let r = f.admin(Method::POST, "/api/v1/rules", json!({"name": "y", "channel": "chat", "events": ["bogus"]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let rules = f.admin(Method::GET, "/api/v1/rules", Value::Null).await.json();
    assert_eq!(rules["rules"][0]["labels"], json!({"env": "prod"}));
    let r = f.admin(Method::GET, "/api/v1/notifications?status=bogus", Value::Null).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f.admin(Method::GET, "/api/v1/notifications", Value::Null).await;
    assert_eq!(r.json()["notifications"], json!([]));

    // A rule is deleted by name, once; a name no rule could have is refused as not found.
    let other = json!({"name": "other", "channel": "chat", "events": ["backup_failed"]});
    assert_eq!(f.admin(Method::POST, "/api/v1/rules", other).await.status, StatusCode::CREATED);
    assert_eq!(f.admin(Method::DELETE, "/api/v1/rules/other", Value::Null).await.status, StatusCode::NO_CONTENT);
    let r = f.admin(Method::DELETE, "/api/v1/rules/other", Value::Null).await;
    assert_eq!((r.status, r.json()["message"].as_str()), (StatusCode::NOT_FOUND, Some("rule \"other\" was not found")));
    assert_eq!(f.admin(Method::DELETE, "/api/v1/rules/Bad%20Name", Value::Null).await.status, StatusCode::NOT_FOUND);
    assert_eq!(f.admin(Method::GET, "/api/v1/rules", Value::Null).await.json()["rules"].as_array().unwrap().len(), 1);

    // Deleting the channel takes its rules along.
    assert_eq!(f.admin(Method::DELETE, "/api/v1/channels/chat", Value::Null).await.status, StatusCode::NO_CONTENT);
    assert_eq!(f.admin(Method::GET, "/api/v1/rules", Value::Null).await.json()["rules"], json!([]));
    assert_eq!(f.admin(Method::DELETE, "/api/v1/channels/chat", Value::Null).await.status, StatusCode::NOT_FOUND);
}
