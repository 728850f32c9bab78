//! The node's settings.

use canopy_client::protocol::{self, PublisherId};
use std::time::Duration;

/// Validated settings of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's name, told to clients in the handshake.
    pub name: String,
    /// The identity of this node's ordered stream (random per start).
    pub stream: u64,
    /// The largest frame content accepted and sent, in bytes.
    pub frame_len_max: usize,
    /// Retention bound: messages.
    pub retention_count_max: usize,
    /// Retention bound: bytes.
    pub retention_bytes_max: usize,
    /// Subscriptions one session may hold.
    pub subscriptions_per_session_max: usize,
    /// Publishers whose deduplication state is remembered.
    pub publishers_max: usize,
    /// Calls from this node's sessions awaiting replies at most; past it
    /// calls are pushed back (`overloaded`).
    pub calls_max: usize,
    /// Publishes ordered per fan-out batch at most.
    pub batch_len_max: usize,
    /// How often sessions are told the current position.
    pub watermark_interval: Duration,
    /// Time a new connection has to send its Hello.
    pub handshake_timeout: Duration,
    /// A session silent this long (no frame, not even a ping) is closed.
    pub idle_timeout: Duration,
    /// Connections held at most.
    pub sessions_max: usize,
    /// The client addresses of this node's tier (itself included), told to
    /// clients in the handshake for their failover; empty for none.
    pub servers: Vec<String>,
    /// Clients the membership state remembers at most; 0 turns ordered
    /// membership off (no attach or detach events, no `full` reports),
    /// which keeps seqs for application messages alone.
    pub members_max: usize,
    /// This node's id in membership reports: the publisher id it attaches
    /// clients under (random per start; for core servers derived from the
    /// server id and incarnation, see [`core_server_id`](super::members::core_server_id)).
    pub id: PublisherId,
    /// Whether clients must prove who they are: the shell checks their
    /// credentials and hands the node each one's permissions
    /// ([`Node::authenticated`](super::Node::authenticated)) before its
    /// `Hello`; a `Hello` without them is refused.
    pub auth: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "canopy".into(),
            stream: 1,
            frame_len_max: protocol::FRAME_LEN_MAX_DEFAULT,
            retention_count_max: 1_000_000,
            retention_bytes_max: 256 << 20,
            subscriptions_per_session_max: 1024,
            publishers_max: 100_000,
            calls_max: 100_000,
            batch_len_max: 1024,
            watermark_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            sessions_max: 100_000,
            servers: Vec::new(),
            members_max: 400_000,
            id: PublisherId(0),
            auth: false,
        }
    }
}
