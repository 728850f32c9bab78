//! Deterministic simulators, driven by a seeded random source in simulated
//! time, with faults injected:
//! - [`world`]: one [`Node`](crate::core::Node) and many model clients
//!   (sessions, resume, slow consumers, gaps);
//! - [`cluster`]: a core of 3 or 5 [`Group`](crate::core::group::Group)s
//!   with crashes, restarts, partitions and broken links, and publishers
//!   that fail over as the SDK does.
//! - [`tree`]: a root server, one or two tiers of relays and model clients
//!   at the leaves, with broken connections and relay crashes (adoption).
//!
//! The rest of this text describes the first; the others' modules say
//! what they check.
//!
//! One `u64` seed fixes everything: the node's limits (small retention and
//! queues, to reach gaps, catch-up stalls and slow-consumer cuts), the
//! clients (patterns, slow policy, who publishes), the workload and the
//! faults (broken connections, stalls of a client's reading, delays). Frames
//! travel encoded through the real codec, FIFO per connection as on TCP.
//!
//! The [`checker`] checks DESIGN.md's guarantees 1–3 after every step and
//! guarantees 5 and 8 (no acknowledged publish lost, convergence) once faults
//! stop. A failure prints its seed and the command that replays it.
//!

pub mod checker;
mod client;
pub mod cluster;
pub mod cluster_checker;
pub mod tree;
#[cfg(test)]
mod tree_tests;
mod world;

pub(crate) use world::run_with;
pub use world::{run, Outcome};

/// When the `nth` frame sent one way on connection `conn` arrives: a delay
/// up to `delay_max_ms` fixed by the seed, the connection and the frame's
/// number (not by the order outputs were made in), and never before the
/// frame ahead of it (`last`), as on TCP.
fn arrival(
    seed: u64,
    conn: usize,
    nth: u64,
    to_client: bool,
    now: std::time::Duration,
    delay_max_ms: u64,
    last: Option<std::time::Duration>,
) -> std::time::Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (seed, conn, nth, to_client).hash(&mut h);
    let at = now + std::time::Duration::from_millis(h.finish() % (delay_max_ms + 1));
    last.map_or(at, |l| at.max(l))
}

/// A hash of everything `clients` clients delivered and were told of
/// (for the determinism tests); adds their deliveries to `delivered`.
fn fingerprint(checker: &checker::Checker, clients: usize, delivered: &mut u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for c in 0..clients {
        let seen = checker.seen(c);
        *delivered += seen.delivered.len() as u64;
        seen.delivered.hash(&mut h);
        seen.gaps.hash(&mut h);
    }
    h.finish()
}

/// How many seeds a random-run test covers: `CANOPY_SIM_SEEDS` if set (the
/// long-run mode), else `default`.
#[cfg(test)]
fn seed_count(default: u64) -> u64 {
    std::env::var("CANOPY_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seed a replay tool replays: `CANOPY_SIM_SEED`.
///
/// # Panics
/// When it is not set to a number (the tools are run by hand).
#[cfg(test)]
fn replay_seed() -> u64 {
    std::env::var("CANOPY_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("set CANOPY_SIM_SEED to the seed to replay")
}

/// A xorshift64* generator: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p` percent.
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod tests;
