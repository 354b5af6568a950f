//! Agent and install assets as files on disk, with no HTTP in sight.
//!
//! * [`platform`]: the fixed (os, arch) → file name mapping; request text never becomes a path.
//! * [`name`]: the allowlist for install file names.
//! * [`store`]: the two roots (data dir, then bundled dir), contained lookup, and the per-file-version digest cache.

pub mod name;
pub mod platform;
#[cfg(unix)]
pub mod store;

pub use name::{NameError, validate_name};
pub use platform::{Arch, Os, Platform, PlatformError};
#[cfg(unix)]
pub use store::{AssetKind, AssetStore, Digest, Known, OpenAsset, Source};
