//! A whole tree of real processes (`canopy up`): 3 core servers, a tier of
//! 2 relays, a second tier of 2 relays, subscribers at the leaves and
//! publishers at the core. A leaf relay and then a core server are killed
//! with SIGKILL mid-stream; every subscriber must deliver the identical
//! complete sequence, nothing lost or doubled (docs/DESIGN.md guarantees 1–5 at
//! the clients, and "Adoption").
//!
//! Weak subscribers ride along at every level, some on the killed core
//! server: each may be told that what it delivered diverged (guarantee 6),
//! and after applying what it was told, its stream must be the strong
//! subscribers' one exactly. Never silent: a weak client that delivered
//! something the survivors ordered otherwise and was not told ends with
//! another stream.
//!
//! The scale is set by `CANOPY_TREE_SUBS` (subscribers, default 100),
//! `CANOPY_TREE_EACH` (messages per publisher, default 3,000) and
//! `CANOPY_TREE_RATE` (messages per second per publisher; default about
//! 20,000, bursts of 100 every 5 ms); run with
//! `--nocapture` to see the adoption times. `bench/RESULTS.md` has the run
//! at 1,000 subscribers.

mod common;

use canopy_client::protocol::{self, PubSeq, PublisherId, Seq};
use canopy_client::{Client, ClientOptions, Event};
use common::{within_for, Tree};
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Publishers, homed on different core servers.
const PUBLISHERS: u64 = 2;
/// The bound on the whole stream, failovers included.
const STREAM_TIME_MAX: Duration = Duration::from_secs(300);

fn scale(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn options(servers: Vec<String>, name: String) -> ClientOptions {
    let mut o = ClientOptions::new(servers);
    o.name = name;
    o.reconnect_for = Duration::from_secs(60);
    o
}

/// One kill: when, and the highest seq any subscriber had then. A message
/// above it reached a subscriber through the tree as it is after the kill.
#[derive(Default)]
struct Kill {
    at: OnceLock<Instant>,
    seq: AtomicU64,
}

impl Kill {
    fn mark(&self, seen: &AtomicU64) {
        self.seq
            .store(seen.load(Ordering::SeqCst), Ordering::SeqCst);
        let _ = self.at.set(Instant::now());
    }

    /// Time since the kill, if `seq` is the first message past it.
    fn since(&self, seq: u64) -> Option<Duration> {
        let at = self.at.get()?;
        (seq > self.seq.load(Ordering::SeqCst)).then(|| at.elapsed())
    }
}

/// What one subscriber delivered, summarised.
struct Seen {
    count: usize,
    /// The running hash (`protocol::chain`) over what it delivered, in
    /// order: equal hashes and counts mean identical sequences.
    hash: u64,
    /// Kill of the relay → first message past it.
    after_relay: Option<Duration>,
    /// After the core server's kill: the longest pause between two
    /// deliveries (the stall the view change cost this subscriber).
    stall_core: Duration,
    orphan: bool,
}

/// `hash` followed by the message `(seq, publisher, pub_seq)`.
fn chained(hash: u64, (seq, publisher, pub_seq): (u64, u64, u64)) -> u64 {
    protocol::chain(hash, Seq(seq), PublisherId(publisher), PubSeq(pub_seq))
}

/// A weak subscriber: delivers until its stream, with every divergence it
/// was told of applied (what it delivered from there on withdrawn), holds
/// `total` messages; returns that stream's hash and the divergences.
async fn weak_subscriber(client: Client, total: usize, name: String) -> (u64, usize) {
    let mut sub = client.subscribe("feed.>").await.expect("subscribe");
    let mut stream: Vec<(u64, u64, u64)> = Vec::with_capacity(total);
    let mut diverged = 0;
    while stream.len() < total {
        match sub.next().await {
            Some(Event::Message(m)) => {
                let last = stream.last().map_or(0, |e| e.0);
                assert!(m.seq.0 > last, "{name}: seqs ascend");
                stream.push((m.seq.0, m.publisher.0, m.pub_seq.0));
            }
            Some(Event::Diverged { from, .. }) => {
                diverged += 1;
                stream.retain(|e| e.0 < from.0);
            }
            other => panic!("{name}: expected a message, got {other:?}"),
        }
    }
    (stream.into_iter().fold(0, chained), diverged)
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_loses_and_doubles_nothing_when_a_relay_and_a_core_server_are_killed() {
    let subs = scale("CANOPY_TREE_SUBS", 100);
    let each = scale("CANOPY_TREE_EACH", 3_000) as u64;
    let rate = std::env::var("CANOPY_TREE_RATE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|r| *r > 0);
    let total = (PUBLISHERS * each) as usize;
    let tree = Tree::start(3, &[2, 2]);
    let leaves = tree.tiers[1].clone();
    let highest = Arc::new(AtomicU64::new(0));
    // Messages the publishers have sent: the kills are timed by it, so
    // they land while the publishers, paced, are still at work.
    let sent = Arc::new(AtomicUsize::new(0));
    // How many kills are done; publishers wait on it at a third and at two
    // thirds of the stream.
    let (kills_done, kills_done_rx) = tokio::sync::watch::channel(0usize);
    let relay_kill = Arc::new(Kill::default());
    let core_kill = Arc::new(Kill::default());
    let mut tasks = Vec::new();
    for k in 0..subs {
        // Half the subscribers are homed on each leaf relay.
        let mut servers = leaves.clone();
        servers.rotate_left(k % 2);
        let orphan = k % 2 == 0;
        let client = within_for(
            STREAM_TIME_MAX,
            "subscriber connect",
            Client::connect(options(servers, format!("sub-{k}"))),
        )
        .await
        .expect("subscriber connects");
        let mut sub = client.subscribe("feed.>").await.expect("subscribe");
        let highest = highest.clone();
        let (relay_kill, core_kill) = (relay_kill.clone(), core_kill.clone());
        tasks.push(tokio::spawn(async move {
            let _client = client;
            let mut seen = Seen {
                count: 0,
                hash: 0,
                after_relay: None,
                stall_core: Duration::ZERO,
                orphan,
            };
            let mut heard = Instant::now();
            let mut next = [1u64; PUBLISHERS as usize];
            let mut last = 0u64;
            while seen.count < total {
                let m = match sub.next().await {
                    Some(Event::Message(m)) => m,
                    other => panic!("sub-{k}: expected a message, got {other:?}"),
                };
                assert!(m.seq.0 > last, "sub-{k}: seqs ascend");
                last = m.seq.0;
                let p = m
                    .topic()
                    .strip_prefix("feed.p")
                    .and_then(|p| p.parse::<usize>().ok());
                let p = p.expect("topic feed.pN");
                assert_eq!(
                    m.pub_seq.0, next[p],
                    "sub-{k}: publisher {p} in order, nothing lost or doubled"
                );
                next[p] += 1;
                seen.hash = chained(seen.hash, (m.seq.0, m.publisher.0, m.pub_seq.0));
                seen.count += 1;
                highest.fetch_max(m.seq.0, Ordering::SeqCst);
                if seen.after_relay.is_none() {
                    seen.after_relay = relay_kill.since(m.seq.0);
                }
                if core_kill.at.get().is_some() {
                    seen.stall_core = seen.stall_core.max(heard.elapsed());
                }
                heard = Instant::now();
            }
            seen
        }));
    }
    // Weak subscribers: on core-1 (killed), the mid tier and the leaves.
    let mut weak = Vec::new();
    let weak_places = [
        tree.core.clone(),
        tree.tiers[0].clone(),
        leaves.clone(),
        vec![leaves[1].clone(), leaves[0].clone()],
    ];
    for k in 0..scale("CANOPY_TREE_WEAK", 8) {
        let mut o = options(weak_places[k % 4].clone(), format!("weak-{k}"));
        o.weak = true;
        let client = within_for(STREAM_TIME_MAX, "weak connect", Client::connect(o))
            .await
            .expect("weak subscriber connects");
        weak.push(tokio::spawn(weak_subscriber(
            client,
            total,
            format!("weak-{k}"),
        )));
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS as usize {
        // Homed on core servers 2 and 3; both fail over if need be.
        let mut servers = tree.core.clone();
        servers.rotate_left(1 + p);
        let client = within_for(
            STREAM_TIME_MAX,
            "publisher connect",
            Client::connect(options(servers, format!("pub-{p}"))),
        )
        .await
        .expect("publisher connects");
        let sent = sent.clone();
        let mut kills_done = kills_done_rx.clone();
        publishers.push(tokio::spawn(async move {
            // Paced, so that the kills land mid-stream: 100 messages per
            // tick, a tick every 5 ms unless `CANOPY_TREE_RATE` (messages
            // per second per publisher) asks for a given rate.
            let tick = match rate {
                Some(r) => Duration::from_secs_f64(100.0 / r as f64),
                None => Duration::from_millis(5),
            };
            let started = tokio::time::Instant::now();
            for i in 0..each {
                // Past a third (two thirds) of the stream, wait for the
                // relay's (core server's) kill: they land mid-stream by
                // construction, however the machine schedules this.
                for k in 1..=2 {
                    while sent.load(Ordering::SeqCst) >= total * k / 3 && *kills_done.borrow() < k {
                        kills_done
                            .changed()
                            .await
                            .expect("the test holds the sender");
                    }
                }
                client
                    .send(&format!("feed.p{p}"), format!("{p}:{i}"))
                    .await
                    .expect("send");
                sent.fetch_add(1, Ordering::SeqCst);
                if i % 100 == 99 {
                    // At least a tick's pause per 100, behind schedule or
                    // not, so that the stream always outlasts the kills.
                    let due = started + tick * ((i + 1) / 100) as u32;
                    let pause = tokio::time::Instant::now() + tick;
                    tokio::time::sleep_until(if rate.is_some() { due } else { pause }).await;
                }
            }
            client.flush().await.expect("every publish acknowledged");
        }));
    }
    let wait_for = |share: usize| {
        let sent = sent.clone();
        within_for(STREAM_TIME_MAX, "stream progress", async move {
            while sent.load(Ordering::SeqCst) < total * share / 3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mid_stream = || sent.load(Ordering::SeqCst) < total;
    wait_for(1).await;
    // The leaf relay that half the subscribers are homed on.
    relay_kill.mark(&highest);
    tree.kill("relay-2.1");
    assert!(mid_stream(), "the relay kill lands mid-stream");
    kills_done.send_replace(1);
    wait_for(2).await;
    // The core's first server: the sequencer of the first view.
    core_kill.mark(&highest);
    tree.kill("core-1");
    assert!(mid_stream(), "the core kill lands mid-stream");
    kills_done.send_replace(2);
    for p in publishers {
        within_for(STREAM_TIME_MAX, "publishers acknowledged", p)
            .await
            .expect("publisher task");
    }
    let mut reference = None;
    let (mut adoption, mut stall) = (Vec::new(), Vec::new());
    for t in tasks {
        let seen = within_for(STREAM_TIME_MAX, "subscribers complete", t)
            .await
            .expect("subscriber task");
        assert_eq!(seen.count, total);
        match reference {
            None => reference = Some(seen.hash),
            Some(h) => assert_eq!(
                h, seen.hash,
                "every subscriber delivers the identical sequence"
            ),
        }
        if seen.orphan {
            adoption.push(
                seen.after_relay
                    .expect("an orphan delivered after the kill"),
            );
        }
        stall.push(seen.stall_core);
    }
    let mut told = 0;
    for w in weak {
        let (hash, diverged) = within_for(STREAM_TIME_MAX, "weak subscribers complete", w)
            .await
            .expect("weak subscriber task");
        assert_eq!(
            Some(hash),
            reference,
            "a weak subscriber's stream, divergences applied, is the agreed one"
        );
        told += diverged;
    }
    let (a_med, a_max) = median_max(adoption);
    let (s_med, s_max) = median_max(stall);
    eprintln!(
        "tree: {subs} subscribers, {total} messages; relay kill -> first message at an adopted \
         client: median {a_med:?}, max {a_max:?}; longest pause in deliveries after the core kill: \
         median {s_med:?}, max {s_max:?}; weak subscribers told of a divergence: {told} times"
    );
}
