//! The client side of the Canopy protocol as sans-IO state machines
//! (docs/DESIGN.md, "Client side"): no sockets, no tasks, no clock. A shell
//! feeds them frames, connection events and the time, and carries out the
//! actions they return. The async SDK ([`crate::Client`]) is one shell; the
//! broker's relays and its simulators are others, so the simulators test
//! the code users run.
//!
//! - [`Link`]: a connection to a tier of servers: the attempt order,
//!   backoff, the handshake's checks, pings and the missed-pings rule.
//!   A relay's upstream runs it under its own stream handling.
//! - [`Position`]: where a subscriber stands in the stream: what a resume
//!   asks for and what moves it.
//! - [`ClientCore`]: a whole client on a link: subscriptions, the position,
//!   its publishes, kept until acknowledged and sent again in order on
//!   every new connection, and its calls, kept until replied and asked
//!   again on every new connection (a call is a publish; the server
//!   answers a retried call with its reply, docs/DESIGN.md "Replicated
//!   RPC").
//!
//! # Driving a `ClientCore`
//! Execute [`ClientCore::poll_action`] outputs (connect, send, disconnect)
//! and report back with [`ClientCore::handle_connected`],
//! [`ClientCore::handle_frame`] and [`ClientCore::handle_closed`]; call
//! [`ClientCore::handle_timeout`] once [`ClientCore::poll_timeout`] has
//! passed; take [`ClientCore::poll_event`]s. Time is a `Duration` from any
//! origin the shell picks, the same for every call.
//!
//! A delivery frame comes back from `handle_frame` as a [`Delivery`]: its
//! messages past the position. Hand them over and call
//! [`ClientCore::take`]; or, when the application cannot take them now,
//! drop the connection ([`ClientCore::drop_connection`]): the next one
//! resumes from the unchanged position, so nothing is lost or handed over
//! twice.

mod link;
mod stream;
#[cfg(test)]
mod tests;

pub use link::{Action, FirstOrder, Link, LinkConfig, LinkEvent, BACKOFF_MAX, BACKOFF_MIN};
pub use stream::{Commit, Joined, Position};

use crate::error::Error;
use crate::protocol::{
    self, AskHead, CallFailure, ClientFrame, CreditHead, MembersHead, Message, PubAck, PubSeq,
    Replies, Seq, ServerFrame, SubscribeHead, Welcome,
};
use bytes::Bytes;
use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

/// What a [`ClientCore`] tells its shell.
#[derive(Clone, Debug)]
pub enum Event {
    /// A connection is serving. Publishes not acknowledged by the Welcome
    /// were sent again after it, in order.
    Welcomed {
        /// The server's Welcome.
        welcome: Box<Welcome>,
        /// What it did to the position.
        joined: Joined,
    },
    /// Every publish through this one is acknowledged (ordered, and will
    /// be delivered to every matching subscriber).
    Acked(PubSeq),
    /// The subscription to this pattern is in effect.
    Subscribed(String),
    /// The subscription to this pattern is not in effect: the user may
    /// not read everything it selects. It is not asked for again.
    Denied {
        /// The pattern.
        pattern: String,
        /// The server's words.
        message: String,
    },
    /// Matching messages in `from..=to` may have been missed.
    Gap {
        /// First possibly missed seq.
        from: Seq,
        /// Last possibly missed seq.
        to: Seq,
    },
    /// Weak delivery: what was handed over from `from` on was not the
    /// agreed stream; the agreed stream follows.
    Diverged {
        /// The first seq whose delivery may have been wrong.
        from: Seq,
        /// Where the difference was seen.
        seen: Seq,
    },
    /// A membership report (`full` reports).
    Members(MembersHead),
    /// The reply to the call published as `pub_seq`.
    Replied {
        /// The call's pub_seq ([`ClientCore::call`]).
        pub_seq: PubSeq,
        /// The reply, or why the call failed.
        answer: Result<Bytes, CallFailure>,
    },
    /// About the connection: lost, refused, or given up.
    Link(LinkEvent),
}

/// Messages of one delivery frame past the position; see the module docs.
#[derive(Debug)]
pub struct Delivery {
    /// The messages, in stream order.
    pub messages: Vec<Message>,
    /// How far the stream is stable (weak delivery), if the frame said.
    pub stable: Option<Seq>,
    /// What [`ClientCore::take`] needs.
    pub commit: Commit,
}

/// A publish not acknowledged yet: its frame, sent again on every new
/// connection until acknowledged.
#[derive(Debug)]
struct Unacked {
    pub_seq: PubSeq,
    frame: Bytes,
}

/// A whole client on a link. See the module docs.
#[derive(Debug)]
pub struct ClientCore {
    link: Link,
    position: Position,
    /// Distinct patterns subscribed to, in the order first subscribed.
    patterns: Vec<String>,
    /// Patterns whose answer is awaited.
    pending: Vec<String>,
    /// The patterns of the open connection's Hello.
    in_hello: Vec<String>,
    unacked: VecDeque<Unacked>,
    /// Publish frames are cut from here (one allocation for many).
    arena: bytes::BytesMut,
    /// Calls not replied yet, by pub_seq.
    calls: BTreeSet<PubSeq>,
    /// Every publish through this one is acknowledged.
    acked: PubSeq,
    next_pub_seq: u64,
    /// The program began an incarnation ([`ClientCore::begin_incarnation`])
    /// and has not published yet: a Welcome that shows the id's earlier
    /// publishes moves its first pub_seq past them.
    incarnation: bool,
    events: VecDeque<Event>,
    /// From the last Welcome.
    permissions: Option<protocol::Permissions>,
    /// Flow control (docs/DESIGN.md, "Flow control"): messages handed to
    /// the application and not taken yet, as the shell last said.
    outstanding: u64,
    /// Messages the server may still send on this connection: granted
    /// (the Hello's window and every `Credit`) less `Deliver` entries come.
    credit: u64,
}

impl ClientCore {
    /// A client that makes its first attempt at its first timeout (`now`).
    pub fn new(now: Duration, config: LinkConfig) -> Self {
        ClientCore {
            position: Position::new(config.weak),
            link: Link::new(now, config),
            patterns: Vec::new(),
            pending: Vec::new(),
            in_hello: Vec::new(),
            unacked: VecDeque::new(),
            arena: bytes::BytesMut::new(),
            calls: BTreeSet::new(),
            acked: PubSeq(0),
            next_pub_seq: 1,
            incarnation: false,
            events: VecDeque::new(),
            permissions: None,
            outstanding: 0,
            credit: 0,
        }
    }

    /// The connection.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Where the subscriber stands.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// The stream of the serving connection, if one serves.
    pub fn stream(&self) -> Option<u64> {
        // (Every Welcome sets the position's stream to its own.)
        let (stream, _) = self.position.at()?;
        self.link.is_up().then_some(stream)
    }

    /// Publishes sent and not acknowledged.
    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }

    /// The pub_seq the next publish gets.
    pub fn next_pub_seq(&self) -> PubSeq {
        PubSeq(self.next_pub_seq)
    }

    /// Starts publish sequence numbers at `first` (a program that knows
    /// where its fixed publisher id stands); before any publish.
    pub fn start_pub_seq_at(&mut self, first: u64) {
        self.next_pub_seq = self.next_pub_seq.max(first);
    }

    /// A program with a fixed publisher id begins a new incarnation of its
    /// pub_seqs (docs/DESIGN.md, "Identity and resume"), before it
    /// publishes: at incarnation `epoch` (the SDK takes the wall clock's
    /// seconds, so each program started later begins past those before
    /// it), or past what its first Welcome shows the id has ordered
    /// ([`PubSeq::next_incarnation`]), whichever is later. Its
    /// predecessors' publishes still on their way are then never taken for
    /// its own. Its connections are counted from the incarnation on, so
    /// that the membership takes its attach over theirs, however late
    /// theirs is ordered.
    pub fn begin_incarnation(&mut self, epoch: u64) {
        self.incarnation = true;
        if let Some(first) = PubSeq::incarnation(epoch) {
            self.next_pub_seq = self.next_pub_seq.max(first.0);
            self.link.count_connections_from(first.0);
        }
    }

    /// Publishes: sent now when a connection serves, and on every new
    /// connection until acknowledged. Returns its pub_seq. A program with a
    /// fixed publisher id begins an incarnation and publishes after its
    /// first Welcome (the SDK's `connect` returns after it).
    pub fn publish(&mut self, topic: &str, payload: &[u8]) -> PubSeq {
        self.incarnation = false;
        let pub_seq = PubSeq(self.next_pub_seq);
        self.next_pub_seq = self.next_pub_seq.saturating_add(1);
        let frame = protocol::encode_forward_into(&mut self.arena, None, topic, pub_seq, payload);
        self.link.send(frame.clone());
        self.unacked.push_back(Unacked { pub_seq, frame });
        pub_seq
    }

    /// Calls `method` of the core's replicated service (a publish on
    /// `$canopy.call.METHOD`, validated by the caller): kept until its
    /// reply comes ([`Event::Replied`]), and asked again on every new
    /// connection. Returns its pub_seq, which names the call.
    pub fn call(&mut self, method: &str, payload: &[u8]) -> PubSeq {
        self.call_with(method, Replies::Own, payload)
    }

    /// [`ClientCore::call`], waiting for `replies`.
    pub fn call_with(&mut self, method: &str, replies: Replies, payload: &[u8]) -> PubSeq {
        let pub_seq = self.publish(&replies.topic(method), payload);
        self.calls.insert(pub_seq);
        pub_seq
    }

    /// Calls not replied yet.
    pub fn calls_pending(&self) -> usize {
        self.calls.len()
    }

    /// The pub_seqs of the calls not replied yet.
    pub fn pending_calls(&self) -> impl Iterator<Item = PubSeq> + '_ {
        self.calls.iter().copied()
    }

    /// Stops waiting for the reply to call `pub_seq` (the application gave
    /// up on it; the call may still be executed).
    pub fn forget_call(&mut self, pub_seq: PubSeq) {
        self.calls.remove(&pub_seq);
    }

    /// Subscribes to `pattern` (validated by the caller). Returns whether
    /// an answer is to come ([`Event::Subscribed`]); `false` when the
    /// pattern was subscribed already.
    pub fn subscribe(&mut self, pattern: &str) -> bool {
        if self.patterns.iter().any(|p| p == pattern) {
            return false;
        }
        self.patterns.push(pattern.to_owned());
        self.pending.push(pattern.to_owned());
        let head = SubscribeHead {
            pattern: pattern.to_owned(),
        };
        self.link
            .send(protocol::encode_client(&ClientFrame::Subscribe(head)));
        true
    }

    /// Unsubscribes from `pattern`.
    pub fn unsubscribe(&mut self, pattern: &str) {
        let before = self.patterns.len();
        self.patterns.retain(|p| p != pattern);
        self.pending.retain(|p| p != pattern);
        if self.patterns.len() < before {
            let head = SubscribeHead {
                pattern: pattern.to_owned(),
            };
            self.link
                .send(protocol::encode_client(&ClientFrame::Unsubscribe(head)));
        }
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.link.poll_action()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(e) = self.link.poll_event() {
            return Some(Event::Link(e));
        }
        self.events.pop_front()
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.link.poll_timeout()
    }

    /// Time has reached `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.link.handle_timeout(now);
    }

    /// The connection the last [`Action::Connect`] asked for is open: the
    /// Hello goes out, with the subscriptions and the resume position.
    pub fn handle_connected(&mut self, now: Duration) {
        let resume = if self.patterns.is_empty() {
            None
        } else {
            self.position.resume()
        };
        self.in_hello.clone_from(&self.patterns);
        let window = self.room();
        self.credit = window.unwrap_or(0);
        self.link
            .handle_connected(now, self.patterns.clone(), resume, window);
    }

    /// Flow control: the application holds `outstanding` messages handed
    /// to it and not taken yet (the shell says so after handing some over
    /// and as the application takes them). Grants the server more once a
    /// quarter of the window is free, so that a client that keeps up
    /// sends a `Credit` every quarter window and one that does not is
    /// sent nothing past its window: its server holds its place in the
    /// stream instead, and catches it up from retention as it grants more.
    pub fn set_outstanding(&mut self, outstanding: u64) {
        self.outstanding = outstanding;
        let (Some(room), Some(window)) = (self.room(), self.link.config().receive_window) else {
            return;
        };
        let grant = room.saturating_sub(self.credit);
        if grant >= (window / 4).max(1) && self.link.is_up() {
            self.credit += grant;
            let frame = protocol::encode_client(&ClientFrame::Credit(CreditHead { msgs: grant }));
            self.link.send(frame);
        }
    }

    /// Flow control: the messages the server may still send on this
    /// connection, as this client reckons (granted less delivered).
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// What the window leaves for the server to send, if there is a window.
    fn room(&self) -> Option<u64> {
        let window = self.link.config().receive_window?;
        Some(window.saturating_sub(self.outstanding))
    }

    /// The connection (or the attempt) ended.
    pub fn handle_closed(&mut self, now: Duration) {
        self.link.handle_closed(now);
    }

    /// Drops the connection (say, the application cannot take a delivery
    /// now); the next one resumes from the position.
    pub fn drop_connection(&mut self, now: Duration, why: &str) {
        self.link.drop_connection(now, why);
    }

    /// Drops the connection until [`ClientCore::release`]: the
    /// application is behind on a subscription ([`Link::hold`]).
    pub fn hold(&mut self, now: Duration, why: &str) {
        self.link.hold(now, why);
    }

    /// Ends a [`ClientCore::hold`]: reconnects and resumes after the last
    /// message taken.
    pub fn release(&mut self, now: Duration) {
        self.link.release(now);
    }

    /// The server broke the protocol (say, a frame that does not decode):
    /// the connection is dropped and [`LinkEvent::Refused`] follows.
    pub fn refuse(&mut self, now: Duration, e: Error) {
        self.link.refuse(now, e);
    }

    /// Tries again now, without waiting out the backoff ([`Link::reset_backoff`]).
    pub fn reset_backoff(&mut self, now: Duration) {
        self.link.reset_backoff(now);
    }

    /// Stops for good.
    pub fn stop(&mut self) {
        self.link.stop();
    }

    /// A frame arrived. A delivery's new messages come back to be handed
    /// over (see the module docs); everything else becomes events.
    pub fn handle_frame(&mut self, now: Duration, frame: ServerFrame) -> Option<Delivery> {
        match self.link.handle_frame(now, frame)? {
            ServerFrame::Welcome(w) => self.welcomed(w),
            ServerFrame::Deliver(head, body) => {
                self.credit = self.credit.saturating_sub(head.msgs.len() as u64);
                let mut messages = Vec::with_capacity(head.msgs.len());
                if let Err(e) = protocol::messages(&head, &body, &mut messages) {
                    self.link
                        .refuse(now, Error::Protocol(format!("a bad delivery: {e}")));
                    return None;
                }
                let commit = self.position.fresh(&head, &mut messages)?;
                return Some(Delivery {
                    messages,
                    stable: head.stable,
                    commit,
                });
            }
            ServerFrame::PubAck(PubAck { pub_seq, .. }) => self.acknowledge(pub_seq),
            ServerFrame::Subscribed(s) => {
                // The server sent everything up to `head` before this answer.
                self.position.answered(s.head, s.hash);
                if let Some(i) = self.pending.iter().position(|p| *p == s.pattern) {
                    self.pending.remove(i);
                    self.events.push_back(Event::Subscribed(s.pattern));
                }
            }
            ServerFrame::Unsubscribed(s) => self.position.answered(s.head, s.hash),
            ServerFrame::Watermark(w) => self.position.watermark(w.seq),
            ServerFrame::Gap(g) => {
                self.position.advance(g.to);
                self.events.push_back(Event::Gap {
                    from: g.from,
                    to: g.to,
                });
            }
            ServerFrame::Diverged(d) => {
                if !self.link.config().weak {
                    let e = Error::Protocol(format!(
                        "a strong client was told its stream diverged from seq {}",
                        d.from
                    ));
                    self.link.refuse(now, e);
                    return None;
                }
                tracing::warn!(from = %d.from, seen = %d.seen, "delivered messages were not the agreed stream; the agreed stream follows");
                self.position.diverged(d.from);
                self.events.push_back(Event::Diverged {
                    from: d.from,
                    seen: d.seen,
                });
            }
            ServerFrame::Members(m) => self.events.push_back(Event::Members(m)),
            ServerFrame::Reply(head, body) => {
                if self.calls.remove(&head.pub_seq) {
                    let answer = match head.error {
                        Some(e) => Err(e),
                        None => Ok(body),
                    };
                    self.events.push_back(Event::Replied {
                        pub_seq: head.pub_seq,
                        answer,
                    });
                }
            }
            ServerFrame::Error(e) if e.pattern.is_some() => {
                let pattern = e.pattern.unwrap_or_default();
                self.patterns.retain(|p| *p != pattern);
                self.pending.retain(|p| *p != pattern);
                self.events.push_back(Event::Denied {
                    pattern,
                    message: e.message,
                });
            }
            ServerFrame::Error(e) => {
                // A publisher's error is for relays only.
                let e = Error::Protocol(format!("an error for publisher {:?}", e.publisher));
                self.link.refuse(now, e);
            }
            // The link's own frames do not come back.
            ServerFrame::Ping(_) | ServerFrame::Pong(_) | ServerFrame::Servers(_) => {}
        }
        None
    }

    /// Hands a delivery's messages over: the position moves past them.
    pub fn take(&mut self, commit: Commit) {
        self.position.take(commit);
    }

    /// What the user may do, as the last server that checked said (`None`:
    /// the server does not check).
    pub fn permissions(&self) -> Option<&protocol::Permissions> {
        self.permissions.as_ref()
    }

    fn welcomed(&mut self, w: Welcome) {
        self.permissions = w.permissions.clone();
        let joined = self.position.welcome(&w);
        if joined == Joined::Reset {
            tracing::warn!(server = %w.server, "server has a different stream; sequence numbers restart");
        }
        tracing::debug!(server = %w.server, head = %w.head, session = w.session, "connected");
        // A fixed publisher id may have published before this process
        // started: continue after what the server has, or the server would
        // take new messages for retries of old ones; a program that began
        // an incarnation and has not published yet, past what is still on
        // its way from the program before (docs/DESIGN.md, "Identity and
        // resume").
        let after = match self.incarnation && w.pub_acked > PubSeq(0) {
            true => w.pub_acked.next_incarnation(),
            false => PubSeq(w.pub_acked.0.saturating_add(1)),
        };
        self.next_pub_seq = self.next_pub_seq.max(after.0);
        // Subscriptions in the Hello are now in effect; those made since it
        // went out follow it, as do unsubscriptions.
        let in_hello = std::mem::take(&mut self.in_hello);
        let (answered, pending) = self.pending.drain(..).partition(|p| in_hello.contains(p));
        self.pending = pending;
        for pattern in answered {
            self.events.push_back(Event::Subscribed(pattern));
        }
        for pattern in &self.pending {
            let head = SubscribeHead {
                pattern: pattern.clone(),
            };
            self.link
                .send(protocol::encode_client(&ClientFrame::Subscribe(head)));
        }
        for pattern in in_hello.into_iter().filter(|p| !self.patterns.contains(p)) {
            let head = SubscribeHead { pattern };
            self.link
                .send(protocol::encode_client(&ClientFrame::Unsubscribe(head)));
        }
        if joined == Joined::Reset {
            // Calls acknowledged in the old stream are gone with it.
            let lost: Vec<PubSeq> = self.calls.range(..=self.acked).copied().collect();
            for pub_seq in lost {
                self.calls.remove(&pub_seq);
                let failure = CallFailure {
                    code: protocol::CallErrorCode::StreamReset,
                    message: "the core's stream began again after the call was acknowledged; whether it was executed is not known".into(),
                };
                self.events.push_back(Event::Replied {
                    pub_seq,
                    answer: Err(failure),
                });
            }
        }
        // What the application took while the Hello was out.
        self.set_outstanding(self.outstanding);
        let pub_acked = w.pub_acked;
        self.events.push_back(Event::Welcomed {
            welcome: Box::new(w),
            joined,
        });
        self.acknowledge(pub_acked);
        // What is not acknowledged goes again (a call among it is answered
        // whether or not it was ordered before); calls acknowledged but not
        // replied are asked for.
        for u in &self.unacked {
            self.link.send(u.frame.clone());
        }
        for &pub_seq in self.calls.range(..=self.acked) {
            let ask = AskHead {
                pub_seq,
                publisher: None,
            };
            self.link
                .send(protocol::encode_client(&ClientFrame::Ask(ask)));
        }
    }

    /// Everything through `through` is acknowledged.
    fn acknowledge(&mut self, through: PubSeq) {
        if through <= self.acked {
            return;
        }
        self.acked = through;
        while self.unacked.front().is_some_and(|u| u.pub_seq <= through) {
            self.unacked.pop_front();
        }
        self.events.push_back(Event::Acked(through));
    }
}
