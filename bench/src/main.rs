//! `canopy-bench`: load generator and side-by-side broker comparisons.
//!
//! `canopy-bench fanout` connects N subscriber connections and P publishers
//! to a broker, then runs two phases:
//! 1. **throughput**: the publishers send M messages as fast as the broker
//!    takes them; every subscriber checks completeness and order, and the
//!    aggregate delivered rate is `N * M / time until the last subscriber
//!    has everything`;
//! 2. **latency**: a paced run at `--rate` messages per second; each payload
//!    carries its send time and subscribers record the one-way latency in an
//!    HDR histogram (p50/p99/p99.9).
//!
//! `canopy-bench failover` times a 3-server core's recovery from a crash,
//! and `canopy-bench scale` streams to thousands of subscriber connections
//! through relay tiers of real processes, and `canopy-bench weak` compares
//! weak and strong delivery at every level of one tree, and `canopy-bench
//! rpc` measures replicated RPC against nats-server request-reply (see their
//! modules).
//!
//! `fanout` runs against Canopy (in-process on its own runtime threads, or a
//! running server with `--addr`) and against `nats-server` (started from
//! PATH, or a running one with `--nats-addr`), in the same process and run.

mod bare;
mod brokers;
mod failover;
mod harness;
mod rpc;
mod scale;
mod slow;
mod weak;

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::{Duration, Instant};

/// The allocator the `canopy` binary uses, for the servers this process
/// runs and for every broker's clients alike.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(about = "Canopy load generator and broker comparisons")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fan-out: P publishers, N subscribers on one topic.
    Fanout(FanoutArgs),
    /// Failover of a 3-server core: crash the coordinator under load and
    /// time the new view and the publishers' recovery.
    Failover(failover::FailoverArgs),
    /// Scale: thousands of subscriber connections through relay tiers of
    /// real processes, with a steady stream.
    Scale(scale::ScaleArgs),
    /// Weak and strong delivery side by side at every level of one tree
    /// of real processes, in one run.
    Weak(weak::WeakArgs),
    /// Replicated RPC: calls per second and latency for each mode, against
    /// nats-server request-reply with a queue group of 3, and load-balanced
    /// with 3 replicas against 1.
    Rpc(rpc::RpcArgs),
    /// Slow readers beside fast subscribers: the fast ones' latency, the
    /// node's memory and queued bytes, and what became of the slow ones.
    Slow(slow::SlowArgs),
}

/// Which brokers to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Canopy only.
    Canopy,
    /// nats-server only.
    Nats,
    /// Both, Canopy first.
    Both,
    /// Canopy as one node and as a 3-server core (clients spread over its
    /// servers), interleaved.
    Core,
    /// The 3-server core only (for profiling it alone).
    Core3,
    /// One node, a core of one server, the 3-server core, nats-server and
    /// the bare fan-out server, interleaved: what the group's machinery
    /// costs and what replicating to two more servers costs, apart.
    Cores,
    /// Canopy as one node over plain TCP and over TLS (development
    /// certificates), interleaved: the cost of TLS.
    Tls,
    /// Canopy as one node and as a 3-server core, nats-server, and the
    /// bare fan-out server (the machine's ceiling), interleaved.
    All,
}

/// Whether Canopy runs with its dashboard open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DashboardMode {
    /// HTTP off.
    Off,
    /// Dashboard open during every Canopy run.
    On,
    /// Each repetition runs Canopy closed, then open.
    Both,
}

/// Arguments of `fanout`.
#[derive(Parser, Clone, Debug)]
pub struct FanoutArgs {
    /// Subscriber connections, comma-separated for several runs (e.g. 1,100,1000).
    #[arg(long, default_value = "100", value_delimiter = ',')]
    pub subs: Vec<usize>,
    /// Messages published in the throughput phase.
    #[arg(long, default_value_t = 100_000)]
    pub msgs: u64,
    /// Payload size in bytes (at least 16: a timestamp and a counter).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    pub pubs: usize,
    /// Paced rate of the latency phase, messages per second (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Duration of the latency phase, seconds.
    #[arg(long, default_value_t = 3)]
    pub latency_secs: u64,
    /// Target a running Canopy server instead of starting one in-process.
    #[arg(long)]
    pub addr: Option<String>,
    /// Target a running nats-server instead of starting `nats-server` from PATH.
    #[arg(long)]
    pub nats_addr: Option<String>,
    /// Which brokers to run.
    #[arg(long, value_enum, default_value = "canopy")]
    pub broker: Target,
    /// Repeat each configuration this many times and report the median.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Canopy only: `on` serves the dashboard and keeps a live page stream
    /// and a metrics scrape per second going during the run; `both` runs
    /// Canopy with it closed and open, interleaved, to measure its cost.
    #[arg(long, value_enum, default_value = "off")]
    pub dashboard: DashboardMode,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// What one subscriber saw.
#[derive(Debug, Default, Clone)]
pub struct SubReport {
    /// Messages received.
    pub received: u64,
    /// Out-of-order, duplicated or skipped messages seen.
    pub order_violations: u64,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Broker name.
    pub broker: &'static str,
    /// Subscriber connections.
    pub subs: usize,
    /// Publisher connections.
    pub pubs: usize,
    /// Messages published.
    pub msgs: u64,
    /// Payload bytes.
    pub size: usize,
    /// Published messages per second (until the last was accepted).
    pub publish_rate: f64,
    /// Delivered messages per second, all subscribers together.
    pub delivered_rate: f64,
    /// Subscribers that received every message.
    pub complete_subs: usize,
    /// Messages missing, summed over subscribers.
    pub missing: u64,
    /// Order violations, summed over subscribers.
    pub order_violations: u64,
    /// Latency phase rate, messages per second.
    pub latency_rate: u64,
    /// Latency percentiles in microseconds: p50, p99, p99.9.
    pub latency_us: [u64; 3],
    /// Latency samples recorded.
    pub latency_samples: u64,
    /// Whether the dashboard was open during the run.
    pub dashboard: bool,
}

/// Per-message checks shared by all brokers: order per publisher and counts.
pub struct Checker {
    expect_per_pub: Vec<u64>,
    report: SubReport,
    latency: Histogram<u64>,
    base: Instant,
}

impl Checker {
    /// A checker for `pubs` publishers; timestamps are relative to `base`.
    pub fn new(pubs: usize, base: Instant) -> Self {
        Checker {
            expect_per_pub: vec![0; pubs],
            report: SubReport::default(),
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            base,
        }
    }

    /// A checker whose latency histogram keeps 2 significant digits
    /// instead of 3 (a tenth of the memory), for runs with many of them.
    pub fn compact(pubs: usize, base: Instant) -> Self {
        Checker {
            latency: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds"),
            ..Checker::new(pubs, base)
        }
    }

    /// Checks one payload: `[publisher u32][counter u32][sent nanos u64]...`.
    pub fn observe(&mut self, payload: &[u8], record_latency: bool) {
        self.report.received += 1;
        let Some(head) = payload.get(..16) else {
            self.report.order_violations += 1;
            return;
        };
        let publisher = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let counter = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
        let sent = u64::from_le_bytes([
            head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
        ]);
        match self.expect_per_pub.get_mut(publisher) {
            Some(next) if *next == counter => *next += 1,
            Some(next) => {
                self.report.order_violations += 1;
                *next = counter + 1;
            }
            None => self.report.order_violations += 1,
        }
        if record_latency {
            let now = self.base.elapsed().as_nanos() as u64;
            let _ = self
                .latency
                .record((now.saturating_sub(sent) / 1000).max(1));
        }
    }

    /// Resets order tracking for a new phase.
    pub fn reset_counters(&mut self) {
        self.expect_per_pub.iter_mut().for_each(|c| *c = 0);
        self.report = SubReport::default();
    }

    /// What was seen.
    pub fn report(&self) -> SubReport {
        self.report.clone()
    }

    /// The latency histogram.
    pub fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }
}

/// Fills a payload for publisher `publisher`, message `counter`.
pub fn payload(size: usize, publisher: u32, counter: u32, base: Instant) -> Vec<u8> {
    let mut p = vec![0u8; size.max(16)];
    p[..4].copy_from_slice(&publisher.to_le_bytes());
    p[4..8].copy_from_slice(&counter.to_le_bytes());
    p[8..16].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
    p
}

/// Splits `total` messages among `pubs` publishers.
pub fn share(total: u64, pubs: usize, i: usize) -> u64 {
    total / pubs as u64 + u64::from((i as u64) < total % pubs as u64)
}

/// Summarises subscriber reports into a [`RunReport`].
#[allow(clippy::too_many_arguments)]
pub fn summarise(
    broker: &'static str,
    dashboard: bool,
    args: &FanoutArgs,
    subs: usize,
    publish_elapsed: Duration,
    deliver_elapsed: Duration,
    reports: &[SubReport],
    latency: &Histogram<u64>,
) -> RunReport {
    let complete = reports
        .iter()
        .filter(|r| r.received == args.msgs && r.order_violations == 0)
        .count();
    let delivered: u64 = reports.iter().map(|r| r.received.min(args.msgs)).sum();
    RunReport {
        broker,
        subs,
        pubs: args.pubs,
        msgs: args.msgs,
        size: args.size,
        publish_rate: args.msgs as f64 / publish_elapsed.as_secs_f64(),
        delivered_rate: delivered as f64 / deliver_elapsed.as_secs_f64(),
        complete_subs: complete,
        missing: reports
            .iter()
            .map(|r| args.msgs.saturating_sub(r.received))
            .sum(),
        order_violations: reports.iter().map(|r| r.order_violations).sum(),
        latency_rate: args.rate,
        latency_us: [
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99),
            latency.value_at_quantile(0.999),
        ],
        latency_samples: latency.len(),
        dashboard,
    }
}

fn median(mut runs: Vec<RunReport>) -> RunReport {
    runs.sort_by(|a, b| a.delivered_rate.total_cmp(&b.delivered_rate));
    runs.swap_remove(runs.len() / 2)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Cmd::Fanout(args) => args,
        Cmd::Failover(args) => return failover::main(&args),
        Cmd::Scale(args) => return scale::main(&args),
        Cmd::Weak(args) => return weak::main(&args),
        Cmd::Rpc(args) => return rpc::main(&args),
        Cmd::Slow(args) => return slow::main(&args),
    };
    anyhow::ensure!(
        args.size >= 16,
        "--size must be at least 16 bytes (timestamp and counter)"
    );
    anyhow::ensure!(
        args.pubs >= 1 && args.repeat >= 1,
        "--pubs and --repeat must be at least 1"
    );
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Every configuration of one subscriber count runs once per
    // repetition, interleaved, so that drift on a shared machine hits them
    // alike; each reports the median of its repetitions.
    let mut configs = Vec::new();
    if matches!(args.broker, Target::Canopy | Target::Both) {
        match args.dashboard {
            DashboardMode::Off => configs.push((brokers::Kind::Canopy, false)),
            DashboardMode::On => configs.push((brokers::Kind::Canopy, true)),
            DashboardMode::Both => {
                configs.push((brokers::Kind::Canopy, false));
                configs.push((brokers::Kind::Canopy, true));
            }
        }
    }
    if matches!(args.broker, Target::Core | Target::All) {
        configs.push((brokers::Kind::Canopy, false));
        configs.push((brokers::Kind::Core, false));
    }
    if matches!(args.broker, Target::Core3) {
        configs.push((brokers::Kind::Core, false));
    }
    if matches!(args.broker, Target::Cores) {
        configs.push((brokers::Kind::Canopy, false));
        configs.push((brokers::Kind::CoreOfOne, false));
        configs.push((brokers::Kind::Core, false));
    }
    if matches!(args.broker, Target::Tls) {
        configs.push((brokers::Kind::Canopy, false));
        configs.push((brokers::Kind::Tls, false));
    }
    if matches!(
        args.broker,
        Target::Nats | Target::Both | Target::Cores | Target::All
    ) {
        configs.push((brokers::Kind::Nats, false));
    }
    if matches!(args.broker, Target::Cores | Target::All) {
        configs.push((brokers::Kind::Bare, false));
    }
    let mut results = Vec::new();
    for &subs in &args.subs {
        let mut runs: Vec<Vec<RunReport>> = vec![Vec::new(); configs.len()];
        for _ in 0..args.repeat {
            for (i, &(kind, dashboard)) in configs.iter().enumerate() {
                runs[i].push(clients.block_on(harness::run(&args, subs, kind, dashboard))?);
            }
        }
        results.extend(runs.into_iter().map(median));
        if !args.json {
            eprintln!("done: {subs} subscribers");
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_table(&results);
    }
    Ok(())
}

fn print_table(results: &[RunReport]) {
    if results.iter().any(|r| r.dashboard) {
        println!("(runs marked + had the dashboard open)");
    }
    println!(
        "{:<10} {:>6} {:>5} {:>9} {:>6} {:>12} {:>14} {:>10} {:>8} {:>6} {:>9} {:>9} {:>9}",
        "broker",
        "subs",
        "pubs",
        "msgs",
        "size",
        "publish/s",
        "delivered/s",
        "complete",
        "missing",
        "order",
        "p50 us",
        "p99 us",
        "p99.9 us"
    );
    for r in results {
        println!(
            "{:<10} {:>6} {:>5} {:>9} {:>6} {:>12.0} {:>14.0} {:>10} {:>8} {:>6} {:>9} {:>9} {:>9}",
            format!("{}{}", r.broker, if r.dashboard { "+" } else { "" }),
            r.subs,
            r.pubs,
            r.msgs,
            r.size,
            r.publish_rate,
            r.delivered_rate,
            format!("{}/{}", r.complete_subs, r.subs),
            r.missing,
            r.order_violations,
            r.latency_us[0],
            r.latency_us[1],
            r.latency_us[2]
        );
    }
}
