//! The core tier's ordered group: MBRSHIP (views, failure detection, the
//! flush, joins) and TOTAL (a sequencer, stability) for one core server.
//!
//! A [`Group`] turns the publishes its server submits into one total order
//! agreed by every server of the primary view, and hands back the stable
//! messages and the views as a stream of [`Event`]s that is the same at
//! every member: the "group below" of docs/DESIGN.md's layer stack.
//!
//! # Protocol in brief
//! - **TOTAL.** A view's coordinator (its lowest-numbered proposer) is the
//!   sequencer. Members forward publishes with `Submit`; the sequencer gives
//!   them the next seqs and sends `Order` to every member; members answer
//!   with cumulative `Ack`s; a seq held by every member is **stable**, and
//!   only stable messages are delivered (docs/DESIGN.md guarantee 5). Seqs
//!   continue across views. Retries are deduplicated by the sequencer's
//!   publisher table, which every member keeps too.
//! - **MBRSHIP.** Every server heartbeats every other configured server.
//!   A member not heard for `failure_timeout` is suspected; a broken link
//!   is a hint confirmed after the shorter `link_confirm` of silence. A
//!   server that is not in the view (restarted, or excluded) is a joiner.
//!   The lowest-numbered live member then proposes a view (`FlushReq`);
//!   members promise it, stop ordering and report what they hold beyond
//!   their delivered seq (`FlushOk`), with the view their state comes from.
//!   With every proposed member's answer, and a majority of the configured
//!   core among them, the proposer takes the history: the newest view
//!   reported is the authority, and the highest seq its members hold is the
//!   last of the old view. It sends every member what it lacks up to there
//!   (`NewView`; members without the newest state get a `Snapshot` of the
//!   proposer's delivered state first). Members **accept** (`AcceptOk`);
//!   when a majority of the configured core holds the history, the proposer
//!   **commits** (the view's first `Stable`): every member delivers the old
//!   view's messages up to that seq, then the view (guarantee 4), and
//!   ordering resumes. Nothing is delivered before the commit, so a view
//!   change interrupted half way never leaves a delivered message behind.
//! - **Primary component.** A view is installed only with the promises of a
//!   majority of the *configured* core servers. Any two majorities share a
//!   server, and a server promises only increasing proposals, so two views
//!   can never both go on (guarantee 7). The starting picture worded the
//!   rule as "a majority of the previous view"; the configured majority is
//!   the form of it that stays safe when view changes overlap (a view half
//!   installed can otherwise count as "previous" for two successors). A server that
//!   cannot reach a majority orders nothing, tells its clients
//!   (`Event::NotPrimary`), and rejoins when it hears the primary.
//! - **Rejoin.** A server that learns of a view newer than its own that it
//!   did not install starts over as a new incarnation and joins again. It
//!   keeps what it delivered (and says which view that came from), so a
//!   core whose servers all rejoined still finds the newest state.
//!
//! # Restart safety
//! Messages live in memory only (there is no durable message log yet), but
//! every server keeps a small [`HardState`] on disk, as Raft keeps its term
//! and vote: its incarnation, the highest proposal it promised, and the
//! last view it accepted and installed. The shell writes it (atomically,
//! fsynced) before it sends any frame that depends on it, so it changes on
//! view changes only, never per message. The rules that rest on it:
//! - **What counts toward a quorum.** A restarted server remembers its
//!   promises, so its promise counts; it holds none of its old messages, so
//!   it never counts as holding state (it answers `view: None` with its
//!   remembered `accepted` view). A server that lost its data directory is
//!   a new server: it counts as a **voter** again only once it has
//!   accepted a view. A proposal needs a majority of voters.
//! - **Which history a view carries on** (`Group::basis`): the state of the
//!   highest view accepted among the answers, if one of them holds it.
//!   With every configured server's answer (all voters), the newest view
//!   installed anywhere is known, and the newest state held carries on if
//!   it is at least that new.
//! - **When a stream may start.** Only when no history can exist: the
//!   first formation (nobody ever accepted a view, every configured server
//!   answered), or every member of the newest installed view lost its
//!   messages (every server answered, none holds that much). The new stream
//!   has an id of its own (view ids are never reused while a majority of
//!   the servers keep their data directories, and the lost stream's id is
//!   mixed in), and clients are told `StreamReset`; a seq never means two
//!   things under one stream id. Otherwise the core waits for the
//!   server that may hold the newest state.
//! - **Who is alive.** A server counts another alive only if it hears it
//!   and the other's heartbeats say it hears back, so a server whose
//!   inbound links are cut is left out of views instead of stalling each
//!   flush it is proposed into.
//! - **Own submissions survive a rejoin** (the node's membership events are
//!   submitted once; a missing pub_seq would hold back every later one).
//!   They are dropped only when the stream itself changes: they were made
//!   against the old stream's publisher tables, and their publishers are
//!   told the stream reset.
//! - **Eviction and first contact.** A member numbers its submissions; the
//!   sequencer drops a `Submit` that does not continue what it received
//!   from that member (one was lost with a link), so a publish never
//!   overtakes a lost predecessor, which a table that forgot its publisher
//!   could not tell. (What eviction still costs: an old retry of a
//!   forgotten publisher may be ordered again.) Each member's table evicts
//!   on its own, so a member may forget a publisher the sequencer still
//!   knows: when the sequencer drops a member's submission as a retry it
//!   says so (`Retried`, with its entry for the publisher), and a member
//!   that delivered that seq learns the entry, forgets the submission and
//!   acknowledges the publisher (`Event::Retried`); otherwise it would wait
//!   for that retry's delivery for good.
//!
//! What this guarantees, and what it does not: no acknowledged publish is
//! lost while one member of each installed view survives with its messages;
//! if every member of a view restarts, the stream begins again (a reset,
//! never a silent one). One state the core cannot leave by itself: servers
//! still hold messages, none holds the newest accepted view's, and servers
//! that lost their data directories may have lost the record of what was
//! installed last. It then waits; an operator restarts every server without
//! its data directory (a new stream).
//!
//! # Driving it
//! Inputs: [`Group::handle_msg`], [`Group::handle_link_down`],
//! [`Group::handle_link_up`], [`Group::handle_timeout`], [`Group::submit`],
//! and [`Group::send_snapshot`] in answer to `Event::SnapshotNeeded`. After
//! any input drain [`Group::poll_event`] (events in stream order) and
//! [`Group::poll_transmit`] (frames per peer, FIFO per peer).
//!
//! # Invariants
//! - The delivered stream is contiguous in seq and identical at every
//!   member that delivers a seq (guarantees 1 and 2).
//! - A member delivers only seqs the coordinator declared stable, or seqs
//!   a flush established; after promising a proposal it delivers nothing
//!   more of the old view.
//! - Everything is bounded: the log by `log_len_max` (the sequencer stops
//!   ordering at the bound), unordered submissions by `unordered_max` (the
//!   server's own membership events pass it), the publisher table by
//!   `publishers_max` plus the publishers of messages still in the log
//!   (only publishers whose messages are all delivered are evicted).
//! - After every input (debug builds assert it, [`Group::check_invariants`]):
//!   nothing is delivered past the stable seq; the log holds exactly the
//!   seqs after the delivered one; a server in a view's `Normal` status has
//!   that view; one awaiting a snapshot keeps the `NewView` it waits with;
//!   no installed view is newer than the highest promise.

mod mbrship;
mod total;

use mbrship::Membership;
use total::Total;
pub mod wire;

#[cfg(test)]
mod tests;

use crate::core::retention::Ordered;
use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;
pub use wire::{Msg, PeerMsg, Snapshot, Submitted};

/// A configured core server's number (its rank: lower numbers coordinate).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// One run of a server: a restart, or a rejoin after exclusion, is a new
/// incarnation, so that an old one can never be taken for the new.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Incarnation(pub u64);

/// A member of a view: a server in one incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The server.
    pub node: NodeId,
    /// Its incarnation.
    pub incarnation: Incarnation,
}

/// A view's identity, which is also the identity of the proposal that made
/// it. Ordered by epoch, then coordinator.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct ViewId {
    /// Increases with every proposal.
    pub epoch: u64,
    /// The proposer, the view's coordinator and sequencer.
    pub coordinator: NodeId,
}

impl fmt::Display for ViewId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.epoch, self.coordinator)
    }
}

/// An installed view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Its id.
    pub id: ViewId,
    /// Its members, by node.
    pub members: Vec<Member>,
    /// The ordered stream it continues (fixed when the first view forms).
    pub stream: u64,
}

impl View {
    fn has(&self, m: Member) -> bool {
        self.members.contains(&m)
    }
}

/// What a core server keeps on disk, as Raft keeps its term and vote. The
/// group hands it out with [`Group::poll_hard_state`] whenever it changes,
/// and the shell must have written it durably before it sends any frame
/// the group queued after the change: a promise or an acceptance is only
/// sent once it will survive a restart. It changes only on view changes and
/// rejoins, never per message. See "Restart safety" in the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The last incarnation this server ran as; a restart runs as a higher
    /// one.
    pub incarnation: Incarnation,
    /// The highest proposal promised: never promised lower again, and a
    /// proposal of this server's own is always higher.
    pub promised: ViewId,
    /// The last view whose history this server accepted (its members and
    /// stream). `Some` also means the server is a **voter**: everything it
    /// promised since its data directory was made is remembered.
    pub accepted: Option<View>,
    /// The last view this server installed (committed and delivered in).
    /// Written before the commit leaves the proposer and before anything of
    /// the view is delivered, so every view in which anything was delivered
    /// is recorded by a server that was in it.
    #[serde(default)]
    pub installed: ViewId,
}

/// Validated settings of a group member.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// This server.
    pub me: NodeId,
    /// This run's incarnation (unique per start, e.g. from the clock).
    pub incarnation: Incarnation,
    /// Every configured core server, this one included.
    pub servers: Vec<NodeId>,
    /// How often heartbeats go out.
    pub heartbeat_interval: Duration,
    /// A member silent this long is excluded.
    pub failure_timeout: Duration,
    /// A member whose link broke and that stays silent this long is excluded.
    pub link_confirm: Duration,
    /// How long a view change may take before it is retried.
    pub flush_timeout: Duration,
    /// Submitted but not yet delivered publishes held at most.
    pub unordered_max: usize,
    /// Ordered but not yet stable messages the sequencer holds at most.
    pub log_len_max: usize,
    /// ...and their bytes at most (so a flush fits in a few frames).
    pub log_bytes_max: usize,
    /// Publishers whose deduplication state is kept.
    pub publishers_max: usize,
    /// Mixed into the stream id of a newly formed core.
    pub stream_seed: u64,
}

impl GroupConfig {
    /// Settings for server `me` of `servers` with default timings.
    pub fn new(me: NodeId, incarnation: Incarnation, servers: Vec<NodeId>) -> Self {
        GroupConfig {
            me,
            incarnation,
            servers,
            heartbeat_interval: Duration::from_millis(100),
            failure_timeout: Duration::from_millis(1000),
            link_confirm: Duration::from_millis(300),
            flush_timeout: Duration::from_millis(1000),
            unordered_max: 1 << 20,
            log_len_max: 1 << 20,
            log_bytes_max: 64 << 20,
            publishers_max: 100_000,
            stream_seed: 0,
        }
    }

    fn quorum(&self) -> usize {
        self.servers.len() / 2 + 1
    }
}

/// What the group tells its server, in stream order.
#[derive(Clone, Debug)]
pub enum Event {
    /// Stable messages, contiguous after the last delivered seq.
    Deliver(Vec<Ordered>),
    /// Messages this server now holds, ordered but not yet stable,
    /// contiguous after the last held one (what weak delivery sends). The
    /// same messages come again in `Deliver` once stable, unless an
    /// `Unheld` or `Reset` takes them back first.
    Held(Vec<Ordered>),
    /// A view change dropped the held messages after `after` (they were
    /// never stable); `Held` events carry what the new view orders there.
    Unheld {
        /// The last held seq kept.
        after: Seq,
    },
    /// A view was installed after `at`, the last seq of the old view.
    View {
        /// The view.
        view: View,
        /// The last seq delivered before it.
        at: Seq,
    },
    /// Build a snapshot of the delivered state (through the last delivered
    /// seq) and pass it to [`Group::send_snapshot`] for `to`, at once.
    SnapshotNeeded {
        /// The lagging member.
        to: NodeId,
    },
    /// Replace all delivered state with this snapshot; the stream continues
    /// after its head.
    Reset(Snapshot),
    /// This server is not in a primary view: it orders nothing, and its
    /// clients should move. Cleared by the next `View`.
    NotPrimary,
    /// A retry submitted here was delivered earlier, as the sequencer said,
    /// though this server's table had forgotten its publisher: the
    /// publisher is acknowledged through `pub_seq` (at `seq`).
    Retried {
        /// The publisher.
        publisher: PublisherId,
        /// The last pub_seq of it delivered.
        pub_seq: PubSeq,
        /// The seq of that publish.
        seq: Seq,
    },
}

/// Where this server stands in membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not in any view; looking for the primary or for peers to form one.
    Joining,
    /// In an installed view, ordering.
    Normal,
    /// Promised a proposal; ordering stopped until a view is installed.
    Flushing,
    /// Holds a new view's history; waits for its proposer to commit it
    /// (a majority of the configured servers hold it too).
    Accepted,
}

/// What this server knows of another configured server.
#[derive(Clone, Copy, Debug, Default)]
struct Peer {
    /// When anything was last heard from it.
    heard: Option<Duration>,
    /// The incarnation it last spoke as.
    incarnation: Incarnation,
    /// The view whose state it last said it holds.
    view: Option<ViewId>,
    /// Whether it last said it is joining.
    joining: bool,
    /// The epoch of the proposal it last said it promised.
    promised: u64,
    /// A broken link was reported at this time and nothing heard since.
    link_down: Option<Duration>,
    /// It failed to answer a proposal; not counted alive until then.
    excluded_until: Option<Duration>,
    /// Its last heartbeat said it hears this server.
    hears_me: bool,
}

/// The deduplication state of one publisher.
#[derive(Clone, Copy, Debug)]
struct PubState {
    /// The last pub_seq held in the log or delivered.
    held: PubSeq,
    /// The last pub_seq delivered.
    delivered: PubSeq,
    /// The seq of its latest held message (for eviction by age).
    seq: Seq,
    /// Made after the table forgot publishers: it may have been made by an
    /// old retry of a forgotten publisher, so a later pub_seq that skips
    /// past it is no proof of a lost predecessor (waiting for one would
    /// wait for good). Submissions are numbered per member, so a lost
    /// predecessor is caught there instead.
    revived: bool,
}

/// A view change this server proposed.
#[derive(Debug)]
struct Proposal {
    id: ViewId,
    members: Vec<Member>,
    oks: BTreeMap<NodeId, FlushOk>,
}

/// A lagging member's `NewView`, kept until its snapshot arrives.
#[derive(Debug)]
struct Stash {
    view: View,
    through: Seq,
    first: Seq,
    msgs: Vec<Msg>,
}

/// A member's answer to a proposal.
#[derive(Clone, Debug)]
struct FlushOk {
    from: Member,
    view: Option<ViewId>,
    /// The last view it accepted, from its hard state (held or not).
    accepted: Option<View>,
    /// The last view it installed, from its hard state.
    installed: ViewId,
    delivered: Seq,
    msgs: Vec<Msg>,
}

impl FlushOk {
    fn held(&self) -> Seq {
        Seq(self.delivered.0.saturating_add(self.msgs.len() as u64))
    }
}

/// Deliberate protocol bugs for tests proving the simulator's checkers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GroupBugs {
    /// Install new views without the flush: old-view messages that are not
    /// yet stable everywhere are not made stable first.
    pub skip_flush: bool,
    /// A sequencer that gives a fresh seq to every submission, retries too.
    pub no_dedup: bool,
    /// Deliver on ordering, before stability.
    pub deliver_unstable: bool,
    /// Drop held messages at a view change without saying so (`Unheld`).
    pub silent_unhold: bool,
    /// Count a peer alive on its heartbeats alone, whether or not it hears
    /// this server (a deaf server is proposed into every view).
    pub ignore_deafness: bool,
    /// Decide which history a view carries on by the rule before hard
    /// state: a majority holding state, or a majority holding no message
    /// (a "cold start", which a restart looked like).
    pub cold_start_without_state: bool,
    /// Forget the promise on a restart (view ids are reused).
    pub forget_promises: bool,
    /// Drop own submissions on a rejoin.
    pub clear_queue_on_rejoin: bool,
    /// Order a `Submit` that follows a lost one.
    pub order_past_lost_submit: bool,
}

impl GroupBugs {
    /// Whether any bug is on.
    fn any(&self) -> bool {
        let GroupBugs {
            skip_flush,
            no_dedup,
            deliver_unstable,
            silent_unhold,
            ignore_deafness,
            cold_start_without_state,
            forget_promises,
            clear_queue_on_rejoin,
            order_past_lost_submit,
        } = *self;
        skip_flush
            || no_dedup
            || deliver_unstable
            || silent_unhold
            || ignore_deafness
            || cold_start_without_state
            || forget_promises
            || clear_queue_on_rejoin
            || order_past_lost_submit
    }
}

/// Counters since start, for operators and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Views installed here.
    pub views: u64,
    /// Messages this server ordered as sequencer.
    pub ordered: u64,
    /// Submissions dropped as retries by the sequencer.
    pub duplicates: u64,
    /// Submissions sent again after a view change or a broken link.
    pub resubmitted: u64,
}

/// One core server's membership and ordering state machine. See the module
/// docs for the protocol and how to drive it.
pub struct Group {
    config: GroupConfig,
    /// MBRSHIP's state (`mbrship/`).
    mbr: Membership,
    /// TOTAL's state (`total/`).
    total: Total,
    events: VecDeque<Event>,
    transmits: VecDeque<(NodeId, Bytes)>,
    stats: GroupStats,
    pub(crate) bugs: GroupBugs,
}

impl Group {
    /// A server that starts without a hard state: its first start, or a
    /// start after its data directory was lost (a new server as far as the
    /// group knows; it is not a voter until it accepts a view).
    pub fn new(now: Duration, config: GroupConfig) -> Self {
        Self::recover(now, config, None)
    }

    /// A server that starts with the hard state it wrote before (a
    /// restart): it runs as a higher incarnation, never promises below what
    /// it promised, and knows the last view it accepted, though it holds
    /// none of its messages. The new hard state is ready at once
    /// ([`Group::poll_hard_state`]).
    pub fn recover(now: Duration, config: GroupConfig, hard: Option<HardState>) -> Self {
        let hard = hard.unwrap_or_default();
        Group {
            mbr: Membership::new(now, &config, hard),
            total: Total::new(now),
            config,
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            stats: GroupStats::default(),
            bugs: GroupBugs::default(),
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> GroupStats {
        self.stats
    }

    /// The next event for the server, in stream order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next frame to send, with its destination.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Bytes)> {
        self.transmits.pop_front()
    }

    /// A decoded message arrived from `from`.
    pub fn handle_msg(&mut self, now: Duration, from: NodeId, msg: PeerMsg) {
        if !self.heard_from(now, from) {
            tracing::debug!(node = %from, "message from an unconfigured server ignored");
            return;
        }
        match msg {
            PeerMsg::Heartbeat(hb) => self.on_heartbeat(now, hb),
            PeerMsg::Submit {
                view,
                front,
                first,
                msgs,
            } => self.on_submit(from, view, front, first, msgs),
            PeerMsg::Order {
                view,
                first,
                msgs,
                stable,
            } => self.on_order(from, view, first, msgs, stable),
            PeerMsg::Ack { view, have } => self.on_ack(from, view, have),
            PeerMsg::Stable { view, through } => self.on_stable(now, view, through),
            PeerMsg::Resend { view, after } => self.on_resend(from, view, after),
            PeerMsg::Retried {
                view,
                publisher,
                pub_seq,
                seq,
            } => self.on_retried(view, publisher, pub_seq, seq),
            PeerMsg::FlushReq { proposal, members } => {
                self.on_flush_req(now, from, proposal, members)
            }
            PeerMsg::FlushOk {
                proposal,
                from: member,
                view,
                accepted,
                installed,
                delivered,
                msgs,
            } => self.on_flush_ok(
                now,
                proposal,
                FlushOk {
                    from: member,
                    view,
                    accepted,
                    installed,
                    delivered,
                    msgs,
                },
            ),
            PeerMsg::NewView {
                view,
                through,
                first,
                msgs,
                lagging,
            } => self.on_new_view(now, view, through, first, msgs, lagging),
            PeerMsg::Snapshot { view, state } => self.on_snapshot(now, view, state),
            PeerMsg::AcceptOk { view } => self.on_accept_ok(now, from, view),
        }
        self.announce_stable();
        self.check_invariants();
    }

    /// Debug builds: the invariants of the module docs hold (a broken
    /// build's deliberate bugs excepted).
    pub(super) fn check_invariants(&self) {
        if cfg!(debug_assertions) && !self.bugs.any() {
            self.mbr.check_invariants();
            self.total.check_invariants();
        }
    }

    fn send(&mut self, to: NodeId, msg: &PeerMsg) {
        self.transmits.push_back((to, wire::encode(msg)));
    }
}
