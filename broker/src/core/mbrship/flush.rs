//! The view change: a proposal, the flush (`FlushReq`, `FlushOk`), the
//! basis the new view carries on from (module docs, "Restart safety"),
//! `NewView`, acceptance, the commit, and snapshots for lagging members.

use super::wire::{FlushOk, FlushReq, MbrMsg, NewView, Stable, StateTransfer};
use super::*;

/// A view change this server proposed.
#[derive(Debug)]
pub(super) struct Proposal {
    pub(super) id: ViewId,
    pub(super) members: Vec<Member>,
    pub(super) oks: BTreeMap<NodeId, FlushOk>,
}

impl Membership {
    /// Starts a view change towards `members` (this server among them).
    pub(super) fn propose(&mut self, now: Duration, mut members: Vec<Member>, up: &mut impl Above) {
        members.sort();
        members.dedup_by_key(|m| m.node);
        let Some(epoch) = self.epoch_seen.max(self.promised.epoch).checked_add(1) else {
            // Only a peer naming an epoch no view reaches gets here: this
            // server proposes nothing rather than wrap to epoch 0 and take
            // back its promises.
            tracing::error!(me = %self.config.me, "no epoch left to propose a view with");
            return;
        };
        let id = ViewId {
            epoch,
            coordinator: self.config.me,
        };
        self.epoch_seen = id.epoch;
        tracing::debug!(me = %self.config.me, proposal = %id, members = ?members.iter().map(|m| m.node.0).collect::<Vec<_>>(), "proposing a view");
        self.promise(now, id);
        let mut oks = BTreeMap::new();
        oks.insert(self.config.me, self.flush_ok(id, up));
        let to: Vec<NodeId> = members
            .iter()
            .map(|m| m.node)
            .filter(|&n| n != self.config.me)
            .collect();
        let req = FlushReq {
            proposal: id,
            members: members.clone(),
        };
        up.send(&to, MbrMsg::FlushReq(req));
        self.proposal = Some(Proposal { id, members, oks });
        self.timers
            .set(MbrTimer::Proposal, now + self.config.flush_timeout);
        self.timers.cancel(MbrTimer::Promise);
        self.try_install(now, up);
    }

    /// Promises proposal `id`: ordering in the old view stops here.
    fn promise(&mut self, now: Duration, id: ViewId) {
        self.promised = id;
        self.hard_dirty = true;
        // A snapshot awaited for an older proposal will not matter now.
        self.awaiting_snapshot = false;
        self.stash = None;
        if matches!(self.status, Status::Normal | Status::Accepted) {
            self.status = Status::Flushing;
        }
        self.blocked_since.get_or_insert(now);
        self.timers
            .set(MbrTimer::Promise, now + self.config.flush_timeout);
    }

    /// This server's answer to `proposal`: what it holds beyond what it
    /// delivered, if it holds any state.
    fn flush_ok(&self, proposal: ViewId, up: &impl Above) -> FlushOk {
        FlushOk {
            proposal,
            from: self.me(),
            view: self.state_view,
            accepted: self.accepted_view.clone(),
            installed: self.installed,
            delivered: up.delivered(),
            msgs: if self.state_view.is_some() {
                up.held_after(up.delivered())
            } else {
                Vec::new()
            },
        }
    }

    pub(crate) fn on_flush_req(
        &mut self,
        now: Duration,
        from: NodeId,
        req: FlushReq,
        up: &mut impl Above,
    ) {
        let FlushReq { proposal, members } = req;
        self.epoch_seen = self.epoch_seen.max(proposal.epoch);
        if proposal.coordinator != from || !members.contains(&self.me()) {
            return;
        }
        if proposal < self.promised {
            return;
        }
        if proposal > self.promised {
            if self.end_proposal().is_some() {
                tracing::debug!(me = %self.config.me, proposal = %proposal, "a higher proposal overrides ours");
            }
            self.promise(now, proposal);
        }
        let ok = self.flush_ok(proposal, up);
        up.send(&[from], MbrMsg::FlushOk(ok));
    }

    pub(crate) fn on_flush_ok(&mut self, now: Duration, ok: FlushOk, up: &mut impl Above) {
        let Some(p) = &mut self.proposal else {
            return;
        };
        if p.id != ok.proposal || !p.members.contains(&ok.from) {
            return;
        }
        let ends = ok.delivered.0.checked_add(ok.msgs.len() as u64);
        if ends.is_none_or(|held| held == u64::MAX) {
            // No seq could follow what it claims to hold.
            tracing::error!(me = %self.config.me, node = %ok.from.node, delivered = ok.delivered.0, "a flush answer past the last seq refused");
            return;
        }
        if ok.view > self.state_view && self.status != Status::Joining {
            // Someone holds a newer view's state than ours: we are stale.
            return self.rejoin(now, up);
        }
        p.oks.insert(ok.from.node, ok);
        self.try_install(now, up);
    }

    /// Moves the proposal on once every proposed member answered: the
    /// proposer takes the new view's history and sends it (`NewView`).
    fn try_install(&mut self, now: Duration, up: &mut impl Above) {
        let Some(p) = &self.proposal else { return };
        if p.oks.len() < p.members.len() {
            return;
        }
        let Some(p) = self.proposal.take() else {
            return;
        };
        let basis = match self.basis(&p) {
            Ok(basis) => basis,
            Err(why) => {
                tracing::debug!(me = %self.config.me, proposal = %p.id, why = %why, answered = ?p.oks.values().map(|o| (o.from.node.0, o.view, o.accepted.as_ref().map(|v| v.id))).collect::<Vec<_>>(), "no history to continue: not primary");
                self.proposal = Some(p);
                return;
            }
        };
        // A member of the state this server holds delivered nothing past
        // what this server holds (it holds every seq any member saw
        // stable): an answer that says otherwise cannot be right, and its
        // messages would not follow ours. The proposal waits (and times
        // out) without it.
        let impossible: Vec<NodeId> = match basis.is_some() && basis == self.state_view {
            true => p
                .oks
                .values()
                .filter(|o| o.view == basis && o.delivered > up.held())
                .map(|o| o.from.node)
                .collect(),
            false => Vec::new(),
        };
        if !impossible.is_empty() {
            tracing::error!(me = %self.config.me, proposal = %p.id, nodes = ?impossible, held = up.held().0, "flush answers claiming more than was ever ordered refused");
            let mut p = p;
            p.oks.retain(|n, _| !impossible.contains(n));
            self.proposal = Some(p);
            return;
        }
        // The proposal is decided, whichever way what follows goes.
        self.timers.cancel(MbrTimer::Proposal);
        if basis.is_some() && basis != self.state_view {
            // Only a holder of the newest state can carry the stream on.
            if self.status == Status::Joining {
                return;
            }
            return self.rejoin(now, up);
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
        let through = best.as_ref().map_or(up.delivered(), FlushOk::held);
        let stream = match basis {
            Some(_) => self.stream,
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
                    self.incarnation,
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
            self.stream = stream;
            up.new_stream(stream);
        }
        let through = if self.bugs.skip_flush {
            up.stable().max(up.delivered())
        } else {
            if let Some(best) = &best {
                let held = up.held();
                for (i, m) in best.msgs.iter().enumerate() {
                    let seq = Seq(best.delivered.0 + 1 + i as u64);
                    if seq > held {
                        up.hold(m.clone().ordered(seq));
                    }
                }
            }
            through
        };
        up.truncate(through);
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
                up.delivered()
            } else {
                ok.held().max(up.delivered())
            };
            let msg = NewView {
                view: view.clone(),
                through,
                first: from.next(),
                msgs: up.held_after(from),
                lagging: is_lagging,
            };
            up.send(&[ok.from.node], MbrMsg::NewView(msg));
        }
        for to in lagging {
            up.snapshot_needed(to);
        }
        self.accept(now, view, through);
        self.accepted.insert(self.config.me);
        self.try_commit(now, up);
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
    fn basis(&self, p: &Proposal) -> Result<Option<ViewId>, NoBasis> {
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

    /// This server holds `view`'s history through `through` and waits for
    /// the commit. From now on it reports `view` as the state it holds.
    fn accept(&mut self, now: Duration, view: View, through: Seq) {
        self.promised = view.id;
        self.accepted_view = Some(view.clone());
        self.hard_dirty = true;
        self.epoch_seen = self.epoch_seen.max(view.id.epoch);
        self.status = Status::Accepted;
        self.awaiting_snapshot = false;
        self.stash = None;
        self.stream = view.stream;
        self.state_view = Some(view.id);
        self.accepted_through = through;
        self.accepted.clear();
        self.timers
            .set(MbrTimer::Promise, now + self.config.flush_timeout);
        for m in &view.members {
            if let Some(p) = self.peers.get_mut(&m.node) {
                // What it will say in its next heartbeat; saying it now keeps
                // the old answer from reading as a joiner or a stranger.
                p.incarnation = m.incarnation;
                p.view = Some(view.id);
                p.joining = false;
            }
        }
        self.view = Some(view);
    }

    pub(crate) fn on_accept_ok(
        &mut self,
        now: Duration,
        from: NodeId,
        accept: AcceptOk,
        up: &mut impl Above,
    ) {
        let view = accept.view;
        tracing::trace!(me = %self.config.me, node = %from, view = %view, status = ?self.status, mine = ?self.view.as_ref().map(|v| v.id), "accept ok");
        if self.view.as_ref().map(|v| v.id) != Some(view)
            || self.coordinator() != Some(self.config.me)
        {
            return;
        }
        match self.status {
            Status::Accepted => {
                self.accepted.insert(from);
                self.try_commit(now, up);
            }
            // A late acceptor: tell it the view is on.
            Status::Normal => {
                let msg = Stable {
                    view,
                    through: up.stable(),
                };
                up.send(&[from], MbrMsg::Stable(msg));
            }
            _ => {}
        }
    }

    /// The proposer commits the view once a majority of the configured
    /// servers hold its history: then any later proposal hears of it from
    /// one of them, so what is delivered from here on is never undone.
    fn try_commit(&mut self, now: Duration, up: &mut impl Above) {
        if self.status != Status::Accepted || self.accepted.len() < self.config.quorum() {
            return;
        }
        let through = self.accepted_through;
        self.commit(now, up);
        if let Some(view) = self.view_id() {
            let to: Vec<NodeId> = self.others().collect();
            up.send(&to, MbrMsg::Stable(Stable { view, through }));
        }
    }

    /// Delivers the old view's history and starts ordering in the new one.
    pub(super) fn commit(&mut self, _now: Duration, up: &mut impl Above) {
        let Some(id) = self.view_id() else {
            return;
        };
        let at = self.accepted_through;
        self.installed = id;
        self.hard_dirty = true;
        up.deliver_through(at);
        tracing::info!(me = %self.config.me, view = %id, members = ?self.view.iter().flat_map(|v| &v.members).map(|m| m.node.0).collect::<Vec<_>>(), at = at.0, "view installed");
        self.views += 1;
        self.status = Status::Normal;
        self.timers.cancel(MbrTimer::Promise);
        self.blocked_since = None;
        self.told_not_primary = false;
        up.view_installed(self, at);
    }

    pub(crate) fn on_new_view(&mut self, now: Duration, new: NewView, up: &mut impl Above) {
        let again = self.status != Status::Flushing
            && self.view.as_ref().is_some_and(|v| v.id == new.view.id);
        if new.view.id != self.promised || !new.view.has(self.me()) || again {
            return;
        }
        self.end_proposal();
        if new.lagging {
            // State comes in the snapshot that follows; keep the rest.
            self.awaiting_snapshot = true;
            self.stash = Some(new);
            return;
        }
        self.take_history(now, new, up);
    }

    /// Appends the new view's history after what this server holds, and
    /// accepts the view.
    fn take_history(&mut self, now: Duration, new: NewView, up: &mut impl Above) {
        let NewView {
            view,
            through,
            first,
            msgs,
            ..
        } = new;
        let held = up.held();
        if first > held.next() {
            // Cannot happen with a correct proposer; rejoining is safe.
            tracing::warn!(me = %self.config.me, view = %view.id, "new view leaves a hole; rejoining");
            return self.rejoin(now, up);
        }
        for (i, m) in msgs.into_iter().enumerate() {
            let seq = Seq(first.0 + i as u64);
            if seq > held {
                up.hold(m.ordered(seq));
            }
        }
        // (The broken build installs with whatever this server holds.)
        if !self.bugs.skip_flush {
            up.truncate(through);
            if up.held() != through || up.delivered() > through {
                tracing::warn!(me = %self.config.me, view = %view.id, held = up.held().0, through = through.0, delivered = up.delivered().0, first = first.0, "new view does not match what this server holds; rejoining");
                return self.rejoin(now, up);
            }
        }
        let id = view.id;
        self.accept(now, view, through);
        up.send(&[id.coordinator], MbrMsg::AcceptOk(AcceptOk { view: id }));
    }

    pub(crate) fn on_snapshot(
        &mut self,
        now: Duration,
        transfer: StateTransfer,
        up: &mut impl Above,
    ) {
        let StateTransfer { view, state } = transfer;
        let ours = self.stash.as_ref().is_some_and(|s| s.view.id == view);
        if !self.awaiting_snapshot || !ours || self.promised != view {
            // A late snapshot for a proposal that lost: keep waiting.
            return;
        }
        if let Err(why) = state.check() {
            // Installed, it would overflow counting past its head or put
            // messages where its seqs are not.
            tracing::error!(me = %self.config.me, view = %view, why, "a snapshot that cannot be right refused; waiting for another");
            return;
        }
        let Some(stash) = self.stash.take() else {
            return;
        };
        self.awaiting_snapshot = false;
        if state.stream == self.stream && up.delivered() >= state.head {
            // This server delivered a longer prefix of the same stream (it
            // was left behind in an older view): keep it, take the rest.
            up.truncate(up.delivered());
            return self.take_history(now, stash, up);
        }
        let old_stream = std::mem::replace(&mut self.stream, state.stream);
        up.install(state, self.stream != old_stream);
        self.take_history(now, stash, up);
    }

    /// Sends a lagging member the snapshot the layer above made for it.
    pub(crate) fn send_snapshot(&self, to: NodeId, state: Snapshot, up: &mut impl Above) {
        let Some(view) = self.view_id() else {
            return;
        };
        up.send(&[to], MbrMsg::Snapshot(StateTransfer { view, state }));
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

/// Why no view may form from a proposal's answers (`Membership::basis`): the
/// core waits, not primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NoBasis {
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
