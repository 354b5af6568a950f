//! Request handlers, grouped by surface.

pub mod admin;
pub mod agents;
pub mod assets;
pub mod metrics;
pub mod notify;
pub mod operations;
pub mod ops;
pub mod plans;
pub mod repositories;
pub mod restore;
pub mod rollouts;
pub mod upload;

/// An audit record for this request: time, client address, user agent (bounded).
pub(crate) fn audit_event(
    kind: &str,
    peer: Option<std::net::SocketAddr>,
    headers: &http::HeaderMap,
) -> rm_fleet::AuditEvent {
    rm_fleet::AuditEvent {
        at: rm_fleet::now(),
        kind: kind.into(),
        remote_addr: peer.map(|p| p.ip().to_string()),
        user_agent: headers
            .get(http::header::USER_AGENT)
            .map(|v| rm_protocol::validate::clean_text(&String::from_utf8_lossy(v.as_bytes()), 256)),
        ..Default::default()
    }
}
