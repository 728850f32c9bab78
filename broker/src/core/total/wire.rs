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

use crate::core::mbrship::wire::{
    AcceptOk, FlushOk, FlushReq, Heartbeat, MbrMsg, NewView, Stable, StateTransfer,
};
use crate::core::mbrship::ViewId;
use crate::core::stream::Msg;
use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use serde::{Deserialize, Serialize};

/// A publish on its way to the sequencer, with the pub_seq its submitter
/// knew to precede it (0: none, the publisher's first contact). The
/// sequencer orders a publisher it does not know only on first contact, so
/// a publish whose predecessor was lost with a link waits for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted(pub PubSeq, pub Msg);

/// A server-to-server message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// MBRSHIP: liveness, what the sender has installed and holds.
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
    /// MBRSHIP's commit (the first of a view) and TOTAL's stability.
    Stable(Stable),
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
    /// MBRSHIP: phase one of a view change.
    FlushReq(FlushReq),
    /// MBRSHIP: the answer to `FlushReq`.
    FlushOk(FlushOk),
    /// MBRSHIP: the new view's history.
    NewView(NewView),
    /// MBRSHIP: phase two of a view change.
    AcceptOk(AcceptOk),
    /// MBRSHIP: a lagging member's state.
    Snapshot(StateTransfer),
}

impl From<MbrMsg> for PeerMsg {
    fn from(msg: MbrMsg) -> Self {
        match msg {
            MbrMsg::Heartbeat(m) => PeerMsg::Heartbeat(m),
            MbrMsg::FlushReq(m) => PeerMsg::FlushReq(m),
            MbrMsg::FlushOk(m) => PeerMsg::FlushOk(m),
            MbrMsg::NewView(m) => PeerMsg::NewView(m),
            MbrMsg::AcceptOk(m) => PeerMsg::AcceptOk(m),
            MbrMsg::Snapshot(m) => PeerMsg::Snapshot(m),
            MbrMsg::Stable(m) => PeerMsg::Stable(m),
        }
    }
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
    use crate::core::mbrship::{Incarnation, Member, NodeId};
    use std::sync::Arc;

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

    /// MBRSHIP's messages became structs of their own (newtype variants);
    /// on the wire they are what the struct variants were, so servers of
    /// either build read each other.
    #[test]
    fn newtype_variants_encode_as_the_struct_variants_did() {
        #[derive(Serialize)]
        enum Before {
            FlushReq {
                proposal: ViewId,
                members: Vec<Member>,
            },
            Stable {
                view: ViewId,
                through: Seq,
            },
        }
        let proposal = ViewId {
            epoch: 9,
            coordinator: NodeId(2),
        };
        let members = vec![Member {
            node: NodeId(2),
            incarnation: Incarnation(5),
        }];
        let cbor = |v: &Before| {
            let mut buf = Vec::new();
            ciborium::into_writer(v, &mut buf).expect("encodes");
            buf
        };
        let before = cbor(&Before::FlushReq {
            proposal,
            members: members.clone(),
        });
        let now = PeerMsg::FlushReq(FlushReq { proposal, members });
        assert_eq!(&encode(&now)[4..], &before[..]);
        let before = cbor(&Before::Stable {
            view: proposal,
            through: Seq(4),
        });
        let now = PeerMsg::Stable(Stable {
            view: proposal,
            through: Seq(4),
        });
        assert_eq!(decode(&before), Ok(now));
    }
}
