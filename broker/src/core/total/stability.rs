//! TOTAL's member side: orders taken in, acknowledgements, the stable seq
//! and delivery, and resends of lost orders.

use super::*;
use crate::core::mbrship::wire::Stable;
use crate::core::mbrship::{Status, ViewId};

impl Total {
    /// The stable seq a heartbeat announces: the sequencer's, in a working
    /// view (members learn stability from it when a `Stable` was lost).
    pub(super) fn stable_to_announce(&self, mbr: &Membership) -> Seq {
        match mbr.is_coordinator() {
            true => self.stable,
            false => Seq(0),
        }
    }

    /// TOTAL's part of a heartbeat from the coordinator of `mbr`'s view,
    /// which holds through `have` and announces `stable`.
    pub(super) fn coordinator_heartbeat(
        &mut self,
        mbr: &Membership,
        from: NodeId,
        have: Seq,
        stable: Seq,
    ) {
        let Some(view) = mbr.view_id() else {
            return;
        };
        self.learn_stable(stable);
        // A heartbeat later we still lack what the coordinator held at
        // the previous one: an `Order` was lost with a link. (Comparing
        // with its current `have` would ask for every order in flight.)
        let behind = self.lag_mark.is_some_and(|prev| self.held() < prev);
        if behind && !mbr.awaiting_snapshot() {
            let after = self.held();
            self.resend_asked = Some(after);
            self.send(from, &PeerMsg::Resend { view, after });
        }
        self.lag_mark = Some(have);
    }

    pub(crate) fn on_order(
        &mut self,
        mbr: &Membership,
        from: NodeId,
        view: ViewId,
        first: Seq,
        msgs: Vec<Msg>,
        stable: Seq,
    ) {
        if mbr.status() != Status::Normal
            || mbr.awaiting_snapshot()
            || mbr.view_id() != Some(view)
            || mbr.coordinator() != Some(from)
        {
            return;
        }
        let held = self.held();
        if first > held.next() {
            // Orders were lost with a link: ask once for what is missing.
            if self.resend_asked != Some(held) {
                self.resend_asked = Some(held);
                self.send(from, &PeerMsg::Resend { view, after: held });
            }
            return;
        }
        let skip = (held.0 + 1 - first.0) as usize;
        self.hold_all(
            msgs.into_iter()
                .enumerate()
                .skip(skip)
                .map(|(i, m)| m.ordered(Seq(first.0 + i as u64))),
        );
        if self.held() > held {
            self.resend_asked = None;
            let have = self.held();
            self.send(from, &PeerMsg::Ack { view, have });
        }
        self.learn_stable(stable);
    }

    pub(crate) fn on_ack(&mut self, mbr: &Membership, from: NodeId, view: ViewId, have: Seq) {
        if !mbr.is_coordinator() || mbr.view_id() != Some(view) {
            return;
        }
        if let Some(a) = self.acks.get_mut(&from) {
            *a = (*a).max(have);
        }
        self.advance_stable(mbr);
    }

    /// A `Stable` from the coordinator: the first of an accepted view
    /// commits it (MBRSHIP), the rest move the stable seq.
    pub(crate) fn on_stable(
        &mut self,
        mbr: &mut Membership,
        now: Duration,
        view: ViewId,
        through: Seq,
    ) {
        tracing::trace!(me = %mbr.config().me, view = %view, through = through.0, status = ?mbr.status(), "stable");
        if mbr.view_id() != Some(view) {
            return;
        }
        // The first `Stable` of an accepted view commits it.
        mbr.commit_if_accepted(now, through, self);
        if mbr.status() == Status::Normal {
            self.learn_stable(through);
        }
    }

    pub(crate) fn on_resend(&mut self, mbr: &Membership, from: NodeId, view: ViewId, after: Seq) {
        if !mbr.is_coordinator() || mbr.view_id() != Some(view) {
            return;
        }
        if after < self.delivered {
            // It lacks stable seqs, which it acknowledged: not possible for
            // a member of this view; the failure detector will sort it out.
            tracing::warn!(node = %from, after = after.0, "resend asked below the stable seq");
            return;
        }
        if after >= self.held() {
            // Nothing held past it (and no seq after `u64::MAX` to name).
            return;
        }
        let skip = (after.0 - self.delivered.0) as usize;
        let msgs: Vec<&Ordered> = self.log.iter().skip(skip).collect();
        for frame in self.orders(view, after.next(), &msgs) {
            self.transmits.push_back((from, frame));
        }
    }

    /// `Order` frames for `msgs`, the first of which has seq `first`.
    pub(super) fn orders<T: wire::Carried>(
        &self,
        view: ViewId,
        first: Seq,
        msgs: &[T],
    ) -> Vec<Bytes> {
        let mut at = first;
        frames(msgs, msg_cost)
            .into_iter()
            .map(|chunk| {
                let frame = wire::encode_order(view, at, self.stable, chunk);
                at = Seq(at.0 + chunk.len() as u64);
                frame
            })
            .collect()
    }

    /// Coordinator: the stable seq is the lowest any member holds.
    pub(super) fn advance_stable(&mut self, mbr: &Membership) {
        if mbr.view().is_none() {
            return;
        }
        let held = self.held();
        self.acks.insert(mbr.config().me, held);
        let acks = &self.acks;
        let stable = mbr
            .view()
            .into_iter()
            .flat_map(|v| &v.members)
            .map(|m| acks.get(&m.node).copied().unwrap_or(Seq(0)))
            .min()
            .unwrap_or(held);
        self.learn_stable(stable);
    }

    /// Coordinator: tells members the stable seq if it moved since the last
    /// announcement (once per input, not once per acknowledgement).
    pub(crate) fn announce_stable(&mut self, mbr: &Membership) {
        if !mbr.is_coordinator() || self.stable <= self.stable_sent {
            return;
        }
        self.stable_sent = self.stable;
        let Some(view) = mbr.view_id() else {
            return;
        };
        let msg = PeerMsg::Stable(Stable {
            view,
            through: self.stable,
        });
        self.send_members(mbr, &msg);
    }

    fn learn_stable(&mut self, stable: Seq) {
        if stable > self.stable {
            self.stable = stable;
        }
        let through = if self.bugs.deliver_unstable {
            self.held()
        } else {
            self.stable.min(self.held())
        };
        self.deliver_through(through);
    }

    /// Delivers the log up to `through` and forgets own submissions that
    /// are now delivered.
    pub(crate) fn deliver_through(&mut self, through: Seq) {
        if through <= self.delivered {
            return;
        }
        let n = (through.0 - self.delivered.0) as usize;
        let batch: Vec<_> = self.log.drain(..n).collect();
        for m in &batch {
            self.log_bytes = self.log_bytes.saturating_sub(m.cost());
        }
        self.delivered = through;
        for m in &batch {
            if let Some(p) = self.publishers.get_mut(m.publisher) {
                p.delivered = p.delivered.max(m.pub_seq);
            }
        }
        self.forget_delivered_submissions();
        self.events.push_back(Event::Deliver(batch));
    }

    /// Forgets own submissions, oldest first, that the table says are
    /// delivered.
    pub(super) fn forget_delivered_submissions(&mut self) {
        while let Some(Submitted(_, front)) = self.unordered.front() {
            let done = self
                .publishers
                .get(front.0)
                .is_some_and(|p| p.delivered >= front.1);
            if !done {
                break;
            }
            self.unordered.pop_front();
        }
    }
}
