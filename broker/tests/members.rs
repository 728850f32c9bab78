//! Membership reports over real processes (docs/DESIGN.md, "Membership reports"):
//! `full` clients see the same views at the same positions of the stream
//! across a whole tree, and what one client joining or leaving costs the
//! other clients in `full` and in `none` mode.
//!
//! `CANOPY_MEMBERS_CLIENTS` (default `100`, comma-separated) sets the client
//! counts of the cost test; run with `--nocapture` for the figures.
//! `bench/RESULTS.md` has them at 100 and 1,000.

mod common;

use canopy_client::protocol::{ClientFrame, Reports, ServerFrame, SlowPolicy};
use canopy_client::{Client, ClientOptions, Event, PublisherId};
use common::{within_for, Raw, Server, Tree};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::time::Duration;

const TIME_MAX: Duration = Duration::from_secs(120);

/// What one `full` client saw: messages by seq and views by position.
#[derive(Default, Debug)]
struct Story {
    msgs: Vec<u64>,
    /// Position → the view there (client ids and their servers).
    views: BTreeMap<u64, Vec<(PublisherId, PublisherId)>>,
}

fn full(servers: Vec<String>, name: &str) -> ClientOptions {
    let mut o = ClientOptions::new(servers);
    o.name = name.into();
    o.reports = Reports::Full;
    o.reconnect_for = Duration::from_secs(60);
    o
}

/// Reads `total` messages on `feed.>`, noting every view on the way.
async fn listen(client: Client, total: usize) -> Story {
    let mut sub = client.subscribe("feed.>").await.expect("subscribe");
    let mut story = Story::default();
    while story.msgs.len() < total {
        match sub.next().await {
            Some(Event::Message(m)) => story.msgs.push(m.seq.0),
            Some(Event::View(v)) => {
                let view = v.clients.values().map(|e| (e.id, e.server)).collect();
                story.views.insert(v.seq.0, view);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    story
}

/// Full clients at every tier of a tree; clients come and go and a leaf
/// relay is killed while messages flow. Every client that stayed
/// connected sees the same views at the same positions; the one whose
/// relay was killed agrees with them wherever both have a view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_clients_see_the_same_views_at_the_same_positions_across_a_tree() {
    const TOTAL: usize = 600;
    let tree = Tree::start(3, &[2, 2]);
    let (core, mid, leaves) = (&tree.core, &tree.tiers[0], &tree.tiers[1]);
    let places = [
        ("at-core", core.clone()),
        ("at-mid", mid.clone()),
        ("at-leaf-1", leaves.clone()),
        ("at-leaf-1b", leaves.clone()),
        ("orphan", vec![leaves[1].clone(), leaves[0].clone()]),
    ];
    let mut listeners = Vec::new();
    for (name, servers) in places {
        let client = within_for(TIME_MAX, "connect", Client::connect(full(servers, name)))
            .await
            .expect("connects");
        listeners.push((name, tokio::spawn(listen(client, TOTAL))));
    }
    let publisher = Client::connect(ClientOptions::new(core.clone()))
        .await
        .expect("publisher connects");
    let mut extras = Vec::new();
    for i in 0..TOTAL {
        publisher
            .send("feed.x", format!("{i}"))
            .await
            .expect("send");
        if i % 50 == 10 {
            // A client joins at a leaf and another leaves.
            let c = Client::connect(ClientOptions::new(leaves.clone()))
                .await
                .expect("extra connects");
            extras.push(c);
            if extras.len() > 2 {
                drop(extras.remove(0));
            }
        }
        if i == TOTAL / 2 {
            tree.kill("relay-2.2");
        }
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    publisher.flush().await.expect("acknowledged");
    let mut stories = Vec::new();
    for (name, task) in listeners {
        let story = within_for(TIME_MAX, "listeners", task).await.expect("task");
        assert_eq!(story.msgs.len(), TOTAL, "{name}");
        stories.push((name, story));
    }
    let (_, reference) = &stories[0];
    let first = stories
        .iter()
        .filter_map(|(_, s)| s.views.keys().next().copied())
        .max()
        .unwrap_or(0);
    let steady = |s: &Story| -> Vec<(u64, Vec<(PublisherId, PublisherId)>)> {
        s.views
            .range(first + 1..)
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    };
    assert!(
        steady(reference).len() >= 10,
        "joins, leaves and the kill make views: {:?}",
        reference.views.keys().collect::<Vec<_>>()
    );
    for (name, story) in &stories {
        assert_eq!(story.msgs, reference.msgs, "{name}: the same messages");
        if *name != "orphan" {
            assert_eq!(steady(story), steady(reference), "{name}: the same views");
        }
        for (at, view) in &story.views {
            if let Some(other) = reference.views.get(at) {
                assert_eq!(view, other, "{name}: the view at {at}");
            }
        }
    }
    let orphan = &stories[4].1;
    assert!(
        orphan.views.keys().any(|&k| k > first),
        "the orphan is told the membership after its adoption"
    );
}

/// A client that reads frames and counts what arrives between two marks.
async fn counted(addr: String, id: u64, reports: Reports) -> (Raw, u64) {
    let mut raw = Raw::connect(&addr).await;
    let mut hello = common::hello(id, &["mark"], SlowPolicy::Disconnect);
    hello.reports = reports;
    raw.send(ClientFrame::Hello(hello)).await;
    match raw.next().await {
        Some(ServerFrame::Welcome(_)) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    (raw, id)
}

/// Reads until the delivery of mark `n`; returns frames and bytes before it.
async fn until_mark(raw: &mut Raw, n: usize) -> (u64, u64) {
    let (mut frames, start) = (0u64, raw.bytes_read);
    loop {
        let before = raw.bytes_read;
        match raw.next().await {
            Some(ServerFrame::Deliver(_, body)) if body.ends_with(format!("#{n}").as_bytes()) => {
                return (frames, before - start);
            }
            Some(_) => frames += 1,
            None => panic!("connection ended: {:?}", raw.ended),
        }
    }
}

/// Joins and leaves of one client cost the others nothing in `none` mode
/// and one report frame each in `full` mode. A mark published after the
/// change (and ordered after it) bounds what is counted, so the count is
/// exact, with no waiting on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_costs_other_clients_one_frame_in_full_mode_and_none_in_none_mode() {
    let counts: Vec<usize> = std::env::var("CANOPY_MEMBERS_CLIENTS")
        .unwrap_or_else(|_| "100".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    for n in counts {
        for reports in [Reports::None, Reports::Full] {
            let (join, leave) = cost(n, reports).await;
            eprintln!(
                "{n} clients, {reports:?}: a join cost the others {} frames, {} bytes; \
                 a leave {} frames, {} bytes",
                join.0, join.1, leave.0, leave.1
            );
            let expect = match reports {
                Reports::Full => n as u64,
                _ => 0,
            };
            assert_eq!(join.0, expect, "{reports:?}: frames for a join");
            assert_eq!(leave.0, expect, "{reports:?}: frames for a leave");
        }
    }
}

/// The publish of mark `k` (payload `#k`, pub_seq `k + 1`).
fn mark(k: u64) -> ClientFrame {
    let p = canopy_client::protocol::Publish::new(
        "mark",
        canopy_client::protocol::PubSeq(k + 1),
        format!("#{k}").into(),
    );
    ClientFrame::Publish(p)
}

/// Frames and bytes the `n` clients receive for one join, and for one leave.
async fn cost(n: usize, reports: Reports) -> ((u64, u64), (u64, u64)) {
    let server = Server::with_config("[limits]\nwatermark_interval_ms = 600000\n");
    let publisher = Raw::connect(&server.addr).await;
    let mut publisher = publisher;
    publisher.hello(1, &[], SlowPolicy::Disconnect).await;
    let mut readers = Vec::new();
    for i in 0..n {
        let (mut raw, _) = counted(server.addr.clone(), 100 + i as u64, reports).await;
        // Read from the start: setup reports must not back up.
        readers.push(tokio::spawn(async move {
            until_mark(&mut raw, 0).await;
            let join = until_mark(&mut raw, 1).await;
            let leave = until_mark(&mut raw, 2).await;
            (join, leave)
        }));
    }
    // Joins after the readers, so that their reports do not pile up for it.
    let mut watcher = counted(server.addr.clone(), 2, Reports::Full).await.0;
    publisher.send(mark(0)).await;
    // Mark 0 is ordered before the newcomer joins: a publish written to the
    // socket is not yet ordered, and the newcomer's Hello could overtake it.
    until_mark(&mut watcher, 0).await;
    // The newcomer's attach is ordered when its Hello is taken, before the
    // Welcome it waits for, so mark 1 comes after it.
    let (newcomer, id) = counted(server.addr.clone(), 99, reports).await;
    publisher.send(mark(1)).await;
    // Mark 1 is ordered before the newcomer leaves.
    until_mark(&mut watcher, 1).await;
    drop(newcomer);
    // The watcher (not counted) sees the leave ordered; mark 2 follows it.
    within_for(TIME_MAX, "the leave to be ordered", async {
        loop {
            if let Some(ServerFrame::Members(m)) = watcher.next().await {
                if m.left.contains(&PublisherId(id)) {
                    break;
                }
            }
        }
    })
    .await;
    publisher.send(mark(2)).await;
    let (mut join, mut leave) = ((0, 0), (0, 0));
    for r in readers {
        let (j, l) = within_for(TIME_MAX, "readers", r).await.expect("reader");
        join = (join.0 + j.0, join.1 + j.1);
        leave = (leave.0 + l.0, leave.1 + l.1);
    }
    (join, leave)
}
