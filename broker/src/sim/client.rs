//! A model client: the SDK's protocol rules (resume by position, resend
//! what is unacknowledged, drop what it already has) without its tasks.

use super::checker::{Checker, Violation};
use bytes::Bytes;
use canopy_client::protocol::{
    self, ClientFrame, Hello, PingHead, PubSeq, Publish, PublisherId, Resume, Seq, ServerFrame,
    SlowPolicy, StreamCheck,
};
use std::collections::VecDeque;

/// What a client does after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep going.
    Continue,
    /// The server closed or refused the session: reconnect later.
    Reconnect,
}

pub struct Client {
    pub id: usize,
    pub publisher: PublisherId,
    pub patterns: Vec<String>,
    pub slow: SlowPolicy,
    /// The index of its live connection in the world, if connected.
    pub conn: Option<usize>,
    /// Stream and last seq handed to the application.
    pub position: Option<(u64, Seq)>,
    pub unacked: VecDeque<(PubSeq, String, Bytes)>,
    pub next_pub_seq: u64,
    pub welcomed: bool,
    /// The last few acknowledged publishes, kept to retry on purpose.
    pub acked_tail: VecDeque<(PubSeq, String, Bytes)>,
    /// On the next Welcome, also resend `acked_tail`, as a client that lost
    /// its acknowledgements would: the server must not order them again.
    pub resend_acked: bool,
    /// Connections made, as the SDK counts them (`Hello::connection`).
    pub connections: u64,
    /// The running hash at the last delivery frame, as the SDK keeps it:
    /// the server checks it on resume.
    pub check: Option<StreamCheck>,
}

impl Client {
    pub fn new(id: usize, patterns: Vec<String>, slow: SlowPolicy) -> Self {
        Client {
            id,
            publisher: PublisherId(1000 + id as u64),
            patterns,
            slow,
            conn: None,
            position: None,
            unacked: VecDeque::new(),
            next_pub_seq: 1,
            welcomed: false,
            acked_tail: VecDeque::new(),
            resend_acked: false,
            connections: 0,
            check: None,
        }
    }

    /// The Hello of a new connection.
    pub fn hello(&mut self) -> Bytes {
        self.connections += 1;
        protocol::encode_client(&ClientFrame::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            name: format!("sim-{}", self.id),
            publisher: self.publisher,
            subscriptions: self.patterns.clone(),
            resume: self.position.map(|(stream, after)| Resume {
                stream,
                after,
                check: self.check,
                agreed: None,
            }),
            slow: self.slow,
            role: protocol::Role::Client,
            reports: protocol::Reports::Servers,
            connection: self.connections,
            weak: false,
        }))
    }

    /// A new publish; returns its frame.
    pub fn publish(&mut self, topic: &str, checker: &mut Checker) -> Bytes {
        let pub_seq = PubSeq(self.next_pub_seq);
        self.next_pub_seq += 1;
        let payload = Bytes::from(format!("{}:{}", self.publisher.0, pub_seq.0));
        checker.published(self.publisher, pub_seq, topic, &payload);
        let frame = protocol::encode_client(&ClientFrame::Publish(Publish::new(
            topic,
            pub_seq,
            payload.clone(),
        )));
        self.unacked.push_back((pub_seq, topic.to_owned(), payload));
        frame
    }

    fn acknowledge(&mut self, through: PubSeq, checker: &mut Checker) {
        while self.unacked.front().is_some_and(|(p, _, _)| *p <= through) {
            if let Some(acked) = self.unacked.pop_front() {
                checker.acked(self.publisher, acked.0);
                if self.acked_tail.len() == 4 {
                    self.acked_tail.pop_front();
                }
                self.acked_tail.push_back(acked);
            }
        }
    }

    /// The running hash at `seq`, kept as the resume check unless an older
    /// point than the one kept (as the SDK does).
    fn note_check(&mut self, seq: Seq, hash: u64) {
        if self.check.is_none_or(|c| c.seq <= seq) {
            self.check = Some(StreamCheck { seq, hash });
        }
    }

    fn advance(&mut self, seq: Seq) {
        if let Some((_, at)) = &mut self.position {
            *at = (*at).max(seq);
        }
    }

    /// Handles one frame from the server; frames to send go to `out`.
    pub fn on_frame(
        &mut self,
        content: Bytes,
        checker: &mut Checker,
        out: &mut Vec<Bytes>,
    ) -> Result<After, Violation> {
        let frame = protocol::decode_server(content)
            .map_err(|e| Violation(format!("client {}: undecodable server frame: {e}", self.id)))?;
        match frame {
            ServerFrame::Welcome(w) => {
                if self.position.is_some_and(|(s, _)| s != w.stream) {
                    return Err(Violation(format!("client {}: the stream changed", self.id)));
                }
                if self.position.is_none() {
                    self.position = Some((w.stream, w.head));
                    self.note_check(w.head, w.hash);
                }
                self.welcomed = true;
                let retries: Vec<_> = if self.resend_acked {
                    self.acked_tail.iter().cloned().collect()
                } else {
                    Vec::new()
                };
                self.acknowledge(w.pub_acked, checker);
                self.next_pub_seq = self.next_pub_seq.max(w.pub_acked.0 + 1);
                for (pub_seq, topic, payload) in retries.iter().chain(&self.unacked) {
                    let p = Publish::new(topic, *pub_seq, payload.clone());
                    out.push(protocol::encode_client(&ClientFrame::Publish(p)));
                }
            }
            ServerFrame::Deliver(head, body) => {
                let mut msgs = Vec::new();
                protocol::messages(&head, &body, &mut msgs)
                    .map_err(|e| Violation(format!("client {}: bad delivery: {e}", self.id)))?;
                let at = self.position.map_or(Seq(0), |(_, s)| s);
                for m in msgs.iter().filter(|m| m.seq > at) {
                    checker.delivered(
                        self.id,
                        m.seq,
                        m.publisher,
                        m.pub_seq,
                        m.topic(),
                        &m.payload,
                    )?;
                    self.advance(m.seq);
                }
                if let (Some(hash), Some(last)) = (head.hash, msgs.last()) {
                    self.note_check(last.seq, hash);
                }
            }
            ServerFrame::Diverged(d) => {
                // The model clients are strong: their streams are stable.
                return Err(Violation(format!(
                    "client {}: a strong client was told its stream diverged from seq {} (seen at {})",
                    self.id, d.from, d.seen
                )));
            }
            ServerFrame::PubAck(a) => self.acknowledge(a.pub_seq, checker),
            ServerFrame::Watermark(w) => self.advance(w.seq),
            ServerFrame::Gap(g) => {
                checker.gap(self.id, g.from, g.to);
                self.advance(g.to);
            }
            ServerFrame::Subscribed(s) | ServerFrame::Unsubscribed(s) => {
                self.advance(s.head);
                if let Some(hash) = s.hash {
                    self.note_check(s.head, hash);
                }
            }
            ServerFrame::Ping(p) => out.push(protocol::encode_client(&ClientFrame::Pong(p))),
            ServerFrame::Pong(PingHead { .. }) => {}
            ServerFrame::Members(m) => self.advance(m.seq),
            ServerFrame::Servers(m) => self.advance(m.seq),
            ServerFrame::Error(e) if e.code.is_retryable() => return Ok(After::Reconnect),
            ServerFrame::Error(e) => {
                return Err(Violation(format!(
                    "client {} was refused: {:?}: {}",
                    self.id, e.code, e.message
                )))
            }
        }
        Ok(After::Continue)
    }
}
