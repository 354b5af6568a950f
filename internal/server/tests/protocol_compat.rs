//! The server against recorded agent bodies (`internal/protocol/tests/fixtures/v1/`, recorded from the released agent
//! before `protocol` fields existed) and against bodies from a newer agent (unknown fields everywhere, a higher
//! `protocol`): both enroll and heartbeat, and the answers keep every field the released agent reads.

mod common;

use common::Fixture;
use http::StatusCode;
use rm_protocol::{ErrorBody, HeartbeatResponse};
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../protocol/tests/fixtures/v1/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Every top-level field of the recorded answer is in `answer` (the released agent reads them).
fn has_recorded_fields(answer: &Value, recorded: &str) {
    for key in fixture(recorded).as_object().unwrap().keys() {
        assert!(answer.get(key).is_some(), "{recorded}: the answer lost {key:?}: {answer}");
    }
}

fn newer(mut body: Value) -> Value {
    let map = body.as_object_mut().unwrap();
    map.insert("protocol".into(), json!(99));
    map.insert("capabilities".into(), json!(["backup", "restore"]));
    map.insert("host".into(), json!({"cpus": 2, "kernel": "6.1"}));
    body
}

async fn token(f: &Fixture) -> String {
    let r = f.admin(http::Method::POST, "/api/v1/tokens", json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED);
    r.json()["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn recorded_and_newer_agent_bodies_are_accepted() {
    let f = Fixture::new();
    f.put(&f.bundled, "agent-binaries", common::LINUX_AMD64, b"an agent build");
    let t = token(&f).await;
    for (label, shape) in [("recorded", (|v| v) as fn(Value) -> Value), ("newer", newer)] {
        let mut enroll = shape(fixture("enroll_request"));
        enroll["token"] = json!(t);
        let r = f.post_json("/api/v1/agents/enroll", None, enroll).await;
        assert_eq!(r.status, StatusCode::CREATED, "{label} enroll: {}", r.json());
        let enrolled = r.json();
        has_recorded_fields(&enrolled, "enroll_response");
        assert_eq!(enrolled["protocol"], rm_protocol::PROTOCOL_VERSION);
        let credential = enrolled["credential"].as_str().unwrap().to_string();

        let beat = shape(fixture("heartbeat_request"));
        let r = f.post_json("/api/v1/agents/heartbeat", Some(&credential), beat).await;
        assert_eq!(r.status, StatusCode::OK, "{label} heartbeat: {}", r.json());
        let answer = r.json();
        has_recorded_fields(&answer, "heartbeat_response");
        let typed: HeartbeatResponse = serde_json::from_value(answer).unwrap();
        assert_eq!(typed.update.and_then(|u| u.platform()).map(|p| p.file_name()), Some(common::LINUX_AMD64));
    }
}

#[tokio::test]
async fn every_refusal_is_an_error_body() {
    let f = Fixture::new();
    let mut bad_platform = fixture("enroll_request");
    bad_platform["arch"] = json!("x86");
    let r = f.post_json("/api/v1/agents/enroll", None, bad_platform).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let body: ErrorBody = serde_json::from_value(r.json()).unwrap();
    assert_eq!(body.error, "unsupported_platform");
    let r = f.post_json("/api/v1/agents/enroll", None, fixture("enroll_request")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let body: ErrorBody = serde_json::from_value(r.json()).unwrap();
    assert_eq!(body.error, "token_unknown");
    let r = f.post_json("/api/v1/agents/heartbeat", Some("rmagt_x_y"), fixture("heartbeat_request")).await;
    let body: ErrorBody = serde_json::from_value(r.json()).unwrap();
    assert_eq!((r.status, body.error.as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"));
}
