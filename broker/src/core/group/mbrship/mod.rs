//! MBRSHIP: heartbeats, failure detection, view changes with a flush, joins
//! and rejoins. See the parent module for the protocol in brief. This file
//! holds the state, the failure detector and rejoining; `flush` the view
//! change itself. TOTAL's state is changed only through `Total`'s named
//! calls.

use super::wire::{Heartbeat, Msg, PeerMsg, Snapshot};
use super::{
    Event, FlushOk, Group, GroupConfig, HardState, Incarnation, Member, NodeId, Peer, Proposal,
    Stash, Status, View, ViewId,
};
use crate::core::timers::Timers;
use canopy_client::protocol::Seq;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

mod flush;

/// MBRSHIP's state: views, promises, peers, the flush under way.
pub(super) struct Membership {
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
    stash: Option<Stash>,
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
    /// Debug builds: MBRSHIP's invariants (module docs of `group`).
    pub(super) fn check_invariants(&self) {
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
    pub(super) fn end_proposal(&mut self) -> Option<Proposal> {
        self.timers.cancel(MbrTimer::Proposal);
        self.proposal.take()
    }

    /// A server's membership state at start, from its hard state (the
    /// default when it has none).
    pub(super) fn new(now: Duration, config: &GroupConfig, hard: HardState) -> Self {
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
        }
    }
}

impl Group {
    pub(super) fn send_heartbeats(&mut self, now: Duration) {
        let hears = self
            .mbr
            .peers
            .iter()
            .filter(|(_, p)| self.heard_recently(now, p))
            .map(|(&n, _)| n)
            .collect();
        let msg = PeerMsg::Heartbeat(Heartbeat {
            from: self.me(),
            joining: self.mbr.status == Status::Joining,
            view: self.reported_view(),
            epoch: self.mbr.promised.epoch,
            have: self.held(),
            stable: self.stable_to_announce(),
            hears,
        });
        let frame = super::wire::encode(&msg);
        for &n in self.mbr.peers.keys() {
            self.transmits.push_back((n, frame.clone()));
        }
        // An acceptance (or the commit answering it) may have been lost.
        if self.mbr.status == Status::Accepted && self.coordinator() != Some(self.config.me) {
            if let Some(v) = self.mbr.view.as_ref().map(|v| v.id) {
                self.send(v.coordinator, &PeerMsg::AcceptOk { view: v });
            }
        }
    }

    /// The current view's coordinator (its sequencer).
    pub(super) fn coordinator(&self) -> Option<NodeId> {
        self.mbr.view.as_ref().map(|v| v.id.coordinator)
    }

    /// The installed view's id.
    pub(super) fn view_id(&self) -> Option<ViewId> {
        self.mbr.view.as_ref().map(|v| v.id)
    }

    /// Whether this server waits for a snapshot (it orders nothing until
    /// then).
    pub(super) fn awaiting_snapshot(&self) -> bool {
        self.mbr.awaiting_snapshot
    }

    /// A `Stable` of the coordinator through `through`: the first one that
    /// covers an accepted view's history commits it.
    pub(super) fn commit_if_accepted(&mut self, now: Duration, through: Seq) {
        if self.mbr.status == Status::Accepted && through >= self.mbr.accepted_through {
            self.commit(now);
        }
    }

    /// The view this server holds the state of, as it reports it.
    fn reported_view(&self) -> Option<ViewId> {
        self.mbr.state_view
    }

    pub(super) fn on_heartbeat(&mut self, now: Duration, hb: Heartbeat) {
        let Heartbeat {
            from,
            joining,
            view,
            epoch,
            have,
            stable,
            hears,
        } = hb;
        self.mbr.epoch_seen = self.mbr.epoch_seen.max(epoch);
        let me = self.config.me;
        if let Some(p) = self.mbr.peers.get_mut(&from.node) {
            p.incarnation = from.incarnation;
            p.view = view;
            p.joining = joining;
            p.promised = epoch;
            p.hears_me = hears.contains(&me);
        }
        let Some(mine) = self.mbr.view.as_ref().map(|v| v.id) else {
            return;
        };
        if let Some(theirs) = view {
            self.mbr.epoch_seen = self.mbr.epoch_seen.max(theirs.epoch);
            // A view newer than anything this server promised was installed
            // without it (or it missed the install): start over.
            if theirs > mine && theirs > self.mbr.promised {
                tracing::info!(me = %self.config.me, view = %theirs, mine = %mine, node = %from.node, "a newer view exists without this server; rejoining");
                return self.rejoin(now);
            }
        }
        if view != Some(mine) || self.mbr.status != Status::Normal {
            return;
        }
        let member = self.mbr.view.as_ref().is_some_and(|v| v.has(from));
        if !member {
            return;
        }
        if self.coordinator() == Some(self.config.me) {
            // Acknowledgements repeat in heartbeats, so a lost `Ack` costs
            // at most one interval.
            self.on_ack(from.node, mine, have);
        } else if self.coordinator() == Some(from.node) {
            self.coordinator_heartbeat(from.node, mine, have, stable);
        }
    }

    /// Whether `p` was heard within a failure timeout (what this server's
    /// heartbeats report as `hears`).
    fn heard_recently(&self, now: Duration, p: &super::Peer) -> bool {
        p.heard
            .is_some_and(|h| now.saturating_sub(h) < self.config.failure_timeout)
    }

    /// Whether `node` counts as alive now: heard recently, its link not
    /// confirmed broken, and it hears this server (a server that cannot
    /// hear the others would stall every flush it is proposed into, and
    /// every stable seq of a view it is in).
    fn alive(&self, now: Duration, node: NodeId) -> bool {
        if node == self.config.me {
            return true;
        }
        let Some(p) = self.mbr.peers.get(&node) else {
            return false;
        };
        if p.excluded_until.is_some_and(|t| now < t) || !(p.hears_me || self.bugs.ignore_deafness) {
            return false;
        }
        let Some(heard) = p.heard else { return false };
        if now.saturating_sub(heard) >= self.config.failure_timeout {
            return false;
        }
        !p.link_down
            .is_some_and(|t| t >= heard && now.saturating_sub(t) >= self.config.link_confirm)
    }

    /// Failure detection and view-change decisions; called on every timeout.
    pub(super) fn evaluate(&mut self, now: Duration) {
        self.tell_not_primary(now);
        if let Some(p) = &self.mbr.proposal {
            if !self.mbr.timers.is_due(MbrTimer::Proposal, now) {
                return;
            }
            // The proposal did not complete: some proposed member did not
            // answer. Try again without the silent ones.
            let answered: Vec<NodeId> = p.oks.keys().copied().collect();
            tracing::debug!(me = %self.config.me, proposal = %p.id, ?answered, "view change timed out; retrying");
            let backoff = now + self.config.failure_timeout * 2;
            for m in p.members.clone() {
                if !answered.contains(&m.node) {
                    if let Some(peer) = self.mbr.peers.get_mut(&m.node) {
                        // It can send (we hear its heartbeats) but not
                        // answer: a one-way partition, or it promised a
                        // competing proposal. Leave it out for a while
                        // rather than block every view on it. (It is still
                        // reported heard: it is, and saying otherwise would
                        // make it count this server dead in turn.)
                        peer.excluded_until = Some(backoff);
                    }
                }
            }
            self.mbr.end_proposal();
        }
        if self.mbr.timers.is_due(MbrTimer::Promise, now) {
            let promised = self.mbr.promised;
            if self.mbr.status == Status::Flushing
                && self.mbr.peers.values().any(|p| p.view >= Some(promised))
            {
                // The view we promised (or a later one) went on without
                // this server taking its history: join it afresh.
                return self.rejoin(now);
            }
            // The proposal went nowhere. If its proposer still heartbeats
            // and hears us, it retries by itself (its own deadline); if not,
            // it no longer counts alive and the lowest survivor proposes.
            // (Counting a live proposer dead here would drop it from this
            // server's `hears`, and it would count this server dead in turn.)
            self.mbr.timers.cancel(MbrTimer::Promise);
        }
        if self.mbr.timers.get(MbrTimer::Promise).is_some() {
            return;
        }
        if self.mbr.awaiting_snapshot
            && self
                .mbr
                .blocked_since
                .is_some_and(|t| now.saturating_sub(t) >= self.config.flush_timeout)
        {
            // The snapshot was lost with a link: start over.
            return self.rejoin(now);
        }
        // Live servers that are not in our view and hold no newer one:
        // restarted (no view) or stale (an older view they were dropped
        // from). Both join with a snapshot.
        let mine = self.mbr.view.as_ref().map(|v| v.id);
        let joiners: Vec<Member> = self
            .mbr
            .peers
            .iter()
            .filter(|(&n, p)| (p.joining || p.view < mine) && self.alive(now, n))
            .map(|(&node, p)| Member {
                node,
                incarnation: p.incarnation,
            })
            .collect();
        match (&self.mbr.view, self.mbr.status) {
            (Some(view), Status::Normal | Status::Flushing | Status::Accepted) => {
                let survivors: Vec<Member> =
                    view.members
                        .iter()
                        .copied()
                        .filter(|m| {
                            m.node == self.config.me
                                || (self.alive(now, m.node)
                                    && self.mbr.peers.get(&m.node).is_some_and(|p| {
                                        p.incarnation == m.incarnation && !p.joining
                                    }))
                        })
                        .collect();
                // A member that promised a proposal that went nowhere waits
                // for a view change; the lowest survivor gives it one.
                let stuck = survivors.iter().any(|m| {
                    self.mbr
                        .peers
                        .get(&m.node)
                        .is_some_and(|p| p.promised > view.id.epoch)
                });
                let changed = self.mbr.status != Status::Normal
                    || stuck
                    || survivors.len() != view.members.len()
                    || joiners.iter().any(|j| !view.has(*j));
                let lowest = survivors.iter().map(|m| m.node).min();
                if changed && lowest == Some(self.config.me) {
                    let mut members = survivors;
                    for j in joiners {
                        if !members.contains(&j) {
                            members.push(j);
                        }
                    }
                    self.propose(now, members);
                }
            }
            (None, _) => {
                // Joining, and no live server is in a view (else its
                // coordinator takes us in): when a majority is joining, the
                // lowest of those holding the newest state proposes. (All
                // restarted at once, nobody holds any: a new stream begins.)
                let any_view = self
                    .mbr
                    .peers
                    .iter()
                    .any(|(&n, p)| !p.joining && self.alive(now, n));
                let newest = joiners
                    .iter()
                    .filter_map(|j| self.mbr.peers.get(&j.node).and_then(|p| p.view))
                    .max()
                    .max(self.mbr.state_view);
                let leader = joiners
                    .iter()
                    .filter(|j| {
                        self.mbr
                            .peers
                            .get(&j.node)
                            .is_some_and(|p| p.view == newest)
                    })
                    .map(|j| j.node)
                    .chain((self.mbr.state_view == newest).then_some(self.config.me))
                    .min();
                let mut members = joiners;
                members.push(self.me());
                // Without anyone's state, a view forms only with every
                // configured server (a first formation, or a new stream
                // after all lost their messages; see `basis`): proposing
                // with fewer only costs a flush timeout.
                let enough = match newest {
                    None if !self.bugs.cold_start_without_state => self.config.servers.len(),
                    _ => self.config.quorum(),
                };
                if !any_view && members.len() >= enough && leader == Some(self.config.me) {
                    self.propose(now, members);
                }
            }
            (Some(_), Status::Joining) => {}
        }
    }

    /// Leaves whatever view this server was in and joins again as a new
    /// incarnation.
    pub(super) fn rejoin(&mut self, now: Duration) {
        self.mbr.incarnation = Incarnation(self.mbr.incarnation.0.saturating_add(1));
        self.mbr.hard_dirty = true;
        self.mbr.status = Status::Joining;
        self.mbr.view = None;
        self.mbr.end_proposal();
        self.mbr.timers.cancel(MbrTimer::Promise);
        self.mbr.awaiting_snapshot = false;
        self.mbr.stash = None;
        self.mbr.accepted.clear();
        // The log stays: what it holds may be stable elsewhere, and this
        // server still reports the state of its last view, log included.
        // So do own submissions: the server's own membership events are
        // submitted once and must not be lost (a missing pub_seq would hold
        // back every later one), and a client's are deduplicated by the
        // sequencer if the client also sends them elsewhere.
        self.total.leave_view(self.bugs.clear_queue_on_rejoin);
        self.mbr.blocked_since = Some(now);
        if !self.mbr.told_not_primary {
            self.mbr.told_not_primary = true;
            self.events.push_back(Event::NotPrimary);
        }
    }

    /// Tells the server it is not primary when it has been without a
    /// working view for a failure timeout (joining, blocked in a view
    /// change, or waiting for its snapshot).
    fn tell_not_primary(&mut self, now: Duration) {
        if self.mbr.told_not_primary {
            return;
        }
        let Some(since) = self.mbr.blocked_since else {
            return;
        };
        if now.saturating_sub(since) >= self.config.failure_timeout {
            self.mbr.told_not_primary = true;
            self.events.push_back(Event::NotPrimary);
        }
    }
}

/// MBRSHIP's part of the group's interface: who this server is, its view
/// and hard state, its peers and timers.
impl Group {
    /// This server as a member.
    pub fn me(&self) -> Member {
        Member {
            node: self.config.me,
            incarnation: self.mbr.incarnation,
        }
    }

    /// Where it stands in membership.
    pub fn status(&self) -> Status {
        self.mbr.status
    }

    /// The installed view, if any.
    pub fn view(&self) -> Option<&View> {
        self.mbr.view.as_ref()
    }

    /// The view whose state this server holds (`None`: it holds none, as
    /// after a restart).
    pub fn state_view(&self) -> Option<ViewId> {
        self.mbr.state_view
    }

    /// Whether this server is in an installed view and ordering.
    pub fn is_primary(&self) -> bool {
        self.mbr.status == Status::Normal && !self.mbr.awaiting_snapshot
    }

    /// The hard state, when it changed since the last call. The shell must
    /// write it durably before it sends the next frame from
    /// [`Group::poll_transmit`].
    pub fn poll_hard_state(&mut self) -> Option<HardState> {
        if !std::mem::take(&mut self.mbr.hard_dirty) {
            return None;
        }
        Some(self.hard_state())
    }

    /// The hard state as it stands.
    pub fn hard_state(&self) -> HardState {
        HardState {
            incarnation: self.mbr.incarnation,
            promised: match self.bugs.forget_promises {
                true => ViewId::default(),
                false => self.mbr.promised,
            },
            accepted: self.mbr.accepted_view.clone(),
            installed: self.mbr.installed,
        }
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.mbr.timers.next()
    }

    /// The link to or from `peer` broke: a hint that it may have failed.
    /// It is excluded only if it then stays silent for `link_confirm`.
    pub fn handle_link_down(&mut self, now: Duration, peer: NodeId) {
        if let Some(p) = self.mbr.peers.get_mut(&peer) {
            p.link_down.get_or_insert(now);
        }
    }

    /// The link to `peer` is (re)established. What was sent on the old link
    /// may be lost: submissions to it are sent again.
    pub fn handle_link_up(&mut self, _now: Duration, peer: NodeId) {
        if self.coordinator() == Some(peer) && self.is_primary() {
            self.resubmit();
        }
        // A proposal it has not answered may have been lost: ask again.
        let again = self
            .mbr
            .proposal
            .as_ref()
            .filter(|p| p.members.iter().any(|m| m.node == peer) && !p.oks.contains_key(&peer))
            .map(|p| PeerMsg::FlushReq {
                proposal: p.id,
                members: p.members.clone(),
            });
        if let Some(req) = again {
            self.send(peer, &req);
        }
    }

    /// Time has reached `now`: heartbeats, failure detection, view change
    /// retries.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.mbr.timers.is_due(MbrTimer::Heartbeat, now) {
            self.mbr
                .timers
                .set(MbrTimer::Heartbeat, now + self.config.heartbeat_interval);
            self.send_heartbeats(now);
            self.check_progress(now);
        }
        self.evaluate(now);
        self.announce_stable();
        self.check_invariants();
    }

    /// Sends one encoding of `msg` to every member of the view but this one.
    pub(super) fn send_members(&mut self, msg: &PeerMsg) {
        let Some(view) = &self.mbr.view else { return };
        let frame = super::wire::encode(msg);
        for m in &view.members {
            if m.node != self.config.me {
                self.transmits.push_back((m.node, frame.clone()));
            }
        }
    }

    /// Notes that `from` was heard at `now`; `false` if it is not a
    /// configured server.
    pub(super) fn heard_from(&mut self, now: Duration, from: NodeId) -> bool {
        let Some(peer) = self.mbr.peers.get_mut(&from) else {
            return false;
        };
        peer.heard = Some(now);
        peer.link_down = None;
        true
    }
}
