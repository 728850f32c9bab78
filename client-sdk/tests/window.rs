//! The SDK's publish window, against a scripted server on loopback: at
//! most `window_bytes` of publishes are in flight (sent and not
//! acknowledged); an acknowledgement gives room back, and a publish larger
//! than the whole window goes alone.

mod common;

use canopy_client::protocol::{self, ClientFrame, PubAck, PubSeq, Seq, ServerFrame};
use canopy_client::{Client, ClientOptions};
use common::{accept, read, send, welcome, TIME_MAX};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A server that welcomes one client, reports each publish's pub_seq and
/// size, and acknowledges through the pub_seqs it is told to.
async fn serve(
    listener: TcpListener,
    seen: mpsc::Sender<(u64, usize)>,
    mut acks: mpsc::Receiver<u64>,
) {
    let mut conn = accept(&listener).await;
    let ClientFrame::Hello(_) = read(&mut conn).await else {
        panic!("expected Hello")
    };
    send(&mut conn, &welcome(5, 0, 0)).await;
    loop {
        tokio::select! {
            frame = read(&mut conn) => {
                if let ClientFrame::Publish(p) = frame {
                    let _ = seen.send((p.pub_seq.0, p.payload.len())).await;
                }
            }
            through = acks.recv() => {
                let Some(through) = through else { return };
                let ack = PubAck { pub_seq: PubSeq(through), seq: Seq(through), publisher: None };
                send(&mut conn, &ServerFrame::PubAck(ack)).await;
            }
        }
    }
}

/// A client of a scripted server, with the window given; the server's
/// publishes seen, and a way to have it acknowledge.
async fn connect(
    window: usize,
    window_bytes: usize,
) -> (Client, mpsc::Receiver<(u64, usize)>, mpsc::Sender<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let (seen_tx, seen) = mpsc::channel(16);
    let (ack, acks) = mpsc::channel(16);
    tokio::spawn(serve(listener, seen_tx, acks));
    let mut options = ClientOptions::new([addr]);
    options.reports = protocol::Reports::None;
    options.window = window;
    options.window_bytes = window_bytes;
    let client = tokio::time::timeout(TIME_MAX, Client::connect(options))
        .await
        .expect("in time")
        .expect("connects");
    (client, seen, ack)
}

/// Sends two publishes of `payload` bytes on `t.x`, which the server gets.
async fn two_in_flight(client: &Client, seen: &mut mpsc::Receiver<(u64, usize)>, payload: usize) {
    for _ in 0..2 {
        let sent = tokio::time::timeout(TIME_MAX, client.send("t.x", vec![7u8; payload])).await;
        drop(sent.expect("in time").expect("queued"));
    }
    for pub_seq in 1..=2 {
        let got = tokio::time::timeout(TIME_MAX, seen.recv())
            .await
            .expect("in time");
        assert_eq!(got, Some((pub_seq, payload)));
    }
}

/// A publish of `payload` bytes that must wait for room in the window:
/// not sent, nor seen by the server, for a while (a correct client never
/// sends it; a wrong one is caught at once or, if slow, by `room_given`).
async fn waits(
    client: &Client,
    seen: &mut mpsc::Receiver<(u64, usize)>,
    payload: usize,
    why: &str,
) -> JoinHandle<()> {
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            let sent = client.send("t.x", vec![7u8; payload]).await;
            drop(sent.expect("queued"));
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished(), "{why}");
    assert!(seen.try_recv().is_err(), "{why}: the server got it");
    task
}

/// The server acknowledges through `through`: the waiting publish `task`
/// goes, as `pub_seq` of `payload` bytes.
async fn room_given(
    ack: &mpsc::Sender<u64>,
    seen: &mut mpsc::Receiver<(u64, usize)>,
    through: u64,
    task: JoinHandle<()>,
    (pub_seq, payload): (u64, usize),
) {
    ack.send(through).await.expect("the server runs");
    let got = tokio::time::timeout(TIME_MAX, seen.recv())
        .await
        .expect("in time");
    assert_eq!(got, Some((pub_seq, payload)));
    tokio::time::timeout(TIME_MAX, task)
        .await
        .expect("in time")
        .expect("sent");
}

#[tokio::test]
async fn publishes_in_flight_are_bounded_in_count() {
    let (client, mut seen, ack) = connect(2, 1 << 20).await;
    two_in_flight(&client, &mut seen, 10).await;
    let third = waits(
        &client,
        &mut seen,
        10,
        "a third publish went past the window",
    )
    .await;
    room_given(&ack, &mut seen, 1, third, (3, 10)).await;
}

#[tokio::test]
async fn publishes_in_flight_are_bounded_in_bytes() {
    let (client, mut seen, ack) = connect(16_384, 1000).await;
    // Each takes 3 + 400 bytes of the window: two fit, the third waits
    // until the first is acknowledged.
    two_in_flight(&client, &mut seen, 400).await;
    let why = "a third publish went past the window's bytes";
    let third = waits(&client, &mut seen, 400, why).await;
    room_given(&ack, &mut seen, 1, third, (3, 400)).await;
    // A publish larger than the whole window goes once nothing else is in
    // flight, alone.
    let why = "the large publish went beside two in flight";
    let large = waits(&client, &mut seen, 5000, why).await;
    room_given(&ack, &mut seen, 3, large, (4, 5000)).await;
}
