//! Harness for the end-to-end tests: runs the real `restic-manager-server` binary on a real 127.0.0.1 socket with
//! throw-away data and bundled dirs, and talks to it over HTTP/1.1 on `std::net::TcpStream`.
//!
//! - [`bin`](crate::bin): the workspace binaries, commands stripped of `RM_*`, runs bounded in time.
//! - `server`: [`Server`] / [`ServerBuilder`] (spawn on a free port, wait for `/readyz`, logs, signals, restart).
//! - `http`: the client ([`http_request`], [`Conn`], [`Download`]) and the raw-socket pieces for misbehaving ones.
//! - `fake`: [`FakeHttp`], a server that answers whatever bytes a test wants.
//! - `files`: hashes, reproducible random bytes, atomic file replacement.
//! - `poll`: [`poll`] / [`eventually`], the one bounded polling loop.
//! - `skip`: [`skip`], how a test that cannot run here is recorded as skipped (never under CI).
//! - `tls`: [`TlsProxy`], a TLS-terminating proxy (rcgen certificates) that also answers `/tls/cert.pem`.
//! - `tools`: external tools ([`tool`], [`wine_shim`]).
//! - `backup`: real restic ([`Repo`]), an S3 server on loopback ([`S3Server`]), enrolled agents as processes ([`Agent`]).
//! - `simfleet`: [`SimFleet`], many in-process agents on the real protocol (behaviours, timelines), [`RealAgent`]
//!   processes in temporary prefixes, and the rollout admin API helpers.
//! - `browser`: [`Browser`], headless chromium over WebDriver (fantoccini) for the web page tests.
//! - `notify`: [`WebhookSink`] (an HTTP receiver that keeps bodies and answers queued statuses) and [`SmtpSink`]
//!   (PyPI's aiosmtpd writing a maildir), for the notification tests.
//! - [`admin_auth`]: the admin-auth matrix (also used by `internal/server/tests/api.rs`).

pub mod admin_auth;
mod backup;
mod bin;
mod browser;
mod fake;
mod files;
mod http;
mod notify;
mod poll;
mod server;
mod simfleet;
mod skip;
mod tls;
mod tools;

pub use backup::*;
pub use bin::*;
pub use browser::*;
pub use fake::*;
pub use files::*;
pub use http::*;
pub use notify::*;
pub use poll::*;
pub use server::*;
pub use simfleet::*;
pub use skip::*;
pub use tls::*;
pub use tools::*;
