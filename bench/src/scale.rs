//! `canopy-bench scale`: many subscriber connections through relays.
//!
//! Starts a tree of real `canopy` processes (`canopy up`'s launcher: 3 core
//! servers and relay tiers, by default 2 then 4 relays), connects N
//! subscribers spread over the leaf relays, and has one publisher at the
//! core publish a steady paced stream. Reported:
//! - **delivered msgs/s**: all subscribers together, from the first publish
//!   until the last subscriber has every message;
//! - **latency** p50/p99/p99.9 (publish to delivery, sampled at every tenth
//!   subscriber: a histogram per subscriber would cost more memory than
//!   the connections under test);
//! - **memory per connection**: the leaf relays' resident memory after the
//!   subscribers connected, minus before, divided by N; the same for the
//!   bench process (the client side).
//!
//! Every subscriber checks order and completeness.

use crate::{payload, Checker};
use canopy_broker::launcher::{Launched, TreeConfig};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

/// Arguments of `scale`.
#[derive(Parser, Clone, Debug)]
pub struct ScaleArgs {
    /// Subscriber connections.
    #[arg(long, default_value_t = 10_000)]
    pub subs: usize,
    /// Relays per tier, top down (comma-separated).
    #[arg(long, default_value = "2,4", value_delimiter = ',')]
    pub tiers: Vec<usize>,
    /// Messages per second, published at the core.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Payload bytes (at least 16).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// The `canopy` binary [default: beside this one].
    #[arg(long)]
    pub canopy: Option<std::path::PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

const TOPIC: &str = "bench.scale";
/// One subscriber in this many records latency.
const LATENCY_SAMPLE: usize = 10;
/// Connections opened at once.
const CONNECT_PARALLEL: usize = 64;

pub fn main(args: &ScaleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 16, "--size must be at least 16");
    anyhow::ensure!(!args.tiers.is_empty(), "--tiers needs at least one tier");
    let exe = canopy_exe(args.canopy.as_deref())?;
    tree_runtime()?.block_on(run(args, &exe))
}

/// The `canopy` binary: `given`, or the one beside this benchmark.
pub(crate) fn canopy_exe(given: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    let exe = match given {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?.with_file_name("canopy"),
    };
    anyhow::ensure!(
        exe.exists(),
        "no canopy binary at {} (cargo build --release -p canopy-broker, or --canopy PATH)",
        exe.display()
    );
    Ok(exe)
}

/// The clients' runtime: two workers, as the machine has two cores.
pub(crate) fn tree_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Publishes `total` messages of `size` bytes on `topic` at `rate` per
/// second, then waits until every one is acknowledged.
pub(crate) async fn publish_paced(
    publisher: &canopy_client::Client,
    topic: &str,
    (rate, total, size): (u64, u64, usize),
    base: Instant,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let p = payload(size, 0, sent as u32, base);
            drop(publisher.send(topic, p).await?);
            sent += 1;
        }
    }
    publisher.flush().await?;
    Ok(())
}

/// Resident memory of process `pid` now, and at its peak, bytes.
pub(crate) fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resident memory of process `pid`, bytes.
fn rss(pid: u32) -> u64 {
    memory(pid).0
}

async fn run(args: &ScaleArgs, exe: &std::path::Path) -> anyhow::Result<()> {
    let tree = TreeConfig::loopback(3, &args.tiers)?;
    let launched = Launched::start(exe, &tree).await?;
    let leaf_tier = format!("relay-{}.", args.tiers.len());
    let leaves: Vec<(u32, String)> = launched
        .processes()
        .filter(|(name, ..)| name.starts_with(&leaf_tier))
        .filter_map(|(_, pid, addr)| Some((pid?, addr.to_owned())))
        .collect();
    let core: Vec<String> = launched
        .processes()
        .filter(|(name, ..)| name.starts_with("core-"))
        .map(|(.., addr)| addr.to_owned())
        .collect();
    let leaf_addrs: Vec<String> = leaves.iter().map(|(_, a)| a.clone()).collect();
    let me = std::process::id();
    let rss_leaves = |l: &[(u32, String)]| l.iter().map(|(pid, _)| rss(*pid)).sum::<u64>();
    let (leaves_before, me_before) = (rss_leaves(&leaves), rss(me));

    let total = args.rate * args.secs;
    let base = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let connect_started = Instant::now();
    let subscribers: Vec<_> = futures::stream::iter(0..args.subs)
        .map(|i| {
            let mut servers = leaf_addrs.clone();
            servers.rotate_left(i % leaf_addrs.len());
            async move {
                let mut o = canopy_client::ClientOptions::new(servers);
                o.name = format!("scale-{i}");
                let client = canopy_client::Client::connect(o).await?;
                let sub = client.subscribe(TOPIC).await?;
                anyhow::Ok((i, client, sub))
            }
        })
        .buffer_unordered(CONNECT_PARALLEL)
        .collect()
        .await;
    let connect_time = connect_started.elapsed();
    let mut tasks = Vec::with_capacity(args.subs);
    for s in subscribers {
        let (i, client, mut sub) = s?;
        tasks.push(tokio::spawn(async move {
            let _client = client;
            let mut checker = Checker::compact(1, base);
            let sampled = i % LATENCY_SAMPLE == 0;
            let mut last = Instant::now();
            while checker.report().received < total {
                let event = tokio::select! {
                    e = sub.next() => e,
                    _ = tokio::time::sleep_until(deadline) => break,
                };
                match event {
                    Some(canopy_client::Event::Message(m)) => {
                        checker.observe(&m.payload, sampled);
                        last = Instant::now();
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            (
                checker.report(),
                sampled.then(|| checker.latency().clone()),
                last,
            )
        }));
    }
    // Let the connections settle before measuring their memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (leaves_after, me_after) = (rss_leaves(&leaves), rss(me));

    let mut o = canopy_client::ClientOptions::new(core);
    o.name = "scale-pub".into();
    let publisher = canopy_client::Client::connect(o).await?;
    let start = Instant::now();
    publish_paced(&publisher, TOPIC, (args.rate, total, args.size), base).await?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
    let (mut received, mut violations, mut complete) = (0u64, 0u64, 0usize);
    let mut last_delivery = start;
    for t in tasks {
        let (report, hist, last) = t.await?;
        received += report.received;
        violations += report.order_violations;
        complete += usize::from(report.received == total && report.order_violations == 0);
        if let Some(h) = hist {
            latency.add(&h)?;
        }
        last_delivery = last_delivery.max(last);
    }
    let elapsed = last_delivery.duration_since(start);
    launched.stop().await;
    let per_conn = |after: u64, before: u64| after.saturating_sub(before) as f64 / args.subs as f64;
    println!(
        "tree: 3 core, tiers {:?}; {} subscribers over {} leaf relays (connected in {:.1} s)",
        args.tiers,
        args.subs,
        leaves.len(),
        connect_time.as_secs_f64()
    );
    println!(
        "stream: {} msgs/s for {} s, {} B payloads; complete subscribers {complete}/{}, order violations {violations}",
        args.rate, args.secs, args.size, args.subs
    );
    println!(
        "delivered: {:.0} msgs/s ({received} deliveries in {:.2} s)",
        received as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "latency (publish -> delivery, every {LATENCY_SAMPLE}th subscriber): p50 {} us, p99 {} us, p99.9 {} us",
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999)
    );
    println!(
        "memory per connection: leaf relays {:.1} KiB, client side (this process) {:.1} KiB",
        per_conn(leaves_after, leaves_before) / 1024.0,
        per_conn(me_after, me_before) / 1024.0
    );
    anyhow::ensure!(
        complete == args.subs,
        "{} subscribers did not receive every message in order",
        args.subs - complete
    );
    Ok(())
}
