//! What a node tells the dashboard: one [`Snapshot`] at a time.
//!
//! The node's runtime builds a snapshot periodically (off the hot path) and
//! publishes it through a `watch` channel; every HTTP handler reads the
//! latest one. The types serialize as the JSON API documents them.

use serde::Serialize;

/// Everything the dashboard shows, as of `status.uptime_secs`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// Who this node is.
    pub status: Status,
    /// The current view.
    pub view: View,
    /// Views installed so far, oldest first (bounded).
    pub views: Vec<View>,
    /// Connected clients.
    pub clients: Vec<ClientInfo>,
    /// Topics seen, busiest first (bounded).
    pub topics: Vec<TopicInfo>,
    /// This node and what hangs below it.
    pub tree: TreeNode,
    /// Recent events, oldest first (bounded).
    pub events: Vec<EventInfo>,
    /// Counters since start.
    pub counters: Counters,
    /// Rates over the last snapshot period.
    pub rates: Rates,
    /// Time from a batch of publishes reaching the node task to its
    /// deliveries and acknowledgements being queued for the connections.
    pub latency: Histogram,
    /// Replicated RPC, per method.
    pub calls: Vec<CallInfo>,
}

/// Replicated RPC calls of one method, as this server saw them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CallInfo {
    /// The method.
    pub method: String,
    /// Its mode (`active`, `primary-backup`, `load-balanced`, `parallel`),
    /// or empty where the service is not known (a relay; a method the
    /// service does not have).
    pub mode: String,
    /// Calls this replica applied.
    pub applied: u64,
    /// Of them, failed (unknown method or handler error).
    pub failed: u64,
    /// Calls (or parallel shares) executed here.
    pub executed: u64,
    /// Calls (or shares) whose executor changed with a view before their
    /// outcome was ordered.
    pub reassigned: u64,
    /// Replies sent to this server's clients, and the time from each call
    /// reaching this server to its reply leaving it.
    pub latency: Histogram,
}

/// Node identity and state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// `core` (a core server) or `relay`.
    pub role: String,
    /// The node's name.
    pub name: String,
    /// The node's ordered stream id.
    pub stream: String,
    /// The software version.
    pub version: String,
    /// Seconds since the node started.
    pub uptime_secs: f64,
    /// The client listen address.
    pub listen: String,
    /// The last sequence number ordered.
    pub head_seq: u64,
    /// Connected clients.
    pub clients: usize,
}

/// A membership view.
#[derive(Clone, Debug, Default, Serialize)]
pub struct View {
    /// The view id.
    pub id: u64,
    /// Member names.
    pub members: Vec<String>,
    /// When it was installed, seconds since the node started.
    pub installed_secs: f64,
}

/// One connected client.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientInfo {
    /// The session number.
    pub session: u64,
    /// The name the client gave.
    pub name: String,
    /// Its address.
    pub peer: String,
    /// Membership reports it asked for (`none` until the server group lands).
    pub membership: String,
    /// `disconnect` or `conflate`.
    pub slow_policy: String,
    /// Subscriptions held.
    pub subscriptions: usize,
    /// Sequence numbers between the head and the last one queued for it.
    pub lag: u64,
    /// Frames waiting in its outbound queue.
    pub queue_depth: usize,
    /// Bytes waiting in its outbound queue.
    pub queued_bytes: usize,
    /// Seconds since it connected.
    pub connected_secs: f64,
}

/// One topic.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TopicInfo {
    /// The topic (`(other)` sums topics beyond the tracking bound).
    pub topic: String,
    /// Messages published since start.
    pub msgs: u64,
    /// Payload bytes published since start.
    pub bytes: u64,
    /// Messages per second over the last period.
    pub msgs_per_sec: f64,
    /// Bytes per second over the last period.
    pub bytes_per_sec: f64,
}

/// A node of the dissemination tree.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TreeNode {
    /// Its name.
    pub name: String,
    /// `core` or `relay`.
    pub role: String,
    /// Clients it serves directly (relays below not counted).
    pub clients: usize,
    /// Relays below it.
    pub children: Vec<TreeNode>,
}

/// Something that happened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EventInfo {
    /// Seconds since the node started.
    pub at_secs: f64,
    /// `view`, `adoption`, `gap`, `slow_consumer`, `bad_input`, `connect`, `disconnect`.
    pub kind: String,
    /// For people.
    pub detail: String,
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Counters {
    /// Messages ordered.
    pub published: u64,
    /// Publisher retries recognised and not ordered again.
    pub duplicates: u64,
    /// Message deliveries queued for subscribers.
    pub delivered: u64,
    /// Payload bytes received in publishes.
    pub bytes_in: u64,
    /// Frame bytes queued for clients.
    pub bytes_out: u64,
    /// Clients cut off for not keeping up.
    pub slow_consumers: u64,
    /// Times a client out of credit was paused (flow control).
    pub flow_pauses: u64,
    /// Gap notices sent.
    pub gaps: u64,
    /// Connections closed for bad input.
    pub bad_input: u64,
    /// Connections refused for missing or wrong credentials.
    pub auth_failures: u64,
    /// Subscriptions, publishes, calls, roles or reports refused for a
    /// user's permissions.
    pub denied: u64,
    /// Connections to the core's peer port dropped before admission (no
    /// hello, no proof of the core's secret, a failed TLS handshake or a
    /// certificate that is not a core server's).
    pub peer_refused: u64,
    /// TLS handshakes that failed or timed out (an untrusted or missing
    /// certificate, plain bytes on a TLS port).
    pub tls_failed: u64,
    /// Views installed after the first.
    pub view_changes: u64,
    /// Clients that resumed here from another server (adopted orphans).
    pub adoptions: u64,
    /// Weak clients told that what they were sent was not the agreed
    /// stream.
    pub diverged: u64,
    /// Connections accepted.
    pub connects: u64,
    /// Messages held in retention.
    pub retained: u64,
    /// Bytes held in retention.
    pub retained_bytes: u64,
    /// Deepest client outbound queue right now, frames.
    pub queue_depth_max: u64,
    /// Largest client outbound queue right now, bytes.
    pub queued_bytes_max: u64,
    /// Bytes the client queues hold together right now, a frame shared by
    /// several (a fan-out batch) counted once: the node's memory for them.
    pub queued_bytes: u64,
}

/// Per-second rates.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rates {
    /// Messages ordered per second.
    pub msgs_in: f64,
    /// Deliveries queued per second.
    pub msgs_out: f64,
    /// Payload bytes in per second.
    pub bytes_in: f64,
    /// Frame bytes out per second.
    pub bytes_out: f64,
}

/// A cumulative histogram in seconds, as Prometheus exposes it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Histogram {
    /// Upper bounds of the buckets, ascending (the `+Inf` bucket is implied).
    pub bounds: Vec<f64>,
    /// Observations at or below each bound (cumulative), one per bound.
    pub cumulative: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds.
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            cumulative: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, value: f64) {
        for (bound, c) in self.bounds.iter().zip(&mut self.cumulative) {
            if value <= *bound {
                *c += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    /// The smallest bucket bound holding quantile `q` (an upper estimate),
    /// or `None` without observations or beyond the last bound.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let want = (q * self.count as f64).ceil() as u64;
        self.bounds
            .iter()
            .zip(&self.cumulative)
            .find(|(_, c)| **c >= want)
            .map(|(b, _)| *b)
    }
}
