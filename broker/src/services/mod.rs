//! Replicated services that ship with Canopy, runnable by name from a core
//! server's config (`[core] service = "kv"`). A program of your own hands
//! any [`Service`](crate::core::rrpc::Service) to
//! [`runtime::start_with_service`](crate::runtime::start_with_service)
//! instead (docs/DESIGN.md, "Replicated RPC").

pub mod kv;

use crate::core::rrpc::{share, Shared};

/// The names of the built-in services.
pub const NAMES: &[&str] = &["kv"];

/// A fresh replica of the built-in service `name`.
pub fn builtin(name: &str) -> Option<Shared> {
    match name {
        "kv" => Some(share(kv::Kv::default())),
        _ => None,
    }
}
