//! RRPC on its own: replicas fed one stream by hand.

use super::*;
use crate::core::stream::Ordered;
use canopy_client::protocol::Seq;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// A counter with a method per mode; calls carry an `i64` (little endian).
#[derive(Default)]
struct Counter {
    total: std::sync::atomic::AtomicI64,
}

fn num(b: &[u8]) -> Result<i64, String> {
    let a: [u8; 8] = b.try_into().map_err(|_| "not an i64".to_string())?;
    Ok(i64::from_le_bytes(a))
}

fn bytes(n: i64) -> Bytes {
    Bytes::copy_from_slice(&n.to_le_bytes())
}

impl Service for Counter {
    fn methods(&self) -> Vec<Method> {
        vec![
            Method::new("add", Mode::Active),
            Method::new("pb.add", Mode::PrimaryBackup),
            Method::new("lb.add", Mode::LoadBalanced),
            Method::new("par.add", Mode::Parallel),
        ]
    }

    fn execute(&self, call: &Call<'_>) -> Result<Bytes, String> {
        let n = num(call.payload)?;
        if n < 0 {
            return Err(format!("{n} is negative"));
        }
        Ok(match call.share {
            // Share r of k adds the numbers below n that are r mod k.
            Some(s) => bytes(
                (0..n)
                    .filter(|i| i % i64::from(s.of) == i64::from(s.rank))
                    .count() as i64,
            ),
            None => bytes(n),
        })
    }

    fn merge(&self, _call: &Call<'_>, shares: &[Bytes]) -> Result<Bytes, String> {
        let mut sum = 0;
        for s in shares {
            sum += num(s)?;
        }
        Ok(bytes(sum))
    }

    fn apply(&self, _call: &Call<'_>, effect: &[u8]) -> Result<Bytes, String> {
        let n = num(effect)?;
        Ok(bytes(self.total.fetch_add(n, Ordering::SeqCst) + n))
    }

    fn snapshot(&self) -> Bytes {
        bytes(self.total.load(Ordering::SeqCst))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        self.total.store(num(snapshot)?, Ordering::SeqCst);
        Ok(())
    }
}

/// Replicas over one hand-made stream: what a replica submits is
/// appended to the stream when `order` is called.
struct Group {
    replicas: Vec<Rrpc>,
    stream: Vec<Ordered>,
    /// How far each replica has been delivered.
    delivered: Vec<usize>,
    /// The last view's epoch.
    epoch: u64,
}

const CALLER: PublisherId = PublisherId(7);

/// A view of servers `ids`, each in its first incarnation.
fn view(ids: &[u32]) -> Vec<Member> {
    ids.iter()
        .map(|&id| Member {
            node: NodeId(id),
            incarnation: crate::core::mbrship::Incarnation(1),
        })
        .collect()
}

impl Group {
    /// Replicas 1..=n in a view of all of them.
    fn new(n: u32) -> Self {
        let mut g = Group::unviewed(n);
        let members = view(&(1..=n).collect::<Vec<_>>());
        g.install(&members, &(0..n as usize).collect::<Vec<_>>());
        g
    }

    /// Replicas 1..=n on a new stream whose first view record is not
    /// ordered yet.
    fn unviewed(n: u32) -> Self {
        let members = view(&(1..=n).collect::<Vec<_>>());
        let n = n as usize;
        let replicas = members
            .iter()
            .map(|m| {
                let me = m.node;
                let config = RrpcConfig::new(outcome_publisher(me, 1));
                let mut r = Rrpc::new(me, Some(share(Counter::default())), config);
                r.set_primary(true);
                r
            })
            .collect();
        Group {
            replicas,
            stream: Vec::new(),
            delivered: vec![0; n],
            epoch: 0,
        }
    }

    /// Replicas `at` install a view of `members` (its coordinator the
    /// first, among them), each where it was delivered to; the coordinator
    /// orders the view's record (what it submitted before goes first).
    fn install(&mut self, members: &[Member], at: &[usize]) {
        self.epoch += 1;
        let view = View {
            id: ViewId {
                epoch: self.epoch,
                coordinator: members[0].node,
            },
            members: members.to_vec(),
            stream: 1,
        };
        for &i in at {
            let seq = Seq(self.delivered[i] as u64);
            self.replicas[i].view(&view, seq);
            for Submitted(_, m) in self.replicas[i].take_submissions() {
                self.append(m.0, m.1 .0, &m.2, m.3);
            }
        }
    }

    fn append(&mut self, publisher: PublisherId, pub_seq: u64, topic: &str, payload: Bytes) {
        let seq = Seq(self.stream.len() as u64 + 1);
        self.stream.push(Ordered {
            seq,
            topic: topic.into(),
            publisher,
            pub_seq: PubSeq(pub_seq),
            payload,
            hash: 0,
        });
    }

    fn call(&mut self, pub_seq: u64, method: &str, n: i64) {
        self.append(CALLER, pub_seq, &Replies::Own.topic(method), bytes(n));
    }

    /// Delivers the stream to replica `i`.
    fn deliver(&mut self, i: usize) {
        let from = self.delivered[i];
        self.replicas[i].deliver(&self.stream[from..]);
        self.delivered[i] = self.stream.len();
    }

    fn deliver_all(&mut self) {
        for i in 0..self.replicas.len() {
            self.deliver(i);
        }
    }

    /// Runs every job replica `i` has, and orders what it submits.
    fn execute(&mut self, i: usize) -> usize {
        let mut ran = 0;
        while let Some(job) = self.replicas[i].poll_job() {
            let service = self.replicas[i].service().expect("a service").clone();
            let result = job.run(&service);
            self.replicas[i].executed(&job, result);
            ran += 1;
        }
        for Submitted(_, m) in self.replicas[i].take_submissions() {
            self.append(m.0, m.1 .0, &m.2, m.3);
        }
        ran
    }

    /// Delivers and executes until nothing moves.
    fn settle(&mut self) {
        loop {
            self.deliver_all();
            let ran: usize = (0..self.replicas.len()).map(|i| self.execute(i)).sum();
            if ran == 0 && self.delivered.iter().all(|&d| d == self.stream.len()) {
                return;
            }
        }
    }

    fn replies(&mut self, i: usize) -> Vec<(u64, Answer)> {
        std::iter::from_fn(|| self.replicas[i].poll_reply())
            .map(|r| (r.id.pub_seq.0, r.answer))
            .collect()
    }

    fn digests(&self) -> Vec<u64> {
        self.replicas.iter().map(Rrpc::digest).collect()
    }
}

fn ok(n: i64) -> Answer {
    Ok(bytes(n))
}

#[test]
fn every_mode_applies_where_its_effect_is_known_the_same_at_every_replica() {
    let mut g = Group::new(3);
    g.call(1, "add", 1);
    g.call(2, "pb.add", 10);
    g.call(3, "lb.add", 100);
    g.call(4, "par.add", 5); // 0+1+2+3+4 counted: 5 numbers
    g.call(5, "add", 1000);
    g.settle();
    let first = g.replies(0);
    // Active calls are applied at their own positions; the others where
    // their outcomes (the last share) were ordered: after call 5.
    assert_eq!(first[..2], [(1, ok(1)), (5, ok(1001))]);
    assert_eq!(first.len(), 5);
    assert_eq!(first.last().map(|r| r.1.clone()), Some(ok(1116)));
    for i in 1..3 {
        assert_eq!(g.replies(i), first, "replica {i}");
    }
    let d = g.digests();
    assert!(d.iter().all(|&x| x == d[0]), "digests differ: {d:?}");
}

#[test]
fn only_the_primary_executes_a_primary_backup_call_and_only_at_the_front() {
    let mut g = Group::new(3);
    g.call(1, "lb.add", 1);
    g.call(2, "pb.add", 2);
    g.deliver_all();
    // Replicas 2 and 3 have no primary-backup job; replica 1 none yet
    // either: the load-balanced call before it has no outcome.
    let pb = |g: &mut Group, i: usize| {
        std::iter::from_fn(|| g.replicas[i].poll_job())
            .filter(|j| &*j.method == "pb.add")
            .count()
    };
    // (The load-balanced job went to one of them; put the jobs back by
    // running them later.)
    assert_eq!(pb(&mut g, 1) + pb(&mut g, 2), 0);
    assert_eq!(pb(&mut g, 0), 0);
}

#[test]
fn a_view_change_reassigns_what_the_departed_replica_had_not_ordered() {
    let mut g = Group::new(3);
    for s in 1..=30 {
        g.call(s, "lb.add", 1);
    }
    g.deliver_all();
    // Replica 3 crashes with its jobs; the others run theirs.
    while g.replicas[2].poll_job().is_some() {}
    g.execute(0);
    g.execute(1);
    g.deliver_all();
    assert!(g.replicas[0].queued() > 0, "replica 3 had some of 30 calls");
    g.install(&view(&[1, 2]), &[0, 1]);
    let survivors = |g: &mut Group| loop {
        for i in 0..2 {
            g.deliver(i);
        }
        if g.execute(0) + g.execute(1) == 0 && g.delivered[..2].iter().all(|&d| d == g.stream.len())
        {
            return;
        }
    };
    survivors(&mut g);
    let replies = g.replies(0);
    assert_eq!(replies.len(), 30);
    assert_eq!(replies.last().map(|r| &r.1), Some(&ok(30)));
    // Only the departed replica's calls moved: 10 of 30.
    assert_eq!(g.replicas[0].stats()["lb.add"].reassigned, 10);
    assert_eq!(g.replicas[0].digest(), g.replicas[1].digest());
}

#[test]
fn load_balanced_calls_go_to_the_member_with_the_fewest_unfinished() {
    let mut g = Group::new(3);
    for s in 1..=30 {
        g.call(s, "lb.add", 1);
    }
    g.deliver_all();
    let jobs = |g: &mut Group, i: usize| std::iter::from_fn(|| g.replicas[i].poll_job()).count();
    assert_eq!(
        [jobs(&mut g, 0), jobs(&mut g, 1), jobs(&mut g, 2)],
        [10, 10, 10]
    );
    // Replica 1 orders an outcome for each of its calls (by hand: its jobs
    // are gone); the next calls go to it while the others are loaded.
    let mine: Vec<CallId> = g.replicas[0]
        .queue
        .iter()
        .filter(|p| p.executor == Some(NodeId(1)))
        .map(|p| p.id)
        .collect();
    for (k, id) in mine.iter().enumerate() {
        let outcome = Outcome {
            id: *id,
            share: None,
            result: Ok(bytes(1)),
        };
        g.append(
            PublisherId(1001),
            k as u64 + 1,
            OUTCOME_TOPIC,
            wire::encode(&outcome),
        );
    }
    for s in 31..=40 {
        g.call(s, "lb.add", 1);
    }
    g.deliver_all();
    assert_eq!(
        [jobs(&mut g, 0), jobs(&mut g, 1), jobs(&mut g, 2)],
        [10, 0, 0]
    );
    let d = g.digests();
    assert!(d.iter().all(|&x| x == d[0]), "assignments differ: {d:?}");
}

#[test]
fn the_first_outcome_ordered_counts_and_a_repeated_call_is_not_applied_again() {
    let mut g = Group::new(2);
    g.call(1, "pb.add", 5);
    g.deliver_all();
    let job = g.replicas[0].poll_job().expect("the primary executes");
    g.replicas[0].executed(&job, Ok(bytes(5)));
    let subs = g.replicas[0].take_submissions();
    assert_eq!(subs.len(), 1);
    let Submitted(_, m) = subs[0].clone();
    // Another replica's outcome for the same call is ordered first, then
    // the primary's (a view change moved the call, the old primary still
    // ordered its own).
    let other = Outcome {
        id: job.id,
        share: None,
        result: Ok(bytes(6)),
    };
    g.append(PublisherId(1002), 1, OUTCOME_TOPIC, wire::encode(&other));
    g.append(m.0, m.1 .0, &m.2, m.3.clone());
    // The same call ordered again (a table that forgot its caller): not
    // applied again, answered again.
    g.call(1, "pb.add", 5);
    g.settle();
    for i in 0..2 {
        assert_eq!(g.replies(i), vec![(1, ok(6)), (1, ok(6))]);
        assert_eq!(g.replicas[i].stats()["pb.add"].applied, 1);
    }
}

#[test]
fn unknown_methods_and_handler_errors_are_replies_every_replica_agrees_on() {
    let mut g = Group::new(2);
    g.call(1, "nope", 1);
    g.call(2, "add", -1);
    g.call(3, "lb.add", -1);
    g.call(4, "add", 2);
    g.settle();
    for i in 0..2 {
        let r: std::collections::BTreeMap<u64, Answer> = g.replies(i).into_iter().collect();
        let code = |k| r[&k].as_ref().map_err(|e| e.code);
        assert_eq!(code(1), Err(CallErrorCode::UnknownMethod));
        assert_eq!(code(2), Err(CallErrorCode::Handler));
        assert_eq!(code(3), Err(CallErrorCode::Handler));
        assert_eq!(r[&4], ok(2), "failed calls change nothing");
    }
}

#[test]
fn a_restored_replica_continues_where_its_snapshot_was_taken() {
    let mut g = Group::new(2);
    g.call(1, "add", 3);
    g.call(2, "lb.add", 4);
    g.call(3, "par.add", 4);
    g.deliver_all();
    // A snapshot with calls still queued.
    let snap = g.replicas[0].snapshot();
    let service = Some(share(Counter::default()));
    let mut fresh = Rrpc::new(
        NodeId(3),
        service,
        RrpcConfig::new(outcome_publisher(NodeId(3), 1)),
    );
    let head = Seq(g.stream.len() as u64);
    fresh.restore(Some(&snap), 1, head).expect("restores");
    g.replicas.push(fresh);
    g.delivered.push(g.stream.len());
    // It joins the view, at the snapshot's position.
    g.install(&view(&[1, 2, 3]), &[0, 1, 2]);
    g.settle();
    let d = g.digests();
    assert!(d.iter().all(|&x| x == d[0]), "digests differ: {d:?}");
    assert_eq!(g.replies(2).last(), Some(&(3, ok(3 + 4 + 4))));
}

#[test]
fn a_replica_that_never_installed_a_view_assigns_as_the_others_did() {
    // Cluster simulator seed 2467: replica 3, cut off between accepting
    // the view of 1, 2 and 3 and its commit, is delivered what was ordered
    // in that view by the next view's flush, never having installed it.
    let mut g = Group::new(4);
    for s in 1..=20 {
        g.call(s, "lb.add", 1);
    }
    g.deliver_all();
    // Replica 4 fails with its jobs; only 1 and 2 install the next view.
    while g.replicas[3].poll_job().is_some() {}
    g.install(&view(&[1, 2, 3]), &[0, 1]);
    for s in 21..=30 {
        g.call(s, "lb.add", 1);
    }
    for i in 0..3 {
        g.deliver(i);
    }
    let d = &g.digests()[..3];
    assert!(d.iter().all(|&x| x == d[0]), "assignments differ: {d:?}");
    loop {
        let ran: usize = (0..3).map(|i| g.execute(i)).sum();
        for i in 0..3 {
            g.deliver(i);
        }
        if ran == 0 {
            break;
        }
    }
    let replies = g.replies(2);
    assert_eq!(replies.len(), 30);
    assert_eq!(replies.last().map(|r| &r.1), Some(&ok(30)));
    let d = &g.digests()[..3];
    assert!(d.iter().all(|&x| x == d[0]), "states differ: {d:?}");
}

#[test]
fn only_the_newest_view_record_by_its_coordinator_counts() {
    let mut g = Group::new(3);
    g.install(&view(&[2, 3]), &[1, 2]);
    // The first view's record again, ordered late (its coordinator
    // resubmitted it in the new view), and a record naming a newer view
    // that its coordinator did not order: neither changes the members.
    let record = |epoch: u64, coordinator: u32, ids: &[u32]| {
        let id = ViewId {
            epoch,
            coordinator: NodeId(coordinator),
        };
        wire::encode(&ViewRecord {
            id,
            members: view(ids),
        })
    };
    g.append(
        outcome_publisher(NodeId(1), 1),
        9,
        VIEW_TOPIC,
        record(1, 1, &[1, 2, 3]),
    );
    g.append(
        outcome_publisher(NodeId(3), 1),
        9,
        VIEW_TOPIC,
        record(9, 2, &[1, 3]),
    );
    g.append(
        outcome_publisher(NodeId(3), 1),
        10,
        VIEW_TOPIC,
        b"\xff".as_slice().into(),
    );
    g.call(1, "pb.add", 5);
    g.deliver_all();
    // The primary is the first member of the view of 2 and 3.
    let jobs: Vec<bool> = g
        .replicas
        .iter_mut()
        .map(|r| r.poll_job().is_some())
        .collect();
    assert_eq!(jobs, [false, true, false]);
    let d = g.digests();
    assert!(d.iter().all(|&x| x == d[0]), "states differ: {d:?}");
}

#[test]
fn a_replica_told_of_a_view_late_assigns_as_the_others_did() {
    // Replicas 1 and 2; replica 3 installs a snapshot taken at `head`,
    // then is delivered calls ordered in the view of 1 and 2 before it is
    // told of the view that takes it in (as a restarted server is, in a
    // flush).
    let mut g = Group::new(2);
    g.call(1, "lb.add", 1);
    g.deliver_all();
    let head = Seq(g.stream.len() as u64);
    let snap = g.replicas[0].snapshot();
    for s in 2..=9 {
        g.call(s, "lb.add", 1);
    }
    g.deliver_all();
    let service = Some(share(Counter::default()));
    let mut late = Rrpc::new(
        NodeId(3),
        service,
        RrpcConfig::new(outcome_publisher(NodeId(3), 1)),
    );
    late.restore(Some(&snap), 1, head).expect("restores");
    g.replicas.push(late);
    g.delivered.push(head.0 as usize);
    g.deliver(2);
    g.replicas[2].set_primary(true);
    g.install(&view(&[1, 2, 3]), &[0, 1, 2]);
    g.deliver_all();
    let d = g.digests();
    assert!(d.iter().all(|&x| x == d[0]), "assignments differ: {d:?}");
    g.settle();
    let replies = g.replies(2);
    assert_eq!(replies.len(), 9);
    assert_eq!(replies.last().map(|r| &r.1), Some(&ok(9)));
}

fn votes(answer: &Answer) -> Vec<(u32, Answer)> {
    let body = answer.as_ref().expect("every replica's replies");
    let votes: Vec<Vote> = wire::decode(body).expect("a list of votes");
    votes.into_iter().map(|v| (v.server, v.reply)).collect()
}

#[test]
fn a_caller_may_wait_for_every_replicas_reply_or_a_majoritys() {
    let mut g = Group::new(3);
    g.append(CALLER, 1, &Replies::All.topic("add"), bytes(5));
    g.append(CALLER, 2, &Replies::Majority.topic("add"), bytes(2));
    g.append(CALLER, 3, &Replies::All.topic("lb.add"), bytes(1));
    g.settle();
    for i in 0..3 {
        let r: BTreeMap<u64, Answer> = g.replies(i).into_iter().collect();
        assert_eq!(votes(&r[&1]), [(1, ok(5)), (2, ok(5)), (3, ok(5))]);
        assert_eq!(r[&2], ok(7));
        let code = r[&3].as_ref().map_err(|e| e.code);
        assert_eq!(code, Err(CallErrorCode::NotActive));
    }
    let d = g.digests();
    assert!(d.iter().all(|&x| x == d[0]), "digests differ: {d:?}");
}

#[test]
fn a_majority_outvotes_a_replica_that_disagrees_and_none_is_an_error() {
    // Replica 3's vote says otherwise (a handler that is not
    // deterministic, or a faulty replica).
    let forged = |g: &mut Group, pub_seq: u64, n: i64| {
        let vote = Outcome {
            id: CallId {
                publisher: CALLER,
                pub_seq: PubSeq(pub_seq),
            },
            share: None,
            result: Ok(bytes(n)),
        };
        let from = outcome_publisher(NodeId(3), 1);
        g.append(from, pub_seq, OUTCOME_TOPIC, wire::encode(&vote));
    };
    let mut g = Group::new(3);
    g.append(CALLER, 1, &Replies::Majority.topic("add"), bytes(5));
    g.deliver_all();
    forged(&mut g, 1, 99);
    g.replicas[2].take_submissions();
    g.settle();
    assert_eq!(g.replies(0), [(1, ok(5))]);
    // With only two voters left and one of them forged, none has more
    // than half of three.
    let mut g = Group::new(3);
    g.append(CALLER, 1, &Replies::Majority.topic("add"), bytes(5));
    g.deliver_all();
    forged(&mut g, 1, 99);
    for i in 1..3 {
        g.replicas[i].take_submissions();
    }
    g.execute(0);
    g.deliver_all();
    assert_eq!(g.replies(0), [], "replica 2 has not voted yet");
    g.install(&view(&[1, 3]), &[0, 2]);
    g.deliver(0);
    let r = g.replies(0);
    assert_eq!(r.len(), 1);
    let code = r[0].1.as_ref().map_err(|e| e.code);
    assert_eq!(code, Err(CallErrorCode::NoMajority));
}

#[test]
fn every_replicas_reply_is_the_replies_of_those_still_in_the_view() {
    let mut g = Group::new(3);
    g.append(CALLER, 1, &Replies::All.topic("add"), bytes(4));
    g.deliver_all();
    // Replica 3 fails before its vote is ordered.
    g.replicas[2].take_submissions();
    g.execute(0);
    g.execute(1);
    g.deliver_all();
    assert_eq!(
        g.replies(0),
        [],
        "replica 3 is waited for while in the view"
    );
    assert_eq!(
        g.replicas[0].lookup(CallId {
            publisher: CALLER,
            pub_seq: PubSeq(1)
        }),
        Lookup::Pending
    );
    g.install(&view(&[1, 2]), &[0, 1]);
    for i in 0..2 {
        g.deliver(i);
        let r = g.replies(i);
        assert_eq!(r.len(), 1);
        assert_eq!(votes(&r[0].1), [(1, ok(4)), (2, ok(4))]);
    }
    // Asked again, the call is answered from the reply table.
    let id = CallId {
        publisher: CALLER,
        pub_seq: PubSeq(1),
    };
    assert!(matches!(g.replicas[0].lookup(id), Lookup::Replied(Ok(_))));
}

#[test]
fn a_caller_is_remembered_until_its_last_reply_is_forgotten() {
    // Call 1 (load-balanced) is applied after call 2 (active); the table
    // forgets call 2's reply first, while call 1's is held: a retry of
    // call 2 must not be applied again.
    let mut g = Group::new(1);
    g.replicas[0].config.replies_max = 2;
    g.call(1, "lb.add", 1);
    g.call(2, "add", 10);
    g.settle();
    assert_eq!(g.replies(0), [(2, ok(10)), (1, ok(11))]);
    g.append(PublisherId(8), 1, &Replies::Own.topic("add"), bytes(100));
    g.settle();
    g.replies(0);
    g.call(2, "add", 10);
    g.settle();
    let r = g.replies(0);
    assert_eq!(r.len(), 1);
    let code = r[0].1.as_ref().map_err(|e| e.code);
    assert_eq!(code, Err(CallErrorCode::Forgotten), "applied once: {r:?}");
    assert_eq!(g.replicas[0].stats()["add"].applied, 2);
}

#[test]
fn outcome_records_that_do_not_decode_or_fit_are_ignored_alike() {
    let mut g = Group::new(2);
    g.call(1, "lb.add", 3);
    g.deliver_all();
    let id = CallId {
        publisher: CALLER,
        pub_seq: PubSeq(1),
    };
    let forged = |share| Outcome {
        id,
        share,
        result: Ok(bytes(1000)),
    };
    g.append(
        PublisherId(66),
        1,
        OUTCOME_TOPIC,
        Bytes::from_static(b"\xff\x00 not cbor"),
    );
    // A share for a call that is not parallel; a share past the bound.
    let share = Share { rank: 0, of: 1 };
    g.append(
        PublisherId(66),
        2,
        OUTCOME_TOPIC,
        wire::encode(&forged(Some(share))),
    );
    let share = Share {
        rank: 5,
        of: SHARES_MAX + 1,
    };
    g.append(
        PublisherId(66),
        3,
        OUTCOME_TOPIC,
        wire::encode(&forged(Some(share))),
    );
    g.settle();
    for i in 0..2 {
        assert_eq!(g.replies(i), [(1, ok(3))], "replica {i}");
    }
    let d = g.digests();
    assert!(d.iter().all(|&x| x == d[0]), "digests differ: {d:?}");
}

#[test]
fn replies_are_found_again_until_the_table_forgets_them() {
    let mut g = Group::new(1);
    g.replicas[0].config.replies_max = 2;
    for s in 1..=3 {
        g.call(s, "add", 1);
    }
    g.settle();
    let id = |s| CallId {
        publisher: CALLER,
        pub_seq: PubSeq(s),
    };
    assert_eq!(g.replicas[0].lookup(id(3)), Lookup::Replied(ok(3)));
    assert_eq!(g.replicas[0].lookup(id(2)), Lookup::Replied(ok(2)));
    assert!(matches!(
        g.replicas[0].lookup(id(1)),
        Lookup::Replied(Err(CallFailure {
            code: CallErrorCode::Forgotten,
            ..
        }))
    ));
    assert_eq!(g.replicas[0].lookup(id(4)), Lookup::Unknown);
}

#[test]
fn a_call_applied_before_the_streams_first_view_record_waits_for_that_views_votes() {
    let mut g = Group::unviewed(3);
    g.append(CALLER, 1, &Replies::All.topic("add"), bytes(4));
    g.deliver_all();
    // Replica 3's vote says otherwise; 1 and 2 vote as they applied.
    g.replicas[2].take_submissions();
    let forged = Outcome {
        id: CallId {
            publisher: CALLER,
            pub_seq: PubSeq(1),
        },
        share: None,
        result: Ok(bytes(99)),
    };
    g.append(
        outcome_publisher(NodeId(3), 1),
        1,
        OUTCOME_TOPIC,
        wire::encode(&forged),
    );
    g.execute(0);
    g.execute(1);
    g.deliver_all();
    assert_eq!(g.replies(0), [], "who votes is not known yet");
    g.install(&view(&[1, 2, 3]), &[0, 1, 2]);
    g.deliver_all();
    // (Was every member's vote made up from this replica's own reply,
    // with the votes ordered before the record dropped.)
    for i in 0..3 {
        let r = g.replies(i);
        assert_eq!(r.len(), 1);
        assert_eq!(votes(&r[0].1), [(1, ok(4)), (2, ok(4)), (3, ok(99))]);
    }
}

#[test]
fn a_voter_that_takes_a_snapshot_instead_of_applying_the_call_still_votes() {
    // Cluster simulator seed 9614 of 12,000: replica 3 is a voter of an
    // `all` call, but lags and takes the call's effect from a snapshot;
    // nothing of its own would ever vote, and the call would wait for good.
    let mut g = Group::new(3);
    g.append(CALLER, 1, &Replies::All.topic("add"), bytes(4));
    for i in 0..2 {
        g.deliver(i);
        g.execute(i);
    }
    let snap = g.replicas[0].snapshot();
    let head = Seq(g.delivered[0] as u64);
    let mut restored = Rrpc::new(
        NodeId(3),
        Some(share(Counter::default())),
        RrpcConfig::new(outcome_publisher(NodeId(3), 1)),
    );
    restored.set_primary(true);
    restored.restore(Some(&snap), 1, head).expect("restores");
    g.replicas[2] = restored;
    g.delivered[2] = head.0 as usize;
    g.settle();
    for i in 0..3 {
        let r = g.replies(i);
        let r = r
            .iter()
            .find(|(s, _)| *s == 1)
            .expect("the call is replied");
        assert_eq!(votes(&r.1), [(1, ok(4)), (2, ok(4)), (3, ok(4))]);
    }
}

#[test]
fn calls_whose_voters_all_left_unheard_get_the_reply_applying_gave() {
    let mut g = Group::new(3);
    g.append(CALLER, 1, &Replies::Majority.topic("add"), bytes(4));
    g.append(CALLER, 2, &Replies::All.topic("add"), bytes(1));
    g.deliver_all();
    // Every replica restarts before its vote is ordered: the view that
    // follows has each member in a new incarnation, none of them a voter.
    for i in 0..3 {
        g.replicas[i].take_submissions();
        g.replicas[i].set_publisher(outcome_publisher(NodeId(i as u32 + 1), 2));
    }
    let members: Vec<Member> = view(&[1, 2, 3])
        .into_iter()
        .map(|m| Member {
            incarnation: crate::core::mbrship::Incarnation(2),
            ..m
        })
        .collect();
    g.install(&members, &[0, 1, 2]);
    g.deliver_all();
    // (Were `NoMajority`, "more than 0 of the 0 replicas that replied",
    // and an empty list: cluster simulator seeds 60 and 1224.)
    for i in 0..3 {
        let r = g.replies(i);
        assert_eq!(r[0], (1, ok(4)));
        assert_eq!(r[1].0, 2);
        assert_eq!(votes(&r[1].1), [(1, ok(5)), (2, ok(5)), (3, ok(5))]);
    }
}

/// A snapshot whose queued call claims more shares than a live share may
/// (or none) is refused whole: its executors would be chosen for each of
/// `u32::MAX` shares. (Found by an audit of peer-controlled counts.)
#[test]
fn a_snapshot_with_a_call_of_too_many_shares_is_refused() {
    let mut g = Group::new(2);
    g.call(1, "par.add", 4);
    g.deliver_all();
    let snap = g.replicas[0].snapshot();
    let head = Seq(g.stream.len() as u64);
    for of in [0, SHARES_MAX + 1, u32::MAX] {
        let mut state: wire::State = wire::decode(&snap).expect("decodes");
        assert!(!state.queue.is_empty(), "the call is still queued");
        state.queue[0].of = Some(of);
        let forged = wire::encode(&state);
        let mut fresh = Rrpc::new(
            NodeId(3),
            Some(share(Counter::default())),
            RrpcConfig::new(outcome_publisher(NodeId(3), 1)),
        );
        let refused = fresh.restore(Some(&forged), 1, head);
        assert!(refused.is_err_and(|e| e.contains("shares")), "of = {of}");
    }
    let mut fresh = Rrpc::new(
        NodeId(3),
        Some(share(Counter::default())),
        RrpcConfig::new(outcome_publisher(NodeId(3), 1)),
    );
    fresh
        .restore(Some(&snap), 1, head)
        .expect("the real one restores");
}
