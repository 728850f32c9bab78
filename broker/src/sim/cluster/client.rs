//! A client of the simulated core: the SDK's own protocol core
//! ([`ClientCore`]) over the real client protocol, so what the simulator
//! checks is what users run: resuming by stream and position with the
//! running-hash check, resending what is unacknowledged after a Welcome,
//! learning what was acknowledged from it, and on a loss trying the servers
//! in adoption order with the lost one last, backing off between rounds. A
//! client publishes, subscribes (strong or weak), or both.
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

use crate::core::rrpc::Mode;
use crate::sim::checker::Violation;
use crate::sim::client::link_config;
use crate::sim::cluster_checker::{payload, ClusterChecker};
use crate::sim::service::METHODS;
use bytes::Bytes;
use canopy_client::core::{Action, ClientCore, Event, Joined, LinkEvent};
use canopy_client::protocol::{self, CallFailure, PubSeq, PublisherId, Replies, Seq, SlowPolicy};
use std::collections::BTreeMap;
use std::time::Duration;

/// The topic every simulated publish goes to.
pub(super) const TOPIC: &str = "t";

/// The subscribing side of a client (pattern `>`): what it was handed, to
/// check against the stream. Its position is the core's.
#[derive(Debug)]
pub(super) struct Subscriber {
    pub weak: bool,
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
            since: Seq(0),
            log: BTreeMap::new(),
            gaps: Vec::new(),
            verified: Seq(0),
            resets: 0,
            diverged: 0,
        }
    }

    /// Weak: compares what was handed over through `agreed` with the
    /// stable stream.
    fn verify(
        &mut self,
        id: PublisherId,
        checker: &ClusterChecker,
        stream: u64,
        agreed: Option<Seq>,
    ) -> Result<(), Violation> {
        let Some(agreed) = agreed else {
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

/// A client of the core: the SDK's protocol core, with what it published
/// and was handed kept for the checks.
#[derive(Debug)]
pub(super) struct CoreClient {
    pub id: PublisherId,
    /// Its program: 0, and one more at each restart under the same id
    /// (payloads name it).
    pub program: u64,
    /// A restarted program publishes only from its first Welcome on, as
    /// the SDK's `connect` returns only then: its core learns there where
    /// the id stands.
    pub gated: bool,
    /// Its first pub_seq (first contact may start anywhere; a restarted
    /// program's is known at its last Welcome before it publishes).
    pub first: u64,
    /// The client protocol core the SDK runs.
    pub core: ClientCore,
    pub acked: PubSeq,
    /// Per stretch of acknowledgements: the last pub_seq and the stream it
    /// was acknowledged in.
    acked_in: Vec<(PubSeq, u64)>,
    pub sub: Option<Subscriber>,
    /// Its live connection (the world's index), if any.
    pub conn: Option<usize>,
    /// When its core's timer is armed in the world, if it is.
    pub armed: Option<Duration>,
    /// It calls the replicated service instead of publishing.
    pub caller: bool,
    /// Its calls, by pub_seq, and the replies each waits for.
    calls: BTreeMap<PubSeq, Replies>,
    /// Replies, with the stream the connection that brought each was in.
    pub replies: BTreeMap<PubSeq, (u64, Result<Bytes, CallFailure>)>,
}

impl CoreClient {
    /// A client that tries `servers` in this order first, and pings every
    /// `ping` when it hears nothing else.
    pub fn new(
        now: Duration,
        id: PublisherId,
        first: u64,
        sub: Option<bool>,
        (servers, ping): (Vec<String>, Duration),
        window: Option<u64>,
    ) -> Self {
        let weak = sub == Some(true);
        let config = link_config(id, servers, SlowPolicy::Disconnect, weak, ping, window);
        let mut core = ClientCore::new(now, config);
        core.start_pub_seq_at(first);
        if sub.is_some() {
            core.subscribe(">");
        }
        CoreClient {
            id,
            program: 0,
            gated: false,
            first,
            core,
            acked: PubSeq(0),
            acked_in: Vec::new(),
            sub: sub.map(Subscriber::new),
            conn: None,
            armed: None,
            caller: false,
            calls: BTreeMap::new(),
            replies: BTreeMap::new(),
        }
    }

    /// Its program restarted under the same publisher id at `now`, with the
    /// same settings: a new core that begins an incarnation as the SDK does
    /// for a fixed id, and publishes from its first Welcome on. The SDK
    /// takes the wall clock's seconds; here the clock has moved on to the
    /// incarnation after everything the old program published, as it has
    /// when a program restarts a second or more after its predecessor
    /// began. (Within that second, or with the clock stepped back, at a
    /// server whose table forgot the id, an acknowledgement can be taken
    /// for the wrong program's: the hole docs/DESIGN.md "What is not there
    /// yet" names. A clock behind the old program's pub_seqs shows it here.)
    /// A broken build's program begins no `incarnation`.
    pub fn restarted(&self, now: Duration, incarnation: bool) -> CoreClient {
        let program = self.program + 1;
        let mut core = ClientCore::new(now, self.core.link().config().clone());
        let clock = (self.core.next_pub_seq().0 >> PubSeq::INCARNATION_BITS) + 1;
        if incarnation {
            core.begin_incarnation(clock);
        }
        if self.sub.is_some() {
            core.subscribe(">");
        }
        CoreClient {
            id: self.id,
            program,
            gated: true,
            first: core.next_pub_seq().0,
            core,
            acked: PubSeq(0),
            acked_in: Vec::new(),
            sub: self.sub.as_ref().map(|s| Subscriber::new(s.weak)),
            conn: None,
            armed: None,
            caller: self.caller,
            calls: BTreeMap::new(),
            replies: BTreeMap::new(),
        }
    }

    /// Whether a connection serves (its Welcome arrived).
    pub fn welcomed(&self) -> bool {
        self.core.link().is_up()
    }

    /// The stream `pub_seq` was acknowledged in, if it was.
    pub fn acked_stream(&self, pub_seq: PubSeq) -> Option<u64> {
        self.acked_in
            .iter()
            .find(|(through, _)| *through >= pub_seq)
            .map(|&(_, stream)| stream)
    }

    /// A new publish, recorded as published (the core sends it when it
    /// can; its payload names it, as the checker expects).
    pub fn publish(&mut self, checker: &mut ClusterChecker) {
        let pub_seq = self.core.next_pub_seq();
        let payload = Bytes::from(payload(self.id, pub_seq, self.program));
        checker.published(self.id, pub_seq, self.program);
        if self.caller {
            // Every mode in turn; active calls wait for their server's
            // reply, every replica's or a majority's, in turn.
            let n = METHODS.len() as u64;
            let (method, mode) = METHODS[(pub_seq.0 % n) as usize];
            let replies = match (mode, pub_seq.0 / n % 3) {
                (Mode::Active, 1) => Replies::All,
                (Mode::Active, 2) => Replies::Majority,
                _ => Replies::Own,
            };
            self.calls.insert(pub_seq, replies);
            self.core.call_with(method, replies, &payload);
        } else {
            self.core.publish(TOPIC, &payload);
        }
    }

    /// Whether `pub_seq` was a call.
    pub fn is_call(&self, pub_seq: PubSeq) -> bool {
        self.calls.contains_key(&pub_seq)
    }

    /// The replies call `pub_seq` waits for.
    pub fn replies_of(&self, pub_seq: PubSeq) -> Replies {
        self.calls.get(&pub_seq).copied().unwrap_or_default()
    }

    /// The next action for the world.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.core.poll_action()
    }

    /// Marks everything through `pub_seq` acknowledged in the current
    /// connection's stream, which must hold it as this program's publish.
    /// (A restarted program's first Welcome acknowledges its
    /// predecessors' publishes, below its own.)
    fn acknowledge(&mut self, pub_seq: PubSeq, checker: &ClusterChecker) -> Result<u64, Violation> {
        if pub_seq <= self.acked || pub_seq.0 < self.first {
            return Ok(0);
        }
        let stream = self.core.stream().unwrap_or_default();
        let program = checker.program_of(stream, (self.id, pub_seq));
        if program != Some(self.program) {
            return Err(Violation(format!(
                "acknowledgement: publisher {} (program {}) was told pub_seq {} is ordered in stream {stream:x}, but it is not there as its publish (there as program {program:?}'s; found at {:?}; forgotten by a table at {:?})",
                self.id.0,
                self.program,
                pub_seq.0,
                checker.find(self.id, pub_seq),
                checker.forgotten.get(&self.id)
            )));
        }
        let newly = pub_seq.0 - self.acked.0.max(self.first.saturating_sub(1));
        self.acked = pub_seq;
        self.acked_in.push((pub_seq, stream));
        Ok(newly)
    }

    /// Handles one frame from the server; returns how many publishes it
    /// acknowledged.
    pub fn on_frame(
        &mut self,
        now: Duration,
        content: Bytes,
        checker: &ClusterChecker,
    ) -> Result<u64, Violation> {
        let id = self.id;
        let frame = protocol::decode_server(content)
            .map_err(|e| Violation(format!("client {}: undecodable frame: {e}", id.0)))?;
        if let Some(delivery) = self.core.handle_frame(now, frame) {
            let Some(s) = &mut self.sub else {
                return Err(Violation(format!(
                    "client {}: a delivery to a client that subscribed to nothing",
                    id.0
                )));
            };
            let (stream, _) = self.core.position().at().unwrap_or_default();
            for m in &delivery.messages {
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
            }
            self.core.take(delivery.commit);
            // Read at once: flow control grants the room back.
            self.core.set_outstanding(0);
        }
        let mut acked = 0;
        while let Some(event) = self.core.poll_event() {
            match event {
                Event::Welcomed { welcome, joined } => {
                    // Its incarnation stands past the id's publishes now;
                    // until it publishes, each Welcome may move it further
                    // (one that knows more of its predecessors').
                    if self.gated || (self.acked == PubSeq(0) && self.core.unacked_len() == 0) {
                        self.gated = false;
                        self.first = self.core.next_pub_seq().0;
                    }
                    if let Some(s) = self.sub.as_mut().filter(|_| joined != Joined::Resumed) {
                        s.resets += u64::from(joined == Joined::Reset);
                        s.since = welcome.head;
                        s.verified = welcome.head;
                        s.log.clear();
                        s.gaps.clear();
                    }
                }
                Event::Acked(through) => acked += self.acknowledge(through, checker)?,
                Event::Gap { from, to } => {
                    if let Some(s) = &mut self.sub {
                        s.gaps.push((from, to));
                    }
                }
                Event::Diverged { from, seen } => {
                    let Some(s) = &mut self.sub else {
                        continue;
                    };
                    let back = Seq(from.0.saturating_sub(1));
                    if back < s.verified {
                        return Err(Violation(format!(
                            "weak: client {} was told of a difference from seq {from} (seen at {seen}) after being told it was agreed through {}",
                            id.0, s.verified
                        )));
                    }
                    s.log.split_off(&from);
                    s.diverged += 1;
                }
                Event::Link(LinkEvent::Refused(e)) => {
                    return Err(Violation(format!("client {} was refused: {e}", id.0)));
                }
                // The simulated servers check nobody.
                Event::Denied { pattern, .. } => {
                    return Err(Violation(format!("client {} was denied {pattern}", id.0)));
                }
                Event::Replied { pub_seq, answer } => {
                    let stream = self.core.stream().unwrap_or_default();
                    if self.replies.insert(pub_seq, (stream, answer)).is_some() {
                        return Err(Violation(format!(
                            "replies: caller {} was answered call {} twice",
                            id.0, pub_seq.0
                        )));
                    }
                }
                Event::Link(LinkEvent::Lost { .. } | LinkEvent::Unreachable(_))
                | Event::Subscribed(_)
                | Event::Members(_) => {}
            }
        }
        if let Some(s) = self.sub.as_mut().filter(|s| s.weak) {
            let (stream, _) = self.core.position().at().unwrap_or_default();
            s.verify(id, checker, stream, self.core.position().agreed())?;
        }
        Ok(acked)
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
        let Some((at_stream, at)) = self.core.position().at() else {
            return Err(Violation(format!(
                "liveness: subscriber {} never joined the stream",
                id.0
            )));
        };
        if at_stream != stream || at != head {
            return Err(Violation(format!(
                "liveness: subscriber {} stands at {at} of stream {at_stream:x}, the core at {head} of {stream:x} (connected: {}, credit it reckons its server has: {})",
                id.0,
                self.core.link().is_up(),
                self.core.credit()
            )));
        }
        if s.weak {
            s.verify(id, checker, stream, Some(head))?;
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
