//! Bad input over real TCP: each case gets a specific error frame and only
//! the offending connection closes; other clients keep receiving and
//! nothing acknowledged is lost.

mod common;

use canopy_client::protocol::{
    self, kind, AskHead, ClientFrame, ErrorCode, PubSeq, PublisherId, ServerFrame, SlowPolicy,
    SubscribeHead,
};
use common::{frame, hello, publish, take_messages, Raw, Server};

/// What the bad client does before its bad bytes.
#[derive(Clone, Copy, PartialEq)]
enum Before {
    /// Nothing: the bad bytes are the first on the connection.
    Nothing,
    /// A valid handshake and one acknowledged publish.
    HelloAndPublish,
}

/// Runs one bad-input case and checks the error code, the close, and that a
/// bystander's stream (including the bad client's acknowledged publish)
/// is whole.
async fn bad_input_case(before: Before, bad: &[u8], expected: ErrorCode) {
    let server = Server::start();
    let bystander = server.client().await;
    let mut stream = bystander.subscribe("ok.>").await.expect("subscribe");
    bystander
        .publish("ok.before", "before")
        .await
        .expect("publish");

    let mut raw = Raw::connect(&server.addr).await;
    if before == Before::HelloAndPublish {
        raw.hello(42, &[], SlowPolicy::Disconnect).await;
        raw.send(publish("ok.raw", 1, b"acknowledged")).await;
        match raw.next().await {
            Some(ServerFrame::PubAck(a)) => assert_eq!(a.pub_seq, PubSeq(1)),
            other => panic!("expected PubAck, got {other:?}"),
        }
    }
    raw.send_bytes(bad).await;
    let err = raw.expect_error_and_close().await;
    assert_eq!(err.code, expected, "error message: {}", err.message);
    assert!(!err.message.is_empty(), "the error says what was wrong");

    bystander
        .publish("ok.after", "after")
        .await
        .expect("publish after the bad client");
    let mut want = vec!["ok.before"];
    if before == Before::HelloAndPublish {
        want.push("ok.raw");
    }
    want.push("ok.after");
    let got = take_messages(&mut stream, want.len()).await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic()).collect();
    assert_eq!(topics, want);
}

#[tokio::test]
async fn malformed_cbor_is_rejected() {
    bad_input_case(
        Before::HelloAndPublish,
        &frame(kind::SUBSCRIBE, &[0xff, 0xff, 0x00]),
        ErrorCode::Malformed,
    )
    .await;
}

#[tokio::test]
async fn a_head_of_the_wrong_shape_is_rejected() {
    // Valid CBOR (an integer) where a Subscribe head map belongs.
    bad_input_case(
        Before::HelloAndPublish,
        &frame(kind::SUBSCRIBE, &[0x05]),
        ErrorCode::Malformed,
    )
    .await;
}

#[tokio::test]
async fn an_empty_frame_is_rejected() {
    bad_input_case(
        Before::HelloAndPublish,
        &0u32.to_be_bytes(),
        ErrorCode::Malformed,
    )
    .await;
}

#[tokio::test]
async fn an_oversized_frame_is_rejected() {
    let mut bad = (protocol::FRAME_LEN_MAX_DEFAULT as u32 + 1)
        .to_be_bytes()
        .to_vec();
    bad.extend_from_slice(&[0u8; 1024]);
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::FrameTooLarge).await;
}

#[tokio::test]
async fn an_unknown_message_kind_is_rejected() {
    bad_input_case(
        Before::HelloAndPublish,
        &frame(0x42, &[0xa0]),
        ErrorCode::UnknownKind,
    )
    .await;
}

#[tokio::test]
async fn a_server_to_client_kind_from_a_client_is_rejected() {
    bad_input_case(
        Before::HelloAndPublish,
        &frame(kind::DELIVER, &[0xa0]),
        ErrorCode::UnexpectedKind,
    )
    .await;
}

#[tokio::test]
async fn a_wrong_protocol_version_is_rejected() {
    let mut h = hello(1, &[], SlowPolicy::Disconnect);
    h.version = 99;
    let bad = protocol::encode_client(&ClientFrame::Hello(h));
    bad_input_case(Before::Nothing, &bad, ErrorCode::UnsupportedVersion).await;
}

#[tokio::test]
async fn publish_before_handshake_is_rejected() {
    let bad = protocol::encode_client(&publish("ok.early", 1, b"x"));
    bad_input_case(Before::Nothing, &bad, ErrorCode::HandshakeRequired).await;
}

#[tokio::test]
async fn a_second_hello_is_rejected() {
    let bad = protocol::encode_client(&ClientFrame::Hello(hello(42, &[], SlowPolicy::Disconnect)));
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::DuplicateHello).await;
}

#[tokio::test]
async fn an_invalid_topic_is_rejected() {
    let bad = protocol::encode_client(&publish("ok..bad", 2, b"x"));
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::InvalidTopic).await;
}

#[tokio::test]
async fn a_topic_that_is_not_utf8_is_rejected() {
    // The frame decodes; the node checks the topic's text (once per
    // distinct topic) and refuses it.
    let mut bad = protocol::encode_client(&publish("ok.xx", 2, b"x")).to_vec();
    // Length prefix, kind, flags, pub_seq and topic_len come first.
    let topic_at = 4 + 1 + 1 + 8 + 2;
    assert_eq!(&bad[topic_at..topic_at + 5], b"ok.xx");
    bad[topic_at + 3] = 0xff;
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::InvalidTopic).await;
}

#[tokio::test]
async fn an_invalid_pattern_is_rejected() {
    let bad = protocol::encode_client(&ClientFrame::Subscribe(SubscribeHead {
        pattern: "ok.>.x".into(),
    }));
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::InvalidPattern).await;
}

#[tokio::test]
async fn an_invalid_pattern_in_hello_is_rejected() {
    let bad = protocol::encode_client(&ClientFrame::Hello(hello(
        1,
        &["a b"],
        SlowPolicy::Disconnect,
    )));
    bad_input_case(Before::Nothing, &bad, ErrorCode::InvalidPattern).await;
}

#[tokio::test]
async fn a_publish_for_another_publisher_from_a_client_is_rejected() {
    let mut forged = publish("ok.forged", 2, b"x");
    if let ClientFrame::Publish(p) = &mut forged {
        p.publisher = Some(PublisherId(77));
    }
    let bad = protocol::encode_client(&forged);
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::ForwardNotAllowed).await;
}

#[tokio::test]
async fn an_ask_for_another_publishers_call_from_a_client_is_rejected() {
    let bad = protocol::encode_client(&ClientFrame::Ask(AskHead {
        pub_seq: PubSeq(1),
        publisher: Some(PublisherId(77)),
    }));
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::ForwardNotAllowed).await;
}

#[tokio::test]
async fn skipped_publisher_sequence_numbers_are_rejected() {
    let bad = protocol::encode_client(&publish("ok.skip", 5, b"x"));
    bad_input_case(Before::HelloAndPublish, &bad, ErrorCode::PubSeqGap).await;
}

#[tokio::test]
async fn random_bytes_are_rejected() {
    // Deterministic noise: a 16-bit length that fits, then a non-kind byte.
    let noise: Vec<u8> = (0u32..64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut bad = (noise.len() as u32).to_be_bytes().to_vec();
    bad.extend_from_slice(&noise);
    let expected = match noise[0] {
        kind::HELLO..=kind::PONG => ErrorCode::Malformed,
        kind::WELCOME..=kind::ERROR => ErrorCode::UnexpectedKind,
        _ => ErrorCode::UnknownKind,
    };
    bad_input_case(Before::HelloAndPublish, &bad, expected).await;
}

#[tokio::test]
async fn a_connection_that_never_says_hello_is_closed() {
    let server = Server::with_config("[limits]\nhandshake_timeout_ms = 200\n");
    let mut raw = Raw::connect(&server.addr).await;
    let err = raw.expect_error_and_close().await;
    assert_eq!(err.code, ErrorCode::HandshakeTimeout);
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_the_rest_keep_working() {
    let server = Server::with_config("[limits]\nconnections_max = 2\n");
    let client = server.client().await;
    let mut sub = client.subscribe("ok.>").await.expect("subscribe");
    let mut second = Raw::connect(&server.addr).await;
    second.hello(5, &[], SlowPolicy::Disconnect).await;
    let mut third = Raw::connect(&server.addr).await;
    let err = third.expect_error_and_close().await;
    assert_eq!(err.code, ErrorCode::TooManyConnections);
    client.publish("ok.still", "x").await.expect("publish");
    assert_eq!(take_messages(&mut sub, 1).await[0].topic(), "ok.still");
}

/// A peer that goes silent (no frames, no pings) is closed, while a peer
/// that pings stays connected across many idle periods.
#[tokio::test]
async fn connections_over_the_per_address_limit_are_refused_until_one_closes() {
    let server = Server::with_config("[limits]\nconnections_per_address_max = 2\n");
    let mut first = Raw::connect(&server.addr).await;
    first.hello(1, &[], SlowPolicy::Disconnect).await;
    let mut second = Raw::connect(&server.addr).await;
    second.hello(2, &[], SlowPolicy::Disconnect).await;
    let mut third = Raw::connect(&server.addr).await;
    let e = third.expect_error_and_close().await;
    assert_eq!(e.code, ErrorCode::TooManyFromAddress, "{}", e.message);
    // The others keep working; one closes, and its place is free again.
    second
        .send(ClientFrame::Ping(protocol::PingHead { nonce: 1 }))
        .await;
    assert!(matches!(second.next().await, Some(ServerFrame::Pong(_))));
    drop(first);
    common::within("a place frees up", async {
        loop {
            let mut again = Raw::connect(&server.addr).await;
            again
                .send(ClientFrame::Hello(common::hello(
                    3,
                    &[],
                    SlowPolicy::Disconnect,
                )))
                .await;
            match again.next().await {
                Some(ServerFrame::Welcome(_)) => return,
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn silent_connections_are_closed_and_pinging_ones_stay() {
    use canopy_client::protocol::PingHead;
    let server =
        Server::with_config("[limits]\nidle_timeout_ms = 1000\nwatermark_interval_ms = 50\n");
    let mut pinging = Raw::connect(&server.addr).await;
    pinging.hello(8, &[], SlowPolicy::Disconnect).await;
    // Twenty-five pings 100 ms apart span two and a half idle periods,
    // with a tenfold margin between the ping gap and the idle time.
    let pings = tokio::spawn(async move {
        for nonce in 0..25 {
            pinging.send(ClientFrame::Ping(PingHead { nonce })).await;
            // Watermarks may come first: the other peer's attach moves the head.
            loop {
                match pinging.next().await {
                    Some(ServerFrame::Pong(p)) => break assert_eq!(p.nonce, nonce),
                    Some(ServerFrame::Watermark(_)) => {}
                    other => panic!("expected Pong {nonce}, got {other:?}"),
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let mut silent = Raw::connect(&server.addr).await;
    silent.hello(9, &[], SlowPolicy::Disconnect).await;
    let err = silent.expect_error_and_close().await;
    assert_eq!(err.code, ErrorCode::IdleTimeout);
    common::within("the pinging peer", pings)
        .await
        .expect("pinging peer stayed connected");
}
