//! Request handlers, grouped by surface.

pub mod assets;
pub mod ops;
