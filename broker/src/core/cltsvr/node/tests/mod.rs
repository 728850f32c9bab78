//! Unit tests of the node state machine, driven directly (no I/O).

use super::*;
use canopy_client::protocol::{ClientFrame, Resume, ServerFrame};
use std::collections::VecDeque;

const T0: Duration = Duration::ZERO;

/// A node without ordered membership, so that seqs count only the
/// messages these tests publish (membership has tests of its own).
fn node() -> Node {
    Node::new(T0, config())
}

fn config() -> NodeConfig {
    NodeConfig {
        members_max: 0,
        ..NodeConfig::default()
    }
}

fn hello(publisher: u64, subs: &[&str], slow: SlowPolicy) -> ClientFrame {
    ClientFrame::Hello(Hello {
        version: protocol::PROTOCOL_VERSION,
        name: "t".into(),
        publisher: PublisherId(publisher),
        subscriptions: subs.iter().map(|s| (*s).to_owned()).collect(),
        resume: None,
        slow,
        role: protocol::Role::Client,
        reports: protocol::Reports::Servers,
        connection: 1,
        weak: false,
        auth: None,
        window: None,
    })
}

fn publish(topic: &str, pub_seq: u64) -> ClientFrame {
    ClientFrame::Publish(Publish::new(
        topic,
        PubSeq(pub_seq),
        Bytes::from(format!("{topic}#{pub_seq}")),
    ))
}

/// Opens a session and completes its handshake, discarding the Welcome.
fn join(n: &mut Node, id: u64, subs: &[&str], slow: SlowPolicy) -> SessionId {
    let s = SessionId(id);
    n.handle_open(T0, s);
    n.handle_frame(T0, s, hello(id, subs, slow));
    let out = drain(n);
    assert!(
        matches!(out.as_slice(), [(x, ServerFrame::Welcome(_))] if *x == s),
        "{out:?}"
    );
    s
}

/// Opens session `id` resuming `after` on `stream` with `subs`; the
/// outputs stay queued for the caller to drain.
fn resume(n: &mut Node, id: u64, subs: &[&str], stream: u64, after: Seq) -> SessionId {
    resume_with(n, id, subs, stream, after, None)
}

/// [`resume`] with a receive window of `window` messages.
fn resume_with_window(
    n: &mut Node,
    id: u64,
    subs: &[&str],
    stream: u64,
    after: Seq,
    window: u64,
) -> SessionId {
    resume_with(n, id, subs, stream, after, Some(window))
}

fn resume_with(
    n: &mut Node,
    id: u64,
    subs: &[&str],
    stream: u64,
    after: Seq,
    window: Option<u64>,
) -> SessionId {
    let s = SessionId(id);
    n.handle_open(T0, s);
    let mut h = hello(id, subs, SlowPolicy::Disconnect);
    if let ClientFrame::Hello(h) = &mut h {
        h.resume = Some(Resume {
            stream,
            after,
            check: None,
            agreed: None,
        });
        h.window = window;
    }
    n.handle_frame(T0, s, h);
    s
}

/// Drains outputs as decoded frames; a Close becomes its error frame.
fn drain(n: &mut Node) -> Vec<(SessionId, ServerFrame)> {
    let mut v = Vec::new();
    while let Some(o) = n.poll_output() {
        match o {
            Output::Transmit { session, frame, .. } => v.push((session, decode(frame))),
            Output::Close { session, frame, .. } => {
                v.push((session, decode(frame.expect("closes carry an error frame"))));
            }
        }
    }
    v
}

fn decode(frame: Bytes) -> ServerFrame {
    protocol::decode_server(frame.slice(4..)).expect("node output decodes")
}

fn seqs(frames: &[(SessionId, ServerFrame)], who: SessionId) -> Vec<u64> {
    let mut v = Vec::new();
    for (s, f) in frames {
        if *s == who {
            if let ServerFrame::Deliver(head, _) = f {
                v.extend(head.msgs.iter().map(|e| e.0 .0));
            }
        }
    }
    v
}

#[test]
fn publishes_are_ordered_fanned_out_in_one_frame_and_acknowledged() {
    let mut n = node();
    let sub = join(&mut n, 1, &["a.>"], SlowPolicy::Disconnect);
    let publ = join(&mut n, 2, &[], SlowPolicy::Disconnect);
    for i in 1..=3 {
        n.handle_frame(T0, publ, publish("a.x", i));
    }
    let out = drain(&mut n);
    let delivers: Vec<_> = out
        .iter()
        .filter(|(_, f)| matches!(f, ServerFrame::Deliver(..)))
        .collect();
    assert_eq!(delivers.len(), 1, "one batch, one frame");
    assert_eq!(seqs(&out, sub), vec![1, 2, 3]);
    let acks: Vec<_> = out
        .iter()
        .filter_map(|(s, f)| match f {
            ServerFrame::PubAck(a) => Some((*s, *a)),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        vec![(
            publ,
            PubAck {
                pub_seq: PubSeq(3),
                seq: Seq(3),
                publisher: None,
            }
        )]
    );
    assert_eq!(n.head(), Seq(3));
}

#[test]
fn overlapping_subscriptions_get_exactly_their_messages_in_order() {
    let mut n = node();
    let a = join(&mut n, 1, &["a.>", "a.x"], SlowPolicy::Disconnect);
    let b = join(&mut n, 2, &["a.x"], SlowPolicy::Disconnect);
    let c = join(&mut n, 3, &["b.>"], SlowPolicy::Disconnect);
    let d = join(&mut n, 4, &["a.*", "b.*"], SlowPolicy::Disconnect);
    let p = join(&mut n, 5, &[], SlowPolicy::Disconnect);
    for (i, t) in ["a.x", "b.y", "a.z", "b.y", "a.x"].iter().enumerate() {
        n.handle_frame(T0, p, publish(t, i as u64 + 1));
    }
    let out = drain(&mut n);
    assert_eq!(seqs(&out, a), vec![1, 3, 5]);
    assert_eq!(seqs(&out, b), vec![1, 5]);
    assert_eq!(seqs(&out, c), vec![2, 4]);
    assert_eq!(seqs(&out, d), vec![1, 2, 3, 4, 5]);
    assert_eq!(seqs(&out, p), Vec::<u64>::new());
}

#[test]
fn retries_are_acknowledged_but_ordered_once() {
    let mut n = node();
    let sub = join(&mut n, 1, &[">"], SlowPolicy::Disconnect);
    let p = join(&mut n, 2, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("x", 1));
    n.handle_frame(T0, p, publish("x", 2));
    n.handle_frame(T0, p, publish("x", 1));
    n.handle_frame(T0, p, publish("x", 2));
    n.handle_frame(T0, p, publish("x", 3));
    let out = drain(&mut n);
    assert_eq!(seqs(&out, sub), vec![1, 2, 3]);
    assert_eq!(n.stats().duplicates, 2);
}

/// Retries of what a session was told is ordered add nothing to the
/// cumulative acknowledgement: they get no copies of it (a client that
/// resends its whole window must not fill its own queue with them).
#[test]
fn copies_of_one_acknowledgement_are_not_sent_again() {
    let mut n = node();
    let p = join(&mut n, 2, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("x", 1));
    n.handle_frame(T0, p, publish("x", 2));
    let acks = |out: &[(SessionId, ServerFrame)]| -> Vec<u64> {
        out.iter()
            .filter_map(|(_, f)| match f {
                ServerFrame::PubAck(a) => Some(a.pub_seq.0),
                _ => None,
            })
            .collect()
    };
    assert_eq!(acks(&drain(&mut n)), [2]);
    for pub_seq in [1, 2, 1, 2] {
        n.handle_frame(T0, p, publish("x", pub_seq));
    }
    assert_eq!(acks(&drain(&mut n)), Vec::<u64>::new());
    n.handle_frame(T0, p, publish("x", 3));
    assert_eq!(acks(&drain(&mut n)), [3]);
}

#[test]
fn a_full_queue_cuts_a_strong_session_and_nothing_more_is_sent_to_it() {
    let mut n = node();
    let slow = join(&mut n, 1, &[">"], SlowPolicy::Disconnect);
    let fast = join(&mut n, 2, &[">"], SlowPolicy::Disconnect);
    let p = join(&mut n, 3, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("x", 1));
    let mut saw_close = false;
    let mut after_close = 0;
    while let Some(o) = n.poll_output() {
        match o {
            Output::Transmit {
                session,
                kind,
                seqs,
                ..
            } if session == slow => {
                assert!(!saw_close);
                n.handle_queue_full(T0, session, kind, seqs);
            }
            Output::Close {
                session,
                frame,
                drain,
            } => {
                assert_eq!(session, slow);
                assert!(!drain, "a slow consumer's backlog is not worth waiting for");
                let ServerFrame::Error(e) = decode(frame.expect("error frame")) else {
                    panic!()
                };
                assert_eq!(e.code, ErrorCode::SlowConsumer);
                saw_close = true;
            }
            Output::Transmit { session, .. } => {
                if saw_close {
                    assert_ne!(session, slow);
                    after_close += 1;
                }
            }
        }
    }
    assert!(saw_close);
    assert!(
        after_close > 0,
        "the fast session and the publisher still get their frames"
    );
    n.handle_frame(T0, p, publish("x", 2));
    let out = drain(&mut n);
    assert_eq!(seqs(&out, slow), Vec::<u64>::new());
    assert_eq!(seqs(&out, fast), vec![2]);
    assert_eq!(n.stats().slow_consumers, 1);
}

#[test]
fn a_conflating_session_hears_of_its_gap_before_any_later_message() {
    let mut n = node();
    let c = join(&mut n, 1, &[">"], SlowPolicy::Conflate);
    let p = join(&mut n, 2, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("x", 1));
    n.handle_frame(T0, p, publish("x", 2));
    // The first batch does not fit the queue.
    while let Some(o) = n.poll_output() {
        if let Output::Transmit {
            session,
            kind,
            seqs,
            ..
        } = o
        {
            if session == c {
                n.handle_queue_full(T0, session, kind, seqs);
            }
        }
    }
    n.handle_frame(T0, p, publish("x", 3));
    let out: Vec<ServerFrame> = drain(&mut n)
        .into_iter()
        .filter(|(s, _)| *s == c)
        .map(|(_, f)| f)
        .collect();
    assert_eq!(
        out,
        vec![ServerFrame::Gap(GapHead {
            from: Seq(1),
            to: Seq(3)
        })],
        "the batch after the overflow joins the gap; the notice replaces it"
    );
    n.handle_frame(T0, p, publish("x", 4));
    let out = drain(&mut n);
    assert_eq!(seqs(&out, c), vec![4], "deliveries resume after the gap");
}

#[test]
fn resume_replays_matching_retained_messages_after_a_gap_notice() {
    let mut n = Node::new(
        T0,
        NodeConfig {
            retention_count_max: 4,
            stream: 9,
            ..config()
        },
    );
    let p = join(&mut n, 1, &[], SlowPolicy::Disconnect);
    for i in 1..=8 {
        n.handle_frame(T0, p, publish(if i % 2 == 0 { "even" } else { "odd" }, i));
    }
    drain(&mut n);
    let r = resume(&mut n, 2, &["even"], 9, Seq(2));
    let out = drain(&mut n);
    assert!(matches!(out[0].1, ServerFrame::Welcome(_)));
    assert_eq!(
        out[1].1,
        ServerFrame::Gap(GapHead {
            from: Seq(3),
            to: Seq(4)
        })
    );
    assert_eq!(seqs(&out, r), vec![6, 8]);
}

#[test]
fn a_resume_from_another_stream_replays_nothing() {
    let mut n = node();
    let p = join(&mut n, 1, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("x", 1));
    drain(&mut n);
    let r = resume(&mut n, 2, &[">"], 12345, Seq(0));
    let out = drain(&mut n);
    assert!(
        matches!(&out[..], [(s, ServerFrame::Welcome(_))] if *s == r),
        "only the Welcome: {out:?}"
    );
}

/// Watermarks go out in session order, never in hash order: one input
/// gives the same outputs in every process (the simulators replay seeds
/// across processes by that).
#[test]
fn watermarks_go_out_in_session_order() {
    let mut n = node();
    let sessions: Vec<SessionId> = (1..=40)
        .map(|k| join(&mut n, k, &["nothing.here"], SlowPolicy::Disconnect))
        .collect();
    n.handle_frame(T0, sessions[0], publish("x", 1));
    drain(&mut n);
    let due = n.poll_timeout().expect("a watermark timer");
    n.handle_timeout(due);
    let order: Vec<SessionId> = drain(&mut n)
        .into_iter()
        .filter(|(_, f)| matches!(f, ServerFrame::Watermark(_)))
        .map(|(s, _)| s)
        .collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order.len(), sessions.len(), "{order:?}");
    assert_eq!(order, sorted);
}

#[test]
fn quiet_sessions_get_watermarks_when_the_head_moves() {
    let mut n = node();
    let quiet = join(&mut n, 1, &["nothing.here"], SlowPolicy::Disconnect);
    let p = join(&mut n, 2, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("x", 1));
    drain(&mut n);
    let due = n.poll_timeout().expect("a watermark timer");
    n.handle_timeout(due);
    let out = drain(&mut n);
    assert!(out.contains(&(quiet, ServerFrame::Watermark(WatermarkHead { seq: Seq(1) }))));
    let period = NodeConfig::default().watermark_interval;
    n.handle_timeout(due + period);
    assert!(
        drain(&mut n).is_empty(),
        "no watermark while the head stands still"
    );
    // One its queue had no room for goes out again at the next period: the
    // stream may stay quiet, and the client's position would stay behind
    // the head until it moved (node simulator, seed 155 of 10,000).
    n.handle_queue_full(due, quiet, TransmitKind::Watermark, (Seq(1), Seq(1)));
    n.handle_timeout(due + period * 2);
    assert!(drain(&mut n).contains(&(quiet, ServerFrame::Watermark(WatermarkHead { seq: Seq(1) }))));
}

/// Many sessions send a deterministic mix of valid and invalid frames; the
/// node never panics and every session's deliveries ascend.
#[test]
fn arbitrary_input_never_panics_and_deliveries_always_ascend() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Valid choices first; an index past VALID picks an invalid one, rarely.
    const VALID: usize = 4;
    let topics = ["a", "a.b", "a.b.c", "x.y", "", "a..b", "a.*", "a b"];
    let patterns = [">", "a.>", "a.*", "x.y", "*.*", "a.>.b", "", "**"];
    let choose = |pick: usize| {
        if pick.is_multiple_of(20) {
            VALID + pick / 20 % VALID
        } else {
            pick % VALID
        }
    };
    let mut pub_seqs: HashMap<SessionId, u64> = HashMap::new();
    let mut n = Node::new(
        T0,
        NodeConfig {
            retention_count_max: 16,
            ..config()
        },
    );
    let mut last_seen: HashMap<SessionId, Seq> = HashMap::new();
    let mut open: Vec<SessionId> = Vec::new();
    for step in 0..20_000u64 {
        let now = Duration::from_millis(step);
        let r = next();
        match r % 10 {
            0 => {
                let s = SessionId(step);
                n.handle_open(now, s);
                open.push(s);
            }
            1 if !open.is_empty() => {
                let s = open.swap_remove((r >> 8) as usize % open.len());
                n.handle_closed(now, s);
                last_seen.remove(&s);
            }
            _ if !open.is_empty() => {
                let s = open[(r >> 8) as usize % open.len()];
                let pick = (r >> 20) as usize;
                let frame = match (r >> 4) % 8 {
                    0 => {
                        let mut h = hello(s.0, &[patterns[choose(pick)]], SlowPolicy::Conflate);
                        if let ClientFrame::Hello(h) = &mut h {
                            h.resume = pick.is_multiple_of(3).then_some(Resume {
                                stream: 1,
                                after: Seq(pick as u64 % 40),
                                check: None,
                                agreed: None,
                            });
                        }
                        h
                    }
                    1 => ClientFrame::Subscribe(SubscribeHead {
                        pattern: patterns[choose(pick)].into(),
                    }),
                    2 => ClientFrame::Unsubscribe(SubscribeHead {
                        pattern: patterns[choose(pick)].into(),
                    }),
                    3 => ClientFrame::Ping(PingHead { nonce: 1 }),
                    _ => {
                        // Mostly the next pub_seq; sometimes a retry or a skip.
                        let counter = pub_seqs.entry(s).or_insert(0);
                        let pub_seq = match pick % 25 {
                            0 => counter.saturating_sub(1).max(1),
                            1 => *counter + 3,
                            _ => *counter + 1,
                        };
                        *counter = (*counter).max(pub_seq);
                        publish(topics[choose(pick)], pub_seq)
                    }
                };
                n.handle_frame(now, s, frame);
            }
            _ => n.handle_timeout(now),
        }
        while let Some(o) = n.poll_output() {
            match o {
                Output::Transmit {
                    session,
                    kind,
                    seqs,
                    ..
                } => {
                    if (r >> 40).is_multiple_of(97) {
                        n.handle_queue_full(now, session, kind, seqs);
                    } else if matches!(
                        kind,
                        TransmitKind::Deliver | TransmitKind::Gap | TransmitKind::Replay
                    ) {
                        let last = last_seen.entry(session).or_insert(Seq(0));
                        assert!(
                            seqs.0 > *last,
                            "session {session} got {seqs:?} after {last:?}"
                        );
                        *last = seqs.1;
                    }
                }
                Output::Close { session, .. } => {
                    open.retain(|s| *s != session);
                    last_seen.remove(&session);
                }
            }
        }
    }
    assert!(
        n.head().0 > 100,
        "the mix published something: {:?}",
        n.head()
    );
}

#[test]
fn acknowledgements_earned_before_a_bad_frame_go_out_before_the_close() {
    let mut n = node();
    let p = join(&mut n, 1, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("x", 1));
    n.handle_frame(
        T0,
        p,
        ClientFrame::Subscribe(SubscribeHead {
            pattern: "bad pattern".into(),
        }),
    );
    let mut kinds = Vec::new();
    while let Some(o) = n.poll_output() {
        match o {
            Output::Transmit { frame, .. } => kinds.push(decode(frame)),
            Output::Close { frame, drain, .. } => {
                assert!(drain);
                kinds.push(decode(frame.expect("error frame")));
            }
        }
    }
    assert!(
        matches!(
            kinds[0],
            ServerFrame::PubAck(PubAck {
                pub_seq: PubSeq(1),
                ..
            })
        ),
        "{kinds:?}"
    );
    assert!(matches!(&kinds[1], ServerFrame::Error(e) if e.code == ErrorCode::InvalidPattern));
    assert_eq!(kinds.len(), 2);
}

#[test]
fn a_session_that_never_says_hello_is_closed_after_the_handshake_time() {
    let mut n = node();
    let s = SessionId(1);
    n.handle_open(T0, s);
    let due = NodeConfig::default().handshake_timeout;
    n.handle_timeout(due - Duration::from_millis(1));
    assert!(drain(&mut n).is_empty(), "not before its time");
    assert!(n.poll_timeout().is_some_and(|t| t <= due));
    n.handle_timeout(due);
    let out = drain(&mut n);
    assert!(
        matches!(&out[..], [(x, ServerFrame::Error(e))] if *x == s && e.code == ErrorCode::HandshakeTimeout)
    );
    assert_eq!(n.session_count(), 0);
}

#[test]
fn forgetting_publishers_at_the_bound_keeps_the_most_recent() {
    let mut n = Node::new(
        T0,
        NodeConfig {
            publishers_max: 16,
            ..config()
        },
    );
    for id in 1..=40u64 {
        let s = join(&mut n, id, &[], SlowPolicy::Disconnect);
        n.handle_frame(T0, s, publish("x", 1));
        drain(&mut n);
    }
    assert!(n.publishers.len() <= 16);
    assert!(
        n.publishers.get(PublisherId(40)).is_some(),
        "the newest publisher is remembered"
    );
}

/// A client resuming far behind, whose queue holds only two frames, is fed
/// in paced catch-up frames instead of being cut off; it gets every missed
/// message once, in order, then the live stream, with nothing overtaking.
#[test]
fn a_catch_up_larger_than_the_queue_is_paced_not_cut_off() {
    let mut n = Node::new(
        T0,
        NodeConfig {
            frame_len_max: 4096, // a few messages per frame
            stream: 5,
            ..config()
        },
    );
    let p = join(&mut n, 1, &[], SlowPolicy::Disconnect);
    for i in 1..=200 {
        n.handle_frame(T0, p, publish("t", i));
    }
    drain(&mut n);
    let r = resume(&mut n, 2, &["t"], 5, Seq(0));
    let mut queue: VecDeque<ServerFrame> = VecDeque::new();
    let mut got: Vec<u64> = Vec::new();
    let mut now = T0;
    let mut next_pub = 201;
    for _round in 0..2000 {
        while let Some(o) = n.poll_output() {
            match o {
                Output::Transmit {
                    session,
                    frame,
                    kind,
                    seqs,
                } if session == r => {
                    if queue.len() >= 2 {
                        n.handle_queue_full(now, session, kind, seqs);
                    } else {
                        queue.push_back(decode(frame));
                    }
                }
                Output::Close { session, .. } => {
                    assert_ne!(session, r, "the resuming client was cut off")
                }
                _ => {}
            }
        }
        // The client reads one frame per round; the stream goes on.
        if let Some(ServerFrame::Deliver(head, _)) = queue.pop_front() {
            got.extend(head.msgs.iter().map(|e| e.0 .0));
        }
        if next_pub <= 260 {
            n.handle_frame(now, p, publish("t", next_pub));
            next_pub += 1;
        }
        now += Duration::from_millis(10);
        n.handle_timeout(now);
        if got.len() == 260 {
            break;
        }
    }
    assert_eq!(got, (1..=260).collect::<Vec<u64>>());
}

#[test]
fn a_catch_up_builds_a_turns_share_at_a_time() {
    let mut n = Node::new(
        T0,
        NodeConfig {
            frame_len_max: 64 << 10,
            stream: 5,
            ..config()
        },
    );
    let p = join(&mut n, 1, &[], SlowPolicy::Disconnect);
    let count = 300u64;
    for i in 1..=count {
        let payload = Bytes::from(vec![7u8; 4096]);
        n.handle_frame(
            T0,
            p,
            ClientFrame::Publish(Publish::new("t", PubSeq(i), payload)),
        );
    }
    drain(&mut n);
    let r = resume(&mut n, 2, &["t"], 5, Seq(0));
    let mut got: Vec<u64> = Vec::new();
    let mut now = T0;
    let mut turns = 0;
    while got.len() < count as usize && turns < 100 {
        let mut bytes = 0;
        let mut largest = 0;
        while let Some(o) = n.poll_output() {
            if let Output::Transmit { session, frame, .. } = o {
                if session != r {
                    continue;
                }
                bytes += frame.len();
                largest = largest.max(frame.len());
                if let ServerFrame::Deliver(head, _) = decode(frame) {
                    got.extend(head.msgs.iter().map(|e| e.0 .0));
                }
            }
        }
        assert!(
            bytes < CATCH_UP_TURN_BYTES + largest,
            "one turn built {bytes} bytes of catch-up"
        );
        turns += 1;
        if got.len() == count as usize {
            break;
        }
        // Nothing else happens: the node asks to go on a little later.
        let due = n.poll_timeout().expect("a timer");
        assert!(due <= now + CATCH_UP_TURN, "due at {due:?}, now {now:?}");
        now = due.max(now + Duration::from_micros(1));
        n.handle_timeout(now);
    }
    assert_eq!(got, (1..=count).collect::<Vec<u64>>());
    assert!(turns >= 4, "{turns} turns for 1.2 MB of catch-up");
}

mod grouped;

/// Opens session `id` with a receive window of `window` messages.
fn join_with_window(n: &mut Node, id: u64, subs: &[&str], window: u64) -> SessionId {
    let s = SessionId(id);
    n.handle_open(T0, s);
    let mut h = hello(id, subs, SlowPolicy::Disconnect);
    if let ClientFrame::Hello(h) = &mut h {
        h.window = Some(window);
    }
    n.handle_frame(T0, s, h);
    drain(n);
    s
}

fn credit(msgs: u64) -> ClientFrame {
    ClientFrame::Credit(protocol::CreditHead { msgs })
}

#[test]
fn a_session_is_sent_no_more_than_its_credit_and_caught_up_as_it_grants_more() {
    let mut n = node();
    let windowed = join_with_window(&mut n, 1, &["a.>"], 3);
    let other = join(&mut n, 2, &["a.>"], SlowPolicy::Disconnect);
    let p = join(&mut n, 3, &[], SlowPolicy::Disconnect);
    // One message a turn, each its own frame: credit 3 takes three.
    let mut sent = Vec::new();
    let mut others = Vec::new();
    for i in 1..=6 {
        n.handle_frame(T0, p, publish("a.x", i));
        let out = drain(&mut n);
        sent.extend(seqs(&out, windowed));
        others.extend(seqs(&out, other));
    }
    assert_eq!(sent, vec![1, 2, 3], "no further than the window");
    assert_eq!(
        others,
        (1..=6).collect::<Vec<_>>(),
        "the others are not held up"
    );
    // Two more granted: the next two, from retention, nothing past them.
    n.handle_frame(T0, windowed, credit(2));
    assert_eq!(seqs(&drain(&mut n), windowed), vec![4, 5]);
    n.handle_frame(T0, p, publish("a.x", 7));
    let out = drain(&mut n);
    assert_eq!(seqs(&out, windowed), Vec::<u64>::new());
    assert_eq!(seqs(&out, other), vec![7]);
    // Enough for everything: caught up, then live again.
    n.handle_frame(T0, windowed, credit(100));
    assert_eq!(seqs(&drain(&mut n), windowed), vec![6, 7]);
    n.handle_frame(T0, p, publish("a.x", 8));
    assert_eq!(seqs(&drain(&mut n), windowed), vec![8]);
    // A session without a window is not limited, and a Credit from it
    // changes nothing.
    n.handle_frame(T0, other, credit(1));
    n.handle_frame(T0, p, publish("a.x", 9));
    assert_eq!(seqs(&drain(&mut n), other), vec![9]);
    assert_eq!(n.stats().slow_consumers, 0);
}

#[test]
fn credit_charged_for_a_frame_its_queue_refused_is_given_back() {
    let mut n = Node::new(
        T0,
        NodeConfig {
            stream: 9,
            ..config()
        },
    );
    let p = join(&mut n, 1, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("a.x", 1));
    n.handle_frame(T0, p, publish("a.x", 2));
    drain(&mut n);
    // A resume with a window of two: its catch-up frame (both messages)
    // does not fit its queue at first.
    let r = resume_with_window(&mut n, 2, &["a.>"], 9, Seq(0), 2);
    let mut refused = false;
    let mut got = Vec::new();
    while let Some(o) = n.poll_output() {
        if let Output::Transmit {
            session,
            kind,
            seqs,
            frame,
        } = o
        {
            if session != r || kind != TransmitKind::Replay {
                continue;
            }
            if !refused {
                refused = true;
                n.handle_queue_full(T0, session, kind, seqs);
                continue;
            }
            if let ServerFrame::Deliver(head, _) = decode(frame) {
                got.extend(head.msgs.iter().map(|e| e.0 .0));
            }
        }
    }
    assert!(refused);
    // The retry resends what was refused: the credit it was charged came
    // back, so both messages still fit the window of two.
    n.handle_timeout(T0 + Duration::from_secs(1));
    got.extend(seqs(&drain(&mut n), r));
    assert_eq!(got, vec![1, 2]);
}

#[test]
fn a_subscription_answer_queued_behind_a_paused_delivery_waits_for_the_catch_up() {
    let mut n = node();
    let w = join_with_window(&mut n, 1, &["a.>"], 1);
    let p = join(&mut n, 2, &[], SlowPolicy::Disconnect);
    n.handle_frame(T0, p, publish("a.x", 1));
    assert_eq!(seqs(&drain(&mut n), w), vec![1], "its window of one");
    // In one turn: a publish, then a subscription change, whose answer
    // (at the head, 2) is queued behind the delivery of 2, which the
    // session has no credit for.
    n.handle_frame(T0, p, publish("a.x", 2));
    n.handle_frame(
        T0,
        w,
        ClientFrame::Subscribe(SubscribeHead {
            pattern: "b.>".into(),
        }),
    );
    // (An answer at 2 would move the client past 2 before it has it.)
    let out = held_until_caught_up(
        &mut n,
        w,
        |f| matches!(f, ServerFrame::Subscribed(h) if h.head == Seq(2)),
    );
    assert_eq!(seqs(&out, w), vec![2]);
}

/// What was queued for `w` behind a delivery it had no credit for (the
/// frames `held` picks) is not sent while it is paused, and follows the
/// catch-up's delivery once it grants more. Returns `w`'s frames then.
fn held_until_caught_up(
    n: &mut Node,
    w: SessionId,
    held: impl Fn(&ServerFrame) -> bool,
) -> Vec<(SessionId, ServerFrame)> {
    let out = drain(n);
    assert!(
        !out.iter().any(|(s, f)| *s == w && held(f)),
        "sent while paused, ahead of what it follows: {out:?}"
    );
    n.handle_frame(T0, w, credit(10));
    let out: Vec<_> = drain(n).into_iter().filter(|(s, _)| *s == w).collect();
    let delivered = out
        .iter()
        .position(|(_, f)| matches!(f, ServerFrame::Deliver(..)))
        .expect("the catch-up delivers");
    let after = out
        .iter()
        .position(|(_, f)| held(f))
        .expect("then what was held");
    assert!(delivered < after, "{out:?}");
    out
}

#[test]
fn a_membership_report_queued_behind_a_paused_delivery_waits_for_the_catch_up() {
    // Membership on: attaches are ordered in the stream.
    let mut n = Node::new(T0, NodeConfig::default());
    let w = SessionId(1);
    n.handle_open(T0, w);
    let mut h = hello(1, &["a.>"], SlowPolicy::Disconnect);
    if let ClientFrame::Hello(h) = &mut h {
        h.window = Some(1);
        h.reports = protocol::Reports::Full;
    }
    n.handle_frame(T0, w, h);
    drain(&mut n);
    let p = SessionId(2);
    n.handle_open(T0, p);
    n.handle_frame(T0, p, hello(2, &[], SlowPolicy::Disconnect));
    drain(&mut n);
    n.handle_frame(T0, p, publish("a.x", 1));
    assert_eq!(seqs(&drain(&mut n), w).len(), 1, "its window of one");
    // In one turn: a publish, then an attach, whose report is queued
    // behind the delivery the session has no credit for.
    n.handle_frame(T0, p, publish("a.x", 2));
    n.handle_open(T0, SessionId(3));
    n.handle_frame(T0, SessionId(3), hello(3, &[], SlowPolicy::Disconnect));
    // (A report would overtake the message before it.)
    let out = held_until_caught_up(&mut n, w, |f| matches!(f, ServerFrame::Members(_)));
    assert!(
        out.iter()
            .any(|(_, f)| matches!(f, ServerFrame::Members(m) if m.complete)),
        "a complete report follows the catch-up: {out:?}"
    );
}
