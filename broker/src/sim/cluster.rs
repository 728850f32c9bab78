//! The core simulator: the core servers users run, several in one
//! process. Each is the composed [`Server`] (a client-facing [`Node`] over
//! its [`Group`], with the core tier's node ids, small retention and
//! publisher tables), joined to the others by simulated links. Model
//! clients ([`client::CoreClient`]) speak the client protocol to them over
//! simulated connections and follow the SDK's rules: Hello with resume,
//! check and agreed position; resending what is unacknowledged; failover
//! in the Welcome's order with the lost server last; a doubling pause
//! after a failed round. Snapshots, membership events (attach, detach, the
//! core list, adoption) and weak delivery are the servers' own.
//!
//! One `u64` seed fixes the core size (3 or 5), the timings, the link
//! latencies, each server's clock rate, the bounds, the workload and the
//! faults:
//! - crashes at any moment (mid-flush, between accept and commit, of the
//!   proposer), of a majority and of all servers at once; restarts that
//!   keep the data directory (the group's [`HardState`], which a server
//!   writes before it sends the frames that depend on it) and restarts that
//!   lose it;
//! - partitions: a minority cut off both ways, one-way (a server that
//!   cannot send, or one that cannot hear), and non-transitive (two servers
//!   that cannot reach each other but both reach the rest);
//! - broken links (in-flight frames lost, both ends told, the link comes
//!   back later), duplicated frames, delays;
//! - publishers as clients are: each starts at a first-contact pub_seq of
//!   its own (some near `u64::MAX`), new publishers come and old ones go,
//!   and small publisher tables make eviction run.
//!
//! Frames travel encoded, FIFO per link while the link lasts.
//!
//! Client connections break too, and each run has a strong and a weak
//! subscriber (or two of one kind) beside its publishers.
//!
//! After every step the [`ClusterChecker`] checks guarantees 1–4 and 7
//! (among them: a seq never means two things under one stream id) on every
//! group event in the order each node took it, and every snapshot's
//! messages against the stream; the model clients check what they are
//! told: an acknowledgement is in the stream it was given in, a strong
//! subscriber sees only stable content, a changed stream id arrives only
//! with a Welcome (the SDK's `StreamReset`), and a weak subscriber's
//! deliveries match the stable stream unless a `Diverged` notice took them
//! back first. A new
//! stream may begin only when every member of the newest installed view has
//! crashed since (its messages are gone: no durable log); otherwise the
//! beginning is a durability violation. **Availability** is measured: over
//! the time a majority has been up and connected both ways for a few
//! failure timeouts, the fraction during which one of them is primary. When
//! the fault phase ends everything is healed and restarted, and the run
//! must converge (guarantee 8): one view of every server, every server's
//! submissions ordered, every publisher acknowledged, every publish
//! acknowledged in the final stream delivered everywhere (guarantee 5),
//! every subscriber holding every message after where it joined (or a gap
//! notice over it), and every server's membership table the same.

use super::checker::Violation;
use super::cluster_checker::ClusterChecker;
use super::service::{ServiceBugs, SimService, State as ServiceState};
use super::Rng;
use crate::core::cltsvr::members::core_server_id;
use crate::core::cltsvr::node::Output;
use crate::core::group::{
    wire, Event, Group, GroupBugs, GroupConfig, HardState, Incarnation, NodeId, Status, ViewId,
};
use crate::core::rrpc::{share, CallId, Job};
use crate::core::{Node, NodeConfig, Server, SessionId};
use bytes::Bytes;
use canopy_client::core::Action;
use canopy_client::protocol::{self, CallErrorCode, PubSeq, PublisherId, Replies, Seq, Vote};
use client::CoreClient;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::time::Duration;

mod client;

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
    /// Restarts that lost the data directory.
    pub disks_lost: u64,
    /// Crashes of every server at once.
    pub total_crashes: u64,
    /// New streams begun after the first (every member of a view lost its
    /// messages).
    pub stream_resets: u64,
    /// Frames delivered twice.
    pub duplicates: u64,
    /// Client connections broken.
    pub client_breaks: u64,
    /// Client connections gone silent one way or both, without a close.
    pub client_silences: u64,
    /// Client programs restarted under their own publisher id.
    pub program_restarts: u64,
    /// Runs whose stream had to move on after the faults for a weak
    /// subscriber's claim past its head to be checked.
    pub stream_moved_on: u64,
    /// Replies to calls of the replicated service checked against the
    /// replicas' state...
    pub replies: u64,
    /// ...and calls (or shares) whose executor changed with a view.
    pub reassigned: u64,
    /// Time (µs) a majority was up and connected both ways, settled...
    pub connected_us: u64,
    /// ...and the part of it during which one of them was primary.
    pub primary_us: u64,
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
        self.disks_lost += o.disks_lost;
        self.total_crashes += o.total_crashes;
        self.stream_resets += o.stream_resets;
        self.duplicates += o.duplicates;
        self.client_breaks += o.client_breaks;
        self.client_silences += o.client_silences;
        self.program_restarts += o.program_restarts;
        self.stream_moved_on += o.stream_moved_on;
        self.replies += o.replies;
        self.reassigned += o.reassigned;
        self.connected_us += o.connected_us;
        self.primary_us += o.primary_us;
    }

    /// The fraction of the connected time that was primary (1 if none).
    pub fn availability(&self) -> f64 {
        match self.connected_us {
            0 => 1.0,
            c => self.primary_us as f64 / c as f64,
        }
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
    /// The publisher table bound, instead of the seed's choice.
    pub publishers_max: Option<usize>,
    /// The clients' ping period (a broken build pings never, and so never
    /// finds a silent connection).
    pub client_ping: Duration,
    /// Whether the servers run the simulated replicated service and half
    /// the publishers call it, instead of the seed's choice.
    pub calls: Option<bool>,
    /// Whether a restarted client program begins an incarnation, as the SDK
    /// does (a broken build's count on from its first Welcome).
    pub incarnations: bool,
    /// Deliberate bugs in the simulated service.
    pub(crate) service_bugs: ServiceBugs,
}

impl Default for ClusterPlan {
    fn default() -> Self {
        ClusterPlan {
            bugs: GroupBugs::default(),
            faulty: Duration::from_secs(6),
            settle: Duration::from_secs(8),
            servers: None,
            publishers_max: None,
            client_ping: CLIENT_PING,
            calls: None,
            incarnations: true,
            service_bugs: ServiceBugs::default(),
        }
    }
}

/// A frame in flight between two core servers.
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
    /// A client's frame reaches the server of connection `conn`...
    Up(usize, Bytes),
    /// ...a server's frame reaches the client...
    Down(usize, Bytes),
    /// ...and the server's close reaches the client, after its frames.
    Closed(usize),
    /// Client `c`'s core timer armed for this time.
    ClientTimer(usize, Duration),
    /// Client (index, id, program)'s connection attempt found no server
    /// there.
    ConnectFailed(usize, PublisherId, u64),
    /// A call's execution (a job) at server (index, process) is done.
    Executed(usize, u64, Job),
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

/// A core server process: the composed [`Server`] (node over group), as
/// `canopy serve` runs it.
struct Srv {
    server: Server,
    /// The simulator's number for this process.
    incarnation: u64,
    /// Its first group incarnation (a rejoin moves on from there), and
    /// when it booted: a member of a view is this process if both are no
    /// later than the view's.
    first_incarnation: u64,
    booted: Duration,
}

impl Srv {
    fn group(&self) -> &Group {
        self.server
            .group()
            .expect("every simulated server is a core server")
    }
}

/// Clients ping this often when they hear nothing else, and count a
/// connection dead after three such periods of silence; a server closes a
/// session silent for `SESSION_IDLE`. (Short, so that a silent connection,
/// which nothing else ends, is found within a run.)
const CLIENT_PING: Duration = Duration::from_millis(250);
const SESSION_IDLE: Duration = Duration::from_millis(1000);

/// A client connection to a core server, FIFO each way while it lasts.
struct ClientConn {
    client: usize,
    server: usize,
    /// The server process it was opened to.
    process: u64,
    session: SessionId,
    live: bool,
    /// The server closed it: nothing more goes up.
    closing: bool,
    /// When the last frame each way arrives.
    up_at: Duration,
    down_at: Duration,
    /// Frames toward the server vanish (a half-open connection, a NAT
    /// that forgot it): nothing arrives, not even a close.
    silent_up: bool,
    /// ...and toward the client.
    silent_down: bool,
}

/// A view as first installed: when, and its members as (server index,
/// group incarnation).
type Installed = (Duration, Vec<(usize, u64)>);

/// What the availability measure tracks.
#[derive(Default)]
struct Connectivity {
    /// The largest set of running servers connected both ways, and since
    /// when it has been that set.
    clique: Vec<usize>,
    since: Duration,
    /// When the measure was last taken.
    at: Duration,
}

struct World {
    rng: Rng,
    seed: u64,
    now: Duration,
    n: usize,
    servers: Vec<Option<Srv>>,
    /// The newest start's incarnation (see `boot`).
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
    /// The clients: the first `publishers` publish (and are retired and
    /// replaced), the rest subscribe.
    clients: Vec<CoreClient>,
    publishers: usize,
    conns: Vec<ClientConn>,
    by_session: HashMap<SessionId, usize>,
    next_session: u64,
    /// The servers' client addresses (`c1`, `c2`, ...), as clients know them.
    addrs: Vec<String>,
    checker: ClusterChecker,
    out: ClusterOutcome,
    plan: ClusterPlan,
    heartbeat: Duration,
    failure_timeout: Duration,
    /// A violation found outside the checker's calls, reported next step.
    violation: Option<Violation>,
    /// A client held on one server whatever it says (a test's probe of a
    /// minority side): (client index, server index). Its frames reach the
    /// server at once.
    pinned: Option<(usize, usize)>,
    /// Whether publishers publish new messages outside the fault phase
    /// (scripted runs); the settle phase only retries.
    load: bool,
    /// Per server: the hard state on its disk, as last written.
    disks: Vec<Option<HardState>>,
    /// Per server: its clock's rate, in thousandths of real time.
    rates: Vec<u64>,
    /// Percent of frames delivered twice.
    dup_pct: u64,
    /// Publishers retired (their acknowledgements are still checked).
    retired: Vec<CoreClient>,
    /// The next publisher id.
    next_publisher: u64,
    /// Publisher table bound.
    publishers_max: usize,
    /// Messages a server's node retains for catch-up.
    retention: usize,
    /// Streams seen, and per installed view when it was first installed
    /// and its members (server indexes).
    streams: HashSet<u64>,
    installed: HashMap<u64, BTreeMap<ViewId, Installed>>,
    /// The stream begun last.
    latest_stream: Option<u64>,
    /// Every view id installed, with its stream and members: a view id
    /// names one view for good (only a core whose every data directory was
    /// wiped starts them again).
    view_ids: HashMap<ViewId, (u64, Vec<usize>)>,
    /// Every view each server process accepted (took the history of), from
    /// its hard-state writes: (server, process, view).
    accepted_by: HashSet<(usize, u64, ViewId)>,
    connectivity: Connectivity,
    /// Faults may lose data directories.
    lose_disks: bool,
    /// A script's fault: the server to cut off (frames in flight lost) the
    /// moment the first view is installed anywhere (its coordinator goes
    /// first, before any message is ordered in it).
    isolate_at_first_view: Option<usize>,
    /// The servers run the simulated replicated service; even publishers
    /// are callers.
    service: bool,
    /// Per server: the stream it delivers, and the position its replicated
    /// state was last compared at.
    service_at: Vec<(u64, Seq)>,
    /// The replicated state's digest at each position of each stream, as
    /// the first server there had it.
    digests: HashMap<(u64, Seq), (usize, u64)>,
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
        // Clocks drift: each server's runs 0.9–1.1 times real time.
        let rates = (0..n).map(|_| 900 + rng.below(201)).collect();
        let dup_pct = rng.below(4);
        // Small tables make eviction run.
        let publishers_max = match rng.percent(40) {
            true => 2 + rng.below(5) as usize,
            false => 1_000,
        };
        let publishers_max = plan.publishers_max.unwrap_or(publishers_max);
        // Small retention makes resuming subscribers meet gaps.
        let retention = 50 + rng.below(2_000) as usize;
        // (From the seed, not the random source: runs without the service
        // are what they were.)
        let service = plan.calls.unwrap_or((seed / 3).is_multiple_of(2));
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
            clients: Vec::new(),
            publishers: 0,
            conns: Vec::new(),
            by_session: HashMap::new(),
            next_session: 1,
            addrs: (1..=n).map(|i| format!("c{i}")).collect(),
            checker: ClusterChecker::new(n),
            out: ClusterOutcome::default(),
            plan,
            heartbeat,
            failure_timeout,
            violation: None,
            pinned: None,
            load: false,
            disks: vec![None; n],
            rates,
            dup_pct,
            retired: Vec::new(),
            next_publisher: 1,
            publishers_max,
            retention,
            streams: HashSet::new(),
            installed: HashMap::new(),
            latest_stream: None,
            view_ids: HashMap::new(),
            accepted_by: HashSet::new(),
            connectivity: Connectivity::default(),
            lose_disks: true,
            isolate_at_first_view: None,
            service,
            service_at: vec![(0, Seq(0)); n],
            digests: HashMap::new(),
        };
        for _ in 0..2 + seed % 3 {
            let pb = w.new_publisher(w.clients.len());
            w.clients.push(pb);
        }
        w.publishers = w.clients.len();
        // A strong and a weak subscriber, or two of one kind.
        for k in 0..2 {
            let weak = match seed % 4 {
                0 => false,
                1 => true,
                _ => k == 1,
            };
            let id = PublisherId(1 << 40 | k);
            let link = (w.servers_of(w.clients.len()), w.plan.client_ping);
            // Windows of a few messages in two of three runs: flow control
            // pauses and catches the subscribers up under every fault.
            let window = (!(seed / 4).is_multiple_of(3)).then_some(1 + seed % 8);
            w.clients.push(CoreClient::new(
                Duration::ZERO,
                id,
                1,
                Some(weak),
                link,
                window,
            ));
        }
        for i in 0..n {
            let s = w.boot(i);
            w.servers.push(Some(s));
        }
        for c in 0..w.clients.len() {
            w.arm(c);
        }
        w
    }

    /// The servers client `c` is configured with: every server, rotated per
    /// client, as users configure them.
    fn servers_of(&self, c: usize) -> Vec<String> {
        let mut order = self.addrs.clone();
        order.rotate_left(c % self.n);
        order
    }

    /// A publisher with a new id, starting where a real client may: at 1,
    /// anywhere (first contact), or a few publishes short of `u64::MAX`.
    fn new_publisher(&mut self, c: usize) -> CoreClient {
        let id = self.next_publisher;
        self.next_publisher += 1;
        let first = match self.rng.below(10) {
            0..=4 => 1,
            5..=7 => 2 + self.rng.below(1 << 40),
            _ => u64::MAX - 60 + self.rng.below(30),
        };
        let link = (self.servers_of(c), self.plan.client_ping);
        let mut client = CoreClient::new(self.now, PublisherId(id), first, None, link, None);
        client.caller = self.service && id.is_multiple_of(2);
        client
    }

    /// Server `i`'s clock at the world's time.
    fn local(&self, i: usize) -> Duration {
        local_at(self.now, self.rates[i])
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

    /// Starts server `i` with what its disk holds: the composed server
    /// `canopy serve` runs, with small bounds so that they are reached.
    fn boot(&mut self, i: usize) -> Srv {
        // A start's incarnation is its clock's microseconds, as `canopy
        // serve` takes it (a counter per start collides with a rejoin's
        // step of one when a server starts again without its data
        // directory: seeds 19723 and 27122 of the cluster simulator), kept
        // above every earlier start's (it numbers the world's processes).
        let clock = u64::try_from(self.local(i).as_micros()).unwrap_or(u64::MAX);
        self.incarnations = (self.incarnations + 1).max(clock);
        let servers: Vec<NodeId> = (1..=self.n as u32).map(NodeId).collect();
        let me = NodeId(i as u32 + 1);
        let mut c = GroupConfig::new(me, Incarnation(self.incarnations), servers);
        c.membership.heartbeat_interval = self.heartbeat;
        c.membership.failure_timeout = self.failure_timeout;
        c.membership.link_confirm = self.heartbeat * 3;
        c.membership.flush_timeout = self.failure_timeout;
        c.membership.stream_seed = self.seed;
        c.ordering.unordered_max = 64;
        c.ordering.log_len_max = 256;
        c.ordering.publishers_max = self.publishers_max;
        let now = self.local(i);
        let mut group = Group::recover(now, c, self.disks[i].clone());
        group.set_bugs(self.plan.bugs);
        if self.service {
            let service = SimService::new(self.incarnations, self.plan.service_bugs);
            group.set_service(share(service));
        }
        self.service_at[i] = (0, Seq(0));
        let first_incarnation = group.me().incarnation.0;
        let node = NodeConfig {
            name: self.addrs[i].clone(),
            retention_count_max: self.retention,
            publishers_max: self.publishers_max,
            watermark_interval: self.heartbeat * 2,
            idle_timeout: SESSION_IDLE,
            servers: self.addrs.clone(),
            id: core_server_id(me.0, first_incarnation),
            ..NodeConfig::default()
        };
        let addrs = (0..self.n)
            .map(|j| (NodeId(j as u32 + 1), self.addrs[j].clone()))
            .collect();
        let mut server = Server::grouped(Node::new_grouped(now, node), group, addrs);
        server.tap_events();
        Srv {
            server,
            incarnation: self.incarnations,
            first_incarnation,
            booted: self.now,
        }
    }

    fn run(&mut self) -> Result<(), Violation> {
        let faulty_end = self.plan.faulty;
        self.run_until(faulty_end, true)?;
        self.heal_everything();
        self.run_until(faulty_end + self.plan.settle, false)?;
        if self.converged().is_err() && self.blocked_by_lost_disks() {
            self.wipe_and_restart_all();
            let end = self.now + self.plan.settle;
            self.run_until(end, false)?;
        }
        self.past_weak_claims()?;
        self.converged()?;
        self.available()
    }

    /// A weak subscriber may stand past the stream's head: it was sent
    /// held messages a view change took back (their server crashed), and
    /// its server checks its claim on them when the stream reaches it
    /// (docs/DESIGN.md, "Weak delivery"); on a quiet stream it waits ("What
    /// is not there yet"). So the stream moves on: publishers publish until
    /// it passes every such claim (a bounded number of rounds).
    fn past_weak_claims(&mut self) -> Result<(), Violation> {
        for _ in 0..8 {
            let head = (0..self.n)
                .filter_map(|i| {
                    Some(
                        self.checker
                            .position(i, self.servers[i].as_ref()?.incarnation)
                            .1,
                    )
                })
                .max()
                .unwrap_or_default();
            let ahead = self.clients.iter().any(|c| {
                c.sub.as_ref().is_some_and(|s| s.weak)
                    && c.core.position().at().is_some_and(|(_, at)| at > head)
            });
            if !ahead {
                return Ok(());
            }
            self.out.stream_moved_on += 1;
            for c in 0..self.clients.len() {
                for _ in 0..8 {
                    self.publish(c);
                }
            }
            self.run_for(self.plan.settle)?;
        }
        Ok(())
    }

    /// Availability: over the time a majority that can carry the stream on
    /// has been connected for a few failure timeouts, one of them must be
    /// primary nearly all the time (view changes for joins and crashes
    /// outside it take a little; flapping takes half or more).
    fn available(&self) -> Result<(), Violation> {
        let o = &self.out;
        if o.connected_us >= 1_000_000 && o.availability() < AVAILABILITY_MIN {
            return Err(Violation(format!(
                "availability: primary {:.1}% of the {} ms a majority was connected (at least {:.0}% expected)",
                o.availability() * 100.0,
                o.connected_us / 1000,
                AVAILABILITY_MIN * 100.0
            )));
        }
        Ok(())
    }

    /// Whether the core is in the one state it documents it cannot leave by
    /// itself: servers hold messages, but the newest accepted view's state
    /// is not among them, and servers that lost their data directories may
    /// have lost the record of what was installed last.
    fn blocked_by_lost_disks(&self) -> bool {
        let accepted: Vec<ViewId> = self
            .disks
            .iter()
            .flatten()
            .filter_map(|d| d.accepted.as_ref().map(|v| v.id))
            .collect();
        let held: Vec<ViewId> = self
            .servers
            .iter()
            .flatten()
            .filter_map(|s| s.group().state_view())
            .collect();
        let newest = accepted.iter().max();
        let carries_on = accepted.len() > self.n / 2 && held.iter().max() == newest;
        accepted.len() < self.n && !held.is_empty() && !carries_on
    }

    /// Steps the world until `end`, with random faults if `faults`.
    fn run_until(&mut self, end: Duration, faults: bool) -> Result<(), Violation> {
        let mut next_action = self.now;
        loop {
            // Deadlines are on each server's clock.
            let timer = (0..self.n)
                .filter_map(|i| {
                    let s = self.servers[i].as_ref()?;
                    Some(global_at(s.server.poll_timeout()?, self.rates[i]))
                })
                .min();
            let net = self.heap.peek().map(|Reverse(s)| s.at);
            let mut t = next_action;
            for x in [timer, net, self.heal_at].into_iter().flatten() {
                t = t.min(x);
            }
            self.measure(t.max(self.now).min(end));
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
                    let local = self.local(i);
                    if let Some(s) = &mut self.servers[i] {
                        if s.server.poll_timeout().is_some_and(|d| d <= local) {
                            s.server.handle_timeout(local);
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

    /// Availability: adds the time from the last measure to `to` to the
    /// connected time if a majority had been up and connected both ways
    /// for `AVAILABLE_AFTER` failure timeouts, and to the primary time if
    /// one of them was primary meanwhile.
    fn measure(&mut self, to: Duration) {
        let clique = self.clique();
        // Only a majority that can carry the stream on is expected to: a
        // majority of voters with the newest accepted view's state among
        // them, or every server (a new stream, or the first formation), and
        // not blocked by lost data directories by design.
        let newest = self
            .disks
            .iter()
            .flatten()
            .filter_map(|d| d.accepted.as_ref().map(|v| v.id))
            .max();
        let voters = clique
            .iter()
            .filter(|&&i| self.disks[i].as_ref().is_some_and(|d| d.accepted.is_some()))
            .count();
        let holder = clique.len() == self.n
            || voters > self.n / 2
                && clique.iter().any(|&i| {
                    self.servers[i]
                        .as_ref()
                        .is_some_and(|s| newest.is_some() && s.group().state_view() == newest)
                });
        let blocked = self.blocked_by_lost_disks() || !holder;
        let c = &mut self.connectivity;
        if clique != c.clique {
            c.clique = clique;
            c.since = c.at;
        }
        let dt = to.saturating_sub(c.at);
        let settled = c.at.saturating_sub(c.since) >= self.failure_timeout * AVAILABLE_AFTER;
        c.at = to;
        // (A core blocked by lost data directories waits by design.)
        if settled && c.clique.len() > self.n / 2 && !blocked {
            let us = dt.as_micros() as u64;
            self.out.connected_us += us;
            let primary = c.clique.iter().any(|&i| {
                self.servers[i]
                    .as_ref()
                    .is_some_and(|s| s.group().is_primary())
            });
            if primary {
                self.out.primary_us += us;
            } else if us > 0 && std::env::var_os("CANOPY_SIM_TRACE").is_some() {
                let st: Vec<_> = (0..self.n)
                    .map(|i| {
                        self.servers[i].as_ref().map(|s| {
                            let h = s.group().hard_state();
                            (
                                s.group().status(),
                                s.group().state_view().map(|v| v.to_string()),
                                h.accepted.map(|v| v.id.to_string()),
                                h.installed.to_string(),
                            )
                        })
                    })
                    .collect();
                eprintln!(
                    "{:?} no primary among {:?} for {us} µs: {st:?}",
                    self.now, self.connectivity.clique
                );
            }
        }
    }

    /// The largest set of running servers every two of which reach each
    /// other both ways (the lowest such set, if several).
    fn clique(&self) -> Vec<usize> {
        let mut best = Vec::new();
        for mask in 1u32..(1 << self.n) {
            let set: Vec<usize> = (0..self.n).filter(|&i| mask & (1 << i) != 0).collect();
            if set.len() <= best.len() {
                continue;
            }
            let ok = set.iter().all(|&a| {
                self.servers[a].is_some()
                    && set
                        .iter()
                        .all(|&b| a == b || (!self.cut[a][b] && !self.cut[b][a]))
            });
            if ok {
                best = set;
            }
        }
        best
    }

    /// One workload or fault action.
    fn act(&mut self, faults: bool) {
        let roll = self.rng.below(1000);
        if !faults || roll < 900 {
            if roll < 50 {
                return;
            }
            let p = self.rng.below(self.publishers as u64) as usize;
            if faults && roll < 58 {
                return self.retire(p);
            }
            if faults && roll < 62 {
                let c = self.rng.below(self.clients.len() as u64) as usize;
                return self.restart_program(c);
            }
            if faults || self.load {
                let k = 1 + self.rng.below(4);
                for _ in 0..k {
                    self.publish(p);
                }
            }
            return;
        }
        let down = self.servers.iter().filter(|s| s.is_none()).count();
        match roll {
            // Any server, at any moment: mid-flush, between accept and
            // commit, the proposer.
            900..=914 => {
                let i = self.rng.below(self.n as u64) as usize;
                self.crash(i);
            }
            // A majority, or all at once (rarely).
            915 if self.rng.percent(25) => {
                let all = self.rng.percent(50);
                self.out.total_crashes += u64::from(all);
                let k = if all { self.n } else { self.n / 2 + 1 };
                let start = self.rng.below(self.n as u64) as usize;
                for j in 0..k {
                    self.crash((start + j) % self.n);
                }
            }
            916..=949 if down > 0 => {
                let i = self.rng.below(self.n as u64) as usize;
                if self.servers[i].is_none() {
                    let keep = !self.lose_disks || self.rng.percent(90);
                    self.restart(i, keep);
                }
            }
            950..=964 if self.heal_at.is_none() => self.partition(),
            965..=971 => {
                let c = self.rng.below(self.clients.len() as u64) as usize;
                if let Some(conn) = self.clients[c].conn {
                    self.out.client_breaks += 1;
                    self.end_conn(conn, true);
                }
            }
            // A client connection goes silent, one way or both, for good:
            // only the client's missed-pings rule and the server's idle
            // timeout end it.
            972..=974 => {
                let c = self.rng.below(self.clients.len() as u64) as usize;
                let way = self.rng.below(3);
                if let Some(conn) = self.clients[c].conn {
                    self.out.client_silences += 1;
                    let k = &mut self.conns[conn];
                    k.silent_up |= way != 1;
                    k.silent_down |= way != 0;
                }
            }
            _ => {
                let a = self.rng.below(self.n as u64) as usize;
                let b = self.rng.below(self.n as u64) as usize;
                if a != b {
                    self.break_link(a, b);
                }
            }
        }
    }

    /// Publisher `p` goes away once nothing of it is unacknowledged, and a
    /// new one comes (every `canopy pub` run is a new publisher).
    fn retire(&mut self, p: usize) {
        if self.clients[p].core.unacked_len() > 0
            || self.clients[p].core.calls_pending() > 0
            || self.pinned.is_some()
        {
            return;
        }
        if let Some(conn) = self.clients[p].conn {
            self.end_conn(conn, false);
        }
        let fresh = self.new_publisher(p);
        let old = std::mem::replace(&mut self.clients[p], fresh);
        self.retired.push(old);
        self.arm(p);
    }

    /// Client `c`'s program is killed and started again under its own
    /// publisher id (docs/DESIGN.md, "Identity and resume"): its connection
    /// closes, or goes silent toward it while what it sent still arrives
    /// (only the server's idle timeout ends that session); the new program
    /// begins an incarnation and connects at once. What the old one had
    /// not acknowledged is abandoned; what it had is still checked. (Not a
    /// publisher near the end of its pub_seqs: no incarnation is left
    /// there, and a restart counts on from the Welcome, as documented.)
    fn restart_program(&mut self, c: usize) {
        if self.pinned.is_some() || self.clients[c].first > u64::MAX / 2 {
            return;
        }
        self.out.program_restarts += 1;
        if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
            eprintln!(
                "{:?} client {}: program restarted (connection {:?})",
                self.now, self.clients[c].id.0, self.clients[c].conn
            );
        }
        if let Some(conn) = self.clients[c].conn {
            match self.rng.percent(50) {
                true => self.end_conn(conn, false),
                false => self.conns[conn].silent_down = true,
            }
        }
        let fresh = self.clients[c].restarted(self.now, self.plan.incarnations);
        let old = std::mem::replace(&mut self.clients[c], fresh);
        self.retired.push(old);
        self.run_client(c);
    }

    /// Client `c` publishes one message, if its window has room (its core
    /// sends it once it has a Welcome; a restarted program publishes from
    /// its first Welcome on).
    fn publish(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        if cl.gated || cl.core.unacked_len() >= 32 || cl.core.next_pub_seq().0 == u64::MAX {
            return;
        }
        self.out.published += 1;
        cl.publish(&mut self.checker);
        self.run_client(c);
    }

    /// Carries out client `c`'s actions and arms its core's timer.
    fn run_client(&mut self, c: usize) {
        while let Some(action) = self.clients[c].poll_action() {
            match action {
                Action::Connect(addr) => self.connect(c, &addr),
                Action::Send(frame) => {
                    if let Some(conn) = self.clients[c].conn {
                        self.send_up(conn, frame);
                    }
                }
                Action::Disconnect => {
                    if let Some(conn) = self.clients[c].conn {
                        self.end_conn(conn, false);
                    }
                }
            }
        }
        self.arm(c);
    }

    /// Schedules client `c`'s core timer, unless it is armed already for
    /// that time or earlier.
    fn arm(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        let Some(at) = cl.core.poll_timeout() else {
            return;
        };
        let at = at.max(self.now);
        if cl.armed.is_none_or(|armed| at < armed) {
            cl.armed = Some(at);
            self.schedule(at, Ev::ClientTimer(c, at));
        }
    }

    /// Client `c`'s timer armed for `at` fired (unless re-armed since).
    fn client_timer(&mut self, c: usize, at: Duration) {
        let cl = &mut self.clients[c];
        if cl.armed != Some(at) {
            return;
        }
        cl.armed = None;
        if cl.core.poll_timeout().is_some_and(|t| t <= self.now) {
            cl.core.handle_timeout(self.now);
        }
        self.run_client(c);
    }

    /// Client `c` connects to `addr` (the pinned client to its server,
    /// whatever it asks). A server that is down refuses after a round
    /// trip.
    fn connect(&mut self, c: usize, addr: &str) {
        if let Some(conn) = self.clients[c].conn {
            self.end_conn(conn, false);
        }
        let target = match self.pinned {
            Some((p, i)) if p == c => Some(i),
            _ => self.addrs.iter().position(|a| a == addr),
        };
        let Some((target, s)) = target.and_then(|i| self.servers[i].as_mut().map(|s| (i, s)))
        else {
            let (id, program) = (self.clients[c].id, self.clients[c].program);
            let at = self.now + Duration::from_micros(100);
            return self.schedule(at, Ev::ConnectFailed(c, id, program));
        };
        let session = SessionId(self.next_session);
        self.next_session += 1;
        let local = local_at(self.now, self.rates[target]);
        s.server.handle_open(local, session);
        self.conns.push(ClientConn {
            client: c,
            server: target,
            process: s.incarnation,
            session,
            live: true,
            closing: false,
            up_at: self.now,
            down_at: self.now,
            silent_up: false,
            silent_down: false,
        });
        let conn = self.conns.len() - 1;
        self.by_session.insert(session, conn);
        self.clients[c].conn = Some(conn);
        self.clients[c].core.handle_connected(self.now);
    }

    /// Client `c`'s attempt found no server (if it is still that client,
    /// still without a connection).
    fn connect_failed(&mut self, c: usize, id: PublisherId, program: u64) {
        let cl = &mut self.clients[c];
        if cl.id != id || cl.program != program || cl.conn.is_some() {
            return;
        }
        cl.core.handle_closed(self.now);
        self.run_client(c);
    }

    /// Ends client connection `conn`: the server is told (if the process
    /// still runs), and the client if `tell` (not when it closed it itself,
    /// or is going away).
    fn end_conn(&mut self, conn: usize, tell: bool) {
        let k = &mut self.conns[conn];
        if !k.live {
            return;
        }
        k.live = false;
        let (c, i, process, session) = (k.client, k.server, k.process, k.session);
        self.by_session.remove(&session);
        let local = self.local(i);
        if let Some(s) = self.servers[i]
            .as_mut()
            .filter(|s| s.incarnation == process)
        {
            s.server.handle_closed(local, session);
            s.server.end_batch(local);
        }
        let cl = &mut self.clients[c];
        if cl.conn != Some(conn) {
            return;
        }
        cl.conn = None;
        if tell {
            cl.core.handle_closed(self.now);
            self.run_client(c);
        }
    }

    /// Sends a client's frame up `conn` (at once for the pinned client).
    fn send_up(&mut self, conn: usize, frame: Bytes) {
        let k = &mut self.conns[conn];
        if !k.live || k.closing || k.silent_up {
            return;
        }
        // Frames travel as the codec delivers them: without the length prefix.
        let frame = frame.slice(4..);
        let pinned = self.pinned.is_some_and(|(p, _)| p == k.client);
        if pinned && k.up_at <= self.now {
            return self.arrive(Ev::Up(conn, frame));
        }
        let latency = match pinned {
            true => Duration::ZERO,
            false => Duration::from_micros(20 + self.rng.below(self.latency_max_us)),
        };
        let at = (self.now + latency).max(k.up_at);
        k.up_at = at;
        self.schedule(at, Ev::Up(conn, frame));
    }

    /// Carries server `i`'s client outputs onto their connections.
    fn output(&mut self, out: Output) {
        let (session, frame, close) = match out {
            Output::Transmit { session, frame, .. } => (session, Some(frame), false),
            Output::Close { session, frame, .. } => (session, frame, true),
        };
        let Some(&conn) = self.by_session.get(&session) else {
            return;
        };
        let latency = Duration::from_micros(20 + self.rng.below(self.latency_max_us));
        let k = &mut self.conns[conn];
        if !k.live || k.closing {
            return;
        }
        k.closing = close;
        if k.silent_down {
            // Nothing reaches the client, not even the close.
            return;
        }
        let at = (self.now + latency).max(k.down_at);
        k.down_at = at;
        if let Some(frame) = frame {
            self.schedule(at, Ev::Down(conn, frame.slice(4..)));
        }
        if close {
            self.schedule(at, Ev::Closed(conn));
        }
    }

    /// A server's frame reached client connection `conn`.
    fn deliver_down(&mut self, conn: usize, frame: Bytes) {
        let c = self.conns[conn].client;
        // (Not to a program restarted since: its connection is another.)
        if !self.conns[conn].live || self.clients[c].conn != Some(conn) {
            return;
        }
        let was_up = self.clients[c].welcomed();
        match self.clients[c].on_frame(self.now, frame, &self.checker) {
            Ok(acked) => self.out.acked += acked,
            Err(v) => {
                self.violation.get_or_insert(v);
                return;
            }
        }
        if std::env::var_os("CANOPY_SIM_TRACE").is_some() && !was_up && self.clients[c].welcomed() {
            let cl = &self.clients[c];
            eprintln!(
                "{:?} client {}: welcomed at server {} (acked {}, next {}, at {:?})",
                self.now,
                cl.id.0,
                self.conns[conn].server,
                cl.acked.0,
                cl.core.next_pub_seq().0,
                cl.core.position().at()
            );
        }
        self.run_client(c);
    }

    fn crash(&mut self, i: usize) {
        if self.servers[i].take().is_none() {
            return;
        }
        if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
            eprintln!("{:?} server {i}: crashed", self.now);
        }
        self.out.crashes += 1;
        // Its clients' connections reset: they fail over.
        for conn in 0..self.conns.len() {
            if self.conns[conn].live && self.conns[conn].server == i {
                self.end_conn(conn, true);
            }
        }
        for j in 0..self.n {
            self.generation[i][j] += 1;
            self.generation[j][i] += 1;
            // Usually a reset reaches the peer; sometimes it just goes quiet.
            if j != i && self.rng.percent(70) {
                let local = self.local(j);
                if let Some(s) = &mut self.servers[j] {
                    s.server.handle_link_down(local, NodeId(i as u32 + 1));
                }
            }
        }
    }

    /// Restarts server `i`, with its data directory if `keep_disk`.
    fn restart(&mut self, i: usize, keep_disk: bool) {
        if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
            eprintln!(
                "{:?} server {i}: restarted (disk kept: {keep_disk})",
                self.now
            );
        }
        if !keep_disk {
            self.out.disks_lost += 1;
            self.disks[i] = None;
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
        let len = self.failure_timeout * (2 + self.rng.below(8) as u32);
        self.heal_at = Some(self.now + len);
        if self.rng.percent(20) {
            // Non-transitive: two servers cannot reach each other, and both
            // reach everyone else.
            let a = self.rng.below(self.n as u64) as usize;
            let b = (a + 1 + self.rng.below(self.n as u64 - 1) as usize) % self.n;
            self.cut[a][b] = true;
            self.cut[b][a] = true;
            return;
        }
        // A random minority side (one server, or two of five), cut off both
        // ways, or one way only: it cannot send, or it cannot hear.
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
        let (mute, deaf) = match self.rng.below(10) {
            0..=1 => (true, false),
            2..=3 => (false, true),
            _ => (true, true),
        };
        for a in 0..self.n {
            for b in 0..self.n {
                if side[a] != side[b] && ((side[a] && mute) || (side[b] && deaf)) {
                    self.cut[a][b] = true;
                }
            }
        }
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
                self.restart(i, true);
            }
        }
    }

    /// What an operator does when a core cannot form because servers that
    /// lost their data directories outnumber what the rest can vouch for:
    /// wipes every data directory and restarts every server (the stream
    /// begins again; see the group's `basis`).
    fn wipe_and_restart_all(&mut self) {
        self.view_ids.clear();
        for i in 0..self.n {
            self.crash(i);
        }
        for i in 0..self.n {
            self.restart(i, false);
        }
    }

    fn break_link(&mut self, a: usize, b: usize) {
        self.out.breaks += 1;
        self.generation[a][b] += 1;
        for (x, y) in [(a, b), (b, a)] {
            let local = self.local(x);
            if let Some(s) = &mut self.servers[x] {
                s.server.handle_link_down(local, NodeId(y as u32 + 1));
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
                let local = self.local(f.to);
                let Some(s) = &mut self.servers[f.to] else {
                    return;
                };
                let msg =
                    wire::decode(f.bytes.slice(4..)).expect("frames the groups encoded decode");
                s.server.handle_peer(local, NodeId(f.from as u32 + 1), msg);
            }
            Ev::LinkUp { at, peer } => {
                if self.cut[at][peer] || self.servers[peer].is_none() {
                    return;
                }
                let local = self.local(at);
                if let Some(s) = &mut self.servers[at] {
                    s.server.handle_link_up(local, NodeId(peer as u32 + 1));
                }
            }
            Ev::Up(conn, bytes) => {
                let k = &self.conns[conn];
                if !k.live {
                    return;
                }
                let (i, process, session) = (k.server, k.process, k.session);
                let local = self.local(i);
                let Some(s) = self.process_mut(i, process) else {
                    return;
                };
                let frame = protocol::decode_client(bytes)
                    .expect("frames the model clients encoded decode");
                s.server.handle_frame(local, session, frame);
                s.server.end_batch(local);
            }
            Ev::Down(conn, bytes) => self.deliver_down(conn, bytes),
            Ev::Closed(conn) => self.end_conn(conn, true),
            Ev::ClientTimer(c, at) => self.client_timer(c, at),
            Ev::ConnectFailed(c, id, program) => self.connect_failed(c, id, program),
            Ev::Executed(i, process, job) => {
                let local = self.local(i);
                let Some(s) = self.process_mut(i, process) else {
                    return;
                };
                let Some(service) = s.group().rrpc().service().cloned() else {
                    return;
                };
                let result = job.run(&service);
                s.server.handle_executed(local, &job, result);
            }
        }
    }

    /// Server `i`, if it is still process `process` (not crashed or
    /// restarted since).
    fn process_mut(&mut self, i: usize, process: u64) -> Option<&mut Srv> {
        self.servers[i]
            .as_mut()
            .filter(|s| s.incarnation == process)
    }

    /// Carries every server's frames onto links, its group's events to the
    /// checker and its client outputs onto connections, until all are
    /// quiet.
    fn drain(&mut self) -> Result<(), Violation> {
        loop {
            let mut moved = false;
            for i in 0..self.n {
                let Some(s) = &mut self.servers[i] else {
                    continue;
                };
                let inc = s.incarnation;
                // The hard state is on disk before any frame leaves.
                if let Some(hard) = s.server.poll_hard_state() {
                    if let Some(v) = &hard.accepted {
                        self.accepted_by.insert((i, inc, v.id));
                    }
                    self.disks[i] = Some(hard);
                }
                // What either publisher table forgot: old retries of those
                // publishers may be ordered again (the price of the bound).
                let mut forgotten: Vec<_> =
                    s.server.node_mut().take_forgotten().into_iter().collect();
                if let Some(g) = s.server.group_mut() {
                    forgotten.extend(g.take_forgotten());
                }
                for (p, held) in forgotten {
                    let e = self.checker.forgotten.entry(p).or_default();
                    *e = (*e).max(held);
                }
                let mut frames = Vec::new();
                while let Some(t) = s.server.poll_transmit() {
                    frames.push(t);
                }
                let events = s.server.take_tapped();
                let mut outputs = Vec::new();
                while let Some(o) = s.server.poll_output() {
                    outputs.push(o);
                }
                let mut jobs = Vec::new();
                while let Some(job) = s.server.poll_job() {
                    jobs.push(job);
                }
                moved |= !frames.is_empty()
                    || !events.is_empty()
                    || !outputs.is_empty()
                    || !jobs.is_empty();
                // What the node was told is checked before any client
                // can see what the node made of it.
                for e in events {
                    self.event(i, inc, e)?;
                }
                self.compare_service(i)?;
                // A call's execution takes a while, off the server's loop;
                // a crash meanwhile loses it.
                for job in jobs {
                    let took = Duration::from_micros(20 + self.rng.below(3_000));
                    self.schedule(self.now + took, Ev::Executed(i, inc, job));
                }
                for (to, bytes) in frames {
                    self.send(i, to.0 as usize - 1, bytes);
                }
                for o in outputs {
                    self.output(o);
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
        let copies = match self.rng.percent(self.dup_pct) {
            true => 2,
            false => 1,
        };
        self.out.duplicates += copies - 1;
        for _ in 0..copies {
            self.schedule(
                at,
                Ev::Frame(Frame {
                    from,
                    to,
                    generation,
                    bytes: bytes.clone(),
                }),
            );
        }
    }

    /// One event of server `i`'s group, as its node took it.
    fn event(&mut self, i: usize, inc: u64, e: Event) -> Result<(), Violation> {
        self.out.digest = mix(self.out.digest, i as u64);
        if std::env::var_os("CANOPY_SIM_TRACE_EVENTS").is_some() {
            eprintln!("{:?} server {i}/{inc}: {e:?}", self.now);
        }
        match e {
            Event::Deliver(batch) => {
                self.checker.deliver(i, inc, &batch)?;
                if let Some(m) = batch.last() {
                    self.service_at[i].1 = self.service_at[i].1.max(m.seq);
                }
                self.out.delivered += batch.len() as u64;
                for m in &batch {
                    self.out.digest = mix(self.out.digest, m.seq.0 ^ (m.publisher.0 << 40));
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
                if self.service_at[i].0 != view.stream {
                    self.service_at[i] = (view.stream, at);
                }
                self.new_stream(view.stream)?;
                self.checker.view(i, inc, &view, at)?;
                let members: Vec<usize> =
                    view.members.iter().map(|m| m.node.0 as usize - 1).collect();
                let named = (view.stream, members.clone());
                match self.view_ids.get(&view.id) {
                    Some(before) if *before != named => {
                        return Err(Violation(format!(
                            "view agreement: view id {} reused: {before:x?} before, {named:x?} at server {i}",
                            view.id
                        )));
                    }
                    Some(_) => {}
                    None => {
                        self.view_ids.insert(view.id, named);
                    }
                }
                let members = view
                    .members
                    .iter()
                    .map(|m| (m.node.0 as usize - 1, m.incarnation.0))
                    .collect();
                self.installed
                    .entry(view.stream)
                    .or_default()
                    .entry(view.id)
                    .or_insert((self.now, members));
                if let Some(x) = self.isolate_at_first_view.take() {
                    self.isolate(x);
                    for j in (0..self.n).filter(|&j| j != x) {
                        self.break_link(x, j);
                    }
                }
            }
            // The server answered it with its node's snapshot.
            Event::SnapshotNeeded { .. } => {}
            Event::Reset(state) => {
                if std::env::var_os("CANOPY_SIM_TRACE").is_some() {
                    eprintln!(
                        "{:?} server {i}/{inc}: reset to {} stream {:x}",
                        self.now, state.head.0, state.stream
                    );
                }
                self.out.digest = mix(self.out.digest, state.head.0);
                self.new_stream(state.stream)?;
                self.service_at[i] = (state.stream, state.head);
                // The node's real snapshot: what it retains is the stream.
                let mut seq = state.first;
                for m in &state.msgs {
                    let stable = self.checker.content(state.stream, seq);
                    if stable != Some((m.0, m.1)) {
                        return Err(Violation(format!(
                            "agreement: server {i} was reset with {:?} at seq {seq} of stream {:x}, where the stream has {stable:?}",
                            (m.0, m.1),
                            state.stream
                        )));
                    }
                    seq = seq.next();
                }
                self.checker.reset(i, inc, state.stream, state.head)?;
            }
            Event::NotPrimary | Event::Retried { .. } => {}
        }
        Ok(())
    }

    /// A server reports `stream`. If it is new, every member of the newest
    /// installed view must have crashed since it was installed: without a
    /// durable message log that is the only way a stream's history can be
    /// gone. Otherwise a new stream drops acknowledged publishes that a
    /// surviving server holds (durability, as documented).
    fn new_stream(&mut self, stream: u64) -> Result<(), Violation> {
        if !self.streams.insert(stream) {
            return Ok(());
        }
        let previous = self.latest_stream.replace(stream);
        // View ids are never reused while a majority of the servers keep
        // their records; a core most of whose data directories were lost
        // may number its views afresh.
        let records_lost = self
            .disks
            .iter()
            .filter(|d| {
                d.as_ref()
                    .and_then(|d| d.accepted.as_ref())
                    .is_none_or(|v| v.stream == stream)
            })
            .count();
        if records_lost > self.n / 2 {
            self.view_ids.clear();
        }
        let newest = previous
            .and_then(|p| self.installed.get(&p))
            .and_then(|views| views.iter().next_back());
        let Some((id, (at, members))) = newest else {
            return Ok(());
        };
        self.out.stream_resets += 1;
        for &(m, inc) in members {
            // The process that was the member, still holding the view's
            // state (a member that never took the history holds none).
            let holds = self.servers[m].as_ref().is_some_and(|s| {
                s.first_incarnation <= inc
                    && s.booted < *at
                    && self.accepted_by.contains(&(m, s.incarnation, *id))
            });
            if holds {
                return Err(Violation(format!(
                    "durability: stream {stream:x} began while server {m} of view {id} (installed at {at:?}) still holds its state"
                )));
            }
        }
        Ok(())
    }

    /// After the settle time: one view of all servers, nothing pending,
    /// every client served.
    fn converged(&mut self) -> Result<(), Violation> {
        let mut view = None;
        let mut position = None;
        for (i, s) in self.servers.iter().enumerate() {
            let Some(s) = s else {
                return Err(Violation(format!("liveness: server {i} is down")));
            };
            if !s.group().is_primary() {
                return Err(Violation(format!(
                    "liveness: server {i} is not primary ({:?}) after faults stopped",
                    s.group().status()
                )));
            }
            let v = s.group().view().map(|v| (v.id, v.members.len()));
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
            // Every submission is ordered in the end: a server's own
            // membership events are submitted once, so one stuck here is
            // lost for good (and holds back every later one).
            if s.group().unordered_len() > 0 {
                let front = s.group().unordered_front();
                let tables: Vec<(Option<PubSeq>, PubSeq)> = front
                    .map(|(p, ..)| {
                        self.servers
                            .iter()
                            .flatten()
                            .map(|s| (s.group().pub_held(p), s.group().pub_delivered(p)))
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(Violation(format!(
                    "liveness: server {i} still has {} submissions the group never ordered (the oldest {front:?}; servers' held/delivered {tables:?})",
                    s.group().unordered_len()
                )));
            }
        }
        if view.map(|v| v.1) != Some(self.n) {
            return Err(Violation(format!(
                "liveness: the final view {view:?} does not hold all {} servers",
                self.n
            )));
        }
        let (stream, head) = position.unwrap_or_default();
        // Durability: every publish acknowledged in the final stream is in
        // it (one acknowledged in a stream that ended was checked when the
        // new one began).
        for pb in self.clients.iter().chain(&self.retired) {
            for k in pb.first..=pb.acked.0 {
                if pb.acked_stream(PubSeq(k)) == Some(stream)
                    && self.checker.program_of(stream, (pb.id, PubSeq(k))) != Some(pb.program)
                {
                    return Err(Violation(format!(
                        "durability: publisher {} pub_seq {k} (program {}) was acknowledged but is not in the stream {stream:x} as its publish (as program {:?}'s; elsewhere: {:?})",
                        pb.id.0,
                        pb.program,
                        self.checker.program_of(stream, (pb.id, PubSeq(k))),
                        self.checker.find(pb.id, PubSeq(k))
                    )));
                }
            }
        }
        self.calls_agree(stream)?;
        for c in 0..self.clients.len() {
            let cl = &self.clients[c];
            if !cl.welcomed() {
                return Err(Violation(format!(
                    "liveness: client {} is not connected (at {:?}, next timer {:?}; acked {:?}, unacked {}; servers' held/delivered {:?})",
                    cl.id.0,
                    cl.core.link().server(),
                    cl.core.poll_timeout(),
                    cl.acked,
                    cl.core.unacked_len(),
                    self.servers
                        .iter()
                        .flatten()
                        .map(|s| (s.group().pub_held(cl.id), s.group().pub_delivered(cl.id), s.group().pub_acknowledged(cl.id)))
                        .collect::<Vec<_>>()
                )));
            }
            if cl.core.unacked_len() > 0 {
                let tables: Vec<(Option<PubSeq>, PubSeq)> = self
                    .servers
                    .iter()
                    .flatten()
                    .map(|s| (s.group().pub_held(cl.id), s.group().pub_delivered(cl.id)))
                    .collect();
                return Err(Violation(format!(
                    "liveness: publisher {} still has {} unacknowledged publishes (next {:?}, acked {:?}, at {:?}; servers' held/delivered {tables:?})",
                    cl.id.0,
                    cl.core.unacked_len(),
                    cl.core.next_pub_seq(),
                    cl.acked,
                    cl.conn.map(|k| self.conns[k].server)
                )));
            }
            self.clients[c].check_final(&self.checker, stream, head)?;
        }
        self.members_agree()
    }

    /// Replicas agree at equal positions: server `i`'s replicated state
    /// (the service's, the queue of calls not applied yet, the reply table)
    /// is compared with every other server's at the same position of the
    /// same stream.
    fn compare_service(&mut self, i: usize) -> Result<(), Violation> {
        if !self.service {
            return Ok(());
        }
        let Some(s) = &self.servers[i] else {
            return Ok(());
        };
        let (stream, at) = self.service_at[i];
        if stream == 0 || s.group().delivered() != at {
            return Ok(());
        }
        // The fingerprint of the applies at every position (the whole
        // state, costly to encode, is compared once settled).
        let digest = s.group().rrpc().fingerprint();
        match self.digests.get(&(stream, at)) {
            Some(&(j, d)) if d != digest => Err(Violation(format!(
                "replicas disagree: server {i}'s replicated state at seq {at} of stream {stream:x} differs from server {j}'s there"
            ))),
            Some(_) => Ok(()),
            None => {
                self.digests.insert((stream, at), (i, digest));
                Ok(())
            }
        }
    }

    /// The service's state at server `i`, as its snapshot tells it.
    fn service_state(&self, i: usize) -> Option<ServiceState> {
        let s = self.servers[i].as_ref()?;
        let service = s.group().rrpc().service()?;
        let bytes = service.snapshot();
        ciborium::from_reader(&bytes[..]).ok()
    }

    /// Once settled, with the core in `stream`: every call was applied at
    /// most once at every replica, every call acknowledged in the stream
    /// was applied (at least once in effect), every caller has every reply,
    /// and every reply a caller was given in the stream is the state the
    /// replicas reached by applying that call.
    fn calls_agree(&mut self, stream: u64) -> Result<(), Violation> {
        if !self.service {
            return Ok(());
        }
        // Settled at one position: the whole replicated state is the same.
        let states: Vec<(usize, u64)> = (0..self.n)
            .filter_map(|i| Some((i, self.servers[i].as_ref()?.group().rrpc().digest())))
            .collect();
        if let Some(&(j, d)) = states.iter().find(|(_, d)| *d != states[0].1) {
            return Err(Violation(format!(
                "replicas disagree: server {j}'s replicated state differs from server {}'s once settled ({d:x} vs {:x})",
                states[0].0, states[0].1
            )));
        }
        let mut log = None;
        for i in 0..self.n {
            let Some(state) = self.service_state(i) else {
                continue;
            };
            let mut seen = HashSet::new();
            if let Some((id, _)) = state.log.iter().find(|(id, _)| !seen.insert(*id)) {
                return Err(Violation(format!(
                    "at most once: server {i} applied call {id} more than once"
                )));
            }
            log.get_or_insert(state.log);
        }
        let applied: HashMap<CallId, u64> = log.unwrap_or_default().into_iter().collect();
        self.out.reassigned = self
            .servers
            .iter()
            .flatten()
            .flat_map(|s| s.group().rrpc().stats().values())
            .map(|m| m.reassigned)
            .sum();
        for cl in self.clients.iter().chain(&self.retired) {
            if !cl.caller {
                continue;
            }
            for (pub_seq, (at, answer)) in &cl.replies {
                if *at != stream {
                    continue;
                }
                let id = CallId {
                    publisher: cl.id,
                    pub_seq: *pub_seq,
                };
                let got = match answer {
                    Ok(b) if cl.replies_of(*pub_seq) == Replies::All => every_reply(id, b)?,
                    Ok(b) => b.as_ref().try_into().ok().map(u64::from_le_bytes),
                    // Acknowledged in a stream that was lost (guarantee 5).
                    Err(e) if e.code == CallErrorCode::StreamReset => continue,
                    Err(e) => return Err(Violation(format!("replies: call {id} failed: {e}"))),
                };
                self.out.replies += 1;
                if applied.get(&id) != got.as_ref() {
                    return Err(Violation(format!(
                        "replies: call {id} was answered {got:x?}, but the replicas' state after applying it is {:x?}",
                        applied.get(&id)
                    )));
                }
            }
            for k in cl.first..=cl.acked.0 {
                let id = CallId {
                    publisher: cl.id,
                    pub_seq: PubSeq(k),
                };
                if cl.is_call(PubSeq(k))
                    && cl.acked_stream(PubSeq(k)) == Some(stream)
                    && !applied.contains_key(&id)
                {
                    return Err(Violation(format!(
                        "at least once: call {id} was acknowledged in stream {stream:x} but never applied"
                    )));
                }
            }
        }
        for cl in &self.clients {
            if let Some(pub_seq) = cl.core.pending_calls().next() {
                let id = CallId {
                    publisher: cl.id,
                    pub_seq,
                };
                let known: Vec<_> = self
                    .servers
                    .iter()
                    .flatten()
                    .map(|s| (s.group().lookup_call(id), s.group().pub_delivered(cl.id)))
                    .collect();
                return Err(Violation(format!(
                    "liveness: caller {} still waits for {} replies, the first {id} (acked {:?}; at the servers {known:?}; attached to {:?})",
                    cl.id.0,
                    cl.core.calls_pending(),
                    cl.acked,
                    cl.conn.map(|k| self.conns[k].server)
                )));
            }
        }
        Ok(())
    }

    /// Every server's membership state is the same, and lists each client
    /// at the server it is attached to (adoption included).
    fn members_agree(&self) -> Result<(), Violation> {
        let report = |i: usize| {
            self.servers[i]
                .as_ref()
                .map(|s| s.server.node().members().report(Seq(0)))
        };
        let first = report(0);
        for i in 1..self.n {
            if report(i) != first {
                return Err(Violation(format!(
                    "membership: server {i}'s differs from server 0's:\n  {i}: {:?}\n  0: {first:?}",
                    report(i)
                )));
            }
        }
        let Some(first) = first else {
            return Ok(());
        };
        for cl in &self.clients {
            let Some(conn) = cl.conn else { continue };
            let at = self.conns[conn].server;
            let server = self.servers[at]
                .as_ref()
                .map(|s| s.server.node().config().id);
            let session = self.conns[conn].session.0;
            let listed = first.joined.iter().find(|e| e.id == cl.id);
            if listed.map(|e| (e.server, e.session)) != server.map(|s| (s, session)) {
                return Err(Violation(format!(
                    "membership: client {} is at server {at} but listed as {listed:?}",
                    cl.id.0
                )));
            }
        }
        Ok(())
    }
}

/// The one reply every replica gave to call `id` (`body`: the replicas'
/// votes), or a violation: none, a replica twice, or replies that differ
/// (the service is deterministic).
fn every_reply(id: CallId, body: &Bytes) -> Result<Option<u64>, Violation> {
    let votes: Vec<Vote> = ciborium::from_reader(&body[..])
        .map_err(|e| Violation(format!("replies: call {id}'s votes do not decode: {e}")))?;
    let servers: HashSet<u32> = votes.iter().map(|v| v.server).collect();
    let first = votes.first().map(|v| v.reply.clone());
    if servers.len() != votes.len() || votes.iter().any(|v| Some(&v.reply) != first.as_ref()) {
        return Err(Violation(format!(
            "replies: call {id}'s replicas voted twice or otherwise: {votes:?}"
        )));
    }
    match first {
        Some(Ok(b)) => Ok(b.as_ref().try_into().ok().map(u64::from_le_bytes)),
        Some(Err(e)) => Err(Violation(format!(
            "replies: call {id} failed at every replica: {e}"
        ))),
        None => Err(Violation(format!(
            "replies: call {id} had no replica's reply"
        ))),
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
        .find_map(|s| s.group().view().map(|v| v.id.coordinator.0 as usize - 1))
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
    w.pin(0, cut);
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
            .is_some_and(|s| s.group().is_primary()),
        majority_delivered: w.checker.position(other, inc(&w, other)).1 .0 - majority_before.0,
        published_there: w.out.published - published_before,
    };
    w.unpin();
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
    w.restart(1, false);
    let end = w.now + w.failure_timeout * 10;
    w.run_until(end, false)?;
    for i in [1, 2] {
        if w.servers[i]
            .as_ref()
            .is_some_and(|s| s.group().is_primary())
        {
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

/// Restart-safety scenarios (issue 10), scripted on a 3-server core. Each
/// is also run against the broken build of `GroupBugs` that restores the
/// code before its fix (commit `a193af3`: no hard state, the cold-start
/// rule, a rejoin that drops own submissions, no submission numbers, no
/// `hears`), and fails there (`cluster_tests::restart_safety`). The scripts
/// need the simulator's disks, which `a193af3` lacks, so they were not run
/// on that commit itself; the real-process deaf-server test
/// (`tests/restart.rs`) was, and failed there.
impl World {
    /// A scripted 3-server world (see `scripted`) with `plan`'s knobs,
    /// stopped as soon as every server installed the first view.
    fn first_view(seed: u64, plan: ClusterPlan) -> Result<World, Violation> {
        let mut w = World::new(
            seed,
            ClusterPlan {
                servers: Some(3),
                ..plan
            },
        );
        w.load = true;
        let deadline = Duration::from_secs(2);
        while w.now < deadline {
            let step = w.now + w.heartbeat;
            w.run_until(step, false)?;
            if (0..3).all(|i| w.primary(i)) {
                return Ok(w);
            }
        }
        Err(Violation("no first view within 2 s".into()))
    }

    /// [`World::first_view`] with the default plan but `bugs`.
    fn scenario(seed: u64, bugs: GroupBugs) -> Result<World, Violation> {
        let plan = ClusterPlan {
            bugs,
            ..ClusterPlan::default()
        };
        World::first_view(seed, plan)
    }

    /// The index of the current view's coordinator, as server 1 sees it.
    fn coordinator(&self) -> Result<usize, Violation> {
        self.servers[0]
            .as_ref()
            .and_then(|s| s.group().view())
            .map(|v| v.id.coordinator.0 as usize - 1)
            .ok_or_else(|| Violation("no view".into()))
    }

    fn primary(&self, i: usize) -> bool {
        self.servers[i]
            .as_ref()
            .is_some_and(|s| s.group().is_primary())
    }

    /// Holds client `c` on server `i` whatever it says; its frames reach
    /// the server at once.
    fn pin(&mut self, c: usize, i: usize) {
        self.pinned = Some((c, i));
        match self.clients[c].conn {
            Some(conn) if self.conns[conn].server == i => return,
            Some(conn) => {
                self.end_conn(conn, false);
                self.clients[c].core.handle_closed(self.now);
            }
            None => {}
        }
        // It connects now, to `i`.
        let core = &mut self.clients[c].core;
        core.reset_backoff(self.now);
        core.handle_timeout(self.now);
        self.run_client(c);
    }

    /// Lets the pinned client go where it likes again.
    fn unpin(&mut self) {
        self.pinned = None;
    }

    /// Runs until client `c` has its Welcome.
    fn welcomed(&mut self, c: usize) -> Result<(), Violation> {
        for _ in 0..100 {
            if self.clients[c].welcomed() {
                return Ok(());
            }
            self.run_for(self.heartbeat)?;
        }
        Err(Violation(format!("setup: client {c} got no Welcome")))
    }

    /// Cuts server `i` off from the others both ways.
    fn isolate(&mut self, i: usize) {
        for j in 0..self.n {
            if j != i {
                self.cut[i][j] = true;
                self.cut[j][i] = true;
            }
        }
    }

    fn run_for(&mut self, d: Duration) -> Result<(), Violation> {
        let end = self.now + d;
        self.run_until(end, false)
    }

    /// Heals every cut, stops new publishes, and requires convergence with
    /// every acknowledged publish (and availability).
    fn heal_and_converge(&mut self) -> Result<(), Violation> {
        self.unpin();
        self.load = false;
        self.heal_partition();
        self.run_for(self.plan.settle)?;
        self.converged()?;
        self.available()
    }

    /// Requires servers `down` to stay out of any primary view for ten
    /// failure timeouts.
    fn stays_not_primary(&mut self, down: &[usize], why: &str) -> Result<(), Violation> {
        for _ in 0..10 {
            self.run_for(self.failure_timeout)?;
            if let Some(&i) = down.iter().find(|&&i| self.primary(i)) {
                return Err(Violation(format!(
                    "primary component: server {} went on without the newest state ({why})",
                    i + 1
                )));
            }
        }
        Ok(())
    }
}

/// Scenario 1: server 3 is cut off the moment the first view is installed
/// (by its coordinator), frames in flight lost: it accepted the view and
/// holds nothing. Servers 1 and 2 order and acknowledge publishes; server 2
/// is cut off and server 1 crashes and restarts with its data directory.
/// Restarted 1 and stale 3 must not form a view (before the fix they
/// ordered seq 1, 2, ... again under the same stream id); after the heal
/// everything converges with every acknowledged publish.
///
/// # Errors
/// The first broken guarantee.
pub(crate) fn stream_restarted_under_the_same_id(
    seed: u64,
    bugs: GroupBugs,
) -> Result<(), Violation> {
    let plan = ClusterPlan {
        bugs,
        servers: Some(3),
        ..ClusterPlan::default()
    };
    let mut w = World::new(seed, plan);
    w.load = true;
    w.isolate_at_first_view = Some(2);
    w.run_for(Duration::from_secs(1))?;
    let without_3 = [0, 1].iter().all(|&i| {
        w.primary(i)
            && w.servers[i]
                .as_ref()
                .and_then(|s| s.group().view())
                .is_some_and(|v| v.members.len() == 2)
    });
    let holds_nothing = w.servers[2]
        .as_ref()
        .is_some_and(|s| s.group().held() == Seq(0));
    if !without_3 || !holds_nothing {
        let views: Vec<_> = (0..3)
            .map(|i| {
                w.servers[i]
                    .as_ref()
                    .and_then(|s| s.group().view().map(|v| (v.id, v.members.len())))
            })
            .collect();
        return Err(Violation(format!(
            "setup: servers 1 and 2 did not go on without 3, which holds nothing: {without_3} {holds_nothing} {views:?}"
        )));
    }
    w.heal_partition();
    w.isolate(1);
    w.crash(0);
    w.restart(0, true);
    w.stays_not_primary(&[0, 2], "restarted server 1 and stale server 3")?;
    w.heal_and_converge()
}

/// Scenario 2: servers 1 and 2 crash and restart with their data
/// directories while server 3, which holds everything acknowledged, is cut
/// off. They must wait for it (before the fix they began a fresh stream
/// and server 3 was reset into it, losing every acknowledged publish).
///
/// # Errors
/// The first broken guarantee.
pub(crate) fn acknowledged_publishes_survive_a_majority_restart(
    seed: u64,
    bugs: GroupBugs,
) -> Result<(), Violation> {
    let mut w = World::scenario(seed, bugs)?;
    w.run_for(Duration::from_secs(1))?;
    w.isolate(2);
    for i in [0, 1] {
        w.crash(i);
        w.restart(i, true);
    }
    w.stays_not_primary(&[0, 1], "servers 1 and 2 restarted without messages")?;
    w.heal_and_converge()
}

/// Scenario 3: the first view forms; server 3 is cut off; servers 1 and 2
/// crash and restart. Before the fix a restarted coordinator issued the
/// first view's id again with other members in another stream, and after
/// the heal server 3 stayed `Flushing` for good. Every view id must name
/// one view, and the core must converge.
///
/// # Errors
/// The first broken guarantee.
pub(crate) fn view_ids_are_never_reused(seed: u64, bugs: GroupBugs) -> Result<(), Violation> {
    let mut w = World::scenario(seed, bugs)?;
    w.isolate(2);
    for i in [0, 1] {
        w.crash(i);
        w.restart(i, true);
    }
    w.run_for(w.failure_timeout * 10)?;
    w.heal_and_converge()
}

/// Scenario 4: with a small publisher table that has evicted publishers,
/// a new publisher's first publish is lost with a broken link to the
/// sequencer and its second arrives on the new link. The second must not
/// be ordered before the first (before the fix it was, and the first was
/// then dropped as a retry although the cumulative acknowledgement covered
/// it).
///
/// # Errors
/// The first broken guarantee.
pub(crate) fn a_lost_submit_is_not_overtaken_after_eviction(
    seed: u64,
    bugs: GroupBugs,
) -> Result<(), Violation> {
    let plan = ClusterPlan {
        bugs,
        publishers_max: Some(2),
        ..ClusterPlan::default()
    };
    let mut w = World::first_view(seed, plan)?;
    // Load until the sequencer's table has forgotten someone.
    w.run_for(Duration::from_secs(1))?;
    let coordinator = w.coordinator()?;
    let via = (coordinator + 1) % 3;
    w.load = false;
    let p = w.clients.len();
    let fresh = w.new_publisher(p);
    w.clients.push(fresh);
    w.pin(p, via);
    w.welcomed(p)?;
    w.publish(p);
    w.drain()?;
    // The first `Submit` is in flight: the link breaks under it.
    w.break_link(via, coordinator);
    w.publish(p);
    w.drain()?;
    w.run_for(w.failure_timeout * 4)?;
    w.unpin();
    w.heal_and_converge()
}

/// Scenario 5: a server whose outgoing links are cut holds its own
/// undelivered submissions (the detach and attach of a client that
/// reconnects there; a node's membership events are submitted once). It
/// still hears the others, learns that a newer view went on without it,
/// and rejoins. Its submissions must survive the rejoin (before the fix
/// `rejoin` dropped them, the next one skipped a pub_seq, and the sequencer
/// waited for the missing one for good).
///
/// # Errors
/// The first broken guarantee.
pub(crate) fn own_submissions_survive_a_rejoin(
    seed: u64,
    bugs: GroupBugs,
) -> Result<(), Violation> {
    // No eviction: the sequencer orders past a revived publisher's gap.
    let plan = ClusterPlan {
        bugs,
        publishers_max: Some(1_000),
        ..ClusterPlan::default()
    };
    let mut w = World::first_view(seed, plan)?;
    let cut = (w.coordinator()? + 1) % 3;
    w.pin(0, cut);
    w.welcomed(0)?;
    for j in (0..3).filter(|&j| j != cut) {
        w.cut[cut][j] = true;
    }
    // Publishes in flight, then the client reconnects: a detach and an
    // attach that cannot reach the sequencer.
    for _ in 0..5 {
        w.publish(0);
    }
    w.drain()?;
    if let Some(conn) = w.clients[0].conn {
        w.end_conn(conn, true);
    }
    w.welcomed(0)?;
    w.run_for(w.failure_timeout * 10)?;
    w.heal_partition();
    w.run_for(w.failure_timeout * 10)?;
    // More own events follow the ones held over the rejoin.
    for _ in 0..3 {
        w.publish(0);
    }
    w.run_for(w.failure_timeout * 10)?;
    w.heal_and_converge()
}

/// Scenario 6: server 3 cannot hear the others (its inbound links are
/// cut), while they hear its heartbeats, for 40 failure timeouts under
/// load. The majority must stay primary (before the fix server 3 was
/// proposed into every view, each flush stalled, and the majority was
/// primary less than half of the time): the run's availability check.
///
/// # Errors
/// The first broken guarantee, availability included.
pub(crate) fn a_deaf_server_does_not_make_the_majority_flap(
    seed: u64,
    bugs: GroupBugs,
) -> Result<(), Violation> {
    let mut w = World::scenario(seed, bugs)?;
    for j in [0, 1] {
        w.cut[j][2] = true;
    }
    w.run_for(w.failure_timeout * 40)?;
    w.available()?;
    w.heal_and_converge()
}

/// Held messages taken back: the coordinator's outgoing links are cut
/// (it still hears the others), and a publisher pinned to it has publishes
/// ordered that no one else gets: held there, never stable. The two
/// others flush a view without it; its proposer crashes after the other
/// accepted that view and before it was committed, so the view orders
/// nothing. After the heal the old coordinator is lagging in the same
/// stream with nothing delivered beyond what the others hold: it keeps
/// its prefix and must take its held messages back openly (`Unheld`)
/// before the new history replaces them.
///
/// # Errors
/// The first broken guarantee; a "setup" error when the seed's timing
/// did not reach the point where held messages are taken back.
pub(crate) fn held_messages_are_taken_back(seed: u64, bugs: GroupBugs) -> Result<(), Violation> {
    let mut w = World::scenario(seed, bugs)?;
    w.run_for(Duration::from_millis(200))?;
    w.load = false;
    let c = w.coordinator()?;
    let others: Vec<usize> = (0..3).filter(|&j| j != c).collect();
    for &j in &others {
        w.cut[c][j] = true;
    }
    w.pin(0, c);
    w.welcomed(0)?;
    for _ in 0..3 {
        w.publish(0);
    }
    w.drain()?;
    // Step (below the least link latency) until one of the others has
    // accepted a view the other proposed without `c`; then crash its
    // proposer before the acceptance reaches it.
    let deadline = w.now + w.failure_timeout * 20;
    let proposer = loop {
        if w.now > deadline {
            return Err(Violation(
                "setup: no view was accepted without the coordinator".into(),
            ));
        }
        w.run_for(Duration::from_micros(20))?;
        let accepted = others.iter().find_map(|&j| {
            let g = w.servers[j].as_ref()?.group();
            let v = g.state_view()?;
            let k = v.coordinator.0 as usize - 1;
            (g.status() == Status::Accepted && k != c && k != j).then_some(k)
        });
        if let Some(k) = accepted {
            break k;
        }
    };
    w.crash(proposer);
    w.heal_partition();
    w.unpin();
    w.run_for(w.failure_timeout * 10)?;
    if w.out.unheld == 0 {
        return Err(Violation("setup: no held message was taken back".into()));
    }
    w.restart(proposer, true);
    w.heal_and_converge()
}

/// How many failure timeouts a majority must have been connected before
/// the availability measure expects a primary among them (a view change
/// takes up to a failure timeout to notice and a flush timeout to retry).
const AVAILABLE_AFTER: u32 = 4;

/// The least availability a run must show (see `World::available`).
const AVAILABILITY_MIN: f64 = 0.9;

/// A clock running at `rate` thousandths of real time, at real time `t`.
fn local_at(t: Duration, rate: u64) -> Duration {
    Duration::from_nanos((t.as_nanos() as u64).saturating_mul(rate) / 1000)
}

/// The earliest real time at which a clock running at `rate` shows `d`.
fn global_at(d: Duration, rate: u64) -> Duration {
    Duration::from_nanos((d.as_nanos() as u64).saturating_mul(1000).div_ceil(rate))
}

fn mix(h: u64, x: u64) -> u64 {
    (h ^ x)
        .wrapping_mul(0x100_0000_01b3)
        .rotate_left(29)
        .wrapping_add(0x9e37_79b9)
}
