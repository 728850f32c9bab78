//! Tree simulator runs: relays under faults keep every guarantee at the
//! clients.

use super::tree::{run, run_with, TreeBugs, TreeOutcome};

/// Seeds CI runs; `CANOPY_SIM_SEEDS=N` asks for more (the long-run mode).
fn seeds() -> std::ops::Range<u64> {
    super::seeds(100)
}

#[test]
fn relays_under_faults_keep_every_guarantee_at_the_clients() {
    let mut t = TreeOutcome::default();
    for seed in seeds() {
        t.add(&run(seed).unwrap_or_else(|v| panic!("{}", v.0)));
    }
    // The runs must exercise the faults they claim to survive.
    assert!(t.published > 1000 && t.delivered > 1000, "{t:?}");
    assert!(t.client_breaks > 25 && t.upstream_breaks > 25, "{t:?}");
    assert!(t.client_silences > 10 && t.upstream_silences > 10, "{t:?}");
    assert!(t.crashes > 20, "relays crashed: {t:?}");
}

#[test]
fn one_tree_seed_replays_bit_for_bit() {
    for seed in [3, 29] {
        assert_eq!(run(seed), run(seed), "seed {seed} is not deterministic");
    }
}

/// A relay that does not send its held forwards again after reconnecting
/// leaves its clients' publishes unacknowledged for good: the liveness
/// check (the tree never converges) or the final one (a publish neither
/// acknowledged nor covered by a gap) must catch it.
#[test]
fn the_checker_catches_a_relay_that_forgets_to_resend() {
    let bugs = TreeBugs {
        no_resend: true,
        ..TreeBugs::default()
    };
    let caught = (0..40).find_map(|seed| run_with(seed, bugs).err());
    let Some(v) = caught else {
        panic!("no seed caught the bug")
    };
    assert!(
        v.0.contains("liveness") || v.0.contains("never got acknowledged"),
        "{}",
        v.0
    );
}

/// A relay whose running hash is wrong after it starts from a report: the
/// resume checks must catch it (a strong client told its stream diverged,
/// or a relay below that cannot accept the stream).
#[test]
fn the_resume_check_catches_a_relay_with_a_wrong_running_hash() {
    let bugs = TreeBugs {
        forget_snapshot_hash: true,
        ..TreeBugs::default()
    };
    let caught = (0..40).find_map(|seed| run_with(seed, bugs).err());
    let Some(v) = caught else {
        panic!("no seed caught the bug")
    };
    assert!(v.0.contains("diverged"), "{}", v.0);
}

/// `CANOPY_SIM_SEED=N [RUST_LOG=debug] cargo test -p canopy-broker --lib sim::tree_tests::replay -- --ignored --nocapture`
#[test]
#[ignore = "a tool: replays the seed in CANOPY_SIM_SEED"]
fn replay() {
    let seed = super::replay_seed();
    // RUST_LOG=debug shows the relays' and the clients' decisions.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .without_time()
        .with_test_writer()
        .try_init();
    match run(seed) {
        Ok(o) => println!("seed {seed}: {o:?}"),
        Err(v) => panic!("{}", v.0),
    }
}
