//! Cluster admission over real processes (docs/DESIGN.md, "Security"):
//! core servers that share the core's secret prove it to each other
//! before a link carries anything; a process on the peer port that cannot
//! is dropped before one protocol message is read, and a server never
//! talks to a peer address that cannot prove it either.

mod common;

use bytes::Bytes;
use common::{closed_by_the_server, heartbeat, record as frame, within, Cluster, LinkHello};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

const SECRET: &str = "secret = \"a-core-secret-of-some-length\"";

#[derive(Serialize, Deserialize, Debug)]
struct LinkChallenge {
    nonce: Bytes,
    proof: Bytes,
}

#[derive(Serialize, Deserialize, Debug)]
struct LinkAnswer {
    proof: Bytes,
}

/// The core still orders and delivers.
async fn still_serving(cluster: &Cluster) {
    let client = common::within(
        "connect",
        canopy_client::Client::connect(canopy_client::ClientOptions::new(cluster.addrs.clone())),
    )
    .await
    .expect("connects");
    let mut sub = client.subscribe("t.>").await.expect("subscribes");
    client.publish("t.x", "after").await.expect("publishes");
    match within("the message", sub.next()).await {
        Some(canopy_client::Event::Message(m)) => assert_eq!(&m.payload[..], b"after"),
        other => panic!("expected the message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_share_the_secret_form_a_core_and_others_are_dropped_at_once() {
    let cluster = Cluster::start_with_http(3, SECRET);
    still_serving(&cluster).await;
    let peer = cluster.peers[0].clone();

    // No offer to prove the secret: dropped without an answer.
    let mut rogue = TcpStream::connect(&peer).await.expect("connects");
    let hello = LinkHello {
        version: canopy_broker::runtime::LINK_VERSION,
        node: 2,
        nonce: None,
    };
    rogue.write_all(&frame(&hello)).await.expect("writes");
    // A well-formed message (a server that read it would keep the link).
    let _ = rogue.write_all(&heartbeat()).await;
    closed_by_the_server(&mut rogue, 0).await;

    // An offer, then a wrong answer to the challenge: dropped.
    let mut rogue = TcpStream::connect(&peer).await.expect("connects");
    let hello = LinkHello {
        version: canopy_broker::runtime::LINK_VERSION,
        node: 2,
        nonce: Some(Bytes::from_static(&[7; 32])),
    };
    rogue.write_all(&frame(&hello)).await.expect("writes");
    let mut frames = FramedRead::new(&mut rogue, LengthDelimitedCodec::new());
    let challenge = within("the challenge", frames.next())
        .await
        .expect("a challenge")
        .expect("reads");
    let challenge: LinkChallenge = ciborium::from_reader(&challenge[..]).expect("a challenge");
    assert_eq!(challenge.nonce.len(), 32);
    drop(frames);
    let answer = LinkAnswer {
        proof: Bytes::from_static(&[0; 32]),
    };
    rogue.write_all(&frame(&answer)).await.expect("writes");
    let _ = rogue.write_all(&heartbeat()).await;
    closed_by_the_server(&mut rogue, 0).await;

    // A huge length prefix before admission: dropped, nothing held for it.
    let mut rogue = TcpStream::connect(&peer).await.expect("connects");
    rogue
        .write_all(&[0xff, 0xff, 0xff, 0xf0, 1, 2, 3])
        .await
        .expect("writes");
    closed_by_the_server(&mut rogue, 0).await;

    still_serving(&cluster).await;
    // Each was dropped before admission (not for what it sent after):
    // three refused at server 1, none anywhere else.
    for (i, want) in [(0, 3), (1, 0), (2, 0)] {
        let http = cluster.servers[i]
            .as_ref()
            .and_then(|s| s.http.clone())
            .expect("HTTP on");
        let line = format!("canopy_peer_links_refused_total {want}");
        common::metric_line(&http, "/metrics", &line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_does_not_talk_to_a_peer_address_that_cannot_prove_the_secret() {
    let mut cluster = Cluster::start(3, SECRET);
    still_serving(&cluster).await;
    // Server 3 is gone; an impostor takes its peer address.
    cluster.kill(2);
    let impostor = within("bind", async {
        loop {
            if let Ok(l) = TcpListener::bind(&cluster.peers[2]).await {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for _ in 0..2 {
        let (mut stream, _) = within("a server dials", impostor.accept())
            .await
            .expect("accepts");
        let mut frames = FramedRead::new(&mut stream, LengthDelimitedCodec::new());
        let hello = within("its hello", frames.next())
            .await
            .expect("a hello")
            .expect("reads");
        let hello: LinkHello = ciborium::from_reader(&hello[..]).expect("a link hello");
        assert_eq!(
            hello.nonce.as_ref().map(Bytes::len),
            Some(32),
            "it offers to prove"
        );
        drop(frames);
        let forged = LinkChallenge {
            nonce: Bytes::from_static(&[9; 32]),
            proof: Bytes::from_static(&[1; 32]),
        };
        stream.write_all(&frame(&forged)).await.expect("writes");
        // Not one frame more: no answer, no protocol message.
        closed_by_the_server(&mut stream, 0).await;
    }
    still_serving(&cluster).await;
}
