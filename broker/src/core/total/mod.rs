//! TOTAL, the layer above MBRSHIP: the sequencer, stability and delivery
//! within a view, the one publisher table and its pub_seq rule, and this
//! server's own submissions (docs/DESIGN.md, "Layers").
//!
//! The view's coordinator orders submissions as they arrive (FIFO per link
//! keeps each member's submissions in its order), drops retries by its
//! publisher table, and tells members the seqs with `Order`. A seq is
//! stable once every member acknowledged holding it; members deliver only
//! stable seqs. Lost frames are recovered from: acknowledgements repeat in
//! heartbeats, a member that sees a seq gap asks for a `Resend`, and a
//! member whose submissions make no progress submits them again.
//!
//! TOTAL reads MBRSHIP (the view, who coordinates, whether it is primary),
//! which each call that depends on it is given, and implements what
//! MBRSHIP asks of the layer above ([`Above`]): the flush reads what is
//! held, a view's history is held and truncated here, and views, resets
//! and snapshots reach the server as [`Event`]s in stream order. This file
//! holds the state, those calls and the table's queries; `stability` the
//! member side (orders, acknowledgements, stability, delivery);
//! `sequencer` the coordinator's ordering and every member's own
//! submissions; `wire` the group's messages.
//!
//! # Protocol in brief
//! - **Ordering.** A view's coordinator (its lowest-numbered proposer) is the
//!   sequencer. Members forward publishes with `Submit`; the sequencer gives
//!   them the next seqs and sends `Order` to every member; members answer
//!   with cumulative `Ack`s; a seq held by every member is **stable**, and
//!   only stable messages are delivered (docs/DESIGN.md guarantee 5). Seqs
//!   continue across views. Retries are deduplicated by the sequencer's
//!   publisher table, which every member keeps too.
//! - **Own submissions survive a rejoin** (the node's membership events are
//!   submitted once; a missing pub_seq would hold back every later one).
//!   They are dropped only when the stream itself changes: they were made
//!   against the old stream's publisher tables, and their publishers are
//!   told the stream reset.
//! - **Eviction and first contact.** A member numbers its submissions; the
//!   sequencer drops a `Submit` that does not continue what it received
//!   from that member (one was lost with a link), so a publish never
//!   overtakes a lost predecessor, which a table that forgot its publisher
//!   could not tell. (What eviction still costs: an old retry of a
//!   forgotten publisher may be ordered again.) Each member's table evicts
//!   on its own, so a member may forget a publisher the sequencer still
//!   knows: when the sequencer drops a member's submission as a retry it
//!   says so (`Retried`, with its entry for the publisher), and a member
//!   that delivered that seq learns the entry, forgets the submission and
//!   acknowledges the publisher (`Event::Retried`); otherwise it would wait
//!   for that retry's delivery for good. An entry made after the table
//!   forgot anyone vouches for nothing but the retries at or below it
//!   (docs/DESIGN.md, "Bounds").
//!
//! # Invariants
//! After every input (debug builds assert it, [`Total::check_invariants`]):
//! nothing is delivered past the stable seq; the log holds exactly the seqs
//! after the delivered one. Everything is bounded: the log by `log_len_max`
//! and `log_bytes_max` (the sequencer stops ordering at the bound),
//! unordered submissions by `unordered_max` (the server's own membership
//! events pass it), the publisher table by `publishers_max` plus the
//! publishers of messages still in the log (only publishers whose messages
//! are all delivered are evicted), the events and frames an input queues by
//! what the input carries.

mod publishers;
mod sequencer;
mod stability;
pub mod wire;

use crate::core::mbrship::wire::MbrMsg;
use crate::core::mbrship::{Above, Membership, NodeId, View};
use crate::core::stream::{Msg, Ordered, Snapshot};
use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
pub use publishers::{Next, PubState, PublisherTable};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use wire::{PeerMsg, Submitted};

/// What the group tells its server, in stream order.
#[derive(Clone, Debug)]
pub enum Event {
    /// Stable messages, contiguous after the last delivered seq.
    Deliver(Vec<Ordered>),
    /// Messages this server now holds, ordered but not yet stable,
    /// contiguous after the last held one (what weak delivery sends). The
    /// same messages come again in `Deliver` once stable, unless an
    /// `Unheld` or `Reset` takes them back first.
    Held(Vec<Ordered>),
    /// A view change dropped the held messages after `after` (they were
    /// never stable); `Held` events carry what the new view orders there.
    Unheld {
        /// The last held seq kept.
        after: Seq,
    },
    /// A view was installed after `at`, the last seq of the old view.
    View {
        /// The view.
        view: View,
        /// The last seq delivered before it.
        at: Seq,
    },
    /// Build a snapshot of the delivered state (through the last delivered
    /// seq) and pass it to `Group::send_snapshot` for `to`, at once.
    SnapshotNeeded {
        /// The lagging member.
        to: NodeId,
    },
    /// Replace all delivered state with this snapshot; the stream continues
    /// after its head.
    Reset(Snapshot),
    /// This server is not in a primary view: it orders nothing, and its
    /// clients should move. Cleared by the next `View`.
    NotPrimary,
    /// A retry submitted here was delivered earlier, as the sequencer said,
    /// though this server's table had forgotten its publisher: the
    /// publisher is acknowledged through `pub_seq` (at `seq`).
    Retried {
        /// The publisher.
        publisher: PublisherId,
        /// The last pub_seq of it delivered.
        pub_seq: PubSeq,
        /// The seq of that publish.
        seq: Seq,
    },
}

/// TOTAL's bounds.
#[derive(Clone, Debug)]
pub struct TotalConfig {
    /// Submitted but not yet delivered publishes held at most.
    pub unordered_max: usize,
    /// Ordered but not yet stable messages the sequencer holds at most.
    pub log_len_max: usize,
    /// ...and their bytes at most (so a flush fits in a few frames).
    pub log_bytes_max: usize,
    /// Publishers whose deduplication state is kept.
    pub publishers_max: usize,
}

impl Default for TotalConfig {
    fn default() -> Self {
        TotalConfig {
            unordered_max: 1 << 20,
            log_len_max: 1 << 20,
            log_bytes_max: 64 << 20,
            publishers_max: 100_000,
        }
    }
}

/// TOTAL's deliberate protocol bugs, for tests proving the simulator's
/// checkers (`core::group::GroupBugs` sets them).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TotalBugs {
    /// A sequencer that gives a fresh seq to every submission, retries too.
    pub no_dedup: bool,
    /// Deliver on ordering, before stability.
    pub deliver_unstable: bool,
    /// Drop held messages at a view change without saying so (`Unheld`).
    pub silent_unhold: bool,
    /// Drop own submissions on a rejoin.
    pub clear_queue_on_rejoin: bool,
    /// Order a `Submit` that follows a lost one.
    pub order_past_lost_submit: bool,
}

impl TotalBugs {
    /// Whether any bug is on.
    pub(crate) fn any(&self) -> bool {
        let TotalBugs {
            no_dedup,
            deliver_unstable,
            silent_unhold,
            clear_queue_on_rejoin,
            order_past_lost_submit,
        } = *self;
        no_dedup
            || deliver_unstable
            || silent_unhold
            || clear_queue_on_rejoin
            || order_past_lost_submit
    }
}

/// TOTAL's counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TotalStats {
    /// Messages this server ordered as sequencer.
    pub ordered: u64,
    /// Submissions dropped as retries by the sequencer.
    pub duplicates: u64,
    /// Submissions sent again after a view change or a broken link.
    pub resubmitted: u64,
}

/// TOTAL's state: the log, stability, the publisher table, own
/// submissions.
pub(crate) struct Total {
    config: TotalConfig,
    pub(crate) bugs: TotalBugs,
    stats: TotalStats,
    /// Events for the server, in stream order.
    events: VecDeque<Event>,
    /// Frames to send, with their destinations.
    transmits: VecDeque<(NodeId, Bytes)>,
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
    /// The group's publisher table (every member keeps the sequencer's).
    publishers: PublisherTable,
    /// The number the next own submission gets (see `Submit`'s `first`).
    submit_next: u64,
    /// Sequencer: per member, one past the last submission number received
    /// in this view (a larger `first` means a `Submit` was lost).
    submit_seen: BTreeMap<NodeId, u64>,
    /// Own submissions not yet delivered, in submission order, numbered
    /// contiguously from `submit_next - unordered.len()`.
    unordered: VecDeque<Submitted>,
    /// Since when the front of `unordered` has been the same publish.
    resubmit_check: (Duration, Option<(PublisherId, PubSeq)>),
}

/// TOTAL's state, and the calls that change it as a whole: a new stream, a
/// view's history, a snapshot.
impl Total {
    /// Debug builds: the invariants of the module docs.
    pub(crate) fn check_invariants(&self) {
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
    pub(crate) fn new(now: Duration, config: TotalConfig) -> Self {
        Total {
            publishers: PublisherTable::new(config.publishers_max),
            config,
            bugs: TotalBugs::default(),
            stats: TotalStats::default(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            delivered: Seq(0),
            log: VecDeque::new(),
            log_bytes: 0,
            stable: Seq(0),
            acks: BTreeMap::new(),
            stable_sent: Seq(0),
            resend_asked: None,
            lag_mark: None,
            submit_next: 0,
            submit_seen: BTreeMap::new(),
            unordered: VecDeque::new(),
            resubmit_check: (now, None),
        }
    }

    /// The last seq held.
    pub(crate) fn held(&self) -> Seq {
        Seq(self.delivered.0 + self.log.len() as u64)
    }

    /// The held messages after `from` (at least the last delivered seq).
    fn held_after(&self, from: Seq) -> Vec<Msg> {
        let skip = from.0.saturating_sub(self.delivered.0) as usize;
        self.log.iter().skip(skip).map(Msg::of).collect()
    }

    /// Empties the log (its messages are replaced by a snapshot or a new
    /// stream).
    fn clear_log(&mut self) {
        self.log.clear();
        self.log_bytes = 0;
    }

    /// A new stream begins: nothing held or delivered, no publisher known.
    fn begin_stream(&mut self) {
        self.clear_log();
        self.delivered = Seq(0);
        self.stable = Seq(0);
        self.publishers.reset(false);
    }

    /// Drops the held messages after `through` (a view change left them
    /// out). The publisher table forgets them too, so that their
    /// publishers' resubmissions are ordered rather than taken for retries.
    fn drop_held_after(&mut self, through: Seq) {
        let keep = through.0.saturating_sub(self.delivered.0) as usize;
        if keep >= self.log.len() {
            return;
        }
        for m in self.log.drain(keep..) {
            self.log_bytes = self.log_bytes.saturating_sub(m.cost());
            if let Some(p) = self.publishers.get_mut(m.publisher) {
                if p.held >= m.pub_seq {
                    p.held = PubSeq(m.pub_seq.0.saturating_sub(1)).max(p.delivered);
                }
            }
        }
    }

    /// A view of `members` is installed with everything through `at`
    /// delivered: ordering starts again from there.
    fn begin_view(&mut self, members: impl Iterator<Item = NodeId>, at: Seq) {
        self.stable = at;
        self.stable_sent = at;
        self.resend_asked = None;
        self.lag_mark = None;
        self.acks = members.map(|n| (n, at)).collect();
        // Every member resubmits from its front as the view begins.
        self.submit_seen.clear();
    }

    /// Replaces everything delivered with a snapshot's state.
    fn install_state(&mut self, state: &Snapshot) {
        self.clear_log();
        self.delivered = state.head;
        self.stable = state.head;
        self.publishers.install(&state.publishers, state.evicted);
    }

    /// The server left its view (a rejoin): the view's acknowledgements
    /// go. The log and own submissions stay (module docs), unless the
    /// broken build that drops them.
    fn leave_view(&mut self) {
        if self.bugs.clear_queue_on_rejoin {
            self.unordered.clear();
        }
        self.acks.clear();
    }
}

/// What MBRSHIP asks of TOTAL.
impl Above for Total {
    fn delivered(&self) -> Seq {
        self.delivered
    }

    fn held(&self) -> Seq {
        Total::held(self)
    }

    fn stable(&self) -> Seq {
        self.stable
    }

    fn held_after(&self, from: Seq) -> Vec<Msg> {
        Total::held_after(self, from)
    }

    fn hold(&mut self, m: Ordered) {
        Total::hold(self, m)
    }

    fn truncate(&mut self, through: Seq) {
        if Total::held(self) <= through {
            return;
        }
        if !self.bugs.silent_unhold {
            self.events.push_back(Event::Unheld { after: through });
        }
        self.drop_held_after(through);
    }

    fn deliver_through(&mut self, through: Seq) {
        Total::deliver_through(self, through)
    }

    fn new_stream(&mut self, stream: u64) {
        self.begin_stream();
        self.drop_old_stream_submissions();
        self.events.push_back(Event::Reset(Snapshot {
            stream,
            // Nobody's membership carries over to a new stream.
            members: Some(canopy_client::protocol::MembersHead::default()),
            ..Snapshot::default()
        }));
    }

    fn install(&mut self, state: Snapshot, other_stream: bool) {
        self.install_state(&state);
        self.events.push_back(Event::Reset(state));
        if other_stream {
            self.drop_old_stream_submissions();
        }
    }

    fn snapshot_needed(&mut self, to: NodeId) {
        self.events.push_back(Event::SnapshotNeeded { to });
    }

    fn view_installed(&mut self, mbr: &Membership, at: Seq) {
        let Some(view) = mbr.view() else {
            return;
        };
        self.begin_view(view.members.iter().map(|m| m.node), at);
        self.events.push_back(Event::View {
            view: view.clone(),
            at,
        });
        // Ordering resumes: first what our clients submitted meanwhile.
        self.resubmit(mbr);
    }

    fn left_view(&mut self) {
        self.leave_view();
    }

    fn not_primary(&mut self) {
        self.events.push_back(Event::NotPrimary);
    }

    fn heartbeat_stable(&self, mbr: &Membership) -> Seq {
        self.stable_to_announce(mbr)
    }

    fn member_holds(&mut self, mbr: &Membership, from: NodeId, have: Seq) {
        if let Some(view) = mbr.view_id() {
            self.on_ack(mbr, from, view, have);
        }
    }

    fn coordinator_heartbeat(&mut self, mbr: &Membership, from: NodeId, have: Seq, stable: Seq) {
        Total::coordinator_heartbeat(self, mbr, from, have, stable);
    }

    fn heartbeat_tick(&mut self, mbr: &Membership, now: Duration) {
        self.check_progress(mbr, now);
    }

    fn send(&mut self, to: &[NodeId], msg: MbrMsg) {
        let frame = wire::encode(&PeerMsg::from(msg));
        for &n in to {
            self.transmits.push_back((n, frame.clone()));
        }
    }
}

/// TOTAL's outputs and queries: the delivered position and the publisher
/// table as the server above asks for them, and own submissions.
impl Total {
    /// The next event for the server, in stream order.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next frame to send, with its destination.
    pub(crate) fn poll_transmit(&mut self) -> Option<(NodeId, Bytes)> {
        self.transmits.pop_front()
    }

    /// Counters since start.
    pub(crate) fn stats(&self) -> TotalStats {
        self.stats
    }

    /// Sends `msg` to `to`.
    fn send(&mut self, to: NodeId, msg: &PeerMsg) {
        self.transmits.push_back((to, wire::encode(msg)));
    }

    /// Sends one encoding of `msg` to every member of `mbr`'s view but
    /// this one.
    fn send_members(&mut self, mbr: &Membership, msg: &PeerMsg) {
        self.send_frame_members(mbr, wire::encode(msg));
    }

    /// Sends an encoded frame to every member of `mbr`'s view but this one.
    fn send_frame_members(&mut self, mbr: &Membership, frame: Bytes) {
        for n in mbr.others() {
            self.transmits.push_back((n, frame.clone()));
        }
    }

    /// The last seq delivered.
    pub(crate) fn delivered(&self) -> Seq {
        self.delivered
    }

    /// The last pub_seq of `publisher` delivered here (what a publisher
    /// that attaches here is told has been acknowledged).
    pub(crate) fn pub_delivered(&self, publisher: PublisherId) -> PubSeq {
        self.publishers
            .get(publisher)
            .map_or(PubSeq(0), |p| p.delivered)
    }

    /// The delivered publisher table as a snapshot carries it (publisher,
    /// last pub_seq delivered, its seq), and whether the table ever forgot
    /// a publisher: the table the sequencer drops retries by, which a
    /// joining server must take over as it is.
    pub(crate) fn publisher_table(&self) -> (Vec<(PublisherId, PubSeq, Seq)>, bool) {
        (self.publishers.rows(), self.publishers.evicted_any())
    }

    /// When everything of `publisher` held here is delivered: its last
    /// pub_seq and that publish's seq (an acknowledgement for a retry).
    pub(crate) fn pub_acknowledged(&self, publisher: PublisherId) -> Option<(PubSeq, Seq)> {
        self.publishers
            .get(publisher)
            .filter(|p| p.delivered > PubSeq(0) && p.held == p.delivered)
            .map(|p| (p.delivered, p.seq))
    }

    /// The last pub_seq of `publisher` held here (ordered, maybe not yet
    /// delivered), when the table can vouch for it: in a primary view it
    /// then covers every publish acknowledged anywhere (acknowledged means
    /// stable, held by every member). `None` when the table does not know
    /// the publisher, or its entry was made after the table forgot
    /// publishers (docs/DESIGN.md, "Bounds").
    pub(crate) fn pub_held(&self, publisher: PublisherId) -> Option<PubSeq> {
        self.publishers.vouched(publisher)
    }

    /// Test builds: the publishers the table forgot since the last call,
    /// with the last pub_seq each had then.
    #[cfg(test)]
    pub(crate) fn take_forgotten(&mut self) -> std::collections::HashMap<PublisherId, PubSeq> {
        self.publishers.take_forgotten()
    }

    /// How many submissions made here wait to be delivered.
    pub(crate) fn unordered_len(&self) -> usize {
        self.unordered.len()
    }

    /// Test builds: the oldest submission waiting here, as (publisher,
    /// pub_seq, the pub_seq it follows).
    #[cfg(test)]
    pub(crate) fn unordered_front(&self) -> Option<(PublisherId, PubSeq, PubSeq)> {
        self.unordered
            .front()
            .map(|Submitted(after, m)| (m.0, m.1, *after))
    }

    /// How many more publishes `submit` may take now (its bound,
    /// `unordered_max`, less what waits to be ordered).
    pub(crate) fn unordered_room(&self) -> usize {
        self.config
            .unordered_max
            .saturating_sub(self.unordered.len())
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

fn msg_cost(m: &impl wire::Carried) -> usize {
    let (_, _, topic, payload) = m.parts();
    topic.len() + payload.len() + 32
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
