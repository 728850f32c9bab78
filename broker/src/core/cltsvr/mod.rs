//! CLTSVR: one server of any tier, serving clients (and relays) over "the
//! group below" (docs/DESIGN.md, "The layer stack").
//!
//! - [`server`]: the `Server` that stacks a node on what is below it (a
//!   core group, a relay's upstream connection, or nothing);
//! - [`node`]: the client-facing state machine: sessions, the publish
//!   path, catch-up, weak delivery, fan-out;
//! - [`upstream`]: a relay's connection to the tier above, as its group
//!   below;
//! - [`members`]: the tree's membership as the ordered stream tells it;
//! - [`index`]: which sessions want which topics;
//! - [`report`]: the journal and per-topic counts the dashboard shows.
//!
//! Replicated RPC (issue 12) will sit beside this, in `core/rrpc/`, on the
//! same group below.

pub mod index;
pub mod members;
pub mod node;
pub mod report;
pub mod server;
pub mod upstream;
