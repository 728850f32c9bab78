use super::*;
use crate::protocol::{
    DeliverBuilder, DivergedHead, ErrorCode, ErrorFrame, PublisherId, Reports, Role, ServersHead,
    SlowPolicy, StreamCheck, SubscribedHead, WatermarkHead,
};

const MS: Duration = Duration::from_millis(1);

fn config(servers: &[&str]) -> LinkConfig {
    LinkConfig {
        name: "test".into(),
        publisher: PublisherId(7),
        servers: servers.iter().map(|s| s.to_string()).collect(),
        role: Role::Client,
        reports: Reports::Servers,
        slow: SlowPolicy::Disconnect,
        weak: false,
        ping_interval: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        reconnect_for: Some(Duration::from_secs(10)),
        first_order: FirstOrder::Configured,
        credentials: None,
        receive_window: None,
    }
}

fn welcome(stream: u64, head: u64, pub_acked: u64) -> ServerFrame {
    ServerFrame::Welcome(Welcome {
        version: protocol::PROTOCOL_VERSION,
        server: "s".into(),
        session: 1,
        stream,
        head: Seq(head),
        pub_acked: PubSeq(pub_acked),
        frame_len_max: 1 << 20,
        servers: Vec::new(),
        hash: head.wrapping_mul(100),
        permissions: None,
    })
}

/// Frames a shell would decode from the core's sends.
fn sent(core: &mut ClientCore) -> Vec<ClientFrame> {
    let mut out = Vec::new();
    while let Some(a) = core.poll_action() {
        if let Action::Send(frame) = a {
            let frame =
                protocol::decode_client(frame.slice(4..)).expect("the core's frames decode");
            out.push(frame);
        }
    }
    out
}

fn connects(core: &mut ClientCore) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(a) = core.poll_action() {
        if let Action::Connect(addr) = a {
            out.push(addr);
        }
    }
    out
}

fn events(core: &mut ClientCore) -> Vec<Event> {
    std::iter::from_fn(|| core.poll_event()).collect()
}

/// A core serving on the first of `servers`, at time 0.
fn serving(servers: &[&str], weak: bool) -> ClientCore {
    let mut c = config(servers);
    c.weak = weak;
    let mut core = ClientCore::new(Duration::ZERO, c);
    core.subscribe(">");
    core.handle_timeout(Duration::ZERO);
    assert_eq!(connects(&mut core), vec![servers[0].to_string()]);
    core.handle_connected(Duration::ZERO);
    assert!(core
        .handle_frame(Duration::ZERO, welcome(1, 10, 0))
        .is_none());
    sent(&mut core);
    events(&mut core);
    core
}

/// Lets the core's timer run to its next attempt, and opens it.
fn reconnect(core: &mut ClientCore) -> Duration {
    let at = core.poll_timeout().expect("a timer");
    core.handle_timeout(at);
    assert_eq!(connects(core).len(), 1);
    core.handle_connected(at);
    at
}

fn deliver(seqs: std::ops::RangeInclusive<u64>, hash: Option<u64>) -> ServerFrame {
    let mut b = DeliverBuilder::default();
    for s in seqs {
        b.push(Seq(s), PublisherId(1), PubSeq(s), "t", b"x");
    }
    let frame = b.finish_with(hash, None);
    protocol::decode_server(frame.slice(4..)).expect("decodes")
}

#[test]
fn rounds_go_in_order_then_pause_doubling_then_give_up() {
    let mut core = ClientCore::new(Duration::ZERO, config(&["a", "b"]));
    let mut now = Duration::ZERO;
    let mut pauses = Vec::new();
    while let Some(at) = core.poll_timeout() {
        if at > now {
            pauses.push(at - now);
        }
        now = at;
        core.handle_timeout(now);
        for addr in connects(&mut core) {
            assert!(addr == "a" || addr == "b");
            core.handle_closed(now);
        }
    }
    // Rounds of two attempts with no pause inside, pauses of 20, 40, ... 1000 ms.
    assert_eq!(pauses[..4], [20 * MS, 40 * MS, 80 * MS, 160 * MS]);
    assert!(pauses.iter().all(|&p| p <= BACKOFF_MAX));
    assert!(now >= Duration::from_secs(10) && now < Duration::from_secs(12));
    let ev = events(&mut core);
    assert!(matches!(
        ev.last(),
        Some(Event::Link(LinkEvent::Unreachable(
            Error::Unreachable { .. }
        )))
    ));
    assert!(core.link().is_stopped());
}

#[test]
fn a_lost_connection_goes_to_the_adopter_at_once_with_the_lost_server_last() {
    let servers = ["a", "b", "c", "d"];
    let mut core = serving(&servers, false);
    let now = Duration::from_secs(1);
    core.handle_closed(now);
    assert_eq!(core.poll_timeout(), Some(now));
    let expected = protocol::failover_order(7, &servers.map(String::from), "a");
    let mut tried = Vec::new();
    for _ in 0..4 {
        core.handle_timeout(now);
        tried.extend(connects(&mut core));
        core.handle_closed(now);
    }
    assert_eq!(tried, expected);
    assert_eq!(tried.last().map(String::as_str), Some("a"));
}

#[test]
fn a_silent_server_is_dropped_after_three_ping_periods() {
    let mut core = serving(&["a", "b"], false);
    let mut pings = 0;
    let mut now = Duration::ZERO;
    while core.link().is_up() {
        now = core.poll_timeout().expect("a timer");
        core.handle_timeout(now);
        pings += sent(&mut core)
            .iter()
            .filter(|f| matches!(f, ClientFrame::Ping(_)))
            .count();
    }
    assert_eq!(now, Duration::from_secs(3));
    assert_eq!(pings, 2, "a ping each period before the deadline");
    assert!(matches!(
        events(&mut core)[..],
        [Event::Link(LinkEvent::Lost { .. })]
    ));
    // Any frame counts as heard.
    let mut core = serving(&["a"], false);
    core.handle_frame(
        Duration::from_secs(2),
        ServerFrame::Pong(protocol::PingHead { nonce: 1 }),
    );
    core.handle_timeout(Duration::from_secs(3));
    assert!(core.link().is_up());
}

#[test]
fn unacknowledged_publishes_go_again_in_order_after_the_welcome() {
    let mut core = serving(&["a", "b"], false);
    for _ in 0..3 {
        core.publish("t", b"p");
    }
    assert_eq!(sent(&mut core).len(), 3);
    core.handle_frame(
        MS,
        ServerFrame::PubAck(PubAck {
            pub_seq: PubSeq(1),
            seq: Seq(11),
            publisher: None,
        }),
    );
    assert!(matches!(events(&mut core)[..], [Event::Acked(PubSeq(1))]));
    core.handle_closed(MS);
    // Published while down: sent after the Welcome only.
    core.publish("t", b"p");
    let now = reconnect(&mut core);
    let hello = sent(&mut core);
    let [ClientFrame::Hello(h)] = &hello[..] else {
        panic!("a Hello: {hello:?}")
    };
    assert_eq!(h.connection, 2);
    let resume = h.resume.expect("resumes");
    assert_eq!((resume.stream, resume.after), (1, Seq(10)));
    assert_eq!(
        resume.check,
        Some(StreamCheck {
            seq: Seq(10),
            hash: 1000
        })
    );
    // The server had ordered pub_seq 2 already.
    core.handle_frame(now, welcome(1, 12, 2));
    let resent: Vec<PubSeq> = sent(&mut core)
        .into_iter()
        .filter_map(|f| match f {
            ClientFrame::Publish(p) => Some(p.pub_seq),
            _ => None,
        })
        .collect();
    assert_eq!(resent, [PubSeq(3), PubSeq(4)]);
    assert_eq!(core.unacked_len(), 2);
}

/// A program that begins an incarnation (as the SDK does for a fixed
/// publisher id) starts at that incarnation, or past what its first Welcome
/// shows the id has ordered when that is later: its predecessors'
/// publishes still on their way would otherwise take its first pub_seqs
/// (docs/DESIGN.md, "Identity and resume"). Once it has published, a later
/// Welcome only moves it past what the server ordered.
#[test]
fn a_program_that_begins_an_incarnation_starts_past_its_predecessors() {
    let i = 1u64 << 32;
    let welcomed = |epoch: u64, pub_acked: u64| {
        let mut core = ClientCore::new(Duration::ZERO, config(&["a"]));
        core.begin_incarnation(epoch);
        core.handle_timeout(Duration::ZERO);
        connects(&mut core);
        core.handle_connected(Duration::ZERO);
        core.handle_frame(Duration::ZERO, welcome(1, 0, pub_acked));
        let first = core.publish("t", b"p");
        (core, first)
    };
    // The server knows nothing of the id (a relay that never saw it): the
    // incarnation asked for.
    assert_eq!(welcomed(5, 0).1, PubSeq(5 * i));
    assert_eq!(welcomed(5, 41).1, PubSeq(5 * i));
    // It knows a later one (the clock went back): past it.
    assert_eq!(welcomed(5, 7 * i + 3).1, PubSeq(8 * i));
    let (mut core, first) = welcomed(1, 41);
    assert_eq!(first, PubSeq(i));
    core.drop_connection(MS, "gone");
    core.handle_timeout(MS);
    connects(&mut core);
    core.handle_connected(MS);
    core.handle_frame(MS, welcome(1, 0, i + 5));
    assert_eq!(core.publish("t", b"p"), PubSeq(i + 6));
}

/// Without an incarnation (a new random id, or a program that places its
/// own start), a program numbers on after what the Welcome shows.
#[test]
fn without_an_incarnation_a_program_continues_after_the_welcome() {
    let welcomed = |pub_acked: u64, setup: &dyn Fn(&mut ClientCore)| {
        let mut core = ClientCore::new(Duration::ZERO, config(&["a"]));
        setup(&mut core);
        core.handle_timeout(Duration::ZERO);
        connects(&mut core);
        core.handle_connected(Duration::ZERO);
        core.handle_frame(Duration::ZERO, welcome(1, 0, pub_acked));
        core.publish("t", b"p")
    };
    assert_eq!(welcomed(0, &|_| {}), PubSeq(1));
    assert_eq!(welcomed(41, &|_| {}), PubSeq(42));
    assert_eq!(welcomed(41, &|c| c.start_pub_seq_at(7)), PubSeq(42));
    assert_eq!(welcomed(41, &|c| c.start_pub_seq_at(50)), PubSeq(50));
}

#[test]
fn a_delivery_moves_the_position_only_when_taken() {
    let mut core = serving(&["a", "b"], false);
    let d = core
        .handle_frame(MS, deliver(9..=12, Some(5)))
        .expect("new messages");
    let seqs: Vec<u64> = d.messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, [11, 12], "what was handed over before is skipped");
    // Not taken: the next connection resumes from 10.
    drop(d.messages);
    core.drop_connection(MS, "the application is behind");
    assert_eq!(core.position().at(), Some((1, Seq(10))));
    let d = core.handle_frame(MS, deliver(11..=12, Some(5)));
    assert!(d.is_none(), "nothing is taken on a dropped connection");
    let now = reconnect(&mut core);
    core.handle_frame(now, welcome(1, 12, 0));
    let d = core
        .handle_frame(now, deliver(11..=12, Some(5)))
        .expect("delivered");
    core.take(d.commit);
    assert_eq!(core.position().at(), Some((1, Seq(12))));
    assert_eq!(
        core.position().resume().and_then(|r| r.check),
        Some(StreamCheck {
            seq: Seq(12),
            hash: 5
        })
    );
}

#[test]
fn another_stream_resets_the_position() {
    let mut core = serving(&["a"], false);
    core.handle_closed(MS);
    let now = reconnect(&mut core);
    core.handle_frame(now, welcome(2, 3, 0));
    let ev = events(&mut core);
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Welcomed {
            joined: Joined::Reset,
            ..
        }
    )));
    assert_eq!(core.position().at(), Some((2, Seq(3))));
}

#[test]
fn weak_divergence_takes_the_position_back() {
    let mut core = serving(&["a"], true);
    assert_eq!(core.position().agreed(), Some(Seq(10)));
    let d = core
        .handle_frame(MS, deliver(11..=15, Some(9)))
        .expect("delivered");
    core.take(d.commit);
    core.handle_frame(MS, ServerFrame::Watermark(WatermarkHead { seq: Seq(12) }));
    assert_eq!(core.position().agreed(), Some(Seq(12)));
    let diverged = DivergedHead {
        from: Seq(14),
        seen: Seq(15),
    };
    core.handle_frame(MS, ServerFrame::Diverged(diverged));
    let r = core.position().resume().expect("a position");
    assert_eq!((r.after, r.check, r.agreed), (Seq(13), None, Some(Seq(13))));
    assert!(matches!(
        events(&mut core)[..],
        [Event::Diverged { from: Seq(14), .. }]
    ));
    // A strong client is never told of divergence: it is a protocol error.
    let mut strong = serving(&["a"], false);
    strong.handle_frame(MS, ServerFrame::Diverged(diverged));
    assert!(!strong.link().is_up());
    assert!(matches!(
        events(&mut strong)[..],
        [.., Event::Link(LinkEvent::Refused(Error::Protocol(_)))]
    ));
}

#[test]
fn refusals_end_the_connection_retryable_ones_try_elsewhere() {
    let mut core = serving(&["a", "b"], false);
    let busy = ErrorFrame {
        code: ErrorCode::NotPrimary,
        message: "minority".into(),
        publisher: None,
        pattern: None,
    };
    core.handle_frame(MS, ServerFrame::Error(busy.clone()));
    assert!(matches!(
        events(&mut core)[..],
        [Event::Link(LinkEvent::Lost { .. })]
    ));
    // It had served for less than the longest pause: the next server
    // after a pause, not at once.
    assert_eq!(core.poll_timeout(), Some(MS + 20 * MS));
    // Refused again and again right after each Welcome: the pauses double
    // (no tight reconnect loop against an overloaded core).
    let mut now = MS;
    let mut pauses = Vec::new();
    for _ in 0..8 {
        let at = core.poll_timeout().expect("a timer");
        pauses.push(at - now);
        now = at;
        core.handle_timeout(now);
        assert_eq!(connects(&mut core).len(), 1);
        core.handle_connected(now);
        core.handle_frame(now, welcome(1, 10, 0));
        core.handle_frame(now, ServerFrame::Error(busy.clone()));
    }
    assert_eq!(pauses[..4], [20 * MS, 40 * MS, 80 * MS, 160 * MS]);
    assert_eq!(pauses[7], BACKOFF_MAX);
    // A connection that served a while is followed by the adopter at once.
    core.handle_timeout(core.poll_timeout().expect("a timer"));
    connects(&mut core);
    core.handle_connected(now);
    core.handle_frame(now, welcome(1, 10, 0));
    now += BACKOFF_MAX;
    core.handle_frame(now, ServerFrame::Error(busy));
    assert_eq!(core.poll_timeout(), Some(now));
    let mut core = serving(&["a", "b"], false);
    let no = ErrorFrame {
        code: ErrorCode::Malformed,
        message: "no".into(),
        publisher: None,
        pattern: None,
    };
    core.handle_frame(MS, ServerFrame::Error(no));
    assert!(matches!(
        events(&mut core)[..],
        [
            Event::Link(LinkEvent::Lost { .. }),
            Event::Link(LinkEvent::Refused(Error::Rejected {
                code: ErrorCode::Malformed,
                ..
            }))
        ]
    ));
}

#[test]
fn the_handshake_is_checked() {
    let mut core = ClientCore::new(Duration::ZERO, config(&["a", "b"]));
    core.handle_timeout(Duration::ZERO);
    connects(&mut core);
    core.handle_connected(Duration::ZERO);
    let ServerFrame::Welcome(mut w) = welcome(1, 0, 0) else {
        unreachable!()
    };
    w.version += 1;
    core.handle_frame(MS, ServerFrame::Welcome(w));
    assert!(matches!(
        events(&mut core)[..],
        [Event::Link(LinkEvent::Refused(Error::Protocol(_)))]
    ));
    // A head no seq can follow (a relay's tier above would have made it
    // overflow; found by an audit of peer-controlled counts).
    let mut last = ClientCore::new(Duration::ZERO, config(&["a"]));
    last.handle_timeout(Duration::ZERO);
    connects(&mut last);
    last.handle_connected(Duration::ZERO);
    last.handle_frame(MS, welcome(1, u64::MAX, 0));
    assert!(matches!(
        &events(&mut last)[..],
        [Event::Link(LinkEvent::Refused(Error::Protocol(why)))] if why.contains("last seq")
    ));
    // No answer in time: the next server.
    core.handle_timeout(MS);
    assert_eq!(connects(&mut core), ["b"]);
    core.handle_connected(MS);
    core.handle_timeout(MS + Duration::from_secs(2));
    assert!(!core.link().is_open());
    // A delivery before the Welcome is a protocol error.
    let mut core = ClientCore::new(Duration::ZERO, config(&["a"]));
    core.subscribe(">");
    core.handle_timeout(Duration::ZERO);
    connects(&mut core);
    core.handle_connected(Duration::ZERO);
    assert!(core.handle_frame(MS, deliver(1..=1, None)).is_none());
    assert!(!core.link().is_open());
}

#[test]
fn subscriptions_made_while_connecting_follow_the_welcome() {
    let mut core = ClientCore::new(Duration::ZERO, config(&["a"]));
    assert!(core.subscribe("x.*"));
    assert!(!core.subscribe("x.*"), "one subscription per pattern");
    core.handle_timeout(Duration::ZERO);
    connects(&mut core);
    core.handle_connected(Duration::ZERO);
    sent(&mut core);
    core.subscribe("y.*");
    core.unsubscribe("x.*");
    core.handle_frame(MS, welcome(1, 0, 0));
    let frames = sent(&mut core);
    assert!(
        matches!(&frames[..], [ClientFrame::Subscribe(s), ClientFrame::Unsubscribe(u)]
        if s.pattern == "y.*" && u.pattern == "x.*")
    );
    assert!(events(&mut core)
        .iter()
        .all(|e| !matches!(e, Event::Subscribed(_))));
    let answer = SubscribedHead {
        pattern: "y.*".into(),
        head: Seq(4),
        hash: Some(44),
    };
    core.handle_frame(MS, ServerFrame::Subscribed(answer));
    assert!(matches!(&events(&mut core)[..], [Event::Subscribed(p)] if p == "y.*"));
    assert_eq!(core.position().at(), Some((1, Seq(4))));
}

#[test]
fn the_tiers_server_list_replaces_the_configured_one() {
    let mut core = serving(&["a"], false);
    let list = ServersHead {
        seq: Seq(1),
        servers: vec!["x".into(), "y".into()],
    };
    core.handle_frame(MS, ServerFrame::Servers(list));
    assert_eq!(core.link().servers(), ["x", "y"]);
}

#[test]
fn a_held_link_tries_nothing_and_never_gives_up_until_released() {
    let mut core = serving(&["a", "b"], false);
    core.hold(MS, "the application is behind");
    assert!(core.link().is_held());
    let mut disconnected = false;
    while let Some(a) = core.poll_action() {
        disconnected |= matches!(a, Action::Disconnect);
    }
    assert!(disconnected, "the connection is dropped");
    assert_eq!(core.poll_timeout(), None, "no retry, no deadline");
    // Far past `reconnect_for`: still held, nothing tried, not stopped.
    let later = Duration::from_secs(3600);
    core.handle_timeout(later);
    assert!(connects(&mut core).is_empty());
    assert!(!events(&mut core)
        .iter()
        .any(|e| matches!(e, Event::Link(LinkEvent::Unreachable(_)))));
    core.release(later);
    assert_eq!(
        core.poll_timeout(),
        Some(later),
        "the next round starts now"
    );
    core.handle_timeout(later);
    assert_eq!(connects(&mut core).len(), 1);
}

/// The credit a Hello or Credit frame among `frames` grants.
fn grants(frames: &[ClientFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Hello(h) => h.window,
            ClientFrame::Credit(c) => Some(c.msgs),
            _ => None,
        })
        .collect()
}

#[test]
fn the_window_is_granted_as_the_application_takes_and_never_past_it() {
    let mut c = config(&["a"]);
    c.receive_window = Some(8);
    let mut core = ClientCore::new(Duration::ZERO, c);
    core.subscribe(">");
    core.handle_timeout(Duration::ZERO);
    connects(&mut core);
    core.handle_connected(Duration::ZERO);
    assert_eq!(
        grants(&sent(&mut core)),
        vec![8],
        "the Hello offers the window"
    );
    core.handle_frame(Duration::ZERO, welcome(1, 0, 0));
    assert_eq!(grants(&sent(&mut core)), Vec::<u64>::new());
    // Eight delivered and handed over, none taken: nothing to grant.
    let d = core.handle_frame(MS, deliver(1..=8, None)).expect("new");
    core.take(d.commit);
    core.set_outstanding(8);
    assert_eq!(grants(&sent(&mut core)), Vec::<u64>::new());
    // One taken: less than a quarter of the window is free.
    core.set_outstanding(7);
    assert_eq!(grants(&sent(&mut core)), Vec::<u64>::new());
    // Two taken: a quarter, granted; taking the rest grants the rest.
    core.set_outstanding(6);
    assert_eq!(grants(&sent(&mut core)), vec![2]);
    core.set_outstanding(0);
    assert_eq!(grants(&sent(&mut core)), vec![6]);
    // Messages the application still holds on a new connection are not
    // offered again in its Hello.
    let d = core.handle_frame(MS, deliver(9..=13, None)).expect("new");
    core.take(d.commit);
    core.set_outstanding(5);
    core.drop_connection(MS, "test");
    reconnect(&mut core);
    assert_eq!(grants(&sent(&mut core)), vec![3]);
}

#[test]
fn a_core_without_a_window_grants_nothing() {
    let mut core = serving(&["a"], false);
    let d = core.handle_frame(MS, deliver(11..=12, None)).expect("new");
    core.take(d.commit);
    core.set_outstanding(0);
    assert_eq!(grants(&sent(&mut core)), Vec::<u64>::new());
}
