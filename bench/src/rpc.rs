//! `canopy-bench rpc`: replicated RPC with the built-in `kv` service.
//!
//! Each configuration runs `--callers` concurrent callers (one connection
//! each, one call at a time) for `--secs` seconds and reports calls per
//! second and the p50/p99 call latency, the median of `--repeat` runs
//! (configurations interleaved per repetition, so drift on a shared
//! machine hits them alike):
//! - each mode with 3 replicas (in-process core servers): `put` (active),
//!   `stamp` (primary-backup), `hash K 1000 T` (load-balanced), `primes
//!   20000` (parallel);
//! - load-balanced with 3 replicas and with 1, for a handler that waits
//!   1 ms (`wait 1`) and a CPU-bound one (`hash K 200000 T`);
//! - `nats-server` request-reply with a queue group of 3 responders running
//!   the same handler (the `kv` code, each responder its own store, each
//!   with as many executor threads as a Canopy replica), in the same run.

use crate::brokers;
use canopy_broker::core::rrpc::{Call, CallId, Service};
use canopy_broker::services::kv::Kv;
use canopy_client::protocol::{PubSeq, PublisherId};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `canopy-bench rpc`.
#[derive(clap::Args)]
pub struct RpcArgs {
    /// Concurrent callers.
    #[arg(long, default_value_t = 100)]
    callers: usize,
    /// Seconds each configuration runs.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Executor threads per replica (Canopy) and per responder (NATS).
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Skip nats-server.
    #[arg(long)]
    no_nats: bool,
    /// Only these methods (all by default).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// Who answers.
#[derive(Clone, Copy, Debug)]
enum Target {
    Canopy { replicas: usize },
    Nats,
}

/// One configuration: a target and a call.
#[derive(Clone, Debug)]
struct Config {
    target: Target,
    method: &'static str,
    /// The argument, with `{i}` replaced by the caller's index.
    arg: &'static str,
}

/// One run's figures.
#[derive(Clone, Copy, Debug)]
struct Figures {
    calls_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub fn main(args: &RpcArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut configs = Vec::new();
    for (method, arg) in [
        ("put", "k{i} v"),
        ("stamp", "t{i}"),
        ("hash", "h{i} 1000 text{i}"),
        ("primes", "20000"),
        ("wait", "1"),
        ("hash", "h{i} 200000 text{i}"),
    ] {
        if !args.only.is_empty() && !args.only.iter().any(|m| m == method) {
            continue;
        }
        configs.push(Config {
            target: Target::Canopy { replicas: 3 },
            method,
            arg,
        });
        if method == "wait" || arg.contains("200000") {
            configs.push(Config {
                target: Target::Canopy { replicas: 1 },
                method,
                arg,
            });
        }
        if !args.no_nats {
            configs.push(Config {
                target: Target::Nats,
                method,
                arg,
            });
        }
    }
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); configs.len()];
    for r in 0..args.repeat {
        for (c, config) in configs.iter().enumerate() {
            let f = run(&rt, args, config)?;
            eprintln!(
                "run {}/{}: {:?} {} {}: {:.0} calls/s p50 {:.2} ms p99 {:.2} ms",
                r + 1,
                args.repeat,
                config.target,
                config.method,
                config.arg,
                f.calls_per_sec,
                f.p50_ms,
                f.p99_ms
            );
            runs[c].push(f);
        }
    }
    println!(
        "| target | method (mode) | argument | calls/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|"
    );
    for (config, runs) in configs.iter().zip(runs) {
        let f = median(runs);
        let target = match config.target {
            Target::Canopy { replicas } => format!("canopy, {replicas} replica(s)"),
            Target::Nats => "nats-server, queue group of 3".into(),
        };
        println!(
            "| {target} | {} ({}) | `{}` | {:.0} | {:.2} | {:.2} |",
            config.method,
            mode_of(config.method),
            config.arg,
            f.calls_per_sec,
            f.p50_ms,
            f.p99_ms
        );
    }
    Ok(())
}

fn mode_of(method: &str) -> &'static str {
    Kv::default()
        .methods()
        .into_iter()
        .find(|m| m.name == method)
        .map_or("?", |m| m.mode.name())
}

fn median(mut runs: Vec<Figures>) -> Figures {
    runs.sort_by(|a, b| a.calls_per_sec.total_cmp(&b.calls_per_sec));
    let mid = runs[runs.len() / 2];
    let mut p50: Vec<f64> = runs.iter().map(|f| f.p50_ms).collect();
    let mut p99: Vec<f64> = runs.iter().map(|f| f.p99_ms).collect();
    p50.sort_by(f64::total_cmp);
    p99.sort_by(f64::total_cmp);
    Figures {
        calls_per_sec: mid.calls_per_sec,
        p50_ms: p50[p50.len() / 2],
        p99_ms: p99[p99.len() / 2],
    }
}

fn run(rt: &tokio::runtime::Runtime, args: &RpcArgs, config: &Config) -> anyhow::Result<Figures> {
    let secs = Duration::from_secs(args.secs);
    match config.target {
        Target::Canopy { replicas } => {
            let core = brokers::start_core_with(replicas, Some("kv".into()), Some(args.executors))?;
            let addrs: Vec<String> = core.iter().map(|s| s.addr.clone()).collect();
            let f = rt.block_on(canopy_callers(args.callers, addrs, config, secs));
            drop(core);
            f
        }
        Target::Nats => rt.block_on(nats(args, config, secs)),
    }
}

/// Latencies to figures.
fn figures(mut lat: Vec<Duration>, secs: Duration) -> Figures {
    lat.sort_unstable();
    let q = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Figures {
        calls_per_sec: lat.len() as f64 / secs.as_secs_f64(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
    }
}

async fn canopy_callers(
    callers: usize,
    addrs: Vec<String>,
    config: &Config,
    secs: Duration,
) -> anyhow::Result<Figures> {
    let mut clients = Vec::with_capacity(callers);
    for i in 0..callers {
        let mut servers = addrs.clone();
        servers.rotate_left(i % addrs.len());
        let mut o = canopy_client::ClientOptions::new(servers);
        o.name = format!("bench-caller-{i}");
        clients.push(canopy_client::Client::connect(o).await?);
    }
    let end = Instant::now() + secs;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (method, arg) = (config.method, config.arg.replace("{i}", &i.to_string()));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                client.call(method, arg.clone()).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(figures(all, secs))
}

/// Runs `kv`'s handler for one request, as a replica would: execute, then
/// apply to this responder's own store.
fn handle(kv: &Kv, method: &str, payload: &[u8]) -> bytes::Bytes {
    let call = Call {
        id: CallId {
            publisher: PublisherId(1),
            pub_seq: PubSeq(1),
        },
        method,
        payload,
        share: (method == "primes").then_some(canopy_broker::core::rrpc::Share { rank: 0, of: 1 }),
    };
    match kv.execute(&call) {
        Ok(e) => kv.apply(&call, &e).unwrap_or_default(),
        Err(e) => e.into(),
    }
}

async fn nats(args: &RpcArgs, config: &Config, secs: Duration) -> anyhow::Result<Figures> {
    let server = brokers::start_nats()?;
    let addr = server.addrs(0).remove(0);
    let subject = format!("rpc.{}", config.method);
    let mut responders = Vec::new();
    for _ in 0..3 {
        let client = async_nats::connect(addr.as_str()).await?;
        let mut sub = client
            .queue_subscribe(subject.clone(), "replicas".into())
            .await?;
        let kv = Arc::new(Kv::default());
        let slots = Arc::new(tokio::sync::Semaphore::new(args.executors));
        let method = config.method;
        responders.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(reply) = msg.reply.clone() else {
                    continue;
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (kv, client) = (kv.clone(), client.clone());
                tokio::spawn(async move {
                    let payload = msg.payload.clone();
                    let out =
                        tokio::task::spawn_blocking(move || handle(&kv, method, &payload)).await;
                    if let Ok(out) = out {
                        let _ = client.publish(reply, out).await;
                    }
                    drop(permit);
                });
            }
        }));
    }
    let mut clients = Vec::new();
    for _ in 0..args.callers {
        clients.push(async_nats::connect(addr.as_str()).await?);
    }
    let end = Instant::now() + secs;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let subject = subject.clone();
        let arg = config.arg.replace("{i}", &i.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                client.request(subject.clone(), arg.clone().into()).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    for r in responders {
        r.abort();
    }
    drop(server);
    Ok(figures(all, secs))
}
