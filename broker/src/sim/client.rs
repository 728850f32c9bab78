//! A client of the node and tree simulators: the SDK's own protocol core
//! ([`ClientCore`]: resume by position with the running-hash check, resend
//! what is unacknowledged, drop what it already has, the attempt order and
//! backoff), with what it published and was handed reported to the checker.

use super::checker::{Checker, Violation};
use bytes::Bytes;
use canopy_client::core::{Action, ClientCore, Event, FirstOrder, Joined, LinkConfig, LinkEvent};
use canopy_client::protocol::{self, PubSeq, PublisherId, Reports, Role, ServerFrame, SlowPolicy};
use std::collections::VecDeque;
use std::time::Duration;

/// A ping period longer than a run, for the simulators whose connections
/// never go silent (they end connections themselves: a crash resets them).
pub(super) const PING_NEVER: Duration = Duration::from_secs(3600);

/// The settings of a simulated client's core: an SDK client's, but for its
/// ping period, `ping` (and so how soon it finds a silent connection), and
/// its receive window, `window` (the simulators' are small, so that flow
/// control pauses and resumes sessions all the time).
pub(super) fn link_config(
    publisher: PublisherId,
    servers: Vec<String>,
    slow: SlowPolicy,
    weak: bool,
    ping: Duration,
    window: Option<u64>,
) -> LinkConfig {
    LinkConfig {
        name: format!("sim-{}", publisher.0),
        publisher,
        servers,
        role: Role::Client,
        reports: Reports::Servers,
        slow,
        weak,
        ping_interval: ping,
        connect_timeout: Duration::from_secs(5),
        reconnect_for: None,
        first_order: FirstOrder::Configured,
        credentials: None,
        receive_window: window,
    }
}

pub struct Client {
    pub id: usize,
    /// Its index in the checker: a restarted program is a new client there.
    checker_id: usize,
    /// Restarts of its program so far (its payloads name it).
    incarnation: u64,
    /// Its core's settings, for a restart.
    config: LinkConfig,
    /// Its program has had a Welcome: as the SDK's `connect`, it publishes
    /// only then (a restarted one learns there where its id stands).
    pub started: bool,
    pub publisher: PublisherId,
    pub patterns: Vec<String>,
    /// The client protocol core the SDK runs.
    pub core: ClientCore,
    /// The index of its live connection in the world, if connected.
    pub conn: Option<usize>,
    /// Its publishes not acknowledged yet, with their frames.
    sent: VecDeque<(PubSeq, Bytes)>,
    /// The last few acknowledged publishes' frames, kept to retry on purpose.
    acked_tail: VecDeque<Bytes>,
    /// On the next Welcome, also resend `acked_tail`, as a client that lost
    /// its acknowledgements would: the server must not order them again.
    pub resend_acked: bool,
    /// The world holds the client's core back until then (a connection
    /// takes a while to open; the tree's clients wait for the relays).
    pub held_until: Option<Duration>,
    /// Messages handed to the application and not read yet: it reads half
    /// of them at every tick (a reader slower than a burst), and flow
    /// control grants the server room as it does.
    unread: u64,
}

impl Client {
    /// A client of `servers` (tried in this order first) that pings every
    /// `ping` when it hears nothing else, with a receive window of `window`
    /// messages if any.
    pub fn new(
        id: usize,
        patterns: Vec<String>,
        slow: SlowPolicy,
        servers: Vec<String>,
        ping: Duration,
        window: Option<u64>,
    ) -> Self {
        let publisher = PublisherId(1000 + id as u64);
        let config = link_config(publisher, servers, slow, false, ping, window);
        let mut core = ClientCore::new(Duration::ZERO, config.clone());
        for p in &patterns {
            core.subscribe(p);
        }
        Client {
            id,
            checker_id: id,
            incarnation: 0,
            config,
            started: false,
            publisher,
            patterns,
            core,
            conn: None,
            sent: VecDeque::new(),
            acked_tail: VecDeque::new(),
            resend_acked: false,
            held_until: None,
            unread: 0,
        }
    }

    /// Its program restarts under the same publisher id at `now`: a new
    /// core that begins an incarnation, what it had not acknowledged
    /// abandoned, and a new client for the checker. The world has dealt
    /// with its connection.
    pub fn restart(&mut self, now: Duration, checker: &mut Checker) {
        self.core = ClientCore::new(now, self.config.clone());
        for p in &self.patterns {
            self.core.subscribe(p);
        }
        self.checker_id = checker.restarted(self.checker_id);
        self.incarnation += 1;
        // As the SDK does for a fixed id, with the restart count for the
        // wall clock's seconds.
        self.core.begin_incarnation(self.incarnation);
        self.started = false;
        self.conn = None;
        self.sent.clear();
        self.acked_tail.clear();
        self.resend_acked = false;
        self.unread = 0;
    }

    /// Its index in the checker.
    pub fn checker_id(&self) -> usize {
        self.checker_id
    }

    /// Whether a connection serves (its Welcome arrived).
    pub fn welcomed(&self) -> bool {
        self.core.link().is_up()
    }

    /// Time has reached `now`: runs the core's timer if it is due, unless
    /// the world holds the client back. Returns whether the core ran (its
    /// actions are then to be carried out).
    pub fn tick(&mut self, now: Duration) -> bool {
        if self.held_until.is_some_and(|t| t > now) {
            return false;
        }
        self.held_until = None;
        if self.core.poll_timeout().is_some_and(|t| t <= now) {
            self.core.handle_timeout(now);
        }
        if self.unread > 0 {
            self.unread /= 2;
            self.core.set_outstanding(self.unread);
        }
        true
    }

    /// Publishes not acknowledged yet.
    pub fn unacked_len(&self) -> usize {
        self.core.unacked_len()
    }

    /// A new publish (the core sends it once welcomed).
    pub fn publish(&mut self, topic: &str, checker: &mut Checker) {
        let pub_seq = self.core.next_pub_seq();
        let payload = format!("{}:{}:{}", self.publisher.0, pub_seq.0, self.incarnation);
        let payload = Bytes::from(payload);
        checker.published(self.publisher, pub_seq, topic, &payload);
        self.core.publish(topic, &payload);
        let frame = protocol::encode_publish(topic, pub_seq, &payload);
        self.sent.push_back((pub_seq, frame));
    }

    /// The next action for the world.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.core.poll_action()
    }

    /// Handles one frame from the server; frames the model adds (retries
    /// of acknowledged publishes) go to `out`, before the core's actions.
    pub fn on_frame(
        &mut self,
        now: Duration,
        content: Bytes,
        checker: &mut Checker,
        out: &mut Vec<Bytes>,
    ) -> Result<(), Violation> {
        let frame = protocol::decode_server(content)
            .map_err(|e| Violation(format!("client {}: undecodable server frame: {e}", self.id)))?;
        if matches!(frame, ServerFrame::Welcome(_)) && self.resend_acked {
            out.extend(self.acked_tail.iter().cloned());
        }
        if let Some(delivery) = self.core.handle_frame(now, frame) {
            for m in &delivery.messages {
                checker.delivered(
                    self.checker_id,
                    m.seq,
                    m.publisher,
                    m.pub_seq,
                    m.topic(),
                    &m.payload,
                )?;
            }
            self.core.take(delivery.commit);
            self.unread += delivery.messages.len() as u64;
            self.core.set_outstanding(self.unread);
        }
        while let Some(event) = self.core.poll_event() {
            match event {
                Event::Welcomed {
                    joined: Joined::Reset,
                    ..
                } => {
                    return Err(Violation(format!("client {}: the stream changed", self.id)));
                }
                Event::Acked(through) => self.acknowledge(through, checker),
                Event::Welcomed { welcome, .. } => {
                    self.started = true;
                    checker.joined(self.checker_id, welcome.head);
                }
                Event::Gap { from, to } => checker.gap(self.checker_id, from, to),
                // A strong client told of divergence is refused by its core.
                Event::Link(LinkEvent::Refused(e)) => {
                    return Err(Violation(format!("client {} was refused: {e}", self.id)));
                }
                // The simulated servers check nobody.
                Event::Denied { pattern, .. } => {
                    return Err(Violation(format!(
                        "client {} was denied {pattern}",
                        self.id
                    )));
                }
                Event::Subscribed(_)
                | Event::Diverged { .. }
                | Event::Members(_)
                | Event::Replied { .. }
                | Event::Link(LinkEvent::Lost { .. } | LinkEvent::Unreachable(_)) => {}
            }
        }
        Ok(())
    }

    fn acknowledge(&mut self, through: PubSeq, checker: &mut Checker) {
        while self.sent.front().is_some_and(|(p, _)| *p <= through) {
            if let Some((pub_seq, frame)) = self.sent.pop_front() {
                checker.acked(self.publisher, pub_seq);
                if self.acked_tail.len() == 4 {
                    self.acked_tail.pop_front();
                }
                self.acked_tail.push_back(frame);
            }
        }
    }
}
