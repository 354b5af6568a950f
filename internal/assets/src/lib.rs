//! Agent and install assets as files on disk, with no HTTP in sight.
//!
//! * [`name`]: the allowlist for install file names.
//! * [`store`]: the two roots (data dir, then bundled dir), contained lookup, and the per-file-version digest cache.
//! * `watch`: change notification (inotify) that lets the store trust a remembered lookup without a `stat`.
//! * [`write`]: the data dir's write side: staged uploads that replace an override atomically, and removal.

pub mod name;
#[cfg(unix)]
pub mod store;
#[cfg(unix)]
mod watch;
#[cfg(unix)]
pub mod write;

pub use name::{NameError, validate_name};
#[cfg(unix)]
pub use store::{AssetKind, AssetStore, Digest, Known, OpenAsset, Source, UnknownKind};
#[cfg(unix)]
pub use write::{Staged, WriteError};
