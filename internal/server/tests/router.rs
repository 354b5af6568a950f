//! The router tested in-process (`tower::ServiceExt::oneshot`): lookup order, hostile inputs, conditionals, ranges.

mod common;

use std::fs;
use std::os::unix::fs::symlink;

use common::*;
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};

const BINARY: &str = "/agent/binary?os=linux&arch=amd64";

// ---- the four cases of the specification ----

#[tokio::test]
async fn data_dir_hit() {
    let f = Fixture::new();
    f.put(&f.data, "agent-binaries", LINUX_AMD64, b"from data");
    f.put(&f.data, "install", "install.sh", b"echo data");
    let r = f.get(BINARY).await;
    assert_eq!(
        (r.status, r.body.as_slice(), r.header("x-asset-source")),
        (StatusCode::OK, &b"from data"[..], "data-dir")
    );
    let r = f.get("/install/install.sh").await;
    assert_eq!(
        (r.status, r.body.as_slice(), r.header("x-asset-source")),
        (StatusCode::OK, &b"echo data"[..], "data-dir")
    );
}

#[tokio::test]
async fn bundled_hit() {
    let f = Fixture::new();
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, b"from bundled");
    f.put(&f.bundled, "install", "install.sh", b"echo bundled");
    let r = f.get(BINARY).await;
    assert_eq!(
        (r.status, r.body.as_slice(), r.header("x-asset-source")),
        (StatusCode::OK, &b"from bundled"[..], "bundled")
    );
    let r = f.get("/install/install.sh").await;
    assert_eq!(
        (r.status, r.body.as_slice(), r.header("x-asset-source")),
        (StatusCode::OK, &b"echo bundled"[..], "bundled")
    );
}

#[tokio::test]
async fn data_dir_shadows_bundled() {
    let f = Fixture::new();
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, b"from bundled");
    f.put(&f.data, "agent-binaries", LINUX_AMD64, b"override");
    f.put(&f.bundled, "install", "install.sh", b"echo bundled");
    f.put(&f.data, "install", "install.sh", b"echo override");
    let r = f.get(BINARY).await;
    assert_eq!((r.body.as_slice(), r.header("x-asset-source")), (&b"override"[..], "data-dir"));
    let r = f.get("/install/install.sh").await;
    assert_eq!((r.body.as_slice(), r.header("x-asset-source")), (&b"echo override"[..], "data-dir"));
    // Removing the override restores the bundled copy.
    fs::remove_file(f.data.join("agent-binaries").join(LINUX_AMD64)).unwrap();
    assert_eq!(f.get(BINARY).await.body, b"from bundled");
}

#[tokio::test]
async fn neither_is_a_404_with_a_json_body() {
    let f = Fixture::new();
    let r = f.get(BINARY).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("content-type"), "application/json");
    let body = r.json();
    assert_eq!(body["error"], "binary_not_published");
    assert_eq!(
        (body["os"].as_str(), body["arch"].as_str(), body["file"].as_str()),
        (Some("linux"), Some("amd64"), Some(LINUX_AMD64))
    );
    let r = f.get("/install/install.sh").await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
}

// ---- hostile inputs ----

/// Every request here must be refused (4xx), with a JSON error, without ever returning a byte of a file outside the
/// roots or of the database in the data dir.
#[tokio::test]
async fn hostile_paths_and_queries_never_escape_the_roots() {
    let f = Fixture::new();
    // Real files exist in both roots, so a lookup that escaped would have something to find.
    f.put(&f.data, "agent-binaries", LINUX_AMD64, b"legit binary");
    f.put(&f.data, "install", "install.sh", b"legit script");
    symlink(f.outside.join("secret"), f.data.join("install/escape-data.sh")).unwrap();
    symlink(f.outside.join("secret"), f.bundled.join("install/escape-bundled.sh")).unwrap();
    symlink("../restic-manager.db", f.data.join("install/db.sh")).unwrap();
    symlink("../admin.token", f.data.join("install/token.sh")).unwrap();
    symlink("../../outside/secret", f.bundled.join("install/relative.sh")).unwrap();
    symlink("/etc/passwd", f.data.join("install/passwd")).unwrap();
    symlink(f.outside.join("secret"), f.bundled.join("agent-binaries/restic-manager-agent-linux-arm64")).unwrap();
    symlink(f.outside.join("secret"), f.data.join("agent-binaries/restic-manager-agent-windows-amd64.exe")).unwrap();
    // restic builds: the same containment (a symlink out of either root, or into the data dir's state, is refused)
    symlink(f.outside.join("secret"), f.data.join("restic-binaries/restic-linux-amd64")).unwrap();
    symlink(f.outside.join("secret"), f.bundled.join("restic-binaries/restic-linux-arm64")).unwrap();
    symlink("../restic-manager.db", f.data.join("restic-binaries/restic-windows-amd64.exe")).unwrap();
    let outside = f.outside.join("secret").display().to_string();
    let long = "a".repeat(300);
    let long_path = format!("/install/{long}");
    let abs_encoded = format!("/install/{}", outside.replace('/', "%2F"));
    let abs_query = format!("/agent/binary?os={}&arch=amd64", outside.replace('/', "%2F"));
    let long_query = format!("/agent/binary?os={}&arch=amd64", "x".repeat(5000));
    let blob_of_secret = format!("/agent/blobs/sha256/{}", sha_hex(SECRET.as_bytes()));
    let restic_blob_of_secret = format!("/restic/blobs/sha256/{}", sha_hex(SECRET.as_bytes()));
    let blob_upper = format!("/agent/blobs/sha256/{}", sha_hex(b"legit binary").to_ascii_uppercase());
    let blob_short = format!("/agent/blobs/sha256/{}", &sha_hex(b"legit binary")[1..]);

    let cases: Vec<&str> = vec![
        // traversal in the install name, raw and encoded
        "/install/..",
        "/install/.",
        "/install/%2e%2e",
        "/install/%2E%2E",
        "/install/.%2e",
        "/install/%2e.",
        "/install/..%2fetc%2fpasswd",
        "/install/..%2F..%2Fetc%2Fpasswd",
        "/install/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/install/%2e%2e%5c%2e%2e%5cetc%5cpasswd",
        "/install/..%5c..%5cetc%5cpasswd",
        "/install/..\\..\\etc\\passwd",
        "/install/%2fetc%2fpasswd",
        "/install/%2F",
        "/install/a%2fb",
        abs_encoded.as_str(),
        // double encoding: decoded once, the rest is a literal name that fails the allowlist
        "/install/%252e%252e%252fetc%252fpasswd",
        "/install/%252e%252e",
        "/install/%25",
        // NUL, control characters, odd bytes
        "/install/install.sh%00",
        "/install/install.sh%00.txt",
        "/install/%00",
        "/install/a%0ab",
        "/install/a%0d%0aX-Injected:%201",
        "/install/%ff%fe",
        "/install/%c0%ae%c0%ae",
        "/install/%e2%80%ae",
        "/install/a%20b",
        // hidden files and names outside the allowlist
        "/install/.hidden",
        "/install/.install.sh",
        "/install/install.sh;id",
        "/install/$(id)",
        "/install/%60id%60",
        "/install/*",
        "/install/C:%5cwindows",
        long_path.as_str(),
        // symlinks out of each root, and into the data dir's own state
        "/install/escape-data.sh",
        "/install/escape-bundled.sh",
        "/install/db.sh",
        "/install/token.sh",
        "/install/relative.sh",
        "/install/passwd",
        "/agent/binary?os=linux&arch=arm64",
        "/agent/binary?os=windows&arch=amd64",
        // the binary endpoint never takes a path from the query
        "/agent/binary?os=../../etc&arch=passwd",
        "/agent/binary?os=..%2F..%2Fetc&arch=amd64",
        "/agent/binary?os=linux&arch=../amd64",
        "/agent/binary?os=linux&arch=amd64%00",
        "/agent/binary?os=linux%2F..&arch=amd64",
        abs_query.as_str(),
        long_query.as_str(),
        "/agent/binary?os=Linux&arch=amd64",
        "/agent/binary?os=linux&arch=x86_64",
        "/agent/binary?os=darwin&arch=arm64",
        "/agent/binary?os=windows&arch=arm64",
        "/agent/binary?os=linux",
        "/agent/binary?arch=amd64",
        "/agent/binary",
        "/agent/binary?",
        "/agent/binary?os=&arch=",
        "/agent/binary?os=linux&os=windows&arch=amd64",
        "/agent/binary?os=linux&arch=amd64&arch=arm64",
        "/agent/binary?os=linux&arch=amd64&os=linux",
        "/agent/binary?os[]=linux&arch=amd64",
        // restic: symlinks out of the data dir, out of the bundled root and
        // to the database are refused; the query is mapped through the platform table like the agent's
        "/restic/binary?os=linux&arch=amd64",
        "/restic/binary?os=linux&arch=arm64",
        "/restic/binary?os=windows&arch=amd64",
        "/restic/binary?os=../../etc&arch=passwd",
        "/restic/binary?os=linux&arch=amd64%00",
        "/restic/binary?os=windows&arch=arm64",
        "/restic/binary?os=linux",
        "/restic/binary",
        "/restic/binary/../../etc/passwd",
        "/restic-binaries/restic-linux-amd64",
        "/restic/binary?os=linux&arch=amd64&arch=arm64",
        // blobs: lowercase 64-hex digests only, of the bytes a root serves; a digest of a file outside is unknown
        &blob_of_secret,
        &restic_blob_of_secret,
        "/agent/blobs/sha256/..%2F..%2Fagent-binaries%2Frestic-manager-agent-linux-amd64",
        "/agent/blobs/sha256/restic-manager-agent-linux-amd64",
        "/restic/blobs/sha256/restic-linux-amd64",
        &blob_upper,
        &blob_short,
        "/agent/blobs/sha256/",
        "/agent/blobs/sha1/0123",
        // paths that never match a route
        "/install/",
        "/install/a/b",
        "/install/../agent-binaries/restic-manager-agent-linux-amd64",
        "/install//etc/passwd",
        "/agent/binary/../../etc/passwd",
        "/agent-binaries/restic-manager-agent-linux-amd64",
        "/restic-manager.db",
        "/../outside/secret",
    ];
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    for uri in &cases {
        for method in [Method::GET, Method::HEAD] {
            let r = f.request(method.clone(), uri, &[]).await;
            let body = String::from_utf8_lossy(&r.body);
            assert!(r.status.is_client_error(), "{method} {uri}: status {} body {body}", r.status);
            assert!(!body.contains(SECRET), "{method} {uri} leaked the secret");
            assert!(
                !body.contains("SQLite format") && !body.contains("rmadm_"),
                "{method} {uri} leaked the data dir's state"
            );
            assert!(!body.contains("legit") && !body.contains("root:"), "{method} {uri} served a file: {body}");
            assert!(r.headers.get("x-checksum-sha256").is_none(), "{method} {uri} described a file");
            if method == Method::GET {
                let json = r.json();
                assert!(json["error"].is_string(), "{uri}: {json}");
            }
        }
    }
    // The legitimate requests still work after all that.
    assert_eq!(f.get(BINARY).await.body, b"legit binary");
    assert_eq!(f.get("/install/install.sh").await.body, b"legit script");
}

#[tokio::test]
async fn unknown_platform_errors_name_the_supported_pairs() {
    let f = Fixture::new();
    let r = f.get("/agent/binary?os=darwin&arch=arm64").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let body = r.json();
    assert_eq!(body["error"], "unsupported_platform");
    assert_eq!(body["supported"], serde_json::json!(["linux/amd64", "linux/arm64", "windows/amd64"]));
    let r = f.get("/agent/binary?os=linux&os=windows&arch=amd64").await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
}

// ---- headers, conditionals and ranges against the bytes on disk ----

async fn published(f: &Fixture, len: usize) -> (Vec<u8>, String) {
    let bytes = pseudo_random(len, 42);
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, &bytes);
    let etag = f.get(BINARY).await.header("etag").to_string();
    (bytes, etag)
}

#[tokio::test]
async fn binary_response_headers_describe_the_file() {
    let f = Fixture::new();
    let (bytes, etag) = published(&f, 100_000).await;
    let hex = sha_hex(&bytes);
    let r = f.get(BINARY).await;
    assert_eq!(r.body, bytes);
    assert_eq!(etag, format!("\"sha256-{hex}\""));
    assert_eq!(r.header("x-checksum-sha256"), hex);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&bytes));
    assert_eq!(r.header("repr-digest"), format!("sha-256=:{b64}:"));
    assert_eq!(r.header("content-length"), bytes.len().to_string());
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert_eq!(r.header("content-disposition"), format!("attachment; filename=\"{LINUX_AMD64}\""));
    assert_eq!(r.header("accept-ranges"), "bytes");
    assert_eq!(r.header("cache-control"), "no-cache");
    let mtime = fs::metadata(f.bundled.join("agent-binaries").join(LINUX_AMD64)).unwrap().modified().unwrap();
    assert_eq!(r.header("last-modified"), httpdate::fmt_http_date(mtime));

    // HEAD: same headers, no body.
    let h = f.request(Method::HEAD, BINARY, &[]).await;
    assert_eq!(h.status, StatusCode::OK);
    assert!(h.body.is_empty());
    for name in ["etag", "last-modified", "content-length", "x-checksum-sha256", "repr-digest", "x-asset-source"] {
        assert_eq!(h.header(name), r.header(name), "{name}");
    }
}

#[tokio::test]
async fn install_files_get_their_content_type() {
    let f = Fixture::new();
    f.put(&f.bundled, "install", "install.sh", b"#!/bin/sh\n");
    f.put(&f.bundled, "install", "install.ps1", b"Write-Host hi\n");
    f.put(&f.bundled, "install", "restic-manager-agent.service", b"[Unit]\n");
    assert_eq!(f.get("/install/install.sh").await.header("content-type"), "application/x-sh");
    let ps1 = f.get("/install/install.ps1").await;
    assert_eq!((ps1.status, ps1.body.as_slice()), (StatusCode::OK, &b"Write-Host hi\n"[..]));
    let unit = f.get("/install/restic-manager-agent.service").await;
    assert_eq!((unit.status, unit.body.as_slice()), (StatusCode::OK, &b"[Unit]\n"[..]));
    assert!(unit.headers.get("content-disposition").is_none());
}

#[tokio::test]
async fn single_ranges_match_the_bytes_on_disk() {
    let f = Fixture::new();
    let (bytes, _) = published(&f, 10_000).await;
    let n = bytes.len();
    let cases: [(&str, usize, usize); 7] = [
        ("bytes=0-0", 0, 0),
        ("bytes=0-99", 0, 99),
        ("bytes=9000-", 9000, n - 1),
        ("bytes=-500", n - 500, n - 1),
        ("bytes=-20000", 0, n - 1), // a suffix longer than the file selects all of it
        ("bytes=9990-20000", 9990, n - 1),
        ("bytes=1234-5678", 1234, 5678),
    ];
    for (range, start, end) in cases {
        let r = f.request(Method::GET, BINARY, &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(r.body, bytes[start..=end], "{range}");
        assert_eq!(r.header("content-range"), format!("bytes {start}-{end}/{n}"), "{range}");
        assert_eq!(r.header("content-length"), (end - start + 1).to_string(), "{range}");
        // The digest headers still describe the whole file (RFC 9530 representation digest).
        assert_eq!(r.header("x-checksum-sha256"), sha_hex(&bytes));
    }
}

#[tokio::test]
async fn unsatisfiable_malformed_and_multi_ranges() {
    let f = Fixture::new();
    let (bytes, _) = published(&f, 1000).await;
    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let r = f.request(Method::GET, BINARY, &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(r.header("content-range"), "bytes */1000", "{range}");
        assert_eq!(r.header("content-type"), "application/json", "{range}");
        assert_eq!(r.json()["error"], "range_not_satisfiable", "{range}");
    }
    // Malformed ranges are ignored; several ranges are answered with the whole file.
    for range in ["bytes=abc", "items=0-10", "bytes=10-5", "bytes=0-10,20-30", "bytes = 0-1"] {
        let r = f.request(Method::GET, BINARY, &[("range", range)]).await;
        assert_eq!((r.status, r.body.len()), (StatusCode::OK, bytes.len()), "{range}");
    }
}

#[tokio::test]
async fn if_range_serves_the_range_only_for_the_current_version() {
    let f = Fixture::new();
    let (bytes, etag) = published(&f, 1000).await;
    let r = f.request(Method::GET, BINARY, &[("range", "bytes=10-19"), ("if-range", &etag)]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::PARTIAL_CONTENT, &bytes[10..20]));
    let stale = "\"sha256-0000000000000000000000000000000000000000000000000000000000000000\"";
    let r = f.request(Method::GET, BINARY, &[("range", "bytes=10-19"), ("if-range", stale)]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 1000));
    let last_modified = f.get(BINARY).await.header("last-modified").to_string();
    let r = f.request(Method::GET, BINARY, &[("range", "bytes=10-19"), ("if-range", &last_modified)]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    let r = f
        .request(Method::GET, BINARY, &[("range", "bytes=10-19"), ("if-range", "Thu, 01 Jan 1970 00:00:00 GMT")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// RFC 9110 §13.1.5: If-Range must match the current representation exactly and strongly, or the whole current
/// representation is sent. Anything else could stitch bytes of two versions together in the client's file.
#[tokio::test]
async fn if_range_without_an_exact_strong_match_sends_the_whole_file() {
    let f = Fixture::new();
    let (bytes, etag) = published(&f, 1000).await;
    let last_modified = f.get(BINARY).await.header("last-modified").to_string();
    let lm = httpdate::parse_http_date(&last_modified).unwrap();
    let later = httpdate::fmt_http_date(lm + std::time::Duration::from_secs(3600));
    let earlier = httpdate::fmt_http_date(lm - std::time::Duration::from_secs(1));
    let weak = format!("W/{etag}");
    let full: Vec<&str> = vec![
        &later,   // a date later than Last-Modified is not a match (exact match only)
        &earlier, // nor an earlier one
        "not a date",
        "Sunday, 32-Foo-99 99:99:99 GMT",
        "",
        &weak, // weak tags never match in If-Range (strong comparison)
        "\"sha256-",
        "*",
    ];
    for if_range in full {
        let r = f.request(Method::GET, BINARY, &[("range", "bytes=10-19"), ("if-range", if_range)]).await;
        assert_eq!((r.status, r.body.len()), (StatusCode::OK, bytes.len()), "If-Range {if_range:?}");
        assert!(r.headers.get("content-range").is_none(), "If-Range {if_range:?}");
        assert_eq!(r.body, bytes, "If-Range {if_range:?}");
    }
    // Two If-Range fields: in doubt, the whole file.
    let r = f
        .send(
            http::Request::get(BINARY)
                .header("range", "bytes=10-19")
                .header("if-range", &etag)
                .header("if-range", &etag)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, bytes.len()));
    // Exact matches still resume: the strong ETag, and Last-Modified in any HTTP-date form.
    let rfc850 = {
        let d = httpdate::HttpDate::from(lm);
        let imf = d.to_string(); // "Sun, 06 Nov 1994 08:49:37 GMT"
        let (_, rest) = imf.split_once(", ").unwrap();
        let parts: Vec<&str> = rest.split(' ').collect();
        let weekday = match &imf[..3] {
            "Mon" => "Monday",
            "Tue" => "Tuesday",
            "Wed" => "Wednesday",
            "Thu" => "Thursday",
            "Fri" => "Friday",
            "Sat" => "Saturday",
            _ => "Sunday",
        };
        format!("{weekday}, {}-{}-{} {} GMT", parts[0], parts[1], &parts[2][2..], parts[3])
    };
    for if_range in [etag.as_str(), &last_modified, &rfc850] {
        let r = f.request(Method::GET, BINARY, &[("range", "bytes=10-19"), ("if-range", if_range)]).await;
        assert_eq!((r.status, r.body.as_slice()), (StatusCode::PARTIAL_CONTENT, &bytes[10..20]), "{if_range:?}");
    }
}

/// RFC 9110 §14.2: Range is defined for GET only; a HEAD answers what a plain GET would (200, full length).
#[tokio::test]
async fn head_ignores_range() {
    let f = Fixture::new();
    let (bytes, etag) = published(&f, 1000).await;
    for range in ["bytes=0-9", "bytes=-5", "bytes=5000-"] {
        for extra in [None, Some(("if-range", etag.as_str()))] {
            let mut headers = vec![("range", range)];
            headers.extend(extra);
            let r = f.request(Method::HEAD, BINARY, &headers).await;
            assert_eq!(r.status, StatusCode::OK, "{headers:?}");
            assert_eq!(r.header("content-length"), bytes.len().to_string(), "{headers:?}");
            assert!(r.headers.get("content-range").is_none(), "{headers:?}");
            assert!(r.body.is_empty());
        }
    }
}

/// A 304 never announces a length different from the 200's (RFC 9110 §8.6): it carries the representation's
/// length, for GET and HEAD alike. 412 and 416 carry the JSON error body, like every other error.
#[tokio::test]
async fn not_modified_keeps_the_length_and_412_416_are_json() {
    let f = Fixture::new();
    let (bytes, etag) = published(&f, 1000).await;
    let last_modified = f.get(BINARY).await.header("last-modified").to_string();
    for method in [Method::GET, Method::HEAD] {
        for cond in [("if-none-match", etag.as_str()), ("if-modified-since", &last_modified)] {
            let r = f.request(method.clone(), BINARY, &[cond]).await;
            assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{method} {cond:?}");
            assert_eq!(r.header("content-length"), bytes.len().to_string(), "{method} {cond:?}");
            assert!(r.body.is_empty());
        }
        let r = f.request(method.clone(), BINARY, &[("if-match", "\"sha256-other\"")]).await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{method}");
        assert_eq!(r.header("content-type"), "application/json", "{method}");
        assert_eq!(r.header("etag"), etag, "the 412 still names the current version");
        if method == Method::GET {
            assert_eq!(r.json()["error"], "precondition_failed");
        }
    }
    let r = f.request(Method::GET, BINARY, &[("range", "bytes=1000-")]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), "bytes */1000");
    assert_eq!(r.header("content-type"), "application/json");
    assert!(r.headers.get("content-disposition").is_none());
    assert_eq!(r.header("content-length"), r.body.len().to_string());
    let body = r.json();
    assert_eq!((body["error"].as_str(), body["size"].as_u64()), (Some("range_not_satisfiable"), Some(1000)));
}

#[tokio::test]
async fn conditional_requests() {
    let f = Fixture::new();
    let (_, etag) = published(&f, 1000).await;
    let last_modified = f.get(BINARY).await.header("last-modified").to_string();
    let other = "\"sha256-ffff\"";
    let list = format!("{other}, {etag}");
    let weak = format!("W/{etag}");
    let cases: Vec<(Vec<(&str, &str)>, StatusCode)> = vec![
        (vec![("if-none-match", &etag)], StatusCode::NOT_MODIFIED),
        (vec![("if-none-match", "*")], StatusCode::NOT_MODIFIED),
        (vec![("if-none-match", &list)], StatusCode::NOT_MODIFIED),
        (vec![("if-none-match", &weak)], StatusCode::NOT_MODIFIED), // weak comparison
        (vec![("if-none-match", other)], StatusCode::OK),
        (vec![("if-modified-since", &last_modified)], StatusCode::NOT_MODIFIED),
        (vec![("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT")], StatusCode::OK),
        // If-None-Match wins over If-Modified-Since.
        (vec![("if-none-match", other), ("if-modified-since", &last_modified)], StatusCode::OK),
        (vec![("if-match", &etag)], StatusCode::OK),
        (vec![("if-match", other)], StatusCode::PRECONDITION_FAILED),
        (vec![("if-unmodified-since", "Thu, 01 Jan 1970 00:00:00 GMT")], StatusCode::PRECONDITION_FAILED),
        (vec![("if-unmodified-since", &last_modified)], StatusCode::OK),
    ];
    for (headers, want) in cases {
        for method in [Method::GET, Method::HEAD] {
            let r = f.request(method.clone(), BINARY, &headers).await;
            assert_eq!(r.status, want, "{method} {headers:?}");
            if want == StatusCode::NOT_MODIFIED {
                assert!(r.body.is_empty());
                assert_eq!(r.header("etag"), etag, "304 carries the validator");
            }
        }
    }
}

#[tokio::test]
async fn a_replaced_file_gets_a_new_etag_and_is_hashed_once_per_version() {
    let f = Fixture::new();
    let path = f.put(&f.data, "agent-binaries", LINUX_AMD64, b"version one");
    let first = f.get(BINARY).await;
    for _ in 0..10 {
        f.get(BINARY).await;
        f.request(Method::HEAD, BINARY, &[]).await;
    }
    assert_eq!(f.state.store().digests_computed(), 1, "the digest is cached per file version");
    let tmp = path.with_file_name(".upload.tmp");
    fs::write(&tmp, b"version two").unwrap();
    fs::rename(&tmp, &path).unwrap();
    let second = f.get(BINARY).await;
    assert_eq!(second.body, b"version two");
    assert_ne!(first.header("etag"), second.header("etag"));
    assert_eq!(second.header("x-checksum-sha256"), sha_hex(b"version two"));
    let r = f.request(Method::GET, BINARY, &[("if-none-match", first.header("etag"))]).await;
    assert_eq!(r.status, StatusCode::OK, "the old ETag no longer matches");
    assert_eq!(f.state.store().digests_computed(), 2);
}

// ---- discovery ----

#[tokio::test]
async fn manifest_and_sha256sums_describe_every_platform() {
    let f = Fixture::with_public_url(Some("https://rm.example.com/"));
    let amd = pseudo_random(5000, 1);
    let mut arm = pseudo_random(7000, 2);
    arm.extend_from_slice(b"\0rm-buildinfo:v1;version=1.4.0;commit=deadbeef;date=2026-11-01T00:00:00Z;\0");
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, &amd);
    f.put(&f.data, "agent-binaries", "restic-manager-agent-linux-arm64", &arm);
    let m = f.get("/agent/manifest").await.json();
    assert_eq!(m["server"]["version"], rm_buildinfo::current().version);
    let agents = m["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 3);
    assert_eq!(agents[0]["file"], LINUX_AMD64);
    assert_eq!(agents[0]["sha256"], sha_hex(&amd));
    assert_eq!(agents[0]["size"], 5000);
    assert_eq!(agents[0]["source"], "bundled");
    assert_eq!(agents[0]["url"], "https://rm.example.com/agent/binary?os=linux&arch=amd64");
    assert_eq!(agents[0]["blob_url"], format!("https://rm.example.com/agent/blobs/sha256/{}", sha_hex(&amd)));
    assert_eq!(agents[0]["agent"], serde_json::Value::Null);
    assert_eq!(agents[1]["source"], "data-dir");
    assert_eq!(agents[1]["agent"]["version"], "1.4.0");
    assert_eq!(agents[1]["agent"]["commit"], "deadbeef");
    assert_eq!((agents[2]["published"].as_bool(), agents[2]["sha256"].is_null()), (Some(false), true));
    assert!(agents[2].get("blob_url").is_none(), "nothing published, no blob: {m}");

    let sums = f.get("/agent/SHA256SUMS").await;
    assert_eq!(sums.header("content-type"), "text/plain; charset=utf-8");
    let want = format!("{}  {LINUX_AMD64}\n{}  restic-manager-agent-linux-arm64\n", sha_hex(&amd), sha_hex(&arm));
    assert_eq!(String::from_utf8(sums.body).unwrap(), want);
}

#[tokio::test]
async fn manifest_urls_use_a_plain_host_header_or_stay_relative() {
    let f = Fixture::new();
    let r = f.request(Method::GET, "/agent/manifest", &[("host", "rm.internal:8080")]).await;
    assert_eq!(r.json()["agents"][0]["url"], "http://rm.internal:8080/agent/binary?os=linux&arch=amd64");
    let r = f.request(Method::GET, "/agent/manifest", &[("host", "evil.com/$(id)")]).await;
    assert_eq!(r.json()["agents"][0]["url"], "/agent/binary?os=linux&arch=amd64");
}

// ---- content-addressed downloads ----

/// `/agent/blobs/sha256/<hex>` and `/restic/blobs/sha256/<hex>` serve the bytes with that digest from whichever
/// root serves them under a platform's name, immutable; the names and the manifest revalidate; a replaced file's old
/// digest is unknown at once (nothing archived it here) and its new one is served.
#[tokio::test]
async fn blobs_serve_the_bytes_with_their_digest_and_are_immutable() {
    let f = Fixture::new();
    let amd = pseudo_random(70_000, 3);
    let arm = pseudo_random(9_000, 4);
    let restic = pseudo_random(5_000, 5);
    f.put(&f.bundled, "agent-binaries", LINUX_AMD64, &amd);
    f.put(&f.data, "agent-binaries", "restic-manager-agent-linux-arm64", &arm);
    f.put(&f.data, "restic-binaries", "restic-windows-amd64.exe", &restic);
    let immutable = "public, max-age=31536000, immutable";

    for (path, bytes, source) in [
        (format!("/agent/blobs/sha256/{}", sha_hex(&amd)), &amd, "bundled"),
        (format!("/agent/blobs/sha256/{}", sha_hex(&arm)), &arm, "data-dir"),
        (format!("/restic/blobs/sha256/{}", sha_hex(&restic)), &restic, "data-dir"),
    ] {
        // Twice: the first full lookup, then the remembered version.
        for _ in 0..2 {
            let r = f.get(&path).await;
            assert_eq!(r.status, StatusCode::OK, "{path}");
            assert_eq!(&r.body, bytes, "{path}");
            assert_eq!(r.header("x-checksum-sha256"), sha_hex(bytes));
            assert_eq!((r.header("cache-control"), r.header("x-asset-source")), (immutable, source), "{path}");
        }
        let etag = f.get(&path).await.header("etag").to_string();
        let r = f.request(Method::GET, &path, &[("if-none-match", &etag)]).await;
        assert_eq!((r.status, r.header("cache-control")), (StatusCode::NOT_MODIFIED, immutable), "{path}");
        let r = f.request(Method::GET, &path, &[("range", "bytes=10-19")]).await;
        assert_eq!((r.status, r.header("cache-control")), (StatusCode::PARTIAL_CONTENT, immutable), "{path}");
        assert_eq!(r.body, bytes[10..20]);
        let r = f.request(Method::HEAD, &path, &[]).await;
        assert_eq!((r.status, r.header("cache-control"), r.body.len()), (StatusCode::OK, immutable, 0), "{path}");
        let r = f.request(Method::GET, &path, &[("range", "bytes=999999-")]).await;
        assert_eq!((r.status, r.header("cache-control")), (StatusCode::RANGE_NOT_SATISFIABLE, "no-store"), "{path}");
    }
    // A blob download is audited like a download by name, with the platform whose file it was.
    let mut audited = None;
    for _ in 0..50 {
        let events = f.admin(Method::GET, "/api/v1/audit?kind=download", serde_json::Value::Null).await.json();
        audited = events["events"].as_array().unwrap().iter().find(|e| e["sha256"] == sha_hex(&amd)).cloned();
        if audited.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let audited = audited.expect("a download audit event for the blob");
    assert_eq!((audited["platform"].as_str(), audited["source"].as_str()), (Some("linux/amd64"), Some("bundled")));
    // An agent's digest is not a restic blob, nor the other way round.
    let r = f.get(&format!("/restic/blobs/sha256/{}", sha_hex(&amd))).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    assert_eq!(r.header("cache-control"), "no-store", "a 404 is never kept: the digest may be published later");
    let r = f.get(&format!("/agent/blobs/sha256/{}", sha_hex(&restic))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // The names and the manifest revalidate; the manifest names the blobs.
    for name in ["/agent/binary?os=linux&arch=amd64", "/restic/binary?os=windows&arch=amd64", "/agent/manifest"] {
        assert_eq!(f.get(name).await.header("cache-control"), "no-cache", "{name}");
    }
    assert_eq!(f.get("/agent/SHA256SUMS").await.header("cache-control"), "no-cache");
    let m = f.get("/agent/manifest").await.json();
    assert_eq!(m["agents"][0]["blob_url"], format!("/agent/blobs/sha256/{}", sha_hex(&amd)), "{m}");
    assert_eq!(m["restic"][2]["blob_url"], format!("/restic/blobs/sha256/{}", sha_hex(&restic)), "{m}");

    // An override: the bundled build's digest is no longer served by any name (and nothing archived it here).
    let new = pseudo_random(70_000, 6);
    f.put(&f.data, "agent-binaries", LINUX_AMD64, &new);
    let r = f.get(&format!("/agent/blobs/sha256/{}", sha_hex(&amd))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = f.get(&format!("/agent/blobs/sha256/{}", sha_hex(&new))).await;
    assert_eq!((r.status, r.body == new), (StatusCode::OK, true));
}

/// The archive (`<DataDir>/agent-builds/<sha256>`, filled by the rollout task) comes first, and a damaged archive
/// file is never served under the name of a digest it does not have.
#[tokio::test]
async fn agent_blobs_come_from_the_archive_checked() {
    let f = Fixture::new();
    let old = pseudo_random(4_000, 7);
    fs::create_dir_all(f.data.join("agent-builds")).unwrap();
    f.put(&f.data, "agent-builds", &sha_hex(&old), &old);
    let r = f.get(&format!("/agent/blobs/sha256/{}", sha_hex(&old))).await;
    assert_eq!((r.status, r.body == old), (StatusCode::OK, true));
    assert_eq!(r.header("cache-control"), "public, max-age=31536000, immutable");
    let damaged = pseudo_random(4_000, 8);
    f.put(&f.data, "agent-builds", &sha_hex(&old), &damaged);
    let r = f.get(&format!("/agent/blobs/sha256/{}", sha_hex(&old))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.headers.get("x-checksum-sha256").is_none());
}

/// The API is never cacheable, whatever sits in front of the server.
#[tokio::test]
async fn api_answers_are_not_stored() {
    let f = Fixture::new();
    let r = f.post_json("/api/v1/agents/heartbeat", Some("rmagt_x_y"), serde_json::json!({})).await;
    assert_eq!((r.status, r.header("cache-control")), (StatusCode::UNAUTHORIZED, "no-store"));
    let r = f.admin(Method::GET, "/api/v1/agents", serde_json::Value::Null).await;
    assert_eq!((r.status, r.header("cache-control")), (StatusCode::OK, "no-store"));
    let r = f.admin(Method::GET, "/metrics", serde_json::Value::Null).await;
    assert_eq!(r.header("cache-control"), "no-store");
    let r = f.post_json("/api/v1/agents/enroll", None, serde_json::json!({})).await;
    assert_eq!(r.header("cache-control"), "no-store");
}

// ---- operations ----

#[tokio::test]
async fn health_readiness_and_version() {
    let f = Fixture::new();
    let r = f.get("/healthz").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::OK, Some("ok")));
    let r = f.get("/readyz").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::OK, Some("ready")));
    let v = f.get("/version").await.json();
    let info = rm_buildinfo::current();
    assert_eq!(
        (v["version"].as_str(), v["commit"].as_str(), v["date"].as_str()),
        (Some(info.version.as_str()), Some(info.commit.as_str()), Some(info.date.as_str()))
    );

    fs::rename(&f.data, f.data.with_extension("gone")).unwrap();
    let r = f.get("/readyz").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready")));
    fs::rename(f.data.with_extension("gone"), &f.data).unwrap();
    f.state.begin_shutdown();
    let r = f.get("/readyz").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down")));
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let f = Fixture::new();
    let r = f.get("/nope").await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let r = f.request(Method::POST, BINARY, &[]).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
    let r = f.request(Method::DELETE, "/install/install.sh", &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

// ---- install scripts learn the server URL ----

const TEMPLATE: &[u8] = b"#!/bin/sh\nRM_DEFAULT_SERVER='__RM_SERVER_URL__'\necho \"$RM_DEFAULT_SERVER\"\n";

fn rendered(base: &str) -> Vec<u8> {
    String::from_utf8(TEMPLATE.to_vec()).unwrap().replace("__RM_SERVER_URL__", base).into_bytes()
}

#[tokio::test]
async fn install_scripts_get_the_host_derived_url_with_matching_validators() {
    let f = Fixture::new();
    f.put(&f.bundled, "install", "install.sh", TEMPLATE);
    let r = f.request(Method::GET, "/install/install.sh", &[("host", "rm.internal:8080")]).await;
    let want = rendered("http://rm.internal:8080");
    assert_eq!(r.body, want);
    assert_eq!(r.header("content-length"), want.len().to_string());
    assert_eq!(r.header("x-checksum-sha256"), sha_hex(&want));
    assert_eq!(r.header("etag"), format!("\"sha256-{}\"", sha_hex(&want)));
    let etag = r.header("etag").to_string();
    let again =
        f.request(Method::GET, "/install/install.sh", &[("host", "rm.internal:8080"), ("if-none-match", &etag)]).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    let other_host =
        f.request(Method::GET, "/install/install.sh", &[("host", "other:1"), ("if-none-match", &etag)]).await;
    assert_eq!(other_host.status, StatusCode::OK, "another URL is another representation");
    let part =
        f.request(Method::GET, "/install/install.sh", &[("host", "rm.internal:8080"), ("range", "bytes=10-29")]).await;
    assert_eq!((part.status, part.body.as_slice()), (StatusCode::PARTIAL_CONTENT, &want[10..30]));
}

#[tokio::test]
async fn hostile_host_headers_never_reach_the_script() {
    let f = Fixture::new();
    f.put(&f.bundled, "install", "install.sh", TEMPLATE);
    f.put(&f.bundled, "install", "install.ps1", b"param([string]$Server = '__RM_SERVER_URL__')\n");
    for host in [
        "evil.com'; rm -rf / #",
        "x'$(id)'",
        "$(id)",
        "`id`",
        "a\"b",
        "a;b",
        "a b",
        "a|b",
        "a&b",
        "a\\b",
        "evil.com/'",
        "h:1/$(reboot)",
        "user@host",
        "{a,b}",
        "*",
        "",
    ] {
        for name in ["install.sh", "install.ps1"] {
            let r = f.request(Method::GET, &format!("/install/{name}"), &[("host", host)]).await;
            assert_eq!(r.status, StatusCode::OK, "{host:?}");
            let body = String::from_utf8(r.body).unwrap();
            assert!(body.contains("'__RM_SERVER_URL__'"), "{name} with Host {host:?} was rewritten: {body}");
        }
    }
}

#[tokio::test]
async fn configured_public_url_wins_over_host() {
    let f = Fixture::with_public_url(Some("https://rm.example.com/base/"));
    f.put(&f.data, "install", "install.sh", TEMPLATE);
    let r = f.request(Method::GET, "/install/install.sh", &[("host", "evil.com")]).await;
    assert_eq!(r.body, rendered("https://rm.example.com/base"));
    // Files that are not scripts, and scripts without the placeholder, are served byte for byte.
    f.put(&f.data, "install", "restic-manager-agent.service", b"ExecStart=__RM_SERVER_URL__\n");
    assert_eq!(f.get("/install/restic-manager-agent.service").await.body, b"ExecStart=__RM_SERVER_URL__\n");
    f.put(&f.data, "install", "plain.sh", b"echo plain\n");
    let plain = f.get("/install/plain.sh").await;
    assert_eq!(
        (plain.body.as_slice(), plain.header("x-checksum-sha256")),
        (&b"echo plain\n"[..], sha_hex(b"echo plain\n").as_str())
    );
}

// ---- the remembered-lookup fast path must see every change a full lookup would ----

#[tokio::test]
async fn remembered_lookups_notice_overrides_replacements_and_escapes() {
    let f = Fixture::new();
    f.put(&f.bundled, "install", "install.sh", b"bundled");
    for _ in 0..3 {
        assert_eq!(f.get("/install/install.sh").await.body, b"bundled"); // now remembered
    }
    // An override dropped into the data dir wins immediately.
    f.put(&f.data, "install", "install.sh", b"override");
    assert_eq!(f.get("/install/install.sh").await.body, b"override");
    assert_eq!(f.get("/install/install.sh").await.body, b"override");
    // Replaced by rename: the new version, with its own validators.
    let tmp = f.data.join("install/.next");
    fs::write(&tmp, b"override v2").unwrap();
    fs::rename(&tmp, f.data.join("install/install.sh")).unwrap();
    let r = f.get("/install/install.sh").await;
    assert_eq!(
        (r.body.as_slice(), r.header("x-checksum-sha256")),
        (&b"override v2"[..], sha_hex(b"override v2").as_str())
    );
    // The remembered file swapped for a symlink out of the root: refused, never served from memory.
    fs::remove_file(f.data.join("install/install.sh")).unwrap();
    symlink(f.outside.join("secret"), f.data.join("install/install.sh")).unwrap();
    let r = f.get("/install/install.sh").await;
    assert_eq!(r.body, b"bundled", "the escaping override is refused and the bundled copy served");
    // HEAD and 304 on a remembered file describe the current version.
    fs::remove_file(f.data.join("install/install.sh")).unwrap();
    let etag = f.get("/install/install.sh").await.header("etag").to_string();
    assert_eq!(
        f.request(Method::GET, "/install/install.sh", &[("if-none-match", &etag)]).await.status,
        StatusCode::NOT_MODIFIED
    );
    fs::remove_file(f.bundled.join("install/install.sh")).unwrap();
    assert_eq!(f.get("/install/install.sh").await.status, StatusCode::NOT_FOUND, "a deleted file is gone at once");
    assert_eq!(
        f.request(Method::HEAD, "/install/install.sh", &[("if-none-match", &etag)]).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn rendered_scripts_are_cached_per_version_and_url() {
    let f = Fixture::new();
    f.put(&f.bundled, "install", "install.sh", TEMPLATE);
    let a = f.request(Method::GET, "/install/install.sh", &[("host", "a.example")]).await;
    let b = f.request(Method::GET, "/install/install.sh", &[("host", "b.example")]).await;
    let a2 = f.request(Method::GET, "/install/install.sh", &[("host", "a.example")]).await;
    assert_eq!((a.body.clone(), b.body.clone()), (rendered("http://a.example"), rendered("http://b.example")));
    assert_eq!(a2.body, a.body);
    // A new version of the template is rendered anew.
    let next = b"#!/bin/sh\nNEW='__RM_SERVER_URL__'\n";
    let tmp = f.bundled.join("install/.next");
    fs::write(&tmp, next).unwrap();
    fs::rename(&tmp, f.bundled.join("install/install.sh")).unwrap();
    let r = f.request(Method::GET, "/install/install.sh", &[("host", "a.example")]).await;
    assert_eq!(r.body, b"#!/bin/sh\nNEW='http://a.example'\n");
}

// ---- restic builds ----

#[tokio::test]
async fn restic_builds_are_served_listed_and_versioned_from_the_sidecar() {
    let f = Fixture::with_public_url(Some("https://rm.example.com/"));
    let amd = pseudo_random(6000, 3);
    let arm = pseudo_random(4000, 4);
    let win = pseudo_random(3000, 5);
    f.put(&f.bundled, "restic-binaries", "restic-linux-amd64", &amd);
    f.put(&f.bundled, "restic-binaries", "restic-linux-arm64", &arm);
    // The sidecar describes the bundled amd64 file and names arm64 with another checksum (a stale entry).
    let sidecar = serde_json::json!({
        "origin": "debian bookworm",
        "files": {
            "restic-linux-amd64": {"version": "0.14.0", "package_version": "0.14.0-1+b5", "sha256": sha_hex(&amd)},
            "restic-linux-arm64": {"version": "0.14.0", "sha256": sha_hex(b"other")},
        }
    });
    f.put(&f.bundled, "restic-binaries", "restic-binaries.json", sidecar.to_string().as_bytes());
    // The operator's Windows build in the data dir: no sidecar entry, version unknown.
    f.put(&f.data, "restic-binaries", "restic-windows-amd64.exe", &win);

    let r = f.get("/restic/binary?os=linux&arch=amd64").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, amd);
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert_eq!(r.header("content-disposition"), "attachment; filename=\"restic-linux-amd64\"");
    let head = f.request(Method::HEAD, "/restic/binary?os=windows&arch=amd64", &[]).await;
    assert_eq!((head.status.as_u16(), head.body.len()), (200, 0));
    assert_eq!(head.header("content-length"), "3000");

    let m = f.get("/agent/manifest").await.json();
    let restic = m["restic"].as_array().unwrap();
    assert_eq!(restic.len(), 3, "{m}");
    assert_eq!(restic[0]["file"], "restic-linux-amd64");
    assert_eq!(restic[0]["sha256"], sha_hex(&amd));
    assert_eq!(restic[0]["size"], 6000);
    assert_eq!(restic[0]["version"], "0.14.0");
    assert_eq!(restic[0]["package_version"], "0.14.0-1+b5");
    assert_eq!(restic[0]["source"], "bundled");
    assert_eq!(restic[0]["url"], "https://rm.example.com/restic/binary?os=linux&arch=amd64");
    assert_eq!(restic[0]["blob_url"], format!("https://rm.example.com/restic/blobs/sha256/{}", sha_hex(&amd)));
    assert_eq!(restic[1]["sha256"], sha_hex(&arm));
    assert!(restic[1]["version"].is_null(), "a sidecar entry for other bytes lends no version: {m}");
    assert_eq!(restic[2]["file"], "restic-windows-amd64.exe");
    assert_eq!(restic[2]["source"], "data-dir");
    assert!(restic[2]["version"].is_null());

    let sums = String::from_utf8(f.get("/agent/SHA256SUMS").await.body).unwrap();
    let want = format!(
        "{}  restic-linux-amd64\n{}  restic-linux-arm64\n{}  restic-windows-amd64.exe\n",
        sha_hex(&amd),
        sha_hex(&arm),
        sha_hex(&win)
    );
    assert_eq!(sums, want, "no agent is published here, so the sums are restic's only");

    // Nothing published for a platform: the same 404 JSON as the agent's binary, naming restic's file.
    fs::remove_file(f.data.join("restic-binaries/restic-windows-amd64.exe")).unwrap();
    let r = f.get("/restic/binary?os=windows&arch=amd64").await;
    assert_eq!(r.status, 404);
    let body = r.json();
    assert_eq!(body["error"], "binary_not_published", "{body}");
    assert_eq!(body["file"], "restic-windows-amd64.exe", "{body}");
    let r = f.get("/restic/binary?os=darwin&arch=amd64").await;
    assert_eq!(r.status, 400);
}
