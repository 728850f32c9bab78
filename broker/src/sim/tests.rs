//! Simulator runs and the tests that prove its checkers catch violations.

use super::checker::Checker;
use super::*;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use canopy_client::topic::Pattern;

/// Seeds CI runs; `CANOPY_SIM_SEEDS=N` asks for more (the long-run mode).
fn seeds() -> std::ops::Range<u64> {
    super::seeds(300)
}

#[test]
fn random_runs_with_broken_connections_and_stalls_keep_every_guarantee() {
    let mut totals = Outcome::default();
    for seed in seeds() {
        totals.add(&run(seed).unwrap_or_else(|v| panic!("{}", v.0)));
    }
    // The runs must actually exercise the faults they claim to survive.
    assert!(
        totals.published > 1000 && totals.delivered > 1000,
        "{totals:?}"
    );
    assert!(totals.breaks > 100, "connections were broken: {totals:?}");
    assert!(
        totals.closes > 10,
        "the node closed slow sessions: {totals:?}"
    );
    assert!(totals.gaps > 10, "gaps were reported: {totals:?}");
    assert!(
        totals.pauses > 100,
        "flow control paused sessions: {totals:?}"
    );
}

#[test]
fn one_seed_replays_bit_for_bit() {
    for seed in [1, 17, 4242] {
        assert_eq!(run(seed), run(seed), "seed {seed} is not deterministic");
    }
}

/// `CANOPY_SIM_SEED=N cargo test -p canopy-broker --lib sim::tests::replay -- --ignored --nocapture`
/// replays one seed and prints what it did.
#[test]
#[ignore = "a tool: replays the seed in CANOPY_SIM_SEED"]
fn replay() {
    let seed = super::replay_seed();
    match run(seed) {
        Ok(o) => println!("seed {seed}: {o:?}"),
        Err(v) => panic!("{}", v.0),
    }
}

fn msg(checker: &mut Checker, p: u64, s: u64) -> (PublisherId, PubSeq) {
    let id = (PublisherId(p), PubSeq(s));
    checker.published(id.0, id.1, "t", format!("{p}:{s}").as_bytes());
    id
}

#[test]
fn the_checker_catches_disagreeing_order() {
    let mut c = Checker::new(2);
    let a = msg(&mut c, 1, 1);
    let b = msg(&mut c, 2, 1);
    c.delivered(0, Seq(1), a.0, a.1, "t", b"1:1").expect("fine");
    c.delivered(0, Seq(2), b.0, b.1, "t", b"2:1").expect("fine");
    c.delivered(1, Seq(1), b.0, b.1, "t", b"2:1")
        .expect_err("seq 1 means a, not b");
}

#[test]
fn the_checker_catches_duplicates_creation_and_reordering() {
    let mut c = Checker::new(1);
    let a = msg(&mut c, 1, 1);
    let a2 = msg(&mut c, 1, 2);
    c.delivered(0, Seq(1), a.0, a.1, "t", b"1:1").expect("fine");
    c.delivered(0, Seq(1), a.0, a.1, "t", b"1:1")
        .expect_err("duplicate");
    c.delivered(0, Seq(3), PublisherId(9), PubSeq(1), "t", b"x")
        .expect_err("never published");
    c.delivered(0, Seq(2), a.0, a.1, "t", b"1:1")
        .expect_err("same message twice under new seq");
    let mut c = Checker::new(1);
    let a = msg(&mut c, 1, 1);
    let a2b = msg(&mut c, 1, 2);
    c.delivered(0, Seq(5), a2b.0, a2b.1, "t", b"1:2")
        .expect("fine");
    c.delivered(0, Seq(6), a.0, a.1, "t", b"1:1")
        .expect_err("publisher FIFO broken");
    let _ = a2;
}

#[test]
fn the_checker_catches_a_silently_lost_acknowledged_message() {
    let mut c = Checker::new(2);
    let a = msg(&mut c, 1, 1);
    c.acked(a.0, a.1);
    c.delivered(0, Seq(1), a.0, a.1, "t", b"1:1").expect("fine");
    let all = vec![vec![Pattern::new(">").expect("pattern")]; 2];
    c.check_complete(&all)
        .expect_err("client 1 lost it silently");
    c.gap(1, Seq(1), Seq(1));
    c.check_complete(&all)
        .expect("a reported gap is not silent loss");
}

/// The first seed (of the first 300) on which a node with `bugs` breaks a
/// guarantee, with what broke.
fn first_failure(bugs: crate::core::cltsvr::node::Bugs) -> Option<(u64, String)> {
    (0..300).find_map(|seed| run_with(seed, bugs).err().map(|v| (seed, v.0)))
}

#[test]
fn a_node_that_orders_retries_again_is_caught() {
    let bugs = crate::core::cltsvr::node::Bugs {
        order_retries: true,
        ..Default::default()
    };
    let (seed, what) = first_failure(bugs).expect("the simulator catches re-ordered retries");
    assert!(what.contains("twice"), "seed {seed}: {what}");
}

#[test]
fn a_node_whose_live_stream_overtakes_a_catch_up_is_caught() {
    let bugs = crate::core::cltsvr::node::Bugs {
        overtake_catch_up: true,
        ..Default::default()
    };
    first_failure(bugs).expect("the simulator catches deliveries overtaking a catch-up");
}
