//! A client of the simulated core, following the SDK's rules over the real
//! client protocol: it resumes by stream and position with the running-hash
//! check, keeps what is unacknowledged and sends it again after a Welcome,
//! learns what was acknowledged from the Welcome, and on a loss tries the
//! servers in adoption order with the lost one last, backing off between
//! rounds. A client publishes, subscribes (strong or weak), or both.
//!
//! What it checks as it goes (the rest is checked once the core settles,
//! [`CoreClient::check_final`]):
//! - an acknowledged publish is in the stream it was acknowledged in;
//! - a strong subscriber is only ever given the stream's stable content at
//!   each seq, in ascending order, and a changed stream id comes in a
//!   Welcome (the SDK's `StreamReset`), never silently;
//! - a weak subscriber's deliveries are the agreed stream through every
//!   stable position the server tells it, unless a `Diverged` notice took
//!   them back first.

use crate::sim::checker::Violation;
use crate::sim::cluster_checker::ClusterChecker;
use bytes::Bytes;
use canopy_client::protocol::{
    self, ClientFrame, Hello, PubSeq, Publish, PublisherId, Reports, Resume, Role, Seq,
    ServerFrame, SlowPolicy, StreamCheck,
};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// The topic every simulated publish goes to.
pub(super) const TOPIC: &str = "t";

/// What a client does after a frame.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum After {
    Continue,
    /// The server refused or closed the session: try elsewhere.
    Reconnect,
}

/// The subscribing side of a client (pattern `>`).
#[derive(Debug)]
pub(super) struct Subscriber {
    weak: bool,
    /// Stream and the last seq handed over (or told by a watermark).
    position: Option<(u64, Seq)>,
    check: Option<StreamCheck>,
    /// Weak: through this seq, what was handed over is agreed.
    agreed: Option<Seq>,
    /// In the current stream: where the client joined it, what it was
    /// handed (seq → content), and the gaps it was told of.
    since: Seq,
    log: BTreeMap<Seq, (PublisherId, PubSeq)>,
    gaps: Vec<(Seq, Seq)>,
    /// Weak: through this seq, `log` was compared with the stable stream.
    verified: Seq,
    /// Streams it was told it moved to (the SDK's `StreamReset`).
    pub resets: u64,
    /// `Diverged` notices it was given.
    pub diverged: u64,
}

impl Subscriber {
    fn new(weak: bool) -> Self {
        Subscriber {
            weak,
            position: None,
            check: None,
            agreed: None,
            since: Seq(0),
            log: BTreeMap::new(),
            gaps: Vec::new(),
            verified: Seq(0),
            resets: 0,
            diverged: 0,
        }
    }

    fn advance(&mut self, seq: Seq) {
        if let Some((_, at)) = &mut self.position {
            *at = (*at).max(seq);
        }
    }

    /// Weak: compares what was handed over through `agreed` with the
    /// stable stream.
    fn verify(&mut self, id: PublisherId, checker: &ClusterChecker) -> Result<(), Violation> {
        let (Some((stream, _)), Some(agreed)) = (self.position, self.agreed) else {
            return Ok(());
        };
        if agreed <= self.verified {
            return Ok(());
        }
        for (&seq, &content) in self.log.range(self.verified.next()..=agreed) {
            let stable = checker.content(stream, seq);
            if stable != Some(content) {
                return Err(Violation(format!(
                    "weak: client {} was handed {content:?} at seq {seq} and told it is agreed through {agreed}, but the stream has {stable:?} there",
                    id.0
                )));
            }
        }
        self.verified = agreed;
        Ok(())
    }
}

/// A client of the core.
#[derive(Debug)]
pub(super) struct CoreClient {
    pub id: PublisherId,
    /// Its first pub_seq (first contact may start anywhere).
    pub first: u64,
    pub next: u64,
    pub unacked: VecDeque<PubSeq>,
    pub acked: PubSeq,
    /// Per stretch of acknowledgements: the last pub_seq and the stream it
    /// was acknowledged in.
    acked_in: Vec<(PubSeq, u64)>,
    pub sub: Option<Subscriber>,
    /// Its live connection (the world's index), if any...
    pub conn: Option<usize>,
    /// ...and whether that connection has its Welcome, in which stream.
    pub welcomed: bool,
    stream: u64,
    /// Connections attempted, as the SDK counts them (`Hello::connection`).
    connections: u64,
    /// The server it lost last (tried last), the servers still to try in
    /// this round, and the pause before the next round.
    pub lost: Option<String>,
    pub to_try: Vec<String>,
    pub backoff: Duration,
}

impl CoreClient {
    pub fn new(id: PublisherId, first: u64, sub: Option<bool>) -> Self {
        CoreClient {
            id,
            first,
            next: first,
            unacked: VecDeque::new(),
            acked: PubSeq(0),
            acked_in: Vec::new(),
            sub: sub.map(Subscriber::new),
            conn: None,
            welcomed: false,
            stream: 0,
            connections: 0,
            lost: None,
            to_try: Vec::new(),
            backoff: Duration::from_millis(20),
        }
    }

    /// The stream `pub_seq` was acknowledged in, if it was.
    pub fn acked_stream(&self, pub_seq: PubSeq) -> Option<u64> {
        self.acked_in
            .iter()
            .find(|(through, _)| *through >= pub_seq)
            .map(|&(_, stream)| stream)
    }

    /// The frame of publish `pub_seq` (its payload names it, as the
    /// checker expects).
    fn publish_frame(&self, pub_seq: PubSeq) -> Bytes {
        let payload = Bytes::from(format!("{}:{}", self.id.0, pub_seq.0));
        protocol::encode_client(&ClientFrame::Publish(Publish::new(TOPIC, pub_seq, payload)))
    }

    /// A new publish, recorded as published; its frame if connected.
    pub fn publish(&mut self, checker: &mut ClusterChecker) -> Option<Bytes> {
        let pub_seq = PubSeq(self.next);
        self.next = self.next.saturating_add(1);
        self.unacked.push_back(pub_seq);
        checker.published(self.id, pub_seq);
        self.welcomed.then(|| self.publish_frame(pub_seq))
    }

    /// The Hello of a new connection.
    pub fn hello(&mut self) -> Bytes {
        self.connections += 1;
        self.welcomed = false;
        let (subscriptions, resume, weak) = match &self.sub {
            None => (Vec::new(), None, false),
            Some(s) => (
                vec![">".to_owned()],
                s.position.map(|(stream, after)| Resume {
                    stream,
                    after,
                    check: s.check,
                    agreed: s.agreed,
                }),
                s.weak,
            ),
        };
        protocol::encode_client(&ClientFrame::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            name: format!("sim-{}", self.id.0),
            publisher: self.id,
            subscriptions,
            resume,
            slow: SlowPolicy::Disconnect,
            role: Role::Client,
            reports: Reports::Servers,
            connection: self.connections,
            weak,
        }))
    }

    /// Marks everything through `pub_seq` acknowledged in the current
    /// connection's stream, which must hold it.
    fn acknowledge(&mut self, pub_seq: PubSeq, checker: &ClusterChecker) -> Result<u64, Violation> {
        if pub_seq <= self.acked {
            return Ok(0);
        }
        if checker.seq_of(self.stream, (self.id, pub_seq)).is_none() {
            return Err(Violation(format!(
                "acknowledgement: publisher {} was told pub_seq {} is ordered in stream {:x}, but it is not there (found at {:?})",
                self.id.0,
                pub_seq.0,
                self.stream,
                checker.find(self.id, pub_seq)
            )));
        }
        let newly = pub_seq.0 - self.acked.0.max(self.first.saturating_sub(1));
        self.acked = pub_seq;
        self.acked_in.push((pub_seq, self.stream));
        while self.unacked.front().is_some_and(|&p| p <= pub_seq) {
            self.unacked.pop_front();
        }
        Ok(newly)
    }

    /// Handles one frame from the server: frames to send go to `replies`;
    /// returns what to do next and how many publishes it acknowledged.
    pub fn on_frame(
        &mut self,
        content: Bytes,
        checker: &ClusterChecker,
        replies: &mut Vec<Bytes>,
    ) -> Result<(After, u64), Violation> {
        let id = self.id;
        let frame = protocol::decode_server(content)
            .map_err(|e| Violation(format!("client {}: undecodable frame: {e}", id.0)))?;
        let mut acked = 0;
        match frame {
            ServerFrame::Welcome(w) => {
                self.welcomed = true;
                self.stream = w.stream;
                self.backoff = Duration::from_millis(20);
                if let Some(s) = &mut self.sub {
                    let fresh = match s.position {
                        Some((stream, _)) if stream != w.stream => {
                            s.resets += 1;
                            true
                        }
                        Some(_) => false,
                        None => true,
                    };
                    if fresh {
                        s.position = Some((w.stream, w.head));
                        s.check = Some(StreamCheck {
                            seq: w.head,
                            hash: w.hash,
                        });
                        s.agreed = s.weak.then_some(w.head);
                        s.since = w.head;
                        s.verified = w.head;
                        s.log.clear();
                        s.gaps.clear();
                    }
                }
                acked = self.acknowledge(w.pub_acked, checker)?;
                self.next = self.next.max(w.pub_acked.0.saturating_add(1));
                for &p in &self.unacked {
                    replies.push(self.publish_frame(p));
                }
            }
            ServerFrame::PubAck(a) => acked = self.acknowledge(a.pub_seq, checker)?,
            ServerFrame::Deliver(head, body) => {
                let Some(s) = &mut self.sub else {
                    return Err(Violation(format!(
                        "client {}: a delivery to a client that subscribed to nothing",
                        id.0
                    )));
                };
                let mut msgs = Vec::new();
                protocol::messages(&head, &body, &mut msgs)
                    .map_err(|e| Violation(format!("client {}: bad delivery: {e}", id.0)))?;
                let (stream, from) = s.position.unwrap_or_default();
                let mut at = from;
                for m in msgs.iter().filter(|m| m.seq > from) {
                    let content = (m.publisher, m.pub_seq);
                    if !s.weak {
                        let stable = checker.content(stream, m.seq);
                        if stable != Some(content) {
                            return Err(Violation(format!(
                                "strong client {} was handed {content:?} at seq {} of stream {stream:x}, where the stream has {stable:?}",
                                id.0, m.seq
                            )));
                        }
                    }
                    s.log.insert(m.seq, content);
                    at = m.seq;
                }
                s.advance(at);
                if let (Some(hash), Some(last)) = (head.hash, msgs.last()) {
                    s.check = Some(StreamCheck {
                        seq: last.seq,
                        hash,
                    });
                }
                if head.stable.is_some() {
                    s.agreed = s.agreed.max(head.stable);
                }
                if s.weak {
                    s.verify(id, checker)?;
                }
            }
            ServerFrame::Watermark(w) => {
                if let Some(s) = &mut self.sub {
                    if s.weak {
                        s.agreed = s.agreed.max(Some(w.seq));
                        s.verify(id, checker)?;
                    }
                    s.advance(w.seq);
                }
            }
            ServerFrame::Diverged(d) => {
                let Some(s) = self.sub.as_mut().filter(|s| s.weak) else {
                    return Err(Violation(format!(
                        "strong client {} was told its stream diverged from seq {} (seen at {})",
                        id.0, d.from, d.seen
                    )));
                };
                let back = Seq(d.from.0.saturating_sub(1));
                if back < s.verified {
                    return Err(Violation(format!(
                        "weak: client {} was told of a difference from seq {} after being told it was agreed through {}",
                        id.0, d.from, s.verified
                    )));
                }
                if let Some((_, at)) = &mut s.position {
                    *at = (*at).min(back);
                }
                s.check = None;
                s.agreed = Some(back);
                s.log.split_off(&d.from);
                s.diverged += 1;
            }
            ServerFrame::Gap(g) => {
                if let Some(s) = &mut self.sub {
                    s.gaps.push((g.from, g.to));
                    s.advance(g.to);
                }
            }
            ServerFrame::Subscribed(_) | ServerFrame::Unsubscribed(_) => {}
            ServerFrame::Ping(p) => replies.push(protocol::encode_client(&ClientFrame::Pong(p))),
            ServerFrame::Pong(_) | ServerFrame::Members(_) | ServerFrame::Servers(_) => {}
            ServerFrame::Error(e) if e.code.is_retryable() => return Ok((After::Reconnect, acked)),
            ServerFrame::Error(e) => {
                return Err(Violation(format!(
                    "client {} was refused: {:?}: {}",
                    id.0, e.code, e.message
                )))
            }
        }
        Ok((After::Continue, acked))
    }

    /// Once the core settled in `stream` at `head`: a subscriber in that
    /// stream was handed every application message after where it joined
    /// it (or told of a gap over it), and nothing but the stream.
    pub fn check_final(
        &mut self,
        checker: &ClusterChecker,
        stream: u64,
        head: Seq,
    ) -> Result<(), Violation> {
        let id = self.id;
        let Some(s) = &mut self.sub else {
            return Ok(());
        };
        let Some((at_stream, at)) = s.position else {
            return Err(Violation(format!(
                "liveness: subscriber {} never joined the stream",
                id.0
            )));
        };
        if at_stream != stream || at != head {
            return Err(Violation(format!(
                "liveness: subscriber {} stands at {at} of stream {at_stream:x}, the core at {head} of {stream:x}",
                id.0
            )));
        }
        if s.weak {
            s.agreed = Some(head);
            s.verify(id, checker)?;
        }
        for (seq, content, system) in checker.contents(stream, s.since, head) {
            let gap = s.gaps.iter().any(|&(from, to)| from <= seq && seq <= to);
            if !system && !gap && s.log.get(&seq) != Some(&content) {
                return Err(Violation(format!(
                    "durability: subscriber {} (weak: {}) misses seq {seq} {content:?} of stream {stream:x} (it has {:?}; joined at {})",
                    id.0,
                    s.weak,
                    s.log.get(&seq),
                    s.since
                )));
            }
        }
        Ok(())
    }
}
