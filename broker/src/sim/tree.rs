//! The tree simulator: a root server, one or two tiers of relays, and model
//! clients at the leaves, joined by simulated connections.
//!
//! It drives the CLTSVR layer above "the group below": relays are
//! [`Server::relay`]s whose [`Upstream`] connects, as a client, to the tier
//! above. The root is a single ordering server (the core group has a
//! simulator of its own, [`super::cluster`]), so the runs here are about
//! relays: forwarding publishes under their clients' ids, resuming the
//! stream after a broken upstream connection, adoption of orphans when a
//! relay crashes, and relays adopting each other's tier above.
//!
//! One `u64` seed fixes the tree's shape (a tier of 2 or 3 relays, and
//! maybe a second tier of 2), the limits (small retention, to reach gap
//! notices), the clients, the workload and the faults: broken client
//! connections, broken relay upstream connections, relay crashes and
//! restarts (one relay of a tier down at a time, so orphans have an
//! adopter), and delays. Frames travel encoded, FIFO per connection.
//!
//! The [`Checker`] checks guarantees 1–3 at every model client after every
//! step; once faults stop, every relay is restarted, and every
//! acknowledged publish must reach every client that matches it or be
//! covered by a gap notice (guarantees 5 and 8 at the clients).

use super::checker::{Checker, Violation};
use super::client::Client;
use super::Rng;
use crate::core::cltsvr::upstream::{Action, Upstream, UpstreamConfig};
use crate::core::{Node, NodeConfig, Output, Server, SessionId};
use bytes::Bytes;
use canopy_client::protocol::{self, PublisherId, SlowPolicy};
use canopy_client::topic::Pattern;
use std::collections::HashMap;
use std::time::Duration;

const TOPICS: [&str; 4] = ["a.x", "a.y", "b.x", "c"];
const PATTERNS: [&str; 5] = [">", "a.>", "*.x", "c", "a.x"];
/// Publishes a client keeps in flight at most.
const WINDOW: usize = 16;
/// Steps in the faulty phase.
const FAULT_STEPS: u64 = 3000;
/// Steps allowed for convergence after faults stop.
const SETTLE_STEPS: u64 = 20_000;
/// Clients and relays ping this often when they hear nothing else, and
/// count a connection dead after three such periods of silence; servers
/// close sessions silent for `SESSION_IDLE`. (Short, so that a silent
/// connection, which nothing else ends, is found within a run.)
const PING: Duration = Duration::from_millis(250);
const SESSION_IDLE: Duration = Duration::from_millis(1000);
/// Frames queued towards a relay before it counts as slow.
const RELAY_QUEUE_MAX: usize = 256;

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TreeOutcome {
    /// Publishes created.
    pub published: u64,
    /// Client connections broken by the simulator.
    pub client_breaks: u64,
    /// Relay upstream connections broken by the simulator.
    pub upstream_breaks: u64,
    /// Client connections gone silent one way or both, without a close.
    pub client_silences: u64,
    /// Relay upstream connections gone silent the same way.
    pub upstream_silences: u64,
    /// Relays crashed.
    pub crashes: u64,
    /// Client programs restarted under their own publisher ids.
    pub client_restarts: u64,
    /// Gap notices clients received.
    pub gaps: u64,
    /// Deliveries clients made.
    pub delivered: u64,
    /// A hash of every client's deliveries and gaps, for determinism.
    pub fingerprint: u64,
}

impl TreeOutcome {
    /// Adds another run's counts (the fingerprint is left alone).
    pub fn add(&mut self, o: &TreeOutcome) {
        self.published += o.published;
        self.client_breaks += o.client_breaks;
        self.upstream_breaks += o.upstream_breaks;
        self.client_silences += o.client_silences;
        self.upstream_silences += o.upstream_silences;
        self.crashes += o.crashes;
        self.client_restarts += o.client_restarts;
        self.gaps += o.gaps;
        self.delivered += o.delivered;
    }
}

/// Who is at the client end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Client(usize),
    /// A relay's connection to the tier above.
    Relay(usize),
}

struct Conn {
    peer: Peer,
    server: usize,
    session: SessionId,
    link: super::Link,
}

struct Srv {
    /// `None` while crashed.
    server: Option<Server>,
    /// For a relay: its open connection to the tier above.
    up_conn: Option<usize>,
    /// For a relay: the addresses of the tier above.
    upstream: Vec<String>,
    restarts: u64,
    restart_at: Option<Duration>,
}

struct World {
    seed: u64,
    rng: Rng,
    now: Duration,
    srvs: Vec<Srv>,
    /// Relay indices per tier, top down.
    tiers: Vec<Vec<usize>>,
    clients: Vec<Client>,
    conns: Vec<Conn>,
    by_session: HashMap<(usize, SessionId), usize>,
    checker: Checker,
    next_session: u64,
    queue_max: usize,
    delay_max_ms: u64,
    retention: usize,
    bugs: TreeBugs,
    out: TreeOutcome,
}

/// Deliberate relay bugs, for the tests that prove the checks catch them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TreeBugs {
    /// Relays do not send their held forwards again after reconnecting.
    pub no_resend: bool,
    /// A relay that starts its stream from a report forgets the running
    /// hash there (its chain starts from 0): clients that move between
    /// relays started at different times are told their stream diverged.
    pub forget_snapshot_hash: bool,
}

fn addr(server: usize) -> String {
    format!("s{server}")
}

fn index(addr: &str) -> Option<usize> {
    addr.strip_prefix('s')?.parse().ok()
}

/// Runs seed `seed` to the end.
///
/// # Errors
/// The first broken guarantee, naming the seed and how to replay it.
pub fn run(seed: u64) -> Result<TreeOutcome, Violation> {
    run_with(seed, TreeBugs::default())
}

/// Runs seed `seed` with relays that have `bugs`.
///
/// # Errors
/// As [`run`].
pub(crate) fn run_with(seed: u64, bugs: TreeBugs) -> Result<TreeOutcome, Violation> {
    let mut rng = Rng::new(seed);
    let first = 2 + rng.below(2) as usize;
    let second = if rng.percent(50) { 2 } else { 0 };
    let mut tiers = vec![(1..=first).collect::<Vec<usize>>()];
    if second > 0 {
        tiers.push((first + 1..=first + second).collect());
    }
    let leaves: Vec<String> = tiers[tiers.len() - 1].iter().map(|&i| addr(i)).collect();
    let n = 3 + rng.below(5) as usize;
    let observer = n;
    // Clients use the leaf tier, in an order rotated per client.
    let mut clients: Vec<Client> = (0..n)
        .map(|id| {
            let patterns = vec![PATTERNS[rng.below(PATTERNS.len() as u64) as usize].to_owned()];
            let mut home = leaves.clone();
            home.rotate_left(id % leaves.len());
            // Half the clients with a window of a few messages, at the
            // relay (or root) they attach to.
            let window = rng.percent(50).then(|| 1 + rng.below(16));
            Client::new(id, patterns, SlowPolicy::Disconnect, home, PING, window)
        })
        .collect();
    // The observer, at the root, subscribed to everything and never broken,
    // learns every seq, so the checker can tell what a gap covers.
    clients.push(Client::new(
        observer,
        vec![">".into()],
        SlowPolicy::Disconnect,
        vec![addr(0)],
        PING,
        None,
    ));
    // Clients start once the relays have their stream.
    for c in &mut clients {
        c.held_until = Some(Duration::MAX);
    }
    let mut w = World {
        seed,
        now: Duration::ZERO,
        srvs: Vec::new(),
        tiers,
        checker: Checker::new(n + 1),
        clients,
        conns: Vec::new(),
        by_session: HashMap::new(),
        next_session: 1,
        queue_max: 4 + rng.below(30) as usize,
        delay_max_ms: 1 + rng.below(10),
        retention: 50 + rng.below(500) as usize,
        bugs,
        rng,
        out: TreeOutcome::default(),
    };
    w.build();
    w.play().map_err(|Violation(v)| {
        Violation(format!(
            "seed {seed}: {v}\n  replay: CANOPY_SIM_SEED={seed} cargo test -p canopy-broker --lib sim::tree_tests::replay -- --ignored --nocapture"
        ))
    })?;
    w.out.fingerprint = super::fingerprint(&w.checker, w.checker.clients(), &mut w.out.delivered);
    Ok(w.out)
}

impl World {
    fn node_config(&self, i: usize) -> NodeConfig {
        NodeConfig {
            name: addr(i),
            stream: 7,
            retention_count_max: self.retention,
            watermark_interval: Duration::from_millis(50),
            idle_timeout: SESSION_IDLE,
            // Servers publish their membership events under their ids: keep
            // them apart from the model clients' (1000 + client).
            id: PublisherId(
                1 << 32 | (i as u64) << 16 | self.srvs.get(i).map_or(0, |s| s.restarts),
            ),
            ..NodeConfig::default()
        }
    }

    fn build(&mut self) {
        let root = Server::standalone(Node::new(self.now, self.node_config(0)));
        self.srvs.push(Srv {
            server: Some(root),
            up_conn: None,
            upstream: Vec::new(),
            restarts: 0,
            restart_at: None,
        });
        for t in 0..self.tiers.len() {
            let upstream: Vec<String> = match t {
                0 => vec![addr(0)],
                _ => self.tiers[t - 1].iter().map(|&i| addr(i)).collect(),
            };
            for _ in 0..self.tiers[t].len() {
                self.srvs.push(Srv {
                    server: None,
                    up_conn: None,
                    upstream: upstream.clone(),
                    restarts: 0,
                    restart_at: None,
                });
                let i = self.srvs.len() - 1;
                self.boot(i);
            }
        }
    }

    /// Starts relay `i` afresh (a new incarnation: a new id, empty state).
    fn boot(&mut self, i: usize) {
        let config = self.node_config(i);
        let mut up = UpstreamConfig::new(addr(i), config.id, self.srvs[i].upstream.clone());
        up.forwards_max = 64;
        up.ping_interval = PING;
        let mut upstream = Upstream::new(self.now, up);
        upstream.bug_no_resend = self.bugs.no_resend;
        let mut node = Node::new_grouped(self.now, config);
        node.bugs.forget_snapshot_hash = self.bugs.forget_snapshot_hash;
        let relay = Server::relay(node, upstream);
        self.srvs[i].server = Some(relay);
        self.srvs[i].up_conn = None;
        self.srvs[i].restart_at = None;
    }

    fn play(&mut self) -> Result<(), Violation> {
        // Relays first get their stream, then every client joins, before
        // anything is published.
        self.settle(|w| w.all_synced(), "relays syncing")?;
        for c in 0..self.clients.len() {
            self.clients[c].held_until = None;
            self.run_client(c);
        }
        self.settle(|w| w.clients.iter().all(Client::welcomed), "initial joins")?;
        for _ in 0..FAULT_STEPS {
            self.fault_step()?;
        }
        for i in 1..self.srvs.len() {
            if self.srvs[i].server.is_none() {
                self.srvs[i].restarts += 1;
                self.boot(i);
            }
        }
        self.settle(
            |w| {
                w.all_synced()
                    && w.clients
                        .iter()
                        .all(|c| c.conn.is_some() && c.welcomed() && c.unacked_len() == 0)
                    && w.conns.iter().all(|c| c.link.settled())
            },
            "convergence after faults",
        )?;
        let until = self.now + Duration::from_secs(1);
        while self.now < until {
            self.tick(Duration::from_millis(10))?;
            self.deliver_due()?;
        }
        // By the checker's clients: a restarted program is a new one.
        let mut patterns: Vec<Vec<Pattern>> = vec![Vec::new(); self.checker.clients()];
        for c in &self.clients {
            patterns[c.checker_id()] = c
                .patterns
                .iter()
                .filter_map(|p| Pattern::new(p).ok())
                .collect();
        }
        self.checker.check_complete(&patterns)?;
        self.check_membership()
    }

    /// Once everything has converged, every server holds the same
    /// membership (it is a function of the one stream), and it lists every
    /// model client at the server it is connected to.
    fn check_membership(&self) -> Result<(), Violation> {
        let report = |i: usize| {
            self.srvs[i]
                .server
                .as_ref()
                .map(|s| s.node().members().report(canopy_client::protocol::Seq(0)))
        };
        let root = report(0);
        for i in 1..self.srvs.len() {
            if report(i) != root {
                return Err(Violation(format!(
                    "s{i}'s membership differs from the root's:\n  s{i}: {:?}\n  root: {root:?}",
                    report(i)
                )));
            }
        }
        let Some(root) = root else {
            return Ok(());
        };
        for c in &self.clients {
            let Some(conn) = c.conn else { continue };
            let at = self.conns[conn].server;
            let server = self.srvs[at].server.as_ref().map(|s| s.node().config().id);
            let listed = root.joined.iter().find(|e| e.id == c.publisher);
            if listed.map(|e| e.server) != server {
                return Err(Violation(format!(
                    "client {} is at s{at} but listed as {listed:?}",
                    c.id
                )));
            }
        }
        Ok(())
    }

    fn all_synced(&self) -> bool {
        self.srvs[1..].iter().all(|s| {
            s.server
                .as_ref()
                .and_then(Server::upstream)
                .is_some_and(|u| u.is_synced() && u.is_up())
        })
    }

    fn fault_step(&mut self) -> Result<(), Violation> {
        let r = self.rng.below(100);
        let c = self.rng.below(self.clients.len() as u64 - 1) as usize;
        match r {
            0..=29 => {
                if self.clients[c].started && self.clients[c].unacked_len() < WINDOW {
                    let topic = TOPICS[self.rng.below(TOPICS.len() as u64) as usize];
                    self.clients[c].publish(topic, &mut self.checker);
                    self.out.published += 1;
                    self.run_client(c);
                }
            }
            30 => {
                if let Some(conn) = self.clients[c].conn {
                    self.out.client_breaks += 1;
                    self.break_conn(conn, true);
                }
            }
            // A connection goes silent one way or both, for good: only the
            // missed-pings rule of the client (or of the relay below) and
            // the server's idle timeout end it.
            31 => {
                let way = self.rng.below(3);
                if let Some(conn) = self.clients[c].conn {
                    self.out.client_silences += 1;
                    self.conns[conn].link.silence(way != 1, way != 0);
                }
            }
            32 => {
                let i = 1 + self.rng.below(self.srvs.len() as u64 - 1) as usize;
                if let Some(conn) = self.srvs[i].up_conn {
                    self.out.upstream_breaks += 1;
                    self.break_conn(conn, true);
                }
            }
            33 => {
                let i = 1 + self.rng.below(self.srvs.len() as u64 - 1) as usize;
                let way = self.rng.below(3);
                if let Some(conn) = self.srvs[i].up_conn {
                    self.out.upstream_silences += 1;
                    self.conns[conn].link.silence(way != 1, way != 0);
                }
            }
            34 => self.crash_one(),
            35 => self.restart_client(c),
            36..=69 => self.deliver_due()?,
            _ => {
                let ms = 1 + self.rng.below(15);
                self.tick(Duration::from_millis(ms))?;
            }
        }
        Ok(())
    }

    /// Client `c`'s program is killed and started again under its own
    /// publisher id (docs/DESIGN.md, "Identity and resume"): its old
    /// connection closes, or goes silent toward it (what the old program
    /// sent still arrives, and only the relay's idle timeout ends the
    /// session); the new program connects a while later, its connections
    /// counted from 1 again.
    fn restart_client(&mut self, c: usize) {
        self.out.client_restarts += 1;
        if let Some(conn) = self.clients[c].conn {
            // (A session the server closed already is gone from it.)
            if self.rng.percent(50) || self.conns[conn].link.closed_by_server {
                self.break_conn(conn, false);
            } else {
                self.conns[conn].link.silence(false, true);
            }
        }
        self.clients[c].restart(self.now, &mut self.checker);
        let ms = 1 + self.rng.below(100);
        self.clients[c].held_until = Some(self.now + Duration::from_millis(ms));
    }

    /// Crashes a relay, if every tier keeps one running.
    fn crash_one(&mut self) {
        let t = self.rng.below(self.tiers.len() as u64) as usize;
        let tier = self.tiers[t].clone();
        if tier.iter().any(|&i| self.srvs[i].server.is_none()) {
            return;
        }
        let i = tier[self.rng.below(tier.len() as u64) as usize];
        self.out.crashes += 1;
        self.srvs[i].server = None;
        let ms = 50 + self.rng.below(500);
        self.srvs[i].restart_at = Some(self.now + Duration::from_millis(ms));
        for conn in 0..self.conns.len() {
            let c = &self.conns[conn];
            if !c.link.dead && (c.server == i || c.peer == Peer::Relay(i)) {
                self.break_conn(conn, true);
            }
        }
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
            "no {what} within {SETTLE_STEPS} steps (liveness); {}",
            self.state()
        )))
    }

    /// Where every relay and client stands, for a liveness failure.
    fn state(&self) -> String {
        let relays: Vec<String> = (1..self.srvs.len())
            .map(|i| {
                let u = self.srvs[i].server.as_ref().and_then(Server::upstream);
                format!(
                    "s{i}: synced {:?} up {:?} holding {:?} via {:?}",
                    u.map(|u| u.is_synced()),
                    u.map(|u| u.is_up()),
                    u.map(|u| u.forwards_held()),
                    self.srvs[i].up_conn.map(|c| self.conns[c].server)
                )
            })
            .collect();
        let clients: Vec<String> = self
            .clients
            .iter()
            .map(|c| {
                format!(
                    "c{}: at {:?} welcomed {} unacked {} (next attempt {:?}, held back until {:?})",
                    c.id,
                    c.conn.map(|k| self.conns[k].server),
                    c.welcomed(),
                    c.unacked_len(),
                    c.core.poll_timeout(),
                    c.held_until
                )
            })
            .collect();
        format!(
            "at {:?}: relays [{}]; clients [{}]",
            self.now,
            relays.join(", "),
            clients.join(", ")
        )
    }

    /// Carries out client `c`'s actions.
    fn run_client(&mut self, c: usize) {
        while let Some(action) = self.clients[c].poll_action() {
            match action {
                Action::Connect(a) => self.connect(c, &a),
                Action::Send(frame) => {
                    if let Some(conn) = self.clients[c].conn {
                        self.send_to_server(conn, frame);
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

    /// Connects client `c` to `a`, if that server is running; a server
    /// that is not refuses at once.
    fn connect(&mut self, c: usize, a: &str) {
        if let Some(conn) = self.clients[c].conn {
            self.break_conn(conn, false);
        }
        let Some(server) = index(a).filter(|&i| self.srvs[i].server.is_some()) else {
            return self.clients[c].core.handle_closed(self.now);
        };
        let conn = self.open(Peer::Client(c), server);
        self.clients[c].conn = Some(conn);
        self.clients[c].resend_acked = self.rng.percent(50);
        self.clients[c].core.handle_connected(self.now);
    }

    fn open(&mut self, peer: Peer, server: usize) -> usize {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        self.conns.push(Conn {
            peer,
            server,
            session,
            link: super::Link::new(),
        });
        let conn = self.conns.len() - 1;
        self.by_session.insert((server, session), conn);
        if let Some(s) = self.srvs[server].server.as_mut() {
            s.handle_open(self.now, session);
        }
        self.drain(server);
        conn
    }

    fn send_to_server(&mut self, conn: usize, frame: Bytes) {
        let link = &mut self.conns[conn].link;
        if !link.dead && !link.closed_by_server {
            link.push((self.seed, conn, self.delay_max_ms), self.now, false, frame);
        }
    }

    /// Ends `conn`: both ends are told (a client not if it closed the
    /// connection itself: `tell` false).
    fn break_conn(&mut self, conn: usize, tell: bool) {
        let c = &mut self.conns[conn];
        if !c.link.kill() {
            return;
        }
        let (peer, server, session) = (c.peer, c.server, c.session);
        if let Some(s) = self.srvs[server].server.as_mut() {
            s.handle_closed(self.now, session);
            s.end_batch(self.now);
        }
        self.drain(server);
        match peer {
            // Its program restarted since.
            Peer::Client(c) if self.clients[c].conn != Some(conn) => {}
            Peer::Client(c) => {
                self.clients[c].conn = None;
                if tell {
                    self.clients[c].core.handle_closed(self.now);
                }
                // Its next connection takes a while to open: its core is
                // not run until then.
                let ms = 1 + self.rng.below(100);
                self.clients[c].held_until = Some(self.now + Duration::from_millis(ms));
            }
            Peer::Relay(r) => {
                if self.srvs[r].up_conn == Some(conn) {
                    self.srvs[r].up_conn = None;
                    if let Some(s) = self.srvs[r].server.as_mut() {
                        s.handle_upstream_closed(self.now);
                    }
                    self.drain(r);
                }
            }
        }
    }

    /// Executes server `i`'s outputs and, for a relay, its upstream actions.
    fn drain(&mut self, i: usize) {
        loop {
            let Some(s) = self.srvs[i].server.as_mut() else {
                return;
            };
            if let Some(out) = s.poll_output() {
                self.output(i, out);
                continue;
            }
            let Some(action) = s.poll_upstream() else {
                return;
            };
            match action {
                Action::Connect(a) => {
                    // (An upstream connects only when down: nothing to drop.)
                    self.drop_up_conn(i);
                    match index(&a).filter(|&t| self.srvs[t].server.is_some()) {
                        Some(t) => {
                            let conn = self.open(Peer::Relay(i), t);
                            self.srvs[i].up_conn = Some(conn);
                            if let Some(s) = self.srvs[i].server.as_mut() {
                                s.handle_upstream_connected(self.now);
                            }
                        }
                        None => {
                            if let Some(s) = self.srvs[i].server.as_mut() {
                                s.handle_upstream_closed(self.now);
                            }
                        }
                    }
                }
                Action::Send(frame) => {
                    if let Some(conn) = self.srvs[i].up_conn {
                        self.send_to_server(conn, frame);
                    }
                }
                Action::Disconnect => self.drop_up_conn(i),
            }
        }
    }

    /// Ends relay `i`'s connection to the tier above, if any: the relay
    /// already knows; the tier above is told.
    fn drop_up_conn(&mut self, i: usize) {
        if let Some(conn) = self.srvs[i].up_conn.take() {
            self.conns[conn].link.kill();
            let (t, session) = (self.conns[conn].server, self.conns[conn].session);
            if let Some(s) = self.srvs[t].server.as_mut() {
                s.handle_closed(self.now, session);
            }
            self.drain(t);
        }
    }

    fn output(&mut self, i: usize, out: Output) {
        match out {
            Output::Transmit {
                session,
                frame,
                kind,
                seqs,
            } => {
                let Some(&conn) = self.by_session.get(&(i, session)) else {
                    return;
                };
                let max = match self.conns[conn].peer {
                    Peer::Relay(_) => RELAY_QUEUE_MAX,
                    Peer::Client(c) if c == self.clients.len() - 1 => usize::MAX,
                    Peer::Client(_) => self.queue_max,
                };
                let link = &mut self.conns[conn].link;
                if link.dead {
                    return;
                }
                if link.down.len() >= max {
                    if let Some(s) = self.srvs[i].server.as_mut() {
                        s.handle_queue_full(self.now, session, kind, seqs);
                    }
                } else {
                    link.push((self.seed, conn, self.delay_max_ms), self.now, true, frame);
                }
            }
            Output::Close {
                session,
                frame,
                drain,
            } => {
                let Some(&conn) = self.by_session.get(&(i, session)) else {
                    return;
                };
                self.conns[conn].link.close(self.now, frame, drain);
                if matches!(self.conns[conn].peer, Peer::Client(c) if self.clients[c].conn != Some(conn))
                {
                    // Its program restarted: nobody is left to hear it (the
                    // server forgot the session as it closed it).
                    self.conns[conn].link.kill();
                }
            }
        }
    }

    /// Moves every frame whose time has come, in time order per connection.
    fn deliver_due(&mut self) -> Result<(), Violation> {
        for conn in 0..self.conns.len() {
            while let Some(content) = self.conns[conn].link.pop_due(self.now, false) {
                let (server, session) = (self.conns[conn].server, self.conns[conn].session);
                let frame = protocol::decode_client(content)
                    .map_err(|e| Violation(format!("a bad frame to s{server}: {e}")))?;
                if let Some(s) = self.srvs[server].server.as_mut() {
                    s.handle_frame(self.now, session, frame);
                    s.end_batch(self.now);
                }
                self.drain(server);
            }
            while let Some(content) = self.conns[conn].link.pop_due(self.now, true) {
                match self.conns[conn].peer {
                    // To a program that restarted: lost with it.
                    Peer::Client(client) if self.clients[client].conn != Some(conn) => {}
                    Peer::Client(client) => {
                        let id = self.clients[client].checker_id();
                        let before = self.checker.seen(id).gaps.len();
                        let mut replies = Vec::new();
                        self.clients[client].on_frame(
                            self.now,
                            content,
                            &mut self.checker,
                            &mut replies,
                        )?;
                        self.out.gaps += (self.checker.seen(id).gaps.len() - before) as u64;
                        for r in replies {
                            self.send_to_server(conn, r);
                        }
                        self.run_client(client);
                        if self.clients[client].conn != Some(conn) {
                            break;
                        }
                    }
                    Peer::Relay(r) => {
                        let frame = protocol::decode_server(content)
                            .map_err(|e| Violation(format!("a bad frame to relay s{r}: {e}")))?;
                        if let Some(s) = self.srvs[r].server.as_mut() {
                            s.handle_upstream_frames(self.now, vec![frame]);
                        }
                        self.drain(r);
                    }
                }
            }
            let link = &self.conns[conn].link;
            if link.close_heard() {
                self.break_conn(conn, true);
            }
        }
        Ok(())
    }

    fn tick(&mut self, by: Duration) -> Result<(), Violation> {
        self.now += by;
        for i in 0..self.srvs.len() {
            if self.srvs[i].restart_at.is_some_and(|t| t <= self.now) {
                self.srvs[i].restarts += 1;
                self.boot(i);
            }
            let Some(s) = self.srvs[i].server.as_mut() else {
                continue;
            };
            if s.poll_timeout().is_some_and(|t| t <= self.now) {
                s.handle_timeout(self.now);
                self.drain(i);
            }
        }
        for c in 0..self.clients.len() {
            if self.clients[c].tick(self.now) {
                self.run_client(c);
            }
        }
        Ok(())
    }
}
