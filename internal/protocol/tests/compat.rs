//! Compatibility of the wire protocol with the bodies recorded from released peers (`tests/fixtures/v1/`: recorded
//! through a logging proxy between the agent and server built at e2850bb, the last commit before `protocol` fields
//! existed).
//!
//! Both directions, for every body:
//! * backward: this build reads what an older peer sends (every recorded body parses);
//! * an older peer reads what this build sends: re-serialising a recorded body keeps every recorded field with its
//!   recorded value (new fields may be added, none may be dropped, renamed or change type);
//! * forward: this build reads what a *newer* peer sends (unknown fields at every level and a higher `protocol`).

use std::path::PathBuf;

use rm_protocol::admin::{AgentList, AuditPage, CreateToken, TokenCreated, TokenList};
use rm_protocol::{
    EnrollRequest, EnrollResponse, ErrorBody, HeartbeatRequest, HeartbeatResponse, Manifest, PROTOCOL_VERSION,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every field of `old` is in `new` with the same value (recursively; arrays element by element).
fn keeps_everything(old: &Value, new: &Value, path: &str) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (key, value) in o {
                let Some(found) = n.get(key) else { panic!("{path}.{key} was dropped; an older peer needs it") };
                keeps_everything(value, found, &format!("{path}.{key}"));
            }
        }
        (Value::Array(o), Value::Array(n)) => {
            assert_eq!(o.len(), n.len(), "{path}: array length changed");
            for (i, (a, b)) in o.iter().zip(n).enumerate() {
                keeps_everything(a, b, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(old, new, "{path} changed"),
    }
}

/// Adds an unknown field to every object, as a newer peer might.
fn with_unknown_fields(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out: serde_json::Map<String, Value> =
                map.iter().map(|(k, v)| (k.clone(), with_unknown_fields(v))).collect();
            out.insert("added_in_a_later_version".into(), serde_json::json!({"nested": [1, "two", null]}));
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(with_unknown_fields).collect()),
        other => other.clone(),
    }
}

fn check<T: Serialize + DeserializeOwned>(name: &str) -> T {
    let recorded = fixture(name);
    let parsed: T = serde_json::from_value(recorded.clone()).unwrap_or_else(|e| panic!("{name}: recorded body: {e}"));
    let written = serde_json::to_value(&parsed).unwrap();
    keeps_everything(&recorded, &written, name);
    parsed
}

fn check_forward<T: DeserializeOwned>(name: &str) -> T {
    let mut newer = with_unknown_fields(&fixture(name));
    if let Value::Object(map) = &mut newer {
        map.insert("protocol".into(), Value::from(PROTOCOL_VERSION + 98));
    }
    serde_json::from_value(newer).unwrap_or_else(|e| panic!("{name} from a newer peer: {e}"))
}

#[test]
fn agent_bodies_read_and_written_both_ways() {
    let enroll: EnrollRequest = check("enroll_request");
    assert_eq!(enroll.protocol, 1, "a body without `protocol` is version 1");
    assert!(enroll.token.as_deref().is_some_and(|t| t.starts_with("rmenr_")));
    assert_eq!((enroll.facts.os.as_str(), enroll.facts.arch.as_str()), ("linux", "amd64"));
    let enrolled: EnrollResponse = check("enroll_response");
    assert!(enrolled.credential.starts_with("rmagt_"));
    let beat: HeartbeatRequest = check("heartbeat_request");
    assert_eq!(beat.seq, 1);
    let answer: HeartbeatResponse = check("heartbeat_response");
    let update = answer.update.expect("the recorded answer carries an update");
    assert!(update.published && update.platform().is_some());
    let manifest: Manifest = check("manifest");
    assert_eq!(manifest.agents.len(), 3);
    assert!(manifest.published(update.platform().unwrap()).is_some());
}

#[test]
fn agent_bodies_from_a_newer_peer_are_read() {
    let enroll: EnrollRequest = check_forward("enroll_request");
    assert_eq!(enroll.protocol, PROTOCOL_VERSION + 98);
    let _: EnrollResponse = check_forward("enroll_response");
    let beat: HeartbeatRequest = check_forward("heartbeat_request");
    assert_eq!(beat.facts.hostname, fixture("heartbeat_request")["hostname"]);
    let answer: HeartbeatResponse = check_forward("heartbeat_response");
    assert!(answer.update.is_some());
    let _: Manifest = check_forward("manifest");
    for error in ["error_unsupported_platform", "error_binary_not_published", "error_token_unknown"] {
        let _: ErrorBody = check_forward(error);
    }
}

#[test]
fn this_build_sends_its_protocol_version() {
    let facts: HeartbeatRequest = check("heartbeat_request");
    let request = EnrollRequest::new("rmenr_x", facts.facts);
    assert_eq!(serde_json::to_value(&request).unwrap()["protocol"], PROTOCOL_VERSION);
}

#[test]
fn error_bodies_keep_their_details() {
    let body: ErrorBody = check("error_unsupported_platform");
    assert_eq!(body.error, "unsupported_platform");
    assert_eq!(body.details["supported"].as_array().map(Vec::len), Some(3));
    let body: ErrorBody = check("error_binary_not_published");
    assert_eq!(body.details["file"], "restic-manager-agent-windows-amd64.exe");
    let _: ErrorBody = check("error_token_unknown");
}

#[test]
fn operator_bodies_keep_their_shape() {
    let _: CreateToken = check("create_token");
    let created: TokenCreated = check("token_created");
    assert!(created.token.starts_with("rmenr_"));
    let _: TokenList = check("token_list");
    let agents: AgentList = check("agent_list");
    assert_eq!(agents.agents.len(), 1);
    let _: AuditPage = check("audit_page");
    // Operator input stays strict: a typo is an error, not a silently ignored field.
    let typo = serde_json::json!({"usse": 3});
    assert!(serde_json::from_value::<CreateToken>(typo).is_err());
}
