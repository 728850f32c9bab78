//! Hostile input, all at once, over real TCP (issue 13's suite): while a
//! well-behaved publisher and subscriber run, attackers open handshakes
//! they never finish, send huge length prefixes, deeply nested and
//! truncated CBOR and random bytes, flood connections past the cap, and
//! subscribe without ever reading. The server stays up, its memory stays
//! bounded (measured), and the subscriber's stream is complete and in
//! order (checked message by message).

mod common;

use canopy_client::protocol::{kind, ClientFrame, SlowPolicy, SubscribeHead};
use canopy_client::Event;
use common::{frame, hello, within_for, Raw, Server};
use futures::StreamExt;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MESSAGES: usize = 2_000;
/// Connections the server holds at most (the flood goes past it).
const CONNECTIONS_MAX: usize = 150;

/// Bytes from a fixed seed (splitmix64), so every run attacks alike.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (x ^ (x >> 31)) as u8
        })
        .collect()
}

/// One attacker: connects, sends `bytes`, then holds the connection
/// (without reading) for `hold`.
async fn attack(addr: String, bytes: Vec<u8>, hold: Duration) {
    let Ok(mut s) = TcpStream::connect(&addr).await else {
        return;
    };
    let _ = s.write_all(&bytes).await;
    tokio::time::sleep(hold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_hurt_the_server_or_a_well_behaved_stream() {
    let server = Server::with_config(&format!(
        "[limits]\nhandshake_timeout_ms = 500\nconnections_max = {CONNECTIONS_MAX}\nqueue_frames_max = 64\n"
    ));
    let good = server.client().await;
    let mut sub = good.subscribe("ok.>").await.expect("subscribes");
    let publisher = server.client().await;
    publisher.publish("ok.warm", "up").await.expect("publishes");
    let rss_before = server.rss_kib();

    let addr = server.addr.clone();
    let hold = Duration::from_secs(2);
    let mut attackers = Vec::new();
    for i in 0..20u64 {
        // A handshake begun and never finished (slowloris).
        let partial = frame(kind::HELLO, &[0xa5, 0x67])[..5].to_vec();
        // A length prefix far past the frame limit.
        let huge = vec![0x7f, 0xff, 0xff, 0xff, kind::HELLO, 1, 2, 3];
        // A head nested 100,000 deep, and one cut short.
        let nested = frame(kind::HELLO, &vec![0x9f; 100_000]);
        let truncated = frame(kind::HELLO, &[0xa9, 0x67, 0x76, 0x65]);
        let random = random_bytes(i, 4096);
        for bytes in [partial, huge, nested, truncated, random] {
            attackers.push(tokio::spawn(attack(addr.clone(), bytes, hold)));
        }
    }
    // Subscribers that never read, with small receive buffers.
    let mut sleepers = Vec::new();
    for i in 0..5 {
        let mut raw = Raw::connect_small(&addr).await;
        raw.send(ClientFrame::Hello(hello(
            1_000 + i,
            &[],
            SlowPolicy::Disconnect,
        )))
        .await;
        raw.send(ClientFrame::Subscribe(SubscribeHead {
            pattern: "ok.>".into(),
        }))
        .await;
        sleepers.push(raw);
    }
    // A flood past the connection cap.
    let mut flood = Vec::new();
    for _ in 0..CONNECTIONS_MAX {
        if let Ok(s) = TcpStream::connect(&addr).await {
            flood.push(s);
        }
    }

    // Meanwhile the publisher goes on; the subscriber must get everything.
    let payload = "x".repeat(512);
    for i in 0..MESSAGES {
        let topic = format!("ok.{}", i % 7);
        let body = format!("{i} {payload}");
        let ack = publisher.send(&topic, body).await.expect("queued");
        if (i + 1).is_multiple_of(100) {
            ack.await.expect("acknowledged");
        }
    }
    let mut rss_peak = server.rss_kib();
    let mut next = 0usize;
    within_for(Duration::from_secs(60), "the whole stream", async {
        while next < MESSAGES {
            match sub.next().await {
                Some(Event::Message(m)) if m.topic() == "ok.warm" => {}
                Some(Event::Message(m)) => {
                    let text = String::from_utf8_lossy(&m.payload).into_owned();
                    let n: usize = text
                        .split(' ')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .expect("numbered");
                    assert_eq!(n, next, "in order, nothing missing");
                    next += 1;
                    if next.is_multiple_of(500) {
                        rss_peak = rss_peak.max(server.rss_kib());
                    }
                }
                Some(Event::Gap { from, to }) => {
                    panic!("a gap {from}..={to} for a client that reads")
                }
                Some(_) => {}
                None => panic!("the subscription ended"),
            }
        }
    })
    .await;
    rss_peak = rss_peak.max(server.rss_kib());
    for a in attackers {
        let _ = a.await;
    }
    drop(flood);
    drop(sleepers);
    // Still serving new clients.
    let late = server.client().await;
    late.publish("ok.late", "l")
        .await
        .expect("publishes after the attack");
    let grown = rss_peak.saturating_sub(rss_before);
    eprintln!("server RSS before the attack {rss_before} KiB, peak {rss_peak} KiB (+{grown} KiB)");
    assert!(
        grown < 64 * 1024,
        "the server's memory grew by {grown} KiB under attack (before {rss_before} KiB)"
    );
}
