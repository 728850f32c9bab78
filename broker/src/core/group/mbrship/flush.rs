//! The view change: a proposal, the flush (`FlushReq`, `FlushOk`), the
//! basis the new view carries on from (module docs, "Restart safety"),
//! `NewView`, acceptance, the commit, and snapshots for lagging members.

use super::*;

impl Group {
    /// Starts a view change towards `members` (this server among them).
    pub(super) fn propose(&mut self, now: Duration, mut members: Vec<Member>) {
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
        self.mbr.proposal = Some(Proposal { id, members, oks });
        self.mbr
            .timers
            .set(MbrTimer::Proposal, now + self.config.flush_timeout);
        self.mbr.timers.cancel(MbrTimer::Promise);
        self.try_install(now);
    }

    /// Promises proposal `id`: ordering in the old view stops here.
    pub(super) fn promise(&mut self, now: Duration, id: ViewId) {
        self.mbr.promised = id;
        self.mbr.hard_dirty = true;
        // A snapshot awaited for an older proposal will not matter now.
        self.mbr.awaiting_snapshot = false;
        self.mbr.stash = None;
        if matches!(self.mbr.status, Status::Normal | Status::Accepted) {
            self.mbr.status = Status::Flushing;
        }
        self.mbr.blocked_since.get_or_insert(now);
        self.mbr
            .timers
            .set(MbrTimer::Promise, now + self.config.flush_timeout);
    }

    pub(super) fn flush_ok(&self) -> FlushOk {
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

    pub(in crate::core::group) fn on_flush_req(
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
            if self.mbr.end_proposal().is_some() {
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

    pub(in crate::core::group) fn on_flush_ok(
        &mut self,
        now: Duration,
        proposal: ViewId,
        ok: FlushOk,
    ) {
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
    pub(super) fn try_install(&mut self, now: Duration) {
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
                tracing::debug!(me = %self.config.me, proposal = %p.id, why = %why, answered = ?p.oks.values().map(|o| (o.from.node.0, o.view, o.accepted.as_ref().map(|v| v.id))).collect::<Vec<_>>(), "no history to continue: not primary");
                self.mbr.proposal = Some(p);
                return;
            }
        };
        // The proposal is decided, whichever way what follows goes.
        self.mbr.timers.cancel(MbrTimer::Proposal);
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
    pub(super) fn basis(&self, p: &Proposal) -> Result<Option<ViewId>, NoBasis> {
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
                return Err(NoBasis::NoMajorityHoldsState);
            }
            return Ok(p.oks.values().filter_map(|o| o.view).max());
        }
        if !self.config.servers.iter().all(|n| p.oks.contains_key(n)) {
            return Err(NoBasis::NotEveryServerAnswered);
        }
        let Some(held) = p.oks.values().filter_map(|o| o.view).max() else {
            // Every server answered and none holds any message: whatever
            // was installed last, its messages are gone.
            return Ok(None);
        };
        if voters != p.oks.len() {
            return Err(NoBasis::RecordMayBeLost);
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
    pub(super) fn truncate(&mut self, through: Seq) {
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
    pub(super) fn accept(&mut self, now: Duration, view: View, through: Seq) {
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
        self.mbr
            .timers
            .set(MbrTimer::Promise, now + self.config.flush_timeout);
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

    pub(in crate::core::group) fn on_accept_ok(
        &mut self,
        now: Duration,
        from: NodeId,
        view: ViewId,
    ) {
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
    pub(super) fn try_commit(&mut self, now: Duration) {
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
    pub(in crate::core::group) fn commit(&mut self, _now: Duration) {
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
        self.mbr.timers.cancel(MbrTimer::Promise);
        self.mbr.blocked_since = None;
        self.mbr.told_not_primary = false;
        self.total
            .begin_view(view.members.iter().map(|m| m.node), at);
        self.events.push_back(Event::View { view, at });
        // Ordering resumes: first what our clients submitted meanwhile.
        self.resubmit();
    }

    pub(in crate::core::group) fn on_new_view(
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
        self.mbr.end_proposal();
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
    pub(super) fn take_history(
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

    pub(in crate::core::group) fn on_snapshot(
        &mut self,
        now: Duration,
        view: ViewId,
        state: Snapshot,
    ) {
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

/// Why no view may form from a proposal's answers (`Group::basis`): the
/// core waits, not primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(in crate::core::group) enum NoBasis {
    /// The broken build's rule before hard state: no majority holds state.
    #[error("no majority holds state")]
    NoMajorityHoldsState,
    /// No majority of voters holds the newest accepted view's state, and a
    /// server that did not answer may.
    #[error("no majority of voters holds the newest view's state, and not every configured server answered")]
    NotEveryServerAnswered,
    /// Every server answered, but one lost its data directory, and with it
    /// perhaps the record of the newest installed view.
    #[error(
        "a server without its data directory may have lost the record of the newest installed view"
    )]
    RecordMayBeLost,
}
