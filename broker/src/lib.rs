//! `canopy-broker`: the Canopy node (sans-IO core and tokio runtime shell),
//! its configuration, and the command-line tools of the `canopy` binary.
#![warn(missing_docs)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod core;
pub mod launcher;
pub mod maps;
pub mod runtime;
pub mod services;
#[cfg(test)]
pub mod sim;
pub mod tls;
