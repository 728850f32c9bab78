//! Weak delivery over real processes (docs/DESIGN.md guarantee 6): a weak
//! subscriber is sent what its server holds before it is stable; when that
//! server fails with messages the survivors never got, the subscriber is
//! told its stream diverged, and then handed the agreed stream.
//!
//! A core of three `canopy serve` processes; the links between server 1
//! (the view's sequencer) and the others pass through proxies the test
//! controls. The test cuts them, has a publisher at server 1 publish, waits
//! until the weak subscriber at server 1 holds those messages, kills server
//! 1, and lets the survivors go on: they order the publisher's retries
//! after their new view's membership event, so the seqs the weak
//! subscriber was sent carry other messages now.

mod common;

use canopy_client::{Client, ClientOptions, Event};
use common::{free_port, within, Proxy, Server};
use futures::StreamExt;
use std::time::Duration;

const BEFORE: usize = 10;
const DURING: usize = 5;

/// A server's config: its own id, and where it reaches each server. The
/// failure timeout leaves server 1 ample time to order, cut off, before it
/// notices (the kill breaks its links anyway).
fn config(me: usize, peers: &[&str; 3]) -> String {
    let mut c = format!(
        "name = \"s{me}\"\n[core]\nid = {me}\nheartbeat_interval_ms = 50\nfailure_timeout_ms = 3000\n"
    );
    for (i, p) in peers.iter().enumerate() {
        c.push_str(&format!(
            "[[core.servers]]\nid = {}\npeer = \"{p}\"\nclient = \"127.0.0.1:0\"\n",
            i + 1
        ));
    }
    c
}

fn options(servers: Vec<String>, name: &str, weak: bool) -> ClientOptions {
    let mut o = ClientOptions::new(servers);
    o.name = name.into();
    o.weak = weak;
    o.reconnect_for = Duration::from_secs(30);
    o
}

/// What one subscriber ends with: every divergence it was told of applied
/// (what it delivered from there on withdrawn).
async fn read(
    _client: Client,
    mut sub: canopy_client::Subscription,
    total: usize,
) -> (Vec<(u64, u64, u64)>, usize) {
    let (mut stream, mut diverged) = (Vec::new(), 0);
    while stream.len() < total {
        match sub.next().await {
            Some(Event::Message(m)) => stream.push((m.seq.0, m.publisher.0, m.pub_seq.0)),
            Some(Event::Diverged { from, .. }) => {
                diverged += 1;
                stream.retain(|e: &(u64, u64, u64)| e.0 < from.0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (stream, diverged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_subscriber_is_told_when_its_failed_server_sent_what_the_survivors_never_ordered() {
    let real = [free_port(), free_port(), free_port()];
    // Server 1's links both ways, through proxies.
    let p12 = Proxy::start(&real[1]).await;
    let p13 = Proxy::start(&real[2]).await;
    let p21 = Proxy::start(&real[0]).await;
    let p31 = Proxy::start(&real[0]).await;
    // The lowest, server 1, proposes the first view (which needs every
    // configured server: nobody holds a record yet) and is its sequencer.
    let mut s1 = Some(Server::with_config(&config(
        1,
        &[&real[0], &p12.addr, &p13.addr],
    )));
    let s2 = Server::with_config(&config(2, &[&p21.addr, &real[1], &real[2]]));
    let s3 = Server::with_config(&config(3, &[&p31.addr, &real[1], &real[2]]));
    let at = |s: &Server| s.addr.clone();
    let a1 = s1.as_ref().map(at).expect("server 1");
    let publisher = within(
        "the first view",
        Client::connect(options(vec![a1.clone(), at(&s2)], "pub", false)),
    )
    .await
    .expect("the publisher connects");
    let all = vec![a1.clone(), at(&s2), at(&s3)];
    let weak = within(
        "weak connect",
        Client::connect(options(all.clone(), "weak", true)),
    )
    .await
    .expect("the weak subscriber connects to server 1");
    // At server 3 only: it serves once it joined the view and holds its
    // state; from then on server 1's survivors are a majority that can go
    // on without it.
    let strong = within(
        "server 3 to join",
        Client::connect(options(vec![at(&s3)], "strong", false)),
    )
    .await
    .expect("the strong subscriber connects to server 3");
    let total = BEFORE + DURING;
    let (weak_tx, mut weak_seen) = tokio::sync::mpsc::unbounded_channel();
    // Subscribed before anything is published.
    let mut weak_sub = weak.subscribe("t.>").await.expect("subscribe");
    let strong_sub = strong.subscribe("t.>").await.expect("subscribe");
    let weak_task = tokio::spawn(async move {
        let _client = weak;
        let sub = &mut weak_sub;
        let (mut stream, mut diverged) = (Vec::new(), 0);
        // Until the whole agreed stream is in, after the divergence (a
        // subscriber never told times out here).
        while stream.len() < total || diverged == 0 {
            match sub.next().await {
                Some(Event::Message(m)) => {
                    stream.push((m.seq.0, m.publisher.0, m.pub_seq.0));
                    let _ = weak_tx.send(stream.len());
                }
                Some(Event::Diverged { from, .. }) => {
                    diverged += 1;
                    stream.retain(|e: &(u64, u64, u64)| e.0 < from.0);
                }
                other => panic!("weak: unexpected {other:?}"),
            }
        }
        (stream, diverged)
    });
    let strong_task = tokio::spawn(read(strong, strong_sub, total));
    for i in 0..BEFORE {
        publisher
            .send("t.x", format!("before {i}"))
            .await
            .expect("send");
    }
    within("stable messages", publisher.flush())
        .await
        .expect("acknowledged");
    // Server 1's links go silent (lost, not broken): it still orders what
    // its clients publish until it notices, after its failure timeout.
    for p in [&p12, &p13, &p21, &p31] {
        p.silence(true);
    }
    for i in 0..DURING {
        publisher
            .send("t.x", format!("during {i}"))
            .await
            .expect("send");
    }
    within("the weak subscriber to hold them", async {
        while weak_seen.recv().await.is_some_and(|n| n < total) {}
    })
    .await;
    // Server 1 fails with them: nobody else ever had them.
    drop(s1.take());
    within("the retries to be acknowledged", publisher.flush())
        .await
        .expect("the survivors order the publisher's retries");
    let (weak, diverged) = within("the weak subscriber to be told, then complete", weak_task)
        .await
        .expect("weak task");
    let (strong, _) = within("the strong subscriber", strong_task)
        .await
        .expect("strong task");
    eprintln!(
        "weak subscriber told of {diverged} divergence(s); agreed stream: {:?}",
        weak.iter().map(|e| e.0).collect::<Vec<_>>()
    );
    assert!(diverged >= 1, "the weak subscriber was told: {weak:?}");
    assert_eq!(
        weak, strong,
        "with the divergence applied, the weak stream is the agreed one"
    );
}
