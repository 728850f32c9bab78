//! `canopy-bench weak`: weak and strong delivery side by side, in one run
//! of one tree.
//!
//! Starts a tree of real `canopy` processes (`canopy up`'s launcher: 3 core
//! servers and relay tiers, by default 2 then 2 relays) and, at every level
//! (the core and each relay tier), connects `--subs` strong and `--subs`
//! weak subscribers spread over that level's servers. One publisher, at a
//! core server that is not the first view's sequencer, publishes a paced
//! stream. Every subscriber checks order and completeness and records
//! publish-to-delivery latency. Reported per level: strong and weak
//! p50/p99/p99.9 and the weak/strong ratios, taken within the one run (the
//! machine is shared: ratios from one run compare, absolute figures drift).

use crate::scale::{canopy_exe, publish_paced, tree_runtime};
use crate::Checker;
use canopy_broker::launcher::{Launched, TreeConfig};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

/// Arguments of `weak`.
#[derive(Parser, Clone, Debug)]
pub struct WeakArgs {
    /// Strong subscribers per level, and as many weak ones.
    #[arg(long, default_value_t = 20)]
    pub subs: usize,
    /// Relays per tier, top down (comma-separated).
    #[arg(long, default_value = "2,2", value_delimiter = ',')]
    pub tiers: Vec<usize>,
    /// Messages per second, published at the core.
    #[arg(long, default_value_t = 1000)]
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
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

const TOPIC: &str = "bench.weak";

pub fn main(args: &WeakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 16, "--size must be at least 16");
    anyhow::ensure!(args.subs >= 1, "--subs must be at least 1");
    let exe = canopy_exe(args.canopy.as_deref())?;
    tree_runtime()?.block_on(run(args, &exe))
}

/// What the subscribers of one level and mode saw.
struct Tally {
    latency: Histogram<u64>,
    complete: usize,
    diverged: u64,
}

async fn run(args: &WeakArgs, exe: &std::path::Path) -> anyhow::Result<()> {
    let tree = TreeConfig::loopback(3, &args.tiers)?;
    let launched = Launched::start(exe, &tree).await?;
    // Levels top down: "core", then "relay-1", "relay-2", ...
    let mut levels: Vec<(String, Vec<String>)> = vec![("core".into(), Vec::new())];
    levels.extend((1..=args.tiers.len()).map(|t| (format!("relay-{t}"), Vec::new())));
    for (name, _, addr) in launched.processes() {
        let level = name.split('.').next().unwrap_or(name);
        let level = if level.starts_with("core") {
            "core"
        } else {
            level
        };
        if let Some((_, addrs)) = levels.iter_mut().find(|(l, _)| l == level) {
            addrs.push(addr.to_owned());
        }
    }
    let total = args.rate * args.secs;
    let base = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut tasks = Vec::new();
    for (level, addrs) in &levels {
        for weak in [false, true] {
            for i in 0..args.subs {
                let mut servers = addrs.clone();
                servers.rotate_left(i % addrs.len());
                let mut o = canopy_client::ClientOptions::new(servers);
                o.name = format!("{level}-{}-{i}", if weak { "weak" } else { "strong" });
                o.weak = weak;
                o.reports = canopy_client::protocol::Reports::None;
                let client = canopy_client::Client::connect(o).await?;
                let mut sub = client.subscribe(TOPIC).await?;
                tasks.push((
                    level.clone(),
                    weak,
                    tokio::spawn(async move {
                        let _client = client;
                        let mut checker = Checker::compact(1, base);
                        let mut diverged = 0u64;
                        while checker.report().received < total {
                            let event = tokio::select! {
                                e = sub.next() => e,
                                _ = tokio::time::sleep_until(deadline) => break,
                            };
                            match event {
                                Some(canopy_client::Event::Message(m)) => {
                                    checker.observe(&m.payload, true)
                                }
                                Some(canopy_client::Event::Diverged { .. }) => diverged += 1,
                                Some(_) => {}
                                None => break,
                            }
                        }
                        (checker, diverged)
                    }),
                ));
            }
        }
    }
    // Every subscriber is live: publish at the second core server.
    let mut core = levels[0].1.clone();
    core.rotate_left(1);
    let mut o = canopy_client::ClientOptions::new(core);
    o.name = "weak-bench-pub".into();
    let publisher = canopy_client::Client::connect(o).await?;
    publish_paced(&publisher, TOPIC, (args.rate, total, args.size), base).await?;
    let mut tallies: Vec<((String, bool), Tally)> = Vec::new();
    for (level, weak, task) in tasks {
        let (checker, diverged) = task.await?;
        let report = checker.report();
        let key = (level, weak);
        let at = match tallies.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
                let tally = Tally {
                    latency,
                    complete: 0,
                    diverged: 0,
                };
                tallies.push((key, tally));
                tallies.len() - 1
            }
        };
        let t = &mut tallies[at].1;
        t.latency.add(checker.latency())?;
        t.complete += usize::from(report.received == total && report.order_violations == 0);
        t.diverged += diverged;
    }
    launched.stop().await;
    println!(
        "tree: 3 core, tiers {:?}; per level {} strong + {} weak subscribers; {} msgs/s for {} s, {} B payloads",
        args.tiers, args.subs, args.subs, args.rate, args.secs, args.size
    );
    println!(
        "{:<8} {:>10} {:>10} {:>12} | {:>10} {:>10} {:>12} | {:>9} {:>9} | complete, diverged",
        "level", "strong p50", "p99", "p99.9", "weak p50", "p99", "p99.9", "p50 ratio", "p99 ratio"
    );
    let mut incomplete = 0;
    for (level, _) in &levels {
        let find = |weak: bool| {
            tallies
                .iter()
                .find(|((l, w), _)| l == level && *w == weak)
                .map(|(_, t)| t)
        };
        let (Some(s), Some(w)) = (find(false), find(true)) else {
            continue;
        };
        let q = |t: &Tally, q: f64| t.latency.value_at_quantile(q);
        println!(
            "{level:<8} {:>8}us {:>8}us {:>10}us | {:>8}us {:>8}us {:>10}us | {:>9.2} {:>9.2} | {}+{}/{}, {}",
            q(s, 0.5),
            q(s, 0.99),
            q(s, 0.999),
            q(w, 0.5),
            q(w, 0.99),
            q(w, 0.999),
            q(w, 0.5) as f64 / q(s, 0.5).max(1) as f64,
            q(w, 0.99) as f64 / q(s, 0.99).max(1) as f64,
            s.complete,
            w.complete,
            2 * args.subs,
            w.diverged
        );
        incomplete += 2 * args.subs - s.complete - w.complete;
    }
    anyhow::ensure!(
        incomplete == 0,
        "{incomplete} subscribers did not receive every message in order"
    );
    Ok(())
}
