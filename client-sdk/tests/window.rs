//! The SDK's publish window, against a scripted server on loopback: at
//! most `window_bytes` of publishes are in flight (sent and not
//! acknowledged); an acknowledgement gives room back, and a publish larger
//! than the whole window goes alone.

use canopy_client::protocol::{self, ClientFrame, PubAck, PubSeq, Seq, ServerFrame, Welcome};
use canopy_client::{Client, ClientOptions};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const TIME_MAX: Duration = Duration::from_secs(10);

type Conn = Framed<TcpStream, LengthDelimitedCodec>;

async fn read(conn: &mut Conn) -> ClientFrame {
    let content = conn.next().await.expect("a frame").expect("readable");
    protocol::decode_client(content.freeze()).expect("a valid client frame")
}

async fn send(conn: &mut Conn, frame: &ServerFrame) {
    // `encode_server` includes the length prefix the codec adds again.
    let bytes = protocol::encode_server(frame).slice(4..);
    conn.send(bytes).await.expect("send");
}

/// A server that welcomes one client, reports each publish's pub_seq and
/// size, and acknowledges through the pub_seqs it is told to.
async fn serve(
    listener: TcpListener,
    seen: mpsc::Sender<(u64, usize)>,
    mut acks: mpsc::Receiver<u64>,
) {
    let (socket, _) = listener.accept().await.expect("accept");
    let mut conn = Framed::new(socket, LengthDelimitedCodec::new());
    let ClientFrame::Hello(_) = read(&mut conn).await else {
        panic!("expected Hello")
    };
    let welcome = Welcome {
        version: protocol::PROTOCOL_VERSION,
        server: "scripted".into(),
        session: 1,
        stream: 5,
        head: Seq(0),
        pub_acked: PubSeq(0),
        frame_len_max: 1 << 20,
        servers: Vec::new(),
        hash: 0,
        permissions: None,
    };
    send(&mut conn, &ServerFrame::Welcome(welcome)).await;
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

#[tokio::test]
async fn publishes_in_flight_are_bounded_in_count() {
    let (client, mut seen, ack) = connect(2, 1 << 20).await;
    two_in_flight(&client, &mut seen, 10).await;
    let third = tokio::spawn({
        let client = client.clone();
        async move { client.send("t.x", vec![7u8; 10]).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!third.is_finished(), "a third publish went past the window");
    ack.send(1).await.expect("the server runs");
    let got = tokio::time::timeout(TIME_MAX, seen.recv())
        .await
        .expect("in time");
    assert_eq!(got, Some((3, 10)));
}

#[tokio::test]
async fn publishes_in_flight_are_bounded_in_bytes() {
    let (client, mut seen, ack) = connect(16_384, 1000).await;
    // Each takes 3 + 400 bytes of the window: two fit, the third waits.
    let payload = vec![7u8; 400];
    two_in_flight(&client, &mut seen, 400).await;
    let third = tokio::spawn({
        let client = client.clone();
        let payload = payload.clone();
        async move { client.send("t.x", payload).await.map(drop) }
    });
    // (A correct client never sends it here; a wrong one is caught at once
    // or, if slow, by the next check.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !third.is_finished(),
        "a third publish went past the window's bytes"
    );
    assert!(seen.try_recv().is_err(), "the server got a third publish");
    // The first acknowledged: its room goes to the third.
    ack.send(1).await.expect("the server runs");
    let got = tokio::time::timeout(TIME_MAX, seen.recv())
        .await
        .expect("in time");
    assert_eq!(got, Some((3, 400)));
    tokio::time::timeout(TIME_MAX, third)
        .await
        .expect("in time")
        .expect("runs")
        .expect("queued");
    // A publish larger than the whole window goes once nothing else is in
    // flight, alone.
    let large = tokio::spawn({
        let client = client.clone();
        async move { client.send("t.x", vec![1u8; 5000]).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seen.try_recv().is_err(),
        "the large publish waits for the two in flight"
    );
    ack.send(3).await.expect("the server runs");
    let got = tokio::time::timeout(TIME_MAX, seen.recv())
        .await
        .expect("in time");
    assert_eq!(got, Some((4, 5000)));
    tokio::time::timeout(TIME_MAX, large)
        .await
        .expect("in time")
        .expect("runs")
        .expect("queued");
}
