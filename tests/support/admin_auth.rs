//! The admin-auth matrix, in one place: every admin route × every `Authorization` that is not the admin token must be
//! answered 401 (`{"error":"unauthorized"}`, `WWW-Authenticate: Bearer`) with no side effect.
//!
//! Plain data with no dependencies, so that both layers run the same table: the end-to-end test
//! (`tests/fleet_e2e.rs`, the real binary on a socket) and the in-process router test
//! (`internal/server/tests/api.rs`, which includes this file with `#[path]`).

/// The body the two asset uploads send: `install/x.sh` exists before the matrix runs, `install/new.sh` does not, and
/// after it neither may have changed.
pub const UPLOAD_BODY: &[u8] = b"#!/bin/sh\necho replaced\n";

/// Every admin route: (method, path, body).
pub const ADMIN_ROUTES: &[(&str, &str, &[u8])] = &[
    ("GET", "/api/v1/agents", b""),
    ("GET", "/api/v1/tokens", b""),
    ("POST", "/api/v1/tokens", br#"{"uses":5}"#),
    ("DELETE", "/api/v1/tokens/x", b""),
    ("GET", "/api/v1/audit", b""),
    ("PUT", "/api/v1/assets/install/x.sh", UPLOAD_BODY),
    ("PUT", "/api/v1/assets/install/new.sh", UPLOAD_BODY),
    ("DELETE", "/api/v1/assets/install/x.sh", b""),
    ("GET", "/api/v1/repositories", b""),
    ("POST", "/api/v1/repositories", br#"{"name":"x","url":"/srv/restic","password":"matrix-password"}"#),
    ("GET", "/api/v1/repositories/x", b""),
    ("PATCH", "/api/v1/repositories/x", br#"{"auto_init":true}"#),
    ("POST", "/api/v1/repositories/x/maintenance", br#"{"kind":"prune"}"#),
    ("DELETE", "/api/v1/repositories/x", b""),
    ("GET", "/api/v1/plans", b""),
    ("POST", "/api/v1/plans", br#"{"name":"x","repository":"x","paths":["/srv"],"schedule":"@daily"}"#),
    ("GET", "/api/v1/plans/x", b""),
    ("PATCH", "/api/v1/plans/x", br#"{"tags":["t"]}"#),
    ("POST", "/api/v1/plans/x/run", br#"{"agent":"x"}"#),
    ("DELETE", "/api/v1/plans/x", b""),
    ("GET", "/api/v1/rollouts", b""),
    ("POST", "/api/v1/rollouts", br#"{"start":true}"#),
    ("GET", "/api/v1/rollouts/1", b""),
    ("POST", "/api/v1/rollouts/1/start", b""),
    ("POST", "/api/v1/rollouts/1/resume", br#"{"skip_failed":true}"#),
    ("POST", "/api/v1/rollouts/1/rollback", b""),
    ("PUT", "/api/v1/agents/x/labels", br#"{"labels":{"env":"prod"}}"#),
    ("POST", "/api/v1/agents/x/revoke", b""),
    ("GET", "/api/v1/operations", b""),
    ("GET", "/api/v1/agents/x/snapshots", b""),
    ("GET", "/metrics", b""),
    ("POST", "/api/v1/agents/x/restore", br#"{"snapshot":"0123456789abcdef"}"#),
    ("GET", "/api/v1/agents/x/snapshots/0123456789abcdef/files?path=/", b""),
    ("POST", "/api/v1/operations/op_x/cancel", b""),
    ("GET", "/api/v1/channels", b""),
    ("POST", "/api/v1/channels", br#"{"name":"x","kind":"webhook","url":"http://127.0.0.1:9/"}"#),
    ("DELETE", "/api/v1/channels/x", b""),
    ("POST", "/api/v1/channels/x/test", b""),
    ("GET", "/api/v1/rules", b""),
    ("POST", "/api/v1/rules", br#"{"name":"x","channel":"x"}"#),
    ("DELETE", "/api/v1/rules/x", b""),
    ("GET", "/api/v1/notifications", b""),
];

/// `Authorization` values that are not the admin token (`None`: no header), each with a description: near misses
/// of `admin`, other schemes, and real credentials of the other kinds (an enrollment token, an agent credential).
pub fn bad_credentials(admin: &str, enroll_token: &str, agent_credential: &str) -> Vec<(&'static str, Option<String>)> {
    let bearer = |token: &str| format!("Bearer {token}");
    vec![
        ("no Authorization header", None),
        ("a wrong token", Some(bearer("definitely-not-the-admin-token"))),
        ("the admin token minus its last character", Some(bearer(&admin[..admin.len() - 1]))),
        ("the admin token plus a character", Some(bearer(&format!("{admin}x")))),
        ("the admin token without a scheme", Some(admin.to_string())),
        ("the admin token as Basic", Some(format!("Basic {admin}"))),
        ("an empty Bearer", Some("Bearer ".to_string())),
        ("an enrollment token", Some(bearer(enroll_token))),
        ("an agent credential", Some(bearer(agent_credential))),
    ]
}

/// Every page and partial of the web UI that needs a signed-in session: (method, path, form body). Without a live
/// session each must redirect to the sign-in page (htmx requests: 401 with `HX-Redirect`) and change nothing.
pub const WEB_ROUTES: &[(&str, &str, &[u8])] = &[
    ("GET", "/", b""),
    ("GET", "/ui/fleet/table", b""),
    ("POST", "/ui/logout", b"csrf=x"),
    ("GET", "/ui/hosts/add", b""),
    ("POST", "/ui/hosts/add", b"uses=1&csrf=x"),
    ("GET", "/ui/hosts/add/abc/wait", b""),
    ("GET", "/ui/audit", b""),
    ("GET", "/ui/hosts/x", b""),
    ("GET", "/ui/hosts/x/operations", b""),
    ("POST", "/ui/hosts/x/run", b"plan=x&csrf=x"),
    ("POST", "/ui/hosts/x/revoke", b"confirm=yes&csrf=x"),
    ("GET", "/ui/hosts/x/restore?snapshot=x", b""),
    ("POST", "/ui/hosts/x/restore", b"snapshot=0123456789abcdef&csrf=x"),
    ("GET", "/ui/repositories", b""),
    ("POST", "/ui/repositories", b"name=x&url=%2Fsrv%2Frestic&password=matrix-password&csrf=x"),
    ("GET", "/ui/repositories/x", b""),
    ("POST", "/ui/repositories/x", b"url=%2Fsrv%2Fother&csrf=x"),
    ("POST", "/ui/repositories/x/delete", b"csrf=x"),
    ("GET", "/ui/plans", b""),
    ("POST", "/ui/plans", b"name=x&repository=x&paths=%2Fsrv&schedule=%40daily&csrf=x"),
    ("GET", "/ui/plans/x", b""),
    ("POST", "/ui/plans/x", b"repository=x&paths=%2Fsrv&schedule=%40daily&csrf=x"),
    ("POST", "/ui/plans/x/delete", b"csrf=x"),
    ("GET", "/ui/assets", b""),
    // The uploads take a multipart/form-data body (csrf field, then the file) in a live session; without one the
    // session check refuses first, whatever the body, and nothing is written.
    ("POST", "/ui/assets/install/x.sh", UPLOAD_BODY),
    ("POST", "/ui/assets/install", UPLOAD_BODY),
    ("POST", "/ui/assets/install/x.sh/delete", b"csrf=x"),
];

/// `Cookie` values that are not a live session, each with a description (`None`: no header).
pub fn bad_sessions(admin: &str) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("no Cookie header", None),
        ("an empty session cookie", Some("rm_session=".into())),
        ("a made-up session id", Some("rm_session=rmweb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into())),
        ("the admin token as the session cookie", Some(format!("rm_session={admin}"))),
        ("a session cookie under another name", Some("session=rmweb_x".into())),
    ]
}
