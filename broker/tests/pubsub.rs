//! Pub/sub over real TCP between a `canopy serve` process and SDK clients.

mod common;

use canopy_client::protocol::{ClientFrame, PubSeq, ServerFrame, SlowPolicy};
use canopy_client::{Client, ClientOptions, Event, Seq};
use common::{publish, take_messages, within, Proxy, Raw, Server};
use futures::StreamExt;
use std::collections::HashMap;

#[tokio::test]
async fn wildcard_subscriptions_receive_exactly_their_topics() {
    let server = Server::start();
    let client = server.client().await;
    let mut nasdaq = client.subscribe("md.NASDAQ.*").await.expect("subscribe");
    let mut line3 = client
        .subscribe("factory.line3.>")
        .await
        .expect("subscribe");
    let other = server.client().await;
    let mut all_md = other.subscribe("md.>").await.expect("subscribe");
    let topics = [
        "md.NASDAQ.AAPL",
        "md.NYSE.IBM",
        "factory.line3.temp",
        "md.NASDAQ.AAPL.bid",
        "factory.line3.press.max",
        "factory.line4.temp",
        "md.NASDAQ.MSFT",
    ];
    for t in topics {
        client
            .publish(t, t.as_bytes().to_vec())
            .await
            .expect("publish");
    }
    let got = |ms: Vec<canopy_client::Message>| {
        ms.iter().map(|m| m.topic().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(
        got(take_messages(&mut nasdaq, 2).await),
        ["md.NASDAQ.AAPL", "md.NASDAQ.MSFT"]
    );
    assert_eq!(
        got(take_messages(&mut line3, 2).await),
        ["factory.line3.temp", "factory.line3.press.max"]
    );
    assert_eq!(
        got(take_messages(&mut all_md, 4).await),
        [
            "md.NASDAQ.AAPL",
            "md.NYSE.IBM",
            "md.NASDAQ.AAPL.bid",
            "md.NASDAQ.MSFT"
        ]
    );
    // A marker proves nothing else was queued behind the expected messages.
    client
        .publish("md.NASDAQ.END", "end")
        .await
        .expect("publish");
    assert_eq!(got(take_messages(&mut nasdaq, 1).await), ["md.NASDAQ.END"]);
}

/// For tests that count seqs (a `[limits]` key): ordered membership off, so that seqs number
/// the published messages alone (clients' attach and detach events would
/// take seqs between them).
const SEQS_ONLY: &str = "members_max = 0\n";

/// Several publishers, 100 subscribers, each on its own connection: every
/// subscriber gets every message once, all in the same order, and each
/// publisher's messages in the order it sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_subscribers_see_one_complete_order_from_several_publishers() {
    const PUBS: usize = 3;
    const EACH: usize = 300;
    let server = Server::start();
    let mut subs = Vec::new();
    for _ in 0..100 {
        let c = server.client().await;
        let s = c.subscribe("orders.>").await.expect("subscribe");
        subs.push((c, s));
    }
    let mut publishers = Vec::new();
    for p in 0..PUBS {
        let c = server.client().await;
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                c.send(&format!("orders.p{p}"), format!("{p}:{i}"))
                    .await
                    .expect("send");
            }
            c.flush().await.expect("flush");
        }));
    }
    for p in publishers {
        within("publishers", p).await.expect("publisher task");
    }
    let mut reference: Option<Vec<(Seq, String)>> = None;
    for (_c, mut s) in subs {
        let msgs = take_messages(&mut s, PUBS * EACH).await;
        let seen: Vec<(Seq, String)> = msgs
            .iter()
            .map(|m| (m.seq, String::from_utf8_lossy(&m.payload).into_owned()))
            .collect();
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "seqs ascend");
        let mut next = HashMap::new();
        for (_, text) in &seen {
            let (p, i) = text.split_once(':').expect("payload p:i");
            let expect = next.entry(p.to_owned()).or_insert(0usize);
            assert_eq!(
                i.parse::<usize>().expect("number"),
                *expect,
                "publisher {p} FIFO"
            );
            *expect += 1;
        }
        match &reference {
            None => reference = Some(seen),
            Some(r) => assert_eq!(r, &seen, "every subscriber sees the same order"),
        }
    }
}

/// A subscriber whose connection breaks resumes from its last sequence
/// number: nothing published meanwhile is lost, nothing is doubled.
#[tokio::test]
async fn resumed_subscriber_misses_nothing_and_gets_nothing_twice() {
    let server = Server::start();
    let proxy = Proxy::start(&server.addr).await;
    let sub_client = proxy.client().await;
    let mut sub = sub_client.subscribe("t.>").await.expect("subscribe");
    let publisher = server.client().await;
    for i in 0..50 {
        publisher
            .publish("t.a", format!("{i}"))
            .await
            .expect("publish");
    }
    let first = take_messages(&mut sub, 50).await;
    proxy.refuse(true);
    proxy.cut().await;
    for i in 50..100 {
        publisher
            .publish("t.a", format!("{i}"))
            .await
            .expect("publish");
    }
    proxy.refuse(false);
    for i in 100..150 {
        publisher
            .publish("t.a", format!("{i}"))
            .await
            .expect("publish");
    }
    let rest = take_messages(&mut sub, 100).await;
    let all: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..150).map(|i| i.to_string()).collect();
    assert_eq!(all, expected);
    publisher.publish("t.a", "end").await.expect("publish");
    let end = take_messages(&mut sub, 1).await;
    assert_eq!(
        &end[0].payload[..],
        b"end",
        "no duplicate was queued before the end marker"
    );
}

/// When retention no longer holds where a client stopped, it is told the
/// exact missed range, then gets what is retained.
#[tokio::test]
async fn resume_beyond_retention_reports_a_gap_then_the_retained_rest() {
    let server = Server::with_config(&format!(
        "[limits]\n{SEQS_ONLY}[retention]\ncount_max = 10\n"
    ));
    let proxy = Proxy::start(&server.addr).await;
    let sub_client = proxy.client().await;
    let mut sub = sub_client.subscribe("t.>").await.expect("subscribe");
    let publisher = server.client().await;
    publisher.publish("t.a", "0").await.expect("publish");
    let first = take_messages(&mut sub, 1).await;
    assert_eq!(first[0].seq, Seq(1));
    proxy.refuse(true);
    proxy.cut().await;
    for i in 1..50 {
        publisher
            .publish("t.a", format!("{i}"))
            .await
            .expect("publish");
    }
    proxy.refuse(false);
    match within("gap", sub.next()).await {
        Some(Event::Gap { from, to }) => assert_eq!((from, to), (Seq(2), Seq(40))),
        other => panic!("expected a gap notice, got {other:?}"),
    }
    let rest = take_messages(&mut sub, 10).await;
    let seqs: Vec<u64> = rest.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, (41..=50).collect::<Vec<_>>());
}

/// A publisher that retries after losing its connection has each message
/// ordered once; the broker acknowledges the retries without reordering.
#[tokio::test]
async fn publisher_retries_are_deduplicated() {
    let server = Server::start();
    let sub_client = server.client().await;
    let mut sub = sub_client.subscribe("p.>").await.expect("subscribe");

    // Raw: the same publisher id sends 1, 2, reconnects and sends 1, 2, 3.
    let mut raw = Raw::connect(&server.addr).await;
    raw.hello(77, &[], SlowPolicy::Disconnect).await;
    raw.send(publish("p.x", 1, b"one")).await;
    raw.send(publish("p.x", 2, b"two")).await;
    let mut acked = PubSeq(0);
    while acked < PubSeq(2) {
        match raw.next().await {
            Some(ServerFrame::PubAck(a)) => acked = a.pub_seq,
            other => panic!("expected PubAck, got {other:?}"),
        }
    }
    drop(raw);
    let mut raw = Raw::connect(&server.addr).await;
    let welcome = raw.hello(77, &[], SlowPolicy::Disconnect).await;
    assert_eq!(
        welcome.pub_acked,
        PubSeq(2),
        "the server remembers what it ordered"
    );
    raw.send(publish("p.x", 1, b"one")).await;
    raw.send(publish("p.x", 2, b"two")).await;
    raw.send(publish("p.x", 3, b"three")).await;
    let mut acked = PubSeq(0);
    while acked < PubSeq(3) {
        match raw.next().await {
            Some(ServerFrame::PubAck(a)) => acked = a.pub_seq,
            other => panic!("expected PubAck, got {other:?}"),
        }
    }
    let msgs = take_messages(&mut sub, 3).await;
    let payloads: Vec<&[u8]> = msgs.iter().map(|m| &m.payload[..]).collect();
    assert_eq!(payloads, [&b"one"[..], b"two", b"three"]);
    sub_client.publish("p.end", "end").await.expect("publish");
    assert_eq!(
        take_messages(&mut sub, 1).await[0].topic(),
        "p.end",
        "no duplicate before the marker"
    );
}

/// The SDK resends unacknowledged publishes after a broken connection; the
/// subscriber still sees every message exactly once and in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_publisher_failover_neither_loses_nor_duplicates() {
    const N: usize = 3000;
    let server = Server::start();
    let proxy = Proxy::start(&server.addr).await;
    let sub_client = server.client().await;
    let mut sub = sub_client.subscribe("f.>").await.expect("subscribe");
    let publisher = proxy.client().await;
    let sending = tokio::spawn(async move {
        for i in 0..N {
            publisher.send("f.x", format!("{i}")).await.expect("send");
        }
        publisher.flush().await.expect("flush");
    });
    // Cut the publisher's connection while it has publishes in flight.
    let first = take_messages(&mut sub, 100).await;
    proxy.cut().await;
    within("publisher", sending).await.expect("publisher task");
    let rest = take_messages(&mut sub, N - 100).await;
    let got: Vec<usize> = first
        .iter()
        .chain(&rest)
        .map(|m| String::from_utf8_lossy(&m.payload).parse().expect("number"))
        .collect();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    sub_client.publish("f.end", "end").await.expect("publish");
    assert_eq!(take_messages(&mut sub, 1).await[0].topic(), "f.end");
}

/// A subscriber that stops reading is cut off with `slow_consumer`; the
/// others keep their whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_while_fast_ones_keep_their_stream() {
    const N: usize = 400;
    let server = Server::with_config(&format!("[limits]\nqueue_frames_max = 4\n{SEQS_ONLY}"));
    let mut slow = Raw::connect_small(&server.addr).await;
    slow.hello(1, &["s.>"], SlowPolicy::Disconnect).await;
    let fast_client = server.client().await;
    let mut fast = fast_client.subscribe("s.>").await.expect("subscribe");
    let publisher = server.client().await;
    let payload = vec![7u8; 64 * 1024];
    let reader = tokio::spawn(async move { take_messages(&mut fast, N).await });
    for _ in 0..N {
        publisher
            .publish("s.x", payload.clone())
            .await
            .expect("publish");
    }
    let got = within("fast subscriber", reader)
        .await
        .expect("reader task");
    assert_eq!(got.len(), N);
    assert!(
        got.windows(2).all(|w| w[1].seq == w[0].seq.next()),
        "fast stream is complete and ordered"
    );
    let err = slow.expect_error_and_close().await;
    assert_eq!(err.code, canopy_client::protocol::ErrorCode::SlowConsumer);
}

/// A conflating subscriber that falls behind is told what it missed by a
/// gap notice instead of being cut off, and its stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflating_subscriber_gets_gap_notices_instead_of_a_cut() {
    const N: u64 = 400;
    let server = Server::with_config(&format!(
        "[limits]\nqueue_frames_max = 4\nwatermark_interval_ms = 50\n{SEQS_ONLY}"
    ));
    let mut slow = Raw::connect_small(&server.addr).await;
    slow.hello(1, &["s.>"], SlowPolicy::Conflate).await;
    let publisher = server.client().await;
    let payload = vec![7u8; 64 * 1024];
    for _ in 0..N {
        publisher
            .publish("s.x", payload.clone())
            .await
            .expect("publish");
    }
    // Everything up to N is accounted for by deliveries or gap notices.
    let gaps = slow.covered_through(N).await;
    assert!(gaps > 0, "the stalled subscriber was told of a gap");
    // The session is still alive and keeps receiving.
    slow.send(ClientFrame::Ping(canopy_client::protocol::PingHead {
        nonce: 9,
    }))
    .await;
    loop {
        match slow.next().await {
            Some(ServerFrame::Pong(p)) => break assert_eq!(p.nonce, 9),
            Some(_) => continue,
            None => panic!("conflating session was closed"),
        }
    }
}

/// A program restarted with the same publisher id continues after what the
/// server already ordered for it, instead of having new messages taken for
/// retries: each program begins an incarnation of its pub_seqs, the second
/// past the first even within one second of the wall clock
/// (docs/DESIGN.md, "Identity and resume").
#[tokio::test]
async fn a_restarted_publisher_with_a_fixed_id_is_not_mistaken_for_a_retry() {
    let server = Server::start();
    let watcher = server.client().await;
    let mut sub = watcher.subscribe("r.>").await.expect("subscribe");
    let mut options = server.options();
    options.publisher = Some(canopy_client::PublisherId(4242));
    for run in 0..2 {
        let client = within("connect", Client::connect(options.clone()))
            .await
            .expect("connect");
        for i in 0..3 {
            client
                .publish("r.x", format!("{run}:{i}"))
                .await
                .expect("publish");
        }
    }
    let messages = take_messages(&mut sub, 6).await;
    let got: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(got, ["0:0", "0:1", "0:2", "1:0", "1:1", "1:2"]);
    let firsts = [messages[0].pub_seq, messages[3].pub_seq];
    assert!(
        firsts.iter().all(|p| p.begins_incarnation()) && firsts[0] < firsts[1],
        "{firsts:?}"
    );
}

/// An application that reads its subscription slower than the messages
/// come is not reconnected in a loop: its client holds off until the
/// application has read half of what is buffered, then resumes where it
/// left off; it gets every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_resumes_once_it_has_caught_up_not_in_a_loop() {
    let server = Server::with_http();
    let http = server.http.clone().expect("HTTP on");
    let mut options = server.options();
    options.subscription_batches_max = 4;
    read_slowly(&server, options, "r").await;
    let connections = connections_at_least(&http, 2).await;
    assert!(connections < 40, "{connections} connections for 2 clients");
}

/// Flow control (docs/DESIGN.md, "Flow control"): a reader slower than
/// the messages come is sent no more than its receive window, so its
/// subscription never reaches the batch bound behind it (which would drop
/// the connection): one connection throughout, every message once, in
/// order, caught up from retention as it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_paced_by_its_window_on_one_connection() {
    let server = Server::with_http();
    let http = server.http.clone().expect("HTTP on");
    let mut options = server.options();
    options.receive_window = 64;
    // Without the window the backlog (about 500 batches) passes this.
    options.subscription_batches_max = 128;
    read_slowly(&server, options, "w").await;
    let connections = connections_at_least(&http, 2).await;
    assert_eq!(connections, 2, "the reader and the publisher, once each");
}

/// A reader with `options` takes 1,000 messages published on `prefix.x`
/// one a millisecond (batches of about one), at 2 ms each: twice as slow
/// as they come. It must get every one once, in order.
async fn read_slowly(server: &Server, options: ClientOptions, prefix: &str) {
    const N: usize = 1000;
    let reader = within("connect", Client::connect(options))
        .await
        .expect("connect");
    let mut sub = reader
        .subscribe(&format!("{prefix}.>"))
        .await
        .expect("subscribe");
    let publisher = server.client().await;
    let topic = format!("{prefix}.x");
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            drop(publisher.send(&topic, format!("{i}")).await.expect("send"));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        publisher.flush().await.expect("flush");
    });
    let mut got = Vec::with_capacity(N);
    within("the slow reader", async {
        while got.len() < N {
            match sub.next().await {
                Some(Event::Message(m)) => {
                    got.push(
                        String::from_utf8_lossy(&m.payload)
                            .parse::<usize>()
                            .expect("number"),
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    publishing.await.expect("the publisher");
}

/// A client that publishes (awaiting each acknowledgement) without reading
/// its own subscription is stopped by its window, not by a full buffer:
/// acknowledgements still come on the same connection, and the
/// subscription later yields every message once, in order.
#[tokio::test]
async fn publishing_past_the_window_of_an_unread_subscription_goes_on() {
    let server = Server::with_http();
    let http = server.http.clone().expect("HTTP on");
    let mut options = server.options();
    options.receive_window = 16;
    options.subscription_batches_max = 32;
    publish_then_read(options, "u").await;
    let connections = connections_at_least(&http, 1).await;
    assert_eq!(connections, 1, "no reconnect");
}

/// A client with `options` publishes 500 messages on `prefix.x`, awaiting
/// each acknowledgement, without reading its own subscription to them;
/// then reads them: every one once, in order.
async fn publish_then_read(options: ClientOptions, prefix: &str) {
    const N: usize = 500;
    let client = within("connect", Client::connect(options))
        .await
        .expect("connect");
    let mut sub = client
        .subscribe(&format!("{prefix}.>"))
        .await
        .expect("subscribe");
    let topic = format!("{prefix}.x");
    within("publishes with an unread subscription", async {
        for i in 0..N {
            client
                .publish(&topic, format!("{i}"))
                .await
                .expect("publish");
        }
    })
    .await;
    let got: Vec<usize> = take_messages(&mut sub, N)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).parse().expect("number"))
        .collect();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
}

/// The node's count of client connections once its metrics (a snapshot
/// taken every so often) show at least `n`.
async fn connections_at_least(http: &str, n: u64) -> u64 {
    within("the connection count", async {
        loop {
            let body = common::http_get(http, "/metrics").await;
            let connections: u64 = body
                .lines()
                .find_map(|l| l.strip_prefix("canopy_connections_total ")?.parse().ok())
                .expect("canopy_connections_total");
            if connections >= n {
                return connections;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
}

/// An application that publishes (awaiting each acknowledgement) while not
/// reading its own subscription does not deadlock: the client drops and
/// resumes its connection instead of blocking on the full subscription,
/// and the subscription later yields every message once, in order.
#[tokio::test]
async fn publishing_while_not_reading_a_full_subscription_does_not_deadlock() {
    let server = Server::start();
    let mut options = server.options();
    options.subscription_batches_max = 2;
    publish_then_read(options, "d").await;
}

/// The batch API hands over whole delivery frames: every message once, in
/// order, the stream and the batches mixed, many messages a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_every_message_once_in_order() {
    const N: usize = 2000;
    let server = Server::start();
    let reader = server.client().await;
    let mut sub = reader.subscribe("b.>").await.expect("subscribe");
    let publisher = server.client().await;
    for i in 0..N {
        drop(publisher.send("b.x", format!("{i}")).await.expect("send"));
    }
    publisher.flush().await.expect("flush");
    let number = |m: &canopy_client::Message| -> usize {
        String::from_utf8_lossy(&m.payload).parse().expect("number")
    };
    let mut got = Vec::with_capacity(N);
    match within("the first", sub.next()).await {
        Some(Event::Message(m)) => got.push(number(&m)),
        other => panic!("unexpected {other:?}"),
    }
    let mut largest = 0;
    within("every batch", async {
        while got.len() < N {
            let batch = sub.next_batch().await.expect("a batch");
            largest = largest.max(batch.len());
            for e in batch {
                match e {
                    Event::Message(m) => got.push(number(&m)),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    })
    .await;
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    assert!(largest > 1, "messages come many a batch");
}
