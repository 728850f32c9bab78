//! TOTAL: the sequencer, stability and delivery within one view.
//!
//! The view's coordinator orders submissions as they arrive (FIFO per link
//! keeps each member's submissions in its order), drops retries by its
//! publisher table, and tells members the seqs with `Order`. A seq is
//! stable once every member acknowledged holding it; members deliver only
//! stable seqs. Lost frames are recovered from: acknowledgements repeat in
//! heartbeats, a member that sees a seq gap asks for a `Resend`, and a
//! member whose submissions make no progress submits them again.
//!
//! This file holds the state (with the named calls MBRSHIP changes it
//! through) and the member side; `sequencer` the coordinator's ordering
//! and every member's own submissions.

use super::wire::{Msg, PeerMsg, Snapshot, Submitted};
use super::{Event, Group, NodeId, PubState, Status, ViewId};
use crate::core::retention::Ordered;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

mod sequencer;

/// TOTAL's state: the log, stability, the publisher table, own
/// submissions.
pub(super) struct Total {
    /// The last seq delivered.
    delivered: Seq,
    /// Messages held after `delivered`, contiguous.
    log: VecDeque<Ordered>,
    /// What `log` holds, as `Ordered::cost` counts it.
    log_bytes: usize,
    /// The last seq known stable in the view.
    stable: Seq,
    /// Coordinator: the last seq each member holds.
    acks: BTreeMap<NodeId, Seq>,
    /// Coordinator: the stable seq last announced.
    stable_sent: Seq,
    /// A `Resend` was asked after this seq and not yet answered.
    resend_asked: Option<Seq>,
    /// The coordinator's `have` in its previous heartbeat.
    lag_mark: Option<Seq>,
    publishers: HashMap<PublisherId, PubState>,
    /// The number the next own submission gets (see `Submit`'s `first`).
    submit_next: u64,
    /// Sequencer: per member, one past the last submission number received
    /// in this view (a larger `first` means a `Submit` was lost).
    submit_seen: BTreeMap<NodeId, u64>,
    /// Whether the publisher table ever forgot a publisher (then an unknown
    /// publisher's publish may be a forgotten one's, and is ordered).
    evicted_any: bool,
    /// Own submissions not yet delivered, in submission order, numbered
    /// contiguously from `submit_next - unordered.len()`.
    unordered: VecDeque<Submitted>,
    /// Since when the front of `unordered` has been the same publish.
    resubmit_check: (Duration, Option<(PublisherId, PubSeq)>),
    /// Tests: every publisher the table forgot, with the last pub_seq it
    /// had then (the simulator excuses an old retry of one of those ordered
    /// again, the documented price of the bound).
    #[cfg(test)]
    forgotten: HashMap<PublisherId, PubSeq>,
}

/// TOTAL's state as MBRSHIP changes it: the named calls of a view change,
/// a new stream and a snapshot.
impl Total {
    /// Debug builds: TOTAL's invariants (module docs of `group`).
    pub(super) fn check_invariants(&self) {
        debug_assert!(
            self.delivered <= self.stable,
            "invariant: nothing delivered past the stable seq ({:?} > {:?})",
            self.delivered,
            self.stable
        );
        if let (Some(first), Some(last)) = (self.log.front(), self.log.back()) {
            debug_assert_eq!(
                first.seq,
                self.delivered.next(),
                "invariant: the log follows the delivered seq"
            );
            debug_assert_eq!(last.seq, self.held(), "invariant: the log is contiguous");
        }
    }

    /// Nothing held, delivered or submitted yet.
    pub(super) fn new(now: Duration) -> Self {
        Total {
            delivered: Seq(0),
            log: VecDeque::new(),
            log_bytes: 0,
            stable: Seq(0),
            acks: BTreeMap::new(),
            stable_sent: Seq(0),
            resend_asked: None,
            lag_mark: None,
            publishers: HashMap::new(),
            submit_next: 0,
            submit_seen: BTreeMap::new(),
            evicted_any: false,
            unordered: VecDeque::new(),
            resubmit_check: (now, None),
            #[cfg(test)]
            forgotten: HashMap::new(),
        }
    }

    /// The last seq delivered.
    pub(super) fn delivered(&self) -> Seq {
        self.delivered
    }

    /// The last seq known stable.
    pub(super) fn stable(&self) -> Seq {
        self.stable
    }

    /// The last seq held.
    pub(super) fn held(&self) -> Seq {
        Seq(self.delivered.0 + self.log.len() as u64)
    }

    /// The held messages after `from` (at least the last delivered seq).
    pub(super) fn held_after(&self, from: Seq) -> Vec<Msg> {
        let skip = from.0.saturating_sub(self.delivered.0) as usize;
        self.log.iter().skip(skip).map(Msg::of).collect()
    }

    /// Empties the log (its messages are replaced by a snapshot or a new
    /// stream).
    pub(super) fn clear_log(&mut self) {
        self.log.clear();
        self.log_bytes = 0;
    }

    /// A new stream begins: nothing held or delivered, no publisher known.
    pub(super) fn begin_stream(&mut self) {
        self.clear_log();
        self.delivered = Seq(0);
        self.stable = Seq(0);
        self.publishers.clear();
        self.evicted_any = false;
    }

    /// Drops the held messages after `through` (a view change left them
    /// out). The publisher table forgets them too, so that their
    /// publishers' resubmissions are ordered rather than taken for retries.
    pub(super) fn truncate(&mut self, through: Seq) {
        let keep = through.0.saturating_sub(self.delivered.0) as usize;
        if keep >= self.log.len() {
            return;
        }
        for m in self.log.drain(keep..) {
            self.log_bytes = self.log_bytes.saturating_sub(m.cost());
            if let Some(p) = self.publishers.get_mut(&m.publisher) {
                if p.held >= m.pub_seq {
                    p.held = PubSeq(m.pub_seq.0.saturating_sub(1)).max(p.delivered);
                }
            }
        }
    }

    /// A view of `members` is installed with everything through `at`
    /// delivered: ordering starts again from there.
    pub(super) fn begin_view(&mut self, members: impl Iterator<Item = NodeId>, at: Seq) {
        self.stable = at;
        self.stable_sent = at;
        self.resend_asked = None;
        self.lag_mark = None;
        self.acks = members.map(|n| (n, at)).collect();
        // Every member resubmits from its front as the view begins.
        self.submit_seen.clear();
    }

    /// Replaces everything delivered with a snapshot's state.
    pub(super) fn install(&mut self, state: &Snapshot) {
        self.evicted_any = state.evicted;
        self.clear_log();
        self.delivered = state.head;
        self.stable = state.head;
        self.publishers = state
            .publishers
            .iter()
            .map(|&(id, pub_seq, seq)| {
                let entry = PubState {
                    held: pub_seq,
                    delivered: pub_seq,
                    seq,
                    revived: state.evicted,
                };
                (id, entry)
            })
            .collect();
    }

    /// The server left its view (a rejoin): the view's acknowledgements
    /// go. The log and own submissions stay (module docs, "Restart
    /// safety"), unless `clear_queue`, the broken build that drops them.
    pub(super) fn leave_view(&mut self, clear_queue: bool) {
        if clear_queue {
            self.unordered.clear();
        }
        self.acks.clear();
    }
}

/// Messages per `Order` or `Submit` frame at most...
const FRAME_MSGS_MAX: usize = 4096;
/// ...and bytes (a larger single message goes alone).
const FRAME_BYTES_MAX: usize = 8 << 20;

/// Splits `msgs` into runs that each fit one frame.
fn frames<T>(msgs: &[T], cost: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in msgs.iter().enumerate() {
        let c = cost(m);
        if i > start && (i - start >= FRAME_MSGS_MAX || bytes + c > FRAME_BYTES_MAX) {
            out.push(&msgs[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += c;
    }
    if start < msgs.len() {
        out.push(&msgs[start..]);
    }
    out
}

fn msg_cost(m: &Msg) -> usize {
    m.2.len() + m.3.len() + 32
}

impl Group {
    fn is_coordinator(&self) -> bool {
        self.status() == Status::Normal && self.coordinator() == Some(self.config.me)
    }

    /// The last seq this server holds (ordered, maybe not yet stable).
    pub fn held(&self) -> Seq {
        self.total.held()
    }

    /// The stable seq a heartbeat announces: the sequencer's, in a working
    /// view (members learn stability from it when a `Stable` was lost).
    pub(super) fn stable_to_announce(&self) -> Seq {
        match self.is_coordinator() {
            true => self.total.stable,
            false => Seq(0),
        }
    }

    /// TOTAL's part of a heartbeat from the coordinator of view `view`,
    /// which holds through `have` and announces `stable`.
    pub(super) fn coordinator_heartbeat(
        &mut self,
        from: NodeId,
        view: ViewId,
        have: Seq,
        stable: Seq,
    ) {
        self.learn_stable(stable);
        // A heartbeat later we still lack what the coordinator held at
        // the previous one: an `Order` was lost with a link. (Comparing
        // with its current `have` would ask for every order in flight.)
        let behind = self.total.lag_mark.is_some_and(|prev| self.held() < prev);
        if behind && !self.awaiting_snapshot() {
            let after = self.held();
            self.total.resend_asked = Some(after);
            self.send(from, &PeerMsg::Resend { view, after });
        }
        self.total.lag_mark = Some(have);
    }

    pub(super) fn on_order(
        &mut self,
        from: NodeId,
        view: ViewId,
        first: Seq,
        msgs: Vec<Msg>,
        stable: Seq,
    ) {
        if self.status() != Status::Normal
            || self.awaiting_snapshot()
            || self.view_id() != Some(view)
            || self.coordinator() != Some(from)
        {
            return;
        }
        let held = self.held();
        if first > held.next() {
            // Orders were lost with a link: ask once for what is missing.
            if self.total.resend_asked != Some(held) {
                self.total.resend_asked = Some(held);
                self.send(from, &PeerMsg::Resend { view, after: held });
            }
            return;
        }
        let skip = (held.0 + 1 - first.0) as usize;
        for (i, m) in msgs.into_iter().enumerate().skip(skip) {
            self.hold(m.ordered(Seq(first.0 + i as u64)));
        }
        if self.held() > held {
            self.total.resend_asked = None;
            let have = self.held();
            self.send(from, &PeerMsg::Ack { view, have });
        }
        self.learn_stable(stable);
    }

    pub(super) fn on_ack(&mut self, from: NodeId, view: ViewId, have: Seq) {
        if !self.is_coordinator() || self.view_id() != Some(view) {
            return;
        }
        if let Some(a) = self.total.acks.get_mut(&from) {
            *a = (*a).max(have);
        }
        self.advance_stable();
    }

    pub(super) fn on_stable(&mut self, now: std::time::Duration, view: ViewId, through: Seq) {
        tracing::trace!(me = %self.config.me, view = %view, through = through.0, status = ?self.status(), "stable");
        if self.view_id() != Some(view) {
            return;
        }
        // The first `Stable` of an accepted view commits it.
        self.commit_if_accepted(now, through);
        if self.status() == Status::Normal {
            self.learn_stable(through);
        }
    }

    pub(super) fn on_resend(&mut self, from: NodeId, view: ViewId, after: Seq) {
        if !self.is_coordinator() || self.view_id() != Some(view) {
            return;
        }
        if after < self.total.delivered {
            // It lacks stable seqs, which it acknowledged: not possible for
            // a member of this view; the failure detector will sort it out.
            tracing::warn!(node = %from, after = after.0, "resend asked below the stable seq");
            return;
        }
        let skip = (after.0 - self.total.delivered.0) as usize;
        let msgs: Vec<Msg> = self.total.log.iter().skip(skip).map(Msg::of).collect();
        for msg in self.orders(view, after.next(), &msgs) {
            self.send(from, &msg);
        }
    }

    /// `Order` frames for `msgs`, the first of which has seq `first`.
    fn orders(&self, view: ViewId, first: Seq, msgs: &[Msg]) -> Vec<PeerMsg> {
        let mut at = first;
        frames(msgs, msg_cost)
            .into_iter()
            .map(|chunk| {
                let msg = PeerMsg::Order {
                    view,
                    first: at,
                    msgs: chunk.to_vec(),
                    stable: self.total.stable,
                };
                at = Seq(at.0 + chunk.len() as u64);
                msg
            })
            .collect()
    }

    /// Coordinator: the stable seq is the lowest any member holds.
    fn advance_stable(&mut self) {
        if self.view().is_none() {
            return;
        }
        let held = self.held();
        self.total.acks.insert(self.config.me, held);
        let acks = &self.total.acks;
        let stable = self
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
    pub(super) fn announce_stable(&mut self) {
        if !self.is_coordinator() || self.total.stable <= self.total.stable_sent {
            return;
        }
        self.total.stable_sent = self.total.stable;
        let Some(view) = self.view_id() else {
            return;
        };
        let msg = PeerMsg::Stable {
            view,
            through: self.total.stable,
        };
        self.send_members(&msg);
    }

    pub(super) fn learn_stable(&mut self, stable: Seq) {
        if stable > self.total.stable {
            self.total.stable = stable;
        }
        let through = if self.bugs.deliver_unstable {
            self.held()
        } else {
            self.total.stable.min(self.held())
        };
        self.deliver_through(through);
    }

    /// Delivers the log up to `through` and forgets own submissions that
    /// are now delivered.
    pub(super) fn deliver_through(&mut self, through: Seq) {
        if through <= self.total.delivered {
            return;
        }
        let n = (through.0 - self.total.delivered.0) as usize;
        let batch: Vec<_> = self.total.log.drain(..n).collect();
        for m in &batch {
            self.total.log_bytes = self.total.log_bytes.saturating_sub(m.cost());
        }
        self.total.delivered = through;
        for m in &batch {
            if let Some(p) = self.total.publishers.get_mut(&m.publisher) {
                p.delivered = p.delivered.max(m.pub_seq);
            }
        }
        self.forget_delivered_submissions();
        self.events.push_back(Event::Deliver(batch));
    }

    /// Forgets own submissions, oldest first, that the table says are
    /// delivered.
    fn forget_delivered_submissions(&mut self) {
        while let Some(Submitted(_, front)) = self.total.unordered.front() {
            let done = self
                .total
                .publishers
                .get(&front.0)
                .is_some_and(|p| p.delivered >= front.1);
            if !done {
                break;
            }
            self.total.unordered.pop_front();
        }
    }
}

/// TOTAL's part of the group's interface: the delivered position and the
/// publisher table as the server above asks for them, and own
/// submissions.
impl Group {
    /// The last seq delivered.
    pub fn delivered(&self) -> Seq {
        self.total.delivered
    }

    /// The last pub_seq of `publisher` delivered here (what a publisher
    /// that attaches here is told has been acknowledged).
    pub fn pub_delivered(&self, publisher: PublisherId) -> PubSeq {
        self.total
            .publishers
            .get(&publisher)
            .map_or(PubSeq(0), |p| p.delivered)
    }

    /// The delivered publisher table as a snapshot carries it (publisher,
    /// last pub_seq delivered, its seq), and whether the table ever forgot
    /// a publisher: the table the sequencer drops retries by, which a
    /// joining server must take over as it is.
    pub fn publisher_table(&self) -> (Vec<(PublisherId, PubSeq, Seq)>, bool) {
        let mut table: Vec<_> = self
            .total
            .publishers
            .iter()
            .filter(|(_, p)| p.delivered > PubSeq(0))
            .map(|(&id, p)| (id, p.delivered, p.seq))
            .collect();
        table.sort_unstable();
        (table, self.total.evicted_any)
    }

    /// When everything of `publisher` held here is delivered: its last
    /// pub_seq and that publish's seq (an acknowledgement for a retry).
    pub fn pub_acknowledged(&self, publisher: PublisherId) -> Option<(PubSeq, Seq)> {
        self.total
            .publishers
            .get(&publisher)
            .filter(|p| p.delivered > PubSeq(0) && p.held == p.delivered)
            .map(|p| (p.delivered, p.seq))
    }

    /// The last pub_seq of `publisher` held here (ordered, maybe not yet
    /// delivered), when the table can vouch for it: in a primary view it
    /// then covers every publish acknowledged anywhere (acknowledged means
    /// stable, held by every member). `None` when the table does not know
    /// the publisher, or its entry was made after the table forgot
    /// publishers (docs/DESIGN.md, "Bounds").
    pub fn pub_held(&self, publisher: PublisherId) -> Option<PubSeq> {
        self.total
            .publishers
            .get(&publisher)
            .filter(|p| !p.revived)
            .map(|p| p.held)
    }

    /// Test builds: the publishers the table forgot since the last call,
    /// with the last pub_seq each had then.
    #[cfg(test)]
    pub(crate) fn take_forgotten(&mut self) -> HashMap<PublisherId, PubSeq> {
        std::mem::take(&mut self.total.forgotten)
    }

    /// How many submissions made here wait to be delivered.
    pub fn unordered_len(&self) -> usize {
        self.total.unordered.len()
    }

    /// Test builds: the oldest submission waiting here, as (publisher,
    /// pub_seq, the pub_seq it follows).
    #[cfg(test)]
    pub(crate) fn unordered_front(&self) -> Option<(PublisherId, PubSeq, PubSeq)> {
        self.total
            .unordered
            .front()
            .map(|Submitted(after, m)| (m.0, m.1, *after))
    }

    /// How many more publishes `submit` may take now (its bound,
    /// `unordered_max`, less what waits to be ordered).
    pub fn unordered_room(&self) -> usize {
        self.config
            .unordered_max
            .saturating_sub(self.total.unordered.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_by_count_and_by_bytes() {
        let small = vec![1usize; FRAME_MSGS_MAX * 2 + 1];
        let runs = frames(&small, |&c| c);
        assert_eq!(
            runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            vec![FRAME_MSGS_MAX, FRAME_MSGS_MAX, 1]
        );
        let big = vec![
            FRAME_BYTES_MAX / 2 + 1,
            FRAME_BYTES_MAX / 2,
            1,
            FRAME_BYTES_MAX * 3,
        ];
        let runs = frames(&big, |&c| c);
        // A message larger than the byte bound still goes, alone.
        assert_eq!(
            runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            vec![1, 2, 1]
        );
        assert!(frames(&Vec::<usize>::new(), |&c| c).is_empty());
    }
}
