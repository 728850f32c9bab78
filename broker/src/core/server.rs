//! `Server`: one core server, its client-facing [`Node`] over its
//! [`Group`] (the "group below" of DESIGN.md's layer stack).
//!
//! A standalone server (no peers configured) is its node alone: the node
//! orders publishes itself. In a core group, the node hands publishes to the
//! group and serves what the group delivers; this type carries things
//! between the two and decides nothing of either's protocol.
//!
//! # Driving it
//! As a [`Node`] (the same client inputs), plus [`Server::handle_peer`],
//! [`Server::handle_link_down`] and [`Server::handle_link_up`] for links to
//! other core servers. After any input, drain [`Server::poll_output`]
//! (client outputs) and [`Server::poll_transmit`] (peer frames).

use super::group::{Event, Group, NodeId, PeerMsg, Submitted};
use super::node::{Node, Output, TransmitKind};
use super::SessionId;
use bytes::Bytes;
use canopy_client::protocol::{ClientFrame, ErrorCode, PubSeq, Seq};
use std::time::Duration;

/// Retained messages a snapshot for a joining server carries at most...
pub const SNAPSHOT_MSGS_MAX: usize = 100_000;
/// ...and bytes.
pub const SNAPSHOT_BYTES_MAX: usize = 64 << 20;

/// A core server: a node, and the group when there are peers.
pub struct Server {
    node: Node,
    group: Option<Group>,
}

impl Server {
    /// A server that orders alone.
    pub fn standalone(node: Node) -> Self {
        Server { node, group: None }
    }

    /// A server in a core group; `node` must be made with
    /// [`Node::new_grouped`].
    pub fn grouped(node: Node, group: Group) -> Self {
        Server {
            node,
            group: Some(group),
        }
    }

    /// The client-facing node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The group, when in one.
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// See [`Node::handle_open`].
    pub fn handle_open(&mut self, now: Duration, session: SessionId) {
        self.node.handle_open(now, session);
        self.pump(now);
    }

    /// See [`Node::handle_frame`].
    pub fn handle_frame(&mut self, now: Duration, session: SessionId, frame: ClientFrame) {
        self.node.handle_frame(now, session, frame);
    }

    /// Call after a run of `handle_frame` calls (one input batch), so that
    /// the batch's publishes go to the group together.
    pub fn end_batch(&mut self, now: Duration) {
        self.pump(now);
    }

    /// See [`Node::handle_bad_input`].
    pub fn handle_bad_input(
        &mut self,
        now: Duration,
        session: SessionId,
        code: ErrorCode,
        message: String,
    ) {
        self.node.handle_bad_input(now, session, code, message);
        self.pump(now);
    }

    /// See [`Node::handle_closed`].
    pub fn handle_closed(&mut self, now: Duration, session: SessionId) {
        self.node.handle_closed(now, session);
    }

    /// See [`Node::handle_queue_full`].
    pub fn handle_queue_full(
        &mut self,
        now: Duration,
        session: SessionId,
        kind: TransmitKind,
        seqs: (Seq, Seq),
    ) {
        self.node.handle_queue_full(now, session, kind, seqs);
    }

    /// A message from core server `from`.
    pub fn handle_peer(&mut self, now: Duration, from: NodeId, msg: PeerMsg) {
        if let Some(g) = &mut self.group {
            g.handle_msg(now, from, msg);
        }
        self.pump(now);
    }

    /// The link to or from `peer` broke.
    pub fn handle_link_down(&mut self, now: Duration, peer: NodeId) {
        if let Some(g) = &mut self.group {
            g.handle_link_down(now, peer);
        }
    }

    /// The link to `peer` is (re)established.
    pub fn handle_link_up(&mut self, now: Duration, peer: NodeId) {
        if let Some(g) = &mut self.group {
            g.handle_link_up(now, peer);
        }
        self.pump(now);
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let node = self.node.poll_timeout();
        let group = self.group.as_ref().and_then(Group::poll_timeout);
        match (node, group) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time has reached `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.node.handle_timeout(now);
        if let Some(g) = &mut self.group {
            g.handle_timeout(now);
        }
        self.pump(now);
    }

    /// The next client output; see [`Node::poll_output`].
    pub fn poll_output(&mut self) -> Option<Output> {
        self.node.poll_output()
    }

    /// The next frame for a peer (length prefix included).
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Bytes)> {
        self.group.as_mut().and_then(Group::poll_transmit)
    }

    /// Carries publishes down to the group and events up to the node until
    /// neither has anything for the other.
    fn pump(&mut self, now: Duration) {
        let Some(group) = &mut self.group else {
            return;
        };
        loop {
            let subs = self.node.take_submissions();
            let mut moved = !subs.is_empty();
            let mut msgs = Vec::with_capacity(subs.len());
            for sub in subs {
                let (publisher, pub_seq) = (sub.msg.0, sub.msg.1);
                // What the group holds covers whatever any server has
                // acknowledged to this publisher; this node may lag it.
                let known = sub.after.max(group.pub_held(publisher));
                // A publisher on first contact may start anywhere (as with
                // a single node); after that it must not skip.
                if known > PubSeq(0) && pub_seq.0 > known.0 + 1 {
                    self.node
                        .close_pub_seq_gap(now, sub.session, pub_seq, known);
                } else if group.unordered_full() {
                    // Push back on this publisher; it retries what was not
                    // acknowledged after reconnecting.
                    self.node.close_overloaded(now, sub.session);
                } else {
                    msgs.push(Submitted(sub.after, sub.msg));
                }
            }
            if !msgs.is_empty() {
                group.submit(msgs);
            }
            while let Some(event) = group.poll_event() {
                moved = true;
                match event {
                    Event::Deliver(batch) => self.node.handle_ordered(now, batch),
                    Event::View { view, .. } => {
                        self.node.set_stream(view.stream);
                        self.node.set_primary(now, group.is_primary());
                    }
                    Event::SnapshotNeeded { to } => {
                        let state = self.node.snapshot(SNAPSHOT_MSGS_MAX, SNAPSHOT_BYTES_MAX);
                        group.send_snapshot(to, state);
                    }
                    Event::Reset(state) => {
                        // The stream position jumps: clients reconnect and
                        // resume against the new state rather than miss
                        // the jump silently.
                        self.node.set_primary(now, false);
                        self.node.install_snapshot(now, state);
                        self.node.set_primary(now, group.is_primary());
                    }
                    Event::NotPrimary => self.node.set_primary(now, false),
                }
            }
            if !moved {
                return;
            }
        }
    }
}
