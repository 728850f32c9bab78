//! A server's sans-IO core fed one connection's frames, as the shell hands
//! them over (each decoded first; what does not decode closes the
//! session): the node never panics, whatever a client sends, and time
//! moves on between frames.
#![no_main]

use canopy_broker::core::{Node, NodeConfig, SessionId};
use canopy_client::protocol::decode_client;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let config = NodeConfig {
        subscriptions_per_session_max: 8,
        retention_count_max: 64,
        ..NodeConfig::default()
    };
    let mut node = Node::new(Duration::ZERO, config);
    let (a, b) = (SessionId(1), SessionId(2));
    node.handle_open(Duration::ZERO, a);
    node.handle_open(Duration::ZERO, b);
    let mut now = Duration::ZERO;
    let mut rest = data;
    // Frames as [session bit | length (u16 BE)] then the content.
    while rest.len() >= 3 {
        let who = if rest[0] & 1 == 0 { a } else { b };
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let (content, tail) = rest[3..].split_at(len);
        rest = tail;
        now += Duration::from_millis(u64::from(rest.first().copied().unwrap_or(0)));
        match decode_client(bytes::Bytes::copy_from_slice(content)) {
            Ok(frame) => node.handle_frame(now, who, frame),
            Err(e) => node.handle_bad_input(now, who, e.code(), e.to_string()),
        }
        node.handle_timeout(now);
        while node.poll_output().is_some() {}
    }
});
