//! `Upstream`: a relay's "group below" (docs/DESIGN.md, "The layer stack"): its
//! connection to the tier above, as a sans-IO state machine.
//!
//! A relay is a client of the tier above and a server for its own clients.
//! Upstream gives the relay's [`Node`](super::node::Node) what a core group gives
//! a core server: the ordered stream (every message, in the one total
//! order, contiguous from the relay's head) and a way to submit publishes.
//! The relay subscribes to the whole stream (`>`); its own clients'
//! subscriptions are matched locally.
//!
//! Like a core group, it passes the stream on in two steps: messages as
//! soon as the tier above holds them ([`UpEvent::Held`], for the relay's
//! weak clients), then how far they are stable ([`UpEvent::Stable`], for
//! everyone else). The relay is a weak client of the tier above for this:
//! it is sent held messages with the stable position, and is told when
//! what it held is taken back ([`UpEvent::Unheld`]).
//!
//! The connection itself (which server of the tier above and when, the
//! handshake's checks, pings and the missed-pings rule) is the client
//! protocol core's [`Link`], the one the SDK runs; what is a relay's own is
//! here: the stream kept as held and stable with its running hash checked,
//! membership reports at their positions, and publishes forwarded for many
//! publishers, kept until the stream shows them stable.
//!
//! # Driving it
//! The shell executes [`Upstream::poll_action`] outputs (connect, send,
//! disconnect) and reports back with [`Upstream::handle_connected`],
//! [`Upstream::handle_frame`] and [`Upstream::handle_closed`]; it calls
//! [`Upstream::handle_timeout`] once [`Upstream::poll_timeout`] has passed.
//! Events for the node come from [`Upstream::poll_event`].
//!
//! # Invariants
//! - Deliveries continue the head without a hole: a resumed connection
//!   starts after the head, and an upstream that skips seqs without a gap
//!   notice is dropped. An explicit gap notice, or a changed stream,
//!   becomes a [`UpEvent::Reset`]: the relay's clients then resume
//!   against the new position, never missing the jump silently.
//! - A forwarded publish is kept until the stream shows it stable (held is
//!   not enough: a failure could take it back), an acknowledgement of a
//!   retry shows it ordered, or the tier above refuses it, and it is
//!   sent again on every new connection: the tier above deduplicates by
//!   `(publisher, pub_seq)`, so nothing is lost or ordered twice.
//! - Forwards held are bounded by count; the node pushes back on its
//!   publishers when the bound is reached.

use super::members::SYSTEM_PATTERN;
use crate::core::stream::Ordered;
use crate::core::stream::{Msg, Snapshot};
use crate::core::timers::earliest;
use bytes::Bytes;
pub use canopy_client::core::Action;
use canopy_client::core::{FirstOrder, Link, LinkConfig};
use canopy_client::protocol::{
    self, ErrorCode, MembersHead, Message, PubAck, PubSeq, PublisherId, ReplyHead, Reports, Resume,
    Role, Seq, ServerFrame,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Settings of a relay's upstream connection.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The relay's name, told to the tier above.
    pub name: String,
    /// The relay's own publisher id (it never publishes as itself; the id
    /// names its connection and ranks its adopters).
    pub publisher: PublisherId,
    /// Client addresses of the tier above.
    pub servers: Vec<String>,
    /// How often the relay pings; three silent periods drop the link.
    pub ping_interval: Duration,
    /// Time allowed for one connection attempt and its handshake.
    pub connect_timeout: Duration,
    /// Forwarded publishes held until ordered, at most.
    pub forwards_max: usize,
    /// How the relay proves who it is to the tier above, when that checks.
    pub credentials: Option<protocol::Credentials>,
}

impl UpstreamConfig {
    /// Settings with defaults for a relay named `name` under `servers`.
    pub fn new(name: String, publisher: PublisherId, servers: Vec<String>) -> Self {
        UpstreamConfig {
            name,
            publisher,
            servers,
            ping_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            // Below the shell's send queue, so that a reconnect's resend
            // of everything held always fits it; four clients' full
            // publish windows (the SDK's default is 16,384), since past it
            // the relay refuses publishers with `overloaded`.
            forwards_max: 65_536,
            credentials: None,
        }
    }
}

/// What the relay's node is told.
#[derive(Debug)]
pub enum UpEvent {
    /// Ordered messages continuing the head, held by the tier above but
    /// not necessarily stable yet.
    Held(Vec<Ordered>),
    /// Everything held through this seq is stable.
    Stable(Seq),
    /// What was held after this seq is taken back (the tier above ordered
    /// otherwise after a failure); what replaces it follows as `Held`.
    Unheld {
        /// The last seq kept.
        after: Seq,
    },
    /// The stream position jumped (a new stream, or a range the tier above
    /// no longer holds): the node starts over from this state.
    Reset(Snapshot),
    /// The tier above acknowledged a retry it had ordered before.
    Acked(PublisherId, PubAck),
    /// The tier above refused a publisher's forwarded publishes.
    Refused(PublisherId, ErrorCode, String),
    /// The tree's membership at the head (a complete report).
    Members(MembersHead),
    /// Whether the relay should serve clients: not without its stream
    /// from the tier above for longer than the silence time (its clients
    /// move to a sibling), nor after a reset until the membership report
    /// at the new position arrived.
    Serving(bool),
    /// A new connection to the tier above is up: the relay announces its
    /// live clients again, in case the old connection's end was ordered
    /// first and took them out of the membership, and asks again for the
    /// replies its clients wait for.
    Reattach,
    /// The reply to a call the relay forwarded for `publisher`.
    Replied(PublisherId, ReplyHead, Bytes),
}

/// A relay's connection to the tier above. See the module docs.
pub struct Upstream {
    config: UpstreamConfig,
    /// The connection to the tier above.
    link: Link,
    /// The stream the head belongs to; none before the first Welcome.
    stream: Option<u64>,
    /// The last seq received (held above, stable or not).
    head: Seq,
    /// The running hash of the stream through `head`.
    hash: u64,
    /// How far the stream is stable (at most `head`), and the running hash
    /// there.
    stable: (Seq, u64),
    /// Received after `stable`: seq, publisher, pub_seq and running hash.
    held: VecDeque<(Seq, PublisherId, PubSeq, u64)>,
    /// A complete membership report ahead of `stable`, passed on when the
    /// stream is stable through its position.
    report: Option<MembersHead>,
    /// Forwarded publishes not yet seen ordered, per publisher in order
    /// (a B-tree, so that they are resent in one order every time).
    forwards: BTreeMap<PublisherId, VecDeque<Msg>>,
    forwards_len: usize,
    events: VecDeque<UpEvent>,
    /// Scratch space for decoding deliveries.
    batch: Vec<Message>,
    /// What the relay was last told (`UpEvent::Serving`).
    serving: bool,
    /// After a reset: no membership yet; serving waits for a complete
    /// report at the head.
    awaiting_report: bool,
    /// A deliberate bug for the test that proves the tree simulator
    /// catches it: forwards are not sent again on a new connection.
    pub(crate) bug_no_resend: bool,
}

impl Upstream {
    /// An upstream that connects at its first timeout (at `now`).
    pub fn new(now: Duration, config: UpstreamConfig) -> Self {
        let link = LinkConfig {
            name: config.name.clone(),
            publisher: config.publisher,
            servers: config.servers.clone(),
            role: Role::Relay,
            // A complete membership report to start from (the stream's
            // events keep it current), and the server list.
            reports: Reports::Full,
            slow: protocol::SlowPolicy::Disconnect,
            // Sent held messages with the stable position (module docs).
            weak: true,
            ping_interval: config.ping_interval,
            connect_timeout: config.connect_timeout,
            // A relay never gives up on the tier above.
            reconnect_for: None,
            // Relays spread over the tier above by adoption order.
            first_order: FirstOrder::Spread,
            credentials: config.credentials.clone(),
            // A relay takes what comes (its own clients have windows).
            receive_window: None,
        };
        Upstream {
            link: Link::new(now, link),
            config,
            stream: None,
            head: Seq(0),
            hash: 0,
            stable: (Seq(0), 0),
            held: VecDeque::new(),
            report: None,
            forwards: BTreeMap::new(),
            forwards_len: 0,
            events: VecDeque::new(),
            batch: Vec::new(),
            serving: false,
            awaiting_report: false,
            bug_no_resend: false,
        }
    }

    /// Whether the relay has its stream (a Welcome arrived once): until
    /// then it has nothing to serve.
    pub fn is_synced(&self) -> bool {
        self.stream.is_some()
    }

    /// Whether a connection is serving now.
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    /// Forwarded publishes held until ordered.
    pub fn forwards_held(&self) -> usize {
        self.forwards_len
    }

    /// Forwards that may still be taken before the bound: beyond it the
    /// node must push back.
    pub fn room(&self) -> usize {
        self.config.forwards_max.saturating_sub(self.forwards_len)
    }

    /// Forwards publishes from the relay's clients to the tier above (now,
    /// when connected, and again on every new connection until ordered).
    pub fn submit(&mut self, msgs: Vec<Msg>) {
        for m in msgs {
            self.link.send(encode(&m));
            self.forwards.entry(m.0).or_default().push_back(m);
            self.forwards_len += 1;
        }
    }

    /// The next event for the node.
    pub fn poll_event(&mut self) -> Option<UpEvent> {
        // The link's own events are logged where they happen; what they
        // mean for the relay is decided here, from the link's state.
        while self.link.poll_event().is_some() {}
        self.events.pop_front()
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.link.poll_action()
    }

    /// When `handle_timeout` is next due: the link's timer, or the time the
    /// relay stops serving without its stream.
    pub fn poll_timeout(&self) -> Option<Duration> {
        earliest(self.link.poll_timeout(), self.give_up_at())
    }

    fn give_up_at(&self) -> Option<Duration> {
        self.link
            .down_since()
            .filter(|_| self.serving)
            .map(|t| t + self.link.silence_max())
    }

    /// Time has reached `now`: connect, ping, or give up on a silent link.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.give_up_at().is_some_and(|t| now >= t) {
            tracing::warn!("no stream from the tier above: clients are sent to a sibling");
            self.set_serving(false);
        }
        self.link.handle_timeout(now);
    }

    /// The connection opened: the handshake goes out, resuming after the
    /// head when there is one.
    pub fn handle_connected(&mut self, now: Duration) {
        let resume = self.stream.map(|stream| Resume {
            stream,
            after: self.head,
            check: Some(protocol::StreamCheck {
                seq: self.head,
                hash: self.hash,
            }),
            agreed: Some(self.stable.0),
        });
        // Every application topic, and the membership events.
        let subscriptions = vec![">".to_owned(), SYSTEM_PATTERN.to_owned()];
        self.link.handle_connected(now, subscriptions, resume, None);
    }

    /// The connection (or the attempt) ended.
    pub fn handle_closed(&mut self, now: Duration) {
        self.link.handle_closed(now);
    }

    /// Asks the tier above for the reply to `publisher`'s call `pub_seq`
    /// (on the open connection; a new one asks again, `UpEvent::Reattach`).
    pub fn ask(&mut self, publisher: PublisherId, pub_seq: PubSeq) {
        if !self.link.is_up() {
            return;
        }
        let ask = protocol::AskHead {
            pub_seq,
            publisher: Some(publisher),
        };
        self.link
            .send(protocol::encode_client(&protocol::ClientFrame::Ask(ask)));
    }

    /// Answers the tier above's refusal of `publisher`'s forwards: what
    /// follows for it comes from its resend. A connection opened since has
    /// no refusal to answer.
    pub fn release(&mut self, publisher: PublisherId) {
        if !self.link.is_up() {
            return;
        }
        let head = protocol::ReleasedHead { publisher };
        self.link
            .send(protocol::encode_client(&protocol::ClientFrame::Released(
                head,
            )));
    }

    /// A frame arrived on the open connection.
    pub fn handle_frame(&mut self, now: Duration, frame: ServerFrame) {
        // The link takes its own frames, and hands back only a checked
        // Welcome and, after it, the rest.
        let Some(frame) = self.link.handle_frame(now, frame) else {
            return;
        };
        match frame {
            ServerFrame::Welcome(w) => self.on_welcome(w),
            ServerFrame::Deliver(head, body) => {
                self.batch.clear();
                if let Err(e) = protocol::messages(&head, &body, &mut self.batch) {
                    return self.drop_link(now, &format!("bad delivery: {e}"));
                }
                let last = self.batch.last().map(|m| m.seq);
                self.on_deliver(now);
                if head.hash.is_some_and(|h| h != self.hash) && last == Some(self.head) {
                    // Not the stream of the tier above (a bug there or here):
                    // start again from its head rather than serve it.
                    tracing::error!(
                        seq = self.head.0,
                        "the stream's running hash differs from the tier above"
                    );
                    return self.start_over(now, "the stream's running hash differs");
                }
                // (Not after a hole dropped the link.)
                if let Some(stable) = head.stable.filter(|_| self.is_up()) {
                    self.mark_stable(stable);
                }
            }
            ServerFrame::Watermark(w) => self.mark_stable(w.seq),
            ServerFrame::Diverged(d) => self.on_diverged(now, d),
            ServerFrame::Gap(g) => {
                // The tier above no longer holds what follows the head: the
                // relay cannot continue its stream contiguously. It starts
                // over on a fresh connection, at the head there, with the
                // membership report for that position.
                tracing::warn!(
                    from = g.from.0,
                    to = g.to.0,
                    "the tier above skipped a range"
                );
                self.start_over(now, "a gap in the stream");
            }
            ServerFrame::PubAck(ack) => match ack.publisher {
                Some(p) => {
                    self.ordered(p, ack.pub_seq);
                    self.events.push_back(UpEvent::Acked(p, ack));
                }
                // The relay's own publishes (its membership events): the
                // stream shows them ordered too, unless a gap took the
                // relay past them, and then only this says so (the tree
                // simulator, seed 3151: a relay's own events held for good
                // filled its bound of forwards, and its later ones waited
                // behind them).
                None => self.ordered(self.config.publisher, ack.pub_seq),
            },
            ServerFrame::Reply(head, body) => {
                if let Some(p) = head.publisher {
                    self.events.push_back(UpEvent::Replied(p, head, body));
                }
            }
            // (The link handles the connection's own errors: these are
            // a publisher's.)
            ServerFrame::Error(e) => {
                if let Some(p) = e.publisher {
                    self.forget(p);
                    self.events
                        .push_back(UpEvent::Refused(p, e.code, e.message));
                }
            }
            // Only between the stable position and the head (the tier above
            // reports at its stable position, which this relay may not know
            // yet): a server behind this relay sends one for an earlier
            // position, which would undo what the relay applied since (its
            // own stream keeps it current anyway).
            ServerFrame::Members(m)
                if m.complete && (self.stable.0..=self.head).contains(&m.seq) =>
            {
                self.report = Some(m);
                self.mark_stable(self.stable.0);
            }
            ServerFrame::Members(m) if m.complete && self.awaiting_report => {
                // After a reset the relay has no membership of its own to
                // go on: start over, fresh, until a report meets the head.
                tracing::debug!(
                    report = m.seq.0,
                    head = self.head.0,
                    "membership report off the head"
                );
                self.start_over(now, "no membership report at the head");
            }
            ServerFrame::Members(_)
            | ServerFrame::Subscribed(_)
            | ServerFrame::Unsubscribed(_)
            | ServerFrame::Ping(_)
            | ServerFrame::Pong(_)
            | ServerFrame::Servers(_) => {}
        }
    }

    /// A Welcome, checked by the link.
    fn on_welcome(&mut self, w: protocol::Welcome) {
        tracing::info!(server = %w.server, head = w.head.0, stream = w.stream, "connected to the tier above");
        let same_stream = self.stream == Some(w.stream);
        if !same_stream {
            // The first stream, or a new one: start at its head, and serve
            // again once the membership report for it has come.
            self.stream = Some(w.stream);
            self.set_serving(false);
            self.awaiting_report = true;
            self.reset(w.head, w.hash);
        } else if !self.awaiting_report {
            // The stream goes on from this relay's head: its membership is
            // current, and it serves again (if it had stopped).
            self.set_serving(true);
        }
        if same_stream {
            // Its own publishes the tier above has ordered: no acknowledgement
            // of them follows on this connection.
            self.ordered(self.config.publisher, w.pub_acked);
        }
        self.events.push_back(UpEvent::Reattach);
        if self.bug_no_resend {
            return;
        }
        for m in self.forwards.values().flatten() {
            self.link.send(encode(m));
        }
    }

    fn on_deliver(&mut self, now: Duration) {
        let mut out = Vec::with_capacity(self.batch.len());
        let mut hole = None;
        for m in std::mem::take(&mut self.batch) {
            if m.seq <= self.head {
                continue;
            }
            if m.seq != self.head.next() {
                hole = Some(format!(
                    "seq {} after {} without a gap notice",
                    m.seq, self.head
                ));
                break;
            }
            self.head = m.seq;
            self.hash = protocol::chain(self.hash, m.seq, m.publisher, m.pub_seq);
            self.held
                .push_back((m.seq, m.publisher, m.pub_seq, self.hash));
            out.push(Ordered {
                seq: m.seq,
                topic: Arc::from(m.topic()),
                publisher: m.publisher,
                pub_seq: m.pub_seq,
                payload: m.payload,
                hash: 0,
            });
        }
        if !out.is_empty() {
            self.events.push_back(UpEvent::Held(out));
        }
        if let Some(why) = hole {
            self.drop_link(now, &why);
        }
    }

    /// The tier above is stable through `through`: so is what this relay
    /// holds up to it. A waiting membership report passes at its position.
    fn mark_stable(&mut self, through: Seq) {
        let through = through.min(self.head);
        loop {
            let report_at = self.report.as_ref().map(|r| r.seq);
            let upto = match report_at {
                Some(at) if at <= through => at,
                _ => through,
            };
            if upto > self.stable.0 {
                while self.held.front().is_some_and(|h| h.0 <= upto) {
                    if let Some((seq, publisher, pub_seq, hash)) = self.held.pop_front() {
                        // Released only once stable: a held forward could
                        // still be taken back.
                        self.ordered(publisher, pub_seq);
                        self.stable = (seq, hash);
                    }
                }
                self.events.push_back(UpEvent::Stable(upto));
            }
            if report_at != Some(upto) {
                return;
            }
            if let Some(report) = self.report.take() {
                self.events.push_back(UpEvent::Members(report));
                self.awaiting_report = false;
                self.set_serving(true);
            }
        }
    }

    /// The tier above ordered otherwise than it sent (a server failed
    /// before what it sent was stable): what is held after `d.from - 1` is
    /// taken back, and the agreed stream follows.
    fn on_diverged(&mut self, now: Duration, d: protocol::DivergedHead) {
        let after = Seq(d.from.0.saturating_sub(1));
        if after < self.stable.0 {
            // It would take back what is stable here: not the same stream.
            tracing::error!(
                from = d.from.0,
                stable = self.stable.0 .0,
                "the tier above takes back a stable message"
            );
            return self.start_over(now, "a stable message taken back");
        }
        tracing::warn!(
            from = d.from.0,
            seen = d.seen.0,
            "the tier above took back messages it had sent"
        );
        while self.held.back().is_some_and(|h| h.0 > after) {
            self.held.pop_back();
        }
        (self.head, self.hash) = self
            .held
            .back()
            .map_or(self.stable, |&(seq, _, _, hash)| (seq, hash));
        if self.report.as_ref().is_some_and(|r| r.seq > after) {
            self.report = None;
            if self.awaiting_report {
                // No other report comes on this connection.
                return self.start_over(now, "the membership report was taken back");
            }
        }
        self.events.push_back(UpEvent::Unheld { after });
    }

    /// `publisher`'s publishes up to `pub_seq` are ordered: stop holding them.
    fn ordered(&mut self, publisher: PublisherId, pub_seq: PubSeq) {
        let Some(q) = self.forwards.get_mut(&publisher) else {
            return;
        };
        while q.front().is_some_and(|m| m.1 <= pub_seq) {
            q.pop_front();
            self.forwards_len -= 1;
        }
        if q.is_empty() {
            self.forwards.remove(&publisher);
        }
    }

    fn forget(&mut self, publisher: PublisherId) {
        if let Some(q) = self.forwards.remove(&publisher) {
            self.forwards_len -= q.len();
        }
    }

    fn set_serving(&mut self, serving: bool) {
        if self.serving != serving {
            self.serving = serving;
            self.events.push_back(UpEvent::Serving(serving));
        }
    }

    /// Starts the relay's stream over at `head`: the node drops what it
    /// served and its clients resume against the new position.
    fn reset(&mut self, head: Seq, hash: u64) {
        self.head = head;
        self.hash = hash;
        self.stable = (head, hash);
        self.held.clear();
        self.report = None;
        self.events.push_back(UpEvent::Reset(Snapshot {
            stream: self.stream.unwrap_or_default(),
            head,
            publishers: Vec::new(),
            evicted: true,
            first: head.next(),
            msgs: Vec::new(),
            // The membership comes with the next complete report.
            members: None,
            hash,
            service: None,
        }));
    }

    /// Forgets the stream and the connection: the next Welcome resets the
    /// relay to the head there, with the membership report for it.
    fn start_over(&mut self, now: Duration, why: &str) {
        self.stream = None;
        self.drop_link(now, why);
    }

    fn drop_link(&mut self, now: Duration, why: &str) {
        tracing::warn!(reason = why, "dropping the connection to the tier above");
        self.link.drop_connection(now, why);
    }
}

fn encode(m: &Msg) -> Bytes {
    protocol::encode_forward(Some(m.0), &m.2, m.1, &m.3)
}

#[cfg(test)]
mod tests;
