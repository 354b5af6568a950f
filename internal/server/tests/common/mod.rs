//! Shared fixture for the in-process router tests: temporary roots, an [`AppState`], and a request helper.
#![allow(dead_code)] // each test file uses a different subset

use std::fs;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use rm_server::{AppState, Config, Settings, app};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

pub const ADMIN: &str = "test-admin-token-0123456789";

pub const LINUX_AMD64: &str = "restic-manager-agent-linux-amd64";
pub const SECRET: &str = "SECRET-OUTSIDE-THE-ROOTS";

pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub bundled: PathBuf,
    pub outside: PathBuf,
    pub state: AppState,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_public_url(None)
    }

    pub fn with_public_url(public_url: Option<&str>) -> Fixture {
        Fixture::with(public_url, Settings::default())
    }

    pub fn with(public_url: Option<&str>, settings: Settings) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let bundled = tmp.path().join("bundled");
        let outside = tmp.path().join("outside");
        for dir in [&data, &bundled] {
            fs::create_dir_all(dir.join("agent-binaries")).unwrap();
            fs::create_dir_all(dir.join("install")).unwrap();
            fs::create_dir_all(dir.join("restic-binaries")).unwrap();
        }
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), SECRET).unwrap();
        let state = AppState::new(Config {
            data_dir: data.clone(),
            bundled_dir: bundled.clone(),
            public_url: public_url.map(|u| u.parse().unwrap()),
            admin_token: Some(ADMIN.into()),
            settings,
        })
        .unwrap();
        Fixture { _tmp: tmp, data, bundled, outside, state }
    }

    pub fn app(&self) -> Router {
        app(self.state.clone())
    }

    pub fn put(&self, root: &Path, sub: &str, name: &str, bytes: &[u8]) -> PathBuf {
        let path = root.join(sub).join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.app().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        // Copy and drop each chunk as hyper does: a file body keeps at most two chunks alive and waits for one to be
        // dropped, so `collect()` (which keeps them) would wait forever on a file of more than two chunks.
        let mut stream = response.into_body();
        let mut body = Vec::new();
        while let Some(frame) = stream.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                body.extend_from_slice(&data);
            }
        }
        Reply { status, headers, body }
    }

    pub async fn get(&self, uri: &str) -> Reply {
        self.request(Method::GET, uri, &[]).await
    }

    /// A request with a body; `auth` becomes `Authorization: Bearer <auth>`.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(token) = auth {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.send(builder.body(Body::from(body)).unwrap()).await
    }

    /// A JSON request as the admin.
    pub async fn admin(&self, method: Method, uri: &str, json: serde_json::Value) -> Reply {
        let body = if json.is_null() { Vec::new() } else { serde_json::to_vec(&json).unwrap() };
        self.call(method, uri, Some(ADMIN), &[("content-type", "application/json")], body).await
    }

    /// A JSON POST with an optional bearer token.
    pub async fn post_json(&self, uri: &str, auth: Option<&str>, json: serde_json::Value) -> Reply {
        self.call(Method::POST, uri, auth, &[("content-type", "application/json")], serde_json::to_vec(&json).unwrap())
            .await
    }

    pub async fn request(&self, method: Method, uri: &str, headers: &[(&str, &str)]) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.send(builder.body(Body::empty()).unwrap()).await
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

pub fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
