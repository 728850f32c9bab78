//! The replicated service the cluster simulator runs in its core servers
//! (docs/DESIGN.md, "Replicated RPC"), built to make the checks sharp:
//! every applied call changes the state, and its reply is the state after
//! it, so a reply names the position of its call in the order the group
//! applied calls.
//!
//! The state is a running hash and the log of applied calls with the
//! reply each got. Methods: `a` (active), `p` (primary-backup: the
//! executor mixes in its own salt, so the effect depends on which replica
//! executed), `l` (load-balanced), `x` (parallel: one share per rank).
//!
//! [`ServiceBugs`] break it on purpose, for the tests that prove the
//! checkers.

use crate::core::rrpc::{Call, CallId, Method, Mode, Service};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The methods, by mode.
pub(crate) const METHODS: [(&str, Mode); 4] = [
    ("a", Mode::Active),
    ("p", Mode::PrimaryBackup),
    ("l", Mode::LoadBalanced),
    ("x", Mode::Parallel),
];

/// Deliberately broken services.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ServiceBugs {
    /// `apply` mixes in the replica's own salt: replicas drift apart.
    pub nondeterministic_apply: bool,
    /// The reply is the state before the call, not after it.
    pub reply_before_apply: bool,
}

/// What the service holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    /// The running hash of every applied call's effect.
    pub hash: u64,
    /// Applied calls in order, with the reply each got.
    pub log: Vec<(CallId, u64)>,
}

/// One replica of the simulated service.
pub(crate) struct SimService {
    state: Mutex<State>,
    salt: u64,
    bugs: ServiceBugs,
}

impl SimService {
    /// A replica whose non-deterministic choices are seeded by `salt`.
    pub fn new(salt: u64, bugs: ServiceBugs) -> Self {
        SimService {
            state: Mutex::default(),
            salt,
            bugs,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn mix(h: u64, x: u64) -> u64 {
    let mut z = h ^ x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(b: &[u8]) -> Result<u64, String> {
    let a: [u8; 8] = b.try_into().map_err(|_| "not 8 bytes".to_string())?;
    Ok(u64::from_le_bytes(a))
}

fn of_call(call: &Call<'_>) -> u64 {
    mix(call.id.publisher.0, call.id.pub_seq.0)
}

impl Service for SimService {
    fn methods(&self) -> Vec<Method> {
        METHODS.iter().map(|&(n, m)| Method::new(n, m)).collect()
    }

    fn execute(&self, call: &Call<'_>) -> Result<Bytes, String> {
        let base = of_call(call);
        let effect = match (call.method, call.share) {
            ("p", _) => mix(base, self.salt),
            ("x", Some(s)) => mix(base, u64::from(s.rank)),
            _ => base,
        };
        Ok(Bytes::copy_from_slice(&effect.to_le_bytes()))
    }

    fn merge(&self, _call: &Call<'_>, shares: &[Bytes]) -> Result<Bytes, String> {
        let mut h = 0;
        for s in shares {
            h = mix(h, word(s)?);
        }
        Ok(Bytes::copy_from_slice(&h.to_le_bytes()))
    }

    fn apply(&self, call: &Call<'_>, effect: &[u8]) -> Result<Bytes, String> {
        let mut effect = word(effect)?;
        if self.bugs.nondeterministic_apply {
            effect = mix(effect, self.salt);
        }
        let mut state = self.state();
        let before = state.hash;
        state.hash = mix(before, effect);
        let reply = match self.bugs.reply_before_apply {
            true => before,
            false => state.hash,
        };
        let after = state.hash;
        state.log.push((call.id, after));
        Ok(Bytes::copy_from_slice(&reply.to_le_bytes()))
    }

    fn snapshot(&self) -> Bytes {
        let mut buf = Vec::new();
        ciborium::into_writer(&*self.state(), &mut buf).expect("invariant: CBOR to a Vec");
        buf.into()
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        *self.state() = ciborium::from_reader(snapshot).map_err(|e| e.to_string())?;
        Ok(())
    }
}
