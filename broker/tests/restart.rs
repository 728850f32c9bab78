//! Restarts over real processes: core servers killed with SIGKILL and
//! started again with their data directories (their hard state), and a
//! core whose majority must stay primary while a third server is deaf.
//!
//! - Each server in turn killed mid-stream and restarted, for
//!   `CANOPY_RESTART_ROUNDS` rounds (default 3): every subscriber delivers
//!   the identical complete stream and every publish is acknowledged
//!   (docs/DESIGN.md guarantees 1–5 across restarts).
//! - All three killed and restarted: the core begins a new stream, and a
//!   subscriber is told (`Event::StreamReset`) before anything of it.
//! - Server 3 deaf (it sends, nothing reaches it): the other two keep
//!   ordering without a stall and without telling their clients to move.
//!
//! The tests of this file run one at a time (each holds three servers and
//! several clients; on a 2-core machine two at once starve each other's
//! heartbeats). Run with `--nocapture` for the timings; `RUST_LOG` shows
//! the SDK clients' logs, and `CANOPY_TEST_LOGS=DIR` keeps the servers'.

mod common;

use canopy_client::protocol::{ClientFrame, ErrorCode, Resume, ServerFrame, Welcome};
use canopy_client::{Client, ClientOptions, Event, Reports, Seq, SlowPolicy};
use common::{free_port, take_messages, within_for, Cluster, Proxy, Raw, Server};
use futures::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The bound on each step of a test (one kill and rejoin, a client's
/// reconnection, the end of a stream): generous for a loaded 2-core
/// machine, and far below what a stuck step would take (forever).
const STEP_MAX: Duration = Duration::from_secs(30);

/// Runs `test` on its own 2-thread runtime, one test of this file at a time.
fn run<F: Future>(test: F) -> F::Output {
    static SERIAL: Mutex<()> = Mutex::new(());
    // A test that failed poisons the lock; the next one runs anyway.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    losses();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(test)
}

fn options(servers: Vec<String>, name: &str) -> ClientOptions {
    let mut o = ClientOptions::new(servers);
    o.name = name.into();
    o.reconnect_for = Duration::from_secs(60);
    o
}

async fn connect(o: ClientOptions) -> Client {
    let name = o.name.clone();
    within_for(STEP_MAX, "a client to connect", Client::connect(o))
        .await
        .unwrap_or_else(|e| panic!("{name} connects: {e}"))
}

/// Waits, polling every 5 ms, until `done` holds.
async fn until(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the server at `addr` serves clients, and returns its
/// Welcome: it answers a Hello with one rather than with `not_primary`
/// only once it is in the primary view (and, after a restart, holds the
/// state a peer sent it).
async fn serving(addr: &str) -> Welcome {
    serving_resumed(addr, None).await
}

/// As [`serving`], for a client that resumes at `resume` (a server may be
/// briefly in a view change right after one, and answer `not_primary`).
async fn serving_resumed(addr: &str, resume: Option<Resume>) -> Welcome {
    within_for(STEP_MAX, &format!("{addr} to serve clients"), async {
        loop {
            // The server is bound before `Server` returns: connecting
            // fails only when it died.
            let mut raw = Raw::connect(addr).await;
            let mut hello = common::hello(rand::random(), &[], SlowPolicy::Disconnect);
            hello.resume = resume;
            raw.send(ClientFrame::Hello(hello)).await;
            match raw.next().await {
                Some(ServerFrame::Welcome(w)) => return w,
                Some(ServerFrame::Error(e)) if e.code == ErrorCode::NotPrimary => {}
                other => panic!("{addr}: expected a Welcome or not_primary, got {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// One connection an SDK client of this process lost (it logs
/// "connection lost; reconnecting"), `not_primary` included.
#[derive(Clone, Debug)]
struct Loss {
    at: Instant,
    server: String,
    reason: String,
}

impl Loss {
    fn not_primary(&self) -> bool {
        self.reason.starts_with("NotPrimary")
    }
}

/// Every [`Loss`] since the process started.
type Losses = Arc<Mutex<Vec<Loss>>>;

/// Collects [`Loss`]es from the SDK's tracing events.
struct LossLayer(Losses);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LossLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            message: String,
            server: String,
            reason: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                let slot = match field.name() {
                    "message" => &mut self.message,
                    "server" => &mut self.server,
                    "reason" => &mut self.reason,
                    _ => return,
                };
                *slot = format!("{value:?}");
            }
        }
        if !event.metadata().target().starts_with("canopy_client") {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message == "connection lost; reconnecting" {
            let loss = Loss {
                at: Instant::now(),
                server: f.server,
                reason: f.reason,
            };
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(loss);
        }
    }
}

/// The process's [`Losses`], collected from the first call on (with the
/// SDK's logs on stderr when `RUST_LOG` is set).
fn losses() -> Losses {
    static LOSSES: OnceLock<Losses> = OnceLock::new();
    LOSSES
        .get_or_init(|| {
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::Layer;
            let losses = Losses::default();
            let logs = std::env::var_os("RUST_LOG").map(|_| {
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(tracing_subscriber::EnvFilter::from_default_env())
            });
            let subscriber = tracing_subscriber::registry()
                .with(LossLayer(losses.clone()))
                .with(logs);
            tracing::subscriber::set_global_default(subscriber)
                .expect("nothing else installs a global subscriber in this test binary");
            losses
        })
        .clone()
}

/// The connections lost since `since`.
fn losses_since(since: Instant) -> Vec<Loss> {
    let all = losses();
    let all = all.lock().unwrap_or_else(PoisonError::into_inner);
    all.iter().filter(|l| l.at >= since).cloned().collect()
}

/// Messages each publisher sends between two kills.
const SEGMENT: usize = 300;
/// The pause after each publish: about 300 ms per segment, so that a
/// kill at mid-segment lands while messages are in flight.
const PACE: Duration = Duration::from_millis(1);
const PUBLISHERS: usize = 2;
const SUBSCRIBERS: usize = 4;

/// Rounds of the kill test: `CANOPY_RESTART_ROUNDS`, default 3.
fn rounds() -> usize {
    match std::env::var("CANOPY_RESTART_ROUNDS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("CANOPY_RESTART_ROUNDS={v:?}: a positive number")),
        Err(_) => 3,
    }
}

/// A 3-server core, 2 publishers and 4 subscribers (SDK clients given
/// every server's address). Each round kills each server in turn with
/// SIGKILL while messages flow and starts it again with its data
/// directory, and the next kill waits until it serves again (it is in the
/// primary view and caught up). In the first, third, ... rounds the
/// restart waits until the two survivors have ordered messages sent after
/// the kill (they went on without it); in the second, fourth, ... it
/// follows the kill at once (the new incarnation may be back before the
/// others noticed the old one died). Every subscriber must deliver the
/// identical sequence (same seqs, same messages), every publish once and
/// in its publisher's order, with no gap or reset notice, and every
/// publisher's `flush` must succeed.
///
/// The publishers are paced by the kills, not by the clock: each sends
/// one segment of its messages per kill, and the kill comes once both
/// are half way through it, so every kill lands mid-stream by
/// construction.
#[test]
fn each_server_killed_and_restarted_with_its_data_dir_three_rounds() {
    run(async {
        let rounds = rounds();
        let kills = 3 * rounds;
        let each = SEGMENT * (kills + 1);
        let total = PUBLISHERS * each;
        let started = Instant::now();
        // Fixed client ports: a restarted server is where clients look.
        let mut cluster = Cluster::start_on_fixed_ports(3, "");
        for a in &cluster.addrs {
            serving(a).await;
        }
        eprintln!(
            "{rounds} round(s), {PUBLISHERS} publishers x {each} messages, {SUBSCRIBERS} subscribers; first view after {:?}",
            started.elapsed()
        );
        let mut delivered = Vec::new();
        let mut subscribers = Vec::new();
        for k in 0..SUBSCRIBERS {
            let client = connect(options(cluster.addrs_from(k % 3), &format!("sub-{k}"))).await;
            let mut sub = client.subscribe("feed.>").await.expect("subscribe");
            let count = Arc::new(AtomicUsize::new(0));
            delivered.push(count.clone());
            subscribers.push(tokio::spawn(async move {
                let _client = client;
                let mut seen: Vec<(Seq, String)> = Vec::with_capacity(total);
                while seen.len() < total {
                    match sub.next().await {
                        Some(Event::Message(m)) => {
                            seen.push((m.seq, String::from_utf8_lossy(&m.payload).into_owned()));
                            count.store(seen.len(), Ordering::Relaxed);
                        }
                        other => panic!(
                            "sub-{k}: expected a message, got {other:?} after {}",
                            seen.len()
                        ),
                    }
                }
                seen
            }));
        }
        // How many segments the publishers may send: one more per kill
        // done.
        let (gate, gate_rx) = tokio::sync::watch::channel(1usize);
        let mut sent = Vec::new();
        let mut publishers = Vec::new();
        for p in 0..PUBLISHERS {
            let client = connect(options(cluster.addrs_from(p), &format!("pub-{p}"))).await;
            let count = Arc::new(AtomicUsize::new(0));
            sent.push(count.clone());
            let mut gate = gate_rx.clone();
            publishers.push(tokio::spawn(async move {
                for i in 0..each {
                    let segment = i / SEGMENT;
                    gate.wait_for(|open| *open > segment)
                        .await
                        .expect("the test holds the gate");
                    client
                        .send(&format!("feed.p{p}"), format!("{p}:{i}"))
                        .await
                        .expect("send");
                    count.store(i + 1, Ordering::Relaxed);
                    tokio::time::sleep(PACE).await;
                }
                // Resolves once every publish is acknowledged, retries
                // included.
                client.flush().await.expect("every publish acknowledged");
            }));
        }
        let sent_total = || {
            sent.iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<usize>()
        };
        let delivered_max = || {
            delivered
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0)
        };
        let mut steps = Vec::new();
        for k in 0..kills {
            let (round, victim) = (k / 3, k % 3);
            let mid = k * SEGMENT + SEGMENT / 2;
            within_for(
                STEP_MAX,
                "the publishers to reach mid-segment",
                until(|| {
                    assert!(
                        !publishers.iter().any(|p| p.is_finished()),
                        "a publisher stopped early"
                    );
                    sent.iter().all(|c| c.load(Ordering::Relaxed) >= mid)
                }),
            )
            .await;
            let at_kill = sent_total();
            let unsent = PUBLISHERS * (k + 1) * SEGMENT - at_kill;
            let killed = Instant::now();
            cluster.kill(victim);
            let went_on = if round % 2 == 0 {
                // Half of what was still to send in this segment, ordered
                // after the kill.
                let target = at_kill + unsent / 2;
                within_for(
                    STEP_MAX,
                    "the survivors to order what was sent after the kill",
                    until(|| {
                        assert!(
                            !subscribers.iter().any(|s| s.is_finished()),
                            "a subscriber stopped early"
                        );
                        delivered_max() >= target
                    }),
                )
                .await;
                Some(killed.elapsed())
            } else {
                None
            };
            let restarted = Instant::now();
            cluster.restart(victim);
            let started = restarted.elapsed();
            let welcome = serving(&cluster.addrs[victim]).await;
            let rejoined = restarted.elapsed();
            let went_on_text = went_on.map_or("restarted at once".to_owned(), |d| {
                format!("survivors went on after {d:?}")
            });
            eprintln!(
                "round {} kill s{} (sent {at_kill}, {unsent} unsent in the segment): {went_on_text}; process up after {started:?}; serving at head {} after {rejoined:?}; kill to serving {:?}",
                round + 1,
                victim + 1,
                welcome.head.0,
                killed.elapsed()
            );
            steps.push((went_on, rejoined, killed.elapsed()));
            gate.send_replace(k + 2);
        }
        for p in publishers {
            within_for(STEP_MAX, "every publish to be acknowledged", p)
                .await
                .expect("publisher task");
        }
        let mut reference: Option<Vec<(Seq, String)>> = None;
        for (k, s) in subscribers.into_iter().enumerate() {
            let seen = within_for(STEP_MAX, "the subscribers to complete", s)
                .await
                .expect("subscriber task");
            assert!(
                seen.windows(2).all(|w| w[0].0 < w[1].0),
                "sub-{k}: seqs ascend, none twice"
            );
            let mut next = [0usize; PUBLISHERS];
            for (seq, text) in &seen {
                let (p, i) = text.split_once(':').expect("payload p:i");
                let p: usize = p.parse().expect("publisher");
                assert_eq!(
                    i.parse::<usize>().expect("number"),
                    next[p],
                    "sub-{k} at seq {}: publisher {p} in order, nothing lost or doubled",
                    seq.0
                );
                next[p] += 1;
            }
            assert_eq!(next, [each; PUBLISHERS], "sub-{k}: every publish delivered");
            match &reference {
                None => reference = Some(seen),
                Some(r) => assert!(
                    r == &seen,
                    "sub-{k} delivers the identical sequence (seqs and messages) as sub-0"
                ),
            }
        }
        let losses = losses_since(started);
        let max = |f: fn(&(Option<Duration>, Duration, Duration)) -> Duration| {
            steps.iter().map(f).max().unwrap_or_default()
        };
        eprintln!(
            "{kills} kills: longest survivors-went-on {:?}, longest restart-to-serving {:?}, longest kill-to-serving {:?}; {} connections lost by clients ({} not_primary); {total} messages identical at {SUBSCRIBERS} subscribers; whole test {:?}",
            max(|s| s.0.unwrap_or_default()),
            max(|s| s.1),
            max(|s| s.2),
            losses.len(),
            losses.iter().filter(|l| l.not_primary()).count(),
            started.elapsed()
        );
    });
}

/// Messages published before and after all three servers restart.
const BEFORE: usize = 100;
const AFTER: usize = 20;

/// All three servers killed and restarted with their data directories:
/// the messages are gone, and the core begins a new stream (a new id).
/// The subscriber, reconnecting by itself, is told `StreamReset` before
/// any message of the new stream, so it is never handed a new message
/// under a seq it already saw under the old id; a raw client resuming
/// under the old id is welcomed with the new one; what is published after
/// the restart reaches the subscriber.
#[test]
fn all_three_killed_and_restarted_begin_a_new_stream_and_clients_are_told() {
    run(async {
        let started = Instant::now();
        let mut cluster = Cluster::start_on_fixed_ports(3, "");
        for a in &cluster.addrs {
            serving(a).await;
        }
        let subscriber = connect(options(cluster.addrs_from(0), "sub")).await;
        let mut sub = subscriber.subscribe("t.>").await.expect("subscribe");
        let publisher = connect(options(cluster.addrs_from(1), "pub")).await;
        for i in 0..BEFORE {
            publisher
                .send("t.x", format!("old {i}"))
                .await
                .expect("send");
        }
        within_for(STEP_MAX, "the old stream acknowledged", publisher.flush())
            .await
            .expect("acknowledged");
        let old = take_messages(&mut sub, BEFORE).await;
        for (i, m) in old.iter().enumerate() {
            assert_eq!(m.payload, format!("old {i}").as_bytes());
        }
        let old_last = old.last().expect("messages").seq;
        let old_stream = serving(&cluster.addrs[0]).await.stream;
        let killed = Instant::now();
        for i in 0..3 {
            cluster.kill(i);
        }
        for i in 0..3 {
            cluster.restart(i);
        }
        let mut new = Vec::new();
        for a in &cluster.addrs {
            new.push(serving(a).await);
        }
        let formed = killed.elapsed();
        let new_stream = new[0].stream;
        assert!(
            new.iter().all(|w| w.stream == new_stream),
            "one new stream: {new:?}"
        );
        assert_ne!(new_stream, old_stream, "a new stream has a new id");
        // The first thing the subscriber hears of after the restart: that
        // its stream is gone. A message first would be one of the new
        // stream under the old id.
        match within_for(STEP_MAX, "the subscriber to be told", sub.next()).await {
            Some(Event::StreamReset) => {}
            other => panic!(
                "expected StreamReset after seq {}, got {other:?}",
                old_last.0
            ),
        }
        let told = killed.elapsed();
        // A client that resumes under the old id is welcomed with the new
        // one, and is sent nothing of the old position.
        let resume = Resume {
            stream: old_stream,
            after: old_last,
            check: None,
            agreed: None,
        };
        let welcome = serving_resumed(&cluster.addrs[2], Some(resume)).await;
        assert_eq!(welcome.stream, new_stream, "the new id");
        for i in 0..AFTER {
            publisher
                .send("t.x", format!("new {i}"))
                .await
                .expect("send");
        }
        within_for(STEP_MAX, "the new stream acknowledged", publisher.flush())
            .await
            .expect("acknowledged after the restart");
        let fresh = take_messages(&mut sub, AFTER).await;
        for (i, m) in fresh.iter().enumerate() {
            assert_eq!(
                m.payload,
                format!("new {i}").as_bytes(),
                "only new messages"
            );
        }
        assert!(fresh.windows(2).all(|w| w[0].seq < w[1].seq), "seqs ascend");
        eprintln!(
            "old stream {old_stream:#x} through seq {}; new stream {new_stream:#x} serving {formed:?} after the kills, subscriber told after {told:?}; new messages at seqs {}..={}; whole test {:?}",
            old_last.0,
            fresh[0].seq.0,
            fresh[AFTER - 1].seq.0,
            started.elapsed()
        );
    });
}

/// A core server's config naming where it reaches each server.
fn deaf_config(me: usize, peers: &[&str; 3]) -> String {
    let mut c = format!(
        "name = \"s{me}\"\n[core]\nid = {me}\nheartbeat_interval_ms = 50\nfailure_timeout_ms = 500\n"
    );
    for (i, p) in peers.iter().enumerate() {
        c.push_str(&format!(
            "[[core.servers]]\nid = {}\npeer = \"{p}\"\nclient = \"127.0.0.1:0\"\n",
            i + 1
        ));
    }
    c
}

/// What the subscriber of the deaf test saw.
#[derive(Default)]
struct Story {
    /// Each delivery: when, and its number.
    seen: Vec<(Instant, u64)>,
    /// The core's servers, each time they changed.
    cores: Vec<(Instant, Vec<String>)>,
}

impl Story {
    fn take(&mut self, (at, e): (Instant, Event)) {
        match e {
            Event::Message(m) => {
                let n = String::from_utf8_lossy(&m.payload)
                    .parse()
                    .expect("a number");
                self.seen.push((at, n));
            }
            Event::View(v) => {
                let core: Vec<String> = v.core.iter().map(|e| e.name.clone()).collect();
                if self.cores.last().is_none_or(|(_, c)| *c != core) {
                    self.cores.push((at, core));
                }
            }
            other => panic!("the subscriber: unexpected {other:?}"),
        }
    }
}

/// The longest time after `from` without an instant of `times` (sorted),
/// up to the last.
fn gap_after(times: &[Instant], from: Instant) -> Duration {
    times
        .windows(2)
        .filter(|w| w[1] > from)
        .map(|w| w[1] - w[0].max(from))
        .max()
        .unwrap_or_default()
}

/// Time between publishes in the deaf test: 100 a second.
const RATE: Duration = Duration::from_millis(10);
/// From the cut until the measurement: the majority's one view change
/// (leaving out server 3, about a failure timeout after the cut).
const SETTLE: Duration = Duration::from_secs(2);
/// The measurement: ten windows of 500 ms.
const MEASURE: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_millis(500);
/// The longest stall allowed after the settle, between two
/// acknowledgements or two deliveries. Every 10 ms when all is well; a
/// flap (the majority leaving its view for one with server 3, or telling
/// clients `not_primary`) costs at least a failure timeout (500 ms) plus a
/// view change and a reconnection. 2 s leaves room for a loaded 2-core
/// machine to stall a process for a second and more without a flap.
const STALL_MAX: Duration = Duration::from_secs(2);

/// Server 3's incoming links (from servers 1 and 2, through proxies) go
/// silent: it hears nobody while they still hear it (heartbeats that say
/// it hears nobody). Servers 1 and 2 must leave it out and stay primary:
/// a subscriber at server 1 and a publisher at server 2, publishing 100
/// messages a second, see no stall and no `not_primary` after a settle,
/// and no change of the core's servers (a subscriber with `full` reports
/// sees each). Server 3 itself refuses clients; healed, it rejoins.
#[test]
fn an_inbound_only_cut_does_not_make_the_majority_flap() {
    run(async {
        let started = Instant::now();
        let real = [free_port(), free_port(), free_port()];
        // Each server sends on the links it dials: servers 1 and 2 reach
        // server 3 through these, so silencing them silences only what
        // comes in to server 3.
        let p13 = Proxy::start(&real[2]).await;
        let p23 = Proxy::start(&real[2]).await;
        let s1 = Server::with_config(&deaf_config(1, &[&real[0], &real[1], &p13.addr]));
        let s2 = Server::with_config(&deaf_config(2, &[&real[0], &real[1], &p23.addr]));
        let s3 = Server::with_config(&deaf_config(3, &[&real[0], &real[1], &real[2]]));
        for s in [&s1, &s2, &s3] {
            serving(&s.addr).await;
        }
        let mut o = options(vec![s1.addr.clone()], "sub");
        o.reports = Reports::Full;
        let subscriber = connect(o).await;
        let mut sub = subscriber.subscribe("t.>").await.expect("subscribe");
        let publisher = connect(options(vec![s2.addr.clone()], "pub")).await;
        // Deliveries (with when and their payload) and the core's servers
        // each time they change, as the subscriber sees them.
        let (events, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let _client = subscriber;
            while let Some(e) = sub.next().await {
                if events.send((Instant::now(), e)).is_err() {
                    return;
                }
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let pub_task = tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut tick = tokio::time::interval(RATE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0usize;
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                publisher
                    .publish("t.x", format!("{i}"))
                    .await
                    .expect("publish");
                acks.push(Instant::now());
                i += 1;
            }
            acks
        });
        let mut story = Story::default();
        // A second of the stream flowing before the cut.
        within_for(STEP_MAX, "the stream to flow", async {
            while story.seen.len() < 100 {
                story.take(events_rx.recv().await.expect("the subscriber reads"));
            }
        })
        .await;
        p13.silence(true);
        p23.silence(true);
        let cut = Instant::now();
        let end = cut + SETTLE + MEASURE;
        // Reads for the measurement's length (not a wait for a condition).
        while let Ok(e) = tokio::time::timeout_at(end.into(), events_rx.recv()).await {
            story.take(e.expect("the subscriber reads"));
        }
        stop.store(true, Ordering::Relaxed);
        let acks = within_for(STEP_MAX, "the publisher to stop", pub_task)
            .await
            .expect("publisher task");
        within_for(STEP_MAX, "every publish delivered", async {
            while story.seen.len() < acks.len() {
                story.take(events_rx.recv().await.expect("the subscriber reads"));
            }
        })
        .await;
        let Story { seen, cores } = story;
        let lost = losses_since(cut);
        // Server 3 hears nobody: it is in no primary view.
        let mut raw = Raw::connect(&s3.addr).await;
        raw.send(ClientFrame::Hello(common::hello(
            rand::random(),
            &[],
            SlowPolicy::Disconnect,
        )))
        .await;
        let deaf_answer = raw.next().await;
        // Healed, it rejoins.
        p13.silence(false);
        p23.silence(false);
        let healed = Instant::now();
        serving(&s3.addr).await;
        let rejoined = healed.elapsed();
        reader.abort();

        let numbers: Vec<u64> = seen.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            numbers,
            (0..acks.len() as u64).collect::<Vec<_>>(),
            "every publish delivered once, in order"
        );
        let from = cut + SETTLE;
        let ack_gap = gap_after(&acks, from);
        let delivery_gap = gap_after(&seen.iter().map(|(t, _)| *t).collect::<Vec<_>>(), from);
        let windows: Vec<usize> = (0..(MEASURE.as_millis() / WINDOW.as_millis()) as u32)
            .map(|k| {
                let (a, b) = (from + WINDOW * k, from + WINDOW * (k + 1));
                seen.iter().filter(|(t, _)| *t >= a && *t < b).count()
            })
            .collect();
        let with = windows.iter().filter(|&&n| n > 0).count();
        let since = |t: Instant| format!("{:?}", t.saturating_duration_since(cut));
        let core_changes: Vec<String> = cores
            .iter()
            .filter(|(t, _)| *t >= cut)
            .map(|(t, c)| format!("{} at +{}", c.join(","), since(*t)))
            .collect();
        let losses: Vec<String> = lost
            .iter()
            .map(|l| format!("{} at +{}: {}", l.server, since(l.at), l.reason))
            .collect();
        eprintln!(
            "deaf server 3: {with}/{} windows of {WINDOW:?} with deliveries after a {SETTLE:?} settle ({windows:?}); longest ack gap {ack_gap:?}, delivery gap {delivery_gap:?}; {} publishes; core changes after the cut: {core_changes:?}; connections lost after the cut: {} ({} not_primary) {losses:?}; server 3 answered {:?}; healed, it served again after {rejoined:?}; whole test {:?}",
            windows.len(),
            acks.len(),
            lost.len(),
            lost.iter().filter(|l| l.not_primary()).count(),
            deaf_answer.as_ref().map(|f| match f {
                ServerFrame::Error(e) => format!("{:?}", e.code),
                other => format!("{other:?}"),
            }),
            started.elapsed()
        );
        assert!(
            ack_gap <= STALL_MAX && delivery_gap <= STALL_MAX,
            "the majority stalled: acks {ack_gap:?}, deliveries {delivery_gap:?} apart"
        );
        assert!(
            lost.iter().all(|l| l.at < from),
            "clients of the majority were made to move after the settle: {losses:?}"
        );
        assert!(
            cores.iter().all(|(t, _)| *t < from),
            "the core's servers changed after the settle: {core_changes:?}"
        );
        assert!(
            matches!(&deaf_answer, Some(ServerFrame::Error(e)) if e.code == ErrorCode::NotPrimary),
            "a server that hears nobody refuses clients: {deaf_answer:?}"
        );
    });
}
