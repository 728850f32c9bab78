//! One simulated run: a node, model clients, connections, faults.

use super::checker::{Checker, Violation};
use super::client::{Client, PING_NEVER};
use super::Rng;
use crate::core::{Node, NodeConfig, Output, SessionId};
use bytes::Bytes;
use canopy_client::core::Action;
use canopy_client::protocol::{self, SlowPolicy};
use canopy_client::topic::Pattern;
use std::collections::HashMap;
use std::time::Duration;

const TOPICS: [&str; 5] = ["a.x", "a.y", "b.x", "c", "a.x.z"];
const PATTERNS: [&str; 7] = [">", "a.>", "a.*", "b.x", "*.x", "c", "a.x"];
/// Publishes a client keeps in flight at most.
const WINDOW: usize = 16;
/// The node's address, as its clients know it.
const NODE_ADDR: &str = "node";
/// Steps in the faulty phase.
const FAULT_STEPS: u64 = 3000;
/// Steps allowed for convergence after faults stop.
const SETTLE_STEPS: u64 = 200_000;
/// Steps of 10 ms without a client reading anything after which the
/// clients are taken to have caught up...
const STALL_STEPS: u64 = 500;
/// ...and at most this many in all (a client cut and back again and
/// again reads forever).
const CATCH_UP_STEPS_MAX: u64 = 20_000;

/// What a run did, and a fingerprint of everything the clients saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Publishes created.
    pub published: u64,
    /// Connections broken by the simulator.
    pub breaks: u64,
    /// Sessions the node closed (slow consumers, idle, ...).
    pub closes: u64,
    /// Gap notices clients received.
    pub gaps: u64,
    /// Deliveries clients made.
    pub delivered: u64,
    /// Times the node paused a session out of credit (flow control).
    pub pauses: u64,
    /// A hash of every client's deliveries and gaps, for determinism.
    pub fingerprint: u64,
}

impl Outcome {
    /// Adds another run's counts (the fingerprint is left alone).
    pub fn add(&mut self, o: &Outcome) {
        self.published += o.published;
        self.breaks += o.breaks;
        self.closes += o.closes;
        self.gaps += o.gaps;
        self.delivered += o.delivered;
        self.pauses += o.pauses;
    }
}

struct Conn {
    client: usize,
    session: SessionId,
    link: super::Link,
}

struct World {
    seed: u64,
    rng: Rng,
    now: Duration,
    node: Node,
    clients: Vec<Client>,
    conns: Vec<Conn>,
    by_session: HashMap<SessionId, usize>,
    checker: Checker,
    queue_max: usize,
    delay_max_ms: u64,
    next_session: u64,
    stalled_until: Vec<Duration>,
    out: Outcome,
}

/// Runs seed `seed` to the end.
///
/// # Errors
/// The first broken guarantee, naming the seed.
pub fn run(seed: u64) -> Result<Outcome, Violation> {
    run_with(seed, crate::core::cltsvr::node::Bugs::default())
}

/// Runs seed `seed` against a node with deliberate `bugs`.
///
/// # Errors
/// As [`run`].
pub(crate) fn run_with(
    seed: u64,
    bugs: crate::core::cltsvr::node::Bugs,
) -> Result<Outcome, Violation> {
    let mut rng = Rng::new(seed);
    let config = NodeConfig {
        name: "sim".into(),
        stream: 7,
        frame_len_max: 4096 << rng.below(4),
        retention_count_max: 8 + rng.below(300) as usize,
        watermark_interval: Duration::from_millis(10 + rng.below(200)),
        idle_timeout: Duration::from_secs(3600),
        ..NodeConfig::default()
    };
    // The last client is an observer: subscribed to everything, never
    // broken, stalled or bounded, it learns every ordered message's seq, so
    // the checker can tell whether another client's gap covers a message.
    let n = 3 + rng.below(7) as usize;
    let observer = n - 1;
    let mut clients: Vec<Client> = (0..observer)
        .map(|id| {
            let patterns = (0..1 + rng.below(2))
                .map(|_| PATTERNS[rng.below(PATTERNS.len() as u64) as usize].to_owned())
                .collect();
            let slow = if rng.percent(25) {
                SlowPolicy::Conflate
            } else {
                SlowPolicy::Disconnect
            };
            // Half the clients with a window of a few messages.
            let window = rng.percent(50).then(|| 1 + rng.below(16));
            Client::new(
                id,
                patterns,
                slow,
                vec![NODE_ADDR.into()],
                PING_NEVER,
                window,
            )
        })
        .collect();
    clients.push(Client::new(
        observer,
        vec![">".into()],
        SlowPolicy::Disconnect,
        vec![NODE_ADDR.into()],
        PING_NEVER,
        None,
    ));
    let mut w = World {
        seed,
        queue_max: 2 + rng.below(30) as usize,
        delay_max_ms: 1 + rng.below(20),
        rng,
        now: Duration::ZERO,
        node: {
            let mut node = Node::new(Duration::ZERO, config);
            node.bugs = bugs;
            node
        },
        by_session: HashMap::new(),
        checker: Checker::new(n),
        clients,
        conns: Vec::new(),
        next_session: 1,
        stalled_until: vec![Duration::ZERO; n],
        out: Outcome::default(),
    };
    w.play().map_err(|Violation(v)| {
        Violation(format!(
            "seed {seed}: {v}\n  replay: CANOPY_SIM_SEED={seed} cargo test -p canopy-broker --lib sim::tests::replay -- --ignored --nocapture"
        ))
    })?;
    w.out.fingerprint = super::fingerprint(&w.checker, w.clients.len(), &mut w.out.delivered);
    w.out.pauses = w.node.stats().flow_pauses;
    Ok(w.out)
}

impl World {
    fn play(&mut self) -> Result<(), Violation> {
        for c in 0..self.clients.len() {
            self.run_client(c);
        }
        // Everyone joins before anything is published, so that every
        // acknowledged message is one each client should see.
        self.settle(|w| w.clients.iter().all(Client::welcomed), "initial joins")?;
        for _ in 0..FAULT_STEPS {
            self.fault_step()?;
        }
        self.stalled_until
            .iter_mut()
            .for_each(|t| *t = Duration::ZERO);
        self.settle(
            |w| {
                w.clients
                    .iter()
                    .all(|c| c.conn.is_some() && c.unacked_len() == 0)
                    && w.conns
                        .iter()
                        .all(|c| c.link.dead || (c.link.up.is_empty() && c.link.down.is_empty()))
            },
            "convergence after faults",
        )?;
        let patterns: Vec<Vec<Pattern>> = self
            .clients
            .iter()
            .map(|c| {
                c.patterns
                    .iter()
                    .filter_map(|p| Pattern::new(p).ok())
                    .collect()
            })
            .collect();
        // A few watermark periods more, and as long as clients are still
        // reading what they are owed (one with a window of a message or
        // two reads a long backlog from retention a grant at a time, far
        // slower than the faults left it behind); then nothing may be
        // missing. Reading has stopped when no client has taken a message
        // or a gap notice for `STALL_STEPS`.
        let until = self.now + Duration::from_secs(1);
        let (mut read, mut still) = (self.read_so_far(), 0);
        for _ in 0..CATCH_UP_STEPS_MAX {
            if self.now >= until && still >= STALL_STEPS {
                break;
            }
            if self.now >= until && self.checker.check_complete(&patterns).is_ok() {
                break;
            }
            self.tick(Duration::from_millis(10))?;
            self.deliver_due()?;
            let now_read = self.read_so_far();
            still = if now_read > read { 0 } else { still + 1 };
            read = now_read;
        }
        self.checker.check_complete(&patterns)
    }

    /// Messages and gap notices every client has taken so far.
    fn read_so_far(&self) -> usize {
        (0..self.clients.len())
            .map(|c| self.checker.seen(c).delivered.len() + self.checker.seen(c).gaps.len())
            .sum()
    }

    fn fault_step(&mut self) -> Result<(), Violation> {
        let r = self.rng.below(100);
        let c = self.rng.below(self.clients.len() as u64) as usize;
        match r {
            0..=29 => {
                if self.clients[c].unacked_len() < WINDOW {
                    let topic = TOPICS[self.rng.below(TOPICS.len() as u64) as usize];
                    self.clients[c].publish(topic, &mut self.checker);
                    self.out.published += 1;
                    self.run_client(c);
                }
            }
            30..=32 => {
                if let Some(conn) = self.clients[c].conn.filter(|_| c != self.observer()) {
                    self.out.breaks += 1;
                    self.break_conn(conn, true);
                }
            }
            33..=35 if c != self.observer() => {
                let ms = 20 + self.rng.below(400);
                self.stalled_until[c] = self.now + Duration::from_millis(ms);
            }
            36..=69 => self.deliver_due()?,
            _ => {
                let ms = 1 + self.rng.below(15);
                self.tick(Duration::from_millis(ms))?;
            }
        }
        Ok(())
    }

    /// Runs without faults or new publishes until `done` holds.
    fn settle(&mut self, done: impl Fn(&World) -> bool, what: &str) -> Result<(), Violation> {
        for _ in 0..SETTLE_STEPS {
            if done(self) {
                return Ok(());
            }
            self.deliver_due()?;
            self.tick(Duration::from_millis(5))?;
        }
        Err(Violation(format!(
            "no {what} within {SETTLE_STEPS} steps (liveness)"
        )))
    }

    fn observer(&self) -> usize {
        self.clients.len() - 1
    }

    /// Carries out client `c`'s actions: its connections go to the node.
    fn run_client(&mut self, c: usize) {
        while let Some(action) = self.clients[c].poll_action() {
            match action {
                Action::Connect(_) => self.connect(c),
                Action::Send(frame) => {
                    if let Some(conn) = self.clients[c].conn {
                        self.send_to_node(conn, frame);
                    }
                }
                Action::Disconnect => {
                    if let Some(conn) = self.clients[c].conn {
                        self.break_conn(conn, false);
                    }
                }
            }
        }
    }

    fn connect(&mut self, c: usize) {
        if let Some(conn) = self.clients[c].conn {
            self.break_conn(conn, false);
        }
        let session = SessionId(self.next_session);
        self.next_session += 1;
        self.conns.push(Conn {
            client: c,
            session,
            link: super::Link::new(),
        });
        let conn = self.conns.len() - 1;
        self.by_session.insert(session, conn);
        self.clients[c].conn = Some(conn);
        self.clients[c].resend_acked = self.rng.percent(50);
        self.node.handle_open(self.now, session);
        self.drain_node();
        self.clients[c].core.handle_connected(self.now);
    }

    fn send_to_node(&mut self, conn: usize, frame: Bytes) {
        let link = &mut self.conns[conn].link;
        if !link.dead && !link.closed_by_server {
            link.push((self.seed, conn, self.delay_max_ms), self.now, false, frame);
        }
    }

    /// Ends `conn`: the node is told, and the client if `tell` (not when
    /// it closed the connection itself). Its next connection takes a
    /// while to open: its core is not run until then.
    fn break_conn(&mut self, conn: usize, tell: bool) {
        let c = &mut self.conns[conn];
        if !c.link.kill() {
            return;
        }
        let (client, session) = (c.client, c.session);
        self.node.handle_closed(self.now, session);
        self.drain_node();
        self.clients[client].conn = None;
        if tell {
            self.clients[client].core.handle_closed(self.now);
        }
        let ms = 1 + self.rng.below(100);
        self.clients[client].held_until = Some(self.now + Duration::from_millis(ms));
    }

    fn drain_node(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Transmit {
                    session,
                    frame,
                    kind,
                    seqs,
                } => {
                    let Some(&conn) = self.by_session.get(&session) else {
                        continue;
                    };
                    let bounded = self.conns[conn].client != self.observer();
                    let link = &mut self.conns[conn].link;
                    if link.dead {
                        continue;
                    }
                    if bounded && link.down.len() >= self.queue_max {
                        self.node.handle_queue_full(self.now, session, kind, seqs);
                    } else {
                        link.push((self.seed, conn, self.delay_max_ms), self.now, true, frame);
                    }
                }
                Output::Close {
                    session,
                    frame,
                    drain,
                } => {
                    let Some(&conn) = self.by_session.get(&session) else {
                        continue;
                    };
                    self.out.closes += 1;
                    self.conns[conn].link.close(self.now, frame, drain);
                }
            }
        }
    }

    /// Moves every frame whose time has come, in time order per connection.
    fn deliver_due(&mut self) -> Result<(), Violation> {
        for conn in 0..self.conns.len() {
            while let Some(content) = self.conns[conn].link.pop_due(self.now, false) {
                let session = self.conns[conn].session;
                match protocol::decode_client(content) {
                    Ok(frame) => self.node.handle_frame(self.now, session, frame),
                    Err(e) => {
                        return Err(Violation(format!("the model client sent a bad frame: {e}")))
                    }
                }
                self.drain_node();
            }
            let client = self.conns[conn].client;
            while self.stalled_until[client] <= self.now {
                let Some(content) = self.conns[conn].link.pop_due(self.now, true) else {
                    break;
                };
                let before = self.checker.seen(client).gaps.len();
                let mut replies = Vec::new();
                self.clients[client].on_frame(
                    self.now,
                    content,
                    &mut self.checker,
                    &mut replies,
                )?;
                self.out.gaps += (self.checker.seen(client).gaps.len() - before) as u64;
                for r in replies {
                    self.send_to_node(conn, r);
                }
                self.run_client(client);
                if self.clients[client].conn != Some(conn) {
                    break;
                }
            }
            let link = &self.conns[conn].link;
            if link.close_heard() {
                // The client read the last frame and then the close.
                self.break_conn(conn, true);
            }
        }
        Ok(())
    }

    fn tick(&mut self, by: Duration) -> Result<(), Violation> {
        self.now += by;
        if self.node.poll_timeout().is_some_and(|t| t <= self.now) {
            self.node.handle_timeout(self.now);
            self.drain_node();
        }
        for c in 0..self.clients.len() {
            if self.clients[c].tick(self.now) {
                self.run_client(c);
            }
        }
        Ok(())
    }
}
