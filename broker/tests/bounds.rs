//! Outbound queues bounded in bytes, over real processes (docs/DESIGN.md,
//! "Bounds"): a subscriber past its byte bound is handled by its slow
//! policy (cut, or gap notices) and no one else is; with many slow
//! subscribers the node's queued bytes stay under the total bound, the
//! slow ones are handled and the fast one keeps its whole stream.

mod common;

use canopy_client::protocol::{ErrorCode, ServerFrame, SlowPolicy};
use common::{take_messages, within, Raw, Server};
use std::time::Duration;

/// Frame counts never bind here: only bytes do.
const FRAMES: &str = "queue_frames_max = 1048576\nmembers_max = 0\n";
/// Messages of 64 KiB: 400 of them are 25 MiB, far past the kernel's
/// buffers of a subscriber that does not read.
const N: usize = 400;
const PAYLOAD: usize = 64 << 10;

async fn publish_all(server: &Server) {
    let publisher = server.client().await;
    let payload = vec![7u8; PAYLOAD];
    for _ in 0..N {
        publisher
            .publish("s.x", payload.clone())
            .await
            .expect("publish");
    }
}

/// A server whose sessions may each hold 64 MiB and all together `total`
/// bytes, with its HTTP address.
fn server_with_total(total: u64) -> (Server, String) {
    let server = Server::with_config_and_http(&format!(
        "[limits]\nqueue_bytes_max = 67108864\nqueue_bytes_total_max = {total}\n{FRAMES}"
    ));
    let http = server.http.clone().expect("HTTP on");
    (server, http)
}

/// `n` subscribers to everything that do not read until told to, with
/// small receive buffers (so that the node's queues hold what they lag).
async fn stalled_subscribers(server: &Server, n: usize) -> Vec<Raw> {
    let mut subs = Vec::new();
    for i in 0..n {
        let mut raw = Raw::connect_small(&server.addr).await;
        raw.hello(100 + i as u64, &["s.>"], SlowPolicy::Disconnect)
            .await;
        subs.push(raw);
    }
    subs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_past_its_byte_bound_is_cut_and_no_one_else() {
    let server = Server::with_config(&format!("[limits]\nqueue_bytes_max = 262144\n{FRAMES}"));
    let mut slow = Raw::connect_small(&server.addr).await;
    slow.hello(1, &["s.>"], SlowPolicy::Disconnect).await;
    let fast_client = server.client().await;
    let mut fast = fast_client.subscribe("s.>").await.expect("subscribe");
    let reader = tokio::spawn(async move { take_messages(&mut fast, N).await });
    publish_all(&server).await;
    let got = within("fast subscriber", reader).await.expect("reader");
    assert!(
        got.windows(2).all(|w| w[1].seq == w[0].seq.next()) && got.len() == N,
        "the fast stream is complete and ordered"
    );
    let err = slow.expect_error_and_close().await;
    assert_eq!(err.code, ErrorCode::SlowConsumer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflating_subscriber_past_its_byte_bound_is_told_of_gaps_and_stays() {
    let server = Server::with_config(&format!(
        "[limits]\nqueue_bytes_max = 262144\nwatermark_interval_ms = 50\n{FRAMES}"
    ));
    let mut slow = Raw::connect_small(&server.addr).await;
    slow.hello(1, &["s.>"], SlowPolicy::Conflate).await;
    publish_all(&server).await;
    let gaps = slow.covered_through(N as u64).await;
    assert!(gaps > 0, "the stalled subscriber was told of a gap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_every_subscriber_shares_counts_once_against_the_total_bound() {
    const SUBS: usize = 10;
    const TOTAL: u64 = 64 << 20;
    // 400 messages of 64 KiB are 25 MiB: under half the total bound held
    // once, 250 MiB counted per queue, far past what the kernel's buffers
    // take (past half, each session's share is 32 MiB over 11 sessions).
    // No one reads until all are published; then every subscriber gets
    // every message.
    let (server, http) = server_with_total(TOTAL);
    let mut subs = stalled_subscribers(&server, SUBS).await;
    publish_all(&server).await;
    for raw in &mut subs {
        let mut got = 0;
        while got < N {
            match raw.next().await {
                Some(ServerFrame::Deliver(head, _)) => got += head.msgs.len(),
                Some(ServerFrame::Error(e)) => panic!("a subscriber was refused: {e:?}"),
                Some(_) => {}
                None => panic!("a subscriber was closed: {:?}", raw.ended),
            }
        }
    }
    common::metric_line(&http, "/metrics", "canopy_slow_consumers_total 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_many_slow_subscribers_the_total_bound_holds_and_the_fast_one_keeps_its_stream() {
    const SLOW: usize = 8;
    const TOTAL: u64 = 8 << 20;
    // Each session may hold 64 MiB, the node 8 MiB in all: only the total
    // bound can stop 8 slow subscribers. (Past 4 MiB in all, a session's
    // share is 4 MiB over 11 sessions, about 6 messages: a fast reader
    // holds less.)
    let (server, http) = server_with_total(TOTAL);
    let mut slow = stalled_subscribers(&server, SLOW).await;
    let fast_client = server.client().await;
    let mut fast = fast_client.subscribe("s.>").await.expect("subscribe");
    let reader = tokio::spawn(async move { take_messages(&mut fast, N).await });
    // Samples of the node's queued bytes while it runs.
    let watcher = {
        let http = http.clone();
        tokio::spawn(async move {
            let mut highest = 0u64;
            for _ in 0..400 {
                let body = common::http_get(&http, "/metrics").await;
                let now = body
                    .lines()
                    .find_map(|l| l.strip_prefix("canopy_queued_bytes ")?.parse::<f64>().ok())
                    .expect("canopy_queued_bytes");
                highest = highest.max(now as u64);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            highest
        })
    };
    publish_all(&server).await;
    let got = within("fast subscriber", reader).await.expect("reader");
    assert!(
        got.windows(2).all(|w| w[1].seq == w[0].seq.next()) && got.len() == N,
        "the fast stream is complete and ordered"
    );
    for raw in &mut slow {
        let err = raw.expect_error_and_close().await;
        assert_eq!(err.code, ErrorCode::SlowConsumer);
    }
    let line = format!("canopy_slow_consumers_total {SLOW}");
    common::metric_line(&http, "/metrics", &line).await;
    // Under the bound, plus at most one frame per session.
    let slack = (SLOW as u64 + 2) * (PAYLOAD as u64 + 1024);
    let highest = within("the samples", watcher).await.expect("watcher");
    assert!(
        highest <= TOTAL + slack,
        "queued {highest} bytes at the most"
    );
}
