//! `canopy-bench failover`: how long a 3-server core takes to recover from
//! the crash of its coordinator under load.
//!
//! Each run starts a fresh core (in-process servers on their own runtime
//! threads), homes one publisher on each server, and has them publish at a
//! paced rate, each waiting for its acknowledgement. Then the coordinator
//! (server 1, the lowest id) crashes as `kill -9` would: its sockets close
//! and it says nothing. Reported per run:
//! - **crash → view**: until the first survivor installs a view without it;
//! - **view → acked**: from that view until every publisher (including the
//!   one homed on the crashed server, which must reconnect) has had a
//!   publish acknowledged that it sent after the crash.
//!
//! Medians and maxima over the runs are printed at the end.

use crate::brokers;
use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Arguments of `failover`.
#[derive(Parser, Clone, Debug)]
pub struct FailoverArgs {
    /// Repetitions (a fresh core each).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Publishes per second per publisher.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Load before the crash, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
}

/// One run's timings.
#[derive(Clone, Copy, Debug)]
struct Run {
    view: Duration,
    acked: Duration,
}

pub fn main(args: &FailoverArgs) -> anyhow::Result<()> {
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for r in 0..args.runs {
        let run = clients.block_on(one(args))?;
        eprintln!(
            "run {}: crash -> view {:.1} ms, view -> all publishers acked {:.1} ms",
            r + 1,
            ms(run.view),
            ms(run.acked)
        );
        runs.push(run);
    }
    let stat = |f: fn(&Run) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (view_median, view_max) = stat(|r| r.view);
    let (acked_median, acked_max) = stat(|r| r.acked);
    println!(
        "runs: {}, failure timeout 500 ms, heartbeat 50 ms",
        runs.len()
    );
    println!(
        "crash -> new view:            median {:7.1} ms   max {:7.1} ms",
        ms(view_median),
        ms(view_max)
    );
    println!(
        "new view -> all pubs acked:   median {:7.1} ms   max {:7.1} ms",
        ms(acked_median),
        ms(acked_max)
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn one(args: &FailoverArgs) -> anyhow::Result<Run> {
    let mut servers = tokio::task::block_in_place(|| brokers::start_core(3))?;
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    // Per publisher: when its first publish sent after the crash was acked.
    let crash_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut tasks = Vec::new();
    for home in 0..3 {
        let mut opts =
            canopy_client::ClientOptions::new((0..3).map(|k| addrs[(home + k) % 3].clone()));
        opts.name = format!("failover-pub-{home}");
        let client = canopy_client::Client::connect(opts).await?;
        let crash_at = crash_at.clone();
        let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let sent = Instant::now();
                client.publish("bench.failover", "x").await?;
                let crashed = *crash_at.lock().await;
                if crashed.is_some_and(|c| sent > c) {
                    return anyhow::Ok(Instant::now());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;
    let mut survivor_views = servers[1].views.clone();
    let coordinator = servers.remove(0);
    let crashed = Instant::now();
    *crash_at.lock().await = Some(crashed);
    tokio::task::block_in_place(|| coordinator.crash());
    let view_at = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if survivor_views
                .borrow_and_update()
                .as_ref()
                .is_some_and(|v| !v.members.contains(&1))
            {
                return Instant::now();
            }
            if survivor_views.changed().await.is_err() {
                return Instant::now();
            }
        }
    })
    .await?;
    let mut acked_at = view_at;
    for t in tasks {
        let at = tokio::time::timeout(Duration::from_secs(30), t).await???;
        acked_at = acked_at.max(at);
    }
    tokio::task::block_in_place(|| drop(servers));
    Ok(Run {
        view: view_at - crashed,
        acked: acked_at - view_at,
    })
}
