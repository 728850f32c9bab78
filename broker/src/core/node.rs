//! `Node`: the sans-IO state machine of a single Canopy node.
//!
//! It owns the sessions of one node, the one total order (it assigns every
//! accepted publish the next `seq`), publisher deduplication, the retention
//! buffer and fan-out. It leaves sockets, queues and time to the shell.
//!
//! # Driving it
//! The shell calls `handle_open` when it accepts a connection, `handle_frame`
//! for every decoded frame, `handle_bad_input` when a frame could not be
//! decoded, `handle_closed` when a connection ends, `handle_queue_full` when a
//! transmit did not fit the session's outbound queue, and `handle_timeout`
//! once `poll_timeout` has passed. After any input it drains `poll_output`
//! until `None`, executing each output in the order given.
//!
//! # Invariants
//! - Sequence numbers are assigned once, contiguously, in acceptance order,
//!   and each session receives its deliveries in ascending seq order
//!   (docs/DESIGN.md guarantees 1 and 3).
//! - A publish is acknowledged only after it is ordered and retained; a
//!   retry of an acknowledged `(publisher, pub_seq)` is acknowledged again but
//!   never ordered twice (guarantee 2).
//! - Nothing a session receives is silently dropped: a session that cannot
//!   keep up is either closed with `slow_consumer` or, if it chose
//!   conflation, told the exact range it missed with a gap notice.
//! - A resuming session is caught up from retention one frame at a time,
//!   paced by its own queue, and gets live deliveries only once caught up,
//!   so it sees every seq once and in order however far behind it was.
//! - Every queue here is bounded: pending publishes by `batch_len_max`,
//!   retention by count and bytes, subscriptions per session, publishers.
//! - Weak delivery (docs/DESIGN.md guarantee 6): weak sessions are sent what
//!   the group below holds (`handle_held`) before it is stable; strong ones
//!   only what is stable. Every delivery carries the stream's running hash.
//!   A weak session sent something that is taken back (`handle_unheld`)
//!   keeps a claim on what it holds, and a resuming session brings one; a
//!   claim is checked when this node's stream reaches it, and a difference
//!   is reported (`Diverged`) before anything past it is sent, then the
//!   agreed stream is replayed from where the session's stream was agreed.
//!   A weak client may still take the server list (`servers`); only `full`
//!   reports, whose positions are stable ones, are refused it
//!   (docs/DESIGN.md, "Weak delivery").

use super::group::{Msg, Snapshot};
use super::index::Index;
use super::members::{MemberEvent, Members, MEMBERS_TOPIC};
use super::report::{Entry, EventKind, Journal, TopicCounts};
use super::retention::{Ordered, Retention};
use super::SessionId;
use bytes::Bytes;
use canopy_client::protocol::{
    self, kind, DeliverBuilder, DivergedHead, ErrorCode, ErrorFrame, GapHead, Hello, MemberEntry,
    MembersHead, PingHead, PubAck, PubSeq, Publish, PublisherId, Reports, Role, Seq, ServerEntry,
    ServersHead, SlowPolicy, StreamCheck, SubscribeHead, SubscribedHead, WatermarkHead, Welcome,
};
use canopy_client::topic::{is_system, Pattern, Topic};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// How long a catch-up that filled its session's queue waits to retry.
const REPLAY_RETRY: Duration = Duration::from_millis(10);

/// Distinct topic texts kept for sharing at most.
const TOPICS_INTERNED_MAX: usize = 65_536;

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
            batch_len_max: 1024,
            watermark_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            sessions_max: 100_000,
            servers: Vec::new(),
            members_max: 400_000,
            id: PublisherId(0),
        }
    }
}

/// A publish accepted from a session, for the group to order.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The session it came from.
    pub session: SessionId,
    /// The publisher's highest pub_seq this node knew of before it: the
    /// publish skips numbers if it is beyond both this and what the group
    /// holds, plus one.
    pub after: PubSeq,
    /// Whether a relay forwarded it for one of its clients (the session is
    /// the relay's, not the publisher's).
    pub forwarded: bool,
    /// The message.
    pub msg: Msg,
}

/// Deliberate protocol bugs for tests that prove the simulator's checkers
/// catch them. Every flag is off in production; nothing outside tests sets
/// them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bugs {
    /// Order a publisher's retries again instead of deduplicating them.
    pub order_retries: bool,
    /// Let live deliveries overtake a resuming session's catch-up.
    pub overtake_catch_up: bool,
    /// Start the running hash from 0 at a snapshot's head instead of the
    /// snapshot's hash.
    pub forget_snapshot_hash: bool,
}

/// What a transmit carries, which decides what a full queue means for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransmitKind {
    /// Ordered messages `seqs.0..=seqs.1`.
    Deliver,
    /// A gap notice for `seqs.0..=seqs.1`.
    Gap,
    /// A watermark; harmless to drop, the next one supersedes it.
    Watermark,
    /// A catch-up frame (messages or a gap notice) for a resuming session,
    /// covering `seqs.0..=seqs.1`; a full queue only delays it.
    Replay,
    /// Anything else (handshake, acks, subscription answers, pongs).
    Control,
}

/// An action for the shell.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Queue `frame` (length prefix included) on the session's outbound queue
    /// without waiting. If the queue is full, call
    /// [`Node::handle_queue_full`] with this transmit's kind and seqs.
    Transmit {
        /// The receiving session.
        session: SessionId,
        /// The encoded frame.
        frame: Bytes,
        /// What the frame carries.
        kind: TransmitKind,
        /// For deliveries and gaps: the first and last seq covered.
        seqs: (Seq, Seq),
    },
    /// Close the session: send `frame` last if given, after what is already
    /// queued when `drain` is set, or instead of it otherwise.
    Close {
        /// The session.
        session: SessionId,
        /// A final error frame.
        frame: Option<Bytes>,
        /// Whether queued frames go out before the final frame.
        drain: bool,
    },
}

struct Session {
    /// Set by a valid `Hello`; nothing but `Hello` is accepted before.
    hello: Option<SessionHello>,
    patterns: Vec<Pattern>,
    /// A conflating session's missed range, reported before its next delivery.
    gap: Option<(Seq, Seq)>,
    /// The acknowledgement owed after the current batch.
    ack_due: Option<PubAck>,
    /// Closed by the core; the `Close` output is queued.
    closing: bool,
    /// With `closing`: whether what is queued for the session still goes
    /// out before the close (an error close) or not (a slow consumer).
    drain: bool,
    /// When it opened.
    opened_at: Duration,
    /// The last seq queued for it in a delivery (for its lag).
    sent_through: Seq,
    /// While resuming: the last seq it has been sent from retention; live
    /// deliveries wait until this reaches the head.
    catch_up: Option<Seq>,
    /// A catch-up frame did not fit its queue; wait for the retry tick.
    replay_stalled: bool,
    /// When it last sent a frame.
    last_heard: Duration,
    /// In a core group: the last pub_seq of its publisher handed to the
    /// group for ordering (ordered or still in flight).
    submitted: PubSeq,
    /// From a relay, in a group: the same per publisher it forwards for.
    forwarded: HashMap<PublisherId, PubSeq>,
    /// From a relay: publishers refused here, with the first pub_seq
    /// refused. Their later publishes already on the way are dropped (they
    /// would skip) until the publisher's retry starts again at or below it.
    refused: HashMap<PublisherId, PubSeq>,
    /// The highest pub_seq this session published, if it published since
    /// it connected: after its first publish, a client's new pub_seqs
    /// follow on.
    last_pub_seq: Option<PubSeq>,
    /// Weak delivery: it is sent what the group holds, before it is stable.
    weak: bool,
    /// Weak delivery: the last seq queued for it (its stream position as
    /// far as this server knows).
    weak_sent: Seq,
    /// A point of the stream the client holds that this server has not
    /// reached yet: checked when it does. With the position through which
    /// the client's stream is agreed, replayed from on a difference.
    claim: Option<(StreamCheck, Seq)>,
}

struct SessionHello {
    name: String,
    publisher: PublisherId,
    slow: SlowPolicy,
    role: Role,
    reports: Reports,
    /// How the client is listed in the membership.
    entry: MemberEntry,
}

#[derive(Clone, Copy)]
struct PublisherState {
    last_pub_seq: PubSeq,
    last_seq: Seq,
}

/// The single-node state machine. See the module docs for how to drive it.
pub struct Node {
    config: NodeConfig,
    sessions: HashMap<SessionId, Session>,
    /// Subscriptions of strong and of weak sessions.
    indexes: Indexes,
    publishers: HashMap<PublisherId, PublisherState>,
    retention: Retention,
    /// The last assigned seq.
    head: Seq,
    /// Ordered but not yet fanned out; at most `batch_len_max`.
    pending: Vec<Ordered>,
    /// Sessions with `ack_due` set.
    acks_due: Vec<SessionId>,
    /// Sessions awaiting their Hello, with the time it is due by, in order.
    hello_due: VecDeque<(Duration, SessionId)>,
    /// Sessions with a catch-up in progress.
    catching_up: Vec<SessionId>,
    /// When stalled catch-ups are retried.
    replay_retry: Option<Duration>,
    outputs: VecDeque<Output>,
    watermark_next: Duration,
    watermark_sent: Seq,
    fanout: Fanout,
    stats: Stats,
    journal: Journal,
    topics: TopicCounts,
    /// Topic texts shared by every message on the topic.
    topic_names: HashSet<Arc<str>>,
    /// Deliberate protocol bugs, off unless a test proving a checker turns
    /// one on.
    pub(crate) bugs: Bugs,
    /// Test builds: publishers the table forgot, with their last pub_seq
    /// (their old retries may be ordered again: the simulator's checker
    /// excuses those).
    #[cfg(test)]
    pub(crate) forgotten: HashMap<PublisherId, PubSeq>,
    /// Whether the core group orders publishes (they are submitted with
    /// `take_submissions` and come back through `handle_ordered`) rather
    /// than this node alone.
    grouped: bool,
    /// In a group: whether this server is in the primary view. Otherwise
    /// clients are refused and told to move.
    primary: bool,
    /// In a group: publishes waiting to be handed to the group.
    submissions: Vec<Submission>,
    /// In a group: the session of each local publisher, to acknowledge its
    /// publishes when they come back ordered.
    publisher_sessions: HashMap<PublisherId, SessionId>,
    /// Whether the publisher table ever forgot a publisher.
    publishers_evicted: bool,
    /// The time of the latest input, for journal entries.
    now: Duration,
    /// The tree's membership, from the ordered stream.
    members: Members,
    /// The last pub_seq of this node's own membership events.
    own_pub_seq: PubSeq,
    /// Live sessions with `full` reports (told of every change).
    reporting_full: BTreeSet<SessionId>,
    /// Live sessions with `servers` reports.
    reporting_servers: BTreeSet<SessionId>,
    /// Whether this node serves the core tier (its clients' servers are
    /// the core's, so `servers` reports follow core views).
    core_tier: bool,
    /// The running hash of the stream through `head`.
    hash: u64,
    /// Weak delivery: what the group holds after `head`, ordered but not
    /// yet stable, contiguous, with running hashes.
    unstable: VecDeque<Ordered>,
    /// Live weak sessions.
    weak_live: usize,
    /// Stable messages that are new to weak sessions too (in a relay, or
    /// a node that orders alone, nothing is held before it is stable).
    weak_pending: Vec<Ordered>,
    /// Sessions with a `claim` to check.
    checks: Vec<SessionId>,
    /// Weak relays: told the stable position whenever it moves (their
    /// strong clients wait on it).
    stable_marks: BTreeSet<SessionId>,
    /// The stable position last marked.
    marked: Seq,
}

/// Counters for logs, benchmarks and the dashboard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Publishes ordered.
    pub published: u64,
    /// Publishes recognised as retries and not ordered again.
    pub duplicates: u64,
    /// Delivery frames handed to the shell.
    pub deliver_frames: u64,
    /// Sessions cut off as slow consumers.
    pub slow_consumers: u64,
    /// Gap notices sent.
    pub gaps: u64,
    /// Sessions closed for bad input.
    pub bad_input: u64,
    /// Message deliveries queued for sessions.
    pub delivered: u64,
    /// Payload bytes received in publishes.
    pub bytes_in: u64,
    /// Frame bytes handed to the shell.
    pub bytes_out: u64,
    /// Connections opened.
    pub connects: u64,
    /// Sessions told that what they were sent was not the agreed stream.
    pub diverged: u64,
    /// Clients that resumed here coming from another server (adopted:
    /// the membership listed them elsewhere, or no longer).
    pub adopted: u64,
}

/// What the node knows of one session, for operators.
#[derive(Clone, Debug)]
pub struct SessionReport<'a> {
    /// The session.
    pub id: SessionId,
    /// The name from its Hello (empty before).
    pub name: &'a str,
    /// Its slow-consumer policy.
    pub slow: SlowPolicy,
    /// Subscriptions held.
    pub subscriptions: usize,
    /// The last seq queued for it in a delivery.
    pub sent_through: Seq,
    /// When it opened.
    pub opened_at: Duration,
}

impl Node {
    /// A node with nothing ordered yet; `now` is its start time.
    pub fn new(now: Duration, config: NodeConfig) -> Self {
        Node {
            indexes: Indexes {
                strong: Index::new(4096),
                weak: Index::new(4096),
            },
            retention: Retention::new(config.retention_count_max, config.retention_bytes_max),
            sessions: HashMap::new(),
            publishers: HashMap::new(),
            head: Seq(0),
            pending: Vec::new(),
            acks_due: Vec::new(),
            hello_due: VecDeque::new(),
            catching_up: Vec::new(),
            replay_retry: None,
            outputs: VecDeque::new(),
            watermark_next: now + config.watermark_interval,
            watermark_sent: Seq(0),
            fanout: Fanout::default(),
            stats: Stats::default(),
            journal: Journal::default(),
            topics: TopicCounts::default(),
            topic_names: HashSet::new(),
            bugs: Bugs::default(),
            #[cfg(test)]
            forgotten: HashMap::new(),
            grouped: false,
            primary: true,
            submissions: Vec::new(),
            publisher_sessions: HashMap::new(),
            publishers_evicted: false,
            now,
            members: Members::new(config.members_max),
            own_pub_seq: PubSeq(0),
            reporting_full: BTreeSet::new(),
            reporting_servers: BTreeSet::new(),
            core_tier: false,
            hash: 0,
            unstable: VecDeque::new(),
            weak_live: 0,
            weak_pending: Vec::new(),
            checks: Vec::new(),
            stable_marks: BTreeSet::new(),
            marked: Seq(0),
            config,
        }
    }

    /// Marks this node as a core server's (see `core_tier`).
    pub fn set_core_tier(&mut self) {
        self.core_tier = true;
    }

    /// The tree's membership as this node has delivered it.
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// A node whose publishes are ordered by a core group. It refuses
    /// clients until [`Node::set_primary`] says it is in a primary view.
    pub fn new_grouped(now: Duration, config: NodeConfig) -> Self {
        let mut node = Node::new(now, config);
        node.grouped = true;
        node.primary = false;
        node
    }

    /// The last assigned sequence number.
    pub fn head(&self) -> Seq {
        self.head
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The node's settings.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// What the node knows of each open session.
    pub fn sessions(&self) -> impl Iterator<Item = SessionReport<'_>> {
        self.sessions.iter().map(|(&id, s)| SessionReport {
            id,
            name: s.hello.as_ref().map_or("", |h| h.name.as_str()),
            slow: s.hello.as_ref().map_or(SlowPolicy::Disconnect, |h| h.slow),
            subscriptions: s.patterns.len(),
            sent_through: s.sent_through,
            opened_at: s.opened_at,
        })
    }

    /// Messages and bytes published per topic.
    pub fn topics(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.topics.iter()
    }

    /// Recent notable events, oldest first.
    pub fn journal(&self) -> impl Iterator<Item = &Entry> {
        self.journal.entries()
    }

    /// Messages and bytes held in retention.
    pub fn retained(&self) -> (usize, usize) {
        (self.retention.len(), self.retention.bytes())
    }

    /// A connection was accepted. Call before any other input for `session`.
    pub fn handle_open(&mut self, now: Duration, session: SessionId) {
        self.sessions.insert(
            session,
            Session {
                hello: None,
                patterns: Vec::new(),
                gap: None,
                ack_due: None,
                closing: false,
                drain: false,
                opened_at: now,
                sent_through: Seq(0),
                catch_up: None,
                replay_stalled: false,
                last_heard: now,
                submitted: PubSeq(0),
                forwarded: HashMap::new(),
                refused: HashMap::new(),
                last_pub_seq: None,
                weak: false,
                weak_sent: Seq(0),
                claim: None,
            },
        );
        self.now = now;
        self.stats.connects += 1;
        self.journal
            .record(now, EventKind::Connect, format!("session {session}"));
        if self.sessions.len() > self.config.sessions_max {
            let msg = format!(
                "this server holds its maximum of {} connections",
                self.config.sessions_max
            );
            return self.close_with_error(session, ErrorCode::TooManyConnections, msg);
        }
        self.hello_due
            .push_back((now + self.config.handshake_timeout, session));
    }

    /// A connection ended (by the peer or by the shell after a `Close`).
    pub fn handle_closed(&mut self, now: Duration, session: SessionId) {
        self.now = now;
        if let Some(s) = self.sessions.remove(&session) {
            self.journal
                .record(now, EventKind::Disconnect, format!("session {session}"));
            for p in &s.patterns {
                self.indexes.of(s.weak).remove(p, session);
            }
            self.session_gone(session, s);
        }
    }

    /// Bytes from `session` could not be decoded into a frame. The session is
    /// closed with an error frame carrying `code` and `message`.
    pub fn handle_bad_input(
        &mut self,
        now: Duration,
        session: SessionId,
        code: ErrorCode,
        message: String,
    ) {
        self.now = now;
        self.close_with_error(session, code, message);
    }

    /// A transmit of kind `kind` covering `seqs` did not fit `session`'s
    /// outbound queue. Call at once, before the next `poll_output`.
    pub fn handle_queue_full(
        &mut self,
        now: Duration,
        session: SessionId,
        kind: TransmitKind,
        seqs: (Seq, Seq),
    ) {
        self.now = now;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.closing {
            return;
        }
        if kind == TransmitKind::Replay {
            s.catch_up = Some(Seq(seqs.0 .0.saturating_sub(1)));
            s.replay_stalled = true;
            self.replay_retry.get_or_insert(now + REPLAY_RETRY);
            return;
        }
        let conflate = s
            .hello
            .as_ref()
            .is_some_and(|h| h.slow == SlowPolicy::Conflate);
        match kind {
            TransmitKind::Watermark => {}
            TransmitKind::Deliver | TransmitKind::Gap if conflate => {
                s.gap = Some(match s.gap {
                    Some((from, to)) => (from.min(seqs.0), to.max(seqs.1)),
                    None => seqs,
                });
            }
            _ => {
                self.stats.slow_consumers += 1;
                let detail = format!("session {session} cut off: outbound queue full");
                self.journal
                    .record(self.now, EventKind::SlowConsumer, detail);
                let frame = error_frame(
                    ErrorCode::SlowConsumer,
                    "outbound queue full: the client did not keep up",
                );
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.closing = true;
                    for p in std::mem::take(&mut s.patterns) {
                        self.indexes.of(s.weak).remove(&p, session);
                    }
                }
                // Ahead of everything queued: what is queued for this session
                // can no longer be delivered in order anyway.
                self.outputs.push_front(Output::Close {
                    session,
                    frame: Some(frame),
                    drain: false,
                });
            }
        }
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let hello = self.hello_due.front().map(|(t, _)| *t);
        let next = hello.map_or(self.watermark_next, |h| h.min(self.watermark_next));
        Some(self.replay_retry.map_or(next, |r| r.min(next)))
    }

    /// Time has reached `now`: closes sessions that never said Hello and
    /// sends watermarks when they are due.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.now = now;
        if self.replay_retry.is_some_and(|r| r <= now) {
            self.replay_retry = None;
            for id in &self.catching_up {
                if let Some(s) = self.sessions.get_mut(id) {
                    s.replay_stalled = false;
                }
            }
        }
        while let Some(&(due, session)) = self.hello_due.front() {
            if due > now {
                break;
            }
            self.hello_due.pop_front();
            if self
                .sessions
                .get(&session)
                .is_some_and(|s| s.hello.is_none())
            {
                let msg = format!("no Hello within {:?}", self.config.handshake_timeout);
                self.close_with_error(session, ErrorCode::HandshakeTimeout, msg);
            }
        }
        if now < self.watermark_next {
            return;
        }
        self.watermark_next = now + self.config.watermark_interval;
        self.fan_out();
        // Sessions in id order: outputs never depend on hash iteration.
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        // Half-open connections (a peer that vanished without a FIN) are
        // found here: clients ping well within the idle timeout.
        let idle: Vec<SessionId> = ids
            .iter()
            .copied()
            .filter(|id| {
                self.sessions.get(id).is_some_and(|s| {
                    s.hello.is_some()
                        && !s.closing
                        && now.saturating_sub(s.last_heard) > self.config.idle_timeout
                })
            })
            .collect();
        for session in idle {
            let msg = format!("nothing heard for {:?}", self.config.idle_timeout);
            self.close_with_error(session, ErrorCode::IdleTimeout, msg);
        }
        // A conflating session that fell behind while the stream went quiet
        // hears of its gap now rather than at the next delivery.
        for &session in &ids {
            let Some(s) = self.sessions.get_mut(&session) else {
                continue;
            };
            if let Some((from, to)) = s.gap.take() {
                self.outputs.push_back(Output::Transmit {
                    session,
                    frame: protocol::encode(kind::GAP, &GapHead { from, to }, &[]),
                    kind: TransmitKind::Gap,
                    seqs: (from, to),
                });
            }
        }
        if self.head == self.watermark_sent {
            return;
        }
        self.watermark_sent = self.head;
        let frame = protocol::encode(kind::WATERMARK, &WatermarkHead { seq: self.head }, &[]);
        for &session in &ids {
            let Some(s) = self.sessions.get(&session) else {
                continue;
            };
            if s.hello.is_some() && !s.closing {
                self.outputs.push_back(Output::Transmit {
                    session,
                    frame: frame.clone(),
                    kind: TransmitKind::Watermark,
                    seqs: (self.head, self.head),
                });
            }
        }
    }

    /// The next action for the shell, or `None` when there is nothing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.next_output()?;
        if let Output::Transmit {
            session,
            frame,
            kind,
            seqs,
        } = &out
        {
            self.stats.bytes_out += frame.len() as u64;
            match kind {
                // Deliveries record `sent_through` in `next_output`, where
                // the session is at hand already.
                TransmitKind::Deliver => {}
                TransmitKind::Gap => {
                    self.stats.gaps += 1;
                    let detail = format!("session {session} told of a gap {}..={}", seqs.0, seqs.1);
                    self.journal.record(self.now, EventKind::Gap, detail);
                }
                TransmitKind::Replay => {
                    if let Some(s) = self.sessions.get_mut(session) {
                        s.sent_through = seqs.1;
                    }
                }
                TransmitKind::Watermark | TransmitKind::Control => {}
            }
        }
        Some(out)
    }

    fn next_output(&mut self) -> Option<Output> {
        loop {
            if self.outputs.is_empty() {
                self.fan_out();
            }
            if self.outputs.is_empty() {
                // Catch-up frames only when nothing else waits, one at a
                // time, so a full queue is known before the next is built.
                let out = self.next_catch_up();
                if out.is_some() || self.outputs.is_empty() {
                    return out;
                }
                // A session went live: what that queued (its first report,
                // a stable mark) goes out now, not with the next input.
                continue;
            }
            let out = self.outputs.pop_front()?;
            match out {
                Output::Transmit {
                    session,
                    kind: TransmitKind::Deliver,
                    seqs,
                    ..
                } => {
                    let Some(s) = self.sessions.get_mut(&session) else {
                        continue;
                    };
                    if s.closing {
                        if s.drain {
                            return Some(out);
                        }
                        continue;
                    }
                    if s.catch_up.is_some() && !self.bugs.overtake_catch_up {
                        // Held back: the catch-up sends it from retention.
                        continue;
                    }
                    if s.claim.is_some() {
                        // At or below the unchecked claim (nothing past it
                        // is sent before the check), so the client has these
                        // seqs; and a frame's stable mark must not vouch for
                        // what is not checked yet.
                        continue;
                    }
                    s.sent_through = seqs.1;
                    if let Some((from, _)) = s.gap.take() {
                        // A conflating session missed something: this batch
                        // joins the gap, and the notice goes in its place so
                        // that the client hears of the gap before any later seq.
                        let gap = GapHead { from, to: seqs.1 };
                        return Some(Output::Transmit {
                            session,
                            frame: protocol::encode(kind::GAP, &gap, &[]),
                            kind: TransmitKind::Gap,
                            seqs: (from, seqs.1),
                        });
                    }
                    return Some(out);
                }
                Output::Transmit { session, kind, .. } => {
                    // A watermark must not overtake a gap the session has
                    // not been told of yet: it would claim the gap was sent.
                    let pass = self.sessions.get(&session).is_some_and(|s| {
                        // Nor may it claim what a catch-up has yet to send,
                        // or vouch for a stream not checked yet.
                        let gap_first = kind == TransmitKind::Watermark
                            && (s.gap.is_some() || s.catch_up.is_some() || s.claim.is_some());
                        if s.closing {
                            s.drain
                        } else {
                            !gap_first
                        }
                    });
                    if pass {
                        return Some(out);
                    }
                }
                Output::Close { session, .. } => {
                    if let Some(s) = self.sessions.remove(&session) {
                        self.session_gone(session, s);
                    }
                    return Some(out);
                }
            }
        }
    }

    /// A decoded frame arrived from `session`.
    pub fn handle_frame(
        &mut self,
        now: Duration,
        session: SessionId,
        frame: protocol::ClientFrame,
    ) {
        use protocol::ClientFrame as F;
        self.now = now;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.last_heard = now;
        let s = &*s;
        if s.closing {
            return;
        }
        match (frame, s.hello.is_some()) {
            (F::Hello(hello), false) => self.on_hello(session, hello),
            (F::Hello(_), true) => self.close_with_error(
                session,
                ErrorCode::DuplicateHello,
                "Hello sent twice".into(),
            ),
            (other, false) => self.close_with_error(
                session,
                ErrorCode::HandshakeRequired,
                format!("{} before Hello: send Hello first", frame_name(&other)),
            ),
            (F::Subscribe(SubscribeHead { pattern }), true) => self.on_subscribe(session, &pattern),
            (F::Unsubscribe(SubscribeHead { pattern }), true) => {
                self.on_unsubscribe(session, &pattern)
            }
            (F::Publish(p), true) => self.on_publish(session, p),
            (F::Ping(p), true) => self.control(session, kind::PONG, &p),
            (F::Pong(PingHead { .. }), true) => {}
        }
    }

    fn on_hello(&mut self, session: SessionId, hello: Hello) {
        if !self.primary {
            let msg = "this server is not serving: it is not in the primary component of the core, or has no stream from the tier above yet".to_owned();
            return self.close_with_error(session, ErrorCode::NotPrimary, msg);
        }
        if hello.version != protocol::PROTOCOL_VERSION {
            let msg = format!(
                "client speaks protocol version {}, this server speaks {}",
                hello.version,
                protocol::PROTOCOL_VERSION
            );
            return self.close_with_error(session, ErrorCode::UnsupportedVersion, msg);
        }
        if hello.weak && hello.reports == Reports::Full && hello.role != Role::Relay {
            let msg = "weak delivery cannot be combined with full membership reports (their positions are stable ones)".to_owned();
            return self.close_with_error(session, ErrorCode::WeakNotAllowed, msg);
        }
        if let Some(r) = hello
            .resume
            .filter(|r| r.check.is_some_and(|c| c.seq > r.after))
        {
            // A client checks what it delivered, which is never past where
            // it stands.
            let msg = format!(
                "resume check at seq {} is past the resume position {}",
                r.check.map_or(0, |c| c.seq.0),
                r.after
            );
            return self.close_with_error(session, ErrorCode::Malformed, msg);
        }
        if hello.subscriptions.len() > self.config.subscriptions_per_session_max {
            let msg = format!(
                "{} subscriptions, at most {} per connection",
                hello.subscriptions.len(),
                self.config.subscriptions_per_session_max
            );
            return self.close_with_error(session, ErrorCode::TooManySubscriptions, msg);
        }
        let mut patterns = Vec::with_capacity(hello.subscriptions.len());
        for text in &hello.subscriptions {
            match Pattern::new(text) {
                Ok(p) if !patterns.contains(&p) => patterns.push(p),
                Ok(_) => {}
                Err(e) => {
                    return self.close_with_error(session, ErrorCode::InvalidPattern, e.to_string())
                }
            }
        }
        // Order what is pending first, so the replay below and the live
        // stream after it meet exactly at `head`.
        self.fan_out();
        for p in &patterns {
            self.indexes.of(hello.weak).insert(p, session);
        }
        // Everyone starts at the stable head (the agreed stream); a weak
        // client is then caught up through what is held.
        let head = self.head;
        let pub_acked = self
            .publishers
            .get(&hello.publisher)
            .map_or(PubSeq(0), |p| p.last_pub_seq);
        let welcome = Welcome {
            version: protocol::PROTOCOL_VERSION,
            server: self.config.name.clone(),
            session: session.0,
            stream: self.config.stream,
            head,
            pub_acked,
            frame_len_max: u32::try_from(self.config.frame_len_max).unwrap_or(u32::MAX),
            servers: self.config.servers.clone(),
            hash: self.hash,
        };
        self.control(session, kind::WELCOME, &welcome);
        let resume = hello.resume.filter(|r| r.stream == self.config.stream);
        let resume_after = resume.map(|r| r.after);
        let listed_here = self
            .members
            .client(hello.publisher)
            .is_some_and(|e| e.server == self.config.id);
        if resume.is_some() && !listed_here {
            self.stats.adopted += 1;
        }
        let weak_head = self.weak_head();
        // How far this server's stream counts for the client's check: a
        // strong client's stream is stable, so only this server's stable
        // part can tell it apart (an unstable part that differs is this
        // server's to take back, not the client's).
        let horizon = if hello.weak { weak_head } else { self.head };
        // The client's stream must be this server's up to where it stands.
        let (mut claim, mut diverged) = (None, None);
        if let Some((check, r)) = resume.and_then(|r| Some((r.check?, r))) {
            let agreed = r
                .agreed
                .unwrap_or(r.after)
                .min(Seq(check.seq.0.saturating_sub(1)));
            let known = match check.seq <= horizon {
                true => self.hash_at(check.seq),
                false => None,
            };
            match known {
                Some(hash) if hash == check.hash => {}
                Some(_) => diverged = Some((agreed, check.seq)),
                // Not reached yet: checked when it is.
                None if check.seq > horizon => claim = Some((check, agreed)),
                // Older than retention, with an unchecked part (weak): it
                // cannot be ruled out; the replay reports what is missing.
                None if r.agreed.is_some_and(|a| a < check.seq) => {
                    diverged = Some((agreed, check.seq))
                }
                // Older than retention and stable all through: under one
                // stream id a stable seq means one thing for good (the core
                // never restarts a stream under its id; see the group's
                // "Restart safety"), so there is nothing left to check.
                None => {}
            }
        }
        if claim.is_some() {
            self.checks.push(session);
        }
        if hello.weak {
            self.weak_live += 1;
            if hello.role == Role::Relay {
                self.stable_marks.insert(session);
            }
        }
        if self.grouped {
            self.publisher_sessions.insert(hello.publisher, session);
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            s.submitted = pub_acked;
            s.patterns = patterns;
            s.sent_through = head;
            s.weak = hello.weak;
            // Where the client stands, as far as this server holds.
            s.weak_sent = resume_after.map_or(head, |a| a.min(weak_head).max(head));
            s.claim = claim;
            s.hello = Some(SessionHello {
                entry: MemberEntry {
                    id: hello.publisher,
                    name: member_name(&hello.name),
                    server: self.config.id,
                    relay: hello.role == Role::Relay,
                    session: session.0,
                    connection: hello.connection,
                },
                name: hello.name,
                publisher: hello.publisher,
                slow: hello.slow,
                role: hello.role,
                reports: hello.reports,
            });
        }
        if let Some((agreed, seen)) = diverged {
            self.diverge(session, agreed, seen);
        } else if let Some(after) = resume_after
            .or(hello.weak.then_some(head))
            .filter(|a| *a < if hello.weak { weak_head } else { head })
        {
            if let Some(s) = self.sessions.get_mut(&session) {
                s.catch_up = Some(after);
                self.catching_up.push(session);
            }
        } else {
            self.start_reports(session);
        }
        if let Some(entry) = self
            .sessions
            .get(&session)
            .and_then(|s| s.hello.as_ref())
            .map(|h| h.entry.clone())
        {
            self.publish_member_event(MemberEvent::Attach(entry));
        }
    }

    /// The next catch-up frame for a resuming session, if any is due.
    ///
    /// A resuming session is fed from retention one frame at a time, only
    /// when nothing else is queued, while its live deliveries are held back
    /// (they are in retention too). A frame that does not fit the session's
    /// queue moves its cursor back and stalls it until the next retry tick,
    /// so a client far behind is paced by its own queue instead of being
    /// cut off as slow on every reconnect. When the cursor reaches the head,
    /// the session goes live.
    fn next_catch_up(&mut self) -> Option<Output> {
        let limits = FrameLimits::new(self.config.frame_len_max);
        let weak_head = self.weak_head();
        let mut i = 0;
        while i < self.catching_up.len() {
            let session = self.catching_up[i];
            let Some(s) = self.sessions.get_mut(&session) else {
                self.catching_up.swap_remove(i);
                continue;
            };
            let Some(after) = s.catch_up.filter(|_| !s.closing) else {
                self.catching_up.swap_remove(i);
                continue;
            };
            if s.replay_stalled || s.claim.is_some() {
                // (A catch-up past a claim waits for its check.)
                i += 1;
                continue;
            }
            // A weak session is caught up through what is held, too.
            let (limit, held) = match s.weak {
                true => (weak_head, self.unstable.len()),
                false => (self.head, 0),
            };
            if after >= limit {
                s.catch_up = None;
                self.catching_up.swap_remove(i);
                if self.stable_marks.contains(&session) {
                    // Marks are not sent during a catch-up: one now.
                    let mark =
                        protocol::encode(kind::WATERMARK, &WatermarkHead { seq: self.head }, &[]);
                    self.outputs
                        .push_back(stable_mark(session, mark, self.head));
                }
                self.start_reports(session);
                continue;
            }
            let first_held = self.retention.first().unwrap_or(self.head.next());
            if after.next() < first_held {
                // Retention no longer holds where the client stopped: say so.
                let gap = GapHead {
                    from: after.next(),
                    to: Seq(first_held.0 - 1),
                };
                s.catch_up = Some(gap.to);
                self.stats.gaps += 1;
                let detail = format!(
                    "session {session} resumes past retention: gap {}..={}",
                    gap.from, gap.to
                );
                self.journal.record(self.now, EventKind::Gap, detail);
                return Some(Output::Transmit {
                    session,
                    frame: protocol::encode(kind::GAP, &gap, &[]),
                    kind: TransmitKind::Replay,
                    seqs: (gap.from, gap.to),
                });
            }
            let mut first = None;
            let mut last = (after, 0);
            let mut through = limit;
            let stream = self
                .retention
                .after(after)
                .chain(self.unstable.iter().take(held));
            for m in stream.filter(|m| m.seq > after) {
                if !s.patterns.iter().any(|p| p.matches(&m.topic)) {
                    continue;
                }
                if limits.full(&self.fanout.builder, m) {
                    through = Seq(m.seq.0 - 1);
                    break;
                }
                first.get_or_insert(m.seq);
                last = (m.seq, m.hash);
                self.fanout
                    .builder
                    .push(m.seq, m.publisher, m.pub_seq, &m.topic, &m.payload);
            }
            s.catch_up = Some(through);
            if let Some(first) = first {
                if s.weak {
                    s.weak_sent = last.0;
                }
                let stable = s.weak.then_some(self.head);
                return Some(Output::Transmit {
                    session,
                    frame: self.fanout.builder.finish_with(Some(last.1), stable),
                    kind: TransmitKind::Replay,
                    seqs: (first, through),
                });
            }
            // Nothing matched up to the head: the session is live.
        }
        None
    }

    /// How far `session` has been sent everything it matches: the head,
    /// or a catch-up's cursor (a client advances its position to this).
    fn sent_head(&self, session: SessionId) -> Seq {
        match self.sessions.get(&session) {
            Some(Session {
                catch_up: Some(at), ..
            }) => *at,
            Some(s) if s.weak => self.weak_head(),
            _ => self.head,
        }
    }

    fn on_subscribe(&mut self, session: SessionId, text: &str) {
        let pattern = match Pattern::new(text) {
            Ok(p) => p,
            Err(e) => {
                return self.close_with_error(session, ErrorCode::InvalidPattern, e.to_string())
            }
        };
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if !s.patterns.contains(&pattern) {
            if s.patterns.len() >= self.config.subscriptions_per_session_max {
                let msg = format!(
                    "at most {} subscriptions per connection",
                    self.config.subscriptions_per_session_max
                );
                return self.close_with_error(session, ErrorCode::TooManySubscriptions, msg);
            }
            // Fan out what is pending under the old subscriptions, so that the
            // new one starts exactly after `head` as the answer says.
            self.fan_out();
            if let Some(s) = self.sessions.get_mut(&session) {
                self.indexes.of(s.weak).insert(&pattern, session);
                s.patterns.push(pattern);
            }
        }
        let answer = self.subscription_answer(session, text);
        self.control(session, kind::SUBSCRIBED, &answer);
    }

    fn on_unsubscribe(&mut self, session: SessionId, text: &str) {
        let pattern = match Pattern::new(text) {
            Ok(p) => p,
            Err(e) => {
                return self.close_with_error(session, ErrorCode::InvalidPattern, e.to_string())
            }
        };
        self.fan_out();
        if let Some(s) = self.sessions.get_mut(&session) {
            if let Some(i) = s.patterns.iter().position(|p| *p == pattern) {
                s.patterns.swap_remove(i);
                self.indexes.of(s.weak).remove(&pattern, session);
            }
        }
        let answer = self.subscription_answer(session, text);
        self.control(session, kind::UNSUBSCRIBED, &answer);
    }

    /// The answer to a subscription change: the client's position moves to
    /// what it has been sent everything of, with the hash there.
    fn subscription_answer(&mut self, session: SessionId, pattern: &str) -> SubscribedHead {
        let head = self.sent_head(session);
        if let Some(s) = self.sessions.get_mut(&session).filter(|s| s.weak) {
            s.weak_sent = s.weak_sent.max(head);
        }
        SubscribedHead {
            pattern: pattern.to_owned(),
            head,
            hash: self.hash_at(head),
        }
    }

    fn on_publish(&mut self, session: SessionId, publish: Publish) {
        if let Err(e) = Topic::validate(publish.topic()) {
            return self.close_with_error(session, ErrorCode::InvalidTopic, e.to_string());
        }
        let relay = self
            .sessions
            .get(&session)
            .and_then(|s| s.hello.as_ref())
            .is_some_and(|h| h.role == Role::Relay);
        // Relays carry their clients' membership events.
        if is_system(publish.topic()) && !relay {
            let msg = format!(
                "`{}`: topics starting with `$` are the broker's own",
                publish.topic()
            );
            return self.close_with_error(session, ErrorCode::InvalidTopic, msg);
        }
        let Publish {
            pub_seq, payload, ..
        } = &publish;
        let (pub_seq, payload) = (*pub_seq, payload.clone());
        let Some(hello) = self.sessions.get(&session).and_then(|s| s.hello.as_ref()) else {
            return;
        };
        let publisher = match publish.publisher {
            None => hello.publisher,
            Some(p) if hello.role == Role::Relay => p,
            Some(p) => {
                let msg = format!(
                    "a publish for publisher {p}: only a relay may publish for another publisher"
                );
                return self.close_with_error(session, ErrorCode::ForwardNotAllowed, msg);
            }
        };
        let forwarded = publisher != hello.publisher;
        if forwarded {
            let Some(s) = self.sessions.get_mut(&session) else {
                return;
            };
            match s.refused.get(&publisher) {
                Some(&first) if pub_seq > first => return,
                Some(_) => {
                    s.refused.remove(&publisher);
                }
                None => {}
            }
        }
        let state = self.publishers.get(&publisher).copied();
        if self.grouped {
            return self.submit(session, publisher, forwarded, state, publish);
        }
        let ack = match state {
            Some(p) if pub_seq <= p.last_pub_seq && !self.bugs.order_retries => {
                // A retry of something already ordered: acknowledge, do not
                // order again (guarantee 2).
                self.stats.duplicates += 1;
                let ack = PubAck {
                    pub_seq: p.last_pub_seq,
                    seq: p.last_seq,
                    publisher: None,
                };
                if forwarded {
                    return self.ack_forwarded(session, publisher, ack);
                }
                ack
            }
            Some(p) if pub_seq.0 > p.last_pub_seq.0.saturating_add(1) => {
                let msg = format!(
                    "publisher {publisher} sent pub_seq {} after {}: publisher sequence numbers must not skip",
                    pub_seq.0, p.last_pub_seq.0
                );
                if forwarded {
                    // Only that publisher is refused; the relay stays.
                    return self.refuse_forwarded(
                        session,
                        publisher,
                        pub_seq,
                        ErrorCode::PubSeqGap,
                        msg,
                    );
                }
                return self.close_with_error(session, ErrorCode::PubSeqGap, msg);
            }
            _ => {
                self.head = self.head.next();
                self.stats.published += 1;
                self.stats.bytes_in += payload.len() as u64;
                self.remember_publisher(publisher, pub_seq, self.head);
                let topic = self.intern(publish.topic());
                self.push_ordered(Ordered {
                    seq: self.head,
                    topic,
                    publisher,
                    pub_seq,
                    payload,
                    hash: 0,
                });
                PubAck {
                    pub_seq,
                    seq: self.head,
                    publisher: None,
                }
            }
        };
        // A relay learns that its forwards are ordered from the stream.
        if !forwarded {
            self.owe_ack(session, ack);
        }
    }

    /// In a group: hands a publish to the group unless it is a retry.
    fn submit(
        &mut self,
        session: SessionId,
        publisher: PublisherId,
        forwarded: bool,
        state: Option<PublisherState>,
        publish: Publish,
    ) {
        let ordered = state.map_or(PubSeq(0), |p| p.last_pub_seq);
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let pub_seq = publish.pub_seq;
        if !forwarded {
            // After its first publish on a connection, a client's new
            // pub_seqs follow what it sent and what is known here: a skip
            // now is the client's, not a lag elsewhere.
            let previous = s.last_pub_seq.map(|p| p.max(pub_seq));
            let sent = std::mem::replace(&mut s.last_pub_seq, previous.or(Some(pub_seq)));
            let known = ordered.max(s.submitted);
            if let Some(sent) = sent.filter(|p| pub_seq.0 > (*p).max(known).0.saturating_add(1)) {
                let msg = format!(
                    "pub_seq {} after {}: publisher sequence numbers must not skip",
                    pub_seq.0,
                    sent.max(known).0
                );
                return self.close_with_error(session, ErrorCode::PubSeqGap, msg);
            }
        }
        if pub_seq <= ordered && !self.bugs.order_retries {
            // Ordered and delivered already: acknowledge again (guarantee 2).
            self.stats.duplicates += 1;
            let seq = state.map_or(Seq(0), |p| p.last_seq);
            let ack = PubAck {
                pub_seq: ordered,
                seq,
                publisher: None,
            };
            if forwarded {
                return self.ack_forwarded(session, publisher, ack);
            }
            return self.owe_ack(session, ack);
        }
        if forwarded && s.forwarded.len() >= self.config.publishers_max {
            // Forgetting what is in flight only costs resubmissions, which
            // the sequencer deduplicates.
            s.forwarded.clear();
        }
        let submitted = match forwarded {
            true => s.forwarded.entry(publisher).or_default(),
            false => &mut s.submitted,
        };
        let known = ordered.max(*submitted);
        let after = match pub_seq <= known {
            // A relay's retry goes up again: this node may never see the
            // first one come back (it was ordered before this node's
            // stream began, say), and the tier above answers a duplicate
            // with an acknowledgement for the relay.
            true if forwarded => PubSeq(pub_seq.0 - 1),
            true => {
                // In flight in the group: acknowledged when it comes back.
                self.stats.duplicates += 1;
                return;
            }
            // Whether `pub_seq` skips is judged by the caller against what
            // the group holds: this node may not have delivered yet what
            // another server acknowledged (see `Submission::after`).
            false => known,
        };
        *submitted = pub_seq.max(*submitted);
        let topic = self.intern(publish.topic());
        self.stats.bytes_in += publish.payload.len() as u64;
        self.submissions.push(Submission {
            session,
            after,
            forwarded,
            msg: Msg(publisher, pub_seq, topic, publish.payload),
        });
    }

    /// Tells relay `session` at once that `publisher`'s retry was ordered
    /// before: it will not see the retry in the stream.
    fn ack_forwarded(&mut self, session: SessionId, publisher: PublisherId, ack: PubAck) {
        let ack = PubAck {
            publisher: Some(publisher),
            ..ack
        };
        self.control(session, kind::PUB_ACK, &ack);
    }

    /// In a relay: the tier above acknowledged `publisher`'s publishes up
    /// to `ack.pub_seq` (retries it had ordered before). The publisher's
    /// session here is told; if the publisher is further down, the relays
    /// that forwarded for it are told in turn.
    pub fn ack_publisher(&mut self, now: Duration, publisher: PublisherId, ack: PubAck) {
        self.now = now;
        if let Some(&session) = self.publisher_sessions.get(&publisher) {
            self.owe_ack(
                session,
                PubAck {
                    publisher: None,
                    ..ack
                },
            );
            self.fan_out();
            return;
        }
        for session in self.forwarders_of(publisher) {
            self.ack_forwarded(session, publisher, ack);
        }
    }

    /// The relay sessions that forwarded publishes of `publisher`, in
    /// session order.
    fn forwarders_of(&self, publisher: PublisherId) -> Vec<SessionId> {
        let mut v: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.forwarded.contains_key(&publisher))
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable();
        v
    }

    /// In a group: the publishes accepted since the last call, in order,
    /// for the group to order.
    pub fn take_submissions(&mut self) -> Vec<Submission> {
        std::mem::take(&mut self.submissions)
    }

    /// Gives back taken submissions that must wait (no room below yet):
    /// they are taken again first, in their order.
    pub fn defer_submissions(&mut self, mut waiting: Vec<Submission>) {
        waiting.append(&mut self.submissions);
        self.submissions = waiting;
    }

    /// In a group: messages the group delivered (stable, contiguous after
    /// the head). They are retained, fanned out, and acknowledge their
    /// publishers' sessions here.
    ///
    /// # Panics
    /// If the seqs do not continue the head: the group broke its contract.
    pub fn handle_ordered(&mut self, now: Duration, batch: Vec<Ordered>) {
        self.now = now;
        for mut m in batch {
            assert_eq!(
                m.seq,
                self.head.next(),
                "invariant: the group delivers contiguous seqs"
            );
            self.head = m.seq;
            // Membership events are the broker's bookkeeping, not publishes.
            if &*m.topic != MEMBERS_TOPIC {
                self.stats.published += 1;
            }
            self.remember_publisher(m.publisher, m.pub_seq, m.seq);
            if let Some(&session) = self.publisher_sessions.get(&m.publisher) {
                let ack = PubAck {
                    pub_seq: m.pub_seq,
                    seq: m.seq,
                    publisher: None,
                };
                self.owe_ack(session, ack);
            }
            m.topic = self.intern(&m.topic);
            self.push_ordered(m);
        }
        self.fan_out();
    }

    /// In a group: messages the group now holds, ordered but not yet
    /// stable. Weak sessions are sent them at once; everyone gets them
    /// again through [`Node::handle_ordered`] once they are stable.
    ///
    /// # Panics
    /// If the seqs do not continue what is held: the group broke its
    /// contract.
    pub fn handle_held(&mut self, now: Duration, msgs: Vec<Ordered>) {
        self.now = now;
        let from = self.unstable.len();
        for mut m in msgs {
            let (last, prev) = self
                .unstable
                .back()
                .map_or((self.head, self.hash), |u| (u.seq, u.hash));
            assert_eq!(
                m.seq,
                last.next(),
                "invariant: the group holds contiguous seqs"
            );
            m.hash = protocol::chain(prev, m.seq, m.publisher, m.pub_seq);
            m.topic = self.intern(&m.topic);
            self.unstable.push_back(m);
        }
        if self.weak_live == 0 {
            return;
        }
        // What is stable goes out first, and claims are checked before
        // anything past them is sent.
        self.fan_out();
        let batch: Vec<Ordered> = self.unstable.range(from..).cloned().collect();
        self.weak_fan_out(&batch);
    }

    /// In a relay whose tier above sends what it holds: the held messages
    /// through `through` are now stable.
    pub fn handle_stable(&mut self, now: Duration, through: Seq) {
        let n = self
            .unstable
            .iter()
            .take_while(|m| m.seq <= through)
            .count();
        let batch: Vec<Ordered> = self.unstable.iter().take(n).cloned().collect();
        self.handle_ordered(now, batch);
    }

    /// In a group: a view change took back the held messages after
    /// `after` (never stable). Weak sessions sent any of them are checked
    /// when the stream reaches what they were sent again: a difference is
    /// reported to them (docs/DESIGN.md guarantee 6), sameness is not.
    pub fn handle_unheld(&mut self, now: Duration, after: Seq) {
        self.now = now;
        self.unheld(after);
    }

    /// The last seq held: stable or not.
    fn weak_head(&self) -> Seq {
        self.unstable.back().map_or(self.head, |m| m.seq)
    }

    /// The running hash through `seq`, if this node still knows it.
    fn hash_at(&self, seq: Seq) -> Option<u64> {
        if seq > self.head {
            let first = self.unstable.front()?.seq;
            let i = usize::try_from(seq.0.checked_sub(first.0)?).ok()?;
            return self.unstable.get(i).map(|m| m.hash);
        }
        if seq == self.head {
            return Some(self.hash);
        }
        // Stable but not yet retained: the pending batch runs to `head`.
        match self.pending.first() {
            Some(p) if seq >= p.seq => self
                .pending
                .get(usize::try_from(seq.0 - p.seq.0).ok()?)
                .map(|m| m.hash),
            _ => self.retention.hash_at(seq),
        }
    }

    /// `m` became stable. Weak sessions were sent it when it was held, or
    /// are sent it now (nothing was held: a relay, a node alone).
    fn stabilize(&mut self, m: &Ordered) {
        if let Some(u) = self.unstable.front() {
            if u.seq == m.seq && u.hash == m.hash {
                self.unstable.pop_front();
                return;
            }
            // The group delivered other than it held without taking that
            // back first; weak sessions are checked as if it had.
            tracing::error!(
                seq = m.seq.0,
                held = u.seq.0,
                "a stable message differs from the one held"
            );
            self.unheld(Seq(m.seq.0 - 1));
        }
        if self.weak_live > 0 {
            self.weak_pending.push(m.clone());
        }
    }

    /// Drops the held messages after `after`; each weak session sent one
    /// of them gets a claim on what it holds, checked when the stream
    /// reaches it again.
    fn unheld(&mut self, after: Seq) {
        let Some(first) = self.unstable.front().map(|m| m.seq) else {
            return;
        };
        if after >= self.weak_head() {
            return;
        }
        let mut hit: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.weak && !s.closing && s.weak_sent > after)
            .map(|(id, _)| *id)
            .collect();
        // In session order, so that one input always gives the same outputs.
        hit.sort_unstable();
        for id in hit {
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            let held = s
                .weak_sent
                .0
                .checked_sub(first.0)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| self.unstable.get(i));
            let sent = StreamCheck {
                seq: s.weak_sent,
                hash: held.map_or(0, |m| m.hash),
            };
            // A claim from its resume, further on, stands.
            let check = match s.claim {
                Some((c, _)) if c.seq > sent.seq => c,
                _ => sent,
            };
            if s.claim.is_none() {
                self.checks.push(id);
            }
            let agreed = s.claim.map_or(after, |(_, a)| a.min(after));
            s.claim = Some((check, agreed));
            // A catch-up past `after` reads the new messages from there.
            if s.catch_up.is_some_and(|c| c > after) {
                s.catch_up = Some(after);
            }
        }
        let keep = (after.0 + 1).saturating_sub(first.0);
        self.unstable
            .truncate(usize::try_from(keep).unwrap_or(usize::MAX));
        self.journal.record(
            self.now,
            EventKind::View,
            format!("held messages after seq {after} taken back by a view change"),
        );
    }

    /// Checks the claims the stream has reached.
    fn resolve_checks(&mut self) {
        if self.checks.is_empty() {
            return;
        }
        // (A strong session's check waits for the stable head; see
        // `hello`.)
        let (weak, stable) = (self.weak_head(), self.head);
        let mut due = Vec::new();
        self.checks.retain(|id| {
            let session = self.sessions.get(id).filter(|s| !s.closing);
            let reached = session.map_or(stable, |s| if s.weak { weak } else { stable });
            match session.and_then(|s| s.claim) {
                Some((check, agreed)) if check.seq <= reached => {
                    due.push((*id, check, agreed));
                    false
                }
                Some(_) => true,
                None => false,
            }
        });
        for (id, check, agreed) in due {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.claim = None;
            }
            // Not known any more (long past): a difference cannot be ruled out.
            if self.hash_at(check.seq) != Some(check.hash) {
                self.diverge(id, agreed, check.seq);
            }
        }
    }

    /// Tells `session` that what it was sent after `agreed` is not the
    /// agreed stream (seen at `seen`), and replays that from `agreed`.
    fn diverge(&mut self, session: SessionId, agreed: Seq, seen: Seq) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.catch_up.is_none() {
            self.catching_up.push(session);
        }
        s.catch_up = Some(s.catch_up.map_or(agreed, |c| c.min(agreed)));
        s.replay_stalled = false;
        s.weak_sent = agreed;
        // The replay covers a conflated range too.
        s.gap = None;
        self.stats.diverged += 1;
        let detail = format!(
            "session {session}: its stream after seq {agreed} was not the agreed one (seen at {seen}); replayed"
        );
        self.journal.record(self.now, EventKind::Diverged, detail);
        let head = DivergedHead {
            from: agreed.next(),
            seen,
        };
        self.control(session, kind::DIVERGED, &head);
    }

    /// Queues `batch` for the weak sessions that match it.
    fn weak_fan_out(&mut self, batch: &[Ordered]) {
        let limits = FrameLimits::new(self.config.frame_len_max);
        let from = self.outputs.len();
        let (frames, delivered) = self.fanout.run(
            batch,
            &mut self.indexes.weak,
            limits,
            Some(self.head),
            &mut self.outputs,
        );
        self.stats.deliver_frames += frames;
        self.stats.delivered += delivered;
        for out in self.outputs.range(from..) {
            if let Output::Transmit {
                session,
                kind: TransmitKind::Deliver,
                seqs,
                ..
            } = out
            {
                if let Some(s) = self.sessions.get_mut(session) {
                    if s.catch_up.is_none() {
                        s.weak_sent = s.weak_sent.max(seqs.1);
                    }
                }
            }
        }
    }

    /// In a group: whether this server is in the primary view. When it is
    /// not, every client is told `not_primary` and closed, so it moves to a
    /// server that orders (docs/DESIGN.md guarantee 7), and new ones are refused.
    pub fn set_primary(&mut self, now: Duration, primary: bool) {
        self.now = now;
        if self.primary == primary {
            return;
        }
        self.primary = primary;
        if primary {
            self.journal
                .record(now, EventKind::View, "in the primary view".into());
            return;
        }
        self.journal.record(
            now,
            EventKind::View,
            "not in the primary view: clients told to move".into(),
        );
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        // In session order, so that one input always gives the same outputs.
        ids.sort_unstable();
        for session in ids {
            let msg = "this server lost the primary component of the core; reconnect elsewhere";
            self.close_with_error(session, ErrorCode::NotPrimary, msg.to_owned());
        }
    }

    /// In a group: the ordered stream this node's seqs belong to.
    pub fn set_stream(&mut self, stream: u64) {
        self.config.stream = stream;
    }

    /// In a group: replaces everything delivered with `state` (a joining or
    /// lagging server catching up from a peer).
    pub fn install_snapshot(&mut self, now: Duration, state: Snapshot) {
        self.now = now;
        self.fan_out();
        if state.stream != self.config.stream {
            // Nothing of this node's publishes is known in another stream:
            // its own pub_seqs begin again (first contact there), and
            // submissions made against the old stream's tables are dropped
            // (their sessions are closed; clients send them again).
            self.own_pub_seq = PubSeq(0);
            self.submissions.clear();
        }
        self.config.stream = state.stream;
        self.head = state.head;
        self.watermark_sent = Seq(0);
        self.publishers.clear();
        self.publishers_evicted = state.evicted;
        for (id, pub_seq, seq) in state.publishers {
            self.remember_publisher(id, pub_seq, seq);
        }
        // Nothing held survives: the sessions were closed.
        self.unstable.clear();
        self.weak_pending.clear();
        let before = Seq(state.head.0.saturating_sub(state.msgs.len() as u64));
        self.retention = Retention::starting_after(
            self.config.retention_count_max,
            self.config.retention_bytes_max,
            before,
            state.hash,
        );
        if let Some(report) = state.members {
            self.members.install(report);
        }
        self.hash = if self.bugs.forget_snapshot_hash {
            0
        } else {
            state.hash
        };
        for (i, m) in state.msgs.into_iter().enumerate() {
            let mut m = m.ordered(Seq(before.0 + 1 + i as u64));
            m.hash = protocol::chain(self.hash, m.seq, m.publisher, m.pub_seq);
            self.hash = m.hash;
            m.topic = self.intern(&m.topic);
            self.retention.push(m);
        }
        self.journal.record(
            now,
            EventKind::View,
            format!("caught up from a peer at seq {}", state.head),
        );
    }

    /// In a group: the delivered state for a joining or lagging server,
    /// with the most recent retained messages, at most `msgs_max` of them
    /// and `bytes_max` bytes (as retention counts them).
    pub fn snapshot(&mut self, msgs_max: usize, bytes_max: usize) -> Snapshot {
        self.fan_out();
        let mut publishers: Vec<(PublisherId, PubSeq, Seq)> = self
            .publishers
            .iter()
            .map(|(&id, p)| (id, p.last_pub_seq, p.last_seq))
            .collect();
        // Sorted, so the same state always encodes the same.
        publishers.sort_unstable();
        let all: Vec<&Ordered> = self.retention.after(Seq(0)).collect();
        let (mut keep, mut bytes) = (0, 0);
        for m in all.iter().rev() {
            if keep >= msgs_max || bytes + m.cost() > bytes_max {
                break;
            }
            bytes += m.cost();
            keep += 1;
        }
        let msgs: Vec<Msg> = all[all.len() - keep..].iter().map(|m| Msg::of(m)).collect();
        let first = Seq(self.head.0 + 1 - msgs.len() as u64);
        let hash = self
            .hash_at(Seq(first.0 - 1))
            .expect("invariant: the hash before the oldest retained message is kept");
        Snapshot {
            hash,
            stream: self.config.stream,
            head: self.head,
            publishers,
            evicted: self.publishers_evicted,
            first,
            msgs,
            members: Some(self.members.report(self.head)),
        }
    }

    /// In a relay: the tier above's complete membership report, at this
    /// node's head (its stream reached the report's position).
    pub fn install_members(&mut self, report: MembersHead) {
        self.members.install(report);
    }

    /// In a core server: refuses `sub`, the first publish of a connection,
    /// whose pub_seq skips past `known`, the last of its publisher's that
    /// this server's group knows of. Every server of the current primary
    /// view knows at least what any server acknowledged to the publisher
    /// (the flush carries it over), so this server is behind the primary
    /// component (excluded from it without knowing yet): the client is told
    /// `not_primary` and moves on, and the server finds out itself within a
    /// failure timeout. (A client that really skips is refused wherever it
    /// goes; within one connection a skip is refused as `pub_seq_gap`.)
    pub fn reject_behind(&mut self, now: Duration, sub: &Submission, known: PubSeq) {
        let msg = format!(
            "this server knows publisher {} only through pub_seq {}, before {}: it is behind the primary component; reconnect elsewhere",
            sub.msg.0, known.0, sub.msg.1 .0
        );
        self.reject(now, sub, ErrorCode::NotPrimary, msg);
    }

    /// Refuses `sub` because the group cannot take more publishes now; its
    /// client retries what was not acknowledged.
    pub fn reject_overloaded(&mut self, now: Duration, sub: &Submission) {
        let msg = "too many publishes waiting to be ordered; retry".to_owned();
        self.reject(now, sub, ErrorCode::Overloaded, msg);
    }

    /// Refuses a submission: a publisher's own session is closed with the
    /// error. A relay's session stays open: the relay is told which
    /// publisher the error concerns, and that publisher's later publishes
    /// are judged afresh.
    fn reject(&mut self, now: Duration, sub: &Submission, code: ErrorCode, message: String) {
        self.now = now;
        let publisher = sub.msg.0;
        if !sub.forwarded {
            return self.close_with_error(sub.session, code, message);
        }
        self.refuse_forwarded(sub.session, publisher, sub.msg.1, code, message);
    }

    /// Tells relay `session` that `publisher`'s publish `pub_seq` (and what
    /// follows it on the way) is refused; the relay's session stays open.
    fn refuse_forwarded(
        &mut self,
        session: SessionId,
        publisher: PublisherId,
        pub_seq: PubSeq,
        code: ErrorCode,
        message: String,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.forwarded.remove(&publisher);
        let first = s.refused.entry(publisher).or_insert(pub_seq);
        *first = (*first).min(pub_seq);
        let frame = ErrorFrame {
            code,
            message,
            publisher: Some(publisher),
        };
        self.control(session, kind::ERROR, &frame);
    }

    /// In a relay: the tier above refused `publisher`'s forwarded publishes
    /// with `code`; the publisher's session here is closed with it (its
    /// client retries what was not acknowledged), or the relays below that
    /// forwarded for it are told.
    pub fn reject_publisher(
        &mut self,
        now: Duration,
        publisher: PublisherId,
        code: ErrorCode,
        message: String,
    ) {
        self.now = now;
        if let Some(&session) = self.publisher_sessions.get(&publisher) {
            // Its client did not skip: a relay forwards in order, and judged
            // this session's own sequence (`published`). The tier above
            // refused it because of where its earlier publishes went (an
            // earlier connection's, still on the way): it retries.
            let message = format!("refused by the tier above ({code:?}: {message}); retry");
            return self.close_with_error(session, ErrorCode::Overloaded, message);
        }
        // Further down: each relay that forwarded for it is told, and
        // forgets what it had in flight for it, so that retries pass.
        for session in self.forwarders_of(publisher) {
            if let Some(s) = self.sessions.get_mut(&session) {
                s.forwarded.remove(&publisher);
            }
            let frame = ErrorFrame {
                code,
                message: message.clone(),
                publisher: Some(publisher),
            };
            self.control(session, kind::ERROR, &frame);
        }
    }

    /// Notes that `session` is owed `ack` (cumulative: a later one replaces
    /// an earlier); it goes out after the current batch is fanned out.
    fn owe_ack(&mut self, session: SessionId, ack: PubAck) {
        if let Some(s) = self.sessions.get_mut(&session) {
            if s.ack_due.replace(ack).is_none() {
                self.acks_due.push(session);
            }
        }
    }

    /// A session ended: its client detaches (an ordered event).
    fn session_gone(&mut self, session: SessionId, s: Session) {
        if s.weak {
            self.weak_live -= 1;
            self.stable_marks.remove(&session);
        }
        self.reporting_full.remove(&session);
        self.reporting_servers.remove(&session);
        let Some(h) = &s.hello else {
            return;
        };
        if self.publisher_sessions.get(&h.publisher) == Some(&session) {
            self.publisher_sessions.remove(&h.publisher);
        }
        self.publish_member_event(MemberEvent::Detach {
            client: h.publisher,
            server: self.config.id,
            session: session.0,
        });
    }

    /// Publishes one of this node's membership events: ordered at once
    /// when the node orders alone, handed to the group below otherwise
    /// (a relay's go to the tier above).
    fn publish_member_event(&mut self, event: MemberEvent) {
        if self.config.members_max == 0 {
            return;
        }
        let pub_seq = PubSeq(self.own_pub_seq.0 + 1);
        let after = std::mem::replace(&mut self.own_pub_seq, pub_seq);
        let (id, payload) = (self.config.id, event.encode());
        let topic = self.intern(MEMBERS_TOPIC);
        if self.grouped {
            self.submissions.push(Submission {
                session: SessionId::NODE,
                after,
                forwarded: false,
                msg: Msg(id, pub_seq, topic, payload),
            });
            return;
        }
        self.head = self.head.next();
        self.remember_publisher(id, pub_seq, self.head);
        self.push_ordered(Ordered {
            seq: self.head,
            topic,
            publisher: id,
            pub_seq,
            payload,
            hash: 0,
        });
    }

    /// Takes one ordered message for fan-out and retention. A membership
    /// event is applied here, at its position: what precedes it goes out
    /// first, then the reports of its change (docs/DESIGN.md guarantee 4 at the
    /// clients: one change, one position, everywhere).
    fn push_ordered(&mut self, mut m: Ordered) {
        m.hash = protocol::chain(self.hash, m.seq, m.publisher, m.pub_seq);
        self.hash = m.hash;
        self.stabilize(&m);
        if &*m.topic != MEMBERS_TOPIC {
            self.pending.push(m);
            if self.pending.len() >= self.config.batch_len_max {
                self.fan_out();
            }
            return;
        }
        let (seq, event) = (m.seq, MemberEvent::decode(&m.payload));
        self.pending.push(m);
        let Some(event) = event else {
            tracing::warn!(seq = seq.0, "an undecodable membership event skipped");
            return;
        };
        let Some(change) = self.members.apply(seq, event) else {
            return;
        };
        let servers_told = change.core.is_some() && !self.reporting_servers.is_empty();
        if self.reporting_full.is_empty() && !servers_told {
            // Nobody is told: the batch goes on (a flush here would split
            // every subscriber's frames at every attach).
            return;
        }
        self.fan_out();
        if !self.reporting_full.is_empty() {
            let frame = protocol::encode(kind::MEMBERS, &change, &[]);
            broadcast(&mut self.outputs, &self.reporting_full, &frame, seq);
        }
        let servers: Vec<String> = change
            .core
            .iter()
            .flatten()
            .map(|s| s.addr.clone())
            .collect();
        // Only with every address known (a server bound to port 0 has none).
        if self.core_tier && protocol::usable_servers(&servers) {
            let frame = protocol::encode(kind::SERVERS, &ServersHead { seq, servers }, &[]);
            broadcast(&mut self.outputs, &self.reporting_servers, &frame, seq);
        }
    }

    /// In a relay with a new connection to the tier above: announces every
    /// live client again (see [`UpEvent::Reattach`](super::upstream::UpEvent)).
    pub fn reattach(&mut self) {
        let mut live: Vec<(SessionId, MemberEntry)> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.closing)
            .filter_map(|(id, s)| Some((*id, s.hello.as_ref()?.entry.clone())))
            .collect();
        live.sort_unstable_by_key(|(id, _)| *id);
        for (_, entry) in live {
            self.publish_member_event(MemberEvent::Attach(entry));
        }
    }

    /// A core server coordinating a new view: tells the tree the view's
    /// servers, in the stream (see [`MemberEvent::Core`]).
    pub fn publish_core(&mut self, epoch: u64, servers: Vec<ServerEntry>) {
        if servers != self.members.core() {
            self.publish_member_event(MemberEvent::Core { epoch, servers });
        }
    }

    /// Starts `full` or `servers` reports for a session that is live now.
    fn start_reports(&mut self, session: SessionId) {
        let Some(reports) = self
            .sessions
            .get(&session)
            .and_then(|s| s.hello.as_ref())
            .map(|h| h.reports)
        else {
            return;
        };
        if reports != Reports::None {
            // `full` includes the server list.
            self.reporting_servers.insert(session);
        }
        match reports {
            Reports::Full => {
                let report = self.members.report(self.head);
                self.control(session, kind::MEMBERS, &report);
                self.reporting_full.insert(session);
            }
            Reports::Servers => {}
            Reports::None => {}
        }
    }

    /// The shared text of `topic`, allocated once per distinct topic while
    /// fewer than `TOPICS_INTERNED_MAX` are known (then the set starts over).
    fn intern(&mut self, topic: &str) -> Arc<str> {
        if let Some(t) = self.topic_names.get(topic) {
            return t.clone();
        }
        if self.topic_names.len() >= TOPICS_INTERNED_MAX {
            self.topic_names.clear();
        }
        let t: Arc<str> = Arc::from(topic);
        self.topic_names.insert(t.clone());
        t
    }

    fn remember_publisher(&mut self, publisher: PublisherId, pub_seq: PubSeq, seq: Seq) {
        if !self.publishers.contains_key(&publisher)
            && self.publishers.len() >= self.config.publishers_max
        {
            // Forget the eighth of publishers that have been quiet longest,
            // in one pass, so the cost per new publisher stays constant on
            // average. A forgotten publisher that comes back with retries of
            // old pub_seqs gets them ordered again: the price of the bound.
            self.publishers_evicted = true;
            let mut by_age: Vec<(Seq, PublisherId)> = self
                .publishers
                .iter()
                .map(|(id, p)| (p.last_seq, *id))
                .collect();
            let evict = (by_age.len() / 8).max(1);
            by_age.select_nth_unstable(evict - 1);
            for (_, id) in &by_age[..evict] {
                let _gone = self.publishers.remove(id);
                #[cfg(test)]
                if let Some(p) = _gone {
                    let e = self.forgotten.entry(*id).or_default();
                    *e = (*e).max(p.last_pub_seq);
                }
            }
        }
        self.publishers.insert(
            publisher,
            PublisherState {
                last_pub_seq: pub_seq,
                last_seq: seq,
            },
        );
    }

    /// Fans the pending batch out to matching sessions, retains it, and
    /// queues the acknowledgements it earned.
    fn fan_out(&mut self) {
        self.resolve_checks();
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            let limits = FrameLimits::new(self.config.frame_len_max);
            let (frames, delivered) = self.fanout.run(
                &batch,
                &mut self.indexes.strong,
                limits,
                None,
                &mut self.outputs,
            );
            self.stats.deliver_frames += frames;
            self.stats.delivered += delivered;
            for m in batch {
                self.topics.count(&m.topic, m.payload.len());
                self.retention.push(m);
            }
        }
        let stable_moved = self.head > self.marked;
        if !self.weak_pending.is_empty() {
            let batch = std::mem::take(&mut self.weak_pending);
            self.weak_fan_out(&batch);
        }
        if stable_moved && !self.stable_marks.is_empty() {
            // After what they were sent: everything up to the mark is.
            self.marked = self.head;
            let mark = protocol::encode(kind::WATERMARK, &WatermarkHead { seq: self.head }, &[]);
            for &session in &self.stable_marks {
                self.outputs
                    .push_back(stable_mark(session, mark.clone(), self.head));
            }
        }
        for session in self.acks_due.drain(..) {
            let Some(ack) = self
                .sessions
                .get_mut(&session)
                .and_then(|s| s.ack_due.take())
            else {
                continue;
            };
            self.outputs.push_back(Output::Transmit {
                session,
                frame: protocol::encode(kind::PUB_ACK, &ack, &[]),
                kind: TransmitKind::Control,
                seqs: (ack.seq, ack.seq),
            });
        }
    }

    fn control<H: serde::Serialize>(&mut self, session: SessionId, k: u8, head: &H) {
        self.outputs.push_back(Output::Transmit {
            session,
            frame: protocol::encode(k, head, &[]),
            kind: TransmitKind::Control,
            seqs: (self.head, self.head),
        });
    }

    fn close_with_error(&mut self, session: SessionId, code: ErrorCode, message: String) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.closing {
            return;
        }
        if !matches!(
            code,
            ErrorCode::SlowConsumer | ErrorCode::NotPrimary | ErrorCode::Overloaded
        ) {
            self.stats.bad_input += 1;
            let detail = format!("session {session}: {code:?}: {message}");
            self.journal.record(self.now, EventKind::BadInput, detail);
        }
        s.closing = true;
        s.drain = true;
        for p in std::mem::take(&mut s.patterns) {
            self.indexes.of(s.weak).remove(&p, session);
        }
        // Anything this session published before the bad frame is ordered
        // and its acknowledgement goes out before the error (drain).
        self.fan_out();
        self.outputs.push_back(Output::Close {
            session,
            frame: Some(error_frame(code, &message)),
            drain: true,
        });
    }
}

/// Strong and weak sessions subscribe apart: they are sent different
/// streams (stable, and held).
struct Indexes {
    strong: Index,
    weak: Index,
}

impl Indexes {
    fn of(&mut self, weak: bool) -> &mut Index {
        if weak {
            &mut self.weak
        } else {
            &mut self.strong
        }
    }
}

/// A stable mark for a weak relay: a watermark at `head`.
fn stable_mark(session: SessionId, frame: Bytes, head: Seq) -> Output {
    Output::Transmit {
        session,
        frame,
        kind: TransmitKind::Watermark,
        seqs: (head, head),
    }
}

/// Queues one control `frame`, encoded once, for each of `sessions`
/// (docs/DESIGN.md, "Hot path": no copy per session).
fn broadcast(
    outputs: &mut VecDeque<Output>,
    sessions: &BTreeSet<SessionId>,
    frame: &Bytes,
    seq: Seq,
) {
    for &session in sessions {
        outputs.push_back(Output::Transmit {
            session,
            frame: frame.clone(),
            kind: TransmitKind::Control,
            seqs: (seq, seq),
        });
    }
}

/// Names in membership reports are cut to this many bytes, so that a
/// complete report of `members_max` clients stays within a frame.
const MEMBER_NAME_LEN_MAX: usize = 64;

fn member_name(name: &str) -> String {
    let mut end = name.len().min(MEMBER_NAME_LEN_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

fn frame_name(f: &protocol::ClientFrame) -> &'static str {
    use protocol::ClientFrame as F;
    match f {
        F::Hello(_) => "Hello",
        F::Subscribe(_) => "Subscribe",
        F::Unsubscribe(_) => "Unsubscribe",
        F::Publish(..) => "Publish",
        F::Ping(_) => "Ping",
        F::Pong(_) => "Pong",
    }
}

fn error_frame(code: ErrorCode, message: &str) -> Bytes {
    protocol::encode(
        kind::ERROR,
        &ErrorFrame {
            code,
            message: message.to_owned(),
            publisher: None,
        },
        &[],
    )
}

fn deliver(session: SessionId, frame: Bytes, first: Seq, last: Seq) -> Output {
    Output::Transmit {
        session,
        frame,
        kind: TransmitKind::Deliver,
        seqs: (first, last),
    }
}

/// How much one delivery frame may carry, leaving room for its head.
#[derive(Clone, Copy)]
struct FrameLimits {
    body_max: usize,
    msgs_max: usize,
}

impl FrameLimits {
    fn new(frame_len_max: usize) -> Self {
        // A head entry is at most 5 CBOR integers (<= 45 bytes): half of the
        // frame for bodies and a message count whose head fits in the rest.
        FrameLimits {
            body_max: frame_len_max / 2,
            msgs_max: (frame_len_max / 2 / 48).max(1),
        }
    }

    /// Whether `m` must go into a new frame.
    fn full(&self, b: &DeliverBuilder, m: &Ordered) -> bool {
        !b.is_empty()
            && (b.len() >= self.msgs_max
                || b.body_len() + m.topic.len() + m.payload.len() > self.body_max)
    }
}

/// Reusable scratch space for fanning a batch out.
///
/// A batch is grouped by the (cached, shared) set of sessions each message
/// matches. In the common case every session matches one group, and each
/// group's frame is encoded once and handed to all its sessions as the same
/// `Bytes`. A session in several groups gets its own merged frame, cached by
/// its group list so that sessions with the same list still share one.
/// The work per batch is one index lookup per message plus one entry per
/// (session, group) pair; nothing is done per session per message.
#[derive(Default)]
struct Fanout {
    groups: Vec<(Arc<[SessionId]>, Vec<u32>)>,
    group_of_set: HashMap<usize, usize>,
    pairs: Vec<(SessionId, u32)>,
    /// Frames per group list, with the number of messages they carry.
    frames: HashMap<Vec<u32>, (Vec<EncodedFrame>, u64)>,
    builder: DeliverBuilder,
    merged: Vec<u32>,
}

impl Fanout {
    /// Queues delivery transmits for `batch`; returns the frames encoded and
    /// the message deliveries queued.
    fn run(
        &mut self,
        batch: &[Ordered],
        index: &mut Index,
        limits: FrameLimits,
        stable: Option<Seq>,
        out: &mut VecDeque<Output>,
    ) -> (u64, u64) {
        self.groups.clear();
        self.group_of_set.clear();
        for (i, m) in batch.iter().enumerate() {
            let set = index.lookup(&m.topic);
            if set.is_empty() {
                continue;
            }
            let key = Arc::as_ptr(&set) as *const () as usize;
            let g = *self.group_of_set.entry(key).or_insert_with(|| {
                self.groups.push((set, Vec::new()));
                self.groups.len() - 1
            });
            self.groups[g].1.push(
                u32::try_from(i).expect("invariant: batches hold far fewer than 2^32 messages"),
            );
        }
        let mut encoded = 0;
        let mut delivered = 0;
        if self.groups.len() == 1 {
            let (set, idx) = &self.groups[0];
            let frames = encode_frames(&mut self.builder, batch, idx, limits, stable);
            encoded += frames.len() as u64;
            delivered += (idx.len() * set.len()) as u64;
            for &session in set.iter() {
                for (frame, first, last) in &frames {
                    out.push_back(deliver(session, frame.clone(), *first, *last));
                }
            }
            return (encoded, delivered);
        }
        self.pairs.clear();
        for (g, (set, _)) in self.groups.iter().enumerate() {
            let g = g as u32;
            self.pairs.extend(set.iter().map(|&s| (s, g)));
        }
        self.pairs.sort_unstable();
        self.frames.clear();
        let mut at = 0;
        while at < self.pairs.len() {
            let session = self.pairs[at].0;
            let end = at
                + self.pairs[at..]
                    .iter()
                    .take_while(|(s, _)| *s == session)
                    .count();
            let key: Vec<u32> = self.pairs[at..end].iter().map(|(_, g)| *g).collect();
            if !self.frames.contains_key(&key) {
                self.merged.clear();
                for &g in &key {
                    self.merged.extend_from_slice(&self.groups[g as usize].1);
                }
                self.merged.sort_unstable();
                let frames = encode_frames(&mut self.builder, batch, &self.merged, limits, stable);
                encoded += frames.len() as u64;
                self.frames
                    .insert(key.clone(), (frames, self.merged.len() as u64));
            }
            let (frames, msgs) = &self.frames[&key];
            delivered += msgs;
            for (frame, first, last) in frames {
                out.push_back(deliver(session, frame.clone(), *first, *last));
            }
            at = end;
        }
        (encoded, delivered)
    }
}

/// A delivery frame with the first and last seq it carries.
type EncodedFrame = (Bytes, Seq, Seq);

/// Encodes the messages `idx` of `batch` into as few frames as the limits
/// allow, each with the running hash through its last message (and, for
/// weak sessions, the `stable` position).
fn encode_frames(
    b: &mut DeliverBuilder,
    batch: &[Ordered],
    idx: &[u32],
    limits: FrameLimits,
    stable: Option<Seq>,
) -> Vec<(Bytes, Seq, Seq)> {
    let mut frames = Vec::with_capacity(1);
    let mut first = Seq(0);
    let mut last = (Seq(0), 0);
    for &i in idx {
        let m = &batch[i as usize];
        if limits.full(b, m) {
            frames.push((b.finish_with(Some(last.1), stable), first, last.0));
        }
        if b.is_empty() {
            first = m.seq;
        }
        last = (m.seq, m.hash);
        b.push(m.seq, m.publisher, m.pub_seq, &m.topic, &m.payload);
    }
    if !b.is_empty() {
        frames.push((b.finish_with(Some(last.1), stable), first, last.0));
    }
    frames
}

#[cfg(test)]
mod tests;
