//! Unit tests of the relay's upstream state machine.

use super::*;
use canopy_client::protocol::{ClientFrame, DeliverBuilder, GapHead, Welcome};

const MS: Duration = Duration::from_millis(1);

fn upstream() -> Upstream {
    let servers = vec!["a:1".to_owned(), "b:1".to_owned()];
    Upstream::new(
        Duration::ZERO,
        UpstreamConfig::new("r".into(), PublisherId(9), servers),
    )
}

fn welcome(stream: u64, head: u64) -> ServerFrame {
    ServerFrame::Welcome(Welcome {
        version: protocol::PROTOCOL_VERSION,
        server: "s".into(),
        session: 1,
        stream,
        head: Seq(head),
        pub_acked: PubSeq(0),
        frame_len_max: 1 << 20,
        servers: vec![],
        hash: 0,
        permissions: None,
    })
}

/// A delivery of stable messages.
fn deliver(seqs: &[(u64, u64, u64)]) -> ServerFrame {
    let last = seqs.last().map_or(0, |m| m.0);
    held(seqs, last)
}

/// A delivery of messages held above, stable through `stable`.
fn held(seqs: &[(u64, u64, u64)], stable: u64) -> ServerFrame {
    let mut b = DeliverBuilder::default();
    for &(seq, p, ps) in seqs {
        b.push(Seq(seq), PublisherId(p), PubSeq(ps), "t", b"x");
    }
    match protocol::decode_server(b.finish_with(None, Some(Seq(stable))).slice(4..)) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    }
}

fn actions(u: &mut Upstream) -> Vec<Action> {
    std::iter::from_fn(|| u.poll_action()).collect()
}

fn events(u: &mut Upstream) -> Vec<UpEvent> {
    std::iter::from_fn(|| u.poll_event()).collect()
}

fn connect(u: &mut Upstream, now: Duration, stream: u64, head: u64) -> String {
    u.handle_timeout(now);
    let addr = match actions(u).first() {
        Some(Action::Connect(a)) => a.clone(),
        other => panic!("expected a connect, got {other:?}"),
    };
    u.handle_connected(now);
    u.handle_frame(now, welcome(stream, head));
    addr
}

fn report(seq: u64) -> ServerFrame {
    ServerFrame::Members(canopy_client::protocol::MembersHead {
        seq: Seq(seq),
        complete: true,
        ..Default::default()
    })
}

fn msg(p: u64, ps: u64) -> Msg {
    Msg(PublisherId(p), PubSeq(ps), Arc::from("t"), Bytes::new())
}

#[test]
fn first_welcome_resets_to_the_head_and_deliveries_continue_it() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 10);
    assert!(u.is_synced());
    let ev = events(&mut u);
    assert!(
        matches!(&ev[..], [UpEvent::Reset(s), UpEvent::Reattach] if s.head == Seq(10) && s.stream == 7),
        "{ev:?}"
    );
    // A report for another position cannot start the membership: the
    // relay starts over on a fresh connection.
    u.handle_frame(MS, report(9));
    assert!(events(&mut u).is_empty());
    assert!(actions(&mut u).contains(&Action::Disconnect));
    connect(&mut u, MS, 7, 10);
    assert!(matches!(
        &events(&mut u)[..],
        [UpEvent::Reset(_), UpEvent::Reattach]
    ));
    // The membership report for the head, and then it serves.
    u.handle_frame(MS, report(10));
    let ev = events(&mut u);
    assert!(
        matches!(&ev[..], [UpEvent::Members(_), UpEvent::Serving(true)]),
        "{ev:?}"
    );
    u.handle_frame(MS, deliver(&[(10, 1, 1), (11, 1, 2), (12, 1, 3)]));
    let ev = events(&mut u);
    let [UpEvent::Held(batch), UpEvent::Stable(Seq(12))] = &ev[..] else {
        panic!("{ev:?}")
    };
    let seqs: Vec<u64> = batch.iter().map(|m| m.seq.0).collect();
    assert_eq!(
        seqs,
        [11, 12],
        "what the head covers is not delivered twice"
    );
}

#[test]
fn a_hole_without_a_gap_notice_drops_the_link_and_resumes_at_the_head() {
    let mut u = upstream();
    let first = connect(&mut u, Duration::ZERO, 7, 0);
    events(&mut u);
    actions(&mut u);
    u.handle_frame(MS, deliver(&[(1, 1, 1), (3, 1, 3)]));
    assert!(actions(&mut u).contains(&Action::Disconnect));
    let ev = events(&mut u);
    assert!(
        matches!(&ev[..], [UpEvent::Held(b)] if b.len() == 1),
        "what precedes the hole is delivered, nothing past it: {ev:?}"
    );
    // The adopter is tried first, at once, and the Hello resumes after 1.
    u.handle_timeout(MS);
    let next = match actions(&mut u).first() {
        Some(Action::Connect(a)) => a.clone(),
        other => panic!("{other:?}"),
    };
    assert_ne!(next, first, "the lost server is tried last");
    u.handle_connected(MS);
    let Some(Action::Send(hello)) = u.poll_action() else {
        panic!("no hello")
    };
    let Ok(ClientFrame::Hello(h)) = protocol::decode_client(hello.slice(4..)) else {
        panic!("not a hello")
    };
    assert_eq!(h.resume.map(|r| (r.stream, r.after)), Some((7, Seq(1))));
    assert_eq!(h.role, Role::Relay);
}

#[test]
fn forwards_are_resent_on_reconnect_until_the_stream_shows_them() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    actions(&mut u);
    u.submit(vec![msg(1, 1), msg(1, 2), msg(2, 1)]);
    assert_eq!(actions(&mut u).len(), 3);
    u.handle_frame(MS, deliver(&[(1, 1, 1)]));
    u.handle_closed(MS);
    connect(&mut u, MS, 7, 1);
    let sent: Vec<(PublisherId, PubSeq)> = actions(&mut u)
        .into_iter()
        .filter_map(|a| match a {
            Action::Send(f) => match protocol::decode_client(f.slice(4..)) {
                Ok(ClientFrame::Publish(p)) => Some((p.publisher?, p.pub_seq)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let mut sent = sent;
    sent.sort();
    assert_eq!(
        sent,
        [(PublisherId(1), PubSeq(2)), (PublisherId(2), PubSeq(1))]
    );
}

/// The relay's own publishes (its membership events, publisher 9) that a
/// gap took it past are released by what the tier above says of them: a
/// `PubAck` naming no publisher, or a Welcome's `pub_acked` on the same
/// stream. Before, they were held for good and filled the relay's bound
/// of forwards (tree simulator, seed 3151, once clients restarted).
#[test]
fn the_relays_own_publishes_are_released_by_its_acknowledgements() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    u.submit(vec![msg(9, 1), msg(9, 2), msg(9, 3), msg(1, 1)]);
    assert_eq!(u.forwards_held(), 4);
    let ack = |pub_seq| {
        ServerFrame::PubAck(protocol::PubAck {
            pub_seq: PubSeq(pub_seq),
            seq: Seq(0),
            publisher: None,
        })
    };
    u.handle_frame(MS, ack(1));
    assert_eq!(u.forwards_held(), 3);
    u.handle_closed(MS);
    u.handle_timeout(MS);
    actions(&mut u);
    u.handle_connected(MS);
    let ServerFrame::Welcome(mut w) = welcome(7, 0) else {
        unreachable!("welcome() makes a Welcome")
    };
    w.pub_acked = PubSeq(3);
    u.handle_frame(MS, ServerFrame::Welcome(w));
    assert_eq!(u.forwards_held(), 1, "publisher 1's forward is still held");
    // A Welcome of another stream says nothing of this one's publishes.
    u.submit(vec![msg(9, 4)]);
    u.handle_closed(MS);
    u.handle_timeout(2 * MS);
    actions(&mut u);
    u.handle_connected(2 * MS);
    let ServerFrame::Welcome(mut w) = welcome(8, 0) else {
        unreachable!("welcome() makes a Welcome")
    };
    w.pub_acked = PubSeq(4);
    u.handle_frame(2 * MS, ServerFrame::Welcome(w));
    assert_eq!(u.forwards_held(), 2);
}

#[test]
fn held_messages_become_stable_by_mark_and_only_then_release_forwards() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    u.handle_frame(MS, report(0));
    events(&mut u);
    actions(&mut u);
    u.submit(vec![msg(1, 1), msg(1, 2)]);
    actions(&mut u);
    u.handle_frame(MS, held(&[(1, 1, 1), (2, 1, 2)], 0));
    assert!(matches!(&events(&mut u)[..], [UpEvent::Held(b)] if b.len() == 2));
    u.handle_frame(
        MS,
        ServerFrame::Watermark(protocol::WatermarkHead { seq: Seq(1) }),
    );
    assert!(matches!(&events(&mut u)[..], [UpEvent::Stable(Seq(1))]));
    // Pub_seq 2 is held, not stable: a new connection sends it again.
    u.handle_closed(MS);
    connect(&mut u, MS, 7, 1);
    let resent = actions(&mut u)
        .into_iter()
        .filter(|a| matches!(a, Action::Send(f) if matches!(protocol::decode_client(f.slice(4..)), Ok(ClientFrame::Publish(_)))))
        .count();
    assert_eq!(resent, 1);
}

#[test]
fn a_divergence_takes_back_what_was_held_and_the_agreed_stream_follows() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    u.handle_frame(MS, report(0));
    events(&mut u);
    u.handle_frame(MS, held(&[(1, 1, 1), (2, 1, 2), (3, 1, 3)], 1));
    events(&mut u);
    let d = protocol::DivergedHead {
        from: Seq(2),
        seen: Seq(3),
    };
    u.handle_frame(MS, ServerFrame::Diverged(d));
    let ev = events(&mut u);
    assert!(
        matches!(&ev[..], [UpEvent::Unheld { after: Seq(1) }]),
        "{ev:?}"
    );
    u.handle_frame(MS, held(&[(2, 2, 1)], 2));
    let ev = events(&mut u);
    assert!(
        matches!(&ev[..], [UpEvent::Held(b), UpEvent::Stable(Seq(2))] if b[0].publisher == PublisherId(2)),
        "{ev:?}"
    );
    // Taking back what is stable is not the same stream: start over.
    let d = protocol::DivergedHead {
        from: Seq(2),
        seen: Seq(2),
    };
    u.handle_frame(MS, ServerFrame::Diverged(d));
    assert!(actions(&mut u).contains(&Action::Disconnect));
}

#[test]
fn a_report_ahead_of_the_stable_position_waits_for_it() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    events(&mut u);
    u.handle_frame(MS, held(&[(1, 1, 1), (2, 1, 2)], 0));
    u.handle_frame(MS, report(1));
    let ev = events(&mut u);
    assert!(matches!(&ev[..], [UpEvent::Held(_)]), "{ev:?}");
    u.handle_frame(
        MS,
        ServerFrame::Watermark(protocol::WatermarkHead { seq: Seq(2) }),
    );
    let ev = events(&mut u);
    assert!(
        matches!(
            &ev[..],
            [UpEvent::Stable(Seq(1)), UpEvent::Members(m), UpEvent::Serving(true), UpEvent::Stable(Seq(2))] if m.seq == Seq(1)
        ),
        "{ev:?}"
    );
}

#[test]
fn frames_queued_for_a_lost_connection_are_dropped_and_forwards_go_again() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    actions(&mut u);
    u.submit(vec![msg(1, 1), msg(1, 2)]);
    // The shell could not take them (its queue was full): the link ends.
    u.handle_closed(MS);
    let left = actions(&mut u);
    assert!(
        left.iter().all(|a| !matches!(a, Action::Send(_))),
        "{left:?}"
    );
    connect(&mut u, MS, 7, 0);
    let sent = actions(&mut u)
        .iter()
        .filter(|a| matches!(a, Action::Send(_)))
        .count();
    assert_eq!(sent, 3, "the Hello and both forwards, once each");
}

#[test]
fn a_gap_notice_resets_the_stream_past_it() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    events(&mut u);
    let gap = GapHead {
        from: Seq(1),
        to: Seq(50),
    };
    u.handle_frame(MS, ServerFrame::Gap(gap));
    // It starts over on a new connection, at the head there.
    assert!(actions(&mut u).contains(&Action::Disconnect));
    connect(&mut u, MS, 7, 60);
    let ev = events(&mut u);
    assert!(matches!(&ev[..], [UpEvent::Reset(s), UpEvent::Reattach] if s.head == Seq(60)));
    u.handle_frame(MS, deliver(&[(61, 1, 1)]));
    assert!(
        matches!(&events(&mut u)[..], [UpEvent::Held(b), UpEvent::Stable(_)] if b[0].seq == Seq(61))
    );
}

#[test]
fn a_relay_without_its_stream_for_the_silence_time_stops_serving() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    u.handle_frame(MS, report(0));
    events(&mut u);
    actions(&mut u);
    u.handle_closed(MS);
    let mut now = MS;
    // Every server refuses: the relay keeps trying, and stops serving.
    for _ in 0..100 {
        now = u.poll_timeout().unwrap_or(now).max(now);
        u.handle_timeout(now);
        if let Some(Action::Connect(_)) = u.poll_action() {
            u.handle_closed(now);
        }
        if events(&mut u)
            .iter()
            .any(|e| matches!(e, UpEvent::Serving(false)))
        {
            assert!(now >= Duration::from_secs(3), "not before the silence time");
            return;
        }
    }
    panic!("the relay went on serving without its stream");
}

#[test]
fn a_silent_tier_above_is_dropped() {
    let mut u = upstream();
    connect(&mut u, Duration::ZERO, 7, 0);
    actions(&mut u);
    let mut now = Duration::ZERO;
    for _ in 0..10 {
        now = u.poll_timeout().unwrap_or(now);
        u.handle_timeout(now);
        if actions(&mut u).contains(&Action::Disconnect) {
            assert!(now >= Duration::from_secs(3));
            return;
        }
    }
    panic!("the link was never dropped");
}
