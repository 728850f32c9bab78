//! The SDK's side of weak delivery, against a scripted server on loopback:
//! a server that sent messages the survivors never ordered fails; the
//! client resumes elsewhere with its running hash and the position through
//! which its stream is agreed, is told that its stream diverged, and is
//! handed the agreed stream from there, messages at positions it had
//! already passed included.

mod common;

use canopy_client::protocol::{
    self, chain, ClientFrame, DeliverBuilder, DivergedHead, PubSeq, PublisherId, Seq, ServerFrame,
    StreamCheck, SubscribedHead,
};
use canopy_client::{Client, ClientOptions, Event};
use common::{accept, read, send, TIME_MAX};
use futures::StreamExt;
use tokio::net::TcpListener;

const STREAM: u64 = 5;

fn welcome(head: u64, hash: u64) -> ServerFrame {
    common::welcome(STREAM, head, hash)
}

/// A delivery of `(seq, publisher, pub_seq)` on `t.x`, with the running
/// hash from `before` and the stable position.
fn deliver(before: u64, msgs: &[(u64, u64, u64)], stable: u64) -> (ServerFrame, u64) {
    let mut b = DeliverBuilder::default();
    let mut hash = before;
    for &(seq, p, ps) in msgs {
        hash = chain(hash, Seq(seq), PublisherId(p), PubSeq(ps));
        b.push(Seq(seq), PublisherId(p), PubSeq(ps), "t.x", b"m");
    }
    let frame = b.finish_with(Some(hash), Some(Seq(stable)));
    let frame = protocol::decode_server(frame.slice(4..)).expect("a valid delivery");
    (frame, hash)
}

#[tokio::test]
async fn a_weak_client_told_of_a_divergence_gets_the_agreed_stream_from_there() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let server = tokio::spawn(async move {
        // The first server: sends seqs 1 and 2 while only 1 is stable, and fails.
        let mut conn = accept(&listener).await;
        let ClientFrame::Hello(hello) = read(&mut conn).await else {
            panic!("expected Hello")
        };
        assert!(hello.weak, "the client asks for weak delivery");
        send(&mut conn, &welcome(0, 0)).await;
        let ClientFrame::Subscribe(s) = read(&mut conn).await else {
            panic!("expected Subscribe")
        };
        let answer = SubscribedHead {
            pattern: s.pattern,
            head: Seq(0),
            hash: Some(0),
        };
        send(&mut conn, &ServerFrame::Subscribed(answer)).await;
        let (frame, h1) = deliver(0, &[(1, 9, 1)], 0);
        send(&mut conn, &frame).await;
        let (frame, h2) = deliver(h1, &[(2, 9, 2)], 1);
        send(&mut conn, &frame).await;
        drop(conn);
        // The survivor ordered another message at seq 2.
        let mut conn = accept(&listener).await;
        let ClientFrame::Hello(hello) = read(&mut conn).await else {
            panic!("expected Hello")
        };
        let resume = hello.resume.expect("the client resumes");
        assert_eq!(resume.stream, STREAM);
        assert_eq!(resume.after, Seq(2));
        assert_eq!(
            resume.check,
            Some(StreamCheck {
                seq: Seq(2),
                hash: h2
            })
        );
        assert_eq!(
            resume.agreed,
            Some(Seq(1)),
            "agreed through the stable mark"
        );
        send(&mut conn, &welcome(2, 0)).await;
        let diverged = DivergedHead {
            from: Seq(2),
            seen: Seq(2),
        };
        send(&mut conn, &ServerFrame::Diverged(diverged)).await;
        let (frame, _) = deliver(h1, &[(2, 8, 1), (3, 9, 2)], 3);
        send(&mut conn, &frame).await;
        // Hold the connection until the client is done.
        let _ = conn.next().await;
    });
    let mut options = ClientOptions::new([addr]);
    options.weak = true;
    options.reports = protocol::Reports::None;
    let client = tokio::time::timeout(TIME_MAX, Client::connect(options))
        .await
        .expect("in time")
        .expect("connects");
    let mut sub = client.subscribe("t.>").await.expect("subscribe");
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let event = tokio::time::timeout(TIME_MAX, sub.next())
            .await
            .expect("in time")
            .expect("an event");
        seen.push(match event {
            Event::Message(m) => format!("{}:{}/{}", m.seq, m.publisher.0, m.pub_seq.0),
            Event::Diverged { from, seen } => format!("diverged from {from} seen {seen}"),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        seen,
        ["1:9/1", "2:9/2", "diverged from 2 seen 2", "2:8/1", "3:9/2"]
    );
    drop(client);
    tokio::time::timeout(TIME_MAX, server)
        .await
        .expect("the scripted server ends")
        .expect("the scripted server's checks hold");
}
