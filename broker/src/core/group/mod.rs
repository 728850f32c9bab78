//! The core tier's ordered group for one core server: TOTAL stacked on
//! MBRSHIP (docs/DESIGN.md, "Layers").
//!
//! A [`Group`] turns the publishes its server submits into one total order
//! agreed by every server of the primary view, and hands back the stable
//! messages and the views as a stream of [`Event`]s that is the same at
//! every member: the "group below" of docs/DESIGN.md's layer stack. The
//! protocols are described where they live: views, the flush and restart
//! safety in `core::mbrship`, ordering, stability and the publisher table
//! in `core::total`. This module only stacks them: it routes each peer
//! message to its layer, and hands each layer the one below (TOTAL reads
//! MBRSHIP; MBRSHIP reaches TOTAL only through `mbrship::Above`), and RRPC
//! on top of TOTAL: it reads the stable stream, views and snapshots as
//! they pass up, and its outcomes go down to TOTAL to be ordered.
//!
//! # Driving it
//! Inputs: [`Group::handle_msg`], [`Group::handle_link_down`],
//! [`Group::handle_link_up`], [`Group::handle_timeout`], [`Group::submit`],
//! and [`Group::send_snapshot`] in answer to `Event::SnapshotNeeded`. After
//! any input drain [`Group::poll_event`] (events in stream order) and
//! [`Group::poll_transmit`] (frames per peer, FIFO per peer).
//!
//! # Invariants
//! - The delivered stream is contiguous in seq and identical at every
//!   member that delivers a seq (guarantees 1 and 2).
//! - A member delivers only seqs the coordinator declared stable, or seqs
//!   a flush established; after promising a proposal it delivers nothing
//!   more of the old view.
//! - After every input each layer's own invariants hold (debug builds
//!   assert them, [`Group::check_invariants`]).

#[cfg(test)]
use crate::core::mbrship::MbrBugs;
use crate::core::mbrship::Membership;
#[cfg(test)]
use crate::core::rrpc::RrpcBugs;
use crate::core::rrpc::{self, Job, Lookup, Reply, Rrpc, RrpcConfig, Shared};
use crate::core::total::Total;
#[cfg(test)]
use crate::core::total::TotalBugs;
use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
#[cfg(test)]
use std::collections::HashMap;
use std::time::Duration;

pub use crate::core::mbrship::{
    HardState, Incarnation, MbrConfig, Member, NodeId, Status, View, ViewId,
};
pub use crate::core::stream::{Msg, Snapshot};
pub use crate::core::total::wire::{self, PeerMsg, Submitted};
pub use crate::core::total::{Event, TotalConfig};

#[cfg(test)]
mod tests;

/// Validated settings of a group member: each layer's own.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// MBRSHIP's: who this server is, among whom, and its timings.
    pub membership: MbrConfig,
    /// TOTAL's bounds.
    pub ordering: TotalConfig,
}

impl GroupConfig {
    /// Settings for server `me` of `servers` with default timings and
    /// bounds.
    pub fn new(me: NodeId, incarnation: Incarnation, servers: Vec<NodeId>) -> Self {
        GroupConfig {
            membership: MbrConfig::new(me, incarnation, servers),
            ordering: TotalConfig::default(),
        }
    }
}

/// Deliberate protocol bugs for tests proving the simulator's checkers.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GroupBugs {
    /// Install new views without the flush: old-view messages that are not
    /// yet stable everywhere are not made stable first.
    pub skip_flush: bool,
    /// A sequencer that gives a fresh seq to every submission, retries too.
    pub no_dedup: bool,
    /// Deliver on ordering, before stability.
    pub deliver_unstable: bool,
    /// Drop held messages at a view change without saying so (`Unheld`).
    pub silent_unhold: bool,
    /// Count a peer alive on its heartbeats alone, whether or not it hears
    /// this server (a deaf server is proposed into every view).
    pub ignore_deafness: bool,
    /// Decide which history a view carries on by the rule before hard
    /// state: a majority holding state, or a majority holding no message
    /// (a "cold start", which a restart looked like).
    pub cold_start_without_state: bool,
    /// Forget the promise on a restart (view ids are reused).
    pub forget_promises: bool,
    /// Drop own submissions on a rejoin.
    pub clear_queue_on_rejoin: bool,
    /// Order a `Submit` that follows a lost one.
    pub order_past_lost_submit: bool,
    /// RRPC: a call already applied or queued is applied again.
    pub rrpc_no_dedup: bool,
    /// RRPC: a snapshot leaves out the calls not applied yet.
    pub rrpc_drop_queue_in_snapshot: bool,
}

#[cfg(test)]
impl GroupBugs {
    /// Each layer's share of the bugs.
    fn layers(self) -> (MbrBugs, TotalBugs, RrpcBugs) {
        let GroupBugs {
            skip_flush,
            no_dedup,
            deliver_unstable,
            silent_unhold,
            ignore_deafness,
            cold_start_without_state,
            forget_promises,
            clear_queue_on_rejoin,
            order_past_lost_submit,
            rrpc_no_dedup,
            rrpc_drop_queue_in_snapshot,
        } = self;
        let mbr = MbrBugs {
            skip_flush,
            ignore_deafness,
            cold_start_without_state,
            forget_promises,
        };
        let total = TotalBugs {
            no_dedup,
            deliver_unstable,
            silent_unhold,
            clear_queue_on_rejoin,
            order_past_lost_submit,
        };
        let rrpc = RrpcBugs {
            no_dedup: rrpc_no_dedup,
            drop_queue_in_snapshot: rrpc_drop_queue_in_snapshot,
        };
        (mbr, total, rrpc)
    }
}

/// Counters since start, for operators and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Views installed here.
    pub views: u64,
    /// Messages this server ordered as sequencer.
    pub ordered: u64,
    /// Submissions dropped as retries by the sequencer.
    pub duplicates: u64,
    /// Submissions sent again after a view change or a broken link.
    pub resubmitted: u64,
}

/// One core server's membership and ordering state machine: TOTAL on
/// MBRSHIP. See the module docs for how to drive it.
pub struct Group {
    /// MBRSHIP (`core::mbrship`).
    mbr: Membership,
    /// TOTAL (`core::total`).
    total: Total,
    /// RRPC (`core::rrpc`): the replicated service, if any.
    rrpc: Rrpc,
}

impl Group {
    /// A server that starts without a hard state: its first start, or a
    /// start after its data directory was lost (a new server as far as the
    /// group knows; it is not a voter until it accepts a view).
    pub fn new(now: Duration, config: GroupConfig) -> Self {
        Self::recover(now, config, None)
    }

    /// A server that starts with the hard state it wrote before (a
    /// restart): it runs as a higher incarnation, never promises below what
    /// it promised, and knows the last view it accepted, though it holds
    /// none of its messages. The new hard state is ready at once
    /// ([`Group::poll_hard_state`]).
    pub fn recover(now: Duration, config: GroupConfig, hard: Option<HardState>) -> Self {
        let GroupConfig {
            membership,
            ordering,
        } = config;
        let mbr = Membership::new(now, membership, hard.unwrap_or_default());
        let rrpc = Rrpc::new(mbr.me().node, None, rrpc_config(mbr.me()));
        Group {
            mbr,
            total: Total::new(now, ordering),
            rrpc,
        }
    }

    /// Runs `service` as this server's replica of the group's replicated
    /// service (before the group takes any input: every member of a group
    /// runs the same service from its first view on).
    pub fn set_service(&mut self, service: Shared) {
        let (me, bugs) = (self.mbr.me(), self.rrpc.bugs);
        self.rrpc = Rrpc::new(me.node, Some(service), rrpc_config(me));
        self.rrpc.bugs = bugs;
    }

    /// Turns on deliberate bugs (tests of the simulator's checkers).
    #[cfg(test)]
    pub(crate) fn set_bugs(&mut self, bugs: GroupBugs) {
        (self.mbr.bugs, self.total.bugs, self.rrpc.bugs) = bugs.layers();
    }

    /// Counters since start.
    pub fn stats(&self) -> GroupStats {
        let total = self.total.stats();
        GroupStats {
            views: self.mbr.views(),
            ordered: total.ordered,
            duplicates: total.duplicates,
            resubmitted: total.resubmitted,
        }
    }

    /// The next event for the server, in stream order. RRPC reads each on
    /// its way up.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.total.poll_event()?;
        self.rrpc_as_me();
        match &event {
            Event::Deliver(msgs) => self.rrpc.deliver(msgs),
            Event::View { view, at } => {
                self.rrpc.view(view, *at);
                self.rrpc.set_primary(self.mbr.is_primary());
            }
            Event::NotPrimary => self.rrpc.set_primary(false),
            Event::Reset(state) => {
                let (stream, head) = (state.stream, state.head);
                if let Err(e) = self.rrpc.restore(state.service.as_deref(), stream, head) {
                    tracing::error!(error = %e, head = %state.head, "the replicated service's state in a snapshot was refused; this replica keeps its own");
                }
            }
            Event::Held(_)
            | Event::Unheld { .. }
            | Event::SnapshotNeeded { .. }
            | Event::Retried { .. } => {}
        }
        self.submit_outcomes();
        Some(event)
    }

    /// RRPC: the next call (or share) for the shell to execute off the
    /// server's loop ([`Job::run`]), then hand to [`Group::executed`].
    pub fn poll_job(&mut self) -> Option<Job> {
        self.rrpc.poll_job()
    }

    /// RRPC: a job's result; its outcome is ordered.
    pub fn executed(&mut self, job: &Job, result: Result<Bytes, String>) {
        self.rrpc_as_me();
        self.rrpc.executed(job, result);
        self.submit_outcomes();
    }

    /// RRPC orders its outcomes and votes as the incarnation this server
    /// runs as now. From a rejoin on, not from the next install: a server
    /// that rejoined, was made a member of a view and was cut off before
    /// its commit is delivered that view's messages by the next view's
    /// flush, and that view's record names it as its new incarnation; a
    /// vote it ordered under the old one counted for no voter, and a call
    /// waiting for a majority or for every replica waited for good
    /// (cluster simulator, seed 38827).
    fn rrpc_as_me(&mut self) {
        let me = self.mbr.me();
        self.rrpc
            .set_publisher(rrpc::outcome_publisher(me.node, me.incarnation.0));
    }

    /// RRPC: the next reply, for the server the caller is attached to.
    pub fn poll_reply(&mut self) -> Option<Reply> {
        self.rrpc.poll_reply()
    }

    /// RRPC: what is known here of a call.
    pub fn lookup_call(&self, id: rrpc::CallId) -> Lookup {
        self.rrpc.lookup(id)
    }

    /// RRPC's state: the service, counters, queue.
    pub fn rrpc(&self) -> &Rrpc {
        &self.rrpc
    }

    /// RRPC's outcomes go down to be ordered.
    fn submit_outcomes(&mut self) {
        let msgs = self.rrpc.take_submissions();
        if !msgs.is_empty() {
            self.total.submit(&self.mbr, msgs);
        }
    }

    /// The next frame to send, with its destination.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Bytes)> {
        self.total.poll_transmit()
    }

    /// A decoded message arrived from `from`: each goes to its layer.
    pub fn handle_msg(&mut self, now: Duration, from: NodeId, msg: PeerMsg) {
        if !self.mbr.heard_from(now, from) {
            tracing::debug!(node = %from, "message from an unconfigured server ignored");
            return;
        }
        let (mbr, total) = (&mut self.mbr, &mut self.total);
        match msg {
            PeerMsg::Heartbeat(hb) => mbr.on_heartbeat(now, hb, total),
            PeerMsg::Submit {
                view,
                front,
                first,
                msgs,
            } => total.on_submit(mbr, from, view, front, first, msgs),
            PeerMsg::Order {
                view,
                first,
                msgs,
                stable,
            } => total.on_order(mbr, from, view, first, msgs, stable),
            PeerMsg::Ack { view, have } => total.on_ack(mbr, from, view, have),
            PeerMsg::Stable(s) => total.on_stable(mbr, now, s.view, s.through),
            PeerMsg::Resend { view, after } => total.on_resend(mbr, from, view, after),
            PeerMsg::Retried {
                view,
                publisher,
                pub_seq,
                seq,
            } => total.on_retried(mbr, view, publisher, pub_seq, seq),
            PeerMsg::FlushReq(req) => mbr.on_flush_req(now, from, req, total),
            PeerMsg::FlushOk(ok) => mbr.on_flush_ok(now, ok, total),
            PeerMsg::NewView(new) => mbr.on_new_view(now, new, total),
            PeerMsg::Snapshot(transfer) => mbr.on_snapshot(now, transfer, total),
            PeerMsg::AcceptOk(accept) => mbr.on_accept_ok(now, from, accept, total),
        }
        self.total.announce_stable(&self.mbr);
        self.check_invariants();
    }

    /// Time has reached `now`: heartbeats, failure detection, view change
    /// retries.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.mbr.handle_timeout(now, &mut self.total);
        self.total.announce_stable(&self.mbr);
        self.check_invariants();
    }

    /// The link to or from `peer` broke: a hint that it may have failed.
    /// It is excluded only if it then stays silent for `link_confirm`.
    pub fn handle_link_down(&mut self, now: Duration, peer: NodeId) {
        self.mbr.handle_link_down(now, peer);
    }

    /// The link to `peer` is (re)established. What was sent on the old link
    /// may be lost: submissions to it are sent again, and a proposal it has
    /// not answered is asked again.
    pub fn handle_link_up(&mut self, _now: Duration, peer: NodeId) {
        if self.mbr.coordinator() == Some(peer) && self.mbr.is_primary() {
            self.total.resubmit(&self.mbr);
        }
        self.mbr.handle_link_up(peer, &mut self.total);
    }

    /// Publishes from this server's clients, to be ordered.
    ///
    /// They are kept until delivered and sent again after a view change or
    /// a broken link, so a publish is lost only if this server fails (and
    /// then its publisher, unacknowledged, retries elsewhere). Call only when
    /// [`Group::unordered_room`] allows them; beyond the bound the server must
    /// push back on its publishers.
    pub fn submit(&mut self, msgs: Vec<Submitted>) {
        self.total.submit(&self.mbr, msgs);
        self.check_invariants();
    }

    /// Sends the snapshot asked for by `Event::SnapshotNeeded`, with
    /// RRPC's state at the same position.
    pub fn send_snapshot(&mut self, to: NodeId, mut state: Snapshot) {
        state.service = Some(self.rrpc.snapshot());
        self.mbr.send_snapshot(to, state, &mut self.total);
    }

    /// Debug builds: every layer's invariants hold (a broken build's
    /// deliberate bugs excepted).
    fn check_invariants(&self) {
        if cfg!(debug_assertions) && !self.mbr.bugs.any() && !self.total.bugs.any() {
            self.mbr.check_invariants();
            self.total.check_invariants();
        }
    }
}

/// RRPC's settings for member `me`: its outcomes are ordered under a
/// publisher id of its own, new per incarnation.
fn rrpc_config(me: Member) -> RrpcConfig {
    RrpcConfig::new(rrpc::outcome_publisher(me.node, me.incarnation.0))
}

/// MBRSHIP's part of the group's interface: who this server is, its view
/// and hard state, its timers.
impl Group {
    /// This server as a member.
    pub fn me(&self) -> Member {
        self.mbr.me()
    }

    /// Where it stands in membership.
    pub fn status(&self) -> Status {
        self.mbr.status()
    }

    /// The installed view, if any.
    pub fn view(&self) -> Option<&View> {
        self.mbr.view()
    }

    /// The view whose state this server holds (`None`: it holds none, as
    /// after a restart).
    pub fn state_view(&self) -> Option<ViewId> {
        self.mbr.state_view()
    }

    /// Whether this server is in an installed view and ordering.
    pub fn is_primary(&self) -> bool {
        self.mbr.is_primary()
    }

    /// The hard state, when it changed since the last call. The shell must
    /// write it durably before it sends the next frame from
    /// [`Group::poll_transmit`].
    pub fn poll_hard_state(&mut self) -> Option<HardState> {
        self.mbr.poll_hard_state()
    }

    /// The hard state as it stands.
    pub fn hard_state(&self) -> HardState {
        self.mbr.hard_state()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.mbr.poll_timeout()
    }
}

/// TOTAL's part of the group's interface: the stream's position, the
/// publisher table as the server above asks for it, and own submissions.
impl Group {
    /// The last seq this server holds (ordered, maybe not yet stable).
    pub fn held(&self) -> Seq {
        self.total.held()
    }

    /// The last seq delivered.
    pub fn delivered(&self) -> Seq {
        self.total.delivered()
    }

    /// The last pub_seq of `publisher` delivered here (what a publisher
    /// that attaches here is told has been acknowledged).
    pub fn pub_delivered(&self, publisher: PublisherId) -> PubSeq {
        self.total.pub_delivered(publisher)
    }

    /// The delivered publisher table as a snapshot carries it (publisher,
    /// last pub_seq delivered, its seq), and whether the table ever forgot
    /// a publisher: the table the sequencer drops retries by, which a
    /// joining server must take over as it is.
    pub fn publisher_table(&self) -> (Vec<(PublisherId, PubSeq, Seq)>, bool) {
        self.total.publisher_table()
    }

    /// When everything of `publisher` held here is delivered: its last
    /// pub_seq and that publish's seq (an acknowledgement for a retry).
    pub fn pub_acknowledged(&self, publisher: PublisherId) -> Option<(PubSeq, Seq)> {
        self.total.pub_acknowledged(publisher)
    }

    /// The last pub_seq of `publisher` held here, when the table can vouch
    /// for it (`core::total`, `Total::pub_held`).
    pub fn pub_held(&self, publisher: PublisherId) -> Option<PubSeq> {
        self.total.pub_held(publisher)
    }

    /// How many submissions made here wait to be delivered.
    pub fn unordered_len(&self) -> usize {
        self.total.unordered_len()
    }

    /// How many more publishes `submit` may take now (its bound,
    /// `unordered_max`, less what waits to be ordered).
    pub fn unordered_room(&self) -> usize {
        self.total.unordered_room()
    }

    /// Test builds: the publishers the table forgot since the last call,
    /// with the last pub_seq each had then.
    #[cfg(test)]
    pub(crate) fn take_forgotten(&mut self) -> HashMap<PublisherId, PubSeq> {
        self.total.take_forgotten()
    }

    /// Test builds: the oldest submission waiting here, as (publisher,
    /// pub_seq, the pub_seq it follows).
    #[cfg(test)]
    pub(crate) fn unordered_front(&self) -> Option<(PublisherId, PubSeq, PubSeq)> {
        self.total.unordered_front()
    }
}
