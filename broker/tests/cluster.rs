//! A 3-server core of real `canopy serve` processes on loopback: one total
//! order across servers, and no loss or duplication when a server is killed
//! with SIGKILL in the middle of a stream (docs/DESIGN.md guarantees 1–5).

mod common;

use canopy_broker::runtime::disk;
use canopy_client::{Client, ClientOptions, Event, Seq};
use common::{within_for, Cluster};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Messages per publisher.
const EACH: usize = 50_000;
/// Publishers, each homed on a different server.
const PUBLISHERS: usize = 2;
/// Subscribers homed on each server.
const SUBS_PER_SERVER: usize = 2;
/// The bound on the whole stream, failover included.
const STREAM_TIME_MAX: Duration = Duration::from_secs(240);

fn options(addrs: Vec<String>, name: String) -> ClientOptions {
    let mut o = ClientOptions::new(addrs);
    o.name = name;
    o.reconnect_for = Duration::from_secs(60);
    o
}

/// Streams `PUBLISHERS * EACH` messages through a 3-server core, kills
/// server `victim` once a third has been delivered, and checks every
/// subscriber (those homed on the victim fail over) delivers the same
/// complete sequence: every publish exactly once, in one order, each
/// publisher's in the order it sent them.
async fn stream_survives_a_killed_server(victim: usize) {
    let mut cluster = Cluster::start(3, "");
    let total = PUBLISHERS * EACH;
    let progress = Arc::new(AtomicUsize::new(0));
    let mut subscribers = Vec::new();
    for home in 0..3 {
        for k in 0..SUBS_PER_SERVER {
            let opts = options(cluster.addrs_from(home), format!("sub-{home}-{k}"));
            let client = within_for(STREAM_TIME_MAX, "subscriber connect", Client::connect(opts))
                .await
                .expect("subscriber connects");
            let mut sub = client.subscribe("feed.>").await.expect("subscribe");
            // One subscriber on a server that survives paces the kill.
            let pace = (home != victim && k == 0).then(|| progress.clone());
            subscribers.push(tokio::spawn(async move {
                let _client = client;
                let mut seen: Vec<(Seq, String)> = Vec::with_capacity(total);
                while seen.len() < total {
                    match sub.next().await {
                        Some(Event::Message(m)) => {
                            seen.push((m.seq, String::from_utf8_lossy(&m.payload).into_owned()));
                            if let Some(p) = &pace {
                                p.store(seen.len(), Ordering::Relaxed);
                            }
                        }
                        other => panic!(
                            "sub-{home}-{k}: expected a message, got {other:?} after {}",
                            seen.len()
                        ),
                    }
                }
                seen
            }));
        }
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let opts = options(cluster.addrs_from(p), format!("pub-{p}"));
        let client = within_for(STREAM_TIME_MAX, "publisher connect", Client::connect(opts))
            .await
            .expect("publisher connects");
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                client
                    .send(&format!("feed.p{p}"), format!("{p}:{i}"))
                    .await
                    .expect("send");
            }
            // Resolves once every publish is acknowledged, retries included.
            client.flush().await.expect("every publish acknowledged");
        }));
    }
    within_for(STREAM_TIME_MAX, "a third of the stream", async {
        while progress.load(Ordering::Relaxed) < total / 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let delivered = progress.load(Ordering::Relaxed);
    assert!(
        delivered < total,
        "the kill lands mid-stream ({delivered} of {total})"
    );
    assert!(
        !publishers.iter().all(|p| p.is_finished()),
        "publishers still at work"
    );
    cluster.kill(victim);
    for p in publishers {
        within_for(STREAM_TIME_MAX, "publishers acknowledged", p)
            .await
            .expect("publisher task");
    }
    let mut reference: Option<Vec<(Seq, String)>> = None;
    for s in subscribers {
        let seen = within_for(STREAM_TIME_MAX, "subscribers complete", s)
            .await
            .expect("subscriber task");
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "seqs ascend");
        let mut next: HashMap<String, usize> = HashMap::new();
        for (_, text) in &seen {
            let (p, i) = text.split_once(':').expect("payload p:i");
            let expect = next.entry(p.to_owned()).or_insert(0);
            assert_eq!(
                i.parse::<usize>().expect("number"),
                *expect,
                "publisher {p}: FIFO, nothing lost or doubled"
            );
            *expect += 1;
        }
        assert!(
            next.values().all(|&n| n == EACH),
            "every publish delivered: {next:?}"
        );
        match &reference {
            None => reference = Some(seen),
            Some(r) => assert!(
                r == &seen,
                "every subscriber delivers the identical sequence"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sequencer_mid_stream_loses_and_doubles_nothing() {
    // Server 1 has the lowest id: it coordinates the first view.
    stream_survives_a_killed_server(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_member_mid_stream_loses_and_doubles_nothing() {
    stream_survives_a_killed_server(2).await;
}

/// A server killed with SIGKILL and started again with its data directory
/// rejoins as a new incarnation (above the one on disk), catches up from a
/// peer (a client resuming from seq 0 there is replayed everything, with
/// the seqs the others gave), and serves the live stream in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_rejoins_and_catches_up_from_a_peer() {
    use canopy_client::protocol::{self as proto, ClientFrame, Resume, ServerFrame, SlowPolicy};
    let mut cluster = Cluster::start(3, "");
    let publisher = within_for(
        STREAM_TIME_MAX,
        "publisher connect",
        Client::connect(options(cluster.addrs_from(0), "pub".into())),
    )
    .await
    .expect("publisher connects");
    for i in 0..300 {
        publisher.send("t.x", format!("{i}")).await.expect("send");
    }
    publisher.flush().await.expect("acknowledged");
    let before = disk::load(cluster.data_dir(2))
        .expect("a readable hard state")
        .expect("written at start and on every view change");
    cluster.kill(2);
    for i in 300..600 {
        publisher.send("t.x", format!("{i}")).await.expect("send");
    }
    publisher
        .flush()
        .await
        .expect("acknowledged while one server is down");
    cluster.restart(2);
    // It refuses clients (`not_primary`) until it has rejoined.
    let watcher = within_for(
        STREAM_TIME_MAX,
        "the restarted server to serve",
        Client::connect(options(vec![cluster.addrs[2].clone()], "sub".into())),
    )
    .await
    .expect("the restarted server serves clients again");
    // It read its hard state back and runs as a later incarnation.
    let after = disk::load(cluster.data_dir(2))
        .expect("a readable hard state")
        .expect("kept across the restart");
    assert!(
        after.incarnation > before.incarnation,
        "{after:?} after {before:?}"
    );
    assert!(
        after.promised >= before.promised,
        "{after:?} after {before:?}"
    );
    let mut live = watcher.subscribe("t.>").await.expect("subscribe");
    // A raw client resumes from the start of the stream there.
    let welcome = {
        let mut probe = common::Raw::connect(&cluster.addrs[0]).await;
        probe.hello(77, &[], SlowPolicy::Disconnect).await
    };
    // What a client resuming from the start of the stream is replayed.
    let replay = |addr: String, publisher: u64| async move {
        let mut raw = common::Raw::connect(&addr).await;
        let mut hello = common::hello(publisher, &["t.>"], SlowPolicy::Disconnect);
        hello.resume = Some(Resume {
            stream: welcome.stream,
            after: Seq(0),
            check: None,
            agreed: None,
        });
        raw.send(ClientFrame::Hello(hello)).await;
        let mut replayed = Vec::new();
        while replayed.len() < 600 {
            match raw.next().await {
                Some(ServerFrame::Welcome(w)) => {
                    assert_eq!(w.stream, welcome.stream, "one stream")
                }
                Some(ServerFrame::Deliver(head, body)) => {
                    let mut msgs = Vec::new();
                    proto::messages(&head, &body, &mut msgs).expect("valid delivery");
                    replayed.extend(msgs.into_iter().map(|m| (m.seq.0, m.payload)));
                }
                Some(ServerFrame::Watermark(_)) => {}
                other => panic!("expected the catch-up, got {other:?}"),
            }
        }
        replayed
    };
    let replayed = replay(cluster.addrs[2].clone(), 78).await;
    let payloads: Vec<bytes::Bytes> = replayed.iter().map(|(_, p)| p.clone()).collect();
    let expected: Vec<bytes::Bytes> = (0..600u64)
        .map(|i| bytes::Bytes::from(format!("{i}")))
        .collect();
    assert_eq!(payloads, expected, "the snapshot carried the history");
    assert_eq!(
        replayed,
        replay(cluster.addrs[0].clone(), 79).await,
        "with the seqs the others gave"
    );
    let mut last = replayed.last().map_or(0, |(s, _)| *s);
    for i in 600..700 {
        publisher.send("t.x", format!("{i}")).await.expect("send");
    }
    publisher
        .flush()
        .await
        .expect("acknowledged with all three back");
    for i in 600..700u64 {
        match within_for(STREAM_TIME_MAX, "a live message", live.next()).await {
            Some(Event::Message(m)) => {
                assert!(m.seq.0 > last, "the live stream continues the replay");
                last = m.seq.0;
                assert_eq!(m.payload, format!("{i}").as_bytes());
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Garbage on a server-to-server port (no hello, a bad hello, an undecodable
/// message after a good hello, an oversized frame) drops only that link: the
/// core keeps ordering and delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_a_core_link_drops_only_that_link() {
    use tokio::io::AsyncWriteExt;
    let cluster = Cluster::start(3, "");
    let client = within_for(
        STREAM_TIME_MAX,
        "client connect",
        Client::connect(options(cluster.addrs_from(0), "c".into())),
    )
    .await
    .expect("connects");
    let mut sub = client.subscribe("t.>").await.expect("subscribe");
    // A well-formed link hello from "server 2", as CBOR {version, node: 2}.
    let mut hello = Vec::new();
    let version = canopy_broker::runtime::LINK_VERSION;
    ciborium::into_writer(
        &serde_json::json!({"version": version, "node": 2}),
        &mut hello,
    )
    .expect("encode");
    let framed = |content: &[u8]| {
        let mut f = (content.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(content);
        f
    };
    let garbage: Vec<Vec<u8>> = vec![
        b"\xde\xad\xbe\xef random bytes".to_vec(),
        framed(b"\xff\xfe not a hello"),
        [framed(&hello), framed(b"\x9f\xff\x00 not a message")].concat(),
        (u32::MAX).to_be_bytes().to_vec(),
    ];
    for (k, bytes) in garbage.iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(&cluster.peers[0])
            .await
            .expect("connect to a core link port");
        s.write_all(bytes).await.expect("write");
        // The server drops the offending link: its side reads end-of-stream.
        let mut buf = [0u8; 64];
        let read = tokio::io::AsyncReadExt::read(&mut s, &mut buf);
        // A reset counts as closed too.
        let n = within_for(STREAM_TIME_MAX, "the bad link to be dropped", read)
            .await
            .unwrap_or(0);
        assert_eq!(
            n, 0,
            "case {k}: the server sends nothing on a link and closes it"
        );
        client
            .publish("t.x", format!("{k}"))
            .await
            .expect("the core still orders");
        match within_for(STREAM_TIME_MAX, "delivery", sub.next()).await {
            Some(Event::Message(m)) => assert_eq!(m.payload, format!("{k}").as_bytes()),
            other => panic!("expected a message, got {other:?}"),
        }
    }
}
