//! MBRSHIP: heartbeats, failure detection, view changes with a flush, joins
//! and rejoins. See the parent module for the protocol in brief.

use super::wire::{Msg, PeerMsg, Snapshot};
use super::{
    Event, FlushOk, Group, Incarnation, Member, NodeId, Proposal, PubState, Status, View, ViewId,
};
use canopy_client::protocol::Seq;
use std::collections::BTreeMap;
use std::time::Duration;

impl Group {
    pub(super) fn send_heartbeats(&mut self) {
        let msg = PeerMsg::Heartbeat {
            from: self.me(),
            view: self.reported_view(),
            epoch: self.epoch_seen.max(self.promised.epoch),
            have: self.held(),
            stable: if self.coordinator() == Some(self.config.me) {
                self.stable
            } else {
                Seq(0)
            },
        };
        let frame = super::wire::encode(&msg);
        for &n in self.peers.keys() {
            self.transmits.push_back((n, frame.clone()));
        }
    }

    /// The view this server holds the state of, as it reports it.
    fn reported_view(&self) -> Option<ViewId> {
        if self.awaiting_snapshot {
            return None;
        }
        self.view.as_ref().map(|v| v.id)
    }

    pub(super) fn on_heartbeat(
        &mut self,
        now: Duration,
        from: Member,
        view: Option<ViewId>,
        epoch: u64,
        have: Seq,
        stable: Seq,
    ) {
        self.epoch_seen = self.epoch_seen.max(epoch);
        if let Some(p) = self.peers.get_mut(&from.node) {
            p.incarnation = from.incarnation;
            p.view = view;
        }
        let Some(mine) = self.view.as_ref().map(|v| v.id) else {
            return;
        };
        if let Some(theirs) = view {
            self.epoch_seen = self.epoch_seen.max(theirs.epoch);
            // A view newer than anything this server promised was installed
            // without it (or it missed the install): start over.
            if theirs > mine && theirs > self.promised {
                tracing::info!(view = %theirs, mine = %mine, node = %from.node, "a newer view exists without this server; rejoining");
                return self.rejoin(now);
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
            self.on_ack(from.node, mine, have);
        } else if self.coordinator() == Some(from.node) {
            self.learn_stable(stable);
            // A heartbeat later we still lack what the coordinator held at
            // the previous one: an `Order` was lost with a link. (Comparing
            // with its current `have` would ask for every order in flight.)
            let behind = self.lag_mark.is_some_and(|prev| self.held() < prev);
            if behind && !self.awaiting_snapshot {
                let after = self.held();
                self.resend_asked = Some(after);
                self.send(from.node, &PeerMsg::Resend { view: mine, after });
            }
            self.lag_mark = Some(have);
        }
    }

    /// Whether `node` counts as alive now.
    fn alive(&self, now: Duration, node: NodeId) -> bool {
        if node == self.config.me {
            return true;
        }
        let Some(p) = self.peers.get(&node) else {
            return false;
        };
        if p.excluded_until.is_some_and(|t| now < t) {
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
        if let Some(p) = &self.proposal {
            if now < p.deadline {
                return;
            }
            // The proposal did not complete: some proposed member did not
            // answer. Try again without the silent ones.
            let answered: Vec<NodeId> = p.oks.keys().copied().collect();
            tracing::debug!(proposal = %p.id, ?answered, "view change timed out; retrying");
            let backoff = now + self.config.failure_timeout * 2;
            for m in p.members.clone() {
                if !answered.contains(&m.node) {
                    if let Some(peer) = self.peers.get_mut(&m.node) {
                        // It can send (we hear its heartbeats) but not
                        // answer: a one-way partition. Leave it out for a
                        // while rather than block every view on it.
                        peer.heard = None;
                        peer.excluded_until = Some(backoff);
                    }
                }
            }
            self.proposal = None;
        }
        if self.promise_deadline.is_some_and(|d| now >= d) {
            // The proposer we promised went quiet: consider it failed.
            self.promise_deadline = None;
            let c = self.promised.coordinator;
            if c != self.config.me {
                if let Some(peer) = self.peers.get_mut(&c) {
                    peer.heard = None;
                }
            }
        }
        if self.promise_deadline.is_some() {
            return;
        }
        if self.awaiting_snapshot
            && self
                .blocked_since
                .is_some_and(|t| now.saturating_sub(t) >= self.config.flush_timeout)
        {
            // The snapshot was lost with a link: start over.
            return self.rejoin(now);
        }
        let joiners: Vec<Member> = self
            .peers
            .iter()
            .filter(|(&n, p)| p.view.is_none() && self.alive(now, n))
            .map(|(&node, p)| Member {
                node,
                incarnation: p.incarnation,
            })
            .collect();
        match (&self.view, self.status) {
            (Some(view), Status::Normal | Status::Flushing) => {
                let survivors: Vec<Member> = view
                    .members
                    .iter()
                    .copied()
                    .filter(|m| {
                        m.node == self.config.me
                            || (self.alive(now, m.node)
                                && self
                                    .peers
                                    .get(&m.node)
                                    .is_some_and(|p| p.incarnation == m.incarnation))
                    })
                    .collect();
                let changed = self.status == Status::Flushing
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
                // Joining: form the first view only if no live server holds
                // one, a majority is here, and this server is the lowest.
                let any_view = self
                    .peers
                    .iter()
                    .any(|(&n, p)| p.view.is_some() && self.alive(now, n));
                let mut members = joiners;
                members.push(self.me());
                let lowest = members.iter().map(|m| m.node).min();
                if !any_view
                    && members.len() >= self.config.quorum()
                    && lowest == Some(self.config.me)
                {
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
            epoch: self.epoch_seen.max(self.promised.epoch) + 1,
            coordinator: self.config.me,
        };
        self.epoch_seen = id.epoch;
        tracing::debug!(proposal = %id, members = ?members.iter().map(|m| m.node.0).collect::<Vec<_>>(), "proposing a view");
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
        self.proposal = Some(Proposal {
            id,
            members,
            oks,
            deadline: now + self.config.flush_timeout,
        });
        self.promise_deadline = None;
        self.try_install(now);
    }

    /// Promises proposal `id`: ordering in the old view stops here.
    fn promise(&mut self, now: Duration, id: ViewId) {
        self.promised = id;
        if self.status == Status::Normal {
            self.status = Status::Flushing;
        }
        self.blocked_since.get_or_insert(now);
        self.promise_deadline = Some(now + self.config.flush_timeout);
    }

    fn flush_ok(&self) -> FlushOk {
        FlushOk {
            from: self.me(),
            view: self.reported_view(),
            delivered: self.delivered,
            msgs: if self.reported_view().is_some() {
                self.log.iter().map(Msg::of).collect()
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
        self.epoch_seen = self.epoch_seen.max(proposal.epoch);
        if proposal.coordinator != from || !members.contains(&self.me()) {
            return;
        }
        if proposal < self.promised {
            return;
        }
        if proposal > self.promised {
            if self.proposal.take().is_some() {
                tracing::debug!(proposal = %proposal, "a higher proposal overrides ours");
            }
            self.promise(now, proposal);
        }
        let ok = self.flush_ok();
        let msg = PeerMsg::FlushOk {
            proposal,
            from: ok.from,
            view: ok.view,
            delivered: ok.delivered,
            msgs: ok.msgs,
        };
        self.send(from, &msg);
    }

    pub(super) fn on_flush_ok(&mut self, now: Duration, proposal: ViewId, ok: FlushOk) {
        let Some(p) = &mut self.proposal else { return };
        if p.id != proposal || !p.members.contains(&ok.from) {
            return;
        }
        let mine = self.view.as_ref().map(|v| v.id);
        if ok.view.is_some() && ok.view > mine {
            // Someone installed a newer view than ours: we are stale.
            return self.rejoin(now);
        }
        p.oks.insert(ok.from.node, ok);
        self.try_install(now);
    }

    /// Installs the proposal once every proposed member answered.
    fn try_install(&mut self, now: Duration) {
        let Some(p) = &self.proposal else { return };
        if p.oks.len() < p.members.len() {
            return;
        }
        let Some(p) = self.proposal.take() else {
            return;
        };
        if p.oks.len() < self.config.quorum() {
            tracing::debug!(proposal = %p.id, answered = p.oks.len(), "no majority of the core: not primary");
            self.proposal = Some(p);
            return;
        }
        let basis = p.oks.values().filter_map(|o| o.view).max();
        let mine = self.reported_view();
        if basis.is_some() && basis != mine {
            // Only a holder of the newest state can carry the stream on.
            return self.rejoin(now);
        }
        // The authority: members of the newest view. Their held ranges
        // overlap (each holds through every seq any of them saw stable), so
        // the highest of them holds everything any of them delivered and
        // everything that may be stable.
        let through = p
            .oks
            .values()
            .filter(|o| o.view == basis)
            .map(FlushOk::held)
            .max()
            .unwrap_or(self.delivered);
        let best = p
            .oks
            .values()
            .filter(|o| o.view == basis)
            .max_by_key(|o| o.held())
            .cloned();
        let stream = match (&self.view, basis) {
            (Some(v), Some(_)) => v.stream,
            _ => fresh_stream(self.config.stream_seed, p.id, self.incarnation),
        };
        if basis.is_none() {
            // No member of any view is left: a new stream begins at seq 0,
            // and clients that resume from the old one are told so.
            self.log.clear();
            self.delivered = Seq(0);
            self.stable = Seq(0);
            self.publishers.clear();
            self.events.push_back(Event::Reset(Snapshot {
                stream,
                ..Snapshot::default()
            }));
        }
        let view = View {
            id: p.id,
            members: p.members.clone(),
            stream,
        };
        // Messages the authority holds that we lack, then for each member
        // what it lacks; lagging members get a snapshot instead.
        if let Some(best) = &best {
            if !self.bugs.skip_flush {
                let held = self.held();
                for (i, m) in best.msgs.iter().enumerate() {
                    let seq = Seq(best.delivered.0 + 1 + i as u64);
                    if seq > held {
                        self.hold(m.clone().ordered(seq));
                    }
                }
            }
        }
        let through = if self.bugs.skip_flush {
            self.stable
        } else {
            through
        };
        self.truncate(through);
        let mut lagging = Vec::new();
        for ok in p.oks.values() {
            if ok.from.node == self.config.me {
                continue;
            }
            let is_lagging = ok.view != basis || basis.is_none();
            let (first, msgs) = if is_lagging {
                lagging.push(ok.from.node);
                (through.next(), Vec::new())
            } else {
                let from = ok.held().max(self.delivered);
                let skip = (from.0 - self.delivered.0) as usize;
                let msgs: Vec<Msg> = self
                    .log
                    .iter()
                    .skip(skip)
                    .take_while(|m| m.seq <= through)
                    .map(Msg::of)
                    .collect();
                (from.next(), msgs)
            };
            let msg = PeerMsg::NewView {
                view: view.clone(),
                through,
                first,
                msgs,
                lagging: is_lagging,
            };
            self.send(ok.from.node, &msg);
        }
        self.deliver_through(through);
        self.installed(now, view, through);
        for to in lagging {
            self.events.push_back(Event::SnapshotNeeded { to });
        }
        // Ordering resumes: first what our own clients submitted meanwhile.
        self.resubmit();
    }

    /// Drops held messages after `through`: never stable, never delivered,
    /// and not part of the new view's history.
    fn truncate(&mut self, through: Seq) {
        if self.held() > through {
            let keep = through.0.saturating_sub(self.delivered.0) as usize;
            self.log.truncate(keep);
        }
    }

    /// Common bookkeeping of installing `view` after `at`.
    fn installed(&mut self, _now: Duration, view: View, at: Seq) {
        tracing::info!(view = %view.id, members = ?view.members.iter().map(|m| m.node.0).collect::<Vec<_>>(), at = at.0, "view installed");
        self.stats.views += 1;
        self.promised = view.id;
        self.epoch_seen = self.epoch_seen.max(view.id.epoch);
        self.status = Status::Normal;
        self.promise_deadline = None;
        self.blocked_since = None;
        self.told_not_primary = false;
        self.stable = at;
        self.stable_sent = at;
        self.resend_asked = None;
        self.acks = view.members.iter().map(|m| (m.node, at)).collect();
        self.lag_mark = None;
        for m in &view.members {
            if let Some(p) = self.peers.get_mut(&m.node) {
                // What it will say in its next heartbeat; saying it now keeps
                // the old answer from reading as a joiner or a stranger.
                p.incarnation = m.incarnation;
                p.view = Some(view.id);
            }
        }
        self.view = Some(view.clone());
        self.events.push_back(Event::View { view, at });
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
        if view.id != self.promised || !view.has(self.me()) {
            return;
        }
        self.proposal = None;
        if lagging {
            self.log.clear();
            self.awaiting_snapshot = true;
            self.installed(now, view, through);
            // Until the snapshot comes, this server holds nothing usable.
            self.blocked_since = Some(now);
            return;
        }
        if first > self.held().next() && !msgs.is_empty() {
            // Cannot happen with a correct proposer; rejoining is safe.
            tracing::warn!(view = %view.id, "new view leaves a hole; rejoining");
            return self.rejoin(now);
        }
        let held = self.held();
        for (i, m) in msgs.into_iter().enumerate() {
            let seq = Seq(first.0 + i as u64);
            if seq > held {
                self.hold(m.ordered(seq));
            }
        }
        self.truncate(through);
        self.deliver_through(through);
        if self.delivered != through {
            tracing::warn!(view = %view.id, "new view beyond what this server holds; rejoining");
            return self.rejoin(now);
        }
        self.installed(now, view, through);
        self.resubmit();
    }

    pub(super) fn on_snapshot(&mut self, view: ViewId, state: Snapshot) {
        if !self.awaiting_snapshot || self.view.as_ref().map(|v| v.id) != Some(view) {
            return;
        }
        self.awaiting_snapshot = false;
        self.blocked_since = None;
        self.log.clear();
        self.delivered = state.head;
        self.stable = state.head;
        self.publishers = state
            .publishers
            .iter()
            .map(|&(id, pub_seq, seq)| {
                (
                    id,
                    PubState {
                        held: pub_seq,
                        delivered: pub_seq,
                        seq,
                    },
                )
            })
            .collect();
        let coordinator = view.coordinator;
        let have = state.head;
        self.events.push_back(Event::Reset(state));
        self.send(coordinator, &PeerMsg::Ack { view, have });
        self.resubmit();
    }

    /// Sends the snapshot asked for by `Event::SnapshotNeeded`.
    pub fn send_snapshot(&mut self, to: NodeId, state: Snapshot) {
        let Some(view) = self.view.as_ref().map(|v| v.id) else {
            return;
        };
        self.send(to, &PeerMsg::Snapshot { view, state });
    }

    /// Leaves whatever view this server was in and joins again as a new
    /// incarnation.
    pub(super) fn rejoin(&mut self, now: Duration) {
        self.incarnation = Incarnation(self.incarnation.0 + 1);
        self.status = Status::Joining;
        self.view = None;
        self.proposal = None;
        self.promise_deadline = None;
        self.awaiting_snapshot = false;
        self.log.clear();
        self.unordered.clear();
        self.acks.clear();
        self.blocked_since = Some(now);
        if !self.told_not_primary {
            self.told_not_primary = true;
            self.events.push_back(Event::NotPrimary);
        }
    }

    /// Tells the server it is not primary when it has been without a
    /// working view for a failure timeout (joining, blocked in a view
    /// change, or waiting for its snapshot).
    fn tell_not_primary(&mut self, now: Duration) {
        if self.told_not_primary {
            return;
        }
        let Some(since) = self.blocked_since else {
            return;
        };
        if now.saturating_sub(since) >= self.config.failure_timeout {
            self.told_not_primary = true;
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
