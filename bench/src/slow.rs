//! `canopy-bench slow`: what slow readers cost everyone else.
//!
//! For each count of slow readers (by default 0, 1 and 10), a fresh
//! `canopy serve` process: `--fast` subscribers that read as fast as they
//! can, the slow readers (each takes `--delay-ms` per message), and one
//! publisher at `--rate` messages per second for `--secs`. Reported per
//! run: the fast subscribers' latency (all of them in one histogram) and
//! whether each got every message in order; the node's resident memory
//! (at the end and its peak) and its queued bytes (the highest sample of
//! `canopy_queued_bytes`, every 100 ms) against the configured bound; and
//! what became of the slow readers: messages they read, gap notices, and
//! how many times the node cut one off (`canopy_slow_consumers_total`)
//! or paused one out of credit (`canopy_flow_pauses_total`).
//!
//! The runs are meant to be compared with each other: the fast
//! subscribers' p99 with slow readers beside them over the run without.

use crate::scale::{canopy_exe, memory, publish_paced, tree_runtime};
use crate::Checker;
use canopy_client::{Client, ClientOptions, Event, SlowPolicy};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `slow`.
#[derive(Parser, Clone, Debug)]
pub struct SlowArgs {
    /// Subscribers that keep up.
    #[arg(long, default_value_t = 100)]
    pub fast: usize,
    /// Slow readers beside them, comma-separated for several runs.
    #[arg(long, default_value = "0,1,10", value_delimiter = ',')]
    pub slow: Vec<usize>,
    /// Milliseconds a slow reader takes per message.
    #[arg(long, default_value_t = 10)]
    pub delay_ms: u64,
    /// Messages per second.
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Payload bytes (at least 16).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Slow readers conflate (told of gaps) instead of being cut off.
    #[arg(long)]
    pub conflate: bool,
    /// The slow readers' receive window, messages [default: the SDK's].
    #[arg(long)]
    pub receive_window: Option<u64>,
    /// The node's `[limits] queue_bytes_max` (per client) [default: the node's].
    #[arg(long)]
    pub queue_bytes_max: Option<usize>,
    /// The node's `[limits] queue_bytes_total_max` [default: the node's].
    #[arg(long)]
    pub queue_bytes_total_max: Option<usize>,
    /// The `canopy` binary [default: beside this one].
    #[arg(long)]
    pub canopy: Option<std::path::PathBuf>,
}

const TOPIC: &str = "bench.slow";

pub fn main(args: &SlowArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 16, "--size must be at least 16");
    let exe = canopy_exe(args.canopy.as_deref())?;
    let runtime = tree_runtime()?;
    let total = args
        .queue_bytes_total_max
        .unwrap_or(canopy_broker::config::QUEUE_BYTES_TOTAL_MAX_DEFAULT);
    let per_client = args
        .queue_bytes_max
        .unwrap_or(canopy_broker::config::QUEUE_BYTES_MAX_DEFAULT);
    println!(
        "fast {} at {} msgs/s for {} s, {} B; slow readers {} ms/msg ({}); bounds: {} B per client, {} B in all",
        args.fast,
        args.rate,
        args.secs,
        args.size,
        args.delay_ms,
        if args.conflate { "conflate" } else { "cut" },
        per_client,
        total
    );
    println!(
        "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>6} {:>5} {:>8} {:>7}  slow readers' messages / gaps",
        "slow", "complete", "p50 us", "p99 us", "p99.9 us", "rss MiB", "peak MiB", "queued max", "cuts", "gaps", "resumes", "pauses"
    );
    for &slow in &args.slow {
        let r = runtime.block_on(run(args, &exe, slow))?;
        println!(
            "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9.1} {:>9.1} {:>11} {:>6} {:>5} {:>8} {:>7}  {}",
            slow,
            format!("{}/{}", r.complete, args.fast),
            r.latency.value_at_quantile(0.5),
            r.latency.value_at_quantile(0.99),
            r.latency.value_at_quantile(0.999),
            r.rss as f64 / f64::from(1 << 20),
            r.peak as f64 / f64::from(1 << 20),
            r.queued_max,
            r.cuts,
            r.gaps,
            r.resumes,
            r.pauses,
            r.slow_readers
                .iter()
                .map(|(m, g)| format!("{m}/{g}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

/// One run's figures.
struct Run {
    complete: usize,
    latency: Histogram<u64>,
    rss: u64,
    peak: u64,
    queued_max: u64,
    cuts: u64,
    gaps: u64,
    /// Connections opened beyond the first of each client: resumes.
    resumes: u64,
    /// Times the node paused a slow reader out of credit (flow control).
    pauses: u64,
    /// Per slow reader: messages read, gap notices.
    slow_readers: Vec<(u64, u64)>,
}

/// A `canopy serve` child with HTTP on; killed when dropped.
struct Node {
    child: std::process::Child,
    addr: String,
    http: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(exe: &std::path::Path, args: &SlowArgs) -> anyhow::Result<Node> {
    let mut limits = String::from("[limits]\n");
    if let Some(b) = args.queue_bytes_max {
        limits.push_str(&format!("queue_bytes_max = {b}\n"));
    }
    if let Some(b) = args.queue_bytes_total_max {
        limits.push_str(&format!("queue_bytes_total_max = {b}\n"));
    }
    let file = std::env::temp_dir().join(format!("canopy-bench-slow-{}.toml", std::process::id()));
    std::fs::write(&file, limits)?;
    let mut child = std::process::Command::new(exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut line = || -> anyhow::Result<String> {
        Ok(lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("canopy serve said nothing"))??)
    };
    let addr = line()?
        .strip_prefix("canopy listening on ")
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("unexpected first line from canopy serve"))?;
    let http = line()?
        .strip_prefix("canopy dashboard on http://")
        .and_then(|a| a.strip_suffix('/'))
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("unexpected second line from canopy serve"))?;
    Ok(Node { child, addr, http })
}

/// The value of `name` in the node's `/metrics`.
async fn metric(http: &str, name: &str) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("no {name} in /metrics"))
}

async fn run(args: &SlowArgs, exe: &std::path::Path, slow: usize) -> anyhow::Result<Run> {
    let node = start_node(exe, args)?;
    let total = args.rate * args.secs;
    let base = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.secs + 30);
    let options = |name: &str| {
        let mut o = ClientOptions::new([node.addr.clone()]);
        o.name = name.into();
        o
    };
    let mut fast = Vec::new();
    for _ in 0..args.fast {
        let client = Client::connect(options("bench-fast")).await?;
        let mut sub = client.subscribe(TOPIC).await?;
        fast.push(tokio::spawn(async move {
            let _client = client;
            let mut checker = Checker::compact(1, base);
            while checker.report().received < total {
                let next = tokio::time::timeout_at(deadline, sub.next()).await;
                match next {
                    Ok(Some(Event::Message(m))) => checker.observe(&m.payload, true),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let report = checker.report();
            (
                report.received == total && report.order_violations == 0,
                checker,
            )
        }));
    }
    let stop = tokio::time::Instant::now() + Duration::from_secs(args.secs + 1);
    let mut slow_tasks = Vec::new();
    for _ in 0..slow {
        let mut o = options("bench-slow");
        o.slow = if args.conflate {
            SlowPolicy::Conflate
        } else {
            SlowPolicy::Disconnect
        };
        if let Some(w) = args.receive_window {
            o.receive_window = w;
        }
        let client = Client::connect(o).await?;
        let mut sub = client.subscribe(TOPIC).await?;
        let delay = Duration::from_millis(args.delay_ms);
        slow_tasks.push(tokio::spawn(async move {
            let _client = client;
            let (mut read, mut gaps) = (0u64, 0u64);
            // (A timeout alone never ends it: buffered messages are ready.)
            while tokio::time::Instant::now() < stop {
                let Ok(Some(event)) = tokio::time::timeout_at(stop, sub.next()).await else {
                    break;
                };
                match event {
                    Event::Message(_) => {
                        read += 1;
                        tokio::time::sleep(delay).await;
                    }
                    Event::Gap { .. } => gaps += 1,
                    _ => {}
                }
            }
            (read, gaps)
        }));
    }
    // The node's queued bytes, sampled while the stream runs.
    let queued_max = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (http, queued_max) = (node.http.clone(), queued_max.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(q) = metric(&http, "canopy_queued_bytes").await {
                    queued_max.fetch_max(q, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let publisher = Client::connect(options("bench-pub")).await?;
    publish_paced(&publisher, TOPIC, (args.rate, total, args.size), base).await?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
    let mut complete = 0;
    for task in fast {
        let (ok, checker) = task.await?;
        complete += usize::from(ok);
        latency.add(checker.latency())?;
    }
    let mut slow_readers = Vec::new();
    for task in slow_tasks {
        slow_readers.push(task.await?);
    }
    // One more snapshot period, so the counters are current.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sampler.abort();
    let (rss, peak) = memory(node.child.id());
    Ok(Run {
        complete,
        latency,
        rss,
        peak,
        queued_max: queued_max.load(Relaxed),
        cuts: metric(&node.http, "canopy_slow_consumers_total").await?,
        pauses: metric(&node.http, "canopy_flow_pauses_total").await?,
        gaps: metric(&node.http, "canopy_gaps_total").await?,
        resumes: metric(&node.http, "canopy_connections_total")
            .await?
            .saturating_sub((args.fast + slow + 1) as u64),
        slow_readers,
    })
}
