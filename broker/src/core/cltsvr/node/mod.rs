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
//! # Where things are
//! This file holds the node's types, its inputs from the shell and its
//! timers; the rest is by concern: `session` (the handshake, resume and
//! its checks, subscriptions), `publish` (a publish's checks, ordering or
//! submission, acknowledgements, the node's publisher table), `below` (the
//! stream from the group below, snapshots, this node's membership events),
//! `weak` (weak delivery and running-hash claims), `catchup` (resuming
//! sessions fed from retention), `output` (output order, full queues) and
//! `fanout` (encoding each batch once for every matching session).
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

use super::index::Index;
use super::members::{MemberEvent, Members, MEMBERS_TOPIC};
use super::report::{Entry, EventKind, Journal, TopicCounts};
use crate::core::retention::Retention;
use crate::core::rrpc::call_method;
use crate::core::stream::{Msg, Ordered, Snapshot};
use crate::core::timers::Timers;
use crate::core::total::{Next, PubState, PublisherTable};
use crate::core::SessionId;
use crate::maps::{FastMap, FastSet};
use bytes::Bytes;
use canopy_client::protocol::{
    self, kind, DeliverBuilder, DivergedHead, ErrorCode, ErrorFrame, GapHead, Hello, MemberEntry,
    MembersHead, Permissions, PingHead, PubAck, PubSeq, Publish, PublisherId, Reports, Role, Seq,
    ServerEntry, ServersHead, SlowPolicy, StreamCheck, SubscribeHead, SubscribedHead,
    WatermarkHead, Welcome,
};
use canopy_client::topic::{is_system, Pattern, Topic};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

mod below;
mod calls;
mod catchup;
mod config;
mod fanout;
mod output;
mod publish;
mod session;
mod weak;

pub use config::NodeConfig;
pub use output::{Output, TransmitKind};

use fanout::*;

/// How long a catch-up that filled its session's queue waits to retry.
const REPLAY_RETRY: Duration = Duration::from_millis(10);
/// Catch-up bytes built in one turn (one input or timeout) at most: a
/// replay from retention shares the node with live traffic instead of
/// holding it up while it encodes megabytes.
const CATCH_UP_TURN_BYTES: usize = 256 << 10;
/// When catch-up used up a turn's share and nothing else comes, it goes on
/// this much later.
const CATCH_UP_TURN: Duration = Duration::from_millis(1);

/// Distinct topic texts kept for sharing at most.
const TOPICS_INTERNED_MAX: usize = 65_536;

/// An interned topic, found by its bytes: it hashes as `[u8]` does, so a
/// publish's topic is looked up before its text is checked.
#[derive(PartialEq, Eq)]
struct Interned(Arc<str>);

impl std::hash::Hash for Interned {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_bytes().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for Interned {
    fn borrow(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// A publish accepted from a session, for the group to order.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The session it came from.
    pub session: SessionId,
    /// The publisher's highest pub_seq this node knew of before it (and
    /// can vouch for: docs/DESIGN.md, "Bounds"): the publish skips numbers
    /// if it is beyond both this and what the group holds, plus one.
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

/// The node's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeTimer {
    /// Watermarks, the idle check, and the fan-out of what is pending.
    Watermark,
    /// Stalled catch-ups are retried.
    ReplayRetry,
    /// Catch-up goes on after a turn that used up its share.
    CatchUpTurn,
    /// The oldest session awaiting its Hello is due.
    Handshake,
}

struct Session {
    /// Set by a valid `Hello`; nothing but `Hello` is accepted before.
    hello: Option<SessionHello>,
    /// What the client may do, when the node checks (`NodeConfig::auth`):
    /// set before its `Hello` by [`Node::authenticated`].
    permissions: Option<Arc<Permissions>>,
    patterns: Vec<Pattern>,
    /// A conflating session's missed range, reported before its next delivery.
    gap: Option<(Seq, Seq)>,
    /// The acknowledgement owed after the current batch.
    ack_due: Option<PubAck>,
    /// The highest pub_seq acknowledged on this session so far: an
    /// acknowledgement that adds nothing (a retry of what the client was
    /// told ordered) is not sent again, so that retries cannot fill the
    /// client's queue with copies of one cumulative acknowledgement.
    ack_sent: PubSeq,
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
    /// Whether `forwarded` was cleared at its bound: a refusal from above
    /// then goes to this relay whatever it forwarded.
    forwarded_forgot: bool,
    /// From a relay: publishers whose forwards were refused here and whose
    /// `Released` has not come yet. Their forwards are dropped until it
    /// does (docs/DESIGN.md, "Relays").
    held_back: FastSet<PublisherId>,
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
    /// reached yet: checked when it does.
    claim: Option<Claim>,
    /// Flow control (docs/DESIGN.md, "Flow control"): the messages it may
    /// still be sent, if its Hello gave a window. At 0 its live deliveries
    /// stop and it is caught up from retention as it grants more.
    credit: Option<u64>,
    /// The credit the last delivery or catch-up frame handed to the shell
    /// took (given back if its queue refuses it).
    charged: u64,
    /// Subscription answers queued when flow control paused it, which
    /// claimed positions past what it was sent: given again, at the head,
    /// when its catch-up ends (kind, pattern).
    answers_held: Vec<(u8, String)>,
}

/// A point of a session's stream to check against this server's once it
/// reaches it (docs/DESIGN.md, "Weak delivery").
#[derive(Clone, Copy, Debug)]
struct Claim {
    check: StreamCheck,
    /// Through here the session's stream is agreed: on a difference what
    /// follows is replayed from here.
    agreed: Seq,
    /// Only this server's stable stream can tell the session's apart: a
    /// strong session's, or a weak one that knows its stream is agreed
    /// through `check` (a held part here that differs is this server's
    /// to take back, not the client's).
    stable_only: bool,
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

/// The single-node state machine. See the module docs for how to drive it.
pub struct Node {
    config: NodeConfig,
    sessions: FastMap<SessionId, Session>,
    /// Subscriptions of strong and of weak sessions.
    indexes: Indexes,
    /// What was delivered of each publisher (`core::total`'s table type).
    publishers: PublisherTable,
    retention: Retention,
    /// The last assigned seq.
    head: Seq,
    /// Ordered but not yet fanned out; at most `batch_len_max`.
    pending: Vec<Ordered>,
    /// Sessions with `ack_due` set.
    acks_due: Vec<SessionId>,
    /// Sessions awaiting their Hello, with the time it is due by, in order
    /// (the front's is [`NodeTimer::Handshake`]).
    hello_due: VecDeque<(Duration, SessionId)>,
    /// Sessions with a catch-up in progress.
    catching_up: Vec<SessionId>,
    /// The turn (its `now`) and the catch-up bytes built in it.
    catch_up_turn: (Duration, usize),
    timers: Timers<NodeTimer>,
    outputs: VecDeque<Output>,
    watermark_sent: Seq,
    fanout: Fanout,
    stats: Stats,
    journal: Journal,
    topics: TopicCounts,
    /// Topic texts shared by every message on the topic; a publish's topic
    /// found here was checked already.
    topic_names: FastSet<Interned>,
    /// Deliberate protocol bugs, off unless a test proving a checker turns
    /// one on.
    pub(crate) bugs: Bugs,
    /// Whether the core group orders publishes (they are submitted with
    /// `take_submissions` and come back through `handle_ordered`) rather
    /// than this node alone.
    grouped: bool,
    /// In a group: whether this server is in the primary view. Otherwise
    /// clients are refused and told to move.
    primary: bool,
    /// In a group: publishes waiting to be handed to the group.
    submissions: Vec<Submission>,
    /// The session of each local publisher: in a group, to acknowledge its
    /// publishes when they come back ordered; anywhere, to announce it
    /// again when the membership loses it (`Node::live_entries`).
    publisher_sessions: FastMap<PublisherId, SessionId>,
    /// In a relay: publishers whose forwards the tier above refused, whose
    /// `Released` goes up once no relay session here holds them back.
    releases_owed: FastSet<PublisherId>,
    /// `Released` frames due to the tier above, before any submission taken
    /// with them.
    releases: Vec<PublisherId>,
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
    /// Calls awaiting replies (`calls`).
    calls: calls::Calls,
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
    /// Times a session out of credit had its deliveries paused (flow
    /// control: it is caught up from retention as it grants more).
    pub flow_pauses: u64,
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
    /// Connections refused for missing or wrong credentials.
    pub auth_failures: u64,
    /// Subscriptions, publishes, calls, roles or reports refused for a
    /// user's permissions.
    pub denied: u64,
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
            sessions: FastMap::default(),
            publishers: PublisherTable::new(config.publishers_max),
            head: Seq(0),
            pending: Vec::new(),
            acks_due: Vec::new(),
            hello_due: VecDeque::new(),
            catching_up: Vec::new(),
            catch_up_turn: (Duration::ZERO, 0),
            outputs: VecDeque::new(),
            timers: {
                let mut t = Timers::new();
                t.set(NodeTimer::Watermark, now + config.watermark_interval);
                t
            },
            watermark_sent: Seq(0),
            fanout: Fanout::default(),
            stats: Stats::default(),
            journal: Journal::default(),
            topics: TopicCounts::default(),
            topic_names: FastSet::default(),
            bugs: Bugs::default(),
            grouped: false,
            primary: true,
            submissions: Vec::new(),
            publisher_sessions: FastMap::default(),
            releases_owed: FastSet::default(),
            releases: Vec::new(),
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
            calls: calls::Calls::default(),
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
                permissions: None,
                patterns: Vec::new(),
                gap: None,
                ack_due: None,
                ack_sent: PubSeq(0),
                closing: false,
                drain: false,
                opened_at: now,
                sent_through: Seq(0),
                catch_up: None,
                replay_stalled: false,
                last_heard: now,
                submitted: PubSeq(0),
                forwarded: HashMap::new(),
                forwarded_forgot: false,
                held_back: FastSet::default(),
                last_pub_seq: None,
                weak: false,
                weak_sent: Seq(0),
                claim: None,
                credit: None,
                charged: 0,
                answers_held: Vec::new(),
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
        let due = now + self.config.handshake_timeout;
        self.hello_due.push_back((due, session));
        // (Later than the front's, if there is one.)
        self.timers.set_unless_set(NodeTimer::Handshake, due);
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

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.timers.next()
    }

    /// Time has reached `now`: closes sessions that never said Hello and
    /// sends watermarks when they are due.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.now = now;
        // A new turn (a new `now`) is all catch-up waited for.
        self.timers.fire(NodeTimer::CatchUpTurn, now);
        if self.timers.fire(NodeTimer::ReplayRetry, now) {
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
        let next_hello = self.hello_due.front().map(|&(due, _)| due);
        self.timers.set_or_cancel(NodeTimer::Handshake, next_hello);
        if !self.timers.is_due(NodeTimer::Watermark, now) {
            return;
        }
        self.timers
            .set(NodeTimer::Watermark, now + self.config.watermark_interval);
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
            (F::Ask(head), true) => self.on_ask(session, head),
            (F::Released(head), true) => self.on_released(session, head.publisher),
            (F::Credit(head), true) => {
                if let Some(Session {
                    credit: Some(credit),
                    ..
                }) = self.sessions.get_mut(&session)
                {
                    // (A catch-up waiting for it goes on at this turn.)
                    *credit = credit.saturating_add(head.msgs);
                }
            }
        }
    }

    /// The shell checked session `session`'s credentials: it may do what
    /// `permissions` say (docs/DESIGN.md, "Security"). Comes before the
    /// session's `Hello`.
    pub fn authenticated(&mut self, session: SessionId, permissions: Permissions) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.permissions = Some(Arc::new(permissions));
        }
    }

    /// What session `session` may do, if the node checks and it is not a
    /// relay (a relay acts for its own clients and checks them itself).
    pub(super) fn limits_of(&self, session: SessionId) -> Option<Arc<Permissions>> {
        self.sessions
            .get(&session)?
            .permissions
            .clone()
            .filter(|p| !p.relay)
    }

    /// The shared text of `topic`, allocated once per distinct topic while
    /// fewer than `TOPICS_INTERNED_MAX` are known (then the set starts over).
    fn intern(&mut self, topic: &str) -> Arc<str> {
        if let Some(t) = self.topic_names.get(topic.as_bytes()) {
            return t.0.clone();
        }
        self.insert_topic(Arc::from(topic))
    }

    fn insert_topic(&mut self, t: Arc<str>) -> Arc<str> {
        if self.topic_names.len() >= TOPICS_INTERNED_MAX {
            self.topic_names.clear();
        }
        self.topic_names.insert(Interned(t.clone()));
        t
    }

    /// A publish's topic as shared text, or why it is not a topic a client
    /// may send. Checked once per distinct topic (PROTOCOL.md, "Publish"):
    /// a topic known here passed before, here or at the node a client
    /// published it to (`intern` takes the topics of ordered messages from
    /// the group or the tier above, which their first node checked; and
    /// `$canopy.members`, a system topic, is still refused to clients by
    /// the `is_system` check that follows).
    fn checked_topic(&mut self, bytes: &[u8]) -> Result<Arc<str>, String> {
        if let Some(t) = self.topic_names.get(bytes) {
            return Ok(t.0.clone());
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "the topic is not UTF-8".to_owned())?;
        Topic::validate(text).map_err(|e| e.to_string())?;
        Ok(self.insert_topic(Arc::from(text)))
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
            self.stats.auth_failures += u64::from(code == ErrorCode::AuthFailed);
            self.stats.denied += u64::from(code == ErrorCode::PermissionDenied);
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
            frame: Some(protocol::encode_error(code, &message)),
            drain: true,
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
        F::Ask(_) => "Ask",
        F::Credit(_) => "Credit",
        F::Released(_) => "Released",
    }
}

/// A delivery frame with the first and last seq it carries.
type EncodedFrame = (Bytes, Seq, Seq);

#[cfg(test)]
mod tests;
