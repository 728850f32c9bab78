//! The messages core servers send each other, and their encoding.
//!
//! A frame on a server-to-server link is one CBOR-encoded [`PeerMsg`]; the
//! shell adds the length prefix. Messages inside are compact CBOR arrays
//! (tuples), since `Order` carries every published message once per member.
//!
//! Links are FIFO while they last (TCP); a broken link loses what was in
//! flight on it, and later frames may follow on a new connection. Safety
//! never depends on more than per-link order; liveness recovers by cumulative
//! acknowledgements repeated in heartbeats, `Resend` on a seq gap, and
//! resubmission of what is not yet ordered.

use super::{Member, View, ViewId};
use crate::core::retention::Ordered;
use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One message as it travels between servers: its seq is implied by its
/// position (an `Order`'s `first` plus its index) or absent (a `Submit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msg(pub PublisherId, pub PubSeq, pub Arc<str>, pub Bytes);

impl Msg {
    /// The message with its seq attached.
    pub fn ordered(self, seq: Seq) -> Ordered {
        Ordered {
            seq,
            publisher: self.0,
            pub_seq: self.1,
            topic: self.2,
            payload: self.3,
            hash: 0,
        }
    }

    /// The wire form of an ordered message (its seq left out).
    pub fn of(m: &Ordered) -> Msg {
        Msg(m.publisher, m.pub_seq, m.topic.clone(), m.payload.clone())
    }
}

/// A publish on its way to the sequencer, with the pub_seq its submitter
/// knew to precede it (0: none, the publisher's first contact). The
/// sequencer orders a publisher it does not know only on first contact, so
/// a publish whose predecessor was lost with a link waits for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted(pub PubSeq, pub Msg);

/// What a joining or lagging server needs to continue the stream: its
/// position, the publisher table that deduplicates retries, and as much
/// recent history as the sender retains (for clients that resume there).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The stream the state belongs to.
    pub stream: u64,
    /// The last seq the state includes.
    pub head: Seq,
    /// Per publisher: last pub_seq ordered and the seq it got.
    pub publishers: Vec<(PublisherId, PubSeq, Seq)>,
    /// Whether the sender's table ever forgot a publisher (then a publisher
    /// missing from it may be a forgotten one).
    #[serde(default)]
    pub evicted: bool,
    /// The seq of `msgs[0]`; the messages run contiguously to `head`.
    pub first: Seq,
    /// Recent messages, oldest first.
    pub msgs: Vec<Msg>,
    /// The tree's membership at `head` (a complete report); `None` keeps
    /// what the receiver has.
    #[serde(default)]
    pub members: Option<canopy_client::protocol::MembersHead>,
    /// The running hash of the stream through the seq before `msgs[0]`
    /// (through `head` when `msgs` is empty).
    #[serde(default)]
    pub hash: u64,
}

/// What a server tells every other configured server each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender.
    pub from: Member,
    /// Whether it is joining (in no view).
    pub joining: bool,
    /// The view whose state it holds (`None`: no state).
    pub view: Option<ViewId>,
    /// The epoch of the proposal it promised last (its view's, if none
    /// since).
    pub epoch: u64,
    /// The last seq it holds in its view.
    pub have: Seq,
    /// From a coordinator: the last seq stable in its view.
    pub stable: Seq,
    /// The servers it has heard from within a failure timeout. A server
    /// counts another alive only if it is heard *and* hears back, so a
    /// server whose inbound links are cut is left out of views rather than
    /// stalling every flush it is proposed into.
    pub hears: Vec<super::NodeId>,
}

/// A server-to-server message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Sent by every server to every other configured server each
    /// heartbeat interval: liveness, what it has installed and holds.
    Heartbeat(Heartbeat),
    /// Member to coordinator: publishes to order, in the order received.
    /// The sender numbers its submissions contiguously; the coordinator
    /// drops a `Submit` that does not continue what it received (an earlier
    /// one was lost with a link), so a publish never overtakes a lost
    /// predecessor. The sender resubmits from `front` after a broken link.
    Submit {
        /// The view they are submitted in.
        view: ViewId,
        /// The number of the sender's oldest submission not yet delivered
        /// there: everything before it is ordered.
        front: u64,
        /// The number of `msgs[0]`.
        first: u64,
        /// The publishes.
        msgs: Vec<Submitted>,
    },
    /// Coordinator to members: `msgs` get seqs `first`, `first + 1`, ...
    Order {
        /// The view.
        view: ViewId,
        /// The seq of `msgs[0]`.
        first: Seq,
        /// The ordered messages.
        msgs: Vec<Msg>,
        /// Everything through this seq is stable.
        stable: Seq,
    },
    /// Member to coordinator: "I hold everything through `have`".
    Ack {
        /// The view.
        view: ViewId,
        /// The last seq held.
        have: Seq,
    },
    /// Coordinator to members: everything through `through` is stable. The
    /// first `Stable` of a view commits it.
    Stable {
        /// The view.
        view: ViewId,
        /// The stable seq.
        through: Seq,
    },
    /// Sequencer to a member whose submission it dropped as a retry: it
    /// holds `publisher` through `pub_seq`, the publish it ordered at
    /// `seq`. A member whose own table forgot the publisher (its bound, or
    /// a snapshot from a server whose table did) learns from it that the
    /// retry is delivered once it delivered `seq`; without it, it would
    /// wait for that retry's delivery for good.
    Retried {
        /// The view.
        view: ViewId,
        /// The publisher.
        publisher: PublisherId,
        /// The last pub_seq of it the sequencer holds.
        pub_seq: PubSeq,
        /// The seq of that publish.
        seq: Seq,
    },
    /// Member to coordinator: "I lost orders after `after`; send them again".
    Resend {
        /// The view.
        view: ViewId,
        /// The last seq held.
        after: Seq,
    },
    /// Proposer to the members of a proposed view: stop ordering and report
    /// what you hold (phase one of a view change, the flush).
    FlushReq {
        /// The proposal; it becomes the new view's id.
        proposal: ViewId,
        /// The proposed members.
        members: Vec<Member>,
    },
    /// Answer to `FlushReq`: the sender promised the proposal and reports
    /// the messages it holds that may not be stable everywhere.
    FlushOk {
        /// The proposal answered.
        proposal: ViewId,
        /// The sender.
        from: Member,
        /// The view whose state the sender holds (kept across a rejoin).
        view: Option<ViewId>,
        /// The last view it accepted, from its hard state: the same as
        /// `view` for a server that holds state, newer for a restarted
        /// server that remembers the view but lost its messages, `None` for
        /// a server that is not a voter.
        accepted: Option<View>,
        /// The last view it installed, from its hard state.
        installed: ViewId,
        /// The last seq it delivered.
        delivered: Seq,
        /// What it holds after `delivered`, in order.
        msgs: Vec<Msg>,
    },
    /// Proposer to members: take `view`'s history, everything through
    /// `through`, to be delivered in the old view once the view commits.
    /// `msgs` are the messages after the receiver's held seq that it lacks.
    /// A member marked `lagging` holds no usable state: a `Snapshot` of the
    /// proposer's delivered state follows, and `msgs` continue it.
    NewView {
        /// The new view.
        view: View,
        /// The last seq of the old view.
        through: Seq,
        /// The seq of `msgs[0]`.
        first: Seq,
        /// Messages the receiver lacks.
        msgs: Vec<Msg>,
        /// Whether the receiver gets a snapshot next.
        lagging: bool,
    },
    /// Member to proposer: "I hold the new view's history" (phase two).
    AcceptOk {
        /// The view accepted.
        view: ViewId,
    },
    /// Coordinator to a lagging member, right after `NewView`.
    Snapshot {
        /// The view it belongs to.
        view: ViewId,
        /// The state.
        state: Snapshot,
    },
}

/// Encodes a message for a link, with the 4-byte big-endian length prefix
/// that frames it on the link.
pub fn encode(msg: &PeerMsg) -> Bytes {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(&[0; 4]);
    ciborium::into_writer(msg, &mut buf)
        .expect("invariant: encoding a PeerMsg into a Vec cannot fail");
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(buf)
}

/// Decodes a frame's content (the length prefix already taken off).
///
/// # Errors
/// When the content is not a valid `PeerMsg`; the link should be dropped.
pub fn decode(content: &[u8]) -> Result<PeerMsg, DecodeError> {
    ciborium::from_reader(content).map_err(|e| DecodeError(e.to_string()))
}

/// A peer's frame that is not a valid peer message: the link that carried
/// it is dropped (a peer misbehaving, or another program on the port).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a valid peer message: {0}")]
pub struct DecodeError(String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::group::{Incarnation, NodeId};

    #[test]
    fn messages_survive_a_round_trip() {
        let msg = PeerMsg::Order {
            view: ViewId {
                epoch: 3,
                coordinator: NodeId(1),
            },
            first: Seq(7),
            msgs: vec![Msg(
                PublisherId(9),
                PubSeq(2),
                Arc::from("md.x"),
                Bytes::from_static(b"payload"),
            )],
            stable: Seq(5),
        };
        assert_eq!(decode(&encode(&msg)[4..]), Ok(msg));
        let hb = PeerMsg::Heartbeat(Heartbeat {
            from: Member {
                node: NodeId(2),
                incarnation: Incarnation(4),
            },
            joining: true,
            view: None,
            epoch: 1,
            have: Seq(0),
            stable: Seq(0),
            hears: vec![NodeId(1), NodeId(3)],
        });
        assert_eq!(decode(&encode(&hb)[4..]), Ok(hb));
        assert!(decode(b"\xff\x00garbage").is_err());
    }
}
