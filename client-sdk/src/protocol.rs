//! The Canopy client wire protocol: frame layout, every message type, encoding
//! and decoding. `PROTOCOL.md` beside this file describes the same thing for
//! readers who do not read Rust.
//!
//! A frame on the wire is a 4-byte big-endian length followed by that many
//! bytes of content (tokio-util's `LengthDelimitedCodec` with its defaults).
//! The content is:
//!
//! ```text
//! [kind: u8] [head: one CBOR item] [body: raw bytes, possibly empty]
//! ```
//!
//! The kind byte says which message follows, the CBOR head carries its fields,
//! and the body carries payload bytes uninterpreted, so that a receiver can
//! slice payloads out of the received buffer without copying and a sender can
//! encode a delivery once and share it with every subscriber.
//!
//! Heads are CBOR maps decoded with serde; unknown fields are ignored, so a
//! later protocol version can add fields (credentials in `Hello`, for example)
//! without breaking older peers.

pub use crate::permissions::{Credentials, Permissions};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The protocol version this crate speaks.
///
/// Version 2: a `Deliver` frame's head is a fixed-width binary index
/// ([`encode_deliver`]) instead of CBOR. Version 3: flow control
/// (`Credit`). Version 4: a relay answers each refusal of one publisher's
/// forwards with `Released`; a pub_seq that begins an incarnation may
/// follow any lower one ([`PubSeq::begins_incarnation`]).
pub const PROTOCOL_VERSION: u32 = 4;

/// The default maximum frame content length, in bytes.
pub const FRAME_LEN_MAX_DEFAULT: usize = 1 << 20;

/// The largest `frame_len_max` a server may be configured with.
pub const FRAME_LEN_MAX_LIMIT: usize = 64 << 20;

/// How much longer than the largest publish a delivery frame carrying it
/// may be (its head and topic); clients accept frames this much longer.
pub const FRAME_HEAD_ALLOWANCE: usize = 64 << 10;

/// A global sequence number: a message's position in the one total order.
///
/// Sequence numbers start at 1; `Seq(0)` means "before the first message".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The sequence number after this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifies a publisher across reconnects; chosen by the client.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PublisherId(pub u64);

impl fmt::Display for PublisherId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A publisher's own sequence number for its messages, starting at 1.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PubSeq(pub u64);

impl PubSeq {
    /// Publish sequence numbers come in incarnations of 2^32: a program
    /// restarted with a fixed publisher id begins a new one, so that none
    /// of its pub_seqs is taken for one of its predecessor's still on its
    /// way (docs/DESIGN.md, "Identity and resume").
    pub const INCARNATION_BITS: u32 = 32;

    /// Whether this pub_seq begins an incarnation: it may follow any lower
    /// pub_seq of its publisher, as a first contact may.
    pub fn begins_incarnation(self) -> bool {
        self.0 != 0 && self.0.trailing_zeros() >= Self::INCARNATION_BITS
    }

    /// The first pub_seq of incarnation `epoch`, if there is one.
    pub fn incarnation(epoch: u64) -> Option<PubSeq> {
        (epoch > 0 && epoch < 1 << (64 - Self::INCARNATION_BITS))
            .then_some(PubSeq(epoch << Self::INCARNATION_BITS))
    }

    /// Where a program restarted with a fixed publisher id starts, the
    /// server having ordered its id's publishes through `self`: the first
    /// incarnation at least half an incarnation past it (its
    /// predecessor's publishes on their way, at most a publish window past
    /// what any server acknowledged, stay below), or the next pub_seq when
    /// no incarnation is left.
    pub fn next_incarnation(self) -> PubSeq {
        let half = 1u64 << (Self::INCARNATION_BITS - 1);
        let next = self
            .0
            .checked_add(half)
            .map(|x| (x >> Self::INCARNATION_BITS) + 1)
            .filter(|&e| e < 1 << (64 - Self::INCARNATION_BITS))
            .map(|e| e << Self::INCARNATION_BITS);
        PubSeq(next.unwrap_or(self.0.saturating_add(1)))
    }
}

/// What the broker does when a client's outbound queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowPolicy {
    /// Close the connection with a `slow_consumer` error; the client resumes later.
    #[default]
    Disconnect,
    /// Drop deliveries and send a gap notice instead (conflating market data).
    Conflate,
}

/// Error codes carried by [`ErrorFrame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame content was not a valid head for its kind.
    Malformed,
    /// The frame was longer than the negotiated maximum.
    FrameTooLarge,
    /// The kind byte named no known message.
    UnknownKind,
    /// The client's protocol version is not supported.
    UnsupportedVersion,
    /// A message other than `Hello` arrived before the handshake.
    HandshakeRequired,
    /// No `Hello` arrived in time.
    HandshakeTimeout,
    /// Nothing (not even a ping) arrived for the server's idle time.
    IdleTimeout,
    /// The server holds as many connections as it may; try another.
    TooManyConnections,
    /// A second `Hello` on one connection.
    DuplicateHello,
    /// A topic was not valid.
    InvalidTopic,
    /// A subscription pattern was not valid.
    InvalidPattern,
    /// A publish skipped publisher sequence numbers.
    PubSeqGap,
    /// Too many subscriptions on one connection.
    TooManySubscriptions,
    /// The client did not keep up with its deliveries and was cut off.
    SlowConsumer,
    /// The server is shutting down; reconnect elsewhere.
    ShuttingDown,
    /// A frame the client must never send (a server-to-client kind).
    UnexpectedKind,
    /// This server is not in the primary component of the core (it is
    /// cut off from a majority, or still joining): move to another server.
    NotPrimary,
    /// The server holds as many unordered publishes as it may; reconnect
    /// and retry (the unacknowledged publishes are sent again).
    Overloaded,
    /// A publish named another publisher, which only a relay may do.
    ForwardNotAllowed,
    /// No credentials, or wrong ones, where the server checks who its
    /// clients are.
    AuthFailed,
    /// The client's address holds as many connections to this server as
    /// it may.
    TooManyFromAddress,
    /// The user may not do what it asked: a subscription outside its
    /// permissions (the connection stays open), or a publish, call, relay
    /// role or membership report it may not have.
    PermissionDenied,
    /// `Hello.weak` with `full` membership reports, whose positions are
    /// stable ones (only a relay may ask for both: it takes the complete
    /// report and follows the stream's membership events itself).
    WeakNotAllowed,
}

impl ErrorCode {
    /// Whether a client that receives this error should reconnect and resume
    /// (the condition is the server's or temporary), rather than give up
    /// (the client itself misbehaved).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::SlowConsumer
                | ErrorCode::ShuttingDown
                | ErrorCode::TooManyConnections
                | ErrorCode::HandshakeTimeout
                | ErrorCode::IdleTimeout
                | ErrorCode::NotPrimary
                | ErrorCode::Overloaded
        )
    }
}

/// Frame kind bytes.
pub mod kind {
    /// Client to server: handshake.
    pub const HELLO: u8 = 0x01;
    /// Client to server: add a subscription.
    pub const SUBSCRIBE: u8 = 0x02;
    /// Client to server: remove a subscription.
    pub const UNSUBSCRIBE: u8 = 0x03;
    /// Client to server: publish one message (payload in the body).
    pub const PUBLISH: u8 = 0x04;
    /// Either way: liveness probe.
    pub const PING: u8 = 0x05;
    /// Either way: answer to a ping.
    pub const PONG: u8 = 0x06;
    /// Client to server: asks again for the reply to a call already
    /// acknowledged (after a reconnect).
    pub const ASK: u8 = 0x07;
    /// Client to server: the client can take this many more messages
    /// (flow control, for a client whose `Hello` gave a `window`).
    pub const CREDIT: u8 = 0x08;
    /// Relay to server: it has handled a refusal of one publisher's
    /// forwards; what it forwards for that publisher from here on comes
    /// from the publisher's resend.
    pub const RELEASED: u8 = 0x09;
    /// Server to client: handshake answer.
    pub const WELCOME: u8 = 0x81;
    /// Server to client: a batch of ordered messages (topics and payloads in the body).
    pub const DELIVER: u8 = 0x82;
    /// Server to client: cumulative publish acknowledgement.
    pub const PUB_ACK: u8 = 0x83;
    /// Server to client: a subscription is active.
    pub const SUBSCRIBED: u8 = 0x84;
    /// Server to client: a subscription was removed.
    pub const UNSUBSCRIBED: u8 = 0x85;
    /// Server to client: the stream position, for quiet subscriptions.
    pub const WATERMARK: u8 = 0x86;
    /// Server to client: messages in a range may have been missed.
    pub const GAP: u8 = 0x87;
    /// Server to client: an error; fatal errors are followed by a close.
    pub const ERROR: u8 = 0x88;
    /// Server to client (`full` reports): a change of the tree's membership,
    /// at a position of the stream.
    pub const MEMBERS: u8 = 0x89;
    /// Server to client (`servers` reports): the serving tier's servers.
    pub const SERVERS: u8 = 0x8a;
    /// Server to client (weak delivery): what the client delivered from a
    /// position on is not the agreed stream; the agreed stream follows.
    pub const DIVERGED: u8 = 0x8b;
    /// Server to client: the reply to a call (the reply's bytes in the body).
    pub const REPLY: u8 = 0x8c;
}

/// Client to server: the first frame on every connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks.
    pub version: u32,
    /// A human-readable client name for logs and the dashboard.
    #[serde(default)]
    pub name: String,
    /// The client's publisher id, stable across its reconnects.
    pub publisher: PublisherId,
    /// Subscriptions to install before anything is delivered.
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// When resuming: where the client stopped. The server replays retained
    /// messages after it that match `subscriptions`.
    #[serde(default)]
    pub resume: Option<Resume>,
    /// What to do when this client cannot keep up.
    #[serde(default)]
    pub slow: SlowPolicy,
    /// What the client is: an application, or a relay serving clients of
    /// its own (which may publish on their behalf).
    #[serde(default)]
    pub role: Role,
    /// What the client is told of the tree's membership.
    #[serde(default)]
    pub reports: Reports,
    /// Counts this client's connections (1 for the first): the membership
    /// keeps its newest one, whatever order servers report them in.
    #[serde(default)]
    pub connection: u64,
    /// Weak delivery (docs/DESIGN.md guarantee 6): messages are delivered as
    /// soon as they are ordered, before they are stable. If a failure
    /// takes back what was delivered, the server says so with a
    /// [`DivergedHead`], never silently.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub weak: bool,
    /// Who the client is, for a server that checks (docs/DESIGN.md,
    /// "Security").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Credentials>,
    /// Flow control (docs/DESIGN.md, "Flow control"): the messages the
    /// server may send on this connection before the client grants more
    /// with `Credit`. `None`: no limit (relays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// What a client is told of membership (docs/DESIGN.md, "Membership reports").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reports {
    /// Every change of servers and clients, in order with the messages
    /// ([`MembersHead`]): the group model of the core.
    Full,
    /// The serving tier's server list when it changes ([`ServersHead`]).
    #[default]
    Servers,
    /// Nothing: the cheapest at thousands of clients.
    None,
}

/// One client in a membership report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// The client's publisher id.
    pub id: PublisherId,
    /// Its name.
    pub name: String,
    /// The id of the server (core server or relay) serving it.
    pub server: PublisherId,
    /// Whether it is a relay (and so a server of the tier below).
    pub relay: bool,
    /// Its connection at that server.
    #[serde(default)]
    pub session: u64,
    /// The client's own count of its connections ([`Hello::connection`]).
    #[serde(default)]
    pub connection: u64,
}

/// One core server in a membership report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Its id (the publisher id it attaches clients under).
    pub id: PublisherId,
    /// Its name.
    pub name: String,
    /// Its client address, when known.
    pub addr: String,
}

/// Server to client (`full` reports): the membership changed after the
/// message at `seq` (before any later one). Clients apply these in order
/// to the complete report that follows their handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersHead {
    /// The stream position of the change.
    pub seq: Seq,
    /// Whether this report replaces everything known (the first one on a
    /// connection) rather than changing it.
    pub complete: bool,
    /// The core's servers, when they changed (or in a complete report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core: Option<Vec<ServerEntry>>,
    /// Clients that joined (or moved to another server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<MemberEntry>,
    /// Clients that left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<PublisherId>,
}

/// Server to client (`servers` reports): the servers of the serving tier
/// now, by client address, after the message at `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServersHead {
    /// The stream position of the change.
    pub seq: Seq,
    /// Client addresses.
    pub servers: Vec<String>,
}

/// What kind of client a session serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An application: publishes as its own publisher id.
    #[default]
    Client,
    /// A relay of a lower tier: subscribes to the whole stream and forwards
    /// its own clients' publishes, each under that client's publisher id
    /// ([`Publish::publisher`]).
    Relay,
}

/// Where a resuming client stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The ordered stream the position belongs to ([`Welcome::stream`]).
    pub stream: u64,
    /// The last sequence number the client delivered or was told of by a
    /// watermark.
    pub after: Seq,
    /// The running hash of the stream at the last delivery frame the
    /// client took ([`DeliverHead::hash`]): the server compares it with
    /// its own at that seq, and a difference is reported as a
    /// [`DivergedHead`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<StreamCheck>,
    /// Weak delivery: the position through which the client's stream is
    /// known to be the agreed one ([`DeliverHead::stable`]); on a
    /// difference the agreed stream is replayed from after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreed: Option<Seq>,
}

/// A point of the ordered stream and its running hash there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCheck {
    /// The seq.
    pub seq: Seq,
    /// The running hash of the whole stream through `seq` ([`chain`]).
    pub hash: u64,
}

/// The running hash of the ordered stream: the hash through the message
/// `(seq, publisher, pub_seq)` from the hash through the one before it (0
/// before seq 1). A publisher's `(publisher, pub_seq)` names one message,
/// so two streams with the same hash at a seq hold, with near certainty,
/// the same messages up to it.
pub fn chain(prev: u64, seq: Seq, publisher: PublisherId, pub_seq: PubSeq) -> u64 {
    [seq.0, publisher.0, pub_seq.0]
        .into_iter()
        .fold(prev, |h, v| splitmix64(h ^ v))
}

/// Client to server: add or remove one subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscribeHead {
    /// The pattern.
    pub pattern: String,
}

/// Client to server: a decoded publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// This publisher's sequence number for the message.
    pub pub_seq: PubSeq,
    /// Set by a relay: whose publish it forwards.
    pub publisher: Option<PublisherId>,
    /// The topic's bytes as sent, not checked here: a node checks each
    /// distinct topic once (PROTOCOL.md, "Publish").
    topic: Bytes,
    /// The payload.
    pub payload: Bytes,
}

impl Publish {
    /// A publish of `payload` to `topic`.
    pub fn new(topic: &str, pub_seq: PubSeq, payload: Bytes) -> Self {
        Publish {
            pub_seq,
            publisher: None,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload,
        }
    }

    /// The topic's bytes as sent.
    pub fn topic_bytes(&self) -> &[u8] {
        &self.topic
    }

    /// The topic as sent; empty when it is not UTF-8 (a decoded publish
    /// whose topic was not checked yet: see [`Publish::topic_bytes`]).
    pub fn topic(&self) -> &str {
        std::str::from_utf8(&self.topic).unwrap_or("")
    }
}

/// Encodes a publish frame (with its length prefix).
///
/// # Panics
/// If `topic` is longer than 65,535 bytes; callers validate topics first
/// ([`crate::topic::TOPIC_LEN_MAX`]).
pub fn encode_publish(topic: &str, pub_seq: PubSeq, payload: &[u8]) -> Bytes {
    encode_forward(None, topic, pub_seq, payload)
}

/// Encodes a publish frame that a relay forwards for `publisher` (its own
/// when `None`), with its length prefix.
///
/// # Panics
/// As [`encode_publish`].
pub fn encode_forward(
    publisher: Option<PublisherId>,
    topic: &str,
    pub_seq: PubSeq,
    payload: &[u8],
) -> Bytes {
    encode_forward_raw(publisher, topic.as_bytes(), pub_seq, payload)
}

/// [`encode_forward`] of a topic's bytes as they are (a decoded publish
/// whose topic the node has not checked encodes back to itself).
fn encode_forward_raw(
    publisher: Option<PublisherId>,
    topic: &[u8],
    pub_seq: PubSeq,
    payload: &[u8],
) -> Bytes {
    let mut buf = BytesMut::with_capacity(forward_len(topic, payload));
    write_forward(&mut buf, publisher, topic, pub_seq, payload);
    buf.freeze()
}

/// [`encode_forward`] into `arena`, an empty buffer whose spare capacity
/// frames are cut from (grown by at least [`ARENA_BLOCK`] when short):
/// frames encoded one after the other share one allocation.
///
/// # Panics
/// As [`encode_publish`].
pub fn encode_forward_into(
    arena: &mut BytesMut,
    publisher: Option<PublisherId>,
    topic: &str,
    pub_seq: PubSeq,
    payload: &[u8],
) -> Bytes {
    arena.clear();
    let len = forward_len(topic.as_bytes(), payload);
    if arena.capacity() < len {
        arena.reserve(len.max(ARENA_BLOCK));
    }
    write_forward(arena, publisher, topic.as_bytes(), pub_seq, payload);
    arena.split().freeze()
}

/// The most bytes a publish frame of `topic` and `payload` takes.
fn forward_len(topic: &[u8], payload: &[u8]) -> usize {
    4 + PUBLISH_FIXED_LEN + 8 + topic.len() + payload.len()
}

/// Appends a publish frame to the empty `buf`.
fn write_forward(
    buf: &mut BytesMut,
    publisher: Option<PublisherId>,
    topic: &[u8],
    pub_seq: PubSeq,
    payload: &[u8],
) {
    let topic_len =
        u16::try_from(topic.len()).expect("invariant: topics are validated to TOPIC_LEN_MAX");
    buf.put_u32(0);
    buf.put_u8(kind::PUBLISH);
    buf.put_u8(u8::from(publisher.is_some()) * PUBLISH_FOR);
    buf.put_u64_le(pub_seq.0);
    buf.put_u16_le(topic_len);
    if let Some(p) = publisher {
        buf.put_u64_le(p.0);
    }
    buf.extend_from_slice(topic);
    buf.extend_from_slice(payload);
    let len = u32::try_from(buf.len() - 4)
        .expect("invariant: frames are bounded far below 4 GiB by frame_len_max");
    buf[..4].copy_from_slice(&len.to_be_bytes());
}

/// Bytes of a `Publish` frame before its optional publisher: kind, flags,
/// pub_seq (u64), topic length (u16).
const PUBLISH_FIXED_LEN: usize = 12;
/// The least an encoding arena grows by ([`encode_forward_into`]).
pub const ARENA_BLOCK: usize = 64 << 10;
/// `Publish` flags: the publisher a relay forwards for follows (u64).
const PUBLISH_FOR: u8 = 1;

/// Reads a `Publish` frame's content by slicing (PROTOCOL.md, "Publish").
fn decode_publish(content: &Bytes) -> Result<Publish, DecodeError> {
    let bad = |reason: String| DecodeError::Malformed {
        kind: kind::PUBLISH,
        reason,
    };
    let fixed = content
        .get(..PUBLISH_FIXED_LEN)
        .ok_or_else(|| bad(format!("{} bytes, shorter than the head", content.len())))?;
    let flags = fixed[1];
    if flags & !PUBLISH_FOR != 0 {
        return Err(bad(format!("unknown flags {flags:#04x}")));
    }
    let pub_seq = PubSeq(u64::from_le_bytes(
        fixed[2..10].try_into().expect("eight bytes"),
    ));
    let n = usize::from(u16::from_le_bytes([fixed[10], fixed[11]]));
    let mut at = PUBLISH_FIXED_LEN;
    let publisher = match flags & PUBLISH_FOR {
        0 => None,
        _ => {
            let bytes = content
                .get(at..at + 8)
                .ok_or_else(|| bad("cut short before its publisher".into()))?;
            at += 8;
            Some(PublisherId(u64::from_le_bytes(
                bytes.try_into().expect("eight bytes"),
            )))
        }
    };
    let body = content.slice(at..);
    if n > body.len() {
        return Err(bad("topic_len runs past the body".into()));
    }
    Ok(Publish {
        pub_seq,
        publisher,
        topic: body.slice(..n),
        payload: body.slice(n..),
    })
}

/// Either way: ping or pong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingHead {
    /// Echoed in the pong.
    pub nonce: u64,
}

/// Server to client: the handshake answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the server speaks.
    pub version: u32,
    /// The server's name.
    pub server: String,
    /// The server's session number for this connection (for logs).
    pub session: u64,
    /// Identifies the ordered stream. It changes only when the whole stream
    /// was lost (every server restarted); sequence numbers then start again
    /// and a client must not resume by its old position.
    pub stream: u64,
    /// The last sequence number ordered so far.
    pub head: Seq,
    /// The highest publisher sequence number already ordered for this
    /// client's publisher id; everything up to it is acknowledged.
    pub pub_acked: PubSeq,
    /// The largest frame content the server accepts, in bytes.
    pub frame_len_max: u32,
    /// The client addresses of every server of this server's tier (itself
    /// included), in configured order. Clients fail over among these, to
    /// the adopter [`adopter_order`] names; empty when the server knows no
    /// siblings (the client keeps its own list).
    #[serde(default)]
    pub servers: Vec<String>,
    /// The running hash of the stream through `head` ([`chain`]). `head`
    /// is stable; a weak client is then sent what is held after it.
    #[serde(default)]
    pub hash: u64,
    /// From a server that checks who its clients are: what this one may
    /// do there (and at every server of the tree: they read one accounts
    /// file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
}

/// One message inside a [`ServerFrame::Deliver`] head. Its topic and payload follow, in
/// this order and without separators, in the frame body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverEntry(pub Seq, pub PublisherId, pub PubSeq, pub u16, pub u32);

/// Server to client: a batch of ordered messages, ascending by sequence number.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliverHead {
    /// `(seq, publisher, pub_seq, topic_len, payload_len)` per message.
    pub msgs: Vec<DeliverEntry>,
    /// The running hash of the whole stream ([`chain`]) through the last
    /// message of this frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<u64>,
    /// Weak delivery only: the server's stable position when it sent the
    /// frame. Through it, what the client was sent is the agreed stream
    /// (a difference would have been reported before this frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<Seq>,
}

/// Server to client (weak delivery): the messages this client was sent at
/// seqs `from` and later are not (all) the agreed stream: a server that
/// ordered them failed before they were stable, and the survivors ordered
/// otherwise. The agreed stream from `from` on follows this frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DivergedHead {
    /// The first seq whose delivery may have been wrong.
    pub from: Seq,
    /// The seq at which the difference was seen (`>= from`).
    pub seen: Seq,
}

/// Server to client: the reply to a call (a publish on a
/// [`CALL_PREFIX`] topic), named by the call's pub_seq. The reply's bytes
/// are the frame's body; a failed call has an empty body and `error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyHead {
    /// The call's pub_seq.
    pub pub_seq: PubSeq,
    /// To a relay only: the caller it forwarded the call for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<PublisherId>,
    /// Why the call failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CallFailure>,
}

/// The topic prefix of calls: a call of method `m` is a publish on
/// `$canopy.call.m` (or, asking for more than one reply, see [`Replies`]),
/// and its pub_seq names it.
pub const CALL_PREFIX: &str = "$canopy.call.";

/// Which replies the caller of a method waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replies {
    /// The group's reply, from the server the caller is attached to (a
    /// publish on `$canopy.call.METHOD`).
    #[default]
    Own,
    /// Active methods: every replica's own reply, as a CBOR list of
    /// [`Vote`]s in the reply's body (`$canopy.call.$all.METHOD`).
    All,
    /// Active methods: the reply more than half the replicas gave, or
    /// [`CallErrorCode::NoMajority`] (`$canopy.call.$majority.METHOD`).
    Majority,
}

impl Replies {
    /// The topic a call of `method` waiting for these replies is
    /// published on.
    pub fn topic(self, method: &str) -> String {
        match self {
            Replies::Own => format!("{CALL_PREFIX}{method}"),
            Replies::All => format!("{CALL_PREFIX}$all.{method}"),
            Replies::Majority => format!("{CALL_PREFIX}$majority.{method}"),
        }
    }

    /// A call topic's method and the replies its caller waits for; `None`
    /// for a topic that is not a call's.
    pub fn parse(topic: &str) -> Option<(&str, Replies)> {
        let rest = topic.strip_prefix(CALL_PREFIX)?;
        Some(if let Some(m) = rest.strip_prefix("$all.") {
            (m, Replies::All)
        } else if let Some(m) = rest.strip_prefix("$majority.") {
            (m, Replies::Majority)
        } else {
            (rest, Replies::Own)
        })
    }
}

/// One replica's own reply to a call that waited for every replica's
/// ([`Replies::All`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// The replica's server id.
    pub server: u32,
    /// Its reply, or why its handler failed.
    pub reply: Result<Bytes, CallFailure>,
}

/// Why a call failed, as the group agreed it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CallFailure {
    /// What went wrong, for programs.
    pub code: CallErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallErrorCode {
    /// The service has no method of that name.
    UnknownMethod,
    /// The service's handler refused the call (its message says why).
    Handler,
    /// The core runs no replicated service.
    NoService,
    /// The call was executed, but its reply is no longer held (the group
    /// keeps a bounded number of replies): it will not be executed again.
    Forgotten,
    /// Told by the client itself: the core's stream began again (every
    /// server lost its state, the SDK's `StreamReset`) after the call was
    /// acknowledged; whether it was executed is not known.
    StreamReset,
    /// Every replica's reply, or a majority's, was asked of a method that
    /// is not active (only active methods run at every replica).
    NotActive,
    /// No reply was given by more than half the replicas that applied the
    /// call (they disagree: a handler that is not deterministic).
    NoMajority,
}

/// Server to client: every publish of this connection's publisher up to and
/// including `pub_seq` is ordered (and, in a cluster, stable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PubAck {
    /// Cumulative: all publisher sequence numbers up to this one.
    pub pub_seq: PubSeq,
    /// The global sequence number given to `pub_seq`.
    pub seq: Seq,
    /// To a relay only: the publisher whose publish this acknowledges. A
    /// relay learns of most orderings from the stream itself; it is told
    /// this way only of retries that were ordered before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<PublisherId>,
}

/// Server to client: a subscription change took effect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscribedHead {
    /// The pattern.
    pub pattern: String,
    /// The last sequence number ordered when the change took effect.
    pub head: Seq,
    /// The running hash of the stream through `head` (the client's
    /// position moves there, so its resume check does too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<u64>,
}

/// Server to client: every message up to `seq` that matches this client's
/// subscriptions has been sent before this frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkHead {
    /// The position.
    pub seq: Seq,
}

/// Server to client: matching messages with sequence numbers in `from..=to`
/// may have been missed and will not be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapHead {
    /// First possibly missed sequence number.
    pub from: Seq,
    /// Last possibly missed sequence number.
    pub to: Seq,
}

/// Server to client: an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
    /// To a relay only: the error concerns only the publishes it forwards
    /// for this publisher, and the connection stays open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<PublisherId>,
    /// The error concerns only this subscription (it is not in effect),
    /// and the connection stays open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
}

/// A decoded client-to-server frame.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientFrame {
    /// Handshake.
    Hello(Hello),
    /// Add a subscription.
    Subscribe(SubscribeHead),
    /// Remove a subscription.
    Unsubscribe(SubscribeHead),
    /// Publish a message.
    Publish(Publish),
    /// Liveness probe.
    Ping(PingHead),
    /// Answer to a server ping.
    Pong(PingHead),
    /// Asks again for a call's reply.
    Ask(AskHead),
    /// Grants the server more messages (flow control).
    Credit(CreditHead),
    /// From a relay: a refusal of one publisher's forwards is handled.
    Released(ReleasedHead),
}

/// Relay to server: the answer to an `Error` that refused `publisher`'s
/// forwards. The relay closed that publisher's session (or had each relay
/// below it do the same, and waited for their `Released`), so everything it
/// forwards for the publisher after this frame comes from the publisher's
/// resend, in the publisher's order. The server drops the relay's forwards
/// for the publisher from the refusal up to this frame: they may overtake
/// the refused publish, and the publisher sends them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedHead {
    /// The publisher whose refusal is handled.
    pub publisher: PublisherId,
}

/// Client to server: the server may send `msgs` more messages (counted as
/// `Deliver` entries) than it could before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditHead {
    /// Messages granted.
    pub msgs: u64,
}

/// Client to server: the reply to call `pub_seq`, acknowledged before on
/// another connection, is still awaited. The server answers with the
/// `Reply` when it has (or once it has) applied the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskHead {
    /// The call's pub_seq.
    pub pub_seq: PubSeq,
    /// From a relay only: the caller it asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<PublisherId>,
}

/// A decoded server-to-client frame.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerFrame {
    /// Handshake answer.
    Welcome(Welcome),
    /// Ordered messages; the body holds their topics and payloads.
    Deliver(DeliverHead, Bytes),
    /// Publish acknowledgement.
    PubAck(PubAck),
    /// Subscription active.
    Subscribed(SubscribedHead),
    /// Subscription removed.
    Unsubscribed(SubscribedHead),
    /// Stream position.
    Watermark(WatermarkHead),
    /// Missed range.
    Gap(GapHead),
    /// Error.
    Error(ErrorFrame),
    /// Liveness probe.
    Ping(PingHead),
    /// Answer to a client ping.
    Pong(PingHead),
    /// A membership change (`full` reports).
    Members(MembersHead),
    /// The serving tier's servers (`servers` reports).
    Servers(ServersHead),
    /// Weak delivery: the stream delivered from a position on was not the
    /// agreed one.
    Diverged(DivergedHead),
    /// The reply to a call; the body holds the reply's bytes.
    Reply(ReplyHead, Bytes),
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The content was empty: no kind byte.
    #[error("empty frame")]
    Empty,
    /// The kind byte names no message of this direction.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The kind is known but travels the other way.
    #[error("frame kind 0x{0:02x} is never sent in this direction")]
    WrongDirection(u8),
    /// The head was not valid CBOR for the kind, or the body did not add up.
    #[error("malformed frame of kind 0x{kind:02x}: {reason}")]
    Malformed {
        /// The kind byte.
        kind: u8,
        /// What was wrong.
        reason: String,
    },
}

impl DecodeError {
    /// The error code a server answers this decode error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Empty | DecodeError::Malformed { .. } => ErrorCode::Malformed,
            DecodeError::UnknownKind(_) => ErrorCode::UnknownKind,
            DecodeError::WrongDirection(_) => ErrorCode::UnexpectedKind,
        }
    }
}

/// Encodes a frame with its 4-byte length prefix, ready to write to a socket.
pub fn encode<H: Serialize>(kind: u8, head: &H, body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(64 + body.len());
    encode_into(&mut buf, kind, head, body);
    buf.freeze()
}

/// Appends a frame with its 4-byte length prefix to `buf`.
pub fn encode_into<H: Serialize>(buf: &mut BytesMut, kind: u8, head: &H, body: &[u8]) {
    encode_parts(buf, kind, head, &[body]);
}

/// Appends a frame whose body is the concatenation of `body`.
fn encode_parts<H: Serialize>(buf: &mut BytesMut, kind: u8, head: &H, body: &[&[u8]]) {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_u8(kind);
    // Writing CBOR into memory fails only if the head's Serialize impl fails,
    // and every head in this module is plain data.
    ciborium::into_writer(head, (&mut *buf).writer())
        .expect("invariant: protocol heads always serialize to memory");
    for part in body {
        buf.extend_from_slice(part);
    }
    let len = u32::try_from(buf.len() - start - 4)
        .expect("invariant: frames are bounded far below 4 GiB by frame_len_max");
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Splits content into kind, decoded head and the remaining body.
fn split<H: for<'de> Deserialize<'de>>(
    kind: u8,
    content: &Bytes,
) -> Result<(H, Bytes), DecodeError> {
    let mut rest: &[u8] = &content[1..];
    let head = ciborium::from_reader(&mut rest).map_err(|e| DecodeError::Malformed {
        kind,
        reason: e.to_string(),
    })?;
    let offset = content.len() - rest.len();
    Ok((head, content.slice(offset..)))
}

fn no_body<H>(kind: u8, (head, body): (H, Bytes)) -> Result<H, DecodeError> {
    if body.is_empty() {
        Ok(head)
    } else {
        Err(DecodeError::Malformed {
            kind,
            reason: format!("{} unexpected bytes after the head", body.len()),
        })
    }
}

/// Decodes the content of a client-to-server frame (length prefix removed).
///
/// # Errors
/// [`DecodeError`] when the content is not a valid client frame.
pub fn decode_client(content: Bytes) -> Result<ClientFrame, DecodeError> {
    let k = *content.first().ok_or(DecodeError::Empty)?;
    Ok(match k {
        kind::HELLO => ClientFrame::Hello(no_body(k, split(k, &content)?)?),
        kind::SUBSCRIBE => ClientFrame::Subscribe(no_body(k, split(k, &content)?)?),
        kind::UNSUBSCRIBE => ClientFrame::Unsubscribe(no_body(k, split(k, &content)?)?),
        kind::PUBLISH => ClientFrame::Publish(decode_publish(&content)?),
        kind::PING => ClientFrame::Ping(no_body(k, split(k, &content)?)?),
        kind::PONG => ClientFrame::Pong(no_body(k, split(k, &content)?)?),
        kind::ASK => ClientFrame::Ask(no_body(k, split(k, &content)?)?),
        kind::RELEASED => ClientFrame::Released(no_body(k, split(k, &content)?)?),
        kind::CREDIT => ClientFrame::Credit(no_body(k, split(k, &content)?)?),
        k if (0x80..=kind::REPLY).contains(&k) => return Err(DecodeError::WrongDirection(k)),
        k => return Err(DecodeError::UnknownKind(k)),
    })
}

/// Decodes the content of a server-to-client frame (length prefix removed).
///
/// # Errors
/// [`DecodeError`] when the content is not a valid server frame.
pub fn decode_server(content: Bytes) -> Result<ServerFrame, DecodeError> {
    let k = *content.first().ok_or(DecodeError::Empty)?;
    Ok(match k {
        kind::WELCOME => ServerFrame::Welcome(no_body(k, split(k, &content)?)?),
        kind::DELIVER => {
            let (head, body) = decode_deliver(&content)?;
            ServerFrame::Deliver(head, body)
        }
        kind::PUB_ACK => ServerFrame::PubAck(no_body(k, split(k, &content)?)?),
        kind::SUBSCRIBED => ServerFrame::Subscribed(no_body(k, split(k, &content)?)?),
        kind::UNSUBSCRIBED => ServerFrame::Unsubscribed(no_body(k, split(k, &content)?)?),
        kind::WATERMARK => ServerFrame::Watermark(no_body(k, split(k, &content)?)?),
        kind::GAP => ServerFrame::Gap(no_body(k, split(k, &content)?)?),
        kind::ERROR => ServerFrame::Error(no_body(k, split(k, &content)?)?),
        kind::PING => ServerFrame::Ping(no_body(k, split(k, &content)?)?),
        kind::PONG => ServerFrame::Pong(no_body(k, split(k, &content)?)?),
        kind::MEMBERS => ServerFrame::Members(no_body(k, split(k, &content)?)?),
        kind::SERVERS => ServerFrame::Servers(no_body(k, split(k, &content)?)?),
        kind::DIVERGED => ServerFrame::Diverged(no_body(k, split(k, &content)?)?),
        kind::REPLY => {
            let (head, body): (ReplyHead, Bytes) = split(k, &content)?;
            if head.error.is_some() && !body.is_empty() {
                return Err(DecodeError::Malformed {
                    kind: k,
                    reason: "a failed call's reply has a body".into(),
                });
            }
            ServerFrame::Reply(head, body)
        }
        k if k < 0x80 => return Err(DecodeError::WrongDirection(k)),
        k => return Err(DecodeError::UnknownKind(k)),
    })
}

/// An `Error` frame about the whole connection (the one before a close).
pub fn encode_error(code: ErrorCode, message: &str) -> Bytes {
    encode_server(&ServerFrame::Error(ErrorFrame {
        code,
        message: message.to_owned(),
        publisher: None,
        pattern: None,
    }))
}

/// Encodes a client frame (used by the SDK and by tests).
pub fn encode_client(frame: &ClientFrame) -> Bytes {
    match frame {
        ClientFrame::Hello(h) => encode(kind::HELLO, h, &[]),
        ClientFrame::Subscribe(h) => encode(kind::SUBSCRIBE, h, &[]),
        ClientFrame::Unsubscribe(h) => encode(kind::UNSUBSCRIBE, h, &[]),
        ClientFrame::Publish(p) => {
            encode_forward_raw(p.publisher, p.topic_bytes(), p.pub_seq, &p.payload)
        }
        ClientFrame::Ping(h) => encode(kind::PING, h, &[]),
        ClientFrame::Pong(h) => encode(kind::PONG, h, &[]),
        ClientFrame::Ask(h) => encode(kind::ASK, h, &[]),
        ClientFrame::Released(h) => encode(kind::RELEASED, h, &[]),
        ClientFrame::Credit(h) => encode(kind::CREDIT, h, &[]),
    }
}

/// Encodes a server frame other than `Deliver` (which the broker builds in
/// batches with [`DeliverBuilder`]).
pub fn encode_server(frame: &ServerFrame) -> Bytes {
    match frame {
        ServerFrame::Welcome(h) => encode(kind::WELCOME, h, &[]),
        ServerFrame::Deliver(h, body) => encode_deliver(h, body),
        ServerFrame::PubAck(h) => encode(kind::PUB_ACK, h, &[]),
        ServerFrame::Subscribed(h) => encode(kind::SUBSCRIBED, h, &[]),
        ServerFrame::Unsubscribed(h) => encode(kind::UNSUBSCRIBED, h, &[]),
        ServerFrame::Watermark(h) => encode(kind::WATERMARK, h, &[]),
        ServerFrame::Gap(h) => encode(kind::GAP, h, &[]),
        ServerFrame::Error(h) => encode(kind::ERROR, h, &[]),
        ServerFrame::Ping(h) => encode(kind::PING, h, &[]),
        ServerFrame::Pong(h) => encode(kind::PONG, h, &[]),
        ServerFrame::Members(h) => encode(kind::MEMBERS, h, &[]),
        ServerFrame::Servers(h) => encode(kind::SERVERS, h, &[]),
        ServerFrame::Diverged(h) => encode(kind::DIVERGED, h, &[]),
        ServerFrame::Reply(h, body) => encode(kind::REPLY, h, body),
    }
}

/// Bytes of one entry of a `Deliver` frame's index: seq, publisher and
/// pub_seq (u64 each), topic and payload lengths (u16, u32).
pub const DELIVER_ENTRY_LEN: usize = 30;
/// Bytes before a `Deliver` frame's index: kind, flags, count (u32).
const DELIVER_FIXED_LEN: usize = 6;
/// `Deliver` flags: a running hash follows the count.
const DELIVER_HASH: u8 = 1;
/// `Deliver` flags: a stable seq follows (the hash, if any, then it).
const DELIVER_STABLE: u8 = 2;

/// Encodes a `Deliver` frame, length prefix included (PROTOCOL.md,
/// "Deliver"): `0x82`, flags, the entry count (u32), the hash and stable
/// seq if flagged (u64 each), one fixed-width entry per message, then the
/// topics and payloads. Integers little-endian.
pub fn encode_deliver(head: &DeliverHead, body: &[u8]) -> Bytes {
    let index = DELIVER_FIXED_LEN + 16 + head.msgs.len() * DELIVER_ENTRY_LEN;
    let mut buf = BytesMut::with_capacity(4 + index + body.len());
    buf.put_u32(0);
    buf.put_u8(kind::DELIVER);
    let flags = u8::from(head.hash.is_some()) * DELIVER_HASH
        + u8::from(head.stable.is_some()) * DELIVER_STABLE;
    buf.put_u8(flags);
    buf.put_u32_le(
        u32::try_from(head.msgs.len()).expect("invariant: a frame holds far fewer messages"),
    );
    if let Some(hash) = head.hash {
        buf.put_u64_le(hash);
    }
    if let Some(stable) = head.stable {
        buf.put_u64_le(stable.0);
    }
    for e in &head.msgs {
        buf.put_u64_le(e.0 .0);
        buf.put_u64_le(e.1 .0);
        buf.put_u64_le(e.2 .0);
        buf.put_u16_le(e.3);
        buf.put_u32_le(e.4);
    }
    buf.extend_from_slice(body);
    let len = u32::try_from(buf.len() - 4)
        .expect("invariant: frames are bounded far below 4 GiB by frame_len_max");
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// Reads a `Deliver` frame's content by slicing (no general decoder):
/// the index, then the body, which must hold exactly what the entries say.
fn decode_deliver(content: &Bytes) -> Result<(DeliverHead, Bytes), DecodeError> {
    let bad = |reason: String| DecodeError::Malformed {
        kind: kind::DELIVER,
        reason,
    };
    let fixed = content.get(..DELIVER_FIXED_LEN).ok_or_else(|| {
        bad(format!(
            "{} bytes, shorter than the index head",
            content.len()
        ))
    })?;
    let flags = fixed[1];
    if flags & !(DELIVER_HASH | DELIVER_STABLE) != 0 {
        return Err(bad(format!("unknown flags {flags:#04x}")));
    }
    let count = u32::from_le_bytes([fixed[2], fixed[3], fixed[4], fixed[5]]) as usize;
    let mut at = DELIVER_FIXED_LEN;
    let mut word = |what: &str| -> Result<u64, DecodeError> {
        let bytes = content
            .get(at..at + 8)
            .ok_or_else(|| bad(format!("cut short before its {what}")))?;
        at += 8;
        Ok(u64::from_le_bytes(bytes.try_into().expect("eight bytes")))
    };
    let hash = match flags & DELIVER_HASH {
        0 => None,
        _ => Some(word("hash")?),
    };
    let stable = match flags & DELIVER_STABLE {
        0 => None,
        _ => Some(Seq(word("stable seq")?)),
    };
    let index_len = count
        .checked_mul(DELIVER_ENTRY_LEN)
        .filter(|n| at + n <= content.len())
        .ok_or_else(|| {
            bad(format!(
                "an index of {count} entries does not fit in {} bytes",
                content.len()
            ))
        })?;
    let index = &content[at..at + index_len];
    let mut msgs = Vec::with_capacity(count);
    let mut need = 0u64;
    for e in index.chunks_exact(DELIVER_ENTRY_LEN) {
        let u64_at = |i: usize| u64::from_le_bytes(e[i..i + 8].try_into().expect("eight bytes"));
        let topic_len = u16::from_le_bytes([e[24], e[25]]);
        let payload_len = u32::from_le_bytes([e[26], e[27], e[28], e[29]]);
        need += u64::from(topic_len) + u64::from(payload_len);
        msgs.push(DeliverEntry(
            Seq(u64_at(0)),
            PublisherId(u64_at(8)),
            PubSeq(u64_at(16)),
            topic_len,
            payload_len,
        ));
    }
    let body = content.slice(at + index_len..);
    if need != body.len() as u64 {
        return Err(bad(format!(
            "entries need {need} body bytes, body has {}",
            body.len()
        )));
    }
    Ok((DeliverHead { msgs, hash, stable }, body))
}

/// The number of messages a `Deliver` frame (length prefix included, as
/// [`encode_deliver`] makes it) carries; 0 for any other frame.
pub fn deliver_count(frame: &[u8]) -> u64 {
    match frame {
        [_, _, _, _, kind::DELIVER, _, a, b, c, d, ..] => {
            u64::from(u32::from_le_bytes([*a, *b, *c, *d]))
        }
        _ => 0,
    }
}

/// Builds one `Deliver` frame from many messages, reusing its buffers.
#[derive(Default)]
pub struct DeliverBuilder {
    head: DeliverHead,
    body: BytesMut,
}

impl DeliverBuilder {
    /// Adds one message.
    ///
    /// # Panics
    /// If the topic is longer than 65,535 bytes; topics are validated far
    /// below that ([`crate::topic::TOPIC_LEN_MAX`]).
    pub fn push(
        &mut self,
        seq: Seq,
        publisher: PublisherId,
        pub_seq: PubSeq,
        topic: &str,
        payload: &[u8],
    ) {
        let topic_len =
            u16::try_from(topic.len()).expect("invariant: topics are validated to TOPIC_LEN_MAX");
        let payload_len =
            u32::try_from(payload.len()).expect("invariant: payloads are bounded by frame_len_max");
        self.head.msgs.push(DeliverEntry(
            seq,
            publisher,
            pub_seq,
            topic_len,
            payload_len,
        ));
        self.body.extend_from_slice(topic.as_bytes());
        self.body.extend_from_slice(payload);
    }

    /// The number of messages added since the last [`DeliverBuilder::finish`].
    pub fn len(&self) -> usize {
        self.head.msgs.len()
    }

    /// Whether no message was added since the last finish.
    pub fn is_empty(&self) -> bool {
        self.head.msgs.is_empty()
    }

    /// The body bytes added so far.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Encodes the frame (with length prefix) and clears the builder.
    pub fn finish(&mut self) -> Bytes {
        self.finish_with(None, None)
    }

    /// Encodes the frame with the running hash through its last message
    /// and, for weak delivery, the stable position; clears the builder.
    pub fn finish_with(&mut self, hash: Option<u64>, stable: Option<Seq>) -> Bytes {
        self.head.hash = hash;
        self.head.stable = stable;
        let frame = encode_deliver(&self.head, &self.body);
        self.head.msgs.clear();
        self.body.clear();
        frame
    }
}

/// The order in which a client identified by `key` (its publisher id)
/// tries `servers`: rendezvous hashing, highest weight first.
///
/// This is Canopy's adoption rule (docs/DESIGN.md, "Adoption"). Every party
/// computes it identically from the same list, with no coordination. A
/// client homes on its first choice; when that server fails, the client's
/// next choice is its adopter. The orphans of one failed server spread
/// evenly over the survivors, and no other client moves.
pub fn adopter_order(key: u64, servers: &[String]) -> Vec<&str> {
    let mut ranked: Vec<(u64, &str)> = servers
        .iter()
        .map(|s| (rendezvous_weight(key, s), s.as_str()))
        .collect();
    // Ties (equal weights) fall back to the text, so the order is total.
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, s)| s).collect()
}

/// The order in which a client identified by `key` that lost server `lost`
/// tries `servers` again: its adoption order, with `lost` last.
pub fn failover_order(key: u64, servers: &[String], lost: &str) -> Vec<String> {
    let mut order: Vec<String> = adopter_order(key, servers)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(at) = order.iter().position(|s| s == lost) {
        let lost = order.remove(at);
        order.push(lost);
    }
    order
}

/// Whether a server list told by a server can replace a client's own: not
/// empty, and every address known.
pub fn usable_servers(servers: &[String]) -> bool {
    !servers.is_empty() && servers.iter().all(|a| !a.is_empty())
}

/// A fixed hash of `(key, server)`: FNV-1a over the server's text, mixed
/// with the key by SplitMix64's finalizer. Fixed rather than std's
/// randomly keyed hasher, because every process must agree.
fn rendezvous_weight(key: u64, server: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in server.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h ^ key.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// SplitMix64's finaliser: a fast, well-mixing bijection of `u64`.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One delivered message as the SDK hands it to the application; topic and
/// payload are slices of the received frame (no copy).
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// Global sequence number.
    pub seq: Seq,
    /// Who published it.
    pub publisher: PublisherId,
    /// The publisher's own sequence number for it.
    pub pub_seq: PubSeq,
    topic: Bytes,
    /// The payload.
    pub payload: Bytes,
}

impl Message {
    /// The topic.
    pub fn topic(&self) -> &str {
        // Validated as UTF-8 in `messages` before the Message was built.
        std::str::from_utf8(&self.topic).unwrap_or("")
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("seq", &self.seq)
            .field("publisher", &self.publisher)
            .field("pub_seq", &self.pub_seq.0)
            .field("topic", &self.topic())
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Splits a decoded `Deliver` into messages, slicing the body.
///
/// # Errors
/// [`DecodeError::Malformed`] when a topic is not UTF-8 or sequence numbers
/// do not ascend.
pub fn messages(
    head: &DeliverHead,
    body: &Bytes,
    out: &mut Vec<Message>,
) -> Result<(), DecodeError> {
    let mut at = 0usize;
    let mut last = Seq(0);
    // The last topic checked: a run of messages on one topic (the common
    // case) is checked once.
    let mut checked: &[u8] = &[];
    for &DeliverEntry(seq, publisher, pub_seq, topic_len, payload_len) in &head.msgs {
        let topic_end = at + usize::from(topic_len);
        let end = topic_end + payload_len as usize;
        let bad = |reason: &str| DecodeError::Malformed {
            kind: kind::DELIVER,
            reason: reason.to_owned(),
        };
        if end > body.len() {
            return Err(bad("entry runs past the body"));
        }
        let topic = &body[at..topic_end];
        if topic != checked {
            if std::str::from_utf8(topic).is_err() {
                return Err(bad("topic is not UTF-8"));
            }
            checked = topic;
        }
        if seq <= last {
            return Err(bad("sequence numbers do not ascend"));
        }
        last = seq;
        out.push(Message {
            seq,
            publisher,
            pub_seq,
            topic: body.slice(at..topic_end),
            payload: body.slice(topic_end..end),
        });
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason a frame of kind `expected` was refused as malformed.
    fn malformed<T: fmt::Debug>(expected: u8, decoded: Result<T, DecodeError>) -> String {
        match decoded {
            Err(DecodeError::Malformed { kind, reason }) if kind == expected => reason,
            other => panic!("expected a malformed frame of kind {expected:#04x}, got {other:?}"),
        }
    }

    /// A Deliver frame's content as the wire carries it (no prefix).
    fn deliver_content(head: &DeliverHead, body: &[u8]) -> Bytes {
        encode_deliver(head, body).slice(4..)
    }

    #[test]
    fn the_delivery_index_round_trips_with_and_without_hash_and_stable() {
        for (hash, stable) in [
            (None, None),
            (Some(7), None),
            (None, Some(Seq(3))),
            (Some(u64::MAX), Some(Seq(u64::MAX))),
        ] {
            let head = DeliverHead {
                msgs: vec![
                    DeliverEntry(Seq(1), PublisherId(u64::MAX), PubSeq(9), 3, 2),
                    DeliverEntry(Seq(2), PublisherId(1), PubSeq(10), 1, 0),
                ],
                hash,
                stable,
            };
            let content = deliver_content(&head, b"a.bxyc");
            match decode_server(content) {
                Ok(ServerFrame::Deliver(got, body)) => {
                    assert_eq!(got, head);
                    assert_eq!(&body[..], b"a.bxyc");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_publish_round_trips_and_malformed_heads_are_refused_with_their_reason() {
        for publisher in [None, Some(PublisherId(u64::MAX))] {
            let frame = encode_forward(publisher, "md.x", PubSeq(42), b"payload");
            match decode_client(frame.slice(4..)) {
                Ok(ClientFrame::Publish(p)) => {
                    assert_eq!((p.pub_seq, p.publisher), (PubSeq(42), publisher));
                    assert_eq!((p.topic(), &p.payload[..]), ("md.x", &b"payload"[..]));
                }
                other => panic!("{other:?}"),
            }
        }
        let good = encode_forward(Some(PublisherId(1)), "t", PubSeq(1), b"").slice(4..);
        let reason = |content: Bytes| malformed(kind::PUBLISH, decode_client(content));
        assert!(reason(good.slice(..11)).contains("shorter than the head"));
        assert!(reason(good.slice(..15)).contains("before its publisher"));
        assert!(reason(good.slice(..20)).contains("topic_len runs past the body"));
        let mut flags = good.to_vec();
        flags[1] = 0x02;
        assert!(reason(Bytes::from(flags)).contains("unknown flags"));
        // The topic's text is the node's to check, once per distinct topic.
        let mut not_utf8 = good.to_vec();
        let last = not_utf8.len() - 1;
        not_utf8[last] = 0xff;
        let decoded = decode_client(Bytes::from(not_utf8));
        match &decoded {
            Ok(ClientFrame::Publish(p)) => assert_eq!(p.topic_bytes().last(), Some(&0xff)),
            other => panic!("expected a publish, got {other:?}"),
        }
        // And encodes back to itself, bytes as they came (found by the
        // `client_frame` fuzz target).
        let frame = decoded.expect("decoded above");
        assert_eq!(decode_client(encode_client(&frame).slice(4..)), Ok(frame));
    }

    #[test]
    fn malformed_delivery_indexes_are_refused_with_their_reason() {
        let head = DeliverHead {
            msgs: vec![DeliverEntry(Seq(1), PublisherId(1), PubSeq(1), 1, 2)],
            hash: Some(5),
            stable: None,
        };
        let good = deliver_content(&head, b"txy");
        let reason = |content: Bytes| malformed(kind::DELIVER, decode_server(content));
        // Short: before the count, before the hash, inside the index.
        assert!(reason(good.slice(..4)).contains("shorter than the index head"));
        assert!(reason(good.slice(..10)).contains("before its hash"));
        assert!(reason(good.slice(..20)).contains("does not fit"));
        // A count whose index would run past the end (or overflow).
        let mut huge = good.to_vec();
        huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(reason(Bytes::from(huge)).contains("does not fit"));
        // Lengths past the end of the body, and short of it: lengths are
        // cumulative, so entries cannot overlap, and every byte is one
        // entry's.
        assert!(reason(good.slice(..good.len() - 1)).contains("need 3 body bytes, body has 2"));
        let mut long = good.to_vec();
        long.push(0);
        assert!(reason(Bytes::from(long)).contains("need 3 body bytes, body has 4"));
        // Flags this version does not know.
        let mut flags = good.to_vec();
        flags[1] |= 0x80;
        assert!(reason(Bytes::from(flags)).contains("unknown flags"));
    }

    fn content(frame: Bytes) -> Bytes {
        frame.slice(4..)
    }

    #[test]
    fn incarnations_begin_at_multiples_of_2_32_half_an_incarnation_past() {
        let i = 1u64 << 32;
        assert!(!PubSeq(0).begins_incarnation());
        assert!(!PubSeq(1).begins_incarnation());
        assert!(!PubSeq(i - 1).begins_incarnation());
        assert!(PubSeq(i).begins_incarnation());
        assert!(PubSeq(3 * i).begins_incarnation());
        assert!(!PubSeq(3 * i + 1).begins_incarnation());
        assert_eq!(PubSeq(1).next_incarnation(), PubSeq(i));
        assert_eq!(PubSeq(i / 2 - 1).next_incarnation(), PubSeq(i));
        assert_eq!(PubSeq(i / 2).next_incarnation(), PubSeq(2 * i));
        assert_eq!(PubSeq(i).next_incarnation(), PubSeq(2 * i));
        // Near the end of the space: the last incarnation, then none.
        let last = u64::MAX - (i - 1);
        assert_eq!(PubSeq(last - i).next_incarnation(), PubSeq(last));
        assert_eq!(PubSeq(last).next_incarnation(), PubSeq(last + 1));
        assert_eq!(PubSeq(u64::MAX).next_incarnation(), PubSeq(u64::MAX));
        assert_eq!(PubSeq::incarnation(0), None);
        assert_eq!(PubSeq::incarnation(3), Some(PubSeq(3 * i)));
        assert_eq!(PubSeq::incarnation(u64::MAX >> 32), Some(PubSeq(last)));
        assert_eq!(PubSeq::incarnation(1 << 32), None);
    }

    #[test]
    fn client_frames_round_trip() {
        let frames = vec![
            ClientFrame::Hello(Hello {
                version: PROTOCOL_VERSION,
                name: "t".into(),
                publisher: PublisherId(7),
                subscriptions: vec!["a.>".into()],
                resume: Some(Resume {
                    stream: 3,
                    after: Seq(9),
                    check: Some(StreamCheck {
                        seq: Seq(8),
                        hash: u64::MAX,
                    }),
                    agreed: Some(Seq(5)),
                }),
                slow: SlowPolicy::Conflate,
                role: Role::Relay,
                reports: Reports::Full,
                connection: 2,
                weak: true,
                auth: None,
                window: None,
            }),
            ClientFrame::Subscribe(SubscribeHead {
                pattern: "a.*".into(),
            }),
            ClientFrame::Unsubscribe(SubscribeHead {
                pattern: "a.*".into(),
            }),
            ClientFrame::Publish(Publish::new(
                "a.b",
                PubSeq(3),
                Bytes::from_static(b"payload"),
            )),
            ClientFrame::Ping(PingHead { nonce: 1 }),
            ClientFrame::Pong(PingHead { nonce: 2 }),
            ClientFrame::Credit(CreditHead { msgs: 9 }),
            ClientFrame::Released(ReleasedHead {
                publisher: PublisherId(u64::MAX),
            }),
        ];
        for f in frames {
            let bytes = encode_client(&f);
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            assert_eq!(len, bytes.len() - 4);
            assert_eq!(decode_client(content(bytes)), Ok(f));
        }
    }

    #[test]
    fn replies_round_trip_and_a_failed_one_with_a_body_is_malformed() {
        let ok = ServerFrame::Reply(
            ReplyHead {
                pub_seq: PubSeq(3),
                publisher: Some(PublisherId(9)),
                error: None,
            },
            Bytes::from_static(b"reply"),
        );
        let failed = ServerFrame::Reply(
            ReplyHead {
                pub_seq: PubSeq(4),
                publisher: None,
                error: Some(CallFailure {
                    code: CallErrorCode::NoMajority,
                    message: "no".into(),
                }),
            },
            Bytes::new(),
        );
        for f in [ok, failed.clone()] {
            assert_eq!(decode_server(content(encode_server(&f))), Ok(f));
        }
        let ServerFrame::Reply(head, _) = failed else {
            unreachable!()
        };
        let bad = encode_server(&ServerFrame::Reply(head, Bytes::from_static(b"body")));
        assert!(matches!(
            decode_server(content(bad)),
            Err(DecodeError::Malformed {
                kind: kind::REPLY,
                ..
            })
        ));
    }

    #[test]
    fn call_topics_name_their_method_and_replies() {
        for r in [Replies::Own, Replies::All, Replies::Majority] {
            assert_eq!(Replies::parse(&r.topic("book.add")), Some(("book.add", r)));
        }
        assert_eq!(Replies::parse("$canopy.members"), None);
        assert_eq!(
            Replies::parse("$canopy.call.$all"),
            Some(("$all", Replies::Own))
        );
    }

    #[test]
    fn weak_delivery_frames_round_trip() {
        let mut b = DeliverBuilder::default();
        b.push(Seq(4), PublisherId(1), PubSeq(2), "a.b", b"x");
        let deliver = content(b.finish_with(Some(42), Some(Seq(3))));
        match decode_server(deliver) {
            Ok(ServerFrame::Deliver(head, _)) => {
                assert_eq!((head.hash, head.stable), (Some(42), Some(Seq(3))));
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
        let diverged = ServerFrame::Diverged(DivergedHead {
            from: Seq(7),
            seen: Seq(9),
        });
        assert_eq!(
            decode_server(content(encode_server(&diverged))),
            Ok(diverged)
        );
    }

    #[test]
    fn the_running_hash_tells_order_and_content_apart() {
        let (p, q) = (PublisherId(1), PublisherId(2));
        let ab = chain(chain(0, Seq(1), p, PubSeq(1)), Seq(2), q, PubSeq(1));
        let ba = chain(chain(0, Seq(1), q, PubSeq(1)), Seq(2), p, PubSeq(1));
        let ac = chain(chain(0, Seq(1), p, PubSeq(1)), Seq(2), q, PubSeq(2));
        assert_ne!(ab, ba, "another order");
        assert_ne!(ab, ac, "another message");
        assert_eq!(
            ab,
            chain(chain(0, Seq(1), p, PubSeq(1)), Seq(2), q, PubSeq(1))
        );
    }

    #[test]
    fn adoption_spreads_orphans_evenly_and_moves_nobody_else() {
        let servers: Vec<String> = (0..3).map(|i| format!("127.0.0.1:44{i:02}")).collect();
        let survivors: Vec<String> = servers[1..].to_vec();
        let mut adopted = [0usize; 3];
        for key in 0..3000u64 {
            let all = adopter_order(key, &servers);
            let left = adopter_order(key, &survivors);
            assert_eq!(all.len(), 3);
            if all[0] == servers[0] {
                // An orphan: its adopter is its second choice.
                assert_eq!(left[0], all[1]);
                let i = servers.iter().position(|s| s == left[0]).expect("listed");
                adopted[i] += 1;
            } else {
                assert_eq!(left[0], all[0], "a client of a survivor moved");
            }
        }
        let orphans = adopted[1] + adopted[2];
        assert!(orphans > 800 && orphans < 1200, "{orphans} orphans of 3000");
        let share = adopted[1] as f64 / orphans as f64;
        assert!((0.4..0.6).contains(&share), "unbalanced: {adopted:?}");
    }

    #[test]
    fn deliver_batches_slice_topics_and_payloads() {
        let mut b = DeliverBuilder::default();
        b.push(Seq(1), PublisherId(1), PubSeq(1), "a.b", b"one");
        b.push(Seq(5), PublisherId(2), PubSeq(1), "c", b"");
        let frame = b.finish();
        assert!(b.is_empty());
        let ServerFrame::Deliver(head, body) = decode_server(content(frame)).expect("decodes")
        else {
            panic!("not a deliver frame");
        };
        let mut out = Vec::new();
        messages(&head, &body, &mut out).expect("valid");
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].seq, out[0].topic(), &out[0].payload[..]),
            (Seq(1), "a.b", &b"one"[..])
        );
        assert_eq!(
            (out[1].seq, out[1].topic(), &out[1].payload[..]),
            (Seq(5), "c", &b""[..])
        );
    }

    #[test]
    fn bad_content_gets_a_specific_decode_error() {
        assert_eq!(decode_client(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decode_client(Bytes::from_static(&[0x7f])),
            Err(DecodeError::UnknownKind(0x7f))
        );
        assert_eq!(
            decode_client(Bytes::from_static(&[kind::WELCOME])),
            Err(DecodeError::WrongDirection(kind::WELCOME))
        );
        let garbage = decode_client(Bytes::from_static(&[kind::HELLO, 0xff, 0x00]));
        assert!(matches!(
            garbage,
            Err(DecodeError::Malformed {
                kind: kind::HELLO,
                ..
            })
        ));
        let trailing = {
            let f = encode_client(&ClientFrame::Ping(PingHead { nonce: 1 }));
            let mut v = f.slice(4..).to_vec();
            v.push(0);
            Bytes::from(v)
        };
        assert!(matches!(
            decode_client(trailing),
            Err(DecodeError::Malformed { .. })
        ));
        let mut past = encode_publish("a.b", PubSeq(1), b"").slice(4..).to_vec();
        past.truncate(past.len() - 1);
        assert!(matches!(
            decode_client(Bytes::from(past)),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000usize {
            let mut v = Vec::with_capacity(len % 97);
            for _ in 0..len % 97 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                v.push(rng as u8);
            }
            // Valid kinds in front make the CBOR decoder do the work.
            if let Some(first) = v.first_mut() {
                *first = [
                    kind::HELLO,
                    kind::PUBLISH,
                    kind::DELIVER,
                    kind::WELCOME,
                    *first,
                ][len % 5];
            }
            let content = Bytes::from(v);
            let _ = decode_client(content.clone());
            if let Ok(ServerFrame::Deliver(head, body)) = decode_server(content) {
                let _ = messages(&head, &body, &mut Vec::new());
            }
        }
    }
}
