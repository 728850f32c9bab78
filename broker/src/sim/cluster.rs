//! The core-group simulator: several [`Group`]s in one process, joined by
//! simulated links, with publishers that fail over the way the SDK does.
//!
//! One `u64` seed fixes the core size (3 or 5), the timings, the link
//! latencies, the workload and the faults: crashes and restarts (only
//! while a majority of the others hold the state, so that a member of every
//! view survives: state lives in memory),
//! partitions (also one-way), broken links (in-flight frames lost, both ends
//! told, the sender's link comes back later), and delays. Frames travel
//! encoded, FIFO per link while the link lasts.
//!
//! After every step the [`ClusterChecker`] checks guarantees 1–4 and 7. When
//! the fault phase ends everything is healed and restarted, and the run
//! must converge (guarantee 8): one view of every server, every publisher
//! acknowledged, and every acknowledged publish delivered everywhere
//! (guarantee 5).

use super::checker::Violation;
use super::cluster_checker::ClusterChecker;
use super::Rng;
use crate::core::group::{
    wire, Event, Group, GroupBugs, GroupConfig, Incarnation, Msg, NodeId, Snapshot, Submitted,
};
use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// What a run did, for tests that require faults to have happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterOutcome {
    /// Publishes made.
    pub published: u64,
    /// Publishes acknowledged.
    pub acked: u64,
    /// Messages delivered, summed over servers.
    pub delivered: u64,
    /// Servers crashed.
    pub crashes: u64,
    /// Servers restarted.
    pub restarts: u64,
    /// Partitions made.
    pub partitions: u64,
    /// Links broken.
    pub breaks: u64,
    /// Views installed, summed over servers.
    pub views: u64,
    /// Held messages taken back by a view change, summed over servers.
    pub unheld: u64,
    /// A digest of every event in order (for the determinism test).
    pub digest: u64,
}

impl ClusterOutcome {
    /// Adds another run's counts (the digest is left alone).
    pub fn add(&mut self, o: &ClusterOutcome) {
        self.published += o.published;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.crashes += o.crashes;
        self.restarts += o.restarts;
        self.partitions += o.partitions;
        self.breaks += o.breaks;
        self.views += o.views;
        self.unheld += o.unheld;
    }
}

/// A run's knobs beyond the seed, for targeted tests.
#[derive(Clone, Debug)]
pub struct ClusterPlan {
    /// Deliberate bugs to build into every group.
    pub(crate) bugs: GroupBugs,
    /// Simulated time with faults.
    pub faulty: Duration,
    /// Simulated time allowed to converge after faults stop.
    pub settle: Duration,
    /// The core size, instead of the seed's choice.
    pub servers: Option<usize>,
}

impl Default for ClusterPlan {
    fn default() -> Self {
        ClusterPlan {
            bugs: GroupBugs::default(),
            faulty: Duration::from_secs(6),
            settle: Duration::from_secs(8),
            servers: None,
        }
    }
}

/// A frame in flight.
struct Frame {
    from: usize,
    to: usize,
    generation: u64,
    bytes: Bytes,
}

enum Ev {
    Frame(Frame),
    /// `at`'s outgoing link to `peer` is connected again.
    LinkUp {
        at: usize,
        peer: usize,
    },
}

struct Scheduled {
    at: Duration,
    order: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// A publisher as the SDK behaves: attached to one primary server, keeps
/// what is unacknowledged, and on failover attaches elsewhere, learns what
/// was acknowledged there, and sends the rest again.
struct Publisher {
    id: PublisherId,
    next: u64,
    unacked: VecDeque<Msg>,
    acked: PubSeq,
    attached: Option<usize>,
}

struct Server {
    group: Group,
    incarnation: u64,
}

struct World {
    rng: Rng,
    seed: u64,
    now: Duration,
    n: usize,
    servers: Vec<Option<Server>>,
    incarnations: u64,
    heap: BinaryHeap<Reverse<Scheduled>>,
    order: u64,
    /// Per link (from, to): its generation (bumped when it breaks) and the
    /// time its last frame arrives (FIFO).
    generation: Vec<Vec<u64>>,
    last_arrival: Vec<Vec<Duration>>,
    /// Per link: frames from `from` to `to` are dropped (a partition).
    cut: Vec<Vec<bool>>,
    heal_at: Option<Duration>,
    latency_max_us: u64,
    publishers: Vec<Publisher>,
    checker: ClusterChecker,
    out: ClusterOutcome,
    plan: ClusterPlan,
    heartbeat: Duration,
    failure_timeout: Duration,
    /// A violation found outside the checker's calls, reported next step.
    violation: Option<Violation>,
    /// A publisher held on one server: (publisher index, server index).
    pinned: Option<(usize, usize)>,
    /// Whether publishers publish new messages outside the fault phase
    /// (scripted runs); the settle phase only retries.
    load: bool,
}

/// Runs seed `seed` with the default plan.
///
/// # Errors
/// The first broken guarantee, with the seed and the replay command.
pub fn run(seed: u64) -> Result<ClusterOutcome, Violation> {
    run_with(seed, ClusterPlan::default())
}

/// Runs seed `seed` with `plan`.
///
/// # Errors
/// The first broken guarantee, with the seed and the replay command.
pub fn run_with(seed: u64, plan: ClusterPlan) -> Result<ClusterOutcome, Violation> {
    let mut w = World::new(seed, plan);
    w.run().map_err(|v| {
        Violation(format!(
            "core simulator seed {seed} at {:?}: {}\nreplay: CANOPY_SIM_SEED={seed} cargo test -p canopy-broker --lib sim::cluster_tests::replay -- --ignored --nocapture",
            w.now, v.0
        ))
    })?;
    Ok(w.out)
}

impl World {
    fn new(seed: u64, plan: ClusterPlan) -> World {
        let mut rng = Rng::new(seed ^ 0xC0DE);
        let n = if rng.percent(70) { 3 } else { 5 };
        let n = plan.servers.unwrap_or(n);
        let heartbeat = Duration::from_millis(20 + rng.below(40));
        let failure_timeout = heartbeat * (4 + rng.below(5) as u32);
        let latency_max_us = 200 + rng.below(5_000);
        let mut w = World {
            rng,
            seed,
            now: Duration::ZERO,
            n,
            servers: Vec::new(),
            incarnations: 0,
            heap: BinaryHeap::new(),
            order: 0,
            generation: vec![vec![0; n]; n],
            last_arrival: vec![vec![Duration::ZERO; n]; n],
            cut: vec![vec![false; n]; n],
            heal_at: None,
            latency_max_us,
            publishers: (0..2 + seed % 3)
                .map(|p| Publisher {
                    id: PublisherId(p + 1),
                    next: 1,
                    unacked: VecDeque::new(),
                    acked: PubSeq(0),
                    attached: None,
                })
                .collect(),
            checker: ClusterChecker::new(n),
            out: ClusterOutcome::default(),
            plan,
            heartbeat,
            failure_timeout,
            violation: None,
            pinned: None,
            load: false,
        };
        for i in 0..n {
            let s = w.boot(i);
            w.servers.push(Some(s));
        }
        w
    }

    /// A 3-server world for a scripted run: formed and under load for a
    /// second, no random faults.
    fn scripted(seed: u64) -> Result<World, Violation> {
        let plan = ClusterPlan {
            servers: Some(3),
            ..ClusterPlan::default()
        };
        let mut w = World::new(seed, plan);
        w.load = true;
        w.run_until(Duration::from_secs(1), false)?;
        Ok(w)
    }

    fn boot(&mut self, i: usize) -> Server {
        self.incarnations += 1;
        let servers: Vec<NodeId> = (1..=self.n as u32).map(NodeId).collect();
        let mut c = GroupConfig::new(
            NodeId(i as u32 + 1),
            Incarnation(self.incarnations),
            servers,
        );
        c.heartbeat_interval = self.heartbeat;
        c.failure_timeout = self.failure_timeout;
        c.link_confirm = self.heartbeat * 3;
        c.flush_timeout = self.failure_timeout;
        c.stream_seed = self.seed;
        // Small bounds, so that they are reached.
        c.unordered_max = 64;
        c.log_len_max = 256;
        c.publishers_max = 1_000;
        let mut group = Group::new(self.now, c);
        group.bugs = self.plan.bugs;
        Server {
            group,
            incarnation: self.incarnations,
        }
    }

    fn run(&mut self) -> Result<(), Violation> {
        let faulty_end = self.plan.faulty;
        self.run_until(faulty_end, true)?;
        self.heal_everything();
        self.run_until(faulty_end + self.plan.settle, false)?;
        self.converged()
    }

    /// Steps the world until `end`, with random faults if `faults`.
    fn run_until(&mut self, end: Duration, faults: bool) -> Result<(), Violation> {
        let mut next_action = self.now;
        loop {
            let timer = self
                .servers
                .iter()
                .flatten()
                .filter_map(|s| s.group.poll_timeout())
                .min();
            let net = self.heap.peek().map(|Reverse(s)| s.at);
            let mut t = next_action;
            for x in [timer, net, self.heal_at].into_iter().flatten() {
                t = t.min(x);
            }
            self.now = t.max(self.now);
            if self.now >= end {
                return Ok(());
            }
            if self.heal_at.is_some_and(|h| h <= self.now) {
                self.heal_partition();
            } else if net.is_some_and(|a| a <= self.now) {
                if let Some(Reverse(s)) = self.heap.pop() {
                    self.arrive(s.ev);
                }
            } else if timer.is_some_and(|a| a <= self.now) {
                for i in 0..self.n {
                    if let Some(s) = &mut self.servers[i] {
                        if s.group.poll_timeout().is_some_and(|d| d <= self.now) {
                            s.group.handle_timeout(self.now);
                        }
                    }
                }
            } else {
                next_action = self.now + Duration::from_micros(1_000 + self.rng.below(10_000));
                self.act(faults);
            }
            self.drain()?;
            if let Some(v) = self.violation.take() {
                return Err(v);
            }
        }
    }

    /// One workload or fault action.
    fn act(&mut self, faults: bool) {
        let roll = self.rng.below(1000);
        if !faults || roll < 900 {
            if roll < 50 {
                return;
            }
            let p = self.rng.below(self.publishers.len() as u64) as usize;
            let new = faults || self.load;
            if new || self.rng.percent(30) {
                let k = 1 + self.rng.below(4);
                for _ in 0..k {
                    self.publish(p, new);
                }
            } else {
                self.attach(p);
            }
            return;
        }
        let down = self.servers.iter().filter(|s| s.is_none()).count();
        match roll {
            900..=919 if self.heal_at.is_none() => {
                let i = self.rng.below(self.n as u64) as usize;
                // State lives in memory: the guarantees hold while a member
                // of every view survives. So a server is crashed only while
                // a majority of the others are primary (hold the state).
                let primaries = self
                    .servers
                    .iter()
                    .enumerate()
                    .filter(|(j, s)| *j != i && s.as_ref().is_some_and(|s| s.group.is_primary()))
                    .count();
                if primaries > self.n / 2 {
                    self.crash(i);
                }
            }
            920..=949 if down > 0 => {
                let i = self.rng.below(self.n as u64) as usize;
                if self.servers[i].is_none() {
                    self.restart(i);
                }
            }
            950..=964 if self.heal_at.is_none() && down == 0 => self.partition(),
            _ => {
                let a = self.rng.below(self.n as u64) as usize;
                let b = self.rng.below(self.n as u64) as usize;
                if a != b {
                    self.break_link(a, b);
                }
            }
        }
    }

    fn publish(&mut self, p: usize, new: bool) {
        if self.pinned.is_some_and(|(q, _)| q == p) {
            return self.publish_pinned(p);
        }
        self.attach(p);
        let Some(i) = self.publishers[p].attached else {
            return;
        };
        let Some(s) = &mut self.servers[i] else {
            return;
        };
        if !new || s.group.unordered_full() || self.publishers[p].unacked.len() >= 32 {
            return;
        }
        let msg = Self::next_publish(&mut self.publishers[p], &mut self.checker, &mut self.out);
        s.group.submit(vec![msg]);
    }

    /// Publisher `pb`'s next publish, recorded as published and unacknowledged.
    fn next_publish(
        pb: &mut Publisher,
        checker: &mut ClusterChecker,
        out: &mut ClusterOutcome,
    ) -> Submitted {
        let pub_seq = PubSeq(pb.next);
        pb.next += 1;
        let msg = Msg(
            pb.id,
            pub_seq,
            Arc::from("t"),
            Bytes::from(format!("{}:{}", pb.id.0, pub_seq.0)),
        );
        pb.unacked.push_back(msg.clone());
        checker.published(pb.id, pub_seq);
        out.published += 1;
        Submitted(PubSeq(pub_seq.0 - 1), msg)
    }

    /// A publisher held on one server whatever it says (a test's probe of a
    /// minority side): its publishes go to that server's group directly.
    fn publish_pinned(&mut self, p: usize) {
        let Some((_, i)) = self.pinned else { return };
        let Some(s) = &mut self.servers[i] else {
            return;
        };
        if s.group.unordered_full() {
            return;
        }
        self.publishers[p].attached = Some(i);
        let msg = Self::next_publish(&mut self.publishers[p], &mut self.checker, &mut self.out);
        s.group.submit(vec![msg]);
    }

    /// Keeps publisher `p` attached to a primary server, failing over (and
    /// sending its unacknowledged publishes again) when it is not.
    fn attach(&mut self, p: usize) {
        let ok = self.publishers[p]
            .attached
            .and_then(|i| self.servers[i].as_ref())
            .is_some_and(|s| s.group.is_primary());
        if ok {
            return;
        }
        self.publishers[p].attached = None;
        let start = self.rng.below(self.n as u64) as usize;
        for k in 0..self.n {
            let i = (start + k) % self.n;
            let Some(s) = &mut self.servers[i] else {
                continue;
            };
            if !s.group.is_primary() || s.group.unordered_full() {
                continue;
            }
            let pb = &mut self.publishers[p];
            pb.attached = Some(i);
            // The Welcome tells it what was acknowledged already.
            let acked = s.group.pub_delivered(pb.id);
            if acked > pb.acked {
                let (stream, _) = self.checker.position(i, s.incarnation);
                if self.checker.seq_of(stream, (pb.id, acked)).is_none() {
                    self.violation.get_or_insert(Violation(format!(
                        "acknowledgement: server {i} says publisher {} pub_seq {} was delivered, but it never was",
                        pb.id.0, acked.0
                    )));
                }
                self.out.acked += acked.0 - pb.acked.0;
                pb.acked = acked;
            }
            while pb.unacked.front().is_some_and(|m| m.1 <= pb.acked) {
                pb.unacked.pop_front();
            }
            let again: Vec<Submitted> = pb
                .unacked
                .iter()
                .map(|m| Submitted(PubSeq(m.1 .0 - 1), m.clone()))
                .collect();
            if !again.is_empty() {
                s.group.submit(again);
            }
            return;
        }
    }

    fn crash(&mut self, i: usize) {
        if self.servers[i].take().is_none() {
            return;
        }
        if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
            eprintln!("{:?} server {i}: crashed", self.now);
        }
        self.out.crashes += 1;
        for j in 0..self.n {
            self.generation[i][j] += 1;
            self.generation[j][i] += 1;
            // Usually a reset reaches the peer; sometimes it just goes quiet.
            if j != i && self.rng.percent(70) {
                if let Some(s) = &mut self.servers[j] {
                    s.group.handle_link_down(self.now, NodeId(i as u32 + 1));
                }
            }
        }
    }

    fn restart(&mut self, i: usize) {
        if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
            eprintln!("{:?} server {i}: restarted", self.now);
        }
        let s = self.boot(i);
        self.servers[i] = Some(s);
        self.out.restarts += 1;
        for j in 0..self.n {
            if j != i {
                self.schedule_link_up(i, j);
                self.schedule_link_up(j, i);
            }
        }
    }

    fn partition(&mut self) {
        self.out.partitions += 1;
        // A random minority side (one server, or two of five), sometimes
        // cut one way only.
        let side_len = 1 + self.rng.below(((self.n - 1) / 2) as u64) as usize;
        let mut side = vec![false; self.n];
        let mut placed = 0;
        while placed < side_len {
            let i = self.rng.below(self.n as u64) as usize;
            if !side[i] {
                side[i] = true;
                placed += 1;
            }
        }
        let one_way = self.rng.percent(20);
        for a in 0..self.n {
            for b in 0..self.n {
                if side[a] != side[b] && !(one_way && side[b]) {
                    self.cut[a][b] = true;
                }
            }
        }
        let len = self.failure_timeout * (2 + self.rng.below(8) as u32);
        self.heal_at = Some(self.now + len);
    }

    fn heal_partition(&mut self) {
        self.heal_at = None;
        for a in 0..self.n {
            for b in 0..self.n {
                if self.cut[a][b] {
                    self.cut[a][b] = false;
                    self.schedule_link_up(a, b);
                }
            }
        }
    }

    fn heal_everything(&mut self) {
        self.heal_partition();
        for i in 0..self.n {
            if self.servers[i].is_none() {
                self.restart(i);
            }
        }
    }

    fn break_link(&mut self, a: usize, b: usize) {
        self.out.breaks += 1;
        self.generation[a][b] += 1;
        for (x, y) in [(a, b), (b, a)] {
            if let Some(s) = &mut self.servers[x] {
                s.group.handle_link_down(self.now, NodeId(y as u32 + 1));
            }
        }
        self.schedule_link_up(a, b);
    }

    fn schedule_link_up(&mut self, at: usize, peer: usize) {
        let when = self.now + Duration::from_micros(1_000 + self.rng.below(20_000));
        self.schedule(when, Ev::LinkUp { at, peer });
    }

    fn schedule(&mut self, at: Duration, ev: Ev) {
        self.order += 1;
        self.heap.push(Reverse(Scheduled {
            at,
            order: self.order,
            ev,
        }));
    }

    fn arrive(&mut self, ev: Ev) {
        match ev {
            Ev::Frame(f) => {
                if f.generation != self.generation[f.from][f.to] {
                    return;
                }
                let Some(s) = &mut self.servers[f.to] else {
                    return;
                };
                let msg = wire::decode(&f.bytes[4..]).expect("frames the groups encoded decode");
                s.group.handle_msg(self.now, NodeId(f.from as u32 + 1), msg);
            }
            Ev::LinkUp { at, peer } => {
                if self.cut[at][peer] || self.servers[peer].is_none() {
                    return;
                }
                if let Some(s) = &mut self.servers[at] {
                    s.group.handle_link_up(self.now, NodeId(peer as u32 + 1));
                }
            }
        }
    }

    /// Carries every server's frames onto links and its events to the
    /// checker and the publishers, until all are quiet.
    fn drain(&mut self) -> Result<(), Violation> {
        loop {
            let mut moved = false;
            for i in 0..self.n {
                let Some(s) = &mut self.servers[i] else {
                    continue;
                };
                let inc = s.incarnation;
                let mut frames = Vec::new();
                let mut events = Vec::new();
                while let Some(t) = s.group.poll_transmit() {
                    frames.push(t);
                }
                while let Some(e) = s.group.poll_event() {
                    events.push(e);
                }
                moved |= !frames.is_empty() || !events.is_empty();
                for e in events {
                    self.event(i, inc, e)?;
                }
                // Snapshots asked for by the events were queued after them.
                if let Some(s) = &mut self.servers[i] {
                    while let Some(t) = s.group.poll_transmit() {
                        frames.push(t);
                    }
                }
                for (to, bytes) in frames {
                    self.send(i, to.0 as usize - 1, bytes);
                }
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, bytes: Bytes) {
        if self.cut[from][to] {
            return;
        }
        let latency = Duration::from_micros(50 + self.rng.below(self.latency_max_us));
        let at = (self.now + latency).max(self.last_arrival[from][to]);
        self.last_arrival[from][to] = at;
        let generation = self.generation[from][to];
        self.schedule(
            at,
            Ev::Frame(Frame {
                from,
                to,
                generation,
                bytes,
            }),
        );
    }

    fn event(&mut self, i: usize, inc: u64, e: Event) -> Result<(), Violation> {
        self.out.digest = mix(self.out.digest, i as u64);
        match e {
            Event::Deliver(batch) => {
                self.checker.deliver(i, inc, &batch)?;
                self.out.delivered += batch.len() as u64;
                for m in &batch {
                    self.out.digest = mix(self.out.digest, m.seq.0 ^ (m.publisher.0 << 40));
                    for pb in &mut self.publishers {
                        if pb.id == m.publisher && pb.attached == Some(i) && m.pub_seq > pb.acked {
                            self.out.acked += m.pub_seq.0 - pb.acked.0;
                            pb.acked = m.pub_seq;
                            while pb.unacked.front().is_some_and(|u| u.1 <= pb.acked) {
                                pb.unacked.pop_front();
                            }
                        }
                    }
                }
            }
            Event::Held(msgs) => self.checker.held(i, inc, &msgs)?,
            Event::Unheld { after } => {
                self.out.unheld += 1;
                self.checker.unheld(i, inc, after)?;
            }
            Event::View { view, at } => {
                if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
                    eprintln!(
                        "{:?} server {i}/{inc}: view {} {:?} at {} stream {:x}",
                        self.now,
                        view.id,
                        view.members.iter().map(|m| m.node.0).collect::<Vec<_>>(),
                        at.0,
                        view.stream
                    );
                }
                self.out.views += 1;
                self.out.digest = mix(self.out.digest, view.id.epoch ^ at.0);
                self.checker.view(i, inc, &view, at)?;
            }
            Event::SnapshotNeeded { to } => {
                let (stream, head) = self.checker.position(i, inc);
                let s = self.servers[i]
                    .as_mut()
                    .expect("a server that asks for a snapshot is running");
                // The publisher table as the server's node would keep it.
                let mut publishers = Vec::new();
                for pb in &self.publishers {
                    let last = s.group.pub_delivered(pb.id);
                    if last > PubSeq(0) {
                        let seq = self.checker.seq_of(stream, (pb.id, last)).unwrap_or(Seq(0));
                        publishers.push((pb.id, last, seq));
                    }
                }
                let state = Snapshot {
                    stream,
                    head,
                    publishers,
                    evicted: false,
                    first: head.next(),
                    msgs: Vec::new(),
                    members: None,
                    hash: 0,
                };
                s.group.send_snapshot(to, state);
            }
            Event::Reset(state) => {
                if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
                    eprintln!(
                        "{:?} server {i}/{inc}: reset to {} stream {:x}",
                        self.now, state.head.0, state.stream
                    );
                }
                self.out.digest = mix(self.out.digest, state.head.0);
                self.checker.reset(i, inc, state.stream, state.head)?;
                // As the server does, it drops its clients to catch up.
                for pb in &mut self.publishers {
                    if pb.attached == Some(i) {
                        pb.attached = None;
                    }
                }
            }
            Event::NotPrimary => {
                let pinned = self.pinned.map(|(p, _)| self.publishers[p].id);
                for pb in &mut self.publishers {
                    if pb.attached == Some(i) && Some(pb.id) != pinned {
                        pb.attached = None;
                    }
                }
            }
        }
        Ok(())
    }

    /// After the settle time: one view of all servers, nothing pending.
    fn converged(&mut self) -> Result<(), Violation> {
        let mut view = None;
        let mut position = None;
        for (i, s) in self.servers.iter().enumerate() {
            let Some(s) = s else {
                return Err(Violation(format!("liveness: server {i} is down")));
            };
            if !s.group.is_primary() {
                return Err(Violation(format!(
                    "liveness: server {i} is not primary ({:?}) after faults stopped",
                    s.group.status()
                )));
            }
            let v = s.group.view().map(|v| (v.id, v.members.len()));
            if view.is_some_and(|x| Some(x) != v) {
                return Err(Violation(format!(
                    "liveness: servers disagree on the view: {view:?} vs {v:?}"
                )));
            }
            view = v;
            let p = self.checker.position(i, s.incarnation);
            if position.is_some_and(|x| x != p) {
                return Err(Violation(format!(
                    "liveness: servers stopped at different positions: {position:?} vs {p:?}"
                )));
            }
            position = Some(p);
        }
        if view.map(|v| v.1) != Some(self.n) {
            return Err(Violation(format!(
                "liveness: the final view {view:?} does not hold all {} servers",
                self.n
            )));
        }
        let (stream, _) = position.unwrap_or_default();
        for pb in &self.publishers {
            if !pb.unacked.is_empty() {
                let tables: Vec<(PubSeq, PubSeq)> = self
                    .servers
                    .iter()
                    .flatten()
                    .map(|s| (s.group.pub_held(pb.id), s.group.pub_delivered(pb.id)))
                    .collect();
                return Err(Violation(format!(
                    "liveness: publisher {} still has {} unacknowledged publishes (first {:?}, acked {:?}, attached {:?}; servers' held/delivered {tables:?})",
                    pb.id.0,
                    pb.unacked.len(),
                    pb.unacked.front().map(|m| m.1),
                    pb.acked,
                    pb.attached
                )));
            }
            // Durability: every acknowledged publish is in the final stream.
            for k in 1..=pb.acked.0 {
                if self.checker.seq_of(stream, (pb.id, PubSeq(k))).is_none() {
                    return Err(Violation(format!(
                        "durability: publisher {} pub_seq {k} was acknowledged but is not in the stream {stream:x} (elsewhere: {:?})",
                        pb.id.0,
                        self.checker.find(pb.id, PubSeq(k))
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What the minority-partition scenario saw.
#[derive(Clone, Debug, Default)]
pub struct MinorityReport {
    /// The partitioned server (the first view's coordinator).
    pub cut: usize,
    /// Seqs it delivered while cut off (must be none).
    pub delivered_while_cut: u64,
    /// Whether it told its clients it is not primary.
    pub told_not_primary: bool,
    /// Seqs the majority delivered meanwhile.
    pub majority_delivered: u64,
    /// Publishes made on the cut-off server meanwhile.
    pub published_there: u64,
}

/// A scripted run: a 3-server core forms, its coordinator is cut off from
/// the other two while a publisher keeps publishing on it, then the cut
/// heals and everything must converge (guarantee 7: the minority side
/// orders nothing; guarantee 8 afterwards).
///
/// # Errors
/// The first broken guarantee.
pub fn minority_partition(seed: u64) -> Result<MinorityReport, Violation> {
    let mut w = World::scripted(seed)?;
    let cut = w
        .servers
        .iter()
        .flatten()
        .find_map(|s| s.group.view().map(|v| v.id.coordinator.0 as usize - 1))
        .ok_or_else(|| Violation("no view formed within a second".into()))?;
    let other = (cut + 1) % 3;
    let inc = |w: &World, i: usize| w.servers[i].as_ref().map_or(0, |s| s.incarnation);
    for a in 0..3 {
        for b in 0..3 {
            if (a == cut) != (b == cut) {
                w.cut[a][b] = true;
            }
        }
    }
    w.pinned = Some((0, cut));
    // Frames already in flight when the cut came still land (the longest
    // link latency is under 6 ms); what they complete was decided before.
    let settle = w.now + Duration::from_millis(10);
    w.run_until(settle, false)?;
    let before = w.checker.position(cut, inc(&w, cut)).1;
    let majority_before = w.checker.position(other, inc(&w, other)).1;
    let published_before = w.out.published;
    let end = w.now + w.failure_timeout * 10;
    w.run_until(end, false)?;
    let after = w.checker.position(cut, inc(&w, cut)).1;
    let report = MinorityReport {
        cut,
        delivered_while_cut: after.0 - before.0,
        told_not_primary: !w.servers[cut]
            .as_ref()
            .is_some_and(|s| s.group.is_primary()),
        majority_delivered: w.checker.position(other, inc(&w, other)).1 .0 - majority_before.0,
        published_there: w.out.published - published_before,
    };
    w.pinned = None;
    w.load = false;
    w.heal_partition();
    let end = w.now + w.plan.settle;
    w.run_until(end, false)?;
    w.converged()?;
    Ok(report)
}

/// A scripted run of the case where a restarted server could outvote the
/// state: server 3 is cut off while {1, 2} commit more; then server 3 comes
/// back, server 1 is cut off, and server 2 crashes and restarts with nothing.
/// Servers 2 and 3 are a majority, but only 3 holds state (older than what 1
/// holds): they must not form a view. When 1 returns everything converges
/// with every acknowledged publish in the stream.
///
/// # Errors
/// The first broken guarantee, or a view formed without the newest state.
pub fn restarted_server_cannot_outvote_the_state(seed: u64) -> Result<(), Violation> {
    let mut w = World::scripted(seed)?;
    let cut_off = |w: &mut World, i: usize, on: bool| {
        for j in 0..3 {
            if j != i {
                w.cut[i][j] = on;
                w.cut[j][i] = on;
            }
        }
    };
    cut_off(&mut w, 2, true);
    let end = w.now + w.failure_timeout * 10;
    w.run_until(end, false)?;
    cut_off(&mut w, 2, false);
    cut_off(&mut w, 0, true);
    w.crash(1);
    w.restart(1);
    let end = w.now + w.failure_timeout * 10;
    w.run_until(end, false)?;
    for i in [1, 2] {
        if w.servers[i].as_ref().is_some_and(|s| s.group.is_primary()) {
            return Err(Violation(format!(
                "primary component: server {} formed a view without the newest state",
                i + 1
            )));
        }
    }
    cut_off(&mut w, 0, false);
    w.load = false;
    w.heal_partition();
    let end = w.now + w.plan.settle;
    w.run_until(end, false)?;
    w.converged()
}

fn mix(h: u64, x: u64) -> u64 {
    (h ^ x)
        .wrapping_mul(0x100_0000_01b3)
        .rotate_left(29)
        .wrapping_add(0x9e37_79b9)
}
