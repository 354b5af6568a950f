//! Request handlers, grouped by surface.

pub mod admin;
pub mod agents;
pub mod assets;
pub mod ops;
pub mod upload;
