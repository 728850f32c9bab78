//! Weak delivery (docs/DESIGN.md, "Weak delivery"): held messages sent
//! before they are stable, the stable mark, messages taken back, and the
//! running-hash claims checked against the stable stream.

use super::*;

impl Node {
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
        // Interned once per run of one topic (a frame decodes a run's
        // topic once): the last topic as it came, and as interned.
        let mut run: Option<(Arc<str>, Arc<str>)> = None;
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
            m.topic = match &run {
                Some((came, interned)) if Arc::ptr_eq(came, &m.topic) => interned.clone(),
                _ => {
                    let interned = self.intern(&m.topic);
                    run = Some((m.topic.clone(), interned.clone()));
                    interned
                }
            };
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
    pub(super) fn weak_head(&self) -> Seq {
        self.unstable.back().map_or(self.head, |m| m.seq)
    }

    /// The running hash through `seq`, if this node still knows it.
    pub(super) fn hash_at(&self, seq: Seq) -> Option<u64> {
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

    /// The held copy of `m`, which became stable, if this node held it:
    /// the same seq, publisher and pub_seq after the same stream, hence the
    /// same running hash `stabilize` compares. Weak sessions were sent it
    /// when it was held.
    pub(super) fn take_held(&mut self, m: &Ordered) -> Option<Ordered> {
        let u = self.unstable.front()?;
        if (u.seq, u.publisher, u.pub_seq) != (m.seq, m.publisher, m.pub_seq) {
            return None;
        }
        self.unstable.pop_front()
    }

    /// `m` became stable. Weak sessions were sent it when it was held, or
    /// are sent it now (nothing was held: a relay, a node alone).
    pub(super) fn stabilize(&mut self, m: &Ordered) {
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
    pub(super) fn unheld(&mut self, after: Seq) {
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
            // A claim from its resume, at or past what this server thinks
            // it sent, stands: it is what the client holds.
            let claim = match s.claim {
                Some(c) if c.check.seq >= sent.seq => c,
                _ => Claim {
                    check: sent,
                    agreed: after,
                    stable_only: false,
                },
            };
            if s.claim.is_none() {
                self.checks.push(id);
            }
            let agreed = s.claim.map_or(after, |c| c.agreed.min(after));
            s.claim = Some(Claim { agreed, ..claim });
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
    pub(super) fn resolve_checks(&mut self) {
        if self.checks.is_empty() {
            return;
        }
        // (A strong session's check waits for the stable head; see
        // `hello`.)
        let (weak, stable) = (self.weak_head(), self.head);
        let mut due = Vec::new();
        self.checks.retain(|id| {
            let Some(c) = self
                .sessions
                .get(id)
                .filter(|s| !s.closing)
                .and_then(|s| s.claim)
            else {
                return false;
            };
            let reached = if c.stable_only { stable } else { weak };
            if c.check.seq <= reached {
                due.push((*id, c.check, c.agreed));
            }
            c.check.seq > reached
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
    pub(super) fn diverge(&mut self, session: SessionId, agreed: Seq, seen: Seq) {
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
    pub(super) fn weak_fan_out(&mut self, batch: &[Ordered]) {
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
}
