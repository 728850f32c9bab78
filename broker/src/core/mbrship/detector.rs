//! The failure detector and the decisions it drives: who counts as alive,
//! when to propose a view and with whom, when to rejoin, and when to tell
//! the server it is not primary.

use super::*;

impl Membership {
    /// Whether `p` was heard within a failure timeout (what this server's
    /// heartbeats report as `hears`).
    pub(super) fn heard_recently(&self, now: Duration, p: &Peer) -> bool {
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
        let Some(p) = self.peers.get(&node) else {
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
    pub(super) fn evaluate(&mut self, now: Duration, up: &mut impl Above) {
        self.tell_not_primary(now, up);
        if let Some(p) = &self.proposal {
            if !self.timers.is_due(MbrTimer::Proposal, now) {
                return;
            }
            // The proposal did not complete: some proposed member did not
            // answer. Try again without the silent ones.
            let answered: Vec<NodeId> = p.oks.keys().copied().collect();
            tracing::debug!(me = %self.config.me, proposal = %p.id, ?answered, "view change timed out; retrying");
            let backoff = now + self.config.failure_timeout * 2;
            for m in p.members.clone() {
                if !answered.contains(&m.node) {
                    if let Some(peer) = self.peers.get_mut(&m.node) {
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
            self.end_proposal();
        }
        if self.timers.is_due(MbrTimer::Promise, now) {
            let promised = self.promised;
            if self.status == Status::Flushing
                && self.peers.values().any(|p| p.view >= Some(promised))
            {
                // The view we promised (or a later one) went on without
                // this server taking its history: join it afresh.
                return self.rejoin(now, up);
            }
            // The proposal went nowhere. If its proposer still heartbeats
            // and hears us, it retries by itself (its own deadline); if not,
            // it no longer counts alive and the lowest survivor proposes.
            // (Counting a live proposer dead here would drop it from this
            // server's `hears`, and it would count this server dead in turn.)
            self.timers.cancel(MbrTimer::Promise);
        }
        if self.timers.get(MbrTimer::Promise).is_some() {
            return;
        }
        if self.awaiting_snapshot
            && self
                .blocked_since
                .is_some_and(|t| now.saturating_sub(t) >= self.config.flush_timeout)
        {
            // The snapshot was lost with a link: start over.
            return self.rejoin(now, up);
        }
        // Live servers that are not in our view and hold no newer one:
        // restarted (no view) or stale (an older view they were dropped
        // from). Both join with a snapshot.
        let mine = self.view.as_ref().map(|v| v.id);
        let joiners: Vec<Member> = self
            .peers
            .iter()
            .filter(|(&n, p)| (p.joining || p.view < mine) && self.alive(now, n))
            .map(|(&node, p)| Member {
                node,
                incarnation: p.incarnation,
            })
            .collect();
        match (&self.view, self.status) {
            (Some(view), Status::Normal | Status::Flushing | Status::Accepted) => {
                let survivors: Vec<Member> =
                    view.members
                        .iter()
                        .copied()
                        .filter(|m| {
                            m.node == self.config.me
                                || (self.alive(now, m.node)
                                    && self.peers.get(&m.node).is_some_and(|p| {
                                        p.incarnation == m.incarnation && !p.joining
                                    }))
                        })
                        .collect();
                // A member that promised a proposal that went nowhere waits
                // for a view change; the lowest survivor gives it one.
                let stuck = survivors.iter().any(|m| {
                    self.peers
                        .get(&m.node)
                        .is_some_and(|p| p.promised > view.id.epoch)
                });
                let changed = self.status != Status::Normal
                    || stuck
                    || survivors.len() != view.members.len()
                    || joiners.iter().any(|j| !view.has(*j));
                let lowest = survivors.iter().map(|m| m.node).min();
                if changed && lowest == Some(self.config.me) {
                    // A live server holds the state of a newer view than
                    // this one's. It is neither a survivor nor a joiner
                    // here, and a proposal without it cannot carry the
                    // stream on: this server is stale, and joins again so
                    // that the holder takes it in. (The heartbeat's rule
                    // misses this once this server's own failed proposals
                    // raised its promise past that view; proposing on would
                    // duel with the holder's proposals.)
                    let newer = self.peers.iter().any(|(&n, p)| {
                        !p.joining && p.view > self.state_view && self.alive(now, n)
                    });
                    if newer {
                        tracing::info!(me = %self.config.me, "a live server holds newer state than this one; rejoining");
                        return self.rejoin(now, up);
                    }
                    let mut members = survivors;
                    for j in joiners {
                        if !members.contains(&j) {
                            members.push(j);
                        }
                    }
                    self.propose(now, members, up);
                }
            }
            (None, _) => {
                // Joining, and no live server is in a view (else its
                // coordinator takes us in): when a majority is joining, the
                // lowest of those holding the newest state proposes. (All
                // restarted at once, nobody holds any: a new stream begins.)
                let any_view = self
                    .peers
                    .iter()
                    .any(|(&n, p)| !p.joining && self.alive(now, n));
                let newest = joiners
                    .iter()
                    .filter_map(|j| self.peers.get(&j.node).and_then(|p| p.view))
                    .max()
                    .max(self.state_view);
                let leader = joiners
                    .iter()
                    .filter(|j| self.peers.get(&j.node).is_some_and(|p| p.view == newest))
                    .map(|j| j.node)
                    .chain((self.state_view == newest).then_some(self.config.me))
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
                    self.propose(now, members, up);
                }
            }
            (Some(_), Status::Joining) => {}
        }
    }

    /// Leaves whatever view this server was in and joins again as a new
    /// incarnation.
    pub(crate) fn rejoin(&mut self, now: Duration, up: &mut impl Above) {
        self.incarnation = Incarnation(self.incarnation.0.saturating_add(1));
        self.hard_dirty = true;
        self.status = Status::Joining;
        self.view = None;
        self.end_proposal();
        self.timers.cancel(MbrTimer::Promise);
        self.awaiting_snapshot = false;
        self.stash = None;
        self.accepted.clear();
        // The log stays: what it holds may be stable elsewhere, and this
        // server still reports the state of its last view, log included.
        // So do own submissions: the server's own membership events are
        // submitted once and must not be lost (a missing pub_seq would hold
        // back every later one), and a client's are deduplicated by the
        // sequencer if the client also sends them elsewhere.
        up.left_view();
        self.blocked_since = Some(now);
        if !self.told_not_primary {
            self.told_not_primary = true;
            up.not_primary();
        }
    }

    /// Tells the server it is not primary when it has been without a
    /// working view for a failure timeout (joining, blocked in a view
    /// change, or waiting for its snapshot).
    fn tell_not_primary(&mut self, now: Duration, up: &mut impl Above) {
        if self.told_not_primary {
            return;
        }
        let Some(since) = self.blocked_since else {
            return;
        };
        if now.saturating_sub(since) >= self.config.failure_timeout {
            self.told_not_primary = true;
            up.not_primary();
        }
    }
}
