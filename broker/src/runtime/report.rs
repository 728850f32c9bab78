//! Builds the dashboard's [`Snapshot`] from the node and the shell's own
//! view of its connections, once per period, off the hot path.

use super::SessionIo;
use crate::core::{Server, SessionId};
use canopy_client::protocol::SlowPolicy;
use canopy_dashboard as dash;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Upper bounds of the delivery latency buckets, in seconds.
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 1.0,
];

/// Views kept in the history.
const VIEWS_MAX: usize = 64;

/// Per-topic `(messages, bytes)` totals.
type TopicTotals = HashMap<String, (u64, u64)>;

/// The previous snapshot's time and totals, for rates.
type Previous = (Duration, dash::Counters, TopicTotals);

/// Relay tiers drawn below the core at most (a bound on the walk).
const TREE_DEPTH_MAX: usize = 8;

/// The whole tree as the ordered membership tells it: the core's servers,
/// the relays attached to each, tier by tier, and each server's count of
/// clients; `None` when there is no core view in the stream (a standalone
/// node, or membership off), and the node shows itself alone.
fn tree(members: &crate::core::cltsvr::members::Members) -> Option<dash::TreeNode> {
    use canopy_client::protocol::{MemberEntry, PublisherId};
    if members.core().is_empty() {
        return None;
    }
    let mut relays: HashMap<PublisherId, Vec<&MemberEntry>> = HashMap::new();
    let mut counts: HashMap<PublisherId, usize> = HashMap::new();
    for e in members.clients() {
        match e.relay {
            true => relays.entry(e.server).or_default().push(e),
            false => *counts.entry(e.server).or_default() += 1,
        }
    }
    fn below(
        id: PublisherId,
        depth: usize,
        relays: &HashMap<PublisherId, Vec<&MemberEntry>>,
        counts: &HashMap<PublisherId, usize>,
    ) -> Vec<dash::TreeNode> {
        if depth >= TREE_DEPTH_MAX {
            return Vec::new();
        }
        let mut v: Vec<dash::TreeNode> = relays
            .get(&id)
            .into_iter()
            .flatten()
            .map(|r| dash::TreeNode {
                name: r.name.clone(),
                role: "relay".into(),
                clients: counts.get(&r.id).copied().unwrap_or(0),
                children: below(r.id, depth + 1, relays, counts),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
    Some(dash::TreeNode {
        name: "core".into(),
        role: "core".into(),
        clients: 0,
        children: members
            .core()
            .iter()
            .map(|s| dash::TreeNode {
                name: s.name.clone(),
                role: "core".into(),
                clients: counts.get(&s.id).copied().unwrap_or(0),
                children: below(s.id, 0, &relays, &counts),
            })
            .collect(),
    })
}

/// Remembers what the previous snapshot needs for rates.
pub struct Reporter {
    role: &'static str,
    listen: String,
    previous: Option<Previous>,
    views: Vec<dash::View>,
    /// Connections refused before the node heard of them.
    refusals: std::sync::Arc<super::Refusals>,
    /// The node's queued bytes in all.
    budget: std::sync::Arc<super::outbound::Budget>,
}

impl Reporter {
    /// A reporter for a node listening for clients on `listen`; a relay's
    /// role reads `relay`, any other server's `core`.
    pub fn new(
        listen: String,
        name: &str,
        grouped: bool,
        relay: bool,
        refusals: std::sync::Arc<super::Refusals>,
        budget: std::sync::Arc<super::outbound::Budget>,
    ) -> Self {
        Reporter {
            refusals,
            budget,
            role: if relay { "relay" } else { "core" },
            listen,
            previous: None,
            // A standalone node is a view of one, installed at start; a
            // core server reports its group's views as they are installed.
            views: if grouped || relay {
                Vec::new()
            } else {
                vec![dash::View {
                    id: 1,
                    members: vec![name.to_owned()],
                    installed_secs: 0.0,
                }]
            },
        }
    }

    /// The snapshot as of `now`.
    pub fn snapshot(
        &mut self,
        now: Duration,
        server: &Server,
        sessions: &HashMap<SessionId, SessionIo>,
        latency: &dash::Histogram,
        call_latency: &BTreeMap<String, dash::Histogram>,
    ) -> dash::Snapshot {
        let node = server.node();
        if let Some(group) = server.group() {
            if let Some(v) = group.view() {
                let id = v.id.epoch;
                if self.views.last().map(|l| l.id) != Some(id) {
                    self.views.push(dash::View {
                        id,
                        members: v.members.iter().map(|m| m.node.to_string()).collect(),
                        installed_secs: now.as_secs_f64(),
                    });
                    if self.views.len() > VIEWS_MAX {
                        self.views.remove(0);
                    }
                }
            }
        }
        let stats = node.stats();
        let head = node.head();
        let (retained, retained_bytes) = node.retained();
        let mut queue_depth_max = 0;
        let mut queued_bytes_max = 0;
        let clients: Vec<dash::ClientInfo> = node
            .sessions()
            .map(|s| {
                let io = sessions.get(&s.id);
                let queue_depth = io.map_or(0, |io| io.queue.frames());
                let queued_bytes = io.map_or(0, |io| io.queue.bytes());
                queue_depth_max = queue_depth_max.max(queue_depth);
                queued_bytes_max = queued_bytes_max.max(queued_bytes);
                dash::ClientInfo {
                    session: s.id.0,
                    name: s.name.to_owned(),
                    peer: io.map_or_else(String::new, |io| io.peer.to_string()),
                    membership: "none".into(),
                    slow_policy: match s.slow {
                        SlowPolicy::Disconnect => "disconnect",
                        SlowPolicy::Conflate => "conflate",
                    }
                    .into(),
                    subscriptions: s.subscriptions,
                    lag: if s.subscriptions == 0 {
                        0
                    } else {
                        head.0.saturating_sub(s.sent_through.0)
                    },
                    queue_depth,
                    queued_bytes,
                    connected_secs: now.saturating_sub(s.opened_at).as_secs_f64(),
                }
            })
            .collect();
        let counters = dash::Counters {
            published: stats.published,
            duplicates: stats.duplicates,
            delivered: stats.delivered,
            bytes_in: stats.bytes_in,
            bytes_out: stats.bytes_out,
            slow_consumers: stats.slow_consumers,
            flow_pauses: stats.flow_pauses,
            gaps: stats.gaps,
            bad_input: stats.bad_input,
            auth_failures: stats.auth_failures,
            denied: stats.denied,
            peer_refused: self.refusals.peer_links.load(Relaxed),
            tls_failed: self.refusals.tls_handshakes.load(Relaxed),
            view_changes: self.views.len().saturating_sub(1) as u64,
            adoptions: stats.adopted,
            diverged: stats.diverged,
            connects: stats.connects,
            retained: retained as u64,
            retained_bytes: retained_bytes as u64,
            queue_depth_max: queue_depth_max as u64,
            queued_bytes_max: queued_bytes_max as u64,
            queued_bytes: self.budget.total() as u64,
        };
        let topic_totals: TopicTotals = node
            .topics()
            .map(|(t, m, b)| (t.to_owned(), (m, b)))
            .collect();
        let (rates, elapsed, before) = match &self.previous {
            Some((at, c, topics)) if now > *at => {
                let secs = (now - *at).as_secs_f64();
                let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                let rates = dash::Rates {
                    msgs_in: per(counters.published, c.published),
                    msgs_out: per(counters.delivered, c.delivered),
                    bytes_in: per(counters.bytes_in, c.bytes_in),
                    bytes_out: per(counters.bytes_out, c.bytes_out),
                };
                (rates, secs, Some(topics))
            }
            _ => (dash::Rates::default(), 0.0, None),
        };
        let mut topics: Vec<dash::TopicInfo> = topic_totals
            .iter()
            .map(|(topic, &(msgs, bytes))| {
                // A topic new since the previous snapshot counted from zero.
                let (m0, b0) =
                    before.map_or((msgs, bytes), |t| t.get(topic).copied().unwrap_or((0, 0)));
                let per = |a: u64, b: u64| {
                    if elapsed > 0.0 {
                        a.saturating_sub(b) as f64 / elapsed
                    } else {
                        0.0
                    }
                };
                dash::TopicInfo {
                    topic: topic.clone(),
                    msgs,
                    bytes,
                    msgs_per_sec: per(msgs, m0),
                    bytes_per_sec: per(bytes, b0),
                }
            })
            .collect();
        topics.sort_by(|a, b| {
            b.msgs_per_sec
                .total_cmp(&a.msgs_per_sec)
                .then(b.msgs.cmp(&a.msgs))
        });
        let events = node
            .journal()
            .map(|e| dash::EventInfo {
                at_secs: e.at.as_secs_f64(),
                kind: e.kind.as_str().into(),
                detail: e.detail.clone(),
            })
            .collect();
        self.previous = Some((now, counters, topic_totals));
        let view = self.views.last().cloned().unwrap_or_default();
        let config = node.config();
        dash::Snapshot {
            status: dash::Status {
                role: self.role.into(),
                name: config.name.clone(),
                stream: format!("{:016x}", config.stream),
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_secs: now.as_secs_f64(),
                listen: self.listen.clone(),
                head_seq: head.0,
                clients: clients.len(),
            },
            tree: tree(node.members()).unwrap_or_else(|| dash::TreeNode {
                name: config.name.clone(),
                role: self.role.into(),
                clients: clients.len(),
                children: Vec::new(),
            }),
            view,
            views: self.views.clone(),
            clients,
            topics,
            events,
            counters,
            rates,
            latency: latency.clone(),
            calls: calls(server, call_latency),
        }
    }
}

/// Replicated RPC per method: what this replica applied and executed (a
/// core server running a service), and the replies sent to this server's
/// clients (any server).
fn calls(server: &Server, latency: &BTreeMap<String, dash::Histogram>) -> Vec<dash::CallInfo> {
    let mut out: BTreeMap<String, dash::CallInfo> = BTreeMap::new();
    let empty = || dash::Histogram::new(&LATENCY_BOUNDS);
    if let Some(rrpc) = server.group().map(|g| g.rrpc()) {
        for (method, mode) in rrpc.methods() {
            let info = out.entry(method.clone()).or_default();
            info.mode = mode.name().into();
        }
        for (method, st) in rrpc.stats() {
            let info = out.entry(method.clone()).or_default();
            info.applied = st.applied;
            info.failed = st.failed;
            info.executed = st.executed;
            info.reassigned = st.reassigned;
        }
    }
    for (method, h) in latency {
        out.entry(method.clone()).or_default().latency = h.clone();
    }
    out.into_iter()
        .map(|(method, mut info)| {
            if info.latency.bounds.is_empty() {
                info.latency = empty();
            }
            dash::CallInfo { method, ..info }
        })
        .collect()
}
