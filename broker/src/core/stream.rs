//! The stream's shared types, as every layer handles them: an ordered
//! message ([`Ordered`]), a message as it travels between core servers
//! ([`Msg`]), and the state that continues a stream elsewhere
//! ([`Snapshot`]). docs/DESIGN.md, "Layers".

use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One ordered message.
#[derive(Clone, Debug)]
pub struct Ordered {
    /// Its global sequence number.
    pub seq: Seq,
    /// Its topic.
    pub topic: Arc<str>,
    /// Who published it.
    pub publisher: PublisherId,
    /// The publisher's sequence number for it.
    pub pub_seq: PubSeq,
    /// The payload.
    pub payload: Bytes,
    /// The running hash of the whole stream through this message
    /// ([`chain`](canopy_client::protocol::chain)); set by the node that
    /// takes it into its stream, 0 before.
    pub hash: u64,
}

impl Ordered {
    /// What it counts against a byte bound: topic, payload and a fixed
    /// overhead.
    pub fn cost(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }
}

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
    /// The replicated service's state at `head` (RRPC's snapshot), in a
    /// core group; `None`: the state a new stream starts from.
    #[serde(default)]
    pub service: Option<Bytes>,
}

impl Snapshot {
    /// Whether a snapshot another server sent can be what it says: a seq
    /// follows `head`, and the messages fit below it, running to it from
    /// `first`.
    ///
    /// # Errors
    /// What does not hold, for the log.
    pub fn check(&self) -> Result<(), String> {
        let len = self.msgs.len() as u64;
        if self.head.0 == u64::MAX {
            return Err("head is the last seq there is".into());
        }
        if len > self.head.0 {
            return Err(format!("{len} messages through seq {}", self.head.0));
        }
        if len > 0 && self.first.0 != self.head.0 + 1 - len {
            return Err(format!(
                "{len} messages from seq {} do not run to seq {}",
                self.first.0, self.head.0
            ));
        }
        Ok(())
    }
}
