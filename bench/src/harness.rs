//! The fan-out run, the same for every broker.

use crate::brokers::{self, Broker, Kind, Publisher};
use crate::{payload, share, summarise, Checker, FanoutArgs, RunReport, SubReport};
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Runs the throughput and latency phases against a fresh broker of `kind`.
pub async fn run(
    args: &FanoutArgs,
    subs: usize,
    kind: Kind,
    dashboard: bool,
) -> anyhow::Result<RunReport> {
    let broker = Broker::start(kind, args, dashboard)?;
    let viewer = broker
        .http()
        .map(|h| tokio::spawn(brokers::watch_dashboard(h.to_owned())));
    let base = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let latency_count = args.rate * args.latency_secs;
    let (phase1_tx, mut phase1_rx) = mpsc::unbounded_channel::<SubReport>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SubReport, Histogram<u64>)>();
    let mut tasks = Vec::with_capacity(subs);
    for i in 0..subs {
        let (mut stream, guard) = brokers::subscribe(kind, &broker.addrs(i)).await?;
        let (phase1_tx, done_tx) = (phase1_tx.clone(), done_tx.clone());
        let (msgs, pubs) = (args.msgs, args.pubs);
        tasks.push(tokio::spawn(async move {
            let _guard = guard;
            let mut checker = Checker::new(pubs, base);
            let sleep = tokio::time::sleep_until(deadline);
            tokio::pin!(sleep);
            let mut phase = 1;
            loop {
                let payload = tokio::select! {
                    biased;
                    p = stream.next() => match p { Some(p) => p, None => break },
                    _ = &mut sleep => break,
                };
                checker.observe(&payload, phase == 2);
                if phase == 1 && checker.report().received == msgs {
                    let _ = phase1_tx.send(checker.report());
                    checker.reset_counters();
                    phase = 2;
                    if latency_count == 0 {
                        break;
                    }
                } else if phase == 2 && checker.report().received == latency_count {
                    break;
                }
            }
            if phase == 1 {
                let _ = phase1_tx.send(checker.report());
            }
            let _ = done_tx.send((checker.report(), checker.latency().clone()));
        }));
    }
    drop((phase1_tx, done_tx));
    let mut publishers = Vec::with_capacity(args.pubs);
    for i in 0..args.pubs {
        publishers.push(Publisher::connect(kind, &broker.addrs(i)).await?);
    }

    // Phase 1: throughput.
    let start = Instant::now();
    let mut pub_tasks = Vec::new();
    for (i, p) in publishers.into_iter().enumerate() {
        let (n, size) = (share(args.msgs, args.pubs, i), args.size);
        pub_tasks.push(tokio::spawn(async move {
            for c in 0..n {
                p.send(payload(size, i as u32, c as u32, base)).await?;
            }
            p.flush().await?;
            anyhow::Ok(p)
        }));
    }
    let mut publishers = Vec::new();
    for t in pub_tasks {
        publishers.push(t.await??);
    }
    let publish_elapsed = start.elapsed();
    let mut phase1 = Vec::with_capacity(subs);
    while phase1.len() < subs {
        match phase1_rx.recv().await {
            Some(r) => phase1.push(r),
            None => break,
        }
    }
    let deliver_elapsed = start.elapsed();
    let complete = phase1.iter().all(|r| r.received == args.msgs);

    // Phase 2: paced latency, only when phase 1 completed everywhere.
    if complete && latency_count > 0 {
        let per_tick = Duration::from_millis(1);
        let mut pub_tasks = Vec::new();
        for (i, p) in publishers.into_iter().enumerate() {
            let n = share(latency_count, args.pubs, i);
            let rate = (args.rate as f64 / args.pubs as f64).max(1.0);
            let size = args.size;
            pub_tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(per_tick);
                let t0 = Instant::now();
                let mut sent = 0u64;
                while sent < n {
                    tick.tick().await;
                    let due = ((t0.elapsed().as_secs_f64() * rate) as u64).min(n);
                    while sent < due {
                        p.send(payload(size, i as u32, sent as u32, base)).await?;
                        sent += 1;
                    }
                }
                p.flush().await?;
                anyhow::Ok(())
            }));
        }
        for t in pub_tasks {
            t.await??;
        }
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut finished = 0;
    while let Some((_, h)) = done_rx.recv().await {
        latency.add(&h)?;
        finished += 1;
        if finished == subs {
            break;
        }
    }
    for t in tasks {
        t.abort();
    }
    if let Some(v) = viewer {
        v.abort();
    }
    drop(broker);
    Ok(summarise(
        kind.name(),
        dashboard,
        args,
        subs,
        publish_elapsed,
        deliver_elapsed,
        &phase1,
        &latency,
    ))
}
