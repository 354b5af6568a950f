//! The wire protocol: every body that agents and operators exchange with the server, defined once and used by both
//! ends (the server's routes and the agent's client), plus the platform table and the validators both sides apply.
//!
//! Compatibility rule, because a fleet upgrades its server and its agents at different times: nothing an agent sends
//! or receives refuses unknown fields, every field added later is optional on the receiving side, and the bodies of
//! each released protocol version are kept as recorded JSON under `tests/fixtures/` so that a change that an older
//! peer could not read fails a test.
//!
//! * [`platform`]: the supported (os, arch) pairs and their fixed agent file names.
//! * [`validate`]: host names, SHA-256 hex, printable text.
//! * [`agent`]: enrollment and heartbeats.
//! * [`manifest`]: the published agent builds.
//! * [`admin`]: the operator API's bodies.
//! * [`backup`]: plans, repositories as agents receive them, operation reports, leases, snapshots, health.
//! * [`retention`]: plans' retention policies (restic's keep options) and what `forget` removed.
//! * [`restore`]: restore requests, snapshot listings, the agent's task long-poll.
//! * [`maintenance`]: repository prune and check policies, maintenance leases, repository health.
//! * [`schedule`]: cron and `@every` schedules, read the same way by server and agent.
//! * [`error`]: the JSON error body every 4xx/5xx carries.
//! * [`rollout`]: staged agent rollouts (strategies, their progress, the operator's verbs).
//! * [`restic_dist`]: restic builds the server hands out, their sidecar, a host's drift from them.
//! * [`notify`]: notification channels, rules, queued messages and their events.
//! * [`pin`]: public key pins (`sha256//…`) for servers without a publicly trusted certificate.

/// `Display` and `FromStr` for an enum with `as_str` and `ALL`: the JSON spelling both ways, and a parse error that
/// lists every spelling (`unknown <noun> "x"; one of a, b, c`).
macro_rules! spelled_enum {
    ($ty:ident, $noun:literal) => {
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<$ty, String> {
                $ty::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| {
                    format!(concat!("unknown ", $noun, " {:?}; one of {}"), s, $ty::ALL.map($ty::as_str).join(", "))
                })
            }
        }
    };
}

pub mod admin;
pub mod agent;
pub mod backup;
pub mod error;
pub mod maintenance;
pub mod manifest;
pub mod notify;
pub mod pin;
pub mod platform;
pub mod restic_dist;
pub mod restore;
pub mod retention;
pub mod rollout;
pub mod schedule;
pub mod validate;

pub use agent::{EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, HostFacts};
pub use error::ErrorBody;
pub use manifest::{Manifest, PlatformEntry};
pub use platform::{Arch, Os, PLATFORMS, Platform, PlatformError};

/// The protocol version this build speaks. Bodies without a `protocol` field are version 1 (the shapes from before
/// the field existed). A peer that sees a higher number keeps going with the fields it knows.
pub const PROTOCOL_VERSION: u32 = 1;

/// The version assumed for a body that carries no `protocol` field.
pub(crate) fn protocol_v1() -> u32 {
    1
}
