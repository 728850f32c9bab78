//! The messages core servers send each other, and their encoding.
//!
//! A frame on a server-to-server link is one [`PeerMsg`], behind a 4-byte
//! big-endian length prefix. The two that carry every published message,
//! `Order` (once per member) and `Submit`, are fixed-width binary, read by
//! slicing (payloads are not copied; a run of one topic is validated and
//! allocated once per frame); every other message is CBOR.
//!
//! The binary layout (integers little-endian): a tag byte (`0x01` `Order`,
//! `0x02` `Submit`; a CBOR `PeerMsg` begins with a map's `0xa1`), the view's
//! epoch (u64) and coordinator (u32), two u64s (`Order`: `first`,
//! `stable`; `Submit`: `front`, `first`), the message count (u32), then per
//! message: (`Submit` only: the pub_seq it follows, u64) publisher (u64),
//! pub_seq (u64), topic length (u16; `0xffff`: the previous message's
//! topic, not repeated), payload length (u32), the topic's UTF-8, the
//! payload. Nothing may follow the last message.
//!
//! Links are FIFO while they last (TCP); a broken link loses what was in
//! flight on it, and later frames may follow on a new connection. Safety
//! never depends on more than per-link order; liveness recovers by cumulative
//! acknowledgements repeated in heartbeats, `Resend` on a seq gap, and
//! resubmission of what is not yet ordered.

use crate::core::mbrship::wire::{
    AcceptOk, FlushOk, FlushReq, Heartbeat, MbrMsg, NewView, Stable, StateTransfer,
};
use crate::core::mbrship::{NodeId, ViewId};
use crate::core::stream::{Msg, Ordered};
use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

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

/// The first byte of a binary `Order`.
const ORDER_TAG: u8 = 0x01;
/// The first byte of a binary `Submit`.
const SUBMIT_TAG: u8 = 0x02;
/// Tag, epoch, coordinator, two u64s, count.
const BATCH_HEAD_LEN: usize = 1 + 8 + 4 + 8 + 8 + 4;
/// Publisher, pub_seq, topic length, payload length.
const ENTRY_LEN: usize = 8 + 8 + 2 + 4;
/// A topic length that means "the previous message's topic".
const SAME_TOPIC: u16 = u16::MAX;

/// Encodes a message for a link, with the 4-byte big-endian length prefix
/// that frames it on the link. (An `Order` or `Submit` with a topic too
/// long for the binary layout, which only a peer's CBOR could have brought
/// in, goes as CBOR.)
pub fn encode(msg: &PeerMsg) -> Bytes {
    match msg {
        PeerMsg::Order { msgs, .. } if !msgs.iter().all(fits) => encode_cbor(msg),
        PeerMsg::Order {
            view,
            first,
            msgs,
            stable,
        } => encode_order(*view, *first, *stable, msgs),
        PeerMsg::Submit { msgs, .. } if !msgs.iter().all(|s| fits(&s.1)) => encode_cbor(msg),
        PeerMsg::Submit {
            view,
            front,
            first,
            msgs,
        } => encode_batch(
            SUBMIT_TAG,
            *view,
            [*front, *first],
            msgs.iter().map(|Submitted(after, m)| (Some(*after), m)),
        ),
        _ => encode_cbor(msg),
    }
}

/// A published message as an `Order` carries it: a [`Msg`], or an ordered
/// message straight from the log (the sequencer encodes its orders from
/// what it holds, without copying them into `Msg`s first).
pub trait Carried {
    /// Publisher, pub_seq, topic, payload.
    fn parts(&self) -> (PublisherId, PubSeq, &Arc<str>, &Bytes);
}

impl Carried for Msg {
    fn parts(&self) -> (PublisherId, PubSeq, &Arc<str>, &Bytes) {
        (self.0, self.1, &self.2, &self.3)
    }
}

impl Carried for Ordered {
    fn parts(&self) -> (PublisherId, PubSeq, &Arc<str>, &Bytes) {
        (self.publisher, self.pub_seq, &self.topic, &self.payload)
    }
}

impl<T: Carried> Carried for &T {
    fn parts(&self) -> (PublisherId, PubSeq, &Arc<str>, &Bytes) {
        (**self).parts()
    }
}

/// Whether the binary layout can carry the message's topic.
fn fits(m: &impl Carried) -> bool {
    m.parts().2.len() < usize::from(SAME_TOPIC)
}

/// An `Order` of `msgs`, the first with seq `first`, announcing `stable`:
/// what [`encode`] makes of the same `PeerMsg::Order`.
pub fn encode_order<T: Carried>(view: ViewId, first: Seq, stable: Seq, msgs: &[T]) -> Bytes {
    if !msgs.iter().all(fits) {
        let msgs = msgs
            .iter()
            .map(|m| {
                let (publisher, pub_seq, topic, payload) = m.parts();
                Msg(publisher, pub_seq, topic.clone(), payload.clone())
            })
            .collect();
        return encode_cbor(&PeerMsg::Order {
            view,
            first,
            msgs,
            stable,
        });
    }
    encode_batch(
        ORDER_TAG,
        view,
        [first.0, stable.0],
        msgs.iter().map(|m| (None, m)),
    )
}

/// CBOR, length prefix included.
fn encode_cbor(msg: &PeerMsg) -> Bytes {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(&[0; 4]);
    ciborium::into_writer(msg, &mut buf)
        .expect("invariant: encoding a PeerMsg into a Vec cannot fail");
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(buf)
}

/// A binary `Order` or `Submit` (module docs), length prefix included.
fn encode_batch<'a, T: Carried + 'a>(
    tag: u8,
    view: ViewId,
    head: [u64; 2],
    msgs: impl Iterator<Item = (Option<PubSeq>, &'a T)> + Clone,
) -> Bytes {
    let size: usize = msgs
        .clone()
        .map(|(after, m)| {
            let (_, _, topic, payload) = m.parts();
            8 * usize::from(after.is_some()) + ENTRY_LEN + topic.len() + payload.len()
        })
        .sum();
    let mut buf = Vec::with_capacity(4 + BATCH_HEAD_LEN + size);
    buf.extend_from_slice(&[0; 4]);
    buf.push(tag);
    buf.extend_from_slice(&view.epoch.to_le_bytes());
    buf.extend_from_slice(&view.coordinator.0.to_le_bytes());
    buf.extend_from_slice(&head[0].to_le_bytes());
    buf.extend_from_slice(&head[1].to_le_bytes());
    let count_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let (mut count, mut previous): (u32, Option<&str>) = (0, None);
    for (after, m) in msgs {
        let (publisher, pub_seq, topic, payload) = m.parts();
        if let Some(after) = after {
            buf.extend_from_slice(&after.0.to_le_bytes());
        }
        buf.extend_from_slice(&publisher.0.to_le_bytes());
        buf.extend_from_slice(&pub_seq.0.to_le_bytes());
        let same = previous == Some(&**topic);
        let topic_len = match same {
            true => SAME_TOPIC,
            false => u16::try_from(topic.len())
                .ok()
                .filter(|&n| n != SAME_TOPIC)
                .expect("invariant: longer topics go as CBOR (`encode`, `encode_order`)"),
        };
        buf.extend_from_slice(&topic_len.to_le_bytes());
        let payload_len = u32::try_from(payload.len())
            .expect("invariant: payloads are bounded by the frame length");
        buf.extend_from_slice(&payload_len.to_le_bytes());
        if !same {
            buf.extend_from_slice(topic.as_bytes());
        }
        buf.extend_from_slice(payload);
        previous = Some(topic);
        count += 1;
    }
    buf[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(buf)
}

/// Decodes a frame's content (the length prefix already taken off).
/// Payloads of a binary `Order` or `Submit` are slices of `content`.
///
/// # Errors
/// When the content is not a valid `PeerMsg`; the link should be dropped.
pub fn decode(content: Bytes) -> Result<PeerMsg, DecodeError> {
    match content.first() {
        Some(&(ORDER_TAG | SUBMIT_TAG)) => decode_batch(&content),
        _ => ciborium::from_reader(&content[..]).map_err(|e| DecodeError(e.to_string())),
    }
}

/// Reads a binary `Order` or `Submit` (module docs).
fn decode_batch(content: &Bytes) -> Result<PeerMsg, DecodeError> {
    let mut r = Reader { content, at: 1 };
    let view = ViewId {
        epoch: r.u64("epoch")?,
        coordinator: NodeId(r.u32("coordinator")?),
    };
    let (a, b) = (r.u64("head")?, r.u64("head")?);
    let count = r.u32("count")? as usize;
    let submit = content[0] == SUBMIT_TAG;
    let entry = ENTRY_LEN + 8 * usize::from(submit);
    if count > (content.len() - r.at) / entry {
        return Err(DecodeError(format!(
            "{count} messages cannot fit in {} bytes",
            content.len() - r.at
        )));
    }
    let mut msgs = Vec::with_capacity(count);
    let mut afters = Vec::with_capacity(if submit { count } else { 0 });
    let mut previous: Option<Arc<str>> = None;
    for i in 0..count {
        if submit {
            afters.push(PubSeq(r.u64("after")?));
        }
        let publisher = PublisherId(r.u64("publisher")?);
        let pub_seq = PubSeq(r.u64("pub_seq")?);
        let topic_len = r.u16("topic length")?;
        let payload_len = r.u32("payload length")? as usize;
        let topic = match (topic_len, &previous) {
            (SAME_TOPIC, Some(t)) => t.clone(),
            (SAME_TOPIC, None) => {
                return Err(DecodeError(format!(
                    "message {i} repeats the topic of no message"
                )))
            }
            (n, _) => {
                let bytes = r.take(usize::from(n), "topic")?;
                let text = std::str::from_utf8(&bytes)
                    .map_err(|e| DecodeError(format!("message {i}'s topic: {e}")))?;
                let t: Arc<str> = Arc::from(text);
                previous = Some(t.clone());
                t
            }
        };
        let payload = r.take(payload_len, "payload")?;
        msgs.push(Msg(publisher, pub_seq, topic, payload));
    }
    if r.at != content.len() {
        return Err(DecodeError(format!(
            "{} bytes after the last message",
            content.len() - r.at
        )));
    }
    Ok(match submit {
        false => PeerMsg::Order {
            view,
            first: Seq(a),
            msgs,
            stable: Seq(b),
        },
        true => PeerMsg::Submit {
            view,
            front: a,
            first: b,
            msgs: afters
                .into_iter()
                .zip(msgs)
                .map(|(after, m)| Submitted(after, m))
                .collect(),
        },
    })
}

/// Reads fixed-width fields and slices off a frame's content in turn.
struct Reader<'a> {
    content: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    /// The next `n` bytes, as a slice of the content.
    fn take(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.content.len())
            .ok_or_else(|| {
                DecodeError(format!(
                    "{what} of {n} bytes at {} runs past the end ({} bytes)",
                    self.at,
                    self.content.len()
                ))
            })?;
        let bytes = self.content.slice(self.at..end);
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let end = self.at + N;
        let bytes = self.content.get(self.at..end).ok_or_else(|| {
            DecodeError(format!(
                "cut short at {} before its {what} ({} bytes)",
                self.at,
                self.content.len()
            ))
        })?;
        self.at = end;
        Ok(bytes.try_into().expect("N bytes"))
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_le_bytes)
    }
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
        assert_eq!(decode(encode(&msg).slice(4..)), Ok(msg));
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
        assert_eq!(decode(encode(&hb).slice(4..)), Ok(hb));
        assert!(decode(Bytes::from_static(b"\xff\x00garbage")).is_err());
    }

    fn msg(publisher: u64, topic: &str, payload: &'static [u8]) -> Msg {
        Msg(
            PublisherId(publisher),
            PubSeq(publisher * 10),
            Arc::from(topic),
            Bytes::from_static(payload),
        )
    }

    /// `msgs` as the log holds them once ordered.
    fn held(msgs: &[Msg]) -> Vec<Ordered> {
        (1..)
            .zip(msgs)
            .map(|(i, m)| m.clone().ordered(Seq(i)))
            .collect()
    }

    fn view() -> ViewId {
        ViewId {
            epoch: u64::MAX - 1,
            coordinator: NodeId(u32::MAX),
        }
    }

    #[test]
    fn orders_and_submits_are_binary_and_survive_a_round_trip() {
        let msgs = vec![
            msg(1, "md.x", b"one"),
            msg(2, "md.x", b""),
            msg(3, "md.\u{e9}", b"three"),
            msg(4, "md.x", b"four"),
        ];
        let order = PeerMsg::Order {
            view: view(),
            first: Seq(u64::MAX - 4),
            msgs: msgs.clone(),
            stable: Seq(7),
        };
        let frame = encode(&order);
        assert_eq!(frame[4], ORDER_TAG);
        assert_eq!(
            u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize,
            frame.len() - 4
        );
        // The sequencer encodes the same frame from its log.
        assert_eq!(
            encode_order(view(), Seq(u64::MAX - 4), Seq(7), &held(&msgs)),
            frame
        );
        assert_eq!(decode(frame.slice(4..)), Ok(order));
        let submit = PeerMsg::Submit {
            view: view(),
            front: 3,
            first: 9,
            msgs: msgs
                .into_iter()
                .enumerate()
                .map(|(i, m)| Submitted(PubSeq(i as u64), m))
                .collect(),
        };
        let frame = encode(&submit);
        assert_eq!(frame[4], SUBMIT_TAG);
        assert_eq!(decode(frame.slice(4..)), Ok(submit));
        let empty = PeerMsg::Order {
            view: view(),
            first: Seq(1),
            msgs: Vec::new(),
            stable: Seq(0),
        };
        assert_eq!(decode(encode(&empty).slice(4..)), Ok(empty));
    }

    #[test]
    fn a_topic_run_is_sent_and_validated_once_and_payloads_are_not_copied() {
        let order = PeerMsg::Order {
            view: view(),
            first: Seq(1),
            msgs: vec![msg(1, "md.x", b"a"), msg(2, "md.x", b"b")],
            stable: Seq(0),
        };
        let frame = encode(&order).slice(4..);
        assert_eq!(frame.len(), BATCH_HEAD_LEN + 2 * ENTRY_LEN + 4 + 2);
        let Ok(PeerMsg::Order { msgs, .. }) = decode(frame.clone()) else {
            panic!("decodes");
        };
        assert!(Arc::ptr_eq(&msgs[0].2, &msgs[1].2));
        let end = frame.as_ptr_range().end;
        assert_eq!(msgs[1].3.as_ptr(), end.wrapping_sub(1));
    }

    #[test]
    fn a_topic_too_long_for_the_binary_layout_goes_as_cbor() {
        let long = "t".repeat(usize::from(SAME_TOPIC));
        let order = PeerMsg::Order {
            view: view(),
            first: Seq(1),
            msgs: vec![msg(1, "md.x", b"a"), msg(2, &long, b"b")],
            stable: Seq(0),
        };
        let frame = encode(&order);
        assert_ne!(frame[4], ORDER_TAG);
        let PeerMsg::Order { msgs, .. } = &order else {
            unreachable!()
        };
        assert_eq!(encode_order(view(), Seq(1), Seq(0), &held(msgs)), frame);
        assert_eq!(decode(frame.slice(4..)), Ok(order));
        let submit = PeerMsg::Submit {
            view: view(),
            front: 1,
            first: 1,
            msgs: vec![Submitted(PubSeq(0), msg(1, &long, b"a"))],
        };
        let frame = encode(&submit);
        assert_ne!(frame[4], SUBMIT_TAG);
        assert_eq!(decode(frame.slice(4..)), Ok(submit));
    }

    #[test]
    fn malformed_binary_frames_are_refused_with_what_is_wrong() {
        let order = PeerMsg::Order {
            view: view(),
            first: Seq(1),
            msgs: vec![msg(1, "md.x", b"abc"), msg(2, "md.x", b"de")],
            stable: Seq(0),
        };
        let good = encode(&order).slice(4..).to_vec();
        let refused = |bytes: Vec<u8>| match decode(bytes.into()) {
            Err(DecodeError(why)) => why,
            Ok(m) => panic!("decoded {m:?}"),
        };
        // Short: cut anywhere.
        for cut in 1..good.len() {
            let why = refused(good[..cut].to_vec());
            assert!(
                why.contains("cut short")
                    || why.contains("runs past")
                    || why.contains("cannot fit"),
                "cut at {cut}: {why}"
            );
        }
        // A count the bytes cannot hold.
        let mut bad = good.clone();
        bad[BATCH_HEAD_LEN - 4..BATCH_HEAD_LEN].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(refused(bad).contains("cannot fit"));
        // A payload length past the end.
        let mut bad = good.clone();
        let first_payload_len = BATCH_HEAD_LEN + 18;
        bad[first_payload_len..first_payload_len + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(refused(bad).contains("payload of 1000 bytes"));
        // A topic length past the end.
        let mut bad = good.clone();
        bad[BATCH_HEAD_LEN + 16..BATCH_HEAD_LEN + 18].copy_from_slice(&999u16.to_le_bytes());
        assert!(refused(bad).contains("topic of 999 bytes"));
        // The first message repeating a topic.
        let mut bad = good.clone();
        bad[BATCH_HEAD_LEN + 16..BATCH_HEAD_LEN + 18].copy_from_slice(&SAME_TOPIC.to_le_bytes());
        assert!(refused(bad).contains("repeats the topic of no message"));
        // A topic that is not UTF-8.
        let mut bad = good.clone();
        bad[BATCH_HEAD_LEN + ENTRY_LEN] = 0xff;
        assert!(refused(bad).contains("topic"));
        // Bytes after the last message.
        let mut bad = good.clone();
        bad.push(0);
        assert!(refused(bad).contains("1 bytes after the last message"));
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
        assert_eq!(decode(before.into()), Ok(now));
    }
}
