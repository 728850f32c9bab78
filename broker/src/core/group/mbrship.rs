//! MBRSHIP: heartbeats, failure detection, view changes with a flush, joins
//! and rejoins. See the parent module for the protocol in brief.

use super::wire::{Heartbeat, Msg, PeerMsg, Snapshot};
use super::{
    Event, FlushOk, Group, GroupConfig, HardState, Incarnation, Member, NodeId, Peer, Proposal,
    Stash, Status, View, ViewId,
};
use canopy_client::protocol::Seq;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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
    /// When a promise made without a following view times out.
    promise_deadline: Option<Duration>,
    proposal: Option<Proposal>,
    peers: BTreeMap<NodeId, Peer>,
    heartbeat_next: Duration,
}

impl Membership {
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
            promise_deadline: None,
            proposal: None,
            peers,
            heartbeat_next: now,
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
            if now < p.deadline {
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
            self.mbr.proposal = None;
        }
        if self.mbr.promise_deadline.is_some_and(|d| now >= d) {
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
            self.mbr.promise_deadline = None;
        }
        if self.mbr.promise_deadline.is_some() {
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

    /// Starts a view change towards `members` (this server among them).
    fn propose(&mut self, now: Duration, mut members: Vec<Member>) {
        members.sort();
        members.dedup_by_key(|m| m.node);
        let id = ViewId {
            epoch: self.mbr.epoch_seen.max(self.mbr.promised.epoch) + 1,
            coordinator: self.config.me,
        };
        self.mbr.epoch_seen = id.epoch;
        tracing::debug!(me = %self.config.me, proposal = %id, members = ?members.iter().map(|m| m.node.0).collect::<Vec<_>>(), "proposing a view");
        self.promise(now, id);
        let mut oks = BTreeMap::new();
        oks.insert(self.config.me, self.flush_ok());
        let req = PeerMsg::FlushReq {
            proposal: id,
            members: members.clone(),
        };
        for m in &members {
            if m.node != self.config.me {
                self.send(m.node, &req);
            }
        }
        self.mbr.proposal = Some(Proposal {
            id,
            members,
            oks,
            deadline: now + self.config.flush_timeout,
        });
        self.mbr.promise_deadline = None;
        self.try_install(now);
    }

    /// Promises proposal `id`: ordering in the old view stops here.
    fn promise(&mut self, now: Duration, id: ViewId) {
        self.mbr.promised = id;
        self.mbr.hard_dirty = true;
        // A snapshot awaited for an older proposal will not matter now.
        self.mbr.awaiting_snapshot = false;
        self.mbr.stash = None;
        if matches!(self.mbr.status, Status::Normal | Status::Accepted) {
            self.mbr.status = Status::Flushing;
        }
        self.mbr.blocked_since.get_or_insert(now);
        self.mbr.promise_deadline = Some(now + self.config.flush_timeout);
    }

    fn flush_ok(&self) -> FlushOk {
        FlushOk {
            from: self.me(),
            view: self.reported_view(),
            accepted: self.mbr.accepted_view.clone(),
            installed: self.mbr.installed,
            delivered: self.total.delivered(),
            msgs: if self.reported_view().is_some() {
                self.total.held_after(self.total.delivered())
            } else {
                Vec::new()
            },
        }
    }

    pub(super) fn on_flush_req(
        &mut self,
        now: Duration,
        from: NodeId,
        proposal: ViewId,
        members: Vec<Member>,
    ) {
        self.mbr.epoch_seen = self.mbr.epoch_seen.max(proposal.epoch);
        if proposal.coordinator != from || !members.contains(&self.me()) {
            return;
        }
        if proposal < self.mbr.promised {
            return;
        }
        if proposal > self.mbr.promised {
            if self.mbr.proposal.take().is_some() {
                tracing::debug!(me = %self.config.me, proposal = %proposal, "a higher proposal overrides ours");
            }
            self.promise(now, proposal);
        }
        let ok = self.flush_ok();
        let msg = PeerMsg::FlushOk {
            proposal,
            from: ok.from,
            view: ok.view,
            accepted: ok.accepted,
            installed: ok.installed,
            delivered: ok.delivered,
            msgs: ok.msgs,
        };
        self.send(from, &msg);
    }

    pub(super) fn on_flush_ok(&mut self, now: Duration, proposal: ViewId, ok: FlushOk) {
        let Some(p) = &mut self.mbr.proposal else {
            return;
        };
        if p.id != proposal || !p.members.contains(&ok.from) {
            return;
        }
        if ok.view > self.mbr.state_view && self.mbr.status != Status::Joining {
            // Someone holds a newer view's state than ours: we are stale.
            return self.rejoin(now);
        }
        p.oks.insert(ok.from.node, ok);
        self.try_install(now);
    }

    /// Moves the proposal on once every proposed member answered: the
    /// proposer takes the new view's history and sends it (`NewView`).
    fn try_install(&mut self, now: Duration) {
        let Some(p) = &self.mbr.proposal else { return };
        if p.oks.len() < p.members.len() {
            return;
        }
        let Some(p) = self.mbr.proposal.take() else {
            return;
        };
        let basis = match self.basis(&p) {
            Ok(basis) => basis,
            Err(why) => {
                tracing::debug!(me = %self.config.me, proposal = %p.id, why, answered = ?p.oks.values().map(|o| (o.from.node.0, o.view, o.accepted.as_ref().map(|v| v.id))).collect::<Vec<_>>(), "no history to continue: not primary");
                self.mbr.proposal = Some(p);
                return;
            }
        };
        if basis.is_some() && basis != self.reported_view() {
            // Only a holder of the newest state can carry the stream on.
            if self.mbr.status == Status::Joining {
                return;
            }
            return self.rejoin(now);
        }
        // The authority: members holding the newest view's state. Their
        // held ranges overlap (each holds through every seq any of them saw
        // stable), so the highest of them holds everything any of them
        // delivered and everything that may be stable.
        let best = p
            .oks
            .values()
            .filter(|o| basis.is_some() && o.view == basis)
            .max_by_key(|o| o.held())
            .cloned();
        let through = best.as_ref().map_or(self.total.delivered(), FlushOk::held);
        let stream = match basis {
            Some(_) => self.mbr.stream,
            None => {
                // The lineage: a stream that replaces a lost one gets an id
                // of its own (the proposal's id is never reused).
                let lost = p
                    .oks
                    .values()
                    .filter_map(|o| o.accepted.as_ref())
                    .map(|v| v.stream)
                    .max();
                fresh_stream(
                    self.config.stream_seed ^ lost.unwrap_or(0),
                    p.id,
                    self.mbr.incarnation,
                )
            }
        };
        let view = View {
            id: p.id,
            members: p.members.clone(),
            stream,
        };
        if basis.is_none() {
            // No history to continue: a new stream begins at seq 0, and
            // clients that resume from an old one are told so.
            let stream_hex = format!("{stream:x}");
            match p.oks.values().any(|o| o.accepted.is_some()) {
                // Servers had a stream: its messages are gone.
                true => {
                    tracing::warn!(me = %self.config.me, proposal = %p.id, stream = stream_hex, "every holder of the stream lost its messages: starting a new stream")
                }
                false => {
                    tracing::info!(me = %self.config.me, proposal = %p.id, stream = stream_hex, "first formation: starting the stream")
                }
            }
            self.total.begin_stream();
            self.mbr.stream = stream;
            self.drop_old_stream_submissions();
            self.events.push_back(Event::Reset(Snapshot {
                stream,
                // Nobody's membership carries over to a new stream.
                members: Some(canopy_client::protocol::MembersHead::default()),
                ..Snapshot::default()
            }));
        }
        let through = if self.bugs.skip_flush {
            self.total.stable().max(self.total.delivered())
        } else {
            if let Some(best) = &best {
                let held = self.held();
                for (i, m) in best.msgs.iter().enumerate() {
                    let seq = Seq(best.delivered.0 + 1 + i as u64);
                    if seq > held {
                        self.hold(m.clone().ordered(seq));
                    }
                }
            }
            through
        };
        self.truncate(through);
        // Each member gets what it lacks up to `through`. A lagging member
        // (no state of the newest view) gets a snapshot of what this server
        // delivered, then everything after it.
        let mut lagging = Vec::new();
        for ok in p.oks.values() {
            if ok.from.node == self.config.me {
                continue;
            }
            let is_lagging = ok.view != basis || basis.is_none();
            let from = if is_lagging {
                lagging.push(ok.from.node);
                self.total.delivered()
            } else {
                ok.held().max(self.total.delivered())
            };
            let msgs = self.total.held_after(from);
            let msg = PeerMsg::NewView {
                view: view.clone(),
                through,
                first: from.next(),
                msgs,
                lagging: is_lagging,
            };
            self.send(ok.from.node, &msg);
        }
        for to in lagging {
            self.events.push_back(Event::SnapshotNeeded { to });
        }
        self.accept(now, view, through);
        self.mbr.accepted.insert(self.config.me);
        self.try_commit(now);
    }

    /// Which state a proposal whose members all answered carries on: the
    /// state of view `Some(v)`, held by an answer, or none, and a new stream
    /// begins (`None`). `Err` says why no view may form from these answers.
    ///
    /// The rules (the module docs, "Restart safety"):
    /// - **Voters.** A server's promises count only if it remembers all of
    ///   them: it has accepted a view since its data directory was made
    ///   (its hard state holds `accepted`). A restarted server remembers its
    ///   promises and the views it accepted and installed, but holds none
    ///   of their messages: it never counts as holding state.
    /// - **Carry on from the newest accepted view** when a majority of the
    ///   configured servers answered as voters and one of them holds the
    ///   state of the highest view any of them accepted. Every committed
    ///   view was accepted by a majority, which shares a voter with these
    ///   answers, so no view newer than that one ever delivered anything.
    /// - **With every configured server's answer**: if none holds any
    ///   message, a **new stream** begins (the first formation, or every
    ///   server lost its messages; clients are told `StreamReset`, and seqs
    ///   are never reused under the old id). If all are voters, the newest
    ///   view installed anywhere is known: carry on from the newest state
    ///   held if it is at least that view; if nobody holds that much, every
    ///   member of the newest installed view lost its messages: a new
    ///   stream.
    /// - Otherwise a server that did not answer (or lost its data
    ///   directory, and with it its records) may hold or know of newer
    ///   state, with acknowledged publishes in it: wait.
    fn basis(&self, p: &Proposal) -> Result<Option<ViewId>, &'static str> {
        let voters = p.oks.values().filter(|o| o.accepted.is_some()).count();
        let newest = p
            .oks
            .values()
            .filter_map(|o| o.accepted.as_ref().map(|v| v.id))
            .max();
        if let Some(k) = newest {
            if voters >= self.config.quorum() && p.oks.values().any(|o| o.view == Some(k)) {
                return Ok(Some(k));
            }
        }
        if self.bugs.cold_start_without_state {
            // The rule before hard state: a majority that holds state, or
            // a majority that holds no message at all (a "cold start").
            let holders = p.oks.values().filter(|o| o.view.is_some()).count();
            let cold = p.oks.values().all(|o| o.held() == Seq(0));
            if holders < self.config.quorum() && !(cold && p.oks.len() >= self.config.quorum()) {
                return Err("no majority holds state");
            }
            return Ok(p.oks.values().filter_map(|o| o.view).max());
        }
        if !self.config.servers.iter().all(|n| p.oks.contains_key(n)) {
            return Err("no majority of voters holds the newest view's state, and not every configured server answered");
        }
        let Some(held) = p.oks.values().filter_map(|o| o.view).max() else {
            // Every server answered and none holds any message: whatever
            // was installed last, its messages are gone.
            return Ok(None);
        };
        if voters != p.oks.len() {
            return Err("a server without its data directory may have lost the record of the newest installed view");
        }
        let installed = p
            .oks
            .values()
            .map(|o| o.installed)
            .max()
            .unwrap_or_default();
        match held >= installed {
            true => Ok(Some(held)),
            false => Ok(None),
        }
    }

    /// Drops held messages after `through`: never stable, never delivered,
    /// and not part of the new view's history.
    fn truncate(&mut self, through: Seq) {
        if self.held() <= through {
            return;
        }
        if !self.bugs.silent_unhold {
            self.events.push_back(Event::Unheld { after: through });
        }
        self.total.truncate(through);
    }

    /// This server holds `view`'s history through `through` and waits for
    /// the commit. From now on it reports `view` as the state it holds.
    fn accept(&mut self, now: Duration, view: View, through: Seq) {
        self.mbr.promised = view.id;
        self.mbr.accepted_view = Some(view.clone());
        self.mbr.hard_dirty = true;
        self.mbr.epoch_seen = self.mbr.epoch_seen.max(view.id.epoch);
        self.mbr.status = Status::Accepted;
        self.mbr.awaiting_snapshot = false;
        self.mbr.stash = None;
        self.mbr.stream = view.stream;
        self.mbr.state_view = Some(view.id);
        self.mbr.accepted_through = through;
        self.mbr.accepted.clear();
        self.mbr.promise_deadline = Some(now + self.config.flush_timeout);
        for m in &view.members {
            if let Some(p) = self.mbr.peers.get_mut(&m.node) {
                // What it will say in its next heartbeat; saying it now keeps
                // the old answer from reading as a joiner or a stranger.
                p.incarnation = m.incarnation;
                p.view = Some(view.id);
                p.joining = false;
            }
        }
        self.mbr.view = Some(view);
    }

    pub(super) fn on_accept_ok(&mut self, now: Duration, from: NodeId, view: ViewId) {
        tracing::trace!(me = %self.config.me, node = %from, view = %view, status = ?self.mbr.status, mine = ?self.mbr.view.as_ref().map(|v| v.id), "accept ok");
        if self.mbr.view.as_ref().map(|v| v.id) != Some(view)
            || self.coordinator() != Some(self.config.me)
        {
            return;
        }
        match self.mbr.status {
            Status::Accepted => {
                self.mbr.accepted.insert(from);
                self.try_commit(now);
            }
            // A late acceptor: tell it the view is on.
            Status::Normal => {
                let msg = PeerMsg::Stable {
                    view,
                    through: self.total.stable(),
                };
                self.send(from, &msg);
            }
            _ => {}
        }
    }

    /// The proposer commits the view once a majority of the configured
    /// servers hold its history: then any later proposal hears of it from
    /// one of them, so what is delivered from here on is never undone.
    fn try_commit(&mut self, now: Duration) {
        if self.mbr.status != Status::Accepted || self.mbr.accepted.len() < self.config.quorum() {
            return;
        }
        let through = self.mbr.accepted_through;
        self.commit(now);
        if let Some(view) = self.mbr.view.as_ref().map(|v| v.id) {
            self.send_members(&PeerMsg::Stable { view, through });
        }
    }

    /// Delivers the old view's history and starts ordering in the new one.
    pub(super) fn commit(&mut self, _now: Duration) {
        let Some(view) = self.mbr.view.clone() else {
            return;
        };
        let at = self.mbr.accepted_through;
        self.mbr.installed = view.id;
        self.mbr.hard_dirty = true;
        self.deliver_through(at);
        tracing::info!(me = %self.config.me, view = %view.id, members = ?view.members.iter().map(|m| m.node.0).collect::<Vec<_>>(), at = at.0, "view installed");
        self.stats.views += 1;
        self.mbr.status = Status::Normal;
        self.mbr.promise_deadline = None;
        self.mbr.blocked_since = None;
        self.mbr.told_not_primary = false;
        self.total
            .begin_view(view.members.iter().map(|m| m.node), at);
        self.events.push_back(Event::View { view, at });
        // Ordering resumes: first what our clients submitted meanwhile.
        self.resubmit();
    }

    pub(super) fn on_new_view(
        &mut self,
        now: Duration,
        view: View,
        through: Seq,
        first: Seq,
        msgs: Vec<Msg>,
        lagging: bool,
    ) {
        let again = self.mbr.status != Status::Flushing
            && self.mbr.view.as_ref().is_some_and(|v| v.id == view.id);
        if view.id != self.mbr.promised || !view.has(self.me()) || again {
            return;
        }
        self.mbr.proposal = None;
        if lagging {
            // State comes in the snapshot that follows; keep the rest.
            self.mbr.awaiting_snapshot = true;
            self.mbr.stash = Some(Stash {
                view,
                through,
                first,
                msgs,
            });
            return;
        }
        self.take_history(now, view, through, first, msgs);
    }

    /// Appends the new view's history after what this server holds, and
    /// accepts the view.
    fn take_history(
        &mut self,
        now: Duration,
        view: View,
        through: Seq,
        first: Seq,
        msgs: Vec<Msg>,
    ) {
        let held = self.held();
        if first > held.next() {
            // Cannot happen with a correct proposer; rejoining is safe.
            tracing::warn!(me = %self.config.me, view = %view.id, "new view leaves a hole; rejoining");
            return self.rejoin(now);
        }
        for (i, m) in msgs.into_iter().enumerate() {
            let seq = Seq(first.0 + i as u64);
            if seq > held {
                self.hold(m.ordered(seq));
            }
        }
        if self.bugs.skip_flush {
            // The broken build: install with whatever this server holds.
            let (id, coordinator) = (view.id, view.id.coordinator);
            self.accept(now, view, through);
            self.send(coordinator, &PeerMsg::AcceptOk { view: id });
            return;
        }
        self.truncate(through);
        if self.held() != through || self.total.delivered() > through {
            tracing::warn!(me = %self.config.me, view = %view.id, held = self.held().0, through = through.0, delivered = self.total.delivered().0, first = first.0, "new view does not match what this server holds; rejoining");
            return self.rejoin(now);
        }
        let id = view.id;
        let coordinator = id.coordinator;
        self.accept(now, view, through);
        self.send(coordinator, &PeerMsg::AcceptOk { view: id });
    }

    pub(super) fn on_snapshot(&mut self, now: Duration, view: ViewId, state: Snapshot) {
        let ours = self.mbr.stash.as_ref().is_some_and(|s| s.view.id == view);
        if !self.mbr.awaiting_snapshot || !ours || self.mbr.promised != view {
            // A late snapshot for a proposal that lost: keep waiting.
            return;
        }
        let Some(stash) = self.mbr.stash.take() else {
            return;
        };
        self.mbr.awaiting_snapshot = false;
        if state.stream == self.mbr.stream && self.total.delivered() >= state.head {
            // This server delivered a longer prefix of the same stream (it
            // was left behind in an older view): keep it, take the rest.
            self.truncate(self.total.delivered());
            return self.take_history(now, stash.view, stash.through, stash.first, stash.msgs);
        }
        let old_stream = std::mem::replace(&mut self.mbr.stream, state.stream);
        self.total.install(&state);
        self.events.push_back(Event::Reset(state));
        if self.mbr.stream != old_stream {
            self.drop_old_stream_submissions();
        }
        self.take_history(now, stash.view, stash.through, stash.first, stash.msgs);
    }

    /// Sends the snapshot asked for by `Event::SnapshotNeeded`.
    pub fn send_snapshot(&mut self, to: NodeId, state: Snapshot) {
        let Some(view) = self.mbr.view.as_ref().map(|v| v.id) else {
            return;
        };
        self.send(to, &PeerMsg::Snapshot { view, state });
    }

    /// Leaves whatever view this server was in and joins again as a new
    /// incarnation.
    pub(super) fn rejoin(&mut self, now: Duration) {
        self.mbr.incarnation = Incarnation(self.mbr.incarnation.0.saturating_add(1));
        self.mbr.hard_dirty = true;
        self.mbr.status = Status::Joining;
        self.mbr.view = None;
        self.mbr.proposal = None;
        self.mbr.promise_deadline = None;
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

/// A stream id for a newly formed core: distinct per formation.
fn fresh_stream(seed: u64, id: ViewId, incarnation: Incarnation) -> u64 {
    // splitmix64 over the inputs: cheap, well mixed, deterministic.
    let mut x = seed ^ id.epoch.rotate_left(17) ^ u64::from(id.coordinator.0).rotate_left(41);
    x ^= incarnation.0.rotate_left(7);
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)).max(1)
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
        let mut t = self.mbr.heartbeat_next;
        for d in [
            self.mbr.promise_deadline,
            self.mbr.proposal.as_ref().map(|p| p.deadline),
        ]
        .into_iter()
        .flatten()
        {
            t = t.min(d);
        }
        Some(t)
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
        if now >= self.mbr.heartbeat_next {
            self.mbr.heartbeat_next = now + self.config.heartbeat_interval;
            self.send_heartbeats(now);
            self.check_progress(now);
        }
        self.evaluate(now);
        self.announce_stable();
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
