//! The sans-IO protocol core of a Canopy node.
//!
//! Nothing in this module tree names the async runtime, sockets, files, clocks or an
//! unseeded random source: inputs are method calls that carry `now` (a
//! [`Duration`](std::time::Duration) since the node started), outputs are
//! drained with `poll_*` methods. The runtime shell (`crate::runtime`) feeds
//! it in production, and tests drive it directly. A test
//! (`core_stays_sans_io`) fails if a forbidden name appears here.
//!
//! # Glossary
//! - **node**: one Canopy process's client-facing state machine ([`Node`]).
//! - **session**: one client connection to this node, from accept to close.
//! - **client**: the program at the other end of a session.
//! - **publisher**: a client identity that publishes; survives reconnects.
//! - **topic**: what a message is about (`md.NASDAQ.AAPL`).
//! - **pattern**: what a subscription selects (`md.NASDAQ.*`).
//! - **seq**: a message's global sequence number in the one total order.
//! - **pub_seq**: a publisher's own sequence number for its messages.
//! - **stream**: the identity of one ordered sequence of seqs.
//! - **retention**: the buffer of recent messages kept for resume.
//! - **watermark**: "everything matching up to seq N has been sent to you".
//! - **gap**: a range of seqs a client may have missed, always reported.
//! - **server**: one configured member of the core tier (`NodeId`); a run
//!   of it is an **incarnation**, and a server in one incarnation is a
//!   **member**.
//! - **view**: an agreed list of members, named by its epoch and its
//!   **coordinator** (the proposer, which is also the sequencer).
//! - **primary**: in a view that a majority of the configured servers
//!   committed; only a primary server orders and serves clients.
//! - **flush**: the view change's exchange of what members hold, so that
//!   all who move from one view to the next delivered the same messages.
//! - **stable**: held by every member of the view; only stable messages are
//!   delivered and acknowledged.
//! - **snapshot**: the delivered state (position, publisher table, recent
//!   messages) a joining server takes from a peer.

pub mod cltsvr;
pub mod group;
pub mod mbrship;
pub mod retention;
pub mod rrpc;
pub mod stream;
pub mod timers;
pub mod total;

pub use cltsvr::node::{Node, NodeConfig, Output, SessionReport, Stats, Submission, TransmitKind};
pub use cltsvr::server::Server;

use std::fmt;

/// Identifies a session within one node; never reused while the node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl SessionId {
    /// The node itself, as the source of its own membership events; no
    /// connection has this id (connections count from 1).
    pub const NODE: SessionId = SessionId(0);
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    /// The core must not depend on I/O, clocks or ambient randomness
    /// (docs/DESIGN.md, "Sans-IO and the simulators"): this scans its
    /// sources.
    #[test]
    fn core_stays_sans_io() {
        let forbidden = [
            "tokio",
            "std::net",
            "std::fs",
            "Instant::now",
            "SystemTime",
            "thread_rng",
            "std::thread",
        ];
        let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core")];
        let mut checked = 0;
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("core dir readable") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("source readable");
                // This file names the forbidden words in its own test; skip the list itself.
                let text = match text.find("let forbidden") {
                    Some(at) => &text[..at],
                    None => &text[..],
                };
                for word in forbidden {
                    assert!(!text.contains(word), "{} names `{word}`", path.display());
                }
                checked += 1;
            }
        }
        assert!(checked >= 4, "expected the core sources, found {checked}");
    }

    /// The layers depend one way (docs/DESIGN.md, "Layers"): cltsvr on
    /// the group, the group on TOTAL and MBRSHIP, TOTAL on MBRSHIP, and
    /// MBRSHIP on neither (it reaches TOTAL only through its `Above`
    /// trait). This scans each layer's code (comments left out) for the
    /// core modules it names.
    #[test]
    fn layers_depend_one_way() {
        let allowed: &[(&str, &[&str])] = &[
            ("stream", &[]),
            ("timers", &[]),
            ("retention", &["stream"]),
            ("mbrship", &["stream", "timers"]),
            ("total", &["stream", "timers", "mbrship"]),
            ("rrpc", &["stream", "mbrship", "total"]),
            ("group", &["stream", "mbrship", "total", "rrpc"]),
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
        for (layer, may) in allowed {
            let mut files = Vec::new();
            let file = root.join(format!("{layer}.rs"));
            if file.exists() {
                files.push(file);
            }
            let mut dirs = vec![root.join(layer)];
            while let Some(dir) = dirs.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("dir entry").path();
                    match path.is_dir() {
                        true => dirs.push(path),
                        false => files.push(path),
                    }
                }
            }
            assert!(!files.is_empty(), "no sources for layer {layer}");
            for path in files {
                let text = std::fs::read_to_string(&path).expect("source readable");
                for line in text.lines() {
                    let code = line.split("//").next().unwrap_or("");
                    for (at, _) in code.match_indices("core::") {
                        let named: String = code[at + 6..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        // (`core::{a, b}` would hide what it names.)
                        assert!(
                            named == *layer || may.contains(&named.as_str()),
                            "{} ({layer}) depends on core::{named}: {line}",
                            path.display()
                        );
                    }
                    assert!(
                        !code.contains("super::super"),
                        "{} reaches past its layer: {line}",
                        path.display()
                    );
                }
            }
        }
    }
}
