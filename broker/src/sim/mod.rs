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
//! The [`checker`] checks docs/DESIGN.md's guarantees 1–3 after every step and
//! guarantees 5 and 8 (no acknowledged publish lost, convergence) once faults
//! stop. A failure prints its seed and the command that replays it.
//!

use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;

pub mod checker;
mod client;
pub mod cluster;
pub mod cluster_checker;
pub(crate) mod service;
pub mod tree;
#[cfg(test)]
mod tree_tests;
mod world;

pub(crate) use world::run_with;
pub use world::{run, Outcome};

/// One simulated connection: frames on the way each direction, with the
/// times they arrive, FIFO as on TCP.
struct Link {
    /// Toward the server.
    up: VecDeque<(Duration, Bytes)>,
    /// Toward the client (or the relay, for a relay's upstream).
    down: VecDeque<(Duration, Bytes)>,
    /// The server closed the session: the client sees the close once
    /// `down` is drained.
    closed_by_server: bool,
    dead: bool,
    /// Frames sent so far, both ways (they key the delays).
    sent: u64,
    /// Frames toward the server vanish (a half-open connection): nothing
    /// arrives, not even a close.
    silent_up: bool,
    /// ...and toward the client.
    silent_down: bool,
}

impl Link {
    fn new() -> Self {
        Link {
            up: VecDeque::new(),
            down: VecDeque::new(),
            closed_by_server: false,
            dead: false,
            sent: 0,
            silent_up: false,
            silent_down: false,
        }
    }

    /// The connection goes silent toward the server (`up`), toward the
    /// client (`down`), or both, for good, without a close.
    fn silence(&mut self, up: bool, down: bool) {
        self.silent_up |= up;
        self.silent_down |= down;
    }

    /// Whether nothing is on the way or still to be found out: broken, or
    /// both queues empty and not silent (a silent connection has yet to be
    /// found dead by one of its ends).
    fn settled(&self) -> bool {
        self.dead
            || (self.up.is_empty() && self.down.is_empty() && !self.silent_up && !self.silent_down)
    }

    /// Whether the client end sees the server's close now: it was closed,
    /// what came before has arrived, and the close can get through.
    fn close_heard(&self) -> bool {
        self.closed_by_server && !self.dead && self.down.is_empty() && !self.silent_down
    }

    /// Queues `frame` (length prefix included) one way, to arrive after a
    /// delay fixed by `(seed, conn)` and the frame's number, whatever order
    /// the server emitted outputs for different sessions in.
    fn push(
        &mut self,
        (seed, conn, delay_max_ms): (u64, usize, u64),
        now: Duration,
        down: bool,
        frame: Bytes,
    ) {
        use std::hash::{Hash, Hasher};
        if (down && self.silent_down) || (!down && self.silent_up) {
            return;
        }
        self.sent += 1;
        let mut h = std::hash::DefaultHasher::new();
        (seed, conn, self.sent, down).hash(&mut h);
        let at = now + Duration::from_millis(h.finish() % (delay_max_ms + 1));
        let queue = if down { &mut self.down } else { &mut self.up };
        let at = queue.back().map_or(at, |(last, _)| at.max(*last));
        // Frames travel as the codec delivers them: without the length prefix.
        queue.push_back((at, frame.slice(4..)));
    }

    /// The server closed the session: `frame` last (after what is queued
    /// when `drain`, instead of it otherwise), and nothing more goes up.
    fn close(&mut self, now: Duration, frame: Option<Bytes>, drain: bool) {
        if !drain {
            self.down.clear();
        }
        if let Some(f) = frame.filter(|_| !self.silent_down) {
            self.down.push_back((now, f.slice(4..)));
        }
        self.closed_by_server = true;
        self.up.clear();
    }

    /// Breaks it (what is on the way is lost); false if it was already.
    fn kill(&mut self) -> bool {
        if self.dead {
            return false;
        }
        self.dead = true;
        self.up.clear();
        self.down.clear();
        true
    }

    /// The next frame one way that has arrived by `now`.
    fn pop_due(&mut self, now: Duration, down: bool) -> Option<Bytes> {
        let queue = if down { &mut self.down } else { &mut self.up };
        if self.dead || queue.front().is_none_or(|(at, _)| *at > now) {
            return None;
        }
        queue.pop_front().map(|(_, f)| f)
    }
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

/// The seeds a random-run test covers: `CANOPY_SIM_SEEDS` of them if set
/// (the long-run mode), else `default`, from `CANOPY_SIM_FIRST_SEED` if set
/// (to go past the seeds earlier long runs covered), else from 0.
#[cfg(test)]
fn seeds(default: u64) -> std::ops::Range<u64> {
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let first = var("CANOPY_SIM_FIRST_SEED").unwrap_or(0);
    first..first.saturating_add(var("CANOPY_SIM_SEEDS").unwrap_or(default))
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
mod fingerprints;
#[cfg(test)]
mod tests;
