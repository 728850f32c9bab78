//! A tool for refactoring: every simulator's outcome for many seeds, one
//! line each, so that a change meant to preserve behaviour can show it did
//! (the same lines before and after; `diff` names the seeds that differ).
//!
//! ```sh
//! CANOPY_SIM_SEEDS=1000 cargo test --release -p canopy-broker --lib \
//!     sim::fingerprints -- --ignored --nocapture > before.txt
//! ```

use super::{cluster, tree, world};

#[test]
#[ignore = "a tool: prints every simulator's outcome per seed"]
fn fingerprints() {
    let seeds = super::seeds(1000);
    for seed in seeds.clone() {
        println!("node {seed} {:?}", world::run(seed));
    }
    for seed in seeds.clone() {
        println!("tree {seed} {:?}", tree::run(seed));
    }
    for seed in seeds.clone() {
        println!("cluster {seed} {:?}", cluster::run(seed));
    }
}
