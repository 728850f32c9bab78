//! `kv`: a replicated key-value store, the worked example of a replicated
//! service, with a method in every mode. Arguments and replies are text:
//!
//! | method | mode | argument | reply |
//! |---|---|---|---|
//! | `put` | active | `KEY VALUE` | the previous value (empty if none) |
//! | `get` | active | `KEY` | the value (an error if none) |
//! | `del` | active | `KEY` | the value removed (an error if none) |
//! | `digest` | active | (none) | this replica's state digest, hex |
//! | `stamp` | primary-backup | `KEY` | the primary's clock (Unix ms), also stored at `KEY` |
//! | `hash` | load-balanced | `KEY ROUNDS TEXT` | a digest of `TEXT` after `ROUNDS` rounds (CPU work), also stored at `KEY` |
//! | `wait` | load-balanced | `MS` | `waited MS ms` after sleeping that long (at most 10 s) |
//! | `primes` | parallel | `N` | how many primes are below `N` (at most 10^9), counted in shares |
//!
//! `stamp` is not deterministic (every replica's clock differs), which is
//! what primary-backup is for: the primary reads its clock once and every
//! replica stores what it read. `hash` and `wait` do their work at one
//! replica each; `primes` splits its range by rank.
//!
//! ```text
//! canopy up configs/kv.toml
//! canopy call --server 127.0.0.1:4401 put 'color blue'
//! canopy call --server 127.0.0.1:4411 get color
//! ```

use crate::core::rrpc::{digest_of, Call, Method, Mode, Service};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The most rounds `hash` does.
const ROUNDS_MAX: u64 = 100_000_000;
/// The longest `wait`.
const WAIT_MAX_MS: u64 = 10_000;
/// The largest `primes` bound.
const PRIMES_MAX: u64 = 1_000_000_000;

/// The store: text keys and values. The lock is held only while a call's
/// effect is applied or the state copied, never while a handler works.
#[derive(Debug, Default)]
pub struct Kv {
    map: Mutex<BTreeMap<String, String>>,
}

impl Kv {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.map().get(key).cloned()
    }

    /// Every key and value, in key order.
    pub fn entries(&self) -> BTreeMap<String, String> {
        self.map().clone()
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn text(payload: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(payload).map_err(|_| "the argument is not UTF-8 text".to_string())
}

/// `KEY REST` split at the first space; the key must not be empty.
fn key_and_rest(arg: &str) -> Result<(&str, &str), String> {
    let (key, rest) = arg.split_once(' ').unwrap_or((arg, ""));
    if key.is_empty() {
        return Err("a key is needed".into());
    }
    Ok((key, rest))
}

fn number(what: &str, s: &str, max: u64) -> Result<u64, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{what}: `{s}` is not a number"))?;
    if n > max {
        return Err(format!("{what}: {n} is more than {max}"));
    }
    Ok(n)
}

/// `TEXT` mixed `rounds` times.
fn hash_rounds(text: &str, rounds: u64) -> u64 {
    let mut h = digest_of(text.as_bytes());
    for i in 0..rounds {
        h ^= i;
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

impl Service for Kv {
    fn methods(&self) -> Vec<Method> {
        vec![
            Method::new("put", Mode::Active),
            Method::new("get", Mode::Active),
            Method::new("del", Mode::Active),
            Method::new("digest", Mode::Active),
            Method::new("stamp", Mode::PrimaryBackup),
            Method::new("hash", Mode::LoadBalanced),
            Method::new("wait", Mode::LoadBalanced),
            Method::new("primes", Mode::Parallel),
        ]
    }

    fn execute(&self, call: &Call<'_>) -> Result<Bytes, String> {
        let arg = text(call.payload)?;
        match call.method {
            // Active: the effect is the argument; `apply` does the rest.
            "put" | "get" | "del" | "digest" => Ok(Bytes::copy_from_slice(call.payload)),
            "stamp" => {
                key_and_rest(arg)?;
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                Ok(ms.to_string().into())
            }
            "hash" => {
                let (_, rest) = key_and_rest(arg)?;
                let (rounds, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let rounds = number("rounds", rounds, ROUNDS_MAX)?;
                Ok(format!("{:016x}", hash_rounds(text, rounds)).into())
            }
            "wait" => {
                let ms = number("milliseconds", arg, WAIT_MAX_MS)?;
                std::thread::sleep(Duration::from_millis(ms));
                Ok(Bytes::new())
            }
            "primes" => {
                let n = number("N", arg, PRIMES_MAX)?;
                let share = call.share.ok_or("primes runs in shares")?;
                let (rank, of) = (u64::from(share.rank), u64::from(share.of.max(1)));
                let (from, to) = (n * rank / of, n * (rank + 1) / of);
                let count = (from..to).filter(|&i| is_prime(i)).count();
                Ok(count.to_string().into())
            }
            other => Err(format!("no method `{other}`")),
        }
    }

    fn merge(&self, _call: &Call<'_>, shares: &[Bytes]) -> Result<Bytes, String> {
        let mut sum = 0u64;
        for s in shares {
            sum += number("a share", text(s)?, u64::MAX)?;
        }
        Ok(sum.to_string().into())
    }

    fn apply(&self, call: &Call<'_>, effect: &[u8]) -> Result<Bytes, String> {
        let arg = text(call.payload)?;
        let effect = text(effect)?;
        let mut map = self.map();
        match call.method {
            "put" => {
                let (key, value) = key_and_rest(arg)?;
                let old = map.insert(key.to_owned(), value.to_owned());
                Ok(old.unwrap_or_default().into())
            }
            "get" => {
                let (key, _) = key_and_rest(arg)?;
                match map.get(key) {
                    Some(v) => Ok(v.clone().into()),
                    None => Err(format!("no key `{key}`")),
                }
            }
            "del" => {
                let (key, _) = key_and_rest(arg)?;
                match map.remove(key) {
                    Some(v) => Ok(v.into()),
                    None => Err(format!("no key `{key}`")),
                }
            }
            "digest" => Ok(format!("{:016x}", digest_of(&encode(&map))).into()),
            "stamp" | "hash" => {
                let (key, _) = key_and_rest(arg)?;
                map.insert(key.to_owned(), effect.to_owned());
                Ok(effect.to_owned().into())
            }
            "wait" => Ok(format!("waited {} ms", arg.trim()).into()),
            "primes" => Ok(effect.to_owned().into()),
            other => Err(format!("no method `{other}`")),
        }
    }

    fn snapshot(&self) -> Bytes {
        encode(&self.map())
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        *self.map() =
            ciborium::from_reader(snapshot).map_err(|e| format!("not a kv snapshot: {e}"))?;
        Ok(())
    }
}

/// The store as its snapshot (and digest) takes it.
fn encode(map: &BTreeMap<String, String>) -> Bytes {
    let mut buf = Vec::new();
    ciborium::into_writer(map, &mut buf).expect("invariant: writing CBOR to a Vec cannot fail");
    buf.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rrpc::{CallId, Share};
    use canopy_client::protocol::{PubSeq, PublisherId};

    fn call<'a>(method: &'a str, arg: &'a str, share: Option<Share>) -> Call<'a> {
        Call {
            id: CallId {
                publisher: PublisherId(1),
                pub_seq: PubSeq(1),
            },
            method,
            payload: arg.as_bytes(),
            share,
        }
    }

    fn run(kv: &Kv, method: &str, arg: &str) -> Result<String, String> {
        let c = call(method, arg, None);
        let effect = kv.execute(&c)?;
        let reply = kv.apply(&c, &effect)?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    #[test]
    fn put_get_del_answer_as_documented() {
        let kv = Kv::default();
        assert_eq!(run(&kv, "put", "a 1").as_deref(), Ok(""));
        assert_eq!(run(&kv, "put", "a two words").as_deref(), Ok("1"));
        assert_eq!(run(&kv, "get", "a").as_deref(), Ok("two words"));
        assert_eq!(run(&kv, "del", "a").as_deref(), Ok("two words"));
        assert!(run(&kv, "get", "a").is_err());
        assert!(run(&kv, "put", "").is_err());
        assert!(kv.execute(&call("put", "\u{0}", None)).is_ok());
        assert!(kv
            .execute(&Call {
                payload: &[0xff],
                ..call("put", "", None)
            })
            .is_err());
    }

    #[test]
    fn primes_shares_add_up_to_the_count() {
        let kv = Kv::default();
        let shares: Vec<Bytes> = (0..3)
            .map(|rank| {
                kv.execute(&call("primes", "100", Some(Share { rank, of: 3 })))
                    .expect("a share")
            })
            .collect();
        let merged = kv
            .merge(&call("primes", "100", None), &shares)
            .expect("merges");
        assert_eq!(&merged[..], b"25");
    }

    #[test]
    fn a_snapshot_restores_the_same_store() {
        let kv = Kv::default();
        run(&kv, "put", "x 1").expect("put");
        run(&kv, "hash", "h 10 text").expect("hash");
        let other = Kv::default();
        other.restore(&kv.snapshot()).expect("restores");
        assert_eq!(other.entries(), kv.entries());
        assert_eq!(other.digest(), kv.digest());
        assert!(other.restore(b"\xff").is_err());
    }

    #[test]
    fn bounds_are_refused_not_run() {
        let kv = Kv::default();
        assert!(kv.execute(&call("wait", "10001", None)).is_err());
        assert!(kv.execute(&call("hash", "k 100000001 t", None)).is_err());
        assert!(kv
            .execute(&call(
                "primes",
                "1000000001",
                Some(Share { rank: 0, of: 1 })
            ))
            .is_err());
    }
}
