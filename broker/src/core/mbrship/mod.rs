//! MBRSHIP, the bottom layer of the core group: heartbeats, failure
//! detection, view changes with a flush, joins and rejoins, and the hard
//! state that makes them restart-safe (docs/DESIGN.md, "Layers").
//!
//! MBRSHIP names nothing of the layer above it: what it needs of that
//! layer (what is held and delivered, for the flush; taking a new view's
//! history; the upcalls for views, resets, snapshots and "not primary";
//! sending its messages) is the [`Above`] trait, which TOTAL implements.
//! Its messages are in [`wire`]. This file holds the state, the failure
//! detector and rejoining; `flush` the view change itself.
//!
//! # Protocol in brief
//! - **Failure detection.** Every server heartbeats every other configured server.
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
//!   ([`Above::not_primary`]), and rejoins when it hears the primary.
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
//! - **Which history a view carries on** (`Membership::basis`): the state of the
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
//! - **What the layer above holds survives a rejoin** (TOTAL keeps its log
//!   and its own submissions; see `core::total`).
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
//! # Invariants
//! After every input (debug builds assert it,
//! [`Membership::check_invariants`]): a server in a view's `Normal` status
//! has that view; one awaiting a snapshot keeps the `NewView` it waits
//! with; no installed view is newer than the highest promise; a proposal
//! has its deadline, and only a proposal.

mod detector;
mod flush;
pub mod wire;

use crate::core::stream::{Msg, Ordered, Snapshot};
use crate::core::timers::Timers;
use canopy_client::protocol::Seq;
use flush::Proposal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;
use wire::{AcceptOk, FlushReq, Heartbeat, MbrMsg, NewView};

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
    /// Whether `m` is a member.
    pub fn has(&self, m: Member) -> bool {
        self.members.contains(&m)
    }
}

/// What a core server keeps on disk, as Raft keeps its term and vote. MBRSHIP
/// hands it out with [`Membership::poll_hard_state`] whenever it changes,
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

/// MBRSHIP's settings.
#[derive(Clone, Debug)]
pub struct MbrConfig {
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
    /// Mixed into the stream id of a newly formed core.
    pub stream_seed: u64,
}

impl MbrConfig {
    /// Settings for server `me` of `servers` with default timings.
    pub fn new(me: NodeId, incarnation: Incarnation, servers: Vec<NodeId>) -> Self {
        MbrConfig {
            me,
            incarnation,
            servers,
            heartbeat_interval: Duration::from_millis(100),
            failure_timeout: Duration::from_millis(1000),
            link_confirm: Duration::from_millis(300),
            flush_timeout: Duration::from_millis(1000),
            stream_seed: 0,
        }
    }

    /// A majority of the configured servers.
    fn quorum(&self) -> usize {
        self.servers.len() / 2 + 1
    }
}

/// MBRSHIP's deliberate protocol bugs, for tests proving the simulator's
/// checkers (`core::group::GroupBugs` sets them).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MbrBugs {
    /// Install new views without the flush: old-view messages that are not
    /// yet stable everywhere are not made stable first.
    pub skip_flush: bool,
    /// Count a peer alive on its heartbeats alone, whether or not it hears
    /// this server (a deaf server is proposed into every view).
    pub ignore_deafness: bool,
    /// Decide which history a view carries on by the rule before hard
    /// state: a majority holding state, or a majority holding no message
    /// (a "cold start", which a restart looked like).
    pub cold_start_without_state: bool,
    /// Forget the promise on a restart (view ids are reused).
    pub forget_promises: bool,
}

impl MbrBugs {
    /// Whether any bug is on.
    pub(crate) fn any(&self) -> bool {
        let MbrBugs {
            skip_flush,
            ignore_deafness,
            cold_start_without_state,
            forget_promises,
        } = *self;
        skip_flush || ignore_deafness || cold_start_without_state || forget_promises
    }
}

/// What MBRSHIP needs of the layer above it (TOTAL), in the few named calls
/// of a view change, a heartbeat and a rejoin. The calls that depend on the
/// view are given MBRSHIP's state to read.
pub(crate) trait Above {
    /// The last seq delivered.
    fn delivered(&self) -> Seq;
    /// The last seq held (ordered, maybe not yet stable).
    fn held(&self) -> Seq;
    /// The last seq known stable.
    fn stable(&self) -> Seq;
    /// The held messages after `from` (at least the last delivered seq).
    fn held_after(&self, from: Seq) -> Vec<Msg>;
    /// Holds `m`, the message after the last held one (a view's history).
    fn hold(&mut self, m: Ordered);
    /// Drops the held messages after `through`: never stable, not part of
    /// the new view's history.
    fn truncate(&mut self, through: Seq);
    /// Delivers what is held through `through` (a view's commit).
    fn deliver_through(&mut self, through: Seq);
    /// A new stream `stream` begins at seq 0: nothing held or delivered.
    fn new_stream(&mut self, stream: u64);
    /// Replaces everything delivered with `state`; `other_stream` if it is
    /// of another stream than what this server held.
    fn install(&mut self, state: Snapshot, other_stream: bool);
    /// A lagging member `to` needs a snapshot of the delivered state.
    fn snapshot_needed(&mut self, to: NodeId);
    /// `mbr`'s view was installed after `at`, the old view's last seq.
    fn view_installed(&mut self, mbr: &Membership, at: Seq);
    /// This server left its view (a rejoin).
    fn left_view(&mut self);
    /// This server is not in a primary view and its clients should move.
    fn not_primary(&mut self);
    /// The stable seq this server's heartbeat announces.
    fn heartbeat_stable(&self, mbr: &Membership) -> Seq;
    /// A member's heartbeat says it holds through `have` (for a
    /// coordinator: an acknowledgement).
    fn member_holds(&mut self, mbr: &Membership, from: NodeId, have: Seq);
    /// The coordinator's heartbeat: it holds through `have` and announces
    /// `stable`.
    fn coordinator_heartbeat(&mut self, mbr: &Membership, from: NodeId, have: Seq, stable: Seq);
    /// A heartbeat interval passed.
    fn heartbeat_tick(&mut self, mbr: &Membership, now: Duration);
    /// Sends one encoding of `msg` to each of `to`.
    fn send(&mut self, to: &[NodeId], msg: MbrMsg);
}

/// MBRSHIP's state: views, promises, peers, the flush under way.
pub(crate) struct Membership {
    config: MbrConfig,
    pub(crate) bugs: MbrBugs,
    incarnation: Incarnation,
    status: Status,
    /// The installed view (kept while flushing; `None` while joining).
    view: Option<View>,
    /// The highest proposal promised (or the installed view's id).
    promised: ViewId,
    /// The last view accepted, as the hard state keeps it (it outlives the
    /// messages: a restarted server remembers it without holding its state).
    accepted_view: Option<View>,
    /// The last view installed, as the hard state keeps it.
    installed: ViewId,
    /// The hard state changed since the shell last took it.
    hard_dirty: bool,
    /// The highest epoch seen anywhere.
    epoch_seen: u64,
    /// Told it lags; the coordinator's snapshot has not come yet.
    awaiting_snapshot: bool,
    /// The `NewView` that waits for the snapshot.
    stash: Option<NewView>,
    /// The stream this server's delivered seqs belong to (0: none yet).
    stream: u64,
    /// The view whose history this server's state comes from; kept across a
    /// rejoin, since what it delivered stays delivered.
    state_view: Option<ViewId>,
    /// The last seq of the accepted view's inherited history.
    accepted_through: Seq,
    /// Proposer: the members that hold the accepted view's history.
    accepted: BTreeSet<NodeId>,
    /// When the current non-normal stretch began (for `NotPrimary`).
    blocked_since: Option<Duration>,
    /// Whether `NotPrimary` was told for the current stretch.
    told_not_primary: bool,
    proposal: Option<Proposal>,
    peers: BTreeMap<NodeId, Peer>,
    timers: Timers<MbrTimer>,
    /// Views installed here.
    views: u64,
}

/// MBRSHIP's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MbrTimer {
    /// Heartbeats, and the check that own submissions progress.
    Heartbeat,
    /// A promise made without a following view times out.
    Promise,
    /// This server's own proposal did not complete in time: it is retried
    /// without the members that did not answer. Set exactly while there
    /// is a proposal.
    Proposal,
}

impl Membership {
    /// A server's membership state at start, from its hard state (the
    /// default when it has none).
    pub(crate) fn new(now: Duration, config: MbrConfig, hard: HardState) -> Self {
        let incarnation = Incarnation(
            config
                .incarnation
                .0
                .max(hard.incarnation.0.saturating_add(1)),
        );
        let peers = config
            .servers
            .iter()
            .filter(|&&n| n != config.me)
            .map(|&n| (n, Peer::default()))
            .collect();
        Membership {
            config,
            bugs: MbrBugs::default(),
            incarnation,
            status: Status::Joining,
            view: None,
            promised: hard.promised,
            accepted_view: hard.accepted,
            installed: hard.installed,
            hard_dirty: true,
            epoch_seen: hard.promised.epoch,
            awaiting_snapshot: false,
            stash: None,
            stream: 0,
            state_view: None,
            accepted_through: Seq(0),
            accepted: BTreeSet::new(),
            blocked_since: Some(now),
            told_not_primary: false,
            proposal: None,
            peers,
            timers: {
                let mut t = Timers::new();
                t.set(MbrTimer::Heartbeat, now);
                t
            },
            views: 0,
        }
    }

    /// Debug builds: the invariants of the module docs.
    pub(crate) fn check_invariants(&self) {
        if self.status == Status::Normal {
            debug_assert!(self.view.is_some(), "invariant: a Normal server has a view");
        }
        if self.awaiting_snapshot {
            debug_assert!(
                self.stash.is_some(),
                "invariant: a snapshot is awaited with its NewView"
            );
        }
        if let Some(v) = &self.view {
            debug_assert!(
                v.id <= self.promised,
                "invariant: no view newer than the highest promise"
            );
        }
        debug_assert_eq!(
            self.proposal.is_some(),
            self.timers.get(MbrTimer::Proposal).is_some(),
            "invariant: a proposal has its deadline, and only a proposal"
        );
    }

    /// Drops this server's own proposal, if any, with its deadline.
    fn end_proposal(&mut self) -> Option<Proposal> {
        self.timers.cancel(MbrTimer::Proposal);
        self.proposal.take()
    }

    /// This server as a member.
    pub(crate) fn me(&self) -> Member {
        Member {
            node: self.config.me,
            incarnation: self.incarnation,
        }
    }

    /// Where it stands in membership.
    pub(crate) fn status(&self) -> Status {
        self.status
    }

    /// The installed view, if any.
    pub(crate) fn view(&self) -> Option<&View> {
        self.view.as_ref()
    }

    /// The installed view's id.
    pub(crate) fn view_id(&self) -> Option<ViewId> {
        self.view.as_ref().map(|v| v.id)
    }

    /// The current view's coordinator (its sequencer).
    pub(crate) fn coordinator(&self) -> Option<NodeId> {
        self.view.as_ref().map(|v| v.id.coordinator)
    }

    /// Whether this server coordinates a working view.
    pub(crate) fn is_coordinator(&self) -> bool {
        self.status == Status::Normal && self.coordinator() == Some(self.config.me)
    }

    /// The other members of the view.
    pub(crate) fn others(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.view
            .iter()
            .flat_map(|v| &v.members)
            .map(|m| m.node)
            .filter(|&n| n != self.config.me)
    }

    /// The view whose state this server holds (`None`: it holds none, as
    /// after a restart).
    pub(crate) fn state_view(&self) -> Option<ViewId> {
        self.state_view
    }

    /// Whether this server waits for a snapshot (it orders nothing until
    /// then).
    pub(crate) fn awaiting_snapshot(&self) -> bool {
        self.awaiting_snapshot
    }

    /// Whether this server is in an installed view and ordering.
    pub(crate) fn is_primary(&self) -> bool {
        self.status == Status::Normal && !self.awaiting_snapshot
    }

    /// Its settings.
    pub(crate) fn config(&self) -> &MbrConfig {
        &self.config
    }

    /// Views installed here.
    pub(crate) fn views(&self) -> u64 {
        self.views
    }

    /// The hard state, when it changed since the last call. The shell must
    /// write it durably before it sends the next frame.
    pub(crate) fn poll_hard_state(&mut self) -> Option<HardState> {
        if !std::mem::take(&mut self.hard_dirty) {
            return None;
        }
        Some(self.hard_state())
    }

    /// The hard state as it stands.
    pub(crate) fn hard_state(&self) -> HardState {
        HardState {
            incarnation: self.incarnation,
            promised: match self.bugs.forget_promises {
                true => ViewId::default(),
                false => self.promised,
            },
            accepted: self.accepted_view.clone(),
            installed: self.installed,
        }
    }

    /// When `handle_timeout` should next be called.
    pub(crate) fn poll_timeout(&self) -> Option<Duration> {
        self.timers.next()
    }

    /// Notes that `from` was heard at `now`; `false` if it is not a
    /// configured server.
    pub(crate) fn heard_from(&mut self, now: Duration, from: NodeId) -> bool {
        let Some(peer) = self.peers.get_mut(&from) else {
            return false;
        };
        peer.heard = Some(now);
        peer.link_down = None;
        true
    }

    /// The link to or from `peer` broke: a hint that it may have failed.
    /// It is excluded only if it then stays silent for `link_confirm`.
    pub(crate) fn handle_link_down(&mut self, now: Duration, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.link_down.get_or_insert(now);
        }
    }

    /// The link to `peer` is (re)established: a proposal it has not
    /// answered may have been lost, so it is asked again.
    pub(crate) fn handle_link_up(&mut self, peer: NodeId, up: &mut impl Above) {
        let again = self
            .proposal
            .as_ref()
            .filter(|p| p.members.iter().any(|m| m.node == peer) && !p.oks.contains_key(&peer))
            .map(|p| FlushReq {
                proposal: p.id,
                members: p.members.clone(),
            });
        if let Some(req) = again {
            up.send(&[peer], MbrMsg::FlushReq(req));
        }
    }

    /// Time has reached `now`: heartbeats, failure detection, view change
    /// retries.
    pub(crate) fn handle_timeout(&mut self, now: Duration, up: &mut impl Above) {
        if self.timers.is_due(MbrTimer::Heartbeat, now) {
            self.timers
                .set(MbrTimer::Heartbeat, now + self.config.heartbeat_interval);
            self.send_heartbeats(now, up);
            up.heartbeat_tick(self, now);
        }
        self.evaluate(now, up);
    }

    fn send_heartbeats(&mut self, now: Duration, up: &mut impl Above) {
        let hears = self
            .peers
            .iter()
            .filter(|(_, p)| self.heard_recently(now, p))
            .map(|(&n, _)| n)
            .collect();
        let msg = MbrMsg::Heartbeat(Heartbeat {
            from: self.me(),
            joining: self.status == Status::Joining,
            view: self.state_view,
            epoch: self.promised.epoch,
            have: up.held(),
            stable: up.heartbeat_stable(self),
            hears,
        });
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        up.send(&peers, msg);
        // An acceptance (or the commit answering it) may have been lost.
        if self.status == Status::Accepted && self.coordinator() != Some(self.config.me) {
            if let Some(v) = self.view_id() {
                up.send(&[v.coordinator], MbrMsg::AcceptOk(AcceptOk { view: v }));
            }
        }
    }

    /// A `Stable` of the coordinator through `through`: the first one that
    /// covers an accepted view's history commits it.
    pub(crate) fn commit_if_accepted(&mut self, now: Duration, through: Seq, up: &mut impl Above) {
        if self.status == Status::Accepted && through >= self.accepted_through {
            self.commit(now, up);
        }
    }

    pub(crate) fn on_heartbeat(&mut self, now: Duration, hb: Heartbeat, up: &mut impl Above) {
        let Heartbeat {
            from,
            joining,
            view,
            epoch,
            have,
            stable,
            hears,
        } = hb;
        self.epoch_seen = self.epoch_seen.max(epoch);
        let me = self.config.me;
        if let Some(p) = self.peers.get_mut(&from.node) {
            p.incarnation = from.incarnation;
            p.view = view;
            p.joining = joining;
            p.promised = epoch;
            p.hears_me = hears.contains(&me);
        }
        let Some(mine) = self.view_id() else {
            return;
        };
        if let Some(theirs) = view {
            self.epoch_seen = self.epoch_seen.max(theirs.epoch);
            // A view newer than anything this server promised was installed
            // without it (or it missed the install): start over.
            if theirs > mine && theirs > self.promised {
                tracing::info!(me = %self.config.me, view = %theirs, mine = %mine, node = %from.node, "a newer view exists without this server; rejoining");
                return self.rejoin(now, up);
            }
        }
        if view != Some(mine) || self.status != Status::Normal {
            return;
        }
        let member = self.view.as_ref().is_some_and(|v| v.has(from));
        if !member {
            return;
        }
        if self.coordinator() == Some(self.config.me) {
            // Acknowledgements repeat in heartbeats, so a lost `Ack` costs
            // at most one interval.
            up.member_holds(self, from.node, have);
        } else if self.coordinator() == Some(from.node) {
            up.coordinator_heartbeat(self, from.node, have, stable);
        }
    }
}
